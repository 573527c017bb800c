/* mgpu.h part: amp (inlined into mgpu.h before release)

   Autocast on the CPU emulates half precision by rounding f32 storage to the nearest value the
   half format can hold: a matmul-like op runs as y = round(op(round(x), round(w), round(b))) with
   f32 accumulation inside, and the gradients crossing those roundings are rounded the same way,
   so fp16 underflow and overflow of gradients happen as they would on a GPU. */

MGPU_API mgpu_result mgpu_amp_parse(const char *text, mgpu_amp_mode *out) {
    if (!text || !out) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_amp_parse: text and out must not be NULL");
    if (strcmp(text, "off") == 0) *out = MGPU_AMP_OFF;
    else if (strcmp(text, "fp16") == 0) *out = MGPU_AMP_FP16;
    else if (strcmp(text, "bf16") == 0) *out = MGPU_AMP_BF16;
    else return mgpu__fail(MGPU_ERR_INVALID_ARG, "amp mode '%s': expected off, fp16 or bf16", text);
    return MGPU_OK;
}

static int mgpu__amp_mode_valid(int mode) { return mode == MGPU_AMP_OFF || mode == MGPU_AMP_FP16 || mode == MGPU_AMP_BF16; }

MGPU_API void mgpu_context_set_autocast(mgpu_context *ctx, mgpu_amp_mode mode) {
    if (!ctx) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_context_set_autocast: ctx is NULL"); return; }
    if (!mgpu__amp_mode_valid((int)mode)) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_context_set_autocast: mode %d is not an mgpu_amp_mode (autocast left unchanged)", (int)mode);
        return;
    }
    ctx->autocast = (int)mode;
}
MGPU_API mgpu_amp_mode mgpu_context_autocast(const mgpu_context *ctx) { return ctx ? (mgpu_amp_mode)ctx->autocast : MGPU_AMP_OFF; }

/* --------------------------------------------------------------------------------------
   The "autocast round" op: F32 -> F32 holding values representable in the half format
   -------------------------------------------------------------------------------------- */

#define MGPU__AMP_PAR_MIN 32768 /* elements per chunk before rounding loops go to the thread pool */

static float mgpu__amp_round_value(float v, int mode) {
    return mode == MGPU_AMP_BF16 ? mgpu_bf16_to_f32(mgpu_f32_to_bf16(v)) : mgpu_f16_to_f32(mgpu_f32_to_f16(v));
}

/* dst[i] (+)= round(src[i]) over a range; accumulate for backward, overwrite for forward */
typedef struct mgpu__amp_round_job { const float *src; float *dst; int mode, accumulate; } mgpu__amp_round_job;
static void mgpu__amp_round_range(void *arg, int64_t begin, int64_t end) {
    const mgpu__amp_round_job *j = (const mgpu__amp_round_job *)arg;
    int64_t i;
    if (j->accumulate) for (i = begin; i < end; i++) j->dst[i] += mgpu__amp_round_value(j->src[i], j->mode);
    else for (i = begin; i < end; i++) j->dst[i] = mgpu__amp_round_value(j->src[i], j->mode);
}
static void mgpu__amp_round_array(mgpu_context *ctx, const float *src, float *dst, int64_t n, int mode, int accumulate) {
    mgpu__amp_round_job j;
    j.src = src; j.dst = dst; j.mode = mode; j.accumulate = accumulate;
    mgpu_parallel_for(ctx, n, MGPU__AMP_PAR_MIN, mgpu__amp_round_range, &j);
}

/* iarg[0] = mode; the gradient is rounded like the value (what a half-precision cast does) */
static mgpu_result mgpu__amp_round_backward(mgpu_context *ctx, mgpu__node *node) {
    float *dx;
    MGPU__GRAD_OR_FAIL(dx, ctx, node->in[0]);
    mgpu__amp_round_array(ctx, (const float *)node->out->grad->data, dx, node->out->numel, (int)node->iarg[0], 1);
    return MGPU_OK;
}

/* x rounded to the half format `mode` as a new activation, recorded on the tape. */
static mgpu_tensor *mgpu__amp_round(mgpu_context *ctx, mgpu_tensor *x, int mode) {
    mgpu_tensor *y;
    mgpu__node *node = NULL;
    if (!mgpu__check_input(ctx, "autocast", "input", x, 1)) return NULL;
    y = mgpu__new_activation(ctx, MGPU_F32, x->ndim, x->shape);
    if (!y) return NULL;
    mgpu__amp_round_array(ctx, (const float *)x->data, (float *)y->data, x->numel, mode, 0);
    MGPU__RECORD(ctx, "autocast_round", mgpu__amp_round_backward, y, 1, &x, node);
    if (node) node->iarg[0] = mode;
    return y;
}

/* --------------------------------------------------------------------------------------
   Autocast around a matmul-like op. The op's public entry point does:
       if (mgpu__autocast_active(ctx)) {
           mode = mgpu__autocast_begin(ctx, in, n);   // rounds in[], suspends autocast
           if (mode < 0) return NULL;
           return mgpu__autocast_end(ctx, mode, op(ctx, in...));  // resumes, rounds the output
       }
   Suspending autocast for the inner call keeps ops built from other ops from rounding twice.
   -------------------------------------------------------------------------------------- */

static MGPU__UNUSED int mgpu__autocast_active(const mgpu_context *ctx) { return ctx && ctx->autocast != MGPU_AMP_OFF; }

/* Rounds each usable input in place in `in` (NULL, non-F32 and foreign-device inputs pass through
   untouched so the op itself reports them under its own name). Returns the mode with autocast
   suspended, or -1 (autocast unchanged) when rounding failed. */
static MGPU__UNUSED int mgpu__autocast_begin(mgpu_context *ctx, mgpu_tensor **in, int n) {
    int i, mode = ctx->autocast;
    for (i = 0; i < n; i++) {
        mgpu_tensor *t = in[i];
        if (!t || t->dtype != MGPU_F32 || t->device.type != ctx->device.type || t->device.index != ctx->device.index) continue;
        in[i] = mgpu__amp_round(ctx, t, mode);
        if (!in[i]) return -1;
    }
    ctx->autocast = MGPU_AMP_OFF;
    return mode;
}
/* Restores autocast and rounds the op's output (NULL passes through). */
static MGPU__UNUSED mgpu_tensor *mgpu__autocast_end(mgpu_context *ctx, int mode, mgpu_tensor *out) {
    ctx->autocast = mode;
    return out ? mgpu__amp_round(ctx, out, mode) : NULL;
}

/* --------------------------------------------------------------------------------------
   Loss scaler (torch.cuda.amp.GradScaler)
   -------------------------------------------------------------------------------------- */

MGPU_API void mgpu_grad_scaler_init(mgpu_grad_scaler *s, int enabled) {
    if (!s) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_init: scaler is NULL"); return; }
    memset(s, 0, sizeof *s);
    s->enabled = enabled != 0;
    s->scale = s->enabled ? 65536.0f : 1.0f;
    s->growth_factor = 2.0f;
    s->backoff_factor = 0.5f;
    s->growth_interval = 2000;
}

MGPU_API mgpu_tensor *mgpu_grad_scaler_scale(mgpu_context *ctx, mgpu_grad_scaler *s, mgpu_tensor *loss) {
    if (!s) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_scale: scaler is NULL");
    if (!mgpu__check_input(ctx, "mgpu_grad_scaler_scale", "loss", loss, 1)) return NULL;
    return s->enabled ? mgpu_op_scale(ctx, loss, s->scale) : loss;
}

/* g *= inv over a range, raising found_inf when an element is inf or NaN (checked before scaling, as PyTorch) */
typedef struct mgpu__unscale_job { float *g; float inv; int found_inf; } mgpu__unscale_job;
static void mgpu__unscale_range(void *arg, int64_t begin, int64_t end) {
    mgpu__unscale_job *j = (mgpu__unscale_job *)arg;
    int64_t i;
    int bad = 0;
    for (i = begin; i < end; i++) {
        if (!isfinite(j->g[i])) bad = 1;
        j->g[i] *= j->inv;
    }
    /* a flag only ever set to 1, so the order the chunks finish in cannot change the outcome */
    if (bad) __atomic_store_n(&j->found_inf, 1, __ATOMIC_RELAXED);
}

/* Checks that every parameter gradient of m is an F32 host tensor the scaler can work on. */
static mgpu_result mgpu__scaler_check_grads(const char *fn, mgpu_model *m) {
    int i, n = mgpu_model_num_parameters(m);
    for (i = 0; i < n; i++) {
        const char *name = NULL;
        mgpu_tensor *p = mgpu_model_parameter(m, i, &name);
        if (!p || !p->grad) continue;
        if (p->grad->dtype != MGPU_F32 || p->grad->numel != p->numel)
            return mgpu__fail(MGPU_ERR_SHAPE, "%s: the grad of parameter '%s' is %s %s, expected F32 %s", fn, name ? name : "?",
                              mgpu_dtype_name(p->grad->dtype), mgpu__shape_str(p->grad), mgpu__shape_str(p));
        if (!mgpu__on_host(p->grad))
            return mgpu__fail(MGPU_ERR_UNSUPPORTED, "%s: the grad of parameter '%s' is not on the cpu (CUDA unscaling is not built in)", fn, name ? name : "?");
    }
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_grad_scaler_unscale(mgpu_grad_scaler *s, mgpu_model *m) {
    mgpu__unscale_job j;
    mgpu_result r;
    int i, n;
    if (!s || !m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_unscale: scaler and model must not be NULL");
    if (s->unscaled)
        return mgpu__fail(MGPU_ERR_STATE, "mgpu_grad_scaler_unscale: already called since the last mgpu_grad_scaler_update (the grads would be divided twice)");
    if (!s->enabled) { s->unscaled = 1; return MGPU_OK; }
    if (!(s->scale > 0.0f) || !isfinite(s->scale))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_unscale: scale %g must be positive and finite", (double)s->scale);
    if ((r = mgpu__scaler_check_grads("mgpu_grad_scaler_unscale", m)) != MGPU_OK) return r;
    j.inv = (float)(1.0 / (double)s->scale);   /* as PyTorch: reciprocal in double, applied as f32 */
    j.found_inf = 0;
    n = mgpu_model_num_parameters(m);
    for (i = 0; i < n; i++) {
        mgpu_tensor *p = mgpu_model_parameter(m, i, NULL);
        if (!p || !p->grad) continue;
        j.g = (float *)p->grad->data;
        mgpu_parallel_for(mgpu_model_context(m), p->grad->numel, MGPU__AMP_PAR_MIN, mgpu__unscale_range, &j);
    }
    s->found_inf = j.found_inf;
    s->unscaled = 1;
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_grad_scaler_step(mgpu_grad_scaler *s, mgpu_optimizer *o, mgpu_model *m, int *stepped) {
    mgpu_result r;
    if (stepped) *stepped = 0;
    if (!s || !o || !m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_step: scaler, optimizer and model must not be NULL");
    if (o->model != m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_step: the optimizer was created for another model");
    if (!s->unscaled && (r = mgpu_grad_scaler_unscale(s, m)) != MGPU_OK) return r;
    if (s->enabled && s->found_inf) return MGPU_OK;   /* skipped: parameters and step count untouched */
    if ((r = mgpu_optimizer_step(o)) != MGPU_OK) return r;
    if (stepped) *stepped = 1;
    return MGPU_OK;
}

MGPU_API void mgpu_grad_scaler_update(mgpu_grad_scaler *s) {
    if (!s) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_update: scaler is NULL"); return; }
    /* without an inf check since the last update there is nothing to learn from: keep the scale */
    if (s->enabled && s->unscaled) {
        if (s->found_inf) {
            s->scale *= s->backoff_factor;
            s->growth_tracker = 0;
        } else if (++s->growth_tracker >= s->growth_interval) {
            float grown = s->scale * s->growth_factor;
            if (isfinite(grown)) s->scale = grown;   /* as PyTorch: never grow into inf */
            s->growth_tracker = 0;
        }
    }
    s->found_inf = 0;
    s->unscaled = 0;
}
