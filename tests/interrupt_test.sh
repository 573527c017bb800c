#!/usr/bin/env bash
# Nothing trained is lost, and only rank 0 talks (issue 17, points 3 to 5), on a subset of
# Fashion-MNIST (2048 training, 512 test images: 32 steps an epoch at batch 64) so each run takes
# a fraction of a second:
# - Ctrl-C (SIGINT) with --save-dir saves a checkpoint and exits 0; the resumed run ends with
#   weights bit-identical to an uninterrupted run's, in one process and in two under mgpurun (where
#   mgpurun forwards the signal and the ranks agree on the step, even when only one worker got
#   it); a second Ctrl-C aborts at once;
# - an unwritable --save-dir or --metrics fails before any step, in well under 5 s, writing nothing;
# - the end of a run writes a last checkpoint, so --resume auto afterwards says "already finished"
#   and trains nothing (the metrics file and the model stay as they were);
# - a DDP run resumed mid-epoch logs the same train_loss, to the last digit, as the uninterrupted
#   run (each rank restores its own partial sums), and only rank 0 prints the final line;
# - --eval-only --resume gives the accuracy recorded when the checkpoint was saved.
source "$(dirname "$0")/lib.sh"
DATA=$(fashion_dir) || { fail "Fashion-MNIST not found (install dataset-fashion-mnist or run make data)"; finish; exit; }
export MGPU_NUM_THREADS=1 MGPU_TIMEOUT_S=60
FM="$T_TMP/fm"
python3 tests/fashion_subset.py "$DATA" "$FM" 2048 512
# long enough (several seconds) for a signal to land mid-run
LONG=(--data "$FM" --epochs 30 --batch-size 64 --log-every 0 --seed 1)
# Runs CMD... in the background, sends SIGINT after S seconds (a second one 0.1 s later when
# TWICE=1), waits; RC is the exit status. A watchdog kills it after 90 s so nothing hangs.
interrupt_after() { # S LOG CMD...
  local s=$1 log=$2 pid; shift 2
  "$@" > "$log" 2>&1 & pid=$!
  ( sleep 90; kill -9 "$pid" 2>/dev/null ) > /dev/null 2>&1 &
  sleep "$s"; kill -INT "$pid" 2>/dev/null
  if [ "${TWICE:-0}" = 1 ]; then sleep 0.1; kill -INT "$pid" 2>/dev/null; fi
  wait "$pid"; RC=$?
}

# ---- Ctrl-C, one process
timeout 120 build/fashion_mlp "${LONG[@]}" --save-dir "$T_TMP/ref1" > "$T_TMP/ref1.log" 2>&1
expect "uninterrupted reference run exits 0" test -f "$T_TMP/ref1/model.safetensors"
interrupt_after 1 "$T_TMP/int1.log" build/fashion_mlp "${LONG[@]}" --save-dir "$T_TMP/int1"
step=$(sed -n 's/^stopped by Ctrl-C (SIGINT) after step \([0-9]*\).*--resume auto$/\1/p' "$T_TMP/int1.log")
expect "SIGINT: exit 0 (got $RC) after naming the step and the resume command" test "$RC" -eq 0 -a -n "$step"
expect "SIGINT: says at once that it saves and how to abort" grep -q 'Ctrl-C again to abort' "$T_TMP/int1.log"
expect "SIGINT: checkpoint of step $step valid, latest names it" \
  bash -c "build/mgpu-ckpt verify '$T_TMP/int1' > /dev/null && [ \"\$(cat '$T_TMP/int1/latest')\" = \"\$(printf 'step-%08d' '${step:-0}')\" ]"
expect "SIGINT: no model.safetensors and no 'final test accuracy' yet (the run is not over)" \
  bash -c "[ ! -e '$T_TMP/int1/model.safetensors' ] && ! grep -q 'final test accuracy' '$T_TMP/int1.log'"
timeout 120 build/fashion_mlp "${LONG[@]}" --save-dir "$T_TMP/int1" --resume auto > "$T_TMP/int1b.log" 2>&1
expect "SIGINT: the resumed run ends bit-identical to the uninterrupted one" cmp -s "$T_TMP/ref1/model.safetensors" "$T_TMP/int1/model.safetensors"

# the second Ctrl-C must come while the first waits for its step: CNN steps of 1024 images take
# seconds on one thread (about 3 s here), so both signals land within the first step
TWICE=1 interrupt_after 0.8 "$T_TMP/twice.log" build/fashion_cnn --data "$FM" --epochs 5 --batch-size 1024 --log-every 0 --save-dir "$T_TMP/twice"
expect "a second Ctrl-C aborts at once (exit $RC = 128 + SIGINT, no 'stopped' line)" \
  bash -c "[ $RC -eq 130 ] && ! grep -q '^stopped by' '$T_TMP/twice.log'"

# ---- Ctrl-C, two processes under mgpurun (it forwards SIGINT; the ranks agree on the step)
timeout 120 build/mgpurun --nproc-per-node 2 build/fashion_mlp "${LONG[@]}" --batch-size 32 --save-dir "$T_TMP/ref2" > "$T_TMP/ref2.log" 2>&1
interrupt_after 1.5 "$T_TMP/int2.log" build/mgpurun --nproc-per-node 2 build/fashion_mlp "${LONG[@]}" --batch-size 32 --save-dir "$T_TMP/int2"
expect "mgpurun + SIGINT: one 'stopped by Ctrl-C' line, from rank 0, and a checkpoint" \
  bash -c "[ \"\$(grep -c 'stopped by Ctrl-C' '$T_TMP/int2.log')\" -eq 1 ] && grep -q '^\[rank 0\] stopped by Ctrl-C' '$T_TMP/int2.log' && build/mgpu-ckpt verify '$T_TMP/int2' > /dev/null"
timeout 120 build/mgpurun --nproc-per-node 2 build/fashion_mlp "${LONG[@]}" --batch-size 32 --save-dir "$T_TMP/int2" --resume auto > "$T_TMP/int2b.log" 2>&1
expect "mgpurun + SIGINT: the resumed 2-process run ends bit-identical to the uninterrupted one" \
  cmp -s "$T_TMP/ref2/model.safetensors" "$T_TMP/int2/model.safetensors" || tail -n 5 "$T_TMP/int2.log" "$T_TMP/int2b.log"

# a signal that reaches one worker only (here SIGINT to one of them) stops both after the same step
build/mgpurun --nproc-per-node 2 build/fashion_mlp "${LONG[@]}" --batch-size 32 --save-dir "$T_TMP/one" > "$T_TMP/one.log" 2>&1 & pid=$!   # no timeout wrapper: the workers must be its children
( sleep 90; kill -9 "$pid" 2>/dev/null ) > /dev/null 2>&1 &
sleep 1.5; worker=$(pgrep -P "$pid" | tail -n 1)
[ -n "$worker" ] && kill -INT "$worker"; wait "$pid"; rc=$?
timeout 120 build/mgpurun --nproc-per-node 2 build/fashion_mlp "${LONG[@]}" --batch-size 32 --save-dir "$T_TMP/one" --resume auto > "$T_TMP/oneb.log" 2>&1
expect "SIGINT to one worker only: mgpurun exits 0 (got $rc), both ranks stop at one step, the resumed run ends bit-identical" \
  bash -c "[ -n '$worker' ] && [ $rc -eq 0 ] && grep -q 'stopped by Ctrl-C' '$T_TMP/one.log' && cmp -s '$T_TMP/ref2/model.safetensors' '$T_TMP/one/model.safetensors'" || tail -n 5 "$T_TMP/one.log" "$T_TMP/oneb.log"

# ---- unwritable outputs: an error before any step, nothing written
: > "$T_TMP/a_file"
t0=$(date +%s%N)
out=$(timeout 20 build/fashion_mlp "${LONG[@]}" --save-dir "$T_TMP/a_file/run" 2>&1); rc=$?
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
expect "unwritable --save-dir: exit 1 in ${ms} ms (< 5000) naming --save-dir, before any step" \
  bash -c "[ $rc -eq 1 ] && [ $ms -lt 5000 ] && grep -q -- '--save-dir $T_TMP/a_file/run is not writable' <<<\"\$0\" && ! grep -q '^epoch' <<<\"\$0\"" "$out"
mkdir -p "$T_TMP/ro"
out=$(timeout 20 build/fashion_mlp "${LONG[@]}" --save-dir "$T_TMP/ro/run" --metrics "$T_TMP/a_file/m.jsonl" 2>&1); rc=$?
expect "unwritable --metrics: exit 1 naming --metrics, nothing left in --save-dir" \
  bash -c "[ $rc -eq 1 ] && grep -q -- '--metrics $T_TMP/a_file/m.jsonl is not writable' <<<\"\$0\" && [ -z \"\$(ls -A '$T_TMP/ro/run' 2>/dev/null)\" ]" "$out"

# ---- a finished run: a last checkpoint; --resume auto trains nothing
SHORT=(--data "$FM" --epochs 2 --batch-size 64 --log-every 0 --seed 2)
timeout 60 build/fashion_mlp "${SHORT[@]}" --save-dir "$T_TMP/fin" --metrics "$T_TMP/fin.jsonl" > "$T_TMP/fin.log" 2>&1
expect "the end of a run writes a last checkpoint (step 64) besides model.safetensors" \
  bash -c "[ \"\$(cat '$T_TMP/fin/latest')\" = step-00000064 ] && [ -f '$T_TMP/fin/model.safetensors' ]"
cp "$T_TMP/fin.jsonl" "$T_TMP/fin.before"; cp "$T_TMP/fin/model.safetensors" "$T_TMP/fin.model"
out=$(timeout 60 build/fashion_mlp "${SHORT[@]}" --save-dir "$T_TMP/fin" --metrics "$T_TMP/fin.jsonl" --resume auto 2>&1); rc=$?
expect "--resume auto after a finished run: exit 0, 'already finished', no epoch trained again" \
  bash -c "[ $rc -eq 0 ] && grep -q 'already finished' <<<\"\$0\" && ! grep -q '^epoch ' <<<\"\$0\"" "$out"
expect "... the metrics file and the model are unchanged" \
  bash -c "cmp -s '$T_TMP/fin.jsonl' '$T_TMP/fin.before' && cmp -s '$T_TMP/fin/model.safetensors' '$T_TMP/fin.model'"
expect "... and the final line repeats the run's accuracy" \
  test "$(sed -n 's/^final test accuracy //p' <<<"$out")" = "$(sed -n 's/^final test accuracy //p' "$T_TMP/fin.log")"

# ---- --eval-only: the accuracy recorded at save time
saved=$(grep -o '"test_accuracy":[0-9.]*' "$T_TMP/fin/step-00000064/trainer_state.json" | tail -n 1 | cut -d: -f2)
out=$(timeout 60 build/fashion_mlp --data "$FM" --eval-only --resume "$T_TMP/fin" --metrics "$T_TMP/eval.jsonl" 2>&1); rc=$?
got=$(grep -o '"test_accuracy":[0-9.]*' "$T_TMP/eval.jsonl" | cut -d: -f2)
expect "--eval-only --resume: test accuracy $got equals the $saved recorded at save time, nothing trained" \
  bash -c "[ $rc -eq 0 ] && [ -n '$got' ] && awk -v a='$got' -v b='$saved' 'BEGIN{d=a-b; if(d<0)d=-d; exit !(d<=5e-7)}' && grep -q '\"eval_only\":true' '$T_TMP/eval.jsonl' && ! grep -q '^epoch ' <<<\"\$0\"" "$out"
out=$(timeout 60 build/fashion_mlp --data "$FM" --eval-only --resume auto --save-dir "$T_TMP/empty" 2>&1); rc=$?
expect "--eval-only --resume auto without a checkpoint: exit 1 saying so" bash -c "[ $rc -eq 1 ] && grep -q 'no checkpoint found to evaluate' <<<\"\$0\"" "$out"

# ---- DDP resumed mid-epoch logs the uninterrupted run's losses; only rank 0 talks
DDP=(--data "$FM" --epochs 2 --batch-size 32 --log-every 0 --seed 1 --checkpoint-every-steps 20 --keep-last 0)
timeout 120 build/mgpurun --nproc-per-node 2 build/fashion_mlp "${DDP[@]}" --save-dir "$T_TMP/dref" --metrics "$T_TMP/dref.jsonl" > "$T_TMP/dref.log" 2>&1
mkdir -p "$T_TMP/dres"; cp -r "$T_TMP/dref/step-00000020" "$T_TMP/dres/"; echo step-00000020 > "$T_TMP/dres/latest"
timeout 120 build/mgpurun --nproc-per-node 2 build/fashion_mlp "${DDP[@]}" --save-dir "$T_TMP/dres" --metrics "$T_TMP/dres.jsonl" --resume auto > "$T_TMP/dres.log" 2>&1
a=$(grep -o '"train_loss":[0-9.e-]*' "$T_TMP/dref.jsonl" | tr '\n' ' '); b=$(grep -o '"train_loss":[0-9.e-]*' "$T_TMP/dres.jsonl" | tr '\n' ' ')
expect "DDP resumed at step 20 (mid-epoch): logged train_loss equal to the uninterrupted run's ($b)" bash -c "[ -n '$a' ] && [ '$a' = '$b' ]"
expect "DDP: one 'final test accuracy' line, from rank 0 (rank 1 prints none)" \
  bash -c "[ \"\$(grep -c 'final test accuracy' '$T_TMP/dref.log')\" -eq 1 ] && grep -q '^\[rank 0\] final test accuracy' '$T_TMP/dref.log'"
expect "DDP: one 'resumed from' line, from rank 0" test "$(grep -c 'resumed from' "$T_TMP/dres.log")" -eq 1
# the same through DataParallel's in-process replicas (ranks of one process)
timeout 120 build/fashion_mlp "${DDP[@]}" --multi-gpu dp --gpu-ids 0,1 --save-dir "$T_TMP/pref" --metrics "$T_TMP/pref.jsonl" > "$T_TMP/pref.log" 2>&1
mkdir -p "$T_TMP/pres"; cp -r "$T_TMP/pref/step-00000020" "$T_TMP/pres/"; echo step-00000020 > "$T_TMP/pres/latest"
timeout 120 build/fashion_mlp "${DDP[@]}" --multi-gpu dp --gpu-ids 0,1 --save-dir "$T_TMP/pres" --metrics "$T_TMP/pres.jsonl" --resume auto > "$T_TMP/pres.log" 2>&1
a=$(grep -o '"train_loss":[0-9.e-]*' "$T_TMP/pref.jsonl" | tr '\n' ' '); b=$(grep -o '"train_loss":[0-9.e-]*' "$T_TMP/pres.jsonl" | tr '\n' ' ')
expect "DP (2 replicas) resumed at step 20: logged train_loss equal to the uninterrupted run's" bash -c "[ -n '$a' ] && [ '$a' = '$b' ]"
# a warning every rank would repeat is printed once, with the rank count
timeout 120 build/mgpurun --nproc-per-node 2 build/fashion_mlp "${DDP[@]}" --seed 9 --max-steps 21 --save-dir "$T_TMP/dres" --resume auto > "$T_TMP/dwarn.log" 2>&1
expect "DDP: a changed --seed on resume warns once, naming both ranks" \
  bash -c "[ \"\$(grep -c 'resuming with --seed 9' '$T_TMP/dwarn.log')\" -eq 1 ] && grep -q 'the same on all 2 ranks' '$T_TMP/dwarn.log'"
finish
