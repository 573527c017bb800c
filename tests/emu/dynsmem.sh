#!/bin/sh
# mgpu CUDA emulation (tests only): dynamic shared memory for kernels compiled as C++.
# `extern __shared__ T name[];` becomes an undefined thread-local symbol; this prints an assembly
# file that defines every such symbol of the given objects (but the emulation's own, mgpu_emu_*)
# as one thread-local buffer of 227 KiB
# (the largest dynamic shared memory a launch may ask for), so all of them alias the block's
# dynamic shared memory as on the device.
# Usage: sh tests/emu/dynsmem.sh OBJ... > dynsmem.s
set -eu
syms=$(for o in "$@"; do readelf -sW "$o"; done | awk '$7 == "UND" && $4 == "TLS" && $8 !~ /^mgpu_emu_/ { print $8 }' | sort -u)
echo '    .section .note.GNU-stack,"",@progbits'
[ -n "$syms" ] || exit 0
first=
echo '    .section .tbss,"awT",@nobits'
echo '    .p2align 8'
for s in $syms; do
  echo "    .globl $s"
  echo "    .type $s, @object"
  if [ -z "$first" ]; then
    first=$s
    echo "    .size $s, 232448"
    echo "$s:"
    echo "    .zero 232448"
  else
    echo "    .size $s, 232448"
    echo "    .set $s, $first"
  fi
done
