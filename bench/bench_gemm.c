/* mgpu_gemm_f32 throughput on the Fashion-MNIST MLP's GEMM shapes (784-256-128-10, batch 128,
   forward and backward) and a 1024^3 square, in GFLOP/s. Built with -DWITH_OPENBLAS (and linked
   with -lopenblas) it times cblas_sgemm on the same shapes and prints the ratio.
   Threads: MGPU_NUM_THREADS for mgpu, OPENBLAS_NUM_THREADS for OpenBLAS (bench/gemm.sh sets both).
   Usage: bench_gemm [min_seconds_per_shape=0.3] */
#define MGPU_IMPLEMENTATION
#include "mgpu.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef WITH_OPENBLAS
#include <cblas.h>
#endif

typedef struct bench_shape {
    const char *what;
    int trans_a, trans_b;
    int64_t m, n, k;
    float beta;
} bench_shape;

/* The products one MLP training step runs (see mgpu_op_linear): y = x W^T (forward),
   dW += dY^T X, dX += dY W (backward; none for the first layer's input). */
static const bench_shape shapes[] = {
    {"fc1 fwd  X W1^T   ", 0, 1, 128, 256, 784, 1.0f},
    {"fc2 fwd  H1 W2^T  ", 0, 1, 128, 128, 256, 1.0f},
    {"fc3 fwd  H2 W3^T  ", 0, 1, 128, 10, 128, 1.0f},
    {"fc3 dW   dY^T H2  ", 1, 0, 10, 128, 128, 1.0f},
    {"fc3 dX   dY W3    ", 0, 0, 128, 128, 10, 1.0f},
    {"fc2 dW   dY^T H1  ", 1, 0, 128, 256, 128, 1.0f},
    {"fc2 dX   dY W2    ", 0, 0, 128, 256, 128, 1.0f},
    {"fc1 dW   dY^T X   ", 1, 0, 256, 784, 128, 1.0f},
    {"square 1024^3     ", 0, 0, 1024, 1024, 1024, 0.0f},
};
#define N_SHAPES ((int)(sizeof shapes / sizeof shapes[0]))
#define N_MLP 8   /* the first 8 shapes make one training step */

typedef struct bench_buffers { float *a, *b, *c; } bench_buffers;

static void run_mgpu(mgpu_context *ctx, const bench_shape *s, bench_buffers *bb) {
    mgpu_gemm_f32(ctx, s->trans_a, s->trans_b, s->m, s->n, s->k, 1.0f, bb->a, s->trans_a ? s->m : s->k,
                  bb->b, s->trans_b ? s->k : s->n, s->beta, bb->c, s->n);
}
#ifdef WITH_OPENBLAS
static void run_openblas(const bench_shape *s, bench_buffers *bb) {
    cblas_sgemm(CblasRowMajor, s->trans_a ? CblasTrans : CblasNoTrans, s->trans_b ? CblasTrans : CblasNoTrans,
                (int)s->m, (int)s->n, (int)s->k, 1.0f, bb->a, (int)(s->trans_a ? s->m : s->k),
                bb->b, (int)(s->trans_b ? s->k : s->n), s->beta, bb->c, (int)s->n);
}
#endif

/* Best seconds per call: rounds of calls, each round long enough to time, min over rounds. */
static double time_calls(mgpu_context *ctx, const bench_shape *s, bench_buffers *bb, int use_blas, double min_seconds) {
    double best = 1e30, start = mgpu_time_s();
    int reps = 1, i;
    for (;;) {   /* grow the round until it takes >= 20 ms */
        double t0 = mgpu_time_s(), dt;
        for (i = 0; i < reps; i++) {
#ifdef WITH_OPENBLAS
            if (use_blas) { run_openblas(s, bb); continue; }
#endif
            (void)use_blas;
            run_mgpu(ctx, s, bb);
        }
        dt = mgpu_time_s() - t0;
        if (dt >= 0.02) { if (dt / reps < best) best = dt / reps; }
        else reps *= 2;
        if (dt >= 0.02 && mgpu_time_s() - start >= min_seconds) break;
    }
    return best;
}

int main(int argc, char **argv) {
    double min_seconds = argc > 1 ? atof(argv[1]) : 0.3;
    double mlp_mgpu = 0, mlp_blas = 0;
    mgpu_context_desc cd;
    mgpu_context *ctx;
    bench_buffers bb;
    size_t most = 0;
    int i;
    int64_t j;
    memset(&cd, 0, sizeof cd);
    ctx = mgpu_context_create(&cd);
    if (!ctx) { fprintf(stderr, "bench_gemm: %s\n", mgpu_last_error()); return 1; }
    for (i = 0; i < N_SHAPES; i++) {
        size_t mk = (size_t)(shapes[i].m * shapes[i].k), kn = (size_t)(shapes[i].k * shapes[i].n), mn = (size_t)(shapes[i].m * shapes[i].n);
        if (mk > most) most = mk;
        if (kn > most) most = kn;
        if (mn > most) most = mn;
    }
    bb.a = (float *)mgpu_malloc(most * sizeof(float));
    bb.b = (float *)mgpu_malloc(most * sizeof(float));
    bb.c = (float *)mgpu_malloc(most * sizeof(float));
    if (!bb.a || !bb.b || !bb.c) { fprintf(stderr, "bench_gemm: out of memory\n"); return 1; }
    for (j = 0; j < (int64_t)most; j++) {
        bb.a[j] = (float)((j * 7919) % 1000) * 1e-3f - 0.5f;
        bb.b[j] = (float)((j * 104729) % 1000) * 1e-3f - 0.5f;
        bb.c[j] = 0.0f;
    }
    printf("mgpu_gemm_f32 with %d thread(s)%s\n", mgpu_context_num_threads(ctx),
#ifdef WITH_OPENBLAS
           ", OpenBLAS cblas_sgemm (OPENBLAS_NUM_THREADS)"
#else
           ""
#endif
    );
    printf("| shape              | ta tb |    M    N    K | mgpu GFLOP/s |%s\n",
#ifdef WITH_OPENBLAS
           " OpenBLAS GFLOP/s | mgpu/OpenBLAS |"
#else
           ""
#endif
    );
    for (i = 0; i < N_SHAPES; i++) {
        const bench_shape *s = &shapes[i];
        double flops = 2.0 * (double)s->m * (double)s->n * (double)s->k;
        double tm = time_calls(ctx, s, &bb, 0, min_seconds);
        if (i < N_MLP) mlp_mgpu += tm;
        printf("| %s |  %d  %d | %4lld %4lld %4lld | %12.1f |", s->what, s->trans_a, s->trans_b, (long long)s->m,
               (long long)s->n, (long long)s->k, flops / tm * 1e-9);
#ifdef WITH_OPENBLAS
        {
            double tb = time_calls(ctx, s, &bb, 1, min_seconds);
            if (i < N_MLP) mlp_blas += tb;
            printf(" %16.1f | %12.2fx |", flops / tb * 1e-9, tb / tm);
        }
#endif
        printf("\n");
    }
    printf("MLP step GEMMs (first %d rows): mgpu %.1f us", N_MLP, mlp_mgpu * 1e6);
#ifdef WITH_OPENBLAS
    printf(", OpenBLAS %.1f us, mgpu/OpenBLAS speed %.2fx", mlp_blas * 1e6, mlp_blas / mlp_mgpu);
#endif
    printf("\n");
    (void)mlp_blas;
    mgpu_free(bb.a); mgpu_free(bb.b); mgpu_free(bb.c);
    mgpu_context_destroy(ctx);
    return 0;
}
