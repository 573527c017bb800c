#!/usr/bin/env bash
# The C a user copies must compile: every ```c block of README.md and the opening example of
# mgpu.h (src/00_intro.h) is extracted (tests/extract_snippets.py) and compiled with the project's
# warnings as errors; complete programs are linked and run for a few steps on a Fashion-MNIST
# subset (exit 0 expected), the implementation-file snippet is linked, and fragments (file-scope
# code) are compiled after #include "mgpu.h". Errors point at the README/header line (#line).
# The test proves it can fail: a copy of README.md with one snippet broken at compile time, and
# one whose program exits 1, must each be caught.
source "$(dirname "$0")/lib.sh"
CCX=${CC:-cc}
FLAGS=(-I. -std=c11 -Wall -Wextra -pedantic -Werror -O1)
LIBS=(-lm -lpthread)

# A 512-image training set (and 128 test images), in Fashion-MNIST's file format: a few steps.
make_subset() {
  local src
  src=$(fashion_dir) || return 1
  python3 tests/fashion_subset.py "$src" "$1" 512 128
}

# check KIND FILE ORIGIN: 0 when the snippet passes; the reason (compiler or program output) in $WHY
check() {
  local kind=$1 file=$2 origin=$3 src=$2.tu.c exe=$2.exe run_dir
  local path=${origin%:*} line=${origin##*:}
  case "$kind" in
    fragment)  { echo '#include "mgpu.h"'; echo "#line $line \"$path\""; cat "$file"; } > "$src" ;;
    vendoring) { echo "#line $line \"$path\""; cat "$file"; echo 'int main(void) { return 0; }'; } > "$src" ;;
    program)   { echo "#line $line \"$path\""; cat "$file"; } > "$src" ;;
  esac
  if [ "$kind" = fragment ]; then
    WHY=$("$CCX" "${FLAGS[@]}" -Wno-unused-function -c "$src" -o "$exe.o" 2>&1) || return 1
    return 0
  fi
  WHY=$("$CCX" "${FLAGS[@]}" "$src" -o "$exe" "${LIBS[@]}" 2>&1) || return 1
  [ "$kind" = program ] || return 0
  run_dir=$file.run; mkdir -p "$run_dir"
  WHY=$(cd "$run_dir" && MGPU_NUM_THREADS=2 timeout 120 "$exe" --data "$SUBSET" --epochs 1 --max-steps 3 --batch-size 64 --device cpu 2>&1)
  local rc=$?
  WHY="exit $rc: $WHY"
  [ "$rc" -eq 0 ]
}

# A snippet already checked with the same kind and text has the same outcome: the copies of
# README.md below recheck only the snippet that was broken (compiling mgpu.h takes a while).
declare -A PASSED
check_cached() {
  local key
  key="$1 $(md5sum < "$2")"
  [ -n "${PASSED[$key]:-}" ] && return 0
  check "$@" || return 1
  PASSED[$key]=1
}

# check_all LABEL FILE...: every snippet of the files through check; prints one line each and
# sets N_SNIPPETS, N_FAILED and FAILED_AT (the origins that failed)
check_all() {
  local label=$1 out kind file origin; shift
  out=$T_TMP/$label; mkdir -p "$out"
  N_SNIPPETS=0; N_FAILED=0; FAILED_AT=""
  while read -r kind file origin; do
    N_SNIPPETS=$((N_SNIPPETS + 1))
    if check_cached "$kind" "$file" "$origin"; then echo "    $origin ($kind): ok"
    else N_FAILED=$((N_FAILED + 1)); FAILED_AT="$FAILED_AT $origin"; echo "    $origin ($kind): FAILED"; printf '%s\n' "$WHY" | tail -n 8 | sed 's/^/      /'; fi
  done < <(/usr/bin/python3 tests/extract_snippets.py "$out" "$@")
}

SUBSET=$T_TMP/fashion-subset
make_subset "$SUBSET" || { fail "Fashion-MNIST not found (tools/deps.sh test): the programs cannot run"; finish; exit; }
make --no-print-directory mgpu.h >/dev/null

# --- the real snippets ------------------------------------------------------------------------
fences=$(grep -cE '^\s*```c\s*$' README.md)
check_all real README.md src/00_intro.h
expect "extracted every \`\`\`c block of README.md ($fences) plus the header's example" test "$N_SNIPPETS" -eq $((fences + 1))
expect "every snippet compiles; programs link and run a few steps ($N_SNIPPETS snippets, $N_FAILED failed:${FAILED_AT:- none})" test "$N_FAILED" -eq 0
expect "the header's opening example is among them, as a program" grep -q '^program .*00_intro.h' <(/usr/bin/python3 tests/extract_snippets.py "$T_TMP/list" src/00_intro.h)

# --- the test can fail ------------------------------------------------------------------------
mkdir -p "$T_TMP/broken"
# a compile error in the first fragment (an extra argument to mgpu_backward)
awk '!done && /mgpu_backward\(ctx, loss\)/ { sub(/mgpu_backward\(ctx, loss\)/, "mgpu_backward(ctx, loss, 0)"); done = 1 } { print }' README.md > "$T_TMP/broken/README.md"
at=$(grep -n 'mgpu_backward(ctx, loss, 0)' "$T_TMP/broken/README.md" | cut -d: -f1)
check_all broken1 "$T_TMP/broken/README.md" > "$T_TMP/broken1.log"
expect "a README copy with mgpu_backward given 3 arguments (line $at) fails, and only that snippet" \
  bash -c "[ $N_FAILED -eq 1 ] && grep -q 'README.md:$at' '$T_TMP/broken1.log'" || cat "$T_TMP/broken1.log"
# a complete program that compiles but exits 1
awk '/^int main\(/ { inmain = 1 } inmain && /^    return 0;$/ && !done { sub(/return 0;/, "return 1;"); done = 1 } { print }' README.md > "$T_TMP/broken/README.md"
check_all broken2 "$T_TMP/broken/README.md" > "$T_TMP/broken2.log"
expect "a README copy whose complete program exits 1 fails (it is run, not only compiled)" \
  bash -c "[ $N_FAILED -eq 1 ] && grep -q 'exit 1' '$T_TMP/broken2.log'" || cat "$T_TMP/broken2.log"
finish
