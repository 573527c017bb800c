"""Predicted DDP speedup at 2, 4 and 8 GPUs from compute time per step and bytes all-reduced per step.

Model (per optimizer step, per-GPU batch fixed, i.e. weak scaling):
  t_comm(W)  = sum over buckets b of [ alpha + 2 (W-1)/W * bytes_b / busbw ]   (ring all-reduce;
               NCCL's bus bandwidth busbw is defined so that this is the transfer time)
  hidden     = the part of t_comm that runs while backward is still producing earlier layers'
               gradients: at most t_backward_after_first_bucket (buckets go in reverse layer order)
  t_step(W)  = t_compute + max(0, t_comm(W) - overlap_window)
  speedup(W) = W * t_compute / t_step(W)
Inputs are measured compute times (pass --compute-ms) or the estimates below, which are marked.
Usage: python3 bench/scaling_model.py [--compute-ms MLP_MS CNN_MS]"""
import argparse

MiB = 1 << 20
# Parameters (f32 gradients), counted from the examples' layers.
MODELS = {
    "fashion_mlp": {"params": 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10,
                    # one bucket (0.94 MB < the 1 MiB first bucket): ready only when backward ends,
                    # so nothing can hide it
                    "overlap_fraction": 0.0},
    "fashion_cnn": {"params": 32 * 9 + 32 + 64 + 64 * 32 * 9 + 64 + 128 + 3136 * 128 + 128 + 128 * 10 + 10,
                    # fc1/fc2 gradients (95% of the bytes) are ready first; the conv layers' backward,
                    # about 70% of the step's backward time, runs while they travel
                    "overlap_fraction": 0.7 * 0.6},
}
ALPHA_S = 10e-6  # per all-reduce latency on NVLink (NCCL small-message ring/LL); an assumption
BUSBW = {"8xA100 NVLink (230 GB/s)": 230e9, "8xH100 NVLink (370 GB/s)": 370e9, "8xH100 NVLink (480 GB/s)": 480e9}


def buckets(nbytes, first=1 * MiB, cap=25 * MiB):
    out, left = [], nbytes
    size = first
    while left > 0:
        out.append(min(left, size))
        left -= size
        size = cap
    return out


def main():
    ap = argparse.ArgumentParser()
    # Estimates until measured on a GPU (marked as such in the output): per-step compute time at
    # batch 128 on one H100, eager PyTorch-like launch-bound regime.
    ap.add_argument("--compute-ms", nargs=2, type=float, default=[0.35, 1.2], metavar=("MLP_MS", "CNN_MS"))
    args = ap.parse_args()
    compute = dict(zip(MODELS, args.compute_ms))
    print(f"compute ms/step (given): {compute}; alpha = {ALPHA_S * 1e6:.0f} us per all-reduce")
    for name, m in MODELS.items():
        nbytes = 4 * m["params"]
        bks = buckets(nbytes)
        tc = compute[name] * 1e-3
        print(f"\n{name}: {m['params']:,} parameters, {nbytes / 1e6:.2f} MB per step in {len(bks)} bucket(s)")
        print("| interconnect | W=2 | W=4 | W=8 | exposed comm at W=8 |")
        print("|---|---|---|---|---|")
        for label, bw in BUSBW.items():
            cells = []
            for w in (2, 4, 8):
                tcomm = sum(ALPHA_S + 2 * (w - 1) / w * b / bw for b in bks)
                exposed = max(0.0, tcomm - m["overlap_fraction"] * tc)
                cells.append((w * tc / (tc + exposed), exposed))
            print(f"| {label} | " + " | ".join(f"{s:.2f}x" for s, _ in cells) + f" | {cells[-1][1] * 1e6:.0f} us |")


if __name__ == "__main__":
    main()
