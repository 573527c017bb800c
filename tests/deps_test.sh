#!/usr/bin/env bash
# tools/deps.sh, the one list of Debian packages, checked without touching the system: fake
# dpkg-query and apt-get on PATH say what is installed and record what would be run.
source "$(dirname "$0")/lib.sh"
# run under `make test`: the parent make's flags (jobserver, -j, directory messages) stay out of ours
unset MAKEFLAGS MFLAGS MAKELEVEL
fake=$T_TMP/bin; mkdir -p "$fake" "$T_TMP/empty"
cat > "$fake/dpkg-query" <<'SH'
#!/bin/sh
# the package is the last argument; FAKE_MISSING lists the packages that are not installed
for p; do :; done
case " $FAKE_MISSING " in *" $p "*) echo "dpkg-query: no packages found matching $p" >&2; exit 1 ;; esac
printf 'install ok installed'
SH
cat > "$fake/apt-get" <<'SH'
#!/bin/sh
echo "$*" >> "$FAKE_APT_LOG"
case "$1" in update) exit "${FAKE_UPDATE_RC:-0}" ;; esac
exit 0
SH
chmod +x "$fake/dpkg-query" "$fake/apt-get"
export FAKE_APT_LOG=$T_TMP/apt.log
deps() { # uid, missing, args...: runs tools/deps.sh; sets out, err, rc, apt (what apt-get got)
  local uid=$1 missing=$2; shift 2
  rm -f "$FAKE_APT_LOG"; touch "$FAKE_APT_LOG"
  out=$(PATH="$fake:$PATH" FAKE_MISSING="$missing" MGPU_DEPS_UID=$uid sh tools/deps.sh "$@" 2>"$T_TMP/err"); rc=$?
  err=$(cat "$T_TMP/err"); apt=$(cat "$FAKE_APT_LOG")
}

deps 1000 "" test
expect "everything installed: exit 0, silent, apt-get never called" test "$rc/$out$err/$apt" = "0//"
deps 0 "" test
expect "everything installed, as root: no apt-get update either" test "$rc/$apt" = "0/"

deps 1000 "python3-torch dataset-fashion-mnist" test
expect "not root, two missing: exit 1" test "$rc" -eq 1
expect "not root: stdout is the one exact install line" test "$out" = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist python3-torch" || printf '       %s\n' "$out"
expect "not root: stderr says what needs them (make test)" grep -q "make test needs Debian packages that are not installed: dataset-fashion-mnist python3-torch" <<<"$err"
expect "not root: apt-get not called" test -z "$apt"

deps 0 "python3-torch dataset-fashion-mnist procps" test
expect "root: exit 0" test "$rc" -eq 0 || printf '       %s\n' "$err"
expect "root: apt-get update once, then one install of exactly the missing packages" \
  test "$apt" = "$(printf 'update -qq\ninstall -y -qq procps dataset-fashion-mnist python3-torch')" || printf '       %s\n' "$apt"
FAKE_UPDATE_RC=100 deps 0 "python3-numpy" test
expect "root, apt-get update fails: exit 1 naming it, no install attempted" \
  bash -c '[ "$1" -eq 1 ] && grep -q "apt-get update failed" <<<"$2" && [ "$3" = "update -qq" ]' _ "$rc" "$err" "$apt"

deps 0 "clang" --dry-run test
expect "--dry-run as root: says what it would run, runs nothing" \
  bash -c '[ "$1" -eq 0 ] && grep -q "would run: apt-get install -y clang" <<<"$2" && [ -z "$3" ]' _ "$rc" "$out" "$apt"
deps 1000 "make libstb-dev" demo
expect "make demo's packages: build + data, the sudo line names the missing ones" \
  bash -c '[ "$1" -eq 1 ] && [ "$2" = "sudo apt-get update && sudo apt-get install -y make libstb-dev" ] && grep -q "make demo needs" <<<"$3"' _ "$rc" "$out" "$err"

out=$(PATH=$T_TMP/empty MGPU_DEPS_UID=1000 /bin/sh tools/deps.sh test 2>&1); rc=$?
expect "not Debian (no dpkg-query): exit 0 with a note listing the packages" bash -c '[ "$1" -eq 0 ] && grep -q "not a Debian system.*python3-torch" <<<"$2"' _ "$rc" "$out"
out=$(sh tools/deps.sh nonsense 2>&1); rc=$?
expect "unknown purpose: exit 2 naming it" bash -c '[ "$1" -eq 2 ] && grep -q "nonsense" <<<"$2"' _ "$rc" "$out"

# the lists: what the suite uses, in one place
list=$(sh tools/deps.sh --list test)
for p in make gcc g++ gzip clang libclang-rt-dev procps dataset-fashion-mnist python3-numpy python3-torch; do
  grep -qw -- "$p" <<<"$list" || fail "make test's list has $p: $list"
done
ok "make test's list: compilers, libFuzzer, pgrep, Fashion-MNIST, numpy, torch"
expect "make data's list is the one setup_data.sh prints" grep -q 'PACKAGES=$(sh tools/deps.sh --list data)' tools/setup_data.sh
expect "make bench adds a threaded OpenBLAS for PyTorch" grep -qw libopenblas0-pthread <<<"$(sh tools/deps.sh --list bench)"
expect "make test installs first (deps.sh test is its first step)" test "$(make -n test 2>/dev/null | head -n 1)" = "sh tools/deps.sh test"
expect "make demo installs first" test "$(make -n demo 2>/dev/null | head -n 1)" = "sh tools/deps.sh demo"
expect ".ci/run runs make test and lists no packages of its own" bash -c 'grep -q "make .*test" .ci/run && ! grep -q "python3-torch" .ci/run'
finish
