#!/usr/bin/env bash
# The examples end to end: short training runs reach a loss threshold, outputs (metrics JSONL,
# model.safetensors) are written, and bad input gives clear errors with small exit codes.
source "$(dirname "$0")/lib.sh"

DATA=$(fashion_dir) || { fail "Fashion-MNIST not found (install dataset-fashion-mnist or run make data)"; finish; exit; }
export MGPU_NUM_THREADS=2

# A short MLP run: 300 steps must bring the test loss well below chance (ln 10 = 2.30).
out=$(build/fashion_mlp --data "$DATA" --epochs 1 --max-steps 300 --metrics "$T_TMP/mlp.jsonl" --save-dir "$T_TMP/mlp" 2>&1); rc=$?
acc=$(sed -n 's/^final test accuracy //p' <<<"$out")
loss=$(grep -o 'test_loss [0-9.]*' <<<"$out" | tail -n 1 | cut -d' ' -f2)
expect "mlp short run exits 0" test "$rc" -eq 0 || tail -n 5 <<<"$out" | sed 's/^/       /'
expect "mlp short run: test loss $loss < 0.65" awk -v l="$loss" 'BEGIN{exit !(l != "" && l < 0.65)}'
expect "mlp short run: test accuracy $acc > 0.75" awk -v a="$acc" 'BEGIN{exit !(a != "" && a > 0.75)}'
expect "mlp writes model.safetensors" test -s "$T_TMP/mlp/model.safetensors"
expect "mlp metrics: an epoch line and a final line" bash -c "grep -q '\"epoch\":1' '$T_TMP/mlp.jsonl' && tail -n 1 '$T_TMP/mlp.jsonl' | grep -q '\"event\":\"final\"'"

# A short CNN run (batch norm, dropout, conv, pooling).
out=$(build/fashion_cnn --data "$DATA" --epochs 1 --max-steps 60 --batch-size 64 2>&1); rc=$?
loss=$(grep -o 'test_loss [0-9.]*' <<<"$out" | tail -n 1 | cut -d' ' -f2)
expect "cnn short run exits 0" test "$rc" -eq 0 || tail -n 5 <<<"$out" | sed 's/^/       /'
expect "cnn short run: test loss $loss < 1.0" awk -v l="$loss" 'BEGIN{exit !(l != "" && l < 1.0)}'

# Same seed, same run: the loss curve is deterministic.
a=$(build/fashion_mlp --data "$DATA" --epochs 1 --max-steps 20 --seed 7 2>/dev/null | grep '^epoch')
b=$(build/fashion_mlp --data "$DATA" --epochs 1 --max-steps 20 --seed 7 --num-workers 3 2>/dev/null | grep '^epoch')
expect "same seed gives the same losses (0 vs 3 workers)" test "$(cut -d' ' -f1-8 <<<"$a")" = "$(cut -d' ' -f1-8 <<<"$b")"

# Bad input: clear message, exit code below 128, nothing hangs.
out=$(build/fashion_mlp --no-such-flag 2>&1); rc=$?
expect "unknown flag: exit 2" test "$rc" -eq 2
expect "unknown flag named in the message" grep -q -- '--no-such-flag' <<<"$out"
out=$(build/fashion_mlp --epochz 3 2>&1); rc=$?
expect "a typo: exit 2 with 'did you mean --epochs?'" bash -c "[ $rc -eq 2 ] && grep -qF -- 'did you mean --epochs?' <<<\"\$0\"" "$out" || printf '       %s\n' "$out"
# PyTorch spellings end to end: underscores and --num_epochs train like the dashed flags
a=$(build/fashion_mlp --data "$DATA" --epochs 1 --max-steps 20 --seed 7 --batch-size 64 --eval-frequency 1 2>/dev/null | grep '^epoch')
b=$(build/fashion_mlp --data "$DATA" --num_epochs 1 --max_steps=20 --seed 7 --batch_size 64 --eval_frequency 1 --num_workers 2 2>/dev/null | grep '^epoch')
expect "--num_epochs/--batch_size/--max_steps/--num_workers train as the dashed flags do" test -n "$a" -a "$(cut -d' ' -f1-8 <<<"$a")" = "$(cut -d' ' -f1-8 <<<"$b")"
out=$(build/fashion_mlp --epochs zero 2>&1); rc=$?
expect "bad value: exit 2 naming --epochs" bash -c "[ $rc -eq 2 ] && grep -q -- '--epochs' <<<\"\$0\"" "$out"
out=$(build/fashion_mlp --data "$T_TMP/nowhere" 2>&1); rc=$?
expect "missing data: exit 1" test "$rc" -eq 1
expect "missing data: message names the path" grep -q "$T_TMP/nowhere" <<<"$out"
mkdir -p "$T_TMP/bad"; head -c 1000 /dev/urandom > "$T_TMP/bad/train-images-idx3-ubyte"; cp "$T_TMP/bad/train-images-idx3-ubyte" "$T_TMP/bad/train-labels-idx1-ubyte"
out=$(build/fashion_mlp --data "$T_TMP/bad" 2>&1); rc=$?
expect "corrupt data: exit 1 naming the file" bash -c "[ $rc -eq 1 ] && grep -q 'train-' <<<\"\$0\"" "$out"
out=$(build/fashion_mlp --help 2>&1); rc=$?
expect "--help exits 0 and lists --batch-size" bash -c "[ $rc -eq 0 ] && grep -q -- '--batch-size' <<<\"\$0\"" "$out"
out=$(build/fashion_mlp --device cuda --data "$DATA" 2>&1); rc=$?
expect "--device cuda in a CPU build: clear error" bash -c "[ $rc -eq 1 ] && grep -qi 'cuda' <<<\"\$0\"" "$out"
finish
