/* ======================================================================================
   DDP and DP
   ====================================================================================== */

/* DistributedDataParallel: parameters broadcast from rank 0, gradients bucketed in reverse
   registration order (the order backward makes them ready) and all-reduced asynchronously while
   backward goes on; SyncBatchNorm; dropout masks of the combined batch. DataParallel: the same
   DDP over a `threads` communicator, one replica per thread. */

/* Dropout under DDP: local row j of a batch is row rank + world * j of the combined batch
   (DistributedSampler's sharding); mgpu_op_dropout draws that row's counters. */
static void mgpu__context_set_row_interleave(mgpu_context *ctx, int rank, int world) {
    ctx->row_rank = rank;
    ctx->row_world = world;
}

/* --------------------------------------------------------------------------------------
   Bucket assignment: tensors in the order given (reverse registration order), bucket 0 capped at
   first_cap bytes, the others at cap. A bucket closes once it reaches its cap; a tensor that would
   overflow a non-empty bucket starts the next one, so only a tensor larger than the cap exceeds
   it, and then alone. bucket_of[i] receives tensor i's bucket; returns the bucket count.
   -------------------------------------------------------------------------------------- */

static int mgpu__ddp_assign_buckets(int n, const int64_t *bytes, int64_t first_cap, int64_t cap, int *bucket_of) {
    int i, b = 0, in_bucket = 0;
    int64_t fill = 0;
    for (i = 0; i < n; i++) {
        if (in_bucket > 0 && fill + bytes[i] > (b == 0 ? first_cap : cap)) { b++; fill = 0; in_bucket = 0; }
        bucket_of[i] = b;
        fill += bytes[i];
        in_bucket++;
        if (fill >= (b == 0 ? first_cap : cap)) { b++; fill = 0; in_bucket = 0; }
    }
    return in_bucket > 0 ? b + 1 : b;
}

/* --------------------------------------------------------------------------------------
   State
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__ddp_param {
    struct mgpu_ddp *ddp;     /* the hook's way back */
    mgpu_tensor *t;
    int bucket;
    int64_t offset;           /* first element in the bucket buffer */
    int ready;                /* grad complete in the current backward */
} mgpu__ddp_param;

typedef struct mgpu__ddp_bucket {
    int first, count;         /* its parameters: ddp->params[first, first + count) */
    int *model_index;         /* (count) their indices in the model's parameter list */
    int64_t numel;
    float *buf;               /* (numel) packed gradients, all-reduced in place: in the context's device memory */
    int n_ready;
    mgpu_comm_work *work;     /* in flight, or NULL */
    /* timeline of the current (or last) synced backward */
    int64_t hook_calls;
    double launch_s, done_s;
    int done_before_end;
} mgpu__ddp_bucket;

struct mgpu_ddp {
    mgpu_model *model;
    mgpu_comm *comm;
    mgpu_context *ctx;
    int world;
    mgpu_dtype compress;
    int sync;
    int n_params; mgpu__ddp_param *params;   /* reverse registration order = bucket order */
    int n_buckets; mgpu__ddp_bucket *buckets;
    int next_launch;          /* buckets launch strictly in index order: every rank issues the same sequence */
    int in_backward;          /* a synced backward has started and its end hook has not run */
    int installed;            /* hooks are on the model */
    mgpu_result error;        /* first failure inside a hook (hooks cannot return one) */
    char error_text[1024];
    int64_t allreduces;
    double comm_s, exposed_s, backward_end_s;
};

/* --------------------------------------------------------------------------------------
   Bucket contents, all through twins on the context's stream so buckets work the same on the
   device: gradients packed and unpacked by copies, and under compression the bucket rounded to
   f16/bf16 values (kept in f32 storage), as the gradients would travel in 16 bits. On a CUDA
   context the bucket lives in device memory; its all-reduce runs on the communicator's stream,
   after an event recorded on the context's stream behind the packing copies, and the unpacking
   copies wait for the all-reduce's own event (the shm backend stages the bucket through pinned
   host memory in between).
   -------------------------------------------------------------------------------------- */

static int mgpu__ddp_on_cuda(const mgpu_ddp *d) { return d->ctx->device.type == MGPU_DEVICE_CUDA; }

static float *mgpu__ddp_buf_alloc(mgpu_ddp *d, int64_t numel) {
    size_t bytes = sizeof(float) * (size_t)MGPU__MAX(numel, (int64_t)1);
#ifdef MGPU_CUDA
    if (mgpu__ddp_on_cuda(d)) return (float *)mgpu_cuda_malloc(d->ctx->device.index, bytes);
#endif
    (void)d;
    return (float *)mgpu__alloc(bytes, "a DDP bucket buffer");
}
static void mgpu__ddp_buf_free(mgpu_ddp *d, float *buf) {
    if (!buf) return;
#ifdef MGPU_CUDA
    if (mgpu__ddp_on_cuda(d)) {
        cudaStreamSynchronize((cudaStream_t)d->ctx->cuda_stream);   /* no copy of it still queued */
        mgpu_cuda_free(d->ctx->device.index, buf);
        return;
    }
#endif
    (void)d;
    mgpu_free(buf);
}

/* Whether all n floats at x (the context's memory) are zero; the device's are read back (only for a
   parameter without a gradient on this rank, rare). */
static mgpu_result mgpu__ddp_all_zero(mgpu_ddp *d, const float *x, int64_t n, int *zero) {
    size_t bytes = sizeof(float) * (size_t)MGPU__MAX(n, (int64_t)1);
    float *copy = mgpu__ddp_on_cuda(d) ? (float *)mgpu__alloc(bytes, "a DDP gradient check") : NULL;
    const float *h = copy ? copy : x;
    mgpu_result r = MGPU_OK;
    int64_t k;
    if (mgpu__ddp_on_cuda(d)) {
        if (!copy) return mgpu_last_result();
        r = mgpu__transfer(d->ctx, copy, x, sizeof(float) * (size_t)n, "DDP: reading a reduced gradient back");
        if (r != MGPU_OK) { mgpu_free(copy); return r; }
    }
    for (k = 0; k < n && h[k] == 0.0f; k++) {}
    *zero = k == n;
    mgpu_free(copy);
    return MGPU_OK;
}

/* x = round(x * scale) in the compression format */
static mgpu_result mgpu__ddp_round(mgpu_ddp *d, float *x, int64_t n, float scale) {
    mgpu__round_half_args a;
    a.ctx = d->ctx; a.half = d->compress; a.scale = scale; a.accumulate = 0;
    a.src = x; a.dst = x; a.n = n;
    return MGPU__TWIN(d->ctx, round_half, &a);
}

/* n floats from src to dst */
static mgpu_result mgpu__ddp_copy(mgpu_ddp *d, float *dst, const float *src, int64_t n) {
    mgpu__copy_args a;
    a.ctx = d->ctx; a.src = src; a.dst = dst; a.bytes = sizeof(float) * (size_t)n;
    return MGPU__TWIN(d->ctx, copy, &a);
}
static mgpu_result mgpu__ddp_zero(mgpu_ddp *d, float *dst, int64_t n) {
    mgpu__fill_args a;
    a.ctx = d->ctx; a.dst = dst; a.dtype = MGPU_F32; a.n = n; a.value = 0.0;
    return MGPU__TWIN(d->ctx, fill, &a);
}

/* --------------------------------------------------------------------------------------
   Backward: grad-ready hooks launch buckets, the end hook waits and unpacks
   -------------------------------------------------------------------------------------- */

static void mgpu__ddp_record_error(mgpu_ddp *d, mgpu_result r) {
    if (d->error != MGPU_OK) return;
    d->error = r;
    snprintf(d->error_text, sizeof d->error_text, "%s", mgpu_last_error());
}

/* Clears the previous backward's timeline when a synced backward starts. */
static void mgpu__ddp_begin_backward(mgpu_ddp *d) {
    int i;
    if (d->in_backward) return;
    d->in_backward = 1;
    d->backward_end_s = 0;
    for (i = 0; i < d->n_buckets; i++) {
        mgpu__ddp_bucket *b = &d->buckets[i];
        b->hook_calls = 0; b->launch_s = 0; b->done_s = 0; b->done_before_end = 0;
    }
}

/* Packs the bucket's current gradients (a parameter without one contributes zeros, as with
   find_unused_parameters) and issues its all-reduce. Under compression PyTorch's fp16/bf16 hooks
   divide by the world size before rounding (so the sum cannot overflow) and then sum. */
static void mgpu__ddp_launch(mgpu_ddp *d, mgpu__ddp_bucket *b) {
    mgpu_result r = MGPU_OK;
    int i;
    for (i = b->first; i < b->first + b->count && r == MGPU_OK; i++) {
        const mgpu__ddp_param *p = &d->params[i];
        float *dst = b->buf + p->offset;
        r = p->t->grad ? mgpu__ddp_copy(d, dst, (const float *)p->t->grad->data, p->t->numel) : mgpu__ddp_zero(d, dst, p->t->numel);
    }
    if (r == MGPU_OK && d->compress != MGPU_F32) r = mgpu__ddp_round(d, b->buf, b->numel, 1.0f / (float)d->world);
    if (r != MGPU_OK) mgpu__ddp_record_error(d, r);   /* the all-reduce still goes out: every rank issues the same sequence */
    b->launch_s = mgpu_time_s();
    /* ordered after the copies just queued on the context's stream (an event, not a host sync) */
    b->work = mgpu__comm_allreduce_async(d->comm, "DDP bucket all-reduce", b->buf, b->numel, d->compress != MGPU_F32 ? MGPU_REDUCE_SUM : MGPU_REDUCE_AVG,
                                         mgpu__ddp_on_cuda(d) ? d->ctx->device.index : -1, d->ctx->cuda_stream);
    if (!b->work) mgpu__ddp_record_error(d, mgpu_last_result() != MGPU_OK ? mgpu_last_result() : MGPU_ERR_STATE);
    d->allreduces++;
}

/* Launches the next buckets in index order while they are complete (all = 1: every one left). */
static void mgpu__ddp_launch_in_order(mgpu_ddp *d, int all) {
    while (d->next_launch < d->n_buckets) {
        mgpu__ddp_bucket *b = &d->buckets[d->next_launch];
        if (!all && b->n_ready < b->count) break;
        mgpu__ddp_launch(d, b);
        d->next_launch++;
    }
}

/* Notes when in-flight all-reduces completed (the timeline; the wait still collects them). */
static void mgpu__ddp_poll(mgpu_ddp *d) {
    int i;
    for (i = 0; i < d->next_launch; i++) {
        mgpu__ddp_bucket *b = &d->buckets[i];
        if (b->work && b->done_s == 0 && mgpu_comm_work_done(b->work)) b->done_s = mgpu_time_s();
    }
}

/* Fired by mgpu_backward once per parameter when its last contribution of this backward arrived. */
static void mgpu__ddp_grad_ready(mgpu_tensor *t, void *user) {
    mgpu__ddp_param *p = (mgpu__ddp_param *)user;
    mgpu_ddp *d = p->ddp;
    mgpu__ddp_bucket *b = &d->buckets[p->bucket];
    (void)t;
    if (!d->sync) return;   /* no_sync: gradients accumulate locally */
    mgpu__ddp_begin_backward(d);
    b->hook_calls++;
    if (!p->ready) {
        p->ready = 1;
        if (++b->n_ready == b->count) mgpu__ddp_launch_in_order(d, 0);
    }
    mgpu__ddp_poll(d);
}

/* Copies the averaged bucket back into the parameters' grads. A parameter without a grad gets
   one only if some rank had a non-zero gradient for it, so a parameter unused everywhere keeps
   grad NULL, as in one process. */
static mgpu_result mgpu__ddp_unpack(mgpu_ddp *d, mgpu__ddp_bucket *b) {
    int i;
    mgpu_result r;
    if (d->compress != MGPU_F32 && (r = mgpu__ddp_round(d, b->buf, b->numel, 1.0f)) != MGPU_OK) return r;
    for (i = b->first; i < b->first + b->count; i++) {
        mgpu__ddp_param *p = &d->params[i];
        const float *src = b->buf + p->offset;
        if (!p->t->grad) {
            int zero = 0;
            if ((r = mgpu__ddp_all_zero(d, src, p->t->numel, &zero)) != MGPU_OK) return r;
            if (zero) continue;
            if (!mgpu__grad_f32(d->ctx, p->t)) return mgpu_last_result();
        }
        if ((r = mgpu__ddp_copy(d, (float *)p->t->grad->data, src, p->t->numel)) != MGPU_OK) return r;
    }
    return MGPU_OK;
}

/* Waits for bucket b (in launch order) and unpacks it. The progress thread's time is charged
   from the later of its launch and the previous bucket's completion to its own completion. */
static void mgpu__ddp_finish_bucket(mgpu_ddp *d, mgpu__ddp_bucket *b, double *busy_until) {
    double wait_start = mgpu_time_s();
    mgpu_result r;
    if (!b->work) return;
    r = mgpu__comm_wait(b->work, d->ctx->cuda_stream);   /* and the context's stream waits for the all-reduce's event */
    b->work = NULL;
    if (b->done_s == 0) b->done_s = mgpu_time_s();
    d->exposed_s += mgpu_time_s() - wait_start;
    d->comm_s += MGPU__MAX(0.0, b->done_s - MGPU__MAX(b->launch_s, *busy_until));
    *busy_until = b->done_s;
    if (r == MGPU_OK) r = mgpu__ddp_unpack(d, b);
    if (r != MGPU_OK) mgpu__ddp_record_error(d, r);
}

static void mgpu__ddp_reset_backward(mgpu_ddp *d) {
    int i;
    for (i = 0; i < d->n_params; i++) d->params[i].ready = 0;
    for (i = 0; i < d->n_buckets; i++) { d->buckets[i].n_ready = 0; d->buckets[i].work = NULL; }
    d->next_launch = 0;
    d->in_backward = 0;
}

/* End of every successful backward on the model's context: launch what is left (buckets of
   unused parameters), wait for everything, unpack. After it the grads are identical on every rank. */
static mgpu_result mgpu__ddp_backward_end(mgpu_context *ctx, void *user) {
    mgpu_ddp *d = (mgpu_ddp *)user;
    double busy_until = 0;
    mgpu_result r;
    int i;
    (void)ctx;
    if (!d->sync) return MGPU_OK;
    mgpu__ddp_begin_backward(d);
    mgpu__ddp_poll(d);
    d->backward_end_s = mgpu_time_s();
    for (i = 0; i < d->n_buckets; i++) d->buckets[i].done_before_end = d->buckets[i].done_s != 0;
    mgpu__ddp_launch_in_order(d, 1);
    for (i = 0; i < d->n_buckets; i++) mgpu__ddp_finish_bucket(d, &d->buckets[i], &busy_until);
    mgpu__ddp_reset_backward(d);
    r = d->error;
    if (r != MGPU_OK) {
        mgpu__fail(r, "DDP gradient all-reduce failed: %s", d->error_text);
        d->error = MGPU_OK;
    }
    return r;
}

/* --------------------------------------------------------------------------------------
   Construction: the same model on every rank, rank 0's values everywhere
   -------------------------------------------------------------------------------------- */

/* The model's tensors as one list: parameters, then buffers. */
static int mgpu__ddp_num_tensors(const mgpu_model *m) { return mgpu_model_num_parameters(m) + mgpu_model_num_buffers(m); }
static mgpu_tensor *mgpu__ddp_tensor_at(const mgpu_model *m, int i, const char **name) {
    int np = mgpu_model_num_parameters(m);
    return i < np ? mgpu_model_parameter(m, i, name) : mgpu_model_buffer(m, i - np, name);
}

static uint64_t mgpu__fnv1a(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = (const unsigned char *)data;
    size_t i;
    for (i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ULL; }
    return h;
}

/* What must agree across ranks about tensor i: kind, name, dtype, shape, requires_grad. */
static uint64_t mgpu__ddp_tensor_hash(const mgpu_model *m, int i) {
    const char *name = NULL;
    const mgpu_tensor *t = mgpu__ddp_tensor_at(m, i, &name);
    int32_t head[4];
    uint64_t h = 0xcbf29ce484222325ULL;
    head[0] = i < mgpu_model_num_parameters(m); head[1] = (int32_t)t->dtype; head[2] = t->ndim; head[3] = t->requires_grad;
    h = mgpu__fnv1a(h, name, strlen(name) + 1);
    h = mgpu__fnv1a(h, head, sizeof head);
    h = mgpu__fnv1a(h, t->shape, sizeof(int64_t) * (size_t)t->ndim);
    return h | 1;   /* never 0: 0 pads a shorter list */
}

static void mgpu__ddp_describe(const mgpu_model *m, int i, char *buf, size_t size) {
    const char *name = NULL;
    const mgpu_tensor *t;
    if (i >= mgpu__ddp_num_tensors(m)) { snprintf(buf, size, "absent (the model has only %d tensors)", mgpu__ddp_num_tensors(m)); return; }
    t = mgpu__ddp_tensor_at(m, i, &name);
    snprintf(buf, size, "%s '%s' %s %s", i < mgpu_model_num_parameters(m) ? "parameter" : "buffer", name,
             mgpu_dtype_name(t->dtype), mgpu__shape_str(t));
}

#define MGPU__DDP_DESC_BYTES 256

/* Every rank learns where the first rank disagreeing with rank 0 differs, and names the tensor
   as each of the two ranks has it. */
static mgpu_result mgpu__ddp_report_mismatch(mgpu_comm *c, const mgpu_model *m, int world, int index, int rank) {
    char *all = (char *)mgpu__calloc((size_t)world * MGPU__DDP_DESC_BYTES, "DDP model check");
    char mine[MGPU__DDP_DESC_BYTES];
    mgpu_result r;
    memset(mine, 0, sizeof mine);
    if (!all) return mgpu_last_result();
    mgpu__ddp_describe(m, index, mine, sizeof mine);
    r = mgpu_comm_allgather_bytes(c, mine, sizeof mine, all);
    if (r == MGPU_OK)
        r = mgpu__fail(MGPU_ERR_SHAPE, "mgpu_ddp_create: the model differs across ranks: tensor #%d is %s on rank 0 but %s on rank %d; "
                       "build the same model on every rank", index, all, all + (size_t)rank * MGPU__DDP_DESC_BYTES, rank);
    mgpu_free(all);
    return r;
}

/* Names, kinds, dtypes and shapes of all tensors agree on every rank (compared as hashes). */
static mgpu_result mgpu__ddp_check_models(mgpu_comm *c, const mgpu_model *m, int world) {
    int64_t count = mgpu__ddp_num_tensors(m), most = 0, *counts;
    uint64_t *hashes = NULL;
    mgpu_result r;
    int64_t i;
    int rk;
    counts = (int64_t *)mgpu__alloc(sizeof(int64_t) * (size_t)world, "DDP model check");
    if (!counts) return mgpu_last_result();
    r = mgpu_comm_allgather_bytes(c, &count, sizeof count, counts);
    for (rk = 0; r == MGPU_OK && rk < world; rk++) most = MGPU__MAX(most, counts[rk]);
    if (r == MGPU_OK && most > 0) {
        uint64_t *mine = (uint64_t *)mgpu__calloc(sizeof(uint64_t) * (size_t)most, "DDP model check");
        hashes = mine ? (uint64_t *)mgpu__alloc(sizeof(uint64_t) * (size_t)(most * world), "DDP model check") : NULL;
        if (!hashes) r = mgpu_last_result();
        for (i = 0; hashes && i < count; i++) mine[i] = mgpu__ddp_tensor_hash(m, (int)i);
        if (r == MGPU_OK) r = mgpu_comm_allgather_bytes(c, mine, sizeof(uint64_t) * (size_t)most, hashes);
        mgpu_free(mine);
    }
    for (i = 0; r == MGPU_OK && i < most; i++)
        for (rk = 1; rk < world; rk++)
            if (hashes[(int64_t)rk * most + i] != hashes[i]) { r = mgpu__ddp_report_mismatch(c, m, world, (int)i, rk); break; }
    mgpu_free(hashes);
    mgpu_free(counts);
    return r;
}

static mgpu_result mgpu__ddp_broadcast_state(mgpu_comm *c, const mgpu_model *m) {
    int i, n = mgpu__ddp_num_tensors(m);
    for (i = 0; i < n; i++) {
        mgpu_result r = mgpu_comm_broadcast(c, mgpu__ddp_tensor_at(m, i, NULL), 0);
        if (r != MGPU_OK) return r;
    }
    return MGPU_OK;
}

/* The parameters that take gradients, in reverse registration order, grouped into buckets. */
static mgpu_result mgpu__ddp_build_buckets(mgpu_ddp *d, double first_mb, double cap_mb) {
    int np = mgpu_model_num_parameters(d->model), i, n = 0;
    int64_t *bytes = (int64_t *)mgpu__alloc(sizeof(int64_t) * (size_t)(np + 1), "DDP buckets");
    int *bucket_of = (int *)mgpu__alloc(sizeof(int) * (size_t)(np + 1), "DDP buckets");
    int *index = (int *)mgpu__alloc(sizeof(int) * (size_t)(np + 1), "DDP buckets");
    mgpu_result r = MGPU_OK;
    d->params = (mgpu__ddp_param *)mgpu__calloc(sizeof(mgpu__ddp_param) * (size_t)(np + 1), "DDP parameters");
    if (!bytes || !bucket_of || !index || !d->params) r = mgpu_last_result();
    for (i = np - 1; r == MGPU_OK && i >= 0; i--) {
        mgpu_tensor *t = mgpu_model_parameter(d->model, i, NULL);
        if (!t->requires_grad) continue;   /* frozen: never has a gradient to share */
        d->params[n].ddp = d; d->params[n].t = t;
        bytes[n] = (int64_t)sizeof(float) * t->numel;
        index[n++] = i;
    }
    d->n_params = n;
    if (r == MGPU_OK) {
        d->n_buckets = mgpu__ddp_assign_buckets(n, bytes, (int64_t)(first_mb * 1048576.0), (int64_t)(cap_mb * 1048576.0), bucket_of);
        d->buckets = (mgpu__ddp_bucket *)mgpu__calloc(sizeof(mgpu__ddp_bucket) * (size_t)(d->n_buckets + 1), "DDP buckets");
        if (!d->buckets) r = mgpu_last_result();
    }
    for (i = 0; r == MGPU_OK && i < n; i++) {
        mgpu__ddp_bucket *b = &d->buckets[bucket_of[i]];
        if (b->count == 0) b->first = i;
        d->params[i].bucket = bucket_of[i];
        d->params[i].offset = b->numel;
        b->numel += d->params[i].t->numel;
        b->count++;
    }
    for (i = 0; r == MGPU_OK && i < d->n_buckets; i++) {
        mgpu__ddp_bucket *b = &d->buckets[i];
        b->buf = mgpu__ddp_buf_alloc(d, b->numel);
        b->model_index = (int *)mgpu__alloc(sizeof(int) * (size_t)b->count, "a DDP bucket");
        if (!b->buf || !b->model_index) { r = mgpu_last_result(); break; }
        memcpy(b->model_index, index + b->first, sizeof(int) * (size_t)b->count);
    }
    mgpu_free(bytes); mgpu_free(bucket_of); mgpu_free(index);
    return r;
}

/* Hooks and settings DDP puts on the model and its context; on = 0 removes them. */
static void mgpu__ddp_install(mgpu_ddp *d, int on, int sync_batchnorm) {
    int i;
    d->installed = on;
    for (i = 0; i < d->n_params; i++)
        mgpu_tensor_set_grad_hook(d->params[i].t, on ? mgpu__ddp_grad_ready : NULL, on ? &d->params[i] : NULL);
    if (on) mgpu_context_set_backward_end_hook(d->ctx, mgpu__ddp_backward_end, d);
    else if (d->ctx->backward_end_user == d) mgpu_context_set_backward_end_hook(d->ctx, NULL, NULL);
    mgpu__context_set_row_interleave(d->ctx, on ? mgpu_comm_rank(d->comm) : 0, on ? d->world : 1);
    for (i = 0; i < d->model->n_batchnorms; i++)
        if (!on || sync_batchnorm) d->model->batchnorms[i]->sync_comm = on ? d->comm : NULL;
}

static mgpu_result mgpu__ddp_check_desc(const mgpu_ddp_desc *desc) {
    const char *fn = "mgpu_ddp_create";
    if (!(desc->bucket_cap_mb >= 0 && desc->bucket_cap_mb < 1e6))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->bucket_cap_mb is %g, must be in [0, 1e6) (0: 25)", fn, desc->bucket_cap_mb);
    if (!(desc->first_bucket_mb >= 0 && desc->first_bucket_mb < 1e6))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->first_bucket_mb is %g, must be in [0, 1e6) (0: 1)", fn, desc->first_bucket_mb);
    if (desc->compress != MGPU_F32 && desc->compress != MGPU_F16 && desc->compress != MGPU_BF16)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->compress is %s, must be F32 (none), F16 or BF16", fn, mgpu_dtype_name(desc->compress));
    return MGPU_OK;
}

MGPU_API void mgpu_ddp_destroy(mgpu_ddp *d) {
    int i;
    if (!d) return;
    for (i = 0; i < d->n_buckets && d->buckets; i++) {
        if (d->buckets[i].work) mgpu__comm_wait(d->buckets[i].work, d->ctx->cuda_stream);   /* a backward that failed midway */
        mgpu__ddp_buf_free(d, d->buckets[i].buf);
        mgpu_free(d->buckets[i].model_index);
    }
    if (d->installed) mgpu__ddp_install(d, 0, 0);
    mgpu_free(d->buckets);
    mgpu_free(d->params);
    mgpu_free(d);
}

MGPU_API mgpu_ddp *mgpu_ddp_create(mgpu_model *m, mgpu_comm *c, const mgpu_ddp_desc *desc) {
    const char *fn = "mgpu_ddp_create";
    mgpu_ddp_desc dd;
    mgpu_ddp *d;
    if (!m || !c) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: model and communicator must not be NULL", fn);
    if (desc) dd = *desc; else memset(&dd, 0, sizeof dd);
    if (mgpu__ddp_check_desc(&dd) != MGPU_OK) return NULL;
    if (m->ctx->backward_end)
        MGPU__FAIL_NULL(MGPU_ERR_STATE, "%s: the model's context already has a backward-end hook (another DDP on this context?); destroy it first", fn);
    if (mgpu_comm_world_size(c) < 1) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: the communicator has no ranks", fn);
    /* collectives first, in the same order on every rank, before anything can fail locally */
    if (mgpu__ddp_check_models(c, m, mgpu_comm_world_size(c)) != MGPU_OK) return NULL;
    if (mgpu__ddp_broadcast_state(c, m) != MGPU_OK) return NULL;
    d = (mgpu_ddp *)mgpu__calloc(sizeof *d, "a DDP");
    if (!d) return NULL;
    d->model = m; d->comm = c; d->ctx = m->ctx;
    d->world = mgpu_comm_world_size(c);
    d->compress = dd.compress;
    d->sync = 1;
    if (mgpu__ddp_build_buckets(d, dd.first_bucket_mb > 0 ? dd.first_bucket_mb : 1.0, dd.bucket_cap_mb > 0 ? dd.bucket_cap_mb : 25.0) != MGPU_OK) {
        mgpu_ddp_destroy(d);
        return NULL;
    }
    mgpu__ddp_install(d, 1, dd.sync_batchnorm);
    return d;
}

MGPU_API void mgpu_ddp_set_sync(mgpu_ddp *d, int sync) {
    if (d) d->sync = sync != 0;
}

MGPU_API void mgpu_ddp_get_stats(const mgpu_ddp *d, mgpu_ddp_stats *out) {
    int i;
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (!d) return;
    out->buckets = d->n_buckets;
    out->allreduces = d->allreduces;
    out->comm_s = d->comm_s;
    out->exposed_s = d->exposed_s;
    for (i = 0; i < d->n_buckets; i++)
        out->bytes_per_step += (double)d->buckets[i].numel * (d->compress == MGPU_F32 ? 4.0 : 2.0);
}

MGPU_API mgpu_result mgpu_ddp_get_bucket(const mgpu_ddp *d, int b, mgpu_ddp_bucket_info *out) {
    const mgpu__ddp_bucket *k;
    if (!d || !out) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_ddp_get_bucket: ddp and out must not be NULL");
    if (b < 0 || b >= d->n_buckets) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_ddp_get_bucket: bucket %d outside [0, %d)", b, d->n_buckets);
    k = &d->buckets[b];
    memset(out, 0, sizeof *out);
    out->n_params = k->count;
    out->params = k->model_index;
    out->numel = k->numel;
    out->hook_calls = k->hook_calls;
    out->launch_s = k->launch_s;
    out->done_s = k->done_s;
    out->backward_end_s = d->backward_end_s;
    out->done_before_end = k->done_before_end;
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   DataParallel: one process, n replicas as threads, each a rank of a `threads` communicator
   running the same DDP (see mgpu_dp_run's declaration).
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__dp_replica {
    int rank;
    mgpu_comm *comm;
    mgpu_dp_replica_fn main_fn;
    void *arg;
    mgpu_result result;
    char error[1024];         /* errors are per thread: carried back to the caller */
} mgpu__dp_replica;

static void *mgpu__dp_replica_thread(void *p) {
    mgpu__dp_replica *r = (mgpu__dp_replica *)p;
    mgpu_clear_error();
    r->result = r->main_fn(r->rank, r->comm, r->arg);
    if (r->result != MGPU_OK) snprintf(r->error, sizeof r->error, "%s", mgpu_last_error());
    return NULL;
}

/* Starts ranks 1..n-1 on threads; returns how many started (a failure leaves the rest unstarted). */
static int mgpu__dp_start(mgpu__dp_replica *reps, pthread_t *threads, int n) {
    int i;
    for (i = 1; i < n; i++)
        if (pthread_create(&threads[i], NULL, mgpu__dp_replica_thread, &reps[i]) != 0) {
            mgpu__fail(MGPU_ERR_STATE, "mgpu_dp_run: could not start the thread of replica %d", i);
            return i - 1;
        }
    return n - 1;
}

/* The replica to blame: the lowest failing rank, preferring a real error over the timeouts it
   causes in the replicas left waiting for it; -1 if all succeeded. */
static int mgpu__dp_root_failure(const mgpu__dp_replica *reps, int n) {
    int i, timed_out = -1;
    for (i = 0; i < n; i++) {
        if (reps[i].result == MGPU_OK) continue;
        if (reps[i].result != MGPU_ERR_TIMEOUT) return i;
        if (timed_out < 0) timed_out = i;
    }
    return timed_out;
}

MGPU_API mgpu_result mgpu_dp_run(int n_replicas, mgpu_dp_replica_fn replica_main, void *arg) {
    return mgpu_dp_run_devices(n_replicas, NULL, replica_main, arg);
}

MGPU_API mgpu_result mgpu_dp_run_devices(int n_replicas, const int *cuda_devices, mgpu_dp_replica_fn replica_main, void *arg) {
    mgpu__dp_replica *reps;
    mgpu_comm **comms;
    pthread_t *threads;
    mgpu_result r = MGPU_OK;
    int i, started = 0;
    if (n_replicas < 1 || n_replicas > 1024 || !replica_main)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dp_run: need 1..1024 replicas and a replica function, got %d replicas%s",
                          n_replicas, replica_main ? "" : " and no function");
    reps = (mgpu__dp_replica *)mgpu__calloc(sizeof *reps * (size_t)n_replicas, "DataParallel replicas");
    comms = (mgpu_comm **)mgpu__calloc(sizeof *comms * (size_t)n_replicas, "DataParallel replicas");
    threads = (pthread_t *)mgpu__calloc(sizeof *threads * (size_t)n_replicas, "DataParallel replicas");
    if (!reps || !comms || !threads) r = mgpu_last_result();
    if (r == MGPU_OK) r = cuda_devices ? mgpu_comm_create_nccl_threads(n_replicas, cuda_devices, 0, comms) : mgpu_comm_create_threads(n_replicas, 0, comms);
    for (i = 0; r == MGPU_OK && i < n_replicas; i++) {
        reps[i].rank = i; reps[i].comm = comms[i]; reps[i].main_fn = replica_main; reps[i].arg = arg;
    }
    if (r == MGPU_OK) {
        started = mgpu__dp_start(reps, threads, n_replicas);
        /* if a thread failed to start, the started ones end through the communicator's timeout */
        if (started == n_replicas - 1) mgpu__dp_replica_thread(&reps[0]);
        else r = mgpu_last_result();
        for (i = 1; i <= started; i++) pthread_join(threads[i], NULL);
    }
    if (r == MGPU_OK && (i = mgpu__dp_root_failure(reps, n_replicas)) >= 0)
        r = mgpu__fail(reps[i].result, "DataParallel replica %d: %s", i, reps[i].error);
    for (i = 0; comms && i < n_replicas; i++) mgpu_comm_destroy(comms[i]);
    mgpu_free(reps); mgpu_free(comms); mgpu_free(threads);
    return r;
}
