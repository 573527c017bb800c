/* Mixed precision: autocast emulated by rounding, and the fp16 loss scaler (GradScaler semantics). */
#include "mgpu_test.h"

static int mt_quick(void) { return getenv("MGPU_TEST_QUICK") != NULL; }

/* ---- reference rounding written independently of the library's converters ---- */

/* Nearest value with `mbits` mantissa bits and minimum normal exponent `emin` (ties to even),
   inf beyond `maxv` (the overflow threshold is max + half an ulp, as IEEE rounding has it). */
static double mt_round_fmt(double v, int mbits, int emin, double maxv) {
    double a = fabs(v), ulp, q, fl;
    int e;
    if (v != v) return v;
    if (a == 0) return v;
    e = (int)floor(log2(a));
    if (e < emin) e = emin;                       /* subnormal grid */
    ulp = ldexp(1.0, e - mbits);
    q = a / ulp;
    fl = floor(q);
    if (q - fl > 0.5 || (q - fl == 0.5 && fmod(fl, 2.0) != 0)) fl += 1;
    a = fl * ulp;
    if (a > maxv) a = INFINITY;
    return v < 0 ? -a : a;
}
static double mt_round_f16(double v) { return mt_round_fmt(v, 10, -14, 65504.0); }
static double mt_round_bf16(double v) { return mt_round_fmt(v, 7, -126, 3.3895313892515355e38); }
static double mt_round_mode(double v, mgpu_amp_mode m) { return m == MGPU_AMP_BF16 ? mt_round_bf16(v) : mt_round_f16(v); }
/* One unit in the last place of the half format at v */
static double mt_ulp_mode(double v, mgpu_amp_mode m) {
    int mbits = m == MGPU_AMP_BF16 ? 7 : 10, emin = m == MGPU_AMP_BF16 ? -126 : -14;
    int e = v == 0 ? emin : (int)floor(log2(fabs(v)));
    return ldexp(1.0, (e < emin ? emin : e) - mbits);
}
static int mt_representable(float v, mgpu_amp_mode m) {
    float r = m == MGPU_AMP_BF16 ? mgpu_bf16_to_f32(mgpu_f32_to_bf16(v)) : mgpu_f16_to_f32(mgpu_f32_to_f16(v));
    return r == v || (r != r && v != v);
}
/* got must be the half-format rounding of the exact value ref (f32 accumulation may move a value
   sitting on a rounding boundary to the neighbour, hence the 1e-5 relative slack). */
static int mt_is_rounded_ref(float got, double ref, mgpu_amp_mode m) {
    return mt_representable(got, m) && fabs((double)got - ref) <= 0.5 * mt_ulp_mode(ref, m) + 1e-5 * fabs(ref);
}
static int mt_same_bits(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

static mgpu_tensor *mt_from(mgpu_context *ctx, int ndim, const int64_t *shape, const float *v, int requires_grad) {
    mgpu_tensor *t = mgpu_tensor_from_host(ctx, MGPU_F32, ndim, shape, v);
    if (t) mgpu_tensor_set_requires_grad(t, requires_grad);
    return t;
}

/* ---- parsing and the context switch ---- */

static void test_parse_and_switch(void) {
    mgpu_amp_mode m = MGPU_AMP_FP16;
    mgpu_context *ctx = mt_cpu_context(1);
    MT_CHECK(mgpu_amp_parse("off", &m) == MGPU_OK && m == MGPU_AMP_OFF, "off");
    MT_CHECK(mgpu_amp_parse("fp16", &m) == MGPU_OK && m == MGPU_AMP_FP16, "fp16");
    MT_CHECK(mgpu_amp_parse("bf16", &m) == MGPU_OK && m == MGPU_AMP_BF16, "bf16");
    MT_CHECK(mgpu_amp_parse("fp8", &m) == MGPU_ERR_INVALID_ARG, "fp8 rejected");
    MT_CHECK(strstr(mgpu_last_error(), "fp8") != NULL, "names the value: %s", mgpu_last_error());
    MT_CHECK(m == MGPU_AMP_BF16, "out untouched on error");
    MT_CHECK(mgpu_amp_parse(NULL, &m) == MGPU_ERR_INVALID_ARG, "NULL text");
    MT_CHECK(mgpu_context_autocast(ctx) == MGPU_AMP_OFF, "off by default");
    mgpu_context_set_autocast(ctx, MGPU_AMP_BF16);
    MT_CHECK(mgpu_context_autocast(ctx) == MGPU_AMP_BF16, "set");
    mgpu_clear_error();
    mgpu_context_set_autocast(ctx, (mgpu_amp_mode)7);
    MT_CHECK(mgpu_last_result() == MGPU_ERR_INVALID_ARG && mgpu_context_autocast(ctx) == MGPU_AMP_BF16, "bad mode rejected, mode kept");
    mgpu_context_destroy(ctx);
}

/* ---- the rounding itself, seen through x (N, 1) @ [[1]] (exact in f32, so y = round(x)) ---- */

static void mt_check_rounding(mgpu_amp_mode mode, const float *vals, int n, const uint32_t *want_bits) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t xs[2] = {n, 1}, os[2] = {1, 1};
    float one = 1.0f;
    mgpu_tensor *x = mt_from(ctx, 2, xs, vals, 0), *w = mt_from(ctx, 2, os, &one, 0), *y;
    int i;
    mgpu_context_set_autocast(ctx, mode);
    y = mgpu_op_matmul(ctx, x, w);
    MT_CHECK(y != NULL, "matmul: %s", mgpu_last_error());
    MT_CHECK(mgpu_context_autocast(ctx) == mode, "autocast restored after the op");
    for (i = 0; y && i < n; i++) {
        float got = ((float *)y->data)[i];
        float lib = mode == MGPU_AMP_BF16 ? mgpu_bf16_to_f32(mgpu_f32_to_bf16(vals[i])) : mgpu_f16_to_f32(mgpu_f32_to_f16(vals[i]));
        uint32_t bits;
        memcpy(&bits, &got, 4);
        MT_CHECK(mt_same_bits(got, lib) || (got != got && lib != lib), "%s %.9g: op %.9g, converter %.9g", mode == MGPU_AMP_BF16 ? "bf16" : "fp16", vals[i], got, lib);
        MT_CHECK(bits == want_bits[i] || (got != got && (want_bits[i] & 0x7fffffffu) > 0x7f800000u),
                 "%.9g -> bits 0x%08x, want 0x%08x", vals[i], (unsigned)bits, (unsigned)want_bits[i]);
        MT_CHECK(got != got || mt_same_bits(got, (float)mt_round_mode(vals[i], mode)), "%.9g vs independent reference %.9g", vals[i], mt_round_mode(vals[i], mode));
        MT_CHECK(mt_same_bits(((float *)x->data)[i], vals[i]), "the input itself is not modified");
    }
    mgpu_tensor_free(x); mgpu_tensor_free(w);
    mgpu_context_destroy(ctx);
}

static void test_round_fp16_bits(void) {
    static const float vals[] = {
        1.0f, 0x1.002p0f, 0x1.006p0f,   /* 1 + 0.5 ulp -> 1 (even), 1 + 1.5 ulp -> 1 + 2 ulp (even) */
        0x1.00ap0f, 0x1.00a008p0f,      /* 1 + 2.5 ulp -> 1 + 2 ulp (even); a hair above -> 1 + 3 ulp */
        0.1f,                           /* (-0 is left out: a GEMM's 0 + -0 gives +0 before any rounding) */
        0x1p-24f,                       /* smallest subnormal */
        0x1.8p-24f,                     /* 1.5 subnormal ulps: tie -> 2 (even) */
        0x1p-25f,                       /* 0.5 subnormal ulp: tie -> 0 (even) */
        0x1.000002p-25f,                /* just above that tie -> smallest subnormal */
        1e-8f,                          /* below half the smallest subnormal -> 0 */
        0x1.ff8p-15f,                   /* largest subnormal, 1023 * 2^-24 */
        65504.0f, 65519.0f,             /* max; still rounds down to max */
        65520.0f, -70000.0f,            /* round past max -> +-inf */
        INFINITY, NAN};
    /* f32 bit patterns of the expected fp16 values */
    static const uint32_t want[] = {
        0x3f800000u, 0x3f800000u, 0x3f804000u, 0x3f804000u, 0x3f806000u, 0x3dccc000u,
        0x33800000u, 0x34000000u, 0x00000000u, 0x33800000u, 0x00000000u, 0x387fc000u,
        0x477fe000u, 0x477fe000u, 0x7f800000u, 0xff800000u, 0x7f800000u, 0x7fc00000u};
    mt_check_rounding(MGPU_AMP_FP16, vals, (int)(sizeof vals / sizeof vals[0]), want);
}

static void test_round_bf16_bits(void) {
    static const float vals[] = {
        1.0f, 1.0f + 1.0f / 256, 1.0f + 3.0f / 256, 0.1f, 1e-8f, -3.0e38f, 3.4028235e38f, 1e-39f, NAN};
    static const uint32_t want[] = {
        0x3f800000u, 0x3f800000u, 0x3f820000u, 0x3dcd0000u, 0x322c0000u, 0xff620000u, 0x7f800000u, 0x000b0000u, 0x7fc00000u};
    mt_check_rounding(MGPU_AMP_BF16, vals, (int)(sizeof vals / sizeof vals[0]), want);
}

/* ---- linear under autocast: forward and backward against a hand-rounded reference ---- */

enum { MT_R = 6, MT_IN = 7, MT_OUT = 5 };

static void mt_check_linear(mgpu_amp_mode mode) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t xs[2] = {MT_R, MT_IN}, ws[2] = {MT_OUT, MT_IN}, bs[1] = {MT_OUT}, ys[2] = {MT_R, MT_OUT};
    mgpu_tensor *x = mt_rand(ctx, 2, xs, -2, 2, 1), *w = mt_rand(ctx, 2, ws, -1, 1, 1), *b = mt_rand(ctx, 1, bs, -1, 1, 1);
    mgpu_tensor *G = mt_rand(ctx, 2, ys, -1e-3, 1e-3, 0), *y, *y32;
    float *X = (float *)x->data, *W = (float *)w->data, *B = (float *)b->data, *g = (float *)G->data;
    float x0[MT_R * MT_IN], w0[MT_OUT * MT_IN];
    int i, o, k, bad_fwd = 0, bad_dw = 0, bad_dx = 0, bad_db = 0, rounded_some = 0;
    const char *name = mode == MGPU_AMP_BF16 ? "bf16" : "fp16";
    memcpy(x0, X, sizeof x0); memcpy(w0, W, sizeof w0);
    y32 = mgpu_op_linear(ctx, x, w, b);
    mgpu_context_set_autocast(ctx, mode);
    y = mgpu_op_linear(ctx, x, w, b);
    MT_CHECK(y && y32 && y->ndim == 2 && y->shape[0] == MT_R && y->shape[1] == MT_OUT, "%s linear: %s", name, mgpu_last_error());
    if (!y || !y32) { mgpu_context_destroy(ctx); return; }
    MT_CHECK(memcmp(x0, X, sizeof x0) == 0 && memcmp(w0, W, sizeof w0) == 0, "master weights and inputs untouched");
    for (i = 0; i < MT_R; i++)
        for (o = 0; o < MT_OUT; o++) {
            double ref = mt_round_mode(B[o], mode);
            float got = ((float *)y->data)[i * MT_OUT + o];
            for (k = 0; k < MT_IN; k++) ref += mt_round_mode(X[i * MT_IN + k], mode) * mt_round_mode(W[o * MT_IN + k], mode);
            if (!mt_is_rounded_ref(got, ref, mode)) { bad_fwd++; fprintf(stderr, "  y[%d,%d] %.9g, reference %.9g\n", i, o, got, ref); }
            if (got != ((float *)y32->data)[i * MT_OUT + o]) rounded_some = 1;
        }
    MT_CHECK(bad_fwd == 0, "%s forward: %d elements differ from the hand-rounded reference", name, bad_fwd);
    MT_CHECK(rounded_some, "%s output differs from f32 somewhere (rounding happened)", name);
    MT_CHECK(mgpu_backward_with_grad(ctx, y, G) == MGPU_OK, "backward: %s", mgpu_last_error());
    /* dW = round(round(G)^T @ round(x)), dX = round(round(G) @ round(W)), db = round(sum_rows round(G)) */
    for (o = 0; o < MT_OUT; o++) {
        double db = 0;
        for (i = 0; i < MT_R; i++) db += mt_round_mode(g[i * MT_OUT + o], mode);
        if (!b->grad || !mt_is_rounded_ref(((float *)b->grad->data)[o], db, mode)) bad_db++;
        for (k = 0; k < MT_IN; k++) {
            double dw = 0;
            for (i = 0; i < MT_R; i++) dw += mt_round_mode(g[i * MT_OUT + o], mode) * mt_round_mode(X[i * MT_IN + k], mode);
            if (!w->grad || !mt_is_rounded_ref(((float *)w->grad->data)[o * MT_IN + k], dw, mode)) bad_dw++;
        }
    }
    for (i = 0; i < MT_R; i++)
        for (k = 0; k < MT_IN; k++) {
            double dx = 0;
            for (o = 0; o < MT_OUT; o++) dx += mt_round_mode(g[i * MT_OUT + o], mode) * mt_round_mode(W[o * MT_IN + k], mode);
            if (!x->grad || !mt_is_rounded_ref(((float *)x->grad->data)[i * MT_IN + k], dx, mode)) bad_dx++;
        }
    MT_CHECK(bad_dw == 0 && bad_dx == 0 && bad_db == 0, "%s grads off the rounded reference: dW %d, dX %d, db %d", name, bad_dw, bad_dx, bad_db);
    mgpu_tensor_free(x); mgpu_tensor_free(w); mgpu_tensor_free(b); mgpu_tensor_free(G);
    mgpu_context_destroy(ctx);
}
static void test_linear_fp16(void) { mt_check_linear(MGPU_AMP_FP16); }
static void test_linear_bf16(void) { mt_check_linear(MGPU_AMP_BF16); }

/* ---- the other autocast ops round too; f32-only ops are left alone ---- */

static int mt_all_representable(const mgpu_tensor *t, mgpu_amp_mode m) {
    int64_t i;
    if (!t) return 0;
    for (i = 0; i < t->numel; i++) if (!mt_representable(((const float *)t->data)[i], m)) return 0;
    return 1;
}
static double mt_max_rel_diff(const mgpu_tensor *a, const mgpu_tensor *b) {
    double worst = 0, scale = 1e-3;
    int64_t i;
    for (i = 0; i < a->numel; i++) scale = fmax(scale, fabs(((const float *)b->data)[i]));
    for (i = 0; i < a->numel; i++) worst = fmax(worst, fabs((double)((const float *)a->data)[i] - ((const float *)b->data)[i]) / scale);
    return worst;
}
/* Runs the op in f32 and in fp16, checks the fp16 output and input grads are fp16 values close to f32. */
typedef mgpu_tensor *(*mt_op3)(mgpu_context *ctx, mgpu_tensor **in);
static mgpu_tensor *mt_conv(mgpu_context *ctx, mgpu_tensor **in) { return mgpu_op_conv2d(ctx, in[0], in[1], in[2], 1, 1); }
static mgpu_tensor *mt_attn(mgpu_context *ctx, mgpu_tensor **in) { return mgpu_op_attention(ctx, in[0], in[1], in[2], 1); }
static mgpu_tensor *mt_bmm(mgpu_context *ctx, mgpu_tensor **in) { return mgpu_op_matmul(ctx, in[0], in[1]); }
static void mt_check_op(const char *name, mt_op3 f, mgpu_tensor **in, int n) {
    mgpu_context *ctx = in[0]->ctx;
    mgpu_tensor *y32, *y16, *G;
    int k;
    mgpu_context_set_autocast(ctx, MGPU_AMP_OFF);
    y32 = f(ctx, in);
    mgpu_context_set_autocast(ctx, MGPU_AMP_FP16);
    y16 = f(ctx, in);
    MT_CHECK(y32 && y16, "%s: %s", name, mgpu_last_error());
    if (!y32 || !y16) return;
    MT_CHECK(mt_all_representable(y16, MGPU_AMP_FP16), "%s output holds fp16 values", name);
    MT_CHECK(!mt_all_representable(y32, MGPU_AMP_FP16), "%s f32 output is not all fp16 (the test would prove nothing)", name);
    MT_CHECK(mt_max_rel_diff(y16, y32) < 4e-3, "%s fp16 vs f32 rel diff %g", name, mt_max_rel_diff(y16, y32));
    G = mt_rand(ctx, y16->ndim, y16->shape, -1, 1, 0);
    MT_CHECK(mgpu_backward_with_grad(ctx, y16, G) == MGPU_OK, "%s backward: %s", name, mgpu_last_error());
    for (k = 0; k < n; k++)
        MT_CHECK(in[k]->grad && mt_all_representable(in[k]->grad, MGPU_AMP_FP16), "%s input %d grad holds fp16 values", name, k);
    mgpu_tensor_free(G);
    mgpu_context_end_step(ctx);
    mgpu_context_set_autocast(ctx, MGPU_AMP_OFF);
}
static void test_other_ops(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t xs[4] = {2, 3, 6, 6}, ws[4] = {4, 3, 3, 3}, bs[1] = {4}, qs[4] = {2, 2, 5, 8}, as[3] = {2, 4, 6}, bm[3] = {2, 6, 3}, ls[2] = {4, 6};
    mgpu_tensor *conv[3], *attn[3], *mm[2], *logits, *sm32, *sm16;
    int k;
    conv[0] = mt_rand(ctx, 4, xs, -1, 1, 1); conv[1] = mt_rand(ctx, 4, ws, -1, 1, 1); conv[2] = mt_rand(ctx, 1, bs, -1, 1, 1);
    for (k = 0; k < 3; k++) attn[k] = mt_rand(ctx, 4, qs, -1, 1, 1);
    mm[0] = mt_rand(ctx, 3, as, -1, 1, 1); mm[1] = mt_rand(ctx, 3, bm, -1, 1, 1);
    mt_check_op("conv2d", mt_conv, conv, 3);
    mt_check_op("attention", mt_attn, attn, 3);
    mt_check_op("batched matmul", mt_bmm, mm, 2);
    /* softmax stays f32 under autocast: bit-identical to the f32 result */
    logits = mt_rand(ctx, 2, ls, -3, 3, 0);
    sm32 = mgpu_op_softmax(ctx, logits, -1);
    mgpu_context_set_autocast(ctx, MGPU_AMP_FP16);
    sm16 = mgpu_op_softmax(ctx, logits, -1);
    MT_CHECK(sm32 && sm16 && memcmp(sm32->data, sm16->data, mgpu_tensor_nbytes(sm32)) == 0, "softmax untouched by autocast");
    /* NULL input: NULL back, error naming the op, autocast still on */
    mgpu_clear_error();
    MT_CHECK(mgpu_op_linear(ctx, NULL, conv[2], NULL) == NULL && strstr(mgpu_last_error(), "mgpu_op_linear") != NULL,
             "NULL x under autocast names the op: %s", mgpu_last_error());
    MT_CHECK(mgpu_context_autocast(ctx) == MGPU_AMP_FP16, "autocast kept after a failed op");
    for (k = 0; k < 3; k++) { mgpu_tensor_free(conv[k]); mgpu_tensor_free(attn[k]); }
    mgpu_tensor_free(mm[0]); mgpu_tensor_free(mm[1]); mgpu_tensor_free(logits);
    mgpu_context_destroy(ctx);
}

/* ---- why fp16 needs the scaler: a 1e-8 gradient through an fp16 linear ---- */

/* loss = 1e-8 * sum(fc(x)) with fc (1 -> 1, no bias) and x = 1: dloss/dw = 1e-8 exactly in f32 */
static float mt_tiny_grad(mgpu_amp_mode mode, int use_scaler) {
    mgpu_context *ctx = mt_cpu_context(1);
    mgpu_model *m = mgpu_model_create(ctx);
    mgpu_linear *fc = mgpu_linear_create(m, "fc", 1, 1, 0);
    int64_t xs[2] = {1, 1};
    float one = 1.0f, g = NAN;
    mgpu_tensor *x = mt_from(ctx, 2, xs, &one, 0), *loss;
    mgpu_grad_scaler s;
    mgpu_grad_scaler_init(&s, use_scaler);
    ((float *)fc->weight->data)[0] = 0.75f;
    mgpu_context_set_autocast(ctx, mode);
    loss = mgpu_op_scale(ctx, mgpu_op_sum(ctx, mgpu_linear_forward(ctx, fc, x)), 1e-8f);
    if (mgpu_backward(ctx, mgpu_grad_scaler_scale(ctx, &s, loss)) == MGPU_OK && mgpu_grad_scaler_unscale(&s, m) == MGPU_OK)
        g = fc->weight->grad ? ((float *)fc->weight->grad->data)[0] : 0.0f;
    else fprintf(stderr, "  tiny grad run failed: %s\n", mgpu_last_error());
    MT_CHECK(!s.found_inf, "no inf in a tiny gradient");
    mgpu_tensor_free(x);
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
    return g;
}
static void test_scaler_rescues_underflow(void) {
    float f32 = mt_tiny_grad(MGPU_AMP_OFF, 0), raw = mt_tiny_grad(MGPU_AMP_FP16, 0), scaled = mt_tiny_grad(MGPU_AMP_FP16, 1);
    float bf = mt_tiny_grad(MGPU_AMP_BF16, 0);
    MT_CHECK(fabsf(f32 - 1e-8f) < 1e-14f, "f32 grad %g", f32);
    MT_CHECK(raw == 0.0f, "fp16 without scaling: 1e-8 underflows to 0, got %g", raw);
    MT_CHECK(fabs(scaled - 1e-8) < 1e-8 * 1e-3, "fp16 with the scaler: %g survives (within fp16 precision)", scaled);
    MT_CHECK(fabs(bf - 1e-8) < 1e-8 * 8e-3, "bf16 needs no scaler: %g", bf);
}

/* ---- scaler bookkeeping on a tiny model ---- */

typedef struct mt_rig { mgpu_context *ctx; mgpu_model *m; mgpu_linear *fc; mgpu_optimizer *opt; } mt_rig;
static mt_rig mt_rig_make(void) {
    mt_rig r;
    mgpu_optimizer_desc od = mgpu_optimizer_desc_default(MGPU_OPTIM_SGD);
    r.ctx = mt_cpu_context(1);
    r.m = mgpu_model_create(r.ctx);
    r.fc = mgpu_linear_create(r.m, "fc", 3, 2, 1);
    od.lr = 0.1f;
    r.opt = mgpu_optimizer_create(r.m, &od);
    return r;
}
static void mt_rig_free(mt_rig *r) { mgpu_optimizer_destroy(r->opt); mgpu_model_destroy(r->m); mgpu_context_destroy(r->ctx); }
/* Every grad set to value * scale, as a scaled backward would leave it. */
static void mt_rig_set_grads(mt_rig *r, float value, float scale) {
    int i;
    mgpu_tensor *ps[2];
    ps[0] = r->fc->weight; ps[1] = r->fc->bias;
    for (i = 0; i < 2; i++) {
        int64_t j;
        if (!ps[i]->grad) ps[i]->grad = mgpu_tensor_create(r->ctx, MGPU_F32, ps[i]->ndim, ps[i]->shape);
        for (j = 0; j < ps[i]->numel; j++) ((float *)ps[i]->grad->data)[j] = value * scale;
    }
}
/* One scaler iteration; poison (inf/NaN or 0 for none) goes into the first weight grad. */
static int mt_rig_step(mt_rig *r, mgpu_grad_scaler *s, float poison) {
    int stepped = -1;
    mt_rig_set_grads(r, 0.25f, s->scale);
    if (poison != 0) ((float *)r->fc->weight->grad->data)[0] = poison;
    MT_CHECK(mgpu_grad_scaler_step(s, r->opt, r->m, &stepped) == MGPU_OK, "step: %s", mgpu_last_error());
    mgpu_grad_scaler_update(s);
    return stepped;
}

static void test_scaler_defaults_and_unscale(void) {
    mt_rig r = mt_rig_make();
    mgpu_grad_scaler s;
    mgpu_grad_scaler_init(&s, 1);
    MT_CHECK(s.enabled && s.scale == 65536.0f && s.growth_factor == 2.0f && s.backoff_factor == 0.5f && s.growth_interval == 2000 &&
             s.growth_tracker == 0 && !s.found_inf && !s.unscaled, "PyTorch GradScaler defaults");
    mt_rig_set_grads(&r, 0.3f, s.scale);
    MT_CHECK(mgpu_grad_scaler_unscale(&s, r.m) == MGPU_OK && s.unscaled && !s.found_inf, "unscale");
    MT_CHECK(((float *)r.fc->weight->grad->data)[5] == 0.3f && ((float *)r.fc->bias->grad->data)[1] == 0.3f, "grads divided by the scale: %g",
             ((float *)r.fc->weight->grad->data)[5]);
    MT_CHECK(mgpu_grad_scaler_unscale(&s, r.m) == MGPU_ERR_STATE, "second unscale before update refused");
    MT_CHECK(((float *)r.fc->weight->grad->data)[5] == 0.3f, "and the grads are not divided twice");
    mgpu_grad_scaler_update(&s);
    MT_CHECK(s.growth_tracker == 1 && !s.unscaled, "update counts a clean step and clears the flags");
    /* errors */
    MT_CHECK(mgpu_grad_scaler_unscale(NULL, r.m) == MGPU_ERR_INVALID_ARG, "NULL scaler");
    MT_CHECK(mgpu_grad_scaler_step(&s, NULL, r.m, NULL) == MGPU_ERR_INVALID_ARG, "NULL optimizer");
    MT_CHECK(mgpu_grad_scaler_scale(r.ctx, &s, NULL) == NULL, "NULL loss");
    {
        mgpu_model *other = mgpu_model_create(r.ctx);
        MT_CHECK(mgpu_grad_scaler_step(&s, r.opt, other, NULL) == MGPU_ERR_INVALID_ARG, "optimizer of another model refused");
        MT_CHECK(strstr(mgpu_last_error(), "another model") != NULL, "message: %s", mgpu_last_error());
        mgpu_model_destroy(other);
    }
    mt_rig_free(&r);
}

static void test_scaler_skips_on_inf(void) {
    mt_rig r = mt_rig_make();
    mgpu_grad_scaler s;
    float w0[6], b0[2];
    float poisons[2];
    int p;
    poisons[0] = INFINITY; poisons[1] = NAN;
    mgpu_grad_scaler_init(&s, 1);
    memcpy(w0, r.fc->weight->data, sizeof w0); memcpy(b0, r.fc->bias->data, sizeof b0);
    for (p = 0; p < 2; p++) {
        float before = s.scale;
        MT_CHECK(mt_rig_step(&r, &s, poisons[p]) == 0, "poisoned step %d skipped", p);
        MT_CHECK(memcmp(w0, r.fc->weight->data, sizeof w0) == 0 && memcmp(b0, r.fc->bias->data, sizeof b0) == 0, "params unchanged");
        MT_CHECK(mgpu_optimizer_step_count(r.opt) == 0, "optimizer step count unchanged: %lld", (long long)mgpu_optimizer_step_count(r.opt));
        MT_CHECK(s.scale == before * 0.5f && s.growth_tracker == 0, "scale halved: %g", (double)s.scale);
    }
    MT_CHECK(mt_rig_step(&r, &s, 0) == 1, "clean step taken");
    MT_CHECK(mgpu_optimizer_step_count(r.opt) == 1, "step count 1");
    /* SGD lr 0.1 on an unscaled grad of 0.25 */
    MT_CHECK(fabsf(((float *)r.fc->weight->data)[3] - (w0[3] - 0.025f)) < 1e-7f, "update used the unscaled grad: %g vs %g",
             ((float *)r.fc->weight->data)[3], w0[3] - 0.025f);
    MT_CHECK(s.scale == 16384.0f && s.growth_tracker == 1, "scale kept, tracker 1");
    mt_rig_free(&r);
}

static void test_scaler_growth(void) {
    mt_rig r = mt_rig_make();
    mgpu_grad_scaler s;
    int i, skipped = 0;
    mgpu_grad_scaler_init(&s, 1);
    for (i = 0; i < 1999; i++) skipped += mt_rig_step(&r, &s, 0) != 1;
    MT_CHECK(skipped == 0 && s.scale == 65536.0f && s.growth_tracker == 1999, "after 1999 clean steps: scale %g tracker %lld", (double)s.scale, (long long)s.growth_tracker);
    mt_rig_step(&r, &s, 0);
    MT_CHECK(s.scale == 131072.0f && s.growth_tracker == 0, "2000 clean steps double it: %g", (double)s.scale);
    MT_CHECK(mgpu_optimizer_step_count(r.opt) == 2000, "2000 optimizer steps: %lld", (long long)mgpu_optimizer_step_count(r.opt));
    /* an inf resets the tracker: 5 clean, 1 inf, then 1999 clean do not grow */
    for (i = 0; i < 5; i++) mt_rig_step(&r, &s, 0);
    MT_CHECK(s.growth_tracker == 5, "tracker 5");
    mt_rig_step(&r, &s, INFINITY);
    MT_CHECK(s.growth_tracker == 0 && s.scale == 65536.0f, "inf: tracker reset, scale halved");
    for (i = 0; i < 1999; i++) mt_rig_step(&r, &s, 0);
    MT_CHECK(s.scale == 65536.0f && s.growth_tracker == 1999, "counting restarted after the inf");
    /* an update without a step in between learns nothing */
    mgpu_grad_scaler_update(&s);
    MT_CHECK(s.scale == 65536.0f && s.growth_tracker == 1999, "update without an inf check keeps the state");
    /* never grows into inf */
    s.scale = 3.0e38f; s.growth_interval = 1;
    mt_rig_step(&r, &s, 0);
    MT_CHECK(s.scale == 3.0e38f && s.growth_tracker == 0, "no growth into inf: %g", (double)s.scale);
    mt_rig_free(&r);
}

static void test_scaler_disabled(void) {
    mt_rig r = mt_rig_make();
    mgpu_grad_scaler s;
    int64_t sh[1] = {1};
    float v = 2.5f;
    mgpu_tensor *loss = mt_from(r.ctx, 1, sh, &v, 1);
    mgpu_grad_scaler_init(&s, 0);
    MT_CHECK(!s.enabled && s.scale == 1.0f, "disabled: scale 1");
    MT_CHECK(mgpu_grad_scaler_scale(r.ctx, &s, loss) == loss, "scale() returns the loss itself");
    MT_CHECK(mt_rig_step(&r, &s, INFINITY) == 1, "never skips, even on inf");
    MT_CHECK(mgpu_optimizer_step_count(r.opt) == 1 && s.scale == 1.0f && s.growth_tracker == 0, "scale stays 1");
    mt_rig_set_grads(&r, 0.5f, 1.0f);
    MT_CHECK(mgpu_grad_scaler_unscale(&s, r.m) == MGPU_OK && ((float *)r.fc->bias->grad->data)[0] == 0.5f, "unscale is a no-op");
    mgpu_tensor_free(loss);
    mt_rig_free(&r);
}

/* A real fp16 overflow (no injection): the scaled gradient 2 * scale passes 65504 and becomes inf
   in the fp16 backward, so the scaler backs off until it fits: 65536 and 32768 overflow, 16384 works. */
static void test_scaler_backs_off_real_overflow(void) {
    mt_rig r = mt_rig_make();
    mgpu_grad_scaler s;
    int64_t xs[2] = {1, 3};
    float xv[3] = {1.0f, 0.5f, -1.0f};
    mgpu_tensor *x = mt_from(r.ctx, 2, xs, xv, 0);
    int it, skips = 0, stepped = 0;
    mgpu_grad_scaler_init(&s, 1);
    mgpu_context_set_autocast(r.ctx, MGPU_AMP_FP16);
    for (it = 0; it < 6 && !stepped; it++) {
        mgpu_tensor *loss = mgpu_op_scale(r.ctx, mgpu_op_sum(r.ctx, mgpu_linear_forward(r.ctx, r.fc, x)), 2.0f);
        mgpu_optimizer_zero_grad(r.opt);
        MT_CHECK(mgpu_backward(r.ctx, mgpu_grad_scaler_scale(r.ctx, &s, loss)) == MGPU_OK, "backward: %s", mgpu_last_error());
        MT_CHECK(mgpu_grad_scaler_step(&s, r.opt, r.m, &stepped) == MGPU_OK, "step");
        if (!stepped) skips++;
        mgpu_grad_scaler_update(&s);
        mgpu_context_end_step(r.ctx);
    }
    MT_CHECK(stepped && skips == 2 && s.scale == 16384.0f, "skips %d, scale %g", skips, (double)s.scale);
    MT_CHECK(fabsf(((float *)r.fc->bias->grad->data)[0] - 2.0f) < 1e-6f, "unscaled bias grad 2, got %g", ((float *)r.fc->bias->grad->data)[0]);
    MT_CHECK(fabsf(((float *)r.fc->weight->grad->data)[1] - 1.0f) < 1e-6f, "unscaled weight grad 1, got %g", ((float *)r.fc->weight->grad->data)[1]);
    mgpu_tensor_free(x);
    mt_rig_free(&r);
}

/* unscale over a gradient big enough for the thread pool finds an inf in its last element */
static void test_unscale_large_threaded(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    mgpu_model *m = mgpu_model_create(ctx);
    int64_t sh[1] = {200003};
    mgpu_tensor *p = mgpu_model_add_parameter(m, "big", MGPU_F32, 1, sh);
    mgpu_grad_scaler s;
    int64_t i;
    int ok = 1;
    p->grad = mgpu_tensor_create(ctx, MGPU_F32, 1, sh);
    for (i = 0; i < sh[0]; i++) ((float *)p->grad->data)[i] = (float)(i % 7) * 65536.0f;
    mgpu_grad_scaler_init(&s, 1);
    MT_CHECK(mgpu_grad_scaler_unscale(&s, m) == MGPU_OK && !s.found_inf, "clean");
    for (i = 0; i < sh[0]; i++) if (((float *)p->grad->data)[i] != (float)(i % 7)) ok = 0;
    MT_CHECK(ok, "every element divided");
    mgpu_grad_scaler_update(&s);
    ((float *)p->grad->data)[sh[0] - 1] = -INFINITY;
    MT_CHECK(mgpu_grad_scaler_unscale(&s, m) == MGPU_OK && s.found_inf, "inf in the last element found");
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
}

/* ---- end to end: a small MLP trains to a similar loss in f32 and in fp16 + scaler ---- */

enum { MT_N = 2048, MT_F = 16, MT_H = 32, MT_C = 4 };

static double mt_train_mlp(mgpu_amp_mode mode, int steps, double *first_loss) {
    mgpu_context *ctx = mt_cpu_context(2);   /* same seed: same init in both runs */
    mgpu_model *m = mgpu_model_create(ctx);
    mgpu_linear *fc1 = mgpu_linear_create(m, "fc1", MT_F, MT_H, 1), *fc2 = mgpu_linear_create(m, "fc2", MT_H, MT_C, 1);
    mgpu_optimizer_desc od = mgpu_optimizer_desc_default(MGPU_OPTIM_ADAM);
    mgpu_optimizer *opt;
    mgpu_grad_scaler s;
    int64_t xs[2] = {MT_N, MT_F}, ys[1] = {MT_N};
    static float X[MT_N * MT_F], teacher[MT_F * MT_C];
    static int64_t Y[MT_N];
    mgpu_tensor *x, *y;
    double tail = 0;
    int i, j, c, step, tail_n = 0;
    uint64_t rng = 99;
    /* synthetic data: labels from a random linear teacher, one in five replaced by noise so the
       loss plateaus well above 0 and the comparison means something */
    for (i = 0; i < MT_F * MT_C; i++) teacher[i] = mgpu_random_normal(rng, (uint64_t)i);
    for (i = 0; i < MT_N; i++) {
        float best = -1e30f;
        for (j = 0; j < MT_F; j++) X[i * MT_F + j] = mgpu_random_normal(rng + 1, (uint64_t)(i * MT_F + j));
        for (c = 0; c < MT_C; c++) {
            float z = 0;
            for (j = 0; j < MT_F; j++) z += X[i * MT_F + j] * teacher[j * MT_C + c];
            if (z > best) { best = z; Y[i] = c; }
        }
        if (mgpu_random_u32(rng + 2, (uint64_t)i) % 5 == 0) Y[i] = mgpu_random_u32(rng + 3, (uint64_t)i) % MT_C;
    }
    x = mgpu_tensor_from_host(ctx, MGPU_F32, 2, xs, X);
    y = mgpu_tensor_from_host(ctx, MGPU_I64, 1, ys, Y);
    od.lr = 1e-2f;
    opt = mgpu_optimizer_create(m, &od);
    mgpu_grad_scaler_init(&s, mode == MGPU_AMP_FP16);
    mgpu_context_set_autocast(ctx, mode);
    for (step = 0; step < steps; step++) {
        mgpu_tensor *loss = mgpu_op_cross_entropy(ctx, mgpu_linear_forward(ctx, fc2, mgpu_op_relu(ctx, mgpu_linear_forward(ctx, fc1, x))), y);
        double lv = loss ? mgpu_tensor_item(loss) : NAN;
        if (step == 0) *first_loss = lv;
        if (step >= steps - 10) { tail += lv; tail_n++; }
        mgpu_optimizer_zero_grad(opt);
        if (mgpu_backward(ctx, mgpu_grad_scaler_scale(ctx, &s, loss)) != MGPU_OK || mgpu_grad_scaler_step(&s, opt, m, NULL) != MGPU_OK) {
            fprintf(stderr, "  training step %d failed: %s\n", step, mgpu_last_error());
            tail = NAN; break;
        }
        mgpu_grad_scaler_update(&s);
        mgpu_context_end_step(ctx);
    }
    if (mode == MGPU_AMP_FP16)
        MT_CHECK(!mt_all_representable(fc1->weight, MGPU_AMP_FP16), "master weights stay f32 (not rounded to fp16)");
    mgpu_tensor_free(x); mgpu_tensor_free(y);
    mgpu_optimizer_destroy(opt); mgpu_model_destroy(m); mgpu_context_destroy(ctx);
    return tail / (tail_n ? tail_n : 1);
}
static void test_mlp_fp16_matches_f32(void) {
    int steps = mt_quick() ? 80 : 200;
    double first32 = 0, first16 = 0, firstbf = 0;
    double l32 = mt_train_mlp(MGPU_AMP_OFF, steps, &first32), l16 = mt_train_mlp(MGPU_AMP_FP16, steps, &first16);
    double lbf = mt_train_mlp(MGPU_AMP_BF16, steps, &firstbf);
    printf("  mlp %d steps: f32 %.6f -> %.6f, fp16+scaler %.6f -> %.6f, bf16 %.6f -> %.6f\n", steps, first32, l32, first16, l16, firstbf, lbf);
    MT_CHECK(first16 != first32 && firstbf != first32, "autocast changed the numbers at all");
    MT_CHECK(l32 < 0.5 * first32, "f32 run learns: %g -> %g", first32, l32);
    MT_CHECK(fabs(l16 - l32) <= 0.1 * l32 + 1e-3, "fp16 final loss %g within 10%% of f32 %g", l16, l32);
    MT_CHECK(fabs(lbf - l32) <= 0.1 * l32 + 1e-3, "bf16 final loss %g within 10%% of f32 %g", lbf, l32);
}

int main(void) {
    MT_RUN(test_parse_and_switch);
    MT_RUN(test_round_fp16_bits);
    MT_RUN(test_round_bf16_bits);
    MT_RUN(test_linear_fp16);
    MT_RUN(test_linear_bf16);
    MT_RUN(test_other_ops);
    MT_RUN(test_scaler_rescues_underflow);
    MT_RUN(test_scaler_defaults_and_unscale);
    MT_RUN(test_scaler_skips_on_inf);
    MT_RUN(test_scaler_growth);
    MT_RUN(test_scaler_disabled);
    MT_RUN(test_scaler_backs_off_real_overflow);
    MT_RUN(test_unscale_large_threaded);
    MT_RUN(test_mlp_fp16_matches_f32);
    return MT_END();
}
