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
    // The runtime also keeps e as its "last error": reported here, it is handled, and must not be
    // found again by the next launch's cudaGetLastError (MGPU__LAUNCHED), which would blame an
    // innocent kernel (a failed, recovered cudaMalloc once surfaced as "launch of ... failed").
    (void)cudaGetLastError();
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

__global__ void mgpu__binary_fwd_k(int op, mgpu__bcast g, const float *a, const float *b, float *out) {
    MGPU__FOR(i, g.numel) {
        int64_t rem = i, ao = 0, bo = 0;
        for (int d = g.ndim - 1; d >= 0; d--) {
            int64_t c = rem % g.shape[d];
            rem /= g.shape[d];
            ao += c * g.a_stride[d]; bo += c * g.b_stride[d];
        }
        float x = a[ao], y = b[bo];
        out[i] = op == MGPU__BIN_ADD ? x + y : op == MGPU__BIN_SUB ? x - y : x * y;
    }
}
// Output offset (oo) and other-operand offset (to) of the r-th output position that read element j
// of the operand `own` (the positions are enumerated in a fixed order over own's broadcast dims).
__device__ void mgpu__bcast_offsets(const mgpu__bcast &g, const int64_t *s_own, const int64_t *s_oth, int64_t j, int64_t r,
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
    return op == MGPU__BIN_MUL ? dy[oo] * other[to] : dy[oo];
}
// One thread per element j of the operand `own` (a or b): it walks, in a fixed order, every output
// position that read it, so broadcast reductions need no atomics. Used when few positions read each j.
__global__ void mgpu__binary_bwd_k(int op, int own_is_a, mgpu__bcast g, const float *other, const float *dy, float *dst) {
    const int64_t *s_own = own_is_a ? g.a_stride : g.b_stride, *s_oth = own_is_a ? g.b_stride : g.a_stride;
    int64_t own_n = own_is_a ? g.a_numel : g.b_numel, reps = g.numel / (own_n ? own_n : 1);
    float sign = (op == MGPU__BIN_SUB && !own_is_a) ? -1.0f : 1.0f;
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
__global__ void mgpu__binary_bwd_block_k(int op, int own_is_a, mgpu__bcast g, const float *other, const float *dy, float *dst) {
    __shared__ double sh[32];
    const int64_t *s_own = own_is_a ? g.a_stride : g.b_stride, *s_oth = own_is_a ? g.b_stride : g.a_stride;
    int64_t own_n = own_is_a ? g.a_numel : g.b_numel, reps = g.numel / (own_n ? own_n : 1);
    float sign = (op == MGPU__BIN_SUB && !own_is_a) ? -1.0f : 1.0f;
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
static mgpu_result mgpu__binary_bwd_one(int op, int own_is_a, const mgpu__bcast *g, const float *other, const float *dy, float *dst,
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

static int mgpu__binary_kind_ok(int kind) { return kind >= MGPU__BIN_ADD && kind <= MGPU__BIN_MUL; }

extern "C" mgpu_result mgpu_cuda_binary_forward(const mgpu__binary_args *args, void *stream) {
    MGPU__REQUIRE(args && mgpu__binary_kind_ok(args->kind), "kind is not an mgpu__binary_kind value");
    const mgpu__bcast *g = &args->g;
    MGPU__REQUIRE(g->numel == 0 || (args->a && args->b && args->out), "a, b and out must be device pointers");
    if (g->numel == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__binary_fwd_k, mgpu__grid(g->numel, MGPU__THREADS), MGPU__THREADS, 0, stream, args->kind, *g, args->a, args->b,
                 args->out);
    MGPU__LAUNCHED("mgpu__binary_fwd_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_binary_backward(const mgpu__binary_args *args, void *stream) {
    MGPU__REQUIRE(args && mgpu__binary_kind_ok(args->kind), "kind is not an mgpu__binary_kind value");
    const mgpu__bcast *g = &args->g;
    MGPU__REQUIRE(g->numel == 0 || args->dy, "dy must be a device pointer");
    MGPU__REQUIRE(args->kind != MGPU__BIN_MUL || ((!args->da || args->b) && (!args->db || args->a)), "mul backward needs the other operand");
    if (g->numel == 0) return MGPU_OK;
    mgpu_result r = args->da ? mgpu__binary_bwd_one(args->kind, 1, g, args->b, args->dy, args->da, stream) : MGPU_OK;
    if (r == MGPU_OK && args->db) r = mgpu__binary_bwd_one(args->kind, 0, g, args->a, args->dy, args->db, stream);
    return r;
}

// out += x: the backward of views and casts
__global__ void mgpu__accumulate_k(const float *x, float *out, int64_t n) { MGPU__FOR(i, n) out[i] += x[i]; }
extern "C" mgpu_result mgpu_cuda_accumulate(const mgpu__accumulate_args *a, void *stream) {
    MGPU__REQUIRE(a && a->n >= 0 && (a->n == 0 || (a->x && a->out)), "x and out must be device pointers and n >= 0");
    if (a->n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__accumulate_k, mgpu__grid(a->n, MGPU__THREADS), MGPU__THREADS, 0, stream, a->x, a->out, a->n);
    MGPU__LAUNCHED("mgpu__accumulate_k");
    return MGPU_OK;
}

/* ======================================================================================
   Fixed-order column sums (linear's bias grad, layer-norm dw/db)
   ====================================================================================== */

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

extern "C" mgpu_result mgpu_cuda_softmax_forward(const mgpu__softmax_args *a, void *stream) {
    MGPU__REQUIRE(a && a->outer >= 0 && a->dim >= 0 && a->inner >= 0, "sizes must be >= 0");
    int64_t n = a->outer * a->dim * a->inner;
    MGPU__REQUIRE(n == 0 || (a->x && a->out), "x and out must be device pointers");
    if (n == 0) return MGPU_OK;
    if (a->inner == 1) return mgpu__softmax_rows(a->x, a->out, a->outer, a->dim, a->log, 0, stream);
    MGPU__LAUNCH(mgpu__softmax_lines_k, mgpu__grid(a->outer * a->inner, MGPU__THREADS), MGPU__THREADS, 0, stream, a->x, a->out, a->outer,
                 a->dim, a->inner, a->log);
    MGPU__LAUNCHED("mgpu__softmax_lines_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_softmax_backward(const mgpu__softmax_args *a, void *stream) {
    MGPU__REQUIRE(a && a->outer >= 0 && a->dim >= 0 && a->inner >= 0, "sizes must be >= 0");
    int64_t n = a->outer * a->dim * a->inner;
    MGPU__REQUIRE(n == 0 || (a->y && a->dy && a->out), "y, dy and out must be device pointers");
    if (n == 0) return MGPU_OK;
    if (a->inner == 1) return mgpu__softmax_bwd_rows(a->y, a->dy, a->out, a->outer, a->dim, a->log, 1.0f, 1, stream);
    MGPU__LAUNCH(mgpu__softmax_bwd_lines_k, mgpu__grid(a->outer * a->inner, MGPU__THREADS), MGPU__THREADS, 0, stream, a->y, a->dy, a->out,
                 a->outer, a->dim, a->inner, a->log);
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

// Sizes and the pointers every class-loss twin of a direction uses. Empty inputs are valid, as on
// the CPU: n == 0 reads no row, and c == 0 (every target then -100) reads no logit; the loss is then
// 0 / 0 = NaN with valid 0, as PyTorch's mean over no counted row.
static bool mgpu__class_loss_ok(const mgpu__class_loss_args *a, bool backward) {
    if (!a || a->n < 0 || a->c < 0) return false;
    if (backward) return a->n == 0 || (a->target && a->dloss && a->valid && (a->c == 0 || a->dx));
    return a->loss && a->valid && (a->n == 0 || (a->target && (a->c == 0 || a->x)));
}

extern "C" mgpu_result mgpu_cuda_cross_entropy_forward(const mgpu__class_loss_args *a, void *stream) {
    MGPU__REQUIRE(mgpu__class_loss_ok(a, false) && (a->n == 0 || a->c == 0 || a->lse), "bad pointers or sizes");
    unsigned grid;
    bool block = a->c > MGPU__ROW_SMALL;
    // phase 1: lse per row (none without classes: the CPU twin leaves lse alone then, and no row is
    // counted); phase 2: the loss over rows in a fixed order
    if (a->n > 0 && a->c > 0) {
        MGPU__REQUIRE(mgpu__row_blocks(a->n, block, &grid), "too many rows");
        if (block) MGPU__LAUNCH(mgpu__lse_rows_k<true>, grid, 256, 0, stream, a->x, a->lse, a->n, a->c);
        else MGPU__LAUNCH(mgpu__lse_rows_k<false>, grid, 256, 0, stream, a->x, a->lse, a->n, a->c);
        MGPU__LAUNCHED("mgpu__lse_rows_k");
    }
    MGPU__LAUNCH(mgpu__class_loss_k, 1, 1024, 0, stream, a->x, a->lse, a->target, a->target_i64, a->n, a->c, a->loss, a->valid);
    MGPU__LAUNCHED("mgpu__class_loss_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_cross_entropy_backward(const mgpu__class_loss_args *a, void *stream) {
    MGPU__REQUIRE(mgpu__class_loss_ok(a, true) && (a->n * a->c == 0 || (a->x && a->lse)), "bad pointers or sizes");
    if (a->n * a->c == 0) return MGPU_OK;   // no logit has a gradient
    MGPU__LAUNCH(mgpu__ce_bwd_k, mgpu__grid(a->n * a->c, MGPU__THREADS), MGPU__THREADS, 0, stream, a->x, a->target, a->target_i64, a->lse,
                 a->dloss, a->valid, a->dx, a->n, a->c);
    MGPU__LAUNCHED("mgpu__ce_bwd_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_nll_forward(const mgpu__class_loss_args *a, void *stream) {
    MGPU__REQUIRE(mgpu__class_loss_ok(a, false), "bad pointers or sizes");
    MGPU__LAUNCH(mgpu__class_loss_k, 1, 1024, 0, stream, a->x, (const float *)NULL, a->target, a->target_i64, a->n, a->c, a->loss,
                 a->valid);
    MGPU__LAUNCHED("mgpu__class_loss_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_nll_backward(const mgpu__class_loss_args *a, void *stream) {
    MGPU__REQUIRE(mgpu__class_loss_ok(a, true), "bad pointers or sizes");
    if (a->n * a->c == 0) return MGPU_OK;   // no log-probability has a gradient
    MGPU__LAUNCH(mgpu__nll_bwd_k, mgpu__grid(a->n, MGPU__THREADS), MGPU__THREADS, 0, stream, a->target, a->target_i64, a->dloss, a->valid,
                 a->dx, a->n, a->c);
    MGPU__LAUNCHED("mgpu__nll_bwd_k");
    return MGPU_OK;
}

/* ======================================================================================
   Two-phase deterministic reductions: MGPU_CUDA_REDUCE_PARTIALS blocks, each over a contiguous
   chunk whose bounds depend on n only, then one block adds the partials in a fixed tree. The
   partials stay in double between the phases, as the CPU twins' block partials do (mgpu__det_sum):
   rounding them to float would lose what the double accumulation kept.
   ====================================================================================== */

enum { MGPU__RED_SUM = 0, MGPU__RED_SQDIFF = 1, MGPU__RED_SQ = 2 };
__global__ void mgpu__reduce_partials_k(int mode, const float *x, const float *y, int64_t n, double *partials) {
    __shared__ double sh[32];
    int64_t chunk = (n + gridDim.x - 1) / gridDim.x, lo = (int64_t)blockIdx.x * chunk, hi = lo + chunk < n ? lo + chunk : n;
    double s = 0;
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        double v = mode == MGPU__RED_SQDIFF ? (double)x[i] - y[i] : (double)x[i];
        s += mode == MGPU__RED_SUM ? v : v * v;
    }
    s = mgpu__group_sum<true, double>(s, sh);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}
// out[0] = scale * sum(partials[0 .. n)) (sqrt of it when root)
__global__ void mgpu__reduce_final_k(const double *partials, int64_t n, float scale, int root, float *out) {
    __shared__ double sh[32];
    double s = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += partials[i];
    s = mgpu__group_sum<true, double>(s, sh);
    if (threadIdx.x == 0) out[0] = root ? (float)sqrt(s * (double)scale) : (float)(s * (double)scale);
}
static mgpu_result mgpu__reduce_partials(int mode, const float *x, const float *y, int64_t n, double *partials, void *stream) {
    MGPU__LAUNCH(mgpu__reduce_partials_k, MGPU_CUDA_REDUCE_PARTIALS, 256, 0, stream, mode, x, y, n, partials);
    MGPU__LAUNCHED("mgpu__reduce_partials_k");
    return MGPU_OK;
}
static mgpu_result mgpu__reduce_final(const double *partials, int64_t n, float scale, int root, float *out, void *stream) {
    MGPU__LAUNCH(mgpu__reduce_final_k, 1, 1024, 0, stream, partials, n, scale, root, out);
    MGPU__LAUNCHED("mgpu__reduce_final_k");
    return MGPU_OK;
}

// out[0] = scale * sum(x); scratch: MGPU_CUDA_REDUCE_PARTIALS doubles
static mgpu_result mgpu__sum_all(const float *x, int64_t n, float scale, float *out, double *scratch, void *stream) {
    mgpu_result r = mgpu__reduce_partials(MGPU__RED_SUM, x, NULL, n, scratch, stream);
    return r != MGPU_OK ? r : mgpu__reduce_final(scratch, MGPU_CUDA_REDUCE_PARTIALS, scale, 0, out, stream);
}

// MSE reduces in one block: no scratch needed, and loss tensors are small.
// n == 0: 0 / 0 = NaN, as the CPU twin and PyTorch's mean over no element.
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
extern "C" mgpu_result mgpu_cuda_mse_forward(const mgpu__mse_args *m, void *stream) {
    MGPU__REQUIRE(m && m->n >= 0 && m->loss && (m->n == 0 || (m->a && m->b)), "a, b, loss must be device pointers and n >= 0");
    MGPU__LAUNCH(mgpu__mse_k, 1, 1024, 0, stream, m->a, m->b, m->n, m->loss);
    MGPU__LAUNCHED("mgpu__mse_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_mse_backward(const mgpu__mse_args *m, void *stream) {
    MGPU__REQUIRE(m && m->n >= 0 && (m->n == 0 || (m->a && m->b && m->dloss)), "a, b, dloss must be device pointers and n >= 0");
    if (m->n == 0 || (!m->da && !m->db)) return MGPU_OK;
    MGPU__LAUNCH(mgpu__mse_bwd_k, mgpu__grid(m->n, MGPU__THREADS), MGPU__THREADS, 0, stream, m->a, m->b, m->dloss, m->da, m->db, m->n);
    MGPU__LAUNCHED("mgpu__mse_bwd_k");
    return MGPU_OK;
}

/* ======================================================================================
   Dropout: the CPU's counter-based RNG, bit for bit (mgpu_random_u32 in mgpu.h)
   ====================================================================================== */

// Element i is column i % row_size of local row j = i / row_size, which is row rank + world * j of
// the combined DDP batch; its counter is that row's place in the combined batch, first + (rank +
// world * j) * row_size + column, written exactly as the CPU twin (mgpu__dropout_range) writes it
// so W shards draw bit for bit the masks one process draws (world 1: first + i).
__device__ uint64_t mgpu__dropout_counter(uint64_t first, int64_t row_size, int64_t rank, int64_t world, int64_t i) {
    int64_t j = i / row_size;
    return first + (uint64_t)((rank + (world - 1) * j) * row_size) + (uint64_t)i;
}
// first_at: a captured graph's step scalar (the RNG position of this replay), else NULL
__global__ void mgpu__dropout_k(uint64_t seed, uint64_t given_first, const uint64_t *first_at, int64_t row_size, int64_t rank, int64_t world,
                                float p, float scale, const float *src, float *dst, int64_t n, int acc) {
    const uint64_t first = first_at ? first_at[0] : given_first;
    MGPU__FOR(i, n) {
        float v = mgpu__random_unit(seed, mgpu__dropout_counter(first, row_size, rank, world, i)) >= p ? src[i] * scale : 0.0f;
        dst[i] = acc ? dst[i] + v : v;
    }
}
__global__ void mgpu__random_u32_k(uint64_t seed, uint64_t first, uint32_t *out, int64_t n) {
    MGPU__FOR(i, n) out[i] = mgpu__random_bits(seed, first + (uint64_t)i);
}
extern "C" mgpu_result mgpu_cuda_dropout(const mgpu__dropout_args *d, void *stream) {
    MGPU__REQUIRE(d && d->p >= 0.0f && d->p <= 1.0f, "p must be in [0, 1]");
    MGPU__REQUIRE(d->n >= 0 && (d->n == 0 || (d->src && d->dst)), "src and dst must be device pointers and n >= 0");
    MGPU__REQUIRE(d->row_size >= 1 && d->world >= 1 && d->rank >= 0 && d->rank < d->world, "need row_size >= 1 and 0 <= rank < world");
    if (d->n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__dropout_k, mgpu__grid(d->n, MGPU__THREADS), MGPU__THREADS, 0, stream, d->seed, d->first, d->first_at, d->row_size,
                 d->rank, d->world, d->p, d->scale, d->src, d->dst, d->n, d->accumulate);
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

static int mgpu__ln_sizes_ok(const mgpu__layer_norm_args *a) { return a && a->R >= 0 && a->C > 0; }
extern "C" mgpu_result mgpu_cuda_layer_norm_forward(const mgpu__layer_norm_args *a, void *stream) {
    MGPU__REQUIRE(mgpu__ln_sizes_ok(a) && a->eps >= 0.0f, "need R >= 0, C > 0, eps >= 0");
    MGPU__REQUIRE(a->R == 0 || (a->x && a->y && a->mean && a->rstd), "x, y, mean, rstd must be device pointers");
    if (a->R == 0) return MGPU_OK;
    unsigned grid;
    bool block = a->C > MGPU__ROW_SMALL;
    MGPU__REQUIRE(mgpu__row_blocks(a->R, block, &grid), "too many rows");
    if (block) MGPU__LAUNCH(mgpu__ln_fwd_k<true>, grid, 256, 0, stream, a->x, a->w, a->b, a->y, a->mean, a->rstd, a->R, a->C, a->eps);
    else MGPU__LAUNCH(mgpu__ln_fwd_k<false>, grid, 256, 0, stream, a->x, a->w, a->b, a->y, a->mean, a->rstd, a->R, a->C, a->eps);
    MGPU__LAUNCHED("mgpu__ln_fwd_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_layer_norm_backward(const mgpu__layer_norm_args *a, void *stream) {
    MGPU__REQUIRE(mgpu__ln_sizes_ok(a), "need R >= 0 and C > 0");
    MGPU__REQUIRE(a->R == 0 || (a->x && a->dy && a->mean && a->rstd), "x, dy, mean, rstd must be device pointers");
    if (a->R == 0) return MGPU_OK;
    if (a->dx) {
        unsigned grid;
        bool block = a->C > MGPU__ROW_SMALL;
        MGPU__REQUIRE(mgpu__row_blocks(a->R, block, &grid), "too many rows");
        if (block) MGPU__LAUNCH(mgpu__ln_bwd_k<true>, grid, 256, 0, stream, a->x, a->w, a->dy, a->mean, a->rstd, a->dx, a->R, a->C);
        else MGPU__LAUNCH(mgpu__ln_bwd_k<false>, grid, 256, 0, stream, a->x, a->w, a->dy, a->mean, a->rstd, a->dx, a->R, a->C);
        MGPU__LAUNCHED("mgpu__ln_bwd_k");
    }
    if (a->dw || a->db) return mgpu__colsum(a->dy, a->dw ? a->x : NULL, a->mean, a->rstd, a->R, a->C, a->dw, a->db, stream);
    return MGPU_OK;
}

// Element q of channel c in x (N, C, S): the (n, s) pairs in n-major order.
__device__ int64_t mgpu__bn_at(int64_t q, int64_t c, int64_t C, int64_t S) { return (q / S) * C * S + c * S + q % S; }

// Block c: sp = sum p, spq = sum p * (q - center[c]) over channel c of (N, C, S), in double by a fixed
// tree; q NULL: sp only. Then, each where given: sums[c] = sp, sums[C + c] = spq (and sums[2C] = N * S
// when count), dw[c] += spq * rstd[c], db[c] += sp.
__global__ void mgpu__channel_sums_k(const float *p, const float *q, const float *center, int64_t N, int64_t C, int64_t S, double *sums,
                                     int count, float *dw, const float *rstd, float *db) {
    __shared__ double sh[32];
    int64_t c = blockIdx.x, cnt = N * S;
    float ctr = center ? center[c] : 0.0f;
    double sp = 0, spq = 0;
    for (int64_t i = threadIdx.x; i < cnt; i += blockDim.x) {
        int64_t at = mgpu__bn_at(i, c, C, S);
        sp += p[at];
        if (q) spq += (double)p[at] * (double)(q[at] - ctr);
    }
    sp = mgpu__group_sum<true, double>(sp, sh);
    spq = mgpu__group_sum<true, double>(spq, sh);
    if (threadIdx.x != 0) return;
    if (sums) { sums[c] = sp; sums[C + c] = spq; }
    if (sums && count && c == 0) sums[2 * C] = (double)cnt;
    if (dw) dw[c] += (float)(spq * rstd[c]);
    if (db) db[c] += (float)sp;
}
static mgpu_result mgpu__channel_sums(const float *p, const float *q, const float *center, int64_t N, int64_t C, int64_t S, double *sums,
                                      int count, float *dw, const float *rstd, float *db, void *stream) {
    MGPU__LAUNCH(mgpu__channel_sums_k, (unsigned)C, 256, 0, stream, p, q, center, N, C, S, sums, count, dw, rstd, db);
    MGPU__LAUNCHED("mgpu__channel_sums_k");
    return MGPU_OK;
}

// Block c: the channel's statistics (thread 0, the CPU's formulas), then its affine map.
__global__ void mgpu__bn_fwd_k(mgpu__batch_norm_args a) {
    __shared__ float m_sc[2];
    int64_t c = blockIdx.x, C = a.C;
    if (threadIdx.x == 0) {
        float m, rs;
        if (a.training) {
            double count = a.sums[2 * C], mu = a.sums[c] / count, var = a.sums[C + c] / count - mu * mu;
            if (var < 0) var = 0;
            m = (float)mu; rs = (float)(1.0 / sqrt(var + (double)a.eps));
            if (a.running_mean) a.running_mean[c] = (float)((1.0 - a.momentum) * a.running_mean[c] + (double)a.momentum * mu);
            if (a.running_var) a.running_var[c] = (float)((1.0 - a.momentum) * a.running_var[c] + (double)a.momentum * var * count / (count - 1.0));
        } else {
            m = a.running_mean[c]; rs = (float)(1.0 / sqrt((double)a.running_var[c] + (double)a.eps));
        }
        a.mean[c] = m; a.rstd[c] = rs; a.scale[c] = a.w ? rs * a.w[c] : rs;
        m_sc[0] = m; m_sc[1] = a.scale[c];
    }
    __syncthreads();
    float m = m_sc[0], sc = m_sc[1], sh = a.b ? a.b[c] : 0.0f;
    for (int64_t i = threadIdx.x; i < a.N * a.S; i += blockDim.x) {
        int64_t at = mgpu__bn_at(i, c, C, a.S);
        a.y[at] = (a.x[at] - m) * sc + sh;
    }
}
// Block c: dx += scale * (dy - k1 - (x - mean) * k2), the coefficients from the (reduced) sums.
__global__ void mgpu__bn_bwd_k(mgpu__batch_norm_args a) {
    int64_t c = blockIdx.x, C = a.C;
    float m = a.mean[c], sc = a.scale[c], k1 = 0.0f, k2 = 0.0f;
    if (a.training) {
        double count = *a.count;
        k1 = (float)(a.sums[c] / count);
        k2 = (float)(a.sums[C + c] / count * a.rstd[c] * a.rstd[c]);
    }
    for (int64_t i = threadIdx.x; i < a.N * a.S; i += blockDim.x) {
        int64_t at = mgpu__bn_at(i, c, C, a.S);
        a.dx[at] += sc * (a.dy[at] - k1 - (a.x[at] - m) * k2);
    }
}

static int mgpu__bn_sizes_ok(const mgpu__batch_norm_args *a) {
    return a && a->N >= 0 && a->C > 0 && a->S >= 0 && a->C <= 2147483647LL;
}
extern "C" mgpu_result mgpu_cuda_batch_norm_stats(const mgpu__batch_norm_args *a, void *stream) {
    MGPU__REQUIRE(mgpu__bn_sizes_ok(a), "need N, S >= 0 and 0 < C < 2^31");
    MGPU__REQUIRE(a->x && a->sums, "x and sums must be device pointers");
    return mgpu__channel_sums(a->x, a->x, NULL, a->N, a->C, a->S, a->sums, 1, NULL, NULL, NULL, stream);
}
extern "C" mgpu_result mgpu_cuda_batch_norm_forward(const mgpu__batch_norm_args *a, void *stream) {
    MGPU__REQUIRE(mgpu__bn_sizes_ok(a) && a->eps >= 0.0f, "need N, S >= 0, 0 < C < 2^31 and eps >= 0");
    MGPU__REQUIRE((a->running_mean == NULL) == (a->running_var == NULL), "running_mean and running_var go together");
    MGPU__REQUIRE(a->training ? a->sums != NULL : a->running_mean != NULL, "training needs the sums, eval the running statistics");
    MGPU__REQUIRE(a->x && a->y && a->mean && a->rstd && a->scale, "x, y, mean, rstd, scale must be device pointers");
    MGPU__LAUNCH(mgpu__bn_fwd_k, (unsigned)a->C, 256, 0, stream, *a);
    MGPU__LAUNCHED("mgpu__bn_fwd_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_batch_norm_grad_sums(const mgpu__batch_norm_args *a, void *stream) {
    MGPU__REQUIRE(mgpu__bn_sizes_ok(a), "need N, S >= 0 and 0 < C < 2^31");
    MGPU__REQUIRE(a->x && a->dy && a->mean && a->rstd && a->sums, "x, dy, mean, rstd, sums must be device pointers");
    return mgpu__channel_sums(a->dy, a->x, a->mean, a->N, a->C, a->S, a->sums, 0, a->dw, a->rstd, a->db, stream);
}
extern "C" mgpu_result mgpu_cuda_batch_norm_backward(const mgpu__batch_norm_args *a, void *stream) {
    MGPU__REQUIRE(mgpu__bn_sizes_ok(a), "need N, S >= 0 and 0 < C < 2^31");
    MGPU__REQUIRE(a->x && a->dy && a->mean && a->rstd && a->scale && a->dx, "x, dy, mean, rstd, scale, dx must be device pointers");
    MGPU__REQUIRE(!a->training || (a->sums && a->count), "training needs the reduced sums and the count");
    MGPU__LAUNCH(mgpu__bn_bwd_k, (unsigned)a->C, 256, 0, stream, *a);
    MGPU__LAUNCHED("mgpu__bn_bwd_k");
    return MGPU_OK;
}

/* ======================================================================================
   Embedding
   ====================================================================================== */

// An id outside [0, V) reads nothing: its row is zeros (the host checks ids it can see; ids made on
// the device reach the kernel unchecked and must never send it out of bounds).
__global__ void mgpu__emb_fwd_k(const float *w, const void *idx, int i64, float *out, int64_t n, int64_t V, int64_t D) {
    MGPU__FOR(q, n * D) {
        int64_t row = mgpu__target_at(idx, i64, q / D);
        out[q] = (row >= 0 && row < V) ? w[row * D + q % D] : 0.0f;
    }
}

// The backward, deterministic without float atomics: sort the (row, index) pairs, then the first
// thread of each row's run adds that row's dy rows in index order, column by column. That is the
// CPU twin's order exactly (dweight[row] += dy[i] for i ascending), so the twins agree bit for bit.
// Work: O(n log^2 n) for the sort plus O(n * D) for the sums.
//
// Key of index i: row << 32 | i (rows and indices below 2^31), so the keys are distinct and any
// correct sort gives the same order; an out-of-range id, and the padding up to a power of two,
// get the largest key and sort to the end, where no sum reads them.
#define MGPU__EMB_NO_KEY 0xffffffffffffffffULL
__global__ void mgpu__emb_keys_k(const void *idx, int i64, int64_t n, int64_t V, int64_t m, unsigned long long *keys) {
    MGPU__FOR(i, m) {
        int64_t row = i < n ? mgpu__target_at(idx, i64, i) : -1;
        keys[i] = (row >= 0 && row < V) ? ((unsigned long long)row << 32) | (unsigned long long)i : MGPU__EMB_NO_KEY;
    }
}
// One compare-exchange step (k, j) of a bitonic sort of m = 2^p keys, ascending.
__global__ void mgpu__bitonic_step_k(unsigned long long *keys, int64_t m, int64_t k, int64_t j) {
    MGPU__FOR(i, m) {
        int64_t l = i ^ j;
        if (l <= i) continue;   // each pair once, by its lower element
        unsigned long long a = keys[i], b = keys[l];
        bool up = (i & k) == 0;
        if ((a > b) == up) { keys[i] = b; keys[l] = a; }
    }
}
// Thread (s, d): when sorted key s starts a row's run, dw[row, d] += dy[i, d] over the run's indices i.
__global__ void mgpu__emb_bwd_k(const unsigned long long *keys, const float *dy, float *dw, int64_t n, int64_t D) {
    MGPU__FOR(q, n * D) {
        int64_t s = q / D, d = q % D;
        unsigned long long key = keys[s], row = key >> 32;
        if (key == MGPU__EMB_NO_KEY || (s > 0 && (keys[s - 1] >> 32) == row)) continue;
        float *g = dw + (int64_t)row * D + d;
        float acc = *g;
        for (int64_t t = s; t < n && keys[t] != MGPU__EMB_NO_KEY && (keys[t] >> 32) == row; t++)
            acc += dy[(int64_t)(keys[t] & 0xffffffffULL) * D + d];
        *g = acc;
    }
}
static int mgpu__emb_sizes_ok(const mgpu__embedding_args *a) { return a && a->n >= 0 && a->V > 0 && a->D > 0; }
extern "C" mgpu_result mgpu_cuda_embedding_forward(const mgpu__embedding_args *a, void *stream) {
    MGPU__REQUIRE(mgpu__emb_sizes_ok(a) && (a->n == 0 || (a->weight && a->idx && a->out)), "bad pointers or sizes");
    if (a->n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__emb_fwd_k, mgpu__grid(a->n * a->D, MGPU__THREADS), MGPU__THREADS, 0, stream, a->weight, a->idx, a->idx_i64, a->out,
                 a->n, a->V, a->D);
    MGPU__LAUNCHED("mgpu__emb_fwd_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_embedding_backward(const mgpu__embedding_args *a, void *stream) {
    MGPU__REQUIRE(mgpu__emb_sizes_ok(a) && (a->n == 0 || (a->idx && a->dy && a->dweight && a->scratch)),
                  "idx, dy, dweight and scratch (MGPU__EMB_SCRATCH_BYTES(n)) must be device pointers");
    MGPU__REQUIRE(a->n < 2147483648LL && a->V < 2147483648LL, "the sort keys need n and V below 2^31");
    if (a->n == 0) return MGPU_OK;
    unsigned long long *keys = (unsigned long long *)a->scratch;
    int64_t m = mgpu__pow2_at_least(a->n);
    unsigned grid = mgpu__grid(m, MGPU__THREADS);
    MGPU__LAUNCH(mgpu__emb_keys_k, grid, MGPU__THREADS, 0, stream, a->idx, a->idx_i64, a->n, a->V, m, keys);
    MGPU__LAUNCHED("mgpu__emb_keys_k");
    for (int64_t k = 2; k <= m; k <<= 1)
        for (int64_t j = k >> 1; j > 0; j >>= 1) {
            MGPU__LAUNCH(mgpu__bitonic_step_k, grid, MGPU__THREADS, 0, stream, keys, m, k, j);
            MGPU__LAUNCHED("mgpu__bitonic_step_k");
        }
    MGPU__LAUNCH(mgpu__emb_bwd_k, mgpu__grid(a->n * a->D, MGPU__THREADS), MGPU__THREADS, 0, stream, (const unsigned long long *)keys, a->dy,
                 a->dweight, a->n, a->D);
    MGPU__LAUNCHED("mgpu__emb_bwd_k");
    return MGPU_OK;
}

/* ======================================================================================
   im2col / col2im and pooling, x (N, C, H, W)
   ====================================================================================== */

static int mgpu__geom_ok(const mgpu__conv_geom *g) {
    return g && g->n >= 0 && g->c > 0 && g->h > 0 && g->w > 0 && g->oh > 0 && g->ow > 0 && g->ks > 0 && g->stride > 0 &&
           g->pad >= 0 && (g->oh - 1) * g->stride - g->pad < g->h && (g->ow - 1) * g->stride - g->pad < g->w;
}

// cols (N, C*KS*KS, OH*OW) of x (N, C, H, W)
__global__ void mgpu__im2col_k(mgpu__conv_geom g, const float *x, float *cols) {
    int64_t k = g.ks, P = g.oh * g.ow, ckk = g.c * k * k;
    MGPU__FOR(q, g.n * ckk * P) {
        int64_t p = q % P, r = (q / P) % ckk, n = q / (P * ckk);
        int64_t c = r / (k * k), ky = (r / k) % k, kx = r % k;
        int64_t iy = (p / g.ow) * g.stride - g.pad + ky, ix = (p % g.ow) * g.stride - g.pad + kx;
        cols[q] = (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) ? x[((n * g.c + c) * g.h + iy) * g.w + ix] : 0.0f;
    }
}
// Output positions whose window covers input coordinate i along one axis: [lo, hi).
__device__ void mgpu__covering(int64_t i, int64_t pad, int64_t k, int64_t s, int64_t out, int64_t *lo, int64_t *hi) {
    int64_t a = i + pad - k + 1;   // first window start that still covers i
    *lo = a <= 0 ? 0 : (a + s - 1) / s;
    *hi = (i + pad) / s + 1;
    if (*hi > out) *hi = out;
}
// dx += col2im(dcols): gathered per input element, no atomics
__global__ void mgpu__col2im_k(mgpu__conv_geom g, const float *dcols, float *dx) {
    int64_t k = g.ks, P = g.oh * g.ow, ckk = g.c * k * k;
    MGPU__FOR(q, g.n * g.c * g.h * g.w) {
        int64_t ix = q % g.w, iy = (q / g.w) % g.h, c = (q / (g.w * g.h)) % g.c, n = q / (g.w * g.h * g.c);
        int64_t y0, y1, x0, x1;
        mgpu__covering(iy, g.pad, k, g.stride, g.oh, &y0, &y1);
        mgpu__covering(ix, g.pad, k, g.stride, g.ow, &x0, &x1);
        float acc = 0.0f;
        for (int64_t oy = y0; oy < y1; oy++)
            for (int64_t ox = x0; ox < x1; ox++) {
                int64_t ky = iy + g.pad - oy * g.stride, kx = ix + g.pad - ox * g.stride;
                acc += dcols[(n * ckk + (c * k + ky) * k + kx) * P + oy * g.ow + ox];
            }
        dx[q] += acc;
    }
}
__global__ void mgpu__pool_fwd_k(mgpu__conv_geom g, int is_max, const float *x, float *y, int32_t *argmax) {
    float inv = 1.0f / (float)(g.ks * g.ks);
    MGPU__FOR(q, g.n * g.c * g.oh * g.ow) {
        int64_t ox = q % g.ow, oy = (q / g.ow) % g.oh, plane = q / (g.ow * g.oh);
        const float *xp = x + plane * g.h * g.w;
        int64_t ys = oy * g.stride - g.pad, xs = ox * g.stride - g.pad;
        int64_t y0 = ys > 0 ? ys : 0, y1 = ys + g.ks < g.h ? ys + g.ks : g.h;
        int64_t x0 = xs > 0 ? xs : 0, x1 = xs + g.ks < g.w ? xs + g.ks : g.w;
        float acc = is_max ? -INFINITY : 0.0f;
        int64_t best = y0 < y1 && x0 < x1 ? y0 * g.w + x0 : -1;   // an empty window (all padding): -inf, no gradient
        for (int64_t yy = y0; yy < y1; yy++)
            for (int64_t xx = x0; xx < x1; xx++) {
                float v = xp[yy * g.w + xx];
                if (!is_max) acc += v;
                else if (v > acc || v != v) { acc = v; best = yy * g.w + xx; }   // the last NaN wins, as on the CPU and in PyTorch
            }
        y[q] = is_max ? acc : acc * inv;
        if (argmax) argmax[q] = (int32_t)best;
    }
}
__global__ void mgpu__pool_bwd_k(mgpu__conv_geom g, int is_max, const int32_t *argmax, const float *dy, float *dx) {
    float inv = 1.0f / (float)(g.ks * g.ks);
    MGPU__FOR(q, g.n * g.c * g.h * g.w) {
        int64_t ix = q % g.w, iy = (q / g.w) % g.h, plane = q / (g.w * g.h);
        int64_t y0, y1, x0, x1;
        mgpu__covering(iy, g.pad, g.ks, g.stride, g.oh, &y0, &y1);
        mgpu__covering(ix, g.pad, g.ks, g.stride, g.ow, &x0, &x1);
        const float *dyp = dy + plane * g.oh * g.ow;
        const int32_t *ap = is_max ? argmax + plane * g.oh * g.ow : NULL;
        float acc = 0.0f;
        for (int64_t oy = y0; oy < y1; oy++)
            for (int64_t ox = x0; ox < x1; ox++) {
                int64_t o = oy * g.ow + ox;
                if (!is_max) acc += dyp[o] * inv;
                else if (ap[o] == iy * g.w + ix) acc += dyp[o];
            }
        dx[q] += acc;
    }
}

static mgpu_result mgpu__im2col(const mgpu__conv_geom *g, const float *x, float *cols, void *stream) {
    MGPU__LAUNCH(mgpu__im2col_k, mgpu__grid(g->n * g->ckk * g->p, MGPU__THREADS), MGPU__THREADS, 0, stream, *g, x, cols);
    MGPU__LAUNCHED("mgpu__im2col_k");
    return MGPU_OK;
}
static mgpu_result mgpu__col2im(const mgpu__conv_geom *g, const float *dcols, float *dx, void *stream) {
    MGPU__LAUNCH(mgpu__col2im_k, mgpu__grid(g->n * g->c * g->h * g->w, MGPU__THREADS), MGPU__THREADS, 0, stream, *g, dcols, dx);
    MGPU__LAUNCHED("mgpu__col2im_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_pool2d_forward(const mgpu__pool2d_args *a, void *stream) {
    MGPU__REQUIRE(a && mgpu__geom_ok(a->g) && a->g->h * a->g->w <= 2147483647LL, "inconsistent pooling geometry");
    const mgpu__conv_geom *g = a->g;
    MGPU__REQUIRE(g->n == 0 || (a->x && a->y), "x and y must be device pointers");
    if (g->n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__pool_fwd_k, mgpu__grid(g->n * g->c * g->oh * g->ow, MGPU__THREADS), MGPU__THREADS, 0, stream, *g, a->is_max, a->x,
                 a->y, a->argmax);
    MGPU__LAUNCHED("mgpu__pool_fwd_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_pool2d_backward(const mgpu__pool2d_args *a, void *stream) {
    MGPU__REQUIRE(a && mgpu__geom_ok(a->g), "inconsistent pooling geometry");
    const mgpu__conv_geom *g = a->g;
    MGPU__REQUIRE(g->n == 0 || (a->dy && a->dx && (!a->is_max || a->argmax)), "dy, dx (and argmax for max pooling) must be device pointers");
    if (g->n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__pool_bwd_k, mgpu__grid(g->n * g->c * g->h * g->w, MGPU__THREADS), MGPU__THREADS, 0, stream, *g, a->is_max, a->argmax,
                 a->dy, a->dx);
    MGPU__LAUNCHED("mgpu__pool_bwd_k");
    return MGPU_OK;
}

/* ======================================================================================
   Copies: transpose, row blocks (concat / narrow)
   ====================================================================================== */

// The copies move elements of 1, 2, 4 or 8 bytes (U8; F16/BF16; F32/I32; I64) as unsigned words of
// that width, bits untouched. Accumulation (dst += src) is the backward of the copy, so it is F32
// only, as on the CPU, where the twins read accumulating copies as floats.
template <typename T> struct mgpu__copy_elem {
    __device__ static void put(T *d, T v, int) { *d = v; }
};
template <> struct mgpu__copy_elem<uint32_t> {   // the only width that can accumulate: F32 bits
    __device__ static void put(uint32_t *d, uint32_t v, int acc) {
        if (acc) { float f = __uint_as_float(*d) + __uint_as_float(v); *d = __float_as_uint(f); }
        else *d = v;
    }
};
static mgpu_result mgpu__copy_esize_ok(const char *fn, size_t esize, int accumulate) {
    if (esize != 1 && esize != 2 && esize != 4 && esize != 8) return mgpu__cu_invalid(fn, "esize must be 1, 2, 4 or 8 bytes");
    if (accumulate && esize != sizeof(float)) return mgpu__cu_invalid(fn, "accumulate adds F32 elements: esize must be 4");
    return MGPU_OK;
}

template <typename T>
__global__ void mgpu__transpose_k(const T *x, T *y, int64_t outer, int64_t d0, int64_t mid, int64_t d1, int64_t inner, int acc) {
    MGPU__FOR(q, outer * d1 * mid * d0 * inner) {
        // q indexes y (outer, d1, mid, d0, inner)
        int64_t i = q % inner, r = q / inner;
        int64_t a0 = r % d0; r /= d0;
        int64_t m = r % mid; r /= mid;
        int64_t a1 = r % d1, o = r / d1;
        mgpu__copy_elem<T>::put(y + q, x[(((o * d0 + a0) * mid + m) * d1 + a1) * inner + i], acc);
    }
}
template <typename T> static mgpu_result mgpu__transpose_as(const mgpu__transpose_args *a, int64_t n, void *stream) {
    MGPU__LAUNCH(mgpu__transpose_k<T>, mgpu__grid(n, MGPU__THREADS), MGPU__THREADS, 0, stream, (const T *)a->x, (T *)a->out, a->outer,
                 a->d0, a->mid, a->d1, a->inner, a->accumulate);
    MGPU__LAUNCHED("mgpu__transpose_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_transpose(const mgpu__transpose_args *a, void *stream) {
    MGPU__REQUIRE(a && a->outer >= 0 && a->d0 >= 0 && a->mid >= 0 && a->d1 >= 0 && a->inner >= 0, "sizes must be >= 0");
    mgpu_result r = mgpu__copy_esize_ok(__func__, a->esize, a->accumulate);
    if (r != MGPU_OK) return r;
    int64_t n = a->outer * a->d0 * a->mid * a->d1 * a->inner;
    MGPU__REQUIRE(n == 0 || (a->x && a->out), "x and out must be device pointers");
    if (n == 0) return MGPU_OK;
    switch (a->esize) {
    case 1: return mgpu__transpose_as<uint8_t>(a, n, stream);
    case 2: return mgpu__transpose_as<uint16_t>(a, n, stream);
    case 4: return mgpu__transpose_as<uint32_t>(a, n, stream);
    default: return mgpu__transpose_as<uint64_t>(a, n, stream);
    }
}
template <typename T>
__global__ void mgpu__copy_rows_k(const T *src, int64_t src_pitch, T *dst, int64_t dst_pitch, int64_t rows, int64_t len, int acc) {
    MGPU__FOR(q, rows * len) {
        int64_t r = q / len, j = q % len;
        mgpu__copy_elem<T>::put(dst + r * dst_pitch + j, src[r * src_pitch + j], acc);
    }
}
template <typename T> static mgpu_result mgpu__copy_rows_as(const mgpu__copy_rows_args *a, void *stream) {
    MGPU__LAUNCH(mgpu__copy_rows_k<T>, mgpu__grid(a->rows * a->len, MGPU__THREADS), MGPU__THREADS, 0, stream, (const T *)a->src, a->src_pitch,
                 (T *)a->dst, a->dst_pitch, a->rows, a->len, a->accumulate);
    MGPU__LAUNCHED("mgpu__copy_rows_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_copy_rows(const mgpu__copy_rows_args *a, void *stream) {
    MGPU__REQUIRE(a && a->rows >= 0 && a->len >= 0 && a->len <= a->src_pitch && a->len <= a->dst_pitch, "a row block reaches outside its row");
    mgpu_result r = mgpu__copy_esize_ok(__func__, a->esize, a->accumulate);
    if (r != MGPU_OK) return r;
    MGPU__REQUIRE(a->rows * a->len == 0 || (a->src && a->dst), "src and dst must be device pointers");
    if (a->rows * a->len == 0) return MGPU_OK;
    switch (a->esize) {
    case 1: return mgpu__copy_rows_as<uint8_t>(a, stream);
    case 2: return mgpu__copy_rows_as<uint16_t>(a, stream);
    case 4: return mgpu__copy_rows_as<uint32_t>(a, stream);
    default: return mgpu__copy_rows_as<uint64_t>(a, stream);
    }
}

template <typename T>
__global__ void mgpu__gather_rows_k(const T *src, const int64_t *idx, T *dst, int64_t rows, int64_t len, int64_t n_src) {
    MGPU__FOR(q, rows * len) {
        int64_t r = q / len, j = q % len, id = idx[r];
        dst[q] = id >= 0 && id < n_src ? src[id * len + j] : T(0);
    }
}
template <typename T> static mgpu_result mgpu__gather_rows_as(const mgpu__gather_rows_args *a, void *stream) {
    MGPU__LAUNCH(mgpu__gather_rows_k<T>, mgpu__grid(a->rows * a->len, MGPU__THREADS), MGPU__THREADS, 0, stream, (const T *)a->src, a->idx,
                 (T *)a->dst, a->rows, a->len, a->n_src);
    MGPU__LAUNCHED("mgpu__gather_rows_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_gather_rows(const mgpu__gather_rows_args *a, void *stream) {
    MGPU__REQUIRE(a && a->rows >= 0 && a->len >= 0 && a->n_src >= 0, "rows, len and n_src must be >= 0");
    mgpu_result r = mgpu__copy_esize_ok(__func__, a->esize, 0);
    if (r != MGPU_OK) return r;
    MGPU__REQUIRE(a->rows * a->len == 0 || (a->src && a->dst && a->idx), "src, dst and idx must be device pointers");
    if (a->rows * a->len == 0) return MGPU_OK;
    switch (a->esize) {
    case 1: return mgpu__gather_rows_as<uint8_t>(a, stream);
    case 2: return mgpu__gather_rows_as<uint16_t>(a, stream);
    case 4: return mgpu__gather_rows_as<uint32_t>(a, stream);
    default: return mgpu__gather_rows_as<uint64_t>(a, stream);
    }
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
__global__ void mgpu__max_dim_k(const float *x, float *y, int64_t *argmax, int64_t outer, int64_t D, int64_t inner) {
    MGPU__FOR(q, outer * inner) {
        const float *xp = x + (q / inner) * D * inner + q % inner;
        float m = xp[0];
        int64_t best = 0;
        for (int64_t d = 1; d < D && m == m; d++)
            if (xp[d * inner] > m || xp[d * inner] != xp[d * inner]) { m = xp[d * inner]; best = d; }
        y[q] = m;
        argmax[q] = best;
    }
}
__global__ void mgpu__max_dim_bwd_k(const int64_t *argmax, const float *dy, float *dx, int64_t outer, int64_t D, int64_t inner) {
    MGPU__FOR(q, outer * inner) dx[(q / inner) * D * inner + argmax[q] * inner + q % inner] += dy[q];
}

// A single output (outer = inner = 1) goes through the two-phase tree; otherwise a thread per output.
extern "C" mgpu_result mgpu_cuda_sum_forward(const mgpu__sum_args *a, void *stream) {
    MGPU__REQUIRE(a && a->outer >= 0 && a->dim >= 0 && a->inner >= 0, "sizes must be >= 0");
    int64_t n_out = a->outer * a->inner;
    MGPU__REQUIRE(n_out == 0 || (a->out && (a->dim == 0 || a->x)), "x and out must be device pointers");
    if (n_out == 0) return MGPU_OK;
    if (n_out == 1) {
        MGPU__REQUIRE(a->scratch, "a single-output sum needs scratch (MGPU_CUDA_REDUCE_PARTIALS doubles)");
        return mgpu__sum_all(a->x, a->dim, a->scale, a->out, a->scratch, stream);
    }
    MGPU__LAUNCH(mgpu__sum_dim_k, mgpu__grid(n_out, MGPU__THREADS), MGPU__THREADS, 0, stream, a->x, a->out, a->outer, a->dim, a->inner, a->scale);
    MGPU__LAUNCHED("mgpu__sum_dim_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_sum_backward(const mgpu__sum_args *a, void *stream) {
    MGPU__REQUIRE(a && a->outer >= 0 && a->dim >= 0 && a->inner >= 0, "sizes must be >= 0");
    int64_t n = a->outer * a->dim * a->inner;
    MGPU__REQUIRE(n == 0 || (a->dy && a->out), "dy and out must be device pointers");
    if (n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__sum_dim_bwd_k, mgpu__grid(n, MGPU__THREADS), MGPU__THREADS, 0, stream, a->dy, a->out, a->outer, a->dim, a->inner,
                 a->scale);
    MGPU__LAUNCHED("mgpu__sum_dim_bwd_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_max_dim_forward(const mgpu__max_dim_args *a, void *stream) {
    MGPU__REQUIRE(a && a->outer >= 0 && a->dim > 0 && a->inner >= 0, "need dim >= 1 and sizes >= 0");
    int64_t n_out = a->outer * a->inner;
    MGPU__REQUIRE(n_out == 0 || (a->x && a->out && a->argmax), "x, out and argmax must be device pointers");
    if (n_out == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__max_dim_k, mgpu__grid(n_out, MGPU__THREADS), MGPU__THREADS, 0, stream, a->x, a->out, a->argmax, a->outer, a->dim,
                 a->inner);
    MGPU__LAUNCHED("mgpu__max_dim_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_max_dim_backward(const mgpu__max_dim_args *a, void *stream) {
    MGPU__REQUIRE(a && a->outer >= 0 && a->dim > 0 && a->inner >= 0, "need dim >= 1 and sizes >= 0");
    int64_t n_out = a->outer * a->inner;
    MGPU__REQUIRE(n_out == 0 || (a->argmax && a->dy && a->out), "argmax, dy and out must be device pointers");
    if (n_out == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__max_dim_bwd_k, mgpu__grid(n_out, MGPU__THREADS), MGPU__THREADS, 0, stream, (const int64_t *)a->argmax, a->dy, a->out,
                 a->outer, a->dim, a->inner);
    MGPU__LAUNCHED("mgpu__max_dim_bwd_k");
    return MGPU_OK;
}

/* ======================================================================================
   Tensor-level fills, copies and casts; half-precision rounding (round to nearest even, as
   mgpu_f32_to_f16 / mgpu_f32_to_bf16)
   ====================================================================================== */

static int mgpu__dtype_bytes(int dt) {
    switch (dt) {
    case MGPU_F16: case MGPU_BF16: return 2;
    case MGPU_I64: return 8;
    case MGPU_U8: return 1;
    default: return 4;   // F32, I32
    }
}
static int mgpu__dtype_ok(int dt) { return dt >= 0 && dt < MGPU_DTYPE_COUNT; }

// The bytes of `value` in dtype dt, as the CPU twin stores it (a C cast; half formats through F32).
template <typename T> static uint64_t mgpu__bits_of(T v) { uint64_t b = 0; memcpy(&b, &v, sizeof v); return b; }
static uint64_t mgpu__fill_bits(int dt, double value) {
    if (value == 0.0) return 0;   // as the CPU: zero fills are zero bytes, -0.0 included
    switch (dt) {
    case MGPU_F16: return mgpu__bits_of(__float2half_rn((float)value));
    case MGPU_BF16: return mgpu__bits_of(__float2bfloat16_rn((float)value));
    case MGPU_I32: return mgpu__bits_of((int32_t)value);
    case MGPU_I64: return mgpu__bits_of((int64_t)value);
    case MGPU_U8: return mgpu__bits_of((uint8_t)value);
    default: return mgpu__bits_of((float)value);
    }
}
template <typename T> __global__ void mgpu__fill_k(T *x, int64_t n, T v) { MGPU__FOR(i, n) x[i] = v; }
// n elements of `bytes` bytes each set to the low bytes of bits
static mgpu_result mgpu__fill_raw(void *x, int64_t n, int bytes, uint64_t bits, void *stream) {
    if (n == 0) return MGPU_OK;
    unsigned grid = mgpu__grid(n, MGPU__THREADS);
    switch (bytes) {
    case 1: MGPU__LAUNCH(mgpu__fill_k<uint8_t>, grid, MGPU__THREADS, 0, stream, (uint8_t *)x, n, (uint8_t)bits); break;
    case 2: MGPU__LAUNCH(mgpu__fill_k<uint16_t>, grid, MGPU__THREADS, 0, stream, (uint16_t *)x, n, (uint16_t)bits); break;
    case 8: MGPU__LAUNCH(mgpu__fill_k<uint64_t>, grid, MGPU__THREADS, 0, stream, (uint64_t *)x, n, bits); break;
    default: MGPU__LAUNCH(mgpu__fill_k<uint32_t>, grid, MGPU__THREADS, 0, stream, (uint32_t *)x, n, (uint32_t)bits); break;
    }
    MGPU__LAUNCHED("mgpu__fill_k");
    return MGPU_OK;
}
// A captured graph's step scalars: the words travel as the kernel's argument, copied at launch.
__global__ void mgpu__set_step_words_k(uint64_t *dst, mgpu__step_words words, int n) {
    if ((int)threadIdx.x < n) dst[threadIdx.x] = words.w[threadIdx.x];
}
extern "C" mgpu_result mgpu_cuda_set_step_words(uint64_t *dst, const mgpu__step_words *words, int n, void *stream) {
    MGPU__REQUIRE(dst && words && n >= 0 && n <= MGPU__STEP_SLOTS, "dst must be a device pointer, words given, 0 <= n <= MGPU__STEP_SLOTS");
    if (n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__set_step_words_k, 1, MGPU__STEP_SLOTS, 0, stream, dst, *words, n);
    MGPU__LAUNCHED("mgpu__set_step_words_k");
    return MGPU_OK;
}
extern "C" mgpu_result mgpu_cuda_fill(const mgpu__fill_args *a, void *stream) {
    MGPU__REQUIRE(a && mgpu__dtype_ok(a->dtype), "dtype is not an mgpu_dtype");
    MGPU__REQUIRE(a->n >= 0 && (a->n == 0 || a->dst), "dst must be a device pointer and n >= 0");
    return mgpu__fill_raw(a->dst, a->n, mgpu__dtype_bytes(a->dtype), mgpu__fill_bits(a->dtype, a->value), stream);
}

extern "C" mgpu_result mgpu_cuda_copy(const mgpu__copy_args *a, void *stream) {
    MGPU__REQUIRE(a && (a->bytes == 0 || (a->src && a->dst)), "src and dst must be device pointers");
    if (a->bytes == 0) return MGPU_OK;
    MGPU__CU(cudaMemcpyAsync(a->dst, a->src, a->bytes, cudaMemcpyDeviceToDevice, MGPU__STREAM(stream)));
    return MGPU_OK;
}

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
extern "C" mgpu_result mgpu_cuda_cast(const mgpu__cast_args *a, void *stream) {
    MGPU__REQUIRE(a && mgpu__float_dtype(a->src_dtype) && mgpu__float_dtype(a->dst_dtype), "casts are between F32, F16 and BF16");
    MGPU__REQUIRE(a->n >= 0 && (a->n == 0 || (a->src && a->dst)), "src and dst must be device pointers and n >= 0");
    if (a->n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__cast_k, mgpu__grid(a->n, MGPU__THREADS), MGPU__THREADS, 0, stream, a->src, (int)a->src_dtype, a->dst,
                 (int)a->dst_dtype, a->n);
    MGPU__LAUNCHED("mgpu__cast_k");
    return MGPU_OK;
}

// The cast kernel's conversions, to the half format and back in one go.
__global__ void mgpu__round_half_k(const float *src, float *dst, int64_t n, int half, float scale, int acc) {
    MGPU__FOR(i, n) {
        float r = half == MGPU_BF16 ? __bfloat162float(__float2bfloat16_rn(src[i] * scale)) : __half2float(__float2half_rn(src[i] * scale));
        dst[i] = acc ? dst[i] + r : r;
    }
}
extern "C" mgpu_result mgpu_cuda_round_half(const mgpu__round_half_args *a, void *stream) {
    MGPU__REQUIRE(a && (a->half == MGPU_F16 || a->half == MGPU_BF16), "half must be MGPU_F16 or MGPU_BF16");
    MGPU__REQUIRE(a->n >= 0 && (a->n == 0 || (a->src && a->dst)), "src and dst must be device pointers and n >= 0");
    if (a->n == 0) return MGPU_OK;
    MGPU__LAUNCH(mgpu__round_half_k, mgpu__grid(a->n, MGPU__THREADS), MGPU__THREADS, 0, stream, a->src, a->dst, a->n, (int)a->half,
                 a->scale, a->accumulate);
    MGPU__LAUNCHED("mgpu__round_half_k");
    return MGPU_OK;
}

/* ======================================================================================
   Multi-tensor optimizer updates, clipping and unscaling: a launch covers up to 32 tensors;
   each block owns one chunk of one tensor, found through a table passed by value in the kernel
   arguments.
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
// The tensor and element range [lo, hi) of this block.
struct mgpu__mt_chunk { int t; int64_t lo, hi; };
__device__ mgpu__mt_chunk mgpu__mt_chunk_of_block(const mgpu__mt_list &L) {
    mgpu__mt_chunk c;
    c.t = L.block_tensor[blockIdx.x];
    c.lo = (int64_t)L.block_chunk[blockIdx.x] * MGPU__MT_CHUNK;
    c.hi = c.lo + MGPU__MT_CHUNK < L.n[c.t] ? c.lo + MGPU__MT_CHUNK : L.n[c.t];
    return c;
}

// The same arithmetic as the CPU twin (mgpu__adam_range).
__global__ void mgpu__adam_k(mgpu__mt_list L, mgpu__adam_args a) {
    mgpu__mt_chunk c = mgpu__mt_chunk_of_block(L);
    float *P = L.p[c.t], *M = L.s1[c.t], *V = L.s2[c.t];
    const float *G = L.g[c.t];
    float omb1 = 1.0f - a.beta1, omb2 = 1.0f - a.beta2;
    // a captured graph reads this replay's values from its step scalars
    const float decay = a.step_at ? a.step_at[0] : a.decay, step_size = a.step_at ? a.step_at[1] : a.step_size;
    const float bc2_sqrt = a.step_at ? a.step_at[2] : a.bc2_sqrt;
    for (int64_t i = c.lo + threadIdx.x; i < c.hi; i += blockDim.x) {
        float p = P[i];
        float g = G[i] + a.l2 * p;
        float m = a.beta1 * M[i] + omb1 * g;
        float v = a.beta2 * V[i] + omb2 * g * g;
        float denom = sqrtf(v) / bc2_sqrt + a.eps;
        M[i] = m; V[i] = v;
        P[i] = p * decay - step_size * m / denom;
    }
}
// The same arithmetic as the CPU twin (mgpu__sgd_range).
__global__ void mgpu__sgd_k(mgpu__mt_list L, mgpu__sgd_args a) {
    mgpu__mt_chunk c = mgpu__mt_chunk_of_block(L);
    float *P = L.p[c.t], *B = L.s1[c.t];
    const float *G = L.g[c.t];
    const float lr = a.step_at ? a.step_at[0] : a.lr;   // a captured graph: this replay's values
    const int first = a.step_at ? a.step_at[1] != 0.0f : a.first;
    for (int64_t i = c.lo + threadIdx.x; i < c.hi; i += blockDim.x) {
        float d = G[i] + a.weight_decay * P[i];
        if (B) {
            float b = first ? d : a.momentum * B[i] + a.keep * d;
            B[i] = b;
            d = a.nesterov ? d + a.momentum * b : b;
        }
        P[i] -= lr * d;
    }
}
// s: the coefficient, kept in double on the device; applied as a float, as the CPU twin does
__global__ void mgpu__scale_list_k(mgpu__mt_list L, const double *s) {
    mgpu__mt_chunk c = mgpu__mt_chunk_of_block(L);
    float f = (float)s[0];
    for (int64_t i = c.lo + threadIdx.x; i < c.hi; i += blockDim.x) L.p[c.t][i] *= f;
}
__global__ void mgpu__unscale_k(mgpu__mt_list L, float inv, int32_t *found) {
    mgpu__mt_chunk c = mgpu__mt_chunk_of_block(L);
    float *X = L.p[c.t];
    for (int64_t i = c.lo + threadIdx.x; i < c.hi; i += blockDim.x) {
        if (!isfinite(X[i])) found[0] = 1;   // every writer stores the same value
        X[i] *= inv;
    }
}

typedef mgpu_result (*mgpu__mt_launch_fn)(const mgpu__mt_list *L, const void *args, void *stream);
static mgpu_result mgpu__adam_launch(const mgpu__mt_list *L, const void *args, void *stream) {
    MGPU__LAUNCH(mgpu__adam_k, (unsigned)L->blocks, MGPU__THREADS, 0, stream, *L, *(const mgpu__adam_args *)args);
    MGPU__LAUNCHED("mgpu__adam_k");
    return MGPU_OK;
}
static mgpu_result mgpu__sgd_launch(const mgpu__mt_list *L, const void *args, void *stream) {
    MGPU__LAUNCH(mgpu__sgd_k, (unsigned)L->blocks, MGPU__THREADS, 0, stream, *L, *(const mgpu__sgd_args *)args);
    MGPU__LAUNCHED("mgpu__sgd_k");
    return MGPU_OK;
}
// args: the device scalar to multiply by
static mgpu_result mgpu__scale_list_launch(const mgpu__mt_list *L, const void *args, void *stream) {
    MGPU__LAUNCH(mgpu__scale_list_k, (unsigned)L->blocks, MGPU__THREADS, 0, stream, *L, (const double *)args);
    MGPU__LAUNCHED("mgpu__scale_list_k");
    return MGPU_OK;
}
static mgpu_result mgpu__unscale_launch(const mgpu__mt_list *L, const void *args, void *stream) {
    const mgpu__unscale_args *a = (const mgpu__unscale_args *)args;
    MGPU__LAUNCH(mgpu__unscale_k, (unsigned)L->blocks, MGPU__THREADS, 0, stream, *L, a->inv_scale, a->found);
    MGPU__LAUNCHED("mgpu__unscale_k");
    return MGPU_OK;
}
// Packs tensors into lists, launching whenever the tensor slots or the block table fill up.
static mgpu_result mgpu__mt_flush(mgpu__mt_list *L, int *used, mgpu__mt_launch_fn launch, const void *args, void *stream) {
    mgpu_result r = L->blocks > 0 ? launch(L, args, stream) : MGPU_OK;
    memset(L, 0, sizeof *L);
    *used = 0;
    return r;
}
// x: the tensors (p in the kernels); g, s1, s2: arrays indexed like x, or NULL.
static mgpu_result mgpu__multi_tensor_apply(const mgpu__tensor_list *x, const float *const *g, float *const *s1, float *const *s2,
                                            mgpu__mt_launch_fn launch, const void *args, void *stream) {
    mgpu__mt_list L;
    int used = 0;
    mgpu_result r = MGPU_OK;
    memset(&L, 0, sizeof L);
    for (int t = 0; t < x->count && r == MGPU_OK; t++) {
        int64_t chunks = (x->numel[t] + MGPU__MT_CHUNK - 1) / MGPU__MT_CHUNK;
        if (x->numel[t] <= 0) continue;
        if (chunks > 2147483647LL) return mgpu__cu_invalid(__func__, "a tensor is too large");
        for (int64_t c = 0; c < chunks && r == MGPU_OK; c++) {
            if (L.blocks == MGPU__MT_BLOCKS || (c == 0 && used == MGPU__MT_TENSORS)) r = mgpu__mt_flush(&L, &used, launch, args, stream);
            if (c == 0 || used == 0) {   // (re)register tensor t in the current list
                L.p[used] = x->data[t]; L.n[used] = x->numel[t];
                L.g[used] = g ? g[t] : NULL; L.s1[used] = s1 ? s1[t] : NULL; L.s2[used] = s2 ? s2[t] : NULL;
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

// A well-formed list: host arrays, and a device pointer for every tensor that has elements.
static int mgpu__tensor_list_ok(const mgpu__tensor_list *x) {
    if (x->count < 0 || (x->count > 0 && (!x->data || !x->numel))) return 0;
    for (int t = 0; t < x->count; t++) if (x->numel[t] < 0 || (x->numel[t] > 0 && !x->data[t])) return 0;
    return 1;
}
// arr (indexed like x) holds a device pointer for every tensor of x that has elements.
template <typename T> static int mgpu__each_given(const mgpu__tensor_list *x, T *const *arr) {
    if (x->count > 0 && !arr) return 0;
    for (int t = 0; t < x->count; t++) if (x->numel[t] > 0 && !arr[t]) return 0;
    return 1;
}
extern "C" mgpu_result mgpu_cuda_adam(const mgpu__adam_args *a, void *stream) {
    MGPU__REQUIRE(a && mgpu__tensor_list_ok(&a->params) && mgpu__each_given(&a->params, a->grads) &&
                  mgpu__each_given(&a->params, a->exp_avg) && mgpu__each_given(&a->params, a->exp_avg_sq),
                  "params, grads, exp_avg and exp_avg_sq must be host arrays of device pointers");
    return mgpu__multi_tensor_apply(&a->params, a->grads, a->exp_avg, a->exp_avg_sq, mgpu__adam_launch, a, stream);
}
extern "C" mgpu_result mgpu_cuda_sgd(const mgpu__sgd_args *a, void *stream) {
    MGPU__REQUIRE(a && mgpu__tensor_list_ok(&a->params) && mgpu__each_given(&a->params, a->grads) &&
                  (!a->momentum_buffers || mgpu__each_given(&a->params, a->momentum_buffers)),
                  "params, grads and momentum_buffers (or NULL) must be host arrays of device pointers");
    return mgpu__multi_tensor_apply(&a->params, a->grads, a->momentum_buffers, NULL, mgpu__sgd_launch, a, stream);
}

// norm[0] = sqrt(sum over tensors of sum(x^2)); scratch: count * MGPU_CUDA_REDUCE_PARTIALS doubles
static mgpu_result mgpu__global_norm(const mgpu__tensor_list *x, float *norm, double *scratch, void *stream) {
    for (int t = 0; t < x->count; t++) {
        mgpu_result r = mgpu__reduce_partials(MGPU__RED_SQ, x->data[t], NULL, x->numel[t], scratch + (int64_t)t * MGPU_CUDA_REDUCE_PARTIALS, stream);
        if (r != MGPU_OK) return r;
    }
    if (x->count == 0) return mgpu__fill_raw(norm, 1, 4, 0, stream);
    return mgpu__reduce_final(scratch, (int64_t)x->count * MGPU_CUDA_REDUCE_PARTIALS, 1.0f, 1, norm, stream);
}
// As the CPU twin: the coefficient in double, and 1 (grads left alone) for an inf or NaN norm.
__global__ void mgpu__clip_coef_k(const float *norm, float max_norm, double *coef) {
    double c = (double)max_norm / ((double)norm[0] + 1e-6);
    coef[0] = isfinite(norm[0]) && c < 1.0 ? c : 1.0;
}
extern "C" mgpu_result mgpu_cuda_clip_grad_norm(const mgpu__clip_grad_norm_args *a, void *stream) {
    MGPU__REQUIRE(a && mgpu__tensor_list_ok(&a->grads) && a->norm && a->scratch && a->max_norm >= 0.0f,
                  "grads must be host arrays of device pointers, norm and scratch device pointers, max_norm >= 0");
    double *coef = a->scratch + (int64_t)a->grads.count * MGPU_CUDA_REDUCE_PARTIALS;
    mgpu_result r = mgpu__global_norm(&a->grads, a->norm, a->scratch, stream);
    if (r != MGPU_OK) return r;
    MGPU__LAUNCH(mgpu__clip_coef_k, 1, 1, 0, stream, a->norm, a->max_norm, coef);
    MGPU__LAUNCHED("mgpu__clip_coef_k");
    return mgpu__multi_tensor_apply(&a->grads, NULL, NULL, NULL, mgpu__scale_list_launch, coef, stream);
}

extern "C" mgpu_result mgpu_cuda_unscale(const mgpu__unscale_args *a, void *stream) {
    MGPU__REQUIRE(a && mgpu__tensor_list_ok(&a->grads) && a->found, "grads must be host arrays of device pointers, found a device pointer");
    mgpu_result r = mgpu__fill_raw(a->found, 1, 4, 0, stream);
    return r != MGPU_OK ? r : mgpu__multi_tensor_apply(&a->grads, NULL, NULL, NULL, mgpu__unscale_launch, a, stream);
}

/* ======================================================================================
   GEMM: cuBLASLt with a plan cache, cuBLAS fallback. Row-major C = op(A) op(B) is computed as the
   column-major C^T = op(B)^T op(A)^T, so B goes first.
   ====================================================================================== */

#define MGPU__PLAN_CACHE 64
// align_*: the alignment of a, b and c (largest power of two dividing the address, at most 256), so a
// misaligned view (a matrix starting inside a buffer) gets a plan whose algorithm allows it.
struct mgpu__gemm_key { int64_t m, n, k, lda, ldb, ldc; int ta, tb, dtype, epi, tf32; uint32_t align_a, align_b, align_c; };
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
    void *scratch;            // the twins' own buffers (im2col columns, attention probabilities), grown on demand
    size_t scratch_bytes;
    void *half;               // half-precision copies of autocast GEMM operands (half_compute), grown on demand
    size_t half_bytes;
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
    if (b->scratch) cudaFree(b->scratch);
    if (b->half) cudaFree(b->half);
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

// A twin runs on the stream it is given: the bundle follows (nothing to do when already bound there).
static mgpu_result mgpu__blas_on(mgpu__blas *b, void *stream) {
    return b->stream == MGPU__STREAM(stream) ? MGPU_OK : mgpu_cuda_blas_set_stream(b, stream);
}
// The bundle's scratch with room for `bytes`. Growing it first waits for the stream (queued work
// may still read the old buffer); a steady training step finds it large enough and allocates nothing.
static mgpu_result mgpu__blas_scratch(mgpu__blas *b, size_t bytes, float **out) {
    if (b->scratch_bytes < bytes) {
        MGPU__CU(cudaStreamSynchronize(b->stream));
        if (b->scratch) cudaFree(b->scratch);
        b->scratch = NULL; b->scratch_bytes = 0;
        MGPU__CU(cudaMalloc(&b->scratch, bytes));
        b->scratch_bytes = bytes;
    }
    *out = (float *)b->scratch;
    return MGPU_OK;
}

static cudaDataType_t mgpu__cuda_type(int dt) {
    return dt == MGPU_F16 ? CUDA_R_16F : dt == MGPU_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}
static cublasComputeType_t mgpu__compute_type(int dt, int tf32) {
    return (dt == MGPU_F32 && tf32) ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
}
static cublasLtEpilogue_t mgpu__lt_epilogue(int epi) {
    switch (epi) {
    case MGPU__EPI_BIAS: return CUBLASLT_EPILOGUE_BIAS;
    case MGPU__EPI_BIAS_RELU: return CUBLASLT_EPILOGUE_RELU_BIAS;
    case MGPU__EPI_BIAS_GELU: return CUBLASLT_EPILOGUE_GELU_BIAS;   // tanh approximation
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
    // Lt's A is our B and its B our A (the column-major swap); C and D are both our c
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &k->align_b, sizeof k->align_b);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &k->align_a, sizeof k->align_a);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &k->align_c, sizeof k->align_c);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &k->align_c, sizeof k->align_c);
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    memset(&res, 0, sizeof res);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulAlgoGetHeuristic(b->lt, p->desc, p->la, p->lb, p->lc, p->lc, pref, 1, &res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (s == CUBLAS_STATUS_SUCCESS && found > 0 && res.state == CUBLAS_STATUS_SUCCESS) { p->algo = res.algo; p->ok = 1; }
    return MGPU_OK;   // no algorithm is not an error: the caller falls back to cuBLAS
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

// The epilogue cuBLAS lacks: c += bias (per column), then ReLU or GELU (tanh), on every batch item.
__global__ void mgpu__bias_act_k(float *c, int64_t batch, int64_t m, int64_t n, int64_t ldc, int64_t stride_c, const float *bias, int epi) {
    MGPU__FOR(q, batch * m * n) {
        int64_t bi = q / (m * n), i = (q / n) % m, j = q % n;
        float *at = c + bi * stride_c + i * ldc + j;
        float v = *at + bias[j];
        if (epi == MGPU__EPI_BIAS_RELU) v = v > 0 ? v : 0.0f;
        else if (epi == MGPU__EPI_BIAS_GELU) v = mgpu__gelu_tanh_d(v);
        *at = v;
    }
}

static int64_t mgpu__gemm_batch(const mgpu__gemm_args *a) { return a->batch > 0 ? a->batch : 1; }

// Largest power of two dividing the address, at most 256 (cuBLASLt's default assumption).
static uint32_t mgpu__alignment(const void *p) {
    uint32_t align = 256;
    while (align > 1 && ((uintptr_t)p & (align - 1)) != 0) align >>= 1;
    return align;
}

// Plain cuBLAS, strided-batched (row-major C = op(A) op(B) as column-major C^T = op(B)^T op(A)^T).
static mgpu_result mgpu__gemm_cublas(mgpu__blas *b, const mgpu__gemm_args *a) {
    cublasOperation_t opb = a->trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, opa = a->trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    int batch = (int)mgpu__gemm_batch(a);
    if (a->ab_dtype == MGPU_F32 && !b->tf32)
        MGPU__CUBLAS(cublasSgemmStridedBatched(b->handle, opb, opa, (int)a->n, (int)a->m, (int)a->k, &a->alpha, (const float *)a->b,
                                               (int)a->ldb, a->stride_b, (const float *)a->a, (int)a->lda, a->stride_a, &a->beta, a->c,
                                               (int)a->ldc, a->stride_c, batch));
    else
        MGPU__CUBLAS(cublasGemmStridedBatchedEx(b->handle, opb, opa, (int)a->n, (int)a->m, (int)a->k, &a->alpha, a->b,
                                                mgpu__cuda_type(a->ab_dtype), (int)a->ldb, a->stride_b, a->a, mgpu__cuda_type(a->ab_dtype),
                                                (int)a->lda, a->stride_a, &a->beta, a->c, CUDA_R_32F, (int)a->ldc, a->stride_c, batch,
                                                mgpu__compute_type(a->ab_dtype, b->tf32), CUBLAS_GEMM_DEFAULT));
    if (a->epilogue != MGPU__EPI_NONE) {
        MGPU__LAUNCH(mgpu__bias_act_k, mgpu__grid(batch * a->m * a->n, MGPU__THREADS), MGPU__THREADS, 0, b->stream, a->c, (int64_t)batch,
                     a->m, a->n, a->ldc, a->stride_c, a->bias, (int)a->epilogue);
        MGPU__LAUNCHED("mgpu__bias_act_k");
    }
    return MGPU_OK;
}

// One product through cuBLASLt and the plan cache; cuBLAS where Lt has no algorithm for it.
static mgpu_result mgpu__gemm_lt(mgpu__blas *b, const mgpu__gemm_args *a) {
    mgpu__gemm_key key;
    memset(&key, 0, sizeof key);   // padding too: the key is compared with memcmp
    key.m = a->m; key.n = a->n; key.k = a->k; key.lda = a->lda; key.ldb = a->ldb; key.ldc = a->ldc;
    key.ta = a->trans_a != 0; key.tb = a->trans_b != 0; key.dtype = a->ab_dtype; key.epi = a->epilogue; key.tf32 = b->tf32;
    key.align_a = mgpu__alignment(a->a); key.align_b = mgpu__alignment(a->b); key.align_c = mgpu__alignment(a->c);
    mgpu__gemm_plan *p = NULL;
    mgpu_result r = mgpu__plan_get(b, &key, &p);
    if (r != MGPU_OK) return r;
    if (!p->ok) return mgpu__gemm_cublas(b, a);
    if (a->epilogue != MGPU__EPI_NONE)
        MGPU__CUBLAS(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &a->bias, sizeof a->bias));
    MGPU__CUBLAS(cublasLtMatmul(b->lt, p->desc, &a->alpha, a->b, p->la, a->a, p->lb, &a->beta, a->c, p->lc, a->c, p->lc, &p->algo,
                                b->workspace, b->workspace_bytes, b->stream));
    return MGPU_OK;
}

// A validated product on the bundle's stream: Lt for single products; cuBLAS for batches, K = 0
// (C = beta * C), when the caller asks for it, and for a bias that is not 16-byte aligned (Lt takes
// no alignment preference for the bias, so such a view goes where any alignment is fine).
static mgpu_result mgpu__gemm_run(mgpu__blas *b, const mgpu__gemm_args *a) {
    int odd_bias = a->epilogue != MGPU__EPI_NONE && mgpu__alignment(a->bias) < 16;
    if (a->m == 0 || a->n == 0) return MGPU_OK;
    if (mgpu__gemm_batch(a) > 1 || a->k == 0 || a->no_lt || odd_bias) return mgpu__gemm_cublas(b, a);
    return mgpu__gemm_lt(b, a);
}

// Elements an operand spans: `rows` rows of `cols` elements `ld` apart, for each batch item.
static int64_t mgpu__operand_span(int64_t rows, int64_t cols, int64_t ld, int64_t batch, int64_t stride) {
    int64_t one = rows > 0 && cols > 0 ? (rows - 1) * ld + cols : 0;
    return stride > 0 ? (batch - 1) * stride + one : one;
}

// Autocast (half_compute): A and B hold f32 values that autocast already rounded to the half
// format, so casting them is exact; the product then runs on tensor cores in that format with f32
// accumulation, and differs from the f32 product of the same values only in summation order.
static mgpu_result mgpu__gemm_half(mgpu__blas *b, const mgpu__gemm_args *a) {
    int64_t batch = mgpu__gemm_batch(a);
    int64_t na = mgpu__operand_span(a->trans_a ? a->k : a->m, a->trans_a ? a->m : a->k, a->lda, batch, a->stride_a);
    int64_t nb = mgpu__operand_span(a->trans_b ? a->n : a->k, a->trans_b ? a->k : a->n, a->ldb, batch, a->stride_b);
    size_t a_bytes = ((size_t)na * 2 + 255) & ~(size_t)255, need = a_bytes + (size_t)nb * 2 + 256;
    if (b->half_bytes < need) {
        MGPU__CU(cudaStreamSynchronize(b->stream));   // queued products may still read the old copies
        if (b->half) cudaFree(b->half);
        b->half = NULL; b->half_bytes = 0;
        MGPU__CU(cudaMalloc(&b->half, need));
        b->half_bytes = need;
    }
    mgpu__gemm_args h = *a;
    h.ab_dtype = a->half_compute;
    h.a = b->half;
    h.b = (char *)b->half + a_bytes;
    if (na > 0) MGPU__LAUNCH(mgpu__cast_k, mgpu__grid(na, MGPU__THREADS), MGPU__THREADS, 0, b->stream, a->a, (int)MGPU_F32, (void *)h.a, (int)h.ab_dtype, na);
    if (nb > 0) MGPU__LAUNCH(mgpu__cast_k, mgpu__grid(nb, MGPU__THREADS), MGPU__THREADS, 0, b->stream, a->b, (int)MGPU_F32, (void *)h.b, (int)h.ab_dtype, nb);
    MGPU__LAUNCHED("mgpu__cast_k");
    return mgpu__gemm_run(b, &h);
}

// A validated product, in half precision where autocast asked for it.
static mgpu_result mgpu__gemm_go(mgpu__blas *b, const mgpu__gemm_args *a) {
    return a->half_compute ? mgpu__gemm_half(b, a) : mgpu__gemm_run(b, a);
}

extern "C" mgpu_result mgpu_cuda_gemm(const mgpu__gemm_args *a, void *stream) {
    const int64_t lim = 2147483647LL;
    MGPU__REQUIRE(a && a->blas, "blas is NULL (create it with mgpu_cuda_blas_create)");
    MGPU__REQUIRE(mgpu__float_dtype(a->ab_dtype), "ab_dtype must be F32, F16 or BF16");
    MGPU__REQUIRE(a->m >= 0 && a->n >= 0 && a->k >= 0 && a->batch >= 0 && a->m <= lim && a->n <= lim && a->k <= lim && a->batch <= lim,
                  "sizes must be >= 0 and fit in int");
    MGPU__REQUIRE(a->epilogue >= MGPU__EPI_NONE && a->epilogue <= MGPU__EPI_BIAS_GELU && (a->epilogue == MGPU__EPI_NONE || a->bias),
                  "bad epilogue or missing bias");
    MGPU__REQUIRE(a->lda >= (a->trans_a ? a->m : a->k) && a->ldb >= (a->trans_b ? a->k : a->n) && a->ldc >= a->n && a->lda > 0 &&
                  a->ldb > 0 && a->ldc > 0, "leading dimensions are too small for the row-major operands");
    MGPU__REQUIRE(a->stride_a >= 0 && a->stride_b >= 0 && a->stride_c >= 0, "batch strides must be >= 0");
    if (a->m == 0 || a->n == 0) return MGPU_OK;
    MGPU__REQUIRE(a->a && a->b && a->c, "a, b and c must be device pointers");
    MGPU__REQUIRE(a->half_compute == 0 || ((a->half_compute == MGPU_F16 || a->half_compute == MGPU_BF16) && a->ab_dtype == MGPU_F32),
                  "half_compute must be 0, F16 or BF16, with F32 operands");
    mgpu__blas *b = (mgpu__blas *)a->blas;
    mgpu_result r = mgpu__blas_on(b, stream);
    return r != MGPU_OK ? r : mgpu__gemm_go(b, a);
}

// The twins built from GEMMs (conv2d, attention) describe their f32 products with this.
static mgpu__gemm_args mgpu__gemm_f32(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const float *A, int64_t lda,
                                      const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    mgpu__gemm_args g;
    memset(&g, 0, sizeof g);
    g.trans_a = ta; g.trans_b = tb; g.m = m; g.n = n; g.k = k; g.alpha = alpha; g.beta = beta;
    g.a = A; g.lda = lda; g.b = B; g.ldb = ldb; g.c = C; g.ldc = ldc;
    return g;
}
// ... and make them strided batches of `batch` items sa, sb, sc elements apart.
static mgpu__gemm_args mgpu__batched(mgpu__gemm_args g, int64_t batch, int64_t sa, int64_t sb, int64_t sc) {
    g.batch = batch; g.stride_a = sa; g.stride_b = sb; g.stride_c = sc;
    return g;
}

/* ======================================================================================
   linear's bias gradient: fixed-order column sums
   ====================================================================================== */

extern "C" mgpu_result mgpu_cuda_linear_bias_grad(const mgpu__linear_bias_grad_args *a, void *stream) {
    MGPU__REQUIRE(a && a->rows >= 0 && a->cols >= 0 && (a->cols == 0 || a->db) && (a->rows * a->cols == 0 || a->dy),
                  "dy, db must be device pointers; rows, cols >= 0");
    if (a->cols == 0) return MGPU_OK;
    return mgpu__colsum(a->dy, NULL, NULL, NULL, a->rows, a->cols, NULL, a->db, stream);
}

/* ======================================================================================
   conv2d: im2col of the whole batch into the bundle's scratch, then one strided-batched GEMM
   with the weight shared by every image; the backward through GEMMs and col2im
   ====================================================================================== */

// 1x1, stride 1, no padding: an image's column matrix is the image itself
static int mgpu__conv_pointwise(const mgpu__conv_geom *g) { return g->ks == 1 && g->stride == 1 && g->pad == 0; }

// Both conv2d twins start here (fn names the twin; `out` is y or dy, whichever it needs): the
// checks, then the bundle follows the stream.
static mgpu_result mgpu__conv_begin(const char *fn, const mgpu__conv2d_args *a, const float *out, void *stream) {
    const int64_t lim = 2147483647LL;   // the GEMM sizes and the batch count are ints for cuBLAS
    const mgpu__conv_geom *g = a->g;
    if (!a->blas || !mgpu__geom_ok(g) || g->o <= 0 || g->p != g->oh * g->ow || g->ckk != g->c * g->ks * g->ks || g->n > lim || g->o > lim ||
        g->p > lim || g->ckk > lim)
        return mgpu__cu_invalid(fn, "blas is NULL or the convolution geometry is inconsistent");
    if (g->n > 0 && !(a->x && a->w && out)) return mgpu__cu_invalid(fn, "x, w and y (dy for the backward) must be device pointers");
    return mgpu__blas_on((mgpu__blas *)a->blas, stream);
}

__global__ void mgpu__channel_fill_k(float *y, const float *b, int64_t n, int64_t o, int64_t p) {
    MGPU__FOR(q, n * o * p) y[q] = b[(q / p) % o];
}

extern "C" mgpu_result mgpu_cuda_conv2d_forward(const mgpu__conv2d_args *a, void *stream) {
    MGPU__REQUIRE(a && a->g, "a and its geometry must be given");
    MGPU__REQUIRE(a->half_compute == MGPU_F32 || a->half_compute == MGPU_F16 || a->half_compute == MGPU_BF16, "half_compute must be F32 (off), F16 or BF16");
    mgpu_result r = mgpu__conv_begin(__func__, a, a->y, stream);
    const mgpu__conv_geom *g = a->g;
    mgpu__blas *b = (mgpu__blas *)a->blas;
    const float *cols = a->x;   // pointwise: the columns are the images themselves
    if (r != MGPU_OK || g->n == 0) return r;
    if (!mgpu__conv_pointwise(g)) {
        float *ws = NULL;
        r = mgpu__blas_scratch(b, sizeof(float) * (size_t)(g->n * g->ckk * g->p), &ws);
        if (r == MGPU_OK) r = mgpu__im2col(g, a->x, ws, stream);
        cols = ws;
    }
    if (r == MGPU_OK && a->b) {   // y starts as the bias; the GEMM adds onto it
        MGPU__LAUNCH(mgpu__channel_fill_k, mgpu__grid(g->n * g->o * g->p, MGPU__THREADS), MGPU__THREADS, 0, stream, a->y, a->b, g->n, g->o, g->p);
        MGPU__LAUNCHED("mgpu__channel_fill_k");
    }
    if (r != MGPU_OK) return r;
    // y_i (O, P) = W (O, CKK) @ cols_i (CKK, P) [+ y_i]
    mgpu__gemm_args gm = mgpu__batched(mgpu__gemm_f32(0, 0, g->o, g->p, g->ckk, 1.0f, a->w, g->ckk, cols, g->p, a->b ? 1.0f : 0.0f, a->y, g->p),
                                       g->n, 0, g->ckk * g->p, g->o * g->p);
    gm.half_compute = a->half_compute;
    return mgpu__gemm_go(b, &gm);
}

// dW += dY_i (O, P) @ cols_i^T, image after image (a fixed order: deterministic).
static mgpu_result mgpu__conv_weight_grad(mgpu__blas *b, const mgpu__conv2d_args *a, const float *cols) {
    const mgpu__conv_geom *g = a->g;
    mgpu_result r = MGPU_OK;
    for (int64_t i = 0; i < g->n && r == MGPU_OK; i++) {
        mgpu__gemm_args gm = mgpu__gemm_f32(0, 1, g->o, g->ckk, g->p, 1.0f, a->dy + i * g->o * g->p, g->p, cols + i * g->ckk * g->p, g->p,
                                            1.0f, a->dw, g->ckk);
        gm.half_compute = a->half_compute;
        r = mgpu__gemm_go(b, &gm);
    }
    return r;
}

// dX += col2im(W^T @ dY_i) for every image (pointwise: straight into dX).
static mgpu_result mgpu__conv_input_grad(mgpu__blas *b, const mgpu__conv2d_args *a, float *dcols, void *stream) {
    const mgpu__conv_geom *g = a->g;
    int pointwise = mgpu__conv_pointwise(g);
    float *dst = pointwise ? a->dx : dcols;
    mgpu__gemm_args gm = mgpu__batched(mgpu__gemm_f32(1, 0, g->ckk, g->p, g->o, 1.0f, a->w, g->ckk, a->dy, g->p, pointwise ? 1.0f : 0.0f, dst, g->p),
                                       g->n, 0, g->o * g->p, g->ckk * g->p);
    gm.half_compute = a->half_compute;
    mgpu_result r = mgpu__gemm_go(b, &gm);
    return r != MGPU_OK || pointwise ? r : mgpu__col2im(g, dcols, a->dx, stream);
}

extern "C" mgpu_result mgpu_cuda_conv2d_backward(const mgpu__conv2d_args *a, void *stream) {
    MGPU__REQUIRE(a && a->g, "a and its geometry must be given");
    MGPU__REQUIRE(a->half_compute == MGPU_F32 || a->half_compute == MGPU_F16 || a->half_compute == MGPU_BF16, "half_compute must be F32 (off), F16 or BF16");
    mgpu_result r = mgpu__conv_begin(__func__, a, a->dy, stream);
    if (r != MGPU_OK || a->g->n == 0) return r;
    const mgpu__conv_geom *g = a->g;
    int64_t batch_cols = g->n * g->ckk * g->p;
    float *cols = (float *)a->x, *dcols = NULL;   // pointwise: the columns are the images themselves
    mgpu__blas *b = (mgpu__blas *)a->blas;
    if (!mgpu__conv_pointwise(g)) {   // cols for dW, then dcols for dX
        r = mgpu__blas_scratch(b, sizeof(float) * (size_t)(2 * batch_cols), &cols);
        dcols = cols + batch_cols;
        if (r == MGPU_OK && a->dw) r = mgpu__im2col(g, a->x, cols, stream);
    }
    if (r == MGPU_OK && a->dw) r = mgpu__conv_weight_grad(b, a, cols);
    if (r == MGPU_OK && a->dx) r = mgpu__conv_input_grad(b, a, dcols, stream);
    if (r == MGPU_OK && a->db) r = mgpu__channel_sums(a->dy, NULL, NULL, g->n, g->o, g->p, NULL, 0, NULL, NULL, a->db, stream);
    return r;
}

/* ======================================================================================
   Attention: S = scale * Q K^T (batched GEMM), P = masked softmax(S), O = P V
   ====================================================================================== */

static int mgpu__attn_args_ok(const mgpu__attention_args *a) {
    const int64_t lim = 2147483647LL;
    return a && a->blas && a->BH > 0 && a->Tq > 0 && a->Tk > 0 && a->D > 0 && a->BH <= lim && a->Tq <= lim && a->Tk <= lim && a->D <= lim;
}

extern "C" mgpu_result mgpu_cuda_attention_forward(const mgpu__attention_args *a, void *stream) {
    MGPU__REQUIRE(mgpu__attn_args_ok(a), "blas must be given and the sizes be positive and fit in int");
    MGPU__REQUIRE(a->q && a->k && a->v && a->out, "q, k, v and out must be device pointers");
    int64_t BH = a->BH, Tq = a->Tq, Tk = a->Tk, D = a->D;
    mgpu__blas *b = (mgpu__blas *)a->blas;
    float *probs = a->prob;
    mgpu_result r = mgpu__blas_on(b, stream);
    if (r == MGPU_OK && !probs) r = mgpu__blas_scratch(b, sizeof(float) * (size_t)(BH * Tq * Tk), &probs);
    if (r != MGPU_OK) return r;
    mgpu__gemm_args scores = mgpu__batched(mgpu__gemm_f32(0, 1, Tq, Tk, D, a->scale, a->q, D, a->k, D, 0.0f, probs, Tk), BH, Tq * D, Tk * D, Tq * Tk);
    mgpu__gemm_args mix = mgpu__batched(mgpu__gemm_f32(0, 0, Tq, D, Tk, 1.0f, probs, Tk, a->v, D, 0.0f, a->out, D), BH, Tq * Tk, Tk * D, Tq * D);
    r = mgpu__gemm_run(b, &scores);
    if (r == MGPU_OK) r = mgpu__softmax_rows(probs, probs, BH * Tq, Tk, 0, a->causal ? Tq : 0, stream);
    if (r == MGPU_OK) r = mgpu__gemm_run(b, &mix);
    return r;
}
extern "C" mgpu_result mgpu_cuda_attention_backward(const mgpu__attention_args *a, void *stream) {
    MGPU__REQUIRE(mgpu__attn_args_ok(a), "blas must be given and the sizes be positive and fit in int");
    MGPU__REQUIRE(a->q && a->k && a->v && a->prob && a->dout, "q, k, v, prob and dout must be device pointers");
    int64_t BH = a->BH, Tq = a->Tq, Tk = a->Tk, D = a->D;
    mgpu__blas *b = (mgpu__blas *)a->blas;
    float *dprobs = NULL;
    mgpu_result r = mgpu__blas_on(b, stream);
    // dV += P^T dO
    mgpu__gemm_args dv = mgpu__batched(mgpu__gemm_f32(1, 0, Tk, D, Tq, 1.0f, a->prob, Tk, a->dout, D, 1.0f, a->dv, D), BH, Tq * Tk, Tq * D, Tk * D);
    if (r == MGPU_OK && a->dv) r = mgpu__gemm_run(b, &dv);
    if (r != MGPU_OK || (!a->dq && !a->dk)) return r;
    // dP = dO V^T, then dS = scale * softmax'(P) dP in place (masked entries have P = 0, so dS = 0 there)
    if ((r = mgpu__blas_scratch(b, sizeof(float) * (size_t)(BH * Tq * Tk), &dprobs)) != MGPU_OK) return r;
    mgpu__gemm_args dp = mgpu__batched(mgpu__gemm_f32(0, 1, Tq, Tk, D, 1.0f, a->dout, D, a->v, D, 0.0f, dprobs, Tk), BH, Tq * D, Tk * D, Tq * Tk);
    r = mgpu__gemm_run(b, &dp);
    if (r == MGPU_OK) r = mgpu__softmax_bwd_rows(a->prob, dprobs, dprobs, BH * Tq, Tk, 0, a->scale, 0, stream);
    // dQ += dS K, dK += dS^T Q
    mgpu__gemm_args dq = mgpu__batched(mgpu__gemm_f32(0, 0, Tq, D, Tk, 1.0f, dprobs, Tk, a->k, D, 1.0f, a->dq, D), BH, Tq * Tk, Tk * D, Tq * D);
    mgpu__gemm_args dk = mgpu__batched(mgpu__gemm_f32(1, 0, Tk, D, Tq, 1.0f, dprobs, Tk, a->q, D, 1.0f, a->dk, D), BH, Tq * Tk, Tq * D, Tk * D);
    if (r == MGPU_OK && a->dq) r = mgpu__gemm_run(b, &dq);
    if (r == MGPU_OK && a->dk) r = mgpu__gemm_run(b, &dk);
    return r;
}
