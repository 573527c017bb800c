/* ======================================================================================
   Models, layers, optimizers, schedules
   ====================================================================================== */

/* Models (named parameters and buffers), layers with PyTorch's names, shapes and default
   initialisation, initialisers, optimizers (SGD, Adam, AdamW), gradient clipping, LR schedules. */

/* --------------------------------------------------------------------------------------
   Model: parameters and buffers under their state_dict names, in registration order
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__named { char *name; mgpu_tensor *tensor; } mgpu__named;
typedef struct mgpu__named_list { mgpu__named *items; int count, cap; } mgpu__named_list;

struct mgpu_model {
    mgpu_context *ctx;
    mgpu__named_list params, buffers;
    void **owned; int n_owned, cap_owned;   /* layer structs, freed with the model */
    int training;
    mgpu_batchnorm2d **batchnorms; int n_batchnorms, cap_batchnorms;  /* found by DDP's sync_batchnorm */
};

/* Room for `need` elements of `elem` bytes: returns the (possibly moved) array, or NULL with an
   error (the old array stays valid). */
static void *mgpu__grow(void *items, int *cap, int need, size_t elem, const char *what) {
    void *p;
    int ncap;
    if (need <= *cap) return items;
    ncap = *cap ? *cap : 16;
    while (ncap < need) ncap *= 2;
    p = mgpu__alloc(elem * (size_t)ncap, what);
    if (!p) return NULL;
    if (*cap) memcpy(p, items, elem * (size_t)*cap);
    mgpu_free(items);
    *cap = ncap;
    return p;
}

static mgpu_tensor *mgpu__named_find(const mgpu__named_list *l, const char *name) {
    int i;
    for (i = 0; i < l->count; i++)
        if (strcmp(l->items[i].name, name) == 0) return l->items[i].tensor;
    return NULL;
}

/* Frees entries [from, count) and shrinks the list to `from`. */
static void mgpu__named_truncate(mgpu__named_list *l, int from) {
    int i;
    for (i = from; i < l->count; i++) { mgpu_tensor_free(l->items[i].tensor); mgpu_free(l->items[i].name); }
    if (from < l->count) l->count = from;
}

MGPU_API mgpu_model *mgpu_model_create(mgpu_context *ctx) {
    mgpu_model *m;
    if (!ctx) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_model_create: ctx is NULL");
    m = (mgpu_model *)mgpu__calloc(sizeof *m, "a model");
    if (!m) return NULL;
    m->ctx = ctx;
    m->training = 1;
    return m;
}

MGPU_API void mgpu_model_destroy(mgpu_model *m) {
    int i;
    if (!m) return;
    mgpu__named_truncate(&m->params, 0);
    mgpu__named_truncate(&m->buffers, 0);
    for (i = 0; i < m->n_owned; i++) mgpu_free(m->owned[i]);
    mgpu_free(m->params.items);
    mgpu_free(m->buffers.items);
    mgpu_free(m->owned);
    mgpu_free(m->batchnorms);
    mgpu_free(m);
}

MGPU_API mgpu_context *mgpu_model_context(const mgpu_model *m) {
    if (!m) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_model_context: model is NULL");
    return m->ctx;
}

/* Shared body of add_parameter/add_buffer: checks, allocates (zeros), copies the name. */
static mgpu_tensor *mgpu__model_add(mgpu_model *m, int is_param, const char *name, mgpu_dtype dtype, int ndim,
                                    const int64_t *shape, const char *fn) {
    mgpu__named_list *list;
    mgpu__named *grown;
    mgpu_tensor *t;
    char *copy;
    char what[160];
    if (!m) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: model is NULL", fn);
    if (!name || !name[0]) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: name is NULL or empty", fn);
    if (mgpu__named_find(&m->params, name) || mgpu__named_find(&m->buffers, name))
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: the name '%s' is already registered in this model", fn, name);
    if (!mgpu__dtype_valid(dtype)) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s '%s': dtype %d is not a valid mgpu_dtype", fn, name, (int)dtype);
    if (is_param && !mgpu__dtype_is_float(dtype))
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s '%s': a parameter must have a float dtype, got %s", fn, name, mgpu_dtype_name(dtype));
    snprintf(what, sizeof what, "%s '%s'", fn, name);
    if (mgpu__shape_numel(ndim, shape, what) < 0) return NULL;
    list = is_param ? &m->params : &m->buffers;
    grown = (mgpu__named *)mgpu__grow(list->items, &list->cap, list->count + 1, sizeof *list->items, "the model's tensor list");
    if (!grown) return NULL;
    list->items = grown;
    t = mgpu_tensor_create(m->ctx, dtype, ndim, shape);
    copy = t ? mgpu__strdup(name) : NULL;
    if (!copy) { mgpu_tensor_free(t); return NULL; }
    t->requires_grad = is_param;
    list->items[list->count].name = copy;
    list->items[list->count].tensor = t;
    list->count++;
    return t;
}

MGPU_API mgpu_tensor *mgpu_model_add_parameter(mgpu_model *m, const char *name, mgpu_dtype dtype, int ndim, const int64_t *shape) {
    return mgpu__model_add(m, 1, name, dtype, ndim, shape, "mgpu_model_add_parameter");
}
MGPU_API mgpu_tensor *mgpu_model_add_buffer(mgpu_model *m, const char *name, mgpu_dtype dtype, int ndim, const int64_t *shape) {
    return mgpu__model_add(m, 0, name, dtype, ndim, shape, "mgpu_model_add_buffer");
}

MGPU_API int mgpu_model_num_parameters(const mgpu_model *m) { return m ? m->params.count : 0; }
MGPU_API int mgpu_model_num_buffers(const mgpu_model *m) { return m ? m->buffers.count : 0; }

static mgpu_tensor *mgpu__named_at(const mgpu__named_list *l, int i, const char **name, const char *fn) {
    if (i < 0 || i >= l->count) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: index %d outside [0, %d)", fn, i, l->count);
    if (name) *name = l->items[i].name;
    return l->items[i].tensor;
}
MGPU_API mgpu_tensor *mgpu_model_parameter(const mgpu_model *m, int i, const char **name) {
    if (!m) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_model_parameter: model is NULL");
    return mgpu__named_at(&m->params, i, name, "mgpu_model_parameter");
}
MGPU_API mgpu_tensor *mgpu_model_buffer(const mgpu_model *m, int i, const char **name) {
    if (!m) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_model_buffer: model is NULL");
    return mgpu__named_at(&m->buffers, i, name, "mgpu_model_buffer");
}

MGPU_API mgpu_tensor *mgpu_model_find(const mgpu_model *m, const char *name) {
    mgpu_tensor *t;
    if (!m || !name) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_model_find: model and name must not be NULL");
    t = mgpu__named_find(&m->params, name);
    if (!t) t = mgpu__named_find(&m->buffers, name);
    if (!t) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_model_find: no parameter or buffer named '%s'", name);
    return t;
}

MGPU_API int64_t mgpu_model_parameter_count(const mgpu_model *m) {
    int64_t n = 0;
    int i;
    if (!m) return 0;
    for (i = 0; i < m->params.count; i++) n += m->params.items[i].tensor->numel;
    return n;
}

MGPU_API void mgpu_model_train(mgpu_model *m, int training) {
    int i;
    if (!m) return;
    m->training = training != 0;
    for (i = 0; i < m->n_batchnorms; i++) m->batchnorms[i]->counted = -1;   /* a load between epochs is seen */
}
MGPU_API int mgpu_model_is_training(const mgpu_model *m) { return m ? m->training : 0; }

MGPU_API mgpu_result mgpu_model_zero_grad(mgpu_model *m) {
    int i;
    if (!m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_model_zero_grad: model is NULL");
    for (i = 0; i < m->params.count; i++) mgpu_tensor_zero_grad(m->params.items[i].tensor);
    return MGPU_OK;
}

/* Every entry of dst has a same-named, same-dtype, same-shape entry in src (and the counts match). */
static mgpu_result mgpu__check_same_state(const mgpu__named_list *dst, const mgpu__named_list *src, const char *kind) {
    int i;
    if (dst->count != src->count)
        return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_model_copy_state: destination has %d %ss, source has %d", dst->count, kind, src->count);
    for (i = 0; i < dst->count; i++) {
        const mgpu_tensor *d = dst->items[i].tensor, *s = mgpu__named_find(src, dst->items[i].name);
        if (!s) return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_model_copy_state: %s '%s' is missing from the source model", kind, dst->items[i].name);
        if (s->dtype != d->dtype || !mgpu_tensor_same_shape(s, d))
            return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_model_copy_state: %s '%s' is %s %s in the source, %s %s in the destination", kind,
                              dst->items[i].name, mgpu_dtype_name(s->dtype), mgpu__shape_str(s), mgpu_dtype_name(d->dtype), mgpu__shape_str(d));
    }
    return MGPU_OK;
}
static void mgpu__copy_named(mgpu__named_list *dst, const mgpu__named_list *src) {
    int i;
    for (i = 0; i < dst->count; i++) mgpu_tensor_copy(dst->items[i].tensor, mgpu__named_find(src, dst->items[i].name));
}

MGPU_API mgpu_result mgpu_model_copy_state(mgpu_model *dst, const mgpu_model *src) {
    mgpu_result r;
    if (!dst || !src) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_model_copy_state: dst and src must not be NULL");
    /* check everything first so a mismatch leaves dst untouched */
    if ((r = mgpu__check_same_state(&dst->params, &src->params, "parameter")) != MGPU_OK) return r;
    if ((r = mgpu__check_same_state(&dst->buffers, &src->buffers, "buffer")) != MGPU_OK) return r;
    mgpu__copy_named(&dst->params, &src->params);
    mgpu__copy_named(&dst->buffers, &src->buffers);
    return MGPU_OK;
}

/* Layer structs are zeroed memory owned (and freed) by the model. */
static void *mgpu__model_own(mgpu_model *m, size_t bytes, const char *what) {
    void **grown = (void **)mgpu__grow(m->owned, &m->cap_owned, m->n_owned + 1, sizeof(void *), "the model's layer list");
    void *p;
    if (!grown) return NULL;
    m->owned = grown;
    p = mgpu__calloc(bytes, what);
    if (p) m->owned[m->n_owned++] = p;
    return p;
}

/* A failed layer constructor rolls the model (and the init RNG stream) back to where it started,
   so a half-built layer never stays registered. */
typedef struct mgpu__model_mark { int params, buffers, owned; uint64_t rng_offset; } mgpu__model_mark;
static mgpu__model_mark mgpu__model_mark_now(const mgpu_model *m) {
    mgpu__model_mark mk;
    mk.params = m->params.count; mk.buffers = m->buffers.count; mk.owned = m->n_owned;
    mk.rng_offset = m->ctx->rng_offset;
    return mk;
}
static void mgpu__model_rollback(mgpu_model *m, mgpu__model_mark mk) {
    int i;
    mgpu__named_truncate(&m->params, mk.params);
    mgpu__named_truncate(&m->buffers, mk.buffers);
    for (i = mk.owned; i < m->n_owned; i++) mgpu_free(m->owned[i]);
    if (mk.owned < m->n_owned) m->n_owned = mk.owned;
    m->ctx->rng_offset = mk.rng_offset;
}

/* --------------------------------------------------------------------------------------
   Initialisers: element i takes counter first + i of the context's stream, so the values do not
   depend on the thread count and a model is rebuilt identically from the seed.
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__init_job { float *data; uint64_t seed, first; double offset, scale; int normal; } mgpu__init_job;

static void mgpu__init_range(void *arg, int64_t begin, int64_t end) {
    const mgpu__init_job *j = (const mgpu__init_job *)arg;
    int64_t i;
    for (i = begin; i < end; i++) {
        uint64_t c = j->first + (uint64_t)i;
        double r = j->normal ? (double)mgpu_random_normal(j->seed, c) : (double)mgpu_random_uniform(j->seed, c);
        j->data[i] = (float)(j->offset + j->scale * r);
    }
}

/* t = offset + scale * r with r ~ U[0, 1) or N(0, 1). A tensor on a GPU is filled on the host
   with the very same draws and copied over once, so a model built on cuda:i starts bit-identical
   to the one the CPU builds from the same seed (initialisation is not worth a kernel). */
static mgpu_result mgpu__init_random(mgpu_context *ctx, mgpu_tensor *t, double offset, double scale, int normal, const char *fn) {
    mgpu__init_job job;
    mgpu_result r = MGPU_OK;
    if (!ctx || !t) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: ctx and tensor must not be NULL", fn);
    if (t->dtype != MGPU_F32)
        return mgpu__fail(MGPU_ERR_UNSUPPORTED, "%s: tensor is %s; initialisers fill F32 tensors", fn, mgpu_dtype_name(t->dtype));
    if (!mgpu__same_device(t->device, ctx->device))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: the tensor is on another device than the context", fn);
    job.data = mgpu__on_host(t) ? (float *)t->data : (float *)mgpu__alloc(mgpu_tensor_nbytes(t), "initialising a device tensor on the host");
    if (!job.data) return mgpu_last_result();
    job.seed = ctx->rng_seed;
    job.first = mgpu_context_rng_reserve(ctx, (uint64_t)t->numel);
    job.offset = offset; job.scale = scale; job.normal = normal;
    mgpu_parallel_for(ctx, t->numel, 32768, mgpu__init_range, &job);
    if (!mgpu__on_host(t)) {
        r = mgpu_tensor_copy_from_host(t, job.data, mgpu_tensor_nbytes(t));
        mgpu_free(job.data);
    }
    return r;
}

MGPU_API mgpu_result mgpu_init_uniform(mgpu_context *ctx, mgpu_tensor *t, float lo, float hi) {
    if (!(lo <= hi) || !isfinite(lo) || !isfinite(hi))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_init_uniform: need finite lo <= hi, got lo %g, hi %g", lo, hi);
    return mgpu__init_random(ctx, t, lo, (double)hi - (double)lo, 0, "mgpu_init_uniform");
}
MGPU_API mgpu_result mgpu_init_normal(mgpu_context *ctx, mgpu_tensor *t, float mean, float std) {
    if (!(std >= 0) || !isfinite(mean) || !isfinite(std))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_init_normal: need finite mean and std >= 0, got mean %g, std %g", mean, std);
    return mgpu__init_random(ctx, t, mean, std, 1, "mgpu_init_normal");
}

/* --------------------------------------------------------------------------------------
   Layers. Constructors register "<name>.<tensor>" in PyTorch's state_dict order; forwards
   compose the public ops, so autograd comes for free.
   -------------------------------------------------------------------------------------- */

static int mgpu__layer_args_ok(const mgpu_model *m, const char *name, const char *fn) {
    if (!m) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: model is NULL", fn); return 0; }
    if (!name) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: name is NULL", fn); return 0; }
    return 1;
}

/* "<prefix>.<suffix>" (just suffix for an empty prefix, as a top-level PyTorch module), freed by the caller. */
static char *mgpu__join_name(const char *prefix, const char *suffix) {
    size_t np = strlen(prefix), ns = strlen(suffix);
    char *s = (char *)mgpu__alloc(np + ns + 2, "a parameter name");
    if (!s) return NULL;
    if (np) { memcpy(s, prefix, np); s[np] = '.'; np++; }
    memcpy(s + np, suffix, ns + 1);
    return s;
}

/* Registers "<prefix>.<suffix>" as a parameter (or buffer) filled with `fill`. */
static mgpu_tensor *mgpu__layer_tensor(mgpu_model *m, int is_param, const char *prefix, const char *suffix, mgpu_dtype dtype,
                                       int ndim, const int64_t *shape, double fill, const char *fn) {
    char *full = mgpu__join_name(prefix, suffix);
    mgpu_tensor *t;
    if (!full) return NULL;
    t = mgpu__model_add(m, is_param, full, dtype, ndim, shape, fn);
    mgpu_free(full);
    if (t && fill != 0.0) mgpu_tensor_fill(t, fill);
    return t;
}
static mgpu_tensor *mgpu__layer_param(mgpu_model *m, const char *prefix, const char *suffix, int ndim, const int64_t *shape,
                                      double fill, const char *fn) {
    return mgpu__layer_tensor(m, 1, prefix, suffix, MGPU_F32, ndim, shape, fill, fn);
}

/* Weight (shape) and optional bias (shape[0]) as nn.Linear/nn.Conv2d initialise them:
   kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the bias uses the same bound. */
static int mgpu__add_weight_bias(mgpu_model *m, const char *prefix, int ndim, const int64_t *wshape, int64_t fan_in, int bias,
                                 mgpu_tensor **w, mgpu_tensor **b, const char *fn) {
    float bound = (float)(1.0 / sqrt((double)fan_in));
    *w = mgpu__layer_param(m, prefix, "weight", ndim, wshape, 0.0, fn);
    if (!*w || mgpu_init_uniform(m->ctx, *w, -bound, bound) != MGPU_OK) return 0;
    *b = NULL;
    if (!bias) return 1;
    *b = mgpu__layer_param(m, prefix, "bias", 1, wshape, 0.0, fn);
    return *b && mgpu_init_uniform(m->ctx, *b, -bound, bound) == MGPU_OK;
}

/* Fills an already-owned linear struct (shared by mgpu_linear_create and the layers that embed one). */
static int mgpu__linear_init(mgpu_model *m, mgpu_linear *l, const char *name, int64_t in_features, int64_t out_features, int bias,
                             const char *fn) {
    int64_t wshape[2];
    wshape[0] = out_features; wshape[1] = in_features;   // (out, in)
    l->model = m; l->in_features = in_features; l->out_features = out_features;
    return mgpu__add_weight_bias(m, name, 2, wshape, in_features, bias, &l->weight, &l->bias, fn);
}
static mgpu_linear *mgpu__linear_new(mgpu_model *m, const char *name, int64_t in_features, int64_t out_features, int bias, const char *fn) {
    mgpu_linear *l = (mgpu_linear *)mgpu__model_own(m, sizeof *l, "a linear layer");
    if (!l || !mgpu__linear_init(m, l, name, in_features, out_features, bias, fn)) return NULL;
    return l;
}

MGPU_API mgpu_linear *mgpu_linear_create(mgpu_model *m, const char *name, int64_t in_features, int64_t out_features, int bias) {
    const char *fn = "mgpu_linear_create";
    mgpu__model_mark mk;
    mgpu_linear *l;
    if (!mgpu__layer_args_ok(m, name, fn)) return NULL;
    if (in_features < 1 || out_features < 1)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s '%s': in_features %lld and out_features %lld must be >= 1", fn, name,
                        (long long)in_features, (long long)out_features);
    mk = mgpu__model_mark_now(m);
    l = mgpu__linear_new(m, name, in_features, out_features, bias, fn);
    if (!l) mgpu__model_rollback(m, mk);
    return l;
}

/* Layer forwards: a NULL layer is an error; a NULL input is passed on to the op, which keeps the first error. */
static int mgpu__layer_ok(const void *layer, const char *fn) {
    if (!layer) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: layer is NULL", fn); return 0; }
    return 1;
}

MGPU_API mgpu_tensor *mgpu_linear_forward(mgpu_context *ctx, const mgpu_linear *l, mgpu_tensor *x) {
    if (!mgpu__layer_ok(l, "mgpu_linear_forward")) return NULL;
    return mgpu_op_linear(ctx, x, l->weight, l->bias);   // (..., in) -> (..., out)
}

MGPU_API mgpu_conv2d *mgpu_conv2d_create(mgpu_model *m, const char *name, int64_t in_channels, int64_t out_channels,
                                         int kernel, int stride, int padding, int bias) {
    const char *fn = "mgpu_conv2d_create";
    mgpu__model_mark mk;
    mgpu_conv2d *l;
    int64_t wshape[4];
    if (!mgpu__layer_args_ok(m, name, fn)) return NULL;
    if (in_channels < 1 || out_channels < 1 || kernel < 1 || stride < 1 || padding < 0)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s '%s': need in_channels, out_channels, kernel, stride >= 1 and padding >= 0 "
                        "(got %lld, %lld, %d, %d, %d)", fn, name, (long long)in_channels, (long long)out_channels, kernel, stride, padding);
    wshape[0] = out_channels; wshape[1] = in_channels; wshape[2] = kernel; wshape[3] = kernel;   // (O, C, k, k)
    mk = mgpu__model_mark_now(m);
    l = (mgpu_conv2d *)mgpu__model_own(m, sizeof *l, "a conv2d layer");
    if (!l || !mgpu__add_weight_bias(m, name, 4, wshape, in_channels * kernel * kernel, bias, &l->weight, &l->bias, fn)) {
        mgpu__model_rollback(m, mk);
        return NULL;
    }
    l->model = m; l->in_channels = in_channels; l->out_channels = out_channels;
    l->kernel = kernel; l->stride = stride; l->padding = padding;
    return l;
}

MGPU_API mgpu_tensor *mgpu_conv2d_forward(mgpu_context *ctx, const mgpu_conv2d *l, mgpu_tensor *x) {
    if (!mgpu__layer_ok(l, "mgpu_conv2d_forward")) return NULL;
    return mgpu_op_conv2d(ctx, x, l->weight, l->bias, l->stride, l->padding);   // (N, C, H, W) -> (N, O, OH, OW)
}

MGPU_API mgpu_batchnorm2d *mgpu_batchnorm2d_create(mgpu_model *m, const char *name, int64_t num_features) {
    const char *fn = "mgpu_batchnorm2d_create";
    mgpu__model_mark mk;
    mgpu_batchnorm2d *l;
    if (!mgpu__layer_args_ok(m, name, fn)) return NULL;
    if (num_features < 1) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s '%s': num_features %lld must be >= 1", fn, name, (long long)num_features);
    mk = mgpu__model_mark_now(m);
    l = (mgpu_batchnorm2d *)mgpu__model_own(m, sizeof *l, "a batchnorm2d layer");
    if (l) {
        l->counted = -1;   /* read back at the first count: the buffer may be loaded before training starts */
        l->weight = mgpu__layer_param(m, name, "weight", 1, &num_features, 1.0, fn);
        l->bias = l->weight ? mgpu__layer_param(m, name, "bias", 1, &num_features, 0.0, fn) : NULL;
        l->running_mean = l->bias ? mgpu__layer_tensor(m, 0, name, "running_mean", MGPU_F32, 1, &num_features, 0.0, fn) : NULL;
        l->running_var = l->running_mean ? mgpu__layer_tensor(m, 0, name, "running_var", MGPU_F32, 1, &num_features, 1.0, fn) : NULL;
        l->num_batches_tracked = l->running_var ? mgpu__layer_tensor(m, 0, name, "num_batches_tracked", MGPU_I64, 0, NULL, 0.0, fn) : NULL;
    }
    if (l && l->num_batches_tracked) {
        mgpu_batchnorm2d **grown = (mgpu_batchnorm2d **)mgpu__grow(m->batchnorms, &m->cap_batchnorms, m->n_batchnorms + 1,
                                                                   sizeof *grown, "the model's batchnorm list");
        if (grown) { m->batchnorms = grown; m->batchnorms[m->n_batchnorms++] = l; }
        else l->num_batches_tracked = NULL;
    }
    if (!l || !l->num_batches_tracked) { mgpu__model_rollback(m, mk); return NULL; }
    l->model = m; l->num_features = num_features; l->eps = 1e-5f; l->momentum = 0.1f; l->sync_comm = NULL;
    return l;
}

/* num_batches_tracked += 1: in place on the host. On a GPU from the host's count (l->counted),
   read back only when unknown (after mgpu_model_train), then written with a fill that needs no
   sync: a read-modify-write through the host every training forward would stall the step. */
/* The count on the host: read back once after mgpu_model_train (never while capturing: the warm-up
   steps before a capture read it). */
static mgpu_result mgpu__batchnorm_known_count(mgpu_batchnorm2d *l) {
    double v;
    if (l->counted >= 0) return MGPU_OK;
    if (mgpu__capturing(l->num_batches_tracked->ctx))
        return mgpu__fail(MGPU_ERR_STATE, "CUDA Graph capture: num_batches_tracked is not known on the host yet");
    v = mgpu_tensor_item(l->num_batches_tracked);
    if (v != v) return mgpu_last_result();
    l->counted = (int64_t)v;
    return MGPU_OK;
}
/* A captured count's replay hook: the count of an eager step, copied by the graph from its step scalar. */
static mgpu_result mgpu__batchnorm_count_replay(void *layer, int64_t unused, uint64_t *words) {
    mgpu_batchnorm2d *l = (mgpu_batchnorm2d *)layer;
    mgpu_result r = mgpu__batchnorm_known_count(l);
    (void)unused;
    words[0] = (uint64_t)++l->counted;
    return r;
}
static mgpu_result mgpu__batchnorm_count(mgpu_batchnorm2d *l) {
    mgpu_tensor *t = l->num_batches_tracked;
    mgpu_result r;
    if (mgpu__on_host(t)) { ((int64_t *)t->data)[0]++; return MGPU_OK; }
    if (mgpu__capturing(t->ctx)) {   /* each replay counts on the host and copies its count from a step scalar */
        mgpu__copy_args c;
        void *at = NULL;
        if ((r = mgpu__step_scalar(t->ctx, mgpu__batchnorm_count_replay, l, 0, 1, &at)) != MGPU_OK) return r;
        c.ctx = t->ctx; c.src = at; c.dst = t->data; c.bytes = sizeof(int64_t);
        return MGPU__TWIN(t->ctx, copy, &c);
    }
    if ((r = mgpu__batchnorm_known_count(l)) != MGPU_OK) return r;
    return mgpu_tensor_fill(t, (double)++l->counted);
}

MGPU_API mgpu_tensor *mgpu_batchnorm2d_forward(mgpu_context *ctx, mgpu_batchnorm2d *l, mgpu_tensor *x) {
    mgpu__bn_sync sync;
    mgpu_tensor *y;
    int training;
    const char *fn = "mgpu_batchnorm2d_forward";
    if (!mgpu__layer_ok(l, fn) || !mgpu__check_input(ctx, fn, "x", x, 1)) return NULL;
    if (x->ndim != 4) MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: x is %s, expected 4-D (N, C, H, W) as nn.BatchNorm2d", fn, mgpu__shape_str(x));
    training = l->model->training;
    /* SyncBatchNorm (set by DDP): training statistics are reduced over the communicator */
    sync.reduce = mgpu__bn_reduce_over_comm; sync.user = l->sync_comm;
    y = mgpu__batch_norm(ctx, x, l->weight, l->bias, l->running_mean, l->running_var, training, l->momentum, l->eps,
                         training && l->sync_comm ? &sync : NULL);
    if (y && training && mgpu__batchnorm_count(l) != MGPU_OK) return NULL;
    return y;   // (N, C, H, W)
}

MGPU_API mgpu_layernorm *mgpu_layernorm_create(mgpu_model *m, const char *name, int64_t dim) {
    const char *fn = "mgpu_layernorm_create";
    mgpu__model_mark mk;
    mgpu_layernorm *l;
    if (!mgpu__layer_args_ok(m, name, fn)) return NULL;
    if (dim < 1) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s '%s': dim %lld must be >= 1", fn, name, (long long)dim);
    mk = mgpu__model_mark_now(m);
    l = (mgpu_layernorm *)mgpu__model_own(m, sizeof *l, "a layernorm layer");
    if (l) {
        l->weight = mgpu__layer_param(m, name, "weight", 1, &dim, 1.0, fn);
        l->bias = l->weight ? mgpu__layer_param(m, name, "bias", 1, &dim, 0.0, fn) : NULL;
    }
    if (!l || !l->bias) { mgpu__model_rollback(m, mk); return NULL; }
    l->model = m; l->dim = dim; l->eps = 1e-5f;
    return l;
}

MGPU_API mgpu_tensor *mgpu_layernorm_forward(mgpu_context *ctx, const mgpu_layernorm *l, mgpu_tensor *x) {
    if (!mgpu__layer_ok(l, "mgpu_layernorm_forward")) return NULL;
    return mgpu_op_layer_norm(ctx, x, l->weight, l->bias, l->eps);   // (..., C)
}

MGPU_API mgpu_embedding *mgpu_embedding_create(mgpu_model *m, const char *name, int64_t num_embeddings, int64_t dim) {
    const char *fn = "mgpu_embedding_create";
    mgpu__model_mark mk;
    mgpu_embedding *l;
    int64_t shape[2];
    if (!mgpu__layer_args_ok(m, name, fn)) return NULL;
    if (num_embeddings < 1 || dim < 1)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s '%s': num_embeddings %lld and dim %lld must be >= 1", fn, name,
                        (long long)num_embeddings, (long long)dim);
    shape[0] = num_embeddings; shape[1] = dim;   // (V, D)
    mk = mgpu__model_mark_now(m);
    l = (mgpu_embedding *)mgpu__model_own(m, sizeof *l, "an embedding layer");
    if (l) l->weight = mgpu__layer_param(m, name, "weight", 2, shape, 0.0, fn);
    if (!l || !l->weight || mgpu_init_normal(m->ctx, l->weight, 0.0f, 1.0f) != MGPU_OK) { mgpu__model_rollback(m, mk); return NULL; }
    l->model = m; l->num_embeddings = num_embeddings; l->dim = dim;
    return l;
}

MGPU_API mgpu_tensor *mgpu_embedding_forward(mgpu_context *ctx, const mgpu_embedding *l, mgpu_tensor *idx) {
    if (!mgpu__layer_ok(l, "mgpu_embedding_forward")) return NULL;
    return mgpu_op_embedding(ctx, l->weight, idx);   // (...) -> (..., D)
}

/* PyTorch accepts p in [0, 1] (p = 1 zeroes everything). */
static int mgpu__dropout_p_ok(float p, const char *fn) {
    if (!(p >= 0.0f && p <= 1.0f)) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: dropout probability %g must be in [0, 1]", fn, p); return 0; }
    return 1;
}

MGPU_API mgpu_dropout *mgpu_dropout_create(mgpu_model *m, float p) {
    mgpu_dropout *l;
    if (!m) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_dropout_create: model is NULL");
    if (!mgpu__dropout_p_ok(p, "mgpu_dropout_create")) return NULL;
    l = (mgpu_dropout *)mgpu__model_own(m, sizeof *l, "a dropout layer");
    if (!l) return NULL;
    l->model = m; l->p = p;
    return l;
}

MGPU_API mgpu_tensor *mgpu_dropout_forward(mgpu_context *ctx, const mgpu_dropout *l, mgpu_tensor *x) {
    if (!mgpu__layer_ok(l, "mgpu_dropout_forward")) return NULL;
    return mgpu_op_dropout(ctx, x, l->p, l->model->training);
}

MGPU_API mgpu_mha *mgpu_mha_create(mgpu_model *m, const char *name, int64_t embed_dim, int64_t num_heads) {
    const char *fn = "mgpu_mha_create";
    mgpu__model_mark mk;
    mgpu_mha *l;
    char *out_name = NULL;
    int64_t wshape[2], bshape = 3 * embed_dim;
    float bound;
    if (!mgpu__layer_args_ok(m, name, fn)) return NULL;
    if (embed_dim < 1 || num_heads < 1 || embed_dim % num_heads != 0)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s '%s': embed_dim %lld must be >= 1 and divisible by num_heads %lld", fn, name,
                        (long long)embed_dim, (long long)num_heads);
    wshape[0] = 3 * embed_dim; wshape[1] = embed_dim;   // (3E, E)
    bound = (float)sqrt(6.0 / (double)(embed_dim + 3 * embed_dim));   /* xavier_uniform_: fan_in E, fan_out 3E */
    mk = mgpu__model_mark_now(m);
    l = (mgpu_mha *)mgpu__model_own(m, sizeof *l, "a multi-head attention layer");
    if (l) l->in_proj_weight = mgpu__layer_param(m, name, "in_proj_weight", 2, wshape, 0.0, fn);
    if (l && l->in_proj_weight && mgpu_init_uniform(m->ctx, l->in_proj_weight, -bound, bound) == MGPU_OK) {
        l->in_proj_bias = mgpu__layer_param(m, name, "in_proj_bias", 1, &bshape, 0.0, fn);
        out_name = l->in_proj_bias ? mgpu__join_name(name, "out_proj") : NULL;
        l->out_proj = out_name ? mgpu__linear_new(m, out_name, embed_dim, embed_dim, 1, fn) : NULL;
        mgpu_free(out_name);
    }
    if (!l || !l->out_proj) { mgpu__model_rollback(m, mk); return NULL; }
    mgpu_tensor_fill(l->out_proj->bias, 0.0);   /* MultiheadAttention._reset_parameters zeroes out_proj.bias */
    l->model = m; l->embed_dim = embed_dim; l->num_heads = num_heads;
    return l;
}

/* (B, T, E) slice [start, start + E) of the packed projection -> (B, H, T, Dh) */
static mgpu_tensor *mgpu__mha_heads(mgpu_context *ctx, mgpu_tensor *qkv, int64_t start, const mgpu_mha *l) {
    int64_t shape[4];
    mgpu_tensor *part = mgpu_op_narrow(ctx, qkv, 2, start, l->embed_dim);   // (B, T, E)
    if (!part) return NULL;
    shape[0] = qkv->shape[0]; shape[1] = qkv->shape[1]; shape[2] = l->num_heads; shape[3] = l->embed_dim / l->num_heads;
    return mgpu_op_transpose(ctx, mgpu_op_reshape(ctx, part, 4, shape), 1, 2);   // (B, T, H, Dh) -> (B, H, T, Dh)
}

MGPU_API mgpu_tensor *mgpu_mha_forward(mgpu_context *ctx, const mgpu_mha *l, mgpu_tensor *x, int causal) {
    const char *fn = "mgpu_mha_forward";
    mgpu_tensor *qkv, *q, *k, *v, *y;
    int64_t shape[3];
    if (!mgpu__layer_ok(l, fn) || !mgpu__check_input(ctx, fn, "x", x, 1)) return NULL;
    if (x->ndim != 3 || x->shape[2] != l->embed_dim)
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: x is %s, expected (B, T, %lld) (batch_first)", fn, mgpu__shape_str(x), (long long)l->embed_dim);
    qkv = mgpu_op_linear(ctx, x, l->in_proj_weight, l->in_proj_bias);   // (B, T, 3E)
    if (!qkv) return NULL;
    q = mgpu__mha_heads(ctx, qkv, 0, l);
    k = mgpu__mha_heads(ctx, qkv, l->embed_dim, l);
    v = mgpu__mha_heads(ctx, qkv, 2 * l->embed_dim, l);
    y = mgpu_op_transpose(ctx, mgpu_op_attention(ctx, q, k, v, causal), 1, 2);   // (B, H, T, Dh) -> (B, T, H, Dh)
    shape[0] = x->shape[0]; shape[1] = x->shape[1]; shape[2] = l->embed_dim;
    return mgpu_linear_forward(ctx, l->out_proj, mgpu_op_reshape(ctx, y, 3, shape));   // (B, T, E)
}

MGPU_API mgpu_transformer_layer *mgpu_transformer_layer_create(mgpu_model *m, const char *name, int64_t d_model, int64_t nhead,
                                                               int64_t dim_feedforward, float dropout, int norm_first) {
    const char *fn = "mgpu_transformer_layer_create";
    /* submodules in nn.TransformerEncoderLayer's registration order, which fixes the state_dict order */
    static const char *const subs[] = {"self_attn", "linear1", "linear2", "norm1", "norm2"};
    char *names[5] = {NULL, NULL, NULL, NULL, NULL};
    mgpu__model_mark mk;
    mgpu_transformer_layer *l;
    int i, ok = 1;
    if (!mgpu__layer_args_ok(m, name, fn) || !mgpu__dropout_p_ok(dropout, fn)) return NULL;
    if (d_model < 1 || nhead < 1 || d_model % nhead != 0 || dim_feedforward < 1)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s '%s': d_model %lld must be >= 1 and divisible by nhead %lld, dim_feedforward %lld >= 1",
                        fn, name, (long long)d_model, (long long)nhead, (long long)dim_feedforward);
    mk = mgpu__model_mark_now(m);
    l = (mgpu_transformer_layer *)mgpu__model_own(m, sizeof *l, "a transformer layer");
    for (i = 0; i < 5 && l && ok; i++) ok = (names[i] = mgpu__join_name(name, subs[i])) != NULL;
    if (l && ok) {
        l->self_attn = mgpu_mha_create(m, names[0], d_model, nhead);
        l->linear1 = l->self_attn ? mgpu__linear_new(m, names[1], d_model, dim_feedforward, 1, fn) : NULL;
        l->linear2 = l->linear1 ? mgpu__linear_new(m, names[2], dim_feedforward, d_model, 1, fn) : NULL;
        l->norm1 = l->linear2 ? mgpu_layernorm_create(m, names[3], d_model) : NULL;
        l->norm2 = l->norm1 ? mgpu_layernorm_create(m, names[4], d_model) : NULL;
    }
    for (i = 0; i < 5; i++) mgpu_free(names[i]);
    if (!l || !l->norm2) { mgpu__model_rollback(m, mk); return NULL; }
    l->model = m; l->dropout = dropout; l->norm_first = norm_first != 0;
    return l;
}

/* Dropout inside composite layers: skipped entirely at p = 0 so it costs nothing and draws no random numbers. */
static mgpu_tensor *mgpu__maybe_dropout(mgpu_context *ctx, mgpu_tensor *x, float p, int training) {
    return p > 0.0f ? mgpu_op_dropout(ctx, x, p, training) : x;
}

/* linear2(dropout(relu(linear1(x)))) */
static mgpu_tensor *mgpu__transformer_ff(mgpu_context *ctx, const mgpu_transformer_layer *l, mgpu_tensor *x) {
    mgpu_tensor *h = mgpu_op_relu(ctx, mgpu_linear_forward(ctx, l->linear1, x));   // (B, T, F)
    return mgpu_linear_forward(ctx, l->linear2, mgpu__maybe_dropout(ctx, h, l->dropout, l->model->training));   // (B, T, E)
}

MGPU_API mgpu_tensor *mgpu_transformer_layer_forward(mgpu_context *ctx, const mgpu_transformer_layer *l, mgpu_tensor *x, int causal) {
    int training;
    float p;
    if (!mgpu__layer_ok(l, "mgpu_transformer_layer_forward")) return NULL;
    training = l->model->training; p = l->dropout;
    if (l->norm_first) {
        // x = x + dropout1(sa(norm1(x))); x = x + dropout2(ff(norm2(x)))
        x = mgpu_op_add(ctx, x, mgpu__maybe_dropout(ctx, mgpu_mha_forward(ctx, l->self_attn, mgpu_layernorm_forward(ctx, l->norm1, x), causal), p, training));
        return mgpu_op_add(ctx, x, mgpu__maybe_dropout(ctx, mgpu__transformer_ff(ctx, l, mgpu_layernorm_forward(ctx, l->norm2, x)), p, training));
    }
    // x = norm1(x + dropout1(sa(x))); x = norm2(x + dropout2(ff(x)))
    x = mgpu_layernorm_forward(ctx, l->norm1, mgpu_op_add(ctx, x, mgpu__maybe_dropout(ctx, mgpu_mha_forward(ctx, l->self_attn, x, causal), p, training)));
    return mgpu_layernorm_forward(ctx, l->norm2, mgpu_op_add(ctx, x, mgpu__maybe_dropout(ctx, mgpu__transformer_ff(ctx, l, x), p, training)));
}

/* --------------------------------------------------------------------------------------
   Optimizers: torch.optim.SGD / Adam / AdamW (single-tensor path, maximize=False, amsgrad=False)
   -------------------------------------------------------------------------------------- */

/* Elementwise updates split across threads above this many elements (results do not depend on the split). */
#define MGPU__OPT_CHUNK 32768

/* --- multi-tensor CPU twins: each tensor of the list in turn, split over the thread pool --- */

/* What a range function of a multi-tensor CPU twin sees: the twin's arguments and the tensor. */
typedef struct mgpu__list_job { const void *args; int t; } mgpu__list_job;

static void mgpu__cpu_for_each_tensor(mgpu_context *ctx, const mgpu__tensor_list *list, int64_t min_chunk, mgpu_range_fn fn,
                                      const void *args) {
    mgpu__list_job j;
    j.args = args;
    for (j.t = 0; j.t < list->count; j.t++) mgpu_parallel_for(ctx, list->numel[j.t], min_chunk, fn, &j);
}

/* The grads of m's parameters that have one, as the host arrays a multi-tensor twin reads;
   release with mgpu__grad_list_free. */
static mgpu_result mgpu__grad_list_make(const mgpu_model *m, mgpu__tensor_list *list) {
    int i, n = 0;
    float **data = (float **)mgpu__alloc((sizeof(float *) + sizeof(int64_t)) * (size_t)(m->params.count + 1), "the gradient list");
    int64_t *numel;
    if (!data) return mgpu_last_result();
    numel = (int64_t *)(data + m->params.count + 1);
    for (i = 0; i < m->params.count; i++) {
        const mgpu_tensor *g = m->params.items[i].tensor->grad;
        if (!g) continue;
        data[n] = (float *)g->data; numel[n] = g->numel;
        n++;
    }
    list->count = n; list->data = data; list->numel = numel;
    return MGPU_OK;
}
static void mgpu__grad_list_free(mgpu__tensor_list *list) { mgpu_free((void *)list->data); }

typedef struct mgpu__opt_param {
    mgpu_tensor *param;
    mgpu_tensor *exp_avg, *exp_avg_sq;   /* Adam/AdamW */
    mgpu_tensor *momentum_buffer;        /* SGD with momentum != 0 */
    int64_t steps;                       /* updates this parameter has had (PyTorch's per-parameter state["step"]) */
    int due;                             /* still to be updated in the current step */
} mgpu__opt_param;

/* Host arrays (an entry per parameter) that the multi-tensor twins read, refilled for each call:
   one block, params first, which mgpu_free releases. */
typedef struct mgpu__opt_lists {
    float **params, **state1, **state2;  /* state: momentum buffers (SGD) or exp_avg, exp_avg_sq */
    const float **grads;
    int64_t *numel;
} mgpu__opt_lists;

struct mgpu_optimizer {
    mgpu_model *model;
    mgpu_optimizer_desc desc;
    mgpu__opt_param *params; int n_params;
    mgpu__named *states; int n_states;   /* the state tensors under their checkpoint names (owned here) */
    mgpu__opt_lists lists;
    int64_t step_count;
};

MGPU_API mgpu_optimizer_desc mgpu_optimizer_desc_default(mgpu_optimizer_type type) {
    mgpu_optimizer_desc d;
    memset(&d, 0, sizeof d);
    if (type != MGPU_OPTIM_SGD && type != MGPU_OPTIM_ADAM && type != MGPU_OPTIM_ADAMW)
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_desc_default: type %d is not an mgpu_optimizer_type", (int)type);
    d.type = type;
    d.lr = 1e-3f;
    d.beta1 = 0.9f; d.beta2 = 0.999f; d.eps = 1e-8f;
    d.weight_decay = type == MGPU_OPTIM_ADAMW ? 1e-2f : 0.0f;
    return d;
}

/* The checks torch.optim makes in its constructors, naming the field. */
static mgpu_result mgpu__optimizer_desc_check(const mgpu_optimizer_desc *d) {
    const char *fn = "mgpu_optimizer_create";
    if (d->type != MGPU_OPTIM_SGD && d->type != MGPU_OPTIM_ADAM && d->type != MGPU_OPTIM_ADAMW)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->type %d is not an mgpu_optimizer_type", fn, (int)d->type);
    if (!(d->lr >= 0.0f) || !isfinite(d->lr)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: invalid learning rate desc->lr = %g (must be >= 0)", fn, d->lr);
    if (!(d->weight_decay >= 0.0f) || !isfinite(d->weight_decay))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: invalid desc->weight_decay = %g (must be >= 0)", fn, d->weight_decay);
    if (d->type == MGPU_OPTIM_SGD) {
        if (!(d->momentum >= 0.0f) || !isfinite(d->momentum)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: invalid desc->momentum = %g (must be >= 0)", fn, d->momentum);
        if (!isfinite(d->dampening)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: invalid desc->dampening = %g", fn, d->dampening);
        if (d->nesterov && (d->momentum <= 0.0f || d->dampening != 0.0f))
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->nesterov requires desc->momentum > 0 and desc->dampening == 0 (got %g, %g)", fn,
                              d->momentum, d->dampening);
        return MGPU_OK;
    }
    if (!(d->eps >= 0.0f) || !isfinite(d->eps)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: invalid desc->eps = %g (must be >= 0)", fn, d->eps);
    if (!(d->beta1 >= 0.0f && d->beta1 < 1.0f)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: invalid desc->beta1 = %g (must be in [0, 1))", fn, d->beta1);
    if (!(d->beta2 >= 0.0f && d->beta2 < 1.0f)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: invalid desc->beta2 = %g (must be in [0, 1))", fn, d->beta2);
    return MGPU_OK;
}

/* A zeroed state tensor shaped like param i, registered as "<param>.<suffix>". */
static mgpu_tensor *mgpu__optimizer_add_state(mgpu_optimizer *o, int i, const char *suffix) {
    const char *pname = NULL;
    mgpu_tensor *p = mgpu_model_parameter(o->model, i, &pname);
    mgpu_tensor *t;
    char *name = mgpu__join_name(pname, suffix);
    if (!name) return NULL;
    t = mgpu_tensor_create(o->model->ctx, MGPU_F32, p->ndim, p->shape);
    if (!t) { mgpu_free(name); return NULL; }
    o->states[o->n_states].name = name;
    o->states[o->n_states].tensor = t;
    o->n_states++;
    return t;
}

MGPU_API void mgpu_optimizer_destroy(mgpu_optimizer *o) {
    int i;
    if (!o) return;
    for (i = 0; i < o->n_states; i++) { mgpu_tensor_free(o->states[i].tensor); mgpu_free(o->states[i].name); }
    mgpu_free(o->states);
    mgpu_free(o->params);
    mgpu_free(o->lists.params);
    mgpu_free(o);
}

static int mgpu__opt_lists_alloc(mgpu__opt_lists *l, int n) {
    float **block = (float **)mgpu__alloc((4 * sizeof(float *) + sizeof(int64_t)) * (size_t)n, "the optimizer's tensor lists");
    if (!block) return 0;
    l->params = block; l->state1 = block + n; l->state2 = block + 2 * n;
    l->grads = (const float **)(block + 3 * n);
    l->numel = (int64_t *)(block + 4 * n);
    return 1;
}

/* State is allocated up front (zeros) so a checkpoint can be loaded into it before the first step;
   per-parameter step counts tell whether a momentum buffer holds anything yet. */
MGPU_API mgpu_optimizer *mgpu_optimizer_create(mgpu_model *m, const mgpu_optimizer_desc *desc) {
    mgpu_optimizer *o;
    int i, n, per_param, ok = 1;
    if (!m || !desc) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_create: model and desc must not be NULL");
    if (mgpu__optimizer_desc_check(desc) != MGPU_OK) return NULL;
    n = m->params.count;
    if (n == 0) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_create: the model has no parameters");
    /* the multi-tensor twins update F32 parameters where they live: on the host, or in the
       context's device memory (states are created there too, so no update crosses devices) */
    for (i = 0; i < n; i++) {
        const mgpu_tensor *p = m->params.items[i].tensor;
        if (p->dtype != MGPU_F32 || !mgpu__same_device(p->device, m->ctx->device))
            MGPU__FAIL_NULL(MGPU_ERR_UNSUPPORTED, "mgpu_optimizer_create: parameter '%s' is %s on another device than the model's context; "
                            "optimizers update F32 parameters on the context's device", m->params.items[i].name, mgpu_dtype_name(p->dtype));
    }
    per_param = desc->type == MGPU_OPTIM_SGD ? (desc->momentum != 0.0f ? 1 : 0) : 2;
    o = (mgpu_optimizer *)mgpu__calloc(sizeof *o, "an optimizer");
    if (!o) return NULL;
    o->model = m; o->desc = *desc; o->n_params = n;
    o->params = (mgpu__opt_param *)mgpu__calloc(sizeof *o->params * (size_t)n, "the optimizer's parameter list");
    o->states = (mgpu__named *)mgpu__calloc(sizeof *o->states * (size_t)(n * per_param + 1), "the optimizer's state list");
    if (!o->params || !o->states || !mgpu__opt_lists_alloc(&o->lists, n)) { mgpu_optimizer_destroy(o); return NULL; }
    for (i = 0; i < n && ok; i++) {
        o->params[i].param = m->params.items[i].tensor;
        if (per_param == 2) {
            ok = (o->params[i].exp_avg = mgpu__optimizer_add_state(o, i, "exp_avg")) != NULL &&
                 (o->params[i].exp_avg_sq = mgpu__optimizer_add_state(o, i, "exp_avg_sq")) != NULL;
        } else if (per_param == 1) {
            ok = (o->params[i].momentum_buffer = mgpu__optimizer_add_state(o, i, "momentum_buffer")) != NULL;
        }
    }
    if (!ok) { mgpu_optimizer_destroy(o); return NULL; }
    return o;
}

static void mgpu__sgd_range(void *arg, int64_t begin, int64_t end) {
    const mgpu__list_job *j = (const mgpu__list_job *)arg;
    const mgpu__sgd_args *a = (const mgpu__sgd_args *)j->args;
    float *p = a->params.data[j->t], *buf = a->momentum_buffers ? a->momentum_buffers[j->t] : NULL;
    const float *g = a->grads[j->t];
    const float lr = a->lr, weight_decay = a->weight_decay, momentum = a->momentum, keep = a->keep;
    int64_t i;
    for (i = begin; i < end; i++) {
        float d = g[i] + weight_decay * p[i];
        if (buf) {
            float b = a->first ? d : momentum * buf[i] + keep * d;
            buf[i] = b;
            d = a->nesterov ? d + momentum * b : b;
        }
        p[i] -= lr * d;
    }
}
static void mgpu__cpu_sgd(const mgpu__sgd_args *a) { mgpu__cpu_for_each_tensor(a->ctx, &a->params, MGPU__OPT_CHUNK, mgpu__sgd_range, a); }

/* One pass per tensor reading p, g, m, v once. */
static void mgpu__adam_range(void *arg, int64_t begin, int64_t end) {
    const mgpu__list_job *j = (const mgpu__list_job *)arg;
    const mgpu__adam_args *a = (const mgpu__adam_args *)j->args;
    float *P = a->params.data[j->t], *M = a->exp_avg[j->t], *V = a->exp_avg_sq[j->t];
    const float *G = a->grads[j->t];
    const float decay = a->decay, l2 = a->l2, beta1 = a->beta1, beta2 = a->beta2, eps = a->eps;
    const float one_minus_beta1 = 1.0f - beta1, one_minus_beta2 = 1.0f - beta2, step_size = a->step_size, bc2_sqrt = a->bc2_sqrt;
    int64_t i;
    for (i = begin; i < end; i++) {
        float p = P[i];
        float g = G[i] + l2 * p;
        float m = beta1 * M[i] + one_minus_beta1 * g;
        float v = beta2 * V[i] + one_minus_beta2 * g * g;
        float denom = sqrtf(v) / bc2_sqrt + eps;
        M[i] = m; V[i] = v;
        P[i] = p * decay - step_size * m / denom;
    }
}
static void mgpu__cpu_adam(const mgpu__adam_args *a) { mgpu__cpu_for_each_tensor(a->ctx, &a->params, MGPU__OPT_CHUNK, mgpu__adam_range, a); }

/* The values of an update at step count t that change from step to step: SGD {lr, first},
   Adam/AdamW {decay, step_size, bc2_sqrt}. The twins take them by value in an eager step; a
   captured step reads them from step scalars that each replay fills with this function. */
static void mgpu__optimizer_step_values(const mgpu_optimizer *o, int64_t t, float v[3]) {
    const mgpu_optimizer_desc *d = &o->desc;
    if (d->type == MGPU_OPTIM_SGD) {
        v[0] = d->lr; v[1] = t == 1 ? 1.0f : 0.0f; v[2] = 0.0f;
        return;
    }
    v[0] = d->type == MGPU_OPTIM_ADAMW ? (float)(1.0 - (double)d->lr * d->weight_decay) : 1.0f;
    v[1] = (float)((double)d->lr / (1.0 - pow((double)d->beta1, (double)t)));
    v[2] = (float)sqrt(1.0 - pow((double)d->beta2, (double)t));
}

/* One twin call updates the first `count` parameters of the lists, all at step count t; step_at:
   the device address of the step values during a CUDA Graph capture, else NULL. */
static mgpu_result mgpu__optimizer_update(mgpu_optimizer *o, int count, int64_t t, const float *step_at) {
    const mgpu_optimizer_desc *d = &o->desc;
    mgpu_context *ctx = o->model->ctx;
    mgpu__tensor_list params;
    float v[3];
    mgpu__optimizer_step_values(o, t, v);
    memset(&params, 0, sizeof params);   /* copied with its padding into the twin's arguments */
    params.count = count; params.data = o->lists.params; params.numel = o->lists.numel;
    if (d->type == MGPU_OPTIM_SGD) {
        mgpu__sgd_args a;
        memset(&a, 0, sizeof a);   /* padding too: a kernel argument's bytes must not carry stack garbage */
        a.ctx = ctx; a.params = params; a.grads = o->lists.grads;
        a.momentum_buffers = d->momentum != 0.0f ? o->lists.state1 : NULL;
        a.lr = v[0]; a.weight_decay = d->weight_decay; a.momentum = d->momentum; a.keep = 1.0f - d->dampening;
        a.nesterov = d->nesterov; a.first = v[1] != 0.0f;
        a.step_at = step_at;
        return MGPU__TWIN(ctx, sgd, &a);
    } else {
        mgpu__adam_args a;
        int adamw = d->type == MGPU_OPTIM_ADAMW;
        /* padding too: the emulation's check of kernel arguments once read the high half of an old
           pointer left in the padding after bc2_sqrt as an address on another device */
        memset(&a, 0, sizeof a);
        a.ctx = ctx; a.params = params; a.grads = o->lists.grads;
        a.exp_avg = o->lists.state1; a.exp_avg_sq = o->lists.state2;
        a.decay = v[0];
        a.l2 = adamw ? 0.0f : d->weight_decay;
        a.beta1 = d->beta1; a.beta2 = d->beta2; a.eps = d->eps;
        a.step_size = v[1]; a.bc2_sqrt = v[2];
        a.step_at = step_at;
        return MGPU__TWIN(ctx, adam, &a);
    }
}

static float *mgpu__data_or_null(const mgpu_tensor *t) { return t ? (float *)t->data : NULL; }

/* Updates, in one twin call, every parameter still due whose step count becomes t (a capture
   leaves the step counts to the replay hook). */
static mgpu_result mgpu__optimizer_update_at(mgpu_optimizer *o, int64_t t, const float *step_at) {
    mgpu__opt_lists *l = &o->lists;
    int i, count = 0;
    for (i = 0; i < o->n_params; i++) {
        mgpu__opt_param *s = &o->params[i];
        if (!s->due || s->steps + 1 != t) continue;
        s->due = 0;
        if (!step_at) s->steps = t;
        l->params[count] = (float *)s->param->data; l->grads[count] = (const float *)s->param->grad->data;
        l->numel[count] = s->param->numel;
        l->state1[count] = mgpu__data_or_null(s->exp_avg ? s->exp_avg : s->momentum_buffer);
        l->state2[count] = mgpu__data_or_null(s->exp_avg_sq);
        count++;
    }
    return mgpu__optimizer_update(o, count, t, step_at);
}

/* Whether a parameter takes part in this step: like PyTorch, a parameter without a grad is skipped. */
static int mgpu__opt_has_grad(const mgpu__opt_param *s) { return s->param->requires_grad && s->param->grad != NULL; }

/* A captured step's replay hook: the step count of an eager step (every parameter had a grad at
   the capture and shares one count), its update values the step scalars (3 floats in 2 words). */
static mgpu_result mgpu__optimizer_replay(void *opt, int64_t unused, uint64_t *words) {
    mgpu_optimizer *o = (mgpu_optimizer *)opt;
    float v[4] = {0, 0, 0, 0};
    int i;
    (void)unused;
    mgpu__optimizer_step_values(o, o->params[0].steps + 1, v);
    memcpy(words, v, sizeof v);
    for (i = 0; i < o->n_params; i++) o->params[i].steps++;
    o->step_count++;
    return MGPU_OK;
}

/* mgpu_optimizer_step inside a CUDA Graph capture: one update of every parameter, its values from
   step scalars. Parameters without a grad or at different step counts (their updates would need
   several launches chosen on the host each step) are refused: the step then runs uncaptured. */
static mgpu_result mgpu__optimizer_step_captured(mgpu_optimizer *o) {
    void *at = NULL;
    mgpu_result r;
    int i;
    for (i = 0; i < o->n_params; i++) {
        if (!mgpu__opt_has_grad(&o->params[i]) || o->params[i].steps != o->params[0].steps)
            return mgpu__fail(MGPU_ERR_UNSUPPORTED, "CUDA Graph capture: parameter '%s' %s; the optimizer step needs every parameter "
                              "updated at one step count", o->model->params.items[i].name,
                              mgpu__opt_has_grad(&o->params[i]) ? "is at another step count" : "has no grad");
        o->params[i].due = 1;
    }
    if ((r = mgpu__step_scalar(o->model->ctx, mgpu__optimizer_replay, o, 0, 2, &at)) != MGPU_OK) return r;
    return mgpu__optimizer_update_at(o, o->params[0].steps + 1, (const float *)at);
}


/* A parameter skipped for want of a grad lags behind the others in step count (bias correction,
   momentum start), so each twin call covers the parameters that share one: normally all of them. */
MGPU_API mgpu_result mgpu_optimizer_step(mgpu_optimizer *o) {
    mgpu_result r;
    int i;
    if (!o) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_step: optimizer is NULL");
    /* validate every grad first so a bad one leaves all parameters untouched */
    for (i = 0; i < o->n_params; i++) {
        const mgpu__opt_param *s = &o->params[i];
        if (mgpu__opt_has_grad(s) && (s->param->grad->dtype != MGPU_F32 || s->param->grad->numel != s->param->numel))
            return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_optimizer_step: the grad of parameter '%s' is %s %s, expected F32 %s",
                              o->model->params.items[i].name, mgpu_dtype_name(s->param->grad->dtype), mgpu__shape_str(s->param->grad),
                              mgpu__shape_str(s->param));
    }
    if (mgpu__capturing(o->model->ctx)) return mgpu__optimizer_step_captured(o);
    for (i = 0; i < o->n_params; i++) o->params[i].due = mgpu__opt_has_grad(&o->params[i]);
    for (i = 0; i < o->n_params; i++)
        if (o->params[i].due && (r = mgpu__optimizer_update_at(o, o->params[i].steps + 1, NULL)) != MGPU_OK) return r;
    o->step_count++;
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_optimizer_zero_grad(mgpu_optimizer *o) {
    int i;
    if (!o) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_zero_grad: optimizer is NULL");
    for (i = 0; i < o->n_params; i++) mgpu_tensor_zero_grad(o->params[i].param);
    return MGPU_OK;
}

MGPU_API void mgpu_optimizer_set_lr(mgpu_optimizer *o, float lr) {
    if (!o) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_set_lr: optimizer is NULL"); return; }
    if (!(lr >= 0.0f) || !isfinite(lr)) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_set_lr: invalid learning rate %g (kept %g)", lr, o->desc.lr); return; }
    o->desc.lr = lr;
}
MGPU_API float mgpu_optimizer_lr(const mgpu_optimizer *o) { return o ? o->desc.lr : 0.0f; }
MGPU_API int64_t mgpu_optimizer_step_count(const mgpu_optimizer *o) { return o ? o->step_count : 0; }

/* For resuming: every parameter is taken to have had `steps` updates (bias correction, momentum start). */
MGPU_API void mgpu_optimizer_set_step_count(mgpu_optimizer *o, int64_t steps) {
    int i;
    if (!o || steps < 0) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_set_step_count: optimizer is NULL or steps %lld < 0", (long long)steps); return; }
    o->step_count = steps;
    for (i = 0; i < o->n_params; i++) o->params[i].steps = steps;
}

MGPU_API int mgpu_optimizer_num_states(const mgpu_optimizer *o) { return o ? o->n_states : 0; }
MGPU_API mgpu_tensor *mgpu_optimizer_state(const mgpu_optimizer *o, int i, const char **name) {
    if (!o) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_state: optimizer is NULL");
    if (i < 0 || i >= o->n_states) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_state: index %d outside [0, %d)", i, o->n_states);
    if (name) *name = o->states[i].name;
    return o->states[i].tensor;
}

/* --------------------------------------------------------------------------------------
   Gradient clipping by global L2 norm (torch.nn.utils.clip_grad_norm_)
   -------------------------------------------------------------------------------------- */

/* Sums of squares over fixed 32768-element blocks, added in block order: the norm is the same
   bit for bit whatever the thread count. */
#define MGPU__NORM_BLOCK 32768
#define MGPU__NORM_GROUP 64   /* blocks per parallel call (partials live on the stack) */

typedef struct mgpu__sumsq_job { const float *x; int64_t n, first_block; double partial[MGPU__NORM_GROUP]; } mgpu__sumsq_job;

static void mgpu__sumsq_range(void *arg, int64_t begin, int64_t end) {
    mgpu__sumsq_job *j = (mgpu__sumsq_job *)arg;
    int64_t b, i;
    for (b = begin; b < end; b++) {
        int64_t lo = (j->first_block + b) * MGPU__NORM_BLOCK, hi = MGPU__MIN(lo + MGPU__NORM_BLOCK, j->n);
        double s = 0.0;
        for (i = lo; i < hi; i++) s += (double)j->x[i] * (double)j->x[i];
        j->partial[b] = s;
    }
}

static double mgpu__sum_squares(mgpu_context *ctx, const float *x, int64_t n) {
    mgpu__sumsq_job j;
    int64_t blocks = (n + MGPU__NORM_BLOCK - 1) / MGPU__NORM_BLOCK, b, k;
    double total = 0.0;
    j.x = x; j.n = n;
    for (b = 0; b < blocks; b += MGPU__NORM_GROUP) {
        int64_t nb = MGPU__MIN((int64_t)MGPU__NORM_GROUP, blocks - b);
        j.first_block = b;
        mgpu_parallel_for(ctx, nb, 1, mgpu__sumsq_range, &j);
        for (k = 0; k < nb; k++) total += j.partial[k];
    }
    return total;
}

typedef struct mgpu__scale_list_args { const mgpu__tensor_list *list; float s; } mgpu__scale_list_args;
static void mgpu__scale_range(void *arg, int64_t begin, int64_t end) {
    const mgpu__list_job *j = (const mgpu__list_job *)arg;
    const mgpu__scale_list_args *a = (const mgpu__scale_list_args *)j->args;
    float *x = a->list->data[j->t];
    const float s = a->s;
    int64_t i;
    for (i = begin; i < end; i++) x[i] *= s;
}

/* The norm is summed in double and the coefficient taken from it in double, then applied as f32. */
static void mgpu__cpu_clip_grad_norm(const mgpu__clip_grad_norm_args *a) {
    mgpu__scale_list_args scale;
    double sq = 0.0, norm, coef;
    int t;
    for (t = 0; t < a->grads.count; t++) sq += mgpu__sum_squares(a->ctx, a->grads.data[t], a->grads.numel[t]);
    norm = sqrt(sq);
    a->norm[0] = (float)norm;
    coef = (double)a->max_norm / (norm + 1e-6);
    if (!isfinite(norm) || coef >= 1.0) return;
    scale.list = &a->grads; scale.s = (float)coef;
    mgpu__cpu_for_each_tensor(a->ctx, &a->grads, MGPU__OPT_CHUNK, mgpu__scale_range, &scale);
}

/* A non-finite norm is reported as is and the grads are left alone (the step is normally skipped). */
MGPU_API mgpu_result mgpu_clip_grad_norm(mgpu_model *m, float max_norm, float *total_norm) {
    mgpu__clip_grad_norm_args a;
    mgpu_tensor *norm;
    mgpu_result r;
    void *scratch = NULL;
    int i;
    if (!m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_clip_grad_norm: model is NULL");
    if (!(max_norm >= 0.0f) || !isfinite(max_norm)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_clip_grad_norm: max_norm %g must be finite and >= 0", max_norm);
    for (i = 0; i < m->params.count; i++) {
        const mgpu_tensor *p = m->params.items[i].tensor, *g = p->grad;
        if (g && (g->dtype != MGPU_F32 || g->numel != p->numel || !mgpu__same_device(g->device, m->ctx->device)))
            return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_clip_grad_norm: the grad of parameter '%s' is %s %s, expected F32 %s on the model's device",
                              m->params.items[i].name, mgpu_dtype_name(g->dtype), mgpu__shape_str(g), mgpu__shape_str(p));
    }
    norm = mgpu__new_activation(m->ctx, MGPU_F32, 0, NULL);   /* on the device: read back only when asked for */
    if (!norm) return mgpu_last_result();
    if ((r = mgpu__grad_list_make(m, &a.grads)) != MGPU_OK) return r;
    a.ctx = m->ctx; a.max_norm = max_norm; a.norm = (float *)norm->data;
    r = mgpu__cuda_scratch(m->ctx, sizeof(double) * (size_t)MGPU__CLIP_SCRATCH_DOUBLES(a.grads.count), &scratch);
    a.scratch = (double *)scratch;
    if (r == MGPU_OK) r = MGPU__TWIN(m->ctx, clip_grad_norm, &a);
    mgpu__grad_list_free(&a.grads);
    /* the norm stays on the device and the twin applies the coefficient there: only a caller that
       asks for the norm pays a host sync */
    if (r == MGPU_OK && total_norm) *total_norm = (float)mgpu_tensor_item(norm);
    return r;
}

/* --------------------------------------------------------------------------------------
   Learning-rate schedules (pure functions of the step) and scaling rules
   -------------------------------------------------------------------------------------- */

static const double mgpu__pi = 3.14159265358979323846;

/* eta_min + (base - eta_min) * (1 + cos(pi * t / period)) / 2 */
static double mgpu__cosine_lr(double base, double eta_min, double t, double period) {
    return eta_min + (base - eta_min) * (1.0 + cos(mgpu__pi * t / period)) / 2.0;
}

/* CosineAnnealingWarmRestarts at integer step t: cycles of T_0, T_0*T_mult, T_0*T_mult^2, ... */
static double mgpu__cosine_restarts_lr(const mgpu_lr_schedule *s, int64_t t) {
    int64_t period = s->t_0;
    if (s->t_mult == 1) t %= period;
    else
        while (t >= period) {
            t -= period;
            if (period > INT64_MAX / s->t_mult) break;   /* the next cycle could not end within int64 */
            period *= s->t_mult;
        }
    return mgpu__cosine_lr(s->base_lr, s->eta_min, (double)t, (double)period);
}

/* LINEAR and COSINE decay over total_steps - warmup_steps and stay at eta_min afterwards. */
static double mgpu__decay_lr(const mgpu_lr_schedule *s, int64_t t) {
    int64_t span = s->total_steps - s->warmup_steps;
    if (t >= span) return s->eta_min;
    if (s->type == MGPU_SCHEDULE_LINEAR)
        return s->eta_min + ((double)s->base_lr - s->eta_min) * (1.0 - (double)t / (double)span);
    return mgpu__cosine_lr(s->base_lr, s->eta_min, (double)t, (double)span);
}

static mgpu_result mgpu__schedule_check(const mgpu_lr_schedule *s, int64_t step) {
    const char *fn = "mgpu_lr_at";
    if (!s) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: schedule is NULL", fn);
    if (step < 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: step %lld is negative", fn, (long long)step);
    if (s->warmup_steps < 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: warmup_steps %lld is negative", fn, (long long)s->warmup_steps);
    if (!isfinite(s->base_lr) || !isfinite(s->eta_min)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: base_lr %g and eta_min %g must be finite", fn, s->base_lr, s->eta_min);
    switch (s->type) {
    case MGPU_SCHEDULE_CONSTANT: case MGPU_SCHEDULE_LINEAR: case MGPU_SCHEDULE_COSINE: return MGPU_OK;
    case MGPU_SCHEDULE_COSINE_RESTARTS:
        if (s->t_0 < 1 || s->t_mult < 1)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: cosine restarts need t_0 >= 1 and t_mult >= 1 (got %lld, %lld)", fn, (long long)s->t_0, (long long)s->t_mult);
        return MGPU_OK;
    case MGPU_SCHEDULE_STEP:
        if (s->step_size < 1) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: step schedule needs step_size >= 1 (got %lld)", fn, (long long)s->step_size);
        return MGPU_OK;
    }
    return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: schedule type %d is not an mgpu_schedule_type", fn, (int)s->type);
}

/* An invalid schedule records an error and gives 0 (no update rather than a wild one). */
MGPU_API float mgpu_lr_at(const mgpu_lr_schedule *s, int64_t step) {
    int64_t t;
    if (mgpu__schedule_check(s, step) != MGPU_OK) return 0.0f;
    if (step < s->warmup_steps) return (float)((double)s->base_lr * (double)(step + 1) / (double)s->warmup_steps);
    t = step - s->warmup_steps;
    switch (s->type) {
    case MGPU_SCHEDULE_LINEAR: case MGPU_SCHEDULE_COSINE: return (float)mgpu__decay_lr(s, t);
    case MGPU_SCHEDULE_COSINE_RESTARTS: return (float)mgpu__cosine_restarts_lr(s, t);
    case MGPU_SCHEDULE_STEP: return (float)((double)s->base_lr * pow((double)s->gamma, (double)(t / s->step_size)));
    case MGPU_SCHEDULE_CONSTANT: break;
    }
    return s->base_lr;
}

MGPU_API mgpu_result mgpu_schedule_parse(const char *name, mgpu_schedule_type *out) {
    static const char *const names[] = {"constant", "linear", "cosine", "cosine-restarts", "step"};
    int i;
    if (!name || !out) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_schedule_parse: name and out must not be NULL");
    for (i = 0; i < 5; i++)
        if (strcmp(name, names[i]) == 0) { *out = (mgpu_schedule_type)i; return MGPU_OK; }
    return mgpu__fail(MGPU_ERR_INVALID_ARG, "schedule '%s': expected constant, linear, cosine, cosine-restarts or step", name);
}

/* An invalid world size, accumulation count or rule records an error and leaves lr unscaled. */
MGPU_API float mgpu_lr_scale(float lr, int world_size, int grad_accum_steps, mgpu_lr_scaling rule) {
    double k;
    if (world_size < 1 || grad_accum_steps < 1) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_lr_scale: world_size %d and grad_accum_steps %d must be >= 1", world_size, grad_accum_steps);
        return lr;
    }
    k = (double)world_size * (double)grad_accum_steps;
    switch (rule) {
    case MGPU_LR_SCALE_NONE: return lr;
    case MGPU_LR_SCALE_LINEAR: return (float)((double)lr * k);
    case MGPU_LR_SCALE_SQRT: return (float)((double)lr * sqrt(k));
    }
    mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_lr_scale: rule %d is not an mgpu_lr_scaling", (int)rule);
    return lr;
}
