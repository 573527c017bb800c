"""Compares two model.safetensors files tensor by tensor without numpy or torch (the emulated
suite runs where neither is installed): prints the worst relative difference ||a - b|| / ||a||
and exits 1 if it exceeds the tolerance, a value is not finite, or the tensor sets differ.
Usage: compare_weights.py [--base W0] [--exact REGEX] A B [tol=1e-5] [skip: a regex of tensor names left out] [v: print each]
  --base W0      compares the updates A - W0 and B - W0 instead (W0: the weights both started from),
                 so a one-step comparison is not diluted by the initial weights
  --exact REGEX  tensors whose names match must be bit-identical (counters such as num_batches_tracked)"""
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

args = sys.argv[1:]
base = exact = None
while args and args[0] in ("--base", "--exact"):
    if args[0] == "--base":
        base = load(args[1])
    else:
        exact = args[1]
    args = args[2:]
a, b = load(args[0]), load(args[1])
tol = float(args[2]) if len(args) > 2 else 1e-5
skip = args[3] if len(args) > 3 and args[3] else None
verbose = len(args) > 4
if set(a) != set(b) or (base is not None and set(base) != set(a)):
    sys.exit("different tensors: %s" % sorted((set(a) ^ set(b)) | (set(base) ^ set(a) if base is not None else set())))
worst, name = 0.0, ""
for k in sorted(a):
    x, y = a[k], b[k]
    if len(x) != len(y):
        sys.exit("%s: %d elements against %d" % (k, len(x), len(y)))
    if exact and re.search(exact, k) and x != y:
        sys.exit("%s: must be identical, differs (%s against %s)" % (k, list(x[:4]), list(y[:4])))
    if skip and re.search(skip, k):
        continue
    if not all(math.isfinite(v) for v in y):
        sys.exit("%s: non-finite values" % k)
    if base is not None:
        x = [float(u) - w for u, w in zip(x, base[k])]
        y = [float(v) - w for v, w in zip(y, base[k])]
    den = math.sqrt(sum(float(v) * v for v in x))
    num = math.sqrt(sum((float(u) - v) ** 2 for u, v in zip(x, y)))
    rel = num / den if den > 0 else num
    if verbose: print("  %-24s %.3e" % (k, rel))
    if rel > worst:
        worst, name = rel, k
print("worst relative difference %.3e (%s)" % (worst, name))
sys.exit(0 if worst <= tol else 1)
