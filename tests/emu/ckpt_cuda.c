/* Checkpoints and safetensors files with tensors in device memory, under the CUDA emulation:

   - safetensors files saved from device tensors are byte for byte the files saved from their host
     twins (tensors larger than the 8 MiB staging buffer included), and read back into device
     tensors exactly, F32 -> F16/BF16 conversion through the staging buffer giving the host's bits;
   - mgpu_model_save / mgpu_model_load on a model whose parameters live on cuda:0;
   - a checkpoint (weights, buffers, Adam moments, step counts) written on the CPU loads onto
     cuda:0; saved again from cuda:0 (directly and by a background checkpointer) it gives the same
     files, and loads back onto the CPU bit for bit, after which both nets train on identically;
   - a truncated or corrupt file, or one for another model, loaded onto a CUDA model fails
     (MGPU_ERR_FORMAT, MGPU_ERR_SHAPE) and leaves the device weights and moments untouched.

   The model on cuda:0 is the CPU model's parameters and buffers registered by hand and copied over
   (layer constructors and optimizers are not all device-ready yet); where mgpu_optimizer_create
   refuses a CUDA model, the test builds the optimizer on a host twin and moves its state tensors
   to the device. Prints "RESULT ...: N passed, M failed". */
#define _GNU_SOURCE
#define MGPU_IMPLEMENTATION
#include "mgpu.h"
#include "mgpu_test.h"
#include <sys/stat.h>
#include <unistd.h>

static mgpu_context *host, *dev;
static char root[256];

/* --- files ------------------------------------------------------------------------------- */

static void scratch(char *out, size_t size, const char *name) {
    char cmd[700];
    snprintf(out, size, "%s/%s", root, name);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", out);
    if (system(cmd) != 0) fprintf(stderr, "  (could not clear %s)\n", out);
}
static unsigned char *slurp(const char *path, size_t *len) {
    void *d = NULL;
    unsigned char *out;
    *len = 0;
    if (mgpu_read_file(path, &d, len) != MGPU_OK) return NULL;
    out = (unsigned char *)malloc(*len + 1);
    memcpy(out, d, *len);
    mgpu_free(d);
    return out;
}
static void spill(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) return;
    if (len) fwrite(data, 1, len, f);
    fclose(f);
}
static int same_file(const char *a, const char *b) {
    size_t la, lb;
    unsigned char *x = slurp(a, &la), *y = slurp(b, &lb);
    int same = x && y && la == lb && memcmp(x, y, la) == 0;
    free(x); free(y);
    return same;
}
static void copy_dir(const char *from, const char *to) {
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && cp -r '%s' '%s'", to, from, to);
    if (system(cmd) != 0) fprintf(stderr, "  (copy %s failed)\n", from);
}

/* Any tensor's bytes on the host (free with free). */
static unsigned char *host_bytes(const mgpu_tensor *t) {
    size_t n = mgpu_tensor_nbytes(t);
    unsigned char *out = (unsigned char *)malloc(n + 1);
    if (mgpu_tensor_copy_to_host(t, out, n) != MGPU_OK) { free(out); return NULL; }
    return out;
}
static int same_bytes(const mgpu_tensor *a, const mgpu_tensor *b) {
    unsigned char *x, *y;
    int same;
    if (a->dtype != b->dtype || a->numel != b->numel) return 0;
    x = host_bytes(a); y = host_bytes(b);
    same = x && y && memcmp(x, y, mgpu_tensor_nbytes(a)) == 0;
    free(x); free(y);
    return same;
}

/* --- a small net: Linear(6, H) + BatchNorm2d's buffers + Linear(H, 3), Adam ------------------- */

typedef struct net { mgpu_model *m; mgpu_optimizer *opt; mgpu_linear *fc1, *fc2; } net;

static mgpu_optimizer_desc adam_desc(void) { return mgpu_optimizer_desc_default(MGPU_OPTIM_ADAM); }

static int net_make_host(net *n, int64_t hidden) {
    mgpu_optimizer_desc od = adam_desc();
    memset(n, 0, sizeof *n);
    n->m = mgpu_model_create(host);
    n->fc1 = mgpu_linear_create(n->m, "fc1", 6, hidden, 1);
    mgpu_batchnorm2d_create(n->m, "bn", 2);
    n->fc2 = mgpu_linear_create(n->m, "fc2", hidden, 3, 1);
    n->opt = mgpu_optimizer_create(n->m, &od);
    return n->m && n->fc1 && n->fc2 && n->opt;
}

/* An optimizer for a CUDA model: mgpu_optimizer_create when it takes one, else built on a host
   twin of the model (same names and shapes) whose zeroed state tensors then move to the device. */
static mgpu_optimizer *optimizer_on_device(mgpu_model *dm) {
    mgpu_optimizer_desc od = adam_desc();
    mgpu_optimizer *o = mgpu_optimizer_create(dm, &od);
    mgpu_model *twin;
    int i, s;
    if (o || mgpu_last_result() != MGPU_ERR_UNSUPPORTED) return o;
    mgpu_clear_error();
    twin = mgpu_model_create(host);
    for (i = 0; i < mgpu_model_num_parameters(dm); i++) {
        const char *name;
        const mgpu_tensor *p = mgpu_model_parameter(dm, i, &name);
        if (!mgpu_model_add_parameter(twin, name, p->dtype, p->ndim, p->shape)) { mgpu_model_destroy(twin); return NULL; }
    }
    o = mgpu_optimizer_create(twin, &od);
    if (o) {
        o->model = dm;
        for (i = 0; i < o->n_params; i++) o->params[i].param = mgpu_model_parameter(dm, i, NULL);
        for (s = 0; s < o->n_states; s++) {
            mgpu_tensor *old = o->states[s].tensor, *moved = mgpu_tensor_to(dev, old);
            if (!moved) { mgpu_optimizer_destroy(o); o = NULL; break; }
            for (i = 0; i < o->n_params; i++) {
                if (o->params[i].exp_avg == old) o->params[i].exp_avg = moved;
                if (o->params[i].exp_avg_sq == old) o->params[i].exp_avg_sq = moved;
                if (o->params[i].momentum_buffer == old) o->params[i].momentum_buffer = moved;
            }
            o->states[s].tensor = moved;
            mgpu_tensor_free(old);
        }
    }
    mgpu_model_destroy(twin);
    return o;
}

/* The host net's tensors registered on cuda:0 under the same names (zeros), with an optimizer. */
static int net_make_device(net *n, const net *like) {
    int i;
    memset(n, 0, sizeof *n);
    n->m = mgpu_model_create(dev);
    for (i = 0; n->m && i < mgpu_model_num_parameters(like->m); i++) {
        const char *name;
        const mgpu_tensor *p = mgpu_model_parameter(like->m, i, &name);
        if (!mgpu_model_add_parameter(n->m, name, p->dtype, p->ndim, p->shape)) return 0;
    }
    for (i = 0; n->m && i < mgpu_model_num_buffers(like->m); i++) {
        const char *name;
        const mgpu_tensor *b = mgpu_model_buffer(like->m, i, &name);
        if (!mgpu_model_add_buffer(n->m, name, b->dtype, b->ndim, b->shape)) return 0;
    }
    n->opt = n->m ? optimizer_on_device(n->m) : NULL;
    return n->m && n->opt && mgpu_model_parameter(n->m, 0, NULL)->device.type == MGPU_DEVICE_CUDA;
}
static void net_free(net *n) { mgpu_optimizer_destroy(n->opt); mgpu_model_destroy(n->m); memset(n, 0, sizeof *n); }

/* One Adam step on the host net with a fixed random batch. */
static void net_step(net *n, int64_t batch_seed) {
    int64_t xs[2] = {4, 6}, ts[2] = {4, 3};
    mgpu_tensor *x, *t, *loss;
    uint64_t saved = mt_rng_state;
    mt_rng_state = 0x9e3779b97f4a7c15ULL * (uint64_t)(batch_seed + 1);
    x = mt_rand(host, 2, xs, -1, 1, 0);
    t = mt_rand(host, 2, ts, -1, 1, 0);
    mt_rng_state = saved;
    loss = mgpu_op_mse_loss(host, mgpu_linear_forward(host, n->fc2, mgpu_op_relu(host, mgpu_linear_forward(host, n->fc1, x))), t);
    mgpu_optimizer_zero_grad(n->opt);
    MT_CHECK(loss && mgpu_backward(host, loss) == MGPU_OK, "backward: %s", mgpu_last_error());
    MT_CHECK(mgpu_optimizer_step(n->opt) == MGPU_OK, "step: %s", mgpu_last_error());
    mgpu_context_end_step(host);
    mgpu_tensor_free(x);
    mgpu_tensor_free(t);
}

/* A trained host net with distinct buffer values (a load that skipped buffers would show). */
static int net_trained(net *n, int steps) {
    int k;
    float mean[2] = {0.25f, -1.5f}, var[2] = {2.0f, 0.125f};
    int64_t tracked = 7;
    if (!net_make_host(n, 5)) return 0;
    MT_CHECK(mgpu_tensor_copy_from_host(mgpu_model_find(n->m, "bn.running_mean"), mean, sizeof mean) == MGPU_OK &&
             mgpu_tensor_copy_from_host(mgpu_model_find(n->m, "bn.running_var"), var, sizeof var) == MGPU_OK &&
             mgpu_tensor_copy_from_host(mgpu_model_find(n->m, "bn.num_batches_tracked"), &tracked, sizeof tracked) == MGPU_OK,
             "bn buffers: %s", mgpu_last_error());
    for (k = 0; k < steps; k++) net_step(n, k + 1);
    return 1;
}

/* Every parameter, buffer, optimizer state and step count of a (on any device), as host bytes. */
static unsigned char *net_bytes(const net *a, size_t *len) {
    size_t total = 0, at = 0;
    int i, k;
    unsigned char *out;
    for (k = 0; k < 3; k++) {
        int cnt = k == 0 ? mgpu_model_num_parameters(a->m) : k == 1 ? mgpu_model_num_buffers(a->m) : mgpu_optimizer_num_states(a->opt);
        for (i = 0; i < cnt; i++)
            total += mgpu_tensor_nbytes(k == 0 ? mgpu_model_parameter(a->m, i, NULL) : k == 1 ? mgpu_model_buffer(a->m, i, NULL) : mgpu_optimizer_state(a->opt, i, NULL));
    }
    total += sizeof(int64_t) * (size_t)(a->opt->n_params + 1);
    out = (unsigned char *)calloc(total + 1, 1);
    for (k = 0; k < 3; k++) {
        int cnt = k == 0 ? mgpu_model_num_parameters(a->m) : k == 1 ? mgpu_model_num_buffers(a->m) : mgpu_optimizer_num_states(a->opt);
        for (i = 0; i < cnt; i++) {
            const mgpu_tensor *t = k == 0 ? mgpu_model_parameter(a->m, i, NULL) : k == 1 ? mgpu_model_buffer(a->m, i, NULL) : mgpu_optimizer_state(a->opt, i, NULL);
            if (mgpu_tensor_copy_to_host(t, out + at, mgpu_tensor_nbytes(t)) != MGPU_OK) printf("  (copy_to_host: %s)\n", mgpu_last_error());
            at += mgpu_tensor_nbytes(t);
        }
    }
    for (i = 0; i < a->opt->n_params; i++, at += sizeof(int64_t)) memcpy(out + at, &a->opt->params[i].steps, sizeof(int64_t));
    memcpy(out + at, &a->opt->step_count, sizeof(int64_t));
    *len = total;
    return out;
}
static int net_equal(const net *a, const net *b) {
    size_t la, lb;
    unsigned char *x = net_bytes(a, &la), *y = net_bytes(b, &lb);
    int same = la == lb && memcmp(x, y, la) == 0;
    free(x); free(y);
    return same;
}

static const char *state_json(int64_t step) {
    static char buf[256];
    snprintf(buf, sizeof buf, "{\"format_version\":1,\"step\":%lld,\"epoch\":1,\"batch_in_epoch\":3,\"world_size\":1}", (long long)step);
    return buf;
}
static mgpu_result save_ckpt(const char *dir, int64_t step, const net *n, int background) {
    mgpu_checkpoint_desc d;
    mgpu_checkpointer *c;
    mgpu_result r;
    memset(&d, 0, sizeof d);
    d.dir = dir; d.background = background;
    if (!(c = mgpu_checkpointer_create(&d))) return mgpu_last_result();
    r = mgpu_checkpointer_save(c, step, n->m, n->opt, state_json(step));
    if (r == MGPU_OK) r = mgpu_checkpointer_wait(c);
    mgpu_checkpointer_destroy(c);
    return r;
}
/* DIR/step-0000000S/FILE, or the step directory itself when file is "" */
static void ckpt_file(char *out, size_t size, const char *dir, int64_t step, const char *file) {
    snprintf(out, size, "%s/step-%08lld%s%s", dir, (long long)step, file[0] ? "/" : "", file);
}

/* --- safetensors of device tensors ----------------------------------------------------- */

#define N_ST 5
static void fill_pattern(void *p, size_t bytes, unsigned seed) {
    unsigned char *b = (unsigned char *)p;
    uint32_t s = 2166136261u ^ seed;
    size_t i;
    for (i = 0; i < bytes; i++) { s = s * 16777619u + 0x9e37u; b[i] = (unsigned char)(s >> 13); }
}
/* Float data with no NaN (so F16/BF16 conversion compares cleanly). */
static void fill_floats(float *x, int64_t n, unsigned seed) {
    int64_t i;
    uint32_t s = seed * 747796405u + 1;
    for (i = 0; i < n; i++) { s = s * 1664525u + 1013904223u; x[i] = ((float)(s >> 8) / 16777216.0f - 0.5f) * (float)(1 + i % 7) * 100.0f; }
}

static void test_safetensors_device_tensors(void) {
    /* 5M floats: 20 MB, three staging chunks on the way out, two as BF16 on the way in */
    static const char *names[N_ST] = {"big", "half", "count", "empty", "bytes"};
    int64_t shapes[N_ST][2] = {{5000000, 1}, {3, 7}, {0, 0}, {0, 4}, {5, 3}};
    int ndims[N_ST] = {1, 2, 0, 2, 2};
    mgpu_dtype dts[N_ST] = {MGPU_F32, MGPU_F16, MGPU_I64, MGPU_F32, MGPU_U8};
    mgpu_tensor *h[N_ST], *d[N_ST], *back[N_ST];
    char dir[300], hpath[400], dpath[400];
    mgpu_safetensors *st;
    int i;
    scratch(dir, sizeof dir, "st");
    mkdir(dir, 0777);
    snprintf(hpath, sizeof hpath, "%s/host.safetensors", dir);
    snprintf(dpath, sizeof dpath, "%s/device.safetensors", dir);
    for (i = 0; i < N_ST; i++) {
        size_t bytes;
        void *data;
        h[i] = mgpu_tensor_create(host, dts[i], ndims[i], shapes[i]);
        bytes = mgpu_tensor_nbytes(h[i]);
        data = malloc(bytes + 1);
        if (dts[i] == MGPU_F32) fill_floats((float *)data, h[i]->numel, (unsigned)i);
        else fill_pattern(data, bytes, (unsigned)i);
        mgpu_tensor_copy_from_host(h[i], data, bytes);
        d[i] = mgpu_tensor_from_host(dev, dts[i], ndims[i], shapes[i], data);
        free(data);
        MT_CHECK(d[i] && d[i]->device.type == MGPU_DEVICE_CUDA, "tensor %s on cuda:0: %s", names[i], mgpu_last_error());
        if (!d[i]) return;
    }
    MT_CHECK(mgpu_safetensors_save(hpath, N_ST, names, (const mgpu_tensor *const *)h, 0, NULL, NULL) == MGPU_OK, "save host: %s", mgpu_last_error());
    MT_CHECK(mgpu_safetensors_save(dpath, N_ST, names, (const mgpu_tensor *const *)d, 0, NULL, NULL) == MGPU_OK, "save device: %s", mgpu_last_error());
    MT_CHECK(same_file(hpath, dpath), "the file saved from cuda:0 differs from the one saved from the host twins");

    st = mgpu_safetensors_open(dpath);
    MT_CHECK(st != NULL, "open: %s", mgpu_last_error());
    if (!st) return;
    for (i = 0; i < N_ST; i++) {
        back[i] = mgpu_tensor_create(dev, dts[i], ndims[i], shapes[i]);
        MT_CHECK(mgpu_safetensors_read_into(st, names[i], back[i]) == MGPU_OK, "read_into %s on cuda:0: %s", names[i], mgpu_last_error());
        MT_CHECK(same_bytes(back[i], h[i]), "%s read into cuda:0 differs from what was saved", names[i]);
    }
    /* float conversion into device tensors (through the staging buffer) gives the host conversion's bits */
    {
        mgpu_dtype to[2] = {MGPU_BF16, MGPU_F16};
        int k;
        for (k = 0; k < 2; k++) {
            mgpu_tensor *hc = mgpu_tensor_create(host, to[k], 1, shapes[0]), *dc = mgpu_tensor_create(dev, to[k], 1, shapes[0]);
            mgpu_tensor *hs = mgpu_tensor_create(host, MGPU_F32, 2, shapes[1]), *ds = mgpu_tensor_create(dev, MGPU_F32, 2, shapes[1]);
            MT_CHECK(mgpu_safetensors_read_into(st, "big", hc) == MGPU_OK && mgpu_safetensors_read_into(st, "big", dc) == MGPU_OK,
                     "F32 -> %s: %s", mgpu_dtype_name(to[k]), mgpu_last_error());
            MT_CHECK(same_bytes(hc, dc), "F32 -> %s into cuda:0 differs from the host conversion", mgpu_dtype_name(to[k]));
            MT_CHECK(mgpu_safetensors_read_into(st, "half", hs) == MGPU_OK && mgpu_safetensors_read_into(st, "half", ds) == MGPU_OK,
                     "F16 -> F32: %s", mgpu_last_error());
            MT_CHECK(same_bytes(hs, ds), "F16 -> F32 into cuda:0 differs from the host conversion");
            mgpu_tensor_free(hc); mgpu_tensor_free(dc); mgpu_tensor_free(hs); mgpu_tensor_free(ds);
        }
    }
    /* a wrong shape is refused and leaves the device tensor alone */
    {
        int64_t wrong[2] = {7, 3};
        mgpu_tensor *w = mgpu_tensor_create(dev, MGPU_F16, 2, wrong);
        unsigned char *before = host_bytes(w), *after;
        MT_CHECK(mgpu_safetensors_read_into(st, "half", w) == MGPU_ERR_SHAPE, "a [7, 3] device tensor takes a [3, 7] entry: %s", mgpu_last_error());
        after = host_bytes(w);
        MT_CHECK(before && after && memcmp(before, after, mgpu_tensor_nbytes(w)) == 0, "refused read_into changed the device tensor");
        free(before); free(after);
        mgpu_tensor_free(w);
    }
    mgpu_safetensors_close(st);
    for (i = 0; i < N_ST; i++) { mgpu_tensor_free(h[i]); mgpu_tensor_free(d[i]); mgpu_tensor_free(back[i]); }
}

/* --- model files ------------------------------------------------------------------------ */

static void test_model_save_load_device(void) {
    char dir[300], hpath[400], dpath[400];
    net a, d, b;
    size_t len;
    unsigned char *bytes;
    scratch(dir, sizeof dir, "model");
    mkdir(dir, 0777);
    snprintf(hpath, sizeof hpath, "%s/host.safetensors", dir);
    snprintf(dpath, sizeof dpath, "%s/device.safetensors", dir);
    MT_CHECK(net_trained(&a, 2) && net_make_device(&d, &a) && net_make_device(&b, &a), "nets: %s", mgpu_last_error());
    if (!a.m || !d.m || !b.m) return;
    MT_CHECK(mgpu_model_copy_state(d.m, a.m) == MGPU_OK, "copy_state host -> cuda:0: %s", mgpu_last_error());
    MT_CHECK(mgpu_model_save(a.m, hpath) == MGPU_OK && mgpu_model_save(d.m, dpath) == MGPU_OK, "model_save: %s", mgpu_last_error());
    MT_CHECK(same_file(hpath, dpath), "mgpu_model_save from cuda:0 differs from the host's file");
    MT_CHECK(mgpu_model_load(b.m, hpath) == MGPU_OK, "model_load onto cuda:0: %s", mgpu_last_error());
    {
        int i;
        for (i = 0; i < mgpu_model_num_parameters(a.m); i++)
            MT_CHECK(same_bytes(mgpu_model_parameter(a.m, i, NULL), mgpu_model_parameter(b.m, i, NULL)), "parameter %d after model_load onto cuda:0", i);
        for (i = 0; i < mgpu_model_num_buffers(a.m); i++)
            MT_CHECK(same_bytes(mgpu_model_buffer(a.m, i, NULL), mgpu_model_buffer(b.m, i, NULL)), "buffer %d after model_load onto cuda:0", i);
    }
    /* truncated: refused, the device model untouched (the file holds other values: a moved on) */
    net_step(&a, 5);
    MT_CHECK(mgpu_model_save(a.m, hpath) == MGPU_OK, "model_save: %s", mgpu_last_error());
    bytes = slurp(hpath, &len);
    if (bytes) {
        size_t bl, al;
        unsigned char *before, *after;
        spill(dpath, bytes, len - 9);
        before = net_bytes(&b, &bl);
        MT_CHECK(mgpu_model_load(b.m, dpath) == MGPU_ERR_FORMAT, "a truncated model file onto cuda:0: %s", mgpu_last_error());
        after = net_bytes(&b, &al);
        MT_CHECK(bl == al && memcmp(before, after, bl) == 0, "a refused model_load changed the device model");
        MT_CHECK(mgpu_model_load(b.m, hpath) == MGPU_OK, "model_load onto cuda:0: %s", mgpu_last_error());
        MT_CHECK(same_bytes(mgpu_model_parameter(a.m, 0, NULL), mgpu_model_parameter(b.m, 0, NULL)), "the intact file loads after the refused one");
        free(before); free(after); free(bytes);
    }
    net_free(&a); net_free(&d); net_free(&b);
}

/* --- checkpoints ------------------------------------------------------------------------- */

/* CPU -> cuda:0 -> CPU: the checkpoint loads onto the device, saved again there it gives the same
   files (direct and background saves), and those load back onto the CPU bit for bit. */
static void test_checkpoint_cpu_cuda_cpu(void) {
    char hdir[300], ddir[300], bdir[300], f1[500], f2[500];
    static const char *files[2] = {"model.safetensors", "optimizer.safetensors"};
    net a, d, b, fresh;
    mgpu_json *st = NULL;
    int k;
    scratch(hdir, sizeof hdir, "ckpt_host");
    scratch(ddir, sizeof ddir, "ckpt_dev");
    scratch(bdir, sizeof bdir, "ckpt_dev_bg");
    MT_CHECK(net_trained(&a, 3) && net_make_device(&d, &a), "nets: %s", mgpu_last_error());
    if (!a.m || !d.m) return;
    MT_CHECK(save_ckpt(hdir, 3, &a, 0) == MGPU_OK, "save on the CPU: %s", mgpu_last_error());
    MT_CHECK(!net_equal(&a, &d), "the fresh device net must differ from the trained one");

    ckpt_file(f1, sizeof f1, hdir, 3, "");
    MT_CHECK(mgpu_checkpoint_load(f1, d.m, d.opt, &st) == MGPU_OK, "CPU checkpoint onto cuda:0: %s", mgpu_last_error());
    MT_CHECK(net_equal(&a, &d), "weights, buffers, Adam moments and step counts loaded onto cuda:0 differ from the CPU net's");
    MT_CHECK(mgpu_optimizer_step_count(d.opt) == 3, "step count %lld on cuda:0", (long long)mgpu_optimizer_step_count(d.opt));
    mgpu_json_free(st);

    MT_CHECK(save_ckpt(ddir, 3, &d, 0) == MGPU_OK, "save from cuda:0: %s", mgpu_last_error());
    MT_CHECK(save_ckpt(bdir, 3, &d, 1) == MGPU_OK, "background save from cuda:0: %s", mgpu_last_error());
    for (k = 0; k < 2; k++) {
        ckpt_file(f1, sizeof f1, hdir, 3, files[k]);
        ckpt_file(f2, sizeof f2, ddir, 3, files[k]);
        MT_CHECK(same_file(f1, f2), "%s saved from cuda:0 differs from the CPU's", files[k]);
        ckpt_file(f2, sizeof f2, bdir, 3, files[k]);
        MT_CHECK(same_file(f1, f2), "%s saved from cuda:0 in the background differs from the CPU's", files[k]);
    }
    ckpt_file(f2, sizeof f2, ddir, 3, "");
    MT_CHECK(mgpu_checkpoint_verify(f2) == MGPU_OK, "verify the cuda:0 checkpoint: %s", mgpu_last_error());

    /* back onto the CPU: bit for bit, and training on from there matches the uninterrupted net */
    MT_CHECK(net_make_host(&b, 5), "host net: %s", mgpu_last_error());
    MT_CHECK(!net_equal(&a, &b), "the fresh host net must differ from the trained one");
    MT_CHECK(mgpu_checkpoint_load(f2, b.m, b.opt, NULL) == MGPU_OK, "cuda:0 checkpoint onto the CPU: %s", mgpu_last_error());
    MT_CHECK(net_equal(&a, &b), "the checkpoint written on cuda:0 loads onto the CPU with different bits");
    net_step(&a, 9);
    net_step(&b, 9);
    MT_CHECK(net_equal(&a, &b), "after one more step on the CPU the nets differ (moments or step counts did not survive cuda:0)");

    /* and from the background save too */
    MT_CHECK(net_make_host(&fresh, 5), "host net: %s", mgpu_last_error());
    ckpt_file(f2, sizeof f2, bdir, 3, "");
    MT_CHECK(mgpu_checkpoint_load(f2, fresh.m, fresh.opt, NULL) == MGPU_OK, "background cuda:0 checkpoint onto the CPU: %s", mgpu_last_error());
    net_step(&fresh, 9);
    MT_CHECK(net_equal(&a, &fresh), "the background checkpoint from cuda:0 resumes differently on the CPU");
    net_free(&a); net_free(&d); net_free(&b); net_free(&fresh);
}

/* A damaged copy of a good checkpoint (file replaced by bytes) loaded onto a CUDA net holding other
   values: must fail with `want` and change nothing on the device. */
static void load_damaged(const char *good, const char *file, const void *bytes, size_t len, mgpu_result want, const char *what) {
    char bad[400], path[500];
    net a, d;
    size_t bl, al;
    unsigned char *before, *after;
    mgpu_result r;
    snprintf(bad, sizeof bad, "%s/damaged/step-00000003", root);
    scratch(path, sizeof path, "damaged");
    mkdir(path, 0777);
    copy_dir(good, bad);
    snprintf(path, sizeof path, "%s/%s", bad, file);
    spill(path, bytes, len);
    MT_CHECK(net_trained(&a, 1) && net_make_device(&d, &a), "nets: %s", mgpu_last_error());
    if (!a.m || !d.m) return;
    mgpu_model_copy_state(d.m, a.m);        /* device weights differ from the checkpoint's */
    before = net_bytes(&d, &bl);
    r = mgpu_checkpoint_load(bad, d.m, d.opt, NULL);
    after = net_bytes(&d, &al);
    MT_CHECK(r == want, "%s onto cuda:0: expected %s, got %s: %s", what, mgpu_result_string(want), mgpu_result_string(r), mgpu_last_error());
    MT_CHECK(r == MGPU_OK || strstr(mgpu_last_error(), file) != NULL, "%s: the message must name %s: %s", what, file, mgpu_last_error());
    MT_CHECK(bl == al && memcmp(before, after, bl) == 0, "%s: the device weights or moments changed", what);
    free(before); free(after);
    net_free(&a); net_free(&d);
}

static void test_damaged_checkpoint_onto_cuda(void) {
    char dir[300], good[400], path[500];
    unsigned char *bytes;
    size_t len;
    net a, other;
    scratch(dir, sizeof dir, "ckpt_good");
    MT_CHECK(net_trained(&a, 3), "net: %s", mgpu_last_error());
    MT_CHECK(save_ckpt(dir, 3, &a, 0) == MGPU_OK, "save: %s", mgpu_last_error());
    net_free(&a);
    snprintf(good, sizeof good, "%s/step-00000003", dir);
    snprintf(path, sizeof path, "%s/model.safetensors", good);
    if (!(bytes = slurp(path, &len))) { MT_CHECK(0, "read %s", path); return; }
    load_damaged(good, "model.safetensors", bytes, len / 2, MGPU_ERR_FORMAT, "model.safetensors truncated to half");
    load_damaged(good, "model.safetensors", bytes, len - 1, MGPU_ERR_FORMAT, "model.safetensors one byte short");
    load_damaged(good, "model.safetensors", bytes, 5, MGPU_ERR_FORMAT, "model.safetensors cut inside the header length");
    bytes[len - 3] ^= 0x40;
    load_damaged(good, "model.safetensors", bytes, len, MGPU_ERR_FORMAT, "a flipped bit in model.safetensors' data (checksum)");
    free(bytes);
    snprintf(path, sizeof path, "%s/optimizer.safetensors", good);
    if (!(bytes = slurp(path, &len))) { MT_CHECK(0, "read %s", path); return; }
    load_damaged(good, "optimizer.safetensors", bytes, len - 100, MGPU_ERR_FORMAT, "optimizer.safetensors truncated");
    bytes[len - 1] ^= 1;
    load_damaged(good, "optimizer.safetensors", bytes, len, MGPU_ERR_FORMAT, "a flipped bit in the Adam moments (checksum)");
    free(bytes);
    /* a checkpoint of another model (hidden 4, not 5): refused before the device is written */
    {
        char odir[300];
        net d;
        size_t bl, al;
        unsigned char *before, *after;
        mgpu_result r;
        scratch(odir, sizeof odir, "ckpt_other");
        MT_CHECK(net_make_host(&other, 4) && save_ckpt(odir, 3, &other, 0) == MGPU_OK, "other: %s", mgpu_last_error());
        MT_CHECK(net_trained(&a, 1) && net_make_device(&d, &a), "nets: %s", mgpu_last_error());
        mgpu_model_copy_state(d.m, a.m);
        before = net_bytes(&d, &bl);
        snprintf(path, sizeof path, "%s/step-00000003", odir);
        r = mgpu_checkpoint_load(path, d.m, d.opt, NULL);
        after = net_bytes(&d, &al);
        MT_CHECK(r == MGPU_ERR_SHAPE, "another model's checkpoint onto cuda:0: %s (%s)", mgpu_result_string(r), mgpu_last_error());
        MT_CHECK(bl == al && memcmp(before, after, bl) == 0, "a refused checkpoint of another model changed the device net");
        free(before); free(after);
        net_free(&other); net_free(&a); net_free(&d);
    }
}

int main(void) {
    mgpu_context_desc cd;
    const char *tmp = getenv("TMPDIR");
    snprintf(root, sizeof root, "%s/mgpu_ckpt_cuda.%ld", tmp && tmp[0] ? tmp : "/tmp", (long)getpid());
    mkdir(root, 0777);
    host = mt_cpu_context(2);
    memset(&cd, 0, sizeof cd);
    cd.device.type = MGPU_DEVICE_CUDA; cd.device.index = 0; cd.seed = 42; cd.num_threads = 2;
    dev = mgpu_context_create(&cd);
    if (!host || !dev) { fprintf(stderr, "contexts: %s\n", mgpu_last_error()); return 2; }
    MT_RUN(test_safetensors_device_tensors);
    MT_RUN(test_model_save_load_device);
    MT_RUN(test_checkpoint_cpu_cuda_cpu);
    MT_RUN(test_damaged_checkpoint_onto_cuda);
    mgpu_context_destroy(dev);
    mgpu_context_destroy(host);
    {
        char cmd[300];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
        if (system(cmd) != 0) fprintf(stderr, "  (could not remove %s)\n", root);
    }
    return MT_END();
}
