#!/usr/bin/env bash
# DDP of the trainer on emulated CUDA devices (tests/emu, MGPU_EMU_DEVICES), through both of its
# backends for device tensors: W processes under mgpurun at batch B end with the same weights as
# one process at batch W*B (fashion_mlp, 50 AdamW steps over 4 epochs of a 1024-image subset, so
# the per-epoch reshuffle is crossed too), within 1e-5 relative per tensor:
# - nccl (MGPU_DIST_BACKEND=nccl, every rank on a device of its own), 2 and 4 processes;
# - shm (MGPU_DIST_BACKEND=shm: gradients staged through pinned host memory), 2 and 4 processes,
#   and 2 processes sharing one device (what NCCL refuses);
# - rank 0's emulation trace (MGPU_EMU_TRACE) shows which backend ran: ncclAllReduce for nccl,
#   none for shm;
# - --multi-gpu dp --gpu-ids 0: one replica still runs DP (its startup line, NCCL all-reduces in
#   the trace) and equals plain training (what make gpu-check runs on a one-GPU machine);
# - a control: one process at batch B (not W*B) differs, so the comparison can fail.
# tests/emu_test.sh covers the self-launch (--multi-gpu auto against mgpurun), DP and SyncBatchNorm.
# Emulation says nothing of real-GPU speed; tools/gpu_check.sh runs the one-GPU cases on a real one.
source "$(dirname "$0")/lib.sh"
E=build/emu
DATA=$(fashion_dir) || { fail "Fashion-MNIST not found"; finish; exit; }
command -v python3 > /dev/null || { fail "python3 is needed to make the subset and compare weights"; finish; exit; }
if ! make --no-print-directory -j2 $E/fashion_mlp $E/mgpurun > "$T_TMP/build.log" 2>&1; then
  fail "make $E/fashion_mlp $E/mgpurun (against the CUDA emulation)" "$(tail -n 30 "$T_TMP/build.log")"
  finish; exit
fi
python3 tests/fashion_subset.py "$DATA" "$T_TMP/fm" 1024 256 || { fail "tests/fashion_subset.py"; finish; exit; }
start=$(date +%s)
export MGPU_EMU_ERRORS=report MGPU_TIMEOUT_S=60
COMMON=(--data "$T_TMP/fm" --device cuda --epochs 4 --max-steps 50 --seed 3 --log-every 0 --eval-frequency 0)
GLOBAL_BATCH=64

# one NAME BATCH: plain training in one process on one emulated device
one() {
  MGPU_EMU_DEVICES=1 timeout 120 $E/fashion_mlp "${COMMON[@]}" --no-multi-gpu --batch-size "$2" --save-dir "$T_TMP/$1" > "$T_TMP/$1.log" 2>&1 ||
    fail "$1: one process at batch $2 exited $?" "$(tail -n 8 "$T_TMP/$1.log")"
}
# ddp NAME BACKEND NPROC DEVICES: DDP under mgpurun at batch GLOBAL_BATCH / NPROC; rank 0 traces
ddp() {
  local name=$1 backend=$2 n=$3 devs=$4 rc
  MGPU_EMU_DEVICES=$devs MGPU_DIST_BACKEND=$backend TRACE="$T_TMP/$name.trace" timeout 180 $E/mgpurun --nproc-per-node "$n" \
    sh -c '[ "$RANK" = 0 ] && export MGPU_EMU_TRACE="$TRACE"; exec "$0" "$@"' \
    $E/fashion_mlp "${COMMON[@]}" --batch-size $((GLOBAL_BATCH / n)) --save-dir "$T_TMP/$name" > "$T_TMP/$name.log" 2>&1; rc=$?
  [ "$rc" -eq 0 ] || { fail "$name: mgpurun --nproc-per-node $n with MGPU_DIST_BACKEND=$backend exited $rc" "$(tail -n 8 "$T_TMP/$name.log")"; return 1; }
  if grep -q mgpu-emu "$T_TMP/$name.log"; then fail "$name: emulation errors" "$(grep mgpu-emu "$T_TMP/$name.log" | head -n 10)"; return 1; fi
}
# same NAME RUN: RUN's final weights within 1e-5 relative per tensor of the one-process run
same() {
  local res
  if res=$(python3 tests/compare_weights.py "$T_TMP/one/model.safetensors" "$T_TMP/$2/model.safetensors" 1e-5 2>&1); then ok "$1: $res"
  else fail "$1" "$(echo "$res"; tail -n 5 "$T_TMP/$2.log")"; fi
}
# backend_ran RUN BACKEND: rank 0's trace has NCCL all-reduces exactly when the backend is nccl
backend_ran() {
  local n
  n=$(grep -c '^ncclAllReduce ' "$T_TMP/$1.trace" 2>/dev/null); n=${n:-0}
  case $2 in
    nccl) expect "$1: rank 0's trace shows the nccl backend ($n ncclAllReduce)" [ "$n" -ge 50 ] ;;
    shm)  expect "$1: rank 0's trace ($(cat "$T_TMP/$1.trace" 2>/dev/null | wc -l) ops) has no NCCL call" \
            bash -c "[ -s '$T_TMP/$1.trace' ] && ! grep -q '^nccl' '$T_TMP/$1.trace'" ;;
  esac
}

one one $GLOBAL_BATCH
for c in "nccl 2 2" "nccl 4 4" "shm 2 2" "shm 4 4" "shm 2 1"; do
  set -- $c
  name=${1}_${2}proc_${3}dev
  ddp "$name" "$1" "$2" "$3" || continue
  same "fashion_mlp DDP over $1, $2 processes x $((GLOBAL_BATCH / $2)) on $3 emulated device$([ "$3" -gt 1 ] && echo s) == 1 process x $GLOBAL_BATCH (50 steps)" "$name"
  backend_ran "$name" "$1"
done
# DP with one replica: the DP path (an in-process NCCL communicator of one device), plain's weights
if MGPU_EMU_DEVICES=1 MGPU_EMU_TRACE="$T_TMP/dp_one.trace" timeout 120 $E/fashion_mlp "${COMMON[@]}" --multi-gpu dp --gpu-ids 0 \
     --batch-size $GLOBAL_BATCH --save-dir "$T_TMP/dp_one" > "$T_TMP/dp_one.log" 2>&1; then
  expect "--multi-gpu dp --gpu-ids 0 says 'Using 1 GPU: [0] (DP, 1 process, global batch $GLOBAL_BATCH)'" grep -qxF "Using 1 GPU: [0] (DP, 1 process, global batch $GLOBAL_BATCH)" "$T_TMP/dp_one.log"
  same "fashion_mlp --multi-gpu dp --gpu-ids 0 (one replica) == plain training x $GLOBAL_BATCH (50 steps)" dp_one
  backend_ran dp_one nccl
else fail "--multi-gpu dp --gpu-ids 0 exited $?" "$(tail -n 8 "$T_TMP/dp_one.log")"; fi
# the comparison can fail: one process at the per-rank batch ends elsewhere
one half $((GLOBAL_BATCH / 2))
if res=$(python3 tests/compare_weights.py "$T_TMP/one/model.safetensors" "$T_TMP/half/model.safetensors" 1e-5 2>&1); then
  fail "one process x $((GLOBAL_BATCH / 2)) must differ from x $GLOBAL_BATCH (else the DDP comparisons prove nothing)" "$res"
else ok "control: one process x $((GLOBAL_BATCH / 2)) differs from x $GLOBAL_BATCH ($res)"; fi
echo "  emulated DDP checks: $(( $(date +%s) - start )) s (build excluded)"
finish
