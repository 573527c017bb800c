#!/usr/bin/env bash
# The CUDA code of mgpu, executed on the CPU through the emulation in tests/emu (make emu):
# - tests/gpu/test_cuda_ops in its full mode, and in its quick mode under ASan + UBSan, every case
#   counted here (the kernels run unchanged as fibers; the stream-order checker is on);
# - the device count: no emulated device is a skip, a failing CUDA setup is a failure;
# - planted bugs (tests/emu/planted.cu), each of which must produce its own error, and their
#   corrected twins, which must run clean;
# - the nccl backend against the shm backend with 2 and 4 processes under mgpurun (bit for bit);
# - checkpoints of CUDA tensors: CPU -> cuda:0 -> CPU round trips, damaged files (tests/emu/ckpt_cuda.c);
# - DDP with device gradients over nccl and shm (staged) with 2 processes (tests/emu/ddp_cuda.c);
# - the examples and tools built with -DMGPU_CUDA start.
# - training on cuda:0 against the CPU build, and checkpoints resumed across devices
#   (tests/emu_training.sh, which says why each comparison is what it is).
# Ends with the time the emulated suite took (its build excluded).
source "$(dirname "$0")/lib.sh"
E=build/emu
if ! make --no-print-directory emu > "$T_TMP/build.log" 2>&1; then
  fail "make emu (every CUDA program against the emulation)" "$(tail -n 30 "$T_TMP/build.log")"
  finish; exit
fi
ok "make emu: GPU tests, examples, tools and the planted bugs built against the emulation"
start=$(date +%s)

# suite NAME RC LOG: adds the program's own "RESULT ...: N passed, M failed" to the counts
suite() {
  local name=$1 rc=$2 log=$3 line p f
  line=$(grep -E '^RESULT .*: [0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
  if [ -z "$line" ]; then fail "$name: no RESULT line (exit $rc)" "$(tail -n 20 "$log")"; return; fi
  p=$(sed -E 's/.*: ([0-9]+) passed.*/\1/' <<<"$line"); f=$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$line")
  T_PASSED=$((T_PASSED + p)); T_FAILED=$((T_FAILED + f))
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then fail "$name: exit $rc after its summary" "$(tail -n 20 "$log")"; return; fi
  if [ "$f" -ne 0 ]; then echo "  FAIL $name: $p passed, $f failed"; grep -E 'FAIL|check failed|mgpu-emu' "$log" | head -n 20 | sed 's/^/       /'
  else echo "  ok   $name: $p cases"; fi
}

# report mode: an emulation error fails its case (and the exit status), the other cases still run
MGPU_EMU_ERRORS=report timeout 300 $E/tests/test_cuda_ops > "$T_TMP/ops.log" 2>&1
suite "test_cuda_ops (full mode) under the emulation" $? "$T_TMP/ops.log"
MGPU_EMU_ERRORS=report ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 MGPU_TEST_QUICK=1 \
  timeout 300 $E/asan/tests/test_cuda_ops > "$T_TMP/ops_asan.log" 2>&1
suite "test_cuda_ops (quick mode) under the emulation with ASan and UBSan" $? "$T_TMP/ops_asan.log"

# the op fronts with device tensors: every public op on a cuda:0 context against the CPU
MGPU_EMU_ERRORS=report timeout 300 $E/tests/ops_api_cuda > "$T_TMP/api.log" 2>&1
suite "ops_api_cuda: every public op, forward and backward, on cuda:0 against the CPU" $? "$T_TMP/api.log"

out=$(MGPU_EMU_DEVICES=0 $E/tests/test_cuda_ops 2>&1); rc=$?
expect "no emulated device: test_cuda_ops reports a skip, exit 0" [ "$rc" -eq 0 -a -n "$(grep SKIPPED <<<"$out")" ]
out=$(MGPU_EMU_INIT_ERROR=3 $E/tests/test_cuda_ops 2>&1); rc=$?
if [ "$rc" -ne 0 ] && grep -q "cudaGetDeviceCount.*initialization error" <<<"$out" && ! grep -q SKIPPED <<<"$out"; then
  ok "a failing CUDA setup (cudaErrorInitializationError) is a failure naming cudaGetDeviceCount, never a skip"
else fail "a failing CUDA setup must fail, not skip (exit $rc)" "$out"; fi

# planted SCENARIO EXIT PATTERN [ENV...]: the scenario must exit with EXIT and print PATTERN
planted() {
  local name=$1 want=$2 pattern=$3 bin=${PLANTED:-$E/tests/planted} out rc; shift 3
  out=$(env "$@" timeout 60 "$bin" "$name" 2>&1); rc=$?
  if [ "$rc" -eq "$want" ] && grep -Eq -- "$pattern" <<<"$out"; then ok "planted $name${PLANTED:+ (ASan)}: $(grep -Em1 -- "$pattern" <<<"$out" | cut -c1-150)"
  else fail "planted $name${PLANTED:+ (ASan)}: expected exit $want and /$pattern/, got exit $rc" "$out"; fi
}
clean='ran clean'
planted reduction-ok 0 "$clean"
planted reduction-no-sync-after-write 1 'block reduction without the __syncthreads after writing the partials: block [0-9]+ gave sums'
planted reduction-no-sync-before-write 1 'block reduction without the __syncthreads before writing the partials: block [0-9]+ gave sums'
planted oob-write 86 'out-of-bounds error: kernel fill_one_past_k wrote past the end of device allocation 0x[0-9a-f]+ \(4000 bytes, cuda:0\): bytes 0\.\.3 after its end'
planted barrier-not-reached 86 'barrier deadlock error: kernel half_barrier_k, block \(0,0,0\): barrier deadlock: 128 of 256 threads wait at __syncthreads .* but 128 have exited'
planted shuffle-exited-lanes 86 'warp error: kernel shfl_after_exit_k, block \(0,0,0\), warp 0: lanes 0-15 wait at __shfl_xor_sync with mask 0xffffffff, which names lanes 16-31, which have exited'
planted shuffle-vs-barrier 86 'warp error: kernel shfl_vs_barrier_k, block \(0,0,0\): warp deadlock: warp 0, lanes 0-15 wait at __shfl_xor_sync .* while lanes 16-31 wait at __syncthreads'
planted too-many-threads 86 'launch error: kernel nothing_k: block \(2048,1,1\) has 2048 threads; CUDA allows at most 1024'
planted dynamic-smem-ok 0 "$clean"
planted dynamic-smem-too-big 86 'launch error: kernel dyn_sum_k: 65536 bytes of dynamic shared memory; the limit is 49152'
planted dynamic-smem-raised-ok 0 "$clean"
planted missing-event-wait 86 'stream-order error: sum_k on stream #[0-9]+ \(non-blocking, cuda:0\) reads bytes \[0, 16384\) of device allocation .*, but write_k on stream #[0-9]+ \(non-blocking, cuda:0\) wrote them before and nothing orders the two calls'
planted missing-event-wait-ok 0 "$clean"
planted nccl-legacy-event 86 'stream-order error: ncclAllReduce on stream #[0-9]+ .* reads .*, but write_k on stream #[0-9]+ \(non-blocking, cuda:0\) wrote them before'
planted nccl-legacy-event-ok 0 "$clean"
planted staging-legacy-copy 86 'stream-order error: cudaMemcpy\(DtoH\) on the legacy default stream of cuda:0 reads .*, but write_k on stream #[0-9]+ \(non-blocking, cuda:0\) wrote them before'
planted staging-legacy-copy-ok 0 "$clean"
planted graph-legacy-inputs 86 'stream-order error: write_k on stream #[0-9]+ \(non-blocking, cuda:0\) writes .*, but cudaMemset on the legacy default stream of cuda:0 wrote them before'
planted graph-legacy-inputs-ok 0 "$clean"
planted capture-malloc-ok 0 "$clean"
planted out-of-memory-ok 0 "$clean" MGPU_EMU_MEM_MB=4
planted memory-budget-ok 0 "$clean" MGPU_EMU_MEM_MB=4
host='device pointers may only be touched by kernels, cudaMemcpy\* and library calls'
planted host-read 86 "host code read device memory at 0x[0-9a-f]+ \(offset 16 of device allocation 0x[0-9a-f]+ of 4096 bytes, cuda:0\): $host"
planted host-write 86 "host code wrote device memory at 0x[0-9a-f]+ \(offset 40 of device allocation 0x[0-9a-f]+ of 4096 bytes, cuda:0\): $host"
planted host-read 86 "host code read device memory at 0x[0-9a-f]+ \(offset 16 of device allocation .*: $host" MGPU_EMU_HOST_GUARD=2
planted host-read 0 "$clean" MGPU_EMU_HOST_GUARD=0
planted host-copies-ok 0 "$clean"
planted host-copies-ok 0 "$clean" MGPU_EMU_HOST_GUARD=2
planted peer-pointer 86 'launch error: kernel write_k on cuda:0: argument 1 points into device allocation 0x[0-9a-f]+ \(4096 bytes, cuda:1\) \(peer access is not enabled\)' MGPU_EMU_DEVICES=2
planted lt-unaligned 86 'alignment error: cublasLtMatmul: A \(0x[0-9a-f]+\) is only 4-byte aligned, but the algorithm from cublasLtMatmulAlgoGetHeuristic assumes 16 bytes \(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES was not set'
planted lt-below-preference 86 'alignment error: cublasLtMatmul: A \(0x[0-9a-f]+\) is only 8-byte aligned, .* assumes 16 bytes \(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES says so\)'
planted lt-declared-alignment-ok 0 "$clean"
planted lt-aligned-ok 0 "$clean"
# Reads past the end need the sanitizer build (its guard zones are poisoned); the fibers run under it too.
PLANTED=$E/asan/tests/planted planted oob-read 1 'AddressSanitizer: use-after-poison on address' ASAN_OPTIONS=detect_leaks=0
PLANTED=$E/asan/tests/planted planted reduction-no-sync-after-write 1 'block reduction without the __syncthreads after writing the partials' ASAN_OPTIONS=detect_leaks=0
PLANTED=$E/asan/tests/planted planted host-write 86 "host code wrote device memory at 0x[0-9a-f]+ \(offset 40 of device allocation" ASAN_OPTIONS=detect_leaks=0
PLANTED=$E/asan/tests/planted planted missing-event-wait 86 'stream-order error: sum_k' ASAN_OPTIONS=detect_leaks=0

# nccl (emulated, shared memory) against shm, 2 and 4 processes, one emulated device each
for n in 2 4; do
  MGPU_EMU_DEVICES=$n MGPU_TIMEOUT_S=60 timeout 180 $E/mgpurun --nproc-per-node $n $E/tests/comm_cuda > "$T_TMP/comm$n.log" 2>&1; rc=$?
  good=$(grep -c "RESULT .*: [0-9]* passed, 0 failed" "$T_TMP/comm$n.log")
  if [ "$rc" -eq 0 ] && [ "$good" -eq "$n" ]; then ok "nccl backend == shm backend bit for bit, $n processes (all-reduce sum/avg of host buffers and CUDA tensors, broadcast, all-gather, reduce-scatter; stream order checked)"
  else fail "nccl vs shm with $n processes (exit $rc, $good of $n ranks clean)" "$(grep -E 'FAIL|check failed|mgpu-emu|mgpurun' "$T_TMP/comm$n.log" | head -n 20)"; fi
done
# checkpoints and safetensors files of tensors in device memory: saved on cuda:0 they are the CPU's
# files byte for byte and load back onto the CPU bit for bit (and the other way round); damaged
# files loaded onto a CUDA model are refused and leave its weights and moments untouched
MGPU_EMU_ERRORS=report timeout 300 $E/tests/ckpt_cuda > "$T_TMP/ckpt.log" 2>&1
suite "checkpoints of CUDA tensors (CPU <-> cuda:0 bit for bit, damaged files refused)" $? "$T_TMP/ckpt.log"

# DDP with gradients in device memory, 2 processes (tests/emu/ddp_cuda.c): nccl and shm (buckets
# staged through pinned host memory) against the averaged single-process gradients, bit for bit
# between the backends; raw device pointers; --gpu-ids 1,0 for NCCL's devices. Report mode: a
# stream-order error fails the run. Then both ranks on one device (shm only).
for mode in two shared; do
  devs=2; [ $mode = shared ] && devs=1
  rm -rf "$T_TMP/ddp_$mode"
  MGPU_EMU_ERRORS=report MGPU_EMU_DEVICES=$devs MGPU_TIMEOUT_S=60 timeout 300 $E/mgpurun --nproc-per-node 2 --log-dir "$T_TMP/ddp_$mode" \
    $E/tests/ddp_cuda $mode > "$T_TMP/ddp_$mode.log" 2>&1; rc=$?
  for r in 0 1; do
    if [ -f "$T_TMP/ddp_$mode/rank-$r.log" ]; then suite "DDP on device gradients ($mode device$([ $devs = 2 ] && echo s)), rank $r" $rc "$T_TMP/ddp_$mode/rank-$r.log"
    else fail "DDP on device gradients ($mode), rank $r: no log (exit $rc)" "$(tail -n 20 "$T_TMP/ddp_$mode.log")"; fi
  done
  if grep -q "mgpu-emu" "$T_TMP/ddp_$mode"/rank-*.log 2>/dev/null; then fail "DDP on device gradients ($mode): emulation errors" "$(grep -h mgpu-emu "$T_TMP/ddp_$mode"/rank-*.log | head -n 10)"; fi
done
expect "no emulated NCCL segment left in /dev/shm" [ -z "$(ls /dev/shm 2>/dev/null | grep mgpu-emu-nccl)" ]

# the CUDA builds of the examples and tools start (training on cuda waits for the CUDA backend)
for x in $E/fashion_mlp $E/fashion_cnn $E/mgpu-ckpt $E/mgpurun; do
  [ -x "$x" ] || continue
  if "$x" --help > "$T_TMP/help.log" 2>&1; then ok "$x --help (built with -DMGPU_CUDA against the emulation)"; else fail "$x --help" "$(tail -n 5 "$T_TMP/help.log")"; fi
done
out=$($E/gemm_bench 64 2 2>&1); rc=$?
expect "gemm_bench (chevron launches, cuBLASLt f32/TF32/bf16 and cublasGemmEx) runs under the emulation" [ "$rc" -eq 0 -a "$(grep -c '^mode=' <<<"$out")" -eq 3 ]
# Training on cuda:0 against the CPU build with the same seed, and checkpoints resumed across
# devices (tests/emu_training.sh) on a subset of Fashion-MNIST (2048 train, 256 test images).
source tests/emu_training.sh
if [ -x build/fashion_mlp ] && [ -x build/fashion_cnn ] && DATA=$(fashion_dir) && command -v python3 > /dev/null; then
  subset "$DATA" "$T_TMP/fm" 2048 256
  training_comparisons
  # a model that does not fit the device: the OOM error, exit 1, nothing saved
  out=$(MGPU_EMU_MEM_MB=64 timeout 120 $E/fashion_mlp --device cuda --data "$T_TMP/fm" --epochs 1 --max-steps 2 --batch-size 2048 --save-dir "$T_TMP/oom" 2>&1); rc=$?
  if [ "$rc" -eq 1 ] && grep -q "out of memory on cuda:0 allocating" <<<"$out" && [ ! -e "$T_TMP/oom/model.safetensors" ]; then
    ok "fashion_mlp --device cuda with 64 MiB of device memory and batch 2048: exit 1, MGPU_ERR_OOM_DEVICE named, nothing saved"
  else fail "fashion_mlp --device cuda out of device memory (exit $rc)" "$out"; fi
else
  echo "  note training on cuda vs the CPU skipped: needs build/fashion_mlp, build/fashion_cnn, python3 and Fashion-MNIST"
fi

echo "  emulated suite: $(( $(date +%s) - start )) s (build excluded)"
finish
