/* CUDA host side: host side of the CUDA backend (compiled only under MGPU_CUDA): the error bridge
   used by mgpu_kernels.cu, a caching device allocator with statistics, pinned host buffers, async
   copies, per-device stream + cuBLAS resources, and CUDA Graph capture of a training step.
   Kernels live in mgpu_kernels.cu. */
#ifndef MGPU__CUDA_HOST_H
#define MGPU__CUDA_HOST_H
#ifdef MGPU_CUDA
#if defined(MGPU_IMPLEMENTATION)

/* Kernels report failures as a code and a finished sentence; this files it as this thread's error. */
void mgpu__set_error_from_cuda(int code, const char *msg) { mgpu__fail((mgpu_result)code, "%s", msg); }

static mgpu_result mgpu__cuda_fail(cudaError_t e, const char *fn, const char *call) {
    (void)cudaGetLastError();   /* reported, so handled: the next launch check must not find it again */
    return mgpu__fail(e == cudaErrorMemoryAllocation ? MGPU_ERR_OOM_DEVICE : MGPU_ERR_CUDA, "%s: %s failed: %s (%s)", fn, call,
                      cudaGetErrorString(e), cudaGetErrorName(e));
}
#define MGPU__CUDA_TRY(fn, call) do { cudaError_t e_ = (call); if (e_ != cudaSuccess) return mgpu__cuda_fail(e_, fn, #call); } while (0)

/* --------------------------------------------------------------------------------------
   Caching device allocator. Requests are rounded to a size class (512 B steps below 1 MiB, 2 MiB
   steps above), freed blocks stay reserved and are handed out again best-fit (at most 25% larger),
   so a training loop stops calling cudaMalloc/cudaFree after its first step. One lock for all
   devices: allocation is rare next to kernel launches.
   -------------------------------------------------------------------------------------- */

#define MGPU__CUDA_MAX_DEVICES 64
typedef struct mgpu__cuda_block { void *ptr; size_t size; int in_use; } mgpu__cuda_block;
typedef struct mgpu__cuda_pool { mgpu__cuda_block *blocks; int n, cap; int64_t allocated, reserved, peak; } mgpu__cuda_pool;
static mgpu__cuda_pool mgpu__cuda_pools[MGPU__CUDA_MAX_DEVICES];
static pthread_mutex_t mgpu__cuda_pool_mu = PTHREAD_MUTEX_INITIALIZER;

static size_t mgpu__cuda_size_class(size_t bytes) {
    const size_t small = 512, large = (size_t)2 << 20;
    if (bytes == 0) bytes = 1;
    return bytes < ((size_t)1 << 20) ? (bytes + small - 1) / small * small : (bytes + large - 1) / large * large;
}

static int mgpu__cuda_device_ok(int device, const char *fn) {
    int n = mgpu_cuda_device_count();
    if (n < 0) return 0;   /* CUDA itself failed: that error stands */
    if (device < 0 || device >= MGPU__CUDA_MAX_DEVICES || device >= n) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: device %d is not a visible CUDA device (%d visible)", fn, device, n);
        return 0;
    }
    return 1;
}

/* Best-fit free block of at least `size` and at most 25% larger; -1 if none. Caller holds the lock. */
static int mgpu__cuda_pool_find(const mgpu__cuda_pool *p, size_t size) {
    int i, best = -1;
    for (i = 0; i < p->n; i++) {
        const mgpu__cuda_block *b = &p->blocks[i];
        if (b->in_use || b->size < size || b->size > size + size / 4) continue;
        if (best < 0 || b->size < p->blocks[best].size) best = i;
    }
    return best;
}

/* Returns cached blocks of one device to the driver. Caller holds the lock and has set the device. */
static void mgpu__cuda_pool_release_free(mgpu__cuda_pool *p) {
    int i, kept = 0;
    for (i = 0; i < p->n; i++) {
        if (p->blocks[i].in_use) { p->blocks[kept++] = p->blocks[i]; continue; }
        cudaFree(p->blocks[i].ptr);
        p->reserved -= (int64_t)p->blocks[i].size;
    }
    p->n = kept;
}

static int mgpu__cuda_pool_push(mgpu__cuda_pool *p, void *ptr, size_t size) {
    if (p->n == p->cap) {
        int cap = p->cap ? 2 * p->cap : 64;
        mgpu__cuda_block *nb = (mgpu__cuda_block *)realloc(p->blocks, sizeof(mgpu__cuda_block) * (size_t)cap);
        if (!nb) return 0;
        p->blocks = nb; p->cap = cap;
    }
    p->blocks[p->n].ptr = ptr; p->blocks[p->n].size = size; p->blocks[p->n].in_use = 1;
    p->n++;
    return 1;
}

static void mgpu__cuda_pool_account(mgpu__cuda_pool *p, int64_t delta) {
    p->allocated += delta;
    if (p->allocated > p->peak) p->peak = p->allocated;
}

static double mgpu__mib(int64_t bytes) { return (double)bytes / (1024.0 * 1024.0); }

/* cudaMalloc on a miss; on OOM the cache is emptied once and the call retried. Caller holds the
   lock. An OOM names what was being allocated, its size and the free memory, as a user needs to
   choose a smaller batch. */
static void *mgpu__cuda_pool_grow(mgpu__cuda_pool *p, int device, size_t size, const char *what) {
    void *ptr = NULL;
    cudaError_t e = cudaMalloc(&ptr, size);
    if (e == cudaErrorMemoryAllocation) {
        cudaGetLastError();   /* clear the error before retrying */
        mgpu__cuda_pool_release_free(p);
        e = cudaMalloc(&ptr, size);
    }
    if (e == cudaErrorMemoryAllocation) {
        size_t free_b = 0, total_b = 0;
        cudaGetLastError();
        cudaMemGetInfo(&free_b, &total_b);
        mgpu__fail(MGPU_ERR_OOM_DEVICE,
                   "out of memory on cuda:%d allocating %.1f MiB for %s: %.1f MiB free of %.1f MiB (mgpu holds %.1f MiB in tensors, "
                   "%.1f MiB reserved); try a smaller --batch-size or --amp bf16",
                   device, mgpu__mib((int64_t)size), what, mgpu__mib((int64_t)free_b), mgpu__mib((int64_t)total_b),
                   mgpu__mib(p->allocated), mgpu__mib(p->reserved));
        return NULL;
    }
    if (e != cudaSuccess) {
        mgpu__fail(MGPU_ERR_CUDA, "cudaMalloc of %zu bytes for %s on cuda:%d failed: %s", size, what, device, cudaGetErrorString(e));
        return NULL;
    }
    if (!mgpu__cuda_pool_push(p, ptr, size)) {
        cudaFree(ptr);
        mgpu__fail(MGPU_ERR_OOM_HOST, "mgpu_cuda_malloc: no host memory for the allocator's block table");
        return NULL;
    }
    p->reserved += (int64_t)size;
    return ptr;
}

static void *mgpu__cuda_alloc_for(int device, size_t bytes, const char *what) {
    mgpu__cuda_pool *p;
    size_t size = mgpu__cuda_size_class(bytes);
    void *ptr = NULL;
    int prev = 0, hit;
    if (!mgpu__cuda_device_ok(device, "mgpu_cuda_malloc")) return NULL;
    if (cudaGetDevice(&prev) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
        mgpu__fail(MGPU_ERR_CUDA, "mgpu_cuda_malloc: cudaSetDevice(%d) failed", device);
        return NULL;
    }
    pthread_mutex_lock(&mgpu__cuda_pool_mu);
    p = &mgpu__cuda_pools[device];
    hit = mgpu__cuda_pool_find(p, size);
    if (hit >= 0) { p->blocks[hit].in_use = 1; ptr = p->blocks[hit].ptr; size = p->blocks[hit].size; }
    else ptr = mgpu__cuda_pool_grow(p, device, size, what);
    if (ptr) mgpu__cuda_pool_account(p, (int64_t)size);
    pthread_mutex_unlock(&mgpu__cuda_pool_mu);
    cudaSetDevice(prev);
    return ptr;
}

MGPU_API void *mgpu_cuda_malloc(int device, size_t bytes) { return mgpu__cuda_alloc_for(device, bytes, "a buffer"); }

/* The block goes back to the cache, not to the driver. Work still queued on it must be ordered
   before its next user: the context uses one stream per device, so stream order guarantees it. */
MGPU_API void mgpu_cuda_free(int device, void *ptr) { mgpu__cuda_release(device, ptr); }
static void mgpu__cuda_release(int device, void *ptr) {
    mgpu__cuda_pool *p;
    int i, found = 0;
    if (!ptr) return;
    if (!mgpu__cuda_device_ok(device, "mgpu_cuda_free")) return;
    pthread_mutex_lock(&mgpu__cuda_pool_mu);
    p = &mgpu__cuda_pools[device];
    for (i = 0; i < p->n; i++)
        if (p->blocks[i].ptr == ptr && p->blocks[i].in_use) {
            p->blocks[i].in_use = 0;
            mgpu__cuda_pool_account(p, -(int64_t)p->blocks[i].size);
            found = 1;
            break;
        }
    pthread_mutex_unlock(&mgpu__cuda_pool_mu);
    if (!found) mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_cuda_free: %p was not allocated by mgpu_cuda_malloc on cuda:%d (or freed twice)", ptr, device);
}

MGPU_API mgpu_result mgpu_cuda_empty_cache(int device) {
    int prev = 0;
    if (!mgpu__cuda_device_ok(device, "mgpu_cuda_empty_cache")) return MGPU_ERR_INVALID_ARG;
    MGPU__CUDA_TRY("mgpu_cuda_empty_cache", cudaGetDevice(&prev));
    MGPU__CUDA_TRY("mgpu_cuda_empty_cache", cudaSetDevice(device));
    MGPU__CUDA_TRY("mgpu_cuda_empty_cache", cudaDeviceSynchronize());   /* no kernel may still use a cached block */
    pthread_mutex_lock(&mgpu__cuda_pool_mu);
    mgpu__cuda_pool_release_free(&mgpu__cuda_pools[device]);
    pthread_mutex_unlock(&mgpu__cuda_pool_mu);
    MGPU__CUDA_TRY("mgpu_cuda_empty_cache", cudaSetDevice(prev));
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_memory_stats_get(int device, mgpu_memory_stats *out) {
    const mgpu__cuda_pool *p;
    if (!out) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_memory_stats_get: out is NULL");
    memset(out, 0, sizeof *out);
    if (!mgpu__cuda_device_ok(device, "mgpu_memory_stats_get")) return MGPU_ERR_INVALID_ARG;
    pthread_mutex_lock(&mgpu__cuda_pool_mu);
    p = &mgpu__cuda_pools[device];
    out->allocated = p->allocated; out->reserved = p->reserved; out->peak = p->peak;
    pthread_mutex_unlock(&mgpu__cuda_pool_mu);
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   Pinned host memory and async copies
   -------------------------------------------------------------------------------------- */

MGPU_API void *mgpu_cuda_host_alloc(size_t bytes) {
    void *p = NULL;
    cudaError_t e = cudaMallocHost(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        mgpu__fail(MGPU_ERR_OOM_HOST, "mgpu_cuda_host_alloc: cudaMallocHost of %zu bytes failed: %s", bytes, cudaGetErrorString(e));
        return NULL;
    }
    return p;
}
MGPU_API void mgpu_cuda_host_free(void *ptr) { if (ptr) cudaFreeHost(ptr); }

static mgpu_result mgpu__cuda_copy_async(const char *fn, void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind, void *stream) {
    if (bytes == 0) return MGPU_OK;
    if (!dst || !src) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: dst and src must not be NULL", fn);
    MGPU__CUDA_TRY(fn, cudaMemcpyAsync(dst, src, bytes, kind, (cudaStream_t)stream));
    return MGPU_OK;
}
MGPU_API mgpu_result mgpu_cuda_copy_h2d_async(void *dst, const void *src, size_t bytes, void *stream) {
    return mgpu__cuda_copy_async("mgpu_cuda_copy_h2d_async", dst, src, bytes, cudaMemcpyHostToDevice, stream);
}
MGPU_API mgpu_result mgpu_cuda_copy_d2h_async(void *dst, const void *src, size_t bytes, void *stream) {
    return mgpu__cuda_copy_async("mgpu_cuda_copy_d2h_async", dst, src, bytes, cudaMemcpyDeviceToHost, stream);
}
MGPU_API mgpu_result mgpu_cuda_copy_d2d_async(void *dst, const void *src, size_t bytes, void *stream) {
    return mgpu__cuda_copy_async("mgpu_cuda_copy_d2d_async", dst, src, bytes, cudaMemcpyDeviceToDevice, stream);
}

/* "NAME, N GiB" of a device for messages such as the trainer's startup line; "unknown device"
   where the properties cannot be read (the error is cleared: a description never fails a run). */
static void mgpu__cuda_device_describe(int device, char *buf, size_t size) {
    struct cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, device) != cudaSuccess) {
        cudaGetLastError();
        snprintf(buf, size, "unknown device");
        return;
    }
    snprintf(buf, size, "%s, %.0f GiB", p.name, (double)p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
}

/* --------------------------------------------------------------------------------------
   Per-device resources of a context
   -------------------------------------------------------------------------------------- */

MGPU_API mgpu_result mgpu_cuda_device_ctx_init(mgpu_cuda_device_ctx *d, int device) {
    cudaStream_t s = NULL;
    mgpu_result r;
    if (!d) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_cuda_device_ctx_init: d is NULL");
    memset(d, 0, sizeof *d);
    if (!mgpu__cuda_device_ok(device, "mgpu_cuda_device_ctx_init")) return MGPU_ERR_INVALID_ARG;
    MGPU__CUDA_TRY("mgpu_cuda_device_ctx_init", cudaSetDevice(device));
    /* non-blocking: the legacy default stream must not serialise against the step */
    MGPU__CUDA_TRY("mgpu_cuda_device_ctx_init", cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    d->device = device; d->stream = (void *)s;
    r = mgpu_cuda_blas_create(&d->blas, d->stream, 0);
    if (r != MGPU_OK) { mgpu_cuda_device_ctx_release(d); return r; }
    return MGPU_OK;
}
MGPU_API void mgpu_cuda_device_ctx_release(mgpu_cuda_device_ctx *d) {
    if (!d) return;
    if (d->stream) cudaStreamSynchronize((cudaStream_t)d->stream);
    mgpu_cuda_blas_destroy(d->blas);
    if (d->stream) cudaStreamDestroy((cudaStream_t)d->stream);
    memset(d, 0, sizeof *d);
}

/* --------------------------------------------------------------------------------------
   The core's CUDA side: a context's stream and cuBLAS(Lt) handles, and its host<->device copies
   -------------------------------------------------------------------------------------- */

static mgpu_result mgpu__cuda_context_init(mgpu_context *ctx) {
    mgpu_cuda_device_ctx d;
    mgpu_result r = mgpu_cuda_device_ctx_init(&d, ctx->device.index);   /* also makes the device current */
    if (r != MGPU_OK) return r;
    ctx->cuda_stream = d.stream;
    ctx->cuda_blas = d.blas;
    return MGPU_OK;
}
static void mgpu__cuda_context_release(mgpu_context *ctx) {
    mgpu_cuda_device_ctx d;
    if (!ctx->cuda_stream) return;
    d.device = ctx->device.index; d.stream = ctx->cuda_stream; d.blas = ctx->cuda_blas;
    mgpu_cuda_device_ctx_release(&d);   /* synchronises the stream first */
    ctx->cuda_stream = ctx->cuda_blas = NULL;
    mgpu_cuda_host_free(ctx->readback);
    ctx->readback = NULL;
}

static mgpu_result mgpu__cuda_transfer(mgpu_context *ctx, void *dst, const void *src, size_t bytes, const char *fn) {
    if (bytes == 0) return MGPU_OK;
    /* cudaMemcpyDefault: unified addressing tells host from device pointers, either way round */
    MGPU__CUDA_TRY(fn, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, (cudaStream_t)ctx->cuda_stream));
    MGPU__CUDA_TRY(fn, cudaStreamSynchronize((cudaStream_t)ctx->cuda_stream));
    ctx->host_waits++;   /* everything queued so far has run: an mgpu__item_begin copy too */
    return MGPU_OK;
}

/* mgpu__item_begin's halves on a GPU: the copy into pinned memory (so that it is asynchronous),
   and the wait that makes it readable when no other wait came first. */
static mgpu_result mgpu__cuda_item_queue(mgpu_context *ctx, const mgpu_tensor *t) {
    if (!ctx->readback && !(ctx->readback = mgpu_cuda_host_alloc(8))) return mgpu_last_result();
    MGPU__CUDA_TRY("reading a scalar back", cudaMemcpyAsync(ctx->readback, t->data, mgpu__dtype_sizes[t->dtype], cudaMemcpyDeviceToHost,
                                                             (cudaStream_t)ctx->cuda_stream));
    return MGPU_OK;
}
static mgpu_result mgpu__cuda_item_wait(mgpu_context *ctx) {
    MGPU__CUDA_TRY("reading a scalar back", cudaStreamSynchronize((cudaStream_t)ctx->cuda_stream));
    ctx->host_waits++;
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   Uploads on a stream of their own (the loader's batches), in two halves so that the copy of the
   next batch can run while the consumer stream computes on the current one:
   - start: the copies wait for the work already queued on the consumer stream (which may still
     read the destination: the step that used it last), run on the copy stream, and `copied` is
     recorded after them;
   - consume: the consumer stream waits for `copied` (queued just before the step that reads the
     batch, so the steps queued in between do not wait for the copy).
   The host waits for `copied` (finish) before it reuses the pinned sources.
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__cuda_upload { void *consumer_mark, *copied; } mgpu__cuda_upload;
typedef struct mgpu__cuda_copy { void *dst; const void *src; size_t bytes; } mgpu__cuda_copy;

static mgpu_result mgpu__cuda_stream_new(int device, void **out) {
    cudaStream_t s = NULL;
    MGPU__CUDA_TRY("a copy stream", cudaSetDevice(device));
    MGPU__CUDA_TRY("a copy stream", cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    *out = (void *)s;
    return MGPU_OK;
}
static void mgpu__cuda_stream_free(void *stream) {
    if (!stream) return;
    cudaStreamSynchronize((cudaStream_t)stream);
    cudaStreamDestroy((cudaStream_t)stream);
}
static mgpu_result mgpu__cuda_upload_start(mgpu__cuda_upload *u, void *copy_stream, void *consumer, const mgpu__cuda_copy *copies, int n) {
    static const char *fn = "uploading a batch to the GPU";
    int i;
    if (!u->consumer_mark) MGPU__CUDA_TRY(fn, cudaEventCreateWithFlags((cudaEvent_t *)&u->consumer_mark, cudaEventDisableTiming));
    if (!u->copied) MGPU__CUDA_TRY(fn, cudaEventCreateWithFlags((cudaEvent_t *)&u->copied, cudaEventDisableTiming));
    MGPU__CUDA_TRY(fn, cudaEventRecord((cudaEvent_t)u->consumer_mark, (cudaStream_t)consumer));
    MGPU__CUDA_TRY(fn, cudaStreamWaitEvent((cudaStream_t)copy_stream, (cudaEvent_t)u->consumer_mark, 0));
    for (i = 0; i < n; i++)
        if (copies[i].bytes)
            MGPU__CUDA_TRY(fn, cudaMemcpyAsync(copies[i].dst, copies[i].src, copies[i].bytes, cudaMemcpyHostToDevice, (cudaStream_t)copy_stream));
    MGPU__CUDA_TRY(fn, cudaEventRecord((cudaEvent_t)u->copied, (cudaStream_t)copy_stream));
    return MGPU_OK;
}
/* Work queued on the consumer after this sees the uploaded batch. */
static mgpu_result mgpu__cuda_upload_consume(mgpu__cuda_upload *u, void *consumer) {
    if (!u->copied) return mgpu__fail(MGPU_ERR_STATE, "a batch is handed out before its upload was started (loader bug)");
    MGPU__CUDA_TRY("waiting for a batch upload on the GPU", cudaStreamWaitEvent((cudaStream_t)consumer, (cudaEvent_t)u->copied, 0));
    return MGPU_OK;
}
/* The sources may be overwritten once this returns. */
static mgpu_result mgpu__cuda_upload_finish(mgpu__cuda_upload *u) {
    if (u->copied) MGPU__CUDA_TRY("waiting for a batch upload", cudaEventSynchronize((cudaEvent_t)u->copied));
    return MGPU_OK;
}
static void mgpu__cuda_upload_release(mgpu__cuda_upload *u) {
    if (u->consumer_mark) cudaEventDestroy((cudaEvent_t)u->consumer_mark);
    if (u->copied) cudaEventDestroy((cudaEvent_t)u->copied);
    u->consumer_mark = u->copied = NULL;
}

/* Free memory of a device as the driver counts it (blocks the caching allocator keeps count as used). */
static mgpu_result mgpu__cuda_free_bytes(int device, size_t *free_b) {
    size_t total = 0;
    int prev = 0;
    *free_b = 0;
    MGPU__CUDA_TRY("reading free device memory", cudaGetDevice(&prev));
    MGPU__CUDA_TRY("reading free device memory", cudaSetDevice(device));
    MGPU__CUDA_TRY("reading free device memory", cudaMemGetInfo(free_b, &total));
    MGPU__CUDA_TRY("reading free device memory", cudaSetDevice(prev));
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   CUDA Graphs: capture one step (forward, backward, optimizer) and replay it with one launch.
   Everything captured must use fixed device addresses (arena, cached blocks) and no host sync.
   -------------------------------------------------------------------------------------- */

MGPU_API mgpu_result mgpu_cuda_graph_begin(mgpu_cuda_graph *g, void *stream) {
    if (!g || !stream) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_cuda_graph_begin: g and stream must not be NULL (the legacy stream cannot be captured)");
    mgpu_cuda_graph_destroy(g);
    MGPU__CUDA_TRY("mgpu_cuda_graph_begin", cudaStreamBeginCapture((cudaStream_t)stream, cudaStreamCaptureModeThreadLocal));
    return MGPU_OK;
}
MGPU_API mgpu_result mgpu_cuda_graph_end(mgpu_cuda_graph *g, void *stream) {
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    if (!g || !stream) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_cuda_graph_end: g and stream must not be NULL");
    MGPU__CUDA_TRY("mgpu_cuda_graph_end", cudaStreamEndCapture((cudaStream_t)stream, &graph));
    cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
    if (e != cudaSuccess) {
        cudaGraphDestroy(graph);
        return mgpu__cuda_fail(e, "mgpu_cuda_graph_end", "cudaGraphInstantiate");
    }
    g->graph = (void *)graph; g->exec = (void *)exec; g->captured = 1;
    return MGPU_OK;
}
MGPU_API mgpu_result mgpu_cuda_graph_launch(mgpu_cuda_graph *g, void *stream) {
    if (!g || !g->captured) return mgpu__fail(MGPU_ERR_STATE, "mgpu_cuda_graph_launch: no graph captured (call mgpu_cuda_graph_begin/end first)");
    MGPU__CUDA_TRY("mgpu_cuda_graph_launch", cudaGraphLaunch((cudaGraphExec_t)g->exec, (cudaStream_t)stream));
    return MGPU_OK;
}
MGPU_API void mgpu_cuda_graph_destroy(mgpu_cuda_graph *g) {
    if (!g) return;
    if (g->exec) cudaGraphExecDestroy((cudaGraphExec_t)g->exec);
    if (g->graph) cudaGraphDestroy((cudaGraph_t)g->graph);
    g->graph = g->exec = NULL; g->captured = 0;
}

/* --------------------------------------------------------------------------------------
   A training step captured as a CUDA Graph (the trainer's --cuda-graph on). The graph holds device
   addresses, so everything it touches must stay where it is between replays, whatever the
   uncaptured work in between does (evaluation growing the arena, a last partial batch, cuBLAS
   growing its scratch): the step runs in a private pool, as PyTorch's graph memory pools, made of
   its own activation arena and its own cuBLAS(Lt) bundle (workspace set with cublasSetWorkspace,
   Lt workspace pointer, scratch and half-precision buffers). The eager warm-up steps of the same
   shape run in that pool too, so it has grown to the step's size before the capture, which then
   allocates nothing. Per-step values come from the step scalars (see mgpu__step_capture).
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__step_graph {
    mgpu_context *ctx;
    mgpu_cuda_graph graph;
    mgpu__step_capture capture;
    mgpu__arena arena;                 /* private activation arena (swapped with ctx->device_arena) */
    void *blas;                        /* private cuBLAS bundle (swapped with ctx->cuda_blas) */
    int inside;                        /* the context uses the private pool now */
} mgpu__step_graph;

/* The context's step runs in the graph's private pool from here to mgpu__step_graph_use(g, 0). */
static void mgpu__step_graph_use(mgpu__step_graph *g, int inside) {
    mgpu__arena a;
    void *b;
    if (g->inside == inside) return;
    a = g->ctx->device_arena; g->ctx->device_arena = g->arena; g->arena = a;
    b = g->ctx->cuda_blas; g->ctx->cuda_blas = g->blas; g->blas = b;
    g->inside = inside;
}

static void mgpu__step_graph_destroy(mgpu__step_graph *g) {
    if (!g) return;
    mgpu__step_graph_use(g, 0);
    if (g->ctx->capture == &g->capture) g->ctx->capture = NULL;
    cudaStreamSynchronize((cudaStream_t)g->ctx->cuda_stream);   /* no replay may still use the pool */
    mgpu_cuda_graph_destroy(&g->graph);
    mgpu__arena_free(&g->arena);
    mgpu_cuda_blas_destroy(g->blas);
    if (g->capture.device_words) mgpu__cuda_release(g->ctx->device.index, g->capture.device_words);
    mgpu_free(g);
}

static mgpu__step_graph *mgpu__step_graph_create(mgpu_context *ctx) {
    mgpu__step_graph *g = (mgpu__step_graph *)mgpu__calloc(sizeof *g, "a CUDA Graph of the training step");
    if (!g) return NULL;
    g->ctx = ctx;
    g->arena = ctx->device_arena;   /* same device and initial size, no chunk yet */
    g->arena.head = NULL; g->arena.total_used = g->arena.peak = 0;
    g->capture.device_words = (uint64_t *)mgpu__cuda_alloc_for(ctx->device.index, sizeof(uint64_t) * MGPU__STEP_SLOTS, "CUDA Graph step scalars");
    if (!g->capture.device_words || mgpu_cuda_blas_create(&g->blas, ctx->cuda_stream, 0) != MGPU_OK) { mgpu__step_graph_destroy(g); return NULL; }
    return g;
}

/* Starts recording the context's stream: ops now register step scalars instead of using host
   values, and change no host state. */
static mgpu_result mgpu__step_graph_begin(mgpu__step_graph *g) {
    mgpu_result r;
    g->capture.n_words = g->capture.n_hooks = 0;
    if ((r = mgpu_cuda_graph_begin(&g->graph, g->ctx->cuda_stream)) != MGPU_OK) return r;
    g->ctx->capture = &g->capture;
    return MGPU_OK;
}

/* Ends the recording. failed: the step failed while recorded (its error stands); the capture is
   ended and thrown away either way, leaving the stream usable for uncaptured steps. */
static mgpu_result mgpu__step_graph_end(mgpu__step_graph *g, int failed) {
    cudaGraph_t graph = NULL;
    mgpu_result r;
    g->ctx->capture = NULL;
    if (failed) {
        cudaStreamEndCapture((cudaStream_t)g->ctx->cuda_stream, &graph);
        if (graph) cudaGraphDestroy(graph);
        cudaGetLastError();
        return mgpu_last_result() != MGPU_OK ? mgpu_last_result() : MGPU_ERR_STATE;
    }
    if ((r = mgpu_cuda_graph_end(&g->graph, g->ctx->cuda_stream)) != MGPU_OK) cudaGetLastError();
    return r;
}

/* One replay: the hooks redo the host work of an eager step and fill the step scalars, one
   kernel stores them (its argument is copied at launch), then the graph runs on the stream. */
static mgpu_result mgpu__step_graph_launch(mgpu__step_graph *g) {
    mgpu__step_capture *c = &g->capture;
    mgpu_result r;
    int i;
    memset(&c->host, 0, sizeof c->host);
    for (i = 0; i < c->n_hooks; i++)
        if ((r = c->hooks[i].fn(c->hooks[i].obj, c->hooks[i].arg, c->host.w + c->hooks[i].word)) != MGPU_OK) return r;
    if ((r = mgpu_cuda_set_step_words(c->device_words, &c->host, c->n_words, g->ctx->cuda_stream)) != MGPU_OK) return r;
    return mgpu_cuda_graph_launch(&g->graph, g->ctx->cuda_stream);
}

#endif /* MGPU_IMPLEMENTATION */
#endif /* MGPU_CUDA */
#endif /* MGPU__CUDA_HOST_H */
