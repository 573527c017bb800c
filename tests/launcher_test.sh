#!/usr/bin/env bash
# tools/mgpurun: the torchrun environment of each worker, failure handling (the others stopped, the
# failing rank named, exit code passed on), restarts, signals (SIGINT forwarded, SIGKILL leaves no
# orphan), per-rank logs, flag validation and --nproc-per-node auto. A few seconds in all.
source "$(dirname "$0")/lib.sh"

L=${MGPURUN:-build/mgpurun}   # MGPURUN: test another build of the launcher
[ -x "$L" ] || make --no-print-directory "$L" >/dev/null || { fail "cannot build $L"; finish; exit; }
W=$T_TMP/launcher_worker
${CC:-cc} -O1 -std=c11 -o "$W" tests/fixtures/launcher_worker.c || { fail "cannot build the fixture worker"; finish; exit; }
unset CUDA_VISIBLE_DEVICES MGPU_NUM_THREADS RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT

# Every process started with a marker argument is findable (pgrep -f) and is killed by pid at exit.
MARK=mgpurun-test-$$
procs() { pgrep -f -- "$MARK-$1" | wc -l; }
cleanup() { local p; for p in $(pgrep -f -- "$MARK"); do kill -9 "$p" 2>/dev/null; done; rm -rf "$T_TMP"; }
trap cleanup EXIT
# wait_until SECONDS COMMAND...: polls every 0.1 s; fails when time runs out
wait_until() {
  local end=$((SECONDS + $1)); shift
  until "$@"; do [ $SECONDS -ge "$end" ] && return 1; sleep 0.1; done
}
no_procs() { [ "$(procs "$1")" -eq 0 ]; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b - a}'; }
# run NAME ARGS...: mgpurun under a timeout; stdout, stderr, exit code in $OUT, $ERR, $RC
run() {
  local name=$1; shift
  timeout 30 "$L" "$@" >"$T_TMP/$name.out" 2>"$T_TMP/$name.err"; RC=$?
  OUT=$(cat "$T_TMP/$name.out"); ERR=$(cat "$T_TMP/$name.err")
}
# field VAR RANK: the value of VAR printed by the env worker of that rank
field() { grep "^\[rank $2\] RANK=" <<<"$OUT" | tr ' ' '\n' | sed -n "s/^$1=//p"; }

# --- environment ------------------------------------------------------------------------------
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
want_threads=$((cores / 2)); [ "$want_threads" -lt 1 ] && want_threads=1
run env2 --nproc-per-node 2 "$W" env
expect "2 workers exit 0" test "$RC" -eq 0
expect "RANK 0 and 1" test "$(field RANK 0)/$(field RANK 1)" = "0/1"
expect "WORLD_SIZE 2 on both" test "$(field WORLD_SIZE 0)/$(field WORLD_SIZE 1)" = "2/2"
expect "LOCAL_RANK 0 and 1, LOCAL_WORLD_SIZE 2" test "$(field LOCAL_RANK 0)/$(field LOCAL_RANK 1)/$(field LOCAL_WORLD_SIZE 1)" = "0/1/2"
expect "GROUP_RANK 0, TORCHELASTIC_RESTART_COUNT 0" test "$(field GROUP_RANK 1)/$(field TORCHELASTIC_RESTART_COUNT 0)" = "0/0"
p0=$(field MASTER_PORT 0); p1=$(field MASTER_PORT 1)
expect "MASTER_PORT identical and non-zero ($p0, $p1)" test -n "$p0" -a "$p0" = "$p1" -a "${p0:-0}" -gt 0
expect "MASTER_ADDR 127.0.0.1" test "$(field MASTER_ADDR 1)" = "127.0.0.1"
expect "MGPU_NUM_THREADS = $cores cores / 2 workers = $want_threads" test "$(field MGPU_NUM_THREADS 0)/$(field MGPU_NUM_THREADS 1)" = "$want_threads/$want_threads"
expect "worker stderr relayed to stderr with the rank prefix" grep -q '^\[rank 1\] stderr of rank 1$' <<<"$ERR"
expect "worker stderr not on stdout" bash -c "! grep -q 'stderr of rank' '$T_TMP/env2.out'"
MGPU_NUM_THREADS=7 run env7 --nproc-per-node 2 "$W" env
expect "MGPU_NUM_THREADS set by the user is kept" test "$(field MGPU_NUM_THREADS 1)" = 7
run env_node1 --nnodes=2 --node_rank=1 --nproc_per_node=2 --master_port=29555 "$W" env
expect "node 1 of 2 (underscore and = spellings): RANK 2 and 3 of 4" test "$(field RANK 2)/$(field RANK 3)/$(field WORLD_SIZE 3)" = "2/3/4"
expect "node 1 of 2: LOCAL_RANK 0 and 1, GROUP_RANK 1, MASTER_PORT 29555" test "$(field LOCAL_RANK 2)/$(field LOCAL_RANK 3)/$(field GROUP_RANK 2)/$(field MASTER_PORT 3)" = "0/1/1/29555"
run bind --standalone "$W" bindport
expect "--standalone: rank 0 can bind MASTER_ADDR:MASTER_PORT (the picked port is free)" grep -q '^\[rank 0\] bind ok$' <<<"$OUT"
run partial "$W" partial
expect "a last line without newline is still relayed with its prefix" grep -q '^\[rank 0\] no newline from rank 0$' <<<"$OUT"

# --- failures -----------------------------------------------------------------------------------
t0=$(now)
run fail3 --nproc-per-node 3 "$W" fail 1 3 "$MARK-fail3"
dt=$(elapsed "$t0")
expect "rank 1 exits 3: mgpurun exits 3" test "$RC" -eq 3
expect "rank 1 exits 3: reported as 'rank 1 exited with code 3'" grep -q 'rank 1 exited with code 3' <<<"$ERR"
expect "rank 1 exits 3: the others are stopped within 10 s ($dt s)" awk -v t="$dt" 'BEGIN{exit !(t < 10)}'
expect "rank 1 exits 3: no worker left behind" no_procs fail3

run selfkill --nproc-per-node 2 "$W" selfkill 0 0 "$MARK-selfkill"
expect "rank 0 SIGKILLed: exit 137 (128 + 9)" test "$RC" -eq 137
expect "rank 0 SIGKILLed: reported with the signal" grep -q 'rank 0 was killed by signal 9 (SIGKILL)' <<<"$ERR"
expect "rank 0 SIGKILLed: no worker left behind" no_procs selfkill

t0=$(now)
run stubborn --nproc-per-node 3 --grace-period-s 1 "$W" stubborn 2 5 "$MARK-stubborn"
dt=$(elapsed "$t0")
expect "workers ignoring SIGTERM get SIGKILL after --grace-period-s 1 ($dt s)" \
  bash -c "[ $RC -eq 5 ] && awk -v t=$dt 'BEGIN{exit !(t >= 0.9 && t < 5)}' && grep -q 'sending SIGKILL' '$T_TMP/stubborn.err'"
expect "stubborn workers: none left behind" no_procs stubborn

# --- restarts -----------------------------------------------------------------------------------
run flaky0 --nproc-per-node 2 "$W" flaky 1 4
expect "a failure without --max-restarts: exit 4" test "$RC" -eq 4
run flaky1 --nproc-per-node 2 --max-restarts 1 "$W" flaky 1 4
expect "--max-restarts 1: the restarted group succeeds (exit 0)" test "$RC" -eq 0
expect "--max-restarts 1: both ranks see TORCHELASTIC_RESTART_COUNT 1" \
  bash -c "grep -q '^\[rank 0\] rank 0 done on attempt 1$' '$T_TMP/flaky1.out' && grep -q '^\[rank 1\] rank 1 done on attempt 1$' '$T_TMP/flaky1.out'"
expect "--max-restarts 1: the restart is announced" grep -q 'restart 1 of 1' <<<"$ERR"
run always --nproc-per-node 2 --max-restarts 2 "$W" fail 1 6
expect "--max-restarts 2 with a worker that always fails: 3 attempts, then exit 6" \
  bash -c "[ $RC -eq 6 ] && [ \$(grep -c 'rank 1 starting fail' '$T_TMP/always.out') -eq 3 ]"

# --- logs ---------------------------------------------------------------------------------------
run logs --nproc-per-node 2 --log-dir "$T_TMP/logs/sub" "$W" env
expect "--log-dir: rank-0.log and rank-1.log hold each rank's stdout and stderr" \
  bash -c "grep -q '^RANK=0 ' '$T_TMP/logs/sub/rank-0.log' && grep -q '^stderr of rank 0$' '$T_TMP/logs/sub/rank-0.log' && grep -q '^RANK=1 ' '$T_TMP/logs/sub/rank-1.log'"
expect "--log-dir: nothing of the workers on the terminal" bash -c "[ ! -s '$T_TMP/logs.out' ] && ! grep -q 'rank 0\]' '$T_TMP/logs.err'"
run chatty --nproc-per-node 2 --log-dir "$T_TMP/logs" "$W" chatty 1 3
tail_lines=$(sed -n 's/^  | //p' <<<"$ERR")
expect "--log-dir failure report: exit 3, the last 20 lines of rank-1.log (line 11 to line 30)" \
  bash -c "[ $RC -eq 3 ] && [ \$(wc -l <<<'$tail_lines') -eq 20 ] && [ '$(head -n 1 <<<"$tail_lines")' = 'line 11' ] && [ '$(tail -n 1 <<<"$tail_lines")' = 'line 30' ]"

# --- signals to mgpurun -------------------------------------------------------------------------
# started directly (not under timeout) so that $! is mgpurun itself; every wait is bounded
"$L" --nproc-per-node 2 "$W" sleep "$MARK-int" >"$T_TMP/int.out" 2>"$T_TMP/int.err" &
pid=$!
started() { [ "$(grep -c 'starting sleep' "$1")" -eq 2 ]; }
if wait_until 10 started "$T_TMP/int.out"; then
  kill -INT "$pid"
  if wait_until 10 bash -c "! kill -0 $pid 2>/dev/null"; then wait "$pid"; rc=$?; else rc=timeout; fi
  expect "SIGINT to mgpurun: it exits 130 (got $rc)" test "$rc" = 130
  expect "SIGINT to mgpurun: no process left behind" wait_until 5 no_procs int
  expect "SIGINT to mgpurun: forwarding announced" grep -q 'got SIGINT' "$T_TMP/int.err"
else fail "SIGINT test: workers did not start" "$(cat "$T_TMP/int.err")"; fi

"$L" --nproc-per-node 2 "$W" sleep "$MARK-kill" >"$T_TMP/kill.out" 2>"$T_TMP/kill.err" &
pid=$!
if wait_until 10 started "$T_TMP/kill.out"; then
  expect "SIGKILL to mgpurun: 2 workers were running" test "$(procs kill)" -eq 3
  kill -KILL "$pid"; wait "$pid" 2>/dev/null
  expect "SIGKILL to mgpurun: no orphan worker (PR_SET_PDEATHSIG)" wait_until 5 no_procs kill
else fail "SIGKILL test: workers did not start" "$(cat "$T_TMP/kill.err")"; fi

# --- flags --------------------------------------------------------------------------------------
bad() { # NAME FLAG-TO-NAME ARGS...
  local name=$1 flag=$2; shift 2
  run bad "$@"
  expect "$name: exit 2 naming $flag" bash -c "[ $RC -eq 2 ] && grep -q -- '$flag' '$T_TMP/bad.err'"
}
bad "unknown flag" --bogus --bogus "$W" env
bad "bad number" --nproc-per-node --nproc-per-node two "$W" env
bad "negative restarts" --max-restarts --max-restarts -1 "$W" env
bad "node rank >= nnodes" --node-rank --nnodes 2 --node-rank 2 "$W" env
bad "flag without value" --log-dir --log-dir
bad "missing program" PROGRAM --nproc-per-node 2
bad "program not found" "$T_TMP/no-such-program" "$T_TMP/no-such-program"
bad "free port across nodes" --master-port --nnodes 2 --master-port 0 "$W" env
run help --help
expect "--help: exit 0 and lists --nproc-per-node and --max-restarts" \
  bash -c "[ $RC -eq 0 ] && grep -q -- --nproc-per-node '$T_TMP/help.out' && grep -q -- --max-restarts '$T_TMP/help.out'"

# --- --nproc-per-node auto ----------------------------------------------------------------------
mkdir -p "$T_TMP/nogpu" "$T_TMP/twogpus"
printf '#!/bin/sh\necho "NVIDIA-SMI has failed" >&2\nexit 9\n' > "$T_TMP/nogpu/nvidia-smi"
printf '#!/bin/sh\necho "GPU 0: NVIDIA H100 (UUID: GPU-a)"\necho "GPU 1: NVIDIA H100 (UUID: GPU-b)"\n' > "$T_TMP/twogpus/nvidia-smi"
chmod +x "$T_TMP/nogpu/nvidia-smi" "$T_TMP/twogpus/nvidia-smi"
PATH="$T_TMP/nogpu:$PATH" run auto0 --nproc-per-node auto "$W" env
expect "auto without a GPU: 1 worker" test "$(grep -c 'RANK=' <<<"$OUT")/$(field WORLD_SIZE 0)" = "1/1"
expect "auto without a GPU: a note says so" grep -q 'no GPU visible' <<<"$ERR"
PATH="$T_TMP/twogpus:$PATH" run auto2 --nproc-per-node auto "$W" env
expect "auto with 2 GPUs in nvidia-smi -L: 2 workers" test "$(field WORLD_SIZE 1)" = 2
CUDA_VISIBLE_DEVICES=0,1,2 PATH="$T_TMP/nogpu:$PATH" run auto3 --nproc-per-node auto "$W" env
expect "auto with CUDA_VISIBLE_DEVICES=0,1,2: 3 workers" test "$(field WORLD_SIZE 2)" = 3
finish
