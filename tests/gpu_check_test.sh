#!/usr/bin/env bash
# tools/gpu_check.sh (make gpu-check) without a GPU: no GPU is a skip that says SKIPPED and exits
# 0, MGPU_EXPECT_GPU=1 makes it a failure, and summary.txt carries its fields. Then its plumbing:
# a stand-in nvidia-smi (device and driver read into the summary), the emulation dry run of the
# DDP step (DDP over shm and NCCL at world size 1, DP with one replica, the DDP overhead; exit status non-zero exactly when a check failed, every failure with a reason, what
# comes back in OUT fits the device tool's limits), and the same step with the CPU programs
# standing in for the CUDA ones, where the weight comparisons must pass; and the emulation dry run of
# the sweep step (runs per hour with 1, 2 and 4 slots).
source "$(dirname "$0")/lib.sh"
unset MAKEFLAGS MFLAGS MAKELEVEL OUT MGPU_EXPECT_GPU MGPU_GPU_CHECK_EMU GPU_CHECK_ONLY GPU_CHECK_BIN GPU_CHECK_DEVICE
export GPU_CHECK_BUDGET_S=120 GPU_CHECK_WORK=$T_TMP/work
gc() { bash tools/gpu_check.sh > "$T_TMP/out.log" 2>&1; }
S() { cat "$1/summary.txt" 2>/dev/null; }

NVIDIA_SMI=/nonexistent/nvidia-smi OUT=$T_TMP/a gc; rc=$?
expect "no GPU: exit 0" test "$rc" -eq 0
expect "no GPU: prints SKIPPED" grep -q 'SKIPPED' "$T_TMP/out.log"
expect "no GPU: summary.txt says SKIPPED on its first line, and is no pass" \
  bash -c 'head -n 1 "$1/summary.txt" | grep -q "^mgpu gpu-check: SKIPPED" && ! grep -q "^PASS" "$1/summary.txt"' _ "$T_TMP/a"
for f in date commit device driver mode budget; do
  expect "summary field '$f:'" grep -qE "^$f: +[^ ]" "$T_TMP/a/summary.txt"
done
expect "summary: one check line per check (SKIP device with its reason)" grep -qE '^SKIP +device +no NVIDIA GPU found' "$T_TMP/a/summary.txt"

MGPU_EXPECT_GPU=1 NVIDIA_SMI=/nonexistent/nvidia-smi OUT=$T_TMP/b gc; rc=$?
expect "MGPU_EXPECT_GPU=1 without a GPU: exit non-zero" test "$rc" -ne 0
expect "MGPU_EXPECT_GPU=1: summary says FAIL and names the variable" \
  bash -c 'head -n 1 "$1/summary.txt" | grep -q "FAIL" && grep -qE "^FAIL +device .*MGPU_EXPECT_GPU=1" "$1/summary.txt"' _ "$T_TMP/b"

# a stand-in nvidia-smi: the device's name and driver reach the summary (no check selected)
mkdir -p "$T_TMP/bin"
cat > "$T_TMP/bin/nvidia-smi" <<'EOF'
#!/bin/sh
case "$*" in
  -L) echo "GPU 0: Stand-in GPU (UUID: GPU-0)";;
  *query-gpu*) echo "Stand-in GPU, 1024 MiB, 9.0, 123.45.67";;
  *) echo "Driver Version: 123.45.67";;
esac
EOF
chmod +x "$T_TMP/bin/nvidia-smi"
NVIDIA_SMI=$T_TMP/bin/nvidia-smi GPU_CHECK_NO_BUILD=1 GPU_CHECK_ONLY=none OUT=$T_TMP/c gc; rc=$?
expect "a GPU: the summary names the device and the driver" \
  bash -c 'grep -qE "^device: +Stand-in GPU, 1024 MiB" "$1/summary.txt" && grep -qE "^driver: +123.45.67" "$1/summary.txt" && grep -qE "^PASS +device" "$1/summary.txt"' _ "$T_TMP/c" || S "$T_TMP/c"

# plumbing checks shared by the runs below
plumbing() { # label dir rc
  local d=$2 rc=$3 n bad
  if grep -q '^FAIL' "$d/summary.txt"; then expect "$1: a FAIL line, so exit non-zero" test "$rc" -ne 0
  else expect "$1: no FAIL line, so exit 0" test "$rc" -eq 0; fi
  expect "$1: every check line has a reason" bash -c '! grep -E "^(PASS|FAIL|SKIP)" "$1/summary.txt" | grep -qvE "^(PASS|FAIL|SKIP) +[a-z0-9_-]+ +[^ ]"' _ "$d"
  n=$(find "$d" -type f | wc -l); bad=$(find "$d" -mindepth 1 | sed "s|^$d/||" | grep -vE '^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?$')
  expect "$1: OUT holds summary.txt and logs.tar.gz, $n files of at most 8, names the device tool brings back" \
    bash -c '[ -s "$1/summary.txt" ] && [ -s "$1/logs.tar.gz" ] && [ "$2" -le 8 ] && [ -z "$3" ]' _ "$d" "$n" "$bad"
}

if [ -x build/emu/fashion_mlp ] && [ -x build/emu/mgpurun ]; then
  MGPU_GPU_CHECK_EMU=1 GPU_CHECK_NO_BUILD=1 GPU_CHECK_ONLY=ddp OUT=$T_TMP/d gc; rc=$?
  expect "emulation dry run: the mode line says so" grep -qE '^mode: +EMULATION DRY RUN' "$T_TMP/d/summary.txt"
  expect "emulation dry run: the DDP checks are reported" \
    bash -c 'grep -qE "^(PASS|FAIL|SKIP) +ddp-shm-2proc " "$1/summary.txt" && grep -qE "^(PASS|FAIL|SKIP) +ddp-nccl-world1 " "$1/summary.txt"' _ "$T_TMP/d" || S "$T_TMP/d"
  expect "emulation dry run: --multi-gpu dp --gpu-ids 0 ran DP (its 'Using 1 GPU: [0] (DP' line) and equals plain training (PASS)" \
    grep -qE '^PASS +dp-gpu0 +--multi-gpu dp --gpu-ids 0 x 32 .*== 1 x 32' "$T_TMP/d/summary.txt" || S "$T_TMP/d"
  expect "emulation dry run: the DDP overhead on fashion_cnn is parsed from both runs (a SKIP: not a measurement)" \
    grep -qE '^SKIP +ddp-overhead-cnn +emulation: not a measurement \(plain [0-9]+ samples/s \(runs: [0-9]+\), DDP NCCL world size 1 [0-9]+ \(runs: [0-9]+\): overhead -?[0-9.]+%; against plain with --cuda-graph off \([0-9]+ samples/s\): -?[0-9.]+%\)$' "$T_TMP/d/summary.txt" || S "$T_TMP/d"
  expect "emulation dry run: the overhead reaches the summary's performance lines with the 3% target" grep -qE '^DDP overhead, fashion_cnn x 32, 3 steps, best of 1: .*\(target <= 3%\)$' "$T_TMP/d/summary.txt"
  plumbing "emulation dry run" "$T_TMP/d" "$rc"
  # --cuda-graph on vs off: a real check (the on run must have captured), no SKIP
  MGPU_GPU_CHECK_EMU=1 GPU_CHECK_NO_BUILD=1 GPU_CHECK_ONLY=graph OUT=$T_TMP/g gc; rc=$?
  expect "emulation dry run: cuda-graph-mlp and cuda-graph-cnn PASS (captured at step 3, bit-identical to uncaptured)" \
    bash -c 'grep -qE "^PASS +cuda-graph-mlp .*bit-identical.*captured at step 3" "$1/summary.txt" && grep -qE "^PASS +cuda-graph-cnn .*bit-identical.*captured at step 3" "$1/summary.txt" && [ "$2" -eq 0 ]' _ "$T_TMP/g" "$rc" || S "$T_TMP/g"
else skip "emulation dry run" "build/emu is not built (make emu)"; fi

# the sweep step: part of the default run; its dry run on the emulation parses runs/h for 1, 2, 4 slots
expect "the sweep step (runs/h with 1, 2, 4 slots) is in the default run" grep -qE '^ONLY=\$\{GPU_CHECK_ONLY:-[a-z,]*,sweep\}' tools/gpu_check.sh
if [ -x build/emu/mgpu-sweep ] && [ -x build/emu/label_noise ]; then
  MGPU_GPU_CHECK_EMU=1 GPU_CHECK_NO_BUILD=1 GPU_CHECK_ONLY=sweep OUT=$T_TMP/f gc; rc=$?
  expect "emulation dry run of the sweep step: every run ok, runs/h parsed for 1, 2 and 4 slots (a SKIP: not a measurement)" \
    grep -qE '^SKIP +sweep-slots +emulation: not a measurement \(1 slot [0-9.]+ runs/h, 2 slots [0-9.]+ \([0-9.]+x\), 4 slots [0-9.]+ \([0-9.]+x\)\)$' "$T_TMP/f/summary.txt" \
    || S "$T_TMP/f"
  expect "the sweep step's figures reach the summary's performance lines" grep -qE '^mgpu-sweep, label_noise x 2 runs on GPU 0: 1 slot [0-9.]+ runs/h' "$T_TMP/f/summary.txt"
  expect "the sweep step reports what --gpus auto finds" grep -qE '^SKIP +sweep-gpus-auto +emulation: .*--gpus auto here: ' "$T_TMP/f/summary.txt"
  plumbing "sweep step dry run" "$T_TMP/f" "$rc"
else fail "sweep step dry run: needs build/emu/mgpu-sweep and build/emu/label_noise (make emu)"; fi

if [ -x build/fashion_mlp ] && [ -x build/mgpurun ]; then
  # CPU programs in place of the CUDA ones (on the CPU the trainer's DDP uses shm already; the
  # stand-in variable only makes the script run that step): the comparisons must pass
  PATH=/usr/bin:$PATH MGPU_GPU_CHECK_EMU=1 GPU_CHECK_NO_BUILD=1 GPU_CHECK_ONLY=ddp GPU_CHECK_BIN=build GPU_CHECK_DEVICE=cpu \
    GPU_CHECK_SHM_ENV=MGPU_GPU_CHECK_STAND_IN=1 OUT=$T_TMP/e gc; rc=$?
  if grep -q 'no python3 with numpy and torch' "$T_TMP/e/summary.txt"; then skip "CPU stand-ins" "python3 with numpy and torch is needed to compare weights"
  else
  expect "CPU stand-ins: 2 processes x 16 == 1 x 32, DDP at world size 1 and DP with one replica == one process (PASS)" \
    bash -c 'grep -qE "^PASS +ddp-shm-2proc .*== 1 x 32" "$1/summary.txt" && grep -qE "^PASS +ddp-nccl-world1 " "$1/summary.txt" && grep -qE "^PASS +dp-gpu0 " "$1/summary.txt"' _ "$T_TMP/e" || S "$T_TMP/e"
  plumbing "CPU stand-ins" "$T_TMP/e" "$rc"
  fi
else skip "CPU stand-ins" "needs build/fashion_mlp and build/mgpurun"; fi
finish
