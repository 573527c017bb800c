"""Checks, on an emulation trace (MGPU_EMU_TRACE), that the training loader starts the upload of
batch k + 1 before the host synchronises with the compute stream during step k.

The trace names streams and events: a loader's copy stream is a stream that carries host-to-device
copies and nothing else (no kernel); a batch upload is an event recorded on it; a batch is handed
out when another stream (the compute stream) waits for such an event. The training loader's copy
stream is the first one seen (evaluation loaders come later and are not checked).

At every host synchronisation with the compute stream ("sync sK", "sync device", or "sync eE" for
an event recorded on it) that follows the hand-out of batch k, batch k + 1 must already have been
uploaded (uploads >= hand-outs + 1), except after the last batch of an epoch.

With MAX_WAITS_PER_STEP, also: between two hand-outs of the training loader (one step) the host
synchronises with the compute stream at most that often (issue 10: a step waits for the host at
most once, for the loss). Steps that end an epoch (evaluation follows) and the first two steps
(warm-up: gradients, optimizer state and buffers are created then) are not counted.

Usage: check_overlap.py TRACE BATCHES_PER_EPOCH MIN_CHECKS [MAX_WAITS_PER_STEP]
Exits 1 with the first violation (line number and counts), or if fewer than MIN_CHECKS
synchronisations were checked (a trace without steps proves nothing)."""
import sys

path, per_epoch, min_checks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
max_waits = int(sys.argv[4]) if len(sys.argv) > 4 else None
lines = [l.split() for l in open(path)]

# pass 1: streams that carry only host-to-device copies
ops = {}
for w in lines:
    if w[0] not in ("sync", "record", "wait"):
        ops.setdefault(w[-1], set()).add(" ".join(w[:-1]))
copy_streams = {s for s, names in ops.items() if names == {"cudaMemcpyAsync(HtoD)"}}
if not copy_streams:
    sys.exit("no copy stream in the trace (a stream with host-to-device copies only)")

# pass 2: walk the trace in issue order
recorded_on = {}          # event -> stream of its last record
uploads, handouts = {}, {}
train, compute, active = None, None, None
checked = 0
waits_in_step, steps_counted, most_waits = 0, 0, 0
for n, w in enumerate(lines, 1):
    if w[0] == "record":
        ev, st = w[1], w[2]
        recorded_on[ev] = st
        if st in copy_streams:
            uploads[st] = uploads.get(st, 0) + 1
            train = train or st
    elif w[0] == "wait":
        st, ev = w[1], w[2]
        src = recorded_on.get(ev)
        if src in copy_streams and st not in copy_streams:
            if src == train and max_waits is not None and handouts.get(src, 0) % per_epoch != 0 and handouts[src] > 2:
                # the step of the previous hand-out has ended (it was not an epoch's last)
                steps_counted += 1
                most_waits = max(most_waits, waits_in_step)
                if waits_in_step > max_waits:
                    sys.exit("line %d: the step of batch %d waited for the compute stream %d times (at most %d allowed)"
                             % (n, handouts[src] - 1, waits_in_step, max_waits))
            if src == train:
                waits_in_step = 0
            handouts[src] = handouts.get(src, 0) + 1
            active = src
            if src == train:
                compute = st
    elif w[0] == "sync" and compute is not None and active == train:
        target = w[1]
        if not (target == compute or target == "device" or recorded_on.get(target) == compute):
            continue
        waits_in_step += 1
        h, u = handouts[train], uploads[train]
        if (h - 1) % per_epoch == per_epoch - 1:
            continue      # the last batch of an epoch has no successor to prefetch
        checked += 1
        if u < h + 1:
            sys.exit("line %d (%s): the host synchronises with the compute stream %s while batch %d is in use, but only %d "
                     "batch upload(s) were queued: batch %d's upload was not started before the step's sync"
                     % (n, " ".join(w), compute, h - 1, u, h))
if max_waits is not None:
    if steps_counted < min_checks:
        sys.exit("only %d steps had their host waits counted (expected >= %d)" % (steps_counted, min_checks))
    print("%d steps: at most %d host wait(s) for the compute stream in a step (allowed %d)" % (steps_counted, most_waits, max_waits))
if checked < min_checks:
    sys.exit("only %d host synchronisations during training steps were checked (expected >= %d)" % (checked, min_checks))
print("%d host syncs of the compute stream checked: at each, the next batch's upload was already queued "
      "(%d uploads, %d hand-outs on the training loader's copy stream)" % (checked, uploads[train], handouts[train]))
