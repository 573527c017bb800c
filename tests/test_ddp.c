/* DDP, SyncBatchNorm, rank-consistent dropout and DataParallel.
   The core check: W ranks at per-rank batch B, trained for a number of steps, end with the same
   parameters and buffers as one process at batch W * B fed the same rows (DistributedSampler
   sharding: rank r's local row j is row r + W * j of the combined batch). Ranks are threads of a
   `threads` communicator (through mgpu_dp_run) or processes (fork + shm). */
#define _GNU_SOURCE   /* fork, mmap, sockets, alarm */
#include "mgpu_test.h"
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/socket.h>

static int quick = 0;   /* MGPU_TEST_QUICK: fewer steps, smaller models (sanitizer run) */

/* ---- models ---- */

enum { NET_MLP = 0, NET_CNN = 1 };
#define IN_FEATURES 12
#define IMG 8
#define CLASSES 5
#define MAX_TENSORS 32

typedef struct net {
    mgpu_model *m;
    int kind; float p;
    mgpu_linear *fc1, *fc2, *fc3;
    mgpu_conv2d *conv1, *conv2;
    mgpu_batchnorm2d *bn1, *bn2;
} net;

static int build_net(net *n, mgpu_context *ctx, int kind, float p) {
    memset(n, 0, sizeof *n);
    n->m = mgpu_model_create(ctx);
    n->kind = kind; n->p = p;
    if (kind == NET_MLP) {
        n->fc1 = mgpu_linear_create(n->m, "fc1", IN_FEATURES, 24, 1);
        n->fc2 = mgpu_linear_create(n->m, "fc2", 24, 16, 1);
        n->fc3 = mgpu_linear_create(n->m, "fc3", 16, CLASSES, 1);
        return n->fc3 != NULL;
    }
    n->conv1 = mgpu_conv2d_create(n->m, "conv1", 1, 4, 3, 1, 1, 0);
    n->bn1 = mgpu_batchnorm2d_create(n->m, "bn1", 4);
    n->conv2 = mgpu_conv2d_create(n->m, "conv2", 4, 6, 3, 2, 1, 0);
    n->bn2 = mgpu_batchnorm2d_create(n->m, "bn2", 6);
    n->fc1 = mgpu_linear_create(n->m, "fc", 6 * (IMG / 2) * (IMG / 2), CLASSES, 1);
    return n->fc1 != NULL;
}

static mgpu_tensor *net_forward(mgpu_context *ctx, net *n, mgpu_tensor *x) {
    mgpu_tensor *h;
    int training = mgpu_model_is_training(n->m);
    if (n->kind == NET_MLP) {
        h = mgpu_op_relu(ctx, mgpu_linear_forward(ctx, n->fc1, x));                  // (B, 24)
        h = mgpu_op_dropout(ctx, h, n->p, training);
        h = mgpu_op_relu(ctx, mgpu_linear_forward(ctx, n->fc2, h));                  // (B, 16)
        return mgpu_linear_forward(ctx, n->fc3, h);                                   // (B, CLASSES)
    }
    h = mgpu_op_relu(ctx, mgpu_batchnorm2d_forward(ctx, n->bn1, mgpu_conv2d_forward(ctx, n->conv1, x)));   // (B, 4, 8, 8)
    h = mgpu_op_dropout(ctx, h, n->p, training);
    h = mgpu_op_relu(ctx, mgpu_batchnorm2d_forward(ctx, n->bn2, mgpu_conv2d_forward(ctx, n->conv2, h)));   // (B, 6, 4, 4)
    return mgpu_linear_forward(ctx, n->fc1, mgpu_op_flatten(ctx, h, 1));                                  // (B, CLASSES)
}

/* ---- data: a fixed dataset, rows shared out as DistributedSampler does ---- */

#define MAX_ROWS 4096
static float data_x[MAX_ROWS * IMG * IMG];
static int64_t data_y[MAX_ROWS];

static void make_data(void) {
    int64_t i;
    for (i = 0; i < (int64_t)MAX_ROWS * IMG * IMG; i++) data_x[i] = (float)mt_uniform(-1, 1);
    for (i = 0; i < MAX_ROWS; i++) data_y[i] = (int64_t)(mt_uniform(0, 1) * CLASSES) % CLASSES;
}

static int64_t row_features(int kind) { return kind == NET_MLP ? IN_FEATURES : IMG * IMG; }

/* One training run, seen from one rank. Step s consumes rows [s * G, (s + 1) * G) of the data,
   G = world * batch * accum; micro-step k of rank r takes row s * G + k * world * batch + r + world * j
   as its row j. One process is world 1, batch G, accum 1. */
typedef struct run_spec {
    int kind, world, batch, accum, steps;
    float dropout;
    int sync_bn;
    mgpu_dtype compress;
    double first_mb, cap_mb;
} run_spec;

/* What a rank ends with: its F32 parameters and buffers, the I64 num_batches_tracked sum, DDP stats. */
typedef struct snapshot {
    int n; int64_t offset[MAX_TENSORS], numel[MAX_TENSORS]; char names[MAX_TENSORS][32];
    float data[8192];
    int64_t batches_tracked;
    mgpu_ddp_stats stats;
    int64_t allreduces_during_no_sync;
    mgpu_result result;
    char error[256];
} snapshot;

static void take_snapshot(const mgpu_model *m, snapshot *s) {
    int i, nt = mgpu_model_num_parameters(m) + mgpu_model_num_buffers(m);
    int64_t off = 0;
    s->n = 0; s->batches_tracked = 0;
    for (i = 0; i < nt; i++) {
        const char *name = NULL;
        int np = mgpu_model_num_parameters(m);
        mgpu_tensor *t = i < np ? mgpu_model_parameter(m, i, &name) : mgpu_model_buffer(m, i - np, &name);
        if (t->dtype == MGPU_I64) { s->batches_tracked += ((int64_t *)t->data)[0]; continue; }
        if (s->n == MAX_TENSORS || off + t->numel > (int64_t)(sizeof s->data / sizeof(float))) continue;
        s->offset[s->n] = off; s->numel[s->n] = t->numel;
        snprintf(s->names[s->n], sizeof s->names[0], "%s", name);
        memcpy(s->data + off, t->data, sizeof(float) * (size_t)t->numel);
        off += t->numel; s->n++;
    }
}

/* The batch of micro-step k of step s for rank r, as persistent tensors (freed by the caller). */
static void make_batch(mgpu_context *ctx, const run_spec *sp, int rank, int step, int k, mgpu_tensor **x, mgpu_tensor **y) {
    int64_t feat = row_features(sp->kind), G = (int64_t)sp->world * sp->batch * sp->accum, j;
    int64_t xs[4], ys[1];
    float *xb = (float *)malloc(sizeof(float) * (size_t)(sp->batch * feat));
    int64_t *yb = (int64_t *)malloc(sizeof(int64_t) * (size_t)sp->batch);
    for (j = 0; j < sp->batch; j++) {
        int64_t row = step * G + (int64_t)k * sp->world * sp->batch + rank + (int64_t)sp->world * j;
        memcpy(xb + j * feat, data_x + row * feat, sizeof(float) * (size_t)feat);
        yb[j] = data_y[row];
    }
    xs[0] = sp->batch; ys[0] = sp->batch;
    if (sp->kind == NET_MLP) { xs[1] = IN_FEATURES; *x = mgpu_tensor_from_host(ctx, MGPU_F32, 2, xs, xb); }
    else { xs[1] = 1; xs[2] = IMG; xs[3] = IMG; *x = mgpu_tensor_from_host(ctx, MGPU_F32, 4, xs, xb); }
    *y = mgpu_tensor_from_host(ctx, MGPU_I64, 1, ys, yb);
    free(xb); free(yb);
}

static mgpu_result train_steps(mgpu_context *ctx, net *n, mgpu_ddp *ddp, const run_spec *sp, int rank, snapshot *out) {
    mgpu_optimizer_desc od = mgpu_optimizer_desc_default(MGPU_OPTIM_SGD);
    mgpu_optimizer *opt;
    int s, k;
    mgpu_result r = MGPU_OK;
    od.lr = 0.05f; od.momentum = 0.9f;
    opt = mgpu_optimizer_create(n->m, &od);
    if (!opt) return mgpu_last_result();
    for (s = 0; r == MGPU_OK && s < sp->steps; s++) {
        mgpu_optimizer_zero_grad(opt);
        for (k = 0; r == MGPU_OK && k < sp->accum; k++) {
            mgpu_tensor *x = NULL, *y = NULL, *loss;
            mgpu_ddp_stats before;
            mgpu_ddp_get_stats(ddp, &before);
            if (ddp) mgpu_ddp_set_sync(ddp, k == sp->accum - 1);   /* no_sync for all but the last micro-step */
            make_batch(ctx, sp, rank, s, k, &x, &y);
            loss = mgpu_op_cross_entropy(ctx, net_forward(ctx, n, x), y);
            if (sp->accum > 1) loss = mgpu_op_scale(ctx, loss, 1.0f / (float)sp->accum);
            r = loss ? mgpu_backward(ctx, loss) : mgpu_last_result();
            if (ddp && k < sp->accum - 1) {
                mgpu_ddp_stats after;
                mgpu_ddp_get_stats(ddp, &after);
                out->allreduces_during_no_sync += after.allreduces - before.allreduces;
            }
            mgpu_context_end_step(ctx);
            mgpu_tensor_free(x); mgpu_tensor_free(y);
        }
        if (r == MGPU_OK) r = mgpu_optimizer_step(opt);
    }
    mgpu_optimizer_destroy(opt);
    return r;
}

/* One rank of a run (comm NULL: one process without DDP). */
typedef struct run_arg { const run_spec *spec; snapshot *snaps; int init_seed_per_rank; } run_arg;

static mgpu_context *rank_context(uint64_t seed) {
    mgpu_context_desc d;
    memset(&d, 0, sizeof d);
    d.seed = seed; d.num_threads = 1;
    return mgpu_context_create(&d);
}

static mgpu_result run_rank(int rank, mgpu_comm *comm, void *argp) {
    run_arg *a = (run_arg *)argp;
    const run_spec *sp = a->spec;
    snapshot *out = &a->snaps[rank];
    mgpu_context *ctx;
    mgpu_ddp *ddp = NULL;
    mgpu_result r = MGPU_OK;
    net n;
    /* different init per rank proves the broadcast; the dropout stream stays the same seed */
    ctx = rank_context(7);
    if (!ctx) return mgpu_last_result();
    if (a->init_seed_per_rank) mgpu_context_set_rng_state(ctx, 7, 1000003ULL * (uint64_t)rank);
    if (!build_net(&n, ctx, sp->kind, sp->dropout)) r = mgpu_last_result();
    if (a->init_seed_per_rank) mgpu_context_set_rng_state(ctx, 7, 99999999ULL);   /* same stream position after init */
    if (r == MGPU_OK && comm) {
        mgpu_ddp_desc dd;
        memset(&dd, 0, sizeof dd);
        dd.sync_batchnorm = sp->sync_bn; dd.compress = sp->compress;
        dd.first_bucket_mb = sp->first_mb; dd.bucket_cap_mb = sp->cap_mb;
        ddp = mgpu_ddp_create(n.m, comm, &dd);
        if (!ddp) r = mgpu_last_result();
    }
    if (r == MGPU_OK) r = train_steps(ctx, &n, ddp, sp, rank, out);
    if (r == MGPU_OK) take_snapshot(n.m, out);
    mgpu_ddp_get_stats(ddp, &out->stats);
    out->result = r;
    if (r != MGPU_OK) snprintf(out->error, sizeof out->error, "%s", mgpu_last_error());
    mgpu_ddp_destroy(ddp);
    mgpu_model_destroy(n.m);
    mgpu_context_destroy(ctx);
    return r;
}

/* The reference: one process at the combined batch. */
static void run_single(const run_spec *ddp_spec, snapshot *out, int init_seed_per_rank) {
    run_spec one = *ddp_spec;
    run_arg a;
    one.world = 1; one.batch = ddp_spec->world * ddp_spec->batch * ddp_spec->accum; one.accum = 1;
    a.spec = &one; a.snaps = out; a.init_seed_per_rank = init_seed_per_rank;
    memset(out, 0, sizeof *out);
    MT_CHECK(run_rank(0, NULL, &a) == MGPU_OK, "single-process run: %s", mgpu_last_error());
}

static mgpu_result run_threads(const run_spec *sp, snapshot *snaps, int init_seed_per_rank) {
    run_arg a;
    a.spec = sp; a.snaps = snaps; a.init_seed_per_rank = init_seed_per_rank;
    memset(snaps, 0, sizeof(snapshot) * (size_t)sp->world);
    return mgpu_dp_run(sp->world, run_rank, &a);
}

/* Worst ||a - b|| / ||b|| over the tensors (a non-finite value or a missing tensor gives 1e30). */
static double worst_rel_diff(const snapshot *a, const snapshot *b, char *worst_name) {
    double worst = 0;
    int i;
    if (a->n != b->n || a->n == 0) return 1e30;
    for (i = 0; i < a->n; i++) {
        double dd = 0, nb = 0, rel;
        int64_t k;
        for (k = 0; k < a->numel[i]; k++) {
            double x = a->data[a->offset[i] + k], y = b->data[b->offset[i] + k];
            dd += (x - y) * (x - y); nb += y * y;
        }
        rel = sqrt(dd) / (sqrt(nb) + 1e-30);
        if (!(rel == rel)) rel = 1e30;
        if (rel > worst) { worst = rel; if (worst_name) snprintf(worst_name, 32, "%s", a->names[i]); }
    }
    return worst;
}

static void check_equivalent(const run_spec *sp, double tol, const char *what) {
    static snapshot single, ranks[4];
    char name[32] = "";
    double rel;
    int r;
    run_single(sp, &single, 0);
    MT_CHECK(run_threads(sp, ranks, 0) == MGPU_OK, "%s: DDP run failed: %s", what, mgpu_last_error());
    rel = worst_rel_diff(&ranks[0], &single, name);
    MT_CHECK(rel < tol, "%s: rank 0 vs one process: relative difference %.3g in %s (tolerance %g)", what, rel, name, tol);
    for (r = 1; r < sp->world; r++)
        MT_CHECK(worst_rel_diff(&ranks[r], &ranks[0], NULL) == 0, "%s: rank %d's weights differ from rank 0's", what, r);
    MT_CHECK(ranks[0].batches_tracked == single.batches_tracked, "%s: num_batches_tracked %lld vs %lld", what,
             (long long)ranks[0].batches_tracked, (long long)single.batches_tracked);
    MT_CHECK(ranks[0].stats.allreduces == ranks[0].stats.buckets * sp->steps, "%s: %lld all-reduces for %lld buckets x %d steps", what,
             (long long)ranks[0].stats.allreduces, (long long)ranks[0].stats.buckets, sp->steps);
}

static run_spec base_spec(int kind, int world) {
    run_spec s;
    memset(&s, 0, sizeof s);
    s.kind = kind; s.world = world; s.batch = 4; s.accum = 1; s.steps = quick ? 6 : 20;
    s.compress = MGPU_F32;
    return s;
}

/* ---- tests ---- */

/* Bucket layout: reverse registration order, first bucket capped at first_bucket_mb, the rest at
   bucket_cap_mb, an oversized parameter alone, frozen parameters left out. */
static void test_bucket_assignment(void) {
    mgpu_context *ctx = rank_context(1);
    mgpu_model *m = mgpu_model_create(ctx);
    int64_t s_a[1] = {1000}, s_ab[1] = {10}, s_b[1] = {300000}, s_bb[1] = {10}, s_c[1] = {2000}, s_cb[1] = {5}, s_f[1] = {7};
    mgpu_comm *comm = NULL;
    mgpu_ddp_desc dd;
    mgpu_ddp *d;
    mgpu_ddp_bucket_info info;
    mgpu_ddp_stats st;
    mgpu_tensor *frozen;
    mgpu_model_add_parameter(m, "a.weight", MGPU_F32, 1, s_a);     /* 0: 4000 bytes */
    mgpu_model_add_parameter(m, "a.bias", MGPU_F32, 1, s_ab);      /* 1: 40 */
    mgpu_model_add_parameter(m, "b.weight", MGPU_F32, 1, s_b);     /* 2: 1.2 MB */
    mgpu_model_add_parameter(m, "b.bias", MGPU_F32, 1, s_bb);      /* 3: 40 */
    frozen = mgpu_model_add_parameter(m, "frozen", MGPU_F32, 1, s_f);   /* 4: requires_grad 0 */
    mgpu_model_add_parameter(m, "c.weight", MGPU_F32, 1, s_c);     /* 5: 8000 */
    mgpu_model_add_parameter(m, "c.bias", MGPU_F32, 1, s_cb);      /* 6: 20 */
    mgpu_tensor_set_requires_grad(frozen, 0);
    MT_CHECK(mgpu_comm_create_threads(1, 5, &comm) == MGPU_OK, "threads comm: %s", mgpu_last_error());
    if (!comm) { mgpu_model_destroy(m); mgpu_context_destroy(ctx); return; }
    /* 10 KiB first bucket, 0.5 MiB after: [c.bias c.weight b.bias] | [b.weight] alone | [a.bias a.weight] */
    memset(&dd, 0, sizeof dd);
    dd.first_bucket_mb = 10.0 / 1024; dd.bucket_cap_mb = 0.5;
    d = mgpu_ddp_create(m, comm, &dd);
    MT_CHECK(d != NULL, "create: %s", mgpu_last_error());
    if (d) {
        mgpu_ddp_get_stats(d, &st);
        MT_CHECK(st.buckets == 3, "3 buckets, got %lld", (long long)st.buckets);
        MT_CHECK(st.bytes_per_step == 4.0 * (1000 + 10 + 300000 + 10 + 2000 + 5), "bytes per step %g", st.bytes_per_step);
        MT_CHECK(mgpu_ddp_get_bucket(d, 0, &info) == MGPU_OK && info.n_params == 3 && info.params[0] == 6 && info.params[1] == 5 &&
                 info.params[2] == 3 && info.numel == 2015, "bucket 0 = c.bias, c.weight, b.bias (n %d numel %lld)", info.n_params, (long long)info.numel);
        MT_CHECK(mgpu_ddp_get_bucket(d, 1, &info) == MGPU_OK && info.n_params == 1 && info.params[0] == 2, "bucket 1 = b.weight alone");
        MT_CHECK(mgpu_ddp_get_bucket(d, 2, &info) == MGPU_OK && info.n_params == 2 && info.params[0] == 1 && info.params[1] == 0,
                 "bucket 2 = a.bias, a.weight");
        MT_CHECK(mgpu_ddp_get_bucket(d, 3, &info) == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "bucket 3"), "bucket 3 out of range");
        mgpu_ddp_destroy(d);
    }
    /* defaults, 1 MiB then 25 MiB: b.weight overflows the first bucket and starts the second */
    d = mgpu_ddp_create(m, comm, NULL);
    MT_CHECK(d != NULL, "create with defaults: %s", mgpu_last_error());
    if (d) {
        mgpu_ddp_get_stats(d, &st);
        MT_CHECK(st.buckets == 2, "2 buckets, got %lld", (long long)st.buckets);
        MT_CHECK(mgpu_ddp_get_bucket(d, 1, &info) == MGPU_OK && info.n_params == 3 && info.params[0] == 2 && info.params[2] == 0,
                 "bucket 1 = b.weight, a.bias, a.weight");
        mgpu_ddp_destroy(d);
    }
    /* a second DDP on the same context is refused while the first lives; bad descs are named */
    d = mgpu_ddp_create(m, comm, NULL);
    MT_CHECK(d && mgpu_ddp_create(m, comm, NULL) == NULL && mgpu_last_result() == MGPU_ERR_STATE, "second DDP refused");
    mgpu_ddp_destroy(d);
    memset(&dd, 0, sizeof dd); dd.bucket_cap_mb = -1;
    MT_CHECK(mgpu_ddp_create(m, comm, &dd) == NULL && strstr(mgpu_last_error(), "bucket_cap_mb"), "negative cap: %s", mgpu_last_error());
    memset(&dd, 0, sizeof dd); dd.compress = MGPU_I32;
    MT_CHECK(mgpu_ddp_create(m, comm, &dd) == NULL && strstr(mgpu_last_error(), "compress"), "I32 compression: %s", mgpu_last_error());
    MT_CHECK(mgpu_ddp_create(NULL, comm, NULL) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "NULL model");
    mgpu_comm_destroy(comm);
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
}

static void test_mlp_equivalence(void) {
    run_spec s = base_spec(NET_MLP, 1);
    check_equivalent(&s, 1e-6, "MLP W=1");
    s = base_spec(NET_MLP, 2);
    check_equivalent(&s, 1e-5, "MLP W=2");
    s = base_spec(NET_MLP, 4);
    s.first_mb = 1.0 / 1024;   /* several buckets */
    check_equivalent(&s, 1e-5, "MLP W=4");
}

static void test_cnn_syncbn_dropout_equivalence(void) {
    run_spec s = base_spec(NET_CNN, 2);
    s.sync_bn = 1; s.dropout = 0.25f;
    check_equivalent(&s, 1e-5, "CNN+SyncBN+dropout W=2");
    s.world = 4;
    check_equivalent(&s, 1e-5, "CNN+SyncBN+dropout W=4");
}

/* Without sync_batchnorm each rank normalises with its own statistics: no longer equivalent,
   which shows the SyncBN test above measures something. */
static void test_local_batchnorm_differs(void) {
    static snapshot single, ranks[2];
    run_spec s = base_spec(NET_CNN, 2);
    s.steps = 3;
    run_single(&s, &single, 0);
    MT_CHECK(run_threads(&s, ranks, 0) == MGPU_OK, "run: %s", mgpu_last_error());
    MT_CHECK(worst_rel_diff(&ranks[0], &single, NULL) > 1e-4, "local BN statistics differ from the combined batch's");
}

/* Ranks start from different weights; DDP broadcasts rank 0's. */
static void test_broadcast_from_rank0(void) {
    static snapshot single, ranks[2];
    run_spec s = base_spec(NET_MLP, 2);
    char name[32] = "";
    double rel;
    s.steps = 3;
    run_single(&s, &single, 1);   /* rank 0's init */
    MT_CHECK(run_threads(&s, ranks, 1) == MGPU_OK, "run: %s", mgpu_last_error());
    rel = worst_rel_diff(&ranks[1], &single, name);
    MT_CHECK(rel < 1e-5, "rank 1 trained from rank 0's weights: %.3g in %s", rel, name);
}

/* K micro-steps under set_sync(0), then a synced one, equal one step at K * B per rank. */
static void test_no_sync_accumulation(void) {
    static snapshot single, ranks[2];
    run_spec s = base_spec(NET_MLP, 2);
    char name[32] = "";
    double rel;
    s.accum = 3; s.steps = quick ? 3 : 8;
    run_single(&s, &single, 0);
    MT_CHECK(run_threads(&s, ranks, 0) == MGPU_OK, "run: %s", mgpu_last_error());
    rel = worst_rel_diff(&ranks[0], &single, name);
    MT_CHECK(rel < 1e-5, "accumulated DDP vs one process at K*W*B: %.3g in %s", rel, name);
    MT_CHECK(ranks[0].allreduces_during_no_sync == 0, "no all-reduce under no_sync (%lld)", (long long)ranks[0].allreduces_during_no_sync);
    MT_CHECK(ranks[0].stats.allreduces == ranks[0].stats.buckets * s.steps, "one all-reduce per bucket per synced step");
}

/* Gradients rounded to bf16/f16 on the wire: close to, but not the same as, full precision. */
static void test_compression(void) {
    static snapshot single, ranks[2];
    mgpu_dtype kinds[2] = {MGPU_BF16, MGPU_F16};
    int i;
    for (i = 0; i < 2; i++) {
        run_spec s = base_spec(NET_MLP, 2);
        double rel;
        s.compress = kinds[i];
        if (i == 0) run_single(&s, &single, 0);
        MT_CHECK(run_threads(&s, ranks, 0) == MGPU_OK, "run: %s", mgpu_last_error());
        rel = worst_rel_diff(&ranks[0], &single, NULL);
        MT_CHECK(rel < 1e-2 && rel > 1e-7, "%s compression: relative difference %.3g (expected rounding-sized)", mgpu_dtype_name(kinds[i]), rel);
        MT_CHECK(ranks[0].stats.bytes_per_step == 2.0 * (12 * 24 + 24 + 24 * 16 + 16 + 16 * 5 + 5), "16-bit bytes per step %g",
                 ranks[0].stats.bytes_per_step);
        MT_CHECK(worst_rel_diff(&ranks[1], &ranks[0], NULL) == 0, "ranks agree under compression");
    }
}

/* ---- overlap: the first bucket's all-reduce runs while backward is still busy with fc1 ---- */

typedef struct overlap_result {
    int n_buckets;
    mgpu_ddp_bucket_info info[8];   /* info[b].params dangles once the DDP is gone: see first_param */
    int first_param[8];
    int64_t hooks_ok;
    int overlapped_steps;     /* backwards in which a bucket finished before the end hook */
    mgpu_ddp_stats stats;
} overlap_result;

/* Reads the timeline of the backward that just ended. */
static void read_timeline(mgpu_ddp *d, overlap_result *res) {
    int b, overlapped = 0;
    mgpu_ddp_get_stats(d, &res->stats);
    res->n_buckets = (int)res->stats.buckets;
    for (b = 0; b < res->n_buckets && b < 8; b++) {
        mgpu_ddp_get_bucket(d, b, &res->info[b]);
        res->first_param[b] = res->info[b].params[0];
        if (res->info[b].hook_calls != res->info[b].n_params) res->hooks_ok = 0;
        overlapped |= res->info[b].done_before_end;
    }
    res->overlapped_steps += overlapped;
}

static mgpu_result overlap_rank(int rank, mgpu_comm *comm, void *argp) {
    overlap_result *res = (overlap_result *)argp + rank;
    int64_t B = quick ? 128 : 256, D = quick ? 256 : 512, H = quick ? 512 : 768, xs[2], i;
    mgpu_context *ctx = rank_context(3);
    mgpu_model *m = mgpu_model_create(ctx);
    mgpu_linear *fc1 = mgpu_linear_create(m, "fc1", D, H, 1), *fc2 = mgpu_linear_create(m, "fc2", H, H, 1);
    mgpu_linear *fc3 = mgpu_linear_create(m, "fc3", H, CLASSES, 1);
    mgpu_ddp_desc dd;
    mgpu_ddp *d;
    mgpu_tensor *x, *y, *h, *loss;
    int64_t *labels = (int64_t *)calloc((size_t)B, sizeof(int64_t));
    mgpu_result r = MGPU_OK;
    int step;
    memset(&dd, 0, sizeof dd);
    dd.first_bucket_mb = 0.001;   /* fc3.bias alone: ready right after the last layer's backward */
    dd.bucket_cap_mb = 0.25;      /* [fc3.weight fc2.bias] [fc2.weight] [fc1.bias] [fc1.weight] */
    d = mgpu_ddp_create(m, comm, &dd);
    xs[0] = B; xs[1] = D;
    x = mt_rand(ctx, 2, xs, -1, 1, 0);
    for (i = 0; i < B; i++) labels[i] = (i + rank) % CLASSES;
    y = mgpu_tensor_from_host(ctx, MGPU_I64, 1, xs, labels);
    if (!d) r = mgpu_last_result();
    res->hooks_ok = 1;
    /* several steps, so a rank descheduled at the wrong moment on a loaded machine cannot fail the test */
    for (step = 0; r == MGPU_OK && step < 3; step++) {
        mgpu_model_zero_grad(m);
        /* fc2 is applied twice: its hook must still fire once, after its last contribution */
        h = mgpu_op_relu(ctx, mgpu_linear_forward(ctx, fc1, x));
        h = mgpu_op_relu(ctx, mgpu_linear_forward(ctx, fc2, h));
        h = mgpu_op_relu(ctx, mgpu_linear_forward(ctx, fc2, h));
        loss = mgpu_op_cross_entropy(ctx, mgpu_linear_forward(ctx, fc3, h), y);
        r = mgpu_backward(ctx, loss);
        if (r == MGPU_OK) read_timeline(d, res);
        mgpu_context_end_step(ctx);
    }
    mgpu_ddp_destroy(d);
    mgpu_tensor_free(x); mgpu_tensor_free(y); free(labels);
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
    return r;
}

static void test_overlap_and_hooks(void) {
    static overlap_result res[2];
    const mgpu_ddp_bucket_info *first, *last;
    int b;
    memset(res, 0, sizeof res);
    MT_CHECK(mgpu_dp_run(2, overlap_rank, res) == MGPU_OK, "run: %s", mgpu_last_error());
    MT_CHECK(res[0].n_buckets == 5, "5 buckets, got %d", res[0].n_buckets);
    if (res[0].n_buckets < 2) return;
    MT_CHECK(res[0].hooks_ok && res[1].hooks_ok, "each parameter's hook fired exactly once per backward (fc2 is used twice)");
    MT_CHECK(res[0].info[0].n_params == 1 && res[0].first_param[0] == 5, "bucket 0 holds fc3.bias only");
    for (b = 0; b < res[0].n_buckets && b < 8; b++)
        MT_CHECK(res[0].info[b].launch_s > 0 && res[0].info[b].done_s >= res[0].info[b].launch_s, "bucket %d has a timeline", b);
    /* bucket 0 is issued right after fc3's backward, while fc2 and fc1 still have to be differentiated */
    first = &res[0].info[0]; last = &res[0].info[res[0].n_buckets - 1];
    MT_CHECK(first->launch_s < first->backward_end_s, "first all-reduce issued before backward's end (%.6f vs %.6f)",
             first->launch_s, first->backward_end_s);
    MT_CHECK(first->launch_s < last->launch_s, "bucket 0 launched before fc1.weight's bucket");
    MT_CHECK(res[0].overlapped_steps >= 1, "in some backward, a bucket's all-reduce completed while backward was still running");
    printf("  overlap: %lld buckets, %.0f bytes/step; over 3 steps comm %.3f ms, exposed (end-of-backward wait) %.3f ms\n",
           (long long)res[0].stats.buckets, res[0].stats.bytes_per_step, 1e3 * res[0].stats.comm_s, 1e3 * res[0].stats.exposed_s);
    MT_CHECK(res[0].stats.allreduces == 3 * res[0].stats.buckets && res[0].stats.comm_s > 0 && res[0].stats.exposed_s >= 0,
             "stats: %lld all-reduces, comm %.6f s, exposed %.6f s", (long long)res[0].stats.allreduces, res[0].stats.comm_s, res[0].stats.exposed_s);
}

/* ---- unused parameters: a bucket whose grads never became ready is still reduced ---- */

typedef struct unused_result { float used_on_one[3]; int unused_has_grad; int sum_ok; } unused_result;

static mgpu_result unused_rank(int rank, mgpu_comm *comm, void *argp) {
    unused_result *res = (unused_result *)argp + rank;
    mgpu_context *ctx = rank_context(5);
    mgpu_model *m = mgpu_model_create(ctx);
    int64_t s3[1] = {3};
    mgpu_tensor *a = mgpu_model_add_parameter(m, "a", MGPU_F32, 1, s3);
    mgpu_tensor *only1 = mgpu_model_add_parameter(m, "only_rank1", MGPU_F32, 1, s3);
    mgpu_tensor *never = mgpu_model_add_parameter(m, "never", MGPU_F32, 1, s3);
    mgpu_ddp *d;
    mgpu_tensor *loss;
    mgpu_result r;
    (void)never;
    mgpu_tensor_fill(a, 1.0); mgpu_tensor_fill(only1, 2.0);
    d = mgpu_ddp_create(m, comm, NULL);
    if (!d) { mgpu_model_destroy(m); mgpu_context_destroy(ctx); return mgpu_last_result(); }
    /* loss = sum(a * (rank + 1)) (+ sum(only_rank1 * 4) on rank 1): d loss / d only_rank1 = 4 on rank 1, 0 on rank 0 */
    loss = mgpu_op_sum(ctx, mgpu_op_scale(ctx, a, (float)(rank + 1)));
    if (rank == 1) loss = mgpu_op_add(ctx, loss, mgpu_op_sum(ctx, mgpu_op_scale(ctx, only1, 4.0f)));
    r = mgpu_backward(ctx, loss);
    if (r == MGPU_OK) {
        if (only1->grad) memcpy(res->used_on_one, only1->grad->data, sizeof res->used_on_one);
        res->unused_has_grad = never->grad != NULL;
        res->sum_ok = a->grad && ((float *)a->grad->data)[0] == 1.5f && ((float *)a->grad->data)[2] == 1.5f;
    }
    mgpu_context_end_step(ctx);
    mgpu_ddp_destroy(d);
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
    return r;
}

static void test_unused_parameters(void) {
    static unused_result res[2];
    int r;
    memset(res, 0, sizeof res);
    MT_CHECK(mgpu_dp_run(2, unused_rank, res) == MGPU_OK, "run: %s", mgpu_last_error());
    for (r = 0; r < 2; r++) {
        MT_CHECK(res[r].sum_ok, "rank %d: grad of a is the average (1 + 2) / 2", r);
        MT_CHECK(res[r].used_on_one[0] == 2.0f && res[r].used_on_one[2] == 2.0f, "rank %d: a parameter used on rank 1 only averages to 2, got %g",
                 r, res[r].used_on_one[0]);
        MT_CHECK(!res[r].unused_has_grad, "rank %d: a parameter no rank used keeps no grad", r);
    }
}

/* ---- models that differ across ranks are named, not hung on ---- */

typedef struct mismatch_result { mgpu_result r; char error[512]; } mismatch_result;

static mgpu_result mismatch_rank(int rank, mgpu_comm *comm, void *argp) {
    mismatch_result *res = (mismatch_result *)argp + rank;
    mgpu_context *ctx = rank_context(5);
    mgpu_model *m = mgpu_model_create(ctx);
    mgpu_ddp *d;
    mgpu_linear_create(m, "fc1", 4, 8, 1);
    mgpu_linear_create(m, "fc2", 8, rank == 1 ? 3 : 2, 1);
    d = mgpu_ddp_create(m, comm, NULL);
    res->r = d ? MGPU_OK : mgpu_last_result();
    snprintf(res->error, sizeof res->error, "%s", mgpu_last_error());
    mgpu_ddp_destroy(d);
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
    return MGPU_OK;
}

static void test_model_mismatch(void) {
    static mismatch_result res[2];
    int r;
    memset(res, 0, sizeof res);
    MT_CHECK(mgpu_dp_run(2, mismatch_rank, res) == MGPU_OK, "run: %s", mgpu_last_error());
    for (r = 0; r < 2; r++) {
        MT_CHECK(res[r].r == MGPU_ERR_SHAPE, "rank %d: MGPU_ERR_SHAPE, got %d", r, res[r].r);
        MT_CHECK(strstr(res[r].error, "fc2.weight") && strstr(res[r].error, "(2, 8)") && strstr(res[r].error, "(3, 8)") &&
                 strstr(res[r].error, "rank 1"), "rank %d: the message names tensor, shapes and rank: %s", r, res[r].error);
    }
}

/* ---- DataParallel ---- */

static mgpu_result failing_replica(int rank, mgpu_comm *comm, void *arg) {
    void *data = NULL;
    size_t len = 0;
    (void)comm; (void)arg;
    if (rank == 1) return mgpu_read_file("/nonexistent/disk on fire", &data, &len);   /* MGPU_ERR_IO naming the path */
    return MGPU_OK;
}

/* Rank 1 fails before DDP; rank 0 waits for it in mgpu_ddp_create until the timeout. */
static mgpu_result late_failing_replica(int rank, mgpu_comm *comm, void *arg) {
    mgpu_context *ctx;
    mgpu_model *m;
    mgpu_ddp *d;
    mgpu_result r;
    if (rank == 1) return failing_replica(rank, comm, arg);
    ctx = rank_context(1);
    m = mgpu_model_create(ctx);
    mgpu_linear_create(m, "fc", 2, 2, 1);
    d = mgpu_ddp_create(m, comm, NULL);
    r = d ? MGPU_OK : mgpu_last_result();
    mgpu_ddp_destroy(d);
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
    return r;
}

static void test_data_parallel(void) {
    static snapshot single, ranks[2];
    run_spec s = base_spec(NET_CNN, 2);
    char name[32] = "";
    double rel;
    s.sync_bn = 1; s.dropout = 0.1f;
    s.batch = 3; s.steps = quick ? 4 : 10;
    run_single(&s, &single, 0);
    MT_CHECK(run_threads(&s, ranks, 0) == MGPU_OK, "DP run: %s", mgpu_last_error());
    rel = worst_rel_diff(&ranks[0], &single, name);
    MT_CHECK(rel < 1e-5, "DP with 2 replicas vs one device at the combined batch: %.3g in %s", rel, name);
    MT_CHECK(mgpu_dp_run(2, failing_replica, NULL) == MGPU_ERR_IO && strstr(mgpu_last_error(), "replica 1") &&
             strstr(mgpu_last_error(), "disk on fire"), "a replica's failure is reported: %s", mgpu_last_error());
    /* the root cause is reported, not the timeout it caused in rank 0 */
    setenv("MGPU_TIMEOUT_S", "1", 1);
    MT_CHECK(mgpu_dp_run(2, late_failing_replica, NULL) == MGPU_ERR_IO && strstr(mgpu_last_error(), "replica 1"),
             "the failing replica is blamed, not the one that timed out: %s", mgpu_last_error());
    unsetenv("MGPU_TIMEOUT_S");
    MT_CHECK(mgpu_dp_run(0, failing_replica, NULL) == MGPU_ERR_INVALID_ARG, "0 replicas rejected");
    MT_CHECK(mgpu_dp_run(2, NULL, NULL) == MGPU_ERR_INVALID_ARG, "NULL replica function rejected");
}

/* ---- processes: fork + shm at 2 ranks ---- */

static int free_port(void) {
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0), port = 0;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET; a.sin_addr.s_addr = htonl(INADDR_LOOPBACK); a.sin_port = 0;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && getsockname(fd, (struct sockaddr *)&a, &len) == 0) port = ntohs(a.sin_port);
    if (fd >= 0) close(fd);
    return port;
}

static void process_rank(int rank, int world, int port, const run_spec *s, snapshot *shared) {
    mgpu_dist_env env;
    mgpu_comm_desc cd;
    mgpu_comm *comm;
    run_arg a;
    alarm(60);   /* never outlive a hung peer */
    memset(&env, 0, sizeof env);
    env.rank = rank; env.world_size = world; env.local_rank = rank; env.local_world_size = world;
    snprintf(env.master_addr, sizeof env.master_addr, "127.0.0.1"); env.master_port = port; env.source = "test";
    memset(&cd, 0, sizeof cd);
    cd.backend = MGPU_COMM_SHM; cd.env = &env; cd.timeout_s = 20;
    comm = mgpu_comm_create(&cd);
    a.spec = s; a.snaps = shared; a.init_seed_per_rank = 1;
    if (!comm) { shared[rank].result = mgpu_last_result(); snprintf(shared[rank].error, sizeof shared[rank].error, "%s", mgpu_last_error()); _exit(2); }
    run_rank(rank, comm, &a);
    mgpu_comm_destroy(comm);
    _exit(shared[rank].result == MGPU_OK ? 0 : 1);
}

static void test_processes_shm(void) {
    static snapshot single;
    run_spec s = base_spec(NET_CNN, 2);
    snapshot *shared;
    pid_t pids[2];
    int r, status, port = free_port();
    char name[32] = "";
    double rel;
    s.sync_bn = 1; s.dropout = 0.2f; s.first_mb = 0.5 / 1024;
    run_single(&s, &single, 1);
    shared = (snapshot *)mmap(NULL, 2 * sizeof(snapshot), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    MT_CHECK(shared != MAP_FAILED && port > 0, "shared memory and a free port");
    if (shared == MAP_FAILED || port <= 0) return;
    memset(shared, 0, 2 * sizeof(snapshot));
    fflush(stdout); fflush(stderr);
    for (r = 0; r < 2; r++) {
        pids[r] = fork();
        if (pids[r] == 0) process_rank(r, 2, port, &s, shared);
    }
    for (r = 0; r < 2; r++) {
        status = -1;
        if (pids[r] > 0) waitpid(pids[r], &status, 0);
        MT_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "rank %d process exit status %d: %s", r, status, shared[r].error);
    }
    rel = worst_rel_diff(&shared[0], &single, name);
    MT_CHECK(rel < 1e-5, "2 processes over shm vs one process: %.3g in %s", rel, name);
    MT_CHECK(worst_rel_diff(&shared[1], &shared[0], NULL) == 0, "both processes end with the same weights");
    munmap(shared, 2 * sizeof(snapshot));
}

int main(void) {
    quick = getenv("MGPU_TEST_QUICK") != NULL && atoi(getenv("MGPU_TEST_QUICK")) != 0;
    make_data();
    MT_RUN(test_bucket_assignment);
    MT_RUN(test_mlp_equivalence);
    MT_RUN(test_cnn_syncbn_dropout_equivalence);
    MT_RUN(test_local_batchnorm_differs);
    MT_RUN(test_broadcast_from_rank0);
    MT_RUN(test_no_sync_accumulation);
    MT_RUN(test_compression);
    MT_RUN(test_overlap_and_hooks);
    MT_RUN(test_unused_parameters);
    MT_RUN(test_model_mismatch);
    MT_RUN(test_data_parallel);
    MT_RUN(test_processes_shm);
    return MT_END();
}
