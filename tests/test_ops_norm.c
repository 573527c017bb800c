/* Layer norm, batch norm, embedding and attention: forward values against hand-computed or
   double-precision references (PyTorch's formulas), finite-difference gradients, running-stat
   updates, thread-count independence and error handling. */
#include "mgpu_test.h"

static int quick(void) {
    const char *q = getenv("MGPU_TEST_QUICK");
    return q && *q && strcmp(q, "0") != 0;
}

static float *f32(mgpu_tensor *t) { return (float *)t->data; }

static mgpu_tensor *mt_const(mgpu_context *ctx, int ndim, const int64_t *shape, const float *vals) {
    return mgpu_tensor_from_host(ctx, MGPU_F32, ndim, shape, vals);
}

/* I32 or I64 index tensor from int64 values. */
static mgpu_tensor *mt_index(mgpu_context *ctx, mgpu_dtype dt, int ndim, const int64_t *shape, const int64_t *vals) {
    mgpu_tensor *t = mgpu_tensor_create(ctx, dt, ndim, shape);
    int64_t i;
    if (!t) return NULL;
    for (i = 0; i < t->numel; i++) {
        if (dt == MGPU_I64) ((int64_t *)t->data)[i] = vals[i];
        else ((int32_t *)t->data)[i] = (int32_t)vals[i];
    }
    return t;
}

static int bits_equal(const mgpu_tensor *a, const mgpu_tensor *b) {
    return a && b && a->numel == b->numel && memcmp(a->data, b->data, mgpu_tensor_nbytes(a)) == 0;
}

/* ---------------------------------------------------------------- layer norm */

typedef struct { float eps; } ln_user;
static mgpu_tensor *ln_fn(mgpu_context *ctx, mgpu_tensor **in, void *user) {
    return mgpu_op_layer_norm(ctx, in[0], in[1], in[2], ((ln_user *)user)->eps);
}

static void test_layer_norm_stats(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t shape[2] = {6, 37};
    mgpu_tensor *x = mt_rand(ctx, 2, shape, -3, 5, 0);
    mgpu_tensor *y = mgpu_op_layer_norm(ctx, x, NULL, NULL, 1e-5f);
    int64_t r, c;
    MT_CHECK(y && mgpu_tensor_same_shape(x, y), "output shape");
    for (r = 0; y && r < 6; r++) {
        double m = 0, v = 0;
        for (c = 0; c < 37; c++) m += f32(y)[r * 37 + c];
        m /= 37;
        for (c = 0; c < 37; c++) v += (f32(y)[r * 37 + c] - m) * (f32(y)[r * 37 + c] - m);
        v /= 37;
        MT_CHECK(fabs(m) < 1e-5, "row %lld mean %g", (long long)r, m);
        MT_CHECK(fabs(v - 1) < 1e-3, "row %lld variance %g", (long long)r, v);
    }
    mgpu_tensor_free(x);
    mgpu_context_destroy(ctx);
}

static void test_layer_norm_affine_values(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    int64_t sx[2] = {2, 4}, sc[1] = {4};
    float xv[8] = {1, 2, 3, 4, -2, 0, 0, 6}, wv[4] = {1, 2, 0.5f, -1}, bv[4] = {0, 1, 2, 3};
    mgpu_tensor *x = mt_const(ctx, 2, sx, xv), *w = mt_const(ctx, 1, sc, wv), *b = mt_const(ctx, 1, sc, bv);
    mgpu_tensor *y = mgpu_op_layer_norm(ctx, x, w, b, 0.1f);
    /* row 0: mean 2.5, biased var 1.25; row 1: mean 1, var (9 + 1 + 1 + 25) / 4 = 9 */
    double mean[2] = {2.5, 1}, var[2] = {1.25, 9};
    int r, c;
    MT_CHECK(y != NULL, "forward: %s", mgpu_last_error());
    for (r = 0; y && r < 2; r++)
        for (c = 0; c < 4; c++) {
            double want = (xv[r * 4 + c] - mean[r]) / sqrt(var[r] + 0.1) * wv[c] + bv[c];
            MT_CHECK(fabs(f32(y)[r * 4 + c] - want) < 1e-5, "y[%d,%d] %g want %g", r, c, f32(y)[r * 4 + c], want);
        }
    mgpu_tensor_free(x); mgpu_tensor_free(w); mgpu_tensor_free(b);
    mgpu_context_destroy(ctx);
}

static void check_ln_grad(int ndim, const int64_t *shape, int with_w, int with_b) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t sc[1];
    mgpu_tensor *in[3];
    ln_user u;
    double worst;
    sc[0] = shape[ndim - 1];
    in[0] = mt_rand(ctx, ndim, shape, -2, 2, 1);
    in[1] = with_w ? mt_rand(ctx, 1, sc, 0.5, 1.5, 1) : NULL;
    in[2] = with_b ? mt_rand(ctx, 1, sc, -1, 1, 1) : NULL;
    u.eps = 1e-5f;
    worst = MT_GRADCHECK(ctx, ln_fn, in, 3, &u);
    MT_CHECK(worst <= 1, "layer_norm %dd (C=%lld) w=%d b=%d: worst ratio %g", ndim, (long long)sc[0], with_w, with_b, worst);
    mgpu_tensor_free(in[0]); mgpu_tensor_free(in[1]); mgpu_tensor_free(in[2]);
    mgpu_context_destroy(ctx);
}

static void test_layer_norm_grad(void) {
    int64_t s3[3] = {3, 5, 7}, s2[2] = {5, 13}, s1[1] = {11}, big[2] = {300, 131};
    check_ln_grad(3, s3, 1, 1);
    check_ln_grad(2, s2, 0, 0);
    check_ln_grad(1, s1, 1, 0);
    check_ln_grad(2, s2, 0, 1);
    if (!quick()) check_ln_grad(2, big, 1, 1);   /* large enough to run threaded */
}

/* Forward and all gradients of one (x, w, b) graph at a given thread count. */
static void ln_run(int threads, int64_t rows, int64_t cols, mgpu_tensor **y_out, mgpu_tensor **grads) {
    mgpu_context *ctx = mt_cpu_context(threads);
    int64_t sx[2], sc[1];
    mgpu_tensor *x, *w, *b, *y, *g;
    sx[0] = rows; sx[1] = cols; sc[0] = cols;
    mt_rng_state = 99;
    x = mt_rand(ctx, 2, sx, -2, 2, 1);
    w = mt_rand(ctx, 1, sc, 0.5, 1.5, 1);
    b = mt_rand(ctx, 1, sc, -1, 1, 1);
    g = mt_rand(ctx, 2, sx, -1, 1, 0);
    y = mgpu_op_layer_norm(ctx, x, w, b, 1e-5f);
    *y_out = y ? mgpu_tensor_create(ctx, MGPU_F32, 2, sx) : NULL;
    if (y) mgpu_tensor_copy(*y_out, y);
    if (y) mgpu_backward_with_grad(ctx, y, g);
    grads[0] = x->grad; grads[1] = w->grad; grads[2] = b->grad;
    x->grad = w->grad = b->grad = NULL;   /* keep the grads past the tensors */
    mgpu_tensor_free(x); mgpu_tensor_free(w); mgpu_tensor_free(b); mgpu_tensor_free(g);
    mgpu_context_destroy(ctx);   /* the grads and the copy are persistent tensors */
}

static void test_layer_norm_threads(void) {
    int64_t rows = quick() ? 600 : 2000, cols = 257;   /* several row blocks of the backward */
    mgpu_tensor *y1, *y2, *g1[3], *g2[3];
    int i;
    ln_run(1, rows, cols, &y1, g1);
    ln_run(2, rows, cols, &y2, g2);
    MT_CHECK(bits_equal(y1, y2), "forward identical for 1 and 2 threads");
    for (i = 0; i < 3; i++) MT_CHECK(bits_equal(g1[i], g2[i]), "grad %d identical for 1 and 2 threads", i);
    mgpu_tensor_free(y1); mgpu_tensor_free(y2);
    for (i = 0; i < 3; i++) { mgpu_tensor_free(g1[i]); mgpu_tensor_free(g2[i]); }
}

/* ---------------------------------------------------------------- batch norm */

typedef struct { int training; mgpu_tensor *rm, *rv; } bn_user;
static mgpu_tensor *bn_fn(mgpu_context *ctx, mgpu_tensor **in, void *user) {
    bn_user *u = (bn_user *)user;
    return mgpu_op_batch_norm(ctx, in[0], in[1], in[2], u->rm, u->rv, u->training, 0.1f, 1e-5f);
}

static void check_bn_grad(int ndim, const int64_t *shape, int training) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t sc[1];
    mgpu_tensor *in[3];
    bn_user u;
    double worst;
    sc[0] = shape[1];
    in[0] = mt_rand(ctx, ndim, shape, -2, 3, 1);
    in[1] = mt_rand(ctx, 1, sc, 0.5, 1.5, 1);
    in[2] = mt_rand(ctx, 1, sc, -1, 1, 1);
    u.training = training;
    u.rm = mt_rand(ctx, 1, sc, -0.5, 0.5, 0);
    u.rv = mt_rand(ctx, 1, sc, 0.5, 2, 0);
    worst = MT_GRADCHECK(ctx, bn_fn, in, 3, &u);
    MT_CHECK(worst <= 1, "batch_norm %dd training=%d: worst ratio %g", ndim, training, worst);
    mgpu_tensor_free(in[0]); mgpu_tensor_free(in[1]); mgpu_tensor_free(in[2]);
    mgpu_tensor_free(u.rm); mgpu_tensor_free(u.rv);
    mgpu_context_destroy(ctx);
}

static void test_batch_norm_grad(void) {
    int64_t s2[2] = {6, 4}, s4[4] = {3, 4, 3, 5}, e4[4] = {4, 3, 2, 2}, big[4] = {8, 16, 24, 24};
    check_bn_grad(2, s2, 1);
    check_bn_grad(4, s4, 1);
    check_bn_grad(4, e4, 0);
    check_bn_grad(2, s2, 0);
    if (!quick()) check_bn_grad(4, big, 1);   /* threaded over channels */
}

static void test_batch_norm_running_stats(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t sx[2] = {4, 2}, sc[1] = {2};
    /* channel 0: 1, 2, 3, 4 (mean 2.5, biased var 1.25, unbiased 5/3);
       channel 1: 2, 4, 6, 8 (mean 5, biased var 5, unbiased 20/3) */
    float xv[8] = {1, 2, 2, 4, 3, 6, 4, 8}, rmv[2] = {0.5f, -1}, rvv[2] = {1, 2};
    mgpu_tensor *x = mt_const(ctx, 2, sx, xv), *rm = mt_const(ctx, 1, sc, rmv), *rv = mt_const(ctx, 1, sc, rvv);
    mgpu_tensor *y = mgpu_op_batch_norm(ctx, x, NULL, NULL, rm, rv, 1, 0.1f, 1e-5f);
    double mean[2] = {2.5, 5}, var[2] = {1.25, 5};
    int n, c;
    MT_CHECK(y != NULL, "forward: %s", mgpu_last_error());
    MT_CHECK(fabs(f32(rm)[0] - (0.9 * 0.5 + 0.1 * 2.5)) < 1e-6, "running_mean[0] %g", f32(rm)[0]);
    MT_CHECK(fabs(f32(rm)[1] - (0.9 * -1 + 0.1 * 5)) < 1e-6, "running_mean[1] %g", f32(rm)[1]);
    MT_CHECK(fabs(f32(rv)[0] - (0.9 * 1 + 0.1 * 5.0 / 3)) < 1e-6, "running_var[0] %g (unbiased)", f32(rv)[0]);
    MT_CHECK(fabs(f32(rv)[1] - (0.9 * 2 + 0.1 * 20.0 / 3)) < 1e-6, "running_var[1] %g (unbiased)", f32(rv)[1]);
    for (n = 0; y && n < 4; n++)
        for (c = 0; c < 2; c++) {
            double want = (xv[n * 2 + c] - mean[c]) / sqrt(var[c] + 1e-5);
            MT_CHECK(fabs(f32(y)[n * 2 + c] - want) < 1e-5, "y[%d,%d] %g want %g", n, c, f32(y)[n * 2 + c], want);
        }
    /* without running buffers: same output, nothing tracked */
    {
        mgpu_tensor *y2 = mgpu_op_batch_norm(ctx, x, NULL, NULL, NULL, NULL, 1, 0.1f, 1e-5f);
        MT_CHECK(y && y2 && memcmp(y->data, y2->data, 8 * sizeof(float)) == 0, "NULL running stats: batch stats only");
    }
    mgpu_tensor_free(x); mgpu_tensor_free(rm); mgpu_tensor_free(rv);
    mgpu_context_destroy(ctx);
}

/* (N, C, H, W): statistics over N, H and W, compared with a double reference. */
static void test_batch_norm_4d_values(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t sx[4] = {3, 2, 2, 3}, sc[1] = {2};
    mgpu_tensor *x = mt_rand(ctx, 4, sx, -1, 4, 0), *w = mt_rand(ctx, 1, sc, 0.5, 2, 0), *b = mt_rand(ctx, 1, sc, -1, 1, 0);
    mgpu_tensor *rm = mgpu_tensor_create(ctx, MGPU_F32, 1, sc), *rv = mgpu_tensor_create(ctx, MGPU_F32, 1, sc);
    mgpu_tensor *y;
    int n, c, s;
    mgpu_tensor_fill(rv, 1.0);
    y = mgpu_op_batch_norm(ctx, x, w, b, rm, rv, 1, 0.25f, 1e-3f);
    MT_CHECK(y != NULL, "forward: %s", mgpu_last_error());
    for (c = 0; y && c < 2; c++) {
        double m = 0, v = 0;
        for (n = 0; n < 3; n++) for (s = 0; s < 6; s++) m += f32(x)[(n * 2 + c) * 6 + s];
        m /= 18;
        for (n = 0; n < 3; n++) for (s = 0; s < 6; s++) v += pow(f32(x)[(n * 2 + c) * 6 + s] - m, 2);
        v /= 18;
        MT_CHECK(fabs(f32(rm)[c] - 0.25 * m) < 1e-6, "running_mean[%d] %g want %g", c, f32(rm)[c], 0.25 * m);
        MT_CHECK(fabs(f32(rv)[c] - (0.75 + 0.25 * v * 18 / 17)) < 1e-6, "running_var[%d] %g", c, f32(rv)[c]);
        for (n = 0; n < 3; n++)
            for (s = 0; s < 6; s++) {
                int64_t i = (n * 2 + c) * 6 + s;
                double want = (f32(x)[i] - m) / sqrt(v + 1e-3) * f32(w)[c] + f32(b)[c];
                MT_CHECK(fabs(f32(y)[i] - want) < 1e-5, "y[%lld] %g want %g", (long long)i, f32(y)[i], want);
            }
    }
    mgpu_tensor_free(x); mgpu_tensor_free(w); mgpu_tensor_free(b); mgpu_tensor_free(rm); mgpu_tensor_free(rv);
    mgpu_context_destroy(ctx);
}

static void test_batch_norm_eval(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    int64_t sx[2] = {2, 3}, sc[1] = {3};
    float xv[6] = {1, -2, 3, 0.5f, 4, -1}, rmv[3] = {0.5f, 1, -1}, rvv[3] = {4, 0.25f, 1}, wv[3] = {2, 1, -1}, bv[3] = {0, 0.5f, 1};
    mgpu_tensor *x = mt_const(ctx, 2, sx, xv), *rm = mt_const(ctx, 1, sc, rmv), *rv = mt_const(ctx, 1, sc, rvv);
    mgpu_tensor *w = mt_const(ctx, 1, sc, wv), *b = mt_const(ctx, 1, sc, bv);
    mgpu_tensor *y = mgpu_op_batch_norm(ctx, x, w, b, rm, rv, 0, 0.1f, 0.0f);
    int i;
    MT_CHECK(y != NULL, "forward: %s", mgpu_last_error());
    for (i = 0; y && i < 6; i++) {
        int c = i % 3;
        double want = (xv[i] - rmv[c]) / sqrt(rvv[c]) * wv[c] + bv[c];
        MT_CHECK(fabs(f32(y)[i] - want) < 1e-6, "eval y[%d] %g want %g", i, f32(y)[i], want);
    }
    MT_CHECK(f32(rm)[0] == 0.5f && f32(rv)[1] == 0.25f, "eval leaves running stats alone");
    mgpu_tensor_free(x); mgpu_tensor_free(rm); mgpu_tensor_free(rv); mgpu_tensor_free(w); mgpu_tensor_free(b);
    mgpu_context_destroy(ctx);
}

static void bn_run(int threads, const int64_t *sx, mgpu_tensor **y_out, mgpu_tensor **grads) {
    mgpu_context *ctx = mt_cpu_context(threads);
    int64_t sc[1];
    mgpu_tensor *x, *w, *b, *y, *g;
    sc[0] = sx[1];
    mt_rng_state = 7;
    x = mt_rand(ctx, 4, sx, -2, 3, 1);
    w = mt_rand(ctx, 1, sc, 0.5, 1.5, 1);
    b = mt_rand(ctx, 1, sc, -1, 1, 1);
    g = mt_rand(ctx, 4, sx, -1, 1, 0);
    y = mgpu_op_batch_norm(ctx, x, w, b, NULL, NULL, 1, 0.1f, 1e-5f);
    *y_out = y ? mgpu_tensor_create(ctx, MGPU_F32, 4, sx) : NULL;
    if (y) { mgpu_tensor_copy(*y_out, y); mgpu_backward_with_grad(ctx, y, g); }
    grads[0] = x->grad; grads[1] = w->grad; grads[2] = b->grad;
    x->grad = w->grad = b->grad = NULL;
    mgpu_tensor_free(x); mgpu_tensor_free(w); mgpu_tensor_free(b); mgpu_tensor_free(g);
    mgpu_context_destroy(ctx);
}

static void test_batch_norm_threads(void) {
    int64_t sx[4] = {8, 32, 16, 16};
    mgpu_tensor *y1, *y2, *g1[3], *g2[3];
    int i;
    if (quick()) sx[0] = 2;
    bn_run(1, sx, &y1, g1);
    bn_run(2, sx, &y2, g2);
    MT_CHECK(bits_equal(y1, y2), "forward identical for 1 and 2 threads");
    for (i = 0; i < 3; i++) MT_CHECK(bits_equal(g1[i], g2[i]), "grad %d identical for 1 and 2 threads", i);
    mgpu_tensor_free(y1); mgpu_tensor_free(y2);
    for (i = 0; i < 3; i++) { mgpu_tensor_free(g1[i]); mgpu_tensor_free(g2[i]); }
}

/* ---------------------------------------------------------------- embedding */

static mgpu_tensor *emb_fn(mgpu_context *ctx, mgpu_tensor **in, void *user) {
    return mgpu_op_embedding(ctx, in[0], (mgpu_tensor *)user);
}

static void test_embedding_values(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t sw[2] = {5, 3}, si[2] = {2, 3}, sy[3] = {2, 3, 3}, iv[6] = {0, 4, 2, 4, 4, 1};
    mgpu_tensor *w = mt_rand(ctx, 2, sw, -1, 1, 1), *idx = mt_index(ctx, MGPU_I64, 2, si, iv);
    mgpu_tensor *y = mgpu_op_embedding(ctx, w, idx), *g;
    int i, d;
    float counts[5] = {1, 1, 1, 0, 3};
    MT_CHECK(y && y->ndim == 3 && y->shape[0] == 2 && y->shape[1] == 3 && y->shape[2] == 3, "shape %s", mgpu_last_error());
    for (i = 0; y && i < 6; i++)
        for (d = 0; d < 3; d++) MT_CHECK(f32(y)[i * 3 + d] == f32(w)[iv[i] * 3 + d], "row %d col %d", i, d);
    /* d(sum y)/dw counts how often each row was taken */
    g = mgpu_tensor_create(ctx, MGPU_F32, 3, sy);
    mgpu_tensor_fill(g, 1.0);
    MT_CHECK(y && mgpu_backward_with_grad(ctx, y, g) == MGPU_OK, "backward: %s", mgpu_last_error());
    for (i = 0; w->grad && i < 5; i++)
        for (d = 0; d < 3; d++) MT_CHECK(f32(w->grad)[i * 3 + d] == counts[i], "grad row %d = %g", i, f32(w->grad)[i * 3 + d]);
    mgpu_tensor_free(w); mgpu_tensor_free(idx); mgpu_tensor_free(g);
    mgpu_context_destroy(ctx);
}

static void test_embedding_grad(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t sw[2] = {6, 5}, si[2] = {3, 4}, iv[12] = {1, 5, 1, 0, 3, 3, 3, 2, 5, 1, 0, 1};
    mgpu_dtype dts[2] = {MGPU_I32, MGPU_I64};
    int k;
    for (k = 0; k < 2; k++) {
        mgpu_tensor *w = mt_rand(ctx, 2, sw, -1, 1, 1), *idx = mt_index(ctx, dts[k], 2, si, iv);
        double worst = MT_GRADCHECK(ctx, emb_fn, &w, 1, idx);
        MT_CHECK(worst <= 1, "embedding %s: worst ratio %g", mgpu_dtype_name(dts[k]), worst);
        mgpu_tensor_free(w); mgpu_tensor_free(idx);
    }
    mgpu_context_destroy(ctx);
}

/* Large scatter-add: equal to a serial in-order reference at 1 and 2 threads. */
static void test_embedding_threads(void) {
    int64_t V = 300, D = 64, n = quick() ? 3000 : 20000, i, d;
    int64_t sw[2], si[1];
    int64_t *iv = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    float *ref = (float *)calloc((size_t)(V * D), sizeof(float));
    int threads;
    sw[0] = V; sw[1] = D; si[0] = n;
    for (i = 0; i < n; i++) iv[i] = (int64_t)mt_uniform(0, (double)V);
    for (threads = 1; threads <= 2; threads++) {
        mgpu_context *ctx = mt_cpu_context(threads);
        mgpu_tensor *w, *idx = mt_index(ctx, MGPU_I32, 1, si, iv), *g, *y;
        int64_t sy[2];
        sy[0] = n; sy[1] = D;
        mt_rng_state = 5;
        w = mt_rand(ctx, 2, sw, -1, 1, 1);
        g = mt_rand(ctx, 2, sy, -1, 1, 0);
        if (threads == 1)
            for (i = 0; i < n; i++) for (d = 0; d < D; d++) ref[iv[i] * D + d] += f32(g)[i * D + d];
        y = mgpu_op_embedding(ctx, w, idx);
        MT_CHECK(y && mgpu_backward_with_grad(ctx, y, g) == MGPU_OK, "backward: %s", mgpu_last_error());
        MT_CHECK(w->grad && memcmp(w->grad->data, ref, sizeof(float) * (size_t)(V * D)) == 0,
                 "%d threads: scatter-add equals the in-order serial sum", threads);
        mgpu_tensor_free(w); mgpu_tensor_free(idx); mgpu_tensor_free(g);
        mgpu_context_destroy(ctx);
    }
    free(iv); free(ref);
}

static void test_embedding_errors(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    int64_t sw[2] = {5, 3}, si[2] = {2, 3}, bad[6] = {0, 1, 2, 3, 4, 5}, neg[6] = {0, -1, 0, 0, 0, 0};
    mgpu_tensor *w = mt_rand(ctx, 2, sw, -1, 1, 0);
    mgpu_tensor *i1 = mt_index(ctx, MGPU_I64, 2, si, bad), *i2 = mt_index(ctx, MGPU_I32, 2, si, neg);
    mgpu_tensor *fidx = mgpu_tensor_create(ctx, MGPU_F32, 2, si);
    MT_CHECK(mgpu_op_embedding(ctx, w, i1) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "index 5 >= V rejected");
    MT_CHECK(strstr(mgpu_last_error(), "5") && strstr(mgpu_last_error(), "(1, 2)"), "names value and position: %s", mgpu_last_error());
    MT_CHECK(mgpu_op_embedding(ctx, w, i2) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "negative index rejected");
    MT_CHECK(strstr(mgpu_last_error(), "-1") && strstr(mgpu_last_error(), "(0, 1)"), "names value and position: %s", mgpu_last_error());
    MT_CHECK(mgpu_op_embedding(ctx, w, fidx) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "F32 indices rejected");
    MT_CHECK(mgpu_op_embedding(ctx, i1, i1) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "integer weight rejected");
    mgpu_clear_error();
    MT_CHECK(mgpu_op_embedding(ctx, w, NULL) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "NULL idx");
    MT_CHECK(strstr(mgpu_last_error(), "idx") != NULL, "names idx: %s", mgpu_last_error());
    mgpu_tensor_free(w); mgpu_tensor_free(i1); mgpu_tensor_free(i2); mgpu_tensor_free(fidx);
    mgpu_context_destroy(ctx);
}

/* ---------------------------------------------------------------- attention */

/* softmax(Q K^T / sqrt(D), masked by tril(ones(Tq, Tk)) when causal) V in double. */
static void attention_reference(const mgpu_tensor *q, const mgpu_tensor *k, const mgpu_tensor *v, int causal, double *out) {
    int64_t P = q->shape[0] * q->shape[1], Tq = q->shape[2], Tk = k->shape[2], D = q->shape[3], p, i, j, d;
    double *s = (double *)malloc(sizeof(double) * (size_t)Tk);
    for (p = 0; p < P; p++)
        for (i = 0; i < Tq; i++) {
            const float *qi = f32((mgpu_tensor *)q) + (p * Tq + i) * D;
            double mx = -1e300, sum = 0;
            int64_t len = causal ? (i + 1 < Tk ? i + 1 : Tk) : Tk;
            for (j = 0; j < len; j++) {
                const float *kj = f32((mgpu_tensor *)k) + (p * Tk + j) * D;
                double dot = 0;
                for (d = 0; d < D; d++) dot += (double)qi[d] * kj[d];
                s[j] = dot / sqrt((double)D);
                if (s[j] > mx) mx = s[j];
            }
            for (j = 0; j < len; j++) { s[j] = exp(s[j] - mx); sum += s[j]; }
            for (d = 0; d < D; d++) {
                double o = 0;
                for (j = 0; j < len; j++) o += s[j] / sum * f32((mgpu_tensor *)v)[(p * Tk + j) * D + d];
                out[(p * Tq + i) * D + d] = o;
            }
        }
    free(s);
}

static void check_attention_forward(int threads, int64_t B, int64_t H, int64_t Tq, int64_t Tk, int64_t D, int causal) {
    mgpu_context *ctx = mt_cpu_context(threads);
    int64_t sq[4], sk[4], i;
    mgpu_tensor *q, *k, *v, *o;
    double *ref, err = 0, scale = 0;
    sq[0] = sk[0] = B; sq[1] = sk[1] = H; sq[2] = Tq; sk[2] = Tk; sq[3] = sk[3] = D;
    q = mt_rand(ctx, 4, sq, -2, 2, 0); k = mt_rand(ctx, 4, sk, -2, 2, 0); v = mt_rand(ctx, 4, sk, -1, 1, 0);
    ref = (double *)malloc(sizeof(double) * (size_t)(B * H * Tq * D));
    o = mgpu_op_attention(ctx, q, k, v, causal);
    MT_CHECK(o && mgpu_tensor_same_shape(o, q), "output (B, H, Tq, D): %s", mgpu_last_error());
    attention_reference(q, k, v, causal, ref);
    for (i = 0; o && i < o->numel; i++) {
        if (fabs(f32(o)[i] - ref[i]) > err) err = fabs(f32(o)[i] - ref[i]);
        if (fabs(ref[i]) > scale) scale = fabs(ref[i]);
    }
    MT_CHECK(o && err <= 1e-5 * scale, "threads %d B%lld H%lld Tq%lld Tk%lld D%lld causal %d: max error %g of %g", threads,
             (long long)B, (long long)H, (long long)Tq, (long long)Tk, (long long)D, causal, err, scale);
    if (o && causal) {   /* query 0 sees only key 0: its output is v's row 0 */
        int64_t p, d;
        for (p = 0; p < B * H; p++)
            for (d = 0; d < D; d++)
                MT_CHECK(fabs(f32(o)[p * Tq * D + d] - f32(v)[p * Tk * D + d]) <= 1e-6 * fabs(f32(v)[p * Tk * D + d]),
                         "causal row 0 of pair %lld equals v row 0", (long long)p);
    }
    free(ref);
    mgpu_tensor_free(q); mgpu_tensor_free(k); mgpu_tensor_free(v);
    mgpu_context_destroy(ctx);
}

static void test_attention_forward(void) {
    check_attention_forward(2, 2, 3, 5, 7, 4, 0);    /* Tq != Tk */
    check_attention_forward(2, 2, 3, 6, 6, 8, 1);
    check_attention_forward(2, 1, 2, 4, 6, 3, 1);    /* tril(ones(Tq, Tk)), top-left aligned */
    check_attention_forward(2, 1, 2, 6, 4, 3, 1);
    check_attention_forward(1, 2, 4, 32, 32, 16, 1); /* serial over pairs */
    check_attention_forward(2, 2, 4, 32, 32, 16, 1); /* parallel over pairs */
    check_attention_forward(2, 2, 4, 24, 40, 16, 0);
}

typedef struct { int causal; } attn_user;
static mgpu_tensor *attn_fn(mgpu_context *ctx, mgpu_tensor **in, void *user) {
    return mgpu_op_attention(ctx, in[0], in[1], in[2], ((attn_user *)user)->causal);
}
static mgpu_tensor *self_attn_fn(mgpu_context *ctx, mgpu_tensor **in, void *user) {
    return mgpu_op_attention(ctx, in[0], in[0], in[0], ((attn_user *)user)->causal);
}

static void check_attention_grad(int64_t B, int64_t H, int64_t Tq, int64_t Tk, int64_t D, int causal) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t sq[4], sk[4];
    mgpu_tensor *in[3];
    attn_user u;
    double worst;
    sq[0] = sk[0] = B; sq[1] = sk[1] = H; sq[2] = Tq; sk[2] = Tk; sq[3] = sk[3] = D;
    in[0] = mt_rand(ctx, 4, sq, -1, 1, 1); in[1] = mt_rand(ctx, 4, sk, -1, 1, 1); in[2] = mt_rand(ctx, 4, sk, -1, 1, 1);
    u.causal = causal;
    worst = MT_GRADCHECK(ctx, attn_fn, in, 3, &u);
    MT_CHECK(worst <= 1, "attention Tq %lld Tk %lld causal %d: worst ratio %g", (long long)Tq, (long long)Tk, causal, worst);
    mgpu_tensor_free(in[0]); mgpu_tensor_free(in[1]); mgpu_tensor_free(in[2]);
    mgpu_context_destroy(ctx);
}

static void test_attention_grad(void) {
    check_attention_grad(1, 2, 5, 5, 3, 1);
    check_attention_grad(2, 1, 3, 5, 4, 0);
    check_attention_grad(1, 1, 5, 3, 2, 1);
    if (!quick()) check_attention_grad(2, 4, 12, 12, 32, 1);   /* parallel over pairs */
}

/* q = k = v = x: the three gradient contributions accumulate into one buffer */
static void test_attention_shared_input_grad(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t sx[4] = {1, 2, 4, 3};
    mgpu_tensor *x = mt_rand(ctx, 4, sx, -1, 1, 1);
    attn_user u;
    double worst;
    u.causal = 0;
    worst = MT_GRADCHECK(ctx, self_attn_fn, &x, 1, &u);
    MT_CHECK(worst <= 1, "attention(x, x, x): worst ratio %g", worst);
    mgpu_tensor_free(x);
    mgpu_context_destroy(ctx);
}

static void attn_run(int threads, mgpu_tensor **o_out, mgpu_tensor **grads) {
    mgpu_context *ctx = mt_cpu_context(threads);
    int64_t sq[4] = {2, 4, 32, 16}, sk[4] = {2, 4, 40, 16};
    mgpu_tensor *q, *k, *v, *g, *o;
    mt_rng_state = 11;
    q = mt_rand(ctx, 4, sq, -2, 2, 1); k = mt_rand(ctx, 4, sk, -2, 2, 1); v = mt_rand(ctx, 4, sk, -1, 1, 1);
    g = mt_rand(ctx, 4, sq, -1, 1, 0);
    o = mgpu_op_attention(ctx, q, k, v, 1);
    *o_out = o ? mgpu_tensor_create(ctx, MGPU_F32, 4, sq) : NULL;
    if (o) { mgpu_tensor_copy(*o_out, o); mgpu_backward_with_grad(ctx, o, g); }
    grads[0] = q->grad; grads[1] = k->grad; grads[2] = v->grad;
    q->grad = k->grad = v->grad = NULL;
    mgpu_tensor_free(q); mgpu_tensor_free(k); mgpu_tensor_free(v); mgpu_tensor_free(g);
    mgpu_context_destroy(ctx);
}

static void test_attention_threads(void) {
    mgpu_tensor *o1, *o2, *g1[3], *g2[3];
    int i;
    attn_run(1, &o1, g1);
    attn_run(2, &o2, g2);
    MT_CHECK(bits_equal(o1, o2), "forward identical for 1 and 2 threads");
    for (i = 0; i < 3; i++) MT_CHECK(bits_equal(g1[i], g2[i]), "grad %d identical for 1 and 2 threads", i);
    mgpu_tensor_free(o1); mgpu_tensor_free(o2);
    for (i = 0; i < 3; i++) { mgpu_tensor_free(g1[i]); mgpu_tensor_free(g2[i]); }
}

/* ---------------------------------------------------------------- errors */

static void test_shape_errors(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    int64_t sx[2] = {4, 3}, s4[1] = {4}, s1[1] = {3}, sq[4] = {1, 2, 3, 4}, sk[4] = {1, 2, 5, 8}, s3[3] = {2, 3, 4};
    mgpu_tensor *x = mt_rand(ctx, 2, sx, -1, 1, 0), *w4 = mt_rand(ctx, 1, s4, 0, 1, 0), *x1 = mt_rand(ctx, 1, s1, 0, 1, 0);
    mgpu_tensor *q = mt_rand(ctx, 4, sq, -1, 1, 0), *k = mt_rand(ctx, 4, sk, -1, 1, 0), *q3 = mt_rand(ctx, 3, s3, -1, 1, 0);
    int64_t one[2] = {1, 3};
    mgpu_tensor *xone = mt_rand(ctx, 2, one, -1, 1, 0);
    const char *e;
    MT_CHECK(mgpu_op_layer_norm(ctx, x, w4, NULL, 1e-5f) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "layer_norm w (4) vs C 3");
    MT_CHECK(strstr(mgpu_last_error(), "w") && strstr(mgpu_last_error(), "(4,)"), "message: %s", mgpu_last_error());
    MT_CHECK(mgpu_op_layer_norm(ctx, x, NULL, NULL, -1.0f) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "negative eps");
    MT_CHECK(mgpu_op_batch_norm(ctx, x, NULL, w4, NULL, NULL, 1, 0.1f, 1e-5f) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "batch_norm b (4) vs C 3");
    MT_CHECK(mgpu_op_batch_norm(ctx, x1, NULL, NULL, NULL, NULL, 1, 0.1f, 1e-5f) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "batch_norm 1-d x");
    MT_CHECK(mgpu_op_batch_norm(ctx, x, NULL, NULL, NULL, NULL, 0, 0.1f, 1e-5f) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "eval without running stats");
    MT_CHECK(mgpu_op_batch_norm(ctx, x, NULL, NULL, x1, NULL, 1, 0.1f, 1e-5f) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "running_mean without running_var");
    MT_CHECK(mgpu_op_batch_norm(ctx, xone, NULL, NULL, NULL, NULL, 1, 0.1f, 1e-5f) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "one value per channel in training");
    MT_CHECK(mgpu_op_attention(ctx, q, k, k, 0) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "attention D mismatch");
    e = mgpu_last_error();
    MT_CHECK(strstr(e, "(1, 2, 3, 4)") && strstr(e, "(1, 2, 5, 8)"), "message has the shapes: %s", e);
    MT_CHECK(mgpu_op_attention(ctx, q, q, k, 0) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "attention k vs v mismatch");
    MT_CHECK(mgpu_op_attention(ctx, q3, q3, q3, 1) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "attention 3-d inputs");
    mgpu_tensor_free(x); mgpu_tensor_free(w4); mgpu_tensor_free(x1); mgpu_tensor_free(q); mgpu_tensor_free(k);
    mgpu_tensor_free(q3); mgpu_tensor_free(xone);
    mgpu_context_destroy(ctx);
}

static void test_null_inputs(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    int64_t sx[2] = {4, 3}, sq[4] = {1, 1, 2, 2};
    mgpu_tensor *x = mt_rand(ctx, 2, sx, -1, 1, 0), *q = mt_rand(ctx, 4, sq, -1, 1, 0);
    MT_CHECK(mgpu_op_layer_norm(ctx, NULL, NULL, NULL, 1e-5f) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "NULL x");
    MT_CHECK(strstr(mgpu_last_error(), "mgpu_op_layer_norm") && strstr(mgpu_last_error(), "x"), "names op and x: %s", mgpu_last_error());
    /* a NULL from an earlier failure passes through without replacing the first error */
    mgpu_op_layer_norm(ctx, x, NULL, NULL, -1.0f);
    MT_CHECK(mgpu_op_batch_norm(ctx, NULL, NULL, NULL, NULL, NULL, 1, 0.1f, 1e-5f) == NULL, "batch_norm NULL x");
    MT_CHECK(mgpu_op_attention(ctx, q, NULL, q, 0) == NULL, "attention NULL k");
    MT_CHECK(mgpu_op_embedding(ctx, NULL, NULL) == NULL, "embedding NULL");
    MT_CHECK(mgpu_last_result() == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "eps"), "first error kept: %s", mgpu_last_error());
    MT_CHECK(mgpu_op_attention(NULL, q, q, q, 0) == NULL, "NULL ctx");
    mgpu_tensor_free(x); mgpu_tensor_free(q);
    mgpu_context_destroy(ctx);
}

int main(void) {
    MT_RUN(test_layer_norm_stats);
    MT_RUN(test_layer_norm_affine_values);
    MT_RUN(test_layer_norm_grad);
    MT_RUN(test_layer_norm_threads);
    MT_RUN(test_batch_norm_grad);
    MT_RUN(test_batch_norm_running_stats);
    MT_RUN(test_batch_norm_4d_values);
    MT_RUN(test_batch_norm_eval);
    MT_RUN(test_batch_norm_threads);
    MT_RUN(test_embedding_values);
    MT_RUN(test_embedding_grad);
    MT_RUN(test_embedding_threads);
    MT_RUN(test_embedding_errors);
    MT_RUN(test_attention_forward);
    MT_RUN(test_attention_grad);
    MT_RUN(test_attention_shared_input_grad);
    MT_RUN(test_attention_threads);
    MT_RUN(test_shape_errors);
    MT_RUN(test_null_inputs);
    return MT_END();
}
