/* Fuzz target: checkpoint loading on arbitrary bytes. A valid checkpoint of a small model
   (Linear(3, 2) "fc" + BatchNorm2d(2) "bn", AdamW) is made once in memory; each input then stands
   in, in turn, for its trainer_state.json, model.safetensors and optimizer.safetensors, loaded
   through mgpu_checkpoint_load_bytes into the live model. Any input must either load or give a
   format/shape error that leaves the model and optimizer exactly as they were. */
#define _GNU_SOURCE /* mkdtemp */
#include "mgpu.h"
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static struct {
    mgpu_context *ctx; mgpu_model *m; mgpu_optimizer *o;
    void *file[3]; size_t len[3];   /* model, optimizer, trainer_state of the valid checkpoint */
} g;

static void fuzz_init(void) {
    static const char *const names[3] = {"model.safetensors", "optimizer.safetensors", "trainer_state.json"};
    char dir[] = "/tmp/mgpu_fuzz_checkpoint.XXXXXX", path[256], step[300];
    mgpu_context_desc cd;
    mgpu_checkpoint_desc kd;
    mgpu_optimizer_desc od = mgpu_optimizer_desc_default(MGPU_OPTIM_ADAMW);
    mgpu_checkpointer *c;
    int i;
    memset(&cd, 0, sizeof cd);
    cd.num_threads = 1;
    g.ctx = mgpu_context_create(&cd);
    g.m = mgpu_model_create(g.ctx);
    if (!mgpu_linear_create(g.m, "fc", 3, 2, 1) || !mgpu_batchnorm2d_create(g.m, "bn", 2) || !(g.o = mgpu_optimizer_create(g.m, &od))) abort();
    if (!mkdtemp(dir)) abort();
    memset(&kd, 0, sizeof kd);
    kd.dir = dir;
    c = mgpu_checkpointer_create(&kd);
    if (!c || mgpu_checkpointer_save(c, 1, g.m, g.o, NULL) != MGPU_OK) abort();
    mgpu_checkpointer_destroy(c);
    snprintf(step, sizeof step, "%s/step-00000001", dir);
    for (i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s", step, names[i]);
        if (mgpu_read_file(path, &g.file[i], &g.len[i]) != MGPU_OK) abort();
        unlink(path);
    }
    snprintf(path, sizeof path, "%s/latest", dir);
    unlink(path);
    rmdir(step);
    rmdir(dir);
}

/* A hash of every parameter, buffer and optimizer state byte. */
static uint64_t state_hash(void) {
    uint64_t h = 1469598103934665603ULL;
    int i, k;
    for (k = 0; k < 3; k++) {
        int n = k == 0 ? mgpu_model_num_parameters(g.m) : k == 1 ? mgpu_model_num_buffers(g.m) : mgpu_optimizer_num_states(g.o);
        for (i = 0; i < n; i++) {
            const mgpu_tensor *t = k == 0 ? mgpu_model_parameter(g.m, i, NULL) : k == 1 ? mgpu_model_buffer(g.m, i, NULL) : mgpu_optimizer_state(g.o, i, NULL);
            size_t b, nb = mgpu_tensor_nbytes(t);
            for (b = 0; b < nb; b++) h = (h ^ ((const uint8_t *)t->data)[b]) * 1099511628211ULL;
        }
    }
    return h ^ (uint64_t)mgpu_optimizer_step_count(g.o);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int which;
    if (!g.ctx) fuzz_init();
    for (which = 0; which < 3; which++) {
        const void *f[3];
        size_t l[3];
        mgpu_checkpoint_bytes files;
        mgpu_json *state = NULL;
        uint64_t before = state_hash();
        mgpu_result r;
        int i;
        for (i = 0; i < 3; i++) { f[i] = g.file[i]; l[i] = g.len[i]; }
        f[which] = data; l[which] = size;
        files.model = f[0]; files.model_len = l[0];
        files.optimizer = f[1]; files.optimizer_len = l[1];
        files.trainer_state = (const char *)f[2]; files.trainer_state_len = l[2];
        r = mgpu_checkpoint_load_bytes(&files, "fuzz", g.m, g.o, &state);
        if (r == MGPU_OK) {
            if (!state || mgpu_json_get(state, "step") == NULL) abort();
        } else {
            if (r != MGPU_ERR_FORMAT && r != MGPU_ERR_SHAPE && r != MGPU_ERR_UNSUPPORTED && r != MGPU_ERR_OOM_HOST) abort();
            if (state || !strstr(mgpu_last_error(), "fuzz")) abort();   /* the message names the checkpoint */
            if (state_hash() != before) abort();                        /* nothing loaded on failure */
        }
        mgpu_json_free(state);
    }
    return 0;
}

#include "fuzz_replay.h"
