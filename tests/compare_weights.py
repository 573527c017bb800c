"""Compares two model.safetensors files tensor by tensor without numpy or torch (the emulated
suite runs where neither is installed): prints the worst relative difference ||a - b|| / ||a||
and exits 1 if it exceeds the tolerance, a value is not finite, or the tensor sets differ.
Usage: compare_weights.py A B [tol=1e-5] [skip: a regex of tensor names left out] [v: print each]"""
import json, math, re, struct, sys

FORMATS = {"F32": ("f", 4), "F64": ("d", 8), "I64": ("q", 8), "I32": ("i", 4)}

def load(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        code, size = FORMATS[e["dtype"]]
        lo, hi = e["data_offsets"]
        raw = data[8 + n + lo:8 + n + hi]
        out[name] = struct.unpack("<%d%s" % (len(raw) // size, code), raw)
    return out

a, b = load(sys.argv[1]), load(sys.argv[2])
tol = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-5
if set(a) != set(b):
    sys.exit("different tensors: %s" % sorted(set(a) ^ set(b)))
worst, name = 0.0, ""
skip = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else None
for k in sorted(a):
    if skip and re.search(skip, k):
        continue
    x, y = a[k], b[k]
    if len(x) != len(y):
        sys.exit("%s: %d elements against %d" % (k, len(x), len(y)))
    if not all(math.isfinite(v) for v in y):
        sys.exit("%s: non-finite values" % k)
    den = math.sqrt(sum(float(v) * v for v in x))
    num = math.sqrt(sum((float(u) - v) ** 2 for u, v in zip(x, y)))
    rel = num / den if den > 0 else num
    if len(sys.argv) > 5: print("  %-24s %.3e" % (k, rel))
    if rel > worst:
        worst, name = rel, k
print("worst relative difference %.3e (%s)" % (worst, name))
sys.exit(0 if worst <= tol else 1)
