#!/usr/bin/env bash
# PyTorch interop: model.safetensors written by the examples loads into the equivalent torch.nn
# model with strict load_state_dict, and PyTorch gets the test accuracy mgpu reported (to 0.001).
# And the other way (--init-from): weights PyTorch saved (safetensors.torch.save_file when the
# safetensors package is installed, else interop.py's writer of the same layout) start an mgpu
# model whose accuracy before any step is PyTorch's; mgpu-ckpt reads such a file; a file of another
# model is refused naming the tensor. Uses Debian's python3-torch (installed by .ci/run).
source "$(dirname "$0")/lib.sh"
DATA=$(fashion_dir) || { fail "Fashion-MNIST not found"; finish; exit; }
if ! /usr/bin/python3 -c "import torch" 2>/dev/null; then fail "python3-torch is not installed (apt-get install python3-torch)"; finish; exit; fi
export MGPU_NUM_THREADS=2
check_model() { # kind, extra flags
  local kind=$1; shift
  out=$(build/fashion_$kind --data "$DATA" --epochs 1 "$@" --save-dir "$T_TMP/$kind" 2>&1)
  ours=$(sed -n 's/^final test accuracy //p' <<<"$out")
  theirs=$(/usr/bin/python3 tests/interop.py "$kind" "$T_TMP/$kind/model.safetensors" "$DATA" 2>&1 | sed -n 's/^accuracy=//p')
  expect "$kind: PyTorch accuracy $theirs equals mgpu's $ours (to 0.001)" \
    awk -v a="$ours" -v b="$theirs" 'BEGIN{d=a-b; if(d<0)d=-d; exit !(a!="" && b!="" && d<=0.001)}'
}
check_model mlp --max-steps 200
check_model cnn --max-steps 40 --batch-size 64

# PyTorch -> mgpu: --init-from a state_dict PyTorch wrote, evaluated before any step
check_init_from() { # kind
  local kind=$1 f="$T_TMP/torch_$1.safetensors" theirs writer ours out rc
  out=$(/usr/bin/python3 tests/interop.py export "$kind" "$f" "$DATA" 2>&1)
  theirs=$(sed -n 's/^accuracy=//p' <<<"$out"); writer=$(sed -n 's/^writer=//p' <<<"$out")
  out=$(build/fashion_$kind --data "$DATA" --init-from "$f" --eval-only 2>&1); rc=$?
  ours=$(sed -n 's/^final test accuracy //p' <<<"$out")
  expect "$kind --init-from a file written by PyTorch ($writer): accuracy $ours before any step equals PyTorch's $theirs" \
    awk -v a="$ours" -v b="$theirs" -v rc="$rc" 'BEGIN{d=a-b; if(d<0)d=-d; exit !(rc==0 && a!="" && b!="" && d<=0.0005)}' || echo "$out" | tail -n 3
}
check_init_from mlp
check_init_from cnn
out=$(build/fashion_mlp --data "$DATA" --init-from "$T_TMP/torch_mlp.safetensors" --epochs 1 --max-steps 5 --save-dir "$T_TMP/init" 2>&1); rc=$?
expect "mlp --init-from then training: exit 0, says so, a fresh optimizer" \
  bash -c "[ $rc -eq 0 ] && grep -q 'initialised from .*fresh optimizer' <<<\"\$0\"" "$out"
out=$(build/fashion_mlp --data "$DATA" --init-from "$T_TMP/torch_cnn.safetensors" --eval-only 2>&1); rc=$?
expect "mlp --init-from the CNN's file: exit 1 naming fc1.weight and both shapes" \
  bash -c "[ $rc -eq 1 ] && grep -q \"fc1.weight.*(128, 3136).*(256, 784)\" <<<\"\$0\"" "$out"
out=$(build/mgpu-ckpt inspect "$T_TMP/torch_cnn.safetensors" 2>&1); rc=$?
expect "mgpu-ckpt inspect a PyTorch-written file: lists bn1.num_batches_tracked I64 and conv1.weight's shape" \
  bash -c "[ $rc -eq 0 ] && grep -q 'bn1.num_batches_tracked  *I64' <<<\"\$0\" && grep -q 'conv1.weight  *F32  *(32, 1, 3, 3)' <<<\"\$0\"" "$out"
out=$(build/mgpu-ckpt verify "$T_TMP/torch_mlp.safetensors" 2>&1); rc=$?
expect "mgpu-ckpt verify a PyTorch-written file: ok" bash -c "[ $rc -eq 0 ] && grep -q ': ok' <<<\"\$0\"" "$out"
head -c 200 "$T_TMP/torch_mlp.safetensors" > "$T_TMP/cut.safetensors"
out=$(build/mgpu-ckpt verify "$T_TMP/cut.safetensors" 2>&1); rc=$?
expect "mgpu-ckpt verify a truncated file: exit 1 naming it" bash -c "[ $rc -eq 1 ] && grep -q 'cut.safetensors' <<<\"\$0\"" "$out"
out=$(build/mgpu-ckpt diff "$T_TMP/torch_mlp.safetensors" "$T_TMP/init" 2>&1); rc=$?
expect "mgpu-ckpt diff a PyTorch file against a checkpoint: per-tensor differences of the weights" \
  bash -c "[ $rc -eq 0 ] && grep -q 'fc1.weight  *max_abs [0-9.e-]* *max_rel' <<<\"\$0\" && ! grep -q 'optimizer' <<<\"\$0\"" "$out"
out=$(build/mgpu-ckpt diff "$T_TMP/torch_mlp.safetensors" "$T_TMP/torch_mlp.safetensors" 2>&1)
expect "mgpu-ckpt diff a file with itself: every tensor identical" bash -c "[ \"\$(grep -c identical <<<\"\$0\")\" -eq 6 ]" "$out"
finish
