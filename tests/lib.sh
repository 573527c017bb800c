# Shared helpers for the shell tests (tests/*_test.sh). Each test ends with `finish`, which prints
# "RESULT <name>: N passed, M failed" (plus ", K skipped" when some were) for tests/run.sh and
# exits non-zero on failure.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T_PASSED=0; T_FAILED=0; T_SKIPPED=0
T_TMP=$(mktemp -d); trap 'rm -rf "$T_TMP"' EXIT
ok()   { T_PASSED=$((T_PASSED + 1)); echo "  ok   $1"; }
fail() { T_FAILED=$((T_FAILED + 1)); echo "  FAIL $1"; [ $# -gt 1 ] && printf '%s\n' "$2" | tail -n 20 | sed 's/^/       /'; return 0; }
# skip NAME WHY: a check that could not run here (counted apart, never as a pass)
skip() { T_SKIPPED=$((T_SKIPPED + 1)); echo "  SKIP $1: $2"; }
# expect NAME COMMAND...: pass when the command succeeds. Returns the command's status, so
# `expect ... || echo "$out"` shows more on failure.
expect() { local name=$1; shift; if "$@"; then ok "$name"; else fail "$name"; return 1; fi; }
finish() {
  if [ "$T_SKIPPED" -gt 0 ]; then echo "RESULT $(basename "$0"): $T_PASSED passed, $T_FAILED failed, $T_SKIPPED skipped"
  else echo "RESULT $(basename "$0"): $T_PASSED passed, $T_FAILED failed"; fi
  [ "$T_FAILED" -eq 0 ]
}
# The Fashion-MNIST directory: data/fashion-mnist (make data), else Debian's package files (.gz).
fashion_dir() {
  local d
  for d in data/fashion-mnist /usr/share/datasets/fashion-mnist; do
    if [ -e "$d/train-images-idx3-ubyte" ] || [ -e "$d/train-images-idx3-ubyte.gz" ]; then echo "$d"; return 0; fi
  done
  return 1
}
