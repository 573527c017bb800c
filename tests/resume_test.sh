#!/usr/bin/env bash
# Training that survives: real processes killed (SIGKILL) at random moments, one of them while a
# checkpoint is being written, then resumed with --resume auto until they finish. Every resumed
# run must end with a model.safetensors bit-identical (cmp) to an uninterrupted run's. Also:
# SIGTERM checkpoints and exits 0, a corrupt latest checkpoint falls back with a warning, a
# garbage checkpoint is a clear error (exit code < 128 naming the file), and mgpu-ckpt works.
source "$(dirname "$0")/lib.sh"

DATA=$(fashion_dir) || { fail "Fashion-MNIST not found (install dataset-fashion-mnist or run make data)"; finish; exit; }
export MGPU_NUM_THREADS=2
# 2 epochs cut at 600 steps (469 batches per epoch): an epoch boundary, a mid-epoch end, checkpoints
# every 50 steps and at each epoch end, only the last 2 kept.
ARGS=(--data "$DATA" --epochs 2 --max-steps 600 --checkpoint-every-steps 50 --checkpoint-every-epochs 1 --keep-last 2
      --num-workers 2 --log-every 0 --seed 5)
mlp() { timeout 120 build/fashion_mlp "${ARGS[@]}" "$@"; }
# The same in the background, PID set to the trainer itself (signals must reach it, not a wrapper);
# a watchdog kills it after 60 s so nothing can hang.
bg_mlp() {
  build/fashion_mlp "${ARGS[@]}" "$@" &
  PID=$!
  ( sleep 60; kill -9 "$PID" 2>/dev/null ) > /dev/null 2>&1 &
}

t0=$(date +%s%N)
mlp --save-dir "$T_TMP/ref" --metrics "$T_TMP/ref.jsonl" > "$T_TMP/ref.log" 2>&1; rc=$?
ref_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
expect "uninterrupted reference run exits 0 (${ref_ms} ms)" test "$rc" -eq 0
[ "$rc" -eq 0 ] || { tail -5 "$T_TMP/ref.log"; finish; exit; }

# Resumes DIR with --resume auto until a run exits 0 (at most 6 tries); prints the exit codes.
resume_until_done() {
  local dir=$1 i rc codes=""
  for i in 1 2 3 4 5 6; do
    mlp --save-dir "$dir" --metrics "$dir.jsonl" --resume auto >> "$dir.log" 2>&1; rc=$?
    codes="$codes $rc"
    [ "$rc" -eq 0 ] && break
  done
  echo "$codes"
}

# Starts a run in the background into DIR and kills it with SIGKILL: after MS milliseconds, or
# (MS = tmp) as soon as a step-*.tmp directory shows that a checkpoint is being written.
start_and_kill() {
  local dir=$1 ms=$2 pid
  bg_mlp --save-dir "$dir" --metrics "$dir.jsonl" > "$dir.log" 2>&1
  pid=$PID
  if [ "$ms" = tmp ]; then
    # after the first few checkpoints, so some exist to fall back on
    while kill -0 "$pid" 2>/dev/null && ! compgen -G "$dir/step-0000015*" > /dev/null; do sleep 0.01; done
    while kill -0 "$pid" 2>/dev/null && ! compgen -G "$dir/step-*.tmp" > /dev/null; do :; done
  else
    sleep "$(awk -v ms="$ms" 'BEGIN{printf "%.3f", ms / 1000}')"
  fi
  kill -9 "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
}

RANDOM=$$
for trial in 1 2 3 4 5; do
  dir="$T_TMP/trial$trial"
  if [ "$trial" -eq 1 ]; then
    when=tmp
  else
    # a random moment between 15% and 95% of the reference run (startup included)
    when=$(( ref_ms * (15 + RANDOM % 81) / 100 ))
  fi
  start_and_kill "$dir" "$when"
  leftover=$(compgen -G "$dir/step-*.tmp" | head -n 1)
  if [ "$trial" -eq 4 ]; then
    # killed twice: the first resume dies too
    bg_mlp --save-dir "$dir" --metrics "$dir.jsonl" --resume auto >> "$dir.log" 2>&1; pid=$PID
    sleep "$(awk -v ms="$ref_ms" 'BEGIN{printf "%.3f", ms * 0.4 / 1000}')"; kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  fi
  codes=$(resume_until_done "$dir")
  label="trial $trial (SIGKILL at ${when}${leftover:+, left $(basename "$leftover")}; resume exit codes:$codes)"
  if cmp -s "$T_TMP/ref/model.safetensors" "$dir/model.safetensors"; then ok "$label: final weights bit-identical"
  else fail "$label: final weights differ from the uninterrupted run" "$(grep -v '%' "$dir.log" | tail -n 8)"; fi
  expect "trial $trial: no step-*.tmp left behind" test -z "$(compgen -G "$dir/step-*.tmp")"
  expect "trial $trial: keep-last 2 leaves at most 2 checkpoints" test "$(compgen -G "$dir/step-*" | wc -l)" -le 2
  # the metrics file holds each epoch once (lines logged after the last checkpoint are replaced on resume)
  expect "trial $trial: metrics hold epochs 1 and 2 once each" \
    test "$(grep -o '"epoch":[0-9]*' "$dir.jsonl" | tr '\n' ' ')" = '"epoch":1 "epoch":2 '
done

# SIGTERM: a checkpoint after the current step, exit 0, then the resumed run ends identical.
dir="$T_TMP/term"
bg_mlp --save-dir "$dir" > "$dir.log" 2>&1; pid=$PID
sleep "$(awk -v ms="$ref_ms" 'BEGIN{printf "%.3f", ms * 0.5 / 1000}')"
kill -TERM "$pid"; wait "$pid"; rc=$?
step=$(sed -n 's/^stopped by SIGTERM after step \([0-9]*\) (signal 15).*/\1/p' "$dir.log")
expect "SIGTERM: exit 0 (got $rc) after saying it stopped" test "$rc" -eq 0 -a -n "$step"
expect "SIGTERM: checkpoint of step $step saved and valid" build/mgpu-ckpt verify "$dir/$(printf 'step-%08d' "${step:-0}")"
expect "SIGTERM: latest names it" test "$(cat "$dir/latest" 2>/dev/null)" = "$(printf 'step-%08d' "${step:-0}")"
mlp --save-dir "$dir" --resume auto >> "$dir.log" 2>&1; rc=$?
expect "SIGTERM: resumed run exits 0 with bit-identical weights" cmp -s "$T_TMP/ref/model.safetensors" "$dir/model.safetensors"

# A corrupt latest checkpoint: --resume auto warns, falls back to the one before, still identical.
cp -r "$dir" "$T_TMP/corrupt"; rm -f "$T_TMP/corrupt/model.safetensors"
latest=$(cat "$T_TMP/corrupt/latest")
head -c 300 "$T_TMP/term/$latest/model.safetensors" > "$T_TMP/corrupt/$latest/model.safetensors"
out=$(mlp --save-dir "$T_TMP/corrupt" --resume auto 2>&1); rc=$?
expect "corrupt latest: a warning names it" grep -q "warning.*$latest/model.safetensors" <<<"$out"
expect "corrupt latest: resumed from an older checkpoint" grep -q "resumed from .*step-" <<<"$out"
expect "corrupt latest: exit 0 with bit-identical weights" bash -c "[ $rc -eq 0 ] && cmp -s '$T_TMP/ref/model.safetensors' '$T_TMP/corrupt/model.safetensors'"

# Garbage checkpoints given to the examples: exit code 1..127 and the file named.
g="$T_TMP/garbage/step-00000100"; mkdir -p "$g"
cp "$T_TMP/ref/$(cat "$T_TMP/ref/latest")"/* "$g/"
head -c 4096 /dev/urandom > "$g/model.safetensors"
out=$(mlp --resume "$g" 2>&1); rc=$?
expect "garbage model.safetensors: exit $rc in 1..127 naming the file" bash -c "[ $rc -ge 1 ] && [ $rc -lt 128 ] && grep -q '$g/model.safetensors' <<<\"\$0\"" "$out"
cp "$T_TMP/ref/$(cat "$T_TMP/ref/latest")/model.safetensors" "$g/"
printf '{"format_version":1,"step":100,"epoch":"x"' > "$g/trainer_state.json"
out=$(build/fashion_cnn --data "$DATA" --max-steps 1 --resume "$g" 2>&1); rc=$?
expect "garbage trainer_state.json (cnn): exit $rc in 1..127 naming the file" bash -c "[ $rc -ge 1 ] && [ $rc -lt 128 ] && grep -q 'trainer_state.json' <<<\"\$0\"" "$out"
out=$(mlp --resume "$T_TMP/nowhere" 2>&1); rc=$?
expect "missing checkpoint: exit $rc in 1..127 naming the path" bash -c "[ $rc -ge 1 ] && [ $rc -lt 128 ] && grep -q '$T_TMP/nowhere' <<<\"\$0\"" "$out"

# mgpu-ckpt on the same checkpoints.
out=$(build/mgpu-ckpt verify "$T_TMP/ref"); rc=$?
expect "mgpu-ckpt verify: ok on a save dir" bash -c "[ $rc -eq 0 ] && grep -q ': ok' <<<\"\$0\"" "$out"
out=$(build/mgpu-ckpt verify "$g" 2>&1); rc=$?
expect "mgpu-ckpt verify: exit 1 naming trainer_state.json" bash -c "[ $rc -eq 1 ] && grep -q 'trainer_state.json' <<<\"\$0\"" "$out"
out=$(build/mgpu-ckpt inspect "$T_TMP/ref"); rc=$?
expect "mgpu-ckpt inspect lists tensors, shapes and the state" \
  bash -c "[ $rc -eq 0 ] && grep -q 'fc1.weight  *F32  *(256, 784)  *802816' <<<\"\$0\" && grep -q 'fc1.weight.exp_avg_sq' <<<\"\$0\" && grep -q 'step 600' <<<\"\$0\"" "$out"
prev=$(compgen -G "$T_TMP/ref/step-*" | head -n 1)
out=$(build/mgpu-ckpt diff "$prev" "$T_TMP/ref"); rc=$?
expect "mgpu-ckpt diff: per-tensor differences, exit 0" bash -c "[ $rc -eq 0 ] && grep -q 'fc1.weight  *max_abs [0-9.e-]* *max_rel' <<<\"\$0\"" "$out"
out=$(build/mgpu-ckpt diff "$T_TMP/ref" "$T_TMP/trial2"); rc=$?
expect "mgpu-ckpt diff: a resumed run's last checkpoint is identical" bash -c "[ $rc -eq 0 ] && ! grep 'max_abs' <<<\"\$0\" | grep -vq identical" "$out"
build/mgpu-ckpt --help | grep -q inspect; expect "mgpu-ckpt --help" test $? -eq 0
build/mgpu-ckpt bogus > /dev/null 2>&1; expect "mgpu-ckpt: bad usage exits 2" test $? -eq 2
finish
