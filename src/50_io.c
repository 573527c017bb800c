/* ======================================================================================
   Files, JSON, safetensors, options, metrics, progress
   ====================================================================================== */

/* Files (atomic writes, whole-file reads), a strict JSON parser plus writer helpers, safetensors,
   model save/load, the common training options, the metrics JSONL writer and the progress bar. */

/* safetensors stores little-endian data and tensors are copied byte for byte. */
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "mgpu: safetensors I/O copies tensor bytes as they are and needs a little-endian host"
#endif

/* --------------------------------------------------------------------------------------
   Growable text buffer (JSON headers, metrics lines)
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__buf { char *data; size_t len, cap; int failed; } mgpu__buf;

static void mgpu__buf_init(mgpu__buf *b) { b->data = NULL; b->len = 0; b->cap = 0; b->failed = 0; }
static void mgpu__buf_free(mgpu__buf *b) { mgpu_free(b->data); mgpu__buf_init(b); }

/* Makes room for `extra` more bytes plus a terminating NUL; 0 (and b->failed) when out of memory. */
static int mgpu__buf_reserve(mgpu__buf *b, size_t extra) {
    size_t cap;
    char *grown;
    if (b->failed) return 0;
    if (b->len + extra + 1 <= b->cap) return 1;
    cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) cap *= 2;
    grown = (char *)mgpu__alloc(cap, "a text buffer");
    if (!grown) { b->failed = 1; return 0; }
    if (b->len) memcpy(grown, b->data, b->len);
    mgpu_free(b->data);
    b->data = grown; b->cap = cap;
    return 1;
}
static int mgpu__buf_append(mgpu__buf *b, const void *p, size_t n) {
    if (!mgpu__buf_reserve(b, n)) return 0;
    if (n) memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = 0;
    return 1;
}
static int mgpu__buf_puts(mgpu__buf *b, const char *s) { return mgpu__buf_append(b, s, strlen(s)); }
static int mgpu__buf_printf(mgpu__buf *b, const char *fmt, ...) MGPU__PRINTF(2, 3);
static int mgpu__buf_printf(mgpu__buf *b, const char *fmt, ...) {
    va_list ap, ap2;
    int n;
    va_start(ap, fmt);
    va_copy(ap2, ap);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || !mgpu__buf_reserve(b, (size_t)n)) { va_end(ap2); return 0; }
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap2);
    va_end(ap2);
    b->len += (size_t)n;
    return 1;
}

/* s as a JSON string literal: quotes, backslashes and control characters escaped; UTF-8 passes through. */
static int mgpu__buf_json_string(mgpu__buf *b, const char *s) {
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    mgpu__buf_puts(b, "\"");
    while (*p) {
        const unsigned char *run = p;
        char esc[7];
        while (*p >= 0x20 && *p != '"' && *p != '\\') p++;
        mgpu__buf_append(b, run, (size_t)(p - run));
        if (!*p) break;
        esc[0] = '\\'; esc[2] = 0;
        switch (*p) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        default:
            esc[1] = 'u'; esc[2] = '0'; esc[3] = '0'; esc[4] = hex[*p >> 4]; esc[5] = hex[*p & 15]; esc[6] = 0;
        }
        mgpu__buf_puts(b, esc);
        p++;
    }
    return mgpu__buf_puts(b, "\"");
}

/* The shortest of %.15g / %.17g that reads back exactly; JSON has no inf/nan, so those are null. */
static int mgpu__buf_json_number(mgpu__buf *b, double v) {
    char text[40];
    if (!isfinite(v)) return mgpu__buf_puts(b, "null");
    snprintf(text, sizeof text, "%.15g", v);
    if (strtod(text, NULL) != v) snprintf(text, sizeof text, "%.17g", v);
    return mgpu__buf_puts(b, text);
}

/* --------------------------------------------------------------------------------------
   Data checksum: safetensors has none, so checkpoints carry one in the file metadata
   ("checksum": "mgpu64:<hex>") over the data section. A flipped bit or a torn write is then an
   error at load time instead of silently wrong weights. Four independent multiply-rotate lanes
   over little-endian 64-bit words keep it at several GB/s; files without the key still load.
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__hash64 { uint64_t lane[4]; uint8_t buf[32]; size_t fill; uint64_t total; } mgpu__hash64;

static void mgpu__hash64_init(mgpu__hash64 *h) {
    int k;
    for (k = 0; k < 4; k++) h->lane[k] = 0x9e3779b97f4a7c15ULL * (uint64_t)(k + 1);
    h->fill = 0; h->total = 0;
}
static uint64_t mgpu__rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static void mgpu__hash64_block(mgpu__hash64 *h, const uint8_t *p) {
    int k;
    for (k = 0; k < 4; k++) {
        uint64_t w;
        memcpy(&w, p + 8 * k, 8); /* little-endian host (checked above) */
        h->lane[k] = mgpu__rotl64((h->lane[k] ^ w) * 0xff51afd7ed558ccdULL, 29);
    }
}
static void mgpu__hash64_update(mgpu__hash64 *h, const void *data, size_t len) {
    const uint8_t *p = (const uint8_t *)data;
    h->total += len;
    if (h->fill) {
        size_t take = MGPU__MIN(len, 32 - h->fill);
        memcpy(h->buf + h->fill, p, take);
        h->fill += take; p += take; len -= take;
        if (h->fill < 32) return;
        mgpu__hash64_block(h, h->buf);
        h->fill = 0;
    }
    for (; len >= 32; p += 32, len -= 32) mgpu__hash64_block(h, p);
    memcpy(h->buf, p, len);
    h->fill = len;
}
static uint64_t mgpu__hash64_final(mgpu__hash64 *h) {
    uint64_t out;
    int k;
    if (h->fill) { memset(h->buf + h->fill, 0, 32 - h->fill); mgpu__hash64_block(h, h->buf); }
    out = mgpu__mix64(h->total);
    for (k = 0; k < 4; k++) out = mgpu__mix64(out ^ h->lane[k]);
    return out;
}
static void mgpu__checksum_text(uint64_t v, char *out, size_t size) { snprintf(out, size, "mgpu64:%016llx", (unsigned long long)v); }

/* --------------------------------------------------------------------------------------
   Files
   -------------------------------------------------------------------------------------- */

/* Writes all bytes at offset `at`, retrying short writes; returns 0 or an errno value. A disk that
   fills up is ENOSPC (or EFBIG past a size limit), never a silently short file. */
static int mgpu__pwrite_fully(int fd, const void *data, size_t len, uint64_t at) {
    const char *p = (const char *)data;
    while (len > 0) {
        size_t chunk = len > ((size_t)1 << 30) ? ((size_t)1 << 30) : len;
        ssize_t w = pwrite(fd, p, chunk, (off_t)at);
        if (w < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (w == 0) return ENOSPC;
        p += w;
        at += (uint64_t)w;
        len -= (size_t)w;
    }
    return 0;
}

/* Large files are written in chunks of this size, each hashed (when asked) just before it is
   written while it is still in cache. */
#define MGPU__WRITE_CHUNK ((uint64_t)8 << 20)

/* A file being written front to back: next offset, how far write-back was started, and an
   optional running checksum of what passes through. */
typedef struct mgpu__stream { int fd; uint64_t at, started; mgpu__hash64 *hash; } mgpu__stream;

static void mgpu__stream_init(mgpu__stream *s, int fd, uint64_t at, mgpu__hash64 *hash) {
    s->fd = fd; s->at = at; s->started = at; s->hash = hash;
}

/* Starts write-back of each finished chunk at once, so the disk works while the next chunk is
   hashed and copied (cp + sync leaves it idle until the sync) and the final fsync has little left.
   Only a hint: nothing is waited for here, and fsync reports any write-back error. (Waiting for
   older chunks, to bound dirty memory, measured slower.) */
static void mgpu__stream_writeback(mgpu__stream *s) {
#if defined(__linux__) && defined(SYNC_FILE_RANGE_WRITE)
    if (s->at - s->started < MGPU__WRITE_CHUNK) return;
    (void)sync_file_range(s->fd, (off_t)s->started, (off_t)(s->at - s->started), SYNC_FILE_RANGE_WRITE);
    s->started = s->at;
#else
    (void)s;
#endif
}

/* Appends data in chunks aligned to file offsets; 0 or an errno value. */
static int mgpu__stream_write(mgpu__stream *s, const void *data, size_t len) {
    const char *p = (const char *)data;
    while (len > 0) {
        size_t chunk = (size_t)MGPU__MIN((uint64_t)len, MGPU__WRITE_CHUNK - s->at % MGPU__WRITE_CHUNK);
        int err;
        if (s->hash) mgpu__hash64_update(s->hash, p, chunk);
        if ((err = mgpu__pwrite_fully(s->fd, p, chunk, s->at)) != 0) return err;
        s->at += chunk; p += chunk; len -= chunk;
        mgpu__stream_writeback(s);
    }
    return 0;
}

/* fsync of the directory holding path, so the rename itself survives a power loss. */
static int mgpu__fsync_parent_dir(const char *path) {
    const char *slash = strrchr(path, '/');
    size_t n = slash ? (size_t)(slash - path) : 1;
    char *dir;
    int fd, err = 0;
    if (slash && n == 0) n = 1; /* "/file" lives in "/" */
    dir = (char *)mgpu__alloc(n + 1, "a directory name");
    if (!dir) return ENOMEM;
    memcpy(dir, slash ? path : ".", n);
    dir[n] = 0;
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) err = errno;
    /* some file systems cannot fsync a directory (EINVAL); the rename is then as durable as it gets */
    else if (fsync(fd) != 0 && errno != EINVAL) err = errno;
    if (fd >= 0) close(fd);
    mgpu_free(dir);
    return err;
}

typedef struct mgpu__span { const void *data; size_t len; } mgpu__span;

/* An atomic replacement of path in progress: the temporary file path.tmp.<pid> and its descriptor. */
typedef struct mgpu__tmpfile { const char *path, *fn; char *tmp; int fd; } mgpu__tmpfile;

static mgpu_result mgpu__tmpfile_open(mgpu__tmpfile *f, const char *path, const char *fn) {
    size_t tmp_size;
    f->path = path; f->fn = fn; f->tmp = NULL; f->fd = -1;
    if (!path || !path[0]) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: path is NULL or empty", fn);
    tmp_size = strlen(path) + 32;
    if (!(f->tmp = (char *)mgpu__alloc(tmp_size, "a temporary file name"))) return MGPU_ERR_OOM_HOST;
    snprintf(f->tmp, tmp_size, "%s.tmp.%ld", path, (long)getpid());
    f->fd = open(f->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (f->fd < 0) {
        int err = errno;
        mgpu__fail(MGPU_ERR_IO, "%s: cannot write '%s': creating the temporary file '%s' failed: %s", fn, path, f->tmp, strerror(err));
        mgpu_free(f->tmp);
        f->tmp = NULL;
        return MGPU_ERR_IO;
    }
    return MGPU_OK;
}

/* Ends the replacement: after a write error (err != 0) the temporary file is removed and path is
   untouched; else fsync, rename over path and fsync of the directory. */
static mgpu_result mgpu__tmpfile_close(mgpu__tmpfile *f, int err) {
    const char *step = "write";
    mgpu_result r = MGPU_OK;
    if (!err && fsync(f->fd) != 0) { err = errno; step = "fsync"; }
    if (close(f->fd) != 0 && !err) { err = errno; step = "close"; }
    if (!err && rename(f->tmp, f->path) != 0) { err = errno; step = "rename"; }
    if (err) {
        unlink(f->tmp);
        r = mgpu__fail(MGPU_ERR_IO, "%s: cannot write '%s': %s of '%s' failed: %s", f->fn, f->path, step, f->tmp, strerror(err));
    } else if ((err = mgpu__fsync_parent_dir(f->path)) != 0) {
        r = mgpu__fail(MGPU_ERR_IO, "%s: wrote '%s' but could not fsync its directory: %s", f->fn, f->path, strerror(err));
    }
    mgpu_free(f->tmp);
    f->tmp = NULL; f->fd = -1;
    return r;
}

/* Abandons the replacement after a failure already reported (path untouched, no new error). */
static void mgpu__tmpfile_abort(mgpu__tmpfile *f) {
    close(f->fd);
    unlink(f->tmp);
    mgpu_free(f->tmp);
    f->tmp = NULL; f->fd = -1;
}

/* Atomic replacement of path by the concatenation of spans. */
static mgpu_result mgpu__write_atomic_spans(const char *path, const mgpu__span *spans, int n_spans, const char *fn) {
    mgpu__tmpfile f;
    mgpu__stream s;
    mgpu_result r;
    int i, err = 0;
    if ((r = mgpu__tmpfile_open(&f, path, fn)) != MGPU_OK) return r;
    mgpu__stream_init(&s, f.fd, 0, NULL);
    for (i = 0; i < n_spans && !err; i++) err = mgpu__stream_write(&s, spans[i].data, spans[i].len);
    return mgpu__tmpfile_close(&f, err);
}

MGPU_API mgpu_result mgpu_write_file_atomic(const char *path, const void *data, size_t len) {
    mgpu__span span;
    if (!data && len) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_write_file_atomic: data is NULL but len is %zu", len);
    span.data = data; span.len = len;
    return mgpu__write_atomic_spans(path, &span, 1, "mgpu_write_file_atomic");
}

MGPU_API mgpu_result mgpu_read_file(const char *path, void **data, size_t *len) {
    struct stat st;
    size_t cap, used = 0;
    char *buf;
    int fd, err = 0;
    if (!path || !data || !len) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_read_file: path, data and len must not be NULL");
    *data = NULL; *len = 0;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return mgpu__fail(MGPU_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    if (fstat(fd, &st) != 0) err = errno;
    else if (S_ISDIR(st.st_mode)) err = EISDIR;
    if (err) {
        close(fd);
        return mgpu__fail(MGPU_ERR_IO, "cannot read '%s': %s", path, strerror(err));
    }
    /* room for a NUL after the data and one spare byte, so end of file is seen without growing;
       files without a size (pipes, /proc) grow */
    cap = st.st_size > 0 ? (size_t)st.st_size + 2 : 4096;
    buf = (char *)mgpu__alloc(cap, path);
    while (buf) {
        ssize_t got;
        if (used + 1 >= cap) {
            char *grown = (char *)mgpu__alloc(2 * cap, path);
            if (grown) memcpy(grown, buf, used);
            mgpu_free(buf);
            buf = grown; cap *= 2;
            if (!buf) break;
        }
        got = read(fd, buf + used, cap - used - 1);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) { err = errno; break; }
        if (got == 0) break;
        used += (size_t)got;
    }
    close(fd);
    if (!buf) return MGPU_ERR_OOM_HOST;
    if (err) { mgpu_free(buf); return mgpu__fail(MGPU_ERR_IO, "cannot read '%s': %s", path, strerror(err)); }
    buf[used] = 0; /* text files can be used as C strings */
    *data = buf; *len = used;
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   JSON (RFC 8259): strict recursive descent into the mgpu_json DOM
   -------------------------------------------------------------------------------------- */

#define MGPU__JSON_MAX_DEPTH 64

typedef struct mgpu__json_parser {
    const char *s; size_t len, pos;
    const char *label;
    int failed;
} mgpu__json_parser;

/* Records the first failure (label and byte offset); returns NULL so parsers can `return` it. */
static mgpu_json *mgpu__json_error(mgpu__json_parser *p, const char *what) {
    if (!p->failed) mgpu__fail(MGPU_ERR_FORMAT, "%s: invalid JSON at byte %zu: %s", p->label, p->pos, what);
    p->failed = 1;
    return NULL;
}

/* Length of the well-formed UTF-8 sequence at s (n bytes left), 0 if ill-formed: overlong,
   a surrogate, above U+10FFFF or cut short. */
static size_t mgpu__utf8_seq_len(const unsigned char *s, size_t n) {
    uint32_t cp;
    size_t k, i;
    if (s[0] < 0x80) return 1;
    if (s[0] >= 0xc2 && s[0] <= 0xdf) { k = 2; cp = s[0] & 0x1fu; }
    else if (s[0] >= 0xe0 && s[0] <= 0xef) { k = 3; cp = s[0] & 0x0fu; }
    else if (s[0] >= 0xf0 && s[0] <= 0xf4) { k = 4; cp = s[0] & 0x07u; }
    else return 0;
    if (n < k) return 0;
    for (i = 1; i < k; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3fu);
    }
    if ((k == 3 && cp < 0x800) || (k == 4 && (cp < 0x10000 || cp > 0x10ffff)) || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    return k;
}
static int mgpu__utf8_valid(const char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        size_t k = mgpu__utf8_seq_len((const unsigned char *)s + i, n - i);
        if (!k) return 0;
        i += k;
    }
    return 1;
}
static size_t mgpu__utf8_encode(uint32_t cp, char *out) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) { out[0] = (char)(0xc0 | (cp >> 6)); out[1] = (char)(0x80 | (cp & 0x3f)); return 2; }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | (cp >> 12)); out[1] = (char)(0x80 | ((cp >> 6) & 0x3f)); out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | (cp >> 18)); out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3f)); out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

static int mgpu__is_digit(char c) { return c >= '0' && c <= '9'; }

static void mgpu__json_skip_ws(mgpu__json_parser *p) {
    while (p->pos < p->len && (p->s[p->pos] == ' ' || p->s[p->pos] == '\t' || p->s[p->pos] == '\n' || p->s[p->pos] == '\r')) p->pos++;
}

/* New zeroed node followed by `extra` bytes of storage (a number's text). */
static mgpu_json *mgpu__json_new(mgpu__json_parser *p, mgpu_json_type type, size_t extra) {
    mgpu_json *j = (mgpu_json *)mgpu__calloc(sizeof(mgpu_json) + extra, "a JSON value");
    if (!j) { p->failed = 1; return NULL; }
    j->type = type;
    return j;
}

/* Four hex digits at p->s[at] -> code unit, or -1. The caller checked they lie before the string's end. */
static long mgpu__json_hex4(const mgpu__json_parser *p, size_t at) {
    long v = 0;
    size_t i;
    for (i = at; i < at + 4; i++) {
        char c = p->s[i];
        int d = mgpu__is_digit(c) ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

/* Code point of the \uXXXX escape at p->pos (a surrogate pair counts as one), or the reason it is bad. */
static long mgpu__json_code_point(const mgpu__json_parser *p, size_t end, const char **bad) {
    long cp = p->pos + 6 <= end ? mgpu__json_hex4(p, p->pos + 2) : -1, low = -1;
    if (cp < 0) *bad = "\\u must be followed by four hex digits";
    else if (cp >= 0xdc00 && cp <= 0xdfff) *bad = "lone low surrogate in a \\u escape";
    else if (cp >= 0xd800 && cp <= 0xdbff) {
        if (p->pos + 12 <= end && p->s[p->pos + 6] == '\\' && p->s[p->pos + 7] == 'u') low = mgpu__json_hex4(p, p->pos + 8);
        if (low < 0xdc00 || low > 0xdfff) *bad = "high surrogate not followed by a low surrogate \\u escape";
        else cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
    } else if (cp == 0) *bad = "\\u0000 is not supported (strings are NUL-terminated)";
    return cp;
}

/* One escape at p->pos (the backslash), before `end` (the closing quote); appends UTF-8 to out. */
static int mgpu__json_unescape(mgpu__json_parser *p, size_t end, char *out, size_t *n) {
    static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
    const char *simple, *bad = NULL;
    long cp;
    if (p->s[p->pos + 1] != 'u') {
        simple = strchr(from, p->s[p->pos + 1]);
        if (!simple || !*simple) { mgpu__json_error(p, "invalid escape sequence"); return 0; }
        out[(*n)++] = to[simple - from];
        p->pos += 2;
        return 1;
    }
    cp = mgpu__json_code_point(p, end, &bad);
    if (bad) { mgpu__json_error(p, bad); return 0; }
    *n += mgpu__utf8_encode((uint32_t)cp, out + *n);
    p->pos += cp >= 0x10000 ? 12 : 6;
    return 1;
}

/* The string whose opening quote is at p->pos, unescaped into a new NUL-terminated buffer. */
static char *mgpu__json_string_text(mgpu__json_parser *p) {
    size_t end = p->pos + 1, n = 0;
    char *out;
    /* find the closing quote first: the unescaped text is never longer than the source */
    while (end < p->len && p->s[end] != '"') end += p->s[end] == '\\' ? 2 : 1;
    if (end >= p->len) { mgpu__json_error(p, "unterminated string"); return NULL; }
    out = (char *)mgpu__alloc(end - p->pos, "a JSON string");
    if (!out) { p->failed = 1; return NULL; }
    p->pos++;
    while (p->pos < end) {
        unsigned char c = (unsigned char)p->s[p->pos];
        size_t k;
        if (c < 0x20) { mgpu__json_error(p, "control character in a string (must be escaped)"); break; }
        if (c == '\\') {
            if (!mgpu__json_unescape(p, end, out, &n)) break;
            continue;
        }
        k = mgpu__utf8_seq_len((const unsigned char *)p->s + p->pos, end - p->pos);
        if (!k) { mgpu__json_error(p, "invalid UTF-8 in a string"); break; }
        memcpy(out + n, p->s + p->pos, k);
        n += k; p->pos += k;
    }
    if (p->failed) { mgpu_free(out); return NULL; }
    out[n] = 0;
    p->pos = end + 1;
    return out;
}

/* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?, kept as text too for exact integers. */
static mgpu_json *mgpu__json_number(mgpu__json_parser *p) {
    size_t start = p->pos, i = p->pos;
    mgpu_json *j;
    char *raw;
    if (p->s[i] == '-') i++;
    if (i >= p->len || !mgpu__is_digit(p->s[i])) { p->pos = i; return mgpu__json_error(p, "expected a digit in a number"); }
    if (p->s[i] == '0') {
        i++;
        if (i < p->len && mgpu__is_digit(p->s[i])) { p->pos = i; return mgpu__json_error(p, "leading zeros are not allowed in numbers"); }
    } else {
        while (i < p->len && mgpu__is_digit(p->s[i])) i++;
    }
    if (i < p->len && p->s[i] == '.') {
        i++;
        if (i >= p->len || !mgpu__is_digit(p->s[i])) { p->pos = i; return mgpu__json_error(p, "expected a digit after the decimal point"); }
        while (i < p->len && mgpu__is_digit(p->s[i])) i++;
    }
    if (i < p->len && (p->s[i] == 'e' || p->s[i] == 'E')) {
        i++;
        if (i < p->len && (p->s[i] == '+' || p->s[i] == '-')) i++;
        if (i >= p->len || !mgpu__is_digit(p->s[i])) { p->pos = i; return mgpu__json_error(p, "expected a digit in the exponent"); }
        while (i < p->len && mgpu__is_digit(p->s[i])) i++;
    }
    j = mgpu__json_new(p, MGPU_JSON_NUMBER, i - start + 1);
    if (!j) return NULL;
    raw = (char *)(j + 1);
    memcpy(raw, p->s + start, i - start);
    raw[i - start] = 0;
    j->raw = raw; j->raw_len = i - start;
    j->number = strtod(raw, NULL);
    if (isinf(j->number)) { mgpu_free(j); return mgpu__json_error(p, "number out of range"); }
    p->pos = i;
    return j;
}

static mgpu_json *mgpu__json_literal(mgpu__json_parser *p) {
    static const char *const words[3] = {"true", "false", "null"};
    int w;
    for (w = 0; w < 3; w++) {
        size_t n = strlen(words[w]);
        if (p->len - p->pos >= n && memcmp(p->s + p->pos, words[w], n) == 0) {
            mgpu_json *j = mgpu__json_new(p, w == 2 ? MGPU_JSON_NULL : MGPU_JSON_BOOL, 0);
            if (j) j->boolean = w == 0;
            p->pos += n;
            return j;
        }
    }
    return mgpu__json_error(p, "unexpected character (expected a value)");
}

static mgpu_json *mgpu__json_value(mgpu__json_parser *p, int depth);

/* An array or object (opening bracket at p->pos); depth counts the containers around it. */
static mgpu_json *mgpu__json_container(mgpu__json_parser *p, int depth, int is_object) {
    char closer = is_object ? '}' : ']';
    mgpu_json *node, **tail;
    if (depth > MGPU__JSON_MAX_DEPTH) return mgpu__json_error(p, "nested deeper than 64 levels");
    node = mgpu__json_new(p, is_object ? MGPU_JSON_OBJECT : MGPU_JSON_ARRAY, 0);
    if (!node) return NULL;
    tail = &node->child;
    p->pos++;
    mgpu__json_skip_ws(p);
    if (p->pos < p->len && p->s[p->pos] == closer) { p->pos++; return node; }
    for (;;) {
        char *key = NULL;
        mgpu_json *item;
        if (is_object) {
            mgpu__json_skip_ws(p);
            if (p->pos >= p->len || p->s[p->pos] != '"') { mgpu__json_error(p, "expected a string key"); break; }
            if (!(key = mgpu__json_string_text(p))) break;
            mgpu__json_skip_ws(p);
            if (p->pos >= p->len || p->s[p->pos] != ':') { mgpu_free(key); mgpu__json_error(p, "expected ':' after an object key"); break; }
            p->pos++;
        }
        if (!(item = mgpu__json_value(p, depth))) { mgpu_free(key); break; }
        item->key = key;
        *tail = item; tail = &item->next;
        node->count++;
        mgpu__json_skip_ws(p);
        if (p->pos < p->len && p->s[p->pos] == ',') { p->pos++; continue; }
        if (p->pos < p->len && p->s[p->pos] == closer) { p->pos++; return node; }
        mgpu__json_error(p, is_object ? "expected ',' or '}' after an object member" : "expected ',' or ']' after an array element");
        break;
    }
    mgpu_json_free(node);
    return NULL;
}

static mgpu_json *mgpu__json_value(mgpu__json_parser *p, int depth) {
    char c;
    mgpu__json_skip_ws(p);
    if (p->pos >= p->len) return mgpu__json_error(p, "unexpected end of input (expected a value)");
    c = p->s[p->pos];
    if (c == '{' || c == '[') return mgpu__json_container(p, depth + 1, c == '{');
    if (c == '-' || mgpu__is_digit(c)) return mgpu__json_number(p);
    if (c == '"') {
        char *text = mgpu__json_string_text(p);
        mgpu_json *j = text ? mgpu__json_new(p, MGPU_JSON_STRING, 0) : NULL;
        if (!j) { mgpu_free(text); return NULL; }
        j->string = text;
        return j;
    }
    return mgpu__json_literal(p);
}

MGPU_API mgpu_json *mgpu_json_parse(const char *text, size_t len, const char *label) {
    mgpu__json_parser p;
    mgpu_json *root;
    if (!text && len) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_json_parse: text is NULL but len is %zu", len);
    p.s = text ? text : ""; p.len = len; p.pos = 0;
    p.label = label ? label : "JSON";
    p.failed = 0;
    root = mgpu__json_value(&p, 0);
    if (!root) return NULL;
    mgpu__json_skip_ws(&p);
    if (p.pos != p.len) {
        mgpu_json_free(root);
        return mgpu__json_error(&p, "unexpected text after the JSON value");
    }
    return root;
}

MGPU_API void mgpu_json_free(mgpu_json *j) {
    /* siblings iteratively, children recursively (nesting is at most 64 deep) */
    while (j) {
        mgpu_json *next = j->next;
        mgpu_json_free(j->child);
        mgpu_free(j->string);
        mgpu_free(j->key);
        mgpu_free(j);
        j = next;
    }
}

MGPU_API const mgpu_json *mgpu_json_get(const mgpu_json *obj, const char *key) {
    const mgpu_json *c;
    if (!obj || obj->type != MGPU_JSON_OBJECT || !key) return NULL;
    for (c = obj->child; c; c = c->next)
        if (c->key && strcmp(c->key, key) == 0) return c;
    return NULL;
}

MGPU_API int mgpu_json_int64(const mgpu_json *j, int64_t *out) {
    char text[24];
    size_t i;
    int plain;
    if (!j || j->type != MGPU_JSON_NUMBER) return 0;
    plain = j->raw && j->raw_len > 0 && j->raw_len < sizeof text;
    for (i = 0; plain && i < j->raw_len; i++) plain = mgpu__is_digit(j->raw[i]) || (i == 0 && j->raw[i] == '-');
    if (plain) {
        /* integer text: exact through strtoll (a double loses digits past 2^53) */
        long long v;
        memcpy(text, j->raw, j->raw_len);
        text[j->raw_len] = 0;
        errno = 0;
        v = strtoll(text, NULL, 10);
        if (errno == ERANGE) return 0;
        if (out) *out = (int64_t)v;
        return 1;
    }
    /* 1e3 or 2.0: integral if the double is, and exact below 2^53 */
    if (j->number != floor(j->number) || fabs(j->number) > 9007199254740992.0) return 0;
    if (out) *out = (int64_t)j->number;
    return 1;
}

/* --------------------------------------------------------------------------------------
   safetensors: 8-byte little-endian header length N, N bytes of JSON, then the data section
   -------------------------------------------------------------------------------------- */

#define MGPU__ST_MAX_HEADER ((uint64_t)100 << 20)

typedef struct mgpu__st_item { mgpu_safetensors_entry e; uint64_t begin, end; } mgpu__st_item;
struct mgpu_safetensors {
    char *label;                 /* file path (or the caller's label) for messages */
    uint8_t *bytes; size_t len;  /* the whole file; entries point into it */
    mgpu_json *header;           /* entry names and metadata point into it */
    const mgpu_json *metadata;   /* "__metadata__" or NULL */
    int n;
    mgpu__st_item *items;        /* header order */
    mgpu__st_item **by_name;     /* sorted by name, for lookup */
};

/* Format failure naming the file and, when known, the tensor. */
static mgpu_result mgpu__st_error(mgpu_result code, const char *label, const char *tensor, const char *fmt, ...) MGPU__PRINTF(4, 5);
static mgpu_result mgpu__st_error(mgpu_result code, const char *label, const char *tensor, const char *fmt, ...) {
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (tensor) return mgpu__fail(code, "%s: tensor '%s': %s", label, tensor, what);
    return mgpu__fail(code, "%s: %s", label, what);
}

/* dtypes of the safetensors spec this library has no tensor type for */
static int mgpu__st_known_unsupported_dtype(const char *name) {
    static const char *const names[] = {"F64", "I8", "I16", "U16", "U32", "U64", "BOOL", "F8_E4M3", "F8_E5M2",
                                        "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64"};
    size_t i;
    for (i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(name, names[i]) == 0) return 1;
    return 0;
}

static mgpu_result mgpu__st_parse_dtype(const char *label, const char *name, const mgpu_json *j, mgpu_dtype *dt) {
    if (!j) return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "missing \"dtype\"");
    if (j->type != MGPU_JSON_STRING) return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "\"dtype\" is not a string");
    if (mgpu_dtype_from_name(j->string, dt)) return MGPU_OK;
    if (mgpu__st_known_unsupported_dtype(j->string))
        return mgpu__st_error(MGPU_ERR_UNSUPPORTED, label, name, "dtype %s is not supported (F32, F16, BF16, I32, I64, U8 are)", j->string);
    return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "unknown dtype \"%.32s\"", j->string);
}

/* A non-negative integer of an array element, or -1. */
static int64_t mgpu__json_nonneg(const mgpu_json *j) {
    int64_t v;
    return mgpu_json_int64(j, &v) && v >= 0 ? v : -1;
}

static mgpu_result mgpu__st_parse_shape(const char *label, const char *name, const mgpu_json *j, mgpu__st_item *it) {
    const mgpu_json *d;
    uint64_t numel = 1;
    if (!j) return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "missing \"shape\"");
    if (j->type != MGPU_JSON_ARRAY) return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "\"shape\" is not an array");
    if (j->count > MGPU_MAX_DIMS)
        return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "\"shape\" has %lld dimensions, at most %d are supported", (long long)j->count, MGPU_MAX_DIMS);
    it->e.ndim = 0;
    for (d = j->child; d; d = d->next) {
        int64_t v = mgpu__json_nonneg(d);
        if (v < 0) return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "\"shape\" dimension %d is not a non-negative integer", it->e.ndim);
        if (v && numel > UINT64_MAX / (uint64_t)v) return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "\"shape\" overflows");
        numel *= (uint64_t)v;
        it->e.shape[it->e.ndim++] = v;
    }
    if (numel > UINT64_MAX / mgpu_dtype_size(it->e.dtype)) return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "\"shape\" overflows");
    it->e.nbytes = (size_t)(numel * mgpu_dtype_size(it->e.dtype));
    return MGPU_OK;
}

static mgpu_result mgpu__st_parse_offsets(const char *label, const char *name, const mgpu_json *j, uint64_t data_len, mgpu__st_item *it) {
    int64_t begin = 0, end = 0;
    if (!j) return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "missing \"data_offsets\"");
    if (j->type != MGPU_JSON_ARRAY || j->count != 2 || (begin = mgpu__json_nonneg(j->child)) < 0 || (end = mgpu__json_nonneg(j->child->next)) < 0)
        return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "\"data_offsets\" is not two non-negative integers");
    if (begin > end) return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "data_offsets [%lld, %lld] begin after they end", (long long)begin, (long long)end);
    if ((uint64_t)end > data_len)
        return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "data_offsets end %lld is beyond the %llu-byte data section", (long long)end, (unsigned long long)data_len);
    if ((uint64_t)(end - begin) != it->e.nbytes) {
        char shape[96];
        mgpu_shape_string(it->e.ndim, it->e.shape, shape, sizeof shape);
        return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "data_offsets [%lld, %lld] hold %lld bytes but %s %s needs %zu",
                              (long long)begin, (long long)end, (long long)(end - begin), mgpu_dtype_name(it->e.dtype), shape, it->e.nbytes);
    }
    it->begin = (uint64_t)begin; it->end = (uint64_t)end;
    return MGPU_OK;
}

static mgpu_result mgpu__st_parse_entry(const char *label, const mgpu_json *m, uint64_t data_len, mgpu__st_item *it) {
    const mgpu_json *c;
    mgpu_result r;
    it->e.name = m->key;
    if (m->type != MGPU_JSON_OBJECT) return mgpu__st_error(MGPU_ERR_FORMAT, label, m->key, "entry is not an object");
    for (c = m->child; c; c = c->next)
        if (strcmp(c->key, "dtype") != 0 && strcmp(c->key, "shape") != 0 && strcmp(c->key, "data_offsets") != 0)
            return mgpu__st_error(MGPU_ERR_FORMAT, label, m->key, "unexpected key \"%.64s\"", c->key);
    if ((r = mgpu__st_parse_dtype(label, m->key, mgpu_json_get(m, "dtype"), &it->e.dtype)) != MGPU_OK) return r;
    if ((r = mgpu__st_parse_shape(label, m->key, mgpu_json_get(m, "shape"), it)) != MGPU_OK) return r;
    return mgpu__st_parse_offsets(label, m->key, mgpu_json_get(m, "data_offsets"), data_len, it);
}

static mgpu_result mgpu__st_parse_metadata(const char *label, const mgpu_json *m) {
    const mgpu_json *c;
    if (m->type != MGPU_JSON_OBJECT) return mgpu__st_error(MGPU_ERR_FORMAT, label, NULL, "\"__metadata__\" is not an object");
    for (c = m->child; c; c = c->next)
        if (c->type != MGPU_JSON_STRING) return mgpu__st_error(MGPU_ERR_FORMAT, label, NULL, "\"__metadata__\" value of \"%.64s\" is not a string", c->key);
    return MGPU_OK;
}

static int mgpu__st_cmp_name(const void *a, const void *b) {
    return strcmp((*(const mgpu__st_item *const *)a)->e.name, (*(const mgpu__st_item *const *)b)->e.name);
}
static int mgpu__st_cmp_offsets(const void *a, const void *b) {
    const mgpu__st_item *x = *(const mgpu__st_item *const *)a, *y = *(const mgpu__st_item *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}
static int mgpu__st_cmp_key(const void *key, const void *item) {
    return strcmp((const char *)key, (*(const mgpu__st_item *const *)item)->e.name);
}

/* Names unique; byte ranges in order cover the data section exactly (no overlap, no hole). */
static mgpu_result mgpu__st_check_layout(mgpu_safetensors *st, uint64_t data_len) {
    mgpu__st_item **by_offset;
    uint64_t at = 0;
    int i;
    mgpu_result r = MGPU_OK;
    for (i = 0; i < st->n; i++) st->by_name[i] = &st->items[i];
    qsort(st->by_name, (size_t)st->n, sizeof *st->by_name, mgpu__st_cmp_name);
    for (i = 1; i < st->n; i++)
        if (strcmp(st->by_name[i - 1]->e.name, st->by_name[i]->e.name) == 0)
            return mgpu__st_error(MGPU_ERR_FORMAT, st->label, st->by_name[i]->e.name, "appears twice in the header");
    by_offset = (mgpu__st_item **)mgpu__alloc(sizeof *by_offset * (size_t)(st->n + 1), "safetensors validation");
    if (!by_offset) return MGPU_ERR_OOM_HOST;
    memcpy(by_offset, st->by_name, sizeof *by_offset * (size_t)st->n);
    qsort(by_offset, (size_t)st->n, sizeof *by_offset, mgpu__st_cmp_offsets);
    for (i = 0; i < st->n && r == MGPU_OK; i++) {
        const mgpu__st_item *it = by_offset[i];
        if (it->begin < at)
            r = mgpu__st_error(MGPU_ERR_FORMAT, st->label, it->e.name, "bytes [%llu, %llu) overlap tensor '%s'", (unsigned long long)it->begin,
                               (unsigned long long)it->end, by_offset[i - 1]->e.name);
        else if (it->begin > at)
            r = mgpu__st_error(MGPU_ERR_FORMAT, st->label, it->e.name, "bytes [%llu, %llu) leave a hole of %llu unused bytes before them",
                               (unsigned long long)it->begin, (unsigned long long)it->end, (unsigned long long)(it->begin - at));
        at = it->end;
    }
    if (r == MGPU_OK && at != data_len)
        r = mgpu__st_error(MGPU_ERR_FORMAT, st->label, NULL, "the tensors cover %llu bytes but the data section holds %llu",
                           (unsigned long long)at, (unsigned long long)data_len);
    mgpu_free(by_offset);
    return r;
}

/* Parses the header members into st->items and the metadata. */
static mgpu_result mgpu__st_parse_members(mgpu_safetensors *st, uint64_t data_len, const uint8_t *data) {
    const mgpu_json *m;
    mgpu_result r;
    int n = 0;
    for (m = st->header->child; m; m = m->next) {
        if (strcmp(m->key, "__metadata__") == 0) {
            if (st->metadata) return mgpu__st_error(MGPU_ERR_FORMAT, st->label, NULL, "\"__metadata__\" appears twice");
            if ((r = mgpu__st_parse_metadata(st->label, m)) != MGPU_OK) return r;
            st->metadata = m;
            continue;
        }
        if ((r = mgpu__st_parse_entry(st->label, m, data_len, &st->items[n])) != MGPU_OK) return r;
        st->items[n].e.data = data + st->items[n].begin;
        n++;
    }
    st->n = n;
    return mgpu__st_check_layout(st, data_len);
}

/* Validates a whole file image, taking ownership of bytes (freed on failure). */
static mgpu_safetensors *mgpu__st_from_bytes(uint8_t *bytes, size_t len, const char *label) {
    mgpu_safetensors *st;
    uint64_t hlen = 0;
    int i;
    mgpu_result r;
    if (len < 8) {
        mgpu__st_error(MGPU_ERR_FORMAT, label, NULL, "file is %zu bytes, shorter than the 8-byte header length", len);
        mgpu_free(bytes);
        return NULL;
    }
    for (i = 7; i >= 0; i--) hlen = (hlen << 8) | bytes[i];
    if (hlen > MGPU__ST_MAX_HEADER || hlen > len - 8 || hlen < 2 || bytes[8] != '{') {
        if (hlen > MGPU__ST_MAX_HEADER || hlen > len - 8)
            mgpu__st_error(MGPU_ERR_FORMAT, label, NULL, "header length %llu exceeds the file's remaining %zu bytes (or the 100 MB limit)",
                           (unsigned long long)hlen, len - 8);
        else if (hlen < 2) mgpu__st_error(MGPU_ERR_FORMAT, label, NULL, "header length %llu is too small for a JSON object", (unsigned long long)hlen);
        else mgpu__st_error(MGPU_ERR_FORMAT, label, NULL, "the header does not start with '{'");
        mgpu_free(bytes);
        return NULL;
    }
    st = (mgpu_safetensors *)mgpu__calloc(sizeof *st, "a safetensors file");
    if (!st) { mgpu_free(bytes); return NULL; }
    st->bytes = bytes; st->len = len;
    st->label = mgpu__strdup(label);
    if (!st->label) { mgpu_safetensors_close(st); return NULL; }
    {
        char hlabel[300];
        snprintf(hlabel, sizeof hlabel, "%.256s header", label);
        st->header = mgpu_json_parse((const char *)bytes + 8, (size_t)hlen, hlabel);
    }
    if (!st->header) { mgpu_safetensors_close(st); return NULL; }
    st->items = (mgpu__st_item *)mgpu__calloc(sizeof *st->items * (size_t)(st->header->count + 1), "safetensors entries");
    st->by_name = (mgpu__st_item **)mgpu__calloc(sizeof *st->by_name * (size_t)(st->header->count + 1), "safetensors entries");
    r = st->items && st->by_name ? mgpu__st_parse_members(st, len - 8 - hlen, bytes + 8 + hlen) : MGPU_ERR_OOM_HOST;
    if (r != MGPU_OK) { mgpu_safetensors_close(st); return NULL; }
    return st;
}

MGPU_API mgpu_safetensors *mgpu_safetensors_parse(const void *bytes, size_t len, const char *label) {
    uint8_t *copy;
    if (!bytes && len) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_parse: bytes is NULL but len is %zu", len);
    copy = (uint8_t *)mgpu__alloc(len, "a safetensors copy");
    if (!copy) return NULL;
    if (len) memcpy(copy, bytes, len);
    return mgpu__st_from_bytes(copy, len, label ? label : "safetensors data");
}

MGPU_API mgpu_safetensors *mgpu_safetensors_open(const char *path) {
    void *data = NULL;
    size_t len = 0;
    if (!path) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_open: path is NULL");
    if (mgpu_read_file(path, &data, &len) != MGPU_OK) return NULL;
    return mgpu__st_from_bytes((uint8_t *)data, len, path);
}

MGPU_API void mgpu_safetensors_close(mgpu_safetensors *st) {
    if (!st) return;
    mgpu_json_free(st->header);
    mgpu_free(st->items);
    mgpu_free(st->by_name);
    mgpu_free(st->bytes);
    mgpu_free(st->label);
    mgpu_free(st);
}
MGPU_API int mgpu_safetensors_count(const mgpu_safetensors *st) { return st ? st->n : 0; }
MGPU_API const mgpu_safetensors_entry *mgpu_safetensors_get(const mgpu_safetensors *st, int i) {
    if (!st || i < 0 || i >= st->n) return NULL;
    return &st->items[i].e;
}
MGPU_API const mgpu_safetensors_entry *mgpu_safetensors_find(const mgpu_safetensors *st, const char *name) {
    mgpu__st_item **hit;
    if (!st || !name || st->n == 0) return NULL;
    hit = (mgpu__st_item **)bsearch(name, st->by_name, (size_t)st->n, sizeof *st->by_name, mgpu__st_cmp_key);
    return hit ? &(*hit)->e : NULL;
}
MGPU_API const char *mgpu_safetensors_metadata(const mgpu_safetensors *st, const char *key) {
    const mgpu_json *v = st ? mgpu_json_get(st->metadata, key) : NULL;
    return v ? v->string : NULL;
}

/* Whether entry e can be read into dst (on any device): same shape, same dtype or float <-> float. */
static mgpu_result mgpu__st_check_fits(const char *label, const mgpu_safetensors_entry *e, const mgpu_tensor *dst) {
    char file_shape[96], dst_shape[96];
    if (dst->ndim != e->ndim || (e->ndim && memcmp(dst->shape, e->shape, sizeof(int64_t) * (size_t)e->ndim) != 0)) {
        mgpu_shape_string(e->ndim, e->shape, file_shape, sizeof file_shape);
        mgpu_shape_string(dst->ndim, dst->shape, dst_shape, sizeof dst_shape);
        return mgpu__st_error(MGPU_ERR_SHAPE, label, e->name, "shape %s in the file, but the destination tensor is %s", file_shape, dst_shape);
    }
    if (dst->dtype != e->dtype && !(mgpu__dtype_is_float(dst->dtype) && mgpu__dtype_is_float(e->dtype)))
        return mgpu__st_error(MGPU_ERR_SHAPE, label, e->name, "dtype %s in the file cannot be read into a %s tensor",
                              mgpu_dtype_name(e->dtype), mgpu_dtype_name(dst->dtype));
    if (dst->numel && !dst->data) return mgpu__st_error(MGPU_ERR_INVALID_ARG, label, e->name, "the destination tensor has no data");
    return MGPU_OK;
}

/* Float element conversion between F32/F16/BF16 (memcpy: file data may be unaligned). */
typedef struct mgpu__convert_job { const uint8_t *src; mgpu_dtype from; uint8_t *dst; mgpu_dtype to; } mgpu__convert_job;

static float mgpu__load_float(const uint8_t *p, mgpu_dtype dt) {
    float f;
    uint16_t h;
    if (dt == MGPU_F32) { memcpy(&f, p, 4); return f; }
    memcpy(&h, p, 2);
    return dt == MGPU_F16 ? mgpu_f16_to_f32(h) : mgpu_bf16_to_f32(h);
}
static void mgpu__store_float(uint8_t *p, mgpu_dtype dt, float f) {
    uint16_t h;
    if (dt == MGPU_F32) { memcpy(p, &f, 4); return; }
    h = dt == MGPU_F16 ? mgpu_f32_to_f16(f) : mgpu_f32_to_bf16(f);
    memcpy(p, &h, 2);
}
static void mgpu__convert_range(void *arg, int64_t begin, int64_t end) {
    const mgpu__convert_job *j = (const mgpu__convert_job *)arg;
    size_t sf = mgpu_dtype_size(j->from), sd = mgpu_dtype_size(j->to);
    int64_t i;
    for (i = begin; i < end; i++) mgpu__store_float(j->dst + (size_t)i * sd, j->to, mgpu__load_float(j->src + (size_t)i * sf, j->from));
}

/* --------------------------------------------------------------------------------------
   Tensors on a device: their bytes pass through a host staging buffer, in chunks, on the way to
   and from a file. Host tensors are read and written in place, as they always were.
   -------------------------------------------------------------------------------------- */

#define MGPU__STAGE_BYTES ((size_t)8 << 20)

/* The staging buffer, grown on demand and reused for every tensor of a file: pinned memory when
   the build has CUDA (DMA straight from it), plain memory otherwise. */
typedef struct mgpu__stage { void *p; size_t cap; int pinned; } mgpu__stage;

static void mgpu__stage_free(mgpu__stage *s) {
#ifdef MGPU_CUDA
    if (s->pinned) { mgpu_cuda_host_free(s->p); s->p = NULL; }
#endif
    mgpu_free(s->p);
    s->p = NULL; s->cap = 0; s->pinned = 0;
}

/* At least bytes (<= MGPU__STAGE_BYTES) of staging; NULL with an error when out of memory. */
static void *mgpu__stage_get(mgpu__stage *s, size_t bytes) {
    if (bytes <= s->cap && s->p) return s->p;
    mgpu__stage_free(s);
#ifdef MGPU_CUDA
    if ((s->p = mgpu_cuda_host_alloc(bytes)) != NULL) { s->pinned = 1; s->cap = bytes; return s->p; }
    mgpu_clear_error(); /* no pinned memory: pageable memory works too, only slower */
#endif
    if ((s->p = mgpu__alloc(bytes, "staging tensor data")) != NULL) s->cap = bytes;
    return s->p;
}

/* Bytes [at, at + bytes) of t's data to or from host memory: a copy on the host, a transfer on
   the context's stream (waited for) on a device. */
static mgpu_result mgpu__tensor_get_bytes(const mgpu_tensor *t, size_t at, void *dst, size_t bytes, const char *fn) {
    if (mgpu__on_host(t)) { if (bytes) memcpy(dst, (const char *)t->data + at, bytes); return MGPU_OK; }
    return mgpu__transfer(t->ctx, dst, (const char *)t->data + at, bytes, fn);
}
static mgpu_result mgpu__tensor_put_bytes(mgpu_tensor *t, size_t at, const void *src, size_t bytes, const char *fn) {
    if (mgpu__on_host(t)) { if (bytes) memcpy((char *)t->data + at, src, bytes); return MGPU_OK; }
    return mgpu__transfer(t->ctx, (char *)t->data + at, src, bytes, fn);
}

/* Entry e (validated by mgpu__st_check_fits) into dst, converting float dtypes: in place on the
   host; chunk by chunk through the staging buffer on a device. */
static mgpu_result mgpu__st_copy(const mgpu_safetensors_entry *e, mgpu_tensor *dst, mgpu__stage *stage) {
    const char *fn = "loading a safetensors file into a device tensor";
    size_t sf = mgpu_dtype_size(e->dtype), sd = mgpu_dtype_size(dst->dtype);
    mgpu__convert_job job;
    int64_t at, n, chunk;
    mgpu_result r;
    if (dst->dtype == e->dtype) return mgpu__tensor_put_bytes(dst, 0, e->data, e->nbytes, fn);
    job.from = e->dtype; job.to = dst->dtype;
    if (mgpu__on_host(dst)) {
        job.src = (const uint8_t *)e->data; job.dst = (uint8_t *)dst->data;
        mgpu_parallel_for(dst->ctx, dst->numel, (int64_t)1 << 15, mgpu__convert_range, &job);
        return MGPU_OK;
    }
    chunk = (int64_t)(MGPU__STAGE_BYTES / sd);
    for (at = 0; at < dst->numel; at += n) {
        n = MGPU__MIN(chunk, dst->numel - at);
        if (!(job.dst = (uint8_t *)mgpu__stage_get(stage, (size_t)n * sd))) return MGPU_ERR_OOM_HOST;
        job.src = (const uint8_t *)e->data + (size_t)at * sf;
        mgpu_parallel_for(dst->ctx, n, (int64_t)1 << 15, mgpu__convert_range, &job);
        if ((r = mgpu__tensor_put_bytes(dst, (size_t)at * sd, job.dst, (size_t)n * sd, fn)) != MGPU_OK) return r;
    }
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_safetensors_read_into(const mgpu_safetensors *st, const char *name, mgpu_tensor *dst) {
    const mgpu_safetensors_entry *e;
    mgpu__stage stage;
    mgpu_result r;
    if (!st || !name || !dst) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_read_into: st, name and dst must not be NULL");
    e = mgpu_safetensors_find(st, name);
    if (!e) return mgpu__st_error(MGPU_ERR_FORMAT, st->label, name, "not in the file");
    if ((r = mgpu__st_check_fits(st->label, e, dst)) != MGPU_OK) return r;
    memset(&stage, 0, sizeof stage);
    r = mgpu__st_copy(e, dst, &stage);
    mgpu__stage_free(&stage);
    return r;
}

static int mgpu__cmp_str_ptr(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

/* Finds a string given twice; *dup is NULL when all differ. */
static mgpu_result mgpu__find_duplicate(const char *const *strs, int n, const char **dup) {
    const char **sorted;
    int i;
    *dup = NULL;
    if (n < 2) return MGPU_OK;
    sorted = (const char **)mgpu__alloc(sizeof *sorted * (size_t)n, "a duplicate check");
    if (!sorted) return MGPU_ERR_OOM_HOST;
    memcpy(sorted, strs, sizeof *sorted * (size_t)n);
    qsort(sorted, (size_t)n, sizeof *sorted, mgpu__cmp_str_ptr);
    for (i = 1; i < n && !*dup; i++)
        if (strcmp(sorted[i - 1], sorted[i]) == 0) *dup = sorted[i];
    mgpu_free(sorted);
    return MGPU_OK;
}

static mgpu_result mgpu__st_check_tensor_arg(const char *name, const mgpu_tensor *t) {
    if (!name || !name[0] || !mgpu__utf8_valid(name, strlen(name)) || strcmp(name, "__metadata__") == 0)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_save: tensor name '%s' must be non-empty UTF-8 and not __metadata__", name ? name : "(null)");
    if (!t) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_save: tensor '%s' is NULL", name);
    if (!mgpu__dtype_valid(t->dtype) || t->ndim < 0 || t->ndim > MGPU_MAX_DIMS || (t->numel && !t->data))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_save: tensor '%s' is malformed (dtype, ndim or data)", name);
    return MGPU_OK;
}

static mgpu_result mgpu__st_check_save_args(const char *path, int n, const char *const *names, const mgpu_tensor *const *tensors,
                                            int n_meta, const char *const *keys, const char *const *values) {
    const char *dup = NULL;
    mgpu_result r;
    int i;
    if (!path || !path[0]) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_save: path is NULL or empty");
    if (n < 0 || (n > 0 && (!names || !tensors)))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_save: %s: n is %d and names/tensors must be given when n > 0", path, n);
    if (n_meta < 0 || (n_meta > 0 && (!keys || !values)))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_save: %s: n_meta is %d and keys/values must be given when n_meta > 0", path, n_meta);
    for (i = 0; i < n; i++)
        if ((r = mgpu__st_check_tensor_arg(names[i], tensors[i])) != MGPU_OK) return r;
    for (i = 0; i < n_meta; i++)
        if (!keys[i] || !values[i] || !mgpu__utf8_valid(keys[i], strlen(keys[i])) || !mgpu__utf8_valid(values[i], strlen(values[i])))
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_save: %s: metadata entry %d is NULL or not UTF-8", path, i);
    if ((r = mgpu__find_duplicate(names, n, &dup)) != MGPU_OK) return r;
    if (dup) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_save: %s: tensor name '%s' is given twice", path, dup);
    if ((r = mgpu__find_duplicate(keys, n_meta, &dup)) != MGPU_OK) return r;
    if (dup) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_save: %s: metadata key '%s' is given twice", path, dup);
    return MGPU_OK;
}

/* The JSON header, padded with spaces so the data section starts 8-byte aligned. */
static int mgpu__st_build_header(mgpu__buf *b, int n, const char *const *names, const mgpu_tensor *const *tensors,
                                 int n_meta, const char *const *keys, const char *const *values) {
    uint64_t offset = 0;
    int i, d;
    mgpu__buf_puts(b, "{");
    if (n_meta > 0) {
        mgpu__buf_puts(b, "\"__metadata__\":{");
        for (i = 0; i < n_meta; i++) {
            if (i) mgpu__buf_puts(b, ",");
            mgpu__buf_json_string(b, keys[i]);
            mgpu__buf_puts(b, ":");
            mgpu__buf_json_string(b, values[i]);
        }
        mgpu__buf_puts(b, n ? "}," : "}");
    }
    for (i = 0; i < n; i++) {
        const mgpu_tensor *t = tensors[i];
        uint64_t bytes = (uint64_t)mgpu_tensor_nbytes(t);
        if (i) mgpu__buf_puts(b, ",");
        mgpu__buf_json_string(b, names[i]);
        mgpu__buf_printf(b, ":{\"dtype\":\"%s\",\"shape\":[", mgpu_dtype_name(t->dtype));
        for (d = 0; d < t->ndim; d++) mgpu__buf_printf(b, d ? ",%lld" : "%lld", (long long)t->shape[d]);
        mgpu__buf_printf(b, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)offset, (unsigned long long)(offset + bytes));
        offset += bytes;
    }
    mgpu__buf_puts(b, "}");
    while (b->len % 8) mgpu__buf_puts(b, " ");
    return !b->failed;
}

/* The 8-byte little-endian header length followed by the header. */
static int mgpu__st_write_header(int fd, const mgpu__buf *header) {
    uint8_t len_bytes[8];
    int i, err;
    for (i = 0; i < 8; i++) len_bytes[i] = (uint8_t)((uint64_t)header->len >> (8 * i));
    if ((err = mgpu__pwrite_fully(fd, len_bytes, 8, 0)) != 0) return err;
    return mgpu__pwrite_fully(fd, header->data, header->len, 8);
}

/* Appends t's bytes: straight from its memory on the host, through the staging buffer (in chunks)
   from a device. A failed device copy is *r (reported); else 0 or an errno value. */
static int mgpu__stream_write_tensor(mgpu__stream *s, const mgpu_tensor *t, mgpu__stage *stage, mgpu_result *r) {
    size_t bytes = mgpu_tensor_nbytes(t), at, n;
    void *buf;
    int err;
    if (mgpu__on_host(t)) return mgpu__stream_write(s, t->data, bytes);
    for (at = 0; at < bytes; at += n) {
        n = MGPU__MIN(bytes - at, MGPU__STAGE_BYTES);
        if (!(buf = mgpu__stage_get(stage, n))) { *r = MGPU_ERR_OOM_HOST; return -1; }
        if ((*r = mgpu__tensor_get_bytes(t, at, buf, n, "mgpu_safetensors_save: copying a device tensor to the host")) != MGPU_OK) return -1;
        if ((err = mgpu__stream_write(s, buf, n)) != 0) return err;
    }
    return 0;
}

/* Writes the file atomically. With checksum_key >= 0, values[checksum_key] is replaced by the
   checksum of the data section, computed in the same pass that writes the data: the header, whose
   length does not depend on the checksum's value, is built with a placeholder and written last. */
static mgpu_result mgpu__st_save(const char *path, int n, const char *const *names, const mgpu_tensor *const *tensors,
                                 int n_meta, const char *const *keys, const char *const *values, int checksum_key) {
    const char **vals = NULL;
    char checksum[40];
    mgpu__buf header;
    mgpu__tmpfile f;
    mgpu__hash64 h;
    mgpu__stream s;
    mgpu__stage stage;
    mgpu_result r;
    size_t header_len;
    int i, err = 0;
    mgpu__buf_init(&header);
    mgpu__checksum_text(0, checksum, sizeof checksum);
    if (n_meta > 0 && values && !(vals = (const char **)mgpu__alloc(sizeof *vals * (size_t)n_meta, "safetensors metadata"))) return MGPU_ERR_OOM_HOST;
    for (i = 0; vals && i < n_meta; i++) vals[i] = i == checksum_key ? checksum : values[i];
    if ((r = mgpu__st_check_save_args(path, n, names, tensors, n_meta, keys, vals)) != MGPU_OK) { mgpu_free((void *)vals); return r; }
    if (!mgpu__st_build_header(&header, n, names, tensors, n_meta, keys, vals)) r = MGPU_ERR_OOM_HOST;
    else r = mgpu__tmpfile_open(&f, path, "mgpu_safetensors_save");
    if (r != MGPU_OK) { mgpu_free((void *)vals); mgpu__buf_free(&header); return r; }
    header_len = header.len;
    mgpu__hash64_init(&h);
    memset(&stage, 0, sizeof stage);
    /* tensor data is written straight from host tensors, device tensors a chunk at a time through
       the staging buffer: never a copy of the whole model */
    mgpu__stream_init(&s, f.fd, 8 + (uint64_t)header_len, checksum_key >= 0 ? &h : NULL);
    for (i = 0; i < n && !err; i++) err = mgpu__stream_write_tensor(&s, tensors[i], &stage, &r);
    mgpu__stage_free(&stage);
    if (err && r != MGPU_OK) { /* a device copy failed and said why: the file is abandoned, path untouched */
        mgpu__tmpfile_abort(&f);
        mgpu_free((void *)vals);
        mgpu__buf_free(&header);
        return r;
    }
    if (!err && checksum_key >= 0) {
        mgpu__checksum_text(mgpu__hash64_final(&h), checksum, sizeof checksum);
        header.len = 0;
        if (!mgpu__st_build_header(&header, n, names, tensors, n_meta, keys, vals) || header.len != header_len) err = ENOMEM;
    }
    if (!err) err = mgpu__st_write_header(f.fd, &header);
    r = mgpu__tmpfile_close(&f, err);
    mgpu_free((void *)vals);
    mgpu__buf_free(&header);
    return r;
}

MGPU_API mgpu_result mgpu_safetensors_save(const char *path, int n, const char *const *names, const mgpu_tensor *const *tensors,
                                           int n_meta, const char *const *meta_keys, const char *const *meta_values) {
    return mgpu__st_save(path, n, names, tensors, n_meta, meta_keys, meta_values, -1);
}

/* --------------------------------------------------------------------------------------
   Model save/load: parameters then buffers under their state_dict names
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__model_tensors { int n; const char **names; mgpu_tensor **tensors; } mgpu__model_tensors;

static void mgpu__model_tensors_free(mgpu__model_tensors *mt) { mgpu_free(mt->names); mgpu_free((void *)mt->tensors); }

static mgpu_result mgpu__model_tensors_collect(const mgpu_model *m, mgpu__model_tensors *mt, const char *fn) {
    int np = mgpu_model_num_parameters(m), nb = mgpu_model_num_buffers(m), i;
    mt->n = np + nb;
    mt->names = (const char **)mgpu__alloc(sizeof *mt->names * (size_t)(mt->n + 1), "the model's tensor list");
    mt->tensors = (mgpu_tensor **)mgpu__alloc(sizeof *mt->tensors * (size_t)(mt->n + 1), "the model's tensor list");
    if (!mt->names || !mt->tensors) return MGPU_ERR_OOM_HOST;
    for (i = 0; i < mt->n; i++) {
        mt->names[i] = NULL;
        mt->tensors[i] = i < np ? mgpu_model_parameter(m, i, &mt->names[i]) : mgpu_model_buffer(m, i - np, &mt->names[i]);
        if (!mt->tensors[i] || !mt->names[i])
            return mgpu__fail(MGPU_ERR_STATE, "%s: the model's %s %d could not be listed", fn, i < np ? "parameter" : "buffer", i < np ? i : i - np);
    }
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_model_save(const mgpu_model *m, const char *path) {
    static const char *const meta_key[1] = {"format"}, *const meta_value[1] = {"pt"};
    mgpu__model_tensors mt;
    mgpu_result r;
    if (!m || !path) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_model_save: model and path must not be NULL");
    memset(&mt, 0, sizeof mt);
    r = mgpu__model_tensors_collect(m, &mt, "mgpu_model_save");
    if (r == MGPU_OK)
        r = mgpu_safetensors_save(path, mt.n, mt.names, (const mgpu_tensor *const *)mt.tensors, 1, meta_key, meta_value);
    mgpu__model_tensors_free(&mt);
    return r;
}

/* Every model tensor present with a fitting shape and dtype, and nothing else in the file. */
static mgpu_result mgpu__model_check_file(const mgpu_safetensors *st, const mgpu__model_tensors *mt) {
    char *seen = (char *)mgpu__calloc((size_t)st->n + 1, "model load bookkeeping");
    mgpu_result r = MGPU_OK;
    int i;
    if (!seen) return MGPU_ERR_OOM_HOST;
    for (i = 0; i < mt->n && r == MGPU_OK; i++) {
        const mgpu_safetensors_entry *e = mgpu_safetensors_find(st, mt->names[i]);
        if (!e) r = mgpu__st_error(MGPU_ERR_FORMAT, st->label, mt->names[i], "missing from the file (the model has it, shape %s)", mgpu__shape_str(mt->tensors[i]));
        else if ((r = mgpu__st_check_fits(st->label, e, mt->tensors[i])) == MGPU_OK) seen[(const mgpu__st_item *)(const void *)e - st->items] = 1;
    }
    for (i = 0; i < st->n && r == MGPU_OK; i++)
        if (!seen[i]) r = mgpu__st_error(MGPU_ERR_FORMAT, st->label, st->items[i].e.name, "unexpected: the model has no tensor of that name");
    mgpu_free(seen);
    return r;
}

MGPU_API mgpu_result mgpu_model_load(mgpu_model *m, const char *path) {
    mgpu__model_tensors mt;
    mgpu_safetensors *st = NULL;
    mgpu__stage stage;
    mgpu_result r;
    int i;
    if (!m || !path) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_model_load: model and path must not be NULL");
    memset(&mt, 0, sizeof mt);
    r = mgpu__model_tensors_collect(m, &mt, "mgpu_model_load");
    if (r == MGPU_OK && !(st = mgpu_safetensors_open(path))) r = mgpu_last_result();
    /* validate everything before touching the model, so a bad file loads nothing */
    if (r == MGPU_OK) r = mgpu__model_check_file(st, &mt);
    memset(&stage, 0, sizeof stage);
    for (i = 0; i < mt.n && r == MGPU_OK; i++) r = mgpu__st_copy(mgpu_safetensors_find(st, mt.names[i]), mt.tensors[i], &stage);
    mgpu__stage_free(&stage);
    mgpu_safetensors_close(st);
    mgpu__model_tensors_free(&mt);
    return r;
}

/* --------------------------------------------------------------------------------------
   Common training options: every string is parsed here, once, into typed fields
   -------------------------------------------------------------------------------------- */

typedef enum mgpu__opt_kind {
    MGPU__OPT_STRING,   /* non-empty text, kept by pointer */
    MGPU__OPT_ENUM,     /* one of `choices`, stored as its index in an enum field */
    MGPU__OPT_SCHEDULE, /* mgpu_schedule_parse */
    MGPU__OPT_DEVICE,   /* cpu|cuda|cuda:N|auto into device and device_index (a CPU build still parses "cuda") */
    MGPU__OPT_GPU_IDS,  /* comma-separated device indices into gpu_ids and num_gpu_ids */
    MGPU__OPT_RESUME,   /* none|auto|PATH into resume and resume_path */
    MGPU__OPT_FLAG,     /* an int 0|1: the bare flag sets it, --flag=0|1 (or false|true) spells it out */
    MGPU__OPT_INT, MGPU__OPT_I64, MGPU__OPT_U64, MGPU__OPT_FLOAT
} mgpu__opt_kind;

typedef struct mgpu__opt {
    const char *flag;     /* without the leading "--" */
    mgpu__opt_kind kind;
    size_t offset;        /* of the field in mgpu_train_opts */
    double lo, hi;        /* numeric range; no upper bound when hi < lo */
    int lo_open;          /* lo itself excluded */
    const char *choices;  /* "a|b|c" for ENUM and SCHEDULE, in the order of the enum's values */
    const char *metavar;
    const char *help;
} mgpu__opt;

/* ENUM fields are written through an int pointer, the choice's index being the enum's value. */
typedef char mgpu__enum_fields_are_int[(sizeof(mgpu_optimizer_type) == sizeof(int) && sizeof(mgpu_lr_scaling) == sizeof(int) &&
                                        sizeof(mgpu_schedule_type) == sizeof(int) && sizeof(mgpu_amp_mode) == sizeof(int) &&
                                        sizeof(mgpu_multi_gpu_mode) == sizeof(int) && sizeof(mgpu_grad_compression) == sizeof(int) &&
                                        sizeof(mgpu_cuda_graph_mode) == sizeof(int) && sizeof(mgpu_data_on_device) == sizeof(int)) ? 1 : -1];
typedef char mgpu__enum_choice_order[(MGPU_OPTIM_SGD == 0 && MGPU_OPTIM_ADAM == 1 && MGPU_OPTIM_ADAMW == 2 && MGPU_LR_SCALE_NONE == 0 &&
                                      MGPU_LR_SCALE_LINEAR == 1 && MGPU_LR_SCALE_SQRT == 2 && MGPU_AMP_OFF == 0 && MGPU_AMP_FP16 == 1 &&
                                      MGPU_AMP_BF16 == 2 && MGPU_MULTI_GPU_AUTO == 0 && MGPU_MULTI_GPU_NONE == 1 && MGPU_MULTI_GPU_DP == 2 &&
                                      MGPU_MULTI_GPU_DDP == 3 && MGPU_GRAD_COMPRESSION_NONE == 0 && MGPU_GRAD_COMPRESSION_FP16 == 1 &&
                                      MGPU_GRAD_COMPRESSION_BF16 == 2 && MGPU_CUDA_GRAPH_ON == 0 && MGPU_CUDA_GRAPH_OFF == 1 &&
                                      MGPU_DATA_ON_DEVICE_OFF == 0 && MGPU_DATA_ON_DEVICE_ON == 1 && MGPU_DATA_ON_DEVICE_AUTO == 2) ? 1 : -1];

#define MGPU__OF(field) offsetof(mgpu_train_opts, field)
static const mgpu__opt mgpu__train_opts_table[] = {
    {"data", MGPU__OPT_STRING, MGPU__OF(data_dir), 0, -1, 0, NULL, "DIR", "dataset directory (unset: $MGPU_DATA, then data/fashion-mnist, then /usr/share/datasets/fashion-mnist)"},
    {"epochs", MGPU__OPT_INT, MGPU__OF(epochs), 1, -1, 0, NULL, "N", "passes over the training set (also --num-epochs)"},
    {"batch-size", MGPU__OPT_I64, MGPU__OF(batch_size), 1, -1, 0, NULL, "N", "samples per step, per process"},
    {"lr", MGPU__OPT_FLOAT, MGPU__OF(lr), 0, -1, 1, NULL, "LR", "base learning rate (before --scale-lr)"},
    {"optimizer", MGPU__OPT_ENUM, MGPU__OF(optimizer), 0, 0, 0, "sgd|adam|adamw", "NAME", "optimizer"},
    {"weight-decay", MGPU__OPT_FLOAT, MGPU__OF(weight_decay), 0, -1, 0, NULL, "WD", "weight decay (decoupled for adamw, L2 otherwise)"},
    {"momentum", MGPU__OPT_FLOAT, MGPU__OF(momentum), 0, 1, 0, NULL, "M", "SGD momentum"},
    {"warmup-epochs", MGPU__OPT_FLOAT, MGPU__OF(warmup_epochs), 0, -1, 0, NULL, "E", "linear LR warmup, in epochs (fractions allowed)"},
    {"schedule", MGPU__OPT_SCHEDULE, MGPU__OF(schedule), 0, 0, 0, "constant|linear|cosine|cosine-restarts|step", "NAME", "LR schedule after warmup"},
    {"scale-lr", MGPU__OPT_ENUM, MGPU__OF(scale_lr), 0, 0, 0, "none|linear|sqrt", "RULE", "scale the LR by world size x accumulation steps"},
    {"grad-accum-steps", MGPU__OPT_INT, MGPU__OF(grad_accum_steps), 1, -1, 0, NULL, "N", "micro-batches per optimizer step"},
    {"clip-grad-norm", MGPU__OPT_FLOAT, MGPU__OF(clip_grad_norm), 0, -1, 0, NULL, "NORM", "clip the global gradient norm (0: off)"},
    {"amp", MGPU__OPT_ENUM, MGPU__OF(amp), 0, 0, 0, "off|fp16|bf16", "MODE", "mixed precision"},
    {"device", MGPU__OPT_DEVICE, MGPU__OF(device), 0, 0, 0, NULL, "DEV",
     "cpu, cuda (cuda:0), cuda:N or auto\nauto: a GPU when this build's CUDA backend sees one, else the CPU"},
    {"gpu-ids", MGPU__OPT_GPU_IDS, MGPU__OF(gpu_ids), 0, 0, 0, NULL, "LIST",
     "the GPUs to use, e.g. 0,1,3 (unset: every visible one)\n"
     "auto/ddp: local rank i trains on the i-th id; dp: one replica per id (required with dp)"},
    {"multi-gpu", MGPU__OPT_ENUM, MGPU__OF(multi_gpu), 0, 0, 0, "auto|none|dp|ddp", "MODE",
     "how to use several GPUs (or processes)\n"
     "auto: under a launcher (WORLD_SIZE set) DDP; else, on a GPU with several to use (--gpu-ids, or\n"
     "every visible one), start one DDP worker process per GPU (only rank 0's output is shown; one\n"
     "failing stops all); with one GPU, or on the CPU, plain training in this process\n"
     "none (or --no-multi-gpu): one process on one device (an error under a launcher with WORLD_SIZE > 1)\n"
     "dp: one process, one replica per --gpu-ids entry, each on a thread of its own\n"
     "ddp: DDP, needs a launcher that sets WORLD_SIZE (mgpurun, srun; WORLD_SIZE=1: world size 1)\n"
     "the LR is not scaled with the number of GPUs unless --scale-lr says so"},
    {"num-workers", MGPU__OPT_INT, MGPU__OF(num_workers), 0, 256, 0, NULL, "N", "data loader threads (0: load on the training thread)"},
    {"eval-frequency", MGPU__OPT_INT, MGPU__OF(eval_frequency), 0, -1, 0, NULL, "N", "evaluate every N epochs (0: only after the last)"},
    {"save-dir", MGPU__OPT_STRING, MGPU__OF(save_dir), 0, -1, 0, NULL, "DIR", "checkpoint and final model directory (unset: no saving)"},
    {"checkpoint-every-epochs", MGPU__OPT_INT, MGPU__OF(checkpoint_every_epochs), 0, -1, 0, NULL, "N", "checkpoint every N epochs (0: off)"},
    {"checkpoint-interval-min", MGPU__OPT_FLOAT, MGPU__OF(checkpoint_interval_min), 0, -1, 0, NULL, "MIN", "checkpoint every MIN minutes of wall time (0: off)"},
    {"keep-last", MGPU__OPT_INT, MGPU__OF(keep_last), 0, -1, 0, NULL, "N", "checkpoints to keep (0: all)"},
    {"resume", MGPU__OPT_RESUME, MGPU__OF(resume), 0, -1, 0, NULL, "WHAT", "auto (latest in --save-dir), none, or a checkpoint or save directory"},
    {"eval-only", MGPU__OPT_FLAG, MGPU__OF(eval_only), 0, 1, 0, NULL, "",
     "evaluate on the test set and exit; nothing is trained\n"
     "the model of --resume (a checkpoint or save directory), else of --init-from, else as initialised"},
    {"init-from", MGPU__OPT_STRING, MGPU__OF(init_from), 0, -1, 0, NULL, "FILE",
     "start from the weights in FILE (.safetensors), with a fresh optimizer\n"
     "PyTorch's save_file(model.state_dict(), FILE) or an mgpu model.safetensors: every tensor of\n"
     "the model under its state_dict name and shape, nothing else (a checkpoint --resume finds wins)"},
    {"seed", MGPU__OPT_U64, MGPU__OF(seed), 0, -1, 0, NULL, "N", "random seed (init, shuffling, dropout)"},
    {"metrics", MGPU__OPT_STRING, MGPU__OF(metrics), 0, -1, 0, NULL, "FILE", "append one JSON line per epoch to FILE (unset: $MGPU_METRICS, else off)"},
    {"log-every", MGPU__OPT_INT, MGPU__OF(log_every), 0, -1, 0, NULL, "N", "progress line every N steps when not on a terminal (0: epoch end only)"},
    {"max-steps", MGPU__OPT_I64, MGPU__OF(max_steps), 0, -1, 0, NULL, "N", "stop after N optimizer steps (0: no limit)"},
    {"checkpoint-every-steps", MGPU__OPT_I64, MGPU__OF(checkpoint_every_steps), 0, -1, 0, NULL, "N", "checkpoint every N optimizer steps (0: off)"},
    {"sync-batchnorm", MGPU__OPT_INT, MGPU__OF(sync_batchnorm), 0, 1, 0, NULL, "0|1", "DDP: batch-norm statistics over all ranks (SyncBatchNorm)"},
    {"bucket-cap-mb", MGPU__OPT_FLOAT, MGPU__OF(bucket_cap_mb), 0, -1, 0, NULL, "MB", "DDP: gradient bucket size (0: 25)"},
    {"grad-compression", MGPU__OPT_ENUM, MGPU__OF(grad_compression), 0, 0, 0, "none|fp16|bf16", "MODE", "DDP: round gradients for the all-reduce"},
    {"t0-epochs", MGPU__OPT_FLOAT, MGPU__OF(t0_epochs), 0, -1, 1, NULL, "E", "cosine-restarts: first period, in epochs"},
    {"t-mult", MGPU__OPT_INT, MGPU__OF(t_mult), 1, -1, 0, NULL, "N", "cosine-restarts: period multiplier"},
    {"eta-min", MGPU__OPT_FLOAT, MGPU__OF(eta_min), 0, -1, 0, NULL, "LR", "lowest LR of linear/cosine schedules"},
    {"step-size-epochs", MGPU__OPT_FLOAT, MGPU__OF(step_size_epochs), 0, -1, 1, NULL, "E", "step schedule: epochs between LR drops"},
    {"gamma", MGPU__OPT_FLOAT, MGPU__OF(gamma), 0, -1, 1, NULL, "G", "step schedule: LR factor per drop"},
    {"cuda-graph", MGPU__OPT_ENUM, MGPU__OF(cuda_graph), 0, 0, 0, "on|off", "MODE",
     "CUDA: capture the training step as a CUDA Graph and replay it (default on; the CPU ignores it)\n"
     "captured after 2 eager warm-up steps; stays eager, saying why on the startup line, with --amp fp16,\n"
     "DDP/DP, --grad-accum-steps > 1, or a step that cannot be captured"},
    {"data-on-device", MGPU__OPT_ENUM, MGPU__OF(data_on_device), 0, 0, 0, "off|on|auto", "MODE",
     "CUDA: keep the training set on the GPU and gather each batch there\n"
     "auto: on when the dataset is static and takes at most 1/4 of the free device memory;\n"
     "off: stream batches from pinned host memory; on with --device cpu is an error"},
};
#undef MGPU__OF
#define MGPU__N_TRAIN_OPTS ((int)(sizeof mgpu__train_opts_table / sizeof mgpu__train_opts_table[0]))
/* Flags without a value that stand for a flag with one ("--no-multi-gpu" is "--multi-gpu none"). */
static const char *const mgpu__train_opts_switches[][3] = {{"no-multi-gpu", "multi-gpu", "none"}};
#define MGPU__N_TRAIN_OPT_SWITCHES ((int)(sizeof mgpu__train_opts_switches / sizeof mgpu__train_opts_switches[0]))
/* Other spellings PyTorch scripts use for a flag (underscores are accepted for every flag). */
static const char *const mgpu__train_opts_aliases[][2] = {{"num-epochs", "epochs"}};
#define MGPU__N_TRAIN_OPT_ALIASES ((int)(sizeof mgpu__train_opts_aliases / sizeof mgpu__train_opts_aliases[0]))
/* Room for any option's value as text (the longest: 64 gpu ids). */
#define MGPU__OPT_TEXT_MAX 512

MGPU_API void mgpu_train_opts_default(mgpu_train_opts *o) {
    if (!o) return;
    memset(o, 0, sizeof *o);
    o->epochs = 10; o->batch_size = 128; o->lr = 1e-3f;
    o->optimizer = MGPU_OPTIM_ADAMW; o->weight_decay = 1e-4f; o->momentum = 0.9f;
    o->schedule = MGPU_SCHEDULE_CONSTANT; o->scale_lr = MGPU_LR_SCALE_NONE;
    o->grad_accum_steps = 1;
    o->amp = MGPU_AMP_OFF; o->device = MGPU_DEVICE_KIND_AUTO; o->device_index = -1; o->multi_gpu = MGPU_MULTI_GPU_AUTO;
    o->resume = MGPU_RESUME_NONE; o->grad_compression = MGPU_GRAD_COMPRESSION_NONE; o->data_on_device = MGPU_DATA_ON_DEVICE_AUTO;
    o->eval_frequency = 1; o->keep_last = 3; o->log_every = 100;
    o->t0_epochs = 1; o->t_mult = 2; o->eta_min = 0; o->step_size_epochs = 30; o->gamma = 0.1f;
    /* the default --metrics: how mgpu-sweep (or a batch script) gives each run its own file */
    if (getenv("MGPU_METRICS") && getenv("MGPU_METRICS")[0]) o->metrics = getenv("MGPU_METRICS");
}

/* Index of value in "a|b|c", or -1. */
static int mgpu__choice_index(const char *choices, const char *value) {
    size_t n = strlen(value);
    int i = 0;
    const char *c = choices;
    while (c) {
        const char *bar = strchr(c, '|');
        size_t len = bar ? (size_t)(bar - c) : strlen(c);
        if (len == n && strncmp(c, value, n) == 0) return i;
        c = bar ? bar + 1 : NULL;
        i++;
    }
    return -1;
}
/* The i-th word of "a|b|c" into buf. */
static const char *mgpu__choice_name(const char *choices, int index, char *buf, size_t size) {
    const char *c = choices;
    int i;
    for (i = 0; i < index && c; i++) { c = strchr(c, '|'); if (c) c++; }
    if (!c || index < 0) return "?";
    snprintf(buf, size, "%.*s", (int)(strchr(c, '|') ? (size_t)(strchr(c, '|') - c) : strlen(c)), c);
    return buf;
}
/* "off", "fp16" or "bf16" (metrics records name the mode). */
static const char *mgpu__amp_mode_name(mgpu_amp_mode mode) {
    return mode == MGPU_AMP_FP16 ? "fp16" : mode == MGPU_AMP_BF16 ? "bf16" : "off";
}

/* cpu|cuda|cuda:N|auto, syntax only: a CPU build must still parse "cuda" (the trainer says it has no CUDA). */
static int mgpu__device_opt_parse(const char *v, mgpu_device_kind *kind, int *index) {
    const char *d;
    int n = 0;
    if (strcmp(v, "cpu") == 0) { *kind = MGPU_DEVICE_KIND_CPU; *index = -1; return 1; }
    if (strcmp(v, "auto") == 0) { *kind = MGPU_DEVICE_KIND_AUTO; *index = -1; return 1; }
    if (strcmp(v, "cuda") == 0) { *kind = MGPU_DEVICE_KIND_CUDA; *index = -1; return 1; }
    if (strncmp(v, "cuda:", 5) != 0 || !v[5] || strlen(v + 5) > 4) return 0;
    for (d = v + 5; *d; d++) {
        if (!mgpu__is_digit(*d)) return 0;
        n = n * 10 + (*d - '0');
    }
    *kind = MGPU_DEVICE_KIND_CUDA; *index = n;
    return 1;
}
/* "0,1,3": at most MGPU_MAX_GPU_IDS indices of at most 4 digits each. */
static int mgpu__gpu_ids_parse(const char *v, int *ids, int *count) {
    int digits = 0, n = 0, value = 0;
    for (;; v++) {
        if (mgpu__is_digit(*v)) { if (++digits > 4) return 0; value = value * 10 + (*v - '0'); continue; }
        if (digits == 0 || (*v != ',' && *v != 0) || n == MGPU_MAX_GPU_IDS) return 0;
        ids[n++] = value;
        if (*v == 0) { *count = n; return 1; }
        digits = 0; value = 0;
    }
}

/* Text parsers with full consumption; integers accept an optional sign, no spaces. */
static int mgpu__parse_ll(const char *v, long long *out) {
    char *end = NULL;
    if (!(mgpu__is_digit(v[0]) || ((v[0] == '-' || v[0] == '+') && mgpu__is_digit(v[1])))) return 0;
    errno = 0;
    *out = strtoll(v, &end, 10);
    return errno == 0 && *end == 0;
}
static int mgpu__parse_double(const char *v, double *out) {
    char *end = NULL;
    if (!(mgpu__is_digit(v[0]) || v[0] == '.' || v[0] == '-' || v[0] == '+')) return 0;
    errno = 0;
    *out = strtod(v, &end);
    return errno == 0 && *end == 0 && isfinite(*out);
}

static int mgpu__opt_in_range(const mgpu__opt *s, double v) {
    if (s->lo_open ? !(v > s->lo) : !(v >= s->lo)) return 0;
    return s->hi < s->lo || v <= s->hi;
}
/* "an integer >= 1", "a number in [0, 1]", "one of a|b" for messages. */
static void mgpu__opt_expected(const mgpu__opt *s, char *buf, size_t size) {
    const char *what = s->kind == MGPU__OPT_FLOAT ? "a number" : "an integer";
    if (s->choices) snprintf(buf, size, "one of %s", s->choices);
    else if (s->kind == MGPU__OPT_DEVICE) snprintf(buf, size, "cpu, cuda, cuda:N or auto");
    else if (s->kind == MGPU__OPT_GPU_IDS) snprintf(buf, size, "comma-separated device indices such as 0,1,3 (at most %d)", MGPU_MAX_GPU_IDS);
    else if (s->kind == MGPU__OPT_RESUME) snprintf(buf, size, "auto, none or a checkpoint path");
    else if (s->kind == MGPU__OPT_STRING) snprintf(buf, size, "a non-empty value");
    else if (s->kind == MGPU__OPT_FLAG) snprintf(buf, size, "nothing, or =0|1");
    else if (s->hi >= s->lo) snprintf(buf, size, "%s in [%g, %g]", what, s->lo, s->hi);
    else snprintf(buf, size, "%s %s %g", what, s->lo_open ? ">" : ">=", s->lo);
}

/* Parses value into the field(s) of spec; 0 if the value is bad (the options are then unchanged). */
static int mgpu__opt_set(mgpu_train_opts *o, const mgpu__opt *s, const char *value) {
    void *field = (char *)o + s->offset;
    long long iv = 0;
    double dv = 0;
    int idx, ids[MGPU_MAX_GPU_IDS], n = 0;
    mgpu_device_kind kind = MGPU_DEVICE_KIND_AUTO;
    mgpu_schedule_type sched = MGPU_SCHEDULE_CONSTANT;
    switch (s->kind) {
    case MGPU__OPT_STRING:
        if (!value[0]) return 0;
        *(const char **)field = value;   /* argv's pointer */
        return 1;
    case MGPU__OPT_ENUM:
        if ((idx = mgpu__choice_index(s->choices, value)) < 0) return 0;
        *(int *)field = idx;
        return 1;
    case MGPU__OPT_SCHEDULE:
        if (mgpu_schedule_parse(value, &sched) != MGPU_OK) return 0;
        *(mgpu_schedule_type *)field = sched;
        return 1;
    case MGPU__OPT_DEVICE:
        if (!mgpu__device_opt_parse(value, &kind, &idx)) return 0;
        o->device = kind; o->device_index = idx;
        return 1;
    case MGPU__OPT_GPU_IDS:
        if (!mgpu__gpu_ids_parse(value, ids, &n)) return 0;
        memcpy(o->gpu_ids, ids, sizeof(int) * (size_t)n);
        o->num_gpu_ids = n;
        return 1;
    case MGPU__OPT_RESUME:
        if (!value[0]) return 0;
        o->resume = strcmp(value, "none") == 0 ? MGPU_RESUME_NONE : strcmp(value, "auto") == 0 ? MGPU_RESUME_AUTO : MGPU_RESUME_PATH;
        o->resume_path = o->resume == MGPU_RESUME_PATH ? value : NULL;
        return 1;
    case MGPU__OPT_FLAG:
        if (strcmp(value, "1") == 0 || strcmp(value, "true") == 0) *(int *)field = 1;
        else if (strcmp(value, "0") == 0 || strcmp(value, "false") == 0) *(int *)field = 0;
        else return 0;
        return 1;
    case MGPU__OPT_INT:
        if (!mgpu__parse_ll(value, &iv) || iv < INT_MIN || iv > INT_MAX || !mgpu__opt_in_range(s, (double)iv)) return 0;
        *(int *)field = (int)iv;
        return 1;
    case MGPU__OPT_I64:
        if (!mgpu__parse_ll(value, &iv) || !mgpu__opt_in_range(s, (double)iv)) return 0;
        *(int64_t *)field = (int64_t)iv;
        return 1;
    case MGPU__OPT_U64: {
        char *end = NULL;
        unsigned long long u;
        if (!mgpu__is_digit(value[0])) return 0;
        errno = 0;
        u = strtoull(value, &end, 10);
        if (errno || *end) return 0;
        *(uint64_t *)field = (uint64_t)u;
        return 1;
    }
    case MGPU__OPT_FLOAT:
        if (!mgpu__parse_double(value, &dv) || fabs(dv) > FLT_MAX || !mgpu__opt_in_range(s, dv)) return 0;
        *(float *)field = (float)dv;
        return 1;
    }
    return 0;
}

/* name (len bytes, without "--") with underscores read as dashes, into norm (64 bytes); 0 if too long. */
static int mgpu__opt_normalize(const char *name, size_t len, char norm[64]) {
    size_t k;
    if (len >= 64) return 0;
    for (k = 0; k < len; k++) norm[k] = name[k] == '_' ? '-' : name[k];
    norm[len] = 0;
    return 1;
}

/* The flag spelt name (len bytes, without "--"): underscores read as dashes, aliases resolved. */
static const mgpu__opt *mgpu__opt_find(const char *name, size_t len) {
    char norm[64];
    int i;
    if (!mgpu__opt_normalize(name, len, norm)) return NULL;
    for (i = 0; i < MGPU__N_TRAIN_OPT_ALIASES; i++)
        if (strcmp(norm, mgpu__train_opts_aliases[i][0]) == 0) return mgpu__opt_find(mgpu__train_opts_aliases[i][1], strlen(mgpu__train_opts_aliases[i][1]));
    for (i = 0; i < MGPU__N_TRAIN_OPTS; i++)
        if (strcmp(mgpu__train_opts_table[i].flag, norm) == 0) return &mgpu__train_opts_table[i];
    return NULL;
}

/* Levenshtein distance of two short strings (at most 63 bytes each, longer ones are far apart). */
static int mgpu__edit_distance(const char *a, const char *b) {
    int row[64], la = (int)strlen(a), lb = (int)strlen(b), i, j;
    if (la > 63 || lb > 63) return 64;
    for (j = 0; j <= lb; j++) row[j] = j;
    for (i = 1; i <= la; i++) {
        int diag = row[0];
        row[0] = i;
        for (j = 1; j <= lb; j++) {
            int up = row[j], best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            diag = up;
            row[j] = best;
        }
    }
    return row[lb];
}
/* The flag (or alias) closest to an unknown one, or NULL when none is close: within 1 edit, one
   more per 6 characters (at most 3), or the only flag the name begins. */
static const char *mgpu__opt_suggest(const char *name, size_t len) {
    char norm[64];
    const char *best = NULL, *prefix = NULL;
    int i, d, best_d = 64, prefixes = 0, limit;
    if (len == 0 || !mgpu__opt_normalize(name, len, norm)) return NULL;
    for (i = 0; i < MGPU__N_TRAIN_OPTS + MGPU__N_TRAIN_OPT_ALIASES; i++) {
        const char *flag = i < MGPU__N_TRAIN_OPTS ? mgpu__train_opts_table[i].flag : mgpu__train_opts_aliases[i - MGPU__N_TRAIN_OPTS][0];
        if ((d = mgpu__edit_distance(norm, flag)) < best_d) { best_d = d; best = flag; }
        if (len >= 3 && strncmp(flag, norm, len) == 0) { prefixes++; prefix = flag; }
    }
    limit = 1 + (int)len / 6;
    if (limit > 3) limit = 3;
    if (best_d <= limit && best_d < (int)len) return best;
    return prefixes == 1 ? prefix : NULL;
}

/* Records the error and prints it as "program: error: ..." (the API promises the print). */
static mgpu_result mgpu__opt_error(const char *program, const char *fmt, ...) MGPU__PRINTF(2, 3);
static mgpu_result mgpu__opt_error(const char *program, const char *fmt, ...) {
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    mgpu__fail(MGPU_ERR_INVALID_ARG, "%s", msg);
    fprintf(stderr, "%s: error: %s (see --help)\n", program, msg);
    return MGPU_ERR_INVALID_ARG;
}

static const char *mgpu__program_name(int argc, char **argv) {
    const char *slash;
    if (argc < 1 || !argv[0] || !argv[0][0]) return "mgpu";
    slash = strrchr(argv[0], '/');
    return slash ? slash + 1 : argv[0];
}

/* A switch (a flag that takes no value) spelt arg: its flag and value set, 1; 0 if arg is none. */
static int mgpu__opt_switch(mgpu_train_opts *o, const char *arg) {
    char norm[64];
    int i;
    if (strncmp(arg, "--", 2) != 0 || !mgpu__opt_normalize(arg + 2, strlen(arg + 2), norm)) return 0;
    for (i = 0; i < MGPU__N_TRAIN_OPT_SWITCHES; i++)
        if (strcmp(norm, mgpu__train_opts_switches[i][0]) == 0) {
            const char *flag = mgpu__train_opts_switches[i][1];
            return mgpu__opt_set(o, mgpu__opt_find(flag, strlen(flag)), mgpu__train_opts_switches[i][2]);
        }
    return 0;
}

MGPU_API mgpu_result mgpu_train_opts_parse(mgpu_train_opts *o, int argc, char **argv) {
    const char *prog;
    int i;
    if (!o || argc < 0 || (argc > 0 && !argv)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_train_opts_parse: o and argv must not be NULL");
    prog = mgpu__program_name(argc, argv);
    o->argc = argc; o->argv = argv;
    for (i = 1; i < argc; i++) {
        const char *arg = argv[i] ? argv[i] : "", *eq, *value, *hint;
        const mgpu__opt *s;
        char expected[160];
        size_t name_len;
        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            o->help = 1;
            mgpu_train_opts_usage(stdout, prog);
            return MGPU_OK;
        }
        if (strncmp(arg, "--", 2) != 0) return mgpu__opt_error(prog, "unexpected argument '%s' (options start with --)", arg);
        if (mgpu__opt_switch(o, arg)) continue;
        eq = strchr(arg, '=');
        name_len = eq ? (size_t)(eq - arg - 2) : strlen(arg + 2);
        if (!(s = mgpu__opt_find(arg + 2, name_len))) {
            if ((hint = mgpu__opt_suggest(arg + 2, name_len)) != NULL)
                return mgpu__opt_error(prog, "unknown option '%.*s'; did you mean --%s?", (int)name_len + 2, arg, hint);
            return mgpu__opt_error(prog, "unknown option '%.*s'", (int)name_len + 2, arg);
        }
        if (eq) value = eq + 1;
        else if (s->kind == MGPU__OPT_FLAG) value = "1";   /* a bare switch: the next word is not its value */
        else if (i + 1 < argc && argv[i + 1] && strncmp(argv[i + 1], "--", 2) != 0) value = argv[++i];
        else return mgpu__opt_error(prog, "option --%s needs a value", s->flag);
        if (!mgpu__opt_set(o, s, value)) {
            mgpu__opt_expected(s, expected, sizeof expected);
            return mgpu__opt_error(prog, "invalid value '%s' for --%s (expected %s)", value, s->flag, expected);
        }
    }
    return MGPU_OK;
}

/* A field's current value as text (buf: MGPU__OPT_TEXT_MAX bytes), for the usage's defaults and
   the options saved with a checkpoint; NULL: unset. */
static const char *mgpu__opt_value_text(const mgpu_train_opts *o, const mgpu__opt *s, char *buf, size_t size) {
    const void *field = (const char *)o + s->offset;
    size_t at;
    int i;
    switch (s->kind) {
    case MGPU__OPT_ENUM: case MGPU__OPT_SCHEDULE: return mgpu__choice_name(s->choices, *(const int *)field, buf, size);
    case MGPU__OPT_INT: case MGPU__OPT_FLAG: snprintf(buf, size, "%d", *(const int *)field); return buf;
    case MGPU__OPT_I64: snprintf(buf, size, "%lld", (long long)*(const int64_t *)field); return buf;
    case MGPU__OPT_U64: snprintf(buf, size, "%llu", (unsigned long long)*(const uint64_t *)field); return buf;
    case MGPU__OPT_FLOAT: snprintf(buf, size, "%g", (double)*(const float *)field); return buf;
    case MGPU__OPT_STRING: return *(const char *const *)field;
    case MGPU__OPT_DEVICE:
        if (o->device == MGPU_DEVICE_KIND_CPU) return "cpu";
        if (o->device != MGPU_DEVICE_KIND_CUDA) return "auto";
        if (o->device_index < 0) return "cuda";
        snprintf(buf, size, "cuda:%d", o->device_index);
        return buf;
    case MGPU__OPT_GPU_IDS:
        if (o->num_gpu_ids <= 0 || size == 0) return NULL;
        buf[0] = 0;
        for (i = 0, at = 0; i < o->num_gpu_ids && i < MGPU_MAX_GPU_IDS && at < size; i++)
            at += (size_t)snprintf(buf + at, size - at, i ? ",%d" : "%d", o->gpu_ids[i]);
        return buf;
    case MGPU__OPT_RESUME:
        return o->resume == MGPU_RESUME_AUTO ? "auto" : o->resume == MGPU_RESUME_PATH ? o->resume_path : "none";
    }
    return NULL;
}

MGPU_API void mgpu_train_opts_usage(FILE *out, const char *program) {
    mgpu_train_opts d;
    char flag[64], value[MGPU__OPT_TEXT_MAX];
    int i;
    if (!out) return;
    mgpu_train_opts_default(&d);
    fprintf(out, "usage: %s [options]\n\noptions (each also accepted as --flag=value, and with underscores: --batch_size):\n",
            program ? program : "mgpu");
    for (i = 0; i < MGPU__N_TRAIN_OPTS; i++) {
        const mgpu__opt *s = &mgpu__train_opts_table[i];
        const char *def = mgpu__opt_value_text(&d, s, value, sizeof value);
        const char *more = strchr(s->help, '\n');   /* lines after the first: details, indented */
        snprintf(flag, sizeof flag, s->metavar[0] ? "--%s %s" : "--%s", s->flag, s->metavar);
        fprintf(out, "  %-30s %.*s", flag, more ? (int)(more - s->help) : (int)strlen(s->help), s->help);
        if (s->choices) fprintf(out, ": %s", s->choices);
        /* unset text options explain their fallback in the help itself */
        if (def && s->kind != MGPU__OPT_FLAG) fprintf(out, " (default: %s)", def);   /* a switch is off unless given */
        fputc('\n', out);
        while (more) {
            const char *next = strchr(more + 1, '\n');
            fprintf(out, "  %-30s %.*s\n", "", next ? (int)(next - more - 1) : (int)strlen(more + 1), more + 1);
            more = next;
        }
    }
    for (i = 0; i < MGPU__N_TRAIN_OPT_SWITCHES; i++) {
        snprintf(flag, sizeof flag, "--%s", mgpu__train_opts_switches[i][0]);
        fprintf(out, "  %-30s the same as --%s %s\n", flag, mgpu__train_opts_switches[i][1], mgpu__train_opts_switches[i][2]);
    }
    fprintf(out, "  %-30s %s\n", "--help", "show this help and exit");
}

/* --------------------------------------------------------------------------------------
   Metrics: one JSON object per line, appended and fsynced
   -------------------------------------------------------------------------------------- */

struct mgpu_metrics { FILE *f; char *path; };

MGPU_API mgpu_metrics *mgpu_metrics_open(const char *path) {
    mgpu_metrics *m;
    if (path && !path[0]) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_metrics_open: path is empty");
    m = (mgpu_metrics *)mgpu__calloc(sizeof *m, "a metrics writer");
    if (!m || !path) return m; /* no path: a writer that writes nothing (ranks other than 0) */
    m->path = mgpu__strdup(path);
    m->f = m->path ? fopen(path, "a") : NULL;
    if (!m->f) {
        if (m->path) mgpu__fail(MGPU_ERR_IO, "mgpu_metrics_open: cannot open '%s' for appending: %s", path, strerror(errno));
        mgpu_metrics_close(m);
        return NULL;
    }
    return m;
}

/* Ends the object with extra members (validated as JSON first), then appends the line durably. */
static mgpu_result mgpu__metrics_finish_line(mgpu_metrics *m, mgpu__buf *line, const char *extra_json, const char *fn) {
    int err;
    if (extra_json && extra_json[0]) {
        mgpu__buf check;
        mgpu_json *j;
        mgpu__buf_init(&check);
        mgpu__buf_puts(&check, "{");
        mgpu__buf_puts(&check, extra_json);
        mgpu__buf_puts(&check, "}");
        j = check.failed ? NULL : mgpu_json_parse(check.data, check.len, "extra_json wrapped in {}");
        mgpu__buf_free(&check);
        if (!j) {
            char why[512];
            snprintf(why, sizeof why, "%.400s", mgpu_last_error()); /* mgpu__fail must not read its own buffer */
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: extra_json must be JSON object members: %s", fn, why);
        }
        mgpu_json_free(j);
        mgpu__buf_puts(line, ",");
        mgpu__buf_puts(line, extra_json);
    }
    mgpu__buf_puts(line, "}\n");
    if (line->failed) return MGPU_ERR_OOM_HOST;
    if (!m->f) return MGPU_OK;
    if (fwrite(line->data, 1, line->len, m->f) != line->len || fflush(m->f) != 0 || fsync(fileno(m->f)) != 0) {
        err = errno;
        return mgpu__fail(MGPU_ERR_IO, "%s: cannot append to '%s': %s", fn, m->path, strerror(err));
    }
    return MGPU_OK;
}

static void mgpu__buf_json_member_number(mgpu__buf *b, const char *key, double v) {
    mgpu__buf_printf(b, ",\"%s\":", key);
    mgpu__buf_json_number(b, v);
}

MGPU_API mgpu_result mgpu_metrics_write_epoch(mgpu_metrics *m, const mgpu_epoch_record *r) {
    mgpu__buf line;
    mgpu_result res;
    if (!m || !r) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_metrics_write_epoch: metrics and record must not be NULL");
    mgpu__buf_init(&line);
    mgpu__buf_printf(&line, "{\"epoch\":%lld,\"step\":%lld", (long long)r->epoch, (long long)r->step);
    mgpu__buf_json_member_number(&line, "train_loss", r->train_loss);
    mgpu__buf_json_member_number(&line, "test_loss", r->test_loss);
    mgpu__buf_json_member_number(&line, "test_accuracy", r->test_accuracy);
    mgpu__buf_json_member_number(&line, "lr", r->lr);
    mgpu__buf_json_member_number(&line, "epoch_time_s", r->epoch_time_s);
    mgpu__buf_json_member_number(&line, "samples_per_s", r->samples_per_s);
    mgpu__buf_printf(&line, ",\"world_size\":%d,\"global_batch\":%lld,\"amp\":", r->world_size, (long long)r->global_batch);
    if (r->amp) mgpu__buf_json_string(&line, r->amp);
    else mgpu__buf_puts(&line, "null");
    res = mgpu__metrics_finish_line(m, &line, r->extra_json, "mgpu_metrics_write_epoch");
    mgpu__buf_free(&line);
    return res;
}

MGPU_API mgpu_result mgpu_metrics_write_final(mgpu_metrics *m, const char *extra_json) {
    mgpu__buf line;
    mgpu_result res;
    if (!m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_metrics_write_final: metrics is NULL");
    mgpu__buf_init(&line);
    mgpu__buf_puts(&line, "{\"event\":\"final\"");
    res = mgpu__metrics_finish_line(m, &line, extra_json, "mgpu_metrics_write_final");
    mgpu__buf_free(&line);
    return res;
}

MGPU_API void mgpu_metrics_close(mgpu_metrics *m) {
    if (!m) return;
    if (m->f) fclose(m->f);
    mgpu_free(m->path);
    mgpu_free(m);
}

/* --------------------------------------------------------------------------------------
   Progress: a redrawn bar on a terminal, plain periodic lines otherwise (logs, pipes)
   -------------------------------------------------------------------------------------- */

#define MGPU__BAR_MAX 30

struct mgpu_progress {
    char label[64];
    int64_t total, done, printed_done;
    int log_every, tty;
    double t_start, t_drawn, loss;
};

MGPU_API mgpu_progress *mgpu_progress_begin(const char *label, int64_t total, int log_every) {
    mgpu_progress *p;
    if (total < 0 || log_every < 0)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_progress_begin: total (%lld) and log_every (%d) must be >= 0", (long long)total, log_every);
    p = (mgpu_progress *)mgpu__calloc(sizeof *p, "a progress bar");
    if (!p) return NULL;
    snprintf(p->label, sizeof p->label, "%s", label ? label : "");
    p->total = total; p->log_every = log_every;
    p->tty = isatty(STDERR_FILENO);
    p->t_start = mgpu_time_s();
    p->t_drawn = -1;
    p->printed_done = -1;
    p->loss = NAN;
    return p;
}

static void mgpu__format_duration(double s, char *buf, size_t size) {
    long t = s > 0 && s < 1e9 ? (long)(s + 0.5) : 0;
    if (t >= 3600) snprintf(buf, size, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    else snprintf(buf, size, "%ld:%02ld", t / 60, t % 60);
}

/* "label [#####.....] 45% 123/273 1234.5 it/s ETA 0:12 loss 0.4321" (bar_width 0: no bar). */
static void mgpu__progress_format(const mgpu_progress *p, int bar_width, char *buf, size_t size) {
    double elapsed = mgpu_time_s() - p->t_start, rate = elapsed > 0 ? (double)p->done / elapsed : 0;
    double frac = p->total > 0 ? (double)MGPU__MIN(p->done, p->total) / (double)p->total : 0;
    size_t pos = (size_t)snprintf(buf, size, "%s", p->label);
    char eta[32];
    int i, filled = (int)(frac * bar_width);
    if (p->total > 0 && bar_width > 0 && pos + (size_t)bar_width + 4 < size) {
        buf[pos++] = ' '; buf[pos++] = '[';
        for (i = 0; i < bar_width; i++) buf[pos++] = i < filled ? '#' : '.';
        buf[pos++] = ']'; buf[pos] = 0;
    }
    if (pos < size && p->total > 0)
        pos += (size_t)snprintf(buf + pos, size - pos, " %d%% %lld/%lld", (int)(100 * frac), (long long)p->done, (long long)p->total);
    else if (pos < size) pos += (size_t)snprintf(buf + pos, size - pos, " %lld", (long long)p->done);
    if (pos < size) pos += (size_t)snprintf(buf + pos, size - pos, " %.1f it/s", rate);
    if (pos < size && p->total > 0 && rate > 0) {
        mgpu__format_duration((double)MGPU__MAX(p->total - p->done, 0) / rate, eta, sizeof eta);
        pos += (size_t)snprintf(buf + pos, size - pos, " ETA %s", eta);
    }
    if (pos < size && p->loss == p->loss) snprintf(buf + pos, size - pos, " loss %.4f", p->loss);
}

/* Redraws the terminal line in place, the bar shrunk to fit the terminal's width. */
static void mgpu__progress_draw(mgpu_progress *p) {
    char line[256];
    int width = MGPU__BAR_MAX;
    struct winsize ws;
    if (ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) {
        mgpu__progress_format(p, 0, line, sizeof line);
        width = MGPU__MIN(MGPU__BAR_MAX, (int)ws.ws_col - (int)strlen(line) - 4);
        if (width < 5) width = 0;
    }
    mgpu__progress_format(p, width, line, sizeof line);
    fprintf(stderr, "\r%s\x1b[K", line);
    fflush(stderr);
    p->t_drawn = mgpu_time_s();
}

static void mgpu__progress_print_line(mgpu_progress *p) {
    char line[256];
    mgpu__progress_format(p, 0, line, sizeof line);
    fprintf(stderr, "%s\n", line);
    fflush(stderr);
    p->printed_done = p->done;
}

MGPU_API void mgpu_progress_update(mgpu_progress *p, int64_t done, double loss) {
    int64_t before;
    if (!p) return;
    before = p->done;
    p->done = done;
    p->loss = loss;
    if (p->tty) {
        /* about 10 redraws a second at most: drawing must not slow fast loops */
        if (p->t_drawn < 0 || mgpu_time_s() - p->t_drawn >= 0.1) mgpu__progress_draw(p);
    } else if (p->log_every > 0 && done / p->log_every != before / p->log_every) {
        mgpu__progress_print_line(p);
    }
}

MGPU_API void mgpu_progress_end(mgpu_progress *p) {
    if (!p) return;
    if (p->tty) {
        mgpu__progress_draw(p);
        fprintf(stderr, "\n");
        fflush(stderr);
    } else if (p->printed_done != p->done) {
        mgpu__progress_print_line(p);
    }
    mgpu_free(p);
}
