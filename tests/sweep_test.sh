#!/usr/bin/env bash
# tools/mgpu-sweep on CPU slots with a stand-in experiment (tests/fixtures/sweep_experiment.sh):
# a 24-run grid recorded exactly once per point, failures (exit code, SIGKILL) recorded with their
# log tails while the rest finish, retries, resume after the sweep is SIGKILLed, a grown grid, the
# lock against a second sweep, SIGINT (no orphans, runs "interrupted" and rerun), bad input, the
# summary table, and a real two-run grid of build/label_noise. About 15 s.
source "$(dirname "$0")/lib.sh"

S=${MGPU_SWEEP:-build/mgpu-sweep}   # MGPU_SWEEP: test another build
[ -x "$S" ] || make --no-print-directory "$S" >/dev/null || { fail "cannot build $S"; finish; exit; }
FX=tests/fixtures/sweep_experiment.sh
unset CUDA_VISIBLE_DEVICES MGPU_NUM_THREADS MGPU_METRICS SWEEP_FAIL SWEEP_SLEEP SWEEP_STARTS

# Every experiment gets a marker argument, so leftovers are findable (pgrep -f) and killed at exit.
MARK=mgpu-sweep-test-$$
procs() { pgrep -f -- "$MARK-$1" | wc -l; }
no_procs() { [ "$(procs "$1")" -eq 0 ]; }
cleanup() { local p; for p in $(pgrep -f -- "$MARK"); do kill -9 "$p" 2>/dev/null; done; rm -rf "$T_TMP"; }
trap cleanup EXIT
wait_until() { # SECONDS COMMAND...: polls every 0.1 s
  local end=$((SECONDS + $1)); shift
  until "$@"; do [ $SECONDS -ge "$end" ] && return 1; sleep 0.1; done
}
lines() { [ -f "$1" ] && wc -l < "$1" || echo 0; }
# json_check FILE PYTHON-EXPR: every line is a JSON object (r: the records) and EXPR holds
json_check() {
  python3 - "$1" "$2" <<'EOF'
import json, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
assert all(isinstance(r, dict) and r["run_id"] and isinstance(r["params"], dict) for r in rs), "not records"
ok = eval(sys.argv[2], {"r": rs, "ids": [x["run_id"] for x in rs], "by": {x["run_id"]: x for x in rs}})
sys.exit(0 if ok else 1)
EOF
}
export -f json_check
# points FILE: "x/y" of every record, as the experiment logs its starts
points() { python3 -c 'import json, sys; [print("%d/%d" % (r["params"]["x"], r["params"]["y"])) for r in map(json.loads, open(sys.argv[1]))]' "$1"; }
# sweep NAME ARGS...: mgpu-sweep under a timeout; exit code in $RC, stderr in $T_TMP/NAME.err
sweep() {
  local name=$1; shift
  timeout 60 "$S" "$@" >"$T_TMP/$name.out" 2>"$T_TMP/$name.err"; RC=$?
}
GRID24=(--grid x=0..5 --grid y=0..3)

# --- a 24-run grid on 2 CPU slots ---------------------------------------------------------------
R=$T_TMP/g24/runs.jsonl
SWEEP_STARTS=$T_TMP/g24.starts sweep g24 "${GRID24[@]}" --cpu-slots 2 --results "$R" -- sh "$FX" {x} {y} {metrics} "$MARK-g24"
expect "24 runs: exit 0" test "$RC" -eq 0
expect "24 runs: 24 result lines, 24 starts" test "$(lines "$R")/$(lines "$T_TMP/g24.starts")" = "24/24"
expect "24 runs: every line a JSON record, each grid point exactly once, all ok" \
  json_check "$R" 'sorted(ids) == sorted("x=%d,y=%d" % (a, b) for a in range(6) for b in range(4)) and all(x["status"] == "ok" for x in r)'
expect "24 runs: params as numbers, the final metrics line embedded" \
  json_check "$R" 'by["x=3,y=2"]["params"] == {"x": 3, "y": 2} and by["x=3,y=2"]["final"] == {"event": "final", "step": 5, "test_accuracy": 0.32}'
expect "24 runs: both slots used, wall time and start time recorded" \
  json_check "$R" 'set(x["slot"] for x in r) == {0, 1} and all(x["wall_s"] > 0 and x["started_at"].endswith("Z") for x in r)'
log=$T_TMP/g24/runs.d/x=3,y=2.log
expect "a log per run next to the results (runs.d/<run id>.log)" test -f "$log"
expect "run environment: empty CUDA_VISIBLE_DEVICES on a CPU slot, MGPU_SWEEP_RUN_ID, MGPU_METRICS = {metrics}, MGPU_NUM_THREADS" \
  grep -q "cvd=\[\] run=x=3,y=2 metrics=$T_TMP/g24/runs.d/x=3,y=2.metrics.jsonl threads=[1-9]" "$log"
expect "one progress line per finished run when not on a terminal (done/failed/running/left, runs/h, ETA)" \
  bash -c "[ \$(grep -c 'done, 0 failed, .* running, .* left | .* runs/h | ETA' '$T_TMP/g24.err') -eq 24 ]"
SWEEP_STARTS=$T_TMP/g24b.starts sweep g24b "${GRID24[@]}" --cpu-slots 2 --results "$R" -- sh "$FX" {x} {y} {metrics} "$MARK-g24"
expect "run again: nothing runs, nothing is added, exit 0" test "$RC/$(lines "$T_TMP/g24b.starts")/$(lines "$R")" = "0/0/24"
SWEEP_STARTS=$T_TMP/g24c.starts sweep g24c --grid x=0..6 --grid y=0..3 --cpu-slots 2 --results "$R" -- sh "$FX" {x} {y} {metrics} "$MARK-g24"
expect "a grown grid (x=0..6): only the 4 new points run" \
  bash -c "[ $RC -eq 0 ] && [ \"\$(sort '$T_TMP/g24c.starts' | tr '\n' ' ')\" = '6/0 6/1 6/2 6/3 ' ] && [ \$(wc -l < '$R') -eq 28 ]"

# --- failures: an exit code, a SIGKILL; the others finish; retries ------------------------------
R=$T_TMP/fail.jsonl
SWEEP_FAIL="1/0=exit3 2/1=kill9" sweep fail --grid x=0..2 --grid y=0..1 --cpu-slots 2 --results "$R" -- sh "$FX" {x} {y} {metrics} "$MARK-fail"
expect "failures: exit 1, 6 records, 4 ok" \
  bash -c "[ $RC -eq 1 ] && json_check '$R' 'len(r) == 6 and sum(x[\"status\"] == \"ok\" for x in r) == 4'"
expect "exit 3 recorded: status failed, exit_code 3, no signal, the error in words" \
  json_check "$R" 'by["x=1,y=0"]["status"] == "failed" and by["x=1,y=0"]["exit_code"] == 3 and by["x=1,y=0"]["signal"] is None and by["x=1,y=0"]["error"] == "exited with code 3"'
expect "exit 3 recorded with the last 20 lines of its log (a byte that is not UTF-8 as ?)" \
  json_check "$R" 'by["x=1,y=0"]["log_tail"].split("\n") == ["line %d of 1/0" % i for i in range(5, 23)] + ["not UTF-8: ?", "failing with code 3"]'
expect "SIGKILL recorded: exit_code null, signal SIGKILL, log tail" \
  json_check "$R" 'by["x=2,y=1"]["exit_code"] is None and by["x=2,y=1"]["signal"] == "SIGKILL" and by["x=2,y=1"]["log_tail"].endswith("killing myself")'
expect "a failure is announced with its log path" grep -q 'FAILED x=1,y=0: exited with code 3 after .* log .*x=1,y=0.log' "$T_TMP/fail.err"
SWEEP_STARTS=$T_TMP/fail2.starts sweep fail2 --grid x=0..2 --grid y=0..1 --cpu-slots 2 --results "$R" -- sh "$FX" {x} {y} {metrics} "$MARK-fail"
expect "resume: recorded failures are finished runs (skipped), still exit 1" test "$RC/$(lines "$T_TMP/fail2.starts")" = "1/0"
SWEEP_STARTS=$T_TMP/fail3.starts sweep fail3 --grid x=0..2 --grid y=0..1 --cpu-slots 2 --rerun-failed --results "$R" -- sh "$FX" {x} {y} {metrics} "$MARK-fail"
expect "--rerun-failed: the 2 failed runs run again and now pass (exit 0)" \
  bash -c "[ $RC -eq 0 ] && [ \"\$(sort '$T_TMP/fail3.starts' | tr '\n' ' ')\" = '1/0 2/1 ' ]"
R=$T_TMP/retry.jsonl
SWEEP_FAIL="0/0=exit3" SWEEP_STARTS=$T_TMP/retry.starts sweep retry --grid x=0 --grid y=0..1 --cpu-slots 1 --retries 2 --results "$R" -- sh "$FX" {x} {y} {metrics} "$MARK-retry"
expect "--retries 2: the failing run starts 3 times, one record with attempts 3" \
  bash -c "[ $RC -eq 1 ] && [ \$(grep -c '^0/0$' '$T_TMP/retry.starts') -eq 3 ] && json_check '$R' 'len(r) == 2 and by[\"x=0,y=0\"][\"attempts\"] == 3'"

# --- the sweep SIGKILLed mid-way, then resumed ------------------------------------------------
R=$T_TMP/kill.jsonl
SWEEP_SLEEP=0.3 SWEEP_STARTS=$T_TMP/kill1.starts "$S" --grid x=0..3 --grid y=0..2 --cpu-slots 2 --results "$R" -- sh "$FX" {x} {y} {metrics} "$MARK-kill" \
  >/dev/null 2>"$T_TMP/kill.err" &
pid=$!
if wait_until 20 bash -c "[ \$(wc -l < '$R' 2>/dev/null || echo 0) -ge 3 ]"; then
  kill -KILL "$pid"; wait "$pid" 2>/dev/null
  n1=$(lines "$R")
  points "$R" > "$T_TMP/kill1.recorded"
  expect "SIGKILL to the sweep: its runs die with it (no orphan)" wait_until 5 no_procs kill
  expect "SIGKILL mid-way: some runs recorded, not all ($n1 of 12)" test "$n1" -ge 3 -a "$n1" -lt 12
  SWEEP_STARTS=$T_TMP/kill2.starts sweep kill2 --grid x=0..3 --grid y=0..2 --cpu-slots 2 --results "$R" -- sh "$FX" {x} {y} {metrics} "$MARK-kill"
  expect "resume after SIGKILL: exactly the $((12 - n1)) unrecorded runs execute" \
    bash -c "[ $RC -eq 0 ] && [ \$(wc -l < '$T_TMP/kill2.starts') -eq $((12 - n1)) ] && ! grep -qxFf '$T_TMP/kill1.recorded' '$T_TMP/kill2.starts'"
  expect "resume after SIGKILL: the union is exactly the grid, each point once" \
    json_check "$R" 'sorted(ids) == sorted("x=%d,y=%d" % (a, b) for a in range(4) for b in range(3)) and all(x["status"] == "ok" for x in r)'
else fail "SIGKILL test: no run finished" "$(cat "$T_TMP/kill.err")"; kill -9 "$pid" 2>/dev/null; fi

# --- the lock; SIGINT -------------------------------------------------------------------------
R=$T_TMP/int.jsonl
SWEEP_SLEEP=30 "$S" --grid x=0..3 --grid y=0 --cpu-slots 2 --grace-period-s 2 --results "$R" -- sh "$FX" {x} {y} {metrics} "$MARK-int" \
  >/dev/null 2>"$T_TMP/int.err" &
pid=$!
if wait_until 10 bash -c "[ \$(pgrep -f -- '$MARK-int' | wc -l) -ge 2 ]"; then
  sweep lock --grid x=0..3 --grid y=0 --cpu-slots 2 --results "$R" -- sh "$FX" {x} {y} {metrics} "$MARK-lock"
  expect "a second sweep on the same results file is refused (exit 1), naming the holder" \
    bash -c "[ $RC -eq 1 ] && grep -q 'another sweep (pid $pid) is writing' '$T_TMP/lock.err'"
  expect "the refused sweep started nothing" no_procs lock
  kill -INT "$pid"
  if wait_until 10 bash -c "! kill -0 $pid 2>/dev/null"; then wait "$pid"; rc=$?; else rc=timeout; fi
  expect "SIGINT: the sweep exits 130 (got $rc)" test "$rc" = 130
  expect "SIGINT: no process left behind" wait_until 5 no_procs int
  expect "SIGINT: the 2 runs in flight recorded as interrupted (not failed)" \
    json_check "$R" 'len(r) == 2 and all(x["status"] == "interrupted" and x["error"] == "stopped by SIGINT to the sweep" for x in r)'
  SWEEP_STARTS=$T_TMP/int2.starts sweep int2 --grid x=0..3 --grid y=0 --cpu-slots 2 --results "$R" -- sh "$FX" {x} {y} {metrics} "$MARK-int"
  expect "resume after SIGINT: the interrupted and the unstarted runs all run (4), then all are ok" \
    bash -c "[ $RC -eq 0 ] && [ \$(wc -l < '$T_TMP/int2.starts') -eq 4 ] && json_check '$R' 'len(r) == 6 and sorted(ids[2:]) == [\"x=%d,y=0\" % a for a in range(4)]'"
else fail "SIGINT test: runs did not start" "$(cat "$T_TMP/int.err")"; kill -9 "$pid" 2>/dev/null; fi

# --- bad input: clear errors, nothing runs ----------------------------------------------------
bad() { # NAME EXPECTED-RC TEXT ARGS...
  local name=$1 want=$2 text=$3; shift 3
  SWEEP_STARTS=$T_TMP/bad.starts sweep bad "$@"
  expect "$name: exit $want, message names '$text', nothing ran" \
    bash -c "[ $RC -eq $want ] && grep -qF -- '$text' '$T_TMP/bad.err' && [ ! -s '$T_TMP/bad.starts' ]"
}
B=$T_TMP/bad.jsonl
bad "unknown key in the template" 2 "{z}" --grid x=0..1 --cpu-slots 1 --results "$B" -- sh "$FX" {x} {z} {metrics}
bad "--grid without =" 2 "'seed'" --grid seed --cpu-slots 1 --results "$B" -- sh "$FX" {seed} 0 {metrics}
bad "--grid with a bad range" 2 "1..x" --grid seed=1..x --cpu-slots 1 --results "$B" -- sh "$FX" {seed} 0 {metrics}
bad "no grid" 2 "--grid" --cpu-slots 1 --results "$B" -- sh "$FX" 0 0 {metrics}
bad "missing command" 2 "missing COMMAND" --grid x=0 --cpu-slots 1 --results "$B" --
bad "command not found" 2 "no-such-program" --grid x=0 --cpu-slots 1 --results "$B" -- "$T_TMP/no-such-program" {x}
bad "no slots" 2 "--cpu-slots" --grid x=0 --results "$B" -- sh "$FX" {x} 0 {metrics}
bad "--gpus auto in a CPU build points to --cpu-slots" 2 "--cpu-slots N" --grid x=0 --gpus auto --results "$B" -- sh "$FX" {x} 0 {metrics}
bad "unknown flag" 2 "--bogus" --bogus 1 --grid x=0 --cpu-slots 1 --results "$B" -- sh "$FX" {x} 0 {metrics}
printf 'a file\n' > "$T_TMP/afile"
bad "unwritable results path (checked before any run)" 1 "$T_TMP/afile/runs.jsonl" --grid x=0..1 --cpu-slots 1 --results "$T_TMP/afile/runs.jsonl" -- sh "$FX" {x} 0 {metrics}
sweep dry --grid x=0..1 --grid y=a --cpu-slots 1 --dry-run --results "$T_TMP/dry.jsonl" -- sh "$FX" {x} "{y}{{z}}" {metrics}
expect "--dry-run prints each run's command ({{ is a brace) and runs nothing" \
  bash -c "[ $RC -eq 0 ] && grep -qF 'x=1,y=a: sh $FX 1 '\''a{z}'\'' $T_TMP/dry.d/x=1,y=a.metrics.jsonl' '$T_TMP/dry.out' && [ ! -e '$T_TMP/dry.jsonl' ]"
sweep help --help
expect "--help: exit 0, lists --grid, --cpu-slots and summary" \
  bash -c "[ $RC -eq 0 ] && grep -q -- --grid '$T_TMP/help.out' && grep -q -- --cpu-slots '$T_TMP/help.out' && grep -q 'summary' '$T_TMP/help.out'"

# --- summary ----------------------------------------------------------------------------------
R=$T_TMP/g24/runs.jsonl
"$S" summary "$R" --by y --metric final_test_accuracy > "$T_TMP/sum.txt" 2>&1; rc=$?
# y=2 over x=0..6: 0.02, 0.12, ..., 0.62 -> mean 0.32, sample std sqrt(sum((0.1k - 0.3)^2)/6) = 0.2160
expect "summary table: one row per y with n 7 and mean ± std (y=2: 0.32 ± 0.2160)" \
  bash -c "[ $rc -eq 0 ] && grep -qE '^2 +7 +0\.3200 ± 0\.2160 *$' '$T_TMP/sum.txt' && [ \$(wc -l < '$T_TMP/sum.txt') -eq 5 ]"
"$S" summary "$R" --by x,y --csv --metric final_test_accuracy > "$T_TMP/sum.csv"; rc=$?
expect "summary --csv: header and 28 rows" \
  bash -c "[ $rc -eq 0 ] && head -n 1 '$T_TMP/sum.csv' | grep -qx 'x,y,n,final_test_accuracy_mean,final_test_accuracy_std,final_test_accuracy_n' && [ \$(wc -l < '$T_TMP/sum.csv') -eq 29 ] && grep -qx '6,3,1,0.63,,1' '$T_TMP/sum.csv'"
"$S" summary "$R" --by y --markdown > "$T_TMP/sum.md"; rc=$?
expect "summary --markdown (default metrics: the final line's numbers)" \
  bash -c "[ $rc -eq 0 ] && head -n 2 '$T_TMP/sum.md' | tail -n 1 | grep -q '^| --- | --: |' && grep -q 'final_test_accuracy' '$T_TMP/sum.md' && grep -q 'final_step' '$T_TMP/sum.md'"
"$S" summary "$R" --by nope > /dev/null 2>"$T_TMP/sum.err"; rc=$?
expect "summary --by an unknown key: exit 2 naming it" bash -c "[ $rc -eq 2 ] && grep -q 'nope' '$T_TMP/sum.err'"

# --- a real grid: build/label_noise, its metrics through $MGPU_METRICS -------------------------
if DATA=$(fashion_dir) && make --no-print-directory build/label_noise >/dev/null; then
  R=$T_TMP/ln.jsonl
  sweep ln --grid noise=0,0.5 --cpu-slots 2 --results "$R" -- build/label_noise --data "$DATA" --label-fraction 0.05 --noise {noise} \
    --epochs 1 --max-steps 15 --batch-size 64
  expect "label_noise over 2 slots: 2 ok runs with final test accuracy from \$MGPU_METRICS" \
    bash -c "[ $RC -eq 0 ] && json_check '$R' 'len(r) == 2 and all(x[\"status\"] == \"ok\" and 0.1 < x[\"final\"][\"test_accuracy\"] <= 1 for x in r)'" \
    || tail -n 5 "$T_TMP/ln.err"
else fail "label_noise: no Fashion-MNIST or no build"; fi
finish
