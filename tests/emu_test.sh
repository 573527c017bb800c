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
# - the examples and tools built with -DMGPU_CUDA start;
# - (training on cuda:0 against the CPU build, and checkpoints resumed across devices, are
#   tests/emu_training_test.sh, which says why each comparison is what it is);
# - the loader on cuda: the next batch's upload queued before each step's host sync (the
#   emulation's call trace), resident data (--data-on-device) against streaming, resume, auto;
# - CUDA Graph capture of the training step (tests/emu/graph_cuda.c; fashion_mlp and fashion_cnn
#   with --cuda-graph on against off, a checkpoint written under capture resumed, the fallbacks).
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
planted capture-sync-ok 0 "$clean"
planted graph-freed-memory 86 'graph error: a replay of the graph runs write_k, which writes 0x[0-9a-f]+: that memory was freed after the capture'
planted graph-freed-memory-ok 0 "$clean"
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

MGPU_EMU_ERRORS=report timeout 300 $E/tests/graph_cuda > "$T_TMP/graph.log" 2>&1
suite "CUDA Graph capture of the trainer's step (on vs off bit for bit, a step that syncs falls back)" $? "$T_TMP/graph.log"

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
# The loader on cuda:0 (--data-on-device). Batch 100 of the 2048-image subset: 21 batches per epoch,
# the last of 48, a new shuffle each epoch; 100 steps cross four epoch boundaries.
# - streaming (off): the emulation's trace (MGPU_EMU_TRACE) shows batch k+1's upload queued on the
#   loader's copy stream before the host synchronises with the compute stream in step k
#   (tests/check_overlap.py), with the stream-order checker on, and each step waiting for the
#   host once (captured steps; and eager fp16 steps, whose loss scaler reads found-inf);
# - streaming with 2 workers: the same weights as without;
# - resident (on): final weights bit-identical to streaming; resumed mid-epoch from a checkpoint,
#   identical to the uninterrupted run;
# - auto: resident with the default 8 GiB; streaming for the full 60000-image training set (180 MiB)
#   with 256 MiB (more than 1/4 of the ~220 MiB free when the loader is made); on with 40 MiB (the
#   model and cuBLAS's workspace leave ~7 MiB, the subset needs 8): exit 1 naming the dataset and
#   --data-on-device off; on with --device cpu: an error.
loader_checks() {
  local d="$T_TMP/loader" a="--device cuda --data $T_TMP/fm --epochs 5 --batch-size 100 --seed 3" out rc res
  mkdir -p "$d"
  MGPU_EMU_ERRORS=report MGPU_EMU_TRACE="$d/trace" timeout 300 $E/fashion_mlp $a --max-steps 100 --data-on-device off --save-dir "$d/off" > "$d/off.log" 2>&1; rc=$?
  if [ "$rc" -ne 0 ]; then fail "fashion_mlp --device cuda --data-on-device off (exit $rc)" "$(tail -n 5 "$d/off.log")"; return; fi
  if res=$(python3 tests/check_overlap.py "$d/trace" 21 90 1 2>&1) && grep -q '^data on device: no' "$d/off.log"; then
    ok "loader streaming on cuda: the next batch's upload is queued before each step's host sync, and a step waits for the host once ($(tr '\n' ' ' <<<"$res")); stream order clean"
  else fail "loader streaming on cuda: upload of batch k+1 not queued before step k's host sync, or a step waited more than once" "$res"; fi
  # fp16 (eager: the loss scaler reads found-inf on the host): the loss's copy is queued before
  # the optimizer step, so the scaler's wait brings it and the step still waits once
  MGPU_EMU_ERRORS=report MGPU_EMU_TRACE="$d/trace16" timeout 300 $E/fashion_mlp $a --max-steps 20 --amp fp16 --data-on-device off > "$d/fp16.log" 2>&1; rc=$?
  if [ "$rc" -eq 0 ] && res=$(python3 tests/check_overlap.py "$d/trace16" 21 15 1 2>&1); then
    ok "--amp fp16 on cuda (eager, found-inf read on the host): one host wait per step ($(tr '\n' ' ' <<<"$res"))"
  else fail "--amp fp16 on cuda: exit $rc, or a step waited for the host more than once" "$res$(tail -n 3 "$d/fp16.log")"; fi
  MGPU_EMU_ERRORS=report timeout 300 $E/fashion_mlp $a --max-steps 100 --data-on-device on --save-dir "$d/on" > "$d/on.log" 2>&1; rc=$?
  if [ "$rc" -eq 0 ] && grep -q '^data on device: the training set is resident on cuda:0' "$d/on.log" && cmp -s "$d/off/model.safetensors" "$d/on/model.safetensors"; then
    ok "--data-on-device on (batches gathered on the device) == off (streamed), bit for bit after 100 steps over 4 epoch boundaries with a short last batch"
  else fail "--data-on-device on vs off: exit $rc or different weights" "$(tail -n 5 "$d/on.log")"; fi
  MGPU_EMU_ERRORS=report timeout 300 $E/fashion_mlp $a --max-steps 100 --data-on-device off --num-workers 2 --save-dir "$d/w2" > "$d/w2.log" 2>&1; rc=$?
  if [ "$rc" -eq 0 ] && cmp -s "$d/off/model.safetensors" "$d/w2/model.safetensors"; then
    ok "streaming with 2 loader workers (the next batch uploaded when a worker has it ready) == without workers, bit for bit; stream order clean"
  else fail "--num-workers 2 on cuda: exit $rc or different weights" "$(tail -n 5 "$d/w2.log")"; fi
  MGPU_EMU_ERRORS=report timeout 300 $E/fashion_mlp $a --max-steps 60 --checkpoint-every-steps 30 --data-on-device on --save-dir "$d/res" > "$d/res1.log" 2>&1 &&
    MGPU_EMU_ERRORS=report timeout 300 $E/fashion_mlp $a --max-steps 100 --data-on-device on --save-dir "$d/res" --resume auto > "$d/res2.log" 2>&1; rc=$?
  if [ "$rc" -eq 0 ] && grep -q 'resumed from' "$d/res2.log" && cmp -s "$d/on/model.safetensors" "$d/res/model.safetensors"; then
    ok "resident data: stopped at step 60 (mid-epoch 3), resumed from the checkpoint: bit-identical to the uninterrupted run"
  else fail "resident data: resumed run differs or failed (exit $rc)" "$(tail -n 5 "$d/res1.log" "$d/res2.log")"; fi
  out=$(MGPU_EMU_ERRORS=report timeout 120 $E/fashion_mlp $a --max-steps 2 2>&1); rc=$?
  expect "--data-on-device auto (the default) with 8 GiB of device memory: resident" [ "$rc" -eq 0 -a -n "$(grep '^data on device: the training set is resident' <<<"$out")" ] || echo "$out" | tail -n 5
  mkdir -p "$d/full"   # the whole training set, the test subset
  for f in "$1"/train-*; do ln -s "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$d/full/"; done
  cp "$T_TMP"/fm/t10k-* "$d/full/"
  out=$(MGPU_EMU_MEM_MB=256 MGPU_EMU_ERRORS=report timeout 120 $E/fashion_mlp $a --data "$d/full" --max-steps 2 --data-on-device auto 2>&1); rc=$?
  expect "--data-on-device auto, 60000 images (180 MiB) with 256 MiB of device memory: streams (more than 1/4 of the free memory)" \
    [ "$rc" -eq 0 -a -n "$(grep '^data on device: no' <<<"$out")" ] || echo "$out" | tail -n 5
  out=$(MGPU_EMU_MEM_MB=40 timeout 120 $E/fashion_mlp $a --max-steps 2 --data-on-device on --save-dir "$d/oom" 2>&1); rc=$?
  expect "--data-on-device on with 40 MiB of device memory: exit 1, the dataset named, --data-on-device off advised, nothing saved" \
    [ "$rc" -eq 1 -a -n "$(grep 'does not fit on cuda:0 with data_on_device ON (--data-on-device on): out of memory' <<<"$out" | grep 'data-on-device off')" -a ! -e "$d/oom/model.safetensors" ] || echo "$out" | tail -n 5
  out=$(timeout 60 build/fashion_mlp --device cpu --data "$T_TMP/fm" --max-steps 1 --data-on-device on 2>&1); rc=$?
  expect "--data-on-device on with --device cpu: exit 1 naming the flag" [ "$rc" -eq 1 -a -n "$(grep -e '--data-on-device on' <<<"$out")" ] || echo "$out" | tail -n 5
}
# --cuda-graph on against off on cuda:0: the loss lines (the epochs' train/test loss and accuracy)
# and the final weights must be identical, bit for bit (cmp), the on run must say where it captured.
# ARGS cross an epoch boundary with a partial last batch and evaluate between the epochs.
graph_vs_eager() {  # NAME DATA ARGS...
  local name=$1 data=$2 d="$T_TMP/graph_$RANDOM" m rc; shift 2
  for m in on off; do
    MGPU_EMU_ERRORS=report timeout 300 $E/$name --device cuda --data "$data" --save-dir "$d/$m" --cuda-graph $m "$@" > "$d.$m.log" 2>&1; rc=$?
    if [ "$rc" -ne 0 ] || grep -q mgpu-emu "$d.$m.log"; then fail "$name --cuda-graph $m $* (exit $rc)" "$(tail -n 8 "$d.$m.log")"; return; fi
  done
  if ! grep -q '^cuda graph captured at step 3$' "$d.on.log"; then fail "$name --cuda-graph on: no capture announced" "$(head -n 4 "$d.on.log")"; return; fi
  if ! grep -q '; cuda graph off$' "$d.off.log"; then fail "$name --cuda-graph off: startup line" "$(head -n 2 "$d.off.log")"; return; fi
  if [ "$(graph_loss_lines "$d.on.log")" != "$(graph_loss_lines "$d.off.log")" ] || [ -z "$(graph_loss_lines "$d.on.log")" ]; then
    fail "$name --cuda-graph on vs off $*: the loss lines differ" "$(diff <(graph_loss_lines "$d.on.log") <(graph_loss_lines "$d.off.log"))"; return
  fi
  if cmp -s "$d/on/model.safetensors" "$d/off/model.safetensors"; then ok "$name --cuda-graph on vs off $*: identical loss lines and bit-identical weights"
  else fail "$name --cuda-graph on vs off $*: final weights differ" "$(python3 tests/compare_weights.py "$d/off/model.safetensors" "$d/on/model.safetensors" 0 "" 2>&1)"; fi
}
graph_loss_lines() { grep -E '^epoch [0-9]+/[0-9]+  train_loss' "$1" | sed -E 's/  lr .*//'; }
graph_tests() {
  local d="$T_TMP/graph_ckpt" out rc
  graph_vs_eager fashion_mlp "$T_TMP/fm" --epochs 2 --batch-size 200 --seed 3 --schedule cosine --clip-grad-norm 1
  # dropout 0.25 and batch norm; a 150-image subset (4 batches of 32 and one of 22) keeps it short
  graph_vs_eager fashion_cnn "$T_TMP/fm150" --epochs 2 --batch-size 32 --seed 3 --schedule cosine
  # a checkpoint written at step 7 under capture holds what an eager run's holds, and resumed
  # (under capture again) ends where the uninterrupted run ends
  for m in on off; do
    MGPU_EMU_ERRORS=report timeout 300 $E/fashion_mlp --device cuda --data "$T_TMP/fm" --save-dir "$d/$m" --cuda-graph $m --epochs 2 --batch-size 200 \
      --seed 3 --schedule cosine --checkpoint-every-steps 7 --keep-last 5 > "$d.$m.log" 2>&1 || fail "fashion_mlp --cuda-graph $m with checkpoints" "$(tail -n 5 "$d.$m.log")"
  done
  MGPU_EMU_ERRORS=report timeout 300 $E/fashion_mlp --device cuda --data "$T_TMP/fm" --save-dir "$d/resumed" --epochs 2 --batch-size 200 --seed 3 \
    --schedule cosine --resume "$d/on/step-00000007" > "$d.resumed.log" 2>&1; rc=$?
  if [ "$rc" -eq 0 ] && cmp -s "$d/on/step-00000007/model.safetensors" "$d/off/step-00000007/model.safetensors" &&
     cmp -s "$d/on/step-00000007/optimizer.safetensors" "$d/off/step-00000007/optimizer.safetensors" &&
     [ "$(grep -o '"rng":{[^}]*}\|"optimizer_steps":[0-9]*' "$d/on/step-00000007/trainer_state.json")" = "$(grep -o '"rng":{[^}]*}\|"optimizer_steps":[0-9]*' "$d/off/step-00000007/trainer_state.json")" ] &&
     grep -q '^cuda graph captured at step 10$' "$d.resumed.log" && cmp -s "$d/resumed/model.safetensors" "$d/on/model.safetensors" &&
     cmp -s "$d/on/model.safetensors" "$d/off/model.safetensors"; then
    ok "fashion_mlp --cuda-graph on: the step-7 checkpoint equals the eager run's (weights, moments, RNG, step count); resumed under capture it ends bit-identical"
  else fail "fashion_mlp: checkpoint under capture and resume (exit $rc)" "$(tail -n 6 "$d.resumed.log")"; fi
  # where capture cannot work, the startup line says why and the run trains eagerly
  out=$(timeout 120 $E/fashion_mlp --device cuda --data "$T_TMP/fm" --epochs 1 --max-steps 2 --batch-size 64 --amp fp16 2>&1)
  expect "fashion_mlp --amp fp16: 'cuda graph off (fp16 loss scaling reads the found-inf flag ...)'" grep -q '; cuda graph off (fp16 loss scaling reads the found-inf flag on the host' <<<"$out"
  out=$(timeout 120 $E/fashion_mlp --device cuda --data "$T_TMP/fm" --epochs 1 --max-steps 2 --batch-size 64 --grad-accum-steps 2 2>&1)
  expect "fashion_mlp --grad-accum-steps 2: 'cuda graph off (--grad-accum-steps > 1 ...)'" grep -q '; cuda graph off (--grad-accum-steps > 1' <<<"$out"
  out=$(MGPU_DIST_BACKEND=shm timeout 120 $E/mgpurun --nproc-per-node 2 $E/fashion_mlp --device cuda --data "$T_TMP/fm" --epochs 1 --max-steps 2 --batch-size 64 2>&1)
  expect "fashion_mlp under mgpurun (DDP, 2 processes on cuda:0 through shm): 'cuda graph off (DDP: ...)'" grep -q '; cuda graph off (DDP: the gradient all-reduces' <<<"$out"
}
# Trainer-level checks on cuda:0 on subsets of Fashion-MNIST (2048 train, 256 test images; the CNN
# on 150 and 64).
if [ -x build/fashion_mlp ] && [ -x build/fashion_cnn ] && DATA=$(fashion_dir) && command -v python3 > /dev/null; then
  python3 tests/fashion_subset.py "$DATA" "$T_TMP/fm" 2048 256
  python3 tests/fashion_subset.py "$DATA" "$T_TMP/fm150" 150 64
  t0=$(date +%s)
  loader_checks "$DATA"
  echo "  loader checks: $(( $(date +%s) - t0 )) s"
  t0=$(date +%s)
  graph_tests
  echo "  cuda graph on vs off: $(( $(date +%s) - t0 )) s"
  # a model that does not fit the device: the OOM error, exit 1, nothing saved
  out=$(MGPU_EMU_MEM_MB=64 timeout 120 $E/fashion_mlp --device cuda --data "$T_TMP/fm" --epochs 1 --max-steps 2 --batch-size 2048 --save-dir "$T_TMP/oom" 2>&1); rc=$?
  if [ "$rc" -eq 1 ] && grep -q "out of memory on cuda:0 allocating" <<<"$out" && [ ! -e "$T_TMP/oom/model.safetensors" ]; then
    ok "fashion_mlp --device cuda with 64 MiB of device memory and batch 2048: exit 1, MGPU_ERR_OOM_DEVICE named, nothing saved"
  else fail "fashion_mlp --device cuda out of device memory (exit $rc)" "$out"; fi
  # weights from elsewhere on the device: a CPU run's model.safetensors through --init-from, and
  # its last checkpoint through --eval-only --resume, give on cuda:0 the accuracy the CPU recorded;
  # the cuda run's own end writes a last checkpoint, so --resume auto trains nothing
  timeout 120 build/fashion_mlp --device cpu --data "$T_TMP/fm" --epochs 1 --max-steps 20 --batch-size 64 --seed 3 --save-dir "$T_TMP/w" > "$T_TMP/w.log" 2>&1
  cpu_acc=$(sed -n 's/^final test accuracy //p' "$T_TMP/w.log")
  a=$(MGPU_EMU_ERRORS=report timeout 120 $E/fashion_mlp --device cuda --data "$T_TMP/fm" --eval-only --init-from "$T_TMP/w/model.safetensors" 2>&1 | sed -n 's/^final test accuracy //p')
  b=$(MGPU_EMU_ERRORS=report timeout 120 $E/fashion_mlp --device cuda --data "$T_TMP/fm" --eval-only --resume "$T_TMP/w" 2>&1 | sed -n 's/^final test accuracy //p')
  expect "cuda --init-from / --eval-only --resume of a CPU run: accuracy $a / $b equals the CPU's $cpu_acc" bash -c "[ -n '$cpu_acc' ] && [ '$a' = '$cpu_acc' ] && [ '$b' = '$cpu_acc' ]"
  MGPU_EMU_ERRORS=report timeout 120 $E/fashion_mlp --device cuda --data "$T_TMP/fm" --epochs 1 --max-steps 5 --batch-size 64 --save-dir "$T_TMP/wc" > /dev/null 2>&1
  out=$(MGPU_EMU_ERRORS=report timeout 120 $E/fashion_mlp --device cuda --data "$T_TMP/fm" --epochs 1 --max-steps 5 --batch-size 64 --save-dir "$T_TMP/wc" --resume auto 2>&1)
  expect "cuda: --resume auto after a finished run says 'already finished'" grep -q 'already finished' <<<"$out"
else
  echo "  note training on cuda vs the CPU skipped: needs build/fashion_mlp, build/fashion_cnn, python3 and Fashion-MNIST"
fi

# ---- multi-GPU: every emulated device by default (--multi-gpu auto self-launches one DDP worker
# per device), against mgpurun; one device starts none; a killed worker stops the group ----
# BEGIN multigpu
if [ -d "$T_TMP/fm" ] && command -v python3 > /dev/null; then
  mg="--data $T_TMP/fm --epochs 1 --max-steps 10 --batch-size 64 --seed 3"
  MGPU_EMU_ERRORS=report MGPU_EMU_DEVICES=2 MGPU_TIMEOUT_S=60 timeout 300 $E/fashion_mlp $mg --save-dir "$T_TMP/mg_auto" > "$T_TMP/mg_auto.log" 2> "$T_TMP/mg_auto.err"; rc=$?
  MGPU_EMU_ERRORS=report MGPU_EMU_DEVICES=2 MGPU_TIMEOUT_S=60 timeout 300 $E/mgpurun --nproc-per-node 2 $E/fashion_mlp $mg --save-dir "$T_TMP/mg_run" > "$T_TMP/mg_run.log" 2>&1; rc2=$?
  line=$(grep -c '^Using 2 GPUs: \[0, 1\] (DDP, 2 processes, global batch 128)$' "$T_TMP/mg_auto.log")
  finals=$(grep -c '^final test accuracy' "$T_TMP/mg_auto.log")
  if [ "$rc" -eq 0 ] && [ "$rc2" -eq 0 ] && [ "$line" -eq 1 ] && [ "$finals" -eq 1 ] &&
     res=$(python3 tests/compare_weights.py "$T_TMP/mg_run/model.safetensors" "$T_TMP/mg_auto/model.safetensors" 0 2>&1); then
    ok "--multi-gpu auto with 2 emulated devices starts 2 DDP workers (one 'Using 2 GPUs' line, rank 0's output only) and ends with mgpurun --nproc-per-node 2's weights: $res"
  else fail "--multi-gpu auto with 2 devices vs mgpurun (exit $rc and $rc2, $line 'Using' lines, $finals final lines)" "$(tail -n 5 "$T_TMP/mg_auto.log" "$T_TMP/mg_auto.err" "$T_TMP/mg_run.log"; echo "$res")"; fi
  # one device, --no-multi-gpu, --multi-gpu none, --device cpu: plain training in this process
  for case in "1|" "2|--no-multi-gpu" "2|--multi-gpu none" "2|--device cpu" "2|--gpu-ids 1"; do
    devs=${case%%|*}; flags=${case#*|}
    out=$(MGPU_EMU_DEVICES=$devs timeout 300 $E/fashion_mlp $mg --max-steps 2 $flags 2>&1); rc=$?
    want='^device cuda:0 '; [ "$flags" = "--gpu-ids 1" ] && want='^device cuda:1 '; [ "$flags" = "--device cpu" ] && want='^final test accuracy'
    if [ "$rc" -eq 0 ] && ! grep -q '^Using' <<<"$out" && ! grep -q 'rank [0-9]' <<<"$out" && grep -q "$want" <<<"$out" && [ "$(grep -c '^final test accuracy' <<<"$out")" -eq 1 ]; then
      ok "$devs emulated device(s)${flags:+, $flags}: one process trains ($(grep -m1 -o "$want[^(]*" <<<"$out"| head -c 40)), no worker started"
    else fail "$devs device(s)${flags:+ $flags}: expected plain training (exit $rc)" "$out"; fi
  done
  # --gpu-ids picks the devices of the workers, in its order
  out=$(MGPU_EMU_DEVICES=3 timeout 300 $E/fashion_mlp $mg --max-steps 2 --gpu-ids 2,0 2>&1); rc=$?
  expect "--gpu-ids 2,0 with 3 emulated devices: 2 workers on cuda:2 and cuda:0 ('Using 2 GPUs: [2, 0]')" \
    [ "$rc" -eq 0 -a -n "$(grep '^Using 2 GPUs: \[2, 0\] (DDP, 2 processes, global batch 128)$' <<<"$out")" ] || echo "$out" | tail -n 5
  # a worker killed mid-step: the supervisor stops the other, names rank 1, exits 128 + 9, leaves nothing
  MGPU_EMU_DEVICES=2 MGPU_TIMEOUT_S=20 $E/fashion_mlp $mg --max-steps 100000 --epochs 100 --log-every 1 > "$T_TMP/mg_kill.log" 2> "$T_TMP/mg_kill.err" &
  sup=$!
  for _ in $(seq 1 600); do grep -q ' 2/' "$T_TMP/mg_kill.log" 2>/dev/null && break; sleep 0.1; done
  workers=$(pgrep -P "$sup"); victim=""
  for w in $workers; do tr '\0' '\n' < /proc/$w/environ 2>/dev/null | grep -qx 'RANK=1' && victim=$w; done
  t0=$(date +%s.%N)
  [ -n "$victim" ] && kill -KILL "$victim"
  for _ in $(seq 1 300); do kill -0 "$sup" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$sup" 2>/dev/null && { kill -KILL "$sup"; echo "       supervisor still running after 30 s"; }
  wait "$sup"; rc=$?
  took=$(python3 -c "import sys; print('%.1f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$t0" "$(date +%s.%N)")
  left=""; for w in $workers; do kill -0 "$w" 2>/dev/null && left="$left $w"; done
  if [ -n "$victim" ] && [ "$(wc -w <<<"$workers")" -eq 2 ] && [ "$rc" -eq 137 ] && [ -z "$left" ] &&
     grep -q 'fashion_mlp: rank 1 was killed by signal 9 (SIGKILL)' "$T_TMP/mg_kill.err" && grep -q 'training failed: rank 1 .*exiting with code 137' "$T_TMP/mg_kill.err"; then
    ok "a self-launched worker killed mid-step (rank 1, SIGKILL): the group stopped in $took s, rank 1 named, exit 137, no process left"
  else fail "killed worker (victim '${victim}', workers '$(echo $workers)', exit $rc, left '$left', $took s)" "$(tail -n 8 "$T_TMP/mg_kill.err" "$T_TMP/mg_kill.log")"; fi
  # Ctrl-C reaches the supervisor only (the workers lead process groups of their own): it is passed on
  MGPU_EMU_DEVICES=2 MGPU_TIMEOUT_S=20 $E/fashion_mlp $mg --max-steps 100000 --epochs 100 --log-every 1 > "$T_TMP/mg_int.log" 2> "$T_TMP/mg_int.err" &
  sup=$!
  for _ in $(seq 1 600); do grep -q ' 2/' "$T_TMP/mg_int.log" 2>/dev/null && break; sleep 0.1; done
  workers=$(pgrep -P "$sup")
  kill -INT "$sup"
  for _ in $(seq 1 300); do kill -0 "$sup" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$sup" 2>/dev/null && kill -KILL "$sup"
  wait "$sup"; rc=$?
  left=""; for w in $workers; do kill -0 "$w" 2>/dev/null && left="$left $w"; done
  if [ "$(wc -w <<<"$workers")" -eq 2 ] && [ "$rc" -eq 130 ] && [ -z "$left" ] && grep -q 'got SIGINT: forwarding it to the 2 running workers' "$T_TMP/mg_int.err"; then
    ok "SIGINT to the self-launching supervisor: forwarded to both workers, exit 130, no process left"
  else fail "SIGINT to the supervisor (workers '$(echo $workers)', exit $rc, left '$left')" "$(tail -n 6 "$T_TMP/mg_int.err")"; fi
else
  echo "  note multi-GPU self-launch checks skipped: need the Fashion-MNIST subset and python3"
fi
# END multigpu

# ---- multi-GPU on emulated devices: DataParallel over in-process NCCL (one thread and one replica
# per device) and DDP, against one device at the combined batch; SyncBatchNorm with the CUDA
# kernels; evaluation sharded over the ranks on a test set the world size does not divide ----
# BEGIN multigpu_dp
if [ -d "$T_TMP/fm" ] && command -v python3 > /dev/null; then
  same_weights() {  # NAME A B: final weights within 1e-5 relative per tensor
    local res
    if res=$(python3 tests/compare_weights.py "$T_TMP/$2/model.safetensors" "$T_TMP/$3/model.safetensors" 1e-5 2>&1); then ok "$1: $res"
    else fail "$1" "$(echo "$res"; tail -n 5 "$T_TMP/$3.log")"; fi
  }
  train() {  # NAME DEVICES PROGRAM ARGS...: one emulated training run, emulation errors fail it
    local name=$1 devs=$2 prog=$3 rc; shift 3
    MGPU_EMU_ERRORS=report MGPU_EMU_DEVICES=$devs MGPU_TIMEOUT_S=60 timeout 300 $E/$prog --log-every 0 --seed 3 --epochs 1 --save-dir "$T_TMP/$name" "$@" > "$T_TMP/$name.log" 2>&1; rc=$?
    [ "$rc" -eq 0 ] || fail "$name: $prog $* exited $rc" "$(tail -n 8 "$T_TMP/$name.log")"
    return $rc
  }
  using() {  # NAME LINE: the run's startup line
    grep -qxF "$2" "$T_TMP/$1.log" && ok "$1 says '$2'" || fail "$1: no line '$2'" "$(grep -m3 -E '^(Using|device)' "$T_TMP/$1.log")"
  }
  mlp=(--data "$T_TMP/fm" --max-steps 10)
  train dp_one 3 fashion_mlp "${mlp[@]}" --no-multi-gpu --batch-size 96
  train dp_two 3 fashion_mlp "${mlp[@]}" --multi-gpu dp --gpu-ids 0,2 --batch-size 48 && using dp_two "Using 2 GPUs: [0, 2] (DP, 1 process, global batch 96)"
  train dp_three 3 fashion_mlp "${mlp[@]}" --multi-gpu dp --gpu-ids 2,0,1 --batch-size 32 && using dp_three "Using 3 GPUs: [2, 0, 1] (DP, 1 process, global batch 96)"
  same_weights "mlp: --multi-gpu dp on 2 emulated devices x 48 == 1 device x 96 (10 AdamW steps)" dp_one dp_two
  same_weights "mlp: --multi-gpu dp on 3 emulated devices x 32 == 1 device x 96 (10 AdamW steps)" dp_one dp_three
  out=$(MGPU_EMU_DEVICES=2 timeout 60 $E/fashion_mlp "${mlp[@]}" --multi-gpu dp --gpu-ids 0,0 2>&1); rc=$?
  expect "--multi-gpu dp --gpu-ids 0,0 on a GPU: exit 1 naming the duplicate device (NCCL runs one rank per device)" \
    [ "$rc" -eq 1 -a -n "$(grep 'ranks 0 and 1 both name cuda:0' <<<"$out")" ] || echo "$out" | tail -n 3
  out=$(MGPU_EMU_DEVICES=2 timeout 60 $E/fashion_mlp "${mlp[@]}" --multi-gpu dp --gpu-ids 0,5 2>&1); rc=$?
  expect "--multi-gpu dp --gpu-ids 0,5 with 2 devices: exit 1 naming device 5 and the 2 visible devices" \
    [ "$rc" -eq 1 -a -n "$(grep "rank 1's device 5 is not one of the 2 visible CUDA devices" <<<"$out")" ] || echo "$out" | tail -n 3
  # SyncBatchNorm through the CUDA kernels: 5 SGD steps of fashion_cnn (as tests/ddp_test.sh does on
  # the CPU, shorter: the emulated conv is slow), 2 devices x 8 == 1 device x 16, by DP and by the
  # self-launched DDP; without SyncBatchNorm the same runs differ, so the comparison can see it
  cnn=(--data "$T_TMP/fm" --max-steps 5 --optimizer sgd --lr 0.02 --momentum 0.9)
  train cnn_one 2 fashion_cnn "${cnn[@]}" --no-multi-gpu --batch-size 16
  train cnn_dp 2 fashion_cnn "${cnn[@]}" --multi-gpu dp --gpu-ids 0,1 --batch-size 8 --sync-batchnorm 1
  train cnn_ddp 2 fashion_cnn "${cnn[@]}" --batch-size 8 --sync-batchnorm 1 && using cnn_ddp "Using 2 GPUs: [0, 1] (DDP, 2 processes, global batch 16)"
  train cnn_nosync 2 fashion_cnn "${cnn[@]}" --multi-gpu dp --gpu-ids 0,1 --batch-size 8 --sync-batchnorm 0
  same_weights "cnn + SyncBatchNorm (CUDA kernels): --multi-gpu dp on 2 emulated devices x 8 == 1 device x 16" cnn_one cnn_dp
  same_weights "cnn + SyncBatchNorm (CUDA kernels): self-launched DDP on 2 emulated devices x 8 == 1 device x 16" cnn_one cnn_ddp
  if res=$(python3 tests/compare_weights.py "$T_TMP/cnn_one/model.safetensors" "$T_TMP/cnn_nosync/model.safetensors" 1e-5 2>&1); then
    fail "cnn without SyncBatchNorm must differ from 1 device x 16 (else the SyncBatchNorm checks prove nothing)" "$res"
  else ok "cnn without SyncBatchNorm differs from 1 device x 16 ($res): the comparison sees the statistics"; fi
  # sharded evaluation: 255 test images over 2 ranks (128 + 127, nothing padded): the same accuracy
  # and loss as one process (a padded sample counted twice would make it x/256)
  python3 tests/fashion_subset.py "$T_TMP/fm" "$T_TMP/fm255" 2048 255
  ev=(--data "$T_TMP/fm255" --max-steps 10 --metrics)
  train eval_one 2 fashion_mlp "${ev[@]}" "$T_TMP/eval_one.jsonl" --no-multi-gpu --batch-size 128
  train eval_ddp 2 fashion_mlp "${ev[@]}" "$T_TMP/eval_ddp.jsonl" --batch-size 64
  train eval_dp 2 fashion_mlp "${ev[@]}" "$T_TMP/eval_dp.jsonl" --multi-gpu dp --gpu-ids 0,1 --batch-size 64
  for run in eval_ddp eval_dp; do
    res=$(python3 - "$T_TMP/eval_one.jsonl" "$T_TMP/$run.jsonl" <<'PY'
import json, sys
a, b = (json.loads(open(p).readline()) for p in sys.argv[1:3])
hits = a["test_accuracy"] * 255
ok = abs(hits - round(hits)) < 1e-6 and a["test_accuracy"] == b["test_accuracy"] and abs(a["test_loss"] - b["test_loss"]) <= 1e-5 * abs(a["test_loss"])
print("accuracy %.6f (%d/255) vs %.6f, loss %.7f vs %.7f" % (a["test_accuracy"], round(hits), b["test_accuracy"], a["test_loss"], b["test_loss"]))
sys.exit(0 if ok else 1)
PY
    ) && ok "$run: evaluation sharded over 2 ranks on 255 test images equals one process's: $res" || fail "$run: sharded evaluation differs from one process's" "$res"
  done
else
  echo "  note multi-GPU DP, SyncBatchNorm and sharded-evaluation checks skipped: need the Fashion-MNIST subset and python3"
fi
# END multigpu_dp

echo "  emulated suite: $(( $(date +%s) - start )) s (build excluded)"
finish
