// mgpu_kernels.cu - every CUDA kernel of mgpu, with the extern "C" launchers declared in
// mgpu.h (section "CUDA declarations"). Compile with nvcc; never calls exit; maps cudaError_t / cublasStatus_t to
// mgpu_result with the failing call named. MIT license (see mgpu.h).
//
// Determinism: no float atomics anywhere. Every reduction uses a partition that depends on the
// problem size only (never on the device or timing) and a fixed-order tree, so two runs with the
// same inputs give the same bits.
#ifndef MGPU_CUDA
#define MGPU_CUDA
#endif
#define MGPU__INTERNAL /* the twin seam: argument structs and launcher declarations */
#include "mgpu.h"
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <cublasLt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ======================================================================================
   Errors
   ====================================================================================== */

// Weak fallback so objects linked without the implementation still link; mgpu.h defines the
// real one (it routes the sentence to mgpu_last_error()).
extern "C" __attribute__((weak)) void mgpu__set_error_from_cuda(int code, const char *msg) {
    (void)code; (void)msg;
}

static mgpu_result mgpu__cu_report(mgpu_result code, const char *fn, const char *call, const char *what) {
    char buf[512];
    snprintf(buf, sizeof buf, "%s: %s failed: %s", fn, call, what);
    mgpu__set_error_from_cuda((int)code, buf);
    return code;
}
static mgpu_result mgpu__cu_error(cudaError_t e, const char *fn, const char *call) {
    char what[256];
    snprintf(what, sizeof what, "%s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
    return mgpu__cu_report(e == cudaErrorMemoryAllocation ? MGPU_ERR_OOM_DEVICE : MGPU_ERR_CUDA, fn, call, what);
}
static mgpu_result mgpu__cublas_error(cublasStatus_t s, const char *fn, const char *call) {
    return mgpu__cu_report(s == CUBLAS_STATUS_ALLOC_FAILED ? MGPU_ERR_OOM_DEVICE : MGPU_ERR_CUDA, fn, call, cublasGetStatusString(s));
}
static mgpu_result mgpu__cu_invalid(const char *fn, const char *what) {
    char buf[512];
    snprintf(buf, sizeof buf, "%s: %s", fn, what);
    mgpu__set_error_from_cuda((int)MGPU_ERR_INVALID_ARG, buf);
    return MGPU_ERR_INVALID_ARG;
}

#define MGPU__CU(call) do { cudaError_t e_ = (call); if (e_ != cudaSuccess) return mgpu__cu_error(e_, __func__, #call); } while (0)
#define MGPU__CUBLAS(call) do { cublasStatus_t s_ = (call); if (s_ != CUBLAS_STATUS_SUCCESS) return mgpu__cublas_error(s_, __func__, #call); } while (0)
// Every kernel launch goes through MGPU__LAUNCH so the file has one launch syntax for nvcc and for the
// CPU emulation under tests/emu (which defines its own MGPU__LAUNCH before including this file).
#ifndef MGPU__LAUNCH
#define MGPU__LAUNCH(kernel, grid, block, smem, stream, ...) \
    kernel<<<(grid), (block), (smem), (cudaStream_t)(stream)>>>(__VA_ARGS__)
#endif
// After a launch: configuration errors surface here, execution errors at the next sync.
#define MGPU__LAUNCHED(name) do { cudaError_t e_ = cudaGetLastError(); if (e_ != cudaSuccess) return mgpu__cu_error(e_, __func__, "launch of " name); } while (0)
#define MGPU__REQUIRE(cond, what) do { if (!(cond)) return mgpu__cu_invalid(__func__, what); } while (0)

#define MGPU__STREAM(s) ((cudaStream_t)(s))
#define MGPU__THREADS 256
#define MGPU__MAX_GRID 65535

// Blocks for a grid-stride loop over n items.
static unsigned mgpu__grid(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    if (b < 1) b = 1;
    return (unsigned)(b > MGPU__MAX_GRID ? MGPU__MAX_GRID : b);
}
#define MGPU__FOR(i, n) for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

// No device and no (real) driver mean 0 devices; any other failure is an error, never a silent 0:
// a GPU machine whose CUDA setup is broken must not look like a CPU-only machine.
extern "C" int mgpu__cuda_device_count(void) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e == cudaSuccess) return n;
    cudaGetLastError();
    if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorStubLibrary) return 0;
    return (int)mgpu__cu_error(e, __func__, "cudaGetDeviceCount(&n)");
}

extern "C" mgpu_result mgpu_cuda_synchronize(void *stream) {
    MGPU__CU(cudaStreamSynchronize(MGPU__STREAM(stream)));
    return MGPU_OK;
}

/* ======================================================================================
   Block and warp reductions (fixed shape: deterministic)
   ====================================================================================== */

template <typename T> __device__ T mgpu__warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ float mgpu__warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) { float w = __shfl_xor_sync(0xffffffffu, v, o); v = (w > v || w != w) ? w : v; }
    return v;
}
// Sum over a group: one warp (BLOCK false) or the whole block (BLOCK true, blockDim multiple of 32).
// Every thread of the group gets the result.
template <bool BLOCK, typename T> __device__ T mgpu__group_sum(T v, T *shared) {
    v = mgpu__warp_sum(v);
    if (!BLOCK) return v;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();   // shared may still be read by a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    T s = 0;
    for (int w = 0; w < warps; w++) s += shared[w];   // same order in every thread
    return s;
}
template <bool BLOCK> __device__ float mgpu__group_max(float v, float *shared) {
    v = mgpu__warp_max(v);
    if (!BLOCK) return v;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float m = shared[0];
    for (int w = 1; w < warps; w++) m = (shared[w] > m || shared[w] != shared[w]) ? shared[w] : m;
    return m;
}

/* Row kernels run either a warp per row (rows up to 1024 wide: 8 rows per 256-thread block) or a
   block per row. Inside, `lane`/`width` walk the row. */
struct mgpu__row_map { int64_t row; int lane, width; };
template <bool BLOCK> __device__ mgpu__row_map mgpu__row_of_thread(void) {
    mgpu__row_map r;
    if (BLOCK) { r.row = blockIdx.x; r.lane = threadIdx.x; r.width = blockDim.x; }
    else { r.row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r.lane = threadIdx.x & 31; r.width = 32; }
    return r;
}
static int mgpu__row_blocks(int64_t rows, bool block, unsigned *grid) {
    int64_t g = block ? rows : (rows + 7) / 8;
    if (g > 2147483647LL) return 0;
    *grid = (unsigned)(g < 1 ? 1 : g);
    return 1;
}
#define MGPU__ROW_SMALL 1024   // rows up to this wide use a warp each

/* ======================================================================================
   Elementwise: unary activations and binary ops with broadcasting
   ====================================================================================== */

#define MGPU__INV_SQRT2_F 0.70710678118654752f
#define MGPU__INV_SQRT_2PI_F 0.39894228040143268f
#define MGPU__SQRT_2_OVER_PI_F 0.79788456080286536f
#define MGPU__GELU_TANH_K_F 0.044715f

__device__ float mgpu__sigmoid_d(float x) {
    if (x >= 0) return 1.0f / (1.0f + expf(-x));   // exp of a non-positive number only: no overflow
    float e = expf(x);
    return e / (1.0f + e);
}
__device__ float mgpu__gelu_tanh_d(float x) {
    return 0.5f * x * (1.0f + tanhf(MGPU__SQRT_2_OVER_PI_F * (x + MGPU__GELU_TANH_K_F * x * x * x)));
}
// The same formulas as the CPU (mgpu.h), so results agree to rounding.
__device__ float mgpu__unary_f(int kind, float a, float x) {
    switch (kind) {
    case MGPU__UN_RELU: return x > 0 ? x : 0.0f;
    case MGPU__UN_GELU: return 0.5f * x * (1.0f + erff(x * MGPU__INV_SQRT2_F));
    case MGPU__UN_GELU_TANH: return mgpu__gelu_tanh_d(x);
    case MGPU__UN_ELU: return x > 0 ? x : a * expm1f(x);
    case MGPU__UN_TANH: return tanhf(x);
    case MGPU__UN_SIGMOID: return mgpu__sigmoid_d(x);
    case MGPU__UN_SCALE: return x * a;
    default: return x + a;   // MGPU__UN_ADD_SCALAR
    }
}
__device__ float mgpu__unary_df(int kind, float a, float x, float y) {
    switch (kind) {
    case MGPU__UN_RELU: return x > 0 ? 1.0f : 0.0f;
    case MGPU__UN_GELU: {
        float cdf = 0.5f * (1.0f + erff(x * MGPU__INV_SQRT2_F));
        return cdf + x * MGPU__INV_SQRT_2PI_F * expf(-0.5f * x * x);
    }
    case MGPU__UN_GELU_TANH: {
        float x2 = x * x;
        float t = tanhf(MGPU__SQRT_2_OVER_PI_F * x * (1.0f + MGPU__GELU_TANH_K_F * x2));
        float du = MGPU__SQRT_2_OVER_PI_F * (1.0f + 3.0f * MGPU__GELU_TANH_K_F * x2);
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
    }
    case MGPU__UN_ELU: return x > 0 ? 1.0f : a * expf(x);
    case MGPU__UN_TANH: return 1.0f - y * y;
    case MGPU__UN_SIGMOID: return y * (1.0f - y);
    case MGPU__UN_SCALE: return a;
    default: return 1.0f;
    }
}

__global__ void mgpu__unary_fwd_k(int kind, float a, const float *x, float *y, int64_t n) {
    MGPU__FOR(i, n) y[i] = mgpu__unary_f(kind, a, x[i]);
}
__global__ void mgpu__unary_bwd_k(int kind, float a, const float *x, const float *y, const float *dy, float *dx, int64_t n) {
    // ReLU keeps the CPU's select (not a multiply) so -0 and NaN in dy behave the same
    MGPU__FOR(i, n) dx[i] += kind == MGPU__UN_RELU ? (x[i] > 0 ? dy[i] : 0.0f) : dy[i] * mgpu__unary_df(kind, a, x[i], y ? y[i] : 0.0f);
}

static int mgpu__unary_kind_ok(int kind) { return kind >= MGPU__UN_RELU && kind <= MGPU__UN_ADD_SCALAR; }

extern "C" mgpu_result mgpu_cuda_unary_forward(const mgpu__unary_args *a, void *stream) {
    MGPU__REQUIRE(a && mgpu__unary_kind_ok(a->kind), "kind is not an mgpu__unary_kind value");
    MGPU__REQUIRE(a->n >= 0 && (a->n == 0 || (a->x && a->out)), "x and out must be device pointers and n >= 0");
    if (a->n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__unary_fwd_k, mgpu__grid(a->n, MGPU__THREADS), MGPU__THREADS, 0, stream, a->kind, a->param, a->x, a->out, a->n);
    MGPU__LAUNCHED("mgpu__unary_fwd_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_unary_backward(const mgpu__unary_args *a, void *stream) {
    MGPU__REQUIRE(a && mgpu__unary_kind_ok(a->kind), "kind is not an mgpu__unary_kind value");
    MGPU__REQUIRE(a->n >= 0 && (a->n == 0 || (a->x && a->dy && a->out)), "x, dy and out must be device pointers and n >= 0");
    MGPU__REQUIRE(a->n == 0 || a->y || (a->kind != MGPU__UN_TANH && a->kind != MGPU__UN_SIGMOID), "tanh and sigmoid backward need y");
    if (a->n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__unary_bwd_k, mgpu__grid(a->n, MGPU__THREADS), MGPU__THREADS, 0, stream, a->kind, a->param, a->x, a->y, a->dy,
                 a->out, a->n);
    MGPU__LAUNCHED("mgpu__unary_bwd_k");
    return MGPU_OK;
}

extern "C" mgpu_result mgpu_cuda_bcast_make(int a_ndim, const int64_t *a_shape, int b_ndim, const int64_t *b_shape, mgpu_cuda_bcast *out) {
    MGPU__REQUIRE(out && a_ndim >= 0 && b_ndim >= 0 && a_ndim <= MGPU_MAX_DIMS && b_ndim <= MGPU_MAX_DIMS, "bad ndim or NULL out");
    MGPU__REQUIRE((a_ndim == 0 || a_shape) && (b_ndim == 0 || b_shape), "shape arrays must not be NULL");
    memset(out, 0, sizeof *out);
    int nd = a_ndim > b_ndim ? a_ndim : b_ndim;
    out->ndim = nd;
    int64_t an = 1, bn = 1, on = 1;
    for (int d = nd - 1; d >= 0; d--) {   // right-aligned, as NumPy
        int ad = d - (nd - a_ndim), bd = d - (nd - b_ndim);
        int64_t as = ad >= 0 ? a_shape[ad] : 1, bs = bd >= 0 ? b_shape[bd] : 1;
        if (as < 0 || bs < 0 || (as != bs && as != 1 && bs != 1)) {
            char what[160];
            snprintf(what, sizeof what, "shapes do not broadcast: dim %d is %lld in a and %lld in b", d, (long long)as, (long long)bs);
            mgpu__set_error_from_cuda((int)MGPU_ERR_SHAPE, what);
            return MGPU_ERR_SHAPE;
        }
        int64_t os = as == 1 ? bs : as;
        out->shape[d] = os;
        out->a_stride[d] = (as == 1) ? 0 : an;
        out->b_stride[d] = (bs == 1) ? 0 : bn;
        an *= as; bn *= bs; on *= os;
    }
    out->numel = on; out->a_numel = an; out->b_numel = bn;
    return MGPU_OK;
}

__global__ void mgpu__binary_fwd_k(int op, mgpu_cuda_bcast g, const float *a, const float *b, float *out) {
    MGPU__FOR(i, g.numel) {
        int64_t rem = i, ao = 0, bo = 0;
        for (int d = g.ndim - 1; d >= 0; d--) {
            int64_t c = rem % g.shape[d];
            rem /= g.shape[d];
            ao += c * g.a_stride[d]; bo += c * g.b_stride[d];
        }
        float x = a[ao], y = b[bo];
        out[i] = op == MGPU_CUDA_ADD ? x + y : op == MGPU_CUDA_SUB ? x - y : x * y;
    }
}
// Output offset (oo) and other-operand offset (to) of the r-th output position that read element j
// of the operand `own` (the positions are enumerated in a fixed order over own's broadcast dims).
__device__ void mgpu__bcast_offsets(const mgpu_cuda_bcast &g, const int64_t *s_own, const int64_t *s_oth, int64_t j, int64_t r,
                                    int64_t *oo, int64_t *to) {
    int64_t ost = 1;
    *oo = 0; *to = 0;
    for (int d = g.ndim - 1; d >= 0; d--) {
        int64_t c;
        if (s_own[d] != 0) { c = j % g.shape[d]; j /= g.shape[d]; }
        else { c = r % g.shape[d]; r /= g.shape[d]; }
        *oo += c * ost; *to += c * s_oth[d];
        ost *= g.shape[d];
    }
}
__device__ float mgpu__binary_grad_term(int op, const float *other, const float *dy, int64_t oo, int64_t to) {
    return op == MGPU_CUDA_MUL ? dy[oo] * other[to] : dy[oo];
}
// One thread per element j of the operand `own` (a or b): it walks, in a fixed order, every output
// position that read it, so broadcast reductions need no atomics. Used when few positions read each j.
__global__ void mgpu__binary_bwd_k(int op, int own_is_a, mgpu_cuda_bcast g, const float *other, const float *dy, float *dst) {
    const int64_t *s_own = own_is_a ? g.a_stride : g.b_stride, *s_oth = own_is_a ? g.b_stride : g.a_stride;
    int64_t own_n = own_is_a ? g.a_numel : g.b_numel, reps = g.numel / (own_n ? own_n : 1);
    float sign = (op == MGPU_CUDA_SUB && !own_is_a) ? -1.0f : 1.0f;
    MGPU__FOR(j, own_n) {
        double acc = 0;   // double, as the block variant, so both paths agree closely
        for (int64_t r = 0; r < reps; r++) {
            int64_t oo, to;
            mgpu__bcast_offsets(g, s_own, s_oth, j, r, &oo, &to);
            acc += mgpu__binary_grad_term(op, other, dy, oo, to);
        }
        dst[j] += sign * (float)acc;
    }
}
// Long reductions (a bias broadcast over a batch): one block per element j, a fixed tree over its
// positions.
__global__ void mgpu__binary_bwd_block_k(int op, int own_is_a, mgpu_cuda_bcast g, const float *other, const float *dy, float *dst) {
    __shared__ double sh[32];
    const int64_t *s_own = own_is_a ? g.a_stride : g.b_stride, *s_oth = own_is_a ? g.b_stride : g.a_stride;
    int64_t own_n = own_is_a ? g.a_numel : g.b_numel, reps = g.numel / (own_n ? own_n : 1);
    float sign = (op == MGPU_CUDA_SUB && !own_is_a) ? -1.0f : 1.0f;
    for (int64_t j = blockIdx.x; j < own_n; j += gridDim.x) {
        double acc = 0;
        for (int64_t r = threadIdx.x; r < reps; r += blockDim.x) {
            int64_t oo, to;
            mgpu__bcast_offsets(g, s_own, s_oth, j, r, &oo, &to);
            acc += mgpu__binary_grad_term(op, other, dy, oo, to);
        }
        acc = mgpu__group_sum<true, double>(acc, sh);
        if (threadIdx.x == 0) dst[j] += sign * (float)acc;
    }
}
static mgpu_result mgpu__binary_bwd_one(int op, int own_is_a, const mgpu_cuda_bcast *g, const float *other, const float *dy, float *dst,
                                        void *stream) {
    int64_t own_n = own_is_a ? g->a_numel : g->b_numel, reps = g->numel / (own_n ? own_n : 1);
    if (own_n == 0) return MGPU_OK;
    if (reps >= 1024 && own_n <= 65536) {
        MGPU__LAUNCH(mgpu__binary_bwd_block_k, mgpu__grid(own_n, 1), 256, 0, stream, op, own_is_a, *g, other, dy, dst);
        MGPU__LAUNCHED("mgpu__binary_bwd_block_k");
    } else {
        MGPU__LAUNCH(mgpu__binary_bwd_k, mgpu__grid(own_n, MGPU__THREADS), MGPU__THREADS, 0, stream, op, own_is_a, *g, other, dy, dst);
        MGPU__LAUNCHED("mgpu__binary_bwd_k");
    }
    return MGPU_OK;
}

extern "C" mgpu_result mgpu_cuda_binary_forward(int op, const mgpu_cuda_bcast *g, const float *a, const float *b, float *out, void *stream) {
    MGPU__REQUIRE(g && op >= MGPU_CUDA_ADD && op <= MGPU_CUDA_MUL, "g is NULL or op is not an mgpu_cuda_binary value");
    MGPU__REQUIRE(g->numel == 0 || (a && b && out), "a, b and out must be device pointers");
    if (g->numel == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__binary_fwd_k, mgpu__grid(g->numel, MGPU__THREADS), MGPU__THREADS, 0, stream, op, *g, a, b, out);
    MGPU__LAUNCHED("mgpu__binary_fwd_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_binary_backward(int op, const mgpu_cuda_bcast *g, const float *a, const float *b, const float *dy,
                                                 float *da, float *db, void *stream) {
    MGPU__REQUIRE(g && op >= MGPU_CUDA_ADD && op <= MGPU_CUDA_MUL, "g is NULL or op is not an mgpu_cuda_binary value");
    MGPU__REQUIRE(g->numel == 0 || dy, "dy must be a device pointer");
    MGPU__REQUIRE(op != MGPU_CUDA_MUL || ((!da || b) && (!db || a)), "mul backward needs the other operand");
    if (g->numel == 0) return MGPU_OK;
    mgpu_result r = da ? mgpu__binary_bwd_one(op, 1, g, b, dy, da, stream) : MGPU_OK;
    if (r == MGPU_OK && db) r = mgpu__binary_bwd_one(op, 0, g, a, dy, db, stream);
    return r;
}

__global__ void mgpu__fill_k(float *x, int64_t n, float v) { MGPU__FOR(i, n) x[i] = v; }
extern "C" mgpu_result mgpu_cuda_fill(float *x, int64_t n, float value, void *stream) {
    MGPU__REQUIRE(n >= 0 && (n == 0 || x), "x must be a device pointer and n >= 0");
    if (n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__fill_k, mgpu__grid(n, MGPU__THREADS), MGPU__THREADS, 0, stream, x, n, value);
    MGPU__LAUNCHED("mgpu__fill_k");
    return MGPU_OK;
}

/* ======================================================================================
   Bias add and fixed-order column sums (bias grad, layer-norm dw/db)
   ====================================================================================== */

__global__ void mgpu__bias_add_k(const float *x, const float *b, float *y, int64_t rows, int64_t cols) {
    MGPU__FOR(i, rows * cols) y[i] = x[i] + b[i % cols];
}

// Block (32, 8) owns 32 columns; thread row ty sums rows ty, ty + 8, ... in double, then the 8
// partials are added in ty order. With x (and mean, rstd) it also sums dy * xhat into dw.
#define MGPU__COL_Y 8
__global__ void mgpu__colsum_k(const float *dy, const float *x, const float *mean, const float *rstd, int64_t rows, int64_t cols,
                               float *dw, float *db) {
    __shared__ double sw[MGPU__COL_Y][33], sb[MGPU__COL_Y][33];
    int64_t c = (int64_t)blockIdx.x * 32 + threadIdx.x;
    double aw = 0, ab = 0;
    if (c < cols)
        for (int64_t r = threadIdx.y; r < rows; r += MGPU__COL_Y) {
            float g = dy[r * cols + c];
            ab += g;
            if (x) aw += (double)g * ((x[r * cols + c] - mean[r]) * rstd[r]);
        }
    sw[threadIdx.y][threadIdx.x] = aw; sb[threadIdx.y][threadIdx.x] = ab;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        double tw = 0, tb = 0;
        for (int k = 0; k < MGPU__COL_Y; k++) { tw += sw[k][threadIdx.x]; tb += sb[k][threadIdx.x]; }
        if (dw) dw[c] += (float)tw;
        if (db) db[c] += (float)tb;
    }
}
static mgpu_result mgpu__colsum(const float *dy, const float *x, const float *mean, const float *rstd, int64_t rows, int64_t cols,
                                float *dw, float *db, void *stream) {
    int64_t blocks = (cols + 31) / 32;
    MGPU__REQUIRE(blocks <= 2147483647LL, "too many columns");
    MGPU__LAUNCH(mgpu__colsum_k, (unsigned)blocks, dim3(32, MGPU__COL_Y), 0, stream, dy, x, mean, rstd, rows, cols, dw, db);
    MGPU__LAUNCHED("mgpu__colsum_k");
    return MGPU_OK;
}

extern "C" mgpu_result mgpu_cuda_bias_add_forward(const float *x, const float *b, float *y, int64_t rows, int64_t cols, void *stream) {
    MGPU__REQUIRE(rows >= 0 && cols >= 0 && (rows * cols == 0 || (x && b && y)), "x, b, y must be device pointers; rows, cols >= 0");
    if (rows * cols == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__bias_add_k, mgpu__grid(rows * cols, MGPU__THREADS), MGPU__THREADS, 0, stream, x, b, y, rows, cols);
    MGPU__LAUNCHED("mgpu__bias_add_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_bias_grad(const float *dy, float *db, int64_t rows, int64_t cols, void *stream) {
    MGPU__REQUIRE(rows >= 0 && cols >= 0 && (cols == 0 || db) && (rows * cols == 0 || dy), "dy, db must be device pointers");
    if (cols == 0) return MGPU_OK;
    return mgpu__colsum(dy, NULL, NULL, NULL, rows, cols, NULL, db, stream);
}

/* ======================================================================================
   Softmax / log-softmax (also the masked, scaled softmax of attention)
   ====================================================================================== */

// Rows of a contiguous (rows, dim) matrix. causal_tq > 0: row r is query r % causal_tq and keys
// j > query are masked to probability 0 (attention).
template <bool BLOCK>
__global__ void mgpu__softmax_rows_k(const float *x, float *y, int64_t rows, int64_t dim, int log, int64_t causal_tq) {
    __shared__ float sh[32];
    mgpu__row_map m = mgpu__row_of_thread<BLOCK>();
    if (!BLOCK && m.row >= rows) return;   // whole warps leave together
    const float *xr = x + m.row * dim;
    float *yr = y + m.row * dim;
    int64_t lim = causal_tq > 0 ? (m.row % causal_tq) + 1 : dim;   // keys [0, lim) are visible
    if (lim > dim) lim = dim;
    float mx = -INFINITY;
    for (int64_t j = m.lane; j < lim; j += m.width) mx = (xr[j] > mx || xr[j] != xr[j]) ? xr[j] : mx;
    mx = mgpu__group_max<BLOCK>(mx, sh);
    if (mx == -INFINITY) mx = 0;
    float s = 0;
    for (int64_t j = m.lane; j < lim; j += m.width) s += expf(xr[j] - mx);
    s = mgpu__group_sum<BLOCK, float>(s, sh);
    float lse = mx + logf(s), inv = 1.0f / s;
    for (int64_t j = m.lane; j < dim; j += m.width)
        yr[j] = j >= lim ? (log ? -INFINITY : 0.0f) : log ? xr[j] - lse : expf(xr[j] - mx) * inv;
}
// dx (=|+=) scale * softmax'(y) dy per row.
template <bool BLOCK>
__global__ void mgpu__softmax_bwd_rows_k(const float *y, const float *dy, float *dx, int64_t rows, int64_t dim, int log, float scale,
                                         int accumulate) {
    __shared__ float sh[32];
    mgpu__row_map m = mgpu__row_of_thread<BLOCK>();
    if (!BLOCK && m.row >= rows) return;
    const float *yr = y + m.row * dim, *gr = dy + m.row * dim;
    float *dr = dx + m.row * dim;
    float s = 0;
    for (int64_t j = m.lane; j < dim; j += m.width) s += log ? gr[j] : gr[j] * yr[j];
    s = mgpu__group_sum<BLOCK, float>(s, sh);
    for (int64_t j = m.lane; j < dim; j += m.width) {
        float v = log ? gr[j] - expf(yr[j]) * s : yr[j] * (gr[j] - s);
        v *= scale;
        dr[j] = accumulate ? dr[j] + v : v;
    }
}
// inner > 1: one thread per line (o, i), strided by inner.
__global__ void mgpu__softmax_lines_k(const float *x, float *y, int64_t outer, int64_t dim, int64_t inner, int log) {
    MGPU__FOR(line, outer * inner) {
        int64_t base = (line / inner) * dim * inner + line % inner;
        float mx = -INFINITY, s = 0;
        for (int64_t j = 0; j < dim; j++) { float v = x[base + j * inner]; mx = (v > mx || v != v) ? v : mx; }
        if (mx == -INFINITY) mx = 0;
        for (int64_t j = 0; j < dim; j++) s += expf(x[base + j * inner] - mx);
        float lse = mx + logf(s), inv = 1.0f / s;
        for (int64_t j = 0; j < dim; j++) {
            float v = x[base + j * inner];
            y[base + j * inner] = log ? v - lse : expf(v - mx) * inv;
        }
    }
}
__global__ void mgpu__softmax_bwd_lines_k(const float *y, const float *dy, float *dx, int64_t outer, int64_t dim, int64_t inner, int log) {
    MGPU__FOR(line, outer * inner) {
        int64_t base = (line / inner) * dim * inner + line % inner;
        float s = 0;
        for (int64_t j = 0; j < dim; j++) { int64_t q = base + j * inner; s += log ? dy[q] : dy[q] * y[q]; }
        for (int64_t j = 0; j < dim; j++) {
            int64_t q = base + j * inner;
            dx[q] += log ? dy[q] - expf(y[q]) * s : y[q] * (dy[q] - s);
        }
    }
}

static mgpu_result mgpu__softmax_rows(const float *x, float *y, int64_t rows, int64_t dim, int log, int64_t causal_tq, void *stream) {
    unsigned grid;
    bool block = dim > MGPU__ROW_SMALL;
    MGPU__REQUIRE(mgpu__row_blocks(rows, block, &grid), "too many rows");
    if (block) MGPU__LAUNCH(mgpu__softmax_rows_k<true>, grid, 256, 0, stream, x, y, rows, dim, log, causal_tq);
    else MGPU__LAUNCH(mgpu__softmax_rows_k<false>, grid, 256, 0, stream, x, y, rows, dim, log, causal_tq);
    MGPU__LAUNCHED("mgpu__softmax_rows_k");
    return MGPU_OK;
}
static mgpu_result mgpu__softmax_bwd_rows(const float *y, const float *dy, float *dx, int64_t rows, int64_t dim, int log, float scale,
                                          int accumulate, void *stream) {
    unsigned grid;
    bool block = dim > MGPU__ROW_SMALL;
    MGPU__REQUIRE(mgpu__row_blocks(rows, block, &grid), "too many rows");
    if (block) MGPU__LAUNCH(mgpu__softmax_bwd_rows_k<true>, grid, 256, 0, stream, y, dy, dx, rows, dim, log, scale, accumulate);
    else MGPU__LAUNCH(mgpu__softmax_bwd_rows_k<false>, grid, 256, 0, stream, y, dy, dx, rows, dim, log, scale, accumulate);
    MGPU__LAUNCHED("mgpu__softmax_bwd_rows_k");
    return MGPU_OK;
}

extern "C" mgpu_result mgpu_cuda_softmax_forward(const float *x, float *y, int64_t outer, int64_t dim, int64_t inner, int log, void *stream) {
    MGPU__REQUIRE(outer >= 0 && dim >= 0 && inner >= 0, "sizes must be >= 0");
    MGPU__REQUIRE(outer * dim * inner == 0 || (x && y), "x and y must be device pointers");
    if (outer * dim * inner == 0) return MGPU_OK;
    if (inner == 1) return mgpu__softmax_rows(x, y, outer, dim, log, 0, stream);
    MGPU__LAUNCH(mgpu__softmax_lines_k, mgpu__grid(outer * inner, MGPU__THREADS), MGPU__THREADS, 0, stream, x, y, outer, dim, inner, log);
    MGPU__LAUNCHED("mgpu__softmax_lines_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_softmax_backward(const float *y, const float *dy, float *dx, int64_t outer, int64_t dim, int64_t inner,
                                                  int log, void *stream) {
    MGPU__REQUIRE(outer >= 0 && dim >= 0 && inner >= 0, "sizes must be >= 0");
    MGPU__REQUIRE(outer * dim * inner == 0 || (y && dy && dx), "y, dy and dx must be device pointers");
    if (outer * dim * inner == 0) return MGPU_OK;
    if (inner == 1) return mgpu__softmax_bwd_rows(y, dy, dx, outer, dim, log, 1.0f, 1, stream);
    MGPU__LAUNCH(mgpu__softmax_bwd_lines_k, mgpu__grid(outer * inner, MGPU__THREADS), MGPU__THREADS, 0, stream, y, dy, dx, outer, dim,
                                                                                                                   inner, log);
    MGPU__LAUNCHED("mgpu__softmax_bwd_lines_k");
    return MGPU_OK;
}

/* ======================================================================================
   Losses
   ====================================================================================== */

#define MGPU__IGNORE (-100)
__device__ int64_t mgpu__target_at(const void *t, int i64, int64_t i) {
    return i64 ? ((const int64_t *)t)[i] : (int64_t)((const int32_t *)t)[i];
}

// lse per row (warp or block per row).
template <bool BLOCK>
__global__ void mgpu__lse_rows_k(const float *x, float *lse, int64_t rows, int64_t c) {
    __shared__ float sh[32];
    __shared__ double shd[32];
    mgpu__row_map m = mgpu__row_of_thread<BLOCK>();
    if (!BLOCK && m.row >= rows) return;
    const float *xr = x + m.row * c;
    float mx = -INFINITY;
    for (int64_t j = m.lane; j < c; j += m.width) mx = (xr[j] > mx || xr[j] != xr[j]) ? xr[j] : mx;
    mx = mgpu__group_max<BLOCK>(mx, sh);
    if (mx == -INFINITY) mx = 0;
    double s = 0;   // the CPU sums in double too
    for (int64_t j = m.lane; j < c; j += m.width) s += expf(xr[j] - mx);
    s = mgpu__group_sum<BLOCK, double>(s, shd);
    if (m.lane == 0) lse[m.row] = mx + (float)log(s);
}

// One block: loss = sum over counted rows of (lse[i] - x[i, t]) (or -x[i, t] when lse is NULL) /
// counted, in a fixed order. An out-of-range target poisons the loss with NaN.
__global__ void mgpu__class_loss_k(const float *x, const float *lse, const void *target, int i64, int64_t n, int64_t c,
                                   float *loss, float *valid) {
    __shared__ double sh[32];
    double s = 0, cnt = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        int64_t t = mgpu__target_at(target, i64, i);
        if (t == MGPU__IGNORE) continue;
        cnt += 1;
        if (t < 0 || t >= c) { s += NAN; continue; }
        s += (double)(lse ? lse[i] : 0.0f) - x[i * c + t];
    }
    s = mgpu__group_sum<true, double>(s, sh);
    cnt = mgpu__group_sum<true, double>(cnt, sh);
    if (threadIdx.x == 0) { loss[0] = (float)(s / cnt); valid[0] = (float)cnt; }   // no counted row: NaN, as PyTorch
}

__global__ void mgpu__ce_bwd_k(const float *x, const void *target, int i64, const float *lse, const float *dloss, const float *valid,
                               float *dx, int64_t n, int64_t c) {
    float g = dloss[0] / valid[0];
    MGPU__FOR(q, n * c) {
        int64_t i = q / c, j = q % c, t = mgpu__target_at(target, i64, i);
        if (t == MGPU__IGNORE) continue;
        dx[q] += g * expf(x[q] - lse[i]) - (j == t ? g : 0.0f);
    }
}
__global__ void mgpu__nll_bwd_k(const void *target, int i64, const float *dloss, const float *valid, float *dx, int64_t n, int64_t c) {
    float g = dloss[0] / valid[0];
    MGPU__FOR(i, n) {
        int64_t t = mgpu__target_at(target, i64, i);
        if (t != MGPU__IGNORE && t >= 0 && t < c) dx[i * c + t] -= g;
    }
}

extern "C" mgpu_result mgpu_cuda_cross_entropy_forward(const float *logits, const void *target, int target_i64, int64_t n, int64_t c,
                                                       float *lse, float *loss, float *valid, void *stream) {
    MGPU__REQUIRE(n >= 0 && c > 0 && loss && valid && (n == 0 || (logits && target && lse)), "bad pointers or sizes");
    unsigned grid;
    bool block = c > MGPU__ROW_SMALL;
    if (n > 0) {
        MGPU__REQUIRE(mgpu__row_blocks(n, block, &grid), "too many rows");
        if (block) MGPU__LAUNCH(mgpu__lse_rows_k<true>, grid, 256, 0, stream, logits, lse, n, c);
        else MGPU__LAUNCH(mgpu__lse_rows_k<false>, grid, 256, 0, stream, logits, lse, n, c);
        MGPU__LAUNCHED("mgpu__lse_rows_k");
    }
    MGPU__LAUNCH(mgpu__class_loss_k, 1, 1024, 0, stream, logits, lse, target, target_i64, n, c, loss, valid);
    MGPU__LAUNCHED("mgpu__class_loss_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_cross_entropy_backward(const float *logits, const void *target, int target_i64, const float *lse,
                                                        const float *dloss, const float *valid, float *dx, int64_t n, int64_t c,
                                                        void *stream) {
    MGPU__REQUIRE(n >= 0 && c > 0, "n must be >= 0 and c > 0");
    MGPU__REQUIRE(n == 0 || (logits && target && lse && dloss && valid && dx), "bad pointers");
    if (n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__ce_bwd_k, mgpu__grid(n * c, MGPU__THREADS), MGPU__THREADS, 0, stream, logits, target, target_i64, lse, dloss,
                                                                                               valid, dx, n, c);
    MGPU__LAUNCHED("mgpu__ce_bwd_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_nll_forward(const float *logp, const void *target, int target_i64, int64_t n, int64_t c, float *loss,
                                             float *valid, void *stream) {
    MGPU__REQUIRE(n >= 0 && c > 0 && loss && valid && (n == 0 || (logp && target)), "bad pointers or sizes");
    MGPU__LAUNCH(mgpu__class_loss_k, 1, 1024, 0, stream, logp, NULL, target, target_i64, n, c, loss, valid);
    MGPU__LAUNCHED("mgpu__class_loss_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_nll_backward(const void *target, int target_i64, const float *dloss, const float *valid, float *dx,
                                              int64_t n, int64_t c, void *stream) {
    MGPU__REQUIRE(n >= 0 && c > 0 && (n == 0 || (target && dloss && valid && dx)), "bad pointers or sizes");
    if (n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__nll_bwd_k, mgpu__grid(n, MGPU__THREADS), MGPU__THREADS, 0, stream, target, target_i64, dloss, valid, dx, n, c);
    MGPU__LAUNCHED("mgpu__nll_bwd_k");
    return MGPU_OK;
}

/* ======================================================================================
   Two-phase deterministic reductions: MGPU_CUDA_REDUCE_PARTIALS blocks, each over a contiguous
   chunk whose bounds depend on n only, then one block adds the partials in a fixed tree.
   ====================================================================================== */

enum { MGPU__RED_SUM = 0, MGPU__RED_SQDIFF = 1, MGPU__RED_SQ = 2 };
__global__ void mgpu__reduce_partials_k(int mode, const float *x, const float *y, int64_t n, float *partials) {
    __shared__ double sh[32];
    int64_t chunk = (n + gridDim.x - 1) / gridDim.x, lo = (int64_t)blockIdx.x * chunk, hi = lo + chunk < n ? lo + chunk : n;
    double s = 0;
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        double v = mode == MGPU__RED_SQDIFF ? (double)x[i] - y[i] : (double)x[i];
        s += mode == MGPU__RED_SUM ? v : v * v;
    }
    s = mgpu__group_sum<true, double>(s, sh);
    if (threadIdx.x == 0) partials[blockIdx.x] = (float)s;
}
// out[0] = scale * sum(partials[0 .. n)) (sqrt of it when root)
__global__ void mgpu__reduce_final_k(const float *partials, int64_t n, float scale, int root, float *out) {
    __shared__ double sh[32];
    double s = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += partials[i];
    s = mgpu__group_sum<true, double>(s, sh);
    if (threadIdx.x == 0) out[0] = root ? (float)sqrt(s * (double)scale) : (float)(s * (double)scale);
}
static mgpu_result mgpu__reduce_partials(int mode, const float *x, const float *y, int64_t n, float *partials, void *stream) {
    MGPU__LAUNCH(mgpu__reduce_partials_k, MGPU_CUDA_REDUCE_PARTIALS, 256, 0, stream, mode, x, y, n, partials);
    MGPU__LAUNCHED("mgpu__reduce_partials_k");
    return MGPU_OK;
}
static mgpu_result mgpu__reduce_final(const float *partials, int64_t n, float scale, int root, float *out, void *stream) {
    MGPU__LAUNCH(mgpu__reduce_final_k, 1, 1024, 0, stream, partials, n, scale, root, out);
    MGPU__LAUNCHED("mgpu__reduce_final_k");
    return MGPU_OK;
}

extern "C" mgpu_result mgpu_cuda_sum(const float *x, int64_t n, float scale, float *out, float *scratch, void *stream) {
    MGPU__REQUIRE(n >= 0 && out && scratch && (n == 0 || x), "x, out and scratch must be device pointers");
    mgpu_result r = mgpu__reduce_partials(MGPU__RED_SUM, x, NULL, n, scratch, stream);
    return r != MGPU_OK ? r : mgpu__reduce_final(scratch, MGPU_CUDA_REDUCE_PARTIALS, scale, 0, out, stream);
}

// MSE reduces in one block: no scratch needed, and loss tensors are small.
__global__ void mgpu__mse_k(const float *a, const float *b, int64_t n, float *loss) {
    __shared__ double sh[32];
    double s = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) { double d = (double)a[i] - b[i]; s += d * d; }
    s = mgpu__group_sum<true, double>(s, sh);
    if (threadIdx.x == 0) loss[0] = (float)(s / (double)n);
}
__global__ void mgpu__mse_bwd_k(const float *a, const float *b, const float *dloss, float *da, float *db, int64_t n) {
    float g = 2.0f * dloss[0] / (float)n;
    MGPU__FOR(i, n) {
        float d = g * (a[i] - b[i]);
        if (da) da[i] += d;
        if (db) db[i] -= d;
    }
}
extern "C" mgpu_result mgpu_cuda_mse_forward(const float *a, const float *b, int64_t n, float *loss, void *stream) {
    MGPU__REQUIRE(n > 0 && a && b && loss, "a, b, loss must be device pointers and n > 0");
    MGPU__LAUNCH(mgpu__mse_k, 1, 1024, 0, stream, a, b, n, loss);
    MGPU__LAUNCHED("mgpu__mse_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_mse_backward(const float *a, const float *b, const float *dloss, float *da, float *db, int64_t n, void *stream) {
    MGPU__REQUIRE(n > 0 && a && b && dloss, "a, b, dloss must be device pointers and n > 0");
    if (!da && !db) return MGPU_OK;
    MGPU__LAUNCH(mgpu__mse_bwd_k, mgpu__grid(n, MGPU__THREADS), MGPU__THREADS, 0, stream, a, b, dloss, da, db, n);
    MGPU__LAUNCHED("mgpu__mse_bwd_k");
    return MGPU_OK;
}

/* ======================================================================================
   Dropout: the CPU's counter-based RNG, bit for bit (mgpu_random_u32 in mgpu.h)
   ====================================================================================== */

__global__ void mgpu__dropout_k(uint64_t seed, uint64_t first, float p, float scale, const float *src, float *dst, int64_t n, int acc) {
    MGPU__FOR(i, n) {
        float v = mgpu__random_unit(seed, first + (uint64_t)i) >= p ? src[i] * scale : 0.0f;
        dst[i] = acc ? dst[i] + v : v;
    }
}
__global__ void mgpu__random_u32_k(uint64_t seed, uint64_t first, uint32_t *out, int64_t n) {
    MGPU__FOR(i, n) out[i] = mgpu__random_bits(seed, first + (uint64_t)i);
}
extern "C" mgpu_result mgpu_cuda_dropout(uint64_t seed, uint64_t first, float p, float scale, const float *src, float *dst, int64_t n,
                                         int accumulate, void *stream) {
    MGPU__REQUIRE(p >= 0.0f && p <= 1.0f, "p must be in [0, 1]");
    MGPU__REQUIRE(n >= 0 && (n == 0 || (src && dst)), "src and dst must be device pointers and n >= 0");
    if (n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__dropout_k, mgpu__grid(n, MGPU__THREADS), MGPU__THREADS, 0, stream, seed, first, p, scale, src, dst, n, accumulate);
    MGPU__LAUNCHED("mgpu__dropout_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_random_u32(uint64_t seed, uint64_t first, uint32_t *out, int64_t n, void *stream) {
    MGPU__REQUIRE(n >= 0 && (n == 0 || out), "out must be a device pointer and n >= 0");
    if (n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__random_u32_k, mgpu__grid(n, MGPU__THREADS), MGPU__THREADS, 0, stream, seed, first, out, n);
    MGPU__LAUNCHED("mgpu__random_u32_k");
    return MGPU_OK;
}

/* ======================================================================================
   Layer norm (two-pass statistics in double per row) and batch norm (block per channel)
   ====================================================================================== */

template <bool BLOCK>
__global__ void mgpu__ln_fwd_k(const float *x, const float *w, const float *b, float *y, float *mean, float *rstd, int64_t R, int64_t C,
                               float eps) {
    __shared__ double sh[32];
    mgpu__row_map m = mgpu__row_of_thread<BLOCK>();
    if (!BLOCK && m.row >= R) return;
    const float *xr = x + m.row * C;
    float *yr = y + m.row * C;
    double s = 0;
    for (int64_t j = m.lane; j < C; j += m.width) s += xr[j];
    double mu = mgpu__group_sum<BLOCK, double>(s, sh) / (double)C;
    double v = 0;
    for (int64_t j = m.lane; j < C; j += m.width) { double d = xr[j] - mu; v += d * d; }
    v = mgpu__group_sum<BLOCK, double>(v, sh) / (double)C;
    float fm = (float)mu, rs = (float)(1.0 / sqrt(v + (double)eps));
    for (int64_t j = m.lane; j < C; j += m.width) {
        float h = (xr[j] - fm) * rs;
        yr[j] = (w ? h * w[j] : h) + (b ? b[j] : 0.0f);
    }
    if (m.lane == 0) { mean[m.row] = fm; rstd[m.row] = rs; }
}
// dx += rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w
template <bool BLOCK>
__global__ void mgpu__ln_bwd_k(const float *x, const float *w, const float *dy, const float *mean, const float *rstd, float *dx, int64_t R,
                               int64_t C) {
    __shared__ double sh[32];
    mgpu__row_map m = mgpu__row_of_thread<BLOCK>();
    if (!BLOCK && m.row >= R) return;
    const float *xr = x + m.row * C, *gr = dy + m.row * C;
    float *dr = dx + m.row * C, mu = mean[m.row], rs = rstd[m.row];
    double s1 = 0, s2 = 0;
    for (int64_t j = m.lane; j < C; j += m.width) {
        float g = w ? gr[j] * w[j] : gr[j];
        s1 += g; s2 += (double)g * ((xr[j] - mu) * rs);
    }
    s1 = mgpu__group_sum<BLOCK, double>(s1, sh);
    s2 = mgpu__group_sum<BLOCK, double>(s2, sh);
    float a = (float)(s1 / (double)C), c = (float)(s2 / (double)C);
    for (int64_t j = m.lane; j < C; j += m.width) {
        float g = w ? gr[j] * w[j] : gr[j], h = (xr[j] - mu) * rs;
        dr[j] += rs * (g - a - h * c);
    }
}

extern "C" mgpu_result mgpu_cuda_layer_norm_forward(const float *x, const float *w, const float *b, float *y, float *mean, float *rstd,
                                                    int64_t R, int64_t C, float eps, void *stream) {
    MGPU__REQUIRE(R >= 0 && C > 0 && eps >= 0.0f, "need R >= 0, C > 0, eps >= 0");
    MGPU__REQUIRE(R == 0 || (x && y && mean && rstd), "x, y, mean, rstd must be device pointers");
    if (R == 0) return MGPU_OK;
    unsigned grid;
    bool block = C > MGPU__ROW_SMALL;
    MGPU__REQUIRE(mgpu__row_blocks(R, block, &grid), "too many rows");
    if (block) MGPU__LAUNCH(mgpu__ln_fwd_k<true>, grid, 256, 0, stream, x, w, b, y, mean, rstd, R, C, eps);
    else MGPU__LAUNCH(mgpu__ln_fwd_k<false>, grid, 256, 0, stream, x, w, b, y, mean, rstd, R, C, eps);
    MGPU__LAUNCHED("mgpu__ln_fwd_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_layer_norm_backward(const float *x, const float *w, const float *dy, const float *mean, const float *rstd,
                                                     float *dx, float *dw, float *db, int64_t R, int64_t C, void *stream) {
    MGPU__REQUIRE(R >= 0 && C > 0, "need R >= 0 and C > 0");
    MGPU__REQUIRE(R == 0 || (x && dy && mean && rstd), "x, dy, mean, rstd must be device pointers");
    if (R == 0) return MGPU_OK;
    if (dx) {
        unsigned grid;
        bool block = C > MGPU__ROW_SMALL;
        MGPU__REQUIRE(mgpu__row_blocks(R, block, &grid), "too many rows");
        if (block) MGPU__LAUNCH(mgpu__ln_bwd_k<true>, grid, 256, 0, stream, x, w, dy, mean, rstd, dx, R, C);
        else MGPU__LAUNCH(mgpu__ln_bwd_k<false>, grid, 256, 0, stream, x, w, dy, mean, rstd, dx, R, C);
        MGPU__LAUNCHED("mgpu__ln_bwd_k");
    }
    if (dw || db) return mgpu__colsum(dy, dw ? x : NULL, mean, rstd, R, C, dw, db, stream);
    return MGPU_OK;
}

// Element q of channel c in x (N, C, S): the (n, s) pairs in n-major order.
__device__ int64_t mgpu__bn_at(int64_t q, int64_t c, int64_t C, int64_t S) { return (q / S) * C * S + c * S + q % S; }

__global__ void mgpu__bn_fwd_k(const float *x, const float *w, const float *b, float *rm, float *rv, float *y, float *mean, float *rstd,
                               int64_t N, int64_t C, int64_t S, int training, float momentum, float eps) {
    __shared__ double sh[32];
    int64_t c = blockIdx.x, cnt = N * S;
    float fm, rs;
    if (training) {
        double s = 0, v = 0;
        for (int64_t q = threadIdx.x; q < cnt; q += blockDim.x) s += x[mgpu__bn_at(q, c, C, S)];
        double mu = mgpu__group_sum<true, double>(s, sh) / (double)cnt;
        for (int64_t q = threadIdx.x; q < cnt; q += blockDim.x) { double d = x[mgpu__bn_at(q, c, C, S)] - mu; v += d * d; }
        v = mgpu__group_sum<true, double>(v, sh);
        fm = (float)mu; rs = (float)(1.0 / sqrt(v / (double)cnt + (double)eps));
        if (threadIdx.x == 0 && rm) {
            rm[c] = (float)((1.0 - momentum) * rm[c] + momentum * mu);
            rv[c] = (float)((1.0 - momentum) * rv[c] + momentum * (v / (double)(cnt - 1)));   // unbiased, as PyTorch
        }
    } else {
        fm = rm[c]; rs = (float)(1.0 / sqrt((double)rv[c] + (double)eps));
    }
    float scale = w ? rs * w[c] : rs, shift = b ? b[c] : 0.0f;
    for (int64_t q = threadIdx.x; q < cnt; q += blockDim.x) {
        int64_t at = mgpu__bn_at(q, c, C, S);
        y[at] = (x[at] - fm) * scale + shift;
    }
    if (threadIdx.x == 0) { mean[c] = fm; rstd[c] = rs; }
}
__global__ void mgpu__bn_bwd_k(const float *x, const float *w, const float *dy, const float *mean, const float *rstd, float *dx, float *dw,
                               float *db, int64_t N, int64_t C, int64_t S, int training) {
    __shared__ double sh[32];
    int64_t c = blockIdx.x, cnt = N * S;
    float mu = mean[c], rs = rstd[c];
    double sg = 0, sgh = 0;
    for (int64_t q = threadIdx.x; q < cnt; q += blockDim.x) {
        int64_t at = mgpu__bn_at(q, c, C, S);
        sg += dy[at]; sgh += (double)dy[at] * ((x[at] - mu) * rs);
    }
    sg = mgpu__group_sum<true, double>(sg, sh);
    sgh = mgpu__group_sum<true, double>(sgh, sh);
    if (threadIdx.x == 0) {
        if (dw) dw[c] += (float)sgh;
        if (db) db[c] += (float)sg;
    }
    if (!dx) return;
    float scale = w ? rs * w[c] : rs;
    float k1 = training ? (float)(sg / (double)cnt) : 0.0f, k2 = training ? (float)(sgh / (double)cnt) : 0.0f;
    for (int64_t q = threadIdx.x; q < cnt; q += blockDim.x) {
        int64_t at = mgpu__bn_at(q, c, C, S);
        dx[at] += scale * (dy[at] - k1 - (x[at] - mu) * rs * k2);
    }
}

extern "C" mgpu_result mgpu_cuda_batch_norm_forward(const float *x, const float *w, const float *b, float *running_mean, float *running_var,
                                                    float *y, float *mean, float *rstd, int64_t N, int64_t C, int64_t S, int training,
                                                    float momentum, float eps, void *stream) {
    MGPU__REQUIRE(N >= 0 && C > 0 && S >= 0 && C <= 2147483647LL && eps >= 0.0f, "need N, S >= 0, C > 0 and eps >= 0");
    MGPU__REQUIRE((running_mean == NULL) == (running_var == NULL), "running_mean and running_var go together");
    MGPU__REQUIRE(training || running_mean, "eval needs the running statistics");
    MGPU__REQUIRE(!training || N * S > 1, "training needs more than one value per channel");
    MGPU__REQUIRE(x && y && mean && rstd, "x, y, mean, rstd must be device pointers");
    MGPU__LAUNCH(mgpu__bn_fwd_k, (unsigned)C, 256, 0, stream, x, w, b, running_mean, running_var, y, mean, rstd, N, C, S, training,
                                                                momentum, eps);
    MGPU__LAUNCHED("mgpu__bn_fwd_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_batch_norm_backward(const float *x, const float *w, const float *dy, const float *mean, const float *rstd,
                                                     float *dx, float *dw, float *db, int64_t N, int64_t C, int64_t S, int training,
                                                     void *stream) {
    MGPU__REQUIRE(N >= 0 && C > 0 && S >= 0 && C <= 2147483647LL, "need N, S >= 0 and C > 0");
    MGPU__REQUIRE(x && dy && mean && rstd, "x, dy, mean, rstd must be device pointers");
    if (!dx && !dw && !db) return MGPU_OK;
    MGPU__LAUNCH(mgpu__bn_bwd_k, (unsigned)C, 256, 0, stream, x, w, dy, mean, rstd, dx, dw, db, N, C, S, training);
    MGPU__LAUNCHED("mgpu__bn_bwd_k");
    return MGPU_OK;
}

/* ======================================================================================
   Embedding
   ====================================================================================== */

__global__ void mgpu__emb_fwd_k(const float *w, const void *idx, int i64, float *out, int64_t n, int64_t V, int64_t D) {
    MGPU__FOR(q, n * D) {
        int64_t row = mgpu__target_at(idx, i64, q / D);
        out[q] = (row >= 0 && row < V) ? w[row * D + q % D] : NAN;   // the host validates; NaN makes a miss visible
    }
}
// Thread (d, part) owns column d of the weight rows with row % parts == part and visits every index
// in order: each gradient element is written by one thread, in a fixed order.
#define MGPU__EMB_PARTS 32
__global__ void mgpu__emb_bwd_k(const void *idx, int i64, const float *dy, float *dw, int64_t n, int64_t V, int64_t D) {
    MGPU__FOR(t, D * MGPU__EMB_PARTS) {
        int64_t d = t % D, part = t / D;
        for (int64_t i = 0; i < n; i++) {
            int64_t row = mgpu__target_at(idx, i64, i);
            if (row >= 0 && row < V && row % MGPU__EMB_PARTS == part) dw[row * D + d] += dy[i * D + d];
        }
    }
}
extern "C" mgpu_result mgpu_cuda_embedding_forward(const float *weight, const void *idx, int idx_i64, float *out, int64_t n, int64_t V,
                                                   int64_t D, void *stream) {
    MGPU__REQUIRE(n >= 0 && V > 0 && D > 0 && (n == 0 || (weight && idx && out)), "bad pointers or sizes");
    if (n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__emb_fwd_k, mgpu__grid(n * D, MGPU__THREADS), MGPU__THREADS, 0, stream, weight, idx, idx_i64, out, n, V, D);
    MGPU__LAUNCHED("mgpu__emb_fwd_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_embedding_backward(const void *idx, int idx_i64, const float *dy, float *dweight, int64_t n, int64_t V,
                                                    int64_t D, void *stream) {
    MGPU__REQUIRE(n >= 0 && V > 0 && D > 0 && (n == 0 || (idx && dy && dweight)), "bad pointers or sizes");
    if (n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__emb_bwd_k, mgpu__grid(D * MGPU__EMB_PARTS, MGPU__THREADS), MGPU__THREADS, 0, stream, idx, idx_i64, dy, dweight,
                                                                                                             n, V, D);
    MGPU__LAUNCHED("mgpu__emb_bwd_k");
    return MGPU_OK;
}

/* ======================================================================================
   im2col / col2im and pooling, x (N, C, H, W)
   ====================================================================================== */

static int mgpu__geom_ok(const mgpu_cuda_conv_geom *g) {
    return g && g->N >= 0 && g->C > 0 && g->H > 0 && g->W > 0 && g->OH > 0 && g->OW > 0 && g->kernel > 0 && g->stride > 0 &&
           g->padding >= 0 && (g->OH - 1) * g->stride - g->padding < g->H && (g->OW - 1) * g->stride - g->padding < g->W;
}

__global__ void mgpu__im2col_k(mgpu_cuda_conv_geom g, const float *x, float *cols) {
    int64_t k = g.kernel, P = g.OH * g.OW, ckk = g.C * k * k;
    MGPU__FOR(q, g.N * ckk * P) {
        int64_t p = q % P, r = (q / P) % ckk, n = q / (P * ckk);
        int64_t c = r / (k * k), ky = (r / k) % k, kx = r % k;
        int64_t iy = (p / g.OW) * g.stride - g.padding + ky, ix = (p % g.OW) * g.stride - g.padding + kx;
        cols[q] = (iy >= 0 && iy < g.H && ix >= 0 && ix < g.W) ? x[((n * g.C + c) * g.H + iy) * g.W + ix] : 0.0f;
    }
}
// Output positions whose window covers input coordinate i along one axis: [lo, hi).
__device__ void mgpu__covering(int64_t i, int64_t pad, int64_t k, int64_t s, int64_t out, int64_t *lo, int64_t *hi) {
    int64_t a = i + pad - k + 1;   // first window start that still covers i
    *lo = a <= 0 ? 0 : (a + s - 1) / s;
    *hi = (i + pad) / s + 1;
    if (*hi > out) *hi = out;
}
__global__ void mgpu__col2im_k(mgpu_cuda_conv_geom g, const float *dcols, float *dx) {
    int64_t k = g.kernel, P = g.OH * g.OW, ckk = g.C * k * k;
    MGPU__FOR(q, g.N * g.C * g.H * g.W) {
        int64_t ix = q % g.W, iy = (q / g.W) % g.H, c = (q / (g.W * g.H)) % g.C, n = q / (g.W * g.H * g.C);
        int64_t y0, y1, x0, x1;
        mgpu__covering(iy, g.padding, k, g.stride, g.OH, &y0, &y1);
        mgpu__covering(ix, g.padding, k, g.stride, g.OW, &x0, &x1);
        float acc = 0.0f;
        for (int64_t oy = y0; oy < y1; oy++)
            for (int64_t ox = x0; ox < x1; ox++) {
                int64_t ky = iy + g.padding - oy * g.stride, kx = ix + g.padding - ox * g.stride;
                acc += dcols[(n * ckk + (c * k + ky) * k + kx) * P + oy * g.OW + ox];
            }
        dx[q] += acc;
    }
}
__global__ void mgpu__pool_fwd_k(mgpu_cuda_conv_geom g, int is_max, const float *x, float *y, int32_t *argmax) {
    float inv = 1.0f / (float)(g.kernel * g.kernel);
    MGPU__FOR(q, g.N * g.C * g.OH * g.OW) {
        int64_t ox = q % g.OW, oy = (q / g.OW) % g.OH, plane = q / (g.OW * g.OH);
        const float *xp = x + plane * g.H * g.W;
        int64_t ys = oy * g.stride - g.padding, xs = ox * g.stride - g.padding;
        int64_t y0 = ys > 0 ? ys : 0, y1 = ys + g.kernel < g.H ? ys + g.kernel : g.H;
        int64_t x0 = xs > 0 ? xs : 0, x1 = xs + g.kernel < g.W ? xs + g.kernel : g.W;
        float acc = is_max ? -INFINITY : 0.0f;
        int64_t best = y0 * g.W + x0;
        for (int64_t yy = y0; yy < y1; yy++)
            for (int64_t xx = x0; xx < x1; xx++) {
                float v = xp[yy * g.W + xx];
                if (!is_max) acc += v;
                else if (v > acc || v != v) { acc = v; best = yy * g.W + xx; }   // NaN wins, as on the CPU
            }
        y[q] = is_max ? acc : acc * inv;
        if (argmax) argmax[q] = (int32_t)best;
    }
}
__global__ void mgpu__pool_bwd_k(mgpu_cuda_conv_geom g, int is_max, const int32_t *argmax, const float *dy, float *dx) {
    float inv = 1.0f / (float)(g.kernel * g.kernel);
    MGPU__FOR(q, g.N * g.C * g.H * g.W) {
        int64_t ix = q % g.W, iy = (q / g.W) % g.H, plane = q / (g.W * g.H);
        int64_t y0, y1, x0, x1;
        mgpu__covering(iy, g.padding, g.kernel, g.stride, g.OH, &y0, &y1);
        mgpu__covering(ix, g.padding, g.kernel, g.stride, g.OW, &x0, &x1);
        const float *dyp = dy + plane * g.OH * g.OW;
        const int32_t *ap = is_max ? argmax + plane * g.OH * g.OW : NULL;
        float acc = 0.0f;
        for (int64_t oy = y0; oy < y1; oy++)
            for (int64_t ox = x0; ox < x1; ox++) {
                int64_t o = oy * g.OW + ox;
                if (!is_max) acc += dyp[o] * inv;
                else if (ap[o] == iy * g.W + ix) acc += dyp[o];
            }
        dx[q] += acc;
    }
}

extern "C" mgpu_result mgpu_cuda_im2col(const mgpu_cuda_conv_geom *g, const float *x, float *cols, void *stream) {
    MGPU__REQUIRE(mgpu__geom_ok(g), "inconsistent convolution geometry");
    MGPU__REQUIRE(g->N == 0 || (x && cols), "x and cols must be device pointers");
    if (g->N == 0) return MGPU_OK;
    int64_t total = g->N * g->C * g->kernel * g->kernel * g->OH * g->OW;
    MGPU__LAUNCH(mgpu__im2col_k, mgpu__grid(total, MGPU__THREADS), MGPU__THREADS, 0, stream, *g, x, cols);
    MGPU__LAUNCHED("mgpu__im2col_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_col2im(const mgpu_cuda_conv_geom *g, const float *dcols, float *dx, void *stream) {
    MGPU__REQUIRE(mgpu__geom_ok(g), "inconsistent convolution geometry");
    MGPU__REQUIRE(g->N == 0 || (dcols && dx), "dcols and dx must be device pointers");
    if (g->N == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__col2im_k, mgpu__grid(g->N * g->C * g->H * g->W, MGPU__THREADS), MGPU__THREADS, 0, stream, *g, dcols, dx);
    MGPU__LAUNCHED("mgpu__col2im_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_pool_forward(const mgpu_cuda_conv_geom *g, int is_max, const float *x, float *y, int32_t *argmax,
                                              void *stream) {
    MGPU__REQUIRE(mgpu__geom_ok(g) && g->H * g->W <= 2147483647LL, "inconsistent pooling geometry");
    MGPU__REQUIRE(g->N == 0 || (x && y), "x and y must be device pointers");
    if (g->N == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__pool_fwd_k, mgpu__grid(g->N * g->C * g->OH * g->OW, MGPU__THREADS), MGPU__THREADS, 0, stream, *g, is_max, x, y,
                                                                                                                     argmax);
    MGPU__LAUNCHED("mgpu__pool_fwd_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_pool_backward(const mgpu_cuda_conv_geom *g, int is_max, const int32_t *argmax, const float *dy, float *dx,
                                               void *stream) {
    MGPU__REQUIRE(mgpu__geom_ok(g), "inconsistent pooling geometry");
    MGPU__REQUIRE(g->N == 0 || (dy && dx && (!is_max || argmax)), "dy, dx (and argmax for max pooling) must be device pointers");
    if (g->N == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__pool_bwd_k, mgpu__grid(g->N * g->C * g->H * g->W, MGPU__THREADS), MGPU__THREADS, 0, stream, *g, is_max, argmax,
                                                                                                                   dy, dx);
    MGPU__LAUNCHED("mgpu__pool_bwd_k");
    return MGPU_OK;
}

/* ======================================================================================
   Copies: transpose, row blocks (concat / narrow)
   ====================================================================================== */

__global__ void mgpu__transpose_k(const float *x, float *y, int64_t outer, int64_t d0, int64_t mid, int64_t d1, int64_t inner, int acc) {
    MGPU__FOR(q, outer * d1 * mid * d0 * inner) {
        // q indexes y (outer, d1, mid, d0, inner)
        int64_t i = q % inner, r = q / inner;
        int64_t a0 = r % d0; r /= d0;
        int64_t m = r % mid; r /= mid;
        int64_t a1 = r % d1, o = r / d1;
        float v = x[(((o * d0 + a0) * mid + m) * d1 + a1) * inner + i];
        y[q] = acc ? y[q] + v : v;
    }
}
extern "C" mgpu_result mgpu_cuda_transpose(const float *x, float *y, int64_t outer, int64_t d0, int64_t mid, int64_t d1, int64_t inner,
                                           int accumulate, void *stream) {
    MGPU__REQUIRE(outer >= 0 && d0 >= 0 && mid >= 0 && d1 >= 0 && inner >= 0, "sizes must be >= 0");
    int64_t n = outer * d0 * mid * d1 * inner;
    MGPU__REQUIRE(n == 0 || (x && y), "x and y must be device pointers");
    if (n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__transpose_k, mgpu__grid(n, MGPU__THREADS), MGPU__THREADS, 0, stream, x, y, outer, d0, mid, d1, inner, accumulate);
    MGPU__LAUNCHED("mgpu__transpose_k");
    return MGPU_OK;
}
__global__ void mgpu__copy_rows_k(const float *src, int64_t src_row, int64_t src_off, float *dst, int64_t dst_row, int64_t dst_off,
                                  int64_t rows, int64_t len, int acc) {
    MGPU__FOR(q, rows * len) {
        int64_t r = q / len, j = q % len;
        float v = src[r * src_row + src_off + j];
        float *d = dst + r * dst_row + dst_off + j;
        *d = acc ? *d + v : v;
    }
}
extern "C" mgpu_result mgpu_cuda_copy_rows(const float *src, int64_t src_row, int64_t src_off, float *dst, int64_t dst_row, int64_t dst_off,
                                           int64_t rows, int64_t len, int accumulate, void *stream) {
    MGPU__REQUIRE(rows >= 0 && len >= 0 && src_off >= 0 && dst_off >= 0 && src_off + len <= src_row && dst_off + len <= dst_row,
                  "a row block reaches outside its row");
    MGPU__REQUIRE(rows * len == 0 || (src && dst), "src and dst must be device pointers");
    if (rows * len == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__copy_rows_k, mgpu__grid(rows * len, MGPU__THREADS), MGPU__THREADS, 0, stream, src, src_row, src_off, dst, dst_row,
                                                                                                       dst_off, rows, len, accumulate);
    MGPU__LAUNCHED("mgpu__copy_rows_k");
    return MGPU_OK;
}

/* ======================================================================================
   Reductions along a dim: x (outer, D, inner); one thread per output, D walked in order
   ====================================================================================== */

__global__ void mgpu__sum_dim_k(const float *x, float *y, int64_t outer, int64_t D, int64_t inner, float scale) {
    MGPU__FOR(q, outer * inner) {
        const float *xp = x + (q / inner) * D * inner + q % inner;
        double s = 0;
        for (int64_t d = 0; d < D; d++) s += xp[d * inner];
        y[q] = (float)(s * (double)scale);
    }
}
__global__ void mgpu__sum_dim_bwd_k(const float *dy, float *dx, int64_t outer, int64_t D, int64_t inner, float scale) {
    MGPU__FOR(q, outer * D * inner) dx[q] += scale * dy[(q / (D * inner)) * inner + q % inner];
}
__global__ void mgpu__max_dim_k(const float *x, float *y, int32_t *argmax, int64_t outer, int64_t D, int64_t inner) {
    MGPU__FOR(q, outer * inner) {
        const float *xp = x + (q / inner) * D * inner + q % inner;
        float m = xp[0];
        int64_t best = 0;
        for (int64_t d = 1; d < D && m == m; d++)
            if (xp[d * inner] > m || xp[d * inner] != xp[d * inner]) { m = xp[d * inner]; best = d; }
        y[q] = m;
        if (argmax) argmax[q] = (int32_t)best;
    }
}
__global__ void mgpu__max_dim_bwd_k(const int32_t *argmax, const float *dy, float *dx, int64_t outer, int64_t D, int64_t inner) {
    MGPU__FOR(q, outer * inner) dx[(q / inner) * D * inner + (int64_t)argmax[q] * inner + q % inner] += dy[q];
}

extern "C" mgpu_result mgpu_cuda_sum_dim(const float *x, float *y, int64_t outer, int64_t D, int64_t inner, float scale, void *stream) {
    MGPU__REQUIRE(outer >= 0 && D >= 0 && inner >= 0 && (outer * inner == 0 || (y && (D == 0 || x))), "bad pointers or sizes");
    if (outer * inner == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__sum_dim_k, mgpu__grid(outer * inner, MGPU__THREADS), MGPU__THREADS, 0, stream, x, y, outer, D, inner, scale);
    MGPU__LAUNCHED("mgpu__sum_dim_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_sum_dim_backward(const float *dy, float *dx, int64_t outer, int64_t D, int64_t inner, float scale,
                                                  void *stream) {
    MGPU__REQUIRE(outer >= 0 && D >= 0 && inner >= 0 && (outer * D * inner == 0 || (dy && dx)), "bad pointers or sizes");
    if (outer * D * inner == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__sum_dim_bwd_k, mgpu__grid(outer * D * inner, MGPU__THREADS), MGPU__THREADS, 0, stream, dy, dx, outer, D, inner,
                                                                                                                 scale);
    MGPU__LAUNCHED("mgpu__sum_dim_bwd_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_max_dim(const float *x, float *y, int32_t *argmax, int64_t outer, int64_t D, int64_t inner, void *stream) {
    MGPU__REQUIRE(outer >= 0 && D > 0 && D <= 2147483647LL && inner >= 0, "need D in [1, 2^31)");
    MGPU__REQUIRE(outer * inner == 0 || (x && y), "x and y must be device pointers");
    if (outer * inner == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__max_dim_k, mgpu__grid(outer * inner, MGPU__THREADS), MGPU__THREADS, 0, stream, x, y, argmax, outer, D, inner);
    MGPU__LAUNCHED("mgpu__max_dim_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_max_dim_backward(const int32_t *argmax, const float *dy, float *dx, int64_t outer, int64_t D, int64_t inner,
                                                  void *stream) {
    MGPU__REQUIRE(outer >= 0 && D > 0 && inner >= 0 && (outer * inner == 0 || (argmax && dy && dx)), "bad pointers or sizes");
    if (outer * inner == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__max_dim_bwd_k, mgpu__grid(outer * inner, MGPU__THREADS), MGPU__THREADS, 0, stream, argmax, dy, dx, outer, D, inner);
    MGPU__LAUNCHED("mgpu__max_dim_bwd_k");
    return MGPU_OK;
}

/* ======================================================================================
   Casts (round to nearest even, as mgpu_f32_to_f16 / mgpu_f32_to_bf16)
   ====================================================================================== */

__device__ float mgpu__load_as_f32(const void *p, int dt, int64_t i) {
    if (dt == MGPU_F16) return __half2float(((const __half *)p)[i]);
    if (dt == MGPU_BF16) return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    return ((const float *)p)[i];
}
__device__ void mgpu__store_from_f32(void *p, int dt, int64_t i, float v) {
    if (dt == MGPU_F16) ((__half *)p)[i] = __float2half_rn(v);
    else if (dt == MGPU_BF16) ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
    else ((float *)p)[i] = v;
}
__global__ void mgpu__cast_k(const void *src, int sdt, void *dst, int ddt, int64_t n) {
    MGPU__FOR(i, n) mgpu__store_from_f32(dst, ddt, i, mgpu__load_as_f32(src, sdt, i));
}
static int mgpu__float_dtype(int dt) { return dt == MGPU_F32 || dt == MGPU_F16 || dt == MGPU_BF16; }
extern "C" mgpu_result mgpu_cuda_cast(const void *src, int src_dtype, void *dst, int dst_dtype, int64_t n, void *stream) {
    MGPU__REQUIRE(mgpu__float_dtype(src_dtype) && mgpu__float_dtype(dst_dtype), "casts are between F32, F16 and BF16");
    MGPU__REQUIRE(n >= 0 && (n == 0 || (src && dst)), "src and dst must be device pointers and n >= 0");
    if (n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__cast_k, mgpu__grid(n, MGPU__THREADS), MGPU__THREADS, 0, stream, src, src_dtype, dst, dst_dtype, n);
    MGPU__LAUNCHED("mgpu__cast_k");
    return MGPU_OK;
}

/* ======================================================================================
   Multi-tensor optimizer updates: a launch covers up to 32 tensors; each block owns one chunk
   of one tensor, found through a table passed by value in the kernel arguments.
   ====================================================================================== */

#define MGPU__MT_TENSORS 32
#define MGPU__MT_BLOCKS 256
#define MGPU__MT_CHUNK 16384
struct mgpu__mt_list {
    float *p[MGPU__MT_TENSORS], *s1[MGPU__MT_TENSORS], *s2[MGPU__MT_TENSORS];
    const float *g[MGPU__MT_TENSORS];
    int64_t n[MGPU__MT_TENSORS];
    int16_t block_tensor[MGPU__MT_BLOCKS];
    int32_t block_chunk[MGPU__MT_BLOCKS];
    int blocks;
};

// The same arithmetic as the CPU's mgpu__adam_range, after multiplying the gradient by grad_scale.
__global__ void mgpu__adam_k(mgpu__mt_list L, mgpu_cuda_adam_args a) {
    int t = L.block_tensor[blockIdx.x];
    int64_t lo = (int64_t)L.block_chunk[blockIdx.x] * MGPU__MT_CHUNK, hi = lo + MGPU__MT_CHUNK < L.n[t] ? lo + MGPU__MT_CHUNK : L.n[t];
    float *P = L.p[t], *M = L.s1[t], *V = L.s2[t];
    const float *G = L.g[t];
    float omb1 = 1.0f - a.beta1, omb2 = 1.0f - a.beta2;
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        float p = P[i];
        float g = G[i] * a.grad_scale + a.l2 * p;
        float m = a.beta1 * M[i] + omb1 * g;
        float v = a.beta2 * V[i] + omb2 * g * g;
        float denom = sqrtf(v) / a.bc2_sqrt + a.eps;
        M[i] = m; V[i] = v;
        P[i] = p * a.decay - a.step_size * m / denom;
    }
}
__global__ void mgpu__sgd_k(mgpu__mt_list L, mgpu_cuda_sgd_args a) {
    int t = L.block_tensor[blockIdx.x];
    int64_t lo = (int64_t)L.block_chunk[blockIdx.x] * MGPU__MT_CHUNK, hi = lo + MGPU__MT_CHUNK < L.n[t] ? lo + MGPU__MT_CHUNK : L.n[t];
    float *P = L.p[t], *B = L.s1[t];
    const float *G = L.g[t];
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        float d = G[i] * a.grad_scale + a.weight_decay * P[i];
        if (B) {
            float b = a.first ? d : a.momentum * B[i] + a.keep * d;
            B[i] = b;
            d = a.nesterov ? d + a.momentum * b : b;
        }
        P[i] -= a.lr * d;
    }
}

typedef mgpu_result (*mgpu__mt_launch_fn)(const mgpu__mt_list *L, const void *args, void *stream);
static mgpu_result mgpu__adam_launch(const mgpu__mt_list *L, const void *args, void *stream) {
    MGPU__LAUNCH(mgpu__adam_k, (unsigned)L->blocks, MGPU__THREADS, 0, stream, *L, *(const mgpu_cuda_adam_args *)args);
    MGPU__LAUNCHED("mgpu__adam_k");
    return MGPU_OK;
}
static mgpu_result mgpu__sgd_launch(const mgpu__mt_list *L, const void *args, void *stream) {
    MGPU__LAUNCH(mgpu__sgd_k, (unsigned)L->blocks, MGPU__THREADS, 0, stream, *L, *(const mgpu_cuda_sgd_args *)args);
    MGPU__LAUNCHED("mgpu__sgd_k");
    return MGPU_OK;
}
// Packs tensors into lists, launching whenever the tensor slots or the block table fill up.
static mgpu_result mgpu__mt_flush(mgpu__mt_list *L, int *used, mgpu__mt_launch_fn launch, const void *args, void *stream) {
    mgpu_result r = L->blocks > 0 ? launch(L, args, stream) : MGPU_OK;
    memset(L, 0, sizeof *L);
    *used = 0;
    return r;
}
static mgpu_result mgpu__multi_tensor_apply(int n_tensors, float *const *p, const float *const *g, float *const *s1, float *const *s2,
                                            const int64_t *numel, mgpu__mt_launch_fn launch, const void *args, void *stream) {
    mgpu__mt_list L;
    int used = 0;
    mgpu_result r = MGPU_OK;
    memset(&L, 0, sizeof L);
    for (int t = 0; t < n_tensors && r == MGPU_OK; t++) {
        int64_t chunks = (numel[t] + MGPU__MT_CHUNK - 1) / MGPU__MT_CHUNK;
        if (numel[t] <= 0) continue;
        if (chunks > 2147483647LL) return mgpu__cu_invalid(__func__, "a tensor is too large");
        for (int64_t c = 0; c < chunks && r == MGPU_OK; c++) {
            if (L.blocks == MGPU__MT_BLOCKS || (c == 0 && used == MGPU__MT_TENSORS)) r = mgpu__mt_flush(&L, &used, launch, args, stream);
            if (c == 0 || used == 0) {   // (re)register tensor t in the current list
                L.p[used] = p[t]; L.g[used] = g[t]; L.n[used] = numel[t];
                L.s1[used] = s1 ? s1[t] : NULL; L.s2[used] = s2 ? s2[t] : NULL;
                used++;
            }
            L.block_tensor[L.blocks] = (int16_t)(used - 1);
            L.block_chunk[L.blocks] = (int32_t)c;
            L.blocks++;
        }
    }
    if (r != MGPU_OK) return r;
    return mgpu__mt_flush(&L, &used, launch, args, stream);
}

static int mgpu__tensor_lists_ok(int n, float *const *p, const float *const *g, const int64_t *numel) {
    if (n < 0 || (n > 0 && (!p || !g || !numel))) return 0;
    for (int t = 0; t < n; t++) if (numel[t] < 0 || (numel[t] > 0 && (!p[t] || !g[t]))) return 0;
    return 1;
}
extern "C" mgpu_result mgpu_cuda_adam_update(int n_tensors, float *const *params, const float *const *grads, float *const *m,
                                             float *const *v, const int64_t *numel, const mgpu_cuda_adam_args *a, void *stream) {
    MGPU__REQUIRE(a && mgpu__tensor_lists_ok(n_tensors, params, grads, numel) && (n_tensors == 0 || (m && v)),
                  "params, grads, m, v, numel and args must be given (host arrays of device pointers)");
    for (int t = 0; t < n_tensors; t++) MGPU__REQUIRE(numel[t] == 0 || (m[t] && v[t]), "every tensor needs its m and v");
    return mgpu__multi_tensor_apply(n_tensors, params, grads, m, v, numel, mgpu__adam_launch, a, stream);
}
extern "C" mgpu_result mgpu_cuda_sgd_update(int n_tensors, float *const *params, const float *const *grads, float *const *buf,
                                            const int64_t *numel, const mgpu_cuda_sgd_args *a, void *stream) {
    MGPU__REQUIRE(a && mgpu__tensor_lists_ok(n_tensors, params, grads, numel), "params, grads, numel and args must be given");
    return mgpu__multi_tensor_apply(n_tensors, params, grads, buf, NULL, numel, mgpu__sgd_launch, a, stream);
}

extern "C" mgpu_result mgpu_cuda_global_norm(int n_tensors, const float *const *xs, const int64_t *numel, float *out, float *scratch,
                                             void *stream) {
    MGPU__REQUIRE(n_tensors >= 0 && out && scratch && (n_tensors == 0 || (xs && numel)), "bad pointers");
    for (int t = 0; t < n_tensors; t++) {
        MGPU__REQUIRE(numel[t] >= 0 && (numel[t] == 0 || xs[t]), "a tensor pointer is NULL");
        mgpu_result r = mgpu__reduce_partials(MGPU__RED_SQ, xs[t], NULL, numel[t], scratch + (int64_t)t * MGPU_CUDA_REDUCE_PARTIALS, stream);
        if (r != MGPU_OK) return r;
    }
    if (n_tensors == 0) return mgpu_cuda_fill(out, 1, 0.0f, stream);
    return mgpu__reduce_final(scratch, (int64_t)n_tensors * MGPU_CUDA_REDUCE_PARTIALS, 1.0f, 1, out, stream);
}
__global__ void mgpu__clip_coef_k(const float *norm, float max_norm, float *coef) {
    float c = max_norm / (norm[0] + 1e-6f);   // torch.nn.utils.clip_grad_norm_
    coef[0] = c < 1.0f ? c : 1.0f;
}
__global__ void mgpu__scale_by_k(float *x, int64_t n, const float *s) { MGPU__FOR(i, n) x[i] *= s[0]; }
__global__ void mgpu__check_finite_k(const float *x, int64_t n, int32_t *found) {
    MGPU__FOR(i, n) if (!isfinite(x[i])) found[0] = 1;   // every writer stores the same value
}
extern "C" mgpu_result mgpu_cuda_clip_coef(const float *norm, float max_norm, float *coef, void *stream) {
    MGPU__REQUIRE(norm && coef && max_norm >= 0.0f, "norm and coef must be device pointers, max_norm >= 0");
    MGPU__LAUNCH(mgpu__clip_coef_k, 1, 1, 0, stream, norm, max_norm, coef);
    MGPU__LAUNCHED("mgpu__clip_coef_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_scale_by(float *x, int64_t n, const float *s, void *stream) {
    MGPU__REQUIRE(n >= 0 && s && (n == 0 || x), "x and s must be device pointers");
    if (n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__scale_by_k, mgpu__grid(n, MGPU__THREADS), MGPU__THREADS, 0, stream, x, n, s);
    MGPU__LAUNCHED("mgpu__scale_by_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_check_finite(const float *x, int64_t n, int32_t *found, void *stream) {
    MGPU__REQUIRE(n >= 0 && found && (n == 0 || x), "x and found must be device pointers");
    if (n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__check_finite_k, mgpu__grid(n, MGPU__THREADS), MGPU__THREADS, 0, stream, x, n, found);
    MGPU__LAUNCHED("mgpu__check_finite_k");
    return MGPU_OK;
}

/* ======================================================================================
   GEMM: cuBLASLt with a plan cache, cuBLAS fallback. Row-major C = op(A) op(B) is computed as the
   column-major C^T = op(B)^T op(A)^T, so B goes first.
   ====================================================================================== */

#define MGPU__PLAN_CACHE 64
struct mgpu__gemm_key { int64_t m, n, k, lda, ldb, ldc; int ta, tb, dtype, epi, tf32; };
struct mgpu__gemm_plan {
    mgpu__gemm_key key;
    int used, ok;   // ok 0: no Lt algorithm for this shape, use the fallback
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulAlgo_t algo;
};
struct mgpu__blas {
    cublasHandle_t handle;
    cublasLtHandle_t lt;
    cudaStream_t stream;
    void *workspace;
    size_t workspace_bytes;
    int tf32, next_victim;
    mgpu__gemm_plan plans[MGPU__PLAN_CACHE];
};

static void mgpu__plan_release(mgpu__gemm_plan *p) {
    if (!p->used) return;
    if (p->desc) cublasLtMatmulDescDestroy(p->desc);
    if (p->la) cublasLtMatrixLayoutDestroy(p->la);
    if (p->lb) cublasLtMatrixLayoutDestroy(p->lb);
    if (p->lc) cublasLtMatrixLayoutDestroy(p->lc);
    memset(p, 0, sizeof *p);
}

extern "C" void mgpu_cuda_blas_destroy(void *blas) {
    mgpu__blas *b = (mgpu__blas *)blas;
    if (!b) return;
    for (int i = 0; i < MGPU__PLAN_CACHE; i++) mgpu__plan_release(&b->plans[i]);
    if (b->workspace) cudaFree(b->workspace);
    if (b->lt) cublasLtDestroy(b->lt);
    if (b->handle) cublasDestroy(b->handle);
    free(b);
}
static mgpu_result mgpu__blas_init(mgpu__blas *b, void *stream, size_t workspace_bytes) {
    b->stream = MGPU__STREAM(stream);
    b->workspace_bytes = workspace_bytes ? workspace_bytes : ((size_t)32 << 20);
    MGPU__CUBLAS(cublasCreate(&b->handle));
    MGPU__CUBLAS(cublasLtCreate(&b->lt));
    MGPU__CU(cudaMalloc(&b->workspace, b->workspace_bytes));
    MGPU__CUBLAS(cublasSetStream(b->handle, b->stream));
    // cuBLAS then never allocates during a step, which CUDA Graph capture requires
    MGPU__CUBLAS(cublasSetWorkspace(b->handle, b->workspace, b->workspace_bytes));
    MGPU__CUBLAS(cublasSetMathMode(b->handle, CUBLAS_DEFAULT_MATH));
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_blas_create(void **blas, void *stream, size_t workspace_bytes) {
    MGPU__REQUIRE(blas, "blas must not be NULL");
    *blas = NULL;
    mgpu__blas *b = (mgpu__blas *)calloc(1, sizeof(mgpu__blas));
    if (!b) return mgpu__cu_report(MGPU_ERR_OOM_HOST, __func__, "calloc", "out of host memory");
    mgpu_result r = mgpu__blas_init(b, stream, workspace_bytes);
    if (r != MGPU_OK) { mgpu_cuda_blas_destroy(b); return r; }
    *blas = b;
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_blas_set_stream(void *blas, void *stream) {
    mgpu__blas *b = (mgpu__blas *)blas;
    MGPU__REQUIRE(b, "blas is NULL");
    b->stream = MGPU__STREAM(stream);
    MGPU__CUBLAS(cublasSetStream(b->handle, b->stream));
    MGPU__CUBLAS(cublasSetWorkspace(b->handle, b->workspace, b->workspace_bytes));
    return MGPU_OK;
}
extern "C" void mgpu_cuda_blas_set_tf32(void *blas, int allow) {
    mgpu__blas *b = (mgpu__blas *)blas;
    if (!b) return;
    b->tf32 = allow != 0;
    cublasSetMathMode(b->handle, allow ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH);
}
extern "C" int mgpu_cuda_blas_plan_count(const void *blas) {
    const mgpu__blas *b = (const mgpu__blas *)blas;
    int n = 0;
    if (b) for (int i = 0; i < MGPU__PLAN_CACHE; i++) n += b->plans[i].used;
    return n;
}

static cudaDataType_t mgpu__cuda_type(int dt) {
    return dt == MGPU_F16 ? CUDA_R_16F : dt == MGPU_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}
static cublasComputeType_t mgpu__compute_type(int dt, int tf32) {
    return (dt == MGPU_F32 && tf32) ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
}
static cublasLtEpilogue_t mgpu__lt_epilogue(int epi) {
    switch (epi) {
    case MGPU_CUDA_EPI_BIAS: return CUBLASLT_EPILOGUE_BIAS;
    case MGPU_CUDA_EPI_BIAS_RELU: return CUBLASLT_EPILOGUE_RELU_BIAS;
    case MGPU_CUDA_EPI_BIAS_GELU: return CUBLASLT_EPILOGUE_GELU_BIAS;   // tanh approximation
    default: return CUBLASLT_EPILOGUE_DEFAULT;
    }
}

// Builds the descriptors and asks the heuristic for the best algorithm; p->ok = 0 when none fits.
static mgpu_result mgpu__plan_build(mgpu__blas *b, mgpu__gemm_plan *p, const mgpu__gemm_key *k) {
    p->key = *k; p->used = 1; p->ok = 0;
    cudaDataType_t ab = mgpu__cuda_type(k->dtype);
    cublasOperation_t opa = k->tb ? CUBLAS_OP_T : CUBLAS_OP_N, opb = k->ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasLtEpilogue_t epi = mgpu__lt_epilogue(k->epi);
    MGPU__CUBLAS(cublasLtMatmulDescCreate(&p->desc, mgpu__compute_type(k->dtype, k->tf32), CUDA_R_32F));
    MGPU__CUBLAS(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
    MGPU__CUBLAS(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));
    MGPU__CUBLAS(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
    // column-major views: first operand is B (n x k after op), second is A (k x m after op)
    MGPU__CUBLAS(cublasLtMatrixLayoutCreate(&p->la, ab, k->tb ? k->k : k->n, k->tb ? k->n : k->k, k->ldb));
    MGPU__CUBLAS(cublasLtMatrixLayoutCreate(&p->lb, ab, k->ta ? k->m : k->k, k->ta ? k->k : k->m, k->lda));
    MGPU__CUBLAS(cublasLtMatrixLayoutCreate(&p->lc, CUDA_R_32F, k->n, k->m, k->ldc));
    cublasLtMatmulPreference_t pref = NULL;
    MGPU__CUBLAS(cublasLtMatmulPreferenceCreate(&pref));
    cublasStatus_t s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &b->workspace_bytes,
                                                            sizeof b->workspace_bytes);
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    memset(&res, 0, sizeof res);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulAlgoGetHeuristic(b->lt, p->desc, p->la, p->lb, p->lc, p->lc, pref, 1, &res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (s == CUBLAS_STATUS_SUCCESS && found > 0 && res.state == CUBLAS_STATUS_SUCCESS) { p->algo = res.algo; p->ok = 1; }
    return MGPU_OK;   // no algorithm is not an error: the caller falls back to cublasGemmEx
}

static mgpu__gemm_plan *mgpu__plan_find(mgpu__blas *b, const mgpu__gemm_key *k) {
    for (int i = 0; i < MGPU__PLAN_CACHE; i++)
        if (b->plans[i].used && memcmp(&b->plans[i].key, k, sizeof *k) == 0) return &b->plans[i];
    return NULL;
}
static mgpu_result mgpu__plan_get(mgpu__blas *b, const mgpu__gemm_key *k, mgpu__gemm_plan **out) {
    mgpu__gemm_plan *p = mgpu__plan_find(b, k);
    if (!p) {
        for (int i = 0; i < MGPU__PLAN_CACHE && !p; i++) if (!b->plans[i].used) p = &b->plans[i];
        if (!p) {   // full: replace round-robin
            p = &b->plans[b->next_victim];
            b->next_victim = (b->next_victim + 1) % MGPU__PLAN_CACHE;
            mgpu__plan_release(p);
        }
        mgpu_result r = mgpu__plan_build(b, p, k);
        if (r != MGPU_OK) { mgpu__plan_release(p); return r; }
    }
    *out = p;
    return MGPU_OK;
}

__global__ void mgpu__bias_act_k(float *c, int64_t m, int64_t n, int64_t ldc, const float *bias, int epi) {
    MGPU__FOR(q, m * n) {
        int64_t i = q / n, j = q % n;
        float v = c[i * ldc + j] + bias[j];
        if (epi == MGPU_CUDA_EPI_BIAS_RELU) v = v > 0 ? v : 0.0f;
        else if (epi == MGPU_CUDA_EPI_BIAS_GELU) v = mgpu__gelu_tanh_d(v);
        c[i * ldc + j] = v;
    }
}

static mgpu_result mgpu__gemm_fallback(mgpu__blas *b, const mgpu__gemm_key *k, float alpha, const void *a, const void *bm, float beta,
                                       float *c, const float *bias) {
    cublasOperation_t opa = k->tb ? CUBLAS_OP_T : CUBLAS_OP_N, opb = k->ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (k->dtype == MGPU_F32 && !k->tf32)
        MGPU__CUBLAS(cublasSgemm(b->handle, opa, opb, (int)k->n, (int)k->m, (int)k->k, &alpha, (const float *)bm, (int)k->ldb,
                                 (const float *)a, (int)k->lda, &beta, c, (int)k->ldc));
    else
        MGPU__CUBLAS(cublasGemmEx(b->handle, opa, opb, (int)k->n, (int)k->m, (int)k->k, &alpha, bm, mgpu__cuda_type(k->dtype), (int)k->ldb,
                                  a, mgpu__cuda_type(k->dtype), (int)k->lda, &beta, c, CUDA_R_32F, (int)k->ldc,
                                  mgpu__compute_type(k->dtype, k->tf32), CUBLAS_GEMM_DEFAULT));
    if (k->epi != MGPU_CUDA_EPI_NONE) {
        MGPU__LAUNCH(mgpu__bias_act_k, mgpu__grid(k->m * k->n, MGPU__THREADS), MGPU__THREADS, 0, b->stream, c, k->m, k->n, k->ldc, bias, k->epi);
        MGPU__LAUNCHED("mgpu__bias_act_k");
    }
    return MGPU_OK;
}

extern "C" mgpu_result mgpu_cuda_gemm(void *blas, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha, const void *a,
                                      int64_t lda, const void *b, int64_t ldb, int ab_dtype, float beta, float *c, int64_t ldc,
                                      int epilogue, const float *bias, int use_lt) {
    mgpu__blas *bl = (mgpu__blas *)blas;
    MGPU__REQUIRE(bl, "blas is NULL (create it with mgpu_cuda_blas_create)");
    MGPU__REQUIRE(mgpu__float_dtype(ab_dtype), "ab_dtype must be F32, F16 or BF16");
    MGPU__REQUIRE(m >= 0 && n >= 0 && k >= 0 && m <= 2147483647LL && n <= 2147483647LL && k <= 2147483647LL, "sizes must fit in int");
    MGPU__REQUIRE(epilogue >= MGPU_CUDA_EPI_NONE && epilogue <= MGPU_CUDA_EPI_BIAS_GELU && (epilogue == MGPU_CUDA_EPI_NONE || bias),
                  "bad epilogue or missing bias");
    MGPU__REQUIRE(lda >= (trans_a ? m : k) && ldb >= (trans_b ? k : n) && ldc >= n && lda > 0 && ldb > 0 && ldc > 0,
                  "leading dimensions are too small for the row-major operands");
    if (m == 0 || n == 0) return MGPU_OK;
    MGPU__REQUIRE(a && b && c, "a, b and c must be device pointers");
    mgpu__gemm_key key;
    memset(&key, 0, sizeof key);   // padding too: the key is compared with memcmp
    key.m = m; key.n = n; key.k = k; key.lda = lda; key.ldb = ldb; key.ldc = ldc;
    key.ta = trans_a != 0; key.tb = trans_b != 0; key.dtype = ab_dtype; key.epi = epilogue; key.tf32 = bl->tf32;
    if (k == 0 || !use_lt) return mgpu__gemm_fallback(bl, &key, alpha, a, b, beta, c, bias);
    mgpu__gemm_plan *p = NULL;
    mgpu_result r = mgpu__plan_get(bl, &key, &p);
    if (r != MGPU_OK) return r;
    if (!p->ok) return mgpu__gemm_fallback(bl, &key, alpha, a, b, beta, c, bias);
    if (epilogue != MGPU_CUDA_EPI_NONE)
        MGPU__CUBLAS(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    MGPU__CUBLAS(cublasLtMatmul(bl->lt, p->desc, &alpha, b, p->la, a, p->lb, &beta, c, p->lc, c, p->lc, &p->algo, bl->workspace,
                                bl->workspace_bytes, bl->stream));
    return MGPU_OK;
}

/* ======================================================================================
   Attention: S = scale * Q K^T (batched GEMM), P = masked softmax(S), O = P V
   ====================================================================================== */

// Row-major batched C = alpha * op(A) op(B) + beta * C through the column-major swap.
static mgpu_result mgpu__gemm_batched(mgpu__blas *b, int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                                      int64_t lda, int64_t sa, const float *B, int64_t ldb, int64_t sb, float beta, float *C, int64_t ldc,
                                      int64_t sc, int64_t batch) {
    MGPU__CUBLAS(cublasSgemmStridedBatched(b->handle, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)N, (int)M, (int)K,
                                           &alpha, B, (int)ldb, sb, A, (int)lda, sa, &beta, C, (int)ldc, sc, (int)batch));
    return MGPU_OK;
}
static int mgpu__attn_sizes_ok(int64_t BH, int64_t Tq, int64_t Tk, int64_t D) {
    const int64_t lim = 2147483647LL;
    return BH > 0 && Tq > 0 && Tk > 0 && D > 0 && BH <= lim && Tq <= lim && Tk <= lim && D <= lim;
}

extern "C" mgpu_result mgpu_cuda_attention_forward(void *blas, const float *q, const float *k, const float *v, float *out, float *probs,
                                                   int64_t BH, int64_t Tq, int64_t Tk, int64_t D, int causal, void *stream) {
    mgpu__blas *b = (mgpu__blas *)blas;
    MGPU__REQUIRE(b && q && k && v && out && probs, "blas, q, k, v, out and probs must be given");
    MGPU__REQUIRE(mgpu__attn_sizes_ok(BH, Tq, Tk, D), "sizes must be positive and fit in int");
    mgpu_result r = mgpu_cuda_blas_set_stream(b, stream);
    if (r != MGPU_OK) return r;
    float scale = (float)(1.0 / sqrt((double)D));
    r = mgpu__gemm_batched(b, 0, 1, Tq, Tk, D, scale, q, D, Tq * D, k, D, Tk * D, 0.0f, probs, Tk, Tq * Tk, BH);
    if (r == MGPU_OK) r = mgpu__softmax_rows(probs, probs, BH * Tq, Tk, 0, causal ? Tq : 0, stream);
    if (r == MGPU_OK) r = mgpu__gemm_batched(b, 0, 0, Tq, D, Tk, 1.0f, probs, Tk, Tq * Tk, v, D, Tk * D, 0.0f, out, D, Tq * D, BH);
    return r;
}
extern "C" mgpu_result mgpu_cuda_attention_backward(void *blas, const float *q, const float *k, const float *v, const float *probs,
                                                    const float *dout, float *dq, float *dk, float *dv, float *dprobs, int64_t BH,
                                                    int64_t Tq, int64_t Tk, int64_t D, int causal, void *stream) {
    mgpu__blas *b = (mgpu__blas *)blas;
    (void)causal;   // masked entries have probability 0, so their gradient is 0 already
    MGPU__REQUIRE(b && q && k && v && probs && dout && dprobs, "blas, q, k, v, probs, dout and dprobs must be given");
    MGPU__REQUIRE(mgpu__attn_sizes_ok(BH, Tq, Tk, D), "sizes must be positive and fit in int");
    mgpu_result r = mgpu_cuda_blas_set_stream(b, stream);
    float scale = (float)(1.0 / sqrt((double)D));
    // dV += P^T dO
    if (r == MGPU_OK && dv) r = mgpu__gemm_batched(b, 1, 0, Tk, D, Tq, 1.0f, probs, Tk, Tq * Tk, dout, D, Tq * D, 1.0f, dv, D, Tk * D, BH);
    if (r != MGPU_OK || (!dq && !dk)) return r;
    // dP = dO V^T, then dS = scale * softmax'(P) dP in place
    r = mgpu__gemm_batched(b, 0, 1, Tq, Tk, D, 1.0f, dout, D, Tq * D, v, D, Tk * D, 0.0f, dprobs, Tk, Tq * Tk, BH);
    if (r == MGPU_OK) r = mgpu__softmax_bwd_rows(probs, dprobs, dprobs, BH * Tq, Tk, 0, scale, 0, stream);
    // dQ += dS K, dK += dS^T Q
    if (r == MGPU_OK && dq) r = mgpu__gemm_batched(b, 0, 0, Tq, D, Tk, 1.0f, dprobs, Tk, Tq * Tk, k, D, Tk * D, 1.0f, dq, D, Tq * D, BH);
    if (r == MGPU_OK && dk) r = mgpu__gemm_batched(b, 1, 0, Tk, D, Tq, 1.0f, dprobs, Tk, Tq * Tk, q, D, Tq * D, 1.0f, dk, D, Tk * D, BH);
    return r;
}
