#!/usr/bin/env bash
# tools/mgpu-sweep on CPU slots with a stand-in experiment (tests/fixtures/sweep_experiment.sh):
# a 24-run grid recorded exactly once per point, failures (exit code, SIGKILL) recorded with their
# log tails while the rest finish, retries, resume after the sweep is SIGKILLed, a grown grid, the
# lock against a second sweep, SIGINT and SIGTERM (no orphans, runs "interrupted" and rerun), the
# progress bar on a terminal, GPU slots found without CUDA (a stand-in nvidia-smi), bad input, the
# summary table, and real grids of build/label_noise (and of build/emu/label_noise --device cuda on
# GPU slots). About 30 s.
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

# SIGTERM, what a batch scheduler sends: the same clean stop, exit 128 + 15
R=$T_TMP/term.jsonl
SWEEP_SLEEP=30 SWEEP_STARTS=$T_TMP/term.starts "$S" --grid x=0..3 --grid y=0 --cpu-slots 2 --grace-period-s 2 --results "$R" -- sh "$FX" {x} {y} {metrics} "$MARK-term" \
  >/dev/null 2>"$T_TMP/term.err" &
pid=$!
if wait_until 10 bash -c "[ \$(wc -l < '$T_TMP/term.starts' 2>/dev/null || echo 0) -ge 2 ]"; then
  kill -TERM "$pid"
  if wait_until 10 bash -c "! kill -0 $pid 2>/dev/null"; then wait "$pid"; rc=$?; else rc=timeout; fi
  expect "SIGTERM: the sweep exits 143 (got $rc)" test "$rc" = 143
  expect "SIGTERM: no process left behind" wait_until 5 no_procs term
  expect "SIGTERM: the 2 runs in flight recorded as interrupted" \
    json_check "$R" 'len(r) == 2 and all(x["status"] == "interrupted" and x["error"] == "stopped by SIGTERM to the sweep" for x in r)'
else fail "SIGTERM test: runs did not start" "$(cat "$T_TMP/term.err")"; kill -9 "$pid" 2>/dev/null; fi

# on a terminal (script(1) gives it one): one bar redrawn in place, no line per finished run
if command -v script >/dev/null; then
  SWEEP_FAIL="2/0=exit3" script -qec "$S --grid x=0..3 --grid y=0 --cpu-slots 2 --results $T_TMP/tty.jsonl -- sh $FX {x} {y} {metrics} $MARK-tty" /dev/null \
    > "$T_TMP/tty.out" 2>&1
  expect "on a terminal: a bar redrawn in place ([####] done/failed/running/left, runs/h, ETA), a line only for the failure" \
    bash -c "grep -aq \$'\\r\\\\[####################\\\\] 4/4 done, 1 failed, 0 running, 0 left | [0-9.]* runs/h | ETA' '$T_TMP/tty.out' \
      && grep -aq 'FAILED x=2,y=0: exited with code 3' '$T_TMP/tty.out' && ! grep -aq 'mgpu-sweep: ok ' '$T_TMP/tty.out'" || cat -v "$T_TMP/tty.out"
else skip "progress bar on a terminal" "no script(1) to give the sweep a terminal"; fi

# --- GPU slots in the CPU build: GPUs found without CUDA ----------------------------------------
# A stand-in nvidia-smi first in PATH lists 2 GPUs; --slots-per-gpu 2 gives 4 slots. Each run logs
# its CUDA_VISIBLE_DEVICES and how many runs share that device as it starts (the fixture's
# $SWEEP_ACTIVE), so at most 2 per GPU, one device per run and the records' "devices" are checked.
mkdir -p "$T_TMP/bin" "$T_TMP/active"
printf '%s\n' '#!/bin/sh' 'case "$*" in' \
  "  *--query-gpu=index,name,memory.total*) printf '0, Stand-in GPU, 81559 MiB\\n1, Stand-in GPU, 81559 MiB\\n';;" \
  "  -L) printf 'GPU 0: Stand-in GPU (UUID: GPU-0)\\nGPU 1: Stand-in GPU (UUID: GPU-1)\\n';;" \
  '  *) exit 9;;' 'esac' > "$T_TMP/bin/nvidia-smi"
chmod +x "$T_TMP/bin/nvidia-smi"
R=$T_TMP/gpu.jsonl
PATH=$T_TMP/bin:$PATH SWEEP_SLEEP=0.5 SWEEP_ACTIVE=$T_TMP/active sweep gpu --grid x=0..9 --grid y=0 --gpus auto --slots-per-gpu 2 \
  --results "$R" -- sh "$FX" {x} {y} {metrics} "$MARK-gpu"
expect "--gpus auto in the CPU build: 2 GPUs from the stand-in nvidia-smi, 2 slots each, 10 runs ok" \
  bash -c "[ $RC -eq 0 ] && grep -q -- '--gpus auto: 2 GPUs from nvidia-smi --query-gpu: 0 (Stand-in GPU, 81559 MiB), 1 ' '$T_TMP/gpu.err' \
    && grep -q 'to run on 4 slots' '$T_TMP/gpu.err' && json_check '$R' 'len(r) == 10 and all(x[\"status\"] == \"ok\" for x in r)'" \
  || cat "$T_TMP/gpu.err"
# gpu_check EXPR: EXPR holds over runs (one dict per run start from the fixture's log: point, cvd,
# order, sharing) and recs (the records by "x/y")
gpu_check() {
  python3 - "$T_TMP/active.log" "$R" "$1" <<'PY'
import json, re, sys
runs = [dict(re.findall(r"(\w+)=(\S*)", l), point=l.split()[0]) for l in open(sys.argv[1])]
recs = {"%d/%d" % (r["params"]["x"], r["params"]["y"]): r for r in map(json.loads, open(sys.argv[2]))}
ok = eval(sys.argv[3])
if not ok: print(runs)
sys.exit(0 if ok else 1)
PY
}
expect "every GPU run sees exactly one device, 0 or 1, with CUDA_DEVICE_ORDER=PCI_BUS_ID; its record names that device" \
  gpu_check 'len(runs) == 10 and all(r["cvd"] in ("0", "1") and r["order"] == "PCI_BUS_ID" and recs[r["point"]]["devices"] == r["cvd"] for r in runs) and {r["cvd"] for r in runs} == {"0", "1"}'
expect "--slots-per-gpu 2: never more than 2 runs at once on a GPU, and 2 at once on each" \
  gpu_check 'all(int(r["sharing"]) <= 2 for r in runs) and all(max(int(r["sharing"]) for r in runs if r["cvd"] == g) == 2 for g in ("0", "1"))'
R=$T_TMP/gpulist.jsonl
CUDA_VISIBLE_DEVICES=4,6,7 sweep gpulist --grid x=0..5 --grid y=0 --gpus 0,2 --results "$R" -- sh "$FX" {x} {y} {metrics} "$MARK-gpu"
expect "--gpus 0,2 within CUDA_VISIBLE_DEVICES=4,6,7: runs on devices 4 and 7" \
  bash -c "[ $RC -eq 0 ] && json_check '$R' 'len(r) == 6 and {x[\"devices\"] for x in r} == {\"4\", \"7\"}'"
R=$T_TMP/gpucvd.jsonl
CUDA_VISIBLE_DEVICES=3 PATH=$T_TMP/bin:$PATH sweep gpucvd --grid x=0..1 --grid y=0 --gpus auto --results "$R" -- sh "$FX" {x} {y} {metrics} "$MARK-gpu"
expect "--gpus auto honours the sweep's CUDA_VISIBLE_DEVICES=3 before nvidia-smi" \
  bash -c "[ $RC -eq 0 ] && json_check '$R' 'len(r) == 2 and {x[\"devices\"] for x in r} == {\"3\"}'"
R=$T_TMP/gpunone.jsonl
CUDA_VISIBLE_DEVICES= sweep gpunone --grid x=0..1 --grid y=0 --gpus auto --cpu-slots 1 --results "$R" -- sh "$FX" {x} {y} {metrics} "$MARK-gpu"
expect "--gpus auto finding no GPU but with --cpu-slots: says so and runs on the CPU slot" \
  bash -c "[ $RC -eq 0 ] && grep -q 'no GPU found (CUDA_VISIBLE_DEVICES is set but empty); running on the 1 CPU slot only' '$T_TMP/gpunone.err' && json_check '$R' 'len(r) == 2 and {x[\"devices\"] for x in r} == {\"\"}'"
# (where the NVIDIA driver is loaded, /proc/driver/nvidia/gpus would list the real GPUs next)
if [ -d /proc/driver/nvidia/gpus ]; then skip "--gpus auto with no GPU" "this machine has /proc/driver/nvidia/gpus"; else
mkdir -p "$T_TMP/nogpu"; printf '#!/bin/sh\necho "No devices were found"; exit 6\n' > "$T_TMP/nogpu/nvidia-smi"; chmod +x "$T_TMP/nogpu/nvidia-smi"
PATH=$T_TMP/nogpu:$PATH SWEEP_STARTS=$T_TMP/gpufail.starts sweep gpufail --grid x=0..1 --grid y=0 --gpus auto --results "$T_TMP/gpufail.jsonl" -- sh "$FX" {x} {y} {metrics}
expect "--gpus auto with no GPU and no --cpu-slots: exit 2, nvidia-smi's answer and --cpu-slots named, nothing ran" \
  bash -c "[ $RC -eq 2 ] && grep -q 'nvidia-smi: exited with code 6: No devices were found' '$T_TMP/gpufail.err' && grep -q -- '--cpu-slots N' '$T_TMP/gpufail.err' && [ ! -s '$T_TMP/gpufail.starts' ]" \
  || cat "$T_TMP/gpufail.err"
fi

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
CUDA_VISIBLE_DEVICES= bad "--gpus auto without a GPU points to --cpu-slots" 2 "--cpu-slots N" --grid x=0 --gpus auto --results "$B" -- sh "$FX" {x} 0 {metrics}
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

# --- the CUDA build on GPU slots, under the emulation: build/emu/mgpu-sweep finds the stand-in's 2
# GPUs and runs build/emu/label_noise --device cuda once on each (MGPU_EMU_DEVICES=2). The
# emulation does not hide devices outside CUDA_VISIBLE_DEVICES: this is the plumbing, not isolation.
E=build/emu
if [ -x $E/mgpu-sweep ] && [ -x $E/label_noise ] && DATA=$(fashion_dir); then
  python3 tests/fashion_subset.py "$DATA" "$T_TMP/fm" 1024 256
  mkdir -p "$T_TMP/bin2"
  printf '%s\n' '#!/bin/sh' "printf '0, Stand-in GPU, 8192 MiB\\n1, Stand-in GPU, 8192 MiB\\n'" > "$T_TMP/bin2/nvidia-smi"
  chmod +x "$T_TMP/bin2/nvidia-smi"
  R=$T_TMP/emu.jsonl
  PATH=$T_TMP/bin2:$PATH MGPU_EMU_DEVICES=2 MGPU_EMU_ERRORS=report sweep emu --grid seed=0,1 --gpus auto --results "$R" -- \
    $E/label_noise --device cuda --data "$T_TMP/fm" --label-fraction 0.5 --noise 0.2 --seed {seed} --epochs 1 --max-steps 5 --batch-size 32
  expect "emulated CUDA build: 2 GPUs found, label_noise --device cuda ok on each (devices 0 and 1), final metrics recorded" \
    bash -c "[ $RC -eq 0 ] && json_check '$R' 'len(r) == 2 and {x[\"devices\"] for x in r} == {\"0\", \"1\"} and all(x[\"status\"] == \"ok\" and x[\"final\"][\"step\"] == 5 for x in r)' \
      && grep -q '^device cuda:0 (mgpu CPU emulation' '$T_TMP/emu.d/seed=1.log'" || tail -n 5 "$T_TMP/emu.err" "$T_TMP/emu.d/seed=1.log"
else fail "emulated CUDA build on GPU slots: needs build/emu/mgpu-sweep, build/emu/label_noise (make emu) and Fashion-MNIST"; fi
finish
