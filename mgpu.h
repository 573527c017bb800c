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
MGPU_API int mgpu_cuda_device_count(void); /* 0 in a CPU build or without a GPU */

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
MGPU_API mgpu_result mgpu_tensor_copy(mgpu_tensor *dst, const mgpu_tensor *src); /* same dtype and numel */
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

typedef struct mgpu_loader_desc {
    int64_t batch_size;       /* per process */
    int shuffle; uint64_t seed;
    int drop_last;            /* drop the last incomplete batch (DataLoader drop_last) */
    int rank, world_size;     /* sharding (world 0 or 1: no sharding) */
    int sampler_drop_last;    /* DistributedSampler(drop_last=True) */
    int num_workers;          /* 0: load on the calling thread */
    int prefetch;             /* batches in flight per worker; 0: 2 */
    mgpu_context *ctx;        /* batch tensors are created on this context's device (NULL: host) */
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

typedef struct mgpu_train_opts {
    const char *data_dir;          /* --data */
    int epochs;                    /* --epochs */
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
    const char *amp;               /* --amp off|fp16|bf16 */
    const char *device;            /* --device cpu|cuda|cuda:N|auto */
    const char *gpu_ids;           /* --gpu-ids 0,1,3 */
    const char *multi_gpu;         /* --multi-gpu none|dp|ddp */
    int num_workers;               /* --num-workers */
    int eval_frequency;            /* --eval-frequency (epochs) */
    const char *save_dir;          /* --save-dir */
    int checkpoint_every_epochs;   /* --checkpoint-every-epochs */
    float checkpoint_interval_min; /* --checkpoint-interval-min */
    int keep_last;                 /* --keep-last */
    const char *resume;            /* --resume auto|none|PATH */
    uint64_t seed;                 /* --seed */
    const char *metrics;           /* --metrics FILE */
    int log_every;                 /* --log-every (steps) */
    int64_t max_steps;             /* --max-steps (0: no limit) */
    int64_t checkpoint_every_steps;/* --checkpoint-every-steps */
    int help;                      /* --help was given (usage printed) */
    /* restart-schedule extras (--t0-epochs, --t-mult, --eta-min, --step-size-epochs, --gamma) */
    float t0_epochs; int t_mult; float eta_min; float step_size_epochs; float gamma;
    /* DDP (--sync-batchnorm 0|1, --bucket-cap-mb, --grad-compression none|fp16|bf16) */
    int sync_batchnorm; float bucket_cap_mb; const char *grad_compression;
} mgpu_train_opts;
/* Defaults: epochs 10, batch 128, lr 1e-3, adamw, wd 1e-4, momentum 0.9, schedule constant,
   accum 1, amp off, device auto, workers 0, eval every epoch, keep_last 3, resume none, seed 0. */
MGPU_API void mgpu_train_opts_default(mgpu_train_opts *o);
/* Parses argv (strings are kept by pointer). --help prints usage to stdout and sets o->help.
   An unknown flag or a bad value is MGPU_ERR_INVALID_ARG naming the flag (also printed to stderr). */
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

#include "parts/amp_api.h"
#include "parts/checkpoint_api.h"
#include "parts/comm_api.h"
#include "parts/cuda_api.h"

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
} mgpu_train_summary;
/* Creates the context from opts (device, seed, threads). opts is kept by pointer. */
MGPU_API mgpu_trainer *mgpu_trainer_create(const mgpu_train_opts *opts);
MGPU_API mgpu_context *mgpu_trainer_context(const mgpu_trainer *t);
/* Train `model` (built on mgpu_trainer_context) with cross-entropy on train, evaluating on test
   (may be NULL) every --eval-frequency epochs and after the last; optimizer, LR schedule and
   scaling, gradient accumulation, clipping, metrics JSONL, progress and --save-dir/model.safetensors
   all come from the options. */
MGPU_API mgpu_result mgpu_trainer_fit(mgpu_trainer *t, mgpu_model *model, mgpu_forward_fn forward, void *user,
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

#ifdef MGPU_CUDA
/* Launchers and runtime wrappers implemented in mgpu_kernels.cu (C linkage, never exit). */
#ifdef __cplusplus
extern "C" {
#endif
int mgpu__cuda_device_count(void);
#ifdef __cplusplus
}
#endif
#endif
/* Set to 1 when the CUDA ops exist; until then "auto" picks the CPU even where a GPU is visible. */
#define MGPU__CUDA_BACKEND_READY 0

MGPU_API int mgpu_cuda_device_count(void) {
#ifdef MGPU_CUDA
    return mgpu__cuda_device_count();
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
        out->type = MGPU__CUDA_BACKEND_READY && mgpu_cuda_device_count() > 0 ? MGPU_DEVICE_CUDA : MGPU_DEVICE_CPU;
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
        if (idx >= mgpu_cuda_device_count())
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "device '%s': only %d CUDA device(s) visible", text, mgpu_cuda_device_count());
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
   Activation arena: bump allocation in chunks; end_step keeps one chunk as large as the whole
   step needed, so a steady-state training step allocates nothing.
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__chunk { struct mgpu__chunk *prev; size_t size, used; } mgpu__chunk;
typedef struct mgpu__arena { mgpu__chunk *head; size_t total_used, peak; size_t initial; } mgpu__arena;

#define MGPU__CHUNK_HEADER 64 /* keeps the chunk payload 64-byte aligned */

static void *mgpu__arena_alloc_raw(mgpu__arena *a, size_t bytes) {
    mgpu__chunk *c = a->head;
    bytes = (bytes + 63) & ~(size_t)63;
    if (!c || c->used + bytes > c->size) {
        size_t want = MGPU__MAX(bytes, MGPU__MAX(a->initial, c ? 2 * c->size : 0));
        mgpu__chunk *n = (mgpu__chunk *)mgpu_malloc(MGPU__CHUNK_HEADER + want);
        if (!n) return NULL;
        n->prev = c; n->size = want; n->used = 0;
        a->head = c = n;
    }
    {
        void *p = (char *)c + MGPU__CHUNK_HEADER + c->used;
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
        while (c) { mgpu__chunk *p = c->prev; need += c->size; mgpu_free(c); c = p; }
        a->head = NULL;
        a->initial = MGPU__MAX(a->initial, need);
    } else if (a->head) {
        a->head->used = 0;
    }
    a->total_used = 0;
}

static void mgpu__arena_free(mgpu__arena *a) {
    mgpu__chunk *c = a->head;
    while (c) { mgpu__chunk *p = c->prev; mgpu_free(c); c = p; }
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

struct mgpu_context {
    mgpu_device device;
    mgpu__pool *pool;
    mgpu__arena arena;
    uint64_t rng_seed, rng_offset;
    int grad_enabled;
    int autocast;                      /* mgpu_amp_mode: emulated half precision for matmul-like ops */
    mgpu__node **tape; int64_t tape_len, tape_cap;
    mgpu_backward_end_fn backward_end; void *backward_end_user;
    int row_rank, row_world;           /* DDP sharding (rank, world; 0 = 1): dropout draws row j's mask at global row rank + world * j */
};

MGPU_API mgpu_context *mgpu_context_create(const mgpu_context_desc *desc) {
    mgpu_context *ctx;
    mgpu_context_desc d;
    if (desc) d = *desc; else memset(&d, 0, sizeof d);
    if (d.device.type != MGPU_DEVICE_CPU && d.device.type != MGPU_DEVICE_CUDA)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_context_create: desc->device.type %d is not a device type", (int)d.device.type);
    if (d.device.type == MGPU_DEVICE_CUDA)
        MGPU__FAIL_NULL(MGPU_ERR_UNSUPPORTED, "mgpu_context_create: device cuda:%d: the CUDA backend is not implemented yet in this version; use --device cpu", d.device.index);
    if (d.num_threads < 0) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_context_create: desc->num_threads is %d, must be >= 0", d.num_threads);
    ctx = (mgpu_context *)mgpu__calloc(sizeof *ctx, "a context");
    if (!ctx) return NULL;
    ctx->device = d.device;
    ctx->pool = mgpu__pool_create(d.num_threads ? d.num_threads : mgpu__default_num_threads());
    if (!ctx->pool) { mgpu_free(ctx); return NULL; }
    ctx->arena.initial = d.arena_bytes ? d.arena_bytes : ((size_t)16 << 20);
    ctx->rng_seed = d.seed;
    ctx->grad_enabled = 1;
    return ctx;
}

MGPU_API void mgpu_context_destroy(mgpu_context *ctx) {
    if (!ctx) return;
    mgpu__pool_destroy(ctx->pool);
    mgpu__arena_free(&ctx->arena);
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

/* Step-lifetime scratch memory (freed by mgpu_context_end_step). */
static MGPU__UNUSED void *mgpu__arena_alloc(mgpu_context *ctx, size_t bytes) {
    void *p = mgpu__arena_alloc_raw(&ctx->arena, bytes);
    if (!p) mgpu__fail(MGPU_ERR_OOM_HOST, "out of host memory growing the activation arena by %zu bytes", bytes);
    return p;
}

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
    t->data = mgpu__calloc((size_t)numel * mgpu__dtype_sizes[dtype], "tensor data");
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
    if (t) memcpy(t->data, host, mgpu_tensor_nbytes(t));
    return t;
}
MGPU_API void mgpu_tensor_free(mgpu_tensor *t) {
    if (!t || t->is_arena) return;
    if (t->grad) mgpu_tensor_free(t->grad);
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
    t->data = mgpu__arena_alloc(ctx, (size_t)numel * mgpu__dtype_sizes[dtype]);
    return t->data ? t : NULL;
}
static MGPU__UNUSED mgpu_tensor *mgpu__new_activation_zeros(mgpu_context *ctx, mgpu_dtype dtype, int ndim, const int64_t *shape) {
    mgpu_tensor *t = mgpu__new_activation(ctx, dtype, ndim, shape);
    if (t) memset(t->data, 0, mgpu_tensor_nbytes(t));
    return t;
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

static int mgpu__on_host(const mgpu_tensor *t) { return t->device.type == MGPU_DEVICE_CPU; }

MGPU_API mgpu_result mgpu_tensor_copy_to_host(const mgpu_tensor *t, void *dst, size_t dst_bytes) {
    if (!t || !dst) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_copy_to_host: tensor and dst must not be NULL");
    if (dst_bytes < mgpu_tensor_nbytes(t))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_copy_to_host: dst has %zu bytes, tensor needs %zu", dst_bytes, mgpu_tensor_nbytes(t));
    memcpy(dst, t->data, mgpu_tensor_nbytes(t));
    return MGPU_OK;
}
MGPU_API mgpu_result mgpu_tensor_copy_from_host(mgpu_tensor *t, const void *src, size_t src_bytes) {
    if (!t || !src) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_copy_from_host: tensor and src must not be NULL");
    if (src_bytes != mgpu_tensor_nbytes(t))
        return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_tensor_copy_from_host: src has %zu bytes, tensor holds %zu", src_bytes, mgpu_tensor_nbytes(t));
    memcpy(t->data, src, src_bytes);
    return MGPU_OK;
}
MGPU_API mgpu_result mgpu_tensor_copy(mgpu_tensor *dst, const mgpu_tensor *src) {
    if (!dst || !src) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_copy: dst and src must not be NULL");
    if (dst->dtype != src->dtype || dst->numel != src->numel)
        return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_tensor_copy: dst is %s x %lld, src is %s x %lld", mgpu_dtype_name(dst->dtype),
                          (long long)dst->numel, mgpu_dtype_name(src->dtype), (long long)src->numel);
    if (dst->data != src->data) memmove(dst->data, src->data, mgpu_tensor_nbytes(src));
    return MGPU_OK;
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

MGPU_API mgpu_result mgpu_tensor_fill(mgpu_tensor *t, double value) {
    int64_t i;
    if (!t) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_fill: tensor is NULL");
    if (value == 0.0) { memset(t->data, 0, mgpu_tensor_nbytes(t)); return MGPU_OK; }
    for (i = 0; i < t->numel; i++) mgpu__store(t->data, t->dtype, i, value);
    return MGPU_OK;
}
MGPU_API double mgpu_tensor_item(const mgpu_tensor *t) {
    if (!t || t->numel < 1) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_tensor_item: tensor is NULL or empty"); return NAN; }
    return mgpu__load(t->data, t->dtype, 0);
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
    if (t->grad) memset(t->grad->data, 0, mgpu_tensor_nbytes(t->grad));
    return MGPU_OK;
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
    g = mgpu__grad_f32(ctx, out);
    if (!g) return mgpu_last_result();
    for (i = 0; i < out->numel; i++) g[i] += ((const float *)grad_output->data)[i];
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
    mgpu_tensor one;
    float v = 1.0f;
    if (!ctx || !loss) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_backward: ctx and loss must not be NULL");
    if (loss->numel != 1) return mgpu__fail(MGPU_ERR_SHAPE, "mgpu_backward: loss must be a scalar, got shape %s (use mgpu_backward_with_grad)", mgpu__shape_str(loss));
    mgpu__tensor_init_header(&one, ctx, MGPU_F32, loss->ndim, loss->shape, 1);
    one.data = &v;
    return mgpu_backward_with_grad(ctx, loss, &one);
}

/* ---- parts (developed separately, inlined before release) ---- */
#include "parts/cuda.h"
#include "parts/ops_basic.h"
#include "parts/ops_nn.h"
#include "parts/ops_norm.h"
#include "parts/nn.h"
#include "parts/data.h"
#include "parts/io.h"
#include "parts/amp.h"
#include "parts/checkpoint.h"
#include "parts/comm.h"
#include "parts/ddp.h"
#include "parts/train.h"

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
