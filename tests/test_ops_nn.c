/* GEMM, matmul, linear, conv2d and pooling: values against naive double-precision references and
   hand-computed numbers, finite-difference gradients, thread-count determinism, error cases. */
#include "mgpu_test.h"
#include <pthread.h>

static int quick(void) { return getenv("MGPU_TEST_QUICK") != NULL; }

static float *mt_copy(const mgpu_tensor *t) {
    float *p = (float *)malloc(mgpu_tensor_nbytes(t));
    memcpy(p, t->data, mgpu_tensor_nbytes(t));
    return p;
}

/* backward of sum(out), seeded with ones (keeps this file independent of the reduction ops) */
static mgpu_result mt_backward_sum(mgpu_context *ctx, mgpu_tensor *out) {
    mgpu_tensor *ones;
    mgpu_result r;
    if (!out) return MGPU_ERR_INVALID_ARG;
    ones = mgpu_tensor_create(ctx, MGPU_F32, out->ndim, out->shape);
    mgpu_tensor_fill(ones, 1.0);
    r = mgpu_backward_with_grad(ctx, out, ones);
    mgpu_tensor_free(ones);
    return r;
}

/* ---------------------------------------------------------------- GEMM */

/* op(X)[r][c] of a row-major matrix stored with leading dimension ld */
static double mt_at(const float *x, int trans, int64_t ld, int64_t r, int64_t c) { return trans ? x[c * ld + r] : x[r * ld + c]; }

/* Runs one GEMM case and checks every element against a double reference, with the error bound
   relative to |alpha| sum |a||b| + |beta c|; also checks that C's row padding is untouched. */
static void mt_gemm_case(mgpu_context *ctx, int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, float beta, int pad) {
    int64_t lda = (ta ? m : k) + pad, ldb = (tb ? k : n) + pad, ldc = n + pad;
    int64_t arows = ta ? k : m, brows = tb ? n : k, i, j, p, bad = 0;
    float *a = (float *)malloc(sizeof(float) * (size_t)(arows * lda + 1));
    float *b = (float *)malloc(sizeof(float) * (size_t)(brows * ldb + 1));
    float *c = (float *)malloc(sizeof(float) * (size_t)(m * ldc + 1));
    float *c0 = (float *)malloc(sizeof(float) * (size_t)(m * ldc + 1));
    double worst = 0;
    for (i = 0; i < arows * lda; i++) a[i] = (float)mt_uniform(-1, 1);
    for (i = 0; i < brows * ldb; i++) b[i] = (float)mt_uniform(-1, 1);
    for (i = 0; i < m * ldc; i++) c0[i] = beta == 0.0f ? NAN : (float)mt_uniform(-1, 1);   /* beta 0 must ignore NaN */
    memcpy(c, c0, sizeof(float) * (size_t)(m * ldc));
    mgpu_clear_error();
    mgpu_gemm_f32(ctx, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    MT_CHECK(mgpu_last_result() == MGPU_OK, "gemm error: %s", mgpu_last_error());
    for (i = 0; i < m; i++) {
        for (j = 0; j < n; j++) {
            double ref = 0, mag = 0, err;
            for (p = 0; p < k; p++) {
                double t = mt_at(a, ta, lda, i, p) * mt_at(b, tb, ldb, p, j);
                ref += t; mag += fabs(t);
            }
            ref *= alpha; mag *= fabs(alpha);
            if (beta != 0.0f) { ref += (double)beta * c0[i * ldc + j]; mag += fabs((double)beta * c0[i * ldc + j]); }
            err = fabs(c[i * ldc + j] - ref) / (mag + 1e-30);
            if (!(err <= 1e-5) && !(mag == 0 && c[i * ldc + j] == 0)) bad++;
            if (err > worst && mag > 0) worst = err;
        }
        for (j = n; j < ldc; j++)
            if (memcmp(&c[i * ldc + j], &c0[i * ldc + j], sizeof(float)) != 0) bad++;
    }
    MT_CHECK(bad == 0, "ta=%d tb=%d m=%lld n=%lld k=%lld alpha=%g beta=%g pad=%d: %lld bad elements (worst rel err %.3g)",
             ta, tb, (long long)m, (long long)n, (long long)k, alpha, beta, pad, (long long)bad, worst);
    free(a); free(b); free(c); free(c0);
}

static void test_gemm_values(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    /* m, n, k: tiny, odd, edges of the 6 x 16 tile, K above one KC block, M above one MC block, N above NC */
    static const int64_t shapes[][3] = {{1, 1, 1}, {7, 13, 5}, {6, 16, 8}, {5, 17, 300}, {13, 31, 1}, {33, 47, 513},
                                        {150, 70, 20}, {64, 96, 128}, {3, 2100, 4}};
    int nshapes = quick() ? 7 : (int)(sizeof shapes / sizeof shapes[0]);
    int s, ta, tb;
    for (s = 0; s < nshapes; s++)
        for (ta = 0; ta < 2; ta++)
            for (tb = 0; tb < 2; tb++) {
                mt_gemm_case(ctx, ta, tb, shapes[s][0], shapes[s][1], shapes[s][2], 1.0f, 0.0f, 0);
                mt_gemm_case(ctx, ta, tb, shapes[s][0], shapes[s][1], shapes[s][2], -0.75f, 0.5f, 3);
            }
    mt_gemm_case(ctx, 0, 1, 128, 256, 784, 1.0f, 1.0f, 0);   /* the MLP's first layer */
    mt_gemm_case(ctx, 1, 0, 256, 784, 128, 2.0f, 1.0f, 5);   /* its weight gradient */
    mt_gemm_case(NULL, 1, 1, 40, 50, 60, 1.5f, -1.0f, 1);    /* ctx NULL: calling thread only */
    mgpu_context_destroy(ctx);
}

static void test_gemm_degenerate(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    float a[6] = {1, 2, 3, 4, 5, 6}, b[6] = {1, 1, 1, 1, 1, 1}, c[4] = {1, 2, 3, NAN};
    /* K = 0: C = beta * C; beta 0 clears even NaN */
    mgpu_gemm_f32(ctx, 0, 0, 2, 2, 0, 1.0f, a, 1, b, 2, 2.0f, c, 2);
    MT_CHECK(c[0] == 2 && c[1] == 4 && c[2] == 6 && isnan(c[3]), "k=0 beta=2: %g %g %g %g", c[0], c[1], c[2], c[3]);
    mgpu_gemm_f32(ctx, 0, 0, 2, 2, 0, 1.0f, NULL, 1, NULL, 2, 0.0f, c, 2);
    MT_CHECK(c[0] == 0 && c[1] == 0 && c[2] == 0 && c[3] == 0, "k=0 beta=0 zeroes C");
    /* M or N = 0: nothing touched, no error, NULL pointers fine */
    mgpu_clear_error();
    mgpu_gemm_f32(ctx, 0, 0, 0, 5, 3, 1.0f, NULL, 3, NULL, 5, 0.0f, NULL, 5);
    mgpu_gemm_f32(ctx, 0, 0, 4, 0, 3, 1.0f, NULL, 3, NULL, 1, 0.0f, NULL, 1);
    MT_CHECK(mgpu_last_result() == MGPU_OK, "empty gemm is fine: %s", mgpu_last_error());
    /* hand-computed: (2, 3) @ (3, 2) of ones -> row sums */
    mgpu_gemm_f32(ctx, 0, 0, 2, 2, 3, 1.0f, a, 3, b, 2, 0.0f, c, 2);
    MT_CHECK(c[0] == 6 && c[1] == 6 && c[2] == 15 && c[3] == 15, "hand values %g %g %g %g", c[0], c[1], c[2], c[3]);
    /* argument errors */
    mgpu_gemm_f32(ctx, 0, 0, -1, 2, 3, 1.0f, a, 3, b, 2, 0.0f, c, 2);
    MT_CHECK(mgpu_last_result() == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "mgpu_gemm_f32"), "negative m: %s", mgpu_last_error());
    mgpu_clear_error();
    mgpu_gemm_f32(ctx, 0, 0, 2, 2, 3, 1.0f, a, 2, b, 2, 0.0f, c, 2);
    MT_CHECK(mgpu_last_result() == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "lda"), "lda < k: %s", mgpu_last_error());
    mgpu_clear_error();
    mgpu_gemm_f32(ctx, 0, 0, 2, 2, 3, 1.0f, NULL, 3, b, 2, 0.0f, c, 2);
    MT_CHECK(mgpu_last_result() == MGPU_ERR_INVALID_ARG, "NULL a: %s", mgpu_last_error());
    mgpu_context_destroy(ctx);
}

/* Same inputs with 1, 2 and 3 threads: results must be bit-identical. */
static void test_gemm_thread_determinism(void) {
    mgpu_context *c1 = mt_cpu_context(1), *c2 = mt_cpu_context(2), *c3 = mt_cpu_context(3);
    static const int64_t shapes[][3] = {{128, 256, 784}, {256, 784, 128}, {301, 177, 259}, {7, 3000, 40}, {1000, 9, 300}};
    int s, ta, tb, nshapes = quick() ? 3 : 5;
    for (s = 0; s < nshapes; s++)
        for (ta = 0; ta < 2; ta++)
            for (tb = 0; tb < 2; tb++) {
                int64_t m = shapes[s][0], n = shapes[s][1], k = shapes[s][2], i;
                float *a = (float *)malloc(sizeof(float) * (size_t)(m * k)), *b = (float *)malloc(sizeof(float) * (size_t)(k * n));
                float *r1 = (float *)malloc(sizeof(float) * (size_t)(m * n)), *r2 = (float *)malloc(sizeof(float) * (size_t)(m * n));
                float *r3 = (float *)malloc(sizeof(float) * (size_t)(m * n));
                for (i = 0; i < m * k; i++) a[i] = (float)mt_uniform(-1, 1);
                for (i = 0; i < k * n; i++) b[i] = (float)mt_uniform(-1, 1);
                for (i = 0; i < m * n; i++) r1[i] = r2[i] = r3[i] = (float)i * 1e-3f;
                mgpu_gemm_f32(c1, ta, tb, m, n, k, 0.9f, a, ta ? m : k, b, tb ? k : n, 0.3f, r1, n);
                mgpu_gemm_f32(c2, ta, tb, m, n, k, 0.9f, a, ta ? m : k, b, tb ? k : n, 0.3f, r2, n);
                mgpu_gemm_f32(c3, ta, tb, m, n, k, 0.9f, a, ta ? m : k, b, tb ? k : n, 0.3f, r3, n);
                MT_CHECK(memcmp(r1, r2, sizeof(float) * (size_t)(m * n)) == 0, "1 vs 2 threads differ: %lldx%lldx%lld ta=%d tb=%d",
                         (long long)m, (long long)n, (long long)k, ta, tb);
                MT_CHECK(memcmp(r1, r3, sizeof(float) * (size_t)(m * n)) == 0, "1 vs 3 threads differ: %lldx%lldx%lld ta=%d tb=%d",
                         (long long)m, (long long)n, (long long)k, ta, tb);
                free(a); free(b); free(r1); free(r2); free(r3);
            }
    mgpu_context_destroy(c1); mgpu_context_destroy(c2); mgpu_context_destroy(c3);
}

/* A thread that gets no memory for its packing buffers packs micro-panels on its stack instead:
   slower, but the same bits, and the GEMM cannot fail. */
typedef struct { int64_t m, n, k; int ta, tb; const float *a, *b; float *c; } gemm_job;
static void *no_memory(size_t bytes, void *user) { (void)bytes; (void)user; return NULL; }
static void free_default(void *p, void *user) { (void)user; free(p); }
static void *gemm_on_new_thread(void *arg) {   /* a new thread has no packing buffers yet */
    gemm_job *j = (gemm_job *)arg;
    mgpu_gemm_f32(NULL, j->ta, j->tb, j->m, j->n, j->k, 0.9f, j->a, j->ta ? j->m : j->k, j->b, j->tb ? j->k : j->n, 0.3f, j->c, j->n);
    return NULL;
}
static void test_gemm_without_scratch(void) {
    mgpu_allocator failing = {no_memory, free_default, NULL};
    int64_t m = 301, n = 177, k = 300, i;
    int t;
    float *a = (float *)malloc(sizeof(float) * (size_t)(m * k)), *b = (float *)malloc(sizeof(float) * (size_t)(k * n));
    float *ref = (float *)malloc(sizeof(float) * (size_t)(m * n)), *got = (float *)malloc(sizeof(float) * (size_t)(m * n));
    for (i = 0; i < m * k; i++) a[i] = (float)mt_uniform(-1, 1);
    for (i = 0; i < k * n; i++) b[i] = (float)mt_uniform(-1, 1);
    for (t = 0; t < 4; t++) {
        gemm_job j = {m, n, k, t & 1, t >> 1, a, b, got};
        pthread_t th;
        for (i = 0; i < m * n; i++) ref[i] = got[i] = (float)i * 1e-3f;
        mgpu_gemm_f32(NULL, j.ta, j.tb, m, n, k, 0.9f, a, j.ta ? m : k, b, j.tb ? k : n, 0.3f, ref, n);
        mgpu_set_allocator(&failing);
        pthread_create(&th, NULL, gemm_on_new_thread, &j);
        pthread_join(th, NULL);
        mgpu_set_allocator(NULL);
        MT_CHECK(memcmp(ref, got, sizeof(float) * (size_t)(m * n)) == 0, "stack panels differ from the packed path: ta=%d tb=%d", j.ta, j.tb);
    }
    free(a); free(b); free(ref); free(got);
}

/* ---------------------------------------------------------------- matmul / linear */

static mgpu_tensor *f_matmul(mgpu_context *ctx, mgpu_tensor **in, void *u) { (void)u; return mgpu_op_matmul(ctx, in[0], in[1]); }
static mgpu_tensor *f_linear(mgpu_context *ctx, mgpu_tensor **in, void *u) { (void)u; return mgpu_op_linear(ctx, in[0], in[1], in[2]); }

static void test_matmul_values_and_grads(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t sa[2] = {5, 7}, sb[2] = {7, 4}, ba[3] = {3, 4, 6}, bb[3] = {3, 6, 5}, i, j, p, bi;
    mgpu_tensor *in[2];
    mgpu_tensor *a = mt_rand(ctx, 2, sa, -1, 1, 1), *b = mt_rand(ctx, 2, sb, -1, 1, 1);
    mgpu_tensor *y = mgpu_op_matmul(ctx, a, b);
    double err = 0, g;
    MT_CHECK(y && y->ndim == 2 && y->shape[0] == 5 && y->shape[1] == 4, "shape %s", y ? "" : mgpu_last_error());
    if (y)
        for (i = 0; i < 5; i++)
            for (j = 0; j < 4; j++) {
                double ref = 0;
                for (p = 0; p < 7; p++) ref += (double)((float *)a->data)[i * 7 + p] * ((float *)b->data)[p * 4 + j];
                err = fmax(err, fabs(ref - ((float *)y->data)[i * 4 + j]));
            }
    MT_CHECK(err < 1e-5, "2-D matmul error %g", err);
    mgpu_context_end_step(ctx);
    in[0] = a; in[1] = b;
    g = MT_GRADCHECK(ctx, f_matmul, in, 2, NULL);
    MT_CHECK(g <= 1, "2-D matmul gradcheck %g", g);
    mgpu_tensor_free(a); mgpu_tensor_free(b);

    a = mt_rand(ctx, 3, ba, -1, 1, 1); b = mt_rand(ctx, 3, bb, -1, 1, 1);
    y = mgpu_op_matmul(ctx, a, b);
    err = 0;
    MT_CHECK(y && y->ndim == 3 && y->shape[0] == 3 && y->shape[1] == 4 && y->shape[2] == 5, "batched shape");
    if (y)
        for (bi = 0; bi < 3; bi++)
            for (i = 0; i < 4; i++)
                for (j = 0; j < 5; j++) {
                    double ref = 0;
                    for (p = 0; p < 6; p++) ref += (double)((float *)a->data)[bi * 24 + i * 6 + p] * ((float *)b->data)[bi * 30 + p * 5 + j];
                    err = fmax(err, fabs(ref - ((float *)y->data)[bi * 20 + i * 5 + j]));
                }
    MT_CHECK(err < 1e-5, "batched matmul error %g", err);
    mgpu_context_end_step(ctx);
    in[0] = a; in[1] = b;
    g = MT_GRADCHECK(ctx, f_matmul, in, 2, NULL);
    MT_CHECK(g <= 1, "batched matmul gradcheck %g", g);
    /* gradients accumulate across backwards: twice the analytic gradient of one */
    {
        float *once_a = NULL, *once_b = NULL;
        int rep, ok_a = 1, ok_b = 1;
        mgpu_tensor_zero_grad(a); mgpu_tensor_zero_grad(b);
        for (rep = 0; rep < 2; rep++) {
            MT_CHECK(mt_backward_sum(ctx, mgpu_op_matmul(ctx, a, b)) == MGPU_OK, "matmul backward: %s", mgpu_last_error());
            mgpu_context_end_step(ctx);
            if (rep == 0 && a->grad && b->grad) { once_a = mt_copy(a->grad); once_b = mt_copy(b->grad); }
        }
        for (i = 0; once_a && i < a->numel; i++) if (((float *)a->grad->data)[i] != 2 * once_a[i]) ok_a = 0;
        for (i = 0; once_b && i < b->numel; i++) if (((float *)b->grad->data)[i] != 2 * once_b[i]) ok_b = 0;
        MT_CHECK(once_a && ok_a && ok_b, "matmul grads accumulate (dA %d, dB %d)", ok_a, ok_b);
        free(once_a); free(once_b);
    }
    mgpu_tensor_free(a); mgpu_tensor_free(b);
    mgpu_context_destroy(ctx);
}

static void test_linear(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t sx[3] = {2, 3, 5}, sw[2] = {4, 5}, sb[1] = {4}, i, o, p;
    mgpu_tensor *x = mt_rand(ctx, 3, sx, -1, 1, 1), *w = mt_rand(ctx, 2, sw, -1, 1, 1), *b = mt_rand(ctx, 1, sb, -1, 1, 1);
    mgpu_tensor *in[3], *y;
    double g, err = 0;
    y = mgpu_op_linear(ctx, x, w, b);
    MT_CHECK(y && y->ndim == 3 && y->shape[0] == 2 && y->shape[1] == 3 && y->shape[2] == 4, "linear shape");
    if (y)
        for (i = 0; i < 6; i++)
            for (o = 0; o < 4; o++) {
                double ref = ((float *)b->data)[o];
                for (p = 0; p < 5; p++) ref += (double)((float *)x->data)[i * 5 + p] * ((float *)w->data)[o * 5 + p];
                err = fmax(err, fabs(ref - ((float *)y->data)[i * 4 + o]));
            }
    MT_CHECK(err < 1e-5, "linear value error %g", err);
    mgpu_context_end_step(ctx);
    in[0] = x; in[1] = w; in[2] = b;
    g = MT_GRADCHECK(ctx, f_linear, in, 3, NULL);
    MT_CHECK(g <= 1, "linear (bias, 3-D input) gradcheck %g", g);
    in[2] = NULL;
    g = MT_GRADCHECK(ctx, f_linear, in, 3, NULL);
    MT_CHECK(g <= 1, "linear (no bias) gradcheck %g", g);

    {   /* 1-D input (in) -> (out) */
        int64_t s1[1] = {5};
        mgpu_tensor *x1 = mt_rand(ctx, 1, s1, -1, 1, 1), *y1 = mgpu_op_linear(ctx, x1, w, b);
        MT_CHECK(y1 && y1->ndim == 1 && y1->shape[0] == 4, "1-D linear shape");
        if (y1) {
            double ref = ((float *)b->data)[2];
            for (p = 0; p < 5; p++) ref += (double)((float *)x1->data)[p] * ((float *)w->data)[2 * 5 + p];
            MT_CHECK(fabs(ref - ((float *)y1->data)[2]) < 1e-5, "1-D linear value %g vs %g", ((float *)y1->data)[2], ref);
        }
        mgpu_context_end_step(ctx);
        mgpu_tensor_free(x1);
    }
    /* input without requires_grad: no dX is computed; weight grads accumulate over two backwards */
    mgpu_tensor_set_requires_grad(x, 0);
    mgpu_tensor_free(x->grad); x->grad = NULL;
    mgpu_tensor_zero_grad(w); mgpu_tensor_zero_grad(b);
    for (p = 0; p < 2; p++) {
        MT_CHECK(mt_backward_sum(ctx, mgpu_op_linear(ctx, x, w, b)) == MGPU_OK, "backward: %s", mgpu_last_error());
        mgpu_context_end_step(ctx);
    }
    MT_CHECK(x->grad == NULL, "no grad for an input that does not require it");
    /* d(sum)/db = rows = 6 per backward; d(sum)/dW[o][p] = sum of x[:, p] */
    for (o = 0; o < 4; o++) MT_CHECK(fabs(((float *)b->grad->data)[o] - 12.0) < 1e-5, "db accumulates: %g", ((float *)b->grad->data)[o]);
    for (p = 0; p < 5; p++) {
        double colsum = 0;
        for (i = 0; i < 6; i++) colsum += ((float *)x->data)[i * 5 + p];
        MT_CHECK(fabs(((float *)w->grad->data)[p] - 2 * colsum) < 1e-5, "dW accumulates: %g vs %g", ((float *)w->grad->data)[p], 2 * colsum);
    }
    mgpu_tensor_free(x); mgpu_tensor_free(w); mgpu_tensor_free(b);
    mgpu_context_destroy(ctx);
}

/* ---------------------------------------------------------------- conv2d */

typedef struct { int stride, padding; } mt_conv_args;
static mgpu_tensor *f_conv(mgpu_context *ctx, mgpu_tensor **in, void *u) {
    mt_conv_args *a = (mt_conv_args *)u;
    return mgpu_op_conv2d(ctx, in[0], in[1], in[2], a->stride, a->padding);
}

/* Direct convolution in double, the definition of PyTorch's Conv2d (cross-correlation). */
static double mt_conv_ref(const mgpu_tensor *x, const mgpu_tensor *w, const mgpu_tensor *b, int s, int pd, int64_t n, int64_t o, int64_t oy, int64_t ox) {
    int64_t C = x->shape[1], H = x->shape[2], W = x->shape[3], K = w->shape[2], c, ky, kx;
    double acc = b ? ((float *)b->data)[o] : 0;
    for (c = 0; c < C; c++)
        for (ky = 0; ky < K; ky++)
            for (kx = 0; kx < K; kx++) {
                int64_t iy = oy * s - pd + ky, ix = ox * s - pd + kx;
                if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                acc += (double)((float *)x->data)[((n * C + c) * H + iy) * W + ix] * ((float *)w->data)[((o * C + c) * K + ky) * K + kx];
            }
    return acc;
}

static void test_conv2d_hand_values(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    int64_t sx[4] = {1, 1, 3, 3}, sw[4] = {1, 1, 2, 2}, sb[1] = {1};
    float xv[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9}, wv[4] = {1, 2, 3, 4}, bv[1] = {0.5f};
    mgpu_tensor *x = mgpu_tensor_from_host(ctx, MGPU_F32, 4, sx, xv), *w = mgpu_tensor_from_host(ctx, MGPU_F32, 4, sw, wv);
    mgpu_tensor *b = mgpu_tensor_from_host(ctx, MGPU_F32, 1, sb, bv);
    mgpu_tensor *y = mgpu_op_conv2d(ctx, x, w, b, 1, 0);
    float *v;
    MT_CHECK(y && y->shape[2] == 2 && y->shape[3] == 2, "conv output 2x2");
    if (y) {
        v = (float *)y->data;   /* 1*1+2*2+3*4+4*5 = 37, ... */
        MT_CHECK(v[0] == 37.5f && v[1] == 47.5f && v[2] == 67.5f && v[3] == 77.5f, "stride 1: %g %g %g %g", v[0], v[1], v[2], v[3]);
    }
    y = mgpu_op_conv2d(ctx, x, w, b, 2, 1);   /* windows start at -1: corners see 1, 2 or 4 taps */
    MT_CHECK(y && y->shape[2] == 2 && y->shape[3] == 2, "conv stride 2 pad 1 output 2x2");
    if (y) {
        v = (float *)y->data;   /* 1*4 ; 2*3+3*4 ; 4*2+7*4 ; 5*1+6*2+8*3+9*4 */
        MT_CHECK(v[0] == 4.5f && v[1] == 18.5f && v[2] == 36.5f && v[3] == 77.5f, "stride 2 pad 1: %g %g %g %g", v[0], v[1], v[2], v[3]);
    }
    mgpu_context_end_step(ctx);
    mgpu_tensor_free(x); mgpu_tensor_free(w); mgpu_tensor_free(b);
    mgpu_context_destroy(ctx);
}

static void test_conv2d_values_and_grads(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    /* N, C, H, W, O, K, stride, padding, bias */
    static const int cfg[][9] = {{2, 3, 7, 6, 4, 3, 1, 0, 1}, {2, 3, 7, 6, 4, 3, 2, 1, 1}, {1, 2, 5, 9, 3, 3, 1, 1, 0},
                                 {2, 2, 9, 7, 3, 2, 2, 0, 1}, {2, 4, 5, 5, 3, 1, 1, 0, 1}, {1, 2, 6, 5, 2, 5, 3, 2, 1},
                                 {9, 2, 5, 6, 3, 3, 2, 1, 1}};   /* 9 images: one task per image, dW in chunks */
    int t;
    for (t = 0; t < (int)(sizeof cfg / sizeof cfg[0]); t++) {
        const int *c = cfg[t];
        int64_t sx[4] = {c[0], c[1], c[2], c[3]}, sw[4] = {c[4], c[1], c[5], c[5]}, sb[1] = {c[4]}, n, o, oy, ox;
        mgpu_tensor *x = mt_rand(ctx, 4, sx, -1, 1, 1), *w = mt_rand(ctx, 4, sw, -1, 1, 1);
        mgpu_tensor *b = c[8] ? mt_rand(ctx, 1, sb, -1, 1, 1) : NULL, *in[3], *y;
        mt_conv_args args;
        double err = 0, g;
        args.stride = c[6]; args.padding = c[7];
        y = mgpu_op_conv2d(ctx, x, w, b, args.stride, args.padding);
        MT_CHECK(y != NULL, "conv config %d: %s", t, mgpu_last_error());
        if (y) {
            int64_t OH = (c[2] + 2 * c[7] - c[5]) / c[6] + 1, OW = (c[3] + 2 * c[7] - c[5]) / c[6] + 1;
            MT_CHECK(y->shape[0] == c[0] && y->shape[1] == c[4] && y->shape[2] == OH && y->shape[3] == OW, "conv config %d shape %s", t, "");
            for (n = 0; n < c[0]; n++)
                for (o = 0; o < c[4]; o++)
                    for (oy = 0; oy < OH; oy++)
                        for (ox = 0; ox < OW; ox++)
                            err = fmax(err, fabs(mt_conv_ref(x, w, b, c[6], c[7], n, o, oy, ox) - ((float *)y->data)[((n * c[4] + o) * OH + oy) * OW + ox]));
            MT_CHECK(err < 1e-5, "conv config %d value error %g", t, err);
        }
        mgpu_context_end_step(ctx);
        in[0] = x; in[1] = w; in[2] = b;
        g = MT_GRADCHECK(ctx, f_conv, in, 3, &args);
        MT_CHECK(g <= 1, "conv config %d gradcheck %g", t, g);
        mgpu_tensor_free(x); mgpu_tensor_free(w); mgpu_tensor_free(b);
    }
    mgpu_context_destroy(ctx);
}

/* conv forward and all three gradients are bit-identical with 1, 2 and 3 threads, for a batch
   run one image per task (9) and one run image by image with threaded GEMMs (3). */
static void test_conv2d_thread_determinism(void) {
    static const int64_t batches[2] = {9, 3};
    int bi, t, q;
    for (bi = 0; bi < 2; bi++) {
        int64_t sx[4] = {0, 6, 14, 14}, sw[4] = {16, 6, 3, 3}, sb[1] = {16};
        float *res[3][4];
        size_t sizes[4];
        sx[0] = batches[bi];
        for (t = 0; t < 3; t++) {
            mgpu_context *ctx = mt_cpu_context(t + 1);
            mgpu_tensor *x, *w, *b, *y, *R;
            mt_rng_state = 0x9e3779b97f4a7c15ULL;
            x = mt_rand(ctx, 4, sx, -1, 1, 1); w = mt_rand(ctx, 4, sw, -1, 1, 1); b = mt_rand(ctx, 1, sb, -1, 1, 1);
            y = mgpu_op_conv2d(ctx, x, w, b, 1, 1);
            R = y ? mt_rand(ctx, 4, y->shape, -1, 1, 0) : NULL;
            MT_CHECK(y && R && mgpu_backward_with_grad(ctx, y, R) == MGPU_OK, "conv backward: %s", mgpu_last_error());
            if (!y || !x->grad || !w->grad || !b->grad) { mgpu_context_destroy(ctx); return; }
            sizes[0] = mgpu_tensor_nbytes(y); sizes[1] = mgpu_tensor_nbytes(x); sizes[2] = mgpu_tensor_nbytes(w); sizes[3] = mgpu_tensor_nbytes(b);
            res[t][0] = mt_copy(y); res[t][1] = mt_copy(x->grad); res[t][2] = mt_copy(w->grad); res[t][3] = mt_copy(b->grad);
            mgpu_context_end_step(ctx);
            mgpu_tensor_free(R); mgpu_tensor_free(x); mgpu_tensor_free(w); mgpu_tensor_free(b);
            mgpu_context_destroy(ctx);
        }
        for (t = 1; t < 3; t++)
            for (q = 0; q < 4; q++)
                MT_CHECK(memcmp(res[0][q], res[t][q], sizes[q]) == 0, "batch %lld: conv result %d differs between 1 and %d threads",
                         (long long)batches[bi], q, t + 1);
        for (t = 0; t < 3; t++) for (q = 0; q < 4; q++) free(res[t][q]);
    }
}

/* conv2d (no bias) forward and backward seeded with r (same shape as the output); returns
   malloc'd copies of y, dx, dw (NULL for grads not required). */
typedef struct { float *y, *dx, *dw; } mt_conv_result;
static mt_conv_result mt_conv_run(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, int stride, int pad, const float *r) {
    mt_conv_result res;
    mgpu_tensor *y, *R;
    memset(&res, 0, sizeof res);
    if (x->grad) mgpu_tensor_zero_grad(x);
    if (w->grad) mgpu_tensor_zero_grad(w);
    y = mgpu_op_conv2d(ctx, x, w, NULL, stride, pad);
    if (!y) return res;
    R = mgpu_tensor_from_host(ctx, MGPU_F32, 4, y->shape, r);
    if (mgpu_backward_with_grad(ctx, y, R) == MGPU_OK) {
        res.y = mt_copy(y);
        if (x->requires_grad && x->grad) res.dx = mt_copy(x->grad);
        if (w->requires_grad && w->grad) res.dw = mt_copy(w->grad);
    }
    mgpu_tensor_free(R);
    mgpu_context_end_step(ctx);
    return res;
}
static void mt_conv_free(mt_conv_result *r) { free(r->y); free(r->dx); free(r->dw); }

/* A batch of >= 8 images runs one image per task with the weight gradient summed per chunk of 4
   images; it must agree with the images run one at a time through threaded GEMMs (forward and dX
   bit for bit, dW to rounding). Then only w, and only x, requiring grad give the same numbers. */
static void test_conv2d_batch_paths_and_partial_grads(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t sx[4] = {13, 16, 20, 20}, sw[4] = {4, 16, 3, 3}, s1[4] = {1, 16, 20, 20};
    int64_t per_x = 16 * 20 * 20, per_y = 4 * 20 * 20, nw = 4 * 16 * 9, n, i;
    mgpu_tensor *x = mt_rand(ctx, 4, sx, -1, 1, 1), *w = mt_rand(ctx, 4, sw, -1, 1, 1);
    mgpu_tensor *x1 = mt_rand(ctx, 4, s1, 0, 1, 1);
    float *r = (float *)malloc(sizeof(float) * (size_t)(13 * per_y));
    double *dw_sum = (double *)calloc((size_t)nw, sizeof(double)), werr = 0, wmag = 0;
    mt_conv_result full, one;
    int y_same = 1, dx_same = 1;
    for (i = 0; i < 13 * per_y; i++) r[i] = (float)mt_uniform(-1, 1);
    full = mt_conv_run(ctx, x, w, 1, 1, r);
    MT_CHECK(full.y && full.dx && full.dw, "batched conv ran: %s", mgpu_last_error());
    for (n = 0; n < sx[0] && full.y; n++) {
        memcpy(x1->data, (float *)x->data + n * per_x, sizeof(float) * (size_t)per_x);
        one = mt_conv_run(ctx, x1, w, 1, 1, r + n * per_y);
        if (!one.y || memcmp(one.y, full.y + n * per_y, sizeof(float) * (size_t)per_y) != 0) y_same = 0;
        if (!one.dx || memcmp(one.dx, full.dx + n * per_x, sizeof(float) * (size_t)per_x) != 0) dx_same = 0;
        for (i = 0; i < nw && one.dw; i++) dw_sum[i] += one.dw[i];
        mt_conv_free(&one);
    }
    for (i = 0; i < nw && full.dw; i++) { werr = fmax(werr, fabs(dw_sum[i] - full.dw[i])); wmag = fmax(wmag, fabs(dw_sum[i])); }
    MT_CHECK(y_same, "batched forward equals per-image forward bit for bit");
    MT_CHECK(dx_same, "batched dX equals per-image dX bit for bit");
    MT_CHECK(wmag > 0 && werr <= 1e-5 * wmag, "batched dW vs sum of per-image dW: err %g of %g", werr, wmag);

    mgpu_tensor_set_requires_grad(x, 0);
    one = mt_conv_run(ctx, x, w, 1, 1, r);
    MT_CHECK(one.dw && full.dw && memcmp(one.dw, full.dw, sizeof(float) * (size_t)nw) == 0, "dW alone matches");
    mt_conv_free(&one);
    mgpu_tensor_set_requires_grad(x, 1); mgpu_tensor_set_requires_grad(w, 0);
    one = mt_conv_run(ctx, x, w, 1, 1, r);
    MT_CHECK(one.dx && full.dx && memcmp(one.dx, full.dx, sizeof(float) * (size_t)(13 * per_x)) == 0, "dX alone matches");
    mt_conv_free(&one);
    mt_conv_free(&full);
    free(dw_sum); free(r);
    mgpu_tensor_free(x); mgpu_tensor_free(x1); mgpu_tensor_free(w);
    mgpu_context_destroy(ctx);
}

/* Two backwards without zeroing give twice the gradients of one (they accumulate), for both batch
   paths, pointwise (1x1) and 3x3 kernels. */
static void test_conv2d_grads_accumulate(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    static const int64_t cfg[4][2] = {{3, 1}, {3, 3}, {9, 1}, {9, 3}};   /* batch, kernel */
    int t, rep, q;
    for (t = 0; t < 4; t++) {
        int64_t sx[4] = {cfg[t][0], 3, 6, 5}, sw[4] = {4, 3, cfg[t][1], cfg[t][1]}, sb[1] = {4}, i;
        mgpu_tensor *ts[3], *y, *R;
        float *once[3];
        double worst = 0;
        ts[0] = mt_rand(ctx, 4, sx, -1, 1, 1); ts[1] = mt_rand(ctx, 4, sw, -1, 1, 1); ts[2] = mt_rand(ctx, 1, sb, -1, 1, 1);
        for (rep = 0; rep < 2; rep++) {
            y = mgpu_op_conv2d(ctx, ts[0], ts[1], ts[2], 1, cfg[t][1] / 2);
            mt_rng_state = 99;
            R = y ? mt_rand(ctx, 4, y->shape, -1, 1, 0) : NULL;
            MT_CHECK(y && mgpu_backward_with_grad(ctx, y, R) == MGPU_OK, "conv backward: %s", mgpu_last_error());
            mgpu_context_end_step(ctx);
            mgpu_tensor_free(R);
            if (rep == 0) for (q = 0; q < 3; q++) once[q] = mt_copy(ts[q]->grad);
        }
        for (q = 0; q < 3; q++) {
            for (i = 0; i < ts[q]->numel; i++) {
                double want = 2.0 * once[q][i], got = ((float *)ts[q]->grad->data)[i];
                worst = fmax(worst, fabs(got - want) / (fabs(want) + 1e-3));
            }
            free(once[q]);
            mgpu_tensor_free(ts[q]);
        }
        MT_CHECK(worst < 1e-5, "batch %lld kernel %lld: conv grads after two backwards are not twice one (rel err %g)",
                 (long long)cfg[t][0], (long long)cfg[t][1], worst);
    }
    mgpu_context_destroy(ctx);
}

/* ---------------------------------------------------------------- pooling */

typedef struct { int kernel, stride, padding, is_max; } mt_pool_args;
static mgpu_tensor *f_pool(mgpu_context *ctx, mgpu_tensor **in, void *u) {
    mt_pool_args *a = (mt_pool_args *)u;
    return a->is_max ? mgpu_op_max_pool2d(ctx, in[0], a->kernel, a->stride, a->padding)
                     : mgpu_op_avg_pool2d(ctx, in[0], a->kernel, a->stride, a->padding);
}

/* Tensor whose values are a random permutation of 0.05 * i: distinct and far apart, so a
   finite-difference step of 0.01 never changes which element is the maximum. */
static mgpu_tensor *mt_distinct(mgpu_context *ctx, int ndim, const int64_t *shape) {
    mgpu_tensor *t = mgpu_tensor_create(ctx, MGPU_F32, ndim, shape);
    float *v = (float *)t->data;
    int64_t i;
    for (i = 0; i < t->numel; i++) v[i] = 0.05f * (float)(i - t->numel / 2);
    for (i = t->numel - 1; i > 0; i--) {
        int64_t j = (int64_t)mt_uniform(0, (double)(i + 1));
        float s = v[i]; v[i] = v[j]; v[j] = s;
    }
    mgpu_tensor_set_requires_grad(t, 1);
    return t;
}

/* Pooling reference: max over the window's real elements, or sum / k^2 (count_include_pad). */
static double mt_pool_ref(const mgpu_tensor *x, const mt_pool_args *a, int64_t plane, int64_t oy, int64_t ox) {
    int64_t H = x->shape[2], W = x->shape[3], s = a->stride ? a->stride : a->kernel, y, xx;
    double acc = a->is_max ? -INFINITY : 0;
    for (y = oy * s - a->padding; y < oy * s - a->padding + a->kernel; y++)
        for (xx = ox * s - a->padding; xx < ox * s - a->padding + a->kernel; xx++) {
            double v;
            if (y < 0 || y >= H || xx < 0 || xx >= W) continue;
            v = ((float *)x->data)[plane * H * W + y * W + xx];
            acc = a->is_max ? fmax(acc, v) : acc + v;
        }
    return a->is_max ? acc : acc / (a->kernel * a->kernel);
}

static void test_pool_values_and_grads(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    /* kernel, stride, padding, is_max, H, W */
    static const int cfg[][6] = {{2, 0, 0, 1, 6, 6}, {3, 2, 1, 1, 7, 7}, {3, 1, 1, 1, 5, 6}, {2, 0, 1, 1, 5, 5},
                                 {2, 0, 0, 0, 6, 6}, {3, 2, 1, 0, 7, 7}, {3, 1, 0, 0, 5, 6}, {2, 2, 1, 0, 5, 5}};
    int t;
    for (t = 0; t < (int)(sizeof cfg / sizeof cfg[0]); t++) {
        const int *c = cfg[t];
        int64_t sx[4] = {2, 3, c[4], c[5]}, pl, oy, ox;
        mt_pool_args a;
        mgpu_tensor *x = mt_distinct(ctx, 4, sx), *y, *in[1];
        double err = 0, g;
        a.kernel = c[0]; a.stride = c[1]; a.padding = c[2]; a.is_max = c[3];
        y = f_pool(ctx, &x, &a);
        MT_CHECK(y != NULL, "pool config %d: %s", t, mgpu_last_error());
        if (y) {
            int64_t s = c[1] ? c[1] : c[0], OH = (c[4] + 2 * c[2] - c[0]) / s + 1, OW = (c[5] + 2 * c[2] - c[0]) / s + 1;
            MT_CHECK(y->shape[2] == OH && y->shape[3] == OW, "pool config %d: output %lldx%lld, want %lldx%lld", t,
                     (long long)y->shape[2], (long long)y->shape[3], (long long)OH, (long long)OW);
            for (pl = 0; pl < 6; pl++)
                for (oy = 0; oy < OH; oy++)
                    for (ox = 0; ox < OW; ox++)
                        err = fmax(err, fabs(mt_pool_ref(x, &a, pl, oy, ox) - ((float *)y->data)[(pl * OH + oy) * OW + ox]));
            MT_CHECK(err < 1e-6, "pool config %d value error %g", t, err);
        }
        mgpu_context_end_step(ctx);
        in[0] = x;
        g = MT_GRADCHECK(ctx, f_pool, in, 1, &a);
        MT_CHECK(g <= 1, "pool config %d gradcheck %g", t, g);
        mgpu_tensor_free(x);
    }
    mgpu_context_destroy(ctx);
}

static void test_pool_hand_values(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    int64_t sx[4] = {1, 1, 3, 3};
    float xv[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
    mgpu_tensor *x = mgpu_tensor_from_host(ctx, MGPU_F32, 4, sx, xv), *y;
    float *v;
    mgpu_tensor_set_requires_grad(x, 1);
    y = mgpu_op_avg_pool2d(ctx, x, 2, 1, 1);   /* 4x4; corners see one element, divided by 4 anyway */
    MT_CHECK(y && y->shape[2] == 4 && y->shape[3] == 4, "avg pool 4x4");
    if (y) {
        v = (float *)y->data;   /* (0,0): 1/4; (0,1): (1+2)/4; (1,1): (1+2+4+5)/4; (3,3): 9/4 */
        MT_CHECK(v[0] == 0.25f && v[1] == 0.75f && v[5] == 3.0f && v[15] == 2.25f, "avg values %g %g %g %g", v[0], v[1], v[5], v[15]);
    }
    y = mgpu_op_max_pool2d(ctx, x, 2, 1, 0);   /* 2x2 windows: maxima 5 6 8 9 */
    MT_CHECK(y && ((float *)y->data)[0] == 5 && ((float *)y->data)[3] == 9, "max values");
    MT_CHECK(mt_backward_sum(ctx, y) == MGPU_OK, "max pool backward: %s", mgpu_last_error());
    if (x->grad) {
        v = (float *)x->grad->data;   /* each maximum gets the gradient of every window it wins */
        MT_CHECK(v[4] == 1 && v[5] == 1 && v[7] == 1 && v[8] == 1 && v[0] == 0, "max grads %g %g %g %g %g", v[4], v[5], v[7], v[8], v[0]);
    }
    mgpu_context_end_step(ctx);
    /* ties: the gradient goes to the first maximum in scan order; NaN wins (as in PyTorch) */
    {
        float tv[9] = {3, 3, 0, 3, 3, 0, 0, 0, 0};
        mgpu_tensor_copy_from_host(x, tv, sizeof tv);
        mgpu_tensor_zero_grad(x);
        y = mgpu_op_max_pool2d(ctx, x, 2, 0, 0);   /* one 2x2 window of four 3s */
        MT_CHECK(y && y->numel == 1 && ((float *)y->data)[0] == 3, "tie value");
        MT_CHECK(mt_backward_sum(ctx, y) == MGPU_OK, "tie backward");
        v = (float *)x->grad->data;
        MT_CHECK(v[0] == 1 && v[1] == 0 && v[3] == 0 && v[4] == 0, "tie grad to the first: %g %g %g %g", v[0], v[1], v[3], v[4]);
        mgpu_context_end_step(ctx);
        tv[4] = NAN;
        mgpu_tensor_copy_from_host(x, tv, sizeof tv);
        y = mgpu_op_max_pool2d(ctx, x, 2, 1, 0);
        MT_CHECK(y && isnan(((float *)y->data)[0]) && isnan(((float *)y->data)[3]), "NaN propagates through max");
        mgpu_context_end_step(ctx);
    }
    mgpu_tensor_free(x);
    mgpu_context_destroy(ctx);
}

/* ---------------------------------------------------------------- errors */

static void test_errors(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    int64_t s23[2] = {2, 3}, s43[2] = {4, 3}, s4[1] = {4}, sx[4] = {1, 3, 5, 5}, sw[4] = {2, 4, 3, 3}, sw2[4] = {2, 3, 3, 2}, sw3[4] = {2, 3, 3, 3};
    mgpu_tensor *a = mt_rand(ctx, 2, s23, -1, 1, 0), *b = mt_rand(ctx, 2, s43, -1, 1, 0), *b4 = mt_rand(ctx, 1, s4, -1, 1, 0);
    mgpu_tensor *ai = mgpu_tensor_create(ctx, MGPU_I32, 2, s23), *x = mt_rand(ctx, 4, sx, -1, 1, 0);
    mgpu_tensor *w = mt_rand(ctx, 4, sw, -1, 1, 0), *w2 = mt_rand(ctx, 4, sw2, -1, 1, 0), *w3 = mt_rand(ctx, 4, sw3, -1, 1, 0);

    MT_CHECK(mgpu_op_matmul(ctx, a, b) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "matmul (2,3)@(4,3)");
    MT_CHECK(strstr(mgpu_last_error(), "(2, 3)") && strstr(mgpu_last_error(), "(4, 3)"), "message has both shapes: %s", mgpu_last_error());
    MT_CHECK(mgpu_op_matmul(ctx, ai, b) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE && strstr(mgpu_last_error(), "I32"), "I32 rejected: %s", mgpu_last_error());
    mgpu_clear_error();
    MT_CHECK(mgpu_op_matmul(ctx, NULL, b) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "NULL input");
    MT_CHECK(mgpu_op_linear(ctx, a, b, b4) != NULL, "linear (2,3) x w (4,3) is fine: %s", mgpu_last_error());
    MT_CHECK(mgpu_op_linear(ctx, x, b, NULL) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "linear in mismatch (5 vs 3)");
    MT_CHECK(strstr(mgpu_last_error(), "(1, 3, 5, 5)") && strstr(mgpu_last_error(), "(4, 3)"), "linear message: %s", mgpu_last_error());
    MT_CHECK(mgpu_op_linear(ctx, a, x, NULL) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "linear 4-D weight");
    MT_CHECK(mgpu_op_linear(ctx, a, b, a) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "linear bias shape");
    /* NULL input keeps the first error */
    mgpu_clear_error();
    MT_CHECK(mgpu_op_matmul(ctx, a, b) == NULL, "first error");
    MT_CHECK(mgpu_op_linear(ctx, mgpu_op_matmul(ctx, a, b), b, NULL) == NULL && strstr(mgpu_last_error(), "mgpu_op_matmul"),
             "first error kept: %s", mgpu_last_error());
    mgpu_clear_error();
    MT_CHECK(mgpu_op_linear(NULL, a, b, NULL) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "NULL ctx");

    MT_CHECK(mgpu_op_conv2d(ctx, x, w, NULL, 1, 0) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "conv channel mismatch");
    MT_CHECK(strstr(mgpu_last_error(), "(1, 3, 5, 5)") && strstr(mgpu_last_error(), "(2, 4, 3, 3)"), "conv message has both shapes: %s", mgpu_last_error());
    MT_CHECK(mgpu_op_conv2d(ctx, x, w2, NULL, 1, 0) == NULL && mgpu_last_result() == MGPU_ERR_UNSUPPORTED, "non-square kernel");
    MT_CHECK(mgpu_op_conv2d(ctx, x, w3, NULL, 0, 0) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "stride 0");
    MT_CHECK(mgpu_op_conv2d(ctx, x, w3, b4, 1, 0) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "conv bias (4) for 2 channels");
    MT_CHECK(mgpu_op_conv2d(ctx, a, w3, NULL, 1, 0) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "conv 2-D input");
    MT_CHECK(mgpu_op_conv2d(ctx, x, w3, NULL, 1, 0) != NULL, "valid conv: %s", mgpu_last_error());

    MT_CHECK(mgpu_op_max_pool2d(ctx, x, 2, 0, 2) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "padding > kernel / 2");
    MT_CHECK(strstr(mgpu_last_error(), "padding"), "names padding: %s", mgpu_last_error());
    MT_CHECK(mgpu_op_avg_pool2d(ctx, x, 0, 0, 0) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "kernel 0");
    MT_CHECK(mgpu_op_avg_pool2d(ctx, x, 7, 1, 0) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "kernel larger than input");
    MT_CHECK(mgpu_op_max_pool2d(ctx, a, 2, 0, 0) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "pool 2-D input");
    MT_CHECK(mgpu_op_max_pool2d(ctx, ai, 2, 0, 0) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "pool I32 input");
    mgpu_context_end_step(ctx);
    mgpu_tensor_free(a); mgpu_tensor_free(b); mgpu_tensor_free(b4); mgpu_tensor_free(ai); mgpu_tensor_free(x);
    mgpu_tensor_free(w); mgpu_tensor_free(w2); mgpu_tensor_free(w3);
    mgpu_context_destroy(ctx);
}

int main(void) {
    MT_RUN(test_gemm_values);
    MT_RUN(test_gemm_degenerate);
    MT_RUN(test_gemm_thread_determinism);
    MT_RUN(test_gemm_without_scratch);
    MT_RUN(test_matmul_values_and_grads);
    MT_RUN(test_linear);
    MT_RUN(test_conv2d_hand_values);
    MT_RUN(test_conv2d_values_and_grads);
    MT_RUN(test_conv2d_thread_determinism);
    MT_RUN(test_conv2d_batch_paths_and_partial_grads);
    MT_RUN(test_conv2d_grads_accumulate);
    MT_RUN(test_pool_values_and_grads);
    MT_RUN(test_pool_hand_values);
    MT_RUN(test_errors);
    return MT_END();
}
