#!/usr/bin/env bash
# GPU benchmarks in one run (needs an NVIDIA GPU; skips cleanly without one):
#   1. GEMM 4096^3 f32 / TF32 / bf16: mgpu's cuBLASLt path vs cublasGemmEx (target ratio >= 0.9)
#   2. PyTorch eager and torch.compile samples/s for fashion_mlp and fashion_cnn at batch 128
#   3. mgpu's CUDA trainers on the same recipes (once the CUDA dispatch is wired into the ops)
# Usage: bench/gpu/run.sh [steps=300]. Results go to build/gpu/bench_*.txt; copy them into
# bench/RESULTS.md with the date, device and commit.
set -u
cd "$(dirname "$0")/../.."
STEPS=${1:-300}
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "bench/gpu: no NVIDIA GPU present: SKIPPED"; exit 0
fi
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}
mkdir -p build/gpu
echo "device: $(nvidia-smi -L | head -n 1)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

"$NVCC" -O3 -std=c++17 -I. -arch=native -c mgpu_kernels.cu -o build/gpu/mgpu_kernels.o || exit 1
"$NVCC" -O3 -std=c++17 -I. -arch=native bench/gpu/gemm_bench.cu build/gpu/mgpu_kernels.o -L"$CUDA_HOME/lib64" -Xlinker -rpath,"$CUDA_HOME/lib64" \
  -lcublas -lcublasLt -o build/gpu/gemm_bench || exit 1
echo "== GEMM (4096^3)"
./build/gpu/gemm_bench 4096 50 | tee build/gpu/bench_gemm.txt

echo "== PyTorch (batch 128, synthetic data on the GPU)"
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  python3 bench/gpu/torch_fashion.py --steps "$STEPS" | tee build/gpu/bench_torch.txt
else
  echo "PyTorch with CUDA not importable: skipped" | tee build/gpu/bench_torch.txt
fi

echo "== mgpu (build/cuda/fashion_*, --device cuda, CUDA Graphs when the trainer uses them)"
make --no-print-directory cuda >/dev/null 2>&1 || echo "make cuda failed"
for ex in fashion_mlp fashion_cnn; do
  [ -x build/cuda/$ex ] || { echo "$ex: not built"; continue; }
  rm -f build/gpu/$ex.jsonl
  if timeout 600 build/cuda/$ex --device cuda --data data/fashion-mnist --batch-size 128 --epochs 1 --eval-frequency 0 \
       --metrics build/gpu/$ex.jsonl > build/gpu/$ex.log 2>&1; then
    grep -o '"samples_per_s":[0-9.e+]*' build/gpu/$ex.jsonl | head -n 1 | sed "s/^/model=$ex mode=mgpu /"
  else
    echo "model=$ex mode=mgpu error=$(tail -n 1 build/gpu/$ex.log)"
  fi
done | tee build/gpu/bench_mgpu.txt
echo "targets: fashion_mlp >= 3x PyTorch eager, fashion_cnn >= 1.2x PyTorch eager, GEMM ratio >= 0.9"
