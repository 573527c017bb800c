"""Loads an mgpu model.safetensors into the equivalent torch.nn model (strict load_state_dict)
and prints its Fashion-MNIST test accuracy. The safetensors file is parsed here with json and
struct only, so the check does not depend on mgpu or on the `safetensors` package.
Usage: interop.py mlp|cnn MODEL.safetensors DATA_DIR

The other way round (mgpu's --init-from): `interop.py export mlp|cnn OUT.safetensors DATA_DIR`
trains the torch.nn model for 30 SGD steps, writes model.state_dict() with
safetensors.torch.save_file when the `safetensors` package is installed (else with save_file
below, which writes the same layout: header padded with spaces to 8 bytes, tensors sorted by
name) and prints `accuracy=` and `writer=`."""
import gzip, json, os, struct, sys
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "I64": np.int64, "U8": np.uint8}


def load_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        arr = np.frombuffer(blob[base + b:base + e], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 256), nn.Linear(256, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)
        self.fc1, self.fc2 = nn.Linear(3136, 128), nn.Linear(128, 10)
        self.dropout = nn.Dropout(0.25)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(self.dropout(F.relu(self.fc1(x.flatten(1)))))


def read_idx(path):
    if not os.path.exists(path):
        path += ".gz"
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def save_file(tensors, path):
    """safetensors.torch.save_file's layout for F32/I64 tensors, without the package."""
    names = sorted(tensors)
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    codes = {torch.float32: "F32", torch.int64: "I64", torch.float16: "F16", torch.int32: "I32", torch.uint8: "U8"}
    for name in names:
        t = tensors[name].detach().contiguous().cpu()
        data = t.numpy().tobytes()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_set(data_dir):
    x = torch.from_numpy(read_idx(os.path.join(data_dir, "t10k-images-idx3-ubyte")).astype(np.float32) / 255.0)
    y = torch.from_numpy(read_idx(os.path.join(data_dir, "t10k-labels-idx1-ubyte")).astype(np.int64))
    return x, y


def accuracy(model, data_dir):
    x, y = test_set(data_dir)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 1000].unsqueeze(1)).argmax(1) for i in range(0, len(x), 1000)])
    return (pred == y).float().mean().item()


def export(kind, path, data_dir):
    torch.manual_seed(0)
    model = MLP() if kind == "mlp" else CNN()
    x = torch.from_numpy(read_idx(os.path.join(data_dir, "train-images-idx3-ubyte"))[:30 * 64].astype(np.float32) / 255.0)
    y = torch.from_numpy(read_idx(os.path.join(data_dir, "train-labels-idx1-ubyte"))[:30 * 64].astype(np.int64))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for i in range(0, len(x), 64):
        opt.zero_grad()
        F.cross_entropy(model(x[i:i + 64].unsqueeze(1)), y[i:i + 64]).backward()
        opt.step()
    try:
        from safetensors.torch import save_file as official_save_file
        official_save_file(model.state_dict(), path)
        writer = "safetensors.torch.save_file"
    except ImportError:
        save_file(model.state_dict(), path)
        writer = "interop.py save_file"
    print(f"accuracy={accuracy(model, data_dir):.4f}")
    print(f"writer={writer}")


def main():
    if sys.argv[1] == "export":
        export(*sys.argv[2:5])
        return
    kind, path, data_dir = sys.argv[1:4]
    model = MLP() if kind == "mlp" else CNN()
    model.load_state_dict(load_safetensors(path), strict=True)
    model.eval()
    x = torch.from_numpy(read_idx(os.path.join(data_dir, "t10k-images-idx3-ubyte")).astype(np.float32) / 255.0)
    y = torch.from_numpy(read_idx(os.path.join(data_dir, "t10k-labels-idx1-ubyte")).astype(np.int64))
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 1000].unsqueeze(1)).argmax(1) for i in range(0, len(x), 1000)])
    print(f"accuracy={(pred == y).float().mean().item():.4f}")


if __name__ == "__main__":
    main()
