/* ======================================================================================
   Mixed precision: autocast
   ====================================================================================== */

/* Autocast on the CPU emulates half precision by rounding f32 storage to the nearest value the
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

static float mgpu__round_half_value(float v, mgpu_dtype half) {
    return half == MGPU_BF16 ? mgpu_bf16_to_f32(mgpu_f32_to_bf16(v)) : mgpu_f16_to_f32(mgpu_f32_to_f16(v));
}
/* The CPU twin of round_half (also DDP's gradient compression): one pass, in place or not. */
static void mgpu__round_half_range(void *arg, int64_t begin, int64_t end) {
    const mgpu__round_half_args *a = (const mgpu__round_half_args *)arg;
    const float *src = a->src, scale = a->scale;
    const mgpu_dtype half = a->half;
    float *dst = a->dst;
    int64_t i;
    if (a->accumulate) for (i = begin; i < end; i++) dst[i] += mgpu__round_half_value(src[i] * scale, half);
    else for (i = begin; i < end; i++) dst[i] = mgpu__round_half_value(src[i] * scale, half);
}
static void mgpu__cpu_round_half(const mgpu__round_half_args *a) {
    mgpu_parallel_for(a->ctx, a->n, MGPU__AMP_PAR_MIN, mgpu__round_half_range, (void *)a);
}

/* dst (+)= src rounded to the half format of autocast `mode`; accumulate for backward */
static mgpu_result mgpu__amp_round_array(mgpu_context *ctx, const float *src, float *dst, int64_t n, int mode, int accumulate) {
    mgpu__round_half_args a;
    a.ctx = ctx; a.half = mode == MGPU_AMP_BF16 ? MGPU_BF16 : MGPU_F16; a.scale = 1.0f; a.accumulate = accumulate;
    a.src = src; a.dst = dst; a.n = n;
    return MGPU__TWIN(ctx, round_half, &a);
}

/* iarg[0] = mode; the gradient is rounded like the value (what a half-precision cast does) */
static mgpu_result mgpu__amp_round_backward(mgpu_context *ctx, mgpu__node *node) {
    float *dx;
    MGPU__GRAD_OR_FAIL(dx, ctx, node->in[0]);
    return mgpu__amp_round_array(ctx, (const float *)node->out->grad->data, dx, node->out->numel, (int)node->iarg[0], 1);
}

/* x rounded to the half format `mode` as a new activation, recorded on the tape. */
static mgpu_tensor *mgpu__amp_round(mgpu_context *ctx, mgpu_tensor *x, int mode) {
    mgpu_tensor *y;
    mgpu__node *node = NULL;
    if (!mgpu__check_input(ctx, "autocast", "input", x, 1)) return NULL;
    y = mgpu__new_activation(ctx, MGPU_F32, x->ndim, x->shape);
    if (!y) return NULL;
    if (mgpu__amp_round_array(ctx, (const float *)x->data, (float *)y->data, x->numel, mode, 0) != MGPU_OK) return NULL;
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
    ctx->autocast_inside = mode;
    return mode;
}
/* Restores autocast and rounds the op's output (NULL passes through). */
static MGPU__UNUSED mgpu_tensor *mgpu__autocast_end(mgpu_context *ctx, int mode, mgpu_tensor *out) {
    ctx->autocast = mode;
    ctx->autocast_inside = MGPU_AMP_OFF;
    return out ? mgpu__amp_round(ctx, out, mode) : NULL;
}
/* The half format the GEMMs of the op autocast is running multiply in (mgpu__gemm_args.half_compute):
   on a GPU that is real fp16/bf16 on tensor cores; the CPU multiplies the same rounded values in f32. */
static MGPU__UNUSED mgpu_dtype mgpu__autocast_gemm_dtype(const mgpu_context *ctx) {
    if (ctx->autocast_inside == MGPU_AMP_BF16) return MGPU_BF16;
    return ctx->autocast_inside == MGPU_AMP_FP16 ? MGPU_F16 : MGPU_F32;
}

