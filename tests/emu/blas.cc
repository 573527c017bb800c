/* mgpu CUDA emulation (tests only): reference cuBLAS and cuBLASLt for the calls mgpu makes.

   Column-major, every transpose, A and B in f32, f16 or bf16 (TF32: inputs rounded to 10 mantissa
   bits when the compute type or the handle's math mode asks for it), f32 accumulation in k order,
   C and D in f32, f16 or bf16; beta == 0 never reads C (so a NaN there does not leak). Dimensions
   and leading dimensions are validated as cuBLAS does (CUBLAS_STATUS_INVALID_VALUE); each operand's
   extent must lie inside one device allocation (an out-of-bounds error otherwise). The work is an op
   on the handle's (or cublasLtMatmul's) stream for the stream-order checker: it reads A, B, the bias
   and C (when beta != 0) and writes C or D and the workspace.

   cuBLASLt's heuristic returns one algorithm that remembers the problem it was chosen for and the
   pointer alignment it assumes: the preference's CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES, or 16
   bytes where the preference sets none (real cuBLASLt assumes 256 by default; 16 is the least any
   of its kernels may assume). cublasLtMatmul reports a pointer that is less aligned than that. */
#include "emu_internal.h"
#include "include/cublasLt.h"
#include "include/cuda_bf16.h"
#include "include/cuda_fp16.h"
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <memory>

using namespace mgpu_emu;

struct mgpu_emu_cublas {
    cudaStream_t stream;
    void *workspace;
    size_t workspace_bytes;
    cublasMath_t math;
    cublasPointerMode_t pointer_mode;
    int device;
};
struct mgpu_emu_lt { int device; };
struct mgpu_emu_lt_desc {
    cublasComputeType_t compute;
    cudaDataType_t scale;
    int32_t transa, transb;
    uint32_t epilogue;
    const void *bias;
    int32_t bias_type;      /* -1: the type of D */
    int32_t pointer_mode;
};
struct mgpu_emu_lt_layout {
    cudaDataType_t type;
    uint64_t rows, cols;
    int64_t ld;
    int32_t order;
    int32_t batch;
    int64_t stride;
};
struct mgpu_emu_lt_pref {
    uint64_t max_workspace;
    uint32_t align[4];      /* A, B, C, D; 0: not set */
};

namespace {

size_t type_size(cudaDataType_t t) {
    switch (t) {
    case CUDA_R_32F: return 4;
    case CUDA_R_16F: case CUDA_R_16BF: return 2;
    default: return 0;
    }
}
/* element i of a matrix of type t, as f32 (and back, rounded to nearest even) */
inline float load(const void *p, cudaDataType_t t, size_t i) {
    const uint16_t *h = (const uint16_t *)p;
    return t == CUDA_R_32F ? ((const float *)p)[i] : t == CUDA_R_16F ? mgpu_emu_f16_bits_to_f32(h[i]) : mgpu_emu_bf16_bits_to_f32(h[i]);
}
inline void store(void *p, cudaDataType_t t, size_t i, float v) {
    if (t == CUDA_R_32F) { ((float *)p)[i] = v; return; }
    ((uint16_t *)p)[i] = t == CUDA_R_16F ? mgpu_emu_f32_to_f16_bits(v) : mgpu_emu_f32_to_bf16_bits(v);
}
/* round to TF32 (10 mantissa bits), nearest even */
inline float tf32(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) { u += 0xfffu + ((u >> 13) & 1u); u &= ~0x1fffu; }
    memcpy(&x, &u, 4);
    return x;
}

enum { EPI_NONE, EPI_RELU, EPI_GELU };
struct gemm {
    int ta, tb;
    int64_t m, n, k, batch;
    float alpha, beta;
    const void *a; cudaDataType_t at; int64_t lda, sa;
    const void *b; cudaDataType_t bt; int64_t ldb, sb;
    const void *c; cudaDataType_t ct; int64_t ldc, sc;
    void *d; cudaDataType_t dt; int64_t ldd, sd;
    int tf32;
    const void *bias; cudaDataType_t bias_t;
    int act;
};

/* Elements an (rows x cols, ld) column-major operand spans, over `batch` matrices `stride` apart. */
int64_t extent(int64_t rows, int64_t cols, int64_t ld, int64_t batch, int64_t stride) {
    if (rows <= 0 || cols <= 0 || batch <= 0) return 0;
    return ld * (cols - 1) + rows + stride * (batch - 1);
}

void run_gemm(const gemm &g) {
    std::unique_ptr<float[]> ap(new float[(size_t)(g.m * (g.k ? g.k : 1))]), bp(new float[(size_t)(g.n * (g.k ? g.k : 1))]);
    for (int64_t bi = 0; bi < g.batch; bi++) {
        /* op(A) row i and op(B) column j, contiguous in k */
        for (int64_t i = 0; i < g.m; i++)
            for (int64_t p = 0; p < g.k; p++) {
                float v = load(g.a, g.at, (size_t)(bi * g.sa + (g.ta ? p + i * g.lda : i + p * g.lda)));
                ap[(size_t)(i * g.k + p)] = g.tf32 ? tf32(v) : v;
            }
        for (int64_t j = 0; j < g.n; j++)
            for (int64_t p = 0; p < g.k; p++) {
                float v = load(g.b, g.bt, (size_t)(bi * g.sb + (g.tb ? j + p * g.ldb : p + j * g.ldb)));
                bp[(size_t)(j * g.k + p)] = g.tf32 ? tf32(v) : v;
            }
        for (int64_t j = 0; j < g.n; j++)
            for (int64_t i = 0; i < g.m; i++) {
                const float *x = &ap[(size_t)(i * g.k)], *y = &bp[(size_t)(j * g.k)];
                float acc = 0.0f;
                for (int64_t p = 0; p < g.k; p++) acc += x[p] * y[p];
                float v = g.alpha * acc;
                if (g.beta != 0.0f) v += g.beta * load(g.c, g.ct, (size_t)(bi * g.sc + i + j * g.ldc));
                if (g.bias) v += load(g.bias, g.bias_t, (size_t)i);
                if (g.act == EPI_RELU) v = v > 0.0f ? v : 0.0f;
                else if (g.act == EPI_GELU) v = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
                store(g.d, g.dt, (size_t)(bi * g.sd + i + j * g.ldd), v);
            }
    }
}

/* The operand [p, p + bytes) must lie in one device allocation. Lock held. */
bool operand_ok(const char *api, const char *name, const void *p, int64_t elems, size_t esize) {
    if (elems <= 0) return true;
    size_t bytes = (size_t)elems * esize;
    allocation *a = find_allocation(p);
    if (!a || a->kind != 0) {
        report("misuse", "%s: %s (%p) is not device memory%s%s", api, name, p, a ? ": it lies in " : "", a ? describe_allocation(a).c_str() : "");
        return false;
    }
    size_t off = (size_t)((const char *)p - a->base);
    if (bytes > a->size - off) {
        report("out-of-bounds", "%s: %s spans %zu bytes from %p (offset %zu), %zu bytes past the end of %s", api, name, bytes, p, off,
               bytes - (a->size - off), describe_allocation(a).c_str());
        return false;
    }
    return true;
}

/* Validates extents and enqueues the product as one op on `stream`. */
cublasStatus_t submit(const char *api, const gemm &g, cudaStream_t stream, void *ws, size_t ws_bytes) {
    std::vector<mem_access> acc;
    {
        std::lock_guard<std::recursive_mutex> lk(lock());
        int64_t ea = extent(g.ta ? g.k : g.m, g.ta ? g.m : g.k, g.lda, g.batch, g.sa);
        int64_t eb = extent(g.tb ? g.n : g.k, g.tb ? g.k : g.n, g.ldb, g.batch, g.sb);
        int64_t ec = g.beta != 0.0f ? extent(g.m, g.n, g.ldc, g.batch, g.sc) : 0;
        int64_t ed = extent(g.m, g.n, g.ldd, g.batch, g.sd);
        if (g.k == 0) ea = eb = 0;
        if (!operand_ok(api, "A", g.a, ea, type_size(g.at)) || !operand_ok(api, "B", g.b, eb, type_size(g.bt)) ||
            !operand_ok(api, "C", g.c, ec, type_size(g.ct)) || !operand_ok(api, g.d == g.c ? "C" : "D", g.d, ed, type_size(g.dt)) ||
            (g.bias && !operand_ok(api, "the bias", g.bias, g.m, type_size(g.bias_t))))
            return CUBLAS_STATUS_INVALID_VALUE;
        if (ea) acc.push_back(mem_access{g.a, (size_t)ea * type_size(g.at), 0, 1});
        if (eb) acc.push_back(mem_access{g.b, (size_t)eb * type_size(g.bt), 0, 1});
        if (ec) acc.push_back(mem_access{g.c, (size_t)ec * type_size(g.ct), 0, 1});
        if (g.bias) acc.push_back(mem_access{g.bias, (size_t)g.m * type_size(g.bias_t), 0, 1});
        if (ed) acc.push_back(mem_access{g.d, (size_t)ed * type_size(g.dt), 1, 1});
        if (ws && ws_bytes) {
            if (!operand_ok(api, "the workspace", ws, (int64_t)ws_bytes, 1)) return CUBLAS_STATUS_INVALID_VALUE;
            acc.push_back(mem_access{ws, ws_bytes, 1, 1});
        }
    }
    gemm copy = g;
    cudaError_t e = enqueue(stream, api, std::move(acc), [copy] { run_gemm(copy); });
    return e == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}

bool op_ok(int op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T; }

/* cuBLAS's argument checks for a (possibly batched) GEMM. */
cublasStatus_t check_dims(int ta, int tb, int m, int n, int k, int lda, int ldb, int ldc, int batch) {
    if (!op_ok(ta) || !op_ok(tb) || m < 0 || n < 0 || k < 0 || batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
    int ra = ta ? k : m, rb = tb ? n : k;
    if (lda < (ra > 1 ? ra : 1) || ldb < (rb > 1 ? rb : 1) || ldc < (m > 1 ? m : 1)) return CUBLAS_STATUS_INVALID_VALUE;
    return CUBLAS_STATUS_SUCCESS;
}

bool compute_32f(cublasComputeType_t c) {
    return c == CUBLAS_COMPUTE_32F || c == CUBLAS_COMPUTE_32F_PEDANTIC || c == CUBLAS_COMPUTE_32F_FAST_TF32 ||
           c == CUBLAS_COMPUTE_32F_FAST_16F || c == CUBLAS_COMPUTE_32F_FAST_16BF;
}
bool handle_ok(cublasHandle_t h) { return h != NULL; }

} /* namespace */

/* ====================================================================================
   cuBLAS
   ==================================================================================== */

extern "C" cublasStatus_t cublasCreate(cublasHandle_t *h) {
    if (!h) return CUBLAS_STATUS_INVALID_VALUE;
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) { cudaGetLastError(); return CUBLAS_STATUS_NOT_INITIALIZED; }
    mgpu_emu_cublas *x = new mgpu_emu_cublas();
    x->stream = NULL; x->workspace = NULL; x->workspace_bytes = 0; x->math = CUBLAS_DEFAULT_MATH;
    x->pointer_mode = CUBLAS_POINTER_MODE_HOST; x->device = current_device();
    *h = x;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasDestroy(cublasHandle_t h) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
/* plain handle settings: a setter and a getter each */
#define HANDLE_FIELD(setter, getter, type, member) \
    extern "C" cublasStatus_t setter(cublasHandle_t h, type v) { return h ? (h->member = v, CUBLAS_STATUS_SUCCESS) : CUBLAS_STATUS_NOT_INITIALIZED; } \
    extern "C" cublasStatus_t getter(cublasHandle_t h, type *v) { return h ? ((v ? *v = h->member : h->member), CUBLAS_STATUS_SUCCESS) : CUBLAS_STATUS_NOT_INITIALIZED; }
HANDLE_FIELD(cublasSetStream, cublasGetStream, cudaStream_t, stream)
HANDLE_FIELD(cublasSetMathMode, cublasGetMathMode, cublasMath_t, math)
HANDLE_FIELD(mgpu_emu_cublas_set_pointer_mode, cublasGetPointerMode, cublasPointerMode_t, pointer_mode)
#undef HANDLE_FIELD
extern "C" cublasStatus_t cublasSetPointerMode(cublasHandle_t h, cublasPointerMode_t mode) {   /* device scalars are not emulated */
    return h && mode != CUBLAS_POINTER_MODE_HOST ? CUBLAS_STATUS_NOT_SUPPORTED : mgpu_emu_cublas_set_pointer_mode(h, mode);
}
extern "C" cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void *ws, size_t bytes) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (ws && bytes) {
        std::lock_guard<std::recursive_mutex> lk(lock());
        if (!operand_ok("cublasSetWorkspace", "the workspace", ws, (int64_t)bytes, 1)) return CUBLAS_STATUS_INVALID_VALUE;
    }
    h->workspace = ws; h->workspace_bytes = bytes;
    return CUBLAS_STATUS_SUCCESS;
}
static const code_text cublas_status[] = {
#define E(code, text) {code, #code, text}
    E(CUBLAS_STATUS_SUCCESS, "success"), E(CUBLAS_STATUS_NOT_INITIALIZED, "the library was not initialized"),
    E(CUBLAS_STATUS_ALLOC_FAILED, "the resource allocation failed"),
    E(CUBLAS_STATUS_INVALID_VALUE, "an invalid numeric value was used as an argument"),
    E(CUBLAS_STATUS_ARCH_MISMATCH, "an absent device architectural feature is required"),
    E(CUBLAS_STATUS_MAPPING_ERROR, "an access to GPU memory space failed"),
    E(CUBLAS_STATUS_EXECUTION_FAILED, "the GPU program failed to execute"), E(CUBLAS_STATUS_INTERNAL_ERROR, "an internal operation failed"),
    E(CUBLAS_STATUS_NOT_SUPPORTED, "the functionality requested is not supported"), E(CUBLAS_STATUS_LICENSE_ERROR, "licensing error"),
#undef E
};
extern "C" const char *cublasGetStatusName(cublasStatus_t s) { return code_lookup(cublas_status, s, 1, "CUBLAS_STATUS_UNKNOWN"); }
extern "C" const char *cublasGetStatusString(cublasStatus_t s) { return code_lookup(cublas_status, s, 0, "unknown error"); }

static cublasStatus_t gemm_ex(const char *api, cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                              const void *alpha, const void *A, cudaDataType_t at, int lda, long long sa, const void *B, cudaDataType_t bt,
                              int ldb, long long sb, const void *beta, void *C, cudaDataType_t ct, int ldc, long long sc, int batch,
                              cublasComputeType_t compute) {
    if (!handle_ok(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    cublasStatus_t s = check_dims(ta, tb, m, n, k, lda, ldb, ldc, batch);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    if (!alpha || !beta) return CUBLAS_STATUS_INVALID_VALUE;
    if (!compute_32f(compute) || !type_size(at) || at != bt || !type_size(ct)) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
    gemm g;
    memset(&g, 0, sizeof g);
    g.ta = ta; g.tb = tb; g.m = m; g.n = n; g.k = k; g.batch = batch;
    g.alpha = *(const float *)alpha; g.beta = *(const float *)beta;
    g.a = A; g.at = at; g.lda = lda; g.sa = sa;
    g.b = B; g.bt = bt; g.ldb = ldb; g.sb = sb;
    g.c = C; g.ct = ct; g.ldc = ldc; g.sc = sc;
    g.d = C; g.dt = ct; g.ldd = ldc; g.sd = sc;
    g.tf32 = at == CUDA_R_32F && (compute == CUBLAS_COMPUTE_32F_FAST_TF32 ||
                                  (compute == CUBLAS_COMPUTE_32F && h->math == CUBLAS_TF32_TENSOR_OP_MATH));
    g.act = EPI_NONE;
    return submit(api, g, h->stream, h->workspace, 0);
}

extern "C" cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const float *alpha,
                                      const float *A, int lda, const float *B, int ldb, const float *beta, float *C, int ldc) {
    return gemm_ex("cublasSgemm", h, ta, tb, m, n, k, alpha, A, CUDA_R_32F, lda, 0, B, CUDA_R_32F, ldb, 0, beta, C, CUDA_R_32F, ldc, 0, 1,
                   CUBLAS_COMPUTE_32F);
}
extern "C" cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                                    const float *alpha, const float *A, int lda, long long sa, const float *B, int ldb,
                                                    long long sb, const float *beta, float *C, int ldc, long long sc, int batch) {
    return gemm_ex("cublasSgemmStridedBatched", h, ta, tb, m, n, k, alpha, A, CUDA_R_32F, lda, sa, B, CUDA_R_32F, ldb, sb, beta, C,
                   CUDA_R_32F, ldc, sc, batch, CUBLAS_COMPUTE_32F);
}
extern "C" cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const void *alpha,
                                       const void *A, cudaDataType_t at, int lda, const void *B, cudaDataType_t bt, int ldb, const void *beta,
                                       void *C, cudaDataType_t ct, int ldc, cublasComputeType_t compute, cublasGemmAlgo_t algo) {
    (void)algo;
    return gemm_ex("cublasGemmEx", h, ta, tb, m, n, k, alpha, A, at, lda, 0, B, bt, ldb, 0, beta, C, ct, ldc, 0, 1, compute);
}
extern "C" cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                                     const void *alpha, const void *A, cudaDataType_t at, int lda, long long sa,
                                                     const void *B, cudaDataType_t bt, int ldb, long long sb, const void *beta, void *C,
                                                     cudaDataType_t ct, int ldc, long long sc, int batch, cublasComputeType_t compute,
                                                     cublasGemmAlgo_t algo) {
    (void)algo;
    return gemm_ex("cublasGemmStridedBatchedEx", h, ta, tb, m, n, k, alpha, A, at, lda, sa, B, bt, ldb, sb, beta, C, ct, ldc, sc, batch,
                   compute);
}

/* ====================================================================================
   cuBLASLt
   ==================================================================================== */

#define ALGO_MAGIC 0x4d475055454d554cull   /* "MGPUEMUL" */

extern "C" cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) {
    if (!h) return CUBLAS_STATUS_INVALID_VALUE;
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) { cudaGetLastError(); return CUBLAS_STATUS_NOT_INITIALIZED; }
    *h = new mgpu_emu_lt();
    (*h)->device = current_device();
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute, cudaDataType_t scale) {
    if (!d) return CUBLAS_STATUS_INVALID_VALUE;
    mgpu_emu_lt_desc *x = new mgpu_emu_lt_desc();
    x->compute = compute; x->scale = scale; x->transa = x->transb = CUBLAS_OP_N; x->epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    x->bias = NULL; x->bias_type = -1; x->pointer_mode = 0;
    *d = x;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
    delete d;
    return CUBLAS_STATUS_SUCCESS;
}
/* An attribute is a field of exactly its size; tables map each attribute to its field. */
struct attr_field { int attr; size_t offset, size; };
#define FIELD(attr, type, member) {attr, offsetof(type, member), sizeof(((type *)0)->member)}
template <size_t N> static const attr_field *find_field(const attr_field (&t)[N], int attr) {
    for (size_t i = 0; i < N; i++) if (t[i].attr == attr) return &t[i];
    return NULL;
}
template <size_t N> static cublasStatus_t set_field(void *obj, const attr_field (&t)[N], int attr, const void *buf, size_t size) {
    const attr_field *f = find_field(t, attr);
    if (!f) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (!buf || size != f->size) return CUBLAS_STATUS_INVALID_VALUE;
    memcpy((char *)obj + f->offset, buf, size);
    return CUBLAS_STATUS_SUCCESS;
}
static const attr_field desc_fields[] = {
    FIELD(CUBLASLT_MATMUL_DESC_COMPUTE_TYPE, mgpu_emu_lt_desc, compute), FIELD(CUBLASLT_MATMUL_DESC_SCALE_TYPE, mgpu_emu_lt_desc, scale),
    FIELD(CUBLASLT_MATMUL_DESC_POINTER_MODE, mgpu_emu_lt_desc, pointer_mode), FIELD(CUBLASLT_MATMUL_DESC_TRANSA, mgpu_emu_lt_desc, transa),
    FIELD(CUBLASLT_MATMUL_DESC_TRANSB, mgpu_emu_lt_desc, transb), FIELD(CUBLASLT_MATMUL_DESC_EPILOGUE, mgpu_emu_lt_desc, epilogue),
    FIELD(CUBLASLT_MATMUL_DESC_BIAS_POINTER, mgpu_emu_lt_desc, bias), FIELD(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, mgpu_emu_lt_desc, bias_type),
};
static const attr_field layout_fields[] = {
    FIELD(CUBLASLT_MATRIX_LAYOUT_TYPE, mgpu_emu_lt_layout, type), FIELD(CUBLASLT_MATRIX_LAYOUT_ORDER, mgpu_emu_lt_layout, order),
    FIELD(CUBLASLT_MATRIX_LAYOUT_ROWS, mgpu_emu_lt_layout, rows), FIELD(CUBLASLT_MATRIX_LAYOUT_COLS, mgpu_emu_lt_layout, cols),
    FIELD(CUBLASLT_MATRIX_LAYOUT_LD, mgpu_emu_lt_layout, ld), FIELD(CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, mgpu_emu_lt_layout, batch),
    FIELD(CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, mgpu_emu_lt_layout, stride),
};
static const attr_field pref_fields[] = {
    FIELD(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, mgpu_emu_lt_pref, max_workspace),
    FIELD(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, mgpu_emu_lt_pref, align[0]),
    FIELD(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, mgpu_emu_lt_pref, align[1]),
    FIELD(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, mgpu_emu_lt_pref, align[2]),
    FIELD(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, mgpu_emu_lt_pref, align[3]),
};
#undef FIELD
extern "C" cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, const void *buf,
                                                         size_t size) {
    return d ? set_field(d, desc_fields, attr, buf, size) : CUBLAS_STATUS_INVALID_VALUE;
}
extern "C" cublasStatus_t cublasLtMatmulDescGetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, void *buf, size_t size,
                                                         size_t *written) {
    const attr_field *f = d ? find_field(desc_fields, attr) : NULL;
    if (!d) return CUBLAS_STATUS_INVALID_VALUE;
    if (!f) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (written) *written = f->size;
    if (!buf) return size == 0 ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
    if (size < f->size) return CUBLAS_STATUS_INVALID_VALUE;
    memcpy(buf, (const char *)d + f->offset, f->size);
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType_t type, uint64_t rows, uint64_t cols, int64_t ld) {
    if (!l) return CUBLAS_STATUS_INVALID_VALUE;
    mgpu_emu_lt_layout *x = new mgpu_emu_lt_layout();
    x->type = type; x->rows = rows; x->cols = cols; x->ld = ld; x->order = CUBLASLT_ORDER_COL; x->batch = 1; x->stride = 0;
    *l = x;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
    delete l;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t l, cublasLtMatrixLayoutAttribute_t attr, const void *buf,
                                                           size_t size) {
    return l ? set_field(l, layout_fields, attr, buf, size) : CUBLAS_STATUS_INVALID_VALUE;
}
extern "C" cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p) {
    if (!p) return CUBLAS_STATUS_INVALID_VALUE;
    *p = new mgpu_emu_lt_pref();
    memset(*p, 0, sizeof **p);
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
    delete p;
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p, cublasLtMatmulPreferenceAttributes_t attr,
                                                               const void *buf, size_t size) {
    if (!p) return CUBLAS_STATUS_INVALID_VALUE;
    if (attr == CUBLASLT_MATMUL_PREF_SEARCH_MODE || attr == CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK ||
        attr == CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT || attr == CUBLASLT_MATMUL_PREF_IMPL_MASK)   /* accepted, no effect here */
        return buf && size ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
    return set_field(p, pref_fields, attr, buf, size);
}

/* The problem (m, n, k, batch) a desc and layouts describe; INVALID_VALUE / NOT_SUPPORTED otherwise. */
static cublasStatus_t lt_problem(cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t A, cublasLtMatrixLayout_t B, cublasLtMatrixLayout_t C,
                                 cublasLtMatrixLayout_t D, int64_t *m, int64_t *n, int64_t *k, int64_t *batch, int *act) {
    if (!d || !A || !B || !C || !D) return CUBLAS_STATUS_INVALID_VALUE;
    if (!op_ok(d->transa) || !op_ok(d->transb)) return CUBLAS_STATUS_NOT_SUPPORTED;
    const mgpu_emu_lt_layout *ls[4] = {A, B, C, D};
    for (const mgpu_emu_lt_layout *l : ls) {
        if (l->order != CUBLASLT_ORDER_COL) return CUBLAS_STATUS_NOT_SUPPORTED;
        if (l->ld < (int64_t)(l->rows > 1 ? l->rows : 1) || l->batch < 1) return CUBLAS_STATUS_INVALID_VALUE;
        if (!type_size(l->type)) return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    *m = (int64_t)(d->transa ? A->cols : A->rows);
    *k = (int64_t)(d->transa ? A->rows : A->cols);
    *n = (int64_t)(d->transb ? B->rows : B->cols);
    int64_t kb = (int64_t)(d->transb ? B->cols : B->rows);
    if (kb != *k || (int64_t)C->rows != *m || (int64_t)C->cols != *n || (int64_t)D->rows != *m || (int64_t)D->cols != *n)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (A->batch != D->batch || B->batch != D->batch || C->batch != D->batch) return CUBLAS_STATUS_INVALID_VALUE;
    *batch = D->batch;
    if (A->type != B->type || C->type != D->type) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (!compute_32f(d->compute)) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (d->compute == CUBLAS_COMPUTE_32F_FAST_TF32 && A->type != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    switch (d->epilogue) {
    case CUBLASLT_EPILOGUE_DEFAULT: case CUBLASLT_EPILOGUE_BIAS: *act = EPI_NONE; break;
    case CUBLASLT_EPILOGUE_RELU: case CUBLASLT_EPILOGUE_RELU_BIAS: *act = EPI_RELU; break;
    case CUBLASLT_EPILOGUE_GELU: case CUBLASLT_EPILOGUE_GELU_BIAS: *act = EPI_GELU; break;
    default: return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    return CUBLAS_STATUS_SUCCESS;
}

extern "C" cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t A,
                                                         cublasLtMatrixLayout_t B, cublasLtMatrixLayout_t C, cublasLtMatrixLayout_t D,
                                                         cublasLtMatmulPreference_t pref, int requested,
                                                         cublasLtMatmulHeuristicResult_t results[], int *returned) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!returned || requested < 1 || !results) return CUBLAS_STATUS_INVALID_VALUE;
    *returned = 0;
    int64_t m, n, k, batch;
    int act;
    cublasStatus_t s = lt_problem(d, A, B, C, D, &m, &n, &k, &batch, &act);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    memset(&results[0], 0, sizeof results[0]);
    uint64_t *a = results[0].algo.data;
    a[0] = ALGO_MAGIC;
    for (int i = 0; i < 4; i++)   /* low half: the alignment assumed; high half: 1 when the preference said so */
        a[1 + i] = pref && pref->align[i] ? ((uint64_t)1 << 32) | pref->align[i] : 16;
    a[5] = (uint64_t)m; a[6] = (uint64_t)n; a[7] = (uint64_t)k;
    results[0].workspaceSize = 0;
    results[0].state = CUBLAS_STATUS_SUCCESS;
    results[0].wavesCount = 1.0f;
    *returned = 1;
    return CUBLAS_STATUS_SUCCESS;
}

extern "C" cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void *alpha, const void *Ap,
                                         cublasLtMatrixLayout_t A, const void *Bp, cublasLtMatrixLayout_t B, const void *beta, const void *Cp,
                                         cublasLtMatrixLayout_t C, void *Dp, cublasLtMatrixLayout_t D, const cublasLtMatmulAlgo_t *algo,
                                         void *workspace, size_t workspace_bytes, cudaStream_t stream) {
    static const char *api = "cublasLtMatmul";
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    int64_t m, n, k, batch;
    int act;
    cublasStatus_t s = lt_problem(d, A, B, C, D, &m, &n, &k, &batch, &act);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    if (!alpha || !beta) return CUBLAS_STATUS_INVALID_VALUE;
    if (d->pointer_mode != 0) return CUBLAS_STATUS_NOT_SUPPORTED;
    uint32_t need[4] = {16, 16, 16, 16}, declared[4] = {0, 0, 0, 0};
    if (algo) {
        const uint64_t *a = algo->data;
        if (a[0] != ALGO_MAGIC) {
            report("misuse", "%s: the algorithm was not returned by cublasLtMatmulAlgoGetHeuristic", api);
            return CUBLAS_STATUS_INVALID_VALUE;
        }
        if ((int64_t)a[5] != m || (int64_t)a[6] != n || (int64_t)a[7] != k) {
            report("misuse", "%s: the algorithm was chosen for m=%lld n=%lld k=%lld, used for m=%lld n=%lld k=%lld", api, (long long)a[5],
                   (long long)a[6], (long long)a[7], (long long)m, (long long)n, (long long)k);
            return CUBLAS_STATUS_INVALID_VALUE;
        }
        for (int i = 0; i < 4; i++) { need[i] = (uint32_t)a[1 + i]; declared[i] = (uint32_t)(a[1 + i] >> 32); }
    }
    const void *ptrs[4] = {Ap, Bp, Cp, Dp};
    static const char *names[4] = {"A", "B", "C", "D"};
    static const char *attrs[4] = {"CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES", "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES",
                                   "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES", "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES"};
    for (int i = 0; i < 4; i++) {
        uintptr_t u = (uintptr_t)ptrs[i];
        if (!ptrs[i] || (i == 2 && *(const float *)beta == 0.0f && Cp == NULL)) continue;
        if (need[i] && u % need[i]) {
            uint32_t have = 1;
            while (have < 256 && u % (have * 2) == 0) have *= 2;
            report("alignment",
                   "%s: %s (%p) is only %u-byte aligned, but the algorithm from cublasLtMatmulAlgoGetHeuristic assumes %u bytes (%s %s); "
                   "give the preference the pointers' real alignment, or align the buffers", api, names[i], ptrs[i], have, need[i], attrs[i],
                   declared[i] ? "says so" : "was not set, and cuBLASLt may then assume at least 16");
            return CUBLAS_STATUS_INVALID_VALUE;
        }
    }
    gemm g;
    memset(&g, 0, sizeof g);
    g.ta = d->transa; g.tb = d->transb; g.m = m; g.n = n; g.k = k; g.batch = batch;
    g.alpha = *(const float *)alpha; g.beta = *(const float *)beta;
    g.a = Ap; g.at = A->type; g.lda = A->ld; g.sa = A->stride;
    g.b = Bp; g.bt = B->type; g.ldb = B->ld; g.sb = B->stride;
    g.c = Cp; g.ct = C->type; g.ldc = C->ld; g.sc = C->stride;
    g.d = Dp; g.dt = D->type; g.ldd = D->ld; g.sd = D->stride;
    g.tf32 = A->type == CUDA_R_32F && d->compute == CUBLAS_COMPUTE_32F_FAST_TF32;
    g.act = act;
    if (d->epilogue == CUBLASLT_EPILOGUE_BIAS || d->epilogue == CUBLASLT_EPILOGUE_RELU_BIAS || d->epilogue == CUBLASLT_EPILOGUE_GELU_BIAS) {
        if (!d->bias) return CUBLAS_STATUS_INVALID_VALUE;
        g.bias = d->bias;
        g.bias_t = d->bias_type >= 0 ? (cudaDataType_t)d->bias_type : D->type;
        if (!type_size(g.bias_t)) return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    return submit(api, g, stream, workspace, workspace_bytes);
}
