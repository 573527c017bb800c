#!/usr/bin/env bash
# Runs every test program (build/tests/test_*), the sanitizer builds, the fuzzers and the
# shell tests (tests/*_test.sh); sums their "RESULT ...: N passed, M failed[, K skipped]" lines,
# prints a breakdown by kind (test cases, sanitizer cases, fuzzers, shell checks, build checks,
# skips) and ends with the total "N passed, M failed" (skips are not passes). Exits non-zero if
# anything failed.
set -u
cd "$(dirname "$0")/.."
B=build
passed=0; failed=0; skipped=0; skip_names=""
log=$B/test-logs; mkdir -p "$log"
declare -A kind_passed kind_failed kind_runs
kinds="cases asan fuzz shell build"
for k in $kinds; do kind_passed[$k]=0; kind_failed[$k]=0; kind_runs[$k]=0; done

count() { # kind, name, exit code, log file
  local kind=$1 name=$2 rc=$3 file=$4 line p f s=0
  line=$(grep -E '^RESULT .*: [0-9]+ passed, [0-9]+ failed' "$file" | tail -n 1)
  if [ -n "$line" ]; then
    p=$(sed -E 's/.*: ([0-9]+) passed, ([0-9]+) failed.*/\1/' <<<"$line")
    f=$(sed -E 's/.*: ([0-9]+) passed, ([0-9]+) failed.*/\2/' <<<"$line")
    if grep -qE ', [0-9]+ skipped' <<<"$line"; then s=$(sed -E 's/.*, ([0-9]+) skipped.*/\1/' <<<"$line"); fi
  elif [ "$rc" -eq 0 ]; then p=1; f=0; else p=0; f=1; fi
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi   # a crash after the summary still fails
  passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
  kind_passed[$kind]=$((kind_passed[$kind] + p)); kind_failed[$kind]=$((kind_failed[$kind] + f)); kind_runs[$kind]=$((kind_runs[$kind] + 1))
  [ "$s" -gt 0 ] && skip_names="$skip_names, $name ($s)"
  if [ "$f" -ne 0 ]; then echo "FAIL $name (exit $rc): see $file"; tail -n 30 "$file" | sed 's/^/    /'
  else echo "ok   $name ($p$([ "$s" -gt 0 ] && echo ", $s skipped"))"; grep -E '^  (SKIP|skip:) ' "$file" | sed 's/^/    /'; fi
}

# The suites of the CUDA emulation (tests/emu*_test.sh: mostly one busy thread each, about 8 of
# the suite's minutes) run in a second lane beside everything else, so that `make test` fits its
# budget on 2 cores; each leaves its exit status and seconds in its log directory, counted at the end.
emu_lane() {
  local t n t0
  for t in tests/emu*_test.sh; do
    n=$(basename "$t" .sh); t0=$(date +%s)
    timeout 600 bash "$t" > "$log/$n.log" 2>&1
    echo "$? $(( $(date +%s) - t0 ))" > "$log/$n.status"
  done
}
rm -f "$log"/*.status
emu_lane & emu_lane_pid=$!

for t in $B/tests/test_*; do
  [ -x "$t" ] || continue
  n=$(basename "$t")
  timeout 600 "$t" > "$log/$n.log" 2>&1; count cases "$n" $? "$log/$n.log"
done
for t in $B/asan/test_*; do
  [ -x "$t" ] || continue
  n=asan/$(basename "$t")
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    MGPU_TEST_QUICK=1 timeout 600 "$t" > "$log/asan_$(basename "$t").log" 2>&1
  count asan "$n" $? "$log/asan_$(basename "$t").log"
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
  count fuzz "fuzz/$n (20 s)" $? "$log/$n.log"
done
for t in tests/*_test.sh; do
  [ -f "$t" ] || continue
  case $t in tests/emu*_test.sh) continue ;; esac   # the second lane's
  n=$(basename "$t" .sh); t0=$(date +%s)
  timeout 600 bash "$t" > "$log/$n.log" 2>&1; rc=$?
  count shell "$n, $(( $(date +%s) - t0 )) s" $rc "$log/$n.log"
done
wait "$emu_lane_pid"
for t in tests/emu*_test.sh; do
  n=$(basename "$t" .sh)
  if read -r rc secs < "$log/$n.status" 2>/dev/null; then count shell "$n, $secs s (second lane)" "$rc" "$log/$n.log"
  else count shell "$n (second lane: no status, it did not run to the end)" 1 "$log/$n.log"; fi
done
if [ -f $B/check-cuda.rc ]; then
  rc=$(cat $B/check-cuda.rc)
  if [ "$rc" -eq 0 ] && grep -q 'CUDA compile check skipped' $B/check-cuda.log; then
    # no nvcc: nothing was compiled, so nothing passed
    skipped=$((skipped + 1)); skip_names="$skip_names, cuda-compile-and-link"
    echo "SKIP cuda-compile-and-link: $(grep -m1 'skipped' $B/check-cuda.log)"
  else
    count build "cuda-compile-and-link" "$rc" $B/check-cuda.log
    grep -E 'compiled and linked' $B/check-cuda.log | sed 's/^/    /'
  fi
fi
line() { # kind, label, unit
  [ "${kind_runs[$1]}" -gt 0 ] || return 0
  printf '%s %d passed, %d failed (%d %s); ' "$2" "${kind_passed[$1]}" "${kind_failed[$1]}" "${kind_runs[$1]}" "$3"
}
echo "breakdown: $(line cases "test cases" programs)$(line asan "test cases under ASan+UBSan" programs)$(line fuzz fuzzers targets)$(line shell "shell checks" scripts)$(line build "build checks" checks)skipped $skipped${skip_names:+ (${skip_names#, })}"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
