/* Checkpoint throughput on a ~100M-parameter model with AdamW state (~1.2 GB per checkpoint):
   save and load in MB/s next to `cp` (+ fsync) and `cat` of the same bytes on the same disk, and
   how long a background save blocks the training thread (the host snapshot) against the whole
   save. Numbers are with a warm page cache for reads (the files were just written).

   Build:  cc -O3 -march=native -I. bench/bench_checkpoint.c -o build/bench_checkpoint -lm -lpthread
   Run:    build/bench_checkpoint [DIR=build/bench_checkpoint.d] [million_params=100] */
#define MGPU_IMPLEMENTATION
#include "mgpu.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LAYER 2900 /* 12 layers of 2900 x 2900 weights plus biases: 101M parameters */

static mgpu_model *make_model(mgpu_context *ctx, int layers, mgpu_optimizer **opt) {
    mgpu_model *m = mgpu_model_create(ctx);
    mgpu_optimizer_desc od = mgpu_optimizer_desc_default(MGPU_OPTIM_ADAMW);
    int64_t wshape[2] = {LAYER, LAYER}, bshape[1] = {LAYER};
    int i;
    for (i = 0; m && i < layers; i++) {
        char name[64];
        mgpu_tensor *w, *b;
        snprintf(name, sizeof name, "layers.%d.weight", i);
        w = mgpu_model_add_parameter(m, name, MGPU_F32, 2, wshape);
        snprintf(name, sizeof name, "layers.%d.bias", i);
        b = mgpu_model_add_parameter(m, name, MGPU_F32, 1, bshape);
        if (!w || !b) return NULL;
    }
    *opt = m ? mgpu_optimizer_create(m, &od) : NULL;
    return *opt ? m : NULL;
}

/* Non-trivial weights and moments: one AdamW step on patterned weights and gradients. */
static void fill(mgpu_model *m, mgpu_optimizer *o) {
    int i;
    int64_t k;
    for (i = 0; i < mgpu_model_num_parameters(m); i++) {
        mgpu_tensor *p = mgpu_model_parameter(m, i, NULL);
        float *d = (float *)p->data, *g;
        p->grad = mgpu_tensor_create(p->ctx, MGPU_F32, p->ndim, p->shape);
        g = (float *)p->grad->data;
        for (k = 0; k < p->numel; k++) { d[k] = (float)((k * 2654435761u) % 1000) * 1e-3f - 0.5f; g[k] = d[k] * 0.01f; }
    }
    mgpu_optimizer_step(o);
}

static double run(const char *cmd) {
    double t0 = mgpu_time_s();
    if (system(cmd) != 0) fprintf(stderr, "bench_checkpoint: '%s' failed\n", cmd);
    return mgpu_time_s() - t0;
}

static mgpu_checkpointer *checkpointer(const char *dir, int background) {
    mgpu_checkpoint_desc d;
    memset(&d, 0, sizeof d);
    d.dir = dir; d.keep_last = 1; d.background = background;
    return mgpu_checkpointer_create(&d);
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "build/bench_checkpoint.d";
    int millions = argc > 2 ? atoi(argv[2]) : 100, layers = (int)((double)millions * 1e6 / ((double)LAYER * (LAYER + 1)) + 0.5);
    char cmd[2048], step[1024];
    mgpu_context_desc cd;
    mgpu_context *ctx;
    mgpu_model *m, *m2;
    mgpu_optimizer *o, *o2;
    mgpu_checkpointer *c;
    double mb, t_save = 1e30, t_load = 1e30, t_cp = 1e30, t_cat = 1e30, t_snap[3], t_full[3];
    int rep;
    memset(&cd, 0, sizeof cd);
    ctx = mgpu_context_create(&cd);
    if (layers < 1) layers = 1;
    if (!ctx || !(m = make_model(ctx, layers, &o)) || !(m2 = make_model(ctx, layers, &o2))) {
        fprintf(stderr, "bench_checkpoint: %s\n", mgpu_last_error());
        return 1;
    }
    fill(m, o);
    mb = 3.0 * 4.0 * (double)mgpu_model_parameter_count(m) / 1e6; /* weights + two moments */
    printf("model: %.1fM parameters; checkpoint %.0f MB (weights + AdamW moments); dir %s; %d threads\n",
           (double)mgpu_model_parameter_count(m) / 1e6, mb, dir, mgpu_context_num_threads(ctx));
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s.cp'", dir, dir);
    run(cmd);
    for (rep = 0; rep < 3; rep++) {
        double t0;
        c = checkpointer(dir, 0);
        t0 = mgpu_time_s();
        if (mgpu_checkpointer_save(c, 100 + rep, m, o, NULL) != MGPU_OK) { fprintf(stderr, "save: %s\n", mgpu_last_error()); return 1; }
        t_save = MGPU__MIN(t_save, mgpu_time_s() - t0);
        mgpu_checkpointer_destroy(c);
        snprintf(step, sizeof step, "%s/step-%08d", dir, 100 + rep);
        t0 = mgpu_time_s();
        if (mgpu_checkpoint_load(step, m2, o2, NULL) != MGPU_OK) { fprintf(stderr, "load: %s\n", mgpu_last_error()); return 1; }
        t_load = MGPU__MIN(t_load, mgpu_time_s() - t0);
        /* the same bytes with the shell's tools: cp + fsync of the copies, cat to /dev/null */
        snprintf(cmd, sizeof cmd, "rm -rf '%s.cp' && cp -r '%s' '%s.cp' && sync '%s.cp'/*", dir, step, dir, dir);
        t_cp = MGPU__MIN(t_cp, run(cmd));
        snprintf(cmd, sizeof cmd, "cat '%s'/*.safetensors > /dev/null", step);
        t_cat = MGPU__MIN(t_cat, run(cmd));
    }
    /* background: the training thread waits only for the snapshot; the first save also pays the
       page faults of the fresh snapshot buffer, later ones reuse it */
    c = checkpointer(dir, 1);
    for (rep = 0; rep < 2; rep++) {
        double t0 = mgpu_time_s();
        mgpu_checkpointer_save(c, 200 + rep, m, o, NULL);
        t_snap[rep] = mgpu_time_s() - t0;
        if (mgpu_checkpointer_wait(c) != MGPU_OK) { fprintf(stderr, "background save: %s\n", mgpu_last_error()); return 1; }
        t_full[rep] = mgpu_time_s() - t0;
    }
    mgpu_checkpointer_destroy(c);
    /* what a fit does: the snapshot buffer is reserved on the writer thread at setup, while the
       first steps train (here: waited for), so even the first save only copies */
    c = checkpointer(dir, 1);
    mgpu__checkpointer_reserve(c, m, o);
    mgpu_checkpointer_wait(c);
    {
        double t0 = mgpu_time_s();
        mgpu_checkpointer_save(c, 300, m, o, NULL);
        t_snap[2] = mgpu_time_s() - t0;
        if (mgpu_checkpointer_wait(c) != MGPU_OK) { fprintf(stderr, "background save: %s\n", mgpu_last_error()); return 1; }
        t_full[2] = mgpu_time_s() - t0;
    }
    mgpu_checkpointer_destroy(c);
    printf("save (fsync'd, checksummed)   %7.2f s  %7.0f MB/s\n", t_save, mb / t_save);
    printf("cp -r + sync of the same files %7.2f s  %7.0f MB/s   (save/cp time ratio %.2f)\n", t_cp, mb / t_cp, t_save / t_cp);
    printf("load (validated, checksummed) %7.2f s  %7.0f MB/s   (warm page cache)\n", t_load, mb / t_load);
    printf("cat of the same files          %7.2f s  %7.0f MB/s   (load/cat time ratio %.2f)\n", t_cat, mb / t_cat, t_load / t_cat);
    for (rep = 0; rep < 3; rep++)
        printf("background save %d: training blocked %.3f s (snapshot) of %.2f s for the whole save (%.0f%%)%s\n", rep + 1, t_snap[rep],
               t_full[rep], 100.0 * t_snap[rep] / t_full[rep],
               rep == 0 ? ", fresh snapshot buffer" : rep == 1 ? ", snapshot buffer reused" : ", first save, buffer reserved at setup");
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s.cp'", dir, dir);
    run(cmd);
    mgpu_optimizer_destroy(o); mgpu_optimizer_destroy(o2);
    mgpu_model_destroy(m); mgpu_model_destroy(m2);
    mgpu_context_destroy(ctx);
    return 0;
}
