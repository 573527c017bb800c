/* Every public op, forward and backward, on a cuda:0 context against the same op on a CPU
   context: the fronts (validation, shapes, arena, tape) with device tensors, not only the
   launchers (tests/gpu/test_cuda_ops.c checks those). Inputs are random, shapes odd; each case
   builds out = op(inputs), seeds backward with a random gradient, and compares the output and
   every input's gradient: ||cuda - cpu|| / ||cpu|| <= 1e-5 (f32), and a NaN on the device where
   the CPU has none never passes. Device activation memory starts as NaN bytes in the emulation,
   so an output a kernel forgets to write cannot pass. Runs on a GPU and under the emulation. */
#define MGPU_IMPLEMENTATION
#include "mgpu.h"
#include "mgpu_test.h"

#define TOL 1e-5
#define HALF_TOL 1e-2

static mgpu_context *cpu, *gpu;
static double tol = TOL;   /* HALF_TOL while autocast runs the GEMMs in half precision */

typedef mgpu_tensor *(*forward_fn)(mgpu_context *c, mgpu_tensor **in);
typedef struct input_spec {
    int ndim; int64_t shape[4];
    int index_below;   /* > 0: an I64 index tensor with values in [0, index_below); 0: F32 requiring grad */
} input_spec;

/* Host copy of a tensor's values as floats (any device). */
static float *host_floats(const mgpu_tensor *t) {
    float *h = (float *)malloc(sizeof(float) * (size_t)(t->numel > 0 ? t->numel : 1));
    MT_CHECK(mgpu_tensor_copy_to_host(t, h, sizeof(float) * (size_t)t->numel) == MGPU_OK, "copy back: %s", mgpu_last_error());
    return h;
}
static double rel_err(const float *got, const float *ref, int64_t n) {
    double num = 0, den = 0;
    int64_t i;
    for (i = 0; i < n; i++) {
        if (isnan(ref[i]) != isnan(got[i])) return INFINITY;
        if (!isfinite(ref[i])) { if (ref[i] != got[i] && !isnan(ref[i])) return INFINITY; continue; }
        num += ((double)got[i] - ref[i]) * ((double)got[i] - ref[i]);
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}
static void compare(const char *op, const char *what, const mgpu_tensor *g, const mgpu_tensor *c) {
    float *hg, *hc;
    double err;
    if (!g || !c) { MT_CHECK(!g && !c, "%s: %s exists on one device only", op, what); return; }
    MT_CHECK(g->numel == c->numel && mgpu_tensor_same_shape(g, c), "%s: %s shapes differ", op, what);
    if (g->numel != c->numel) return;
    hg = host_floats(g); hc = host_floats(c);
    err = rel_err(hg, hc, c->numel);
    MT_CHECK(err <= tol, "%s: %s relative error %.3g > %.0e", op, what, err, tol);
    free(hg); free(hc);
}

/* Runs one case on both contexts with identical inputs, RNG state and output gradient. */
static void run_case(const char *name, int n_in, const input_spec *spec, forward_fn f) {
    mgpu_tensor *ci[4] = {0}, *gi[4] = {0}, *co, *go, *cg, *gg;
    float *seed_grad;
    int i;
    int64_t j;
    for (i = 0; i < n_in; i++) {
        int64_t numel = 1;
        int d;
        for (d = 0; d < spec[i].ndim; d++) numel *= spec[i].shape[d];
        if (spec[i].index_below > 0) {
            int64_t *v = (int64_t *)malloc(sizeof(int64_t) * (size_t)numel);
            for (j = 0; j < numel; j++) v[j] = (int64_t)mt_uniform(0, (double)spec[i].index_below);
            ci[i] = mgpu_tensor_from_host(cpu, MGPU_I64, spec[i].ndim, spec[i].shape, v);
            gi[i] = mgpu_tensor_from_host(gpu, MGPU_I64, spec[i].ndim, spec[i].shape, v);
            free(v);
        } else {
            float *v = (float *)malloc(sizeof(float) * (size_t)numel);
            for (j = 0; j < numel; j++) v[j] = (float)mt_uniform(-2, 2);
            ci[i] = mgpu_tensor_from_host(cpu, MGPU_F32, spec[i].ndim, spec[i].shape, v);
            gi[i] = mgpu_tensor_from_host(gpu, MGPU_F32, spec[i].ndim, spec[i].shape, v);
            free(v);
            mgpu_tensor_set_requires_grad(ci[i], 1);
            mgpu_tensor_set_requires_grad(gi[i], 1);
        }
        MT_CHECK(ci[i] && gi[i], "%s: input %d: %s", name, i, mgpu_last_error());
        if (!ci[i] || !gi[i]) return;
    }
    mgpu_context_set_rng_state(cpu, 42, 7);
    mgpu_context_set_rng_state(gpu, 42, 7);
    co = f(cpu, ci);
    MT_CHECK(co != NULL, "%s on cpu: %s", name, mgpu_last_error());
    go = f(gpu, gi);
    MT_CHECK(go != NULL, "%s on cuda: %s", name, mgpu_last_error());
    if (co && go) {
        compare(name, "output", go, co);
        seed_grad = (float *)malloc(sizeof(float) * (size_t)(co->numel > 0 ? co->numel : 1));
        for (j = 0; j < co->numel; j++) seed_grad[j] = (float)mt_uniform(-1, 1);
        cg = mgpu_tensor_from_host(cpu, MGPU_F32, co->ndim, co->shape, seed_grad);
        gg = mgpu_tensor_from_host(gpu, MGPU_F32, go->ndim, go->shape, seed_grad);
        free(seed_grad);
        MT_CHECK(mgpu_backward_with_grad(cpu, co, cg) == MGPU_OK, "%s backward on cpu: %s", name, mgpu_last_error());
        MT_CHECK(mgpu_backward_with_grad(gpu, go, gg) == MGPU_OK, "%s backward on cuda: %s", name, mgpu_last_error());
        for (i = 0; i < n_in; i++) {
            char what[32];
            if (spec[i].index_below > 0) continue;
            snprintf(what, sizeof what, "grad of input %d", i);
            compare(name, what, gi[i]->grad, ci[i]->grad);
        }
        mgpu_tensor_free(cg); mgpu_tensor_free(gg);
    }
    mgpu_context_end_step(cpu);
    mgpu_context_end_step(gpu);
    for (i = 0; i < n_in; i++) { mgpu_tensor_free(ci[i]); mgpu_tensor_free(gi[i]); }
}

/* ---- the ops, each as a forward over its inputs ---- */
static mgpu_tensor *f_add(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_add(c, in[0], in[1]); }
static mgpu_tensor *f_sub(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_sub(c, in[0], in[1]); }
static mgpu_tensor *f_mul(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_mul(c, in[0], in[1]); }
static mgpu_tensor *f_scale(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_scale(c, in[0], -1.5f); }
static mgpu_tensor *f_add_scalar(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_add_scalar(c, in[0], 0.25f); }
static mgpu_tensor *f_bias_add(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_bias_add(c, in[0], in[1]); }
static mgpu_tensor *f_relu(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_relu(c, in[0]); }
static mgpu_tensor *f_gelu(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_gelu(c, in[0]); }
static mgpu_tensor *f_gelu_tanh(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_gelu_tanh(c, in[0]); }
static mgpu_tensor *f_elu(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_elu(c, in[0], 0.7f); }
static mgpu_tensor *f_tanh(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_tanh(c, in[0]); }
static mgpu_tensor *f_sigmoid(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_sigmoid(c, in[0]); }
static mgpu_tensor *f_softmax(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_softmax(c, in[0], 1); }
static mgpu_tensor *f_log_softmax(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_log_softmax(c, in[0], 0); }
static mgpu_tensor *f_cross_entropy(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_cross_entropy(c, in[0], in[1]); }
static mgpu_tensor *f_nll(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_nll_loss(c, mgpu_op_log_softmax(c, in[0], 1), in[1]); }
static mgpu_tensor *f_mse(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_mse_loss(c, in[0], in[1]); }
static mgpu_tensor *f_dropout(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_dropout(c, in[0], 0.3f, 1); }
static mgpu_tensor *f_sum(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_sum(c, in[0]); }
static mgpu_tensor *f_mean(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_mean(c, in[0]); }
static mgpu_tensor *f_sum_dim(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_sum_dim(c, in[0], 1, 0); }
static mgpu_tensor *f_mean_dim(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_mean_dim(c, in[0], -1, 1); }
static mgpu_tensor *f_max_dim(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_max_dim(c, in[0], 1, 0); }
static mgpu_tensor *f_reshape(mgpu_context *c, mgpu_tensor **in) { int64_t s[2] = {-1, 5}; return mgpu_op_tanh(c, mgpu_op_reshape(c, in[0], 2, s)); }
static mgpu_tensor *f_flatten(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_sigmoid(c, mgpu_op_flatten(c, in[0], 1)); }
static mgpu_tensor *f_transpose(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_transpose(c, in[0], 0, 2); }
static mgpu_tensor *f_concat(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_concat(c, in, 3, 1); }
/* a view with an offset feeding a GEMM */
static mgpu_tensor *f_narrow_matmul(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_matmul(c, mgpu_op_narrow(c, in[0], 0, 3, 5), in[1]); }
static mgpu_tensor *f_matmul(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_matmul(c, in[0], in[1]); }
static mgpu_tensor *f_linear(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_linear(c, in[0], in[1], in[2]); }
static mgpu_tensor *f_linear_nobias(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_linear(c, in[0], in[1], NULL); }
static mgpu_tensor *f_conv(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_conv2d(c, in[0], in[1], in[2], 2, 1); }
static mgpu_tensor *f_conv_nobias(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_conv2d(c, in[0], in[1], NULL, 1, 0); }
static mgpu_tensor *f_max_pool(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_max_pool2d(c, in[0], 3, 2, 1); }
static mgpu_tensor *f_avg_pool(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_avg_pool2d(c, in[0], 2, 0, 0); }
static mgpu_tensor *f_layer_norm(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_layer_norm(c, in[0], in[1], in[2], 1e-5f); }
static mgpu_tensor *f_batch_norm(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_batch_norm(c, in[0], in[1], in[2], NULL, NULL, 1, 0.1f, 1e-5f); }
static mgpu_tensor *f_embedding(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_embedding(c, in[0], in[1]); }
static mgpu_tensor *f_attention(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_attention(c, in[0], in[1], in[2], 0); }
static mgpu_tensor *f_attention_causal(mgpu_context *c, mgpu_tensor **in) { return mgpu_op_attention(c, in[0], in[1], in[2], 1); }
/* a small network: linear -> relu -> dropout -> linear -> cross-entropy */
static mgpu_tensor *f_mlp(mgpu_context *c, mgpu_tensor **in) {
    mgpu_tensor *h = mgpu_op_dropout(c, mgpu_op_relu(c, mgpu_op_linear(c, in[0], in[1], NULL)), 0.2f, 1);
    return mgpu_op_cross_entropy(c, mgpu_op_linear(c, h, in[2], NULL), in[3]);
}

#define SPEC(nd, ...) {nd, {__VA_ARGS__}, 0}
#define INDEX(below, nd, ...) {nd, {__VA_ARGS__}, below}
#define CASE(fn, ...) do { const input_spec s_[] = {__VA_ARGS__}; \
    run_case(#fn, (int)(sizeof s_ / sizeof s_[0]), s_, fn); } while (0)

static void test_elementwise(void) {
    CASE(f_add, SPEC(2, 7, 13), SPEC(2, 7, 13));
    CASE(f_add, SPEC(3, 3, 5, 7), SPEC(1, 7));      /* broadcasting */
    CASE(f_sub, SPEC(2, 7, 1), SPEC(2, 1, 9));
    CASE(f_mul, SPEC(2, 11, 6), SPEC(2, 11, 6));
    CASE(f_scale, SPEC(1, 1001));
    CASE(f_add_scalar, SPEC(2, 3, 33));
    CASE(f_bias_add, SPEC(3, 2, 5, 9), SPEC(1, 9));
    CASE(f_relu, SPEC(2, 17, 19));
    CASE(f_gelu, SPEC(1, 777));
    CASE(f_gelu_tanh, SPEC(1, 777));
    CASE(f_elu, SPEC(2, 9, 10));
    CASE(f_tanh, SPEC(1, 1025));
    CASE(f_sigmoid, SPEC(1, 1025));
    CASE(f_dropout, SPEC(2, 13, 31));
}
static void test_softmax_and_losses(void) {
    CASE(f_softmax, SPEC(3, 4, 17, 3));
    CASE(f_log_softmax, SPEC(2, 9, 5));
    CASE(f_cross_entropy, SPEC(2, 37, 10), INDEX(10, 1, 37));
    CASE(f_nll, SPEC(2, 19, 7), INDEX(7, 1, 19));
    CASE(f_mse, SPEC(2, 8, 13), SPEC(2, 8, 13));
}
static void test_reductions_and_shapes(void) {
    CASE(f_sum, SPEC(1, 5000));
    CASE(f_mean, SPEC(3, 3, 7, 11));
    CASE(f_sum_dim, SPEC(3, 4, 9, 5));
    CASE(f_mean_dim, SPEC(2, 6, 13));
    CASE(f_max_dim, SPEC(3, 3, 8, 5));
    CASE(f_reshape, SPEC(3, 2, 3, 5));
    CASE(f_flatten, SPEC(4, 2, 3, 4, 5));
    CASE(f_transpose, SPEC(3, 3, 4, 5));
    CASE(f_concat, SPEC(2, 4, 3), SPEC(2, 4, 1), SPEC(2, 4, 6));
    CASE(f_narrow_matmul, SPEC(2, 11, 6), SPEC(2, 6, 7));
}
static void test_gemm_and_conv(void) {
    CASE(f_matmul, SPEC(2, 13, 17), SPEC(2, 17, 9));
    CASE(f_matmul, SPEC(3, 3, 5, 7), SPEC(3, 3, 7, 4));     /* batched */
    CASE(f_linear, SPEC(2, 33, 20), SPEC(2, 15, 20), SPEC(1, 15));
    CASE(f_linear_nobias, SPEC(3, 2, 9, 8), SPEC(2, 5, 8));
    CASE(f_conv, SPEC(4, 2, 3, 9, 7), SPEC(4, 5, 3, 3, 3), SPEC(1, 5));
    CASE(f_conv_nobias, SPEC(4, 3, 2, 6, 6), SPEC(4, 4, 2, 2, 2));
    CASE(f_max_pool, SPEC(4, 2, 3, 9, 8));
    CASE(f_avg_pool, SPEC(4, 2, 2, 8, 6));
}
static void test_norms_embedding_attention(void) {
    CASE(f_layer_norm, SPEC(3, 3, 5, 24), SPEC(1, 24), SPEC(1, 24));
    CASE(f_batch_norm, SPEC(4, 5, 3, 4, 4), SPEC(1, 3), SPEC(1, 3));
    CASE(f_batch_norm, SPEC(2, 17, 6), SPEC(1, 6), SPEC(1, 6));
    CASE(f_embedding, SPEC(2, 11, 8), INDEX(11, 2, 5, 7));
    CASE(f_attention, SPEC(4, 2, 3, 5, 8), SPEC(4, 2, 3, 7, 8), SPEC(4, 2, 3, 7, 8));
    CASE(f_attention_causal, SPEC(4, 1, 2, 9, 4), SPEC(4, 1, 2, 9, 4), SPEC(4, 1, 2, 9, 4));
}
static void test_small_network(void) {
    CASE(f_mlp, SPEC(2, 32, 20), SPEC(2, 24, 20), SPEC(2, 10, 24), INDEX(10, 1, 32));
}
/* autocast: on cuda:0 linear, matmul and conv2d multiply in real bf16/fp16 (the operands autocast rounded,
   cast exactly), the CPU multiplies the same rounded values in f32 */
static void test_autocast_half_gemms(void) {
    mgpu_amp_mode modes[2] = {MGPU_AMP_BF16, MGPU_AMP_FP16};
    int i;
    tol = HALF_TOL;
    for (i = 0; i < 2; i++) {
        mgpu_context_set_autocast(cpu, modes[i]);
        mgpu_context_set_autocast(gpu, modes[i]);
        CASE(f_linear, SPEC(2, 33, 40), SPEC(2, 24, 40), SPEC(1, 24));
        CASE(f_matmul, SPEC(3, 2, 9, 16), SPEC(3, 2, 16, 8));
        CASE(f_mlp, SPEC(2, 32, 20), SPEC(2, 24, 20), SPEC(2, 10, 24), INDEX(10, 1, 32));
        CASE(f_conv, SPEC(4, 2, 3, 9, 7), SPEC(4, 5, 3, 3, 3), SPEC(1, 5));
        CASE(f_conv_nobias, SPEC(4, 3, 2, 6, 6), SPEC(4, 4, 2, 2, 2));
    }
    mgpu_context_set_autocast(cpu, MGPU_AMP_OFF);
    mgpu_context_set_autocast(gpu, MGPU_AMP_OFF);
    tol = TOL;
}
/* count_correct on device logits: the evaluation path */
static void test_count_correct(void) {
    float logits[12] = {0, 1, 2, 3, 2, 1, 1, 1, 0, 0, 0, 5};
    int64_t targets[4] = {2, 0, 0, 1}, s2[2] = {4, 3}, s1[1] = {4};
    mgpu_tensor *l = mgpu_tensor_from_host(gpu, MGPU_F32, 2, s2, logits), *t = mgpu_tensor_from_host(gpu, MGPU_I64, 1, s1, targets);
    MT_CHECK(mgpu_count_correct(l, t) == 3, "count_correct on cuda: %lld (%s)", (long long)mgpu_count_correct(l, t), mgpu_last_error());
    mgpu_tensor_free(l); mgpu_tensor_free(t);
}
/* a tensor goes to the device and back unchanged, in every dtype; item reads a device scalar */
static void test_round_trip(void) {
    mgpu_dtype dts[6] = {MGPU_F32, MGPU_F16, MGPU_BF16, MGPU_I32, MGPU_I64, MGPU_U8};
    unsigned char src[8 * 37], back[8 * 37];
    int64_t shape[1] = {37};
    int i, d;
    for (i = 0; i < (int)sizeof src; i++) src[i] = (unsigned char)(i * 7 + 3);
    for (d = 0; d < 6; d++) {
        mgpu_tensor *h = mgpu_tensor_from_host(cpu, dts[d], 1, shape, src);
        mgpu_tensor *g = mgpu_tensor_to(gpu, h), *h2 = g ? mgpu_tensor_to(cpu, g) : NULL;
        MT_CHECK(g && g->device.type == MGPU_DEVICE_CUDA && h2, "%s round trip: %s", mgpu_dtype_name(dts[d]), mgpu_last_error());
        if (h2) MT_CHECK(memcmp(h2->data, src, mgpu_tensor_nbytes(h)) == 0, "%s came back changed", mgpu_dtype_name(dts[d]));
        if (g) {
            memset(back, 0, sizeof back);
            MT_CHECK(mgpu_tensor_copy_to_host(g, back, sizeof back) == MGPU_OK && memcmp(back, src, mgpu_tensor_nbytes(h)) == 0,
                     "%s copy_to_host", mgpu_dtype_name(dts[d]));
            MT_CHECK(mgpu_tensor_item(g) == mgpu_tensor_item(h), "%s item %g vs %g", mgpu_dtype_name(dts[d]), mgpu_tensor_item(g), mgpu_tensor_item(h));
        }
        mgpu_tensor_free(h); mgpu_tensor_free(g); mgpu_tensor_free(h2);
    }
    {   /* created tensors are zeros on the device too */
        mgpu_tensor *z = mgpu_tensor_create(gpu, MGPU_F32, 1, shape);
        float zb[37];
        memset(zb, 0xff, sizeof zb);
        MT_CHECK(z && mgpu_tensor_copy_to_host(z, zb, sizeof zb) == MGPU_OK && zb[0] == 0.0f && zb[36] == 0.0f, "create on cuda is not zeroed");
        mgpu_tensor_free(z);
    }
}
/* an op mixing devices names the argument instead of reading the wrong memory */
static void test_device_mismatch(void) {
    int64_t s[1] = {4};
    mgpu_tensor *a = mgpu_tensor_create(cpu, MGPU_F32, 1, s), *b = mgpu_tensor_create(gpu, MGPU_F32, 1, s);
    MT_CHECK(mgpu_op_add(gpu, b, a) == NULL && strstr(mgpu_last_error(), "another device"), "mixed devices: %s", mgpu_last_error());
    mgpu_context_end_step(gpu);
    mgpu_tensor_free(a); mgpu_tensor_free(b);
}

int main(void) {
    mgpu_context_desc cd = {0}, gd = {0};
    int n = mgpu_cuda_device_count();
    if (n <= 0) {
        printf("ops_api_cuda: no CUDA device%s: SKIPPED\n", n < 0 ? " (CUDA failed)" : "");
        printf("RESULT %s: 0 passed, %d failed, 1 skipped\n", __FILE__, n < 0);
        return n < 0;
    }
    cd.seed = gd.seed = 42;
    gd.device.type = MGPU_DEVICE_CUDA;
    cpu = mgpu_context_create(&cd);
    gpu = mgpu_context_create(&gd);
    if (!cpu || !gpu) { fprintf(stderr, "contexts: %s\n", mgpu_last_error()); return 1; }
    MT_RUN(test_round_trip);
    MT_RUN(test_elementwise);
    MT_RUN(test_softmax_and_losses);
    MT_RUN(test_reductions_and_shapes);
    MT_RUN(test_gemm_and_conv);
    MT_RUN(test_norms_embedding_attention);
    MT_RUN(test_small_network);
    MT_RUN(test_autocast_half_gemms);
    MT_RUN(test_count_correct);
    MT_RUN(test_device_mismatch);
    mgpu_context_destroy(gpu);
    mgpu_context_destroy(cpu);
    return MT_END();
}
