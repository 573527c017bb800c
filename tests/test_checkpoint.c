/* Checkpoints: bit-exact round trips (model, optimizer moments and step counts, trainer state),
   latest and keep_last, background saves, and every kind of damage a checkpoint can suffer
   (truncation, flipped bytes, a huge header length, wrong dtype/shape, a missing tensor, garbage
   JSON, an interrupted write, a full disk): each is an error naming the file, and the model and
   the previous checkpoint stay untouched. */
#define _GNU_SOURCE /* fork, setrlimit, truncate, memmem */
#include "mgpu_test.h"
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static int quick = 0;
static char root[256];

/* --- a small model: Linear(6, 5) + Linear(5, 3) and a BatchNorm2d's buffers ------------------ */

typedef struct net { mgpu_model *m; mgpu_linear *fc1, *fc2; mgpu_batchnorm2d *bn; mgpu_optimizer *opt; } net;

static int net_make(net *n, mgpu_context *ctx, int64_t hidden, int with_fc2, mgpu_optimizer_type type) {
    mgpu_optimizer_desc od = mgpu_optimizer_desc_default(type);
    memset(n, 0, sizeof *n);
    n->m = mgpu_model_create(ctx);
    n->fc1 = mgpu_linear_create(n->m, "fc1", 6, hidden, 1);
    n->bn = mgpu_batchnorm2d_create(n->m, "bn", 2);
    if (with_fc2) n->fc2 = mgpu_linear_create(n->m, "fc2", hidden, 3, 1);
    if (type == MGPU_OPTIM_SGD) od.momentum = 0.9f;
    n->opt = mgpu_optimizer_create(n->m, &od);
    return n->m && n->fc1 && n->bn && n->opt && (!with_fc2 || n->fc2);
}
static void net_free(net *n) { mgpu_optimizer_destroy(n->opt); mgpu_model_destroy(n->m); }

/* One optimizer step on a fixed random batch: moments and step counts become non-trivial. */
static void net_step(mgpu_context *ctx, net *n, int64_t batch_seed) {
    int64_t xs[2] = {4, 6}, ts[2] = {4, 3};
    mgpu_tensor *x, *t, *loss;
    uint64_t saved = mt_rng_state;
    mt_rng_state = 0x9e3779b97f4a7c15ULL * (uint64_t)(batch_seed + 1);
    x = mt_rand(ctx, 2, xs, -1, 1, 0);
    t = mt_rand(ctx, 2, ts, -1, 1, 0);
    mt_rng_state = saved;
    loss = mgpu_op_mse_loss(ctx, mgpu_linear_forward(ctx, n->fc2, mgpu_op_relu(ctx, mgpu_linear_forward(ctx, n->fc1, x))), t);
    mgpu_optimizer_zero_grad(n->opt);
    MT_CHECK(loss && mgpu_backward(ctx, loss) == MGPU_OK, "backward: %s", mgpu_last_error());
    MT_CHECK(mgpu_optimizer_step(n->opt) == MGPU_OK, "step: %s", mgpu_last_error());
    mgpu_context_end_step(ctx);
    mgpu_tensor_free(x);
    mgpu_tensor_free(t);
}

/* Distinct buffer values, so a load that skipped buffers would show. */
static void net_touch_buffers(net *n, float v) {
    mgpu_tensor_fill(n->bn->running_mean, v);
    mgpu_tensor_fill(n->bn->running_var, 2 * v);
    mgpu_tensor_fill(n->bn->num_batches_tracked, 7);
}

/* All bytes of every parameter, buffer and optimizer state, concatenated (free with free). */
static unsigned char *net_bytes(const net *n, size_t *len) {
    size_t total = 0, at = 0;
    int i, k;
    unsigned char *out;
    for (k = 0; k < 3; k++) {
        int cnt = k == 0 ? mgpu_model_num_parameters(n->m) : k == 1 ? mgpu_model_num_buffers(n->m) : mgpu_optimizer_num_states(n->opt);
        for (i = 0; i < cnt; i++) {
            const mgpu_tensor *t = k == 0 ? mgpu_model_parameter(n->m, i, NULL) : k == 1 ? mgpu_model_buffer(n->m, i, NULL) : mgpu_optimizer_state(n->opt, i, NULL);
            total += mgpu_tensor_nbytes(t);
        }
    }
    out = (unsigned char *)malloc(total + 1);
    for (k = 0; k < 3; k++) {
        int cnt = k == 0 ? mgpu_model_num_parameters(n->m) : k == 1 ? mgpu_model_num_buffers(n->m) : mgpu_optimizer_num_states(n->opt);
        for (i = 0; i < cnt; i++) {
            const mgpu_tensor *t = k == 0 ? mgpu_model_parameter(n->m, i, NULL) : k == 1 ? mgpu_model_buffer(n->m, i, NULL) : mgpu_optimizer_state(n->opt, i, NULL);
            memcpy(out + at, t->data, mgpu_tensor_nbytes(t));
            at += mgpu_tensor_nbytes(t);
        }
    }
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

/* --- files ------------------------------------------------------------------------------- */

static void scratch(char *out, size_t size, const char *name) {
    char cmd[1400];
    snprintf(out, size, "%s/%s", root, name);
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s.jsonl'", out, out);
    if (system(cmd) != 0) fprintf(stderr, "  (could not clear %s)\n", out);
}
static int exists(const char *path) { struct stat st; return stat(path, &st) == 0; }
static int read_all(const char *path, unsigned char **data, size_t *len) {
    void *d = NULL;
    if (mgpu_read_file(path, &d, len) != MGPU_OK) return 0;
    *data = (unsigned char *)malloc(*len + 1);
    memcpy(*data, d, *len);
    mgpu_free(d);
    return 1;
}
static void write_all(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) return;
    if (len) fwrite(data, 1, len, f);
    fclose(f);
}
static void copy_dir(const char *from, const char *to) {
    char cmd[1600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s' && rmdir '%s' && cp -r '%s' '%s'", to, to, to, from, to);
    if (system(cmd) != 0) fprintf(stderr, "  (copy %s failed)\n", from);
}
static int count_entries(const char *dir, const char *prefix) {
    DIR *d = opendir(dir);
    struct dirent *e;
    int n = 0;
    if (!d) return -1;
    while ((e = readdir(d)) != NULL) if (strncmp(e->d_name, prefix, strlen(prefix)) == 0) n++;
    closedir(d);
    return n;
}

static const char *state_json(int64_t step) {
    static char buf[1024];
    snprintf(buf, sizeof buf,
             "{\"format_version\":1,\"step\":%lld,\"epoch\":2,\"batch_in_epoch\":17,\"world_size\":1,"
             "\"rng\":{\"seed\":18446744073709551615,\"offset\":123456789012},\"scaler\":{\"scale\":32768,\"growth_tracker\":5},"
             "\"metrics\":[{\"epoch\":1,\"train_loss\":0.5}],\"options\":{\"lr\":0.001,\"amp\":\"off\"}}",
             (long long)step);
    return buf;
}

static mgpu_checkpointer *ckpt_open(const char *dir, int keep_last, int background) {
    mgpu_checkpoint_desc d;
    memset(&d, 0, sizeof d);
    d.dir = dir; d.keep_last = keep_last; d.background = background;
    return mgpu_checkpointer_create(&d);
}

/* A trained net checkpointed as DIR/step-00000003 (and step 2 before it). */
static void make_checkpoint(mgpu_context *ctx, net *src, const char *dir) {
    mgpu_checkpointer *c = ckpt_open(dir, 0, 0);
    net_make(src, ctx, 5, 1, MGPU_OPTIM_ADAMW);
    net_touch_buffers(src, 0.25f);
    net_step(ctx, src, 1);
    net_step(ctx, src, 2);
    MT_CHECK(mgpu_checkpointer_save(c, 2, src->m, src->opt, state_json(2)) == MGPU_OK, "%s", mgpu_last_error());
    net_step(ctx, src, 3);
    MT_CHECK(mgpu_checkpointer_save(c, 3, src->m, src->opt, state_json(3)) == MGPU_OK, "%s", mgpu_last_error());
    mgpu_checkpointer_destroy(c);
}

/* --- round trips ------------------------------------------------------------------------- */

static void check_round_trip(mgpu_optimizer_type type, int background) {
    mgpu_context *ctx = mt_cpu_context(2);
    char dir[300], path[400];
    net a, b, a2;
    mgpu_checkpointer *c;
    mgpu_json *st = NULL;
    uint64_t seed = 0;
    int64_t v = 0;
    scratch(dir, sizeof dir, "roundtrip");
    net_make(&a, ctx, 5, 1, type);
    net_touch_buffers(&a, 0.5f);
    net_step(ctx, &a, 1);
    net_step(ctx, &a, 2);
    c = ckpt_open(dir, 0, background);
    MT_CHECK(mgpu_checkpointer_save(c, 2, a.m, a.opt, state_json(2)) == MGPU_OK, "save: %s", mgpu_last_error());
    net_make(&a2, ctx, 5, 1, type); /* a's state at step 2, before the training below changes a */
    mgpu_model_copy_state(a2.m, a.m);
    if (background) net_step(ctx, &a, 3); /* training goes on while the writer runs */
    MT_CHECK(mgpu_checkpointer_wait(c) == MGPU_OK, "wait: %s", mgpu_last_error());
    mgpu_checkpointer_destroy(c);

    net_make(&b, ctx, 5, 1, type);
    snprintf(path, sizeof path, "%s/step-00000002", dir);
    MT_CHECK(mgpu_checkpoint_load(path, b.m, b.opt, &st) == MGPU_OK, "load: %s", mgpu_last_error());
    MT_CHECK(mgpu_optimizer_step_count(b.opt) == 2, "step count %lld", (long long)mgpu_optimizer_step_count(b.opt));
    if (background) {
        /* the snapshot holds step 2 even though a trained on: b must equal a's step-2 weights */
        size_t i;
        for (i = 0; i < 2; i++) {
            mgpu_tensor *pa = mgpu_model_parameter(a2.m, (int)i, NULL), *pb = mgpu_model_parameter(b.m, (int)i, NULL);
            MT_CHECK(memcmp(pa->data, pb->data, mgpu_tensor_nbytes(pa)) == 0, "background snapshot param %d differs", (int)i);
        }
        net_step(ctx, &b, 3);
    }
    MT_CHECK(net_equal(&a, &b), "model, buffers and optimizer state must round-trip bit for bit");
    /* step counts: one more identical step keeps both identical only if bias corrections agree */
    net_step(ctx, &a, 9);
    net_step(ctx, &b, 9);
    MT_CHECK(net_equal(&a, &b), "after one more step the nets differ: per-parameter step counts did not round-trip");
    MT_CHECK(st != NULL, "trainer state returned");
    if (st) {
        const mgpu_json *rng = mgpu_json_get(st, "rng");
        const mgpu_json *seed_j = mgpu_json_get(rng, "seed");
        MT_CHECK(mgpu_json_int64(mgpu_json_get(st, "step"), &v) && v == 2, "step %lld", (long long)v);
        MT_CHECK(mgpu_json_int64(mgpu_json_get(st, "batch_in_epoch"), &v) && v == 17, "batch_in_epoch");
        MT_CHECK(seed_j && seed_j->raw && sscanf(seed_j->raw, "%llu", (unsigned long long *)&seed) == 1 && seed == 18446744073709551615ULL,
                 "uint64 seed survives");
        MT_CHECK(mgpu_json_get(mgpu_json_get(st, "scaler"), "scale")->number == 32768.0, "scaler scale");
        MT_CHECK(mgpu_json_get(st, "metrics")->count == 1, "metrics list");
    }
    mgpu_json_free(st);
    net_free(&a); net_free(&a2); net_free(&b);
    mgpu_context_destroy(ctx);
}
static void test_round_trip_adamw(void) { check_round_trip(MGPU_OPTIM_ADAMW, 0); }
static void test_round_trip_sgd_momentum(void) { check_round_trip(MGPU_OPTIM_SGD, 0); }
static void test_round_trip_background(void) { check_round_trip(MGPU_OPTIM_ADAM, 1); }

/* The files are plain safetensors: names, dtypes and the PyTorch marker are what PyTorch expects. */
static void test_file_layout(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    char dir[300], path[400];
    net a;
    mgpu_safetensors *st;
    scratch(dir, sizeof dir, "layout");
    make_checkpoint(ctx, &a, dir);
    snprintf(path, sizeof path, "%s/step-00000003/model.safetensors", dir);
    st = mgpu_safetensors_open(path);
    MT_CHECK(st && mgpu_safetensors_find(st, "fc1.weight") && mgpu_safetensors_find(st, "bn.num_batches_tracked"), "model names");
    MT_CHECK(st && strcmp(mgpu_safetensors_metadata(st, "format"), "pt") == 0, "format pt");
    MT_CHECK(st && strncmp(mgpu_safetensors_metadata(st, "checksum"), "mgpu64:", 7) == 0, "checksum present");
    mgpu_safetensors_close(st);
    snprintf(path, sizeof path, "%s/step-00000003/optimizer.safetensors", dir);
    st = mgpu_safetensors_open(path);
    MT_CHECK(st && mgpu_safetensors_find(st, "fc2.bias.exp_avg_sq"), "optimizer moment names");
    MT_CHECK(st && mgpu_safetensors_find(st, "fc1.weight.step") && mgpu_safetensors_find(st, "fc1.weight.step")->dtype == MGPU_I64 &&
             *(const int64_t *)mgpu_safetensors_find(st, "fc1.weight.step")->data == 3, "per-parameter step count 3");
    MT_CHECK(st && strcmp(mgpu_safetensors_metadata(st, "step_count"), "3") == 0, "step_count metadata");
    mgpu_safetensors_close(st);
    net_free(&a);
    mgpu_context_destroy(ctx);
}

/* --- latest, keep_last, find --------------------------------------------------------------- */

static void test_latest_and_keep_last(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    char dir[300], path[400], found[400];
    unsigned char *text = NULL;
    size_t len = 0;
    net a;
    mgpu_checkpointer *c;
    int64_t s;
    scratch(dir, sizeof dir, "keep");
    net_make(&a, ctx, 5, 1, MGPU_OPTIM_ADAMW);
    c = ckpt_open(dir, 2, 1);
    for (s = 1; s <= 5; s++) {
        net_step(ctx, &a, s);
        MT_CHECK(mgpu_checkpointer_save(c, s * 10, a.m, a.opt, state_json(s * 10)) == MGPU_OK, "save %lld: %s", (long long)s, mgpu_last_error());
    }
    MT_CHECK(mgpu_checkpointer_wait(c) == MGPU_OK, "%s", mgpu_last_error());
    MT_CHECK(count_entries(dir, "step-") == 2, "keep_last 2 leaves 2 step dirs, found %d", count_entries(dir, "step-"));
    snprintf(path, sizeof path, "%s/step-00000040", dir);
    MT_CHECK(exists(path), "step 40 kept");
    snprintf(path, sizeof path, "%s/latest", dir);
    MT_CHECK(read_all(path, &text, &len) && len == 14 && memcmp(text, "step-00000050\n", 14) == 0, "latest names step 50");
    free(text);
    MT_CHECK(mgpu_checkpoint_find(dir, found, sizeof found) == MGPU_OK && strstr(found, "step-00000050"), "find: %s", found);
    /* saving an existing step replaces it */
    MT_CHECK(mgpu_checkpointer_save(c, 50, a.m, a.opt, state_json(50)) == MGPU_OK && mgpu_checkpointer_wait(c) == MGPU_OK, "%s", mgpu_last_error());
    MT_CHECK(mgpu_checkpoint_verify(found) == MGPU_OK && count_entries(dir, "step-") == 2, "re-saved step 50 valid");
    /* bad arguments */
    MT_CHECK(mgpu_checkpointer_save(c, 60, a.m, a.opt, state_json(61)) == MGPU_ERR_INVALID_ARG, "state step must match");
    MT_CHECK(mgpu_checkpointer_save(c, 60, a.m, a.opt, "{\"step\":60}") == MGPU_ERR_INVALID_ARG, "format_version required");
    MT_CHECK(mgpu_checkpointer_save(c, -1, a.m, a.opt, NULL) == MGPU_ERR_INVALID_ARG, "negative step");
    MT_CHECK(mgpu_checkpointer_save(NULL, 1, a.m, a.opt, NULL) == MGPU_ERR_INVALID_ARG, "NULL checkpointer");
    MT_CHECK(mgpu_checkpointer_create(NULL) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "NULL desc");
    snprintf(path, sizeof path, "%s/empty", root);
    mkdir(path, 0777);
    MT_CHECK(mgpu_checkpoint_find(path, found, sizeof found) == MGPU_ERR_IO && strstr(mgpu_last_error(), path), "none: %s", mgpu_last_error());
    mgpu_checkpointer_destroy(c);
    net_free(&a);
    mgpu_context_destroy(ctx);
}

static char log_text[8192];
static void capture_log(mgpu_log_level level, const char *message, void *user) {
    (void)user;
    if (level >= MGPU_LOG_WARN && strlen(log_text) + strlen(message) + 2 < sizeof log_text) { strcat(log_text, message); strcat(log_text, "\n"); }
}

static void test_find_falls_back(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    char dir[300], path[400], found[400];
    net a;
    scratch(dir, sizeof dir, "fallback");
    make_checkpoint(ctx, &a, dir);
    /* damage the newest one: find must pick step 2 and warn naming step 3 */
    snprintf(path, sizeof path, "%s/step-00000003/optimizer.safetensors", dir);
    truncate(path, 100);
    log_text[0] = 0;
    mgpu_set_logger(capture_log, NULL);
    MT_CHECK(mgpu_checkpoint_find(dir, found, sizeof found) == MGPU_OK && strstr(found, "step-00000002"), "fell back to %s", found);
    MT_CHECK(strstr(log_text, "step-00000003") && strstr(log_text, "optimizer.safetensors"), "warning names the corrupt one: %s", log_text);
    /* a garbled `latest` is no reason to fail either */
    snprintf(path, sizeof path, "%s/latest", dir);
    write_all(path, "../../etc\n", 10);
    log_text[0] = 0;
    MT_CHECK(mgpu_checkpoint_find(dir, found, sizeof found) == MGPU_OK && strstr(found, "step-00000002"), "garbled latest: %s", found);
    MT_CHECK(strstr(log_text, "latest") != NULL, "warned about latest: %s", log_text);
    mgpu_set_logger(NULL, NULL);
    net_free(&a);
    mgpu_context_destroy(ctx);
}

/* --- corruption: errors name the file (and tensor); the model stays untouched --------------- */

/* Loads dir/step-00000003 with `file` replaced by bytes into a fresh net; returns the result and
   checks the net is unchanged and the message names the file. */
static mgpu_result load_damaged(mgpu_context *ctx, const char *good, const char *file, const void *bytes, size_t len, const char *what,
                                int verify_too) {
    char bad[300], path[400];
    net n;
    size_t before_len, after_len;
    unsigned char *before, *after;
    mgpu_result r;
    snprintf(bad, sizeof bad, "%s/damaged/step-00000003", root);
    copy_dir(good, bad);
    snprintf(path, sizeof path, "%s/%s", bad, file);
    write_all(path, bytes, len);
    net_make(&n, ctx, 5, 1, MGPU_OPTIM_ADAMW);
    before = net_bytes(&n, &before_len);
    r = mgpu_checkpoint_load(bad, n.m, n.opt, NULL);
    after = net_bytes(&n, &after_len);
    MT_CHECK(r != MGPU_OK, "%s: loaded without error", what);
    MT_CHECK(before_len == after_len && memcmp(before, after, before_len) == 0, "%s: the model or optimizer was modified", what);
    MT_CHECK(strstr(mgpu_last_error(), file) != NULL, "%s: message must name %s: %s", what, file, mgpu_last_error());
    /* damage structural enough to see without a model: verify (mgpu-ckpt verify) must see it too */
    if (verify_too) {
        char msg[1100];
        snprintf(msg, sizeof msg, "%s", mgpu_last_error());
        MT_CHECK(mgpu_checkpoint_verify(bad) == r, "%s: verify agrees: load said %s; verify said %s", what, msg, mgpu_last_error());
    }
    free(before); free(after);
    net_free(&n);
    return r;
}

static void test_truncated_files(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    char dir[300], good[400], path[500];
    static const char *files[2] = {"model.safetensors", "optimizer.safetensors"};
    net a;
    int f;
    scratch(dir, sizeof dir, "trunc");
    make_checkpoint(ctx, &a, dir);
    snprintf(good, sizeof good, "%s/step-00000003", dir);
    for (f = 0; f < 2; f++) {
        unsigned char *data = NULL;
        size_t len = 0, cut, stride;
        snprintf(path, sizeof path, "%s/%s", good, files[f]);
        if (!read_all(path, &data, &len)) { MT_CHECK(0, "read %s", path); continue; }
        stride = quick ? len / 7 + 1 : len / 40 + 1;
        for (cut = 0; cut < len; cut += stride) {
            char what[96];
            snprintf(what, sizeof what, "%s cut at %zu of %zu", files[f], cut, len);
            MT_CHECK(load_damaged(ctx, good, files[f], data, cut, what, 1) == MGPU_ERR_FORMAT, "%s: %s", what, mgpu_last_error());
        }
        MT_CHECK(load_damaged(ctx, good, files[f], data, len - 1, "last byte cut", 1) == MGPU_ERR_FORMAT, "%s", mgpu_last_error());
        free(data);
    }
    net_free(&a);
    mgpu_context_destroy(ctx);
}

static void test_flipped_bytes(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    char dir[300], good[400], path[500];
    net a;
    unsigned char *data = NULL;
    size_t len = 0, at;
    scratch(dir, sizeof dir, "flip");
    make_checkpoint(ctx, &a, dir);
    snprintf(good, sizeof good, "%s/step-00000003", dir);
    snprintf(path, sizeof path, "%s/model.safetensors", good);
    if (read_all(path, &data, &len)) {
        size_t stride = quick ? len / 9 + 1 : len / 50 + 1;
        for (at = 0; at < len; at += stride) {
            char what[64];
            mgpu_result r;
            /* flipping padding spaces of the header can leave a valid file: skip those */
            if (data[at] == ' ') continue;
            data[at] ^= 0x10;
            snprintf(what, sizeof what, "byte %zu of %zu flipped", at, len);
            r = load_damaged(ctx, good, "model.safetensors", data, len, what, 0);
            MT_CHECK(r == MGPU_ERR_FORMAT || r == MGPU_ERR_SHAPE || r == MGPU_ERR_UNSUPPORTED, "%s: %s", what, mgpu_last_error());
            data[at] ^= 0x10;
        }
        /* a flip in the data section specifically: caught by the checksum */
        data[len - 3] ^= 0x01;
        MT_CHECK(load_damaged(ctx, good, "model.safetensors", data, len, "data flip", 1) == MGPU_ERR_FORMAT && strstr(mgpu_last_error(), "checksum"),
                 "data flip: %s", mgpu_last_error());
        free(data);
    }
    net_free(&a);
    mgpu_context_destroy(ctx);
}

/* Replaces the first occurrence of `from` by `to` (same length) in a copy of the file. */
static mgpu_result load_edited(mgpu_context *ctx, const char *good, const char *file, const char *from, const char *to, const char *what) {
    char path[500];
    unsigned char *data = NULL, *hit;
    size_t len = 0;
    mgpu_result r = MGPU_OK;
    snprintf(path, sizeof path, "%s/%s", good, file);
    if (!read_all(path, &data, &len)) { MT_CHECK(0, "read %s", path); return MGPU_OK; }
    hit = (unsigned char *)memmem(data, len, from, strlen(from));
    MT_CHECK(hit != NULL && strlen(from) == strlen(to), "%s: pattern %s", what, from);
    if (hit) { memcpy(hit, to, strlen(to)); r = load_damaged(ctx, good, file, data, len, what, 1); }
    free(data);
    return r;
}

static void test_bad_headers(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    char dir[300], good[400], path[500];
    net a;
    unsigned char *data = NULL;
    size_t len = 0;
    mgpu_result r;
    scratch(dir, sizeof dir, "headers");
    make_checkpoint(ctx, &a, dir);
    snprintf(good, sizeof good, "%s/step-00000003", dir);
    snprintf(path, sizeof path, "%s/model.safetensors", good);
    if (read_all(path, &data, &len)) {
        unsigned char huge[8] = {0, 0, 0, 0, 0, 1, 0, 0}; /* 2^40 */
        memcpy(data, huge, 8);
        r = load_damaged(ctx, good, "model.safetensors", data, len, "huge header length", 1);
        MT_CHECK(r == MGPU_ERR_FORMAT && strstr(mgpu_last_error(), "header length"), "huge header: %s", mgpu_last_error());
        free(data);
    }
    /* F32 -> I32 keeps every byte range valid: the dtype check must catch it, naming the tensor */
    r = load_edited(ctx, good, "model.safetensors", "\"fc1.weight\":{\"dtype\":\"F32\"", "\"fc1.weight\":{\"dtype\":\"I32\"", "wrong dtype");
    MT_CHECK(r == MGPU_ERR_SHAPE && strstr(mgpu_last_error(), "fc1.weight"), "wrong dtype: %s", mgpu_last_error());
    r = load_edited(ctx, good, "optimizer.safetensors", "\"fc1.bias.exp_avg\":{\"dtype\":\"F32\"", "\"fc1.bias.exp_avg\":{\"dtype\":\"I32\"",
                    "wrong optimizer dtype");
    MT_CHECK(r == MGPU_ERR_SHAPE && strstr(mgpu_last_error(), "fc1.bias.exp_avg"), "optimizer dtype: %s", mgpu_last_error());
    r = load_edited(ctx, good, "trainer_state.json", "\"step\":3", "\"step\":4", "state step differs from the directory");
    MT_CHECK(r == MGPU_ERR_FORMAT, "step mismatch: %s", mgpu_last_error());
    r = load_edited(ctx, good, "trainer_state.json", "\"format_version\":1", "\"format_version\":9", "newer format");
    MT_CHECK(r == MGPU_ERR_FORMAT && strstr(mgpu_last_error(), "format_version"), "format version: %s", mgpu_last_error());
    r = load_edited(ctx, good, "trainer_state.json", "\"seed\":18446744073709551615", "\"seed\":18446744073709551616", "seed overflow");
    MT_CHECK(r == MGPU_ERR_FORMAT && strstr(mgpu_last_error(), "rng.seed"), "seed: %s", mgpu_last_error());
    net_free(&a);
    mgpu_context_destroy(ctx);
}

static void test_garbage_state(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    static const char *const texts[] = {"", "not json", "{", "[1,2]", "{\"format_version\":1}", "{\"format_version\":1,\"step\":-3}",
                                        "{\"format_version\":1,\"step\":3,\"rng\":{\"seed\":1}}", "{\"format_version\":1,\"step\":3,\"metrics\":[1]}",
                                        "{\"format_version\":1,\"step\":3,\"scaler\":{\"scale\":0,\"growth_tracker\":0}}",
                                        "{\"format_version\":\"1\",\"step\":3}", "\xff\xfe{}"};
    char dir[300], good[400];
    net a;
    size_t i;
    scratch(dir, sizeof dir, "garbage");
    make_checkpoint(ctx, &a, dir);
    snprintf(good, sizeof good, "%s/step-00000003", dir);
    for (i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        char what[64];
        snprintf(what, sizeof what, "trainer_state.json #%zu", i);
        MT_CHECK(load_damaged(ctx, good, "trainer_state.json", texts[i], strlen(texts[i]), what, 1) == MGPU_ERR_FORMAT, "%s: %s", what, mgpu_last_error());
    }
    net_free(&a);
    mgpu_context_destroy(ctx);
}

/* A checkpoint of another architecture: shape and missing-tensor errors name the tensor. */
static void test_wrong_model(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    char dir[300], path[400];
    net a, other, small;
    unsigned char *before, *after;
    size_t lb, la;
    scratch(dir, sizeof dir, "wrongmodel");
    make_checkpoint(ctx, &a, dir);
    snprintf(path, sizeof path, "%s/step-00000003", dir);
    net_make(&other, ctx, 4, 1, MGPU_OPTIM_ADAMW); /* hidden 4 instead of 5 */
    before = net_bytes(&other, &lb);
    MT_CHECK(mgpu_checkpoint_load(path, other.m, other.opt, NULL) == MGPU_ERR_SHAPE && strstr(mgpu_last_error(), "fc1.weight") &&
             strstr(mgpu_last_error(), "model.safetensors"), "shape: %s", mgpu_last_error());
    after = net_bytes(&other, &la);
    MT_CHECK(lb == la && memcmp(before, after, lb) == 0, "model untouched after a shape error");
    free(before); free(after);
    /* the model has fc1 only: the file's fc2 is unexpected; the reverse is a missing tensor */
    net_make(&small, ctx, 5, 0, MGPU_OPTIM_ADAMW);
    MT_CHECK(mgpu_checkpoint_load(path, small.m, small.opt, NULL) == MGPU_ERR_FORMAT && strstr(mgpu_last_error(), "fc2."), "extra: %s", mgpu_last_error());
    {
        mgpu_checkpointer *c = ckpt_open(dir, 0, 0);
        MT_CHECK(mgpu_checkpointer_save(c, 7, small.m, small.opt, NULL) == MGPU_OK, "%s", mgpu_last_error());
        mgpu_checkpointer_destroy(c);
    }
    snprintf(path, sizeof path, "%s/step-00000007", dir);
    MT_CHECK(mgpu_checkpoint_load(path, a.m, a.opt, NULL) == MGPU_ERR_FORMAT && strstr(mgpu_last_error(), "fc2.weight") &&
             strstr(mgpu_last_error(), "missing"), "missing: %s", mgpu_last_error());
    /* an optimizer of another kind: its states are missing */
    {
        net sgd;
        net_make(&sgd, ctx, 5, 1, MGPU_OPTIM_SGD);
        snprintf(path, sizeof path, "%s/step-00000003", dir);
        MT_CHECK(mgpu_checkpoint_load(path, sgd.m, sgd.opt, NULL) == MGPU_ERR_FORMAT && strstr(mgpu_last_error(), "optimizer.safetensors") &&
                 strstr(mgpu_last_error(), "momentum_buffer"), "optimizer kind: %s", mgpu_last_error());
        /* without an optimizer the weights alone load */
        MT_CHECK(mgpu_checkpoint_load(path, sgd.m, NULL, NULL) == MGPU_OK, "%s", mgpu_last_error());
        net_free(&sgd);
    }
    MT_CHECK(mgpu_checkpoint_load(NULL, a.m, NULL, NULL) == MGPU_ERR_INVALID_ARG, "NULL path");
    MT_CHECK(mgpu_checkpoint_load("/nonexistent/step-00000001", a.m, NULL, NULL) == MGPU_ERR_IO && strstr(mgpu_last_error(), "/nonexistent"),
             "missing dir: %s", mgpu_last_error());
    net_free(&a); net_free(&other); net_free(&small);
    mgpu_context_destroy(ctx);
}

/* --- interrupted writes and a full disk ------------------------------------------------------ */

static void test_interrupted_write(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    char dir[300], path[400], found[400];
    net a;
    mgpu_checkpointer *c;
    scratch(dir, sizeof dir, "crash");
    make_checkpoint(ctx, &a, dir);
    /* what a crash mid-save leaves: a half-written step dir, a latest.tmp file, a torn file */
    snprintf(path, sizeof path, "%s/step-00000004.tmp", dir);
    mkdir(path, 0777);
    snprintf(path, sizeof path, "%s/step-00000004.tmp/model.safetensors", dir);
    write_all(path, "\x10\0\0\0\0\0\0\0{\"a\":", 13);
    snprintf(path, sizeof path, "%s/latest.tmp.12345", dir);
    write_all(path, "step-000", 8);
    MT_CHECK(mgpu_checkpoint_find(dir, found, sizeof found) == MGPU_OK && strstr(found, "step-00000003"), "previous still found: %s", found);
    MT_CHECK(mgpu_checkpoint_verify(found) == MGPU_OK, "previous valid: %s", mgpu_last_error());
    /* the next save clears the leftovers */
    c = ckpt_open(dir, 0, 0);
    MT_CHECK(mgpu_checkpointer_save(c, 5, a.m, a.opt, NULL) == MGPU_OK, "%s", mgpu_last_error());
    mgpu_checkpointer_destroy(c);
    snprintf(path, sizeof path, "%s/step-00000004.tmp", dir);
    MT_CHECK(!exists(path), "stale tmp dir removed");
    snprintf(path, sizeof path, "%s/latest.tmp.12345", dir);
    MT_CHECK(!exists(path), "stale latest.tmp removed");
    MT_CHECK(mgpu_checkpoint_find(dir, found, sizeof found) == MGPU_OK && strstr(found, "step-00000005"), "new one found: %s", found);
    net_free(&a);
    mgpu_context_destroy(ctx);
}

/* Writes fail with EFBIG past RLIMIT_FSIZE (SIGXFSZ ignored), as on a full disk: the save fails
   cleanly in a child process and the parent finds the previous checkpoint intact. */
static void test_full_disk(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    char dir[300], path[400], found[400];
    net a;
    pid_t pid;
    int status = 0;
    scratch(dir, sizeof dir, "full");
    make_checkpoint(ctx, &a, dir);
    pid = fork();
    if (pid == 0) {
        struct rlimit rl;
        mgpu_checkpointer *c = ckpt_open(dir, 1, 0);
        mgpu_result r;
        signal(SIGXFSZ, SIG_IGN);
        rl.rlim_cur = rl.rlim_max = 200; /* smaller than the model file */
        setrlimit(RLIMIT_FSIZE, &rl);
        net_step(ctx, &a, 4);
        r = mgpu_checkpointer_save(c, 4, a.m, a.opt, NULL);
        if (r != MGPU_ERR_IO || !strstr(mgpu_last_error(), "File too large")) {
            fprintf(stderr, "  child: save gave %d: %s\n", (int)r, mgpu_last_error());
            _exit(1);
        }
        _exit(0);
    }
    MT_CHECK(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %d", status);
    MT_CHECK(mgpu_checkpoint_find(dir, found, sizeof found) == MGPU_OK && strstr(found, "step-00000003"), "previous intact: %s", found);
    snprintf(path, sizeof path, "%s/step-00000004.tmp", dir);
    MT_CHECK(!exists(path), "the failed save cleaned up after itself");
    snprintf(path, sizeof path, "%s/step-00000002", dir);
    MT_CHECK(exists(path), "no pruning after a failed save");
    net_free(&a);
    mgpu_context_destroy(ctx);
}

/* A background save that fails is reported by wait, and the next save still works. */
static void test_background_failure(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    char dir[300], file[400];
    net a;
    mgpu_checkpointer *c;
    scratch(dir, sizeof dir, "bgfail");
    mkdir(dir, 0777);
    net_make(&a, ctx, 5, 1, MGPU_OPTIM_ADAMW);
    /* a plain file where the step directory's parent should be: mkdir fails on the writer */
    snprintf(file, sizeof file, "%s/blocked", dir);
    write_all(file, "x", 1);
    c = ckpt_open(file, 0, 1);
    MT_CHECK(mgpu_checkpointer_save(c, 1, a.m, a.opt, NULL) == MGPU_OK, "background save starts");
    MT_CHECK(mgpu_checkpointer_wait(c) == MGPU_ERR_IO && strstr(mgpu_last_error(), "blocked"), "wait reports: %s", mgpu_last_error());
    MT_CHECK(mgpu_checkpointer_wait(c) == MGPU_OK, "reported once");
    mgpu_checkpointer_destroy(c);
    net_free(&a);
    mgpu_context_destroy(ctx);
}

/* In-memory validation agrees with the on-disk one. */
static void test_load_bytes(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    char dir[300], path[400];
    net a, b;
    unsigned char *m = NULL, *o = NULL, *s = NULL;
    size_t ml = 0, ol = 0, sl = 0;
    mgpu_checkpoint_bytes files;
    mgpu_json *st = NULL;
    scratch(dir, sizeof dir, "bytes");
    make_checkpoint(ctx, &a, dir);
    snprintf(path, sizeof path, "%s/step-00000003/model.safetensors", dir); read_all(path, &m, &ml);
    snprintf(path, sizeof path, "%s/step-00000003/optimizer.safetensors", dir); read_all(path, &o, &ol);
    snprintf(path, sizeof path, "%s/step-00000003/trainer_state.json", dir); read_all(path, &s, &sl);
    memset(&files, 0, sizeof files);
    files.model = m; files.model_len = ml; files.optimizer = o; files.optimizer_len = ol;
    files.trainer_state = (const char *)s; files.trainer_state_len = sl;
    net_make(&b, ctx, 5, 1, MGPU_OPTIM_ADAMW);
    MT_CHECK(mgpu_checkpoint_load_bytes(&files, "mem", NULL, NULL, NULL) == MGPU_OK, "validate only: %s", mgpu_last_error());
    MT_CHECK(mgpu_checkpoint_load_bytes(&files, "mem", b.m, b.opt, &st) == MGPU_OK && st, "%s", mgpu_last_error());
    MT_CHECK(net_equal(&a, &b), "load_bytes restores the same state");
    files.trainer_state_len = sl / 2;
    MT_CHECK(mgpu_checkpoint_load_bytes(&files, "mem", NULL, NULL, NULL) == MGPU_ERR_FORMAT && strstr(mgpu_last_error(), "mem/trainer_state.json"),
             "%s", mgpu_last_error());
    mgpu_json_free(st);
    free(m); free(o); free(s);
    net_free(&a); net_free(&b);
    mgpu_context_destroy(ctx);
}


/* --- the trainer: interrupted (SIGTERM raised mid-run) and resumed == uninterrupted ---------- */

/* conv(1->4, 3x3) -> batch norm -> ReLU -> flatten -> dropout 0.3 -> linear(256->10): buffers and
   the RNG stream (dropout) both must survive a resume. */
typedef struct small_cnn { mgpu_conv2d *conv; mgpu_batchnorm2d *bn; mgpu_dropout *drop; mgpu_linear *fc; int calls, raise_at; } small_cnn;

static mgpu_tensor *small_cnn_forward(mgpu_context *ctx, mgpu_tensor *x, void *user) {
    small_cnn *n = (small_cnn *)user;
    mgpu_tensor *h;
    if (++n->calls == n->raise_at) raise(SIGTERM); /* as a cluster scheduler would, mid-step */
    h = mgpu_op_relu(ctx, mgpu_batchnorm2d_forward(ctx, n->bn, mgpu_conv2d_forward(ctx, n->conv, x))); // (B, 4, 8, 8)
    h = mgpu_dropout_forward(ctx, n->drop, mgpu_op_flatten(ctx, h, 1));                                // (B, 256)
    return mgpu_linear_forward(ctx, n->fc, h);                                                          // (B, 10)
}

static mgpu_dataset *small_dataset(void) {
    enum { N = 88 };
    static float x[N * 64];
    static int64_t y[N];
    int64_t xs[3] = {1, 8, 8};
    int i;
    uint64_t saved = mt_rng_state;
    mt_rng_state = 77;
    for (i = 0; i < N * 64; i++) x[i] = (float)mt_uniform(0, 1);
    for (i = 0; i < N; i++) y[i] = (int64_t)(mt_uniform(0, 10)) % 10;
    mt_rng_state = saved;
    return mgpu_dataset_from_arrays(N, MGPU_F32, 3, xs, x, MGPU_I64, 0, NULL, y);
}

typedef struct run_cfg { mgpu_amp_mode amp; int accum; float clip; int workers; int raise_at; int every_steps, every_epochs; float every_min; } run_cfg;

/* One fit of the small CNN into dir (resume: --resume auto); returns the fit result. */
static mgpu_result run_small(const run_cfg *cfg, const char *dir, int resume, mgpu_train_summary *sum) {
    static char metrics[400];
    mgpu_train_opts o;
    mgpu_trainer *t;
    mgpu_model *m;
    mgpu_dataset *ds = small_dataset();
    small_cnn net;
    mgpu_result r = MGPU_ERR_STATE;
    mgpu_train_opts_default(&o);
    snprintf(metrics, sizeof metrics, "%s.jsonl", dir);
    o.epochs = 3; o.batch_size = 16; o.grad_accum_steps = cfg->accum; o.clip_grad_norm = cfg->clip; o.amp = cfg->amp;
    o.lr = 0.05f; o.schedule = MGPU_SCHEDULE_COSINE; o.warmup_epochs = 0.5f; o.num_workers = cfg->workers;
    o.device = MGPU_DEVICE_KIND_CPU; o.seed = 11; o.log_every = 0; o.eval_frequency = 0;
    o.save_dir = dir; o.metrics = metrics; o.keep_last = 2;
    o.checkpoint_every_steps = cfg->every_steps; o.checkpoint_every_epochs = cfg->every_epochs; o.checkpoint_interval_min = cfg->every_min;
    o.resume = resume ? MGPU_RESUME_AUTO : MGPU_RESUME_NONE;
    memset(&net, 0, sizeof net);
    net.raise_at = resume ? 0 : cfg->raise_at;
    t = mgpu_trainer_create(&o);
    m = t ? mgpu_model_create(mgpu_trainer_context(t)) : NULL;
    if (m && (net.conv = mgpu_conv2d_create(m, "conv", 1, 4, 3, 1, 1, 1)) && (net.bn = mgpu_batchnorm2d_create(m, "bn", 4)) &&
        (net.drop = mgpu_dropout_create(m, 0.3f)) && (net.fc = mgpu_linear_create(m, "fc", 256, 10, 1)))
        r = mgpu_trainer_fit(t, m, small_cnn_forward, &net, ds, NULL, sum);
    else
        fprintf(stderr, "  setup failed: %s\n", mgpu_last_error());
    mgpu_model_destroy(m);
    mgpu_trainer_destroy(t);
    mgpu_dataset_destroy(ds);
    return r;
}

/* The "train_loss" values of a metrics file, in order. */
static void train_losses(const char *path, char *out, size_t size) {
    unsigned char *text = NULL;
    size_t len = 0;
    const char *p;
    out[0] = 0;
    if (!read_all(path, &text, &len)) return;
    text[len] = 0;
    for (p = (const char *)text; (p = strstr(p, "\"train_loss\":")) != NULL; p++) {
        size_t n = strcspn(p + 13, ",}");
        if (strlen(out) + n + 2 < size) { strncat(out, p + 13, n); strcat(out, " "); }
    }
    free(text);
}

static void check_interrupted_run(const run_cfg *cfg) {
    char ref[300], dir[300], a[400], b[400], la[600], lb[600];
    unsigned char *wa = NULL, *wb = NULL;
    size_t na = 0, nb = 0;
    mgpu_train_summary s1, s2, s3;
    run_cfg plain = *cfg;
    plain.raise_at = 0;
    scratch(ref, sizeof ref, "fit_ref");
    scratch(dir, sizeof dir, "fit_cut");
    MT_CHECK(run_small(&plain, ref, 0, &s1) == MGPU_OK, "reference: %s", mgpu_last_error());
    MT_CHECK(run_small(cfg, dir, 0, &s2) == MGPU_OK, "interrupted run returns OK: %s", mgpu_last_error());
    MT_CHECK(s2.steps > 0 && s2.steps < s1.steps, "stopped early: %lld of %lld steps", (long long)s2.steps, (long long)s1.steps);
    snprintf(a, sizeof a, "%s/model.safetensors", dir);
    MT_CHECK(!exists(a), "a stop by signal writes a checkpoint, not the final model");
    MT_CHECK(run_small(cfg, dir, 1, &s3) == MGPU_OK, "resumed run: %s", mgpu_last_error());
    MT_CHECK(s3.steps == s1.steps, "resumed run ends at step %lld, reference at %lld", (long long)s3.steps, (long long)s1.steps);
    snprintf(a, sizeof a, "%s/model.safetensors", ref);
    snprintf(b, sizeof b, "%s/model.safetensors", dir);
    MT_CHECK(read_all(a, &wa, &na) && read_all(b, &wb, &nb) && na == nb && memcmp(wa, wb, na) == 0,
             "amp mode %d, accum %d, SIGTERM at forward %d: final weights differ from the uninterrupted run", (int)cfg->amp, cfg->accum, cfg->raise_at);
    snprintf(a, sizeof a, "%s.jsonl", ref);
    snprintf(b, sizeof b, "%s.jsonl", dir);
    train_losses(a, la, sizeof la);
    train_losses(b, lb, sizeof lb);
    MT_CHECK(la[0] && strcmp(la, lb) == 0, "per-epoch train losses must match exactly: [%s] vs [%s]", la, lb);
    free(wa); free(wb);
}

static void test_trainer_resume_exact(void) {
    run_cfg c1 = {MGPU_AMP_OFF, 1, 0.0f, 0, 4, 2, 0, 0}, c2 = {MGPU_AMP_OFF, 4, 0.0f, 2, 9, 2, 0, 0}, c3 = {MGPU_AMP_OFF, 4, 0.0f, 0, 14, 0, 1, 0};
    check_interrupted_run(&c1);  /* plain, mid-epoch 1 */
    check_interrupted_run(&c2);  /* accumulation: the signal lands between micro-batches; 2 loader workers */
    check_interrupted_run(&c3);  /* accumulation across the epoch-end partial step */
}
static void test_trainer_resume_amp(void) {
    run_cfg c1 = {MGPU_AMP_FP16, 2, 1.0f, 0, 7, 2, 0, 0}, c2 = {MGPU_AMP_BF16, 1, 0.0f, 0, 11, 2, 0, 0};
    char dir[300], path[400], want[80];
    unsigned char *text = NULL;
    size_t len = 0;
    mgpu_train_summary s;
    check_interrupted_run(&c1);  /* loss scaler, unscale before clipping */
    check_interrupted_run(&c2);
    /* the scaler's state travels: a checkpoint's scale (edited to 1024) and growth tracker
       (consecutive clean steps) carry on in the resumed run's later checkpoints */
    scratch(dir, sizeof dir, "fit_scaler");
    MT_CHECK(run_small(&c1, dir, 0, &s) == MGPU_OK && s.steps == 4, "stopped at %lld: %s", (long long)s.steps, mgpu_last_error());
    snprintf(path, sizeof path, "%s/step-00000004/trainer_state.json", dir);
    if (read_all(path, &text, &len)) {
        unsigned char *hit;
        text[len] = 0;
        hit = (unsigned char *)strstr((char *)text, "\"scale\":65536,\"growth_tracker\":4}");
        MT_CHECK(hit != NULL, "fresh fp16 scaler state in the checkpoint: %s", text);
        if (hit) memcpy(hit, "\"scale\": 1024,", 14); /* same length as "scale":65536, */
        write_all(path, text, len);
        free(text);
    }
    MT_CHECK(run_small(&c1, dir, 1, &s) == MGPU_OK && s.steps == 9, "%s", mgpu_last_error());
    snprintf(path, sizeof path, "%s/step-00000008/trainer_state.json", dir);
    snprintf(want, sizeof want, "\"scale\":1024,\"growth_tracker\":8}");
    MT_CHECK(read_all(path, &text, &len) && (text[len] = 0, strstr((char *)text, want) != NULL), "restored scaler: %s", text ? (char *)text : "");
    free(text);
}

/* The time breakdown lands in the metrics, and --resume PATH with a corrupt file is an error. */
static void test_trainer_metrics_and_bad_resume(void) {
    char dir[300], path[400];
    unsigned char *text = NULL;
    size_t len = 0;
    mgpu_train_summary s;
    run_cfg c = {MGPU_AMP_OFF, 1, 0.0f, 0, 0, 2, 0, 0}, by_epoch = {MGPU_AMP_OFF, 1, 0.0f, 0, 0, 0, 1, 0}, by_time = {MGPU_AMP_OFF, 1, 0.0f, 0, 0, 0, 0, 1e-7f};
    const char *keys[] = {"\"data_wait_s\":", "\"compute_s\":", "\"optimizer_s\":", "\"checkpoint_s\":", "\"comm_s\":0", "\"peak_arena_bytes\":", "\"rss_mb\":"};
    size_t i;
    scratch(dir, sizeof dir, "fit_metrics");
    MT_CHECK(run_small(&c, dir, 0, &s) == MGPU_OK, "%s", mgpu_last_error());
    snprintf(path, sizeof path, "%s.jsonl", dir);
    MT_CHECK(read_all(path, &text, &len), "metrics written");
    if (text) {
        text[len] = 0;
        for (i = 0; i < sizeof keys / sizeof keys[0]; i++) MT_CHECK(strstr((char *)text, keys[i]) != NULL, "metrics lack %s", keys[i]);
        free(text);
    }
    /* resuming a finished run is a no-op that ends with the same weights */
    MT_CHECK(run_small(&c, dir, 1, &s) == MGPU_OK && s.steps == 18, "resume after the end: %s (%lld steps)", mgpu_last_error(), (long long)s.steps);
    /* the other triggers: each epoch's end (6 steps per epoch), and wall time (1e-7 minutes: every step) */
    scratch(dir, sizeof dir, "fit_by_epoch");
    MT_CHECK(run_small(&by_epoch, dir, 0, &s) == MGPU_OK, "%s", mgpu_last_error());
    snprintf(path, sizeof path, "%s/step-00000012", dir);
    MT_CHECK(exists(path) && count_entries(dir, "step-") == 2, "epoch checkpoints: step 12 and 18 kept");
    scratch(dir, sizeof dir, "fit_by_time");
    MT_CHECK(run_small(&by_time, dir, 0, &s) == MGPU_OK, "%s", mgpu_last_error());
    snprintf(path, sizeof path, "%s/step-00000017", dir);
    MT_CHECK(exists(path), "time-triggered checkpoint at step 17");
    scratch(dir, sizeof dir, "fit_metrics");
    MT_CHECK(run_small(&c, dir, 0, &s) == MGPU_OK, "%s", mgpu_last_error());
    /* damage every checkpoint: --resume auto must fail naming a file, not start over */
    snprintf(path, sizeof path, "rm -f %s/step-*/optimizer.safetensors", dir);
    MT_CHECK(system(path) == 0, "rm");
    MT_CHECK(run_small(&c, dir, 1, &s) == MGPU_ERR_IO && strstr(mgpu_last_error(), "optimizer.safetensors"), "%s", mgpu_last_error());
}

int main(void) {
    quick = getenv("MGPU_TEST_QUICK") != NULL;
    snprintf(root, sizeof root, "/tmp/mgpu_test_checkpoint.%ld", (long)getpid());
    mkdir(root, 0777);
    MT_RUN(test_round_trip_adamw);
    MT_RUN(test_round_trip_sgd_momentum);
    MT_RUN(test_round_trip_background);
    MT_RUN(test_file_layout);
    MT_RUN(test_latest_and_keep_last);
    MT_RUN(test_find_falls_back);
    MT_RUN(test_truncated_files);
    MT_RUN(test_flipped_bytes);
    MT_RUN(test_bad_headers);
    MT_RUN(test_garbage_state);
    MT_RUN(test_wrong_model);
    MT_RUN(test_interrupted_write);
    MT_RUN(test_full_disk);
    MT_RUN(test_background_failure);
    MT_RUN(test_load_bytes);
    MT_RUN(test_trainer_resume_exact);
    MT_RUN(test_trainer_resume_amp);
    MT_RUN(test_trainer_metrics_and_bad_resume);
    {
        char cmd[320];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
        if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", root);
    }
    return MT_END();
}
