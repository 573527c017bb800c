#!/bin/sh
# Assembles mgpu.h from the parts under src/, concatenated in file-name order (the story order:
# 0x public API, 1x core, 2x ops, ... 9x trainer). Edit the parts, never mgpu.h itself.
#   tools/amalgamate.sh            write mgpu.h (only when it changed, so make stays quiet)
#   tools/amalgamate.sh --check    exit 1 naming the first part mgpu.h disagrees with
# POSIX sh + coreutils only: CI and users' machines have nothing more to offer.
set -eu
cd "$(dirname "$0")/.."
parts=$(LC_ALL=C ls src/[0-9]*.[ch])
[ -n "$parts" ] || { echo "amalgamate: no parts under src/" >&2; exit 1; }

if [ "${1:-}" = "--check" ]; then
    # Walk the parts and compare each with its slice of the committed header, so the message
    # names the part whose edit was not assembled (or the header edited by hand).
    offset=0
    for p in $parts; do
        size=$(wc -c < "$p")
        if ! tail -c +$((offset + 1)) mgpu.h | head -c "$size" | cmp -s - "$p"; then
            echo "mgpu.h is stale: it differs from $p (edit src/, then run 'make' or tools/amalgamate.sh and commit mgpu.h)" >&2
            exit 1
        fi
        offset=$((offset + size))
    done
    if [ "$(wc -c < mgpu.h)" -ne "$offset" ]; then
        echo "mgpu.h is stale: it has $(( $(wc -c < mgpu.h) - offset )) bytes after the last part (edit src/, then run tools/amalgamate.sh)" >&2
        exit 1
    fi
    exit 0
fi

tmp=mgpu.h.tmp.$$
trap 'rm -f "$tmp"' EXIT
# shellcheck disable=SC2086
cat $parts > "$tmp"
if cmp -s "$tmp" mgpu.h 2>/dev/null; then exit 0; fi
mv "$tmp" mgpu.h
echo "assembled mgpu.h from $(echo $parts | wc -w) parts under src/"
