/* Models, layers, initialisation, optimizers, clipping, LR schedules and scaling.
   Expected values come from PyTorch's documented formulas, recomputed here in double precision. */
#include "mgpu_test.h"

#define NN_PI 3.14159265358979323846

static int nn_quick(void) {
    const char *q = getenv("MGPU_TEST_QUICK");
    return q && *q && strcmp(q, "0") != 0;
}

static int nn_close(double got, double want, double tol) { return fabs(got - want) <= tol * (1.0 + fabs(want)); }

/* Whether the last failure is an op another part has not implemented yet: the caller skips with a note. */
static int nn_op_missing(const mgpu_tensor *out, const char *what) {
    if (out || mgpu_last_result() != MGPU_ERR_UNSUPPORTED || !strstr(mgpu_last_error(), "not implemented yet")) return 0;
    printf("  note: %s skipped, an op it needs is not implemented yet (%s)\n", what, mgpu_last_error());
    return 1;
}

/* Checks the model's parameter (or buffer) names and shapes against an expected list; shapes are
   written as ndim followed by the dims. */
static void nn_expect_tensors(const mgpu_model *m, int buffers, int n, const char *const *names, const int64_t *shapes) {
    int i, d, got = buffers ? mgpu_model_num_buffers(m) : mgpu_model_num_parameters(m);
    const int64_t *s = shapes;
    MT_CHECK(got == n, "%s count %d, want %d", buffers ? "buffer" : "parameter", got, n);
    for (i = 0; i < n && i < got; i++) {
        const char *name = NULL;
        mgpu_tensor *t = buffers ? mgpu_model_buffer(m, i, &name) : mgpu_model_parameter(m, i, &name);
        int ndim = (int)*s++;
        MT_CHECK(t && name && strcmp(name, names[i]) == 0, "entry %d is '%s', want '%s'", i, name ? name : "(null)", names[i]);
        if (!t) { s += ndim; continue; }
        MT_CHECK(t->ndim == ndim, "'%s' ndim %d, want %d", names[i], t->ndim, ndim);
        for (d = 0; d < ndim; d++, s++) MT_CHECK(d >= t->ndim || t->shape[d] == *s, "'%s' dim %d is %lld, want %lld", names[i], d, (long long)t->shape[d], (long long)*s);
        MT_CHECK(buffers || t->requires_grad, "parameter '%s' requires grad", names[i]);
    }
}

static int nn_all_equal(const mgpu_tensor *t, float v) {
    int64_t i;
    for (i = 0; i < t->numel; i++) if (((const float *)t->data)[i] != v) return 0;
    return 1;
}

/* ---------------------------------------------------------------- model registry */

static void test_model_registry(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    mgpu_model *m = mgpu_model_create(ctx), *m2 = mgpu_model_create(ctx);
    int64_t s23[2] = {2, 3}, s3[1] = {3}, s4[1] = {4};
    mgpu_tensor *a, *b, *buf;
    const char *name = NULL;
    MT_CHECK(m && mgpu_model_is_training(m) == 1, "training by default");
    a = mgpu_model_add_parameter(m, "a.weight", MGPU_F32, 2, s23);
    b = mgpu_model_add_parameter(m, "a.bias", MGPU_F32, 1, s3);
    buf = mgpu_model_add_buffer(m, "a.count", MGPU_I64, 0, NULL);
    MT_CHECK(a && b && buf && a->requires_grad && !buf->requires_grad && buf->ndim == 0, "registered");
    MT_CHECK(mgpu_model_num_parameters(m) == 2 && mgpu_model_num_buffers(m) == 1, "counts");
    MT_CHECK(mgpu_model_parameter_count(m) == 9, "parameter_count %lld", (long long)mgpu_model_parameter_count(m));
    MT_CHECK(mgpu_model_parameter(m, 1, &name) == b && strcmp(name, "a.bias") == 0, "order");
    MT_CHECK(mgpu_model_find(m, "a.count") == buf && mgpu_model_find(m, "a.weight") == a, "find");
    MT_CHECK(mgpu_model_find(m, "nope") == NULL && strstr(mgpu_last_error(), "nope"), "find missing: %s", mgpu_last_error());
    MT_CHECK(mgpu_model_context(m) == ctx, "context");

    /* errors: duplicates (across parameters and buffers), NULL arguments, bad dtype, bad index */
    MT_CHECK(mgpu_model_add_parameter(m, "a.bias", MGPU_F32, 1, s3) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG &&
             strstr(mgpu_last_error(), "a.bias"), "duplicate named: %s", mgpu_last_error());
    MT_CHECK(mgpu_model_add_buffer(m, "a.weight", MGPU_F32, 1, s3) == NULL && strstr(mgpu_last_error(), "a.weight"), "duplicate across kinds");
    MT_CHECK(mgpu_model_add_parameter(NULL, "x", MGPU_F32, 1, s3) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "NULL model");
    MT_CHECK(mgpu_model_add_parameter(m, NULL, MGPU_F32, 1, s3) == NULL && strstr(mgpu_last_error(), "name"), "NULL name");
    MT_CHECK(mgpu_model_add_parameter(m, "", MGPU_F32, 1, s3) == NULL, "empty name");
    MT_CHECK(mgpu_model_add_parameter(m, "idx", MGPU_I64, 1, s3) == NULL && strstr(mgpu_last_error(), "idx"), "int parameter rejected");
    MT_CHECK(mgpu_model_add_parameter(m, "neg", MGPU_F32, 1, NULL) == NULL && strstr(mgpu_last_error(), "neg"), "NULL shape names tensor: %s", mgpu_last_error());
    MT_CHECK(mgpu_model_parameter(m, 2, NULL) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "index out of range");
    MT_CHECK(mgpu_model_create(NULL) == NULL && strstr(mgpu_last_error(), "ctx"), "NULL ctx");
    MT_CHECK(mgpu_model_num_parameters(m) == 2, "failed adds leave the model as it was");
    MT_CHECK(mgpu_linear_create(m, NULL, 2, 3, 1) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "layer with NULL name");
    MT_CHECK(mgpu_linear_create(NULL, "x", 2, 3, 1) == NULL, "layer with NULL model");
    MT_CHECK(mgpu_linear_create(m, "x", 0, 3, 1) == NULL && strstr(mgpu_last_error(), "in_features"), "zero in_features");
    MT_CHECK(mgpu_linear_forward(ctx, NULL, a) == NULL && strstr(mgpu_last_error(), "layer"), "NULL layer forward");

    /* zero_grad keeps the buffer, zeroes in place */
    a->grad = mgpu_tensor_create(ctx, MGPU_F32, 2, s23);
    mgpu_tensor_fill(a->grad, 3.0);
    {
        mgpu_tensor *g = a->grad;
        MT_CHECK(mgpu_model_zero_grad(m) == MGPU_OK && a->grad == g && nn_all_equal(a->grad, 0.0f), "zero_grad in place");
    }
    mgpu_model_train(m, 0);
    MT_CHECK(mgpu_model_is_training(m) == 0, "eval");

    /* copy_state: same names/shapes copies; a mismatch names the tensor and leaves dst untouched */
    {
        mgpu_tensor *a2 = mgpu_model_add_parameter(m2, "a.weight", MGPU_F32, 2, s23);
        mgpu_tensor *b2 = mgpu_model_add_parameter(m2, "a.bias", MGPU_F32, 1, s3);
        mgpu_tensor *c2 = mgpu_model_add_buffer(m2, "a.count", MGPU_I64, 0, NULL);
        mgpu_tensor_fill(a, 1.5); mgpu_tensor_fill(b, -2.0); ((int64_t *)buf->data)[0] = 7;
        MT_CHECK(mgpu_model_copy_state(m2, m) == MGPU_OK, "copy: %s", mgpu_last_error());
        MT_CHECK(nn_all_equal(a2, 1.5f) && nn_all_equal(b2, -2.0f) && ((int64_t *)c2->data)[0] == 7, "copied values");
        {
            mgpu_model *m3 = mgpu_model_create(ctx);
            mgpu_tensor *w3 = mgpu_model_add_parameter(m3, "a.weight", MGPU_F32, 2, s23);
            mgpu_model_add_parameter(m3, "a.bias", MGPU_F32, 1, s4);
            mgpu_model_add_buffer(m3, "a.count", MGPU_I64, 0, NULL);
            MT_CHECK(mgpu_model_copy_state(m3, m) == MGPU_ERR_SHAPE && strstr(mgpu_last_error(), "a.bias"), "shape mismatch named: %s", mgpu_last_error());
            MT_CHECK(nn_all_equal(w3, 0.0f), "dst untouched on mismatch");
            mgpu_model_destroy(m3);
        }
    }
    MT_CHECK(mgpu_model_copy_state(NULL, m) == MGPU_ERR_INVALID_ARG, "NULL dst");
    mgpu_model_destroy(m);
    mgpu_model_destroy(m2);
    mgpu_model_destroy(NULL);
    mgpu_context_destroy(ctx);
}

/* A constructor that fails half-way (its bias name is taken) leaves nothing behind. */
static void test_layer_rollback(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    mgpu_model *m = mgpu_model_create(ctx);
    int64_t s[1] = {3};
    uint64_t off_before, off_after;
    mgpu_model_add_parameter(m, "fc.bias", MGPU_F32, 1, s);
    mgpu_context_rng_state(ctx, NULL, &off_before);
    MT_CHECK(mgpu_linear_create(m, "fc", 4, 3, 1) == NULL && strstr(mgpu_last_error(), "fc.bias"), "collision named: %s", mgpu_last_error());
    mgpu_context_rng_state(ctx, NULL, &off_after);
    MT_CHECK(mgpu_model_num_parameters(m) == 1 && mgpu_model_find(m, "fc.weight") == NULL, "weight rolled back");
    MT_CHECK(off_before == off_after, "init stream rolled back");
    MT_CHECK(mgpu_transformer_layer_create(m, "fc", 8, 2, 16, 0.1f, 0) != NULL, "other names still free: %s", mgpu_last_error());
    MT_CHECK(mgpu_transformer_layer_create(m, "fc", 8, 2, 16, 0.1f, 0) == NULL && mgpu_model_num_parameters(m) == 13, "duplicate layer rolled back");
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
}

/* ---------------------------------------------------------------- layer parameters (state_dict order) */

static void test_linear_conv_params(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    mgpu_model *m = mgpu_model_create(ctx);
    static const char *const names[] = {"fc1.weight", "fc1.bias", "fc2.weight", "conv1.weight", "conv1.bias"};
    static const int64_t shapes[] = {2, 256, 784, 1, 256, 2, 10, 256, 4, 16, 3, 5, 5, 1, 16};
    mgpu_linear *fc1 = mgpu_linear_create(m, "fc1", 784, 256, 1);
    mgpu_linear *fc2 = mgpu_linear_create(m, "fc2", 256, 10, 0);
    mgpu_conv2d *c = mgpu_conv2d_create(m, "conv1", 3, 16, 5, 2, 1, 1);
    MT_CHECK(fc1 && fc2 && c, "created: %s", mgpu_last_error());
    nn_expect_tensors(m, 0, 5, names, shapes);
    MT_CHECK(mgpu_model_num_buffers(m) == 0, "no buffers");
    MT_CHECK(fc2 && fc2->bias == NULL && fc2->in_features == 256 && fc2->out_features == 10, "no bias");
    MT_CHECK(c && c->kernel == 5 && c->stride == 2 && c->padding == 1, "conv fields");
    MT_CHECK(mgpu_conv2d_create(m, "bad", 3, 16, 3, 0, 0, 1) == NULL && strstr(mgpu_last_error(), "stride"), "stride 0 rejected");
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
}

static void test_norm_embedding_params(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    mgpu_model *m = mgpu_model_create(ctx);
    static const char *const pnames[] = {"bn1.weight", "bn1.bias", "ln.weight", "ln.bias", "emb.weight"};
    static const int64_t pshapes[] = {1, 8, 1, 8, 1, 6, 1, 6, 2, 50, 6};
    static const char *const bnames[] = {"bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"};
    static const int64_t bshapes[] = {1, 8, 1, 8, 0};
    mgpu_batchnorm2d *bn = mgpu_batchnorm2d_create(m, "bn1", 8);
    mgpu_layernorm *ln = mgpu_layernorm_create(m, "ln", 6);
    mgpu_embedding *emb = mgpu_embedding_create(m, "emb", 50, 6);
    MT_CHECK(bn && ln && emb, "created: %s", mgpu_last_error());
    nn_expect_tensors(m, 0, 5, pnames, pshapes);
    nn_expect_tensors(m, 1, 3, bnames, bshapes);
    if (bn) {
        MT_CHECK(nn_all_equal(bn->weight, 1.0f) && nn_all_equal(bn->bias, 0.0f), "bn affine init");
        MT_CHECK(nn_all_equal(bn->running_mean, 0.0f) && nn_all_equal(bn->running_var, 1.0f), "bn running stats init");
        MT_CHECK(bn->num_batches_tracked->dtype == MGPU_I64 && bn->num_batches_tracked->ndim == 0 &&
                 ((int64_t *)bn->num_batches_tracked->data)[0] == 0, "num_batches_tracked I64 scalar 0");
        MT_CHECK(bn->eps == 1e-5f && fabsf(bn->momentum - 0.1f) < 1e-9f, "bn eps/momentum");
    }
    if (ln) MT_CHECK(nn_all_equal(ln->weight, 1.0f) && nn_all_equal(ln->bias, 0.0f) && ln->eps == 1e-5f, "ln init");
    MT_CHECK(mgpu_dropout_create(m, 1.5f) == NULL && strstr(mgpu_last_error(), "1.5"), "dropout p > 1 rejected");
    MT_CHECK(mgpu_dropout_create(m, 0.25f) != NULL && mgpu_model_num_parameters(m) == 5, "dropout has no parameters");
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
}

static void test_attention_params(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    mgpu_model *m = mgpu_model_create(ctx);
    /* nn.MultiheadAttention(16, 4) then nn.TransformerEncoderLayer(16, 4, 32) state_dict keys */
    static const char *const names[] = {
        "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
        "layers.0.self_attn.in_proj_weight", "layers.0.self_attn.in_proj_bias", "layers.0.self_attn.out_proj.weight",
        "layers.0.self_attn.out_proj.bias", "layers.0.linear1.weight", "layers.0.linear1.bias", "layers.0.linear2.weight",
        "layers.0.linear2.bias", "layers.0.norm1.weight", "layers.0.norm1.bias", "layers.0.norm2.weight", "layers.0.norm2.bias"};
    static const int64_t shapes[] = {2, 48, 16, 1, 48, 2, 16, 16, 1, 16,
                                     2, 48, 16, 1, 48, 2, 16, 16, 1, 16, 2, 32, 16, 1, 32, 2, 16, 32, 1, 16, 1, 16, 1, 16, 1, 16, 1, 16};
    mgpu_mha *mha = mgpu_mha_create(m, "attn", 16, 4);
    mgpu_transformer_layer *tl = mgpu_transformer_layer_create(m, "layers.0", 16, 4, 32, 0.1f, 1);
    MT_CHECK(mha && tl, "created: %s", mgpu_last_error());
    nn_expect_tensors(m, 0, 16, names, shapes);
    if (mha) {
        float bound = sqrtf(6.0f / (16 + 48)), lin = 1.0f / sqrtf(16.0f), mx = 0;
        int64_t i;
        const float *w = mgpu_tensor_f32(mha->in_proj_weight);
        for (i = 0; i < mha->in_proj_weight->numel; i++) mx = fmaxf(mx, fabsf(w[i]));
        MT_CHECK(mx <= bound && mx > 0.9f * bound, "xavier bound %g, max %g", bound, mx);
        MT_CHECK(nn_all_equal(mha->in_proj_bias, 0.0f) && nn_all_equal(mha->out_proj->bias, 0.0f), "zero biases");
        w = mgpu_tensor_f32(mha->out_proj->weight);
        for (i = 0, mx = 0; i < mha->out_proj->weight->numel; i++) mx = fmaxf(mx, fabsf(w[i]));
        MT_CHECK(mx <= lin && mx > 0.8f * lin, "out_proj as Linear: bound %g, max %g", lin, mx);
    }
    if (tl) MT_CHECK(tl->norm_first == 1 && fabsf(tl->dropout - 0.1f) < 1e-9f && tl->norm1->eps == 1e-5f, "layer fields");
    MT_CHECK(mgpu_mha_create(m, "bad", 10, 3) == NULL && strstr(mgpu_last_error(), "num_heads"), "indivisible heads rejected");
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
}

/* ---------------------------------------------------------------- initialisation */

static mgpu_model *nn_init_model(uint64_t seed, int threads, int64_t in, int64_t out) {
    mgpu_context_desc d;
    mgpu_model *m;
    memset(&d, 0, sizeof d);
    d.seed = seed; d.num_threads = threads;
    m = mgpu_model_create(mgpu_context_create(&d));
    mgpu_linear_create(m, "fc1", in, out, 1);
    mgpu_linear_create(m, "fc2", in, out, 1);
    mgpu_conv2d_create(m, "conv", 4, 8, 3, 1, 1, 1);
    return m;
}
static void nn_free_model(mgpu_model *m) {
    mgpu_context *ctx = mgpu_model_context(m);
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
}
static int nn_same_params(const mgpu_model *a, const mgpu_model *b, int i) {
    const mgpu_tensor *x = mgpu_model_parameter(a, i, NULL), *y = mgpu_model_parameter(b, i, NULL);
    return x && y && x->numel == y->numel && memcmp(x->data, y->data, mgpu_tensor_nbytes(x)) == 0;
}

static void test_init_bounds(void) {
    int64_t in = 256, out = nn_quick() ? 256 : 2048, i;
    mgpu_model *m = nn_init_model(42, 2, in, out), *same = nn_init_model(42, 1, in, out), *other = nn_init_model(7, 2, in, out);
    const mgpu_tensor *w = mgpu_model_find(m, "fc1.weight"), *b = mgpu_model_find(m, "fc1.bias");
    const mgpu_tensor *cw = mgpu_model_find(m, "conv.weight");
    double bound = 1.0 / sqrt((double)in), cbound = 1.0 / sqrt(4.0 * 9.0), mx = 0, sum = 0, sumabs = 0;
    int k;
    MT_CHECK(w && b && cw, "built: %s", mgpu_last_error());
    if (!w || !b || !cw) return;
    for (i = 0; i < w->numel; i++) {
        double v = ((const float *)w->data)[i];
        mx = fmax(mx, fabs(v)); sum += v; sumabs += fabs(v);
    }
    MT_CHECK(mx <= bound, "weight within 1/sqrt(fan_in) = %g: max %g", bound, mx);
    MT_CHECK(mx > 0.9995 * bound, "weight spreads to the bound: max %g of %g", mx, bound);
    MT_CHECK(fabs(sum / (double)w->numel) < 0.01 * bound, "mean %g near 0", sum / (double)w->numel);
    MT_CHECK(fabs(sumabs / (double)w->numel - bound / 2) < 0.01 * bound, "uniform: mean |w| %g ~ bound/2", sumabs / (double)w->numel);
    for (i = 0, mx = 0; i < b->numel; i++) mx = fmax(mx, fabs(((const float *)b->data)[i]));
    MT_CHECK(mx <= bound && mx > 0.9 * bound, "bias bound %g max %g", bound, mx);
    for (i = 0, mx = 0; i < cw->numel; i++) mx = fmax(mx, fabs(((const float *)cw->data)[i]));
    MT_CHECK(mx <= cbound && mx > 0.9 * cbound, "conv fan_in C*k*k: bound %g max %g", cbound, mx);
    for (k = 0; k < mgpu_model_num_parameters(m); k++) {
        MT_CHECK(nn_same_params(m, same, k), "param %d reproducible from the seed (and thread count independent)", k);
        MT_CHECK(!nn_same_params(m, other, k), "param %d differs with another seed", k);
    }
    MT_CHECK(memcmp(mgpu_model_find(m, "fc1.weight")->data, mgpu_model_find(m, "fc2.weight")->data, mgpu_tensor_nbytes(w)) != 0,
             "two layers draw different numbers");
    nn_free_model(m); nn_free_model(same); nn_free_model(other);

    /* Embedding ~ N(0, 1) and the initialisers' argument checks */
    {
        mgpu_context *ctx = mt_cpu_context(2);
        mgpu_model *em = mgpu_model_create(ctx);
        int64_t v = nn_quick() ? 1000 : 8000;
        mgpu_embedding *e = mgpu_embedding_create(em, "tok", v, 64);
        double s = 0, sq = 0;
        int64_t shape[1] = {4};
        mgpu_tensor *ti = mgpu_tensor_create(ctx, MGPU_I32, 1, shape);
        MT_CHECK(e != NULL, "embedding: %s", mgpu_last_error());
        if (e) {
            const float *x = mgpu_tensor_f32(e->weight);
            for (i = 0; i < e->weight->numel; i++) { s += x[i]; sq += (double)x[i] * x[i]; }
            s /= (double)e->weight->numel; sq = sq / (double)e->weight->numel - s * s;
            MT_CHECK(fabs(s) < 0.02 && fabs(sq - 1) < 0.03, "N(0,1): mean %g var %g", s, sq);
        }
        MT_CHECK(mgpu_init_uniform(ctx, ti, 0, 1) == MGPU_ERR_UNSUPPORTED, "int tensor rejected");
        MT_CHECK(mgpu_init_uniform(ctx, e ? e->weight : NULL, 1, 0) == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "lo"), "lo > hi");
        MT_CHECK(mgpu_init_normal(ctx, e ? e->weight : NULL, 0, -1) == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "std"), "negative std");
        MT_CHECK(mgpu_init_normal(NULL, e ? e->weight : NULL, 0, 1) == MGPU_ERR_INVALID_ARG, "NULL ctx");
        mgpu_tensor_free(ti);
        mgpu_model_destroy(em);
        mgpu_context_destroy(ctx);
    }
}

/* ---------------------------------------------------------------- optimizers vs hand formulas */

#define NN_N 4
static const double nn_p0[NN_N] = {1.0, -2.0, 0.5, 3.0};
static const double nn_g0[NN_N] = {0.1, -0.2, 0.3, 0.05};
/* The gradient changes every step so momentum and moments are exercised: g_t = g0 * (1 + t/2) - 0.05 t. */
static double nn_grad_at(int i, int t) { return nn_g0[i] * (1.0 + 0.5 * t) - 0.05 * t; }

typedef struct nn_opt_fixture { mgpu_context *ctx; mgpu_model *m; mgpu_tensor *p; mgpu_optimizer *o; } nn_opt_fixture;

static nn_opt_fixture nn_opt_setup(const mgpu_optimizer_desc *d) {
    nn_opt_fixture f;
    int64_t s[1] = {NN_N};
    int i;
    f.ctx = mt_cpu_context(2);
    f.m = mgpu_model_create(f.ctx);
    f.p = mgpu_model_add_parameter(f.m, "w", MGPU_F32, 1, s);
    for (i = 0; i < NN_N; i++) ((float *)f.p->data)[i] = (float)nn_p0[i];
    f.p->grad = mgpu_tensor_create(f.ctx, MGPU_F32, 1, s);
    f.o = mgpu_optimizer_create(f.m, d);
    return f;
}
static void nn_opt_teardown(nn_opt_fixture *f) {
    mgpu_optimizer_destroy(f->o);
    mgpu_model_destroy(f->m);
    mgpu_context_destroy(f->ctx);
}
/* Runs `steps` optimizer steps with the gradients above and compares with want[step][i]. */
static void nn_opt_run(nn_opt_fixture *f, int steps, double want[][NN_N], const char *what) {
    int t, i;
    MT_CHECK(f->o != NULL, "%s: create: %s", what, mgpu_last_error());
    if (!f->o) return;
    for (t = 0; t < steps; t++) {
        for (i = 0; i < NN_N; i++) ((float *)f->p->grad->data)[i] = (float)nn_grad_at(i, t);
        MT_CHECK(mgpu_optimizer_step(f->o) == MGPU_OK, "%s step: %s", what, mgpu_last_error());
        for (i = 0; i < NN_N; i++) {
            double got = ((float *)f->p->data)[i];
            MT_CHECK(nn_close(got, want[t][i], 2e-6), "%s step %d elem %d: %.9g want %.9g", what, t + 1, i, got, want[t][i]);
        }
    }
    MT_CHECK(mgpu_optimizer_step_count(f->o) == steps, "%s: step count", what);
}

/* torch.optim.Adam / AdamW, written from the documented algorithm. */
static void nn_adam_reference(int decoupled, double lr, double b1, double b2, double eps, double wd, int steps, double out[][NN_N]) {
    double p[NN_N], m[NN_N] = {0}, v[NN_N] = {0};
    int t, i;
    memcpy(p, nn_p0, sizeof p);
    for (t = 1; t <= steps; t++)
        for (i = 0; i < NN_N; i++) {
            double g = nn_grad_at(i, t - 1), mhat, vhat;
            if (decoupled) p[i] *= 1 - lr * wd;
            else g += wd * p[i];
            m[i] = b1 * m[i] + (1 - b1) * g;
            v[i] = b2 * v[i] + (1 - b2) * g * g;
            mhat = m[i] / (1 - pow(b1, t));
            vhat = v[i] / (1 - pow(b2, t));
            p[i] -= lr * mhat / (sqrt(vhat) + eps);
            out[t - 1][i] = p[i];
        }
}

static void test_adamw(void) {
    mgpu_optimizer_desc d = mgpu_optimizer_desc_default(MGPU_OPTIM_ADAMW);
    double want[3][NN_N];
    nn_opt_fixture f;
    d.lr = 0.01f; d.weight_decay = 0.1f; d.beta1 = 0.8f; d.beta2 = 0.95f; d.eps = 1e-3f;
    nn_adam_reference(1, d.lr, d.beta1, d.beta2, d.eps, d.weight_decay, 3, want);
    f = nn_opt_setup(&d);
    nn_opt_run(&f, 3, want, "adamw");
    nn_opt_teardown(&f);
    /* with PyTorch's defaults (tiny eps: the first step moves every weight by about lr) */
    d = mgpu_optimizer_desc_default(MGPU_OPTIM_ADAMW);
    nn_adam_reference(1, d.lr, d.beta1, d.beta2, d.eps, d.weight_decay, 3, want);
    f = nn_opt_setup(&d);
    nn_opt_run(&f, 3, want, "adamw defaults");
    nn_opt_teardown(&f);
}

static void test_adam_weight_decay(void) {
    mgpu_optimizer_desc d = mgpu_optimizer_desc_default(MGPU_OPTIM_ADAM);
    double want[3][NN_N];
    nn_opt_fixture f;
    d.lr = 0.05f; d.weight_decay = 0.2f; d.eps = 1e-2f;
    nn_adam_reference(0, d.lr, d.beta1, d.beta2, d.eps, d.weight_decay, 3, want);
    f = nn_opt_setup(&d);
    nn_opt_run(&f, 3, want, "adam l2");
    nn_opt_teardown(&f);
}

/* torch.optim.SGD from the documented algorithm (the first step's buffer is the undampened gradient). */
static void nn_sgd_reference(double lr, double mu, double damp, int nesterov, double wd, int steps, double out[][NN_N]) {
    double p[NN_N], buf[NN_N] = {0};
    int t, i;
    memcpy(p, nn_p0, sizeof p);
    for (t = 1; t <= steps; t++)
        for (i = 0; i < NN_N; i++) {
            double d = nn_grad_at(i, t - 1) + wd * p[i];
            if (mu != 0) {
                buf[i] = t == 1 ? d : mu * buf[i] + (1 - damp) * d;
                d = nesterov ? d + mu * buf[i] : buf[i];
            }
            p[i] -= lr * d;
            out[t - 1][i] = p[i];
        }
}

static void test_sgd(void) {
    struct { float lr, mu, damp, wd; int nesterov; const char *what; } cases[4] = {
        {0.1f, 0.0f, 0.0f, 0.0f, 0, "sgd plain"},
        {0.1f, 0.9f, 0.3f, 0.01f, 0, "sgd momentum dampening wd"},
        {0.05f, 0.9f, 0.0f, 0.02f, 1, "sgd nesterov wd"},
        {0.2f, 0.5f, 0.0f, 0.0f, 0, "sgd momentum"}};
    int c;
    for (c = 0; c < 4; c++) {
        mgpu_optimizer_desc d = mgpu_optimizer_desc_default(MGPU_OPTIM_SGD);
        double want[3][NN_N];
        nn_opt_fixture f;
        d.lr = cases[c].lr; d.momentum = cases[c].mu; d.dampening = cases[c].damp; d.weight_decay = cases[c].wd; d.nesterov = cases[c].nesterov;
        nn_sgd_reference(d.lr, d.momentum, d.dampening, d.nesterov, d.weight_decay, 3, want);
        f = nn_opt_setup(&d);
        nn_opt_run(&f, 3, want, cases[c].what);
        if (f.o) MT_CHECK(mgpu_optimizer_num_states(f.o) == (cases[c].mu != 0.0f ? 1 : 0), "%s: states", cases[c].what);
        nn_opt_teardown(&f);
    }
}

static void test_optimizer_desc_and_errors(void) {
    mgpu_optimizer_desc d = mgpu_optimizer_desc_default(MGPU_OPTIM_SGD), bad;
    mgpu_context *ctx = mt_cpu_context(1);
    mgpu_model *m = mgpu_model_create(ctx);
    int64_t s[1] = {2};
    MT_CHECK(d.lr == 1e-3f && d.momentum == 0 && d.dampening == 0 && d.weight_decay == 0 && !d.nesterov, "SGD defaults");
    d = mgpu_optimizer_desc_default(MGPU_OPTIM_ADAM);
    MT_CHECK(d.lr == 1e-3f && d.beta1 == 0.9f && d.beta2 == 0.999f && d.eps == 1e-8f && d.weight_decay == 0, "Adam defaults");
    d = mgpu_optimizer_desc_default(MGPU_OPTIM_ADAMW);
    MT_CHECK(d.type == MGPU_OPTIM_ADAMW && d.lr == 1e-3f && d.beta2 == 0.999f && d.weight_decay == 1e-2f, "AdamW defaults");
    MT_CHECK(mgpu_optimizer_create(m, &d) == NULL && strstr(mgpu_last_error(), "no parameters"), "empty model: %s", mgpu_last_error());
    mgpu_model_add_parameter(m, "w", MGPU_F32, 1, s);
    bad = d; bad.lr = -0.1f;
    MT_CHECK(mgpu_optimizer_create(m, &bad) == NULL && strstr(mgpu_last_error(), "lr"), "negative lr: %s", mgpu_last_error());
    bad = d; bad.beta1 = 1.0f;
    MT_CHECK(mgpu_optimizer_create(m, &bad) == NULL && strstr(mgpu_last_error(), "beta1"), "beta1 = 1: %s", mgpu_last_error());
    bad = d; bad.beta2 = -0.5f;
    MT_CHECK(mgpu_optimizer_create(m, &bad) == NULL && strstr(mgpu_last_error(), "beta2"), "beta2 < 0");
    bad = d; bad.eps = -1.0f;
    MT_CHECK(mgpu_optimizer_create(m, &bad) == NULL && strstr(mgpu_last_error(), "eps"), "eps < 0");
    bad = d; bad.weight_decay = -1.0f;
    MT_CHECK(mgpu_optimizer_create(m, &bad) == NULL && strstr(mgpu_last_error(), "weight_decay"), "wd < 0");
    bad = mgpu_optimizer_desc_default(MGPU_OPTIM_SGD); bad.nesterov = 1;
    MT_CHECK(mgpu_optimizer_create(m, &bad) == NULL && strstr(mgpu_last_error(), "nesterov"), "nesterov without momentum: %s", mgpu_last_error());
    bad.momentum = 0.9f; bad.dampening = 0.1f;
    MT_CHECK(mgpu_optimizer_create(m, &bad) == NULL && strstr(mgpu_last_error(), "dampening"), "nesterov with dampening");
    bad = d; bad.type = (mgpu_optimizer_type)9;
    MT_CHECK(mgpu_optimizer_create(m, &bad) == NULL && strstr(mgpu_last_error(), "type"), "bad type");
    MT_CHECK(mgpu_optimizer_create(NULL, &d) == NULL && mgpu_optimizer_create(m, NULL) == NULL, "NULL args");
    MT_CHECK(mgpu_optimizer_step(NULL) == MGPU_ERR_INVALID_ARG && mgpu_optimizer_zero_grad(NULL) == MGPU_ERR_INVALID_ARG, "NULL optimizer");
    {
        mgpu_optimizer *o = mgpu_optimizer_create(m, &d);
        mgpu_tensor *w = mgpu_model_find(m, "w");
        int64_t s3[1] = {3};
        MT_CHECK(o != NULL, "create: %s", mgpu_last_error());
        mgpu_optimizer_set_lr(o, 0.5f);
        MT_CHECK(mgpu_optimizer_lr(o) == 0.5f, "set_lr");
        mgpu_optimizer_set_lr(o, -1.0f);
        MT_CHECK(mgpu_optimizer_lr(o) == 0.5f && strstr(mgpu_last_error(), "learning rate"), "negative lr kept out");
        w->grad = mgpu_tensor_create(ctx, MGPU_F32, 1, s3);   /* wrong size */
        MT_CHECK(mgpu_optimizer_step(o) == MGPU_ERR_SHAPE && strstr(mgpu_last_error(), "'w'"), "bad grad named: %s", mgpu_last_error());
        MT_CHECK(mgpu_optimizer_step_count(o) == 0, "failed step not counted");
        mgpu_optimizer_destroy(o);
    }
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
}

/* State names and order, lazy parameters (no grad: skipped, its own step count stays), step count. */
static void test_optimizer_state(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    mgpu_model *m = mgpu_model_create(ctx);
    mgpu_optimizer_desc d = mgpu_optimizer_desc_default(MGPU_OPTIM_ADAM);
    mgpu_optimizer *o;
    mgpu_linear *l = mgpu_linear_create(m, "fc", 3, 2, 1);
    static const char *const want[] = {"fc.weight.exp_avg", "fc.weight.exp_avg_sq", "fc.bias.exp_avg", "fc.bias.exp_avg_sq"};
    const char *name = NULL;
    float bias_before[2], w_after1[6];
    int i;
    d.lr = 0.1f;
    o = mgpu_optimizer_create(m, &d);
    MT_CHECK(l && o && mgpu_optimizer_num_states(o) == 4, "4 states");
    if (!l || !o) return;
    for (i = 0; i < 4; i++) {
        mgpu_tensor *t = mgpu_optimizer_state(o, i, &name);
        MT_CHECK(t && strcmp(name, want[i]) == 0, "state %d '%s' want '%s'", i, name, want[i]);
        MT_CHECK(t && mgpu_tensor_same_shape(t, i < 2 ? l->weight : l->bias), "state %d shape", i);
    }
    MT_CHECK(mgpu_optimizer_state(o, 4, NULL) == NULL, "index out of range");
    /* step 1: only the weight has a grad (all 1) */
    memcpy(bias_before, l->bias->data, sizeof bias_before);
    l->weight->grad = mgpu_tensor_create(ctx, MGPU_F32, 2, l->weight->shape);
    mgpu_tensor_fill(l->weight->grad, 1.0);
    memcpy(w_after1, l->weight->data, sizeof w_after1);
    MT_CHECK(mgpu_optimizer_step(o) == MGPU_OK, "step");
    MT_CHECK(memcmp(bias_before, l->bias->data, sizeof bias_before) == 0, "param without grad skipped");
    MT_CHECK(nn_all_equal(mgpu_optimizer_state(o, 2, NULL), 0.0f), "its state untouched");
    for (i = 0; i < 6; i++) w_after1[i] -= ((float *)l->weight->data)[i];
    MT_CHECK(nn_close(w_after1[0], 0.1, 1e-5), "first Adam step moves by lr: %g", w_after1[0]);
    /* step 2: the bias gets its first update, so its bias correction uses t = 1: also exactly lr */
    l->bias->grad = mgpu_tensor_create(ctx, MGPU_F32, 1, l->bias->shape);
    mgpu_tensor_fill(l->bias->grad, -3.0);
    MT_CHECK(mgpu_optimizer_step(o) == MGPU_OK && mgpu_optimizer_step_count(o) == 2, "step 2");
    MT_CHECK(nn_close(((float *)l->bias->data)[0] - bias_before[0], 0.1, 1e-5), "per-parameter step: %g",
             ((float *)l->bias->data)[0] - bias_before[0]);
    mgpu_optimizer_set_step_count(o, 100);
    MT_CHECK(mgpu_optimizer_step_count(o) == 100, "set_step_count");
    MT_CHECK(mgpu_optimizer_zero_grad(o) == MGPU_OK && nn_all_equal(l->bias->grad, 0.0f) && nn_all_equal(l->weight->grad, 0.0f), "zero_grad");
    mgpu_optimizer_destroy(o);
    /* SGD with momentum names its buffers */
    d = mgpu_optimizer_desc_default(MGPU_OPTIM_SGD); d.momentum = 0.9f;
    o = mgpu_optimizer_create(m, &d);
    MT_CHECK(o && mgpu_optimizer_num_states(o) == 2 && mgpu_optimizer_state(o, 1, &name) && strcmp(name, "fc.bias.momentum_buffer") == 0,
             "momentum buffer names");
    mgpu_optimizer_destroy(o);
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
}

/* A large tensor goes through the thread pool: the result must not depend on the thread count. */
static double nn_big_run(int threads, int64_t n, float *w_out, float *norm_out) {
    mgpu_context *ctx = mt_cpu_context(threads);
    mgpu_model *m = mgpu_model_create(ctx);
    mgpu_tensor *w = mgpu_model_add_parameter(m, "w", MGPU_F32, 1, &n);
    mgpu_optimizer_desc d = mgpu_optimizer_desc_default(MGPU_OPTIM_ADAMW);
    mgpu_optimizer *o;
    int64_t i;
    int t;
    double t0, step_s;
    w->grad = mgpu_tensor_create(ctx, MGPU_F32, 1, &n);
    for (i = 0; i < n; i++) { ((float *)w->data)[i] = (float)sin((double)i); ((float *)w->grad->data)[i] = (float)cos(0.37 * (double)i); }
    o = mgpu_optimizer_create(m, &d);
    t0 = mgpu_time_s();
    for (t = 0; t < 4; t++) {
        mgpu_clip_grad_norm(m, 10.0f, norm_out);
        mgpu_optimizer_step(o);
    }
    step_s = (mgpu_time_s() - t0) / 4;
    memcpy(w_out, w->data, sizeof(float) * (size_t)n);
    mgpu_optimizer_destroy(o);
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
    return step_s;
}
static void test_thread_invariance(void) {
    int64_t n = nn_quick() ? 100003 : 1000003;
    float *a = (float *)malloc(sizeof(float) * (size_t)n), *b = (float *)malloc(sizeof(float) * (size_t)n), na = 0, nb = 0;
    double t1 = nn_big_run(1, n, a, &na), t2 = nn_big_run(2, n, b, &nb);
    printf("  info: %lld-element clip + AdamW step: %.2f ms with 1 thread, %.2f ms with 2\n", (long long)n, t1 * 1e3, t2 * 1e3);
    MT_CHECK(memcmp(a, b, sizeof(float) * (size_t)n) == 0, "AdamW update identical with 1 and 2 threads");
    MT_CHECK(na == nb && na > 0, "clip norm identical: %.9g vs %.9g", na, nb);
    free(a); free(b);
}

/* ---------------------------------------------------------------- gradient clipping */

static void test_clip_grad_norm(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    mgpu_model *m = mgpu_model_create(ctx);
    int64_t s2[1] = {2}, s1[1] = {1};
    mgpu_tensor *a = mgpu_model_add_parameter(m, "a", MGPU_F32, 1, s2);
    mgpu_tensor *b = mgpu_model_add_parameter(m, "b", MGPU_F32, 1, s1);
    mgpu_model_add_parameter(m, "no_grad", MGPU_F32, 1, s1);
    float norm = 0, *ga, *gb;
    double coef = 6.5 / (13.0 + 1e-6);
    a->grad = mgpu_tensor_create(ctx, MGPU_F32, 1, s2);
    b->grad = mgpu_tensor_create(ctx, MGPU_F32, 1, s1);
    ga = (float *)a->grad->data; gb = (float *)b->grad->data;
    ga[0] = 3; ga[1] = 4; gb[0] = 12;   /* global norm 13 */
    MT_CHECK(mgpu_clip_grad_norm(m, 20.0f, &norm) == MGPU_OK && norm == 13.0f, "norm %g", norm);
    MT_CHECK(ga[0] == 3 && ga[1] == 4 && gb[0] == 12, "under the limit: unchanged");
    MT_CHECK(mgpu_clip_grad_norm(m, 6.5f, &norm) == MGPU_OK && norm == 13.0f, "reports the norm before clipping");
    MT_CHECK(nn_close(ga[0], 3 * coef, 1e-6) && nn_close(ga[1], 4 * coef, 1e-6) && nn_close(gb[0], 12 * coef, 1e-6),
             "scaled by max/(norm+1e-6): %g %g %g", ga[0], ga[1], gb[0]);
    MT_CHECK(mgpu_clip_grad_norm(m, 100.0f, NULL) == MGPU_OK, "NULL total_norm allowed");
    /* tiny grads show the 1e-6 in the denominator: norm 5e-6, max 1e-6 -> coef 1/6, not 1/5 */
    ga[0] = 3e-6f; ga[1] = 4e-6f; gb[0] = 0;
    MT_CHECK(mgpu_clip_grad_norm(m, 1e-6f, &norm) == MGPU_OK && nn_close(norm, 5e-6, 1e-6), "small norm %g", norm);
    MT_CHECK(fabs(ga[1] - 4e-6 * (1e-6 / (5e-6 + 1e-6))) < 1e-12, "eps in the clip coefficient: %g", ga[1]);
    gb[0] = (float)(12 * coef);
    MT_CHECK(mgpu_clip_grad_norm(m, -1.0f, &norm) == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "max_norm"), "negative max_norm");
    MT_CHECK(mgpu_clip_grad_norm(NULL, 1.0f, &norm) == MGPU_ERR_INVALID_ARG, "NULL model");
    ga[0] = INFINITY;
    MT_CHECK(mgpu_clip_grad_norm(m, 1.0f, &norm) == MGPU_OK && isinf(norm), "inf norm reported: %g", norm);
    ga[0] = NAN;
    MT_CHECK(mgpu_clip_grad_norm(m, 1.0f, &norm) == MGPU_OK && isnan(norm), "nan norm reported: %g", norm);
    MT_CHECK(nn_close(gb[0], 12 * coef, 1e-6), "non-finite: grads left alone");
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
}

/* ---------------------------------------------------------------- LR schedules */

static mgpu_lr_schedule nn_sched(mgpu_schedule_type type, float base) {
    mgpu_lr_schedule s;
    memset(&s, 0, sizeof s);
    s.type = type; s.base_lr = base;
    return s;
}

static void test_cosine_restarts(void) {
    mgpu_lr_schedule s = nn_sched(MGPU_SCHEDULE_COSINE_RESTARTS, 0.1f);
    /* T_0 = 10, T_mult = 2: cycles [0, 10), [10, 30), [30, 70) */
    static const int64_t steps[7] = {0, 5, 9, 10, 15, 29, 30};
    static const double t_cur[7] = {0, 5, 9, 0, 5, 19, 0}, t_i[7] = {10, 10, 10, 20, 20, 20, 40};
    double eta = 0.001, tc = 0, ti = 10;
    int i, ok = 1;
    s.t_0 = 10; s.t_mult = 2; s.eta_min = (float)eta;
    for (i = 0; i < 7; i++) {
        double want = s.eta_min + (0.1 - s.eta_min) * (1 + cos(NN_PI * t_cur[i] / t_i[i])) / 2;
        MT_CHECK(nn_close(mgpu_lr_at(&s, steps[i]), want, 1e-6), "step %lld: %.9g want %.9g", (long long)steps[i], mgpu_lr_at(&s, steps[i]), want);
    }
    MT_CHECK(nn_close(mgpu_lr_at(&s, 10), 0.1, 1e-6) && mgpu_lr_at(&s, 9) < 0.01f, "restart jumps back to base");
    /* PyTorch's step-by-step bookkeeping: T_cur += 1; at T_i restart with T_i *= T_mult */
    for (i = 0; i < 400; i++) {
        double want = s.eta_min + (0.1 - s.eta_min) * (1 + cos(NN_PI * tc / ti)) / 2;
        if (!nn_close(mgpu_lr_at(&s, i), want, 1e-6)) ok = 0;
        tc += 1;
        if (tc >= ti) { tc -= ti; ti *= 2; }
    }
    MT_CHECK(ok, "matches the iterative scheduler for 400 steps");
    s.t_mult = 1;
    MT_CHECK(nn_close(mgpu_lr_at(&s, 25), s.eta_min + (0.1 - s.eta_min) * (1 + cos(NN_PI * 0.5)) / 2, 1e-6), "T_mult 1 wraps");
    MT_CHECK(nn_close(mgpu_lr_at(&s, 1000000007), mgpu_lr_at(&s, 7), 1e-6), "large step");
    s.warmup_steps = 4;
    MT_CHECK(nn_close(mgpu_lr_at(&s, 0), 0.025, 1e-6) && nn_close(mgpu_lr_at(&s, 3), 0.1, 1e-6), "warmup first");
    MT_CHECK(nn_close(mgpu_lr_at(&s, 4), 0.1, 1e-6) && nn_close(mgpu_lr_at(&s, 9), mgpu_lr_at(&s, 9 + 10), 1e-6), "then restarts from the end of warmup");
    s.t_0 = 0;
    MT_CHECK(mgpu_lr_at(&s, 5) == 0.0f && strstr(mgpu_last_error(), "t_0"), "t_0 = 0 rejected: %s", mgpu_last_error());
}

static void test_schedules(void) {
    mgpu_lr_schedule s = nn_sched(MGPU_SCHEDULE_STEP, 1.0f);
    mgpu_schedule_type ty = MGPU_SCHEDULE_CONSTANT;
    static const char *const names[5] = {"constant", "linear", "cosine", "cosine-restarts", "step"};
    int i;
    /* StepLR(step_size 3, gamma 0.5) */
    s.step_size = 3; s.gamma = 0.5f;
    MT_CHECK(mgpu_lr_at(&s, 0) == 1.0f && mgpu_lr_at(&s, 2) == 1.0f && mgpu_lr_at(&s, 3) == 0.5f && mgpu_lr_at(&s, 5) == 0.5f &&
             mgpu_lr_at(&s, 6) == 0.25f && nn_close(mgpu_lr_at(&s, 30), pow(0.5, 10), 1e-6), "step schedule");
    s.warmup_steps = 2;
    MT_CHECK(mgpu_lr_at(&s, 0) == 0.5f && mgpu_lr_at(&s, 1) == 1.0f && mgpu_lr_at(&s, 2) == 1.0f && mgpu_lr_at(&s, 5) == 0.5f, "step after warmup");
    s.step_size = 0;
    MT_CHECK(mgpu_lr_at(&s, 3) == 0.0f && strstr(mgpu_last_error(), "step_size"), "step_size 0 rejected");
    /* constant with warmup: base * (step + 1) / warmup */
    s = nn_sched(MGPU_SCHEDULE_CONSTANT, 0.4f); s.warmup_steps = 4;
    MT_CHECK(nn_close(mgpu_lr_at(&s, 0), 0.1, 1e-6) && nn_close(mgpu_lr_at(&s, 1), 0.2, 1e-6) && nn_close(mgpu_lr_at(&s, 2), 0.3, 1e-6) &&
             nn_close(mgpu_lr_at(&s, 3), 0.4, 1e-6) && nn_close(mgpu_lr_at(&s, 100), 0.4, 1e-6), "warmup then constant");
    /* linear decay to eta_min at total_steps */
    s = nn_sched(MGPU_SCHEDULE_LINEAR, 1.0f); s.total_steps = 10;
    MT_CHECK(mgpu_lr_at(&s, 0) == 1.0f && nn_close(mgpu_lr_at(&s, 5), 0.5, 1e-6) && mgpu_lr_at(&s, 10) == 0.0f && mgpu_lr_at(&s, 12) == 0.0f, "linear");
    /* cosine: T_max = total - warmup */
    s = nn_sched(MGPU_SCHEDULE_COSINE, 1.0f); s.total_steps = 12; s.warmup_steps = 2; s.eta_min = 0.1f;
    MT_CHECK(nn_close(mgpu_lr_at(&s, 1), 1.0, 1e-6) && nn_close(mgpu_lr_at(&s, 2), 1.0, 1e-6), "cosine start");
    MT_CHECK(nn_close(mgpu_lr_at(&s, 7), 0.55, 1e-6), "cosine midpoint %g", mgpu_lr_at(&s, 7));
    MT_CHECK(nn_close(mgpu_lr_at(&s, 5), 0.1 + 0.9 * (1 + cos(NN_PI * 0.3)) / 2, 1e-6), "cosine t=3");
    MT_CHECK(nn_close(mgpu_lr_at(&s, 12), 0.1, 1e-6) && nn_close(mgpu_lr_at(&s, 40), 0.1, 1e-6), "cosine ends at eta_min");
    MT_CHECK(mgpu_lr_at(NULL, 0) == 0.0f && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "NULL schedule");
    MT_CHECK(mgpu_lr_at(&s, -1) == 0.0f && strstr(mgpu_last_error(), "step"), "negative step");
    /* parse */
    for (i = 0; i < 5; i++) MT_CHECK(mgpu_schedule_parse(names[i], &ty) == MGPU_OK && (int)ty == i, "parse %s", names[i]);
    MT_CHECK(mgpu_schedule_parse("cosin", &ty) == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "'cosin'"), "bad name: %s", mgpu_last_error());
    MT_CHECK(mgpu_schedule_parse(NULL, &ty) == MGPU_ERR_INVALID_ARG, "NULL name");
}

static void test_lr_scale(void) {
    MT_CHECK(nn_close(mgpu_lr_scale(0.1f, 4, 2, MGPU_LR_SCALE_LINEAR), 0.8, 1e-6), "linear k=8");
    MT_CHECK(nn_close(mgpu_lr_scale(0.1f, 4, 2, MGPU_LR_SCALE_SQRT), 0.1 * sqrt(8.0), 1e-6), "sqrt k=8");
    MT_CHECK(mgpu_lr_scale(0.1f, 4, 2, MGPU_LR_SCALE_NONE) == 0.1f, "none");
    MT_CHECK(mgpu_lr_scale(0.1f, 1, 1, MGPU_LR_SCALE_LINEAR) == 0.1f, "k=1");
    MT_CHECK(mgpu_lr_scale(0.1f, 0, 1, MGPU_LR_SCALE_LINEAR) == 0.1f && strstr(mgpu_last_error(), "world_size"), "world 0 rejected");
}

/* ---------------------------------------------------------------- layer forwards (skipped while an op is missing) */

static void test_linear_forward(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    mgpu_model *m = mgpu_model_create(ctx);
    mgpu_linear *l = mgpu_linear_create(m, "fc", 3, 2, 1);
    int64_t xs[2] = {2, 3};
    float xv[6] = {1, 2, 3, -1, 0.5f, 2};
    mgpu_tensor *x = mgpu_tensor_from_host(ctx, MGPU_F32, 2, xs, xv), *y;
    const float *w = (const float *)l->weight->data, *b = (const float *)l->bias->data;
    int n, o;
    y = mgpu_linear_forward(ctx, l, x);
    if (!nn_op_missing(y, "Linear forward")) {
        MT_CHECK(y && y->ndim == 2 && y->shape[0] == 2 && y->shape[1] == 2, "shape %s", mgpu_last_error());
        for (n = 0; y && n < 2; n++)
            for (o = 0; o < 2; o++) {
                double want = b[o] + w[o * 3] * xv[n * 3] + w[o * 3 + 1] * xv[n * 3 + 1] + w[o * 3 + 2] * xv[n * 3 + 2];
                MT_CHECK(nn_close(((float *)y->data)[n * 2 + o], want, 1e-5), "y[%d][%d]", n, o);
            }
    }
    mgpu_context_end_step(ctx);
    mgpu_tensor_free(x);
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
}

static void test_conv_bn_forward(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    mgpu_model *m = mgpu_model_create(ctx);
    mgpu_conv2d *c = mgpu_conv2d_create(m, "conv1", 3, 4, 3, 2, 1, 1);
    mgpu_batchnorm2d *bn = mgpu_batchnorm2d_create(m, "bn1", 3);
    int64_t xs[4] = {2, 3, 6, 6};
    mgpu_tensor *x = mt_rand(ctx, 4, xs, -1, 1, 0), *y;
    y = mgpu_conv2d_forward(ctx, c, x);
    if (!nn_op_missing(y, "Conv2d forward"))   /* (2, 3, 6, 6), k 3, stride 2, pad 1 -> (2, 4, 3, 3) */
        MT_CHECK(y && y->ndim == 4 && y->shape[0] == 2 && y->shape[1] == 4 && y->shape[2] == 3 && y->shape[3] == 3, "conv shape: %s", mgpu_last_error());
    y = mgpu_batchnorm2d_forward(ctx, bn, x);
    if (!nn_op_missing(y, "BatchNorm2d forward")) {
        MT_CHECK(y && mgpu_tensor_same_shape(y, x), "bn shape: %s", mgpu_last_error());
        MT_CHECK(((int64_t *)bn->num_batches_tracked->data)[0] == 1, "training forward counts the batch");
        MT_CHECK(!nn_all_equal(bn->running_mean, 0.0f), "running mean updated");
        mgpu_model_train(m, 0);
        y = mgpu_batchnorm2d_forward(ctx, bn, x);
        MT_CHECK(y && ((int64_t *)bn->num_batches_tracked->data)[0] == 1, "eval does not count");
        MT_CHECK(mgpu_batchnorm2d_forward(ctx, bn, mgpu_op_flatten(ctx, x, 2)) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "3-D input rejected");
    }
    mgpu_context_end_step(ctx);
    mgpu_tensor_free(x);
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
}

static void test_ln_embedding_dropout_forward(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    mgpu_model *m = mgpu_model_create(ctx);
    mgpu_layernorm *ln = mgpu_layernorm_create(m, "ln", 8);
    mgpu_embedding *e = mgpu_embedding_create(m, "emb", 10, 8);
    mgpu_dropout *dr = mgpu_dropout_create(m, 0.5f);
    int64_t is[2] = {2, 3};
    int64_t iv[6] = {0, 9, 3, 3, 1, 2};
    mgpu_tensor *idx = mgpu_tensor_from_host(ctx, MGPU_I64, 2, is, iv), *emb, *y;
    emb = mgpu_embedding_forward(ctx, e, idx);
    if (!nn_op_missing(emb, "Embedding forward")) {
        MT_CHECK(emb && emb->ndim == 3 && emb->shape[2] == 8, "embedding shape: %s", mgpu_last_error());
        MT_CHECK(emb && memcmp((float *)emb->data + 8, (float *)e->weight->data + 9 * 8, 8 * sizeof(float)) == 0, "row 9 looked up");
        y = mgpu_layernorm_forward(ctx, ln, emb);
        if (!nn_op_missing(y, "LayerNorm forward")) {
            double s = 0;
            int k;
            MT_CHECK(y && mgpu_tensor_same_shape(y, emb), "layernorm shape: %s", mgpu_last_error());
            for (k = 0; y && k < 8; k++) s += ((float *)y->data)[k];
            MT_CHECK(fabs(s) < 1e-4, "normalised row sums to 0: %g", s);
        }
        mgpu_model_train(m, 0);
        y = mgpu_dropout_forward(ctx, dr, emb);
        if (!nn_op_missing(y, "Dropout forward"))
            MT_CHECK(y && memcmp(y->data, emb->data, mgpu_tensor_nbytes(emb)) == 0, "eval dropout is the identity: %s", mgpu_last_error());
    }
    mgpu_context_end_step(ctx);
    mgpu_tensor_free(idx);
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
}

/* MHA and both TransformerEncoderLayer variants: shapes, and a backward reaching every parameter. */
static void test_attention_forward(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    mgpu_model *m = mgpu_model_create(ctx);
    mgpu_mha *mha = mgpu_mha_create(m, "attn", 8, 2);
    mgpu_transformer_layer *post = mgpu_transformer_layer_create(m, "enc.0", 8, 2, 16, 0.1f, 0);
    mgpu_transformer_layer *pre = mgpu_transformer_layer_create(m, "enc.1", 8, 2, 16, 0.0f, 1);
    int64_t xs[3] = {2, 5, 8};
    mgpu_tensor *x = mt_rand(ctx, 3, xs, -1, 1, 0), *y;
    int i;
    y = mgpu_mha_forward(ctx, mha, x, 1);
    if (!nn_op_missing(y, "MultiheadAttention forward")) {
        MT_CHECK(y && mgpu_tensor_same_shape(y, x), "mha shape: %s", mgpu_last_error());
        y = mgpu_transformer_layer_forward(ctx, pre, mgpu_transformer_layer_forward(ctx, post, y, 1), 0);
        if (!nn_op_missing(y, "TransformerEncoderLayer forward")) {
            MT_CHECK(y && mgpu_tensor_same_shape(y, x), "transformer shape: %s", mgpu_last_error());
            MT_CHECK(y && mgpu_backward_with_grad(ctx, y, y) == MGPU_OK, "backward: %s", mgpu_last_error());
            for (i = 0; i < mgpu_model_num_parameters(m); i++) {
                const char *name = NULL;
                mgpu_tensor *p = mgpu_model_parameter(m, i, &name);
                MT_CHECK(p->grad != NULL, "'%s' got a gradient", name);
            }
        }
    }
    MT_CHECK(mgpu_mha_forward(ctx, mha, x, 0) != NULL || mgpu_last_result() == MGPU_ERR_UNSUPPORTED, "non-causal");
    {
        int64_t bad[3] = {2, 5, 6};
        mgpu_tensor *xb = mt_rand(ctx, 3, bad, -1, 1, 0);
        MT_CHECK(mgpu_mha_forward(ctx, mha, xb, 0) == NULL && mgpu_last_result() == MGPU_ERR_SHAPE, "wrong embed dim rejected");
        mgpu_tensor_free(xb);
    }
    mgpu_context_end_step(ctx);
    mgpu_tensor_free(x);
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
}

/* nn.MultiheadAttention's math written out with loops: packed q|k|v projection, heads as
   contiguous slices of E, softmax(q k^T / sqrt(Dh)) v, then out_proj. */
static void nn_mha_reference(const mgpu_mha *l, const float *x, int64_t B, int64_t T, int causal, double *out) {
    int64_t E = l->embed_dim, H = l->num_heads, Dh = E / H, b, t, s, h, d, j, e;
    const float *w = (const float *)l->in_proj_weight->data, *bias = (const float *)l->in_proj_bias->data;
    const float *wo = (const float *)l->out_proj->weight->data, *bo = (const float *)l->out_proj->bias->data;
    double *qkv = (double *)calloc((size_t)(B * T * 3 * E), sizeof(double)), *o = (double *)calloc((size_t)(B * T * E), sizeof(double));
    double *p = (double *)calloc((size_t)T, sizeof(double));
    for (b = 0; b < B * T; b++)
        for (j = 0; j < 3 * E; j++) {
            double acc = bias[j];
            for (e = 0; e < E; e++) acc += (double)w[j * E + e] * x[b * E + e];
            qkv[b * 3 * E + j] = acc;
        }
    for (b = 0; b < B; b++)
        for (h = 0; h < H; h++)
            for (t = 0; t < T; t++) {
                double mx = -1e300, z = 0;
                const double *q = qkv + (b * T + t) * 3 * E + h * Dh;
                for (s = 0; s < T; s++) {
                    const double *k = qkv + (b * T + s) * 3 * E + E + h * Dh;
                    double dot = 0;
                    for (d = 0; d < Dh; d++) dot += q[d] * k[d];
                    p[s] = causal && s > t ? -1e300 : dot / sqrt((double)Dh);
                    if (p[s] > mx) mx = p[s];
                }
                for (s = 0; s < T; s++) { p[s] = p[s] <= -1e300 ? 0 : exp(p[s] - mx); z += p[s]; }
                for (s = 0; s < T; s++)
                    for (d = 0; d < Dh; d++) o[(b * T + t) * E + h * Dh + d] += p[s] / z * qkv[(b * T + s) * 3 * E + 2 * E + h * Dh + d];
            }
    for (b = 0; b < B * T; b++)
        for (j = 0; j < E; j++) {
            double acc = bo[j];
            for (e = 0; e < E; e++) acc += (double)wo[j * E + e] * o[b * E + e];
            out[b * E + j] = acc;
        }
    free(qkv); free(o); free(p);
}

static void test_mha_values(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    mgpu_model *m = mgpu_model_create(ctx);
    mgpu_mha *l = mgpu_mha_create(m, "attn", 8, 2);
    int64_t xs[3] = {2, 5, 8}, i;
    mgpu_tensor *x = mt_rand(ctx, 3, xs, -1, 1, 0), *y;
    double want[80];
    int causal;
    /* non-zero biases so their placement is checked too */
    for (i = 0; i < 24; i++) ((float *)l->in_proj_bias->data)[i] = (float)(0.05 * (double)(i % 7) - 0.1);
    for (i = 0; i < 8; i++) ((float *)l->out_proj->bias->data)[i] = (float)(0.1 * (double)i);
    for (causal = 0; causal < 2; causal++) {
        y = mgpu_mha_forward(ctx, l, x, causal);
        if (nn_op_missing(y, "MultiheadAttention values")) break;
        MT_CHECK(y != NULL, "forward: %s", mgpu_last_error());
        if (!y) break;
        nn_mha_reference(l, (const float *)x->data, 2, 5, causal, want);
        for (i = 0; i < 80; i++) MT_CHECK(nn_close(((float *)y->data)[i], want[i], 1e-5), "causal %d elem %lld: %g want %g", causal, (long long)i, ((float *)y->data)[i], want[i]);
        mgpu_context_end_step(ctx);
    }
    mgpu_tensor_free(x);
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
}

/* Finite differences through a whole encoder layer (eval mode: dropout off), both norm placements. */
static mgpu_tensor *nn_encoder_fn(mgpu_context *ctx, mgpu_tensor **inputs, void *user) {
    return mgpu_transformer_layer_forward(ctx, (const mgpu_transformer_layer *)user, inputs[0], 1);
}
/* linear1 reads a layer-normed row n (|n| = sqrt(C) with unit gain) and |w| <= 1/sqrt(in) per
   element, so |w.n| < 3: biases of +-3 put every unit firmly on or off and central differences
   never straddle a ReLU kink, while the mask still matters (off units pass no gradient). */
static void nn_keep_relu_off_kinks(mgpu_linear *l) {
    int64_t i;
    for (i = 0; i < l->out_features; i++) ((float *)l->bias->data)[i] = i % 2 ? -3.0f : 3.0f;
}
static void test_encoder_gradcheck(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    mgpu_model *m = mgpu_model_create(ctx);
    mgpu_transformer_layer *post = mgpu_transformer_layer_create(m, "post", 8, 2, 12, 0.1f, 0);
    mgpu_transformer_layer *pre = mgpu_transformer_layer_create(m, "pre", 8, 2, 12, 0.1f, 1);
    int64_t xs[3] = {2, 4, 8};
    mgpu_tensor *x = mt_rand(ctx, 3, xs, -1, 1, 1);
    mgpu_transformer_layer *layers[2];
    int k;
    layers[0] = post; layers[1] = pre;
    mgpu_model_train(m, 0);
    for (k = 0; k < 2; k++) {
        mgpu_tensor *in[4];
        mgpu_tensor *probe;
        double worst;
        in[0] = x; in[1] = layers[k]->self_attn->in_proj_weight; in[2] = layers[k]->linear1->weight; in[3] = layers[k]->norm1->weight;
        nn_keep_relu_off_kinks(layers[k]->linear1);
        probe = nn_encoder_fn(ctx, in, layers[k]);
        if (nn_op_missing(probe, "encoder gradcheck")) break;
        mgpu_context_end_step(ctx);
        worst = mt_gradcheck(ctx, nn_encoder_fn, in, 4, layers[k], 3e-3, 2e-2, 2e-3, 64);
        MT_CHECK(worst <= 1.0, "%s-norm encoder gradcheck ratio %g", k ? "pre" : "post", worst);
    }
    mgpu_tensor_free(x);
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
}

/* With out_proj and linear2 zeroed both sublayers output 0, which exposes where the residuals
   and norms sit: pre-norm gives x back exactly, post-norm gives norm2(norm1(x)) = layer_norm(x). */
static void test_encoder_residual_placement(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    mgpu_model *m = mgpu_model_create(ctx);
    mgpu_transformer_layer *post = mgpu_transformer_layer_create(m, "post", 8, 2, 12, 0.0f, 0);
    mgpu_transformer_layer *pre = mgpu_transformer_layer_create(m, "pre", 8, 2, 12, 0.0f, 1);
    int64_t xs[3] = {2, 3, 8}, r, c;
    mgpu_tensor *x = mt_rand(ctx, 3, xs, -2, 2, 0), *yp, *yq;
    mgpu_transformer_layer *both[2];
    int k;
    both[0] = post; both[1] = pre;
    for (k = 0; k < 2; k++) {
        mgpu_tensor_fill(both[k]->self_attn->out_proj->weight, 0.0);
        mgpu_tensor_fill(both[k]->linear2->weight, 0.0);
        mgpu_tensor_fill(both[k]->linear2->bias, 0.0);
    }
    yp = mgpu_transformer_layer_forward(ctx, post, x, 0);
    yq = mgpu_transformer_layer_forward(ctx, pre, x, 0);
    if (!nn_op_missing(yp, "residual placement")) {
        MT_CHECK(yp && yq, "forward: %s", mgpu_last_error());
        if (yq) MT_CHECK(memcmp(yq->data, x->data, mgpu_tensor_nbytes(x)) == 0, "pre-norm returns x");
        for (r = 0; yp && r < 6; r++) {
            const float *xr = (const float *)x->data + r * 8, *yr = (const float *)yp->data + r * 8;
            double mean = 0, var = 0, v;
            for (c = 0; c < 8; c++) mean += xr[c] / 8.0;
            for (c = 0; c < 8; c++) var += (xr[c] - mean) * (xr[c] - mean) / 8.0;
            for (c = 0; c < 8; c++) {
                v = (xr[c] - mean) / sqrt(var + 1e-5);
                MT_CHECK(fabs(yr[c] - v) < 1e-4, "post-norm row %lld col %lld: %g want %g", (long long)r, (long long)c, yr[c], v);
            }
        }
    }
    mgpu_context_end_step(ctx);
    mgpu_tensor_free(x);
    mgpu_model_destroy(m);
    mgpu_context_destroy(ctx);
}

int main(void) {
    MT_RUN(test_model_registry);
    MT_RUN(test_layer_rollback);
    MT_RUN(test_linear_conv_params);
    MT_RUN(test_norm_embedding_params);
    MT_RUN(test_attention_params);
    MT_RUN(test_init_bounds);
    MT_RUN(test_adamw);
    MT_RUN(test_adam_weight_decay);
    MT_RUN(test_sgd);
    MT_RUN(test_optimizer_desc_and_errors);
    MT_RUN(test_optimizer_state);
    MT_RUN(test_thread_invariance);
    MT_RUN(test_clip_grad_norm);
    MT_RUN(test_cosine_restarts);
    MT_RUN(test_schedules);
    MT_RUN(test_lr_scale);
    MT_RUN(test_linear_forward);
    MT_RUN(test_conv_bn_forward);
    MT_RUN(test_ln_embedding_dropout_forward);
    MT_RUN(test_attention_forward);
    MT_RUN(test_mha_values);
    MT_RUN(test_encoder_gradcheck);
    MT_RUN(test_encoder_residual_placement);
    return MT_END();
}
