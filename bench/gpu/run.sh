#!/usr/bin/env bash
# GPU benchmarks in one run (needs an NVIDIA GPU; skips cleanly without one):
#   1. GEMM 4096^3 f32 / TF32 / bf16: mgpu's cuBLASLt path vs cublasGemmEx (target ratio >= 0.9)
#   2. mgpu's CUDA trainers (build/cuda/fashion_*, --device cuda) at batch 128, samples/s
#   3. PyTorch eager, then torch.compile (the slowest part: compilation), same recipes, batch 128
# Usage: bench/gpu/run.sh [steps=300]. Results go to build/gpu/bench_{gemm,mgpu,torch}.txt; copy
# them into bench/RESULTS.md with the date, device and commit. `make gpu-check` runs this as its
# last phase. Builds through the Makefile (make cuda cuda-tests: sm_90, NVCC_ARCH overrides).
# Environment: BENCH_OUT (build/gpu), BENCH_BIN (build/cuda; build/emu runs the plumbing under the
#   CPU emulation: a tiny GEMM, no PyTorch, no GPU needed), BENCH_DATA (data/fashion-mnist),
#   BENCH_NO_BUILD=1 (use what BENCH_BIN holds), BENCH_TIMEOUT_S (each part, 600),
#   BENCH_GEMM ("4096 50": size and timed iterations), BENCH_BATCH (128); BENCH_EMU=1 and
#   BENCH_DEVICE (cuda) let tests run the plumbing with other programs.
set -u
cd "$(dirname "$0")/../.."
STEPS=${1:-300}
BIN=${BENCH_BIN:-build/cuda}
O=${BENCH_OUT:-build/gpu}
DATA=${BENCH_DATA:-data/fashion-mnist}
T=${BENCH_TIMEOUT_S:-600}
BATCH=${BENCH_BATCH:-128}
read -r -a GEMM <<<"${BENCH_GEMM:-4096 50}"
emu=${BENCH_EMU:-0}; [ "$(basename "$BIN")" = emu ] && emu=1
NVSMI=${NVIDIA_SMI:-nvidia-smi}
if [ "$emu" = 0 ] && { ! command -v "$NVSMI" >/dev/null 2>&1 || ! "$NVSMI" -L >/dev/null 2>&1; }; then
  echo "bench/gpu: no NVIDIA GPU present: SKIPPED"; exit 0
fi
mkdir -p "$O"
echo "device: $([ "$emu" = 1 ] && echo "CPU emulation (not a measurement)" || "$NVSMI" -L | head -n 1)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
  if [ "$emu" = 1 ]; then make --no-print-directory -j"$(nproc)" emu >/dev/null || exit 1
  else make --no-print-directory -j"$(nproc)" cuda cuda-tests > "$O/make.log" 2>&1 || { tail -n 20 "$O/make.log"; exit 1; }; fi
fi
rc=0

echo "== GEMM (${GEMM[0]}^3)"
timeout -k 5 "$T" "$BIN/gemm_bench" "${GEMM[@]}" | tee "$O/bench_gemm.txt"
st=${PIPESTATUS[0]}; [ "$st" -eq 0 ] || { echo "gemm_bench failed (exit $st)"; rc=1; }

echo "== mgpu ($BIN/fashion_*, --device cuda, batch $BATCH, $STEPS steps; samples/s from the metrics file)"
for ex in fashion_mlp fashion_cnn; do
  [ -x "$BIN/$ex" ] || { echo "model=$ex mode=mgpu error=not built"; continue; }
  rm -f "$O/$ex.jsonl"
  if timeout -k 5 "$T" "$BIN/$ex" --device "${BENCH_DEVICE:-cuda}" --data "$DATA" --batch-size "$BATCH" --epochs 1 --max-steps "$STEPS" --eval-frequency 0 \
       --log-every 0 --metrics "$O/$ex.jsonl" > "$O/$ex.log" 2>&1; then
    sps=$(grep -oE '"samples_per_s":[0-9.e+]+' "$O/$ex.jsonl" | head -n 1 | cut -d: -f2)
    echo "model=$ex mode=mgpu batch=$BATCH samples_per_s=${sps:-none}"
  else
    echo "model=$ex mode=mgpu batch=$BATCH error=$(grep -v '^ *$' "$O/$ex.log" | tail -n 1)"
  fi
done | tee "$O/bench_mgpu.txt"

echo "== PyTorch (batch $BATCH, synthetic data on the GPU; eager, then torch.compile)"
: > "$O/bench_torch.txt"
if [ "$emu" = 1 ]; then
  echo "PyTorch on CUDA: skipped under the emulation" | tee "$O/bench_torch.txt"
elif python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  for mode in eager compile; do
    PYTHONUNBUFFERED=1 timeout -k 5 "$T" python3 bench/gpu/torch_fashion.py --steps "$STEPS" --batch "$BATCH" --modes "$mode" 2>&1 | tee -a "$O/bench_torch.txt"
    st=${PIPESTATUS[0]}; [ "$st" -eq 0 ] || echo "torch_fashion.py --modes $mode: exit $st" | tee -a "$O/bench_torch.txt"
  done
else
  echo "PyTorch with CUDA not importable: skipped" | tee "$O/bench_torch.txt"
fi
echo "targets: fashion_mlp >= 3x PyTorch eager, fashion_cnn >= 1.2x PyTorch eager, GEMM ratio >= 0.9"
exit $rc
