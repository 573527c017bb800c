/* Data: IDX parsing and files (plain and gzip), Fashion-MNIST discovery, DistributedSampler
   semantics, the multi-threaded loader, and tools/setup_data.sh. */
#define _GNU_SOURCE /* mkdtemp, setenv */
#include "mgpu_test.h"
#include <stdint.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static int mt_quick(void) { return getenv("MGPU_TEST_QUICK") != NULL; }

/* ---- IDX helpers ---- */

/* Writes an IDX header (type, ndim, dims) into buf; returns its length. */
static size_t mt_idx_header(uint8_t *buf, int type, int ndim, const uint32_t *dims) {
    int i;
    buf[0] = 0; buf[1] = 0; buf[2] = (uint8_t)type; buf[3] = (uint8_t)ndim;
    for (i = 0; i < ndim; i++) {
        buf[4 + 4 * i] = (uint8_t)(dims[i] >> 24); buf[5 + 4 * i] = (uint8_t)(dims[i] >> 16);
        buf[6 + 4 * i] = (uint8_t)(dims[i] >> 8); buf[7 + 4 * i] = (uint8_t)dims[i];
    }
    return 4 + 4 * (size_t)ndim;
}

static int mt_error_has(const char *needle) { return strstr(mgpu_last_error(), needle) != NULL; }

static void test_idx_parse_valid(void) {
    uint8_t buf[64];
    uint32_t dims[3] = {2, 3, 4};
    size_t h = mt_idx_header(buf, 0x08, 3, dims), i;
    mgpu_idx idx;
    for (i = 0; i < 24; i++) buf[h + i] = (uint8_t)(10 + i);
    MT_CHECK(mgpu_idx_parse(buf, h + 24, "mem", &idx) == MGPU_OK, "valid u8 3-d: %s", mgpu_last_error());
    MT_CHECK(idx.type_code == 0x08 && idx.ndim == 3, "type %d ndim %d", idx.type_code, idx.ndim);
    MT_CHECK(idx.dims[0] == 2 && idx.dims[1] == 3 && idx.dims[2] == 4, "dims");
    MT_CHECK(idx.data == buf + 16 && idx.data_bytes == 24 && idx.data[23] == 33, "data view");
    /* big-endian dims above 2^24, f32 elements, a zero dimension */
    {
        uint32_t big[1] = {0x01000002u}, two[1] = {2}, zero[2] = {0, 784};
        uint8_t *large = (uint8_t *)calloc(8 + 0x01000002u, 1);
        MT_CHECK(mgpu_idx_parse(large, mt_idx_header(large, 0x08, 1, big) + 0x01000002u, "big", &idx) == MGPU_OK && idx.dims[0] == 0x01000002,
                 "big-endian dim: %lld", (long long)idx.dims[0]);
        free(large);
        h = mt_idx_header(buf, 0x0D, 1, two);
        MT_CHECK(mgpu_idx_parse(buf, h + 8, "f32", &idx) == MGPU_OK && idx.data_bytes == 8, "f32 elements are 4 bytes");
        MT_CHECK(mgpu_idx_parse(buf, h + 4, "f32", &idx) == MGPU_ERR_FORMAT, "f32 with 4 data bytes is truncated");
        h = mt_idx_header(buf, 0x0E, 1, two);
        MT_CHECK(mgpu_idx_parse(buf, h + 16, "f64", &idx) == MGPU_OK, "f64 elements are 8 bytes");
        h = mt_idx_header(buf, 0x0B, 1, two);
        MT_CHECK(mgpu_idx_parse(buf, h + 4, "i16", &idx) == MGPU_OK, "i16 elements are 2 bytes");
        h = mt_idx_header(buf, 0x08, 2, zero);
        MT_CHECK(mgpu_idx_parse(buf, h, "empty", &idx) == MGPU_OK && idx.data_bytes == 0 && idx.dims[1] == 784, "zero dim");
    }
}

static void test_idx_parse_errors(void) {
    uint8_t buf[64];
    uint32_t dims[3] = {2, 3, 4}, huge[8] = {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu};
    size_t h = mt_idx_header(buf, 0x08, 3, dims);
    mgpu_idx idx;
    memset(buf + h, 7, sizeof buf - h);
    /* truncated data: names the label and both byte counts */
    MT_CHECK(mgpu_idx_parse(buf, h + 20, "imgs.idx", &idx) == MGPU_ERR_FORMAT, "truncated");
    MT_CHECK(mt_error_has("imgs.idx") && mt_error_has("24") && mt_error_has("20") && mt_error_has("truncated"), "message: %s", mgpu_last_error());
    /* trailing bytes */
    MT_CHECK(mgpu_idx_parse(buf, h + 25, "long.idx", &idx) == MGPU_ERR_FORMAT, "over-long");
    MT_CHECK(mt_error_has("long.idx") && mt_error_has("24") && mt_error_has("25"), "message: %s", mgpu_last_error());
    /* wrong magic */
    buf[0] = 1;
    MT_CHECK(mgpu_idx_parse(buf, h + 24, "magic.idx", &idx) == MGPU_ERR_FORMAT && mt_error_has("magic.idx") && mt_error_has("magic"),
             "wrong magic: %s", mgpu_last_error());
    buf[0] = 0; buf[2] = 0x07;
    MT_CHECK(mgpu_idx_parse(buf, h + 24, "type.idx", &idx) == MGPU_ERR_FORMAT && mt_error_has("0x07"), "unknown type: %s", mgpu_last_error());
    buf[2] = 0x08; buf[3] = 0;
    MT_CHECK(mgpu_idx_parse(buf, 4, "ndim0.idx", &idx) == MGPU_ERR_FORMAT && mt_error_has("ndim0.idx") && mt_error_has("0 dimensions"),
             "ndim 0: %s", mgpu_last_error());
    buf[3] = 9;
    MT_CHECK(mgpu_idx_parse(buf, 40, "ndim9", &idx) == MGPU_ERR_FORMAT, "ndim 9");
    buf[3] = 3;
    MT_CHECK(mgpu_idx_parse(buf, 10, "hdr.idx", &idx) == MGPU_ERR_FORMAT && mt_error_has("hdr.idx") && mt_error_has("header"),
             "truncated header: %s", mgpu_last_error());
    MT_CHECK(mgpu_idx_parse(buf, 3, "tiny", &idx) == MGPU_ERR_FORMAT && mt_error_has("tiny"), "3 bytes");
    MT_CHECK(mgpu_idx_parse(buf, 0, "empty", &idx) == MGPU_ERR_FORMAT, "0 bytes");
    /* 8 dims of 2^32-1 overflow any 64-bit count */
    h = mt_idx_header(buf, 0x0E, 8, huge);
    MT_CHECK(mgpu_idx_parse(buf, h, "huge.idx", &idx) == MGPU_ERR_FORMAT && mt_error_has("huge.idx") && mt_error_has("overflow"),
             "huge dims: %s", mgpu_last_error());
    h = mt_idx_header(buf, 0x08, 3, huge); /* (2^32-1)^3 bytes also overflows */
    MT_CHECK(mgpu_idx_parse(buf, h, "huge3", &idx) == MGPU_ERR_FORMAT, "huge 3-d");
    MT_CHECK(mgpu_idx_parse(buf, sizeof buf, "x", NULL) == MGPU_ERR_INVALID_ARG, "NULL out");
    MT_CHECK(mgpu_idx_parse(NULL, 10, "x", &idx) == MGPU_ERR_INVALID_ARG, "NULL bytes");
    MT_CHECK(mgpu_idx_parse(buf, 2, NULL, &idx) == MGPU_ERR_FORMAT && mt_error_has("IDX"), "NULL label gets a default");
}

/* ---- IDX files in a unique temp dir ---- */

static char mt_dir[256];

static int mt_write(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    int ok = f && fwrite(data, 1, len, f) == len;
    if (f) fclose(f);
    return ok;
}
static void mt_path(char *buf, size_t size, const char *name) { snprintf(buf, size, "%s/%s", mt_dir, name); }

/* n images of rows x cols (pixel = 37 * i + 5 * j mod 256) and labels i % 10 */
static void mt_write_idx_pair(const char *img_name, const char *lab_name, uint32_t n, uint32_t rows, uint32_t cols) {
    uint8_t *buf = (uint8_t *)malloc(16 + (size_t)n * rows * cols);
    uint32_t dims[3];
    size_t h, i, j, px = (size_t)rows * cols;
    char path[512];
    dims[0] = n; dims[1] = rows; dims[2] = cols;
    h = mt_idx_header(buf, 0x08, 3, dims);
    for (i = 0; i < n; i++)
        for (j = 0; j < px; j++) buf[h + i * px + j] = (uint8_t)((37 * i + 5 * j) % 256);
    mt_path(path, sizeof path, img_name);
    MT_CHECK(mt_write(path, buf, h + n * px), "write %s", path);
    h = mt_idx_header(buf, 0x08, 1, dims);
    for (i = 0; i < n; i++) buf[h + i] = (uint8_t)(i % 10);
    mt_path(path, sizeof path, lab_name);
    MT_CHECK(mt_write(path, buf, h + n), "write %s", path);
    free(buf);
}

static int mt_shell(const char *fmt, const char *a, const char *b) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd, fmt, a, b);
    return system(cmd);
}

/* Checks that ds holds the images written by mt_write_idx_pair. */
static void mt_check_idx_dataset(const mgpu_dataset *ds, int64_t n, int64_t rows, int64_t cols, const char *what) {
    float x[64];
    int64_t y = -1, i, j;
    int bad = 0;
    MT_CHECK(ds != NULL, "%s: open failed: %s", what, mgpu_last_error());
    if (!ds) return;
    MT_CHECK(ds->length == n && ds->x_dtype == MGPU_F32 && ds->x_ndim == 3 && ds->x_shape[0] == 1 && ds->x_shape[1] == rows &&
             ds->x_shape[2] == cols && ds->y_dtype == MGPU_I64 && ds->y_ndim == 0, "%s: header", what);
    for (i = 0; i < n; i++) {
        MT_CHECK(ds->get(ds, i, x, &y) == MGPU_OK, "%s: get %lld", what, (long long)i);
        if (y != i % 10) bad++;
        for (j = 0; j < rows * cols; j++)
            if (x[j] != (float)((37 * i + 5 * j) % 256) / 255.0f) bad++;
    }
    MT_CHECK(bad == 0, "%s: %d wrong values", what, bad);
    MT_CHECK(ds->get(ds, n, x, &y) == MGPU_ERR_INVALID_ARG, "%s: index n rejected", what);
}

static void test_idx_files(void) {
    char img[512], lab[512], img2[1024], lab2[1024];
    mgpu_dataset *ds;
    float x[12];
    int64_t y;
    mt_write_idx_pair("a-images", "a-labels", 5, 3, 4);
    mt_path(img, sizeof img, "a-images"); mt_path(lab, sizeof lab, "a-labels");
    ds = mgpu_dataset_idx_open(img, lab);
    mt_check_idx_dataset(ds, 5, 3, 4, "plain");
    if (ds) {   /* exact scaling: pixel 255 -> 1, 0 -> 0 (image 1: 37 + 5j hits neither; check one by hand) */
        ds->get(ds, 1, x, &y);
        MT_CHECK(x[0] == 37.0f / 255.0f && x[1] == 42.0f / 255.0f && y == 1, "x[0] %g y %lld", x[0], (long long)y);
    }
    mgpu_dataset_destroy(ds);
    /* gzip copies under .gz names open the same */
    MT_CHECK(mt_shell("gzip -c '%s' > '%s.gz'", img, img) == 0 && mt_shell("gzip -c '%s' > '%s.gz'", lab, lab) == 0, "gzip");
    snprintf(img2, sizeof img2, "%s.gz", img); snprintf(lab2, sizeof lab2, "%s.gz", lab);
    ds = mgpu_dataset_idx_open(img2, lab2);
    mt_check_idx_dataset(ds, 5, 3, 4, "gzip");
    mgpu_dataset_destroy(ds);
    /* plain path missing, path.gz present: the .gz is used */
    MT_CHECK(remove(img) == 0 && remove(lab) == 0, "remove plain files");
    ds = mgpu_dataset_idx_open(img, lab);
    mt_check_idx_dataset(ds, 5, 3, 4, "fallback to .gz");
    mgpu_dataset_destroy(ds);
    /* gzip content under a plain name is detected by its magic */
    mt_path(img2, sizeof img2, "b-images"); mt_path(lab2, sizeof lab2, "b-labels");
    MT_CHECK(mt_shell("cp '%s.gz' '%s'", img, img2) == 0 && mt_shell("cp '%s.gz' '%s'", lab, lab2) == 0, "cp");
    ds = mgpu_dataset_idx_open(img2, lab2);
    mt_check_idx_dataset(ds, 5, 3, 4, "gzip by magic");
    mgpu_dataset_destroy(ds);
}

static void test_idx_file_errors(void) {
    char img[512], lab[512], other[512], path[512];
    mt_write_idx_pair("c-images", "c-labels", 6, 2, 2);
    mt_write_idx_pair("d-images", "d-labels", 7, 2, 2);
    mt_path(img, sizeof img, "c-images"); mt_path(lab, sizeof lab, "d-labels");
    /* 6 images, 7 labels: both files named */
    MT_CHECK(mgpu_dataset_idx_open(img, lab) == NULL && mgpu_last_result() == MGPU_ERR_FORMAT, "count mismatch");
    MT_CHECK(mt_error_has(img) && mt_error_has(lab) && mt_error_has("6") && mt_error_has("7"), "message: %s", mgpu_last_error());
    /* missing file: names the path, what was expected, and `make data` */
    mt_path(other, sizeof other, "nope-images");
    MT_CHECK(mgpu_dataset_idx_open(other, lab) == NULL && mgpu_last_result() == MGPU_ERR_IO, "missing images");
    MT_CHECK(mt_error_has(other) && mt_error_has("images-idx3-ubyte(.gz)") && mt_error_has("make data"), "message: %s", mgpu_last_error());
    mt_path(other, sizeof other, "nope-labels");
    MT_CHECK(mgpu_dataset_idx_open(img, other) == NULL && mgpu_last_result() == MGPU_ERR_IO && mt_error_has(other) &&
             mt_error_has("labels-idx1-ubyte"), "missing labels: %s", mgpu_last_error());
    /* a labels file as images: wrong ndim */
    MT_CHECK(mgpu_dataset_idx_open(lab, lab) == NULL && mgpu_last_result() == MGPU_ERR_FORMAT && mt_error_has("3 dimensions"),
             "labels as images: %s", mgpu_last_error());
    /* corrupt gzip: IO error naming the file */
    mt_path(path, sizeof path, "broken.gz");
    MT_CHECK(mt_write(path, "\x1f\x8b\x08\x00garbage", 11), "write broken.gz");
    MT_CHECK(mgpu_dataset_idx_open(path, lab) == NULL && mgpu_last_result() == MGPU_ERR_IO && mt_error_has("broken.gz") && mt_error_has("gzip"),
             "corrupt gzip: %s", mgpu_last_error());
    /* truncated IDX file: format error naming it */
    mt_path(path, sizeof path, "short-images");
    MT_CHECK(mt_write(path, "\0\0\x08\x03\0\0\0\x02\0\0\0\x02\0\0\0\x02\x01\x02", 18), "write short");
    MT_CHECK(mgpu_dataset_idx_open(path, lab) == NULL && mgpu_last_result() == MGPU_ERR_FORMAT && mt_error_has("short-images") &&
             mt_error_has("truncated"), "truncated file: %s", mgpu_last_error());
    MT_CHECK(mgpu_dataset_idx_open(NULL, lab) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "NULL path");
    /* a path with a quote goes through the shell quoting intact */
    mt_path(path, sizeof path, "it's-images.gz");
    MT_CHECK(mt_shell("gzip -c \"%s\" > \"%s\"", img, path) == 0, "gzip quoted");
    mt_path(other, sizeof other, "c-labels");
    {
        mgpu_dataset *ds = mgpu_dataset_idx_open(path, other);
        MT_CHECK(ds && ds->length == 6, "quoted path: %s", mgpu_last_error());
        mgpu_dataset_destroy(ds);
    }
}

static void test_fashion_mnist_dir(void) {
    char sub[512];
    mgpu_dataset *ds;
    mt_path(sub, sizeof sub, "fm");
    MT_CHECK(mkdir(sub, 0700) == 0, "mkdir");
    mt_write_idx_pair("fm/train-images-idx3-ubyte", "fm/train-labels-idx1-ubyte", 8, 2, 3);
    ds = mgpu_dataset_fashion_mnist(sub, 1);
    mt_check_idx_dataset(ds, 8, 2, 3, "fashion_mnist(dir, train)");
    mgpu_dataset_destroy(ds);
    /* no t10k files: the message lists the directory and how to get the data */
    MT_CHECK(mgpu_dataset_fashion_mnist(sub, 0) == NULL && mgpu_last_result() == MGPU_ERR_IO, "test split missing");
    MT_CHECK(mt_error_has(sub) && mt_error_has("t10k-images-idx3-ubyte") && mt_error_has("make data"), "message: %s", mgpu_last_error());
    /* dir NULL: $MGPU_DATA first */
    setenv("MGPU_DATA", sub, 1);
    ds = mgpu_dataset_fashion_mnist(NULL, 1);
    MT_CHECK(ds && ds->length == 8, "$MGPU_DATA used: %s", mgpu_last_error());
    mgpu_dataset_destroy(ds);
    ds = mgpu_dataset_fashion_mnist("", 1);
    MT_CHECK(ds && ds->length == 8, "empty dir means default: %s", mgpu_last_error());
    mgpu_dataset_destroy(ds);
    unsetenv("MGPU_DATA");
}

/* ---- in-memory arrays ---- */

static void test_from_arrays(void) {
    int64_t xs[2] = {2, 2}, n = 3, i;
    float x[12], out[4];
    int32_t y[3] = {7, 8, 9}, yo = 0;
    mgpu_dataset *ds;
    for (i = 0; i < 12; i++) x[i] = (float)i * 0.5f;
    ds = mgpu_dataset_from_arrays(n, MGPU_F32, 2, xs, x, MGPU_I32, 0, NULL, y);
    MT_CHECK(ds != NULL, "create: %s", mgpu_last_error());
    if (!ds) return;
    x[4] = -1; y[1] = -1; /* copied: later changes do not show */
    MT_CHECK(ds->get(ds, 1, out, &yo) == MGPU_OK && out[0] == 2.0f && out[3] == 3.5f && yo == 8, "sample 1: %g %g %d", out[0], out[3], yo);
    MT_CHECK(ds->get(ds, -1, out, &yo) == MGPU_ERR_INVALID_ARG && mt_error_has("-1"), "negative index");
    MT_CHECK(ds->get(ds, 3, out, &yo) == MGPU_ERR_INVALID_ARG && mt_error_has("3"), "index n");
    MT_CHECK(ds->get(ds, 0, NULL, &yo) == MGPU_ERR_INVALID_ARG, "NULL x_out");
    mgpu_dataset_destroy(ds);
    MT_CHECK(mgpu_dataset_from_arrays(-1, MGPU_F32, 2, xs, x, MGPU_I32, 0, NULL, y) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "n < 0");
    MT_CHECK(mgpu_dataset_from_arrays(3, MGPU_F32, 2, xs, NULL, MGPU_I32, 0, NULL, y) == NULL && mt_error_has("x"), "NULL x");
    MT_CHECK(mgpu_dataset_from_arrays(3, MGPU_F32, 2, xs, x, MGPU_I32, 0, NULL, NULL) == NULL && mt_error_has("y"), "NULL y");
    MT_CHECK(mgpu_dataset_from_arrays(3, (mgpu_dtype)9, 2, xs, x, MGPU_I32, 0, NULL, y) == NULL, "bad dtype");
    MT_CHECK(mgpu_dataset_from_arrays(3, MGPU_F32, 9, xs, x, MGPU_I32, 0, NULL, y) == NULL, "ndim 9");
    ds = mgpu_dataset_from_arrays(0, MGPU_F32, 2, xs, NULL, MGPU_I32, 0, NULL, NULL);
    MT_CHECK(ds && ds->length == 0, "empty dataset");
    mgpu_dataset_destroy(ds);
    mgpu_dataset_destroy(NULL);
}

/* ---- sampler ---- */

static int mt_indices_eq(int64_t n, int rank, int world, int drop_last, const int64_t *want, int64_t count) {
    int64_t got[16], c = mgpu_sampler_indices(n, rank, world, 0, 0, 0, drop_last, got), i;
    if (c != count) { fprintf(stderr, "  n=%lld rank %d world %d: count %lld, want %lld\n", (long long)n, rank, world, (long long)c, (long long)count); return 0; }
    for (i = 0; i < c; i++)
        if (got[i] != want[i]) { fprintf(stderr, "  n=%lld rank %d world %d: [%lld] = %lld, want %lld\n", (long long)n, rank, world, (long long)i, (long long)got[i], (long long)want[i]); return 0; }
    return 1;
}

static void test_sampler_sharding(void) {
    static const int64_t r0[] = {0, 3, 6, 9}, r1[] = {1, 4, 7, 0}, r2[] = {2, 5, 8, 1};
    static const int64_t d0[] = {0, 3, 6}, d1[] = {1, 4, 7}, d2[] = {2, 5, 8};
    static const int64_t z[] = {0}, o[] = {1}, ar[] = {0, 1, 2, 3, 4};
    /* n=10, world 3: padded to 12 by wrapping to the start */
    MT_CHECK(mt_indices_eq(10, 0, 3, 0, r0, 4) && mt_indices_eq(10, 1, 3, 0, r1, 4) && mt_indices_eq(10, 2, 3, 0, r2, 4), "n=10 world=3");
    /* drop_last: truncated to 9 */
    MT_CHECK(mt_indices_eq(10, 0, 3, 1, d0, 3) && mt_indices_eq(10, 1, 3, 1, d1, 3) && mt_indices_eq(10, 2, 3, 1, d2, 3), "drop_last");
    /* n=2, world 4: [0, 1, 0, 1] */
    MT_CHECK(mt_indices_eq(2, 0, 4, 0, z, 1) && mt_indices_eq(2, 1, 4, 0, o, 1) && mt_indices_eq(2, 2, 4, 0, z, 1) && mt_indices_eq(2, 3, 4, 0, o, 1),
             "n=2 world=4 wraps");
    /* n=2, world 5: padding 3 > n repeats whole copies: [0, 1, 0, 1, 0] */
    MT_CHECK(mt_indices_eq(2, 4, 5, 0, z, 1) && mt_indices_eq(2, 3, 5, 0, o, 1), "n=2 world=5");
    /* n=2, world 4, drop_last: floor(2/4) = 0 samples */
    MT_CHECK(mgpu_sampler_indices(2, 1, 4, 0, 0, 0, 1, NULL) == 0, "drop_last leaves none");
    /* divisible n: drop_last changes nothing */
    MT_CHECK(mgpu_sampler_indices(12, 0, 3, 0, 0, 0, 1, NULL) == 4 && mgpu_sampler_indices(12, 0, 3, 0, 0, 0, 0, NULL) == 4, "divisible");
    /* world <= 1: no sharding */
    MT_CHECK(mt_indices_eq(5, 0, 1, 0, ar, 5) && mt_indices_eq(5, 0, 0, 1, ar, 5), "world 1 and 0");
    MT_CHECK(mgpu_sampler_indices(0, 0, 3, 0, 0, 0, 0, NULL) == 0, "n=0");
    MT_CHECK(mgpu_sampler_indices(10, 3, 3, 0, 0, 0, 0, NULL) == -1 && mgpu_last_result() == MGPU_ERR_INVALID_ARG && mt_error_has("rank 3"), "rank == world");
    MT_CHECK(mgpu_sampler_indices(10, -1, 3, 0, 0, 0, 0, NULL) == -1 && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "rank < 0");
    MT_CHECK(mgpu_sampler_indices(10, 1, 1, 0, 0, 0, 0, NULL) == -1, "rank 1 without sharding");
    MT_CHECK(mgpu_sampler_indices(-1, 0, 1, 0, 0, 0, 0, NULL) == -1 && mt_error_has("n"), "n < 0");
}

static void test_sampler_shuffle(void) {
    enum { N = 103, W = 4 };
    int64_t perm[N], other[N], shard[W][26], seen[N];
    int r, i, ok_perm = 1, same = 1, cover = 1, wraps = 1;
    int64_t c = mgpu_sampler_indices(N, 0, 1, 1, 42, 3, 0, perm);
    MT_CHECK(c == N, "count");
    memset(seen, 0, sizeof seen);
    for (i = 0; i < N; i++) { if (perm[i] < 0 || perm[i] >= N || seen[perm[i]]++) ok_perm = 0; }
    MT_CHECK(ok_perm, "a permutation");
    /* same seed + epoch: same order (also seed 43, epoch 2: the stream is seed + epoch, as torch) */
    mgpu_sampler_indices(N, 0, 1, 1, 42, 3, 0, other);
    for (i = 0; i < N; i++) if (other[i] != perm[i]) same = 0;
    mgpu_sampler_indices(N, 0, 1, 1, 43, 2, 0, other);
    for (i = 0; i < N; i++) if (other[i] != perm[i]) same = 0;
    MT_CHECK(same, "deterministic in seed + epoch");
    mgpu_sampler_indices(N, 0, 1, 1, 42, 4, 0, other);
    for (i = 0, same = 1; i < N; i++) if (other[i] != perm[i]) same = 0;
    MT_CHECK(!same, "another epoch, another order");
    for (i = 0, same = 1; i < N; i++) if (perm[i] != i) same = 0;
    MT_CHECK(!same, "shuffled");
    /* ranks: rank r holds perm[(r + k W) % N]; together they cover every index, one (perm[0]) twice */
    memset(seen, 0, sizeof seen);
    for (r = 0; r < W; r++) {
        MT_CHECK(mgpu_sampler_indices(N, r, W, 1, 42, 3, 0, shard[r]) == 26, "rank %d count", r);
        for (i = 0; i < 26; i++) {
            seen[shard[r][i]]++;
            if (shard[r][i] != perm[(r + i * W) % N]) wraps = 0;
        }
    }
    for (i = 0; i < N; i++) if (seen[i] < 1) cover = 0;
    MT_CHECK(cover && seen[perm[0]] == 2, "union covers all; padding repeats perm[0]");
    MT_CHECK(wraps, "rank r takes perm[r::world] of the wrapped list");
}

/* ---- loader ---- */

enum { LN = 1000, LB = 64, LXD = 3 };
/* x = (i, i + 0.5, -i), y = i */
static mgpu_dataset *mt_counting_dataset(int64_t n) {
    float *x = (float *)malloc(sizeof(float) * LXD * (size_t)n);
    int64_t *y = (int64_t *)malloc(sizeof(int64_t) * (size_t)n), xs[1] = {LXD}, i;
    mgpu_dataset *ds;
    for (i = 0; i < n; i++) { x[LXD * i] = (float)i; x[LXD * i + 1] = (float)i + 0.5f; x[LXD * i + 2] = -(float)i; y[i] = i; }
    ds = mgpu_dataset_from_arrays(n, MGPU_F32, 1, xs, x, MGPU_I64, 0, NULL, y);
    free(x); free(y);
    return ds;
}

static mgpu_loader_desc mt_desc(int workers) {
    mgpu_loader_desc d;
    memset(&d, 0, sizeof d);
    d.batch_size = LB; d.shuffle = 1; d.seed = 11; d.num_workers = workers;
    return d;
}

/* All batches of epochs first_epoch, first_epoch + 1, ... (the first from start_batch) as bytes,
   x then y per batch; returns the byte count. */
static size_t mt_collect(mgpu_loader *l, int first_epoch, int epochs, int64_t start_batch, uint8_t *out, size_t cap) {
    size_t pos = 0;
    int e;
    for (e = 0; e < epochs; e++) {
        mgpu_batch b;
        int64_t expect = e == 0 ? start_batch : 0;
        MT_CHECK(mgpu_loader_set_epoch(l, first_epoch + e, expect) == MGPU_OK, "set_epoch: %s", mgpu_last_error());
        while (mgpu_loader_next(l, &b) == MGPU_OK && b.size > 0) {
            size_t nx = mgpu_tensor_nbytes(b.x), ny = mgpu_tensor_nbytes(b.y);
            MT_CHECK(b.index == expect, "batch index %lld, want %lld", (long long)b.index, (long long)expect);
            MT_CHECK(b.x->shape[0] == b.size && b.y->shape[0] == b.size && b.y->ndim == 1 && b.x->ndim == 2, "batch shapes");
            expect++;
            if (pos + nx + ny > cap) { MT_CHECK(0, "collect buffer too small"); return pos; }
            memcpy(out + pos, b.x->data, nx); pos += nx;
            memcpy(out + pos, b.y->data, ny); pos += ny;
        }
        MT_CHECK(b.size == 0 && mgpu_last_result() == MGPU_OK, "epoch ends with size 0: %s", mgpu_last_error());
    }
    return pos;
}

static void test_loader_workers_identical(void) {
    mgpu_dataset *ds = mt_counting_dataset(LN);
    size_t cap = 2 * LN * (LXD * 4 + 8) + 64, len[3] = {0, 0, 0};
    uint8_t *bytes[3];
    int workers[3] = {0, 1, 4}, w;
    for (w = 0; w < 3; w++) {
        mgpu_loader_desc d = mt_desc(workers[w]);
        mgpu_loader *l = mgpu_loader_create(ds, &d);
        bytes[w] = (uint8_t *)calloc(cap, 1);
        MT_CHECK(l != NULL, "create: %s", mgpu_last_error());
        if (l) len[w] = mt_collect(l, 0, 2, 0, bytes[w], cap);
        mgpu_loader_destroy(l);
    }
    MT_CHECK(len[0] == (size_t)2 * LN * (LXD * 4 + 8), "two epochs of bytes: %zu", len[0]);
    MT_CHECK(len[1] == len[0] && memcmp(bytes[0], bytes[1], len[0]) == 0, "1 worker == 0 workers");
    MT_CHECK(len[2] == len[0] && memcmp(bytes[0], bytes[2], len[0]) == 0, "4 workers == 0 workers");
    /* and the content is the sampler's order: batch k of epoch 0 holds perm[64k ...] */
    {
        int64_t perm[LN], i;
        const uint8_t *p = bytes[0];
        int bad = 0;
        mgpu_sampler_indices(LN, 0, 1, 1, 11, 0, 0, perm);
        for (i = 0; i < LN; i += LB) {
            int64_t size = LN - i < LB ? LN - i : LB, j;
            const float *x = (const float *)p;
            const int64_t *y = (const int64_t *)(p + size * LXD * 4);
            for (j = 0; j < size; j++) {
                if (y[j] != perm[i + j]) bad++;
                if (x[LXD * j] != (float)perm[i + j] || x[LXD * j + 2] != -(float)perm[i + j]) bad++;
            }
            p += size * (LXD * 4 + 8);
        }
        MT_CHECK(bad == 0, "%d samples out of the sampler's order", bad);
    }
    for (w = 0; w < 3; w++) free(bytes[w]);
    mgpu_dataset_destroy(ds);
}

static void test_loader_batches(void) {
    mgpu_dataset *ds = mt_counting_dataset(LN);
    mgpu_context *ctx = mt_cpu_context(1);
    mgpu_loader_desc d = mt_desc(2);
    mgpu_loader *l;
    mgpu_batch b;
    int64_t count = 0, last = -1, total = 0;
    d.shuffle = 0; d.ctx = ctx;
    l = mgpu_loader_create(ds, &d);
    MT_CHECK(l && mgpu_loader_num_batches(l) == 16, "1000 / 64 -> 16 batches");
    while (l && mgpu_loader_next(l, &b) == MGPU_OK && b.size > 0) {
        count++; last = b.size; total += b.size;
        MT_CHECK(b.x->ctx == ctx, "tensors on the given context");
        MT_CHECK(((int64_t *)b.y->data)[0] == b.index * LB, "unshuffled order");
    }
    MT_CHECK(count == 16 && last == LN - 15 * LB && total == LN, "count %lld last %lld", (long long)count, (long long)last);
    MT_CHECK(b.x == NULL && b.index == 16, "end of epoch");
    MT_CHECK(mgpu_loader_next(l, &b) == MGPU_OK && b.size == 0 && mgpu_loader_next(l, &b) == MGPU_OK && b.size == 0, "size 0 keeps coming");
    mgpu_loader_destroy(l);
    /* DataLoader drop_last drops the short batch */
    d.drop_last = 1;
    l = mgpu_loader_create(ds, &d);
    for (count = 0; l && mgpu_loader_next(l, &b) == MGPU_OK && b.size > 0; count++) MT_CHECK(b.size == LB, "full batches only");
    MT_CHECK(count == 15 && mgpu_loader_num_batches(l) == 15, "drop_last: %lld batches", (long long)count);
    MT_CHECK(mgpu_loader_set_epoch(l, 0, 16) == MGPU_ERR_INVALID_ARG && mt_error_has("start_batch"), "start_batch past the end");
    MT_CHECK(mgpu_loader_set_epoch(l, 0, 15) == MGPU_OK && mgpu_loader_next(l, &b) == MGPU_OK && b.size == 0, "start at the end");
    MT_CHECK(mgpu_loader_set_epoch(l, -1, 0) == MGPU_ERR_INVALID_ARG, "negative epoch");
    mgpu_loader_destroy(l);
    /* an empty dataset: no batches, size 0 at once */
    {
        mgpu_dataset *empty = mt_counting_dataset(0);
        d = mt_desc(2);
        l = mgpu_loader_create(empty, &d);
        MT_CHECK(l && mgpu_loader_num_batches(l) == 0 && mgpu_loader_next(l, &b) == MGPU_OK && b.size == 0, "empty dataset");
        mgpu_loader_destroy(l);
        mgpu_dataset_destroy(empty);
    }
    /* argument checks */
    d = mt_desc(0);
    d.batch_size = 0;
    MT_CHECK(mgpu_loader_create(ds, &d) == NULL && mt_error_has("batch_size"), "batch_size 0");
    d = mt_desc(0); d.world_size = 2; d.rank = 2;
    MT_CHECK(mgpu_loader_create(ds, &d) == NULL && mt_error_has("rank"), "rank >= world");
    d = mt_desc(-1);
    MT_CHECK(mgpu_loader_create(ds, &d) == NULL && mt_error_has("num_workers"), "negative workers");
    MT_CHECK(mgpu_loader_create(NULL, &d) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "NULL dataset");
    MT_CHECK(mgpu_loader_next(NULL, &b) == MGPU_ERR_INVALID_ARG && mgpu_loader_num_batches(NULL) == -1, "NULL loader");
    mgpu_loader_destroy(NULL);
    mgpu_context_destroy(ctx);
    mgpu_dataset_destroy(ds);
}

/* Resuming at batch 5 of epoch 1 yields exactly the tail of a full epoch 1. */
static void test_loader_resume(void) {
    mgpu_dataset *ds = mt_counting_dataset(LN);
    size_t cap = LN * (LXD * 4 + 8), full_len, tail_len, skip = (size_t)5 * LB * (LXD * 4 + 8);
    uint8_t *full = (uint8_t *)calloc(cap, 1), *tail = (uint8_t *)calloc(cap, 1), *first = (uint8_t *)calloc(cap, 1);
    mgpu_loader_desc d = mt_desc(3);
    mgpu_loader *l = mgpu_loader_create(ds, &d);
    mgpu_batch b;
    int i;
    MT_CHECK(l != NULL, "create");
    if (!l) return;
    MT_CHECK(mgpu_loader_set_epoch(l, 1, 0) == MGPU_OK, "epoch 1");
    full_len = 0;
    while (mgpu_loader_next(l, &b) == MGPU_OK && b.size > 0) {
        memcpy(full + full_len, b.x->data, mgpu_tensor_nbytes(b.x)); full_len += mgpu_tensor_nbytes(b.x);
        memcpy(full + full_len, b.y->data, mgpu_tensor_nbytes(b.y)); full_len += mgpu_tensor_nbytes(b.y);
    }
    /* a few batches of another epoch first, so workers are busy when we jump (cancel + drain) */
    MT_CHECK(mgpu_loader_set_epoch(l, 7, 0) == MGPU_OK, "epoch 7");
    for (i = 0; i < 3; i++) MT_CHECK(mgpu_loader_next(l, &b) == MGPU_OK && b.size == LB, "epoch 7 batch %d", i);
    memcpy(first, b.y->data, mgpu_tensor_nbytes(b.y));
    tail_len = mt_collect(l, 1, 1, 5, tail, cap); /* set_epoch(1, 5) */
    MT_CHECK(full_len == (size_t)LN * (LXD * 4 + 8) && tail_len == full_len - skip, "lengths %zu %zu", full_len, tail_len);
    MT_CHECK(tail_len && memcmp(full + skip, tail, tail_len) == 0, "resume == tail of the full epoch");
    MT_CHECK(memcmp(first, full, LB * 8) != 0, "epoch 7 differs from epoch 1");
    mgpu_loader_destroy(l);
    /* destroy mid-epoch with workers and prefetched batches outstanding */
    l = mgpu_loader_create(ds, &d);
    MT_CHECK(l && mgpu_loader_next(l, &b) == MGPU_OK && b.size == LB, "one batch");
    mgpu_loader_destroy(l);
    free(full); free(tail); free(first);
    mgpu_dataset_destroy(ds);
}

static void test_loader_sharding(void) {
    int64_t n_values[2] = {LN, LN + 1};
    int t;
    for (t = 0; t < 2; t++) {
        int64_t n = n_values[t], *seen = (int64_t *)calloc((size_t)n, sizeof(int64_t)), total = 0, i;
        mgpu_dataset *ds = mt_counting_dataset(n);
        int r, cover = 1;
        for (r = 0; r < 2; r++) {
            mgpu_loader_desc d = mt_desc(r == 0 ? 0 : 2);
            mgpu_loader *l;
            mgpu_batch b;
            d.world_size = 2; d.rank = r;
            l = mgpu_loader_create(ds, &d);
            MT_CHECK(l && mgpu_loader_num_batches(l) == (n / 2 + n % 2 + LB - 1) / LB, "rank %d batches", r);
            mgpu_loader_set_epoch(l, 3, 0);
            while (l && mgpu_loader_next(l, &b) == MGPU_OK && b.size > 0)
                for (i = 0; i < b.size; i++) { seen[((int64_t *)b.y->data)[i]]++; total++; }
            mgpu_loader_destroy(l);
        }
        for (i = 0; i < n; i++) if (seen[i] < 1) cover = 0;
        MT_CHECK(cover, "n=%lld: two ranks cover the data", (long long)n);
        MT_CHECK(total == n + n % 2, "n=%lld: %lld samples, want %lld (padding)", (long long)n, (long long)total, (long long)(n + n % 2));
        free(seen);
        mgpu_dataset_destroy(ds);
    }
}

/* A dataset whose sample 123 fails with the inner dataset's message. */
static mgpu_result mt_failing_get(const mgpu_dataset *ds, int64_t index, void *x_out, void *y_out) {
    const mgpu_dataset *inner = (const mgpu_dataset *)ds->impl;
    return inner->get(inner, index == 123 ? 99999 : index, x_out, y_out);
}
static void test_loader_errors(void) {
    mgpu_dataset *inner = mt_counting_dataset(LN), failing;
    int workers[2] = {0, 4}, w;
    failing = *inner;
    failing.get = mt_failing_get;
    failing.destroy = NULL;
    failing.impl = inner;
    for (w = 0; w < 2; w++) {
        mgpu_loader_desc d = mt_desc(workers[w]);
        mgpu_loader *l;
        mgpu_batch b;
        mgpu_result r = MGPU_OK;
        int64_t good = 0;
        d.shuffle = 0;
        l = mgpu_loader_create(&failing, &d);
        while (l && (r = mgpu_loader_next(l, &b)) == MGPU_OK && b.size > 0) good++;
        MT_CHECK(good == 1 && r == MGPU_ERR_INVALID_ARG, "%d workers: error at batch 1 (123 / 64), got %lld batches, r %d", workers[w], (long long)good, r);
        MT_CHECK(mt_error_has("99999") && mt_error_has("sample 123"), "dataset message passed on: %s", mgpu_last_error());
        mgpu_clear_error();
        MT_CHECK(mgpu_loader_next(l, &b) == MGPU_ERR_INVALID_ARG && mt_error_has("99999"), "error repeats");
        MT_CHECK(mgpu_loader_set_epoch(l, 0, 2) == MGPU_OK && mgpu_loader_next(l, &b) == MGPU_OK && b.size == LB && b.index == 2,
                 "set_epoch past the bad batch recovers: %s", mgpu_last_error());
        mgpu_loader_destroy(l);
    }
    mgpu_dataset_destroy(inner);
}

/* data_on_device on a CPU context: AUTO streams (the samples are in host memory already), ON is an
   error naming the flag, a value outside the enum is refused; the array dataset says it is static. */
static void test_loader_data_on_device_cpu(void) {
    mgpu_dataset *ds = mt_counting_dataset(LN);
    mgpu_loader_desc d = mt_desc(0);
    mgpu_loader *l;
    MT_CHECK(ds->static_samples == 1, "an array dataset has static samples");
    d.data_on_device = MGPU_DATA_ON_DEVICE_AUTO;
    l = mgpu_loader_create(ds, &d);
    MT_CHECK(l != NULL && mgpu_loader_data_on_device(l) == 0, "AUTO on the CPU streams: %s", mgpu_last_error());
    mgpu_loader_destroy(l);
    d.data_on_device = MGPU_DATA_ON_DEVICE_ON;
    MT_CHECK(mgpu_loader_create(ds, &d) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG && mt_error_has("--data-on-device on") &&
             mt_error_has("CPU"), "ON on the CPU: %s", mgpu_last_error());
    d.data_on_device = (mgpu_data_on_device)7;
    MT_CHECK(mgpu_loader_create(ds, &d) == NULL && mt_error_has("data_on_device is 7"), "bad value: %s", mgpu_last_error());
    MT_CHECK(mgpu_loader_data_on_device(NULL) == -1, "NULL loader");
    mgpu_dataset_destroy(ds);
}

/* ---- real Fashion-MNIST, when installed ---- */

/* Opens both splits from dir: sizes, shapes, labels < 10, pixels in [0, 1], balanced classes. */
static void mt_fashion_mnist_check(const char *dir) {
    int i, t;
    for (t = 0; t < 2; t++) {
        double t0;
        mgpu_dataset *ds;
        int64_t per_class[10], n = t == 0 ? 60000 : 10000, y, bad = 0;
        float x[784], maxv = 0;
        if (mt_quick() && t == 0) continue; /* sanitizers: the test split is enough */
        t0 = mgpu_time_s();
        ds = mgpu_dataset_fashion_mnist(dir, t == 0);
        MT_CHECK(ds != NULL, "open %s: %s", dir, mgpu_last_error());
        if (!ds) continue;
        printf("  note: %s %s opened in %.2f s\n", dir, t == 0 ? "train" : "t10k", mgpu_time_s() - t0);
        MT_CHECK(ds->length == n && ds->x_shape[0] == 1 && ds->x_shape[1] == 28 && ds->x_shape[2] == 28, "length %lld", (long long)ds->length);
        memset(per_class, 0, sizeof per_class);
        for (i = 0; i < n; i++) {
            int j;
            if (ds->get(ds, i, x, &y) != MGPU_OK || y < 0 || y >= 10) { bad++; continue; }
            per_class[y]++;
            if (i < 100) for (j = 0; j < 784; j++) { if (x[j] < 0 || x[j] > 1) bad++; if (x[j] > maxv) maxv = x[j]; }
        }
        MT_CHECK(bad == 0 && maxv == 1.0f, "labels < 10, pixels in [0, 1] (max %g)", maxv);
        for (i = 0; i < 10; i++) MT_CHECK(per_class[i] == n / 10, "class %d has %lld samples (Fashion-MNIST is balanced)", i, (long long)per_class[i]);
        mgpu_dataset_destroy(ds);
    }
}

static void test_fashion_mnist_real(void) {
    const char *dirs[2] = {"data/fashion-mnist", "/usr/share/datasets/fashion-mnist"};
    char probe[256], gz[512];
    int d, found = 0;
    for (d = 0; d < 2; d++) {   /* both when present: data/ holds plain files, Debian's are .gz */
        snprintf(probe, sizeof probe, "%s/t10k-labels-idx1-ubyte", dirs[d]);
        snprintf(gz, sizeof gz, "%s.gz", probe);
        if (access(probe, R_OK) != 0 && access(gz, R_OK) != 0) continue;
        found = 1;
        mt_fashion_mnist_check(dirs[d]);
    }
    if (!found) MT_SKIP("Fashion-MNIST not found in data/fashion-mnist or /usr/share/datasets/fashion-mnist (sh tools/deps.sh test, or make data)");
}

/* ---- tools/setup_data.sh, with its source faked ---- */

static void test_setup_script(void) {
    static const char *names[4] = {"train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"};
    char cmd[4096], src[512], dest[512], out[512], path[1024];
    int i, rc;
    FILE *f;
    long size;
    if (access("tools/setup_data.sh", R_OK) != 0) { MT_SKIP("tools/setup_data.sh not in the working directory"); return; }
    mt_path(src, sizeof src, "setup-src"); mt_path(dest, sizeof dest, "setup-dest"); mt_path(out, sizeof out, "setup.out");
    /* not root and no package: prints the install command and fails */
    snprintf(cmd, sizeof cmd, "MGPU_SETUP_SRC='%s' MGPU_SETUP_DEST='%s' MGPU_SETUP_UID=1000 bash tools/setup_data.sh > '%s' 2>&1", src, dest, out);
    rc = system(cmd);
    MT_CHECK(WIFEXITED(rc) && WEXITSTATUS(rc) == 1, "missing package: exit 1 (rc %d)", rc);
    snprintf(cmd, sizeof cmd, "grep -q 'sudo apt-get install dataset-fashion-mnist libstb-dev' '%s'", out);
    MT_CHECK(system(cmd) == 0, "prints the install command");
    MT_CHECK(access(dest, F_OK) != 0, "nothing written");
    /* a fake package (tiny gzip IDX files): decompressed into dest */
    MT_CHECK(mkdir(src, 0700) == 0, "mkdir src");
    for (i = 0; i < 4; i++) {
        uint32_t dims[3] = {2, 2, 2};
        uint8_t buf[32];
        size_t h = mt_idx_header(buf, 0x08, i % 2 ? 1 : 3, dims);
        memset(buf + h, i, 8);
        snprintf(path, sizeof path, "%s/%s", src, names[i]);
        MT_CHECK(mt_write(path, buf, h + (i % 2 ? 2 : 8)), "write");
        MT_CHECK(mt_shell("gzip '%s'%s", path, "") == 0, "gzip");
    }
    snprintf(cmd, sizeof cmd, "MGPU_SETUP_SRC='%s' MGPU_SETUP_DEST='%s' MGPU_SETUP_UID=1000 bash tools/setup_data.sh > '%s' 2>&1", src, dest, out);
    MT_CHECK(system(cmd) == 0, "fake install works");
    for (i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/%s", dest, names[i]);
        f = fopen(path, "rb");
        size = -1;
        if (f) { fseek(f, 0, SEEK_END); size = ftell(f); fclose(f); }
        MT_CHECK(size == (i % 2 ? 10 : 24), "%s decompressed: %ld bytes", names[i], size);
    }
    {
        mgpu_dataset *ds = mgpu_dataset_fashion_mnist(dest, 0);
        MT_CHECK(ds && ds->length == 2, "the written files open: %s", mgpu_last_error());
        mgpu_dataset_destroy(ds);
    }
    /* idempotent and quiet */
    MT_CHECK(system(cmd) == 0, "second run");
    f = fopen(out, "rb");
    size = -1;
    if (f) { fseek(f, 0, SEEK_END); size = ftell(f); fclose(f); }
    MT_CHECK(size == 0, "second run prints nothing (%ld bytes)", size);
}

int main(void) {
    snprintf(mt_dir, sizeof mt_dir, "/tmp/mgpu_test_data_XXXXXX");
    if (!mkdtemp(mt_dir)) { perror("mkdtemp"); return 1; }
    MT_RUN(test_idx_parse_valid);
    MT_RUN(test_idx_parse_errors);
    MT_RUN(test_idx_files);
    MT_RUN(test_idx_file_errors);
    MT_RUN(test_fashion_mnist_dir);
    MT_RUN(test_from_arrays);
    MT_RUN(test_sampler_sharding);
    MT_RUN(test_sampler_shuffle);
    MT_RUN(test_loader_workers_identical);
    MT_RUN(test_loader_batches);
    MT_RUN(test_loader_resume);
    MT_RUN(test_loader_sharding);
    MT_RUN(test_loader_errors);
    MT_RUN(test_loader_data_on_device_cpu);
    MT_RUN(test_fashion_mnist_real);
    MT_RUN(test_setup_script);
    mt_shell("rm -rf '%s'%s", mt_dir, "");
    return MT_END();
}
