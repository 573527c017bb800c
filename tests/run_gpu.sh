#!/usr/bin/env bash
# GPU test suite: builds the CUDA kernels and every tests/gpu/*.c program, runs them (CPU-vs-CUDA
# comparisons of every launcher), then runs compute-sanitizer memcheck over them in quick mode.
# Without a GPU it says so and exits 0 (a skip, not a pass of GPU code).
set -u
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "make test-gpu: no NVIDIA GPU present on this machine: GPU tests SKIPPED (nothing was run)"
  exit 0
fi
echo "GPU present: $(nvidia-smi -L | head -n 1)"

NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}
CC=${CC:-cc}
OUT=build/gpu
mkdir -p "$OUT"
CUDA_LIB="-L$CUDA_HOME/lib64 -L$CUDA_HOME/lib -Wl,-rpath,$CUDA_HOME/lib64 -Wl,-rpath,$CUDA_HOME/lib"
passed=0; failed=0

fail() { echo "FAIL $1"; failed=$((failed + 1)); }

# Hopper: real sm_90 code plus compute_90 PTX for newer GPUs, as the Makefile builds it;
# NVCC_ARCH overrides (e.g. NVCC_ARCH=-arch=native). Split into words without glob expansion,
# so the brackets reach nvcc as written.
read -r -a ARCH <<<"${NVCC_ARCH:--gencode arch=compute_90,code=[sm_90,compute_90]}"
echo "== building mgpu_kernels.cu (${ARCH[*]})"
if ! "$NVCC" -O3 -std=c++17 -I. "${ARCH[@]}" -Xcompiler -Wall,-Wextra -c mgpu_kernels.cu -o "$OUT/mgpu_kernels.o"; then
  fail "nvcc mgpu_kernels.cu"; echo "$passed passed, $failed failed"; exit 1
fi

tests=()
for src in tests/gpu/*.c; do
  name=$(basename "$src" .c)
  if $CC -O2 -g -std=c11 -Wall -Wextra -pedantic -DMGPU_CUDA -I. -Itests -I"$CUDA_HOME/include" "$src" "$OUT/mgpu_kernels.o" \
       -o "$OUT/$name" $CUDA_LIB -lcudart -lcublas -lcublasLt -lnccl -lstdc++ -lm -lpthread; then
    tests+=("$name")
  else
    fail "build $src"
  fi
done

# Each program prints "RESULT <file>: N passed, M failed"; add them up.
tally() {
  local line
  line=$(grep -E '^RESULT ' "$1" | tail -n 1)
  if [ -z "$line" ]; then fail "$2 (no RESULT line)"; return; fi
  passed=$((passed + $(echo "$line" | sed -E 's/.*: ([0-9]+) passed.*/\1/')))
  failed=$((failed + $(echo "$line" | sed -E 's/.* ([0-9]+) failed.*/\1/')))
}

for name in "${tests[@]}"; do
  echo "== $name"
  timeout 300 "./$OUT/$name" | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  tally "$OUT/$name.log" "$name"
  [ "$rc" -eq 0 ] || [ "$rc" -eq 1 ] || fail "$name exited with $rc"
done

# Memory errors (out-of-bounds, misaligned, uninitialised device reads) in quick mode.
SAN=$(command -v compute-sanitizer || ls "$CUDA_HOME/bin/compute-sanitizer" 2>/dev/null || true)
if [ -n "$SAN" ]; then
  for name in "${tests[@]}"; do
    echo "== compute-sanitizer memcheck $name"
    if MGPU_TEST_QUICK=1 timeout 600 "$SAN" --tool memcheck --error-exitcode 97 "./$OUT/$name" > "$OUT/$name.memcheck.log" 2>&1; then
      echo "memcheck clean"; passed=$((passed + 1))
    else
      tail -n 30 "$OUT/$name.memcheck.log"; fail "memcheck $name"
    fi
  done
else
  echo "compute-sanitizer not found: memcheck skipped"
fi

# The CUDA builds of the examples must still compile and link.
if make --no-print-directory cuda > "$OUT/make_cuda.log" 2>&1; then passed=$((passed + 1)); else tail -n 20 "$OUT/make_cuda.log"; fail "make cuda"; fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
