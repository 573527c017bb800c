#!/usr/bin/env bash
# tools/mgpurun: the torchrun environment of each worker, failure handling (the others stopped, the
# failing rank named, exit code passed on), restarts, signals (SIGINT forwarded, SIGKILL leaves no
# orphan), per-rank logs, flag validation and --nproc-per-node auto; then the launchers users
# already have: torchrun's rendezvous flags, mpirun (Open MPI), the SLURM scripts in
# examples/slurm/ (lint, and two run against stand-ins for srun/scontrol), and
# mgpurun --interactive driven through a pseudo-terminal. About a minute in all.
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
started() { [ "$(grep -c 'starting sleep' "$1" 2>/dev/null)" = 2 ]; }   # the file may not exist yet
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

# --- torchrun's rendezvous flags (a static job) -------------------------------------------------
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
run rdzv --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$port" --rdzv-id job7 --nnodes 1:1 --nproc-per-node 2 --no-python "$W" env
expect "--rdzv-endpoint 127.0.0.1:$port: both ranks get MASTER_ADDR/MASTER_PORT from it" \
  test "$(field MASTER_ADDR 0)/$(field MASTER_PORT 0)/$(field MASTER_PORT 1)" = "127.0.0.1/$port/$port"
expect "--rdzv-id job7: TORCHELASTIC_RUN_ID=job7 (--nnodes 1:1 and --no-python accepted)" test "$(field TORCHELASTIC_RUN_ID 1)" = job7
run rdzv_us --rdzv_backend=static --rdzv_endpoint=localhost --nproc_per_node=1 "$W" env
expect "underscore spellings; an endpoint without a port uses torchrun's 29400" \
  test "$RC/$(field MASTER_ADDR 0)/$(field MASTER_PORT 0)/$(field TORCHELASTIC_RUN_ID 0)" = "0/localhost/29400/none"
run rdzv6 --rdzv-endpoint '[::1]:29411' "$W" env
expect "--rdzv-endpoint [::1]:29411: IPv6 in brackets" test "$(field MASTER_ADDR 0)/$(field MASTER_PORT 0)" = "::1/29411"
bad "elastic --nnodes 1:2" elastic --nnodes 1:2 "$W" env
bad "--rdzv-backend etcd" --rdzv-backend --rdzv-backend etcd "$W" env
bad "--nnodes 2 with a rendezvous but no --node-rank" --node-rank --nnodes 2 --rdzv-endpoint "127.0.0.1:$port" "$W" env
bad "--rdzv-endpoint with --master-port" --rdzv-endpoint --master-port 1234 --rdzv-endpoint "127.0.0.1:$port" "$W" env

# --- the same training through mgpurun's flags, torchrun's flags and mpirun ---------------------
# 2 processes x 64 samples, 30 steps: the plain mgpurun run is the reference; the --rdzv run and
# the mpirun run must end with identical weights, and all of them like one process at 128.
DATA=$(fashion_dir) || DATA=""
TRAIN=(--data "$DATA" --epochs 1 --max-steps 30 --seed 3 --log-every 0)
same() { # NAME A B TOL
  local out
  out=$(/usr/bin/python3 tests/compare_models.py "$T_TMP/$2/model.safetensors" "$T_TMP/$3/model.safetensors" "$4" 2>&1)
  if [ $? -eq 0 ]; then ok "$1: $out"; else fail "$1: $out" "$(tail -n 5 "$T_TMP/$3.log" 2>/dev/null)"; fi
}
train_ok() { # NAME: exit status and a model written
  expect "$1: trained (exit 0, model saved)" test -s "$T_TMP/$1/model.safetensors" || tail -n 8 "$T_TMP/$1.log"
}
if [ -z "$DATA" ] || ! /usr/bin/python3 -c "import numpy" 2>/dev/null; then
  fail "training through the launchers needs Fashion-MNIST and python3-numpy (tools/deps.sh test)"
else
  make --no-print-directory build/fashion_mlp >/dev/null || fail "cannot build build/fashion_mlp"
  MGPU_NUM_THREADS=2 timeout 300 build/fashion_mlp "${TRAIN[@]}" --batch-size 128 --save-dir "$T_TMP/one" >"$T_TMP/one.log" 2>&1
  timeout 300 "$L" --nproc-per-node 2 build/fashion_mlp "${TRAIN[@]}" --batch-size 64 --save-dir "$T_TMP/ref" >"$T_TMP/ref.log" 2>&1
  train_ok ref
  same "mgpurun 2 x 64 == 1 process x 128" one ref 1e-5
  timeout 300 "$L" --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$(free_port)" --rdzv-id t1 --nnodes 1:1 --nproc-per-node 2 \
    build/fashion_mlp "${TRAIN[@]}" --batch-size 64 --save-dir "$T_TMP/rdzv" --metrics "$T_TMP/rdzv.jsonl" >"$T_TMP/rdzv.log" 2>&1
  train_ok rdzv
  expect "--rdzv-endpoint run: DDP at world size 2 (metrics)" grep -q '"world_size":2' "$T_TMP/rdzv.jsonl"
  same "mgpurun --rdzv-endpoint 127.0.0.1:PORT == plain mgpurun, bit for bit" ref rdzv 0

  # mpirun -np 2 (Debian's openmpi-bin, installed as root through tools/deps.sh like the suite's
  # other packages); MASTER_ADDR left unset: a single-node Open MPI job defaults it to this host
  if ! command -v mpirun >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then sh tools/deps.sh launchers >"$T_TMP/deps.log" 2>&1; fi
  if ! command -v mpirun >/dev/null 2>&1; then
    skip "mpirun -np 2 == mgpurun" "no mpirun: openmpi-bin is not installed$([ "$(id -u)" = 0 ] && echo " and could not be ($(tail -n 1 "$T_TMP/deps.log"))" || echo " (not root: sudo apt-get install openmpi-bin)")"
  else
    MPI=(mpirun --oversubscribe -np 2); [ "$(id -u)" = 0 ] && MPI+=(--allow-run-as-root)
    env -u MASTER_ADDR MASTER_PORT="$(free_port)" timeout 300 "${MPI[@]}" build/fashion_mlp "${TRAIN[@]}" --batch-size 64 \
      --save-dir "$T_TMP/mpi" --metrics "$T_TMP/mpi.jsonl" >"$T_TMP/mpi.log" 2>&1
    train_ok mpi
    expect "mpirun -np 2 without MASTER_ADDR: DDP at world size 2 (metrics)" grep -q '"world_size":2' "$T_TMP/mpi.jsonl"
    same "mpirun -np 2 == mgpurun --nproc-per-node 2, bit for bit" ref mpi 0
    out=$(env -u MASTER_ADDR -u MASTER_PORT timeout 120 "${MPI[@]}" build/fashion_mlp "${TRAIN[@]}" 2>&1)
    expect "mpirun without MASTER_PORT: the error names it and how to pass it (mpirun -x)" \
      bash -c 'grep -q "MASTER_PORT is not set" <<<"$0" && grep -q "mpirun -x MASTER_PORT" <<<"$0"' "$out"
  fi
fi

# --- SLURM scripts: lint, and two run against stand-ins for srun, scontrol and the GPUs -----------
if ! command -v shellcheck >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then sh tools/deps.sh launchers >"$T_TMP/deps2.log" 2>&1; fi
for f in examples/slurm/*.sbatch; do
  expect "$f: bash -n" bash -n "$f"
  expect "$f: requests GPUs (--gres=gpu:N or --gpus-per-task)" grep -qE -- '^#SBATCH --(gres=gpu:[0-9]|gpus-per-task=[0-9])' "$f"
  if command -v shellcheck >/dev/null 2>&1; then
    out=$(shellcheck "$f" 2>&1); expect "$f: shellcheck clean" test -z "$out" || echo "$out" | head -n 20
  else skip "$f: shellcheck" "shellcheck is not installed and could not be (sudo apt-get install shellcheck)"; fi
done
expect "examples/slurm covers requeue on pre-emption with auto-resume" \
  bash -c "grep -q -- '--signal=B:USR1@' examples/slurm/requeue.sbatch && grep -q -- '--requeue' examples/slurm/requeue.sbatch && grep -q -- '--resume auto' examples/slurm/requeue.sbatch"
expect "examples/slurm covers a sweep as a job array through mgpu-sweep" \
  bash -c "grep -q -- '^#SBATCH --array=' examples/slurm/sweep_array.sbatch && grep -q 'mgpu-sweep' examples/slurm/sweep_array.sbatch"

# A job directory where build/cuda/ holds the real mgpurun and a stand-in trainer (the fixture
# worker, ignoring the trainer's flags), and stand-ins for srun (starts its command once per
# node with SLURM_NODEID set), scontrol (host names; requeue is recorded) and nvidia-smi.
JOB=$T_TMP/job; mkdir -p "$JOB/build/cuda" "$JOB/bin"
ln -s "$PWD/$L" "$JOB/build/cuda/mgpurun"
job_worker() { printf '#!/bin/sh\nexec %s %s "$@" %s\n' "$W" "$1" "$MARK-slurm" > "$JOB/build/cuda/fashion_cnn"; chmod +x "$JOB/build/cuda/fashion_cnn"; }
cat > "$JOB/bin/srun" <<'SH'
#!/bin/bash
while [ "${1#--}" != "$1" ]; do shift; done   # srun's own options
pids=(); for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc
SH
printf '#!/bin/sh\ncase "$1" in show) echo 127.0.0.1; echo 127.0.0.2 ;; requeue) echo "requeue $2" >> "%s/requeued" ;; esac\n' "$JOB" > "$JOB/bin/scontrol"
printf '#!/bin/sh\necho "GPU 0: stand-in (UUID: GPU-a)"\necho "GPU 1: stand-in (UUID: GPU-b)"\n' > "$JOB/bin/nvidia-smi"
chmod +x "$JOB/bin/"*
slurm_env=(env -u CUDA_VISIBLE_DEVICES PATH="$JOB/bin:$PATH" SLURM_JOB_ID=4242 SLURM_JOB_NODELIST=node1,node2 SLURM_NNODES=2)
job_worker env
(cd "$JOB" && timeout 60 "${slurm_env[@]}" bash "$OLDPWD/examples/slurm/multi_node.sbatch") >"$T_TMP/mn.out" 2>"$T_TMP/mn.err"; rc=$?
OUT=$(cat "$T_TMP/mn.out")
expect "multi_node.sbatch (srun + mgpurun --nnodes 2, 2 stand-in GPUs per node): exit 0, ranks 0-3 of 4 ($rc)" \
  test "$rc/$(field RANK 0)$(field RANK 1)$(field RANK 2)$(field RANK 3)/$(field WORLD_SIZE 3)" = "0/0123/4"
expect "multi_node.sbatch: every rank meets at the first node's endpoint, node 1 is GROUP_RANK 1, run id = job id" \
  test "$(field MASTER_ADDR 3):$(field MASTER_PORT 0)/$(field GROUP_RANK 2)/$(field TORCHELASTIC_RUN_ID 3)" = "127.0.0.1:29500/1/4242"
job_worker sleep
(cd "$JOB" && exec "${slurm_env[@]}" bash "$OLDPWD/examples/slurm/requeue.sbatch") >"$T_TMP/rq.out" 2>"$T_TMP/rq.err" &
pid=$!
if wait_until 20 bash -c "[ \$(cat '$JOB'/logs/4242/rank-*.log 2>/dev/null | grep -c 'starting sleep') -eq 2 ]"; then
  kill -USR1 "$pid"
  if wait_until 15 bash -c "! kill -0 $pid 2>/dev/null"; then wait "$pid"; rc=$?; else rc=timeout; fi
  expect "requeue.sbatch: SIGUSR1 (time limit near) stops the workers, requeues job 4242 and exits 0 (exit $rc)" \
    bash -c "[ '$rc' = 0 ] && grep -qx 'requeue 4242' '$JOB/requeued' && grep -q 'got SIGTERM' '$T_TMP/rq.err'"
  expect "requeue.sbatch: no worker left behind" wait_until 5 no_procs slurm
else fail "requeue.sbatch: the 2 stand-in workers did not start" "$(cat "$T_TMP/rq.out" "$T_TMP/rq.err")"; kill "$pid" 2>/dev/null; fi

# --- mgpurun --interactive, through a pseudo-terminal -------------------------------------------
dialog() { timeout 120 python3 tests/fixtures/pty_dialog.py 60 "$@"; }
if [ -z "$DATA" ]; then fail "--interactive training needs Fashion-MNIST"
elif [ "$cores" -lt 2 ]; then skip "--interactive DDP on 2 CPU processes" "this machine has $cores core (2 needed)"
else
  # a CPU machine (nvidia-smi fails): says so, offers CPU processes; a bad mode and a bad count are
  # asked again; the LR scaling shows the value; the command printed is run, and trains exactly as
  # the same command typed by hand
  PATH="$T_TMP/nogpu:$PATH" dialog 'mode\?' x 'not a mode[^\n]*\n[^\n]*mode\?' 1 'how many' 0 'not a number[^\n]*\n[^\n]*how many' 2 \
    'scale the learning rate' y 'run it' y -- "$L" --interactive -- build/fashion_mlp "${TRAIN[@]}" --batch-size 64 --save-dir "$T_TMP/ia" \
    >"$T_TMP/ia.log" 2>&1; rc=$?
  expect "--interactive on a CPU machine: says no GPU is visible and offers CPU processes" \
    bash -c "grep -q 'no GPU visible' '$T_TMP/ia.log' && grep -q 'how many CPU processes' '$T_TMP/ia.log'"
  expect "--interactive: an invalid mode and an invalid count are asked again" \
    bash -c "grep -q \"'x' is not a mode\" '$T_TMP/ia.log' && grep -q \"'0' is not a number\" '$T_TMP/ia.log'"
  expect "--interactive: the LR question shows the scaled value (--lr 0.001 -> 0.002)" grep -q -- '--lr 0.001 -> 0.002' "$T_TMP/ia.log"
  expect "--interactive: prints the exact command (mgpurun --nproc-per-node 2 ... --multi-gpu ddp --lr 0.002)" \
    grep -q -- "^command: $L --nproc-per-node 2 build/fashion_mlp .* --multi-gpu ddp --lr 0.002" "$T_TMP/ia.log" || tail -n 5 "$T_TMP/ia.log"
  train_ok ia
  timeout 300 "$L" --nproc-per-node 2 build/fashion_mlp "${TRAIN[@]}" --batch-size 64 --multi-gpu ddp --lr 0.002 --save-dir "$T_TMP/byhand" >"$T_TMP/byhand.log" 2>&1
  same "--interactive's run == the printed command run by hand, bit for bit" byhand ia 0
fi
# a machine with 2 GPUs (stand-in nvidia-smi): DP over both, LR kept, the command declined
PATH="$T_TMP/twogpus:$PATH" dialog 'mode\?' dp 'how many' '' 'scale the learning rate' n 'run it' n -- \
  "$L" --interactive -- build/fashion_cnn --data data --lr 0.01 --gpu_ids=3 >"$T_TMP/ib.log" 2>&1; rc=$?
expect "--interactive with 2 GPUs: DP by name, the default count (2), declined: exit 0, nothing started" \
  bash -c "[ $rc -eq 0 ] && grep -q 'found 2 GPUs' '$T_TMP/ib.log' && grep -q '^not started' '$T_TMP/ib.log'"
expect "--interactive DP command: the user's --gpu_ids replaced by --gpu-ids 0,1, --lr 0.01 kept" \
  grep -qx -- "command: build/fashion_cnn --data data --lr 0.01 --multi-gpu dp --gpu-ids 0,1.\?" "$T_TMP/ib.log" || grep command "$T_TMP/ib.log"
out=$(timeout 10 "$L" --interactive -- "$W" env </dev/null 2>&1); rc=$?
expect "--interactive at end of input: exit 2, nothing started" bash -c "[ $rc -eq 2 ] && grep -q 'nothing started' <<<\"\$0\"" "$out"
bad "--interactive with --nproc-per-node" --interactive --interactive --nproc-per-node 2 "$W" env
finish
