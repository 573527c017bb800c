/* mgpu-ckpt - inspect, verify and diff training checkpoints.

   Build:  make build/mgpu-ckpt
   Usage:  mgpu-ckpt inspect PATH      tensors (dtype, shape, bytes) of each file and the trainer state
           mgpu-ckpt verify PATH       full validation: "ok" and exit 0, or the error and exit 1
           mgpu-ckpt diff A B          per tensor: max absolute and max relative difference
   PATH is a checkpoint directory (DIR/step-00001234), a --save-dir (its `latest`, falling back
   to the newest valid checkpoint), or a single .safetensors file (a final model.safetensors, or
   weights PyTorch wrote with safetensors.torch.save_file); diff compares a file with a
   checkpoint's model.safetensors. Exit codes: 0 ok, 1 bad checkpoint or I/O error, 2 bad usage. */
#define MGPU_IMPLEMENTATION
#include "mgpu.h"
#include <math.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

static const char *const files[2] = {"model.safetensors", "optimizer.safetensors"};

static void usage(FILE *out) {
    fprintf(out,
            "usage: mgpu-ckpt inspect PATH\n"
            "       mgpu-ckpt verify PATH\n"
            "       mgpu-ckpt diff A B\n"
            "PATH: a checkpoint directory (DIR/step-00001234), a save directory (uses DIR/latest),\n"
            "      or one .safetensors file (e.g. written by PyTorch's safetensors.torch.save_file)\n"
            "inspect  list each file's tensors (dtype, shape, bytes) and summarise trainer_state.json\n"
            "verify   validate every file (header, JSON, dtypes, shapes, offsets, checksums); exit 1 if bad\n"
            "diff     max |a - b| and max |a - b| / max(|a|, |b|) per tensor of the two checkpoints\n"
            "         (a file against a checkpoint: the checkpoint's model.safetensors)\n");
}

/* A single safetensors file rather than a checkpoint or save directory. */
static int is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* The checkpoint directory PATH stands for (a save dir resolves through latest). */
static int resolve(const char *path, char *out, size_t size) {
    char state[4200];
    snprintf(state, sizeof state, "%s/trainer_state.json", path);
    if (access(state, F_OK) == 0) { snprintf(out, size, "%s", path); return 1; }
    if (mgpu_checkpoint_find(path, out, size) == MGPU_OK) return 1;
    fprintf(stderr, "mgpu-ckpt: %s\n", mgpu_last_error());
    return 0;
}

static mgpu_safetensors *open_path(const char *path) {
    mgpu_safetensors *st = mgpu_safetensors_open(path);
    if (!st) fprintf(stderr, "mgpu-ckpt: %s\n", mgpu_last_error());
    return st;
}

static mgpu_safetensors *open_file(const char *dir, int which) {
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, files[which]);
    return open_path(path);
}

/* label: the file's path, for the heading. */
static void print_file(const char *label, const mgpu_safetensors *st) {
    static const char *const keys[] = {"format", "optimizer", "step_count", "checksum"};
    size_t total = 0, k;
    int i;
    for (i = 0; i < mgpu_safetensors_count(st); i++) total += mgpu_safetensors_get(st, i)->nbytes;
    printf("%s: %d tensors, %zu bytes", label, mgpu_safetensors_count(st), total);
    for (k = 0; k < sizeof keys / sizeof keys[0]; k++)
        if (mgpu_safetensors_metadata(st, keys[k])) printf(", %s %s", keys[k], mgpu_safetensors_metadata(st, keys[k]));
    printf("\n");
    for (i = 0; i < mgpu_safetensors_count(st); i++) {
        const mgpu_safetensors_entry *e = mgpu_safetensors_get(st, i);
        char shape[128];
        mgpu_shape_string(e->ndim, e->shape, shape, sizeof shape);
        printf("  %-40s %-5s %-20s %zu\n", e->name, mgpu_dtype_name(e->dtype), shape, e->nbytes);
    }
}

static void print_int(const mgpu_json *obj, const char *key, const char *label) {
    const mgpu_json *v = mgpu_json_get(obj, key);
    if (v && v->type == MGPU_JSON_NUMBER) printf(" %s %.*s", label, (int)v->raw_len, v->raw);
}

static void print_state(const char *dir, const mgpu_json *s) {
    const mgpu_json *metrics = mgpu_json_get(s, "metrics"), *last = NULL, *m;
    printf("%s/trainer_state.json:", dir);
    print_int(s, "step", "step");
    print_int(s, "epoch", "epoch (0-based)");
    print_int(s, "batch_in_epoch", "batch_in_epoch");
    print_int(s, "world_size", "world_size");
    print_int(s, "lr", "lr");
    printf("\n ");
    print_int(mgpu_json_get(s, "rng"), "seed", "rng seed");
    print_int(mgpu_json_get(s, "rng"), "offset", "offset");
    print_int(mgpu_json_get(s, "scaler"), "scale", "| scaler scale");
    print_int(mgpu_json_get(s, "scaler"), "growth_tracker", "growth_tracker");
    if (metrics) {
        for (m = metrics->child; m; m = m->next) last = m;
        printf(" | %lld epoch record(s)", (long long)metrics->count);
        if (last) { print_int(last, "test_accuracy", "last test_accuracy"); print_int(last, "train_loss", "train_loss"); }
    }
    printf("\n");
}

static int cmd_inspect(const char *arg) {
    char dir[4200], label[4300];
    void *text = NULL;
    size_t len = 0;
    mgpu_json *state = NULL;
    int i, ok = 1;
    if (is_file(arg)) {
        mgpu_safetensors *st = open_path(arg);
        if (!st) return 1;
        print_file(arg, st);
        mgpu_safetensors_close(st);
        return 0;
    }
    if (!resolve(arg, dir, sizeof dir)) return 1;
    for (i = 0; i < 2; i++) {
        mgpu_safetensors *st = open_file(dir, i);
        if (!st) { ok = 0; continue; }
        snprintf(label, sizeof label, "%s/%s", dir, files[i]);
        print_file(label, st);
        mgpu_safetensors_close(st);
    }
    {
        char path[4300];
        snprintf(path, sizeof path, "%s/trainer_state.json", dir);
        if (mgpu_read_file(path, &text, &len) != MGPU_OK || !(state = mgpu_json_parse((const char *)text, len, path))) {
            fprintf(stderr, "mgpu-ckpt: %s\n", mgpu_last_error());
            ok = 0;
        } else {
            print_state(dir, state);
        }
    }
    mgpu_json_free(state);
    mgpu_free(text);
    return ok ? 0 : 1;
}

/* One file: everything mgpu_safetensors_open checks (header size, JSON, dtypes, shapes against
   byte counts, offsets inside the file). A lone file has no trainer state to check it against. */
static int verify_file(const char *path) {
    mgpu_safetensors *st = open_path(path);
    if (!st) return 1;
    mgpu_safetensors_close(st);
    printf("%s: ok\n", path);
    return 0;
}

static int cmd_verify(const char *arg) {
    char dir[4200];
    if (is_file(arg)) return verify_file(arg);
    if (!resolve(arg, dir, sizeof dir)) return 1;
    if (mgpu_checkpoint_verify(dir) != MGPU_OK) {
        fprintf(stderr, "mgpu-ckpt: %s: %s\n", dir, mgpu_last_error());
        return 1;
    }
    printf("%s: ok\n", dir);
    return 0;
}

/* Element i of an entry as double (file data may be unaligned). */
static double element(const mgpu_safetensors_entry *e, int64_t i) {
    const unsigned char *p = (const unsigned char *)e->data + (size_t)i * mgpu_dtype_size(e->dtype);
    float f; uint16_t h; int32_t i32; int64_t i64;
    switch (e->dtype) {
    case MGPU_F32: memcpy(&f, p, 4); return f;
    case MGPU_F16: memcpy(&h, p, 2); return mgpu_f16_to_f32(h);
    case MGPU_BF16: memcpy(&h, p, 2); return mgpu_bf16_to_f32(h);
    case MGPU_I32: memcpy(&i32, p, 4); return i32;
    case MGPU_I64: memcpy(&i64, p, 8); return (double)i64;
    case MGPU_U8: return *p;
    }
    return NAN;
}

static void diff_entry(const mgpu_safetensors_entry *a, const mgpu_safetensors_entry *b) {
    double max_abs = 0, max_rel = 0;
    int64_t i, n = 1;
    int d;
    if (a->ndim != b->ndim || memcmp(a->shape, b->shape, sizeof(int64_t) * (size_t)a->ndim) != 0) {
        char sa[128], sb[128];
        mgpu_shape_string(a->ndim, a->shape, sa, sizeof sa);
        mgpu_shape_string(b->ndim, b->shape, sb, sizeof sb);
        printf("  %-40s shape %s vs %s\n", a->name, sa, sb);
        return;
    }
    for (d = 0; d < a->ndim; d++) n *= a->shape[d];
    for (i = 0; i < n; i++) {
        double x = element(a, i), y = element(b, i), diff = fabs(x - y), scale = fmax(fabs(x), fabs(y));
        if (x == y) continue;
        if (!(diff <= max_abs)) max_abs = diff; /* NaN sticks */
        if (scale > 0 && !(diff / scale <= max_rel)) max_rel = diff / scale;
    }
    printf("  %-40s max_abs %-12.6g max_rel %-12.6g%s%s\n", a->name, max_abs, max_rel, a->dtype != b->dtype ? " (dtypes differ)" : "",
           a->nbytes == b->nbytes && memcmp(a->data, b->data, a->nbytes) == 0 ? " identical" : "");
}

/* Every tensor of A against B's of the same name, then the names only one of them has. */
static void diff_tensors(const mgpu_safetensors *a, const mgpu_safetensors *b) {
    int i;
    for (i = 0; i < mgpu_safetensors_count(a); i++) {
        const mgpu_safetensors_entry *ea = mgpu_safetensors_get(a, i), *eb = mgpu_safetensors_find(b, ea->name);
        if (eb) diff_entry(ea, eb);
        else printf("  %-40s only in A\n", ea->name);
    }
    for (i = 0; i < mgpu_safetensors_count(b); i++)
        if (!mgpu_safetensors_find(a, mgpu_safetensors_get(b, i)->name)) printf("  %-40s only in B\n", mgpu_safetensors_get(b, i)->name);
}

/* PATH as one weights file: itself, or a checkpoint's model.safetensors. */
static int model_file(const char *arg, char *out, size_t size) {
    char dir[4200];
    if (is_file(arg)) { snprintf(out, size, "%s", arg); return 1; }
    if (!resolve(arg, dir, sizeof dir)) return 0;
    snprintf(out, size, "%s/%s", dir, files[0]);
    return 1;
}

/* A single file on either side: the weights only (a file has no optimizer state). */
static int diff_models(const char *arg_a, const char *arg_b) {
    char fa[4300], fb[4300];
    mgpu_safetensors *a = NULL, *b = NULL;
    int ok;
    if (!model_file(arg_a, fa, sizeof fa) || !model_file(arg_b, fb, sizeof fb)) return 1;
    printf("A: %s\nB: %s\n", fa, fb);
    ok = (a = open_path(fa)) != NULL && (b = open_path(fb)) != NULL;
    if (ok) diff_tensors(a, b);
    mgpu_safetensors_close(a);
    mgpu_safetensors_close(b);
    return ok ? 0 : 1;
}

static int cmd_diff(const char *arg_a, const char *arg_b) {
    char da[4200], db[4200];
    int w;
    if (is_file(arg_a) || is_file(arg_b)) return diff_models(arg_a, arg_b);
    if (!resolve(arg_a, da, sizeof da) || !resolve(arg_b, db, sizeof db)) return 1;
    printf("A: %s\nB: %s\n", da, db);
    for (w = 0; w < 2; w++) {
        mgpu_safetensors *a = open_file(da, w), *b = open_file(db, w);
        if (a && b) {
            printf("%s:\n", files[w]);
            diff_tensors(a, b);
        }
        mgpu_safetensors_close(a);
        mgpu_safetensors_close(b);
        if (!a || !b) return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) { usage(stdout); return 0; }
    if (argc == 3 && strcmp(argv[1], "inspect") == 0) return cmd_inspect(argv[2]);
    if (argc == 3 && strcmp(argv[1], "verify") == 0) return cmd_verify(argv[2]);
    if (argc == 4 && strcmp(argv[1], "diff") == 0) return cmd_diff(argv[2], argv[3]);
    usage(stderr);
    return 2;
}
