/* mgpu's communicator backends on CUDA tensors, under the CUDA emulation, run by mgpurun with W
   processes (tests/emu_test.sh: W = 2 and 4, MGPU_EMU_DEVICES=W so each rank has its own device):

   - the nccl backend (emulated NCCL through shared memory) all-reduces (sum and avg) the same
     inputs as the shm backend and must give the same bits, for host buffers (staged through the
     device) and for CUDA tensors;
   - both backends take CUDA tensors whose data a copy on the context's non-blocking stream just
     wrote, so the stream-order checker sees whether each backend orders its reads after that
     stream's work (the nccl backend once waited on an event of the legacy stream, the shm backend
     staged with blocking copies on the legacy stream: both were races);
   - broadcast, all-gather and reduce-scatter of CUDA tensors agree between the backends.
   Prints "RESULT ...: N passed, M failed" per rank. */
#define MGPU_IMPLEMENTATION
#include "mgpu.h"
#include "mgpu_test.h"
#include <cuda_runtime_api.h>

static mgpu_comm *shm, *nccl;
static mgpu_context *host_ctx, *dev_ctx;   /* dev_ctx: a context carrying the non-blocking stream */
static cudaStream_t stream;
static int rank, world, device;

static void fill(float *x, int64_t n, int seed) {
    uint64_t s = 0x9e3779b97f4a7c15ULL * (uint64_t)(seed + 1);
    int64_t i;
    for (i = 0; i < n; i++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        x[i] = (float)((double)(s >> 11) * (1.0 / 9007199254740992.0) * 2.0 - 1.0) * (float)(1 + (i % 5));
    }
}

/* A CUDA tensor of n floats on this rank's device, its context's stream the non-blocking one, filled
   from host by an asynchronous copy on that stream (the "producer" the collective must wait for). */
static mgpu_tensor *cuda_tensor(const float *host, int64_t n) {
    void *d = NULL;
    mgpu_tensor *t;
    if (cudaMalloc(&d, sizeof(float) * (size_t)(n > 0 ? n : 1)) != cudaSuccess) return NULL;
    t = mgpu_tensor_wrap(dev_ctx, MGPU_F32, 1, &n, d);
    if (!t) return NULL;
    t->device.type = MGPU_DEVICE_CUDA;
    t->device.index = device;
    if (host && n) cudaMemcpyAsync(d, host, sizeof(float) * (size_t)n, cudaMemcpyHostToDevice, stream);
    return t;
}
/* Reads a CUDA tensor back on its stream (ordered after the collective by the backend's waits). */
static void cuda_read(const mgpu_tensor *t, float *host) {
    cudaMemcpyAsync(host, t->data, mgpu_tensor_nbytes(t), cudaMemcpyDeviceToHost, stream);
    cudaStreamSynchronize(stream);
}
static void cuda_tensor_free(mgpu_tensor *t) {
    if (!t) return;
    cudaStreamSynchronize(stream);
    cudaFree(t->data);
    mgpu_tensor_free(t);
}

static void test_allreduce_host_buffers(void) {
    int64_t sizes[4] = { 1, 7, 1000, 300001 }, n;
    int k, op;
    for (k = 0; k < 4; k++)
        for (op = 0; op < 2; op++) {
            n = sizes[k];
            float *a = (float *)malloc(sizeof(float) * (size_t)n), *b = (float *)malloc(sizeof(float) * (size_t)n);
            fill(a, n, rank * 100 + k);
            memcpy(b, a, sizeof(float) * (size_t)n);
            MT_CHECK(mgpu_comm_allreduce_f32(shm, a, n, (mgpu_reduce_op)op) == MGPU_OK, "shm allreduce: %s", mgpu_last_error());
            MT_CHECK(mgpu_comm_allreduce_f32(nccl, b, n, (mgpu_reduce_op)op) == MGPU_OK, "nccl allreduce: %s", mgpu_last_error());
            MT_CHECK(memcmp(a, b, sizeof(float) * (size_t)n) == 0, "n=%lld %s: nccl and shm all-reduce differ", (long long)n, op ? "avg" : "sum");
            free(a); free(b);
        }
}

static void test_allreduce_cuda_tensors(void) {
    int64_t sizes[3] = { 5, 4096, 300001 }, n;
    int k, op;
    for (k = 0; k < 3; k++)
        for (op = 0; op < 2; op++) {
            n = sizes[k];
            float *h = (float *)malloc(sizeof(float) * (size_t)n), *ref = (float *)malloc(sizeof(float) * (size_t)n);
            float *got = (float *)malloc(sizeof(float) * (size_t)n);
            mgpu_tensor *tn, *ts;
            fill(h, n, rank * 7 + k);
            memcpy(ref, h, sizeof(float) * (size_t)n);
            MT_CHECK(mgpu_comm_allreduce_f32(shm, ref, n, (mgpu_reduce_op)op) == MGPU_OK, "shm allreduce: %s", mgpu_last_error());
            tn = cuda_tensor(h, n);
            MT_CHECK(mgpu_comm_allreduce(nccl, tn, (mgpu_reduce_op)op) == MGPU_OK, "nccl allreduce of a CUDA tensor: %s", mgpu_last_error());
            cuda_read(tn, got);
            MT_CHECK(memcmp(ref, got, sizeof(float) * (size_t)n) == 0, "n=%lld %s: nccl on a CUDA tensor differs from shm", (long long)n, op ? "avg" : "sum");
            ts = cuda_tensor(h, n);
            MT_CHECK(mgpu_comm_allreduce(shm, ts, (mgpu_reduce_op)op) == MGPU_OK, "shm allreduce of a CUDA tensor: %s", mgpu_last_error());
            cuda_read(ts, got);
            MT_CHECK(memcmp(ref, got, sizeof(float) * (size_t)n) == 0, "n=%lld %s: shm on a staged CUDA tensor differs", (long long)n, op ? "avg" : "sum");
            cuda_tensor_free(tn); cuda_tensor_free(ts);
            free(h); free(ref); free(got);
        }
}

static void test_other_collectives(void) {
    int64_t n = 1003, nw = n * world;
    float *h = (float *)malloc(sizeof(float) * (size_t)nw), *a = (float *)malloc(sizeof(float) * (size_t)nw);
    float *b = (float *)malloc(sizeof(float) * (size_t)nw);
    mgpu_comm *cs[2];
    int which;
    cs[0] = shm; cs[1] = nccl;
    /* broadcast from the last rank */
    for (which = 0; which < 2; which++) {
        mgpu_tensor *t;
        fill(h, n, rank + 11);
        t = cuda_tensor(h, n);
        MT_CHECK(mgpu_comm_broadcast(cs[which], t, world - 1) == MGPU_OK, "broadcast: %s", mgpu_last_error());
        cuda_read(t, which ? b : a);
        cuda_tensor_free(t);
    }
    fill(h, n, world - 1 + 11);
    MT_CHECK(memcmp(a, h, sizeof(float) * (size_t)n) == 0 && memcmp(b, h, sizeof(float) * (size_t)n) == 0, "broadcast: wrong data");
    /* all-gather */
    for (which = 0; which < 2; which++) {
        mgpu_tensor *in, *out;
        fill(h, n, rank + 21);
        in = cuda_tensor(h, n);
        out = cuda_tensor(NULL, nw);
        MT_CHECK(mgpu_comm_allgather(cs[which], in, out) == MGPU_OK, "allgather: %s", mgpu_last_error());
        cuda_read(out, which ? b : a);
        cuda_tensor_free(in); cuda_tensor_free(out);
    }
    MT_CHECK(memcmp(a, b, sizeof(float) * (size_t)nw) == 0, "allgather: nccl and shm differ");
    /* reduce-scatter, summed */
    for (which = 0; which < 2; which++) {
        mgpu_tensor *in, *out;
        fill(h, nw, rank + 31);
        in = cuda_tensor(h, nw);
        out = cuda_tensor(NULL, n);
        MT_CHECK(mgpu_comm_reduce_scatter(cs[which], in, out, MGPU_REDUCE_SUM) == MGPU_OK, "reduce_scatter: %s", mgpu_last_error());
        cuda_read(out, which ? b : a);
        cuda_tensor_free(in); cuda_tensor_free(out);
    }
    MT_CHECK(memcmp(a, b, sizeof(float) * (size_t)n) == 0, "reduce_scatter: nccl and shm differ");
    free(h); free(a); free(b);
}

int main(void) {
    mgpu_comm_desc d;
    mgpu_dist_env env;
    if (mgpu_dist_env_read(&env) != MGPU_OK) { fprintf(stderr, "%s\n", mgpu_last_error()); return 2; }
    rank = env.rank; world = env.world_size; device = env.local_rank;
    if (cudaSetDevice(device) != cudaSuccess) { fprintf(stderr, "rank %d: no device %d (MGPU_EMU_DEVICES)\n", rank, device); return 2; }
    host_ctx = mt_cpu_context(1);
    dev_ctx = mt_cpu_context(1);
    if (!host_ctx || !dev_ctx || cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) { fprintf(stderr, "setup failed\n"); return 2; }
    dev_ctx->cuda_stream = stream;   /* what a CUDA context holds: its tensors' work runs on this stream */
    memset(&d, 0, sizeof d);
    d.backend = MGPU_COMM_SHM;
    shm = mgpu_comm_create(&d);
    /* the second rendezvous on its own port: rank 0's store of the first serves until every rank left */
    env.master_port = env.master_port < 65535 ? env.master_port + 1 : env.master_port - 1;
    d.backend = MGPU_COMM_NCCL;
    d.env = &env;
    nccl = shm ? mgpu_comm_create(&d) : NULL;
    if (!shm || !nccl) { fprintf(stderr, "rank %d: communicator: %s\n", rank, mgpu_last_error()); return 2; }
    MT_RUN(test_allreduce_host_buffers);
    MT_RUN(test_allreduce_cuda_tensors);
    MT_RUN(test_other_collectives);
    mgpu_comm_destroy(nccl);
    mgpu_comm_destroy(shm);
    cudaStreamDestroy(stream);
    mgpu_context_destroy(dev_ctx);
    mgpu_context_destroy(host_ctx);
    return MT_END();
}
