#!/usr/bin/env bash
# DDP on the CPU: fashion_mlp (and fashion_cnn) for one epoch as 1 process with T threads, and as
# 2 processes (shm backend) with T/2 threads each, same per-process batch; prints per-process and
# total samples/s, the all-reduce time and how much of it backward hid (1 - exposed / all-reduce).
# Usage: bench/bench_ddp.sh [threads=2] [max_steps=300]
set -eu
cd "$(dirname "$0")/.."
T=${1:-2}; STEPS=${2:-300}
DATA=$(source tests/lib.sh >/dev/null 2>&1; fashion_dir) || { echo "no Fashion-MNIST: run make data"; exit 1; }
make --no-print-directory build/fashion_mlp build/fashion_cnn build/mgpurun >/dev/null
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; commit $(git rev-parse --short HEAD 2>/dev/null); $(date -u +%F)"
field() { grep -o "\"$2\":[0-9.e+-]*" "$1" | head -n 1 | cut -d: -f2; }
echo "| model | processes x threads | samples/s total | per process | all-reduce s | exposed s | hidden |"
echo "|---|---|---|---|---|---|---|"
for prog in fashion_mlp fashion_cnn; do
  steps=$STEPS; [ $prog = fashion_cnn ] && steps=$((STEPS / 5))
  MGPU_NUM_THREADS=$T build/$prog --data "$DATA" --epochs 1 --max-steps "$steps" --batch-size 64 --log-every 0 --eval-frequency 0 \
    --metrics "$tmp/$prog-1.jsonl" > /dev/null
  s1=$(field "$tmp/$prog-1.jsonl" samples_per_s)
  echo "| $prog | 1 x $T | $s1 | $s1 | - | - | - |"
  MGPU_NUM_THREADS=$(( T / 2 > 0 ? T / 2 : 1 )) build/mgpurun --nproc-per-node 2 build/$prog --data "$DATA" --epochs 1 --max-steps "$steps" \
    --batch-size 64 --log-every 0 --eval-frequency 0 --metrics "$tmp/$prog-2.jsonl" > /dev/null
  s2=$(field "$tmp/$prog-2.jsonl" samples_per_s); ar=$(field "$tmp/$prog-2.jsonl" ddp_allreduce_s); ex=$(field "$tmp/$prog-2.jsonl" ddp_exposed_s)
  echo "| $prog | 2 x $(( T / 2 > 0 ? T / 2 : 1 )) | $s2 | $(awk -v s="$s2" 'BEGIN{printf "%.0f", s/2}') | $ar | $ex | $(awk -v a="$ar" -v e="$ex" 'BEGIN{if (a > 0) printf "%.0f%%", 100*(1-e/a); else print "-"}') |"
done
