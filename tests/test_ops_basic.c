/* ops_basic: elementwise, activations, losses, dropout, reductions, shape ops and casts.
   Forward values against hand-computed numbers, every backward against finite differences,
   error paths, and bit-identical results across thread counts. */
#include "mgpu_test.h"

static int mt_quick(void) { return getenv("MGPU_TEST_QUICK") != NULL; }
#define MT_MAX(a, b) ((a) > (b) ? (a) : (b))
#define MT_MIN(a, b) ((a) < (b) ? (a) : (b))

static mgpu_tensor *mt_from(mgpu_context *ctx, int ndim, const int64_t *shape, const float *v, int requires_grad) {
    mgpu_tensor *t = mgpu_tensor_from_host(ctx, MGPU_F32, ndim, shape, v);
    if (t) mgpu_tensor_set_requires_grad(t, requires_grad);
    return t;
}
static mgpu_tensor *mt_targets(mgpu_context *ctx, mgpu_dtype dt, int64_t n, const int64_t *v) {
    mgpu_tensor *t = mgpu_tensor_create(ctx, dt, 1, &n);
    int64_t i;
    for (i = 0; t && i < n; i++) {
        if (dt == MGPU_I64) ((int64_t *)t->data)[i] = v[i];
        else ((int32_t *)t->data)[i] = (int32_t)v[i];
    }
    return t;
}
/* |x| in [0.1, 2] with a random sign: keeps relu/elu kinks out of the finite differences. */
static mgpu_tensor *mt_rand_off_zero(mgpu_context *ctx, int ndim, const int64_t *shape) {
    mgpu_tensor *t = mt_rand(ctx, ndim, shape, 0.1, 2.0, 1);
    int64_t i;
    for (i = 0; t && i < t->numel; i++) if (mt_uniform(0, 1) < 0.5) ((float *)t->data)[i] *= -1;
    return t;
}
static int mt_close(double got, double want, double tol) { return fabs(got - want) <= tol * (1 + fabs(want)); }
static float mt_at(const mgpu_tensor *t, int64_t i) { return ((const float *)t->data)[i]; }

/* ---- forward values ---- */

static void test_activation_values(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    int64_t s5[1] = {5};
    float xv[5] = {-1.0f, 0.0f, 0.5f, 1.0f, 2.0f};
    mgpu_tensor *x = mt_from(ctx, 1, s5, xv, 0);
    mgpu_tensor *relu = mgpu_op_relu(ctx, x), *gelu = mgpu_op_gelu(ctx, x), *gt = mgpu_op_gelu_tanh(ctx, x);
    mgpu_tensor *elu = mgpu_op_elu(ctx, x, 1.0f), *elu2 = mgpu_op_elu(ctx, x, 0.5f), *th = mgpu_op_tanh(ctx, x);
    mgpu_tensor *sg = mgpu_op_sigmoid(ctx, x), *sc = mgpu_op_scale(ctx, x, -3.0f), *as = mgpu_op_add_scalar(ctx, x, 0.25f);
    MT_CHECK(relu && gelu && gt && elu && elu2 && th && sg && sc && as, "ops ran: %s", mgpu_last_error());
    if (!(relu && gelu && gt && elu && elu2 && th && sg && sc && as)) goto done;
    MT_CHECK(mt_at(relu, 0) == 0 && mt_at(relu, 2) == 0.5f && mt_at(relu, 4) == 2.0f, "relu");
    MT_CHECK(mt_close(mt_at(gelu, 3), 0.8413447, 1e-6), "gelu(1) = %.8f", mt_at(gelu, 3));
    MT_CHECK(mt_close(mt_at(gelu, 0), -0.1586553, 1e-6), "gelu(-1) = %.8f", mt_at(gelu, 0));
    MT_CHECK(mt_close(mt_at(gt, 3), 0.8411920, 1e-6), "gelu_tanh(1) = %.8f", mt_at(gt, 3));
    MT_CHECK(mt_close(mt_at(elu, 0), -0.6321206, 1e-6), "elu(-1) = %.8f", mt_at(elu, 0));
    MT_CHECK(mt_close(mt_at(elu2, 0), -0.3160603, 1e-6) && mt_at(elu, 4) == 2.0f, "elu alpha 0.5");
    MT_CHECK(mt_close(mt_at(th, 2), 0.46211716, 1e-6), "tanh(0.5) = %.8f", mt_at(th, 2));
    MT_CHECK(mt_at(sg, 1) == 0.5f && mt_close(mt_at(sg, 4), 0.88079708, 1e-6), "sigmoid");
    MT_CHECK(mt_at(sc, 4) == -6.0f && mt_at(as, 0) == -0.75f, "scale, add_scalar");
    {   /* extreme inputs stay finite */
        float big[2] = {-100.0f, 100.0f};
        int64_t s2[1] = {2};
        mgpu_tensor *b = mt_from(ctx, 1, s2, big, 0), *y = mgpu_op_sigmoid(ctx, b);
        MT_CHECK(y && mt_at(y, 0) >= 0 && mt_at(y, 0) < 1e-30 && mt_at(y, 1) == 1.0f, "sigmoid saturates cleanly");
        mgpu_tensor_free(b);
    }
done:
    mgpu_tensor_free(x);
    mgpu_context_destroy(ctx);
}

static void test_softmax_values(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    int64_t s3[1] = {3}, s23[2] = {2, 3};
    float v[3] = {1, 2, 3}, big[6] = {1000, 1001, 1002, -1000, -1000, -1000};
    mgpu_tensor *x = mt_from(ctx, 1, s3, v, 0), *xb = mt_from(ctx, 2, s23, big, 0);
    mgpu_tensor *sm = mgpu_op_softmax(ctx, x, 0), *ls = mgpu_op_log_softmax(ctx, x, -1);
    mgpu_tensor *smb = mgpu_op_softmax(ctx, xb, 1), *sm0 = mgpu_op_softmax(ctx, xb, 0);
    const double want[3] = {0.09003057, 0.24472847, 0.66524096};
    int i;
    MT_CHECK(sm && ls && smb && sm0, "ran: %s", mgpu_last_error());
    if (sm && ls && smb && sm0) {
        for (i = 0; i < 3; i++) {
            MT_CHECK(mt_close(mt_at(sm, i), want[i], 1e-6), "softmax[%d] = %.8f", i, mt_at(sm, i));
            MT_CHECK(mt_close(mt_at(ls, i), log(want[i]), 1e-6), "log_softmax[%d] = %.8f", i, mt_at(ls, i));
            MT_CHECK(mt_close(mt_at(smb, i), want[i], 1e-6), "stable for large logits: %.8f", mt_at(smb, i));
            MT_CHECK(mt_close(mt_at(smb, 3 + i), 1.0 / 3, 1e-6), "uniform row");
            MT_CHECK(mt_at(sm0, i) == 1.0f && mt_at(sm0, 3 + i) == 0.0f, "softmax over dim 0: %g %g", mt_at(sm0, i), mt_at(sm0, 3 + i));
        }
    }
    mgpu_tensor_free(x); mgpu_tensor_free(xb);
    mgpu_context_destroy(ctx);
}

static void test_broadcast_values(void) {
    /* every result element against a naive NumPy-rule index computation */
    static const int nd[4][2] = {{3, 2}, {4, 3}, {1, 3}, {2, 1}};
    static const int64_t sh[4][2][4] = {{{3, 1, 5}, {4, 5}}, {{2, 1, 3, 1}, {4, 1, 6}}, {{1}, {2, 3, 4}}, {{3, 1}, {0}}};
    mgpu_context *ctx = mt_cpu_context(2);
    int c, op;
    for (c = 0; c < 4; c++) {
        mgpu_tensor *a = mt_rand(ctx, nd[c][0], sh[c][0], -2, 2, 0), *b = mt_rand(ctx, nd[c][1], sh[c][1], -2, 2, 0);
        for (op = 0; op < 3; op++) {
            mgpu_tensor *y = op == 0 ? mgpu_op_add(ctx, a, b) : op == 1 ? mgpu_op_sub(ctx, a, b) : mgpu_op_mul(ctx, a, b);
            int64_t i, bad = 0;
            MT_CHECK(y != NULL, "case %d op %d: %s", c, op, mgpu_last_error());
            if (!y) continue;
            MT_CHECK(y->ndim == MT_MAX(a->ndim, b->ndim), "ndim");
            for (i = 0; i < y->numel; i++) {
                int64_t rem = i, ia = 0, ib = 0, sa = 1, sb = 1;
                int d;
                for (d = y->ndim - 1; d >= 0; d--) {
                    int64_t k = rem % y->shape[d], da = d - (y->ndim - a->ndim), db = d - (y->ndim - b->ndim);
                    rem /= y->shape[d];
                    if (da >= 0) { if (a->shape[da] > 1) ia += k * sa; sa *= a->shape[da]; }
                    if (db >= 0) { if (b->shape[db] > 1) ib += k * sb; sb *= b->shape[db]; }
                }
                {
                    float av = mt_at(a, ia), bv = mt_at(b, ib);
                    float want = op == 0 ? av + bv : op == 1 ? av - bv : av * bv;
                    if (mt_at(y, i) != want) bad++;
                }
            }
            MT_CHECK(bad == 0, "case %d op %d: %lld wrong elements", c, op, (long long)bad);
        }
        mgpu_tensor_free(a); mgpu_tensor_free(b);
        mgpu_context_end_step(ctx);
    }
    {
        int64_t s23[2] = {2, 3}, s3[1] = {3};
        float xv[6] = {1, 2, 3, 4, 5, 6}, bv[3] = {10, 20, 30};
        mgpu_tensor *x = mt_from(ctx, 2, s23, xv, 0), *b = mt_from(ctx, 1, s3, bv, 0), *y = mgpu_op_bias_add(ctx, x, b);
        MT_CHECK(y && mt_at(y, 0) == 11 && mt_at(y, 4) == 25 && mt_at(y, 5) == 36, "bias_add values");
        mgpu_tensor_free(x); mgpu_tensor_free(b);
    }
    mgpu_context_destroy(ctx);
}

static void test_loss_values(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    int64_t s23[2] = {2, 3}, s3[1] = {3};
    float lv[6] = {1, 2, 3, 1, 1, 1};
    const int64_t t_both[2] = {2, 0}, t_ign[2] = {2, -100}, t_none[2] = {-100, -100};
    mgpu_tensor *logits = mt_from(ctx, 2, s23, lv, 0);
    mgpu_tensor *t64 = mt_targets(ctx, MGPU_I64, 2, t_both), *t32 = mt_targets(ctx, MGPU_I32, 2, t_both);
    mgpu_tensor *tign = mt_targets(ctx, MGPU_I64, 2, t_ign), *tnone = mt_targets(ctx, MGPU_I32, 2, t_none);
    mgpu_tensor *ce = mgpu_op_cross_entropy(ctx, logits, t64), *ce32 = mgpu_op_cross_entropy(ctx, logits, t32);
    mgpu_tensor *nll = mgpu_op_nll_loss(ctx, mgpu_op_log_softmax(ctx, logits, 1), t64);
    mgpu_tensor *ce_ign = mgpu_op_cross_entropy(ctx, logits, tign), *ce_none = mgpu_op_cross_entropy(ctx, logits, tnone);
    MT_CHECK(ce && ce32 && nll && ce_ign && ce_none, "ran: %s", mgpu_last_error());
    if (ce && ce32 && nll && ce_ign && ce_none) {
        /* row 0: -log softmax([1,2,3])[2]; row 1: log 3 */
        double want = 0.5 * (0.40760596 + 1.09861229);
        MT_CHECK(ce->ndim == 0 && ce->numel == 1, "scalar loss");
        MT_CHECK(mt_close(mt_at(ce, 0), want, 1e-6), "cross_entropy %.8f want %.8f", mt_at(ce, 0), want);
        MT_CHECK(mt_at(ce32, 0) == mt_at(ce, 0), "I32 targets");
        MT_CHECK(mt_close(mt_at(nll, 0), mt_at(ce, 0), 1e-6), "nll(log_softmax) %.8f = ce %.8f", mt_at(nll, 0), mt_at(ce, 0));
        MT_CHECK(mt_close(mt_at(ce_ign, 0), 0.40760596, 1e-6), "ignore_index: mean over 1 row: %.8f", mt_at(ce_ign, 0));
        MT_CHECK(isnan(mt_at(ce_none, 0)), "no counted row: NaN as PyTorch");
    }
    {
        float av[3] = {1, 2, 3}, bv[3] = {1, 0, 0};
        mgpu_tensor *a = mt_from(ctx, 1, s3, av, 0), *b = mt_from(ctx, 1, s3, bv, 0), *m = mgpu_op_mse_loss(ctx, a, b);
        MT_CHECK(m && m->ndim == 0 && mt_close(mt_at(m, 0), 13.0 / 3, 1e-7), "mse %g", m ? mt_at(m, 0) : -1);
        mgpu_tensor_free(a); mgpu_tensor_free(b);
    }
    {   /* backward of the tiny example: (softmax - onehot) / N_valid */
        mgpu_tensor *lg = mt_from(ctx, 2, s23, lv, 1), *loss;
        mgpu_context_end_step(ctx);
        loss = mgpu_op_cross_entropy(ctx, lg, tign);
        MT_CHECK(loss && mgpu_backward(ctx, loss) == MGPU_OK && lg->grad, "backward: %s", mgpu_last_error());
        if (lg->grad) {
            const float *g = (const float *)lg->grad->data;
            MT_CHECK(mt_close(g[0], 0.09003057, 1e-6) && mt_close(g[2], 0.66524096 - 1, 1e-6), "grad row 0: %g %g", g[0], g[2]);
            MT_CHECK(g[3] == 0 && g[4] == 0 && g[5] == 0, "ignored row gets no gradient");
        }
        mgpu_tensor_free(lg);
    }
    mgpu_tensor_free(logits); mgpu_tensor_free(t64); mgpu_tensor_free(t32); mgpu_tensor_free(tign); mgpu_tensor_free(tnone);
    mgpu_context_destroy(ctx);
}

static void test_reduction_values(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    int64_t s23[2] = {2, 3};
    float v[6] = {1, 5, 3, 4, 2, 6};
    mgpu_tensor *x = mt_from(ctx, 2, s23, v, 0);
    mgpu_tensor *s = mgpu_op_sum(ctx, x), *m = mgpu_op_mean(ctx, x);
    mgpu_tensor *s0 = mgpu_op_sum_dim(ctx, x, 0, 0), *s1k = mgpu_op_sum_dim(ctx, x, -1, 1), *m1 = mgpu_op_mean_dim(ctx, x, 1, 0);
    mgpu_tensor *mx0 = mgpu_op_max_dim(ctx, x, 0, 1), *mx1 = mgpu_op_max_dim(ctx, x, 1, 0);
    MT_CHECK(s && m && s0 && s1k && m1 && mx0 && mx1, "ran: %s", mgpu_last_error());
    if (s && m && s0 && s1k && m1 && mx0 && mx1) {
        MT_CHECK(s->ndim == 0 && mt_at(s, 0) == 21 && m->ndim == 0 && mt_at(m, 0) == 3.5f, "sum %g mean %g", mt_at(s, 0), mt_at(m, 0));
        MT_CHECK(s0->ndim == 1 && s0->shape[0] == 3 && mt_at(s0, 0) == 5 && mt_at(s0, 1) == 7 && mt_at(s0, 2) == 9, "sum_dim 0");
        MT_CHECK(s1k->ndim == 2 && s1k->shape[0] == 2 && s1k->shape[1] == 1 && mt_at(s1k, 0) == 9 && mt_at(s1k, 1) == 12, "sum_dim -1 keepdim");
        MT_CHECK(m1->ndim == 1 && mt_close(mt_at(m1, 0), 3, 1e-7) && mt_close(mt_at(m1, 1), 4, 1e-7), "mean_dim");
        MT_CHECK(mx0->ndim == 2 && mx0->shape[0] == 1 && mt_at(mx0, 0) == 4 && mt_at(mx0, 1) == 5 && mt_at(mx0, 2) == 6, "max_dim 0 keepdim");
        MT_CHECK(mx1->ndim == 1 && mt_at(mx1, 0) == 5 && mt_at(mx1, 1) == 6, "max_dim 1");
    }
    {   /* gradient of max goes to the first maximum only */
        float tie[3] = {2, 7, 7};
        int64_t s3[1] = {3};
        mgpu_tensor *t = mt_from(ctx, 1, s3, tie, 1), *y;
        mgpu_context_end_step(ctx);
        y = mgpu_op_max_dim(ctx, t, 0, 0);
        MT_CHECK(y && y->ndim == 0 && mgpu_backward(ctx, y) == MGPU_OK, "max backward: %s", mgpu_last_error());
        if (t->grad) MT_CHECK(mt_at(t->grad, 0) == 0 && mt_at(t->grad, 1) == 1 && mt_at(t->grad, 2) == 0, "first max gets it");
        mgpu_tensor_free(t);
    }
    {   /* accuracy of a long sum: 1e6 values with a large common offset */
        int64_t n = 1000000, i;
        mgpu_tensor *big = mgpu_tensor_create(ctx, MGPU_F32, 1, &n), *sb;
        double ref = 0;
        for (i = 0; i < n; i++) { float f = (float)(1000.0 + mt_uniform(0, 1)); ((float *)big->data)[i] = f; ref += f; }
        mgpu_context_end_step(ctx);
        sb = mgpu_op_sum(ctx, big);
        MT_CHECK(sb && fabs(mt_at(sb, 0) - ref) / ref < 1e-6, "sum of 1e6: %.3f vs %.3f", sb ? mt_at(sb, 0) : 0, ref);
        sb = mgpu_op_mean(ctx, big);
        MT_CHECK(sb && fabs(mt_at(sb, 0) - ref / n) / (ref / n) < 1e-6, "mean of 1e6");
        mgpu_tensor_free(big);
    }
    mgpu_tensor_free(x);
    mgpu_context_destroy(ctx);
}

static void test_shape_values(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    int64_t s234[3] = {2, 3, 4}, s2[2] = {2, 3}, s21[2] = {2, 1}, want_shape[2] = {4, -1};
    float v[24], a6[6] = {1, 2, 3, 4, 5, 6}, b2[2] = {7, 8};
    mgpu_tensor *x, *r, *f, *t, *a, *b, *cat, *nar, *ins[2];
    int i, bad = 0;
    for (i = 0; i < 24; i++) v[i] = (float)i;
    x = mt_from(ctx, 3, s234, v, 0);
    r = mgpu_op_reshape(ctx, x, 2, want_shape);
    MT_CHECK(r && r->ndim == 2 && r->shape[0] == 4 && r->shape[1] == 6, "reshape with -1");
    MT_CHECK(r && r->data == x->data, "reshape is a view sharing data");
    f = mgpu_op_flatten(ctx, x, 1);
    MT_CHECK(f && f->ndim == 2 && f->shape[0] == 2 && f->shape[1] == 12 && f->data == x->data, "flatten(x, 1)");
    f = mgpu_op_flatten(ctx, x, 0);
    MT_CHECK(f && f->ndim == 1 && f->shape[0] == 24, "flatten(x, 0)");
    t = mgpu_op_transpose(ctx, x, 0, 2); /* (4, 3, 2): t[k][j][i] = x[i][j][k] */
    MT_CHECK(t && t->shape[0] == 4 && t->shape[1] == 3 && t->shape[2] == 2, "transpose shape");
    if (t) {
        int ii, j, k;
        for (ii = 0; ii < 2; ii++) for (j = 0; j < 3; j++) for (k = 0; k < 4; k++)
            if (mt_at(t, (k * 3 + j) * 2 + ii) != v[(ii * 3 + j) * 4 + k]) bad++;
        MT_CHECK(bad == 0 && t->data != x->data, "transpose copies values");
    }
    a = mt_from(ctx, 2, s2, a6, 0); b = mt_from(ctx, 2, s21, b2, 0);
    ins[0] = a; ins[1] = b;
    cat = mgpu_op_concat(ctx, ins, 2, -1); /* [[1 2 3 7] [4 5 6 8]] */
    MT_CHECK(cat && cat->shape[0] == 2 && cat->shape[1] == 4 && mt_at(cat, 3) == 7 && mt_at(cat, 4) == 4 && mt_at(cat, 7) == 8, "concat");
    nar = mgpu_op_narrow(ctx, x, 2, 1, 2); /* (2, 3, 2) */
    MT_CHECK(nar && nar->shape[2] == 2 && mt_at(nar, 0) == 1 && mt_at(nar, 1) == 2 && mt_at(nar, 2) == 5 && mt_at(nar, 11) == 22, "narrow");
    nar = mgpu_op_narrow(ctx, x, 0, -1, 1);
    MT_CHECK(nar && nar->shape[0] == 1 && mt_at(nar, 0) == 12, "narrow with negative start");
    {   /* transpose and concat are dtype-agnostic copies */
        mgpu_tensor *h = mgpu_op_cast(ctx, x, MGPU_F16), *ht = mgpu_op_transpose(ctx, h, 1, 2);
        MT_CHECK(ht && ht->dtype == MGPU_F16 && mgpu_f16_to_f32(((uint16_t *)ht->data)[1]) == 4.0f, "F16 transpose");
    }
    mgpu_tensor_free(x); mgpu_tensor_free(a); mgpu_tensor_free(b);
    mgpu_context_destroy(ctx);
}

static void test_cast(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    int64_t s4[1] = {4};
    float v[4] = {1.0001f, 3.14159f, -2.5f, 70000.0f};
    mgpu_tensor *x = mt_from(ctx, 1, s4, v, 0);
    mgpu_tensor *h = mgpu_op_cast(ctx, x, MGPU_F16), *bf = mgpu_op_cast(ctx, x, MGPU_BF16);
    mgpu_tensor *back = mgpu_op_cast(ctx, h, MGPU_F32), *hb = mgpu_op_cast(ctx, h, MGPU_BF16);
    MT_CHECK(h && bf && back && hb, "casts ran: %s", mgpu_last_error());
    if (h && bf && back && hb) {
        const uint16_t *hv = (const uint16_t *)h->data, *bv = (const uint16_t *)bf->data;
        MT_CHECK(h->dtype == MGPU_F16 && hv[0] == 0x3c00 && hv[1] == 0x4248 && hv[3] == 0x7c00, "f16 rounded: %04x %04x %04x", hv[0], hv[1], hv[3]);
        MT_CHECK(bf->dtype == MGPU_BF16 && bv[0] == 0x3f80 && bv[2] == 0xc020, "bf16 rounded: %04x %04x", bv[0], bv[2]);
        MT_CHECK(back->dtype == MGPU_F32 && mt_at(back, 1) == 3.140625f && isinf(mt_at(back, 3)), "back to f32: %g", mt_at(back, 1));
        MT_CHECK(mgpu_bf16_to_f32(((const uint16_t *)hb->data)[2]) == -2.5f, "f16 -> bf16");
    }
    MT_CHECK(mgpu_op_cast(ctx, x, MGPU_F32) == x, "same dtype: no copy");
    mgpu_tensor_free(x);
    mgpu_context_destroy(ctx);
}

static void test_count_correct(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    int64_t s[2] = {3, 2};
    float v[6] = {0.1f, 0.9f, 0.8f, 0.2f, 0.3f, 0.3f};
    const int64_t tv[3] = {1, 1, 0};
    mgpu_tensor *x = mt_from(ctx, 2, s, v, 0), *t64 = mt_targets(ctx, MGPU_I64, 3, tv), *t32 = mt_targets(ctx, MGPU_I32, 3, tv);
    MT_CHECK(mgpu_count_correct(x, t64) == 2, "I64: %lld", (long long)mgpu_count_correct(x, t64));
    MT_CHECK(mgpu_count_correct(x, t32) == 2, "I32 (ties pick the first index)");
    MT_CHECK(mgpu_count_correct(x, NULL) < 0 && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "NULL target");
    MT_CHECK(mgpu_count_correct(t64, t64) < 0 && mgpu_last_result() == MGPU_ERR_SHAPE, "logits must be F32");
    mgpu_tensor_free(x); mgpu_tensor_free(t64); mgpu_tensor_free(t32);
    mgpu_context_destroy(ctx);
}

/* ---- gradient checks ---- */

typedef struct mt_op { int kind; int dim; int keepdim; float p; mgpu_tensor *target; } mt_op;
enum { K_ADD, K_SUB, K_MUL, K_SCALE, K_ADDS, K_BIAS, K_RELU, K_GELU, K_GELUT, K_ELU, K_TANH, K_SIGMOID, K_SOFTMAX, K_LOGSOFTMAX,
       K_NLL, K_CE, K_MSE, K_DROPOUT, K_SUM, K_MEAN, K_SUMDIM, K_MEANDIM, K_MAXDIM, K_RESHAPE, K_FLATTEN, K_TRANSPOSE, K_CONCAT,
       K_NARROW, K_CAST_F16, K_CAST_BF16, K_CHAIN };

static mgpu_tensor *mt_apply(mgpu_context *ctx, mgpu_tensor **in, void *user) {
    const mt_op *o = (const mt_op *)user;
    int64_t rs[2] = {-1, 5}, rows[2] = {3, -1};
    switch (o->kind) {
    case K_ADD: return mgpu_op_add(ctx, in[0], in[1]);
    case K_SUB: return mgpu_op_sub(ctx, in[0], in[1]);
    case K_MUL: return mgpu_op_mul(ctx, in[0], in[1]);
    case K_SCALE: return mgpu_op_scale(ctx, in[0], -1.7f);
    case K_ADDS: return mgpu_op_add_scalar(ctx, in[0], 0.3f);
    case K_BIAS: return mgpu_op_bias_add(ctx, in[0], in[1]);
    case K_RELU: return mgpu_op_relu(ctx, in[0]);
    case K_GELU: return mgpu_op_gelu(ctx, in[0]);
    case K_GELUT: return mgpu_op_gelu_tanh(ctx, in[0]);
    case K_ELU: return mgpu_op_elu(ctx, in[0], 0.8f);
    case K_TANH: return mgpu_op_tanh(ctx, in[0]);
    case K_SIGMOID: return mgpu_op_sigmoid(ctx, in[0]);
    case K_SOFTMAX: return mgpu_op_softmax(ctx, in[0], o->dim);
    case K_LOGSOFTMAX: return mgpu_op_log_softmax(ctx, in[0], o->dim);
    case K_NLL: return mgpu_op_nll_loss(ctx, in[0], o->target);
    case K_CE: return mgpu_op_cross_entropy(ctx, in[0], o->target);
    case K_MSE: return mgpu_op_mse_loss(ctx, in[0], in[1]);
    case K_DROPOUT: return mgpu_op_dropout(ctx, in[0], o->p, 1);
    case K_SUM: return mgpu_op_sum(ctx, in[0]);
    case K_MEAN: return mgpu_op_mean(ctx, in[0]);
    case K_SUMDIM: return mgpu_op_sum_dim(ctx, in[0], o->dim, o->keepdim);
    case K_MEANDIM: return mgpu_op_mean_dim(ctx, in[0], o->dim, o->keepdim);
    case K_MAXDIM: return mgpu_op_max_dim(ctx, in[0], o->dim, o->keepdim);
    case K_RESHAPE: return mgpu_op_reshape(ctx, in[0], 2, rs);
    case K_FLATTEN: return mgpu_op_flatten(ctx, in[0], o->dim);
    case K_TRANSPOSE: return mgpu_op_transpose(ctx, in[0], 0, 2);
    case K_CONCAT: return mgpu_op_concat(ctx, in, 3, o->dim);
    case K_NARROW: return mgpu_op_narrow(ctx, in[0], o->dim, 1, 3);
    case K_CAST_F16: return mgpu_op_cast(ctx, mgpu_op_cast(ctx, in[0], MGPU_F16), MGPU_F32);
    case K_CAST_BF16: return mgpu_op_cast(ctx, mgpu_op_cast(ctx, in[0], MGPU_BF16), MGPU_F32);
    case K_CHAIN: /* a view feeding ops that read it, and one input used twice */
        return mgpu_op_mul(ctx, mgpu_op_reshape(ctx, mgpu_op_tanh(ctx, in[0]), 2, rows), mgpu_op_flatten(ctx, in[0], 1));
    }
    return NULL;
}

static double mt_check_op(mgpu_context *ctx, mt_op *o, mgpu_tensor **in, int n, const char *what) {
    double worst = MT_GRADCHECK(ctx, mt_apply, in, n, o);
    MT_CHECK(worst <= 1, "%s: worst gradient error ratio %g", what, worst);
    return worst;
}

static void test_grad_binary(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    static const int nd[5][2] = {{3, 3}, {3, 2}, {3, 1}, {1, 3}, {4, 3}};
    static const int64_t sh[5][2][4] = {{{3, 5, 7}, {3, 5, 7}}, {{3, 1, 5}, {4, 5}}, {{3, 5, 7}, {1}}, {{1}, {2, 3, 4}}, {{2, 1, 3, 1}, {4, 1, 6}}};
    static const int kinds[3] = {K_ADD, K_SUB, K_MUL};
    int c, k;
    for (c = 0; c < 5; c++) for (k = 0; k < 3; k++) {
        mgpu_tensor *in[2];
        mt_op o;
        char what[64];
        memset(&o, 0, sizeof o);
        o.kind = kinds[k];
        in[0] = mt_rand(ctx, nd[c][0], sh[c][0], -2, 2, 1);
        in[1] = mt_rand(ctx, nd[c][1], sh[c][1], -2, 2, 1);
        snprintf(what, sizeof what, "binary kind %d case %d", o.kind, c);
        mt_check_op(ctx, &o, in, 2, what);
        mgpu_tensor_free(in[0]); mgpu_tensor_free(in[1]);
    }
    {   /* x * x: both operands are the same tensor */
        int64_t s[2] = {3, 4};
        mgpu_tensor *x = mt_rand(ctx, 2, s, -2, 2, 1), *in[2];
        mt_op o;
        memset(&o, 0, sizeof o);
        o.kind = K_MUL; in[0] = x; in[1] = x;
        mt_check_op(ctx, &o, in, 2, "x * x");
        mgpu_tensor_free(x);
    }
    {   /* bias add (3, 5, 7) + (7), and only b requiring grad */
        int64_t sx[3] = {3, 5, 7}, sb[1] = {7};
        mgpu_tensor *in[2];
        mt_op o;
        memset(&o, 0, sizeof o);
        o.kind = K_BIAS;
        in[0] = mt_rand(ctx, 3, sx, -2, 2, 1); in[1] = mt_rand(ctx, 1, sb, -2, 2, 1);
        mt_check_op(ctx, &o, in, 2, "bias_add");
        mgpu_tensor_set_requires_grad(in[0], 0);
        mt_check_op(ctx, &o, in, 2, "bias_add, b only");
        mgpu_tensor_free(in[0]); mgpu_tensor_free(in[1]);
    }
    mgpu_context_destroy(ctx);
}

static void test_grad_unary(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    static const int kinds[8] = {K_SCALE, K_ADDS, K_RELU, K_GELU, K_GELUT, K_ELU, K_TANH, K_SIGMOID};
    int64_t s[3] = {3, 5, 7};
    int k;
    for (k = 0; k < 8; k++) {
        mgpu_tensor *x = mt_rand_off_zero(ctx, 3, s);
        mt_op o;
        char what[32];
        memset(&o, 0, sizeof o);
        o.kind = kinds[k];
        snprintf(what, sizeof what, "unary kind %d", o.kind);
        mt_check_op(ctx, &o, &x, 1, what);
        mgpu_tensor_free(x);
    }
    mgpu_context_destroy(ctx);
}

static void test_grad_softmax(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t s[3] = {3, 5, 7};
    int dims[3] = {0, 1, -1}, i, log;
    for (log = 0; log < 2; log++) for (i = 0; i < 3; i++) {
        mgpu_tensor *x = mt_rand(ctx, 3, s, -2, 2, 1);
        mt_op o;
        char what[48];
        memset(&o, 0, sizeof o);
        o.kind = log ? K_LOGSOFTMAX : K_SOFTMAX; o.dim = dims[i];
        snprintf(what, sizeof what, "%s dim %d", log ? "log_softmax" : "softmax", dims[i]);
        mt_check_op(ctx, &o, &x, 1, what);
        mgpu_tensor_free(x);
    }
    mgpu_context_destroy(ctx);
}

static void test_grad_losses(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t s[2] = {6, 5};
    const int64_t tv[6] = {0, 4, -100, 2, 1, 3};
    mgpu_tensor *t = mt_targets(ctx, MGPU_I64, 6, tv), *x = mt_rand(ctx, 2, s, -2, 2, 1), *y = mt_rand(ctx, 2, s, -2, 2, 1), *in[2];
    mt_op o;
    memset(&o, 0, sizeof o);
    o.target = t;
    o.kind = K_CE; mt_check_op(ctx, &o, &x, 1, "cross_entropy");
    o.kind = K_NLL; mt_check_op(ctx, &o, &x, 1, "nll_loss");
    in[0] = x; in[1] = y;
    o.kind = K_MSE; mt_check_op(ctx, &o, in, 2, "mse_loss");
    o.kind = K_DROPOUT; o.p = 0.3f; mt_check_op(ctx, &o, &x, 1, "dropout");
    mgpu_tensor_free(t); mgpu_tensor_free(x); mgpu_tensor_free(y);
    mgpu_context_destroy(ctx);
}

static void test_grad_reductions(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t s[3] = {3, 5, 7};
    int dims[3] = {0, 1, -1}, i, keep;
    mgpu_tensor *x = mt_rand(ctx, 3, s, -2, 2, 1);
    mt_op o;
    memset(&o, 0, sizeof o);
    o.kind = K_SUM; mt_check_op(ctx, &o, &x, 1, "sum");
    o.kind = K_MEAN; mt_check_op(ctx, &o, &x, 1, "mean");
    for (i = 0; i < 3; i++) for (keep = 0; keep < 2; keep++) {
        o.dim = dims[i]; o.keepdim = keep;
        o.kind = K_SUMDIM; mt_check_op(ctx, &o, &x, 1, "sum_dim");
        o.kind = K_MEANDIM; mt_check_op(ctx, &o, &x, 1, "mean_dim");
    }
    {   /* max: distinct values 0.1 apart so +-eps never changes the argmax */
        int64_t n = x->numel, j;
        for (j = 0; j < n; j++) ((float *)x->data)[j] = (float)(((j * 37) % n) * 0.1 - 5);
        for (i = 0; i < 3; i++) {
            o.kind = K_MAXDIM; o.dim = dims[i]; o.keepdim = i & 1;
            mt_check_op(ctx, &o, &x, 1, "max_dim");
        }
    }
    mgpu_tensor_free(x);
    mgpu_context_destroy(ctx);
}

static void test_grad_shapes(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t s[3] = {3, 5, 7}, s2[3] = {3, 2, 7}, s1[3] = {3, 1, 7};
    mgpu_tensor *x = mt_rand(ctx, 3, s, -2, 2, 1), *in[3];
    mt_op o;
    memset(&o, 0, sizeof o);
    o.kind = K_RESHAPE; mt_check_op(ctx, &o, &x, 1, "reshape");
    o.kind = K_FLATTEN; o.dim = 1; mt_check_op(ctx, &o, &x, 1, "flatten");
    o.kind = K_TRANSPOSE; mt_check_op(ctx, &o, &x, 1, "transpose");
    o.kind = K_NARROW; o.dim = 1; mt_check_op(ctx, &o, &x, 1, "narrow dim 1");
    o.kind = K_NARROW; o.dim = -1; mt_check_op(ctx, &o, &x, 1, "narrow dim -1");
    o.kind = K_CHAIN; mt_check_op(ctx, &o, &x, 1, "tanh/reshape/flatten/mul chain");
    in[0] = x; in[1] = mt_rand(ctx, 3, s2, -2, 2, 1); in[2] = mt_rand(ctx, 3, s1, -2, 2, 1);
    o.kind = K_CONCAT; o.dim = 1; mt_check_op(ctx, &o, in, 3, "concat");
    mgpu_tensor_set_requires_grad(in[1], 0);
    mt_check_op(ctx, &o, in, 3, "concat, one input without grad");
    mgpu_tensor_free(in[1]); mgpu_tensor_free(in[2]);
    {   /* casts: values on a 1/8 grid and a 1/8 step are exact in f16 and bf16, so differences are exact */
        int64_t j;
        double worst;
        for (j = 0; j < x->numel; j++) ((float *)x->data)[j] = (float)((j % 33) - 16) / 8.0f;
        o.kind = K_CAST_F16;
        worst = mt_gradcheck(ctx, mt_apply, &x, 1, &o, 0.125, 2e-2, 2e-3, 64);
        MT_CHECK(worst <= 1, "cast f16: %g", worst);
        o.kind = K_CAST_BF16;
        worst = mt_gradcheck(ctx, mt_apply, &x, 1, &o, 0.125, 2e-2, 2e-3, 64);
        MT_CHECK(worst <= 1, "cast bf16: %g", worst);
    }
    mgpu_tensor_free(x);
    mgpu_context_destroy(ctx);
}

static void test_grad_accumulates(void) {
    /* two backwards add up; an op never overwrites an input's gradient */
    mgpu_context *ctx = mt_cpu_context(1);
    int64_t s[1] = {3};
    float v[3] = {1, -2, 3};
    mgpu_tensor *x = mt_from(ctx, 1, s, v, 1);
    int r;
    for (r = 0; r < 2; r++) {
        MT_CHECK(mgpu_backward(ctx, mgpu_op_sum(ctx, mgpu_op_scale(ctx, x, 2.0f))) == MGPU_OK, "backward %d", r);
        mgpu_context_end_step(ctx);
    }
    MT_CHECK(x->grad && mt_at(x->grad, 0) == 4 && mt_at(x->grad, 2) == 4, "accumulated 2 + 2");
    mgpu_tensor_free(x);
    mgpu_context_destroy(ctx);
}

/* ---- dropout ---- */

static void test_dropout(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t n = mt_quick() ? 20000 : 100000, i, zeros = 0, wrong = 0, same = 0;
    uint64_t seed = 0, off0 = 0, off1 = 0, off2 = 0;
    mgpu_tensor *x = mgpu_tensor_create(ctx, MGPU_F32, 1, &n), *y, *y2, *y3;
    float *keep = (float *)malloc(sizeof(float) * (size_t)n);
    const float p = 0.3f;
    mgpu_tensor_fill(x, 1.0);
    mgpu_context_rng_state(ctx, &seed, &off0);
    y = mgpu_op_dropout(ctx, x, p, 1);
    mgpu_context_rng_state(ctx, NULL, &off1);
    MT_CHECK(y && off1 == off0 + (uint64_t)n, "reserves numel counters: %llu -> %llu", (unsigned long long)off0, (unsigned long long)off1);
    if (!y) { free(keep); mgpu_tensor_free(x); mgpu_context_destroy(ctx); return; }
    for (i = 0; i < n; i++) {
        float v = mt_at(y, i);
        keep[i] = v;
        if (v == 0) zeros++;
        else if (fabsf(v - 1.0f / (1.0f - p)) > 1e-6f) wrong++;
    }
    MT_CHECK(fabs((double)zeros / n - p) < 0.01, "fraction zeroed %g, p %g", (double)zeros / n, p);
    MT_CHECK(wrong == 0, "%lld kept values not scaled by 1/(1-p)", (long long)wrong);
    y2 = mgpu_op_dropout(ctx, x, p, 1); /* offset advanced: a different mask */
    for (i = 0; y2 && i < n; i++) if (mt_at(y2, i) == keep[i]) same++;
    MT_CHECK(y2 && same < n * 0.7, "next mask differs (%lld of %lld equal)", (long long)same, (long long)n);
    mgpu_context_set_rng_state(ctx, seed, off0); /* replaying the state replays the mask */
    y3 = mgpu_op_dropout(ctx, x, p, 1);
    MT_CHECK(y3 && memcmp(y3->data, keep, sizeof(float) * (size_t)n) == 0, "same RNG state, same mask");
    {   /* thread-count independence */
        mgpu_context *one = mt_cpu_context(1);
        mgpu_tensor *y1;
        mgpu_context_set_rng_state(one, seed, off0);
        y1 = mgpu_op_dropout(one, x, p, 1);
        MT_CHECK(y1 && memcmp(y1->data, keep, sizeof(float) * (size_t)n) == 0, "1 thread gives the 2-thread mask");
        mgpu_context_destroy(one);
    }
    mgpu_context_rng_state(ctx, NULL, &off1);
    y = mgpu_op_dropout(ctx, x, p, 0);
    mgpu_context_rng_state(ctx, NULL, &off2);
    MT_CHECK(y && memcmp(y->data, x->data, sizeof(float) * (size_t)n) == 0 && off2 == off1, "eval: identity, no RNG drawn");
    y = mgpu_op_dropout(ctx, x, 0.0f, 1);
    MT_CHECK(y && memcmp(y->data, x->data, sizeof(float) * (size_t)n) == 0, "p = 0: identity");
    y = mgpu_op_dropout(ctx, x, 1.0f, 1);
    for (i = 0, wrong = 0; y && i < n; i++) if (mt_at(y, i) != 0) wrong++;
    MT_CHECK(y && wrong == 0, "p = 1: all zeros");
    MT_CHECK(mgpu_op_dropout(ctx, x, 1.5f, 1) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "p > 1 rejected");
    MT_CHECK(mgpu_op_dropout(ctx, x, -0.1f, 0) == NULL && strstr(mgpu_last_error(), "p") != NULL, "p < 0 rejected");
    MT_CHECK(mgpu_op_dropout(ctx, x, NAN, 1) == NULL, "NaN p rejected");
    free(keep);
    mgpu_tensor_free(x);
    mgpu_context_destroy(ctx);
}

/* ---- errors ---- */

static void test_errors(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    int64_t s34[2] = {3, 4}, s5[1] = {5}, s4[1] = {4}, bad_shape[2] = {5, 5}, two_infer[2] = {-1, -1};
    const int64_t t_bad[3] = {0, 7, 1}, t_ok[3] = {0, 1, 2};
    mgpu_tensor *a = mgpu_tensor_create(ctx, MGPU_F32, 2, s34), *b = mgpu_tensor_create(ctx, MGPU_F32, 1, s5);
    mgpu_tensor *c4 = mgpu_tensor_create(ctx, MGPU_F32, 1, s4), *i32 = mgpu_tensor_create(ctx, MGPU_I32, 2, s34);
    mgpu_tensor *tb = mt_targets(ctx, MGPU_I64, 3, t_bad), *tok = mt_targets(ctx, MGPU_I64, 3, t_ok);
    mgpu_tensor *ins[2];
    MT_CHECK(mgpu_op_add(ctx, a, b) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "non-broadcastable add");
    MT_CHECK(strstr(mgpu_last_error(), "(3, 4)") && strstr(mgpu_last_error(), "(5,)"), "both shapes named: %s", mgpu_last_error());
    MT_CHECK(mgpu_op_mul(ctx, b, a) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "non-broadcastable mul");
    MT_CHECK(mgpu_op_bias_add(ctx, a, b) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "bias of the wrong size");
    MT_CHECK(mgpu_op_mse_loss(ctx, a, c4) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "mse needs equal shapes");
    MT_CHECK(mgpu_op_softmax(ctx, a, 2) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "softmax bad dim");
    MT_CHECK(strstr(mgpu_last_error(), "mgpu_op_softmax") != NULL, "names the op: %s", mgpu_last_error());
    MT_CHECK(mgpu_op_sum_dim(ctx, a, -3, 0) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "sum_dim bad dim");
    MT_CHECK(mgpu_op_max_dim(ctx, a, 5, 0) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "max_dim bad dim");
    MT_CHECK(mgpu_op_transpose(ctx, a, 0, 2) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "transpose bad dim");
    MT_CHECK(mgpu_op_flatten(ctx, a, 2) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "flatten bad dim");
    MT_CHECK(mgpu_op_narrow(ctx, a, 1, 2, 3) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "narrow past the end");
    MT_CHECK(mgpu_op_reshape(ctx, a, 2, bad_shape) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "reshape numel mismatch");
    MT_CHECK(strstr(mgpu_last_error(), "(3, 4)") && strstr(mgpu_last_error(), "(5, 5)"), "both shapes named: %s", mgpu_last_error());
    MT_CHECK(mgpu_op_reshape(ctx, a, 2, two_infer) == NULL, "two -1 rejected");
    MT_CHECK(mgpu_op_relu(ctx, i32) == NULL && mgpu_last_result() != MGPU_OK, "I32 into relu");
    MT_CHECK(strstr(mgpu_last_error(), "I32") != NULL, "names the dtype: %s", mgpu_last_error());
    MT_CHECK(mgpu_op_cast(ctx, a, MGPU_I32) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "cast to I32");
    MT_CHECK(mgpu_op_cross_entropy(ctx, a, tb) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "target out of range");
    MT_CHECK(strstr(mgpu_last_error(), "target[1]") != NULL, "names the row: %s", mgpu_last_error());
    MT_CHECK(mgpu_op_nll_loss(ctx, a, tb) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "nll target out of range");
    ((int64_t *)tb->data)[1] = 4; /* == C: just out of range */
    MT_CHECK(mgpu_op_cross_entropy(ctx, a, tb) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "target == C rejected");
    ((int64_t *)tb->data)[1] = -1;
    MT_CHECK(mgpu_op_nll_loss(ctx, a, tb) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "target -1 rejected");
    MT_CHECK(mgpu_op_cross_entropy(ctx, a, a) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "float target rejected");
    MT_CHECK(mgpu_op_cross_entropy(ctx, b, tok) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "1-d logits rejected");
    ins[0] = a; ins[1] = b;
    MT_CHECK(mgpu_op_concat(ctx, ins, 2, 0) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "concat mismatch");
    MT_CHECK(mgpu_op_concat(ctx, ins, 0, 0) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "concat of nothing");
    /* NULL inputs: NULL out, and the first error stays */
    mgpu_clear_error();
    MT_CHECK(mgpu_op_softmax(ctx, a, 7) == NULL, "first error");
    MT_CHECK(mgpu_op_relu(ctx, NULL) == NULL && mgpu_op_add(ctx, NULL, a) == NULL && mgpu_op_sum(ctx, NULL) == NULL &&
             mgpu_op_reshape(ctx, NULL, 2, s34) == NULL && mgpu_op_cross_entropy(ctx, NULL, tok) == NULL, "NULL in, NULL out");
    MT_CHECK(strstr(mgpu_last_error(), "dim 7") != NULL, "first error kept: %s", mgpu_last_error());
    mgpu_clear_error();
    MT_CHECK(mgpu_op_tanh(ctx, NULL) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "NULL input reported when first");
    MT_CHECK(mgpu_op_tanh(NULL, a) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "NULL ctx");
    mgpu_tensor_free(a); mgpu_tensor_free(b); mgpu_tensor_free(c4); mgpu_tensor_free(i32); mgpu_tensor_free(tb); mgpu_tensor_free(tok);
    mgpu_context_destroy(ctx);
}

/* ---- determinism across thread counts, and speed ---- */

typedef struct mt_run { float loss, sum, sum_dim0; float *grad; double ce_ms; } mt_run;

static void mt_run_big(int threads, int64_t n, int64_t c, const float *logits, const int64_t *target, mt_run *r) {
    mgpu_context *ctx = mt_cpu_context(threads);
    int64_t shape[2] = {n, c};
    mgpu_tensor *x = mt_from(ctx, 2, shape, logits, 1), *t = mt_targets(ctx, MGPU_I64, n, target), *loss, *s, *sd;
    double t0;
    int rep, reps = 3;
    r->ce_ms = 1e30;
    for (rep = 0; rep < reps; rep++) { /* best of a few: forward + backward */
        mgpu_tensor_zero_grad(x);
        t0 = mgpu_time_s();
        loss = mgpu_op_cross_entropy(ctx, x, t);
        if (!loss || mgpu_backward(ctx, loss) != MGPU_OK) break;
        r->ce_ms = MT_MIN(r->ce_ms, 1e3 * (mgpu_time_s() - t0));
        r->loss = mt_at(loss, 0);
        mgpu_context_end_step(ctx);
    }
    if (x->grad) memcpy(r->grad, x->grad->data, sizeof(float) * (size_t)(n * c));
    else memset(r->grad, 0xff, sizeof(float) * (size_t)(n * c));
    s = mgpu_op_sum(ctx, x);
    sd = mgpu_op_sum_dim(ctx, x, 0, 0);
    r->sum = s ? mt_at(s, 0) : NAN;
    r->sum_dim0 = sd ? mt_at(sd, 1) : NAN;
    mgpu_tensor_free(x); mgpu_tensor_free(t);
    mgpu_context_destroy(ctx);
}

static void test_thread_independence(void) {
    int64_t n = mt_quick() ? 512 : 8192, c = mt_quick() ? 100 : 1000, i;
    float *logits = (float *)malloc(sizeof(float) * (size_t)(n * c));
    int64_t *target = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    mt_run r1, r2;
    r1.grad = (float *)malloc(sizeof(float) * (size_t)(n * c));
    r2.grad = (float *)malloc(sizeof(float) * (size_t)(n * c));
    for (i = 0; i < n * c; i++) logits[i] = (float)mt_uniform(-4, 4);
    for (i = 0; i < n; i++) target[i] = i % 17 == 0 ? -100 : (int64_t)(mt_uniform(0, 1) * (double)c);
    mt_run_big(1, n, c, logits, target, &r1);
    mt_run_big(2, n, c, logits, target, &r2);
    MT_CHECK(memcmp(&r1.loss, &r2.loss, sizeof(float)) == 0, "cross_entropy loss 1 vs 2 threads: %.9g %.9g", r1.loss, r2.loss);
    MT_CHECK(memcmp(r1.grad, r2.grad, sizeof(float) * (size_t)(n * c)) == 0, "cross_entropy grads bit-identical");
    MT_CHECK(memcmp(&r1.sum, &r2.sum, sizeof(float)) == 0, "sum 1 vs 2 threads: %.9g %.9g", r1.sum, r2.sum);
    MT_CHECK(memcmp(&r1.sum_dim0, &r2.sum_dim0, sizeof(float)) == 0, "sum_dim 1 vs 2 threads");
    MT_CHECK(r1.loss > 0 && r1.loss < 10, "loss sane: %g", r1.loss);
    printf("  cross_entropy fwd+bwd (%lld, %lld): %.2f ms on 1 thread, %.2f ms on 2 threads\n", (long long)n, (long long)c, r1.ce_ms, r2.ce_ms);
    free(logits); free(target); free(r1.grad); free(r2.grad);
}

int main(void) {
    MT_RUN(test_activation_values);
    MT_RUN(test_softmax_values);
    MT_RUN(test_broadcast_values);
    MT_RUN(test_loss_values);
    MT_RUN(test_reduction_values);
    MT_RUN(test_shape_values);
    MT_RUN(test_cast);
    MT_RUN(test_count_correct);
    MT_RUN(test_grad_binary);
    MT_RUN(test_grad_unary);
    MT_RUN(test_grad_softmax);
    MT_RUN(test_grad_losses);
    MT_RUN(test_grad_reductions);
    MT_RUN(test_grad_shapes);
    MT_RUN(test_grad_accumulates);
    MT_RUN(test_dropout);
    MT_RUN(test_errors);
    MT_RUN(test_thread_independence);
    return MT_END();
}
