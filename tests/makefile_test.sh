#!/usr/bin/env bash
# The Makefile's flags, read from `make -n` (nothing is built): warnings survive an environment
# CFLAGS and reach the sanitizer build, nvcc targets Hopper unless NVCC_ARCH says otherwise, and
# check-cuda needs nothing another target made.
source "$(dirname "$0")/lib.sh"
# run under `make test`: the parent make's flags (jobserver, -j, directory messages) stay out of ours
unset MAKEFLAGS MFLAGS MAKELEVEL
b=$T_TMP/build   # a build directory no other target has touched
has() { grep -qF -- "$1" <<<"$2"; }

out=$(CFLAGS=-O0 make -n -B BUILD="$b" "$b/fashion_mlp" "$b/tests/test_core" 2>&1)
expect "CFLAGS=-O0 from the environment: -O0 used" has "-O0" "$out"
expect "CFLAGS=-O0: every compile keeps -std=c11 -Wall -Wextra -pedantic" \
  bash -c '[ "$(grep -c "^cc " <<<"$1")" -ge 2 ] && ! grep "^cc " <<<"$1" | grep -vqF -- "-std=c11 -Wall -Wextra -pedantic"' _ "$out" || printf '       %s\n' "$out"
out=$(make -n -B BUILD="$b" CFLAGS=-O0 "$b/fashion_cnn" 2>&1)
expect "CFLAGS=-O0 on the command line keeps them too" has "-Wall -Wextra -pedantic -O0" "$out"
out=$(make -n -B BUILD="$b" "$b/asan/test_core" 2>&1)
expect "the ASan+UBSan build compiles with -Wall -Wextra" \
  bash -c '[ "$(grep -c "fsanitize=address" <<<"$1")" -ge 2 ] && ! grep "fsanitize=address" <<<"$1" | grep -vqF -- "-Wall -Wextra"' _ "$out" || printf '       %s\n' "$out"

out=$(env -u NVCC_ARCH make -n -B BUILD="$b" NVCC=nvcc "$b/cuda/mgpu_kernels.o" 2>&1)
expect "nvcc builds sm_90 code plus compute_90 PTX by default" has "-gencode 'arch=compute_90,code=[sm_90,compute_90]'" "$out" || printf '       %s\n' "$out"
out=$(NVCC_ARCH=-arch=sm_80 make -n -B BUILD="$b" NVCC=nvcc "$b/cuda/mgpu_kernels.o" 2>&1)
expect "NVCC_ARCH overrides it" bash -c 'grep -qF -- "-arch=sm_80" <<<"$1" && ! grep -q compute_90 <<<"$1"' _ "$out"
expect "tests/run_gpu.sh uses the same default and honours NVCC_ARCH" \
  bash -c 'grep -qF "NVCC_ARCH:--gencode arch=compute_90,code=[sm_90,compute_90]" tests/run_gpu.sh && ! grep -q -- "-arch=native -X" tests/run_gpu.sh'

# (make -n still runs a recipe that calls $(MAKE); NVCC=true keeps that run from compiling anything)
mkdir -p "$b/cuda"
out=$(make -n BUILD="$b" NVCC=true check-cuda 2>&1); rc=$?
expect "make -n check-cuda in a fresh build directory: plans without error" test "$rc" -eq 0 || printf '       %s\n' "$out"
expect "check-cuda writes the header translation unit it compiles (no check-headers output needed)" \
  bash -c 'grep -q "> $2/cuda/hdr_nvcc.cu" <<<"$1" && ! grep -q hdr_cpp <<<"$1"' _ "$out" "$b"
out=$(make -n BUILD="$b" NVCC= check-cuda 2>&1)
expect "no nvcc: check-cuda says it skipped" has "CUDA compile check skipped" "$out"
finish
