"""Writes the first NTRAIN training and NTEST test images (and labels) of a Fashion-MNIST
directory (plain IDX files or Debian's .gz) as plain IDX files in DST: the tests' small datasets.

Usage: fashion_subset.py SRC DST NTRAIN NTEST"""
import gzip, os, struct, sys

src, dst, ntrain, ntest = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.makedirs(dst, exist_ok=True)
for name, n in [("train-images-idx3-ubyte", ntrain), ("train-labels-idx1-ubyte", ntrain),
                ("t10k-images-idx3-ubyte", ntest), ("t10k-labels-idx1-ubyte", ntest)]:
    path = os.path.join(src, name)
    data = open(path, "rb").read() if os.path.exists(path) else gzip.open(path + ".gz").read()
    ndim = data[3]
    dims = list(struct.unpack(">%dI" % ndim, data[4:4 + 4 * ndim]))
    if n > dims[0]:
        sys.exit("fashion_subset.py: %s has %d items, %d asked" % (path, dims[0], n))
    per = 1
    for x in dims[1:]:
        per *= x
    dims[0] = n
    body = data[4 + 4 * ndim:4 + 4 * ndim + n * per]
    open(os.path.join(dst, name), "wb").write(data[:4] + struct.pack(">%dI" % ndim, *dims) + body)
