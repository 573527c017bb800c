#!/usr/bin/env bash
# Fills data/fashion-mnist/ (under the repository root) with the four Fashion-MNIST IDX files,
# decompressed, from Debian's package dataset-fashion-mnist. Run by `make data` and `make demo`.
# Idempotent and quiet when there is nothing to do.
#
# Overrides (for tests): MGPU_SETUP_SRC   where the package's files are
#                        MGPU_SETUP_DEST  where to put them
#                        MGPU_SETUP_UID   pretend to run as this user id
set -euo pipefail
cd "$(dirname "$0")/.."

SRC=${MGPU_SETUP_SRC:-/usr/share/datasets/fashion-mnist}
DEST=${MGPU_SETUP_DEST:-data/fashion-mnist}
USER_ID=${MGPU_SETUP_UID:-$(id -u)}
FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"
PACKAGES=$(sh tools/deps.sh --list data)   # the one list of packages: tools/deps.sh

say() { echo "setup_data: $*"; }
die() { echo "setup_data: error: $*" >&2; exit 1; }

all_present() { # dir: every file there, non-empty
  local f
  for f in $FILES; do [ -s "$1/$f" ] || return 1; done
}
source_complete() { # every file in SRC, gzip or plain
  local f
  for f in $FILES; do [ -s "$SRC/$f.gz" ] || [ -s "$SRC/$f" ] || return 1; done
}

all_present "$DEST" && exit 0

if ! source_complete; then
  if [ "$USER_ID" != 0 ]; then
    echo "setup_data: Fashion-MNIST is not installed (looked in $SRC). Install it with:" >&2
    echo "    sudo apt-get install $PACKAGES" >&2
    echo "then run \`make data\` again." >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # refresh the package lists only when apt does not know the package yet
  if ! apt-cache show dataset-fashion-mnist >/dev/null 2>&1; then
    say "apt-get update"
    apt-get update -qq || die "apt-get update failed"
  fi
  say "apt-get install -y $PACKAGES"
  # shellcheck disable=SC2086
  apt-get install -y -qq $PACKAGES >/dev/null || die "apt-get install -y $PACKAGES failed"
  source_complete || die "dataset-fashion-mnist is installed but $SRC does not hold the four files"
fi

mkdir -p "$DEST"
tmp=""
trap '[ -n "$tmp" ] && rm -f "$tmp"' EXIT
for f in $FILES; do
  [ -s "$DEST/$f" ] && continue
  tmp=$(mktemp "$DEST/.$f.tmp.XXXXXX")
  if [ -s "$SRC/$f.gz" ]; then
    gzip -dc "$SRC/$f.gz" > "$tmp" || die "cannot decompress $SRC/$f.gz"
  else
    cat "$SRC/$f" > "$tmp" || die "cannot copy $SRC/$f"
  fi
  # an IDX file starts with two zero bytes and the u8 type code 0x08
  magic=$(head -c 3 "$tmp" | od -An -tx1 | tr -d ' \n')
  [ "$magic" = "000008" ] || die "$SRC/$f(.gz) is not an IDX u8 file (starts with $magic)"
  chmod 644 "$tmp"
  mv -f "$tmp" "$DEST/$f"   # rename within one directory: atomic
  tmp=""
  say "wrote $DEST/$f ($(wc -c < "$DEST/$f") bytes)"
done
