/* Core: errors, dtypes, half conversion, RNG, tensors, thread pool, autograd bookkeeping. */
#include "mgpu_test.h"

static void test_result_strings(void) {
    MT_CHECK(strcmp(mgpu_result_string(MGPU_OK), "ok") == 0, "ok string");
    MT_CHECK(strlen(mgpu_result_string(MGPU_ERR_TIMEOUT)) > 0, "timeout string");
    MT_CHECK(mgpu_tensor_create(NULL, MGPU_F32, 0, NULL) == NULL, "NULL ctx rejected");
    MT_CHECK(mgpu_last_result() == MGPU_ERR_INVALID_ARG, "code %d", mgpu_last_result());
    MT_CHECK(strstr(mgpu_last_error(), "ctx") != NULL, "message names ctx: %s", mgpu_last_error());
}

static void test_half_conversions(void) {
    float vals[] = {0.0f, 1.0f, -2.5f, 65504.0f, 1e-7f, 3.14159f, 6.1e-5f, -0.0f};
    int i;
    for (i = 0; i < 8; i++) {
        float h = mgpu_f16_to_f32(mgpu_f32_to_f16(vals[i]));
        float b = mgpu_bf16_to_f32(mgpu_f32_to_bf16(vals[i]));
        MT_CHECK(fabsf(h - vals[i]) <= fabsf(vals[i]) * 1e-3f + 6e-8f, "f16 %g -> %g", vals[i], h);
        MT_CHECK(fabsf(b - vals[i]) <= fabsf(vals[i]) * 8e-3f, "bf16 %g -> %g", vals[i], b);
    }
    MT_CHECK(mgpu_f32_to_f16(1.0f) == 0x3c00, "1.0 f16 bits");
    MT_CHECK(mgpu_f32_to_f16(70000.0f) == 0x7c00, "overflow to inf");
    MT_CHECK(mgpu_f32_to_bf16(1.0f) == 0x3f80, "1.0 bf16 bits");
    MT_CHECK(mgpu_f32_to_f16(1.0f + 1.0f / 2048) == 0x3c00, "ties to even (down)");
    MT_CHECK(mgpu_f32_to_f16(1.0f + 3.0f / 2048) == 0x3c02, "ties to even (up)");
    MT_CHECK(isnan(mgpu_f16_to_f32(mgpu_f32_to_f16(NAN))), "nan stays nan");
}

static void test_rng(void) {
    double sum = 0, sq = 0;
    int i, n = 20000;
    MT_CHECK(mgpu_random_u32(1, 5) == mgpu_random_u32(1, 5), "pure function");
    MT_CHECK(mgpu_random_u32(1, 5) != mgpu_random_u32(2, 5), "seed matters");
    for (i = 0; i < n; i++) { double z = mgpu_random_normal(7, (uint64_t)i); sum += z; sq += z * z; }
    MT_CHECK(fabs(sum / n) < 0.03, "normal mean %g", sum / n);
    MT_CHECK(fabs(sq / n - 1) < 0.05, "normal var %g", sq / n);
    for (i = 0, sum = 0; i < n; i++) { float u = mgpu_random_uniform(3, (uint64_t)i); MT_CHECK(u >= 0 && u < 1, "u %g", u); sum += u; }
    MT_CHECK(fabs(sum / n - 0.5) < 0.01, "uniform mean %g", sum / n);
}

static void test_device_parse(void) {
    mgpu_device d;
    MT_CHECK(mgpu_device_parse("cpu", &d) == MGPU_OK && d.type == MGPU_DEVICE_CPU, "cpu");
    /* auto must resolve to something real: the CPU in a CPU build, a GPU only where one is usable */
    d.type = (mgpu_device_type)99; d.index = 99;
    MT_CHECK(mgpu_device_parse("auto", &d) == MGPU_OK, "auto: %s", mgpu_last_error());
#ifndef MGPU_CUDA
    MT_CHECK(d.type == MGPU_DEVICE_CPU && d.index == 0, "auto in a CPU build is cpu (got type %d index %d)", (int)d.type, d.index);
#else
    MT_CHECK((d.type == MGPU_DEVICE_CPU && d.index == 0) || (d.type == MGPU_DEVICE_CUDA && d.index == 0 && mgpu_cuda_device_count() > 0),
             "auto is cpu, or cuda:0 with a GPU visible (got type %d index %d)", (int)d.type, d.index);
#endif
    d.type = (mgpu_device_type)99;
    MT_CHECK(mgpu_device_parse("cuda:0", &d) != MGPU_OK || d.type == MGPU_DEVICE_CUDA, "cuda:0 is cuda or an error");
    MT_CHECK(mgpu_device_parse("tpu", &d) == MGPU_ERR_INVALID_ARG, "tpu rejected");
    MT_CHECK(strstr(mgpu_last_error(), "tpu") != NULL, "names the value: %s", mgpu_last_error());
    MT_CHECK(mgpu_device_parse("cuda:x", &d) != MGPU_OK, "cuda:x rejected");
}

static void test_tensor_basics(void) {
    mgpu_context *ctx = mt_cpu_context(2);
    int64_t shape[3] = {2, 3, 4}, bad[2] = {2, -1};
    mgpu_tensor *t = mgpu_tensor_create(ctx, MGPU_F32, 3, shape);
    float buf[24];
    int i;
    MT_CHECK(t && t->numel == 24 && mgpu_tensor_nbytes(t) == 96, "create");
    for (i = 0; i < 24; i++) MT_CHECK(((float *)t->data)[i] == 0, "zeroed");
    MT_CHECK(mgpu_tensor_fill(t, 1.5) == MGPU_OK && mgpu_tensor_item(t) == 1.5, "fill");
    MT_CHECK(mgpu_tensor_copy_to_host(t, buf, sizeof buf) == MGPU_OK && buf[23] == 1.5f, "copy out");
    MT_CHECK(mgpu_tensor_copy_to_host(t, buf, 8) == MGPU_ERR_INVALID_ARG, "short dst rejected");
    MT_CHECK(mgpu_tensor_create(ctx, MGPU_F32, 2, bad) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "negative dim rejected");
    MT_CHECK(mgpu_tensor_create(ctx, (mgpu_dtype)42, 3, shape) == NULL, "bad dtype rejected");
    MT_CHECK(mgpu_tensor_create(ctx, MGPU_F32, 9, shape) == NULL, "ndim > 8 rejected");
    MT_CHECK(mgpu_tensor_set_requires_grad(NULL, 1) == MGPU_ERR_INVALID_ARG, "null tensor");
    mgpu_tensor_free(t);
    mgpu_context_destroy(ctx);
}

typedef struct { int64_t hits[1000]; } mt_pf_arg;
static void mt_pf_body(void *arg, int64_t b, int64_t e) { int64_t i; for (i = b; i < e; i++) ((mt_pf_arg *)arg)->hits[i]++; }
static void test_parallel_for(void) {
    mgpu_context *ctx = mt_cpu_context(4);
    mt_pf_arg a;
    int rep, i, ok = 1;
    for (rep = 0; rep < 50; rep++) {
        memset(&a, 0, sizeof a);
        mgpu_parallel_for(ctx, 1000, 1, mt_pf_body, &a);
        for (i = 0; i < 1000; i++) if (a.hits[i] != 1) ok = 0;
    }
    MT_CHECK(ok, "every index exactly once");
    MT_CHECK(mgpu_context_num_threads(ctx) == 4, "threads %d", mgpu_context_num_threads(ctx));
    mgpu_context_destroy(ctx);
}

static void test_backward_errors(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    int64_t s[1] = {3};
    mgpu_tensor *t = mgpu_tensor_create(ctx, MGPU_F32, 1, s);
    MT_CHECK(mgpu_backward(ctx, t) == MGPU_ERR_SHAPE, "non-scalar loss");
    MT_CHECK(mgpu_backward(ctx, NULL) == MGPU_ERR_INVALID_ARG, "null loss");
    mgpu_tensor_free(t);
    mgpu_context_destroy(ctx);
}

int main(void) {
    MT_RUN(test_result_strings);
    MT_RUN(test_half_conversions);
    MT_RUN(test_rng);
    MT_RUN(test_device_parse);
    MT_RUN(test_tensor_basics);
    MT_RUN(test_parallel_for);
    MT_RUN(test_backward_errors);
    return MT_END();
}
