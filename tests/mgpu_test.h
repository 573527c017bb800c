/* Minimal test harness shared by the test programs.
   MT_CHECK(cond, fmt, ...) records a failed check; MT_SKIP(fmt, ...) marks the running case as
   skipped (what it needs is missing: said, and counted apart, never as a pass); MT_RUN(fn) runs
   one test case; MT_END() prints "RESULT <file>: N passed, M failed" plus ", K skipped" when some
   were (tests/run.sh sums these). */
#ifndef MGPU_TEST_H
#define MGPU_TEST_H
#include "mgpu.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int mt_case_failures = 0, mt_passed = 0, mt_failed = 0, mt_case_skipped = 0, mt_skipped = 0;

#define MT_CHECK(cond, ...) do { if (!(cond)) { mt_case_failures++; \
    fprintf(stderr, "  check failed at %s:%d: %s: ", __FILE__, __LINE__, #cond); \
    fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); } } while (0)
/* A skip after a failed check leaves the case failed. */
#define MT_SKIP(...) do { mt_case_skipped = 1; printf("  skip: "); printf(__VA_ARGS__); printf("\n"); } while (0)
#define MT_RUN(fn) do { int mt_before_ = mt_case_failures; mgpu_clear_error(); mt_case_skipped = 0; fn(); \
    if (mt_case_failures != mt_before_) { mt_failed++; printf("  FAIL %s\n", #fn); } \
    else if (mt_case_skipped) { mt_skipped++; printf("  SKIP %s\n", #fn); } \
    else { mt_passed++; printf("  ok   %s\n", #fn); } fflush(stdout); } while (0)
#define MT_END() (mt_skipped ? printf("RESULT %s: %d passed, %d failed, %d skipped\n", __FILE__, mt_passed, mt_failed, mt_skipped) \
                             : printf("RESULT %s: %d passed, %d failed\n", __FILE__, mt_passed, mt_failed), mt_failed ? 1 : 0)

/* Deterministic test RNG (xorshift) */
static uint64_t mt_rng_state = 0x1234567887654321ULL;
static __attribute__((unused)) double mt_uniform(double lo, double hi) {
    mt_rng_state ^= mt_rng_state << 13; mt_rng_state ^= mt_rng_state >> 7; mt_rng_state ^= mt_rng_state << 17;
    return lo + (hi - lo) * (double)(mt_rng_state >> 11) * (1.0 / 9007199254740992.0);
}
/* Persistent F32 tensor with uniform random values in [lo, hi) and requires_grad as given. */
static __attribute__((unused)) mgpu_tensor *mt_rand(mgpu_context *ctx, int ndim, const int64_t *shape, double lo, double hi, int requires_grad) {
    mgpu_tensor *t = mgpu_tensor_create(ctx, MGPU_F32, ndim, shape);
    int64_t i;
    if (!t) return NULL;
    for (i = 0; i < t->numel; i++) ((float *)t->data)[i] = (float)mt_uniform(lo, hi);
    mgpu_tensor_set_requires_grad(t, requires_grad);
    return t;
}

/* Finite-difference gradient check.
   f builds an output from inputs (on ctx); the check uses L = sum(out * R) for a random R, compares
   the analytic gradient from mgpu_backward_with_grad with central differences (step eps) for up to
   max_elems elements of each input that requires grad, and returns the worst
   |analytic - numeric| / (atol + rtol * |numeric|) ratio (<= 1 passes). Returns 1e30 on failure.
   The context RNG state is restored before each evaluation so dropout masks repeat. */
typedef mgpu_tensor *(*mt_forward_fn)(mgpu_context *ctx, mgpu_tensor **inputs, void *user);
static double mt_eval_loss(mgpu_context *ctx, mt_forward_fn f, mgpu_tensor **inputs, void *user, const float *r,
                           uint64_t seed, uint64_t off) {
    double L = 0;
    int64_t i;
    mgpu_tensor *out;
    int prev = mgpu_set_grad_enabled(ctx, 0);
    mgpu_context_set_rng_state(ctx, seed, off);
    out = f(ctx, inputs, user);
    if (out) for (i = 0; i < out->numel; i++) L += (double)((float *)out->data)[i] * r[i];
    else L = NAN;
    mgpu_set_grad_enabled(ctx, prev);
    mgpu_context_end_step(ctx);
    return L;
}
static __attribute__((unused)) double mt_gradcheck(mgpu_context *ctx, mt_forward_fn f, mgpu_tensor **inputs, int n, void *user,
                           double eps, double rtol, double atol, int max_elems) {
    uint64_t seed, off;
    mgpu_tensor *out, *R;
    float **analytic;
    double worst = 0;
    int k;
    int64_t i;
    mgpu_context_rng_state(ctx, &seed, &off);
    for (k = 0; k < n; k++) if (inputs[k] && inputs[k]->grad) mgpu_tensor_zero_grad(inputs[k]);
    out = f(ctx, inputs, user);
    if (!out) { fprintf(stderr, "  gradcheck: forward failed: %s\n", mgpu_last_error()); return 1e30; }
    R = mt_rand(ctx, out->ndim, out->shape, -1, 1, 0);
    if (mgpu_backward_with_grad(ctx, out, R) != MGPU_OK) {
        fprintf(stderr, "  gradcheck: backward failed: %s\n", mgpu_last_error());
        mgpu_tensor_free(R); mgpu_context_end_step(ctx); return 1e30;
    }
    mgpu_context_end_step(ctx);
    analytic = (float **)calloc((size_t)n, sizeof(float *));
    for (k = 0; k < n; k++) {
        if (!inputs[k] || !inputs[k]->requires_grad) continue;
        if (!inputs[k]->grad) { fprintf(stderr, "  gradcheck: input %d got no grad\n", k); worst = 1e30; continue; }
        analytic[k] = (float *)malloc(sizeof(float) * (size_t)inputs[k]->numel);
        memcpy(analytic[k], inputs[k]->grad->data, sizeof(float) * (size_t)inputs[k]->numel);
    }
    for (k = 0; k < n; k++) {
        mgpu_tensor *x = inputs[k];
        int64_t stride;
        if (!analytic[k]) continue;
        stride = x->numel > max_elems ? x->numel / max_elems : 1;
        for (i = 0; i < x->numel; i += stride) {
            float *p = (float *)x->data + i, saved = *p;
            double lp, lm, num, err;
            *p = saved + (float)eps; lp = mt_eval_loss(ctx, f, inputs, user, (float *)R->data, seed, off);
            *p = saved - (float)eps; lm = mt_eval_loss(ctx, f, inputs, user, (float *)R->data, seed, off);
            *p = saved;
            num = (lp - lm) / (2 * eps);
            err = fabs(analytic[k][i] - num) / (atol + rtol * fabs(num));
            if (!(err == err)) err = 1e30; /* NaN never passes */
            if (err > worst) worst = err;
            if (err > 1) fprintf(stderr, "  gradcheck: input %d elem %lld analytic %.6g numeric %.6g\n", k, (long long)i, analytic[k][i], num);
        }
        free(analytic[k]);
    }
    free(analytic);
    mgpu_context_set_rng_state(ctx, seed, off);
    mgpu_tensor_free(R);
    return worst;
}
/* Common call: eps 1e-2, rtol 2e-2, atol 2e-3, 64 sampled elements per input. */
#define MT_GRADCHECK(ctx, f, inputs, n, user) mt_gradcheck((ctx), (f), (inputs), (n), (user), 1e-2, 2e-2, 2e-3, 64)

static __attribute__((unused)) mgpu_context *mt_cpu_context(int threads) {
    mgpu_context_desc d;
    memset(&d, 0, sizeof d);
    d.seed = 42; d.num_threads = threads;
    return mgpu_context_create(&d);
}
#endif
