#!/usr/bin/env bash
# fashion_mlp for N epochs with mgpu and with the same recipe in PyTorch, on this machine, same
# thread count, in one run. PyTorch must run with a real BLAS: Debian's python3-torch plus
# libopenblas0-pthread (the script checks libblas.so.3 points at OpenBLAS).
# Usage: bench/bench_cpu.sh [epochs=2] [threads=2]
set -eu
cd "$(dirname "$0")/.."
EPOCHS=${1:-2}; THREADS=${2:-2}
DATA=$(source tests/lib.sh >/dev/null 2>&1; fashion_dir) || { echo "no Fashion-MNIST: run make data"; exit 1; }
blas=$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || echo none)
case "$blas" in *openblas*) ;; *) echo "libblas.so.3 -> $blas is not OpenBLAS: install libopenblas0-pthread (PyTorch would use the reference BLAS, no fair anchor)"; exit 1;; esac
make --no-print-directory build/fashion_mlp >/dev/null
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; threads used: $THREADS; epochs: $EPOCHS"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown); date: $(date -u +%F)"
echo "blas for PyTorch: $blas"
/usr/bin/time -v -o /tmp/mgpu_bench_time.txt env MGPU_NUM_THREADS=$THREADS build/fashion_mlp --data "$DATA" --epochs "$EPOCHS" > /tmp/mgpu_bench_out.txt
mg_sps=$(grep '^epoch' /tmp/mgpu_bench_out.txt | sed -E 's/.* ([0-9]+) samples\/s$/\1/' | awk '{s+=$1; n++} END {printf "%.1f", s/n}')
mg_acc=$(sed -n 's/^final test accuracy //p' /tmp/mgpu_bench_out.txt)
mg_rss=$(awk -F: '/Maximum resident/ {printf "%.0f", $2/1024}' /tmp/mgpu_bench_time.txt)
/usr/bin/time -v -o /tmp/torch_bench_time.txt env OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS \
  /usr/bin/python3 bench/torch_fashion_mlp.py "$DATA" "$EPOCHS" "$THREADS" > /tmp/torch_bench_out.txt
pt_sps=$(sed -E 's/.*samples_per_s=([0-9.]+).*/\1/' /tmp/torch_bench_out.txt)
pt_acc=$(sed -E 's/.*test_accuracy=([0-9.]+).*/\1/' /tmp/torch_bench_out.txt)
pt_rss=$(awk -F: '/Maximum resident/ {printf "%.0f", $2/1024}' /tmp/torch_bench_time.txt)
echo
echo "| what | samples/s | test acc after $EPOCHS epochs | peak RSS MB |"
echo "|---|---|---|---|"
echo "| mgpu fashion_mlp | $mg_sps | $mg_acc | $mg_rss |"
echo "| PyTorch $(/usr/bin/python3 -c 'import torch;print(torch.__version__)') + OpenBLAS | $pt_sps | $pt_acc | $pt_rss |"
echo "| ratio mgpu / PyTorch | $(awk -v a="$mg_sps" -v b="$pt_sps" 'BEGIN{printf "%.2fx", a/b}') | | |"
