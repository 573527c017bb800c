"""PyTorch reference throughput on the GPU for mgpu's two Fashion-MNIST recipes, at batch 128:
  fashion_mlp: 784-256-128-10 MLP with ReLU
  fashion_cnn: conv(1->32,3,p1,no bias)-BN-ReLU-maxpool2 -> conv(32->64,3,p1,no bias)-BN-ReLU-maxpool2 -> fc(3136->128)-ReLU-dropout(0.25)-fc(128->10)
AdamW(lr=1e-3, weight_decay=1e-4), cross-entropy, one optimizer step per batch. Data is synthetic
(uniform pixels, random labels) and already on the GPU, so only the training step is timed: that is
PyTorch's best case and what mgpu's GPU path is compared against.
Usage: python3 bench/gpu/torch_fashion.py [--steps 300] [--batch 128] [--modes eager,compile] [--models fashion_mlp,fashion_cnn]
Prints one line per (model, mode): model=... mode=... batch=... samples_per_s=... device=..."""
import argparse
import time

import torch
import torch.nn as nn


def make_model(name):
    if name == "fashion_mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    if name == "fashion_cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(3136, 128), nn.ReLU(), nn.Dropout(0.25), nn.Linear(128, 10))
    raise SystemExit(f"unknown model {name}")


def bench(name, mode, steps, batch, dev):
    torch.manual_seed(0)
    model = make_model(name).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    n = 60000 // batch * batch
    x_all = torch.rand(n, 1, 28, 28, device=dev)
    y_all = torch.randint(0, 10, (n,), device=dev)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    if mode == "compile":
        step = torch.compile(step)
    nb = n // batch
    for i in range(20):  # warm-up (and compilation)
        step(x_all[(i % nb) * batch:(i % nb + 1) * batch], y_all[(i % nb) * batch:(i % nb + 1) * batch])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        j = i % nb
        step(x_all[j * batch:(j + 1) * batch], y_all[j * batch:(j + 1) * batch])
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return steps * batch / dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--models", default="fashion_mlp,fashion_cnn")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("SKIPPED: torch sees no CUDA device")
        return
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # mgpu's f32 default: no TF32
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(0).replace(" ", "_")
    for model in a.models.split(","):
        for mode in a.modes.split(","):
            try:
                sps = bench(model, mode, a.steps, a.batch, dev)
                print(f"model={model} mode={mode} batch={a.batch} samples_per_s={sps:.0f} device={name} torch={torch.__version__}", flush=True)
            except Exception as e:  # torch.compile needs a working triton; report and go on
                print(f"model={model} mode={mode} batch={a.batch} error={type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)


if __name__ == "__main__":
    main()
