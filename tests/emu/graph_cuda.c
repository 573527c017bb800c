/* CUDA Graph capture of the trainer's step (--cuda-graph on), under the CUDA emulation:

   - a small MLP with dropout trained on cuda:0 for 2 epochs (4 full batches and a partial one per
     epoch, evaluation with a larger batch between epochs, Adam with a cosine schedule and
     clipping) ends with the same weights, bit for bit, the same RNG position and optimizer step
     count with capture on as with it off (the replays' step scalars and hooks at work);
   - the same with SGD and momentum (the {lr, first} step scalars);
   - a forward that synchronises with the host (it reads its input back) cannot be captured: the
     run says "cuda graph off from step 3: capturing the step failed" and trains on eagerly, to the
     weights of a run with capture off.

   Prints "RESULT ...: N passed, M failed". */
#define _GNU_SOURCE
#define MGPU_IMPLEMENTATION
#include "mgpu.h"
#include "mgpu_test.h"
#include <fcntl.h>
#include <unistd.h>

#define N_TRAIN 70   /* batch 16: 4 full batches and one of 6 per epoch */
#define N_TEST 40
#define FEATURES 8
#define CLASSES 4

typedef struct net { mgpu_linear *fc1, *fc2; int sync_in_forward; } net;
static int sync_in_forward;   /* the next models read their input back in forward (a host sync) */

static int build(mgpu_model *m, void *user) {
    net *n = (net *)user;
    n->fc1 = mgpu_linear_create(m, "fc1", FEATURES, 16, 1);
    n->fc2 = n->fc1 ? mgpu_linear_create(m, "fc2", 16, CLASSES, 1) : NULL;
    n->sync_in_forward = sync_in_forward;
    return n->fc2 != NULL;
}
static mgpu_tensor *forward(mgpu_context *ctx, mgpu_tensor *x, void *user) {
    net *n = (net *)user;
    if (n->sync_in_forward && isnan(mgpu_tensor_item(x))) return NULL;   /* fails inside a capture */
    mgpu_tensor *h = mgpu_op_relu(ctx, mgpu_linear_forward(ctx, n->fc1, x));
    return mgpu_linear_forward(ctx, n->fc2, mgpu_op_dropout(ctx, h, 0.3f, 1));
}

static mgpu_dataset *dataset(int64_t n, uint64_t seed) {
    static float x[N_TRAIN * FEATURES];
    static int64_t y[N_TRAIN];
    int64_t shape[1] = {FEATURES}, i;
    mt_rng_state = seed;
    for (i = 0; i < n * FEATURES; i++) x[i] = (float)mt_uniform(-1, 1);
    for (i = 0; i < n; i++) y[i] = (int64_t)(mt_uniform(0, CLASSES)) % CLASSES;
    return mgpu_dataset_from_arrays(n, MGPU_F32, 1, shape, x, MGPU_I64, 0, NULL, y);
}

/* One run's outcome: final parameters on the host, the context's RNG position, the steps taken,
   and what the run printed. */
typedef struct outcome { mgpu_result r; float params[FEATURES * 16 + 16 + 16 * CLASSES + CLASSES]; uint64_t rng; int64_t steps; char log[4096]; } outcome;

/* Trains a fresh model with capture on or off, its stdout kept in out->log. */
static void train(mgpu_cuda_graph_mode mode, mgpu_optimizer_type opt, outcome *out) {
    mgpu_train_opts o;
    mgpu_trainer *t;
    mgpu_model *m;
    net n;
    mgpu_dataset *train_ds = dataset(N_TRAIN, 11), *test_ds = dataset(N_TEST, 12);
    mgpu_train_summary s;
    char path[] = "/tmp/mgpu-graph-test-XXXXXX";
    int fd = mkstemp(path), saved = dup(1), i, off = 0;
    ssize_t got;
    memset(out, 0, sizeof *out);
    memset(&s, 0, sizeof s);
    mgpu_train_opts_default(&o);
    o.device = MGPU_DEVICE_KIND_CUDA; o.device_index = 0;
    o.epochs = 2; o.batch_size = 16; o.seed = 5; o.lr = 0.01f; o.optimizer = opt; o.momentum = 0.9f;
    o.schedule = MGPU_SCHEDULE_COSINE; o.clip_grad_norm = 1.0f; o.cuda_graph = mode; o.log_every = 0; o.metrics = NULL;
    fflush(stdout);
    dup2(fd, 1);
    t = mgpu_trainer_create(&o);
    memset(&n, 0, sizeof n);
    m = t ? mgpu_model_create(mgpu_trainer_context(t)) : NULL;
    out->r = m && build(m, &n) ? mgpu_trainer_fit(t, m, forward, &n, train_ds, test_ds, &s) : mgpu_last_result();
    fflush(stdout);
    dup2(saved, 1);
    close(saved);
    lseek(fd, 0, SEEK_SET);
    got = read(fd, out->log, sizeof out->log - 1);
    out->log[got > 0 ? got : 0] = 0;
    close(fd);
    unlink(path);
    if (out->r == MGPU_OK) {
        for (i = 0; i < mgpu_model_num_parameters(m); i++) {
            const mgpu_tensor *p = mgpu_model_parameter(m, i, NULL);
            mgpu_tensor_copy_to_host(p, out->params + off, sizeof out->params - sizeof(float) * (size_t)off);
            off += (int)p->numel;
        }
        mgpu_context_rng_state(mgpu_trainer_context(t), NULL, &out->rng);
        out->steps = s.steps;
    }
    mgpu_model_destroy(m);
    mgpu_trainer_destroy(t);
    mgpu_dataset_destroy(train_ds);
    mgpu_dataset_destroy(test_ds);
}

static void expect_same_run(const outcome *on, const outcome *off) {
    MT_CHECK(on->r == MGPU_OK && off->r == MGPU_OK, "runs failed: on %d, off %d (%s)", on->r, off->r, mgpu_last_error());
    MT_CHECK(memcmp(on->params, off->params, sizeof on->params) == 0, "final weights differ between --cuda-graph on and off");
    MT_CHECK(on->rng == off->rng && on->rng > 0, "RNG position: %llu captured, %llu eager", (unsigned long long)on->rng, (unsigned long long)off->rng);
    MT_CHECK(on->steps == off->steps && on->steps == 10, "steps: %lld captured, %lld eager (expected 10)", (long long)on->steps, (long long)off->steps);
}

static void graph_adam_matches_eager(void) {
    static outcome on, off;
    train(MGPU_CUDA_GRAPH_ON, MGPU_OPTIM_ADAM, &on);
    train(MGPU_CUDA_GRAPH_OFF, MGPU_OPTIM_ADAM, &off);
    expect_same_run(&on, &off);
    MT_CHECK(strstr(on.log, "cuda graph captured at step 3") != NULL, "no capture announced: %s", on.log);
    MT_CHECK(strstr(off.log, "; cuda graph off\n") != NULL, "the off run's startup line: %s", off.log);
}
static void graph_sgd_matches_eager(void) {
    static outcome on, off;
    train(MGPU_CUDA_GRAPH_ON, MGPU_OPTIM_SGD, &on);
    train(MGPU_CUDA_GRAPH_OFF, MGPU_OPTIM_SGD, &off);
    expect_same_run(&on, &off);
}
static void graph_capture_failure_runs_eagerly(void) {
    static outcome on, off;
    sync_in_forward = 1;
    train(MGPU_CUDA_GRAPH_ON, MGPU_OPTIM_ADAM, &on);
    train(MGPU_CUDA_GRAPH_OFF, MGPU_OPTIM_ADAM, &off);
    sync_in_forward = 0;
    expect_same_run(&on, &off);
    MT_CHECK(strstr(on.log, "cuda graph off from step 3: capturing the step failed") != NULL, "no fallback said: %s", on.log);
    MT_CHECK(strstr(on.log, "cuda graph captured") == NULL, "captured a step that synchronises: %s", on.log);
}

int main(void) {
    if (mgpu_cuda_device_count() < 1) { printf("SKIPPED: no CUDA device\n"); return MT_END(); }
    MT_RUN(graph_adam_matches_eager);
    MT_RUN(graph_sgd_matches_eager);
    MT_RUN(graph_capture_failure_runs_eagerly);
    return MT_END();
}
