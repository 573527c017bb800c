#!/usr/bin/env bash
# mgpu-sweep's own cost and slot scaling on the CPU.
#  1. Overhead per run: a grid of N runs of `true` through mgpu-sweep (spawn into a process group,
#     log file, metrics lookup, one fsynced results line per run) against the same N fork+execs
#     from a shell loop; 1 and 2 slots.
#  2. Launch to first step: build/label_noise --max-steps 1 run directly vs the wall_s the sweep
#     records for the same command (the difference is what the sweep adds before the first step).
#  3. Slot scaling: a short label_noise grid (2 fractions x 2 noise x 2 seeds, 1 epoch) on 1 slot
#     (2 threads per run) vs 2 slots (1 thread per run), total wall time and runs per hour.
# Usage: bench/bench_sweep.sh [runs=200]
set -eu
cd "$(dirname "$0")/.."
N=${1:-200}
DATA=$(source tests/lib.sh >/dev/null 2>&1; fashion_dir) || { echo "no Fashion-MNIST: run make data"; exit 1; }
make --no-print-directory build/mgpu-sweep build/label_noise >/dev/null
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
S=build/mgpu-sweep
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.3f", b - a}'; }
unset MGPU_NUM_THREADS CUDA_VISIBLE_DEVICES
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; commit $(git rev-parse --short HEAD 2>/dev/null); $(date -u +%F)"

echo
echo "## overhead per run ($N runs of true)"
echo "| how | wall s | ms per run |"
echo "|---|---|---|"
t=$(now); for _ in $(seq "$N"); do /bin/true; done; w=$(since "$t")
echo "| shell loop, fork+exec only | $w | $(awk -v w="$w" -v n="$N" 'BEGIN{printf "%.2f", 1000*w/n}') |"
for slots in 1 2; do
  t=$(now); $S --grid i=1..$N --cpu-slots $slots --results "$tmp/true$slots.jsonl" -- /bin/true 2>/dev/null; w=$(since "$t")
  echo "| mgpu-sweep, $slots slot(s) | $w | $(awk -v w="$w" -v n="$N" 'BEGIN{printf "%.2f", 1000*w/n}') |"
done

echo
echo "## launch to first step (label_noise --max-steps 1, 5 runs each, median s)"
LN=(build/label_noise --data "$DATA" --label-fraction 0.1 --epochs 1 --max-steps 1 --eval-frequency 0 --log-every 0)
direct=()
for s in 1 2 3 4 5; do t=$(now); MGPU_NUM_THREADS=2 "${LN[@]}" --seed $s >/dev/null 2>&1; direct+=("$(since "$t")"); done
$S --grid seed=1..5 --cpu-slots 1 --results "$tmp/first.jsonl" -- "${LN[@]}" --seed {seed} 2>/dev/null
median() { tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
d=$(echo "${direct[*]}" | median)
sw=$(grep -o '"wall_s":[0-9.]*' "$tmp/first.jsonl" | cut -d: -f2 | tr '\n' ' ' | median)
echo "| direct | through mgpu-sweep (recorded wall_s) | difference |"
echo "|---|---|---|"
echo "| $d | $sw | $(awk -v a="$d" -v b="$sw" 'BEGIN{printf "%+.3f", b - a}') |"

echo
echo "## slot scaling: label_noise, 8 runs (label_frac 0.1,0.3 x noise 0,0.4 x seed 0,1), 1 epoch"
echo "| slots x threads per run | wall s | runs/h | speedup |"
echo "|---|---|---|---|"
base=""
for slots in 1 2; do
  t=$(now)
  $S --grid label_frac=0.1,0.3 --grid noise=0,0.4 --grid seed=0,1 --cpu-slots $slots --results "$tmp/ln$slots.jsonl" -- \
    build/label_noise --data "$DATA" --label-fraction {label_frac} --noise {noise} --seed {seed} --epochs 1 --log-every 0 2>/dev/null
  w=$(since "$t"); [ -z "$base" ] && base=$w
  echo "| $slots x $(( $(nproc) / slots )) | $w | $(awk -v w="$w" 'BEGIN{printf "%.0f", 8 * 3600 / w}') | $(awk -v a="$base" -v b="$w" 'BEGIN{printf "%.2fx", a / b}') |"
done
