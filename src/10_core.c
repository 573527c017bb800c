/* ======================================================================================
   ======================================================================================
   IMPLEMENTATION
   ======================================================================================
   ====================================================================================== */
#if defined(MGPU_IMPLEMENTATION) && !defined(MGPU__IMPLEMENTED)
#define MGPU__IMPLEMENTED

#include <stdlib.h>
#include <string.h>
#include <stdarg.h>
#include <math.h>
#include <errno.h>
#include <float.h>
#include <time.h>
#include <pthread.h>
#include <unistd.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <limits.h>
#include <dirent.h>
#include <poll.h>
#include <netdb.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <linux/futex.h>
#endif
/* GEMM micro-kernels; nvcc parses the implementation only for the header check, so the fast paths
   are for the host C compiler. */
#if defined(__AVX2__) && defined(__FMA__) && !defined(__CUDACC__)
#include <immintrin.h>
#define MGPU__GEMM_AVX2 1
#endif
#ifdef MGPU_CUDA
#include <cuda_runtime_api.h>
#include <nccl.h>
#if NCCL_VERSION_CODE < 21400
#error "mgpu's nccl backend needs NCCL 2.14 or newer (non-blocking communicators)"
#endif
#endif

#ifndef MGPU_ASSERT
#include <assert.h>
#define MGPU_ASSERT(c) assert(c)
#endif

#if defined(__cplusplus)
#define MGPU__THREAD_LOCAL thread_local
#else
#define MGPU__THREAD_LOCAL _Thread_local
#endif

#if defined(__GNUC__)
#define MGPU__PRINTF(a, b) __attribute__((format(printf, a, b)))
#define MGPU__UNUSED __attribute__((unused))
#else
#define MGPU__PRINTF(a, b)
#define MGPU__UNUSED
#endif

#define MGPU__MIN(a, b) ((a) < (b) ? (a) : (b))
#define MGPU__MAX(a, b) ((a) > (b) ? (a) : (b))

/* --------------------------------------------------------------------------------------
   Errors
   -------------------------------------------------------------------------------------- */

static MGPU__THREAD_LOCAL char mgpu__error_text[1024];
static MGPU__THREAD_LOCAL mgpu_result mgpu__error_code = MGPU_OK;

MGPU_API const char *mgpu_result_string(mgpu_result r) {
    switch (r) {
    case MGPU_OK: return "ok";
    case MGPU_ERR_INVALID_ARG: return "invalid argument";
    case MGPU_ERR_OOM_HOST: return "out of host memory";
    case MGPU_ERR_OOM_DEVICE: return "out of device memory";
    case MGPU_ERR_CUDA: return "CUDA error";
    case MGPU_ERR_NCCL: return "NCCL error";
    case MGPU_ERR_IO: return "I/O error";
    case MGPU_ERR_FORMAT: return "bad file format";
    case MGPU_ERR_SHAPE: return "shape or dtype mismatch";
    case MGPU_ERR_TIMEOUT: return "timed out";
    case MGPU_ERR_UNSUPPORTED: return "unsupported";
    case MGPU_ERR_STATE: return "called in the wrong state";
    }
    return "unknown result code";
}
MGPU_API const char *mgpu_last_error(void) { return mgpu__error_text; }
MGPU_API mgpu_result mgpu_last_result(void) { return mgpu__error_code; }
MGPU_API void mgpu_clear_error(void) { mgpu__error_text[0] = 0; mgpu__error_code = MGPU_OK; }

/* Record a failure for this thread and return its code: `return mgpu__fail(MGPU_ERR_SHAPE, "...")`. */
static mgpu_result mgpu__fail(mgpu_result code, const char *fmt, ...) MGPU__PRINTF(2, 3);
static mgpu_result mgpu__fail(mgpu_result code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(mgpu__error_text, sizeof mgpu__error_text, fmt, ap);
    va_end(ap);
    mgpu__error_code = code;
    return code;
}
/* Same for constructors: record and return NULL. */
#define MGPU__FAIL_NULL(code, ...) do { mgpu__fail((code), __VA_ARGS__); return NULL; } while (0)

/* --------------------------------------------------------------------------------------
   Logging
   -------------------------------------------------------------------------------------- */

static mgpu_log_fn mgpu__log_fn = NULL;
static void *mgpu__log_user = NULL;
static mgpu_log_level mgpu__log_min = MGPU_LOG_INFO;

MGPU_API void mgpu_set_logger(mgpu_log_fn fn, void *user) { mgpu__log_fn = fn; mgpu__log_user = user; }
MGPU_API void mgpu_set_log_level(mgpu_log_level min_level) { mgpu__log_min = min_level; }

static void mgpu__default_log(mgpu_log_level level, const char *message) {
    static const char *names[] = {"debug", "info", "warning", "error"};
    const char *rank = getenv("RANK");
    const char *world = getenv("WORLD_SIZE");
    int lv = (int)level < 0 || (int)level > 3 ? 3 : (int)level;
    if (rank && world && atoi(world) > 1) fprintf(stderr, "[mgpu %s rank %s] %s\n", names[lv], rank, message);
    else fprintf(stderr, "[mgpu %s] %s\n", names[lv], message);
}

MGPU_API void mgpu_log(mgpu_log_level level, const char *fmt, ...) {
    char buf[2048];
    va_list ap;
    if (level < mgpu__log_min) return;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (mgpu__log_fn) mgpu__log_fn(level, buf, mgpu__log_user);
    else mgpu__default_log(level, buf);
}

/* --------------------------------------------------------------------------------------
   Host allocation
   -------------------------------------------------------------------------------------- */

static mgpu_allocator mgpu__allocator = {NULL, NULL, NULL};

MGPU_API void mgpu_set_allocator(const mgpu_allocator *a) {
    if (a && a->alloc && a->free) mgpu__allocator = *a;
    else { mgpu__allocator.alloc = NULL; mgpu__allocator.free = NULL; mgpu__allocator.user = NULL; }
}
MGPU_API void *mgpu_malloc(size_t bytes) {
    void *p = NULL;
    if (bytes == 0) bytes = 1;
    if (mgpu__allocator.alloc) return mgpu__allocator.alloc(bytes, mgpu__allocator.user);
    if (posix_memalign(&p, 64, bytes) != 0) return NULL;
    return p;
}
MGPU_API void mgpu_free(void *p) {
    if (!p) return;
    if (mgpu__allocator.free) mgpu__allocator.free(p, mgpu__allocator.user);
    else free(p);
}
/* Allocation that records MGPU_ERR_OOM_HOST naming what it was for. */
static void *mgpu__alloc(size_t bytes, const char *what) {
    void *p = mgpu_malloc(bytes);
    if (!p) mgpu__fail(MGPU_ERR_OOM_HOST, "out of host memory allocating %zu bytes for %s", bytes, what);
    return p;
}
static MGPU__UNUSED void *mgpu__calloc(size_t bytes, const char *what) {
    void *p = mgpu__alloc(bytes, what);
    if (p) memset(p, 0, bytes);
    return p;
}
static MGPU__UNUSED char *mgpu__strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = (char *)mgpu__alloc(n, "a string");
    if (p) memcpy(p, s, n);
    return p;
}

MGPU_API double mgpu_time_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* --------------------------------------------------------------------------------------
   Devices and dtypes
   -------------------------------------------------------------------------------------- */

MGPU_API int mgpu_cuda_device_count(void) {
#ifdef MGPU_CUDA
    return mgpu__cuda_device_count();   /* < 0: CUDA failed, the error is recorded */
#else
    return 0;
#endif
}

MGPU_API mgpu_result mgpu_device_parse(const char *text, mgpu_device *out) {
    char *end = NULL;
    long idx;
    if (!text || !out) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_device_parse: text and out must not be NULL");
    if (strcmp(text, "cpu") == 0) { out->type = MGPU_DEVICE_CPU; out->index = 0; return MGPU_OK; }
    if (strcmp(text, "auto") == 0) {
        int n = mgpu_cuda_device_count();
        if (n < 0) return (mgpu_result)n;   /* a failing GPU setup is an error, not a reason to pick the CPU */
        out->type = n > 0 ? MGPU_DEVICE_CUDA : MGPU_DEVICE_CPU;
        out->index = 0;
        return MGPU_OK;
    }
    if (strncmp(text, "cuda", 4) == 0 && (text[4] == 0 || text[4] == ':')) {
        idx = 0;
        if (text[4] == ':') {
            errno = 0;
            idx = strtol(text + 5, &end, 10);
            if (errno || end == text + 5 || *end || idx < 0 || idx > 1023)
                return mgpu__fail(MGPU_ERR_INVALID_ARG, "device '%s': expected cuda:N with N a GPU index", text);
        }
#ifndef MGPU_CUDA
        return mgpu__fail(MGPU_ERR_UNSUPPORTED, "device '%s': this build has no CUDA support (rebuild with -DMGPU_CUDA, e.g. `make cuda`)", text);
#else
        {
            int n = mgpu_cuda_device_count();
            if (n < 0) return (mgpu_result)n;
            if (idx >= n) return mgpu__fail(MGPU_ERR_INVALID_ARG, "device '%s': only %d CUDA device(s) visible", text, n);
        }
        out->type = MGPU_DEVICE_CUDA; out->index = (int)idx;
        return MGPU_OK;
#endif
    }
    return mgpu__fail(MGPU_ERR_INVALID_ARG, "device '%s': expected cpu, cuda, cuda:N or auto", text);
}

MGPU_API void mgpu_device_name(mgpu_device d, char *buf, size_t size) {
    if (!buf || size == 0) return;
    if (d.type == MGPU_DEVICE_CUDA) snprintf(buf, size, "cuda:%d", d.index);
    else snprintf(buf, size, "cpu");
}

static const char *const mgpu__dtype_names[MGPU_DTYPE_COUNT] = {"F32", "F16", "BF16", "I32", "I64", "U8"};
static const size_t mgpu__dtype_sizes[MGPU_DTYPE_COUNT] = {4, 2, 2, 4, 8, 1};

static int mgpu__dtype_valid(mgpu_dtype dt) { return (int)dt >= 0 && (int)dt < MGPU_DTYPE_COUNT; }
static MGPU__UNUSED int mgpu__dtype_is_float(mgpu_dtype dt) { return dt == MGPU_F32 || dt == MGPU_F16 || dt == MGPU_BF16; }
MGPU_API size_t mgpu_dtype_size(mgpu_dtype dt) { return mgpu__dtype_valid(dt) ? mgpu__dtype_sizes[dt] : 0; }
MGPU_API const char *mgpu_dtype_name(mgpu_dtype dt) { return mgpu__dtype_valid(dt) ? mgpu__dtype_names[dt] : "invalid"; }
MGPU_API int mgpu_dtype_from_name(const char *name, mgpu_dtype *out) {
    int i;
    if (!name) return 0;
    for (i = 0; i < MGPU_DTYPE_COUNT; i++)
        if (strcmp(name, mgpu__dtype_names[i]) == 0) { if (out) *out = (mgpu_dtype)i; return 1; }
    return 0;
}

static uint32_t mgpu__f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float mgpu__bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

MGPU_API uint16_t mgpu_f32_to_bf16(float f) {
    uint32_t u = mgpu__f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                           /* round to nearest even */
    return (uint16_t)(u >> 16);
}
MGPU_API float mgpu_bf16_to_f32(uint16_t h) { return mgpu__bits_f32((uint32_t)h << 16); }

MGPU_API uint16_t mgpu_f32_to_f16(float f) {
    uint32_t u = mgpu__f32_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t absu = u & 0x7fffffffu;
    if (absu > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);               /* NaN */
    if (absu >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);              /* overflow (rounds to >= 65520) -> inf */
    if (absu < 0x38800000u) {                                                  /* subnormal or zero in f16 */
        /* add 0.5 so the float adder rounds the mantissa to the f16 subnormal grid (nearest even) */
        float a = mgpu__bits_f32(absu) + 0.5f;
        return (uint16_t)(sign | (mgpu__f32_bits(a) - 0x3f000000u));
    }
    {
        uint32_t mant_odd = (absu >> 13) & 1u;
        absu += 0xc8000fffu + mant_odd;   /* rebias exponent (-112 << 23) and round to nearest even */
        return (uint16_t)(sign | (absu >> 13));
    }
}
MGPU_API float mgpu_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0) {
        float v = (float)mant * (1.0f / 16777216.0f); /* mant * 2^-24 */
        return mgpu__bits_f32(mgpu__f32_bits(v) | sign);
    }
    if (exp == 31) return mgpu__bits_f32(sign | 0x7f800000u | (mant << 13));
    return mgpu__bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

/* --------------------------------------------------------------------------------------
   Counter-based RNG: a SplitMix64-style finaliser over (seed, counter) pairs. Any element of
   any stream is computable independently, so dropout masks are reproducible, parallel and
   resumable from (seed, offset) alone.
   -------------------------------------------------------------------------------------- */

MGPU_API uint32_t mgpu_random_u32(uint64_t seed, uint64_t counter) { return mgpu__random_bits(seed, counter); }
MGPU_API float mgpu_random_uniform(uint64_t seed, uint64_t counter) { return mgpu__random_unit(seed, counter); }
MGPU_API float mgpu_random_normal(uint64_t seed, uint64_t counter) {
    /* Box-Muller on two sub-streams of the same counter */
    double u1 = ((double)(mgpu_random_u32(seed, 2 * counter) >> 8) + 1.0) * (1.0 / 16777217.0);
    double u2 = (double)(mgpu_random_u32(seed, 2 * counter + 1) >> 8) * (1.0 / 16777216.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* --------------------------------------------------------------------------------------
   Thread pool: persistent workers, one job at a time, chunks taken by atomic counter.
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__pool {
    int n_threads;                 /* including the caller */
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv;
    uint64_t generation;           /* bumped per job */
    int shutdown;
    uint64_t busy_workers;
    /* current job */
    mgpu_range_fn fn; void *arg;
    int64_t n, chunk, next;
} mgpu__pool;

static void mgpu__pool_run_chunks(mgpu__pool *p) {
    for (;;) {
        int64_t begin = __atomic_fetch_add(&p->next, p->chunk, __ATOMIC_RELAXED);
        if (begin >= p->n) break;
        p->fn(p->arg, begin, MGPU__MIN(begin + p->chunk, p->n));
    }
}

/* Parallel regions in a training step come microseconds apart: spinning this long before
   sleeping on the condition variable saves a wake-up (~10 us) per region, and is short enough
   that idle workers do not steal a core from other processes for long. */
#define MGPU__SPIN_SECONDS 50e-6

/* Spin until (*word == value) == want_equal or the spin budget is spent; returns the last value read. */
static uint64_t mgpu__spin_wait(const uint64_t *word, uint64_t value, int want_equal) {
    double deadline = mgpu_time_s() + MGPU__SPIN_SECONDS;
    uint64_t v;
    int i;
    for (;;) {
        for (i = 0; i < 64; i++)
            if (((v = __atomic_load_n(word, __ATOMIC_ACQUIRE)) == value) == want_equal) return v;
        if (mgpu_time_s() > deadline) return v;
    }
}

static void *mgpu__pool_worker(void *arg) {
    mgpu__pool *p = (mgpu__pool *)arg;
    uint64_t seen = 0;
    for (;;) {
        if (mgpu__spin_wait(&p->generation, seen, 0) == seen) {
            pthread_mutex_lock(&p->mu);
            while (!p->shutdown && __atomic_load_n(&p->generation, __ATOMIC_ACQUIRE) == seen) pthread_cond_wait(&p->work_cv, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (__atomic_load_n(&p->shutdown, __ATOMIC_ACQUIRE)) break;
        seen = __atomic_load_n(&p->generation, __ATOMIC_ACQUIRE);
        mgpu__pool_run_chunks(p);
        if (__atomic_sub_fetch(&p->busy_workers, 1, __ATOMIC_ACQ_REL) == 0) {
            pthread_mutex_lock(&p->mu);  /* the lock orders this signal after the caller's check */
            pthread_cond_signal(&p->done_cv);
            pthread_mutex_unlock(&p->mu);
        }
    }
    return NULL;
}

static mgpu__pool *mgpu__pool_create(int n_threads) {
    mgpu__pool *p = (mgpu__pool *)mgpu__calloc(sizeof *p, "the thread pool");
    int i;
    if (!p) return NULL;
    p->n_threads = n_threads < 1 ? 1 : n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work_cv, NULL);
    pthread_cond_init(&p->done_cv, NULL);
    if (p->n_threads > 1) {
        p->threads = (pthread_t *)mgpu__calloc(sizeof(pthread_t) * (size_t)p->n_threads, "the thread pool");
        if (!p->threads) { p->n_threads = 1; return p; }
        for (i = 0; i < p->n_threads - 1; i++) {
            if (pthread_create(&p->threads[i], NULL, mgpu__pool_worker, p) != 0) { p->n_threads = i + 1; break; }
        }
    }
    return p;
}

static void mgpu__pool_destroy(mgpu__pool *p) {
    int i;
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    __atomic_store_n(&p->shutdown, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&p->work_cv);
    pthread_mutex_unlock(&p->mu);
    for (i = 0; i < p->n_threads - 1; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->work_cv);
    pthread_cond_destroy(&p->done_cv);
    mgpu_free(p->threads);
    mgpu_free(p);
}

static void mgpu__pool_parallel_for(mgpu__pool *p, int64_t n, int64_t min_chunk, mgpu_range_fn fn, void *arg) {
    int64_t chunk;
    if (n <= 0) return;
    if (min_chunk < 1) min_chunk = 1;
    if (!p || p->n_threads == 1 || n <= min_chunk) { fn(arg, 0, n); return; }
    /* about 4 chunks per thread balances uneven work without much atomic traffic */
    chunk = (n + 4 * p->n_threads - 1) / (4 * p->n_threads);
    if (chunk < min_chunk) chunk = min_chunk;
    pthread_mutex_lock(&p->mu);
    p->fn = fn; p->arg = arg; p->n = n; p->chunk = chunk; p->next = 0;
    __atomic_store_n(&p->busy_workers, (uint64_t)(p->n_threads - 1), __ATOMIC_RELAXED);
    __atomic_store_n(&p->generation, p->generation + 1, __ATOMIC_RELEASE); /* publishes the job */
    pthread_cond_broadcast(&p->work_cv);
    pthread_mutex_unlock(&p->mu);
    mgpu__pool_run_chunks(p);
    if (mgpu__spin_wait(&p->busy_workers, 0, 1) != 0) {
        pthread_mutex_lock(&p->mu);
        while (__atomic_load_n(&p->busy_workers, __ATOMIC_ACQUIRE) > 0) pthread_cond_wait(&p->done_cv, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }
}

/* Threads for this process: MGPU_NUM_THREADS, OMP_NUM_THREADS, else the cores split among the
   processes of this host (LOCAL_WORLD_SIZE) so DDP workers do not oversubscribe. */
static int mgpu__default_num_threads(void) {
    const char *names[] = {"MGPU_NUM_THREADS", "OMP_NUM_THREADS"};
    long cores, local_world = 1;
    int i;
    for (i = 0; i < 2; i++) {
        const char *v = getenv(names[i]);
        if (v && atoi(v) > 0) return atoi(v);
    }
    cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (cores < 1) cores = 1;
    if (getenv("LOCAL_WORLD_SIZE") && atoi(getenv("LOCAL_WORLD_SIZE")) > 0) local_world = atoi(getenv("LOCAL_WORLD_SIZE"));
    cores /= local_world;
    return cores < 1 ? 1 : (int)cores;
}

/* --------------------------------------------------------------------------------------
   Activation arena: bump allocation in chunks; reset keeps one chunk as large as the whole step
   needed, so a steady-state training step allocates nothing (and, on CUDA, hands out the same
   device addresses every step, which CUDA Graph replay needs). A context has a host arena (tensor
   headers, tape nodes, host scratch) and, on CUDA, a device arena for activation data whose
   chunks come from the caching device allocator.
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__chunk { struct mgpu__chunk *prev; char *base; size_t size, used; } mgpu__chunk;
typedef struct mgpu__arena {
    mgpu__chunk *head; size_t total_used, peak; size_t initial;
    int device;   /* -1: host memory; else the CUDA device its chunks live on */
} mgpu__arena;

#ifdef MGPU_CUDA
/* Device memory for the core (defined with the CUDA host side, below). */
static void *mgpu__cuda_alloc_for(int device, size_t bytes, const char *what);
static void mgpu__cuda_release(int device, void *ptr);
#endif

static void *mgpu__arena_chunk_memory(const mgpu__arena *a, size_t bytes) {
#ifdef MGPU_CUDA
    if (a->device >= 0) return mgpu__cuda_alloc_for(a->device, bytes, "the device activation arena");
#endif
    (void)a;
    return mgpu_malloc(bytes);
}
static void mgpu__arena_chunk_free(const mgpu__arena *a, mgpu__chunk *c) {
#ifdef MGPU_CUDA
    if (a->device >= 0) { mgpu__cuda_release(a->device, c->base); mgpu_free(c); return; }
#endif
    (void)a;
    mgpu_free(c->base);
    mgpu_free(c);
}

static void *mgpu__arena_alloc_raw(mgpu__arena *a, size_t bytes) {
    mgpu__chunk *c = a->head;
    size_t align = a->device >= 0 ? 256 : 64;   /* device: what cudaMalloc gives and cuBLASLt's fastest paths want */
    bytes = (bytes + align - 1) & ~(align - 1);
    if (!c || c->used + bytes > c->size) {
        size_t want = MGPU__MAX(bytes, MGPU__MAX(a->initial, c ? 2 * c->size : 0));
        mgpu__chunk *n = (mgpu__chunk *)mgpu_malloc(sizeof *n);
        if (!n) return NULL;
        n->base = (char *)mgpu__arena_chunk_memory(a, want);
        if (!n->base) { mgpu_free(n); return NULL; }
        n->prev = c; n->size = want; n->used = 0;
        a->head = c = n;
    }
    {
        void *p = c->base + c->used;
        c->used += bytes;
        a->total_used += bytes;
        if (a->total_used > a->peak) a->peak = a->total_used;
        return p;
    }
}

static void mgpu__arena_reset(mgpu__arena *a) {
    if (a->head && a->head->prev) {
        /* several chunks: replace them with one that fits the whole step next time */
        size_t need = 0;
        mgpu__chunk *c = a->head;
        while (c) { mgpu__chunk *p = c->prev; need += c->size; mgpu__arena_chunk_free(a, c); c = p; }
        a->head = NULL;
        a->initial = MGPU__MAX(a->initial, need);
    } else if (a->head) {
        a->head->used = 0;
    }
    a->total_used = 0;
}

static void mgpu__arena_free(mgpu__arena *a) {
    mgpu__chunk *c = a->head;
    while (c) { mgpu__chunk *p = c->prev; mgpu__arena_chunk_free(a, c); c = p; }
    a->head = NULL;
}

/* --------------------------------------------------------------------------------------
   Context and autograd tape
   -------------------------------------------------------------------------------------- */

struct mgpu__node;
/* A backward function reads node->out->grad and ACCUMULATES (+=) into the grads of its inputs
   through mgpu__grad_f32(); it never overwrites an input's grad. */
typedef mgpu_result (*mgpu__backward_fn)(mgpu_context *ctx, struct mgpu__node *node);
typedef struct mgpu__node {
    mgpu__backward_fn backward;
    const char *name;            /* op name for error messages */
    mgpu_tensor *out;
    mgpu_tensor **in; int n_in;  /* inputs (arena array) */
    mgpu_tensor *saved[4];       /* extra tensors kept for backward (arena or inputs) */
    int64_t iarg[8]; float farg[4];
    void *extra;                 /* op-specific arena memory */
    int consumed;                /* already walked by a backward */
} mgpu__node;

/* CUDA Graph capture of a training step. A graph bakes kernel arguments, so a value that changes
   from step to step (the dropout RNG position, the optimizer's LR and bias corrections,
   num_batches_tracked) is read by the captured kernels from a "step scalar": an 8-byte word of a
   small device block. The host work that produced the value in an eager step becomes a replay
   hook: before every launch of the graph each hook redoes its host mutation (RNG reserve, step
   count, ...) and writes the word, and one kernel that takes the words as its argument stores the
   block. N replays thus leave the host state of N eager steps, and capturing runs no hook (nor
   mutates the host): the first launch after capture runs the captured step. */
typedef mgpu_result (*mgpu__replay_fn)(void *obj, int64_t arg, uint64_t *words);
typedef struct mgpu__replay_hook { mgpu__replay_fn fn; void *obj; int64_t arg; int word; } mgpu__replay_hook;
typedef struct mgpu__step_capture {
    uint64_t *device_words;              /* MGPU__STEP_SLOTS words on the device: what the graph reads */
    mgpu__step_words host;               /* this replay's words, written by the hooks */
    int n_words;
    mgpu__replay_hook hooks[MGPU__STEP_SLOTS]; int n_hooks;
} mgpu__step_capture;

struct mgpu_context {
    mgpu_device device;
    mgpu__pool *pool;
    mgpu__arena arena;                 /* host: tensor headers, tape nodes, host scratch */
    mgpu__arena device_arena;          /* CUDA: activation data (unused on the CPU) */
    uint64_t rng_seed, rng_offset;
    int grad_enabled;
    int autocast;                      /* mgpu_amp_mode: half precision for matmul-like ops */
    int autocast_inside;               /* the mode of the matmul-like op autocast is running now (0: none) */
    mgpu__node **tape; int64_t tape_len, tape_cap;
    mgpu_backward_end_fn backward_end; void *backward_end_user;
    int row_rank, row_world;           /* DDP sharding (rank, world; 0 = 1): dropout draws row j's mask at global row rank + world * j */
    void *cuda_stream;                 /* the stream every CUDA twin of this context runs on (NULL on the CPU) */
    void *cuda_blas;                   /* its cuBLAS/cuBLASLt bundle (mgpu_cuda_blas_create; NULL on the CPU) */
    mgpu__step_capture *capture;       /* set while a CUDA Graph of the step is being captured (NULL otherwise) */
    uint64_t host_waits;               /* how often mgpu__transfer waited for cuda_stream: see mgpu__item_begin */
    void *readback;                    /* pinned 8 bytes for mgpu__item_begin's copy (NULL until first used) */
};

#ifdef MGPU_CUDA
static mgpu_result mgpu__cuda_context_init(mgpu_context *ctx);
static void mgpu__cuda_context_release(mgpu_context *ctx);
#endif

MGPU_API mgpu_context *mgpu_context_create(const mgpu_context_desc *desc) {
    mgpu_context *ctx;
    mgpu_context_desc d;
    if (desc) d = *desc; else memset(&d, 0, sizeof d);
    if (d.device.type != MGPU_DEVICE_CPU && d.device.type != MGPU_DEVICE_CUDA)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_context_create: desc->device.type %d is not a device type", (int)d.device.type);
#ifndef MGPU_CUDA
    if (d.device.type == MGPU_DEVICE_CUDA)
        MGPU__FAIL_NULL(MGPU_ERR_UNSUPPORTED, "mgpu_context_create: device cuda:%d: this build has no CUDA support (rebuild with -DMGPU_CUDA, e.g. `make cuda`)", d.device.index);
#endif
    if (d.num_threads < 0) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_context_create: desc->num_threads is %d, must be >= 0", d.num_threads);
    ctx = (mgpu_context *)mgpu__calloc(sizeof *ctx, "a context");
    if (!ctx) return NULL;
    ctx->device = d.device;
    ctx->pool = mgpu__pool_create(d.num_threads ? d.num_threads : mgpu__default_num_threads());
    if (!ctx->pool) { mgpu_free(ctx); return NULL; }
    ctx->arena.device = -1;
    ctx->arena.initial = d.arena_bytes ? d.arena_bytes : ((size_t)16 << 20);
    ctx->device_arena.device = -1;
    ctx->rng_seed = d.seed;
    ctx->grad_enabled = 1;
#ifdef MGPU_CUDA
    if (d.device.type == MGPU_DEVICE_CUDA) {
        /* headers and nodes are small: the host arena starts small, the device arena gets the size asked for */
        ctx->arena.initial = (size_t)1 << 20;
        ctx->device_arena.device = d.device.index;
        ctx->device_arena.initial = d.arena_bytes ? d.arena_bytes : ((size_t)64 << 20);
        if (mgpu__cuda_context_init(ctx) != MGPU_OK) { mgpu__pool_destroy(ctx->pool); mgpu_free(ctx); return NULL; }
    }
#endif
    return ctx;
}

MGPU_API void mgpu_context_destroy(mgpu_context *ctx) {
    if (!ctx) return;
#ifdef MGPU_CUDA
    mgpu__cuda_context_release(ctx);   /* waits for the stream before its memory goes back */
#endif
    mgpu__pool_destroy(ctx->pool);
    mgpu__arena_free(&ctx->arena);
    mgpu__arena_free(&ctx->device_arena);
    mgpu_free(ctx->tape);
    mgpu_free(ctx);
}

MGPU_API mgpu_device mgpu_context_device(const mgpu_context *ctx) {
    mgpu_device cpu = {MGPU_DEVICE_CPU, 0};
    return ctx ? ctx->device : cpu;
}
MGPU_API int mgpu_context_num_threads(const mgpu_context *ctx) { return ctx ? ctx->pool->n_threads : 0; }
MGPU_API void mgpu_context_end_step(mgpu_context *ctx) {
    if (!ctx) return;
    ctx->tape_len = 0;
    mgpu__arena_reset(&ctx->arena);
    mgpu__arena_reset(&ctx->device_arena);   /* stream order keeps queued kernels ahead of the next step's writes */
}
MGPU_API int mgpu_set_grad_enabled(mgpu_context *ctx, int enabled) {
    int prev;
    if (!ctx) return 0;
    prev = ctx->grad_enabled;
    ctx->grad_enabled = enabled != 0;
    return prev;
}
MGPU_API int mgpu_is_grad_enabled(const mgpu_context *ctx) { return ctx ? ctx->grad_enabled : 0; }
MGPU_API void mgpu_context_rng_state(const mgpu_context *ctx, uint64_t *seed, uint64_t *offset) {
    if (!ctx) return;
    if (seed) *seed = ctx->rng_seed;
    if (offset) *offset = ctx->rng_offset;
}
MGPU_API void mgpu_context_set_rng_state(mgpu_context *ctx, uint64_t seed, uint64_t offset) {
    if (!ctx) return;
    ctx->rng_seed = seed; ctx->rng_offset = offset;
}
MGPU_API uint64_t mgpu_context_rng_reserve(mgpu_context *ctx, uint64_t n) {
    uint64_t first;
    if (!ctx) return 0;
    first = ctx->rng_offset;
    ctx->rng_offset += n;
    return first;
}
MGPU_API void mgpu_parallel_for(mgpu_context *ctx, int64_t n, int64_t min_chunk, mgpu_range_fn fn, void *arg) {
    if (!fn) return;
    mgpu__pool_parallel_for(ctx ? ctx->pool : NULL, n, min_chunk, fn, arg);
}

/* Whether the step now being recorded is a CUDA Graph capture: ops then take per-step values
   from step scalars (mgpu__step_scalar) and leave the host state to their replay hooks. */
static MGPU__UNUSED int mgpu__capturing(const mgpu_context *ctx) { return ctx->capture != NULL; }

/* During a capture: `words` consecutive step scalars that fn(obj, arg, words) fills before every
   replay (after redoing the host work the op does in an eager step); *at is their device address,
   for the captured kernels (or copies) to read. */
static MGPU__UNUSED mgpu_result mgpu__step_scalar(mgpu_context *ctx, mgpu__replay_fn fn, void *obj, int64_t arg, int words, void **at) {
    mgpu__step_capture *c = ctx->capture;
    mgpu__replay_hook *h;
    if (!c) return mgpu__fail(MGPU_ERR_STATE, "mgpu__step_scalar: no CUDA Graph capture in progress");
    if (words < 0 || c->n_words + words > MGPU__STEP_SLOTS || c->n_hooks == MGPU__STEP_SLOTS)
        return mgpu__fail(MGPU_ERR_UNSUPPORTED, "CUDA Graph capture: the step needs more than %d step scalars (per-step values such as "
                          "dropout RNG positions); it runs uncaptured", MGPU__STEP_SLOTS);
    h = &c->hooks[c->n_hooks++];
    h->fn = fn; h->obj = obj; h->arg = arg; h->word = c->n_words;
    *at = c->device_words + c->n_words;
    c->n_words += words;
    return MGPU_OK;
}

/* Step-lifetime host memory (freed by mgpu_context_end_step): headers, nodes, saved arguments. */
static MGPU__UNUSED void *mgpu__arena_alloc(mgpu_context *ctx, size_t bytes) {
    void *p = mgpu__arena_alloc_raw(&ctx->arena, bytes);
    if (!p) mgpu__fail(MGPU_ERR_OOM_HOST, "out of host memory growing the activation arena by %zu bytes", bytes);
    return p;
}
/* Step-lifetime memory that the twins read or write (activations, saved statistics, scratch):
   on the context's device, so device memory on CUDA. The device allocator records its own error. */
static MGPU__UNUSED void *mgpu__arena_alloc_data(mgpu_context *ctx, size_t bytes) {
    if (ctx->device.type != MGPU_DEVICE_CUDA) return mgpu__arena_alloc(ctx, bytes);
    return mgpu__arena_alloc_raw(&ctx->device_arena, bytes);
}

/* --------------------------------------------------------------------------------------
   The device seam (ahead of the tensors, whose fills and copies go through it)
   -------------------------------------------------------------------------------------- */

/* One call into an op's twin pair (see "Internal: the seam between the CPU and CUDA twins").
   Evaluates to an mgpu_result; CPU twins cannot fail once the front has validated. */
#ifdef MGPU_CUDA
#define MGPU__TWIN(ctx, stem, args) \
    ((ctx)->device.type == MGPU_DEVICE_CUDA ? mgpu_cuda_##stem((args), (ctx)->cuda_stream) : (mgpu__cpu_##stem(args), MGPU_OK))
#else
#define MGPU__TWIN(ctx, stem, args) (mgpu__cpu_##stem(args), MGPU_OK)
#endif

/* --------------------------------------------------------------------------------------
   Tensors
   -------------------------------------------------------------------------------------- */

MGPU_API void mgpu_shape_string(int ndim, const int64_t *shape, char *buf, size_t size) {
    size_t pos = 0;
    int i;
    if (!buf || size == 0) return;
    pos += (size_t)snprintf(buf, size, "(");
    for (i = 0; i < ndim && pos < size; i++)
        pos += (size_t)snprintf(buf + pos, size - pos, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (ndim == 1 && pos < size) pos += (size_t)snprintf(buf + pos, size - pos, ",");
    if (pos < size) snprintf(buf + pos, size - pos, ")");
}

/* Validates a shape; returns numel or -1 with an error naming `what`. */
static int64_t mgpu__shape_numel(int ndim, const int64_t *shape, const char *what) {
    int64_t n = 1;
    int i;
    if (ndim < 0 || ndim > MGPU_MAX_DIMS) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: ndim %d outside [0, %d]", what, ndim, MGPU_MAX_DIMS); return -1; }
    if (ndim > 0 && !shape) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: shape is NULL with ndim %d", what, ndim); return -1; }
    for (i = 0; i < ndim; i++) {
        if (shape[i] < 0) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: dimension %d is negative (%lld)", what, i, (long long)shape[i]); return -1; }
        if (shape[i] && n > INT64_MAX / 16 / shape[i]) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: shape too large", what); return -1; }
        n *= shape[i];
    }
    return n;
}

static void mgpu__tensor_init_header(mgpu_tensor *t, mgpu_context *ctx, mgpu_dtype dtype, int ndim, const int64_t *shape, int64_t numel) {
    memset(t, 0, sizeof *t);
    t->dtype = dtype;
    t->device = ctx->device;
    t->ndim = ndim;
    if (ndim) memcpy(t->shape, shape, sizeof(int64_t) * (size_t)ndim);
    t->numel = numel;
    t->ctx = ctx;
}

static int mgpu__on_host(const mgpu_tensor *t) { return t->device.type == MGPU_DEVICE_CPU; }

#ifdef MGPU_CUDA
/* Copies between host and device memory (either side may be either) on ctx's stream, and waits:
   the host reads or reuses its side as soon as this returns. Defined with the CUDA host side. */
static mgpu_result mgpu__cuda_transfer(mgpu_context *ctx, void *dst, const void *src, size_t bytes, const char *fn);
static mgpu_result mgpu__cuda_item_queue(mgpu_context *ctx, const mgpu_tensor *t);
static mgpu_result mgpu__cuda_item_wait(mgpu_context *ctx);
#endif
static MGPU__UNUSED mgpu_result mgpu__fill_zero_bytes(mgpu_context *ctx, void *dst, size_t bytes);

/* Zeroed storage for a persistent tensor on ctx's device (mgpu_tensor_create is torch.zeros). */
static void *mgpu__tensor_memory(mgpu_context *ctx, size_t bytes) {
#ifdef MGPU_CUDA
    if (ctx->device.type == MGPU_DEVICE_CUDA) {
        void *p = mgpu__cuda_alloc_for(ctx->device.index, bytes, "tensor data");
        if (p && mgpu__fill_zero_bytes(ctx, p, bytes) != MGPU_OK) { mgpu__cuda_release(ctx->device.index, p); return NULL; }
        return p;
    }
#endif
    (void)ctx;
    return mgpu__calloc(bytes, "tensor data");
}

/* dst = src (bytes) where either may live on the host or on ctx's device. */
static mgpu_result mgpu__transfer(mgpu_context *ctx, void *dst, const void *src, size_t bytes, const char *fn) {
#ifdef MGPU_CUDA
    if (ctx->device.type == MGPU_DEVICE_CUDA) return mgpu__cuda_transfer(ctx, dst, src, bytes, fn);
#endif
    (void)ctx; (void)fn;
    if (bytes) memmove(dst, src, bytes);
    return MGPU_OK;
}

static mgpu_tensor *mgpu__tensor_persistent(mgpu_context *ctx, mgpu_dtype dtype, int ndim, const int64_t *shape, void *wrap, const char *fn) {
    mgpu_tensor *t;
    int64_t numel;
    if (!ctx) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: ctx is NULL", fn);
    if (!mgpu__dtype_valid(dtype)) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: dtype %d is not a valid mgpu_dtype", fn, (int)dtype);
    numel = mgpu__shape_numel(ndim, shape, fn);
    if (numel < 0) return NULL;
    t = (mgpu_tensor *)mgpu__alloc(sizeof *t, "a tensor header");
    if (!t) return NULL;
    mgpu__tensor_init_header(t, ctx, dtype, ndim, shape, numel);
    if (wrap) { t->data = wrap; return t; }
    t->data = mgpu__tensor_memory(ctx, (size_t)numel * mgpu__dtype_sizes[dtype]);
    if (!t->data) { mgpu_free(t); return NULL; }
    t->owns_data = 1;
    return t;
}

MGPU_API mgpu_tensor *mgpu_tensor_create(mgpu_context *ctx, mgpu_dtype dtype, int ndim, const int64_t *shape) {
    return mgpu__tensor_persistent(ctx, dtype, ndim, shape, NULL, "mgpu_tensor_create");
}
MGPU_API mgpu_tensor *mgpu_tensor_wrap(mgpu_context *ctx, mgpu_dtype dtype, int ndim, const int64_t *shape, void *data) {
    if (!data) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_tensor_wrap: data is NULL");
    return mgpu__tensor_persistent(ctx, dtype, ndim, shape, data, "mgpu_tensor_wrap");
}
MGPU_API mgpu_tensor *mgpu_tensor_from_host(mgpu_context *ctx, mgpu_dtype dtype, int ndim, const int64_t *shape, const void *host) {
    mgpu_tensor *t;
    if (!host) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_tensor_from_host: host is NULL");
    t = mgpu__tensor_persistent(ctx, dtype, ndim, shape, NULL, "mgpu_tensor_from_host");
    if (t && mgpu__transfer(ctx, t->data, host, mgpu_tensor_nbytes(t), "mgpu_tensor_from_host") != MGPU_OK) { mgpu_tensor_free(t); return NULL; }
    return t;
}
MGPU_API void mgpu_tensor_free(mgpu_tensor *t) {
    if (!t || t->is_arena) return;
    if (t->grad) mgpu_tensor_free(t->grad);
#ifdef MGPU_CUDA
    if (t->owns_data && t->device.type == MGPU_DEVICE_CUDA) { mgpu__cuda_release(t->device.index, t->data); mgpu_free(t); return; }
#endif
    if (t->owns_data) mgpu_free(t->data);
    mgpu_free(t);
}
MGPU_API size_t mgpu_tensor_nbytes(const mgpu_tensor *t) {
    return t ? (size_t)t->numel * mgpu_dtype_size(t->dtype) : 0;
}

/* Activation tensor in the arena, data uninitialised. Ops create their outputs with this. */
static MGPU__UNUSED mgpu_tensor *mgpu__new_activation(mgpu_context *ctx, mgpu_dtype dtype, int ndim, const int64_t *shape) {
    mgpu_tensor *t;
    int64_t numel = mgpu__shape_numel(ndim, shape, "activation");
    if (numel < 0) return NULL;
    t = (mgpu_tensor *)mgpu__arena_alloc(ctx, sizeof *t);
    if (!t) return NULL;
    mgpu__tensor_init_header(t, ctx, dtype, ndim, shape, numel);
    t->is_arena = 1;
    t->data = mgpu__arena_alloc_data(ctx, (size_t)numel * mgpu__dtype_sizes[dtype]);
    return t->data ? t : NULL;
}
static MGPU__UNUSED mgpu_tensor *mgpu__new_activation_zeros(mgpu_context *ctx, mgpu_dtype dtype, int ndim, const int64_t *shape) {
    mgpu_tensor *t = mgpu__new_activation(ctx, dtype, ndim, shape);
    return t && mgpu_tensor_fill(t, 0.0) == MGPU_OK ? t : NULL;
}
/* Scratch that only a CUDA twin uses (partial sums, sort keys), in device memory for the rest of
   the step and 256-byte aligned; *out is NULL on the CPU, whose twins need none. */
static MGPU__UNUSED mgpu_result mgpu__cuda_scratch(mgpu_context *ctx, size_t bytes, void **out) {
    *out = NULL;
    if (ctx->device.type != MGPU_DEVICE_CUDA) return MGPU_OK;
    *out = mgpu__arena_alloc_data(ctx, bytes);
    return *out ? MGPU_OK : mgpu_last_result();
}
/* An activation sharing x's data with a new shape (reshape/flatten views). */
static MGPU__UNUSED mgpu_tensor *mgpu__new_view(mgpu_context *ctx, mgpu_tensor *x, int ndim, const int64_t *shape) {
    mgpu_tensor *t = (mgpu_tensor *)mgpu__arena_alloc(ctx, sizeof *t);
    if (!t) return NULL;
    mgpu__tensor_init_header(t, ctx, x->dtype, ndim, shape, x->numel);
    t->is_arena = 1;
    t->data = x->data;
    return t;
}

MGPU_API mgpu_result mgpu_tensor_copy_to_host(const mgpu_tensor *t, void *dst, size_t dst_bytes) {
    if (!t || !dst) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_copy_to_host: tensor and dst must not be NULL");
    if (dst_bytes < mgpu_tensor_nbytes(t))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_copy_to_host: dst has %zu bytes, tensor needs %zu", dst_bytes, mgpu_tensor_nbytes(t));
    return mgpu__transfer(t->ctx, dst, t->data, mgpu_tensor_nbytes(t), "mgpu_tensor_copy_to_host");
}
MGPU_API mgpu_result mgpu_tensor_copy_from_host(mgpu_tensor *t, const void *src, size_t src_bytes) {
    if (!t || !src) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_copy_from_host: tensor and src must not be NULL");
    if (src_bytes != mgpu_tensor_nbytes(t))
        return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_tensor_copy_from_host: src has %zu bytes, tensor holds %zu", src_bytes, mgpu_tensor_nbytes(t));
    return mgpu__transfer(t->ctx, t->data, src, src_bytes, "mgpu_tensor_copy_from_host");
}
static int mgpu__same_device(mgpu_device a, mgpu_device b) { return a.type == b.type && (a.type == MGPU_DEVICE_CPU || a.index == b.index); }

/* mgpu_tensor_copy between two devices: through the host side, staged when neither is the host. */
static mgpu_result mgpu__copy_across_devices(mgpu_tensor *dst, const mgpu_tensor *src) {
    size_t bytes = mgpu_tensor_nbytes(src);
    void *stage;
    mgpu_result r;
    if (mgpu__on_host(src)) return mgpu_tensor_copy_from_host(dst, src->data, bytes);
    if (mgpu__on_host(dst)) return mgpu_tensor_copy_to_host(src, dst->data, bytes);
    stage = mgpu__alloc(bytes, "staging a copy between two GPUs");
    if (!stage) return MGPU_ERR_OOM_HOST;
    r = mgpu_tensor_copy_to_host(src, stage, bytes);
    if (r == MGPU_OK) r = mgpu_tensor_copy_from_host(dst, stage, bytes);
    mgpu_free(stage);
    return r;
}
static void mgpu__cpu_accumulate(const mgpu__accumulate_args *a);   /* with the elementwise ops */
/* memmove: mgpu_tensor_wrap lets users hand in arrays of their own that may overlap */
static void mgpu__cpu_copy(const mgpu__copy_args *a) { memmove(a->dst, a->src, a->bytes); }

MGPU_API mgpu_result mgpu_tensor_copy(mgpu_tensor *dst, const mgpu_tensor *src) {
    mgpu__copy_args a;
    if (!dst || !src) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_copy: dst and src must not be NULL");
    if (dst->dtype != src->dtype || dst->numel != src->numel)
        return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_tensor_copy: dst is %s x %lld, src is %s x %lld", mgpu_dtype_name(dst->dtype),
                          (long long)dst->numel, mgpu_dtype_name(src->dtype), (long long)src->numel);
    if (dst->data == src->data) return MGPU_OK;
    if (!mgpu__same_device(dst->device, src->device)) return mgpu__copy_across_devices(dst, src);
    a.ctx = dst->ctx; a.src = src->data; a.dst = dst->data; a.bytes = mgpu_tensor_nbytes(src);
    return MGPU__TWIN(dst->ctx, copy, &a);
}

MGPU_API mgpu_tensor *mgpu_tensor_to(mgpu_context *ctx, const mgpu_tensor *src) {
    mgpu_tensor *t;
    if (!ctx || !src) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_tensor_to: ctx and src must not be NULL");
    t = mgpu_tensor_create(ctx, src->dtype, src->ndim, src->shape);
    if (t && mgpu_tensor_copy(t, src) != MGPU_OK) { mgpu_tensor_free(t); return NULL; }
    return t;
}

/* Element i of any dtype as double / stored from double (host tensors). */
static MGPU__UNUSED double mgpu__load(const void *data, mgpu_dtype dt, int64_t i) {
    switch (dt) {
    case MGPU_F32: return ((const float *)data)[i];
    case MGPU_F16: return mgpu_f16_to_f32(((const uint16_t *)data)[i]);
    case MGPU_BF16: return mgpu_bf16_to_f32(((const uint16_t *)data)[i]);
    case MGPU_I32: return ((const int32_t *)data)[i];
    case MGPU_I64: return (double)((const int64_t *)data)[i];
    case MGPU_U8: return ((const uint8_t *)data)[i];
    }
    return NAN;
}
static MGPU__UNUSED void mgpu__store(void *data, mgpu_dtype dt, int64_t i, double v) {
    switch (dt) {
    case MGPU_F32: ((float *)data)[i] = (float)v; break;
    case MGPU_F16: ((uint16_t *)data)[i] = mgpu_f32_to_f16((float)v); break;
    case MGPU_BF16: ((uint16_t *)data)[i] = mgpu_f32_to_bf16((float)v); break;
    case MGPU_I32: ((int32_t *)data)[i] = (int32_t)v; break;
    case MGPU_I64: ((int64_t *)data)[i] = (int64_t)v; break;
    case MGPU_U8: ((uint8_t *)data)[i] = (uint8_t)v; break;
    }
}

static void mgpu__cpu_fill(const mgpu__fill_args *a) {
    int64_t i;
    if (a->value == 0.0) { memset(a->dst, 0, (size_t)a->n * mgpu__dtype_sizes[a->dtype]); return; }
    for (i = 0; i < a->n; i++) mgpu__store(a->dst, a->dtype, i, a->value);
}

/* Zero bytes on ctx's device through the fill twin (U8 view of the bytes). */
static MGPU__UNUSED mgpu_result mgpu__fill_zero_bytes(mgpu_context *ctx, void *dst, size_t bytes) {
    mgpu__fill_args a;
    a.ctx = ctx; a.dst = dst; a.dtype = MGPU_U8; a.n = (int64_t)bytes; a.value = 0.0;
    return MGPU__TWIN(ctx, fill, &a);
}

MGPU_API mgpu_result mgpu_tensor_fill(mgpu_tensor *t, double value) {
    mgpu__fill_args a;
    if (!t) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_fill: tensor is NULL");
    a.ctx = t->ctx; a.dst = t->data; a.dtype = t->dtype; a.n = t->numel; a.value = value;
    return MGPU__TWIN(t->ctx, fill, &a);
}
/* The one host synchronisation a CUDA training step makes (the loss it prints). */
MGPU_API double mgpu_tensor_item(const mgpu_tensor *t) {
    unsigned char first[8];
    if (!t || t->numel < 1) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_item: tensor is NULL or empty"); return NAN; }
    if (mgpu__transfer(t->ctx, first, t->data, mgpu__dtype_sizes[t->dtype], "mgpu_tensor_item") != MGPU_OK) return NAN;
    return mgpu__load(first, t->dtype, 0);
}
/* A scalar read back without a host wait of its own, for the trainer's loss: _begin queues the
   copy of t's first element (into the context's pinned readback word on a GPU) and _end returns
   it, waiting for the stream only if the host has not waited for it since. On an fp16 step the
   loss scaler's found-inf read is such a wait, so the step waits once, not twice. One read may be
   pending per context (the word is shared); t must stay alive until _end. */
typedef struct mgpu__pending_item { const mgpu_tensor *t; uint64_t waits; int queued; } mgpu__pending_item;
static void mgpu__item_begin(const mgpu_tensor *t, mgpu__pending_item *p) {
    p->t = t; p->queued = 0; p->waits = 0;
#ifdef MGPU_CUDA
    if (t && t->numel > 0 && t->ctx->device.type == MGPU_DEVICE_CUDA && !t->ctx->capture && mgpu__cuda_item_queue(t->ctx, t) == MGPU_OK) {
        p->queued = 1;
        p->waits = t->ctx->host_waits;
    }
#endif
}
static double mgpu__item_end(mgpu__pending_item *p) {
#ifdef MGPU_CUDA
    if (p->queued) {
        mgpu_context *ctx = p->t->ctx;
        p->queued = 0;
        if (ctx->host_waits == p->waits && mgpu__cuda_item_wait(ctx) != MGPU_OK) return NAN;
        return mgpu__load(ctx->readback, p->t->dtype, 0);
    }
#endif
    return mgpu_tensor_item(p->t);   /* the CPU, or the copy could not be queued: the plain read */
}

MGPU_API mgpu_result mgpu_tensor_set_requires_grad(mgpu_tensor *t, int requires_grad) {
    if (!t) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_set_requires_grad: tensor is NULL");
    if (requires_grad && !mgpu__dtype_is_float(t->dtype))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_set_requires_grad: only float tensors can require grad (this one is %s)", mgpu_dtype_name(t->dtype));
    t->requires_grad = requires_grad != 0;
    return MGPU_OK;
}
MGPU_API float *mgpu_tensor_f32(const mgpu_tensor *t) {
    if (!t) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_f32: tensor is NULL"); return NULL; }
    if (t->dtype != MGPU_F32 || !mgpu__on_host(t)) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_f32: tensor is %s on %s, need F32 on cpu", mgpu_dtype_name(t->dtype), t->device.type == MGPU_DEVICE_CPU ? "cpu" : "cuda"); return NULL; }
    return (float *)t->data;
}
MGPU_API int mgpu_tensor_same_shape(const mgpu_tensor *a, const mgpu_tensor *b) {
    if (!a || !b || a->ndim != b->ndim) return 0;
    return memcmp(a->shape, b->shape, sizeof(int64_t) * (size_t)a->ndim) == 0;
}
MGPU_API mgpu_result mgpu_tensor_zero_grad(mgpu_tensor *t) {
    if (!t) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_zero_grad: tensor is NULL");
    return t->grad ? mgpu_tensor_fill(t->grad, 0.0) : MGPU_OK;
}
MGPU_API mgpu_result mgpu_tensor_set_grad_hook(mgpu_tensor *t, mgpu_grad_hook hook, void *user) {
    if (!t) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_set_grad_hook: tensor is NULL");
    if (t->node || t->is_arena) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_set_grad_hook: hooks go on leaf tensors (parameters), not op outputs");
    t->grad_hook = hook; t->grad_hook_user = user;
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   Helpers for op authors
   -------------------------------------------------------------------------------------- */

/* Shape text for messages, in a rotating thread-local buffer (up to 4 per message). */
static MGPU__UNUSED const char *mgpu__shape_str(const mgpu_tensor *t) {
    static MGPU__THREAD_LOCAL char bufs[4][96];
    static MGPU__THREAD_LOCAL int which = 0;
    char *b = bufs[which++ & 3];
    if (!t) return "(null)";
    mgpu_shape_string(t->ndim, t->shape, b, 96);
    return b;
}

/* Input check for ops: NULL input -> NULL quietly (the first error stays); wrong context or
   dtype -> an error naming op and argument. Returns 1 if fine. */
static MGPU__UNUSED int mgpu__check_input(mgpu_context *ctx, const char *op, const char *arg, const mgpu_tensor *t, int want_float) {
    if (!ctx) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: ctx is NULL", op); return 0; }
    if (!t) {
        if (mgpu__error_code == MGPU_OK) mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: %s is NULL", op, arg);
        return 0;
    }
    if (t->device.type != ctx->device.type || t->device.index != ctx->device.index) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: %s is on another device than the context", op, arg);
        return 0;
    }
    if (want_float && t->dtype != MGPU_F32) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: %s must be F32, got %s", op, arg, mgpu_dtype_name(t->dtype));
        return 0;
    }
    return 1;
}
/* Index tensors: I32 or I64. */
static MGPU__UNUSED int mgpu__check_index(mgpu_context *ctx, const char *op, const char *arg, const mgpu_tensor *t) {
    if (!mgpu__check_input(ctx, op, arg, t, 0)) return 0;
    if (t->dtype != MGPU_I32 && t->dtype != MGPU_I64) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: %s must be I32 or I64, got %s", op, arg, mgpu_dtype_name(t->dtype));
        return 0;
    }
    return 1;
}
static MGPU__UNUSED int64_t mgpu__index_at(const mgpu_tensor *t, int64_t i) {
    return t->dtype == MGPU_I64 ? ((const int64_t *)t->data)[i] : (int64_t)((const int32_t *)t->data)[i];
}
/* dim in [-ndim, ndim) -> [0, ndim), or -1 with an error. */
static MGPU__UNUSED int mgpu__norm_dim(const char *op, int dim, int ndim) {
    int d = dim < 0 ? dim + ndim : dim;
    if (d < 0 || d >= ndim) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: dim %d out of range for a %d-d tensor", op, dim, ndim); return -1; }
    return d;
}

/* Record an op on the tape if grad mode is on and an input requires grad. Sets out->requires_grad
   and out->node. Returns the node (fill saved/iarg/farg), or NULL when nothing is recorded
   (check mgpu_last_result only if you need to distinguish allocation failure: *failed is set). */
static MGPU__UNUSED mgpu__node *mgpu__record(mgpu_context *ctx, const char *name, mgpu__backward_fn backward, mgpu_tensor *out,
                                int n_in, mgpu_tensor *const *in, int *failed) {
    mgpu__node *node;
    int i, needs = 0;
    *failed = 0;
    if (!ctx->grad_enabled) return NULL;
    for (i = 0; i < n_in; i++) if (in[i] && in[i]->requires_grad) needs = 1;
    if (!needs) return NULL;
    if (ctx->tape_len == ctx->tape_cap) {
        int64_t cap = ctx->tape_cap ? 2 * ctx->tape_cap : 256;
        mgpu__node **nt = (mgpu__node **)mgpu__alloc(sizeof(mgpu__node *) * (size_t)cap, "the autograd tape");
        if (!nt) { *failed = 1; return NULL; }
        if (ctx->tape_len) memcpy(nt, ctx->tape, sizeof(mgpu__node *) * (size_t)ctx->tape_len);
        mgpu_free(ctx->tape);
        ctx->tape = nt; ctx->tape_cap = cap;
    }
    node = (mgpu__node *)mgpu__arena_alloc(ctx, sizeof *node);
    if (!node) { *failed = 1; return NULL; }
    memset(node, 0, sizeof *node);
    node->in = (mgpu_tensor **)mgpu__arena_alloc(ctx, sizeof(mgpu_tensor *) * (size_t)(n_in > 0 ? n_in : 1));
    if (!node->in) { *failed = 1; return NULL; }
    for (i = 0; i < n_in; i++) node->in[i] = in[i];
    node->n_in = n_in;
    node->backward = backward;
    node->name = name;
    node->out = out;
    out->requires_grad = 1;
    out->node = node;
    ctx->tape[ctx->tape_len++] = node;
    return node;
}
/* Convenience for the common 1- and 2-input cases: NULL return on allocation failure means
   the whole op fails; *rec tells whether a node was recorded. */
#define MGPU__RECORD(ctx, name, bw, out, n, ins, node_var) \
    do { int mgpu__failed_; node_var = mgpu__record((ctx), (name), (bw), (out), (n), (ins), &mgpu__failed_); \
         if (mgpu__failed_) return NULL; } while (0)
/* For ops whose backward needs nothing saved on the node. */
#define MGPU__RECORD_PLAIN(ctx, name, bw, out, n, ins) \
    do { int mgpu__failed_; mgpu__record((ctx), (name), (bw), (out), (n), (ins), &mgpu__failed_); \
         if (mgpu__failed_) return NULL; } while (0)

/* The F32 gradient buffer of t for accumulation, allocated zeroed on first use (persistent for
   leaves, arena for activations); NULL when t does not require grad. */
static MGPU__UNUSED float *mgpu__grad_f32(mgpu_context *ctx, mgpu_tensor *t) {
    if (!t || !t->requires_grad) return NULL;
    if (!t->grad) {
        if (t->is_arena) t->grad = mgpu__new_activation_zeros(ctx, MGPU_F32, t->ndim, t->shape);
        else t->grad = mgpu_tensor_create(ctx, MGPU_F32, t->ndim, t->shape);
        if (!t->grad) return NULL;
    }
    return (float *)t->grad->data;
}
/* Whether a backward should compute the gradient of input i at all. */
static MGPU__UNUSED int mgpu__needs_grad(const mgpu__node *n, int i) { return i < n->n_in && n->in[i] && n->in[i]->requires_grad; }
/* Error for a failed grad allocation inside a backward */
#define MGPU__GRAD_OR_FAIL(ptr, ctx, t) do { ptr = mgpu__grad_f32((ctx), (t)); if (!(ptr)) return mgpu_last_result() ? mgpu_last_result() : MGPU_ERR_OOM_HOST; } while (0)

/* --------------------------------------------------------------------------------------
   Backward
   -------------------------------------------------------------------------------------- */

static int mgpu__is_leaf(const mgpu_tensor *t) { return t && !t->node && !t->is_arena; }

MGPU_API mgpu_result mgpu_backward_with_grad(mgpu_context *ctx, mgpu_tensor *out, const mgpu_tensor *grad_output) {
    int64_t i, first = 0;
    int j;
    float *g;
    if (!ctx || !out || !grad_output) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_backward: ctx, output and its gradient must not be NULL");
    if (!out->requires_grad)
        return mgpu__fail(MGPU_ERR_STATE, "mgpu_backward: the output does not require grad (no parameter or input with requires_grad reached it, or grad mode was off)");
    if (!mgpu_tensor_same_shape(out, grad_output) || grad_output->dtype != MGPU_F32)
        return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_backward: gradient is %s %s, output is %s", mgpu_dtype_name(grad_output->dtype),
                          mgpu__shape_str(grad_output), mgpu__shape_str(out));
    if (out->node && out->node->consumed)
        return mgpu__fail(MGPU_ERR_STATE, "mgpu_backward: this output's graph was already walked by a backward; call mgpu_context_end_step and run the forward again");
    /* walk only nodes not consumed by an earlier backward of this step (micro-batches) */
    while (first < ctx->tape_len && ctx->tape[first]->consumed) first++;
    /* pending contributions per leaf, so the grad-ready hook fires on the last one */
    for (i = first; i < ctx->tape_len; i++)
        for (j = 0; j < ctx->tape[i]->n_in; j++)
            if (mgpu__is_leaf(ctx->tape[i]->in[j])) ctx->tape[i]->in[j]->pending_grads = 0;
    for (i = first; i < ctx->tape_len; i++)
        for (j = 0; j < ctx->tape[i]->n_in; j++)
            if (mgpu__is_leaf(ctx->tape[i]->in[j]) && ctx->tape[i]->in[j]->requires_grad) ctx->tape[i]->in[j]->pending_grads++;
    if (!mgpu__same_device(grad_output->device, ctx->device))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_backward: the gradient is on another device than the context");
    g = mgpu__grad_f32(ctx, out);
    if (!g) return mgpu_last_result();
    {
        mgpu__accumulate_args acc;
        mgpu_result r;
        acc.ctx = ctx; acc.x = (const float *)grad_output->data; acc.out = g; acc.n = out->numel;
        if ((r = MGPU__TWIN(ctx, accumulate, &acc)) != MGPU_OK) return r;
    }
    if (mgpu__is_leaf(out) && out->grad_hook) out->grad_hook(out, out->grad_hook_user);
    for (i = ctx->tape_len - 1; i >= first; i--) {
        mgpu__node *n = ctx->tape[i];
        if (n->out->grad) {
            mgpu_result r = n->backward(ctx, n);
            if (r != MGPU_OK) {
                if (mgpu_last_result() == MGPU_OK) mgpu__fail(r, "mgpu_backward: backward of %s failed", n->name);
                return r;
            }
        }
        n->consumed = 1;
        for (j = 0; j < n->n_in; j++) {
            mgpu_tensor *leaf = n->in[j];
            if (mgpu__is_leaf(leaf) && leaf->requires_grad && --leaf->pending_grads == 0 && leaf->grad_hook && leaf->grad)
                leaf->grad_hook(leaf, leaf->grad_hook_user);
        }
    }
    return ctx->backward_end ? ctx->backward_end(ctx, ctx->backward_end_user) : MGPU_OK;
}

MGPU_API void mgpu_context_set_backward_end_hook(mgpu_context *ctx, mgpu_backward_end_fn fn, void *user) {
    if (!ctx) return;
    ctx->backward_end = fn; ctx->backward_end_user = user;
}

MGPU_API mgpu_result mgpu_backward(mgpu_context *ctx, mgpu_tensor *loss) {
    mgpu_tensor *one;
    if (!ctx || !loss) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_backward: ctx and loss must not be NULL");
    if (loss->numel != 1) return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_backward: loss must be a scalar, got shape %s (use mgpu_backward_with_grad)", mgpu__shape_str(loss));
    /* d loss / d loss = 1, made where the loss lives so no host value crosses to the device */
    one = mgpu__new_activation(ctx, MGPU_F32, loss->ndim, loss->shape);
    if (!one || mgpu_tensor_fill(one, 1.0) != MGPU_OK) return mgpu_last_result();
    return mgpu_backward_with_grad(ctx, loss, one);
}

