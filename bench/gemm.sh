#!/usr/bin/env bash
# Builds bench/bench_gemm.c (with OpenBLAS when its cblas.h is found) and runs it with 1 and 2
# threads: GFLOP/s of mgpu_gemm_f32 and cblas_sgemm on the MLP's GEMM shapes and 1024^3.
# Usage: bench/gemm.sh [min_seconds_per_shape=0.3] [thread counts="1 2"]
set -eu
cd "$(dirname "$0")/.."
SECS=${1:-0.3}; THREADS=${2:-"1 2"}
CC=${CC:-cc}
mkdir -p build
out=build/bench_gemm
blas_inc=""
for d in /usr/include/x86_64-linux-gnu/openblas-pthread /usr/include/openblas /usr/include/x86_64-linux-gnu/openblas-openmp; do
  [ -f "$d/cblas.h" ] && { blas_inc=$d; break; }
done
if [ -n "$blas_inc" ] && $CC -O3 -march=native -std=c11 -Wall -Wextra -pedantic -I. -I"$blas_inc" -DWITH_OPENBLAS \
     bench/bench_gemm.c -o $out -lopenblas -lm -lpthread 2>/dev/null; then
  echo "built with OpenBLAS ($blas_inc)"
else
  echo "OpenBLAS not found (Debian: apt-get install libopenblas-dev): timing mgpu only"
  $CC -O3 -march=native -std=c11 -Wall -Wextra -pedantic -I. bench/bench_gemm.c -o $out -lm -lpthread
fi
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); $(date -u +%F)"
for t in $THREADS; do
  echo
  MGPU_NUM_THREADS=$t OPENBLAS_NUM_THREADS=$t OMP_NUM_THREADS=$t $out "$SECS"
done
