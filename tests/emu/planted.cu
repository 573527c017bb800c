// Planted bugs for the CUDA emulation (tests/emu): each scenario is a small CUDA program with one
// defect, or its corrected twin (names ending in -ok). tests/emu_test.sh runs every scenario and
// requires the defect's specific error (or, for -ok, a clean exit). Also the three stream-order
// defects mgpu had, reduced to the calls that made them, so the checker is shown to catch each.
// Usage: planted SCENARIO   (planted list: the scenarios)
#include <cublasLt.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("planted: %s failed: %s\n", #x, cudaGetErrorString(e_)); exit(3); } } while (0)

// ---- block reductions: mgpu's shape (warp shuffles, one partial per warp in shared memory) ----
__device__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
template <int VARIANT>   // 0 correct, 1 without the barrier after the partials are written, 2 without the one before
__device__ float block_sum(float v, float *sh) {
    v = warp_sum(v);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (VARIANT != 2) __syncthreads();   // sh may still be read by a previous call
    if (lane == 0) sh[warp] = v;
    if (VARIANT != 1) __syncthreads();
    float s = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) s += sh[w];
    return s;
}
// Two reductions in a row per block (a mean, then a sum of squares), as layer norm does.
template <int VARIANT> __global__ void two_sums_k(const float *x, float *out) {
    __shared__ float sh[32];
    float v = x[blockIdx.x * blockDim.x + threadIdx.x];
    float a = block_sum<VARIANT>(v, sh);
    float b = block_sum<VARIANT>(v * v, sh);
    if (threadIdx.x == 0) { out[2 * blockIdx.x] = a; out[2 * blockIdx.x + 1] = b; }
}
template <int VARIANT> static int reduction(void) {
    const int blocks = 4, threads = 256, n = blocks * threads;
    float h[n], got[2 * blocks], *x, *out;
    for (int i = 0; i < n; i++) h[i] = (float)(i % 7) - 2.0f;   // small integers: every order sums exactly
    CK(cudaMalloc(&x, sizeof h));
    CK(cudaMalloc(&out, sizeof got));
    CK(cudaMemcpy(x, h, sizeof h, cudaMemcpyHostToDevice));
    MGPU__LAUNCH(two_sums_k<VARIANT>, blocks, threads, 0, 0, x, out);
    CK(cudaMemcpy(got, out, sizeof got, cudaMemcpyDeviceToHost));
    int bad = 0;
    for (int b = 0; b < blocks; b++) {
        float s = 0, q = 0;
        for (int i = 0; i < threads; i++) { s += h[b * threads + i]; q += h[b * threads + i] * h[b * threads + i]; }
        if (got[2 * b] != s || got[2 * b + 1] != q) {
            printf("planted: block reduction %s: block %d gave sums %g and %g, expected %g and %g\n",
                   VARIANT == 1 ? "without the __syncthreads after writing the partials" : VARIANT == 2 ? "without the __syncthreads before writing the partials" : "",
                   b, got[2 * b], got[2 * b + 1], s, q);
            bad = 1;
        }
    }
    CK(cudaFree(x)); CK(cudaFree(out));
    return bad;
}

// ---- an out-of-bounds write: one thread too many ----
__global__ void fill_one_past_k(float *x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) x[i] = 1.0f;   // should be i < n
}
static int oob_write(void) {
    float *x;
    CK(cudaMalloc(&x, 1000 * sizeof(float)));
    MGPU__LAUNCH(fill_one_past_k, 4, 256, 0, 0, x, 1000);
    CK(cudaDeviceSynchronize());
    return 0;
}

// ---- an out-of-bounds read (seen by AddressSanitizer in the sanitizer build: guard zones are poisoned) ----
__global__ void sum_one_past_k(const float *x, int n, float *out) {
    if (threadIdx.x == 0) { float s = 0; for (int i = 0; i <= n; i++) s += x[i]; out[0] = s; }   // should be i < n
}
static int oob_read(void) {
    float *x, *out;
    CK(cudaMalloc(&x, 1000 * sizeof(float)));
    CK(cudaMalloc(&out, sizeof(float)));
    CK(cudaMemset(x, 0, 1000 * sizeof(float)));
    MGPU__LAUNCH(sum_one_past_k, 1, 32, 0, 0, x, 1000, out);
    CK(cudaDeviceSynchronize());
    return 0;
}

// ---- barriers and warps ----
__global__ void half_barrier_k(float *x) {
    if (threadIdx.x < 128) {   // the other half of the block never arrives
        x[threadIdx.x] = 1.0f;
        __syncthreads();
    }
}
__global__ void shfl_after_exit_k(float *x) {
    if ((threadIdx.x & 31) >= 16) return;
    x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 1);   // names lanes 16-31, which left
}
__global__ void shfl_vs_barrier_k(float *x) {
    float v = (float)threadIdx.x;
    if ((threadIdx.x & 31) < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    else __syncthreads();
    x[threadIdx.x] = v;
}
template <class K> static int launch_64(K kernel, const char *name) {
    float *x;
    CK(cudaMalloc(&x, 1024 * sizeof(float)));
    ::mgpu_emu::make_launcher(kernel, name, 1, 256, 0, 0)(x);
    CK(cudaDeviceSynchronize());
    return 0;
}

// ---- launch limits and dynamic shared memory ----
__global__ void dyn_sum_k(const float *x, float *out, int n) {
    extern __shared__ float buf[];   // dynamic shared memory, n floats
    for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = x[i];
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0;
        for (int i = 0; i < n; i++) s += buf[i];
        out[0] = s;
    }
}
static int dyn_smem(int floats, int raise_limit) {
    float *x, *out, r = 0;
    CK(cudaMalloc(&x, floats * sizeof(float)));
    CK(cudaMalloc(&out, sizeof(float)));
    CK(cudaMemset(x, 0, floats * sizeof(float)));
    float one = 1.0f;
    for (int i = 0; i < floats; i += 97) CK(cudaMemcpy(x + i, &one, sizeof one, cudaMemcpyHostToDevice));
    if (raise_limit) CK(cudaFuncSetAttribute(dyn_sum_k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)(floats * sizeof(float))));
    MGPU__LAUNCH(dyn_sum_k, 1, 128, floats * sizeof(float), 0, x, out, floats);
    CK(cudaGetLastError());
    CK(cudaMemcpy(&r, out, sizeof r, cudaMemcpyDeviceToHost));
    float want = (float)((floats + 96) / 97);
    if (r != want) { printf("planted: dynamic shared memory sum %g, expected %g\n", r, want); return 1; }
    return 0;
}
__global__ void nothing_k(float *x) { (void)x; }

// ---- streams ----
__global__ void write_k(float *x, int n, float v) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) x[i] = v;
}
__global__ void sum_k(const float *x, int n, float *out) {
    if (threadIdx.x == 0 && blockIdx.x == 0) { float s = 0; for (int i = 0; i < n; i++) s += x[i]; out[0] = s; }
}
static int two_streams(int with_event) {
    cudaStream_t a, b;
    cudaEvent_t ev;
    float *x, *s;
    CK(cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking));
    CK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    CK(cudaMalloc(&x, 4096 * sizeof(float)));
    CK(cudaMalloc(&s, sizeof(float)));
    MGPU__LAUNCH(write_k, 16, 256, 0, a, x, 4096, 1.0f);   // producer on a
    if (with_event) { CK(cudaEventRecord(ev, a)); CK(cudaStreamWaitEvent(b, ev, 0)); }
    MGPU__LAUNCH(sum_k, 1, 32, 0, b, x, 4096, s);          // consumer on b
    CK(cudaDeviceSynchronize());
    return 0;
}
// mgpu's NCCL backend before the fix: an event recorded on the legacy stream, while the data came
// from a kernel on the context's non-blocking stream.
static int nccl_legacy_event(int fixed) {
    cudaStream_t compute, comm_stream;
    cudaEvent_t ready;
    ncclUniqueId id;
    ncclComm_t comm;
    float *x;
    CK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&comm_stream, cudaStreamNonBlocking));
    CK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
    CK(cudaMalloc(&x, 1024 * sizeof(float)));
    if (ncclGetUniqueId(&id) != ncclSuccess || ncclCommInitRank(&comm, 1, id, 0) != ncclSuccess) { printf("planted: nccl init failed\n"); return 3; }
    MGPU__LAUNCH(write_k, 4, 256, 0, compute, x, 1024, 2.0f);
    CK(cudaEventRecord(ready, fixed ? compute : 0));
    CK(cudaStreamWaitEvent(comm_stream, ready, 0));
    if (ncclAllReduce(x, x, 1024, ncclFloat32, ncclSum, comm, comm_stream) != ncclSuccess) { printf("planted: allreduce failed\n"); return 3; }
    CK(cudaStreamSynchronize(comm_stream));
    ncclCommDestroy(comm);
    return 0;
}
// mgpu's shm backend staging before the fix: a blocking cudaMemcpy (legacy stream) of a tensor a
// kernel on a non-blocking stream produced.
static int staging_legacy(int fixed) {
    cudaStream_t compute;
    float *x, *h;
    CK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
    CK(cudaMalloc(&x, 1024 * sizeof(float)));
    CK(cudaMallocHost(&h, 1024 * sizeof(float)));
    MGPU__LAUNCH(write_k, 4, 256, 0, compute, x, 1024, 3.0f);
    if (fixed) { CK(cudaMemcpyAsync(h, x, 1024 * sizeof(float), cudaMemcpyDeviceToHost, compute)); CK(cudaStreamSynchronize(compute)); }
    else CK(cudaMemcpy(h, x, 1024 * sizeof(float), cudaMemcpyDeviceToHost));
    return h[5] == 3.0f ? 0 : 1;
}
// test_graph_capture before the fix: inputs written on the legacy stream, then captured work on a
// non-blocking stream writes them.
static int graph_legacy_inputs(int fixed) {
    cudaStream_t s;
    cudaGraph_t g;
    cudaGraphExec_t exec;
    float *y;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CK(cudaMalloc(&y, 1024 * sizeof(float)));
    CK(cudaMemset(y, 0xff, 1024 * sizeof(float)));
    if (fixed) CK(cudaDeviceSynchronize());
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    MGPU__LAUNCH(write_k, 4, 256, 0, s, y, 1024, 5.0f);
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&exec, g, 0));
    CK(cudaGraphLaunch(exec, s));
    CK(cudaStreamSynchronize(s));
    CK(cudaGraphExecDestroy(exec)); CK(cudaGraphDestroy(g));
    return 0;
}
// A capture forbids synchronising calls: cudaMalloc fails and the capture is invalidated.
static int capture_malloc(void) {
    cudaStream_t s;
    cudaGraph_t g;
    void *p;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    cudaError_t e = cudaMalloc(&p, 256);
    cudaError_t end = cudaStreamEndCapture(s, &g);
    cudaGetLastError();
    if (e != cudaErrorStreamCaptureUnsupported || end != cudaErrorStreamCaptureInvalidated) {
        printf("planted: cudaMalloc during capture gave %s, end capture %s\n", cudaGetErrorName(e), cudaGetErrorName(end));
        return 1;
    }
    return 0;
}
// The host waiting for the captured stream (cudaStreamSynchronize, a cudaMemcpy to the host, as
// reading a loss with mgpu_tensor_item does) is an error inside a capture, as on a GPU.
static int capture_sync(void) {
    cudaStream_t s;
    cudaGraph_t g;
    float *x, h = 0;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CK(cudaMalloc(&x, 256));
    for (int variant = 0; variant < 2; variant++) {
        CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
        MGPU__LAUNCH(write_k, 1, 64, 0, s, x, 64, 1.0f);
        cudaError_t e = variant == 0 ? cudaStreamSynchronize(s) : cudaMemcpy(&h, x, sizeof h, cudaMemcpyDeviceToHost);
        cudaError_t end = cudaStreamEndCapture(s, &g);
        cudaGetLastError();
        if (e != cudaErrorStreamCaptureUnsupported || end != cudaErrorStreamCaptureInvalidated) {
            printf("planted: %s during capture gave %s, end capture %s\n", variant == 0 ? "cudaStreamSynchronize" : "cudaMemcpy to the host",
                   cudaGetErrorName(e), cudaGetErrorName(end));
            return 1;
        }
    }
    CK(cudaFree(x));
    return 0;
}
// A graph replayed after memory it captured was freed (the defect a graph's private pool avoids).
static int graph_freed(int fixed) {
    cudaStream_t s;
    cudaGraph_t g;
    cudaGraphExec_t exec;
    float *y;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CK(cudaMalloc(&y, 1024 * sizeof(float)));
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    MGPU__LAUNCH(write_k, 4, 256, 0, s, y, 1024, 5.0f);
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&exec, g, 0));
    CK(cudaGraphLaunch(exec, s));
    CK(cudaStreamSynchronize(s));
    if (!fixed) CK(cudaFree(y));
    CK(cudaGraphLaunch(exec, s));
    CK(cudaStreamSynchronize(s));
    CK(cudaGraphExecDestroy(exec)); CK(cudaGraphDestroy(g));
    if (fixed) CK(cudaFree(y));
    return 0;
}
static int graph_freed_bug(void) { return graph_freed(0); }
static int graph_freed_ok(void) { return graph_freed(1); }
static int out_of_memory(void) {   // run with MGPU_EMU_MEM_MB=4
    void *a = NULL, *b = NULL;
    CK(cudaMalloc(&a, 3 << 20));
    cudaError_t e = cudaMalloc(&b, 2 << 20);
    if (e != cudaErrorMemoryAllocation || cudaGetLastError() != cudaErrorMemoryAllocation || cudaGetLastError() != cudaSuccess) {
        printf("planted: a second allocation beyond MGPU_EMU_MEM_MB gave %s\n", cudaGetErrorName(e));
        return 1;
    }
    CK(cudaFree(a));
    CK(cudaMalloc(&b, 2 << 20));   // fits again
    return 0;
}
static int peer_pointer(void) {   // run with MGPU_EMU_DEVICES=2
    float *x;
    int n = 0;
    CK(cudaGetDeviceCount(&n));
    if (n != 2) { printf("planted: %d devices, expected 2\n", n); return 1; }
    CK(cudaSetDevice(1));
    CK(cudaMalloc(&x, 1024 * sizeof(float)));
    CK(cudaSetDevice(0));
    MGPU__LAUNCH(write_k, 4, 256, 0, 0, x, 1024, 1.0f);   // a device-1 buffer from a device-0 kernel
    return 0;
}

// ---- host code touching device memory (the host-access guard: MGPU_EMU_HOST_GUARD) ----
static int host_touch(int write) {
    float *x;
    CK(cudaMalloc(&x, 1024 * sizeof(float)));
    CK(cudaMemset(x, 0, 1024 * sizeof(float)));
    volatile float *v = x;   // a front that reads the loss from t->data on the host, say
    if (write) v[10] = 1.0f;
    else if (v[4] != 0.0f) return 1;
    return 0;
}
static int host_touch_ok(void) {   // the correct program: copies, and touches only pinned and registered host memory
    float *x, *pinned, *reg = (float *)malloc(1024 * sizeof(float));
    CK(cudaMalloc(&x, 1024 * sizeof(float)));
    CK(cudaMallocHost(&pinned, 1024 * sizeof(float)));
    CK(cudaHostRegister(reg, 1024 * sizeof(float), 0));
    for (int i = 0; i < 1024; i++) { pinned[i] = (float)i; reg[i] = 0; }
    CK(cudaMemcpy(x, pinned, 1024 * sizeof(float), cudaMemcpyHostToDevice));
    MGPU__LAUNCH(write_k, 4, 256, 0, 0, x, 512, 7.0f);
    CK(cudaMemcpy(reg, x, 1024 * sizeof(float), cudaMemcpyDeviceToHost));
    if (reg[0] != 7.0f || reg[511] != 7.0f || reg[512] != 512.0f || reg[1023] != 1023.0f) { printf("planted: copied back %g %g %g\n", reg[0], reg[512], reg[1023]); return 1; }
    CK(cudaHostUnregister(reg));
    CK(cudaFreeHost(pinned));
    CK(cudaFree(x));
    free(reg);
    return 0;
}
static int host_read(void) { return host_touch(0); }
static int host_write(void) { return host_touch(1); }
static int mem_budget(void) {   // run with MGPU_EMU_MEM_MB=4: cudaMalloc and cudaMemGetInfo agree on the budget
    size_t free0, total, free1, free2;
    void *a = NULL, *b = NULL;
    CK(cudaMemGetInfo(&free0, &total));
    CK(cudaMalloc(&a, 3 << 20));
    CK(cudaMemGetInfo(&free1, &total));
    cudaError_t e = cudaMalloc(&b, 2 << 20);
    cudaGetLastError();
    CK(cudaMemGetInfo(&free2, &total));
    if (total != (4u << 20) || free0 != total || free1 != (1u << 20) || free2 != free1 || e != cudaErrorMemoryAllocation || b) {
        printf("planted: budget 4 MiB: total %zu, free %zu, %zu after 3 MiB, %zu after a failed 2 MiB (%s)\n", total, free0, free1, free2,
               cudaGetErrorName(e));
        return 1;
    }
    CK(cudaFree(a));
    CK(cudaMemGetInfo(&free1, &total));
    if (free1 != total) { printf("planted: %zu bytes free after freeing everything, of %zu\n", free1, total); return 1; }
    return 0;
}

// ---- cuBLASLt pointer alignment ----
static int lt(int offset_floats, unsigned pref_align) {
    const int m = 8, n = 8, k = 8;
    float *buf, *A, *B, *C, h[3 * 64 + 8], alpha = 1, beta = 0;
    for (int i = 0; i < 3 * 64 + 8; i++) h[i] = 1.0f;
    CK(cudaMalloc(&buf, sizeof h));
    CK(cudaMemcpy(buf, h, sizeof h, cudaMemcpyHostToDevice));
    A = buf + offset_floats; B = buf + 72; C = buf + 136;
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulPreference_t pref;
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    if (cublasLtCreate(&lt) || cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) ||
        cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, m, k, m) || cublasLtMatrixLayoutCreate(&lb, CUDA_R_32F, k, n, k) ||
        cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, m, n, m) || cublasLtMatmulPreferenceCreate(&pref)) { printf("planted: setup failed\n"); return 3; }
    if (pref_align) cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &pref_align, sizeof pref_align);
    if (cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, 1, &res, &found) || found != 1) { printf("planted: no algorithm\n"); return 3; }
    cublasStatus_t s = cublasLtMatmul(lt, desc, &alpha, A, la, B, lb, &beta, C, lc, C, lc, &res.algo, NULL, 0, 0);
    if (s != CUBLAS_STATUS_SUCCESS) { printf("planted: cublasLtMatmul: %s\n", cublasGetStatusString(s)); return 1; }
    CK(cudaMemcpy(h, C, 64 * sizeof(float), cudaMemcpyDeviceToHost));
    if (h[0] != (float)k) { printf("planted: C[0] = %g, expected %d\n", h[0], k); return 1; }
    return 0;
}

struct scenario { const char *name; int (*run)(void); };
static int r_ok(void) { return reduction<0>(); }
static int r_no_sync_after(void) { return reduction<1>(); }
static int r_no_sync_before(void) { return reduction<2>(); }
static int half_barrier(void) { return launch_64(half_barrier_k, "half_barrier_k"); }
static int shfl_exited(void) { return launch_64(shfl_after_exit_k, "shfl_after_exit_k"); }
static int shfl_barrier(void) { return launch_64(shfl_vs_barrier_k, "shfl_vs_barrier_k"); }
static int too_many_threads(void) {
    float *x;
    CK(cudaMalloc(&x, 64));
    MGPU__LAUNCH(nothing_k, 1, 2048, 0, 0, x);
    return cudaGetLastError() == cudaErrorInvalidConfiguration ? 0 : 1;
}
static int dyn_ok(void) { return dyn_smem(8000, 0); }
static int dyn_too_big(void) { return dyn_smem(16384, 0); }
static int dyn_raised_ok(void) { return dyn_smem(16384, 1); }
static int race(void) { return two_streams(0); }
static int race_ok(void) { return two_streams(1); }
static int nccl_bug(void) { return nccl_legacy_event(0); }
static int nccl_ok(void) { return nccl_legacy_event(1); }
static int staging_bug(void) { return staging_legacy(0); }
static int staging_ok(void) { return staging_legacy(1); }
static int graph_bug(void) { return graph_legacy_inputs(0); }
static int graph_ok(void) { return graph_legacy_inputs(1); }
static int lt_unaligned(void) { return lt(1, 0); }
static int lt_below_pref(void) { return lt(2, 16); }
static int lt_declared_ok(void) { return lt(1, 4); }
static int lt_aligned_ok(void) { return lt(0, 0); }
static const scenario scenarios[] = {
    {"reduction-ok", r_ok}, {"reduction-no-sync-after-write", r_no_sync_after}, {"reduction-no-sync-before-write", r_no_sync_before},
    {"oob-write", oob_write}, {"oob-read", oob_read}, {"barrier-not-reached", half_barrier}, {"shuffle-exited-lanes", shfl_exited},
    {"shuffle-vs-barrier", shfl_barrier}, {"too-many-threads", too_many_threads}, {"dynamic-smem-ok", dyn_ok},
    {"dynamic-smem-too-big", dyn_too_big}, {"dynamic-smem-raised-ok", dyn_raised_ok}, {"missing-event-wait", race},
    {"missing-event-wait-ok", race_ok}, {"nccl-legacy-event", nccl_bug}, {"nccl-legacy-event-ok", nccl_ok},
    {"staging-legacy-copy", staging_bug}, {"staging-legacy-copy-ok", staging_ok}, {"graph-legacy-inputs", graph_bug},
    {"graph-legacy-inputs-ok", graph_ok}, {"capture-malloc-ok", capture_malloc}, {"out-of-memory-ok", out_of_memory},
    {"peer-pointer", peer_pointer}, {"lt-unaligned", lt_unaligned}, {"lt-below-preference", lt_below_pref},
    {"lt-declared-alignment-ok", lt_declared_ok}, {"lt-aligned-ok", lt_aligned_ok}, {"host-read", host_read},
    {"host-write", host_write}, {"host-copies-ok", host_touch_ok}, {"memory-budget-ok", mem_budget},
    {"capture-sync-ok", capture_sync}, {"graph-freed-memory", graph_freed_bug}, {"graph-freed-memory-ok", graph_freed_ok},
};

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: planted SCENARIO | list\n"); return 2; }
    for (const scenario &s : scenarios) {
        if (strcmp(argv[1], "list") == 0) { printf("%s\n", s.name); continue; }
        if (strcmp(argv[1], s.name) == 0) {
            int r = s.run();
            if (r == 0) printf("planted: %s ran clean\n", s.name);
            return r;
        }
    }
    if (strcmp(argv[1], "list") == 0) return 0;
    fprintf(stderr, "planted: no scenario '%s'\n", argv[1]);
    return 2;
}
