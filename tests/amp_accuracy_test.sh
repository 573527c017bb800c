#!/usr/bin/env bash
# Mixed precision end to end: fashion_mlp trained 10 epochs with --amp fp16 (loss scaler) and
# --amp bf16 reaches the f32 run's test accuracy to within 0.005 (half precision emulated on the CPU).
source "$(dirname "$0")/lib.sh"
DATA=$(fashion_dir) || { fail "Fashion-MNIST not found"; finish; exit; }
export MGPU_NUM_THREADS=2
acc() { build/fashion_mlp --data "$DATA" --epochs 10 --log-every 0 --eval-frequency 0 "$@" 2>/dev/null | sed -n 's/^final test accuracy //p'; }
f32=$(acc --amp off); fp16=$(acc --amp fp16); bf16=$(acc --amp bf16)
close() { awk -v a="$1" -v b="$2" 'BEGIN{d=a-b; if(d<0)d=-d; exit !(a!="" && b!="" && d<=0.005)}'; }
expect "fp16 accuracy $fp16 within 0.005 of f32 $f32" close "$fp16" "$f32"
expect "bf16 accuracy $bf16 within 0.005 of f32 $f32" close "$bf16" "$f32"
expect "f32 run reaches the example's 0.885 target ($f32)" awk -v a="$f32" 'BEGIN{exit !(a != "" && a >= 0.885)}'
finish
