
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
