/* CPU-vs-CUDA comparison of every launcher in mgpu_kernels.cu, forward and backward.
   Each case builds random CPU tensors, runs the public CPU op (mgpu_op_*) and mgpu_backward_with_grad
   for the reference, runs the launchers on copies in device memory whose outputs were first filled
   with NaN, and requires ||gpu - cpu|| / ||cpu|| <= 1e-5 (f32, TF32 off) or 1e-2 (bf16). A NaN in
   the GPU result where the CPU has none never passes. Exits 0 with SKIPPED when no GPU is visible.
   Build: see tests/run_gpu.sh (cc -DMGPU_CUDA ... mgpu_kernels.o -lcudart -lcublas -lcublasLt). */
#define MGPU_IMPLEMENTATION
#include "mgpu.h"
#include "mgpu_test.h"
#include <cuda_runtime_api.h>

#define F32_TOL 1e-5
#define BF16_TOL 1e-2

static mgpu_context *cpu;
static void *blas;
static int quick;

/* ---- device memory owned by the current case (freed by case_end) ---- */
static void *dev_ptrs[1024];
static int n_dev;
static mgpu_tensor *cpu_tensors[1024];
static int n_cpu;

static void *dev_alloc(size_t bytes) {
    void *p = mgpu_cuda_malloc(0, bytes);
    if (!p) { fprintf(stderr, "device allocation of %zu bytes failed: %s\n", bytes, mgpu_last_error()); exit(2); }
    if (n_dev < 1024) dev_ptrs[n_dev++] = p;
    return p;
}
static float *dev_copy(const void *host, size_t bytes) {
    void *d = dev_alloc(bytes);
    cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice);
    return (float *)d;
}
static float *dev_of(const mgpu_tensor *t) { return dev_copy(t->data, mgpu_tensor_nbytes(t)); }
static float *dev_nan(int64_t n) {   /* 0xFF bytes are a NaN float: an unwritten output cannot pass */
    float *d = (float *)dev_alloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    cudaMemset(d, 0xFF, sizeof(float) * (size_t)(n > 0 ? n : 1));
    return d;
}
static float *dev_zeros(int64_t n) {
    float *d = (float *)dev_alloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    cudaMemset(d, 0, sizeof(float) * (size_t)(n > 0 ? n : 1));
    return d;
}
static mgpu_tensor *track(mgpu_tensor *t) { if (t && n_cpu < 1024) cpu_tensors[n_cpu++] = t; return t; }
static mgpu_tensor *rnd(int ndim, const int64_t *shape, double lo, double hi) { return track(mt_rand(cpu, ndim, shape, lo, hi, 1)); }
static void case_end(void) {
    int i;
    cudaDeviceSynchronize();
    for (i = 0; i < n_dev; i++) mgpu_cuda_free(0, dev_ptrs[i]);
    for (i = 0; i < n_cpu; i++) mgpu_tensor_free(cpu_tensors[i]);
    n_dev = n_cpu = 0;
    mgpu_context_end_step(cpu);
}

/* Relative L2 error; +inf when the GPU has a NaN/inf the CPU does not. */
static double rel_err(const float *got, const float *ref, int64_t n) {
    double num = 0, den = 0;
    int64_t i;
    for (i = 0; i < n; i++) {
        if (isfinite(ref[i]) && !isfinite(got[i])) return INFINITY;
        if (!isfinite(ref[i])) { if (!(isnan(ref[i]) ? isnan(got[i]) : got[i] == ref[i])) return INFINITY; continue; }
        num += ((double)got[i] - ref[i]) * ((double)got[i] - ref[i]);
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}
/* Waits for the stream, copies n floats back and compares them with ref. */
static void expect_close(const char *what, const float *dev, const float *ref, int64_t n, double tol) {
    float *h = (float *)malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    cudaError_t e = cudaDeviceSynchronize();
    double err;
    MT_CHECK(e == cudaSuccess, "%s: kernel failed: %s", what, cudaGetErrorString(e));
    cudaMemcpy(h, dev, sizeof(float) * (size_t)n, cudaMemcpyDeviceToHost);
    err = rel_err(h, ref, n);
    MT_CHECK(err <= tol, "%s: relative error %.3g > %.1g", what, err, tol);
    free(h);
}
/* Waits for the stream and requires the device bytes to equal host's. */
static void expect_same_bytes(const char *what, const void *dev, const void *host, size_t bytes) {
    unsigned char *h = (unsigned char *)malloc(bytes ? bytes : 1);
    cudaError_t e = cudaDeviceSynchronize();
    MT_CHECK(e == cudaSuccess, "%s: kernel failed: %s", what, cudaGetErrorString(e));
    cudaMemcpy(h, dev, bytes, cudaMemcpyDeviceToHost);
    MT_CHECK(memcmp(h, host, bytes) == 0, "%s: bytes differ from the CPU twin's", what);
    free(h);
}
static void expect_ok(mgpu_result r, const char *what) { MT_CHECK(r == MGPU_OK, "%s returned %d: %s", what, (int)r, mgpu_last_error()); }
static const float *grad_of(const mgpu_tensor *t) { return t->grad ? (const float *)t->grad->data : NULL; }

/* Runs the CPU backward of out with a random upstream gradient and returns that gradient on the device. */
static float *cpu_backward(mgpu_tensor *out) {
    mgpu_tensor *dy = track(mt_rand(cpu, out->ndim, out->shape, -1, 1, 0));
    expect_ok(mgpu_backward_with_grad(cpu, out, dy), "mgpu_backward_with_grad");
    return dev_of(dy);
}
/* Gives a parameter its grad tensor through the public API (backward of sum(p)); the caller fills it. */
static void give_grad(mgpu_tensor *p) {
    expect_ok(mgpu_backward(cpu, mgpu_op_sum(cpu, p)), "backward of sum(p)");
    mgpu_context_end_step(cpu);
    MT_CHECK(p->grad != NULL, "parameter has no grad after backward");
}
static int64_t prod(int ndim, const int64_t *s) { int64_t p = 1; int i; for (i = 0; i < ndim; i++) p *= s[i]; return p; }

/* ============================== elementwise ============================== */

typedef mgpu_tensor *(*unary_op)(mgpu_context *, mgpu_tensor *);
/* The unary twin's argument struct, filled as the op's front fills it. */
static mgpu__unary_args unary_args(int kind, float param, const float *x, const float *y, const float *dy, float *out, int64_t n) {
    mgpu__unary_args a;
    memset(&a, 0, sizeof a);
    a.kind = (mgpu__unary_kind)kind; a.param = param; a.x = x; a.y = y; a.dy = dy; a.out = out; a.n = n;
    return a;
}
static mgpu_result unary_forward(int kind, float param, const float *x, float *y, int64_t n, void *stream) {
    mgpu__unary_args a = unary_args(kind, param, x, NULL, NULL, y, n);
    return mgpu_cuda_unary_forward(&a, stream);
}
static mgpu_result unary_backward(int kind, float param, const float *x, const float *y, const float *dy, float *dx, int64_t n) {
    mgpu__unary_args a = unary_args(kind, param, x, y, dy, dx, n);
    return mgpu_cuda_unary_backward(&a, NULL);
}
static mgpu_tensor *op_elu(mgpu_context *c, mgpu_tensor *x) { return mgpu_op_elu(c, x, 0.7f); }
static mgpu_tensor *op_scale(mgpu_context *c, mgpu_tensor *x) { return mgpu_op_scale(c, x, -1.5f); }
static mgpu_tensor *op_adds(mgpu_context *c, mgpu_tensor *x) { return mgpu_op_add_scalar(c, x, 0.25f); }

static void test_unary(void) {
    static const unary_op ops[8] = { mgpu_op_relu, mgpu_op_gelu, mgpu_op_gelu_tanh, op_elu, mgpu_op_tanh, mgpu_op_sigmoid, op_scale, op_adds };
    static const float params[8] = { 0, 0, 0, 0.7f, 0, 0, -1.5f, 0.25f };
    int64_t sizes[4] = { 1, 7, 1000, 65537 };
    int k, s;
    for (k = 0; k < 8; k++)
        for (s = 0; s < (quick ? 3 : 4); s++) {
            char what[64];
            mgpu_tensor *x = rnd(1, &sizes[s], -4, 4), *y = ops[k](cpu, x);
            float *dx = dev_of(x), *dy_out = dev_nan(x->numel), *dgrad = dev_zeros(x->numel), *dy;
            snprintf(what, sizeof what, "unary kind %d n=%lld forward", k, (long long)sizes[s]);
            expect_ok(unary_forward(k, params[k], dx, dy_out, x->numel, NULL), what);
            expect_close(what, dy_out, (const float *)y->data, x->numel, F32_TOL);
            dy = cpu_backward(y);
            snprintf(what, sizeof what, "unary kind %d n=%lld backward", k, (long long)sizes[s]);
            expect_ok(unary_backward(k, params[k], dx, dy_out, dy, dgrad, x->numel), what);
            expect_close(what, dgrad, grad_of(x), x->numel, F32_TOL);
            case_end();
        }
}

static void test_unary_accumulates(void) {
    int64_t n = 1001, i;
    mgpu_tensor *x = rnd(1, &n, -2, 2), *y = mgpu_op_tanh(cpu, x);
    float *dx = dev_of(x), *dyo = dev_of(y), *dy = cpu_backward(y), *g = (float *)malloc(sizeof(float) * (size_t)n);
    float *dg;
    for (i = 0; i < n; i++) g[i] = 3.0f;
    dg = dev_copy(g, sizeof(float) * (size_t)n);
    for (i = 0; i < n; i++) g[i] = 3.0f + grad_of(x)[i];
    expect_ok(unary_backward(MGPU__UN_TANH, 0, dx, dyo, dy, dg, n), "tanh backward");
    expect_close("backward adds to an existing gradient", dg, g, n, F32_TOL);
    free(g);
    case_end();
}

typedef mgpu_tensor *(*binary_op)(mgpu_context *, mgpu_tensor *, mgpu_tensor *);
/* The binary twin's argument struct with the broadcast geometry of a and b, as the op's front fills it. */
static mgpu__binary_args binary_args(int kind, const mgpu_tensor *a, const mgpu_tensor *b) {
    mgpu__binary_args args;
    memset(&args, 0, sizeof args);
    args.kind = (mgpu__binary_kind)kind;
    expect_ok(mgpu__bcast_make("test", a, b, &args.g) ? MGPU_OK : mgpu_last_result(), "broadcast geometry");
    return args;
}
static mgpu_result binary_forward(mgpu__binary_args args, const float *a, const float *b, float *out) {
    args.a = a; args.b = b; args.out = out;
    return mgpu_cuda_binary_forward(&args, NULL);
}
static mgpu_result binary_backward(mgpu__binary_args args, const float *a, const float *b, const float *dy, float *da, float *db) {
    args.a = a; args.b = b; args.dy = dy; args.da = da; args.db = db;
    return mgpu_cuda_binary_backward(&args, NULL);
}
static void test_binary(void) {
    static const binary_op ops[3] = { mgpu_op_add, mgpu_op_sub, mgpu_op_mul };
    /* the last case reduces 2048 positions per element of b: the block-per-element path */
    static const int64_t sa[5][3] = { {7, 13, 0}, {5, 1, 3}, {2, 3, 4}, {1, 300, 0}, {2048, 3, 0} };
    static const int64_t sb[5][3] = { {7, 13, 0}, {4, 3, 0}, {1, 0, 0}, {257, 1, 0}, {3, 0, 0} };
    static const int na[5] = { 2, 3, 3, 2, 2 }, nb[5] = { 2, 2, 1, 2, 1 };
    int op, c;
    for (op = 0; op < 3; op++)
        for (c = 0; c < 5; c++) {
            mgpu_tensor *a = rnd(na[c], sa[c], -2, 2), *b = rnd(nb[c], sb[c], -2, 2), *y = ops[op](cpu, a, b);
            float *da = dev_of(a), *db = dev_of(b), *out = dev_nan(y->numel), *ga = dev_zeros(a->numel), *gb = dev_zeros(b->numel), *dy;
            mgpu__binary_args args = binary_args(op, a, b);
            MT_CHECK(args.g.numel == y->numel, "broadcast numel %lld vs %lld", (long long)args.g.numel, (long long)y->numel);
            expect_ok(binary_forward(args, da, db, out), "binary forward");
            expect_close("binary forward", out, (const float *)y->data, y->numel, F32_TOL);
            dy = cpu_backward(y);
            expect_ok(binary_backward(args, da, db, dy, ga, gb), "binary backward");
            expect_close("binary backward da", ga, grad_of(a), a->numel, F32_TOL);
            expect_close("binary backward db", gb, grad_of(b), b->numel, F32_TOL);
            case_end();
        }
    {   /* a bad kind is an error, not a crash */
        int64_t n = 4;
        mgpu_tensor *a = rnd(1, &n, -1, 1);
        float *d = dev_of(a);
        MT_CHECK(binary_forward(binary_args(7, a, a), d, d, d) == MGPU_ERR_INVALID_ARG, "kind 7 must be rejected");
        case_end();
    }
}

static void test_bias(void) {
    static const int64_t shapes[3][3] = { {9, 5, 0}, {2, 3, 17}, {1000, 33, 0} };
    static const int nd[3] = { 2, 3, 2 };
    int c;
    for (c = 0; c < 3; c++) {
        int64_t C = shapes[c][nd[c] - 1], rows = prod(nd[c], shapes[c]) / C;
        mgpu_tensor *x = rnd(nd[c], shapes[c], -1, 1), *b = rnd(1, &C, -1, 1), *y = mgpu_op_bias_add(cpu, x, b);
        float *dx = dev_of(x), *dbias = dev_of(b), *out = dev_nan(y->numel), *gx = dev_zeros(x->numel), *gb = dev_zeros(C), *gc = dev_zeros(C), *dy;
        mgpu__binary_args args = binary_args(MGPU__BIN_ADD, x, b);   /* bias_add is a broadcast add */
        expect_ok(binary_forward(args, dx, dbias, out), "bias_add");
        expect_close("bias_add forward", out, (const float *)y->data, y->numel, F32_TOL);
        dy = cpu_backward(y);
        expect_ok(binary_backward(args, dx, dbias, dy, gx, gb), "bias_add backward");
        expect_close("bias_add dx", gx, grad_of(x), x->numel, F32_TOL);
        expect_close("bias_add db", gb, grad_of(b), C, F32_TOL);
        {
            mgpu__linear_bias_grad_args lb;
            memset(&lb, 0, sizeof lb);
            lb.dy = dy; lb.db = gc; lb.rows = rows; lb.cols = C;
            expect_ok(mgpu_cuda_linear_bias_grad(&lb, NULL), "linear_bias_grad");
        }
        expect_close("bias grad (column sums)", gc, grad_of(b), C, F32_TOL);
        case_end();
    }
}

/* ============================== softmax and losses ============================== */

static mgpu__softmax_args softmax_args(int log, int64_t outer, int64_t dim, int64_t inner) {
    mgpu__softmax_args a;
    memset(&a, 0, sizeof a);
    a.log = log; a.outer = outer; a.dim = dim; a.inner = inner;
    return a;
}
static void test_softmax(void) {
    static const int64_t shapes[4][3] = { {7, 10, 0}, {3, 2000, 0}, {4, 5, 6}, {33, 1, 0} };
    static const int nd[4] = { 2, 2, 3, 2 };
    int c, lg;
    for (lg = 0; lg < 2; lg++)
        for (c = 0; c < 4; c++) {
            int dim = 1;
            mgpu_tensor *x = rnd(nd[c], shapes[c], -5, 5);
            mgpu_tensor *y = lg ? mgpu_op_log_softmax(cpu, x, dim) : mgpu_op_softmax(cpu, x, dim);
            int64_t outer = shapes[c][0], D = shapes[c][1], inner = x->numel / (outer * D);
            float *dx = dev_of(x), *out = dev_nan(x->numel), *g = dev_zeros(x->numel), *dy;
            mgpu__softmax_args a = softmax_args(lg, outer, D, inner);
            a.x = dx; a.out = out;
            expect_ok(mgpu_cuda_softmax_forward(&a, NULL), "softmax forward");
            expect_close(lg ? "log_softmax forward" : "softmax forward", out, (const float *)y->data, x->numel, F32_TOL);
            dy = cpu_backward(y);
            a.y = out; a.dy = dy; a.out = g;
            expect_ok(mgpu_cuda_softmax_backward(&a, NULL), "softmax backward");
            expect_close(lg ? "log_softmax backward" : "softmax backward", g, grad_of(x), x->numel, F32_TOL);
            case_end();
        }
}

/* Targets in [0, c) with every 5th row ignored (-100). */
static mgpu_tensor *targets(int64_t n, int64_t c, int i64) {
    mgpu_tensor *t = track(mgpu_tensor_create(cpu, i64 ? MGPU_I64 : MGPU_I32, 1, &n));
    int64_t i;
    for (i = 0; i < n; i++) {
        int64_t v = (i % 5 == 4) ? -100 : (int64_t)mt_uniform(0, (double)c);
        if (i64) ((int64_t *)t->data)[i] = v; else ((int32_t *)t->data)[i] = (int32_t)v;
    }
    return t;
}

static void test_cross_entropy_and_nll(void) {
    static const int64_t cases[3][2] = { {37, 10}, {5, 3000}, {1, 2} };
    int c, nll;
    for (nll = 0; nll < 2; nll++)
        for (c = 0; c < 3; c++) {
            int64_t shape[2] = { cases[c][0], cases[c][1] }, n = shape[0], C = shape[1], one = 1;
            int i64 = c != 1;
            mgpu_tensor *x = rnd(2, shape, -3, 3), *t = targets(n, C, i64);
            mgpu_tensor *loss = nll ? mgpu_op_nll_loss(cpu, x, t) : mgpu_op_cross_entropy(cpu, x, t);
            float *dx = dev_of(x), *dt = dev_of(t), *lse = dev_nan(n), *dl = dev_nan(1), *valid = dev_nan(1), *g = dev_zeros(x->numel), *dy;
            mgpu__class_loss_args a;
            (void)one;
            memset(&a, 0, sizeof a);   /* filled as the op's front fills it; nll has no lse */
            a.x = dx; a.target = dt; a.target_i64 = i64; a.n = n; a.c = C; a.lse = nll ? NULL : lse; a.loss = dl; a.valid = valid;
            if (nll) expect_ok(mgpu_cuda_nll_forward(&a, NULL), "nll forward");
            else expect_ok(mgpu_cuda_cross_entropy_forward(&a, NULL), "cross_entropy forward");
            expect_close(nll ? "nll loss" : "cross-entropy loss", dl, (const float *)loss->data, 1, F32_TOL);
            dy = cpu_backward(loss);
            a.dloss = dy; a.dx = g;
            if (nll) expect_ok(mgpu_cuda_nll_backward(&a, NULL), "nll backward");
            else expect_ok(mgpu_cuda_cross_entropy_backward(&a, NULL), "cross_entropy backward");
            expect_close(nll ? "nll backward" : "cross-entropy backward", g, grad_of(x), x->numel, F32_TOL);
            case_end();
        }
}

static void test_mse(void) {
    int64_t shape[2] = { 13, 77 };
    mgpu_tensor *a = rnd(2, shape, -1, 1), *b = rnd(2, shape, -1, 1), *l = mgpu_op_mse_loss(cpu, a, b);
    float *da = dev_of(a), *db = dev_of(b), *dl = dev_nan(1), *ga = dev_zeros(a->numel), *gb = dev_zeros(b->numel), *dy;
    mgpu__mse_args m;
    memset(&m, 0, sizeof m);
    m.a = da; m.b = db; m.n = a->numel; m.loss = dl;
    expect_ok(mgpu_cuda_mse_forward(&m, NULL), "mse forward");
    expect_close("mse loss", dl, (const float *)l->data, 1, F32_TOL);
    dy = cpu_backward(l);
    m.dloss = dy; m.da = ga; m.db = gb;
    expect_ok(mgpu_cuda_mse_backward(&m, NULL), "mse backward");
    expect_close("mse backward a", ga, grad_of(a), a->numel, F32_TOL);
    expect_close("mse backward b", gb, grad_of(b), b->numel, F32_TOL);
    case_end();
}

/* A device scalar holding v: the poison of outputs whose right value is NaN. */
static float *dev_value(float v) { return dev_copy(&v, sizeof v); }

/* Empty losses behave as the CPU twins: no rows (n = 0), no classes (c = 0, every row ignored),
   both, and rows that are all ignored: loss 0/0 = NaN as PyTorch, valid 0, no gradient; MSE of
   zero elements: NaN. The outputs start as 12345, so an unwritten NaN-valued loss cannot pass. */
static void test_empty_losses(void) {
    static const int64_t cases[4][2] = { {0, 5}, {4, 0}, {0, 0}, {3, 4} };
    int c, nll;
    for (nll = 0; nll < 2; nll++)
        for (c = 0; c < 4; c++) {
            int64_t n = cases[c][0], C = cases[c][1], i;
            float *hx = (float *)calloc((size_t)(n * C + 1), sizeof(float)), hlse[8], hloss = 0, hvalid = 0, one = 1.0f;
            int64_t ht[8];
            float *dx, *g, *dloss, *dvalid;
            mgpu__class_loss_args a;
            char what[96];
            for (i = 0; i < n; i++) ht[i] = -100;   /* c = 0 has no class to name; the {3, 4} case ignores every row too */
            for (i = 0; i < n * C; i++) hx[i] = (float)mt_uniform(-1, 1);
            memset(&a, 0, sizeof a);
            a.ctx = cpu; a.x = hx; a.target = ht; a.target_i64 = 1; a.n = n; a.c = C; a.lse = nll ? NULL : hlse;
            a.loss = &hloss; a.valid = &hvalid;
            if (nll) mgpu__cpu_nll_forward(&a); else mgpu__cpu_cross_entropy_forward(&a);
            dx = dev_copy(hx, sizeof(float) * (size_t)(n * C + 1)); g = dev_zeros(n * C);
            a.ctx = NULL; a.x = n * C > 0 ? dx : NULL; a.target = dev_copy(ht, sizeof ht); a.lse = nll ? NULL : dev_nan(n);
            a.loss = dloss = dev_value(12345.0f); a.valid = dvalid = dev_value(12345.0f);
            snprintf(what, sizeof what, "%s of (%lld, %lld) with every row ignored", nll ? "nll" : "cross_entropy", (long long)n, (long long)C);
            expect_ok(nll ? mgpu_cuda_nll_forward(&a, NULL) : mgpu_cuda_cross_entropy_forward(&a, NULL), what);
            expect_close(what, dloss, &hloss, 1, 0.0);
            expect_close(what, dvalid, &hvalid, 1, 0.0);
            a.dloss = dev_value(one); a.dx = g;
            expect_ok(nll ? mgpu_cuda_nll_backward(&a, NULL) : mgpu_cuda_cross_entropy_backward(&a, NULL), what);
            if (n * C > 0) {
                float *zero = (float *)calloc((size_t)(n * C), sizeof(float));
                expect_close(what, g, zero, n * C, 0.0);
                free(zero);
            }
            free(hx);
            case_end();
        }
    {
        float hloss = 0;
        float *dl = dev_value(12345.0f);
        mgpu__mse_args m;
        memset(&m, 0, sizeof m);
        m.ctx = cpu; m.n = 0; m.loss = &hloss;
        mgpu__cpu_mse_forward(&m);
        m.ctx = NULL; m.loss = dl;
        expect_ok(mgpu_cuda_mse_forward(&m, NULL), "mse of zero elements");
        expect_close("mse of zero elements (NaN, as the CPU)", dl, &hloss, 1, 0.0);
        m.dloss = dev_value(1.0f); m.da = dev_zeros(0); m.db = dev_zeros(0);
        expect_ok(mgpu_cuda_mse_backward(&m, NULL), "mse backward of zero elements");
        case_end();
    }
}

/* ============================== dropout and RNG ============================== */

static void test_rng_bits(void) {
    int64_t n = quick ? 4096 : 1 << 20, i, bad = 0;
    uint32_t *d = (uint32_t *)dev_alloc(sizeof(uint32_t) * (size_t)n), *h = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)n);
    uint64_t seed = 0xdeadbeefULL, first = (1ULL << 40) + 17;   /* counters beyond 32 bits too */
    expect_ok(mgpu_cuda_random_u32(seed, first, d, n, NULL), "random_u32");
    cudaMemcpy(h, d, sizeof(uint32_t) * (size_t)n, cudaMemcpyDeviceToHost);
    for (i = 0; i < n; i++) bad += h[i] != mgpu_random_u32(seed, first + (uint64_t)i);
    MT_CHECK(bad == 0, "%lld of %lld random words differ from the CPU's", (long long)bad, (long long)n);
    free(h);
    case_end();
}

/* The dropout twin's argument struct for one process (world 1), as the op's front fills it. */
static mgpu_result dropout(uint64_t seed, uint64_t first, float p, const float *src, float *dst, int64_t n, int accumulate) {
    mgpu__dropout_args d;
    memset(&d, 0, sizeof d);
    d.seed = seed; d.first = first; d.p = p; d.scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    d.row_size = 1; d.world = 1; d.src = src; d.dst = dst; d.n = n; d.accumulate = accumulate;
    return mgpu_cuda_dropout(&d, NULL);
}
static void test_dropout_matches_cpu(void) {
    int64_t shape[2] = { 37, 129 };
    float p = 0.3f;
    uint64_t seed = 0, off = 0;
    mgpu_tensor *x = rnd(2, shape, -1, 1), *y;
    float *dx, *out, *g, *dy;
    mgpu_context_rng_state(cpu, &seed, &off);
    y = mgpu_op_dropout(cpu, x, p, 1);
    dx = dev_of(x); out = dev_nan(x->numel); g = dev_zeros(x->numel);
    expect_ok(dropout(seed, off, p, dx, out, x->numel, 0), "dropout forward");
    /* the mask must be identical: compare exactly (the kept values are the same product) */
    expect_close("dropout forward (same mask as the CPU)", out, (const float *)y->data, x->numel, 0.0);
    dy = cpu_backward(y);
    expect_ok(dropout(seed, off, p, dy, g, x->numel, 1), "dropout backward");
    expect_close("dropout backward", g, grad_of(x), x->numel, 0.0);
    case_end();
}

/* DDP row sharding: the CUDA twin draws the CPU twin's row-interleaved counters, bit for bit, for
   every (row_size, rank, world), odd row sizes, a partial last row and accumulation included. */
static void test_dropout_sharded(void) {
    static const int64_t cfg[7][4] = {   /* row_size, rank, world, rows */
        {129, 0, 1, 11}, {1, 0, 1, 300}, {7, 1, 3, 13}, {129, 2, 4, 9}, {5, 0, 2, 31}, {13, 3, 4, 17}, {33, 1, 2, 8} };
    int c, acc;
    for (c = 0; c < 7; c++)
        for (acc = 0; acc < 2; acc++) {
            int64_t n = cfg[c][0] * cfg[c][3] - (c == 6 ? 5 : 0);   /* the last case ends inside a row */
            mgpu_tensor *x = rnd(1, &n, -1, 1), *ref = track(mt_rand(cpu, 1, &n, -1, 1, 0));
            float *dst = acc ? dev_of(ref) : dev_nan(n);
            mgpu__dropout_args d;
            char what[96];
            memset(&d, 0, sizeof d);
            d.ctx = cpu; d.seed = 0x5eed + (uint64_t)c; d.first = (1ULL << 33) + 3; d.p = 0.4f; d.scale = 1.0f / 0.6f;
            d.row_size = cfg[c][0]; d.rank = cfg[c][1]; d.world = cfg[c][2];
            d.src = (const float *)x->data; d.dst = (float *)ref->data; d.n = n; d.accumulate = acc;
            mgpu__cpu_dropout(&d);   /* the specification */
            d.ctx = NULL; d.src = dev_of(x); d.dst = dst;
            snprintf(what, sizeof what, "dropout row_size %lld rank %lld world %lld%s", (long long)d.row_size, (long long)d.rank,
                     (long long)d.world, acc ? " accumulate" : "");
            expect_ok(mgpu_cuda_dropout(&d, NULL), what);
            expect_close(what, dst, (const float *)ref->data, n, 0.0);
            case_end();
        }
}

/* ============================== normalisation ============================== */

/* The layer norm twins' argument struct, filled as the op's front fills it. */
static mgpu__layer_norm_args ln_args(const float *x, const float *w, const float *b, float *mean, float *rstd, int64_t R, int64_t C) {
    mgpu__layer_norm_args a;
    memset(&a, 0, sizeof a);
    a.x = x; a.w = w; a.b = b; a.mean = mean; a.rstd = rstd; a.R = R; a.C = C; a.eps = 1e-5f;
    return a;
}

static void test_layer_norm(void) {
    static const int64_t cases[3][2] = { {6, 33}, {3, 1500}, {65, 8} };
    int c, affine;
    for (affine = 0; affine < 2; affine++)
        for (c = 0; c < 3; c++) {
            int64_t shape[2] = { cases[c][0], cases[c][1] }, R = shape[0], C = shape[1];
            mgpu_tensor *x = rnd(2, shape, -2, 3), *w = affine ? rnd(1, &C, 0.5, 1.5) : NULL, *b = affine ? rnd(1, &C, -1, 1) : NULL;
            mgpu_tensor *y = mgpu_op_layer_norm(cpu, x, w, b, 1e-5f);
            float *dx = dev_of(x), *dw = w ? dev_of(w) : NULL, *db = b ? dev_of(b) : NULL, *out = dev_nan(x->numel);
            float *mean = dev_nan(R), *rstd = dev_nan(R), *gx = dev_zeros(x->numel), *gw = dev_zeros(C), *gb = dev_zeros(C);
            mgpu__layer_norm_args a = ln_args(dx, dw, db, mean, rstd, R, C);
            a.y = out;
            expect_ok(mgpu_cuda_layer_norm_forward(&a, NULL), "layer_norm forward");
            expect_close("layer_norm forward", out, (const float *)y->data, x->numel, F32_TOL);
            a.dy = cpu_backward(y); a.dx = gx; a.dw = w ? gw : NULL; a.db = b ? gb : NULL;
            expect_ok(mgpu_cuda_layer_norm_backward(&a, NULL), "layer_norm backward");
            expect_close("layer_norm dx", gx, grad_of(x), x->numel, F32_TOL);
            if (w) expect_close("layer_norm dw", gw, grad_of(w), C, F32_TOL);
            if (b) expect_close("layer_norm db", gb, grad_of(b), C, F32_TOL);
            case_end();
        }
}

/* Batch norm through its twins in the order the op's front calls them (no cross-rank reduce here). */
static void bn_forward(mgpu__batch_norm_args *a) {
    if (a->training) {
        a->sums = (double *)dev_alloc(sizeof(double) * (size_t)(2 * a->C + 1));
        expect_ok(mgpu_cuda_batch_norm_stats(a, NULL), "bn stats");
        a->count = a->sums + 2 * a->C;
    }
    expect_ok(mgpu_cuda_batch_norm_forward(a, NULL), "bn forward");
}
static void bn_backward(mgpu__batch_norm_args *a) {
    a->sums = (double *)dev_alloc(sizeof(double) * (size_t)(2 * a->C));   /* the forward's sums keep the count */
    a->coef = dev_nan(2 * a->C);
    expect_ok(mgpu_cuda_batch_norm_grad_sums(a, NULL), "bn grad sums");
    expect_ok(mgpu_cuda_batch_norm_backward(a, NULL), "bn backward");
}

static void test_batch_norm(void) {
    static const int64_t shapes[2][4] = { {8, 5, 3, 4}, {16, 7, 0, 0} };
    static const int nd[2] = { 4, 2 };
    int c, training;
    for (training = 1; training >= 0; training--)
        for (c = 0; c < 2; c++) {
            int64_t C = shapes[c][1], N = shapes[c][0], S = prod(nd[c], shapes[c]) / (N * C);
            mgpu_tensor *x = rnd(nd[c], shapes[c], -2, 3), *w = rnd(1, &C, 0.5, 1.5), *b = rnd(1, &C, -1, 1);
            mgpu_tensor *rm = track(mt_rand(cpu, 1, &C, -0.5, 0.5, 0)), *rv = track(mt_rand(cpu, 1, &C, 0.5, 2, 0));
            float *drm = dev_of(rm), *drv = dev_of(rv), *out = dev_nan(x->numel), *gx = dev_zeros(x->numel), *gw = dev_zeros(C), *gb = dev_zeros(C);
            mgpu_tensor *y = mgpu_op_batch_norm(cpu, x, w, b, rm, rv, training, 0.1f, 1e-5f);
            mgpu__batch_norm_args a;
            memset(&a, 0, sizeof a);
            a.N = N; a.C = C; a.S = S; a.training = training; a.momentum = 0.1f; a.eps = 1e-5f;
            a.x = dev_of(x); a.w = dev_of(w); a.b = dev_of(b); a.running_mean = drm; a.running_var = drv;
            a.y = out; a.mean = dev_nan(C); a.rstd = dev_nan(C); a.scale = dev_nan(C);
            bn_forward(&a);
            expect_close(training ? "batch_norm forward (train)" : "batch_norm forward (eval)", out, (const float *)y->data, x->numel, F32_TOL);
            expect_close("batch_norm running_mean", drm, (const float *)rm->data, C, F32_TOL);
            expect_close("batch_norm running_var", drv, (const float *)rv->data, C, F32_TOL);
            a.dy = cpu_backward(y); a.dx = gx; a.dw = gw; a.db = gb;
            bn_backward(&a);
            expect_close("batch_norm dx", gx, grad_of(x), x->numel, F32_TOL);
            expect_close("batch_norm dw", gw, grad_of(w), C, F32_TOL);
            expect_close("batch_norm db", gb, grad_of(b), C, F32_TOL);
            case_end();
        }
}

/* The embedding twins' argument struct, filled as the op's front fills it. */
static mgpu__embedding_args emb_args(const void *idx, int i64, int64_t n, int64_t V, int64_t D) {
    mgpu__embedding_args a;
    memset(&a, 0, sizeof a);
    a.idx = idx; a.idx_i64 = i64; a.n = n; a.V = V; a.D = D;
    a.scratch = dev_nan((int64_t)(MGPU__EMB_SCRATCH_BYTES(n) / sizeof(float)));   /* the backward's sort keys */
    return a;
}

/* Ids outside [0, V) (the op refuses them, but ids made on the device reach the twins unchecked)
   give zero rows and no gradient, on both twins; many repeats of one id sum in index order on both,
   so the CUDA grad equals the CPU twin's bit for bit. n is not a power of two (the sort pads). */
static void test_embedding_bad_ids_and_repeats(void) {
    int i64;
    for (i64 = 0; i64 < 2; i64++) {
        int64_t n = 1000, V = 37, D = 19, wshape[2] = { 37, 19 }, dshape[2] = { 1000, 19 }, i;
        mgpu_tensor *w = rnd(2, wshape, -1, 1), *dyt = rnd(2, dshape, -1, 1), *g0 = rnd(2, wshape, -1, 1);
        int64_t *h64 = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
        int32_t *h32 = (int32_t *)malloc(sizeof(int32_t) * (size_t)n);
        float *hout = (float *)malloc(sizeof(float) * (size_t)(n * D)), *hg = (float *)malloc(sizeof(float) * (size_t)(V * D)), *out, *g;
        mgpu__embedding_args a;
        for (i = 0; i < n; i++) {
            int64_t v = i % 3 == 0 ? 5 : (i * 7) % V;                               /* id 5 about 360 times */
            if (i % 97 == 1) v = -1; else if (i % 89 == 2) v = V; else if (i % 83 == 3) v = i64 ? (1LL << 40) : 2147483647;
            h64[i] = v; h32[i] = (int32_t)v;
        }
        memset(&a, 0, sizeof a);   /* the CPU twins: the specification */
        a.ctx = cpu; a.idx = i64 ? (const void *)h64 : (const void *)h32; a.idx_i64 = i64; a.n = n; a.V = V; a.D = D;
        a.weight = (const float *)w->data; a.out = hout; a.dy = (const float *)dyt->data;
        memcpy(hg, g0->data, sizeof(float) * (size_t)(V * D)); a.dweight = hg;
        mgpu__cpu_embedding_forward(&a);
        mgpu__cpu_embedding_backward(&a);
        a = emb_args(i64 ? dev_copy(h64, sizeof(int64_t) * (size_t)n) : dev_copy(h32, sizeof(int32_t) * (size_t)n), i64, n, V, D);
        a.weight = dev_of(w); a.out = out = dev_nan(n * D); a.dy = dev_of(dyt); a.dweight = g = dev_of(g0);
        expect_ok(mgpu_cuda_embedding_forward(&a, NULL), "embedding forward with bad ids");
        expect_close("embedding forward with bad ids (zero rows)", out, hout, n * D, 0.0);
        expect_ok(mgpu_cuda_embedding_backward(&a, NULL), "embedding backward with bad ids");
        expect_close("embedding backward with bad ids and repeats (bit for bit)", g, hg, V * D, 0.0);
        for (i = 0; i < D; i++) MT_CHECK(hout[1 * D + i] == 0.0f, "the CPU twin's row for id -1 is zeros");
        free(h64); free(h32); free(hout); free(hg);
        case_end();
    }
}

static void test_embedding(void) {
    int i64;
    for (i64 = 0; i64 < 2; i64++) {
        int64_t wshape[2] = { 50, 17 }, n = 40, V = 50, D = 17, i;
        mgpu_tensor *w = rnd(2, wshape, -1, 1), *idx = track(mgpu_tensor_create(cpu, i64 ? MGPU_I64 : MGPU_I32, 1, &n)), *y;
        float *dw, *didx, *out, *g;
        mgpu__embedding_args a;
        for (i = 0; i < n; i++) {   /* repeated rows exercise the deterministic scatter */
            int64_t v = (i * 7) % 13;
            if (i64) ((int64_t *)idx->data)[i] = v; else ((int32_t *)idx->data)[i] = (int32_t)v;
        }
        y = mgpu_op_embedding(cpu, w, idx);
        dw = dev_of(w); didx = dev_of(idx); out = dev_nan(y->numel); g = dev_zeros(w->numel);
        a = emb_args(didx, i64, n, V, D);
        a.weight = dw; a.out = out;
        expect_ok(mgpu_cuda_embedding_forward(&a, NULL), "embedding forward");
        expect_close("embedding forward", out, (const float *)y->data, y->numel, 0.0);
        a.dy = cpu_backward(y); a.dweight = g;
        expect_ok(mgpu_cuda_embedding_backward(&a, NULL), "embedding backward");
        expect_close("embedding backward", g, grad_of(w), w->numel, F32_TOL);
        case_end();
    }
}

/* ============================== convolution, pooling ============================== */

/* Geometry of a (N, C, H, W) input whose window of side ks gave an output y (N, O, OH, OW). */
static mgpu__conv_geom geom_of(const mgpu_tensor *x, const mgpu_tensor *y, int ks, int stride, int pad, int conv) {
    mgpu__conv_geom g;
    memset(&g, 0, sizeof g);
    g.n = x->shape[0]; g.c = x->shape[1]; g.h = x->shape[2]; g.w = x->shape[3];
    g.oh = y->shape[2]; g.ow = y->shape[3]; g.ks = ks; g.stride = stride; g.pad = pad;
    if (conv) { g.o = y->shape[1]; g.p = g.oh * g.ow; g.ckk = g.c * ks * ks; }
    return g;
}

/* conv2d (im2col + one batched GEMM) and its backward (GEMMs + col2im), pointwise included. */
static void test_conv2d(void) {
    static const int cfg[3][3] = { {3, 2, 1}, {3, 1, 0}, {1, 1, 0} };   /* kernel, stride, padding */
    int c;
    for (c = 0; c < 3; c++) {
        int k = cfg[c][0], s = cfg[c][1], pad = cfg[c][2];
        int64_t xs[4] = { 2, 3, 9, 8 }, O = 4, ws[4] = { 4, 3, k, k };
        mgpu_tensor *x = rnd(4, xs, -1, 1), *w = rnd(4, ws, -1, 1), *b = rnd(1, &O, -1, 1);
        mgpu_tensor *y = mgpu_op_conv2d(cpu, x, w, b, s, pad);
        mgpu__conv_geom g;
        mgpu__conv2d_args a;
        if (!y) { MT_CHECK(y != NULL, "cpu conv2d failed: %s", mgpu_last_error()); case_end(); continue; }
        g = geom_of(x, y, k, s, pad, 1);
        memset(&a, 0, sizeof a);
        a.blas = blas; a.g = &g;
        a.x = dev_of(x); a.w = dev_of(w); a.b = dev_of(b); a.y = dev_nan(y->numel);
        expect_ok(mgpu_cuda_conv2d_forward(&a, NULL), "conv2d forward");
        expect_close("conv2d forward (im2col + gemm)", a.y, (const float *)y->data, y->numel, F32_TOL);
        a.dy = cpu_backward(y); a.dx = dev_zeros(x->numel); a.dw = dev_zeros(w->numel); a.db = dev_zeros(O);
        expect_ok(mgpu_cuda_conv2d_backward(&a, NULL), "conv2d backward");
        expect_close("conv2d dx (col2im)", a.dx, grad_of(x), x->numel, F32_TOL);
        expect_close("conv2d dw", a.dw, grad_of(w), w->numel, F32_TOL);
        expect_close("conv2d db", a.db, grad_of(b), O, F32_TOL);
        case_end();
    }
}

static void test_pool(void) {
    static const int cfg[3][3] = { {3, 2, 1}, {2, 2, 0}, {3, 1, 1} };
    int c, is_max;
    for (is_max = 0; is_max < 2; is_max++)
        for (c = 0; c < 3; c++) {
            int64_t xs[4] = { 2, 3, 9, 7 };
            mgpu_tensor *x = rnd(4, xs, -1, 1);
            mgpu_tensor *y = is_max ? mgpu_op_max_pool2d(cpu, x, cfg[c][0], cfg[c][1], cfg[c][2]) : mgpu_op_avg_pool2d(cpu, x, cfg[c][0], cfg[c][1], cfg[c][2]);
            mgpu__conv_geom g = geom_of(x, y, cfg[c][0], cfg[c][1], cfg[c][2], 0);
            mgpu__pool2d_args a;
            memset(&a, 0, sizeof a);
            a.g = &g; a.is_max = is_max;
            a.x = dev_of(x); a.y = dev_nan(y->numel); a.dx = dev_zeros(x->numel);
            a.argmax = is_max ? (int32_t *)dev_alloc(sizeof(int32_t) * (size_t)y->numel) : NULL;
            expect_ok(mgpu_cuda_pool2d_forward(&a, NULL), "pool forward");
            expect_close(is_max ? "max_pool2d forward" : "avg_pool2d forward", a.y, (const float *)y->data, y->numel, F32_TOL);
            a.dy = cpu_backward(y);
            expect_ok(mgpu_cuda_pool2d_backward(&a, NULL), "pool backward");
            expect_close(is_max ? "max_pool2d backward" : "avg_pool2d backward", a.dx, grad_of(x), x->numel, F32_TOL);
            case_end();
        }
}

/* Max pooling, CPU twin against CUDA twin (outputs, argmax, dx), as PyTorch's max_pool2d: a NaN in
   the window makes the output NaN and the argmax points at it (the last NaN in scan order, as
   `val > max || isnan(val)`); a window that lies wholly in the padding (padding >= kernel: only the
   twins allow it, the op refuses) gives -inf, argmax -1 and no gradient. */
static void pool_twins(const char *what, int64_t C, int64_t H, int64_t W, int ks, int stride, int pad, const int64_t *nans, int n_nans,
                       float *y_out, int32_t *arg_out) {
    mgpu__conv_geom g;
    mgpu__pool2d_args a;
    int64_t xs[4] = { 1, C, H, W }, i, ny;
    mgpu_tensor *x = rnd(4, xs, -1, 1);
    float *hy, *hdy, *hdx, *dev_y, *dev_dx;
    int32_t *harg, *dev_arg;
    char msg[128];
    for (i = 0; i < n_nans; i++) ((float *)x->data)[nans[i]] = NAN;
    memset(&g, 0, sizeof g);
    g.n = 1; g.c = C; g.h = H; g.w = W; g.ks = ks; g.stride = stride; g.pad = pad;
    g.oh = (H + 2 * pad - ks) / stride + 1; g.ow = (W + 2 * pad - ks) / stride + 1;
    ny = C * g.oh * g.ow;
    hy = (float *)malloc(sizeof(float) * (size_t)ny); hdy = (float *)malloc(sizeof(float) * (size_t)ny);
    hdx = (float *)calloc((size_t)x->numel, sizeof(float)); harg = (int32_t *)malloc(sizeof(int32_t) * (size_t)ny);
    for (i = 0; i < ny; i++) hdy[i] = (float)mt_uniform(-1, 1);
    memset(&a, 0, sizeof a);
    a.ctx = cpu; a.g = &g; a.is_max = 1; a.x = (const float *)x->data; a.y = hy; a.argmax = harg; a.dy = hdy; a.dx = hdx;
    mgpu__cpu_pool2d_forward(&a);
    mgpu__cpu_pool2d_backward(&a);
    dev_y = dev_nan(ny); dev_dx = dev_zeros(x->numel); dev_arg = (int32_t *)dev_nan(ny);
    a.ctx = NULL; a.x = dev_of(x); a.y = dev_y; a.argmax = dev_arg; a.dy = dev_copy(hdy, sizeof(float) * (size_t)ny); a.dx = dev_dx;
    snprintf(msg, sizeof msg, "max_pool2d %s forward", what);
    expect_ok(mgpu_cuda_pool2d_forward(&a, NULL), msg);
    expect_close(msg, dev_y, hy, ny, 0.0);
    snprintf(msg, sizeof msg, "max_pool2d %s argmax", what);
    expect_same_bytes(msg, dev_arg, harg, sizeof(int32_t) * (size_t)ny);
    snprintf(msg, sizeof msg, "max_pool2d %s backward", what);
    expect_ok(mgpu_cuda_pool2d_backward(&a, NULL), msg);
    expect_close(msg, dev_dx, hdx, x->numel, 0.0);
    memcpy(y_out, hy, sizeof(float) * (size_t)ny); memcpy(arg_out, harg, sizeof(int32_t) * (size_t)ny);
    free(hy); free(hdy); free(hdx); free(harg);
    case_end();
}
static void test_pool_nan_and_empty_window(void) {
    float y[64];
    int32_t arg[64];
    /* (1, 1, 5, 5), kernel 3, stride 2, padding 1: output (3, 3); NaNs at (1, 1) and (1, 2) */
    int64_t nans[2] = { 1 * 5 + 1, 1 * 5 + 2 };
    pool_twins("with NaNs", 1, 5, 5, 3, 2, 1, nans, 2, y, arg);
    MT_CHECK(isnan(y[0]) && arg[0] == nans[0], "window (0, 0) holds the NaN at 6: got %g at %d", (double)y[0], (int)arg[0]);
    MT_CHECK(isnan(y[1]) && arg[1] == nans[1], "window (0, 1) holds NaNs at 6 and 7: the last wins, got %g at %d", (double)y[1], (int)arg[1]);
    /* (1, 2, 3, 3), kernel 2, stride 2, padding 2: output (3, 3), whose first row and column of
       windows lie wholly in the padding */
    pool_twins("with empty windows", 2, 3, 3, 2, 2, 2, NULL, 0, y, arg);
    MT_CHECK(y[0] == -INFINITY && arg[0] == -1 && y[1] == -INFINITY && arg[1] == -1 && y[3] == -INFINITY && arg[3] == -1,
             "an empty window gives -inf and argmax -1: got %g at %d", (double)y[0], (int)arg[0]);
    MT_CHECK(isfinite(y[4]) && (arg[4] == 0 || arg[4] == 1 || arg[4] == 3 || arg[4] == 4), "window (1, 1) is x[0:2, 0:2]: got %g at %d",
             (double)y[4], (int)arg[4]);
}

/* max_dim with NaNs, as torch.max(dim): the first NaN along the dim is the max and its index the argmax. */
static void test_max_dim_nan(void) {
    int64_t xs[3] = { 3, 6, 2 }, *harg, i;
    mgpu_tensor *x = rnd(3, xs, -1, 1), *y;
    float *px = (float *)x->data, *dy;
    mgpu__max_dim_args m;
    px[0 * 12 + 2 * 2 + 0] = NAN; px[0 * 12 + 4 * 2 + 0] = NAN;   /* line (0, 0): NaNs at d = 2 and 4 */
    px[1 * 12 + 0 * 2 + 1] = NAN;                                 /* line (1, 1): NaN first */
    px[2 * 12 + 5 * 2 + 0] = NAN;                                 /* line (2, 0): NaN last */
    y = mgpu_op_max_dim(cpu, x, 1, 0);
    memset(&m, 0, sizeof m);
    m.x = dev_of(x); m.out = dev_nan(y->numel); m.argmax = (int64_t *)dev_nan(2 * y->numel); m.outer = 3; m.dim = 6; m.inner = 2;
    expect_ok(mgpu_cuda_max_dim_forward(&m, NULL), "max_dim with NaNs");
    expect_close("max_dim with NaNs", m.out, (const float *)y->data, y->numel, 0.0);
    harg = (int64_t *)malloc(sizeof(int64_t) * (size_t)y->numel);
    cudaMemcpy(harg, m.argmax, sizeof(int64_t) * (size_t)y->numel, cudaMemcpyDeviceToHost);
    MT_CHECK(harg[0] == 2 && harg[3] == 0 && harg[4] == 5, "argmax of the NaN lines: got %lld %lld %lld, want 2 0 5",
             (long long)harg[0], (long long)harg[3], (long long)harg[4]);
    for (i = 0; i < y->numel; i++) MT_CHECK(isnan(((float *)y->data)[i]) == (i == 0 || i == 3 || i == 4), "CPU max_dim NaN at %lld", (long long)i);
    dy = cpu_backward(y);
    m.dy = dy; m.out = dev_zeros(x->numel);
    expect_ok(mgpu_cuda_max_dim_backward(&m, NULL), "max_dim backward with NaNs");
    expect_close("max_dim backward with NaNs", m.out, grad_of(x), x->numel, 0.0);
    free(harg);
    case_end();
}

/* ============================== copies and reductions ============================== */

/* The copy twins' argument structs with the old positional parameters (F32 elements). */
static mgpu_result transpose(const float *x, float *y, int64_t outer, int64_t d0, int64_t mid, int64_t d1, int64_t inner, int accumulate) {
    mgpu__transpose_args a;
    memset(&a, 0, sizeof a);
    a.x = x; a.out = y; a.outer = outer; a.d0 = d0; a.mid = mid; a.d1 = d1; a.inner = inner; a.esize = sizeof(float); a.accumulate = accumulate;
    return mgpu_cuda_transpose(&a, NULL);
}
static mgpu_result copy_rows(const float *src, int64_t src_pitch, int64_t src_off, float *dst, int64_t dst_pitch, int64_t dst_off, int64_t rows,
                             int64_t len, int accumulate) {
    mgpu__copy_rows_args a;
    memset(&a, 0, sizeof a);
    a.src = src + src_off; a.src_pitch = src_pitch; a.dst = dst + dst_off; a.dst_pitch = dst_pitch;
    a.rows = rows; a.len = len; a.esize = sizeof(float); a.accumulate = accumulate;
    return mgpu_cuda_copy_rows(&a, NULL);
}
static void test_transpose(void) {
    int64_t xs[4] = { 2, 3, 4, 5 };
    mgpu_tensor *x = rnd(4, xs, -1, 1), *y = mgpu_op_transpose(cpu, x, 1, 3);
    float *dx = dev_of(x), *out = dev_nan(x->numel), *g = dev_zeros(x->numel), *dy;
    /* (2, 3, 4, 5) -> (2, 5, 4, 3): outer 2, d0 3, mid 4, d1 5, inner 1 */
    expect_ok(transpose(dx, out, 2, 3, 4, 5, 1, 0), "transpose");
    expect_close("transpose forward", out, (const float *)y->data, y->numel, 0.0);
    dy = cpu_backward(y);
    expect_ok(transpose(dy, g, 2, 5, 4, 3, 1, 1), "transpose backward");
    expect_close("transpose backward", g, grad_of(x), x->numel, 0.0);
    case_end();
}

static void test_concat_narrow(void) {
    int64_t s1[3] = { 2, 3, 4 }, s2[3] = { 2, 5, 4 };
    mgpu_tensor *a = rnd(3, s1, -1, 1), *b = rnd(3, s2, -1, 1), *xs[2], *y, *nr;
    float *da, *db, *out, *ga, *gb, *dy, *nout, *gn, *dny;
    xs[0] = a; xs[1] = b;
    y = mgpu_op_concat(cpu, xs, 2, 1);   // (2, 8, 4): rows of 8 * 4, a at 0, b at 12
    da = dev_of(a); db = dev_of(b); out = dev_nan(y->numel); ga = dev_zeros(a->numel); gb = dev_zeros(b->numel);
    expect_ok(copy_rows(da, 12, 0, out, 32, 0, 2, 12, 0), "concat a");
    expect_ok(copy_rows(db, 20, 0, out, 32, 12, 2, 20, 0), "concat b");
    expect_close("concat forward", out, (const float *)y->data, y->numel, 0.0);
    dy = cpu_backward(y);
    expect_ok(copy_rows(dy, 32, 0, ga, 12, 0, 2, 12, 1), "concat backward a");
    expect_ok(copy_rows(dy, 32, 12, gb, 20, 0, 2, 20, 1), "concat backward b");
    expect_close("concat backward a", ga, grad_of(a), a->numel, 0.0);
    expect_close("concat backward b", gb, grad_of(b), b->numel, 0.0);
    case_end();
    b = rnd(3, s2, -1, 1);
    nr = mgpu_op_narrow(cpu, b, 1, 1, 3);   // (2, 3, 4) from rows [1, 4) of dim 1
    db = dev_of(b); nout = dev_nan(nr->numel); gn = dev_zeros(b->numel);
    expect_ok(copy_rows(db, 20, 4, nout, 12, 0, 2, 12, 0), "narrow");
    expect_close("narrow forward", nout, (const float *)nr->data, nr->numel, 0.0);
    dny = cpu_backward(nr);
    expect_ok(copy_rows(dny, 12, 0, gn, 20, 4, 2, 12, 1), "narrow backward");
    expect_close("narrow backward", gn, grad_of(b), b->numel, 0.0);
    case_end();
}

/* Random bytes, none of them 0xFF, so no element equals the device poison (0xFF bytes). */
static unsigned char *random_bytes(size_t n) {
    unsigned char *b = (unsigned char *)malloc(n ? n : 1);
    size_t i;
    for (i = 0; i < n; i++) b[i] = (unsigned char)mt_uniform(0, 255);
    return b;
}
/* gather_rows (the resident loader's batches): 6 rows of 7 elements picked from 30 rows of x by ids
   with repeats and two outside [0, 30) (zero rows); the CPU twin against rows copied by hand, then
   the CUDA twin against the CPU's bytes. ref and dst hold at least 6 * 7 elements. */
static void gather_rows_case(const unsigned char *x, size_t es, unsigned char *ref, unsigned char *dst) {
    static const int64_t ids[6] = { 4, 29, 4, 0, -1, 30 };
    size_t row = 7 * es, n = 6 * row;
    unsigned char *hand = (unsigned char *)calloc(n, 1);
    mgpu__gather_rows_args g;
    char what[64];
    int r;
    for (r = 0; r < 6; r++) if (ids[r] >= 0 && ids[r] < 30) memcpy(hand + r * row, x + (size_t)ids[r] * row, row);
    memset(&g, 0, sizeof g);
    memset(ref, 0xFF, n);
    g.ctx = cpu; g.src = x; g.dst = ref; g.idx = ids; g.rows = 6; g.len = 7; g.n_src = 30; g.esize = es;
    mgpu__cpu_gather_rows(&g);
    snprintf(what, sizeof what, "gather_rows (CPU twin) of %zu-byte elements", es);
    MT_CHECK(memcmp(ref, hand, n) == 0, "%s: rows differ from the ones picked by hand", what);
    cudaMemset(dst, 0xFF, n);
    g.ctx = NULL; g.src = dev_copy(x, 30 * row); g.dst = dst; g.idx = (const int64_t *)dev_copy(ids, sizeof ids);
    snprintf(what, sizeof what, "gather_rows of %zu-byte elements", es);
    expect_ok(mgpu_cuda_gather_rows(&g, NULL), what);
    expect_same_bytes(what, dst, ref, n);
    free(hand);
}
/* Transpose and row-block copies of every element size a dtype has (U8; F16/BF16; F32/I32; I64),
   each against its CPU twin byte for byte; dst starts poisoned (0xFF). */
static void test_copies_every_esize(void) {
    static const size_t esizes[4] = { 1, 2, 4, 8 };
    int e;
    for (e = 0; e < 4; e++) {
        size_t es = esizes[e], bytes = 3 * 5 * 2 * 7 * 3 * es;
        unsigned char *x = random_bytes(bytes), *ref = (unsigned char *)malloc(bytes), *dst = (unsigned char *)dev_alloc(bytes);
        mgpu__transpose_args t;
        mgpu__copy_rows_args c;
        char what[64];
        memset(&t, 0, sizeof t);   /* x (3, 5, 2, 7, 3) -> (3, 7, 2, 5, 3) */
        t.ctx = cpu; t.outer = 3; t.d0 = 5; t.mid = 2; t.d1 = 7; t.inner = 3; t.esize = es;
        t.x = x; t.out = ref;
        mgpu__cpu_transpose(&t);
        cudaMemset(dst, 0xFF, bytes);
        t.ctx = NULL; t.x = dev_copy(x, bytes); t.out = dst;
        snprintf(what, sizeof what, "transpose of %zu-byte elements", es);
        expect_ok(mgpu_cuda_transpose(&t, NULL), what);
        expect_same_bytes(what, dst, ref, bytes);
        /* rows 9 of 11 elements from pitch 23 at offset 4 into pitch 13 at offset 1; the gaps of dst keep their bytes */
        memset(&c, 0, sizeof c);
        memset(ref, 0xFF, bytes);
        c.ctx = cpu; c.rows = 9; c.len = 11; c.src_pitch = 23; c.dst_pitch = 13; c.esize = es;
        c.src = x + 4 * es; c.dst = ref + es;
        mgpu__cpu_copy_rows(&c);
        cudaMemset(dst, 0xFF, bytes);
        c.ctx = NULL; c.src = (const unsigned char *)dev_copy(x, bytes) + 4 * es; c.dst = dst + es;
        snprintf(what, sizeof what, "copy_rows of %zu-byte elements", es);
        expect_ok(mgpu_cuda_copy_rows(&c, NULL), what);
        expect_same_bytes(what, dst, ref, bytes);
        gather_rows_case(x, es, ref, dst);
        free(x); free(ref);
        case_end();
    }
}

/* The sum and max_dim twins' argument structs for x (outer, D, inner). */
static mgpu__sum_args sum_args(int64_t outer, int64_t D, int64_t inner, float scale) {
    mgpu__sum_args a;
    memset(&a, 0, sizeof a);
    a.outer = outer; a.dim = D; a.inner = inner; a.scale = scale;
    return a;
}
/* n doubles of device scratch, poisoned (0xFF bytes are a NaN double too) */
static double *dev_doubles(int64_t n) { return (double *)(void *)dev_nan(2 * n); }
static mgpu_result sum_forward(const float *x, float *out, int64_t outer, int64_t D, int64_t inner, float scale, double *scratch) {
    mgpu__sum_args a = sum_args(outer, D, inner, scale);
    a.x = x; a.out = out; a.scratch = scratch;
    return mgpu_cuda_sum_forward(&a, NULL);
}
static mgpu_result sum_backward(const float *dy, float *dx, int64_t outer, int64_t D, int64_t inner, float scale) {
    mgpu__sum_args a = sum_args(outer, D, inner, scale);
    a.dy = dy; a.out = dx;
    return mgpu_cuda_sum_backward(&a, NULL);
}
static void test_reductions(void) {
    int64_t xs[3] = { 4, 37, 5 }, n = quick ? 100003 : 3000017;
    int mean;
    for (mean = 0; mean < 2; mean++) {
        mgpu_tensor *x = rnd(3, xs, -1, 1), *y = mean ? mgpu_op_mean(cpu, x) : mgpu_op_sum(cpu, x);
        float scale = mean ? 1.0f / (float)x->numel : 1.0f;
        float *dx = dev_of(x), *out = dev_nan(1), *g = dev_zeros(x->numel), *dy;
        double *scratch = dev_doubles(MGPU_CUDA_REDUCE_PARTIALS);
        expect_ok(sum_forward(dx, out, 1, x->numel, 1, scale, scratch), "sum");
        expect_close(mean ? "mean" : "sum", out, (const float *)y->data, 1, F32_TOL);
        dy = cpu_backward(y);
        expect_ok(sum_backward(dy, g, 1, x->numel, 1, scale), "sum backward");
        expect_close(mean ? "mean backward" : "sum backward", g, grad_of(x), x->numel, F32_TOL);
        case_end();
        x = rnd(3, xs, -1, 1); y = mean ? mgpu_op_mean_dim(cpu, x, 1, 0) : mgpu_op_sum_dim(cpu, x, 1, 0);
        dx = dev_of(x); out = dev_nan(y->numel); g = dev_zeros(x->numel);
        scale = mean ? 1.0f / 37.0f : 1.0f;
        expect_ok(sum_forward(dx, out, 4, 37, 5, scale, NULL), "sum_dim");
        expect_close(mean ? "mean_dim" : "sum_dim", out, (const float *)y->data, y->numel, F32_TOL);
        dy = cpu_backward(y);
        expect_ok(sum_backward(dy, g, 4, 37, 5, scale), "sum_dim backward");
        expect_close(mean ? "mean_dim backward" : "sum_dim backward", g, grad_of(x), x->numel, F32_TOL);
        case_end();
    }
    {
        mgpu_tensor *x = rnd(3, xs, -1, 1), *y = mgpu_op_max_dim(cpu, x, 1, 0);
        float *dx = dev_of(x), *out = dev_nan(y->numel), *g = dev_zeros(x->numel), *dy;
        mgpu__max_dim_args m;
        memset(&m, 0, sizeof m);
        m.x = dx; m.out = out; m.argmax = (int64_t *)dev_alloc(sizeof(int64_t) * (size_t)y->numel); m.outer = 4; m.dim = 37; m.inner = 5;
        expect_ok(mgpu_cuda_max_dim_forward(&m, NULL), "max_dim");
        expect_close("max_dim", out, (const float *)y->data, y->numel, 0.0);
        dy = cpu_backward(y);
        m.dy = dy; m.out = g;
        expect_ok(mgpu_cuda_max_dim_backward(&m, NULL), "max_dim backward");
        expect_close("max_dim backward", g, grad_of(x), x->numel, 0.0);
        case_end();
    }
    {   /* a long sum: the fixed two-phase tree against a double-precision host sum */
        float *h = (float *)malloc(sizeof(float) * (size_t)n), ref, *dx, *out;
        double *scratch;
        double s = 0;
        int64_t i;
        for (i = 0; i < n; i++) { h[i] = (float)mt_uniform(-1, 1); s += h[i]; }
        ref = (float)s;
        dx = dev_copy(h, sizeof(float) * (size_t)n); out = dev_nan(1); scratch = dev_doubles(MGPU_CUDA_REDUCE_PARTIALS);
        expect_ok(sum_forward(dx, out, 1, n, 1, 1.0f, scratch), "long sum");
        expect_close("sum of 3M floats", out, &ref, 1, 1e-6);
        free(h);
        case_end();
    }
    {   /* partials that float cannot hold: with the two-phase split (MGPU_CUDA_REDUCE_PARTIALS chunks
           of 1000), even chunks sum to 99900000.5 and odd ones to -99900000, so the exact total is
           512 * 0.5 = 256, and partials rounded to float (ulp 8 there) would give 0 */
        int64_t m = (int64_t)MGPU_CUDA_REDUCE_PARTIALS * 1000, i;
        float *h = (float *)malloc(sizeof(float) * (size_t)m), ref, *dx, *out;
        double s = 0, *scratch;
        for (i = 0; i < m; i++) {
            int64_t chunk = i / 1000, k = i % 1000;
            h[i] = k == 999 ? (chunk % 2 ? 0.0f : 0.5f) : (chunk % 2 ? -100000.0f : 100000.0f);
            s += h[i];
        }
        ref = (float)s;
        MT_CHECK(s == 256.0, "the host sum in double is exact: %g", s);
        dx = dev_copy(h, sizeof(float) * (size_t)m); out = dev_nan(1); scratch = dev_doubles(MGPU_CUDA_REDUCE_PARTIALS);
        expect_ok(sum_forward(dx, out, 1, m, 1, 1.0f, scratch), "sum with cancelling partials");
        expect_close("sum with cancelling partials (double between the phases)", out, &ref, 1, 1e-6);
        free(h);
        case_end();
    }
}

/* ============================== attention ============================== */

/* The forward runs twice: without prob (no backward follows: the twin finds its own room) and with it. */
static void test_attention(void) {
    static const int64_t cfg[3][3] = { {5, 7, 8}, {6, 6, 16}, {33, 40, 64} };   /* Tq, Tk, D */
    int c, causal;
    for (causal = 0; causal < 2; causal++)
        for (c = 0; c < 3; c++) {
            int64_t Tq = cfg[c][0], Tk = causal ? cfg[c][0] : cfg[c][1], D = cfg[c][2], BH = 6;
            int64_t qs[4] = { 2, 3, Tq, D }, ks[4] = { 2, 3, Tk, D };
            mgpu_tensor *q = rnd(4, qs, -1, 1), *k = rnd(4, ks, -1, 1), *v = rnd(4, ks, -1, 1), *y = mgpu_op_attention(cpu, q, k, v, causal);
            mgpu__attention_args a;
            memset(&a, 0, sizeof a);
            a.blas = blas; a.BH = BH; a.Tq = Tq; a.Tk = Tk; a.D = D; a.scale = (float)(1.0 / sqrt((double)D)); a.causal = causal;
            a.q = dev_of(q); a.k = dev_of(k); a.v = dev_of(v); a.out = dev_nan(y->numel);
            expect_ok(mgpu_cuda_attention_forward(&a, NULL), "attention forward without prob");
            expect_close(causal ? "causal attention forward, no prob kept" : "attention forward, no prob kept", a.out, (const float *)y->data, y->numel, F32_TOL);
            a.out = dev_nan(y->numel); a.prob = dev_nan(BH * Tq * Tk);
            expect_ok(mgpu_cuda_attention_forward(&a, NULL), "attention forward");
            expect_close(causal ? "causal attention forward" : "attention forward", a.out, (const float *)y->data, y->numel, F32_TOL);
            a.dout = cpu_backward(y); a.dq = dev_zeros(q->numel); a.dk = dev_zeros(k->numel); a.dv = dev_zeros(v->numel);
            expect_ok(mgpu_cuda_attention_backward(&a, NULL), "attention backward");
            expect_close("attention dq", a.dq, grad_of(q), q->numel, F32_TOL);
            expect_close("attention dk", a.dk, grad_of(k), k->numel, F32_TOL);
            expect_close("attention dv", a.dv, grad_of(v), v->numel, F32_TOL);
            case_end();
        }
}

/* ============================== GEMM / linear ============================== */

/* One row-major product through the gemm twin (no_lt: plain cuBLAS). */
static mgpu_result gemm(void *bl, int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const void *a, int64_t lda, const void *b,
                        int64_t ldb, int dtype, float beta, float *c, int64_t ldc, int epilogue, const float *bias, int lt) {
    mgpu__gemm_args g;
    memset(&g, 0, sizeof g);
    g.blas = bl; g.trans_a = ta; g.trans_b = tb; g.m = m; g.n = n; g.k = k; g.alpha = alpha; g.beta = beta;
    g.a = a; g.lda = lda; g.b = b; g.ldb = ldb; g.ab_dtype = (mgpu_dtype)dtype; g.c = c; g.ldc = ldc;
    g.epilogue = (mgpu__gemm_epilogue)epilogue; g.bias = bias; g.no_lt = !lt;
    return mgpu_cuda_gemm(&g, NULL);
}

static void test_linear_gemm(void) {
    static const int64_t cfg[3][3] = { {17, 33, 9}, {128, 784, 256}, {1, 5, 3} };   /* N, in, out */
    static const int epis[4] = { MGPU__EPI_BIAS, MGPU__EPI_BIAS_RELU, MGPU__EPI_BIAS_GELU, MGPU__EPI_NONE };
    int c, e, lt;
    for (lt = 0; lt < 2; lt++)
        for (c = 0; c < 3; c++)
            for (e = 0; e < 4; e++) {
                int64_t N = cfg[c][0], I = cfg[c][1], O = cfg[c][2], xs[2] = { N, I }, ws[2] = { O, I };
                mgpu_tensor *x = rnd(2, xs, -1, 1), *w = rnd(2, ws, -1, 1), *b = rnd(1, &O, -1, 1);
                mgpu_tensor *lin = mgpu_op_linear(cpu, x, w, epis[e] == MGPU__EPI_NONE ? NULL : b);
                mgpu_tensor *y = epis[e] == MGPU__EPI_BIAS_RELU ? mgpu_op_relu(cpu, lin)
                               : epis[e] == MGPU__EPI_BIAS_GELU ? mgpu_op_gelu_tanh(cpu, lin) : lin;
                float *dx = dev_of(x), *dw = dev_of(w), *db = dev_of(b), *out = dev_nan(y->numel), *gx, *gw, *gb, *dy;
                mgpu__linear_bias_grad_args bg;
                char what[96];
                snprintf(what, sizeof what, "linear N=%lld in=%lld out=%lld epilogue %d %s", (long long)N, (long long)I, (long long)O, epis[e],
                         lt ? "cuBLASLt" : "cuBLAS");
                expect_ok(gemm(blas, 0, 1, N, O, I, 1.0f, dx, I, dw, I, MGPU_F32, 0.0f, out, O, epis[e], db, lt), what);
                /* cuBLASLt's GELU epilogue uses its own tanh: allow 1e-4 there */
                expect_close(what, out, (const float *)y->data, y->numel, epis[e] == MGPU__EPI_BIAS_GELU ? 1e-4 : F32_TOL);
                if (epis[e] != MGPU__EPI_BIAS) { case_end(); continue; }
                dy = cpu_backward(y);
                gx = dev_zeros(x->numel); gw = dev_zeros(w->numel); gb = dev_zeros(O);
                /* dx += dy (N, O) @ W (O, I); dW += dy^T (O, N) @ x (N, I); db += column sums */
                expect_ok(gemm(blas, 0, 0, N, I, O, 1.0f, dy, O, dw, I, MGPU_F32, 1.0f, gx, I, MGPU__EPI_NONE, NULL, lt), "dx gemm");
                expect_ok(gemm(blas, 1, 0, O, I, N, 1.0f, dy, O, dx, I, MGPU_F32, 1.0f, gw, I, MGPU__EPI_NONE, NULL, lt), "dw gemm");
                bg.ctx = NULL; bg.dy = dy; bg.db = gb; bg.rows = N; bg.cols = O;
                expect_ok(mgpu_cuda_linear_bias_grad(&bg, NULL), "db");
                expect_close("linear dx", gx, grad_of(x), x->numel, F32_TOL);
                expect_close("linear dw", gw, grad_of(w), w->numel, F32_TOL);
                expect_close("linear db", gb, grad_of(b), O, F32_TOL);
                case_end();
            }
}

/* The cast twin, its argument struct filled as a front fills it. */
static mgpu_result cast(const void *src, int src_dtype, void *dst, int dst_dtype, int64_t n) {
    mgpu__cast_args a;
    memset(&a, 0, sizeof a);
    a.src = src; a.src_dtype = (mgpu_dtype)src_dtype; a.dst = dst; a.dst_dtype = (mgpu_dtype)dst_dtype; a.n = n;
    return mgpu_cuda_cast(&a, NULL);
}

/* bf16 GEMM with f32 accumulation against the CPU linear on bf16-rounded inputs. */
static void test_gemm_bf16(void) {
    int64_t N = 64, I = 300, O = 96, xs[2] = { N, I }, ws[2] = { O, I }, i;
    int dt;
    for (dt = MGPU_F16; dt <= MGPU_BF16; dt++) {
        mgpu_tensor *x = rnd(2, xs, -1, 1), *w = rnd(2, ws, -1, 1), *y;
        float *dx = dev_of(x), *dw = dev_of(w), *out = dev_nan(N * O);
        void *hx = dev_alloc(2 * (size_t)x->numel), *hw = dev_alloc(2 * (size_t)w->numel);
        for (i = 0; i < x->numel; i++) {   /* the reference sees the same rounded inputs */
            float *p = (float *)x->data + i;
            *p = dt == MGPU_BF16 ? mgpu_bf16_to_f32(mgpu_f32_to_bf16(*p)) : mgpu_f16_to_f32(mgpu_f32_to_f16(*p));
        }
        for (i = 0; i < w->numel; i++) {
            float *p = (float *)w->data + i;
            *p = dt == MGPU_BF16 ? mgpu_bf16_to_f32(mgpu_f32_to_bf16(*p)) : mgpu_f16_to_f32(mgpu_f32_to_f16(*p));
        }
        y = mgpu_op_linear(cpu, x, w, NULL);
        expect_ok(cast(dx, MGPU_F32, hx, dt, x->numel), "cast x");
        expect_ok(cast(dw, MGPU_F32, hw, dt, w->numel), "cast w");
        expect_ok(gemm(blas, 0, 1, N, O, I, 1.0f, hx, I, hw, I, dt, 0.0f, out, O, MGPU__EPI_NONE, NULL, 1), "half gemm");
        expect_close(dt == MGPU_BF16 ? "bf16 gemm (f32 accumulate)" : "f16 gemm (f32 accumulate)", out, (const float *)y->data, y->numel, BF16_TOL);
        case_end();
    }
}

/* A strided batch of products (matmul on (B, M, K) @ (B, K, N)) goes through cuBLAS's batched GEMM. */
static void test_matmul_batched(void) {
    int64_t B = 5, M = 17, K = 33, N = 12, as[3] = { B, M, K }, bs[3] = { B, K, N };
    mgpu_tensor *a = rnd(3, as, -1, 1), *b = rnd(3, bs, -1, 1), *y = mgpu_op_matmul(cpu, a, b);
    mgpu__gemm_args g;
    memset(&g, 0, sizeof g);
    g.blas = blas; g.m = M; g.n = N; g.k = K; g.alpha = 1.0f; g.batch = B;
    g.a = dev_of(a); g.lda = K; g.stride_a = M * K; g.b = dev_of(b); g.ldb = N; g.stride_b = K * N;
    g.c = dev_nan(y->numel); g.ldc = N; g.stride_c = M * N;
    expect_ok(mgpu_cuda_gemm(&g, NULL), "batched gemm");
    expect_close("batched matmul", g.c, (const float *)y->data, y->numel, F32_TOL);
    case_end();
}

static void test_gemm_plan_cache(void) {
    int64_t m = 31, n = 29, k = 27;
    float *a = dev_zeros(m * k), *b = dev_zeros(k * n), *c = dev_zeros(m * n);
    int before, after, i;
    expect_ok(gemm(blas, 0, 0, m, n, k, 1.0f, a, k, b, n, MGPU_F32, 0.0f, c, n, MGPU__EPI_NONE, NULL, 1), "gemm");
    before = mgpu_cuda_blas_plan_count(blas);
    for (i = 0; i < 10; i++)
        expect_ok(gemm(blas, 0, 0, m, n, k, 1.0f, a, k, b, n, MGPU_F32, 0.0f, c, n, MGPU__EPI_NONE, NULL, 1), "gemm");
    after = mgpu_cuda_blas_plan_count(blas);
    MT_CHECK(before == after && before >= 1, "the plan cache grew from %d to %d for one repeated shape", before, after);
    case_end();
}

/* The round_half twin on x (h on the host) against the CPU's conversions: written, then accumulated. */
static void check_round_half(const float *x, const float *h, int64_t n, int dt) {
    float *ref = (float *)malloc(sizeof(float) * (size_t)n), *out = dev_nan(n);
    mgpu__round_half_args a;
    int64_t i;
    memset(&a, 0, sizeof a);
    a.half = (mgpu_dtype)dt; a.scale = 0.375f; a.src = x; a.dst = out; a.n = n;
    for (i = 0; i < n; i++) ref[i] = dt == MGPU_F16 ? mgpu_f16_to_f32(mgpu_f32_to_f16(h[i] * a.scale)) : mgpu_bf16_to_f32(mgpu_f32_to_bf16(h[i] * a.scale));
    expect_ok(mgpu_cuda_round_half(&a, NULL), "round to half");
    expect_close("round to half and back", out, ref, n, 0.0);
    a.accumulate = 1;
    for (i = 0; i < n; i++) ref[i] += ref[i];
    expect_ok(mgpu_cuda_round_half(&a, NULL), "round to half, accumulating");
    expect_close("round to half and back, accumulated", out, ref, n, 0.0);
    free(ref);
}

/* Views that start one float into their buffers (4-byte aligned) get a cuBLASLt plan of their own,
   valid for that alignment; a bias view takes the cuBLAS path. */
static void test_gemm_misaligned(void) {
    int64_t m = 37, n = 64, k = 48, i;
    float *ha = (float *)malloc(sizeof(float) * (size_t)(m * k)), *hb = (float *)malloc(sizeof(float) * (size_t)(k * n));
    float *hbias = (float *)malloc(sizeof(float) * (size_t)n), *ref = (float *)malloc(sizeof(float) * (size_t)(m * n));
    float *ref_bias = (float *)malloc(sizeof(float) * (size_t)(m * n)), *a, *b, *bias, *c;
    int off, plans;
    for (i = 0; i < m * k; i++) ha[i] = (float)mt_uniform(-1, 1);
    for (i = 0; i < k * n; i++) hb[i] = (float)mt_uniform(-1, 1);
    for (i = 0; i < n; i++) hbias[i] = (float)mt_uniform(-1, 1);
    mgpu_gemm_f32(NULL, 0, 0, m, n, k, 1.0f, ha, k, hb, n, 0.0f, ref, n);
    for (i = 0; i < m * n; i++) ref_bias[i] = ref[i] + hbias[i % n];
    for (off = 0; off < 2; off++) {
        a = dev_nan(m * k + 1) + off; b = dev_nan(k * n + 1) + off; bias = dev_nan(n + 1) + off; c = dev_nan(m * n + 1) + off;
        cudaMemcpy(a, ha, sizeof(float) * (size_t)(m * k), cudaMemcpyHostToDevice);
        cudaMemcpy(b, hb, sizeof(float) * (size_t)(k * n), cudaMemcpyHostToDevice);
        cudaMemcpy(bias, hbias, sizeof(float) * (size_t)n, cudaMemcpyHostToDevice);
        plans = mgpu_cuda_blas_plan_count(blas);
        expect_ok(gemm(blas, 0, 0, m, n, k, 1.0f, a, k, b, n, MGPU_F32, 0.0f, c, n, MGPU__EPI_NONE, NULL, 1), "gemm");
        expect_close(off ? "gemm on 4-byte aligned views" : "gemm on aligned buffers", c, ref, m * n, F32_TOL);
        MT_CHECK(mgpu_cuda_blas_plan_count(blas) == plans + 1 || plans == 64, "one new plan for the %s operands (%d -> %d)",
                 off ? "misaligned" : "aligned", plans, mgpu_cuda_blas_plan_count(blas));
        expect_ok(gemm(blas, 0, 0, m, n, k, 1.0f, a, k, b, n, MGPU_F32, 0.0f, c, n, MGPU__EPI_BIAS, bias, 1), "gemm + bias");
        expect_close(off ? "gemm + bias on 4-byte aligned views" : "gemm + bias on aligned buffers", c, ref_bias, m * n, F32_TOL);
        case_end();
    }
    free(ha); free(hb); free(hbias); free(ref); free(ref_bias);
}

static void test_casts(void) {
    int64_t n = 4099, i, bad = 0;
    float *h = (float *)malloc(sizeof(float) * (size_t)n), *d, *back;
    uint16_t *hb = (uint16_t *)malloc(2 * (size_t)n);
    void *half;
    int dt;
    for (i = 0; i < n; i++) h[i] = (float)mt_uniform(-70000, 70000) * (i % 3 == 0 ? 1e-6f : 1.0f);
    d = dev_copy(h, sizeof(float) * (size_t)n);
    half = dev_alloc(2 * (size_t)n); back = dev_nan(n);
    for (dt = MGPU_F16; dt <= MGPU_BF16; dt++) {
        float *ref = (float *)malloc(sizeof(float) * (size_t)n);
        bad = 0;
        expect_ok(cast(d, MGPU_F32, half, dt, n), "cast to half");
        cudaMemcpy(hb, half, 2 * (size_t)n, cudaMemcpyDeviceToHost);
        for (i = 0; i < n; i++) bad += hb[i] != (dt == MGPU_F16 ? mgpu_f32_to_f16(h[i]) : mgpu_f32_to_bf16(h[i]));
        MT_CHECK(bad == 0, "%lld of %lld %s values round differently from the CPU", (long long)bad, (long long)n, dt == MGPU_F16 ? "f16" : "bf16");
        expect_ok(cast(half, dt, back, MGPU_F32, n), "cast back");
        for (i = 0; i < n; i++) ref[i] = dt == MGPU_F16 ? mgpu_f16_to_f32(hb[i]) : mgpu_bf16_to_f32(hb[i]);
        expect_close("cast back to f32", back, ref, n, 0.0);
        check_round_half(d, h, n, dt);
        free(ref);
    }
    free(h); free(hb);
    case_end();
}

/* Fills of every dtype against mgpu_tensor_fill on the CPU, byte for byte, and a flat copy. */
static void test_fills_and_copies(void) {
    const double values[3] = { 2.7182818, -0.0, -3.0 };
    int64_t n = 1001, i;
    int dt, v;
    float *h = (float *)malloc(sizeof(float) * (size_t)n), *src, *dst = dev_nan(n);
    unsigned char *back = (unsigned char *)malloc(8 * (size_t)n);
    mgpu__copy_args c;
    for (dt = 0; dt < MGPU_DTYPE_COUNT; dt++)
        for (v = 0; v < 3; v++) {
            mgpu_tensor *ref = track(mgpu_tensor_create(cpu, (mgpu_dtype)dt, 1, &n));
            void *d = dev_alloc(mgpu_tensor_nbytes(ref));
            mgpu__fill_args a;
            memset(&a, 0, sizeof a);
            a.dst = d; a.dtype = (mgpu_dtype)dt; a.n = n; a.value = values[v];
            expect_ok(mgpu_tensor_fill(ref, values[v]), "cpu fill");
            expect_ok(mgpu_cuda_fill(&a, NULL), "fill");
            cudaMemcpy(back, d, mgpu_tensor_nbytes(ref), cudaMemcpyDeviceToHost);
            MT_CHECK(memcmp(back, ref->data, mgpu_tensor_nbytes(ref)) == 0, "fill of %s with %g differs from the CPU's bytes", mgpu_dtype_name((mgpu_dtype)dt), values[v]);
        }
    for (i = 0; i < n; i++) h[i] = (float)mt_uniform(-1, 1);
    src = dev_copy(h, sizeof(float) * (size_t)n);
    memset(&c, 0, sizeof c);
    c.src = src; c.dst = dst; c.bytes = sizeof(float) * (size_t)n;
    expect_ok(mgpu_cuda_copy(&c, NULL), "copy");
    expect_close("copy", dst, h, n, 0.0);
    free(h); free(back);
    case_end();
}

/* ============================== optimizers, clipping, scaler ============================== */

/* 40 parameters (more than one launch's 32 slots), one of them larger than a launch's block table. */
static void test_optimizers(void) {
    int type;
    for (type = MGPU_OPTIM_SGD; type <= MGPU_OPTIM_ADAMW; type++) {
        mgpu_model *m = mgpu_model_create(cpu);
        mgpu_optimizer_desc d = mgpu_optimizer_desc_default((mgpu_optimizer_type)type);
        mgpu_optimizer *o;
        float *P[40], *G[40], *M[40], *V[40];
        int64_t numel[40];
        mgpu__tensor_list params;
        int i, step;
        d.lr = 0.01f; d.weight_decay = 0.05f;
        if (type == MGPU_OPTIM_SGD) { d.momentum = 0.9f; d.nesterov = 1; }
        for (i = 0; i < 40; i++) {
            char name[32];
            int64_t n = i == 7 ? (quick ? 300000 : 5000000) : 1 + (i * 977) % 20000;
            mgpu_tensor *p;
            int64_t j;
            snprintf(name, sizeof name, "p%d", i);
            p = mgpu_model_add_parameter(m, name, MGPU_F32, 1, &n);
            give_grad(p);
            for (j = 0; j < n; j++) { ((float *)p->data)[j] = (float)mt_uniform(-1, 1); ((float *)p->grad->data)[j] = (float)mt_uniform(-1, 1); }
            P[i] = dev_of(p); G[i] = dev_of(p->grad); M[i] = dev_zeros(n); V[i] = dev_zeros(n); numel[i] = n;
        }
        o = mgpu_optimizer_create(m, &d);
        params.count = 40; params.data = P; params.numel = numel;
        for (step = 1; step <= 3; step++) {
            expect_ok(mgpu_optimizer_step(o), "cpu optimizer step");
            if (type == MGPU_OPTIM_SGD) {
                mgpu__sgd_args a;
                memset(&a, 0, sizeof a);
                a.params = params; a.grads = (const float *const *)G; a.momentum_buffers = M;
                a.lr = d.lr; a.weight_decay = d.weight_decay; a.momentum = d.momentum; a.keep = 1.0f - d.dampening;
                a.nesterov = d.nesterov; a.first = step == 1;
                expect_ok(mgpu_cuda_sgd(&a, NULL), "sgd update");
            } else {
                mgpu__adam_args a;
                int adamw = type == MGPU_OPTIM_ADAMW;
                memset(&a, 0, sizeof a);
                a.params = params; a.grads = (const float *const *)G; a.exp_avg = M; a.exp_avg_sq = V;
                a.decay = adamw ? (float)(1.0 - (double)d.lr * d.weight_decay) : 1.0f;
                a.l2 = adamw ? 0.0f : d.weight_decay;
                a.beta1 = d.beta1; a.beta2 = d.beta2; a.eps = d.eps;
                a.step_size = (float)((double)d.lr / (1.0 - pow((double)d.beta1, step)));
                a.bc2_sqrt = (float)sqrt(1.0 - pow((double)d.beta2, step));
                expect_ok(mgpu_cuda_adam(&a, NULL), "adam update");
            }
        }
        for (i = 0; i < 40; i++) {
            char what[64];
            snprintf(what, sizeof what, "%s parameter %d after 3 steps", type == MGPU_OPTIM_SGD ? "SGD" : type == MGPU_OPTIM_ADAM ? "Adam" : "AdamW", i);
            expect_close(what, P[i], (const float *)mgpu_model_parameter(m, i, NULL)->data, numel[i], F32_TOL);
        }
        mgpu_optimizer_destroy(o);
        mgpu_model_destroy(m);
        case_end();
    }
}

/* The CUDA twin's inf/NaN flag and unscaled grads against the CPU loss scaler's. */
static void check_unscale(mgpu_model *m, mgpu_grad_scaler *sc, const mgpu__tensor_list *grads, int32_t *found, int want_found) {
    mgpu__unscale_args u;
    int32_t hf = -1;
    int i;
    memset(&u, 0, sizeof u);
    u.grads = *grads; u.inv_scale = (float)(1.0 / (double)sc->scale); u.found = found;
    expect_ok(mgpu_cuda_unscale(&u, NULL), "unscale");
    expect_ok(mgpu_grad_scaler_unscale(sc, m), "cpu unscale");
    cudaMemcpy(&hf, found, sizeof hf, cudaMemcpyDeviceToHost);
    MT_CHECK(hf == want_found && sc->found_inf == want_found, "inf/NaN flag: cuda %d, cpu %d, expected %d", hf, sc->found_inf, want_found);
    for (i = 0; i < grads->count; i++)
        expect_close("unscaled gradient", grads->data[i], (const float *)mgpu_model_parameter(m, i, NULL)->grad->data, grads->numel[i], F32_TOL);
    mgpu_grad_scaler_update(sc);
}

static void test_clip_and_finite(void) {
    mgpu_model *m = mgpu_model_create(cpu);
    float *X[5], *norm, total = 0;
    int64_t numel[5];
    int i;
    mgpu__tensor_list grads;
    mgpu__clip_grad_norm_args c;
    mgpu_grad_scaler sc;
    for (i = 0; i < 5; i++) {
        char name[16];
        int64_t n = 1000 * i + 3, j;
        mgpu_tensor *p;
        snprintf(name, sizeof name, "w%d", i);
        p = mgpu_model_add_parameter(m, name, MGPU_F32, 1, &n);
        give_grad(p);
        for (j = 0; j < n; j++) ((float *)p->grad->data)[j] = (float)mt_uniform(-1, 1);
        X[i] = dev_of(p->grad); numel[i] = n;
    }
    grads.count = 5; grads.data = X; grads.numel = numel;
    memset(&c, 0, sizeof c);
    c.grads = grads; c.max_norm = 1.0f; c.norm = norm = dev_nan(1); c.scratch = dev_doubles(MGPU__CLIP_SCRATCH_DOUBLES(5));
    expect_ok(mgpu_cuda_clip_grad_norm(&c, NULL), "clip grad norm");
    expect_ok(mgpu_clip_grad_norm(m, 1.0f, &total), "cpu clip");
    expect_close("global gradient norm", norm, &total, 1, F32_TOL);
    for (i = 0; i < 5; i++) expect_close("clipped gradient", X[i], (const float *)mgpu_model_parameter(m, i, NULL)->grad->data, numel[i], F32_TOL);
    mgpu_grad_scaler_init(&sc, 1);
    check_unscale(m, &sc, &grads, (int32_t *)dev_alloc(sizeof(int32_t)), 0);
    {
        float inf = INFINITY;
        cudaMemcpy(X[3] + 17, &inf, sizeof inf, cudaMemcpyHostToDevice);
        ((float *)mgpu_model_parameter(m, 3, NULL)->grad->data)[17] = inf;
    }
    check_unscale(m, &sc, &grads, (int32_t *)dev_alloc(sizeof(int32_t)), 1);
    mgpu_model_destroy(m);
    case_end();
}

/* ============================== determinism, allocator, graphs, errors ============================== */

static int same_bits(const float *a, const float *b, int64_t n) {
    float *ha = (float *)malloc(sizeof(float) * (size_t)n), *hb = (float *)malloc(sizeof(float) * (size_t)n);
    int same;
    cudaDeviceSynchronize();
    cudaMemcpy(ha, a, sizeof(float) * (size_t)n, cudaMemcpyDeviceToHost);
    cudaMemcpy(hb, b, sizeof(float) * (size_t)n, cudaMemcpyDeviceToHost);
    same = memcmp(ha, hb, sizeof(float) * (size_t)n) == 0;
    free(ha); free(hb);
    return same;
}

static void test_determinism(void) {
    int64_t R = 512, C = 768, V = 300, n = 1536, i;   /* n * 256 == R * C: dy doubles as the embedding grad */
    int64_t sh[2] = { R, C };
    mgpu_tensor *x = rnd(2, sh, -1, 1), *dyt = rnd(2, sh, -1, 1);
    int32_t *hidx = (int32_t *)malloc(sizeof(int32_t) * (size_t)n);
    float *dx = dev_of(x), *dy = dev_of(dyt), *y = dev_nan(R * C), *mean = dev_nan(R), *rstd = dev_nan(R), *run[2][3];
    float *didx, *demb = dev_of(dyt);
    double *scratch = dev_doubles(MGPU_CUDA_REDUCE_PARTIALS);
    int r;
    for (i = 0; i < n; i++) hidx[i] = (int32_t)((i * 31) % V);
    didx = dev_copy(hidx, sizeof(int32_t) * (size_t)n);
    for (r = 0; r < 2; r++) {
        run[r][0] = dev_zeros(R * C); run[r][1] = dev_zeros(C); run[r][2] = dev_zeros(V * 256 + 1);
        mgpu__layer_norm_args ln = ln_args(dx, NULL, NULL, mean, rstd, R, C);
        mgpu__embedding_args emb = emb_args(didx, 0, n, V, 256);
        ln.y = y; ln.dy = dy; ln.dx = run[r][0]; ln.dw = run[r][1];
        emb.dy = demb; emb.dweight = run[r][2];
        expect_ok(mgpu_cuda_layer_norm_forward(&ln, NULL), "ln");
        expect_ok(mgpu_cuda_layer_norm_backward(&ln, NULL), "ln bwd");
        expect_ok(mgpu_cuda_embedding_backward(&emb, NULL), "emb bwd");
        expect_ok(sum_forward(dx, run[r][2] + V * 256, 1, R * C, 1, 1.0f, scratch), "sum");
    }
    MT_CHECK(same_bits(run[0][0], run[1][0], R * C), "layer_norm dx differs between two identical runs");
    MT_CHECK(same_bits(run[0][1], run[1][1], C), "layer_norm dw differs between two identical runs");
    MT_CHECK(same_bits(run[0][2], run[1][2], V * 256 + 1), "embedding grad / sum differ between two identical runs");
    free(hidx);
    case_end();
}

static void test_allocator(void) {
    mgpu_memory_stats s0, s1, s2;
    void *a, *b;
    expect_ok(mgpu_cuda_empty_cache(0), "empty cache");   /* no other cached block of the same class */
    expect_ok(mgpu_memory_stats_get(0, &s0), "stats");
    a = mgpu_cuda_malloc(0, 3 << 20);
    expect_ok(mgpu_memory_stats_get(0, &s1), "stats");
    MT_CHECK(s1.allocated >= s0.allocated + (3 << 20), "allocated did not grow (%lld -> %lld)", (long long)s0.allocated, (long long)s1.allocated);
    mgpu_cuda_free(0, a);
    b = mgpu_cuda_malloc(0, 3 << 20);
    MT_CHECK(a == b, "a freed block of the same size class was not reused");
    mgpu_cuda_free(0, b);
    expect_ok(mgpu_memory_stats_get(0, &s2), "stats");
    MT_CHECK(s2.reserved == s1.reserved && s2.allocated == s0.allocated && s2.peak >= s1.allocated,
             "steady state: reserved %lld vs %lld, allocated %lld vs %lld", (long long)s2.reserved, (long long)s1.reserved,
             (long long)s2.allocated, (long long)s0.allocated);
    mgpu_clear_error();
    mgpu_cuda_free(0, (void *)(uintptr_t)0x1000);
    MT_CHECK(mgpu_last_result() == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "mgpu_cuda_free"), "a foreign pointer must be reported: %s", mgpu_last_error());
    expect_ok(mgpu_cuda_empty_cache(0), "empty cache");
}

static void test_graph_capture(void) {
    mgpu_cuda_device_ctx dc;
    mgpu_cuda_graph g;
    int64_t n = 10000, i;
    float *h = (float *)malloc(sizeof(float) * (size_t)n), *x, *y;
    memset(&g, 0, sizeof g);
    expect_ok(mgpu_cuda_device_ctx_init(&dc, 0), "device ctx");
    for (i = 0; i < n; i++) h[i] = (float)i;
    x = dev_copy(h, sizeof(float) * (size_t)n); y = dev_nan(n);
    /* the inputs were written on the legacy stream, which the non-blocking capture stream does not wait for */
    expect_ok(cudaDeviceSynchronize() == cudaSuccess ? MGPU_OK : MGPU_ERR_CUDA, "sync before capture");
    expect_ok(mgpu_cuda_graph_begin(&g, dc.stream), "graph begin");
    expect_ok(unary_forward(MGPU__UN_SCALE, 2.0f, x, y, n, dc.stream), "captured scale");
    expect_ok(unary_forward(MGPU__UN_ADD_SCALAR, 1.0f, y, x, n, dc.stream), "captured add");
    expect_ok(mgpu_cuda_graph_end(&g, dc.stream), "graph end");
    for (i = 0; i < 3; i++) expect_ok(mgpu_cuda_graph_launch(&g, dc.stream), "graph launch");
    expect_ok(mgpu_cuda_synchronize(dc.stream), "sync");
    for (i = 0; i < n; i++) { int k; float v = (float)i; for (k = 0; k < 3; k++) v = v * 2.0f + 1.0f; h[i] = v; }
    expect_close("three replays of a captured graph", x, h, n, 0.0);
    mgpu_cuda_graph_destroy(&g);
    mgpu_cuda_device_ctx_release(&dc);
    free(h);
    case_end();
}

static void test_errors(void) {
    float *x = dev_zeros(4);
    mgpu_clear_error();
    MT_CHECK(unary_forward(99, 0, x, x, 4, NULL) == MGPU_ERR_INVALID_ARG, "a bad kind must be rejected");
    MT_CHECK(strstr(mgpu_last_error(), "mgpu_cuda_unary_forward") != NULL, "the error must name the launcher: '%s'", mgpu_last_error());
    MT_CHECK(gemm(NULL, 0, 0, 1, 1, 1, 1, x, 1, x, 1, MGPU_F32, 0, x, 1, 0, NULL, 1) == MGPU_ERR_INVALID_ARG, "NULL blas");
    MT_CHECK(gemm(blas, 0, 0, 4, 4, 4, 1, x, 2, x, 4, MGPU_F32, 0, x, 4, 0, NULL, 1) == MGPU_ERR_INVALID_ARG, "lda too small");
    MT_CHECK(dropout(1, 0, 1.5f, x, x, 4, 0) == MGPU_ERR_INVALID_ARG, "p > 1");
    case_end();
}

int main(void) {
    int ndev = mgpu_cuda_device_count();
    if (ndev < 0) {   /* CUDA is there but fails: never a skip */
        fprintf(stderr, "CUDA failed: %s\n", mgpu_last_error());
        printf("RESULT %s: 0 passed, 1 failed\n", __FILE__);
        return 1;
    }
    if (ndev == 0) {
        printf("SKIPPED: no CUDA device visible (cudaGetDeviceCount returned 0); nothing was run\n");
        printf("RESULT %s: 0 passed, 0 failed\n", __FILE__);
        return 0;
    }
    quick = getenv("MGPU_TEST_QUICK") != NULL;
    cpu = mt_cpu_context(2);
    if (!cpu || mgpu_cuda_blas_create(&blas, NULL, 0) != MGPU_OK) { fprintf(stderr, "setup failed: %s\n", mgpu_last_error()); return 1; }
    mgpu_cuda_blas_set_tf32(blas, 0);
    MT_RUN(test_unary);
    MT_RUN(test_unary_accumulates);
    MT_RUN(test_binary);
    MT_RUN(test_bias);
    MT_RUN(test_softmax);
    MT_RUN(test_cross_entropy_and_nll);
    MT_RUN(test_mse);
    MT_RUN(test_empty_losses);
    MT_RUN(test_rng_bits);
    MT_RUN(test_dropout_matches_cpu);
    MT_RUN(test_dropout_sharded);
    MT_RUN(test_layer_norm);
    MT_RUN(test_batch_norm);
    MT_RUN(test_embedding);
    MT_RUN(test_embedding_bad_ids_and_repeats);
    MT_RUN(test_conv2d);
    MT_RUN(test_pool);
    MT_RUN(test_pool_nan_and_empty_window);
    MT_RUN(test_max_dim_nan);
    MT_RUN(test_transpose);
    MT_RUN(test_concat_narrow);
    MT_RUN(test_copies_every_esize);
    MT_RUN(test_reductions);
    MT_RUN(test_attention);
    MT_RUN(test_linear_gemm);
    MT_RUN(test_gemm_bf16);
    MT_RUN(test_matmul_batched);
    MT_RUN(test_gemm_plan_cache);
    MT_RUN(test_gemm_misaligned);
    MT_RUN(test_casts);
    MT_RUN(test_fills_and_copies);
    MT_RUN(test_optimizers);
    MT_RUN(test_clip_and_finite);
    MT_RUN(test_determinism);
    MT_RUN(test_allocator);
    MT_RUN(test_graph_capture);
    MT_RUN(test_errors);
    mgpu_cuda_blas_destroy(blas);
    mgpu_context_destroy(cpu);
    return MT_END();
}
