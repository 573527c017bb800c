/* mgpu CUDA emulation (tests only, never vendored): the CUDA kernel language for a host C++
   compiler. Force-included (g++ -x c++ -include tests/emu/cuda_emu.h -Itests/emu/include) when
   mgpu_kernels.cu or another .cu file is compiled for the emulation, so the kernels compile
   unchanged:

   - __global__/__device__/__host__ vanish: kernels and device functions are plain functions.
   - A launch (MGPU__LAUNCH, or the chevron syntax rewritten to mgpu_emu::make_launcher(...)(args))
     converts the arguments to the kernel's parameter types, as a call would, and hands the kernel
     to the runtime (tests/emu/runtime.cc), which runs it in stream order: every block's threads
     are fibers on the calling OS thread (tests/emu/fiber.cc), switched at __syncthreads, warp
     shuffles and votes, which keep CUDA's semantics (all named lanes must arrive).
   - __shared__ is thread_local: a block's fibers share one OS thread and blocks run one after
     another, so one copy per OS thread is exactly one copy per running block. `extern __shared__`
     arrays (dynamic shared memory) are thread-local symbols aliased to one buffer at link time
     (tests/emu/dynsmem.sh).
   - threadIdx/blockIdx/blockDim/gridDim read thread-local state the scheduler sets before it
     switches to a fiber. */
#ifndef MGPU_EMU_CUDA_EMU_H
#define MGPU_EMU_CUDA_EMU_H
#ifndef __cplusplus
#error "tests/emu/cuda_emu.h is the kernel language: compile .cu files as C++ (-x c++)"
#endif
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ thread_local

static constexpr int warpSize = 32;

/* Built-in variables: plain thread-local storage the scheduler fills (no wrapper calls). */
extern __thread uint3 mgpu_emu_thread_idx, mgpu_emu_block_idx, mgpu_emu_block_dim, mgpu_emu_grid_dim;
#define threadIdx (static_cast<const uint3 &>(mgpu_emu_thread_idx))
#define blockIdx (static_cast<const uint3 &>(mgpu_emu_block_idx))
#define blockDim (static_cast<const uint3 &>(mgpu_emu_block_dim))
#define gridDim (static_cast<const uint3 &>(mgpu_emu_grid_dim))

namespace mgpu_emu {
/* Warp operations (fiber.cc). The value travels as up to 8 raw bytes. */
enum warp_kind { WARP_SHFL_IDX, WARP_SHFL_UP, WARP_SHFL_DOWN, WARP_SHFL_XOR, WARP_BALLOT, WARP_ANY, WARP_ALL, WARP_SYNC };
enum barrier_kind { BAR_PLAIN, BAR_COUNT, BAR_AND, BAR_OR };
int barrier(int kind, int pred);   /* any __syncthreads meets any other, as bar.sync 0 does */
uint64_t warp_op(int kind, unsigned mask, uint64_t value, int arg, int width);
unsigned active_mask(void);

template <class T> static inline T shfl(int kind, unsigned mask, T v, int arg, int width) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp shuffles move values of up to 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof v);
    bits = warp_op(kind, mask, bits, arg, width);
    T r;
    memcpy(&r, &bits, sizeof r);
    return r;
}

/* ---- launches ---- */
struct launch_cfg {
    const char *name;
    const void *func;
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
};
/* One device pointer found in a launch's arguments; `writes` unless the parameter is pointer-to-const. */
struct arg_ptr { const void *p; int writes; int direct; int index; };
/* A launch with its arguments bound; run_thread runs the kernel body for the current fiber. */
struct kernel_call {
    virtual ~kernel_call() {}
    virtual void run_thread() = 0;
};
/* Runtime entry (runtime.cc): checks the configuration, takes part in stream order and the
   checker, runs (or captures) the grid. Takes ownership of call. */
void submit_kernel(const launch_cfg &cfg, kernel_call *call, const arg_ptr *ptrs, int n_ptrs);

template <class T> static inline void collect_arg(const T &v, int index, arg_ptr *out, int *n, int cap) {
    if constexpr (std::is_pointer<T>::value) {
        if (v && *n < cap) out[(*n)++] = arg_ptr{(const void *)v, !std::is_const<typename std::remove_pointer<T>::type>::value, 1, index};
    } else if constexpr (std::is_class<T>::value && std::is_trivially_copyable<T>::value && sizeof(T) >= sizeof(void *)) {
        /* a struct passed by value may carry device pointers (e.g. a table of tensors): every
           aligned word that points into a device allocation counts as read and written */
        unsigned char bytes[sizeof(T)];
        memcpy(bytes, &v, sizeof(T));
        for (size_t o = 0; o + sizeof(void *) <= sizeof(T) && *n < cap; o += sizeof(void *)) {
            const void *p;
            memcpy(&p, bytes + o, sizeof p);
            if (p) out[(*n)++] = arg_ptr{p, 1, 0, index};
        }
    } else {
        (void)v; (void)index; (void)out; (void)n; (void)cap;
    }
}

template <class... P> struct bound_call final : kernel_call {
    void (*fn)(P...);
    std::tuple<P...> args;
    bound_call(void (*f)(P...), P... a) : fn(f), args(a...) {}
    void run_thread() override { std::apply(fn, args); }   /* each thread gets its own copy of the arguments */
};

template <class... P> struct launcher {
    launch_cfg cfg;
    void (*fn)(P...);
    void operator()(P... a) const {   /* ordinary conversions to the parameter types, as a call */
        enum { CAP = 512 };
        static thread_local arg_ptr ptrs[CAP];
        int n = 0, i = 0;
        (collect_arg<P>(a, i++, ptrs, &n, CAP), ...);
        (void)i;
        submit_kernel(cfg, new bound_call<P...>(fn, a...), ptrs, n);
    }
};
template <class... P>
static inline launcher<P...> make_launcher(void (*fn)(P...), const char *name, dim3 grid, dim3 block, size_t smem = 0,
                                           cudaStream_t stream = 0) {
    launcher<P...> l;
    l.cfg = launch_cfg{name, (const void *)fn, grid, block, smem, stream};
    l.fn = fn;
    return l;
}
} /* namespace mgpu_emu */

/* mgpu_kernels.cu launches through this (it defines its nvcc version only when none exists). */
#define MGPU__LAUNCH(kernel, grid, block, smem, stream, ...) \
    ::mgpu_emu::make_launcher(kernel, #kernel, (grid), (block), (size_t)(smem), (cudaStream_t)(stream))(__VA_ARGS__)

/* ---- synchronisation ---- */
static inline __attribute__((always_inline)) void __syncthreads(void) { mgpu_emu::barrier(mgpu_emu::BAR_PLAIN, 0); }
static inline __attribute__((always_inline)) int __syncthreads_count(int p) { return mgpu_emu::barrier(mgpu_emu::BAR_COUNT, p); }
static inline __attribute__((always_inline)) int __syncthreads_and(int p) { return mgpu_emu::barrier(mgpu_emu::BAR_AND, p); }
static inline __attribute__((always_inline)) int __syncthreads_or(int p) { return mgpu_emu::barrier(mgpu_emu::BAR_OR, p); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { mgpu_emu::warp_op(mgpu_emu::WARP_SYNC, mask, 0, 0, 32); }
static inline void __threadfence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block(void) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_system(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline unsigned __activemask(void) { return mgpu_emu::active_mask(); }

template <class T> static inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return mgpu_emu::shfl(mgpu_emu::WARP_SHFL_IDX, mask, v, src, width);
}
template <class T> static inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return mgpu_emu::shfl(mgpu_emu::WARP_SHFL_UP, mask, v, (int)delta, width);
}
template <class T> static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return mgpu_emu::shfl(mgpu_emu::WARP_SHFL_DOWN, mask, v, (int)delta, width);
}
template <class T> static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return mgpu_emu::shfl(mgpu_emu::WARP_SHFL_XOR, mask, v, lane_mask, width);
}
static inline unsigned __ballot_sync(unsigned mask, int pred) { return (unsigned)mgpu_emu::warp_op(mgpu_emu::WARP_BALLOT, mask, pred != 0, 0, 32); }
static inline int __any_sync(unsigned mask, int pred) { return (int)mgpu_emu::warp_op(mgpu_emu::WARP_ANY, mask, pred != 0, 0, 32); }
static inline int __all_sync(unsigned mask, int pred) { return (int)mgpu_emu::warp_op(mgpu_emu::WARP_ALL, mask, pred != 0, 0, 32); }

/* ---- atomics: a block's threads share one OS thread; concurrent launches from other host
   threads still get real atomics ---- */
template <class T> static inline T mgpu_emu_atomic_rmw_float(T *p, T v, int op) {
    T old, nv;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    do { nv = op == 0 ? old + v : op == 1 ? (v < old ? v : old) : (v > old ? v : old); }
    while (!__atomic_compare_exchange(p, &old, &nv, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    return old;
}
static inline int atomicAdd(int *p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicAdd(unsigned *p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline float atomicAdd(float *p, float v) { return mgpu_emu_atomic_rmw_float(p, v, 0); }
static inline double atomicAdd(double *p, double v) { return mgpu_emu_atomic_rmw_float(p, v, 0); }
static inline int atomicSub(int *p, int v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicSub(unsigned *p, unsigned v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
template <class T> static inline T atomicExch(T *p, T v) { T old; __atomic_exchange(p, &v, &old, __ATOMIC_SEQ_CST); return old; }
template <class T> static inline T atomicCAS(T *p, T cmp, T v) {
    __atomic_compare_exchange(p, &cmp, &v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}
template <class T> static inline T atomicMin(T *p, T v) {
    T old;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    while (v < old && !__atomic_compare_exchange(p, &old, &v, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {}
    return old;
}
template <class T> static inline T atomicMax(T *p, T v) {
    T old;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    while (v > old && !__atomic_compare_exchange(p, &old, &v, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {}
    return old;
}
template <class T> static inline T atomicAnd(T *p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }
template <class T> static inline T atomicOr(T *p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
template <class T> static inline T atomicXor(T *p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicInc(unsigned *p, unsigned lim) {
    unsigned old = __atomic_load_n(p, __ATOMIC_RELAXED), nv;
    do { nv = old >= lim ? 0 : old + 1; } while (!__atomic_compare_exchange(p, &old, &nv, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    return old;
}

/* ---- math intrinsics (host libm; the fast variants are the accurate ones here) ---- */
/* glibc declares some of these names itself (__expf, ...): macros avoid clashing with it */
#define __expf(x) expf(x)
#define __exp10f(x) exp10f(x)
#define __logf(x) logf(x)
#define __log2f(x) log2f(x)
#define __log10f(x) log10f(x)
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __tanf(x) tanf(x)
#define __powf(x, y) powf((x), (y))
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
static inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
static inline float __saturatef(float x) { return x != x ? 0.0f : x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline double __longlong_as_double(long long i) { double d; memcpy(&d, &i, 8); return d; }
static inline long long __double_as_longlong(double d) { long long i; memcpy(&i, &d, 8); return i; }
static inline int __float2int_rn(float x) { return (int)rintf(x); }
static inline int __float2int_rz(float x) { return (int)x; }
static inline int __float2int_rd(float x) { return (int)floorf(x); }
static inline int __float2int_ru(float x) { return (int)ceilf(x); }
static inline unsigned __float2uint_rn(float x) { return (unsigned)rintf(x); }
static inline float __int2float_rn(int x) { return (float)x; }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
static inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
static inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) { return (unsigned long long)(((__uint128_t)a * b) >> 64); }
static inline int __mul24(int a, int b) { return a * b; }
template <class T> static inline T __ldg(const T *p) { return *p; }
template <class T> static inline T __ldca(const T *p) { return *p; }
template <class T> static inline T __ldcs(const T *p) { return *p; }
template <class T> static inline void __stcs(T *p, T v) { *p = v; }
/* CUDA's overloaded min/max for device code */
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
static inline long min(long a, long b) { return a < b ? a : b; }
static inline long max(long a, long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }

/* __trap(): a device-side abort, reported with the kernel's name */
namespace mgpu_emu { [[noreturn]] void trap(void); }
static inline void __trap(void) { mgpu_emu::trap(); }
#endif
