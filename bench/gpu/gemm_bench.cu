// GEMM throughput of mgpu's cuBLASLt path (mgpu_cuda_gemm, plan cache) against a plain
// cublasGemmEx call with the same types: the "ceiling" a hand-tuned library reaches on this GPU.
// Row-major C (M, N) = A (M, K) @ B (K, N), C always f32. Modes: f32 (TF32 off), tf32, bf16.
// Build (see bench/gpu/README.md):
//   nvcc -O3 -std=c++17 -I. -arch=native bench/gpu/gemm_bench.cu build/gpu/mgpu_kernels.o
//        -lcublas -lcublasLt -o build/gpu/gemm_bench   (one line)
// Usage: build/gpu/gemm_bench [size=4096] [iterations=50]
// Prints one line per mode: mode=... tflops_mgpu=... tflops_cublas=... ratio=...
#ifndef MGPU_CUDA
#define MGPU_CUDA
#endif
#define MGPU__INTERNAL /* the twin seam: argument structs and launcher declarations */
#include "mgpu.h"
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(x) do { if ((x) != 0) { fprintf(stderr, "gemm_bench: %s failed at line %d\n", #x, __LINE__); return 1; } } while (0)

__global__ void fill_k(float *x, size_t n, unsigned seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ seed;
        x[i] = (float)(h % 2001) / 1000.0f - 1.0f;
    }
}

// Without mgpu's implementation linked in, launcher errors land here.
extern "C" void mgpu__set_error_from_cuda(int code, const char *msg) { fprintf(stderr, "gemm_bench: error %d: %s\n", code, msg); }

// F32 -> BF16 through the cast twin (its argument struct as mgpu's fronts fill it).
static mgpu_result to_bf16(const float *src, void *dst, int64_t n) {
    mgpu__cast_args a;
    memset(&a, 0, sizeof a);
    a.src = src; a.src_dtype = MGPU_F32; a.dst = dst; a.dst_dtype = MGPU_BF16; a.n = n;
    return mgpu_cuda_cast(&a, NULL);
}

typedef int (*gemm_fn)(void *user);
struct ctx_t {
    void *blas; cublasHandle_t h;
    int64_t n; int dtype; int tf32;
    const void *a, *b; float *c;
};

static int run_mgpu(void *u) {
    ctx_t *c = (ctx_t *)u;
    mgpu__gemm_args g;
    memset(&g, 0, sizeof g);
    g.blas = c->blas; g.m = c->n; g.n = c->n; g.k = c->n; g.alpha = 1.0f;
    g.a = c->a; g.lda = c->n; g.b = c->b; g.ldb = c->n; g.ab_dtype = (mgpu_dtype)c->dtype; g.c = c->c; g.ldc = c->n;
    return mgpu_cuda_gemm(&g, NULL) == MGPU_OK ? 0 : 1;
}
// Column-major C^T = B^T A^T: the same row-major product mgpu computes.
static int run_cublas(void *u) {
    ctx_t *c = (ctx_t *)u;
    float one = 1.0f, zero = 0.0f;
    int n = (int)c->n;
    cudaDataType_t t = c->dtype == MGPU_BF16 ? CUDA_R_16BF : CUDA_R_32F;
    cublasComputeType_t ct = (c->dtype == MGPU_F32 && c->tf32) ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    return cublasGemmEx(c->h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, c->b, t, n, c->a, t, n, &zero, c->c, CUDA_R_32F, n, ct,
                        CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS ? 0 : 1;
}

// Warm up, then the mean over `iters` launches between two events.
static double tflops(gemm_fn f, ctx_t *c, int iters) {
    cudaEvent_t e0, e1;
    float ms = 0;
    for (int i = 0; i < 5; i++) if (f(c)) return -1;
    cudaEventCreate(&e0); cudaEventCreate(&e1);
    cudaEventRecord(e0);
    for (int i = 0; i < iters; i++) if (f(c)) return -1;
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    cudaEventElapsedTime(&ms, e0, e1);
    cudaEventDestroy(e0); cudaEventDestroy(e1);
    double s = ms / 1e3 / iters;
    return 2.0 * (double)c->n * c->n * c->n / s / 1e12;
}

int main(int argc, char **argv) {
    int64_t n = argc > 1 ? atoll(argv[1]) : 4096;
    int iters = argc > 2 ? atoi(argv[2]) : 50, fails = 0;
    size_t nn = (size_t)(n * n);
    float *a = NULL, *b = NULL, *c = NULL;
    void *ah = NULL, *bh = NULL;
    ctx_t cx;
    int devices = mgpu__cuda_device_count();
    if (devices < 0) { fprintf(stderr, "gemm_bench: CUDA is installed but failed (see above)\n"); return 1; }
    if (devices == 0) { printf("SKIPPED: no CUDA device\n"); return 0; }
    CHECK(cudaMalloc(&a, nn * 4)); CHECK(cudaMalloc(&b, nn * 4)); CHECK(cudaMalloc(&c, nn * 4));
    CHECK(cudaMalloc(&ah, nn * 2)); CHECK(cudaMalloc(&bh, nn * 2));
    fill_k<<<1024, 256>>>(a, nn, 1u); fill_k<<<1024, 256>>>(b, nn, 2u);
    CHECK(to_bf16(a, ah, (int64_t)nn));
    CHECK(to_bf16(b, bh, (int64_t)nn));
    cx.n = n; cx.c = c;
    CHECK(mgpu_cuda_blas_create(&cx.blas, NULL, 0));
    CHECK(cublasCreate(&cx.h));
    CHECK(cudaDeviceSynchronize());
    const char *names[3] = { "f32", "tf32", "bf16" };
    for (int mode = 0; mode < 3; mode++) {
        cx.tf32 = mode == 1;
        cx.dtype = mode == 2 ? MGPU_BF16 : MGPU_F32;
        cx.a = mode == 2 ? ah : (const void *)a; cx.b = mode == 2 ? bh : (const void *)b;
        mgpu_cuda_blas_set_tf32(cx.blas, cx.tf32);
        cublasSetMathMode(cx.h, cx.tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH);
        double tm = tflops(run_mgpu, &cx, iters), tc = tflops(run_cublas, &cx, iters);
        if (tm < 0 || tc < 0) { fprintf(stderr, "gemm_bench: mode %s failed\n", names[mode]); fails++; continue; }
        printf("mode=%s size=%lld tflops_mgpu=%.1f tflops_cublas=%.1f ratio=%.3f target=0.9 %s\n", names[mode], (long long)n, tm, tc,
               tm / tc, tm / tc >= 0.9 ? "PASS" : "BELOW_TARGET");
    }
    mgpu_cuda_blas_destroy(cx.blas);
    cublasDestroy(cx.h);
    cudaFree(a); cudaFree(b); cudaFree(c); cudaFree(ah); cudaFree(bh);
    return fails ? 1 : 0;
}
