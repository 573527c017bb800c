/* ======================================================================================
   Ops: elementwise, losses, reductions, shapes
   ====================================================================================== */

/* Elementwise, activation, loss, reduction and shape ops: CPU reference implementations with
   forward and backward. Every reduction adds in an order fixed by the shapes alone, so results
   are bit-identical whatever the thread count. */

/* Loops with fewer elements than this stay on the calling thread: waking the pool costs more. */
#define MGPU__GRAIN 32768
#define MGPU__IGNORE_INDEX (-100)

/* min_chunk for mgpu_parallel_for when each item costs about `work` elements. */
static int64_t mgpu__grain_for(int64_t work) { return MGPU__MAX((int64_t)1, MGPU__GRAIN / MGPU__MAX((int64_t)1, work)); }

static void mgpu__contig_strides(int ndim, const int64_t *shape, int64_t *st) {
    int64_t s = 1;
    int i;
    for (i = ndim - 1; i >= 0; i--) { st[i] = s; s *= shape[i]; }
}

/* Strides of t read as a tensor of out_ndim dims aligned to the right (NumPy broadcasting):
   0 for the missing leading dims and for size-1 dims, so one element serves the whole dim. */
static void mgpu__bcast_strides(int out_ndim, const mgpu_tensor *t, int64_t *st) {
    int64_t own[MGPU_MAX_DIMS];
    int i, lead = out_ndim - t->ndim;
    mgpu__contig_strides(t->ndim, t->shape, own);
    for (i = 0; i < out_ndim; i++) {
        int j = i - lead;
        st[i] = (j < 0 || t->shape[j] == 1) ? 0 : own[j];
    }
}

/* x viewed as (outer, D, inner) around dim d. */
static void mgpu__split_at(const mgpu_tensor *x, int d, int64_t *outer, int64_t *dim, int64_t *inner) {
    int i;
    *outer = 1; *inner = 1; *dim = x->shape[d];
    for (i = 0; i < d; i++) *outer *= x->shape[i];
    for (i = d + 1; i < x->ndim; i++) *inner *= x->shape[i];
}

/* --------------------------------------------------------------------------------------
   Strided iteration over up to 3 operands sharing one index space. Size-1 dims are dropped and
   neighbours that step alike in every operand are merged, so inner runs are as long as possible.
   -------------------------------------------------------------------------------------- */

#define MGPU__MAX_OPS 3
typedef struct mgpu__iter {
    int ndim, nops;
    int64_t numel;
    int64_t shape[MGPU_MAX_DIMS];
    int64_t st[MGPU__MAX_OPS][MGPU_MAX_DIMS];
} mgpu__iter;

static void mgpu__iter_start(mgpu__iter *it, int ndim, const int64_t *shape) {
    int i;
    memset(it, 0, sizeof *it);
    it->ndim = ndim;
    it->numel = 1;
    for (i = 0; i < ndim; i++) { it->shape[i] = shape[i]; it->numel *= shape[i]; }
}
/* Adds an operand; strides are in elements, one per dim of the index space (0: broadcast). */
static void mgpu__iter_operand(mgpu__iter *it, const int64_t *st) {
    int i;
    for (i = 0; i < it->ndim; i++) it->st[it->nops][i] = st[i];
    it->nops++;
}
static int mgpu__iter_mergeable(const mgpu__iter *it, int outer, int inner) {
    int k;
    for (k = 0; k < it->nops; k++)
        if (it->st[k][outer] != it->st[k][inner] * it->shape[inner]) return 0;
    return 1;
}
static void mgpu__iter_coalesce(mgpu__iter *it) {
    int i, k, n = 0;
    for (i = 0; i < it->ndim; i++) {
        if (it->shape[i] == 1) continue;
        if (n > 0 && mgpu__iter_mergeable(it, n - 1, i)) {
            it->shape[n - 1] *= it->shape[i];
            for (k = 0; k < it->nops; k++) it->st[k][n - 1] = it->st[k][i];
        } else {
            it->shape[n] = it->shape[i];
            for (k = 0; k < it->nops; k++) it->st[k][n] = it->st[k][i];
            n++;
        }
    }
    if (n == 0) { /* a single element */
        it->shape[0] = 1;
        for (k = 0; k < it->nops; k++) it->st[k][0] = 0;
        n = 1;
    }
    it->ndim = n;
}
static void mgpu__iter_seek(const mgpu__iter *it, int64_t flat, int64_t *idx, int64_t *off) {
    int d, k;
    for (k = 0; k < it->nops; k++) off[k] = 0;
    for (d = it->ndim - 1; d >= 0; d--) {
        idx[d] = flat % it->shape[d];
        flat /= it->shape[d];
        for (k = 0; k < it->nops; k++) off[k] += idx[d] * it->st[k][d];
    }
}
/* Moves `steps` along the innermost dim (never past its end), carrying into outer dims. */
static void mgpu__iter_advance(const mgpu__iter *it, int64_t *idx, int64_t *off, int64_t steps) {
    int d = it->ndim - 1, k;
    idx[d] += steps;
    for (k = 0; k < it->nops; k++) off[k] += steps * it->st[k][d];
    while (d > 0 && idx[d] == it->shape[d]) {
        for (k = 0; k < it->nops; k++) off[k] += it->st[k][d - 1] - it->shape[d] * it->st[k][d];
        idx[d] = 0;
        idx[--d]++;
    }
}

/* A run: `n` consecutive positions of the innermost dim; operand k starts at off[k], steps st[k]. */
typedef void (*mgpu__run_fn)(void *arg, const int64_t *off, const int64_t *st, int64_t n);

static void mgpu__iter_runs(const mgpu__iter *it, int64_t begin, int64_t end, mgpu__run_fn fn, void *arg) {
    int64_t idx[MGPU_MAX_DIMS], off[MGPU__MAX_OPS], st[MGPU__MAX_OPS];
    int last = it->ndim - 1, k;
    if (begin >= end) return;
    for (k = 0; k < MGPU__MAX_OPS; k++) st[k] = it->st[k][last];
    mgpu__iter_seek(it, begin, idx, off);
    while (begin < end) {
        int64_t run = MGPU__MIN(it->shape[last] - idx[last], end - begin);
        fn(arg, off, st, run);
        begin += run;
        if (begin < end) mgpu__iter_advance(it, idx, off, run);
    }
}

typedef struct mgpu__iter_job { const mgpu__iter *it; mgpu__run_fn fn; void *arg; } mgpu__iter_job;
static void mgpu__iter_job_range(void *p, int64_t begin, int64_t end) {
    const mgpu__iter_job *job = (const mgpu__iter_job *)p;
    mgpu__iter_runs(job->it, begin, end, job->fn, job->arg);
}
/* Runs fn over the whole space; safe to split only when runs write disjoint elements. */
static void mgpu__iter_parallel(mgpu_context *ctx, const mgpu__iter *it, mgpu__run_fn fn, void *arg) {
    mgpu__iter_job job;
    job.it = it; job.fn = fn; job.arg = arg;
    mgpu_parallel_for(ctx, it->numel, MGPU__GRAIN, mgpu__iter_job_range, &job);
}

/* --------------------------------------------------------------------------------------
   Deterministic sums: fixed blocks (chosen from n alone) summed in double, then the block
   partials added in order, so the result does not depend on the thread count.
   -------------------------------------------------------------------------------------- */

#define MGPU__SUM_MAX_BLOCKS 1024
typedef double (*mgpu__partial_fn)(void *arg, int64_t begin, int64_t end);
typedef struct mgpu__sum_job { mgpu__partial_fn fn; void *arg; int64_t n, block; double *partials; } mgpu__sum_job;

static void mgpu__sum_job_range(void *p, int64_t begin, int64_t end) {
    const mgpu__sum_job *job = (const mgpu__sum_job *)p;
    int64_t b;
    for (b = begin; b < end; b++) {
        int64_t lo = b * job->block;
        job->partials[b] = job->fn(job->arg, lo, MGPU__MIN(lo + job->block, job->n));
    }
}
/* Sum of fn over [0, n); each item costs about `work` elements (for the threading grain). */
static double mgpu__det_sum(mgpu_context *ctx, int64_t n, int64_t min_block, int64_t work, mgpu__partial_fn fn, void *arg) {
    double partials[MGPU__SUM_MAX_BLOCKS];
    mgpu__sum_job job;
    double total = 0;
    int64_t nb, b;
    if (n <= 0) return 0;
    job.fn = fn; job.arg = arg; job.n = n; job.partials = partials;
    job.block = MGPU__MAX(MGPU__MAX(min_block, (int64_t)1), (n + MGPU__SUM_MAX_BLOCKS - 1) / MGPU__SUM_MAX_BLOCKS);
    nb = (n + job.block - 1) / job.block;
    mgpu_parallel_for(ctx, nb, mgpu__grain_for(job.block * MGPU__MAX(work, (int64_t)1)), mgpu__sum_job_range, &job);
    for (b = 0; b < nb; b++) total += partials[b];
    return total;
}

/* --------------------------------------------------------------------------------------
   Elementwise kernels over a broadcast index space. Operand 0 is the output y (contiguous),
   1 is a, 2 is b.
   -------------------------------------------------------------------------------------- */

typedef enum mgpu__ew_kind {
    MGPU__EW_ADD,     /* y = a + c * b */
    MGPU__EW_MUL,     /* y = a * b */
    MGPU__EW_ACC,     /* y += c * a          (backward: gradient pass-through or broadcast) */
    MGPU__EW_ACC_MUL  /* y += c * a * b      (backward of mul) */
} mgpu__ew_kind;
typedef struct mgpu__ew_arg { mgpu__ew_kind kind; float c; float *y; const float *a, *b; } mgpu__ew_arg;

static void mgpu__ew_run(void *p, const int64_t *off, const int64_t *st, int64_t n) {
    const mgpu__ew_arg *e = (const mgpu__ew_arg *)p;
    float *y = e->y + off[0];
    const float *a = e->a + off[1], *b = e->b + off[2];
    int64_t sy = st[0], sa = st[1], sb = st[2], j;
    float c = e->c;
    switch (e->kind) {
    case MGPU__EW_ADD:
        if (sy == 1 && sa == 1 && sb == 1) for (j = 0; j < n; j++) y[j] = a[j] + c * b[j];
        else for (j = 0; j < n; j++) y[j * sy] = a[j * sa] + c * b[j * sb];
        break;
    case MGPU__EW_MUL:
        if (sy == 1 && sa == 1 && sb == 1) for (j = 0; j < n; j++) y[j] = a[j] * b[j];
        else for (j = 0; j < n; j++) y[j * sy] = a[j * sa] * b[j * sb];
        break;
    case MGPU__EW_ACC:
        if (sy == 1 && sa == 1) for (j = 0; j < n; j++) y[j] += c * a[j];
        else for (j = 0; j < n; j++) y[j * sy] += c * a[j * sa];
        break;
    case MGPU__EW_ACC_MUL:
        for (j = 0; j < n; j++) y[j * sy] += c * a[j * sa] * b[j * sb];
        break;
    }
}

/* y (shape, contiguous) = kind(a, b) with a and b read through strides sa, sb (b may be NULL
   for ACC). Each output element is written by one thread only. */
static void mgpu__ew_apply(mgpu_context *ctx, mgpu__ew_kind kind, float c, int ndim, const int64_t *shape, float *y,
                           const float *a, const int64_t *sa, const float *b, const int64_t *sb) {
    int64_t sy[MGPU_MAX_DIMS], zero[MGPU_MAX_DIMS];
    mgpu__iter it;
    mgpu__ew_arg e;
    memset(zero, 0, sizeof zero);
    mgpu__contig_strides(ndim, shape, sy);
    mgpu__iter_start(&it, ndim, shape);
    mgpu__iter_operand(&it, sy);
    mgpu__iter_operand(&it, sa);
    mgpu__iter_operand(&it, b ? sb : zero);
    mgpu__iter_coalesce(&it);
    e.kind = kind; e.c = c; e.y = y; e.a = a; e.b = b ? b : a;
    mgpu__iter_parallel(ctx, &it, mgpu__ew_run, &e);
}

/* --------------------------------------------------------------------------------------
   Reduction of a full index space onto a target that broadcasts over it:
       dst[t] (+)= scale * sum over the reduced dims of src[...] * other[...]
   src is contiguous over the space; target strides are 0 on reduced dims; other (optional) is
   read through its own strides. Each target sums its terms in one fixed order.
   -------------------------------------------------------------------------------------- */

/* Sum of n contiguous floats in double over 8 interleaved lanes: vectorisable, and the order
   is fixed by n alone. */
static double mgpu__sum_f32(const float *s, int64_t n) {
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0}, total = 0;
    int64_t j = 0;
    int l;
    for (; j + 8 <= n; j += 8)
        for (l = 0; l < 8; l++) lane[l] += s[j + l];
    for (; j < n; j++) total += s[j];
    for (l = 0; l < 8; l++) total += lane[l];
    return total;
}

#define MGPU__RBLOCK 256 /* targets handled together, so kept-dim reads stay contiguous */
typedef struct mgpu__reduce {
    mgpu__iter kept, red;   /* operands: 0 = src, 1 = other */
    const float *src, *other;
    float *dst; float scale; int accumulate;
} mgpu__reduce;

static void mgpu__reduce_store(const mgpu__reduce *r, int64_t t, double sum) {
    float v = (float)(r->scale * sum);
    if (r->accumulate) r->dst[t] += v; else r->dst[t] = v;
}

typedef struct mgpu__reduce_block { const mgpu__reduce *r; double *acc; const int64_t *so, *oo; int64_t nb; int dense; } mgpu__reduce_block;
static void mgpu__reduce_block_run(void *p, const int64_t *off, const int64_t *st, int64_t n) {
    const mgpu__reduce_block *b = (const mgpu__reduce_block *)p;
    const float *src = b->r->src, *other = b->r->other;
    int64_t j, i;
    for (j = 0; j < n; j++) {
        const float *s = src + off[0] + j * st[0];
        if (b->dense) { /* the block's targets are consecutive in src: a vectorisable row add */
            s += b->so[0];
            for (i = 0; i < b->nb; i++) b->acc[i] += s[i];
        } else if (other) {
            const float *o = other + off[1] + j * st[1];
            for (i = 0; i < b->nb; i++) b->acc[i] += (double)s[b->so[i]] * o[b->oo[i]];
        } else {
            for (i = 0; i < b->nb; i++) b->acc[i] += s[b->so[i]];
        }
    }
}
static void mgpu__reduce_range(void *p, int64_t begin, int64_t end) {
    const mgpu__reduce *r = (const mgpu__reduce *)p;
    double acc[MGPU__RBLOCK];
    int64_t so[MGPU__RBLOCK], oo[MGPU__RBLOCK], idx[MGPU_MAX_DIMS], off[MGPU__MAX_OPS];
    int64_t blk, i;
    mgpu__reduce_block b;
    b.r = r; b.acc = acc; b.so = so; b.oo = oo;
    for (blk = begin; blk < end; blk++) {
        int64_t t0 = blk * MGPU__RBLOCK;
        b.nb = MGPU__MIN((int64_t)MGPU__RBLOCK, r->kept.numel - t0);
        mgpu__iter_seek(&r->kept, t0, idx, off);
        b.dense = !r->other;
        for (i = 0; i < b.nb; i++) {
            so[i] = off[0]; oo[i] = off[1]; acc[i] = 0;
            if (so[i] != so[0] + i) b.dense = 0;
            if (i + 1 < b.nb) mgpu__iter_advance(&r->kept, idx, off, 1);
        }
        if (r->red.ndim == 1 && r->red.st[0][0] == 1 && !r->other) /* each target sums a contiguous row */
            for (i = 0; i < b.nb; i++) acc[i] = mgpu__sum_f32(r->src + so[i], r->red.numel);
        else
            mgpu__iter_runs(&r->red, 0, r->red.numel, mgpu__reduce_block_run, &b);
        for (i = 0; i < b.nb; i++) mgpu__reduce_store(r, t0 + i, acc[i]);
    }
}
typedef struct mgpu__dot_run_arg { const mgpu__reduce *r; double sum; } mgpu__dot_run_arg;
static void mgpu__reduce_dot_run(void *p, const int64_t *off, const int64_t *st, int64_t n) {
    mgpu__dot_run_arg *d = (mgpu__dot_run_arg *)p;
    const float *s = d->r->src + off[0], *o = d->r->other ? d->r->other + off[1] : NULL;
    double sum = 0;
    int64_t j;
    if (o) for (j = 0; j < n; j++) sum += (double)s[j * st[0]] * o[j * st[1]];
    else if (st[0] == 1) sum = mgpu__sum_f32(s, n);
    else for (j = 0; j < n; j++) sum += s[j * st[0]];
    d->sum += sum;
}
static double mgpu__reduce_partial(void *p, int64_t begin, int64_t end) {
    mgpu__dot_run_arg d;
    d.r = (const mgpu__reduce *)p; d.sum = 0;
    mgpu__iter_runs(&d.r->red, begin, end, mgpu__reduce_dot_run, &d);
    return d.sum;
}

static void mgpu__reduce_into(mgpu_context *ctx, int ndim, const int64_t *shape, const float *src, const int64_t *target_st,
                              const float *other, const int64_t *other_st, float *dst, float scale, int accumulate) {
    int64_t src_st[MGPU_MAX_DIMS], zero[MGPU_MAX_DIMS], ks[MGPU_MAX_DIMS], rs[MGPU_MAX_DIMS];
    int64_t k_src[MGPU_MAX_DIMS], k_oth[MGPU_MAX_DIMS], r_src[MGPU_MAX_DIMS], r_oth[MGPU_MAX_DIMS];
    int nk = 0, nr = 0, i;
    mgpu__reduce r;
    memset(zero, 0, sizeof zero);
    if (!other) other_st = zero;
    mgpu__contig_strides(ndim, shape, src_st);
    for (i = 0; i < ndim; i++) {
        if (shape[i] == 1) continue;
        if (target_st[i] != 0) { ks[nk] = shape[i]; k_src[nk] = src_st[i]; k_oth[nk] = other_st[i]; nk++; }
        else { rs[nr] = shape[i]; r_src[nr] = src_st[i]; r_oth[nr] = other_st[i]; nr++; }
    }
    if (nr == 0 && accumulate) { /* nothing to reduce: an elementwise pass */
        mgpu__ew_apply(ctx, other ? MGPU__EW_ACC_MUL : MGPU__EW_ACC, scale, ndim, shape, dst, src, src_st, other, other_st);
        return;
    }
    mgpu__iter_start(&r.kept, nk, ks); mgpu__iter_operand(&r.kept, k_src); mgpu__iter_operand(&r.kept, k_oth);
    mgpu__iter_start(&r.red, nr, rs); mgpu__iter_operand(&r.red, r_src); mgpu__iter_operand(&r.red, r_oth);
    mgpu__iter_coalesce(&r.kept);
    mgpu__iter_coalesce(&r.red);
    r.src = src; r.other = other; r.dst = dst; r.scale = scale; r.accumulate = accumulate;
    if (r.kept.numel == 1) { /* one target: split the reduced space itself into fixed blocks */
        mgpu__reduce_store(&r, 0, mgpu__det_sum(ctx, r.red.numel, 4096, 1, mgpu__reduce_partial, &r));
        return;
    }
    mgpu_parallel_for(ctx, (r.kept.numel + MGPU__RBLOCK - 1) / MGPU__RBLOCK, mgpu__grain_for(MGPU__RBLOCK * r.red.numel),
                      mgpu__reduce_range, &r);
}

/* --------------------------------------------------------------------------------------
   Binary ops with broadcasting: add, sub, mul, bias_add
   -------------------------------------------------------------------------------------- */

/* Broadcast geometry of a and b (NumPy rules, right-aligned): out's shape, and the strides that read
   a and b against it (mgpu__bcast_strides), or MGPU_ERR_SHAPE naming both shapes. */
static int mgpu__bcast_make(const char *op, const mgpu_tensor *a, const mgpu_tensor *b, mgpu__bcast *g) {
    int n = MGPU__MAX(a->ndim, b->ndim), i;
    memset(g, 0, sizeof *g);
    g->numel = 1; g->a_numel = a->numel; g->b_numel = b->numel;
    for (i = 0; i < n; i++) {
        int ia = i - (n - a->ndim), ib = i - (n - b->ndim);
        int64_t da = ia >= 0 ? a->shape[ia] : 1, db = ib >= 0 ? b->shape[ib] : 1;
        if (da != db && da != 1 && db != 1) {
            mgpu__fail(MGPU_ERR_SHAPE, "%s: shapes %s and %s cannot be broadcast together (dim %d: %lld vs %lld)", op,
                       mgpu__shape_str(a), mgpu__shape_str(b), i - n, (long long)da, (long long)db);
            return 0;
        }
        g->shape[i] = da == 1 ? db : da;
        g->numel *= g->shape[i];
    }
    g->ndim = n;
    mgpu__bcast_strides(n, a, g->a_stride);
    mgpu__bcast_strides(n, b, g->b_stride);
    return 1;
}

static void mgpu__cpu_binary_forward(const mgpu__binary_args *a) {
    const mgpu__bcast *g = &a->g;
    mgpu__ew_kind kind = a->kind == MGPU__BIN_MUL ? MGPU__EW_MUL : MGPU__EW_ADD;
    float c = a->kind == MGPU__BIN_SUB ? -1.0f : 1.0f; /* add and sub are a + c * b */
    mgpu__ew_apply(a->ctx, kind, c, g->ndim, g->shape, a->out, a->a, g->a_stride, a->b, g->b_stride);
}

/* d(a * b) = dy * b for a, dy * a for b; d(a + c * b) = dy for a, c * dy for b. Each is reduced
   onto the operand's own (broadcast) strides. */
static void mgpu__cpu_binary_backward(const mgpu__binary_args *a) {
    const mgpu__bcast *g = &a->g;
    int mul = a->kind == MGPU__BIN_MUL;
    if (a->da)
        mgpu__reduce_into(a->ctx, g->ndim, g->shape, a->dy, g->a_stride, mul ? a->b : NULL, g->b_stride, a->da, 1.0f, 1);
    if (a->db)
        mgpu__reduce_into(a->ctx, g->ndim, g->shape, a->dy, g->b_stride, mul ? a->a : NULL, g->a_stride, a->db,
                          a->kind == MGPU__BIN_SUB ? -1.0f : 1.0f, 1);
}

static mgpu_result mgpu__binary_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu_tensor *in_a = node->in[0], *in_b = node->in[1];
    mgpu__binary_args args;
    memset(&args, 0, sizeof args);
    if (mgpu__needs_grad(node, 0)) MGPU__GRAD_OR_FAIL(args.da, ctx, in_a);
    if (mgpu__needs_grad(node, 1)) MGPU__GRAD_OR_FAIL(args.db, ctx, in_b);
    mgpu__bcast_make(node->name, in_a, in_b, &args.g); /* the forward's geometry: cannot fail now */
    args.ctx = ctx; args.kind = (mgpu__binary_kind)node->iarg[0];
    args.a = (const float *)in_a->data; args.b = (const float *)in_b->data; args.dy = (const float *)node->out->grad->data;
    return MGPU__TWIN(ctx, binary_backward, &args);
}

static mgpu_tensor *mgpu__binary(mgpu_context *ctx, const char *op, mgpu__binary_kind kind, mgpu_tensor *a, mgpu_tensor *b) {
    mgpu_tensor *out, *ins[2];
    mgpu__node *node;
    mgpu__binary_args args;
    if (!mgpu__check_input(ctx, op, "a", a, 1) || !mgpu__check_input(ctx, op, "b", b, 1)) return NULL;
    memset(&args, 0, sizeof args);
    if (!mgpu__bcast_make(op, a, b, &args.g)) return NULL;
    out = mgpu__new_activation(ctx, MGPU_F32, args.g.ndim, args.g.shape);
    if (!out) return NULL;
    args.ctx = ctx; args.kind = kind; args.a = (const float *)a->data; args.b = (const float *)b->data; args.out = (float *)out->data;
    if (MGPU__TWIN(ctx, binary_forward, &args) != MGPU_OK) return NULL;
    ins[0] = a; ins[1] = b;
    MGPU__RECORD(ctx, op, mgpu__binary_backward, out, 2, ins, node);
    if (node) node->iarg[0] = kind;
    return out;
}

MGPU_API mgpu_tensor *mgpu_op_add(mgpu_context *ctx, mgpu_tensor *a, mgpu_tensor *b) {
    return mgpu__binary(ctx, "mgpu_op_add", MGPU__BIN_ADD, a, b);
}
MGPU_API mgpu_tensor *mgpu_op_sub(mgpu_context *ctx, mgpu_tensor *a, mgpu_tensor *b) {
    return mgpu__binary(ctx, "mgpu_op_sub", MGPU__BIN_SUB, a, b);
}
MGPU_API mgpu_tensor *mgpu_op_mul(mgpu_context *ctx, mgpu_tensor *a, mgpu_tensor *b) {
    return mgpu__binary(ctx, "mgpu_op_mul", MGPU__BIN_MUL, a, b);
}
// x (..., C) + b (C): broadcasting add, restricted so a wrong bias is an error, not a broadcast.
MGPU_API mgpu_tensor *mgpu_op_bias_add(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *b) {
    const char *op = "mgpu_op_bias_add";
    if (!mgpu__check_input(ctx, op, "x", x, 1) || !mgpu__check_input(ctx, op, "b", b, 1)) return NULL;
    if (x->ndim < 1 || b->ndim != 1 || b->shape[0] != x->shape[x->ndim - 1])
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: bias b %s must be (C,) with C the last dim of x %s", op, mgpu__shape_str(b), mgpu__shape_str(x));
    return mgpu__binary(ctx, op, MGPU__BIN_ADD, x, b);
}

/* --------------------------------------------------------------------------------------
   Unary elementwise ops and activations
   -------------------------------------------------------------------------------------- */


#define MGPU__INV_SQRT2 0.70710678118654752f
#define MGPU__INV_SQRT_2PI 0.39894228040143268f
#define MGPU__SQRT_2_OVER_PI 0.79788456080286536f
#define MGPU__GELU_TANH_K 0.044715f

static float mgpu__sigmoidf(float x) {
    /* exp of a non-positive number only, so neither branch overflows */
    if (x >= 0) return 1.0f / (1.0f + expf(-x));
    { float e = expf(x); return e / (1.0f + e); }
}

static void mgpu__unary_forward_range(void *p, int64_t begin, int64_t end) {
    const mgpu__unary_args *u = (const mgpu__unary_args *)p;
    const float *x = u->x;
    float *y = u->out, a = u->param;
    int64_t i;
    switch (u->kind) {
    case MGPU__UN_RELU: for (i = begin; i < end; i++) y[i] = x[i] > 0 ? x[i] : 0.0f; break;
    case MGPU__UN_GELU: for (i = begin; i < end; i++) y[i] = 0.5f * x[i] * (1.0f + erff(x[i] * MGPU__INV_SQRT2)); break;
    case MGPU__UN_GELU_TANH:
        for (i = begin; i < end; i++)
            y[i] = 0.5f * x[i] * (1.0f + tanhf(MGPU__SQRT_2_OVER_PI * (x[i] + MGPU__GELU_TANH_K * x[i] * x[i] * x[i])));
        break;
    case MGPU__UN_ELU: for (i = begin; i < end; i++) y[i] = x[i] > 0 ? x[i] : a * expm1f(x[i]); break;
    case MGPU__UN_TANH: for (i = begin; i < end; i++) y[i] = tanhf(x[i]); break;
    case MGPU__UN_SIGMOID: for (i = begin; i < end; i++) y[i] = mgpu__sigmoidf(x[i]); break;
    case MGPU__UN_SCALE: for (i = begin; i < end; i++) y[i] = x[i] * a; break;
    case MGPU__UN_ADD_SCALAR: for (i = begin; i < end; i++) y[i] = x[i] + a; break;
    }
}

static void mgpu__unary_backward_range(void *p, int64_t begin, int64_t end) {
    const mgpu__unary_args *u = (const mgpu__unary_args *)p;
    const float *x = u->x, *y = u->y, *dy = u->dy;
    float *dx = u->out, a = u->param;
    int64_t i;
    switch (u->kind) {
    case MGPU__UN_RELU: for (i = begin; i < end; i++) dx[i] += x[i] > 0 ? dy[i] : 0.0f; break;
    case MGPU__UN_GELU: // d/dx x*Phi(x) = Phi(x) + x*phi(x)
        for (i = begin; i < end; i++) {
            float cdf = 0.5f * (1.0f + erff(x[i] * MGPU__INV_SQRT2));
            float pdf = MGPU__INV_SQRT_2PI * expf(-0.5f * x[i] * x[i]);
            dx[i] += dy[i] * (cdf + x[i] * pdf);
        }
        break;
    case MGPU__UN_GELU_TANH:
        for (i = begin; i < end; i++) {
            float x2 = x[i] * x[i];
            float t = tanhf(MGPU__SQRT_2_OVER_PI * x[i] * (1.0f + MGPU__GELU_TANH_K * x2));
            float du = MGPU__SQRT_2_OVER_PI * (1.0f + 3.0f * MGPU__GELU_TANH_K * x2);
            dx[i] += dy[i] * (0.5f * (1.0f + t) + 0.5f * x[i] * (1.0f - t * t) * du);
        }
        break;
    case MGPU__UN_ELU: for (i = begin; i < end; i++) dx[i] += dy[i] * (x[i] > 0 ? 1.0f : a * expf(x[i])); break;
    case MGPU__UN_TANH: for (i = begin; i < end; i++) dx[i] += dy[i] * (1.0f - y[i] * y[i]); break;
    case MGPU__UN_SIGMOID: for (i = begin; i < end; i++) dx[i] += dy[i] * y[i] * (1.0f - y[i]); break;
    case MGPU__UN_SCALE: for (i = begin; i < end; i++) dx[i] += dy[i] * a; break;
    case MGPU__UN_ADD_SCALAR: for (i = begin; i < end; i++) dx[i] += dy[i]; break;
    }
}

static void mgpu__cpu_unary_forward(const mgpu__unary_args *a) {
    mgpu_parallel_for(a->ctx, a->n, MGPU__GRAIN, mgpu__unary_forward_range, (void *)a);
}
static void mgpu__cpu_unary_backward(const mgpu__unary_args *a) {
    mgpu_parallel_for(a->ctx, a->n, MGPU__GRAIN, mgpu__unary_backward_range, (void *)a);
}

static mgpu_result mgpu__unary_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__unary_args u;
    float *dx;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    MGPU__GRAD_OR_FAIL(dx, ctx, node->in[0]);
    u.ctx = ctx; u.kind = (mgpu__unary_kind)node->iarg[0]; u.param = node->farg[0];
    u.x = (const float *)node->in[0]->data; u.y = (const float *)node->out->data;
    u.dy = (const float *)node->out->grad->data; u.out = dx; u.n = node->out->numel;
    return MGPU__TWIN(ctx, unary_backward, &u);
}

static mgpu_tensor *mgpu__unary(mgpu_context *ctx, const char *op, mgpu__unary_kind kind, float param, mgpu_tensor *x) {
    mgpu_tensor *out;
    mgpu__node *node;
    mgpu__unary_args u;
    if (!mgpu__check_input(ctx, op, "x", x, 1)) return NULL;
    out = mgpu__new_activation(ctx, MGPU_F32, x->ndim, x->shape);
    if (!out) return NULL;
    memset(&u, 0, sizeof u);
    u.ctx = ctx; u.kind = kind; u.param = param; u.x = (const float *)x->data; u.out = (float *)out->data; u.n = x->numel;
    if (MGPU__TWIN(ctx, unary_forward, &u) != MGPU_OK) return NULL;
    MGPU__RECORD(ctx, op, mgpu__unary_backward, out, 1, &x, node);
    if (node) { node->iarg[0] = kind; node->farg[0] = param; }
    return out;
}

MGPU_API mgpu_tensor *mgpu_op_scale(mgpu_context *ctx, mgpu_tensor *a, float s) { return mgpu__unary(ctx, "mgpu_op_scale", MGPU__UN_SCALE, s, a); }
MGPU_API mgpu_tensor *mgpu_op_add_scalar(mgpu_context *ctx, mgpu_tensor *a, float s) { return mgpu__unary(ctx, "mgpu_op_add_scalar", MGPU__UN_ADD_SCALAR, s, a); }
MGPU_API mgpu_tensor *mgpu_op_relu(mgpu_context *ctx, mgpu_tensor *x) { return mgpu__unary(ctx, "mgpu_op_relu", MGPU__UN_RELU, 0, x); }
MGPU_API mgpu_tensor *mgpu_op_gelu(mgpu_context *ctx, mgpu_tensor *x) { return mgpu__unary(ctx, "mgpu_op_gelu", MGPU__UN_GELU, 0, x); }
MGPU_API mgpu_tensor *mgpu_op_gelu_tanh(mgpu_context *ctx, mgpu_tensor *x) { return mgpu__unary(ctx, "mgpu_op_gelu_tanh", MGPU__UN_GELU_TANH, 0, x); }
MGPU_API mgpu_tensor *mgpu_op_elu(mgpu_context *ctx, mgpu_tensor *x, float alpha) { return mgpu__unary(ctx, "mgpu_op_elu", MGPU__UN_ELU, alpha, x); }
MGPU_API mgpu_tensor *mgpu_op_tanh(mgpu_context *ctx, mgpu_tensor *x) { return mgpu__unary(ctx, "mgpu_op_tanh", MGPU__UN_TANH, 0, x); }
MGPU_API mgpu_tensor *mgpu_op_sigmoid(mgpu_context *ctx, mgpu_tensor *x) { return mgpu__unary(ctx, "mgpu_op_sigmoid", MGPU__UN_SIGMOID, 0, x); }

/* --------------------------------------------------------------------------------------
   Softmax and log-softmax along any dim: x seen as (outer, D, inner), one line per (outer, inner)
   -------------------------------------------------------------------------------------- */

static int64_t mgpu__line_base(const mgpu__softmax_args *l, int64_t line) {
    return (line / l->inner) * l->dim * l->inner + line % l->inner;
}

static void mgpu__softmax_forward_range(void *p, int64_t begin, int64_t end) {
    const mgpu__softmax_args *l = (const mgpu__softmax_args *)p;
    int64_t line, j, s = l->inner;
    for (line = begin; line < end; line++) {
        const float *x = l->x + mgpu__line_base(l, line);
        float *y = l->out + mgpu__line_base(l, line);
        float mx = -INFINITY;
        double sum = 0;
        for (j = 0; j < l->dim; j++) mx = x[j * s] > mx ? x[j * s] : mx;
        if (mx == -INFINITY) mx = 0; /* an all -inf line: keep exp() finite-argument */
        for (j = 0; j < l->dim; j++) sum += expf(x[j * s] - mx);
        if (l->log) {
            float lse = mx + (float)log(sum);
            for (j = 0; j < l->dim; j++) y[j * s] = x[j * s] - lse;
        } else {
            float inv = (float)(1.0 / sum);
            for (j = 0; j < l->dim; j++) y[j * s] = expf(x[j * s] - mx) * inv;
        }
    }
}

static void mgpu__softmax_backward_range(void *p, int64_t begin, int64_t end) {
    const mgpu__softmax_args *l = (const mgpu__softmax_args *)p;
    int64_t line, j, s = l->inner;
    for (line = begin; line < end; line++) {
        int64_t base = mgpu__line_base(l, line);
        const float *y = l->y + base, *dy = l->dy + base;
        float *dx = l->out + base;
        double dot = 0;
        if (l->log) { // dx = dy - softmax * sum(dy)
            for (j = 0; j < l->dim; j++) dot += dy[j * s];
            for (j = 0; j < l->dim; j++) dx[j * s] += dy[j * s] - expf(y[j * s]) * (float)dot;
        } else {      // dx = y * (dy - sum(dy * y))
            for (j = 0; j < l->dim; j++) dot += (double)dy[j * s] * y[j * s];
            for (j = 0; j < l->dim; j++) dx[j * s] += y[j * s] * (dy[j * s] - (float)dot);
        }
    }
}

/* One line per (outer, inner) pair; an empty dim leaves nothing to do. */
static void mgpu__cpu_softmax_forward(const mgpu__softmax_args *a) {
    if (a->dim > 0) mgpu_parallel_for(a->ctx, a->outer * a->inner, mgpu__grain_for(a->dim), mgpu__softmax_forward_range, (void *)a);
}
static void mgpu__cpu_softmax_backward(const mgpu__softmax_args *a) {
    if (a->dim > 0) mgpu_parallel_for(a->ctx, a->outer * a->inner, mgpu__grain_for(a->dim), mgpu__softmax_backward_range, (void *)a);
}

/* x (outer, dim, inner) around its normalised dim d */
static void mgpu__softmax_lines(mgpu_context *ctx, const mgpu_tensor *x, int d, int log, mgpu__softmax_args *a) {
    memset(a, 0, sizeof *a);
    a->ctx = ctx; a->log = log;
    mgpu__split_at(x, d, &a->outer, &a->dim, &a->inner);
}

static mgpu_result mgpu__softmax_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__softmax_args a;
    float *dx;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    MGPU__GRAD_OR_FAIL(dx, ctx, node->in[0]);
    mgpu__softmax_lines(ctx, node->in[0], (int)node->iarg[0], (int)node->iarg[1], &a);
    a.y = (const float *)node->out->data; a.dy = (const float *)node->out->grad->data; a.out = dx;
    return MGPU__TWIN(ctx, softmax_backward, &a);
}

static mgpu_tensor *mgpu__softmax(mgpu_context *ctx, const char *op, mgpu_tensor *x, int dim, int log) {
    mgpu_tensor *out;
    mgpu__node *node;
    mgpu__softmax_args a;
    int d;
    if (!mgpu__check_input(ctx, op, "x", x, 1)) return NULL;
    if ((d = mgpu__norm_dim(op, dim, x->ndim)) < 0) return NULL;
    out = mgpu__new_activation(ctx, MGPU_F32, x->ndim, x->shape);
    if (!out) return NULL;
    mgpu__softmax_lines(ctx, x, d, log, &a);
    a.x = (const float *)x->data; a.out = (float *)out->data;
    if (MGPU__TWIN(ctx, softmax_forward, &a) != MGPU_OK) return NULL;
    MGPU__RECORD(ctx, op, mgpu__softmax_backward, out, 1, &x, node);
    if (node) { node->iarg[0] = d; node->iarg[1] = log; }
    return out;
}

MGPU_API mgpu_tensor *mgpu_op_softmax(mgpu_context *ctx, mgpu_tensor *x, int dim) { return mgpu__softmax(ctx, "mgpu_op_softmax", x, dim, 0); }
MGPU_API mgpu_tensor *mgpu_op_log_softmax(mgpu_context *ctx, mgpu_tensor *x, int dim) { return mgpu__softmax(ctx, "mgpu_op_log_softmax", x, dim, 1); }

/* --------------------------------------------------------------------------------------
   Classification losses: nll_loss, cross_entropy (fused), count_correct
   -------------------------------------------------------------------------------------- */

/* scores (N, C) F32 and target (N) I32/I64; sets N and C. */
static int mgpu__check_class_inputs(mgpu_context *ctx, const char *op, const char *name, const mgpu_tensor *x,
                                    const mgpu_tensor *target, int64_t *n, int64_t *c) {
    if (!mgpu__check_input(ctx, op, name, x, 1) || !mgpu__check_index(ctx, op, "target", target)) return 0;
    if (x->ndim != 2 || target->ndim != 1 || target->shape[0] != x->shape[0]) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: %s must be (N, C) and target (N,), got %s and %s", op, name, mgpu__shape_str(x), mgpu__shape_str(target));
        return 0;
    }
    *n = x->shape[0]; *c = x->shape[1];
    return 1;
}

/* Every target is ignore_index (-100) or a class in [0, c); otherwise an error naming the first bad row.
   Targets on a GPU are not read back (that would stall the step): there the kernels turn a bad
   target into a NaN loss, which the trainer reports. */
static int mgpu__check_targets(const char *op, const mgpu_tensor *target, int64_t n, int64_t c) {
    int64_t i;
    if (!mgpu__on_host(target)) return 1;
    for (i = 0; i < n; i++) {
        int64_t t = mgpu__index_at(target, i);
        if (t != MGPU__IGNORE_INDEX && (t < 0 || t >= c)) {
            mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: target[%lld] = %lld is outside [0, %lld) (use -100 to ignore a row)", op,
                       (long long)i, (long long)t, (long long)c);
            return 0;
        }
    }
    return 1;
}

static int64_t mgpu__class_target(const mgpu__class_loss_args *a, int64_t i) {
    return a->target_i64 ? ((const int64_t *)a->target)[i] : (int64_t)((const int32_t *)a->target)[i];
}

/* loss = total / counted rows (no counted row: NaN, as PyTorch); the count is kept for backward. */
static void mgpu__class_loss_store(const mgpu__class_loss_args *a, double total) {
    int64_t i, counted = 0;
    for (i = 0; i < a->n; i++) counted += mgpu__class_target(a, i) != MGPU__IGNORE_INDEX;
    a->valid[0] = (float)counted;
    a->loss[0] = (float)(total / (double)counted);
}

static void mgpu__cpu_nll_forward(const mgpu__class_loss_args *a) {
    double sum = 0;
    int64_t i;
    for (i = 0; i < a->n; i++) {
        int64_t t = mgpu__class_target(a, i);
        if (t != MGPU__IGNORE_INDEX) sum -= a->x[i * a->c + t];
    }
    mgpu__class_loss_store(a, sum);
}

static void mgpu__cpu_nll_backward(const mgpu__class_loss_args *a) {
    float g = a->dloss[0] / a->valid[0];
    int64_t i;
    for (i = 0; i < a->n; i++) {
        int64_t t = mgpu__class_target(a, i);
        if (t != MGPU__IGNORE_INDEX) a->dx[i * a->c + t] -= g;
    }
}

static double mgpu__ce_forward_rows(void *p, int64_t begin, int64_t end) {
    const mgpu__class_loss_args *a = (const mgpu__class_loss_args *)p;
    double loss = 0;
    int64_t i, j, c = a->c;
    for (i = begin; i < end; i++) {
        const float *x = a->x + i * c;
        float mx = -INFINITY, lse;
        double sum = 0;
        int64_t t = mgpu__class_target(a, i);
        for (j = 0; j < c; j++) mx = x[j] > mx ? x[j] : mx;
        if (mx == -INFINITY) mx = 0;
        for (j = 0; j < c; j++) sum += expf(x[j] - mx);
        lse = mx + (float)log(sum);
        a->lse[i] = lse;
        if (t != MGPU__IGNORE_INDEX) loss += (double)lse - x[t];
    }
    return loss;
}

static void mgpu__ce_backward_rows(void *p, int64_t begin, int64_t end) {
    const mgpu__class_loss_args *a = (const mgpu__class_loss_args *)p;
    float g = a->dloss[0] / a->valid[0];
    int64_t i, j, c = a->c;
    for (i = begin; i < end; i++) {
        const float *x = a->x + i * c;
        float *dx = a->dx + i * c, lse = a->lse[i];
        int64_t t = mgpu__class_target(a, i);
        if (t == MGPU__IGNORE_INDEX) continue;
        for (j = 0; j < c; j++) dx[j] += g * expf(x[j] - lse);
        dx[t] -= g;
    }
}

static void mgpu__cpu_cross_entropy_forward(const mgpu__class_loss_args *a) {
    mgpu__class_loss_store(a, a->c > 0 ? mgpu__det_sum(a->ctx, a->n, 4096 / a->c, a->c, mgpu__ce_forward_rows, (void *)a) : 0);
}
static void mgpu__cpu_cross_entropy_backward(const mgpu__class_loss_args *a) {
    mgpu_parallel_for(a->ctx, a->n, mgpu__grain_for(a->c), mgpu__ce_backward_rows, (void *)a);
}

/* iarg[0]: 1 for cross_entropy, 0 for nll_loss; extra: the forward's arguments (lse, valid) */
static mgpu_result mgpu__class_loss_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__class_loss_args a = *(const mgpu__class_loss_args *)node->extra;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    MGPU__GRAD_OR_FAIL(a.dx, ctx, node->in[0]);
    a.dloss = (const float *)node->out->grad->data;
    return node->iarg[0] ? MGPU__TWIN(ctx, cross_entropy_backward, &a) : MGPU__TWIN(ctx, nll_backward, &a);
}

/* The front of nll_loss (x: log-probabilities) and cross_entropy (fused: x are logits; keeps lse). */
static mgpu_tensor *mgpu__class_loss(mgpu_context *ctx, const char *op, const char *name, mgpu_tensor *x, mgpu_tensor *target, int fused) {
    mgpu_tensor *out, *ins[2];
    mgpu__node *node;
    mgpu__class_loss_args a;
    mgpu_result r;
    memset(&a, 0, sizeof a);
    if (!mgpu__check_class_inputs(ctx, op, name, x, target, &a.n, &a.c) || !mgpu__check_targets(op, target, a.n, a.c)) return NULL;
    out = mgpu__new_activation(ctx, MGPU_F32, 0, NULL);
    if (!out) return NULL;
    a.ctx = ctx; a.x = (const float *)x->data; a.target = target->data; a.target_i64 = target->dtype == MGPU_I64;
    a.loss = (float *)out->data;
    if (!(a.valid = (float *)mgpu__arena_alloc_data(ctx, sizeof(float)))) return NULL;
    if (fused && !(a.lse = (float *)mgpu__arena_alloc_data(ctx, sizeof(float) * (size_t)MGPU__MAX(a.n, (int64_t)1)))) return NULL;
    r = fused ? MGPU__TWIN(ctx, cross_entropy_forward, &a) : MGPU__TWIN(ctx, nll_forward, &a);
    if (r != MGPU_OK) return NULL;
    ins[0] = x; ins[1] = target;
    MGPU__RECORD(ctx, op, mgpu__class_loss_backward, out, 2, ins, node);
    if (node) {
        mgpu__class_loss_args *saved = (mgpu__class_loss_args *)mgpu__arena_alloc(ctx, sizeof *saved);
        if (!saved) return NULL;
        *saved = a;
        node->iarg[0] = fused; node->extra = saved;
    }
    return out;
}

// logp (N, C), target (N) -> scalar mean of -logp[target] over counted rows
MGPU_API mgpu_tensor *mgpu_op_nll_loss(mgpu_context *ctx, mgpu_tensor *logp, mgpu_tensor *target) {
    return mgpu__class_loss(ctx, "mgpu_op_nll_loss", "logp", logp, target, 0);
}
// logits (N, C), target (N) -> scalar mean of -log softmax(logits)[target] over counted rows
MGPU_API mgpu_tensor *mgpu_op_cross_entropy(mgpu_context *ctx, mgpu_tensor *logits, mgpu_tensor *target) {
    return mgpu__class_loss(ctx, "mgpu_op_cross_entropy", "logits", logits, target, 1);
}

/* Evaluation on a GPU: logits and targets come back in one copy each (one wait per evaluated
   batch) and are counted by the host code below. */
static int64_t mgpu__count_correct_from_device(const mgpu_tensor *logits, const mgpu_tensor *target) {
    mgpu_tensor hl, ht;
    int64_t correct = -1;
    size_t lb = mgpu_tensor_nbytes(logits), tb = mgpu_tensor_nbytes(target);
    char *buf = (char *)mgpu__alloc(lb + tb + 8, "evaluation logits copied from the GPU");
    if (!buf) return -1;
    hl = *logits; ht = *target;
    hl.device.type = ht.device.type = MGPU_DEVICE_CPU; hl.device.index = ht.device.index = 0;
    hl.data = buf; ht.data = buf + ((lb + 7) & ~(size_t)7);
    if (mgpu_tensor_copy_to_host(logits, hl.data, lb) == MGPU_OK && mgpu_tensor_copy_to_host(target, ht.data, tb) == MGPU_OK)
        correct = mgpu_count_correct(&hl, &ht);
    mgpu_free(buf);
    return correct;
}

MGPU_API int64_t mgpu_count_correct(const mgpu_tensor *logits, const mgpu_tensor *target) {
    const char *op = "mgpu_count_correct";
    int64_t n, c, i, j, correct = 0;
    if (!logits || !target) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: logits and target must not be NULL", op); return -1; }
    if (logits->dtype != MGPU_F32 || (target->dtype != MGPU_I32 && target->dtype != MGPU_I64)) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: need F32 logits and an I32/I64 target, got %s and %s", op,
                   mgpu_dtype_name(logits->dtype), mgpu_dtype_name(target->dtype));
        return -1;
    }
    if (logits->ndim != 2 || target->ndim != 1 || target->shape[0] != logits->shape[0]) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: logits must be (N, C) and target (N,), got %s and %s", op, mgpu__shape_str(logits), mgpu__shape_str(target));
        return -1;
    }
    n = logits->shape[0]; c = logits->shape[1];
    if (!mgpu__on_host(logits) || !mgpu__on_host(target)) return mgpu__count_correct_from_device(logits, target);
    for (i = 0; i < n && c > 0; i++) {
        const float *x = (const float *)logits->data + i * c;
        int64_t best = 0;
        for (j = 1; j < c; j++) if (x[j] > x[best]) best = j; /* first max wins, as torch.argmax */
        if (best == mgpu__index_at(target, i)) correct++;
    }
    return correct;
}

/* --------------------------------------------------------------------------------------
   MSE loss and dropout
   -------------------------------------------------------------------------------------- */

static double mgpu__mse_partial(void *p, int64_t begin, int64_t end) {
    const mgpu__mse_args *m = (const mgpu__mse_args *)p;
    double s = 0;
    int64_t i;
    for (i = begin; i < end; i++) { double d = (double)m->a[i] - m->b[i]; s += d * d; }
    return s;
}
static void mgpu__mse_backward_range(void *p, int64_t begin, int64_t end) {
    const mgpu__mse_args *m = (const mgpu__mse_args *)p;
    float g = 2.0f * m->dloss[0] / (float)m->n;
    int64_t i;
    for (i = begin; i < end; i++) {
        float d = g * (m->a[i] - m->b[i]);
        if (m->da) m->da[i] += d;
        if (m->db) m->db[i] -= d;
    }
}
static void mgpu__cpu_mse_forward(const mgpu__mse_args *m) {
    m->loss[0] = (float)(mgpu__det_sum(m->ctx, m->n, 4096, 1, mgpu__mse_partial, (void *)m) / (double)m->n);
}
static void mgpu__cpu_mse_backward(const mgpu__mse_args *m) {
    mgpu_parallel_for(m->ctx, m->n, MGPU__GRAIN, mgpu__mse_backward_range, (void *)m);
}

static void mgpu__mse_inputs(mgpu_context *ctx, const mgpu_tensor *a, const mgpu_tensor *b, mgpu__mse_args *m) {
    memset(m, 0, sizeof *m);
    m->ctx = ctx; m->a = (const float *)a->data; m->b = (const float *)b->data; m->n = a->numel;
}
static mgpu_result mgpu__mse_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__mse_args m;
    mgpu__mse_inputs(ctx, node->in[0], node->in[1], &m);
    if (mgpu__needs_grad(node, 0)) MGPU__GRAD_OR_FAIL(m.da, ctx, node->in[0]);
    if (mgpu__needs_grad(node, 1)) MGPU__GRAD_OR_FAIL(m.db, ctx, node->in[1]);
    m.dloss = (const float *)node->out->grad->data;
    return MGPU__TWIN(ctx, mse_backward, &m);
}
MGPU_API mgpu_tensor *mgpu_op_mse_loss(mgpu_context *ctx, mgpu_tensor *a, mgpu_tensor *b) {
    const char *op = "mgpu_op_mse_loss";
    mgpu_tensor *out, *ins[2];
    mgpu__mse_args m;
    if (!mgpu__check_input(ctx, op, "a", a, 1) || !mgpu__check_input(ctx, op, "b", b, 1)) return NULL;
    if (!mgpu_tensor_same_shape(a, b))
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: a %s and b %s must have the same shape", op, mgpu__shape_str(a), mgpu__shape_str(b));
    out = mgpu__new_activation(ctx, MGPU_F32, 0, NULL);
    if (!out) return NULL;
    mgpu__mse_inputs(ctx, a, b, &m);
    m.loss = (float *)out->data;
    if (MGPU__TWIN(ctx, mse_forward, &m) != MGPU_OK) return NULL;
    ins[0] = a; ins[1] = b;
    MGPU__RECORD_PLAIN(ctx, op, mgpu__mse_backward, out, 2, ins);
    return out;
}

/* The mask is never stored: element i is kept iff uniform(seed, counter(i)) >= p, so backward
   recomputes it, and any thread count or a resumed run draws the same mask. Under DDP
   (ctx->row_world W > 1) local row j is row rank + W * j of the combined batch (DistributedSampler's
   sharding); the counters are laid out in mgpu__dropout_args. */
static void mgpu__dropout_range(void *p, int64_t begin, int64_t end) {
    const mgpu__dropout_args *d = (const mgpu__dropout_args *)p;
    int64_t i = begin;
    while (i < end) {
        int64_t j = i / d->row_size, row_end = MGPU__MIN((j + 1) * d->row_size, end);
        uint64_t base = d->first + (uint64_t)((d->rank + (d->world - 1) * j) * d->row_size);   /* counter = base + i */
        for (; i < row_end; i++) {
            float v = mgpu_random_uniform(d->seed, base + (uint64_t)i) >= d->p ? d->src[i] * d->scale : 0.0f;
            if (d->accumulate) d->dst[i] += v; else d->dst[i] = v;
        }
    }
}
static void mgpu__cpu_dropout(const mgpu__dropout_args *d) {
    mgpu_parallel_for(d->ctx, d->n, MGPU__GRAIN, mgpu__dropout_range, (void *)d);
}
static mgpu_result mgpu__dropout_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__dropout_args d = *(const mgpu__dropout_args *)node->extra;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    MGPU__GRAD_OR_FAIL(d.dst, ctx, node->in[0]);
    d.src = (const float *)node->out->grad->data;
    d.accumulate = 1;
    return MGPU__TWIN(ctx, dropout, &d);
}
/* A captured dropout's replay hook: the RNG reservation of an eager step, its first counter the step scalar. */
static mgpu_result mgpu__dropout_replay(void *ctx, int64_t n, uint64_t *words) {
    words[0] = mgpu_context_rng_reserve((mgpu_context *)ctx, (uint64_t)n);
    return MGPU_OK;
}
MGPU_API mgpu_tensor *mgpu_op_dropout(mgpu_context *ctx, mgpu_tensor *x, float p, int training) {
    const char *op = "mgpu_op_dropout";
    mgpu_tensor *out;
    mgpu__node *node;
    mgpu__dropout_args d;
    if (!mgpu__check_input(ctx, op, "x", x, 1)) return NULL;
    if (!(p >= 0.0f && p <= 1.0f)) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: p = %g must be in [0, 1]", op, (double)p);
    if (!training) return x; /* eval: identity, no RNG drawn (as nn.Dropout in eval mode) */
    memset(&d, 0, sizeof d);
    mgpu_context_rng_state(ctx, &d.seed, NULL);
    d.world = ctx->row_world > 1 ? ctx->row_world : 1;
    d.rank = d.world > 1 ? ctx->row_rank : 0;
    d.row_size = x->ndim > 0 && x->shape[0] > 0 ? MGPU__MAX((int64_t)1, x->numel / x->shape[0]) : 1;
    /* counters are drawn even for p = 0, so the stream position does not depend on p; under DDP
       every rank reserves the combined batch's counters so the streams stay aligned */
    if (mgpu__capturing(ctx)) {   /* each replay reserves its own counters */
        void *at = NULL;
        if (mgpu__step_scalar(ctx, mgpu__dropout_replay, ctx, d.world * x->numel, 1, &at) != MGPU_OK) return NULL;
        d.first_at = (const uint64_t *)at;
    } else {
        d.first = mgpu_context_rng_reserve(ctx, (uint64_t)(d.world * x->numel));
    }
    if (p == 0.0f) return x;
    out = mgpu__new_activation(ctx, MGPU_F32, x->ndim, x->shape);
    if (!out) return NULL;
    d.ctx = ctx; d.p = p; d.scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    d.src = (const float *)x->data; d.dst = (float *)out->data; d.n = x->numel;
    if (MGPU__TWIN(ctx, dropout, &d) != MGPU_OK) return NULL;
    MGPU__RECORD(ctx, op, mgpu__dropout_backward, out, 1, &x, node);
    if (node) {
        mgpu__dropout_args *saved = (mgpu__dropout_args *)mgpu__arena_alloc(ctx, sizeof *saved);
        if (!saved) return NULL;
        *saved = d;
        node->extra = saved;
    }
    return out;
}

/* --------------------------------------------------------------------------------------
   Reductions: sum, mean, sum_dim, mean_dim, max_dim
   -------------------------------------------------------------------------------------- */

/* Seen as (outer, dim, inner), a sum reduces dim onto out (outer, inner): its strides against x are
   (inner, 0, 1). Backward broadcasts dy back through the same strides. */
static void mgpu__cpu_sum_forward(const mgpu__sum_args *a) {
    int64_t shape[3], out_st[3];
    shape[0] = a->outer; shape[1] = a->dim; shape[2] = a->inner;
    out_st[0] = a->inner; out_st[1] = 0; out_st[2] = 1;
    if (a->outer * a->inner > 0) mgpu__reduce_into(a->ctx, 3, shape, a->x, out_st, NULL, NULL, a->out, a->scale, 0);
}
static void mgpu__cpu_sum_backward(const mgpu__sum_args *a) {
    int64_t shape[3], dy_st[3];
    shape[0] = a->outer; shape[1] = a->dim; shape[2] = a->inner;
    dy_st[0] = a->inner; dy_st[1] = 0; dy_st[2] = 1;
    mgpu__ew_apply(a->ctx, MGPU__EW_ACC, a->scale, 3, shape, a->out, a->dy, dy_st, NULL, NULL);
}

/* x as (outer, dim, inner) around dim d (d < 0: everything summed, outer = inner = 1) */
static void mgpu__sum_lines(mgpu_context *ctx, const mgpu_tensor *x, int d, float scale, mgpu__sum_args *a) {
    memset(a, 0, sizeof *a);
    a->ctx = ctx; a->scale = scale;
    if (d >= 0) mgpu__split_at(x, d, &a->outer, &a->dim, &a->inner);
    else { a->outer = 1; a->dim = x->numel; a->inner = 1; }
}

static mgpu_result mgpu__sum_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__sum_args a;
    float *dx;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    MGPU__GRAD_OR_FAIL(dx, ctx, node->in[0]);
    mgpu__sum_lines(ctx, node->in[0], (int)node->iarg[0], node->farg[0], &a);
    a.dy = (const float *)node->out->grad->data; a.out = dx;
    return MGPU__TWIN(ctx, sum_backward, &a);
}

/* Shape of x with dim d removed (or kept as 1); d < 0: a scalar. */
static int mgpu__reduced_shape(const mgpu_tensor *x, int d, int keepdim, int64_t *shape) {
    int i, n = 0;
    if (d < 0) return 0;
    for (i = 0; i < x->ndim; i++) {
        if (i != d) shape[n++] = x->shape[i];
        else if (keepdim) shape[n++] = 1;
    }
    return n;
}

static mgpu_tensor *mgpu__sum_mean(mgpu_context *ctx, const char *op, mgpu_tensor *x, int dim, int all, int keepdim, int mean) {
    int64_t shape[MGPU_MAX_DIMS];
    mgpu_tensor *out;
    mgpu__node *node;
    mgpu__sum_args a;
    int d = -1, ndim;
    float scale;
    if (!mgpu__check_input(ctx, op, "x", x, 1)) return NULL;
    if (!all && (d = mgpu__norm_dim(op, dim, x->ndim)) < 0) return NULL;
    ndim = mgpu__reduced_shape(x, d, keepdim, shape);
    out = mgpu__new_activation(ctx, MGPU_F32, ndim, shape);
    if (!out) return NULL;
    /* mean over nothing is 0 * inf = NaN, as PyTorch */
    scale = mean ? 1.0f / (float)(all ? x->numel : x->shape[d]) : 1.0f;
    mgpu__sum_lines(ctx, x, d, scale, &a);
    a.x = (const float *)x->data; a.out = (float *)out->data;
    if (a.outer * a.inner == 1 && !(a.scratch = (double *)mgpu__arena_alloc_data(ctx, sizeof(double) * MGPU_CUDA_REDUCE_PARTIALS))) return NULL;
    if (MGPU__TWIN(ctx, sum_forward, &a) != MGPU_OK) return NULL;
    MGPU__RECORD(ctx, op, mgpu__sum_backward, out, 1, &x, node);
    if (node) { node->iarg[0] = d; node->farg[0] = scale; }
    return out;
}

MGPU_API mgpu_tensor *mgpu_op_sum(mgpu_context *ctx, mgpu_tensor *x) { return mgpu__sum_mean(ctx, "mgpu_op_sum", x, 0, 1, 0, 0); }
MGPU_API mgpu_tensor *mgpu_op_mean(mgpu_context *ctx, mgpu_tensor *x) { return mgpu__sum_mean(ctx, "mgpu_op_mean", x, 0, 1, 0, 1); }
MGPU_API mgpu_tensor *mgpu_op_sum_dim(mgpu_context *ctx, mgpu_tensor *x, int dim, int keepdim) {
    return mgpu__sum_mean(ctx, "mgpu_op_sum_dim", x, dim, 0, keepdim, 0);
}
MGPU_API mgpu_tensor *mgpu_op_mean_dim(mgpu_context *ctx, mgpu_tensor *x, int dim, int keepdim) {
    return mgpu__sum_mean(ctx, "mgpu_op_mean_dim", x, dim, 0, keepdim, 1);
}

static void mgpu__max_forward_range(void *p, int64_t begin, int64_t end) {
    const mgpu__max_dim_args *m = (const mgpu__max_dim_args *)p;
    int64_t line, j;
    for (line = begin; line < end; line++) {
        const float *x = m->x + (line / m->inner) * m->dim * m->inner + line % m->inner;
        int64_t best = 0;
        for (j = 1; j < m->dim; j++) {
            float v = x[j * m->inner], b = x[best * m->inner];
            if (v > b || (v != v && b == b)) best = j; /* first max; NaN wins, as torch.max */
        }
        m->argmax[line] = best;
        m->out[line] = x[best * m->inner];
    }
}
static void mgpu__max_backward_range(void *p, int64_t begin, int64_t end) {
    const mgpu__max_dim_args *m = (const mgpu__max_dim_args *)p;
    int64_t line;
    for (line = begin; line < end; line++)
        m->out[(line / m->inner) * m->dim * m->inner + line % m->inner + m->argmax[line] * m->inner] += m->dy[line];
}
static void mgpu__cpu_max_dim_forward(const mgpu__max_dim_args *m) {
    mgpu_parallel_for(m->ctx, m->outer * m->inner, mgpu__grain_for(m->dim), mgpu__max_forward_range, (void *)m);
}
static void mgpu__cpu_max_dim_backward(const mgpu__max_dim_args *m) {
    mgpu_parallel_for(m->ctx, m->outer * m->inner, MGPU__GRAIN, mgpu__max_backward_range, (void *)m);
}
/* extra: the forward's arguments (argmax) */
static mgpu_result mgpu__max_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__max_dim_args m = *(const mgpu__max_dim_args *)node->extra;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    MGPU__GRAD_OR_FAIL(m.out, ctx, node->in[0]);
    m.dy = (const float *)node->out->grad->data;
    return MGPU__TWIN(ctx, max_dim_backward, &m);
}
MGPU_API mgpu_tensor *mgpu_op_max_dim(mgpu_context *ctx, mgpu_tensor *x, int dim, int keepdim) {
    const char *op = "mgpu_op_max_dim";
    int64_t shape[MGPU_MAX_DIMS];
    mgpu_tensor *out;
    mgpu__max_dim_args m;
    mgpu__node *node;
    int d, ndim;
    if (!mgpu__check_input(ctx, op, "x", x, 1)) return NULL;
    if ((d = mgpu__norm_dim(op, dim, x->ndim)) < 0) return NULL;
    if (x->shape[d] == 0) MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: dim %d of x %s is empty; max has no value", op, dim, mgpu__shape_str(x));
    ndim = mgpu__reduced_shape(x, d, keepdim, shape);
    out = mgpu__new_activation(ctx, MGPU_F32, ndim, shape);
    if (!out) return NULL;
    memset(&m, 0, sizeof m);
    m.ctx = ctx;
    mgpu__split_at(x, d, &m.outer, &m.dim, &m.inner);
    m.x = (const float *)x->data; m.out = (float *)out->data;
    m.argmax = (int64_t *)mgpu__arena_alloc_data(ctx, sizeof(int64_t) * (size_t)MGPU__MAX(out->numel, (int64_t)1));
    if (!m.argmax) return NULL;
    if (MGPU__TWIN(ctx, max_dim_forward, &m) != MGPU_OK) return NULL;
    MGPU__RECORD(ctx, op, mgpu__max_backward, out, 1, &x, node);
    if (node) {
        mgpu__max_dim_args *saved = (mgpu__max_dim_args *)mgpu__arena_alloc(ctx, sizeof *saved);
        if (!saved) return NULL;
        *saved = m;
        node->extra = saved;
    }
    return out;
}

/* --------------------------------------------------------------------------------------
   Shape ops: reshape and flatten (views), transpose, concat, narrow (copies), cast
   -------------------------------------------------------------------------------------- */

static void mgpu__cpu_accumulate(const mgpu__accumulate_args *a) {
    int64_t one = 1, n = a->n;
    mgpu__ew_apply(a->ctx, MGPU__EW_ACC, 1.0f, 1, &n, a->out, a->x, &one, NULL, NULL);
}
/* Backward of ops whose output holds x's elements in the same order (views, casts). */
static mgpu_result mgpu__passthrough_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__accumulate_args a;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    MGPU__GRAD_OR_FAIL(a.out, ctx, node->in[0]);
    a.ctx = ctx; a.x = (const float *)node->out->grad->data; a.n = node->out->numel;
    return MGPU__TWIN(ctx, accumulate, &a);
}

static mgpu_tensor *mgpu__view(mgpu_context *ctx, const char *op, mgpu_tensor *x, int ndim, const int64_t *shape) {
    mgpu_tensor *out = mgpu__new_view(ctx, x, ndim, shape);
    if (!out) return NULL;
    MGPU__RECORD_PLAIN(ctx, op, mgpu__passthrough_backward, out, 1, &x);
    return out;
}

MGPU_API mgpu_tensor *mgpu_op_reshape(mgpu_context *ctx, mgpu_tensor *x, int ndim, const int64_t *shape) {
    const char *op = "mgpu_op_reshape";
    int64_t want[MGPU_MAX_DIMS], known = 1;
    int i, infer = -1;
    char text[96];
    if (!mgpu__check_input(ctx, op, "x", x, 0)) return NULL;
    if (ndim < 0 || ndim > MGPU_MAX_DIMS || (ndim > 0 && !shape))
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: ndim %d must be in [0, %d] with a non-NULL shape", op, ndim, MGPU_MAX_DIMS);
    mgpu_shape_string(ndim, shape, text, sizeof text);
    for (i = 0; i < ndim; i++) {
        want[i] = shape[i];
        if (shape[i] == -1 && infer < 0) { infer = i; continue; }
        if (shape[i] < 0) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: bad target shape %s (only one -1 allowed, no other negative size)", op, text);
        if (shape[i] > 0 && known > INT64_MAX / shape[i]) MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: target shape %s is too large", op, text);
        known *= shape[i];
    }
    if (infer >= 0) {
        if (known == 0 || x->numel % known != 0)
            MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: cannot reshape %s (%lld elements) to %s", op, mgpu__shape_str(x), (long long)x->numel, text);
        want[infer] = x->numel / known;
        known = x->numel;
    }
    if (known != x->numel)
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: cannot reshape %s (%lld elements) to %s (%lld elements)", op, mgpu__shape_str(x),
                        (long long)x->numel, text, (long long)known);
    return mgpu__view(ctx, op, x, ndim, want);
}

MGPU_API mgpu_tensor *mgpu_op_flatten(mgpu_context *ctx, mgpu_tensor *x, int start_dim) {
    const char *op = "mgpu_op_flatten";
    int64_t shape[MGPU_MAX_DIMS];
    int d, i;
    if (!mgpu__check_input(ctx, op, "x", x, 0)) return NULL;
    if (x->ndim == 0) { /* as torch.flatten: a scalar becomes (1,) */
        if (start_dim != 0 && start_dim != -1) { mgpu__norm_dim(op, start_dim, 1); return NULL; }
        shape[0] = 1;
        return mgpu__view(ctx, op, x, 1, shape);
    }
    if ((d = mgpu__norm_dim(op, start_dim, x->ndim)) < 0) return NULL;
    for (i = 0; i < d; i++) shape[i] = x->shape[i];
    shape[d] = 1;
    for (i = d; i < x->ndim; i++) shape[d] *= x->shape[i];
    return mgpu__view(ctx, op, x, d + 1, shape);
}

/* Strided copy between operand 0 (dst) and operand 1 (src): esize-byte elements forward,
   F32 accumulation backward. */
typedef struct mgpu__copy_arg { void *dst; const void *src; size_t esize; int accumulate; } mgpu__copy_arg;
static void mgpu__copy_run(void *p, const int64_t *off, const int64_t *st, int64_t n) {
    const mgpu__copy_arg *c = (const mgpu__copy_arg *)p;
    int64_t j;
#define MGPU__COPY_AS(T) do { T *d_ = (T *)c->dst + off[0]; const T *s_ = (const T *)c->src + off[1]; \
        for (j = 0; j < n; j++) d_[j * st[0]] = s_[j * st[1]]; } while (0)
    if (c->accumulate) {
        float *d = (float *)c->dst + off[0];
        const float *s = (const float *)c->src + off[1];
        for (j = 0; j < n; j++) d[j * st[0]] += s[j * st[1]];
        return;
    }
    switch (c->esize) {
    case 1: MGPU__COPY_AS(uint8_t); break;
    case 2: MGPU__COPY_AS(uint16_t); break;
    case 4: MGPU__COPY_AS(uint32_t); break;
    default: MGPU__COPY_AS(uint64_t); break;
    }
#undef MGPU__COPY_AS
}

static void mgpu__copy_strided(mgpu_context *ctx, int ndim, const int64_t *shape, void *dst, const int64_t *dst_st,
                               const void *src, const int64_t *src_st, size_t esize, int accumulate) {
    mgpu__iter it;
    mgpu__copy_arg c;
    mgpu__iter_start(&it, ndim, shape);
    mgpu__iter_operand(&it, dst_st);
    mgpu__iter_operand(&it, src_st);
    mgpu__iter_coalesce(&it);
    c.dst = dst; c.src = src; c.esize = esize; c.accumulate = accumulate;
    mgpu__iter_parallel(ctx, &it, mgpu__copy_run, &c);
}

/* out (outer, d1, mid, d0, inner) is written in order while x (outer, d0, mid, d1, inner) is read
   through its own strides taken in out's dim order. */
static void mgpu__cpu_transpose(const mgpu__transpose_args *a) {
    int64_t shape[5], out_st[5], x_st[5];
    shape[0] = a->outer; shape[1] = a->d1; shape[2] = a->mid; shape[3] = a->d0; shape[4] = a->inner;
    x_st[4] = 1; x_st[1] = a->inner; x_st[2] = a->d1 * a->inner; x_st[3] = a->mid * x_st[2]; x_st[0] = a->d0 * x_st[3];
    mgpu__contig_strides(5, shape, out_st);
    mgpu__copy_strided(a->ctx, 5, shape, a->out, out_st, a->x, x_st, a->esize, a->accumulate);
}

/* x seen as (outer, d0, mid, d1, inner) around its dims lo <= hi (lo == hi: a plain copy). */
static void mgpu__transpose_view(mgpu_context *ctx, const mgpu_tensor *x, int lo, int hi, mgpu__transpose_args *a) {
    int i;
    memset(a, 0, sizeof *a);
    a->ctx = ctx; a->esize = mgpu_dtype_size(x->dtype);
    a->outer = a->mid = a->inner = 1;
    a->d0 = x->shape[lo]; a->d1 = lo == hi ? 1 : x->shape[hi];
    for (i = 0; i < lo; i++) a->outer *= x->shape[i];
    for (i = lo + 1; i < hi; i++) a->mid *= x->shape[i];
    for (i = hi + 1; i < x->ndim; i++) a->inner *= x->shape[i];
}

/* iarg = {lo, hi}: the gradient goes back through the same transpose, accumulated. */
static mgpu_result mgpu__transpose_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__transpose_args a;
    float *dx;
    int64_t t;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    MGPU__GRAD_OR_FAIL(dx, ctx, node->in[0]);
    mgpu__transpose_view(ctx, node->in[0], (int)node->iarg[0], (int)node->iarg[1], &a);
    t = a.d0; a.d0 = a.d1; a.d1 = t; /* dy is (outer, d1, mid, d0, inner) */
    a.x = node->out->grad->data; a.out = dx; a.esize = sizeof(float); a.accumulate = 1;
    return MGPU__TWIN(ctx, transpose, &a);
}

MGPU_API mgpu_tensor *mgpu_op_transpose(mgpu_context *ctx, mgpu_tensor *x, int dim0, int dim1) {
    const char *op = "mgpu_op_transpose";
    int64_t shape[MGPU_MAX_DIMS], t;
    mgpu_tensor *out;
    mgpu__node *node;
    mgpu__transpose_args a;
    int d0, d1;
    if (!mgpu__check_input(ctx, op, "x", x, 0)) return NULL;
    if ((d0 = mgpu__norm_dim(op, dim0, x->ndim)) < 0 || (d1 = mgpu__norm_dim(op, dim1, x->ndim)) < 0) return NULL;
    if (d0 > d1) { int s = d0; d0 = d1; d1 = s; } /* transpose(x, a, b) is transpose(x, b, a) */
    memcpy(shape, x->shape, sizeof shape);
    t = shape[d0]; shape[d0] = shape[d1]; shape[d1] = t;
    out = mgpu__new_activation(ctx, x->dtype, x->ndim, shape);
    if (!out) return NULL;
    mgpu__transpose_view(ctx, x, d0, d1, &a);
    a.x = x->data; a.out = out->data;
    if (MGPU__TWIN(ctx, transpose, &a) != MGPU_OK) return NULL;
    MGPU__RECORD(ctx, op, mgpu__transpose_backward, out, 1, &x, node);
    if (node) { node->iarg[0] = d0; node->iarg[1] = d1; }
    return out;
}

static void mgpu__copy_rows_range(void *p, int64_t begin, int64_t end) {
    const mgpu__copy_rows_args *a = (const mgpu__copy_rows_args *)p;
    int64_t r, j;
    for (r = begin; r < end; r++) {
        if (a->accumulate) {
            const float *s = (const float *)a->src + r * a->src_pitch;
            float *d = (float *)a->dst + r * a->dst_pitch;
            for (j = 0; j < a->len; j++) d[j] += s[j];
        } else if (a->len > 0) {
            memcpy((char *)a->dst + (size_t)(r * a->dst_pitch) * a->esize, (const char *)a->src + (size_t)(r * a->src_pitch) * a->esize,
                   (size_t)a->len * a->esize);
        }
    }
}
/* Rows are disjoint in dst, so they can go to different threads. */
static void mgpu__cpu_copy_rows(const mgpu__copy_rows_args *a) {
    mgpu_parallel_for(a->ctx, a->rows, mgpu__grain_for(a->len), mgpu__copy_rows_range, (void *)a);
}

static void mgpu__gather_rows_range(void *p, int64_t begin, int64_t end) {
    const mgpu__gather_rows_args *a = (const mgpu__gather_rows_args *)p;
    size_t row = (size_t)a->len * a->esize;
    int64_t r;
    for (r = begin; r < end; r++) {
        int64_t id = a->idx[r];
        char *d = (char *)a->dst + (size_t)r * row;
        if (id < 0 || id >= a->n_src) memset(d, 0, row);
        else if (row) memcpy(d, (const char *)a->src + (size_t)id * row, row);
    }
}
static void mgpu__cpu_gather_rows(const mgpu__gather_rows_args *a) {
    mgpu_parallel_for(a->ctx, a->rows, mgpu__grain_for(a->len), mgpu__gather_rows_range, (void *)a);
}

/* Copies the slice [start, start + len) of dim d of a tensor shaped like `like`, held in `whole`,
   to or from `part`, where the slice is contiguous: into the whole (into_whole: concat, narrow's
   backward) or out of it. Gradients (grad) are F32 and accumulate. */
static mgpu_result mgpu__copy_slice(mgpu_context *ctx, const mgpu_tensor *like, int d, int64_t start, int64_t len, void *whole, void *part,
                                    int into_whole, int grad) {
    mgpu__copy_rows_args a;
    int64_t outer = 0, size = 0, inner = 0;
    char *slice;
    mgpu__split_at(like, d, &outer, &size, &inner);
    a.ctx = ctx;
    a.esize = grad ? sizeof(float) : mgpu_dtype_size(like->dtype);
    a.accumulate = grad;
    a.rows = outer; a.len = len * inner;
    slice = (char *)whole + (size_t)(start * inner) * a.esize;
    a.src = into_whole ? part : slice; a.src_pitch = into_whole ? a.len : size * inner;
    a.dst = into_whole ? (void *)slice : part; a.dst_pitch = into_whole ? size * inner : a.len;
    return MGPU__TWIN(ctx, copy_rows, &a);
}

/* iarg[0] = dim; one row-block copy per input that needs a gradient */
static mgpu_result mgpu__concat_backward(mgpu_context *ctx, mgpu__node *node) {
    int d = (int)node->iarg[0], k;
    int64_t offset = 0;
    for (k = 0; k < node->n_in; k++) {
        int64_t len = node->in[k]->shape[d];
        float *dx;
        if (mgpu__needs_grad(node, k)) {
            mgpu_result r;
            MGPU__GRAD_OR_FAIL(dx, ctx, node->in[k]);
            if ((r = mgpu__copy_slice(ctx, node->out, d, offset, len, node->out->grad->data, dx, 0, 1)) != MGPU_OK) return r;
        }
        offset += len;
    }
    return MGPU_OK;
}

// xs[k] (..., D_k, ...) -> (..., sum D_k, ...): one row-block copy per input
MGPU_API mgpu_tensor *mgpu_op_concat(mgpu_context *ctx, mgpu_tensor *const *xs, int n, int dim) {
    const char *op = "mgpu_op_concat";
    int64_t shape[MGPU_MAX_DIMS], offset = 0;
    mgpu_tensor *out;
    mgpu__node *node;
    int d, k, i;
    if (!ctx) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: ctx is NULL", op);
    if (!xs || n < 1) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: need n >= 1 tensors in xs (got n = %d%s)", op, n, xs ? "" : ", xs NULL");
    for (k = 0; k < n; k++) {
        char name[32];
        snprintf(name, sizeof name, "xs[%d]", k);
        if (!mgpu__check_input(ctx, op, name, xs[k], 0)) return NULL;
    }
    if ((d = mgpu__norm_dim(op, dim, xs[0]->ndim)) < 0) return NULL;
    memcpy(shape, xs[0]->shape, sizeof shape);
    shape[d] = 0;
    for (k = 0; k < n; k++) {
        int fits = xs[k]->ndim == xs[0]->ndim && xs[k]->dtype == xs[0]->dtype;
        for (i = 0; fits && i < xs[0]->ndim; i++) if (i != d && xs[k]->shape[i] != xs[0]->shape[i]) fits = 0;
        if (!fits)
            MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: xs[%d] is %s %s, xs[0] is %s %s; they must match except along dim %d", op, k,
                            mgpu_dtype_name(xs[k]->dtype), mgpu__shape_str(xs[k]), mgpu_dtype_name(xs[0]->dtype), mgpu__shape_str(xs[0]), dim);
        shape[d] += xs[k]->shape[d];
    }
    out = mgpu__new_activation(ctx, xs[0]->dtype, xs[0]->ndim, shape);
    if (!out) return NULL;
    for (k = 0; k < n; k++) {
        if (mgpu__copy_slice(ctx, out, d, offset, xs[k]->shape[d], out->data, xs[k]->data, 1, 0) != MGPU_OK) return NULL;
        offset += xs[k]->shape[d];
    }
    MGPU__RECORD(ctx, op, mgpu__concat_backward, out, n, xs, node);
    if (node) node->iarg[0] = d;
    return out;
}

/* iarg = {dim, start, length} */
static mgpu_result mgpu__narrow_backward(mgpu_context *ctx, mgpu__node *node) {
    float *dx;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    MGPU__GRAD_OR_FAIL(dx, ctx, node->in[0]);
    return mgpu__copy_slice(ctx, node->in[0], (int)node->iarg[0], node->iarg[1], node->iarg[2], dx, node->out->grad->data, 1, 1);
}

MGPU_API mgpu_tensor *mgpu_op_narrow(mgpu_context *ctx, mgpu_tensor *x, int dim, int64_t start, int64_t length) {
    const char *op = "mgpu_op_narrow";
    int64_t shape[MGPU_MAX_DIMS], size;
    mgpu_tensor *out;
    mgpu__node *node;
    int d;
    if (!mgpu__check_input(ctx, op, "x", x, 0)) return NULL;
    if ((d = mgpu__norm_dim(op, dim, x->ndim)) < 0) return NULL;
    size = x->shape[d];
    if (start < 0) start += size; /* as torch.narrow: a negative start counts from the end */
    if (start < 0 || start > size || length < 0 || length > size - start)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: start %lld, length %lld do not fit in dim %d of size %lld of x %s", op,
                        (long long)start, (long long)length, dim, (long long)size, mgpu__shape_str(x));
    memcpy(shape, x->shape, sizeof shape);
    shape[d] = length;
    out = mgpu__new_activation(ctx, x->dtype, x->ndim, shape);
    if (!out) return NULL;
    if (mgpu__copy_slice(ctx, x, d, start, length, x->data, out->data, 0, 0) != MGPU_OK) return NULL;
    MGPU__RECORD(ctx, op, mgpu__narrow_backward, out, 1, &x, node);
    if (node) { node->iarg[0] = d; node->iarg[1] = start; node->iarg[2] = length; }
    return out;
}

/* Float conversion through F32 in stack-sized pieces; rounding to half is round-to-nearest-even. */
static void mgpu__cast_range(void *p, int64_t begin, int64_t end) {
    const mgpu__cast_args *c = (const mgpu__cast_args *)p;
    float buf[256];
    int64_t i0, i, n;
    for (i0 = begin; i0 < end; i0 += n) {
        n = MGPU__MIN((int64_t)256, end - i0);
        switch (c->src_dtype) {
        case MGPU_F16: for (i = 0; i < n; i++) buf[i] = mgpu_f16_to_f32(((const uint16_t *)c->src)[i0 + i]); break;
        case MGPU_BF16: for (i = 0; i < n; i++) buf[i] = mgpu_bf16_to_f32(((const uint16_t *)c->src)[i0 + i]); break;
        default: memcpy(buf, (const float *)c->src + i0, sizeof(float) * (size_t)n); break;
        }
        switch (c->dst_dtype) {
        case MGPU_F16: for (i = 0; i < n; i++) ((uint16_t *)c->dst)[i0 + i] = mgpu_f32_to_f16(buf[i]); break;
        case MGPU_BF16: for (i = 0; i < n; i++) ((uint16_t *)c->dst)[i0 + i] = mgpu_f32_to_bf16(buf[i]); break;
        default: memcpy((float *)c->dst + i0, buf, sizeof(float) * (size_t)n); break;
        }
    }
}
static void mgpu__cpu_cast(const mgpu__cast_args *a) { mgpu_parallel_for(a->ctx, a->n, MGPU__GRAIN, mgpu__cast_range, (void *)a); }

MGPU_API mgpu_tensor *mgpu_op_cast(mgpu_context *ctx, mgpu_tensor *x, mgpu_dtype dtype) {
    const char *op = "mgpu_op_cast";
    mgpu_tensor *out;
    mgpu__cast_args c;
    if (!mgpu__check_input(ctx, op, "x", x, 0)) return NULL;
    if (!mgpu__dtype_valid(dtype) || !mgpu__dtype_is_float(dtype) || !mgpu__dtype_is_float(x->dtype))
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: casts go between F32, F16 and BF16; asked %s -> %s", op,
                        mgpu_dtype_name(x->dtype), mgpu_dtype_name(dtype));
    if (dtype == x->dtype) return x; /* as tensor.to(same dtype): no copy */
    out = mgpu__new_activation(ctx, dtype, x->ndim, x->shape);
    if (!out) return NULL;
    c.ctx = ctx; c.src = x->data; c.src_dtype = x->dtype; c.dst = out->data; c.dst_dtype = dtype; c.n = x->numel;
    if (MGPU__TWIN(ctx, cast, &c) != MGPU_OK) return NULL;
    MGPU__RECORD_PLAIN(ctx, op, mgpu__passthrough_backward, out, 1, &x);
    return out;
}
