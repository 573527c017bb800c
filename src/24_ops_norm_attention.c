/* ======================================================================================
   Ops: norms, embedding, attention
   ====================================================================================== */

/* Layer norm, batch norm, embedding and scaled dot-product attention: CPU forward + backward.
   Every reduction runs in a fixed order over a fixed partition, so results are bit-identical
   whatever the thread count. */

/* Loops touching at least this many elements are split across the thread pool. */
#define MGPU__NORM_GRAIN 32768

/* Items per chunk so that one chunk touches about MGPU__NORM_GRAIN elements. */
static int64_t mgpu__norm_min_chunk(int64_t elems_per_item) {
    return elems_per_item >= MGPU__NORM_GRAIN ? 1 : MGPU__NORM_GRAIN / (elems_per_item > 0 ? elems_per_item : 1);
}

/* An optional per-channel vector (weight, bias, running stats): NULL is fine, else F32 (C). */
static int mgpu__norm_check_vec(mgpu_context *ctx, const char *op, const char *arg, const mgpu_tensor *t,
                                int64_t c, const mgpu_tensor *x) {
    if (!t) return 1;
    if (!mgpu__check_input(ctx, op, arg, t, 1)) return 0;
    if (t->ndim != 1 || t->shape[0] != c) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: %s has shape %s, expected (%lld,) to match x %s", op, arg, mgpu__shape_str(t),
                   (long long)c, mgpu__shape_str(x));
        return 0;
    }
    return 1;
}

/* A finite non-negative float argument (NaN fails the comparison too). */
static int mgpu__norm_check_nonneg(const char *op, const char *arg, float v) {
    if (!(v >= 0.0f) || v > FLT_MAX) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: %s is %g, must be finite and >= 0", op, arg, (double)v);
        return 0;
    }
    return 1;
}

/* Arena scratch for n floats / doubles (n may be 0) on the context's device. */
static float *mgpu__norm_floats(mgpu_context *ctx, int64_t n) {
    return (float *)mgpu__arena_alloc_data(ctx, sizeof(float) * (size_t)(n > 0 ? n : 1));
}
static double *mgpu__norm_doubles(mgpu_context *ctx, int64_t n) {
    return (double *)mgpu__arena_alloc_data(ctx, sizeof(double) * (size_t)(n > 0 ? n : 1));
}

/* Adds element i of p*w and of p*w * (q - center) (w NULL: 1) into lane l of a1, a2. */
static inline void mgpu__norm_lane_add(double *a1, double *a2, int64_t l, const float *p, const float *w,
                                       const float *q, float center, int64_t i) {
    double pv = w ? p[i] * w[i] : p[i];
    a1[l] += pv;
    a2[l] += pv * (double)(q[i] - center);
}

/* s1 = sum of p*w, s2 = sum of p*w * (q - center) over n elements. Eight double lanes keep
   the adds pipelined; the order is fixed, so the result never depends on threads. */
#define MGPU__NORM_LANES 8
static void mgpu__norm_moments(const float *p, const float *w, const float *q, float center, int64_t n,
                               double *s1, double *s2) {
    double a1[MGPU__NORM_LANES], a2[MGPU__NORM_LANES];
    int64_t i, l;
    for (l = 0; l < MGPU__NORM_LANES; l++) { a1[l] = 0; a2[l] = 0; }
    for (i = 0; i + MGPU__NORM_LANES <= n; i += MGPU__NORM_LANES)
        for (l = 0; l < MGPU__NORM_LANES; l++) mgpu__norm_lane_add(a1, a2, l, p, w, q, center, i + l);
    for (l = 0; i + l < n; l++) mgpu__norm_lane_add(a1, a2, l, p, w, q, center, i + l);
    for (l = 1; l < MGPU__NORM_LANES; l++) { a1[0] += a1[l]; a2[0] += a2[l]; }
    *s1 = a1[0];
    *s2 = a2[0];
}

/* Adds double sums into an F32 gradient. */
static void mgpu__norm_add_sums(float *grad, const double *sums, int64_t n) {
    int64_t i;
    for (i = 0; i < n; i++) grad[i] += (float)sums[i];
}

/* ======================================================================================
   Layer norm over the last dim: y = (x - mean) * rstd * w + b with the biased variance and
   eps inside the sqrt, as PyTorch. x is viewed as R rows of C.
   ====================================================================================== */

/* One pass for the row's statistics (double sums), one for the output. */
static void mgpu__ln_forward_rows(void *arg, int64_t r0, int64_t r1) {
    const mgpu__layer_norm_args *a = (const mgpu__layer_norm_args *)arg;
    int64_t r, c, C = a->C;
    for (r = r0; r < r1; r++) {
        const float *xr = a->x + r * C;
        float *yr = a->y + r * C;
        double sum, sumsq, mean, var;
        float m, rs;
        mgpu__norm_moments(xr, NULL, xr, 0.0f, C, &sum, &sumsq);
        mean = sum / (double)C;
        var = sumsq / (double)C - mean * mean;
        m = (float)mean;
        rs = (float)(1.0 / sqrt((var > 0 ? var : 0) + (double)a->eps));
        a->mean[r] = m;
        a->rstd[r] = rs;
        for (c = 0; c < C; c++) {
            float v = (xr[c] - m) * rs;
            if (a->w) v *= a->w[c];
            if (a->b) v += a->b[c];
            yr[c] = v;
        }
    }
}

static void mgpu__cpu_layer_norm_forward(const mgpu__layer_norm_args *a) {
    mgpu_parallel_for(a->ctx, a->R, mgpu__norm_min_chunk(a->C), mgpu__ln_forward_rows, (void *)a);
}

/* The backward's blocks of rows and their partial dw, db: (blocks, 2, C) doubles, or NULL. */
typedef struct mgpu__ln_job { const mgpu__layer_norm_args *a; double *partial; } mgpu__ln_job;

/* Backward of one row: dx += rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w
   (when dx is wanted), and the row's dy * xhat and dy added into the partial sums pw, pb
   (when given). */
static void mgpu__ln_backward_row(const mgpu__layer_norm_args *a, int64_t r, double *pw, double *pb) {
    int64_t c, C = a->C;
    const float *xr = a->x + r * C, *dyr = a->dy + r * C;
    float m = a->mean[r], rs = a->rstd[r], g_mean = 0, gx_mean = 0;
    if (a->dx) {
        double sum_g, sum_gxm;   /* sum g, sum g * (x - mean) */
        mgpu__norm_moments(dyr, a->w, xr, m, C, &sum_g, &sum_gxm);
        g_mean = (float)(sum_g / (double)C);
        gx_mean = (float)(sum_gxm * rs / (double)C);
        for (c = 0; c < C; c++) {
            float g = a->w ? dyr[c] * a->w[c] : dyr[c];
            a->dx[r * C + c] += rs * (g - g_mean - (xr[c] - m) * rs * gx_mean);
        }
    }
    if (pw)
        for (c = 0; c < C; c++) {
            pw[c] += (double)dyr[c] * ((xr[c] - m) * rs);
            pb[c] += dyr[c];
        }
}

/* Rows are cut into blocks that depend on R and C only, never on the thread count; block k
   keeps its own partial dw, db (2C doubles), added up in block order afterwards, so the
   parameter gradients are the same whatever the threads. */
static int64_t mgpu__ln_block_rows(int64_t C) { return MGPU__MAX((int64_t)1, 4 * MGPU__NORM_GRAIN / C); }

static void mgpu__ln_backward_blocks(void *arg, int64_t k0, int64_t k1) {
    const mgpu__ln_job *j = (const mgpu__ln_job *)arg;
    const mgpu__layer_norm_args *a = j->a;
    int64_t k, r, c, rows = mgpu__ln_block_rows(a->C);
    for (k = k0; k < k1; k++) {
        double *pw = j->partial ? j->partial + 2 * k * a->C : NULL, *pb = pw ? pw + a->C : NULL;
        if (pw) for (c = 0; c < 2 * a->C; c++) pw[c] = 0;
        for (r = k * rows; r < MGPU__MIN(a->R, (k + 1) * rows); r++) mgpu__ln_backward_row(a, r, pw, pb);
    }
}

/* grad[c] += sum over blocks of partial[k * 2C + offset + c], in block order. */
static void mgpu__ln_add_partials(float *grad, const double *partial, int64_t blocks, int64_t C, int64_t offset) {
    int64_t k, c;
    for (c = 0; c < C; c++) {
        double s = 0;
        for (k = 0; k < blocks; k++) s += partial[2 * k * C + offset + c];
        grad[c] += (float)s;
    }
}

static void mgpu__cpu_layer_norm_backward(const mgpu__layer_norm_args *a) {
    int64_t blocks = (a->R + mgpu__ln_block_rows(a->C) - 1) / mgpu__ln_block_rows(a->C);
    mgpu__ln_job j;
    j.a = a; j.partial = NULL;
    if ((a->dw || a->db) && !(j.partial = mgpu__norm_doubles(a->ctx, 2 * blocks * a->C))) { *a->status = MGPU_ERR_OOM_HOST; return; }
    mgpu_parallel_for(a->ctx, blocks, 1, mgpu__ln_backward_blocks, &j);
    if (a->dw) mgpu__ln_add_partials(a->dw, j.partial, blocks, a->C, 0);
    if (a->db) mgpu__ln_add_partials(a->db, j.partial, blocks, a->C, a->C);
}

/* node: in = {x, w, b}; extra = mean (R) then rstd (R); iarg = {R, C}. */
static mgpu_result mgpu__ln_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu_tensor *x = node->in[0], *w = node->in[1], *b = node->in[2];
    mgpu__layer_norm_args a;
    mgpu_result r, status = MGPU_OK;
    memset(&a, 0, sizeof a);
    a.ctx = ctx; a.status = &status;
    a.R = node->iarg[0]; a.C = node->iarg[1];
    a.x = (const float *)x->data;
    a.w = w ? (const float *)w->data : NULL;
    a.dy = (const float *)node->out->grad->data;
    a.mean = (float *)node->extra;
    a.rstd = a.mean + a.R;
    if (mgpu__needs_grad(node, 0)) MGPU__GRAD_OR_FAIL(a.dx, ctx, x);
    if (mgpu__needs_grad(node, 1)) MGPU__GRAD_OR_FAIL(a.dw, ctx, w);
    if (mgpu__needs_grad(node, 2)) MGPU__GRAD_OR_FAIL(a.db, ctx, b);
    r = MGPU__TWIN(ctx, layer_norm_backward, &a);
    return r != MGPU_OK ? r : status;
}

MGPU_API mgpu_tensor *mgpu_op_layer_norm(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b, float eps) {
    static const char *op = "mgpu_op_layer_norm";
    mgpu_tensor *in[3];
    mgpu_tensor *out;
    mgpu__node *node = NULL;
    mgpu__layer_norm_args a;
    float *stats;
    if (!mgpu__check_input(ctx, op, "x", x, 1)) return NULL;
    if (x->ndim < 1 || x->shape[x->ndim - 1] < 1)
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: x has shape %s, need (..., C) with C >= 1", op, mgpu__shape_str(x));
    memset(&a, 0, sizeof a);
    a.C = x->shape[x->ndim - 1];
    a.R = x->numel / a.C;
    if (!mgpu__norm_check_vec(ctx, op, "w", w, a.C, x) || !mgpu__norm_check_vec(ctx, op, "b", b, a.C, x)) return NULL;
    if (!mgpu__norm_check_nonneg(op, "eps", eps)) return NULL;
    out = mgpu__new_activation(ctx, MGPU_F32, x->ndim, x->shape);
    stats = mgpu__norm_floats(ctx, 2 * a.R);   /* mean (R), rstd (R) */
    if (!out || !stats) return NULL;
    a.ctx = ctx;
    a.x = (const float *)x->data;
    a.w = w ? (const float *)w->data : NULL;
    a.b = b ? (const float *)b->data : NULL;
    a.y = (float *)out->data;
    a.mean = stats;
    a.rstd = stats + a.R;
    a.eps = eps;
    if (MGPU__TWIN(ctx, layer_norm_forward, &a) != MGPU_OK) return NULL;
    in[0] = x; in[1] = w; in[2] = b;
    MGPU__RECORD(ctx, "layer_norm", mgpu__ln_backward, out, 3, in, node);
    if (node) {
        node->extra = stats;
        node->iarg[0] = a.R;
        node->iarg[1] = a.C;
    }
    return out;
}

/* ======================================================================================
   Batch norm: x (N, C, *) viewed as (N, C, S); statistics per channel over N and S.

   SyncBatchNorm seam. Every cross-sample quantity is a buffer of per-channel double sums,
   filled by a twin (batch_norm_stats, batch_norm_grad_sums); the normalisation and the input
   gradient (batch_norm_forward, batch_norm_backward) use only that buffer. Between the two,
   mgpu__batch_norm calls sync->reduce (when set) to sum the buffer over the ranks:
     forward : 2C + 1 doubles = sum x (C), sum x^2 (C), element count per channel
     backward: 2C doubles     = sum dy (C), sum dy * (x - mean) (C); weight/bias grads are
               taken from the local sums BEFORE the reduce (DDP averages them as usual).
   The public op passes sync = NULL (this process only).
   ====================================================================================== */

typedef mgpu_result (*mgpu__bn_reduce_fn)(void *user, double *values, int64_t n);
typedef struct mgpu__bn_sync { mgpu__bn_reduce_fn reduce; void *user; } mgpu__bn_sync;
/* SyncBatchNorm's reduce: user is the mgpu_comm whose ranks share the statistics. */
static MGPU__UNUSED mgpu_result mgpu__bn_reduce_over_comm(void *user, double *values, int64_t n) {
    return mgpu_comm_allreduce_f64((mgpu_comm *)user, values, n, MGPU_REDUCE_SUM);
}

/* One pass of a batch norm CPU twin over (N, C, S). */
typedef struct mgpu__bn_job {
    const mgpu__batch_norm_args *a;
    const float *p, *q, *center;   /* sums: sum p and sum p * (q - center[c]); center NULL = 0 */
    const float *k1, *k2;          /* (C): dx += scale * (dy - k1 - (x - mean) * k2) */
} mgpu__bn_job;

/* Per-segment kernels: one (n, c) run of S contiguous elements starting at off. */
typedef void (*mgpu__bn_segment_fn)(const mgpu__bn_job *j, int64_t off, int64_t c, int64_t S);

/* Channels [c0, c1) segment by segment, n outer so memory is read in order. The S == 1 branch
   passes a literal 1: once the kernel is inlined the loop over channels vectorises, which
   matters for (N, C) inputs. Each channel sees its segments in n order on one thread. */
static inline void mgpu__bn_each_segment(const mgpu__bn_job *j, int64_t c0, int64_t c1, mgpu__bn_segment_fn seg) {
    const mgpu__batch_norm_args *a = j->a;
    int64_t n, c;
    for (n = 0; n < a->N; n++) {
        if (a->S == 1) for (c = c0; c < c1; c++) seg(j, n * a->C + c, c, 1);
        else for (c = c0; c < c1; c++) seg(j, (n * a->C + c) * a->S, c, a->S);
    }
}

/* sums[c] += sum p, sums[C + c] += sum p * (q - center[c]) over the segment. */
static inline void mgpu__bn_sums_segment(const mgpu__bn_job *j, int64_t off, int64_t c, int64_t S) {
    float center = j->center ? j->center[c] : 0.0f;
    double sp, spq;
    if (S == 1) { sp = j->p[off]; spq = sp * (double)(j->q[off] - center); }
    else mgpu__norm_moments(j->p + off, NULL, j->q + off, center, S, &sp, &spq);
    j->a->sums[c] += sp;
    j->a->sums[j->a->C + c] += spq;
}
static inline void mgpu__bn_affine_segment(const mgpu__bn_job *j, int64_t off, int64_t c, int64_t S) {
    const mgpu__batch_norm_args *a = j->a;
    float m = a->mean[c], sc = a->scale[c], sh = a->b ? a->b[c] : 0.0f;
    int64_t s;
    for (s = off; s < off + S; s++) a->y[s] = (a->x[s] - m) * sc + sh;
}
static inline void mgpu__bn_input_grad_segment(const mgpu__bn_job *j, int64_t off, int64_t c, int64_t S) {
    const mgpu__batch_norm_args *a = j->a;
    float m = a->mean[c], sc = a->scale[c], k1 = j->k1[c], k2 = j->k2[c];
    int64_t s;
    for (s = off; s < off + S; s++) a->dx[s] += sc * (a->dy[s] - k1 - (a->x[s] - m) * k2);
}

static void mgpu__bn_sums_range(void *arg, int64_t c0, int64_t c1) {
    const mgpu__bn_job *j = (const mgpu__bn_job *)arg;
    int64_t c;
    for (c = c0; c < c1; c++) { j->a->sums[c] = 0; j->a->sums[j->a->C + c] = 0; }
    mgpu__bn_each_segment(j, c0, c1, mgpu__bn_sums_segment);
}
static void mgpu__bn_affine_range(void *arg, int64_t c0, int64_t c1) {
    mgpu__bn_each_segment((const mgpu__bn_job *)arg, c0, c1, mgpu__bn_affine_segment);
}
static void mgpu__bn_input_grad_range(void *arg, int64_t c0, int64_t c1) {
    mgpu__bn_each_segment((const mgpu__bn_job *)arg, c0, c1, mgpu__bn_input_grad_segment);
}

/* One contiguous block of channels per thread: with n outer, each thread then streams the
   widest possible slice of every sample (small slices of an (N, C) row defeat prefetching). */
static void mgpu__bn_for_channels(const mgpu__bn_job *j, mgpu_range_fn fn) {
    const mgpu__batch_norm_args *a = j->a;
    int64_t threads = mgpu_context_num_threads(a->ctx);
    int64_t per_thread = (a->C + threads - 1) / threads;
    mgpu_parallel_for(a->ctx, a->C, MGPU__MAX(mgpu__norm_min_chunk(a->N * a->S), per_thread), fn, (void *)j);
}

/* sums[0, C) = sum p, sums[C, 2C) = sum p * (q - center) per channel (local to this process). */
static void mgpu__bn_channel_sums(const mgpu__batch_norm_args *a, const float *p, const float *q, const float *center) {
    mgpu__bn_job j;
    memset(&j, 0, sizeof j);
    j.a = a; j.p = p; j.q = q; j.center = center;
    mgpu__bn_for_channels(&j, mgpu__bn_sums_range);
}

/* The batch norm twins on the CPU (see "Internal: the seam"). */
static void mgpu__cpu_batch_norm_stats(const mgpu__batch_norm_args *a) {
    mgpu__bn_channel_sums(a, a->x, a->x, NULL);   /* sum x, sum x^2 */
    a->sums[2 * a->C] = (double)(a->N * a->S);
}

/* Batch mean/rstd from the (reduced) sums and the running-stat update with the unbiased
   variance, as PyTorch: running = (1 - momentum) * running + momentum * batch. */
static void mgpu__bn_batch_stats(const mgpu__batch_norm_args *a) {
    int64_t c, C = a->C;
    double count = a->sums[2 * C];
    for (c = 0; c < C; c++) {
        double m = a->sums[c] / count, var = a->sums[C + c] / count - m * m;
        if (var < 0) var = 0;
        a->mean[c] = (float)m;
        a->rstd[c] = (float)(1.0 / sqrt(var + (double)a->eps));
        if (a->running_mean) a->running_mean[c] = (float)((1.0 - a->momentum) * a->running_mean[c] + (double)a->momentum * m);
        if (a->running_var)
            a->running_var[c] = (float)((1.0 - a->momentum) * a->running_var[c] + (double)a->momentum * var * count / (count - 1.0));
    }
}

static void mgpu__cpu_batch_norm_forward(const mgpu__batch_norm_args *a) {
    mgpu__bn_job j;
    int64_t c;
    if (a->training) {
        mgpu__bn_batch_stats(a);
    } else {
        for (c = 0; c < a->C; c++) {
            a->mean[c] = a->running_mean[c];
            a->rstd[c] = (float)(1.0 / sqrt((double)a->running_var[c] + (double)a->eps));
        }
    }
    for (c = 0; c < a->C; c++) a->scale[c] = a->w ? a->rstd[c] * a->w[c] : a->rstd[c];
    memset(&j, 0, sizeof j);
    j.a = a;
    mgpu__bn_for_channels(&j, mgpu__bn_affine_range);
}

static void mgpu__cpu_batch_norm_grad_sums(const mgpu__batch_norm_args *a) {
    int64_t c, C = a->C;
    mgpu__bn_channel_sums(a, a->dy, a->x, a->mean);   /* sum dy, sum dy * (x - mean) */
    if (a->dw) for (c = 0; c < C; c++) a->dw[c] += (float)(a->sums[C + c] * a->rstd[c]);
    if (a->db) mgpu__norm_add_sums(a->db, a->sums, C);
}

static void mgpu__cpu_batch_norm_backward(const mgpu__batch_norm_args *a) {
    mgpu__bn_job j;
    int64_t c, C = a->C;
    float *k = a->coef;
    if (a->training) {
        /* the batch statistics depend on x: mean of dy and its projection on xhat */
        double count = *a->count;
        for (c = 0; c < C; c++) {
            k[c] = (float)(a->sums[c] / count);
            k[C + c] = (float)(a->sums[C + c] / count * a->rstd[c] * a->rstd[c]);
        }
    } else {
        memset(k, 0, sizeof(float) * (size_t)(2 * C));   /* eval: a plain per-channel affine */
    }
    memset(&j, 0, sizeof j);
    j.a = a; j.k1 = k; j.k2 = k + C;
    mgpu__bn_for_channels(&j, mgpu__bn_input_grad_range);
}

/* The SyncBatchNorm all-reduce point (see above); a no-op without sync. */
static int mgpu__bn_reduce_sums(const mgpu__bn_sync *sync, double *sums, int64_t n) {
    mgpu_result r;
    if (!sync || !sync->reduce) return 1;
    r = sync->reduce(sync->user, sums, n);
    if (r != MGPU_OK) {
        if (mgpu_last_result() == MGPU_OK) mgpu__fail(r, "mgpu_op_batch_norm: reducing the batch statistics across ranks failed");
        return 0;
    }
    return 1;
}

/* What the backward needs (arena). */
typedef struct mgpu__bn_saved {
    float *mean, *rstd, *scale;    /* (C) */
    const double *count;           /* elements per channel over all ranks (training; in the forward's sums) */
    int training;
    mgpu__bn_sync sync;
} mgpu__bn_saved;

static mgpu_result mgpu__bn_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu_tensor *x = node->in[0], *w = node->in[1], *b = node->in[2];
    const mgpu__bn_saved *sv = (const mgpu__bn_saved *)node->extra;
    int need_x = mgpu__needs_grad(node, 0), need_w = mgpu__needs_grad(node, 1), need_b = mgpu__needs_grad(node, 2);
    mgpu__batch_norm_args a;
    mgpu_result r;
    memset(&a, 0, sizeof a);
    a.ctx = ctx;
    a.N = node->iarg[0]; a.C = node->iarg[1]; a.S = node->iarg[2];
    a.training = sv->training;
    a.x = (const float *)x->data;
    a.dy = (const float *)node->out->grad->data;
    a.mean = sv->mean; a.rstd = sv->rstd; a.scale = sv->scale; a.count = sv->count;
    if ((need_x && sv->training) || need_w || need_b) {
        if (!(a.sums = mgpu__norm_doubles(ctx, 2 * a.C))) return MGPU_ERR_OOM_HOST;
        if (need_w) MGPU__GRAD_OR_FAIL(a.dw, ctx, w);
        if (need_b) MGPU__GRAD_OR_FAIL(a.db, ctx, b);
        if ((r = MGPU__TWIN(ctx, batch_norm_grad_sums, &a)) != MGPU_OK) return r;
    }
    if (!need_x) return MGPU_OK;
    if (sv->training && !mgpu__bn_reduce_sums(&sv->sync, a.sums, 2 * a.C)) return mgpu_last_result();
    if (!(a.coef = mgpu__norm_floats(ctx, 2 * a.C))) return MGPU_ERR_OOM_HOST;
    MGPU__GRAD_OR_FAIL(a.dx, ctx, x);
    return MGPU__TWIN(ctx, batch_norm_backward, &a);
}

static int mgpu__bn_validate(mgpu_context *ctx, const char *op, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b,
                             mgpu_tensor *running_mean, mgpu_tensor *running_var, int training, float momentum, float eps) {
    int64_t C;
    if (!mgpu__check_input(ctx, op, "x", x, 1)) return 0;
    if (x->ndim < 2 || x->shape[1] < 1) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: x has shape %s, need (N, C) or (N, C, H, W) with C >= 1", op, mgpu__shape_str(x));
        return 0;
    }
    C = x->shape[1];
    if (!mgpu__norm_check_vec(ctx, op, "w", w, C, x) || !mgpu__norm_check_vec(ctx, op, "b", b, C, x) ||
        !mgpu__norm_check_vec(ctx, op, "running_mean", running_mean, C, x) ||
        !mgpu__norm_check_vec(ctx, op, "running_var", running_var, C, x))
        return 0;
    if ((running_mean == NULL) != (running_var == NULL)) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: running_mean and running_var must be given together (or both NULL)", op);
        return 0;
    }
    if (!training && !running_mean) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: running_mean and running_var are required when training is 0", op);
        return 0;
    }
    if (training && x->numel / C <= 1) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: expected more than 1 value per channel when training, x has shape %s", op, mgpu__shape_str(x));
        return 0;
    }
    if (!(momentum == momentum) || momentum > FLT_MAX || momentum < -FLT_MAX) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: momentum is %g, must be finite", op, (double)momentum);
        return 0;
    }
    return mgpu__norm_check_nonneg(op, "eps", eps);
}

/* Batch norm with an optional cross-rank reduce of the statistics (SyncBatchNorm). */
static mgpu_tensor *mgpu__batch_norm(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b,
                                     mgpu_tensor *running_mean, mgpu_tensor *running_var, int training,
                                     float momentum, float eps, const mgpu__bn_sync *sync) {
    static const char *op = "mgpu_op_batch_norm";
    mgpu_tensor *in[3];
    mgpu_tensor *out;
    mgpu__node *node = NULL;
    mgpu__batch_norm_args a;
    mgpu__bn_saved *sv;
    float *stats;
    int64_t C;
    if (!mgpu__bn_validate(ctx, op, x, w, b, running_mean, running_var, training, momentum, eps)) return NULL;
    memset(&a, 0, sizeof a);
    a.ctx = ctx;
    a.N = x->shape[0]; a.C = C = x->shape[1];
    a.S = a.N ? x->numel / (a.N * C) : 0;
    a.training = training != 0; a.momentum = momentum; a.eps = eps;
    out = mgpu__new_activation(ctx, MGPU_F32, x->ndim, x->shape);
    sv = (mgpu__bn_saved *)mgpu__arena_alloc(ctx, sizeof *sv);
    stats = mgpu__norm_floats(ctx, 3 * C);   /* mean, rstd, scale: (C) each */
    if (!out || !sv || !stats) return NULL;
    memset(sv, 0, sizeof *sv);
    sv->mean = a.mean = stats; sv->rstd = a.rstd = stats + C; sv->scale = a.scale = stats + 2 * C;
    sv->training = a.training;
    if (sync) sv->sync = *sync;
    a.x = (const float *)x->data;
    a.w = w ? (const float *)w->data : NULL;
    a.b = b ? (const float *)b->data : NULL;
    a.running_mean = running_mean ? (float *)running_mean->data : NULL;
    a.running_var = running_var ? (float *)running_var->data : NULL;
    a.y = (float *)out->data;
    if (training) {
        if (!(a.sums = mgpu__norm_doubles(ctx, 2 * C + 1))) return NULL;
        if (MGPU__TWIN(ctx, batch_norm_stats, &a) != MGPU_OK) return NULL;   /* sum x, sum x^2, count */
        if (!mgpu__bn_reduce_sums(sync, a.sums, 2 * C + 1)) return NULL;
        sv->count = a.sums + 2 * C;
    }
    if (MGPU__TWIN(ctx, batch_norm_forward, &a) != MGPU_OK) return NULL;
    in[0] = x; in[1] = w; in[2] = b;
    MGPU__RECORD(ctx, "batch_norm", mgpu__bn_backward, out, 3, in, node);
    if (node) {
        node->extra = sv;
        node->iarg[0] = a.N; node->iarg[1] = a.C; node->iarg[2] = a.S;
    }
    return out;
}

MGPU_API mgpu_tensor *mgpu_op_batch_norm(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b,
                                         mgpu_tensor *running_mean, mgpu_tensor *running_var,
                                         int training, float momentum, float eps) {
    return mgpu__batch_norm(ctx, x, w, b, running_mean, running_var, training, momentum, eps, NULL);
}

/* ======================================================================================
   Embedding: out[i, :] = weight[idx[i], :]; the backward scatter-adds rows into weight's
   grad, split across threads by columns so repeated indices never race.
   ====================================================================================== */

/* Row of weight that output row i reads. */
static int64_t mgpu__emb_row(const mgpu__embedding_args *a, int64_t i) {
    return a->idx_i64 ? ((const int64_t *)a->idx)[i] : ((const int32_t *)a->idx)[i];
}

/* An id outside [0, V) (the front refuses them; the twins still never read or write out of bounds)
   gives a zero row and no gradient, as the CUDA twin. */
static int mgpu__emb_row_ok(const mgpu__embedding_args *a, int64_t row) { return row >= 0 && row < a->V; }

static void mgpu__emb_gather_rows(void *arg, int64_t i0, int64_t i1) {
    const mgpu__embedding_args *a = (const mgpu__embedding_args *)arg;
    int64_t i, row;
    for (i = i0; i < i1; i++) {
        row = mgpu__emb_row(a, i);
        if (mgpu__emb_row_ok(a, row)) memcpy(a->out + i * a->D, a->weight + row * a->D, sizeof(float) * (size_t)a->D);
        else memset(a->out + i * a->D, 0, sizeof(float) * (size_t)a->D);
    }
}

/* Each column's updates happen in index order on one thread: deterministic. */
static void mgpu__emb_scatter_cols(void *arg, int64_t d0, int64_t d1) {
    const mgpu__embedding_args *a = (const mgpu__embedding_args *)arg;
    int64_t i, d, row;
    for (i = 0; i < a->n; i++) {
        float *g;
        const float *dy = a->dy + i * a->D;
        if (!mgpu__emb_row_ok(a, row = mgpu__emb_row(a, i))) continue;
        g = a->dweight + row * a->D;
        for (d = d0; d < d1; d++) g[d] += dy[d];
    }
}

static void mgpu__cpu_embedding_forward(const mgpu__embedding_args *a) {
    mgpu_parallel_for(a->ctx, a->n, mgpu__norm_min_chunk(a->D), mgpu__emb_gather_rows, (void *)a);
}
static void mgpu__cpu_embedding_backward(const mgpu__embedding_args *a) {
    mgpu_parallel_for(a->ctx, a->D, mgpu__norm_min_chunk(a->n), mgpu__emb_scatter_cols, (void *)a);
}

/* The twins' view of the indices and the weight. */
static mgpu__embedding_args mgpu__emb_args(mgpu_context *ctx, const mgpu_tensor *weight, const mgpu_tensor *idx) {
    mgpu__embedding_args a;
    memset(&a, 0, sizeof a);
    a.ctx = ctx;
    a.idx = idx->data; a.idx_i64 = idx->dtype == MGPU_I64;
    a.n = idx->numel; a.V = weight->shape[0]; a.D = weight->shape[1];
    return a;
}

/* node: in = {weight}; saved[0] = idx */
static mgpu_result mgpu__emb_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__embedding_args a;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    a = mgpu__emb_args(ctx, node->in[0], node->saved[0]);
    a.dy = (const float *)node->out->grad->data;
    MGPU__GRAD_OR_FAIL(a.dweight, ctx, node->in[0]);
    {   /* the CUDA twin's sort keys (none on the CPU) */
        mgpu_result r = mgpu__cuda_scratch(ctx, MGPU__EMB_SCRATCH_BYTES(a.n), &a.scratch);
        if (r != MGPU_OK) return r;
    }
    return MGPU__TWIN(ctx, embedding_backward, &a);
}

/* Every index in [0, V); else an error naming the first bad value and its position. Indices on a
   GPU are not read back (a stall per step): there a bad id gives a zero row and no gradient. */
static int mgpu__emb_check_indices(const char *op, const mgpu_tensor *idx, int64_t V) {
    int64_t i, rem, pos[MGPU_MAX_DIMS];
    int d;
    char where[160];
    if (!mgpu__on_host(idx)) return 1;
    for (i = 0; i < idx->numel; i++) {
        int64_t v = mgpu__index_at(idx, i);
        if (v >= 0 && v < V) continue;
        for (d = idx->ndim - 1, rem = i; d >= 0; d--) { pos[d] = rem % idx->shape[d]; rem /= idx->shape[d]; }
        mgpu_shape_string(idx->ndim, pos, where, sizeof where);
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: idx holds %lld at position %s (flat %lld), outside [0, %lld) for weight of %lld rows",
                   op, (long long)v, where, (long long)i, (long long)V, (long long)V);
        return 0;
    }
    return 1;
}

MGPU_API mgpu_tensor *mgpu_op_embedding(mgpu_context *ctx, mgpu_tensor *weight, mgpu_tensor *idx) {
    static const char *op = "mgpu_op_embedding";
    int64_t shape[MGPU_MAX_DIMS];
    mgpu_tensor *out;
    mgpu__node *node = NULL;
    mgpu__embedding_args a;
    if (!mgpu__check_input(ctx, op, "weight", weight, 1) || !mgpu__check_index(ctx, op, "idx", idx)) return NULL;
    if (weight->ndim != 2) MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: weight has shape %s, need (V, D)", op, mgpu__shape_str(weight));
    if (idx->ndim >= MGPU_MAX_DIMS)
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: idx has %d dims, at most %d fit (the output adds one)", op, idx->ndim, MGPU_MAX_DIMS - 1);
    if (!mgpu__emb_check_indices(op, idx, weight->shape[0])) return NULL;
    if (idx->ndim) memcpy(shape, idx->shape, sizeof(int64_t) * (size_t)idx->ndim);
    shape[idx->ndim] = weight->shape[1];
    out = mgpu__new_activation(ctx, MGPU_F32, idx->ndim + 1, shape);   /* (..., D) */
    if (!out) return NULL;
    a = mgpu__emb_args(ctx, weight, idx);
    a.weight = (const float *)weight->data; a.out = (float *)out->data;
    if (MGPU__TWIN(ctx, embedding_forward, &a) != MGPU_OK) return NULL;
    MGPU__RECORD(ctx, "embedding", mgpu__emb_backward, out, 1, &weight, node);
    if (node) node->saved[0] = idx;
    return out;
}

/* ======================================================================================
   Scaled dot-product attention, fused, per (b, h) pair:
     S = Q K^T / sqrt(D) (Tq, Tk); causal: S[i, j] = -inf for j > i (tril(ones(Tq, Tk)), as
     PyTorch's is_causal); P = softmax(S); O = P V (Tq, D). P (B, H, Tq, Tk) is kept for the
     backward: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)),
     dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D).
   Pairs run in parallel (each GEMM single-threaded) when there are enough of them, else
   one after the other with the threaded GEMM.
   ====================================================================================== */

typedef struct mgpu__attn_job mgpu__attn_job;
typedef void (*mgpu__attn_pair_fn)(const mgpu__attn_job *j, int64_t pair, float *scratch);
/* One run of an attention CPU twin over its pairs. */
struct mgpu__attn_job {
    const mgpu__attention_args *a;
    mgpu_context *gemm_ctx;        /* ctx when pairs run one after the other, NULL inside the pool */
    float *scratch;                /* (n_parts, Tq, Tk): dP in the backward, P in a forward without grad */
    int64_t n_parts;
    mgpu__attn_pair_fn pair_fn;
};

/* Keys visible to query row i. */
static int64_t mgpu__attn_row_len(const mgpu__attention_args *a, int64_t i) {
    return a->causal ? MGPU__MIN(i + 1, a->Tk) : a->Tk;
}

/* Row-wise softmax of the scores in place, masked entries set to 0. */
static void mgpu__attn_softmax_rows(const mgpu__attention_args *a, float *s) {
    int64_t i, j;
    for (i = 0; i < a->Tq; i++) {
        float *row = s + i * a->Tk, mx = -FLT_MAX, inv;
        int64_t len = mgpu__attn_row_len(a, i);
        double sum = 0;
        for (j = 0; j < len; j++) mx = row[j] > mx ? row[j] : mx;
        for (j = 0; j < len; j++) { row[j] = expf(row[j] - mx); sum += row[j]; }
        inv = (float)(1.0 / sum);
        for (j = 0; j < len; j++) row[j] *= inv;
        for (j = len; j < a->Tk; j++) row[j] = 0.0f;
    }
}

/* dP -> dS = P * (dP - rowsum(dP * P)) in place (masked entries have P = 0). */
static void mgpu__attn_softmax_grad_rows(const mgpu__attention_args *a, const float *p, float *dp) {
    int64_t i, j;
    for (i = 0; i < a->Tq; i++) {
        const float *pr = p + i * a->Tk;
        float *dr = dp + i * a->Tk, dot_f;
        double dot = 0;
        for (j = 0; j < a->Tk; j++) dot += (double)pr[j] * dr[j];
        dot_f = (float)dot;
        for (j = 0; j < a->Tk; j++) dr[j] = pr[j] * (dr[j] - dot_f);
    }
}

static void mgpu__attn_forward_pair(const mgpu__attn_job *j, int64_t pair, float *scratch) {
    const mgpu__attention_args *a = j->a;
    int64_t Tq = a->Tq, Tk = a->Tk, D = a->D;
    const float *q = a->q + pair * Tq * D, *k = a->k + pair * Tk * D, *v = a->v + pair * Tk * D;
    float *p = a->prob ? a->prob + pair * Tq * Tk : scratch, *o = a->out + pair * Tq * D;
    /* zeroed so a GEMM that reads C even with beta = 0 cannot pick up arena garbage (NaN) */
    memset(p, 0, sizeof(float) * (size_t)(Tq * Tk));
    memset(o, 0, sizeof(float) * (size_t)(Tq * D));
    mgpu__cpu_gemm_f32(j->gemm_ctx, 0, 1, Tq, Tk, D, a->scale, q, D, k, D, 0.0f, p, Tk);  /* (Tq, Tk) scores */
    mgpu__attn_softmax_rows(a, p);
    mgpu__cpu_gemm_f32(j->gemm_ctx, 0, 0, Tq, D, Tk, 1.0f, p, Tk, v, D, 0.0f, o, D);      /* (Tq, D) */
}

static void mgpu__attn_backward_pair(const mgpu__attn_job *j, int64_t pair, float *ds) {
    const mgpu__attention_args *a = j->a;
    int64_t Tq = a->Tq, Tk = a->Tk, D = a->D;
    int64_t qo = pair * Tq * D, ko = pair * Tk * D;
    const float *p = a->prob + pair * Tq * Tk, *dout = a->dout + qo;
    if (a->dv) mgpu__cpu_gemm_f32(j->gemm_ctx, 1, 0, Tk, D, Tq, 1.0f, p, Tk, dout, D, 1.0f, a->dv + ko, D);  /* += P^T dO */
    if (!a->dq && !a->dk) return;
    memset(ds, 0, sizeof(float) * (size_t)(Tq * Tk));
    mgpu__cpu_gemm_f32(j->gemm_ctx, 0, 1, Tq, Tk, D, 1.0f, dout, D, a->v + ko, D, 0.0f, ds, Tk);            /* dP = dO V^T */
    mgpu__attn_softmax_grad_rows(a, p, ds);
    if (a->dq) mgpu__cpu_gemm_f32(j->gemm_ctx, 0, 0, Tq, D, Tk, a->scale, ds, Tk, a->k + ko, D, 1.0f, a->dq + qo, D);
    if (a->dk) mgpu__cpu_gemm_f32(j->gemm_ctx, 1, 0, Tk, D, Tq, a->scale, ds, Tk, a->q + qo, D, 1.0f, a->dk + ko, D);
}

/* Part `part` owns pairs [part * P / parts, (part + 1) * P / parts) and one scratch slot. */
static void mgpu__attn_parts_range(void *arg, int64_t p0, int64_t p1) {
    const mgpu__attn_job *j = (const mgpu__attn_job *)arg;
    int64_t part, pair, pairs = j->a->BH;
    for (part = p0; part < p1; part++) {
        float *scratch = j->scratch ? j->scratch + part * j->a->Tq * j->a->Tk : NULL;
        for (pair = part * pairs / j->n_parts; pair < (part + 1) * pairs / j->n_parts; pair++) j->pair_fn(j, pair, scratch);
    }
}

/* Runs pair_fn over every (b, h) pair; sets *status if its scratch cannot be had. */
static void mgpu__attn_run(const mgpu__attention_args *a, mgpu__attn_pair_fn pair_fn, int need_scratch) {
    mgpu__attn_job j;
    int threads = mgpu_context_num_threads(a->ctx);
    int64_t work = a->BH * a->Tq * a->Tk * a->D;
    int parallel = threads > 1 && a->BH >= threads && work >= MGPU__NORM_GRAIN;
    memset(&j, 0, sizeof j);
    j.a = a;
    j.pair_fn = pair_fn;
    j.n_parts = parallel ? MGPU__MIN(a->BH, 4 * (int64_t)threads) : 1;
    j.gemm_ctx = parallel ? NULL : a->ctx;
    if (need_scratch && !(j.scratch = mgpu__norm_floats(a->ctx, j.n_parts * a->Tq * a->Tk))) { *a->status = MGPU_ERR_OOM_HOST; return; }
    if (parallel) mgpu_parallel_for(a->ctx, j.n_parts, 1, mgpu__attn_parts_range, &j);
    else mgpu__attn_parts_range(&j, 0, 1);
}

/* The attention twins on the CPU: the forward needs a P slot per part only when P is not kept,
   the backward a dP slot per part when dq or dk is wanted. */
static void mgpu__cpu_attention_forward(const mgpu__attention_args *a) {
    mgpu__attn_run(a, mgpu__attn_forward_pair, a->prob == NULL);
}
static void mgpu__cpu_attention_backward(const mgpu__attention_args *a) {
    mgpu__attn_run(a, mgpu__attn_backward_pair, a->dq || a->dk);
}

/* node: in = {q, k, v}; extra = P; iarg = {pairs, Tq, Tk, D, causal}; farg[0] = scale. */
static mgpu_result mgpu__attn_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__attention_args a;
    mgpu_result r, status = MGPU_OK;
    memset(&a, 0, sizeof a);
    a.ctx = ctx; a.status = &status; a.blas = ctx->cuda_blas;
    a.BH = node->iarg[0]; a.Tq = node->iarg[1]; a.Tk = node->iarg[2]; a.D = node->iarg[3];
    a.causal = (int)node->iarg[4];
    a.scale = node->farg[0];
    a.q = (const float *)node->in[0]->data;
    a.k = (const float *)node->in[1]->data;
    a.v = (const float *)node->in[2]->data;
    a.prob = (float *)node->extra;
    a.dout = (const float *)node->out->grad->data;
    if (mgpu__needs_grad(node, 0)) MGPU__GRAD_OR_FAIL(a.dq, ctx, node->in[0]);
    if (mgpu__needs_grad(node, 1)) MGPU__GRAD_OR_FAIL(a.dk, ctx, node->in[1]);
    if (mgpu__needs_grad(node, 2)) MGPU__GRAD_OR_FAIL(a.dv, ctx, node->in[2]);
    r = MGPU__TWIN(ctx, attention_backward, &a);
    return r != MGPU_OK ? r : status;
}

static int mgpu__attn_validate(mgpu_context *ctx, const char *op, const mgpu_tensor *q, const mgpu_tensor *k, const mgpu_tensor *v) {
    if (!mgpu__check_input(ctx, op, "q", q, 1) || !mgpu__check_input(ctx, op, "k", k, 1) || !mgpu__check_input(ctx, op, "v", v, 1))
        return 0;
    if (q->ndim != 4 || k->ndim != 4 || !mgpu_tensor_same_shape(k, v) || q->shape[0] != k->shape[0] ||
        q->shape[1] != k->shape[1] || q->shape[3] != k->shape[3] || q->shape[3] < 1 || k->shape[2] < 1) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: q %s, k %s, v %s do not fit: need q (B, H, Tq, D) and k, v (B, H, Tk, D) with D, Tk >= 1",
                   op, mgpu__shape_str(q), mgpu__shape_str(k), mgpu__shape_str(v));
        return 0;
    }
    return 1;
}

/* Autocast (see "Mixed precision"): q, k, v and the output rounded to the half format when ctx->autocast is set. */

MGPU_API mgpu_tensor *mgpu_op_attention(mgpu_context *ctx, mgpu_tensor *q, mgpu_tensor *k, mgpu_tensor *v, int causal) {
    static const char *op = "mgpu_op_attention";
    mgpu_tensor *in[3];
    mgpu_tensor *out;
    mgpu__node *node = NULL;
    mgpu__attention_args a;
    mgpu_result status = MGPU_OK;
    int keep_prob;
    if (mgpu__autocast_active(ctx)) {
        int mode;
        in[0] = q; in[1] = k; in[2] = v;
        if ((mode = mgpu__autocast_begin(ctx, in, 3)) < 0) return NULL;
        return mgpu__autocast_end(ctx, mode, mgpu_op_attention(ctx, in[0], in[1], in[2], causal));
    }
    if (!mgpu__attn_validate(ctx, op, q, k, v)) return NULL;
    /* P for all pairs only when a backward may follow; otherwise the twins find their own room */
    keep_prob = mgpu_is_grad_enabled(ctx) && (q->requires_grad || k->requires_grad || v->requires_grad);
    memset(&a, 0, sizeof a);
    a.ctx = ctx; a.status = &status; a.blas = ctx->cuda_blas;
    a.BH = q->shape[0] * q->shape[1];
    a.Tq = q->shape[2]; a.Tk = k->shape[2]; a.D = q->shape[3];
    a.scale = (float)(1.0 / sqrt((double)a.D));
    a.causal = causal != 0;
    a.q = (const float *)q->data; a.k = (const float *)k->data; a.v = (const float *)v->data;
    out = mgpu__new_activation(ctx, MGPU_F32, 4, q->shape);                   /* (B, H, Tq, D) */
    a.prob = keep_prob ? mgpu__norm_floats(ctx, a.BH * a.Tq * a.Tk) : NULL;  /* (B, H, Tq, Tk) */
    if (!out || (keep_prob && !a.prob)) return NULL;
    a.out = (float *)out->data;
    if (MGPU__TWIN(ctx, attention_forward, &a) != MGPU_OK || status != MGPU_OK) return NULL;
    in[0] = q; in[1] = k; in[2] = v;
    MGPU__RECORD(ctx, "attention", mgpu__attn_backward, out, 3, in, node);
    if (node) {
        node->extra = a.prob;
        node->iarg[0] = a.BH; node->iarg[1] = a.Tq; node->iarg[2] = a.Tk; node->iarg[3] = a.D;
        node->iarg[4] = a.causal;
        node->farg[0] = a.scale;
    }
    return out;
}
