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
