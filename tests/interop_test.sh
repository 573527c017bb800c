#!/usr/bin/env bash
# PyTorch interop: model.safetensors written by the examples loads into the equivalent torch.nn
# model with strict load_state_dict, and PyTorch gets the test accuracy mgpu reported (to 0.001).
# Uses Debian's python3-torch (installed by .ci/run).
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
finish
