
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
   Fronts call them through MGPU__TWIN(ctx, stem, &args) (section "Helpers for op authors").
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

typedef enum mgpu_cuda_binary { MGPU_CUDA_ADD, MGPU_CUDA_SUB, MGPU_CUDA_MUL } mgpu_cuda_binary;
/* Broadcast geometry: out shape and the element strides of a and b against it (0 where broadcast). */
typedef struct mgpu_cuda_bcast {
    int ndim;
    int64_t shape[MGPU_MAX_DIMS], a_stride[MGPU_MAX_DIMS], b_stride[MGPU_MAX_DIMS];
    int64_t numel, a_numel, b_numel;
} mgpu_cuda_bcast;
/* NumPy broadcasting of a and b (right-aligned); MGPU_ERR_SHAPE when they do not broadcast. */
mgpu_result mgpu_cuda_bcast_make(int a_ndim, const int64_t *a_shape, int b_ndim, const int64_t *b_shape, mgpu_cuda_bcast *out);
mgpu_result mgpu_cuda_binary_forward(int op, const mgpu_cuda_bcast *g, const float *a, const float *b, float *out, void *stream);
/* da += reduce(dy * d out/d a) over a's broadcast dims (likewise db); da or db may be NULL. Deterministic. */
mgpu_result mgpu_cuda_binary_backward(int op, const mgpu_cuda_bcast *g, const float *a, const float *b, const float *dy,
                                      float *da, float *db, void *stream);

/* x (rows, cols) + b (cols) */
mgpu_result mgpu_cuda_bias_add_forward(const float *x, const float *b, float *y, int64_t rows, int64_t cols, void *stream);
/* db += column sums of dy (rows, cols): fixed-order, deterministic */
mgpu_result mgpu_cuda_bias_grad(const float *dy, float *db, int64_t rows, int64_t cols, void *stream);

/* ---- softmax family: x seen as (outer, dim, inner), normalised along dim ---- */
mgpu_result mgpu_cuda_softmax_forward(const float *x, float *y, int64_t outer, int64_t dim, int64_t inner, int log, void *stream);
/* dx += softmax' (y is the forward output; log selects log-softmax) */
mgpu_result mgpu_cuda_softmax_backward(const float *y, const float *dy, float *dx, int64_t outer, int64_t dim, int64_t inner,
                                       int log, void *stream);

/* ---- losses: targets (n) I32 or I64 (target_i64), -100 ignored; other out-of-range targets give NaN
   (validate them on the host first). Scalars (loss, valid) live in device memory. ---- */
/* loss[0] = mean over counted rows of lse - x[t]; lse (n) kept for backward; valid[0] = counted rows */
mgpu_result mgpu_cuda_cross_entropy_forward(const float *logits, const void *target, int target_i64, int64_t n, int64_t c,
                                            float *lse, float *loss, float *valid, void *stream);
/* dx += dloss / valid * (softmax - onehot) */
mgpu_result mgpu_cuda_cross_entropy_backward(const float *logits, const void *target, int target_i64, const float *lse,
                                             const float *dloss, const float *valid, float *dx, int64_t n, int64_t c, void *stream);
mgpu_result mgpu_cuda_nll_forward(const float *logp, const void *target, int target_i64, int64_t n, int64_t c,
                                  float *loss, float *valid, void *stream);
mgpu_result mgpu_cuda_nll_backward(const void *target, int target_i64, const float *dloss, const float *valid, float *dx,
                                   int64_t n, int64_t c, void *stream);
/* loss[0] = mean((a - b)^2) */
mgpu_result mgpu_cuda_mse_forward(const float *a, const float *b, int64_t n, float *loss, void *stream);
mgpu_result mgpu_cuda_mse_backward(const float *a, const float *b, const float *dloss, float *da, float *db, int64_t n, void *stream);

/* ---- dropout: keep element i iff mgpu_random_uniform(seed, first + i) >= p (the CPU's exact mask).
   dst = src * scale where kept, 0 elsewhere; accumulate: dst += instead (backward). ---- */
mgpu_result mgpu_cuda_dropout(uint64_t seed, uint64_t first, float p, float scale, const float *src, float *dst, int64_t n,
                              int accumulate, void *stream);
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

/* ---- copies ---- */
/* x (outer, d0, mid, d1, inner) -> y (outer, d1, mid, d0, inner); accumulate: y += */
mgpu_result mgpu_cuda_transpose(const float *x, float *y, int64_t outer, int64_t d0, int64_t mid, int64_t d1, int64_t inner,
                                int accumulate, void *stream);
/* Row-block copy for concat/narrow and their backwards: for r < rows,
   dst[r * dst_row + dst_off + j] (=|+=) src[r * src_row + src_off + j], j < len. */
mgpu_result mgpu_cuda_copy_rows(const float *src, int64_t src_row, int64_t src_off, float *dst, int64_t dst_row, int64_t dst_off,
                                int64_t rows, int64_t len, int accumulate, void *stream);

/* ---- reductions (fixed partition and tree: deterministic for a given n) ---- */
#define MGPU_CUDA_REDUCE_PARTIALS 1024
/* out[0] = scale * sum(x); scratch: MGPU_CUDA_REDUCE_PARTIALS floats of device memory */
mgpu_result mgpu_cuda_sum(const float *x, int64_t n, float scale, float *out, float *scratch, void *stream);
/* x (outer, D, inner) -> y (outer, inner) = scale * sum over D */
mgpu_result mgpu_cuda_sum_dim(const float *x, float *y, int64_t outer, int64_t D, int64_t inner, float scale, void *stream);
/* dx (outer, D, inner) += scale * dy (outer, inner); a full sum is outer = inner = 1, D = n,
   with dy a device scalar */
mgpu_result mgpu_cuda_sum_dim_backward(const float *dy, float *dx, int64_t outer, int64_t D, int64_t inner, float scale, void *stream);
/* y, argmax (outer, inner): first maximum along D (NaN wins) */
mgpu_result mgpu_cuda_max_dim(const float *x, float *y, int32_t *argmax, int64_t outer, int64_t D, int64_t inner, void *stream);
mgpu_result mgpu_cuda_max_dim_backward(const int32_t *argmax, const float *dy, float *dx, int64_t outer, int64_t D, int64_t inner,
                                       void *stream);

/* ---- casts F32 <-> F16/BF16 (round to nearest even), dtypes as mgpu_dtype ---- */
mgpu_result mgpu_cuda_cast(const void *src, int src_dtype, void *dst, int dst_dtype, int64_t n, void *stream);

/* ---- optimizers, clipping, loss scaling ---- */
typedef struct mgpu_cuda_adam_args {
    float decay, l2, beta1, beta2, eps, step_size, bc2_sqrt;   /* as the CPU's mgpu__adam_job */
    float grad_scale;                                          /* grads multiplied by this first (1: none) */
} mgpu_cuda_adam_args;
typedef struct mgpu_cuda_sgd_args { float lr, weight_decay, momentum, keep, grad_scale; int nesterov, first; } mgpu_cuda_sgd_args;
/* One kernel launch per group of up to 32 tensors (a multi-tensor apply). m, v or buf may be NULL for SGD. */
mgpu_result mgpu_cuda_adam_update(int n_tensors, float *const *params, const float *const *grads, float *const *m, float *const *v,
                                  const int64_t *numel, const mgpu_cuda_adam_args *a, void *stream);
mgpu_result mgpu_cuda_sgd_update(int n_tensors, float *const *params, const float *const *grads, float *const *buf,
                                 const int64_t *numel, const mgpu_cuda_sgd_args *a, void *stream);
/* out[0] = sqrt(sum over tensors of sum(x^2)); scratch: (n_tensors + 1) * MGPU_CUDA_REDUCE_PARTIALS floats */
mgpu_result mgpu_cuda_global_norm(int n_tensors, const float *const *xs, const int64_t *numel, float *out, float *scratch,
                                  void *stream);
/* coef[0] = min(1, max_norm / (norm[0] + 1e-6)), on the device (no host sync), as clip_grad_norm_ */
mgpu_result mgpu_cuda_clip_coef(const float *norm, float max_norm, float *coef, void *stream);
/* x *= s[0] (s a device scalar, e.g. the clip coefficient or 1 / loss scale) */
mgpu_result mgpu_cuda_scale_by(float *x, int64_t n, const float *s, void *stream);
/* found[0] = 1 if any x is inf or NaN (never cleared here: zero it once per step) */
mgpu_result mgpu_cuda_check_finite(const float *x, int64_t n, int32_t *found, void *stream);

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
mgpu_result mgpu_cuda_fill(float *x, int64_t n, float value, void *stream);


#ifdef __cplusplus
}
#endif
#endif /* MGPU__INTERNAL_H */
