#!/bin/sh
# The Debian packages mgpu's make targets need, listed once, per purpose, and their installation.
# `make test` runs `tools/deps.sh test`, `make demo` runs `tools/deps.sh demo`.
#
#   sh tools/deps.sh PURPOSE...            install what is missing: as root, apt-get update once,
#                                          then apt-get install; otherwise print the one command
#                                          to run (sudo ...) and exit 1. Quiet when nothing is missing.
#   sh tools/deps.sh --dry-run PURPOSE...  say what would be installed and how; change nothing
#   sh tools/deps.sh --list PURPOSE...     print the packages of the purposes on one line
#
# Purposes:
#   build   compile the library, examples, tools and tests (make, C and C++ compilers, gzip)
#   test    everything `make test` runs: build, libFuzzer (clang), Fashion-MNIST for the
#           end-to-end runs, numpy and PyTorch for the model comparisons and interop, pgrep
#   data    Fashion-MNIST for `make data` (and stb_image for image-folder datasets)
#   demo    build + data
#   bench   `make bench`: build, Fashion-MNIST, PyTorch with a threaded OpenBLAS
#   launchers  the launchers tests/launcher_test.sh checks mgpu against: Open MPI's mpirun,
#           and shellcheck for examples/slurm/ (optional: the test skips, saying why, without)
#
# Not a Debian system (no dpkg-query): says which packages it would want and exits 0, leaving
# the tests to report what is missing.
# Override (for tests): MGPU_DEPS_UID   pretend to run as this user id.
set -eu

BUILD="make gcc g++ gzip"
DATA="dataset-fashion-mnist libstb-dev"
TEST="$BUILD clang libclang-rt-dev procps dataset-fashion-mnist python3-numpy python3-torch"
DEMO="$BUILD $DATA"
BENCH="$BUILD dataset-fashion-mnist python3-numpy python3-torch libopenblas0-pthread"
LAUNCHERS="openmpi-bin shellcheck"

usage() { echo "usage: sh tools/deps.sh [--dry-run|--list] build|test|data|demo|bench|launchers ..." >&2; exit 2; }

mode=install
case "${1:-}" in
  --dry-run) mode=dry-run; shift ;;
  --list) mode=list; shift ;;
  -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
[ $# -gt 0 ] || usage

packages=""; targets=""
for purpose in "$@"; do
  case "$purpose" in build) target=make ;; *) target="make $purpose" ;; esac
  targets="${targets:+$targets, }$target"
  case "$purpose" in
    build) list=$BUILD ;; test) list=$TEST ;; data) list=$DATA ;; demo) list=$DEMO ;; bench) list=$BENCH ;; launchers) list=$LAUNCHERS ;;
    *) echo "tools/deps.sh: unknown purpose '$purpose' (expected build, test, data, demo, bench or launchers)" >&2; exit 2 ;;
  esac
  for p in $list; do   # each package once, in first-seen order
    case " $packages " in *" $p "*) ;; *) packages="${packages:+$packages }$p" ;; esac
  done
done

if [ "$mode" = list ]; then echo "$packages"; exit 0; fi

what=$targets
if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "tools/deps.sh: not a Debian system (no dpkg-query); $what expects these Debian packages or their equivalents: $packages" >&2
  exit 0
fi

missing=""
for p in $packages; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing="${missing:+$missing }$p"
done
[ -n "$missing" ] || exit 0

uid=${MGPU_DEPS_UID:-$(id -u)}
if [ "$uid" != 0 ]; then
  echo "tools/deps.sh: $what needs Debian packages that are not installed: $missing" >&2
  echo "Install them (then run $what again) with:" >&2
  echo "sudo apt-get update && sudo apt-get install -y $missing"
  [ "$mode" = dry-run ] && exit 0
  exit 1
fi

if [ "$mode" = dry-run ]; then
  echo "would run: apt-get update"
  echo "would run: apt-get install -y $missing"
  exit 0
fi
echo "tools/deps.sh: installing for $what: $missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || { echo "tools/deps.sh: apt-get update failed (network or sources.list?)" >&2; exit 1; }
# shellcheck disable=SC2086
apt-get install -y -qq $missing || { echo "tools/deps.sh: apt-get install -y $missing failed" >&2; exit 1; }
echo "tools/deps.sh: installed $missing"
