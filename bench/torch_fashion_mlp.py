"""The fashion_mlp recipe in PyTorch, for bench/bench_cpu.sh: 784-256-128-10 MLP with ReLU,
AdamW(lr=1e-3, weight_decay=1e-4), batch 128, pixels in [0, 1], shuffled every epoch.
The data sits in memory as tensors (no DataLoader workers), which is PyTorch's fastest path.
Prints one line: samples_per_s=<float> test_accuracy=<float> threads=<int> blas=<name>."""
import gzip, os, struct, sys, time
import numpy as np
import torch
import torch.nn as nn


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find(d, stem):
    for name in (stem, stem + ".gz"):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    sys.exit(f"missing {stem} in {d}")


def main():
    data_dir, epochs, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.from_numpy(read_idx(find(data_dir, "train-images-idx3-ubyte")).astype(np.float32) / 255.0).reshape(-1, 784)
    y = torch.from_numpy(read_idx(find(data_dir, "train-labels-idx1-ubyte")).astype(np.int64))
    xt = torch.from_numpy(read_idx(find(data_dir, "t10k-images-idx3-ubyte")).astype(np.float32) / 255.0).reshape(-1, 784)
    yt = torch.from_numpy(read_idx(find(data_dir, "t10k-labels-idx1-ubyte")).astype(np.int64))
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    train_time, samples = 0.0, 0
    for epoch in range(epochs):
        perm = torch.randperm(x.shape[0])
        t0 = time.perf_counter()
        for i in range(0, x.shape[0], 128):
            idx = perm[i:i + 128]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            samples += idx.numel()
        train_time += time.perf_counter() - t0
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    blas = "unknown"
    try:
        cfg = torch.__config__.show()
        blas = "openblas" if "openblas" in cfg.lower() else blas
    except Exception:
        pass
    print(f"samples_per_s={samples / train_time:.1f} test_accuracy={acc:.4f} threads={threads} blas={blas}")


if __name__ == "__main__":
    main()
