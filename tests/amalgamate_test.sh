#!/usr/bin/env bash
# mgpu.h is assembled from src/: the check must accept the committed tree and reject a copy whose
# part (or header) was edited without re-assembling, naming the part.
source "$(dirname "$0")/lib.sh"
w=$T_TMP/tree; mkdir -p "$w/tools"
cp -r src "$w/src"; cp mgpu.h "$w/"; cp tools/amalgamate.sh "$w/tools/"
out=$(sh "$w/tools/amalgamate.sh" --check 2>&1); expect "committed mgpu.h matches src/" test $? -eq 0 || printf '       %s\n' "$out"
part=$(LC_ALL=C ls "$w"/src/[0-9]*.c | sed -n 3p); name=src/$(basename "$part")
# flip one byte in the middle of the third implementation part
pos=$(( $(wc -c < "$part") / 2 ))
printf 'Z' | dd of="$part" bs=1 seek="$pos" conv=notrunc status=none
out=$(sh "$w/tools/amalgamate.sh" --check 2>&1); rc=$?
expect "one byte changed in $name fails the check" test "$rc" -ne 0
if grep -q "$name" <<<"$out"; then ok "the message names $name"; else fail "the message names $name" "$out"; fi
sh "$w/tools/amalgamate.sh" >/dev/null 2>&1
out=$(sh "$w/tools/amalgamate.sh" --check 2>&1); expect "re-assembling makes it pass again" test $? -eq 0 || printf '       %s\n' "$out"
printf '\n' >> "$w/mgpu.h"
out=$(sh "$w/tools/amalgamate.sh" --check 2>&1); rc=$?
expect "bytes appended to mgpu.h by hand fail the check" test "$rc" -ne 0
finish
