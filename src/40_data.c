/* ======================================================================================
   Data
   ====================================================================================== */

/* --------------------------------------------------------------------------------------
   Datasets held in memory. Both the array dataset and the IDX dataset keep one block per
   side (x, y) and differ only in how get() turns a stored sample into the output layout.
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__mem_dataset {
    void *x_block, *y_block;     /* owned allocations (for IDX: the whole file contents) */
    const uint8_t *x, *y;        /* sample 0 inside the blocks */
    size_t x_stride, y_stride;   /* stored bytes per sample */
} mgpu__mem_dataset;

MGPU_API void mgpu_dataset_destroy(mgpu_dataset *ds) {
    if (ds && ds->destroy) ds->destroy(ds);
}

static void mgpu__mem_dataset_destroy(mgpu_dataset *ds) {
    mgpu__mem_dataset *m = (mgpu__mem_dataset *)ds->impl;
    if (m) { mgpu_free(m->x_block); mgpu_free(m->y_block); mgpu_free(m); }
    mgpu_free(ds);
}

/* Shared argument check of the in-memory get() functions. */
static mgpu_result mgpu__mem_dataset_check(const mgpu_dataset *ds, int64_t index, const void *x_out, const void *y_out) {
    if (!ds || !x_out || !y_out) return mgpu__fail(MGPU_ERR_INVALID_ARG, "dataset get: ds, x_out and y_out must not be NULL");
    if (index < 0 || index >= ds->length)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "dataset get: index %lld outside [0, %lld)", (long long)index, (long long)ds->length);
    return MGPU_OK;
}

static mgpu_result mgpu__array_dataset_get(const mgpu_dataset *ds, int64_t index, void *x_out, void *y_out) {
    const mgpu__mem_dataset *m;
    mgpu_result r = mgpu__mem_dataset_check(ds, index, x_out, y_out);
    if (r != MGPU_OK) return r;
    m = (const mgpu__mem_dataset *)ds->impl;
    memcpy(x_out, m->x + (size_t)index * m->x_stride, m->x_stride);
    memcpy(y_out, m->y + (size_t)index * m->y_stride, m->y_stride);
    return MGPU_OK;
}

/* IDX images are kept as u8; a sample becomes F32 in [0, 1] (as torchvision's ToTensor: x / 255)
   and its label an I64. */
static mgpu_result mgpu__idx_dataset_get(const mgpu_dataset *ds, int64_t index, void *x_out, void *y_out) {
    const mgpu__mem_dataset *m;
    const uint8_t *px;
    float *dst = (float *)x_out;
    size_t i;
    mgpu_result r = mgpu__mem_dataset_check(ds, index, x_out, y_out);
    if (r != MGPU_OK) return r;
    m = (const mgpu__mem_dataset *)ds->impl;
    px = m->x + (size_t)index * m->x_stride;
    for (i = 0; i < m->x_stride; i++) dst[i] = (float)px[i] / 255.0f;
    *(int64_t *)y_out = (int64_t)m->y[index];
    return MGPU_OK;
}

/* Per-sample element count of a shape, or -1 with an error naming fn and which side. */
static int64_t mgpu__sample_numel(const char *fn, const char *side, int ndim, const int64_t *shape) {
    char what[96];
    snprintf(what, sizeof what, "%s: %s", fn, side);
    return mgpu__shape_numel(ndim, shape, what);
}

/* A dataset header with an (empty) mgpu__mem_dataset behind it. */
static mgpu_dataset *mgpu__mem_dataset_new(const char *fn, int64_t n, mgpu_dtype x_dtype, int x_ndim, const int64_t *x_shape,
                                           mgpu_dtype y_dtype, int y_ndim, const int64_t *y_shape) {
    mgpu_dataset *ds;
    mgpu__mem_dataset *m;
    if (n < 0) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: n is %lld, must be >= 0", fn, (long long)n);
    if (!mgpu__dtype_valid(x_dtype) || !mgpu__dtype_valid(y_dtype))
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: x_dtype %d or y_dtype %d is not a valid mgpu_dtype", fn, (int)x_dtype, (int)y_dtype);
    if (mgpu__sample_numel(fn, "x_shape", x_ndim, x_shape) < 0 || mgpu__sample_numel(fn, "y_shape", y_ndim, y_shape) < 0) return NULL;
    ds = (mgpu_dataset *)mgpu__calloc(sizeof *ds, "a dataset");
    m = (mgpu__mem_dataset *)mgpu__calloc(sizeof *m, "a dataset");
    if (!ds || !m) { mgpu_free(ds); mgpu_free(m); return NULL; }
    ds->length = n;
    ds->x_dtype = x_dtype; ds->x_ndim = x_ndim;
    if (x_ndim) memcpy(ds->x_shape, x_shape, sizeof(int64_t) * (size_t)x_ndim);
    ds->y_dtype = y_dtype; ds->y_ndim = y_ndim;
    if (y_ndim) memcpy(ds->y_shape, y_shape, sizeof(int64_t) * (size_t)y_ndim);
    ds->destroy = mgpu__mem_dataset_destroy;
    ds->impl = m;
    ds->static_samples = 1;   /* get() decodes stored bytes: the same sample every time */
    return ds;
}

/* Bytes of n samples of numel elements of size esize, or 0 with *ok = 0 on overflow. */
static size_t mgpu__bytes_of(int64_t n, int64_t numel, size_t esize, int *ok) {
    uint64_t per = (uint64_t)numel * esize; /* a validated shape keeps this far below 2^63 */
    *ok = 1;
    if (per && (uint64_t)n > (uint64_t)SIZE_MAX / per) { *ok = 0; return 0; }
    return (size_t)((uint64_t)n * per);
}

/* Copy of n samples for one side of an array dataset. */
static void *mgpu__copy_samples(const char *side, int64_t n, mgpu_dtype dt, int ndim, const int64_t *shape, const void *src, size_t *stride) {
    int ok;
    size_t total = mgpu__bytes_of(n, mgpu__shape_numel(ndim, shape, side), mgpu_dtype_size(dt), &ok);
    void *block;
    if (!ok) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dataset_from_arrays: %s holds more bytes than fit in memory", side); return NULL; }
    if (total && !src) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dataset_from_arrays: %s is NULL", side); return NULL; }
    *stride = n ? total / (size_t)n : 0;
    block = mgpu__alloc(total, "a dataset's arrays");
    if (block && total) memcpy(block, src, total);
    return block;
}

MGPU_API mgpu_dataset *mgpu_dataset_from_arrays(int64_t n, mgpu_dtype x_dtype, int x_ndim, const int64_t *x_shape, const void *x,
                                                mgpu_dtype y_dtype, int y_ndim, const int64_t *y_shape, const void *y) {
    mgpu_dataset *ds = mgpu__mem_dataset_new("mgpu_dataset_from_arrays", n, x_dtype, x_ndim, x_shape, y_dtype, y_ndim, y_shape);
    mgpu__mem_dataset *m;
    if (!ds) return NULL;
    m = (mgpu__mem_dataset *)ds->impl;
    m->x_block = mgpu__copy_samples("x", n, x_dtype, x_ndim, x_shape, x, &m->x_stride);
    m->y_block = m->x_block ? mgpu__copy_samples("y", n, y_dtype, y_ndim, y_shape, y, &m->y_stride) : NULL;
    if (!m->x_block || !m->y_block) { mgpu__mem_dataset_destroy(ds); return NULL; }
    m->x = (const uint8_t *)m->x_block;
    m->y = (const uint8_t *)m->y_block;
    ds->get = mgpu__array_dataset_get;
    return ds;
}

/* --------------------------------------------------------------------------------------
   IDX files (the MNIST format): bytes 0 0 TYPE NDIM, NDIM big-endian u32 dims, then the
   data, big-endian, row-major.
   -------------------------------------------------------------------------------------- */

/* Element size of an IDX type code, 0 if unknown. */
static size_t mgpu__idx_elem_size(int type_code) {
    switch (type_code) {
    case 0x08: case 0x09: return 1;  /* u8, i8 */
    case 0x0B: return 2;             /* i16 */
    case 0x0C: case 0x0D: return 4;  /* i32, f32 */
    case 0x0E: return 8;             /* f64 */
    }
    return 0;
}

MGPU_API mgpu_result mgpu_idx_parse(const void *bytes, size_t len, const char *label, mgpu_idx *out) {
    const uint8_t *p = (const uint8_t *)bytes;
    size_t esize, header, actual;
    uint64_t count = 1, limit;
    int64_t dims[MGPU_MAX_DIMS];
    int i, ndim, zero_dim = 0;
    if (!label) label = "IDX data";
    if (!out) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_idx_parse: out is NULL (parsing %s)", label);
    memset(out, 0, sizeof *out);
    if (!p && len) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_idx_parse: bytes is NULL with len %zu (parsing %s)", len, label);
    if (len < 4) return mgpu__fail(MGPU_ERR_FORMAT, "%s: not an IDX file: %zu bytes, shorter than the 4-byte magic", label, len);
    if (p[0] != 0 || p[1] != 0)
        return mgpu__fail(MGPU_ERR_FORMAT, "%s: not an IDX file: magic starts with 0x%02x 0x%02x, expected 0x00 0x00 (a gzip file starts with 0x1f 0x8b)",
                          label, p[0], p[1]);
    esize = mgpu__idx_elem_size(p[2]);
    if (!esize) return mgpu__fail(MGPU_ERR_FORMAT, "%s: unknown IDX type code 0x%02x (expected 0x08, 0x09, 0x0B, 0x0C, 0x0D or 0x0E)", label, p[2]);
    ndim = p[3];
    if (ndim < 1 || ndim > MGPU_MAX_DIMS)
        return mgpu__fail(MGPU_ERR_FORMAT, "%s: IDX header has %d dimensions, expected 1 to %d", label, ndim, MGPU_MAX_DIMS);
    header = 4 + 4 * (size_t)ndim;
    if (len < header)
        return mgpu__fail(MGPU_ERR_FORMAT, "%s: IDX header truncated: %d dimensions need %zu header bytes, file has %zu", label, ndim, header, len);
    /* every element must be addressable in a size_t and countable in an int64 */
    limit = (uint64_t)(SIZE_MAX < (uint64_t)INT64_MAX ? SIZE_MAX : (uint64_t)INT64_MAX) / esize;
    for (i = 0; i < ndim; i++) {
        const uint8_t *d = p + 4 + 4 * i;
        dims[i] = (int64_t)(((uint32_t)d[0] << 24) | ((uint32_t)d[1] << 16) | ((uint32_t)d[2] << 8) | (uint32_t)d[3]);
        if (dims[i] == 0) zero_dim = 1;
    }
    for (i = 0; i < ndim && !zero_dim; i++) {
        if (count > limit / (uint64_t)dims[i])
            return mgpu__fail(MGPU_ERR_FORMAT, "%s: IDX dimensions are too large (their product overflows)", label);
        count *= (uint64_t)dims[i];
    }
    if (zero_dim) count = 0;
    actual = len - header;
    if (actual != count * esize) {
        char shape[160];
        mgpu_shape_string(ndim, dims, shape, sizeof shape);
        return mgpu__fail(MGPU_ERR_FORMAT, "%s: IDX data is %s: the header %s needs %llu data bytes, the file has %zu", label,
                          actual < count * esize ? "truncated" : "too long (trailing bytes)", shape,
                          (unsigned long long)(count * esize), actual);
    }
    out->type_code = p[2];
    out->ndim = ndim;
    memcpy(out->dims, dims, sizeof(int64_t) * (size_t)ndim);
    out->data = p + header;
    out->data_bytes = actual;
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   Reading files, plain or gzip (through `gzip -dc`, so the header needs no zlib).
   -------------------------------------------------------------------------------------- */

static int mgpu__ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

static int mgpu__is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && !S_ISDIR(st.st_mode);
}

/* The rest of a stream into a new buffer (free with mgpu_free); size_hint avoids regrowing. */
static mgpu_result mgpu__read_stream(FILE *f, const char *path, size_t size_hint, uint8_t **data, size_t *len) {
    size_t cap = MGPU__MAX(size_hint + 1, (size_t)4096), n = 0;
    uint8_t *buf = (uint8_t *)mgpu__alloc(cap, path);
    *data = NULL; *len = 0;
    if (!buf) return MGPU_ERR_OOM_HOST;
    for (;;) {
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (n < cap) break;
        {   /* full: double (no realloc hook in the allocator, so copy) */
            uint8_t *bigger = cap > SIZE_MAX / 2 ? NULL : (uint8_t *)mgpu__alloc(2 * cap, path);
            if (!bigger) { mgpu_free(buf); return MGPU_ERR_OOM_HOST; }
            memcpy(bigger, buf, n);
            mgpu_free(buf);
            buf = bigger; cap *= 2;
        }
    }
    if (ferror(f)) { mgpu_free(buf); return mgpu__fail(MGPU_ERR_IO, "cannot read '%s': %s", path, strerror(errno)); }
    *data = buf; *len = n;
    return MGPU_OK;
}

/* 'path' quoted for /bin/sh (a ' becomes '\''). */
static char *mgpu__shell_quote(const char *s) {
    size_t n = strlen(s), i, j = 0;
    char *q = (char *)mgpu__alloc(4 * n + 3, "a shell command");
    if (!q) return NULL;
    q[j++] = '\'';
    for (i = 0; i < n; i++) {
        if (s[i] == '\'') { memcpy(q + j, "'\\''", 4); j += 4; }
        else q[j++] = s[i];
    }
    q[j++] = '\'';
    q[j] = 0;
    return q;
}

/* gzip's trailer holds the uncompressed size mod 2^32: a good first buffer size. */
static size_t mgpu__gzip_size_hint(FILE *f) {
    uint8_t t[4];
    if (fseek(f, -4, SEEK_END) != 0 || fread(t, 1, 4, f) != 4) return 0;
    return (size_t)t[0] | ((size_t)t[1] << 8) | ((size_t)t[2] << 16) | ((size_t)t[3] << 24);
}

static mgpu_result mgpu__read_gzip(const char *path, size_t size_hint, uint8_t **data, size_t *len) {
    char *quoted = mgpu__shell_quote(path), *cmd;
    FILE *p;
    mgpu_result r;
    int status;
    if (!quoted) return MGPU_ERR_OOM_HOST;
    cmd = (char *)mgpu__alloc(strlen(quoted) + 32, "a shell command");
    if (!cmd) { mgpu_free(quoted); return MGPU_ERR_OOM_HOST; }
    /* our own message says what went wrong, so gzip's stderr is not needed */
    sprintf(cmd, "gzip -dc -- %s 2>/dev/null", quoted);
    mgpu_free(quoted);
    p = popen(cmd, "r");
    mgpu_free(cmd);
    if (!p) return mgpu__fail(MGPU_ERR_IO, "cannot run `gzip -dc` to decompress '%s': %s", path, strerror(errno));
    r = mgpu__read_stream(p, path, size_hint, data, len);
    status = pclose(p);
    if (r == MGPU_OK && !(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
        mgpu_free(*data); *data = NULL; *len = 0;
        return mgpu__fail(MGPU_ERR_IO, "`gzip -dc '%s'` failed (status %d): the file is not a complete gzip file, or gzip is not installed",
                          path, status);
    }
    return r;
}

/* A whole file in memory; gzip files (name ends in .gz, or magic 1f 8b) come out decompressed. */
static mgpu_result mgpu__read_maybe_gzip(const char *path, uint8_t **data, size_t *len) {
    FILE *f = fopen(path, "rb");
    uint8_t magic[2] = {0, 0};
    size_t got, hint;
    struct stat st;
    mgpu_result r;
    *data = NULL; *len = 0;
    if (!f) return mgpu__fail(MGPU_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    got = fread(magic, 1, 2, f);
    if (mgpu__ends_with(path, ".gz") || (got == 2 && magic[0] == 0x1f && magic[1] == 0x8b)) {
        hint = mgpu__gzip_size_hint(f);
        fclose(f);
        return mgpu__read_gzip(path, hint, data, len);
    }
    hint = fstat(fileno(f), &st) == 0 && st.st_size > 0 ? (size_t)st.st_size : 0;
    rewind(f);
    r = mgpu__read_stream(f, path, hint, data, len);
    fclose(f);
    return r;
}

/* path if it exists, else path.gz if that exists (written into buf); NULL if neither. */
static const char *mgpu__plain_or_gz(const char *path, char *buf, size_t size) {
    if (mgpu__is_file(path)) return path;
    if ((size_t)snprintf(buf, size, "%s.gz", path) < size && mgpu__is_file(buf)) return buf;
    return NULL;
}

/* One IDX file of u8 with the wanted ndim: file contents in *block, parsed view in *idx. */
static mgpu_result mgpu__idx_load_u8(const char *path, const char *what, int want_ndim, void **block, mgpu_idx *idx) {
    char gz[4096];
    const char *actual = mgpu__plain_or_gz(path, gz, sizeof gz);
    uint8_t *data;
    size_t len;
    mgpu_result r;
    *block = NULL;
    if (!actual)
        return mgpu__fail(MGPU_ERR_IO, "mgpu_dataset_idx_open: %s file '%s' not found (nor '%s.gz'); expected an IDX file such as %s(.gz); "
                          "run `make data` to fetch Fashion-MNIST", what, path, path,
                          want_ndim == 3 ? "train-images-idx3-ubyte" : "train-labels-idx1-ubyte");
    r = mgpu__read_maybe_gzip(actual, &data, &len);
    if (r != MGPU_OK) return r;
    r = mgpu_idx_parse(data, len, actual, idx);
    if (r == MGPU_OK && (idx->type_code != 0x08 || idx->ndim != want_ndim))
        r = mgpu__fail(MGPU_ERR_FORMAT, "%s: expected %s as IDX u8 (type 0x08) with %d dimensions, got type 0x%02x with %d",
                       actual, what, want_ndim, idx->type_code, idx->ndim);
    if (r != MGPU_OK) { mgpu_free(data); return r; }
    *block = data;
    return MGPU_OK;
}

MGPU_API mgpu_dataset *mgpu_dataset_idx_open(const char *images_path, const char *labels_path) {
    mgpu_idx img, lab;
    void *img_block = NULL, *lab_block = NULL;
    mgpu_dataset *ds;
    mgpu__mem_dataset *m;
    int64_t x_shape[3] = {1, 0, 0};
    if (!images_path || !labels_path || !*images_path || !*labels_path)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_dataset_idx_open: images_path and labels_path must be non-empty strings");
    if (mgpu__idx_load_u8(images_path, "images", 3, &img_block, &img) != MGPU_OK) return NULL;
    if (mgpu__idx_load_u8(labels_path, "labels", 1, &lab_block, &lab) != MGPU_OK) { mgpu_free(img_block); return NULL; }
    if (img.dims[0] != lab.dims[0]) {
        mgpu_free(img_block); mgpu_free(lab_block);
        MGPU__FAIL_NULL(MGPU_ERR_FORMAT, "mgpu_dataset_idx_open: images file '%s' holds %lld samples but labels file '%s' holds %lld",
                        images_path, (long long)img.dims[0], labels_path, (long long)lab.dims[0]);
    }
    x_shape[1] = img.dims[1]; x_shape[2] = img.dims[2];
    ds = mgpu__mem_dataset_new("mgpu_dataset_idx_open", img.dims[0], MGPU_F32, 3, x_shape, MGPU_I64, 0, NULL);
    if (!ds) { mgpu_free(img_block); mgpu_free(lab_block); return NULL; }
    m = (mgpu__mem_dataset *)ds->impl;
    m->x_block = img_block; m->y_block = lab_block;
    m->x = img.data; m->y = lab.data;
    m->x_stride = (size_t)(img.dims[1] * img.dims[2]);
    m->y_stride = 1;
    ds->get = mgpu__idx_dataset_get;
    return ds;
}

MGPU_API mgpu_dataset *mgpu_dataset_fashion_mnist(const char *dir, int train) {
    const char *dirs[3];
    const char *prefix = train ? "train" : "t10k";
    char images[4096], labels[4096], gz[4096], tried[1024];
    int n_dirs = 0, i;
    size_t pos = 0;
    if (dir && *dir) dirs[n_dirs++] = dir;
    else {
        const char *env = getenv("MGPU_DATA");
        if (env && *env) dirs[n_dirs++] = env;
        dirs[n_dirs++] = "data/fashion-mnist";
        dirs[n_dirs++] = "/usr/share/datasets/fashion-mnist"; /* where Debian's dataset-fashion-mnist puts it */
    }
    tried[0] = 0;
    for (i = 0; i < n_dirs; i++) {
        if ((size_t)snprintf(images, sizeof images, "%s/%s-images-idx3-ubyte", dirs[i], prefix) >= sizeof images ||
            (size_t)snprintf(labels, sizeof labels, "%s/%s-labels-idx1-ubyte", dirs[i], prefix) >= sizeof labels)
            MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_dataset_fashion_mnist: directory path '%.100s...' is too long", dirs[i]);
        if (mgpu__plain_or_gz(images, gz, sizeof gz)) return mgpu_dataset_idx_open(images, labels);
        if (pos < sizeof tried) pos += (size_t)snprintf(tried + pos, sizeof tried - pos, "%s'%s'", i ? ", " : "", dirs[i]);
    }
    MGPU__FAIL_NULL(MGPU_ERR_IO, "mgpu_dataset_fashion_mnist: no %s-images-idx3-ubyte(.gz) found in %s; run `make data` "
                    "(installs Debian's dataset-fashion-mnist and fills data/fashion-mnist), or pass the directory (--data DIR, or $MGPU_DATA)",
                    prefix, tried);
}

/* --------------------------------------------------------------------------------------
   Sampler: torch.utils.data.DistributedSampler's index lists.
   -------------------------------------------------------------------------------------- */

/* Samples per rank: ceil(n / world), or floor with drop_last (DistributedSampler's num_samples). */
static int64_t mgpu__sampler_count(int64_t n, int world, int drop_last) {
    if (drop_last && n % world != 0) return n / world;
    return (n + world - 1) / world;
}

/* Fisher-Yates permutation of [0, n) driven by the counter-based RNG (stream `seed`). */
static void mgpu__permutation(int64_t n, uint64_t seed, int64_t *perm) {
    int64_t i;
    for (i = 0; i < n; i++) perm[i] = i;
    for (i = n - 1; i > 0; i--) {
        /* 64 random bits: the modulo bias is below 2^-32 for any n that fits in memory */
        uint64_t r = ((uint64_t)mgpu_random_u32(seed, 2 * (uint64_t)i) << 32) | mgpu_random_u32(seed, 2 * (uint64_t)i + 1);
        int64_t j = (int64_t)(r % (uint64_t)(i + 1)), t = perm[i];
        perm[i] = perm[j]; perm[j] = t;
    }
}

MGPU_API int64_t mgpu_sampler_indices(int64_t n, int rank, int world_size, int shuffle, uint64_t seed, int64_t epoch,
                                      int drop_last, int64_t *out) {
    int world = world_size > 1 ? world_size : 1;
    int64_t count, k, *perm = NULL;
    if (n < 0) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_sampler_indices: n is %lld, must be >= 0", (long long)n); return -1; }
    if (rank < 0 || rank >= world) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_sampler_indices: rank %d outside [0, %d) for world_size %d", rank, world, world_size);
        return -1;
    }
    count = mgpu__sampler_count(n, world, drop_last);
    if (!out || count == 0) return count;
    if (shuffle) {
        perm = (int64_t *)mgpu__alloc(sizeof(int64_t) * (size_t)n, "the sampler's permutation");
        if (!perm) return -1;
        mgpu__permutation(n, seed + (uint64_t)epoch, perm);
    }
    /* the padded list repeats the permutation from its start, so position p holds perm[p % n];
       rank takes positions rank, rank + world, ... */
    for (k = 0; k < count; k++) {
        int64_t p = (rank + k * world) % n;
        out[k] = perm ? perm[p] : p;
    }
    mgpu_free(perm);
    return count;
}

/* --------------------------------------------------------------------------------------
   Loader. Batch k of an epoch is built from the rank's indices [k*B, (k+1)*B) into slot
   k % n_slots. Workers claim batches in order; the consumer takes them in order, so the
   sequence does not depend on the number of workers. A slot is reused only after the batch
   handed out from it is released (at the next call), which keeps b->x valid until then.
   On a GPU a loader either streams (each slot holds pinned host buffers and device tensors; when
   batch k is handed out the upload of batch k + 1 starts, so the copy runs while step k computes)
   or keeps the dataset resident on the device and gathers each batch there from the epoch's
   indices (no copy from the host per step).
   -------------------------------------------------------------------------------------- */

enum { MGPU__SLOT_FREE = 0, MGPU__SLOT_FILLING = 1, MGPU__SLOT_READY = 2, MGPU__SLOT_HELD = 3 };

static void mgpu__loader_host_free(struct mgpu_loader *l, uint8_t *p);

typedef struct mgpu__loader_slot {
    uint8_t *x_host, *y_host;  /* (B, x_shape...), (B, y_shape...) filled by workers */
    mgpu_tensor *x, *y;        /* handed out; on the CPU they wrap x_host / y_host */
#ifdef MGPU_CUDA
    mgpu__cuda_upload up;      /* on a GPU: x_host / y_host are pinned and copied on the loader's stream */
#endif
    int uploaded;              /* the copy of this slot's batch to the device has been started */
    int state;
    int64_t batch, size;
    mgpu_result result;
    char error[1024];
} mgpu__loader_slot;

struct mgpu_loader {
    const mgpu_dataset *ds;
    int64_t batch_size;
    int shuffle, drop_last, sampler_drop_last, rank, world;
    uint64_t seed;
    mgpu_context *ctx; int owns_ctx;
    int device_copy;             /* batch tensors are not host memory: copy at delivery */
    void *copy_stream;           /* CUDA: the stream batches are uploaded on */
    int resident;                /* the dataset lives on the device: batches are gathered there */
    mgpu_tensor *res_x, *res_y;  /* resident: every sample, (n, x_shape...) and (n, y_shape...) */
    mgpu_tensor *res_idx;        /* resident: the epoch's indices (n_indices) */
    size_t x_bytes, y_bytes;     /* per sample, as the dataset writes them */
    int64_t x_numel, y_numel;
    int64_t *indices, n_indices, n_batches;
    int64_t epoch, next_batch;   /* consumer position */
    int64_t claim_batch;         /* next batch a worker may fill */
    int held;                    /* slot handed out by the last next(), or -1 */
    mgpu__loader_slot *slots; int n_slots;
    pthread_t *threads; int n_workers, n_started;
    pthread_mutex_t mu;
    pthread_cond_t work_cv, ready_cv;
    int n_filling, shutdown;
    int cancel;                  /* read without the lock by filling workers (atomics) */
    mgpu_result failed;          /* sticky until set_epoch */
    char failed_msg[1024];
};

static void mgpu__loader_fill(mgpu_loader *l, mgpu__loader_slot *s, int64_t k) {
    int64_t begin = k * l->batch_size, i;
    s->size = MGPU__MIN(l->batch_size, l->n_indices - begin);
    s->result = MGPU_OK;
    mgpu_clear_error();
    for (i = 0; i < s->size; i++) {
        int64_t index = l->indices[begin + i];
        mgpu_result r;
        if (__atomic_load_n(&l->cancel, __ATOMIC_RELAXED)) { s->result = MGPU_ERR_STATE; snprintf(s->error, sizeof s->error, "cancelled"); return; }
        r = l->ds->get(l->ds, index, s->x_host + (size_t)i * l->x_bytes, s->y_host + (size_t)i * l->y_bytes);
        if (r != MGPU_OK) {
            s->result = r;
            snprintf(s->error, sizeof s->error, "mgpu_loader_next: sample %lld (batch %lld of epoch %lld): %.900s", (long long)index,
                     (long long)k, (long long)l->epoch, mgpu_last_result() != MGPU_OK ? mgpu_last_error() : mgpu_result_string(r));
            return;
        }
    }
}

static int mgpu__loader_claimable(const mgpu_loader *l) {
    return !__atomic_load_n(&l->cancel, __ATOMIC_RELAXED) && l->claim_batch < l->n_batches &&
           l->slots[l->claim_batch % l->n_slots].state == MGPU__SLOT_FREE;
}

static void *mgpu__loader_worker(void *arg) {
    mgpu_loader *l = (mgpu_loader *)arg;
    pthread_mutex_lock(&l->mu);
    for (;;) {
        mgpu__loader_slot *s;
        int64_t k;
        while (!l->shutdown && !mgpu__loader_claimable(l)) pthread_cond_wait(&l->work_cv, &l->mu);
        if (l->shutdown) break;
        k = l->claim_batch++;
        s = &l->slots[k % l->n_slots];
        s->state = MGPU__SLOT_FILLING; s->batch = k;
        l->n_filling++;
        pthread_mutex_unlock(&l->mu);
        mgpu__loader_fill(l, s, k);
        pthread_mutex_lock(&l->mu);
        l->n_filling--;
        s->state = MGPU__SLOT_READY;
        pthread_cond_broadcast(&l->ready_cv);
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

/* Stops workers from claiming and waits for fills in progress (they abort at the next sample). */
static void mgpu__loader_drain_locked(mgpu_loader *l) {
    __atomic_store_n(&l->cancel, 1, __ATOMIC_RELAXED);
    while (l->n_filling > 0) pthread_cond_wait(&l->ready_cv, &l->mu);
}

MGPU_API void mgpu_loader_destroy(mgpu_loader *l) {
    int i;
    if (!l) return;
    pthread_mutex_lock(&l->mu);
    l->shutdown = 1;
    __atomic_store_n(&l->cancel, 1, __ATOMIC_RELAXED);
    pthread_cond_broadcast(&l->work_cv);
    pthread_mutex_unlock(&l->mu);
    for (i = 0; i < l->n_started; i++) pthread_join(l->threads[i], NULL);
    pthread_mutex_destroy(&l->mu);
    pthread_cond_destroy(&l->work_cv);
    pthread_cond_destroy(&l->ready_cv);
#ifdef MGPU_CUDA
    mgpu__cuda_stream_free(l->copy_stream);   /* waits for the uploads still in flight */
#endif
    for (i = 0; l->slots && i < l->n_slots; i++) {
        mgpu_tensor_free(l->slots[i].x);
        mgpu_tensor_free(l->slots[i].y);
        mgpu__loader_host_free(l, l->slots[i].x_host);
        mgpu__loader_host_free(l, l->slots[i].y_host);
#ifdef MGPU_CUDA
        mgpu__cuda_upload_release(&l->slots[i].up);
#endif
    }
    mgpu_tensor_free(l->res_x);
    mgpu_tensor_free(l->res_y);
    mgpu_tensor_free(l->res_idx);
    mgpu_free(l->slots);
    mgpu_free(l->threads);
    mgpu_free(l->indices);
    if (l->owns_ctx) mgpu_context_destroy(l->ctx);
    mgpu_free(l);
}

/* Validates the dataset and the desc; fills the loader's settings. */
static mgpu_result mgpu__loader_configure(mgpu_loader *l, const mgpu_dataset *ds, const mgpu_loader_desc *d) {
    const char *fn = "mgpu_loader_create";
    int ok;
    if (!ds || !d) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: ds and desc must not be NULL", fn);
    if (!ds->get || ds->length < 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: the dataset has no get() or a negative length", fn);
    if (!mgpu__dtype_valid(ds->x_dtype) || !mgpu__dtype_valid(ds->y_dtype))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: the dataset's x_dtype or y_dtype is not a valid mgpu_dtype", fn);
    if (ds->x_ndim >= MGPU_MAX_DIMS || ds->y_ndim >= MGPU_MAX_DIMS)
        return mgpu__fail(MGPU_ERR_SHAPE, "%s: samples have %d-d x and %d-d y; batches add a dimension and allow %d in all", fn,
                          ds->x_ndim, ds->y_ndim, MGPU_MAX_DIMS);
    l->x_numel = mgpu__sample_numel(fn, "dataset x_shape", ds->x_ndim, ds->x_shape);
    l->y_numel = mgpu__sample_numel(fn, "dataset y_shape", ds->y_ndim, ds->y_shape);
    if (l->x_numel < 0 || l->y_numel < 0) return mgpu_last_result();
    if (d->batch_size < 1) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->batch_size is %lld, must be >= 1", fn, (long long)d->batch_size);
    if (d->num_workers < 0 || d->num_workers > 256)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->num_workers is %d, must be in [0, 256]", fn, d->num_workers);
    if (d->prefetch < 0 || d->prefetch > 64) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->prefetch is %d, must be in [0, 64]", fn, d->prefetch);
    if (d->world_size < 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->world_size is %d, must be >= 0", fn, d->world_size);
    if ((int)d->data_on_device < MGPU_DATA_ON_DEVICE_OFF || (int)d->data_on_device > MGPU_DATA_ON_DEVICE_AUTO)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->data_on_device is %d, not an mgpu_data_on_device value (OFF, ON or AUTO)", fn,
                          (int)d->data_on_device);
    l->world = d->world_size > 1 ? d->world_size : 1;
    if (d->rank < 0 || d->rank >= l->world)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->rank %d outside [0, %d) for world_size %d", fn, d->rank, l->world, d->world_size);
    l->x_bytes = (size_t)l->x_numel * mgpu_dtype_size(ds->x_dtype); /* validated shapes keep these small */
    l->y_bytes = (size_t)l->y_numel * mgpu_dtype_size(ds->y_dtype);
    mgpu__bytes_of(d->batch_size, l->x_numel + l->y_numel, 8, &ok);
    if (!ok) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: a batch of %lld samples does not fit in memory", fn, (long long)d->batch_size);
    l->ds = ds;
    l->batch_size = d->batch_size;
    l->shuffle = d->shuffle; l->seed = d->seed;
    l->drop_last = d->drop_last; l->sampler_drop_last = d->sampler_drop_last;
    l->rank = d->rank;
    l->n_workers = d->num_workers;
    l->n_slots = d->num_workers ? d->num_workers * (d->prefetch ? d->prefetch : 2) : 1;
    l->n_indices = mgpu__sampler_count(ds->length, l->world, l->sampler_drop_last);
    l->n_batches = l->drop_last ? l->n_indices / l->batch_size : (l->n_indices + l->batch_size - 1) / l->batch_size;
    return MGPU_OK;
}

/* Device bytes a resident dataset takes: every sample and the epoch's index list (0 on overflow). */
static size_t mgpu__loader_resident_bytes(const mgpu_loader *l) {
    int ok_data, ok_idx;
    size_t data = mgpu__bytes_of(l->ds->length, 1, l->x_bytes + l->y_bytes, &ok_data);
    size_t idx = mgpu__bytes_of(l->n_indices, 1, sizeof(int64_t), &ok_idx);
    return ok_data && ok_idx && data <= SIZE_MAX - idx ? data + idx : 0;
}

/* Whether the dataset lives on the device: desc ON (a CUDA context is required), or AUTO for a
   static dataset whose samples and index list take at most a quarter of the device's free memory
   (room left for the model, its activations and the allocator's rounding). */
static mgpu_result mgpu__loader_choose_resident(mgpu_loader *l, mgpu_data_on_device mode) {
    size_t need, free_b = 0;
    l->resident = 0;
    if (mode == MGPU_DATA_ON_DEVICE_OFF) return MGPU_OK;
    if (!l->device_copy) {
        if (mode == MGPU_DATA_ON_DEVICE_ON)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_loader_create: desc->data_on_device is ON (--data-on-device on) but the loader's "
                              "context is the CPU, where the samples are in host memory already; use a CUDA context (--device cuda), or OFF / AUTO");
        return MGPU_OK;
    }
    if (mode == MGPU_DATA_ON_DEVICE_ON) { l->resident = 1; return MGPU_OK; }
    if (!l->ds->static_samples) return MGPU_OK;   /* get() may augment: each epoch needs fresh samples */
    need = mgpu__loader_resident_bytes(l);
#ifdef MGPU_CUDA
    {
        mgpu_result r = mgpu__cuda_free_bytes(l->ctx->device.index, &free_b);
        if (r != MGPU_OK) return r;
    }
#endif
    l->resident = need > 0 && need <= free_b / 4;
    return MGPU_OK;
}

/* (rows, sample_shape...): a batch, or a whole resident dataset */
static void mgpu__rows_shape(int64_t rows, int ndim, const int64_t *sample_shape, int64_t *out) {
    out[0] = rows;
    if (ndim) memcpy(out + 1, sample_shape, sizeof(int64_t) * (size_t)ndim);
}

/* One batch tensor of a slot: (B, sample_shape...), wrapping the host buffer on the CPU. */
static mgpu_tensor *mgpu__loader_batch_tensor(mgpu_loader *l, mgpu_dtype dt, int ndim, const int64_t *shape, void *host) {
    int64_t bshape[MGPU_MAX_DIMS];
    mgpu__rows_shape(l->batch_size, ndim, shape, bshape);
    if (l->device_copy) return mgpu_tensor_create(l->ctx, dt, ndim + 1, bshape);
    return mgpu_tensor_wrap(l->ctx, dt, ndim + 1, bshape, host);
}

/* Batch buffers the workers fill: pinned on a GPU, so uploads are DMA and need no staging copy. */
static uint8_t *mgpu__loader_host_alloc(mgpu_loader *l, size_t bytes) {
#ifdef MGPU_CUDA
    if (l->device_copy) return (uint8_t *)mgpu_cuda_host_alloc(bytes);
#endif
    (void)l;
    return (uint8_t *)mgpu__alloc(bytes, "a loader batch");
}
static void mgpu__loader_host_free(mgpu_loader *l, uint8_t *p) {
#ifdef MGPU_CUDA
    if (l->device_copy) { mgpu_cuda_host_free(p); return; }
#endif
    (void)l;
    mgpu_free(p);
}

/* Slots: host buffers and a copy stream when streaming; a resident loader's one slot holds only
   the device tensors its batches are gathered into. */
static mgpu_result mgpu__loader_alloc_slots(mgpu_loader *l) {
    int i;
#ifdef MGPU_CUDA
    if (l->device_copy && !l->resident) {
        mgpu_result r = mgpu__cuda_stream_new(l->ctx->device.index, &l->copy_stream);
        if (r != MGPU_OK) return r;
    }
#endif
    l->slots = (mgpu__loader_slot *)mgpu__calloc(sizeof(mgpu__loader_slot) * (size_t)l->n_slots, "the loader's batch slots");
    if (!l->slots) return MGPU_ERR_OOM_HOST;
    for (i = 0; i < l->n_slots; i++) {
        mgpu__loader_slot *s = &l->slots[i];
        if (!l->resident) {
            s->x_host = mgpu__loader_host_alloc(l, (size_t)l->batch_size * l->x_bytes);
            s->y_host = mgpu__loader_host_alloc(l, (size_t)l->batch_size * l->y_bytes);
            if (!s->x_host || !s->y_host) return MGPU_ERR_OOM_HOST;
        }
        s->x = mgpu__loader_batch_tensor(l, l->ds->x_dtype, l->ds->x_ndim, l->ds->x_shape, s->x_host);
        s->y = mgpu__loader_batch_tensor(l, l->ds->y_dtype, l->ds->y_ndim, l->ds->y_shape, s->y_host);
        if (!s->x || !s->y) return mgpu_last_result();
    }
    return MGPU_OK;
}

/* A resident array (n, sample_shape...) on the loader's device; NULL with the error set. */
static mgpu_tensor *mgpu__loader_resident_tensor(mgpu_loader *l, mgpu_dtype dt, int ndim, const int64_t *shape) {
    int64_t whole[MGPU_MAX_DIMS];
    mgpu__rows_shape(l->ds->length, ndim, shape, whole);
    return mgpu_tensor_create(l->ctx, dt, ndim + 1, whole);
}

/* Device memory for the resident dataset; a dataset that does not fit says so and how to go on. */
static mgpu_result mgpu__loader_resident_alloc(mgpu_loader *l) {
    char why[1024];
    int64_t n_idx = MGPU__MAX(l->n_indices, 1);
    l->res_x = mgpu__loader_resident_tensor(l, l->ds->x_dtype, l->ds->x_ndim, l->ds->x_shape);
    l->res_y = l->res_x ? mgpu__loader_resident_tensor(l, l->ds->y_dtype, l->ds->y_ndim, l->ds->y_shape) : NULL;
    l->res_idx = l->res_y ? mgpu_tensor_create(l->ctx, MGPU_I64, 1, &n_idx) : NULL;
    if (l->res_idx) return MGPU_OK;
    if (mgpu_last_result() != MGPU_ERR_OOM_DEVICE) return mgpu_last_result();
    snprintf(why, sizeof why, "%s", mgpu_last_error());
    return mgpu__fail(MGPU_ERR_OOM_DEVICE, "mgpu_loader_create: the dataset (%lld samples, %.1f MiB) does not fit on cuda:%d with "
                      "data_on_device ON (--data-on-device on): %s; use --data-on-device off (or auto) to stream it",
                      (long long)l->ds->length, (double)mgpu__loader_resident_bytes(l) / (1024.0 * 1024.0), l->ctx->device.index, why);
}

/* Uploads every sample once, decoded by get() into host chunks of a few thousand samples. */
static mgpu_result mgpu__loader_resident_upload(mgpu_loader *l) {
    const int64_t chunk = 4096;
    int64_t n = l->ds->length, i, j;
    uint8_t *hx = (uint8_t *)mgpu__alloc((size_t)chunk * l->x_bytes + 1, "the loader's upload buffer");
    uint8_t *hy = (uint8_t *)mgpu__alloc((size_t)chunk * l->y_bytes + 1, "the loader's upload buffer");
    mgpu_result r = hx && hy ? MGPU_OK : MGPU_ERR_OOM_HOST;
    for (i = 0; i < n && r == MGPU_OK; i += chunk) {
        int64_t m = MGPU__MIN(chunk, n - i);
        for (j = 0; j < m && r == MGPU_OK; j++)
            if ((r = l->ds->get(l->ds, i + j, hx + (size_t)j * l->x_bytes, hy + (size_t)j * l->y_bytes)) != MGPU_OK)
                r = mgpu__fail(r, "mgpu_loader_create: sample %lld, read to keep the dataset on the device: %.900s", (long long)(i + j),
                               mgpu_last_result() != MGPU_OK ? mgpu_last_error() : mgpu_result_string(r));
        if (r == MGPU_OK)
            r = mgpu__transfer(l->ctx, (uint8_t *)l->res_x->data + (size_t)i * l->x_bytes, hx, (size_t)m * l->x_bytes, "mgpu_loader_create");
        if (r == MGPU_OK)
            r = mgpu__transfer(l->ctx, (uint8_t *)l->res_y->data + (size_t)i * l->y_bytes, hy, (size_t)m * l->y_bytes, "mgpu_loader_create");
    }
    mgpu_free(hx);
    mgpu_free(hy);
    return r;
}

static mgpu_result mgpu__loader_start_workers(mgpu_loader *l) {
    int i;
    if (!l->n_workers) return MGPU_OK;
    l->threads = (pthread_t *)mgpu__calloc(sizeof(pthread_t) * (size_t)l->n_workers, "the loader's threads");
    if (!l->threads) return MGPU_ERR_OOM_HOST;
    for (i = 0; i < l->n_workers; i++) {
        int e = pthread_create(&l->threads[i], NULL, mgpu__loader_worker, l);
        if (e != 0) return mgpu__fail(MGPU_ERR_OOM_HOST, "mgpu_loader_create: cannot start worker thread %d of %d: %s", i, l->n_workers, strerror(e));
        l->n_started++;
    }
    return MGPU_OK;
}

/* Streaming on a GPU needs two slots at least: batch k + 1 is uploaded while batch k is in use.
   A resident dataset needs one slot (the gather target) and no workers. */
static mgpu_result mgpu__loader_place(mgpu_loader *l, mgpu_data_on_device mode) {
    mgpu_result r = mgpu__loader_choose_resident(l, mode);
    if (r != MGPU_OK) return r;
    if (l->resident) { l->n_slots = 1; l->n_workers = 0; }
    else if (l->device_copy && l->n_slots < 2) l->n_slots = 2;
    if ((r = mgpu__loader_alloc_slots(l)) != MGPU_OK) return r;
    if (l->resident && ((r = mgpu__loader_resident_alloc(l)) != MGPU_OK || (r = mgpu__loader_resident_upload(l)) != MGPU_OK)) return r;
    return MGPU_OK;
}

MGPU_API mgpu_loader *mgpu_loader_create(const mgpu_dataset *ds, const mgpu_loader_desc *desc) {
    mgpu_loader *l = (mgpu_loader *)mgpu__calloc(sizeof *l, "a loader");
    if (!l) return NULL;
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->work_cv, NULL);
    pthread_cond_init(&l->ready_cv, NULL);
    l->held = -1;
    l->epoch = -1;
    if (mgpu__loader_configure(l, ds, desc) != MGPU_OK) { mgpu_loader_destroy(l); return NULL; }
    l->ctx = desc->ctx;
    if (!l->ctx) {
        mgpu_context_desc cd;
        memset(&cd, 0, sizeof cd);
        cd.num_threads = 1;
        cd.arena_bytes = 4096; /* the loader's own context never runs ops */
        l->ctx = mgpu_context_create(&cd);
        l->owns_ctx = 1;
        if (!l->ctx) { mgpu_loader_destroy(l); return NULL; }
    }
    l->device_copy = l->ctx->device.type != MGPU_DEVICE_CPU;
    l->indices = (int64_t *)mgpu__alloc(sizeof(int64_t) * (size_t)MGPU__MAX(l->n_indices, 1), "the loader's indices");
    if (!l->indices || mgpu__loader_place(l, desc->data_on_device) != MGPU_OK || mgpu_loader_set_epoch(l, 0, 0) != MGPU_OK ||
        mgpu__loader_start_workers(l) != MGPU_OK) {
        mgpu_loader_destroy(l);
        return NULL;
    }
    return l;
}

/* Before the workers may refill a slot's host buffers: its upload must have read them. */
static mgpu_result mgpu__loader_uploads_done(mgpu_loader *l, mgpu__loader_slot *s) {
#ifdef MGPU_CUDA
    if (l->device_copy && !l->resident) return mgpu__cuda_upload_finish(&s->up);
#endif
    (void)l; (void)s;
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_loader_set_epoch(mgpu_loader *l, int64_t epoch, int64_t start_batch) {
    int i;
    mgpu_result r = MGPU_OK;
    if (!l) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_loader_set_epoch: loader is NULL");
    if (epoch < 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_loader_set_epoch: epoch is %lld, must be >= 0", (long long)epoch);
    if (start_batch < 0 || start_batch > l->n_batches)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_loader_set_epoch: start_batch %lld outside [0, %lld] (batches per epoch)",
                          (long long)start_batch, (long long)l->n_batches);
    pthread_mutex_lock(&l->mu);
    /* already positioned there (e.g. the epoch 0 the loader starts in): keep what is prefetched */
    if (epoch == l->epoch && start_batch == l->next_batch && l->failed == MGPU_OK) { pthread_mutex_unlock(&l->mu); return MGPU_OK; }
    mgpu__loader_drain_locked(l);
    /* the held batch and one prefetched batch may still be uploading from their host buffers */
    for (i = 0; i < l->n_slots; i++) {
        if (l->slots[i].uploaded && r == MGPU_OK) r = mgpu__loader_uploads_done(l, &l->slots[i]);
        l->slots[i].state = MGPU__SLOT_FREE;
        l->slots[i].uploaded = 0;
    }
    l->held = -1;
    l->failed = MGPU_OK;
    l->epoch = epoch;
    l->next_batch = l->claim_batch = start_batch;
    if (r == MGPU_OK &&
        mgpu_sampler_indices(l->ds->length, l->rank, l->world, l->shuffle, l->seed, epoch, l->sampler_drop_last, l->indices) < 0)
        r = mgpu_last_result();
    /* a resident loader gathers from the device's copy of the index list */
    if (r == MGPU_OK && l->resident && l->n_indices > 0)
        r = mgpu_tensor_copy_from_host(l->res_idx, l->indices, sizeof(int64_t) * (size_t)l->n_indices);
    if (r != MGPU_OK) {
        l->failed = r;
        snprintf(l->failed_msg, sizeof l->failed_msg, "%s", mgpu_last_error());
        l->epoch = -1;
        l->claim_batch = l->n_batches; /* nothing to fill until a later set_epoch succeeds */
    }
    __atomic_store_n(&l->cancel, 0, __ATOMIC_RELAXED);
    pthread_cond_broadcast(&l->work_cv);
    pthread_mutex_unlock(&l->mu);
    return r;
}

/* Builds batch k into its slot on the calling thread (a loader without workers). */
static void mgpu__loader_fill_here(mgpu_loader *l, mgpu__loader_slot *s, int64_t k) {
    s->batch = k;
    mgpu__loader_fill(l, s, k);
    s->state = MGPU__SLOT_READY;
}

/* Waits for (or, without workers, builds) batch k; returns its slot with the lock held. */
static mgpu__loader_slot *mgpu__loader_take_locked(mgpu_loader *l, int64_t k) {
    mgpu__loader_slot *s = &l->slots[k % l->n_slots];
    int ready = s->state == MGPU__SLOT_READY && s->batch == k;   /* prefetched by the previous call */
    if (l->n_workers == 0 && !ready) { mgpu__loader_fill_here(l, s, k); return s; }
    while (!(s->state == MGPU__SLOT_READY && s->batch == k)) pthread_cond_wait(&l->ready_cv, &l->mu);
    return s;
}

/* On a GPU, the slot of batch k + 1 (k was just handed out) when its upload can start now: built
   here by a loader without workers, taken when a worker has it ready (never waited for: the step
   must not wait on the host for a batch it does not need yet). NULL if none. Lock held. */
static mgpu__loader_slot *mgpu__loader_prefetch_locked(mgpu_loader *l, int64_t k) {
    mgpu__loader_slot *p;
    if (!l->device_copy || k + 1 >= l->n_batches) return NULL;
    p = &l->slots[(k + 1) % l->n_slots];
    if (l->n_workers == 0 && p->state == MGPU__SLOT_FREE) mgpu__loader_fill_here(l, p, k + 1);
    if (p->state != MGPU__SLOT_READY || p->batch != k + 1 || p->result != MGPU_OK || p->uploaded) return NULL;
    p->uploaded = 1;   /* a READY slot is never refilled, so the upload may start after the lock is dropped */
    return p;
}

/* Sets the leading dim of a slot's tensors to its batch's size (the last batch may be short). */
static void mgpu__loader_set_size(mgpu_loader *l, mgpu__loader_slot *s) {
    s->x->shape[0] = s->y->shape[0] = s->size;
    s->x->numel = s->size * l->x_numel;
    s->y->numel = s->size * l->y_numel;
}

/* On a GPU: starts copying a slot's batch on the loader's stream, after the steps already queued
   (the one that read this slot's device tensors last among them). */
static mgpu_result mgpu__loader_upload(mgpu_loader *l, mgpu__loader_slot *s) {
    mgpu__loader_set_size(l, s);
    s->uploaded = 1;
#ifdef MGPU_CUDA
    {
        mgpu__cuda_copy c[2];
        c[0].dst = s->x->data; c[0].src = s->x_host; c[0].bytes = mgpu_tensor_nbytes(s->x);
        c[1].dst = s->y->data; c[1].src = s->y_host; c[1].bytes = mgpu_tensor_nbytes(s->y);
        return mgpu__cuda_upload_start(&s->up, l->copy_stream, l->ctx->cuda_stream, c, 2);
    }
#else
    return mgpu__fail(MGPU_ERR_STATE, "mgpu_loader_next: a device context in a build without MGPU_CUDA");
#endif
}

/* Hands a slot's batch to the step: on a GPU the step's stream waits for its upload (on the
   device: the host goes on queueing the step). */
static mgpu_result mgpu__loader_deliver(mgpu_loader *l, mgpu__loader_slot *s) {
    mgpu_result r;
    if (!l->device_copy) { mgpu__loader_set_size(l, s); return MGPU_OK; }
    if (!s->uploaded && (r = mgpu__loader_upload(l, s)) != MGPU_OK) return r;
#ifdef MGPU_CUDA
    return mgpu__cuda_upload_consume(&s->up, l->ctx->cuda_stream);
#else
    return MGPU_OK;
#endif
}

/* rows [begin, begin + size) of the epoch's indices, gathered from a resident array into dst */
static mgpu_result mgpu__loader_gather(mgpu_loader *l, mgpu_tensor *dst, const mgpu_tensor *src, int64_t sample_numel, int64_t begin, int64_t size) {
    mgpu__gather_rows_args a;
    memset(&a, 0, sizeof a);
    a.ctx = l->ctx;
    a.src = src->data; a.dst = dst->data;
    a.idx = (const int64_t *)l->res_idx->data + begin;
    a.rows = size; a.len = sample_numel; a.n_src = l->ds->length;
    a.esize = mgpu_dtype_size(src->dtype);
    dst->shape[0] = size;
    dst->numel = size * sample_numel;
    return MGPU__TWIN(l->ctx, gather_rows, &a);
}

/* A resident loader's next batch: gathered on the context's stream, behind the steps that read the
   previous one (stream order), so one slot is enough. */
static mgpu_result mgpu__loader_next_resident(mgpu_loader *l, mgpu_batch *b) {
    mgpu__loader_slot *s = &l->slots[0];
    int64_t k = l->next_batch, begin = k * l->batch_size, size;
    mgpu_result r;
    if (l->failed != MGPU_OK) return mgpu__fail(l->failed, "%s", l->failed_msg);
    b->index = k;
    if (k >= l->n_batches) return MGPU_OK;
    size = MGPU__MIN(l->batch_size, l->n_indices - begin);
    if ((r = mgpu__loader_gather(l, s->x, l->res_x, l->x_numel, begin, size)) != MGPU_OK ||
        (r = mgpu__loader_gather(l, s->y, l->res_y, l->y_numel, begin, size)) != MGPU_OK)
        return r;
    l->next_batch++;
    b->x = s->x; b->y = s->y;
    b->size = size;
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_loader_next(mgpu_loader *l, mgpu_batch *b) {
    mgpu__loader_slot *s, *pre;
    int64_t k;
    mgpu_result r;
    if (!l || !b) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_loader_next: loader and batch must not be NULL");
    memset(b, 0, sizeof *b);
    if (l->resident) return mgpu__loader_next_resident(l, b);
    if (l->held >= 0 && (r = mgpu__loader_uploads_done(l, &l->slots[l->held])) != MGPU_OK) return r;
    pthread_mutex_lock(&l->mu);
    if (l->held >= 0) {
        l->slots[l->held].state = MGPU__SLOT_FREE;
        l->slots[l->held].uploaded = 0;
        l->held = -1;
        pthread_cond_broadcast(&l->work_cv);
    }
    if (l->failed != MGPU_OK) {
        r = mgpu__fail(l->failed, "%s", l->failed_msg);
        pthread_mutex_unlock(&l->mu);
        return r;
    }
    k = l->next_batch;
    b->index = k;
    if (k >= l->n_batches) { pthread_mutex_unlock(&l->mu); return MGPU_OK; }
    s = mgpu__loader_take_locked(l, k);
    if (s->result != MGPU_OK) {
        /* the batch stays unbuilt; every later call repeats the error until set_epoch */
        l->failed = s->result;
        memcpy(l->failed_msg, s->error, sizeof l->failed_msg);
        s->state = MGPU__SLOT_FREE;
        r = mgpu__fail(l->failed, "%s", l->failed_msg);
        pthread_mutex_unlock(&l->mu);
        return r;
    }
    s->state = MGPU__SLOT_HELD;
    l->held = (int)(k % l->n_slots);
    l->next_batch++;
    pre = mgpu__loader_prefetch_locked(l, k);
    pthread_mutex_unlock(&l->mu);
    /* the slot is ours until the next call: no worker touches a held (or a prefetched) slot */
    if ((r = mgpu__loader_deliver(l, s)) != MGPU_OK) return r;
    /* batch k + 1 starts copying now, before the step on batch k is queued and synchronised */
    if (pre && (r = mgpu__loader_upload(l, pre)) != MGPU_OK) return r;
    b->x = s->x; b->y = s->y;
    b->size = s->size;
    return MGPU_OK;
}

MGPU_API int64_t mgpu_loader_num_batches(const mgpu_loader *l) {
    if (!l) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_loader_num_batches: loader is NULL"); return -1; }
    return l->n_batches;
}

MGPU_API int mgpu_loader_data_on_device(const mgpu_loader *l) {
    if (!l) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_loader_data_on_device: loader is NULL"); return -1; }
    return l->resident;
}
