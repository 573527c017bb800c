/* mgpu.h - v0.1.0 - train neural networks on one or many GPUs (or CPUs) from C. MIT license, see end of file.

   Do this:
       #define MGPU_IMPLEMENTATION
   before you include this file in *one* C or C++ file to create the implementation.

       // in every other file, include it plainly:
       #include "mgpu.h"

   CPU only (default):   cc -O3 -march=native -DMGPU_IMPLEMENTATION impl.c ... -lm -lpthread
   CUDA:                 add -DMGPU_CUDA, compile mgpu_kernels.cu with nvcc and link
                         -lcudart -lcublas -lcublasLt -lnccl

   Options (define before including, in the implementation file):

   | macro                 | effect                                                               |
   |-----------------------|----------------------------------------------------------------------|
   | MGPU_IMPLEMENTATION   | emit the definitions (exactly one translation unit)                  |
   | MGPU_STATIC           | make every public function static (private copy per translation unit)|
   | MGPU_CUDA             | enable the CUDA backend (needs mgpu_kernels.cu and the CUDA libs)    |
   | MGPU_USE_CBLAS        | CPU GEMM through cblas_sgemm (link OpenBLAS or another cblas)        |
   | MGPU_GEMM_KC          | K block of the built-in CPU GEMM (default 256, a multiple of 8)      |
   | MGPU_STB_IMAGE        | image-folder datasets through stb_image (Debian: libstb-dev)         |
   | MGPU_ASSERT(c)        | internal invariant check; defaults to assert()                       |

   Step by step (a complete program; error checks shortened to keep it readable):

       #define MGPU_IMPLEMENTATION
       #include "mgpu.h"
       int main(int argc, char **argv) {
           mgpu_train_opts opts; mgpu_train_opts_default(&opts);
           if (mgpu_train_opts_parse(&opts, argc, argv) != MGPU_OK) return 2;
           // 1. context: device, threads, RNG, autograd tape
           mgpu_context_desc cd = {0}; cd.seed = opts.seed;
           mgpu_context *ctx = mgpu_context_create(&cd);
           // 2. data: (N, 1, 28, 28) images scaled to [0,1], int64 labels
           mgpu_dataset *train = mgpu_dataset_fashion_mnist(opts.data_dir, 1);
           mgpu_loader_desc ld = {0}; ld.batch_size = opts.batch_size; ld.shuffle = 1; ld.seed = opts.seed;
           mgpu_loader *loader = mgpu_loader_create(train, &ld);
           // 3. model: named parameters with PyTorch's names, shapes and init
           mgpu_model *model = mgpu_model_create(ctx);
           mgpu_linear *fc1 = mgpu_linear_create(model, "fc1", 784, 256, 1);
           mgpu_linear *fc2 = mgpu_linear_create(model, "fc2", 256, 10, 1);
           // 4. optimizer
           mgpu_optimizer_desc od = mgpu_optimizer_desc_default(MGPU_OPTIM_ADAMW);
           mgpu_optimizer *opt = mgpu_optimizer_create(model, &od);
           // 5. train: forward, backward (accumulates into .grad), step, reset the step's memory
           for (int epoch = 0; epoch < opts.epochs; epoch++) {
               mgpu_loader_set_epoch(loader, epoch, 0);
               mgpu_batch b;
               while (mgpu_loader_next(loader, &b) == MGPU_OK && b.size > 0) {
                   mgpu_tensor *x = mgpu_op_flatten(ctx, b.x, 1);                          // (B, 784)
                   mgpu_tensor *h = mgpu_op_relu(ctx, mgpu_linear_forward(ctx, fc1, x));   // (B, 256)
                   mgpu_tensor *loss = mgpu_op_cross_entropy(ctx, mgpu_linear_forward(ctx, fc2, h), b.y);
                   mgpu_optimizer_zero_grad(opt);
                   mgpu_backward(ctx, loss);
                   mgpu_optimizer_step(opt);
                   mgpu_context_end_step(ctx);
               }
           }
           // 6. checkpoint: weights under their state_dict names, loadable by PyTorch
           mgpu_model_save(model, "model.safetensors");
           mgpu_optimizer_destroy(opt); mgpu_model_destroy(model);
           mgpu_loader_destroy(loader); mgpu_dataset_destroy(train); mgpu_context_destroy(ctx);
           return 0;
       }

   Memory rules: tensors returned by mgpu_op_* (and by layer forwards) live in the context's
   activation arena until mgpu_context_end_step(); tensors from mgpu_tensor_create() and model
   parameters live until freed. Every public function validates its arguments: functions return
   mgpu_result, constructors return NULL, and mgpu_last_error() explains the failure. Ops given a
   NULL input return NULL without overwriting the first error, so chains can be checked once.
*/
#ifndef MGPU_H
#define MGPU_H

/* The implementation uses POSIX (threads, fsync, popen, clock_gettime): ask for it before any
   system header. Include mgpu.h first in the implementation file, or build with -D_GNU_SOURCE. */
#if defined(MGPU_IMPLEMENTATION) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE
#endif

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef MGPU_STATIC
#if defined(__GNUC__)
#define MGPU_API static __attribute__((unused)) /* a private copy need not use every function */
#else
#define MGPU_API static
#endif
#else
#define MGPU_API extern
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define MGPU_VERSION_MAJOR 0
#define MGPU_VERSION_MINOR 1
#define MGPU_VERSION_PATCH 0
#define MGPU_MAX_DIMS 8

/* ======================================================================================
   Results, errors, logging, allocation
   ====================================================================================== */

typedef enum mgpu_result {
    MGPU_OK = 0,
    MGPU_ERR_INVALID_ARG = -1,   /* a NULL pointer, a value out of range, a bad flag */
    MGPU_ERR_OOM_HOST = -2,
    MGPU_ERR_OOM_DEVICE = -3,
    MGPU_ERR_CUDA = -4,
    MGPU_ERR_NCCL = -5,
    MGPU_ERR_IO = -6,            /* a file could not be opened, read or written */
    MGPU_ERR_FORMAT = -7,        /* a file's content is not what it must be */
    MGPU_ERR_SHAPE = -8,         /* tensor shapes or dtypes do not fit together */
    MGPU_ERR_TIMEOUT = -9,
    MGPU_ERR_UNSUPPORTED = -10,  /* valid request this build or device cannot do */
    MGPU_ERR_STATE = -11         /* called in the wrong order (e.g. backward twice) */
} mgpu_result;

MGPU_API const char *mgpu_result_string(mgpu_result r);
/* The sentence describing this thread's most recent failure ("" if none). */
MGPU_API const char *mgpu_last_error(void);
/* The code of this thread's most recent failure (MGPU_OK if none). */
MGPU_API mgpu_result mgpu_last_result(void);
MGPU_API void mgpu_clear_error(void);

typedef enum mgpu_log_level { MGPU_LOG_DEBUG = 0, MGPU_LOG_INFO = 1, MGPU_LOG_WARN = 2, MGPU_LOG_ERROR = 3 } mgpu_log_level;
typedef void (*mgpu_log_fn)(mgpu_log_level level, const char *message, void *user);
/* Replace the logger (NULL restores the default: stderr with level and rank prefix). */
MGPU_API void mgpu_set_logger(mgpu_log_fn fn, void *user);
MGPU_API void mgpu_set_log_level(mgpu_log_level min_level);
MGPU_API void mgpu_log(mgpu_log_level level, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Host allocation hooks: all host memory the library owns goes through these. */
typedef struct mgpu_allocator {
    void *(*alloc)(size_t bytes, void *user);   /* must return 64-byte aligned memory */
    void (*free)(void *ptr, void *user);
    void *user;
} mgpu_allocator;
MGPU_API void mgpu_set_allocator(const mgpu_allocator *a); /* NULL restores the default */

/* ======================================================================================
   Devices, dtypes, half-precision conversion
   ====================================================================================== */

typedef enum mgpu_device_type { MGPU_DEVICE_CPU = 0, MGPU_DEVICE_CUDA = 1 } mgpu_device_type;
typedef struct mgpu_device { mgpu_device_type type; int index; } mgpu_device;

/* "cpu", "cuda", "cuda:1", "auto" (CUDA when built with it and a GPU is present, else CPU). */
MGPU_API mgpu_result mgpu_device_parse(const char *text, mgpu_device *out);
MGPU_API void mgpu_device_name(mgpu_device d, char *buf, size_t size);
/* Visible CUDA devices: 0 in a CPU build or without a GPU or driver; a negative mgpu_result when
   CUDA is installed but fails (mgpu_last_error() says how), so a broken GPU machine is never taken
   for a CPU-only one. */
MGPU_API int mgpu_cuda_device_count(void);

typedef enum mgpu_dtype {
    MGPU_F32 = 0, MGPU_F16 = 1, MGPU_BF16 = 2, MGPU_I32 = 3, MGPU_I64 = 4, MGPU_U8 = 5
} mgpu_dtype;
#define MGPU_DTYPE_COUNT 6
MGPU_API size_t mgpu_dtype_size(mgpu_dtype dt);          /* 0 for an invalid dtype */
MGPU_API const char *mgpu_dtype_name(mgpu_dtype dt);     /* safetensors spelling: "F32", "BF16", ... */
MGPU_API int mgpu_dtype_from_name(const char *name, mgpu_dtype *out); /* 1 if known */
MGPU_API uint16_t mgpu_f32_to_f16(float f);              /* round to nearest even */
MGPU_API float mgpu_f16_to_f32(uint16_t h);
MGPU_API uint16_t mgpu_f32_to_bf16(float f);             /* round to nearest even */
MGPU_API float mgpu_bf16_to_f32(uint16_t h);

/* ======================================================================================
   Context: device, threads, RNG, activation arena, autograd tape
   ====================================================================================== */

typedef struct mgpu_context mgpu_context;
typedef struct mgpu_context_desc {
    mgpu_device device;       /* zero: cpu */
    uint64_t seed;            /* RNG seed for init and dropout */
    int num_threads;          /* CPU threads; 0: MGPU_NUM_THREADS, OMP_NUM_THREADS, or cores / LOCAL_WORLD_SIZE */
    size_t arena_bytes;       /* initial activation arena; 0: 16 MiB, grows on demand */
} mgpu_context_desc;

MGPU_API mgpu_context *mgpu_context_create(const mgpu_context_desc *desc);
MGPU_API void mgpu_context_destroy(mgpu_context *ctx);
MGPU_API mgpu_device mgpu_context_device(const mgpu_context *ctx);
MGPU_API int mgpu_context_num_threads(const mgpu_context *ctx);
/* Clears the tape and releases every activation of the step (keeps the memory for reuse). */
MGPU_API void mgpu_context_end_step(mgpu_context *ctx);
/* Gradient recording on/off (like torch.no_grad); returns the previous setting. */
MGPU_API int mgpu_set_grad_enabled(mgpu_context *ctx, int enabled);
MGPU_API int mgpu_is_grad_enabled(const mgpu_context *ctx);
/* The RNG stream: counter-based, so state is (seed, offset) and fully resumable. */
MGPU_API void mgpu_context_rng_state(const mgpu_context *ctx, uint64_t *seed, uint64_t *offset);
MGPU_API void mgpu_context_set_rng_state(mgpu_context *ctx, uint64_t seed, uint64_t offset);
/* Reserve n numbers from the context's stream; returns the first counter. */
MGPU_API uint64_t mgpu_context_rng_reserve(mgpu_context *ctx, uint64_t n);
/* Counter-based random numbers: pure functions of (seed, counter). The mixing is defined inline
   here so that mgpu_kernels.cu uses the very same code and GPU dropout masks equal the CPU's. */
#if defined(__CUDACC__)
#define MGPU__HOST_DEVICE __host__ __device__
#else
#define MGPU__HOST_DEVICE
#endif
static inline MGPU__HOST_DEVICE uint64_t mgpu__mix64(uint64_t z) {   /* SplitMix64 finaliser */
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static inline MGPU__HOST_DEVICE uint32_t mgpu__random_bits(uint64_t seed, uint64_t counter) {
    uint64_t z = mgpu__mix64(seed * 0x9e3779b97f4a7c15ULL + 0x632be59bd9b4e019ULL);
    return (uint32_t)(mgpu__mix64(z ^ (counter * 0x9e3779b97f4a7c15ULL + 0xd1b54a32d192ed03ULL)) >> 32);
}
static inline MGPU__HOST_DEVICE float mgpu__random_unit(uint64_t seed, uint64_t counter) {  /* [0, 1) */
    return (float)(mgpu__random_bits(seed, counter) >> 8) * (1.0f / 16777216.0f);
}
MGPU_API uint32_t mgpu_random_u32(uint64_t seed, uint64_t counter);
MGPU_API float mgpu_random_uniform(uint64_t seed, uint64_t counter);   /* [0, 1) */
MGPU_API float mgpu_random_normal(uint64_t seed, uint64_t counter);    /* N(0, 1) */

/* Run fn(arg, begin, end) over [0, n) split across the context's threads (CPU). */
typedef void (*mgpu_range_fn)(void *arg, int64_t begin, int64_t end);
MGPU_API void mgpu_parallel_for(mgpu_context *ctx, int64_t n, int64_t min_chunk, mgpu_range_fn fn, void *arg);

/* ======================================================================================
   Tensors
   ====================================================================================== */

typedef struct mgpu_tensor mgpu_tensor;
typedef void (*mgpu_grad_hook)(mgpu_tensor *param, void *user);
struct mgpu_tensor {
    mgpu_dtype dtype;
    mgpu_device device;
    int ndim;
    int64_t shape[MGPU_MAX_DIMS];
    int64_t numel;
    void *data;               /* contiguous, row-major; host memory on cpu, device memory on cuda */
    mgpu_tensor *grad;        /* accumulated gradient (same shape, F32 or the tensor's dtype), or NULL */
    int requires_grad;
    /* --- library-managed below; read but do not write --- */
    mgpu_context *ctx;
    int is_arena;             /* lives in the activation arena (freed by mgpu_context_end_step) */
    int owns_data;
    struct mgpu__node *node;  /* the op that produced it (NULL for leaves) */
    int pending_grads;        /* backward bookkeeping for grad-ready hooks */
    mgpu_grad_hook grad_hook;
    void *grad_hook_user;
};

/* New persistent tensor filled with zeros (free with mgpu_tensor_free). */
MGPU_API mgpu_tensor *mgpu_tensor_create(mgpu_context *ctx, mgpu_dtype dtype, int ndim, const int64_t *shape);
/* New persistent tensor copied from host memory holding numel elements of dtype. */
MGPU_API mgpu_tensor *mgpu_tensor_from_host(mgpu_context *ctx, mgpu_dtype dtype, int ndim, const int64_t *shape, const void *host);
/* Persistent tensor wrapping memory the caller owns (not freed by mgpu_tensor_free). */
MGPU_API mgpu_tensor *mgpu_tensor_wrap(mgpu_context *ctx, mgpu_dtype dtype, int ndim, const int64_t *shape, void *data);
MGPU_API void mgpu_tensor_free(mgpu_tensor *t);  /* frees grad too; NULL is fine */
MGPU_API size_t mgpu_tensor_nbytes(const mgpu_tensor *t);
MGPU_API mgpu_result mgpu_tensor_copy_to_host(const mgpu_tensor *t, void *dst, size_t dst_bytes);
MGPU_API mgpu_result mgpu_tensor_copy_from_host(mgpu_tensor *t, const void *src, size_t src_bytes);
/* dst = src (same dtype and numel); either may be on the CPU or a GPU (copies across devices wait). */
MGPU_API mgpu_result mgpu_tensor_copy(mgpu_tensor *dst, const mgpu_tensor *src);
/* A new persistent copy of src on ctx's device, like torch's tensor.to(device). */
MGPU_API mgpu_tensor *mgpu_tensor_to(mgpu_context *ctx, const mgpu_tensor *src);
MGPU_API mgpu_result mgpu_tensor_fill(mgpu_tensor *t, double value);
MGPU_API mgpu_result mgpu_tensor_set_requires_grad(mgpu_tensor *t, int requires_grad);
/* Host float pointer of an F32 tensor on the CPU, else NULL (with an error). */
MGPU_API float *mgpu_tensor_f32(const mgpu_tensor *t);
MGPU_API int mgpu_tensor_same_shape(const mgpu_tensor *a, const mgpu_tensor *b);
/* "(2, 3, 4)" */
MGPU_API void mgpu_shape_string(int ndim, const int64_t *shape, char *buf, size_t size);
/* Zero the gradient in place (keeps its memory). */
MGPU_API mgpu_result mgpu_tensor_zero_grad(mgpu_tensor *t);
/* Called once per backward when this leaf's gradient is complete (DDP launches bucket all-reduces here). */
MGPU_API mgpu_result mgpu_tensor_set_grad_hook(mgpu_tensor *t, mgpu_grad_hook hook, void *user);

/* ======================================================================================
   Autograd
   ====================================================================================== */

/* Reverse-mode pass from a scalar loss (seed 1) through the context's tape, ACCUMULATING into
   leaf .grad (call several times before a step for gradient accumulation). The tape stays until
   mgpu_context_end_step. */
MGPU_API mgpu_result mgpu_backward(mgpu_context *ctx, mgpu_tensor *loss);
/* Same, seeded with grad_output (same shape as out). */
MGPU_API mgpu_result mgpu_backward_with_grad(mgpu_context *ctx, mgpu_tensor *out, const mgpu_tensor *grad_output);
/* Called at the end of every successful backward on ctx, before it returns; its result becomes
   backward's result (DDP waits for its bucket all-reduces here). NULL removes it. */
typedef mgpu_result (*mgpu_backward_end_fn)(mgpu_context *ctx, void *user);
MGPU_API void mgpu_context_set_backward_end_hook(mgpu_context *ctx, mgpu_backward_end_fn fn, void *user);

/* ======================================================================================
   Ops (differentiable; outputs live in the activation arena). Shapes in comments.
   All float ops take F32 (F16/BF16 where noted); index inputs take I32 or I64.
   ====================================================================================== */

/* Elementwise with NumPy/PyTorch broadcasting. */
MGPU_API mgpu_tensor *mgpu_op_add(mgpu_context *ctx, mgpu_tensor *a, mgpu_tensor *b);
MGPU_API mgpu_tensor *mgpu_op_sub(mgpu_context *ctx, mgpu_tensor *a, mgpu_tensor *b);
MGPU_API mgpu_tensor *mgpu_op_mul(mgpu_context *ctx, mgpu_tensor *a, mgpu_tensor *b);
MGPU_API mgpu_tensor *mgpu_op_scale(mgpu_context *ctx, mgpu_tensor *a, float s);        /* a * s */
MGPU_API mgpu_tensor *mgpu_op_add_scalar(mgpu_context *ctx, mgpu_tensor *a, float s);   /* a + s */
/* x (..., C) + b (C) */
MGPU_API mgpu_tensor *mgpu_op_bias_add(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *b);
MGPU_API mgpu_tensor *mgpu_op_relu(mgpu_context *ctx, mgpu_tensor *x);
MGPU_API mgpu_tensor *mgpu_op_gelu(mgpu_context *ctx, mgpu_tensor *x);            /* exact (erf), as nn.GELU() */
MGPU_API mgpu_tensor *mgpu_op_gelu_tanh(mgpu_context *ctx, mgpu_tensor *x);       /* approximate='tanh' */
MGPU_API mgpu_tensor *mgpu_op_elu(mgpu_context *ctx, mgpu_tensor *x, float alpha);
MGPU_API mgpu_tensor *mgpu_op_tanh(mgpu_context *ctx, mgpu_tensor *x);
MGPU_API mgpu_tensor *mgpu_op_sigmoid(mgpu_context *ctx, mgpu_tensor *x);
/* Along dim (negative counts from the end). */
MGPU_API mgpu_tensor *mgpu_op_softmax(mgpu_context *ctx, mgpu_tensor *x, int dim);
MGPU_API mgpu_tensor *mgpu_op_log_softmax(mgpu_context *ctx, mgpu_tensor *x, int dim);
/* logp (N, C), target (N) -> mean over targets != ignore_index (-100), scalar */
MGPU_API mgpu_tensor *mgpu_op_nll_loss(mgpu_context *ctx, mgpu_tensor *logp, mgpu_tensor *target);
/* Fused log-softmax + NLL: logits (N, C), target (N) -> scalar mean */
MGPU_API mgpu_tensor *mgpu_op_cross_entropy(mgpu_context *ctx, mgpu_tensor *logits, mgpu_tensor *target);
/* mean((a - b)^2), scalar; same shapes */
MGPU_API mgpu_tensor *mgpu_op_mse_loss(mgpu_context *ctx, mgpu_tensor *a, mgpu_tensor *b);
/* Inverted dropout: zero with probability p, scale kept values by 1/(1-p); identity when !training.
   The mask comes from the context's counter-based RNG, so it is reproducible and resumable. */
MGPU_API mgpu_tensor *mgpu_op_dropout(mgpu_context *ctx, mgpu_tensor *x, float p, int training);

/* Reductions; dim < 0 counts from the end. */
MGPU_API mgpu_tensor *mgpu_op_sum(mgpu_context *ctx, mgpu_tensor *x);                          /* scalar */
MGPU_API mgpu_tensor *mgpu_op_mean(mgpu_context *ctx, mgpu_tensor *x);                         /* scalar */
MGPU_API mgpu_tensor *mgpu_op_sum_dim(mgpu_context *ctx, mgpu_tensor *x, int dim, int keepdim);
MGPU_API mgpu_tensor *mgpu_op_mean_dim(mgpu_context *ctx, mgpu_tensor *x, int dim, int keepdim);
MGPU_API mgpu_tensor *mgpu_op_max_dim(mgpu_context *ctx, mgpu_tensor *x, int dim, int keepdim); /* grad to the first max */

/* Shape ops. reshape accepts one -1. */
MGPU_API mgpu_tensor *mgpu_op_reshape(mgpu_context *ctx, mgpu_tensor *x, int ndim, const int64_t *shape);
MGPU_API mgpu_tensor *mgpu_op_flatten(mgpu_context *ctx, mgpu_tensor *x, int start_dim); /* dims >= start_dim merged */
MGPU_API mgpu_tensor *mgpu_op_transpose(mgpu_context *ctx, mgpu_tensor *x, int dim0, int dim1);
MGPU_API mgpu_tensor *mgpu_op_concat(mgpu_context *ctx, mgpu_tensor *const *xs, int n, int dim);
/* x[..., start:start+length, ...] along dim */
MGPU_API mgpu_tensor *mgpu_op_narrow(mgpu_context *ctx, mgpu_tensor *x, int dim, int64_t start, int64_t length);

/* a (M, K) @ b (K, N) -> (M, N); or batched a (B, M, K) @ b (B, K, N) -> (B, M, N) */
MGPU_API mgpu_tensor *mgpu_op_matmul(mgpu_context *ctx, mgpu_tensor *a, mgpu_tensor *b);
/* x (..., in) @ w (out, in)^T + b (out) -> (..., out); b may be NULL */
MGPU_API mgpu_tensor *mgpu_op_linear(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b);
/* x (N, C, H, W), w (O, C, KH, KW), b (O) or NULL -> (N, O, OH, OW) */
MGPU_API mgpu_tensor *mgpu_op_conv2d(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b, int stride, int padding);
/* x (N, C, H, W) -> (N, C, OH, OW); stride 0 means stride = kernel */
MGPU_API mgpu_tensor *mgpu_op_max_pool2d(mgpu_context *ctx, mgpu_tensor *x, int kernel, int stride, int padding);
MGPU_API mgpu_tensor *mgpu_op_avg_pool2d(mgpu_context *ctx, mgpu_tensor *x, int kernel, int stride, int padding);

/* x (..., C) normalised over the last dim; w, b (C) or NULL */
MGPU_API mgpu_tensor *mgpu_op_layer_norm(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b, float eps);
/* x (N, C) or (N, C, H, W); w, b (C) or NULL. training: batch statistics (biased for normalising,
   unbiased for the running update) and running_mean/var updated with momentum; else running stats.
   running_* may be NULL in training (no tracking). */
MGPU_API mgpu_tensor *mgpu_op_batch_norm(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b,
                                         mgpu_tensor *running_mean, mgpu_tensor *running_var,
                                         int training, float momentum, float eps);
/* weight (V, D), idx (...) I32/I64 -> (..., D); an index outside [0, V) is an error */
MGPU_API mgpu_tensor *mgpu_op_embedding(mgpu_context *ctx, mgpu_tensor *weight, mgpu_tensor *idx);
/* Scaled dot-product attention: q (B, H, Tq, D), k, v (B, H, Tk, D) -> (B, H, Tq, D);
   causal masks key j > query i. */
MGPU_API mgpu_tensor *mgpu_op_attention(mgpu_context *ctx, mgpu_tensor *q, mgpu_tensor *k, mgpu_tensor *v, int causal);
/* Differentiable dtype cast (F32 <-> F16/BF16); on the CPU half types are stored rounded. */
MGPU_API mgpu_tensor *mgpu_op_cast(mgpu_context *ctx, mgpu_tensor *x, mgpu_dtype dtype);

/* Non-differentiable helpers */
/* Number of rows of logits (N, C) whose argmax equals target (N). */
MGPU_API int64_t mgpu_count_correct(const mgpu_tensor *logits, const mgpu_tensor *target);
/* Value of a scalar (or first element) as double; NaN on error. */
MGPU_API double mgpu_tensor_item(const mgpu_tensor *t);

/* CPU GEMM used by every matrix product: C = alpha * op(A) @ op(B) + beta * C, row-major.
   ctx may be NULL: then it runs on the calling thread only.
   op(A) is (M, K): A is (M, K) with lda, or transposed (K, M). Threaded and cache-blocked
   (or cblas under MGPU_USE_CBLAS). */
MGPU_API void mgpu_gemm_f32(mgpu_context *ctx, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                            float alpha, const float *a, int64_t lda, const float *b, int64_t ldb,
                            float beta, float *c, int64_t ldc);

/* ======================================================================================
   Models and layers (parameter names, shapes and default init match PyTorch)
   ====================================================================================== */

typedef struct mgpu_model mgpu_model;
MGPU_API mgpu_model *mgpu_model_create(mgpu_context *ctx);
MGPU_API void mgpu_model_destroy(mgpu_model *m);
MGPU_API mgpu_context *mgpu_model_context(const mgpu_model *m);
/* Register a new zero-filled parameter (requires_grad) / buffer under its state_dict name. */
MGPU_API mgpu_tensor *mgpu_model_add_parameter(mgpu_model *m, const char *name, mgpu_dtype dtype, int ndim, const int64_t *shape);
MGPU_API mgpu_tensor *mgpu_model_add_buffer(mgpu_model *m, const char *name, mgpu_dtype dtype, int ndim, const int64_t *shape);
MGPU_API int mgpu_model_num_parameters(const mgpu_model *m);   /* tensors, registration order */
MGPU_API mgpu_tensor *mgpu_model_parameter(const mgpu_model *m, int i, const char **name);
MGPU_API int mgpu_model_num_buffers(const mgpu_model *m);
MGPU_API mgpu_tensor *mgpu_model_buffer(const mgpu_model *m, int i, const char **name);
MGPU_API mgpu_tensor *mgpu_model_find(const mgpu_model *m, const char *name); /* parameter or buffer */
MGPU_API int64_t mgpu_model_parameter_count(const mgpu_model *m);  /* total elements */
MGPU_API void mgpu_model_train(mgpu_model *m, int training);       /* like module.train()/eval() */
MGPU_API int mgpu_model_is_training(const mgpu_model *m);
MGPU_API mgpu_result mgpu_model_zero_grad(mgpu_model *m);
/* Copies every parameter and buffer from src (same names and shapes). */
MGPU_API mgpu_result mgpu_model_copy_state(mgpu_model *dst, const mgpu_model *src);

typedef struct mgpu_linear { mgpu_model *model; mgpu_tensor *weight, *bias; int64_t in_features, out_features; } mgpu_linear;
MGPU_API mgpu_linear *mgpu_linear_create(mgpu_model *m, const char *name, int64_t in_features, int64_t out_features, int bias);
MGPU_API mgpu_tensor *mgpu_linear_forward(mgpu_context *ctx, const mgpu_linear *l, mgpu_tensor *x);

typedef struct mgpu_conv2d { mgpu_model *model; mgpu_tensor *weight, *bias; int64_t in_channels, out_channels; int kernel, stride, padding; } mgpu_conv2d;
MGPU_API mgpu_conv2d *mgpu_conv2d_create(mgpu_model *m, const char *name, int64_t in_channels, int64_t out_channels,
                                         int kernel, int stride, int padding, int bias);
MGPU_API mgpu_tensor *mgpu_conv2d_forward(mgpu_context *ctx, const mgpu_conv2d *l, mgpu_tensor *x);

/* weight, bias, running_mean, running_var, num_batches_tracked (I64 scalar); eps 1e-5, momentum 0.1 */
typedef struct mgpu_batchnorm2d { mgpu_model *model; mgpu_tensor *weight, *bias, *running_mean, *running_var, *num_batches_tracked;
                                  int64_t num_features; float eps, momentum;
                                  struct mgpu_comm *sync_comm; /* SyncBatchNorm: statistics all-reduced over this communicator */
                                  int64_t counted;             /* library-managed: num_batches_tracked on a GPU as the host last knew it (-1: read it back) */
                                } mgpu_batchnorm2d;
MGPU_API mgpu_batchnorm2d *mgpu_batchnorm2d_create(mgpu_model *m, const char *name, int64_t num_features);
MGPU_API mgpu_tensor *mgpu_batchnorm2d_forward(mgpu_context *ctx, mgpu_batchnorm2d *l, mgpu_tensor *x);

typedef struct mgpu_layernorm { mgpu_model *model; mgpu_tensor *weight, *bias; int64_t dim; float eps; } mgpu_layernorm;
MGPU_API mgpu_layernorm *mgpu_layernorm_create(mgpu_model *m, const char *name, int64_t dim);
MGPU_API mgpu_tensor *mgpu_layernorm_forward(mgpu_context *ctx, const mgpu_layernorm *l, mgpu_tensor *x);

typedef struct mgpu_embedding { mgpu_model *model; mgpu_tensor *weight; int64_t num_embeddings, dim; } mgpu_embedding;
MGPU_API mgpu_embedding *mgpu_embedding_create(mgpu_model *m, const char *name, int64_t num_embeddings, int64_t dim);
MGPU_API mgpu_tensor *mgpu_embedding_forward(mgpu_context *ctx, const mgpu_embedding *l, mgpu_tensor *idx);

typedef struct mgpu_dropout { mgpu_model *model; float p; } mgpu_dropout;
MGPU_API mgpu_dropout *mgpu_dropout_create(mgpu_model *m, float p);
MGPU_API mgpu_tensor *mgpu_dropout_forward(mgpu_context *ctx, const mgpu_dropout *l, mgpu_tensor *x);

/* nn.MultiheadAttention(batch_first=True): in_proj_weight (3E, E), in_proj_bias (3E),
   out_proj.weight (E, E), out_proj.bias (E). x (B, T, E) self-attention. */
typedef struct mgpu_mha { mgpu_model *model; mgpu_tensor *in_proj_weight, *in_proj_bias; mgpu_linear *out_proj;
                          int64_t embed_dim, num_heads; } mgpu_mha;
MGPU_API mgpu_mha *mgpu_mha_create(mgpu_model *m, const char *name, int64_t embed_dim, int64_t num_heads);
MGPU_API mgpu_tensor *mgpu_mha_forward(mgpu_context *ctx, const mgpu_mha *l, mgpu_tensor *x, int causal);

/* nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True,
   norm_first): self_attn.*, linear1, linear2, norm1, norm2; ReLU activation. */
typedef struct mgpu_transformer_layer { mgpu_model *model; mgpu_mha *self_attn; mgpu_linear *linear1, *linear2;
                                        mgpu_layernorm *norm1, *norm2; float dropout; int norm_first; } mgpu_transformer_layer;
MGPU_API mgpu_transformer_layer *mgpu_transformer_layer_create(mgpu_model *m, const char *name, int64_t d_model, int64_t nhead,
                                                               int64_t dim_feedforward, float dropout, int norm_first);
MGPU_API mgpu_tensor *mgpu_transformer_layer_forward(mgpu_context *ctx, const mgpu_transformer_layer *l, mgpu_tensor *x, int causal);

/* Initialisers (use the context's RNG stream) */
MGPU_API mgpu_result mgpu_init_uniform(mgpu_context *ctx, mgpu_tensor *t, float lo, float hi);
MGPU_API mgpu_result mgpu_init_normal(mgpu_context *ctx, mgpu_tensor *t, float mean, float std);

/* ======================================================================================
   Optimizers, clipping, LR schedules
   ====================================================================================== */

typedef enum mgpu_optimizer_type { MGPU_OPTIM_SGD = 0, MGPU_OPTIM_ADAM = 1, MGPU_OPTIM_ADAMW = 2 } mgpu_optimizer_type;
typedef struct mgpu_optimizer_desc {
    mgpu_optimizer_type type;
    float lr;
    float momentum, dampening; int nesterov;     /* SGD */
    float weight_decay;                          /* L2 for SGD/Adam, decoupled for AdamW */
    float beta1, beta2, eps;                     /* Adam/AdamW */
} mgpu_optimizer_desc;
/* PyTorch's defaults: SGD lr 1e-3; Adam lr 1e-3, betas (0.9, 0.999), eps 1e-8; AdamW same plus weight_decay 1e-2. */
MGPU_API mgpu_optimizer_desc mgpu_optimizer_desc_default(mgpu_optimizer_type type);
typedef struct mgpu_optimizer mgpu_optimizer;
MGPU_API mgpu_optimizer *mgpu_optimizer_create(mgpu_model *m, const mgpu_optimizer_desc *desc);
MGPU_API void mgpu_optimizer_destroy(mgpu_optimizer *o);
MGPU_API mgpu_result mgpu_optimizer_step(mgpu_optimizer *o);
MGPU_API mgpu_result mgpu_optimizer_zero_grad(mgpu_optimizer *o);
MGPU_API void mgpu_optimizer_set_lr(mgpu_optimizer *o, float lr);
MGPU_API float mgpu_optimizer_lr(const mgpu_optimizer *o);
MGPU_API int64_t mgpu_optimizer_step_count(const mgpu_optimizer *o);
MGPU_API void mgpu_optimizer_set_step_count(mgpu_optimizer *o, int64_t steps);
/* State tensors for checkpoints, named "<param>.exp_avg", "<param>.exp_avg_sq", "<param>.momentum_buffer". */
MGPU_API int mgpu_optimizer_num_states(const mgpu_optimizer *o);
MGPU_API mgpu_tensor *mgpu_optimizer_state(const mgpu_optimizer *o, int i, const char **name);
/* torch.nn.utils.clip_grad_norm_: scales grads so the global L2 norm is <= max_norm; returns the norm before. */
MGPU_API mgpu_result mgpu_clip_grad_norm(mgpu_model *m, float max_norm, float *total_norm);

typedef enum mgpu_schedule_type {
    MGPU_SCHEDULE_CONSTANT = 0,
    MGPU_SCHEDULE_LINEAR = 1,          /* linear decay from lr to eta_min over total_steps (after warmup) */
    MGPU_SCHEDULE_COSINE = 2,          /* CosineAnnealingLR with T_max = total_steps - warmup */
    MGPU_SCHEDULE_COSINE_RESTARTS = 3, /* CosineAnnealingWarmRestarts(T_0, T_mult, eta_min) */
    MGPU_SCHEDULE_STEP = 4             /* StepLR(step_size, gamma) */
} mgpu_schedule_type;
typedef struct mgpu_lr_schedule {
    mgpu_schedule_type type;
    float base_lr;
    int64_t warmup_steps;    /* linear warmup from base_lr/warmup_steps up to base_lr, then the schedule */
    int64_t total_steps;     /* LINEAR, COSINE */
    int64_t t_0; int64_t t_mult; float eta_min;  /* COSINE_RESTARTS (eta_min also for COSINE/LINEAR) */
    int64_t step_size; float gamma;              /* STEP */
} mgpu_lr_schedule;
/* The learning rate for optimizer step `step` (0-based): a pure function, so resuming needs only the step. */
MGPU_API float mgpu_lr_at(const mgpu_lr_schedule *s, int64_t step);
MGPU_API mgpu_result mgpu_schedule_parse(const char *name, mgpu_schedule_type *out); /* constant|linear|cosine|cosine-restarts|step */
typedef enum mgpu_lr_scaling { MGPU_LR_SCALE_NONE = 0, MGPU_LR_SCALE_LINEAR = 1, MGPU_LR_SCALE_SQRT = 2 } mgpu_lr_scaling;
/* lr * k (linear) or lr * sqrt(k) with k = world_size * grad_accum_steps. */
MGPU_API float mgpu_lr_scale(float lr, int world_size, int grad_accum_steps, mgpu_lr_scaling rule);

/* ======================================================================================
   Data: datasets, sampler, loader
   ====================================================================================== */

/* A dataset yields sample i as x (x_shape, x_dtype) and y (y_shape, y_dtype; ndim 0 = scalar). */
typedef struct mgpu_dataset mgpu_dataset;
struct mgpu_dataset {
    int64_t length;
    mgpu_dtype x_dtype; int x_ndim; int64_t x_shape[MGPU_MAX_DIMS];
    mgpu_dtype y_dtype; int y_ndim; int64_t y_shape[MGPU_MAX_DIMS];
    /* Write sample `index` into x_out / y_out (thread-safe: called from loader workers). */
    mgpu_result (*get)(const mgpu_dataset *ds, int64_t index, void *x_out, void *y_out);
    void (*destroy)(mgpu_dataset *ds);
    void *impl;
    /* 1: get() gives the same sample for an index every time (no random augmentation), so a copy
       made once stays valid: MGPU_DATA_ON_DEVICE_AUTO may keep the dataset on the GPU. The array
       and IDX datasets set it; 0 (a dataset that may augment) keeps AUTO streaming. */
    int static_samples;
};
MGPU_API void mgpu_dataset_destroy(mgpu_dataset *ds);
/* In-memory arrays (copied): x (n, x_shape...), y (n, y_shape...). */
MGPU_API mgpu_dataset *mgpu_dataset_from_arrays(int64_t n, mgpu_dtype x_dtype, int x_ndim, const int64_t *x_shape, const void *x,
                                                mgpu_dtype y_dtype, int y_ndim, const int64_t *y_shape, const void *y);
/* IDX image + label files (plain or .gz, decompressed with `gzip -dc`): x F32 (1, rows, cols) in [0,1], y I64. */
MGPU_API mgpu_dataset *mgpu_dataset_idx_open(const char *images_path, const char *labels_path);
/* Parse one IDX file already in memory. label names it in errors. dims (up to 8), data points into bytes. */
typedef struct mgpu_idx { int type_code; int ndim; int64_t dims[MGPU_MAX_DIMS]; const uint8_t *data; size_t data_bytes; } mgpu_idx;
MGPU_API mgpu_result mgpu_idx_parse(const void *bytes, size_t len, const char *label, mgpu_idx *out);
/* Fashion-MNIST (or MNIST) from dir: train-* or t10k-* files, plain or .gz. dir NULL: $MGPU_DATA, then data/fashion-mnist. */
MGPU_API mgpu_dataset *mgpu_dataset_fashion_mnist(const char *dir, int train);

/* DistributedSampler semantics: indices of the epoch for `rank`: a permutation of [0, n) from
   (seed + epoch) if shuffle, padded by wrapping to a multiple of world_size (or truncated when
   drop_last), rank takes positions rank, rank + world, ... Returns the count (ceil(n/world), or
   floor with drop_last); out needs that many slots (NULL to query). */
MGPU_API int64_t mgpu_sampler_indices(int64_t n, int rank, int world_size, int shuffle, uint64_t seed, int64_t epoch,
                                      int drop_last, int64_t *out);

/* Where a loader on a CUDA context keeps the dataset:
   OFF  (0) streams batches: workers fill pinned host buffers, each batch is copied on the loader's
        own stream, the next one while the step computes on the current one;
   ON   uploads every sample once (get() called once per index) and gathers each batch on the GPU
        from the epoch's permutation: the same batches, order and values as streaming. A dataset
        that does not fit is MGPU_ERR_OOM_DEVICE; a CPU context is MGPU_ERR_INVALID_ARG;
   AUTO ON when the dataset is static (mgpu_dataset.static_samples) and its samples plus the
        epoch's index list take at most a quarter of the device's free memory, else OFF; on a CPU
        context OFF (the samples are in host memory already). */
typedef enum mgpu_data_on_device { MGPU_DATA_ON_DEVICE_OFF = 0, MGPU_DATA_ON_DEVICE_ON = 1, MGPU_DATA_ON_DEVICE_AUTO = 2 } mgpu_data_on_device;
typedef struct mgpu_loader_desc {
    int64_t batch_size;       /* per process */
    int shuffle; uint64_t seed;
    int drop_last;            /* drop the last incomplete batch (DataLoader drop_last) */
    int rank, world_size;     /* sharding (world 0 or 1: no sharding) */
    int sampler_drop_last;    /* DistributedSampler(drop_last=True) */
    int num_workers;          /* 0: load on the calling thread */
    int prefetch;             /* batches in flight per worker; 0: 2 */
    mgpu_context *ctx;        /* batch tensors are created on this context's device (NULL: host) */
    mgpu_data_on_device data_on_device;   /* CUDA: stream batches (OFF, the default) or keep the dataset on the GPU */
} mgpu_loader_desc;
typedef struct mgpu_batch {
    mgpu_tensor *x, *y;       /* (size, x_shape...), (size, y_shape...); valid until the next mgpu_loader_next */
    int64_t size;             /* 0 at the end of the epoch */
    int64_t index;            /* batch number within the epoch */
} mgpu_batch;
typedef struct mgpu_loader mgpu_loader;
MGPU_API mgpu_loader *mgpu_loader_create(const mgpu_dataset *ds, const mgpu_loader_desc *desc);
MGPU_API void mgpu_loader_destroy(mgpu_loader *l);
/* Start epoch `epoch` at batch `start_batch` (for resuming mid-epoch). */
MGPU_API mgpu_result mgpu_loader_set_epoch(mgpu_loader *l, int64_t epoch, int64_t start_batch);
/* Next batch (b->size == 0 at the end of the epoch). */
MGPU_API mgpu_result mgpu_loader_next(mgpu_loader *l, mgpu_batch *b);
MGPU_API int64_t mgpu_loader_num_batches(const mgpu_loader *l);
/* 1 when the loader keeps the dataset on the device (data_on_device ON, or AUTO that chose it), 0 when
   it streams batches from the host, -1 for NULL. */
MGPU_API int mgpu_loader_data_on_device(const mgpu_loader *l);

/* ======================================================================================
   Files: safetensors, JSON
   ====================================================================================== */

/* Writes atomically (tmp file, fsync, rename). metadata: n_meta key/value pairs (may be 0). */
MGPU_API mgpu_result mgpu_safetensors_save(const char *path, int n, const char *const *names, const mgpu_tensor *const *tensors,
                                           int n_meta, const char *const *meta_keys, const char *const *meta_values);
typedef struct mgpu_safetensors mgpu_safetensors;
typedef struct mgpu_safetensors_entry {
    const char *name; mgpu_dtype dtype; int ndim; int64_t shape[MGPU_MAX_DIMS];
    const void *data; size_t nbytes;   /* may be unaligned in files from other writers: read with memcpy */
} mgpu_safetensors_entry;
/* Reads and fully validates a file (header size, JSON, dtypes, shapes vs byte ranges, overlap, bounds). */
MGPU_API mgpu_safetensors *mgpu_safetensors_open(const char *path);
/* Same on bytes in memory (copied); label names the source in errors. */
MGPU_API mgpu_safetensors *mgpu_safetensors_parse(const void *bytes, size_t len, const char *label);
MGPU_API void mgpu_safetensors_close(mgpu_safetensors *st);
MGPU_API int mgpu_safetensors_count(const mgpu_safetensors *st);
MGPU_API const mgpu_safetensors_entry *mgpu_safetensors_get(const mgpu_safetensors *st, int i);
MGPU_API const mgpu_safetensors_entry *mgpu_safetensors_find(const mgpu_safetensors *st, const char *name);
MGPU_API const char *mgpu_safetensors_metadata(const mgpu_safetensors *st, const char *key); /* NULL if absent */
/* Copy an entry into a tensor of the same shape (converting between F32/F16/BF16 if needed). */
MGPU_API mgpu_result mgpu_safetensors_read_into(const mgpu_safetensors *st, const char *name, mgpu_tensor *dst);

/* A model's parameters and buffers under their state_dict names (load checks names, dtypes, shapes). */
MGPU_API mgpu_result mgpu_model_save(const mgpu_model *m, const char *path);
MGPU_API mgpu_result mgpu_model_load(mgpu_model *m, const char *path);

/* Write bytes to path atomically: path.tmp.<pid>, fsync, rename, fsync of the directory. */
MGPU_API mgpu_result mgpu_write_file_atomic(const char *path, const void *data, size_t len);
/* Read a whole file (free with mgpu_free); a NUL byte follows the data (not counted in *len). */
MGPU_API mgpu_result mgpu_read_file(const char *path, void **data, size_t *len);
MGPU_API void *mgpu_malloc(size_t bytes);   /* through the allocator hooks; 64-byte aligned */
MGPU_API void mgpu_free(void *p);

/* Minimal JSON (RFC 8259) DOM for safetensors headers, trainer state and metrics. */
typedef enum mgpu_json_type { MGPU_JSON_NULL, MGPU_JSON_BOOL, MGPU_JSON_NUMBER, MGPU_JSON_STRING, MGPU_JSON_ARRAY, MGPU_JSON_OBJECT } mgpu_json_type;
typedef struct mgpu_json mgpu_json;
struct mgpu_json {
    mgpu_json_type type;
    double number; int boolean;
    char *string;              /* STRING value (NUL-terminated, unescaped) */
    char *key;                 /* member name when inside an OBJECT */
    mgpu_json *child;          /* first element/member */
    mgpu_json *next;           /* next sibling */
    int64_t count;             /* children */
    const char *raw; size_t raw_len; /* source text of a NUMBER, for exact int64 parsing */
};
/* Parses text (len bytes); depth-limited, never reads past len. NULL on error (message names label and offset). */
MGPU_API mgpu_json *mgpu_json_parse(const char *text, size_t len, const char *label);
MGPU_API void mgpu_json_free(mgpu_json *j);
MGPU_API const mgpu_json *mgpu_json_get(const mgpu_json *obj, const char *key);
MGPU_API int mgpu_json_int64(const mgpu_json *j, int64_t *out); /* 1 if j is an integral number fitting int64 */

/* ======================================================================================
   Programs: common options, metrics, progress
   ====================================================================================== */

/* Mixed precision mode (--amp); see the Mixed precision section. */
typedef enum mgpu_amp_mode { MGPU_AMP_OFF = 0, MGPU_AMP_FP16 = 1, MGPU_AMP_BF16 = 2 } mgpu_amp_mode;
/* --device: auto picks a GPU when the CUDA backend is built in and one is visible, else the CPU. */
typedef enum mgpu_device_kind { MGPU_DEVICE_KIND_AUTO = 0, MGPU_DEVICE_KIND_CPU = 1, MGPU_DEVICE_KIND_CUDA = 2 } mgpu_device_kind;
/* --multi-gpu: auto is DDP under a launcher (WORLD_SIZE set); without one, with several visible
   GPUs (or --gpu-ids entries) on a CUDA device, the trainer starts one DDP worker per GPU itself
   (mgpu_trainer_create, see there), and with one it is plain training; none is one process (an
   error under a launcher with WORLD_SIZE > 1); dp is DataParallel over --gpu-ids in this process;
   ddp is DistributedDataParallel and needs a launcher (mgpurun, torchrun-style variables, srun):
   WORLD_SIZE unset is an error, WORLD_SIZE=1 is DDP at world size 1. */
typedef enum mgpu_multi_gpu_mode { MGPU_MULTI_GPU_AUTO = 0, MGPU_MULTI_GPU_NONE = 1, MGPU_MULTI_GPU_DP = 2, MGPU_MULTI_GPU_DDP = 3 } mgpu_multi_gpu_mode;
/* --grad-compression: DDP gradients travel rounded to this format. */
typedef enum mgpu_grad_compression { MGPU_GRAD_COMPRESSION_NONE = 0, MGPU_GRAD_COMPRESSION_FP16 = 1, MGPU_GRAD_COMPRESSION_BF16 = 2 } mgpu_grad_compression;
/* --resume: none, auto (the latest checkpoint in --save-dir), or a path (resume_path). */
typedef enum mgpu_resume_mode { MGPU_RESUME_NONE = 0, MGPU_RESUME_AUTO = 1, MGPU_RESUME_PATH = 2 } mgpu_resume_mode;
/* --cuda-graph: on a GPU, capture the static-shape training step as a CUDA Graph and replay it. */
typedef enum mgpu_cuda_graph_mode { MGPU_CUDA_GRAPH_ON = 0, MGPU_CUDA_GRAPH_OFF = 1 } mgpu_cuda_graph_mode;
#define MGPU_MAX_GPU_IDS 64

/* Every string flag is parsed once, by mgpu_train_opts_parse, into the typed fields below; code
   that fills the struct by hand sets the same fields (text fields are kept by pointer). */
typedef struct mgpu_train_opts {
    const char *data_dir;          /* --data */
    int epochs;                    /* --epochs (alias --num-epochs) */
    int64_t batch_size;            /* --batch-size (per process) */
    float lr;                      /* --lr */
    mgpu_optimizer_type optimizer; /* --optimizer sgd|adam|adamw */
    float weight_decay;            /* --weight-decay */
    float momentum;                /* --momentum */
    float warmup_epochs;           /* --warmup-epochs */
    mgpu_schedule_type schedule;   /* --schedule */
    mgpu_lr_scaling scale_lr;      /* --scale-lr none|linear|sqrt */
    int grad_accum_steps;          /* --grad-accum-steps */
    float clip_grad_norm;          /* --clip-grad-norm (0: off) */
    mgpu_amp_mode amp;             /* --amp off|fp16|bf16 */
    mgpu_device_kind device;       /* --device cpu|cuda|cuda:N|auto */
    int device_index;              /* N of --device cuda:N; -1: plain "cuda" (device 0) */
    int num_gpu_ids;               /* --gpu-ids 0,1,3: how many ids (0: unset) */
    int gpu_ids[MGPU_MAX_GPU_IDS]; /* the ids, in the order given */
    mgpu_multi_gpu_mode multi_gpu; /* --multi-gpu auto|none|dp|ddp */
    int num_workers;               /* --num-workers */
    int eval_frequency;            /* --eval-frequency (epochs) */
    const char *save_dir;          /* --save-dir */
    int checkpoint_every_epochs;   /* --checkpoint-every-epochs */
    float checkpoint_interval_min; /* --checkpoint-interval-min */
    int keep_last;                 /* --keep-last */
    mgpu_resume_mode resume;       /* --resume auto|none|PATH */
    const char *resume_path;       /* PATH of --resume PATH (a step directory or a save directory) */
    int eval_only;                 /* --eval-only: evaluate the resumed (or --init-from) model, train nothing */
    const char *init_from;         /* --init-from FILE.safetensors: initial weights, fresh optimizer */
    uint64_t seed;                 /* --seed */
    const char *metrics;           /* --metrics FILE */
    int log_every;                 /* --log-every (steps) */
    int64_t max_steps;             /* --max-steps (0: no limit) */
    int64_t checkpoint_every_steps;/* --checkpoint-every-steps */
    int help;                      /* --help was given (usage printed) */
    /* restart-schedule extras (--t0-epochs, --t-mult, --eta-min, --step-size-epochs, --gamma) */
    float t0_epochs; int t_mult; float eta_min; float step_size_epochs; float gamma;
    /* DDP (--sync-batchnorm 0|1, --bucket-cap-mb, --grad-compression none|fp16|bf16) */
    int sync_batchnorm; float bucket_cap_mb; mgpu_grad_compression grad_compression;
    mgpu_cuda_graph_mode cuda_graph; /* --cuda-graph on|off (CUDA only; see the trainer's startup line) */
    mgpu_data_on_device data_on_device; /* --data-on-device off|on|auto (CUDA; default auto; the CPU: on is an error) */
    /* the command line mgpu_train_opts_parse read; --multi-gpu auto's self-launch runs it again once
       per GPU (NULL when the struct was filled by hand: then no self-launch) */
    int argc; char **argv;
} mgpu_train_opts;
/* Defaults: epochs 10, batch 128, lr 1e-3, adamw, wd 1e-4, momentum 0.9, schedule constant,
   accum 1, amp off, device auto, multi-gpu auto, workers 0, eval every epoch, keep_last 3,
   resume none, seed 0, metrics $MGPU_METRICS (unset: none), data on device auto. */
MGPU_API void mgpu_train_opts_default(mgpu_train_opts *o);
/* Parses argv (strings are kept by pointer). Every flag is also accepted as --flag=value and with
   underscores (--batch_size); --num-epochs is --epochs. --help prints usage to stdout and sets
   o->help. An unknown flag or a bad value is MGPU_ERR_INVALID_ARG naming the flag (an unknown one
   with "did you mean --x?" when a flag is close), also printed to stderr. */
MGPU_API mgpu_result mgpu_train_opts_parse(mgpu_train_opts *o, int argc, char **argv);
MGPU_API void mgpu_train_opts_usage(FILE *out, const char *program);

/* One JSON line per epoch (rank 0 writes; others pass NULL path). */
typedef struct mgpu_metrics mgpu_metrics;
typedef struct mgpu_epoch_record {
    int64_t epoch, step;
    double train_loss, test_loss, test_accuracy, lr, epoch_time_s, samples_per_s;
    int world_size; int64_t global_batch; const char *amp;
    const char *extra_json;  /* optional: extra members, e.g. "\"data_wait_s\":0.1" */
} mgpu_epoch_record;
MGPU_API mgpu_metrics *mgpu_metrics_open(const char *path);   /* appends */
MGPU_API mgpu_result mgpu_metrics_write_epoch(mgpu_metrics *m, const mgpu_epoch_record *r);
/* {"event":"final", ...extra members} */
MGPU_API mgpu_result mgpu_metrics_write_final(mgpu_metrics *m, const char *extra_json);
MGPU_API void mgpu_metrics_close(mgpu_metrics *m);

/* Progress bar with rate and ETA on a terminal; plain lines every log_every steps otherwise. */
typedef struct mgpu_progress mgpu_progress;
MGPU_API mgpu_progress *mgpu_progress_begin(const char *label, int64_t total, int log_every);
MGPU_API void mgpu_progress_update(mgpu_progress *p, int64_t done, double loss);
MGPU_API void mgpu_progress_end(mgpu_progress *p);

/* Monotonic seconds. */
MGPU_API double mgpu_time_s(void);

/* ======================================================================================
   Mixed precision: autocast and the loss scaler
   ====================================================================================== */

/* mgpu_amp_mode (off|fp16|bf16) is declared with the training options above. */
MGPU_API mgpu_result mgpu_amp_parse(const char *text, mgpu_amp_mode *out);   /* off|fp16|bf16 */
/* Autocast for the ops of this context: matmul, linear, conv2d and attention take their inputs in
   half precision and produce half-precision outputs (accumulating in f32), gradients flowing back
   through them are rounded likewise; reductions, norms, softmax and losses stay f32; parameters
   stay f32 (master weights). On the CPU half values are emulated by rounding f32 storage. */
MGPU_API void mgpu_context_set_autocast(mgpu_context *ctx, mgpu_amp_mode mode);
MGPU_API mgpu_amp_mode mgpu_context_autocast(const mgpu_context *ctx);

/* torch.cuda.amp.GradScaler semantics: scale 65536, x2 after 2000 steps without inf/NaN, x0.5 and
   the optimizer step skipped on inf/NaN. Disabled (scale 1, never skips) for off and bf16. */
typedef struct mgpu_grad_scaler {
    int enabled;
    float scale, growth_factor, backoff_factor;
    int64_t growth_interval, growth_tracker;
    int found_inf, unscaled;
} mgpu_grad_scaler;
MGPU_API void mgpu_grad_scaler_init(mgpu_grad_scaler *s, int enabled);
/* loss * scale (a differentiable op), or loss itself when disabled */
MGPU_API mgpu_tensor *mgpu_grad_scaler_scale(mgpu_context *ctx, mgpu_grad_scaler *s, mgpu_tensor *loss);
/* Divide every gradient by the scale and record whether any is inf/NaN (call before clipping). */
MGPU_API mgpu_result mgpu_grad_scaler_unscale(mgpu_grad_scaler *s, mgpu_model *m);
/* Optimizer step unless inf/NaN was found (unscales first if not yet done); *stepped tells which. */
MGPU_API mgpu_result mgpu_grad_scaler_step(mgpu_grad_scaler *s, mgpu_optimizer *o, mgpu_model *m, int *stepped);
/* Grow or back off the scale; clears the per-step flags. */
MGPU_API void mgpu_grad_scaler_update(mgpu_grad_scaler *s);
/* ======================================================================================
   Checkpoints: DIR/step-00001234/{model,optimizer}.safetensors + trainer_state.json, DIR/latest
   ====================================================================================== */

typedef struct mgpu_checkpoint_desc {
    const char *dir;          /* the --save-dir */
    int keep_last;            /* prune older step-* directories; 0 keeps all */
    int background;           /* write on a background thread after a host snapshot (training goes on);
                                 the snapshot buffer, as large as a checkpoint, is kept for the next save */
} mgpu_checkpoint_desc;
typedef struct mgpu_checkpointer mgpu_checkpointer;
MGPU_API mgpu_checkpointer *mgpu_checkpointer_create(const mgpu_checkpoint_desc *desc);
/* Snapshot model, optimizer state and trainer_state (a JSON object text) for step `step`, then
   write step-%08lld.tmp/, fsync, rename to step-%08lld/, replace `latest` atomically, prune.
   A crash at any moment leaves the previous checkpoint intact. trainer_state must hold
   "format_version": 1 and "step" equal to `step` (NULL: just those two). o may be NULL. Saving a
   step that already exists replaces it. In background mode a failed write is reported by the
   next save, by wait, or (as a warning) by destroy. */
MGPU_API mgpu_result mgpu_checkpointer_save(mgpu_checkpointer *c, int64_t step, const mgpu_model *m,
                                            const mgpu_optimizer *o, const char *trainer_state_json);
/* Wait for a background write to finish; returns its result. */
MGPU_API mgpu_result mgpu_checkpointer_wait(mgpu_checkpointer *c);
MGPU_API void mgpu_checkpointer_destroy(mgpu_checkpointer *c);  /* waits */
/* Path of the checkpoint to resume from: `latest`, else (with a warning) the newest step-* that
   validates. MGPU_ERR_IO when there is none. */
MGPU_API mgpu_result mgpu_checkpoint_find(const char *dir, char *path, size_t size);
/* Fully validates, then loads model (and optimizer, if not NULL) state; *trainer_state receives the
   parsed trainer_state.json (free with mgpu_json_free) when not NULL. Nothing is modified unless
   every file validates. */
MGPU_API mgpu_result mgpu_checkpoint_load(const char *path, mgpu_model *m, mgpu_optimizer *o, mgpu_json **trainer_state);
/* Validate a checkpoint directory without loading it (mgpu-ckpt verify). */
MGPU_API mgpu_result mgpu_checkpoint_verify(const char *path);
/* The files of one checkpoint already in memory: safetensors images and trainer_state.json text. */
typedef struct mgpu_checkpoint_bytes {
    const void *model; size_t model_len;
    const void *optimizer; size_t optimizer_len;
    const char *trainer_state; size_t trainer_state_len;
} mgpu_checkpoint_bytes;
/* mgpu_checkpoint_load's validation and loading on images in memory (tools, fuzzing); label names
   the checkpoint in errors. m NULL (and o NULL): validate only. */
MGPU_API mgpu_result mgpu_checkpoint_load_bytes(const mgpu_checkpoint_bytes *files, const char *label, mgpu_model *m,
                                                mgpu_optimizer *o, mgpu_json **trainer_state);
/* ======================================================================================
   Distributed: environment, communicators (shm, threads, nccl)
   ====================================================================================== */

/* The process's place in a job, read from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
   LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), falling back to SLURM_PROCID/SLURM_NTASKS/
   SLURM_LOCALID and OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK. No variable at all: a single process.
   Unset MASTER_ADDR defaults to the first host of a plain SLURM node list, and to 127.0.0.1 in an
   Open MPI job whose ranks all run on this host (OMPI_COMM_WORLD_LOCAL_SIZE == SIZE). */
typedef struct mgpu_dist_env {
    int rank, world_size, local_rank, local_world_size;
    char master_addr[256]; int master_port;
    const char *source;   /* "torchrun", "slurm", "openmpi" or "single" */
} mgpu_dist_env;
/* A missing, malformed or inconsistent variable (RANK >= WORLD_SIZE, ...) is MGPU_ERR_INVALID_ARG
   naming the variable and what was expected. */
MGPU_API mgpu_result mgpu_dist_env_read(mgpu_dist_env *out);

typedef enum mgpu_comm_backend {
    MGPU_COMM_SHM = 0,      /* processes on one host, POSIX shared memory; CPU tensors (CUDA staged via pinned host) */
    MGPU_COMM_NCCL = 1,     /* CUDA tensors; requires MGPU_CUDA */
    MGPU_COMM_THREADS = 2   /* ranks are threads of one process (DataParallel); see mgpu_comm_create_threads */
} mgpu_comm_backend;
typedef enum mgpu_reduce_op { MGPU_REDUCE_SUM = 0, MGPU_REDUCE_AVG = 1 } mgpu_reduce_op;

typedef struct mgpu_comm_desc {
    mgpu_comm_backend backend;
    const mgpu_dist_env *env;  /* NULL: mgpu_dist_env_read() */
    double timeout_s;          /* every wait is bounded; 0: $MGPU_TIMEOUT_S, else $NCCL_TIMEOUT, else 600 */
    /* nccl: the CUDA device of each local rank (--gpu-ids): local rank i runs on gpu_ids[i], in
       the numbering of the visible devices (CUDA_VISIBLE_DEVICES). NULL / 0: device local_rank. */
    const int *gpu_ids;
    int num_gpu_ids;
} mgpu_comm_desc;
typedef struct mgpu_comm mgpu_comm;
/* Collective over all ranks of the job; rendezvous through a TCP store hosted by rank 0 on
   MASTER_ADDR:MASTER_PORT (bounded by the timeout; an unreachable master is an error, not a hang). */
MGPU_API mgpu_comm *mgpu_comm_create(const mgpu_comm_desc *desc);
/* n communicators of one in-process group (ranks 0..n-1), one per thread, for DataParallel. */
MGPU_API mgpu_result mgpu_comm_create_threads(int n, double timeout_s, mgpu_comm **comms);
/* n nccl communicators of one process (DataParallel on GPUs), rank i on CUDA device devices[i]
   (visible and distinct: NCCL runs one rank per device), made together in one NCCL group from the
   calling thread; each is then driven by a thread of its own. CUDA builds only. */
MGPU_API mgpu_result mgpu_comm_create_nccl_threads(int n, const int *devices, double timeout_s, mgpu_comm **comms);
MGPU_API void mgpu_comm_destroy(mgpu_comm *c);
MGPU_API int mgpu_comm_rank(const mgpu_comm *c);
MGPU_API int mgpu_comm_world_size(const mgpu_comm *c);
MGPU_API int mgpu_comm_local_rank(const mgpu_comm *c);
/* The CUDA device the communicator runs on (nccl; shm once it staged CUDA data), else -1. */
MGPU_API int mgpu_comm_cuda_device(const mgpu_comm *c);
MGPU_API mgpu_comm_backend mgpu_comm_backend_of(const mgpu_comm *c);

/* Blocking collectives on tensors (in place for allreduce/broadcast). Sums are taken in rank order,
   so results are identical on every rank and reproducible bit for bit. */
MGPU_API mgpu_result mgpu_comm_allreduce(mgpu_comm *c, mgpu_tensor *t, mgpu_reduce_op op);
MGPU_API mgpu_result mgpu_comm_broadcast(mgpu_comm *c, mgpu_tensor *t, int root);
/* out holds world_size * in->numel elements, rank r's block at r * in->numel. */
MGPU_API mgpu_result mgpu_comm_allgather(mgpu_comm *c, const mgpu_tensor *in, mgpu_tensor *out);
/* in holds world_size * out->numel elements; out gets the reduction of block `rank`. */
MGPU_API mgpu_result mgpu_comm_reduce_scatter(mgpu_comm *c, const mgpu_tensor *in, mgpu_tensor *out, mgpu_reduce_op op);
MGPU_API mgpu_result mgpu_comm_barrier(mgpu_comm *c);
/* Raw buffers (SyncBatchNorm statistics), host memory or, in a CUDA build, device memory: the
   collective then runs after all work queued on that device (any stream: the producer is unknown). */
MGPU_API mgpu_result mgpu_comm_allreduce_f32(mgpu_comm *c, float *data, int64_t n, mgpu_reduce_op op);
MGPU_API mgpu_result mgpu_comm_allreduce_f64(mgpu_comm *c, double *data, int64_t n, mgpu_reduce_op op);
/* Every rank contributes `bytes` bytes; out receives world_size * bytes (rank order). */
MGPU_API mgpu_result mgpu_comm_allgather_bytes(mgpu_comm *c, const void *in, size_t bytes, void *out);

/* Asynchronous all-reduce of a float buffer (host memory, or device memory as above), run by the
   communicator's progress thread in the order issued (all ranks must issue the same sequence).
   Wait returns its result and frees it. */
typedef struct mgpu_comm_work mgpu_comm_work;
MGPU_API mgpu_comm_work *mgpu_comm_allreduce_f32_async(mgpu_comm *c, float *data, int64_t n, mgpu_reduce_op op);
MGPU_API int mgpu_comm_work_done(const mgpu_comm_work *w);
MGPU_API mgpu_result mgpu_comm_wait(mgpu_comm_work *w);

/* ======================================================================================
   DistributedDataParallel and DataParallel
   ====================================================================================== */

typedef struct mgpu_ddp_desc {
    double bucket_cap_mb;        /* 0: 25 */
    double first_bucket_mb;      /* 0: 1 */
    mgpu_dtype compress;         /* MGPU_F32 (0): none; MGPU_F16 or MGPU_BF16: gradients travel rounded */
    int sync_batchnorm;          /* turn every BatchNorm2d of the model into SyncBatchNorm */
} mgpu_ddp_desc;
typedef struct mgpu_ddp mgpu_ddp;
typedef struct mgpu_ddp_stats {
    int64_t buckets, allreduces;          /* bucket count; all-reduces issued so far */
    double comm_s;                        /* seconds the progress thread spent communicating */
    double exposed_s;                     /* seconds backward's end waited for communication */
    double bytes_per_step;                /* gradient bytes all-reduced per synced step */
} mgpu_ddp_stats;
/* Broadcasts parameters and buffers from rank 0, checks names and shapes across ranks (a mismatch
   names the tensor and ranks), builds buckets in reverse registration order and installs grad-ready
   hooks: each bucket is all-reduced (averaged) asynchronously as soon as its last gradient is ready,
   and the end of mgpu_backward waits for all of them, so after backward the grads are synchronised. */
MGPU_API mgpu_ddp *mgpu_ddp_create(mgpu_model *m, mgpu_comm *c, const mgpu_ddp_desc *desc);
MGPU_API void mgpu_ddp_destroy(mgpu_ddp *d);
/* no_sync: while off, backward accumulates locally without communication (accumulation micro-steps). */
MGPU_API void mgpu_ddp_set_sync(mgpu_ddp *d, int sync);
MGPU_API void mgpu_ddp_get_stats(const mgpu_ddp *d, mgpu_ddp_stats *out);
/* Bucket b (0 = the first all-reduced: the last-registered parameters) and what it did in the last
   synced backward, on the mgpu_time_s() clock. For tests and profiling (overlap of communication
   with backward). Invalid d or b: MGPU_ERR_INVALID_ARG. */
typedef struct mgpu_ddp_bucket_info {
    int n_params;
    const int *params;          /* indices into the model's parameter list, in bucket order (owned by d) */
    int64_t numel;              /* gradient elements */
    int64_t hook_calls;         /* grad-ready hooks of its parameters that fired in that backward */
    double launch_s;            /* when its all-reduce was issued */
    double done_s;              /* when it was first seen complete */
    double backward_end_s;      /* when backward's end hook started (the same for every bucket) */
    int done_before_end;        /* complete before the end hook started waiting */
} mgpu_ddp_bucket_info;
MGPU_API mgpu_result mgpu_ddp_get_bucket(const mgpu_ddp *d, int b, mgpu_ddp_bucket_info *out);

/* DataParallel in one process: runs replica_main(rank, comm, arg) for ranks 0..n_replicas-1, rank 0
   on the calling thread and the others on threads of their own, each with its rank of one `threads`
   communicator (timeout $MGPU_TIMEOUT_S, else $NCCL_TIMEOUT, else 600 s). A replica creates its own context (one per
   thread; give each num_threads = cores / n_replicas) and model, wraps it with mgpu_ddp_create and
   trains its shard (loader rank = rank, world_size = n_replicas). Returns MGPU_OK, or the result of
   the lowest failing rank with its message in mgpu_last_error(). A replica that fails while others
   wait in a collective ends them through the communicator's timeout. */
typedef mgpu_result (*mgpu_dp_replica_fn)(int rank, mgpu_comm *comm, void *arg);
MGPU_API mgpu_result mgpu_dp_run(int n_replicas, mgpu_dp_replica_fn replica_main, void *arg);
/* The same on GPUs: replica i's communicator is an in-process nccl one on cuda_devices[i]
   (mgpu_comm_create_nccl_threads), so gradients are all-reduced device to device; the replica puts
   its context on that device. cuda_devices NULL: mgpu_dp_run. */
MGPU_API mgpu_result mgpu_dp_run_devices(int n_replicas, const int *cuda_devices, mgpu_dp_replica_fn replica_main, void *arg);
/* CUDA declarations: C declarations of the CUDA launchers (mgpu_kernels.cu) and of the host-side
   CUDA support (section "CUDA host side" below). Plain C types only (streams and handles are void *), so this header
   needs no CUDA include. Every launcher works on raw device pointers with explicit sizes, queues
   its work on `stream` (NULL: the legacy default stream), never synchronises unless it says so,
   and returns MGPU_OK or an error whose message names the failing CUDA/cuBLAS call.
   Gradient launchers ACCUMULATE (+=) into their outputs, as the CPU backward functions do. */
/* ======================================================================================
   CUDA host side (only with MGPU_CUDA): device memory, pinned buffers, streams, graphs
   ====================================================================================== */
#ifdef MGPU_CUDA
typedef struct mgpu_memory_stats { int64_t allocated, reserved, peak; } mgpu_memory_stats;
MGPU_API mgpu_result mgpu_memory_stats_get(int device, mgpu_memory_stats *out);
/* Caching allocator: sizes rounded to classes, freed blocks kept for reuse on the same device;
   cudaMalloc only on a miss, cudaFree only in mgpu_cuda_empty_cache. */
MGPU_API void *mgpu_cuda_malloc(int device, size_t bytes);
MGPU_API void mgpu_cuda_free(int device, void *ptr);
MGPU_API mgpu_result mgpu_cuda_empty_cache(int device);
/* Page-locked host memory for async copies. */
MGPU_API void *mgpu_cuda_host_alloc(size_t bytes);
MGPU_API void mgpu_cuda_host_free(void *ptr);
MGPU_API mgpu_result mgpu_cuda_copy_h2d_async(void *dst, const void *src, size_t bytes, void *stream);
MGPU_API mgpu_result mgpu_cuda_copy_d2h_async(void *dst, const void *src, size_t bytes, void *stream);
MGPU_API mgpu_result mgpu_cuda_copy_d2d_async(void *dst, const void *src, size_t bytes, void *stream);
/* Per-device resources of a context: stream (non-blocking), blas (mgpu_cuda_blas_create). */
typedef struct mgpu_cuda_device_ctx { int device; void *stream; void *blas; } mgpu_cuda_device_ctx;
MGPU_API mgpu_result mgpu_cuda_device_ctx_init(mgpu_cuda_device_ctx *d, int device);
MGPU_API void mgpu_cuda_device_ctx_release(mgpu_cuda_device_ctx *d);
/* CUDA Graphs: capture the work queued on `stream` between begin and end, then replay it. */
typedef struct mgpu_cuda_graph { void *graph, *exec; int captured; } mgpu_cuda_graph;
MGPU_API mgpu_result mgpu_cuda_graph_begin(mgpu_cuda_graph *g, void *stream);
MGPU_API mgpu_result mgpu_cuda_graph_end(mgpu_cuda_graph *g, void *stream);
MGPU_API mgpu_result mgpu_cuda_graph_launch(mgpu_cuda_graph *g, void *stream);
MGPU_API void mgpu_cuda_graph_destroy(mgpu_cuda_graph *g);


#endif /* MGPU_CUDA */

/* ======================================================================================
   Trainer: the training loop every example shares, composed from the options
   ====================================================================================== */

/* Builds logits (B, classes) from a batch x; the trainer adds the cross-entropy loss. */
typedef mgpu_tensor *(*mgpu_forward_fn)(mgpu_context *ctx, mgpu_tensor *x, void *user);
typedef struct mgpu_trainer mgpu_trainer;
typedef struct mgpu_train_summary {
    double final_train_loss, final_test_loss, final_test_accuracy;
    double samples_per_s;          /* training samples per second over the run (per process) */
    int64_t steps;                 /* optimizer steps taken */
    int stop_signal;               /* SIGINT, SIGTERM or SIGUSR1 when one stopped the run early (checkpoint saved); 0 otherwise */
} mgpu_train_summary;
/* Creates the context from opts (device, seed, threads). opts is kept by pointer. Under a launcher
   each rank's GPU is its entry of --gpu-ids, else its LOCAL_RANK (unless --device cuda:N names one).
   Self-launch: with --multi-gpu auto, a CUDA device, no launcher (no WORLD_SIZE) and several GPUs
   to use (the --gpu-ids entries, else every visible device), this call does not return: the process
   runs opts->argv once per GPU as DDP workers (mgpu_worker_group_run: only rank 0's stdout is
   shown, the failure of one stops all) and exits with the group's code. */
MGPU_API mgpu_trainer *mgpu_trainer_create(const mgpu_train_opts *opts);
MGPU_API mgpu_context *mgpu_trainer_context(const mgpu_trainer *t);
/* This process's rank (0 without a launcher): only rank 0 should print a run's results. */
MGPU_API int mgpu_trainer_rank(const mgpu_trainer *t);
/* Train `model` (built on mgpu_trainer_context) with cross-entropy on train, evaluating on test
   (may be NULL) every --eval-frequency epochs and after the last; optimizer, LR schedule and
   scaling, gradient accumulation, clipping, metrics JSONL, progress and --save-dir/model.safetensors
   all come from the options. SIGINT, SIGTERM and SIGUSR1 (with --save-dir) save a checkpoint after
   the current step and return MGPU_OK; the end of a run saves a last checkpoint too, so
   --resume auto after it trains nothing ("already finished"). --init-from loads weights before
   the first step; --eval-only evaluates test (the resumed or loaded model) and trains nothing. */
MGPU_API mgpu_result mgpu_trainer_fit(mgpu_trainer *t, mgpu_model *model, mgpu_forward_fn forward, void *user,
                                      const mgpu_dataset *train, const mgpu_dataset *test, mgpu_train_summary *summary);
/* Builds the layers of a model into `user` (user_size bytes, zeroed, owned by the trainer) and
   returns 1, or 0 on failure. Called once per replica, so DataParallel can build several. */
typedef int (*mgpu_build_fn)(mgpu_model *model, void *user);
/* Builds the model with `build` and trains it as mgpu_trainer_fit does; with --multi-gpu dp it
   builds one replica per entry of --gpu-ids, each on its own thread and context, kept in sync by
   an in-process gradient all-reduce (DDP over threads), each replica taking --batch-size samples. */
MGPU_API mgpu_result mgpu_trainer_run(mgpu_trainer *t, mgpu_build_fn build, size_t user_size, mgpu_forward_fn forward,
                                      const mgpu_dataset *train, const mgpu_dataset *test, mgpu_train_summary *summary);
/* Mean cross-entropy and accuracy of the model on a dataset (eval mode, no grad). */
MGPU_API mgpu_result mgpu_evaluate(mgpu_context *ctx, mgpu_model *model, mgpu_forward_fn forward, void *user,
                                   const mgpu_dataset *ds, int64_t batch_size, double *loss, double *accuracy);
MGPU_API void mgpu_trainer_destroy(mgpu_trainer *t);

#ifdef __cplusplus
}
#endif
#endif /* MGPU_H */


/* ======================================================================================
   Processes and sweeps: child processes for supervisors (mgpurun, mgpu-sweep), and many
   independent runs (a grid x seeds) spread over device slots, resumable from a results file
   ====================================================================================== */
#ifndef MGPU_SWEEP_H
#define MGPU_SWEEP_H
#ifdef __cplusplus
extern "C" {
#endif

/* ---- processes (POSIX) ---- */

MGPU_API const char *mgpu_signal_name(int sig);                         /* "SIGKILL"; "unknown signal" */
/* A waitpid status in words: "exited with code 3", "was killed by signal 9 (SIGKILL)". */
MGPU_API void mgpu_wait_status_describe(int status, char *buf, size_t size);
MGPU_API int mgpu_wait_status_code(int status);                         /* exit code, or 128 + signal (the shell's) */
MGPU_API int mgpu_cpu_count(void);                                      /* cores this process may run on, >= 1 */
MGPU_API mgpu_result mgpu_make_dirs(const char *path);                  /* mkdir -p; an existing non-directory fails */
MGPU_API int mgpu_program_exists(const char *program);                  /* 1 if execvp would find it (PATH lookup) */
/* The last max_lines lines of path written after byte offset `from`, into buf (NUL-terminated, no
   final newline; older lines dropped to fit). Returns the length, 0 for an empty or unreadable file. */
MGPU_API size_t mgpu_file_tail(const char *path, int64_t from, int max_lines, char *buf, size_t size);

/* A child in a process group of its own (pid = group id, so mgpu_kill_group reaches whatever it
   spawns), stdin from /dev/null, and on Linux killed with the calling thread (PR_SET_PDEATHSIG),
   even when that is SIGKILLed: a supervisor that dies leaves no orphan. Signals are blocked across
   fork and the child resets caught ones before exec, so a signal meant for the parent never runs
   the parent's handler in the child; ignored signals stay ignored (nohup), except SIGPIPE. */
typedef struct mgpu_spawn_desc {
    char *const *argv;          /* NULL-terminated; argv[0] is looked up in PATH */
    const char *const *env;     /* "NAME=value" to set, "NAME" to unset, NULL-terminated; the rest is inherited */
    int stdout_fd, stderr_fd;   /* where the child's output goes; 0: inherited */
    const char *label;          /* starts the exec failure message, "LABEL: cannot run PROG: why" (NULL: "mgpu") */
} mgpu_spawn_desc;
MGPU_API mgpu_result mgpu_spawn(const mgpu_spawn_desc *desc, int *pid);
MGPU_API int mgpu_kill_group(int pid, int sig);                         /* kill(-pid, sig): the child's whole group; 0 or -1 */
/* The self-pipe trick for a poll loop: each listed signal writes its number as one byte to the
   returned read end (non-blocking, close-on-exec). SIGHUP stays ignored if it is (nohup), and
   SIGPIPE is ignored so a closed terminal cannot kill a supervisor. Process-wide: one pipe at a
   time; mgpu_signal_pipe_close restores the previous handlers. -1 on failure. */
MGPU_API int mgpu_signal_pipe_open(const int *signals, int n);
MGPU_API void mgpu_signal_pipe_close(void);
/* A TCP port nothing listens on now (bound to port 0 on addr, then released), or -1 with an
   error. Another process could take it before it is used: torchrun's window, no more. */
MGPU_API int mgpu_pick_free_port(const char *addr);
/* A supervisor's group of workers and how it stops (mgpurun's loop and the trainer's self-launch
   share it). The caller spawns the workers (mgpu_spawn) and sets w[i].pid and w[i].running = 1; in
   its loop mgpu_proc_group_reap collects the workers that ended (the first failure, a non-zero exit
   or a signal, stops the others: SIGTERM to every worker's process group, SIGKILL grace_s later),
   mgpu_proc_group_on_signal takes a signal the supervisor got (forwarded to the workers; a second
   one while stopping kills at once; SIGCHLD is ignored), mgpu_proc_group_tick sends the SIGKILL
   when due, and a poll should wait at most mgpu_proc_group_timeout_ms(g, idle_ms). Messages go to
   stderr as "LABEL: rank 1 exited with code 3 [pid P]; stopping the other 3 workers ...". */
typedef struct mgpu_proc { int rank, pid, running, status; } mgpu_proc;   /* status: waitpid's, once ended */
typedef struct mgpu_proc_group {
    mgpu_proc *w; int n;
    const char *label;     /* starts every message (NULL: "mgpu") */
    double grace_s;        /* SIGTERM -> SIGKILL */
    int stopping, killed;
    double kill_at;        /* when the stop turns into SIGKILL */
    int failed;            /* index of the first worker that failed, -1 if none */
    int interrupt_sig;     /* the signal that stopped the supervisor, 0 if none */
} mgpu_proc_group;
/* w[i].rank = i (change it for ranks of other nodes), nothing started */
MGPU_API void mgpu_proc_group_init(mgpu_proc_group *g, mgpu_proc *w, int n, const char *label, double grace_s);
MGPU_API int mgpu_proc_group_running(const mgpu_proc_group *g);
MGPU_API void mgpu_proc_group_signal(mgpu_proc_group *g, int sig);   /* to every worker's process group */
MGPU_API void mgpu_proc_group_stop(mgpu_proc_group *g, int sig);     /* signal now, SIGKILL after grace_s */
MGPU_API void mgpu_proc_group_reap(mgpu_proc_group *g);
MGPU_API void mgpu_proc_group_on_signal(mgpu_proc_group *g, int sig);
MGPU_API int mgpu_proc_group_timeout_ms(const mgpu_proc_group *g, int idle_ms);   /* idle_ms -1: none */
MGPU_API void mgpu_proc_group_tick(mgpu_proc_group *g);
/* A local group of n workers run to their end, as torch.multiprocessing.spawn does: worker i runs
   argv with torchrun's variables (RANK = LOCAL_RANK = i, WORLD_SIZE = LOCAL_WORLD_SIZE = n,
   MASTER_ADDR 127.0.0.1, MASTER_PORT a free port) and MGPU_NUM_THREADS = cores / n unless set.
   The first worker to fail (non-zero exit or a signal) stops the others (SIGTERM, SIGKILL after
   grace_s), SIGINT/SIGTERM/SIGHUP to the caller are forwarded, and every worker's process group is
   killed at the end (and dies with the caller, mgpu_spawn): nothing is left behind. Messages go to
   stderr as "LABEL: rank 1 was killed by signal 9 (SIGKILL) ...". Returns the caller's exit code:
   0; the first failing worker's (128 + signal when killed); 128 + signal when the caller itself
   was stopped; -1 with an error when the workers could not start. */
typedef struct mgpu_worker_group_desc {
    char *const *argv;          /* NULL-terminated; argv[0] is looked up in PATH */
    int n;                      /* workers, >= 1 */
    const char *label;          /* starts every message (NULL: "mgpu") */
    double grace_s;             /* SIGTERM -> SIGKILL; 0: 5 s */
    int rank0_stdout_only;      /* other ranks' stdout goes to /dev/null (every rank's stderr is kept) */
} mgpu_worker_group_desc;
MGPU_API int mgpu_worker_group_run(const mgpu_worker_group_desc *desc);

/* ---- GPUs, found without the CUDA runtime (so a CPU build of a supervisor can place runs) ---- */

typedef struct mgpu_gpu_info {
    char id[64];                /* the CUDA_VISIBLE_DEVICES value that selects it: "0", "GPU-<uuid>" */
    char name[96];              /* "NVIDIA H200"; "" when the source does not say */
    int64_t memory_mib;         /* 0 when the source does not say */
} mgpu_gpu_info;
/* Where mgpu_find_gpus looks; NULL for all the defaults (tests and unusual installs name others). */
typedef struct mgpu_gpu_sources {
    const char *nvidia_smi;     /* the program; NULL: "nvidia-smi" in PATH; "": not asked */
    const char *proc_dir;       /* NULL: "/proc/driver/nvidia/gpus"; "": not read */
    int ignore_visible_devices; /* 1: CUDA_VISIBLE_DEVICES is not consulted */
    double timeout_s;           /* each nvidia-smi call; 0: 30 */
} mgpu_gpu_sources;
/* The GPUs this process may use, from the first source that answers:
     1. CUDA_VISIBLE_DEVICES when it is set: its entries as written, up to the first that CUDA
        would not take either (not an index >= 0 nor a GPU-/MIG- UUID: "-1" hides every GPU);
        set but empty is no GPU;
     2. `nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader`;
     3. `nvidia-smi -L`;
     4. the entries of /proc/driver/nvidia/gpus (one per PCI device), numbered 0.. in bus order.
   Indices are nvidia-smi's, which are in PCI bus order: CUDA numbers devices the same way only
   under CUDA_DEVICE_ORDER=PCI_BUS_ID (which mgpu_sweep_run gives its GPU runs). Fills at most max
   entries and returns how many it filled; `how` (may be NULL) says where they came from, or why
   none was found ("nvidia-smi: not found in PATH; /proc/driver/nvidia/gpus: absent"). -1 and
   MGPU_ERR_INVALID_ARG for bad arguments. */
MGPU_API int mgpu_find_gpus(const mgpu_gpu_sources *where, mgpu_gpu_info *gpus, int max, char *how, size_t how_size);

/* ---- the grid ---- */

/* Axes named like C identifiers (letters, digits, _), each with a list of values; a point takes one
   value per axis. Points are numbered 0 .. size-1 with the first axis varying slowest. */
typedef struct mgpu_sweep_grid mgpu_sweep_grid;
MGPU_API mgpu_sweep_grid *mgpu_sweep_grid_create(void);
MGPU_API void mgpu_sweep_grid_destroy(mgpu_sweep_grid *g);
/* Adds an axis from "name=v1,v2,..."; an item lo..hi (integers) expands to lo, lo+1, ..., hi, and
   lo..hi:step to every step-th. A missing '=', a bad or reserved name, a repeated name or value, an
   empty value or a bad range is MGPU_ERR_INVALID_ARG quoting the spec. */
MGPU_API mgpu_result mgpu_sweep_grid_add(mgpu_sweep_grid *g, const char *spec);
MGPU_API int mgpu_sweep_grid_axes(const mgpu_sweep_grid *g);
MGPU_API const char *mgpu_sweep_grid_name(const mgpu_sweep_grid *g, int axis);
MGPU_API int mgpu_sweep_grid_count(const mgpu_sweep_grid *g, int axis);            /* values on the axis */
MGPU_API const char *mgpu_sweep_grid_value(const mgpu_sweep_grid *g, int axis, int i);
MGPU_API int64_t mgpu_sweep_grid_size(const mgpu_sweep_grid *g);                  /* points (0 without axes) */
/* values[a] = the value of axis a at point `index` (pointers into the grid). */
MGPU_API mgpu_result mgpu_sweep_grid_point(const mgpu_sweep_grid *g, int64_t index, const char **values);

/* ---- templates and run ids ---- */

/* Replaces every {name} of tmpl by its value ({{ and }} stand for braces; braces around anything
   that is not a name stay as they are). An unknown {name} is an error (NULL, MGPU_ERR_INVALID_ARG)
   that lists the known names. Free the result with mgpu_free. */
MGPU_API char *mgpu_sweep_substitute(const char *tmpl, int n, const char *const *names, const char *const *values);
/* A run's id from its grid values, usable as a file name: "seed=3,alpha=0.1" (bytes other than
   [A-Za-z0-9._+-] in values as %XX; ids over 120 characters shortened with a hash). */
MGPU_API mgpu_result mgpu_sweep_run_id(int n, const char *const *names, const char *const *values, char *buf, size_t size);

/* ---- the results file: one JSON object per finished run ----
   {"run_id":"seed=3,alpha=0.1","params":{"seed":3,"alpha":0.1},"status":"ok"|"failed"|"interrupted",
    "exit_code":0,"signal":null,"error":null,"attempts":1,"wall_s":12.3,"slot":0,"devices":"0",
    "started_at":"2026-01-01T12:00:00Z","log":"...","metrics":"...","final":{the run's "event":"final"
    metrics line}|null} plus "log_tail" for a failure. Params that read as JSON numbers are numbers. */
typedef struct mgpu_sweep_results mgpu_sweep_results;
/* A missing file is an empty result set; lines that are not JSON objects with a "params" object
   (a torn last line after a crash) are skipped with a warning. */
MGPU_API mgpu_sweep_results *mgpu_sweep_results_load(const char *path);
MGPU_API void mgpu_sweep_results_destroy(mgpu_sweep_results *r);
MGPU_API int64_t mgpu_sweep_results_count(const mgpu_sweep_results *r);
MGPU_API const mgpu_json *mgpu_sweep_results_get(const mgpu_sweep_results *r, int64_t i);
/* The last record whose params are exactly these names and values, or NULL. */
MGPU_API const mgpu_json *mgpu_sweep_results_find(const mgpu_sweep_results *r, int n, const char *const *names,
                                                  const char *const *values);
/* A param's value as text (numbers as written), NULL if absent. */
MGPU_API const char *mgpu_sweep_record_param(const mgpu_json *record, const char *name, char *buf, size_t size);
/* A metric of a record: a top-level number ("wall_s"), "final.NAME" or "final_NAME" (NAME in the
   final metrics line). 1 if found and finite. */
MGPU_API int mgpu_sweep_record_metric(const mgpu_json *record, const char *name, double *value);
/* Appends text plus a newline to path with one write() on an O_APPEND descriptor, then fsync: lines
   of concurrent writers never interleave and a crash leaves at most a torn last line. */
MGPU_API mgpu_result mgpu_append_line(const char *path, const char *text);

/* ---- summary: mean +- sample std and n of metrics per configuration ---- */

typedef enum mgpu_sweep_format { MGPU_SWEEP_TABLE = 0, MGPU_SWEEP_CSV, MGPU_SWEEP_MARKDOWN } mgpu_sweep_format;
typedef struct mgpu_sweep_summary_desc {
    const char *const *by; int n_by;              /* group by these params (0: one group of all) */
    const char *const *metrics; int n_metrics;    /* 0: every number of the final metrics lines */
    mgpu_sweep_format format;
} mgpu_sweep_summary_desc;
/* Only runs whose latest record is "ok" count (one per run id). Groups are sorted by their values
   (numerically where both are numbers); CSV has NAME_mean, NAME_std, NAME_n columns. */
MGPU_API mgpu_result mgpu_sweep_summary_print(const mgpu_sweep_results *r, const mgpu_sweep_summary_desc *desc, FILE *out);

/* ---- the scheduler ---- */

typedef enum mgpu_sweep_status { MGPU_SWEEP_OK = 0, MGPU_SWEEP_FAILED, MGPU_SWEEP_INTERRUPTED } mgpu_sweep_status;
/* One run, as the callbacks see it. */
typedef struct mgpu_sweep_run_info {
    int64_t index;                 /* grid point */
    const char *id;                /* mgpu_sweep_run_id */
    const char *const *values;     /* one per grid axis */
    int slot;
    const char *devices;           /* the slot's CUDA_VISIBLE_DEVICES ("" on a CPU slot) */
    int attempt;                   /* 1, then 2.. for --retries */
    int pid;
    const char *log_path, *metrics_path;
    /* on_finish only */
    mgpu_sweep_status status;
    int exit_code;                 /* -1 when killed by a signal */
    int signal;                    /* 0 unless killed by a signal */
    double wall_s;
    const char *record;            /* the JSON line appended to the results file (NULL before a retry) */
} mgpu_sweep_run_info;
typedef struct mgpu_sweep_desc {
    const mgpu_sweep_grid *grid;
    const char *const *command;    /* argv template, NULL-terminated: {axis} and the built-ins {metrics},
                                      {log}, {run_id}, {run_dir} (created when used), {slot}, {attempt} */
    const char *results;           /* JSONL results file (created; locked against a second sweep) */
    const char *run_dir;           /* logs and metrics files; NULL: the results path minus ".jsonl", plus ".d" */
    int cpu_slots;                 /* slots with CUDA_VISIBLE_DEVICES="" */
    const char *const *gpus; int n_gpus; /* one CUDA_VISIBLE_DEVICES value per GPU (mgpu_find_gpus's ids);
                                      its runs also get CUDA_DEVICE_ORDER=PCI_BUS_ID unless that is set */
    int slots_per_gpu;             /* 0: 1 */
    int retries;                   /* reruns of a failed run before it is recorded failed */
    int rerun_failed;              /* runs recorded failed run again (else they count as finished) */
    double run_timeout_s;          /* 0: none; a run over it is stopped and recorded failed */
    double grace_s;                /* SIGTERM -> SIGKILL when stopping runs; 0: 5 */
    int tail_lines;                /* log lines kept for a failure; 0: 20 */
    int num_threads;               /* MGPU_NUM_THREADS of each run; 0: inherited if set, else cores / slots */
    int dry_run;                   /* print the commands of the runs left, run nothing */
    int quiet;                     /* no progress output (callbacks still run) */
    int no_signal_handlers;        /* leave SIGINT/SIGTERM/SIGHUP alone (the caller stops nothing then) */
    void (*on_start)(const mgpu_sweep_run_info *run, void *user);
    void (*on_finish)(const mgpu_sweep_run_info *run, void *user);
    void *user;
} mgpu_sweep_desc;
typedef struct mgpu_sweep_stats {
    int64_t total;                 /* grid points */
    int64_t skipped;               /* already finished in the results file */
    int64_t skipped_failed;        /* of those, recorded "failed" (not rerun without rerun_failed) */
    int64_t ok, failed, interrupted; /* recorded by this call */
    int stop_signal;               /* the signal that stopped the sweep, 0 if none */
} mgpu_sweep_stats;
/* Runs every grid point not yet finished in desc->results, one process per slot, appending one
   record per run. Failures are recorded and never stop the sweep; SIGINT/SIGTERM/SIGHUP stop the
   runs in flight (SIGTERM to their groups, SIGKILL after grace_s; a second signal kills at once)
   and record them "interrupted", to run again on resume. Returns MGPU_OK when the loop ran (see
   stats), or an error before any run started: a bad template, an unwritable results file or run
   directory, no slots, or another sweep holding the lock. Call from a single-threaded process
   (the children are tied to the calling thread's life). */
MGPU_API mgpu_result mgpu_sweep_run(const mgpu_sweep_desc *desc, mgpu_sweep_stats *stats);

#ifdef __cplusplus
}
#endif
#endif /* MGPU_SWEEP_H */

/* ======================================================================================
   Internal: the seam between the CPU and CUDA twins of every op
   ======================================================================================
   Not part of the public API. Each op's device-independent front (validate, shapes, allocate,
   record the tape node) fills one argument struct and calls one twin: mgpu__cpu_<op> in this
   header (the specification) or mgpu_cuda_<op> in mgpu_kernels.cu. Both files see this block:
   the implementation through MGPU_IMPLEMENTATION, mgpu_kernels.cu by defining MGPU__INTERNAL. */
#if (defined(MGPU_IMPLEMENTATION) || defined(MGPU__INTERNAL)) && !defined(MGPU__INTERNAL_H)
#define MGPU__INTERNAL_H
#ifdef __cplusplus
extern "C" {
#endif

/* Number of visible CUDA devices; 0 when there is no device or no driver (cudaErrorNoDevice,
   cudaErrorInsufficientDriver, a stub driver); any other CUDA failure is a negative mgpu_result with
   the error recorded (mgpu_last_error). Defined in mgpu_kernels.cu. */
int mgpu__cuda_device_count(void);

/* Each op's twins share one argument struct below, named mgpu__<stem>_args; the CPU twin is
   `static void mgpu__cpu_<stem>(const mgpu__<stem>_args *)` in the implementation and the CUDA twin
   `mgpu_result mgpu_cuda_<stem>(const mgpu__<stem>_args *, void *stream)` in mgpu_kernels.cu.
   Fronts call them through MGPU__TWIN(ctx, stem, &args) (section "The device seam").
   The launcher declarations need no CUDA header, so they are visible in every build. */

/* ---- error bridge: kernels report through the library's thread-local error ---- */
void mgpu__set_error_from_cuda(int code, const char *msg);

/* ---- elementwise ---- */
/* unary (n): forward out = f(x); backward out += dy * f'(x), where tanh and sigmoid read y, the
   forward output; param is ELU's alpha or the scalar of scale/add_scalar */
typedef enum mgpu__unary_kind {
    MGPU__UN_RELU, MGPU__UN_GELU, MGPU__UN_GELU_TANH, MGPU__UN_ELU, MGPU__UN_TANH, MGPU__UN_SIGMOID,
    MGPU__UN_SCALE, MGPU__UN_ADD_SCALAR
} mgpu__unary_kind;
typedef struct mgpu__unary_args {
    mgpu_context *ctx;                    /* the CPU twin's thread pool; the CUDA twin ignores it */
    mgpu__unary_kind kind; float param;
    const float *x, *y, *dy; float *out;
    int64_t n;
} mgpu__unary_args;
mgpu_result mgpu_cuda_unary_forward(const mgpu__unary_args *a, void *stream);
mgpu_result mgpu_cuda_unary_backward(const mgpu__unary_args *a, void *stream);

/* binary (NumPy broadcasting, right-aligned; bias_add is this op): forward out = a op b, a and b
   read through their strides against out's shape (0 where broadcast); backward da += the sum of
   dy * d out/d a over a's broadcast dims in a fixed order (likewise db); da or db may be NULL */
typedef enum mgpu__binary_kind { MGPU__BIN_ADD, MGPU__BIN_SUB, MGPU__BIN_MUL } mgpu__binary_kind;
typedef struct mgpu__bcast {
    int ndim;
    int64_t shape[MGPU_MAX_DIMS], a_stride[MGPU_MAX_DIMS], b_stride[MGPU_MAX_DIMS];
    int64_t numel, a_numel, b_numel;
} mgpu__bcast;
typedef struct mgpu__binary_args {
    mgpu_context *ctx;                    /* the CPU twin's thread pool; the CUDA twin ignores it */
    mgpu__binary_kind kind;
    mgpu__bcast g;
    const float *a, *b, *dy; float *out, *da, *db;
} mgpu__binary_args;
mgpu_result mgpu_cuda_binary_forward(const mgpu__binary_args *args, void *stream);
mgpu_result mgpu_cuda_binary_backward(const mgpu__binary_args *args, void *stream);

/* accumulate (n): out += x (the backward of views and casts) */
typedef struct mgpu__accumulate_args {
    mgpu_context *ctx;
    const float *x; float *out;
    int64_t n;
} mgpu__accumulate_args;
mgpu_result mgpu_cuda_accumulate(const mgpu__accumulate_args *a, void *stream);

/* ---- softmax family: x seen as (outer, dim, inner), normalised along dim ----
   forward out = softmax(x) (log: log_softmax); backward out += softmax'(y) dy, y the forward output */
typedef struct mgpu__softmax_args {
    mgpu_context *ctx;
    int log;
    const float *x, *y, *dy; float *out;
    int64_t outer, dim, inner;
} mgpu__softmax_args;
mgpu_result mgpu_cuda_softmax_forward(const mgpu__softmax_args *a, void *stream);
mgpu_result mgpu_cuda_softmax_backward(const mgpu__softmax_args *a, void *stream);

/* ---- classification losses, cross_entropy (x: logits, log-softmax fused in) and nll (x:
   log-probabilities): x (n, c), target (n) I32 or I64 (target_i64), -100 ignored; the front
   rejects other targets outside [0, c) (the CUDA twins would give NaN). Scalars live on the device.
   n or c may be 0 (c = 0: every target is -100).
   forward: loss[0] = mean over counted rows of lse - x[t] (nll: -x[t]), NaN when none is counted,
   valid[0] = counted rows,
   lse (n) kept for backward (cross_entropy only); backward: dx += dloss[0] / valid[0] * (softmax(x) - onehot(t))
   (nll: -onehot(t)) ---- */
typedef struct mgpu__class_loss_args {
    mgpu_context *ctx;
    const float *x; const void *target; int target_i64;
    int64_t n, c;
    float *lse, *loss, *valid;
    const float *dloss; float *dx;
} mgpu__class_loss_args;
mgpu_result mgpu_cuda_cross_entropy_forward(const mgpu__class_loss_args *a, void *stream);
mgpu_result mgpu_cuda_cross_entropy_backward(const mgpu__class_loss_args *a, void *stream);
mgpu_result mgpu_cuda_nll_forward(const mgpu__class_loss_args *a, void *stream);
mgpu_result mgpu_cuda_nll_backward(const mgpu__class_loss_args *a, void *stream);
/* mse (n >= 0): forward loss[0] = mean((a - b)^2) (n = 0: NaN); backward da += 2 dloss[0] / n * (a - b), db -= the
   same (either may be NULL) */
typedef struct mgpu__mse_args {
    mgpu_context *ctx;
    const float *a, *b; int64_t n;
    float *loss;
    const float *dloss; float *da, *db;
} mgpu__mse_args;
mgpu_result mgpu_cuda_mse_forward(const mgpu__mse_args *a, void *stream);
mgpu_result mgpu_cuda_mse_backward(const mgpu__mse_args *a, void *stream);

/* ---- dropout (n): dst = src * scale where kept, 0 elsewhere; accumulate: dst += instead (backward).
   x is seen as rows of row_size; element c of local row j is kept iff mgpu_random_uniform(seed,
   first + (rank + world * j) * row_size + c) >= p, so W DDP ranks draw the masks one process draws
   for the combined batch (world 1: counter first + i). ---- */
typedef struct mgpu__dropout_args {
    mgpu_context *ctx;
    uint64_t seed, first; float p, scale;
    const uint64_t *first_at;             /* CUDA Graph capture: read first from this device word instead
                                             (a step scalar rewritten before each replay); NULL otherwise */
    int64_t row_size, rank, world;
    const float *src; float *dst; int64_t n;
    int accumulate;
} mgpu__dropout_args;
mgpu_result mgpu_cuda_dropout(const mgpu__dropout_args *a, void *stream);
/* Fills out[i] = mgpu_random_u32(seed, first + i) (tests compare it with the CPU bit for bit). */
mgpu_result mgpu_cuda_random_u32(uint64_t seed, uint64_t first, uint32_t *out, int64_t n, void *stream);

/* ---- normalisation ----
   Twins that need scratch find their own. A CPU twin that runs out of host memory for it records
   the error and sets *status (the front points status at an mgpu_result set to MGPU_OK); the CUDA
   twin returns its result instead. */
/* layer norm over the last dim of x (R, C), as PyTorch (biased variance, eps inside the sqrt):
   forward y = (x - mean) * rstd * w + b (w, b may be NULL), keeping mean, rstd (R) for the backward;
   backward dx, dw, db += (each may be NULL), dw and db by fixed-order reductions */
typedef struct mgpu__layer_norm_args {
    mgpu_context *ctx;                    /* the CPU twin's thread pool and arena; the CUDA twin ignores it */
    mgpu_result *status;                  /* the CPU backward's failure (see above) */
    const float *x, *w, *b, *dy;
    float *y, *mean, *rstd;
    float *dx, *dw, *db;
    int64_t R, C;
    float eps;
} mgpu__layer_norm_args;
mgpu_result mgpu_cuda_layer_norm_forward(const mgpu__layer_norm_args *a, void *stream);
mgpu_result mgpu_cuda_layer_norm_backward(const mgpu__layer_norm_args *a, void *stream);
/* batch norm over x (N, C, S), statistics per channel. Phases, so SyncBatchNorm can all-reduce sums
   between them (the front does):
     stats      (training forward) sums = [sum x (C), sum x^2 (C), N * S]
     forward    mean, rstd from sums (training: count = sums[2C]; running stats <- (1 - momentum) * old
                + momentum * (mean, unbiased variance)) or from the running stats (eval);
                scale = rstd * w; y = (x - mean) * scale + b
     grad_sums  sums = [sum dy (C), sum dy * (x - mean) (C)]; dw += sums[C + c] * rstd, db += sums[c]
     backward   dx += scale * (dy - k1 - (x - mean) * k2) with, training, k1 = sum dy / count and
                k2 = sum dy (x - mean) / count * rstd^2 (count = *count), eval k1 = k2 = 0; coef (2C)
                is room for k1, k2 (the CPU twin needs it)
   w, b, dw, db may be NULL; mean, rstd, scale (C) are written by the forward and kept for the backward. */
typedef struct mgpu__batch_norm_args {
    mgpu_context *ctx;                    /* the CPU twin's thread pool; the CUDA twin ignores it */
    int64_t N, C, S;
    int training; float momentum, eps;
    const float *x, *w, *b, *dy;
    float *running_mean, *running_var;    /* both or neither */
    double *sums;                         /* (2C + 1) in the forward, (2C) in the backward */
    const double *count;                  /* elements per channel over all ranks: the forward's sums[2C] */
    float *y, *mean, *rstd, *scale, *coef;
    float *dx, *dw, *db;
} mgpu__batch_norm_args;
mgpu_result mgpu_cuda_batch_norm_stats(const mgpu__batch_norm_args *a, void *stream);
mgpu_result mgpu_cuda_batch_norm_forward(const mgpu__batch_norm_args *a, void *stream);
mgpu_result mgpu_cuda_batch_norm_grad_sums(const mgpu__batch_norm_args *a, void *stream);
mgpu_result mgpu_cuda_batch_norm_backward(const mgpu__batch_norm_args *a, void *stream);

/* ---- embedding: forward out (n, D) = rows idx of weight (V, D); backward dweight += the rows of
   dy (n, D) scattered back, each row's contributions added in index order (deterministic: the
   twins agree bit for bit). idx (n) is I32 or I64 (idx_i64); the front checks that each is in
   [0, V), but ids that live on a device are not seen by the host, so the twins never touch memory
   for another id: its output row is zeros and its gradient is dropped. ---- */
typedef struct mgpu__embedding_args {
    mgpu_context *ctx;                    /* the CPU twin's thread pool; the CUDA twin ignores it */
    const void *idx; int idx_i64;
    const float *weight, *dy;
    float *out, *dweight;
    int64_t n, V, D;
    void *scratch;                        /* the CUDA backward's workspace on the device,
                                             MGPU__EMB_SCRATCH_BYTES(n); the CPU twin needs none (NULL) */
} mgpu__embedding_args;
/* n sort keys of 8 bytes, padded to a power of two (the CUDA backward sorts (row, index) pairs) */
#define MGPU__EMB_SCRATCH_BYTES(n) (8 * (size_t)mgpu__pow2_at_least(n))
static inline int64_t mgpu__pow2_at_least(int64_t n) { int64_t m = 1; while (m < n) m <<= 1; return m; }
mgpu_result mgpu_cuda_embedding_forward(const mgpu__embedding_args *a, void *stream);
mgpu_result mgpu_cuda_embedding_backward(const mgpu__embedding_args *a, void *stream);

/* ---- conv2d (im2col + GEMM) and pooling: a square window sliding over x (N, C, H, W) ---- */
/* ks: the window's side; p = oh * ow output positions per image; conv2d only: o output channels and
   ckk = c * ks * ks rows of an image's column matrix (pooling leaves o, p, ckk at 0) */
typedef struct mgpu__conv_geom {
    int64_t n, c, h, w, o, oh, ow, ks, stride, pad;
    int64_t p, ckk;
} mgpu__conv_geom;
/* conv2d: forward y (N, O, OH, OW) = w (O, C, KS, KS) * x + b (O, or NULL); backward dx, dw, db +=
   (each may be NULL). The twins find their own column buffers (status: see normalisation). */
typedef struct mgpu__conv2d_args {
    mgpu_context *ctx;                    /* the CPU twin's thread pool and arena; the CUDA twin ignores it */
    mgpu_result *status;                  /* the CPU twin's failure */
    void *blas;                           /* the CUDA twin's cuBLAS bundle: its GEMMs and scratch */
    const mgpu__conv_geom *g;
    const float *x, *w, *b, *dy;
    float *y, *dx, *dw, *db;
    mgpu_dtype half_compute;              /* autocast: the GEMMs as mgpu__gemm_args.half_compute (CUDA) */
} mgpu__conv2d_args;
mgpu_result mgpu_cuda_conv2d_forward(const mgpu__conv2d_args *a, void *stream);
mgpu_result mgpu_cuda_conv2d_backward(const mgpu__conv2d_args *a, void *stream);
/* max or average pooling: forward y (N, C, OH, OW), argmax (max only, may be NULL) the index of each
   output's input in its H*W plane. Max as PyTorch's max_pool2d: a NaN in the window is the output
   and the argmax points at it (the last NaN in row-major order); a window wholly in the padding
   (padding >= ks; the op refuses it, the twins define it) gives -inf and argmax -1, no gradient. Backward dx += the window's share of dy (average: dy / (ks * ks),
   count_include_pad as PyTorch's default). */
typedef struct mgpu__pool2d_args {
    mgpu_context *ctx;                    /* the CPU twin's thread pool; the CUDA twin ignores it */
    const mgpu__conv_geom *g;
    int is_max;
    const float *x, *dy;
    float *y, *dx;
    int32_t *argmax;
} mgpu__pool2d_args;
mgpu_result mgpu_cuda_pool2d_forward(const mgpu__pool2d_args *a, void *stream);
mgpu_result mgpu_cuda_pool2d_backward(const mgpu__pool2d_args *a, void *stream);

/* ---- copies: elements of esize bytes (1, 2, 4 or 8: every dtype), moved bit for bit; accumulate
   (backward, F32 only, esize 4): dst += instead ---- */
/* transpose: x (outer, d0, mid, d1, inner) -> out (outer, d1, mid, d0, inner) */
typedef struct mgpu__transpose_args {
    mgpu_context *ctx;
    const void *x; void *out;
    int64_t outer, d0, mid, d1, inner;
    size_t esize; int accumulate;
} mgpu__transpose_args;
mgpu_result mgpu_cuda_transpose(const mgpu__transpose_args *a, void *stream);
/* copy_rows, the row blocks of concat and narrow: dst[r * dst_pitch + j] = src[r * src_pitch + j]
   for r < rows, j < len (pitches in elements, >= len) */
typedef struct mgpu__copy_rows_args {
    mgpu_context *ctx;
    const void *src; void *dst;
    int64_t rows, len, src_pitch, dst_pitch;
    size_t esize; int accumulate;
} mgpu__copy_rows_args;
mgpu_result mgpu_cuda_copy_rows(const mgpu__copy_rows_args *a, void *stream);
/* gather_rows, the loader's batches from a dataset resident on the device: dst row r = src row
   idx[r] (rows of len elements, packed), for r < rows; an id outside [0, n_src) gives a zero row
   (ids on a device are not checked by the host, so the twins never read outside src) */
typedef struct mgpu__gather_rows_args {
    mgpu_context *ctx;
    const void *src; void *dst;
    const int64_t *idx;
    int64_t rows, len, n_src;
    size_t esize;
} mgpu__gather_rows_args;
mgpu_result mgpu_cuda_gather_rows(const mgpu__gather_rows_args *a, void *stream);

/* ---- reductions, in an order fixed by the shapes alone (deterministic); x seen as (outer, dim, inner) ---- */
#define MGPU_CUDA_REDUCE_PARTIALS 1024
/* sum: forward out (outer, inner) = scale * sum over dim (a full sum: outer = inner = 1);
   backward out += scale * dy broadcast along dim. scratch (forward with outer * inner == 1):
   MGPU_CUDA_REDUCE_PARTIALS doubles of workspace for the CUDA twin's two-phase sum (its partials stay
   in double, as the CPU's); the CPU twin ignores it */
typedef struct mgpu__sum_args {
    mgpu_context *ctx;
    const float *x, *dy; float *out;
    int64_t outer, dim, inner;
    float scale;
    double *scratch;
} mgpu__sum_args;
mgpu_result mgpu_cuda_sum_forward(const mgpu__sum_args *a, void *stream);
mgpu_result mgpu_cuda_sum_backward(const mgpu__sum_args *a, void *stream);
/* max_dim (dim >= 1): forward out, argmax (outer, inner) = the first maximum along dim and its index
   (the first NaN wins, as torch.max); backward out += dy at argmax */
typedef struct mgpu__max_dim_args {
    mgpu_context *ctx;
    const float *x, *dy; float *out;
    int64_t *argmax;
    int64_t outer, dim, inner;
} mgpu__max_dim_args;
mgpu_result mgpu_cuda_max_dim_forward(const mgpu__max_dim_args *a, void *stream);
mgpu_result mgpu_cuda_max_dim_backward(const mgpu__max_dim_args *a, void *stream);

/* ---- tensor-level fills, copies and casts; half-precision rounding ---- */
/* fill (n elements of dtype): dst[i] = value as a C cast to the dtype would give it (F16/BF16
   through F32, rounded to nearest even); a value of 0 (also -0.0) writes zero bytes */
typedef struct mgpu__fill_args {
    mgpu_context *ctx;                    /* the CPU twin's thread pool; the CUDA twin ignores it */
    void *dst; mgpu_dtype dtype; int64_t n;
    double value;
} mgpu__fill_args;
mgpu_result mgpu_cuda_fill(const mgpu__fill_args *a, void *stream);
/* step scalars of a captured CUDA Graph: dst[0..n) = words, written by a kernel that takes the
   words as its argument (copied at launch: the host may change its copy at once); n <= MGPU__STEP_SLOTS */
#define MGPU__STEP_SLOTS 64
typedef struct mgpu__step_words { uint64_t w[MGPU__STEP_SLOTS]; } mgpu__step_words;
mgpu_result mgpu_cuda_set_step_words(uint64_t *dst, const mgpu__step_words *words, int n, void *stream);
/* copy (bytes): dst = src, byte for byte, within the context's device; only the CPU twin lets the
   two overlap */
typedef struct mgpu__copy_args { mgpu_context *ctx; const void *src; void *dst; size_t bytes; } mgpu__copy_args;
mgpu_result mgpu_cuda_copy(const mgpu__copy_args *a, void *stream);
/* cast (n): dst = src converted between F32, F16 and BF16 (round to nearest even, as
   mgpu_f32_to_f16 / mgpu_f32_to_bf16); the front is mgpu_op_cast */
typedef struct mgpu__cast_args {
    mgpu_context *ctx;
    const void *src; mgpu_dtype src_dtype;
    void *dst; mgpu_dtype dst_dtype;
    int64_t n;
} mgpu__cast_args;
mgpu_result mgpu_cuda_cast(const mgpu__cast_args *a, void *stream);
/* round_half (n): dst = F32(half(src * scale)), or dst += it with accumulate, where half is F16 or
   BF16 rounded to nearest even: autocast's emulated half precision (forward and backward) and DDP's
   gradient compression; src and dst may be the same array */
typedef struct mgpu__round_half_args {
    mgpu_context *ctx;
    mgpu_dtype half;                      /* MGPU_F16 or MGPU_BF16 */
    float scale; int accumulate;
    const float *src; float *dst;
    int64_t n;
} mgpu__round_half_args;
mgpu_result mgpu_cuda_round_half(const mgpu__round_half_args *a, void *stream);

/* ---- optimizers, clipping, loss scaling: multi-tensor twins ----
   One call covers a list of F32 tensors, given as host arrays indexed by tensor that hold pointers
   into the context's device memory. The CPU twin updates the tensors one after another, each
   split over the thread pool; the CUDA twin packs up to 32 tensors into each kernel launch, so a
   whole model costs a few launches and no host sync. */
typedef struct mgpu__tensor_list {
    int count;
    float *const *data;                   /* (count) */
    const int64_t *numel;                 /* (count) elements of each; 0 is skipped */
} mgpu__tensor_list;
/* sgd: torch.optim.SGD on tensors that share their step count */
typedef struct mgpu__sgd_args {
    mgpu_context *ctx;
    mgpu__tensor_list params;
    const float *const *grads;            /* (count) */
    float *const *momentum_buffers;       /* (count), or NULL without momentum */
    float lr, weight_decay, momentum, keep;   /* keep = 1 - dampening */
    int nesterov, first;                  /* first: the buffers start as the gradient, undampened */
    const float *step_at;                 /* CUDA Graph capture: {lr, first} read from these device floats
                                             (step scalars rewritten before each replay); NULL otherwise */
} mgpu__sgd_args;
mgpu_result mgpu_cuda_sgd(const mgpu__sgd_args *a, void *stream);
/* adam: torch.optim.Adam and AdamW on tensors that share their step count t */
typedef struct mgpu__adam_args {
    mgpu_context *ctx;
    mgpu__tensor_list params;
    const float *const *grads;            /* (count) */
    float *const *exp_avg, *const *exp_avg_sq;   /* (count) each */
    float decay;                          /* AdamW: 1 - lr * weight_decay (1 for Adam) */
    float l2;                             /* Adam: weight_decay added to the gradient (0 for AdamW) */
    float beta1, beta2, eps;
    float step_size;                      /* lr / (1 - beta1^t) */
    float bc2_sqrt;                       /* sqrt(1 - beta2^t) */
    const float *step_at;                 /* CUDA Graph capture: {decay, step_size, bc2_sqrt} read from these
                                             device floats (step scalars rewritten before each replay); NULL otherwise */
} mgpu__adam_args;
mgpu_result mgpu_cuda_adam(const mgpu__adam_args *a, void *stream);
/* clip_grad_norm: norm[0] = the L2 norm of all the grads together; unless it is inf or NaN, every
   grad is multiplied by max_norm / (norm + 1e-6) when that is below 1 (clip_grad_norm_). The CUDA
   twin computes the coefficient on the device, so clipping needs no host sync. */
typedef struct mgpu__clip_grad_norm_args {
    mgpu_context *ctx;
    mgpu__tensor_list grads;
    float max_norm;
    float *norm;                          /* (1) out, on the device */
    double *scratch;                      /* MGPU__CLIP_SCRATCH_DOUBLES(count) doubles on the device for the
                                             CUDA twin (partials and coefficient in double); NULL for the
                                             CPU twin, which needs none */
} mgpu__clip_grad_norm_args;
#define MGPU__CLIP_SCRATCH_DOUBLES(count) ((int64_t)(count) * MGPU_CUDA_REDUCE_PARTIALS + 1)
mgpu_result mgpu_cuda_clip_grad_norm(const mgpu__clip_grad_norm_args *a, void *stream);
/* unscale: found[0] = 1 if any grad holds an inf or NaN, else 0; then every grad *= inv_scale
   (GradScaler.unscale_) */
typedef struct mgpu__unscale_args {
    mgpu_context *ctx;
    mgpu__tensor_list grads;
    float inv_scale;
    int32_t *found;                       /* (1) out, on the device */
} mgpu__unscale_args;
mgpu_result mgpu_cuda_unscale(const mgpu__unscale_args *a, void *stream);

/* ---- attention, per (batch, head) pair: S = scale * Q K^T, causal: S[i, j] = -inf for j > i;
   P = softmax(S); out = P V. q (BH, Tq, D), k, v (BH, Tk, D). prob (BH, Tq, Tk) is written by the
   forward and read by the backward; NULL in a forward no backward follows (the twins then find
   their own room). Backward dq, dk, dv += (each may be NULL; status: see normalisation). ---- */
typedef struct mgpu__attention_args {
    mgpu_context *ctx;                    /* the CPU twin's thread pool and arena; the CUDA twin ignores it */
    mgpu_result *status;                  /* the CPU twin's failure */
    void *blas;                           /* the CUDA twin's cuBLAS bundle: its GEMMs and scratch */
    const float *q, *k, *v, *dout;
    float *out, *prob, *dq, *dk, *dv;
    int64_t BH, Tq, Tk, D;
    float scale;                          /* 1 / sqrt(D) */
    int causal;
} mgpu__attention_args;
mgpu_result mgpu_cuda_attention_forward(const mgpu__attention_args *a, void *stream);
mgpu_result mgpu_cuda_attention_backward(const mgpu__attention_args *a, void *stream);

/* ---- GEMM: every matrix product (matmul, linear, conv2d, attention) ----
   Row-major, for each of `batch` items (0 means 1): C (m, n) = alpha * op(A) @ op(B) + beta * C
   [+ bias (n) on every row] [then ReLU or GELU (tanh)]. op(A) (m, k): A is (m, k) with lda, or (k, m)
   when trans_a; op(B) (k, n): B is (k, n) with ldb, or (n, k) when trans_b. Items lie stride_a,
   stride_b, stride_c elements apart (0: one matrix shared by every item). A and B are ab_dtype
   (F32; F16 or BF16 on CUDA only, with f32 accumulation); C and bias are F32. CUDA: cuBLASLt with a
   plan cache for single products, cuBLAS for batches and where Lt has no algorithm. */
typedef enum mgpu__gemm_epilogue { MGPU__EPI_NONE, MGPU__EPI_BIAS, MGPU__EPI_BIAS_RELU, MGPU__EPI_BIAS_GELU } mgpu__gemm_epilogue;
typedef struct mgpu__gemm_args {
    mgpu_context *ctx;                    /* the CPU twin's thread pool (NULL: the calling thread); the CUDA twin ignores it */
    void *blas;                           /* the CUDA twin's cuBLAS(Lt) bundle (the context's cuda_blas); the CPU twin ignores it */
    int trans_a, trans_b;
    int64_t m, n, k, batch;
    float alpha, beta;
    const void *a, *b; int64_t lda, ldb, stride_a, stride_b;
    mgpu_dtype ab_dtype;
    float *c; int64_t ldc, stride_c;
    mgpu__gemm_epilogue epilogue; const float *bias;
    int no_lt;                            /* CUDA: 1 skips cuBLASLt for plain cuBLAS (tests compare the two) */
    mgpu_dtype half_compute;              /* 0 (F32): as given; F16/BF16 (autocast): A and B hold F32 values
                                             already rounded to that format; the CUDA twin multiplies them in it on
                                             tensor cores with f32 accumulation, the CPU twin in f32 (same values) */
} mgpu__gemm_args;
mgpu_result mgpu_cuda_gemm(const mgpu__gemm_args *a, void *stream);
/* blas: handles + workspace + plan cache + scratch for the twins that compose GEMMs, bound to one
   device and stream. workspace_bytes 0: 32 MiB. */
mgpu_result mgpu_cuda_blas_create(void **blas, void *stream, size_t workspace_bytes);
void mgpu_cuda_blas_destroy(void *blas);
mgpu_result mgpu_cuda_blas_set_stream(void *blas, void *stream);
/* 1: allow TF32 for F32 GEMMs (off by default so F32 matches the CPU to 1e-5) */
void mgpu_cuda_blas_set_tf32(void *blas, int allow);
int mgpu_cuda_blas_plan_count(const void *blas);   /* cached cuBLASLt plans (tests check reuse) */

/* linear's bias gradient: db (cols) += column sums of dy (rows, cols), in a fixed order */
typedef struct mgpu__linear_bias_grad_args {
    mgpu_context *ctx;                    /* the CPU twin's thread pool; the CUDA twin ignores it */
    const float *dy; float *db;
    int64_t rows, cols;
} mgpu__linear_bias_grad_args;
mgpu_result mgpu_cuda_linear_bias_grad(const mgpu__linear_bias_grad_args *a, void *stream);

/* ---- runtime wrappers used by the CUDA host side (C files need no CUDA headers for these) ---- */
mgpu_result mgpu_cuda_synchronize(void *stream);


#ifdef __cplusplus
}
#endif
#endif /* MGPU__INTERNAL_H */
/* ======================================================================================
   ======================================================================================
   IMPLEMENTATION
   ======================================================================================
   ====================================================================================== */
#if defined(MGPU_IMPLEMENTATION) && !defined(MGPU__IMPLEMENTED)
#define MGPU__IMPLEMENTED

#include <stdlib.h>
#include <string.h>
#include <stdarg.h>
#include <math.h>
#include <errno.h>
#include <float.h>
#include <time.h>
#include <pthread.h>
#include <unistd.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <limits.h>
#include <dirent.h>
#include <poll.h>
#include <netdb.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <linux/futex.h>
#endif
/* GEMM micro-kernels; nvcc parses the implementation only for the header check, so the fast paths
   are for the host C compiler. */
#if defined(__AVX2__) && defined(__FMA__) && !defined(__CUDACC__)
#include <immintrin.h>
#define MGPU__GEMM_AVX2 1
#endif
#ifdef MGPU_CUDA
#include <cuda_runtime_api.h>
#include <nccl.h>
#if NCCL_VERSION_CODE < 21400
#error "mgpu's nccl backend needs NCCL 2.14 or newer (non-blocking communicators)"
#endif
#endif

#ifndef MGPU_ASSERT
#include <assert.h>
#define MGPU_ASSERT(c) assert(c)
#endif

#if defined(__cplusplus)
#define MGPU__THREAD_LOCAL thread_local
#else
#define MGPU__THREAD_LOCAL _Thread_local
#endif

#if defined(__GNUC__)
#define MGPU__PRINTF(a, b) __attribute__((format(printf, a, b)))
#define MGPU__UNUSED __attribute__((unused))
#else
#define MGPU__PRINTF(a, b)
#define MGPU__UNUSED
#endif

#define MGPU__MIN(a, b) ((a) < (b) ? (a) : (b))
#define MGPU__MAX(a, b) ((a) > (b) ? (a) : (b))

/* --------------------------------------------------------------------------------------
   Errors
   -------------------------------------------------------------------------------------- */

static MGPU__THREAD_LOCAL char mgpu__error_text[1024];
static MGPU__THREAD_LOCAL mgpu_result mgpu__error_code = MGPU_OK;

MGPU_API const char *mgpu_result_string(mgpu_result r) {
    switch (r) {
    case MGPU_OK: return "ok";
    case MGPU_ERR_INVALID_ARG: return "invalid argument";
    case MGPU_ERR_OOM_HOST: return "out of host memory";
    case MGPU_ERR_OOM_DEVICE: return "out of device memory";
    case MGPU_ERR_CUDA: return "CUDA error";
    case MGPU_ERR_NCCL: return "NCCL error";
    case MGPU_ERR_IO: return "I/O error";
    case MGPU_ERR_FORMAT: return "bad file format";
    case MGPU_ERR_SHAPE: return "shape or dtype mismatch";
    case MGPU_ERR_TIMEOUT: return "timed out";
    case MGPU_ERR_UNSUPPORTED: return "unsupported";
    case MGPU_ERR_STATE: return "called in the wrong state";
    }
    return "unknown result code";
}
MGPU_API const char *mgpu_last_error(void) { return mgpu__error_text; }
MGPU_API mgpu_result mgpu_last_result(void) { return mgpu__error_code; }
MGPU_API void mgpu_clear_error(void) { mgpu__error_text[0] = 0; mgpu__error_code = MGPU_OK; }

/* Record a failure for this thread and return its code: `return mgpu__fail(MGPU_ERR_SHAPE, "...")`. */
static mgpu_result mgpu__fail(mgpu_result code, const char *fmt, ...) MGPU__PRINTF(2, 3);
static mgpu_result mgpu__fail(mgpu_result code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(mgpu__error_text, sizeof mgpu__error_text, fmt, ap);
    va_end(ap);
    mgpu__error_code = code;
    return code;
}
/* Same for constructors: record and return NULL. */
#define MGPU__FAIL_NULL(code, ...) do { mgpu__fail((code), __VA_ARGS__); return NULL; } while (0)

/* --------------------------------------------------------------------------------------
   Logging
   -------------------------------------------------------------------------------------- */

static mgpu_log_fn mgpu__log_fn = NULL;
static void *mgpu__log_user = NULL;
static mgpu_log_level mgpu__log_min = MGPU_LOG_INFO;

MGPU_API void mgpu_set_logger(mgpu_log_fn fn, void *user) { mgpu__log_fn = fn; mgpu__log_user = user; }
MGPU_API void mgpu_set_log_level(mgpu_log_level min_level) { mgpu__log_min = min_level; }

static void mgpu__default_log(mgpu_log_level level, const char *message) {
    static const char *names[] = {"debug", "info", "warning", "error"};
    const char *rank = getenv("RANK");
    const char *world = getenv("WORLD_SIZE");
    int lv = (int)level < 0 || (int)level > 3 ? 3 : (int)level;
    if (rank && world && atoi(world) > 1) fprintf(stderr, "[mgpu %s rank %s] %s\n", names[lv], rank, message);
    else fprintf(stderr, "[mgpu %s] %s\n", names[lv], message);
}

MGPU_API void mgpu_log(mgpu_log_level level, const char *fmt, ...) {
    char buf[2048];
    va_list ap;
    if (level < mgpu__log_min) return;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (mgpu__log_fn) mgpu__log_fn(level, buf, mgpu__log_user);
    else mgpu__default_log(level, buf);
}

/* --------------------------------------------------------------------------------------
   Host allocation
   -------------------------------------------------------------------------------------- */

static mgpu_allocator mgpu__allocator = {NULL, NULL, NULL};

MGPU_API void mgpu_set_allocator(const mgpu_allocator *a) {
    if (a && a->alloc && a->free) mgpu__allocator = *a;
    else { mgpu__allocator.alloc = NULL; mgpu__allocator.free = NULL; mgpu__allocator.user = NULL; }
}
MGPU_API void *mgpu_malloc(size_t bytes) {
    void *p = NULL;
    if (bytes == 0) bytes = 1;
    if (mgpu__allocator.alloc) return mgpu__allocator.alloc(bytes, mgpu__allocator.user);
    if (posix_memalign(&p, 64, bytes) != 0) return NULL;
    return p;
}
MGPU_API void mgpu_free(void *p) {
    if (!p) return;
    if (mgpu__allocator.free) mgpu__allocator.free(p, mgpu__allocator.user);
    else free(p);
}
/* Allocation that records MGPU_ERR_OOM_HOST naming what it was for. */
static void *mgpu__alloc(size_t bytes, const char *what) {
    void *p = mgpu_malloc(bytes);
    if (!p) mgpu__fail(MGPU_ERR_OOM_HOST, "out of host memory allocating %zu bytes for %s", bytes, what);
    return p;
}
static MGPU__UNUSED void *mgpu__calloc(size_t bytes, const char *what) {
    void *p = mgpu__alloc(bytes, what);
    if (p) memset(p, 0, bytes);
    return p;
}
static MGPU__UNUSED char *mgpu__strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = (char *)mgpu__alloc(n, "a string");
    if (p) memcpy(p, s, n);
    return p;
}

MGPU_API double mgpu_time_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* --------------------------------------------------------------------------------------
   Devices and dtypes
   -------------------------------------------------------------------------------------- */

MGPU_API int mgpu_cuda_device_count(void) {
#ifdef MGPU_CUDA
    return mgpu__cuda_device_count();   /* < 0: CUDA failed, the error is recorded */
#else
    return 0;
#endif
}

MGPU_API mgpu_result mgpu_device_parse(const char *text, mgpu_device *out) {
    char *end = NULL;
    long idx;
    if (!text || !out) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_device_parse: text and out must not be NULL");
    if (strcmp(text, "cpu") == 0) { out->type = MGPU_DEVICE_CPU; out->index = 0; return MGPU_OK; }
    if (strcmp(text, "auto") == 0) {
        int n = mgpu_cuda_device_count();
        if (n < 0) return (mgpu_result)n;   /* a failing GPU setup is an error, not a reason to pick the CPU */
        out->type = n > 0 ? MGPU_DEVICE_CUDA : MGPU_DEVICE_CPU;
        out->index = 0;
        return MGPU_OK;
    }
    if (strncmp(text, "cuda", 4) == 0 && (text[4] == 0 || text[4] == ':')) {
        idx = 0;
        if (text[4] == ':') {
            errno = 0;
            idx = strtol(text + 5, &end, 10);
            if (errno || end == text + 5 || *end || idx < 0 || idx > 1023)
                return mgpu__fail(MGPU_ERR_INVALID_ARG, "device '%s': expected cuda:N with N a GPU index", text);
        }
#ifndef MGPU_CUDA
        return mgpu__fail(MGPU_ERR_UNSUPPORTED, "device '%s': this build has no CUDA support (rebuild with -DMGPU_CUDA, e.g. `make cuda`)", text);
#else
        {
            int n = mgpu_cuda_device_count();
            if (n < 0) return (mgpu_result)n;
            if (idx >= n) return mgpu__fail(MGPU_ERR_INVALID_ARG, "device '%s': only %d CUDA device(s) visible", text, n);
        }
        out->type = MGPU_DEVICE_CUDA; out->index = (int)idx;
        return MGPU_OK;
#endif
    }
    return mgpu__fail(MGPU_ERR_INVALID_ARG, "device '%s': expected cpu, cuda, cuda:N or auto", text);
}

MGPU_API void mgpu_device_name(mgpu_device d, char *buf, size_t size) {
    if (!buf || size == 0) return;
    if (d.type == MGPU_DEVICE_CUDA) snprintf(buf, size, "cuda:%d", d.index);
    else snprintf(buf, size, "cpu");
}

static const char *const mgpu__dtype_names[MGPU_DTYPE_COUNT] = {"F32", "F16", "BF16", "I32", "I64", "U8"};
static const size_t mgpu__dtype_sizes[MGPU_DTYPE_COUNT] = {4, 2, 2, 4, 8, 1};

static int mgpu__dtype_valid(mgpu_dtype dt) { return (int)dt >= 0 && (int)dt < MGPU_DTYPE_COUNT; }
static MGPU__UNUSED int mgpu__dtype_is_float(mgpu_dtype dt) { return dt == MGPU_F32 || dt == MGPU_F16 || dt == MGPU_BF16; }
MGPU_API size_t mgpu_dtype_size(mgpu_dtype dt) { return mgpu__dtype_valid(dt) ? mgpu__dtype_sizes[dt] : 0; }
MGPU_API const char *mgpu_dtype_name(mgpu_dtype dt) { return mgpu__dtype_valid(dt) ? mgpu__dtype_names[dt] : "invalid"; }
MGPU_API int mgpu_dtype_from_name(const char *name, mgpu_dtype *out) {
    int i;
    if (!name) return 0;
    for (i = 0; i < MGPU_DTYPE_COUNT; i++)
        if (strcmp(name, mgpu__dtype_names[i]) == 0) { if (out) *out = (mgpu_dtype)i; return 1; }
    return 0;
}

static uint32_t mgpu__f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float mgpu__bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

MGPU_API uint16_t mgpu_f32_to_bf16(float f) {
    uint32_t u = mgpu__f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                           /* round to nearest even */
    return (uint16_t)(u >> 16);
}
MGPU_API float mgpu_bf16_to_f32(uint16_t h) { return mgpu__bits_f32((uint32_t)h << 16); }

MGPU_API uint16_t mgpu_f32_to_f16(float f) {
    uint32_t u = mgpu__f32_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t absu = u & 0x7fffffffu;
    if (absu > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);               /* NaN */
    if (absu >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);              /* overflow (rounds to >= 65520) -> inf */
    if (absu < 0x38800000u) {                                                  /* subnormal or zero in f16 */
        /* add 0.5 so the float adder rounds the mantissa to the f16 subnormal grid (nearest even) */
        float a = mgpu__bits_f32(absu) + 0.5f;
        return (uint16_t)(sign | (mgpu__f32_bits(a) - 0x3f000000u));
    }
    {
        uint32_t mant_odd = (absu >> 13) & 1u;
        absu += 0xc8000fffu + mant_odd;   /* rebias exponent (-112 << 23) and round to nearest even */
        return (uint16_t)(sign | (absu >> 13));
    }
}
MGPU_API float mgpu_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0) {
        float v = (float)mant * (1.0f / 16777216.0f); /* mant * 2^-24 */
        return mgpu__bits_f32(mgpu__f32_bits(v) | sign);
    }
    if (exp == 31) return mgpu__bits_f32(sign | 0x7f800000u | (mant << 13));
    return mgpu__bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

/* --------------------------------------------------------------------------------------
   Counter-based RNG: a SplitMix64-style finaliser over (seed, counter) pairs. Any element of
   any stream is computable independently, so dropout masks are reproducible, parallel and
   resumable from (seed, offset) alone.
   -------------------------------------------------------------------------------------- */

MGPU_API uint32_t mgpu_random_u32(uint64_t seed, uint64_t counter) { return mgpu__random_bits(seed, counter); }
MGPU_API float mgpu_random_uniform(uint64_t seed, uint64_t counter) { return mgpu__random_unit(seed, counter); }
MGPU_API float mgpu_random_normal(uint64_t seed, uint64_t counter) {
    /* Box-Muller on two sub-streams of the same counter */
    double u1 = ((double)(mgpu_random_u32(seed, 2 * counter) >> 8) + 1.0) * (1.0 / 16777217.0);
    double u2 = (double)(mgpu_random_u32(seed, 2 * counter + 1) >> 8) * (1.0 / 16777216.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* --------------------------------------------------------------------------------------
   Thread pool: persistent workers, one job at a time, chunks taken by atomic counter.
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__pool {
    int n_threads;                 /* including the caller */
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv;
    uint64_t generation;           /* bumped per job */
    int shutdown;
    uint64_t busy_workers;
    /* current job */
    mgpu_range_fn fn; void *arg;
    int64_t n, chunk, next;
} mgpu__pool;

static void mgpu__pool_run_chunks(mgpu__pool *p) {
    for (;;) {
        int64_t begin = __atomic_fetch_add(&p->next, p->chunk, __ATOMIC_RELAXED);
        if (begin >= p->n) break;
        p->fn(p->arg, begin, MGPU__MIN(begin + p->chunk, p->n));
    }
}

/* Parallel regions in a training step come microseconds apart: spinning this long before
   sleeping on the condition variable saves a wake-up (~10 us) per region, and is short enough
   that idle workers do not steal a core from other processes for long. */
#define MGPU__SPIN_SECONDS 50e-6

/* Spin until (*word == value) == want_equal or the spin budget is spent; returns the last value read. */
static uint64_t mgpu__spin_wait(const uint64_t *word, uint64_t value, int want_equal) {
    double deadline = mgpu_time_s() + MGPU__SPIN_SECONDS;
    uint64_t v;
    int i;
    for (;;) {
        for (i = 0; i < 64; i++)
            if (((v = __atomic_load_n(word, __ATOMIC_ACQUIRE)) == value) == want_equal) return v;
        if (mgpu_time_s() > deadline) return v;
    }
}

static void *mgpu__pool_worker(void *arg) {
    mgpu__pool *p = (mgpu__pool *)arg;
    uint64_t seen = 0;
    for (;;) {
        if (mgpu__spin_wait(&p->generation, seen, 0) == seen) {
            pthread_mutex_lock(&p->mu);
            while (!p->shutdown && __atomic_load_n(&p->generation, __ATOMIC_ACQUIRE) == seen) pthread_cond_wait(&p->work_cv, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (__atomic_load_n(&p->shutdown, __ATOMIC_ACQUIRE)) break;
        seen = __atomic_load_n(&p->generation, __ATOMIC_ACQUIRE);
        mgpu__pool_run_chunks(p);
        if (__atomic_sub_fetch(&p->busy_workers, 1, __ATOMIC_ACQ_REL) == 0) {
            pthread_mutex_lock(&p->mu);  /* the lock orders this signal after the caller's check */
            pthread_cond_signal(&p->done_cv);
            pthread_mutex_unlock(&p->mu);
        }
    }
    return NULL;
}

static mgpu__pool *mgpu__pool_create(int n_threads) {
    mgpu__pool *p = (mgpu__pool *)mgpu__calloc(sizeof *p, "the thread pool");
    int i;
    if (!p) return NULL;
    p->n_threads = n_threads < 1 ? 1 : n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work_cv, NULL);
    pthread_cond_init(&p->done_cv, NULL);
    if (p->n_threads > 1) {
        p->threads = (pthread_t *)mgpu__calloc(sizeof(pthread_t) * (size_t)p->n_threads, "the thread pool");
        if (!p->threads) { p->n_threads = 1; return p; }
        for (i = 0; i < p->n_threads - 1; i++) {
            if (pthread_create(&p->threads[i], NULL, mgpu__pool_worker, p) != 0) { p->n_threads = i + 1; break; }
        }
    }
    return p;
}

static void mgpu__pool_destroy(mgpu__pool *p) {
    int i;
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    __atomic_store_n(&p->shutdown, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&p->work_cv);
    pthread_mutex_unlock(&p->mu);
    for (i = 0; i < p->n_threads - 1; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->work_cv);
    pthread_cond_destroy(&p->done_cv);
    mgpu_free(p->threads);
    mgpu_free(p);
}

static void mgpu__pool_parallel_for(mgpu__pool *p, int64_t n, int64_t min_chunk, mgpu_range_fn fn, void *arg) {
    int64_t chunk;
    if (n <= 0) return;
    if (min_chunk < 1) min_chunk = 1;
    if (!p || p->n_threads == 1 || n <= min_chunk) { fn(arg, 0, n); return; }
    /* about 4 chunks per thread balances uneven work without much atomic traffic */
    chunk = (n + 4 * p->n_threads - 1) / (4 * p->n_threads);
    if (chunk < min_chunk) chunk = min_chunk;
    pthread_mutex_lock(&p->mu);
    p->fn = fn; p->arg = arg; p->n = n; p->chunk = chunk; p->next = 0;
    __atomic_store_n(&p->busy_workers, (uint64_t)(p->n_threads - 1), __ATOMIC_RELAXED);
    __atomic_store_n(&p->generation, p->generation + 1, __ATOMIC_RELEASE); /* publishes the job */
    pthread_cond_broadcast(&p->work_cv);
    pthread_mutex_unlock(&p->mu);
    mgpu__pool_run_chunks(p);
    if (mgpu__spin_wait(&p->busy_workers, 0, 1) != 0) {
        pthread_mutex_lock(&p->mu);
        while (__atomic_load_n(&p->busy_workers, __ATOMIC_ACQUIRE) > 0) pthread_cond_wait(&p->done_cv, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }
}

/* Threads for this process: MGPU_NUM_THREADS, OMP_NUM_THREADS, else the cores split among the
   processes of this host (LOCAL_WORLD_SIZE) so DDP workers do not oversubscribe. */
static int mgpu__default_num_threads(void) {
    const char *names[] = {"MGPU_NUM_THREADS", "OMP_NUM_THREADS"};
    long cores, local_world = 1;
    int i;
    for (i = 0; i < 2; i++) {
        const char *v = getenv(names[i]);
        if (v && atoi(v) > 0) return atoi(v);
    }
    cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (cores < 1) cores = 1;
    if (getenv("LOCAL_WORLD_SIZE") && atoi(getenv("LOCAL_WORLD_SIZE")) > 0) local_world = atoi(getenv("LOCAL_WORLD_SIZE"));
    cores /= local_world;
    return cores < 1 ? 1 : (int)cores;
}

/* --------------------------------------------------------------------------------------
   Activation arena: bump allocation in chunks; reset keeps one chunk as large as the whole step
   needed, so a steady-state training step allocates nothing (and, on CUDA, hands out the same
   device addresses every step, which CUDA Graph replay needs). A context has a host arena (tensor
   headers, tape nodes, host scratch) and, on CUDA, a device arena for activation data whose
   chunks come from the caching device allocator.
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__chunk { struct mgpu__chunk *prev; char *base; size_t size, used; } mgpu__chunk;
typedef struct mgpu__arena {
    mgpu__chunk *head; size_t total_used, peak; size_t initial;
    int device;   /* -1: host memory; else the CUDA device its chunks live on */
} mgpu__arena;

#ifdef MGPU_CUDA
/* Device memory for the core (defined with the CUDA host side, below). */
static void *mgpu__cuda_alloc_for(int device, size_t bytes, const char *what);
static void mgpu__cuda_release(int device, void *ptr);
#endif

static void *mgpu__arena_chunk_memory(const mgpu__arena *a, size_t bytes) {
#ifdef MGPU_CUDA
    if (a->device >= 0) return mgpu__cuda_alloc_for(a->device, bytes, "the device activation arena");
#endif
    (void)a;
    return mgpu_malloc(bytes);
}
static void mgpu__arena_chunk_free(const mgpu__arena *a, mgpu__chunk *c) {
#ifdef MGPU_CUDA
    if (a->device >= 0) { mgpu__cuda_release(a->device, c->base); mgpu_free(c); return; }
#endif
    (void)a;
    mgpu_free(c->base);
    mgpu_free(c);
}

static void *mgpu__arena_alloc_raw(mgpu__arena *a, size_t bytes) {
    mgpu__chunk *c = a->head;
    size_t align = a->device >= 0 ? 256 : 64;   /* device: what cudaMalloc gives and cuBLASLt's fastest paths want */
    bytes = (bytes + align - 1) & ~(align - 1);
    if (!c || c->used + bytes > c->size) {
        size_t want = MGPU__MAX(bytes, MGPU__MAX(a->initial, c ? 2 * c->size : 0));
        mgpu__chunk *n = (mgpu__chunk *)mgpu_malloc(sizeof *n);
        if (!n) return NULL;
        n->base = (char *)mgpu__arena_chunk_memory(a, want);
        if (!n->base) { mgpu_free(n); return NULL; }
        n->prev = c; n->size = want; n->used = 0;
        a->head = c = n;
    }
    {
        void *p = c->base + c->used;
        c->used += bytes;
        a->total_used += bytes;
        if (a->total_used > a->peak) a->peak = a->total_used;
        return p;
    }
}

static void mgpu__arena_reset(mgpu__arena *a) {
    if (a->head && a->head->prev) {
        /* several chunks: replace them with one that fits the whole step next time */
        size_t need = 0;
        mgpu__chunk *c = a->head;
        while (c) { mgpu__chunk *p = c->prev; need += c->size; mgpu__arena_chunk_free(a, c); c = p; }
        a->head = NULL;
        a->initial = MGPU__MAX(a->initial, need);
    } else if (a->head) {
        a->head->used = 0;
    }
    a->total_used = 0;
}

static void mgpu__arena_free(mgpu__arena *a) {
    mgpu__chunk *c = a->head;
    while (c) { mgpu__chunk *p = c->prev; mgpu__arena_chunk_free(a, c); c = p; }
    a->head = NULL;
}

/* --------------------------------------------------------------------------------------
   Context and autograd tape
   -------------------------------------------------------------------------------------- */

struct mgpu__node;
/* A backward function reads node->out->grad and ACCUMULATES (+=) into the grads of its inputs
   through mgpu__grad_f32(); it never overwrites an input's grad. */
typedef mgpu_result (*mgpu__backward_fn)(mgpu_context *ctx, struct mgpu__node *node);
typedef struct mgpu__node {
    mgpu__backward_fn backward;
    const char *name;            /* op name for error messages */
    mgpu_tensor *out;
    mgpu_tensor **in; int n_in;  /* inputs (arena array) */
    mgpu_tensor *saved[4];       /* extra tensors kept for backward (arena or inputs) */
    int64_t iarg[8]; float farg[4];
    void *extra;                 /* op-specific arena memory */
    int consumed;                /* already walked by a backward */
} mgpu__node;

/* CUDA Graph capture of a training step. A graph bakes kernel arguments, so a value that changes
   from step to step (the dropout RNG position, the optimizer's LR and bias corrections,
   num_batches_tracked) is read by the captured kernels from a "step scalar": an 8-byte word of a
   small device block. The host work that produced the value in an eager step becomes a replay
   hook: before every launch of the graph each hook redoes its host mutation (RNG reserve, step
   count, ...) and writes the word, and one kernel that takes the words as its argument stores the
   block. N replays thus leave the host state of N eager steps, and capturing runs no hook (nor
   mutates the host): the first launch after capture runs the captured step. */
typedef mgpu_result (*mgpu__replay_fn)(void *obj, int64_t arg, uint64_t *words);
typedef struct mgpu__replay_hook { mgpu__replay_fn fn; void *obj; int64_t arg; int word; } mgpu__replay_hook;
typedef struct mgpu__step_capture {
    uint64_t *device_words;              /* MGPU__STEP_SLOTS words on the device: what the graph reads */
    mgpu__step_words host;               /* this replay's words, written by the hooks */
    int n_words;
    mgpu__replay_hook hooks[MGPU__STEP_SLOTS]; int n_hooks;
} mgpu__step_capture;

struct mgpu_context {
    mgpu_device device;
    mgpu__pool *pool;
    mgpu__arena arena;                 /* host: tensor headers, tape nodes, host scratch */
    mgpu__arena device_arena;          /* CUDA: activation data (unused on the CPU) */
    uint64_t rng_seed, rng_offset;
    int grad_enabled;
    int autocast;                      /* mgpu_amp_mode: half precision for matmul-like ops */
    int autocast_inside;               /* the mode of the matmul-like op autocast is running now (0: none) */
    mgpu__node **tape; int64_t tape_len, tape_cap;
    mgpu_backward_end_fn backward_end; void *backward_end_user;
    int row_rank, row_world;           /* DDP sharding (rank, world; 0 = 1): dropout draws row j's mask at global row rank + world * j */
    void *cuda_stream;                 /* the stream every CUDA twin of this context runs on (NULL on the CPU) */
    void *cuda_blas;                   /* its cuBLAS/cuBLASLt bundle (mgpu_cuda_blas_create; NULL on the CPU) */
    mgpu__step_capture *capture;       /* set while a CUDA Graph of the step is being captured (NULL otherwise) */
    uint64_t host_waits;               /* how often mgpu__transfer waited for cuda_stream: see mgpu__item_begin */
    void *readback;                    /* pinned 8 bytes for mgpu__item_begin's copy (NULL until first used) */
};

#ifdef MGPU_CUDA
static mgpu_result mgpu__cuda_context_init(mgpu_context *ctx);
static void mgpu__cuda_context_release(mgpu_context *ctx);
#endif

MGPU_API mgpu_context *mgpu_context_create(const mgpu_context_desc *desc) {
    mgpu_context *ctx;
    mgpu_context_desc d;
    if (desc) d = *desc; else memset(&d, 0, sizeof d);
    if (d.device.type != MGPU_DEVICE_CPU && d.device.type != MGPU_DEVICE_CUDA)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_context_create: desc->device.type %d is not a device type", (int)d.device.type);
#ifndef MGPU_CUDA
    if (d.device.type == MGPU_DEVICE_CUDA)
        MGPU__FAIL_NULL(MGPU_ERR_UNSUPPORTED, "mgpu_context_create: device cuda:%d: this build has no CUDA support (rebuild with -DMGPU_CUDA, e.g. `make cuda`)", d.device.index);
#endif
    if (d.num_threads < 0) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_context_create: desc->num_threads is %d, must be >= 0", d.num_threads);
    ctx = (mgpu_context *)mgpu__calloc(sizeof *ctx, "a context");
    if (!ctx) return NULL;
    ctx->device = d.device;
    ctx->pool = mgpu__pool_create(d.num_threads ? d.num_threads : mgpu__default_num_threads());
    if (!ctx->pool) { mgpu_free(ctx); return NULL; }
    ctx->arena.device = -1;
    ctx->arena.initial = d.arena_bytes ? d.arena_bytes : ((size_t)16 << 20);
    ctx->device_arena.device = -1;
    ctx->rng_seed = d.seed;
    ctx->grad_enabled = 1;
#ifdef MGPU_CUDA
    if (d.device.type == MGPU_DEVICE_CUDA) {
        /* headers and nodes are small: the host arena starts small, the device arena gets the size asked for */
        ctx->arena.initial = (size_t)1 << 20;
        ctx->device_arena.device = d.device.index;
        ctx->device_arena.initial = d.arena_bytes ? d.arena_bytes : ((size_t)64 << 20);
        if (mgpu__cuda_context_init(ctx) != MGPU_OK) { mgpu__pool_destroy(ctx->pool); mgpu_free(ctx); return NULL; }
    }
#endif
    return ctx;
}

MGPU_API void mgpu_context_destroy(mgpu_context *ctx) {
    if (!ctx) return;
#ifdef MGPU_CUDA
    mgpu__cuda_context_release(ctx);   /* waits for the stream before its memory goes back */
#endif
    mgpu__pool_destroy(ctx->pool);
    mgpu__arena_free(&ctx->arena);
    mgpu__arena_free(&ctx->device_arena);
    mgpu_free(ctx->tape);
    mgpu_free(ctx);
}

MGPU_API mgpu_device mgpu_context_device(const mgpu_context *ctx) {
    mgpu_device cpu = {MGPU_DEVICE_CPU, 0};
    return ctx ? ctx->device : cpu;
}
MGPU_API int mgpu_context_num_threads(const mgpu_context *ctx) { return ctx ? ctx->pool->n_threads : 0; }
MGPU_API void mgpu_context_end_step(mgpu_context *ctx) {
    if (!ctx) return;
    ctx->tape_len = 0;
    mgpu__arena_reset(&ctx->arena);
    mgpu__arena_reset(&ctx->device_arena);   /* stream order keeps queued kernels ahead of the next step's writes */
}
MGPU_API int mgpu_set_grad_enabled(mgpu_context *ctx, int enabled) {
    int prev;
    if (!ctx) return 0;
    prev = ctx->grad_enabled;
    ctx->grad_enabled = enabled != 0;
    return prev;
}
MGPU_API int mgpu_is_grad_enabled(const mgpu_context *ctx) { return ctx ? ctx->grad_enabled : 0; }
MGPU_API void mgpu_context_rng_state(const mgpu_context *ctx, uint64_t *seed, uint64_t *offset) {
    if (!ctx) return;
    if (seed) *seed = ctx->rng_seed;
    if (offset) *offset = ctx->rng_offset;
}
MGPU_API void mgpu_context_set_rng_state(mgpu_context *ctx, uint64_t seed, uint64_t offset) {
    if (!ctx) return;
    ctx->rng_seed = seed; ctx->rng_offset = offset;
}
MGPU_API uint64_t mgpu_context_rng_reserve(mgpu_context *ctx, uint64_t n) {
    uint64_t first;
    if (!ctx) return 0;
    first = ctx->rng_offset;
    ctx->rng_offset += n;
    return first;
}
MGPU_API void mgpu_parallel_for(mgpu_context *ctx, int64_t n, int64_t min_chunk, mgpu_range_fn fn, void *arg) {
    if (!fn) return;
    mgpu__pool_parallel_for(ctx ? ctx->pool : NULL, n, min_chunk, fn, arg);
}

/* Whether the step now being recorded is a CUDA Graph capture: ops then take per-step values
   from step scalars (mgpu__step_scalar) and leave the host state to their replay hooks. */
static MGPU__UNUSED int mgpu__capturing(const mgpu_context *ctx) { return ctx->capture != NULL; }

/* During a capture: `words` consecutive step scalars that fn(obj, arg, words) fills before every
   replay (after redoing the host work the op does in an eager step); *at is their device address,
   for the captured kernels (or copies) to read. */
static MGPU__UNUSED mgpu_result mgpu__step_scalar(mgpu_context *ctx, mgpu__replay_fn fn, void *obj, int64_t arg, int words, void **at) {
    mgpu__step_capture *c = ctx->capture;
    mgpu__replay_hook *h;
    if (!c) return mgpu__fail(MGPU_ERR_STATE, "mgpu__step_scalar: no CUDA Graph capture in progress");
    if (words < 0 || c->n_words + words > MGPU__STEP_SLOTS || c->n_hooks == MGPU__STEP_SLOTS)
        return mgpu__fail(MGPU_ERR_UNSUPPORTED, "CUDA Graph capture: the step needs more than %d step scalars (per-step values such as "
                          "dropout RNG positions); it runs uncaptured", MGPU__STEP_SLOTS);
    h = &c->hooks[c->n_hooks++];
    h->fn = fn; h->obj = obj; h->arg = arg; h->word = c->n_words;
    *at = c->device_words + c->n_words;
    c->n_words += words;
    return MGPU_OK;
}

/* Step-lifetime host memory (freed by mgpu_context_end_step): headers, nodes, saved arguments. */
static MGPU__UNUSED void *mgpu__arena_alloc(mgpu_context *ctx, size_t bytes) {
    void *p = mgpu__arena_alloc_raw(&ctx->arena, bytes);
    if (!p) mgpu__fail(MGPU_ERR_OOM_HOST, "out of host memory growing the activation arena by %zu bytes", bytes);
    return p;
}
/* Step-lifetime memory that the twins read or write (activations, saved statistics, scratch):
   on the context's device, so device memory on CUDA. The device allocator records its own error. */
static MGPU__UNUSED void *mgpu__arena_alloc_data(mgpu_context *ctx, size_t bytes) {
    if (ctx->device.type != MGPU_DEVICE_CUDA) return mgpu__arena_alloc(ctx, bytes);
    return mgpu__arena_alloc_raw(&ctx->device_arena, bytes);
}

/* --------------------------------------------------------------------------------------
   The device seam (ahead of the tensors, whose fills and copies go through it)
   -------------------------------------------------------------------------------------- */

/* One call into an op's twin pair (see "Internal: the seam between the CPU and CUDA twins").
   Evaluates to an mgpu_result; CPU twins cannot fail once the front has validated. */
#ifdef MGPU_CUDA
#define MGPU__TWIN(ctx, stem, args) \
    ((ctx)->device.type == MGPU_DEVICE_CUDA ? mgpu_cuda_##stem((args), (ctx)->cuda_stream) : (mgpu__cpu_##stem(args), MGPU_OK))
#else
#define MGPU__TWIN(ctx, stem, args) (mgpu__cpu_##stem(args), MGPU_OK)
#endif

/* --------------------------------------------------------------------------------------
   Tensors
   -------------------------------------------------------------------------------------- */

MGPU_API void mgpu_shape_string(int ndim, const int64_t *shape, char *buf, size_t size) {
    size_t pos = 0;
    int i;
    if (!buf || size == 0) return;
    pos += (size_t)snprintf(buf, size, "(");
    for (i = 0; i < ndim && pos < size; i++)
        pos += (size_t)snprintf(buf + pos, size - pos, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (ndim == 1 && pos < size) pos += (size_t)snprintf(buf + pos, size - pos, ",");
    if (pos < size) snprintf(buf + pos, size - pos, ")");
}

/* Validates a shape; returns numel or -1 with an error naming `what`. */
static int64_t mgpu__shape_numel(int ndim, const int64_t *shape, const char *what) {
    int64_t n = 1;
    int i;
    if (ndim < 0 || ndim > MGPU_MAX_DIMS) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: ndim %d outside [0, %d]", what, ndim, MGPU_MAX_DIMS); return -1; }
    if (ndim > 0 && !shape) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: shape is NULL with ndim %d", what, ndim); return -1; }
    for (i = 0; i < ndim; i++) {
        if (shape[i] < 0) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: dimension %d is negative (%lld)", what, i, (long long)shape[i]); return -1; }
        if (shape[i] && n > INT64_MAX / 16 / shape[i]) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: shape too large", what); return -1; }
        n *= shape[i];
    }
    return n;
}

static void mgpu__tensor_init_header(mgpu_tensor *t, mgpu_context *ctx, mgpu_dtype dtype, int ndim, const int64_t *shape, int64_t numel) {
    memset(t, 0, sizeof *t);
    t->dtype = dtype;
    t->device = ctx->device;
    t->ndim = ndim;
    if (ndim) memcpy(t->shape, shape, sizeof(int64_t) * (size_t)ndim);
    t->numel = numel;
    t->ctx = ctx;
}

static int mgpu__on_host(const mgpu_tensor *t) { return t->device.type == MGPU_DEVICE_CPU; }

#ifdef MGPU_CUDA
/* Copies between host and device memory (either side may be either) on ctx's stream, and waits:
   the host reads or reuses its side as soon as this returns. Defined with the CUDA host side. */
static mgpu_result mgpu__cuda_transfer(mgpu_context *ctx, void *dst, const void *src, size_t bytes, const char *fn);
static mgpu_result mgpu__cuda_item_queue(mgpu_context *ctx, const mgpu_tensor *t);
static mgpu_result mgpu__cuda_item_wait(mgpu_context *ctx);
#endif
static MGPU__UNUSED mgpu_result mgpu__fill_zero_bytes(mgpu_context *ctx, void *dst, size_t bytes);

/* Zeroed storage for a persistent tensor on ctx's device (mgpu_tensor_create is torch.zeros). */
static void *mgpu__tensor_memory(mgpu_context *ctx, size_t bytes) {
#ifdef MGPU_CUDA
    if (ctx->device.type == MGPU_DEVICE_CUDA) {
        void *p = mgpu__cuda_alloc_for(ctx->device.index, bytes, "tensor data");
        if (p && mgpu__fill_zero_bytes(ctx, p, bytes) != MGPU_OK) { mgpu__cuda_release(ctx->device.index, p); return NULL; }
        return p;
    }
#endif
    (void)ctx;
    return mgpu__calloc(bytes, "tensor data");
}

/* dst = src (bytes) where either may live on the host or on ctx's device. */
static mgpu_result mgpu__transfer(mgpu_context *ctx, void *dst, const void *src, size_t bytes, const char *fn) {
#ifdef MGPU_CUDA
    if (ctx->device.type == MGPU_DEVICE_CUDA) return mgpu__cuda_transfer(ctx, dst, src, bytes, fn);
#endif
    (void)ctx; (void)fn;
    if (bytes) memmove(dst, src, bytes);
    return MGPU_OK;
}

static mgpu_tensor *mgpu__tensor_persistent(mgpu_context *ctx, mgpu_dtype dtype, int ndim, const int64_t *shape, void *wrap, const char *fn) {
    mgpu_tensor *t;
    int64_t numel;
    if (!ctx) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: ctx is NULL", fn);
    if (!mgpu__dtype_valid(dtype)) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: dtype %d is not a valid mgpu_dtype", fn, (int)dtype);
    numel = mgpu__shape_numel(ndim, shape, fn);
    if (numel < 0) return NULL;
    t = (mgpu_tensor *)mgpu__alloc(sizeof *t, "a tensor header");
    if (!t) return NULL;
    mgpu__tensor_init_header(t, ctx, dtype, ndim, shape, numel);
    if (wrap) { t->data = wrap; return t; }
    t->data = mgpu__tensor_memory(ctx, (size_t)numel * mgpu__dtype_sizes[dtype]);
    if (!t->data) { mgpu_free(t); return NULL; }
    t->owns_data = 1;
    return t;
}

MGPU_API mgpu_tensor *mgpu_tensor_create(mgpu_context *ctx, mgpu_dtype dtype, int ndim, const int64_t *shape) {
    return mgpu__tensor_persistent(ctx, dtype, ndim, shape, NULL, "mgpu_tensor_create");
}
MGPU_API mgpu_tensor *mgpu_tensor_wrap(mgpu_context *ctx, mgpu_dtype dtype, int ndim, const int64_t *shape, void *data) {
    if (!data) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_tensor_wrap: data is NULL");
    return mgpu__tensor_persistent(ctx, dtype, ndim, shape, data, "mgpu_tensor_wrap");
}
MGPU_API mgpu_tensor *mgpu_tensor_from_host(mgpu_context *ctx, mgpu_dtype dtype, int ndim, const int64_t *shape, const void *host) {
    mgpu_tensor *t;
    if (!host) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_tensor_from_host: host is NULL");
    t = mgpu__tensor_persistent(ctx, dtype, ndim, shape, NULL, "mgpu_tensor_from_host");
    if (t && mgpu__transfer(ctx, t->data, host, mgpu_tensor_nbytes(t), "mgpu_tensor_from_host") != MGPU_OK) { mgpu_tensor_free(t); return NULL; }
    return t;
}
MGPU_API void mgpu_tensor_free(mgpu_tensor *t) {
    if (!t || t->is_arena) return;
    if (t->grad) mgpu_tensor_free(t->grad);
#ifdef MGPU_CUDA
    if (t->owns_data && t->device.type == MGPU_DEVICE_CUDA) { mgpu__cuda_release(t->device.index, t->data); mgpu_free(t); return; }
#endif
    if (t->owns_data) mgpu_free(t->data);
    mgpu_free(t);
}
MGPU_API size_t mgpu_tensor_nbytes(const mgpu_tensor *t) {
    return t ? (size_t)t->numel * mgpu_dtype_size(t->dtype) : 0;
}

/* Activation tensor in the arena, data uninitialised. Ops create their outputs with this. */
static MGPU__UNUSED mgpu_tensor *mgpu__new_activation(mgpu_context *ctx, mgpu_dtype dtype, int ndim, const int64_t *shape) {
    mgpu_tensor *t;
    int64_t numel = mgpu__shape_numel(ndim, shape, "activation");
    if (numel < 0) return NULL;
    t = (mgpu_tensor *)mgpu__arena_alloc(ctx, sizeof *t);
    if (!t) return NULL;
    mgpu__tensor_init_header(t, ctx, dtype, ndim, shape, numel);
    t->is_arena = 1;
    t->data = mgpu__arena_alloc_data(ctx, (size_t)numel * mgpu__dtype_sizes[dtype]);
    return t->data ? t : NULL;
}
static MGPU__UNUSED mgpu_tensor *mgpu__new_activation_zeros(mgpu_context *ctx, mgpu_dtype dtype, int ndim, const int64_t *shape) {
    mgpu_tensor *t = mgpu__new_activation(ctx, dtype, ndim, shape);
    return t && mgpu_tensor_fill(t, 0.0) == MGPU_OK ? t : NULL;
}
/* Scratch that only a CUDA twin uses (partial sums, sort keys), in device memory for the rest of
   the step and 256-byte aligned; *out is NULL on the CPU, whose twins need none. */
static MGPU__UNUSED mgpu_result mgpu__cuda_scratch(mgpu_context *ctx, size_t bytes, void **out) {
    *out = NULL;
    if (ctx->device.type != MGPU_DEVICE_CUDA) return MGPU_OK;
    *out = mgpu__arena_alloc_data(ctx, bytes);
    return *out ? MGPU_OK : mgpu_last_result();
}
/* An activation sharing x's data with a new shape (reshape/flatten views). */
static MGPU__UNUSED mgpu_tensor *mgpu__new_view(mgpu_context *ctx, mgpu_tensor *x, int ndim, const int64_t *shape) {
    mgpu_tensor *t = (mgpu_tensor *)mgpu__arena_alloc(ctx, sizeof *t);
    if (!t) return NULL;
    mgpu__tensor_init_header(t, ctx, x->dtype, ndim, shape, x->numel);
    t->is_arena = 1;
    t->data = x->data;
    return t;
}

MGPU_API mgpu_result mgpu_tensor_copy_to_host(const mgpu_tensor *t, void *dst, size_t dst_bytes) {
    if (!t || !dst) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_copy_to_host: tensor and dst must not be NULL");
    if (dst_bytes < mgpu_tensor_nbytes(t))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_copy_to_host: dst has %zu bytes, tensor needs %zu", dst_bytes, mgpu_tensor_nbytes(t));
    return mgpu__transfer(t->ctx, dst, t->data, mgpu_tensor_nbytes(t), "mgpu_tensor_copy_to_host");
}
MGPU_API mgpu_result mgpu_tensor_copy_from_host(mgpu_tensor *t, const void *src, size_t src_bytes) {
    if (!t || !src) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_copy_from_host: tensor and src must not be NULL");
    if (src_bytes != mgpu_tensor_nbytes(t))
        return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_tensor_copy_from_host: src has %zu bytes, tensor holds %zu", src_bytes, mgpu_tensor_nbytes(t));
    return mgpu__transfer(t->ctx, t->data, src, src_bytes, "mgpu_tensor_copy_from_host");
}
static int mgpu__same_device(mgpu_device a, mgpu_device b) { return a.type == b.type && (a.type == MGPU_DEVICE_CPU || a.index == b.index); }

/* mgpu_tensor_copy between two devices: through the host side, staged when neither is the host. */
static mgpu_result mgpu__copy_across_devices(mgpu_tensor *dst, const mgpu_tensor *src) {
    size_t bytes = mgpu_tensor_nbytes(src);
    void *stage;
    mgpu_result r;
    if (mgpu__on_host(src)) return mgpu_tensor_copy_from_host(dst, src->data, bytes);
    if (mgpu__on_host(dst)) return mgpu_tensor_copy_to_host(src, dst->data, bytes);
    stage = mgpu__alloc(bytes, "staging a copy between two GPUs");
    if (!stage) return MGPU_ERR_OOM_HOST;
    r = mgpu_tensor_copy_to_host(src, stage, bytes);
    if (r == MGPU_OK) r = mgpu_tensor_copy_from_host(dst, stage, bytes);
    mgpu_free(stage);
    return r;
}
static void mgpu__cpu_accumulate(const mgpu__accumulate_args *a);   /* with the elementwise ops */
/* memmove: mgpu_tensor_wrap lets users hand in arrays of their own that may overlap */
static void mgpu__cpu_copy(const mgpu__copy_args *a) { memmove(a->dst, a->src, a->bytes); }

MGPU_API mgpu_result mgpu_tensor_copy(mgpu_tensor *dst, const mgpu_tensor *src) {
    mgpu__copy_args a;
    if (!dst || !src) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_copy: dst and src must not be NULL");
    if (dst->dtype != src->dtype || dst->numel != src->numel)
        return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_tensor_copy: dst is %s x %lld, src is %s x %lld", mgpu_dtype_name(dst->dtype),
                          (long long)dst->numel, mgpu_dtype_name(src->dtype), (long long)src->numel);
    if (dst->data == src->data) return MGPU_OK;
    if (!mgpu__same_device(dst->device, src->device)) return mgpu__copy_across_devices(dst, src);
    a.ctx = dst->ctx; a.src = src->data; a.dst = dst->data; a.bytes = mgpu_tensor_nbytes(src);
    return MGPU__TWIN(dst->ctx, copy, &a);
}

MGPU_API mgpu_tensor *mgpu_tensor_to(mgpu_context *ctx, const mgpu_tensor *src) {
    mgpu_tensor *t;
    if (!ctx || !src) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_tensor_to: ctx and src must not be NULL");
    t = mgpu_tensor_create(ctx, src->dtype, src->ndim, src->shape);
    if (t && mgpu_tensor_copy(t, src) != MGPU_OK) { mgpu_tensor_free(t); return NULL; }
    return t;
}

/* Element i of any dtype as double / stored from double (host tensors). */
static MGPU__UNUSED double mgpu__load(const void *data, mgpu_dtype dt, int64_t i) {
    switch (dt) {
    case MGPU_F32: return ((const float *)data)[i];
    case MGPU_F16: return mgpu_f16_to_f32(((const uint16_t *)data)[i]);
    case MGPU_BF16: return mgpu_bf16_to_f32(((const uint16_t *)data)[i]);
    case MGPU_I32: return ((const int32_t *)data)[i];
    case MGPU_I64: return (double)((const int64_t *)data)[i];
    case MGPU_U8: return ((const uint8_t *)data)[i];
    }
    return NAN;
}
static MGPU__UNUSED void mgpu__store(void *data, mgpu_dtype dt, int64_t i, double v) {
    switch (dt) {
    case MGPU_F32: ((float *)data)[i] = (float)v; break;
    case MGPU_F16: ((uint16_t *)data)[i] = mgpu_f32_to_f16((float)v); break;
    case MGPU_BF16: ((uint16_t *)data)[i] = mgpu_f32_to_bf16((float)v); break;
    case MGPU_I32: ((int32_t *)data)[i] = (int32_t)v; break;
    case MGPU_I64: ((int64_t *)data)[i] = (int64_t)v; break;
    case MGPU_U8: ((uint8_t *)data)[i] = (uint8_t)v; break;
    }
}

static void mgpu__cpu_fill(const mgpu__fill_args *a) {
    int64_t i;
    if (a->value == 0.0) { memset(a->dst, 0, (size_t)a->n * mgpu__dtype_sizes[a->dtype]); return; }
    for (i = 0; i < a->n; i++) mgpu__store(a->dst, a->dtype, i, a->value);
}

/* Zero bytes on ctx's device through the fill twin (U8 view of the bytes). */
static MGPU__UNUSED mgpu_result mgpu__fill_zero_bytes(mgpu_context *ctx, void *dst, size_t bytes) {
    mgpu__fill_args a;
    a.ctx = ctx; a.dst = dst; a.dtype = MGPU_U8; a.n = (int64_t)bytes; a.value = 0.0;
    return MGPU__TWIN(ctx, fill, &a);
}

MGPU_API mgpu_result mgpu_tensor_fill(mgpu_tensor *t, double value) {
    mgpu__fill_args a;
    if (!t) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_fill: tensor is NULL");
    a.ctx = t->ctx; a.dst = t->data; a.dtype = t->dtype; a.n = t->numel; a.value = value;
    return MGPU__TWIN(t->ctx, fill, &a);
}
/* The one host synchronisation a CUDA training step makes (the loss it prints). */
MGPU_API double mgpu_tensor_item(const mgpu_tensor *t) {
    unsigned char first[8];
    if (!t || t->numel < 1) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_item: tensor is NULL or empty"); return NAN; }
    if (mgpu__transfer(t->ctx, first, t->data, mgpu__dtype_sizes[t->dtype], "mgpu_tensor_item") != MGPU_OK) return NAN;
    return mgpu__load(first, t->dtype, 0);
}
/* A scalar read back without a host wait of its own, for the trainer's loss: _begin queues the
   copy of t's first element (into the context's pinned readback word on a GPU) and _end returns
   it, waiting for the stream only if the host has not waited for it since. On an fp16 step the
   loss scaler's found-inf read is such a wait, so the step waits once, not twice. One read may be
   pending per context (the word is shared); t must stay alive until _end. */
typedef struct mgpu__pending_item { const mgpu_tensor *t; uint64_t waits; int queued; } mgpu__pending_item;
static void mgpu__item_begin(const mgpu_tensor *t, mgpu__pending_item *p) {
    p->t = t; p->queued = 0; p->waits = 0;
#ifdef MGPU_CUDA
    if (t && t->numel > 0 && t->ctx->device.type == MGPU_DEVICE_CUDA && !t->ctx->capture && mgpu__cuda_item_queue(t->ctx, t) == MGPU_OK) {
        p->queued = 1;
        p->waits = t->ctx->host_waits;
    }
#endif
}
static double mgpu__item_end(mgpu__pending_item *p) {
#ifdef MGPU_CUDA
    if (p->queued) {
        mgpu_context *ctx = p->t->ctx;
        p->queued = 0;
        if (ctx->host_waits == p->waits && mgpu__cuda_item_wait(ctx) != MGPU_OK) return NAN;
        return mgpu__load(ctx->readback, p->t->dtype, 0);
    }
#endif
    return mgpu_tensor_item(p->t);   /* the CPU, or the copy could not be queued: the plain read */
}

MGPU_API mgpu_result mgpu_tensor_set_requires_grad(mgpu_tensor *t, int requires_grad) {
    if (!t) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_set_requires_grad: tensor is NULL");
    if (requires_grad && !mgpu__dtype_is_float(t->dtype))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_set_requires_grad: only float tensors can require grad (this one is %s)", mgpu_dtype_name(t->dtype));
    t->requires_grad = requires_grad != 0;
    return MGPU_OK;
}
MGPU_API float *mgpu_tensor_f32(const mgpu_tensor *t) {
    if (!t) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_f32: tensor is NULL"); return NULL; }
    if (t->dtype != MGPU_F32 || !mgpu__on_host(t)) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_f32: tensor is %s on %s, need F32 on cpu", mgpu_dtype_name(t->dtype), t->device.type == MGPU_DEVICE_CPU ? "cpu" : "cuda"); return NULL; }
    return (float *)t->data;
}
MGPU_API int mgpu_tensor_same_shape(const mgpu_tensor *a, const mgpu_tensor *b) {
    if (!a || !b || a->ndim != b->ndim) return 0;
    return memcmp(a->shape, b->shape, sizeof(int64_t) * (size_t)a->ndim) == 0;
}
MGPU_API mgpu_result mgpu_tensor_zero_grad(mgpu_tensor *t) {
    if (!t) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_zero_grad: tensor is NULL");
    return t->grad ? mgpu_tensor_fill(t->grad, 0.0) : MGPU_OK;
}
MGPU_API mgpu_result mgpu_tensor_set_grad_hook(mgpu_tensor *t, mgpu_grad_hook hook, void *user) {
    if (!t) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_set_grad_hook: tensor is NULL");
    if (t->node || t->is_arena) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_set_grad_hook: hooks go on leaf tensors (parameters), not op outputs");
    t->grad_hook = hook; t->grad_hook_user = user;
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   Helpers for op authors
   -------------------------------------------------------------------------------------- */

/* Shape text for messages, in a rotating thread-local buffer (up to 4 per message). */
static MGPU__UNUSED const char *mgpu__shape_str(const mgpu_tensor *t) {
    static MGPU__THREAD_LOCAL char bufs[4][96];
    static MGPU__THREAD_LOCAL int which = 0;
    char *b = bufs[which++ & 3];
    if (!t) return "(null)";
    mgpu_shape_string(t->ndim, t->shape, b, 96);
    return b;
}

/* Input check for ops: NULL input -> NULL quietly (the first error stays); wrong context or
   dtype -> an error naming op and argument. Returns 1 if fine. */
static MGPU__UNUSED int mgpu__check_input(mgpu_context *ctx, const char *op, const char *arg, const mgpu_tensor *t, int want_float) {
    if (!ctx) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: ctx is NULL", op); return 0; }
    if (!t) {
        if (mgpu__error_code == MGPU_OK) mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: %s is NULL", op, arg);
        return 0;
    }
    if (t->device.type != ctx->device.type || t->device.index != ctx->device.index) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: %s is on another device than the context", op, arg);
        return 0;
    }
    if (want_float && t->dtype != MGPU_F32) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: %s must be F32, got %s", op, arg, mgpu_dtype_name(t->dtype));
        return 0;
    }
    return 1;
}
/* Index tensors: I32 or I64. */
static MGPU__UNUSED int mgpu__check_index(mgpu_context *ctx, const char *op, const char *arg, const mgpu_tensor *t) {
    if (!mgpu__check_input(ctx, op, arg, t, 0)) return 0;
    if (t->dtype != MGPU_I32 && t->dtype != MGPU_I64) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: %s must be I32 or I64, got %s", op, arg, mgpu_dtype_name(t->dtype));
        return 0;
    }
    return 1;
}
static MGPU__UNUSED int64_t mgpu__index_at(const mgpu_tensor *t, int64_t i) {
    return t->dtype == MGPU_I64 ? ((const int64_t *)t->data)[i] : (int64_t)((const int32_t *)t->data)[i];
}
/* dim in [-ndim, ndim) -> [0, ndim), or -1 with an error. */
static MGPU__UNUSED int mgpu__norm_dim(const char *op, int dim, int ndim) {
    int d = dim < 0 ? dim + ndim : dim;
    if (d < 0 || d >= ndim) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: dim %d out of range for a %d-d tensor", op, dim, ndim); return -1; }
    return d;
}

/* Record an op on the tape if grad mode is on and an input requires grad. Sets out->requires_grad
   and out->node. Returns the node (fill saved/iarg/farg), or NULL when nothing is recorded
   (check mgpu_last_result only if you need to distinguish allocation failure: *failed is set). */
static MGPU__UNUSED mgpu__node *mgpu__record(mgpu_context *ctx, const char *name, mgpu__backward_fn backward, mgpu_tensor *out,
                                int n_in, mgpu_tensor *const *in, int *failed) {
    mgpu__node *node;
    int i, needs = 0;
    *failed = 0;
    if (!ctx->grad_enabled) return NULL;
    for (i = 0; i < n_in; i++) if (in[i] && in[i]->requires_grad) needs = 1;
    if (!needs) return NULL;
    if (ctx->tape_len == ctx->tape_cap) {
        int64_t cap = ctx->tape_cap ? 2 * ctx->tape_cap : 256;
        mgpu__node **nt = (mgpu__node **)mgpu__alloc(sizeof(mgpu__node *) * (size_t)cap, "the autograd tape");
        if (!nt) { *failed = 1; return NULL; }
        if (ctx->tape_len) memcpy(nt, ctx->tape, sizeof(mgpu__node *) * (size_t)ctx->tape_len);
        mgpu_free(ctx->tape);
        ctx->tape = nt; ctx->tape_cap = cap;
    }
    node = (mgpu__node *)mgpu__arena_alloc(ctx, sizeof *node);
    if (!node) { *failed = 1; return NULL; }
    memset(node, 0, sizeof *node);
    node->in = (mgpu_tensor **)mgpu__arena_alloc(ctx, sizeof(mgpu_tensor *) * (size_t)(n_in > 0 ? n_in : 1));
    if (!node->in) { *failed = 1; return NULL; }
    for (i = 0; i < n_in; i++) node->in[i] = in[i];
    node->n_in = n_in;
    node->backward = backward;
    node->name = name;
    node->out = out;
    out->requires_grad = 1;
    out->node = node;
    ctx->tape[ctx->tape_len++] = node;
    return node;
}
/* Convenience for the common 1- and 2-input cases: NULL return on allocation failure means
   the whole op fails; *rec tells whether a node was recorded. */
#define MGPU__RECORD(ctx, name, bw, out, n, ins, node_var) \
    do { int mgpu__failed_; node_var = mgpu__record((ctx), (name), (bw), (out), (n), (ins), &mgpu__failed_); \
         if (mgpu__failed_) return NULL; } while (0)
/* For ops whose backward needs nothing saved on the node. */
#define MGPU__RECORD_PLAIN(ctx, name, bw, out, n, ins) \
    do { int mgpu__failed_; mgpu__record((ctx), (name), (bw), (out), (n), (ins), &mgpu__failed_); \
         if (mgpu__failed_) return NULL; } while (0)

/* The F32 gradient buffer of t for accumulation, allocated zeroed on first use (persistent for
   leaves, arena for activations); NULL when t does not require grad. */
static MGPU__UNUSED float *mgpu__grad_f32(mgpu_context *ctx, mgpu_tensor *t) {
    if (!t || !t->requires_grad) return NULL;
    if (!t->grad) {
        if (t->is_arena) t->grad = mgpu__new_activation_zeros(ctx, MGPU_F32, t->ndim, t->shape);
        else t->grad = mgpu_tensor_create(ctx, MGPU_F32, t->ndim, t->shape);
        if (!t->grad) return NULL;
    }
    return (float *)t->grad->data;
}
/* Whether a backward should compute the gradient of input i at all. */
static MGPU__UNUSED int mgpu__needs_grad(const mgpu__node *n, int i) { return i < n->n_in && n->in[i] && n->in[i]->requires_grad; }
/* Error for a failed grad allocation inside a backward */
#define MGPU__GRAD_OR_FAIL(ptr, ctx, t) do { ptr = mgpu__grad_f32((ctx), (t)); if (!(ptr)) return mgpu_last_result() ? mgpu_last_result() : MGPU_ERR_OOM_HOST; } while (0)

/* --------------------------------------------------------------------------------------
   Backward
   -------------------------------------------------------------------------------------- */

static int mgpu__is_leaf(const mgpu_tensor *t) { return t && !t->node && !t->is_arena; }

MGPU_API mgpu_result mgpu_backward_with_grad(mgpu_context *ctx, mgpu_tensor *out, const mgpu_tensor *grad_output) {
    int64_t i, first = 0;
    int j;
    float *g;
    if (!ctx || !out || !grad_output) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_backward: ctx, output and its gradient must not be NULL");
    if (!out->requires_grad)
        return mgpu__fail(MGPU_ERR_STATE, "mgpu_backward: the output does not require grad (no parameter or input with requires_grad reached it, or grad mode was off)");
    if (!mgpu_tensor_same_shape(out, grad_output) || grad_output->dtype != MGPU_F32)
        return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_backward: gradient is %s %s, output is %s", mgpu_dtype_name(grad_output->dtype),
                          mgpu__shape_str(grad_output), mgpu__shape_str(out));
    if (out->node && out->node->consumed)
        return mgpu__fail(MGPU_ERR_STATE, "mgpu_backward: this output's graph was already walked by a backward; call mgpu_context_end_step and run the forward again");
    /* walk only nodes not consumed by an earlier backward of this step (micro-batches) */
    while (first < ctx->tape_len && ctx->tape[first]->consumed) first++;
    /* pending contributions per leaf, so the grad-ready hook fires on the last one */
    for (i = first; i < ctx->tape_len; i++)
        for (j = 0; j < ctx->tape[i]->n_in; j++)
            if (mgpu__is_leaf(ctx->tape[i]->in[j])) ctx->tape[i]->in[j]->pending_grads = 0;
    for (i = first; i < ctx->tape_len; i++)
        for (j = 0; j < ctx->tape[i]->n_in; j++)
            if (mgpu__is_leaf(ctx->tape[i]->in[j]) && ctx->tape[i]->in[j]->requires_grad) ctx->tape[i]->in[j]->pending_grads++;
    if (!mgpu__same_device(grad_output->device, ctx->device))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_backward: the gradient is on another device than the context");
    g = mgpu__grad_f32(ctx, out);
    if (!g) return mgpu_last_result();
    {
        mgpu__accumulate_args acc;
        mgpu_result r;
        acc.ctx = ctx; acc.x = (const float *)grad_output->data; acc.out = g; acc.n = out->numel;
        if ((r = MGPU__TWIN(ctx, accumulate, &acc)) != MGPU_OK) return r;
    }
    if (mgpu__is_leaf(out) && out->grad_hook) out->grad_hook(out, out->grad_hook_user);
    for (i = ctx->tape_len - 1; i >= first; i--) {
        mgpu__node *n = ctx->tape[i];
        if (n->out->grad) {
            mgpu_result r = n->backward(ctx, n);
            if (r != MGPU_OK) {
                if (mgpu_last_result() == MGPU_OK) mgpu__fail(r, "mgpu_backward: backward of %s failed", n->name);
                return r;
            }
        }
        n->consumed = 1;
        for (j = 0; j < n->n_in; j++) {
            mgpu_tensor *leaf = n->in[j];
            if (mgpu__is_leaf(leaf) && leaf->requires_grad && --leaf->pending_grads == 0 && leaf->grad_hook && leaf->grad)
                leaf->grad_hook(leaf, leaf->grad_hook_user);
        }
    }
    return ctx->backward_end ? ctx->backward_end(ctx, ctx->backward_end_user) : MGPU_OK;
}

MGPU_API void mgpu_context_set_backward_end_hook(mgpu_context *ctx, mgpu_backward_end_fn fn, void *user) {
    if (!ctx) return;
    ctx->backward_end = fn; ctx->backward_end_user = user;
}

MGPU_API mgpu_result mgpu_backward(mgpu_context *ctx, mgpu_tensor *loss) {
    mgpu_tensor *one;
    if (!ctx || !loss) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_backward: ctx and loss must not be NULL");
    if (loss->numel != 1) return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_backward: loss must be a scalar, got shape %s (use mgpu_backward_with_grad)", mgpu__shape_str(loss));
    /* d loss / d loss = 1, made where the loss lives so no host value crosses to the device */
    one = mgpu__new_activation(ctx, MGPU_F32, loss->ndim, loss->shape);
    if (!one || mgpu_tensor_fill(one, 1.0) != MGPU_OK) return mgpu_last_result();
    return mgpu_backward_with_grad(ctx, loss, one);
}

/* CUDA host side: host side of the CUDA backend (compiled only under MGPU_CUDA): the error bridge
   used by mgpu_kernels.cu, a caching device allocator with statistics, pinned host buffers, async
   copies, per-device stream + cuBLAS resources, and CUDA Graph capture of a training step.
   Kernels live in mgpu_kernels.cu. */
#ifndef MGPU__CUDA_HOST_H
#define MGPU__CUDA_HOST_H
#ifdef MGPU_CUDA
#if defined(MGPU_IMPLEMENTATION)

/* Kernels report failures as a code and a finished sentence; this files it as this thread's error. */
void mgpu__set_error_from_cuda(int code, const char *msg) { mgpu__fail((mgpu_result)code, "%s", msg); }

static mgpu_result mgpu__cuda_fail(cudaError_t e, const char *fn, const char *call) {
    (void)cudaGetLastError();   /* reported, so handled: the next launch check must not find it again */
    return mgpu__fail(e == cudaErrorMemoryAllocation ? MGPU_ERR_OOM_DEVICE : MGPU_ERR_CUDA, "%s: %s failed: %s (%s)", fn, call,
                      cudaGetErrorString(e), cudaGetErrorName(e));
}
#define MGPU__CUDA_TRY(fn, call) do { cudaError_t e_ = (call); if (e_ != cudaSuccess) return mgpu__cuda_fail(e_, fn, #call); } while (0)

/* --------------------------------------------------------------------------------------
   Caching device allocator. Requests are rounded to a size class (512 B steps below 1 MiB, 2 MiB
   steps above), freed blocks stay reserved and are handed out again best-fit (at most 25% larger),
   so a training loop stops calling cudaMalloc/cudaFree after its first step. One lock for all
   devices: allocation is rare next to kernel launches.
   -------------------------------------------------------------------------------------- */

#define MGPU__CUDA_MAX_DEVICES 64
typedef struct mgpu__cuda_block { void *ptr; size_t size; int in_use; } mgpu__cuda_block;
typedef struct mgpu__cuda_pool { mgpu__cuda_block *blocks; int n, cap; int64_t allocated, reserved, peak; } mgpu__cuda_pool;
static mgpu__cuda_pool mgpu__cuda_pools[MGPU__CUDA_MAX_DEVICES];
static pthread_mutex_t mgpu__cuda_pool_mu = PTHREAD_MUTEX_INITIALIZER;

static size_t mgpu__cuda_size_class(size_t bytes) {
    const size_t small = 512, large = (size_t)2 << 20;
    if (bytes == 0) bytes = 1;
    return bytes < ((size_t)1 << 20) ? (bytes + small - 1) / small * small : (bytes + large - 1) / large * large;
}

static int mgpu__cuda_device_ok(int device, const char *fn) {
    int n = mgpu_cuda_device_count();
    if (n < 0) return 0;   /* CUDA itself failed: that error stands */
    if (device < 0 || device >= MGPU__CUDA_MAX_DEVICES || device >= n) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: device %d is not a visible CUDA device (%d visible)", fn, device, n);
        return 0;
    }
    return 1;
}

/* Best-fit free block of at least `size` and at most 25% larger; -1 if none. Caller holds the lock. */
static int mgpu__cuda_pool_find(const mgpu__cuda_pool *p, size_t size) {
    int i, best = -1;
    for (i = 0; i < p->n; i++) {
        const mgpu__cuda_block *b = &p->blocks[i];
        if (b->in_use || b->size < size || b->size > size + size / 4) continue;
        if (best < 0 || b->size < p->blocks[best].size) best = i;
    }
    return best;
}

/* Returns cached blocks of one device to the driver. Caller holds the lock and has set the device. */
static void mgpu__cuda_pool_release_free(mgpu__cuda_pool *p) {
    int i, kept = 0;
    for (i = 0; i < p->n; i++) {
        if (p->blocks[i].in_use) { p->blocks[kept++] = p->blocks[i]; continue; }
        cudaFree(p->blocks[i].ptr);
        p->reserved -= (int64_t)p->blocks[i].size;
    }
    p->n = kept;
}

static int mgpu__cuda_pool_push(mgpu__cuda_pool *p, void *ptr, size_t size) {
    if (p->n == p->cap) {
        int cap = p->cap ? 2 * p->cap : 64;
        mgpu__cuda_block *nb = (mgpu__cuda_block *)realloc(p->blocks, sizeof(mgpu__cuda_block) * (size_t)cap);
        if (!nb) return 0;
        p->blocks = nb; p->cap = cap;
    }
    p->blocks[p->n].ptr = ptr; p->blocks[p->n].size = size; p->blocks[p->n].in_use = 1;
    p->n++;
    return 1;
}

static void mgpu__cuda_pool_account(mgpu__cuda_pool *p, int64_t delta) {
    p->allocated += delta;
    if (p->allocated > p->peak) p->peak = p->allocated;
}

static double mgpu__mib(int64_t bytes) { return (double)bytes / (1024.0 * 1024.0); }

/* cudaMalloc on a miss; on OOM the cache is emptied once and the call retried. Caller holds the
   lock. An OOM names what was being allocated, its size and the free memory, as a user needs to
   choose a smaller batch. */
static void *mgpu__cuda_pool_grow(mgpu__cuda_pool *p, int device, size_t size, const char *what) {
    void *ptr = NULL;
    cudaError_t e = cudaMalloc(&ptr, size);
    if (e == cudaErrorMemoryAllocation) {
        cudaGetLastError();   /* clear the error before retrying */
        mgpu__cuda_pool_release_free(p);
        e = cudaMalloc(&ptr, size);
    }
    if (e == cudaErrorMemoryAllocation) {
        size_t free_b = 0, total_b = 0;
        cudaGetLastError();
        cudaMemGetInfo(&free_b, &total_b);
        mgpu__fail(MGPU_ERR_OOM_DEVICE,
                   "out of memory on cuda:%d allocating %.1f MiB for %s: %.1f MiB free of %.1f MiB (mgpu holds %.1f MiB in tensors, "
                   "%.1f MiB reserved); try a smaller --batch-size or --amp bf16",
                   device, mgpu__mib((int64_t)size), what, mgpu__mib((int64_t)free_b), mgpu__mib((int64_t)total_b),
                   mgpu__mib(p->allocated), mgpu__mib(p->reserved));
        return NULL;
    }
    if (e != cudaSuccess) {
        mgpu__fail(MGPU_ERR_CUDA, "cudaMalloc of %zu bytes for %s on cuda:%d failed: %s", size, what, device, cudaGetErrorString(e));
        return NULL;
    }
    if (!mgpu__cuda_pool_push(p, ptr, size)) {
        cudaFree(ptr);
        mgpu__fail(MGPU_ERR_OOM_HOST, "mgpu_cuda_malloc: no host memory for the allocator's block table");
        return NULL;
    }
    p->reserved += (int64_t)size;
    return ptr;
}

static void *mgpu__cuda_alloc_for(int device, size_t bytes, const char *what) {
    mgpu__cuda_pool *p;
    size_t size = mgpu__cuda_size_class(bytes);
    void *ptr = NULL;
    int prev = 0, hit;
    if (!mgpu__cuda_device_ok(device, "mgpu_cuda_malloc")) return NULL;
    if (cudaGetDevice(&prev) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
        mgpu__fail(MGPU_ERR_CUDA, "mgpu_cuda_malloc: cudaSetDevice(%d) failed", device);
        return NULL;
    }
    pthread_mutex_lock(&mgpu__cuda_pool_mu);
    p = &mgpu__cuda_pools[device];
    hit = mgpu__cuda_pool_find(p, size);
    if (hit >= 0) { p->blocks[hit].in_use = 1; ptr = p->blocks[hit].ptr; size = p->blocks[hit].size; }
    else ptr = mgpu__cuda_pool_grow(p, device, size, what);
    if (ptr) mgpu__cuda_pool_account(p, (int64_t)size);
    pthread_mutex_unlock(&mgpu__cuda_pool_mu);
    cudaSetDevice(prev);
    return ptr;
}

MGPU_API void *mgpu_cuda_malloc(int device, size_t bytes) { return mgpu__cuda_alloc_for(device, bytes, "a buffer"); }

/* The block goes back to the cache, not to the driver. Work still queued on it must be ordered
   before its next user: the context uses one stream per device, so stream order guarantees it. */
MGPU_API void mgpu_cuda_free(int device, void *ptr) { mgpu__cuda_release(device, ptr); }
static void mgpu__cuda_release(int device, void *ptr) {
    mgpu__cuda_pool *p;
    int i, found = 0;
    if (!ptr) return;
    if (!mgpu__cuda_device_ok(device, "mgpu_cuda_free")) return;
    pthread_mutex_lock(&mgpu__cuda_pool_mu);
    p = &mgpu__cuda_pools[device];
    for (i = 0; i < p->n; i++)
        if (p->blocks[i].ptr == ptr && p->blocks[i].in_use) {
            p->blocks[i].in_use = 0;
            mgpu__cuda_pool_account(p, -(int64_t)p->blocks[i].size);
            found = 1;
            break;
        }
    pthread_mutex_unlock(&mgpu__cuda_pool_mu);
    if (!found) mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_cuda_free: %p was not allocated by mgpu_cuda_malloc on cuda:%d (or freed twice)", ptr, device);
}

MGPU_API mgpu_result mgpu_cuda_empty_cache(int device) {
    int prev = 0;
    if (!mgpu__cuda_device_ok(device, "mgpu_cuda_empty_cache")) return MGPU_ERR_INVALID_ARG;
    MGPU__CUDA_TRY("mgpu_cuda_empty_cache", cudaGetDevice(&prev));
    MGPU__CUDA_TRY("mgpu_cuda_empty_cache", cudaSetDevice(device));
    MGPU__CUDA_TRY("mgpu_cuda_empty_cache", cudaDeviceSynchronize());   /* no kernel may still use a cached block */
    pthread_mutex_lock(&mgpu__cuda_pool_mu);
    mgpu__cuda_pool_release_free(&mgpu__cuda_pools[device]);
    pthread_mutex_unlock(&mgpu__cuda_pool_mu);
    MGPU__CUDA_TRY("mgpu_cuda_empty_cache", cudaSetDevice(prev));
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_memory_stats_get(int device, mgpu_memory_stats *out) {
    const mgpu__cuda_pool *p;
    if (!out) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_memory_stats_get: out is NULL");
    memset(out, 0, sizeof *out);
    if (!mgpu__cuda_device_ok(device, "mgpu_memory_stats_get")) return MGPU_ERR_INVALID_ARG;
    pthread_mutex_lock(&mgpu__cuda_pool_mu);
    p = &mgpu__cuda_pools[device];
    out->allocated = p->allocated; out->reserved = p->reserved; out->peak = p->peak;
    pthread_mutex_unlock(&mgpu__cuda_pool_mu);
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   Pinned host memory and async copies
   -------------------------------------------------------------------------------------- */

MGPU_API void *mgpu_cuda_host_alloc(size_t bytes) {
    void *p = NULL;
    cudaError_t e = cudaMallocHost(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        mgpu__fail(MGPU_ERR_OOM_HOST, "mgpu_cuda_host_alloc: cudaMallocHost of %zu bytes failed: %s", bytes, cudaGetErrorString(e));
        return NULL;
    }
    return p;
}
MGPU_API void mgpu_cuda_host_free(void *ptr) { if (ptr) cudaFreeHost(ptr); }

static mgpu_result mgpu__cuda_copy_async(const char *fn, void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind, void *stream) {
    if (bytes == 0) return MGPU_OK;
    if (!dst || !src) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: dst and src must not be NULL", fn);
    MGPU__CUDA_TRY(fn, cudaMemcpyAsync(dst, src, bytes, kind, (cudaStream_t)stream));
    return MGPU_OK;
}
MGPU_API mgpu_result mgpu_cuda_copy_h2d_async(void *dst, const void *src, size_t bytes, void *stream) {
    return mgpu__cuda_copy_async("mgpu_cuda_copy_h2d_async", dst, src, bytes, cudaMemcpyHostToDevice, stream);
}
MGPU_API mgpu_result mgpu_cuda_copy_d2h_async(void *dst, const void *src, size_t bytes, void *stream) {
    return mgpu__cuda_copy_async("mgpu_cuda_copy_d2h_async", dst, src, bytes, cudaMemcpyDeviceToHost, stream);
}
MGPU_API mgpu_result mgpu_cuda_copy_d2d_async(void *dst, const void *src, size_t bytes, void *stream) {
    return mgpu__cuda_copy_async("mgpu_cuda_copy_d2d_async", dst, src, bytes, cudaMemcpyDeviceToDevice, stream);
}

/* "NAME, N GiB" of a device for messages such as the trainer's startup line; "unknown device"
   where the properties cannot be read (the error is cleared: a description never fails a run). */
static void mgpu__cuda_device_describe(int device, char *buf, size_t size) {
    struct cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, device) != cudaSuccess) {
        cudaGetLastError();
        snprintf(buf, size, "unknown device");
        return;
    }
    snprintf(buf, size, "%s, %.0f GiB", p.name, (double)p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
}

/* --------------------------------------------------------------------------------------
   Per-device resources of a context
   -------------------------------------------------------------------------------------- */

MGPU_API mgpu_result mgpu_cuda_device_ctx_init(mgpu_cuda_device_ctx *d, int device) {
    cudaStream_t s = NULL;
    mgpu_result r;
    if (!d) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_cuda_device_ctx_init: d is NULL");
    memset(d, 0, sizeof *d);
    if (!mgpu__cuda_device_ok(device, "mgpu_cuda_device_ctx_init")) return MGPU_ERR_INVALID_ARG;
    MGPU__CUDA_TRY("mgpu_cuda_device_ctx_init", cudaSetDevice(device));
    /* non-blocking: the legacy default stream must not serialise against the step */
    MGPU__CUDA_TRY("mgpu_cuda_device_ctx_init", cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    d->device = device; d->stream = (void *)s;
    r = mgpu_cuda_blas_create(&d->blas, d->stream, 0);
    if (r != MGPU_OK) { mgpu_cuda_device_ctx_release(d); return r; }
    return MGPU_OK;
}
MGPU_API void mgpu_cuda_device_ctx_release(mgpu_cuda_device_ctx *d) {
    if (!d) return;
    if (d->stream) cudaStreamSynchronize((cudaStream_t)d->stream);
    mgpu_cuda_blas_destroy(d->blas);
    if (d->stream) cudaStreamDestroy((cudaStream_t)d->stream);
    memset(d, 0, sizeof *d);
}

/* --------------------------------------------------------------------------------------
   The core's CUDA side: a context's stream and cuBLAS(Lt) handles, and its host<->device copies
   -------------------------------------------------------------------------------------- */

static mgpu_result mgpu__cuda_context_init(mgpu_context *ctx) {
    mgpu_cuda_device_ctx d;
    mgpu_result r = mgpu_cuda_device_ctx_init(&d, ctx->device.index);   /* also makes the device current */
    if (r != MGPU_OK) return r;
    ctx->cuda_stream = d.stream;
    ctx->cuda_blas = d.blas;
    return MGPU_OK;
}
static void mgpu__cuda_context_release(mgpu_context *ctx) {
    mgpu_cuda_device_ctx d;
    if (!ctx->cuda_stream) return;
    d.device = ctx->device.index; d.stream = ctx->cuda_stream; d.blas = ctx->cuda_blas;
    mgpu_cuda_device_ctx_release(&d);   /* synchronises the stream first */
    ctx->cuda_stream = ctx->cuda_blas = NULL;
    mgpu_cuda_host_free(ctx->readback);
    ctx->readback = NULL;
}

static mgpu_result mgpu__cuda_transfer(mgpu_context *ctx, void *dst, const void *src, size_t bytes, const char *fn) {
    if (bytes == 0) return MGPU_OK;
    /* cudaMemcpyDefault: unified addressing tells host from device pointers, either way round */
    MGPU__CUDA_TRY(fn, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, (cudaStream_t)ctx->cuda_stream));
    MGPU__CUDA_TRY(fn, cudaStreamSynchronize((cudaStream_t)ctx->cuda_stream));
    ctx->host_waits++;   /* everything queued so far has run: an mgpu__item_begin copy too */
    return MGPU_OK;
}

/* mgpu__item_begin's halves on a GPU: the copy into pinned memory (so that it is asynchronous),
   and the wait that makes it readable when no other wait came first. */
static mgpu_result mgpu__cuda_item_queue(mgpu_context *ctx, const mgpu_tensor *t) {
    if (!ctx->readback && !(ctx->readback = mgpu_cuda_host_alloc(8))) return mgpu_last_result();
    MGPU__CUDA_TRY("reading a scalar back", cudaMemcpyAsync(ctx->readback, t->data, mgpu__dtype_sizes[t->dtype], cudaMemcpyDeviceToHost,
                                                             (cudaStream_t)ctx->cuda_stream));
    return MGPU_OK;
}
static mgpu_result mgpu__cuda_item_wait(mgpu_context *ctx) {
    MGPU__CUDA_TRY("reading a scalar back", cudaStreamSynchronize((cudaStream_t)ctx->cuda_stream));
    ctx->host_waits++;
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   Uploads on a stream of their own (the loader's batches), in two halves so that the copy of the
   next batch can run while the consumer stream computes on the current one:
   - start: the copies wait for the work already queued on the consumer stream (which may still
     read the destination: the step that used it last), run on the copy stream, and `copied` is
     recorded after them;
   - consume: the consumer stream waits for `copied` (queued just before the step that reads the
     batch, so the steps queued in between do not wait for the copy).
   The host waits for `copied` (finish) before it reuses the pinned sources.
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__cuda_upload { void *consumer_mark, *copied; } mgpu__cuda_upload;
typedef struct mgpu__cuda_copy { void *dst; const void *src; size_t bytes; } mgpu__cuda_copy;

static mgpu_result mgpu__cuda_stream_new(int device, void **out) {
    cudaStream_t s = NULL;
    MGPU__CUDA_TRY("a copy stream", cudaSetDevice(device));
    MGPU__CUDA_TRY("a copy stream", cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    *out = (void *)s;
    return MGPU_OK;
}
static void mgpu__cuda_stream_free(void *stream) {
    if (!stream) return;
    cudaStreamSynchronize((cudaStream_t)stream);
    cudaStreamDestroy((cudaStream_t)stream);
}
static mgpu_result mgpu__cuda_upload_start(mgpu__cuda_upload *u, void *copy_stream, void *consumer, const mgpu__cuda_copy *copies, int n) {
    static const char *fn = "uploading a batch to the GPU";
    int i;
    if (!u->consumer_mark) MGPU__CUDA_TRY(fn, cudaEventCreateWithFlags((cudaEvent_t *)&u->consumer_mark, cudaEventDisableTiming));
    if (!u->copied) MGPU__CUDA_TRY(fn, cudaEventCreateWithFlags((cudaEvent_t *)&u->copied, cudaEventDisableTiming));
    MGPU__CUDA_TRY(fn, cudaEventRecord((cudaEvent_t)u->consumer_mark, (cudaStream_t)consumer));
    MGPU__CUDA_TRY(fn, cudaStreamWaitEvent((cudaStream_t)copy_stream, (cudaEvent_t)u->consumer_mark, 0));
    for (i = 0; i < n; i++)
        if (copies[i].bytes)
            MGPU__CUDA_TRY(fn, cudaMemcpyAsync(copies[i].dst, copies[i].src, copies[i].bytes, cudaMemcpyHostToDevice, (cudaStream_t)copy_stream));
    MGPU__CUDA_TRY(fn, cudaEventRecord((cudaEvent_t)u->copied, (cudaStream_t)copy_stream));
    return MGPU_OK;
}
/* Work queued on the consumer after this sees the uploaded batch. */
static mgpu_result mgpu__cuda_upload_consume(mgpu__cuda_upload *u, void *consumer) {
    if (!u->copied) return mgpu__fail(MGPU_ERR_STATE, "a batch is handed out before its upload was started (loader bug)");
    MGPU__CUDA_TRY("waiting for a batch upload on the GPU", cudaStreamWaitEvent((cudaStream_t)consumer, (cudaEvent_t)u->copied, 0));
    return MGPU_OK;
}
/* The sources may be overwritten once this returns. */
static mgpu_result mgpu__cuda_upload_finish(mgpu__cuda_upload *u) {
    if (u->copied) MGPU__CUDA_TRY("waiting for a batch upload", cudaEventSynchronize((cudaEvent_t)u->copied));
    return MGPU_OK;
}
static void mgpu__cuda_upload_release(mgpu__cuda_upload *u) {
    if (u->consumer_mark) cudaEventDestroy((cudaEvent_t)u->consumer_mark);
    if (u->copied) cudaEventDestroy((cudaEvent_t)u->copied);
    u->consumer_mark = u->copied = NULL;
}

/* Free memory of a device as the driver counts it (blocks the caching allocator keeps count as used). */
static mgpu_result mgpu__cuda_free_bytes(int device, size_t *free_b) {
    size_t total = 0;
    int prev = 0;
    *free_b = 0;
    MGPU__CUDA_TRY("reading free device memory", cudaGetDevice(&prev));
    MGPU__CUDA_TRY("reading free device memory", cudaSetDevice(device));
    MGPU__CUDA_TRY("reading free device memory", cudaMemGetInfo(free_b, &total));
    MGPU__CUDA_TRY("reading free device memory", cudaSetDevice(prev));
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   CUDA Graphs: capture one step (forward, backward, optimizer) and replay it with one launch.
   Everything captured must use fixed device addresses (arena, cached blocks) and no host sync.
   -------------------------------------------------------------------------------------- */

MGPU_API mgpu_result mgpu_cuda_graph_begin(mgpu_cuda_graph *g, void *stream) {
    if (!g || !stream) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_cuda_graph_begin: g and stream must not be NULL (the legacy stream cannot be captured)");
    mgpu_cuda_graph_destroy(g);
    MGPU__CUDA_TRY("mgpu_cuda_graph_begin", cudaStreamBeginCapture((cudaStream_t)stream, cudaStreamCaptureModeThreadLocal));
    return MGPU_OK;
}
MGPU_API mgpu_result mgpu_cuda_graph_end(mgpu_cuda_graph *g, void *stream) {
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    if (!g || !stream) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_cuda_graph_end: g and stream must not be NULL");
    MGPU__CUDA_TRY("mgpu_cuda_graph_end", cudaStreamEndCapture((cudaStream_t)stream, &graph));
    cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
    if (e != cudaSuccess) {
        cudaGraphDestroy(graph);
        return mgpu__cuda_fail(e, "mgpu_cuda_graph_end", "cudaGraphInstantiate");
    }
    g->graph = (void *)graph; g->exec = (void *)exec; g->captured = 1;
    return MGPU_OK;
}
MGPU_API mgpu_result mgpu_cuda_graph_launch(mgpu_cuda_graph *g, void *stream) {
    if (!g || !g->captured) return mgpu__fail(MGPU_ERR_STATE, "mgpu_cuda_graph_launch: no graph captured (call mgpu_cuda_graph_begin/end first)");
    MGPU__CUDA_TRY("mgpu_cuda_graph_launch", cudaGraphLaunch((cudaGraphExec_t)g->exec, (cudaStream_t)stream));
    return MGPU_OK;
}
MGPU_API void mgpu_cuda_graph_destroy(mgpu_cuda_graph *g) {
    if (!g) return;
    if (g->exec) cudaGraphExecDestroy((cudaGraphExec_t)g->exec);
    if (g->graph) cudaGraphDestroy((cudaGraph_t)g->graph);
    g->graph = g->exec = NULL; g->captured = 0;
}

/* --------------------------------------------------------------------------------------
   A training step captured as a CUDA Graph (the trainer's --cuda-graph on). The graph holds device
   addresses, so everything it touches must stay where it is between replays, whatever the
   uncaptured work in between does (evaluation growing the arena, a last partial batch, cuBLAS
   growing its scratch): the step runs in a private pool, as PyTorch's graph memory pools, made of
   its own activation arena and its own cuBLAS(Lt) bundle (workspace set with cublasSetWorkspace,
   Lt workspace pointer, scratch and half-precision buffers). The eager warm-up steps of the same
   shape run in that pool too, so it has grown to the step's size before the capture, which then
   allocates nothing. Per-step values come from the step scalars (see mgpu__step_capture).
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__step_graph {
    mgpu_context *ctx;
    mgpu_cuda_graph graph;
    mgpu__step_capture capture;
    mgpu__arena arena;                 /* private activation arena (swapped with ctx->device_arena) */
    void *blas;                        /* private cuBLAS bundle (swapped with ctx->cuda_blas) */
    int inside;                        /* the context uses the private pool now */
} mgpu__step_graph;

/* The context's step runs in the graph's private pool from here to mgpu__step_graph_use(g, 0). */
static void mgpu__step_graph_use(mgpu__step_graph *g, int inside) {
    mgpu__arena a;
    void *b;
    if (g->inside == inside) return;
    a = g->ctx->device_arena; g->ctx->device_arena = g->arena; g->arena = a;
    b = g->ctx->cuda_blas; g->ctx->cuda_blas = g->blas; g->blas = b;
    g->inside = inside;
}

static void mgpu__step_graph_destroy(mgpu__step_graph *g) {
    if (!g) return;
    mgpu__step_graph_use(g, 0);
    if (g->ctx->capture == &g->capture) g->ctx->capture = NULL;
    cudaStreamSynchronize((cudaStream_t)g->ctx->cuda_stream);   /* no replay may still use the pool */
    mgpu_cuda_graph_destroy(&g->graph);
    mgpu__arena_free(&g->arena);
    mgpu_cuda_blas_destroy(g->blas);
    if (g->capture.device_words) mgpu__cuda_release(g->ctx->device.index, g->capture.device_words);
    mgpu_free(g);
}

static mgpu__step_graph *mgpu__step_graph_create(mgpu_context *ctx) {
    mgpu__step_graph *g = (mgpu__step_graph *)mgpu__calloc(sizeof *g, "a CUDA Graph of the training step");
    if (!g) return NULL;
    g->ctx = ctx;
    g->arena = ctx->device_arena;   /* same device and initial size, no chunk yet */
    g->arena.head = NULL; g->arena.total_used = g->arena.peak = 0;
    g->capture.device_words = (uint64_t *)mgpu__cuda_alloc_for(ctx->device.index, sizeof(uint64_t) * MGPU__STEP_SLOTS, "CUDA Graph step scalars");
    if (!g->capture.device_words || mgpu_cuda_blas_create(&g->blas, ctx->cuda_stream, 0) != MGPU_OK) { mgpu__step_graph_destroy(g); return NULL; }
    return g;
}

/* Starts recording the context's stream: ops now register step scalars instead of using host
   values, and change no host state. */
static mgpu_result mgpu__step_graph_begin(mgpu__step_graph *g) {
    mgpu_result r;
    g->capture.n_words = g->capture.n_hooks = 0;
    if ((r = mgpu_cuda_graph_begin(&g->graph, g->ctx->cuda_stream)) != MGPU_OK) return r;
    g->ctx->capture = &g->capture;
    return MGPU_OK;
}

/* Ends the recording. failed: the step failed while recorded (its error stands); the capture is
   ended and thrown away either way, leaving the stream usable for uncaptured steps. */
static mgpu_result mgpu__step_graph_end(mgpu__step_graph *g, int failed) {
    cudaGraph_t graph = NULL;
    mgpu_result r;
    g->ctx->capture = NULL;
    if (failed) {
        cudaStreamEndCapture((cudaStream_t)g->ctx->cuda_stream, &graph);
        if (graph) cudaGraphDestroy(graph);
        cudaGetLastError();
        return mgpu_last_result() != MGPU_OK ? mgpu_last_result() : MGPU_ERR_STATE;
    }
    if ((r = mgpu_cuda_graph_end(&g->graph, g->ctx->cuda_stream)) != MGPU_OK) cudaGetLastError();
    return r;
}

/* One replay: the hooks redo the host work of an eager step and fill the step scalars, one
   kernel stores them (its argument is copied at launch), then the graph runs on the stream. */
static mgpu_result mgpu__step_graph_launch(mgpu__step_graph *g) {
    mgpu__step_capture *c = &g->capture;
    mgpu_result r;
    int i;
    memset(&c->host, 0, sizeof c->host);
    for (i = 0; i < c->n_hooks; i++)
        if ((r = c->hooks[i].fn(c->hooks[i].obj, c->hooks[i].arg, c->host.w + c->hooks[i].word)) != MGPU_OK) return r;
    if ((r = mgpu_cuda_set_step_words(c->device_words, &c->host, c->n_words, g->ctx->cuda_stream)) != MGPU_OK) return r;
    return mgpu_cuda_graph_launch(&g->graph, g->ctx->cuda_stream);
}

#endif /* MGPU_IMPLEMENTATION */
#endif /* MGPU_CUDA */
#endif /* MGPU__CUDA_HOST_H */
/* ======================================================================================
   Mixed precision: autocast
   ====================================================================================== */

/* Autocast on the CPU emulates half precision by rounding f32 storage to the nearest value the
   half format can hold: a matmul-like op runs as y = round(op(round(x), round(w), round(b))) with
   f32 accumulation inside, and the gradients crossing those roundings are rounded the same way,
   so fp16 underflow and overflow of gradients happen as they would on a GPU. */

MGPU_API mgpu_result mgpu_amp_parse(const char *text, mgpu_amp_mode *out) {
    if (!text || !out) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_amp_parse: text and out must not be NULL");
    if (strcmp(text, "off") == 0) *out = MGPU_AMP_OFF;
    else if (strcmp(text, "fp16") == 0) *out = MGPU_AMP_FP16;
    else if (strcmp(text, "bf16") == 0) *out = MGPU_AMP_BF16;
    else return mgpu__fail(MGPU_ERR_INVALID_ARG, "amp mode '%s': expected off, fp16 or bf16", text);
    return MGPU_OK;
}

static int mgpu__amp_mode_valid(int mode) { return mode == MGPU_AMP_OFF || mode == MGPU_AMP_FP16 || mode == MGPU_AMP_BF16; }

MGPU_API void mgpu_context_set_autocast(mgpu_context *ctx, mgpu_amp_mode mode) {
    if (!ctx) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_context_set_autocast: ctx is NULL"); return; }
    if (!mgpu__amp_mode_valid((int)mode)) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_context_set_autocast: mode %d is not an mgpu_amp_mode (autocast left unchanged)", (int)mode);
        return;
    }
    ctx->autocast = (int)mode;
}
MGPU_API mgpu_amp_mode mgpu_context_autocast(const mgpu_context *ctx) { return ctx ? (mgpu_amp_mode)ctx->autocast : MGPU_AMP_OFF; }

/* --------------------------------------------------------------------------------------
   The "autocast round" op: F32 -> F32 holding values representable in the half format
   -------------------------------------------------------------------------------------- */

#define MGPU__AMP_PAR_MIN 32768 /* elements per chunk before rounding loops go to the thread pool */

static float mgpu__round_half_value(float v, mgpu_dtype half) {
    return half == MGPU_BF16 ? mgpu_bf16_to_f32(mgpu_f32_to_bf16(v)) : mgpu_f16_to_f32(mgpu_f32_to_f16(v));
}
/* The CPU twin of round_half (also DDP's gradient compression): one pass, in place or not. */
static void mgpu__round_half_range(void *arg, int64_t begin, int64_t end) {
    const mgpu__round_half_args *a = (const mgpu__round_half_args *)arg;
    const float *src = a->src, scale = a->scale;
    const mgpu_dtype half = a->half;
    float *dst = a->dst;
    int64_t i;
    if (a->accumulate) for (i = begin; i < end; i++) dst[i] += mgpu__round_half_value(src[i] * scale, half);
    else for (i = begin; i < end; i++) dst[i] = mgpu__round_half_value(src[i] * scale, half);
}
static void mgpu__cpu_round_half(const mgpu__round_half_args *a) {
    mgpu_parallel_for(a->ctx, a->n, MGPU__AMP_PAR_MIN, mgpu__round_half_range, (void *)a);
}

/* dst (+)= src rounded to the half format of autocast `mode`; accumulate for backward */
static mgpu_result mgpu__amp_round_array(mgpu_context *ctx, const float *src, float *dst, int64_t n, int mode, int accumulate) {
    mgpu__round_half_args a;
    a.ctx = ctx; a.half = mode == MGPU_AMP_BF16 ? MGPU_BF16 : MGPU_F16; a.scale = 1.0f; a.accumulate = accumulate;
    a.src = src; a.dst = dst; a.n = n;
    return MGPU__TWIN(ctx, round_half, &a);
}

/* iarg[0] = mode; the gradient is rounded like the value (what a half-precision cast does) */
static mgpu_result mgpu__amp_round_backward(mgpu_context *ctx, mgpu__node *node) {
    float *dx;
    MGPU__GRAD_OR_FAIL(dx, ctx, node->in[0]);
    return mgpu__amp_round_array(ctx, (const float *)node->out->grad->data, dx, node->out->numel, (int)node->iarg[0], 1);
}

/* x rounded to the half format `mode` as a new activation, recorded on the tape. */
static mgpu_tensor *mgpu__amp_round(mgpu_context *ctx, mgpu_tensor *x, int mode) {
    mgpu_tensor *y;
    mgpu__node *node = NULL;
    if (!mgpu__check_input(ctx, "autocast", "input", x, 1)) return NULL;
    y = mgpu__new_activation(ctx, MGPU_F32, x->ndim, x->shape);
    if (!y) return NULL;
    if (mgpu__amp_round_array(ctx, (const float *)x->data, (float *)y->data, x->numel, mode, 0) != MGPU_OK) return NULL;
    MGPU__RECORD(ctx, "autocast_round", mgpu__amp_round_backward, y, 1, &x, node);
    if (node) node->iarg[0] = mode;
    return y;
}

/* --------------------------------------------------------------------------------------
   Autocast around a matmul-like op. The op's public entry point does:
       if (mgpu__autocast_active(ctx)) {
           mode = mgpu__autocast_begin(ctx, in, n);   // rounds in[], suspends autocast
           if (mode < 0) return NULL;
           return mgpu__autocast_end(ctx, mode, op(ctx, in...));  // resumes, rounds the output
       }
   Suspending autocast for the inner call keeps ops built from other ops from rounding twice.
   -------------------------------------------------------------------------------------- */

static MGPU__UNUSED int mgpu__autocast_active(const mgpu_context *ctx) { return ctx && ctx->autocast != MGPU_AMP_OFF; }

/* Rounds each usable input in place in `in` (NULL, non-F32 and foreign-device inputs pass through
   untouched so the op itself reports them under its own name). Returns the mode with autocast
   suspended, or -1 (autocast unchanged) when rounding failed. */
static MGPU__UNUSED int mgpu__autocast_begin(mgpu_context *ctx, mgpu_tensor **in, int n) {
    int i, mode = ctx->autocast;
    for (i = 0; i < n; i++) {
        mgpu_tensor *t = in[i];
        if (!t || t->dtype != MGPU_F32 || t->device.type != ctx->device.type || t->device.index != ctx->device.index) continue;
        in[i] = mgpu__amp_round(ctx, t, mode);
        if (!in[i]) return -1;
    }
    ctx->autocast = MGPU_AMP_OFF;
    ctx->autocast_inside = mode;
    return mode;
}
/* Restores autocast and rounds the op's output (NULL passes through). */
static MGPU__UNUSED mgpu_tensor *mgpu__autocast_end(mgpu_context *ctx, int mode, mgpu_tensor *out) {
    ctx->autocast = mode;
    ctx->autocast_inside = MGPU_AMP_OFF;
    return out ? mgpu__amp_round(ctx, out, mode) : NULL;
}
/* The half format the GEMMs of the op autocast is running multiply in (mgpu__gemm_args.half_compute):
   on a GPU that is real fp16/bf16 on tensor cores; the CPU multiplies the same rounded values in f32. */
static MGPU__UNUSED mgpu_dtype mgpu__autocast_gemm_dtype(const mgpu_context *ctx) {
    if (ctx->autocast_inside == MGPU_AMP_BF16) return MGPU_BF16;
    return ctx->autocast_inside == MGPU_AMP_FP16 ? MGPU_F16 : MGPU_F32;
}

/* ======================================================================================
   Ops: elementwise, losses, reductions, shapes
   ====================================================================================== */

/* Elementwise, activation, loss, reduction and shape ops: CPU reference implementations with
   forward and backward. Every reduction adds in an order fixed by the shapes alone, so results
   are bit-identical whatever the thread count. */

/* Loops with fewer elements than this stay on the calling thread: waking the pool costs more. */
#define MGPU__GRAIN 32768
#define MGPU__IGNORE_INDEX (-100)

/* min_chunk for mgpu_parallel_for when each item costs about `work` elements. */
static int64_t mgpu__grain_for(int64_t work) { return MGPU__MAX((int64_t)1, MGPU__GRAIN / MGPU__MAX((int64_t)1, work)); }

static void mgpu__contig_strides(int ndim, const int64_t *shape, int64_t *st) {
    int64_t s = 1;
    int i;
    for (i = ndim - 1; i >= 0; i--) { st[i] = s; s *= shape[i]; }
}

/* Strides of t read as a tensor of out_ndim dims aligned to the right (NumPy broadcasting):
   0 for the missing leading dims and for size-1 dims, so one element serves the whole dim. */
static void mgpu__bcast_strides(int out_ndim, const mgpu_tensor *t, int64_t *st) {
    int64_t own[MGPU_MAX_DIMS];
    int i, lead = out_ndim - t->ndim;
    mgpu__contig_strides(t->ndim, t->shape, own);
    for (i = 0; i < out_ndim; i++) {
        int j = i - lead;
        st[i] = (j < 0 || t->shape[j] == 1) ? 0 : own[j];
    }
}

/* x viewed as (outer, D, inner) around dim d. */
static void mgpu__split_at(const mgpu_tensor *x, int d, int64_t *outer, int64_t *dim, int64_t *inner) {
    int i;
    *outer = 1; *inner = 1; *dim = x->shape[d];
    for (i = 0; i < d; i++) *outer *= x->shape[i];
    for (i = d + 1; i < x->ndim; i++) *inner *= x->shape[i];
}

/* --------------------------------------------------------------------------------------
   Strided iteration over up to 3 operands sharing one index space. Size-1 dims are dropped and
   neighbours that step alike in every operand are merged, so inner runs are as long as possible.
   -------------------------------------------------------------------------------------- */

#define MGPU__MAX_OPS 3
typedef struct mgpu__iter {
    int ndim, nops;
    int64_t numel;
    int64_t shape[MGPU_MAX_DIMS];
    int64_t st[MGPU__MAX_OPS][MGPU_MAX_DIMS];
} mgpu__iter;

static void mgpu__iter_start(mgpu__iter *it, int ndim, const int64_t *shape) {
    int i;
    memset(it, 0, sizeof *it);
    it->ndim = ndim;
    it->numel = 1;
    for (i = 0; i < ndim; i++) { it->shape[i] = shape[i]; it->numel *= shape[i]; }
}
/* Adds an operand; strides are in elements, one per dim of the index space (0: broadcast). */
static void mgpu__iter_operand(mgpu__iter *it, const int64_t *st) {
    int i;
    for (i = 0; i < it->ndim; i++) it->st[it->nops][i] = st[i];
    it->nops++;
}
static int mgpu__iter_mergeable(const mgpu__iter *it, int outer, int inner) {
    int k;
    for (k = 0; k < it->nops; k++)
        if (it->st[k][outer] != it->st[k][inner] * it->shape[inner]) return 0;
    return 1;
}
static void mgpu__iter_coalesce(mgpu__iter *it) {
    int i, k, n = 0;
    for (i = 0; i < it->ndim; i++) {
        if (it->shape[i] == 1) continue;
        if (n > 0 && mgpu__iter_mergeable(it, n - 1, i)) {
            it->shape[n - 1] *= it->shape[i];
            for (k = 0; k < it->nops; k++) it->st[k][n - 1] = it->st[k][i];
        } else {
            it->shape[n] = it->shape[i];
            for (k = 0; k < it->nops; k++) it->st[k][n] = it->st[k][i];
            n++;
        }
    }
    if (n == 0) { /* a single element */
        it->shape[0] = 1;
        for (k = 0; k < it->nops; k++) it->st[k][0] = 0;
        n = 1;
    }
    it->ndim = n;
}
static void mgpu__iter_seek(const mgpu__iter *it, int64_t flat, int64_t *idx, int64_t *off) {
    int d, k;
    for (k = 0; k < it->nops; k++) off[k] = 0;
    for (d = it->ndim - 1; d >= 0; d--) {
        idx[d] = flat % it->shape[d];
        flat /= it->shape[d];
        for (k = 0; k < it->nops; k++) off[k] += idx[d] * it->st[k][d];
    }
}
/* Moves `steps` along the innermost dim (never past its end), carrying into outer dims. */
static void mgpu__iter_advance(const mgpu__iter *it, int64_t *idx, int64_t *off, int64_t steps) {
    int d = it->ndim - 1, k;
    idx[d] += steps;
    for (k = 0; k < it->nops; k++) off[k] += steps * it->st[k][d];
    while (d > 0 && idx[d] == it->shape[d]) {
        for (k = 0; k < it->nops; k++) off[k] += it->st[k][d - 1] - it->shape[d] * it->st[k][d];
        idx[d] = 0;
        idx[--d]++;
    }
}

/* A run: `n` consecutive positions of the innermost dim; operand k starts at off[k], steps st[k]. */
typedef void (*mgpu__run_fn)(void *arg, const int64_t *off, const int64_t *st, int64_t n);

static void mgpu__iter_runs(const mgpu__iter *it, int64_t begin, int64_t end, mgpu__run_fn fn, void *arg) {
    int64_t idx[MGPU_MAX_DIMS], off[MGPU__MAX_OPS], st[MGPU__MAX_OPS];
    int last = it->ndim - 1, k;
    if (begin >= end) return;
    for (k = 0; k < MGPU__MAX_OPS; k++) st[k] = it->st[k][last];
    mgpu__iter_seek(it, begin, idx, off);
    while (begin < end) {
        int64_t run = MGPU__MIN(it->shape[last] - idx[last], end - begin);
        fn(arg, off, st, run);
        begin += run;
        if (begin < end) mgpu__iter_advance(it, idx, off, run);
    }
}

typedef struct mgpu__iter_job { const mgpu__iter *it; mgpu__run_fn fn; void *arg; } mgpu__iter_job;
static void mgpu__iter_job_range(void *p, int64_t begin, int64_t end) {
    const mgpu__iter_job *job = (const mgpu__iter_job *)p;
    mgpu__iter_runs(job->it, begin, end, job->fn, job->arg);
}
/* Runs fn over the whole space; safe to split only when runs write disjoint elements. */
static void mgpu__iter_parallel(mgpu_context *ctx, const mgpu__iter *it, mgpu__run_fn fn, void *arg) {
    mgpu__iter_job job;
    job.it = it; job.fn = fn; job.arg = arg;
    mgpu_parallel_for(ctx, it->numel, MGPU__GRAIN, mgpu__iter_job_range, &job);
}

/* --------------------------------------------------------------------------------------
   Deterministic sums: fixed blocks (chosen from n alone) summed in double, then the block
   partials added in order, so the result does not depend on the thread count.
   -------------------------------------------------------------------------------------- */

#define MGPU__SUM_MAX_BLOCKS 1024
typedef double (*mgpu__partial_fn)(void *arg, int64_t begin, int64_t end);
typedef struct mgpu__sum_job { mgpu__partial_fn fn; void *arg; int64_t n, block; double *partials; } mgpu__sum_job;

static void mgpu__sum_job_range(void *p, int64_t begin, int64_t end) {
    const mgpu__sum_job *job = (const mgpu__sum_job *)p;
    int64_t b;
    for (b = begin; b < end; b++) {
        int64_t lo = b * job->block;
        job->partials[b] = job->fn(job->arg, lo, MGPU__MIN(lo + job->block, job->n));
    }
}
/* Sum of fn over [0, n); each item costs about `work` elements (for the threading grain). */
static double mgpu__det_sum(mgpu_context *ctx, int64_t n, int64_t min_block, int64_t work, mgpu__partial_fn fn, void *arg) {
    double partials[MGPU__SUM_MAX_BLOCKS];
    mgpu__sum_job job;
    double total = 0;
    int64_t nb, b;
    if (n <= 0) return 0;
    job.fn = fn; job.arg = arg; job.n = n; job.partials = partials;
    job.block = MGPU__MAX(MGPU__MAX(min_block, (int64_t)1), (n + MGPU__SUM_MAX_BLOCKS - 1) / MGPU__SUM_MAX_BLOCKS);
    nb = (n + job.block - 1) / job.block;
    mgpu_parallel_for(ctx, nb, mgpu__grain_for(job.block * MGPU__MAX(work, (int64_t)1)), mgpu__sum_job_range, &job);
    for (b = 0; b < nb; b++) total += partials[b];
    return total;
}

/* --------------------------------------------------------------------------------------
   Elementwise kernels over a broadcast index space. Operand 0 is the output y (contiguous),
   1 is a, 2 is b.
   -------------------------------------------------------------------------------------- */

typedef enum mgpu__ew_kind {
    MGPU__EW_ADD,     /* y = a + c * b */
    MGPU__EW_MUL,     /* y = a * b */
    MGPU__EW_ACC,     /* y += c * a          (backward: gradient pass-through or broadcast) */
    MGPU__EW_ACC_MUL  /* y += c * a * b      (backward of mul) */
} mgpu__ew_kind;
typedef struct mgpu__ew_arg { mgpu__ew_kind kind; float c; float *y; const float *a, *b; } mgpu__ew_arg;

static void mgpu__ew_run(void *p, const int64_t *off, const int64_t *st, int64_t n) {
    const mgpu__ew_arg *e = (const mgpu__ew_arg *)p;
    float *y = e->y + off[0];
    const float *a = e->a + off[1], *b = e->b + off[2];
    int64_t sy = st[0], sa = st[1], sb = st[2], j;
    float c = e->c;
    switch (e->kind) {
    case MGPU__EW_ADD:
        if (sy == 1 && sa == 1 && sb == 1) for (j = 0; j < n; j++) y[j] = a[j] + c * b[j];
        else for (j = 0; j < n; j++) y[j * sy] = a[j * sa] + c * b[j * sb];
        break;
    case MGPU__EW_MUL:
        if (sy == 1 && sa == 1 && sb == 1) for (j = 0; j < n; j++) y[j] = a[j] * b[j];
        else for (j = 0; j < n; j++) y[j * sy] = a[j * sa] * b[j * sb];
        break;
    case MGPU__EW_ACC:
        if (sy == 1 && sa == 1) for (j = 0; j < n; j++) y[j] += c * a[j];
        else for (j = 0; j < n; j++) y[j * sy] += c * a[j * sa];
        break;
    case MGPU__EW_ACC_MUL:
        for (j = 0; j < n; j++) y[j * sy] += c * a[j * sa] * b[j * sb];
        break;
    }
}

/* y (shape, contiguous) = kind(a, b) with a and b read through strides sa, sb (b may be NULL
   for ACC). Each output element is written by one thread only. */
static void mgpu__ew_apply(mgpu_context *ctx, mgpu__ew_kind kind, float c, int ndim, const int64_t *shape, float *y,
                           const float *a, const int64_t *sa, const float *b, const int64_t *sb) {
    int64_t sy[MGPU_MAX_DIMS], zero[MGPU_MAX_DIMS];
    mgpu__iter it;
    mgpu__ew_arg e;
    memset(zero, 0, sizeof zero);
    mgpu__contig_strides(ndim, shape, sy);
    mgpu__iter_start(&it, ndim, shape);
    mgpu__iter_operand(&it, sy);
    mgpu__iter_operand(&it, sa);
    mgpu__iter_operand(&it, b ? sb : zero);
    mgpu__iter_coalesce(&it);
    e.kind = kind; e.c = c; e.y = y; e.a = a; e.b = b ? b : a;
    mgpu__iter_parallel(ctx, &it, mgpu__ew_run, &e);
}

/* --------------------------------------------------------------------------------------
   Reduction of a full index space onto a target that broadcasts over it:
       dst[t] (+)= scale * sum over the reduced dims of src[...] * other[...]
   src is contiguous over the space; target strides are 0 on reduced dims; other (optional) is
   read through its own strides. Each target sums its terms in one fixed order.
   -------------------------------------------------------------------------------------- */

/* Sum of n contiguous floats in double over 8 interleaved lanes: vectorisable, and the order
   is fixed by n alone. */
static double mgpu__sum_f32(const float *s, int64_t n) {
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0}, total = 0;
    int64_t j = 0;
    int l;
    for (; j + 8 <= n; j += 8)
        for (l = 0; l < 8; l++) lane[l] += s[j + l];
    for (; j < n; j++) total += s[j];
    for (l = 0; l < 8; l++) total += lane[l];
    return total;
}

#define MGPU__RBLOCK 256 /* targets handled together, so kept-dim reads stay contiguous */
typedef struct mgpu__reduce {
    mgpu__iter kept, red;   /* operands: 0 = src, 1 = other */
    const float *src, *other;
    float *dst; float scale; int accumulate;
} mgpu__reduce;

static void mgpu__reduce_store(const mgpu__reduce *r, int64_t t, double sum) {
    float v = (float)(r->scale * sum);
    if (r->accumulate) r->dst[t] += v; else r->dst[t] = v;
}

typedef struct mgpu__reduce_block { const mgpu__reduce *r; double *acc; const int64_t *so, *oo; int64_t nb; int dense; } mgpu__reduce_block;
static void mgpu__reduce_block_run(void *p, const int64_t *off, const int64_t *st, int64_t n) {
    const mgpu__reduce_block *b = (const mgpu__reduce_block *)p;
    const float *src = b->r->src, *other = b->r->other;
    int64_t j, i;
    for (j = 0; j < n; j++) {
        const float *s = src + off[0] + j * st[0];
        if (b->dense) { /* the block's targets are consecutive in src: a vectorisable row add */
            s += b->so[0];
            for (i = 0; i < b->nb; i++) b->acc[i] += s[i];
        } else if (other) {
            const float *o = other + off[1] + j * st[1];
            for (i = 0; i < b->nb; i++) b->acc[i] += (double)s[b->so[i]] * o[b->oo[i]];
        } else {
            for (i = 0; i < b->nb; i++) b->acc[i] += s[b->so[i]];
        }
    }
}
static void mgpu__reduce_range(void *p, int64_t begin, int64_t end) {
    const mgpu__reduce *r = (const mgpu__reduce *)p;
    double acc[MGPU__RBLOCK];
    int64_t so[MGPU__RBLOCK], oo[MGPU__RBLOCK], idx[MGPU_MAX_DIMS], off[MGPU__MAX_OPS];
    int64_t blk, i;
    mgpu__reduce_block b;
    b.r = r; b.acc = acc; b.so = so; b.oo = oo;
    for (blk = begin; blk < end; blk++) {
        int64_t t0 = blk * MGPU__RBLOCK;
        b.nb = MGPU__MIN((int64_t)MGPU__RBLOCK, r->kept.numel - t0);
        mgpu__iter_seek(&r->kept, t0, idx, off);
        b.dense = !r->other;
        for (i = 0; i < b.nb; i++) {
            so[i] = off[0]; oo[i] = off[1]; acc[i] = 0;
            if (so[i] != so[0] + i) b.dense = 0;
            if (i + 1 < b.nb) mgpu__iter_advance(&r->kept, idx, off, 1);
        }
        if (r->red.ndim == 1 && r->red.st[0][0] == 1 && !r->other) /* each target sums a contiguous row */
            for (i = 0; i < b.nb; i++) acc[i] = mgpu__sum_f32(r->src + so[i], r->red.numel);
        else
            mgpu__iter_runs(&r->red, 0, r->red.numel, mgpu__reduce_block_run, &b);
        for (i = 0; i < b.nb; i++) mgpu__reduce_store(r, t0 + i, acc[i]);
    }
}
typedef struct mgpu__dot_run_arg { const mgpu__reduce *r; double sum; } mgpu__dot_run_arg;
static void mgpu__reduce_dot_run(void *p, const int64_t *off, const int64_t *st, int64_t n) {
    mgpu__dot_run_arg *d = (mgpu__dot_run_arg *)p;
    const float *s = d->r->src + off[0], *o = d->r->other ? d->r->other + off[1] : NULL;
    double sum = 0;
    int64_t j;
    if (o) for (j = 0; j < n; j++) sum += (double)s[j * st[0]] * o[j * st[1]];
    else if (st[0] == 1) sum = mgpu__sum_f32(s, n);
    else for (j = 0; j < n; j++) sum += s[j * st[0]];
    d->sum += sum;
}
static double mgpu__reduce_partial(void *p, int64_t begin, int64_t end) {
    mgpu__dot_run_arg d;
    d.r = (const mgpu__reduce *)p; d.sum = 0;
    mgpu__iter_runs(&d.r->red, begin, end, mgpu__reduce_dot_run, &d);
    return d.sum;
}

static void mgpu__reduce_into(mgpu_context *ctx, int ndim, const int64_t *shape, const float *src, const int64_t *target_st,
                              const float *other, const int64_t *other_st, float *dst, float scale, int accumulate) {
    int64_t src_st[MGPU_MAX_DIMS], zero[MGPU_MAX_DIMS], ks[MGPU_MAX_DIMS], rs[MGPU_MAX_DIMS];
    int64_t k_src[MGPU_MAX_DIMS], k_oth[MGPU_MAX_DIMS], r_src[MGPU_MAX_DIMS], r_oth[MGPU_MAX_DIMS];
    int nk = 0, nr = 0, i;
    mgpu__reduce r;
    memset(zero, 0, sizeof zero);
    if (!other) other_st = zero;
    mgpu__contig_strides(ndim, shape, src_st);
    for (i = 0; i < ndim; i++) {
        if (shape[i] == 1) continue;
        if (target_st[i] != 0) { ks[nk] = shape[i]; k_src[nk] = src_st[i]; k_oth[nk] = other_st[i]; nk++; }
        else { rs[nr] = shape[i]; r_src[nr] = src_st[i]; r_oth[nr] = other_st[i]; nr++; }
    }
    if (nr == 0 && accumulate) { /* nothing to reduce: an elementwise pass */
        mgpu__ew_apply(ctx, other ? MGPU__EW_ACC_MUL : MGPU__EW_ACC, scale, ndim, shape, dst, src, src_st, other, other_st);
        return;
    }
    mgpu__iter_start(&r.kept, nk, ks); mgpu__iter_operand(&r.kept, k_src); mgpu__iter_operand(&r.kept, k_oth);
    mgpu__iter_start(&r.red, nr, rs); mgpu__iter_operand(&r.red, r_src); mgpu__iter_operand(&r.red, r_oth);
    mgpu__iter_coalesce(&r.kept);
    mgpu__iter_coalesce(&r.red);
    r.src = src; r.other = other; r.dst = dst; r.scale = scale; r.accumulate = accumulate;
    if (r.kept.numel == 1) { /* one target: split the reduced space itself into fixed blocks */
        mgpu__reduce_store(&r, 0, mgpu__det_sum(ctx, r.red.numel, 4096, 1, mgpu__reduce_partial, &r));
        return;
    }
    mgpu_parallel_for(ctx, (r.kept.numel + MGPU__RBLOCK - 1) / MGPU__RBLOCK, mgpu__grain_for(MGPU__RBLOCK * r.red.numel),
                      mgpu__reduce_range, &r);
}

/* --------------------------------------------------------------------------------------
   Binary ops with broadcasting: add, sub, mul, bias_add
   -------------------------------------------------------------------------------------- */

/* Broadcast geometry of a and b (NumPy rules, right-aligned): out's shape, and the strides that read
   a and b against it (mgpu__bcast_strides), or MGPU_ERR_SHAPE naming both shapes. */
static int mgpu__bcast_make(const char *op, const mgpu_tensor *a, const mgpu_tensor *b, mgpu__bcast *g) {
    int n = MGPU__MAX(a->ndim, b->ndim), i;
    memset(g, 0, sizeof *g);
    g->numel = 1; g->a_numel = a->numel; g->b_numel = b->numel;
    for (i = 0; i < n; i++) {
        int ia = i - (n - a->ndim), ib = i - (n - b->ndim);
        int64_t da = ia >= 0 ? a->shape[ia] : 1, db = ib >= 0 ? b->shape[ib] : 1;
        if (da != db && da != 1 && db != 1) {
            mgpu__fail(MGPU_ERR_SHAPE, "%s: shapes %s and %s cannot be broadcast together (dim %d: %lld vs %lld)", op,
                       mgpu__shape_str(a), mgpu__shape_str(b), i - n, (long long)da, (long long)db);
            return 0;
        }
        g->shape[i] = da == 1 ? db : da;
        g->numel *= g->shape[i];
    }
    g->ndim = n;
    mgpu__bcast_strides(n, a, g->a_stride);
    mgpu__bcast_strides(n, b, g->b_stride);
    return 1;
}

static void mgpu__cpu_binary_forward(const mgpu__binary_args *a) {
    const mgpu__bcast *g = &a->g;
    mgpu__ew_kind kind = a->kind == MGPU__BIN_MUL ? MGPU__EW_MUL : MGPU__EW_ADD;
    float c = a->kind == MGPU__BIN_SUB ? -1.0f : 1.0f; /* add and sub are a + c * b */
    mgpu__ew_apply(a->ctx, kind, c, g->ndim, g->shape, a->out, a->a, g->a_stride, a->b, g->b_stride);
}

/* d(a * b) = dy * b for a, dy * a for b; d(a + c * b) = dy for a, c * dy for b. Each is reduced
   onto the operand's own (broadcast) strides. */
static void mgpu__cpu_binary_backward(const mgpu__binary_args *a) {
    const mgpu__bcast *g = &a->g;
    int mul = a->kind == MGPU__BIN_MUL;
    if (a->da)
        mgpu__reduce_into(a->ctx, g->ndim, g->shape, a->dy, g->a_stride, mul ? a->b : NULL, g->b_stride, a->da, 1.0f, 1);
    if (a->db)
        mgpu__reduce_into(a->ctx, g->ndim, g->shape, a->dy, g->b_stride, mul ? a->a : NULL, g->a_stride, a->db,
                          a->kind == MGPU__BIN_SUB ? -1.0f : 1.0f, 1);
}

static mgpu_result mgpu__binary_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu_tensor *in_a = node->in[0], *in_b = node->in[1];
    mgpu__binary_args args;
    memset(&args, 0, sizeof args);
    if (mgpu__needs_grad(node, 0)) MGPU__GRAD_OR_FAIL(args.da, ctx, in_a);
    if (mgpu__needs_grad(node, 1)) MGPU__GRAD_OR_FAIL(args.db, ctx, in_b);
    mgpu__bcast_make(node->name, in_a, in_b, &args.g); /* the forward's geometry: cannot fail now */
    args.ctx = ctx; args.kind = (mgpu__binary_kind)node->iarg[0];
    args.a = (const float *)in_a->data; args.b = (const float *)in_b->data; args.dy = (const float *)node->out->grad->data;
    return MGPU__TWIN(ctx, binary_backward, &args);
}

static mgpu_tensor *mgpu__binary(mgpu_context *ctx, const char *op, mgpu__binary_kind kind, mgpu_tensor *a, mgpu_tensor *b) {
    mgpu_tensor *out, *ins[2];
    mgpu__node *node;
    mgpu__binary_args args;
    if (!mgpu__check_input(ctx, op, "a", a, 1) || !mgpu__check_input(ctx, op, "b", b, 1)) return NULL;
    memset(&args, 0, sizeof args);
    if (!mgpu__bcast_make(op, a, b, &args.g)) return NULL;
    out = mgpu__new_activation(ctx, MGPU_F32, args.g.ndim, args.g.shape);
    if (!out) return NULL;
    args.ctx = ctx; args.kind = kind; args.a = (const float *)a->data; args.b = (const float *)b->data; args.out = (float *)out->data;
    if (MGPU__TWIN(ctx, binary_forward, &args) != MGPU_OK) return NULL;
    ins[0] = a; ins[1] = b;
    MGPU__RECORD(ctx, op, mgpu__binary_backward, out, 2, ins, node);
    if (node) node->iarg[0] = kind;
    return out;
}

MGPU_API mgpu_tensor *mgpu_op_add(mgpu_context *ctx, mgpu_tensor *a, mgpu_tensor *b) {
    return mgpu__binary(ctx, "mgpu_op_add", MGPU__BIN_ADD, a, b);
}
MGPU_API mgpu_tensor *mgpu_op_sub(mgpu_context *ctx, mgpu_tensor *a, mgpu_tensor *b) {
    return mgpu__binary(ctx, "mgpu_op_sub", MGPU__BIN_SUB, a, b);
}
MGPU_API mgpu_tensor *mgpu_op_mul(mgpu_context *ctx, mgpu_tensor *a, mgpu_tensor *b) {
    return mgpu__binary(ctx, "mgpu_op_mul", MGPU__BIN_MUL, a, b);
}
// x (..., C) + b (C): broadcasting add, restricted so a wrong bias is an error, not a broadcast.
MGPU_API mgpu_tensor *mgpu_op_bias_add(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *b) {
    const char *op = "mgpu_op_bias_add";
    if (!mgpu__check_input(ctx, op, "x", x, 1) || !mgpu__check_input(ctx, op, "b", b, 1)) return NULL;
    if (x->ndim < 1 || b->ndim != 1 || b->shape[0] != x->shape[x->ndim - 1])
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: bias b %s must be (C,) with C the last dim of x %s", op, mgpu__shape_str(b), mgpu__shape_str(x));
    return mgpu__binary(ctx, op, MGPU__BIN_ADD, x, b);
}

/* --------------------------------------------------------------------------------------
   Unary elementwise ops and activations
   -------------------------------------------------------------------------------------- */


#define MGPU__INV_SQRT2 0.70710678118654752f
#define MGPU__INV_SQRT_2PI 0.39894228040143268f
#define MGPU__SQRT_2_OVER_PI 0.79788456080286536f
#define MGPU__GELU_TANH_K 0.044715f

static float mgpu__sigmoidf(float x) {
    /* exp of a non-positive number only, so neither branch overflows */
    if (x >= 0) return 1.0f / (1.0f + expf(-x));
    { float e = expf(x); return e / (1.0f + e); }
}

static void mgpu__unary_forward_range(void *p, int64_t begin, int64_t end) {
    const mgpu__unary_args *u = (const mgpu__unary_args *)p;
    const float *x = u->x;
    float *y = u->out, a = u->param;
    int64_t i;
    switch (u->kind) {
    case MGPU__UN_RELU: for (i = begin; i < end; i++) y[i] = x[i] > 0 ? x[i] : 0.0f; break;
    case MGPU__UN_GELU: for (i = begin; i < end; i++) y[i] = 0.5f * x[i] * (1.0f + erff(x[i] * MGPU__INV_SQRT2)); break;
    case MGPU__UN_GELU_TANH:
        for (i = begin; i < end; i++)
            y[i] = 0.5f * x[i] * (1.0f + tanhf(MGPU__SQRT_2_OVER_PI * (x[i] + MGPU__GELU_TANH_K * x[i] * x[i] * x[i])));
        break;
    case MGPU__UN_ELU: for (i = begin; i < end; i++) y[i] = x[i] > 0 ? x[i] : a * expm1f(x[i]); break;
    case MGPU__UN_TANH: for (i = begin; i < end; i++) y[i] = tanhf(x[i]); break;
    case MGPU__UN_SIGMOID: for (i = begin; i < end; i++) y[i] = mgpu__sigmoidf(x[i]); break;
    case MGPU__UN_SCALE: for (i = begin; i < end; i++) y[i] = x[i] * a; break;
    case MGPU__UN_ADD_SCALAR: for (i = begin; i < end; i++) y[i] = x[i] + a; break;
    }
}

static void mgpu__unary_backward_range(void *p, int64_t begin, int64_t end) {
    const mgpu__unary_args *u = (const mgpu__unary_args *)p;
    const float *x = u->x, *y = u->y, *dy = u->dy;
    float *dx = u->out, a = u->param;
    int64_t i;
    switch (u->kind) {
    case MGPU__UN_RELU: for (i = begin; i < end; i++) dx[i] += x[i] > 0 ? dy[i] : 0.0f; break;
    case MGPU__UN_GELU: // d/dx x*Phi(x) = Phi(x) + x*phi(x)
        for (i = begin; i < end; i++) {
            float cdf = 0.5f * (1.0f + erff(x[i] * MGPU__INV_SQRT2));
            float pdf = MGPU__INV_SQRT_2PI * expf(-0.5f * x[i] * x[i]);
            dx[i] += dy[i] * (cdf + x[i] * pdf);
        }
        break;
    case MGPU__UN_GELU_TANH:
        for (i = begin; i < end; i++) {
            float x2 = x[i] * x[i];
            float t = tanhf(MGPU__SQRT_2_OVER_PI * x[i] * (1.0f + MGPU__GELU_TANH_K * x2));
            float du = MGPU__SQRT_2_OVER_PI * (1.0f + 3.0f * MGPU__GELU_TANH_K * x2);
            dx[i] += dy[i] * (0.5f * (1.0f + t) + 0.5f * x[i] * (1.0f - t * t) * du);
        }
        break;
    case MGPU__UN_ELU: for (i = begin; i < end; i++) dx[i] += dy[i] * (x[i] > 0 ? 1.0f : a * expf(x[i])); break;
    case MGPU__UN_TANH: for (i = begin; i < end; i++) dx[i] += dy[i] * (1.0f - y[i] * y[i]); break;
    case MGPU__UN_SIGMOID: for (i = begin; i < end; i++) dx[i] += dy[i] * y[i] * (1.0f - y[i]); break;
    case MGPU__UN_SCALE: for (i = begin; i < end; i++) dx[i] += dy[i] * a; break;
    case MGPU__UN_ADD_SCALAR: for (i = begin; i < end; i++) dx[i] += dy[i]; break;
    }
}

static void mgpu__cpu_unary_forward(const mgpu__unary_args *a) {
    mgpu_parallel_for(a->ctx, a->n, MGPU__GRAIN, mgpu__unary_forward_range, (void *)a);
}
static void mgpu__cpu_unary_backward(const mgpu__unary_args *a) {
    mgpu_parallel_for(a->ctx, a->n, MGPU__GRAIN, mgpu__unary_backward_range, (void *)a);
}

static mgpu_result mgpu__unary_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__unary_args u;
    float *dx;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    MGPU__GRAD_OR_FAIL(dx, ctx, node->in[0]);
    u.ctx = ctx; u.kind = (mgpu__unary_kind)node->iarg[0]; u.param = node->farg[0];
    u.x = (const float *)node->in[0]->data; u.y = (const float *)node->out->data;
    u.dy = (const float *)node->out->grad->data; u.out = dx; u.n = node->out->numel;
    return MGPU__TWIN(ctx, unary_backward, &u);
}

static mgpu_tensor *mgpu__unary(mgpu_context *ctx, const char *op, mgpu__unary_kind kind, float param, mgpu_tensor *x) {
    mgpu_tensor *out;
    mgpu__node *node;
    mgpu__unary_args u;
    if (!mgpu__check_input(ctx, op, "x", x, 1)) return NULL;
    out = mgpu__new_activation(ctx, MGPU_F32, x->ndim, x->shape);
    if (!out) return NULL;
    memset(&u, 0, sizeof u);
    u.ctx = ctx; u.kind = kind; u.param = param; u.x = (const float *)x->data; u.out = (float *)out->data; u.n = x->numel;
    if (MGPU__TWIN(ctx, unary_forward, &u) != MGPU_OK) return NULL;
    MGPU__RECORD(ctx, op, mgpu__unary_backward, out, 1, &x, node);
    if (node) { node->iarg[0] = kind; node->farg[0] = param; }
    return out;
}

MGPU_API mgpu_tensor *mgpu_op_scale(mgpu_context *ctx, mgpu_tensor *a, float s) { return mgpu__unary(ctx, "mgpu_op_scale", MGPU__UN_SCALE, s, a); }
MGPU_API mgpu_tensor *mgpu_op_add_scalar(mgpu_context *ctx, mgpu_tensor *a, float s) { return mgpu__unary(ctx, "mgpu_op_add_scalar", MGPU__UN_ADD_SCALAR, s, a); }
MGPU_API mgpu_tensor *mgpu_op_relu(mgpu_context *ctx, mgpu_tensor *x) { return mgpu__unary(ctx, "mgpu_op_relu", MGPU__UN_RELU, 0, x); }
MGPU_API mgpu_tensor *mgpu_op_gelu(mgpu_context *ctx, mgpu_tensor *x) { return mgpu__unary(ctx, "mgpu_op_gelu", MGPU__UN_GELU, 0, x); }
MGPU_API mgpu_tensor *mgpu_op_gelu_tanh(mgpu_context *ctx, mgpu_tensor *x) { return mgpu__unary(ctx, "mgpu_op_gelu_tanh", MGPU__UN_GELU_TANH, 0, x); }
MGPU_API mgpu_tensor *mgpu_op_elu(mgpu_context *ctx, mgpu_tensor *x, float alpha) { return mgpu__unary(ctx, "mgpu_op_elu", MGPU__UN_ELU, alpha, x); }
MGPU_API mgpu_tensor *mgpu_op_tanh(mgpu_context *ctx, mgpu_tensor *x) { return mgpu__unary(ctx, "mgpu_op_tanh", MGPU__UN_TANH, 0, x); }
MGPU_API mgpu_tensor *mgpu_op_sigmoid(mgpu_context *ctx, mgpu_tensor *x) { return mgpu__unary(ctx, "mgpu_op_sigmoid", MGPU__UN_SIGMOID, 0, x); }

/* --------------------------------------------------------------------------------------
   Softmax and log-softmax along any dim: x seen as (outer, D, inner), one line per (outer, inner)
   -------------------------------------------------------------------------------------- */

static int64_t mgpu__line_base(const mgpu__softmax_args *l, int64_t line) {
    return (line / l->inner) * l->dim * l->inner + line % l->inner;
}

static void mgpu__softmax_forward_range(void *p, int64_t begin, int64_t end) {
    const mgpu__softmax_args *l = (const mgpu__softmax_args *)p;
    int64_t line, j, s = l->inner;
    for (line = begin; line < end; line++) {
        const float *x = l->x + mgpu__line_base(l, line);
        float *y = l->out + mgpu__line_base(l, line);
        float mx = -INFINITY;
        double sum = 0;
        for (j = 0; j < l->dim; j++) mx = x[j * s] > mx ? x[j * s] : mx;
        if (mx == -INFINITY) mx = 0; /* an all -inf line: keep exp() finite-argument */
        for (j = 0; j < l->dim; j++) sum += expf(x[j * s] - mx);
        if (l->log) {
            float lse = mx + (float)log(sum);
            for (j = 0; j < l->dim; j++) y[j * s] = x[j * s] - lse;
        } else {
            float inv = (float)(1.0 / sum);
            for (j = 0; j < l->dim; j++) y[j * s] = expf(x[j * s] - mx) * inv;
        }
    }
}

static void mgpu__softmax_backward_range(void *p, int64_t begin, int64_t end) {
    const mgpu__softmax_args *l = (const mgpu__softmax_args *)p;
    int64_t line, j, s = l->inner;
    for (line = begin; line < end; line++) {
        int64_t base = mgpu__line_base(l, line);
        const float *y = l->y + base, *dy = l->dy + base;
        float *dx = l->out + base;
        double dot = 0;
        if (l->log) { // dx = dy - softmax * sum(dy)
            for (j = 0; j < l->dim; j++) dot += dy[j * s];
            for (j = 0; j < l->dim; j++) dx[j * s] += dy[j * s] - expf(y[j * s]) * (float)dot;
        } else {      // dx = y * (dy - sum(dy * y))
            for (j = 0; j < l->dim; j++) dot += (double)dy[j * s] * y[j * s];
            for (j = 0; j < l->dim; j++) dx[j * s] += y[j * s] * (dy[j * s] - (float)dot);
        }
    }
}

/* One line per (outer, inner) pair; an empty dim leaves nothing to do. */
static void mgpu__cpu_softmax_forward(const mgpu__softmax_args *a) {
    if (a->dim > 0) mgpu_parallel_for(a->ctx, a->outer * a->inner, mgpu__grain_for(a->dim), mgpu__softmax_forward_range, (void *)a);
}
static void mgpu__cpu_softmax_backward(const mgpu__softmax_args *a) {
    if (a->dim > 0) mgpu_parallel_for(a->ctx, a->outer * a->inner, mgpu__grain_for(a->dim), mgpu__softmax_backward_range, (void *)a);
}

/* x (outer, dim, inner) around its normalised dim d */
static void mgpu__softmax_lines(mgpu_context *ctx, const mgpu_tensor *x, int d, int log, mgpu__softmax_args *a) {
    memset(a, 0, sizeof *a);
    a->ctx = ctx; a->log = log;
    mgpu__split_at(x, d, &a->outer, &a->dim, &a->inner);
}

static mgpu_result mgpu__softmax_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__softmax_args a;
    float *dx;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    MGPU__GRAD_OR_FAIL(dx, ctx, node->in[0]);
    mgpu__softmax_lines(ctx, node->in[0], (int)node->iarg[0], (int)node->iarg[1], &a);
    a.y = (const float *)node->out->data; a.dy = (const float *)node->out->grad->data; a.out = dx;
    return MGPU__TWIN(ctx, softmax_backward, &a);
}

static mgpu_tensor *mgpu__softmax(mgpu_context *ctx, const char *op, mgpu_tensor *x, int dim, int log) {
    mgpu_tensor *out;
    mgpu__node *node;
    mgpu__softmax_args a;
    int d;
    if (!mgpu__check_input(ctx, op, "x", x, 1)) return NULL;
    if ((d = mgpu__norm_dim(op, dim, x->ndim)) < 0) return NULL;
    out = mgpu__new_activation(ctx, MGPU_F32, x->ndim, x->shape);
    if (!out) return NULL;
    mgpu__softmax_lines(ctx, x, d, log, &a);
    a.x = (const float *)x->data; a.out = (float *)out->data;
    if (MGPU__TWIN(ctx, softmax_forward, &a) != MGPU_OK) return NULL;
    MGPU__RECORD(ctx, op, mgpu__softmax_backward, out, 1, &x, node);
    if (node) { node->iarg[0] = d; node->iarg[1] = log; }
    return out;
}

MGPU_API mgpu_tensor *mgpu_op_softmax(mgpu_context *ctx, mgpu_tensor *x, int dim) { return mgpu__softmax(ctx, "mgpu_op_softmax", x, dim, 0); }
MGPU_API mgpu_tensor *mgpu_op_log_softmax(mgpu_context *ctx, mgpu_tensor *x, int dim) { return mgpu__softmax(ctx, "mgpu_op_log_softmax", x, dim, 1); }

/* --------------------------------------------------------------------------------------
   Classification losses: nll_loss, cross_entropy (fused), count_correct
   -------------------------------------------------------------------------------------- */

/* scores (N, C) F32 and target (N) I32/I64; sets N and C. */
static int mgpu__check_class_inputs(mgpu_context *ctx, const char *op, const char *name, const mgpu_tensor *x,
                                    const mgpu_tensor *target, int64_t *n, int64_t *c) {
    if (!mgpu__check_input(ctx, op, name, x, 1) || !mgpu__check_index(ctx, op, "target", target)) return 0;
    if (x->ndim != 2 || target->ndim != 1 || target->shape[0] != x->shape[0]) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: %s must be (N, C) and target (N,), got %s and %s", op, name, mgpu__shape_str(x), mgpu__shape_str(target));
        return 0;
    }
    *n = x->shape[0]; *c = x->shape[1];
    return 1;
}

/* Every target is ignore_index (-100) or a class in [0, c); otherwise an error naming the first bad row.
   Targets on a GPU are not read back (that would stall the step): there the kernels turn a bad
   target into a NaN loss, which the trainer reports. */
static int mgpu__check_targets(const char *op, const mgpu_tensor *target, int64_t n, int64_t c) {
    int64_t i;
    if (!mgpu__on_host(target)) return 1;
    for (i = 0; i < n; i++) {
        int64_t t = mgpu__index_at(target, i);
        if (t != MGPU__IGNORE_INDEX && (t < 0 || t >= c)) {
            mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: target[%lld] = %lld is outside [0, %lld) (use -100 to ignore a row)", op,
                       (long long)i, (long long)t, (long long)c);
            return 0;
        }
    }
    return 1;
}

static int64_t mgpu__class_target(const mgpu__class_loss_args *a, int64_t i) {
    return a->target_i64 ? ((const int64_t *)a->target)[i] : (int64_t)((const int32_t *)a->target)[i];
}

/* loss = total / counted rows (no counted row: NaN, as PyTorch); the count is kept for backward. */
static void mgpu__class_loss_store(const mgpu__class_loss_args *a, double total) {
    int64_t i, counted = 0;
    for (i = 0; i < a->n; i++) counted += mgpu__class_target(a, i) != MGPU__IGNORE_INDEX;
    a->valid[0] = (float)counted;
    a->loss[0] = (float)(total / (double)counted);
}

static void mgpu__cpu_nll_forward(const mgpu__class_loss_args *a) {
    double sum = 0;
    int64_t i;
    for (i = 0; i < a->n; i++) {
        int64_t t = mgpu__class_target(a, i);
        if (t != MGPU__IGNORE_INDEX) sum -= a->x[i * a->c + t];
    }
    mgpu__class_loss_store(a, sum);
}

static void mgpu__cpu_nll_backward(const mgpu__class_loss_args *a) {
    float g = a->dloss[0] / a->valid[0];
    int64_t i;
    for (i = 0; i < a->n; i++) {
        int64_t t = mgpu__class_target(a, i);
        if (t != MGPU__IGNORE_INDEX) a->dx[i * a->c + t] -= g;
    }
}

static double mgpu__ce_forward_rows(void *p, int64_t begin, int64_t end) {
    const mgpu__class_loss_args *a = (const mgpu__class_loss_args *)p;
    double loss = 0;
    int64_t i, j, c = a->c;
    for (i = begin; i < end; i++) {
        const float *x = a->x + i * c;
        float mx = -INFINITY, lse;
        double sum = 0;
        int64_t t = mgpu__class_target(a, i);
        for (j = 0; j < c; j++) mx = x[j] > mx ? x[j] : mx;
        if (mx == -INFINITY) mx = 0;
        for (j = 0; j < c; j++) sum += expf(x[j] - mx);
        lse = mx + (float)log(sum);
        a->lse[i] = lse;
        if (t != MGPU__IGNORE_INDEX) loss += (double)lse - x[t];
    }
    return loss;
}

static void mgpu__ce_backward_rows(void *p, int64_t begin, int64_t end) {
    const mgpu__class_loss_args *a = (const mgpu__class_loss_args *)p;
    float g = a->dloss[0] / a->valid[0];
    int64_t i, j, c = a->c;
    for (i = begin; i < end; i++) {
        const float *x = a->x + i * c;
        float *dx = a->dx + i * c, lse = a->lse[i];
        int64_t t = mgpu__class_target(a, i);
        if (t == MGPU__IGNORE_INDEX) continue;
        for (j = 0; j < c; j++) dx[j] += g * expf(x[j] - lse);
        dx[t] -= g;
    }
}

static void mgpu__cpu_cross_entropy_forward(const mgpu__class_loss_args *a) {
    mgpu__class_loss_store(a, a->c > 0 ? mgpu__det_sum(a->ctx, a->n, 4096 / a->c, a->c, mgpu__ce_forward_rows, (void *)a) : 0);
}
static void mgpu__cpu_cross_entropy_backward(const mgpu__class_loss_args *a) {
    mgpu_parallel_for(a->ctx, a->n, mgpu__grain_for(a->c), mgpu__ce_backward_rows, (void *)a);
}

/* iarg[0]: 1 for cross_entropy, 0 for nll_loss; extra: the forward's arguments (lse, valid) */
static mgpu_result mgpu__class_loss_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__class_loss_args a = *(const mgpu__class_loss_args *)node->extra;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    MGPU__GRAD_OR_FAIL(a.dx, ctx, node->in[0]);
    a.dloss = (const float *)node->out->grad->data;
    return node->iarg[0] ? MGPU__TWIN(ctx, cross_entropy_backward, &a) : MGPU__TWIN(ctx, nll_backward, &a);
}

/* The front of nll_loss (x: log-probabilities) and cross_entropy (fused: x are logits; keeps lse). */
static mgpu_tensor *mgpu__class_loss(mgpu_context *ctx, const char *op, const char *name, mgpu_tensor *x, mgpu_tensor *target, int fused) {
    mgpu_tensor *out, *ins[2];
    mgpu__node *node;
    mgpu__class_loss_args a;
    mgpu_result r;
    memset(&a, 0, sizeof a);
    if (!mgpu__check_class_inputs(ctx, op, name, x, target, &a.n, &a.c) || !mgpu__check_targets(op, target, a.n, a.c)) return NULL;
    out = mgpu__new_activation(ctx, MGPU_F32, 0, NULL);
    if (!out) return NULL;
    a.ctx = ctx; a.x = (const float *)x->data; a.target = target->data; a.target_i64 = target->dtype == MGPU_I64;
    a.loss = (float *)out->data;
    if (!(a.valid = (float *)mgpu__arena_alloc_data(ctx, sizeof(float)))) return NULL;
    if (fused && !(a.lse = (float *)mgpu__arena_alloc_data(ctx, sizeof(float) * (size_t)MGPU__MAX(a.n, (int64_t)1)))) return NULL;
    r = fused ? MGPU__TWIN(ctx, cross_entropy_forward, &a) : MGPU__TWIN(ctx, nll_forward, &a);
    if (r != MGPU_OK) return NULL;
    ins[0] = x; ins[1] = target;
    MGPU__RECORD(ctx, op, mgpu__class_loss_backward, out, 2, ins, node);
    if (node) {
        mgpu__class_loss_args *saved = (mgpu__class_loss_args *)mgpu__arena_alloc(ctx, sizeof *saved);
        if (!saved) return NULL;
        *saved = a;
        node->iarg[0] = fused; node->extra = saved;
    }
    return out;
}

// logp (N, C), target (N) -> scalar mean of -logp[target] over counted rows
MGPU_API mgpu_tensor *mgpu_op_nll_loss(mgpu_context *ctx, mgpu_tensor *logp, mgpu_tensor *target) {
    return mgpu__class_loss(ctx, "mgpu_op_nll_loss", "logp", logp, target, 0);
}
// logits (N, C), target (N) -> scalar mean of -log softmax(logits)[target] over counted rows
MGPU_API mgpu_tensor *mgpu_op_cross_entropy(mgpu_context *ctx, mgpu_tensor *logits, mgpu_tensor *target) {
    return mgpu__class_loss(ctx, "mgpu_op_cross_entropy", "logits", logits, target, 1);
}

/* Evaluation on a GPU: logits and targets come back in one copy each (one wait per evaluated
   batch) and are counted by the host code below. */
static int64_t mgpu__count_correct_from_device(const mgpu_tensor *logits, const mgpu_tensor *target) {
    mgpu_tensor hl, ht;
    int64_t correct = -1;
    size_t lb = mgpu_tensor_nbytes(logits), tb = mgpu_tensor_nbytes(target);
    char *buf = (char *)mgpu__alloc(lb + tb + 8, "evaluation logits copied from the GPU");
    if (!buf) return -1;
    hl = *logits; ht = *target;
    hl.device.type = ht.device.type = MGPU_DEVICE_CPU; hl.device.index = ht.device.index = 0;
    hl.data = buf; ht.data = buf + ((lb + 7) & ~(size_t)7);
    if (mgpu_tensor_copy_to_host(logits, hl.data, lb) == MGPU_OK && mgpu_tensor_copy_to_host(target, ht.data, tb) == MGPU_OK)
        correct = mgpu_count_correct(&hl, &ht);
    mgpu_free(buf);
    return correct;
}

MGPU_API int64_t mgpu_count_correct(const mgpu_tensor *logits, const mgpu_tensor *target) {
    const char *op = "mgpu_count_correct";
    int64_t n, c, i, j, correct = 0;
    if (!logits || !target) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: logits and target must not be NULL", op); return -1; }
    if (logits->dtype != MGPU_F32 || (target->dtype != MGPU_I32 && target->dtype != MGPU_I64)) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: need F32 logits and an I32/I64 target, got %s and %s", op,
                   mgpu_dtype_name(logits->dtype), mgpu_dtype_name(target->dtype));
        return -1;
    }
    if (logits->ndim != 2 || target->ndim != 1 || target->shape[0] != logits->shape[0]) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: logits must be (N, C) and target (N,), got %s and %s", op, mgpu__shape_str(logits), mgpu__shape_str(target));
        return -1;
    }
    n = logits->shape[0]; c = logits->shape[1];
    if (!mgpu__on_host(logits) || !mgpu__on_host(target)) return mgpu__count_correct_from_device(logits, target);
    for (i = 0; i < n && c > 0; i++) {
        const float *x = (const float *)logits->data + i * c;
        int64_t best = 0;
        for (j = 1; j < c; j++) if (x[j] > x[best]) best = j; /* first max wins, as torch.argmax */
        if (best == mgpu__index_at(target, i)) correct++;
    }
    return correct;
}

/* --------------------------------------------------------------------------------------
   MSE loss and dropout
   -------------------------------------------------------------------------------------- */

static double mgpu__mse_partial(void *p, int64_t begin, int64_t end) {
    const mgpu__mse_args *m = (const mgpu__mse_args *)p;
    double s = 0;
    int64_t i;
    for (i = begin; i < end; i++) { double d = (double)m->a[i] - m->b[i]; s += d * d; }
    return s;
}
static void mgpu__mse_backward_range(void *p, int64_t begin, int64_t end) {
    const mgpu__mse_args *m = (const mgpu__mse_args *)p;
    float g = 2.0f * m->dloss[0] / (float)m->n;
    int64_t i;
    for (i = begin; i < end; i++) {
        float d = g * (m->a[i] - m->b[i]);
        if (m->da) m->da[i] += d;
        if (m->db) m->db[i] -= d;
    }
}
static void mgpu__cpu_mse_forward(const mgpu__mse_args *m) {
    m->loss[0] = (float)(mgpu__det_sum(m->ctx, m->n, 4096, 1, mgpu__mse_partial, (void *)m) / (double)m->n);
}
static void mgpu__cpu_mse_backward(const mgpu__mse_args *m) {
    mgpu_parallel_for(m->ctx, m->n, MGPU__GRAIN, mgpu__mse_backward_range, (void *)m);
}

static void mgpu__mse_inputs(mgpu_context *ctx, const mgpu_tensor *a, const mgpu_tensor *b, mgpu__mse_args *m) {
    memset(m, 0, sizeof *m);
    m->ctx = ctx; m->a = (const float *)a->data; m->b = (const float *)b->data; m->n = a->numel;
}
static mgpu_result mgpu__mse_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__mse_args m;
    mgpu__mse_inputs(ctx, node->in[0], node->in[1], &m);
    if (mgpu__needs_grad(node, 0)) MGPU__GRAD_OR_FAIL(m.da, ctx, node->in[0]);
    if (mgpu__needs_grad(node, 1)) MGPU__GRAD_OR_FAIL(m.db, ctx, node->in[1]);
    m.dloss = (const float *)node->out->grad->data;
    return MGPU__TWIN(ctx, mse_backward, &m);
}
MGPU_API mgpu_tensor *mgpu_op_mse_loss(mgpu_context *ctx, mgpu_tensor *a, mgpu_tensor *b) {
    const char *op = "mgpu_op_mse_loss";
    mgpu_tensor *out, *ins[2];
    mgpu__mse_args m;
    if (!mgpu__check_input(ctx, op, "a", a, 1) || !mgpu__check_input(ctx, op, "b", b, 1)) return NULL;
    if (!mgpu_tensor_same_shape(a, b))
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: a %s and b %s must have the same shape", op, mgpu__shape_str(a), mgpu__shape_str(b));
    out = mgpu__new_activation(ctx, MGPU_F32, 0, NULL);
    if (!out) return NULL;
    mgpu__mse_inputs(ctx, a, b, &m);
    m.loss = (float *)out->data;
    if (MGPU__TWIN(ctx, mse_forward, &m) != MGPU_OK) return NULL;
    ins[0] = a; ins[1] = b;
    MGPU__RECORD_PLAIN(ctx, op, mgpu__mse_backward, out, 2, ins);
    return out;
}

/* The mask is never stored: element i is kept iff uniform(seed, counter(i)) >= p, so backward
   recomputes it, and any thread count or a resumed run draws the same mask. Under DDP
   (ctx->row_world W > 1) local row j is row rank + W * j of the combined batch (DistributedSampler's
   sharding); the counters are laid out in mgpu__dropout_args. */
static void mgpu__dropout_range(void *p, int64_t begin, int64_t end) {
    const mgpu__dropout_args *d = (const mgpu__dropout_args *)p;
    int64_t i = begin;
    while (i < end) {
        int64_t j = i / d->row_size, row_end = MGPU__MIN((j + 1) * d->row_size, end);
        uint64_t base = d->first + (uint64_t)((d->rank + (d->world - 1) * j) * d->row_size);   /* counter = base + i */
        for (; i < row_end; i++) {
            float v = mgpu_random_uniform(d->seed, base + (uint64_t)i) >= d->p ? d->src[i] * d->scale : 0.0f;
            if (d->accumulate) d->dst[i] += v; else d->dst[i] = v;
        }
    }
}
static void mgpu__cpu_dropout(const mgpu__dropout_args *d) {
    mgpu_parallel_for(d->ctx, d->n, MGPU__GRAIN, mgpu__dropout_range, (void *)d);
}
static mgpu_result mgpu__dropout_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__dropout_args d = *(const mgpu__dropout_args *)node->extra;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    MGPU__GRAD_OR_FAIL(d.dst, ctx, node->in[0]);
    d.src = (const float *)node->out->grad->data;
    d.accumulate = 1;
    return MGPU__TWIN(ctx, dropout, &d);
}
/* A captured dropout's replay hook: the RNG reservation of an eager step, its first counter the step scalar. */
static mgpu_result mgpu__dropout_replay(void *ctx, int64_t n, uint64_t *words) {
    words[0] = mgpu_context_rng_reserve((mgpu_context *)ctx, (uint64_t)n);
    return MGPU_OK;
}
MGPU_API mgpu_tensor *mgpu_op_dropout(mgpu_context *ctx, mgpu_tensor *x, float p, int training) {
    const char *op = "mgpu_op_dropout";
    mgpu_tensor *out;
    mgpu__node *node;
    mgpu__dropout_args d;
    if (!mgpu__check_input(ctx, op, "x", x, 1)) return NULL;
    if (!(p >= 0.0f && p <= 1.0f)) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: p = %g must be in [0, 1]", op, (double)p);
    if (!training) return x; /* eval: identity, no RNG drawn (as nn.Dropout in eval mode) */
    memset(&d, 0, sizeof d);
    mgpu_context_rng_state(ctx, &d.seed, NULL);
    d.world = ctx->row_world > 1 ? ctx->row_world : 1;
    d.rank = d.world > 1 ? ctx->row_rank : 0;
    d.row_size = x->ndim > 0 && x->shape[0] > 0 ? MGPU__MAX((int64_t)1, x->numel / x->shape[0]) : 1;
    /* counters are drawn even for p = 0, so the stream position does not depend on p; under DDP
       every rank reserves the combined batch's counters so the streams stay aligned */
    if (mgpu__capturing(ctx)) {   /* each replay reserves its own counters */
        void *at = NULL;
        if (mgpu__step_scalar(ctx, mgpu__dropout_replay, ctx, d.world * x->numel, 1, &at) != MGPU_OK) return NULL;
        d.first_at = (const uint64_t *)at;
    } else {
        d.first = mgpu_context_rng_reserve(ctx, (uint64_t)(d.world * x->numel));
    }
    if (p == 0.0f) return x;
    out = mgpu__new_activation(ctx, MGPU_F32, x->ndim, x->shape);
    if (!out) return NULL;
    d.ctx = ctx; d.p = p; d.scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    d.src = (const float *)x->data; d.dst = (float *)out->data; d.n = x->numel;
    if (MGPU__TWIN(ctx, dropout, &d) != MGPU_OK) return NULL;
    MGPU__RECORD(ctx, op, mgpu__dropout_backward, out, 1, &x, node);
    if (node) {
        mgpu__dropout_args *saved = (mgpu__dropout_args *)mgpu__arena_alloc(ctx, sizeof *saved);
        if (!saved) return NULL;
        *saved = d;
        node->extra = saved;
    }
    return out;
}

/* --------------------------------------------------------------------------------------
   Reductions: sum, mean, sum_dim, mean_dim, max_dim
   -------------------------------------------------------------------------------------- */

/* Seen as (outer, dim, inner), a sum reduces dim onto out (outer, inner): its strides against x are
   (inner, 0, 1). Backward broadcasts dy back through the same strides. */
static void mgpu__cpu_sum_forward(const mgpu__sum_args *a) {
    int64_t shape[3], out_st[3];
    shape[0] = a->outer; shape[1] = a->dim; shape[2] = a->inner;
    out_st[0] = a->inner; out_st[1] = 0; out_st[2] = 1;
    if (a->outer * a->inner > 0) mgpu__reduce_into(a->ctx, 3, shape, a->x, out_st, NULL, NULL, a->out, a->scale, 0);
}
static void mgpu__cpu_sum_backward(const mgpu__sum_args *a) {
    int64_t shape[3], dy_st[3];
    shape[0] = a->outer; shape[1] = a->dim; shape[2] = a->inner;
    dy_st[0] = a->inner; dy_st[1] = 0; dy_st[2] = 1;
    mgpu__ew_apply(a->ctx, MGPU__EW_ACC, a->scale, 3, shape, a->out, a->dy, dy_st, NULL, NULL);
}

/* x as (outer, dim, inner) around dim d (d < 0: everything summed, outer = inner = 1) */
static void mgpu__sum_lines(mgpu_context *ctx, const mgpu_tensor *x, int d, float scale, mgpu__sum_args *a) {
    memset(a, 0, sizeof *a);
    a->ctx = ctx; a->scale = scale;
    if (d >= 0) mgpu__split_at(x, d, &a->outer, &a->dim, &a->inner);
    else { a->outer = 1; a->dim = x->numel; a->inner = 1; }
}

static mgpu_result mgpu__sum_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__sum_args a;
    float *dx;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    MGPU__GRAD_OR_FAIL(dx, ctx, node->in[0]);
    mgpu__sum_lines(ctx, node->in[0], (int)node->iarg[0], node->farg[0], &a);
    a.dy = (const float *)node->out->grad->data; a.out = dx;
    return MGPU__TWIN(ctx, sum_backward, &a);
}

/* Shape of x with dim d removed (or kept as 1); d < 0: a scalar. */
static int mgpu__reduced_shape(const mgpu_tensor *x, int d, int keepdim, int64_t *shape) {
    int i, n = 0;
    if (d < 0) return 0;
    for (i = 0; i < x->ndim; i++) {
        if (i != d) shape[n++] = x->shape[i];
        else if (keepdim) shape[n++] = 1;
    }
    return n;
}

static mgpu_tensor *mgpu__sum_mean(mgpu_context *ctx, const char *op, mgpu_tensor *x, int dim, int all, int keepdim, int mean) {
    int64_t shape[MGPU_MAX_DIMS];
    mgpu_tensor *out;
    mgpu__node *node;
    mgpu__sum_args a;
    int d = -1, ndim;
    float scale;
    if (!mgpu__check_input(ctx, op, "x", x, 1)) return NULL;
    if (!all && (d = mgpu__norm_dim(op, dim, x->ndim)) < 0) return NULL;
    ndim = mgpu__reduced_shape(x, d, keepdim, shape);
    out = mgpu__new_activation(ctx, MGPU_F32, ndim, shape);
    if (!out) return NULL;
    /* mean over nothing is 0 * inf = NaN, as PyTorch */
    scale = mean ? 1.0f / (float)(all ? x->numel : x->shape[d]) : 1.0f;
    mgpu__sum_lines(ctx, x, d, scale, &a);
    a.x = (const float *)x->data; a.out = (float *)out->data;
    if (a.outer * a.inner == 1 && !(a.scratch = (double *)mgpu__arena_alloc_data(ctx, sizeof(double) * MGPU_CUDA_REDUCE_PARTIALS))) return NULL;
    if (MGPU__TWIN(ctx, sum_forward, &a) != MGPU_OK) return NULL;
    MGPU__RECORD(ctx, op, mgpu__sum_backward, out, 1, &x, node);
    if (node) { node->iarg[0] = d; node->farg[0] = scale; }
    return out;
}

MGPU_API mgpu_tensor *mgpu_op_sum(mgpu_context *ctx, mgpu_tensor *x) { return mgpu__sum_mean(ctx, "mgpu_op_sum", x, 0, 1, 0, 0); }
MGPU_API mgpu_tensor *mgpu_op_mean(mgpu_context *ctx, mgpu_tensor *x) { return mgpu__sum_mean(ctx, "mgpu_op_mean", x, 0, 1, 0, 1); }
MGPU_API mgpu_tensor *mgpu_op_sum_dim(mgpu_context *ctx, mgpu_tensor *x, int dim, int keepdim) {
    return mgpu__sum_mean(ctx, "mgpu_op_sum_dim", x, dim, 0, keepdim, 0);
}
MGPU_API mgpu_tensor *mgpu_op_mean_dim(mgpu_context *ctx, mgpu_tensor *x, int dim, int keepdim) {
    return mgpu__sum_mean(ctx, "mgpu_op_mean_dim", x, dim, 0, keepdim, 1);
}

static void mgpu__max_forward_range(void *p, int64_t begin, int64_t end) {
    const mgpu__max_dim_args *m = (const mgpu__max_dim_args *)p;
    int64_t line, j;
    for (line = begin; line < end; line++) {
        const float *x = m->x + (line / m->inner) * m->dim * m->inner + line % m->inner;
        int64_t best = 0;
        for (j = 1; j < m->dim; j++) {
            float v = x[j * m->inner], b = x[best * m->inner];
            if (v > b || (v != v && b == b)) best = j; /* first max; NaN wins, as torch.max */
        }
        m->argmax[line] = best;
        m->out[line] = x[best * m->inner];
    }
}
static void mgpu__max_backward_range(void *p, int64_t begin, int64_t end) {
    const mgpu__max_dim_args *m = (const mgpu__max_dim_args *)p;
    int64_t line;
    for (line = begin; line < end; line++)
        m->out[(line / m->inner) * m->dim * m->inner + line % m->inner + m->argmax[line] * m->inner] += m->dy[line];
}
static void mgpu__cpu_max_dim_forward(const mgpu__max_dim_args *m) {
    mgpu_parallel_for(m->ctx, m->outer * m->inner, mgpu__grain_for(m->dim), mgpu__max_forward_range, (void *)m);
}
static void mgpu__cpu_max_dim_backward(const mgpu__max_dim_args *m) {
    mgpu_parallel_for(m->ctx, m->outer * m->inner, MGPU__GRAIN, mgpu__max_backward_range, (void *)m);
}
/* extra: the forward's arguments (argmax) */
static mgpu_result mgpu__max_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__max_dim_args m = *(const mgpu__max_dim_args *)node->extra;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    MGPU__GRAD_OR_FAIL(m.out, ctx, node->in[0]);
    m.dy = (const float *)node->out->grad->data;
    return MGPU__TWIN(ctx, max_dim_backward, &m);
}
MGPU_API mgpu_tensor *mgpu_op_max_dim(mgpu_context *ctx, mgpu_tensor *x, int dim, int keepdim) {
    const char *op = "mgpu_op_max_dim";
    int64_t shape[MGPU_MAX_DIMS];
    mgpu_tensor *out;
    mgpu__max_dim_args m;
    mgpu__node *node;
    int d, ndim;
    if (!mgpu__check_input(ctx, op, "x", x, 1)) return NULL;
    if ((d = mgpu__norm_dim(op, dim, x->ndim)) < 0) return NULL;
    if (x->shape[d] == 0) MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: dim %d of x %s is empty; max has no value", op, dim, mgpu__shape_str(x));
    ndim = mgpu__reduced_shape(x, d, keepdim, shape);
    out = mgpu__new_activation(ctx, MGPU_F32, ndim, shape);
    if (!out) return NULL;
    memset(&m, 0, sizeof m);
    m.ctx = ctx;
    mgpu__split_at(x, d, &m.outer, &m.dim, &m.inner);
    m.x = (const float *)x->data; m.out = (float *)out->data;
    m.argmax = (int64_t *)mgpu__arena_alloc_data(ctx, sizeof(int64_t) * (size_t)MGPU__MAX(out->numel, (int64_t)1));
    if (!m.argmax) return NULL;
    if (MGPU__TWIN(ctx, max_dim_forward, &m) != MGPU_OK) return NULL;
    MGPU__RECORD(ctx, op, mgpu__max_backward, out, 1, &x, node);
    if (node) {
        mgpu__max_dim_args *saved = (mgpu__max_dim_args *)mgpu__arena_alloc(ctx, sizeof *saved);
        if (!saved) return NULL;
        *saved = m;
        node->extra = saved;
    }
    return out;
}

/* --------------------------------------------------------------------------------------
   Shape ops: reshape and flatten (views), transpose, concat, narrow (copies), cast
   -------------------------------------------------------------------------------------- */

static void mgpu__cpu_accumulate(const mgpu__accumulate_args *a) {
    int64_t one = 1, n = a->n;
    mgpu__ew_apply(a->ctx, MGPU__EW_ACC, 1.0f, 1, &n, a->out, a->x, &one, NULL, NULL);
}
/* Backward of ops whose output holds x's elements in the same order (views, casts). */
static mgpu_result mgpu__passthrough_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__accumulate_args a;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    MGPU__GRAD_OR_FAIL(a.out, ctx, node->in[0]);
    a.ctx = ctx; a.x = (const float *)node->out->grad->data; a.n = node->out->numel;
    return MGPU__TWIN(ctx, accumulate, &a);
}

static mgpu_tensor *mgpu__view(mgpu_context *ctx, const char *op, mgpu_tensor *x, int ndim, const int64_t *shape) {
    mgpu_tensor *out = mgpu__new_view(ctx, x, ndim, shape);
    if (!out) return NULL;
    MGPU__RECORD_PLAIN(ctx, op, mgpu__passthrough_backward, out, 1, &x);
    return out;
}

MGPU_API mgpu_tensor *mgpu_op_reshape(mgpu_context *ctx, mgpu_tensor *x, int ndim, const int64_t *shape) {
    const char *op = "mgpu_op_reshape";
    int64_t want[MGPU_MAX_DIMS], known = 1;
    int i, infer = -1;
    char text[96];
    if (!mgpu__check_input(ctx, op, "x", x, 0)) return NULL;
    if (ndim < 0 || ndim > MGPU_MAX_DIMS || (ndim > 0 && !shape))
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: ndim %d must be in [0, %d] with a non-NULL shape", op, ndim, MGPU_MAX_DIMS);
    mgpu_shape_string(ndim, shape, text, sizeof text);
    for (i = 0; i < ndim; i++) {
        want[i] = shape[i];
        if (shape[i] == -1 && infer < 0) { infer = i; continue; }
        if (shape[i] < 0) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: bad target shape %s (only one -1 allowed, no other negative size)", op, text);
        if (shape[i] > 0 && known > INT64_MAX / shape[i]) MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: target shape %s is too large", op, text);
        known *= shape[i];
    }
    if (infer >= 0) {
        if (known == 0 || x->numel % known != 0)
            MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: cannot reshape %s (%lld elements) to %s", op, mgpu__shape_str(x), (long long)x->numel, text);
        want[infer] = x->numel / known;
        known = x->numel;
    }
    if (known != x->numel)
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: cannot reshape %s (%lld elements) to %s (%lld elements)", op, mgpu__shape_str(x),
                        (long long)x->numel, text, (long long)known);
    return mgpu__view(ctx, op, x, ndim, want);
}

MGPU_API mgpu_tensor *mgpu_op_flatten(mgpu_context *ctx, mgpu_tensor *x, int start_dim) {
    const char *op = "mgpu_op_flatten";
    int64_t shape[MGPU_MAX_DIMS];
    int d, i;
    if (!mgpu__check_input(ctx, op, "x", x, 0)) return NULL;
    if (x->ndim == 0) { /* as torch.flatten: a scalar becomes (1,) */
        if (start_dim != 0 && start_dim != -1) { mgpu__norm_dim(op, start_dim, 1); return NULL; }
        shape[0] = 1;
        return mgpu__view(ctx, op, x, 1, shape);
    }
    if ((d = mgpu__norm_dim(op, start_dim, x->ndim)) < 0) return NULL;
    for (i = 0; i < d; i++) shape[i] = x->shape[i];
    shape[d] = 1;
    for (i = d; i < x->ndim; i++) shape[d] *= x->shape[i];
    return mgpu__view(ctx, op, x, d + 1, shape);
}

/* Strided copy between operand 0 (dst) and operand 1 (src): esize-byte elements forward,
   F32 accumulation backward. */
typedef struct mgpu__copy_arg { void *dst; const void *src; size_t esize; int accumulate; } mgpu__copy_arg;
static void mgpu__copy_run(void *p, const int64_t *off, const int64_t *st, int64_t n) {
    const mgpu__copy_arg *c = (const mgpu__copy_arg *)p;
    int64_t j;
#define MGPU__COPY_AS(T) do { T *d_ = (T *)c->dst + off[0]; const T *s_ = (const T *)c->src + off[1]; \
        for (j = 0; j < n; j++) d_[j * st[0]] = s_[j * st[1]]; } while (0)
    if (c->accumulate) {
        float *d = (float *)c->dst + off[0];
        const float *s = (const float *)c->src + off[1];
        for (j = 0; j < n; j++) d[j * st[0]] += s[j * st[1]];
        return;
    }
    switch (c->esize) {
    case 1: MGPU__COPY_AS(uint8_t); break;
    case 2: MGPU__COPY_AS(uint16_t); break;
    case 4: MGPU__COPY_AS(uint32_t); break;
    default: MGPU__COPY_AS(uint64_t); break;
    }
#undef MGPU__COPY_AS
}

static void mgpu__copy_strided(mgpu_context *ctx, int ndim, const int64_t *shape, void *dst, const int64_t *dst_st,
                               const void *src, const int64_t *src_st, size_t esize, int accumulate) {
    mgpu__iter it;
    mgpu__copy_arg c;
    mgpu__iter_start(&it, ndim, shape);
    mgpu__iter_operand(&it, dst_st);
    mgpu__iter_operand(&it, src_st);
    mgpu__iter_coalesce(&it);
    c.dst = dst; c.src = src; c.esize = esize; c.accumulate = accumulate;
    mgpu__iter_parallel(ctx, &it, mgpu__copy_run, &c);
}

/* out (outer, d1, mid, d0, inner) is written in order while x (outer, d0, mid, d1, inner) is read
   through its own strides taken in out's dim order. */
static void mgpu__cpu_transpose(const mgpu__transpose_args *a) {
    int64_t shape[5], out_st[5], x_st[5];
    shape[0] = a->outer; shape[1] = a->d1; shape[2] = a->mid; shape[3] = a->d0; shape[4] = a->inner;
    x_st[4] = 1; x_st[1] = a->inner; x_st[2] = a->d1 * a->inner; x_st[3] = a->mid * x_st[2]; x_st[0] = a->d0 * x_st[3];
    mgpu__contig_strides(5, shape, out_st);
    mgpu__copy_strided(a->ctx, 5, shape, a->out, out_st, a->x, x_st, a->esize, a->accumulate);
}

/* x seen as (outer, d0, mid, d1, inner) around its dims lo <= hi (lo == hi: a plain copy). */
static void mgpu__transpose_view(mgpu_context *ctx, const mgpu_tensor *x, int lo, int hi, mgpu__transpose_args *a) {
    int i;
    memset(a, 0, sizeof *a);
    a->ctx = ctx; a->esize = mgpu_dtype_size(x->dtype);
    a->outer = a->mid = a->inner = 1;
    a->d0 = x->shape[lo]; a->d1 = lo == hi ? 1 : x->shape[hi];
    for (i = 0; i < lo; i++) a->outer *= x->shape[i];
    for (i = lo + 1; i < hi; i++) a->mid *= x->shape[i];
    for (i = hi + 1; i < x->ndim; i++) a->inner *= x->shape[i];
}

/* iarg = {lo, hi}: the gradient goes back through the same transpose, accumulated. */
static mgpu_result mgpu__transpose_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__transpose_args a;
    float *dx;
    int64_t t;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    MGPU__GRAD_OR_FAIL(dx, ctx, node->in[0]);
    mgpu__transpose_view(ctx, node->in[0], (int)node->iarg[0], (int)node->iarg[1], &a);
    t = a.d0; a.d0 = a.d1; a.d1 = t; /* dy is (outer, d1, mid, d0, inner) */
    a.x = node->out->grad->data; a.out = dx; a.esize = sizeof(float); a.accumulate = 1;
    return MGPU__TWIN(ctx, transpose, &a);
}

MGPU_API mgpu_tensor *mgpu_op_transpose(mgpu_context *ctx, mgpu_tensor *x, int dim0, int dim1) {
    const char *op = "mgpu_op_transpose";
    int64_t shape[MGPU_MAX_DIMS], t;
    mgpu_tensor *out;
    mgpu__node *node;
    mgpu__transpose_args a;
    int d0, d1;
    if (!mgpu__check_input(ctx, op, "x", x, 0)) return NULL;
    if ((d0 = mgpu__norm_dim(op, dim0, x->ndim)) < 0 || (d1 = mgpu__norm_dim(op, dim1, x->ndim)) < 0) return NULL;
    if (d0 > d1) { int s = d0; d0 = d1; d1 = s; } /* transpose(x, a, b) is transpose(x, b, a) */
    memcpy(shape, x->shape, sizeof shape);
    t = shape[d0]; shape[d0] = shape[d1]; shape[d1] = t;
    out = mgpu__new_activation(ctx, x->dtype, x->ndim, shape);
    if (!out) return NULL;
    mgpu__transpose_view(ctx, x, d0, d1, &a);
    a.x = x->data; a.out = out->data;
    if (MGPU__TWIN(ctx, transpose, &a) != MGPU_OK) return NULL;
    MGPU__RECORD(ctx, op, mgpu__transpose_backward, out, 1, &x, node);
    if (node) { node->iarg[0] = d0; node->iarg[1] = d1; }
    return out;
}

static void mgpu__copy_rows_range(void *p, int64_t begin, int64_t end) {
    const mgpu__copy_rows_args *a = (const mgpu__copy_rows_args *)p;
    int64_t r, j;
    for (r = begin; r < end; r++) {
        if (a->accumulate) {
            const float *s = (const float *)a->src + r * a->src_pitch;
            float *d = (float *)a->dst + r * a->dst_pitch;
            for (j = 0; j < a->len; j++) d[j] += s[j];
        } else if (a->len > 0) {
            memcpy((char *)a->dst + (size_t)(r * a->dst_pitch) * a->esize, (const char *)a->src + (size_t)(r * a->src_pitch) * a->esize,
                   (size_t)a->len * a->esize);
        }
    }
}
/* Rows are disjoint in dst, so they can go to different threads. */
static void mgpu__cpu_copy_rows(const mgpu__copy_rows_args *a) {
    mgpu_parallel_for(a->ctx, a->rows, mgpu__grain_for(a->len), mgpu__copy_rows_range, (void *)a);
}

static void mgpu__gather_rows_range(void *p, int64_t begin, int64_t end) {
    const mgpu__gather_rows_args *a = (const mgpu__gather_rows_args *)p;
    size_t row = (size_t)a->len * a->esize;
    int64_t r;
    for (r = begin; r < end; r++) {
        int64_t id = a->idx[r];
        char *d = (char *)a->dst + (size_t)r * row;
        if (id < 0 || id >= a->n_src) memset(d, 0, row);
        else if (row) memcpy(d, (const char *)a->src + (size_t)id * row, row);
    }
}
static void mgpu__cpu_gather_rows(const mgpu__gather_rows_args *a) {
    mgpu_parallel_for(a->ctx, a->rows, mgpu__grain_for(a->len), mgpu__gather_rows_range, (void *)a);
}

/* Copies the slice [start, start + len) of dim d of a tensor shaped like `like`, held in `whole`,
   to or from `part`, where the slice is contiguous: into the whole (into_whole: concat, narrow's
   backward) or out of it. Gradients (grad) are F32 and accumulate. */
static mgpu_result mgpu__copy_slice(mgpu_context *ctx, const mgpu_tensor *like, int d, int64_t start, int64_t len, void *whole, void *part,
                                    int into_whole, int grad) {
    mgpu__copy_rows_args a;
    int64_t outer = 0, size = 0, inner = 0;
    char *slice;
    mgpu__split_at(like, d, &outer, &size, &inner);
    a.ctx = ctx;
    a.esize = grad ? sizeof(float) : mgpu_dtype_size(like->dtype);
    a.accumulate = grad;
    a.rows = outer; a.len = len * inner;
    slice = (char *)whole + (size_t)(start * inner) * a.esize;
    a.src = into_whole ? part : slice; a.src_pitch = into_whole ? a.len : size * inner;
    a.dst = into_whole ? (void *)slice : part; a.dst_pitch = into_whole ? size * inner : a.len;
    return MGPU__TWIN(ctx, copy_rows, &a);
}

/* iarg[0] = dim; one row-block copy per input that needs a gradient */
static mgpu_result mgpu__concat_backward(mgpu_context *ctx, mgpu__node *node) {
    int d = (int)node->iarg[0], k;
    int64_t offset = 0;
    for (k = 0; k < node->n_in; k++) {
        int64_t len = node->in[k]->shape[d];
        float *dx;
        if (mgpu__needs_grad(node, k)) {
            mgpu_result r;
            MGPU__GRAD_OR_FAIL(dx, ctx, node->in[k]);
            if ((r = mgpu__copy_slice(ctx, node->out, d, offset, len, node->out->grad->data, dx, 0, 1)) != MGPU_OK) return r;
        }
        offset += len;
    }
    return MGPU_OK;
}

// xs[k] (..., D_k, ...) -> (..., sum D_k, ...): one row-block copy per input
MGPU_API mgpu_tensor *mgpu_op_concat(mgpu_context *ctx, mgpu_tensor *const *xs, int n, int dim) {
    const char *op = "mgpu_op_concat";
    int64_t shape[MGPU_MAX_DIMS], offset = 0;
    mgpu_tensor *out;
    mgpu__node *node;
    int d, k, i;
    if (!ctx) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: ctx is NULL", op);
    if (!xs || n < 1) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: need n >= 1 tensors in xs (got n = %d%s)", op, n, xs ? "" : ", xs NULL");
    for (k = 0; k < n; k++) {
        char name[32];
        snprintf(name, sizeof name, "xs[%d]", k);
        if (!mgpu__check_input(ctx, op, name, xs[k], 0)) return NULL;
    }
    if ((d = mgpu__norm_dim(op, dim, xs[0]->ndim)) < 0) return NULL;
    memcpy(shape, xs[0]->shape, sizeof shape);
    shape[d] = 0;
    for (k = 0; k < n; k++) {
        int fits = xs[k]->ndim == xs[0]->ndim && xs[k]->dtype == xs[0]->dtype;
        for (i = 0; fits && i < xs[0]->ndim; i++) if (i != d && xs[k]->shape[i] != xs[0]->shape[i]) fits = 0;
        if (!fits)
            MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: xs[%d] is %s %s, xs[0] is %s %s; they must match except along dim %d", op, k,
                            mgpu_dtype_name(xs[k]->dtype), mgpu__shape_str(xs[k]), mgpu_dtype_name(xs[0]->dtype), mgpu__shape_str(xs[0]), dim);
        shape[d] += xs[k]->shape[d];
    }
    out = mgpu__new_activation(ctx, xs[0]->dtype, xs[0]->ndim, shape);
    if (!out) return NULL;
    for (k = 0; k < n; k++) {
        if (mgpu__copy_slice(ctx, out, d, offset, xs[k]->shape[d], out->data, xs[k]->data, 1, 0) != MGPU_OK) return NULL;
        offset += xs[k]->shape[d];
    }
    MGPU__RECORD(ctx, op, mgpu__concat_backward, out, n, xs, node);
    if (node) node->iarg[0] = d;
    return out;
}

/* iarg = {dim, start, length} */
static mgpu_result mgpu__narrow_backward(mgpu_context *ctx, mgpu__node *node) {
    float *dx;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    MGPU__GRAD_OR_FAIL(dx, ctx, node->in[0]);
    return mgpu__copy_slice(ctx, node->in[0], (int)node->iarg[0], node->iarg[1], node->iarg[2], dx, node->out->grad->data, 1, 1);
}

MGPU_API mgpu_tensor *mgpu_op_narrow(mgpu_context *ctx, mgpu_tensor *x, int dim, int64_t start, int64_t length) {
    const char *op = "mgpu_op_narrow";
    int64_t shape[MGPU_MAX_DIMS], size;
    mgpu_tensor *out;
    mgpu__node *node;
    int d;
    if (!mgpu__check_input(ctx, op, "x", x, 0)) return NULL;
    if ((d = mgpu__norm_dim(op, dim, x->ndim)) < 0) return NULL;
    size = x->shape[d];
    if (start < 0) start += size; /* as torch.narrow: a negative start counts from the end */
    if (start < 0 || start > size || length < 0 || length > size - start)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: start %lld, length %lld do not fit in dim %d of size %lld of x %s", op,
                        (long long)start, (long long)length, dim, (long long)size, mgpu__shape_str(x));
    memcpy(shape, x->shape, sizeof shape);
    shape[d] = length;
    out = mgpu__new_activation(ctx, x->dtype, x->ndim, shape);
    if (!out) return NULL;
    if (mgpu__copy_slice(ctx, x, d, start, length, x->data, out->data, 0, 0) != MGPU_OK) return NULL;
    MGPU__RECORD(ctx, op, mgpu__narrow_backward, out, 1, &x, node);
    if (node) { node->iarg[0] = d; node->iarg[1] = start; node->iarg[2] = length; }
    return out;
}

/* Float conversion through F32 in stack-sized pieces; rounding to half is round-to-nearest-even. */
static void mgpu__cast_range(void *p, int64_t begin, int64_t end) {
    const mgpu__cast_args *c = (const mgpu__cast_args *)p;
    float buf[256];
    int64_t i0, i, n;
    for (i0 = begin; i0 < end; i0 += n) {
        n = MGPU__MIN((int64_t)256, end - i0);
        switch (c->src_dtype) {
        case MGPU_F16: for (i = 0; i < n; i++) buf[i] = mgpu_f16_to_f32(((const uint16_t *)c->src)[i0 + i]); break;
        case MGPU_BF16: for (i = 0; i < n; i++) buf[i] = mgpu_bf16_to_f32(((const uint16_t *)c->src)[i0 + i]); break;
        default: memcpy(buf, (const float *)c->src + i0, sizeof(float) * (size_t)n); break;
        }
        switch (c->dst_dtype) {
        case MGPU_F16: for (i = 0; i < n; i++) ((uint16_t *)c->dst)[i0 + i] = mgpu_f32_to_f16(buf[i]); break;
        case MGPU_BF16: for (i = 0; i < n; i++) ((uint16_t *)c->dst)[i0 + i] = mgpu_f32_to_bf16(buf[i]); break;
        default: memcpy((float *)c->dst + i0, buf, sizeof(float) * (size_t)n); break;
        }
    }
}
static void mgpu__cpu_cast(const mgpu__cast_args *a) { mgpu_parallel_for(a->ctx, a->n, MGPU__GRAIN, mgpu__cast_range, (void *)a); }

MGPU_API mgpu_tensor *mgpu_op_cast(mgpu_context *ctx, mgpu_tensor *x, mgpu_dtype dtype) {
    const char *op = "mgpu_op_cast";
    mgpu_tensor *out;
    mgpu__cast_args c;
    if (!mgpu__check_input(ctx, op, "x", x, 0)) return NULL;
    if (!mgpu__dtype_valid(dtype) || !mgpu__dtype_is_float(dtype) || !mgpu__dtype_is_float(x->dtype))
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: casts go between F32, F16 and BF16; asked %s -> %s", op,
                        mgpu_dtype_name(x->dtype), mgpu_dtype_name(dtype));
    if (dtype == x->dtype) return x; /* as tensor.to(same dtype): no copy */
    out = mgpu__new_activation(ctx, dtype, x->ndim, x->shape);
    if (!out) return NULL;
    c.ctx = ctx; c.src = x->data; c.src_dtype = x->dtype; c.dst = out->data; c.dst_dtype = dtype; c.n = x->numel;
    if (MGPU__TWIN(ctx, cast, &c) != MGPU_OK) return NULL;
    MGPU__RECORD_PLAIN(ctx, op, mgpu__passthrough_backward, out, 1, &x);
    return out;
}
/* ======================================================================================
   Ops: GEMM, matmul, linear, conv2d, pooling
   ====================================================================================== */

/* The CPU GEMM and the ops built on it: matmul, linear, conv2d (im2col + GEMM), max/avg pooling. */

/* --------------------------------------------------------------------------------------
   GEMM: C = alpha * op(A) @ op(B) + beta * C (row-major), Goto/BLIS style.
   Panels of A (MR rows) and B (NR columns) are packed into contiguous buffers so the
   register-blocked micro-kernel always reads one layout, whatever the transposes. Blocking:
   KC along K (a B micro-panel stays in L1), MC rows of A per packed block (L2), NC columns
   of B per packed block (L3). Threads split C into tiles; every element of C is computed by
   exactly one task with a fixed K order, so results do not depend on the thread count.
   -------------------------------------------------------------------------------------- */

#define MGPU__MR 6
#define MGPU__NR 16
/* K block. MGPU_GEMM_KC (a multiple of 8) changes it, and with it the order in which each element
   of C sums its products: tests build such a twin to measure how far training amplifies a change
   of summation order alone (tests/emu_training.sh). */
#ifndef MGPU_GEMM_KC
#define MGPU_GEMM_KC 256
#endif
#if MGPU_GEMM_KC < 8 || MGPU_GEMM_KC % 8 != 0
#error "MGPU_GEMM_KC must be a positive multiple of 8"
#endif
#define MGPU__KC MGPU_GEMM_KC
#define MGPU__MC 144
#define MGPU__NC 2048
/* below this many multiply-adds a GEMM runs on the calling thread: waking workers costs more */
#define MGPU__GEMM_SERIAL_MACS ((int64_t)1 << 20)

#ifdef MGPU_USE_CBLAS
#ifdef __cplusplus
extern "C" {
#endif
/* cblas.h is not included so the header needs no BLAS headers; the enums are passed as ints. */
void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc);
#ifdef __cplusplus
}
#endif
#define MGPU__CBLAS_ROW_MAJOR 101
#define MGPU__CBLAS_NO_TRANS 111
#define MGPU__CBLAS_TRANS 112
#endif

/* One GEMM operand as seen by the packing code: element (r, k), with r the row of op(A) or the
   column of op(B), lives at p + r * rs + k * ks. Batched GEMMs step p by batch_stride. */
typedef struct mgpu__gemm_operand {
    const float *p;
    int64_t rs, ks;
    int64_t batch_stride;
    int trans; int64_t ld;   /* the BLAS view, for the cblas route */
} mgpu__gemm_operand;

/* op(A) (M, K): A is (M, K) with lda, or (K, M) when transposed. */
static mgpu__gemm_operand mgpu__gemm_a(const float *a, int trans, int64_t lda) {
    mgpu__gemm_operand o;
    memset(&o, 0, sizeof o);
    o.p = a; o.trans = trans; o.ld = lda;
    o.rs = trans ? 1 : lda;
    o.ks = trans ? lda : 1;
    return o;
}
/* op(B) (K, N): B is (K, N) with ldb, or (N, K) when transposed. Rows of the packed view are N. */
static mgpu__gemm_operand mgpu__gemm_b(const float *b, int trans, int64_t ldb) {
    mgpu__gemm_operand o;
    memset(&o, 0, sizeof o);
    o.p = b; o.trans = trans; o.ld = ldb;
    o.rs = trans ? ldb : 1;
    o.ks = trans ? 1 : ldb;
    return o;
}

/* Micro-kernel: acc (MR, NR) = ap (kc, MR) . bp (kc, NR); then c = alpha * acc + beta * c for the
   full tile (beta == 0: c is not read, so NaN in c does not propagate). */
#if defined(MGPU__GEMM_AVX2)
static void mgpu__gemm_kernel_full(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc, float alpha, float beta) {
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
    int64_t k;
#define MGPU__FMA_ROW(i)                                                   \
    do { __m256 a_ = _mm256_broadcast_ss(ap + (i));                        \
         c##i##0 = _mm256_fmadd_ps(a_, b0, c##i##0);                       \
         c##i##1 = _mm256_fmadd_ps(a_, b1, c##i##1); } while (0)
    for (k = 0; k < kc; k++) {
        __m256 b0 = _mm256_load_ps(bp), b1 = _mm256_load_ps(bp + 8);
        MGPU__FMA_ROW(0); MGPU__FMA_ROW(1); MGPU__FMA_ROW(2);
        MGPU__FMA_ROW(3); MGPU__FMA_ROW(4); MGPU__FMA_ROW(5);
        ap += MGPU__MR; bp += MGPU__NR;
    }
#undef MGPU__FMA_ROW
#define MGPU__STORE_ROW(i)                                                                                     \
    do { float *r_ = c + (i) * ldc;                                                                            \
         __m256 x0_ = _mm256_mul_ps(va, c##i##0), x1_ = _mm256_mul_ps(va, c##i##1);                            \
         if (beta != 0.0f) { x0_ = _mm256_fmadd_ps(vb, _mm256_loadu_ps(r_), x0_);                             \
                             x1_ = _mm256_fmadd_ps(vb, _mm256_loadu_ps(r_ + 8), x1_); }                        \
         _mm256_storeu_ps(r_, x0_); _mm256_storeu_ps(r_ + 8, x1_); } while (0)
    MGPU__STORE_ROW(0); MGPU__STORE_ROW(1); MGPU__STORE_ROW(2);
    MGPU__STORE_ROW(3); MGPU__STORE_ROW(4); MGPU__STORE_ROW(5);
#undef MGPU__STORE_ROW
}
#elif defined(__GNUC__) && !defined(__CUDACC__)
/* Baseline x86-64 / other targets, GCC vector extensions: the tile is done as two 6 x 8 halves so
   the 12 accumulators (4 floats each) fit in 16 SSE registers. */
typedef float mgpu__v4 __attribute__((vector_size(16)));
static mgpu__v4 mgpu__v4_load(const float *p) { mgpu__v4 v; memcpy(&v, p, sizeof v); return v; }
static void mgpu__gemm_kernel_full(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc, float alpha, float beta) {
    int h, i;
    for (h = 0; h < MGPU__NR; h += 8) {
        mgpu__v4 acc[MGPU__MR][2];
        const float *a = ap, *b = bp + h;
        int64_t k;
        memset(acc, 0, sizeof acc);
        for (k = 0; k < kc; k++) {
            mgpu__v4 b0 = mgpu__v4_load(b), b1 = mgpu__v4_load(b + 4);
#define MGPU__V4_ROW(r) do { float a_ = a[r]; acc[r][0] += a_ * b0; acc[r][1] += a_ * b1; } while (0)
            MGPU__V4_ROW(0); MGPU__V4_ROW(1); MGPU__V4_ROW(2); MGPU__V4_ROW(3); MGPU__V4_ROW(4); MGPU__V4_ROW(5);
#undef MGPU__V4_ROW
            a += MGPU__MR; b += MGPU__NR;
        }
        for (i = 0; i < MGPU__MR; i++) {
            float *r = c + i * ldc + h;
            mgpu__v4 x0 = alpha * acc[i][0], x1 = alpha * acc[i][1];
            if (beta != 0.0f) { x0 += beta * mgpu__v4_load(r); x1 += beta * mgpu__v4_load(r + 4); }
            memcpy(r, &x0, sizeof x0); memcpy(r + 4, &x1, sizeof x1);
        }
    }
}
#else
/* Plain C for other compilers. */
static void mgpu__gemm_kernel_full(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc, float alpha, float beta) {
    float acc[MGPU__MR * MGPU__NR];
    int64_t k;
    int i, j;
    memset(acc, 0, sizeof acc);
    for (k = 0; k < kc; k++) {
        for (i = 0; i < MGPU__MR; i++) {
            float a = ap[i];
            for (j = 0; j < MGPU__NR; j++) acc[i * MGPU__NR + j] += a * bp[j];
        }
        ap += MGPU__MR; bp += MGPU__NR;
    }
    for (i = 0; i < MGPU__MR; i++) {
        float *r = c + i * ldc;
        for (j = 0; j < MGPU__NR; j++) {
            float x = alpha * acc[i * MGPU__NR + j];
            r[j] = beta != 0.0f ? beta * r[j] + x : x;
        }
    }
}
#endif

/* Any tile: edge tiles go through a full-size scratch tile so they round exactly like full ones. */
static void mgpu__gemm_kernel(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc, int mr, int nr, float alpha, float beta) {
    float tile[MGPU__MR * MGPU__NR];
    int i;
    if (mr == MGPU__MR && nr == MGPU__NR) { mgpu__gemm_kernel_full(kc, ap, bp, c, ldc, alpha, beta); return; }
    memset(tile, 0, sizeof tile);
    if (beta != 0.0f)
        for (i = 0; i < mr; i++) memcpy(tile + i * MGPU__NR, c + i * ldc, sizeof(float) * (size_t)nr);
    mgpu__gemm_kernel_full(kc, ap, bp, tile, MGPU__NR, alpha, beta);
    for (i = 0; i < mr; i++) memcpy(c + i * ldc, tile + i * MGPU__NR, sizeof(float) * (size_t)nr);
}

#if defined(MGPU__GEMM_AVX2)
/* In-register transpose of 8 rows of 8 floats: v[i] becomes column i. */
static void mgpu__transpose8(__m256 *v) {
    __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
    __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
    __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    v[0] = _mm256_permute2f128_ps(u0, u4, 0x20); v[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    v[2] = _mm256_permute2f128_ps(u2, u6, 0x20); v[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    v[4] = _mm256_permute2f128_ps(u0, u4, 0x31); v[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    v[6] = _mm256_permute2f128_ps(u2, u6, 0x31); v[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
/* Rows contiguous along K (ks == 1), a full panel of w = 6 or 16 rows: 8 x 8 blocks are
   transposed in registers. Returns how many k were packed (a multiple of 8); the caller
   finishes the tail. */
static int64_t mgpu__pack_rows_avx2(float *dst, int w, int64_t kc, const float *src, int64_t rs) {
    int64_t k, kend = kc & ~(int64_t)7;
    int r0, i;
    __m256 v[8];
    for (r0 = 0; r0 < w; r0 += 8) {
        int nrows = w - r0 < 8 ? w - r0 : 8;
        for (k = 0; k < kend; k += 8) {
            for (i = 0; i < 8; i++) v[i] = _mm256_loadu_ps(src + (r0 + (i < nrows ? i : nrows - 1)) * rs + k);
            mgpu__transpose8(v);
            if (nrows == 8) {
                for (i = 0; i < 8; i++) _mm256_storeu_ps(dst + (k + i) * w + r0, v[i]);
            } else {   /* w == 6: the low 6 lanes */
                for (i = 0; i < 8; i++) {
                    float *d = dst + (k + i) * w + r0;
                    _mm_storeu_ps(d, _mm256_castps256_ps128(v[i]));
                    _mm_storel_pi((__m64 *)(void *)(d + 4), _mm256_extractf128_ps(v[i], 1));
                }
            }
        }
    }
    return kend;
}
#endif

/* Pack rows [0, rows) x k [0, kc) into dst (kc, w), zero-padding rows up to w. */
static void mgpu__pack_run(float *dst, int w, int rows, int64_t kc, const float *src, int64_t rs, int64_t ks) {
    int64_t k, k0 = 0;
    int r;
#if defined(MGPU__GEMM_AVX2)
    if (ks == 1 && rows == w && rs != 1) k0 = mgpu__pack_rows_avx2(dst, w, kc, src, rs);
#endif
    if (rs == 1 && rows == w) {   /* rows contiguous, full panel: one fixed-size copy per k */
        for (k = 0; k < kc; k++) memcpy(dst + k * w, src + k * ks, sizeof(float) * (size_t)w);
        return;
    }
    if (rs == 1) {
        for (k = 0; k < kc; k++) {
            const float *s = src + k * ks;
            float *d = dst + k * w;
            for (r = 0; r < rows; r++) d[r] = s[r];
            for (; r < w; r++) d[r] = 0.0f;
        }
        return;
    }
    for (r = 0; r < rows; r++) {   /* k contiguous (ks == 1) or general: walk each row */
        const float *s = src + r * rs;
        for (k = k0; k < kc; k++) dst[k * w + r] = s[k * ks];
    }
    for (; r < w; r++)
        for (k = k0; k < kc; k++) dst[k * w + r] = 0.0f;
}

/* Pack rows [r0, r0 + rows) x k [k0, k0 + kc) of op into panels of w rows: panel q at dst + q * kc * w. */
static void mgpu__pack(float *dst, int w, const mgpu__gemm_operand *op, const float *base, int64_t r0, int64_t rows, int64_t k0, int64_t kc) {
    int64_t q;
    for (q = 0; q * w < rows; q++)
        mgpu__pack_run(dst + q * kc * w, w, (int)MGPU__MIN((int64_t)w, rows - q * w), kc,
                       base + (r0 + q * w) * op->rs + k0 * op->ks, op->rs, op->ks);
}

/* Per-thread scratch buffers (GEMM packing, conv2d columns), grown on demand and kept, so a
   steady-state training step allocates nothing here. A pthread key frees a thread's buffers when
   it exits (pool workers die with their context). */
enum { MGPU__SCRATCH_PACK = 0, MGPU__SCRATCH_COLS = 1, MGPU__SCRATCH_DCOLS = 2, MGPU__SCRATCH_SLOTS = 3 };
typedef struct mgpu__scratch_set { float *buf[MGPU__SCRATCH_SLOTS]; size_t cap[MGPU__SCRATCH_SLOTS]; } mgpu__scratch_set;
static pthread_key_t mgpu__scratch_key;
static pthread_once_t mgpu__scratch_key_once = PTHREAD_ONCE_INIT;
static int mgpu__scratch_key_ok = 0;
static void mgpu__scratch_set_free(void *p) {
    mgpu__scratch_set *set = (mgpu__scratch_set *)p;
    int i;
    for (i = 0; i < MGPU__SCRATCH_SLOTS; i++) mgpu_free(set->buf[i]);
    mgpu_free(set);
}
static void mgpu__scratch_key_init(void) { mgpu__scratch_key_ok = pthread_key_create(&mgpu__scratch_key, mgpu__scratch_set_free) == 0; }

/* This thread's buffer for `slot` with room for `floats` (64-byte aligned), or NULL when out of memory. */
static float *mgpu__scratch(int slot, size_t floats) {
    mgpu__scratch_set *set;
    pthread_once(&mgpu__scratch_key_once, mgpu__scratch_key_init);
    if (!mgpu__scratch_key_ok) return NULL;
    set = (mgpu__scratch_set *)pthread_getspecific(mgpu__scratch_key);
    if (!set) {
        set = (mgpu__scratch_set *)mgpu_malloc(sizeof *set);
        if (!set) return NULL;
        memset(set, 0, sizeof *set);
        if (pthread_setspecific(mgpu__scratch_key, set) != 0) { mgpu_free(set); return NULL; }
    }
    if (set->cap[slot] < floats) {
        size_t want = floats + floats / 4;   /* headroom: slowly growing shapes do not reallocate every call */
        mgpu_free(set->buf[slot]);
        set->cap[slot] = 0;
        set->buf[slot] = (float *)mgpu_malloc(want * sizeof(float));
        if (!set->buf[slot]) return NULL;
        set->cap[slot] = want;
    }
    return set->buf[slot];
}

typedef struct mgpu__gemm_job {
    mgpu__gemm_operand a, b;
    float *c; int64_t ldc, c_batch_stride;
    int64_t m, n, k;
    float alpha, beta;
    int64_t gm, gn, mt, nt;   /* C is cut into gm x gn tiles of mt rows and nt columns per batch item */
    int64_t kc;               /* K block (mgpu__gemm_kc) */
} mgpu__gemm_job;

/* Where a tile packs its panels: this thread's scratch, with room for all nb columns of B and MC
   rows of A per K block, or (out of memory) two micro-panels on the stack. The micro-kernel sees
   the same packed values either way, so the fallback only costs speed, never bits. */
typedef struct mgpu__gemm_panels { float *bp, *ap; int64_t nb, mb; } mgpu__gemm_panels;

/* One tile of C: the full K loop, packing B once per KC x nb block and A once per mb x KC block. */
static void mgpu__gemm_tile_in(const mgpu__gemm_job *j, int64_t task, const mgpu__gemm_panels *pn) {
    int64_t per_batch = j->gm * j->gn, bi = task / per_batch, t = task % per_batch;
    int64_t m0 = (t / j->gn) * j->mt, n0 = (t % j->gn) * j->nt;
    int64_t m1 = MGPU__MIN(j->m, m0 + j->mt), n1 = MGPU__MIN(j->n, n0 + j->nt);
    int64_t pc, jc, ic, jp, ip;
    const float *abase = j->a.p + bi * j->a.batch_stride, *bbase = j->b.p + bi * j->b.batch_stride;
    float *cbase = j->c + bi * j->c_batch_stride;
    for (pc = 0; pc < j->k; pc += j->kc) {
        int64_t kc = MGPU__MIN(j->kc, j->k - pc);
        float beta = pc == 0 ? j->beta : 1.0f;   /* later K blocks accumulate */
        for (jc = n0; jc < n1; jc += pn->nb) {
            int64_t nw = MGPU__MIN(pn->nb, n1 - jc);
            mgpu__pack(pn->bp, MGPU__NR, &j->b, bbase, jc, nw, pc, kc);
            for (ic = m0; ic < m1; ic += pn->mb) {
                int64_t mc = MGPU__MIN(pn->mb, m1 - ic);
                mgpu__pack(pn->ap, MGPU__MR, &j->a, abase, ic, mc, pc, kc);
                for (jp = 0; jp * MGPU__NR < nw; jp++) {
                    int nr = (int)MGPU__MIN((int64_t)MGPU__NR, nw - jp * MGPU__NR);
                    for (ip = 0; ip * MGPU__MR < mc; ip++) {
                        int mr = (int)MGPU__MIN((int64_t)MGPU__MR, mc - ip * MGPU__MR);
                        mgpu__gemm_kernel(kc, pn->ap + ip * kc * MGPU__MR, pn->bp + jp * kc * MGPU__NR,
                                          cbase + (ic + ip * MGPU__MR) * j->ldc + jc + jp * MGPU__NR, j->ldc, mr, nr, j->alpha, beta);
                    }
                }
            }
        }
    }
}

/* Out of memory for the scratch: micro-panels on the stack, in a frame of their own so the usual
   path stays small; 64-byte aligned by hand, as the micro-kernel's aligned loads need. */
static void mgpu__gemm_tile_on_stack(const mgpu__gemm_job *j, int64_t task) {
    float buf[(MGPU__NR + MGPU__MR) * MGPU__KC + 16];
    mgpu__gemm_panels pn;
    pn.bp = (float *)(((uintptr_t)buf + 63) & ~(uintptr_t)63);
    pn.ap = pn.bp + MGPU__NR * MGPU__KC;   /* NR * KC floats: a multiple of 64 bytes */
    pn.nb = MGPU__NR; pn.mb = MGPU__MR;
    mgpu__gemm_tile_in(j, task, &pn);
}

static void mgpu__gemm_tile(const mgpu__gemm_job *j, int64_t task) {
    size_t bfloats = (size_t)(j->nt * MGPU__KC);   /* nt is a multiple of NR */
    mgpu__gemm_panels pn;
    pn.bp = mgpu__scratch(MGPU__SCRATCH_PACK, bfloats + (size_t)MGPU__MC * MGPU__KC);
    if (!pn.bp) { mgpu__gemm_tile_on_stack(j, task); return; }
    pn.ap = pn.bp + bfloats; pn.nb = j->nt; pn.mb = MGPU__MC;
    mgpu__gemm_tile_in(j, task, &pn);
}

static void mgpu__gemm_tiles(void *arg, int64_t begin, int64_t end) {
    int64_t t;
    for (t = begin; t < end; t++) mgpu__gemm_tile((const mgpu__gemm_job *)arg, t);
}

static int64_t mgpu__round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

/* K block: K split into equal blocks of at most KC (rounded up to 8), so no block is thin. */
static int64_t mgpu__gemm_kc(int64_t k) {
    int64_t blocks = (k + MGPU__KC - 1) / MGPU__KC;
    return MGPU__MIN((int64_t)MGPU__KC, mgpu__round_up((k + blocks - 1) / blocks, 8));
}

/* Choose the tile grid: estimated time = waves of tasks x (multiply-adds of a tile + packing of
   its A and B panels, weighted as ~8 multiply-adds per packed float), per unit of K. */
static void mgpu__gemm_plan(mgpu__gemm_job *j, int64_t batch, int threads) {
    int64_t gm, gn, best = -1;
    int64_t gn_min = (j->n + MGPU__NC - 1) / MGPU__NC;
    int64_t gm_max = MGPU__MIN((j->m + MGPU__MR - 1) / MGPU__MR, (int64_t)4 * threads);
    int64_t gn_max = MGPU__MIN((j->n + MGPU__NR - 1) / MGPU__NR, gn_min + (int64_t)4 * threads);
    if (batch * j->m * j->n * j->k < MGPU__GEMM_SERIAL_MACS) threads = 1;
    if (threads == 1) gm_max = 1;
    j->gm = 1; j->gn = gn_min; j->mt = j->m; j->nt = mgpu__round_up((j->n + gn_min - 1) / gn_min, MGPU__NR);
    for (gm = 1; gm <= gm_max; gm++) {
        int64_t mt = mgpu__round_up((j->m + gm - 1) / gm, MGPU__MR), rgm = (j->m + mt - 1) / mt;
        for (gn = gn_min; gn <= gn_max; gn++) {
            int64_t nt = mgpu__round_up((j->n + gn - 1) / gn, MGPU__NR), rgn = (j->n + nt - 1) / nt;
            int64_t waves = (batch * rgm * rgn + threads - 1) / threads;
            int64_t cost = waves * (mt * nt + 8 * (mt + nt));
            if (best < 0 || cost < best) { best = cost; j->gm = rgm; j->gn = rgn; j->mt = mt; j->nt = nt; }
        }
    }
}

/* C := beta * C for the degenerate cases (K == 0 or alpha == 0); beta 0 clears NaN too. */
static void mgpu__gemm_scale_c(int64_t batch, int64_t m, int64_t n, float beta, float *c, int64_t ldc, int64_t c_batch_stride) {
    int64_t b, i, jj;
    for (b = 0; b < batch; b++)
        for (i = 0; i < m; i++) {
            float *r = c + b * c_batch_stride + i * ldc;
            if (beta == 0.0f) memset(r, 0, sizeof(float) * (size_t)n);
            else for (jj = 0; jj < n; jj++) r[jj] *= beta;
        }
}

#ifdef MGPU_USE_CBLAS
/* The same product through cblas_sgemm, one call per batch item; 0 if the sizes do not fit an int. */
static int mgpu__gemm_cblas(int64_t batch, int64_t m, int64_t n, int64_t k, float alpha, const mgpu__gemm_operand *a,
                            const mgpu__gemm_operand *b, float beta, float *c, int64_t ldc, int64_t c_batch_stride) {
    int64_t bi;
    if (m > INT_MAX || n > INT_MAX || k > INT_MAX || a->ld > INT_MAX || b->ld > INT_MAX || ldc > INT_MAX) return 0;
    for (bi = 0; bi < batch; bi++)
        cblas_sgemm(MGPU__CBLAS_ROW_MAJOR, a->trans ? MGPU__CBLAS_TRANS : MGPU__CBLAS_NO_TRANS,
                    b->trans ? MGPU__CBLAS_TRANS : MGPU__CBLAS_NO_TRANS, (int)m, (int)n, (int)k, alpha,
                    a->p + bi * a->batch_stride, (int)a->ld, b->p + bi * b->batch_stride, (int)b->ld, beta,
                    c + bi * c_batch_stride, (int)ldc);
    return 1;
}
#endif

/* Strided-batched GEMM behind every CPU product: for each batch item,
   C (M, N) = alpha * op(A) (M, K) @ op(B) (K, N) + beta * C. ctx NULL runs on the calling thread. */
static void mgpu__gemm_run(mgpu_context *ctx, int64_t batch, int64_t m, int64_t n, int64_t k, float alpha,
                           const mgpu__gemm_operand *a, const mgpu__gemm_operand *b, float beta,
                           float *c, int64_t ldc, int64_t c_batch_stride) {
    mgpu__gemm_job j;
    if (batch <= 0 || m <= 0 || n <= 0) return;
    if (k <= 0 || alpha == 0.0f) { mgpu__gemm_scale_c(batch, m, n, beta, c, ldc, c_batch_stride); return; }
#ifdef MGPU_USE_CBLAS
    if (mgpu__gemm_cblas(batch, m, n, k, alpha, a, b, beta, c, ldc, c_batch_stride)) return;
#endif
    memset(&j, 0, sizeof j);
    j.a = *a; j.b = *b; j.c = c; j.ldc = ldc; j.c_batch_stride = c_batch_stride;
    j.m = m; j.n = n; j.k = k; j.alpha = alpha; j.beta = beta;
    j.kc = mgpu__gemm_kc(k);
    mgpu__gemm_plan(&j, batch, ctx ? mgpu_context_num_threads(ctx) : 1);
    mgpu_parallel_for(ctx, batch * j.gm * j.gn, 1, mgpu__gemm_tiles, &j);
}

/* Bias epilogue, before the product: every row of C := beta * row + bias, so the product then
   accumulates onto it (beta 0 copies the bias, exactly as the product would add it). */
static void mgpu__gemm_add_bias(const mgpu__gemm_args *a, int64_t batch) {
    int64_t bi, i, jj;
    for (bi = 0; bi < batch; bi++)
        for (i = 0; i < a->m; i++) {
            float *r = a->c + bi * a->stride_c + i * a->ldc;
            if (a->beta == 0.0f) memcpy(r, a->bias, sizeof(float) * (size_t)a->n);
            else for (jj = 0; jj < a->n; jj++) r[jj] = a->beta * r[jj] + a->bias[jj];
        }
}

/* Activation epilogue, after the product: ReLU or GELU (tanh) on every row of C, as the unary ops. */
static void mgpu__gemm_activate(const mgpu__gemm_args *a, int64_t batch) {
    mgpu__unary_args u;
    int64_t bi, i;
    memset(&u, 0, sizeof u);
    u.kind = a->epilogue == MGPU__EPI_BIAS_RELU ? MGPU__UN_RELU : MGPU__UN_GELU_TANH;
    u.n = a->n;
    for (bi = 0; bi < batch; bi++)
        for (i = 0; i < a->m; i++) {
            u.out = a->c + bi * a->stride_c + i * a->ldc;
            u.x = u.out;
            mgpu__cpu_unary_forward(&u);
        }
}

/* The gemm twin on the CPU: f32 operands only (AMP on the CPU rounds its inputs, then runs in f32). */
static void mgpu__cpu_gemm(const mgpu__gemm_args *a) {
    int64_t batch = a->batch > 0 ? a->batch : 1;
    mgpu__gemm_operand oa = mgpu__gemm_a((const float *)a->a, a->trans_a != 0, a->lda);
    mgpu__gemm_operand ob = mgpu__gemm_b((const float *)a->b, a->trans_b != 0, a->ldb);
    float beta = a->beta;
    MGPU_ASSERT(a->ab_dtype == MGPU_F32);
    oa.batch_stride = a->stride_a; ob.batch_stride = a->stride_b;
    if (a->epilogue != MGPU__EPI_NONE) { mgpu__gemm_add_bias(a, batch); beta = 1.0f; }
    mgpu__gemm_run(a->ctx, batch, a->m, a->n, a->k, a->alpha, &oa, &ob, beta, a->c, a->ldc, a->stride_c);
    if (a->epilogue == MGPU__EPI_BIAS_RELU || a->epilogue == MGPU__EPI_BIAS_GELU) mgpu__gemm_activate(a, batch);
}

/* The gemm twin's arguments for one f32 product C = alpha * op(A) @ op(B) + beta * C on ctx's
   device (batch, strides and epilogue left at none). */
static mgpu__gemm_args mgpu__gemm_args_f32(mgpu_context *ctx, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                                           const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
    mgpu__gemm_args g;
    memset(&g, 0, sizeof g);
    g.ctx = ctx; g.blas = ctx ? ctx->cuda_blas : NULL;
    g.trans_a = trans_a; g.trans_b = trans_b; g.m = m; g.n = n; g.k = k;
    g.alpha = alpha; g.a = a; g.lda = lda; g.b = b; g.ldb = ldb; g.beta = beta; g.c = c; g.ldc = ldc;
    g.ab_dtype = MGPU_F32;
    return g;
}

/* The public GEMM takes host pointers by contract, so it calls the CPU twin directly. */
MGPU_API void mgpu_gemm_f32(mgpu_context *ctx, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                            float alpha, const float *a, int64_t lda, const float *b, int64_t ldb,
                            float beta, float *c, int64_t ldc) {
    int64_t a_cols = trans_a ? m : k, b_cols = trans_b ? k : n;
    mgpu__gemm_args g;
    if (m < 0 || n < 0 || k < 0) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_gemm_f32: m, n, k must be >= 0 (got %lld, %lld, %lld)", (long long)m, (long long)n, (long long)k);
        return;
    }
    if (m == 0 || n == 0) return;
    if (!c || (k > 0 && alpha != 0.0f && (!a || !b))) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_gemm_f32: %s is NULL", !c ? "c" : !a ? "a" : "b");
        return;
    }
    if (ldc < n || (k > 0 && (lda < MGPU__MAX(a_cols, 1) || ldb < MGPU__MAX(b_cols, 1)))) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_gemm_f32: leading dimensions too small: lda %lld (needs >= %lld), ldb %lld (needs >= %lld), ldc %lld (needs >= %lld)",
                   (long long)lda, (long long)a_cols, (long long)ldb, (long long)b_cols, (long long)ldc, (long long)n);
        return;
    }
    g = mgpu__gemm_args_f32(ctx, trans_a != 0, trans_b != 0, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    mgpu__cpu_gemm(&g);
}

/* Makes g a strided batch of `batch` products whose items lie sa, sb, sc elements apart. */
static void mgpu__gemm_set_batch(mgpu__gemm_args *g, int64_t batch, int64_t sa, int64_t sb, int64_t sc) {
    g->batch = batch; g->stride_a = sa; g->stride_b = sb; g->stride_c = sc;
}

/* Autocast (see "Mixed precision"): matmul, linear and conv2d round their inputs and output to the half
   format when ctx->autocast is set, running the f32 op in between. */

/* --------------------------------------------------------------------------------------
   matmul
   -------------------------------------------------------------------------------------- */

/* saved: iarg = {batch, M, K, N, half_compute} */
static mgpu_result mgpu__matmul_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu_tensor *a = node->in[0], *b = node->in[1];
    int64_t batch = node->iarg[0], m = node->iarg[1], k = node->iarg[2], n = node->iarg[3];
    const float *dc = (const float *)node->out->grad->data;   // (B, M, N)
    mgpu__gemm_args g;
    mgpu_result r = MGPU_OK;
    if (mgpu__needs_grad(node, 0)) {   // dA (B, M, K) += dC @ B^T
        float *da;
        MGPU__GRAD_OR_FAIL(da, ctx, a);
        g = mgpu__gemm_args_f32(ctx, 0, 1, m, k, n, 1.0f, dc, n, (const float *)b->data, n, 1.0f, da, k);
        g.half_compute = (mgpu_dtype)node->iarg[4];
        mgpu__gemm_set_batch(&g, batch, m * n, k * n, m * k);
        if ((r = MGPU__TWIN(ctx, gemm, &g)) != MGPU_OK) return r;
    }
    if (mgpu__needs_grad(node, 1)) {   // dB (B, K, N) += A^T @ dC
        float *db;
        MGPU__GRAD_OR_FAIL(db, ctx, b);
        g = mgpu__gemm_args_f32(ctx, 1, 0, k, n, m, 1.0f, (const float *)a->data, k, dc, n, 1.0f, db, n);
        g.half_compute = (mgpu_dtype)node->iarg[4];
        mgpu__gemm_set_batch(&g, batch, m * k, m * n, k * n);
        r = MGPU__TWIN(ctx, gemm, &g);
    }
    return r;
}

MGPU_API mgpu_tensor *mgpu_op_matmul(mgpu_context *ctx, mgpu_tensor *a, mgpu_tensor *b) {
    int64_t shape[3], batch, m, k, n;
    mgpu_tensor *out, *ins[2];
    mgpu__node *node = NULL;
    mgpu__gemm_args g;
    int nd;
    if (mgpu__autocast_active(ctx)) {
        int mode;
        ins[0] = a; ins[1] = b;
        if ((mode = mgpu__autocast_begin(ctx, ins, 2)) < 0) return NULL;
        return mgpu__autocast_end(ctx, mode, mgpu_op_matmul(ctx, ins[0], ins[1]));
    }
    if (!mgpu__check_input(ctx, "mgpu_op_matmul", "a", a, 1) || !mgpu__check_input(ctx, "mgpu_op_matmul", "b", b, 1)) return NULL;
    nd = a->ndim;
    if ((nd != 2 && nd != 3) || b->ndim != nd || a->shape[nd - 1] != b->shape[nd - 2] || (nd == 3 && a->shape[0] != b->shape[0]))
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "mgpu_op_matmul: cannot multiply a %s by b %s (need (M, K) @ (K, N) or (B, M, K) @ (B, K, N))",
                        mgpu__shape_str(a), mgpu__shape_str(b));
    batch = nd == 3 ? a->shape[0] : 1;
    m = a->shape[nd - 2]; k = a->shape[nd - 1]; n = b->shape[nd - 1];
    shape[0] = batch; shape[nd - 2] = m; shape[nd - 1] = n;
    out = mgpu__new_activation(ctx, MGPU_F32, nd, shape);   // (B, M, N)
    if (!out) return NULL;
    g = mgpu__gemm_args_f32(ctx, 0, 0, m, n, k, 1.0f, (const float *)a->data, k, (const float *)b->data, n, 0.0f, (float *)out->data, n);
    g.half_compute = mgpu__autocast_gemm_dtype(ctx);
    mgpu__gemm_set_batch(&g, batch, m * k, k * n, m * n);
    if (MGPU__TWIN(ctx, gemm, &g) != MGPU_OK) return NULL;
    ins[0] = a; ins[1] = b;
    MGPU__RECORD(ctx, "matmul", mgpu__matmul_backward, out, 2, ins, node);
    if (node) { node->iarg[0] = batch; node->iarg[1] = m; node->iarg[2] = k; node->iarg[3] = n; node->iarg[4] = g.half_compute; }
    return out;
}

/* --------------------------------------------------------------------------------------
   linear: y = x @ w^T + b
   -------------------------------------------------------------------------------------- */

/* The bias gradient twin: db (cols) += column sums of dy (rows, cols), each column summing its
   rows in order (deterministic, whatever the threads). */
static void mgpu__linear_bias_grad_range(void *arg, int64_t j0, int64_t j1) {
    const mgpu__linear_bias_grad_args *a = (const mgpu__linear_bias_grad_args *)arg;
    float acc[256];
    int64_t r, jb, j;
    for (jb = j0; jb < j1; jb += 256) {   /* a strip of columns at a time keeps the loop vectorised */
        int64_t w = MGPU__MIN((int64_t)256, j1 - jb);
        for (j = 0; j < w; j++) acc[j] = 0.0f;
        for (r = 0; r < a->rows; r++) {
            const float *row = a->dy + r * a->cols + jb;
            for (j = 0; j < w; j++) acc[j] += row[j];
        }
        for (j = 0; j < w; j++) a->db[jb + j] += acc[j];
    }
}
static void mgpu__cpu_linear_bias_grad(const mgpu__linear_bias_grad_args *a) {
    mgpu_parallel_for(a->ctx, a->cols, MGPU__MAX((int64_t)16, (int64_t)32768 / MGPU__MAX(a->rows, (int64_t)1)),
                      mgpu__linear_bias_grad_range, (void *)a);
}

/* iarg = {rows, in, out, half_compute} */
static mgpu_result mgpu__linear_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu_tensor *x = node->in[0], *w = node->in[1], *b = node->n_in > 2 ? node->in[2] : NULL;
    int64_t rows = node->iarg[0], in = node->iarg[1], outf = node->iarg[2];
    const float *dy = (const float *)node->out->grad->data;   // (rows, out)
    mgpu__gemm_args g;
    mgpu_result r;
    if (mgpu__needs_grad(node, 1)) {   // dW (out, in) += dY^T @ X
        float *dw;
        MGPU__GRAD_OR_FAIL(dw, ctx, w);
        g = mgpu__gemm_args_f32(ctx, 1, 0, outf, in, rows, 1.0f, dy, outf, (const float *)x->data, in, 1.0f, dw, in);
        g.half_compute = (mgpu_dtype)node->iarg[3];
        if ((r = MGPU__TWIN(ctx, gemm, &g)) != MGPU_OK) return r;
    }
    if (b && mgpu__needs_grad(node, 2)) {   // db (out) += column sums of dY
        mgpu__linear_bias_grad_args s;
        float *db;
        MGPU__GRAD_OR_FAIL(db, ctx, b);
        s.ctx = ctx; s.dy = dy; s.db = db; s.rows = rows; s.cols = outf;
        if ((r = MGPU__TWIN(ctx, linear_bias_grad, &s)) != MGPU_OK) return r;
    }
    if (mgpu__needs_grad(node, 0)) {   // dX (rows, in) += dY @ W; skipped for a first layer
        float *dx;
        MGPU__GRAD_OR_FAIL(dx, ctx, x);
        g = mgpu__gemm_args_f32(ctx, 0, 0, rows, in, outf, 1.0f, dy, outf, (const float *)w->data, in, 1.0f, dx, in);
        g.half_compute = (mgpu_dtype)node->iarg[3];
        if ((r = MGPU__TWIN(ctx, gemm, &g)) != MGPU_OK) return r;
    }
    return MGPU_OK;
}

MGPU_API mgpu_tensor *mgpu_op_linear(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b) {
    const char *op = "mgpu_op_linear";
    int64_t shape[MGPU_MAX_DIMS], rows, in, outf;
    int i;
    mgpu_tensor *y, *ins[3];
    mgpu__node *node = NULL;
    mgpu__gemm_args g;
    if (mgpu__autocast_active(ctx)) {   /* the bias is cast too, as under torch.autocast */
        int mode;
        ins[0] = x; ins[1] = w; ins[2] = b;
        if ((mode = mgpu__autocast_begin(ctx, ins, 3)) < 0) return NULL;
        return mgpu__autocast_end(ctx, mode, mgpu_op_linear(ctx, ins[0], ins[1], ins[2]));
    }
    if (!mgpu__check_input(ctx, op, "x", x, 1) || !mgpu__check_input(ctx, op, "w", w, 1)) return NULL;
    if (b && !mgpu__check_input(ctx, op, "b", b, 1)) return NULL;
    if (x->ndim < 1 || w->ndim != 2 || w->shape[1] != x->shape[x->ndim - 1])
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "mgpu_op_linear: x %s does not fit w %s (need x (..., in) and w (out, in))", mgpu__shape_str(x), mgpu__shape_str(w));
    in = w->shape[1]; outf = w->shape[0];
    if (b && (b->ndim != 1 || b->shape[0] != outf))
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "mgpu_op_linear: b %s does not fit w %s (need b (out))", mgpu__shape_str(b), mgpu__shape_str(w));
    rows = 1;
    for (i = 0; i < x->ndim - 1; i++) rows *= x->shape[i];
    memcpy(shape, x->shape, sizeof(int64_t) * (size_t)x->ndim);
    shape[x->ndim - 1] = outf;
    y = mgpu__new_activation(ctx, MGPU_F32, x->ndim, shape);   // (..., out)
    if (!y) return NULL;
    g = mgpu__gemm_args_f32(ctx, 0, 1, rows, outf, in, 1.0f, (const float *)x->data, in, (const float *)w->data, in, 0.0f,
                            (float *)y->data, outf);
    if (b) { g.epilogue = MGPU__EPI_BIAS; g.bias = (const float *)b->data; }
    g.half_compute = mgpu__autocast_gemm_dtype(ctx);
    if (MGPU__TWIN(ctx, gemm, &g) != MGPU_OK) return NULL;
    ins[0] = x; ins[1] = w; ins[2] = b;
    MGPU__RECORD(ctx, "linear", mgpu__linear_backward, y, b ? 3 : 2, ins, node);
    if (node) { node->iarg[0] = rows; node->iarg[1] = in; node->iarg[2] = outf; node->iarg[3] = g.half_compute; }
    return y;
}

/* --------------------------------------------------------------------------------------
   conv2d: im2col + GEMM, one image at a time so its column matrix is still in cache when the
   GEMM reads it (materialising a whole batch's columns makes the op memory-bound).
   From MGPU__CONV_PAR_BATCH images on, threads take whole images (im2col + a single-threaded
   GEMM each); the weight gradient is summed over fixed chunks of MGPU__CONV_CHUNK images into
   partial buffers, which are then added in chunk order, so results do not depend on the thread
   count. Smaller batches go image by image with threaded GEMMs.
   -------------------------------------------------------------------------------------- */

#define MGPU__CONV_PAR_BATCH 8
#define MGPU__CONV_CHUNK 4

/* One f32 product on the CPU, for the CPU twins built from GEMMs (conv2d, attention). */
static void mgpu__cpu_gemm_f32(mgpu_context *ctx, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                               const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
    mgpu__gemm_args g = mgpu__gemm_args_f32(ctx, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    mgpu__cpu_gemm(&g);
}

/* 1x1, stride 1, no padding: an image's column matrix is the image itself */
static int mgpu__conv_is_pointwise(const mgpu__conv_geom *g) { return g->ks == 1 && g->stride == 1 && g->pad == 0; }

/* Output positions [lo, hi) whose input index ox * stride - pad + kx lies inside [0, size). */
static void mgpu__conv_valid_range(int64_t out, int64_t size, int64_t stride, int64_t pad, int64_t kx, int64_t *lo, int64_t *hi) {
    int64_t a = pad - kx, b = size + pad - kx;   /* need a <= ox * stride < b */
    *lo = a <= 0 ? 0 : (a + stride - 1) / stride;
    *hi = b <= 0 ? 0 : MGPU__MIN(out, (b + stride - 1) / stride);
    if (*hi < *lo) *hi = *lo;
}

/* Gather (add == 0) one image (C, H, W) into its columns (C*KS*KS, OH*OW), or scatter-add
   (add == 1) columns back into the image (col2im): the same index walk both ways. */
static void mgpu__im2col_image(const mgpu__conv_geom *g, float *img, float *cols, int add) {
    int64_t c, ky, kx, oy, ox;
    for (c = 0; c < g->c; c++)
        for (ky = 0; ky < g->ks; ky++)
            for (kx = 0; kx < g->ks; kx++) {
                float *row = cols + ((c * g->ks + ky) * g->ks + kx) * g->p;
                int64_t x_lo, x_hi;
                mgpu__conv_valid_range(g->ow, g->w, g->stride, g->pad, kx, &x_lo, &x_hi);
                for (oy = 0; oy < g->oh; oy++) {
                    int64_t iy = oy * g->stride - g->pad + ky, at;
                    float *r = row + oy * g->ow;
                    if (iy < 0 || iy >= g->h) { if (!add) memset(r, 0, sizeof(float) * (size_t)g->ow); continue; }
                    at = (c * g->h + iy) * g->w - g->pad + kx;   /* input index of ox = 0, valid from x_lo on */
                    if (add && g->stride == 1) { for (ox = x_lo; ox < x_hi; ox++) img[at + ox] += r[ox]; continue; }
                    if (add) { for (ox = x_lo; ox < x_hi; ox++) img[at + ox * g->stride] += r[ox]; continue; }
                    for (ox = 0; ox < x_lo; ox++) r[ox] = 0.0f;
                    if (g->stride == 1) memcpy(r + x_lo, img + at + x_lo, sizeof(float) * (size_t)(x_hi - x_lo));
                    else for (ox = x_lo; ox < x_hi; ox++) r[ox] = img[at + ox * g->stride];
                    for (ox = x_hi; ox < g->ow; ox++) r[ox] = 0.0f;
                }
            }
}

/* One run of a conv2d CPU twin; the per-image steps below read what they need. */
typedef struct mgpu__conv_job {
    const mgpu__conv2d_args *a;
    mgpu_context *gemm_ctx;   /* threads for the GEMMs: the context, or NULL inside a per-image task */
    float *dw;                /* dw target (O, CKK): a chunk's partial sum or the grad itself, or NULL */
    int failed;               /* a thread found no memory for its column buffers */
} mgpu__conv_job;

/* Image i's column matrix: the image itself when pointwise, else im2col into this thread's scratch
   (NULL when out of memory). */
static const float *mgpu__conv_columns(const mgpu__conv_job *j, int64_t i) {
    const mgpu__conv_geom *g = j->a->g;
    float *img = (float *)(j->a->x + i * g->c * g->h * g->w), *cols;   /* the gather only reads the image */
    if (mgpu__conv_is_pointwise(g)) return img;
    cols = mgpu__scratch(MGPU__SCRATCH_COLS, (size_t)(g->ckk * g->p));
    if (cols) mgpu__im2col_image(g, img, cols, 0);
    return cols;
}

/* y_i (O, P) = W (O, CKK) @ cols_i (CKK, P) + b; 0 when out of memory */
static int mgpu__conv_forward_image(const mgpu__conv_job *j, int64_t i) {
    const mgpu__conv2d_args *a = j->a;
    const mgpu__conv_geom *g = a->g;
    float *y = a->y + i * g->o * g->p;
    const float *cols = mgpu__conv_columns(j, i);
    int64_t o, q;
    if (!cols) return 0;
    if (a->b)
        for (o = 0; o < g->o; o++)
            for (q = 0; q < g->p; q++) y[o * g->p + q] = a->b[o];
    mgpu__cpu_gemm_f32(j->gemm_ctx, 0, 0, g->o, g->p, g->ckk, 1.0f, a->w, g->ckk, cols, g->p, a->b ? 1.0f : 0.0f, y, g->p);
    return 1;
}

/* dW (O, CKK) = dw_beta * dW + dY_i (O, P) @ cols_i^T, then dX_i += col2im(W^T @ dY_i); 0 when out of memory */
static int mgpu__conv_backward_image(const mgpu__conv_job *j, int64_t i, float dw_beta) {
    const mgpu__conv2d_args *a = j->a;
    const mgpu__conv_geom *g = a->g;
    const float *dy = a->dy + i * g->o * g->p;
    if (j->dw) {
        const float *cols = mgpu__conv_columns(j, i);
        if (!cols) return 0;
        mgpu__cpu_gemm_f32(j->gemm_ctx, 0, 1, g->o, g->ckk, g->p, 1.0f, dy, g->p, cols, g->p, dw_beta, j->dw, g->ckk);
    }
    if (a->dx) {
        float *dxi = a->dx + i * g->c * g->h * g->w, *dcols = dxi;
        int pointwise = mgpu__conv_is_pointwise(g);
        if (!pointwise && !(dcols = mgpu__scratch(MGPU__SCRATCH_DCOLS, (size_t)(g->ckk * g->p)))) return 0;
        /* pointwise: dX_i is dcols, so accumulate straight into it */
        mgpu__cpu_gemm_f32(j->gemm_ctx, 1, 0, g->ckk, g->p, g->o, 1.0f, a->w, g->ckk, dy, g->p, pointwise ? 1.0f : 0.0f, dcols, g->p);
        if (!pointwise) mgpu__im2col_image(g, dxi, dcols, 1);
    }
    return 1;
}

static void mgpu__conv_forward_range(void *arg, int64_t i0, int64_t i1) {
    mgpu__conv_job *j = (mgpu__conv_job *)arg;
    int64_t i;
    for (i = i0; i < i1; i++)
        if (!mgpu__conv_forward_image(j, i)) __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
}

/* Chunk c: images [c * CHUNK, ...) into the chunk's own dW partial (j->dw + c * O * CKK). */
static void mgpu__conv_backward_range(void *arg, int64_t c0, int64_t c1) {
    mgpu__conv_job *j = (mgpu__conv_job *)arg;
    mgpu__conv_job jc = *j;
    const mgpu__conv_geom *g = j->a->g;
    int64_t c, i;
    for (c = c0; c < c1; c++) {
        jc.dw = j->dw ? j->dw + c * g->o * g->ckk : NULL;
        for (i = c * MGPU__CONV_CHUNK; i < MGPU__MIN(g->n, (c + 1) * MGPU__CONV_CHUNK); i++)
            if (!mgpu__conv_backward_image(&jc, i, i == c * MGPU__CONV_CHUNK ? 0.0f : 1.0f)) __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
    }
}

/* dw[e] += sum over chunks of part[c][e], chunks in order */
typedef struct { const float *part; float *dw; int64_t chunks, size; } mgpu__partsum_arg;
static void mgpu__partsum_range(void *arg, int64_t e0, int64_t e1) {
    mgpu__partsum_arg *s = (mgpu__partsum_arg *)arg;
    int64_t c, e;
    for (c = 0; c < s->chunks; c++)
        for (e = e0; e < e1; e++) s->dw[e] += s->part[c * s->size + e];
}

/* db[o] += sum of dY (N, O, P) over images and positions: strips of positions are summed across
   images as vectors, then the strip totals in order (deterministic, and it vectorises). */
static void mgpu__chansum_range(void *arg, int64_t o0, int64_t o1) {
    const mgpu__conv2d_args *a = (const mgpu__conv2d_args *)arg;
    const mgpu__conv_geom *g = a->g;
    float strip[256];
    int64_t o, i, q0, q;
    for (o = o0; o < o1; o++) {
        float total = 0.0f;
        for (q0 = 0; q0 < g->p; q0 += 256) {
            int64_t w = MGPU__MIN((int64_t)256, g->p - q0);
            for (q = 0; q < w; q++) strip[q] = 0.0f;
            for (i = 0; i < g->n; i++) {
                const float *r = a->dy + (i * g->o + o) * g->p + q0;
                for (q = 0; q < w; q++) strip[q] += r[q];
            }
            for (q = 0; q < w; q++) total += strip[q];
        }
        a->db[o] += total;
    }
}

static mgpu_result mgpu__conv_oom(const mgpu__conv_geom *g) {
    return mgpu__fail(MGPU_ERR_OOM_HOST, "mgpu_op_conv2d: out of host memory for the im2col buffers (%lld x %lld floats per image)",
                      (long long)g->ckk, (long long)g->p);
}

/* The conv2d twins on the CPU. Small batches go image by image with threaded GEMMs; larger ones
   give whole images to threads (see above). */
static void mgpu__cpu_conv2d_forward(const mgpu__conv2d_args *a) {
    mgpu__conv_job j;
    int64_t i;
    memset(&j, 0, sizeof j);
    j.a = a;
    if (a->g->n >= MGPU__CONV_PAR_BATCH) {
        mgpu_parallel_for(a->ctx, a->g->n, 1, mgpu__conv_forward_range, &j);
    } else {
        j.gemm_ctx = a->ctx;
        for (i = 0; i < a->g->n && !j.failed; i++) j.failed = !mgpu__conv_forward_image(&j, i);
    }
    if (j.failed) *a->status = mgpu__conv_oom(a->g);
}

/* dW through per-chunk partials added in chunk order; 0 when out of memory */
static mgpu_result mgpu__conv_backward_batch(mgpu__conv_job *j) {
    const mgpu__conv2d_args *a = j->a;
    const mgpu__conv_geom *g = a->g;
    int64_t chunks = (g->n + MGPU__CONV_CHUNK - 1) / MGPU__CONV_CHUNK;
    mgpu__partsum_arg ps;
    if (a->dw && !(j->dw = (float *)mgpu__arena_alloc(a->ctx, sizeof(float) * (size_t)(chunks * g->o * g->ckk)))) return MGPU_ERR_OOM_HOST;
    mgpu_parallel_for(a->ctx, chunks, 1, mgpu__conv_backward_range, j);
    if (j->failed) return mgpu__conv_oom(g);
    ps.part = j->dw; ps.dw = a->dw; ps.chunks = chunks; ps.size = g->o * g->ckk;
    if (a->dw) mgpu_parallel_for(a->ctx, ps.size, 4096, mgpu__partsum_range, &ps);
    return MGPU_OK;
}

static void mgpu__cpu_conv2d_backward(const mgpu__conv2d_args *a) {
    const mgpu__conv_geom *g = a->g;
    mgpu__conv_job j;
    int64_t i;
    memset(&j, 0, sizeof j);
    j.a = a;
    if (g->n >= MGPU__CONV_PAR_BATCH) {
        if ((*a->status = mgpu__conv_backward_batch(&j)) != MGPU_OK) return;
    } else {
        j.gemm_ctx = a->ctx; j.dw = a->dw;
        for (i = 0; i < g->n; i++)
            if (!mgpu__conv_backward_image(&j, i, 1.0f)) { *a->status = mgpu__conv_oom(g); return; }
    }
    if (a->db)   /* db (O) += sum over images and positions of dY */
        mgpu_parallel_for(a->ctx, g->o, MGPU__MAX((int64_t)1, (int64_t)32768 / MGPU__MAX(g->n * g->p, (int64_t)1)), mgpu__chansum_range,
                          (void *)a);
}

/* node: in = {x, w, b}, extra = geometry */
static mgpu_result mgpu__conv2d_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu_tensor *x = node->in[0], *w = node->in[1], *b = node->in[2];
    mgpu__conv2d_args a;
    mgpu_result r, status = MGPU_OK;
    memset(&a, 0, sizeof a);
    a.ctx = ctx; a.status = &status; a.blas = ctx->cuda_blas;
    a.g = (const mgpu__conv_geom *)node->extra;
    a.half_compute = (mgpu_dtype)node->iarg[0];
    a.x = (const float *)x->data; a.w = (const float *)w->data; a.dy = (const float *)node->out->grad->data;
    if (mgpu__needs_grad(node, 0)) MGPU__GRAD_OR_FAIL(a.dx, ctx, x);
    if (mgpu__needs_grad(node, 1)) MGPU__GRAD_OR_FAIL(a.dw, ctx, w);
    if (b && mgpu__needs_grad(node, 2)) MGPU__GRAD_OR_FAIL(a.db, ctx, b);
    r = MGPU__TWIN(ctx, conv2d_backward, &a);
    return r != MGPU_OK ? r : status;
}

/* Validates conv2d's arguments and fills the geometry; 1 if fine. */
static int mgpu__conv_setup(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b, int stride, int padding, mgpu__conv_geom *g) {
    const char *op = "mgpu_op_conv2d";
    if (!mgpu__check_input(ctx, op, "x", x, 1) || !mgpu__check_input(ctx, op, "w", w, 1)) return 0;
    if (b && !mgpu__check_input(ctx, op, "b", b, 1)) return 0;
    if (x->ndim != 4 || w->ndim != 4 || w->shape[1] != x->shape[1]) {
        mgpu__fail(MGPU_ERR_SHAPE, "mgpu_op_conv2d: x %s and w %s do not fit (need x (N, C, H, W) and w (O, C, KH, KW) with the same C)",
                   mgpu__shape_str(x), mgpu__shape_str(w));
        return 0;
    }
    if (w->shape[2] != w->shape[3] || w->shape[2] < 1) {
        mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_op_conv2d: w %s: only square kernels (KH == KW >= 1) are supported", mgpu__shape_str(w));
        return 0;
    }
    if (b && (b->ndim != 1 || b->shape[0] != w->shape[0])) {
        mgpu__fail(MGPU_ERR_SHAPE, "mgpu_op_conv2d: b %s does not fit w %s (need b (O))", mgpu__shape_str(b), mgpu__shape_str(w));
        return 0;
    }
    if (stride < 1 || padding < 0) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_op_conv2d: stride %d must be >= 1 and padding %d >= 0", stride, padding);
        return 0;
    }
    memset(g, 0, sizeof *g);
    g->n = x->shape[0]; g->c = x->shape[1]; g->h = x->shape[2]; g->w = x->shape[3];
    g->o = w->shape[0]; g->ks = w->shape[2]; g->stride = stride; g->pad = padding;
    if (g->h + 2 * g->pad < g->ks || g->w + 2 * g->pad < g->ks) {
        mgpu__fail(MGPU_ERR_SHAPE, "mgpu_op_conv2d: x %s with padding %d is smaller than the kernel of w %s", mgpu__shape_str(x), padding, mgpu__shape_str(w));
        return 0;
    }
    g->oh = (g->h + 2 * g->pad - g->ks) / g->stride + 1;
    g->ow = (g->w + 2 * g->pad - g->ks) / g->stride + 1;
    g->p = g->oh * g->ow; g->ckk = g->c * g->ks * g->ks;
    return 1;
}

MGPU_API mgpu_tensor *mgpu_op_conv2d(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b, int stride, int padding) {
    mgpu__conv_geom g, *gsaved;
    mgpu__conv2d_args a;
    mgpu_result status = MGPU_OK;
    int64_t shape[4];
    mgpu_tensor *y, *ins[3];
    mgpu__node *node = NULL;
    if (mgpu__autocast_active(ctx)) {
        int mode;
        ins[0] = x; ins[1] = w; ins[2] = b;
        if ((mode = mgpu__autocast_begin(ctx, ins, 3)) < 0) return NULL;
        return mgpu__autocast_end(ctx, mode, mgpu_op_conv2d(ctx, ins[0], ins[1], ins[2], stride, padding));
    }
    if (!mgpu__conv_setup(ctx, x, w, b, stride, padding, &g)) return NULL;
    shape[0] = g.n; shape[1] = g.o; shape[2] = g.oh; shape[3] = g.ow;
    y = mgpu__new_activation(ctx, MGPU_F32, 4, shape);   // (N, O, OH, OW)
    if (!y) return NULL;
    memset(&a, 0, sizeof a);
    a.ctx = ctx; a.status = &status; a.blas = ctx->cuda_blas; a.g = &g;
    a.x = (const float *)x->data; a.w = (const float *)w->data; a.b = b ? (const float *)b->data : NULL; a.y = (float *)y->data;
    a.half_compute = mgpu__autocast_gemm_dtype(ctx);
    if (MGPU__TWIN(ctx, conv2d_forward, &a) != MGPU_OK || status != MGPU_OK) return NULL;
    ins[0] = x; ins[1] = w; ins[2] = b;
    MGPU__RECORD(ctx, "conv2d", mgpu__conv2d_backward, y, 3, ins, node);
    if (node) {
        if (!(gsaved = (mgpu__conv_geom *)mgpu__arena_alloc(ctx, sizeof *gsaved))) return NULL;
        *gsaved = g;
        node->extra = gsaved;
        node->iarg[0] = a.half_compute;
    }
    return y;
}

/* --------------------------------------------------------------------------------------
   Pooling over (N, C, H, W) planes, PyTorch's output size floor((H + 2p - k) / s) + 1
   -------------------------------------------------------------------------------------- */

/* Validates kernel/stride/padding for a pooling op and fills the geometry (stride 0 -> kernel;
   o, p and ckk stay 0: they are conv2d's). */
static int mgpu__pool_setup(mgpu_context *ctx, const char *op, mgpu_tensor *x, int kernel, int stride, int padding, mgpu__conv_geom *g) {
    if (!mgpu__check_input(ctx, op, "x", x, 1)) return 0;
    if (x->ndim != 4) { mgpu__fail(MGPU_ERR_SHAPE, "%s: x must be (N, C, H, W), got %s", op, mgpu__shape_str(x)); return 0; }
    if (kernel < 1 || stride < 0 || padding < 0) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: kernel %d must be >= 1, stride %d and padding %d >= 0", op, kernel, stride, padding);
        return 0;
    }
    if (padding > kernel / 2) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: padding %d must be at most half the kernel size %d", op, padding, kernel);
        return 0;
    }
    memset(g, 0, sizeof *g);
    g->n = x->shape[0]; g->c = x->shape[1]; g->h = x->shape[2]; g->w = x->shape[3];
    g->ks = kernel; g->stride = stride ? stride : kernel; g->pad = padding;
    if (g->h + 2 * g->pad < g->ks || g->w + 2 * g->pad < g->ks) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: x %s with padding %d is smaller than the kernel %d", op, mgpu__shape_str(x), padding, kernel);
        return 0;
    }
    g->oh = (g->h + 2 * g->pad - g->ks) / g->stride + 1;
    g->ow = (g->w + 2 * g->pad - g->ks) / g->stride + 1;
    return 1;
}

/* Window of output (oy, ox) clipped to the image: rows [y0, y1), columns [x0, x1). */
static void mgpu__pool_window(const mgpu__conv_geom *g, int64_t oy, int64_t ox, int64_t *y0, int64_t *y1, int64_t *x0, int64_t *x1) {
    int64_t ys = oy * g->stride - g->pad, xs = ox * g->stride - g->pad;
    *y0 = MGPU__MAX(ys, (int64_t)0); *y1 = MGPU__MIN(ys + g->ks, g->h);
    *x0 = MGPU__MAX(xs, (int64_t)0); *x1 = MGPU__MIN(xs + g->ks, g->w);
}

static void mgpu__pool_forward_range(void *arg, int64_t p0, int64_t p1) {
    const mgpu__pool2d_args *s = (const mgpu__pool2d_args *)arg;
    const mgpu__conv_geom *g = s->g;
    float inv = 1.0f / (float)(g->ks * g->ks);   /* count_include_pad: the window is always k * k */
    int64_t pl, oy, ox, yy, xx, y0, y1, x0, x1;
    for (pl = p0; pl < p1; pl++) {
        const float *xp = s->x + pl * g->h * g->w;
        float *yp = s->y + pl * g->oh * g->ow;
        int32_t *ip = s->argmax ? s->argmax + pl * g->oh * g->ow : NULL;
        for (oy = 0; oy < g->oh; oy++)
            for (ox = 0; ox < g->ow; ox++) {
                float acc = s->is_max ? -INFINITY : 0.0f;
                int64_t best;
                mgpu__pool_window(g, oy, ox, &y0, &y1, &x0, &x1);
                /* a window wholly in the padding (only possible with padding >= kernel, which the op
                   refuses) has no input: -inf, argmax -1 and no gradient */
                best = y0 < y1 && x0 < x1 ? y0 * g->w + x0 : -1;
                for (yy = y0; yy < y1; yy++)
                    for (xx = x0; xx < x1; xx++) {
                        float v = xp[yy * g->w + xx];
                        if (!s->is_max) acc += v;
                        else if (v > acc || v != v) { acc = v; best = yy * g->w + xx; }   /* the last NaN wins, as in PyTorch */
                    }
                yp[oy * g->ow + ox] = s->is_max ? acc : acc * inv;
                if (ip) ip[oy * g->ow + ox] = (int32_t)best;
            }
    }
}

static void mgpu__pool_backward_range(void *arg, int64_t p0, int64_t p1) {
    const mgpu__pool2d_args *s = (const mgpu__pool2d_args *)arg;
    const mgpu__conv_geom *g = s->g;
    float inv = 1.0f / (float)(g->ks * g->ks);
    int64_t pl, q, oy, ox, yy, xx, y0, y1, x0, x1;
    for (pl = p0; pl < p1; pl++) {
        const float *dyp = s->dy + pl * g->oh * g->ow;
        float *dxp = s->dx + pl * g->h * g->w;
        if (s->is_max) {
            const int32_t *ip = s->argmax + pl * g->oh * g->ow;
            for (q = 0; q < g->oh * g->ow; q++) if (ip[q] >= 0) dxp[ip[q]] += dyp[q];
            continue;
        }
        for (oy = 0; oy < g->oh; oy++)
            for (ox = 0; ox < g->ow; ox++) {
                float d = dyp[oy * g->ow + ox] * inv;
                mgpu__pool_window(g, oy, ox, &y0, &y1, &x0, &x1);
                for (yy = y0; yy < y1; yy++)
                    for (xx = x0; xx < x1; xx++) dxp[yy * g->w + xx] += d;
            }
    }
}

/* The pooling twins on the CPU: planes (one (H, W) image of one channel) split across threads. */
static int64_t mgpu__pool_min_chunk(const mgpu__conv_geom *g) {
    return MGPU__MAX((int64_t)1, (int64_t)32768 / MGPU__MAX(g->h * g->w, (int64_t)1));
}
static void mgpu__cpu_pool2d_forward(const mgpu__pool2d_args *a) {
    mgpu_parallel_for(a->ctx, a->g->n * a->g->c, mgpu__pool_min_chunk(a->g), mgpu__pool_forward_range, (void *)a);
}
static void mgpu__cpu_pool2d_backward(const mgpu__pool2d_args *a) {
    mgpu_parallel_for(a->ctx, a->g->n * a->g->c, mgpu__pool_min_chunk(a->g), mgpu__pool_backward_range, (void *)a);
}

/* node: extra = geometry; saved[0] = argmax per output (I32 index into the plane), max pooling only */
static mgpu_result mgpu__pool_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__pool2d_args a;
    memset(&a, 0, sizeof a);
    MGPU__GRAD_OR_FAIL(a.dx, ctx, node->in[0]);
    a.ctx = ctx;
    a.g = (const mgpu__conv_geom *)node->extra;
    a.dy = (const float *)node->out->grad->data;
    a.is_max = node->saved[0] != NULL;
    a.argmax = a.is_max ? (int32_t *)node->saved[0]->data : NULL;
    return MGPU__TWIN(ctx, pool2d_backward, &a);
}

static mgpu_tensor *mgpu__pool2d(mgpu_context *ctx, const char *op, mgpu_tensor *x, int kernel, int stride, int padding, int is_max) {
    mgpu__conv_geom g, *gs;
    mgpu__pool2d_args a;
    mgpu_tensor *y, *idx = NULL;
    mgpu__node *node = NULL;
    int64_t shape[4];
    if (!mgpu__pool_setup(ctx, op, x, kernel, stride, padding, &g)) return NULL;
    shape[0] = x->shape[0]; shape[1] = x->shape[1]; shape[2] = g.oh; shape[3] = g.ow;
    y = mgpu__new_activation(ctx, MGPU_F32, 4, shape);   // (N, C, OH, OW)
    if (!y) return NULL;
    MGPU__RECORD(ctx, is_max ? "max_pool2d" : "avg_pool2d", mgpu__pool_backward, y, 1, &x, node);
    if (node && is_max && !(idx = mgpu__new_activation(ctx, MGPU_I32, 4, shape))) return NULL;
    memset(&a, 0, sizeof a);
    a.ctx = ctx; a.g = &g; a.is_max = is_max;
    a.x = (const float *)x->data; a.y = (float *)y->data; a.argmax = idx ? (int32_t *)idx->data : NULL;
    if (MGPU__TWIN(ctx, pool2d_forward, &a) != MGPU_OK) return NULL;
    if (node) {
        if (!(gs = (mgpu__conv_geom *)mgpu__arena_alloc(ctx, sizeof *gs))) return NULL;
        *gs = g;
        node->extra = gs;
        node->saved[0] = idx;
    }
    return y;
}

MGPU_API mgpu_tensor *mgpu_op_max_pool2d(mgpu_context *ctx, mgpu_tensor *x, int kernel, int stride, int padding) {
    return mgpu__pool2d(ctx, "mgpu_op_max_pool2d", x, kernel, stride, padding, 1);
}
MGPU_API mgpu_tensor *mgpu_op_avg_pool2d(mgpu_context *ctx, mgpu_tensor *x, int kernel, int stride, int padding) {
    return mgpu__pool2d(ctx, "mgpu_op_avg_pool2d", x, kernel, stride, padding, 0);
}
/* ======================================================================================
   Ops: norms, embedding, attention
   ====================================================================================== */

/* Layer norm, batch norm, embedding and scaled dot-product attention: CPU forward + backward.
   Every reduction runs in a fixed order over a fixed partition, so results are bit-identical
   whatever the thread count. */

/* Loops touching at least this many elements are split across the thread pool. */
#define MGPU__NORM_GRAIN 32768

/* Items per chunk so that one chunk touches about MGPU__NORM_GRAIN elements. */
static int64_t mgpu__norm_min_chunk(int64_t elems_per_item) {
    return elems_per_item >= MGPU__NORM_GRAIN ? 1 : MGPU__NORM_GRAIN / (elems_per_item > 0 ? elems_per_item : 1);
}

/* An optional per-channel vector (weight, bias, running stats): NULL is fine, else F32 (C). */
static int mgpu__norm_check_vec(mgpu_context *ctx, const char *op, const char *arg, const mgpu_tensor *t,
                                int64_t c, const mgpu_tensor *x) {
    if (!t) return 1;
    if (!mgpu__check_input(ctx, op, arg, t, 1)) return 0;
    if (t->ndim != 1 || t->shape[0] != c) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: %s has shape %s, expected (%lld,) to match x %s", op, arg, mgpu__shape_str(t),
                   (long long)c, mgpu__shape_str(x));
        return 0;
    }
    return 1;
}

/* A finite non-negative float argument (NaN fails the comparison too). */
static int mgpu__norm_check_nonneg(const char *op, const char *arg, float v) {
    if (!(v >= 0.0f) || v > FLT_MAX) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: %s is %g, must be finite and >= 0", op, arg, (double)v);
        return 0;
    }
    return 1;
}

/* Arena scratch for n floats / doubles (n may be 0) on the context's device. */
static float *mgpu__norm_floats(mgpu_context *ctx, int64_t n) {
    return (float *)mgpu__arena_alloc_data(ctx, sizeof(float) * (size_t)(n > 0 ? n : 1));
}
static double *mgpu__norm_doubles(mgpu_context *ctx, int64_t n) {
    return (double *)mgpu__arena_alloc_data(ctx, sizeof(double) * (size_t)(n > 0 ? n : 1));
}

/* Adds element i of p*w and of p*w * (q - center) (w NULL: 1) into lane l of a1, a2. */
static inline void mgpu__norm_lane_add(double *a1, double *a2, int64_t l, const float *p, const float *w,
                                       const float *q, float center, int64_t i) {
    double pv = w ? p[i] * w[i] : p[i];
    a1[l] += pv;
    a2[l] += pv * (double)(q[i] - center);
}

/* s1 = sum of p*w, s2 = sum of p*w * (q - center) over n elements. Eight double lanes keep
   the adds pipelined; the order is fixed, so the result never depends on threads. */
#define MGPU__NORM_LANES 8
static void mgpu__norm_moments(const float *p, const float *w, const float *q, float center, int64_t n,
                               double *s1, double *s2) {
    double a1[MGPU__NORM_LANES], a2[MGPU__NORM_LANES];
    int64_t i, l;
    for (l = 0; l < MGPU__NORM_LANES; l++) { a1[l] = 0; a2[l] = 0; }
    for (i = 0; i + MGPU__NORM_LANES <= n; i += MGPU__NORM_LANES)
        for (l = 0; l < MGPU__NORM_LANES; l++) mgpu__norm_lane_add(a1, a2, l, p, w, q, center, i + l);
    for (l = 0; i + l < n; l++) mgpu__norm_lane_add(a1, a2, l, p, w, q, center, i + l);
    for (l = 1; l < MGPU__NORM_LANES; l++) { a1[0] += a1[l]; a2[0] += a2[l]; }
    *s1 = a1[0];
    *s2 = a2[0];
}

/* Adds double sums into an F32 gradient. */
static void mgpu__norm_add_sums(float *grad, const double *sums, int64_t n) {
    int64_t i;
    for (i = 0; i < n; i++) grad[i] += (float)sums[i];
}

/* ======================================================================================
   Layer norm over the last dim: y = (x - mean) * rstd * w + b with the biased variance and
   eps inside the sqrt, as PyTorch. x is viewed as R rows of C.
   ====================================================================================== */

/* One pass for the row's statistics (double sums), one for the output. */
static void mgpu__ln_forward_rows(void *arg, int64_t r0, int64_t r1) {
    const mgpu__layer_norm_args *a = (const mgpu__layer_norm_args *)arg;
    int64_t r, c, C = a->C;
    for (r = r0; r < r1; r++) {
        const float *xr = a->x + r * C;
        float *yr = a->y + r * C;
        double sum, sumsq, mean, var;
        float m, rs;
        mgpu__norm_moments(xr, NULL, xr, 0.0f, C, &sum, &sumsq);
        mean = sum / (double)C;
        var = sumsq / (double)C - mean * mean;
        m = (float)mean;
        rs = (float)(1.0 / sqrt((var > 0 ? var : 0) + (double)a->eps));
        a->mean[r] = m;
        a->rstd[r] = rs;
        for (c = 0; c < C; c++) {
            float v = (xr[c] - m) * rs;
            if (a->w) v *= a->w[c];
            if (a->b) v += a->b[c];
            yr[c] = v;
        }
    }
}

static void mgpu__cpu_layer_norm_forward(const mgpu__layer_norm_args *a) {
    mgpu_parallel_for(a->ctx, a->R, mgpu__norm_min_chunk(a->C), mgpu__ln_forward_rows, (void *)a);
}

/* The backward's blocks of rows and their partial dw, db: (blocks, 2, C) doubles, or NULL. */
typedef struct mgpu__ln_job { const mgpu__layer_norm_args *a; double *partial; } mgpu__ln_job;

/* Backward of one row: dx += rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w
   (when dx is wanted), and the row's dy * xhat and dy added into the partial sums pw, pb
   (when given). */
static void mgpu__ln_backward_row(const mgpu__layer_norm_args *a, int64_t r, double *pw, double *pb) {
    int64_t c, C = a->C;
    const float *xr = a->x + r * C, *dyr = a->dy + r * C;
    float m = a->mean[r], rs = a->rstd[r], g_mean = 0, gx_mean = 0;
    if (a->dx) {
        double sum_g, sum_gxm;   /* sum g, sum g * (x - mean) */
        mgpu__norm_moments(dyr, a->w, xr, m, C, &sum_g, &sum_gxm);
        g_mean = (float)(sum_g / (double)C);
        gx_mean = (float)(sum_gxm * rs / (double)C);
        for (c = 0; c < C; c++) {
            float g = a->w ? dyr[c] * a->w[c] : dyr[c];
            a->dx[r * C + c] += rs * (g - g_mean - (xr[c] - m) * rs * gx_mean);
        }
    }
    if (pw)
        for (c = 0; c < C; c++) {
            pw[c] += (double)dyr[c] * ((xr[c] - m) * rs);
            pb[c] += dyr[c];
        }
}

/* Rows are cut into blocks that depend on R and C only, never on the thread count; block k
   keeps its own partial dw, db (2C doubles), added up in block order afterwards, so the
   parameter gradients are the same whatever the threads. */
static int64_t mgpu__ln_block_rows(int64_t C) { return MGPU__MAX((int64_t)1, 4 * MGPU__NORM_GRAIN / C); }

static void mgpu__ln_backward_blocks(void *arg, int64_t k0, int64_t k1) {
    const mgpu__ln_job *j = (const mgpu__ln_job *)arg;
    const mgpu__layer_norm_args *a = j->a;
    int64_t k, r, c, rows = mgpu__ln_block_rows(a->C);
    for (k = k0; k < k1; k++) {
        double *pw = j->partial ? j->partial + 2 * k * a->C : NULL, *pb = pw ? pw + a->C : NULL;
        if (pw) for (c = 0; c < 2 * a->C; c++) pw[c] = 0;
        for (r = k * rows; r < MGPU__MIN(a->R, (k + 1) * rows); r++) mgpu__ln_backward_row(a, r, pw, pb);
    }
}

/* grad[c] += sum over blocks of partial[k * 2C + offset + c], in block order. */
static void mgpu__ln_add_partials(float *grad, const double *partial, int64_t blocks, int64_t C, int64_t offset) {
    int64_t k, c;
    for (c = 0; c < C; c++) {
        double s = 0;
        for (k = 0; k < blocks; k++) s += partial[2 * k * C + offset + c];
        grad[c] += (float)s;
    }
}

static void mgpu__cpu_layer_norm_backward(const mgpu__layer_norm_args *a) {
    int64_t blocks = (a->R + mgpu__ln_block_rows(a->C) - 1) / mgpu__ln_block_rows(a->C);
    mgpu__ln_job j;
    j.a = a; j.partial = NULL;
    if ((a->dw || a->db) && !(j.partial = mgpu__norm_doubles(a->ctx, 2 * blocks * a->C))) { *a->status = MGPU_ERR_OOM_HOST; return; }
    mgpu_parallel_for(a->ctx, blocks, 1, mgpu__ln_backward_blocks, &j);
    if (a->dw) mgpu__ln_add_partials(a->dw, j.partial, blocks, a->C, 0);
    if (a->db) mgpu__ln_add_partials(a->db, j.partial, blocks, a->C, a->C);
}

/* node: in = {x, w, b}; extra = mean (R) then rstd (R); iarg = {R, C}. */
static mgpu_result mgpu__ln_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu_tensor *x = node->in[0], *w = node->in[1], *b = node->in[2];
    mgpu__layer_norm_args a;
    mgpu_result r, status = MGPU_OK;
    memset(&a, 0, sizeof a);
    a.ctx = ctx; a.status = &status;
    a.R = node->iarg[0]; a.C = node->iarg[1];
    a.x = (const float *)x->data;
    a.w = w ? (const float *)w->data : NULL;
    a.dy = (const float *)node->out->grad->data;
    a.mean = (float *)node->extra;
    a.rstd = a.mean + a.R;
    if (mgpu__needs_grad(node, 0)) MGPU__GRAD_OR_FAIL(a.dx, ctx, x);
    if (mgpu__needs_grad(node, 1)) MGPU__GRAD_OR_FAIL(a.dw, ctx, w);
    if (mgpu__needs_grad(node, 2)) MGPU__GRAD_OR_FAIL(a.db, ctx, b);
    r = MGPU__TWIN(ctx, layer_norm_backward, &a);
    return r != MGPU_OK ? r : status;
}

MGPU_API mgpu_tensor *mgpu_op_layer_norm(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b, float eps) {
    static const char *op = "mgpu_op_layer_norm";
    mgpu_tensor *in[3];
    mgpu_tensor *out;
    mgpu__node *node = NULL;
    mgpu__layer_norm_args a;
    float *stats;
    if (!mgpu__check_input(ctx, op, "x", x, 1)) return NULL;
    if (x->ndim < 1 || x->shape[x->ndim - 1] < 1)
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: x has shape %s, need (..., C) with C >= 1", op, mgpu__shape_str(x));
    memset(&a, 0, sizeof a);
    a.C = x->shape[x->ndim - 1];
    a.R = x->numel / a.C;
    if (!mgpu__norm_check_vec(ctx, op, "w", w, a.C, x) || !mgpu__norm_check_vec(ctx, op, "b", b, a.C, x)) return NULL;
    if (!mgpu__norm_check_nonneg(op, "eps", eps)) return NULL;
    out = mgpu__new_activation(ctx, MGPU_F32, x->ndim, x->shape);
    stats = mgpu__norm_floats(ctx, 2 * a.R);   /* mean (R), rstd (R) */
    if (!out || !stats) return NULL;
    a.ctx = ctx;
    a.x = (const float *)x->data;
    a.w = w ? (const float *)w->data : NULL;
    a.b = b ? (const float *)b->data : NULL;
    a.y = (float *)out->data;
    a.mean = stats;
    a.rstd = stats + a.R;
    a.eps = eps;
    if (MGPU__TWIN(ctx, layer_norm_forward, &a) != MGPU_OK) return NULL;
    in[0] = x; in[1] = w; in[2] = b;
    MGPU__RECORD(ctx, "layer_norm", mgpu__ln_backward, out, 3, in, node);
    if (node) {
        node->extra = stats;
        node->iarg[0] = a.R;
        node->iarg[1] = a.C;
    }
    return out;
}

/* ======================================================================================
   Batch norm: x (N, C, *) viewed as (N, C, S); statistics per channel over N and S.

   SyncBatchNorm seam. Every cross-sample quantity is a buffer of per-channel double sums,
   filled by a twin (batch_norm_stats, batch_norm_grad_sums); the normalisation and the input
   gradient (batch_norm_forward, batch_norm_backward) use only that buffer. Between the two,
   mgpu__batch_norm calls sync->reduce (when set) to sum the buffer over the ranks:
     forward : 2C + 1 doubles = sum x (C), sum x^2 (C), element count per channel
     backward: 2C doubles     = sum dy (C), sum dy * (x - mean) (C); weight/bias grads are
               taken from the local sums BEFORE the reduce (DDP averages them as usual).
   The public op passes sync = NULL (this process only).
   ====================================================================================== */

typedef mgpu_result (*mgpu__bn_reduce_fn)(void *user, double *values, int64_t n);
typedef struct mgpu__bn_sync { mgpu__bn_reduce_fn reduce; void *user; } mgpu__bn_sync;
/* SyncBatchNorm's reduce: user is the mgpu_comm whose ranks share the statistics. */
static MGPU__UNUSED mgpu_result mgpu__bn_reduce_over_comm(void *user, double *values, int64_t n) {
    return mgpu_comm_allreduce_f64((mgpu_comm *)user, values, n, MGPU_REDUCE_SUM);
}

/* One pass of a batch norm CPU twin over (N, C, S). */
typedef struct mgpu__bn_job {
    const mgpu__batch_norm_args *a;
    const float *p, *q, *center;   /* sums: sum p and sum p * (q - center[c]); center NULL = 0 */
    const float *k1, *k2;          /* (C): dx += scale * (dy - k1 - (x - mean) * k2) */
} mgpu__bn_job;

/* Per-segment kernels: one (n, c) run of S contiguous elements starting at off. */
typedef void (*mgpu__bn_segment_fn)(const mgpu__bn_job *j, int64_t off, int64_t c, int64_t S);

/* Channels [c0, c1) segment by segment, n outer so memory is read in order. The S == 1 branch
   passes a literal 1: once the kernel is inlined the loop over channels vectorises, which
   matters for (N, C) inputs. Each channel sees its segments in n order on one thread. */
static inline void mgpu__bn_each_segment(const mgpu__bn_job *j, int64_t c0, int64_t c1, mgpu__bn_segment_fn seg) {
    const mgpu__batch_norm_args *a = j->a;
    int64_t n, c;
    for (n = 0; n < a->N; n++) {
        if (a->S == 1) for (c = c0; c < c1; c++) seg(j, n * a->C + c, c, 1);
        else for (c = c0; c < c1; c++) seg(j, (n * a->C + c) * a->S, c, a->S);
    }
}

/* sums[c] += sum p, sums[C + c] += sum p * (q - center[c]) over the segment. */
static inline void mgpu__bn_sums_segment(const mgpu__bn_job *j, int64_t off, int64_t c, int64_t S) {
    float center = j->center ? j->center[c] : 0.0f;
    double sp, spq;
    if (S == 1) { sp = j->p[off]; spq = sp * (double)(j->q[off] - center); }
    else mgpu__norm_moments(j->p + off, NULL, j->q + off, center, S, &sp, &spq);
    j->a->sums[c] += sp;
    j->a->sums[j->a->C + c] += spq;
}
static inline void mgpu__bn_affine_segment(const mgpu__bn_job *j, int64_t off, int64_t c, int64_t S) {
    const mgpu__batch_norm_args *a = j->a;
    float m = a->mean[c], sc = a->scale[c], sh = a->b ? a->b[c] : 0.0f;
    int64_t s;
    for (s = off; s < off + S; s++) a->y[s] = (a->x[s] - m) * sc + sh;
}
static inline void mgpu__bn_input_grad_segment(const mgpu__bn_job *j, int64_t off, int64_t c, int64_t S) {
    const mgpu__batch_norm_args *a = j->a;
    float m = a->mean[c], sc = a->scale[c], k1 = j->k1[c], k2 = j->k2[c];
    int64_t s;
    for (s = off; s < off + S; s++) a->dx[s] += sc * (a->dy[s] - k1 - (a->x[s] - m) * k2);
}

static void mgpu__bn_sums_range(void *arg, int64_t c0, int64_t c1) {
    const mgpu__bn_job *j = (const mgpu__bn_job *)arg;
    int64_t c;
    for (c = c0; c < c1; c++) { j->a->sums[c] = 0; j->a->sums[j->a->C + c] = 0; }
    mgpu__bn_each_segment(j, c0, c1, mgpu__bn_sums_segment);
}
static void mgpu__bn_affine_range(void *arg, int64_t c0, int64_t c1) {
    mgpu__bn_each_segment((const mgpu__bn_job *)arg, c0, c1, mgpu__bn_affine_segment);
}
static void mgpu__bn_input_grad_range(void *arg, int64_t c0, int64_t c1) {
    mgpu__bn_each_segment((const mgpu__bn_job *)arg, c0, c1, mgpu__bn_input_grad_segment);
}

/* One contiguous block of channels per thread: with n outer, each thread then streams the
   widest possible slice of every sample (small slices of an (N, C) row defeat prefetching). */
static void mgpu__bn_for_channels(const mgpu__bn_job *j, mgpu_range_fn fn) {
    const mgpu__batch_norm_args *a = j->a;
    int64_t threads = mgpu_context_num_threads(a->ctx);
    int64_t per_thread = (a->C + threads - 1) / threads;
    mgpu_parallel_for(a->ctx, a->C, MGPU__MAX(mgpu__norm_min_chunk(a->N * a->S), per_thread), fn, (void *)j);
}

/* sums[0, C) = sum p, sums[C, 2C) = sum p * (q - center) per channel (local to this process). */
static void mgpu__bn_channel_sums(const mgpu__batch_norm_args *a, const float *p, const float *q, const float *center) {
    mgpu__bn_job j;
    memset(&j, 0, sizeof j);
    j.a = a; j.p = p; j.q = q; j.center = center;
    mgpu__bn_for_channels(&j, mgpu__bn_sums_range);
}

/* The batch norm twins on the CPU (see "Internal: the seam"). */
static void mgpu__cpu_batch_norm_stats(const mgpu__batch_norm_args *a) {
    mgpu__bn_channel_sums(a, a->x, a->x, NULL);   /* sum x, sum x^2 */
    a->sums[2 * a->C] = (double)(a->N * a->S);
}

/* Batch mean/rstd from the (reduced) sums and the running-stat update with the unbiased
   variance, as PyTorch: running = (1 - momentum) * running + momentum * batch. */
static void mgpu__bn_batch_stats(const mgpu__batch_norm_args *a) {
    int64_t c, C = a->C;
    double count = a->sums[2 * C];
    for (c = 0; c < C; c++) {
        double m = a->sums[c] / count, var = a->sums[C + c] / count - m * m;
        if (var < 0) var = 0;
        a->mean[c] = (float)m;
        a->rstd[c] = (float)(1.0 / sqrt(var + (double)a->eps));
        if (a->running_mean) a->running_mean[c] = (float)((1.0 - a->momentum) * a->running_mean[c] + (double)a->momentum * m);
        if (a->running_var)
            a->running_var[c] = (float)((1.0 - a->momentum) * a->running_var[c] + (double)a->momentum * var * count / (count - 1.0));
    }
}

static void mgpu__cpu_batch_norm_forward(const mgpu__batch_norm_args *a) {
    mgpu__bn_job j;
    int64_t c;
    if (a->training) {
        mgpu__bn_batch_stats(a);
    } else {
        for (c = 0; c < a->C; c++) {
            a->mean[c] = a->running_mean[c];
            a->rstd[c] = (float)(1.0 / sqrt((double)a->running_var[c] + (double)a->eps));
        }
    }
    for (c = 0; c < a->C; c++) a->scale[c] = a->w ? a->rstd[c] * a->w[c] : a->rstd[c];
    memset(&j, 0, sizeof j);
    j.a = a;
    mgpu__bn_for_channels(&j, mgpu__bn_affine_range);
}

static void mgpu__cpu_batch_norm_grad_sums(const mgpu__batch_norm_args *a) {
    int64_t c, C = a->C;
    mgpu__bn_channel_sums(a, a->dy, a->x, a->mean);   /* sum dy, sum dy * (x - mean) */
    if (a->dw) for (c = 0; c < C; c++) a->dw[c] += (float)(a->sums[C + c] * a->rstd[c]);
    if (a->db) mgpu__norm_add_sums(a->db, a->sums, C);
}

static void mgpu__cpu_batch_norm_backward(const mgpu__batch_norm_args *a) {
    mgpu__bn_job j;
    int64_t c, C = a->C;
    float *k = a->coef;
    if (a->training) {
        /* the batch statistics depend on x: mean of dy and its projection on xhat */
        double count = *a->count;
        for (c = 0; c < C; c++) {
            k[c] = (float)(a->sums[c] / count);
            k[C + c] = (float)(a->sums[C + c] / count * a->rstd[c] * a->rstd[c]);
        }
    } else {
        memset(k, 0, sizeof(float) * (size_t)(2 * C));   /* eval: a plain per-channel affine */
    }
    memset(&j, 0, sizeof j);
    j.a = a; j.k1 = k; j.k2 = k + C;
    mgpu__bn_for_channels(&j, mgpu__bn_input_grad_range);
}

/* The SyncBatchNorm all-reduce point (see above); a no-op without sync. */
static int mgpu__bn_reduce_sums(const mgpu__bn_sync *sync, double *sums, int64_t n) {
    mgpu_result r;
    if (!sync || !sync->reduce) return 1;
    r = sync->reduce(sync->user, sums, n);
    if (r != MGPU_OK) {
        if (mgpu_last_result() == MGPU_OK) mgpu__fail(r, "mgpu_op_batch_norm: reducing the batch statistics across ranks failed");
        return 0;
    }
    return 1;
}

/* What the backward needs (arena). */
typedef struct mgpu__bn_saved {
    float *mean, *rstd, *scale;    /* (C) */
    const double *count;           /* elements per channel over all ranks (training; in the forward's sums) */
    int training;
    mgpu__bn_sync sync;
} mgpu__bn_saved;

static mgpu_result mgpu__bn_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu_tensor *x = node->in[0], *w = node->in[1], *b = node->in[2];
    const mgpu__bn_saved *sv = (const mgpu__bn_saved *)node->extra;
    int need_x = mgpu__needs_grad(node, 0), need_w = mgpu__needs_grad(node, 1), need_b = mgpu__needs_grad(node, 2);
    mgpu__batch_norm_args a;
    mgpu_result r;
    memset(&a, 0, sizeof a);
    a.ctx = ctx;
    a.N = node->iarg[0]; a.C = node->iarg[1]; a.S = node->iarg[2];
    a.training = sv->training;
    a.x = (const float *)x->data;
    a.dy = (const float *)node->out->grad->data;
    a.mean = sv->mean; a.rstd = sv->rstd; a.scale = sv->scale; a.count = sv->count;
    if ((need_x && sv->training) || need_w || need_b) {
        if (!(a.sums = mgpu__norm_doubles(ctx, 2 * a.C))) return MGPU_ERR_OOM_HOST;
        if (need_w) MGPU__GRAD_OR_FAIL(a.dw, ctx, w);
        if (need_b) MGPU__GRAD_OR_FAIL(a.db, ctx, b);
        if ((r = MGPU__TWIN(ctx, batch_norm_grad_sums, &a)) != MGPU_OK) return r;
    }
    if (!need_x) return MGPU_OK;
    if (sv->training && !mgpu__bn_reduce_sums(&sv->sync, a.sums, 2 * a.C)) return mgpu_last_result();
    if (!(a.coef = mgpu__norm_floats(ctx, 2 * a.C))) return MGPU_ERR_OOM_HOST;
    MGPU__GRAD_OR_FAIL(a.dx, ctx, x);
    return MGPU__TWIN(ctx, batch_norm_backward, &a);
}

static int mgpu__bn_validate(mgpu_context *ctx, const char *op, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b,
                             mgpu_tensor *running_mean, mgpu_tensor *running_var, int training, float momentum, float eps) {
    int64_t C;
    if (!mgpu__check_input(ctx, op, "x", x, 1)) return 0;
    if (x->ndim < 2 || x->shape[1] < 1) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: x has shape %s, need (N, C) or (N, C, H, W) with C >= 1", op, mgpu__shape_str(x));
        return 0;
    }
    C = x->shape[1];
    if (!mgpu__norm_check_vec(ctx, op, "w", w, C, x) || !mgpu__norm_check_vec(ctx, op, "b", b, C, x) ||
        !mgpu__norm_check_vec(ctx, op, "running_mean", running_mean, C, x) ||
        !mgpu__norm_check_vec(ctx, op, "running_var", running_var, C, x))
        return 0;
    if ((running_mean == NULL) != (running_var == NULL)) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: running_mean and running_var must be given together (or both NULL)", op);
        return 0;
    }
    if (!training && !running_mean) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: running_mean and running_var are required when training is 0", op);
        return 0;
    }
    if (training && x->numel / C <= 1) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: expected more than 1 value per channel when training, x has shape %s", op, mgpu__shape_str(x));
        return 0;
    }
    if (!(momentum == momentum) || momentum > FLT_MAX || momentum < -FLT_MAX) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: momentum is %g, must be finite", op, (double)momentum);
        return 0;
    }
    return mgpu__norm_check_nonneg(op, "eps", eps);
}

/* Batch norm with an optional cross-rank reduce of the statistics (SyncBatchNorm). */
static mgpu_tensor *mgpu__batch_norm(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b,
                                     mgpu_tensor *running_mean, mgpu_tensor *running_var, int training,
                                     float momentum, float eps, const mgpu__bn_sync *sync) {
    static const char *op = "mgpu_op_batch_norm";
    mgpu_tensor *in[3];
    mgpu_tensor *out;
    mgpu__node *node = NULL;
    mgpu__batch_norm_args a;
    mgpu__bn_saved *sv;
    float *stats;
    int64_t C;
    if (!mgpu__bn_validate(ctx, op, x, w, b, running_mean, running_var, training, momentum, eps)) return NULL;
    memset(&a, 0, sizeof a);
    a.ctx = ctx;
    a.N = x->shape[0]; a.C = C = x->shape[1];
    a.S = a.N ? x->numel / (a.N * C) : 0;
    a.training = training != 0; a.momentum = momentum; a.eps = eps;
    out = mgpu__new_activation(ctx, MGPU_F32, x->ndim, x->shape);
    sv = (mgpu__bn_saved *)mgpu__arena_alloc(ctx, sizeof *sv);
    stats = mgpu__norm_floats(ctx, 3 * C);   /* mean, rstd, scale: (C) each */
    if (!out || !sv || !stats) return NULL;
    memset(sv, 0, sizeof *sv);
    sv->mean = a.mean = stats; sv->rstd = a.rstd = stats + C; sv->scale = a.scale = stats + 2 * C;
    sv->training = a.training;
    if (sync) sv->sync = *sync;
    a.x = (const float *)x->data;
    a.w = w ? (const float *)w->data : NULL;
    a.b = b ? (const float *)b->data : NULL;
    a.running_mean = running_mean ? (float *)running_mean->data : NULL;
    a.running_var = running_var ? (float *)running_var->data : NULL;
    a.y = (float *)out->data;
    if (training) {
        if (!(a.sums = mgpu__norm_doubles(ctx, 2 * C + 1))) return NULL;
        if (MGPU__TWIN(ctx, batch_norm_stats, &a) != MGPU_OK) return NULL;   /* sum x, sum x^2, count */
        if (!mgpu__bn_reduce_sums(sync, a.sums, 2 * C + 1)) return NULL;
        sv->count = a.sums + 2 * C;
    }
    if (MGPU__TWIN(ctx, batch_norm_forward, &a) != MGPU_OK) return NULL;
    in[0] = x; in[1] = w; in[2] = b;
    MGPU__RECORD(ctx, "batch_norm", mgpu__bn_backward, out, 3, in, node);
    if (node) {
        node->extra = sv;
        node->iarg[0] = a.N; node->iarg[1] = a.C; node->iarg[2] = a.S;
    }
    return out;
}

MGPU_API mgpu_tensor *mgpu_op_batch_norm(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b,
                                         mgpu_tensor *running_mean, mgpu_tensor *running_var,
                                         int training, float momentum, float eps) {
    return mgpu__batch_norm(ctx, x, w, b, running_mean, running_var, training, momentum, eps, NULL);
}

/* ======================================================================================
   Embedding: out[i, :] = weight[idx[i], :]; the backward scatter-adds rows into weight's
   grad, split across threads by columns so repeated indices never race.
   ====================================================================================== */

/* Row of weight that output row i reads. */
static int64_t mgpu__emb_row(const mgpu__embedding_args *a, int64_t i) {
    return a->idx_i64 ? ((const int64_t *)a->idx)[i] : ((const int32_t *)a->idx)[i];
}

/* An id outside [0, V) (the front refuses them; the twins still never read or write out of bounds)
   gives a zero row and no gradient, as the CUDA twin. */
static int mgpu__emb_row_ok(const mgpu__embedding_args *a, int64_t row) { return row >= 0 && row < a->V; }

static void mgpu__emb_gather_rows(void *arg, int64_t i0, int64_t i1) {
    const mgpu__embedding_args *a = (const mgpu__embedding_args *)arg;
    int64_t i, row;
    for (i = i0; i < i1; i++) {
        row = mgpu__emb_row(a, i);
        if (mgpu__emb_row_ok(a, row)) memcpy(a->out + i * a->D, a->weight + row * a->D, sizeof(float) * (size_t)a->D);
        else memset(a->out + i * a->D, 0, sizeof(float) * (size_t)a->D);
    }
}

/* Each column's updates happen in index order on one thread: deterministic. */
static void mgpu__emb_scatter_cols(void *arg, int64_t d0, int64_t d1) {
    const mgpu__embedding_args *a = (const mgpu__embedding_args *)arg;
    int64_t i, d, row;
    for (i = 0; i < a->n; i++) {
        float *g;
        const float *dy = a->dy + i * a->D;
        if (!mgpu__emb_row_ok(a, row = mgpu__emb_row(a, i))) continue;
        g = a->dweight + row * a->D;
        for (d = d0; d < d1; d++) g[d] += dy[d];
    }
}

static void mgpu__cpu_embedding_forward(const mgpu__embedding_args *a) {
    mgpu_parallel_for(a->ctx, a->n, mgpu__norm_min_chunk(a->D), mgpu__emb_gather_rows, (void *)a);
}
static void mgpu__cpu_embedding_backward(const mgpu__embedding_args *a) {
    mgpu_parallel_for(a->ctx, a->D, mgpu__norm_min_chunk(a->n), mgpu__emb_scatter_cols, (void *)a);
}

/* The twins' view of the indices and the weight. */
static mgpu__embedding_args mgpu__emb_args(mgpu_context *ctx, const mgpu_tensor *weight, const mgpu_tensor *idx) {
    mgpu__embedding_args a;
    memset(&a, 0, sizeof a);
    a.ctx = ctx;
    a.idx = idx->data; a.idx_i64 = idx->dtype == MGPU_I64;
    a.n = idx->numel; a.V = weight->shape[0]; a.D = weight->shape[1];
    return a;
}

/* node: in = {weight}; saved[0] = idx */
static mgpu_result mgpu__emb_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__embedding_args a;
    if (!mgpu__needs_grad(node, 0)) return MGPU_OK;
    a = mgpu__emb_args(ctx, node->in[0], node->saved[0]);
    a.dy = (const float *)node->out->grad->data;
    MGPU__GRAD_OR_FAIL(a.dweight, ctx, node->in[0]);
    {   /* the CUDA twin's sort keys (none on the CPU) */
        mgpu_result r = mgpu__cuda_scratch(ctx, MGPU__EMB_SCRATCH_BYTES(a.n), &a.scratch);
        if (r != MGPU_OK) return r;
    }
    return MGPU__TWIN(ctx, embedding_backward, &a);
}

/* Every index in [0, V); else an error naming the first bad value and its position. Indices on a
   GPU are not read back (a stall per step): there a bad id gives a zero row and no gradient. */
static int mgpu__emb_check_indices(const char *op, const mgpu_tensor *idx, int64_t V) {
    int64_t i, rem, pos[MGPU_MAX_DIMS];
    int d;
    char where[160];
    if (!mgpu__on_host(idx)) return 1;
    for (i = 0; i < idx->numel; i++) {
        int64_t v = mgpu__index_at(idx, i);
        if (v >= 0 && v < V) continue;
        for (d = idx->ndim - 1, rem = i; d >= 0; d--) { pos[d] = rem % idx->shape[d]; rem /= idx->shape[d]; }
        mgpu_shape_string(idx->ndim, pos, where, sizeof where);
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: idx holds %lld at position %s (flat %lld), outside [0, %lld) for weight of %lld rows",
                   op, (long long)v, where, (long long)i, (long long)V, (long long)V);
        return 0;
    }
    return 1;
}

MGPU_API mgpu_tensor *mgpu_op_embedding(mgpu_context *ctx, mgpu_tensor *weight, mgpu_tensor *idx) {
    static const char *op = "mgpu_op_embedding";
    int64_t shape[MGPU_MAX_DIMS];
    mgpu_tensor *out;
    mgpu__node *node = NULL;
    mgpu__embedding_args a;
    if (!mgpu__check_input(ctx, op, "weight", weight, 1) || !mgpu__check_index(ctx, op, "idx", idx)) return NULL;
    if (weight->ndim != 2) MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: weight has shape %s, need (V, D)", op, mgpu__shape_str(weight));
    if (idx->ndim >= MGPU_MAX_DIMS)
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: idx has %d dims, at most %d fit (the output adds one)", op, idx->ndim, MGPU_MAX_DIMS - 1);
    if (!mgpu__emb_check_indices(op, idx, weight->shape[0])) return NULL;
    if (idx->ndim) memcpy(shape, idx->shape, sizeof(int64_t) * (size_t)idx->ndim);
    shape[idx->ndim] = weight->shape[1];
    out = mgpu__new_activation(ctx, MGPU_F32, idx->ndim + 1, shape);   /* (..., D) */
    if (!out) return NULL;
    a = mgpu__emb_args(ctx, weight, idx);
    a.weight = (const float *)weight->data; a.out = (float *)out->data;
    if (MGPU__TWIN(ctx, embedding_forward, &a) != MGPU_OK) return NULL;
    MGPU__RECORD(ctx, "embedding", mgpu__emb_backward, out, 1, &weight, node);
    if (node) node->saved[0] = idx;
    return out;
}

/* ======================================================================================
   Scaled dot-product attention, fused, per (b, h) pair:
     S = Q K^T / sqrt(D) (Tq, Tk); causal: S[i, j] = -inf for j > i (tril(ones(Tq, Tk)), as
     PyTorch's is_causal); P = softmax(S); O = P V (Tq, D). P (B, H, Tq, Tk) is kept for the
     backward: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)),
     dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D).
   Pairs run in parallel (each GEMM single-threaded) when there are enough of them, else
   one after the other with the threaded GEMM.
   ====================================================================================== */

typedef struct mgpu__attn_job mgpu__attn_job;
typedef void (*mgpu__attn_pair_fn)(const mgpu__attn_job *j, int64_t pair, float *scratch);
/* One run of an attention CPU twin over its pairs. */
struct mgpu__attn_job {
    const mgpu__attention_args *a;
    mgpu_context *gemm_ctx;        /* ctx when pairs run one after the other, NULL inside the pool */
    float *scratch;                /* (n_parts, Tq, Tk): dP in the backward, P in a forward without grad */
    int64_t n_parts;
    mgpu__attn_pair_fn pair_fn;
};

/* Keys visible to query row i. */
static int64_t mgpu__attn_row_len(const mgpu__attention_args *a, int64_t i) {
    return a->causal ? MGPU__MIN(i + 1, a->Tk) : a->Tk;
}

/* Row-wise softmax of the scores in place, masked entries set to 0. */
static void mgpu__attn_softmax_rows(const mgpu__attention_args *a, float *s) {
    int64_t i, j;
    for (i = 0; i < a->Tq; i++) {
        float *row = s + i * a->Tk, mx = -FLT_MAX, inv;
        int64_t len = mgpu__attn_row_len(a, i);
        double sum = 0;
        for (j = 0; j < len; j++) mx = row[j] > mx ? row[j] : mx;
        for (j = 0; j < len; j++) { row[j] = expf(row[j] - mx); sum += row[j]; }
        inv = (float)(1.0 / sum);
        for (j = 0; j < len; j++) row[j] *= inv;
        for (j = len; j < a->Tk; j++) row[j] = 0.0f;
    }
}

/* dP -> dS = P * (dP - rowsum(dP * P)) in place (masked entries have P = 0). */
static void mgpu__attn_softmax_grad_rows(const mgpu__attention_args *a, const float *p, float *dp) {
    int64_t i, j;
    for (i = 0; i < a->Tq; i++) {
        const float *pr = p + i * a->Tk;
        float *dr = dp + i * a->Tk, dot_f;
        double dot = 0;
        for (j = 0; j < a->Tk; j++) dot += (double)pr[j] * dr[j];
        dot_f = (float)dot;
        for (j = 0; j < a->Tk; j++) dr[j] = pr[j] * (dr[j] - dot_f);
    }
}

static void mgpu__attn_forward_pair(const mgpu__attn_job *j, int64_t pair, float *scratch) {
    const mgpu__attention_args *a = j->a;
    int64_t Tq = a->Tq, Tk = a->Tk, D = a->D;
    const float *q = a->q + pair * Tq * D, *k = a->k + pair * Tk * D, *v = a->v + pair * Tk * D;
    float *p = a->prob ? a->prob + pair * Tq * Tk : scratch, *o = a->out + pair * Tq * D;
    /* zeroed so a GEMM that reads C even with beta = 0 cannot pick up arena garbage (NaN) */
    memset(p, 0, sizeof(float) * (size_t)(Tq * Tk));
    memset(o, 0, sizeof(float) * (size_t)(Tq * D));
    mgpu__cpu_gemm_f32(j->gemm_ctx, 0, 1, Tq, Tk, D, a->scale, q, D, k, D, 0.0f, p, Tk);  /* (Tq, Tk) scores */
    mgpu__attn_softmax_rows(a, p);
    mgpu__cpu_gemm_f32(j->gemm_ctx, 0, 0, Tq, D, Tk, 1.0f, p, Tk, v, D, 0.0f, o, D);      /* (Tq, D) */
}

static void mgpu__attn_backward_pair(const mgpu__attn_job *j, int64_t pair, float *ds) {
    const mgpu__attention_args *a = j->a;
    int64_t Tq = a->Tq, Tk = a->Tk, D = a->D;
    int64_t qo = pair * Tq * D, ko = pair * Tk * D;
    const float *p = a->prob + pair * Tq * Tk, *dout = a->dout + qo;
    if (a->dv) mgpu__cpu_gemm_f32(j->gemm_ctx, 1, 0, Tk, D, Tq, 1.0f, p, Tk, dout, D, 1.0f, a->dv + ko, D);  /* += P^T dO */
    if (!a->dq && !a->dk) return;
    memset(ds, 0, sizeof(float) * (size_t)(Tq * Tk));
    mgpu__cpu_gemm_f32(j->gemm_ctx, 0, 1, Tq, Tk, D, 1.0f, dout, D, a->v + ko, D, 0.0f, ds, Tk);            /* dP = dO V^T */
    mgpu__attn_softmax_grad_rows(a, p, ds);
    if (a->dq) mgpu__cpu_gemm_f32(j->gemm_ctx, 0, 0, Tq, D, Tk, a->scale, ds, Tk, a->k + ko, D, 1.0f, a->dq + qo, D);
    if (a->dk) mgpu__cpu_gemm_f32(j->gemm_ctx, 1, 0, Tk, D, Tq, a->scale, ds, Tk, a->q + qo, D, 1.0f, a->dk + ko, D);
}

/* Part `part` owns pairs [part * P / parts, (part + 1) * P / parts) and one scratch slot. */
static void mgpu__attn_parts_range(void *arg, int64_t p0, int64_t p1) {
    const mgpu__attn_job *j = (const mgpu__attn_job *)arg;
    int64_t part, pair, pairs = j->a->BH;
    for (part = p0; part < p1; part++) {
        float *scratch = j->scratch ? j->scratch + part * j->a->Tq * j->a->Tk : NULL;
        for (pair = part * pairs / j->n_parts; pair < (part + 1) * pairs / j->n_parts; pair++) j->pair_fn(j, pair, scratch);
    }
}

/* Runs pair_fn over every (b, h) pair; sets *status if its scratch cannot be had. */
static void mgpu__attn_run(const mgpu__attention_args *a, mgpu__attn_pair_fn pair_fn, int need_scratch) {
    mgpu__attn_job j;
    int threads = mgpu_context_num_threads(a->ctx);
    int64_t work = a->BH * a->Tq * a->Tk * a->D;
    int parallel = threads > 1 && a->BH >= threads && work >= MGPU__NORM_GRAIN;
    memset(&j, 0, sizeof j);
    j.a = a;
    j.pair_fn = pair_fn;
    j.n_parts = parallel ? MGPU__MIN(a->BH, 4 * (int64_t)threads) : 1;
    j.gemm_ctx = parallel ? NULL : a->ctx;
    if (need_scratch && !(j.scratch = mgpu__norm_floats(a->ctx, j.n_parts * a->Tq * a->Tk))) { *a->status = MGPU_ERR_OOM_HOST; return; }
    if (parallel) mgpu_parallel_for(a->ctx, j.n_parts, 1, mgpu__attn_parts_range, &j);
    else mgpu__attn_parts_range(&j, 0, 1);
}

/* The attention twins on the CPU: the forward needs a P slot per part only when P is not kept,
   the backward a dP slot per part when dq or dk is wanted. */
static void mgpu__cpu_attention_forward(const mgpu__attention_args *a) {
    mgpu__attn_run(a, mgpu__attn_forward_pair, a->prob == NULL);
}
static void mgpu__cpu_attention_backward(const mgpu__attention_args *a) {
    mgpu__attn_run(a, mgpu__attn_backward_pair, a->dq || a->dk);
}

/* node: in = {q, k, v}; extra = P; iarg = {pairs, Tq, Tk, D, causal}; farg[0] = scale. */
static mgpu_result mgpu__attn_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__attention_args a;
    mgpu_result r, status = MGPU_OK;
    memset(&a, 0, sizeof a);
    a.ctx = ctx; a.status = &status; a.blas = ctx->cuda_blas;
    a.BH = node->iarg[0]; a.Tq = node->iarg[1]; a.Tk = node->iarg[2]; a.D = node->iarg[3];
    a.causal = (int)node->iarg[4];
    a.scale = node->farg[0];
    a.q = (const float *)node->in[0]->data;
    a.k = (const float *)node->in[1]->data;
    a.v = (const float *)node->in[2]->data;
    a.prob = (float *)node->extra;
    a.dout = (const float *)node->out->grad->data;
    if (mgpu__needs_grad(node, 0)) MGPU__GRAD_OR_FAIL(a.dq, ctx, node->in[0]);
    if (mgpu__needs_grad(node, 1)) MGPU__GRAD_OR_FAIL(a.dk, ctx, node->in[1]);
    if (mgpu__needs_grad(node, 2)) MGPU__GRAD_OR_FAIL(a.dv, ctx, node->in[2]);
    r = MGPU__TWIN(ctx, attention_backward, &a);
    return r != MGPU_OK ? r : status;
}

static int mgpu__attn_validate(mgpu_context *ctx, const char *op, const mgpu_tensor *q, const mgpu_tensor *k, const mgpu_tensor *v) {
    if (!mgpu__check_input(ctx, op, "q", q, 1) || !mgpu__check_input(ctx, op, "k", k, 1) || !mgpu__check_input(ctx, op, "v", v, 1))
        return 0;
    if (q->ndim != 4 || k->ndim != 4 || !mgpu_tensor_same_shape(k, v) || q->shape[0] != k->shape[0] ||
        q->shape[1] != k->shape[1] || q->shape[3] != k->shape[3] || q->shape[3] < 1 || k->shape[2] < 1) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: q %s, k %s, v %s do not fit: need q (B, H, Tq, D) and k, v (B, H, Tk, D) with D, Tk >= 1",
                   op, mgpu__shape_str(q), mgpu__shape_str(k), mgpu__shape_str(v));
        return 0;
    }
    return 1;
}

/* Autocast (see "Mixed precision"): q, k, v and the output rounded to the half format when ctx->autocast is set. */

MGPU_API mgpu_tensor *mgpu_op_attention(mgpu_context *ctx, mgpu_tensor *q, mgpu_tensor *k, mgpu_tensor *v, int causal) {
    static const char *op = "mgpu_op_attention";
    mgpu_tensor *in[3];
    mgpu_tensor *out;
    mgpu__node *node = NULL;
    mgpu__attention_args a;
    mgpu_result status = MGPU_OK;
    int keep_prob;
    if (mgpu__autocast_active(ctx)) {
        int mode;
        in[0] = q; in[1] = k; in[2] = v;
        if ((mode = mgpu__autocast_begin(ctx, in, 3)) < 0) return NULL;
        return mgpu__autocast_end(ctx, mode, mgpu_op_attention(ctx, in[0], in[1], in[2], causal));
    }
    if (!mgpu__attn_validate(ctx, op, q, k, v)) return NULL;
    /* P for all pairs only when a backward may follow; otherwise the twins find their own room */
    keep_prob = mgpu_is_grad_enabled(ctx) && (q->requires_grad || k->requires_grad || v->requires_grad);
    memset(&a, 0, sizeof a);
    a.ctx = ctx; a.status = &status; a.blas = ctx->cuda_blas;
    a.BH = q->shape[0] * q->shape[1];
    a.Tq = q->shape[2]; a.Tk = k->shape[2]; a.D = q->shape[3];
    a.scale = (float)(1.0 / sqrt((double)a.D));
    a.causal = causal != 0;
    a.q = (const float *)q->data; a.k = (const float *)k->data; a.v = (const float *)v->data;
    out = mgpu__new_activation(ctx, MGPU_F32, 4, q->shape);                   /* (B, H, Tq, D) */
    a.prob = keep_prob ? mgpu__norm_floats(ctx, a.BH * a.Tq * a.Tk) : NULL;  /* (B, H, Tq, Tk) */
    if (!out || (keep_prob && !a.prob)) return NULL;
    a.out = (float *)out->data;
    if (MGPU__TWIN(ctx, attention_forward, &a) != MGPU_OK || status != MGPU_OK) return NULL;
    in[0] = q; in[1] = k; in[2] = v;
    MGPU__RECORD(ctx, "attention", mgpu__attn_backward, out, 3, in, node);
    if (node) {
        node->extra = a.prob;
        node->iarg[0] = a.BH; node->iarg[1] = a.Tq; node->iarg[2] = a.Tk; node->iarg[3] = a.D;
        node->iarg[4] = a.causal;
        node->farg[0] = a.scale;
    }
    return out;
}
/* ======================================================================================
   Models, layers, optimizers, schedules
   ====================================================================================== */

/* Models (named parameters and buffers), layers with PyTorch's names, shapes and default
   initialisation, initialisers, optimizers (SGD, Adam, AdamW), gradient clipping, LR schedules. */

/* --------------------------------------------------------------------------------------
   Model: parameters and buffers under their state_dict names, in registration order
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__named { char *name; mgpu_tensor *tensor; } mgpu__named;
typedef struct mgpu__named_list { mgpu__named *items; int count, cap; } mgpu__named_list;

struct mgpu_model {
    mgpu_context *ctx;
    mgpu__named_list params, buffers;
    void **owned; int n_owned, cap_owned;   /* layer structs, freed with the model */
    int training;
    mgpu_batchnorm2d **batchnorms; int n_batchnorms, cap_batchnorms;  /* found by DDP's sync_batchnorm */
};

/* Room for `need` elements of `elem` bytes: returns the (possibly moved) array, or NULL with an
   error (the old array stays valid). */
static void *mgpu__grow(void *items, int *cap, int need, size_t elem, const char *what) {
    void *p;
    int ncap;
    if (need <= *cap) return items;
    ncap = *cap ? *cap : 16;
    while (ncap < need) ncap *= 2;
    p = mgpu__alloc(elem * (size_t)ncap, what);
    if (!p) return NULL;
    if (*cap) memcpy(p, items, elem * (size_t)*cap);
    mgpu_free(items);
    *cap = ncap;
    return p;
}

static mgpu_tensor *mgpu__named_find(const mgpu__named_list *l, const char *name) {
    int i;
    for (i = 0; i < l->count; i++)
        if (strcmp(l->items[i].name, name) == 0) return l->items[i].tensor;
    return NULL;
}

/* Frees entries [from, count) and shrinks the list to `from`. */
static void mgpu__named_truncate(mgpu__named_list *l, int from) {
    int i;
    for (i = from; i < l->count; i++) { mgpu_tensor_free(l->items[i].tensor); mgpu_free(l->items[i].name); }
    if (from < l->count) l->count = from;
}

MGPU_API mgpu_model *mgpu_model_create(mgpu_context *ctx) {
    mgpu_model *m;
    if (!ctx) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_model_create: ctx is NULL");
    m = (mgpu_model *)mgpu__calloc(sizeof *m, "a model");
    if (!m) return NULL;
    m->ctx = ctx;
    m->training = 1;
    return m;
}

MGPU_API void mgpu_model_destroy(mgpu_model *m) {
    int i;
    if (!m) return;
    mgpu__named_truncate(&m->params, 0);
    mgpu__named_truncate(&m->buffers, 0);
    for (i = 0; i < m->n_owned; i++) mgpu_free(m->owned[i]);
    mgpu_free(m->params.items);
    mgpu_free(m->buffers.items);
    mgpu_free(m->owned);
    mgpu_free(m->batchnorms);
    mgpu_free(m);
}

MGPU_API mgpu_context *mgpu_model_context(const mgpu_model *m) {
    if (!m) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_model_context: model is NULL");
    return m->ctx;
}

/* Shared body of add_parameter/add_buffer: checks, allocates (zeros), copies the name. */
static mgpu_tensor *mgpu__model_add(mgpu_model *m, int is_param, const char *name, mgpu_dtype dtype, int ndim,
                                    const int64_t *shape, const char *fn) {
    mgpu__named_list *list;
    mgpu__named *grown;
    mgpu_tensor *t;
    char *copy;
    char what[160];
    if (!m) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: model is NULL", fn);
    if (!name || !name[0]) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: name is NULL or empty", fn);
    if (mgpu__named_find(&m->params, name) || mgpu__named_find(&m->buffers, name))
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: the name '%s' is already registered in this model", fn, name);
    if (!mgpu__dtype_valid(dtype)) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s '%s': dtype %d is not a valid mgpu_dtype", fn, name, (int)dtype);
    if (is_param && !mgpu__dtype_is_float(dtype))
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s '%s': a parameter must have a float dtype, got %s", fn, name, mgpu_dtype_name(dtype));
    snprintf(what, sizeof what, "%s '%s'", fn, name);
    if (mgpu__shape_numel(ndim, shape, what) < 0) return NULL;
    list = is_param ? &m->params : &m->buffers;
    grown = (mgpu__named *)mgpu__grow(list->items, &list->cap, list->count + 1, sizeof *list->items, "the model's tensor list");
    if (!grown) return NULL;
    list->items = grown;
    t = mgpu_tensor_create(m->ctx, dtype, ndim, shape);
    copy = t ? mgpu__strdup(name) : NULL;
    if (!copy) { mgpu_tensor_free(t); return NULL; }
    t->requires_grad = is_param;
    list->items[list->count].name = copy;
    list->items[list->count].tensor = t;
    list->count++;
    return t;
}

MGPU_API mgpu_tensor *mgpu_model_add_parameter(mgpu_model *m, const char *name, mgpu_dtype dtype, int ndim, const int64_t *shape) {
    return mgpu__model_add(m, 1, name, dtype, ndim, shape, "mgpu_model_add_parameter");
}
MGPU_API mgpu_tensor *mgpu_model_add_buffer(mgpu_model *m, const char *name, mgpu_dtype dtype, int ndim, const int64_t *shape) {
    return mgpu__model_add(m, 0, name, dtype, ndim, shape, "mgpu_model_add_buffer");
}

MGPU_API int mgpu_model_num_parameters(const mgpu_model *m) { return m ? m->params.count : 0; }
MGPU_API int mgpu_model_num_buffers(const mgpu_model *m) { return m ? m->buffers.count : 0; }

static mgpu_tensor *mgpu__named_at(const mgpu__named_list *l, int i, const char **name, const char *fn) {
    if (i < 0 || i >= l->count) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: index %d outside [0, %d)", fn, i, l->count);
    if (name) *name = l->items[i].name;
    return l->items[i].tensor;
}
MGPU_API mgpu_tensor *mgpu_model_parameter(const mgpu_model *m, int i, const char **name) {
    if (!m) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_model_parameter: model is NULL");
    return mgpu__named_at(&m->params, i, name, "mgpu_model_parameter");
}
MGPU_API mgpu_tensor *mgpu_model_buffer(const mgpu_model *m, int i, const char **name) {
    if (!m) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_model_buffer: model is NULL");
    return mgpu__named_at(&m->buffers, i, name, "mgpu_model_buffer");
}

MGPU_API mgpu_tensor *mgpu_model_find(const mgpu_model *m, const char *name) {
    mgpu_tensor *t;
    if (!m || !name) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_model_find: model and name must not be NULL");
    t = mgpu__named_find(&m->params, name);
    if (!t) t = mgpu__named_find(&m->buffers, name);
    if (!t) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_model_find: no parameter or buffer named '%s'", name);
    return t;
}

MGPU_API int64_t mgpu_model_parameter_count(const mgpu_model *m) {
    int64_t n = 0;
    int i;
    if (!m) return 0;
    for (i = 0; i < m->params.count; i++) n += m->params.items[i].tensor->numel;
    return n;
}

MGPU_API void mgpu_model_train(mgpu_model *m, int training) {
    int i;
    if (!m) return;
    m->training = training != 0;
    for (i = 0; i < m->n_batchnorms; i++) m->batchnorms[i]->counted = -1;   /* a load between epochs is seen */
}
MGPU_API int mgpu_model_is_training(const mgpu_model *m) { return m ? m->training : 0; }

MGPU_API mgpu_result mgpu_model_zero_grad(mgpu_model *m) {
    int i;
    if (!m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_model_zero_grad: model is NULL");
    for (i = 0; i < m->params.count; i++) mgpu_tensor_zero_grad(m->params.items[i].tensor);
    return MGPU_OK;
}

/* Every entry of dst has a same-named, same-dtype, same-shape entry in src (and the counts match). */
static mgpu_result mgpu__check_same_state(const mgpu__named_list *dst, const mgpu__named_list *src, const char *kind) {
    int i;
    if (dst->count != src->count)
        return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_model_copy_state: destination has %d %ss, source has %d", dst->count, kind, src->count);
    for (i = 0; i < dst->count; i++) {
        const mgpu_tensor *d = dst->items[i].tensor, *s = mgpu__named_find(src, dst->items[i].name);
        if (!s) return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_model_copy_state: %s '%s' is missing from the source model", kind, dst->items[i].name);
        if (s->dtype != d->dtype || !mgpu_tensor_same_shape(s, d))
            return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_model_copy_state: %s '%s' is %s %s in the source, %s %s in the destination", kind,
                              dst->items[i].name, mgpu_dtype_name(s->dtype), mgpu__shape_str(s), mgpu_dtype_name(d->dtype), mgpu__shape_str(d));
    }
    return MGPU_OK;
}
static void mgpu__copy_named(mgpu__named_list *dst, const mgpu__named_list *src) {
    int i;
    for (i = 0; i < dst->count; i++) mgpu_tensor_copy(dst->items[i].tensor, mgpu__named_find(src, dst->items[i].name));
}

MGPU_API mgpu_result mgpu_model_copy_state(mgpu_model *dst, const mgpu_model *src) {
    mgpu_result r;
    if (!dst || !src) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_model_copy_state: dst and src must not be NULL");
    /* check everything first so a mismatch leaves dst untouched */
    if ((r = mgpu__check_same_state(&dst->params, &src->params, "parameter")) != MGPU_OK) return r;
    if ((r = mgpu__check_same_state(&dst->buffers, &src->buffers, "buffer")) != MGPU_OK) return r;
    mgpu__copy_named(&dst->params, &src->params);
    mgpu__copy_named(&dst->buffers, &src->buffers);
    return MGPU_OK;
}

/* Layer structs are zeroed memory owned (and freed) by the model. */
static void *mgpu__model_own(mgpu_model *m, size_t bytes, const char *what) {
    void **grown = (void **)mgpu__grow(m->owned, &m->cap_owned, m->n_owned + 1, sizeof(void *), "the model's layer list");
    void *p;
    if (!grown) return NULL;
    m->owned = grown;
    p = mgpu__calloc(bytes, what);
    if (p) m->owned[m->n_owned++] = p;
    return p;
}

/* A failed layer constructor rolls the model (and the init RNG stream) back to where it started,
   so a half-built layer never stays registered. */
typedef struct mgpu__model_mark { int params, buffers, owned; uint64_t rng_offset; } mgpu__model_mark;
static mgpu__model_mark mgpu__model_mark_now(const mgpu_model *m) {
    mgpu__model_mark mk;
    mk.params = m->params.count; mk.buffers = m->buffers.count; mk.owned = m->n_owned;
    mk.rng_offset = m->ctx->rng_offset;
    return mk;
}
static void mgpu__model_rollback(mgpu_model *m, mgpu__model_mark mk) {
    int i;
    mgpu__named_truncate(&m->params, mk.params);
    mgpu__named_truncate(&m->buffers, mk.buffers);
    for (i = mk.owned; i < m->n_owned; i++) mgpu_free(m->owned[i]);
    if (mk.owned < m->n_owned) m->n_owned = mk.owned;
    m->ctx->rng_offset = mk.rng_offset;
}

/* --------------------------------------------------------------------------------------
   Initialisers: element i takes counter first + i of the context's stream, so the values do not
   depend on the thread count and a model is rebuilt identically from the seed.
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__init_job { float *data; uint64_t seed, first; double offset, scale; int normal; } mgpu__init_job;

static void mgpu__init_range(void *arg, int64_t begin, int64_t end) {
    const mgpu__init_job *j = (const mgpu__init_job *)arg;
    int64_t i;
    for (i = begin; i < end; i++) {
        uint64_t c = j->first + (uint64_t)i;
        double r = j->normal ? (double)mgpu_random_normal(j->seed, c) : (double)mgpu_random_uniform(j->seed, c);
        j->data[i] = (float)(j->offset + j->scale * r);
    }
}

/* t = offset + scale * r with r ~ U[0, 1) or N(0, 1). A tensor on a GPU is filled on the host
   with the very same draws and copied over once, so a model built on cuda:i starts bit-identical
   to the one the CPU builds from the same seed (initialisation is not worth a kernel). */
static mgpu_result mgpu__init_random(mgpu_context *ctx, mgpu_tensor *t, double offset, double scale, int normal, const char *fn) {
    mgpu__init_job job;
    mgpu_result r = MGPU_OK;
    if (!ctx || !t) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: ctx and tensor must not be NULL", fn);
    if (t->dtype != MGPU_F32)
        return mgpu__fail(MGPU_ERR_UNSUPPORTED, "%s: tensor is %s; initialisers fill F32 tensors", fn, mgpu_dtype_name(t->dtype));
    if (!mgpu__same_device(t->device, ctx->device))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: the tensor is on another device than the context", fn);
    job.data = mgpu__on_host(t) ? (float *)t->data : (float *)mgpu__alloc(mgpu_tensor_nbytes(t), "initialising a device tensor on the host");
    if (!job.data) return mgpu_last_result();
    job.seed = ctx->rng_seed;
    job.first = mgpu_context_rng_reserve(ctx, (uint64_t)t->numel);
    job.offset = offset; job.scale = scale; job.normal = normal;
    mgpu_parallel_for(ctx, t->numel, 32768, mgpu__init_range, &job);
    if (!mgpu__on_host(t)) {
        r = mgpu_tensor_copy_from_host(t, job.data, mgpu_tensor_nbytes(t));
        mgpu_free(job.data);
    }
    return r;
}

MGPU_API mgpu_result mgpu_init_uniform(mgpu_context *ctx, mgpu_tensor *t, float lo, float hi) {
    if (!(lo <= hi) || !isfinite(lo) || !isfinite(hi))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_init_uniform: need finite lo <= hi, got lo %g, hi %g", lo, hi);
    return mgpu__init_random(ctx, t, lo, (double)hi - (double)lo, 0, "mgpu_init_uniform");
}
MGPU_API mgpu_result mgpu_init_normal(mgpu_context *ctx, mgpu_tensor *t, float mean, float std) {
    if (!(std >= 0) || !isfinite(mean) || !isfinite(std))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_init_normal: need finite mean and std >= 0, got mean %g, std %g", mean, std);
    return mgpu__init_random(ctx, t, mean, std, 1, "mgpu_init_normal");
}

/* --------------------------------------------------------------------------------------
   Layers. Constructors register "<name>.<tensor>" in PyTorch's state_dict order; forwards
   compose the public ops, so autograd comes for free.
   -------------------------------------------------------------------------------------- */

static int mgpu__layer_args_ok(const mgpu_model *m, const char *name, const char *fn) {
    if (!m) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: model is NULL", fn); return 0; }
    if (!name) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: name is NULL", fn); return 0; }
    return 1;
}

/* "<prefix>.<suffix>" (just suffix for an empty prefix, as a top-level PyTorch module), freed by the caller. */
static char *mgpu__join_name(const char *prefix, const char *suffix) {
    size_t np = strlen(prefix), ns = strlen(suffix);
    char *s = (char *)mgpu__alloc(np + ns + 2, "a parameter name");
    if (!s) return NULL;
    if (np) { memcpy(s, prefix, np); s[np] = '.'; np++; }
    memcpy(s + np, suffix, ns + 1);
    return s;
}

/* Registers "<prefix>.<suffix>" as a parameter (or buffer) filled with `fill`. */
static mgpu_tensor *mgpu__layer_tensor(mgpu_model *m, int is_param, const char *prefix, const char *suffix, mgpu_dtype dtype,
                                       int ndim, const int64_t *shape, double fill, const char *fn) {
    char *full = mgpu__join_name(prefix, suffix);
    mgpu_tensor *t;
    if (!full) return NULL;
    t = mgpu__model_add(m, is_param, full, dtype, ndim, shape, fn);
    mgpu_free(full);
    if (t && fill != 0.0) mgpu_tensor_fill(t, fill);
    return t;
}
static mgpu_tensor *mgpu__layer_param(mgpu_model *m, const char *prefix, const char *suffix, int ndim, const int64_t *shape,
                                      double fill, const char *fn) {
    return mgpu__layer_tensor(m, 1, prefix, suffix, MGPU_F32, ndim, shape, fill, fn);
}

/* Weight (shape) and optional bias (shape[0]) as nn.Linear/nn.Conv2d initialise them:
   kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the bias uses the same bound. */
static int mgpu__add_weight_bias(mgpu_model *m, const char *prefix, int ndim, const int64_t *wshape, int64_t fan_in, int bias,
                                 mgpu_tensor **w, mgpu_tensor **b, const char *fn) {
    float bound = (float)(1.0 / sqrt((double)fan_in));
    *w = mgpu__layer_param(m, prefix, "weight", ndim, wshape, 0.0, fn);
    if (!*w || mgpu_init_uniform(m->ctx, *w, -bound, bound) != MGPU_OK) return 0;
    *b = NULL;
    if (!bias) return 1;
    *b = mgpu__layer_param(m, prefix, "bias", 1, wshape, 0.0, fn);
    return *b && mgpu_init_uniform(m->ctx, *b, -bound, bound) == MGPU_OK;
}

/* Fills an already-owned linear struct (shared by mgpu_linear_create and the layers that embed one). */
static int mgpu__linear_init(mgpu_model *m, mgpu_linear *l, const char *name, int64_t in_features, int64_t out_features, int bias,
                             const char *fn) {
    int64_t wshape[2];
    wshape[0] = out_features; wshape[1] = in_features;   // (out, in)
    l->model = m; l->in_features = in_features; l->out_features = out_features;
    return mgpu__add_weight_bias(m, name, 2, wshape, in_features, bias, &l->weight, &l->bias, fn);
}
static mgpu_linear *mgpu__linear_new(mgpu_model *m, const char *name, int64_t in_features, int64_t out_features, int bias, const char *fn) {
    mgpu_linear *l = (mgpu_linear *)mgpu__model_own(m, sizeof *l, "a linear layer");
    if (!l || !mgpu__linear_init(m, l, name, in_features, out_features, bias, fn)) return NULL;
    return l;
}

MGPU_API mgpu_linear *mgpu_linear_create(mgpu_model *m, const char *name, int64_t in_features, int64_t out_features, int bias) {
    const char *fn = "mgpu_linear_create";
    mgpu__model_mark mk;
    mgpu_linear *l;
    if (!mgpu__layer_args_ok(m, name, fn)) return NULL;
    if (in_features < 1 || out_features < 1)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s '%s': in_features %lld and out_features %lld must be >= 1", fn, name,
                        (long long)in_features, (long long)out_features);
    mk = mgpu__model_mark_now(m);
    l = mgpu__linear_new(m, name, in_features, out_features, bias, fn);
    if (!l) mgpu__model_rollback(m, mk);
    return l;
}

/* Layer forwards: a NULL layer is an error; a NULL input is passed on to the op, which keeps the first error. */
static int mgpu__layer_ok(const void *layer, const char *fn) {
    if (!layer) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: layer is NULL", fn); return 0; }
    return 1;
}

MGPU_API mgpu_tensor *mgpu_linear_forward(mgpu_context *ctx, const mgpu_linear *l, mgpu_tensor *x) {
    if (!mgpu__layer_ok(l, "mgpu_linear_forward")) return NULL;
    return mgpu_op_linear(ctx, x, l->weight, l->bias);   // (..., in) -> (..., out)
}

MGPU_API mgpu_conv2d *mgpu_conv2d_create(mgpu_model *m, const char *name, int64_t in_channels, int64_t out_channels,
                                         int kernel, int stride, int padding, int bias) {
    const char *fn = "mgpu_conv2d_create";
    mgpu__model_mark mk;
    mgpu_conv2d *l;
    int64_t wshape[4];
    if (!mgpu__layer_args_ok(m, name, fn)) return NULL;
    if (in_channels < 1 || out_channels < 1 || kernel < 1 || stride < 1 || padding < 0)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s '%s': need in_channels, out_channels, kernel, stride >= 1 and padding >= 0 "
                        "(got %lld, %lld, %d, %d, %d)", fn, name, (long long)in_channels, (long long)out_channels, kernel, stride, padding);
    wshape[0] = out_channels; wshape[1] = in_channels; wshape[2] = kernel; wshape[3] = kernel;   // (O, C, k, k)
    mk = mgpu__model_mark_now(m);
    l = (mgpu_conv2d *)mgpu__model_own(m, sizeof *l, "a conv2d layer");
    if (!l || !mgpu__add_weight_bias(m, name, 4, wshape, in_channels * kernel * kernel, bias, &l->weight, &l->bias, fn)) {
        mgpu__model_rollback(m, mk);
        return NULL;
    }
    l->model = m; l->in_channels = in_channels; l->out_channels = out_channels;
    l->kernel = kernel; l->stride = stride; l->padding = padding;
    return l;
}

MGPU_API mgpu_tensor *mgpu_conv2d_forward(mgpu_context *ctx, const mgpu_conv2d *l, mgpu_tensor *x) {
    if (!mgpu__layer_ok(l, "mgpu_conv2d_forward")) return NULL;
    return mgpu_op_conv2d(ctx, x, l->weight, l->bias, l->stride, l->padding);   // (N, C, H, W) -> (N, O, OH, OW)
}

MGPU_API mgpu_batchnorm2d *mgpu_batchnorm2d_create(mgpu_model *m, const char *name, int64_t num_features) {
    const char *fn = "mgpu_batchnorm2d_create";
    mgpu__model_mark mk;
    mgpu_batchnorm2d *l;
    if (!mgpu__layer_args_ok(m, name, fn)) return NULL;
    if (num_features < 1) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s '%s': num_features %lld must be >= 1", fn, name, (long long)num_features);
    mk = mgpu__model_mark_now(m);
    l = (mgpu_batchnorm2d *)mgpu__model_own(m, sizeof *l, "a batchnorm2d layer");
    if (l) {
        l->counted = -1;   /* read back at the first count: the buffer may be loaded before training starts */
        l->weight = mgpu__layer_param(m, name, "weight", 1, &num_features, 1.0, fn);
        l->bias = l->weight ? mgpu__layer_param(m, name, "bias", 1, &num_features, 0.0, fn) : NULL;
        l->running_mean = l->bias ? mgpu__layer_tensor(m, 0, name, "running_mean", MGPU_F32, 1, &num_features, 0.0, fn) : NULL;
        l->running_var = l->running_mean ? mgpu__layer_tensor(m, 0, name, "running_var", MGPU_F32, 1, &num_features, 1.0, fn) : NULL;
        l->num_batches_tracked = l->running_var ? mgpu__layer_tensor(m, 0, name, "num_batches_tracked", MGPU_I64, 0, NULL, 0.0, fn) : NULL;
    }
    if (l && l->num_batches_tracked) {
        mgpu_batchnorm2d **grown = (mgpu_batchnorm2d **)mgpu__grow(m->batchnorms, &m->cap_batchnorms, m->n_batchnorms + 1,
                                                                   sizeof *grown, "the model's batchnorm list");
        if (grown) { m->batchnorms = grown; m->batchnorms[m->n_batchnorms++] = l; }
        else l->num_batches_tracked = NULL;
    }
    if (!l || !l->num_batches_tracked) { mgpu__model_rollback(m, mk); return NULL; }
    l->model = m; l->num_features = num_features; l->eps = 1e-5f; l->momentum = 0.1f; l->sync_comm = NULL;
    return l;
}

/* num_batches_tracked += 1: in place on the host. On a GPU from the host's count (l->counted),
   read back only when unknown (after mgpu_model_train), then written with a fill that needs no
   sync: a read-modify-write through the host every training forward would stall the step. */
/* The count on the host: read back once after mgpu_model_train (never while capturing: the warm-up
   steps before a capture read it). */
static mgpu_result mgpu__batchnorm_known_count(mgpu_batchnorm2d *l) {
    double v;
    if (l->counted >= 0) return MGPU_OK;
    if (mgpu__capturing(l->num_batches_tracked->ctx))
        return mgpu__fail(MGPU_ERR_STATE, "CUDA Graph capture: num_batches_tracked is not known on the host yet");
    v = mgpu_tensor_item(l->num_batches_tracked);
    if (v != v) return mgpu_last_result();
    l->counted = (int64_t)v;
    return MGPU_OK;
}
/* A captured count's replay hook: the count of an eager step, copied by the graph from its step scalar. */
static mgpu_result mgpu__batchnorm_count_replay(void *layer, int64_t unused, uint64_t *words) {
    mgpu_batchnorm2d *l = (mgpu_batchnorm2d *)layer;
    mgpu_result r = mgpu__batchnorm_known_count(l);
    (void)unused;
    words[0] = (uint64_t)++l->counted;
    return r;
}
static mgpu_result mgpu__batchnorm_count(mgpu_batchnorm2d *l) {
    mgpu_tensor *t = l->num_batches_tracked;
    mgpu_result r;
    if (mgpu__on_host(t)) { ((int64_t *)t->data)[0]++; return MGPU_OK; }
    if (mgpu__capturing(t->ctx)) {   /* each replay counts on the host and copies its count from a step scalar */
        mgpu__copy_args c;
        void *at = NULL;
        if ((r = mgpu__step_scalar(t->ctx, mgpu__batchnorm_count_replay, l, 0, 1, &at)) != MGPU_OK) return r;
        c.ctx = t->ctx; c.src = at; c.dst = t->data; c.bytes = sizeof(int64_t);
        return MGPU__TWIN(t->ctx, copy, &c);
    }
    if ((r = mgpu__batchnorm_known_count(l)) != MGPU_OK) return r;
    return mgpu_tensor_fill(t, (double)++l->counted);
}

MGPU_API mgpu_tensor *mgpu_batchnorm2d_forward(mgpu_context *ctx, mgpu_batchnorm2d *l, mgpu_tensor *x) {
    mgpu__bn_sync sync;
    mgpu_tensor *y;
    int training;
    const char *fn = "mgpu_batchnorm2d_forward";
    if (!mgpu__layer_ok(l, fn) || !mgpu__check_input(ctx, fn, "x", x, 1)) return NULL;
    if (x->ndim != 4) MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: x is %s, expected 4-D (N, C, H, W) as nn.BatchNorm2d", fn, mgpu__shape_str(x));
    training = l->model->training;
    /* SyncBatchNorm (set by DDP): training statistics are reduced over the communicator */
    sync.reduce = mgpu__bn_reduce_over_comm; sync.user = l->sync_comm;
    y = mgpu__batch_norm(ctx, x, l->weight, l->bias, l->running_mean, l->running_var, training, l->momentum, l->eps,
                         training && l->sync_comm ? &sync : NULL);
    if (y && training && mgpu__batchnorm_count(l) != MGPU_OK) return NULL;
    return y;   // (N, C, H, W)
}

MGPU_API mgpu_layernorm *mgpu_layernorm_create(mgpu_model *m, const char *name, int64_t dim) {
    const char *fn = "mgpu_layernorm_create";
    mgpu__model_mark mk;
    mgpu_layernorm *l;
    if (!mgpu__layer_args_ok(m, name, fn)) return NULL;
    if (dim < 1) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s '%s': dim %lld must be >= 1", fn, name, (long long)dim);
    mk = mgpu__model_mark_now(m);
    l = (mgpu_layernorm *)mgpu__model_own(m, sizeof *l, "a layernorm layer");
    if (l) {
        l->weight = mgpu__layer_param(m, name, "weight", 1, &dim, 1.0, fn);
        l->bias = l->weight ? mgpu__layer_param(m, name, "bias", 1, &dim, 0.0, fn) : NULL;
    }
    if (!l || !l->bias) { mgpu__model_rollback(m, mk); return NULL; }
    l->model = m; l->dim = dim; l->eps = 1e-5f;
    return l;
}

MGPU_API mgpu_tensor *mgpu_layernorm_forward(mgpu_context *ctx, const mgpu_layernorm *l, mgpu_tensor *x) {
    if (!mgpu__layer_ok(l, "mgpu_layernorm_forward")) return NULL;
    return mgpu_op_layer_norm(ctx, x, l->weight, l->bias, l->eps);   // (..., C)
}

MGPU_API mgpu_embedding *mgpu_embedding_create(mgpu_model *m, const char *name, int64_t num_embeddings, int64_t dim) {
    const char *fn = "mgpu_embedding_create";
    mgpu__model_mark mk;
    mgpu_embedding *l;
    int64_t shape[2];
    if (!mgpu__layer_args_ok(m, name, fn)) return NULL;
    if (num_embeddings < 1 || dim < 1)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s '%s': num_embeddings %lld and dim %lld must be >= 1", fn, name,
                        (long long)num_embeddings, (long long)dim);
    shape[0] = num_embeddings; shape[1] = dim;   // (V, D)
    mk = mgpu__model_mark_now(m);
    l = (mgpu_embedding *)mgpu__model_own(m, sizeof *l, "an embedding layer");
    if (l) l->weight = mgpu__layer_param(m, name, "weight", 2, shape, 0.0, fn);
    if (!l || !l->weight || mgpu_init_normal(m->ctx, l->weight, 0.0f, 1.0f) != MGPU_OK) { mgpu__model_rollback(m, mk); return NULL; }
    l->model = m; l->num_embeddings = num_embeddings; l->dim = dim;
    return l;
}

MGPU_API mgpu_tensor *mgpu_embedding_forward(mgpu_context *ctx, const mgpu_embedding *l, mgpu_tensor *idx) {
    if (!mgpu__layer_ok(l, "mgpu_embedding_forward")) return NULL;
    return mgpu_op_embedding(ctx, l->weight, idx);   // (...) -> (..., D)
}

/* PyTorch accepts p in [0, 1] (p = 1 zeroes everything). */
static int mgpu__dropout_p_ok(float p, const char *fn) {
    if (!(p >= 0.0f && p <= 1.0f)) { mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: dropout probability %g must be in [0, 1]", fn, p); return 0; }
    return 1;
}

MGPU_API mgpu_dropout *mgpu_dropout_create(mgpu_model *m, float p) {
    mgpu_dropout *l;
    if (!m) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_dropout_create: model is NULL");
    if (!mgpu__dropout_p_ok(p, "mgpu_dropout_create")) return NULL;
    l = (mgpu_dropout *)mgpu__model_own(m, sizeof *l, "a dropout layer");
    if (!l) return NULL;
    l->model = m; l->p = p;
    return l;
}

MGPU_API mgpu_tensor *mgpu_dropout_forward(mgpu_context *ctx, const mgpu_dropout *l, mgpu_tensor *x) {
    if (!mgpu__layer_ok(l, "mgpu_dropout_forward")) return NULL;
    return mgpu_op_dropout(ctx, x, l->p, l->model->training);
}

MGPU_API mgpu_mha *mgpu_mha_create(mgpu_model *m, const char *name, int64_t embed_dim, int64_t num_heads) {
    const char *fn = "mgpu_mha_create";
    mgpu__model_mark mk;
    mgpu_mha *l;
    char *out_name = NULL;
    int64_t wshape[2], bshape = 3 * embed_dim;
    float bound;
    if (!mgpu__layer_args_ok(m, name, fn)) return NULL;
    if (embed_dim < 1 || num_heads < 1 || embed_dim % num_heads != 0)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s '%s': embed_dim %lld must be >= 1 and divisible by num_heads %lld", fn, name,
                        (long long)embed_dim, (long long)num_heads);
    wshape[0] = 3 * embed_dim; wshape[1] = embed_dim;   // (3E, E)
    bound = (float)sqrt(6.0 / (double)(embed_dim + 3 * embed_dim));   /* xavier_uniform_: fan_in E, fan_out 3E */
    mk = mgpu__model_mark_now(m);
    l = (mgpu_mha *)mgpu__model_own(m, sizeof *l, "a multi-head attention layer");
    if (l) l->in_proj_weight = mgpu__layer_param(m, name, "in_proj_weight", 2, wshape, 0.0, fn);
    if (l && l->in_proj_weight && mgpu_init_uniform(m->ctx, l->in_proj_weight, -bound, bound) == MGPU_OK) {
        l->in_proj_bias = mgpu__layer_param(m, name, "in_proj_bias", 1, &bshape, 0.0, fn);
        out_name = l->in_proj_bias ? mgpu__join_name(name, "out_proj") : NULL;
        l->out_proj = out_name ? mgpu__linear_new(m, out_name, embed_dim, embed_dim, 1, fn) : NULL;
        mgpu_free(out_name);
    }
    if (!l || !l->out_proj) { mgpu__model_rollback(m, mk); return NULL; }
    mgpu_tensor_fill(l->out_proj->bias, 0.0);   /* MultiheadAttention._reset_parameters zeroes out_proj.bias */
    l->model = m; l->embed_dim = embed_dim; l->num_heads = num_heads;
    return l;
}

/* (B, T, E) slice [start, start + E) of the packed projection -> (B, H, T, Dh) */
static mgpu_tensor *mgpu__mha_heads(mgpu_context *ctx, mgpu_tensor *qkv, int64_t start, const mgpu_mha *l) {
    int64_t shape[4];
    mgpu_tensor *part = mgpu_op_narrow(ctx, qkv, 2, start, l->embed_dim);   // (B, T, E)
    if (!part) return NULL;
    shape[0] = qkv->shape[0]; shape[1] = qkv->shape[1]; shape[2] = l->num_heads; shape[3] = l->embed_dim / l->num_heads;
    return mgpu_op_transpose(ctx, mgpu_op_reshape(ctx, part, 4, shape), 1, 2);   // (B, T, H, Dh) -> (B, H, T, Dh)
}

MGPU_API mgpu_tensor *mgpu_mha_forward(mgpu_context *ctx, const mgpu_mha *l, mgpu_tensor *x, int causal) {
    const char *fn = "mgpu_mha_forward";
    mgpu_tensor *qkv, *q, *k, *v, *y;
    int64_t shape[3];
    if (!mgpu__layer_ok(l, fn) || !mgpu__check_input(ctx, fn, "x", x, 1)) return NULL;
    if (x->ndim != 3 || x->shape[2] != l->embed_dim)
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "%s: x is %s, expected (B, T, %lld) (batch_first)", fn, mgpu__shape_str(x), (long long)l->embed_dim);
    qkv = mgpu_op_linear(ctx, x, l->in_proj_weight, l->in_proj_bias);   // (B, T, 3E)
    if (!qkv) return NULL;
    q = mgpu__mha_heads(ctx, qkv, 0, l);
    k = mgpu__mha_heads(ctx, qkv, l->embed_dim, l);
    v = mgpu__mha_heads(ctx, qkv, 2 * l->embed_dim, l);
    y = mgpu_op_transpose(ctx, mgpu_op_attention(ctx, q, k, v, causal), 1, 2);   // (B, H, T, Dh) -> (B, T, H, Dh)
    shape[0] = x->shape[0]; shape[1] = x->shape[1]; shape[2] = l->embed_dim;
    return mgpu_linear_forward(ctx, l->out_proj, mgpu_op_reshape(ctx, y, 3, shape));   // (B, T, E)
}

MGPU_API mgpu_transformer_layer *mgpu_transformer_layer_create(mgpu_model *m, const char *name, int64_t d_model, int64_t nhead,
                                                               int64_t dim_feedforward, float dropout, int norm_first) {
    const char *fn = "mgpu_transformer_layer_create";
    /* submodules in nn.TransformerEncoderLayer's registration order, which fixes the state_dict order */
    static const char *const subs[] = {"self_attn", "linear1", "linear2", "norm1", "norm2"};
    char *names[5] = {NULL, NULL, NULL, NULL, NULL};
    mgpu__model_mark mk;
    mgpu_transformer_layer *l;
    int i, ok = 1;
    if (!mgpu__layer_args_ok(m, name, fn) || !mgpu__dropout_p_ok(dropout, fn)) return NULL;
    if (d_model < 1 || nhead < 1 || d_model % nhead != 0 || dim_feedforward < 1)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s '%s': d_model %lld must be >= 1 and divisible by nhead %lld, dim_feedforward %lld >= 1",
                        fn, name, (long long)d_model, (long long)nhead, (long long)dim_feedforward);
    mk = mgpu__model_mark_now(m);
    l = (mgpu_transformer_layer *)mgpu__model_own(m, sizeof *l, "a transformer layer");
    for (i = 0; i < 5 && l && ok; i++) ok = (names[i] = mgpu__join_name(name, subs[i])) != NULL;
    if (l && ok) {
        l->self_attn = mgpu_mha_create(m, names[0], d_model, nhead);
        l->linear1 = l->self_attn ? mgpu__linear_new(m, names[1], d_model, dim_feedforward, 1, fn) : NULL;
        l->linear2 = l->linear1 ? mgpu__linear_new(m, names[2], dim_feedforward, d_model, 1, fn) : NULL;
        l->norm1 = l->linear2 ? mgpu_layernorm_create(m, names[3], d_model) : NULL;
        l->norm2 = l->norm1 ? mgpu_layernorm_create(m, names[4], d_model) : NULL;
    }
    for (i = 0; i < 5; i++) mgpu_free(names[i]);
    if (!l || !l->norm2) { mgpu__model_rollback(m, mk); return NULL; }
    l->model = m; l->dropout = dropout; l->norm_first = norm_first != 0;
    return l;
}

/* Dropout inside composite layers: skipped entirely at p = 0 so it costs nothing and draws no random numbers. */
static mgpu_tensor *mgpu__maybe_dropout(mgpu_context *ctx, mgpu_tensor *x, float p, int training) {
    return p > 0.0f ? mgpu_op_dropout(ctx, x, p, training) : x;
}

/* linear2(dropout(relu(linear1(x)))) */
static mgpu_tensor *mgpu__transformer_ff(mgpu_context *ctx, const mgpu_transformer_layer *l, mgpu_tensor *x) {
    mgpu_tensor *h = mgpu_op_relu(ctx, mgpu_linear_forward(ctx, l->linear1, x));   // (B, T, F)
    return mgpu_linear_forward(ctx, l->linear2, mgpu__maybe_dropout(ctx, h, l->dropout, l->model->training));   // (B, T, E)
}

MGPU_API mgpu_tensor *mgpu_transformer_layer_forward(mgpu_context *ctx, const mgpu_transformer_layer *l, mgpu_tensor *x, int causal) {
    int training;
    float p;
    if (!mgpu__layer_ok(l, "mgpu_transformer_layer_forward")) return NULL;
    training = l->model->training; p = l->dropout;
    if (l->norm_first) {
        // x = x + dropout1(sa(norm1(x))); x = x + dropout2(ff(norm2(x)))
        x = mgpu_op_add(ctx, x, mgpu__maybe_dropout(ctx, mgpu_mha_forward(ctx, l->self_attn, mgpu_layernorm_forward(ctx, l->norm1, x), causal), p, training));
        return mgpu_op_add(ctx, x, mgpu__maybe_dropout(ctx, mgpu__transformer_ff(ctx, l, mgpu_layernorm_forward(ctx, l->norm2, x)), p, training));
    }
    // x = norm1(x + dropout1(sa(x))); x = norm2(x + dropout2(ff(x)))
    x = mgpu_layernorm_forward(ctx, l->norm1, mgpu_op_add(ctx, x, mgpu__maybe_dropout(ctx, mgpu_mha_forward(ctx, l->self_attn, x, causal), p, training)));
    return mgpu_layernorm_forward(ctx, l->norm2, mgpu_op_add(ctx, x, mgpu__maybe_dropout(ctx, mgpu__transformer_ff(ctx, l, x), p, training)));
}

/* --------------------------------------------------------------------------------------
   Optimizers: torch.optim.SGD / Adam / AdamW (single-tensor path, maximize=False, amsgrad=False)
   -------------------------------------------------------------------------------------- */

/* Elementwise updates split across threads above this many elements (results do not depend on the split). */
#define MGPU__OPT_CHUNK 32768

/* --- multi-tensor CPU twins: each tensor of the list in turn, split over the thread pool --- */

/* What a range function of a multi-tensor CPU twin sees: the twin's arguments and the tensor. */
typedef struct mgpu__list_job { const void *args; int t; } mgpu__list_job;

static void mgpu__cpu_for_each_tensor(mgpu_context *ctx, const mgpu__tensor_list *list, int64_t min_chunk, mgpu_range_fn fn,
                                      const void *args) {
    mgpu__list_job j;
    j.args = args;
    for (j.t = 0; j.t < list->count; j.t++) mgpu_parallel_for(ctx, list->numel[j.t], min_chunk, fn, &j);
}

/* The grads of m's parameters that have one, as the host arrays a multi-tensor twin reads;
   release with mgpu__grad_list_free. */
static mgpu_result mgpu__grad_list_make(const mgpu_model *m, mgpu__tensor_list *list) {
    int i, n = 0;
    float **data = (float **)mgpu__alloc((sizeof(float *) + sizeof(int64_t)) * (size_t)(m->params.count + 1), "the gradient list");
    int64_t *numel;
    if (!data) return mgpu_last_result();
    numel = (int64_t *)(data + m->params.count + 1);
    for (i = 0; i < m->params.count; i++) {
        const mgpu_tensor *g = m->params.items[i].tensor->grad;
        if (!g) continue;
        data[n] = (float *)g->data; numel[n] = g->numel;
        n++;
    }
    list->count = n; list->data = data; list->numel = numel;
    return MGPU_OK;
}
static void mgpu__grad_list_free(mgpu__tensor_list *list) { mgpu_free((void *)list->data); }

typedef struct mgpu__opt_param {
    mgpu_tensor *param;
    mgpu_tensor *exp_avg, *exp_avg_sq;   /* Adam/AdamW */
    mgpu_tensor *momentum_buffer;        /* SGD with momentum != 0 */
    int64_t steps;                       /* updates this parameter has had (PyTorch's per-parameter state["step"]) */
    int due;                             /* still to be updated in the current step */
} mgpu__opt_param;

/* Host arrays (an entry per parameter) that the multi-tensor twins read, refilled for each call:
   one block, params first, which mgpu_free releases. */
typedef struct mgpu__opt_lists {
    float **params, **state1, **state2;  /* state: momentum buffers (SGD) or exp_avg, exp_avg_sq */
    const float **grads;
    int64_t *numel;
} mgpu__opt_lists;

struct mgpu_optimizer {
    mgpu_model *model;
    mgpu_optimizer_desc desc;
    mgpu__opt_param *params; int n_params;
    mgpu__named *states; int n_states;   /* the state tensors under their checkpoint names (owned here) */
    mgpu__opt_lists lists;
    int64_t step_count;
};

MGPU_API mgpu_optimizer_desc mgpu_optimizer_desc_default(mgpu_optimizer_type type) {
    mgpu_optimizer_desc d;
    memset(&d, 0, sizeof d);
    if (type != MGPU_OPTIM_SGD && type != MGPU_OPTIM_ADAM && type != MGPU_OPTIM_ADAMW)
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_desc_default: type %d is not an mgpu_optimizer_type", (int)type);
    d.type = type;
    d.lr = 1e-3f;
    d.beta1 = 0.9f; d.beta2 = 0.999f; d.eps = 1e-8f;
    d.weight_decay = type == MGPU_OPTIM_ADAMW ? 1e-2f : 0.0f;
    return d;
}

/* The checks torch.optim makes in its constructors, naming the field. */
static mgpu_result mgpu__optimizer_desc_check(const mgpu_optimizer_desc *d) {
    const char *fn = "mgpu_optimizer_create";
    if (d->type != MGPU_OPTIM_SGD && d->type != MGPU_OPTIM_ADAM && d->type != MGPU_OPTIM_ADAMW)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->type %d is not an mgpu_optimizer_type", fn, (int)d->type);
    if (!(d->lr >= 0.0f) || !isfinite(d->lr)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: invalid learning rate desc->lr = %g (must be >= 0)", fn, d->lr);
    if (!(d->weight_decay >= 0.0f) || !isfinite(d->weight_decay))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: invalid desc->weight_decay = %g (must be >= 0)", fn, d->weight_decay);
    if (d->type == MGPU_OPTIM_SGD) {
        if (!(d->momentum >= 0.0f) || !isfinite(d->momentum)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: invalid desc->momentum = %g (must be >= 0)", fn, d->momentum);
        if (!isfinite(d->dampening)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: invalid desc->dampening = %g", fn, d->dampening);
        if (d->nesterov && (d->momentum <= 0.0f || d->dampening != 0.0f))
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->nesterov requires desc->momentum > 0 and desc->dampening == 0 (got %g, %g)", fn,
                              d->momentum, d->dampening);
        return MGPU_OK;
    }
    if (!(d->eps >= 0.0f) || !isfinite(d->eps)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: invalid desc->eps = %g (must be >= 0)", fn, d->eps);
    if (!(d->beta1 >= 0.0f && d->beta1 < 1.0f)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: invalid desc->beta1 = %g (must be in [0, 1))", fn, d->beta1);
    if (!(d->beta2 >= 0.0f && d->beta2 < 1.0f)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: invalid desc->beta2 = %g (must be in [0, 1))", fn, d->beta2);
    return MGPU_OK;
}

/* A zeroed state tensor shaped like param i, registered as "<param>.<suffix>". */
static mgpu_tensor *mgpu__optimizer_add_state(mgpu_optimizer *o, int i, const char *suffix) {
    const char *pname = NULL;
    mgpu_tensor *p = mgpu_model_parameter(o->model, i, &pname);
    mgpu_tensor *t;
    char *name = mgpu__join_name(pname, suffix);
    if (!name) return NULL;
    t = mgpu_tensor_create(o->model->ctx, MGPU_F32, p->ndim, p->shape);
    if (!t) { mgpu_free(name); return NULL; }
    o->states[o->n_states].name = name;
    o->states[o->n_states].tensor = t;
    o->n_states++;
    return t;
}

MGPU_API void mgpu_optimizer_destroy(mgpu_optimizer *o) {
    int i;
    if (!o) return;
    for (i = 0; i < o->n_states; i++) { mgpu_tensor_free(o->states[i].tensor); mgpu_free(o->states[i].name); }
    mgpu_free(o->states);
    mgpu_free(o->params);
    mgpu_free(o->lists.params);
    mgpu_free(o);
}

static int mgpu__opt_lists_alloc(mgpu__opt_lists *l, int n) {
    float **block = (float **)mgpu__alloc((4 * sizeof(float *) + sizeof(int64_t)) * (size_t)n, "the optimizer's tensor lists");
    if (!block) return 0;
    l->params = block; l->state1 = block + n; l->state2 = block + 2 * n;
    l->grads = (const float **)(block + 3 * n);
    l->numel = (int64_t *)(block + 4 * n);
    return 1;
}

/* State is allocated up front (zeros) so a checkpoint can be loaded into it before the first step;
   per-parameter step counts tell whether a momentum buffer holds anything yet. */
MGPU_API mgpu_optimizer *mgpu_optimizer_create(mgpu_model *m, const mgpu_optimizer_desc *desc) {
    mgpu_optimizer *o;
    int i, n, per_param, ok = 1;
    if (!m || !desc) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_create: model and desc must not be NULL");
    if (mgpu__optimizer_desc_check(desc) != MGPU_OK) return NULL;
    n = m->params.count;
    if (n == 0) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_create: the model has no parameters");
    /* the multi-tensor twins update F32 parameters where they live: on the host, or in the
       context's device memory (states are created there too, so no update crosses devices) */
    for (i = 0; i < n; i++) {
        const mgpu_tensor *p = m->params.items[i].tensor;
        if (p->dtype != MGPU_F32 || !mgpu__same_device(p->device, m->ctx->device))
            MGPU__FAIL_NULL(MGPU_ERR_UNSUPPORTED, "mgpu_optimizer_create: parameter '%s' is %s on another device than the model's context; "
                            "optimizers update F32 parameters on the context's device", m->params.items[i].name, mgpu_dtype_name(p->dtype));
    }
    per_param = desc->type == MGPU_OPTIM_SGD ? (desc->momentum != 0.0f ? 1 : 0) : 2;
    o = (mgpu_optimizer *)mgpu__calloc(sizeof *o, "an optimizer");
    if (!o) return NULL;
    o->model = m; o->desc = *desc; o->n_params = n;
    o->params = (mgpu__opt_param *)mgpu__calloc(sizeof *o->params * (size_t)n, "the optimizer's parameter list");
    o->states = (mgpu__named *)mgpu__calloc(sizeof *o->states * (size_t)(n * per_param + 1), "the optimizer's state list");
    if (!o->params || !o->states || !mgpu__opt_lists_alloc(&o->lists, n)) { mgpu_optimizer_destroy(o); return NULL; }
    for (i = 0; i < n && ok; i++) {
        o->params[i].param = m->params.items[i].tensor;
        if (per_param == 2) {
            ok = (o->params[i].exp_avg = mgpu__optimizer_add_state(o, i, "exp_avg")) != NULL &&
                 (o->params[i].exp_avg_sq = mgpu__optimizer_add_state(o, i, "exp_avg_sq")) != NULL;
        } else if (per_param == 1) {
            ok = (o->params[i].momentum_buffer = mgpu__optimizer_add_state(o, i, "momentum_buffer")) != NULL;
        }
    }
    if (!ok) { mgpu_optimizer_destroy(o); return NULL; }
    return o;
}

static void mgpu__sgd_range(void *arg, int64_t begin, int64_t end) {
    const mgpu__list_job *j = (const mgpu__list_job *)arg;
    const mgpu__sgd_args *a = (const mgpu__sgd_args *)j->args;
    float *p = a->params.data[j->t], *buf = a->momentum_buffers ? a->momentum_buffers[j->t] : NULL;
    const float *g = a->grads[j->t];
    const float lr = a->lr, weight_decay = a->weight_decay, momentum = a->momentum, keep = a->keep;
    int64_t i;
    for (i = begin; i < end; i++) {
        float d = g[i] + weight_decay * p[i];
        if (buf) {
            float b = a->first ? d : momentum * buf[i] + keep * d;
            buf[i] = b;
            d = a->nesterov ? d + momentum * b : b;
        }
        p[i] -= lr * d;
    }
}
static void mgpu__cpu_sgd(const mgpu__sgd_args *a) { mgpu__cpu_for_each_tensor(a->ctx, &a->params, MGPU__OPT_CHUNK, mgpu__sgd_range, a); }

/* One pass per tensor reading p, g, m, v once. */
static void mgpu__adam_range(void *arg, int64_t begin, int64_t end) {
    const mgpu__list_job *j = (const mgpu__list_job *)arg;
    const mgpu__adam_args *a = (const mgpu__adam_args *)j->args;
    float *P = a->params.data[j->t], *M = a->exp_avg[j->t], *V = a->exp_avg_sq[j->t];
    const float *G = a->grads[j->t];
    const float decay = a->decay, l2 = a->l2, beta1 = a->beta1, beta2 = a->beta2, eps = a->eps;
    const float one_minus_beta1 = 1.0f - beta1, one_minus_beta2 = 1.0f - beta2, step_size = a->step_size, bc2_sqrt = a->bc2_sqrt;
    int64_t i;
    for (i = begin; i < end; i++) {
        float p = P[i];
        float g = G[i] + l2 * p;
        float m = beta1 * M[i] + one_minus_beta1 * g;
        float v = beta2 * V[i] + one_minus_beta2 * g * g;
        float denom = sqrtf(v) / bc2_sqrt + eps;
        M[i] = m; V[i] = v;
        P[i] = p * decay - step_size * m / denom;
    }
}
static void mgpu__cpu_adam(const mgpu__adam_args *a) { mgpu__cpu_for_each_tensor(a->ctx, &a->params, MGPU__OPT_CHUNK, mgpu__adam_range, a); }

/* The values of an update at step count t that change from step to step: SGD {lr, first},
   Adam/AdamW {decay, step_size, bc2_sqrt}. The twins take them by value in an eager step; a
   captured step reads them from step scalars that each replay fills with this function. */
static void mgpu__optimizer_step_values(const mgpu_optimizer *o, int64_t t, float v[3]) {
    const mgpu_optimizer_desc *d = &o->desc;
    if (d->type == MGPU_OPTIM_SGD) {
        v[0] = d->lr; v[1] = t == 1 ? 1.0f : 0.0f; v[2] = 0.0f;
        return;
    }
    v[0] = d->type == MGPU_OPTIM_ADAMW ? (float)(1.0 - (double)d->lr * d->weight_decay) : 1.0f;
    v[1] = (float)((double)d->lr / (1.0 - pow((double)d->beta1, (double)t)));
    v[2] = (float)sqrt(1.0 - pow((double)d->beta2, (double)t));
}

/* One twin call updates the first `count` parameters of the lists, all at step count t; step_at:
   the device address of the step values during a CUDA Graph capture, else NULL. */
static mgpu_result mgpu__optimizer_update(mgpu_optimizer *o, int count, int64_t t, const float *step_at) {
    const mgpu_optimizer_desc *d = &o->desc;
    mgpu_context *ctx = o->model->ctx;
    mgpu__tensor_list params;
    float v[3];
    mgpu__optimizer_step_values(o, t, v);
    memset(&params, 0, sizeof params);   /* copied with its padding into the twin's arguments */
    params.count = count; params.data = o->lists.params; params.numel = o->lists.numel;
    if (d->type == MGPU_OPTIM_SGD) {
        mgpu__sgd_args a;
        memset(&a, 0, sizeof a);   /* padding too: a kernel argument's bytes must not carry stack garbage */
        a.ctx = ctx; a.params = params; a.grads = o->lists.grads;
        a.momentum_buffers = d->momentum != 0.0f ? o->lists.state1 : NULL;
        a.lr = v[0]; a.weight_decay = d->weight_decay; a.momentum = d->momentum; a.keep = 1.0f - d->dampening;
        a.nesterov = d->nesterov; a.first = v[1] != 0.0f;
        a.step_at = step_at;
        return MGPU__TWIN(ctx, sgd, &a);
    } else {
        mgpu__adam_args a;
        int adamw = d->type == MGPU_OPTIM_ADAMW;
        /* padding too: the emulation's check of kernel arguments once read the high half of an old
           pointer left in the padding after bc2_sqrt as an address on another device */
        memset(&a, 0, sizeof a);
        a.ctx = ctx; a.params = params; a.grads = o->lists.grads;
        a.exp_avg = o->lists.state1; a.exp_avg_sq = o->lists.state2;
        a.decay = v[0];
        a.l2 = adamw ? 0.0f : d->weight_decay;
        a.beta1 = d->beta1; a.beta2 = d->beta2; a.eps = d->eps;
        a.step_size = v[1]; a.bc2_sqrt = v[2];
        a.step_at = step_at;
        return MGPU__TWIN(ctx, adam, &a);
    }
}

static float *mgpu__data_or_null(const mgpu_tensor *t) { return t ? (float *)t->data : NULL; }

/* Updates, in one twin call, every parameter still due whose step count becomes t (a capture
   leaves the step counts to the replay hook). */
static mgpu_result mgpu__optimizer_update_at(mgpu_optimizer *o, int64_t t, const float *step_at) {
    mgpu__opt_lists *l = &o->lists;
    int i, count = 0;
    for (i = 0; i < o->n_params; i++) {
        mgpu__opt_param *s = &o->params[i];
        if (!s->due || s->steps + 1 != t) continue;
        s->due = 0;
        if (!step_at) s->steps = t;
        l->params[count] = (float *)s->param->data; l->grads[count] = (const float *)s->param->grad->data;
        l->numel[count] = s->param->numel;
        l->state1[count] = mgpu__data_or_null(s->exp_avg ? s->exp_avg : s->momentum_buffer);
        l->state2[count] = mgpu__data_or_null(s->exp_avg_sq);
        count++;
    }
    return mgpu__optimizer_update(o, count, t, step_at);
}

/* Whether a parameter takes part in this step: like PyTorch, a parameter without a grad is skipped. */
static int mgpu__opt_has_grad(const mgpu__opt_param *s) { return s->param->requires_grad && s->param->grad != NULL; }

/* A captured step's replay hook: the step count of an eager step (every parameter had a grad at
   the capture and shares one count), its update values the step scalars (3 floats in 2 words). */
static mgpu_result mgpu__optimizer_replay(void *opt, int64_t unused, uint64_t *words) {
    mgpu_optimizer *o = (mgpu_optimizer *)opt;
    float v[4] = {0, 0, 0, 0};
    int i;
    (void)unused;
    mgpu__optimizer_step_values(o, o->params[0].steps + 1, v);
    memcpy(words, v, sizeof v);
    for (i = 0; i < o->n_params; i++) o->params[i].steps++;
    o->step_count++;
    return MGPU_OK;
}

/* mgpu_optimizer_step inside a CUDA Graph capture: one update of every parameter, its values from
   step scalars. Parameters without a grad or at different step counts (their updates would need
   several launches chosen on the host each step) are refused: the step then runs uncaptured. */
static mgpu_result mgpu__optimizer_step_captured(mgpu_optimizer *o) {
    void *at = NULL;
    mgpu_result r;
    int i;
    for (i = 0; i < o->n_params; i++) {
        if (!mgpu__opt_has_grad(&o->params[i]) || o->params[i].steps != o->params[0].steps)
            return mgpu__fail(MGPU_ERR_UNSUPPORTED, "CUDA Graph capture: parameter '%s' %s; the optimizer step needs every parameter "
                              "updated at one step count", o->model->params.items[i].name,
                              mgpu__opt_has_grad(&o->params[i]) ? "is at another step count" : "has no grad");
        o->params[i].due = 1;
    }
    if ((r = mgpu__step_scalar(o->model->ctx, mgpu__optimizer_replay, o, 0, 2, &at)) != MGPU_OK) return r;
    return mgpu__optimizer_update_at(o, o->params[0].steps + 1, (const float *)at);
}


/* A parameter skipped for want of a grad lags behind the others in step count (bias correction,
   momentum start), so each twin call covers the parameters that share one: normally all of them. */
MGPU_API mgpu_result mgpu_optimizer_step(mgpu_optimizer *o) {
    mgpu_result r;
    int i;
    if (!o) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_step: optimizer is NULL");
    /* validate every grad first so a bad one leaves all parameters untouched */
    for (i = 0; i < o->n_params; i++) {
        const mgpu__opt_param *s = &o->params[i];
        if (mgpu__opt_has_grad(s) && (s->param->grad->dtype != MGPU_F32 || s->param->grad->numel != s->param->numel))
            return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_optimizer_step: the grad of parameter '%s' is %s %s, expected F32 %s",
                              o->model->params.items[i].name, mgpu_dtype_name(s->param->grad->dtype), mgpu__shape_str(s->param->grad),
                              mgpu__shape_str(s->param));
    }
    if (mgpu__capturing(o->model->ctx)) return mgpu__optimizer_step_captured(o);
    for (i = 0; i < o->n_params; i++) o->params[i].due = mgpu__opt_has_grad(&o->params[i]);
    for (i = 0; i < o->n_params; i++)
        if (o->params[i].due && (r = mgpu__optimizer_update_at(o, o->params[i].steps + 1, NULL)) != MGPU_OK) return r;
    o->step_count++;
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_optimizer_zero_grad(mgpu_optimizer *o) {
    int i;
    if (!o) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_zero_grad: optimizer is NULL");
    for (i = 0; i < o->n_params; i++) mgpu_tensor_zero_grad(o->params[i].param);
    return MGPU_OK;
}

MGPU_API void mgpu_optimizer_set_lr(mgpu_optimizer *o, float lr) {
    if (!o) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_set_lr: optimizer is NULL"); return; }
    if (!(lr >= 0.0f) || !isfinite(lr)) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_set_lr: invalid learning rate %g (kept %g)", lr, o->desc.lr); return; }
    o->desc.lr = lr;
}
MGPU_API float mgpu_optimizer_lr(const mgpu_optimizer *o) { return o ? o->desc.lr : 0.0f; }
MGPU_API int64_t mgpu_optimizer_step_count(const mgpu_optimizer *o) { return o ? o->step_count : 0; }

/* For resuming: every parameter is taken to have had `steps` updates (bias correction, momentum start). */
MGPU_API void mgpu_optimizer_set_step_count(mgpu_optimizer *o, int64_t steps) {
    int i;
    if (!o || steps < 0) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_set_step_count: optimizer is NULL or steps %lld < 0", (long long)steps); return; }
    o->step_count = steps;
    for (i = 0; i < o->n_params; i++) o->params[i].steps = steps;
}

MGPU_API int mgpu_optimizer_num_states(const mgpu_optimizer *o) { return o ? o->n_states : 0; }
MGPU_API mgpu_tensor *mgpu_optimizer_state(const mgpu_optimizer *o, int i, const char **name) {
    if (!o) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_state: optimizer is NULL");
    if (i < 0 || i >= o->n_states) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_optimizer_state: index %d outside [0, %d)", i, o->n_states);
    if (name) *name = o->states[i].name;
    return o->states[i].tensor;
}

/* --------------------------------------------------------------------------------------
   Gradient clipping by global L2 norm (torch.nn.utils.clip_grad_norm_)
   -------------------------------------------------------------------------------------- */

/* Sums of squares over fixed 32768-element blocks, added in block order: the norm is the same
   bit for bit whatever the thread count. */
#define MGPU__NORM_BLOCK 32768
#define MGPU__NORM_GROUP 64   /* blocks per parallel call (partials live on the stack) */

typedef struct mgpu__sumsq_job { const float *x; int64_t n, first_block; double partial[MGPU__NORM_GROUP]; } mgpu__sumsq_job;

static void mgpu__sumsq_range(void *arg, int64_t begin, int64_t end) {
    mgpu__sumsq_job *j = (mgpu__sumsq_job *)arg;
    int64_t b, i;
    for (b = begin; b < end; b++) {
        int64_t lo = (j->first_block + b) * MGPU__NORM_BLOCK, hi = MGPU__MIN(lo + MGPU__NORM_BLOCK, j->n);
        double s = 0.0;
        for (i = lo; i < hi; i++) s += (double)j->x[i] * (double)j->x[i];
        j->partial[b] = s;
    }
}

static double mgpu__sum_squares(mgpu_context *ctx, const float *x, int64_t n) {
    mgpu__sumsq_job j;
    int64_t blocks = (n + MGPU__NORM_BLOCK - 1) / MGPU__NORM_BLOCK, b, k;
    double total = 0.0;
    j.x = x; j.n = n;
    for (b = 0; b < blocks; b += MGPU__NORM_GROUP) {
        int64_t nb = MGPU__MIN((int64_t)MGPU__NORM_GROUP, blocks - b);
        j.first_block = b;
        mgpu_parallel_for(ctx, nb, 1, mgpu__sumsq_range, &j);
        for (k = 0; k < nb; k++) total += j.partial[k];
    }
    return total;
}

typedef struct mgpu__scale_list_args { const mgpu__tensor_list *list; float s; } mgpu__scale_list_args;
static void mgpu__scale_range(void *arg, int64_t begin, int64_t end) {
    const mgpu__list_job *j = (const mgpu__list_job *)arg;
    const mgpu__scale_list_args *a = (const mgpu__scale_list_args *)j->args;
    float *x = a->list->data[j->t];
    const float s = a->s;
    int64_t i;
    for (i = begin; i < end; i++) x[i] *= s;
}

/* The norm is summed in double and the coefficient taken from it in double, then applied as f32. */
static void mgpu__cpu_clip_grad_norm(const mgpu__clip_grad_norm_args *a) {
    mgpu__scale_list_args scale;
    double sq = 0.0, norm, coef;
    int t;
    for (t = 0; t < a->grads.count; t++) sq += mgpu__sum_squares(a->ctx, a->grads.data[t], a->grads.numel[t]);
    norm = sqrt(sq);
    a->norm[0] = (float)norm;
    coef = (double)a->max_norm / (norm + 1e-6);
    if (!isfinite(norm) || coef >= 1.0) return;
    scale.list = &a->grads; scale.s = (float)coef;
    mgpu__cpu_for_each_tensor(a->ctx, &a->grads, MGPU__OPT_CHUNK, mgpu__scale_range, &scale);
}

/* A non-finite norm is reported as is and the grads are left alone (the step is normally skipped). */
MGPU_API mgpu_result mgpu_clip_grad_norm(mgpu_model *m, float max_norm, float *total_norm) {
    mgpu__clip_grad_norm_args a;
    mgpu_tensor *norm;
    mgpu_result r;
    void *scratch = NULL;
    int i;
    if (!m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_clip_grad_norm: model is NULL");
    if (!(max_norm >= 0.0f) || !isfinite(max_norm)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_clip_grad_norm: max_norm %g must be finite and >= 0", max_norm);
    for (i = 0; i < m->params.count; i++) {
        const mgpu_tensor *p = m->params.items[i].tensor, *g = p->grad;
        if (g && (g->dtype != MGPU_F32 || g->numel != p->numel || !mgpu__same_device(g->device, m->ctx->device)))
            return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_clip_grad_norm: the grad of parameter '%s' is %s %s, expected F32 %s on the model's device",
                              m->params.items[i].name, mgpu_dtype_name(g->dtype), mgpu__shape_str(g), mgpu__shape_str(p));
    }
    norm = mgpu__new_activation(m->ctx, MGPU_F32, 0, NULL);   /* on the device: read back only when asked for */
    if (!norm) return mgpu_last_result();
    if ((r = mgpu__grad_list_make(m, &a.grads)) != MGPU_OK) return r;
    a.ctx = m->ctx; a.max_norm = max_norm; a.norm = (float *)norm->data;
    r = mgpu__cuda_scratch(m->ctx, sizeof(double) * (size_t)MGPU__CLIP_SCRATCH_DOUBLES(a.grads.count), &scratch);
    a.scratch = (double *)scratch;
    if (r == MGPU_OK) r = MGPU__TWIN(m->ctx, clip_grad_norm, &a);
    mgpu__grad_list_free(&a.grads);
    /* the norm stays on the device and the twin applies the coefficient there: only a caller that
       asks for the norm pays a host sync */
    if (r == MGPU_OK && total_norm) *total_norm = (float)mgpu_tensor_item(norm);
    return r;
}

/* --------------------------------------------------------------------------------------
   Learning-rate schedules (pure functions of the step) and scaling rules
   -------------------------------------------------------------------------------------- */

static const double mgpu__pi = 3.14159265358979323846;

/* eta_min + (base - eta_min) * (1 + cos(pi * t / period)) / 2 */
static double mgpu__cosine_lr(double base, double eta_min, double t, double period) {
    return eta_min + (base - eta_min) * (1.0 + cos(mgpu__pi * t / period)) / 2.0;
}

/* CosineAnnealingWarmRestarts at integer step t: cycles of T_0, T_0*T_mult, T_0*T_mult^2, ... */
static double mgpu__cosine_restarts_lr(const mgpu_lr_schedule *s, int64_t t) {
    int64_t period = s->t_0;
    if (s->t_mult == 1) t %= period;
    else
        while (t >= period) {
            t -= period;
            if (period > INT64_MAX / s->t_mult) break;   /* the next cycle could not end within int64 */
            period *= s->t_mult;
        }
    return mgpu__cosine_lr(s->base_lr, s->eta_min, (double)t, (double)period);
}

/* LINEAR and COSINE decay over total_steps - warmup_steps and stay at eta_min afterwards. */
static double mgpu__decay_lr(const mgpu_lr_schedule *s, int64_t t) {
    int64_t span = s->total_steps - s->warmup_steps;
    if (t >= span) return s->eta_min;
    if (s->type == MGPU_SCHEDULE_LINEAR)
        return s->eta_min + ((double)s->base_lr - s->eta_min) * (1.0 - (double)t / (double)span);
    return mgpu__cosine_lr(s->base_lr, s->eta_min, (double)t, (double)span);
}

static mgpu_result mgpu__schedule_check(const mgpu_lr_schedule *s, int64_t step) {
    const char *fn = "mgpu_lr_at";
    if (!s) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: schedule is NULL", fn);
    if (step < 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: step %lld is negative", fn, (long long)step);
    if (s->warmup_steps < 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: warmup_steps %lld is negative", fn, (long long)s->warmup_steps);
    if (!isfinite(s->base_lr) || !isfinite(s->eta_min)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: base_lr %g and eta_min %g must be finite", fn, s->base_lr, s->eta_min);
    switch (s->type) {
    case MGPU_SCHEDULE_CONSTANT: case MGPU_SCHEDULE_LINEAR: case MGPU_SCHEDULE_COSINE: return MGPU_OK;
    case MGPU_SCHEDULE_COSINE_RESTARTS:
        if (s->t_0 < 1 || s->t_mult < 1)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: cosine restarts need t_0 >= 1 and t_mult >= 1 (got %lld, %lld)", fn, (long long)s->t_0, (long long)s->t_mult);
        return MGPU_OK;
    case MGPU_SCHEDULE_STEP:
        if (s->step_size < 1) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: step schedule needs step_size >= 1 (got %lld)", fn, (long long)s->step_size);
        return MGPU_OK;
    }
    return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: schedule type %d is not an mgpu_schedule_type", fn, (int)s->type);
}

/* An invalid schedule records an error and gives 0 (no update rather than a wild one). */
MGPU_API float mgpu_lr_at(const mgpu_lr_schedule *s, int64_t step) {
    int64_t t;
    if (mgpu__schedule_check(s, step) != MGPU_OK) return 0.0f;
    if (step < s->warmup_steps) return (float)((double)s->base_lr * (double)(step + 1) / (double)s->warmup_steps);
    t = step - s->warmup_steps;
    switch (s->type) {
    case MGPU_SCHEDULE_LINEAR: case MGPU_SCHEDULE_COSINE: return (float)mgpu__decay_lr(s, t);
    case MGPU_SCHEDULE_COSINE_RESTARTS: return (float)mgpu__cosine_restarts_lr(s, t);
    case MGPU_SCHEDULE_STEP: return (float)((double)s->base_lr * pow((double)s->gamma, (double)(t / s->step_size)));
    case MGPU_SCHEDULE_CONSTANT: break;
    }
    return s->base_lr;
}

MGPU_API mgpu_result mgpu_schedule_parse(const char *name, mgpu_schedule_type *out) {
    static const char *const names[] = {"constant", "linear", "cosine", "cosine-restarts", "step"};
    int i;
    if (!name || !out) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_schedule_parse: name and out must not be NULL");
    for (i = 0; i < 5; i++)
        if (strcmp(name, names[i]) == 0) { *out = (mgpu_schedule_type)i; return MGPU_OK; }
    return mgpu__fail(MGPU_ERR_INVALID_ARG, "schedule '%s': expected constant, linear, cosine, cosine-restarts or step", name);
}

/* An invalid world size, accumulation count or rule records an error and leaves lr unscaled. */
MGPU_API float mgpu_lr_scale(float lr, int world_size, int grad_accum_steps, mgpu_lr_scaling rule) {
    double k;
    if (world_size < 1 || grad_accum_steps < 1) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_lr_scale: world_size %d and grad_accum_steps %d must be >= 1", world_size, grad_accum_steps);
        return lr;
    }
    k = (double)world_size * (double)grad_accum_steps;
    switch (rule) {
    case MGPU_LR_SCALE_NONE: return lr;
    case MGPU_LR_SCALE_LINEAR: return (float)((double)lr * k);
    case MGPU_LR_SCALE_SQRT: return (float)((double)lr * sqrt(k));
    }
    mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_lr_scale: rule %d is not an mgpu_lr_scaling", (int)rule);
    return lr;
}
/* ======================================================================================
   Mixed precision: the loss scaler
   ====================================================================================== */

/* --------------------------------------------------------------------------------------
   Loss scaler (torch.cuda.amp.GradScaler)
   -------------------------------------------------------------------------------------- */

MGPU_API void mgpu_grad_scaler_init(mgpu_grad_scaler *s, int enabled) {
    if (!s) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_init: scaler is NULL"); return; }
    memset(s, 0, sizeof *s);
    s->enabled = enabled != 0;
    s->scale = s->enabled ? 65536.0f : 1.0f;
    s->growth_factor = 2.0f;
    s->backoff_factor = 0.5f;
    s->growth_interval = 2000;
}

MGPU_API mgpu_tensor *mgpu_grad_scaler_scale(mgpu_context *ctx, mgpu_grad_scaler *s, mgpu_tensor *loss) {
    if (!s) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_scale: scaler is NULL");
    if (!mgpu__check_input(ctx, "mgpu_grad_scaler_scale", "loss", loss, 1)) return NULL;
    return s->enabled ? mgpu_op_scale(ctx, loss, s->scale) : loss;
}

/* g *= inv over a range, raising found when an element is inf or NaN (checked before scaling, as PyTorch) */
static void mgpu__unscale_range(void *arg, int64_t begin, int64_t end) {
    const mgpu__list_job *j = (const mgpu__list_job *)arg;
    const mgpu__unscale_args *a = (const mgpu__unscale_args *)j->args;
    float *g = a->grads.data[j->t];
    const float inv = a->inv_scale;
    int64_t i;
    int bad = 0;
    for (i = begin; i < end; i++) {
        if (!isfinite(g[i])) bad = 1;
        g[i] *= inv;
    }
    /* a flag only ever set to 1, so the order the chunks finish in cannot change the outcome */
    if (bad) __atomic_store_n(a->found, 1, __ATOMIC_RELAXED);
}
static void mgpu__cpu_unscale(const mgpu__unscale_args *a) {
    a->found[0] = 0;
    mgpu__cpu_for_each_tensor(a->ctx, &a->grads, MGPU__AMP_PAR_MIN, mgpu__unscale_range, a);
}

/* Checks that every parameter gradient of m is an F32 tensor on the model's device. */
static mgpu_result mgpu__scaler_check_grads(const char *fn, mgpu_model *m) {
    int i, n = mgpu_model_num_parameters(m);
    for (i = 0; i < n; i++) {
        const char *name = NULL;
        mgpu_tensor *p = mgpu_model_parameter(m, i, &name);
        if (!p || !p->grad) continue;
        if (p->grad->dtype != MGPU_F32 || p->grad->numel != p->numel)
            return mgpu__fail(MGPU_ERR_SHAPE, "%s: the grad of parameter '%s' is %s %s, expected F32 %s", fn, name ? name : "?",
                              mgpu_dtype_name(p->grad->dtype), mgpu__shape_str(p->grad), mgpu__shape_str(p));
        if (!mgpu__same_device(p->grad->device, m->ctx->device))
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: the grad of parameter '%s' is on another device than the model's context", fn, name ? name : "?");
    }
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_grad_scaler_unscale(mgpu_grad_scaler *s, mgpu_model *m) {
    mgpu__unscale_args a;
    mgpu_tensor *found;
    mgpu_result r;
    if (!s || !m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_unscale: scaler and model must not be NULL");
    if (s->unscaled)
        return mgpu__fail(MGPU_ERR_STATE, "mgpu_grad_scaler_unscale: already called since the last mgpu_grad_scaler_update (the grads would be divided twice)");
    if (!s->enabled) { s->unscaled = 1; return MGPU_OK; }
    if (!(s->scale > 0.0f) || !isfinite(s->scale))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_unscale: scale %g must be positive and finite", (double)s->scale);
    if ((r = mgpu__scaler_check_grads("mgpu_grad_scaler_unscale", m)) != MGPU_OK) return r;
    /* The flag is computed on the device (the unscale twin checks and scales in one pass) and read
       back with ONE 4-byte copy per optimizer step, here, as PyTorch's GradScaler reads found_inf
       in scaler.step: the skip decision and the scale update are host logic, and the twins have no
       device-side skip. Only fp16 pays it; bf16 and fp32 have no scaler. */
    found = mgpu__new_activation(m->ctx, MGPU_I32, 0, NULL);
    if (!found) return mgpu_last_result();
    if ((r = mgpu__grad_list_make(m, &a.grads)) != MGPU_OK) return r;
    a.ctx = m->ctx; a.found = (int32_t *)found->data;
    a.inv_scale = (float)(1.0 / (double)s->scale);   /* as PyTorch: reciprocal in double, applied as f32 */
    r = MGPU__TWIN(m->ctx, unscale, &a);
    mgpu__grad_list_free(&a.grads);
    if (r != MGPU_OK) return r;
    s->found_inf = mgpu_tensor_item(found) != 0.0;
    s->unscaled = 1;
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_grad_scaler_step(mgpu_grad_scaler *s, mgpu_optimizer *o, mgpu_model *m, int *stepped) {
    mgpu_result r;
    if (stepped) *stepped = 0;
    if (!s || !o || !m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_step: scaler, optimizer and model must not be NULL");
    if (o->model != m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_step: the optimizer was created for another model");
    if (!s->unscaled && (r = mgpu_grad_scaler_unscale(s, m)) != MGPU_OK) return r;
    if (s->enabled && s->found_inf) return MGPU_OK;   /* skipped: parameters and step count untouched */
    if ((r = mgpu_optimizer_step(o)) != MGPU_OK) return r;
    if (stepped) *stepped = 1;
    return MGPU_OK;
}

MGPU_API void mgpu_grad_scaler_update(mgpu_grad_scaler *s) {
    if (!s) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_update: scaler is NULL"); return; }
    /* without an inf check since the last update there is nothing to learn from: keep the scale */
    if (s->enabled && s->unscaled) {
        if (s->found_inf) {
            s->scale *= s->backoff_factor;
            s->growth_tracker = 0;
        } else if (++s->growth_tracker >= s->growth_interval) {
            float grown = s->scale * s->growth_factor;
            if (isfinite(grown)) s->scale = grown;   /* as PyTorch: never grow into inf */
            s->growth_tracker = 0;
        }
    }
    s->found_inf = 0;
    s->unscaled = 0;
}
/* ======================================================================================
   Data
   ====================================================================================== */

/* --------------------------------------------------------------------------------------
   Datasets held in memory. Both the array dataset and the IDX dataset keep one block per
   side (x, y) and differ only in how get() turns a stored sample into the output layout.
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__mem_dataset {
    void *x_block, *y_block;     /* owned allocations (for IDX: the whole file contents) */
    const uint8_t *x, *y;        /* sample 0 inside the blocks */
    size_t x_stride, y_stride;   /* stored bytes per sample */
} mgpu__mem_dataset;

MGPU_API void mgpu_dataset_destroy(mgpu_dataset *ds) {
    if (ds && ds->destroy) ds->destroy(ds);
}

static void mgpu__mem_dataset_destroy(mgpu_dataset *ds) {
    mgpu__mem_dataset *m = (mgpu__mem_dataset *)ds->impl;
    if (m) { mgpu_free(m->x_block); mgpu_free(m->y_block); mgpu_free(m); }
    mgpu_free(ds);
}

/* Shared argument check of the in-memory get() functions. */
static mgpu_result mgpu__mem_dataset_check(const mgpu_dataset *ds, int64_t index, const void *x_out, const void *y_out) {
    if (!ds || !x_out || !y_out) return mgpu__fail(MGPU_ERR_INVALID_ARG, "dataset get: ds, x_out and y_out must not be NULL");
    if (index < 0 || index >= ds->length)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "dataset get: index %lld outside [0, %lld)", (long long)index, (long long)ds->length);
    return MGPU_OK;
}

static mgpu_result mgpu__array_dataset_get(const mgpu_dataset *ds, int64_t index, void *x_out, void *y_out) {
    const mgpu__mem_dataset *m;
    mgpu_result r = mgpu__mem_dataset_check(ds, index, x_out, y_out);
    if (r != MGPU_OK) return r;
    m = (const mgpu__mem_dataset *)ds->impl;
    memcpy(x_out, m->x + (size_t)index * m->x_stride, m->x_stride);
    memcpy(y_out, m->y + (size_t)index * m->y_stride, m->y_stride);
    return MGPU_OK;
}

/* IDX images are kept as u8; a sample becomes F32 in [0, 1] (as torchvision's ToTensor: x / 255)
   and its label an I64. */
static mgpu_result mgpu__idx_dataset_get(const mgpu_dataset *ds, int64_t index, void *x_out, void *y_out) {
    const mgpu__mem_dataset *m;
    const uint8_t *px;
    float *dst = (float *)x_out;
    size_t i;
    mgpu_result r = mgpu__mem_dataset_check(ds, index, x_out, y_out);
    if (r != MGPU_OK) return r;
    m = (const mgpu__mem_dataset *)ds->impl;
    px = m->x + (size_t)index * m->x_stride;
    for (i = 0; i < m->x_stride; i++) dst[i] = (float)px[i] / 255.0f;
    *(int64_t *)y_out = (int64_t)m->y[index];
    return MGPU_OK;
}

/* Per-sample element count of a shape, or -1 with an error naming fn and which side. */
static int64_t mgpu__sample_numel(const char *fn, const char *side, int ndim, const int64_t *shape) {
    char what[96];
    snprintf(what, sizeof what, "%s: %s", fn, side);
    return mgpu__shape_numel(ndim, shape, what);
}

/* A dataset header with an (empty) mgpu__mem_dataset behind it. */
static mgpu_dataset *mgpu__mem_dataset_new(const char *fn, int64_t n, mgpu_dtype x_dtype, int x_ndim, const int64_t *x_shape,
                                           mgpu_dtype y_dtype, int y_ndim, const int64_t *y_shape) {
    mgpu_dataset *ds;
    mgpu__mem_dataset *m;
    if (n < 0) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: n is %lld, must be >= 0", fn, (long long)n);
    if (!mgpu__dtype_valid(x_dtype) || !mgpu__dtype_valid(y_dtype))
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: x_dtype %d or y_dtype %d is not a valid mgpu_dtype", fn, (int)x_dtype, (int)y_dtype);
    if (mgpu__sample_numel(fn, "x_shape", x_ndim, x_shape) < 0 || mgpu__sample_numel(fn, "y_shape", y_ndim, y_shape) < 0) return NULL;
    ds = (mgpu_dataset *)mgpu__calloc(sizeof *ds, "a dataset");
    m = (mgpu__mem_dataset *)mgpu__calloc(sizeof *m, "a dataset");
    if (!ds || !m) { mgpu_free(ds); mgpu_free(m); return NULL; }
    ds->length = n;
    ds->x_dtype = x_dtype; ds->x_ndim = x_ndim;
    if (x_ndim) memcpy(ds->x_shape, x_shape, sizeof(int64_t) * (size_t)x_ndim);
    ds->y_dtype = y_dtype; ds->y_ndim = y_ndim;
    if (y_ndim) memcpy(ds->y_shape, y_shape, sizeof(int64_t) * (size_t)y_ndim);
    ds->destroy = mgpu__mem_dataset_destroy;
    ds->impl = m;
    ds->static_samples = 1;   /* get() decodes stored bytes: the same sample every time */
    return ds;
}

/* Bytes of n samples of numel elements of size esize, or 0 with *ok = 0 on overflow. */
static size_t mgpu__bytes_of(int64_t n, int64_t numel, size_t esize, int *ok) {
    uint64_t per = (uint64_t)numel * esize; /* a validated shape keeps this far below 2^63 */
    *ok = 1;
    if (per && (uint64_t)n > (uint64_t)SIZE_MAX / per) { *ok = 0; return 0; }
    return (size_t)((uint64_t)n * per);
}

/* Copy of n samples for one side of an array dataset. */
static void *mgpu__copy_samples(const char *side, int64_t n, mgpu_dtype dt, int ndim, const int64_t *shape, const void *src, size_t *stride) {
    int ok;
    size_t total = mgpu__bytes_of(n, mgpu__shape_numel(ndim, shape, side), mgpu_dtype_size(dt), &ok);
    void *block;
    if (!ok) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dataset_from_arrays: %s holds more bytes than fit in memory", side); return NULL; }
    if (total && !src) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dataset_from_arrays: %s is NULL", side); return NULL; }
    *stride = n ? total / (size_t)n : 0;
    block = mgpu__alloc(total, "a dataset's arrays");
    if (block && total) memcpy(block, src, total);
    return block;
}

MGPU_API mgpu_dataset *mgpu_dataset_from_arrays(int64_t n, mgpu_dtype x_dtype, int x_ndim, const int64_t *x_shape, const void *x,
                                                mgpu_dtype y_dtype, int y_ndim, const int64_t *y_shape, const void *y) {
    mgpu_dataset *ds = mgpu__mem_dataset_new("mgpu_dataset_from_arrays", n, x_dtype, x_ndim, x_shape, y_dtype, y_ndim, y_shape);
    mgpu__mem_dataset *m;
    if (!ds) return NULL;
    m = (mgpu__mem_dataset *)ds->impl;
    m->x_block = mgpu__copy_samples("x", n, x_dtype, x_ndim, x_shape, x, &m->x_stride);
    m->y_block = m->x_block ? mgpu__copy_samples("y", n, y_dtype, y_ndim, y_shape, y, &m->y_stride) : NULL;
    if (!m->x_block || !m->y_block) { mgpu__mem_dataset_destroy(ds); return NULL; }
    m->x = (const uint8_t *)m->x_block;
    m->y = (const uint8_t *)m->y_block;
    ds->get = mgpu__array_dataset_get;
    return ds;
}

/* --------------------------------------------------------------------------------------
   IDX files (the MNIST format): bytes 0 0 TYPE NDIM, NDIM big-endian u32 dims, then the
   data, big-endian, row-major.
   -------------------------------------------------------------------------------------- */

/* Element size of an IDX type code, 0 if unknown. */
static size_t mgpu__idx_elem_size(int type_code) {
    switch (type_code) {
    case 0x08: case 0x09: return 1;  /* u8, i8 */
    case 0x0B: return 2;             /* i16 */
    case 0x0C: case 0x0D: return 4;  /* i32, f32 */
    case 0x0E: return 8;             /* f64 */
    }
    return 0;
}

MGPU_API mgpu_result mgpu_idx_parse(const void *bytes, size_t len, const char *label, mgpu_idx *out) {
    const uint8_t *p = (const uint8_t *)bytes;
    size_t esize, header, actual;
    uint64_t count = 1, limit;
    int64_t dims[MGPU_MAX_DIMS];
    int i, ndim, zero_dim = 0;
    if (!label) label = "IDX data";
    if (!out) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_idx_parse: out is NULL (parsing %s)", label);
    memset(out, 0, sizeof *out);
    if (!p && len) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_idx_parse: bytes is NULL with len %zu (parsing %s)", len, label);
    if (len < 4) return mgpu__fail(MGPU_ERR_FORMAT, "%s: not an IDX file: %zu bytes, shorter than the 4-byte magic", label, len);
    if (p[0] != 0 || p[1] != 0)
        return mgpu__fail(MGPU_ERR_FORMAT, "%s: not an IDX file: magic starts with 0x%02x 0x%02x, expected 0x00 0x00 (a gzip file starts with 0x1f 0x8b)",
                          label, p[0], p[1]);
    esize = mgpu__idx_elem_size(p[2]);
    if (!esize) return mgpu__fail(MGPU_ERR_FORMAT, "%s: unknown IDX type code 0x%02x (expected 0x08, 0x09, 0x0B, 0x0C, 0x0D or 0x0E)", label, p[2]);
    ndim = p[3];
    if (ndim < 1 || ndim > MGPU_MAX_DIMS)
        return mgpu__fail(MGPU_ERR_FORMAT, "%s: IDX header has %d dimensions, expected 1 to %d", label, ndim, MGPU_MAX_DIMS);
    header = 4 + 4 * (size_t)ndim;
    if (len < header)
        return mgpu__fail(MGPU_ERR_FORMAT, "%s: IDX header truncated: %d dimensions need %zu header bytes, file has %zu", label, ndim, header, len);
    /* every element must be addressable in a size_t and countable in an int64 */
    limit = (uint64_t)(SIZE_MAX < (uint64_t)INT64_MAX ? SIZE_MAX : (uint64_t)INT64_MAX) / esize;
    for (i = 0; i < ndim; i++) {
        const uint8_t *d = p + 4 + 4 * i;
        dims[i] = (int64_t)(((uint32_t)d[0] << 24) | ((uint32_t)d[1] << 16) | ((uint32_t)d[2] << 8) | (uint32_t)d[3]);
        if (dims[i] == 0) zero_dim = 1;
    }
    for (i = 0; i < ndim && !zero_dim; i++) {
        if (count > limit / (uint64_t)dims[i])
            return mgpu__fail(MGPU_ERR_FORMAT, "%s: IDX dimensions are too large (their product overflows)", label);
        count *= (uint64_t)dims[i];
    }
    if (zero_dim) count = 0;
    actual = len - header;
    if (actual != count * esize) {
        char shape[160];
        mgpu_shape_string(ndim, dims, shape, sizeof shape);
        return mgpu__fail(MGPU_ERR_FORMAT, "%s: IDX data is %s: the header %s needs %llu data bytes, the file has %zu", label,
                          actual < count * esize ? "truncated" : "too long (trailing bytes)", shape,
                          (unsigned long long)(count * esize), actual);
    }
    out->type_code = p[2];
    out->ndim = ndim;
    memcpy(out->dims, dims, sizeof(int64_t) * (size_t)ndim);
    out->data = p + header;
    out->data_bytes = actual;
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   Reading files, plain or gzip (through `gzip -dc`, so the header needs no zlib).
   -------------------------------------------------------------------------------------- */

static int mgpu__ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

static int mgpu__is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && !S_ISDIR(st.st_mode);
}

/* The rest of a stream into a new buffer (free with mgpu_free); size_hint avoids regrowing. */
static mgpu_result mgpu__read_stream(FILE *f, const char *path, size_t size_hint, uint8_t **data, size_t *len) {
    size_t cap = MGPU__MAX(size_hint + 1, (size_t)4096), n = 0;
    uint8_t *buf = (uint8_t *)mgpu__alloc(cap, path);
    *data = NULL; *len = 0;
    if (!buf) return MGPU_ERR_OOM_HOST;
    for (;;) {
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (n < cap) break;
        {   /* full: double (no realloc hook in the allocator, so copy) */
            uint8_t *bigger = cap > SIZE_MAX / 2 ? NULL : (uint8_t *)mgpu__alloc(2 * cap, path);
            if (!bigger) { mgpu_free(buf); return MGPU_ERR_OOM_HOST; }
            memcpy(bigger, buf, n);
            mgpu_free(buf);
            buf = bigger; cap *= 2;
        }
    }
    if (ferror(f)) { mgpu_free(buf); return mgpu__fail(MGPU_ERR_IO, "cannot read '%s': %s", path, strerror(errno)); }
    *data = buf; *len = n;
    return MGPU_OK;
}

/* 'path' quoted for /bin/sh (a ' becomes '\''). */
static char *mgpu__shell_quote(const char *s) {
    size_t n = strlen(s), i, j = 0;
    char *q = (char *)mgpu__alloc(4 * n + 3, "a shell command");
    if (!q) return NULL;
    q[j++] = '\'';
    for (i = 0; i < n; i++) {
        if (s[i] == '\'') { memcpy(q + j, "'\\''", 4); j += 4; }
        else q[j++] = s[i];
    }
    q[j++] = '\'';
    q[j] = 0;
    return q;
}

/* gzip's trailer holds the uncompressed size mod 2^32: a good first buffer size. */
static size_t mgpu__gzip_size_hint(FILE *f) {
    uint8_t t[4];
    if (fseek(f, -4, SEEK_END) != 0 || fread(t, 1, 4, f) != 4) return 0;
    return (size_t)t[0] | ((size_t)t[1] << 8) | ((size_t)t[2] << 16) | ((size_t)t[3] << 24);
}

static mgpu_result mgpu__read_gzip(const char *path, size_t size_hint, uint8_t **data, size_t *len) {
    char *quoted = mgpu__shell_quote(path), *cmd;
    FILE *p;
    mgpu_result r;
    int status;
    if (!quoted) return MGPU_ERR_OOM_HOST;
    cmd = (char *)mgpu__alloc(strlen(quoted) + 32, "a shell command");
    if (!cmd) { mgpu_free(quoted); return MGPU_ERR_OOM_HOST; }
    /* our own message says what went wrong, so gzip's stderr is not needed */
    sprintf(cmd, "gzip -dc -- %s 2>/dev/null", quoted);
    mgpu_free(quoted);
    p = popen(cmd, "r");
    mgpu_free(cmd);
    if (!p) return mgpu__fail(MGPU_ERR_IO, "cannot run `gzip -dc` to decompress '%s': %s", path, strerror(errno));
    r = mgpu__read_stream(p, path, size_hint, data, len);
    status = pclose(p);
    if (r == MGPU_OK && !(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
        mgpu_free(*data); *data = NULL; *len = 0;
        return mgpu__fail(MGPU_ERR_IO, "`gzip -dc '%s'` failed (status %d): the file is not a complete gzip file, or gzip is not installed",
                          path, status);
    }
    return r;
}

/* A whole file in memory; gzip files (name ends in .gz, or magic 1f 8b) come out decompressed. */
static mgpu_result mgpu__read_maybe_gzip(const char *path, uint8_t **data, size_t *len) {
    FILE *f = fopen(path, "rb");
    uint8_t magic[2] = {0, 0};
    size_t got, hint;
    struct stat st;
    mgpu_result r;
    *data = NULL; *len = 0;
    if (!f) return mgpu__fail(MGPU_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    got = fread(magic, 1, 2, f);
    if (mgpu__ends_with(path, ".gz") || (got == 2 && magic[0] == 0x1f && magic[1] == 0x8b)) {
        hint = mgpu__gzip_size_hint(f);
        fclose(f);
        return mgpu__read_gzip(path, hint, data, len);
    }
    hint = fstat(fileno(f), &st) == 0 && st.st_size > 0 ? (size_t)st.st_size : 0;
    rewind(f);
    r = mgpu__read_stream(f, path, hint, data, len);
    fclose(f);
    return r;
}

/* path if it exists, else path.gz if that exists (written into buf); NULL if neither. */
static const char *mgpu__plain_or_gz(const char *path, char *buf, size_t size) {
    if (mgpu__is_file(path)) return path;
    if ((size_t)snprintf(buf, size, "%s.gz", path) < size && mgpu__is_file(buf)) return buf;
    return NULL;
}

/* One IDX file of u8 with the wanted ndim: file contents in *block, parsed view in *idx. */
static mgpu_result mgpu__idx_load_u8(const char *path, const char *what, int want_ndim, void **block, mgpu_idx *idx) {
    char gz[4096];
    const char *actual = mgpu__plain_or_gz(path, gz, sizeof gz);
    uint8_t *data;
    size_t len;
    mgpu_result r;
    *block = NULL;
    if (!actual)
        return mgpu__fail(MGPU_ERR_IO, "mgpu_dataset_idx_open: %s file '%s' not found (nor '%s.gz'); expected an IDX file such as %s(.gz); "
                          "run `make data` to fetch Fashion-MNIST", what, path, path,
                          want_ndim == 3 ? "train-images-idx3-ubyte" : "train-labels-idx1-ubyte");
    r = mgpu__read_maybe_gzip(actual, &data, &len);
    if (r != MGPU_OK) return r;
    r = mgpu_idx_parse(data, len, actual, idx);
    if (r == MGPU_OK && (idx->type_code != 0x08 || idx->ndim != want_ndim))
        r = mgpu__fail(MGPU_ERR_FORMAT, "%s: expected %s as IDX u8 (type 0x08) with %d dimensions, got type 0x%02x with %d",
                       actual, what, want_ndim, idx->type_code, idx->ndim);
    if (r != MGPU_OK) { mgpu_free(data); return r; }
    *block = data;
    return MGPU_OK;
}

MGPU_API mgpu_dataset *mgpu_dataset_idx_open(const char *images_path, const char *labels_path) {
    mgpu_idx img, lab;
    void *img_block = NULL, *lab_block = NULL;
    mgpu_dataset *ds;
    mgpu__mem_dataset *m;
    int64_t x_shape[3] = {1, 0, 0};
    if (!images_path || !labels_path || !*images_path || !*labels_path)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_dataset_idx_open: images_path and labels_path must be non-empty strings");
    if (mgpu__idx_load_u8(images_path, "images", 3, &img_block, &img) != MGPU_OK) return NULL;
    if (mgpu__idx_load_u8(labels_path, "labels", 1, &lab_block, &lab) != MGPU_OK) { mgpu_free(img_block); return NULL; }
    if (img.dims[0] != lab.dims[0]) {
        mgpu_free(img_block); mgpu_free(lab_block);
        MGPU__FAIL_NULL(MGPU_ERR_FORMAT, "mgpu_dataset_idx_open: images file '%s' holds %lld samples but labels file '%s' holds %lld",
                        images_path, (long long)img.dims[0], labels_path, (long long)lab.dims[0]);
    }
    x_shape[1] = img.dims[1]; x_shape[2] = img.dims[2];
    ds = mgpu__mem_dataset_new("mgpu_dataset_idx_open", img.dims[0], MGPU_F32, 3, x_shape, MGPU_I64, 0, NULL);
    if (!ds) { mgpu_free(img_block); mgpu_free(lab_block); return NULL; }
    m = (mgpu__mem_dataset *)ds->impl;
    m->x_block = img_block; m->y_block = lab_block;
    m->x = img.data; m->y = lab.data;
    m->x_stride = (size_t)(img.dims[1] * img.dims[2]);
    m->y_stride = 1;
    ds->get = mgpu__idx_dataset_get;
    return ds;
}

MGPU_API mgpu_dataset *mgpu_dataset_fashion_mnist(const char *dir, int train) {
    const char *dirs[3];
    const char *prefix = train ? "train" : "t10k";
    char images[4096], labels[4096], gz[4096], tried[1024];
    int n_dirs = 0, i;
    size_t pos = 0;
    if (dir && *dir) dirs[n_dirs++] = dir;
    else {
        const char *env = getenv("MGPU_DATA");
        if (env && *env) dirs[n_dirs++] = env;
        dirs[n_dirs++] = "data/fashion-mnist";
        dirs[n_dirs++] = "/usr/share/datasets/fashion-mnist"; /* where Debian's dataset-fashion-mnist puts it */
    }
    tried[0] = 0;
    for (i = 0; i < n_dirs; i++) {
        if ((size_t)snprintf(images, sizeof images, "%s/%s-images-idx3-ubyte", dirs[i], prefix) >= sizeof images ||
            (size_t)snprintf(labels, sizeof labels, "%s/%s-labels-idx1-ubyte", dirs[i], prefix) >= sizeof labels)
            MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_dataset_fashion_mnist: directory path '%.100s...' is too long", dirs[i]);
        if (mgpu__plain_or_gz(images, gz, sizeof gz)) return mgpu_dataset_idx_open(images, labels);
        if (pos < sizeof tried) pos += (size_t)snprintf(tried + pos, sizeof tried - pos, "%s'%s'", i ? ", " : "", dirs[i]);
    }
    MGPU__FAIL_NULL(MGPU_ERR_IO, "mgpu_dataset_fashion_mnist: no %s-images-idx3-ubyte(.gz) found in %s; run `make data` "
                    "(installs Debian's dataset-fashion-mnist and fills data/fashion-mnist), or pass the directory (--data DIR, or $MGPU_DATA)",
                    prefix, tried);
}

/* --------------------------------------------------------------------------------------
   Sampler: torch.utils.data.DistributedSampler's index lists.
   -------------------------------------------------------------------------------------- */

/* Samples per rank: ceil(n / world), or floor with drop_last (DistributedSampler's num_samples). */
static int64_t mgpu__sampler_count(int64_t n, int world, int drop_last) {
    if (drop_last && n % world != 0) return n / world;
    return (n + world - 1) / world;
}

/* Fisher-Yates permutation of [0, n) driven by the counter-based RNG (stream `seed`). */
static void mgpu__permutation(int64_t n, uint64_t seed, int64_t *perm) {
    int64_t i;
    for (i = 0; i < n; i++) perm[i] = i;
    for (i = n - 1; i > 0; i--) {
        /* 64 random bits: the modulo bias is below 2^-32 for any n that fits in memory */
        uint64_t r = ((uint64_t)mgpu_random_u32(seed, 2 * (uint64_t)i) << 32) | mgpu_random_u32(seed, 2 * (uint64_t)i + 1);
        int64_t j = (int64_t)(r % (uint64_t)(i + 1)), t = perm[i];
        perm[i] = perm[j]; perm[j] = t;
    }
}

MGPU_API int64_t mgpu_sampler_indices(int64_t n, int rank, int world_size, int shuffle, uint64_t seed, int64_t epoch,
                                      int drop_last, int64_t *out) {
    int world = world_size > 1 ? world_size : 1;
    int64_t count, k, *perm = NULL;
    if (n < 0) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_sampler_indices: n is %lld, must be >= 0", (long long)n); return -1; }
    if (rank < 0 || rank >= world) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_sampler_indices: rank %d outside [0, %d) for world_size %d", rank, world, world_size);
        return -1;
    }
    count = mgpu__sampler_count(n, world, drop_last);
    if (!out || count == 0) return count;
    if (shuffle) {
        perm = (int64_t *)mgpu__alloc(sizeof(int64_t) * (size_t)n, "the sampler's permutation");
        if (!perm) return -1;
        mgpu__permutation(n, seed + (uint64_t)epoch, perm);
    }
    /* the padded list repeats the permutation from its start, so position p holds perm[p % n];
       rank takes positions rank, rank + world, ... */
    for (k = 0; k < count; k++) {
        int64_t p = (rank + k * world) % n;
        out[k] = perm ? perm[p] : p;
    }
    mgpu_free(perm);
    return count;
}

/* --------------------------------------------------------------------------------------
   Loader. Batch k of an epoch is built from the rank's indices [k*B, (k+1)*B) into slot
   k % n_slots. Workers claim batches in order; the consumer takes them in order, so the
   sequence does not depend on the number of workers. A slot is reused only after the batch
   handed out from it is released (at the next call), which keeps b->x valid until then.
   On a GPU a loader either streams (each slot holds pinned host buffers and device tensors; when
   batch k is handed out the upload of batch k + 1 starts, so the copy runs while step k computes)
   or keeps the dataset resident on the device and gathers each batch there from the epoch's
   indices (no copy from the host per step).
   -------------------------------------------------------------------------------------- */

enum { MGPU__SLOT_FREE = 0, MGPU__SLOT_FILLING = 1, MGPU__SLOT_READY = 2, MGPU__SLOT_HELD = 3 };

static void mgpu__loader_host_free(struct mgpu_loader *l, uint8_t *p);

typedef struct mgpu__loader_slot {
    uint8_t *x_host, *y_host;  /* (B, x_shape...), (B, y_shape...) filled by workers */
    mgpu_tensor *x, *y;        /* handed out; on the CPU they wrap x_host / y_host */
#ifdef MGPU_CUDA
    mgpu__cuda_upload up;      /* on a GPU: x_host / y_host are pinned and copied on the loader's stream */
#endif
    int uploaded;              /* the copy of this slot's batch to the device has been started */
    int state;
    int64_t batch, size;
    mgpu_result result;
    char error[1024];
} mgpu__loader_slot;

struct mgpu_loader {
    const mgpu_dataset *ds;
    int64_t batch_size;
    int shuffle, drop_last, sampler_drop_last, rank, world;
    uint64_t seed;
    mgpu_context *ctx; int owns_ctx;
    int device_copy;             /* batch tensors are not host memory: copy at delivery */
    void *copy_stream;           /* CUDA: the stream batches are uploaded on */
    int resident;                /* the dataset lives on the device: batches are gathered there */
    mgpu_tensor *res_x, *res_y;  /* resident: every sample, (n, x_shape...) and (n, y_shape...) */
    mgpu_tensor *res_idx;        /* resident: the epoch's indices (n_indices) */
    size_t x_bytes, y_bytes;     /* per sample, as the dataset writes them */
    int64_t x_numel, y_numel;
    int64_t *indices, n_indices, n_batches;
    int64_t epoch, next_batch;   /* consumer position */
    int64_t claim_batch;         /* next batch a worker may fill */
    int held;                    /* slot handed out by the last next(), or -1 */
    mgpu__loader_slot *slots; int n_slots;
    pthread_t *threads; int n_workers, n_started;
    pthread_mutex_t mu;
    pthread_cond_t work_cv, ready_cv;
    int n_filling, shutdown;
    int cancel;                  /* read without the lock by filling workers (atomics) */
    mgpu_result failed;          /* sticky until set_epoch */
    char failed_msg[1024];
};

static void mgpu__loader_fill(mgpu_loader *l, mgpu__loader_slot *s, int64_t k) {
    int64_t begin = k * l->batch_size, i;
    s->size = MGPU__MIN(l->batch_size, l->n_indices - begin);
    s->result = MGPU_OK;
    mgpu_clear_error();
    for (i = 0; i < s->size; i++) {
        int64_t index = l->indices[begin + i];
        mgpu_result r;
        if (__atomic_load_n(&l->cancel, __ATOMIC_RELAXED)) { s->result = MGPU_ERR_STATE; snprintf(s->error, sizeof s->error, "cancelled"); return; }
        r = l->ds->get(l->ds, index, s->x_host + (size_t)i * l->x_bytes, s->y_host + (size_t)i * l->y_bytes);
        if (r != MGPU_OK) {
            s->result = r;
            snprintf(s->error, sizeof s->error, "mgpu_loader_next: sample %lld (batch %lld of epoch %lld): %.900s", (long long)index,
                     (long long)k, (long long)l->epoch, mgpu_last_result() != MGPU_OK ? mgpu_last_error() : mgpu_result_string(r));
            return;
        }
    }
}

static int mgpu__loader_claimable(const mgpu_loader *l) {
    return !__atomic_load_n(&l->cancel, __ATOMIC_RELAXED) && l->claim_batch < l->n_batches &&
           l->slots[l->claim_batch % l->n_slots].state == MGPU__SLOT_FREE;
}

static void *mgpu__loader_worker(void *arg) {
    mgpu_loader *l = (mgpu_loader *)arg;
    pthread_mutex_lock(&l->mu);
    for (;;) {
        mgpu__loader_slot *s;
        int64_t k;
        while (!l->shutdown && !mgpu__loader_claimable(l)) pthread_cond_wait(&l->work_cv, &l->mu);
        if (l->shutdown) break;
        k = l->claim_batch++;
        s = &l->slots[k % l->n_slots];
        s->state = MGPU__SLOT_FILLING; s->batch = k;
        l->n_filling++;
        pthread_mutex_unlock(&l->mu);
        mgpu__loader_fill(l, s, k);
        pthread_mutex_lock(&l->mu);
        l->n_filling--;
        s->state = MGPU__SLOT_READY;
        pthread_cond_broadcast(&l->ready_cv);
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

/* Stops workers from claiming and waits for fills in progress (they abort at the next sample). */
static void mgpu__loader_drain_locked(mgpu_loader *l) {
    __atomic_store_n(&l->cancel, 1, __ATOMIC_RELAXED);
    while (l->n_filling > 0) pthread_cond_wait(&l->ready_cv, &l->mu);
}

MGPU_API void mgpu_loader_destroy(mgpu_loader *l) {
    int i;
    if (!l) return;
    pthread_mutex_lock(&l->mu);
    l->shutdown = 1;
    __atomic_store_n(&l->cancel, 1, __ATOMIC_RELAXED);
    pthread_cond_broadcast(&l->work_cv);
    pthread_mutex_unlock(&l->mu);
    for (i = 0; i < l->n_started; i++) pthread_join(l->threads[i], NULL);
    pthread_mutex_destroy(&l->mu);
    pthread_cond_destroy(&l->work_cv);
    pthread_cond_destroy(&l->ready_cv);
#ifdef MGPU_CUDA
    mgpu__cuda_stream_free(l->copy_stream);   /* waits for the uploads still in flight */
#endif
    for (i = 0; l->slots && i < l->n_slots; i++) {
        mgpu_tensor_free(l->slots[i].x);
        mgpu_tensor_free(l->slots[i].y);
        mgpu__loader_host_free(l, l->slots[i].x_host);
        mgpu__loader_host_free(l, l->slots[i].y_host);
#ifdef MGPU_CUDA
        mgpu__cuda_upload_release(&l->slots[i].up);
#endif
    }
    mgpu_tensor_free(l->res_x);
    mgpu_tensor_free(l->res_y);
    mgpu_tensor_free(l->res_idx);
    mgpu_free(l->slots);
    mgpu_free(l->threads);
    mgpu_free(l->indices);
    if (l->owns_ctx) mgpu_context_destroy(l->ctx);
    mgpu_free(l);
}

/* Validates the dataset and the desc; fills the loader's settings. */
static mgpu_result mgpu__loader_configure(mgpu_loader *l, const mgpu_dataset *ds, const mgpu_loader_desc *d) {
    const char *fn = "mgpu_loader_create";
    int ok;
    if (!ds || !d) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: ds and desc must not be NULL", fn);
    if (!ds->get || ds->length < 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: the dataset has no get() or a negative length", fn);
    if (!mgpu__dtype_valid(ds->x_dtype) || !mgpu__dtype_valid(ds->y_dtype))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: the dataset's x_dtype or y_dtype is not a valid mgpu_dtype", fn);
    if (ds->x_ndim >= MGPU_MAX_DIMS || ds->y_ndim >= MGPU_MAX_DIMS)
        return mgpu__fail(MGPU_ERR_SHAPE, "%s: samples have %d-d x and %d-d y; batches add a dimension and allow %d in all", fn,
                          ds->x_ndim, ds->y_ndim, MGPU_MAX_DIMS);
    l->x_numel = mgpu__sample_numel(fn, "dataset x_shape", ds->x_ndim, ds->x_shape);
    l->y_numel = mgpu__sample_numel(fn, "dataset y_shape", ds->y_ndim, ds->y_shape);
    if (l->x_numel < 0 || l->y_numel < 0) return mgpu_last_result();
    if (d->batch_size < 1) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->batch_size is %lld, must be >= 1", fn, (long long)d->batch_size);
    if (d->num_workers < 0 || d->num_workers > 256)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->num_workers is %d, must be in [0, 256]", fn, d->num_workers);
    if (d->prefetch < 0 || d->prefetch > 64) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->prefetch is %d, must be in [0, 64]", fn, d->prefetch);
    if (d->world_size < 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->world_size is %d, must be >= 0", fn, d->world_size);
    if ((int)d->data_on_device < MGPU_DATA_ON_DEVICE_OFF || (int)d->data_on_device > MGPU_DATA_ON_DEVICE_AUTO)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->data_on_device is %d, not an mgpu_data_on_device value (OFF, ON or AUTO)", fn,
                          (int)d->data_on_device);
    l->world = d->world_size > 1 ? d->world_size : 1;
    if (d->rank < 0 || d->rank >= l->world)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->rank %d outside [0, %d) for world_size %d", fn, d->rank, l->world, d->world_size);
    l->x_bytes = (size_t)l->x_numel * mgpu_dtype_size(ds->x_dtype); /* validated shapes keep these small */
    l->y_bytes = (size_t)l->y_numel * mgpu_dtype_size(ds->y_dtype);
    mgpu__bytes_of(d->batch_size, l->x_numel + l->y_numel, 8, &ok);
    if (!ok) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: a batch of %lld samples does not fit in memory", fn, (long long)d->batch_size);
    l->ds = ds;
    l->batch_size = d->batch_size;
    l->shuffle = d->shuffle; l->seed = d->seed;
    l->drop_last = d->drop_last; l->sampler_drop_last = d->sampler_drop_last;
    l->rank = d->rank;
    l->n_workers = d->num_workers;
    l->n_slots = d->num_workers ? d->num_workers * (d->prefetch ? d->prefetch : 2) : 1;
    l->n_indices = mgpu__sampler_count(ds->length, l->world, l->sampler_drop_last);
    l->n_batches = l->drop_last ? l->n_indices / l->batch_size : (l->n_indices + l->batch_size - 1) / l->batch_size;
    return MGPU_OK;
}

/* Device bytes a resident dataset takes: every sample and the epoch's index list (0 on overflow). */
static size_t mgpu__loader_resident_bytes(const mgpu_loader *l) {
    int ok_data, ok_idx;
    size_t data = mgpu__bytes_of(l->ds->length, 1, l->x_bytes + l->y_bytes, &ok_data);
    size_t idx = mgpu__bytes_of(l->n_indices, 1, sizeof(int64_t), &ok_idx);
    return ok_data && ok_idx && data <= SIZE_MAX - idx ? data + idx : 0;
}

/* Whether the dataset lives on the device: desc ON (a CUDA context is required), or AUTO for a
   static dataset whose samples and index list take at most a quarter of the device's free memory
   (room left for the model, its activations and the allocator's rounding). */
static mgpu_result mgpu__loader_choose_resident(mgpu_loader *l, mgpu_data_on_device mode) {
    size_t need, free_b = 0;
    l->resident = 0;
    if (mode == MGPU_DATA_ON_DEVICE_OFF) return MGPU_OK;
    if (!l->device_copy) {
        if (mode == MGPU_DATA_ON_DEVICE_ON)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_loader_create: desc->data_on_device is ON (--data-on-device on) but the loader's "
                              "context is the CPU, where the samples are in host memory already; use a CUDA context (--device cuda), or OFF / AUTO");
        return MGPU_OK;
    }
    if (mode == MGPU_DATA_ON_DEVICE_ON) { l->resident = 1; return MGPU_OK; }
    if (!l->ds->static_samples) return MGPU_OK;   /* get() may augment: each epoch needs fresh samples */
    need = mgpu__loader_resident_bytes(l);
#ifdef MGPU_CUDA
    {
        mgpu_result r = mgpu__cuda_free_bytes(l->ctx->device.index, &free_b);
        if (r != MGPU_OK) return r;
    }
#endif
    l->resident = need > 0 && need <= free_b / 4;
    return MGPU_OK;
}

/* (rows, sample_shape...): a batch, or a whole resident dataset */
static void mgpu__rows_shape(int64_t rows, int ndim, const int64_t *sample_shape, int64_t *out) {
    out[0] = rows;
    if (ndim) memcpy(out + 1, sample_shape, sizeof(int64_t) * (size_t)ndim);
}

/* One batch tensor of a slot: (B, sample_shape...), wrapping the host buffer on the CPU. */
static mgpu_tensor *mgpu__loader_batch_tensor(mgpu_loader *l, mgpu_dtype dt, int ndim, const int64_t *shape, void *host) {
    int64_t bshape[MGPU_MAX_DIMS];
    mgpu__rows_shape(l->batch_size, ndim, shape, bshape);
    if (l->device_copy) return mgpu_tensor_create(l->ctx, dt, ndim + 1, bshape);
    return mgpu_tensor_wrap(l->ctx, dt, ndim + 1, bshape, host);
}

/* Batch buffers the workers fill: pinned on a GPU, so uploads are DMA and need no staging copy. */
static uint8_t *mgpu__loader_host_alloc(mgpu_loader *l, size_t bytes) {
#ifdef MGPU_CUDA
    if (l->device_copy) return (uint8_t *)mgpu_cuda_host_alloc(bytes);
#endif
    (void)l;
    return (uint8_t *)mgpu__alloc(bytes, "a loader batch");
}
static void mgpu__loader_host_free(mgpu_loader *l, uint8_t *p) {
#ifdef MGPU_CUDA
    if (l->device_copy) { mgpu_cuda_host_free(p); return; }
#endif
    (void)l;
    mgpu_free(p);
}

/* Slots: host buffers and a copy stream when streaming; a resident loader's one slot holds only
   the device tensors its batches are gathered into. */
static mgpu_result mgpu__loader_alloc_slots(mgpu_loader *l) {
    int i;
#ifdef MGPU_CUDA
    if (l->device_copy && !l->resident) {
        mgpu_result r = mgpu__cuda_stream_new(l->ctx->device.index, &l->copy_stream);
        if (r != MGPU_OK) return r;
    }
#endif
    l->slots = (mgpu__loader_slot *)mgpu__calloc(sizeof(mgpu__loader_slot) * (size_t)l->n_slots, "the loader's batch slots");
    if (!l->slots) return MGPU_ERR_OOM_HOST;
    for (i = 0; i < l->n_slots; i++) {
        mgpu__loader_slot *s = &l->slots[i];
        if (!l->resident) {
            s->x_host = mgpu__loader_host_alloc(l, (size_t)l->batch_size * l->x_bytes);
            s->y_host = mgpu__loader_host_alloc(l, (size_t)l->batch_size * l->y_bytes);
            if (!s->x_host || !s->y_host) return MGPU_ERR_OOM_HOST;
        }
        s->x = mgpu__loader_batch_tensor(l, l->ds->x_dtype, l->ds->x_ndim, l->ds->x_shape, s->x_host);
        s->y = mgpu__loader_batch_tensor(l, l->ds->y_dtype, l->ds->y_ndim, l->ds->y_shape, s->y_host);
        if (!s->x || !s->y) return mgpu_last_result();
    }
    return MGPU_OK;
}

/* A resident array (n, sample_shape...) on the loader's device; NULL with the error set. */
static mgpu_tensor *mgpu__loader_resident_tensor(mgpu_loader *l, mgpu_dtype dt, int ndim, const int64_t *shape) {
    int64_t whole[MGPU_MAX_DIMS];
    mgpu__rows_shape(l->ds->length, ndim, shape, whole);
    return mgpu_tensor_create(l->ctx, dt, ndim + 1, whole);
}

/* Device memory for the resident dataset; a dataset that does not fit says so and how to go on. */
static mgpu_result mgpu__loader_resident_alloc(mgpu_loader *l) {
    char why[1024];
    int64_t n_idx = MGPU__MAX(l->n_indices, 1);
    l->res_x = mgpu__loader_resident_tensor(l, l->ds->x_dtype, l->ds->x_ndim, l->ds->x_shape);
    l->res_y = l->res_x ? mgpu__loader_resident_tensor(l, l->ds->y_dtype, l->ds->y_ndim, l->ds->y_shape) : NULL;
    l->res_idx = l->res_y ? mgpu_tensor_create(l->ctx, MGPU_I64, 1, &n_idx) : NULL;
    if (l->res_idx) return MGPU_OK;
    if (mgpu_last_result() != MGPU_ERR_OOM_DEVICE) return mgpu_last_result();
    snprintf(why, sizeof why, "%s", mgpu_last_error());
    return mgpu__fail(MGPU_ERR_OOM_DEVICE, "mgpu_loader_create: the dataset (%lld samples, %.1f MiB) does not fit on cuda:%d with "
                      "data_on_device ON (--data-on-device on): %s; use --data-on-device off (or auto) to stream it",
                      (long long)l->ds->length, (double)mgpu__loader_resident_bytes(l) / (1024.0 * 1024.0), l->ctx->device.index, why);
}

/* Uploads every sample once, decoded by get() into host chunks of a few thousand samples. */
static mgpu_result mgpu__loader_resident_upload(mgpu_loader *l) {
    const int64_t chunk = 4096;
    int64_t n = l->ds->length, i, j;
    uint8_t *hx = (uint8_t *)mgpu__alloc((size_t)chunk * l->x_bytes + 1, "the loader's upload buffer");
    uint8_t *hy = (uint8_t *)mgpu__alloc((size_t)chunk * l->y_bytes + 1, "the loader's upload buffer");
    mgpu_result r = hx && hy ? MGPU_OK : MGPU_ERR_OOM_HOST;
    for (i = 0; i < n && r == MGPU_OK; i += chunk) {
        int64_t m = MGPU__MIN(chunk, n - i);
        for (j = 0; j < m && r == MGPU_OK; j++)
            if ((r = l->ds->get(l->ds, i + j, hx + (size_t)j * l->x_bytes, hy + (size_t)j * l->y_bytes)) != MGPU_OK)
                r = mgpu__fail(r, "mgpu_loader_create: sample %lld, read to keep the dataset on the device: %.900s", (long long)(i + j),
                               mgpu_last_result() != MGPU_OK ? mgpu_last_error() : mgpu_result_string(r));
        if (r == MGPU_OK)
            r = mgpu__transfer(l->ctx, (uint8_t *)l->res_x->data + (size_t)i * l->x_bytes, hx, (size_t)m * l->x_bytes, "mgpu_loader_create");
        if (r == MGPU_OK)
            r = mgpu__transfer(l->ctx, (uint8_t *)l->res_y->data + (size_t)i * l->y_bytes, hy, (size_t)m * l->y_bytes, "mgpu_loader_create");
    }
    mgpu_free(hx);
    mgpu_free(hy);
    return r;
}

static mgpu_result mgpu__loader_start_workers(mgpu_loader *l) {
    int i;
    if (!l->n_workers) return MGPU_OK;
    l->threads = (pthread_t *)mgpu__calloc(sizeof(pthread_t) * (size_t)l->n_workers, "the loader's threads");
    if (!l->threads) return MGPU_ERR_OOM_HOST;
    for (i = 0; i < l->n_workers; i++) {
        int e = pthread_create(&l->threads[i], NULL, mgpu__loader_worker, l);
        if (e != 0) return mgpu__fail(MGPU_ERR_OOM_HOST, "mgpu_loader_create: cannot start worker thread %d of %d: %s", i, l->n_workers, strerror(e));
        l->n_started++;
    }
    return MGPU_OK;
}

/* Streaming on a GPU needs two slots at least: batch k + 1 is uploaded while batch k is in use.
   A resident dataset needs one slot (the gather target) and no workers. */
static mgpu_result mgpu__loader_place(mgpu_loader *l, mgpu_data_on_device mode) {
    mgpu_result r = mgpu__loader_choose_resident(l, mode);
    if (r != MGPU_OK) return r;
    if (l->resident) { l->n_slots = 1; l->n_workers = 0; }
    else if (l->device_copy && l->n_slots < 2) l->n_slots = 2;
    if ((r = mgpu__loader_alloc_slots(l)) != MGPU_OK) return r;
    if (l->resident && ((r = mgpu__loader_resident_alloc(l)) != MGPU_OK || (r = mgpu__loader_resident_upload(l)) != MGPU_OK)) return r;
    return MGPU_OK;
}

MGPU_API mgpu_loader *mgpu_loader_create(const mgpu_dataset *ds, const mgpu_loader_desc *desc) {
    mgpu_loader *l = (mgpu_loader *)mgpu__calloc(sizeof *l, "a loader");
    if (!l) return NULL;
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->work_cv, NULL);
    pthread_cond_init(&l->ready_cv, NULL);
    l->held = -1;
    l->epoch = -1;
    if (mgpu__loader_configure(l, ds, desc) != MGPU_OK) { mgpu_loader_destroy(l); return NULL; }
    l->ctx = desc->ctx;
    if (!l->ctx) {
        mgpu_context_desc cd;
        memset(&cd, 0, sizeof cd);
        cd.num_threads = 1;
        cd.arena_bytes = 4096; /* the loader's own context never runs ops */
        l->ctx = mgpu_context_create(&cd);
        l->owns_ctx = 1;
        if (!l->ctx) { mgpu_loader_destroy(l); return NULL; }
    }
    l->device_copy = l->ctx->device.type != MGPU_DEVICE_CPU;
    l->indices = (int64_t *)mgpu__alloc(sizeof(int64_t) * (size_t)MGPU__MAX(l->n_indices, 1), "the loader's indices");
    if (!l->indices || mgpu__loader_place(l, desc->data_on_device) != MGPU_OK || mgpu_loader_set_epoch(l, 0, 0) != MGPU_OK ||
        mgpu__loader_start_workers(l) != MGPU_OK) {
        mgpu_loader_destroy(l);
        return NULL;
    }
    return l;
}

/* Before the workers may refill a slot's host buffers: its upload must have read them. */
static mgpu_result mgpu__loader_uploads_done(mgpu_loader *l, mgpu__loader_slot *s) {
#ifdef MGPU_CUDA
    if (l->device_copy && !l->resident) return mgpu__cuda_upload_finish(&s->up);
#endif
    (void)l; (void)s;
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_loader_set_epoch(mgpu_loader *l, int64_t epoch, int64_t start_batch) {
    int i;
    mgpu_result r = MGPU_OK;
    if (!l) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_loader_set_epoch: loader is NULL");
    if (epoch < 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_loader_set_epoch: epoch is %lld, must be >= 0", (long long)epoch);
    if (start_batch < 0 || start_batch > l->n_batches)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_loader_set_epoch: start_batch %lld outside [0, %lld] (batches per epoch)",
                          (long long)start_batch, (long long)l->n_batches);
    pthread_mutex_lock(&l->mu);
    /* already positioned there (e.g. the epoch 0 the loader starts in): keep what is prefetched */
    if (epoch == l->epoch && start_batch == l->next_batch && l->failed == MGPU_OK) { pthread_mutex_unlock(&l->mu); return MGPU_OK; }
    mgpu__loader_drain_locked(l);
    /* the held batch and one prefetched batch may still be uploading from their host buffers */
    for (i = 0; i < l->n_slots; i++) {
        if (l->slots[i].uploaded && r == MGPU_OK) r = mgpu__loader_uploads_done(l, &l->slots[i]);
        l->slots[i].state = MGPU__SLOT_FREE;
        l->slots[i].uploaded = 0;
    }
    l->held = -1;
    l->failed = MGPU_OK;
    l->epoch = epoch;
    l->next_batch = l->claim_batch = start_batch;
    if (r == MGPU_OK &&
        mgpu_sampler_indices(l->ds->length, l->rank, l->world, l->shuffle, l->seed, epoch, l->sampler_drop_last, l->indices) < 0)
        r = mgpu_last_result();
    /* a resident loader gathers from the device's copy of the index list */
    if (r == MGPU_OK && l->resident && l->n_indices > 0)
        r = mgpu_tensor_copy_from_host(l->res_idx, l->indices, sizeof(int64_t) * (size_t)l->n_indices);
    if (r != MGPU_OK) {
        l->failed = r;
        snprintf(l->failed_msg, sizeof l->failed_msg, "%s", mgpu_last_error());
        l->epoch = -1;
        l->claim_batch = l->n_batches; /* nothing to fill until a later set_epoch succeeds */
    }
    __atomic_store_n(&l->cancel, 0, __ATOMIC_RELAXED);
    pthread_cond_broadcast(&l->work_cv);
    pthread_mutex_unlock(&l->mu);
    return r;
}

/* Builds batch k into its slot on the calling thread (a loader without workers). */
static void mgpu__loader_fill_here(mgpu_loader *l, mgpu__loader_slot *s, int64_t k) {
    s->batch = k;
    mgpu__loader_fill(l, s, k);
    s->state = MGPU__SLOT_READY;
}

/* Waits for (or, without workers, builds) batch k; returns its slot with the lock held. */
static mgpu__loader_slot *mgpu__loader_take_locked(mgpu_loader *l, int64_t k) {
    mgpu__loader_slot *s = &l->slots[k % l->n_slots];
    int ready = s->state == MGPU__SLOT_READY && s->batch == k;   /* prefetched by the previous call */
    if (l->n_workers == 0 && !ready) { mgpu__loader_fill_here(l, s, k); return s; }
    while (!(s->state == MGPU__SLOT_READY && s->batch == k)) pthread_cond_wait(&l->ready_cv, &l->mu);
    return s;
}

/* On a GPU, the slot of batch k + 1 (k was just handed out) when its upload can start now: built
   here by a loader without workers, taken when a worker has it ready (never waited for: the step
   must not wait on the host for a batch it does not need yet). NULL if none. Lock held. */
static mgpu__loader_slot *mgpu__loader_prefetch_locked(mgpu_loader *l, int64_t k) {
    mgpu__loader_slot *p;
    if (!l->device_copy || k + 1 >= l->n_batches) return NULL;
    p = &l->slots[(k + 1) % l->n_slots];
    if (l->n_workers == 0 && p->state == MGPU__SLOT_FREE) mgpu__loader_fill_here(l, p, k + 1);
    if (p->state != MGPU__SLOT_READY || p->batch != k + 1 || p->result != MGPU_OK || p->uploaded) return NULL;
    p->uploaded = 1;   /* a READY slot is never refilled, so the upload may start after the lock is dropped */
    return p;
}

/* Sets the leading dim of a slot's tensors to its batch's size (the last batch may be short). */
static void mgpu__loader_set_size(mgpu_loader *l, mgpu__loader_slot *s) {
    s->x->shape[0] = s->y->shape[0] = s->size;
    s->x->numel = s->size * l->x_numel;
    s->y->numel = s->size * l->y_numel;
}

/* On a GPU: starts copying a slot's batch on the loader's stream, after the steps already queued
   (the one that read this slot's device tensors last among them). */
static mgpu_result mgpu__loader_upload(mgpu_loader *l, mgpu__loader_slot *s) {
    mgpu__loader_set_size(l, s);
    s->uploaded = 1;
#ifdef MGPU_CUDA
    {
        mgpu__cuda_copy c[2];
        c[0].dst = s->x->data; c[0].src = s->x_host; c[0].bytes = mgpu_tensor_nbytes(s->x);
        c[1].dst = s->y->data; c[1].src = s->y_host; c[1].bytes = mgpu_tensor_nbytes(s->y);
        return mgpu__cuda_upload_start(&s->up, l->copy_stream, l->ctx->cuda_stream, c, 2);
    }
#else
    return mgpu__fail(MGPU_ERR_STATE, "mgpu_loader_next: a device context in a build without MGPU_CUDA");
#endif
}

/* Hands a slot's batch to the step: on a GPU the step's stream waits for its upload (on the
   device: the host goes on queueing the step). */
static mgpu_result mgpu__loader_deliver(mgpu_loader *l, mgpu__loader_slot *s) {
    mgpu_result r;
    if (!l->device_copy) { mgpu__loader_set_size(l, s); return MGPU_OK; }
    if (!s->uploaded && (r = mgpu__loader_upload(l, s)) != MGPU_OK) return r;
#ifdef MGPU_CUDA
    return mgpu__cuda_upload_consume(&s->up, l->ctx->cuda_stream);
#else
    return MGPU_OK;
#endif
}

/* rows [begin, begin + size) of the epoch's indices, gathered from a resident array into dst */
static mgpu_result mgpu__loader_gather(mgpu_loader *l, mgpu_tensor *dst, const mgpu_tensor *src, int64_t sample_numel, int64_t begin, int64_t size) {
    mgpu__gather_rows_args a;
    memset(&a, 0, sizeof a);
    a.ctx = l->ctx;
    a.src = src->data; a.dst = dst->data;
    a.idx = (const int64_t *)l->res_idx->data + begin;
    a.rows = size; a.len = sample_numel; a.n_src = l->ds->length;
    a.esize = mgpu_dtype_size(src->dtype);
    dst->shape[0] = size;
    dst->numel = size * sample_numel;
    return MGPU__TWIN(l->ctx, gather_rows, &a);
}

/* A resident loader's next batch: gathered on the context's stream, behind the steps that read the
   previous one (stream order), so one slot is enough. */
static mgpu_result mgpu__loader_next_resident(mgpu_loader *l, mgpu_batch *b) {
    mgpu__loader_slot *s = &l->slots[0];
    int64_t k = l->next_batch, begin = k * l->batch_size, size;
    mgpu_result r;
    if (l->failed != MGPU_OK) return mgpu__fail(l->failed, "%s", l->failed_msg);
    b->index = k;
    if (k >= l->n_batches) return MGPU_OK;
    size = MGPU__MIN(l->batch_size, l->n_indices - begin);
    if ((r = mgpu__loader_gather(l, s->x, l->res_x, l->x_numel, begin, size)) != MGPU_OK ||
        (r = mgpu__loader_gather(l, s->y, l->res_y, l->y_numel, begin, size)) != MGPU_OK)
        return r;
    l->next_batch++;
    b->x = s->x; b->y = s->y;
    b->size = size;
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_loader_next(mgpu_loader *l, mgpu_batch *b) {
    mgpu__loader_slot *s, *pre;
    int64_t k;
    mgpu_result r;
    if (!l || !b) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_loader_next: loader and batch must not be NULL");
    memset(b, 0, sizeof *b);
    if (l->resident) return mgpu__loader_next_resident(l, b);
    if (l->held >= 0 && (r = mgpu__loader_uploads_done(l, &l->slots[l->held])) != MGPU_OK) return r;
    pthread_mutex_lock(&l->mu);
    if (l->held >= 0) {
        l->slots[l->held].state = MGPU__SLOT_FREE;
        l->slots[l->held].uploaded = 0;
        l->held = -1;
        pthread_cond_broadcast(&l->work_cv);
    }
    if (l->failed != MGPU_OK) {
        r = mgpu__fail(l->failed, "%s", l->failed_msg);
        pthread_mutex_unlock(&l->mu);
        return r;
    }
    k = l->next_batch;
    b->index = k;
    if (k >= l->n_batches) { pthread_mutex_unlock(&l->mu); return MGPU_OK; }
    s = mgpu__loader_take_locked(l, k);
    if (s->result != MGPU_OK) {
        /* the batch stays unbuilt; every later call repeats the error until set_epoch */
        l->failed = s->result;
        memcpy(l->failed_msg, s->error, sizeof l->failed_msg);
        s->state = MGPU__SLOT_FREE;
        r = mgpu__fail(l->failed, "%s", l->failed_msg);
        pthread_mutex_unlock(&l->mu);
        return r;
    }
    s->state = MGPU__SLOT_HELD;
    l->held = (int)(k % l->n_slots);
    l->next_batch++;
    pre = mgpu__loader_prefetch_locked(l, k);
    pthread_mutex_unlock(&l->mu);
    /* the slot is ours until the next call: no worker touches a held (or a prefetched) slot */
    if ((r = mgpu__loader_deliver(l, s)) != MGPU_OK) return r;
    /* batch k + 1 starts copying now, before the step on batch k is queued and synchronised */
    if (pre && (r = mgpu__loader_upload(l, pre)) != MGPU_OK) return r;
    b->x = s->x; b->y = s->y;
    b->size = s->size;
    return MGPU_OK;
}

MGPU_API int64_t mgpu_loader_num_batches(const mgpu_loader *l) {
    if (!l) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_loader_num_batches: loader is NULL"); return -1; }
    return l->n_batches;
}

MGPU_API int mgpu_loader_data_on_device(const mgpu_loader *l) {
    if (!l) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_loader_data_on_device: loader is NULL"); return -1; }
    return l->resident;
}
/* ======================================================================================
   Files, JSON, safetensors, options, metrics, progress
   ====================================================================================== */

/* Files (atomic writes, whole-file reads), a strict JSON parser plus writer helpers, safetensors,
   model save/load, the common training options, the metrics JSONL writer and the progress bar. */

/* safetensors stores little-endian data and tensors are copied byte for byte. */
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "mgpu: safetensors I/O copies tensor bytes as they are and needs a little-endian host"
#endif

/* --------------------------------------------------------------------------------------
   Growable text buffer (JSON headers, metrics lines)
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__buf { char *data; size_t len, cap; int failed; } mgpu__buf;

static void mgpu__buf_init(mgpu__buf *b) { b->data = NULL; b->len = 0; b->cap = 0; b->failed = 0; }
static void mgpu__buf_free(mgpu__buf *b) { mgpu_free(b->data); mgpu__buf_init(b); }

/* Makes room for `extra` more bytes plus a terminating NUL; 0 (and b->failed) when out of memory. */
static int mgpu__buf_reserve(mgpu__buf *b, size_t extra) {
    size_t cap;
    char *grown;
    if (b->failed) return 0;
    if (b->len + extra + 1 <= b->cap) return 1;
    cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) cap *= 2;
    grown = (char *)mgpu__alloc(cap, "a text buffer");
    if (!grown) { b->failed = 1; return 0; }
    if (b->len) memcpy(grown, b->data, b->len);
    mgpu_free(b->data);
    b->data = grown; b->cap = cap;
    return 1;
}
static int mgpu__buf_append(mgpu__buf *b, const void *p, size_t n) {
    if (!mgpu__buf_reserve(b, n)) return 0;
    if (n) memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = 0;
    return 1;
}
static int mgpu__buf_puts(mgpu__buf *b, const char *s) { return mgpu__buf_append(b, s, strlen(s)); }
static int mgpu__buf_printf(mgpu__buf *b, const char *fmt, ...) MGPU__PRINTF(2, 3);
static int mgpu__buf_printf(mgpu__buf *b, const char *fmt, ...) {
    va_list ap, ap2;
    int n;
    va_start(ap, fmt);
    va_copy(ap2, ap);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || !mgpu__buf_reserve(b, (size_t)n)) { va_end(ap2); return 0; }
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap2);
    va_end(ap2);
    b->len += (size_t)n;
    return 1;
}

/* s as a JSON string literal: quotes, backslashes and control characters escaped; UTF-8 passes through. */
static int mgpu__buf_json_string(mgpu__buf *b, const char *s) {
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    mgpu__buf_puts(b, "\"");
    while (*p) {
        const unsigned char *run = p;
        char esc[7];
        while (*p >= 0x20 && *p != '"' && *p != '\\') p++;
        mgpu__buf_append(b, run, (size_t)(p - run));
        if (!*p) break;
        esc[0] = '\\'; esc[2] = 0;
        switch (*p) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        default:
            esc[1] = 'u'; esc[2] = '0'; esc[3] = '0'; esc[4] = hex[*p >> 4]; esc[5] = hex[*p & 15]; esc[6] = 0;
        }
        mgpu__buf_puts(b, esc);
        p++;
    }
    return mgpu__buf_puts(b, "\"");
}

/* The shortest of %.15g / %.17g that reads back exactly; JSON has no inf/nan, so those are null. */
static int mgpu__buf_json_number(mgpu__buf *b, double v) {
    char text[40];
    if (!isfinite(v)) return mgpu__buf_puts(b, "null");
    snprintf(text, sizeof text, "%.15g", v);
    if (strtod(text, NULL) != v) snprintf(text, sizeof text, "%.17g", v);
    return mgpu__buf_puts(b, text);
}

/* --------------------------------------------------------------------------------------
   Data checksum: safetensors has none, so checkpoints carry one in the file metadata
   ("checksum": "mgpu64:<hex>") over the data section. A flipped bit or a torn write is then an
   error at load time instead of silently wrong weights. Four independent multiply-rotate lanes
   over little-endian 64-bit words keep it at several GB/s; files without the key still load.
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__hash64 { uint64_t lane[4]; uint8_t buf[32]; size_t fill; uint64_t total; } mgpu__hash64;

static void mgpu__hash64_init(mgpu__hash64 *h) {
    int k;
    for (k = 0; k < 4; k++) h->lane[k] = 0x9e3779b97f4a7c15ULL * (uint64_t)(k + 1);
    h->fill = 0; h->total = 0;
}
static uint64_t mgpu__rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static void mgpu__hash64_block(mgpu__hash64 *h, const uint8_t *p) {
    int k;
    for (k = 0; k < 4; k++) {
        uint64_t w;
        memcpy(&w, p + 8 * k, 8); /* little-endian host (checked above) */
        h->lane[k] = mgpu__rotl64((h->lane[k] ^ w) * 0xff51afd7ed558ccdULL, 29);
    }
}
static void mgpu__hash64_update(mgpu__hash64 *h, const void *data, size_t len) {
    const uint8_t *p = (const uint8_t *)data;
    h->total += len;
    if (h->fill) {
        size_t take = MGPU__MIN(len, 32 - h->fill);
        memcpy(h->buf + h->fill, p, take);
        h->fill += take; p += take; len -= take;
        if (h->fill < 32) return;
        mgpu__hash64_block(h, h->buf);
        h->fill = 0;
    }
    for (; len >= 32; p += 32, len -= 32) mgpu__hash64_block(h, p);
    memcpy(h->buf, p, len);
    h->fill = len;
}
static uint64_t mgpu__hash64_final(mgpu__hash64 *h) {
    uint64_t out;
    int k;
    if (h->fill) { memset(h->buf + h->fill, 0, 32 - h->fill); mgpu__hash64_block(h, h->buf); }
    out = mgpu__mix64(h->total);
    for (k = 0; k < 4; k++) out = mgpu__mix64(out ^ h->lane[k]);
    return out;
}
static void mgpu__checksum_text(uint64_t v, char *out, size_t size) { snprintf(out, size, "mgpu64:%016llx", (unsigned long long)v); }

/* --------------------------------------------------------------------------------------
   Files
   -------------------------------------------------------------------------------------- */

/* Writes all bytes at offset `at`, retrying short writes; returns 0 or an errno value. A disk that
   fills up is ENOSPC (or EFBIG past a size limit), never a silently short file. */
static int mgpu__pwrite_fully(int fd, const void *data, size_t len, uint64_t at) {
    const char *p = (const char *)data;
    while (len > 0) {
        size_t chunk = len > ((size_t)1 << 30) ? ((size_t)1 << 30) : len;
        ssize_t w = pwrite(fd, p, chunk, (off_t)at);
        if (w < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (w == 0) return ENOSPC;
        p += w;
        at += (uint64_t)w;
        len -= (size_t)w;
    }
    return 0;
}

/* Large files are written in chunks of this size, each hashed (when asked) just before it is
   written while it is still in cache. */
#define MGPU__WRITE_CHUNK ((uint64_t)8 << 20)

/* A file being written front to back: next offset, how far write-back was started, and an
   optional running checksum of what passes through. */
typedef struct mgpu__stream { int fd; uint64_t at, started; mgpu__hash64 *hash; } mgpu__stream;

static void mgpu__stream_init(mgpu__stream *s, int fd, uint64_t at, mgpu__hash64 *hash) {
    s->fd = fd; s->at = at; s->started = at; s->hash = hash;
}

/* Starts write-back of each finished chunk at once, so the disk works while the next chunk is
   hashed and copied (cp + sync leaves it idle until the sync) and the final fsync has little left.
   Only a hint: nothing is waited for here, and fsync reports any write-back error. (Waiting for
   older chunks, to bound dirty memory, measured slower.) */
static void mgpu__stream_writeback(mgpu__stream *s) {
#if defined(__linux__) && defined(SYNC_FILE_RANGE_WRITE)
    if (s->at - s->started < MGPU__WRITE_CHUNK) return;
    (void)sync_file_range(s->fd, (off_t)s->started, (off_t)(s->at - s->started), SYNC_FILE_RANGE_WRITE);
    s->started = s->at;
#else
    (void)s;
#endif
}

/* Appends data in chunks aligned to file offsets; 0 or an errno value. */
static int mgpu__stream_write(mgpu__stream *s, const void *data, size_t len) {
    const char *p = (const char *)data;
    while (len > 0) {
        size_t chunk = (size_t)MGPU__MIN((uint64_t)len, MGPU__WRITE_CHUNK - s->at % MGPU__WRITE_CHUNK);
        int err;
        if (s->hash) mgpu__hash64_update(s->hash, p, chunk);
        if ((err = mgpu__pwrite_fully(s->fd, p, chunk, s->at)) != 0) return err;
        s->at += chunk; p += chunk; len -= chunk;
        mgpu__stream_writeback(s);
    }
    return 0;
}

/* fsync of the directory holding path, so the rename itself survives a power loss. */
static int mgpu__fsync_parent_dir(const char *path) {
    const char *slash = strrchr(path, '/');
    size_t n = slash ? (size_t)(slash - path) : 1;
    char *dir;
    int fd, err = 0;
    if (slash && n == 0) n = 1; /* "/file" lives in "/" */
    dir = (char *)mgpu__alloc(n + 1, "a directory name");
    if (!dir) return ENOMEM;
    memcpy(dir, slash ? path : ".", n);
    dir[n] = 0;
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) err = errno;
    /* some file systems cannot fsync a directory (EINVAL); the rename is then as durable as it gets */
    else if (fsync(fd) != 0 && errno != EINVAL) err = errno;
    if (fd >= 0) close(fd);
    mgpu_free(dir);
    return err;
}

typedef struct mgpu__span { const void *data; size_t len; } mgpu__span;

/* An atomic replacement of path in progress: the temporary file path.tmp.<pid> and its descriptor. */
typedef struct mgpu__tmpfile { const char *path, *fn; char *tmp; int fd; } mgpu__tmpfile;

static mgpu_result mgpu__tmpfile_open(mgpu__tmpfile *f, const char *path, const char *fn) {
    size_t tmp_size;
    f->path = path; f->fn = fn; f->tmp = NULL; f->fd = -1;
    if (!path || !path[0]) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: path is NULL or empty", fn);
    tmp_size = strlen(path) + 32;
    if (!(f->tmp = (char *)mgpu__alloc(tmp_size, "a temporary file name"))) return MGPU_ERR_OOM_HOST;
    snprintf(f->tmp, tmp_size, "%s.tmp.%ld", path, (long)getpid());
    f->fd = open(f->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (f->fd < 0) {
        int err = errno;
        mgpu__fail(MGPU_ERR_IO, "%s: cannot write '%s': creating the temporary file '%s' failed: %s", fn, path, f->tmp, strerror(err));
        mgpu_free(f->tmp);
        f->tmp = NULL;
        return MGPU_ERR_IO;
    }
    return MGPU_OK;
}

/* Ends the replacement: after a write error (err != 0) the temporary file is removed and path is
   untouched; else fsync, rename over path and fsync of the directory. */
static mgpu_result mgpu__tmpfile_close(mgpu__tmpfile *f, int err) {
    const char *step = "write";
    mgpu_result r = MGPU_OK;
    if (!err && fsync(f->fd) != 0) { err = errno; step = "fsync"; }
    if (close(f->fd) != 0 && !err) { err = errno; step = "close"; }
    if (!err && rename(f->tmp, f->path) != 0) { err = errno; step = "rename"; }
    if (err) {
        unlink(f->tmp);
        r = mgpu__fail(MGPU_ERR_IO, "%s: cannot write '%s': %s of '%s' failed: %s", f->fn, f->path, step, f->tmp, strerror(err));
    } else if ((err = mgpu__fsync_parent_dir(f->path)) != 0) {
        r = mgpu__fail(MGPU_ERR_IO, "%s: wrote '%s' but could not fsync its directory: %s", f->fn, f->path, strerror(err));
    }
    mgpu_free(f->tmp);
    f->tmp = NULL; f->fd = -1;
    return r;
}

/* Abandons the replacement after a failure already reported (path untouched, no new error). */
static void mgpu__tmpfile_abort(mgpu__tmpfile *f) {
    close(f->fd);
    unlink(f->tmp);
    mgpu_free(f->tmp);
    f->tmp = NULL; f->fd = -1;
}

/* Atomic replacement of path by the concatenation of spans. */
static mgpu_result mgpu__write_atomic_spans(const char *path, const mgpu__span *spans, int n_spans, const char *fn) {
    mgpu__tmpfile f;
    mgpu__stream s;
    mgpu_result r;
    int i, err = 0;
    if ((r = mgpu__tmpfile_open(&f, path, fn)) != MGPU_OK) return r;
    mgpu__stream_init(&s, f.fd, 0, NULL);
    for (i = 0; i < n_spans && !err; i++) err = mgpu__stream_write(&s, spans[i].data, spans[i].len);
    return mgpu__tmpfile_close(&f, err);
}

MGPU_API mgpu_result mgpu_write_file_atomic(const char *path, const void *data, size_t len) {
    mgpu__span span;
    if (!data && len) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_write_file_atomic: data is NULL but len is %zu", len);
    span.data = data; span.len = len;
    return mgpu__write_atomic_spans(path, &span, 1, "mgpu_write_file_atomic");
}

MGPU_API mgpu_result mgpu_read_file(const char *path, void **data, size_t *len) {
    struct stat st;
    size_t cap, used = 0;
    char *buf;
    int fd, err = 0;
    if (!path || !data || !len) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_read_file: path, data and len must not be NULL");
    *data = NULL; *len = 0;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return mgpu__fail(MGPU_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    if (fstat(fd, &st) != 0) err = errno;
    else if (S_ISDIR(st.st_mode)) err = EISDIR;
    if (err) {
        close(fd);
        return mgpu__fail(MGPU_ERR_IO, "cannot read '%s': %s", path, strerror(err));
    }
    /* room for a NUL after the data and one spare byte, so end of file is seen without growing;
       files without a size (pipes, /proc) grow */
    cap = st.st_size > 0 ? (size_t)st.st_size + 2 : 4096;
    buf = (char *)mgpu__alloc(cap, path);
    while (buf) {
        ssize_t got;
        if (used + 1 >= cap) {
            char *grown = (char *)mgpu__alloc(2 * cap, path);
            if (grown) memcpy(grown, buf, used);
            mgpu_free(buf);
            buf = grown; cap *= 2;
            if (!buf) break;
        }
        got = read(fd, buf + used, cap - used - 1);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) { err = errno; break; }
        if (got == 0) break;
        used += (size_t)got;
    }
    close(fd);
    if (!buf) return MGPU_ERR_OOM_HOST;
    if (err) { mgpu_free(buf); return mgpu__fail(MGPU_ERR_IO, "cannot read '%s': %s", path, strerror(err)); }
    buf[used] = 0; /* text files can be used as C strings */
    *data = buf; *len = used;
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   JSON (RFC 8259): strict recursive descent into the mgpu_json DOM
   -------------------------------------------------------------------------------------- */

#define MGPU__JSON_MAX_DEPTH 64

typedef struct mgpu__json_parser {
    const char *s; size_t len, pos;
    const char *label;
    int failed;
} mgpu__json_parser;

/* Records the first failure (label and byte offset); returns NULL so parsers can `return` it. */
static mgpu_json *mgpu__json_error(mgpu__json_parser *p, const char *what) {
    if (!p->failed) mgpu__fail(MGPU_ERR_FORMAT, "%s: invalid JSON at byte %zu: %s", p->label, p->pos, what);
    p->failed = 1;
    return NULL;
}

/* Length of the well-formed UTF-8 sequence at s (n bytes left), 0 if ill-formed: overlong,
   a surrogate, above U+10FFFF or cut short. */
static size_t mgpu__utf8_seq_len(const unsigned char *s, size_t n) {
    uint32_t cp;
    size_t k, i;
    if (s[0] < 0x80) return 1;
    if (s[0] >= 0xc2 && s[0] <= 0xdf) { k = 2; cp = s[0] & 0x1fu; }
    else if (s[0] >= 0xe0 && s[0] <= 0xef) { k = 3; cp = s[0] & 0x0fu; }
    else if (s[0] >= 0xf0 && s[0] <= 0xf4) { k = 4; cp = s[0] & 0x07u; }
    else return 0;
    if (n < k) return 0;
    for (i = 1; i < k; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3fu);
    }
    if ((k == 3 && cp < 0x800) || (k == 4 && (cp < 0x10000 || cp > 0x10ffff)) || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    return k;
}
static int mgpu__utf8_valid(const char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        size_t k = mgpu__utf8_seq_len((const unsigned char *)s + i, n - i);
        if (!k) return 0;
        i += k;
    }
    return 1;
}
static size_t mgpu__utf8_encode(uint32_t cp, char *out) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) { out[0] = (char)(0xc0 | (cp >> 6)); out[1] = (char)(0x80 | (cp & 0x3f)); return 2; }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | (cp >> 12)); out[1] = (char)(0x80 | ((cp >> 6) & 0x3f)); out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | (cp >> 18)); out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3f)); out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

static int mgpu__is_digit(char c) { return c >= '0' && c <= '9'; }

static void mgpu__json_skip_ws(mgpu__json_parser *p) {
    while (p->pos < p->len && (p->s[p->pos] == ' ' || p->s[p->pos] == '\t' || p->s[p->pos] == '\n' || p->s[p->pos] == '\r')) p->pos++;
}

/* New zeroed node followed by `extra` bytes of storage (a number's text). */
static mgpu_json *mgpu__json_new(mgpu__json_parser *p, mgpu_json_type type, size_t extra) {
    mgpu_json *j = (mgpu_json *)mgpu__calloc(sizeof(mgpu_json) + extra, "a JSON value");
    if (!j) { p->failed = 1; return NULL; }
    j->type = type;
    return j;
}

/* Four hex digits at p->s[at] -> code unit, or -1. The caller checked they lie before the string's end. */
static long mgpu__json_hex4(const mgpu__json_parser *p, size_t at) {
    long v = 0;
    size_t i;
    for (i = at; i < at + 4; i++) {
        char c = p->s[i];
        int d = mgpu__is_digit(c) ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

/* Code point of the \uXXXX escape at p->pos (a surrogate pair counts as one), or the reason it is bad. */
static long mgpu__json_code_point(const mgpu__json_parser *p, size_t end, const char **bad) {
    long cp = p->pos + 6 <= end ? mgpu__json_hex4(p, p->pos + 2) : -1, low = -1;
    if (cp < 0) *bad = "\\u must be followed by four hex digits";
    else if (cp >= 0xdc00 && cp <= 0xdfff) *bad = "lone low surrogate in a \\u escape";
    else if (cp >= 0xd800 && cp <= 0xdbff) {
        if (p->pos + 12 <= end && p->s[p->pos + 6] == '\\' && p->s[p->pos + 7] == 'u') low = mgpu__json_hex4(p, p->pos + 8);
        if (low < 0xdc00 || low > 0xdfff) *bad = "high surrogate not followed by a low surrogate \\u escape";
        else cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
    } else if (cp == 0) *bad = "\\u0000 is not supported (strings are NUL-terminated)";
    return cp;
}

/* One escape at p->pos (the backslash), before `end` (the closing quote); appends UTF-8 to out. */
static int mgpu__json_unescape(mgpu__json_parser *p, size_t end, char *out, size_t *n) {
    static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
    const char *simple, *bad = NULL;
    long cp;
    if (p->s[p->pos + 1] != 'u') {
        simple = strchr(from, p->s[p->pos + 1]);
        if (!simple || !*simple) { mgpu__json_error(p, "invalid escape sequence"); return 0; }
        out[(*n)++] = to[simple - from];
        p->pos += 2;
        return 1;
    }
    cp = mgpu__json_code_point(p, end, &bad);
    if (bad) { mgpu__json_error(p, bad); return 0; }
    *n += mgpu__utf8_encode((uint32_t)cp, out + *n);
    p->pos += cp >= 0x10000 ? 12 : 6;
    return 1;
}

/* The string whose opening quote is at p->pos, unescaped into a new NUL-terminated buffer. */
static char *mgpu__json_string_text(mgpu__json_parser *p) {
    size_t end = p->pos + 1, n = 0;
    char *out;
    /* find the closing quote first: the unescaped text is never longer than the source */
    while (end < p->len && p->s[end] != '"') end += p->s[end] == '\\' ? 2 : 1;
    if (end >= p->len) { mgpu__json_error(p, "unterminated string"); return NULL; }
    out = (char *)mgpu__alloc(end - p->pos, "a JSON string");
    if (!out) { p->failed = 1; return NULL; }
    p->pos++;
    while (p->pos < end) {
        unsigned char c = (unsigned char)p->s[p->pos];
        size_t k;
        if (c < 0x20) { mgpu__json_error(p, "control character in a string (must be escaped)"); break; }
        if (c == '\\') {
            if (!mgpu__json_unescape(p, end, out, &n)) break;
            continue;
        }
        k = mgpu__utf8_seq_len((const unsigned char *)p->s + p->pos, end - p->pos);
        if (!k) { mgpu__json_error(p, "invalid UTF-8 in a string"); break; }
        memcpy(out + n, p->s + p->pos, k);
        n += k; p->pos += k;
    }
    if (p->failed) { mgpu_free(out); return NULL; }
    out[n] = 0;
    p->pos = end + 1;
    return out;
}

/* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?, kept as text too for exact integers. */
static mgpu_json *mgpu__json_number(mgpu__json_parser *p) {
    size_t start = p->pos, i = p->pos;
    mgpu_json *j;
    char *raw;
    if (p->s[i] == '-') i++;
    if (i >= p->len || !mgpu__is_digit(p->s[i])) { p->pos = i; return mgpu__json_error(p, "expected a digit in a number"); }
    if (p->s[i] == '0') {
        i++;
        if (i < p->len && mgpu__is_digit(p->s[i])) { p->pos = i; return mgpu__json_error(p, "leading zeros are not allowed in numbers"); }
    } else {
        while (i < p->len && mgpu__is_digit(p->s[i])) i++;
    }
    if (i < p->len && p->s[i] == '.') {
        i++;
        if (i >= p->len || !mgpu__is_digit(p->s[i])) { p->pos = i; return mgpu__json_error(p, "expected a digit after the decimal point"); }
        while (i < p->len && mgpu__is_digit(p->s[i])) i++;
    }
    if (i < p->len && (p->s[i] == 'e' || p->s[i] == 'E')) {
        i++;
        if (i < p->len && (p->s[i] == '+' || p->s[i] == '-')) i++;
        if (i >= p->len || !mgpu__is_digit(p->s[i])) { p->pos = i; return mgpu__json_error(p, "expected a digit in the exponent"); }
        while (i < p->len && mgpu__is_digit(p->s[i])) i++;
    }
    j = mgpu__json_new(p, MGPU_JSON_NUMBER, i - start + 1);
    if (!j) return NULL;
    raw = (char *)(j + 1);
    memcpy(raw, p->s + start, i - start);
    raw[i - start] = 0;
    j->raw = raw; j->raw_len = i - start;
    j->number = strtod(raw, NULL);
    if (isinf(j->number)) { mgpu_free(j); return mgpu__json_error(p, "number out of range"); }
    p->pos = i;
    return j;
}

static mgpu_json *mgpu__json_literal(mgpu__json_parser *p) {
    static const char *const words[3] = {"true", "false", "null"};
    int w;
    for (w = 0; w < 3; w++) {
        size_t n = strlen(words[w]);
        if (p->len - p->pos >= n && memcmp(p->s + p->pos, words[w], n) == 0) {
            mgpu_json *j = mgpu__json_new(p, w == 2 ? MGPU_JSON_NULL : MGPU_JSON_BOOL, 0);
            if (j) j->boolean = w == 0;
            p->pos += n;
            return j;
        }
    }
    return mgpu__json_error(p, "unexpected character (expected a value)");
}

static mgpu_json *mgpu__json_value(mgpu__json_parser *p, int depth);

/* An array or object (opening bracket at p->pos); depth counts the containers around it. */
static mgpu_json *mgpu__json_container(mgpu__json_parser *p, int depth, int is_object) {
    char closer = is_object ? '}' : ']';
    mgpu_json *node, **tail;
    if (depth > MGPU__JSON_MAX_DEPTH) return mgpu__json_error(p, "nested deeper than 64 levels");
    node = mgpu__json_new(p, is_object ? MGPU_JSON_OBJECT : MGPU_JSON_ARRAY, 0);
    if (!node) return NULL;
    tail = &node->child;
    p->pos++;
    mgpu__json_skip_ws(p);
    if (p->pos < p->len && p->s[p->pos] == closer) { p->pos++; return node; }
    for (;;) {
        char *key = NULL;
        mgpu_json *item;
        if (is_object) {
            mgpu__json_skip_ws(p);
            if (p->pos >= p->len || p->s[p->pos] != '"') { mgpu__json_error(p, "expected a string key"); break; }
            if (!(key = mgpu__json_string_text(p))) break;
            mgpu__json_skip_ws(p);
            if (p->pos >= p->len || p->s[p->pos] != ':') { mgpu_free(key); mgpu__json_error(p, "expected ':' after an object key"); break; }
            p->pos++;
        }
        if (!(item = mgpu__json_value(p, depth))) { mgpu_free(key); break; }
        item->key = key;
        *tail = item; tail = &item->next;
        node->count++;
        mgpu__json_skip_ws(p);
        if (p->pos < p->len && p->s[p->pos] == ',') { p->pos++; continue; }
        if (p->pos < p->len && p->s[p->pos] == closer) { p->pos++; return node; }
        mgpu__json_error(p, is_object ? "expected ',' or '}' after an object member" : "expected ',' or ']' after an array element");
        break;
    }
    mgpu_json_free(node);
    return NULL;
}

static mgpu_json *mgpu__json_value(mgpu__json_parser *p, int depth) {
    char c;
    mgpu__json_skip_ws(p);
    if (p->pos >= p->len) return mgpu__json_error(p, "unexpected end of input (expected a value)");
    c = p->s[p->pos];
    if (c == '{' || c == '[') return mgpu__json_container(p, depth + 1, c == '{');
    if (c == '-' || mgpu__is_digit(c)) return mgpu__json_number(p);
    if (c == '"') {
        char *text = mgpu__json_string_text(p);
        mgpu_json *j = text ? mgpu__json_new(p, MGPU_JSON_STRING, 0) : NULL;
        if (!j) { mgpu_free(text); return NULL; }
        j->string = text;
        return j;
    }
    return mgpu__json_literal(p);
}

MGPU_API mgpu_json *mgpu_json_parse(const char *text, size_t len, const char *label) {
    mgpu__json_parser p;
    mgpu_json *root;
    if (!text && len) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_json_parse: text is NULL but len is %zu", len);
    p.s = text ? text : ""; p.len = len; p.pos = 0;
    p.label = label ? label : "JSON";
    p.failed = 0;
    root = mgpu__json_value(&p, 0);
    if (!root) return NULL;
    mgpu__json_skip_ws(&p);
    if (p.pos != p.len) {
        mgpu_json_free(root);
        return mgpu__json_error(&p, "unexpected text after the JSON value");
    }
    return root;
}

MGPU_API void mgpu_json_free(mgpu_json *j) {
    /* siblings iteratively, children recursively (nesting is at most 64 deep) */
    while (j) {
        mgpu_json *next = j->next;
        mgpu_json_free(j->child);
        mgpu_free(j->string);
        mgpu_free(j->key);
        mgpu_free(j);
        j = next;
    }
}

MGPU_API const mgpu_json *mgpu_json_get(const mgpu_json *obj, const char *key) {
    const mgpu_json *c;
    if (!obj || obj->type != MGPU_JSON_OBJECT || !key) return NULL;
    for (c = obj->child; c; c = c->next)
        if (c->key && strcmp(c->key, key) == 0) return c;
    return NULL;
}

MGPU_API int mgpu_json_int64(const mgpu_json *j, int64_t *out) {
    char text[24];
    size_t i;
    int plain;
    if (!j || j->type != MGPU_JSON_NUMBER) return 0;
    plain = j->raw && j->raw_len > 0 && j->raw_len < sizeof text;
    for (i = 0; plain && i < j->raw_len; i++) plain = mgpu__is_digit(j->raw[i]) || (i == 0 && j->raw[i] == '-');
    if (plain) {
        /* integer text: exact through strtoll (a double loses digits past 2^53) */
        long long v;
        memcpy(text, j->raw, j->raw_len);
        text[j->raw_len] = 0;
        errno = 0;
        v = strtoll(text, NULL, 10);
        if (errno == ERANGE) return 0;
        if (out) *out = (int64_t)v;
        return 1;
    }
    /* 1e3 or 2.0: integral if the double is, and exact below 2^53 */
    if (j->number != floor(j->number) || fabs(j->number) > 9007199254740992.0) return 0;
    if (out) *out = (int64_t)j->number;
    return 1;
}

/* --------------------------------------------------------------------------------------
   safetensors: 8-byte little-endian header length N, N bytes of JSON, then the data section
   -------------------------------------------------------------------------------------- */

#define MGPU__ST_MAX_HEADER ((uint64_t)100 << 20)

typedef struct mgpu__st_item { mgpu_safetensors_entry e; uint64_t begin, end; } mgpu__st_item;
struct mgpu_safetensors {
    char *label;                 /* file path (or the caller's label) for messages */
    uint8_t *bytes; size_t len;  /* the whole file; entries point into it */
    mgpu_json *header;           /* entry names and metadata point into it */
    const mgpu_json *metadata;   /* "__metadata__" or NULL */
    int n;
    mgpu__st_item *items;        /* header order */
    mgpu__st_item **by_name;     /* sorted by name, for lookup */
};

/* Format failure naming the file and, when known, the tensor. */
static mgpu_result mgpu__st_error(mgpu_result code, const char *label, const char *tensor, const char *fmt, ...) MGPU__PRINTF(4, 5);
static mgpu_result mgpu__st_error(mgpu_result code, const char *label, const char *tensor, const char *fmt, ...) {
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (tensor) return mgpu__fail(code, "%s: tensor '%s': %s", label, tensor, what);
    return mgpu__fail(code, "%s: %s", label, what);
}

/* dtypes of the safetensors spec this library has no tensor type for */
static int mgpu__st_known_unsupported_dtype(const char *name) {
    static const char *const names[] = {"F64", "I8", "I16", "U16", "U32", "U64", "BOOL", "F8_E4M3", "F8_E5M2",
                                        "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64"};
    size_t i;
    for (i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(name, names[i]) == 0) return 1;
    return 0;
}

static mgpu_result mgpu__st_parse_dtype(const char *label, const char *name, const mgpu_json *j, mgpu_dtype *dt) {
    if (!j) return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "missing \"dtype\"");
    if (j->type != MGPU_JSON_STRING) return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "\"dtype\" is not a string");
    if (mgpu_dtype_from_name(j->string, dt)) return MGPU_OK;
    if (mgpu__st_known_unsupported_dtype(j->string))
        return mgpu__st_error(MGPU_ERR_UNSUPPORTED, label, name, "dtype %s is not supported (F32, F16, BF16, I32, I64, U8 are)", j->string);
    return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "unknown dtype \"%.32s\"", j->string);
}

/* A non-negative integer of an array element, or -1. */
static int64_t mgpu__json_nonneg(const mgpu_json *j) {
    int64_t v;
    return mgpu_json_int64(j, &v) && v >= 0 ? v : -1;
}

static mgpu_result mgpu__st_parse_shape(const char *label, const char *name, const mgpu_json *j, mgpu__st_item *it) {
    const mgpu_json *d;
    uint64_t numel = 1;
    if (!j) return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "missing \"shape\"");
    if (j->type != MGPU_JSON_ARRAY) return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "\"shape\" is not an array");
    if (j->count > MGPU_MAX_DIMS)
        return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "\"shape\" has %lld dimensions, at most %d are supported", (long long)j->count, MGPU_MAX_DIMS);
    it->e.ndim = 0;
    for (d = j->child; d; d = d->next) {
        int64_t v = mgpu__json_nonneg(d);
        if (v < 0) return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "\"shape\" dimension %d is not a non-negative integer", it->e.ndim);
        if (v && numel > UINT64_MAX / (uint64_t)v) return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "\"shape\" overflows");
        numel *= (uint64_t)v;
        it->e.shape[it->e.ndim++] = v;
    }
    if (numel > UINT64_MAX / mgpu_dtype_size(it->e.dtype)) return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "\"shape\" overflows");
    it->e.nbytes = (size_t)(numel * mgpu_dtype_size(it->e.dtype));
    return MGPU_OK;
}

static mgpu_result mgpu__st_parse_offsets(const char *label, const char *name, const mgpu_json *j, uint64_t data_len, mgpu__st_item *it) {
    int64_t begin = 0, end = 0;
    if (!j) return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "missing \"data_offsets\"");
    if (j->type != MGPU_JSON_ARRAY || j->count != 2 || (begin = mgpu__json_nonneg(j->child)) < 0 || (end = mgpu__json_nonneg(j->child->next)) < 0)
        return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "\"data_offsets\" is not two non-negative integers");
    if (begin > end) return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "data_offsets [%lld, %lld] begin after they end", (long long)begin, (long long)end);
    if ((uint64_t)end > data_len)
        return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "data_offsets end %lld is beyond the %llu-byte data section", (long long)end, (unsigned long long)data_len);
    if ((uint64_t)(end - begin) != it->e.nbytes) {
        char shape[96];
        mgpu_shape_string(it->e.ndim, it->e.shape, shape, sizeof shape);
        return mgpu__st_error(MGPU_ERR_FORMAT, label, name, "data_offsets [%lld, %lld] hold %lld bytes but %s %s needs %zu",
                              (long long)begin, (long long)end, (long long)(end - begin), mgpu_dtype_name(it->e.dtype), shape, it->e.nbytes);
    }
    it->begin = (uint64_t)begin; it->end = (uint64_t)end;
    return MGPU_OK;
}

static mgpu_result mgpu__st_parse_entry(const char *label, const mgpu_json *m, uint64_t data_len, mgpu__st_item *it) {
    const mgpu_json *c;
    mgpu_result r;
    it->e.name = m->key;
    if (m->type != MGPU_JSON_OBJECT) return mgpu__st_error(MGPU_ERR_FORMAT, label, m->key, "entry is not an object");
    for (c = m->child; c; c = c->next)
        if (strcmp(c->key, "dtype") != 0 && strcmp(c->key, "shape") != 0 && strcmp(c->key, "data_offsets") != 0)
            return mgpu__st_error(MGPU_ERR_FORMAT, label, m->key, "unexpected key \"%.64s\"", c->key);
    if ((r = mgpu__st_parse_dtype(label, m->key, mgpu_json_get(m, "dtype"), &it->e.dtype)) != MGPU_OK) return r;
    if ((r = mgpu__st_parse_shape(label, m->key, mgpu_json_get(m, "shape"), it)) != MGPU_OK) return r;
    return mgpu__st_parse_offsets(label, m->key, mgpu_json_get(m, "data_offsets"), data_len, it);
}

static mgpu_result mgpu__st_parse_metadata(const char *label, const mgpu_json *m) {
    const mgpu_json *c;
    if (m->type != MGPU_JSON_OBJECT) return mgpu__st_error(MGPU_ERR_FORMAT, label, NULL, "\"__metadata__\" is not an object");
    for (c = m->child; c; c = c->next)
        if (c->type != MGPU_JSON_STRING) return mgpu__st_error(MGPU_ERR_FORMAT, label, NULL, "\"__metadata__\" value of \"%.64s\" is not a string", c->key);
    return MGPU_OK;
}

static int mgpu__st_cmp_name(const void *a, const void *b) {
    return strcmp((*(const mgpu__st_item *const *)a)->e.name, (*(const mgpu__st_item *const *)b)->e.name);
}
static int mgpu__st_cmp_offsets(const void *a, const void *b) {
    const mgpu__st_item *x = *(const mgpu__st_item *const *)a, *y = *(const mgpu__st_item *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}
static int mgpu__st_cmp_key(const void *key, const void *item) {
    return strcmp((const char *)key, (*(const mgpu__st_item *const *)item)->e.name);
}

/* Names unique; byte ranges in order cover the data section exactly (no overlap, no hole). */
static mgpu_result mgpu__st_check_layout(mgpu_safetensors *st, uint64_t data_len) {
    mgpu__st_item **by_offset;
    uint64_t at = 0;
    int i;
    mgpu_result r = MGPU_OK;
    for (i = 0; i < st->n; i++) st->by_name[i] = &st->items[i];
    qsort(st->by_name, (size_t)st->n, sizeof *st->by_name, mgpu__st_cmp_name);
    for (i = 1; i < st->n; i++)
        if (strcmp(st->by_name[i - 1]->e.name, st->by_name[i]->e.name) == 0)
            return mgpu__st_error(MGPU_ERR_FORMAT, st->label, st->by_name[i]->e.name, "appears twice in the header");
    by_offset = (mgpu__st_item **)mgpu__alloc(sizeof *by_offset * (size_t)(st->n + 1), "safetensors validation");
    if (!by_offset) return MGPU_ERR_OOM_HOST;
    memcpy(by_offset, st->by_name, sizeof *by_offset * (size_t)st->n);
    qsort(by_offset, (size_t)st->n, sizeof *by_offset, mgpu__st_cmp_offsets);
    for (i = 0; i < st->n && r == MGPU_OK; i++) {
        const mgpu__st_item *it = by_offset[i];
        if (it->begin < at)
            r = mgpu__st_error(MGPU_ERR_FORMAT, st->label, it->e.name, "bytes [%llu, %llu) overlap tensor '%s'", (unsigned long long)it->begin,
                               (unsigned long long)it->end, by_offset[i - 1]->e.name);
        else if (it->begin > at)
            r = mgpu__st_error(MGPU_ERR_FORMAT, st->label, it->e.name, "bytes [%llu, %llu) leave a hole of %llu unused bytes before them",
                               (unsigned long long)it->begin, (unsigned long long)it->end, (unsigned long long)(it->begin - at));
        at = it->end;
    }
    if (r == MGPU_OK && at != data_len)
        r = mgpu__st_error(MGPU_ERR_FORMAT, st->label, NULL, "the tensors cover %llu bytes but the data section holds %llu",
                           (unsigned long long)at, (unsigned long long)data_len);
    mgpu_free(by_offset);
    return r;
}

/* Parses the header members into st->items and the metadata. */
static mgpu_result mgpu__st_parse_members(mgpu_safetensors *st, uint64_t data_len, const uint8_t *data) {
    const mgpu_json *m;
    mgpu_result r;
    int n = 0;
    for (m = st->header->child; m; m = m->next) {
        if (strcmp(m->key, "__metadata__") == 0) {
            if (st->metadata) return mgpu__st_error(MGPU_ERR_FORMAT, st->label, NULL, "\"__metadata__\" appears twice");
            if ((r = mgpu__st_parse_metadata(st->label, m)) != MGPU_OK) return r;
            st->metadata = m;
            continue;
        }
        if ((r = mgpu__st_parse_entry(st->label, m, data_len, &st->items[n])) != MGPU_OK) return r;
        st->items[n].e.data = data + st->items[n].begin;
        n++;
    }
    st->n = n;
    return mgpu__st_check_layout(st, data_len);
}

/* Validates a whole file image, taking ownership of bytes (freed on failure). */
static mgpu_safetensors *mgpu__st_from_bytes(uint8_t *bytes, size_t len, const char *label) {
    mgpu_safetensors *st;
    uint64_t hlen = 0;
    int i;
    mgpu_result r;
    if (len < 8) {
        mgpu__st_error(MGPU_ERR_FORMAT, label, NULL, "file is %zu bytes, shorter than the 8-byte header length", len);
        mgpu_free(bytes);
        return NULL;
    }
    for (i = 7; i >= 0; i--) hlen = (hlen << 8) | bytes[i];
    if (hlen > MGPU__ST_MAX_HEADER || hlen > len - 8 || hlen < 2 || bytes[8] != '{') {
        if (hlen > MGPU__ST_MAX_HEADER || hlen > len - 8)
            mgpu__st_error(MGPU_ERR_FORMAT, label, NULL, "header length %llu exceeds the file's remaining %zu bytes (or the 100 MB limit)",
                           (unsigned long long)hlen, len - 8);
        else if (hlen < 2) mgpu__st_error(MGPU_ERR_FORMAT, label, NULL, "header length %llu is too small for a JSON object", (unsigned long long)hlen);
        else mgpu__st_error(MGPU_ERR_FORMAT, label, NULL, "the header does not start with '{'");
        mgpu_free(bytes);
        return NULL;
    }
    st = (mgpu_safetensors *)mgpu__calloc(sizeof *st, "a safetensors file");
    if (!st) { mgpu_free(bytes); return NULL; }
    st->bytes = bytes; st->len = len;
    st->label = mgpu__strdup(label);
    if (!st->label) { mgpu_safetensors_close(st); return NULL; }
    {
        char hlabel[300];
        snprintf(hlabel, sizeof hlabel, "%.256s header", label);
        st->header = mgpu_json_parse((const char *)bytes + 8, (size_t)hlen, hlabel);
    }
    if (!st->header) { mgpu_safetensors_close(st); return NULL; }
    st->items = (mgpu__st_item *)mgpu__calloc(sizeof *st->items * (size_t)(st->header->count + 1), "safetensors entries");
    st->by_name = (mgpu__st_item **)mgpu__calloc(sizeof *st->by_name * (size_t)(st->header->count + 1), "safetensors entries");
    r = st->items && st->by_name ? mgpu__st_parse_members(st, len - 8 - hlen, bytes + 8 + hlen) : MGPU_ERR_OOM_HOST;
    if (r != MGPU_OK) { mgpu_safetensors_close(st); return NULL; }
    return st;
}

MGPU_API mgpu_safetensors *mgpu_safetensors_parse(const void *bytes, size_t len, const char *label) {
    uint8_t *copy;
    if (!bytes && len) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_parse: bytes is NULL but len is %zu", len);
    copy = (uint8_t *)mgpu__alloc(len, "a safetensors copy");
    if (!copy) return NULL;
    if (len) memcpy(copy, bytes, len);
    return mgpu__st_from_bytes(copy, len, label ? label : "safetensors data");
}

MGPU_API mgpu_safetensors *mgpu_safetensors_open(const char *path) {
    void *data = NULL;
    size_t len = 0;
    if (!path) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_open: path is NULL");
    if (mgpu_read_file(path, &data, &len) != MGPU_OK) return NULL;
    return mgpu__st_from_bytes((uint8_t *)data, len, path);
}

MGPU_API void mgpu_safetensors_close(mgpu_safetensors *st) {
    if (!st) return;
    mgpu_json_free(st->header);
    mgpu_free(st->items);
    mgpu_free(st->by_name);
    mgpu_free(st->bytes);
    mgpu_free(st->label);
    mgpu_free(st);
}
MGPU_API int mgpu_safetensors_count(const mgpu_safetensors *st) { return st ? st->n : 0; }
MGPU_API const mgpu_safetensors_entry *mgpu_safetensors_get(const mgpu_safetensors *st, int i) {
    if (!st || i < 0 || i >= st->n) return NULL;
    return &st->items[i].e;
}
MGPU_API const mgpu_safetensors_entry *mgpu_safetensors_find(const mgpu_safetensors *st, const char *name) {
    mgpu__st_item **hit;
    if (!st || !name || st->n == 0) return NULL;
    hit = (mgpu__st_item **)bsearch(name, st->by_name, (size_t)st->n, sizeof *st->by_name, mgpu__st_cmp_key);
    return hit ? &(*hit)->e : NULL;
}
MGPU_API const char *mgpu_safetensors_metadata(const mgpu_safetensors *st, const char *key) {
    const mgpu_json *v = st ? mgpu_json_get(st->metadata, key) : NULL;
    return v ? v->string : NULL;
}

/* Whether entry e can be read into dst (on any device): same shape, same dtype or float <-> float. */
static mgpu_result mgpu__st_check_fits(const char *label, const mgpu_safetensors_entry *e, const mgpu_tensor *dst) {
    char file_shape[96], dst_shape[96];
    if (dst->ndim != e->ndim || (e->ndim && memcmp(dst->shape, e->shape, sizeof(int64_t) * (size_t)e->ndim) != 0)) {
        mgpu_shape_string(e->ndim, e->shape, file_shape, sizeof file_shape);
        mgpu_shape_string(dst->ndim, dst->shape, dst_shape, sizeof dst_shape);
        return mgpu__st_error(MGPU_ERR_SHAPE, label, e->name, "shape %s in the file, but the destination tensor is %s", file_shape, dst_shape);
    }
    if (dst->dtype != e->dtype && !(mgpu__dtype_is_float(dst->dtype) && mgpu__dtype_is_float(e->dtype)))
        return mgpu__st_error(MGPU_ERR_SHAPE, label, e->name, "dtype %s in the file cannot be read into a %s tensor",
                              mgpu_dtype_name(e->dtype), mgpu_dtype_name(dst->dtype));
    if (dst->numel && !dst->data) return mgpu__st_error(MGPU_ERR_INVALID_ARG, label, e->name, "the destination tensor has no data");
    return MGPU_OK;
}

/* Float element conversion between F32/F16/BF16 (memcpy: file data may be unaligned). */
typedef struct mgpu__convert_job { const uint8_t *src; mgpu_dtype from; uint8_t *dst; mgpu_dtype to; } mgpu__convert_job;

static float mgpu__load_float(const uint8_t *p, mgpu_dtype dt) {
    float f;
    uint16_t h;
    if (dt == MGPU_F32) { memcpy(&f, p, 4); return f; }
    memcpy(&h, p, 2);
    return dt == MGPU_F16 ? mgpu_f16_to_f32(h) : mgpu_bf16_to_f32(h);
}
static void mgpu__store_float(uint8_t *p, mgpu_dtype dt, float f) {
    uint16_t h;
    if (dt == MGPU_F32) { memcpy(p, &f, 4); return; }
    h = dt == MGPU_F16 ? mgpu_f32_to_f16(f) : mgpu_f32_to_bf16(f);
    memcpy(p, &h, 2);
}
static void mgpu__convert_range(void *arg, int64_t begin, int64_t end) {
    const mgpu__convert_job *j = (const mgpu__convert_job *)arg;
    size_t sf = mgpu_dtype_size(j->from), sd = mgpu_dtype_size(j->to);
    int64_t i;
    for (i = begin; i < end; i++) mgpu__store_float(j->dst + (size_t)i * sd, j->to, mgpu__load_float(j->src + (size_t)i * sf, j->from));
}

/* --------------------------------------------------------------------------------------
   Tensors on a device: their bytes pass through a host staging buffer, in chunks, on the way to
   and from a file. Host tensors are read and written in place, as they always were.
   -------------------------------------------------------------------------------------- */

#define MGPU__STAGE_BYTES ((size_t)8 << 20)

/* The staging buffer, grown on demand and reused for every tensor of a file: pinned memory when
   the build has CUDA (DMA straight from it), plain memory otherwise. */
typedef struct mgpu__stage { void *p; size_t cap; int pinned; } mgpu__stage;

static void mgpu__stage_free(mgpu__stage *s) {
#ifdef MGPU_CUDA
    if (s->pinned) { mgpu_cuda_host_free(s->p); s->p = NULL; }
#endif
    mgpu_free(s->p);
    s->p = NULL; s->cap = 0; s->pinned = 0;
}

/* At least bytes (<= MGPU__STAGE_BYTES) of staging; NULL with an error when out of memory. */
static void *mgpu__stage_get(mgpu__stage *s, size_t bytes) {
    if (bytes <= s->cap && s->p) return s->p;
    mgpu__stage_free(s);
#ifdef MGPU_CUDA
    if ((s->p = mgpu_cuda_host_alloc(bytes)) != NULL) { s->pinned = 1; s->cap = bytes; return s->p; }
    mgpu_clear_error(); /* no pinned memory: pageable memory works too, only slower */
#endif
    if ((s->p = mgpu__alloc(bytes, "staging tensor data")) != NULL) s->cap = bytes;
    return s->p;
}

/* Bytes [at, at + bytes) of t's data to or from host memory: a copy on the host, a transfer on
   the context's stream (waited for) on a device. */
static mgpu_result mgpu__tensor_get_bytes(const mgpu_tensor *t, size_t at, void *dst, size_t bytes, const char *fn) {
    if (mgpu__on_host(t)) { if (bytes) memcpy(dst, (const char *)t->data + at, bytes); return MGPU_OK; }
    return mgpu__transfer(t->ctx, dst, (const char *)t->data + at, bytes, fn);
}
static mgpu_result mgpu__tensor_put_bytes(mgpu_tensor *t, size_t at, const void *src, size_t bytes, const char *fn) {
    if (mgpu__on_host(t)) { if (bytes) memcpy((char *)t->data + at, src, bytes); return MGPU_OK; }
    return mgpu__transfer(t->ctx, (char *)t->data + at, src, bytes, fn);
}

/* Entry e (validated by mgpu__st_check_fits) into dst, converting float dtypes: in place on the
   host; chunk by chunk through the staging buffer on a device. */
static mgpu_result mgpu__st_copy(const mgpu_safetensors_entry *e, mgpu_tensor *dst, mgpu__stage *stage) {
    const char *fn = "loading a safetensors file into a device tensor";
    size_t sf = mgpu_dtype_size(e->dtype), sd = mgpu_dtype_size(dst->dtype);
    mgpu__convert_job job;
    int64_t at, n, chunk;
    mgpu_result r;
    if (dst->dtype == e->dtype) return mgpu__tensor_put_bytes(dst, 0, e->data, e->nbytes, fn);
    job.from = e->dtype; job.to = dst->dtype;
    if (mgpu__on_host(dst)) {
        job.src = (const uint8_t *)e->data; job.dst = (uint8_t *)dst->data;
        mgpu_parallel_for(dst->ctx, dst->numel, (int64_t)1 << 15, mgpu__convert_range, &job);
        return MGPU_OK;
    }
    chunk = (int64_t)(MGPU__STAGE_BYTES / sd);
    for (at = 0; at < dst->numel; at += n) {
        n = MGPU__MIN(chunk, dst->numel - at);
        if (!(job.dst = (uint8_t *)mgpu__stage_get(stage, (size_t)n * sd))) return MGPU_ERR_OOM_HOST;
        job.src = (const uint8_t *)e->data + (size_t)at * sf;
        mgpu_parallel_for(dst->ctx, n, (int64_t)1 << 15, mgpu__convert_range, &job);
        if ((r = mgpu__tensor_put_bytes(dst, (size_t)at * sd, job.dst, (size_t)n * sd, fn)) != MGPU_OK) return r;
    }
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_safetensors_read_into(const mgpu_safetensors *st, const char *name, mgpu_tensor *dst) {
    const mgpu_safetensors_entry *e;
    mgpu__stage stage;
    mgpu_result r;
    if (!st || !name || !dst) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_read_into: st, name and dst must not be NULL");
    e = mgpu_safetensors_find(st, name);
    if (!e) return mgpu__st_error(MGPU_ERR_FORMAT, st->label, name, "not in the file");
    if ((r = mgpu__st_check_fits(st->label, e, dst)) != MGPU_OK) return r;
    memset(&stage, 0, sizeof stage);
    r = mgpu__st_copy(e, dst, &stage);
    mgpu__stage_free(&stage);
    return r;
}

static int mgpu__cmp_str_ptr(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

/* Finds a string given twice; *dup is NULL when all differ. */
static mgpu_result mgpu__find_duplicate(const char *const *strs, int n, const char **dup) {
    const char **sorted;
    int i;
    *dup = NULL;
    if (n < 2) return MGPU_OK;
    sorted = (const char **)mgpu__alloc(sizeof *sorted * (size_t)n, "a duplicate check");
    if (!sorted) return MGPU_ERR_OOM_HOST;
    memcpy(sorted, strs, sizeof *sorted * (size_t)n);
    qsort(sorted, (size_t)n, sizeof *sorted, mgpu__cmp_str_ptr);
    for (i = 1; i < n && !*dup; i++)
        if (strcmp(sorted[i - 1], sorted[i]) == 0) *dup = sorted[i];
    mgpu_free(sorted);
    return MGPU_OK;
}

static mgpu_result mgpu__st_check_tensor_arg(const char *name, const mgpu_tensor *t) {
    if (!name || !name[0] || !mgpu__utf8_valid(name, strlen(name)) || strcmp(name, "__metadata__") == 0)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_save: tensor name '%s' must be non-empty UTF-8 and not __metadata__", name ? name : "(null)");
    if (!t) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_save: tensor '%s' is NULL", name);
    if (!mgpu__dtype_valid(t->dtype) || t->ndim < 0 || t->ndim > MGPU_MAX_DIMS || (t->numel && !t->data))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_save: tensor '%s' is malformed (dtype, ndim or data)", name);
    return MGPU_OK;
}

static mgpu_result mgpu__st_check_save_args(const char *path, int n, const char *const *names, const mgpu_tensor *const *tensors,
                                            int n_meta, const char *const *keys, const char *const *values) {
    const char *dup = NULL;
    mgpu_result r;
    int i;
    if (!path || !path[0]) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_save: path is NULL or empty");
    if (n < 0 || (n > 0 && (!names || !tensors)))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_save: %s: n is %d and names/tensors must be given when n > 0", path, n);
    if (n_meta < 0 || (n_meta > 0 && (!keys || !values)))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_save: %s: n_meta is %d and keys/values must be given when n_meta > 0", path, n_meta);
    for (i = 0; i < n; i++)
        if ((r = mgpu__st_check_tensor_arg(names[i], tensors[i])) != MGPU_OK) return r;
    for (i = 0; i < n_meta; i++)
        if (!keys[i] || !values[i] || !mgpu__utf8_valid(keys[i], strlen(keys[i])) || !mgpu__utf8_valid(values[i], strlen(values[i])))
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_save: %s: metadata entry %d is NULL or not UTF-8", path, i);
    if ((r = mgpu__find_duplicate(names, n, &dup)) != MGPU_OK) return r;
    if (dup) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_save: %s: tensor name '%s' is given twice", path, dup);
    if ((r = mgpu__find_duplicate(keys, n_meta, &dup)) != MGPU_OK) return r;
    if (dup) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_safetensors_save: %s: metadata key '%s' is given twice", path, dup);
    return MGPU_OK;
}

/* The JSON header, padded with spaces so the data section starts 8-byte aligned. */
static int mgpu__st_build_header(mgpu__buf *b, int n, const char *const *names, const mgpu_tensor *const *tensors,
                                 int n_meta, const char *const *keys, const char *const *values) {
    uint64_t offset = 0;
    int i, d;
    mgpu__buf_puts(b, "{");
    if (n_meta > 0) {
        mgpu__buf_puts(b, "\"__metadata__\":{");
        for (i = 0; i < n_meta; i++) {
            if (i) mgpu__buf_puts(b, ",");
            mgpu__buf_json_string(b, keys[i]);
            mgpu__buf_puts(b, ":");
            mgpu__buf_json_string(b, values[i]);
        }
        mgpu__buf_puts(b, n ? "}," : "}");
    }
    for (i = 0; i < n; i++) {
        const mgpu_tensor *t = tensors[i];
        uint64_t bytes = (uint64_t)mgpu_tensor_nbytes(t);
        if (i) mgpu__buf_puts(b, ",");
        mgpu__buf_json_string(b, names[i]);
        mgpu__buf_printf(b, ":{\"dtype\":\"%s\",\"shape\":[", mgpu_dtype_name(t->dtype));
        for (d = 0; d < t->ndim; d++) mgpu__buf_printf(b, d ? ",%lld" : "%lld", (long long)t->shape[d]);
        mgpu__buf_printf(b, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)offset, (unsigned long long)(offset + bytes));
        offset += bytes;
    }
    mgpu__buf_puts(b, "}");
    while (b->len % 8) mgpu__buf_puts(b, " ");
    return !b->failed;
}

/* The 8-byte little-endian header length followed by the header. */
static int mgpu__st_write_header(int fd, const mgpu__buf *header) {
    uint8_t len_bytes[8];
    int i, err;
    for (i = 0; i < 8; i++) len_bytes[i] = (uint8_t)((uint64_t)header->len >> (8 * i));
    if ((err = mgpu__pwrite_fully(fd, len_bytes, 8, 0)) != 0) return err;
    return mgpu__pwrite_fully(fd, header->data, header->len, 8);
}

/* Appends t's bytes: straight from its memory on the host, through the staging buffer (in chunks)
   from a device. A failed device copy is *r (reported); else 0 or an errno value. */
static int mgpu__stream_write_tensor(mgpu__stream *s, const mgpu_tensor *t, mgpu__stage *stage, mgpu_result *r) {
    size_t bytes = mgpu_tensor_nbytes(t), at, n;
    void *buf;
    int err;
    if (mgpu__on_host(t)) return mgpu__stream_write(s, t->data, bytes);
    for (at = 0; at < bytes; at += n) {
        n = MGPU__MIN(bytes - at, MGPU__STAGE_BYTES);
        if (!(buf = mgpu__stage_get(stage, n))) { *r = MGPU_ERR_OOM_HOST; return -1; }
        if ((*r = mgpu__tensor_get_bytes(t, at, buf, n, "mgpu_safetensors_save: copying a device tensor to the host")) != MGPU_OK) return -1;
        if ((err = mgpu__stream_write(s, buf, n)) != 0) return err;
    }
    return 0;
}

/* Writes the file atomically. With checksum_key >= 0, values[checksum_key] is replaced by the
   checksum of the data section, computed in the same pass that writes the data: the header, whose
   length does not depend on the checksum's value, is built with a placeholder and written last. */
static mgpu_result mgpu__st_save(const char *path, int n, const char *const *names, const mgpu_tensor *const *tensors,
                                 int n_meta, const char *const *keys, const char *const *values, int checksum_key) {
    const char **vals = NULL;
    char checksum[40];
    mgpu__buf header;
    mgpu__tmpfile f;
    mgpu__hash64 h;
    mgpu__stream s;
    mgpu__stage stage;
    mgpu_result r;
    size_t header_len;
    int i, err = 0;
    mgpu__buf_init(&header);
    mgpu__checksum_text(0, checksum, sizeof checksum);
    if (n_meta > 0 && values && !(vals = (const char **)mgpu__alloc(sizeof *vals * (size_t)n_meta, "safetensors metadata"))) return MGPU_ERR_OOM_HOST;
    for (i = 0; vals && i < n_meta; i++) vals[i] = i == checksum_key ? checksum : values[i];
    if ((r = mgpu__st_check_save_args(path, n, names, tensors, n_meta, keys, vals)) != MGPU_OK) { mgpu_free((void *)vals); return r; }
    if (!mgpu__st_build_header(&header, n, names, tensors, n_meta, keys, vals)) r = MGPU_ERR_OOM_HOST;
    else r = mgpu__tmpfile_open(&f, path, "mgpu_safetensors_save");
    if (r != MGPU_OK) { mgpu_free((void *)vals); mgpu__buf_free(&header); return r; }
    header_len = header.len;
    mgpu__hash64_init(&h);
    memset(&stage, 0, sizeof stage);
    /* tensor data is written straight from host tensors, device tensors a chunk at a time through
       the staging buffer: never a copy of the whole model */
    mgpu__stream_init(&s, f.fd, 8 + (uint64_t)header_len, checksum_key >= 0 ? &h : NULL);
    for (i = 0; i < n && !err; i++) err = mgpu__stream_write_tensor(&s, tensors[i], &stage, &r);
    mgpu__stage_free(&stage);
    if (err && r != MGPU_OK) { /* a device copy failed and said why: the file is abandoned, path untouched */
        mgpu__tmpfile_abort(&f);
        mgpu_free((void *)vals);
        mgpu__buf_free(&header);
        return r;
    }
    if (!err && checksum_key >= 0) {
        mgpu__checksum_text(mgpu__hash64_final(&h), checksum, sizeof checksum);
        header.len = 0;
        if (!mgpu__st_build_header(&header, n, names, tensors, n_meta, keys, vals) || header.len != header_len) err = ENOMEM;
    }
    if (!err) err = mgpu__st_write_header(f.fd, &header);
    r = mgpu__tmpfile_close(&f, err);
    mgpu_free((void *)vals);
    mgpu__buf_free(&header);
    return r;
}

MGPU_API mgpu_result mgpu_safetensors_save(const char *path, int n, const char *const *names, const mgpu_tensor *const *tensors,
                                           int n_meta, const char *const *meta_keys, const char *const *meta_values) {
    return mgpu__st_save(path, n, names, tensors, n_meta, meta_keys, meta_values, -1);
}

/* --------------------------------------------------------------------------------------
   Model save/load: parameters then buffers under their state_dict names
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__model_tensors { int n; const char **names; mgpu_tensor **tensors; } mgpu__model_tensors;

static void mgpu__model_tensors_free(mgpu__model_tensors *mt) { mgpu_free(mt->names); mgpu_free((void *)mt->tensors); }

static mgpu_result mgpu__model_tensors_collect(const mgpu_model *m, mgpu__model_tensors *mt, const char *fn) {
    int np = mgpu_model_num_parameters(m), nb = mgpu_model_num_buffers(m), i;
    mt->n = np + nb;
    mt->names = (const char **)mgpu__alloc(sizeof *mt->names * (size_t)(mt->n + 1), "the model's tensor list");
    mt->tensors = (mgpu_tensor **)mgpu__alloc(sizeof *mt->tensors * (size_t)(mt->n + 1), "the model's tensor list");
    if (!mt->names || !mt->tensors) return MGPU_ERR_OOM_HOST;
    for (i = 0; i < mt->n; i++) {
        mt->names[i] = NULL;
        mt->tensors[i] = i < np ? mgpu_model_parameter(m, i, &mt->names[i]) : mgpu_model_buffer(m, i - np, &mt->names[i]);
        if (!mt->tensors[i] || !mt->names[i])
            return mgpu__fail(MGPU_ERR_STATE, "%s: the model's %s %d could not be listed", fn, i < np ? "parameter" : "buffer", i < np ? i : i - np);
    }
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_model_save(const mgpu_model *m, const char *path) {
    static const char *const meta_key[1] = {"format"}, *const meta_value[1] = {"pt"};
    mgpu__model_tensors mt;
    mgpu_result r;
    if (!m || !path) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_model_save: model and path must not be NULL");
    memset(&mt, 0, sizeof mt);
    r = mgpu__model_tensors_collect(m, &mt, "mgpu_model_save");
    if (r == MGPU_OK)
        r = mgpu_safetensors_save(path, mt.n, mt.names, (const mgpu_tensor *const *)mt.tensors, 1, meta_key, meta_value);
    mgpu__model_tensors_free(&mt);
    return r;
}

/* Every model tensor present with a fitting shape and dtype, and nothing else in the file. */
static mgpu_result mgpu__model_check_file(const mgpu_safetensors *st, const mgpu__model_tensors *mt) {
    char *seen = (char *)mgpu__calloc((size_t)st->n + 1, "model load bookkeeping");
    mgpu_result r = MGPU_OK;
    int i;
    if (!seen) return MGPU_ERR_OOM_HOST;
    for (i = 0; i < mt->n && r == MGPU_OK; i++) {
        const mgpu_safetensors_entry *e = mgpu_safetensors_find(st, mt->names[i]);
        if (!e) r = mgpu__st_error(MGPU_ERR_FORMAT, st->label, mt->names[i], "missing from the file (the model has it, shape %s)", mgpu__shape_str(mt->tensors[i]));
        else if ((r = mgpu__st_check_fits(st->label, e, mt->tensors[i])) == MGPU_OK) seen[(const mgpu__st_item *)(const void *)e - st->items] = 1;
    }
    for (i = 0; i < st->n && r == MGPU_OK; i++)
        if (!seen[i]) r = mgpu__st_error(MGPU_ERR_FORMAT, st->label, st->items[i].e.name, "unexpected: the model has no tensor of that name");
    mgpu_free(seen);
    return r;
}

MGPU_API mgpu_result mgpu_model_load(mgpu_model *m, const char *path) {
    mgpu__model_tensors mt;
    mgpu_safetensors *st = NULL;
    mgpu__stage stage;
    mgpu_result r;
    int i;
    if (!m || !path) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_model_load: model and path must not be NULL");
    memset(&mt, 0, sizeof mt);
    r = mgpu__model_tensors_collect(m, &mt, "mgpu_model_load");
    if (r == MGPU_OK && !(st = mgpu_safetensors_open(path))) r = mgpu_last_result();
    /* validate everything before touching the model, so a bad file loads nothing */
    if (r == MGPU_OK) r = mgpu__model_check_file(st, &mt);
    memset(&stage, 0, sizeof stage);
    for (i = 0; i < mt.n && r == MGPU_OK; i++) r = mgpu__st_copy(mgpu_safetensors_find(st, mt.names[i]), mt.tensors[i], &stage);
    mgpu__stage_free(&stage);
    mgpu_safetensors_close(st);
    mgpu__model_tensors_free(&mt);
    return r;
}

/* --------------------------------------------------------------------------------------
   Common training options: every string is parsed here, once, into typed fields
   -------------------------------------------------------------------------------------- */

typedef enum mgpu__opt_kind {
    MGPU__OPT_STRING,   /* non-empty text, kept by pointer */
    MGPU__OPT_ENUM,     /* one of `choices`, stored as its index in an enum field */
    MGPU__OPT_SCHEDULE, /* mgpu_schedule_parse */
    MGPU__OPT_DEVICE,   /* cpu|cuda|cuda:N|auto into device and device_index (a CPU build still parses "cuda") */
    MGPU__OPT_GPU_IDS,  /* comma-separated device indices into gpu_ids and num_gpu_ids */
    MGPU__OPT_RESUME,   /* none|auto|PATH into resume and resume_path */
    MGPU__OPT_FLAG,     /* an int 0|1: the bare flag sets it, --flag=0|1 (or false|true) spells it out */
    MGPU__OPT_INT, MGPU__OPT_I64, MGPU__OPT_U64, MGPU__OPT_FLOAT
} mgpu__opt_kind;

typedef struct mgpu__opt {
    const char *flag;     /* without the leading "--" */
    mgpu__opt_kind kind;
    size_t offset;        /* of the field in mgpu_train_opts */
    double lo, hi;        /* numeric range; no upper bound when hi < lo */
    int lo_open;          /* lo itself excluded */
    const char *choices;  /* "a|b|c" for ENUM and SCHEDULE, in the order of the enum's values */
    const char *metavar;
    const char *help;
} mgpu__opt;

/* ENUM fields are written through an int pointer, the choice's index being the enum's value. */
typedef char mgpu__enum_fields_are_int[(sizeof(mgpu_optimizer_type) == sizeof(int) && sizeof(mgpu_lr_scaling) == sizeof(int) &&
                                        sizeof(mgpu_schedule_type) == sizeof(int) && sizeof(mgpu_amp_mode) == sizeof(int) &&
                                        sizeof(mgpu_multi_gpu_mode) == sizeof(int) && sizeof(mgpu_grad_compression) == sizeof(int) &&
                                        sizeof(mgpu_cuda_graph_mode) == sizeof(int) && sizeof(mgpu_data_on_device) == sizeof(int)) ? 1 : -1];
typedef char mgpu__enum_choice_order[(MGPU_OPTIM_SGD == 0 && MGPU_OPTIM_ADAM == 1 && MGPU_OPTIM_ADAMW == 2 && MGPU_LR_SCALE_NONE == 0 &&
                                      MGPU_LR_SCALE_LINEAR == 1 && MGPU_LR_SCALE_SQRT == 2 && MGPU_AMP_OFF == 0 && MGPU_AMP_FP16 == 1 &&
                                      MGPU_AMP_BF16 == 2 && MGPU_MULTI_GPU_AUTO == 0 && MGPU_MULTI_GPU_NONE == 1 && MGPU_MULTI_GPU_DP == 2 &&
                                      MGPU_MULTI_GPU_DDP == 3 && MGPU_GRAD_COMPRESSION_NONE == 0 && MGPU_GRAD_COMPRESSION_FP16 == 1 &&
                                      MGPU_GRAD_COMPRESSION_BF16 == 2 && MGPU_CUDA_GRAPH_ON == 0 && MGPU_CUDA_GRAPH_OFF == 1 &&
                                      MGPU_DATA_ON_DEVICE_OFF == 0 && MGPU_DATA_ON_DEVICE_ON == 1 && MGPU_DATA_ON_DEVICE_AUTO == 2) ? 1 : -1];

#define MGPU__OF(field) offsetof(mgpu_train_opts, field)
static const mgpu__opt mgpu__train_opts_table[] = {
    {"data", MGPU__OPT_STRING, MGPU__OF(data_dir), 0, -1, 0, NULL, "DIR", "dataset directory (unset: $MGPU_DATA, then data/fashion-mnist, then /usr/share/datasets/fashion-mnist)"},
    {"epochs", MGPU__OPT_INT, MGPU__OF(epochs), 1, -1, 0, NULL, "N", "passes over the training set (also --num-epochs)"},
    {"batch-size", MGPU__OPT_I64, MGPU__OF(batch_size), 1, -1, 0, NULL, "N", "samples per step, per process"},
    {"lr", MGPU__OPT_FLOAT, MGPU__OF(lr), 0, -1, 1, NULL, "LR", "base learning rate (before --scale-lr)"},
    {"optimizer", MGPU__OPT_ENUM, MGPU__OF(optimizer), 0, 0, 0, "sgd|adam|adamw", "NAME", "optimizer"},
    {"weight-decay", MGPU__OPT_FLOAT, MGPU__OF(weight_decay), 0, -1, 0, NULL, "WD", "weight decay (decoupled for adamw, L2 otherwise)"},
    {"momentum", MGPU__OPT_FLOAT, MGPU__OF(momentum), 0, 1, 0, NULL, "M", "SGD momentum"},
    {"warmup-epochs", MGPU__OPT_FLOAT, MGPU__OF(warmup_epochs), 0, -1, 0, NULL, "E", "linear LR warmup, in epochs (fractions allowed)"},
    {"schedule", MGPU__OPT_SCHEDULE, MGPU__OF(schedule), 0, 0, 0, "constant|linear|cosine|cosine-restarts|step", "NAME", "LR schedule after warmup"},
    {"scale-lr", MGPU__OPT_ENUM, MGPU__OF(scale_lr), 0, 0, 0, "none|linear|sqrt", "RULE", "scale the LR by world size x accumulation steps"},
    {"grad-accum-steps", MGPU__OPT_INT, MGPU__OF(grad_accum_steps), 1, -1, 0, NULL, "N", "micro-batches per optimizer step"},
    {"clip-grad-norm", MGPU__OPT_FLOAT, MGPU__OF(clip_grad_norm), 0, -1, 0, NULL, "NORM", "clip the global gradient norm (0: off)"},
    {"amp", MGPU__OPT_ENUM, MGPU__OF(amp), 0, 0, 0, "off|fp16|bf16", "MODE", "mixed precision"},
    {"device", MGPU__OPT_DEVICE, MGPU__OF(device), 0, 0, 0, NULL, "DEV",
     "cpu, cuda (cuda:0), cuda:N or auto\nauto: a GPU when this build's CUDA backend sees one, else the CPU"},
    {"gpu-ids", MGPU__OPT_GPU_IDS, MGPU__OF(gpu_ids), 0, 0, 0, NULL, "LIST",
     "the GPUs to use, e.g. 0,1,3 (unset: every visible one)\n"
     "auto/ddp: local rank i trains on the i-th id; dp: one replica per id (required with dp)"},
    {"multi-gpu", MGPU__OPT_ENUM, MGPU__OF(multi_gpu), 0, 0, 0, "auto|none|dp|ddp", "MODE",
     "how to use several GPUs (or processes)\n"
     "auto: under a launcher (WORLD_SIZE set) DDP; else, on a GPU with several to use (--gpu-ids, or\n"
     "every visible one), start one DDP worker process per GPU (only rank 0's output is shown; one\n"
     "failing stops all); with one GPU, or on the CPU, plain training in this process\n"
     "none (or --no-multi-gpu): one process on one device (an error under a launcher with WORLD_SIZE > 1)\n"
     "dp: one process, one replica per --gpu-ids entry, each on a thread of its own\n"
     "ddp: DDP, needs a launcher that sets WORLD_SIZE (mgpurun, srun; WORLD_SIZE=1: world size 1)\n"
     "the LR is not scaled with the number of GPUs unless --scale-lr says so"},
    {"num-workers", MGPU__OPT_INT, MGPU__OF(num_workers), 0, 256, 0, NULL, "N", "data loader threads (0: load on the training thread)"},
    {"eval-frequency", MGPU__OPT_INT, MGPU__OF(eval_frequency), 0, -1, 0, NULL, "N", "evaluate every N epochs (0: only after the last)"},
    {"save-dir", MGPU__OPT_STRING, MGPU__OF(save_dir), 0, -1, 0, NULL, "DIR", "checkpoint and final model directory (unset: no saving)"},
    {"checkpoint-every-epochs", MGPU__OPT_INT, MGPU__OF(checkpoint_every_epochs), 0, -1, 0, NULL, "N", "checkpoint every N epochs (0: off)"},
    {"checkpoint-interval-min", MGPU__OPT_FLOAT, MGPU__OF(checkpoint_interval_min), 0, -1, 0, NULL, "MIN", "checkpoint every MIN minutes of wall time (0: off)"},
    {"keep-last", MGPU__OPT_INT, MGPU__OF(keep_last), 0, -1, 0, NULL, "N", "checkpoints to keep (0: all)"},
    {"resume", MGPU__OPT_RESUME, MGPU__OF(resume), 0, -1, 0, NULL, "WHAT", "auto (latest in --save-dir), none, or a checkpoint or save directory"},
    {"eval-only", MGPU__OPT_FLAG, MGPU__OF(eval_only), 0, 1, 0, NULL, "",
     "evaluate on the test set and exit; nothing is trained\n"
     "the model of --resume (a checkpoint or save directory), else of --init-from, else as initialised"},
    {"init-from", MGPU__OPT_STRING, MGPU__OF(init_from), 0, -1, 0, NULL, "FILE",
     "start from the weights in FILE (.safetensors), with a fresh optimizer\n"
     "PyTorch's save_file(model.state_dict(), FILE) or an mgpu model.safetensors: every tensor of\n"
     "the model under its state_dict name and shape, nothing else (a checkpoint --resume finds wins)"},
    {"seed", MGPU__OPT_U64, MGPU__OF(seed), 0, -1, 0, NULL, "N", "random seed (init, shuffling, dropout)"},
    {"metrics", MGPU__OPT_STRING, MGPU__OF(metrics), 0, -1, 0, NULL, "FILE", "append one JSON line per epoch to FILE (unset: $MGPU_METRICS, else off)"},
    {"log-every", MGPU__OPT_INT, MGPU__OF(log_every), 0, -1, 0, NULL, "N", "progress line every N steps when not on a terminal (0: epoch end only)"},
    {"max-steps", MGPU__OPT_I64, MGPU__OF(max_steps), 0, -1, 0, NULL, "N", "stop after N optimizer steps (0: no limit)"},
    {"checkpoint-every-steps", MGPU__OPT_I64, MGPU__OF(checkpoint_every_steps), 0, -1, 0, NULL, "N", "checkpoint every N optimizer steps (0: off)"},
    {"sync-batchnorm", MGPU__OPT_INT, MGPU__OF(sync_batchnorm), 0, 1, 0, NULL, "0|1", "DDP: batch-norm statistics over all ranks (SyncBatchNorm)"},
    {"bucket-cap-mb", MGPU__OPT_FLOAT, MGPU__OF(bucket_cap_mb), 0, -1, 0, NULL, "MB", "DDP: gradient bucket size (0: 25)"},
    {"grad-compression", MGPU__OPT_ENUM, MGPU__OF(grad_compression), 0, 0, 0, "none|fp16|bf16", "MODE", "DDP: round gradients for the all-reduce"},
    {"t0-epochs", MGPU__OPT_FLOAT, MGPU__OF(t0_epochs), 0, -1, 1, NULL, "E", "cosine-restarts: first period, in epochs"},
    {"t-mult", MGPU__OPT_INT, MGPU__OF(t_mult), 1, -1, 0, NULL, "N", "cosine-restarts: period multiplier"},
    {"eta-min", MGPU__OPT_FLOAT, MGPU__OF(eta_min), 0, -1, 0, NULL, "LR", "lowest LR of linear/cosine schedules"},
    {"step-size-epochs", MGPU__OPT_FLOAT, MGPU__OF(step_size_epochs), 0, -1, 1, NULL, "E", "step schedule: epochs between LR drops"},
    {"gamma", MGPU__OPT_FLOAT, MGPU__OF(gamma), 0, -1, 1, NULL, "G", "step schedule: LR factor per drop"},
    {"cuda-graph", MGPU__OPT_ENUM, MGPU__OF(cuda_graph), 0, 0, 0, "on|off", "MODE",
     "CUDA: capture the training step as a CUDA Graph and replay it (default on; the CPU ignores it)\n"
     "captured after 2 eager warm-up steps; stays eager, saying why on the startup line, with --amp fp16,\n"
     "DDP/DP, --grad-accum-steps > 1, or a step that cannot be captured"},
    {"data-on-device", MGPU__OPT_ENUM, MGPU__OF(data_on_device), 0, 0, 0, "off|on|auto", "MODE",
     "CUDA: keep the training set on the GPU and gather each batch there\n"
     "auto: on when the dataset is static and takes at most 1/4 of the free device memory;\n"
     "off: stream batches from pinned host memory; on with --device cpu is an error"},
};
#undef MGPU__OF
#define MGPU__N_TRAIN_OPTS ((int)(sizeof mgpu__train_opts_table / sizeof mgpu__train_opts_table[0]))
/* Flags without a value that stand for a flag with one ("--no-multi-gpu" is "--multi-gpu none"). */
static const char *const mgpu__train_opts_switches[][3] = {{"no-multi-gpu", "multi-gpu", "none"}};
#define MGPU__N_TRAIN_OPT_SWITCHES ((int)(sizeof mgpu__train_opts_switches / sizeof mgpu__train_opts_switches[0]))
/* Other spellings PyTorch scripts use for a flag (underscores are accepted for every flag). */
static const char *const mgpu__train_opts_aliases[][2] = {{"num-epochs", "epochs"}};
#define MGPU__N_TRAIN_OPT_ALIASES ((int)(sizeof mgpu__train_opts_aliases / sizeof mgpu__train_opts_aliases[0]))
/* Room for any option's value as text (the longest: 64 gpu ids). */
#define MGPU__OPT_TEXT_MAX 512

MGPU_API void mgpu_train_opts_default(mgpu_train_opts *o) {
    if (!o) return;
    memset(o, 0, sizeof *o);
    o->epochs = 10; o->batch_size = 128; o->lr = 1e-3f;
    o->optimizer = MGPU_OPTIM_ADAMW; o->weight_decay = 1e-4f; o->momentum = 0.9f;
    o->schedule = MGPU_SCHEDULE_CONSTANT; o->scale_lr = MGPU_LR_SCALE_NONE;
    o->grad_accum_steps = 1;
    o->amp = MGPU_AMP_OFF; o->device = MGPU_DEVICE_KIND_AUTO; o->device_index = -1; o->multi_gpu = MGPU_MULTI_GPU_AUTO;
    o->resume = MGPU_RESUME_NONE; o->grad_compression = MGPU_GRAD_COMPRESSION_NONE; o->data_on_device = MGPU_DATA_ON_DEVICE_AUTO;
    o->eval_frequency = 1; o->keep_last = 3; o->log_every = 100;
    o->t0_epochs = 1; o->t_mult = 2; o->eta_min = 0; o->step_size_epochs = 30; o->gamma = 0.1f;
    /* the default --metrics: how mgpu-sweep (or a batch script) gives each run its own file */
    if (getenv("MGPU_METRICS") && getenv("MGPU_METRICS")[0]) o->metrics = getenv("MGPU_METRICS");
}

/* Index of value in "a|b|c", or -1. */
static int mgpu__choice_index(const char *choices, const char *value) {
    size_t n = strlen(value);
    int i = 0;
    const char *c = choices;
    while (c) {
        const char *bar = strchr(c, '|');
        size_t len = bar ? (size_t)(bar - c) : strlen(c);
        if (len == n && strncmp(c, value, n) == 0) return i;
        c = bar ? bar + 1 : NULL;
        i++;
    }
    return -1;
}
/* The i-th word of "a|b|c" into buf. */
static const char *mgpu__choice_name(const char *choices, int index, char *buf, size_t size) {
    const char *c = choices;
    int i;
    for (i = 0; i < index && c; i++) { c = strchr(c, '|'); if (c) c++; }
    if (!c || index < 0) return "?";
    snprintf(buf, size, "%.*s", (int)(strchr(c, '|') ? (size_t)(strchr(c, '|') - c) : strlen(c)), c);
    return buf;
}
/* "off", "fp16" or "bf16" (metrics records name the mode). */
static const char *mgpu__amp_mode_name(mgpu_amp_mode mode) {
    return mode == MGPU_AMP_FP16 ? "fp16" : mode == MGPU_AMP_BF16 ? "bf16" : "off";
}

/* cpu|cuda|cuda:N|auto, syntax only: a CPU build must still parse "cuda" (the trainer says it has no CUDA). */
static int mgpu__device_opt_parse(const char *v, mgpu_device_kind *kind, int *index) {
    const char *d;
    int n = 0;
    if (strcmp(v, "cpu") == 0) { *kind = MGPU_DEVICE_KIND_CPU; *index = -1; return 1; }
    if (strcmp(v, "auto") == 0) { *kind = MGPU_DEVICE_KIND_AUTO; *index = -1; return 1; }
    if (strcmp(v, "cuda") == 0) { *kind = MGPU_DEVICE_KIND_CUDA; *index = -1; return 1; }
    if (strncmp(v, "cuda:", 5) != 0 || !v[5] || strlen(v + 5) > 4) return 0;
    for (d = v + 5; *d; d++) {
        if (!mgpu__is_digit(*d)) return 0;
        n = n * 10 + (*d - '0');
    }
    *kind = MGPU_DEVICE_KIND_CUDA; *index = n;
    return 1;
}
/* "0,1,3": at most MGPU_MAX_GPU_IDS indices of at most 4 digits each. */
static int mgpu__gpu_ids_parse(const char *v, int *ids, int *count) {
    int digits = 0, n = 0, value = 0;
    for (;; v++) {
        if (mgpu__is_digit(*v)) { if (++digits > 4) return 0; value = value * 10 + (*v - '0'); continue; }
        if (digits == 0 || (*v != ',' && *v != 0) || n == MGPU_MAX_GPU_IDS) return 0;
        ids[n++] = value;
        if (*v == 0) { *count = n; return 1; }
        digits = 0; value = 0;
    }
}

/* Text parsers with full consumption; integers accept an optional sign, no spaces. */
static int mgpu__parse_ll(const char *v, long long *out) {
    char *end = NULL;
    if (!(mgpu__is_digit(v[0]) || ((v[0] == '-' || v[0] == '+') && mgpu__is_digit(v[1])))) return 0;
    errno = 0;
    *out = strtoll(v, &end, 10);
    return errno == 0 && *end == 0;
}
static int mgpu__parse_double(const char *v, double *out) {
    char *end = NULL;
    if (!(mgpu__is_digit(v[0]) || v[0] == '.' || v[0] == '-' || v[0] == '+')) return 0;
    errno = 0;
    *out = strtod(v, &end);
    return errno == 0 && *end == 0 && isfinite(*out);
}

static int mgpu__opt_in_range(const mgpu__opt *s, double v) {
    if (s->lo_open ? !(v > s->lo) : !(v >= s->lo)) return 0;
    return s->hi < s->lo || v <= s->hi;
}
/* "an integer >= 1", "a number in [0, 1]", "one of a|b" for messages. */
static void mgpu__opt_expected(const mgpu__opt *s, char *buf, size_t size) {
    const char *what = s->kind == MGPU__OPT_FLOAT ? "a number" : "an integer";
    if (s->choices) snprintf(buf, size, "one of %s", s->choices);
    else if (s->kind == MGPU__OPT_DEVICE) snprintf(buf, size, "cpu, cuda, cuda:N or auto");
    else if (s->kind == MGPU__OPT_GPU_IDS) snprintf(buf, size, "comma-separated device indices such as 0,1,3 (at most %d)", MGPU_MAX_GPU_IDS);
    else if (s->kind == MGPU__OPT_RESUME) snprintf(buf, size, "auto, none or a checkpoint path");
    else if (s->kind == MGPU__OPT_STRING) snprintf(buf, size, "a non-empty value");
    else if (s->kind == MGPU__OPT_FLAG) snprintf(buf, size, "nothing, or =0|1");
    else if (s->hi >= s->lo) snprintf(buf, size, "%s in [%g, %g]", what, s->lo, s->hi);
    else snprintf(buf, size, "%s %s %g", what, s->lo_open ? ">" : ">=", s->lo);
}

/* Parses value into the field(s) of spec; 0 if the value is bad (the options are then unchanged). */
static int mgpu__opt_set(mgpu_train_opts *o, const mgpu__opt *s, const char *value) {
    void *field = (char *)o + s->offset;
    long long iv = 0;
    double dv = 0;
    int idx, ids[MGPU_MAX_GPU_IDS], n = 0;
    mgpu_device_kind kind = MGPU_DEVICE_KIND_AUTO;
    mgpu_schedule_type sched = MGPU_SCHEDULE_CONSTANT;
    switch (s->kind) {
    case MGPU__OPT_STRING:
        if (!value[0]) return 0;
        *(const char **)field = value;   /* argv's pointer */
        return 1;
    case MGPU__OPT_ENUM:
        if ((idx = mgpu__choice_index(s->choices, value)) < 0) return 0;
        *(int *)field = idx;
        return 1;
    case MGPU__OPT_SCHEDULE:
        if (mgpu_schedule_parse(value, &sched) != MGPU_OK) return 0;
        *(mgpu_schedule_type *)field = sched;
        return 1;
    case MGPU__OPT_DEVICE:
        if (!mgpu__device_opt_parse(value, &kind, &idx)) return 0;
        o->device = kind; o->device_index = idx;
        return 1;
    case MGPU__OPT_GPU_IDS:
        if (!mgpu__gpu_ids_parse(value, ids, &n)) return 0;
        memcpy(o->gpu_ids, ids, sizeof(int) * (size_t)n);
        o->num_gpu_ids = n;
        return 1;
    case MGPU__OPT_RESUME:
        if (!value[0]) return 0;
        o->resume = strcmp(value, "none") == 0 ? MGPU_RESUME_NONE : strcmp(value, "auto") == 0 ? MGPU_RESUME_AUTO : MGPU_RESUME_PATH;
        o->resume_path = o->resume == MGPU_RESUME_PATH ? value : NULL;
        return 1;
    case MGPU__OPT_FLAG:
        if (strcmp(value, "1") == 0 || strcmp(value, "true") == 0) *(int *)field = 1;
        else if (strcmp(value, "0") == 0 || strcmp(value, "false") == 0) *(int *)field = 0;
        else return 0;
        return 1;
    case MGPU__OPT_INT:
        if (!mgpu__parse_ll(value, &iv) || iv < INT_MIN || iv > INT_MAX || !mgpu__opt_in_range(s, (double)iv)) return 0;
        *(int *)field = (int)iv;
        return 1;
    case MGPU__OPT_I64:
        if (!mgpu__parse_ll(value, &iv) || !mgpu__opt_in_range(s, (double)iv)) return 0;
        *(int64_t *)field = (int64_t)iv;
        return 1;
    case MGPU__OPT_U64: {
        char *end = NULL;
        unsigned long long u;
        if (!mgpu__is_digit(value[0])) return 0;
        errno = 0;
        u = strtoull(value, &end, 10);
        if (errno || *end) return 0;
        *(uint64_t *)field = (uint64_t)u;
        return 1;
    }
    case MGPU__OPT_FLOAT:
        if (!mgpu__parse_double(value, &dv) || fabs(dv) > FLT_MAX || !mgpu__opt_in_range(s, dv)) return 0;
        *(float *)field = (float)dv;
        return 1;
    }
    return 0;
}

/* name (len bytes, without "--") with underscores read as dashes, into norm (64 bytes); 0 if too long. */
static int mgpu__opt_normalize(const char *name, size_t len, char norm[64]) {
    size_t k;
    if (len >= 64) return 0;
    for (k = 0; k < len; k++) norm[k] = name[k] == '_' ? '-' : name[k];
    norm[len] = 0;
    return 1;
}

/* The flag spelt name (len bytes, without "--"): underscores read as dashes, aliases resolved. */
static const mgpu__opt *mgpu__opt_find(const char *name, size_t len) {
    char norm[64];
    int i;
    if (!mgpu__opt_normalize(name, len, norm)) return NULL;
    for (i = 0; i < MGPU__N_TRAIN_OPT_ALIASES; i++)
        if (strcmp(norm, mgpu__train_opts_aliases[i][0]) == 0) return mgpu__opt_find(mgpu__train_opts_aliases[i][1], strlen(mgpu__train_opts_aliases[i][1]));
    for (i = 0; i < MGPU__N_TRAIN_OPTS; i++)
        if (strcmp(mgpu__train_opts_table[i].flag, norm) == 0) return &mgpu__train_opts_table[i];
    return NULL;
}

/* Levenshtein distance of two short strings (at most 63 bytes each, longer ones are far apart). */
static int mgpu__edit_distance(const char *a, const char *b) {
    int row[64], la = (int)strlen(a), lb = (int)strlen(b), i, j;
    if (la > 63 || lb > 63) return 64;
    for (j = 0; j <= lb; j++) row[j] = j;
    for (i = 1; i <= la; i++) {
        int diag = row[0];
        row[0] = i;
        for (j = 1; j <= lb; j++) {
            int up = row[j], best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            diag = up;
            row[j] = best;
        }
    }
    return row[lb];
}
/* The flag (or alias) closest to an unknown one, or NULL when none is close: within 1 edit, one
   more per 6 characters (at most 3), or the only flag the name begins. */
static const char *mgpu__opt_suggest(const char *name, size_t len) {
    char norm[64];
    const char *best = NULL, *prefix = NULL;
    int i, d, best_d = 64, prefixes = 0, limit;
    if (len == 0 || !mgpu__opt_normalize(name, len, norm)) return NULL;
    for (i = 0; i < MGPU__N_TRAIN_OPTS + MGPU__N_TRAIN_OPT_ALIASES; i++) {
        const char *flag = i < MGPU__N_TRAIN_OPTS ? mgpu__train_opts_table[i].flag : mgpu__train_opts_aliases[i - MGPU__N_TRAIN_OPTS][0];
        if ((d = mgpu__edit_distance(norm, flag)) < best_d) { best_d = d; best = flag; }
        if (len >= 3 && strncmp(flag, norm, len) == 0) { prefixes++; prefix = flag; }
    }
    limit = 1 + (int)len / 6;
    if (limit > 3) limit = 3;
    if (best_d <= limit && best_d < (int)len) return best;
    return prefixes == 1 ? prefix : NULL;
}

/* Records the error and prints it as "program: error: ..." (the API promises the print). */
static mgpu_result mgpu__opt_error(const char *program, const char *fmt, ...) MGPU__PRINTF(2, 3);
static mgpu_result mgpu__opt_error(const char *program, const char *fmt, ...) {
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    mgpu__fail(MGPU_ERR_INVALID_ARG, "%s", msg);
    fprintf(stderr, "%s: error: %s (see --help)\n", program, msg);
    return MGPU_ERR_INVALID_ARG;
}

static const char *mgpu__program_name(int argc, char **argv) {
    const char *slash;
    if (argc < 1 || !argv[0] || !argv[0][0]) return "mgpu";
    slash = strrchr(argv[0], '/');
    return slash ? slash + 1 : argv[0];
}

/* A switch (a flag that takes no value) spelt arg: its flag and value set, 1; 0 if arg is none. */
static int mgpu__opt_switch(mgpu_train_opts *o, const char *arg) {
    char norm[64];
    int i;
    if (strncmp(arg, "--", 2) != 0 || !mgpu__opt_normalize(arg + 2, strlen(arg + 2), norm)) return 0;
    for (i = 0; i < MGPU__N_TRAIN_OPT_SWITCHES; i++)
        if (strcmp(norm, mgpu__train_opts_switches[i][0]) == 0) {
            const char *flag = mgpu__train_opts_switches[i][1];
            return mgpu__opt_set(o, mgpu__opt_find(flag, strlen(flag)), mgpu__train_opts_switches[i][2]);
        }
    return 0;
}

MGPU_API mgpu_result mgpu_train_opts_parse(mgpu_train_opts *o, int argc, char **argv) {
    const char *prog;
    int i;
    if (!o || argc < 0 || (argc > 0 && !argv)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_train_opts_parse: o and argv must not be NULL");
    prog = mgpu__program_name(argc, argv);
    o->argc = argc; o->argv = argv;
    for (i = 1; i < argc; i++) {
        const char *arg = argv[i] ? argv[i] : "", *eq, *value, *hint;
        const mgpu__opt *s;
        char expected[160];
        size_t name_len;
        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            o->help = 1;
            mgpu_train_opts_usage(stdout, prog);
            return MGPU_OK;
        }
        if (strncmp(arg, "--", 2) != 0) return mgpu__opt_error(prog, "unexpected argument '%s' (options start with --)", arg);
        if (mgpu__opt_switch(o, arg)) continue;
        eq = strchr(arg, '=');
        name_len = eq ? (size_t)(eq - arg - 2) : strlen(arg + 2);
        if (!(s = mgpu__opt_find(arg + 2, name_len))) {
            if ((hint = mgpu__opt_suggest(arg + 2, name_len)) != NULL)
                return mgpu__opt_error(prog, "unknown option '%.*s'; did you mean --%s?", (int)name_len + 2, arg, hint);
            return mgpu__opt_error(prog, "unknown option '%.*s'", (int)name_len + 2, arg);
        }
        if (eq) value = eq + 1;
        else if (s->kind == MGPU__OPT_FLAG) value = "1";   /* a bare switch: the next word is not its value */
        else if (i + 1 < argc && argv[i + 1] && strncmp(argv[i + 1], "--", 2) != 0) value = argv[++i];
        else return mgpu__opt_error(prog, "option --%s needs a value", s->flag);
        if (!mgpu__opt_set(o, s, value)) {
            mgpu__opt_expected(s, expected, sizeof expected);
            return mgpu__opt_error(prog, "invalid value '%s' for --%s (expected %s)", value, s->flag, expected);
        }
    }
    return MGPU_OK;
}

/* A field's current value as text (buf: MGPU__OPT_TEXT_MAX bytes), for the usage's defaults and
   the options saved with a checkpoint; NULL: unset. */
static const char *mgpu__opt_value_text(const mgpu_train_opts *o, const mgpu__opt *s, char *buf, size_t size) {
    const void *field = (const char *)o + s->offset;
    size_t at;
    int i;
    switch (s->kind) {
    case MGPU__OPT_ENUM: case MGPU__OPT_SCHEDULE: return mgpu__choice_name(s->choices, *(const int *)field, buf, size);
    case MGPU__OPT_INT: case MGPU__OPT_FLAG: snprintf(buf, size, "%d", *(const int *)field); return buf;
    case MGPU__OPT_I64: snprintf(buf, size, "%lld", (long long)*(const int64_t *)field); return buf;
    case MGPU__OPT_U64: snprintf(buf, size, "%llu", (unsigned long long)*(const uint64_t *)field); return buf;
    case MGPU__OPT_FLOAT: snprintf(buf, size, "%g", (double)*(const float *)field); return buf;
    case MGPU__OPT_STRING: return *(const char *const *)field;
    case MGPU__OPT_DEVICE:
        if (o->device == MGPU_DEVICE_KIND_CPU) return "cpu";
        if (o->device != MGPU_DEVICE_KIND_CUDA) return "auto";
        if (o->device_index < 0) return "cuda";
        snprintf(buf, size, "cuda:%d", o->device_index);
        return buf;
    case MGPU__OPT_GPU_IDS:
        if (o->num_gpu_ids <= 0 || size == 0) return NULL;
        buf[0] = 0;
        for (i = 0, at = 0; i < o->num_gpu_ids && i < MGPU_MAX_GPU_IDS && at < size; i++)
            at += (size_t)snprintf(buf + at, size - at, i ? ",%d" : "%d", o->gpu_ids[i]);
        return buf;
    case MGPU__OPT_RESUME:
        return o->resume == MGPU_RESUME_AUTO ? "auto" : o->resume == MGPU_RESUME_PATH ? o->resume_path : "none";
    }
    return NULL;
}

MGPU_API void mgpu_train_opts_usage(FILE *out, const char *program) {
    mgpu_train_opts d;
    char flag[64], value[MGPU__OPT_TEXT_MAX];
    int i;
    if (!out) return;
    mgpu_train_opts_default(&d);
    fprintf(out, "usage: %s [options]\n\noptions (each also accepted as --flag=value, and with underscores: --batch_size):\n",
            program ? program : "mgpu");
    for (i = 0; i < MGPU__N_TRAIN_OPTS; i++) {
        const mgpu__opt *s = &mgpu__train_opts_table[i];
        const char *def = mgpu__opt_value_text(&d, s, value, sizeof value);
        const char *more = strchr(s->help, '\n');   /* lines after the first: details, indented */
        snprintf(flag, sizeof flag, s->metavar[0] ? "--%s %s" : "--%s", s->flag, s->metavar);
        fprintf(out, "  %-30s %.*s", flag, more ? (int)(more - s->help) : (int)strlen(s->help), s->help);
        if (s->choices) fprintf(out, ": %s", s->choices);
        /* unset text options explain their fallback in the help itself */
        if (def && s->kind != MGPU__OPT_FLAG) fprintf(out, " (default: %s)", def);   /* a switch is off unless given */
        fputc('\n', out);
        while (more) {
            const char *next = strchr(more + 1, '\n');
            fprintf(out, "  %-30s %.*s\n", "", next ? (int)(next - more - 1) : (int)strlen(more + 1), more + 1);
            more = next;
        }
    }
    for (i = 0; i < MGPU__N_TRAIN_OPT_SWITCHES; i++) {
        snprintf(flag, sizeof flag, "--%s", mgpu__train_opts_switches[i][0]);
        fprintf(out, "  %-30s the same as --%s %s\n", flag, mgpu__train_opts_switches[i][1], mgpu__train_opts_switches[i][2]);
    }
    fprintf(out, "  %-30s %s\n", "--help", "show this help and exit");
}

/* --------------------------------------------------------------------------------------
   Metrics: one JSON object per line, appended and fsynced
   -------------------------------------------------------------------------------------- */

struct mgpu_metrics { FILE *f; char *path; };

MGPU_API mgpu_metrics *mgpu_metrics_open(const char *path) {
    mgpu_metrics *m;
    if (path && !path[0]) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_metrics_open: path is empty");
    m = (mgpu_metrics *)mgpu__calloc(sizeof *m, "a metrics writer");
    if (!m || !path) return m; /* no path: a writer that writes nothing (ranks other than 0) */
    m->path = mgpu__strdup(path);
    m->f = m->path ? fopen(path, "a") : NULL;
    if (!m->f) {
        if (m->path) mgpu__fail(MGPU_ERR_IO, "mgpu_metrics_open: cannot open '%s' for appending: %s", path, strerror(errno));
        mgpu_metrics_close(m);
        return NULL;
    }
    return m;
}

/* Ends the object with extra members (validated as JSON first), then appends the line durably. */
static mgpu_result mgpu__metrics_finish_line(mgpu_metrics *m, mgpu__buf *line, const char *extra_json, const char *fn) {
    int err;
    if (extra_json && extra_json[0]) {
        mgpu__buf check;
        mgpu_json *j;
        mgpu__buf_init(&check);
        mgpu__buf_puts(&check, "{");
        mgpu__buf_puts(&check, extra_json);
        mgpu__buf_puts(&check, "}");
        j = check.failed ? NULL : mgpu_json_parse(check.data, check.len, "extra_json wrapped in {}");
        mgpu__buf_free(&check);
        if (!j) {
            char why[512];
            snprintf(why, sizeof why, "%.400s", mgpu_last_error()); /* mgpu__fail must not read its own buffer */
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: extra_json must be JSON object members: %s", fn, why);
        }
        mgpu_json_free(j);
        mgpu__buf_puts(line, ",");
        mgpu__buf_puts(line, extra_json);
    }
    mgpu__buf_puts(line, "}\n");
    if (line->failed) return MGPU_ERR_OOM_HOST;
    if (!m->f) return MGPU_OK;
    if (fwrite(line->data, 1, line->len, m->f) != line->len || fflush(m->f) != 0 || fsync(fileno(m->f)) != 0) {
        err = errno;
        return mgpu__fail(MGPU_ERR_IO, "%s: cannot append to '%s': %s", fn, m->path, strerror(err));
    }
    return MGPU_OK;
}

static void mgpu__buf_json_member_number(mgpu__buf *b, const char *key, double v) {
    mgpu__buf_printf(b, ",\"%s\":", key);
    mgpu__buf_json_number(b, v);
}

MGPU_API mgpu_result mgpu_metrics_write_epoch(mgpu_metrics *m, const mgpu_epoch_record *r) {
    mgpu__buf line;
    mgpu_result res;
    if (!m || !r) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_metrics_write_epoch: metrics and record must not be NULL");
    mgpu__buf_init(&line);
    mgpu__buf_printf(&line, "{\"epoch\":%lld,\"step\":%lld", (long long)r->epoch, (long long)r->step);
    mgpu__buf_json_member_number(&line, "train_loss", r->train_loss);
    mgpu__buf_json_member_number(&line, "test_loss", r->test_loss);
    mgpu__buf_json_member_number(&line, "test_accuracy", r->test_accuracy);
    mgpu__buf_json_member_number(&line, "lr", r->lr);
    mgpu__buf_json_member_number(&line, "epoch_time_s", r->epoch_time_s);
    mgpu__buf_json_member_number(&line, "samples_per_s", r->samples_per_s);
    mgpu__buf_printf(&line, ",\"world_size\":%d,\"global_batch\":%lld,\"amp\":", r->world_size, (long long)r->global_batch);
    if (r->amp) mgpu__buf_json_string(&line, r->amp);
    else mgpu__buf_puts(&line, "null");
    res = mgpu__metrics_finish_line(m, &line, r->extra_json, "mgpu_metrics_write_epoch");
    mgpu__buf_free(&line);
    return res;
}

MGPU_API mgpu_result mgpu_metrics_write_final(mgpu_metrics *m, const char *extra_json) {
    mgpu__buf line;
    mgpu_result res;
    if (!m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_metrics_write_final: metrics is NULL");
    mgpu__buf_init(&line);
    mgpu__buf_puts(&line, "{\"event\":\"final\"");
    res = mgpu__metrics_finish_line(m, &line, extra_json, "mgpu_metrics_write_final");
    mgpu__buf_free(&line);
    return res;
}

MGPU_API void mgpu_metrics_close(mgpu_metrics *m) {
    if (!m) return;
    if (m->f) fclose(m->f);
    mgpu_free(m->path);
    mgpu_free(m);
}

/* --------------------------------------------------------------------------------------
   Progress: a redrawn bar on a terminal, plain periodic lines otherwise (logs, pipes)
   -------------------------------------------------------------------------------------- */

#define MGPU__BAR_MAX 30

struct mgpu_progress {
    char label[64];
    int64_t total, done, printed_done;
    int log_every, tty;
    double t_start, t_drawn, loss;
};

MGPU_API mgpu_progress *mgpu_progress_begin(const char *label, int64_t total, int log_every) {
    mgpu_progress *p;
    if (total < 0 || log_every < 0)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_progress_begin: total (%lld) and log_every (%d) must be >= 0", (long long)total, log_every);
    p = (mgpu_progress *)mgpu__calloc(sizeof *p, "a progress bar");
    if (!p) return NULL;
    snprintf(p->label, sizeof p->label, "%s", label ? label : "");
    p->total = total; p->log_every = log_every;
    p->tty = isatty(STDERR_FILENO);
    p->t_start = mgpu_time_s();
    p->t_drawn = -1;
    p->printed_done = -1;
    p->loss = NAN;
    return p;
}

static void mgpu__format_duration(double s, char *buf, size_t size) {
    long t = s > 0 && s < 1e9 ? (long)(s + 0.5) : 0;
    if (t >= 3600) snprintf(buf, size, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    else snprintf(buf, size, "%ld:%02ld", t / 60, t % 60);
}

/* "label [#####.....] 45% 123/273 1234.5 it/s ETA 0:12 loss 0.4321" (bar_width 0: no bar). */
static void mgpu__progress_format(const mgpu_progress *p, int bar_width, char *buf, size_t size) {
    double elapsed = mgpu_time_s() - p->t_start, rate = elapsed > 0 ? (double)p->done / elapsed : 0;
    double frac = p->total > 0 ? (double)MGPU__MIN(p->done, p->total) / (double)p->total : 0;
    size_t pos = (size_t)snprintf(buf, size, "%s", p->label);
    char eta[32];
    int i, filled = (int)(frac * bar_width);
    if (p->total > 0 && bar_width > 0 && pos + (size_t)bar_width + 4 < size) {
        buf[pos++] = ' '; buf[pos++] = '[';
        for (i = 0; i < bar_width; i++) buf[pos++] = i < filled ? '#' : '.';
        buf[pos++] = ']'; buf[pos] = 0;
    }
    if (pos < size && p->total > 0)
        pos += (size_t)snprintf(buf + pos, size - pos, " %d%% %lld/%lld", (int)(100 * frac), (long long)p->done, (long long)p->total);
    else if (pos < size) pos += (size_t)snprintf(buf + pos, size - pos, " %lld", (long long)p->done);
    if (pos < size) pos += (size_t)snprintf(buf + pos, size - pos, " %.1f it/s", rate);
    if (pos < size && p->total > 0 && rate > 0) {
        mgpu__format_duration((double)MGPU__MAX(p->total - p->done, 0) / rate, eta, sizeof eta);
        pos += (size_t)snprintf(buf + pos, size - pos, " ETA %s", eta);
    }
    if (pos < size && p->loss == p->loss) snprintf(buf + pos, size - pos, " loss %.4f", p->loss);
}

/* Redraws the terminal line in place, the bar shrunk to fit the terminal's width. */
static void mgpu__progress_draw(mgpu_progress *p) {
    char line[256];
    int width = MGPU__BAR_MAX;
    struct winsize ws;
    if (ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) {
        mgpu__progress_format(p, 0, line, sizeof line);
        width = MGPU__MIN(MGPU__BAR_MAX, (int)ws.ws_col - (int)strlen(line) - 4);
        if (width < 5) width = 0;
    }
    mgpu__progress_format(p, width, line, sizeof line);
    fprintf(stderr, "\r%s\x1b[K", line);
    fflush(stderr);
    p->t_drawn = mgpu_time_s();
}

static void mgpu__progress_print_line(mgpu_progress *p) {
    char line[256];
    mgpu__progress_format(p, 0, line, sizeof line);
    fprintf(stderr, "%s\n", line);
    fflush(stderr);
    p->printed_done = p->done;
}

MGPU_API void mgpu_progress_update(mgpu_progress *p, int64_t done, double loss) {
    int64_t before;
    if (!p) return;
    before = p->done;
    p->done = done;
    p->loss = loss;
    if (p->tty) {
        /* about 10 redraws a second at most: drawing must not slow fast loops */
        if (p->t_drawn < 0 || mgpu_time_s() - p->t_drawn >= 0.1) mgpu__progress_draw(p);
    } else if (p->log_every > 0 && done / p->log_every != before / p->log_every) {
        mgpu__progress_print_line(p);
    }
}

MGPU_API void mgpu_progress_end(mgpu_progress *p) {
    if (!p) return;
    if (p->tty) {
        mgpu__progress_draw(p);
        fprintf(stderr, "\n");
        fflush(stderr);
    } else if (p->printed_done != p->done) {
        mgpu__progress_print_line(p);
    }
    mgpu_free(p);
}
/* ======================================================================================
   Checkpoints
   ====================================================================================== */

/* Training checkpoints laid out like the Hugging Face Trainer's, with safetensors files:
       DIR/step-00001234/model.safetensors       parameters and buffers under state_dict names
       DIR/step-00001234/optimizer.safetensors   "<param>.exp_avg", ... and "<param>.step" (I64 scalars)
       DIR/step-00001234/trainer_state.json      position, schedule, scaler, RNG, metrics, options
       DIR/latest                                 "step-00001234\n"
   A checkpoint is written into step-00001234.tmp/ (each file fsynced), renamed into place, and only
   then named by `latest` (itself replaced atomically): a crash at any moment leaves the previous
   checkpoint whole. Loading validates every file before anything is modified. */

#define MGPU__CKPT_FORMAT_VERSION 1
#define MGPU__CKPT_PATH_MAX 4096
#define MGPU__CKPT_MODEL "model.safetensors"
#define MGPU__CKPT_OPTIM "optimizer.safetensors"
#define MGPU__CKPT_STATE "trainer_state.json"

/* --------------------------------------------------------------------------------------
   Paths and directories
   -------------------------------------------------------------------------------------- */

static mgpu_result mgpu__path_join(char *out, const char *dir, const char *name) {
    if (snprintf(out, MGPU__CKPT_PATH_MAX, "%s/%s", dir, name) >= MGPU__CKPT_PATH_MAX)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "path '%s/%s' is too long", dir, name);
    return MGPU_OK;
}

/* mkdir -p */
static mgpu_result mgpu__mkdirs(const char *path) {
    char buf[MGPU__CKPT_PATH_MAX];
    size_t i, n = strlen(path);
    if (n == 0 || n >= sizeof buf) return mgpu__fail(MGPU_ERR_INVALID_ARG, "directory path '%s' is empty or too long", path);
    memcpy(buf, path, n + 1);
    for (i = 1; i <= n; i++) {
        if (buf[i] != '/' && buf[i] != 0) continue;
        buf[i] = 0;
        if (mkdir(buf, 0777) != 0 && errno != EEXIST)
            return mgpu__fail(MGPU_ERR_IO, "cannot create directory '%s': %s", buf, strerror(errno));
        if (i < n) buf[i] = '/';
    }
    return MGPU_OK;
}

static int mgpu__is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* rm -r for checkpoint directories (plain files and a few levels of folders); 0 or an errno. */
static int mgpu__remove_tree(const char *path, int depth) {
    struct stat st;
    struct dirent *e;
    DIR *d;
    int err = 0;
    if (lstat(path, &st) != 0) return errno == ENOENT ? 0 : errno;
    if (!S_ISDIR(st.st_mode)) return unlink(path) == 0 || errno == ENOENT ? 0 : errno;
    if (depth > 8) return ELOOP;
    if (!(d = opendir(path))) return errno;
    while (!err && (e = readdir(d)) != NULL) {
        char child[MGPU__CKPT_PATH_MAX];
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        if (snprintf(child, sizeof child, "%s/%s", path, e->d_name) >= (int)sizeof child) err = ENAMETOOLONG;
        else err = mgpu__remove_tree(child, depth + 1);
    }
    closedir(d);
    if (!err && rmdir(path) != 0) err = errno;
    return err;
}

/* "step-00001234" (8 or more digits, nothing after) -> 1 and *step; 0 for anything else. */
static int mgpu__ckpt_step_of_name(const char *name, int64_t *step) {
    const char *p;
    int64_t v = 0;
    if (strncmp(name, "step-", 5) != 0) return 0;
    for (p = name + 5; *p; p++) {
        if (!mgpu__is_digit(*p) || v > (INT64_MAX - 9) / 10) return 0;
        v = v * 10 + (*p - '0');
    }
    if (p - (name + 5) < 8) return 0;
    *step = v;
    return 1;
}

/* Leftovers of an interrupted save: step-*.tmp directories and latest.tmp.<pid> files. */
static int mgpu__ckpt_is_stale_name(const char *name) {
    size_t n = strlen(name);
    return (strncmp(name, "step-", 5) == 0 && n > 9 && strcmp(name + n - 4, ".tmp") == 0) || strncmp(name, "latest.tmp.", 11) == 0;
}

static int mgpu__cmp_i64_desc(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* Steps of the step-* directories in dir, newest first (free *steps with mgpu_free). */
static mgpu_result mgpu__ckpt_list_steps(const char *dir, int64_t **steps, int *n) {
    struct dirent *e;
    DIR *d;
    int cap = 0;
    *steps = NULL; *n = 0;
    if (!(d = opendir(dir))) return mgpu__fail(MGPU_ERR_IO, "cannot list checkpoint directory '%s': %s", dir, strerror(errno));
    while ((e = readdir(d)) != NULL) {
        char path[MGPU__CKPT_PATH_MAX];
        int64_t step;
        if (!mgpu__ckpt_step_of_name(e->d_name, &step) || mgpu__path_join(path, dir, e->d_name) != MGPU_OK || !mgpu__is_dir(path)) continue;
        if (*n == cap) {
            int64_t *grown = (int64_t *)mgpu__grow(*steps, &cap, *n + 1, sizeof(int64_t), "the checkpoint list");
            if (!grown) { closedir(d); mgpu_free(*steps); *steps = NULL; *n = 0; return MGPU_ERR_OOM_HOST; }
            *steps = grown;
        }
        (*steps)[(*n)++] = step;
    }
    closedir(d);
    if (*n > 1) qsort(*steps, (size_t)*n, sizeof(int64_t), mgpu__cmp_i64_desc);
    return MGPU_OK;
}

static void mgpu__ckpt_dir_name(char *out, size_t size, int64_t step) { snprintf(out, size, "step-%08lld", (long long)step); }

/* Removes what an interrupted save left behind; failures are only logged. */
static void mgpu__ckpt_remove_stale(const char *dir) {
    struct dirent *e;
    DIR *d = opendir(dir);
    if (!d) return;
    while ((e = readdir(d)) != NULL) {
        char path[MGPU__CKPT_PATH_MAX];
        int err;
        if (!mgpu__ckpt_is_stale_name(e->d_name) || mgpu__path_join(path, dir, e->d_name) != MGPU_OK) continue;
        if ((err = mgpu__remove_tree(path, 0)) != 0) mgpu_log(MGPU_LOG_WARN, "cannot remove the stale checkpoint leftover '%s': %s", path, strerror(err));
        else mgpu_log(MGPU_LOG_INFO, "removed '%s', left by an interrupted checkpoint save", path);
    }
    closedir(d);
}

/* Keeps the newest keep_last step-* directories (always including keep_step); failures are logged. */
static void mgpu__ckpt_prune(const char *dir, int keep_last, int64_t keep_step) {
    int64_t *steps = NULL;
    int n = 0, i, kept = 1;
    if (keep_last <= 0 || mgpu__ckpt_list_steps(dir, &steps, &n) != MGPU_OK) return;
    for (i = 0; i < n; i++) {
        char name[40], path[MGPU__CKPT_PATH_MAX];
        int err;
        if (steps[i] == keep_step) continue;
        if (kept < keep_last) { kept++; continue; }
        mgpu__ckpt_dir_name(name, sizeof name, steps[i]);
        if (mgpu__path_join(path, dir, name) != MGPU_OK) continue;
        if ((err = mgpu__remove_tree(path, 0)) != 0) mgpu_log(MGPU_LOG_WARN, "cannot prune old checkpoint '%s': %s", path, strerror(err));
    }
    mgpu_free(steps);
}

/* --------------------------------------------------------------------------------------
   trainer_state.json: typed fields, checked before anything is loaded
   -------------------------------------------------------------------------------------- */

typedef enum mgpu__jkind { MGPU__J_INT, MGPU__J_U64, MGPU__J_NUMBER, MGPU__J_OBJECT, MGPU__J_ARRAY, MGPU__J_STRING } mgpu__jkind;
typedef struct mgpu__jfield { const char *key; mgpu__jkind kind; int required; int64_t min; } mgpu__jfield;

/* A JSON integer in [0, 2^64) (seeds and RNG offsets use the full uint64 range). */
static int mgpu__json_u64(const mgpu_json *j, uint64_t *out) {
    char text[24];
    size_t i;
    unsigned long long v;
    if (!j || j->type != MGPU_JSON_NUMBER || !j->raw || j->raw_len == 0 || j->raw_len >= sizeof text) return 0;
    for (i = 0; i < j->raw_len; i++) if (!mgpu__is_digit(j->raw[i])) return 0;
    memcpy(text, j->raw, j->raw_len);
    text[j->raw_len] = 0;
    errno = 0;
    v = strtoull(text, NULL, 10);
    if (errno == ERANGE) return 0;
    if (out) *out = (uint64_t)v;
    return 1;
}

static int mgpu__jfield_ok(const mgpu_json *v, const mgpu__jfield *f) {
    int64_t i = 0;
    switch (f->kind) {
    case MGPU__J_INT: return mgpu_json_int64(v, &i) && i >= f->min;
    case MGPU__J_U64: return mgpu__json_u64(v, NULL);
    case MGPU__J_NUMBER: return v->type == MGPU_JSON_NUMBER || v->type == MGPU_JSON_NULL; /* null: a non-finite value */
    case MGPU__J_OBJECT: return v->type == MGPU_JSON_OBJECT;
    case MGPU__J_ARRAY: return v->type == MGPU_JSON_ARRAY;
    case MGPU__J_STRING: return v->type == MGPU_JSON_STRING;
    }
    return 0;
}

static const char *mgpu__jkind_text(const mgpu__jfield *f, char *buf, size_t size) {
    switch (f->kind) {
    case MGPU__J_INT: snprintf(buf, size, "an integer >= %lld", (long long)f->min); return buf;
    case MGPU__J_U64: return "an integer in [0, 2^64)";
    case MGPU__J_NUMBER: return "a number";
    case MGPU__J_OBJECT: return "an object";
    case MGPU__J_ARRAY: return "an array";
    case MGPU__J_STRING: return "a string";
    }
    return "?";
}

/* Every field present when required and of its kind when present; errors name label and "where.key". */
static mgpu_result mgpu__json_check_fields(const mgpu_json *obj, const char *label, const char *where, const mgpu__jfield *fields, int n) {
    char kind[48];
    int i;
    for (i = 0; i < n; i++) {
        const mgpu_json *v = mgpu_json_get(obj, fields[i].key);
        if (!v && fields[i].required)
            return mgpu__fail(MGPU_ERR_FORMAT, "%s: \"%s%s\" is missing", label, where, fields[i].key);
        if (v && !mgpu__jfield_ok(v, &fields[i]))
            return mgpu__fail(MGPU_ERR_FORMAT, "%s: \"%s%s\" must be %s", label, where, fields[i].key, mgpu__jkind_text(&fields[i], kind, sizeof kind));
    }
    return MGPU_OK;
}

/* What every checkpoint's state must satisfy; the trainer adds its own required fields on resume. */
static mgpu_result mgpu__ckpt_check_state(const mgpu_json *s, const char *label) {
    static const mgpu__jfield top[] = {
        {"format_version", MGPU__J_INT, 1, 1}, {"step", MGPU__J_INT, 1, 0}, {"epoch", MGPU__J_INT, 0, 0},
        {"batch_in_epoch", MGPU__J_INT, 0, 0}, {"world_size", MGPU__J_INT, 0, 1}, {"rng", MGPU__J_OBJECT, 0, 0},
        {"scaler", MGPU__J_OBJECT, 0, 0}, {"schedule", MGPU__J_OBJECT, 0, 0}, {"metrics", MGPU__J_ARRAY, 0, 0},
        {"options", MGPU__J_OBJECT, 0, 0}, {"epoch_stats", MGPU__J_OBJECT, 0, 0}};
    static const mgpu__jfield rng[] = {{"seed", MGPU__J_U64, 1, 0}, {"offset", MGPU__J_U64, 1, 0}};
    static const mgpu__jfield scaler[] = {{"scale", MGPU__J_NUMBER, 1, 0}, {"growth_tracker", MGPU__J_INT, 1, 0}};
    const mgpu_json *v, *m;
    int64_t version = 0;
    double scale;
    if (!s || s->type != MGPU_JSON_OBJECT) return mgpu__fail(MGPU_ERR_FORMAT, "%s: the top level is not a JSON object", label);
    if (mgpu__json_check_fields(s, label, "", top, (int)(sizeof top / sizeof top[0])) != MGPU_OK) return MGPU_ERR_FORMAT;
    mgpu_json_int64(mgpu_json_get(s, "format_version"), &version);
    if (version != MGPU__CKPT_FORMAT_VERSION)
        return mgpu__fail(MGPU_ERR_FORMAT, "%s: format_version %lld is not supported (this mgpu reads version %d)", label, (long long)version,
                          MGPU__CKPT_FORMAT_VERSION);
    if ((v = mgpu_json_get(s, "rng")) && mgpu__json_check_fields(v, label, "rng.", rng, 2) != MGPU_OK) return MGPU_ERR_FORMAT;
    if ((v = mgpu_json_get(s, "scaler"))) {
        if (mgpu__json_check_fields(v, label, "scaler.", scaler, 2) != MGPU_OK) return MGPU_ERR_FORMAT;
        scale = mgpu_json_get(v, "scale")->number;
        if (mgpu_json_get(v, "scale")->type != MGPU_JSON_NUMBER || !(scale > 0) || !isfinite(scale))
            return mgpu__fail(MGPU_ERR_FORMAT, "%s: \"scaler.scale\" must be a positive finite number", label);
    }
    if ((v = mgpu_json_get(s, "metrics")))
        for (m = v->child; m; m = m->next)
            if (m->type != MGPU_JSON_OBJECT) return mgpu__fail(MGPU_ERR_FORMAT, "%s: \"metrics\" must hold one object per epoch", label);
    return MGPU_OK;
}

static mgpu_json *mgpu__ckpt_parse_state(const char *text, size_t len, const char *label) {
    mgpu_json *j = mgpu_json_parse(text, len, label); /* MGPU_ERR_FORMAT naming label and offset */
    if (j && mgpu__ckpt_check_state(j, label) != MGPU_OK) { mgpu_json_free(j); return NULL; }
    return j;
}


/* The metadata checksum, when present, must match the data section. */
static mgpu_result mgpu__st_check_checksum(const mgpu_safetensors *st) {
    const char *want = mgpu_safetensors_metadata(st, "checksum");
    char got[40];
    uint64_t hlen = 0;
    mgpu__hash64 h;
    int i;
    if (!want) return MGPU_OK;
    for (i = 7; i >= 0; i--) hlen = (hlen << 8) | st->bytes[i];
    mgpu__hash64_init(&h);
    mgpu__hash64_update(&h, st->bytes + 8 + hlen, st->len - 8 - (size_t)hlen);
    mgpu__checksum_text(mgpu__hash64_final(&h), got, sizeof got);
    if (strcmp(want, got) != 0)
        return mgpu__st_error(MGPU_ERR_FORMAT, st->label, NULL, "the data does not match its checksum (%.40s in the header, %s computed): the file is corrupt", want, got);
    return MGPU_OK;
}

/* Opens and validates a checkpoint's safetensors file: structure, then checksum. */
static mgpu_safetensors *mgpu__ckpt_st_checked(mgpu_safetensors *st) {
    if (st && mgpu__st_check_checksum(st) != MGPU_OK) { mgpu_safetensors_close(st); return NULL; }
    return st;
}

/* --------------------------------------------------------------------------------------
   The tensors of a checkpoint
   -------------------------------------------------------------------------------------- */

/* The optimizer's checkpoint tensors: its state tensors, then one I64 scalar "<param>.step" per
   parameter (PyTorch's per-parameter state["step"]) whose values live in steps[]. */
typedef struct mgpu__optim_tensors {
    mgpu__model_tensors list;
    int n_params;
    char **step_names; mgpu_tensor *step_tensors; int64_t *steps;
} mgpu__optim_tensors;

static void mgpu__optim_tensors_free(mgpu__optim_tensors *ot) {
    int i;
    for (i = 0; ot->step_names && i < ot->n_params; i++) mgpu_free(ot->step_names[i]);
    mgpu_free(ot->step_names);
    mgpu_free(ot->step_tensors);
    mgpu_free(ot->steps);
    mgpu__model_tensors_free(&ot->list);
    memset(ot, 0, sizeof *ot);
}

static mgpu_result mgpu__optim_tensors_collect(const mgpu_optimizer *o, mgpu__optim_tensors *ot) {
    int i, ns = o->n_states, np = o->n_params;
    memset(ot, 0, sizeof *ot);
    ot->n_params = np;
    ot->list.n = ns + np;
    ot->list.names = (const char **)mgpu__calloc(sizeof(char *) * (size_t)(ot->list.n + 1), "the optimizer's checkpoint list");
    ot->list.tensors = (mgpu_tensor **)mgpu__calloc(sizeof(mgpu_tensor *) * (size_t)(ot->list.n + 1), "the optimizer's checkpoint list");
    ot->step_names = (char **)mgpu__calloc(sizeof(char *) * (size_t)(np + 1), "the optimizer's checkpoint list");
    ot->step_tensors = (mgpu_tensor *)mgpu__calloc(sizeof(mgpu_tensor) * (size_t)(np + 1), "the optimizer's checkpoint list");
    ot->steps = (int64_t *)mgpu__calloc(sizeof(int64_t) * (size_t)(np + 1), "the optimizer's checkpoint list");
    if (!ot->list.names || !ot->list.tensors || !ot->step_names || !ot->step_tensors || !ot->steps) return MGPU_ERR_OOM_HOST;
    for (i = 0; i < ns; i++) { ot->list.names[i] = o->states[i].name; ot->list.tensors[i] = o->states[i].tensor; }
    for (i = 0; i < np; i++) {
        if (!(ot->step_names[i] = mgpu__join_name(o->model->params.items[i].name, "step"))) return MGPU_ERR_OOM_HOST;
        ot->steps[i] = o->params[i].steps;
        mgpu__tensor_init_header(&ot->step_tensors[i], o->model->ctx, MGPU_I64, 0, NULL, 1);
        ot->step_tensors[i].device.type = MGPU_DEVICE_CPU; /* host memory, whatever the model's device */
        ot->step_tensors[i].device.index = 0;
        ot->step_tensors[i].data = &ot->steps[i];
        ot->list.names[ns + i] = ot->step_names[i];
        ot->list.tensors[ns + i] = &ot->step_tensors[i];
    }
    return MGPU_OK;
}

static const char *mgpu__optimizer_type_name(mgpu_optimizer_type t) {
    return t == MGPU_OPTIM_SGD ? "sgd" : t == MGPU_OPTIM_ADAM ? "adam" : "adamw";
}

/* --------------------------------------------------------------------------------------
   Saving: a job lists every tensor of the two files (headers pointing at the live tensors, or at a
   host snapshot in background mode) plus the state text, and runs on either thread.
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__ckpt_job {
    char dir[MGPU__CKPT_PATH_MAX];
    int keep_last;
    int64_t step;
    int n_model, n_total;            /* tensors [0, n_model) go to model.safetensors, the rest to optimizer.safetensors */
    char **names;
    mgpu_tensor *tensors;            /* header copies */
    int64_t *param_steps;            /* values of the "<param>.step" tensors */
    char *state_json;
    char optim_type[16], optim_steps[24];
    size_t reserve_bytes;            /* > 0: this job only allocates the snapshot buffer (into reserved) */
    void *reserved;
    mgpu_result result;
    char error[1024];
} mgpu__ckpt_job;

static void mgpu__ckpt_job_free(mgpu__ckpt_job *j) {
    int i;
    if (!j) return;
    for (i = 0; j->names && i < j->n_total; i++) mgpu_free(j->names[i]);
    mgpu_free(j->names);
    mgpu_free(j->tensors);
    mgpu_free(j->param_steps);
    mgpu_free(j->state_json);
    mgpu_free(j->reserved);
    mgpu_free(j);
}

/* Appends list's tensors to the job (names copied: the model may change while a write runs). */
static mgpu_result mgpu__ckpt_job_add(mgpu__ckpt_job *j, const mgpu__model_tensors *list) {
    int i;
    for (i = 0; i < list->n; i++, j->n_total++) {
        if (!(j->names[j->n_total] = mgpu__strdup(list->names[i]))) return MGPU_ERR_OOM_HOST;
        j->tensors[j->n_total] = *list->tensors[i];
        j->tensors[j->n_total].grad = NULL;
        j->tensors[j->n_total].node = NULL;
        j->tensors[j->n_total].owns_data = 0;
    }
    return MGPU_OK;
}

static mgpu_result mgpu__ckpt_job_fill(mgpu__ckpt_job *j, const mgpu_model *m, const mgpu_optimizer *o) {
    mgpu__model_tensors mt;
    mgpu__optim_tensors ot;
    mgpu_result r;
    int n;
    memset(&mt, 0, sizeof mt);
    memset(&ot, 0, sizeof ot);
    r = mgpu__model_tensors_collect(m, &mt, "mgpu_checkpointer_save");
    if (r == MGPU_OK && o) r = mgpu__optim_tensors_collect(o, &ot);
    n = mt.n + ot.list.n;
    if (r == MGPU_OK) {
        j->names = (char **)mgpu__calloc(sizeof(char *) * (size_t)(n + 1), "a checkpoint");
        j->tensors = (mgpu_tensor *)mgpu__calloc(sizeof(mgpu_tensor) * (size_t)(n + 1), "a checkpoint");
        j->param_steps = (int64_t *)mgpu__calloc(sizeof(int64_t) * (size_t)(ot.n_params + 1), "a checkpoint");
        if (!j->names || !j->tensors || !j->param_steps) r = MGPU_ERR_OOM_HOST;
    }
    if (r == MGPU_OK && (r = mgpu__ckpt_job_add(j, &mt)) == MGPU_OK) {
        j->n_model = j->n_total;
        r = mgpu__ckpt_job_add(j, &ot.list);
    }
    if (r == MGPU_OK && o) {
        int i;
        /* the step scalars point into the job's own copy of the counts */
        for (i = 0; i < ot.n_params; i++) {
            j->param_steps[i] = ot.steps[i];
            j->tensors[j->n_model + o->n_states + i].data = &j->param_steps[i];
        }
        snprintf(j->optim_type, sizeof j->optim_type, "%s", mgpu__optimizer_type_name(o->desc.type));
        snprintf(j->optim_steps, sizeof j->optim_steps, "%lld", (long long)o->step_count);
    }
    mgpu__optim_tensors_free(&ot);
    mgpu__model_tensors_free(&mt);
    return r;
}

/* Bytes of the job's snapshot: every tensor, each 64-byte aligned. */
static size_t mgpu__ckpt_snapshot_bytes(const mgpu__ckpt_job *j) {
    size_t total = 0;
    int i;
    for (i = 0; i < j->n_total; i++) total += (mgpu_tensor_nbytes(&j->tensors[i]) + 63) & ~(size_t)63;
    return total;
}

/* A snapshot buffer with its pages already faulted in: one madvise is several times cheaper than
   a page fault per 4 KiB on first touch (about 1.5 s for a 1.2 GB checkpoint in a VM). */
static void *mgpu__ckpt_alloc_snapshot(size_t bytes) {
    void *p = mgpu__alloc(bytes, "a checkpoint snapshot");
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
    if (p) {
        uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), begin = ((uintptr_t)p + page - 1) & ~(page - 1),
                  end = ((uintptr_t)p + bytes) & ~(page - 1);
        if (end > begin) (void)madvise((void *)begin, end - begin, MADV_POPULATE_WRITE); /* a hint: old kernels fault on touch */
    }
#endif
    return p;
}

/* Background mode: every tensor (on the host or a device) copied into one host buffer, so training
   may change them. The buffer is kept between saves (and can be reserved ahead, see
   mgpu__checkpointer_reserve): fresh memory costs page faults, which would otherwise be paid on
   the training thread at every save. */
static mgpu_result mgpu__ckpt_job_snapshot(mgpu__ckpt_job *j, void **buffer, size_t *capacity) {
    size_t total = mgpu__ckpt_snapshot_bytes(j), at = 0;
    int i;
    if (total > *capacity) {
        mgpu_free(*buffer);
        *capacity = 0;
        if (!(*buffer = mgpu__ckpt_alloc_snapshot(total))) return MGPU_ERR_OOM_HOST;
        *capacity = total;
    }
    for (i = 0; i < j->n_total; i++) {
        mgpu_tensor *t = &j->tensors[i];
        size_t bytes = mgpu_tensor_nbytes(t);
        mgpu_result r = mgpu__tensor_get_bytes(t, 0, (char *)*buffer + at, bytes, "mgpu_checkpointer_save: snapshot of a device tensor");
        if (r != MGPU_OK) return r;
        t->data = (char *)*buffer + at;
        t->device.type = MGPU_DEVICE_CPU; t->device.index = 0;
        at += (bytes + 63) & ~(size_t)63;
    }
    return MGPU_OK;
}

/* Tensors [begin, end) of the job as one safetensors file; values[0] becomes the checksum of the
   data section (the tensors' bytes in order, as the file lays them out), computed as it is written. */
static mgpu_result mgpu__ckpt_job_write_st(const mgpu__ckpt_job *j, const char *dir, const char *file, int begin, int end,
                                           int n_meta, const char **keys, const char **values) {
    const mgpu_tensor **ptrs = (const mgpu_tensor **)mgpu__alloc(sizeof(mgpu_tensor *) * (size_t)(end - begin + 1), "a checkpoint file");
    char path[MGPU__CKPT_PATH_MAX];
    mgpu_result r;
    int i;
    if (!ptrs) return MGPU_ERR_OOM_HOST;
    for (i = begin; i < end; i++) ptrs[i - begin] = &j->tensors[i];
    keys[0] = "checksum"; values[0] = "";
    if ((r = mgpu__path_join(path, dir, file)) == MGPU_OK)
        r = mgpu__st_save(path, end - begin, (const char *const *)(j->names + begin), ptrs, n_meta, keys, values, 0);
    mgpu_free((void *)ptrs);
    return r;
}

static mgpu_result mgpu__ckpt_job_write_files(const mgpu__ckpt_job *j, const char *tmp) {
    const char *keys[4], *values[4];
    char path[MGPU__CKPT_PATH_MAX];
    mgpu_result r;
    keys[1] = "format"; values[1] = "pt";   /* PyTorch's safetensors.torch.save_file marker */
    if ((r = mgpu__ckpt_job_write_st(j, tmp, MGPU__CKPT_MODEL, 0, j->n_model, 2, keys, values)) != MGPU_OK) return r;
    keys[1] = "format"; values[1] = "mgpu";
    keys[2] = "optimizer"; values[2] = j->optim_type;
    keys[3] = "step_count"; values[3] = j->optim_steps;
    if ((r = mgpu__ckpt_job_write_st(j, tmp, MGPU__CKPT_OPTIM, j->n_model, j->n_total, j->optim_type[0] ? 4 : 2, keys, values)) != MGPU_OK)
        return r;
    if ((r = mgpu__path_join(path, tmp, MGPU__CKPT_STATE)) != MGPU_OK) return r;
    return mgpu_write_file_atomic(path, j->state_json, strlen(j->state_json));
}

/* tmp/ becomes final/. An existing final/ (the same step saved again) is swapped out atomically
   where the system can (renameat2), else removed first. */
static mgpu_result mgpu__ckpt_install(const char *tmp, const char *final) {
    int err;
    if (mgpu__is_dir(final)) {
#if defined(__linux__) && defined(RENAME_EXCHANGE)
        if (renameat2(AT_FDCWD, tmp, AT_FDCWD, final, RENAME_EXCHANGE) == 0) {
            mgpu__remove_tree(tmp, 0);
            return mgpu__fsync_parent_dir(final) == 0 ? MGPU_OK
                                                     : mgpu__fail(MGPU_ERR_IO, "checkpoint '%s': fsync of its directory failed", final);
        }
#endif
        if ((err = mgpu__remove_tree(final, 0)) != 0)
            return mgpu__fail(MGPU_ERR_IO, "checkpoint '%s' exists and cannot be replaced: %s", final, strerror(err));
    }
    if (rename(tmp, final) != 0) return mgpu__fail(MGPU_ERR_IO, "cannot rename '%s' to '%s': %s", tmp, final, strerror(errno));
    if ((err = mgpu__fsync_parent_dir(final)) != 0) return mgpu__fail(MGPU_ERR_IO, "checkpoint '%s': fsync of its directory failed: %s", final, strerror(err));
    return MGPU_OK;
}

static mgpu_result mgpu__ckpt_job_run(mgpu__ckpt_job *j) {
    char name[40], latest_text[48], tmp_name[48], final[MGPU__CKPT_PATH_MAX], tmp[MGPU__CKPT_PATH_MAX], latest[MGPU__CKPT_PATH_MAX];
    mgpu_result r;
    mgpu__ckpt_dir_name(name, sizeof name, j->step);
    snprintf(tmp_name, sizeof tmp_name, "%s.tmp", name);
    snprintf(latest_text, sizeof latest_text, "%s\n", name);
    if ((r = mgpu__mkdirs(j->dir)) != MGPU_OK) return r;
    mgpu__ckpt_remove_stale(j->dir);
    if ((r = mgpu__path_join(final, j->dir, name)) != MGPU_OK || (r = mgpu__path_join(tmp, j->dir, tmp_name)) != MGPU_OK ||
        (r = mgpu__path_join(latest, j->dir, "latest")) != MGPU_OK)
        return r;
    if (mkdir(tmp, 0777) != 0) return mgpu__fail(MGPU_ERR_IO, "cannot create checkpoint directory '%s': %s", tmp, strerror(errno));
    if ((r = mgpu__ckpt_job_write_files(j, tmp)) == MGPU_OK && (r = mgpu__ckpt_install(tmp, final)) == MGPU_OK)
        r = mgpu_write_file_atomic(latest, latest_text, strlen(latest_text));
    if (r != MGPU_OK) {
        mgpu__remove_tree(tmp, 0); /* the previous checkpoints and `latest` are untouched */
        return r;
    }
    mgpu__ckpt_prune(j->dir, j->keep_last, j->step);
    return MGPU_OK;
}

/* The writer thread: its errors are recorded in the job for the training thread to report. */
static void *mgpu__ckpt_thread(void *arg) {
    mgpu__ckpt_job *j = (mgpu__ckpt_job *)arg;
    if (j->reserve_bytes) {
        j->reserved = mgpu__ckpt_alloc_snapshot(j->reserve_bytes); /* none: the first save allocates it */
        j->result = MGPU_OK;
        return NULL;
    }
    j->result = mgpu__ckpt_job_run(j);
    if (j->result != MGPU_OK) snprintf(j->error, sizeof j->error, "%s", mgpu_last_error());
    return NULL;
}

struct mgpu_checkpointer {
    char dir[MGPU__CKPT_PATH_MAX];
    int keep_last, background;
    mgpu__ckpt_job *pending;   /* background write in flight */
    pthread_t thread;
    void *snapshot; size_t snapshot_bytes;  /* background mode's host copy, reused by every save */
};

MGPU_API mgpu_checkpointer *mgpu_checkpointer_create(const mgpu_checkpoint_desc *desc) {
    mgpu_checkpointer *c;
    if (!desc || !desc->dir || !desc->dir[0]) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_checkpointer_create: desc and desc->dir are required");
    if (strlen(desc->dir) > MGPU__CKPT_PATH_MAX - 64) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_checkpointer_create: directory '%s' is too long", desc->dir);
    if (desc->keep_last < 0) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_checkpointer_create: keep_last is %d, must be >= 0", desc->keep_last);
    c = (mgpu_checkpointer *)mgpu__calloc(sizeof *c, "a checkpointer");
    if (!c) return NULL;
    snprintf(c->dir, sizeof c->dir, "%s", desc->dir);
    c->keep_last = desc->keep_last;
    c->background = desc->background != 0;
    return c;
}

MGPU_API mgpu_result mgpu_checkpointer_wait(mgpu_checkpointer *c) {
    mgpu__ckpt_job *j;
    mgpu_result r;
    if (!c) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_checkpointer_wait: checkpointer is NULL");
    if (!(j = c->pending)) return MGPU_OK;
    pthread_join(c->thread, NULL);
    c->pending = NULL;
    if (j->reserved && j->reserve_bytes > c->snapshot_bytes) {
        mgpu_free(c->snapshot);
        c->snapshot = j->reserved; c->snapshot_bytes = j->reserve_bytes;
        j->reserved = NULL;
    }
    r = j->result;
    if (r != MGPU_OK) mgpu__fail(r, "%s", j->error); /* re-raised on the caller's thread */
    mgpu__ckpt_job_free(j);
    return r;
}

MGPU_API void mgpu_checkpointer_destroy(mgpu_checkpointer *c) {
    if (!c) return;
    if (mgpu_checkpointer_wait(c) != MGPU_OK) mgpu_log(MGPU_LOG_WARN, "background checkpoint save failed: %s", mgpu_last_error());
    mgpu_free(c->snapshot);
    mgpu_free(c);
}

/* The state text to write: the caller's (checked, with the right step) or a minimal one. */
static char *mgpu__ckpt_state_text(int64_t step, const char *json) {
    char minimal[96];
    mgpu_json *j;
    int64_t s = -1;
    if (!json) {
        snprintf(minimal, sizeof minimal, "{\"format_version\":%d,\"step\":%lld}\n", MGPU__CKPT_FORMAT_VERSION, (long long)step);
        return mgpu__strdup(minimal);
    }
    if (!(j = mgpu__ckpt_parse_state(json, strlen(json), "mgpu_checkpointer_save: trainer_state_json"))) {
        mgpu__error_code = MGPU_ERR_INVALID_ARG;
        return NULL;
    }
    mgpu_json_int64(mgpu_json_get(j, "step"), &s);
    mgpu_json_free(j);
    if (s != step) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_checkpointer_save: trainer_state_json has step %lld but the checkpoint is for step %lld", (long long)s, (long long)step);
        return NULL;
    }
    return mgpu__strdup(json);
}

MGPU_API mgpu_result mgpu_checkpointer_save(mgpu_checkpointer *c, int64_t step, const mgpu_model *m,
                                            const mgpu_optimizer *o, const char *trainer_state_json) {
    mgpu__ckpt_job *j;
    mgpu_result r;
    if (!c || !m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_checkpointer_save: checkpointer and model are required");
    if (step < 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_checkpointer_save: step is %lld, must be >= 0", (long long)step);
    if ((r = mgpu_checkpointer_wait(c)) != MGPU_OK) return r; /* one write at a time; a failed one is reported first */
    if (!(j = (mgpu__ckpt_job *)mgpu__calloc(sizeof *j, "a checkpoint"))) return MGPU_ERR_OOM_HOST;
    snprintf(j->dir, sizeof j->dir, "%s", c->dir);
    j->keep_last = c->keep_last;
    j->step = step;
    if (!(j->state_json = mgpu__ckpt_state_text(step, trainer_state_json))) r = mgpu_last_result();
    if (r == MGPU_OK) r = mgpu__ckpt_job_fill(j, m, o);
    if (r == MGPU_OK && c->background && (r = mgpu__ckpt_job_snapshot(j, &c->snapshot, &c->snapshot_bytes)) == MGPU_OK) {
        if (pthread_create(&c->thread, NULL, mgpu__ckpt_thread, j) == 0) { c->pending = j; return MGPU_OK; }
        mgpu_log(MGPU_LOG_WARN, "cannot start the checkpoint writer thread; saving step %lld on this thread", (long long)step);
    }
    if (r == MGPU_OK) r = mgpu__ckpt_job_run(j);
    mgpu__ckpt_job_free(j);
    return r;
}

/* Background mode: allocates and faults in the snapshot buffer for m and o on the writer thread,
   so that the first save blocks training only for the copy, like later saves. Called at fit setup;
   a later save (or wait) picks the buffer up. Not reserving is never an error. */
static MGPU__UNUSED mgpu_result mgpu__checkpointer_reserve(mgpu_checkpointer *c, const mgpu_model *m, const mgpu_optimizer *o) {
    mgpu__ckpt_job *j;
    mgpu_result r;
    if (!c || !m || !c->background) return MGPU_OK;
    if ((r = mgpu_checkpointer_wait(c)) != MGPU_OK) return r;
    if (!(j = (mgpu__ckpt_job *)mgpu__calloc(sizeof *j, "a checkpoint"))) return MGPU_ERR_OOM_HOST;
    if ((r = mgpu__ckpt_job_fill(j, m, o)) == MGPU_OK && (j->reserve_bytes = mgpu__ckpt_snapshot_bytes(j)) > c->snapshot_bytes &&
        pthread_create(&c->thread, NULL, mgpu__ckpt_thread, j) == 0) {
        c->pending = j;
        return MGPU_OK;
    }
    mgpu__ckpt_job_free(j);
    return r;
}

/* --------------------------------------------------------------------------------------
   Loading and validation
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__ckpt_files {
    mgpu_safetensors *model, *optim;
    mgpu_json *state;
    const char *label;
} mgpu__ckpt_files;

static void mgpu__ckpt_files_close(mgpu__ckpt_files *f) {
    mgpu_safetensors_close(f->model);
    mgpu_safetensors_close(f->optim);
    mgpu_json_free(f->state);
    f->model = f->optim = NULL;
    f->state = NULL;
}

/* "<param>.<suffix>" of an optimizer entry: suffix one of the known states, param a tensor of the
   model file with the same shape (steps: I64 scalars >= 0). */
static mgpu_result mgpu__ckpt_check_optim_entry(const mgpu__ckpt_files *f, const mgpu_safetensors_entry *e) {
    static const char *const moments[] = {"exp_avg", "exp_avg_sq", "momentum_buffer"};
    const char *dot = strrchr(e->name, '.'), *label = f->optim->label;
    const mgpu_safetensors_entry *p;
    char param[1024];
    size_t i;
    int64_t v;
    if (!dot || (size_t)(dot - e->name) >= sizeof param) return mgpu__st_error(MGPU_ERR_FORMAT, label, e->name, "is not named <parameter>.<state>");
    memcpy(param, e->name, (size_t)(dot - e->name));
    param[dot - e->name] = 0;
    if (!(p = mgpu_safetensors_find(f->model, param)))
        return mgpu__st_error(MGPU_ERR_FORMAT, label, e->name, "belongs to parameter '%s', which %s does not hold", param, f->model->label);
    if (strcmp(dot + 1, "step") == 0) {
        if (e->dtype != MGPU_I64 || e->ndim != 0) return mgpu__st_error(MGPU_ERR_FORMAT, label, e->name, "a step count must be an I64 scalar");
        memcpy(&v, e->data, sizeof v);
        return v >= 0 ? MGPU_OK : mgpu__st_error(MGPU_ERR_FORMAT, label, e->name, "step count %lld is negative", (long long)v);
    }
    for (i = 0; i < sizeof moments / sizeof moments[0]; i++) {
        if (strcmp(dot + 1, moments[i]) != 0) continue;
        if (e->dtype != MGPU_F32) return mgpu__st_error(MGPU_ERR_SHAPE, label, e->name, "optimizer state must be F32, not %s", mgpu_dtype_name(e->dtype));
        if (!mgpu__dtype_is_float(p->dtype))
            return mgpu__st_error(MGPU_ERR_SHAPE, f->model->label, p->name, "dtype %s, but only float parameters have optimizer state", mgpu_dtype_name(p->dtype));
        if (e->ndim != p->ndim || (e->ndim && memcmp(e->shape, p->shape, sizeof(int64_t) * (size_t)e->ndim) != 0)) {
            char a[96], b[96];
            mgpu_shape_string(e->ndim, e->shape, a, sizeof a);
            mgpu_shape_string(p->ndim, p->shape, b, sizeof b);
            return mgpu__st_error(MGPU_ERR_SHAPE, label, e->name, "shape %s differs from its parameter's %s", a, b);
        }
        return MGPU_OK;
    }
    return mgpu__st_error(MGPU_ERR_FORMAT, label, e->name, "unknown optimizer state '%s'", dot + 1);
}

/* The files agree with each other: optimizer entries belong to model tensors, step_count metadata
   is a count, and the state's step matches the directory name (when there is one). */
static mgpu_result mgpu__ckpt_check_files(const mgpu__ckpt_files *f, int64_t dir_step) {
    const char *sc = mgpu_safetensors_metadata(f->optim, "step_count");
    int64_t step = -1;
    int i;
    mgpu_result r;
    for (i = 0; i < mgpu_safetensors_count(f->optim); i++)
        if ((r = mgpu__ckpt_check_optim_entry(f, mgpu_safetensors_get(f->optim, i))) != MGPU_OK) return r;
    if (sc) {
        long long v;
        if (!mgpu__parse_ll(sc, &v) || v < 0) return mgpu__st_error(MGPU_ERR_FORMAT, f->optim->label, NULL, "metadata step_count \"%.32s\" is not a count", sc);
    }
    mgpu_json_int64(mgpu_json_get(f->state, "step"), &step);
    if (dir_step >= 0 && step != dir_step)
        return mgpu__fail(MGPU_ERR_FORMAT, "%s: trainer_state.json says step %lld but the directory is step %lld", f->label, (long long)step, (long long)dir_step);
    return MGPU_OK;
}

/* Opens and fully validates DIR's three files; errors name the file (and tensor). */
static mgpu_result mgpu__ckpt_open_dir(const char *path, mgpu__ckpt_files *f) {
    char file[MGPU__CKPT_PATH_MAX];
    const char *base = strrchr(path, '/');
    void *text = NULL;
    size_t len = 0;
    int64_t dir_step = -1;
    mgpu_result r;
    memset(f, 0, sizeof *f);
    f->label = path;
    if (!mgpu__is_dir(path)) return mgpu__fail(MGPU_ERR_IO, "checkpoint '%s' is not a directory", path);
    if ((r = mgpu__path_join(file, path, MGPU__CKPT_MODEL)) != MGPU_OK || !(f->model = mgpu__ckpt_st_checked(mgpu_safetensors_open(file))) ||
        (r = mgpu__path_join(file, path, MGPU__CKPT_OPTIM)) != MGPU_OK || !(f->optim = mgpu__ckpt_st_checked(mgpu_safetensors_open(file))) ||
        (r = mgpu__path_join(file, path, MGPU__CKPT_STATE)) != MGPU_OK || (r = mgpu_read_file(file, &text, &len)) != MGPU_OK) {
        mgpu__ckpt_files_close(f);
        return r != MGPU_OK ? r : mgpu_last_result();
    }
    f->state = mgpu__ckpt_parse_state((const char *)text, len, file);
    mgpu_free(text);
    if (!f->state) { mgpu__ckpt_files_close(f); return mgpu_last_result(); }
    mgpu__ckpt_step_of_name(base ? base + 1 : path, &dir_step);
    if ((r = mgpu__ckpt_check_files(f, dir_step)) != MGPU_OK) mgpu__ckpt_files_close(f);
    return r;
}

static mgpu_result mgpu__ckpt_open_bytes(const mgpu_checkpoint_bytes *b, const char *label, mgpu__ckpt_files *f) {
    char name[MGPU__CKPT_PATH_MAX];
    mgpu_result r;
    memset(f, 0, sizeof *f);
    f->label = label;
    snprintf(name, sizeof name, "%.4000s/" MGPU__CKPT_MODEL, label);
    if (!(f->model = mgpu__ckpt_st_checked(mgpu_safetensors_parse(b->model, b->model_len, name)))) return mgpu_last_result();
    snprintf(name, sizeof name, "%.4000s/" MGPU__CKPT_OPTIM, label);
    if (!(f->optim = mgpu__ckpt_st_checked(mgpu_safetensors_parse(b->optimizer, b->optimizer_len, name)))) {
        mgpu__ckpt_files_close(f);
        return mgpu_last_result();
    }
    snprintf(name, sizeof name, "%.4000s/" MGPU__CKPT_STATE, label);
    if (!(f->state = mgpu__ckpt_parse_state(b->trainer_state ? b->trainer_state : "", b->trainer_state_len, name))) {
        mgpu__ckpt_files_close(f);
        return mgpu_last_result();
    }
    if ((r = mgpu__ckpt_check_files(f, -1)) != MGPU_OK) mgpu__ckpt_files_close(f);
    return r;
}

/* Validates files against m and o, then (only if all fits) copies everything in. */
static mgpu_result mgpu__ckpt_apply(mgpu__ckpt_files *f, mgpu_model *m, mgpu_optimizer *o) {
    mgpu__model_tensors mt;
    mgpu__optim_tensors ot;
    mgpu__stage stage;
    mgpu_result r;
    int i;
    memset(&mt, 0, sizeof mt);
    memset(&ot, 0, sizeof ot);
    r = mgpu__model_tensors_collect(m, &mt, "mgpu_checkpoint_load");
    if (r == MGPU_OK) r = mgpu__model_check_file(f->model, &mt);
    if (r == MGPU_OK && o && (r = mgpu__optim_tensors_collect(o, &ot)) == MGPU_OK) r = mgpu__model_check_file(f->optim, &ot.list);
    /* only now is anything overwritten: host tensors in place, device tensors through one staging buffer */
    memset(&stage, 0, sizeof stage);
    for (i = 0; i < mt.n && r == MGPU_OK; i++) r = mgpu__st_copy(mgpu_safetensors_find(f->model, mt.names[i]), mt.tensors[i], &stage);
    for (i = 0; o && i < ot.list.n && r == MGPU_OK; i++)
        r = mgpu__st_copy(mgpu_safetensors_find(f->optim, ot.list.names[i]), ot.list.tensors[i], &stage);
    mgpu__stage_free(&stage);
    if (r == MGPU_OK && o) {
        const char *sc = mgpu_safetensors_metadata(f->optim, "step_count");
        long long count = 0;
        for (i = 0; i < o->n_params; i++) {
            o->params[i].steps = ot.steps[i];
            if (ot.steps[i] > count) count = ot.steps[i];
        }
        if (sc) mgpu__parse_ll(sc, &count); /* validated when opened */
        o->step_count = count;
    }
    mgpu__optim_tensors_free(&ot);
    mgpu__model_tensors_free(&mt);
    return r;
}

static mgpu_result mgpu__ckpt_finish_load(mgpu__ckpt_files *f, mgpu_model *m, mgpu_optimizer *o, mgpu_json **trainer_state) {
    mgpu_result r = m ? mgpu__ckpt_apply(f, m, o) : MGPU_OK;
    if (r == MGPU_OK && trainer_state) { *trainer_state = f->state; f->state = NULL; }
    mgpu__ckpt_files_close(f);
    return r;
}

MGPU_API mgpu_result mgpu_checkpoint_load(const char *path, mgpu_model *m, mgpu_optimizer *o, mgpu_json **trainer_state) {
    mgpu__ckpt_files f;
    mgpu_result r;
    if (trainer_state) *trainer_state = NULL;
    if (!path || !m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_checkpoint_load: path and model are required");
    if ((r = mgpu__ckpt_open_dir(path, &f)) != MGPU_OK) return r;
    return mgpu__ckpt_finish_load(&f, m, o, trainer_state);
}

MGPU_API mgpu_result mgpu_checkpoint_load_bytes(const mgpu_checkpoint_bytes *files, const char *label, mgpu_model *m,
                                                mgpu_optimizer *o, mgpu_json **trainer_state) {
    mgpu__ckpt_files f;
    mgpu_result r;
    if (trainer_state) *trainer_state = NULL;
    if (!files || (!m && o)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_checkpoint_load_bytes: files are required, and o needs m");
    if ((r = mgpu__ckpt_open_bytes(files, label ? label : "checkpoint in memory", &f)) != MGPU_OK) return r;
    return mgpu__ckpt_finish_load(&f, m, o, trainer_state);
}

MGPU_API mgpu_result mgpu_checkpoint_verify(const char *path) {
    mgpu__ckpt_files f;
    mgpu_result r;
    if (!path) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_checkpoint_verify: path is NULL");
    if ((r = mgpu__ckpt_open_dir(path, &f)) == MGPU_OK) mgpu__ckpt_files_close(&f);
    return r;
}

/* The step directory named by DIR/latest, or "" when latest is absent or unreadable. */
static void mgpu__ckpt_read_latest(const char *dir, char *name, size_t size) {
    char path[MGPU__CKPT_PATH_MAX];
    void *text = NULL;
    size_t len = 0, n;
    int64_t step;
    name[0] = 0;
    if (mgpu__path_join(path, dir, "latest") != MGPU_OK || mgpu_read_file(path, &text, &len) != MGPU_OK) { mgpu_clear_error(); return; }
    n = len;
    while (n > 0 && (((char *)text)[n - 1] == '\n' || ((char *)text)[n - 1] == '\r' || ((char *)text)[n - 1] == ' ')) n--;
    ((char *)text)[n] = 0;
    /* only a plain step directory name: `latest` must not lead outside DIR */
    if (n < size && mgpu__ckpt_step_of_name((const char *)text, &step)) memcpy(name, text, n + 1);
    else snprintf(name, size, "?"); /* present but garbled */
    mgpu_free(text);
}

/* Copies candidate into the caller's buffer. */
static mgpu_result mgpu__ckpt_found(const char *candidate, char *path, size_t size) {
    if (strlen(candidate) >= size) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_checkpoint_find: path buffer of %zu bytes is too small", size);
    memcpy(path, candidate, strlen(candidate) + 1);
    mgpu_clear_error();
    return MGPU_OK;
}

/* mgpu_checkpoint_find, its warnings logged at `warn` (the trainer's ranks other than 0 find the
   same checkpoint as rank 0, which alone tells). */
static mgpu_result mgpu__checkpoint_find(const char *dir, char *path, size_t size, mgpu_log_level warn) {
    char latest[64], candidate[MGPU__CKPT_PATH_MAX], first_error[700];
    int64_t *steps = NULL, latest_step = -1;
    int n = 0, i;
    mgpu_result r;
    if (!dir || !path || size == 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_checkpoint_find: dir and path are required");
    path[0] = first_error[0] = 0;
    if (!mgpu__is_dir(dir)) return mgpu__fail(MGPU_ERR_IO, "no checkpoint in '%s': not a directory", dir);
    mgpu__ckpt_read_latest(dir, latest, sizeof latest);
    if (mgpu__ckpt_step_of_name(latest, &latest_step) && mgpu__path_join(candidate, dir, latest) == MGPU_OK) {
        if (mgpu_checkpoint_verify(candidate) == MGPU_OK) return mgpu__ckpt_found(candidate, path, size);
        snprintf(first_error, sizeof first_error, "%.690s", mgpu_last_error());
        mgpu_log(warn, "the latest checkpoint is corrupt: %s", first_error);
    } else if (latest[0]) {
        snprintf(first_error, sizeof first_error, "'%.300s/latest' does not name a step-* directory", dir);
        mgpu_log(warn, "%s", first_error);
    }
    /* the newest step-* directory that validates */
    if ((r = mgpu__ckpt_list_steps(dir, &steps, &n)) != MGPU_OK) return r;
    for (i = 0; i < n; i++) {
        char name[40];
        if (steps[i] == latest_step) continue; /* checked above */
        mgpu__ckpt_dir_name(name, sizeof name, steps[i]);
        if (mgpu__path_join(candidate, dir, name) != MGPU_OK) continue;
        if (mgpu_checkpoint_verify(candidate) == MGPU_OK) {
            mgpu_free(steps);
            mgpu_log(warn, "%s: using %s, the newest checkpoint that validates", latest[0] ? "latest is unusable" : "no 'latest' file", candidate);
            return mgpu__ckpt_found(candidate, path, size);
        }
        if (!first_error[0]) snprintf(first_error, sizeof first_error, "%.690s", mgpu_last_error());
        mgpu_log(warn, "skipping corrupt checkpoint: %s", mgpu_last_error());
    }
    mgpu_free(steps);
    if (first_error[0]) return mgpu__fail(MGPU_ERR_IO, "no valid checkpoint in '%s': %s", dir, first_error);
    return mgpu__fail(MGPU_ERR_IO, "no checkpoint in '%s'", dir);
}

MGPU_API mgpu_result mgpu_checkpoint_find(const char *dir, char *path, size_t size) {
    return mgpu__checkpoint_find(dir, path, size, MGPU_LOG_WARN);
}

/* Whether dir holds anything a save left: `latest` or a step-* directory (for --resume auto). */
static int mgpu__ckpt_any(const char *dir) {
    char path[MGPU__CKPT_PATH_MAX];
    int64_t *steps = NULL;
    int n = 0;
    if (mgpu__path_join(path, dir, "latest") == MGPU_OK && access(path, F_OK) == 0) return 1;
    if (mgpu__ckpt_list_steps(dir, &steps, &n) != MGPU_OK) { mgpu_clear_error(); return 0; }
    mgpu_free(steps);
    return n > 0;
}

/* The checked trainer_state.json of checkpoint path (NULL with an error naming the file). */
static mgpu_json *mgpu__ckpt_read_state(const char *path) {
    char file[MGPU__CKPT_PATH_MAX];
    void *text = NULL;
    size_t len = 0;
    mgpu_json *j;
    if (mgpu__path_join(file, path, MGPU__CKPT_STATE) != MGPU_OK || mgpu_read_file(file, &text, &len) != MGPU_OK) return NULL;
    j = mgpu__ckpt_parse_state((const char *)text, len, file);
    mgpu_free(text);
    return j;
}
/* ======================================================================================
   Communicators
   ====================================================================================== */
/* ======================================================================================
   Distributed: environment, TCP rendezvous store, communicators (shm, threads, nccl)

   The shm and threads backends share one collective engine. Ranks exchange data through a
   region (POSIX shared memory between processes, heap memory between threads) holding a header,
   one control line per rank and one staging slot per rank. A slot is split in two halves used by
   alternate rounds, so a fast rank fills the next round while slow ranks still read the last one.
   Reductions sum in rank order (rank 0 + rank 1 + ...): each rank reduces one slice of every chunk
   (reduce-scatter), then every rank copies all slices back (all-gather), so results are bit-identical
   on every rank, reproducible, and the reduction work is split across the ranks.
   The nccl backend (MGPU_CUDA) bootstraps through the same TCP store and runs NCCL on its own stream.
   ====================================================================================== */

#define MGPU__COMM_MAX_RANKS 1024            /* ranks of one shm or threads group */
#define MGPU__COMM_MAX_JOB_RANKS (1 << 20)   /* ranks of a job */
#define MGPU__COMM_DEFAULT_TIMEOUT_S 600.0
#define MGPU__COMM_MSG 1024   /* as long as mgpu_last_error()'s text */

static void mgpu__comm_sleep_s(double s) {
    struct timespec ts;
    if (s <= 0) return;
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
    nanosleep(&ts, NULL);
}

/* --------------------------------------------------------------------------------------
   Environment (torchrun, SLURM, Open MPI)
   -------------------------------------------------------------------------------------- */

/* Strict decimal integer: the whole string, digits with an optional leading '-'. */
static int mgpu__env_parse_int(const char *s, long long *out) {
    char *end = NULL;
    long long v;
    int first = s[0] == '-' ? 1 : 0;
    if (!(s[first] >= '0' && s[first] <= '9')) return 0;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno || *end) return 0;
    *out = v;
    return 1;
}

/* Reads integer variable `name` when set (*set = 1). A malformed value, a negative one or one
   outside [lo, hi] is an error naming the variable, its value and `expected`. */
static mgpu_result mgpu__env_int(const char *name, long long lo, long long hi, const char *expected, int *out, int *set) {
    const char *v = getenv(name);
    long long x = 0;
    *set = 0;
    if (!v) return MGPU_OK;
    if (!mgpu__env_parse_int(v, &x))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: %s='%s' is not an integer; expected %s", name, v, expected);
    if (x < 0 && lo >= 0)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: %s='%s' is negative; expected %s", name, v, expected);
    if (x < lo || x > hi)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: %s='%s' is out of range; expected %s", name, v, expected);
    *out = (int)x;
    *set = 1;
    return MGPU_OK;
}

/* The variables one launcher sets. */
typedef struct mgpu__env_names { const char *source, *rank, *world, *local_rank, *local_world; } mgpu__env_names;

/* SLURM_TASKS_PER_NODE ("4(x2),3": tasks of each node) at node SLURM_NODEID. */
static mgpu_result mgpu__env_slurm_tasks_per_node(int *out, int *set) {
    const char *list = getenv("SLURM_TASKS_PER_NODE"), *p;
    int node = 0, has_node = 0;
    long long at = 0;
    mgpu_result r;
    *set = 0;
    if (!list) return MGPU_OK;
    if ((r = mgpu__env_int("SLURM_NODEID", 0, INT_MAX, "the index of this node in the job", &node, &has_node)) != MGPU_OK) return r;
    for (p = list; *p;) {
        char *end = NULL;
        long tasks = strtol(p, &end, 10), repeat = 1;
        if (end == p || tasks < 1 || tasks > INT_MAX) break;
        p = end;
        if (*p == '(') {
            if (p[1] != 'x') break;
            repeat = strtol(p + 2, &end, 10);
            if (end == p + 2 || *end != ')' || repeat < 1) break;
            p = end + 1;
        }
        if (node < at + repeat) { *out = (int)tasks; *set = 1; return MGPU_OK; }
        at += repeat;
        if (*p == ',') p++;
        else if (*p) break;
    }
    return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: SLURM_TASKS_PER_NODE='%s' is not a SLURM task list covering node %d; "
                      "expected counts like '4(x2),3'", list, node);
}

/* Rank, world size, local rank and local world size from one launcher's variables. */
static mgpu_result mgpu__env_read_ranks(const mgpu__env_names *nm, mgpu_dist_env *e) {
    int rank = 0, world = 1, lrank = 0, lworld = 0, has_rank, has_world, has_lrank, has_lworld = 0;
    mgpu_result r;
    if ((r = mgpu__env_int(nm->world, 1, MGPU__COMM_MAX_JOB_RANKS, "a positive number of processes", &world, &has_world)) != MGPU_OK) return r;
    if ((r = mgpu__env_int(nm->rank, 0, INT_MAX, "this process's rank in [0, world size)", &rank, &has_rank)) != MGPU_OK) return r;
    if (has_world && !has_rank)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: %s='%s' is set but %s is not; expected %s in [0, %d) as well (%s)",
                          nm->world, getenv(nm->world), nm->rank, nm->rank, world, nm->source);
    if (has_rank && !has_world)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: %s='%s' is set but %s is not; expected the number of processes as well (%s)",
                          nm->rank, getenv(nm->rank), nm->world, nm->source);
    if (rank >= world)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: %s='%s' but %s='%s'; expected %s < %s",
                          nm->rank, getenv(nm->rank), nm->world, getenv(nm->world), nm->rank, nm->world);
    if ((r = mgpu__env_int(nm->local_world, 1, world, "the number of processes on this host, at most the world size", &lworld, &has_lworld)) != MGPU_OK) return r;
    if (!has_lworld && strcmp(nm->source, "slurm") == 0 && (r = mgpu__env_slurm_tasks_per_node(&lworld, &has_lworld)) != MGPU_OK) return r;
    if (!has_lworld) lworld = world;   /* unknown: assume one host */
    if ((r = mgpu__env_int(nm->local_rank, 0, INT_MAX, "this process's rank on its host", &lrank, &has_lrank)) != MGPU_OK) return r;
    if (!has_lrank) lrank = lworld == world ? rank : rank % lworld;
    if (lrank >= lworld)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: %s='%d' but the local world size is %d%s%s%s; expected %s < local world size",
                          nm->local_rank, lrank, lworld, has_lworld ? " (" : "", has_lworld ? nm->local_world : "", has_lworld ? ")" : "", nm->local_rank);
    e->rank = rank; e->world_size = world; e->local_rank = lrank; e->local_world_size = lworld;
    e->source = nm->source;
    return MGPU_OK;
}

/* An Open MPI job whose ranks all run on this host (mpirun -np N without a host list): rank 0
   is on the launching host, so MASTER_ADDR can default to the loopback address. */
static int mgpu__env_openmpi_single_node(const mgpu_dist_env *e) {
    const char *local = getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
    return strcmp(e->source, "openmpi") == 0 && local && atoi(local) == e->world_size;
}

/* MASTER_ADDR and MASTER_PORT (under SLURM the address may come from the node list; a single-node
   Open MPI job defaults to this host). */
static mgpu_result mgpu__env_read_master(mgpu_dist_env *e, int slurm) {
    const char *addr = getenv("MASTER_ADDR"), *nodes = NULL;
    char first[256];
    int port = 0, has_port;
    mgpu_result r;
    first[0] = 0;
    if (addr && !*addr) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: MASTER_ADDR is empty; expected the host name or IP address of rank 0's host");
    if (!addr && slurm) {
        nodes = getenv("SLURM_JOB_NODELIST") ? getenv("SLURM_JOB_NODELIST") : getenv("SLURM_NODELIST");
        if (nodes && *nodes && !strpbrk(nodes, "[")) {
            size_t n = strcspn(nodes, ",");
            if (n < sizeof first) { memcpy(first, nodes, n); first[n] = 0; addr = first; }
        }
    }
    if (!addr && mgpu__env_openmpi_single_node(e)) addr = "127.0.0.1";
    if (addr && strlen(addr) >= sizeof e->master_addr)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: MASTER_ADDR is %zu characters long; expected a host name or address under %zu",
                          strlen(addr), sizeof e->master_addr);
    if ((r = mgpu__env_int("MASTER_PORT", 1, 65535, "a TCP port in [1, 65535]", &port, &has_port)) != MGPU_OK) return r;
    if (e->world_size > 1 && !addr) {
        if (nodes)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: MASTER_ADDR is not set and SLURM_JOB_NODELIST='%s' is a compressed host list; "
                              "expected MASTER_ADDR=<first host>, e.g. export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)", nodes);
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: MASTER_ADDR is not set; expected the host name or IP address of rank 0's host "
                          "(world size %d from %s)", e->world_size, e->source);
    }
    if (e->world_size > 1 && !has_port)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: MASTER_PORT is not set; expected a free TCP port in [1, 65535] on rank 0's host, "
                          "the same on every rank (world size %d from %s%s)", e->world_size, e->source,
                          strcmp(e->source, "openmpi") == 0 ? "; e.g. MASTER_PORT=29500 mpirun ..., or mpirun -x MASTER_PORT=29500 ..." : "");
    snprintf(e->master_addr, sizeof e->master_addr, "%s", addr ? addr : "127.0.0.1");
    e->master_port = has_port ? port : 0;
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_dist_env_read(mgpu_dist_env *out) {
    static const mgpu__env_names torchrun = {"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"};
    static const mgpu__env_names slurm = {"slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"};
    static const mgpu__env_names openmpi = {"openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"};
    const mgpu__env_names *nm = NULL;
    mgpu_dist_env e;
    mgpu_result r;
    if (!out) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: out is NULL");
    memset(&e, 0, sizeof e);
    if (getenv("RANK") || getenv("WORLD_SIZE")) nm = &torchrun;
    else if (getenv("SLURM_PROCID")) nm = &slurm;
    else if (getenv("OMPI_COMM_WORLD_RANK") || getenv("OMPI_COMM_WORLD_SIZE")) nm = &openmpi;
    if (!nm) {
        e.world_size = 1; e.local_world_size = 1; e.source = "single";
        snprintf(e.master_addr, sizeof e.master_addr, "127.0.0.1");
        *out = e;
        return MGPU_OK;
    }
    if ((r = mgpu__env_read_ranks(nm, &e)) != MGPU_OK) return r;
    if ((r = mgpu__env_read_master(&e, nm == &slurm)) != MGPU_OK) return r;
    *out = e;
    return MGPU_OK;
}

/* $name as a positive number of seconds; *out untouched when the variable is unset. */
static mgpu_result mgpu__env_seconds(const char *name, const char *fn, double *out, int *found) {
    const char *v = getenv(name);
    char *end = NULL;
    double t;
    *found = v != NULL;
    if (!v) return MGPU_OK;
    t = strtod(v, &end);
    if (end == v || *end || !(t > 0) || t > 1e9)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: %s='%s' is not a positive number of seconds", fn, name, v);
    *out = t;
    return MGPU_OK;
}

/* desc timeout, else $MGPU_TIMEOUT_S, else $NCCL_TIMEOUT (seconds; the name scripts written for
   PyTorch set), else 600 s. announce (rank 0 only, so a job says it once): when NCCL_TIMEOUT is
   set, one line saying which of the two variables the timeout came from. */
static mgpu_result mgpu__comm_timeout(double requested, const char *fn, int announce, double *out) {
    int have_mgpu = 0, have_nccl = 0;
    mgpu_result r;
    if (requested < 0 || requested != requested)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: timeout %g s is negative; expected > 0 (0: $MGPU_TIMEOUT_S, else $NCCL_TIMEOUT, else 600)", fn, requested);
    if (requested > 0) { *out = requested; return MGPU_OK; }
    *out = MGPU__COMM_DEFAULT_TIMEOUT_S;
    if ((r = mgpu__env_seconds("MGPU_TIMEOUT_S", fn, out, &have_mgpu)) != MGPU_OK) return r;
    if (have_mgpu) {
        if (announce && getenv("NCCL_TIMEOUT"))
            mgpu_log(MGPU_LOG_INFO, "timeout %g s from MGPU_TIMEOUT_S; NCCL_TIMEOUT='%s' is ignored while MGPU_TIMEOUT_S is set", *out, getenv("NCCL_TIMEOUT"));
        return MGPU_OK;
    }
    if ((r = mgpu__env_seconds("NCCL_TIMEOUT", fn, out, &have_nccl)) != MGPU_OK) return r;
    if (have_nccl && announce)
        mgpu_log(MGPU_LOG_INFO, "timeout %g s from NCCL_TIMEOUT (MGPU_TIMEOUT_S is unset; it would take precedence)", *out);
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   TCP rendezvous store: rank 0 hosts a key/value server; every rank (rank 0 included) is a
   client. Requests are (op, key, value) frames; GET waits on the server until the key exists,
   the client bounding the wait with poll() and the deadline.
   -------------------------------------------------------------------------------------- */

enum { MGPU__STORE_SET = 1, MGPU__STORE_GET = 2, MGPU__STORE_TRY = 3, MGPU__STORE_ADD = 4 };
#define MGPU__STORE_MAX_KEY 256
#define MGPU__STORE_MAX_VALUE 4096
#define MGPU__STORE_FRAME 12   /* three big-endian u32: op, key length, value length */

static void mgpu__store_put_u32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16); p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
}
static uint32_t mgpu__store_get_u32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static void mgpu__fd_nonblocking(int fd) {
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL, 0) | O_NONBLOCK);
    fcntl(fd, F_SETFD, FD_CLOEXEC);
}

/* Milliseconds left until deadline (mgpu_time_s clock), capped for poll(). */
static int mgpu__comm_ms_left(double deadline) {
    double left = deadline - mgpu_time_s();
    if (left <= 0) return 0;
    return left > 1000.0 ? 1000000 : (int)(left * 1000.0) + 1;
}

/* Sends all n bytes before the deadline: 0 on success, else an errno-like code (ETIMEDOUT). */
static int mgpu__comm_send_all(int fd, const void *buf, size_t n, double deadline) {
    const char *p = (const char *)buf;
    while (n > 0) {
        struct pollfd pfd;
        ssize_t k;
        int flags = 0;
#ifdef MSG_NOSIGNAL
        flags = MSG_NOSIGNAL;   /* a closed peer is an error, not SIGPIPE */
#endif
        k = send(fd, p, n, flags);
        if (k > 0) { p += k; n -= (size_t)k; continue; }
        if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return errno;
        pfd.fd = fd; pfd.events = POLLOUT; pfd.revents = 0;
        if (mgpu__comm_ms_left(deadline) == 0) return ETIMEDOUT;
        poll(&pfd, 1, mgpu__comm_ms_left(deadline));
    }
    return 0;
}

/* Receives exactly n bytes before the deadline: 0, ETIMEDOUT, EPIPE for a closed peer, or errno. */
static int mgpu__comm_recv_all(int fd, void *buf, size_t n, double deadline) {
    char *p = (char *)buf;
    while (n > 0) {
        struct pollfd pfd;
        ssize_t k = recv(fd, p, n, 0);
        if (k > 0) { p += k; n -= (size_t)k; continue; }
        if (k == 0) return EPIPE;
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return errno;
        pfd.fd = fd; pfd.events = POLLIN; pfd.revents = 0;
        if (mgpu__comm_ms_left(deadline) == 0) return ETIMEDOUT;
        poll(&pfd, 1, mgpu__comm_ms_left(deadline));
    }
    return 0;
}

/* ---- server ---- */

typedef struct mgpu__store_kv { char *key; char *value; uint32_t len; } mgpu__store_kv;
typedef struct mgpu__store_conn {
    int fd;
    unsigned char *buf; size_t len, cap;   /* bytes received, not yet handled */
    char *waiting;                         /* key of a GET waiting for its SET, or NULL */
} mgpu__store_conn;
typedef struct mgpu__store_server {
    int listen_fd, wake[2];
    pthread_t thread; int started;
    mgpu__store_kv *kv; int n_kv, cap_kv;
    mgpu__store_conn *conns; int n_conns, cap_conns;
    struct pollfd *pfds; int cap_pfds;
    int stop;              /* 1: stop when every client disconnected or at stop_deadline; 2: now */
    double stop_deadline;
} mgpu__store_server;

/* Grows *arr (elements of elem bytes) to hold at least need; 0 on allocation failure. */
static int mgpu__comm_grow(void **arr, int *cap, int need, size_t elem) {
    void *n;
    int c = *cap ? *cap : 8;
    if (need <= *cap) return 1;
    while (c < need) c *= 2;
    n = mgpu__alloc(elem * (size_t)c, "the rendezvous store");
    if (!n) return 0;
    if (*arr) memcpy(n, *arr, elem * (size_t)*cap);
    mgpu_free(*arr);
    *arr = n; *cap = c;
    return 1;
}

static mgpu__store_kv *mgpu__store_find(mgpu__store_server *s, const char *key) {
    int i;
    for (i = 0; i < s->n_kv; i++) if (strcmp(s->kv[i].key, key) == 0) return &s->kv[i];
    return NULL;
}

/* Reply: u32 status (0 found/ok, 1 missing), u32 length, value. 0 when sent. */
static int mgpu__store_reply(int fd, uint32_t status, const char *value, uint32_t len) {
    unsigned char head[8];
    mgpu__store_put_u32(head, status);
    mgpu__store_put_u32(head + 4, len);
    if (mgpu__comm_send_all(fd, head, 8, mgpu_time_s() + 2.0)) return -1;
    return len ? mgpu__comm_send_all(fd, value, len, mgpu_time_s() + 2.0) : 0;
}

static int mgpu__store_set_kv(mgpu__store_server *s, char *key, const unsigned char *value, uint32_t len) {
    mgpu__store_kv *kv = mgpu__store_find(s, key);
    char *v = (char *)mgpu__alloc(len + 1, "a rendezvous store value");
    int i;
    if (!v) { mgpu_free(key); return 0; }
    memcpy(v, value, len); v[len] = 0;
    if (kv) { mgpu_free(kv->value); mgpu_free(key); }
    else {
        if (!mgpu__comm_grow((void **)&s->kv, &s->cap_kv, s->n_kv + 1, sizeof *s->kv)) { mgpu_free(v); mgpu_free(key); return 0; }
        kv = &s->kv[s->n_kv++];
        kv->key = key;
    }
    kv->value = v; kv->len = len;
    for (i = 0; i < s->n_conns; i++) {   /* answer the GETs that waited for this key */
        mgpu__store_conn *cn = &s->conns[i];
        if (cn->waiting && strcmp(cn->waiting, kv->key) == 0) {
            mgpu_free(cn->waiting); cn->waiting = NULL;
            if (mgpu__store_reply(cn->fd, 0, kv->value, kv->len)) { close(cn->fd); cn->fd = -1; }
        }
    }
    return 1;
}

/* Handles the complete requests in cn's buffer; 0 means drop the connection. */
static int mgpu__store_handle(mgpu__store_server *s, mgpu__store_conn *cn) {
    while (cn->fd >= 0 && !cn->waiting && cn->len >= MGPU__STORE_FRAME) {
        uint32_t op = mgpu__store_get_u32(cn->buf), klen = mgpu__store_get_u32(cn->buf + 4), vlen = mgpu__store_get_u32(cn->buf + 8);
        size_t frame = MGPU__STORE_FRAME + (size_t)klen + vlen;
        char *key;
        mgpu__store_kv *kv;
        int ok = 1;
        if (klen == 0 || klen > MGPU__STORE_MAX_KEY || vlen > MGPU__STORE_MAX_VALUE) return 0;
        if (cn->len < frame) break;
        key = (char *)mgpu__alloc(klen + 1, "a rendezvous store key");
        if (!key) return 0;
        memcpy(key, cn->buf + MGPU__STORE_FRAME, klen); key[klen] = 0;
        if (op == MGPU__STORE_SET) {
            ok = mgpu__store_set_kv(s, key, cn->buf + MGPU__STORE_FRAME + klen, vlen) && cn->fd >= 0 && mgpu__store_reply(cn->fd, 0, NULL, 0) == 0;
        } else if (op == MGPU__STORE_GET || op == MGPU__STORE_TRY) {
            kv = mgpu__store_find(s, key);
            if (kv) ok = mgpu__store_reply(cn->fd, 0, kv->value, kv->len) == 0;
            else if (op == MGPU__STORE_TRY) ok = mgpu__store_reply(cn->fd, 1, NULL, 0) == 0;
            else { cn->waiting = key; key = NULL; }
            mgpu_free(key);
        } else if (op == MGPU__STORE_ADD) {   /* counter: value += decimal increment, reply the sum */
            char num[32];
            long long inc = 0;
            memcpy(num, cn->buf + MGPU__STORE_FRAME + klen, MGPU__MIN(vlen, 31u)); num[MGPU__MIN(vlen, 31u)] = 0;
            inc = strtoll(num, NULL, 10);
            kv = mgpu__store_find(s, key);
            snprintf(num, sizeof num, "%lld", (kv ? strtoll(kv->value, NULL, 10) : 0) + inc);
            ok = mgpu__store_set_kv(s, key, (const unsigned char *)num, (uint32_t)strlen(num)) && cn->fd >= 0 &&
                 mgpu__store_reply(cn->fd, 0, num, (uint32_t)strlen(num)) == 0;
        } else {
            mgpu_free(key);
            return 0;
        }
        if (!ok) return 0;
        memmove(cn->buf, cn->buf + frame, cn->len - frame);
        cn->len -= frame;
    }
    return cn->fd >= 0;
}

static void mgpu__store_drop(mgpu__store_conn *cn) {
    if (cn->fd >= 0) close(cn->fd);
    cn->fd = -1;
    mgpu_free(cn->buf); cn->buf = NULL;
    mgpu_free(cn->waiting); cn->waiting = NULL;
}

static void mgpu__store_accept(mgpu__store_server *s) {
    for (;;) {
        int fd = accept(s->listen_fd, NULL, NULL), one = 1;
        mgpu__store_conn *cn;
        if (fd < 0) return;
        mgpu__fd_nonblocking(fd);
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (!mgpu__comm_grow((void **)&s->conns, &s->cap_conns, s->n_conns + 1, sizeof *s->conns)) { close(fd); return; }
        cn = &s->conns[s->n_conns++];
        memset(cn, 0, sizeof *cn);
        cn->fd = fd;
    }
}

/* Reads what cn has sent and handles it; 0 when the connection is gone. */
static int mgpu__store_read(mgpu__store_server *s, mgpu__store_conn *cn) {
    for (;;) {
        ssize_t k;
        if (cn->cap - cn->len < 1024) {
            size_t cap = cn->cap ? 2 * cn->cap : 4096;
            unsigned char *b;
            if (cap > 4 * (MGPU__STORE_FRAME + MGPU__STORE_MAX_KEY + MGPU__STORE_MAX_VALUE)) return 0;   /* a client that floods us */
            b = (unsigned char *)mgpu__alloc(cap, "a rendezvous store connection");
            if (!b) return 0;
            if (cn->len) memcpy(b, cn->buf, cn->len);
            mgpu_free(cn->buf);
            cn->buf = b; cn->cap = cap;
        }
        k = recv(cn->fd, cn->buf + cn->len, cn->cap - cn->len, 0);
        if (k > 0) { cn->len += (size_t)k; continue; }
        if (k == 0) return 0;
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) return 0;
        break;
    }
    return mgpu__store_handle(s, cn);
}

static void *mgpu__store_serve(void *arg) {
    mgpu__store_server *s = (mgpu__store_server *)arg;
    int i, n;
    for (;;) {
        int stop = __atomic_load_n(&s->stop, __ATOMIC_ACQUIRE);
        double stop_deadline = 0;
        __atomic_load(&s->stop_deadline, &stop_deadline, __ATOMIC_ACQUIRE);
        if (stop == 2 || (stop == 1 && (s->n_conns == 0 || mgpu_time_s() > stop_deadline))) break;
        if (!mgpu__comm_grow((void **)&s->pfds, &s->cap_pfds, s->n_conns + 2, sizeof *s->pfds)) { mgpu__comm_sleep_s(0.01); continue; }
        s->pfds[0].fd = s->listen_fd; s->pfds[1].fd = s->wake[0];
        for (i = 0; i < s->n_conns; i++) s->pfds[i + 2].fd = s->conns[i].fd;
        for (i = 0; i < s->n_conns + 2; i++) { s->pfds[i].events = POLLIN; s->pfds[i].revents = 0; }
        n = s->n_conns;
        if (poll(s->pfds, (nfds_t)(n + 2), 100) <= 0) continue;
        if (s->pfds[1].revents) { char b[64]; while (read(s->wake[0], b, sizeof b) > 0) {} }
        for (i = 0; i < n; i++)
            if (s->pfds[i + 2].revents && s->conns[i].fd >= 0 && !mgpu__store_read(s, &s->conns[i])) mgpu__store_drop(&s->conns[i]);
        for (i = 0; i < s->n_conns;) {   /* compact away closed connections */
            if (s->conns[i].fd < 0) { mgpu__store_drop(&s->conns[i]); s->conns[i] = s->conns[--s->n_conns]; }
            else i++;
        }
        if (s->pfds[0].revents) mgpu__store_accept(s);
    }
    return NULL;
}

static void mgpu__store_server_free(mgpu__store_server *s) {
    int i;
    if (!s) return;
    for (i = 0; i < s->n_conns; i++) mgpu__store_drop(&s->conns[i]);
    for (i = 0; i < s->n_kv; i++) { mgpu_free(s->kv[i].key); mgpu_free(s->kv[i].value); }
    if (s->listen_fd >= 0) close(s->listen_fd);
    if (s->wake[0] >= 0) close(s->wake[0]);
    if (s->wake[1] >= 0) close(s->wake[1]);
    mgpu_free(s->kv); mgpu_free(s->conns); mgpu_free(s->pfds);
    mgpu_free(s);
}

/* Asks the server to stop now (force) or once every client has gone, at the latest after grace_s. */
static void mgpu__store_server_request_stop(mgpu__store_server *s, int force, double grace_s) {
    double deadline = mgpu_time_s() + grace_s;
    char b = 1;
    __atomic_store(&s->stop_deadline, &deadline, __ATOMIC_RELEASE);
    __atomic_store_n(&s->stop, force ? 2 : 1, __ATOMIC_RELEASE);
    if (write(s->wake[1], &b, 1) < 0) { /* the poll timeout notices the flag anyway */ }
}

/* Stops the server as above, waits for its thread and frees it. */
static void mgpu__store_server_stop(mgpu__store_server *s, int force, double grace_s) {
    if (!s) return;
    if (s->started) {
        mgpu__store_server_request_stop(s, force, grace_s);
        pthread_join(s->thread, NULL);
    }
    mgpu__store_server_free(s);
}

/* The wildcard address of MASTER_ADDR's family (IPv4 unless it resolves to IPv6) on port. */
static socklen_t mgpu__store_listen_addr(const char *addr, int port, struct sockaddr_storage *sa) {
    struct addrinfo hints, *res = NULL;
    int family = AF_INET;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(addr, NULL, &hints, &res) == 0 && res && res->ai_family == AF_INET6) family = AF_INET6;
    if (res) freeaddrinfo(res);
    memset(sa, 0, sizeof *sa);
    if (family == AF_INET6) {
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)sa;
        a6->sin6_family = AF_INET6; a6->sin6_addr = in6addr_any; a6->sin6_port = htons((uint16_t)port);
        return (socklen_t)sizeof *a6;
    } else {
        struct sockaddr_in *a4 = (struct sockaddr_in *)sa;
        a4->sin_family = AF_INET; a4->sin_addr.s_addr = htonl(INADDR_ANY); a4->sin_port = htons((uint16_t)port);
        return (socklen_t)sizeof *a4;
    }
}

/* Binds the store's port on every interface and starts serving. */
static mgpu__store_server *mgpu__store_server_start(const char *addr, int port) {
    struct sockaddr_storage sa;
    socklen_t sa_len = mgpu__store_listen_addr(addr, port, &sa);
    int one = 1;
    mgpu__store_server *s = (mgpu__store_server *)mgpu__calloc(sizeof *s, "the rendezvous store");
    if (!s) return NULL;
    s->listen_fd = s->wake[0] = s->wake[1] = -1;
    s->listen_fd = socket(sa.ss_family, SOCK_STREAM, 0);
    if (s->listen_fd < 0) {
        mgpu__fail(MGPU_ERR_IO, "mgpu_comm_create: rank 0 cannot create the rendezvous store's socket: %s", strerror(errno));
        mgpu__store_server_free(s); return NULL;
    }
    setsockopt(s->listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s->listen_fd, (struct sockaddr *)&sa, sa_len) != 0 || listen(s->listen_fd, 1024) != 0) {
        int err = errno;
        if (err == EADDRINUSE)
            mgpu__fail(MGPU_ERR_IO, "mgpu_comm_create: rank 0 cannot host the rendezvous store on port %d: the port is already in use "
                       "(another job or program holds it); set MASTER_PORT to a free port", port);
        else
            mgpu__fail(MGPU_ERR_IO, "mgpu_comm_create: rank 0 cannot host the rendezvous store on port %d: %s", port, strerror(err));
        mgpu__store_server_free(s); return NULL;
    }
    mgpu__fd_nonblocking(s->listen_fd);
    if (pipe(s->wake) != 0) {
        s->wake[0] = s->wake[1] = -1;
        mgpu__fail(MGPU_ERR_IO, "mgpu_comm_create: cannot create a pipe for the rendezvous store: %s", strerror(errno));
        mgpu__store_server_free(s); return NULL;
    }
    mgpu__fd_nonblocking(s->wake[0]);
    mgpu__fd_nonblocking(s->wake[1]);
    if (pthread_create(&s->thread, NULL, mgpu__store_serve, s) != 0) {
        mgpu__fail(MGPU_ERR_STATE, "mgpu_comm_create: cannot start the rendezvous store's thread");
        mgpu__store_server_free(s); return NULL;
    }
    s->started = 1;
    return s;
}

/* ---- client ---- */

typedef struct mgpu__store_client { int fd; const char *addr; int port; } mgpu__store_client;

/* One connection attempt to addr:port (every resolved address, up to 1 s each); fd or -1 with why. */
static int mgpu__tcp_connect_once(const char *addr, int port, double deadline, char *why, size_t why_size) {
    struct addrinfo hints, *res = NULL, *ai;
    char service[16];
    int fd = -1, rc;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    snprintf(service, sizeof service, "%d", port);
    rc = getaddrinfo(addr, service, &hints, &res);
    if (rc != 0) { snprintf(why, why_size, "cannot resolve '%s': %s", addr, gai_strerror(rc)); return -1; }
    for (ai = res; ai && fd < 0; ai = ai->ai_next) {
        int err = 0, one = 1;
        socklen_t len = sizeof err;
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) { snprintf(why, why_size, "%s", strerror(errno)); continue; }
        mgpu__fd_nonblocking(fd);
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
            if (errno == EINPROGRESS) {
                struct pollfd pfd;
                double d = MGPU__MIN(deadline, mgpu_time_s() + 1.0);
                pfd.fd = fd; pfd.events = POLLOUT; pfd.revents = 0;
                if (poll(&pfd, 1, mgpu__comm_ms_left(d)) <= 0) err = ETIMEDOUT;
                else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
            } else {
                err = errno;
            }
        }
        if (err) { snprintf(why, why_size, "%s", strerror(err)); close(fd); fd = -1; continue; }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    freeaddrinfo(res);
    return fd;
}

/* Connects to the store, retrying until the deadline (rank 0 may not be listening yet). */
static mgpu_result mgpu__store_connect(mgpu__store_client *st, const char *addr, int port, int rank, double deadline, double timeout_s) {
    char why[256];
    double backoff = 0.02;
    st->fd = -1; st->addr = addr; st->port = port;
    snprintf(why, sizeof why, "no attempt finished");
    for (;;) {
        st->fd = mgpu__tcp_connect_once(addr, port, deadline, why, sizeof why);
        if (st->fd >= 0) return MGPU_OK;
        if (mgpu_time_s() + backoff > deadline) break;
        mgpu__comm_sleep_s(backoff);
        backoff = MGPU__MIN(backoff * 2, 0.5);
    }
    return mgpu__fail(MGPU_ERR_TIMEOUT, "mgpu_comm_create: rank %d cannot reach the master at %s:%d after %.0f s (last error: %s); "
                      "is rank 0 running, and are MASTER_ADDR and MASTER_PORT the same on every rank?", rank, addr, port, timeout_s, why);
}

static void mgpu__store_close(mgpu__store_client *st) {
    if (st->fd >= 0) close(st->fd);
    st->fd = -1;
}

static mgpu_result mgpu__store_io_error(const mgpu__store_client *st, int err, const char *key) {
    if (err == EPIPE || err == ECONNRESET)
        return mgpu__fail(MGPU_ERR_STATE, "mgpu_comm_create: lost the connection to the rendezvous store at %s:%d while asking for '%s' "
                          "(rank 0 closed it: did rank 0 fail?)", st->addr, st->port, key);
    if (err == ETIMEDOUT) return mgpu__fail(MGPU_ERR_TIMEOUT, "mgpu_comm_create: timed out waiting for '%s' from the rendezvous store at %s:%d", key, st->addr, st->port);
    return mgpu__fail(MGPU_ERR_IO, "mgpu_comm_create: rendezvous store at %s:%d: %s (key '%s')", st->addr, st->port, strerror(err), key);
}

/* Sends one request; for GET/TRY reads the value into val (NUL-terminated). *found is 0 when TRY
   finds nothing. A GET that reaches the deadline is MGPU_ERR_TIMEOUT. */
static mgpu_result mgpu__store_request(mgpu__store_client *st, int op, const char *key, const char *value, char *val, size_t cap, int *found, double deadline) {
    unsigned char head[MGPU__STORE_FRAME], reply[8];
    uint32_t klen = (uint32_t)strlen(key), vlen = value ? (uint32_t)strlen(value) : 0, status, len;
    int err;
    if (vlen > MGPU__STORE_MAX_VALUE) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_create: store value for '%s' too long (%u bytes)", key, vlen);
    mgpu__store_put_u32(head, (uint32_t)op); mgpu__store_put_u32(head + 4, klen); mgpu__store_put_u32(head + 8, vlen);
    if ((err = mgpu__comm_send_all(st->fd, head, sizeof head, deadline)) != 0 || (err = mgpu__comm_send_all(st->fd, key, klen, deadline)) != 0 ||
        (vlen && (err = mgpu__comm_send_all(st->fd, value, vlen, deadline)) != 0) || (err = mgpu__comm_recv_all(st->fd, reply, 8, deadline)) != 0)
        return mgpu__store_io_error(st, err, key);
    status = mgpu__store_get_u32(reply); len = mgpu__store_get_u32(reply + 4);
    if (len > MGPU__STORE_MAX_VALUE || (val && len >= cap) || (!val && len)) return mgpu__fail(MGPU_ERR_FORMAT, "mgpu_comm_create: the rendezvous store at %s:%d sent a malformed reply for '%s' (is MASTER_PORT another program's port?)", st->addr, st->port, key);
    if (len && (err = mgpu__comm_recv_all(st->fd, val, len, deadline)) != 0) return mgpu__store_io_error(st, err, key);
    if (val) val[len] = 0;
    if (found) *found = status == 0;
    return MGPU_OK;
}
static mgpu_result mgpu__store_set(mgpu__store_client *st, const char *key, const char *value, double deadline) {
    return mgpu__store_request(st, MGPU__STORE_SET, key, value, NULL, 0, NULL, deadline);
}
static mgpu_result mgpu__store_get(mgpu__store_client *st, const char *key, char *val, size_t cap, double deadline) {
    return mgpu__store_request(st, MGPU__STORE_GET, key, NULL, val, cap, NULL, deadline);
}
static mgpu_result mgpu__store_try(mgpu__store_client *st, const char *key, char *val, size_t cap, int *found, double deadline) {
    return mgpu__store_request(st, MGPU__STORE_TRY, key, NULL, val, cap, found, deadline);
}
/* Adds inc to the counter at key; *value gets the new count. */
static mgpu_result mgpu__store_add(mgpu__store_client *st, const char *key, int inc, long long *value, double deadline) {
    char num[32], reply[32];
    mgpu_result r;
    snprintf(num, sizeof num, "%d", inc);
    r = mgpu__store_request(st, MGPU__STORE_ADD, key, num, reply, sizeof reply, NULL, deadline);
    if (r == MGPU_OK) *value = strtoll(reply, NULL, 10);
    return r;
}

/* --------------------------------------------------------------------------------------
   The shared region of the shm and threads backends
   -------------------------------------------------------------------------------------- */

#define MGPU__REGION_MAGIC 0x6d6770752d636f6dULL   /* "mgpu-com" */
enum { MGPU__RANK_ACTIVE = 0, MGPU__RANK_DEPARTED = 1 };
enum { MGPU__COLL_BARRIER = 1, MGPU__COLL_ALLREDUCE, MGPU__COLL_BROADCAST, MGPU__COLL_ALLGATHER, MGPU__COLL_REDUCE_SCATTER };

/* What a rank is calling; every rank must call the same thing (checked at its first barrier). */
typedef struct mgpu__coll_sig { int32_t kind, root, dtype, op; int64_t count; } mgpu__coll_sig;

/* One rank's control line (128 bytes, so ranks do not share cache lines). */
typedef struct mgpu__rank_ctl {
    uint64_t epoch;            /* barriers this rank has entered */
    int32_t pid;
    int32_t state;             /* MGPU__RANK_ACTIVE or MGPU__RANK_DEPARTED */
    mgpu__coll_sig sig[2];     /* signature of its current collective, by barrier parity */
    unsigned char pad[128 - 16 - 2 * sizeof(mgpu__coll_sig)];
} mgpu__rank_ctl;

typedef struct mgpu__region_hdr {
    uint64_t magic, nonce;
    int32_t world, pad0;
    uint64_t slot_bytes;
    uint32_t wake_seq;         /* bumped when a barrier completes; sleepers futex-wait on it */
    uint32_t sleepers;         /* ranks inside that futex wait (the waker skips the syscall at 0) */
    int32_t abort_rank;        /* -1; the rank that aborted the group (-2 while it writes abort_msg) */
    int32_t abort_code;        /* its mgpu_result, which the other ranks report too */
    char abort_msg[MGPU__COMM_MSG];
} mgpu__region_hdr;

static size_t mgpu__region_ctl_offset(void) { return (sizeof(mgpu__region_hdr) + 127) & ~(size_t)127; }
static size_t mgpu__region_slots_offset(int world) { return (mgpu__region_ctl_offset() + sizeof(mgpu__rank_ctl) * (size_t)world + 4095) & ~(size_t)4095; }
static size_t mgpu__region_bytes(int world, size_t slot) { return mgpu__region_slots_offset(world) + slot * (size_t)world; }
/* Staging slot per rank: 2 MiB (two 1 MiB halves) for small groups, less for large ones so the
   region stays about 64 MiB at most. */
static size_t mgpu__region_slot_bytes(int world) {
    size_t slot = ((size_t)64 << 20) / (size_t)world;
    slot = MGPU__MIN(slot, (size_t)2 << 20);
    slot = MGPU__MAX(slot, (size_t)256 << 10);
    return slot & ~(size_t)8191;
}
static void mgpu__region_init(unsigned char *base, int world, uint64_t nonce) {
    mgpu__region_hdr *h = (mgpu__region_hdr *)base;
    memset(base, 0, mgpu__region_slots_offset(world));
    h->magic = MGPU__REGION_MAGIC; h->nonce = nonce; h->world = world;
    h->slot_bytes = mgpu__region_slot_bytes(world);
    h->abort_rank = -1;
}

/* --------------------------------------------------------------------------------------
   Communicator
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__heap_group { int refs; unsigned char *region; } mgpu__heap_group;

struct mgpu_comm_work {
    mgpu_comm *comm;
    float *data; int64_t n; mgpu_reduce_op op;
    int done;                                   /* set by the progress thread (atomic) */
    int abandoned;                              /* its wait gave up: the progress thread frees it */
    mgpu_result result; char msg[MGPU__COMM_MSG];
    struct mgpu_comm_work *next;                /* queue order */
    struct mgpu_comm_work *live_prev, *live_next; /* issued, not yet waited (destroy frees these) */
    int device;                                 /* data is device memory of this CUDA device; -1: host */
    void *stream;                               /* the stream that produced the data (NULL: unknown) */
    void *ready_ev, *done_ev;                   /* CUDA events: the producer's work issued before it (recorded
                                                   on `stream` when issued), the collective's (on the
                                                   communicator's stream); NULL without device data */
};

struct mgpu_comm {
    mgpu_comm_backend backend;
    int rank, world, local_rank, local_world;
    int gpu_id;                                 /* nccl: the device asked for (--gpu-ids); -1: local_rank */
    double timeout_s;
    /* shared region (shm, threads) */
    unsigned char *region; size_t region_bytes;
    int region_mapped;                          /* shm: munmap on destroy */
    mgpu__heap_group *group;                    /* threads (and world 1): shared heap region */
    mgpu__region_hdr *hdr; mgpu__rank_ctl *ctl; unsigned char *slots;
    size_t slot_bytes, half_bytes;
    const unsigned char **srcs;                 /* per-rank pointers for one reduction */
    unsigned char *watch;                       /* per rank: its pid can be checked for liveness */
    uint64_t epoch;                             /* barriers entered */
    int half;                                   /* staging half of the next round */
    /* rank 0's rendezvous store, kept until every rank has disconnected */
    mgpu__store_server *server;
    /* failure: the first error that broke the communicator */
    int broken;                                 /* 0; 1 while writing broken_msg; 2 */
    char broken_msg[MGPU__COMM_MSG];
    /* asynchronous all-reduces */
    pthread_mutex_t mu, exec_mu;
    pthread_cond_t cv;
    pthread_t progress; int progress_started, progress_stop;
    mgpu_comm_work *queue_head, *queue_tail, *live;
    int64_t pending;                            /* queued or running */
#ifdef MGPU_CUDA
    int cuda_device;
    ncclComm_t nccl;
    cudaStream_t stream;
    cudaEvent_t ev_ready, ev_done;
    void *dev_scratch; size_t dev_scratch_bytes;
    void *pinned[3]; size_t pinned_bytes[3];    /* shm/threads with CUDA data: host staging (0, 1: blocking
                                                   tensor collectives; 2: the executing thread's raw buffers) */
#endif
};

static const char *mgpu__comm_backend_name(int b) {
    return b == MGPU_COMM_SHM ? "shm" : b == MGPU_COMM_NCCL ? "nccl" : b == MGPU_COMM_THREADS ? "threads" : "unknown";
}

/* Records the error that breaks c (the first one is kept), tells the other ranks of a shared
   region so they fail at once instead of at their timeout, and returns code. */
static mgpu_result mgpu__comm_break(mgpu_comm *c, mgpu_result code, const char *fmt, ...) MGPU__PRINTF(3, 4);
static mgpu_result mgpu__comm_break(mgpu_comm *c, mgpu_result code, const char *fmt, ...) {
    char msg[MGPU__COMM_MSG];
    int expect = 0, none = -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (__atomic_compare_exchange_n(&c->broken, &expect, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        memcpy(c->broken_msg, msg, sizeof msg);
        __atomic_store_n(&c->broken, 2, __ATOMIC_RELEASE);
    }
    if (c->hdr && __atomic_compare_exchange_n(&c->hdr->abort_rank, &none, -2, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        memcpy(c->hdr->abort_msg, msg, sizeof msg);
        c->hdr->abort_code = (int32_t)code;
        __atomic_store_n(&c->hdr->abort_rank, c->rank, __ATOMIC_RELEASE);
    }
    return mgpu__fail(code, "%s", msg);
}

/* Another rank of the shared region aborted the group: this rank fails with its code and reason. */
static mgpu_result mgpu__comm_check_abort(mgpu_comm *c, const char *fn) {
    int ab = c->hdr ? __atomic_load_n(&c->hdr->abort_rank, __ATOMIC_ACQUIRE) : -1;
    if (ab < 0 || ab == c->rank) return MGPU_OK;
    return mgpu__comm_break(c, (mgpu_result)c->hdr->abort_code, "%s: rank %d aborted the group: %s", fn, ab, c->hdr->abort_msg);
}

/* Entry check of every collective: a usable communicator in a group nobody aborted. */
static mgpu_result mgpu__comm_usable(mgpu_comm *c, const char *fn) {
    if (!c) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: communicator is NULL", fn);
    while (__atomic_load_n(&c->broken, __ATOMIC_ACQUIRE) == 1) sched_yield();
    if (__atomic_load_n(&c->broken, __ATOMIC_ACQUIRE))
        return mgpu__fail(MGPU_ERR_STATE, "%s: rank %d's communicator failed earlier (%s); destroy it and create a new one", fn, c->rank, c->broken_msg);
    return mgpu__comm_check_abort(c, fn);
}

/* --------------------------------------------------------------------------------------
   Barrier: every rank publishes its epoch; the ranks that see everyone arrived bump wake_seq and
   wake the sleepers (sequentially consistent atomics make at least one of the last arrivers see
   the others). Waiting spins briefly, then sleeps on a futex in short slices so it can notice
   dead or departed peers, an abort by another rank, and the timeout.
   -------------------------------------------------------------------------------------- */

static int mgpu__comm_all_arrived(const mgpu_comm *c, uint64_t e) {
    int r;
    for (r = 0; r < c->world; r++)
        if (__atomic_load_n(&c->ctl[r].epoch, __ATOMIC_SEQ_CST) < e) return 0;
    return 1;
}

static void mgpu__comm_wake_sleepers(mgpu_comm *c) {
    __atomic_add_fetch(&c->hdr->wake_seq, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&c->hdr->sleepers, __ATOMIC_SEQ_CST) == 0) return;
#if defined(__linux__)
    syscall(SYS_futex, &c->hdr->wake_seq, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
#endif
}

/* Sleeps while *word == seen, at most usec (a process-shared futex on Linux). */
static void mgpu__comm_sleep_on(uint32_t *word, uint32_t seen, long usec) {
#if defined(__linux__)
    struct timespec ts;
    ts.tv_sec = 0; ts.tv_nsec = usec * 1000;
    syscall(SYS_futex, word, FUTEX_WAIT, seen, &ts, NULL, 0);
#else
    (void)word; (void)seen;
    mgpu__comm_sleep_s(1e-6 * (double)MGPU__MIN(usec, 100));
#endif
}

/* Whether process pid still runs: a zombie (exited, not yet reaped by its parent) counts as gone. */
static int mgpu__comm_pid_alive(int pid) {
#if defined(__linux__)
    char path[64], buf[512];
    const char *p;
    ssize_t n;
    int fd;
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    fd = open(path, O_RDONLY);
    if (fd < 0) return 0;
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    p = strrchr(buf, ')');   /* the state follows the command name, which may hold spaces */
    return !(p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X'));
#else
    return kill(pid, 0) == 0 || errno == EPERM;
#endif
}

/* "1, 3" or "1, 3 and 14 more" from the ranks whose epoch is below e. */
static void mgpu__comm_missing_ranks(const mgpu_comm *c, uint64_t e, char *buf, size_t size, int *count) {
    size_t pos = 0;
    int r, n = 0;
    buf[0] = 0;
    for (r = 0; r < c->world; r++) {
        if (__atomic_load_n(&c->ctl[r].epoch, __ATOMIC_ACQUIRE) >= e) continue;
        if (n < 16 && pos < size) pos += (size_t)snprintf(buf + pos, size - pos, n ? ", %d" : "%d", r);
        n++;
    }
    if (n > 16 && pos < size) snprintf(buf + pos, size - pos, " and %d more", n - 16);
    *count = n;
}

/* Another rank aborted, or a missing rank has left the group or died. */
static mgpu_result mgpu__comm_check_peers(mgpu_comm *c, uint64_t e, const char *fn) {
    mgpu_result res = mgpu__comm_check_abort(c, fn);
    int r;
    if (res != MGPU_OK) return res;
    for (r = 0; r < c->world; r++) {
        if (__atomic_load_n(&c->ctl[r].epoch, __ATOMIC_ACQUIRE) >= e) continue;
        if (__atomic_load_n(&c->ctl[r].state, __ATOMIC_ACQUIRE) == MGPU__RANK_DEPARTED)
            return mgpu__comm_break(c, MGPU_ERR_STATE, "%s: rank %d left the group (destroyed its communicator) while rank %d waits for it; "
                                    "every rank must issue the same collectives", fn, r, c->rank);
        if (c->watch && c->watch[r] && !mgpu__comm_pid_alive(c->ctl[r].pid))
            return mgpu__comm_break(c, MGPU_ERR_STATE, "%s: rank %d (pid %d) exited while rank %d waits for it", fn, r, c->ctl[r].pid, c->rank);
    }
    return MGPU_OK;
}

static void mgpu__comm_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static mgpu_result mgpu__comm_barrier_wait(mgpu_comm *c, const char *fn) {
    uint64_t e = ++c->epoch;
    double start, next_check;
    int spin;
    __atomic_store_n(&c->ctl[c->rank].epoch, e, __ATOMIC_SEQ_CST);
    if (mgpu__comm_all_arrived(c, e)) { mgpu__comm_wake_sleepers(c); return MGPU_OK; }
    for (spin = 0; spin < 200; spin++) {   /* short waits are common: stay on the core for a moment */
        if ((spin & 15) == 15) sched_yield(); else mgpu__comm_cpu_relax();
        if (mgpu__comm_all_arrived(c, e)) return MGPU_OK;
    }
    start = mgpu_time_s();
    next_check = start + 0.005;
    for (;;) {
        uint32_t seq;
        double now;
        int arrived;
        __atomic_add_fetch(&c->hdr->sleepers, 1, __ATOMIC_SEQ_CST);
        seq = __atomic_load_n(&c->hdr->wake_seq, __ATOMIC_SEQ_CST);
        arrived = mgpu__comm_all_arrived(c, e);
        if (!arrived) mgpu__comm_sleep_on(&c->hdr->wake_seq, seq, 2000);
        __atomic_sub_fetch(&c->hdr->sleepers, 1, __ATOMIC_SEQ_CST);
        if (arrived || mgpu__comm_all_arrived(c, e)) return MGPU_OK;
        now = mgpu_time_s();
        if (now >= next_check) {
            mgpu_result r = mgpu__comm_check_peers(c, e, fn);
            if (r != MGPU_OK) return r;
            next_check = now + 0.01;
        }
        if (now - start > c->timeout_s) {
            char missing[160];
            int n = 0;
            mgpu__comm_missing_ranks(c, e, missing, sizeof missing, &n);
            return mgpu__comm_break(c, MGPU_ERR_TIMEOUT, "%s: timed out after %.0f s on rank %d waiting for rank%s %s (barrier #%llu of this communicator); "
                                    "a rank may have crashed, hung, or issued different collectives", fn, c->timeout_s, c->rank,
                                    n == 1 ? "" : "s", missing, (unsigned long long)e);
        }
    }
}

static const char *mgpu__coll_name(int kind) {
    switch (kind) {
    case MGPU__COLL_BARRIER: return "barrier";
    case MGPU__COLL_ALLREDUCE: return "allreduce";
    case MGPU__COLL_BROADCAST: return "broadcast";
    case MGPU__COLL_ALLGATHER: return "allgather";
    case MGPU__COLL_REDUCE_SCATTER: return "reduce_scatter";
    }
    return "an unknown collective";
}

static void mgpu__sig_text(const mgpu__coll_sig *s, char *buf, size_t size) {
    const char *dt = s->dtype >= 0 && s->dtype < MGPU_DTYPE_COUNT ? mgpu_dtype_name((mgpu_dtype)s->dtype) : "F64";
    if (s->kind == MGPU__COLL_BARRIER) snprintf(buf, size, "barrier");
    else if (s->kind == MGPU__COLL_BROADCAST) snprintf(buf, size, "broadcast of %lld bytes from root %d", (long long)s->count, s->root);
    else if (s->kind == MGPU__COLL_ALLGATHER) snprintf(buf, size, "allgather of %lld bytes per rank", (long long)s->count);
    else snprintf(buf, size, "%s (%s) of %lld %s elements", mgpu__coll_name(s->kind), s->op == MGPU_REDUCE_AVG ? "avg" : "sum", (long long)s->count, dt);
}

/* A barrier that also checks every rank called the same collective with the same sizes. */
static mgpu_result mgpu__comm_sync(mgpu_comm *c, const char *fn, const mgpu__coll_sig *sig) {
    int p, r;
    mgpu_result res;
    if (sig) c->ctl[c->rank].sig[(c->epoch + 1) & 1] = *sig;   /* published by the barrier's store */
    res = mgpu__comm_barrier_wait(c, fn);
    if (res != MGPU_OK || !sig) return res;
    p = (int)(c->epoch & 1);
    for (r = 0; r < c->world; r++) {
        if (memcmp(&c->ctl[r].sig[p], &c->ctl[0].sig[p], sizeof *sig) != 0) {
            char a[128], b[128];
            mgpu__sig_text(&c->ctl[0].sig[p], a, sizeof a);
            mgpu__sig_text(&c->ctl[r].sig[p], b, sizeof b);
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: ranks disagree: rank 0 called %s, rank %d called %s; every rank must issue the same "
                              "collectives in the same order with the same sizes", fn, a, r, b);
        }
    }
    return MGPU_OK;
}

static mgpu__coll_sig mgpu__make_sig(int kind, int root, int dtype, int op, int64_t count) {
    mgpu__coll_sig s;
    memset(&s, 0, sizeof s);
    s.kind = kind; s.root = root; s.dtype = dtype; s.op = op; s.count = count;
    return s;
}

/* --------------------------------------------------------------------------------------
   Collectives over the shared region (host memory)
   -------------------------------------------------------------------------------------- */

#define MGPU__DTYPE_F64 100   /* raw double buffers (no mgpu_dtype for them) */

static unsigned char *mgpu__comm_slot(const mgpu_comm *c, int rank, int half) {
    return c->slots + (size_t)rank * c->slot_bytes + (size_t)half * c->half_bytes;
}
static void mgpu__comm_next_half(mgpu_comm *c) { c->half ^= 1; }

/* Rank r's slice [b, e) of m elements: 16-element aligned pieces, the last ones possibly empty. */
static void mgpu__comm_slice(int64_t m, int world, int r, int64_t *b, int64_t *e) {
    int64_t per = ((m + world - 1) / world + 15) & ~(int64_t)15;
    *b = MGPU__MIN(m, per * r);
    *e = MGPU__MIN(m, *b + per);
}

/* dst[i] = src[0][i] + src[1][i] + ... in rank order, divided by world for AVG; i in [b, e). */
#define MGPU__REDUCE_RANGE(T) do { \
        T *d = (T *)dst; int q; int64_t i; \
        for (i = b; i < e; i++) d[i] = ((const T *)src[0])[i]; \
        for (q = 1; q < world; q++) { const T *s = (const T *)src[q]; for (i = b; i < e; i++) d[i] += s[i]; } \
        if (avg) for (i = b; i < e; i++) d[i] /= (T)world; \
    } while (0)
static void mgpu__comm_sum_range(int dtype, void *dst, const unsigned char *const *src, int world, int64_t b, int64_t e, int avg) {
    if (dtype == MGPU__DTYPE_F64) MGPU__REDUCE_RANGE(double);
    else MGPU__REDUCE_RANGE(float);
}
#undef MGPU__REDUCE_RANGE

static size_t mgpu__comm_elem_bytes(int dtype) { return dtype == MGPU__DTYPE_F64 ? sizeof(double) : mgpu_dtype_size((mgpu_dtype)dtype); }

/* In-place all-reduce of n F32 or F64 elements. Per chunk: stage, barrier, reduce own slice into
   data and publish it in the slot, barrier, copy the other slices back. */
static mgpu_result mgpu__shared_allreduce(mgpu_comm *c, const char *fn, void *data, int64_t n, int dtype, int avg) {
    size_t esz = mgpu__comm_elem_bytes(dtype);
    int64_t chunk = (int64_t)(c->half_bytes / esz), off;
    mgpu__coll_sig sig = mgpu__make_sig(MGPU__COLL_ALLREDUCE, -1, dtype, avg, n);
    unsigned char *d = (unsigned char *)data;
    mgpu_result r;
    int q;
    if (n == 0) return mgpu__comm_sync(c, fn, &sig);
    for (off = 0; off < n; off += chunk) {
        int64_t m = MGPU__MIN(chunk, n - off), b, e;
        unsigned char *base = d + (size_t)off * esz;
        int h = c->half;
        memcpy(mgpu__comm_slot(c, c->rank, h), base, (size_t)m * esz);
        if ((r = mgpu__comm_sync(c, fn, off == 0 ? &sig : NULL)) != MGPU_OK) return r;
        for (q = 0; q < c->world; q++) c->srcs[q] = mgpu__comm_slot(c, q, h);
        mgpu__comm_slice(m, c->world, c->rank, &b, &e);
        mgpu__comm_sum_range(dtype, base, c->srcs, c->world, b, e, avg);
        memcpy(mgpu__comm_slot(c, c->rank, h) + (size_t)b * esz, base + (size_t)b * esz, (size_t)(e - b) * esz);
        if ((r = mgpu__comm_barrier_wait(c, fn)) != MGPU_OK) return r;
        for (q = 0; q < c->world; q++) {
            if (q == c->rank) continue;
            mgpu__comm_slice(m, c->world, q, &b, &e);
            memcpy(base + (size_t)b * esz, mgpu__comm_slot(c, q, h) + (size_t)b * esz, (size_t)(e - b) * esz);
        }
        mgpu__comm_next_half(c);
    }
    return MGPU_OK;
}

static mgpu_result mgpu__shared_broadcast(mgpu_comm *c, const char *fn, void *data, int64_t bytes, int root, int dtype) {
    int64_t off;
    mgpu__coll_sig sig = mgpu__make_sig(MGPU__COLL_BROADCAST, root, dtype, 0, bytes);
    mgpu_result r;
    if (bytes == 0) return mgpu__comm_sync(c, fn, &sig);
    for (off = 0; off < bytes; off += (int64_t)c->half_bytes) {
        size_t m = (size_t)MGPU__MIN((int64_t)c->half_bytes, bytes - off);
        unsigned char *p = (unsigned char *)data + off;
        if (c->rank == root) memcpy(mgpu__comm_slot(c, root, c->half), p, m);
        if ((r = mgpu__comm_sync(c, fn, off == 0 ? &sig : NULL)) != MGPU_OK) return r;
        if (c->rank != root) memcpy(p, mgpu__comm_slot(c, root, c->half), m);
        mgpu__comm_next_half(c);
    }
    return MGPU_OK;
}

static mgpu_result mgpu__shared_allgather(mgpu_comm *c, const char *fn, const void *in, int64_t bytes, void *out) {
    int64_t off;
    mgpu__coll_sig sig = mgpu__make_sig(MGPU__COLL_ALLGATHER, -1, MGPU_U8, 0, bytes);
    mgpu_result r;
    int q;
    if (bytes == 0) return mgpu__comm_sync(c, fn, &sig);
    for (off = 0; off < bytes; off += (int64_t)c->half_bytes) {
        size_t m = (size_t)MGPU__MIN((int64_t)c->half_bytes, bytes - off);
        memcpy(mgpu__comm_slot(c, c->rank, c->half), (const unsigned char *)in + off, m);
        if ((r = mgpu__comm_sync(c, fn, off == 0 ? &sig : NULL)) != MGPU_OK) return r;
        for (q = 0; q < c->world; q++) memcpy((unsigned char *)out + (size_t)q * (size_t)bytes + off, mgpu__comm_slot(c, q, c->half), m);
        mgpu__comm_next_half(c);
    }
    return MGPU_OK;
}

/* in holds world blocks of n F32; out (n) gets the rank-order reduction of block `rank`. Per
   chunk every rank stages its pieces of all blocks, then reduces its own block's pieces. */
static mgpu_result mgpu__shared_reduce_scatter(mgpu_comm *c, const char *fn, const float *in, float *out, int64_t n, int avg) {
    int64_t chunk = (int64_t)(c->half_bytes / (sizeof(float) * (size_t)c->world)), off;
    mgpu__coll_sig sig = mgpu__make_sig(MGPU__COLL_REDUCE_SCATTER, -1, MGPU_F32, avg, n);
    mgpu_result r;
    int q;
    if (n == 0) return mgpu__comm_sync(c, fn, &sig);
    for (off = 0; off < n; off += chunk) {
        int64_t m = MGPU__MIN(chunk, n - off);
        float *mine = (float *)mgpu__comm_slot(c, c->rank, c->half);
        for (q = 0; q < c->world; q++) memcpy(mine + q * m, in + q * n + off, sizeof(float) * (size_t)m);
        if ((r = mgpu__comm_sync(c, fn, off == 0 ? &sig : NULL)) != MGPU_OK) return r;
        for (q = 0; q < c->world; q++) c->srcs[q] = mgpu__comm_slot(c, q, c->half) + sizeof(float) * (size_t)(c->rank * m);
        mgpu__comm_sum_range(MGPU_F32, out + off, c->srcs, c->world, 0, m, avg);
        mgpu__comm_next_half(c);
    }
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   Creating and destroying communicators
   -------------------------------------------------------------------------------------- */

static mgpu_comm *mgpu__comm_new(mgpu_comm_backend backend, int rank, int world, int local_rank, int local_world, double timeout_s) {
    mgpu_comm *c = (mgpu_comm *)mgpu__calloc(sizeof *c, "a communicator");
    pthread_condattr_t ca;
    if (!c) return NULL;
    c->backend = backend; c->rank = rank; c->world = world;
    c->local_rank = local_rank; c->local_world = local_world;
    c->timeout_s = timeout_s;
    c->gpu_id = -1;
    pthread_mutex_init(&c->mu, NULL);
    pthread_mutex_init(&c->exec_mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);   /* waits use the mgpu_time_s clock */
    pthread_cond_init(&c->cv, &ca);
    pthread_condattr_destroy(&ca);
#ifdef MGPU_CUDA
    c->cuda_device = -1;
#endif
    return c;
}

/* Points c at a region laid out by mgpu__region_init and checks it belongs to this job. */
static mgpu_result mgpu__comm_attach(mgpu_comm *c, unsigned char *region, uint64_t nonce) {
    mgpu__region_hdr *h = (mgpu__region_hdr *)region;
    if (h->magic != MGPU__REGION_MAGIC || h->nonce != nonce || h->world != c->world)
        return mgpu__fail(MGPU_ERR_STATE, "mgpu_comm_create: rank %d found a shared segment of another job (world %d, expected %d)", c->rank, h->world, c->world);
    c->region = region;
    c->hdr = h;
    c->ctl = (mgpu__rank_ctl *)(region + mgpu__region_ctl_offset());
    c->slots = region + mgpu__region_slots_offset(c->world);
    c->slot_bytes = (size_t)h->slot_bytes;
    c->half_bytes = c->slot_bytes / 2;
    c->srcs = (const unsigned char **)mgpu__calloc(sizeof *c->srcs * (size_t)c->world, "a communicator");
    c->watch = (unsigned char *)mgpu__calloc((size_t)c->world, "a communicator");
    if (!c->srcs || !c->watch) return mgpu_last_result();
    __atomic_store_n(&c->ctl[c->rank].pid, (int32_t)getpid(), __ATOMIC_RELEASE);
    return MGPU_OK;
}

/* Lets the progress thread finish (every queued all-reduce is bounded by the timeout). */
static void mgpu__comm_progress_stop(mgpu_comm *c) {
    if (!c->progress_started) return;
    pthread_mutex_lock(&c->mu);
    c->progress_stop = 1;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    pthread_join(c->progress, NULL);
    c->progress_started = 0;
}

#ifdef MGPU_CUDA
static void mgpu__nccl_teardown(mgpu_comm *c);
#endif

static void mgpu__comm_work_free(mgpu_comm_work *w) {
#ifdef MGPU_CUDA
    if (w->ready_ev) cudaEventDestroy((cudaEvent_t)w->ready_ev);
    if (w->done_ev) cudaEventDestroy((cudaEvent_t)w->done_ev);
#endif
    mgpu_free(w);
}

MGPU_API void mgpu_comm_destroy(mgpu_comm *c) {
    if (!c) return;
    mgpu__comm_progress_stop(c);
    while (c->live) {   /* works never waited for */
        mgpu_comm_work *w = c->live;
        c->live = w->live_next;
        mgpu__comm_work_free(w);
    }
    if (c->ctl) {   /* peers still waiting for this rank fail at once */
        __atomic_store_n(&c->ctl[c->rank].state, MGPU__RANK_DEPARTED, __ATOMIC_SEQ_CST);
        mgpu__comm_wake_sleepers(c);
    }
    if (c->region_mapped) munmap(c->region, c->region_bytes);
    if (c->group && __atomic_sub_fetch(&c->group->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        mgpu_free(c->group->region);
        mgpu_free(c->group);
    }
    /* rank 0: keep the store until the other ranks have read what they need */
    mgpu__store_server_stop(c->server, 0, c->timeout_s);
#ifdef MGPU_CUDA
    mgpu__nccl_teardown(c);
#endif
    mgpu_free(c->srcs);
    mgpu_free(c->watch);
    pthread_mutex_destroy(&c->mu);
    pthread_mutex_destroy(&c->exec_mu);
    pthread_cond_destroy(&c->cv);
    mgpu_free(c);
}

/* A heap region shared by n communicators of this process. */
static mgpu_result mgpu__heap_group_attach(mgpu_comm **comms, int n) {
    mgpu__heap_group *g = (mgpu__heap_group *)mgpu__calloc(sizeof *g, "a communicator group");
    size_t bytes = mgpu__region_bytes(n, mgpu__region_slot_bytes(n));
    mgpu_result r = MGPU_OK;
    int i;
    if (!g) return mgpu_last_result();
    g->region = (unsigned char *)mgpu__alloc(bytes, "the communicators' staging region");
    if (!g->region) { mgpu_free(g); return mgpu_last_result(); }
    mgpu__region_init(g->region, n, 0);
    g->refs = n;
    for (i = 0; i < n; i++) {
        comms[i]->group = g;
        if (r == MGPU_OK) r = mgpu__comm_attach(comms[i], g->region, 0);
    }
    return r;
}

MGPU_API mgpu_result mgpu_comm_create_threads(int n, double timeout_s, mgpu_comm **comms) {
    double timeout = 0;
    mgpu_result r;
    int i;
    if (!comms) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_create_threads: comms is NULL");
    if (n < 1 || n > MGPU__COMM_MAX_RANKS)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_create_threads: n is %d; expected 1 to %d ranks", n, MGPU__COMM_MAX_RANKS);
    if ((r = mgpu__comm_timeout(timeout_s, "mgpu_comm_create_threads", 1, &timeout)) != MGPU_OK) return r;
    for (i = 0; i < n; i++) comms[i] = NULL;
    for (i = 0; i < n; i++)
        if (!(comms[i] = mgpu__comm_new(MGPU_COMM_THREADS, i, n, i, n, timeout))) break;
    r = i == n ? mgpu__heap_group_attach(comms, n) : mgpu_last_result();
    if (r != MGPU_OK) {
        for (i = 0; i < n; i++) { mgpu_comm_destroy(comms[i]); comms[i] = NULL; }
        return r;
    }
    return MGPU_OK;
}

#ifdef MGPU_CUDA
static mgpu_result mgpu__nccl_init_group(mgpu_comm **comms, int n, const int *devices, const char *fn);

/* devices: n visible, distinct CUDA devices (NCCL puts one rank on a device). */
static mgpu_result mgpu__check_group_devices(int n, const int *devices, const char *fn) {
    int visible = mgpu_cuda_device_count(), i, j;
    if (visible < 0) return mgpu_last_result();
    for (i = 0; i < n; i++) {
        if (devices[i] < 0 || devices[i] >= visible)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: rank %d's device %d is not one of the %d visible CUDA device%s (ids count the visible devices from 0)",
                              fn, i, devices[i], visible, visible == 1 ? "" : "s");
        for (j = 0; j < i; j++)
            if (devices[j] == devices[i])
                return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: ranks %d and %d both name cuda:%d; NCCL runs one rank per device, give distinct ids", fn, j, i, devices[i]);
    }
    return MGPU_OK;
}
#endif

MGPU_API mgpu_result mgpu_comm_create_nccl_threads(int n, const int *devices, double timeout_s, mgpu_comm **comms) {
    const char *fn = "mgpu_comm_create_nccl_threads";
    double timeout = 0;
    mgpu_result r;
    int i;
    if (!comms || !devices) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: comms and devices must not be NULL", fn);
    if (n < 1 || n > MGPU__COMM_MAX_RANKS) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: n is %d; expected 1 to %d ranks", fn, n, MGPU__COMM_MAX_RANKS);
#ifndef MGPU_CUDA
    (void)timeout; (void)r; (void)i; (void)timeout_s;
    return mgpu__fail(MGPU_ERR_UNSUPPORTED, "%s: the nccl backend needs a CUDA build (compile with -DMGPU_CUDA); use mgpu_comm_create_threads on CPU", fn);
#else
    if ((r = mgpu__comm_timeout(timeout_s, fn, 1, &timeout)) != MGPU_OK || (r = mgpu__check_group_devices(n, devices, fn)) != MGPU_OK) return r;
    for (i = 0; i < n; i++) comms[i] = NULL;
    for (i = 0; i < n; i++) {
        if (!(comms[i] = mgpu__comm_new(MGPU_COMM_NCCL, i, n, i, n, timeout))) break;
        comms[i]->gpu_id = devices[i];
    }
    r = i == n ? mgpu__nccl_init_group(comms, n, devices, fn) : mgpu_last_result();
    if (r != MGPU_OK) {
        char msg[MGPU__COMM_MSG];
        snprintf(msg, sizeof msg, "%s", mgpu_last_error());
        for (i = 0; i < n; i++) { mgpu_comm_destroy(comms[i]); comms[i] = NULL; }
        return mgpu__fail(r, "%s", msg);   /* destroy must not replace the reason */
    }
    return MGPU_OK;
#endif
}

/* ---- rendezvous through the TCP store ---- */

/* A unique-enough job id: time, pid and an address mixed. */
static uint64_t mgpu__job_nonce(void) {
    struct timespec ts;
    uint64_t x;
    clock_gettime(CLOCK_REALTIME, &ts);
    x = ((uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec) ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)&ts;
    return mgpu__mix64(x) | 1;   /* never 0: 0 marks heap regions */
}

static void mgpu__shm_name(char *buf, size_t size, int pid, uint64_t nonce) {
    snprintf(buf, size, "/mgpu-%d-%016llx", pid, (unsigned long long)nonce);
}

/* Rank 0: creates, sizes (reserving the memory, so a full /dev/shm is an error now rather than a
   SIGBUS later) and maps the job's segment. */
static mgpu_result mgpu__shm_create(mgpu_comm *c, uint64_t nonce, char *name, size_t name_size) {
    size_t bytes = mgpu__region_bytes(c->world, mgpu__region_slot_bytes(c->world));
    void *map;
    int fd, err;
    mgpu__shm_name(name, name_size, (int)getpid(), nonce);
    fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) return mgpu__fail(MGPU_ERR_IO, "mgpu_comm_create: rank 0 cannot create shared memory segment %s: %s", name, strerror(errno));
    err = posix_fallocate(fd, 0, (off_t)bytes);
    if (err == EINVAL || err == EOPNOTSUPP) err = ftruncate(fd, (off_t)bytes) == 0 ? 0 : errno;
    if (err) {
        close(fd); shm_unlink(name);
        return mgpu__fail(MGPU_ERR_OOM_HOST, "mgpu_comm_create: cannot reserve %zu bytes of shared memory for %s (%s); is /dev/shm full or too small?", bytes, name, strerror(err));
    }
    map = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) { shm_unlink(name); return mgpu__fail(MGPU_ERR_IO, "mgpu_comm_create: cannot map shared memory segment %s: %s", name, strerror(errno)); }
    mgpu__region_init((unsigned char *)map, c->world, nonce);
    c->region_mapped = 1; c->region_bytes = bytes;
    return mgpu__comm_attach(c, (unsigned char *)map, nonce);
}

/* Other ranks: map the segment rank 0 announced. */
static mgpu_result mgpu__shm_open(mgpu_comm *c, const char *name, uint64_t nonce) {
    size_t bytes = mgpu__region_bytes(c->world, mgpu__region_slot_bytes(c->world));
    struct stat st;
    void *map;
    int fd = shm_open(name, O_RDWR, 0);
    if (fd < 0)
        return mgpu__fail(MGPU_ERR_IO, "mgpu_comm_create: rank %d cannot open shared memory segment %s created by rank 0: %s "
                          "(the shm backend needs every rank on rank 0's host)", c->rank, name, strerror(errno));
    if (fstat(fd, &st) != 0 || (size_t)st.st_size != bytes) {
        close(fd);
        return mgpu__fail(MGPU_ERR_STATE, "mgpu_comm_create: rank %d: shared memory segment %s has %lld bytes, expected %zu", c->rank, name, (long long)st.st_size, bytes);
    }
    map = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return mgpu__fail(MGPU_ERR_IO, "mgpu_comm_create: rank %d cannot map shared memory segment %s: %s", c->rank, name, strerror(errno));
    c->region_mapped = 1; c->region_bytes = bytes;
    return mgpu__comm_attach(c, (unsigned char *)map, nonce);
}

#ifdef MGPU_CUDA
static mgpu_result mgpu__nccl_init(mgpu_comm *c, const char *id_hex, double deadline);
static mgpu_result mgpu__nccl_unique_id_hex(char *hex, size_t size);
#endif

/* What one rank knows during the rendezvous. */
typedef struct mgpu__rdzv {
    mgpu__store_client st;
    double deadline;
    uint64_t nonce;
    char payload[2 * 128 + 64];   /* shm: segment name; nccl: unique id in hex */
    char shm_name[96];            /* rank 0: the segment to unlink */
} mgpu__rdzv;

/* Rank 0: prepares the backend's shared state and publishes the job record. */
static mgpu_result mgpu__rdzv_publish(mgpu_comm *c, mgpu__rdzv *z) {
    char job[MGPU__STORE_MAX_VALUE];
    mgpu_result r = MGPU_OK;
    z->nonce = mgpu__job_nonce();
    if (c->backend == MGPU_COMM_SHM) {
        r = mgpu__shm_create(c, z->nonce, z->shm_name, sizeof z->shm_name);
        snprintf(z->payload, sizeof z->payload, "%s", z->shm_name);
    }
#ifdef MGPU_CUDA
    else r = mgpu__nccl_unique_id_hex(z->payload, sizeof z->payload);
#endif
    if (r != MGPU_OK) snprintf(job, sizeof job, "error %s", mgpu_last_error());
    else snprintf(job, sizeof job, "mgpu1 %d %s %016llx %s", c->world, mgpu__comm_backend_name(c->backend), (unsigned long long)z->nonce, z->payload);
    if (mgpu__store_set(&z->st, "job", job, z->deadline) != MGPU_OK && r == MGPU_OK) r = mgpu_last_result();
    return r;
}

/* Other ranks: read the job record, check it agrees with this rank, attach to the backend. */
static mgpu_result mgpu__rdzv_read_job(mgpu_comm *c, mgpu__rdzv *z) {
    char job[MGPU__STORE_MAX_VALUE], backend[16];
    unsigned long long nonce = 0;
    int world = 0, n = 0;
    mgpu_result r = mgpu__store_get(&z->st, "job", job, sizeof job, z->deadline);
    if (r != MGPU_OK) {
        if (r == MGPU_ERR_TIMEOUT)
            return mgpu__fail(r, "mgpu_comm_create: rank %d timed out after %.0f s waiting for rank 0 to publish the job at %s:%d",
                              c->rank, c->timeout_s, z->st.addr, z->st.port);
        return r;
    }
    if (strncmp(job, "error ", 6) == 0) return mgpu__fail(MGPU_ERR_STATE, "mgpu_comm_create: rank 0 failed: %s", job + 6);
    if (sscanf(job, "mgpu1 %d %15s %llx %n", &world, backend, &nonce, &n) != 3 || n == 0)
        return mgpu__fail(MGPU_ERR_FORMAT, "mgpu_comm_create: rank %d got a malformed job record from %s:%d (is MASTER_PORT another program's port?)",
                          c->rank, z->st.addr, z->st.port);
    if (world != c->world)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_create: world sizes disagree: rank 0 has %d, rank %d has %d; every rank must be "
                          "launched with the same WORLD_SIZE", world, c->rank, c->world);
    if (strcmp(backend, mgpu__comm_backend_name(c->backend)) != 0)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_create: backends disagree: rank 0 uses %s, rank %d uses %s", backend, c->rank, mgpu__comm_backend_name(c->backend));
    z->nonce = nonce;
    snprintf(z->payload, sizeof z->payload, "%s", job + n);
    if (c->backend == MGPU_COMM_SHM) return mgpu__shm_open(c, z->payload, z->nonce);
    return MGPU_OK;
}

/* "1, 3" of the ranks without a join record, asked over a fresh connection (the old one may have
   a GET outstanding). */
static void mgpu__rdzv_missing(const mgpu_comm *c, const mgpu__rdzv *z, char *buf, size_t size, int *count) {
    mgpu__store_client st;
    char val[MGPU__STORE_MAX_VALUE], key[32];
    size_t pos = 0;
    int r, found = 0, n = 0;
    double deadline = mgpu_time_s() + 2.0;
    snprintf(buf, size, "the other ranks");
    *count = 2;
    if (mgpu__store_connect(&st, z->st.addr, z->st.port, c->rank, deadline, 2.0) != MGPU_OK) return;
    buf[0] = 0;
    for (r = 0; r < c->world; r++) {
        snprintf(key, sizeof key, "join/%d", r);
        if (mgpu__store_try(&st, key, val, sizeof val, &found, deadline) != MGPU_OK) break;
        if (found) continue;
        if (n < 16 && pos < size) pos += (size_t)snprintf(buf + pos, size - pos, n ? ", %d" : "%d", r);
        n++;
    }
    if (n > 16 && pos < size) snprintf(buf + pos, size - pos, " and %d more", n - 16);
    *count = n;
    mgpu__store_close(&st);
}

/* This process's pid namespace ("pid:[4026531836]" on Linux): pids are compared only within one. */
static void mgpu__comm_pid_ns(char *buf, size_t size) {
#if defined(__linux__)
    ssize_t n = readlink("/proc/self/ns/pid", buf, size - 1);
    if (n <= 0) n = (ssize_t)snprintf(buf, size, "unknown");
    buf[n] = 0;
    buf[strcspn(buf, " ")] = 0;
#else
    snprintf(buf, size, "-");
#endif
}

/* Registers this rank (or its failure) and waits until every rank has: the last one to register
   sets "all-joined"; a rank that failed sets it to its error so the others stop at once. */
static mgpu_result mgpu__rdzv_join(mgpu_comm *c, mgpu__rdzv *z, mgpu_result mine) {
    char key[32], val[MGPU__STORE_MAX_VALUE], all[MGPU__STORE_MAX_VALUE], ns[64], peer_ns[64];
    long long joined = 0;
    mgpu_result r;
    int peer;
    snprintf(key, sizeof key, "join/%d", c->rank);
    if (mine != MGPU_OK) {
        snprintf(val, sizeof val, "error rank %d could not join: %s", c->rank, mgpu_last_error());
        mgpu__store_set(&z->st, key, val, z->deadline);
        mgpu__store_set(&z->st, "all-joined", val, z->deadline);
        return mine;
    }
    mgpu__comm_pid_ns(ns, sizeof ns);
    snprintf(val, sizeof val, "ok %d %s", (int)getpid(), ns);
    if ((r = mgpu__store_set(&z->st, key, val, z->deadline)) != MGPU_OK) return r;
    if ((r = mgpu__store_add(&z->st, "joined", 1, &joined, z->deadline)) != MGPU_OK) return r;
    if (joined == c->world && (r = mgpu__store_set(&z->st, "all-joined", "ok", z->deadline)) != MGPU_OK) return r;
    r = mgpu__store_get(&z->st, "all-joined", all, sizeof all, z->deadline);
    if (r == MGPU_ERR_TIMEOUT) {
        char missing[160];
        int n = 0;
        mgpu__rdzv_missing(c, z, missing, sizeof missing, &n);
        return mgpu__fail(MGPU_ERR_TIMEOUT, "mgpu_comm_create: timed out after %.0f s on rank %d waiting for rank%s %s to join the rendezvous at %s:%d "
                          "(world size %d); did every rank start, with the same MASTER_ADDR and MASTER_PORT?", c->timeout_s, c->rank,
                          n == 1 ? "" : "s", missing, z->st.addr, z->st.port, c->world);
    }
    if (r != MGPU_OK) return r;
    if (strncmp(all, "error ", 6) == 0) return mgpu__fail(MGPU_ERR_STATE, "mgpu_comm_create: %s", all + 6);
    /* every rank is in: learn the peers' pids for liveness checks (shm) */
    for (peer = 0; c->watch && peer < c->world; peer++) {
        int pid = 0;
        snprintf(key, sizeof key, "join/%d", peer);
        if ((r = mgpu__store_get(&z->st, key, val, sizeof val, z->deadline)) != MGPU_OK) return r;
        if (sscanf(val, "ok %d %63s", &pid, peer_ns) != 2) return mgpu__fail(MGPU_ERR_FORMAT, "mgpu_comm_create: bad join record of rank %d: '%s'", peer, val);
        if (peer != c->rank)   /* same pid namespace, visible, and the pid the segment holds */
            c->watch[peer] = (unsigned char)(strcmp(ns, peer_ns) == 0 && pid > 0 && mgpu__comm_pid_alive(pid) && c->ctl[peer].pid == pid);
    }
    return MGPU_OK;
}

/* The whole rendezvous of a job with world > 1; on return the store connection is closed and
   the shm segment (if any) unlinked. */
static mgpu_result mgpu__rendezvous(mgpu_comm *c, const mgpu_dist_env *env) {
    mgpu__rdzv z;
    mgpu_result r;
    memset(&z, 0, sizeof z);
    z.st.fd = -1;
    z.deadline = mgpu_time_s() + c->timeout_s;
    if (c->rank == 0 && !(c->server = mgpu__store_server_start(env->master_addr, env->master_port))) return mgpu_last_result();
    r = mgpu__store_connect(&z.st, env->master_addr, env->master_port, c->rank, z.deadline, c->timeout_s);
    if (r == MGPU_OK) {
        r = c->rank == 0 ? mgpu__rdzv_publish(c, &z) : mgpu__rdzv_read_job(c, &z);
        r = mgpu__rdzv_join(c, &z, r);
    }
    if (z.shm_name[0]) shm_unlink(z.shm_name);   /* mapped by everyone (or failed): nothing can leak now */
#ifdef MGPU_CUDA
    if (r == MGPU_OK && c->backend == MGPU_COMM_NCCL) r = mgpu__nccl_init(c, z.payload, z.deadline);
#endif
    mgpu__store_close(&z.st);
    if (r != MGPU_OK && c->server) {   /* a moment for the others to read the failure, then they find the store closed */
        mgpu__store_server_stop(c->server, 0, MGPU__MIN(c->timeout_s, 2.0));
        c->server = NULL;
    }
    if (c->server) mgpu__store_server_request_stop(c->server, 0, c->timeout_s);   /* serves on until every rank has gone */
    return r;
}

/* An environment passed in by the caller gets the checks mgpu_dist_env_read makes. */
static mgpu_result mgpu__comm_env_check(const mgpu_dist_env *e) {
    if (e->world_size < 1 || e->world_size > MGPU__COMM_MAX_JOB_RANKS || e->rank < 0 || e->rank >= e->world_size)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_create: env has rank %d and world size %d; expected 0 <= rank < world size", e->rank, e->world_size);
    if (e->local_world_size < 1 || e->local_world_size > e->world_size || e->local_rank < 0 || e->local_rank >= e->local_world_size)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_create: env has local rank %d and local world size %d (world size %d); expected 0 <= local rank < local world size <= world size",
                          e->local_rank, e->local_world_size, e->world_size);
    if (e->world_size > 1 && (!e->master_addr[0] || e->master_port < 1 || e->master_port > 65535))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_create: env has master '%s' port %d; a world of %d needs MASTER_ADDR and MASTER_PORT in [1, 65535]",
                          e->master_addr, e->master_port, e->world_size);
    return MGPU_OK;
}

/* The backend this build can run, and an environment it can serve. */
static mgpu_result mgpu__comm_check_request(const mgpu_comm_desc *d, const mgpu_dist_env *env) {
    const char *fn = "mgpu_comm_create";
    mgpu_result r = mgpu__comm_env_check(env);
    if (r != MGPU_OK) return r;
    if (d->backend == MGPU_COMM_SHM && env->world_size > MGPU__COMM_MAX_RANKS)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: the shm backend joins at most %d ranks, the world has %d", fn, MGPU__COMM_MAX_RANKS, env->world_size);
    if (d->backend == MGPU_COMM_SHM && env->local_world_size != env->world_size)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: the shm backend needs every rank on one host, but the local world size is %d of %d ranks "
                          "(use the nccl backend across hosts)", fn, env->local_world_size, env->world_size);
    return MGPU_OK;
}

/* desc->gpu_ids (nccl): an entry for this local rank, a device index. */
static mgpu_result mgpu__comm_check_gpu_ids(const mgpu_comm_desc *d, const mgpu_dist_env *env) {
    const char *fn = "mgpu_comm_create";
    char list[128];
    size_t at = 0;
    int i;
    if (d->backend != MGPU_COMM_NCCL || d->num_gpu_ids == 0) return MGPU_OK;
    if (d->num_gpu_ids < 0 || !d->gpu_ids)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->num_gpu_ids is %d with gpu_ids %s; expected a list of device indices (or 0 ids)",
                          fn, d->num_gpu_ids, d->gpu_ids ? "set" : "NULL");
    list[0] = 0;
    for (i = 0; i < d->num_gpu_ids && at < sizeof list - 16; i++) at += (size_t)snprintf(list + at, sizeof list - at, i ? ",%d" : "%d", d->gpu_ids[i]);
    if (env->local_rank >= d->num_gpu_ids)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: local rank %d has no entry in --gpu-ids %s (%d ids for %d local ranks); give one device per local rank",
                          fn, env->local_rank, list, d->num_gpu_ids, env->local_world_size);
    if (d->gpu_ids[env->local_rank] < 0)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: --gpu-ids %s gives local rank %d device %d; expected a device index >= 0",
                          fn, list, env->local_rank, d->gpu_ids[env->local_rank]);
    return MGPU_OK;
}

MGPU_API mgpu_comm *mgpu_comm_create(const mgpu_comm_desc *desc) {
    mgpu_comm_desc d;
    mgpu_dist_env env;
    mgpu_comm *c;
    double timeout = 0;
    mgpu_result r;
    if (desc) d = *desc; else memset(&d, 0, sizeof d);
    if (d.backend == MGPU_COMM_THREADS)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_comm_create: the threads backend joins threads of one process; use mgpu_comm_create_threads");
    if (d.backend != MGPU_COMM_SHM && d.backend != MGPU_COMM_NCCL)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_comm_create: desc->backend %d is not a backend (MGPU_COMM_SHM or MGPU_COMM_NCCL)", (int)d.backend);
#ifndef MGPU_CUDA
    if (d.backend == MGPU_COMM_NCCL)
        MGPU__FAIL_NULL(MGPU_ERR_UNSUPPORTED, "mgpu_comm_create: the nccl backend needs a CUDA build (compile with -DMGPU_CUDA and link -lnccl, e.g. `make cuda`); "
                        "use the shm backend on CPU");
#endif
    if (d.env) env = *d.env;
    else if (mgpu_dist_env_read(&env) != MGPU_OK) return NULL;
    if (mgpu__comm_timeout(d.timeout_s, "mgpu_comm_create", env.rank == 0, &timeout) != MGPU_OK) return NULL;
    if (mgpu__comm_check_request(&d, &env) != MGPU_OK || mgpu__comm_check_gpu_ids(&d, &env) != MGPU_OK) return NULL;
    c = mgpu__comm_new(d.backend, env.rank, env.world_size, env.local_rank, env.local_world_size, timeout);
    if (!c) return NULL;
    if (d.backend == MGPU_COMM_NCCL && d.num_gpu_ids > 0) c->gpu_id = d.gpu_ids[env.local_rank];
    if (env.world_size == 1 && d.backend == MGPU_COMM_SHM) r = mgpu__heap_group_attach(&c, 1);
#ifdef MGPU_CUDA
    else if (env.world_size == 1) {
        char id[2 * 128 + 1];
        r = mgpu__nccl_unique_id_hex(id, sizeof id);
        if (r == MGPU_OK) r = mgpu__nccl_init(c, id, mgpu_time_s() + timeout);
    }
#endif
    else r = mgpu__rendezvous(c, &env);
    if (r != MGPU_OK) {
        char msg[MGPU__COMM_MSG];
        snprintf(msg, sizeof msg, "%s", mgpu_last_error());
        mgpu_comm_destroy(c);
        mgpu__fail(r, "%s", msg);   /* destroy must not replace the reason */
        return NULL;
    }
    mgpu_log(MGPU_LOG_DEBUG, "communicator: rank %d of %d (local %d of %d), backend %s, timeout %.0f s", c->rank, c->world, c->local_rank,
             c->local_world, mgpu__comm_backend_name(c->backend), c->timeout_s);
    return c;
}

MGPU_API int mgpu_comm_rank(const mgpu_comm *c) {
    if (!c) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_rank: communicator is NULL"); return -1; }
    return c->rank;
}
MGPU_API int mgpu_comm_world_size(const mgpu_comm *c) {
    if (!c) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_world_size: communicator is NULL"); return 0; }
    return c->world;
}
MGPU_API int mgpu_comm_local_rank(const mgpu_comm *c) {
    if (!c) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_local_rank: communicator is NULL"); return -1; }
    return c->local_rank;
}
MGPU_API int mgpu_comm_cuda_device(const mgpu_comm *c) {
    if (!c) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_cuda_device: communicator is NULL"); return -1; }
#ifdef MGPU_CUDA
    return c->cuda_device;
#else
    return -1;
#endif
}
MGPU_API mgpu_comm_backend mgpu_comm_backend_of(const mgpu_comm *c) {
    if (!c) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_backend_of: communicator is NULL"); return MGPU_COMM_SHM; }
    return c->backend;
}

/* --------------------------------------------------------------------------------------
   Running collectives: one descriptor, executed by the shared-region engine or by NCCL
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__coll {
    int kind;
    const void *in; void *out;   /* in == out for allreduce and broadcast */
    int64_t count;               /* allreduce: elements; broadcast: bytes; allgather: bytes per rank;
                                    reduce_scatter: elements of out */
    int dtype, avg, root;
    /* CUDA data: what the collective must run after, and what may run after it */
    int dev;                     /* in/out are device memory of this device (raw buffers); -1: host, or tensors
                                    staged by the caller */
    void *stream;                /* the stream whose queued work produced in: a CUDA tensor's context stream */
    void *ready_ev;              /* or an event recorded on it when the collective was issued (asynchronous) */
    int ordered;                 /* or the caller synchronised the device; with none of the three, device
                                    data waits for all work of its device (the producer is unknown) */
    void *done_ev;               /* recorded on the communicator's stream after the collective (consumers wait) */
} mgpu__coll;

static mgpu__coll mgpu__make_coll(int kind, const void *in, void *out, int64_t count, int dtype, int avg, int root) {
    mgpu__coll k;
    memset(&k, 0, sizeof k);
    k.kind = kind; k.in = in; k.out = out; k.count = count; k.dtype = dtype; k.avg = avg; k.root = root;
    k.dev = -1;
    return k;
}

static mgpu_result mgpu__shared_run(mgpu_comm *c, const char *fn, const mgpu__coll *k) {
    mgpu__coll_sig sig;
    switch (k->kind) {
    case MGPU__COLL_ALLREDUCE: return mgpu__shared_allreduce(c, fn, k->out, k->count, k->dtype, k->avg);
    case MGPU__COLL_BROADCAST: return mgpu__shared_broadcast(c, fn, k->out, k->count, k->root, k->dtype);
    case MGPU__COLL_ALLGATHER: return mgpu__shared_allgather(c, fn, k->in, k->count, k->out);
    case MGPU__COLL_REDUCE_SCATTER: return mgpu__shared_reduce_scatter(c, fn, (const float *)k->in, (float *)k->out, k->count, k->avg);
    default:
        sig = mgpu__make_sig(MGPU__COLL_BARRIER, -1, 0, 0, 0);
        return mgpu__comm_sync(c, fn, &sig);
    }
}

#ifdef MGPU_CUDA
static mgpu_result mgpu__nccl_run(mgpu_comm *c, const char *fn, const mgpu__coll *k);
static mgpu_result mgpu__shared_run_staged(mgpu_comm *c, const char *fn, const mgpu__coll *k);
static int mgpu__comm_ptr_device(const void *p);
#endif

/* Executes k now (the caller has ordered it after earlier asynchronous work). */
static mgpu_result mgpu__comm_run(mgpu_comm *c, const char *fn, const mgpu__coll *k) {
    mgpu_result r;
    pthread_mutex_lock(&c->exec_mu);
#ifdef MGPU_CUDA
    if (c->backend == MGPU_COMM_NCCL) r = mgpu__nccl_run(c, fn, k);
    else if (k->dev >= 0) r = mgpu__shared_run_staged(c, fn, k);
    else
#endif
    r = mgpu__shared_run(c, fn, k);
    pthread_mutex_unlock(&c->exec_mu);
    return r;
}

/* Waits on c->cv until deadline (mgpu_time_s clock: the condition variable uses CLOCK_MONOTONIC). */
static void mgpu__comm_cond_wait(mgpu_comm *c, double deadline) {
    struct timespec ts;
    ts.tv_sec = (time_t)deadline;
    ts.tv_nsec = (long)((deadline - (double)ts.tv_sec) * 1e9);
    pthread_cond_timedwait(&c->cv, &c->mu, &ts);
}

/* Asynchronous work ends within its own collective's timeout; waits allow that plus a margin so the
   collective's message, which names the missing ranks, is the one reported. */
static double mgpu__comm_wait_deadline(const mgpu_comm *c) { return mgpu_time_s() + c->timeout_s * 1.1 + 1.0; }

/* Blocking collectives run after every asynchronous all-reduce issued before them. */
static mgpu_result mgpu__comm_drain(mgpu_comm *c, const char *fn) {
    double deadline;
    int64_t left;
    if (!c->progress_started) return MGPU_OK;
    pthread_mutex_lock(&c->mu);
    deadline = mgpu__comm_wait_deadline(c);
    while (c->pending > 0 && mgpu_time_s() < deadline) mgpu__comm_cond_wait(c, deadline);
    left = c->pending;
    pthread_mutex_unlock(&c->mu);
    if (left > 0)
        return mgpu__comm_break(c, MGPU_ERR_TIMEOUT, "%s: %lld asynchronous all-reduces issued before it did not finish within %.0f s",
                                fn, (long long)left, c->timeout_s);
    return MGPU_OK;
}

static mgpu_result mgpu__comm_collective(mgpu_comm *c, const char *fn, const mgpu__coll *k) {
    mgpu_result r = mgpu__comm_usable(c, fn);
    if (r == MGPU_OK) r = mgpu__comm_drain(c, fn);
    return r == MGPU_OK ? mgpu__comm_run(c, fn, k) : r;
}

/* ---- argument checks ---- */

static mgpu_result mgpu__check_reduce_op(const char *fn, mgpu_reduce_op op) {
    if (op != MGPU_REDUCE_SUM && op != MGPU_REDUCE_AVG)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: op %d is not MGPU_REDUCE_SUM or MGPU_REDUCE_AVG", fn, (int)op);
    return MGPU_OK;
}

static mgpu_result mgpu__check_comm_tensor(const char *fn, const char *arg, const mgpu_tensor *t, int need_f32) {
    if (!t) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: %s is NULL", fn, arg);
    if (need_f32 && t->dtype != MGPU_F32)
        return mgpu__fail(MGPU_ERR_SHAPE, "%s: %s is %s; this collective takes F32 tensors", fn, arg, mgpu_dtype_name(t->dtype));
#ifndef MGPU_CUDA
    if (t->device.type != MGPU_DEVICE_CPU)
        return mgpu__fail(MGPU_ERR_UNSUPPORTED, "%s: %s is on cuda:%d but this build has no CUDA support", fn, arg, t->device.index);
#endif
    return MGPU_OK;
}

static mgpu_result mgpu__comm_check_buffer(const char *fn, const char *arg, const void *p, int64_t n) {
    if (n < 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: %s has a negative size (%lld)", fn, arg, (long long)n);
    if (!p && n > 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: %s is NULL with size %lld", fn, arg, (long long)n);
    return MGPU_OK;
}

/* ---- host memory of a tensor during a collective ---- */

/* The stream a tensor's producers and consumers run on: its context's (NULL: the legacy stream). */
static void *mgpu__comm_tensor_stream(const mgpu_tensor *t) {
#ifdef MGPU_CUDA
    if (t && t->device.type == MGPU_DEVICE_CUDA && t->ctx) return t->ctx->cuda_stream;
#endif
    (void)t;
    return NULL;
}

/* t->data, or for a CUDA tensor under shm/threads a pinned staging buffer (one of two), filled
   from the device when load (nccl takes device memory directly). NULL on failure. The copies run
   on the tensor's stream, in order after the work that produced it (a blocking cudaMemcpy would run
   on the legacy stream, which does not wait for a non-blocking stream). */
static void *mgpu__comm_host_begin(mgpu_comm *c, const mgpu_tensor *t, int which, int load, const char *fn) {
#ifdef MGPU_CUDA
    if (t->device.type == MGPU_DEVICE_CUDA && c->backend != MGPU_COMM_NCCL) {
        size_t bytes = mgpu_tensor_nbytes(t);
        cudaStream_t s = (cudaStream_t)mgpu__comm_tensor_stream(t);
        if (cudaSetDevice(t->device.index) != cudaSuccess) { mgpu__fail(MGPU_ERR_CUDA, "%s: cannot select cuda:%d", fn, t->device.index); return NULL; }
        if (bytes > c->pinned_bytes[which]) {
            if (c->pinned[which]) cudaFreeHost(c->pinned[which]);
            c->pinned[which] = NULL; c->pinned_bytes[which] = 0;
            if (cudaMallocHost(&c->pinned[which], bytes) != cudaSuccess) {
                mgpu__fail(MGPU_ERR_OOM_HOST, "%s: cannot allocate %zu bytes of pinned host memory to stage a CUDA tensor", fn, bytes);
                return NULL;
            }
            c->pinned_bytes[which] = bytes;
        }
        if (load && bytes && (cudaMemcpyAsync(c->pinned[which], t->data, bytes, cudaMemcpyDeviceToHost, s) != cudaSuccess ||
                              cudaStreamSynchronize(s) != cudaSuccess)) {
            mgpu__fail(MGPU_ERR_CUDA, "%s: copying %zu bytes from cuda:%d to host failed", fn, bytes, t->device.index);
            return NULL;
        }
        return c->pinned[which];
    }
#endif
    (void)c; (void)which; (void)load; (void)fn;
    return t->data;
}

/* Copies a staged result back to the device (store), on the tensor's stream and waited for (the
   staging buffer is reused), and passes r through. */
static mgpu_result mgpu__comm_host_end(const mgpu_tensor *t, void *host, int store, mgpu_result r, const char *fn) {
#ifdef MGPU_CUDA
    cudaStream_t s = (cudaStream_t)mgpu__comm_tensor_stream(t);
    if (r == MGPU_OK && store && host != t->data && mgpu_tensor_nbytes(t) &&
        (cudaMemcpyAsync(t->data, host, mgpu_tensor_nbytes(t), cudaMemcpyHostToDevice, s) != cudaSuccess || cudaStreamSynchronize(s) != cudaSuccess))
        return mgpu__fail(MGPU_ERR_CUDA, "%s: copying %zu bytes back to cuda:%d failed", fn, mgpu_tensor_nbytes(t), t->device.index);
#endif
    (void)t; (void)host; (void)store; (void)fn;
    return r;
}

/* --------------------------------------------------------------------------------------
   Public collectives
   -------------------------------------------------------------------------------------- */

MGPU_API mgpu_result mgpu_comm_allreduce(mgpu_comm *c, mgpu_tensor *t, mgpu_reduce_op op) {
    const char *fn = "mgpu_comm_allreduce";
    mgpu__coll k;
    mgpu_result r;
    void *host;
    if ((r = mgpu__comm_usable(c, fn)) != MGPU_OK || (r = mgpu__check_comm_tensor(fn, "tensor", t, 1)) != MGPU_OK ||
        (r = mgpu__check_reduce_op(fn, op)) != MGPU_OK) return r;
    if (!(host = mgpu__comm_host_begin(c, t, 0, 1, fn))) return mgpu_last_result();
    k = mgpu__make_coll(MGPU__COLL_ALLREDUCE, host, host, t->numel, MGPU_F32, op == MGPU_REDUCE_AVG, -1);
    k.stream = mgpu__comm_tensor_stream(t);
    return mgpu__comm_host_end(t, host, 1, mgpu__comm_collective(c, fn, &k), fn);
}

MGPU_API mgpu_result mgpu_comm_broadcast(mgpu_comm *c, mgpu_tensor *t, int root) {
    const char *fn = "mgpu_comm_broadcast";
    mgpu__coll k;
    mgpu_result r;
    void *host;
    if ((r = mgpu__comm_usable(c, fn)) != MGPU_OK || (r = mgpu__check_comm_tensor(fn, "tensor", t, 0)) != MGPU_OK) return r;
    if (root < 0 || root >= c->world) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: root %d is out of range for world size %d", fn, root, c->world);
    if (!(host = mgpu__comm_host_begin(c, t, 0, c->rank == root, fn))) return mgpu_last_result();
    k = mgpu__make_coll(MGPU__COLL_BROADCAST, host, host, (int64_t)mgpu_tensor_nbytes(t), (int)t->dtype, 0, root);
    k.stream = mgpu__comm_tensor_stream(t);
    return mgpu__comm_host_end(t, host, c->rank != root, mgpu__comm_collective(c, fn, &k), fn);
}

MGPU_API mgpu_result mgpu_comm_allgather(mgpu_comm *c, const mgpu_tensor *in, mgpu_tensor *out) {
    const char *fn = "mgpu_comm_allgather";
    mgpu__coll k;
    mgpu_result r;
    void *hin, *hout;
    if ((r = mgpu__comm_usable(c, fn)) != MGPU_OK || (r = mgpu__check_comm_tensor(fn, "in", in, 0)) != MGPU_OK ||
        (r = mgpu__check_comm_tensor(fn, "out", out, 0)) != MGPU_OK) return r;
    if (in->dtype != out->dtype || out->numel != (int64_t)c->world * in->numel)
        return mgpu__fail(MGPU_ERR_SHAPE, "%s: out is %s with %lld elements; expected %s with world size %d x %lld (in's) elements", fn,
                          mgpu_dtype_name(out->dtype), (long long)out->numel, mgpu_dtype_name(in->dtype), c->world, (long long)in->numel);
    if (!(hin = mgpu__comm_host_begin(c, in, 0, 1, fn)) || !(hout = mgpu__comm_host_begin(c, out, 1, 0, fn))) return mgpu_last_result();
    k = mgpu__make_coll(MGPU__COLL_ALLGATHER, hin, hout, (int64_t)mgpu_tensor_nbytes(in), (int)in->dtype, 0, -1);
    k.stream = mgpu__comm_tensor_stream(in);
    return mgpu__comm_host_end(out, hout, 1, mgpu__comm_collective(c, fn, &k), fn);
}

MGPU_API mgpu_result mgpu_comm_reduce_scatter(mgpu_comm *c, const mgpu_tensor *in, mgpu_tensor *out, mgpu_reduce_op op) {
    const char *fn = "mgpu_comm_reduce_scatter";
    mgpu__coll k;
    mgpu_result r;
    void *hin, *hout;
    if ((r = mgpu__comm_usable(c, fn)) != MGPU_OK || (r = mgpu__check_comm_tensor(fn, "in", in, 1)) != MGPU_OK ||
        (r = mgpu__check_comm_tensor(fn, "out", out, 1)) != MGPU_OK || (r = mgpu__check_reduce_op(fn, op)) != MGPU_OK) return r;
    if (in->numel != (int64_t)c->world * out->numel)
        return mgpu__fail(MGPU_ERR_SHAPE, "%s: in has %lld elements; expected world size %d x %lld (out's) elements", fn,
                          (long long)in->numel, c->world, (long long)out->numel);
    if (in->data == out->data && out->numel > 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: in and out must not share memory", fn);
    if (!(hin = mgpu__comm_host_begin(c, in, 0, 1, fn)) || !(hout = mgpu__comm_host_begin(c, out, 1, 0, fn))) return mgpu_last_result();
    k = mgpu__make_coll(MGPU__COLL_REDUCE_SCATTER, hin, hout, out->numel, MGPU_F32, op == MGPU_REDUCE_AVG, -1);
    k.stream = mgpu__comm_tensor_stream(in);
    return mgpu__comm_host_end(out, hout, 1, mgpu__comm_collective(c, fn, &k), fn);
}

MGPU_API mgpu_result mgpu_comm_barrier(mgpu_comm *c) {
    mgpu__coll k = mgpu__make_coll(MGPU__COLL_BARRIER, NULL, NULL, 0, 0, 0, -1);
    return mgpu__comm_collective(c, "mgpu_comm_barrier", &k);
}

static mgpu_result mgpu__allreduce_raw(mgpu_comm *c, const char *fn, void *data, int64_t n, int dtype, mgpu_reduce_op op) {
    mgpu__coll k;
    mgpu_result r;
    if ((r = mgpu__comm_usable(c, fn)) != MGPU_OK || (r = mgpu__comm_check_buffer(fn, "data", data, n)) != MGPU_OK ||
        (r = mgpu__check_reduce_op(fn, op)) != MGPU_OK) return r;
    k = mgpu__make_coll(MGPU__COLL_ALLREDUCE, data, data, n, dtype, op == MGPU_REDUCE_AVG, -1);
#ifdef MGPU_CUDA
    if (n > 0) k.dev = mgpu__comm_ptr_device(data);
#endif
    return mgpu__comm_collective(c, fn, &k);
}
MGPU_API mgpu_result mgpu_comm_allreduce_f32(mgpu_comm *c, float *data, int64_t n, mgpu_reduce_op op) {
    return mgpu__allreduce_raw(c, "mgpu_comm_allreduce_f32", data, n, MGPU_F32, op);
}
MGPU_API mgpu_result mgpu_comm_allreduce_f64(mgpu_comm *c, double *data, int64_t n, mgpu_reduce_op op) {
    return mgpu__allreduce_raw(c, "mgpu_comm_allreduce_f64", data, n, MGPU__DTYPE_F64, op);
}

MGPU_API mgpu_result mgpu_comm_allgather_bytes(mgpu_comm *c, const void *in, size_t bytes, void *out) {
    const char *fn = "mgpu_comm_allgather_bytes";
    mgpu__coll k;
    mgpu_result r;
    if ((r = mgpu__comm_usable(c, fn)) != MGPU_OK) return r;
    if (bytes > (size_t)INT64_MAX / (size_t)c->world) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: %zu bytes per rank is too large", fn, bytes);
    if ((r = mgpu__comm_check_buffer(fn, "in", in, (int64_t)bytes)) != MGPU_OK || (r = mgpu__comm_check_buffer(fn, "out", out, (int64_t)bytes)) != MGPU_OK) return r;
    k = mgpu__make_coll(MGPU__COLL_ALLGATHER, in, out, (int64_t)bytes, MGPU_U8, 0, -1);
    return mgpu__comm_collective(c, fn, &k);
}

/* --------------------------------------------------------------------------------------
   Asynchronous all-reduce: a progress thread per communicator runs them in issue order
   -------------------------------------------------------------------------------------- */

static void *mgpu__comm_progress_main(void *arg) {
    mgpu_comm *c = (mgpu_comm *)arg;
    const char *fn = "mgpu_comm_allreduce_f32_async";
#ifdef MGPU_CUDA
    if (c->cuda_device >= 0) cudaSetDevice(c->cuda_device);   /* the current device is per thread */
#endif
    pthread_mutex_lock(&c->mu);
    for (;;) {
        mgpu_comm_work *w;
        mgpu__coll k;
        mgpu_result r;
        while (!c->queue_head && !c->progress_stop) pthread_cond_wait(&c->cv, &c->mu);
        if (!(w = c->queue_head)) break;   /* stopping with nothing left */
        c->queue_head = w->next;
        if (!c->queue_head) c->queue_tail = NULL;
        pthread_mutex_unlock(&c->mu);
        k = mgpu__make_coll(MGPU__COLL_ALLREDUCE, w->data, w->data, w->n, MGPU_F32, w->op == MGPU_REDUCE_AVG, -1);
        k.dev = w->device; k.stream = w->stream; k.ready_ev = w->ready_ev; k.done_ev = w->done_ev;
        k.ordered = w->device >= 0 && !w->ready_ev;   /* raw device data: the issuer synchronised the device */
        r = mgpu__comm_usable(c, fn);
        if (r == MGPU_OK) r = mgpu__comm_run(c, fn, &k);
        pthread_mutex_lock(&c->mu);
        w->result = r;
        if (r != MGPU_OK) snprintf(w->msg, sizeof w->msg, "%s", mgpu_last_error());   /* errors are per thread */
        __atomic_store_n(&w->done, 1, __ATOMIC_RELEASE);
        c->pending--;
        if (w->abandoned) mgpu__comm_work_free(w);
        pthread_cond_broadcast(&c->cv);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* Queues an all-reduce of n floats at data for the progress thread. Device data (device >= 0):
   produced by work queued on `stream` before this call (its event is recorded now, so the
   collective waits for that work and nothing later), or with stream NULL by anything queued on the
   device so far (synchronised now). */
static mgpu_comm_work *mgpu__comm_allreduce_async(mgpu_comm *c, const char *fn, float *data, int64_t n, mgpu_reduce_op op, int device, void *stream) {
    mgpu_comm_work *w;
    if (mgpu__comm_usable(c, fn) != MGPU_OK || mgpu__comm_check_buffer(fn, "data", data, n) != MGPU_OK || mgpu__check_reduce_op(fn, op) != MGPU_OK) return NULL;
    w = (mgpu_comm_work *)mgpu__calloc(sizeof *w, "an asynchronous all-reduce");
    if (!w) return NULL;
    w->comm = c; w->data = data; w->n = n; w->op = op;
    w->device = n > 0 ? device : -1; w->stream = stream;
#ifdef MGPU_CUDA
    if (w->device >= 0) {
        cudaError_t e = cudaSetDevice(w->device);
        if (e == cudaSuccess && stream) {
            e = cudaEventCreateWithFlags((cudaEvent_t *)&w->ready_ev, cudaEventDisableTiming);
            if (e == cudaSuccess) e = cudaEventRecord((cudaEvent_t)w->ready_ev, (cudaStream_t)stream);
        } else if (e == cudaSuccess) e = cudaDeviceSynchronize();
        if (e == cudaSuccess) e = cudaEventCreateWithFlags((cudaEvent_t *)&w->done_ev, cudaEventDisableTiming);
        if (e != cudaSuccess) {
            cudaGetLastError();
            mgpu__comm_work_free(w);
            MGPU__FAIL_NULL(MGPU_ERR_CUDA, "%s: ordering the all-reduce of %lld floats on cuda:%d after their producer failed: %s", fn,
                            (long long)n, device, cudaGetErrorString(e));
        }
    }
#else
    (void)stream;
#endif
    pthread_mutex_lock(&c->mu);
    if (!c->progress_started) {
        c->progress_stop = 0;
        if (pthread_create(&c->progress, NULL, mgpu__comm_progress_main, c) != 0) {
            pthread_mutex_unlock(&c->mu);
            mgpu__comm_work_free(w);
            MGPU__FAIL_NULL(MGPU_ERR_STATE, "%s: cannot start the communicator's progress thread", fn);
        }
        c->progress_started = 1;
    }
    if (c->queue_tail) c->queue_tail->next = w; else c->queue_head = w;
    c->queue_tail = w;
    w->live_next = c->live;
    if (c->live) c->live->live_prev = w;
    c->live = w;
    c->pending++;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    return w;
}

MGPU_API mgpu_comm_work *mgpu_comm_allreduce_f32_async(mgpu_comm *c, float *data, int64_t n, mgpu_reduce_op op) {
    int device = -1;
#ifdef MGPU_CUDA
    if (n > 0 && data) device = mgpu__comm_ptr_device(data);
#endif
    return mgpu__comm_allreduce_async(c, "mgpu_comm_allreduce_f32_async", data, n, op, device, NULL);
}

MGPU_API int mgpu_comm_work_done(const mgpu_comm_work *w) {
    if (!w) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_work_done: work is NULL"); return 0; }
    return __atomic_load_n(&w->done, __ATOMIC_ACQUIRE);
}

/* Waits for w and frees it; a successful collective on device data is also ordered before the work
   queued on `consumer` from now on (NULL: none; the host has waited for it anyway). */
static mgpu_result mgpu__comm_wait(mgpu_comm_work *w, void *consumer) {
    mgpu_comm *c;
    mgpu_result r;
    double deadline;
    if (!w) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_wait: work is NULL");
    c = w->comm;
    pthread_mutex_lock(&c->mu);
    deadline = mgpu__comm_wait_deadline(c);
    while (!w->done && mgpu_time_s() < deadline) mgpu__comm_cond_wait(c, deadline);
    if (w->live_prev) w->live_prev->live_next = w->live_next; else c->live = w->live_next;
    if (w->live_next) w->live_next->live_prev = w->live_prev;
    if (!w->done) {   /* the progress thread frees it when its collective ends */
        int64_t n = w->n;
        w->abandoned = 1;
        pthread_mutex_unlock(&c->mu);
        return mgpu__comm_break(c, MGPU_ERR_TIMEOUT, "mgpu_comm_wait: the asynchronous all-reduce of %lld floats did not finish within %.0f s", (long long)n, c->timeout_s);
    }
    pthread_mutex_unlock(&c->mu);
    r = w->result;
    if (r != MGPU_OK) mgpu__fail(r, "%s", w->msg);
#ifdef MGPU_CUDA
    if (r == MGPU_OK && consumer && w->done_ev) {
        cudaError_t e = cudaSetDevice(w->device);
        if (e == cudaSuccess) e = cudaStreamWaitEvent((cudaStream_t)consumer, (cudaEvent_t)w->done_ev, 0);
        if (e != cudaSuccess) {
            cudaGetLastError();
            r = mgpu__fail(MGPU_ERR_CUDA, "mgpu_comm_wait: ordering the consumer stream after the all-reduce on cuda:%d failed: %s",
                           w->device, cudaGetErrorString(e));
        }
    }
#else
    (void)consumer;
#endif
    mgpu__comm_work_free(w);
    return r;
}

MGPU_API mgpu_result mgpu_comm_wait(mgpu_comm_work *w) { return mgpu__comm_wait(w, NULL); }

/* --------------------------------------------------------------------------------------
   nccl backend (MGPU_CUDA): a non-blocking NCCL communicator, its own stream ordered after the
   stream that produced the data (a tensor's context stream) with an event, and waits that poll
   the completion event and NCCL's asynchronous error until
   the timeout, aborting the communicator on failure. Host buffers are staged through device memory.
   -------------------------------------------------------------------------------------- */
#ifdef MGPU_CUDA

static mgpu_result mgpu__comm_cuda_check(mgpu_comm *c, cudaError_t e, const char *fn, const char *what) {
    if (e == cudaSuccess) return MGPU_OK;
    cudaGetLastError();   /* clear it, so later calls do not report it again */
    if (e == cudaErrorMemoryAllocation) return mgpu__fail(MGPU_ERR_OOM_DEVICE, "%s: %s: out of device memory on cuda:%d", fn, what, c->cuda_device);
    return mgpu__fail(MGPU_ERR_CUDA, "%s: %s failed on cuda:%d: %s", fn, what, c->cuda_device, cudaGetErrorString(e));
}

static mgpu_result mgpu__nccl_unique_id_hex(char *hex, size_t size) {
    ncclUniqueId id;
    ncclResult_t r;
    size_t i;
    if (size < 2 * sizeof id.internal + 1) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_create: NCCL id buffer too small");
    if ((r = ncclGetUniqueId(&id)) != ncclSuccess) return mgpu__fail(MGPU_ERR_NCCL, "mgpu_comm_create: ncclGetUniqueId failed: %s", ncclGetErrorString(r));
    for (i = 0; i < sizeof id.internal; i++) snprintf(hex + 2 * i, 3, "%02x", (unsigned)(unsigned char)id.internal[i]);
    return MGPU_OK;
}

/* Aborts the NCCL communicator (the only way out of a collective that will never finish). */
static void mgpu__nccl_abort(mgpu_comm *c) {
    if (c->nccl) ncclCommAbort(c->nccl);
    c->nccl = NULL;
}

/* Follows a non-blocking NCCL call until it leaves ncclInProgress; errors and the deadline abort. */
static mgpu_result mgpu__nccl_settle(mgpu_comm *c, ncclResult_t r, double deadline, const char *fn, const char *what) {
    while (r == ncclInProgress && c->nccl) {
        if (mgpu_time_s() > deadline) {
            mgpu__nccl_abort(c);
            return mgpu__comm_break(c, MGPU_ERR_TIMEOUT, "%s: %s did not finish within %.0f s on rank %d (a rank may have died or hung; NCCL "
                                    "cannot tell which); the NCCL communicator was aborted", fn, what, c->timeout_s, c->rank);
        }
        mgpu__comm_sleep_s(50e-6);
        if (ncclCommGetAsyncError(c->nccl, &r) != ncclSuccess) r = ncclInternalError;
    }
    if (r != ncclSuccess) {
        char last[256];
        snprintf(last, sizeof last, "%s", c->nccl && ncclGetLastError(c->nccl) ? ncclGetLastError(c->nccl) : "");
        mgpu__nccl_abort(c);
        return mgpu__comm_break(c, MGPU_ERR_NCCL, "%s: %s failed on rank %d: %s%s%s; the NCCL communicator was aborted", fn, what, c->rank,
                                ncclGetErrorString(r), last[0] ? " - " : "", last);
    }
    return MGPU_OK;
}

/* The communicator's own stream and events, on the current device (its own). */
static mgpu_result mgpu__nccl_open_stream(mgpu_comm *c, const char *fn) {
    mgpu_result r;
    if ((r = mgpu__comm_cuda_check(c, cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking), fn, "cudaStreamCreateWithFlags")) != MGPU_OK ||
        (r = mgpu__comm_cuda_check(c, cudaEventCreateWithFlags(&c->ev_ready, cudaEventDisableTiming), fn, "cudaEventCreate")) != MGPU_OK ||
        (r = mgpu__comm_cuda_check(c, cudaEventCreateWithFlags(&c->ev_done, cudaEventDisableTiming), fn, "cudaEventCreate")) != MGPU_OK) return r;
    return MGPU_OK;
}

static mgpu_result mgpu__nccl_init(mgpu_comm *c, const char *id_hex, double deadline) {
    const char *fn = "mgpu_comm_create";
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    ncclUniqueId id;
    mgpu_result r;
    size_t i;
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        cudaGetLastError();
        return mgpu__fail(MGPU_ERR_UNSUPPORTED, "%s: the nccl backend needs a GPU, and rank %d sees none", fn, c->rank);
    }
    /* --gpu-ids names this local rank's device; else local rank i runs on visible device i. Both count
       the devices CUDA_VISIBLE_DEVICES leaves visible, from 0. */
    if (c->gpu_id >= n) {
        const char *vis = getenv("CUDA_VISIBLE_DEVICES");
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: --gpu-ids gives local rank %d device %d, but %d %s visible (CUDA_VISIBLE_DEVICES%s%s%s); "
                          "ids count the visible devices from 0", fn, c->local_rank, c->gpu_id, n, n == 1 ? "is" : "are",
                          vis ? "='" : " unset: all of the host's", vis ? vis : "", vis ? "'" : "");
    }
    if (c->gpu_id < 0 && c->local_rank >= n) {
        const char *vis = getenv("CUDA_VISIBLE_DEVICES");
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: LOCAL_RANK %d has no GPU of its own: %d %s visible (CUDA_VISIBLE_DEVICES%s%s%s) and local rank i "
                          "runs on visible device i; start at most %d ranks on this host, or name each local rank's device with --gpu-ids "
                          "(NCCL cannot put two ranks on one GPU; the shm backend can)", fn, c->local_rank, n, n == 1 ? "is" : "are",
                          vis ? "='" : " unset: all of the host's", vis ? vis : "", vis ? "'" : "", n);
    }
    c->cuda_device = c->gpu_id >= 0 ? c->gpu_id : c->local_rank;
    if ((r = mgpu__comm_cuda_check(c, cudaSetDevice(c->cuda_device), fn, "cudaSetDevice")) != MGPU_OK) return r;
    if (strlen(id_hex) < 2 * sizeof id.internal) return mgpu__fail(MGPU_ERR_FORMAT, "%s: rank %d got a malformed NCCL unique id", fn, c->rank);
    for (i = 0; i < sizeof id.internal; i++) {
        unsigned v = 0;
        if (sscanf(id_hex + 2 * i, "%2x", &v) != 1) return mgpu__fail(MGPU_ERR_FORMAT, "%s: rank %d got a malformed NCCL unique id", fn, c->rank);
        id.internal[i] = (char)v;
    }
    cfg.blocking = 0;   /* calls return at once; every wait below is ours, bounded by the timeout */
    r = mgpu__nccl_settle(c, ncclCommInitRankConfig(&c->nccl, c->world, id, c->rank, &cfg), deadline, fn, "ncclCommInitRank");
    return r != MGPU_OK ? r : mgpu__nccl_open_stream(c, fn);
}

/* n NCCL communicators of this process, rank i on devices[i] (checked: visible, distinct), made
   together in one group from this thread (NCCL's single-process pattern), non-blocking as above. */
static mgpu_result mgpu__nccl_init_group(mgpu_comm **comms, int n, const int *devices, const char *fn) {
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    ncclUniqueId id;
    ncclResult_t gr;
    mgpu_result r = MGPU_OK;
    int i, prev = 0;
    cfg.blocking = 0;
    if ((gr = ncclGetUniqueId(&id)) != ncclSuccess) return mgpu__fail(MGPU_ERR_NCCL, "%s: ncclGetUniqueId failed: %s", fn, ncclGetErrorString(gr));
    if (cudaGetDevice(&prev) != cudaSuccess) cudaGetLastError();
    ncclGroupStart();
    for (i = 0; i < n && r == MGPU_OK; i++) {
        comms[i]->cuda_device = devices[i];
        if ((r = mgpu__comm_cuda_check(comms[i], cudaSetDevice(devices[i]), fn, "cudaSetDevice")) != MGPU_OK) break;
        gr = ncclCommInitRankConfig(&comms[i]->nccl, n, id, i, &cfg);
        if (gr != ncclSuccess && gr != ncclInProgress) r = mgpu__fail(MGPU_ERR_NCCL, "%s: ncclCommInitRank for rank %d on cuda:%d failed: %s", fn, i, devices[i], ncclGetErrorString(gr));
    }
    gr = ncclGroupEnd();
    for (i = 0; i < n && r == MGPU_OK; i++) {
        double deadline = mgpu_time_s() + comms[i]->timeout_s;
        if ((r = mgpu__comm_cuda_check(comms[i], cudaSetDevice(devices[i]), fn, "cudaSetDevice")) != MGPU_OK) break;
        if (!comms[i]->nccl) r = mgpu__fail(MGPU_ERR_NCCL, "%s: ncclCommInitRank gave rank %d no communicator: %s", fn, i, ncclGetErrorString(gr));
        else if ((r = mgpu__nccl_settle(comms[i], gr == ncclSuccess ? ncclInProgress : gr, deadline, fn, "ncclCommInitRank")) == MGPU_OK)
            r = mgpu__nccl_open_stream(comms[i], fn);
    }
    cudaSetDevice(prev);
    return r;
}

static void mgpu__nccl_teardown(mgpu_comm *c) {
    int i;
    if (c->cuda_device >= 0) cudaSetDevice(c->cuda_device);
    if (c->nccl) {
        double deadline = mgpu_time_s() + c->timeout_s;
        ncclResult_t r = ncclCommFinalize(c->nccl);
        while (r == ncclInProgress && mgpu_time_s() < deadline) {
            mgpu__comm_sleep_s(100e-6);
            if (ncclCommGetAsyncError(c->nccl, &r) != ncclSuccess) r = ncclInternalError;
        }
        if (r == ncclSuccess) ncclCommDestroy(c->nccl);
        else ncclCommAbort(c->nccl);
        c->nccl = NULL;
    }
    if (c->ev_ready) cudaEventDestroy(c->ev_ready);
    if (c->ev_done) cudaEventDestroy(c->ev_done);
    if (c->stream) cudaStreamDestroy(c->stream);
    if (c->dev_scratch) cudaFree(c->dev_scratch);
    for (i = 0; i < 3; i++) if (c->pinned[i]) cudaFreeHost(c->pinned[i]);
    c->ev_ready = c->ev_done = NULL; c->stream = NULL; c->dev_scratch = NULL;
}

static int mgpu__comm_is_device_ptr(const void *p) {
    struct cudaPointerAttributes a;
    memset(&a, 0, sizeof a);
    if (!p || cudaPointerGetAttributes(&a, p) != cudaSuccess) { cudaGetLastError(); return 0; }
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}
/* The device whose memory p points into; -1 for host memory (or no CUDA device at all). */
static int mgpu__comm_ptr_device(const void *p) {
    struct cudaPointerAttributes a;
    int n = 0;
    if (!p || cudaGetDeviceCount(&n) != cudaSuccess || n == 0) { cudaGetLastError(); return -1; }
    return mgpu__comm_is_device_ptr(p) && cudaPointerGetAttributes(&a, p) == cudaSuccess && a.device >= 0 ? a.device : -1;
}

/* Orders c->stream (current device: the data's) after the work that produced k's device data:
   the event its issuer recorded, else an event recorded now on its stream, else (a raw pointer,
   producer unknown) all work queued on the device, unless the issuer synchronised already. The
   legacy default stream would not do: it does not wait for the non-blocking streams contexts use. */
static mgpu_result mgpu__comm_order_after_producer(mgpu_comm *c, const mgpu__coll *k, int device_data, const char *fn) {
    mgpu_result r;
    if (k->ready_ev) return mgpu__comm_cuda_check(c, cudaStreamWaitEvent(c->stream, (cudaEvent_t)k->ready_ev, 0), fn, "cudaStreamWaitEvent");
    if (k->stream) {
        if ((r = mgpu__comm_cuda_check(c, cudaEventRecord(c->ev_ready, (cudaStream_t)k->stream), fn, "cudaEventRecord")) != MGPU_OK) return r;
        return mgpu__comm_cuda_check(c, cudaStreamWaitEvent(c->stream, c->ev_ready, 0), fn, "cudaStreamWaitEvent");
    }
    if (device_data && !k->ordered) return mgpu__comm_cuda_check(c, cudaDeviceSynchronize(), fn, "cudaDeviceSynchronize");
    return MGPU_OK;
}

/* shm and threads on device memory (raw buffers, DDP buckets): staged through pinned host memory
   by copies on the communicator's own stream of the data's device, ordered after the data's
   producer; the result goes back before the call returns (the staging buffer is reused) and
   k->done_ev marks it on that stream for the consumers. */
static mgpu_result mgpu__shared_run_staged(mgpu_comm *c, const char *fn, const mgpu__coll *k) {
    size_t bytes = (size_t)k->count * mgpu__comm_elem_bytes(k->dtype);
    mgpu__coll h = *k;
    mgpu_result r, r2;
    if (k->kind != MGPU__COLL_ALLREDUCE)
        return mgpu__fail(MGPU_ERR_UNSUPPORTED, "%s: the %s backend takes device memory for all-reduces only; pass CUDA tensors", fn, mgpu__comm_backend_name(c->backend));
    if (c->cuda_device >= 0 && c->cuda_device != k->dev)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: the data is on cuda:%d, but this %s communicator stages cuda:%d's; use one device per communicator",
                          fn, k->dev, mgpu__comm_backend_name(c->backend), c->cuda_device);
    if (cudaSetDevice(k->dev) != cudaSuccess) { cudaGetLastError(); return mgpu__fail(MGPU_ERR_CUDA, "%s: cannot select cuda:%d", fn, k->dev); }
    if (!c->stream) {
        c->cuda_device = k->dev;
        if ((r = mgpu__comm_cuda_check(c, cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking), fn, "cudaStreamCreateWithFlags")) != MGPU_OK ||
            (r = mgpu__comm_cuda_check(c, cudaEventCreateWithFlags(&c->ev_ready, cudaEventDisableTiming), fn, "cudaEventCreate")) != MGPU_OK) return r;
    }
    if (bytes > c->pinned_bytes[2]) {
        if (c->pinned[2]) cudaFreeHost(c->pinned[2]);
        c->pinned[2] = NULL; c->pinned_bytes[2] = 0;
        if (cudaMallocHost(&c->pinned[2], bytes) != cudaSuccess) {
            cudaGetLastError();
            return mgpu__fail(MGPU_ERR_OOM_HOST, "%s: cannot allocate %zu bytes of pinned host memory to stage device data", fn, bytes);
        }
        c->pinned_bytes[2] = bytes;
    }
    if ((r = mgpu__comm_order_after_producer(c, k, 1, fn)) != MGPU_OK ||
        (r = mgpu__comm_cuda_check(c, cudaMemcpyAsync(c->pinned[2], k->in, bytes, cudaMemcpyDeviceToHost, c->stream), fn, "staging to the host")) != MGPU_OK ||
        (r = mgpu__comm_cuda_check(c, cudaStreamSynchronize(c->stream), fn, "staging to the host")) != MGPU_OK) return r;
    h.in = h.out = c->pinned[2];
    h.dev = -1;
    r = mgpu__shared_run(c, fn, &h);
    if (r == MGPU_OK) r = mgpu__comm_cuda_check(c, cudaMemcpyAsync(k->out, c->pinned[2], bytes, cudaMemcpyHostToDevice, c->stream), fn, "copying the result to the device");
    if (r == MGPU_OK && k->done_ev) r = mgpu__comm_cuda_check(c, cudaEventRecord((cudaEvent_t)k->done_ev, c->stream), fn, "cudaEventRecord");
    r2 = mgpu__comm_cuda_check(c, cudaStreamSynchronize(c->stream), fn, "copying the result to the device");
    return r != MGPU_OK ? r : r2;
}

static ncclDataType_t mgpu__nccl_dtype(int dtype) {
    switch (dtype) {
    case MGPU_F16: return ncclFloat16;
    case MGPU_BF16: return ncclBfloat16;
    case MGPU_I32: return ncclInt32;
    case MGPU_I64: return ncclInt64;
    case MGPU_U8: return ncclUint8;
    case MGPU__DTYPE_F64: return ncclFloat64;
    default: return ncclFloat32;
    }
}

/* Polls the completion event and NCCL's asynchronous error until done or the timeout. */
static mgpu_result mgpu__nccl_wait(mgpu_comm *c, const char *fn, const char *what) {
    double deadline = mgpu_time_s() + c->timeout_s;
    for (;;) {
        cudaError_t e = cudaEventQuery(c->ev_done);
        ncclResult_t ar = ncclSuccess;
        if (e == cudaSuccess) return MGPU_OK;
        if (e != cudaErrorNotReady) {
            mgpu__nccl_abort(c);
            cudaGetLastError();
            return mgpu__comm_break(c, MGPU_ERR_CUDA, "%s: %s failed on cuda:%d: %s; the NCCL communicator was aborted", fn, what, c->cuda_device, cudaGetErrorString(e));
        }
        if (ncclCommGetAsyncError(c->nccl, &ar) != ncclSuccess || (ar != ncclSuccess && ar != ncclInProgress))
            return mgpu__nccl_settle(c, ar == ncclSuccess ? ncclInternalError : ar, deadline, fn, what);
        if (mgpu_time_s() > deadline) {
            mgpu__nccl_abort(c);
            return mgpu__comm_break(c, MGPU_ERR_TIMEOUT, "%s: %s did not complete within %.0f s on rank %d (a rank may have died, hung or issued "
                                    "different collectives; NCCL cannot tell which); the NCCL communicator was aborted", fn, what, c->timeout_s, c->rank);
        }
        mgpu__comm_sleep_s(20e-6);
    }
}

static mgpu_result mgpu__nccl_scratch(mgpu_comm *c, size_t bytes, const char *fn) {
    if (bytes <= c->dev_scratch_bytes) return MGPU_OK;
    if (c->dev_scratch) cudaFree(c->dev_scratch);
    c->dev_scratch = NULL; c->dev_scratch_bytes = 0;
    if (mgpu__comm_cuda_check(c, cudaMalloc(&c->dev_scratch, bytes), fn, "staging buffer") != MGPU_OK) return mgpu_last_result();
    c->dev_scratch_bytes = bytes;
    return MGPU_OK;
}

/* Issues the NCCL call of k on device pointers din/dout. */
static ncclResult_t mgpu__nccl_issue(mgpu_comm *c, const mgpu__coll *k, const void *din, void *dout) {
    ncclRedOp_t op = k->avg ? ncclAvg : ncclSum;
    switch (k->kind) {
    case MGPU__COLL_ALLREDUCE: return ncclAllReduce(din, dout, (size_t)k->count, mgpu__nccl_dtype(k->dtype), op, c->nccl, c->stream);
    case MGPU__COLL_BROADCAST: return ncclBroadcast(din, dout, (size_t)k->count, ncclUint8, k->root, c->nccl, c->stream);
    case MGPU__COLL_ALLGATHER: return ncclAllGather(din, dout, (size_t)k->count, ncclUint8, c->nccl, c->stream);
    case MGPU__COLL_REDUCE_SCATTER: return ncclReduceScatter(din, dout, (size_t)k->count, ncclFloat32, op, c->nccl, c->stream);
    default: return ncclAllReduce(din, dout, 1, ncclFloat32, ncclSum, c->nccl, c->stream);   /* barrier */
    }
}

static mgpu_result mgpu__nccl_run(mgpu_comm *c, const char *fn, const mgpu__coll *k) {
    const char *what = mgpu__coll_name(k->kind);
    size_t in_bytes, out_bytes, in_stage, out_stage;
    const void *din;
    void *dout;
    int in_dev, out_dev, inplace = k->in == k->out;
    mgpu_result r;
    switch (k->kind) {
    case MGPU__COLL_ALLREDUCE: in_bytes = out_bytes = (size_t)k->count * mgpu__comm_elem_bytes(k->dtype); break;
    case MGPU__COLL_BROADCAST: in_bytes = out_bytes = (size_t)k->count; break;
    case MGPU__COLL_ALLGATHER: in_bytes = (size_t)k->count; out_bytes = in_bytes * (size_t)c->world; break;
    case MGPU__COLL_REDUCE_SCATTER: out_bytes = sizeof(float) * (size_t)k->count; in_bytes = out_bytes * (size_t)c->world; break;
    default: in_bytes = out_bytes = 0; break;
    }
    if (!c->nccl) return mgpu__fail(MGPU_ERR_STATE, "%s: the NCCL communicator was aborted earlier", fn);
    if ((r = mgpu__comm_cuda_check(c, cudaSetDevice(c->cuda_device), fn, "cudaSetDevice")) != MGPU_OK) return r;
    in_dev = k->kind != MGPU__COLL_BARRIER && mgpu__comm_is_device_ptr(k->in);
    out_dev = k->kind != MGPU__COLL_BARRIER && mgpu__comm_is_device_ptr(k->out);
    in_stage = in_dev ? 0 : ((MGPU__MAX(in_bytes, sizeof(float)) + 255) & ~(size_t)255);
    out_stage = out_dev || inplace ? 0 : out_bytes;
    if ((r = mgpu__nccl_scratch(c, in_stage + out_stage, fn)) != MGPU_OK) return r;
    din = in_dev ? k->in : c->dev_scratch;
    dout = inplace ? (void *)din : out_dev ? k->out : (void *)((char *)c->dev_scratch + in_stage);
    if ((r = mgpu__comm_order_after_producer(c, k, in_dev || out_dev, fn)) != MGPU_OK) return r;
    if (!in_dev && in_bytes && (r = mgpu__comm_cuda_check(c, cudaMemcpyAsync((void *)din, k->in, in_bytes, cudaMemcpyHostToDevice, c->stream), fn, "staging to the device")) != MGPU_OK) return r;
    if ((r = mgpu__nccl_settle(c, mgpu__nccl_issue(c, k, din, dout), mgpu_time_s() + c->timeout_s, fn, what)) != MGPU_OK) return r;
    if (k->done_ev && (r = mgpu__comm_cuda_check(c, cudaEventRecord((cudaEvent_t)k->done_ev, c->stream), fn, "cudaEventRecord")) != MGPU_OK) return r;
    if ((r = mgpu__comm_cuda_check(c, cudaEventRecord(c->ev_done, c->stream), fn, "cudaEventRecord")) != MGPU_OK) return r;
    if ((r = mgpu__nccl_wait(c, fn, what)) != MGPU_OK) return r;
    /* on the communicator's stream, not the legacy one */
    if (!out_dev && out_bytes && k->kind != MGPU__COLL_BARRIER &&
        ((r = mgpu__comm_cuda_check(c, cudaMemcpyAsync(k->out, dout, out_bytes, cudaMemcpyDeviceToHost, c->stream), fn, "copying the result to the host")) != MGPU_OK ||
         (r = mgpu__comm_cuda_check(c, cudaStreamSynchronize(c->stream), fn, "copying the result to the host")) != MGPU_OK)) return r;
    return MGPU_OK;
}

#endif /* MGPU_CUDA */
/* ======================================================================================
   DDP and DP
   ====================================================================================== */

/* DistributedDataParallel: parameters broadcast from rank 0, gradients bucketed in reverse
   registration order (the order backward makes them ready) and all-reduced asynchronously while
   backward goes on; SyncBatchNorm; dropout masks of the combined batch. DataParallel: the same
   DDP over a `threads` communicator, one replica per thread. */

/* Dropout under DDP: local row j of a batch is row rank + world * j of the combined batch
   (DistributedSampler's sharding); mgpu_op_dropout draws that row's counters. */
static void mgpu__context_set_row_interleave(mgpu_context *ctx, int rank, int world) {
    ctx->row_rank = rank;
    ctx->row_world = world;
}

/* --------------------------------------------------------------------------------------
   Bucket assignment: tensors in the order given (reverse registration order), bucket 0 capped at
   first_cap bytes, the others at cap. A bucket closes once it reaches its cap; a tensor that would
   overflow a non-empty bucket starts the next one, so only a tensor larger than the cap exceeds
   it, and then alone. bucket_of[i] receives tensor i's bucket; returns the bucket count.
   -------------------------------------------------------------------------------------- */

static int mgpu__ddp_assign_buckets(int n, const int64_t *bytes, int64_t first_cap, int64_t cap, int *bucket_of) {
    int i, b = 0, in_bucket = 0;
    int64_t fill = 0;
    for (i = 0; i < n; i++) {
        if (in_bucket > 0 && fill + bytes[i] > (b == 0 ? first_cap : cap)) { b++; fill = 0; in_bucket = 0; }
        bucket_of[i] = b;
        fill += bytes[i];
        in_bucket++;
        if (fill >= (b == 0 ? first_cap : cap)) { b++; fill = 0; in_bucket = 0; }
    }
    return in_bucket > 0 ? b + 1 : b;
}

/* --------------------------------------------------------------------------------------
   State
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__ddp_param {
    struct mgpu_ddp *ddp;     /* the hook's way back */
    mgpu_tensor *t;
    int bucket;
    int64_t offset;           /* first element in the bucket buffer */
    int ready;                /* grad complete in the current backward */
} mgpu__ddp_param;

typedef struct mgpu__ddp_bucket {
    int first, count;         /* its parameters: ddp->params[first, first + count) */
    int *model_index;         /* (count) their indices in the model's parameter list */
    int64_t numel;
    float *buf;               /* (numel) packed gradients, all-reduced in place: in the context's device memory */
    int n_ready;
    mgpu_comm_work *work;     /* in flight, or NULL */
    /* timeline of the current (or last) synced backward */
    int64_t hook_calls;
    double launch_s, done_s;
    int done_before_end;
} mgpu__ddp_bucket;

struct mgpu_ddp {
    mgpu_model *model;
    mgpu_comm *comm;
    mgpu_context *ctx;
    int world;
    mgpu_dtype compress;
    int sync;
    int n_params; mgpu__ddp_param *params;   /* reverse registration order = bucket order */
    int n_buckets; mgpu__ddp_bucket *buckets;
    int next_launch;          /* buckets launch strictly in index order: every rank issues the same sequence */
    int in_backward;          /* a synced backward has started and its end hook has not run */
    int installed;            /* hooks are on the model */
    mgpu_result error;        /* first failure inside a hook (hooks cannot return one) */
    char error_text[1024];
    int64_t allreduces;
    double comm_s, exposed_s, backward_end_s;
};

/* --------------------------------------------------------------------------------------
   Bucket contents, all through twins on the context's stream so buckets work the same on the
   device: gradients packed and unpacked by copies, and under compression the bucket rounded to
   f16/bf16 values (kept in f32 storage), as the gradients would travel in 16 bits. On a CUDA
   context the bucket lives in device memory; its all-reduce runs on the communicator's stream,
   after an event recorded on the context's stream behind the packing copies, and the unpacking
   copies wait for the all-reduce's own event (the shm backend stages the bucket through pinned
   host memory in between).
   -------------------------------------------------------------------------------------- */

static int mgpu__ddp_on_cuda(const mgpu_ddp *d) { return d->ctx->device.type == MGPU_DEVICE_CUDA; }

static float *mgpu__ddp_buf_alloc(mgpu_ddp *d, int64_t numel) {
    size_t bytes = sizeof(float) * (size_t)MGPU__MAX(numel, (int64_t)1);
#ifdef MGPU_CUDA
    if (mgpu__ddp_on_cuda(d)) return (float *)mgpu_cuda_malloc(d->ctx->device.index, bytes);
#endif
    (void)d;
    return (float *)mgpu__alloc(bytes, "a DDP bucket buffer");
}
static void mgpu__ddp_buf_free(mgpu_ddp *d, float *buf) {
    if (!buf) return;
#ifdef MGPU_CUDA
    if (mgpu__ddp_on_cuda(d)) {
        cudaStreamSynchronize((cudaStream_t)d->ctx->cuda_stream);   /* no copy of it still queued */
        mgpu_cuda_free(d->ctx->device.index, buf);
        return;
    }
#endif
    (void)d;
    mgpu_free(buf);
}

/* Whether all n floats at x (the context's memory) are zero; the device's are read back (only for a
   parameter without a gradient on this rank, rare). */
static mgpu_result mgpu__ddp_all_zero(mgpu_ddp *d, const float *x, int64_t n, int *zero) {
    size_t bytes = sizeof(float) * (size_t)MGPU__MAX(n, (int64_t)1);
    float *copy = mgpu__ddp_on_cuda(d) ? (float *)mgpu__alloc(bytes, "a DDP gradient check") : NULL;
    const float *h = copy ? copy : x;
    mgpu_result r = MGPU_OK;
    int64_t k;
    if (mgpu__ddp_on_cuda(d)) {
        if (!copy) return mgpu_last_result();
        r = mgpu__transfer(d->ctx, copy, x, sizeof(float) * (size_t)n, "DDP: reading a reduced gradient back");
        if (r != MGPU_OK) { mgpu_free(copy); return r; }
    }
    for (k = 0; k < n && h[k] == 0.0f; k++) {}
    *zero = k == n;
    mgpu_free(copy);
    return MGPU_OK;
}

/* x = round(x * scale) in the compression format */
static mgpu_result mgpu__ddp_round(mgpu_ddp *d, float *x, int64_t n, float scale) {
    mgpu__round_half_args a;
    a.ctx = d->ctx; a.half = d->compress; a.scale = scale; a.accumulate = 0;
    a.src = x; a.dst = x; a.n = n;
    return MGPU__TWIN(d->ctx, round_half, &a);
}

/* n floats from src to dst */
static mgpu_result mgpu__ddp_copy(mgpu_ddp *d, float *dst, const float *src, int64_t n) {
    mgpu__copy_args a;
    a.ctx = d->ctx; a.src = src; a.dst = dst; a.bytes = sizeof(float) * (size_t)n;
    return MGPU__TWIN(d->ctx, copy, &a);
}
static mgpu_result mgpu__ddp_zero(mgpu_ddp *d, float *dst, int64_t n) {
    mgpu__fill_args a;
    a.ctx = d->ctx; a.dst = dst; a.dtype = MGPU_F32; a.n = n; a.value = 0.0;
    return MGPU__TWIN(d->ctx, fill, &a);
}

/* --------------------------------------------------------------------------------------
   Backward: grad-ready hooks launch buckets, the end hook waits and unpacks
   -------------------------------------------------------------------------------------- */

static void mgpu__ddp_record_error(mgpu_ddp *d, mgpu_result r) {
    if (d->error != MGPU_OK) return;
    d->error = r;
    snprintf(d->error_text, sizeof d->error_text, "%s", mgpu_last_error());
}

/* Clears the previous backward's timeline when a synced backward starts. */
static void mgpu__ddp_begin_backward(mgpu_ddp *d) {
    int i;
    if (d->in_backward) return;
    d->in_backward = 1;
    d->backward_end_s = 0;
    for (i = 0; i < d->n_buckets; i++) {
        mgpu__ddp_bucket *b = &d->buckets[i];
        b->hook_calls = 0; b->launch_s = 0; b->done_s = 0; b->done_before_end = 0;
    }
}

/* Packs the bucket's current gradients (a parameter without one contributes zeros, as with
   find_unused_parameters) and issues its all-reduce. Under compression PyTorch's fp16/bf16 hooks
   divide by the world size before rounding (so the sum cannot overflow) and then sum. */
static void mgpu__ddp_launch(mgpu_ddp *d, mgpu__ddp_bucket *b) {
    mgpu_result r = MGPU_OK;
    int i;
    for (i = b->first; i < b->first + b->count && r == MGPU_OK; i++) {
        const mgpu__ddp_param *p = &d->params[i];
        float *dst = b->buf + p->offset;
        r = p->t->grad ? mgpu__ddp_copy(d, dst, (const float *)p->t->grad->data, p->t->numel) : mgpu__ddp_zero(d, dst, p->t->numel);
    }
    if (r == MGPU_OK && d->compress != MGPU_F32) r = mgpu__ddp_round(d, b->buf, b->numel, 1.0f / (float)d->world);
    if (r != MGPU_OK) mgpu__ddp_record_error(d, r);   /* the all-reduce still goes out: every rank issues the same sequence */
    b->launch_s = mgpu_time_s();
    /* ordered after the copies just queued on the context's stream (an event, not a host sync) */
    b->work = mgpu__comm_allreduce_async(d->comm, "DDP bucket all-reduce", b->buf, b->numel, d->compress != MGPU_F32 ? MGPU_REDUCE_SUM : MGPU_REDUCE_AVG,
                                         mgpu__ddp_on_cuda(d) ? d->ctx->device.index : -1, d->ctx->cuda_stream);
    if (!b->work) mgpu__ddp_record_error(d, mgpu_last_result() != MGPU_OK ? mgpu_last_result() : MGPU_ERR_STATE);
    d->allreduces++;
}

/* Launches the next buckets in index order while they are complete (all = 1: every one left). */
static void mgpu__ddp_launch_in_order(mgpu_ddp *d, int all) {
    while (d->next_launch < d->n_buckets) {
        mgpu__ddp_bucket *b = &d->buckets[d->next_launch];
        if (!all && b->n_ready < b->count) break;
        mgpu__ddp_launch(d, b);
        d->next_launch++;
    }
}

/* Notes when in-flight all-reduces completed (the timeline; the wait still collects them). */
static void mgpu__ddp_poll(mgpu_ddp *d) {
    int i;
    for (i = 0; i < d->next_launch; i++) {
        mgpu__ddp_bucket *b = &d->buckets[i];
        if (b->work && b->done_s == 0 && mgpu_comm_work_done(b->work)) b->done_s = mgpu_time_s();
    }
}

/* Fired by mgpu_backward once per parameter when its last contribution of this backward arrived. */
static void mgpu__ddp_grad_ready(mgpu_tensor *t, void *user) {
    mgpu__ddp_param *p = (mgpu__ddp_param *)user;
    mgpu_ddp *d = p->ddp;
    mgpu__ddp_bucket *b = &d->buckets[p->bucket];
    (void)t;
    if (!d->sync) return;   /* no_sync: gradients accumulate locally */
    mgpu__ddp_begin_backward(d);
    b->hook_calls++;
    if (!p->ready) {
        p->ready = 1;
        if (++b->n_ready == b->count) mgpu__ddp_launch_in_order(d, 0);
    }
    mgpu__ddp_poll(d);
}

/* Copies the averaged bucket back into the parameters' grads. A parameter without a grad gets
   one only if some rank had a non-zero gradient for it, so a parameter unused everywhere keeps
   grad NULL, as in one process. */
static mgpu_result mgpu__ddp_unpack(mgpu_ddp *d, mgpu__ddp_bucket *b) {
    int i;
    mgpu_result r;
    if (d->compress != MGPU_F32 && (r = mgpu__ddp_round(d, b->buf, b->numel, 1.0f)) != MGPU_OK) return r;
    for (i = b->first; i < b->first + b->count; i++) {
        mgpu__ddp_param *p = &d->params[i];
        const float *src = b->buf + p->offset;
        if (!p->t->grad) {
            int zero = 0;
            if ((r = mgpu__ddp_all_zero(d, src, p->t->numel, &zero)) != MGPU_OK) return r;
            if (zero) continue;
            if (!mgpu__grad_f32(d->ctx, p->t)) return mgpu_last_result();
        }
        if ((r = mgpu__ddp_copy(d, (float *)p->t->grad->data, src, p->t->numel)) != MGPU_OK) return r;
    }
    return MGPU_OK;
}

/* Waits for bucket b (in launch order) and unpacks it. The progress thread's time is charged
   from the later of its launch and the previous bucket's completion to its own completion. */
static void mgpu__ddp_finish_bucket(mgpu_ddp *d, mgpu__ddp_bucket *b, double *busy_until) {
    double wait_start = mgpu_time_s();
    mgpu_result r;
    if (!b->work) return;
    r = mgpu__comm_wait(b->work, d->ctx->cuda_stream);   /* and the context's stream waits for the all-reduce's event */
    b->work = NULL;
    if (b->done_s == 0) b->done_s = mgpu_time_s();
    d->exposed_s += mgpu_time_s() - wait_start;
    d->comm_s += MGPU__MAX(0.0, b->done_s - MGPU__MAX(b->launch_s, *busy_until));
    *busy_until = b->done_s;
    if (r == MGPU_OK) r = mgpu__ddp_unpack(d, b);
    if (r != MGPU_OK) mgpu__ddp_record_error(d, r);
}

static void mgpu__ddp_reset_backward(mgpu_ddp *d) {
    int i;
    for (i = 0; i < d->n_params; i++) d->params[i].ready = 0;
    for (i = 0; i < d->n_buckets; i++) { d->buckets[i].n_ready = 0; d->buckets[i].work = NULL; }
    d->next_launch = 0;
    d->in_backward = 0;
}

/* End of every successful backward on the model's context: launch what is left (buckets of
   unused parameters), wait for everything, unpack. After it the grads are identical on every rank. */
static mgpu_result mgpu__ddp_backward_end(mgpu_context *ctx, void *user) {
    mgpu_ddp *d = (mgpu_ddp *)user;
    double busy_until = 0;
    mgpu_result r;
    int i;
    (void)ctx;
    if (!d->sync) return MGPU_OK;
    mgpu__ddp_begin_backward(d);
    mgpu__ddp_poll(d);
    d->backward_end_s = mgpu_time_s();
    for (i = 0; i < d->n_buckets; i++) d->buckets[i].done_before_end = d->buckets[i].done_s != 0;
    mgpu__ddp_launch_in_order(d, 1);
    for (i = 0; i < d->n_buckets; i++) mgpu__ddp_finish_bucket(d, &d->buckets[i], &busy_until);
    mgpu__ddp_reset_backward(d);
    r = d->error;
    if (r != MGPU_OK) {
        mgpu__fail(r, "DDP gradient all-reduce failed: %s", d->error_text);
        d->error = MGPU_OK;
    }
    return r;
}

/* --------------------------------------------------------------------------------------
   Construction: the same model on every rank, rank 0's values everywhere
   -------------------------------------------------------------------------------------- */

/* The model's tensors as one list: parameters, then buffers. */
static int mgpu__ddp_num_tensors(const mgpu_model *m) { return mgpu_model_num_parameters(m) + mgpu_model_num_buffers(m); }
static mgpu_tensor *mgpu__ddp_tensor_at(const mgpu_model *m, int i, const char **name) {
    int np = mgpu_model_num_parameters(m);
    return i < np ? mgpu_model_parameter(m, i, name) : mgpu_model_buffer(m, i - np, name);
}

static uint64_t mgpu__fnv1a(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = (const unsigned char *)data;
    size_t i;
    for (i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ULL; }
    return h;
}

/* What must agree across ranks about tensor i: kind, name, dtype, shape, requires_grad. */
static uint64_t mgpu__ddp_tensor_hash(const mgpu_model *m, int i) {
    const char *name = NULL;
    const mgpu_tensor *t = mgpu__ddp_tensor_at(m, i, &name);
    int32_t head[4];
    uint64_t h = 0xcbf29ce484222325ULL;
    head[0] = i < mgpu_model_num_parameters(m); head[1] = (int32_t)t->dtype; head[2] = t->ndim; head[3] = t->requires_grad;
    h = mgpu__fnv1a(h, name, strlen(name) + 1);
    h = mgpu__fnv1a(h, head, sizeof head);
    h = mgpu__fnv1a(h, t->shape, sizeof(int64_t) * (size_t)t->ndim);
    return h | 1;   /* never 0: 0 pads a shorter list */
}

static void mgpu__ddp_describe(const mgpu_model *m, int i, char *buf, size_t size) {
    const char *name = NULL;
    const mgpu_tensor *t;
    if (i >= mgpu__ddp_num_tensors(m)) { snprintf(buf, size, "absent (the model has only %d tensors)", mgpu__ddp_num_tensors(m)); return; }
    t = mgpu__ddp_tensor_at(m, i, &name);
    snprintf(buf, size, "%s '%s' %s %s", i < mgpu_model_num_parameters(m) ? "parameter" : "buffer", name,
             mgpu_dtype_name(t->dtype), mgpu__shape_str(t));
}

#define MGPU__DDP_DESC_BYTES 256

/* Every rank learns where the first rank disagreeing with rank 0 differs, and names the tensor
   as each of the two ranks has it. */
static mgpu_result mgpu__ddp_report_mismatch(mgpu_comm *c, const mgpu_model *m, int world, int index, int rank) {
    char *all = (char *)mgpu__calloc((size_t)world * MGPU__DDP_DESC_BYTES, "DDP model check");
    char mine[MGPU__DDP_DESC_BYTES];
    mgpu_result r;
    memset(mine, 0, sizeof mine);
    if (!all) return mgpu_last_result();
    mgpu__ddp_describe(m, index, mine, sizeof mine);
    r = mgpu_comm_allgather_bytes(c, mine, sizeof mine, all);
    if (r == MGPU_OK)
        r = mgpu__fail(MGPU_ERR_SHAPE, "mgpu_ddp_create: the model differs across ranks: tensor #%d is %s on rank 0 but %s on rank %d; "
                       "build the same model on every rank", index, all, all + (size_t)rank * MGPU__DDP_DESC_BYTES, rank);
    mgpu_free(all);
    return r;
}

/* Names, kinds, dtypes and shapes of all tensors agree on every rank (compared as hashes). */
static mgpu_result mgpu__ddp_check_models(mgpu_comm *c, const mgpu_model *m, int world) {
    int64_t count = mgpu__ddp_num_tensors(m), most = 0, *counts;
    uint64_t *hashes = NULL;
    mgpu_result r;
    int64_t i;
    int rk;
    counts = (int64_t *)mgpu__alloc(sizeof(int64_t) * (size_t)world, "DDP model check");
    if (!counts) return mgpu_last_result();
    r = mgpu_comm_allgather_bytes(c, &count, sizeof count, counts);
    for (rk = 0; r == MGPU_OK && rk < world; rk++) most = MGPU__MAX(most, counts[rk]);
    if (r == MGPU_OK && most > 0) {
        uint64_t *mine = (uint64_t *)mgpu__calloc(sizeof(uint64_t) * (size_t)most, "DDP model check");
        hashes = mine ? (uint64_t *)mgpu__alloc(sizeof(uint64_t) * (size_t)(most * world), "DDP model check") : NULL;
        if (!hashes) r = mgpu_last_result();
        for (i = 0; hashes && i < count; i++) mine[i] = mgpu__ddp_tensor_hash(m, (int)i);
        if (r == MGPU_OK) r = mgpu_comm_allgather_bytes(c, mine, sizeof(uint64_t) * (size_t)most, hashes);
        mgpu_free(mine);
    }
    for (i = 0; r == MGPU_OK && i < most; i++)
        for (rk = 1; rk < world; rk++)
            if (hashes[(int64_t)rk * most + i] != hashes[i]) { r = mgpu__ddp_report_mismatch(c, m, world, (int)i, rk); break; }
    mgpu_free(hashes);
    mgpu_free(counts);
    return r;
}

static mgpu_result mgpu__ddp_broadcast_state(mgpu_comm *c, const mgpu_model *m) {
    int i, n = mgpu__ddp_num_tensors(m);
    for (i = 0; i < n; i++) {
        mgpu_result r = mgpu_comm_broadcast(c, mgpu__ddp_tensor_at(m, i, NULL), 0);
        if (r != MGPU_OK) return r;
    }
    return MGPU_OK;
}

/* The parameters that take gradients, in reverse registration order, grouped into buckets. */
static mgpu_result mgpu__ddp_build_buckets(mgpu_ddp *d, double first_mb, double cap_mb) {
    int np = mgpu_model_num_parameters(d->model), i, n = 0;
    int64_t *bytes = (int64_t *)mgpu__alloc(sizeof(int64_t) * (size_t)(np + 1), "DDP buckets");
    int *bucket_of = (int *)mgpu__alloc(sizeof(int) * (size_t)(np + 1), "DDP buckets");
    int *index = (int *)mgpu__alloc(sizeof(int) * (size_t)(np + 1), "DDP buckets");
    mgpu_result r = MGPU_OK;
    d->params = (mgpu__ddp_param *)mgpu__calloc(sizeof(mgpu__ddp_param) * (size_t)(np + 1), "DDP parameters");
    if (!bytes || !bucket_of || !index || !d->params) r = mgpu_last_result();
    for (i = np - 1; r == MGPU_OK && i >= 0; i--) {
        mgpu_tensor *t = mgpu_model_parameter(d->model, i, NULL);
        if (!t->requires_grad) continue;   /* frozen: never has a gradient to share */
        d->params[n].ddp = d; d->params[n].t = t;
        bytes[n] = (int64_t)sizeof(float) * t->numel;
        index[n++] = i;
    }
    d->n_params = n;
    if (r == MGPU_OK) {
        d->n_buckets = mgpu__ddp_assign_buckets(n, bytes, (int64_t)(first_mb * 1048576.0), (int64_t)(cap_mb * 1048576.0), bucket_of);
        d->buckets = (mgpu__ddp_bucket *)mgpu__calloc(sizeof(mgpu__ddp_bucket) * (size_t)(d->n_buckets + 1), "DDP buckets");
        if (!d->buckets) r = mgpu_last_result();
    }
    for (i = 0; r == MGPU_OK && i < n; i++) {
        mgpu__ddp_bucket *b = &d->buckets[bucket_of[i]];
        if (b->count == 0) b->first = i;
        d->params[i].bucket = bucket_of[i];
        d->params[i].offset = b->numel;
        b->numel += d->params[i].t->numel;
        b->count++;
    }
    for (i = 0; r == MGPU_OK && i < d->n_buckets; i++) {
        mgpu__ddp_bucket *b = &d->buckets[i];
        b->buf = mgpu__ddp_buf_alloc(d, b->numel);
        b->model_index = (int *)mgpu__alloc(sizeof(int) * (size_t)b->count, "a DDP bucket");
        if (!b->buf || !b->model_index) { r = mgpu_last_result(); break; }
        memcpy(b->model_index, index + b->first, sizeof(int) * (size_t)b->count);
    }
    mgpu_free(bytes); mgpu_free(bucket_of); mgpu_free(index);
    return r;
}

/* Hooks and settings DDP puts on the model and its context; on = 0 removes them. */
static void mgpu__ddp_install(mgpu_ddp *d, int on, int sync_batchnorm) {
    int i;
    d->installed = on;
    for (i = 0; i < d->n_params; i++)
        mgpu_tensor_set_grad_hook(d->params[i].t, on ? mgpu__ddp_grad_ready : NULL, on ? &d->params[i] : NULL);
    if (on) mgpu_context_set_backward_end_hook(d->ctx, mgpu__ddp_backward_end, d);
    else if (d->ctx->backward_end_user == d) mgpu_context_set_backward_end_hook(d->ctx, NULL, NULL);
    mgpu__context_set_row_interleave(d->ctx, on ? mgpu_comm_rank(d->comm) : 0, on ? d->world : 1);
    for (i = 0; i < d->model->n_batchnorms; i++)
        if (!on || sync_batchnorm) d->model->batchnorms[i]->sync_comm = on ? d->comm : NULL;
}

static mgpu_result mgpu__ddp_check_desc(const mgpu_ddp_desc *desc) {
    const char *fn = "mgpu_ddp_create";
    if (!(desc->bucket_cap_mb >= 0 && desc->bucket_cap_mb < 1e6))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->bucket_cap_mb is %g, must be in [0, 1e6) (0: 25)", fn, desc->bucket_cap_mb);
    if (!(desc->first_bucket_mb >= 0 && desc->first_bucket_mb < 1e6))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->first_bucket_mb is %g, must be in [0, 1e6) (0: 1)", fn, desc->first_bucket_mb);
    if (desc->compress != MGPU_F32 && desc->compress != MGPU_F16 && desc->compress != MGPU_BF16)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->compress is %s, must be F32 (none), F16 or BF16", fn, mgpu_dtype_name(desc->compress));
    return MGPU_OK;
}

MGPU_API void mgpu_ddp_destroy(mgpu_ddp *d) {
    int i;
    if (!d) return;
    for (i = 0; i < d->n_buckets && d->buckets; i++) {
        if (d->buckets[i].work) mgpu__comm_wait(d->buckets[i].work, d->ctx->cuda_stream);   /* a backward that failed midway */
        mgpu__ddp_buf_free(d, d->buckets[i].buf);
        mgpu_free(d->buckets[i].model_index);
    }
    if (d->installed) mgpu__ddp_install(d, 0, 0);
    mgpu_free(d->buckets);
    mgpu_free(d->params);
    mgpu_free(d);
}

MGPU_API mgpu_ddp *mgpu_ddp_create(mgpu_model *m, mgpu_comm *c, const mgpu_ddp_desc *desc) {
    const char *fn = "mgpu_ddp_create";
    mgpu_ddp_desc dd;
    mgpu_ddp *d;
    if (!m || !c) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: model and communicator must not be NULL", fn);
    if (desc) dd = *desc; else memset(&dd, 0, sizeof dd);
    if (mgpu__ddp_check_desc(&dd) != MGPU_OK) return NULL;
    if (m->ctx->backward_end)
        MGPU__FAIL_NULL(MGPU_ERR_STATE, "%s: the model's context already has a backward-end hook (another DDP on this context?); destroy it first", fn);
    if (mgpu_comm_world_size(c) < 1) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "%s: the communicator has no ranks", fn);
    /* collectives first, in the same order on every rank, before anything can fail locally */
    if (mgpu__ddp_check_models(c, m, mgpu_comm_world_size(c)) != MGPU_OK) return NULL;
    if (mgpu__ddp_broadcast_state(c, m) != MGPU_OK) return NULL;
    d = (mgpu_ddp *)mgpu__calloc(sizeof *d, "a DDP");
    if (!d) return NULL;
    d->model = m; d->comm = c; d->ctx = m->ctx;
    d->world = mgpu_comm_world_size(c);
    d->compress = dd.compress;
    d->sync = 1;
    if (mgpu__ddp_build_buckets(d, dd.first_bucket_mb > 0 ? dd.first_bucket_mb : 1.0, dd.bucket_cap_mb > 0 ? dd.bucket_cap_mb : 25.0) != MGPU_OK) {
        mgpu_ddp_destroy(d);
        return NULL;
    }
    mgpu__ddp_install(d, 1, dd.sync_batchnorm);
    return d;
}

MGPU_API void mgpu_ddp_set_sync(mgpu_ddp *d, int sync) {
    if (d) d->sync = sync != 0;
}

MGPU_API void mgpu_ddp_get_stats(const mgpu_ddp *d, mgpu_ddp_stats *out) {
    int i;
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (!d) return;
    out->buckets = d->n_buckets;
    out->allreduces = d->allreduces;
    out->comm_s = d->comm_s;
    out->exposed_s = d->exposed_s;
    for (i = 0; i < d->n_buckets; i++)
        out->bytes_per_step += (double)d->buckets[i].numel * (d->compress == MGPU_F32 ? 4.0 : 2.0);
}

MGPU_API mgpu_result mgpu_ddp_get_bucket(const mgpu_ddp *d, int b, mgpu_ddp_bucket_info *out) {
    const mgpu__ddp_bucket *k;
    if (!d || !out) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_ddp_get_bucket: ddp and out must not be NULL");
    if (b < 0 || b >= d->n_buckets) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_ddp_get_bucket: bucket %d outside [0, %d)", b, d->n_buckets);
    k = &d->buckets[b];
    memset(out, 0, sizeof *out);
    out->n_params = k->count;
    out->params = k->model_index;
    out->numel = k->numel;
    out->hook_calls = k->hook_calls;
    out->launch_s = k->launch_s;
    out->done_s = k->done_s;
    out->backward_end_s = d->backward_end_s;
    out->done_before_end = k->done_before_end;
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   DataParallel: one process, n replicas as threads, each a rank of a `threads` communicator
   running the same DDP (see mgpu_dp_run's declaration).
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__dp_replica {
    int rank;
    mgpu_comm *comm;
    mgpu_dp_replica_fn main_fn;
    void *arg;
    mgpu_result result;
    char error[1024];         /* errors are per thread: carried back to the caller */
} mgpu__dp_replica;

static void *mgpu__dp_replica_thread(void *p) {
    mgpu__dp_replica *r = (mgpu__dp_replica *)p;
    mgpu_clear_error();
    r->result = r->main_fn(r->rank, r->comm, r->arg);
    if (r->result != MGPU_OK) snprintf(r->error, sizeof r->error, "%s", mgpu_last_error());
    return NULL;
}

/* Starts ranks 1..n-1 on threads; returns how many started (a failure leaves the rest unstarted). */
static int mgpu__dp_start(mgpu__dp_replica *reps, pthread_t *threads, int n) {
    int i;
    for (i = 1; i < n; i++)
        if (pthread_create(&threads[i], NULL, mgpu__dp_replica_thread, &reps[i]) != 0) {
            mgpu__fail(MGPU_ERR_STATE, "mgpu_dp_run: could not start the thread of replica %d", i);
            return i - 1;
        }
    return n - 1;
}

/* The replica to blame: the lowest failing rank, preferring a real error over the timeouts it
   causes in the replicas left waiting for it; -1 if all succeeded. */
static int mgpu__dp_root_failure(const mgpu__dp_replica *reps, int n) {
    int i, timed_out = -1;
    for (i = 0; i < n; i++) {
        if (reps[i].result == MGPU_OK) continue;
        if (reps[i].result != MGPU_ERR_TIMEOUT) return i;
        if (timed_out < 0) timed_out = i;
    }
    return timed_out;
}

MGPU_API mgpu_result mgpu_dp_run(int n_replicas, mgpu_dp_replica_fn replica_main, void *arg) {
    return mgpu_dp_run_devices(n_replicas, NULL, replica_main, arg);
}

MGPU_API mgpu_result mgpu_dp_run_devices(int n_replicas, const int *cuda_devices, mgpu_dp_replica_fn replica_main, void *arg) {
    mgpu__dp_replica *reps;
    mgpu_comm **comms;
    pthread_t *threads;
    mgpu_result r = MGPU_OK;
    int i, started = 0;
    if (n_replicas < 1 || n_replicas > 1024 || !replica_main)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dp_run: need 1..1024 replicas and a replica function, got %d replicas%s",
                          n_replicas, replica_main ? "" : " and no function");
    reps = (mgpu__dp_replica *)mgpu__calloc(sizeof *reps * (size_t)n_replicas, "DataParallel replicas");
    comms = (mgpu_comm **)mgpu__calloc(sizeof *comms * (size_t)n_replicas, "DataParallel replicas");
    threads = (pthread_t *)mgpu__calloc(sizeof *threads * (size_t)n_replicas, "DataParallel replicas");
    if (!reps || !comms || !threads) r = mgpu_last_result();
    if (r == MGPU_OK) r = cuda_devices ? mgpu_comm_create_nccl_threads(n_replicas, cuda_devices, 0, comms) : mgpu_comm_create_threads(n_replicas, 0, comms);
    for (i = 0; r == MGPU_OK && i < n_replicas; i++) {
        reps[i].rank = i; reps[i].comm = comms[i]; reps[i].main_fn = replica_main; reps[i].arg = arg;
    }
    if (r == MGPU_OK) {
        started = mgpu__dp_start(reps, threads, n_replicas);
        /* if a thread failed to start, the started ones end through the communicator's timeout */
        if (started == n_replicas - 1) mgpu__dp_replica_thread(&reps[0]);
        else r = mgpu_last_result();
        for (i = 1; i <= started; i++) pthread_join(threads[i], NULL);
    }
    if (r == MGPU_OK && (i = mgpu__dp_root_failure(reps, n_replicas)) >= 0)
        r = mgpu__fail(reps[i].result, "DataParallel replica %d: %s", i, reps[i].error);
    for (i = 0; comms && i < n_replicas; i++) mgpu_comm_destroy(comms[i]);
    mgpu_free(reps); mgpu_free(comms); mgpu_free(threads);
    return r;
}
/* ======================================================================================
   Trainer
   ====================================================================================== */

/* -- the training loop shared by the examples.

   One run is a sequence of optimizer steps; checkpoints are taken only between steps, and hold
   everything the loop depends on (weights, optimizer moments and step counts, RNG, loss scaler,
   position in the epoch, the epoch's running sums, metrics so far), so a run interrupted at any
   moment and resumed with --resume auto ends with the same weights, bit for bit on the CPU, as
   one that never stopped. Steps skipped by the fp16 loss scaler still count as steps (for the
   LR schedule, --max-steps and checkpoint names), as the LR scheduler steps on in PyTorch's AMP
   recipe and the Hugging Face Trainer's global_step counts them. */

struct mgpu_trainer {
    const mgpu_train_opts *opts;
    mgpu_context *ctx;
    int rank, world_size;      /* checkpoints, metrics and the final model come from rank 0 only */
    mgpu_comm *comm;           /* DDP's communicator: world_size > 1, or --multi-gpu ddp at world size 1 */
    mgpu_amp_mode amp;
    int launched;              /* a launcher's variables are set (WORLD_SIZE, SLURM_PROCID, OMPI_...) */
    int dp_replicas;           /* --multi-gpu dp: replicas (threads) in this process; 0 otherwise */
    int local_rank;            /* under a launcher: LOCAL_RANK (picks this rank's GPU) */
};

/* --multi-gpu against the environment, before anything is built: dp runs one process with one
   replica per --gpu-ids entry (a CPU build runs CPU replicas: testable DP); ddp needs a launcher,
   as torch.distributed's env:// initialisation does (WORLD_SIZE=1 is DDP at world size 1, as
   torchrun --nproc-per-node 1 gives); none under a launcher would have every process train alone
   on the whole dataset, which is never what was meant. */
static mgpu_result mgpu__trainer_check_mode(const mgpu_train_opts *o, const mgpu_trainer *t, int *replicas) {
    *replicas = 0;
    switch (o->multi_gpu) {
    case MGPU_MULTI_GPU_AUTO: return MGPU_OK;
    case MGPU_MULTI_GPU_NONE:
        if (t->world_size > 1)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "--multi-gpu none trains in one process, but a launcher started %d (WORLD_SIZE=%d): "
                              "each would train alone on the whole dataset; use --multi-gpu ddp (or auto), or start one process", t->world_size, t->world_size);
        return MGPU_OK;
    case MGPU_MULTI_GPU_DDP:
        if (!t->launched)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "--multi-gpu ddp needs a launcher that sets WORLD_SIZE and RANK (none is set): "
                              "run under `mgpurun --nproc-per-node N` (or torchrun-style variables, srun); for one process use --multi-gpu auto or none");
        return MGPU_OK;
    case MGPU_MULTI_GPU_DP:
        if (t->world_size > 1)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "--multi-gpu dp runs in one process; under a launcher (WORLD_SIZE=%d) use DDP (--multi-gpu ddp or auto)", t->world_size);
        if (o->num_gpu_ids < 1)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "--multi-gpu dp needs --gpu-ids (e.g. --gpu-ids 0,1): one replica per id");
        *replicas = o->num_gpu_ids;
        return MGPU_OK;
    }
    return mgpu__fail(MGPU_ERR_INVALID_ARG, "--multi-gpu: mode %d is not auto, none, dp or ddp", (int)o->multi_gpu);
}

/* Under a launcher (WORLD_SIZE > 1) DDP is chosen automatically, and --multi-gpu ddp asks for it
   at any world size: one communicator per process, shared memory between the processes of the
   host (CPU tensors). */
static mgpu_result mgpu__trainer_connect(mgpu_trainer *t) {
    mgpu_comm_desc cd;
    if (t->world_size <= 1 && t->opts->multi_gpu != MGPU_MULTI_GPU_DDP) return MGPU_OK;
    memset(&cd, 0, sizeof cd);
    cd.backend = t->ctx->device.type == MGPU_DEVICE_CUDA ? MGPU_COMM_NCCL : MGPU_COMM_SHM;
    /* MGPU_DIST_BACKEND=shm lets several processes share one GPU (NCCL refuses two ranks on one
       device): gradients are staged through pinned host memory, as torch's gloo backend does */
    if (getenv("MGPU_DIST_BACKEND") && *getenv("MGPU_DIST_BACKEND")) {
        const char *b = getenv("MGPU_DIST_BACKEND");
        if (strcmp(b, "shm") == 0) cd.backend = MGPU_COMM_SHM;
        else if (strcmp(b, "nccl") == 0) cd.backend = MGPU_COMM_NCCL;
        else return mgpu__fail(MGPU_ERR_INVALID_ARG, "MGPU_DIST_BACKEND='%s': expected shm or nccl", b);
    }
    cd.gpu_ids = t->opts->num_gpu_ids > 0 ? t->opts->gpu_ids : NULL;
    cd.num_gpu_ids = t->opts->num_gpu_ids;
    t->comm = mgpu_comm_create(&cd);
    return t->comm ? MGPU_OK : mgpu_last_result();
}

/* rank and world size from the environment; a build without the distributed layer is one process. */
static mgpu_result mgpu__trainer_read_env(mgpu_trainer *t) {
    mgpu_dist_env env;
    mgpu_result r;
    memset(&env, 0, sizeof env);
    t->rank = 0; t->world_size = 1;
    r = mgpu_dist_env_read(&env);
    if (r == MGPU_ERR_UNSUPPORTED) { mgpu_clear_error(); return MGPU_OK; }
    if (r != MGPU_OK) return r;
    t->rank = env.rank;
    t->world_size = env.world_size > 0 ? env.world_size : 1;
    t->launched = env.source && strcmp(env.source, "single") != 0;
    t->local_rank = env.local_rank;
    return MGPU_OK;
}

/* GPUs --multi-gpu auto would use without a launcher: the --gpu-ids entries, else every visible
   device; 0 when the run is not on a GPU (--device cpu, or none visible, or a CPU build). */
static int mgpu__trainer_gpus_to_use(const mgpu_train_opts *o, const mgpu_device *dev) {
    int visible;
    if (dev->type != MGPU_DEVICE_CUDA) return 0;
    if (o->num_gpu_ids > 0) return o->num_gpu_ids;
    visible = mgpu_cuda_device_count();
    return visible > 0 ? visible : 0;
}

/* --multi-gpu auto without a launcher and several GPUs: this process becomes the supervisor of one
   DDP worker per GPU, each running this same command line (torch.multiprocessing.spawn's way; the
   workers see WORLD_SIZE and train as DDP), and exits with the group's code. --device cuda:N names
   one GPU: plain training there. Returns only when there is nothing to launch. */
static mgpu_result mgpu__trainer_self_launch(const mgpu_trainer *t, const mgpu_device *dev) {
    const mgpu_train_opts *o = t->opts;
    mgpu_worker_group_desc gd;
    const char *slash;
    int n = mgpu__trainer_gpus_to_use(o, dev), code;
    if (o->multi_gpu != MGPU_MULTI_GPU_AUTO || t->launched || o->device_index >= 0 || n < 2) return MGPU_OK;
    if (!o->argv || o->argc < 1 || !o->argv[0]) {
        mgpu_log(MGPU_LOG_WARN, "%d GPUs to use, but the options carry no command line to start workers with (filled by hand, "
                 "not by mgpu_train_opts_parse): training on one; run under mgpurun for DDP", n);
        return MGPU_OK;
    }
    slash = strrchr(o->argv[0], '/');
    memset(&gd, 0, sizeof gd);
    gd.argv = o->argv; gd.n = n; gd.label = slash ? slash + 1 : o->argv[0]; gd.rank0_stdout_only = 1;
    fflush(stdout);
    fflush(stderr);
    code = mgpu_worker_group_run(&gd);
    if (code < 0) {
        fprintf(stderr, "%s: error: %s\n", gd.label, mgpu_last_error());
        code = 1;
    }
    exit(code);
}

/* This process's GPU when the options leave it open (--device cuda or auto): under a launcher the
   rank's entry of --gpu-ids, else its LOCAL_RANK (as mgpu_comm_create's NCCL device; more ranks than
   devices share them round-robin, which the shm backend allows); alone, the first --gpu-ids entry. */
static mgpu_result mgpu__trainer_place(const mgpu_trainer *t, mgpu_device *dev) {
    const mgpu_train_opts *o = t->opts;
    int visible;
    if (dev->type != MGPU_DEVICE_CUDA || o->device_index >= 0) return MGPU_OK;
    if (!t->launched) {
        if (o->num_gpu_ids > 0) dev->index = o->gpu_ids[0];
        return MGPU_OK;
    }
    if (t->local_rank < o->num_gpu_ids) { dev->index = o->gpu_ids[t->local_rank]; return MGPU_OK; }
    visible = mgpu_cuda_device_count();
    dev->index = visible > 0 ? t->local_rank % visible : 0;
    return MGPU_OK;
}

/* --device as a device: the checks (CUDA in this build, the index visible) and their messages
   are mgpu_device_parse's. */
static mgpu_result mgpu__trainer_device(const mgpu_train_opts *o, mgpu_device *out) {
    char text[32];
    switch (o->device) {
    case MGPU_DEVICE_KIND_AUTO: return mgpu_device_parse("auto", out);
    case MGPU_DEVICE_KIND_CPU: return mgpu_device_parse("cpu", out);
    case MGPU_DEVICE_KIND_CUDA:
        if (o->device_index < 0) return mgpu_device_parse("cuda", out);
        snprintf(text, sizeof text, "cuda:%d", o->device_index);
        return mgpu_device_parse(text, out);
    }
    return mgpu__fail(MGPU_ERR_INVALID_ARG, "--device: kind %d is not auto, cpu or cuda", (int)o->device);
}

/* --------------------------------------------------------------------------------------
   Output paths, checked before anything trains: a run that cannot save would otherwise train to
   the end and then lose the model.
   -------------------------------------------------------------------------------------- */

/* dir exists (created as mkdir -p does) and a file can be created in it (a probe, removed). */
static mgpu_result mgpu__check_dir_writable(const char *flag, const char *dir) {
    char probe[MGPU__CKPT_PATH_MAX], why[MGPU__CKPT_PATH_MAX + 128];
    int fd;
    if (mgpu__mkdirs(dir) != MGPU_OK) {
        snprintf(why, sizeof why, "%s", mgpu_last_error());   /* the message is rewritten below */
        return mgpu__fail(MGPU_ERR_IO, "%s %s is not writable: %s (checked before training, so nothing was lost)", flag, dir, why);
    }
    if (snprintf(probe, sizeof probe, "%s/.mgpu-write-check-%ld", dir, (long)getpid()) >= (int)sizeof probe)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s %s: path too long", flag, dir);
    if ((fd = open(probe, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600)) < 0)
        return mgpu__fail(MGPU_ERR_IO, "%s %s is not writable: cannot create a file in it: %s (checked before training, so nothing was lost)",
                          flag, dir, strerror(errno));
    close(fd);
    unlink(probe);
    return MGPU_OK;
}

/* path can be appended to; a file that did not exist is not left behind. */
static mgpu_result mgpu__check_file_writable(const char *flag, const char *path) {
    int existed = access(path, F_OK) == 0;
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0)
        return mgpu__fail(MGPU_ERR_IO, "%s %s is not writable: %s (checked before training, so nothing was lost)", flag, path, strerror(errno));
    close(fd);
    if (!existed) unlink(path);
    return MGPU_OK;
}

/* Rank 0 writes every output, so rank 0 checks them. */
static mgpu_result mgpu__trainer_check_outputs(const mgpu_trainer *t) {
    const mgpu_train_opts *o = t->opts;
    mgpu_result r;
    if (t->rank != 0) return MGPU_OK;
    if (o->save_dir && o->save_dir[0] && !o->eval_only && (r = mgpu__check_dir_writable("--save-dir", o->save_dir)) != MGPU_OK) return r;
    if (o->metrics && o->metrics[0] && (r = mgpu__check_file_writable("--metrics", o->metrics)) != MGPU_OK) return r;
    return MGPU_OK;
}

MGPU_API mgpu_trainer *mgpu_trainer_create(const mgpu_train_opts *opts) {
    mgpu_trainer *t;
    mgpu_context_desc cd;
    if (!opts) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_trainer_create: opts is NULL");
    if (opts->amp != MGPU_AMP_OFF && opts->amp != MGPU_AMP_FP16 && opts->amp != MGPU_AMP_BF16)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "--amp: mode %d is not off, fp16 or bf16", (int)opts->amp);
    if (opts->resume == MGPU_RESUME_PATH && (!opts->resume_path || !opts->resume_path[0]))
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "--resume: a path was asked for (MGPU_RESUME_PATH) but resume_path is empty");
    memset(&cd, 0, sizeof cd);
    if (mgpu__trainer_device(opts, &cd.device) != MGPU_OK) return NULL;
    cd.seed = opts->seed;
    t = (mgpu_trainer *)mgpu__calloc(sizeof *t, "the trainer");
    if (!t) return NULL;
    t->opts = opts;
    t->amp = opts->amp;
    if (mgpu__trainer_read_env(t) != MGPU_OK || mgpu__trainer_check_mode(opts, t, &t->dp_replicas) != MGPU_OK ||
        mgpu__trainer_check_outputs(t) != MGPU_OK ||
        mgpu__trainer_self_launch(t, &cd.device) != MGPU_OK || mgpu__trainer_place(t, &cd.device) != MGPU_OK ||
        !(t->ctx = mgpu_context_create(&cd)) || mgpu__trainer_connect(t) != MGPU_OK) {
        mgpu_trainer_destroy(t);
        return NULL;
    }
    return t;
}
MGPU_API mgpu_context *mgpu_trainer_context(const mgpu_trainer *t) { return t ? t->ctx : NULL; }
MGPU_API int mgpu_trainer_rank(const mgpu_trainer *t) { return t ? t->rank : 0; }
MGPU_API void mgpu_trainer_destroy(mgpu_trainer *t) {
    if (!t) return;
    mgpu_comm_destroy(t->comm);
    mgpu_context_destroy(t->ctx);
    mgpu_free(t);
}

/* Correct predictions of a batch (mgpu_count_correct: on a GPU the logits and targets come back
   with one copy each per batch, small next to the forward); -1 with an error on failure. */
static int64_t mgpu__count_correct_batch(const mgpu_tensor *logits, const mgpu_tensor *target) {
    if (!logits || !target) { if (mgpu_last_result() == MGPU_OK) mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_evaluate: no logits"); return -1; }
    return mgpu_count_correct(logits, target);
}

/* Evaluation's sums over ds: sums[0] the summed cross-entropy, [1] the correct predictions, [2]
   the samples (doubles, so DDP can all-reduce them in one call). */
static mgpu_result mgpu__evaluate_sums(mgpu_context *ctx, mgpu_model *model, mgpu_forward_fn forward, void *user,
                                       const mgpu_dataset *ds, int64_t batch_size, double sums[3]) {
    mgpu_loader_desc ld;
    mgpu_loader *loader;
    mgpu_batch b;
    mgpu_result r;
    double loss_sum = 0;
    int64_t correct = 0, seen = 0;
    int was_training, grad_was_on;
    sums[0] = sums[1] = sums[2] = 0;
    if (ds->length == 0) return MGPU_OK;   /* a rank's empty shard */
    memset(&ld, 0, sizeof ld);
    ld.batch_size = batch_size; ld.ctx = ctx;
    loader = mgpu_loader_create(ds, &ld);
    if (!loader) return mgpu_last_result();
    was_training = mgpu_model_is_training(model);
    grad_was_on = mgpu_set_grad_enabled(ctx, 0);
    mgpu_model_train(model, 0);
    r = mgpu_loader_set_epoch(loader, 0, 0);
    while (r == MGPU_OK && (r = mgpu_loader_next(loader, &b)) == MGPU_OK && b.size > 0) {
        mgpu_tensor *logits = forward(ctx, b.x, user);
        mgpu_tensor *l = mgpu_op_cross_entropy(ctx, logits, b.y);
        if (!l) { r = mgpu_last_result() ? mgpu_last_result() : MGPU_ERR_STATE; break; }
        int64_t hits;
        loss_sum += mgpu_tensor_item(l) * (double)b.size;
        if ((hits = mgpu__count_correct_batch(logits, b.y)) < 0) { r = mgpu_last_result() ? mgpu_last_result() : MGPU_ERR_STATE; break; }
        correct += hits;
        seen += b.size;
        mgpu_context_end_step(ctx);
    }
    mgpu_context_end_step(ctx);
    mgpu_model_train(model, was_training);
    mgpu_set_grad_enabled(ctx, grad_was_on);
    mgpu_loader_destroy(loader);
    sums[0] = loss_sum; sums[1] = (double)correct; sums[2] = (double)seen;
    return r;
}

static void mgpu__evaluate_ratios(const double sums[3], double *loss, double *accuracy) {
    if (loss) *loss = sums[2] > 0 ? sums[0] / sums[2] : NAN;
    if (accuracy) *accuracy = sums[2] > 0 ? sums[1] / sums[2] : NAN;
}

MGPU_API mgpu_result mgpu_evaluate(mgpu_context *ctx, mgpu_model *model, mgpu_forward_fn forward, void *user,
                                   const mgpu_dataset *ds, int64_t batch_size, double *loss, double *accuracy) {
    double sums[3];
    mgpu_result r;
    if (!ctx || !model || !forward || !ds || batch_size < 1)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_evaluate: ctx, model, forward and dataset are required and batch_size must be >= 1");
    if ((r = mgpu__evaluate_sums(ctx, model, forward, user, ds, batch_size, sums)) != MGPU_OK) return r;
    mgpu__evaluate_ratios(sums, loss, accuracy);
    return MGPU_OK;
}

/* A strided view of a dataset: rank r of w sees samples r, r + w, r + 2w, ... Unlike the
   training sampler it pads nothing, so no sample is evaluated twice. */
typedef struct mgpu__shard { const mgpu_dataset *base; int rank, world; } mgpu__shard;
static mgpu_result mgpu__shard_get(const mgpu_dataset *ds, int64_t index, void *x_out, void *y_out) {
    const mgpu__shard *s = (const mgpu__shard *)ds->impl;
    return s->base->get(s->base, s->rank + index * s->world, x_out, y_out);
}
static void mgpu__shard_view(const mgpu_dataset *base, mgpu__shard *s, int rank, int world, mgpu_dataset *view) {
    s->base = base; s->rank = rank; s->world = world;
    *view = *base;
    view->length = base->length > rank ? (base->length - rank + world - 1) / world : 0;
    view->get = mgpu__shard_get;
    view->destroy = NULL;
    view->impl = s;
}

/* The LR schedule in optimizer steps, from the epoch-based options. */
static mgpu_lr_schedule mgpu__schedule_from_opts(const mgpu_train_opts *o, float lr, int64_t steps_per_epoch) {
    mgpu_lr_schedule s;
    double spe = (double)steps_per_epoch;
    memset(&s, 0, sizeof s);
    s.type = o->schedule;
    s.base_lr = lr;
    s.warmup_steps = (int64_t)(o->warmup_epochs * spe + 0.5);
    s.total_steps = (int64_t)o->epochs * steps_per_epoch;
    if (o->max_steps > 0 && o->max_steps < s.total_steps) s.total_steps = o->max_steps;
    s.t_0 = (int64_t)((o->t0_epochs > 0 ? o->t0_epochs : 1.0) * spe + 0.5);
    if (s.t_0 < 1) s.t_0 = 1;
    s.t_mult = o->t_mult > 0 ? o->t_mult : 1;
    s.eta_min = o->eta_min;
    s.step_size = (int64_t)((o->step_size_epochs > 0 ? o->step_size_epochs : 1.0) * spe + 0.5);
    if (s.step_size < 1) s.step_size = 1;
    s.gamma = o->gamma > 0 ? o->gamma : 0.1f;
    return s;
}

static mgpu_optimizer *mgpu__optimizer_from_opts(mgpu_model *model, const mgpu_train_opts *o, float lr) {
    mgpu_optimizer_desc od = mgpu_optimizer_desc_default(o->optimizer);
    od.lr = lr;
    od.weight_decay = o->weight_decay;
    if (o->optimizer == MGPU_OPTIM_SGD) od.momentum = o->momentum;
    return mgpu_optimizer_create(model, &od);
}

/* --------------------------------------------------------------------------------------
   Pre-emption: SIGTERM (SLURM before a time limit or scancel, Kubernetes), SIGUSR1
   (`sbatch --signal=USR1@120`) and SIGINT (Ctrl-C). The handler only records the signal; the loop
   saves a checkpoint after the current optimizer step and fit returns MGPU_OK, so the program
   exits 0 and a requeued job (`scontrol requeue`, `sbatch --requeue`) continues with --resume
   auto. A second Ctrl-C does not wait for the step: SIGINT's default action ends the process at
   once (the previous checkpoint stays intact). The flag is process state by nature, so it is the
   one global the trainer keeps.
   -------------------------------------------------------------------------------------- */

static volatile sig_atomic_t mgpu__stop_signal = 0;
static volatile sig_atomic_t mgpu__stop_quiet = 0;   /* ranks other than 0 do not echo Ctrl-C */
static void mgpu__on_stop_signal(int sig) {
    static const char first[] = "\ninterrupted: saving a checkpoint after this step (Ctrl-C again to abort at once)\n";
    if (sig == SIGINT && mgpu__stop_signal == SIGINT) {   /* the second Ctrl-C */
        signal(SIGINT, SIG_DFL);   /* async-signal-safe; the raised signal lands when the handler returns */
        raise(SIGINT);
        return;
    }
    if (sig == SIGINT && !mgpu__stop_quiet && write(STDERR_FILENO, first, sizeof first - 1) < 0) { /* nothing to do: a message was all it was */ }
    mgpu__stop_signal = sig;
}

typedef struct mgpu__signals { struct sigaction term, usr1, intr; int installed; } mgpu__signals;

static void mgpu__signals_install(mgpu__signals *s, int quiet) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = mgpu__on_stop_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    mgpu__stop_signal = 0;
    mgpu__stop_quiet = quiet;
    s->installed = sigaction(SIGTERM, &sa, &s->term) == 0 && sigaction(SIGUSR1, &sa, &s->usr1) == 0 && sigaction(SIGINT, &sa, &s->intr) == 0;
}
static void mgpu__signals_restore(mgpu__signals *s) {
    if (!s->installed) return;
    sigaction(SIGTERM, &s->term, NULL);
    sigaction(SIGUSR1, &s->usr1, NULL);
    sigaction(SIGINT, &s->intr, NULL);
    s->installed = 0;
}

/* --------------------------------------------------------------------------------------
   The loop's state
   -------------------------------------------------------------------------------------- */

/* Running sums of the epoch in progress, saved in checkpoints so a resumed epoch reports what an
   uninterrupted one would. Times are seconds on the training thread. */
typedef struct mgpu__epoch_stats {
    double loss_sum; int64_t samples;
    double time_s, data_wait_s, compute_s, optimizer_s, checkpoint_s, comm_s;
} mgpu__epoch_stats;

/* The double members of mgpu__epoch_stats by name: one table for writing and reading them. */
typedef struct mgpu__stat_field { const char *key; size_t offset; } mgpu__stat_field;
static const mgpu__stat_field mgpu__epoch_stat_fields[] = {
    {"loss_sum", offsetof(mgpu__epoch_stats, loss_sum)}, {"time_s", offsetof(mgpu__epoch_stats, time_s)},
    {"data_wait_s", offsetof(mgpu__epoch_stats, data_wait_s)}, {"compute_s", offsetof(mgpu__epoch_stats, compute_s)},
    {"optimizer_s", offsetof(mgpu__epoch_stats, optimizer_s)}, {"checkpoint_s", offsetof(mgpu__epoch_stats, checkpoint_s)},
    {"comm_s", offsetof(mgpu__epoch_stats, comm_s)}};
#define MGPU__N_EPOCH_STATS ((int)(sizeof mgpu__epoch_stat_fields / sizeof mgpu__epoch_stat_fields[0]))

/* State of one fit() call, so the loop body stays small. */
typedef struct mgpu__fit {
    mgpu_trainer *t;
    mgpu_model *model; mgpu_forward_fn forward; void *user;
    mgpu_loader *loader; mgpu_optimizer *opt; mgpu_metrics *metrics;
    mgpu_checkpointer *ckpt;          /* NULL without --save-dir and on ranks other than 0 */
    mgpu_ddp *ddp;                    /* gradient all-reduce across ranks (world_size > 1) */
    double ddp_exposed_s;             /* DDP's exposed communication time already counted */
    mgpu_lr_schedule schedule;
    mgpu_grad_scaler scaler;
    int64_t step, micro, batches_per_epoch;
    int64_t epoch, batch;             /* where the run stands: the epoch in progress and its next batch */
    mgpu__epoch_stats es;
    double clock;                     /* when es.time_s was last brought up to date */
    mgpu__buf history;                /* metrics records so far: JSON objects joined by commas */
    double saved_time;                /* when the last checkpoint was taken (or the run began) */
    double run_time, run_samples;     /* this process's share, for samples_per_s */
    int stop;                         /* --max-steps reached or a stop signal */
    int signal;                       /* the stop signal, 0 if none */
    int resumed;                      /* the state came from a checkpoint */
    int finished;                     /* resumed from the checkpoint that ended the run: nothing left to do */
    int64_t saved_step;               /* step of the last checkpoint taken (-1: none) */
    struct mgpu__fit_graph *graph;    /* --cuda-graph on: the captured step (NULL: every step eager) */
    char graph_note[320];             /* what --cuda-graph does in this run, for the startup line */
} mgpu__fit;
typedef struct mgpu__fit_graph mgpu__fit_graph;

/* Said once for all ranks: every rank reaches the same conclusion, rank 0 tells (with how many
   ranks it stands for), so a 4-process run prints one warning, not four. */
static void mgpu__fit_say_once(const mgpu__fit *f, mgpu_log_level level, const char *fmt, ...) MGPU__PRINTF(3, 4);
static void mgpu__fit_say_once(const mgpu__fit *f, mgpu_log_level level, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    if (f->t->rank != 0) return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (f->t->world_size > 1) mgpu_log(level, "%s (the same on all %d ranks)", msg, f->t->world_size);
    else mgpu_log(level, "%s", msg);
}

static void mgpu__fit_clock(mgpu__fit *f) {
    double now = mgpu_time_s();
    f->es.time_s += now - f->clock;
    f->clock = now;
}

/* Peak resident memory (VmHWM) in MiB, NaN where /proc is missing. */
static double mgpu__peak_rss_mb(void) {
    char line[256];
    double kb = NAN;
    FILE *fp = fopen("/proc/self/status", "r");
    if (!fp) return NAN;
    while (fgets(line, sizeof line, fp))
        if (strncmp(line, "VmHWM:", 6) == 0) { kb = strtod(line + 6, NULL); break; }
    fclose(fp);
    return kb / 1024.0;
}

/* --------------------------------------------------------------------------------------
   trainer_state.json
   -------------------------------------------------------------------------------------- */

/* A parsed JSON value written back as text (numbers keep their source spelling). */
static void mgpu__json_write(mgpu__buf *b, const mgpu_json *v) {
    const mgpu_json *c;
    switch (v->type) {
    case MGPU_JSON_NULL: mgpu__buf_puts(b, "null"); return;
    case MGPU_JSON_BOOL: mgpu__buf_puts(b, v->boolean ? "true" : "false"); return;
    case MGPU_JSON_NUMBER: mgpu__buf_append(b, v->raw, v->raw_len); return;
    case MGPU_JSON_STRING: mgpu__buf_json_string(b, v->string); return;
    case MGPU_JSON_ARRAY: case MGPU_JSON_OBJECT:
        mgpu__buf_puts(b, v->type == MGPU_JSON_ARRAY ? "[" : "{");
        for (c = v->child; c; c = c->next) {
            if (c != v->child) mgpu__buf_puts(b, ",");
            if (v->type == MGPU_JSON_OBJECT) { mgpu__buf_json_string(b, c->key); mgpu__buf_puts(b, ":"); }
            mgpu__json_write(b, c);
        }
        mgpu__buf_puts(b, v->type == MGPU_JSON_ARRAY ? "]" : "}");
        return;
    }
}

static void mgpu__json_member(mgpu__buf *b, const char *key, double v) {
    mgpu__buf_printf(b, "\"%s\":", key);
    mgpu__buf_json_number(b, v);
}

/* Every option under its flag name: numbers as numbers, the rest as strings (unset: null). */
static void mgpu__options_json(mgpu__buf *b, const mgpu_train_opts *o) {
    char text[MGPU__OPT_TEXT_MAX];
    int i;
    mgpu__buf_puts(b, "{");
    for (i = 0; i < MGPU__N_TRAIN_OPTS; i++) {
        const mgpu__opt *s = &mgpu__train_opts_table[i];
        const char *v = mgpu__opt_value_text(o, s, text, sizeof text);
        int numeric = s->kind == MGPU__OPT_INT || s->kind == MGPU__OPT_FLAG || s->kind == MGPU__OPT_I64 || s->kind == MGPU__OPT_U64 || s->kind == MGPU__OPT_FLOAT;
        if (i) mgpu__buf_puts(b, ",");
        mgpu__buf_json_string(b, s->flag);
        mgpu__buf_puts(b, ":");
        if (!v) mgpu__buf_puts(b, "null");
        else if (numeric) mgpu__buf_puts(b, v);
        else mgpu__buf_json_string(b, v);
    }
    mgpu__buf_puts(b, "}");
}

static void mgpu__schedule_json(mgpu__buf *b, const mgpu_lr_schedule *s) {
    static const char *const names[] = {"constant", "linear", "cosine", "cosine-restarts", "step"};
    mgpu__buf_printf(b, "{\"type\":\"%s\",", (int)s->type >= 0 && (int)s->type < 5 ? names[s->type] : "?");
    mgpu__json_member(b, "base_lr", s->base_lr);
    mgpu__buf_printf(b, ",\"warmup_steps\":%lld,\"total_steps\":%lld,\"t_0\":%lld,\"t_mult\":%lld,", (long long)s->warmup_steps,
                     (long long)s->total_steps, (long long)s->t_0, (long long)s->t_mult);
    mgpu__json_member(b, "eta_min", s->eta_min);
    mgpu__buf_printf(b, ",\"step_size\":%lld,", (long long)s->step_size);
    mgpu__json_member(b, "gamma", s->gamma);
    mgpu__buf_puts(b, "}");
}

static void mgpu__epoch_stats_json(mgpu__buf *b, const mgpu__epoch_stats *es) {
    int i;
    mgpu__buf_printf(b, "{\"samples\":%lld", (long long)es->samples);
    for (i = 0; i < MGPU__N_EPOCH_STATS; i++) {
        mgpu__buf_puts(b, ",");
        mgpu__json_member(b, mgpu__epoch_stat_fields[i].key, *(const double *)(const void *)((const char *)es + mgpu__epoch_stat_fields[i].offset));
    }
    mgpu__buf_puts(b, "}");
}

/* Each rank's partial loss sum and sample count of the epoch in progress, gathered for rank 0's
   trainer_state.json so a resumed run restores every rank's own sums (rank 0's alone would make
   the resumed epoch's train_loss differ from the uninterrupted run's). An all-reduce of vectors
   that are zero but for each rank's own slots is a gather: adding zeros is exact. Every rank
   calls it, at the same step. */
static mgpu_result mgpu__fit_rank_stats_json(const mgpu__fit *f, mgpu__buf *b) {
    int w = f->t->world_size, i;
    double *v;
    mgpu_result r;
    if (!f->t->comm || w <= 1) return MGPU_OK;
    if (!(v = (double *)mgpu__calloc(sizeof(double) * 2 * (size_t)w, "the per-rank epoch sums"))) return MGPU_ERR_OOM_HOST;
    v[f->t->rank] = f->es.loss_sum;
    v[w + f->t->rank] = (double)f->es.samples;
    if ((r = mgpu_comm_allreduce_f64(f->t->comm, v, 2 * w, MGPU_REDUCE_SUM)) == MGPU_OK) {
        mgpu__buf_puts(b, ",\n\"rank_epoch_stats\":{\"loss_sum\":[");
        for (i = 0; i < w; i++) { if (i) mgpu__buf_puts(b, ","); mgpu__buf_json_number(b, v[i]); }
        mgpu__buf_puts(b, "],\"samples\":[");
        for (i = 0; i < w; i++) mgpu__buf_printf(b, i ? ",%.0f" : "%.0f", v[w + i]);
        mgpu__buf_puts(b, "]}");
    }
    mgpu_free(v);
    return b->failed ? MGPU_ERR_OOM_HOST : r;
}

/* The whole state at a step boundary (see the Checkpoints section header); rank_stats: the
   members mgpu__fit_rank_stats_json wrote ("" at world size 1). */
static int mgpu__fit_state_json(const mgpu__fit *f, const char *rank_stats, mgpu__buf *b) {
    uint64_t seed = 0, offset = 0;
    mgpu_context_rng_state(f->t->ctx, &seed, &offset);
    mgpu__buf_printf(b, "{\"format_version\":%d,\"step\":%lld,\"epoch\":%lld,\"batch_in_epoch\":%lld,\"world_size\":%d,\"optimizer_steps\":%lld,",
                     MGPU__CKPT_FORMAT_VERSION, (long long)f->step, (long long)f->epoch, (long long)f->batch, f->t->world_size,
                     (long long)mgpu_optimizer_step_count(f->opt));
    mgpu__json_member(b, "lr", mgpu_optimizer_lr(f->opt));
    mgpu__buf_printf(b, ",\n\"rng\":{\"seed\":%llu,\"offset\":%llu},\n\"scaler\":{\"enabled\":%d,", (unsigned long long)seed,
                     (unsigned long long)offset, f->scaler.enabled);
    mgpu__json_member(b, "scale", f->scaler.scale);
    mgpu__buf_printf(b, ",\"growth_tracker\":%lld},\n\"schedule\":", (long long)f->scaler.growth_tracker);
    mgpu__schedule_json(b, &f->schedule);
    mgpu__buf_puts(b, ",\n\"epoch_stats\":");
    mgpu__epoch_stats_json(b, &f->es);
    mgpu__buf_puts(b, rank_stats);
    mgpu__buf_puts(b, ",\n\"metrics\":[");
    if (f->history.len) mgpu__buf_append(b, f->history.data, f->history.len);
    mgpu__buf_puts(b, "],\n\"options\":");
    mgpu__options_json(b, f->t->opts);
    mgpu__buf_puts(b, "}\n");
    return !b->failed;
}

/* A checkpoint now (at a step boundary); wait: block until it is on disk (stop signals, the end).
   Every rank calls it at the same step (their epoch sums are gathered); rank 0 writes. */
static mgpu_result mgpu__fit_checkpoint(mgpu__fit *f, int wait) {
    double t0 = mgpu_time_s();
    mgpu__buf state, ranks;
    mgpu_result r;
    mgpu__fit_clock(f);
    mgpu__buf_init(&state);
    mgpu__buf_init(&ranks);
    mgpu__buf_puts(&ranks, "");   /* a valid string at world size 1 */
    r = mgpu__fit_rank_stats_json(f, &ranks);
    if (r == MGPU_OK && f->ckpt)
        r = mgpu__fit_state_json(f, ranks.data, &state) ? mgpu_checkpointer_save(f->ckpt, f->step, f->model, f->opt, state.data) : MGPU_ERR_OOM_HOST;
    if (r == MGPU_OK && wait && f->ckpt) r = mgpu_checkpointer_wait(f->ckpt);
    mgpu__buf_free(&state);
    mgpu__buf_free(&ranks);
    f->saved_step = f->step;
    f->saved_time = mgpu_time_s();
    f->es.checkpoint_s += f->saved_time - t0;
    return r;
}

/* Whether checkpoints are taken at all (--save-dir), on every rank: rank 0 writes them, the
   others take part in gathering their epoch sums. */
static int mgpu__fit_saving(const mgpu__fit *f) { return f->t->opts->save_dir && f->t->opts->save_dir[0]; }

/* Rank 0's wall-clock trigger (--checkpoint-interval-min); shared with the other ranks by
   mgpu__fit_agree_stop, as clocks differ. */
static int mgpu__fit_checkpoint_time_due(const mgpu__fit *f) {
    const mgpu_train_opts *o = f->t->opts;
    return f->t->rank == 0 && o->checkpoint_interval_min > 0 && mgpu_time_s() - f->saved_time >= 60.0 * o->checkpoint_interval_min;
}

/* The same answer on every rank: a stop signal (agreed), every N steps, or rank 0's clock. */
static int mgpu__fit_checkpoint_due(const mgpu__fit *f, int time_due) {
    const mgpu_train_opts *o = f->t->opts;
    if (!mgpu__fit_saving(f)) return 0;
    if (f->signal) return 1;
    if (o->checkpoint_every_steps > 0 && f->step % o->checkpoint_every_steps == 0) return 1;
    return time_due;
}

/* --------------------------------------------------------------------------------------
   Resuming
   -------------------------------------------------------------------------------------- */

/* The checkpoint --resume names: 1 with its path, 0 when auto finds none (a fresh start). */
static mgpu_result mgpu__fit_resume_path(const mgpu__fit *f, char *path, size_t size, int *found) {
    const mgpu_train_opts *o = f->t->opts;
    char file[MGPU__CKPT_PATH_MAX];
    const char *dir = o->resume_path;
    *found = 0;
    if (o->resume == MGPU_RESUME_AUTO) {
        if (!o->save_dir || !o->save_dir[0]) return mgpu__fail(MGPU_ERR_INVALID_ARG, "--resume auto looks in --save-dir, which is not set");
        dir = o->save_dir;
        if (f->t->rank == 0) mgpu__ckpt_remove_stale(dir);
        if (!mgpu__is_dir(dir) || !mgpu__ckpt_any(dir)) {
            mgpu__fit_say_once(f, MGPU_LOG_INFO, "--resume auto: no checkpoint in '%s' yet; starting from scratch", dir);
            return MGPU_OK;
        }
    } else if (mgpu__path_join(file, dir, MGPU__CKPT_STATE) == MGPU_OK && access(file, F_OK) == 0) {
        /* a step directory itself */
        if (strlen(dir) >= size) return mgpu__fail(MGPU_ERR_INVALID_ARG, "--resume %s: path too long", dir);
        memcpy(path, dir, strlen(dir) + 1);
        *found = 1;
        return MGPU_OK;
    }
    /* a save directory: its latest valid checkpoint (rank 0 tells of corrupt ones it skips) */
    if (mgpu__checkpoint_find(dir, path, size, f->t->rank == 0 ? MGPU_LOG_WARN : MGPU_LOG_DEBUG) != MGPU_OK) return mgpu_last_result();
    *found = 1;
    return MGPU_OK;
}

/* Options that change the data order, the schedule or the numerics: resuming with other values
   works, but is no longer the same run, which deserves a warning. */
static void mgpu__fit_warn_changed_options(const mgpu__fit *f, const mgpu_json *state) {
    static const char *const keys[] = {"batch-size", "grad-accum-steps", "seed", "lr", "optimizer", "schedule", "epochs",
                                       "max-steps", "warmup-epochs", "amp", "weight-decay", "clip-grad-norm"};
    const mgpu_json *saved = mgpu_json_get(state, "options");
    char text[MGPU__OPT_TEXT_MAX];
    size_t i;
    int64_t world = 1;
    for (i = 0; saved && i < sizeof keys / sizeof keys[0]; i++) {
        const mgpu__opt *s = mgpu__opt_find(keys[i], strlen(keys[i]));
        const mgpu_json *v = mgpu_json_get(saved, keys[i]);
        const char *now = s ? mgpu__opt_value_text(f->t->opts, s, text, sizeof text) : NULL;
        const char *then = !v ? NULL : v->type == MGPU_JSON_STRING ? v->string : v->type == MGPU_JSON_NUMBER ? v->raw : NULL;
        size_t then_len = !then ? 0 : v->type == MGPU_JSON_NUMBER ? v->raw_len : strlen(then);
        if (now && then && (strlen(now) != then_len || strncmp(now, then, then_len) != 0))
            mgpu__fit_say_once(f, MGPU_LOG_WARN, "resuming with --%s %s, but the checkpoint was written with %.*s: the run will differ from an uninterrupted one",
                               keys[i], now, (int)then_len, then);
    }
    if (mgpu_json_int64(mgpu_json_get(state, "world_size"), &world) && world != f->t->world_size)
        mgpu__fit_say_once(f, MGPU_LOG_WARN, "resuming at world size %d from a checkpoint written at world size %lld: the data order changes",
                           f->t->world_size, (long long)world);
}

/* What the trainer needs beyond what every checkpoint holds; checked before anything is loaded. */
static mgpu_result mgpu__fit_check_state(const mgpu__fit *f, const mgpu_json *state, const char *path) {
    static const mgpu__jfield need[] = {{"epoch", MGPU__J_INT, 1, 0}, {"batch_in_epoch", MGPU__J_INT, 1, 0}, {"rng", MGPU__J_OBJECT, 1, 0},
                                        {"epoch_stats", MGPU__J_OBJECT, 1, 0}, {"metrics", MGPU__J_ARRAY, 1, 0}};
    static const mgpu__jfield stats[] = {{"samples", MGPU__J_INT, 1, 0}, {"loss_sum", MGPU__J_NUMBER, 1, 0}};
    char label[MGPU__CKPT_PATH_MAX + 32];
    int64_t batch = 0;
    snprintf(label, sizeof label, "%s/" MGPU__CKPT_STATE, path);
    if (mgpu__json_check_fields(state, label, "", need, 5) != MGPU_OK ||
        mgpu__json_check_fields(mgpu_json_get(state, "epoch_stats"), label, "epoch_stats.", stats, 2) != MGPU_OK)
        return MGPU_ERR_FORMAT;
    mgpu_json_int64(mgpu_json_get(state, "batch_in_epoch"), &batch);
    if (batch > f->batches_per_epoch)
        return mgpu__fail(MGPU_ERR_FORMAT, "%s: batch_in_epoch %lld is past the %lld batches of an epoch of this run (was --batch-size changed?)",
                          label, (long long)batch, (long long)f->batches_per_epoch);
    return MGPU_OK;
}

static double mgpu__json_number_or_nan(const mgpu_json *j) { return j && j->type == MGPU_JSON_NUMBER ? j->number : NAN; }

/* This rank's own partial sums of the epoch in progress (see mgpu__fit_rank_stats_json). Written
   at another world size, the sums cannot be split as the data now is: rank 0 takes them all, so
   the epoch's train_loss still averages every sample seen. Absent (world size 1), epoch_stats
   already holds them. */
static void mgpu__fit_restore_rank_stats(mgpu__fit *f, const mgpu_json *ranks) {
    const mgpu_json *loss = mgpu_json_get(ranks, "loss_sum"), *samples = mgpu_json_get(ranks, "samples"), *l, *n;
    int i;
    if (!loss || !samples || loss->type != MGPU_JSON_ARRAY || samples->type != MGPU_JSON_ARRAY || loss->count != samples->count) return;
    f->es.loss_sum = 0;
    f->es.samples = 0;
    for (i = 0, l = loss->child, n = samples->child; l && n; i++, l = l->next, n = n->next) {
        int64_t k = 0;
        if (loss->count == f->t->world_size ? i != f->t->rank : f->t->rank != 0) continue;
        f->es.loss_sum += mgpu__json_number_or_nan(l);
        if (mgpu_json_int64(n, &k)) f->es.samples += k;
    }
}

/* Position, sums, RNG, scaler and history from a checked state. */
static void mgpu__fit_restore(mgpu__fit *f, const mgpu_json *state) {
    const mgpu_json *rng = mgpu_json_get(state, "rng"), *scaler = mgpu_json_get(state, "scaler");
    const mgpu_json *stats = mgpu_json_get(state, "epoch_stats"), *m;
    uint64_t seed = 0, offset = 0;
    int i;
    mgpu_json_int64(mgpu_json_get(state, "step"), &f->step);
    mgpu_json_int64(mgpu_json_get(state, "epoch"), &f->epoch);
    mgpu_json_int64(mgpu_json_get(state, "batch_in_epoch"), &f->batch);
    mgpu__json_u64(mgpu_json_get(rng, "seed"), &seed);
    mgpu__json_u64(mgpu_json_get(rng, "offset"), &offset);
    mgpu_context_set_rng_state(f->t->ctx, seed, offset);
    if (scaler && f->scaler.enabled) {
        f->scaler.scale = (float)mgpu_json_get(scaler, "scale")->number;
        mgpu_json_int64(mgpu_json_get(scaler, "growth_tracker"), &f->scaler.growth_tracker);
    }
    memset(&f->es, 0, sizeof f->es);
    mgpu_json_int64(mgpu_json_get(stats, "samples"), &f->es.samples);
    for (i = 0; i < MGPU__N_EPOCH_STATS; i++)
        *(double *)(void *)((char *)&f->es + mgpu__epoch_stat_fields[i].offset) = mgpu__json_number_or_nan(mgpu_json_get(stats, mgpu__epoch_stat_fields[i].key));
    if (!(f->es.time_s >= 0)) f->es.time_s = 0;
    mgpu__fit_restore_rank_stats(f, mgpu_json_get(state, "rank_epoch_stats"));
    for (m = mgpu_json_get(state, "metrics")->child; m; m = m->next) {
        if (f->history.len) mgpu__buf_puts(&f->history, ",");
        mgpu__json_write(&f->history, m);
    }
    /* the LR of the last step taken, as an uninterrupted run would report it */
    if (f->step > 0) mgpu_optimizer_set_lr(f->opt, mgpu_lr_at(&f->schedule, f->step - 1));
    if (f->t->opts->max_steps > 0 && f->step >= f->t->opts->max_steps) f->stop = 1;
    /* the checkpoint the end of a run writes: every epoch done, or stopped at --max-steps after its
       epoch record (the loop in mgpu__fit_run would not run) */
    f->finished = f->epoch >= f->t->opts->epochs || (f->stop && f->batch == 0);
    f->resumed = 1;
}

/* The metrics file becomes the checkpoint's records, so epochs logged after the checkpoint (and
   logged again as the run repeats them) are not duplicated. */
static mgpu_result mgpu__fit_rewrite_metrics(const mgpu__fit *f, const mgpu_json *state) {
    const mgpu_train_opts *o = f->t->opts;
    const mgpu_json *m;
    mgpu__buf text;
    mgpu_result r;
    if (!o->metrics || f->t->rank != 0) return MGPU_OK;
    mgpu__buf_init(&text);
    mgpu__buf_puts(&text, ""); /* a valid pointer even with no records */
    for (m = mgpu_json_get(state, "metrics")->child; m; m = m->next) {
        mgpu__json_write(&text, m);
        mgpu__buf_puts(&text, "\n");
    }
    r = text.failed ? MGPU_ERR_OOM_HOST : mgpu_write_file_atomic(o->metrics, text.data, text.len);
    mgpu__buf_free(&text);
    return r;
}

static mgpu_result mgpu__fit_resume(mgpu__fit *f) {
    const mgpu_train_opts *o = f->t->opts;
    char path[MGPU__CKPT_PATH_MAX];
    mgpu_json *state;
    mgpu_result r;
    int found = 0;
    if (o->resume == MGPU_RESUME_NONE) return MGPU_OK;
    if ((r = mgpu__fit_resume_path(f, path, sizeof path, &found)) != MGPU_OK || !found) return r;
    /* the trainer's fields first, then the checkpoint's full validation and load: a bad
       checkpoint leaves the freshly initialised model as it was */
    if (!(state = mgpu__ckpt_read_state(path))) return mgpu_last_result();
    if ((r = mgpu__fit_check_state(f, state, path)) == MGPU_OK && (r = mgpu_checkpoint_load(path, f->model, f->opt, NULL)) == MGPU_OK) {
        if (!o->eval_only) mgpu__fit_warn_changed_options(f, state);
        mgpu__fit_restore(f, state);
        /* a finished run's metrics file also holds its final line, which the checkpoint lacks;
           --eval-only appends its own line and changes nothing else */
        r = f->history.failed ? MGPU_ERR_OOM_HOST : f->finished || o->eval_only ? MGPU_OK : mgpu__fit_rewrite_metrics(f, state);
    }
    mgpu_json_free(state);
    if (r == MGPU_OK && f->t->rank == 0) {
        if (o->eval_only) printf("loaded %s: step %lld, epoch %lld\n", path, (long long)f->step, (long long)f->epoch);
        else if (f->finished)
            printf("already finished: %s is the end of the run (step %lld, %lld of %d epochs); nothing to train. "
                   "Start a new run with another --save-dir (or --init-from %s/model.safetensors)\n",
                   path, (long long)f->step, (long long)f->epoch, o->epochs, path);
        else printf("resumed from %s: step %lld, epoch %lld, batch %lld\n", path, (long long)f->step, (long long)f->epoch + 1, (long long)f->batch);
        fflush(stdout);
    }
    return r;
}

/* --------------------------------------------------------------------------------------
   The loop
   -------------------------------------------------------------------------------------- */

/* Unscale (fp16), clip, step (skipped by the scaler on inf/NaN), zero the grads. */
static mgpu_result mgpu__fit_optimizer_step(mgpu__fit *f) {
    const mgpu_train_opts *o = f->t->opts;
    double t0 = mgpu_time_s();
    mgpu_result r = MGPU_OK;
    int stepped = 1;
    mgpu_optimizer_set_lr(f->opt, mgpu_lr_at(&f->schedule, f->step));
    if (f->t->amp != MGPU_AMP_OFF && o->clip_grad_norm > 0) r = mgpu_grad_scaler_unscale(&f->scaler, f->model);
    if (r == MGPU_OK && o->clip_grad_norm > 0) r = mgpu_clip_grad_norm(f->model, o->clip_grad_norm, NULL);
    if (r == MGPU_OK) {
        if (f->t->amp != MGPU_AMP_OFF) {
            if ((r = mgpu_grad_scaler_step(&f->scaler, f->opt, f->model, &stepped)) == MGPU_OK) mgpu_grad_scaler_update(&f->scaler);
        } else {
            r = mgpu_optimizer_step(f->opt);
        }
    }
    if (r == MGPU_OK) r = mgpu_optimizer_zero_grad(f->opt);
    f->step++;
    f->micro = 0;
    f->es.optimizer_s += mgpu_time_s() - t0;
    return r;
}

/* Time backward spent waiting for DDP's all-reduces is communication, not compute. */
static void mgpu__fit_count_comm(mgpu__fit *f) {
    mgpu_ddp_stats st;
    if (!f->ddp) return;
    mgpu_ddp_get_stats(f->ddp, &st);
    f->es.comm_s += st.exposed_s - f->ddp_exposed_s;
    f->es.compute_s -= st.exposed_s - f->ddp_exposed_s;
    f->ddp_exposed_s = st.exposed_s;
}

/* Every rank must stop at the same step: a signal may reach the ranks at different steps (a
   rank that got none stops for the lowest signal number one got: SIGINT before SIGTERM). Rank 0's
   wall-clock checkpoint trigger travels in the same all-reduce. Without --save-dir no stop
   handler is installed and no checkpoint is taken, so there is nothing to agree on (and no
   collective is added to every step). */
static mgpu_result mgpu__fit_agree_stop(mgpu__fit *f, int *signal, int *time_due) {
    double v[32];   /* [0]: rank 0's time_due; [s]: how many ranks got signal s (1..31) */
    mgpu_result r;
    int i;
    if (!f->t->comm || !mgpu__fit_saving(f)) return MGPU_OK;
    memset(v, 0, sizeof v);
    v[0] = *time_due;
    if (*signal > 0 && *signal < 32) v[*signal] = 1;
    if ((r = mgpu_comm_allreduce_f64(f->t->comm, v, 32, MGPU_REDUCE_SUM)) != MGPU_OK) return r;
    *time_due = v[0] > 0;
    for (i = 1; i < 32 && !*signal; i++)
        if (v[i] > 0) *signal = i;
    return MGPU_OK;
}

/* Forward, loss and backward of one micro-batch (gradients accumulate); *loss: the unscaled
   loss, left on the context's device (reading it is the step's one host sync, taken at its end). */
static mgpu_result mgpu__fit_forward_backward(mgpu__fit *f, mgpu_tensor *x, mgpu_tensor *y, mgpu_tensor **loss) {
    const mgpu_train_opts *o = f->t->opts;
    mgpu_context *ctx = f->t->ctx;
    mgpu_tensor *obj;
    *loss = mgpu_op_cross_entropy(ctx, f->forward(ctx, x, f->user), y);
    obj = o->grad_accum_steps > 1 ? mgpu_op_scale(ctx, *loss, 1.0f / (float)o->grad_accum_steps) : *loss;
    if (f->scaler.enabled) obj = mgpu_grad_scaler_scale(ctx, &f->scaler, obj);
    if (!obj) return mgpu_last_result() ? mgpu_last_result() : MGPU_ERR_STATE;
    return mgpu_backward(ctx, obj);
}

static void mgpu__fit_count_loss(mgpu__fit *f, double loss, int64_t size) {
    f->es.loss_sum += loss * (double)size;
    f->es.samples += size;
}

static int mgpu__fit_graph_fits(const mgpu__fit *f, const mgpu_batch *b);
static mgpu_result mgpu__fit_graph_batch(mgpu__fit *f, const mgpu_batch *b);

/* One micro-batch: forward, loss, backward (accumulating); an optimizer step every
   grad_accum_steps micro-batches and at the end of the epoch (*stepped tells). A full batch under
   --cuda-graph on goes through the captured step instead (mgpu__fit_graph_batch). */
static mgpu_result mgpu__fit_batch(mgpu__fit *f, const mgpu_batch *b, int *stepped) {
    const mgpu_train_opts *o = f->t->opts;
    mgpu_context *ctx = f->t->ctx;
    double t0 = mgpu_time_s();
    mgpu_tensor *loss = NULL;
    mgpu__pending_item loss_value;
    mgpu_result r;
    *stepped = f->micro + 1 == o->grad_accum_steps || b->index + 1 == f->batches_per_epoch;
    if (mgpu__fit_graph_fits(f, b)) return mgpu__fit_graph_batch(f, b);   /* one batch, one optimizer step */
    if (f->ddp) mgpu_ddp_set_sync(f->ddp, *stepped);   /* no_sync for accumulation micro-steps */
    r = mgpu__fit_forward_backward(f, b->x, b->y, &loss);
    f->es.compute_s += mgpu_time_s() - t0;
    mgpu__fit_count_comm(f);
    if (r != MGPU_OK) return r;
    f->micro++;
    /* the loss's copy is queued before the optimizer step: an fp16 step's found-inf read (the
       scaler's wait) then brings it too, and the step waits for the host once */
    mgpu__item_begin(loss, &loss_value);
    if (*stepped) r = mgpu__fit_optimizer_step(f);
    mgpu__fit_count_loss(f, mgpu__item_end(&loss_value), b->size);
    mgpu_context_end_step(ctx);
    return r;
}

/* --------------------------------------------------------------------------------------
   --cuda-graph on: the whole step (forward, loss, backward, unscale/clip, optimizer step,
   zero_grad) captured once as a CUDA Graph and replayed for every later batch of the same shape.
   MGPU__GRAPH_WARMUP eager steps come first, in the graph's private pool (mgpu__step_graph):
   they create the gradients, read num_batches_tracked back, and grow the pool's arena and
   cuBLAS buffers to the step's size, so the capture allocates and synchronises nothing. Each
   batch is copied into fixed input tensors on the stream (after the loader's upload); a batch
   of another shape (an epoch's last partial batch) runs eagerly, outside the pool. Per-step
   values (LR, Adam's bias corrections, dropout's RNG position, num_batches_tracked) are step
   scalars whose replay hooks keep the host state what N eager steps leave, so checkpoints and
   a resumed run see no difference. Where capture cannot work the reason is printed and the
   run stays eager; a capture that fails (an op that synchronises, say) falls back the same way.
   -------------------------------------------------------------------------------------- */

#define MGPU__GRAPH_WARMUP 2

struct mgpu__fit_graph {
#ifdef MGPU_CUDA
    mgpu__step_graph *sg;
#endif
    mgpu_tensor *x, *y;                /* the fixed inputs every captured batch is copied into */
    const float *loss;                 /* the captured step's loss, in the graph's arena */
    int warmed;                        /* eager steps run in the pool so far */
    int captured;
};

static void mgpu__fit_graph_free(mgpu__fit *f) {
    mgpu__fit_graph *g = f->graph;
    if (!g) return;
#ifdef MGPU_CUDA
    mgpu__step_graph_destroy(g->sg);
#endif
    mgpu_tensor_free(g->x);
    mgpu_tensor_free(g->y);
    mgpu_free(g);
    f->graph = NULL;
}

/* Whether this run captures, or why not (f->graph_note completes the startup line). */
static mgpu_result mgpu__fit_graph_plan(mgpu__fit *f) {
    const mgpu_train_opts *o = f->t->opts;
    const char *off = NULL;
    f->graph_note[0] = 0;
    if (f->t->ctx->device.type != MGPU_DEVICE_CUDA) return MGPU_OK;
    if (o->cuda_graph == MGPU_CUDA_GRAPH_OFF) off = "off";
    else if (o->eval_only) off = "off (--eval-only: no training step to capture)";
    else if (f->scaler.enabled) off = "off (fp16 loss scaling reads the found-inf flag on the host each step to skip or take the step)";
    else if (f->t->comm) off = "off (DDP: the gradient all-reduces are started from the host as buckets fill during backward)";
    else if (o->grad_accum_steps > 1) off = "off (--grad-accum-steps > 1: the optimizer steps on every Nth batch only)";
    if (off) { snprintf(f->graph_note, sizeof f->graph_note, "%s", off); return MGPU_OK; }
#ifdef MGPU_CUDA
    if (!(f->graph = (mgpu__fit_graph *)mgpu__calloc(sizeof *f->graph, "the CUDA Graph state"))) return mgpu_last_result();
    if (!(f->graph->sg = mgpu__step_graph_create(f->t->ctx))) {   /* short of device memory: eager steps may still fit */
        snprintf(f->graph_note, sizeof f->graph_note, "off (the graph's own memory pool could not be allocated: %.200s)", mgpu_last_error());
        mgpu__fit_graph_free(f);
        mgpu_clear_error();
        return MGPU_OK;
    }
#endif
    snprintf(f->graph_note, sizeof f->graph_note, "on (the step is captured after %d eager warm-up steps; a batch of another size runs eagerly)",
             MGPU__GRAPH_WARMUP);
    return MGPU_OK;
}

/* The graph pool's activation arena at its peak (0 without a graph). */
static size_t mgpu__fit_graph_arena_peak(const mgpu__fit *f) {
#ifdef MGPU_CUDA
    if (f->graph) return f->graph->sg->inside ? f->t->ctx->device_arena.peak : f->graph->sg->arena.peak;
#endif
    (void)f;
    return 0;
}

static int mgpu__fit_graph_same(const mgpu_tensor *fixed, const mgpu_tensor *t) {
    return fixed->dtype == t->dtype && fixed->ndim == t->ndim && memcmp(fixed->shape, t->shape, sizeof(int64_t) * (size_t)t->ndim) == 0;
}
/* A full batch of the captured shape (the first full batch sets it). */
static int mgpu__fit_graph_fits(const mgpu__fit *f, const mgpu_batch *b) {
    const mgpu__fit_graph *g = f->graph;
    if (!g || b->size != f->t->opts->batch_size) return 0;
    return !g->x || (mgpu__fit_graph_same(g->x, b->x) && mgpu__fit_graph_same(g->y, b->y));
}

#ifdef MGPU_CUDA
/* The batch into the fixed inputs, on the context's stream (ordered after the loader's upload). */
static mgpu_result mgpu__fit_graph_inputs(mgpu__fit_graph *g, mgpu_context *ctx, const mgpu_batch *b) {
    mgpu_result r;
    if (!g->x && (!(g->x = mgpu_tensor_create(ctx, b->x->dtype, b->x->ndim, b->x->shape)) ||
                  !(g->y = mgpu_tensor_create(ctx, b->y->dtype, b->y->ndim, b->y->shape))))
        return mgpu_last_result();
    if ((r = mgpu_cuda_copy_d2d_async(g->x->data, b->x->data, mgpu_tensor_nbytes(b->x), ctx->cuda_stream)) != MGPU_OK) return r;
    return mgpu_cuda_copy_d2d_async(g->y->data, b->y->data, mgpu_tensor_nbytes(b->y), ctx->cuda_stream);
}

/* An eager step in the pool (warm-up) or its capture, then the first launch of the capture.
   *loss: the step's loss on the host. */
static mgpu_result mgpu__fit_graph_record(mgpu__fit *f, double *loss) {
    mgpu__fit_graph *g = f->graph;
    mgpu_context *ctx = f->t->ctx;
    mgpu_tensor *l = NULL;
    int capture = g->warmed >= MGPU__GRAPH_WARMUP;
    mgpu_result r, e;
    mgpu__step_graph_use(g->sg, 1);
    r = capture ? mgpu__step_graph_begin(g->sg) : MGPU_OK;
    if (r == MGPU_OK) r = mgpu__fit_forward_backward(f, g->x, g->y, &l);
    if (r == MGPU_OK) r = mgpu__fit_optimizer_step(f);
    if (capture && (e = mgpu__step_graph_end(g->sg, r != MGPU_OK)) != MGPU_OK && r == MGPU_OK) r = e;
    if (r == MGPU_OK && capture) { g->captured = 1; g->loss = (const float *)l->data; r = mgpu__step_graph_launch(g->sg); }
    if (r == MGPU_OK) *loss = capture ? 0.0 : mgpu_tensor_item(l);
    mgpu_context_end_step(ctx);
    mgpu__step_graph_use(g->sg, 0);
    g->warmed++;
    return r;
}

/* A replay: the LR of this step, the graph (its hooks step the optimizer's counts, the RNG, ...). */
static mgpu_result mgpu__fit_graph_replay(mgpu__fit *f) {
    mgpu_optimizer_set_lr(f->opt, mgpu_lr_at(&f->schedule, f->step));
    f->step++;
    f->micro = 0;
    return mgpu__step_graph_launch(f->graph->sg);
}

/* A capture that failed: said once, the graph dropped, and the step run eagerly as if never tried. */
static mgpu_result mgpu__fit_graph_give_up(mgpu__fit *f, const mgpu_batch *b, int64_t step) {
    int stepped = 1;
    printf("cuda graph off from step %lld: capturing the step failed (%s); it runs uncaptured\n", (long long)step + 1, mgpu_last_error());
    fflush(stdout);
    mgpu__fit_graph_free(f);
    mgpu_clear_error();
    f->step = step; f->micro = 0;
    return mgpu__fit_batch(f, b, &stepped);
}

static mgpu_result mgpu__fit_graph_batch(mgpu__fit *f, const mgpu_batch *b) {
    mgpu__fit_graph *g = f->graph;
    mgpu_context *ctx = f->t->ctx;
    double t0 = mgpu_time_s(), loss = NAN;
    int64_t step = f->step;
    int was_captured = g->captured;
    float v = NAN;
    mgpu_result r = mgpu__fit_graph_inputs(g, ctx, b);
    if (r != MGPU_OK) return r;
    if (was_captured) r = mgpu__fit_graph_replay(f);
    else if ((r = mgpu__fit_graph_record(f, &loss)) != MGPU_OK && g->warmed > MGPU__GRAPH_WARMUP) return mgpu__fit_graph_give_up(f, b, step);
    if (r == MGPU_OK && g->captured && (r = mgpu__transfer(ctx, &v, g->loss, sizeof v, "reading the captured step's loss")) == MGPU_OK) loss = v;
    if (r == MGPU_OK && g->captured && !was_captured) {
        printf("cuda graph captured at step %lld\n", (long long)step + 1);
        fflush(stdout);
    }
    f->es.compute_s += mgpu_time_s() - t0;   /* the optimizer step is inside the graph: its time is compute here */
    mgpu__fit_count_loss(f, loss, b->size);
    return r;
}
#else
static mgpu_result mgpu__fit_graph_batch(mgpu__fit *f, const mgpu_batch *b) {
    (void)f; (void)b;
    return mgpu__fail(MGPU_ERR_UNSUPPORTED, "CUDA Graph capture needs a CUDA build");
}
#endif

/* After each optimizer step: stop conditions, then a checkpoint if one is due. */
static mgpu_result mgpu__fit_after_step(mgpu__fit *f) {
    const mgpu_train_opts *o = f->t->opts;
    int signal = mgpu__fit_saving(f) ? (int)mgpu__stop_signal : 0;   /* handled only with a checkpoint to save */
    int time_due = mgpu__fit_checkpoint_time_due(f);
    mgpu_result r;
    if (o->max_steps > 0 && f->step >= o->max_steps) f->stop = 1;
    if ((r = mgpu__fit_agree_stop(f, &signal, &time_due)) != MGPU_OK) return r;
    if (signal) { f->stop = 1; f->signal = signal; }
    return mgpu__fit_checkpoint_due(f, time_due) ? mgpu__fit_checkpoint(f, f->signal != 0) : MGPU_OK;
}

/* The rest of the epoch in progress, from batch f->batch. */
static mgpu_result mgpu__fit_epoch(mgpu__fit *f) {
    const mgpu_train_opts *o = f->t->opts;
    char label[64];
    mgpu_progress *bar;
    mgpu_batch b;
    mgpu_result r;
    double t_start = mgpu_time_s();
    int64_t seen = f->es.samples;
    mgpu_model_train(f->model, 1);
    if ((r = mgpu_loader_set_epoch(f->loader, f->epoch, f->batch)) != MGPU_OK) return r;
    snprintf(label, sizeof label, "epoch %lld/%d", (long long)f->epoch + 1, o->epochs);
    bar = f->t->rank == 0 ? mgpu_progress_begin(label, f->batches_per_epoch, o->log_every) : NULL;
    f->clock = t_start;
    while (!f->stop) {
        double t0 = mgpu_time_s();
        int stepped = 0;
        r = mgpu_loader_next(f->loader, &b);
        f->es.data_wait_s += mgpu_time_s() - t0;
        if (r != MGPU_OK || b.size == 0) break;
        if ((r = mgpu__fit_batch(f, &b, &stepped)) != MGPU_OK) break;
        f->batch = b.index + 1;
        mgpu_progress_update(bar, f->batch, f->es.loss_sum / (double)f->es.samples);
        if (stepped && (r = mgpu__fit_after_step(f)) != MGPU_OK) break;
    }
    mgpu_progress_end(bar);
    mgpu__fit_clock(f);
    f->run_time += mgpu_time_s() - t_start;
    f->run_samples += (double)(f->es.samples - seen);
    return r;
}

static void mgpu__epoch_record_json(mgpu__buf *b, const mgpu_epoch_record *r) {
    mgpu__buf_printf(b, "{\"epoch\":%lld,\"step\":%lld,", (long long)r->epoch, (long long)r->step);
    mgpu__json_member(b, "train_loss", r->train_loss); mgpu__buf_puts(b, ",");
    mgpu__json_member(b, "test_loss", r->test_loss); mgpu__buf_puts(b, ",");
    mgpu__json_member(b, "test_accuracy", r->test_accuracy); mgpu__buf_puts(b, ",");
    mgpu__json_member(b, "lr", r->lr); mgpu__buf_puts(b, ",");
    mgpu__json_member(b, "epoch_time_s", r->epoch_time_s); mgpu__buf_puts(b, ",");
    mgpu__json_member(b, "samples_per_s", r->samples_per_s);
    mgpu__buf_printf(b, ",\"world_size\":%d,\"global_batch\":%lld,\"amp\":", r->world_size, (long long)r->global_batch);
    mgpu__buf_json_string(b, r->amp ? r->amp : "off");
    if (r->extra_json && r->extra_json[0]) mgpu__buf_printf(b, ",%s", r->extra_json);
    mgpu__buf_puts(b, "}");
}

/* Where the epoch's time went, and memory, as extra metrics members. */
static void mgpu__fit_extra_json(const mgpu__fit *f, mgpu__buf *b) {
    int i;
    for (i = 2; i < MGPU__N_EPOCH_STATS; i++) { /* after loss_sum and time_s (the record has those) */
        if (i > 2) mgpu__buf_puts(b, ",");
        mgpu__json_member(b, mgpu__epoch_stat_fields[i].key, *(const double *)(const void *)((const char *)&f->es + mgpu__epoch_stat_fields[i].offset));
    }
    /* host arena (headers, tape) plus, on a GPU, the device arena (activations) and a captured step's own */
    mgpu__buf_printf(b, ",\"peak_arena_bytes\":%zu,", f->t->ctx->arena.peak + f->t->ctx->device_arena.peak + mgpu__fit_graph_arena_peak(f));
    mgpu__json_member(b, "rss_mb", mgpu__peak_rss_mb());
#ifdef MGPU_CUDA
    if (f->t->ctx->device.type == MGPU_DEVICE_CUDA) {   /* the caching allocator's view, as torch.cuda.memory_allocated/reserved/max_allocated */
        mgpu_memory_stats ms;
        if (mgpu_memory_stats_get(f->t->ctx->device.index, &ms) == MGPU_OK) {
            mgpu__buf_puts(b, ",");
            mgpu__json_member(b, "gpu_mem_allocated_mb", mgpu__mib(ms.allocated)); mgpu__buf_puts(b, ",");
            mgpu__json_member(b, "gpu_mem_reserved_mb", mgpu__mib(ms.reserved)); mgpu__buf_puts(b, ",");
            mgpu__json_member(b, "gpu_mem_peak_mb", mgpu__mib(ms.peak));
        }
    }
#endif
    if (f->ddp) {   /* cumulative: all-reduce time and how much of it backward had to wait for */
        mgpu_ddp_stats st;
        mgpu_ddp_get_stats(f->ddp, &st);
        mgpu__buf_printf(b, ",\"ddp_buckets\":%lld,\"ddp_bytes_per_step\":%.0f,", (long long)st.buckets, st.bytes_per_step);
        mgpu__json_member(b, "ddp_allreduce_s", st.comm_s);
        mgpu__buf_puts(b, ",");
        mgpu__json_member(b, "ddp_exposed_s", st.exposed_s);
    }
}

static mgpu_result mgpu__fit_report_epoch(mgpu__fit *f, double test_loss, double test_acc) {
    const mgpu_train_opts *o = f->t->opts;
    mgpu_epoch_record rec;
    mgpu__buf extra;
    mgpu_result r;
    double sums[2];   /* loss sum and samples over all ranks */
    double train_loss;
    sums[0] = f->es.loss_sum; sums[1] = (double)f->es.samples;
    if (f->t->comm && (r = mgpu_comm_allreduce_f64(f->t->comm, sums, 2, MGPU_REDUCE_SUM)) != MGPU_OK) return r;
    train_loss = sums[1] > 0 ? sums[0] / sums[1] : NAN;
    memset(&rec, 0, sizeof rec);
    mgpu__buf_init(&extra);
    mgpu__fit_extra_json(f, &extra);
    rec.epoch = f->epoch + 1; rec.step = f->step;
    rec.train_loss = train_loss; rec.test_loss = test_loss; rec.test_accuracy = test_acc;
    rec.lr = mgpu_optimizer_lr(f->opt);
    rec.epoch_time_s = f->es.time_s;
    rec.samples_per_s = f->es.time_s > 0 ? sums[1] / f->es.time_s : 0;   /* all ranks together */
    rec.world_size = f->t->world_size; rec.global_batch = o->batch_size * o->grad_accum_steps * f->t->world_size;
    rec.amp = mgpu__amp_mode_name(o->amp);
    rec.extra_json = extra.data;
    if (f->t->rank == 0) {
        printf("epoch %lld/%d  train_loss %.4f  test_loss %.4f  test_acc %.4f  lr %.3g  %.2f s  %.0f samples/s\n",
               (long long)rec.epoch, o->epochs, train_loss, test_loss, test_acc, rec.lr, rec.epoch_time_s, rec.samples_per_s);
        fflush(stdout);
    }
    if (f->history.len) mgpu__buf_puts(&f->history, ",");
    mgpu__epoch_record_json(&f->history, &rec);
    r = extra.failed || f->history.failed ? MGPU_ERR_OOM_HOST : mgpu_metrics_write_epoch(f->metrics, &rec);
    mgpu__buf_free(&extra);
    return r;
}

/* Evaluation sharded over the ranks (DDP and DP): each evaluates its strided shard of the test set
   and the sums are all-reduced, so W ranks share the work instead of each doing all of it. */
static mgpu_result mgpu__fit_evaluate(mgpu__fit *f, const mgpu_dataset *test, double *loss, double *accuracy) {
    const mgpu_trainer *t = f->t;
    mgpu_dataset view;
    mgpu__shard shard;
    double sums[3];
    mgpu_result r;
    int sharded = t->comm && t->world_size > 1;
    if (sharded) mgpu__shard_view(test, &shard, t->rank, t->world_size, &view);
    r = mgpu__evaluate_sums(t->ctx, f->model, f->forward, f->user, sharded ? &view : test, 1000, sums);
    if (r == MGPU_OK && sharded) r = mgpu_comm_allreduce_f64(t->comm, sums, 3, MGPU_REDUCE_SUM);
    if (r == MGPU_OK) mgpu__evaluate_ratios(sums, loss, accuracy);
    return r;
}

/* Evaluation, the metrics line, then the next epoch (and an epoch checkpoint when due). */
static mgpu_result mgpu__fit_end_epoch(mgpu__fit *f, const mgpu_dataset *test, mgpu_train_summary *s) {
    const mgpu_train_opts *o = f->t->opts;
    double test_loss = NAN, test_acc = NAN;
    mgpu_result r;
    int last = f->epoch + 1 == o->epochs;
    if (test && (last || f->stop || (o->eval_frequency > 0 && (f->epoch + 1) % o->eval_frequency == 0))) {
        r = mgpu__fit_evaluate(f, test, &test_loss, &test_acc);
        if (r != MGPU_OK) return r;
    }
    if ((r = mgpu__fit_report_epoch(f, test_loss, test_acc)) != MGPU_OK) return r;
    s->final_train_loss = f->es.samples ? f->es.loss_sum / (double)f->es.samples : NAN;
    s->final_test_loss = test_loss; s->final_test_accuracy = test_acc;
    f->epoch++;
    f->batch = 0;
    memset(&f->es, 0, sizeof f->es);
    if (mgpu__fit_saving(f) && o->checkpoint_every_epochs > 0 && f->epoch % o->checkpoint_every_epochs == 0) {
        f->clock = mgpu_time_s();
        r = mgpu__fit_checkpoint(f, 0);
        memset(&f->es, 0, sizeof f->es); /* its time belongs to no epoch's training */
    }
    return r;
}

static mgpu_result mgpu__fit_run(mgpu__fit *f, const mgpu_dataset *test, mgpu_train_summary *s) {
    mgpu_result r = MGPU_OK;
    /* stopped exactly at an epoch boundary (resumed at --max-steps): nothing left to report */
    while (f->epoch < f->t->opts->epochs && !(f->stop && f->batch == 0)) {
        if ((r = mgpu__fit_epoch(f)) != MGPU_OK || f->signal) break;
        if ((r = mgpu__fit_end_epoch(f, test, s)) != MGPU_OK || f->stop) break;
    }
    s->steps = f->step;
    s->samples_per_s = f->run_time > 0 ? f->run_samples / f->run_time : 0;
    return r;
}

/* mgpu_model_save from any device: a model on a GPU is staged into a host copy (same names,
   dtypes and shapes) with one copy per tensor, so the final model is written whatever the
   safetensors writer accepts. */
static mgpu_result mgpu__model_save_staged(const mgpu_model *model, const char *path) {
    mgpu_context_desc cd;
    mgpu_context *cpu;
    mgpu_model *host;
    mgpu_result r = MGPU_OK;
    int i;
    if (model->ctx->device.type == MGPU_DEVICE_CPU) return mgpu_model_save(model, path);
    memset(&cd, 0, sizeof cd);
    cd.num_threads = 1; cd.arena_bytes = 4096;   /* this context runs no ops */
    if (!(cpu = mgpu_context_create(&cd))) return mgpu_last_result();
    if (!(host = mgpu_model_create(cpu))) r = mgpu_last_result();
    for (i = 0; r == MGPU_OK && i < model->params.count; i++) {
        const mgpu_tensor *t = model->params.items[i].tensor;
        if (!mgpu_model_add_parameter(host, model->params.items[i].name, t->dtype, t->ndim, t->shape)) r = mgpu_last_result();
    }
    for (i = 0; r == MGPU_OK && i < model->buffers.count; i++) {
        const mgpu_tensor *t = model->buffers.items[i].tensor;
        if (!mgpu_model_add_buffer(host, model->buffers.items[i].name, t->dtype, t->ndim, t->shape)) r = mgpu_last_result();
    }
    if (r == MGPU_OK) r = mgpu_model_copy_state(host, model);
    if (r == MGPU_OK) r = mgpu_model_save(host, path);
    mgpu_model_destroy(host);
    mgpu_context_destroy(cpu);
    return r;
}

static mgpu_result mgpu__fit_save(const mgpu_train_opts *o, const mgpu_model *model) {
    char path[MGPU__CKPT_PATH_MAX];
    mgpu_result r;
    if (!o->save_dir || !o->save_dir[0]) return MGPU_OK;
    if ((r = mgpu__mkdirs(o->save_dir)) != MGPU_OK) return r;
    if ((r = mgpu__path_join(path, o->save_dir, "model.safetensors")) != MGPU_OK) return r;
    if ((r = mgpu__model_save_staged(model, path)) == MGPU_OK) printf("saved %s\n", path);
    return r;
}

static mgpu_result mgpu__fit_final_metrics(mgpu__fit *f, const mgpu_train_summary *s) {
    char extra[256];
    snprintf(extra, sizeof extra, "\"step\":%lld,\"test_accuracy\":%.6f,\"test_loss\":%.6f,\"samples_per_s\":%.1f",
             (long long)s->steps, s->final_test_accuracy == s->final_test_accuracy ? s->final_test_accuracy : -1.0,
             s->final_test_loss == s->final_test_loss ? s->final_test_loss : -1.0, s->samples_per_s);
    return mgpu_metrics_write_final(f->metrics, extra);
}

/* The end of a run: the final metrics, a last checkpoint (so --resume auto knows the run is
   over rather than repeating its last steps) and the model; or, stopped by a signal, the word. */
static mgpu_result mgpu__fit_finish(mgpu__fit *f, const mgpu_train_summary *s) {
    char name[40];
    mgpu_result r;
    if (f->signal) {
        mgpu__ckpt_dir_name(name, sizeof name, f->step);
        if (f->t->rank == 0) {
            printf("stopped by %s after step %lld (signal %d); checkpoint saved to %s/%s; to continue, run the same command with --resume auto\n",
                   f->signal == SIGINT ? "Ctrl-C (SIGINT)" : f->signal == SIGTERM ? "SIGTERM" : f->signal == SIGUSR1 ? "SIGUSR1" : "a signal",
                   (long long)f->step, (int)f->signal, f->t->opts->save_dir, name);
            fflush(stdout);
        }
        return MGPU_OK;
    }
    if ((r = mgpu__fit_final_metrics(f, s)) != MGPU_OK) return r;
    if (mgpu__fit_saving(f) && f->saved_step != f->step && (r = mgpu__fit_checkpoint(f, 1)) != MGPU_OK) return r;
    return f->t->rank == 0 ? mgpu__fit_save(f->t->opts, f->model) : MGPU_OK;
}

/* A finished run resumed: what it ended with, from its last epoch record; nothing is written. */
static void mgpu__fit_summary_of_finished(const mgpu__fit *f, mgpu_train_summary *s) {
    mgpu__buf text;
    mgpu_json *records = NULL;
    const mgpu_json *last = NULL, *m;
    s->steps = f->step;
    mgpu__buf_init(&text);
    mgpu__buf_puts(&text, "[");   /* the history is objects joined by commas */
    if (f->history.len) mgpu__buf_append(&text, f->history.data, f->history.len);
    mgpu__buf_puts(&text, "]");
    if (!text.failed && (records = mgpu_json_parse(text.data, text.len, "the checkpoint's metrics")) != NULL)
        for (m = records->child; m; m = m->next) last = m;
    if (last) {
        s->final_train_loss = mgpu__json_number_or_nan(mgpu_json_get(last, "train_loss"));
        s->final_test_loss = mgpu__json_number_or_nan(mgpu_json_get(last, "test_loss"));
        s->final_test_accuracy = mgpu__json_number_or_nan(mgpu_json_get(last, "test_accuracy"));
    }
    mgpu_json_free(records);
    mgpu__buf_free(&text);
    mgpu_clear_error();
}

static mgpu_ddp *mgpu__ddp_from_opts(mgpu_model *model, mgpu_comm *comm, const mgpu_train_opts *o) {
    mgpu_ddp_desc dd;
    memset(&dd, 0, sizeof dd);
    dd.bucket_cap_mb = o->bucket_cap_mb;
    dd.sync_batchnorm = o->sync_batchnorm;
    dd.compress = o->grad_compression == MGPU_GRAD_COMPRESSION_FP16 ? MGPU_F16 : o->grad_compression == MGPU_GRAD_COMPRESSION_BF16 ? MGPU_BF16 : MGPU_F32;
    return mgpu_ddp_create(model, comm, &dd);
}

/* Loader, schedule, optimizer, DDP, scaler and checkpointer from the options. */
static mgpu_result mgpu__fit_setup(mgpu__fit *f, const mgpu_dataset *train) {
    const mgpu_train_opts *o = f->t->opts;
    mgpu_loader_desc ld;
    float lr;
    mgpu_result r;
    memset(&ld, 0, sizeof ld);
    ld.batch_size = o->batch_size; ld.shuffle = 1; ld.seed = o->seed; ld.num_workers = o->num_workers; ld.ctx = f->t->ctx;
    ld.rank = f->t->rank; ld.world_size = f->t->world_size; ld.data_on_device = o->data_on_device;
    if (!(f->loader = mgpu_loader_create(train, &ld))) return mgpu_last_result();
    f->batches_per_epoch = mgpu_loader_num_batches(f->loader);
    lr = mgpu_lr_scale(o->lr, f->t->world_size, o->grad_accum_steps, o->scale_lr);
    f->schedule = mgpu__schedule_from_opts(o, lr, (f->batches_per_epoch + o->grad_accum_steps - 1) / o->grad_accum_steps);
    if (!(f->opt = mgpu__optimizer_from_opts(f->model, o, lr))) return mgpu_last_result();
    if (f->t->comm && !(f->ddp = mgpu__ddp_from_opts(f->model, f->t->comm, o))) return mgpu_last_result();
    mgpu_context_set_autocast(f->t->ctx, f->t->amp);
    mgpu_grad_scaler_init(&f->scaler, f->t->amp == MGPU_AMP_FP16);
    f->saved_time = mgpu_time_s();
    f->saved_step = -1;
    if (o->save_dir && o->save_dir[0] && f->t->rank == 0 && !o->eval_only) {
        mgpu_checkpoint_desc cd;
        memset(&cd, 0, sizeof cd);
        cd.dir = o->save_dir; cd.keep_last = o->keep_last; cd.background = 1;
        if (!(f->ckpt = mgpu_checkpointer_create(&cd))) return mgpu_last_result();
        /* fault the snapshot buffer in on the writer thread now, so the first save stalls no more than later ones */
        if ((r = mgpu__checkpointer_reserve(f->ckpt, f->model, f->opt)) != MGPU_OK) return r;
    }
    return MGPU_OK;
}

/* The startup line on a GPU: which device trains, and what --cuda-graph does (and why not).
   CPU runs print nothing here (their output stays as it was). */
static void mgpu__fit_announce_device(const mgpu__fit *f) {
#ifdef MGPU_CUDA
    const mgpu_context *ctx = f->t->ctx;
    char desc[320];
    if (ctx->device.type != MGPU_DEVICE_CUDA) return;
    mgpu__cuda_device_describe(ctx->device.index, desc, sizeof desc);
    printf("device cuda:%d (%s); cuda graph %s\n", ctx->device.index, desc, f->graph_note);
    fflush(stdout);
#else
    (void)f;
#endif
}

/* The startup line on a GPU saying where the training set lives (--data-on-device), and why
   auto chose streaming. */
static void mgpu__fit_announce_data(const mgpu__fit *f, const mgpu_dataset *train) {
    const char *why = "";
    if (f->t->ctx->device.type == MGPU_DEVICE_CPU) return;
    if (mgpu_loader_data_on_device(f->loader) == 1) {
        printf("data on device: the training set is resident on cuda:%d, batches gathered there\n", f->t->ctx->device.index);
        fflush(stdout);
        return;
    }
    if (f->t->opts->data_on_device == MGPU_DATA_ON_DEVICE_AUTO)
        why = train->static_samples ? " (auto: the set takes more than 1/4 of the free device memory)"
                                    : " (auto: the dataset may augment its samples: static_samples is 0)";
    printf("data on device: no, batches stream from pinned host memory on a copy stream%s\n", why);
    fflush(stdout);
}

/* --------------------------------------------------------------------------------------
   Where the weights come from: a checkpoint (--resume), a file (--init-from), or the model's
   own initialisation; and --eval-only, which trains nothing.
   -------------------------------------------------------------------------------------- */

/* --init-from FILE: weights (and buffers) from a safetensors file with the model's names and
   shapes, PyTorch's state_dict convention; the optimizer stays fresh. Every rank reads the file. */
static mgpu_result mgpu__fit_init_from(mgpu__fit *f) {
    const char *path = f->t->opts->init_from;
    char why[1024];
    if (mgpu_model_load(f->model, path) != MGPU_OK) {
        snprintf(why, sizeof why, "%s", mgpu_last_error());
        return mgpu__fail(MGPU_ERR_FORMAT, "--init-from %s: %s (the file must hold exactly the model's tensors, under the names "
                          "and shapes of its PyTorch state_dict)", path, why);
    }
    if (f->t->rank == 0) {
        printf("initialised from %s (%d tensors); fresh optimizer\n", path, mgpu_model_num_parameters(f->model) + mgpu_model_num_buffers(f->model));
        fflush(stdout);
    }
    return MGPU_OK;
}

/* --resume, then (nothing resumed) --init-from. --eval-only with --resume must find a checkpoint:
   evaluating a fresh model instead would report a meaningless accuracy as the checkpoint's. */
static mgpu_result mgpu__fit_initial_state(mgpu__fit *f) {
    const mgpu_train_opts *o = f->t->opts;
    mgpu_result r;
    if ((r = mgpu__fit_resume(f)) != MGPU_OK) return r;
    if (o->eval_only && o->resume != MGPU_RESUME_NONE && !f->resumed)
        return mgpu__fail(MGPU_ERR_IO, "--eval-only --resume %s: no checkpoint found to evaluate", o->resume == MGPU_RESUME_AUTO ? "auto" : o->resume_path);
    if (!f->resumed && o->init_from && o->init_from[0]) return mgpu__fit_init_from(f);
    return MGPU_OK;
}

/* --eval-only: the test set once; the line printed and a metrics line {"event":"final","eval_only":true,...}. */
static mgpu_result mgpu__fit_eval_only(mgpu__fit *f, const mgpu_dataset *test, mgpu_train_summary *s) {
    char extra[256];
    double loss = NAN, acc = NAN;
    mgpu_result r;
    if (!test) return mgpu__fail(MGPU_ERR_INVALID_ARG, "--eval-only: this program passed no test set to the trainer");
    if ((r = mgpu_evaluate(f->t->ctx, f->model, f->forward, f->user, test, 1000, &loss, &acc)) != MGPU_OK) return r;
    s->final_test_loss = loss; s->final_test_accuracy = acc; s->steps = f->step;
    if (f->t->rank == 0) {
        printf("eval-only: test_loss %.4f  test_acc %.4f  (the model of step %lld)\n", loss, acc, (long long)f->step);
        fflush(stdout);
    }
    snprintf(extra, sizeof extra, "\"eval_only\":true,\"step\":%lld,\"test_accuracy\":%.6f,\"test_loss\":%.6f", (long long)f->step, acc, loss);
    return mgpu_metrics_write_final(f->metrics, extra);
}

/* "Using 4 GPUs: [0, 1, 2, 3] (DDP, 4 processes, global batch 512)", from rank 0, when several
   ranks train on GPUs (DDP or DP; DP with one replica too). A collective (every rank's device is gathered): all ranks call it. */
static mgpu_result mgpu__fit_announce_gpus(const mgpu__fit *f) {
    const mgpu_trainer *t = f->t;
    const mgpu_train_opts *o = t->opts;
    int32_t mine, *all;
    char ids[MGPU_MAX_GPU_IDS * 8];
    size_t at = 0;
    int i, dp = o->multi_gpu == MGPU_MULTI_GPU_DP;
    mgpu_result r;
    if (!t->comm || (t->world_size < 2 && !dp) || t->ctx->device.type != MGPU_DEVICE_CUDA) return MGPU_OK;
    mine = t->ctx->device.index;
    if (!(all = (int32_t *)mgpu__calloc(sizeof *all * (size_t)t->world_size, "the ranks' devices"))) return mgpu_last_result();
    if ((r = mgpu_comm_allgather_bytes(t->comm, &mine, sizeof mine, all)) == MGPU_OK && t->rank == 0) {
        ids[0] = 0;
        for (i = 0; i < t->world_size && at + 16 < sizeof ids; i++) at += (size_t)snprintf(ids + at, sizeof ids - at, i ? ", %d" : "%d", (int)all[i]);
        printf("Using %d GPU%s: [%s] (%s, %d process%s, global batch %lld)\n", t->world_size, t->world_size == 1 ? "" : "s", ids, dp ? "DP" : "DDP", dp ? 1 : t->world_size,
               dp || t->world_size == 1 ? "" : "es", (long long)(o->batch_size * t->world_size * o->grad_accum_steps));
        fflush(stdout);
    }
    mgpu_free(all);
    return r;
}

MGPU_API mgpu_result mgpu_trainer_fit(mgpu_trainer *t, mgpu_model *model, mgpu_forward_fn forward, void *user,
                                      const mgpu_dataset *train, const mgpu_dataset *test, mgpu_train_summary *summary) {
    const mgpu_train_opts *o;
    mgpu__fit f;
    mgpu__signals sig;
    mgpu_train_summary s;
    mgpu_result r, w;
    if (!t || !model || !forward || !train)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_trainer_fit: trainer, model, forward and the training set are required");
    o = t->opts;
    if (o->grad_accum_steps < 1) return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grad-accum-steps must be >= 1");
    memset(&f, 0, sizeof f);
    memset(&s, 0, sizeof s);
    memset(&sig, 0, sizeof sig);
    s.final_train_loss = s.final_test_loss = s.final_test_accuracy = NAN;
    f.t = t; f.model = model; f.forward = forward; f.user = user;
    mgpu__buf_init(&f.history);
    if ((r = mgpu__fit_setup(&f, train)) == MGPU_OK && (r = mgpu_model_zero_grad(model)) == MGPU_OK && (r = mgpu__fit_initial_state(&f)) == MGPU_OK &&
        !(f.metrics = mgpu_metrics_open(t->rank == 0 ? o->metrics : NULL)))
        r = mgpu_last_result();
    if (r == MGPU_OK) r = mgpu__fit_graph_plan(&f);
    if (r == MGPU_OK && t->rank == 0) { mgpu__fit_announce_device(&f); mgpu__fit_announce_data(&f, train); }
    if (r == MGPU_OK) r = mgpu__fit_announce_gpus(&f);   /* a collective: every rank */
    if (r == MGPU_OK && o->eval_only) r = mgpu__fit_eval_only(&f, test, &s);
    else if (r == MGPU_OK && f.finished) mgpu__fit_summary_of_finished(&f, &s);
    else if (r == MGPU_OK) {
        if (o->save_dir && o->save_dir[0]) mgpu__signals_install(&sig, t->rank != 0);   /* every rank: they stop together */
        if ((r = mgpu__fit_run(&f, test, &s)) == MGPU_OK) r = mgpu__fit_finish(&f, &s);
        mgpu__signals_restore(&sig);
    }
    /* a background checkpoint still being written must land (or its failure be told) */
    if (f.ckpt && (w = mgpu_checkpointer_wait(f.ckpt)) != MGPU_OK && r == MGPU_OK) r = w;
    mgpu_checkpointer_destroy(f.ckpt);
    mgpu__fit_graph_free(&f);
    mgpu_ddp_destroy(f.ddp);
    mgpu_context_set_autocast(t->ctx, MGPU_AMP_OFF);
    mgpu__buf_free(&f.history);
    mgpu_metrics_close(f.metrics);
    mgpu_optimizer_destroy(f.opt);
    mgpu_loader_destroy(f.loader);
    s.stop_signal = f.signal;
    if (summary) *summary = s;
    return r;
}

/* One model built by the user's builder, in memory the trainer owns. */
typedef struct mgpu__built { mgpu_model *model; void *user; } mgpu__built;
static mgpu_result mgpu__build(mgpu_context *ctx, mgpu_build_fn build, size_t user_size, mgpu__built *b) {
    b->user = mgpu__calloc(user_size ? user_size : 1, "the model's layer table");
    b->model = b->user ? mgpu_model_create(ctx) : NULL;
    if (!b->model) return mgpu_last_result();
    if (!build(b->model, b->user))
        return mgpu_last_result() ? mgpu_last_result() : mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_trainer_run: the build function failed");
    return MGPU_OK;
}
static void mgpu__unbuild(mgpu__built *b) { mgpu_model_destroy(b->model); mgpu_free(b->user); }

/* DataParallel: each replica is a rank of an in-process communicator with its own context and
   model, trained by the same loop as DDP (rank 0 prints, writes metrics and checkpoints). */
typedef struct mgpu__dp_job {
    const mgpu_trainer *parent;
    mgpu_build_fn build; size_t user_size; mgpu_forward_fn forward;
    const mgpu_dataset *train, *test;
    mgpu_train_summary summary;   /* rank 0's */
} mgpu__dp_job;

static mgpu_result mgpu__dp_train_replica(int rank, mgpu_comm *comm, void *arg) {
    mgpu__dp_job *job = (mgpu__dp_job *)arg;
    mgpu_trainer rt = *job->parent;
    mgpu_context_desc cd;
    mgpu__built b;
    mgpu_result r;
    memset(&cd, 0, sizeof cd);
    memset(&b, 0, sizeof b);
    cd.device = job->parent->ctx->device;
    if (cd.device.type == MGPU_DEVICE_CUDA) cd.device.index = job->parent->opts->gpu_ids[rank];   /* its communicator's device */
    cd.seed = job->parent->opts->seed;
    cd.num_threads = MGPU__MAX(1, mgpu_context_num_threads(job->parent->ctx) / job->parent->dp_replicas);
    rt.rank = rank; rt.world_size = job->parent->dp_replicas; rt.comm = comm; rt.dp_replicas = 0;
    if (!(rt.ctx = mgpu_context_create(&cd))) return mgpu_last_result();
    if ((r = mgpu__build(rt.ctx, job->build, job->user_size, &b)) == MGPU_OK)
        r = mgpu_trainer_fit(&rt, b.model, job->forward, b.user, job->train, job->test, rank == 0 ? &job->summary : NULL);
    mgpu__unbuild(&b);
    mgpu_context_destroy(rt.ctx);
    return r;
}

MGPU_API mgpu_result mgpu_trainer_run(mgpu_trainer *t, mgpu_build_fn build, size_t user_size, mgpu_forward_fn forward,
                                      const mgpu_dataset *train, const mgpu_dataset *test, mgpu_train_summary *summary) {
    mgpu__built b;
    mgpu_result r;
    if (!t || !build || !forward || !train)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_trainer_run: trainer, build, forward and the training set are required");
    /* --multi-gpu dp is an explicit request: one --gpu-ids entry still runs one replica over an
       in-process communicator (on a GPU, NCCL with one device), so a one-GPU machine runs DP's path */
    if (t->dp_replicas > 0) {
        mgpu__dp_job job;
        memset(&job, 0, sizeof job);
        job.parent = t; job.build = build; job.user_size = user_size; job.forward = forward; job.train = train; job.test = test;
        /* on GPUs, one replica per --gpu-ids device, gradients all-reduced over NCCL inside this process */
        r = mgpu_dp_run_devices(t->dp_replicas, t->ctx->device.type == MGPU_DEVICE_CUDA ? t->opts->gpu_ids : NULL, mgpu__dp_train_replica, &job);
        if (summary) *summary = job.summary;
        return r;
    }
    memset(&b, 0, sizeof b);
    if ((r = mgpu__build(t->ctx, build, user_size, &b)) == MGPU_OK) r = mgpu_trainer_fit(t, b.model, forward, b.user, train, test, summary);
    mgpu__unbuild(&b);
    return r;
}


/* ======================================================================================
   Processes: wait statuses, child processes in groups of their own, signals through a pipe,
   log tails. What the supervisors (tools/mgpurun, mgpu-sweep) share.
   ====================================================================================== */

#include <poll.h>
#include <sched.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

MGPU_API const char *mgpu_signal_name(int sig) {
    static const struct { int sig; const char *name; } table[] = {
        {SIGHUP, "SIGHUP"}, {SIGINT, "SIGINT"}, {SIGQUIT, "SIGQUIT"}, {SIGILL, "SIGILL"},
        {SIGTRAP, "SIGTRAP"}, {SIGABRT, "SIGABRT"}, {SIGBUS, "SIGBUS"}, {SIGFPE, "SIGFPE"},
        {SIGKILL, "SIGKILL"}, {SIGUSR1, "SIGUSR1"}, {SIGSEGV, "SIGSEGV"}, {SIGUSR2, "SIGUSR2"},
        {SIGPIPE, "SIGPIPE"}, {SIGALRM, "SIGALRM"}, {SIGTERM, "SIGTERM"}, {SIGCHLD, "SIGCHLD"},
        {SIGXCPU, "SIGXCPU"}, {SIGXFSZ, "SIGXFSZ"}, {SIGSYS, "SIGSYS"},
    };
    size_t i;
    for (i = 0; i < sizeof table / sizeof table[0]; i++)
        if (table[i].sig == sig) return table[i].name;
    return "unknown signal";
}

MGPU_API void mgpu_wait_status_describe(int status, char *buf, size_t size) {
    if (!buf || size == 0) return;
    if (WIFEXITED(status))
        snprintf(buf, size, "exited with code %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(buf, size, "was killed by signal %d (%s)%s", WTERMSIG(status), mgpu_signal_name(WTERMSIG(status)),
                 WCOREDUMP(status) ? ", core dumped" : "");
    else
        snprintf(buf, size, "ended with wait status %d", status);
}

MGPU_API int mgpu_wait_status_code(int status) {
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return 1;
}

MGPU_API int mgpu_cpu_count(void) {
#ifdef __linux__
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
    {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        return n > 0 ? (int)n : 1;
    }
}

MGPU_API mgpu_result mgpu_make_dirs(const char *path) {
    mgpu_result r;
    if (!path) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_make_dirs: path is NULL");
    if ((r = mgpu__mkdirs(path)) != MGPU_OK) return r;
    if (!mgpu__is_dir(path)) return mgpu__fail(MGPU_ERR_IO, "cannot create directory '%s': a file of that name exists", path);
    return MGPU_OK;
}

MGPU_API int mgpu_program_exists(const char *program) {
    const char *path = getenv("PATH");
    char buf[PATH_MAX];
    if (!program || !program[0]) return 0;
    if (strchr(program, '/')) return access(program, X_OK) == 0;
    if (!path) path = "/usr/bin:/bin";
    while (*path) {
        size_t len = strcspn(path, ":");
        int n = snprintf(buf, sizeof buf, "%.*s%s%s", (int)len, path, len ? "/" : "", program);
        struct stat st;
        if (n > 0 && (size_t)n < sizeof buf && stat(buf, &st) == 0 && S_ISREG(st.st_mode) && access(buf, X_OK) == 0) return 1;
        path += len;
        if (*path == ':') path++;
    }
    return 0;
}

MGPU_API size_t mgpu_file_tail(const char *path, int64_t from, int max_lines, char *buf, size_t size) {
    struct stat st;
    int64_t start;
    size_t n = 0, begin, lines = 0;
    int fd;
    if (!buf || size == 0) return 0;
    buf[0] = 0;
    if (!path || max_lines <= 0 || (fd = open(path, O_RDONLY | O_CLOEXEC)) < 0) return 0;
    if (fstat(fd, &st) == 0 && (int64_t)st.st_size > from) {
        start = MGPU__MAX(from, (int64_t)st.st_size - (int64_t)(size - 1));
        while (n < size - 1) {
            ssize_t got = pread(fd, buf + n, size - 1 - n, (off_t)(start + (int64_t)n));
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) break;
            n += (size_t)got;
        }
        /* the read began mid-line: that piece is not a line of its own */
        if (start > from && start > 0) {
            char before = 0;
            if (pread(fd, &before, 1, (off_t)(start - 1)) == 1 && before != '\n') {
                size_t skip = 0;
                while (skip < n && buf[skip] != '\n') skip++;
                skip = skip < n ? skip + 1 : n;
                memmove(buf, buf + skip, n - skip);
                n -= skip;
            }
        }
    }
    close(fd);
    if (n > 0 && buf[n - 1] == '\n') n--; /* the final newline ends the last line, it starts none */
    for (begin = n; begin > 0; begin--)
        if (buf[begin - 1] == '\n' && ++lines == (size_t)max_lines) break;
    memmove(buf, buf + begin, n - begin);
    n -= begin;
    buf[n] = 0;
    return n;
}

/* --------------------------------------------------------------------------------------
   Child processes
   -------------------------------------------------------------------------------------- */

#ifndef NSIG
#define NSIG 65
#endif

/* The parent's environment with desc->env applied, built before fork (the child must not allocate). */
static char **mgpu__spawn_environment(const char *const *env) {
    char **out;
    size_t n_parent = 0, n_env = 0, k = 0, i, j;
    while (environ && environ[n_parent]) n_parent++;
    while (env[n_env]) n_env++;
    out = (char **)mgpu__alloc((n_parent + n_env + 1) * sizeof *out, "a child's environment");
    if (!out) return NULL;
    for (i = 0; i < n_parent; i++) {
        size_t name_len = strcspn(environ[i], "=");
        int replaced = 0;
        for (j = 0; j < n_env && !replaced; j++)
            replaced = strncmp(env[j], environ[i], name_len) == 0 && (env[j][name_len] == '=' || env[j][name_len] == 0);
        if (!replaced) out[k++] = environ[i];
    }
    for (j = 0; j < n_env; j++)
        if (strchr(env[j], '=')) out[k++] = (char *)env[j];
    out[k] = NULL;
    return out;
}

/* Between fork and exec, in the child: async-signal-safe calls only. */
static void mgpu__spawn_child(const mgpu_spawn_desc *d, char **envp, pid_t parent) {
    sigset_t none;
    int sig, devnull;
    setpgid(0, 0);
#ifdef __linux__
    /* die with the parent; the check closes the race where it died before the prctl */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(1);
#else
    (void)parent;
#endif
    for (sig = 1; sig < NSIG; sig++) {
        struct sigaction sa;
        int caught;
        if (sig == SIGKILL || sig == SIGSTOP || sigaction(sig, NULL, &sa) != 0) continue;
        caught = (sa.sa_flags & SA_SIGINFO) || (sa.sa_handler != SIG_IGN && sa.sa_handler != SIG_DFL);
        if (caught || sig == SIGPIPE) signal(sig, SIG_DFL);
    }
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0 && devnull != 0) { dup2(devnull, 0); close(devnull); }
    if (d->stdout_fd > 0 && d->stdout_fd != 1) dup2(d->stdout_fd, 1);
    if (d->stderr_fd > 0 && d->stderr_fd != 2) dup2(d->stderr_fd, 2);
    if (envp) environ = envp;
    execvp(d->argv[0], d->argv);
    {
        char msg[512];
        int n = snprintf(msg, sizeof msg, "%s: cannot run %s: %s\n", d->label ? d->label : "mgpu", d->argv[0], strerror(errno));
        if (n > 0 && write(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1) < 0) _exit(127);
    }
    _exit(127);
}

MGPU_API mgpu_result mgpu_spawn(const mgpu_spawn_desc *d, int *pid_out) {
    char **envp = NULL;
    sigset_t all, old;
    pid_t parent = getpid(), pid;
    int err;
    if (!d || !d->argv || !d->argv[0] || !pid_out) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_spawn: desc, argv[0] and pid must not be NULL");
    *pid_out = -1;
    if (d->env && !(envp = mgpu__spawn_environment(d->env))) return MGPU_ERR_OOM_HOST;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pid = fork();
    if (pid == 0) mgpu__spawn_child(d, envp, parent);
    err = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    mgpu_free(envp);
    if (pid < 0) return mgpu__fail(MGPU_ERR_IO, "cannot start %s (%s): fork: %s", d->label ? d->label : "a child", d->argv[0], strerror(err));
    setpgid(pid, pid); /* also here, so the group exists before the caller may signal it */
    *pid_out = (int)pid;
    return MGPU_OK;
}

/* The group only: after the leader was reaped its pid may belong to someone else. */
MGPU_API int mgpu_kill_group(int pid, int sig) { return pid > 0 ? kill(-(pid_t)pid, sig) : -1; }

/* --------------------------------------------------------------------------------------
   Signals into a poll loop
   -------------------------------------------------------------------------------------- */

#define MGPU__MAX_PIPED_SIGNALS 16
static int mgpu__sigpipe_fds[2] = {-1, -1};
static int mgpu__sigpipe_n;
static int mgpu__sigpipe_signals[MGPU__MAX_PIPED_SIGNALS + 1];
static struct sigaction mgpu__sigpipe_saved[MGPU__MAX_PIPED_SIGNALS + 1];

static void mgpu__sigpipe_handler(int sig) {
    int saved = errno;
    unsigned char b = (unsigned char)sig;
    ssize_t n = write(mgpu__sigpipe_fds[1], &b, 1); /* a full pipe drops it: one pending byte is enough */
    (void)n;
    errno = saved;
}

static int mgpu__fd_flags(int fd, int nonblock) {
    int fl = fcntl(fd, F_GETFD);
    if (fl < 0 || fcntl(fd, F_SETFD, fl | FD_CLOEXEC) != 0) return -1;
    if (!nonblock) return 0;
    fl = fcntl(fd, F_GETFL);
    return fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0 ? -1 : 0;
}

MGPU_API int mgpu_signal_pipe_open(const int *signals, int n) {
    struct sigaction sa;
    int i;
    if (mgpu__sigpipe_fds[0] >= 0) { mgpu__fail(MGPU_ERR_STATE, "mgpu_signal_pipe_open: a signal pipe is already open"); return -1; }
    if (n < 0 || n > MGPU__MAX_PIPED_SIGNALS || (n > 0 && !signals)) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_signal_pipe_open: 0 to %d signals expected, got %d", MGPU__MAX_PIPED_SIGNALS, n);
        return -1;
    }
    if (pipe(mgpu__sigpipe_fds) != 0 || mgpu__fd_flags(mgpu__sigpipe_fds[0], 1) != 0 || mgpu__fd_flags(mgpu__sigpipe_fds[1], 1) != 0) {
        mgpu__fail(MGPU_ERR_IO, "mgpu_signal_pipe_open: pipe: %s", strerror(errno));
        mgpu_signal_pipe_close();
        return -1;
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = mgpu__sigpipe_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    mgpu__sigpipe_n = 0;
    for (i = 0; i <= n; i++) {
        int sig = i < n ? signals[i] : SIGPIPE;
        struct sigaction *saved = &mgpu__sigpipe_saved[mgpu__sigpipe_n];
        if (sigaction(sig, NULL, saved) != 0) continue;
        if (sig == SIGPIPE) signal(SIGPIPE, SIG_IGN);
        else if (sig == SIGHUP && saved->sa_handler == SIG_IGN) continue; /* nohup: keep ignoring */
        else sigaction(sig, &sa, NULL);
        mgpu__sigpipe_signals[mgpu__sigpipe_n++] = sig;
    }
    return mgpu__sigpipe_fds[0];
}

MGPU_API void mgpu_signal_pipe_close(void) {
    int i;
    for (i = mgpu__sigpipe_n - 1; i >= 0; i--) sigaction(mgpu__sigpipe_signals[i], &mgpu__sigpipe_saved[i], NULL);
    mgpu__sigpipe_n = 0;
    for (i = 0; i < 2; i++) {
        if (mgpu__sigpipe_fds[i] >= 0) close(mgpu__sigpipe_fds[i]);
        mgpu__sigpipe_fds[i] = -1;
    }
}

/* --------------------------------------------------------------------------------------
   A free TCP port, and a local group of workers (the trainer's self-launch)
   -------------------------------------------------------------------------------------- */

MGPU_API int mgpu_pick_free_port(const char *addr) {
    struct addrinfo hints, *res = NULL, *ai;
    int port = -1, rc;
    if (!addr || !addr[0]) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_pick_free_port: addr is NULL or empty"); return -1; }
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if ((rc = getaddrinfo(addr, "0", &hints, &res)) != 0) {
        mgpu__fail(MGPU_ERR_IO, "cannot resolve %s: %s", addr, gai_strerror(rc));
        return -1;
    }
    for (ai = res; ai && port < 0; ai = ai->ai_next) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) continue;
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && getsockname(fd, (struct sockaddr *)&ss, &len) == 0) {
            if (ss.ss_family == AF_INET) port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
            else if (ss.ss_family == AF_INET6) port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
        }
        close(fd);
    }
    freeaddrinfo(res);
    if (port <= 0) { mgpu__fail(MGPU_ERR_IO, "cannot pick a free port on %s (is it an address of this host?)", addr); return -1; }
    return port;
}

/* ---- a group of workers and how it stops (mgpurun's loop and the trainer's self-launch) ---- */

static void mgpu__proc_say(const mgpu_proc_group *g, const char *fmt, ...) MGPU__PRINTF(2, 3);
static void mgpu__proc_say(const mgpu_proc_group *g, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", g->label ? g->label : "mgpu");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

MGPU_API void mgpu_proc_group_init(mgpu_proc_group *g, mgpu_proc *w, int n, const char *label, double grace_s) {
    int i;
    if (!g) return;
    memset(g, 0, sizeof *g);
    g->w = w; g->n = w ? n : 0; g->label = label; g->grace_s = grace_s > 0 ? grace_s : 0; g->failed = -1;
    for (i = 0; i < g->n; i++) { w[i].rank = i; w[i].pid = 0; w[i].running = 0; w[i].status = 0; }
}

MGPU_API int mgpu_proc_group_running(const mgpu_proc_group *g) {
    int i, n = 0;
    for (i = 0; g && i < g->n; i++) n += g->w[i].running;
    return n;
}

/* To every worker's whole process group, ended ones too: what they spawned belongs to the job. */
MGPU_API void mgpu_proc_group_signal(mgpu_proc_group *g, int sig) {
    int i;
    for (i = 0; g && i < g->n; i++)
        if (g->w[i].pid > 0 && mgpu_kill_group(g->w[i].pid, sig) != 0 && g->w[i].running) kill(g->w[i].pid, sig);
}

MGPU_API void mgpu_proc_group_stop(mgpu_proc_group *g, int sig) {
    g->stopping = 1;
    g->kill_at = mgpu_time_s() + g->grace_s;
    mgpu_proc_group_signal(g, sig);
    if (sig == SIGKILL) g->killed = 1;
}

static void mgpu__proc_failed(mgpu_proc_group *g, int i) {
    char how[128];
    int others = mgpu_proc_group_running(g);
    mgpu_wait_status_describe(g->w[i].status, how, sizeof how);
    g->failed = i;
    if (others > 0)
        mgpu__proc_say(g, "rank %d %s [pid %d]; stopping the other %d worker%s (SIGTERM, SIGKILL after %.3g s)", g->w[i].rank, how, g->w[i].pid,
                       others, others == 1 ? "" : "s", g->grace_s);
    else mgpu__proc_say(g, "rank %d %s [pid %d]", g->w[i].rank, how, g->w[i].pid);
    mgpu_proc_group_stop(g, SIGTERM);
}

MGPU_API void mgpu_proc_group_reap(mgpu_proc_group *g) {
    int i;
    for (i = 0; g && i < g->n; i++) {
        mgpu_proc *w = &g->w[i];
        int status = 0, r;
        if (!w->running) continue;
        do r = waitpid(w->pid, &status, WNOHANG); while (r < 0 && errno == EINTR);
        if (r == 0) continue;
        w->running = 0;
        w->status = r > 0 ? status : 0;
        if (r > 0 && !(WIFEXITED(status) && WEXITSTATUS(status) == 0) && !g->stopping) mgpu__proc_failed(g, i);
    }
}

MGPU_API void mgpu_proc_group_on_signal(mgpu_proc_group *g, int sig) {
    int n;
    if (!g || sig == SIGCHLD) return;   /* reaping happens every iteration */
    if (!g->interrupt_sig) g->interrupt_sig = sig;
    if (g->stopping) {
        if (!g->killed) {
            mgpu__proc_say(g, "got %s while stopping: sending SIGKILL now", mgpu_signal_name(sig));
            mgpu_proc_group_stop(g, SIGKILL);
        }
        return;
    }
    n = mgpu_proc_group_running(g);
    mgpu__proc_say(g, "got %s: forwarding it to the %d running worker%s (SIGKILL after %.3g s)", mgpu_signal_name(sig), n, n == 1 ? "" : "s", g->grace_s);
    mgpu_proc_group_stop(g, sig);
}

MGPU_API int mgpu_proc_group_timeout_ms(const mgpu_proc_group *g, int idle_ms) {
    double left;
    if (!g || !g->stopping || g->killed) return idle_ms;
    left = g->kill_at - mgpu_time_s();
    if (left <= 0) return 0;
    return idle_ms >= 0 && idle_ms < (int)(left * 1000.0) + 1 ? idle_ms : (int)(left * 1000.0) + 1;
}

MGPU_API void mgpu_proc_group_tick(mgpu_proc_group *g) {
    int left;
    if (!g || !g->stopping || g->killed || mgpu_time_s() < g->kill_at) return;
    left = mgpu_proc_group_running(g);
    if (left > 0) mgpu__proc_say(g, "%d worker%s still running %.3g s after the stop signal: sending SIGKILL", left, left == 1 ? "" : "s", g->grace_s);
    mgpu_proc_group_stop(g, SIGKILL);
}

/* ---- the trainer's self-launch: one local group, run to its end ---- */

/* worker i's environment (torchrun's variables) as "NAME=value" entries, NULL-terminated */
#define MGPU__GROUP_ENV 8
static void mgpu__group_env(int i, int n, int port, int threads, char buf[MGPU__GROUP_ENV][64], const char *env[MGPU__GROUP_ENV + 1]) {
    int k = 0;
    snprintf(buf[k++], sizeof buf[0], "RANK=%d", i);
    snprintf(buf[k++], sizeof buf[0], "LOCAL_RANK=%d", i);
    snprintf(buf[k++], sizeof buf[0], "WORLD_SIZE=%d", n);
    snprintf(buf[k++], sizeof buf[0], "LOCAL_WORLD_SIZE=%d", n);
    snprintf(buf[k++], sizeof buf[0], "MASTER_ADDR=127.0.0.1");
    snprintf(buf[k++], sizeof buf[0], "MASTER_PORT=%d", port);
    if (threads > 0) snprintf(buf[k++], sizeof buf[0], "MGPU_NUM_THREADS=%d", threads);
    env[k] = NULL;
    while (k-- > 0) env[k] = buf[k];
}

static mgpu_result mgpu__group_start(mgpu_proc_group *g, const mgpu_worker_group_desc *d) {
    char env_buf[MGPU__GROUP_ENV][64], label[96];
    const char *env[MGPU__GROUP_ENV + 1];
    int port = mgpu_pick_free_port("127.0.0.1"), i, devnull = -1;
    int threads = getenv("MGPU_NUM_THREADS") ? 0 : MGPU__MAX(1, mgpu_cpu_count() / d->n);
    mgpu_result r = MGPU_OK;
    if (port < 0) return mgpu_last_result();
    if (d->rank0_stdout_only && (devnull = open("/dev/null", O_WRONLY | O_CLOEXEC)) < 0)
        return mgpu__fail(MGPU_ERR_IO, "cannot open /dev/null: %s", strerror(errno));
    for (i = 0; i < d->n && r == MGPU_OK; i++) {
        mgpu_spawn_desc sd;
        memset(&sd, 0, sizeof sd);
        mgpu__group_env(i, d->n, port, threads, env_buf, env);
        snprintf(label, sizeof label, "%s: rank %d", g->label ? g->label : "mgpu", i);
        sd.argv = d->argv; sd.env = env; sd.label = label;
        sd.stdout_fd = i > 0 && devnull >= 0 ? devnull : 0;
        if ((r = mgpu_spawn(&sd, &g->w[i].pid)) == MGPU_OK) g->w[i].running = 1;
    }
    if (devnull >= 0) close(devnull);
    return r;
}

/* Waits for a signal (SIGCHLD included) or the kill deadline, and handles what came. */
static void mgpu__group_wait_event(mgpu_proc_group *g, int sigfd) {
    struct pollfd p;
    unsigned char buf[64];
    ssize_t n, i;
    p.fd = sigfd; p.events = POLLIN; p.revents = 0;
    if (poll(&p, 1, mgpu_proc_group_timeout_ms(g, 200)) > 0)   /* 200 ms only bounds a lost wakeup */
        while ((n = read(sigfd, buf, sizeof buf)) > 0)
            for (i = 0; i < n; i++) mgpu_proc_group_on_signal(g, buf[i]);
    mgpu_proc_group_tick(g);
}

/* The caller's exit code, and the closing message of a failed run. */
static int mgpu__group_outcome(const mgpu_proc_group *g) {
    char how[128];
    int code;
    if (g->interrupt_sig) {
        mgpu__proc_say(g, "stopped by %s; all workers ended", mgpu_signal_name(g->interrupt_sig));
        return 128 + g->interrupt_sig;
    }
    if (g->failed < 0) return 0;
    mgpu_wait_status_describe(g->w[g->failed].status, how, sizeof how);
    code = mgpu_wait_status_code(g->w[g->failed].status);
    mgpu__proc_say(g, "training failed: rank %d %s; exiting with code %d", g->w[g->failed].rank, how, code);
    return code;
}

MGPU_API int mgpu_worker_group_run(const mgpu_worker_group_desc *d) {
    static const int caught[] = {SIGCHLD, SIGINT, SIGTERM, SIGHUP};
    mgpu_proc_group g;
    mgpu_proc *w;
    mgpu_result r;
    int sigfd, code;
    if (!d || !d->argv || !d->argv[0] || d->n < 1) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_worker_group_run: desc, argv[0] and n >= 1 are required");
        return -1;
    }
    if (!(w = (mgpu_proc *)mgpu__calloc((size_t)d->n * sizeof *w, "the workers"))) return -1;
    mgpu_proc_group_init(&g, w, d->n, d->label, d->grace_s > 0 ? d->grace_s : 5.0);
    if ((sigfd = mgpu_signal_pipe_open(caught, (int)(sizeof caught / sizeof caught[0]))) < 0) { mgpu_free(w); return -1; }
    if ((r = mgpu__group_start(&g, d)) != MGPU_OK) {
        mgpu__proc_say(&g, "cannot start the workers: %s", mgpu_last_error());
        mgpu_proc_group_stop(&g, SIGKILL);
    }
    while (mgpu_proc_group_running(&g) > 0) {
        mgpu_proc_group_reap(&g);
        if (mgpu_proc_group_running(&g) > 0) mgpu__group_wait_event(&g, sigfd);
    }
    if (g.interrupt_sig || g.failed >= 0 || r != MGPU_OK) mgpu_proc_group_signal(&g, SIGKILL);   /* leftover grandchildren */
    mgpu_signal_pipe_close();
    code = r != MGPU_OK ? -1 : mgpu__group_outcome(&g);
    mgpu_free(w);
    if (r != MGPU_OK) mgpu__fail(r, "mgpu_worker_group_run: the workers could not all start");
    return code;
}

/* ======================================================================================
   Sweeps: a grid of independent runs spread over device slots, one process per slot, each
   finished run appended to a results JSONL that makes the sweep resumable
   ====================================================================================== */

#include <sys/file.h>

#define MGPU__SWEEP_MAX_AXES 32
#define MGPU__SWEEP_MAX_VALUES 1000000
#define MGPU__SWEEP_MAX_POINTS 10000000
#define MGPU__SWEEP_ID_MAX 160
#define MGPU__SWEEP_TAIL_BYTES 4096

/* Names every command template knows besides the grid axes (reserved: no axis may take them). */
static const char *const mgpu__sweep_builtins[] = {"metrics", "log", "run_id", "run_dir", "slot", "attempt"};
#define MGPU__SWEEP_N_BUILTINS 6

/* --------------------------------------------------------------------------------------
   Grid
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__sweep_axis { char *name; int n, cap; char **values; } mgpu__sweep_axis;
struct mgpu_sweep_grid { int n_axes; int64_t size; mgpu__sweep_axis axes[MGPU__SWEEP_MAX_AXES]; };

static int mgpu__is_name_start(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }

/* A C identifier of at most 64 characters. */
static int mgpu__sweep_name_ok(const char *s, size_t n) {
    size_t i;
    if (n == 0 || n > 64 || !mgpu__is_name_start(s[0])) return 0;
    for (i = 1; i < n; i++)
        if (!mgpu__is_name_start(s[i]) && !mgpu__is_digit(s[i])) return 0;
    return 1;
}

static int mgpu__sweep_builtin_index(const char *s, size_t n) {
    int i;
    for (i = 0; i < MGPU__SWEEP_N_BUILTINS; i++)
        if (strlen(mgpu__sweep_builtins[i]) == n && strncmp(mgpu__sweep_builtins[i], s, n) == 0) return i;
    return -1;
}

MGPU_API mgpu_sweep_grid *mgpu_sweep_grid_create(void) {
    return (mgpu_sweep_grid *)mgpu__calloc(sizeof(mgpu_sweep_grid), "a sweep grid");
}

static void mgpu__sweep_axis_free(mgpu__sweep_axis *a) {
    int i;
    for (i = 0; i < a->n; i++) mgpu_free(a->values[i]);
    mgpu_free(a->values);
    mgpu_free(a->name);
    memset(a, 0, sizeof *a);
}

MGPU_API void mgpu_sweep_grid_destroy(mgpu_sweep_grid *g) {
    int i;
    if (!g) return;
    for (i = 0; i < g->n_axes; i++) mgpu__sweep_axis_free(&g->axes[i]);
    mgpu_free(g);
}

static int mgpu__sweep_axis_push(mgpu__sweep_axis *a, const char *v, size_t n) {
    char *copy;
    if (a->n == a->cap) {
        int cap = a->cap ? 2 * a->cap : 16;
        char **grown = (char **)mgpu__alloc((size_t)cap * sizeof *grown, "grid values");
        if (!grown) return 0;
        if (a->n) memcpy(grown, a->values, (size_t)a->n * sizeof *grown);
        mgpu_free(a->values);
        a->values = grown; a->cap = cap;
    }
    if (!(copy = (char *)mgpu__alloc(n + 1, "a grid value"))) return 0;
    memcpy(copy, v, n);
    copy[n] = 0;
    a->values[a->n++] = copy;
    return 1;
}

/* "lo..hi" or "lo..hi:step" (integers) into lo, hi, step; 0 if item is not such a range. */
static int mgpu__sweep_parse_range(const char *item, long long *lo, long long *hi, long long *step) {
    char text[96], *dots, *colon, *end;
    if (strlen(item) >= sizeof text) return 0;
    strcpy(text, item);
    if (!(dots = strstr(text, ".."))) return 0;
    *dots = 0;
    if ((colon = strchr(dots + 2, ':')) != NULL) *colon = 0;
    errno = 0;
    *lo = strtoll(text, &end, 10);
    if (!text[0] || *end || errno) return 0;
    *hi = strtoll(dots + 2, &end, 10);
    if (!dots[2] || *end || errno) return 0;
    *step = 1;
    if (colon) {
        *step = strtoll(colon + 1, &end, 10);
        if (!colon[1] || *end || errno || *step < 1) return 0;
    }
    return *lo <= *hi;
}

static int mgpu__cmp_strp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* The items of "v1,v2,lo..hi" onto the axis (spaces around items ignored). */
static mgpu_result mgpu__sweep_axis_parse(mgpu__sweep_axis *a, const char *list, const char *spec) {
    const char *p = list;
    for (;;) {
        size_t len = strcspn(p, ",");
        const char *s = p, *e = p + len;
        char item[96];
        long long lo, hi, step, v;
        while (s < e && *s == ' ') s++;
        while (e > s && e[-1] == ' ') e--;
        if (s == e) return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': empty value (expected NAME=V1,V2,... or NAME=LO..HI)", spec);
        snprintf(item, sizeof item, "%.*s", (int)(e - s), s);
        if (strstr(item, "..")) {
            if (!mgpu__sweep_parse_range(item, &lo, &hi, &step))
                return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': bad range '%s' (expected LO..HI or LO..HI:STEP with integers LO <= HI, STEP >= 1)", spec, item);
            if ((hi - lo) / step >= MGPU__SWEEP_MAX_VALUES)
                return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': range '%s' has more than %d values", spec, item, MGPU__SWEEP_MAX_VALUES);
            for (v = lo; v <= hi; v += step) {
                char text[32];
                int n = snprintf(text, sizeof text, "%lld", v);
                if (!mgpu__sweep_axis_push(a, text, (size_t)n)) return MGPU_ERR_OOM_HOST;
                if (hi - v < step) break; /* no overflow past hi */
            }
        } else if (!mgpu__sweep_axis_push(a, s, (size_t)(e - s))) {
            return MGPU_ERR_OOM_HOST;
        }
        if (a->n > MGPU__SWEEP_MAX_VALUES) return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': more than %d values", spec, MGPU__SWEEP_MAX_VALUES);
        if (!p[len]) break;
        p += len + 1;
    }
    {   /* a repeated value would make two runs with one id */
        char **sorted = (char **)mgpu__alloc((size_t)a->n * sizeof *sorted, "grid values");
        int i, dup = -1;
        if (!sorted) return MGPU_ERR_OOM_HOST;
        memcpy(sorted, a->values, (size_t)a->n * sizeof *sorted);
        qsort(sorted, (size_t)a->n, sizeof *sorted, mgpu__cmp_strp);
        for (i = 1; i < a->n && dup < 0; i++)
            if (strcmp(sorted[i - 1], sorted[i]) == 0) dup = i;
        if (dup >= 0) mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': the value '%s' appears twice", spec, sorted[dup]);
        mgpu_free(sorted);
        return dup >= 0 ? MGPU_ERR_INVALID_ARG : MGPU_OK;
    }
}

MGPU_API mgpu_result mgpu_sweep_grid_add(mgpu_sweep_grid *g, const char *spec) {
    const char *eq;
    mgpu__sweep_axis a;
    mgpu_result r;
    int i;
    if (!g || !spec) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_sweep_grid_add: grid and spec must not be NULL");
    if (!(eq = strchr(spec, '='))) return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': expected NAME=V1,V2,... or NAME=LO..HI (no '=')", spec);
    if (!mgpu__sweep_name_ok(spec, (size_t)(eq - spec)))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': the name '%.*s' must be letters, digits and _ (not starting with a digit)", spec, (int)(eq - spec), spec);
    if (mgpu__sweep_builtin_index(spec, (size_t)(eq - spec)) >= 0)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': '%.*s' is reserved for the command template (metrics, log, run_id, run_dir, slot, attempt)", spec, (int)(eq - spec), spec);
    for (i = 0; i < g->n_axes; i++)
        if (strlen(g->axes[i].name) == (size_t)(eq - spec) && strncmp(g->axes[i].name, spec, (size_t)(eq - spec)) == 0)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': the name '%s' is given twice", spec, g->axes[i].name);
    if (g->n_axes == MGPU__SWEEP_MAX_AXES) return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': at most %d axes", spec, MGPU__SWEEP_MAX_AXES);
    memset(&a, 0, sizeof a);
    if (!(a.name = (char *)mgpu__alloc((size_t)(eq - spec) + 1, "a grid name"))) return MGPU_ERR_OOM_HOST;
    memcpy(a.name, spec, (size_t)(eq - spec));
    a.name[eq - spec] = 0;
    if ((r = mgpu__sweep_axis_parse(&a, eq + 1, spec)) == MGPU_OK) {
        int64_t size = g->n_axes ? g->size : 1;
        if (size * a.n > MGPU__SWEEP_MAX_POINTS)
            r = mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': the grid would have %lld points (at most %d)", spec, (long long)(size * a.n), MGPU__SWEEP_MAX_POINTS);
        else { g->axes[g->n_axes++] = a; g->size = size * a.n; return MGPU_OK; }
    }
    mgpu__sweep_axis_free(&a);
    return r;
}

MGPU_API int mgpu_sweep_grid_axes(const mgpu_sweep_grid *g) { return g ? g->n_axes : 0; }
MGPU_API const char *mgpu_sweep_grid_name(const mgpu_sweep_grid *g, int axis) {
    return g && axis >= 0 && axis < g->n_axes ? g->axes[axis].name : NULL;
}
MGPU_API int mgpu_sweep_grid_count(const mgpu_sweep_grid *g, int axis) {
    return g && axis >= 0 && axis < g->n_axes ? g->axes[axis].n : 0;
}
MGPU_API const char *mgpu_sweep_grid_value(const mgpu_sweep_grid *g, int axis, int i) {
    return g && axis >= 0 && axis < g->n_axes && i >= 0 && i < g->axes[axis].n ? g->axes[axis].values[i] : NULL;
}
MGPU_API int64_t mgpu_sweep_grid_size(const mgpu_sweep_grid *g) { return g && g->n_axes ? g->size : 0; }

MGPU_API mgpu_result mgpu_sweep_grid_point(const mgpu_sweep_grid *g, int64_t index, const char **values) {
    int a;
    if (!g || !values || index < 0 || index >= mgpu_sweep_grid_size(g))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_sweep_grid_point: point %lld is outside the grid of %lld", (long long)index,
                          (long long)mgpu_sweep_grid_size(g));
    for (a = g->n_axes - 1; a >= 0; a--) {
        values[a] = g->axes[a].values[index % g->axes[a].n];
        index /= g->axes[a].n;
    }
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   Templates and run ids
   -------------------------------------------------------------------------------------- */

static mgpu_result mgpu__sweep_unknown_key(const char *tmpl, const char *key, size_t len, int n, const char *const *names) {
    char known[512];
    size_t pos = 0;
    int i;
    known[0] = 0;
    for (i = 0; i < n && pos + 2 < sizeof known; i++)
        pos += (size_t)snprintf(known + pos, sizeof known - pos, "%s{%s}", i ? ", " : "", names[i]);
    return mgpu__fail(MGPU_ERR_INVALID_ARG, "unknown key {%.*s} in the command argument '%s' (known: %s)", (int)len, key, tmpl, known);
}

MGPU_API char *mgpu_sweep_substitute(const char *tmpl, int n, const char *const *names, const char *const *values) {
    mgpu__buf b;
    const char *p;
    if (!tmpl || n < 0 || (n > 0 && (!names || !values)))
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_sweep_substitute: tmpl, names and values must not be NULL");
    mgpu__buf_init(&b);
    mgpu__buf_puts(&b, "");
    for (p = tmpl; *p;) {
        const char *close;
        if ((p[0] == '{' && p[1] == '{') || (p[0] == '}' && p[1] == '}')) {
            mgpu__buf_append(&b, p, 1);
            p += 2;
            continue;
        }
        if (p[0] == '{' && (close = strchr(p + 1, '}')) != NULL && mgpu__sweep_name_ok(p + 1, (size_t)(close - p - 1))) {
            size_t len = (size_t)(close - p - 1);
            int i, found = -1;
            for (i = 0; i < n && found < 0; i++)
                if (strlen(names[i]) == len && strncmp(names[i], p + 1, len) == 0) found = i;
            if (found < 0) {
                mgpu__sweep_unknown_key(tmpl, p + 1, len, n, names);
                mgpu__buf_free(&b);
                return NULL;
            }
            mgpu__buf_puts(&b, values[found] ? values[found] : "");
            p = close + 1;
            continue;
        }
        mgpu__buf_append(&b, p, 1);
        p++;
    }
    if (b.failed) { mgpu__buf_free(&b); return NULL; }
    return b.data;
}

static int mgpu__sweep_id_char_ok(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '+' || c == '-';
}

MGPU_API mgpu_result mgpu_sweep_run_id(int n, const char *const *names, const char *const *values, char *buf, size_t size) {
    mgpu__buf b;
    int i;
    if (n < 1 || !names || !values || !buf || size == 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_sweep_run_id: needs n >= 1 names and values and a buffer");
    mgpu__buf_init(&b);
    for (i = 0; i < n; i++) {
        const unsigned char *v = (const unsigned char *)(values[i] ? values[i] : "");
        mgpu__buf_printf(&b, "%s%s=", i ? "," : "", names[i]);
        for (; *v; v++) {
            if (mgpu__sweep_id_char_ok(*v)) mgpu__buf_append(&b, v, 1);
            else mgpu__buf_printf(&b, "%%%02X", (unsigned)*v);
        }
    }
    if (b.failed) { mgpu__buf_free(&b); return MGPU_ERR_OOM_HOST; }
    if (b.len > 120) { /* file names have limits: keep a readable head and make it unique with a hash */
        mgpu__hash64 h;
        mgpu__hash64_init(&h);
        mgpu__hash64_update(&h, b.data, b.len);
        snprintf(b.data + 100, b.cap - 100, "-%016llx", (unsigned long long)mgpu__hash64_final(&h));
        b.len = strlen(b.data);
    }
    if (b.len >= size) {
        mgpu__buf_free(&b);
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_sweep_run_id: the buffer of %zu bytes is too small", size);
    }
    memcpy(buf, b.data, b.len + 1);
    mgpu__buf_free(&b);
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   GPUs without the CUDA runtime: CUDA_VISIBLE_DEVICES, nvidia-smi, /proc/driver/nvidia/gpus.
   A supervisor that linked CUDA would hold a context (hundreds of MiB) on every GPU it counted.
   -------------------------------------------------------------------------------------- */

#define MGPU__CAPTURE_TIMED_OUT (-2)

/* Waits until `deadline` for pid to exit; past it (or with deadline 0) kills its group. 1 when it
   exited by itself (status set), 0 when it had to be killed. */
static int mgpu__capture_reap(int pid, double deadline, int *status) {
    struct timespec tick = {0, 10000000};
    for (;;) {
        pid_t r = waitpid((pid_t)pid, status, WNOHANG);
        if (r == (pid_t)pid) return 1;
        if (r < 0 && errno != EINTR) { *status = -1; return 1; } /* reaped elsewhere: nothing to kill */
        if (mgpu_time_s() >= deadline) break;
        nanosleep(&tick, NULL);
    }
    mgpu_kill_group(pid, SIGKILL);
    while (waitpid((pid_t)pid, status, 0) < 0 && errno == EINTR) {}
    return 0;
}

/* Runs argv (PATH lookup) for at most timeout_s with its stdout and stderr into buf (NUL-terminated,
   cut to size). Returns its wait status, MGPU__CAPTURE_TIMED_OUT (then killed), or -1. */
static int mgpu__capture(char *const *argv, double timeout_s, char *buf, size_t size) {
    int fds[2], pid = -1, status = -1, eof = 0;
    size_t len = 0;
    double deadline = mgpu_time_s() + timeout_s;
    mgpu_spawn_desc d;
    buf[0] = 0;
    if (pipe(fds) != 0) return -1;
    fcntl(fds[0], F_SETFD, FD_CLOEXEC); /* the child keeps only its dup2'ed copies */
    fcntl(fds[1], F_SETFD, FD_CLOEXEC);
    memset(&d, 0, sizeof d);
    d.argv = argv;
    d.stdout_fd = d.stderr_fd = fds[1];
    d.label = "mgpu_find_gpus";
    if (mgpu_spawn(&d, &pid) != MGPU_OK) { close(fds[0]); close(fds[1]); return -1; }
    close(fds[1]);
    while (!eof) {
        struct pollfd p;
        char chunk[4096];
        ssize_t n;
        int ms = (int)((deadline - mgpu_time_s()) * 1000.0);
        if (ms <= 0) break;
        p.fd = fds[0]; p.events = POLLIN; p.revents = 0;
        if (poll(&p, 1, ms) <= 0) continue; /* EINTR or the deadline: the loop head decides */
        n = read(fds[0], chunk, sizeof chunk);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) { eof = 1; break; }
        if (len + 1 < size) {
            size_t k = MGPU__MIN((size_t)n, size - 1 - len);
            memcpy(buf + len, chunk, k);
            len += k;
            buf[len] = 0;
        }
    }
    close(fds[0]);
    return mgpu__capture_reap(pid, eof ? deadline : 0, &status) ? status : MGPU__CAPTURE_TIMED_OUT;
}

/* s without leading and trailing spaces, in place. */
static char *mgpu__trim_spaces(char *s) {
    size_t n;
    while (*s == ' ' || *s == '\t') s++;
    n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r')) s[--n] = 0;
    return s;
}

static int mgpu__all_digits(const char *s) {
    if (!*s) return 0;
    for (; *s; s++)
        if (!mgpu__is_digit(*s)) return 0;
    return 1;
}

static void mgpu__gpu_set(mgpu_gpu_info *g, const char *id, const char *name, int64_t memory_mib) {
    snprintf(g->id, sizeof g->id, "%s", id);
    snprintf(g->name, sizeof g->name, "%s", name);
    g->memory_mib = memory_mib;
}

/* CUDA_VISIBLE_DEVICES's entries up to the first CUDA would stop at (it ignores the rest). */
static int mgpu__gpus_from_visible(const char *cvd, mgpu_gpu_info *gpus, int max) {
    char item[64];
    int n = 0;
    while (*cvd && n < max) {
        size_t len = strcspn(cvd, ",");
        char *e;
        snprintf(item, sizeof item, "%.*s", (int)MGPU__MIN(len, sizeof item - 1), cvd);
        e = mgpu__trim_spaces(item);
        if (len >= sizeof item || !(mgpu__all_digits(e) || strncmp(e, "GPU-", 4) == 0 || strncmp(e, "MIG-", 4) == 0)) break;
        mgpu__gpu_set(&gpus[n++], e, "", 0);
        cvd += len;
        if (*cvd == ',') cvd++;
    }
    return n;
}

/* Lines of `nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader`:
   "0, NVIDIA H200, 143771 MiB". Lines of another shape are skipped. */
static int mgpu__gpus_from_query(char *out, mgpu_gpu_info *gpus, int max) {
    int n = 0;
    char *line, *save = NULL;
    for (line = strtok_r(out, "\n", &save); line && n < max; line = strtok_r(NULL, "\n", &save)) {
        char *index = line, *name = strchr(line, ','), *mem = name ? strrchr(name + 1, ',') : NULL;
        if (!name || !mem) continue;
        *name++ = 0;
        *mem++ = 0;
        index = mgpu__trim_spaces(index);
        if (!mgpu__all_digits(index)) continue;
        mgpu__gpu_set(&gpus[n++], index, mgpu__trim_spaces(name), (int64_t)strtoll(mgpu__trim_spaces(mem), NULL, 10));
    }
    return n;
}

/* Lines of `nvidia-smi -L`: "GPU 0: NVIDIA H200 (UUID: GPU-...)" (its MIG lines are skipped). */
static int mgpu__gpus_from_list(char *out, mgpu_gpu_info *gpus, int max) {
    int n = 0;
    char *line, *save = NULL;
    for (line = strtok_r(out, "\n", &save); line && n < max; line = strtok_r(NULL, "\n", &save)) {
        char *colon, *uuid;
        if (strncmp(line, "GPU ", 4) != 0 || !(colon = strchr(line + 4, ':'))) continue;
        *colon = 0;
        if (!mgpu__all_digits(line + 4)) continue;
        if ((uuid = strstr(colon + 1, " (UUID:")) != NULL) *uuid = 0;
        mgpu__gpu_set(&gpus[n++], line + 4, mgpu__trim_spaces(colon + 1), 0);
    }
    return n;
}

static int mgpu__cmp_str(const void *a, const void *b) { return strcmp((const char *)a, (const char *)b); }

/* The entries of /proc/driver/nvidia/gpus (PCI bus ids) in bus order, numbered from 0, named by
   the "Model:" line of their information file. -1 when the directory cannot be read. */
static int mgpu__gpus_from_proc(const char *dir, mgpu_gpu_info *gpus, int max) {
    char (*bus)[64] = NULL;
    DIR *dp = opendir(dir);
    struct dirent *e;
    int n = 0, i;
    if (!dp) return -1;
    if (!(bus = (char (*)[64])mgpu__alloc((size_t)max * sizeof *bus, "GPU bus ids"))) { closedir(dp); return 0; }
    while ((e = readdir(dp)) != NULL && n < max) {
        size_t len = strlen(e->d_name);
        if (e->d_name[0] != '.' && len < sizeof bus[0]) memcpy(bus[n++], e->d_name, len + 1);
    }
    closedir(dp);
    qsort(bus, (size_t)n, sizeof bus[0], mgpu__cmp_str);
    for (i = 0; i < n; i++) {
        char path[PATH_MAX], line[256], id[16], name[96] = "";
        FILE *f;
        snprintf(path, sizeof path, "%s/%s/information", dir, bus[i]);
        if ((f = fopen(path, "r")) != NULL) {
            while (fgets(line, sizeof line, f))
                if (strncmp(line, "Model:", 6) == 0) {
                    line[strcspn(line, "\n")] = 0;
                    snprintf(name, sizeof name, "%s", mgpu__trim_spaces(line + 6));
                    break;
                }
            fclose(f);
        }
        snprintf(id, sizeof id, "%d", i);
        mgpu__gpu_set(&gpus[i], id, name, 0);
    }
    mgpu_free(bus);
    return n;
}

/* Asks nvidia-smi (--query-gpu, then -L); the GPUs it lists, or 0 with the reason appended to why. */
static int mgpu__gpus_from_nvidia_smi(const char *smi, double timeout_s, mgpu_gpu_info *gpus, int max, mgpu__buf *why,
                                      const char **source) {
    char *query[] = {(char *)smi, (char *)"--query-gpu=index,name,memory.total", (char *)"--format=csv,noheader", NULL};
    char *list[] = {(char *)smi, (char *)"-L", NULL};
    char *out = (char *)mgpu__alloc(65536, "nvidia-smi's output"), first[160];
    int st, n = 0;
    if (!out) return 0;
    st = mgpu__capture(query, timeout_s, out, 65536);
    if (st != MGPU__CAPTURE_TIMED_OUT && (n = mgpu__gpus_from_query(out, gpus, max)) > 0) *source = "nvidia-smi --query-gpu";
    if (n == 0 && st != MGPU__CAPTURE_TIMED_OUT) { /* an old or odd nvidia-smi may still list them */
        st = mgpu__capture(list, timeout_s, out, 65536);
        if (st != MGPU__CAPTURE_TIMED_OUT && (n = mgpu__gpus_from_list(out, gpus, max)) > 0) *source = "nvidia-smi -L";
    }
    if (n == 0) {
        snprintf(first, sizeof first, "%.*s", (int)strcspn(out, "\n"), out);
        if (st == MGPU__CAPTURE_TIMED_OUT) mgpu__buf_printf(why, "%s: no answer in %g s", smi, timeout_s);
        else if (st == -1) mgpu__buf_printf(why, "%s: could not be run", smi);
        else if (WIFEXITED(st) && WEXITSTATUS(st) == 0) mgpu__buf_printf(why, "%s: lists no GPU", smi);
        else {
            char status[96];
            mgpu_wait_status_describe(st, status, sizeof status);
            mgpu__buf_printf(why, "%s: %s%s%s", smi, status, first[0] ? ": " : "", mgpu__trim_spaces(first));
        }
    }
    mgpu_free(out);
    return n;
}

MGPU_API int mgpu_find_gpus(const mgpu_gpu_sources *where, mgpu_gpu_info *gpus, int max, char *how, size_t how_size) {
    static const mgpu_gpu_sources defaults = {NULL, NULL, 0, 0.0};
    const char *cvd, *smi, *proc, *source = NULL;
    mgpu__buf why;
    int n = 0;
    if (!gpus || max < 1 || (!how && how_size)) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_find_gpus: needs room for at least one GPU (gpus, max >= 1) and how with its size");
        return -1;
    }
    if (!where) where = &defaults;
    memset(gpus, 0, (size_t)max * sizeof *gpus);
    mgpu__buf_init(&why);
    cvd = where->ignore_visible_devices ? NULL : getenv("CUDA_VISIBLE_DEVICES");
    smi = where->nvidia_smi ? where->nvidia_smi : "nvidia-smi";
    proc = where->proc_dir ? where->proc_dir : "/proc/driver/nvidia/gpus";
    if (cvd) {
        n = mgpu__gpus_from_visible(cvd, gpus, max);
        if (n) mgpu__buf_printf(&why, "CUDA_VISIBLE_DEVICES=%s", cvd);
        else if (cvd[0]) mgpu__buf_printf(&why, "CUDA_VISIBLE_DEVICES=%s starts with no id CUDA would take", cvd);
        else mgpu__buf_puts(&why, "CUDA_VISIBLE_DEVICES is set but empty");
        source = why.data;
    } else {
        if (smi[0] && !mgpu_program_exists(smi)) mgpu__buf_printf(&why, "%s: not found%s", smi, strchr(smi, '/') ? "" : " in PATH");
        else if (smi[0]) n = mgpu__gpus_from_nvidia_smi(smi, where->timeout_s > 0 ? where->timeout_s : 30.0, gpus, max, &why, &source);
        if (n == 0 && proc[0]) {
            n = mgpu__gpus_from_proc(proc, gpus, max);
            if (n > 0) source = proc;
            else mgpu__buf_printf(&why, "%s%s: %s", why.len ? "; " : "", proc, n < 0 ? "absent" : "no GPU");
            n = MGPU__MAX(n, 0);
        }
        if (!source) source = why.len ? why.data : "no source to ask";
    }
    if (how && how_size) snprintf(how, how_size, "%s", source ? source : "out of memory");
    mgpu__buf_free(&why);
    return n;
}

/* --------------------------------------------------------------------------------------
   Results file
   -------------------------------------------------------------------------------------- */

struct mgpu_sweep_results { int64_t n, cap; mgpu_json **records; };

/* RFC 8259's number grammar: such a value is written as a JSON number, anything else as a string. */
static int mgpu__is_json_number(const char *s) {
    if (*s == '-') s++;
    if (*s == '0') s++;
    else if (*s >= '1' && *s <= '9') while (mgpu__is_digit(*s)) s++;
    else return 0;
    if (*s == '.') {
        if (!mgpu__is_digit(*++s)) return 0;
        while (mgpu__is_digit(*s)) s++;
    }
    if (*s == 'e' || *s == 'E') {
        s++;
        if (*s == '+' || *s == '-') s++;
        if (!mgpu__is_digit(*s)) return 0;
        while (mgpu__is_digit(*s)) s++;
    }
    return *s == 0;
}

static void mgpu__buf_json_param(mgpu__buf *b, const char *value) {
    if (mgpu__is_json_number(value)) mgpu__buf_puts(b, value);
    else mgpu__buf_json_string(b, value);
}

/* A JSON scalar as the text it stands for (numbers exactly as written); NULL for containers. */
static const char *mgpu__json_scalar_text(const mgpu_json *v, char *buf, size_t size) {
    if (!v) return NULL;
    switch (v->type) {
    case MGPU_JSON_NUMBER:
        snprintf(buf, size, "%.*s", (int)v->raw_len, v->raw ? v->raw : "");
        return buf;
    case MGPU_JSON_STRING: return v->string;
    case MGPU_JSON_BOOL: return v->boolean ? "true" : "false";
    case MGPU_JSON_NULL: return "null";
    default: return NULL;
    }
}

MGPU_API mgpu_sweep_results *mgpu_sweep_results_load(const char *path) {
    mgpu_sweep_results *r;
    char *text = NULL, label[PATH_MAX + 32];
    size_t len = 0, start = 0;
    int64_t line = 0;
    struct stat st;
    if (!path) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_sweep_results_load: path is NULL");
    if (!(r = (mgpu_sweep_results *)mgpu__calloc(sizeof *r, "sweep results"))) return NULL;
    if (stat(path, &st) != 0 && errno == ENOENT) return r;
    if (mgpu_read_file(path, (void **)&text, &len) != MGPU_OK) { mgpu_free(r); return NULL; }
    while (start < len) {
        size_t end = start;
        mgpu_json *j;
        while (end < len && text[end] != '\n') end++;
        line++;
        snprintf(label, sizeof label, "%s line %lld", path, (long long)line);
        if (end > start) {
            j = mgpu_json_parse(text + start, end - start, label);
            if (!j || j->type != MGPU_JSON_OBJECT || !mgpu_json_get(j, "params") || mgpu_json_get(j, "params")->type != MGPU_JSON_OBJECT) {
                mgpu_log(MGPU_LOG_WARN, "%s: skipped (not a sweep record%s%s)", label, j ? "" : ": ", j ? "" : mgpu_last_error());
                mgpu_json_free(j);
            } else {
                if (r->n == r->cap) {
                    int64_t cap = r->cap ? 2 * r->cap : 64;
                    mgpu_json **grown = (mgpu_json **)mgpu__alloc((size_t)cap * sizeof *grown, "sweep results");
                    if (!grown) { mgpu_json_free(j); mgpu_free(text); mgpu_sweep_results_destroy(r); return NULL; }
                    if (r->n) memcpy(grown, r->records, (size_t)r->n * sizeof *grown);
                    mgpu_free(r->records);
                    r->records = grown; r->cap = cap;
                }
                r->records[r->n++] = j;
            }
        }
        start = end + 1;
    }
    mgpu_free(text);
    return r;
}

MGPU_API void mgpu_sweep_results_destroy(mgpu_sweep_results *r) {
    int64_t i;
    if (!r) return;
    for (i = 0; i < r->n; i++) mgpu_json_free(r->records[i]);
    mgpu_free(r->records);
    mgpu_free(r);
}

MGPU_API int64_t mgpu_sweep_results_count(const mgpu_sweep_results *r) { return r ? r->n : 0; }
MGPU_API const mgpu_json *mgpu_sweep_results_get(const mgpu_sweep_results *r, int64_t i) {
    return r && i >= 0 && i < r->n ? r->records[i] : NULL;
}

MGPU_API const char *mgpu_sweep_record_param(const mgpu_json *record, const char *name, char *buf, size_t size) {
    return mgpu__json_scalar_text(mgpu_json_get(mgpu_json_get(record, "params"), name), buf, size);
}

/* 1 if the record's params are exactly these names with these values. */
static int mgpu__sweep_record_is(const mgpu_json *record, int n, const char *const *names, const char *const *values) {
    const mgpu_json *params = mgpu_json_get(record, "params");
    char buf[128];
    int i;
    if (!params || params->count != n) return 0;
    for (i = 0; i < n; i++) {
        const char *v = mgpu_sweep_record_param(record, names[i], buf, sizeof buf);
        if (!v || strcmp(v, values[i]) != 0) return 0;
    }
    return 1;
}

MGPU_API const mgpu_json *mgpu_sweep_results_find(const mgpu_sweep_results *r, int n, const char *const *names, const char *const *values) {
    int64_t i;
    if (!r || n < 1 || !names || !values) return NULL;
    for (i = r->n - 1; i >= 0; i--)
        if (mgpu__sweep_record_is(r->records[i], n, names, values)) return r->records[i];
    return NULL;
}

MGPU_API int mgpu_sweep_record_metric(const mgpu_json *record, const char *name, double *value) {
    const mgpu_json *v;
    if (!record || !name) return 0;
    v = mgpu_json_get(record, name);
    if ((!v || v->type != MGPU_JSON_NUMBER) && strncmp(name, "final", 5) == 0 && (name[5] == '.' || name[5] == '_'))
        v = mgpu_json_get(mgpu_json_get(record, "final"), name + 6);
    if (!v || v->type != MGPU_JSON_NUMBER || !isfinite(v->number)) return 0;
    if (value) *value = v->number;
    return 1;
}

/* The whole line in one write() on an O_APPEND descriptor (atomic against other appenders), then fsync. */
static mgpu_result mgpu__append_fd(int fd, const char *path, const char *data, size_t len) {
    ssize_t w;
    do w = write(fd, data, len); while (w < 0 && errno == EINTR);
    if (w < 0) return mgpu__fail(MGPU_ERR_IO, "cannot append to '%s': %s", path, strerror(errno));
    if ((size_t)w != len) return mgpu__fail(MGPU_ERR_IO, "cannot append to '%s': only %zd of %zu bytes written (disk full?)", path, w, len);
    if (fsync(fd) != 0) return mgpu__fail(MGPU_ERR_IO, "cannot append to '%s': fsync: %s", path, strerror(errno));
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_append_line(const char *path, const char *text) {
    mgpu__buf b;
    mgpu_result r;
    int fd;
    if (!path || !text) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_append_line: path and text must not be NULL");
    mgpu__buf_init(&b);
    mgpu__buf_puts(&b, text);
    mgpu__buf_puts(&b, "\n");
    if (b.failed) return MGPU_ERR_OOM_HOST;
    if ((fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644)) < 0) {
        r = mgpu__fail(MGPU_ERR_IO, "cannot open '%s' for appending: %s", path, strerror(errno));
    } else {
        r = mgpu__append_fd(fd, path, b.data, b.len);
        close(fd);
    }
    mgpu__buf_free(&b);
    return r;
}

/* --------------------------------------------------------------------------------------
   Summary
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__sweep_group {
    int n_keys;
    char **keys;            /* values of the --by params */
    int64_t n;              /* runs */
    double *sum, *sumsq;    /* per metric (sumsq about the first value, for a stable variance) */
    double *first;
    int64_t *count;
} mgpu__sweep_group;

typedef struct mgpu__sweep_summary {
    const mgpu_sweep_summary_desc *d;
    const char **metrics; int n_metrics;
    mgpu__sweep_group *groups; int64_t n_groups;
    int64_t left_out_failed, left_out_other, missing_key;
} mgpu__sweep_summary;

/* Numeric order where both are numbers, text order otherwise. */
static int mgpu__sweep_cmp_values(const char *a, const char *b) {
    char *ea, *eb;
    double x = strtod(a, &ea), y = strtod(b, &eb);
    if (ea != a && !*ea && eb != b && !*eb && x != y) return x < y ? -1 : 1;
    return strcmp(a, b);
}

static int mgpu__sweep_cmp_groups(const void *pa, const void *pb) {
    const mgpu__sweep_group *a = (const mgpu__sweep_group *)pa, *b = (const mgpu__sweep_group *)pb;
    int i, c;
    for (i = 0; i < a->n_keys; i++)
        if ((c = mgpu__sweep_cmp_values(a->keys[i], b->keys[i])) != 0) return c;
    return 0;
}

/* A record's run key with its line; sorted by key, then line, the last entry of a key is the
   run's latest record. */
typedef struct mgpu__sweep_key { char *key; int64_t line; } mgpu__sweep_key;

static int mgpu__sweep_cmp_keys(const void *pa, const void *pb) {
    const mgpu__sweep_key *a = (const mgpu__sweep_key *)pa, *b = (const mgpu__sweep_key *)pb;
    int c = strcmp(a->key, b->key);
    return c ? c : (a->line > b->line) - (a->line < b->line);
}

static void mgpu__sweep_keys_free(mgpu__sweep_key *keys, int64_t n) {
    int64_t i;
    for (i = 0; keys && i < n; i++) mgpu_free(keys[i].key);
    mgpu_free(keys);
}

/* A record's params as one key, names sorted ("alpha=0.1,seed=3" whatever the order in the file). */
static char *mgpu__sweep_params_key(const mgpu_json *record) {
    const mgpu_json *p, *sorted[MGPU__SWEEP_MAX_AXES];
    const char *names[MGPU__SWEEP_MAX_AXES], *values[MGPU__SWEEP_MAX_AXES];
    char bufs[MGPU__SWEEP_MAX_AXES][128], id[MGPU__SWEEP_ID_MAX];
    int n = 0, i, k;
    for (p = mgpu_json_get(record, "params")->child; p && n < MGPU__SWEEP_MAX_AXES; p = p->next) {
        for (k = n++; k > 0 && strcmp(sorted[k - 1]->key, p->key) > 0; k--) sorted[k] = sorted[k - 1];
        sorted[k] = p;
    }
    for (i = 0; i < n; i++) {
        names[i] = sorted[i]->key;
        if (!(values[i] = mgpu__json_scalar_text(sorted[i], bufs[i], sizeof bufs[i]))) values[i] = "";
    }
    if (n == 0) return mgpu__strdup("");
    return mgpu_sweep_run_id(n, names, values, id, sizeof id) == MGPU_OK ? mgpu__strdup(id) : NULL;
}

/* latest[i] = 1 when record i is the last one of its run. */
static mgpu_result mgpu__sweep_latest(const mgpu_sweep_results *r, char *latest) {
    mgpu__sweep_key *keys = (mgpu__sweep_key *)mgpu__calloc((size_t)r->n * sizeof *keys + 1, "run keys");
    int64_t i;
    if (!keys) return MGPU_ERR_OOM_HOST;
    for (i = 0; i < r->n; i++) {
        keys[i].line = i;
        if (!(keys[i].key = mgpu__sweep_params_key(r->records[i]))) { mgpu__sweep_keys_free(keys, r->n); return MGPU_ERR_OOM_HOST; }
    }
    qsort(keys, (size_t)r->n, sizeof *keys, mgpu__sweep_cmp_keys);
    for (i = 0; i < r->n; i++) latest[keys[i].line] = i + 1 == r->n || strcmp(keys[i].key, keys[i + 1].key) != 0;
    mgpu__sweep_keys_free(keys, r->n);
    return MGPU_OK;
}

/* Metric names when none are given: every number of the final metrics lines, first seen first. */
static mgpu_result mgpu__sweep_default_metrics(const mgpu_sweep_results *r, mgpu__sweep_summary *s) {
    int64_t i;
    s->metrics = (const char **)mgpu__calloc(64 * sizeof(char *), "metric names");
    if (!s->metrics) return MGPU_ERR_OOM_HOST;
    for (i = 0; i < r->n; i++) {
        const mgpu_json *fin = mgpu_json_get(r->records[i], "final"), *m;
        if (!fin || fin->type != MGPU_JSON_OBJECT) continue;
        for (m = fin->child; m; m = m->next) {
            size_t size = m->key ? strlen(m->key) + 7 : 0;
            char *name;
            int k, seen = 0;
            if (m->type != MGPU_JSON_NUMBER || !m->key) continue;
            for (k = 0; k < s->n_metrics && !seen; k++) seen = strcmp(s->metrics[k] + 6, m->key) == 0;
            if (seen || s->n_metrics == 64) continue;
            if (!(name = (char *)mgpu__alloc(size, "a metric name"))) return MGPU_ERR_OOM_HOST;
            snprintf(name, size, "final_%s", m->key);
            s->metrics[s->n_metrics++] = name;
        }
    }
    if (s->n_metrics == 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "no run has final metrics: name the metrics to summarise (e.g. wall_s)");
    return MGPU_OK;
}

static mgpu__sweep_group *mgpu__sweep_group_of(mgpu__sweep_summary *s, char **keys) {
    int64_t g;
    int i, same;
    mgpu__sweep_group *grp;
    for (g = 0; g < s->n_groups; g++) {
        for (i = 0, same = 1; i < s->d->n_by && same; i++) same = strcmp(s->groups[g].keys[i], keys[i]) == 0;
        if (same) return &s->groups[g];
    }
    if (s->n_groups % 64 == 0) {
        mgpu__sweep_group *grown = (mgpu__sweep_group *)mgpu__calloc((size_t)(s->n_groups + 64) * sizeof *grown, "summary groups");
        if (!grown) return NULL;
        if (s->n_groups) memcpy(grown, s->groups, (size_t)s->n_groups * sizeof *grown);
        mgpu_free(s->groups);
        s->groups = grown;
    }
    grp = &s->groups[s->n_groups];
    grp->keys = (char **)mgpu__calloc((size_t)(s->d->n_by + 1) * sizeof(char *), "group keys");
    grp->sum = (double *)mgpu__calloc((size_t)s->n_metrics * 4 * sizeof(double), "group sums");
    grp->count = (int64_t *)mgpu__calloc((size_t)s->n_metrics * sizeof(int64_t), "group counts");
    if (!grp->keys || !grp->sum || !grp->count) return NULL;
    grp->n_keys = s->d->n_by;
    grp->sumsq = grp->sum + s->n_metrics;
    grp->first = grp->sum + 2 * s->n_metrics;
    for (i = 0; i < s->d->n_by; i++)
        if (!(grp->keys[i] = mgpu__strdup(keys[i]))) return NULL;
    s->n_groups++;
    return grp;
}

static mgpu_result mgpu__sweep_collect(const mgpu_sweep_results *r, mgpu__sweep_summary *s) {
    char *latest = (char *)mgpu__alloc((size_t)r->n + 1, "latest records");
    mgpu_result res = latest ? mgpu__sweep_latest(r, latest) : MGPU_ERR_OOM_HOST;
    int64_t i;
    int k;
    for (i = 0; i < r->n && res == MGPU_OK; i++) {
        const mgpu_json *rec = r->records[i], *status = mgpu_json_get(rec, "status");
        char bufs[MGPU__SWEEP_MAX_AXES][128], *keys[MGPU__SWEEP_MAX_AXES];
        mgpu__sweep_group *g;
        int missing = 0;
        if (!latest[i]) continue;
        if (!status || status->type != MGPU_JSON_STRING || strcmp(status->string, "ok") != 0) {
            if (status && status->type == MGPU_JSON_STRING && strcmp(status->string, "failed") == 0) s->left_out_failed++;
            else s->left_out_other++;
            continue;
        }
        for (k = 0; k < s->d->n_by; k++) {
            const char *v = mgpu_sweep_record_param(rec, s->d->by[k], bufs[k], sizeof bufs[k]);
            if (!v) { missing = 1; break; }
            if (v != bufs[k]) snprintf(bufs[k], sizeof bufs[k], "%s", v);
            keys[k] = bufs[k];
        }
        if (missing) { s->missing_key++; continue; }
        if (!(g = mgpu__sweep_group_of(s, keys))) { res = MGPU_ERR_OOM_HOST; break; }
        g->n++;
        for (k = 0; k < s->n_metrics; k++) {
            double v, dv;
            if (!mgpu_sweep_record_metric(rec, s->metrics[k], &v)) continue;
            if (g->count[k] == 0) g->first[k] = v;
            dv = v - g->first[k];
            g->sum[k] += dv;
            g->sumsq[k] += dv * dv;
            g->count[k]++;
        }
    }
    mgpu_free(latest);
    return res;
}

static void mgpu__sweep_stats_of(const mgpu__sweep_group *g, int k, double *mean, double *std) {
    double n = (double)g->count[k], m = g->sum[k] / n;
    *mean = g->first[k] + m;
    *std = g->count[k] > 1 ? sqrt(fmax(0.0, (g->sumsq[k] - n * m * m) / (n - 1))) : NAN;
}

/* Four decimals for everyday magnitudes, significant digits otherwise. */
static void mgpu__sweep_format_number(double v, char *buf, size_t size) {
    double a = fabs(v);
    if (v != v) snprintf(buf, size, "n/a");
    else if (a == 0 || (a >= 1e-3 && a < 1e7)) snprintf(buf, size, "%.4f", v);
    else snprintf(buf, size, "%.4g", v);
}

/* Cell (row, col) of the table/markdown output: row -1 is the header. */
static void mgpu__sweep_cell(const mgpu__sweep_summary *s, int64_t row, int col, char *buf, size_t size) {
    const mgpu__sweep_group *g = row >= 0 ? &s->groups[row] : NULL;
    int n_by = s->d->n_by, k = col - n_by - 1;
    char a[48], b[48];
    double mean, std;
    if (col < n_by) { snprintf(buf, size, "%s", g ? g->keys[col] : s->d->by[col]); return; }
    if (col == n_by) { if (g) snprintf(buf, size, "%lld", (long long)g->n); else snprintf(buf, size, "n"); return; }
    if (!g) { snprintf(buf, size, "%s", s->metrics[k]); return; }
    if (g->count[k] == 0) { snprintf(buf, size, "-"); return; }
    mgpu__sweep_stats_of(g, k, &mean, &std);
    mgpu__sweep_format_number(mean, a, sizeof a);
    mgpu__sweep_format_number(std, b, sizeof b);
    if (g->count[k] == g->n) snprintf(buf, size, "%s \xc2\xb1 %s", a, b);
    else snprintf(buf, size, "%s \xc2\xb1 %s (n=%lld)", a, b, (long long)g->count[k]);
}

static size_t mgpu__utf8_width(const char *s) {
    size_t n = 0;
    for (; *s; s++) n += ((unsigned char)*s & 0xC0) != 0x80;
    return n;
}

static void mgpu__csv_field(FILE *out, const char *s) {
    if (!strpbrk(s, ",\"\n\r")) { fputs(s, out); return; }
    fputc('"', out);
    for (; *s; s++) {
        if (*s == '"') fputc('"', out);
        fputc(*s, out);
    }
    fputc('"', out);
}

static void mgpu__sweep_print_csv(const mgpu__sweep_summary *s, FILE *out) {
    int64_t g;
    int k;
    for (k = 0; k < s->d->n_by; k++) { mgpu__csv_field(out, s->d->by[k]); fputc(',', out); }
    fputs("n", out);
    for (k = 0; k < s->n_metrics; k++) fprintf(out, ",%s_mean,%s_std,%s_n", s->metrics[k], s->metrics[k], s->metrics[k]);
    fputc('\n', out);
    for (g = 0; g < s->n_groups; g++) {
        const mgpu__sweep_group *grp = &s->groups[g];
        for (k = 0; k < s->d->n_by; k++) { mgpu__csv_field(out, grp->keys[k]); fputc(',', out); }
        fprintf(out, "%lld", (long long)grp->n);
        for (k = 0; k < s->n_metrics; k++) {
            double mean, std;
            if (grp->count[k] == 0) { fputs(",,,0", out); continue; }
            mgpu__sweep_stats_of(grp, k, &mean, &std);
            fprintf(out, ",%.10g,", mean);
            if (std == std) fprintf(out, "%.10g", std);
            fprintf(out, ",%lld", (long long)grp->count[k]);
        }
        fputc('\n', out);
    }
}

static void mgpu__sweep_print_table(const mgpu__sweep_summary *s, FILE *out, int markdown) {
    int n_cols = s->d->n_by + 1 + s->n_metrics, c;
    size_t *width = (size_t *)mgpu__calloc((size_t)n_cols * sizeof(size_t), "column widths");
    char cell[256];
    int64_t row;
    if (!width) return;
    for (c = 0; c < n_cols && markdown; c++) width[c] = 3; /* a delimiter cell needs a hyphen besides its colon */
    for (row = -1; row < s->n_groups; row++)
        for (c = 0; c < n_cols; c++) {
            mgpu__sweep_cell(s, row, c, cell, sizeof cell);
            width[c] = MGPU__MAX(width[c], mgpu__utf8_width(cell));
        }
    for (row = -1; row < s->n_groups; row++) {
        for (c = 0; c < n_cols; c++) {
            size_t w;
            mgpu__sweep_cell(s, row, c, cell, sizeof cell);
            fputs(markdown ? (c ? " | " : "| ") : (c ? "  " : ""), out);
            fputs(cell, out);
            if (markdown || c + 1 < n_cols)
                for (w = mgpu__utf8_width(cell); w < width[c]; w++) fputc(' ', out);
        }
        fputs(markdown ? " |\n" : "\n", out);
        if (row == -1 && markdown) {
            for (c = 0; c < n_cols; c++) {
                size_t w;
                fputs(c ? " | " : "| ", out);
                for (w = 1; w < width[c]; w++) fputc('-', out);
                fputc(c < s->d->n_by ? '-' : ':', out); /* numbers right-aligned when rendered */
            }
            fputs(" |\n", out);
        }
    }
    mgpu_free(width);
}

MGPU_API mgpu_result mgpu_sweep_summary_print(const mgpu_sweep_results *r, const mgpu_sweep_summary_desc *d, FILE *out) {
    mgpu__sweep_summary s;
    mgpu_result res;
    int64_t g;
    int k, own_metrics = 0;
    if (!r || !d || !out || d->n_by < 0 || d->n_by > MGPU__SWEEP_MAX_AXES || (d->n_by && !d->by) || d->n_metrics < 0 || (d->n_metrics && !d->metrics))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_sweep_summary_print: results, desc (0 to %d --by keys, metrics) and out must be valid", MGPU__SWEEP_MAX_AXES);
    memset(&s, 0, sizeof s);
    s.d = d;
    if (d->n_metrics) {
        s.metrics = (const char **)d->metrics;
        s.n_metrics = d->n_metrics;
    } else {
        own_metrics = 1;
        res = mgpu__sweep_default_metrics(r, &s);
        if (res != MGPU_OK) goto done;
    }
    for (k = 0; k < d->n_by; k++) {
        int64_t i;
        char buf[8];
        for (i = 0; i < r->n && !mgpu_sweep_record_param(r->records[i], d->by[k], buf, sizeof buf); i++) {}
        if (i == r->n) {
            res = mgpu__fail(MGPU_ERR_INVALID_ARG, "--by %s: no run has that param%s", d->by[k], r->n ? " (see \"params\" in the results file)" : " (the results file is empty)");
            goto done;
        }
    }
    if ((res = mgpu__sweep_collect(r, &s)) != MGPU_OK) goto done;
    if (s.n_groups == 0) {
        res = mgpu__fail(MGPU_ERR_INVALID_ARG, "no successful run to summarise (%lld failed, %lld interrupted or unknown, %lld without a --by key)",
                         (long long)s.left_out_failed, (long long)s.left_out_other, (long long)s.missing_key);
        goto done;
    }
    for (k = 0; k < s.n_metrics; k++) {
        int64_t found = 0;
        for (g = 0; g < s.n_groups; g++) found += s.groups[g].count[k];
        if (!found) { res = mgpu__fail(MGPU_ERR_INVALID_ARG, "no finished run has the metric '%s' (a number in the record, or final_NAME from its final metrics line)", s.metrics[k]); goto done; }
    }
    qsort(s.groups, (size_t)s.n_groups, sizeof *s.groups, mgpu__sweep_cmp_groups);
    if (d->format == MGPU_SWEEP_CSV) mgpu__sweep_print_csv(&s, out);
    else mgpu__sweep_print_table(&s, out, d->format == MGPU_SWEEP_MARKDOWN);
    if (d->format == MGPU_SWEEP_TABLE && (s.left_out_failed || s.left_out_other || s.missing_key))
        fprintf(out, "(left out: %lld failed, %lld interrupted or unknown, %lld without a --by key)\n", (long long)s.left_out_failed,
                (long long)s.left_out_other, (long long)s.missing_key);
    res = MGPU_OK;
done:
    for (g = 0; g < s.n_groups; g++) {
        for (k = 0; k < d->n_by; k++) mgpu_free(s.groups[g].keys[k]);
        mgpu_free(s.groups[g].keys);
        mgpu_free(s.groups[g].sum);
        mgpu_free(s.groups[g].count);
    }
    mgpu_free(s.groups);
    if (own_metrics) {
        for (k = 0; k < s.n_metrics; k++) mgpu_free((void *)s.metrics[k]);
        mgpu_free((void *)s.metrics);
    }
    return res;
}

/* --------------------------------------------------------------------------------------
   Sweep scheduler: one single-threaded poll loop. Signals (SIGCHLD included) arrive through
   the self-pipe; each slot runs one process group at a time; a run's output goes to its own
   log file, so nothing but signals needs watching.
   -------------------------------------------------------------------------------------- */

/* room for the run directory plus a run id and a suffix */
#define MGPU__SWEEP_PATH_MAX (PATH_MAX + MGPU__SWEEP_ID_MAX + 32)

typedef struct mgpu__sweep_slot {
    char devices[32];
    int busy, pid, attempt;
    int stopped;                  /* the sweep sent it SIGTERM (stop or timeout) */
    int timed_out;
    int64_t point;
    double t_start, deadline, kill_at; /* kill_at: SIGKILL due (0: none) */
    int64_t log_start, metrics_start;
    char started_at[32];
    char id[MGPU__SWEEP_ID_MAX];
    char log_path[MGPU__SWEEP_PATH_MAX], metrics_path[MGPU__SWEEP_PATH_MAX];
    const char *values[MGPU__SWEEP_MAX_AXES];
} mgpu__sweep_slot;

typedef struct mgpu__sweep {
    const mgpu_sweep_desc *d;
    const mgpu_sweep_grid *g;
    mgpu_sweep_stats *stats;
    const char *names[MGPU__SWEEP_MAX_AXES + MGPU__SWEEP_N_BUILTINS]; /* the axes, then the built-ins */
    int n_axes, uses_run_dir;
    char run_dir[PATH_MAX], lock_path[PATH_MAX + 8];
    int results_fd, lock_fd, sig_fd;
    int64_t *queue, q_head, q_len;  /* grid points left, in order */
    mgpu__sweep_slot *slots;
    int n_slots;
    int64_t done_before, failed_before, finished_now, failed_now;
    double t0, grace;
    int stop_sig, io_error, tty;
    double t_drawn;
    char threads[16];               /* MGPU_NUM_THREADS for every run; "" to inherit */
} mgpu__sweep;

/* ---- output: event lines, and one progress line (redrawn on a terminal) ---- */

static int mgpu__sweep_running(const mgpu__sweep *sw) {
    int i, n = 0;
    for (i = 0; i < sw->n_slots; i++) n += sw->slots[i].busy;
    return n;
}

static void mgpu__sweep_progress_text(const mgpu__sweep *sw, char *buf, size_t size, int bar) {
    int64_t total = sw->stats->total, done = sw->done_before + sw->finished_now, running = mgpu__sweep_running(sw);
    int64_t left = MGPU__MAX(total - done - running, 0);
    double hours = (mgpu_time_s() - sw->t0) / 3600.0, rate = hours > 0 ? (double)sw->finished_now / hours : 0;
    size_t pos = 0;
    char eta[32];
    if (bar) {
        int i, filled = total ? (int)(20 * done / total) : 0;
        pos += (size_t)snprintf(buf, size, "[");
        for (i = 0; i < 20 && pos + 2 < size; i++) buf[pos++] = i < filled ? '#' : '.';
        pos += (size_t)snprintf(buf + pos, size - pos, "] ");
    }
    pos += (size_t)snprintf(buf + pos, pos < size ? size - pos : 0, "%lld/%lld done, %lld failed, %lld running, %lld left", (long long)done,
                            (long long)total, (long long)(sw->failed_before + sw->failed_now), (long long)running, (long long)left);
    if (pos < size && sw->finished_now > 0) {
        mgpu__format_duration((double)(left + running) / rate * 3600.0, eta, sizeof eta);
        snprintf(buf + pos, size - pos, " | %.1f runs/h | ETA %s", rate, eta);
    }
}

static void mgpu__sweep_draw(mgpu__sweep *sw) {
    char line[256];
    if (sw->d->quiet || !sw->tty) return;
    mgpu__sweep_progress_text(sw, line, sizeof line, 1);
    fprintf(stderr, "\r%s\x1b[K", line);
    fflush(stderr);
    sw->t_drawn = mgpu_time_s();
}

/* An event line; with with_progress, the progress text is added (plain) or redrawn (terminal). */
static void mgpu__sweep_say(mgpu__sweep *sw, int with_progress, const char *fmt, ...) MGPU__PRINTF(3, 4);
static void mgpu__sweep_say(mgpu__sweep *sw, int with_progress, const char *fmt, ...) {
    char msg[1024], progress[256];
    va_list ap;
    if (sw->d->quiet) return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (sw->tty) {
        fprintf(stderr, "\r\x1b[Kmgpu-sweep: %s\n", msg);
        if (with_progress) mgpu__sweep_draw(sw);
    } else if (with_progress) {
        mgpu__sweep_progress_text(sw, progress, sizeof progress, 0);
        fprintf(stderr, "mgpu-sweep: %s [%s]\n", msg, progress);
    } else {
        fprintf(stderr, "mgpu-sweep: %s\n", msg);
    }
    fflush(stderr);
}

/* ---- setup: checks, lock, results file, the runs left ---- */

static mgpu_result mgpu__sweep_check(mgpu__sweep *sw) {
    const mgpu_sweep_desc *d = sw->d;
    const char *values[MGPU__SWEEP_MAX_AXES + MGPU__SWEEP_N_BUILTINS];
    int i, n;
    if (!d->grid || mgpu_sweep_grid_size(d->grid) < 1) return mgpu__fail(MGPU_ERR_INVALID_ARG, "the grid is empty (give at least one --grid NAME=VALUES)");
    if (!d->command || !d->command[0] || !d->command[0][0]) return mgpu__fail(MGPU_ERR_INVALID_ARG, "no command to run (give it after --)");
    if (!d->results || !d->results[0]) return mgpu__fail(MGPU_ERR_INVALID_ARG, "no results file (--results FILE)");
    if (d->cpu_slots < 0 || d->n_gpus < 0 || d->slots_per_gpu < 0 || d->retries < 0 || (d->n_gpus > 0 && !d->gpus))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "slot counts and retries must be >= 0");
    if (d->cpu_slots + d->n_gpus == 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "no slots to run on (give --gpus or --cpu-slots N)");
    for (i = 0; i < d->n_gpus; i++)
        if (!d->gpus[i] || !d->gpus[i][0] || strlen(d->gpus[i]) >= sizeof sw->slots[0].devices)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "GPU %d has an empty or too long CUDA_VISIBLE_DEVICES value", i);
    sw->g = d->grid;
    sw->n_axes = mgpu_sweep_grid_axes(d->grid);
    for (i = 0; i < sw->n_axes; i++) sw->names[i] = mgpu_sweep_grid_name(d->grid, i);
    for (i = 0; i < MGPU__SWEEP_N_BUILTINS; i++) sw->names[sw->n_axes + i] = mgpu__sweep_builtins[i];
    /* every argument substitutes (unknown keys are caught before anything runs) */
    mgpu_sweep_grid_point(d->grid, 0, values);
    for (i = 0; i < MGPU__SWEEP_N_BUILTINS; i++) values[sw->n_axes + i] = "x";
    n = sw->n_axes + MGPU__SWEEP_N_BUILTINS;
    for (i = 0; d->command[i]; i++) {
        char *arg = mgpu_sweep_substitute(d->command[i], n, sw->names, values);
        if (!arg) return MGPU_ERR_INVALID_ARG;
        mgpu_free(arg);
        if (strstr(d->command[i], "{run_dir}")) sw->uses_run_dir = 1;
    }
    if (!strchr(d->command[0], '{') && !mgpu_program_exists(d->command[0]))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "the command '%s' was not found or is not executable", d->command[0]);
    if (d->run_dir) {
        snprintf(sw->run_dir, sizeof sw->run_dir, "%s", d->run_dir);
    } else {
        size_t len = strlen(d->results);
        if (len > 6 && strcmp(d->results + len - 6, ".jsonl") == 0) len -= 6;
        snprintf(sw->run_dir, sizeof sw->run_dir, "%.*s.d", (int)len, d->results);
    }
    snprintf(sw->lock_path, sizeof sw->lock_path, "%s.lock", d->results);
    return MGPU_OK;
}

/* flock on RESULTS.lock, held until the sweep ends (or dies: the kernel drops it). */
static mgpu_result mgpu__sweep_lock(mgpu__sweep *sw) {
    char pid[32] = "";
    ssize_t n;
    const char *slash = strrchr(sw->d->results, '/');
    if (slash && slash != sw->d->results) { /* the results file's folder, like the run directory, is made */
        char dir[PATH_MAX];
        snprintf(dir, sizeof dir, "%.*s", (int)(slash - sw->d->results), sw->d->results);
        if (mgpu_make_dirs(dir) != MGPU_OK) return mgpu__fail(MGPU_ERR_IO, "cannot write the results file '%s': %.400s", sw->d->results, mgpu_last_error());
    }
    sw->lock_fd = open(sw->lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (sw->lock_fd < 0) return mgpu__fail(MGPU_ERR_IO, "cannot create the lock file '%s': %s", sw->lock_path, strerror(errno));
    if (flock(sw->lock_fd, LOCK_EX | LOCK_NB) != 0) {
        int err = errno;
        n = pread(sw->lock_fd, pid, sizeof pid - 1, 0);
        pid[n > 0 ? n : 0] = 0;
        pid[strcspn(pid, "\n")] = 0;
        if (err == EWOULDBLOCK)
            return mgpu__fail(MGPU_ERR_STATE, "another sweep%s%s%s is writing '%s' (it holds '%s'); wait for it to end or stop it first",
                              pid[0] ? " (pid " : "", pid, pid[0] ? ")" : "", sw->d->results, sw->lock_path);
        return mgpu__fail(MGPU_ERR_IO, "cannot lock '%s': %s", sw->lock_path, strerror(err));
    }
    n = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (ftruncate(sw->lock_fd, 0) != 0 || pwrite(sw->lock_fd, pid, (size_t)n, 0) != n) { /* the pid is only for the message */ }
    return MGPU_OK;
}

/* Opens the results file for appending (so an unwritable path fails before any run) and ends a
   torn last line, so the next record starts on a line of its own. */
static mgpu_result mgpu__sweep_open_results(mgpu__sweep *sw) {
    struct stat st;
    char last = '\n';
    sw->results_fd = open(sw->d->results, O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (sw->results_fd < 0) return mgpu__fail(MGPU_ERR_IO, "cannot write the results file '%s': %s", sw->d->results, strerror(errno));
    if (fstat(sw->results_fd, &st) == 0 && st.st_size > 0 && pread(sw->results_fd, &last, 1, st.st_size - 1) == 1 && last != '\n') {
        mgpu_result r;
        mgpu_log(MGPU_LOG_WARN, "sweep: '%s' ends with a torn line (a crash while writing?); it is skipped", sw->d->results);
        if ((r = mgpu__append_fd(sw->results_fd, sw->d->results, "\n", 1)) != MGPU_OK) return r;
    }
    if (mgpu_make_dirs(sw->run_dir) != MGPU_OK) return mgpu__fail(MGPU_ERR_IO, "cannot create the run directory: %.400s", mgpu_last_error());
    if (access(sw->run_dir, W_OK) != 0)
        return mgpu__fail(MGPU_ERR_IO, "cannot write the run directory '%s' (logs and metrics): %s", sw->run_dir, strerror(errno));
    return MGPU_OK;
}

/* The run id of a record in this grid's axis order, or 0 if its params are not exactly the axes. */
static int mgpu__sweep_record_id(const mgpu__sweep *sw, const mgpu_json *rec, char *id, size_t size) {
    char bufs[MGPU__SWEEP_MAX_AXES][128];
    const char *values[MGPU__SWEEP_MAX_AXES];
    const mgpu_json *params = mgpu_json_get(rec, "params");
    int a;
    if (!params || params->count != sw->n_axes) return 0;
    for (a = 0; a < sw->n_axes; a++)
        if (!(values[a] = mgpu_sweep_record_param(rec, sw->names[a], bufs[a], sizeof bufs[a]))) return 0;
    return mgpu_sweep_run_id(sw->n_axes, sw->names, values, id, size) == MGPU_OK;
}

/* "ok", "failed" or anything else: 0, 1, 2. */
static int mgpu__sweep_record_state(const mgpu_json *record) {
    const mgpu_json *st = mgpu_json_get(record, "status");
    if (!st || st->type != MGPU_JSON_STRING) return 2;
    return strcmp(st->string, "ok") == 0 ? 0 : strcmp(st->string, "failed") == 0 ? 1 : 2;
}

/* Finished runs (the latest record of each: "ok", or "failed" unless rerun_failed) are skipped;
   the other points, in grid order, make the queue. */
static mgpu_result mgpu__sweep_plan(mgpu__sweep *sw) {
    mgpu_sweep_results *res = mgpu_sweep_results_load(sw->d->results);
    mgpu__sweep_key *done = NULL;
    int64_t n_done = 0, i, total = mgpu_sweep_grid_size(sw->g);
    char id[MGPU__SWEEP_ID_MAX];
    mgpu_result r = MGPU_OK;
    if (!res) return mgpu_last_result();
    done = (mgpu__sweep_key *)mgpu__calloc((size_t)res->n * sizeof *done + 1, "finished runs");
    sw->queue = (int64_t *)mgpu__alloc((size_t)total * sizeof(int64_t), "the sweep queue");
    if (!done || !sw->queue) r = MGPU_ERR_OOM_HOST;
    for (i = 0; i < res->n && r == MGPU_OK; i++) {
        if (!mgpu__sweep_record_id(sw, res->records[i], id, sizeof id)) continue; /* another grid's run */
        done[n_done].line = i;
        if (!(done[n_done++].key = mgpu__strdup(id))) r = MGPU_ERR_OOM_HOST;
    }
    if (n_done) qsort(done, (size_t)n_done, sizeof *done, mgpu__sweep_cmp_keys);
    sw->stats->total = total;
    for (i = 0; i < total && r == MGPU_OK; i++) {
        const char *values[MGPU__SWEEP_MAX_AXES];
        int64_t lo = 0, hi = n_done;
        int state;
        mgpu_sweep_grid_point(sw->g, i, values);
        mgpu_sweep_run_id(sw->n_axes, sw->names, values, id, sizeof id);
        while (lo < hi) { /* the first entry past this id; the one before it is its latest record */
            int64_t mid = (lo + hi) / 2;
            if (strcmp(done[mid].key, id) <= 0) lo = mid + 1; else hi = mid;
        }
        state = lo > 0 && strcmp(done[lo - 1].key, id) == 0 ? mgpu__sweep_record_state(res->records[done[lo - 1].line]) : 2;
        if (state == 0 || (state == 1 && !sw->d->rerun_failed)) {
            sw->done_before++;
            sw->failed_before += state;
        } else {
            sw->queue[sw->q_len++] = i;
        }
    }
    sw->stats->skipped = sw->done_before;
    sw->stats->skipped_failed = sw->failed_before;
    mgpu__sweep_keys_free(done, n_done);
    mgpu_sweep_results_destroy(res);
    return r;
}

/* ---- one run ---- */

static void mgpu__sweep_info(const mgpu__sweep *sw, const mgpu__sweep_slot *s, mgpu_sweep_run_info *info) {
    memset(info, 0, sizeof *info);
    info->index = s->point; info->id = s->id; info->values = s->values;
    info->slot = (int)(s - sw->slots); info->devices = s->devices;
    info->attempt = s->attempt; info->pid = s->pid;
    info->log_path = s->log_path; info->metrics_path = s->metrics_path;
}

/* The command of a run with every {key} filled in (NULL-terminated; free with mgpu__sweep_free_argv). */
static char **mgpu__sweep_argv(const mgpu__sweep *sw, const mgpu__sweep_slot *s, const char *run_dir) {
    const char *values[MGPU__SWEEP_MAX_AXES + MGPU__SWEEP_N_BUILTINS];
    char slot[16], attempt[16];
    int n = 0, i;
    char **argv;
    while (sw->d->command[n]) n++;
    if (!(argv = (char **)mgpu__calloc((size_t)(n + 1) * sizeof *argv, "a command line"))) return NULL;
    snprintf(slot, sizeof slot, "%d", (int)(s - sw->slots));
    snprintf(attempt, sizeof attempt, "%d", s->attempt);
    for (i = 0; i < sw->n_axes; i++) values[i] = s->values[i];
    values[sw->n_axes + 0] = s->metrics_path; /* order of mgpu__sweep_builtins */
    values[sw->n_axes + 1] = s->log_path;
    values[sw->n_axes + 2] = s->id;
    values[sw->n_axes + 3] = run_dir;
    values[sw->n_axes + 4] = slot;
    values[sw->n_axes + 5] = attempt;
    for (i = 0; i < n; i++) {
        if (!(argv[i] = mgpu_sweep_substitute(sw->d->command[i], sw->n_axes + MGPU__SWEEP_N_BUILTINS, sw->names, values))) {
            while (i > 0) mgpu_free(argv[--i]);
            mgpu_free(argv);
            return NULL;
        }
    }
    return argv;
}

static void mgpu__sweep_free_argv(char **argv) {
    int i;
    for (i = 0; argv && argv[i]; i++) mgpu_free(argv[i]);
    mgpu_free(argv);
}

/* The command as a shell would read it back (for logs and --dry-run). */
static void mgpu__sweep_quote_argv(char *const *argv, mgpu__buf *b) {
    int i;
    for (i = 0; argv[i]; i++) {
        const char *a = argv[i];
        if (i) mgpu__buf_puts(b, " ");
        if (a[0] && !a[strspn(a, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+-=.,/:@%")]) { mgpu__buf_puts(b, a); continue; }
        mgpu__buf_puts(b, "'");
        for (; *a; a++) {
            if (*a == '\'') mgpu__buf_puts(b, "'\\''");
            else mgpu__buf_append(b, a, 1);
        }
        mgpu__buf_puts(b, "'");
    }
}

static void mgpu__sweep_set_paths(const mgpu__sweep *sw, mgpu__sweep_slot *s, int64_t point) {
    s->point = point;
    mgpu_sweep_grid_point(sw->g, point, s->values);
    mgpu_sweep_run_id(sw->n_axes, sw->names, s->values, s->id, sizeof s->id);
    snprintf(s->log_path, sizeof s->log_path, "%s/%s.log", sw->run_dir, s->id);
    snprintf(s->metrics_path, sizeof s->metrics_path, "%s/%s.metrics.jsonl", sw->run_dir, s->id);
}

/* The run's log (appended: attempts and resumed runs keep what came before), headed by the command. */
static int mgpu__sweep_open_log(mgpu__sweep_slot *s, int slot, char *const *argv) {
    mgpu__buf head;
    time_t now = time(NULL);
    struct tm tm;
    int fd = open(s->log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
        mgpu__fail(MGPU_ERR_IO, "cannot open the log '%s': %s", s->log_path, strerror(errno));
        return -1;
    }
    gmtime_r(&now, &tm);
    strftime(s->started_at, sizeof s->started_at, "%Y-%m-%dT%H:%M:%SZ", &tm);
    mgpu__buf_init(&head);
    mgpu__buf_printf(&head, "=== mgpu-sweep: run %s, attempt %d, slot %d (CUDA_VISIBLE_DEVICES=%s), %s ===\n$ ", s->id, s->attempt, slot,
                     s->devices, s->started_at);
    mgpu__sweep_quote_argv(argv, &head);
    mgpu__buf_puts(&head, "\n");
    if (!head.failed && write(fd, head.data, head.len) < 0) { /* a log header is not worth failing the run */ }
    mgpu__buf_free(&head);
    s->log_start = (int64_t)lseek(fd, 0, SEEK_END);
    return fd;
}

static void mgpu__sweep_finish(mgpu__sweep *sw, mgpu__sweep_slot *s, int wait_status, const char *error);

static void mgpu__sweep_launch(mgpu__sweep *sw, mgpu__sweep_slot *s, int64_t point, int attempt) {
    char run_dir[MGPU__SWEEP_PATH_MAX], e_cvd[64], e_id[MGPU__SWEEP_ID_MAX + 32], e_metrics[MGPU__SWEEP_PATH_MAX + 16], e_slot[32], e_attempt[32], e_threads[48];
    const char *env[8];
    char **argv = NULL;
    mgpu_spawn_desc sd;
    struct stat st;
    int slot = (int)(s - sw->slots), log_fd = -1, n_env = 0;
    mgpu_sweep_run_info info;
    s->busy = 1; s->attempt = attempt; s->pid = -1;
    s->stopped = s->timed_out = 0;
    s->kill_at = 0;
    s->t_start = mgpu_time_s();
    s->deadline = sw->d->run_timeout_s > 0 ? s->t_start + sw->d->run_timeout_s : 0;
    mgpu__sweep_set_paths(sw, s, point);
    snprintf(run_dir, sizeof run_dir, "%s/%s", sw->run_dir, s->id);
    s->metrics_start = stat(s->metrics_path, &st) == 0 ? (int64_t)st.st_size : 0;
    if (!(argv = mgpu__sweep_argv(sw, s, run_dir)) || (sw->uses_run_dir && mgpu_make_dirs(run_dir) != MGPU_OK) ||
        (log_fd = mgpu__sweep_open_log(s, slot, argv)) < 0) {
        mgpu__sweep_free_argv(argv);
        mgpu__sweep_finish(sw, s, -1, mgpu_last_error());
        return;
    }
    snprintf(e_cvd, sizeof e_cvd, "CUDA_VISIBLE_DEVICES=%s", s->devices);
    snprintf(e_id, sizeof e_id, "MGPU_SWEEP_RUN_ID=%s", s->id);
    snprintf(e_metrics, sizeof e_metrics, "MGPU_METRICS=%s", s->metrics_path);
    snprintf(e_slot, sizeof e_slot, "MGPU_SWEEP_SLOT=%d", slot);
    snprintf(e_attempt, sizeof e_attempt, "MGPU_SWEEP_ATTEMPT=%d", attempt);
    env[n_env++] = e_cvd; env[n_env++] = e_id; env[n_env++] = e_metrics; env[n_env++] = e_slot; env[n_env++] = e_attempt;
    if (sw->threads[0]) {
        snprintf(e_threads, sizeof e_threads, "MGPU_NUM_THREADS=%s", sw->threads);
        env[n_env++] = e_threads;
    }
    /* GPU indices are nvidia-smi's (PCI bus order); CUDA's default order is fastest first */
    if (s->devices[0] && !getenv("CUDA_DEVICE_ORDER")) env[n_env++] = "CUDA_DEVICE_ORDER=PCI_BUS_ID";
    env[n_env] = NULL;
    memset(&sd, 0, sizeof sd);
    sd.argv = argv;
    sd.env = env;
    sd.stdout_fd = sd.stderr_fd = log_fd;
    sd.label = "mgpu-sweep";
    if (mgpu_spawn(&sd, &s->pid) != MGPU_OK) {
        close(log_fd);
        mgpu__sweep_free_argv(argv);
        mgpu__sweep_finish(sw, s, -1, mgpu_last_error());
        return;
    }
    close(log_fd);
    mgpu__sweep_free_argv(argv);
    if (sw->d->on_start) {
        mgpu__sweep_info(sw, s, &info);
        sw->d->on_start(&info, sw->d->user);
    }
}

/* The last {"event":"final",...} line the run wrote to its metrics file in this attempt, or NULL. */
static char *mgpu__sweep_final_line(const char *path, int64_t from) {
    char *text = NULL, *found = NULL;
    size_t len = 0, start;
    struct stat st;
    if (stat(path, &st) != 0 || (int64_t)st.st_size <= from || mgpu_read_file(path, (void **)&text, &len) != MGPU_OK) return NULL;
    for (start = (size_t)MGPU__MIN((int64_t)len, from); start < len;) {
        size_t end = start;
        while (end < len && text[end] != '\n') end++;
        if (end > start && memmem(text + start, end - start, "\"final\"", 7)) {
            mgpu_json *j = mgpu_json_parse(text + start, end - start, path);
            const mgpu_json *ev = mgpu_json_get(j, "event");
            if (j && j->type == MGPU_JSON_OBJECT && ev && ev->type == MGPU_JSON_STRING && strcmp(ev->string, "final") == 0) {
                mgpu_free(found);
                if ((found = (char *)mgpu__alloc(end - start + 1, "a metrics line")) != NULL) {
                    memcpy(found, text + start, end - start);
                    found[end - start] = 0;
                }
            }
            mgpu_json_free(j);
        }
        start = end + 1;
    }
    mgpu_free(text);
    return found;
}

/* Bytes that are not UTF-8 (binary output, a character cut by the tail) become '?', so the
   record stays JSON that strict readers accept. */
static void mgpu__utf8_repair(char *s) {
    size_t n = strlen(s), i = 0;
    while (i < n) {
        size_t k = mgpu__utf8_seq_len((const unsigned char *)s + i, n - i);
        if (!k) { s[i] = '?'; k = 1; }
        i += k;
    }
}

static void mgpu__sweep_record(const mgpu__sweep *sw, const mgpu__sweep_slot *s, mgpu__buf *b, const char *status, int wait_status,
                               double wall_s, const char *final_line, const char *error) {
    int a;
    mgpu__buf_puts(b, "{\"run_id\":");
    mgpu__buf_json_string(b, s->id);
    mgpu__buf_puts(b, ",\"params\":{");
    for (a = 0; a < sw->n_axes; a++) {
        if (a) mgpu__buf_puts(b, ",");
        mgpu__buf_json_string(b, sw->names[a]);
        mgpu__buf_puts(b, ":");
        mgpu__buf_json_param(b, s->values[a]);
    }
    mgpu__buf_printf(b, "},\"status\":\"%s\",\"exit_code\":", status);
    if (wait_status != -1 && WIFEXITED(wait_status)) mgpu__buf_printf(b, "%d", WEXITSTATUS(wait_status));
    else mgpu__buf_puts(b, "null");
    mgpu__buf_puts(b, ",\"signal\":");
    if (wait_status != -1 && WIFSIGNALED(wait_status)) mgpu__buf_printf(b, "\"%s\"", mgpu_signal_name(WTERMSIG(wait_status)));
    else mgpu__buf_puts(b, "null");
    mgpu__buf_puts(b, ",\"error\":");
    if (error) mgpu__buf_json_string(b, error);
    else mgpu__buf_puts(b, "null");
    mgpu__buf_printf(b, ",\"attempts\":%d", s->attempt);
    mgpu__buf_json_member_number(b, "wall_s", floor(wall_s * 1000.0 + 0.5) / 1000.0);
    mgpu__buf_printf(b, ",\"slot\":%d,\"devices\":", (int)(s - sw->slots));
    mgpu__buf_json_string(b, s->devices);
    mgpu__buf_printf(b, ",\"started_at\":\"%s\",\"log\":", s->started_at);
    mgpu__buf_json_string(b, s->log_path);
    mgpu__buf_puts(b, ",\"metrics\":");
    mgpu__buf_json_string(b, s->metrics_path);
    mgpu__buf_puts(b, ",\"final\":");
    mgpu__buf_puts(b, final_line ? final_line : "null");
    if (strcmp(status, "failed") == 0) {
        char tail[MGPU__SWEEP_TAIL_BYTES];
        mgpu_file_tail(s->log_path, s->log_start, sw->d->tail_lines > 0 ? sw->d->tail_lines : 20, tail, sizeof tail);
        mgpu__utf8_repair(tail);
        mgpu__buf_puts(b, ",\"log_tail\":");
        mgpu__buf_json_string(b, tail);
    }
    mgpu__buf_puts(b, "}\n");
}

/* A run ended (wait_status -1: it never started; error says why). Records it, or starts it again
   while --retries allow. */
static void mgpu__sweep_finish(mgpu__sweep *sw, mgpu__sweep_slot *s, int wait_status, const char *error) {
    double wall = mgpu_time_s() - s->t_start;
    char *final_line = mgpu__sweep_final_line(s->metrics_path, s->metrics_start), how[160];
    int ok = wait_status != -1 && WIFEXITED(wait_status) && WEXITSTATUS(wait_status) == 0;
    mgpu_sweep_status status;
    mgpu_sweep_run_info info;
    mgpu__buf line;
    /* a run the sweep stopped is interrupted, whatever it exits with, unless it did finish */
    if (s->stopped && !s->timed_out) status = ok && final_line ? MGPU_SWEEP_OK : MGPU_SWEEP_INTERRUPTED;
    else status = ok ? MGPU_SWEEP_OK : MGPU_SWEEP_FAILED;
    if (error) snprintf(how, sizeof how, "%s", error);
    else if (s->timed_out) snprintf(how, sizeof how, "timed out after %g s", sw->d->run_timeout_s);
    else if (status == MGPU_SWEEP_INTERRUPTED) snprintf(how, sizeof how, "stopped by %s to the sweep", mgpu_signal_name(sw->stop_sig));
    else mgpu_wait_status_describe(wait_status, how, sizeof how);
    mgpu__sweep_info(sw, s, &info);
    info.status = status;
    info.exit_code = wait_status != -1 && WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : -1;
    info.signal = wait_status != -1 && WIFSIGNALED(wait_status) ? WTERMSIG(wait_status) : 0;
    info.wall_s = wall;
    s->busy = 0;
    if (status == MGPU_SWEEP_FAILED && s->attempt <= sw->d->retries && !sw->stop_sig) {
        mgpu__sweep_say(sw, 0, "%s %s after %.1f s; retrying (attempt %d of %d); log %s", s->id, how, wall, s->attempt + 1,
                        sw->d->retries + 1, s->log_path);
        mgpu_free(final_line);
        if (sw->d->on_finish) sw->d->on_finish(&info, sw->d->user);
        mgpu__sweep_launch(sw, s, s->point, s->attempt + 1);
        return;
    }
    mgpu__buf_init(&line);
    mgpu__sweep_record(sw, s, &line, status == MGPU_SWEEP_OK ? "ok" : status == MGPU_SWEEP_FAILED ? "failed" : "interrupted",
                       wait_status, wall, final_line, status == MGPU_SWEEP_OK ? NULL : how);
    mgpu_free(final_line);
    if (line.failed || mgpu__append_fd(sw->results_fd, sw->d->results, line.data, line.len) != MGPU_OK) {
        if (!sw->io_error) mgpu__sweep_say(sw, 0, "cannot record %s, stopping the sweep: %s", s->id, line.failed ? "out of memory" : mgpu_last_error());
        sw->io_error = 1;
    }
    if (status == MGPU_SWEEP_INTERRUPTED) {
        sw->stats->interrupted++;
    } else {
        sw->finished_now++;
        if (status == MGPU_SWEEP_OK) sw->stats->ok++;
        else { sw->stats->failed++; sw->failed_now++; }
    }
    if (status == MGPU_SWEEP_OK && sw->tty) mgpu__sweep_draw(sw); /* on a terminal the bar alone tells */
    else if (status == MGPU_SWEEP_OK) mgpu__sweep_say(sw, 1, "ok %s in %.1f s", s->id, wall);
    else if (status == MGPU_SWEEP_FAILED) mgpu__sweep_say(sw, 1, "FAILED %s: %s after %.1f s; log %s", s->id, how, wall, s->log_path);
    else mgpu__sweep_say(sw, 0, "interrupted %s after %.1f s (it runs again on resume)", s->id, wall);
    info.record = line.data;
    if (sw->d->on_finish) sw->d->on_finish(&info, sw->d->user);
    mgpu__buf_free(&line);
}

/* ---- the loop ---- */

static void mgpu__sweep_fill(mgpu__sweep *sw) {
    int i;
    for (i = 0; i < sw->n_slots && sw->q_len > 0 && !sw->stop_sig && !sw->io_error; i++) {
        if (sw->slots[i].busy) continue;
        sw->q_len--;
        mgpu__sweep_launch(sw, &sw->slots[i], sw->queue[sw->q_head++], 1);
    }
}

static void mgpu__sweep_reap(mgpu__sweep *sw) {
    int i;
    for (i = 0; i < sw->n_slots; i++) {
        mgpu__sweep_slot *s = &sw->slots[i];
        int status = 0, pid = s->pid;
        pid_t r;
        if (!s->busy || pid <= 0) continue;
        do r = waitpid((pid_t)pid, &status, WNOHANG); while (r < 0 && errno == EINTR);
        if (r == 0) continue;
        mgpu_kill_group(pid, SIGKILL); /* whatever the run left behind in its group */
        if (r < 0) mgpu__sweep_finish(sw, s, -1, "its process was reaped elsewhere (is SIGCHLD ignored?)");
        else mgpu__sweep_finish(sw, s, status, NULL);
    }
}

static void mgpu__sweep_stop_slot(mgpu__sweep *sw, mgpu__sweep_slot *s, double now) {
    if (!s->busy || s->stopped) return;
    s->stopped = 1;
    s->kill_at = now + sw->grace;
    mgpu_kill_group(s->pid, SIGTERM);
}

static void mgpu__sweep_on_signal(mgpu__sweep *sw, int sig) {
    int i, running = mgpu__sweep_running(sw);
    if (sig == SIGCHLD) return;
    if (!sw->stop_sig) {
        sw->stop_sig = sig;
        mgpu__sweep_say(sw, 0, "got %s: stopping %d running run%s (SIGTERM, SIGKILL after %g s); they run again on resume", mgpu_signal_name(sig),
                        running, running == 1 ? "" : "s", sw->grace);
        for (i = 0; i < sw->n_slots; i++) mgpu__sweep_stop_slot(sw, &sw->slots[i], mgpu_time_s());
        return;
    }
    mgpu__sweep_say(sw, 0, "got %s again: killing the %d run%s left now", mgpu_signal_name(sig), running, running == 1 ? "" : "s");
    for (i = 0; i < sw->n_slots; i++)
        if (sw->slots[i].busy) { mgpu_kill_group(sw->slots[i].pid, SIGKILL); sw->slots[i].kill_at = 0; }
}

/* Timeouts and SIGKILL deadlines due now; returns the milliseconds until the next one (-1: none). */
static int mgpu__sweep_timers(mgpu__sweep *sw) {
    double now = mgpu_time_s(), next = -1;
    int i;
    for (i = 0; i < sw->n_slots; i++) {
        mgpu__sweep_slot *s = &sw->slots[i];
        if (!s->busy) continue;
        if (s->deadline > 0 && !s->stopped && now >= s->deadline) {
            s->timed_out = 1;
            mgpu__sweep_stop_slot(sw, s, now);
        }
        if (s->kill_at > 0 && now >= s->kill_at) {
            mgpu_kill_group(s->pid, SIGKILL);
            s->kill_at = 0;
        }
        if (s->deadline > 0 && !s->stopped && (next < 0 || s->deadline < next)) next = s->deadline;
        if (s->kill_at > 0 && (next < 0 || s->kill_at < next)) next = s->kill_at;
    }
    if (sw->tty && !sw->d->quiet && (next < 0 || next > now + 1.0)) next = now + 1.0; /* redraw: ETA and rate move */
    return next < 0 ? -1 : (int)((next - now) * 1000.0) + 1;
}

static void mgpu__sweep_wait(mgpu__sweep *sw, int timeout_ms) {
    struct pollfd pfd;
    unsigned char buf[64];
    ssize_t n, i;
    pfd.fd = sw->sig_fd;
    pfd.events = POLLIN;
    pfd.revents = 0;
    if (poll(&pfd, 1, timeout_ms) <= 0) return;
    while ((n = read(sw->sig_fd, buf, sizeof buf)) > 0)
        for (i = 0; i < n; i++) mgpu__sweep_on_signal(sw, buf[i]);
}

static void mgpu__sweep_dry_run(mgpu__sweep *sw) {
    int64_t k;
    mgpu__sweep_slot s;
    memset(&s, 0, sizeof s);
    s.attempt = 1;
    for (k = 0; k < sw->q_len; k++) {
        char run_dir[MGPU__SWEEP_PATH_MAX], **argv;
        mgpu__buf b;
        mgpu__sweep_set_paths(sw, &s, sw->queue[k]);
        snprintf(run_dir, sizeof run_dir, "%s/%s", sw->run_dir, s.id);
        if (!(argv = mgpu__sweep_argv(sw, &s, run_dir))) return;
        mgpu__buf_init(&b);
        mgpu__sweep_quote_argv(argv, &b);
        printf("%s: %s\n", s.id, b.failed ? "(out of memory)" : b.data);
        mgpu__buf_free(&b);
        mgpu__sweep_free_argv(argv);
    }
    fflush(stdout);
}

static mgpu_result mgpu__sweep_setup(mgpu__sweep *sw) {
    const mgpu_sweep_desc *d = sw->d;
    int i, k;
    mgpu_result r;
    if ((r = mgpu__sweep_check(sw)) != MGPU_OK) return r;
    sw->n_slots = d->cpu_slots + d->n_gpus * (d->slots_per_gpu > 0 ? d->slots_per_gpu : 1);
    if (!(sw->slots = (mgpu__sweep_slot *)mgpu__calloc((size_t)sw->n_slots * sizeof *sw->slots, "sweep slots"))) return MGPU_ERR_OOM_HOST;
    /* GPU slots first, interleaved over the GPUs (slot 0 on GPU 0, slot 1 on GPU 1, ...) */
    for (i = 0, k = 0; k < d->n_gpus * (d->slots_per_gpu > 0 ? d->slots_per_gpu : 1); k++, i++)
        snprintf(sw->slots[i].devices, sizeof sw->slots[i].devices, "%s", d->gpus[k % d->n_gpus]);
    if (d->num_threads > 0) snprintf(sw->threads, sizeof sw->threads, "%d", d->num_threads);
    else if (!getenv("MGPU_NUM_THREADS")) snprintf(sw->threads, sizeof sw->threads, "%d", MGPU__MAX(1, mgpu_cpu_count() / sw->n_slots));
    if (d->dry_run) return mgpu__sweep_plan(sw);
    if ((r = mgpu__sweep_lock(sw)) != MGPU_OK || (r = mgpu__sweep_open_results(sw)) != MGPU_OK) return r;
    return mgpu__sweep_plan(sw);
}

static void mgpu__sweep_teardown(mgpu__sweep *sw) {
    if (sw->sig_fd >= 0) mgpu_signal_pipe_close();
    if (sw->results_fd >= 0) close(sw->results_fd);
    if (sw->lock_fd >= 0) close(sw->lock_fd); /* releases the flock */
    mgpu_free(sw->slots);
    mgpu_free(sw->queue);
}

MGPU_API mgpu_result mgpu_sweep_run(const mgpu_sweep_desc *desc, mgpu_sweep_stats *stats) {
    static const int stop_signals[] = {SIGCHLD, SIGINT, SIGTERM, SIGHUP};
    mgpu__sweep sw;
    mgpu_sweep_stats local;
    mgpu_result r;
    char took[32];
    if (!desc) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_sweep_run: desc is NULL");
    memset(&sw, 0, sizeof sw);
    sw.d = desc;
    sw.stats = stats ? stats : &local;
    memset(sw.stats, 0, sizeof *sw.stats);
    sw.results_fd = sw.lock_fd = sw.sig_fd = -1;
    sw.grace = desc->grace_s > 0 ? desc->grace_s : 5.0;
    sw.tty = isatty(STDERR_FILENO);
    if ((r = mgpu__sweep_setup(&sw)) != MGPU_OK || desc->dry_run) {
        if (r == MGPU_OK) mgpu__sweep_dry_run(&sw);
        mgpu__sweep_teardown(&sw);
        return r;
    }
    /* SIGCHLD alone when the caller keeps its signals: it still wakes the loop */
    if ((sw.sig_fd = mgpu_signal_pipe_open(stop_signals, desc->no_signal_handlers ? 1 : 4)) < 0) {
        r = mgpu_last_result();
        mgpu__sweep_teardown(&sw);
        return r;
    }
    sw.t0 = mgpu_time_s();
    mgpu__sweep_say(&sw, 0, "%lld runs in the grid, %lld already in %s, %lld to run on %d slot%s; logs in %s/", (long long)sw.stats->total,
                    (long long)sw.done_before, desc->results, (long long)sw.q_len, sw.n_slots, sw.n_slots == 1 ? "" : "s", sw.run_dir);
    for (;;) {
        int timeout_ms;
        mgpu__sweep_fill(&sw);
        mgpu__sweep_reap(&sw);
        if (mgpu__sweep_running(&sw) == 0) {
            if (sw.stop_sig || sw.io_error || sw.q_len == 0) break;
            continue;
        }
        timeout_ms = mgpu__sweep_timers(&sw);
        mgpu__sweep_wait(&sw, timeout_ms);
        if (sw.tty && mgpu_time_s() - sw.t_drawn >= 1.0) mgpu__sweep_draw(&sw);
    }
    mgpu__format_duration(mgpu_time_s() - sw.t0, took, sizeof took);
    if (sw.stop_sig) {
        sw.stats->stop_signal = sw.stop_sig;
        mgpu__sweep_say(&sw, 0, "stopped by %s after %s: %lld ok, %lld failed, %lld interrupted, %lld not started; run the same command to resume",
                        mgpu_signal_name(sw.stop_sig), took, (long long)sw.stats->ok, (long long)sw.stats->failed,
                        (long long)sw.stats->interrupted, (long long)sw.q_len);
    } else {
        mgpu__sweep_say(&sw, 0, "done in %s: %lld ok, %lld failed (%lld run%s finished before); results in %s", took, (long long)sw.stats->ok,
                        (long long)sw.stats->failed, (long long)sw.done_before, sw.done_before == 1 ? "" : "s", desc->results);
    }
    r = sw.io_error ? MGPU_ERR_IO : MGPU_OK;
    mgpu__sweep_teardown(&sw);
    return r;
}
#endif /* MGPU_IMPLEMENTATION */

/*
------------------------------------------------------------------------------
MIT License

Copyright (c) 2026 the mgpu authors

Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
*/
