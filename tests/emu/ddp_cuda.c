/* DDP with gradients in device memory, under the CUDA emulation, run by mgpurun with 2 processes
   (tests/emu_test.sh, MGPU_EMU_DEVICES=2: rank r on cuda:r; MGPU_EMU_ERRORS=report, so a stream-order
   error fails the run):

   - a small model (two linear layers, a parameter only rank 1 uses, one no rank uses) built on
     each rank's CUDA context from host values (rank 1 starts from other values: DDP broadcasts
     rank 0's), bucketed so that nearly every parameter is its own bucket, trained two steps under
     DDP over the nccl backend and over the shm backend (device buckets staged through pinned host
     memory); the averaged gradients must equal the average of the two ranks' single-process
     gradients bit for bit (world 2: one addition and a halving), match one process on the combined
     batch within float rounding, and be the same bits on both backends; with fp16/bf16 compression
     the two backends must agree bit for bit;
   - a raw device buffer written on a context's non-blocking stream, all-reduced through the raw
     pointer API (blocking and asynchronous) on both backends: the collective must not rely on the
     legacy stream (the checker reports a read of the buffer that nothing orders after the write);
   - DDP's producer event alone (test_ddp_producer_event): a bucket written on the context's stream
     and all-reduced as DDP issues it, with no host sync in between, so that only the event orders
     the collective after the write (removing it makes the checker report the read);
   - NCCL's device: --gpu-ids 1,0 (desc->gpu_ids) puts rank 0 on device 1 and rank 1 on device 0, and
     DDP on those devices gives the same gradients; an id that is not a visible device is an error
     naming it.
   With argument "shared" (MGPU_EMU_DEVICES=1) both ranks share cuda:0 and only the shm backend runs:
   the one way to run DDP at world size 2 on a single GPU.
   Prints "RESULT ...: N passed, M failed" per rank. */
#define MGPU_IMPLEMENTATION
#include "mgpu.h"
#include "mgpu_test.h"
#include <cuda_runtime_api.h>

#define BATCH 4
#define IN 6
#define HID 8
#define OUT 3
#define STEPS 2
#define NP 6                                  /* parameters */
static const int64_t numel[NP] = { HID * IN, HID, OUT * HID, OUT, 5, 4 };
static const char *names[NP] = { "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "only_rank1", "never" };
static const int ndims[NP] = { 2, 1, 2, 1, 1, 1 };
static const int64_t shapes[NP][2] = { { HID, IN }, { HID, 0 }, { OUT, HID }, { OUT, 0 }, { 5, 0 }, { 4, 0 } };
#define NG (HID * IN + HID + OUT * HID + OUT + 5 + 4)

static int rank, world, device, shared;
static mgpu_comm *shm, *nccl;

static float frand(uint64_t *s) {
    *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17;
    return (float)((double)(*s >> 11) * (1.0 / 9007199254740992.0) * 2.0 - 1.0);
}
static void fill(float *x, int64_t n, uint64_t seed) {
    uint64_t s = 0x9e3779b97f4a7c15ULL * (seed + 1);
    int64_t i;
    for (i = 0; i < n; i++) x[i] = frand(&s);
}

static mgpu_context *cuda_ctx(int dev) {
    mgpu_context_desc d;
    memset(&d, 0, sizeof d);
    d.device.type = MGPU_DEVICE_CUDA; d.device.index = dev; d.seed = 7; d.num_threads = 1;
    return mgpu_context_create(&d);
}

typedef struct net { mgpu_context *ctx; mgpu_model *m; mgpu_tensor *p[NP]; } net;

/* the parameters from host values: seed 1 (what rank 0 has), or other values (seed 99) */
static int net_build(net *n, int dev, int seed) {
    int i;
    memset(n, 0, sizeof *n);
    if (!(n->ctx = cuda_ctx(dev)) || !(n->m = mgpu_model_create(n->ctx))) return 0;
    for (i = 0; i < NP; i++) {
        float h[64];
        fill(h, numel[i], (uint64_t)(seed * 10 + i));
        if (!(n->p[i] = mgpu_model_add_parameter(n->m, names[i], MGPU_F32, ndims[i], shapes[i]))) return 0;
        if (mgpu_tensor_copy_from_host(n->p[i], h, sizeof(float) * (size_t)numel[i]) != MGPU_OK) return 0;
    }
    return 1;
}
static void net_free(net *n) {
    mgpu_model_destroy(n->m);
    mgpu_context_destroy(n->ctx);
}

/* The loss of `rows` rows of step s starting at shard `first` (rank r's shard is rows r*BATCH..);
   with_only1 adds sum(only_rank1) / 4. */
static mgpu_result net_backward(net *n, int s, int first, int rows, int with_only1) {
    float hx[2 * BATCH * IN], hy[2 * BATCH * OUT];
    int64_t xs[2] = { rows, IN }, ys[2] = { rows, OUT };
    mgpu_context *ctx = n->ctx;
    mgpu_tensor *x, *y, *h, *o, *loss;
    mgpu_result r;
    fill(hx, 2 * BATCH * IN, (uint64_t)(1000 + s));
    fill(hy, 2 * BATCH * OUT, (uint64_t)(2000 + s));
    x = mgpu_tensor_from_host(ctx, MGPU_F32, 2, xs, hx + first * BATCH * IN);
    y = mgpu_tensor_from_host(ctx, MGPU_F32, 2, ys, hy + first * BATCH * OUT);
    h = mgpu_op_tanh(ctx, mgpu_op_linear(ctx, x, n->p[0], n->p[1]));
    o = mgpu_op_linear(ctx, h, n->p[2], n->p[3]);
    loss = mgpu_op_mse_loss(ctx, o, y);
    if (loss && with_only1) loss = mgpu_op_add(ctx, loss, mgpu_op_scale(ctx, mgpu_op_sum(ctx, n->p[4]), 0.25f));
    r = loss ? mgpu_backward(ctx, loss) : mgpu_last_result();
    mgpu_context_end_step(ctx);
    mgpu_tensor_free(x); mgpu_tensor_free(y);
    return r;
}

/* The grads as host floats (a parameter without one: zeros, *none set for it) */
static mgpu_result net_grads(net *n, float *g, int *none) {
    int i;
    int64_t off = 0;
    for (i = 0; i < NP; i++) {
        none[i] = n->p[i]->grad == NULL;
        if (none[i]) memset(g + off, 0, sizeof(float) * (size_t)numel[i]);
        else if (mgpu_tensor_copy_to_host(n->p[i]->grad, g + off, sizeof(float) * (size_t)numel[i]) != MGPU_OK) return mgpu_last_result();
        off += numel[i];
    }
    return MGPU_OK;
}

/* Without DDP, on this rank: each shard's gradients, averaged as DDP must (world 2), and the
   gradients of one process on both shards at once. */
static float ref_shard[STEPS][2][NG], ref_avg[STEPS][NG], ref_one[STEPS][NG];
static void make_references(void) {
    int none[NP], s, k, i;
    net n;
    MT_CHECK(net_build(&n, device, 1), "reference model: %s", mgpu_last_error());
    for (s = 0; s < STEPS; s++) {
        for (k = 0; k < 2; k++) {
            MT_CHECK(net_backward(&n, s, k, BATCH, k == 1) == MGPU_OK, "reference backward: %s", mgpu_last_error());
            MT_CHECK(net_grads(&n, ref_shard[s][k], none) == MGPU_OK, "reference grads: %s", mgpu_last_error());
            mgpu_model_zero_grad(n.m);
        }
        for (i = 0; i < NG; i++) ref_avg[s][i] = (ref_shard[s][0][i] + ref_shard[s][1][i]) / 2.0f;
        MT_CHECK(net_backward(&n, s, 0, 2 * BATCH, 0) == MGPU_OK, "reference backward: %s", mgpu_last_error());
        MT_CHECK(net_grads(&n, ref_one[s], none) == MGPU_OK, "reference grads: %s", mgpu_last_error());
        mgpu_model_zero_grad(n.m);
    }
    net_free(&n);
}

/* STEPS steps of DDP on cuda:dev over comm; grads[s] after step s. */
static int run_ddp(mgpu_comm *comm, int dev, mgpu_dtype compress, float grads[STEPS][NG], int never_none[STEPS]) {
    mgpu_ddp_desc dd;
    mgpu_ddp_stats st;
    mgpu_ddp *d;
    float p0[NG], ref_p[NG];
    int none[NP], s, i, ok = 1;
    int64_t off = 0;
    net n, ref;
    if (!net_build(&n, dev, rank == 0 ? 1 : 99)) { MT_CHECK(0, "model on cuda:%d: %s", dev, mgpu_last_error()); return 0; }
    memset(&dd, 0, sizeof dd);
    dd.first_bucket_mb = dd.bucket_cap_mb = 64.0 / 1048576.0;   /* 64 bytes: a bucket per parameter, mostly */
    dd.compress = compress;
    d = mgpu_ddp_create(n.m, comm, &dd);
    MT_CHECK(d != NULL, "mgpu_ddp_create on cuda:%d: %s", dev, mgpu_last_error());
    if (!d) { net_free(&n); return 0; }
    /* rank 0's parameters everywhere */
    MT_CHECK(net_build(&ref, dev, 1), "model: %s", mgpu_last_error());
    for (i = 0; i < NP; i++) {
        mgpu_tensor_copy_to_host(n.p[i], p0 + off, sizeof(float) * (size_t)numel[i]);
        mgpu_tensor_copy_to_host(ref.p[i], ref_p + off, sizeof(float) * (size_t)numel[i]);
        off += numel[i];
    }
    net_free(&ref);
    MT_CHECK(memcmp(p0, ref_p, sizeof p0) == 0, "rank %d: the parameters after mgpu_ddp_create are not rank 0's", rank);
    for (s = 0; s < STEPS && ok; s++) {
        mgpu_result r = net_backward(&n, s, rank, BATCH, rank == 1);
        MT_CHECK(r == MGPU_OK, "DDP backward step %d: %s", s, mgpu_last_error());
        ok = r == MGPU_OK && net_grads(&n, grads[s], none) == MGPU_OK;
        never_none[s] = none[5];
        mgpu_model_zero_grad(n.m);
    }
    mgpu_ddp_get_stats(d, &st);
    MT_CHECK(st.buckets >= 4 && st.allreduces == st.buckets * STEPS, "%lld buckets, %lld all-reduces", (long long)st.buckets, (long long)st.allreduces);
    mgpu_ddp_destroy(d);
    net_free(&n);
    return ok;
}

static float got[2][3][STEPS][NG];   /* [shm, nccl][F32, BF16, F16] */
static int never[2][3][STEPS];
static const mgpu_dtype compressions[3] = { MGPU_F32, MGPU_BF16, MGPU_F16 };
static const char *bname[2] = { "shm", "nccl" };

static double max_rel(const float *a, const float *b, int64_t n) {
    double worst = 0;
    int64_t i;
    for (i = 0; i < n; i++) {
        double e = fabs((double)a[i] - (double)b[i]) / (fabs((double)b[i]) + 1e-3);
        if (e > worst) worst = e;
    }
    return worst;
}

/* x rounded to the compression format */
static float round_half(mgpu_dtype half, float x) { return half == MGPU_F16 ? mgpu_f16_to_f32(mgpu_f32_to_f16(x)) : mgpu_bf16_to_f32(mgpu_f32_to_bf16(x)); }

static void check_against_references(int be, int c) {
    float want[NG];
    int s, i;
    for (s = 0; s < STEPS; s++) {
        const float *g = got[be][c][s];
        MT_CHECK(never[be][c][s], "%s: a parameter no rank used got a grad", bname[be]);
        if (c == 0) {
            MT_CHECK(memcmp(g, ref_avg[s], sizeof(float) * NG) == 0, "%s step %d: DDP grads differ from the averaged single-process grads (max rel %.3g)",
                     bname[be], s, max_rel(g, ref_avg[s], NG));
            /* one process on the combined batch (only_rank1 excluded: it is a per-rank term) */
            MT_CHECK(max_rel(g, ref_one[s], NG - 9) < 1e-5, "%s step %d: DDP grads vs one process on the combined batch: max rel %.3g",
                     bname[be], s, max_rel(g, ref_one[s], NG - 9));
        } else {
            /* each rank sends its grads halved and rounded to 16 bits, the sum is rounded again */
            mgpu_dtype h = compressions[c];
            for (i = 0; i < NG; i++) want[i] = round_half(h, round_half(h, ref_shard[s][0][i] * 0.5f) + round_half(h, ref_shard[s][1][i] * 0.5f));
            MT_CHECK(memcmp(g, want, sizeof want) == 0, "%s %s step %d: compressed grads differ from the rounded average (max rel %.3g)",
                     bname[be], mgpu_dtype_name(h), s, max_rel(g, want, NG));
        }
        MT_CHECK(g[NG - 9] == 0.125f && g[NG - 5] == 0.125f, "%s: only_rank1's grad is 0.125 on every rank, got %g", bname[be], g[NG - 9]);
    }
}

static void test_ddp_shm_staged(void) {
    int c;
    for (c = 0; c < 3; c++) {
        if (!run_ddp(shm, device, compressions[c], got[0][c], never[0][c])) continue;
        check_against_references(0, c);
    }
}

static void test_ddp_nccl(void) {
    int c, s;
    for (c = 0; c < 3; c++) {
        if (!run_ddp(nccl, device, compressions[c], got[1][c], never[1][c])) continue;
        check_against_references(1, c);
        for (s = 0; s < STEPS; s++)
            MT_CHECK(memcmp(got[0][c][s], got[1][c][s], sizeof(float) * NG) == 0, "%s step %d: nccl and shm DDP grads differ (max rel %.3g)",
                     mgpu_dtype_name(compressions[c]), s, max_rel(got[1][c][s], got[0][c][s], NG));
    }
}

/* A buffer written by a fill on a context's non-blocking stream, all-reduced through its raw device
   pointer: nothing but the collective itself may order the read after the write. */
static void raw_pointer_case(mgpu_comm *comm, int async) {
    int64_t n = 1000, i;
    mgpu_context *ctx = cuda_ctx(device);
    mgpu_tensor *t = ctx ? mgpu_tensor_create(ctx, MGPU_F32, 1, &n) : NULL;
    float h[1000];
    mgpu_result r;
    MT_CHECK(t != NULL, "tensor: %s", mgpu_last_error());
    if (!t) { mgpu_context_destroy(ctx); return; }
    mgpu_tensor_fill(t, rank + 1.0);
    if (async) {
        mgpu_comm_work *w = mgpu_comm_allreduce_f32_async(comm, (float *)t->data, n, MGPU_REDUCE_SUM);
        r = w ? mgpu_comm_wait(w) : mgpu_last_result();
    } else r = mgpu_comm_allreduce_f32(comm, (float *)t->data, n, MGPU_REDUCE_SUM);
    MT_CHECK(r == MGPU_OK, "%s %s all-reduce of a device pointer: %s", bname[comm == nccl], async ? "async" : "blocking", mgpu_last_error());
    mgpu_tensor_fill(t, 0.0);   /* a write after the collective's: it must be ordered after it, too */
    mgpu_tensor_copy_to_host(t, h, sizeof h);
    for (i = 0; i < n && h[i] == 0.0f; i++) {}
    MT_CHECK(i == n, "fill after the all-reduce");
    mgpu_tensor_free(t);
    mgpu_context_destroy(ctx);
}
static void raw_result_case(mgpu_comm *comm) {
    int64_t n = 777, i;
    mgpu_context *ctx = cuda_ctx(device);
    mgpu_tensor *t = ctx ? mgpu_tensor_create(ctx, MGPU_F32, 1, &n) : NULL;
    float h[777];
    if (!t) { MT_CHECK(0, "tensor: %s", mgpu_last_error()); mgpu_context_destroy(ctx); return; }
    mgpu_tensor_fill(t, rank + 1.0);
    MT_CHECK(mgpu_comm_allreduce_f32(comm, (float *)t->data, n, MGPU_REDUCE_AVG) == MGPU_OK, "avg: %s", mgpu_last_error());
    mgpu_tensor_copy_to_host(t, h, sizeof h);
    for (i = 0; i < n && h[i] == 1.5f; i++) {}
    MT_CHECK(i == n, "%s: the average of 1 and 2 is 1.5, got %g", bname[comm == nccl], h[i < n ? i : 0]);
    mgpu_tensor_free(t);
    mgpu_context_destroy(ctx);
}

/* DDP's producer event, alone and with no host synchronisation anywhere between the write and the
   collective: a bucket written by a kernel on the context's non-blocking stream is all-reduced the
   way mgpu__ddp_launch issues a bucket (mgpu__comm_allreduce_async with its device and that stream),
   and the host waits only on the communicator (mgpu__comm_wait: a condition variable, then the
   context's stream waits on the collective's event). The full DDP steps above cannot show this
   event is needed: host syncs around them (uploads, read-backs, allocations) may order the
   collective by accident, depending on when the progress thread runs. Here only the event recorded
   on the producer stream orders the collective's read after the fill; with its wait removed from
   mgpu__comm_order_after_producer the checker reports "ncclAllReduce ... reads ... but mgpu__fill_k
   ... wrote them before" (nccl) and the same for the staging copy (shm). */
static void producer_event_case(mgpu_comm *comm) {
    int64_t n = 1000, i;
    mgpu_context *ctx = cuda_ctx(device);
    mgpu_tensor *t = ctx ? mgpu_tensor_create(ctx, MGPU_F32, 1, &n) : NULL;
    mgpu_comm_work *w;
    float h[1000];
    mgpu_result r;
    if (!t) { MT_CHECK(0, "tensor: %s", mgpu_last_error()); mgpu_context_destroy(ctx); return; }
    mgpu_tensor_fill(t, rank + 1.0);   /* the producer: a kernel queued on the context's stream, not waited for */
    w = mgpu__comm_allreduce_async(comm, "DDP bucket all-reduce", (float *)t->data, n, MGPU_REDUCE_SUM, device, ctx->cuda_stream);
    r = w ? mgpu__comm_wait(w, ctx->cuda_stream) : mgpu_last_result();
    MT_CHECK(r == MGPU_OK, "%s: bucket all-reduce ordered by the producer event: %s", bname[comm == nccl], mgpu_last_error());
    mgpu_tensor_copy_to_host(t, h, sizeof h);   /* the first host sync, after the collective */
    for (i = 0; i < n && h[i] == 3.0f; i++) {}
    MT_CHECK(i == n, "%s: the sum of 1 and 2 is 3, got %g at %lld", bname[comm == nccl], h[i < n ? i : 0], (long long)i);
    mgpu_tensor_free(t);
    mgpu_context_destroy(ctx);
}
static void test_ddp_producer_event(void) {
    producer_event_case(shm);
    if (nccl) producer_event_case(nccl);
}

static void test_raw_device_pointers(void) {
    raw_pointer_case(shm, 0); raw_pointer_case(shm, 1);
    raw_result_case(shm);
    if (nccl) { raw_pointer_case(nccl, 0); raw_pointer_case(nccl, 1); raw_result_case(nccl); }
}

/* --gpu-ids 1,0: rank 0 on device 1, rank 1 on device 0; then DDP there gives the same grads. */
static mgpu_dist_env env;
static void test_nccl_gpu_ids(void) {
    static const int ids[2] = { 1, 0 }, bad[1] = { 7 };
    static float g[STEPS][NG];
    int nv[STEPS], s;
    mgpu_comm_desc d;
    mgpu_dist_env one;
    mgpu_comm *c;
    memset(&d, 0, sizeof d);
    d.backend = MGPU_COMM_NCCL; d.env = &env; d.gpu_ids = ids; d.num_gpu_ids = 2;
    env.master_port = env.master_port < 65534 ? env.master_port + 1 : env.master_port - 2;
    c = mgpu_comm_create(&d);
    MT_CHECK(c != NULL, "nccl with gpu ids 1,0: %s", mgpu_last_error());
    if (!c) return;
    MT_CHECK(mgpu_comm_cuda_device(c) == ids[rank], "rank %d: nccl runs on cuda:%d, --gpu-ids 1,0 says cuda:%d", rank, mgpu_comm_cuda_device(c), ids[rank]);
    MT_CHECK(mgpu_comm_cuda_device(nccl) == rank, "rank %d: without --gpu-ids nccl runs on cuda:%d (local rank)", rank, mgpu_comm_cuda_device(nccl));
    if (run_ddp(c, ids[rank], MGPU_F32, g, nv))
        for (s = 0; s < STEPS; s++) MT_CHECK(memcmp(g[s], ref_avg[s], sizeof(float) * NG) == 0, "DDP on swapped devices, step %d: grads differ", s);
    mgpu_comm_destroy(c);
    /* a single-rank world: an id that is no visible device is named */
    memset(&one, 0, sizeof one);
    one.world_size = 1; one.local_world_size = 1; one.source = "single";
    snprintf(one.master_addr, sizeof one.master_addr, "127.0.0.1");
    d.env = &one; d.gpu_ids = bad; d.num_gpu_ids = 1;
    c = mgpu_comm_create(&d);
    MT_CHECK(c == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "device 7") && strstr(mgpu_last_error(), "visible"),
             "gpu id 7 of 2 devices: %s", c ? "accepted" : mgpu_last_error());
    mgpu_comm_destroy(c);
    d.gpu_ids = ids; d.num_gpu_ids = 1;   /* id 1 for local rank 0 */
    c = mgpu_comm_create(&d);
    MT_CHECK(c && mgpu_comm_cuda_device(c) == 1, "single rank with --gpu-ids 1: %s", c ? "wrong device" : mgpu_last_error());
    mgpu_comm_destroy(c);
}

int main(int argc, char **argv) {
    mgpu_comm_desc d;
    shared = argc > 1 && strcmp(argv[1], "shared") == 0;
    if (mgpu_dist_env_read(&env) != MGPU_OK) { fprintf(stderr, "%s\n", mgpu_last_error()); return 2; }
    rank = env.rank; world = env.world_size; device = shared ? 0 : env.local_rank;
    if (world != 2) { fprintf(stderr, "ddp_cuda runs with 2 processes (mgpurun --nproc-per-node 2)\n"); return 2; }
    if (cudaSetDevice(device) != cudaSuccess) { fprintf(stderr, "rank %d: no device %d (MGPU_EMU_DEVICES)\n", rank, device); return 2; }
    memset(&d, 0, sizeof d);
    d.backend = MGPU_COMM_SHM;
    shm = mgpu_comm_create(&d);
    if (!shm) { fprintf(stderr, "rank %d: shm communicator: %s\n", rank, mgpu_last_error()); return 2; }
    if (!shared) {
        env.master_port = env.master_port < 65535 ? env.master_port + 1 : env.master_port - 1;
        d.backend = MGPU_COMM_NCCL;
        d.env = &env;
        nccl = mgpu_comm_create(&d);
        if (!nccl) { fprintf(stderr, "rank %d: nccl communicator: %s\n", rank, mgpu_last_error()); return 2; }
    }
    MT_RUN(make_references);
    MT_RUN(test_ddp_shm_staged);
    if (!shared) {
        MT_RUN(test_ddp_nccl);
        MT_RUN(test_nccl_gpu_ids);
    }
    MT_RUN(test_raw_device_pointers);
    MT_RUN(test_ddp_producer_event);
    mgpu_comm_destroy(nccl);
    mgpu_comm_destroy(shm);
    return MT_END();
}
