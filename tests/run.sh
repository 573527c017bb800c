#!/usr/bin/env bash
# Runs every test program (build/tests/test_*), the sanitizer builds, the fuzzers and the
# shell tests (tests/*_test.sh); sums their "RESULT ...: N passed, M failed" lines and ends
# with the total "N passed, M failed". Exits non-zero if anything failed.
set -u
cd "$(dirname "$0")/.."
B=build
passed=0; failed=0
log=$B/test-logs; mkdir -p "$log"

count() { # name, exit code, log file
  local name=$1 rc=$2 file=$3 line p f
  line=$(grep -E '^RESULT .*: [0-9]+ passed, [0-9]+ failed' "$file" | tail -n 1)
  if [ -n "$line" ]; then
    p=$(sed -E 's/.*: ([0-9]+) passed, ([0-9]+) failed.*/\1/' <<<"$line")
    f=$(sed -E 's/.*: ([0-9]+) passed, ([0-9]+) failed.*/\2/' <<<"$line")
  elif [ "$rc" -eq 0 ]; then p=1; f=0; else p=0; f=1; fi
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi   # a crash after the summary still fails
  passed=$((passed + p)); failed=$((failed + f))
  if [ "$f" -ne 0 ]; then echo "FAIL $name (exit $rc): see $file"; tail -n 30 "$file" | sed 's/^/    /'; else echo "ok   $name ($p)"; fi
}

for t in $B/tests/test_*; do
  [ -x "$t" ] || continue
  n=$(basename "$t")
  timeout 600 "$t" > "$log/$n.log" 2>&1; count "$n" $? "$log/$n.log"
done
for t in $B/asan/test_*; do
  [ -x "$t" ] || continue
  n=asan/$(basename "$t")
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    MGPU_TEST_QUICK=1 timeout 600 "$t" > "$log/asan_$(basename "$t").log" 2>&1
  count "$n" $? "$log/asan_$(basename "$t").log"
done
for t in $B/fuzz/fuzz_*; do
  [ -x "$t" ] || continue
  n=$(basename "$t"); corpus=tests/corpus/${n#fuzz_}
  mkdir -p "$B/fuzz/work_$n"
  if [ -f "$t.libfuzzer" ]; then
    timeout 120 "$t" -max_total_time=20 -rss_limit_mb=2048 "$B/fuzz/work_$n" "$corpus" > "$log/$n.log" 2>&1
  else
    timeout 120 "$t" "$corpus"/* > "$log/$n.log" 2>&1
  fi
  count "fuzz/$n (20 s)" $? "$log/$n.log"
done
for t in tests/*_test.sh; do
  [ -f "$t" ] || continue
  n=$(basename "$t" .sh)
  timeout 600 bash "$t" > "$log/$n.log" 2>&1; count "$n" $? "$log/$n.log"
done
if [ -f $B/check-cuda.rc ]; then
  rc=$(cat $B/check-cuda.rc); count "cuda-compile-and-link" "$rc" $B/check-cuda.log
  grep -E 'compiled and linked|skipped' $B/check-cuda.log | sed 's/^/    /'
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
