"""Compares two model.safetensors files tensor by tensor: prints the worst relative difference
||a - b|| / ||a|| and exits 1 if it exceeds the tolerance or the tensor sets differ.
Usage: compare_models.py A B [tol=1e-5]"""
import sys
import numpy as np
sys.path.insert(0, __file__.rsplit("/", 1)[0])
from interop import load_safetensors

a, b = load_safetensors(sys.argv[1]), load_safetensors(sys.argv[2])
tol = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-5
if set(a) != set(b):
    sys.exit(f"different tensors: {sorted(set(a) ^ set(b))}")
worst, name = 0.0, ""
for k in a:
    x, y = a[k].double().numpy(), b[k].double().numpy()
    if not np.all(np.isfinite(y)):
        sys.exit(f"{k}: non-finite values")
    den = np.linalg.norm(x)
    rel = np.linalg.norm(x - y) / den if den > 0 else np.linalg.norm(x - y)
    if rel > worst:
        worst, name = rel, k
print(f"worst relative difference {worst:.3e} ({name})")
sys.exit(0 if worst <= tol else 1)
