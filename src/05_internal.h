
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

/* Number of visible CUDA devices. Defined in mgpu_kernels.cu. */
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

/* db += column sums of dy (rows, cols): fixed-order, deterministic (linear's bias gradient) */
mgpu_result mgpu_cuda_bias_grad(const float *dy, float *db, int64_t rows, int64_t cols, void *stream);

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
   forward: loss[0] = mean over counted rows of lse - x[t] (nll: -x[t]), valid[0] = counted rows,
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
/* mse (n): forward loss[0] = mean((a - b)^2); backward da += 2 dloss[0] / n * (a - b), db -= the
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
    int64_t row_size, rank, world;
    const float *src; float *dst; int64_t n;
    int accumulate;
} mgpu__dropout_args;
mgpu_result mgpu_cuda_dropout(const mgpu__dropout_args *a, void *stream);
/* Fills out[i] = mgpu_random_u32(seed, first + i) (tests compare it with the CPU bit for bit). */
mgpu_result mgpu_cuda_random_u32(uint64_t seed, uint64_t first, uint32_t *out, int64_t n, void *stream);

/* ---- normalisation ---- */
/* x (R, C) over the last dim; w, b (C) or NULL; mean, rstd (R) saved for backward */
mgpu_result mgpu_cuda_layer_norm_forward(const float *x, const float *w, const float *b, float *y, float *mean, float *rstd,
                                         int64_t R, int64_t C, float eps, void *stream);
/* dx, dw, db accumulate (any may be NULL); dw/db by a fixed-order column reduction */
mgpu_result mgpu_cuda_layer_norm_backward(const float *x, const float *w, const float *dy, const float *mean, const float *rstd,
                                          float *dx, float *dw, float *db, int64_t R, int64_t C, void *stream);
/* x (N, C, S). training: batch mean and biased variance normalise; running stats (may be NULL) get
   (1 - momentum) * old + momentum * (mean, unbiased variance). Eval: running stats. mean, rstd (C) saved. */
mgpu_result mgpu_cuda_batch_norm_forward(const float *x, const float *w, const float *b, float *running_mean, float *running_var,
                                         float *y, float *mean, float *rstd, int64_t N, int64_t C, int64_t S, int training,
                                         float momentum, float eps, void *stream);
mgpu_result mgpu_cuda_batch_norm_backward(const float *x, const float *w, const float *dy, const float *mean, const float *rstd,
                                          float *dx, float *dw, float *db, int64_t N, int64_t C, int64_t S, int training,
                                          void *stream);

/* ---- embedding: weight (V, D), idx (n) ---- */
mgpu_result mgpu_cuda_embedding_forward(const float *weight, const void *idx, int idx_i64, float *out, int64_t n, int64_t V,
                                        int64_t D, void *stream);
/* dweight += scatter of dy (n, D): sort-free and deterministic (each (row, column) owned by one thread,
   indices visited in order); costs n reads per thread, fine for the token counts of one step. */
mgpu_result mgpu_cuda_embedding_backward(const void *idx, int idx_i64, const float *dy, float *dweight, int64_t n, int64_t V,
                                         int64_t D, void *stream);

/* ---- convolution helpers and pooling: x (N, C, H, W) ---- */
typedef struct mgpu_cuda_conv_geom { int64_t N, C, H, W, OH, OW; int kernel, stride, padding; } mgpu_cuda_conv_geom;
/* cols (N, C*k*k, OH*OW) */
mgpu_result mgpu_cuda_im2col(const mgpu_cuda_conv_geom *g, const float *x, float *cols, void *stream);
/* dx += col2im(dcols): gathered per input element, no atomics */
mgpu_result mgpu_cuda_col2im(const mgpu_cuda_conv_geom *g, const float *dcols, float *dx, void *stream);
/* y (N, C, OH, OW); argmax (N, C, OH, OW) index into the H*W plane (max only, may be NULL). Average
   pooling divides by k*k (count_include_pad, as the CPU and PyTorch's default). */
mgpu_result mgpu_cuda_pool_forward(const mgpu_cuda_conv_geom *g, int is_max, const float *x, float *y, int32_t *argmax, void *stream);
mgpu_result mgpu_cuda_pool_backward(const mgpu_cuda_conv_geom *g, int is_max, const int32_t *argmax, const float *dy, float *dx,
                                    void *stream);

/* ---- copies: elements of esize bytes (the CUDA twins move 4-byte ones); accumulate (backward,
   F32): dst += instead ---- */
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

/* ---- reductions, in an order fixed by the shapes alone (deterministic); x seen as (outer, dim, inner) ---- */
#define MGPU_CUDA_REDUCE_PARTIALS 1024
/* sum: forward out (outer, inner) = scale * sum over dim (a full sum: outer = inner = 1);
   backward out += scale * dy broadcast along dim. scratch (forward with outer * inner == 1):
   MGPU_CUDA_REDUCE_PARTIALS floats of workspace for the CUDA twin's two-phase sum; the CPU twin ignores it */
typedef struct mgpu__sum_args {
    mgpu_context *ctx;
    const float *x, *dy; float *out;
    int64_t outer, dim, inner;
    float scale;
    float *scratch;
} mgpu__sum_args;
mgpu_result mgpu_cuda_sum_forward(const mgpu__sum_args *a, void *stream);
mgpu_result mgpu_cuda_sum_backward(const mgpu__sum_args *a, void *stream);
/* max_dim (dim >= 1): forward out, argmax (outer, inner) = the first maximum along dim (NaN wins)
   and its index; backward out += dy at argmax */
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
    float *scratch;                       /* MGPU__CLIP_SCRATCH_FLOATS(count) floats on the device for the
                                             CUDA twin; NULL for the CPU twin, which needs none */
} mgpu__clip_grad_norm_args;
#define MGPU__CLIP_SCRATCH_FLOATS(count) ((int64_t)(count) * MGPU_CUDA_REDUCE_PARTIALS + 1)
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

/* ---- attention (batched GEMM + row softmax); q (BH, Tq, D), k, v (BH, Tk, D) ----
   probs (BH, Tq, Tk) is written and kept for backward; dprobs the same size of scratch. */
mgpu_result mgpu_cuda_attention_forward(void *blas, const float *q, const float *k, const float *v, float *out, float *probs,
                                        int64_t BH, int64_t Tq, int64_t Tk, int64_t D, int causal, void *stream);
mgpu_result mgpu_cuda_attention_backward(void *blas, const float *q, const float *k, const float *v, const float *probs,
                                         const float *dout, float *dq, float *dk, float *dv, float *dprobs, int64_t BH,
                                         int64_t Tq, int64_t Tk, int64_t D, int causal, void *stream);

/* ---- GEMM through cuBLASLt with a plan cache; falls back to cublasSgemm/GemmEx ---- */
typedef enum mgpu_cuda_epilogue { MGPU_CUDA_EPI_NONE, MGPU_CUDA_EPI_BIAS, MGPU_CUDA_EPI_BIAS_RELU, MGPU_CUDA_EPI_BIAS_GELU } mgpu_cuda_epilogue;
/* blas: handles + workspace + plan cache, bound to one device and stream. workspace_bytes 0: 32 MiB. */
mgpu_result mgpu_cuda_blas_create(void **blas, void *stream, size_t workspace_bytes);
void mgpu_cuda_blas_destroy(void *blas);
mgpu_result mgpu_cuda_blas_set_stream(void *blas, void *stream);
/* 1: allow TF32 for F32 GEMMs (off by default so F32 matches the CPU to 1e-5) */
void mgpu_cuda_blas_set_tf32(void *blas, int allow);
int mgpu_cuda_blas_plan_count(const void *blas);   /* cached cuBLASLt plans (tests check reuse) */
/* Row-major C (m, n) = alpha * op(A) @ op(B) + beta * C [+ bias (n)] [then ReLU/GELU-tanh]; op(A) (m, k).
   A, B dtype: F32, F16 or BF16 (both the same); C always F32, f32 accumulation. use_lt 0 forces cublasGemmEx. */
mgpu_result mgpu_cuda_gemm(void *blas, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha, const void *a,
                           int64_t lda, const void *b, int64_t ldb, int ab_dtype, float beta, float *c, int64_t ldc, int epilogue,
                           const float *bias, int use_lt);

/* ---- runtime wrappers used by the CUDA host side (C files need no CUDA headers for these) ---- */
mgpu_result mgpu_cuda_synchronize(void *stream);


#ifdef __cplusplus
}
#endif
#endif /* MGPU__INTERNAL_H */
