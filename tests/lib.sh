# Shared helpers for the shell tests (tests/*_test.sh). Each test ends with `finish`, which prints
# "RESULT <name>: N passed, M failed" for tests/run.sh and exits non-zero on failure.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T_PASSED=0; T_FAILED=0
T_TMP=$(mktemp -d); trap 'rm -rf "$T_TMP"' EXIT
ok()   { T_PASSED=$((T_PASSED + 1)); echo "  ok   $1"; }
fail() { T_FAILED=$((T_FAILED + 1)); echo "  FAIL $1"; [ $# -gt 1 ] && printf '%s\n' "$2" | tail -n 20 | sed 's/^/       /'; return 0; }
# expect NAME CONDITION-RESULT [DETAIL]: pass when the condition command succeeded
expect() { local name=$1; shift; if "$@"; then ok "$name"; else fail "$name"; fi; }
finish() { echo "RESULT $(basename "$0"): $T_PASSED passed, $T_FAILED failed"; [ "$T_FAILED" -eq 0 ]; }
# The Fashion-MNIST directory: data/fashion-mnist (make data), else Debian's package files (.gz).
fashion_dir() {
  local d
  for d in data/fashion-mnist /usr/share/datasets/fashion-mnist; do
    if [ -e "$d/train-images-idx3-ubyte" ] || [ -e "$d/train-images-idx3-ubyte.gz" ]; then echo "$d"; return 0; fi
  done
  return 1
}
