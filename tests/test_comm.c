/* Communicators: environment parsing (torchrun, SLURM, Open MPI), the TCP rendezvous, the shm backend
   across real processes (fork), the threads backend, asynchronous all-reduces, and the failures that
   must end in clear errors instead of hangs (a rank that never starts, a rank that dies, an
   unreachable master, a port in use, ranks that disagree). Sums must equal the rank-order sum
   bit for bit on every rank. */
#define _GNU_SOURCE /* setenv, fork, kill */
#include "mgpu_test.h"
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int quick = 0;   /* MGPU_TEST_QUICK: smaller buffers (still larger than a staging slot) */

static void mt_sleep(double s) {
    struct timespec ts;
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
    nanosleep(&ts, NULL);
}

/* ---- helpers ---- */

static const char *mt_env_vars[] = {
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NODEID",
    "SLURM_JOB_NODELIST", "SLURM_NODELIST", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE", "MGPU_TIMEOUT_S", "NCCL_TIMEOUT", NULL};

static void mt_env_clear(void) {
    int i;
    for (i = 0; mt_env_vars[i]; i++) unsetenv(mt_env_vars[i]);
}
/* "NAME=value NAME2=value2" (values without spaces). */
static void mt_env_set(const char *list) {
    char buf[1024], *tok, *save = NULL;
    snprintf(buf, sizeof buf, "%s", list);
    for (tok = strtok_r(buf, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
        char *eq = strchr(tok, '=');
        if (!eq) continue;
        *eq = 0;
        setenv(tok, eq + 1, 1);
    }
}

/* A TCP port nobody listens on right now (bind port 0, read it back, close). */
static int mt_free_port(void) {
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0), port = 0;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && getsockname(fd, (struct sockaddr *)&a, &len) == 0) port = ntohs(a.sin_port);
    if (fd >= 0) close(fd);
    return port;
}

/* Segments in /dev/shm created by process pid (named /mgpu-PID-NONCE). */
static int mt_shm_leftovers(int pid) {
    char prefix[64];
    struct dirent *de;
    DIR *d = opendir("/dev/shm");
    int n = 0;
    if (!d) return 0;
    snprintf(prefix, sizeof prefix, "mgpu-%d-", pid);
    while ((de = readdir(d)) != NULL) if (strncmp(de->d_name, prefix, strlen(prefix)) == 0) n++;
    closedir(d);
    return n;
}

static mgpu_dist_env mt_env(int rank, int world, int port) {
    mgpu_dist_env e;
    memset(&e, 0, sizeof e);
    e.rank = rank; e.world_size = world; e.local_rank = rank; e.local_world_size = world;
    snprintf(e.master_addr, sizeof e.master_addr, "127.0.0.1");
    e.master_port = port;
    e.source = "test";
    return e;
}

/* Checks inside ranks (processes or threads) count into a local `fails` and name the rank. */
#define CK(cond, ...) do { if (!(cond)) { fails++; fprintf(stderr, "  [rank %d] check failed at line %d: %s: ", rank, __LINE__, #cond); \
    fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); } } while (0)

/* Rank r's value i: signs and exponents spread widely, so float sums depend on the order. */
static float mt_val(int rank, int64_t i, int salt) {
    uint32_t h = mgpu_random_u32((uint64_t)salt * 7919u + (uint64_t)rank, (uint64_t)i);
    float m = 1.0f + (float)((h >> 8) & 0xffff) / 65536.0f;
    return ((h >> 31) ? -1.0f : 1.0f) * ldexpf(m, (int)(h % 41) - 20);
}
static float mt_rank_sum(int world, int64_t i, int salt, int avg, int reverse) {
    float s = mt_val(reverse ? world - 1 : 0, i, salt);
    int r;
    for (r = 1; r < world; r++) s += mt_val(reverse ? world - 1 - r : r, i, salt);
    return avg ? s / (float)world : s;
}
static int mt_same_bits(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

/* ---- the collectives every backend must get right (run by each rank) ---- */

static int mt_check_allreduce_sizes(mgpu_comm *c, int rank, int world) {
    int64_t sizes[4] = {0, 1, 7, 1000000};
    int fails = 0, s, avg;
    if (quick) sizes[3] = 300000;   /* still more than one 1 MiB staging half */
    for (s = 0; s < 4; s++) {
        for (avg = 0; avg < 2; avg++) {
            int64_t n = sizes[s], i, bad = 0, order_matters = 0;
            int salt = 10 * s + avg;
            float *buf = (float *)malloc(sizeof(float) * (size_t)(n ? n : 1));
            for (i = 0; i < n; i++) buf[i] = mt_val(rank, i, salt);
            CK(mgpu_comm_allreduce_f32(c, buf, n, avg ? MGPU_REDUCE_AVG : MGPU_REDUCE_SUM) == MGPU_OK, "size %lld: %s", (long long)n, mgpu_last_error());
            for (i = 0; i < n; i++) {
                float want = mt_rank_sum(world, i, salt, avg, 0);
                if (!mt_same_bits(buf[i], want)) { if (bad++ < 3) fprintf(stderr, "  [rank %d] elem %lld: %.9g, rank-order sum %.9g\n", rank, (long long)i, buf[i], want); }
                if (s == 3 && !avg && world >= 3 && i < 10000 && !mt_same_bits(want, mt_rank_sum(world, i, salt, 0, 1))) order_matters++;
            }
            CK(bad == 0, "size %lld %s: %lld elements differ from the rank-order sum", (long long)n, avg ? "avg" : "sum", (long long)bad);
            if (s == 3 && !avg && world >= 3) CK(order_matters > 100, "the test data should make the sum depend on the order (%lld of 10000)", (long long)order_matters);
            free(buf);
        }
    }
    return fails;
}

static int mt_check_tensor_collectives(mgpu_comm *c, mgpu_context *ctx, int rank, int world) {
    int64_t n = quick ? 300000 : 1000000, i, bad = 0, shape[1];
    float small[7], *big = (float *)malloc(sizeof(float) * (size_t)n);
    double d[5];
    int32_t ids[10];
    mgpu_tensor *t;
    int fails = 0, q;
    /* F32 tensor all-reduce (sum) */
    for (i = 0; i < 7; i++) small[i] = mt_val(rank, i, 50);
    shape[0] = 7;
    t = mgpu_tensor_wrap(ctx, MGPU_F32, 1, shape, small);
    CK(mgpu_comm_allreduce(c, t, MGPU_REDUCE_SUM) == MGPU_OK, "%s", mgpu_last_error());
    for (i = 0; i < 7; i++) CK(mt_same_bits(small[i], mt_rank_sum(world, i, 50, 0, 0)), "tensor elem %lld", (long long)i);
    mgpu_tensor_free(t);
    /* doubles: rank-order sum in double, then the average */
    for (i = 0; i < 5; i++) d[i] = 0.1 * (double)(rank + 1) + 1e-9 * (double)i;
    CK(mgpu_comm_allreduce_f64(c, d, 5, MGPU_REDUCE_AVG) == MGPU_OK, "%s", mgpu_last_error());
    for (i = 0; i < 5; i++) {
        double want = 0.1 + 1e-9 * (double)i;
        for (q = 1; q < world; q++) want += 0.1 * (double)(q + 1) + 1e-9 * (double)i;
        want /= world;
        CK(memcmp(&d[i], &want, sizeof want) == 0, "f64 avg elem %lld: %.17g want %.17g", (long long)i, d[i], want);
    }
    /* broadcast of an I32 tensor from root 1 */
    for (i = 0; i < 10; i++) ids[i] = rank * 1000 + (int32_t)i;
    shape[0] = 10;
    t = mgpu_tensor_wrap(ctx, MGPU_I32, 1, shape, ids);
    CK(mgpu_comm_broadcast(c, t, 1) == MGPU_OK, "%s", mgpu_last_error());
    for (i = 0; i < 10; i++) CK(ids[i] == 1000 + i, "broadcast elem %lld is %d", (long long)i, ids[i]);
    mgpu_tensor_free(t);
    /* broadcast of a large tensor (several staging rounds) from the last rank */
    for (i = 0; i < n; i++) big[i] = mt_val(rank, i, 60);
    shape[0] = n;
    t = mgpu_tensor_wrap(ctx, MGPU_F32, 1, shape, big);
    CK(mgpu_comm_broadcast(c, t, world - 1) == MGPU_OK, "%s", mgpu_last_error());
    for (i = 0; i < n; i++) if (!mt_same_bits(big[i], mt_val(world - 1, i, 60))) bad++;
    CK(bad == 0, "large broadcast: %lld elements differ", (long long)bad);
    mgpu_tensor_free(t);
    free(big);
    {   /* allgather of tensors: rank q's block at q * numel */
        float in[5], *out = (float *)malloc(sizeof(float) * 5 * (size_t)world);
        int64_t sin[1] = {5}, sout[1];
        mgpu_tensor *ti, *to;
        sout[0] = 5 * world;
        for (i = 0; i < 5; i++) in[i] = (float)(rank * 100 + i);
        ti = mgpu_tensor_wrap(ctx, MGPU_F32, 1, sin, in);
        to = mgpu_tensor_wrap(ctx, MGPU_F32, 1, sout, out);
        CK(mgpu_comm_allgather(c, ti, to) == MGPU_OK, "%s", mgpu_last_error());
        for (q = 0; q < world; q++) for (i = 0; i < 5; i++) CK(out[q * 5 + i] == (float)(q * 100 + i), "allgather block %d elem %lld = %g", q, (long long)i, out[q * 5 + i]);
        mgpu_tensor_free(ti); mgpu_tensor_free(to); free(out);
    }
    {   /* allgather_bytes larger than a staging half */
        size_t bytes = (size_t)1536 << 10, k;
        unsigned char *in = (unsigned char *)malloc(bytes), *out = (unsigned char *)malloc(bytes * (size_t)world);
        for (k = 0; k < bytes; k++) in[k] = (unsigned char)(rank * 7 + k * 13);
        CK(mgpu_comm_allgather_bytes(c, in, bytes, out) == MGPU_OK, "%s", mgpu_last_error());
        bad = 0;
        for (q = 0; q < world; q++) for (k = 0; k < bytes; k++) if (out[(size_t)q * bytes + k] != (unsigned char)(q * 7 + k * 13)) bad++;
        CK(bad == 0, "allgather_bytes: %lld bytes differ", (long long)bad);
        free(in); free(out);
    }
    {   /* reduce_scatter: block `rank` of every rank's input, summed in rank order, in several chunks */
        int64_t m = quick ? 70000 : 300000, sin[1], sout[1] = {m};
        float *in = (float *)malloc(sizeof(float) * (size_t)(m * world)), *out = (float *)malloc(sizeof(float) * (size_t)m);
        mgpu_tensor *ti, *to;
        sin[0] = m * world;
        for (i = 0; i < m * world; i++) in[i] = mt_val(rank, i, 70);
        ti = mgpu_tensor_wrap(ctx, MGPU_F32, 1, sin, in);
        to = mgpu_tensor_wrap(ctx, MGPU_F32, 1, sout, out);
        CK(mgpu_comm_reduce_scatter(c, ti, to, MGPU_REDUCE_SUM) == MGPU_OK, "%s", mgpu_last_error());
        bad = 0;
        for (i = 0; i < m; i++) if (!mt_same_bits(out[i], mt_rank_sum(world, (int64_t)rank * m + i, 70, 0, 0))) bad++;
        CK(bad == 0, "reduce_scatter: %lld elements differ from the rank-order sum", (long long)bad);
        mgpu_tensor_free(ti); mgpu_tensor_free(to); free(in); free(out);
    }
    return fails;
}

static int mt_check_barrier_and_mismatch(mgpu_comm *c, int rank) {
    float buf[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    int fails = 0;
    double t0;
    mgpu_result r;
    /* a barrier holds everyone until the slowest rank arrives */
    CK(mgpu_comm_barrier(c) == MGPU_OK, "%s", mgpu_last_error());   /* line up first */
    if (rank == 0) mt_sleep(0.2);
    t0 = mgpu_time_s();
    CK(mgpu_comm_barrier(c) == MGPU_OK, "%s", mgpu_last_error());
    if (rank != 0) CK(mgpu_time_s() - t0 > 0.12, "barrier returned after %.3f s, before rank 0 arrived", mgpu_time_s() - t0);
    /* ranks calling with different sizes: every rank gets the same clear error, and the group goes on */
    r = mgpu_comm_allreduce_f32(c, buf, rank == 0 ? 8 : 7, MGPU_REDUCE_SUM);
    CK(r == MGPU_ERR_INVALID_ARG, "mismatched sizes gave %d", (int)r);
    CK(strstr(mgpu_last_error(), "disagree") && strstr(mgpu_last_error(), "8") && strstr(mgpu_last_error(), "7"), "message: %s", mgpu_last_error());
    CK(mgpu_comm_barrier(c) == MGPU_OK, "usable after a mismatch: %s", mgpu_last_error());
    return fails;
}

static int mt_check_async(mgpu_comm *c, int rank, int world) {
    enum { K = 6 };
    int64_t sizes[K] = {1000, 300000, 7, 0, 50000, 123457}, i, bad = 0;
    float *bufs[K], blocking[3];
    mgpu_comm_work *w[K];
    int fails = 0, k;
    for (k = 0; k < K; k++) {
        bufs[k] = (float *)malloc(sizeof(float) * (size_t)(sizes[k] ? sizes[k] : 1));
        for (i = 0; i < sizes[k]; i++) bufs[k][i] = mt_val(rank, i, 80 + k);
        w[k] = mgpu_comm_allreduce_f32_async(c, bufs[k], sizes[k], k == 2 ? MGPU_REDUCE_AVG : MGPU_REDUCE_SUM);
        CK(w[k] != NULL, "async %d: %s", k, mgpu_last_error());
    }
    /* issue order is completion order: once the last is done, all are */
    CK(w[K - 1] && mgpu_comm_wait(w[K - 1]) == MGPU_OK, "%s", mgpu_last_error());
    for (k = 0; k < K - 1; k++) CK(w[k] && mgpu_comm_work_done(w[k]), "work %d not done after work %d", k, K - 1);
    for (k = K - 2; k >= 0; k--) CK(w[k] && mgpu_comm_wait(w[k]) == MGPU_OK, "%s", mgpu_last_error());
    for (k = 0; k < K; k++) {
        for (i = 0; i < sizes[k]; i++) if (!mt_same_bits(bufs[k][i], mt_rank_sum(world, i, 80 + k, k == 2, 0))) bad++;
        free(bufs[k]);
    }
    CK(bad == 0, "async all-reduces: %lld elements differ from the rank-order sum", (long long)bad);
    /* a blocking collective runs after the asynchronous ones issued before it */
    bufs[0] = (float *)malloc(sizeof(float) * 200000);
    for (i = 0; i < 200000; i++) bufs[0][i] = 1.0f;
    w[0] = mgpu_comm_allreduce_f32_async(c, bufs[0], 200000, MGPU_REDUCE_SUM);
    blocking[0] = blocking[1] = blocking[2] = (float)rank;
    CK(mgpu_comm_allreduce_f32(c, blocking, 3, MGPU_REDUCE_SUM) == MGPU_OK, "%s", mgpu_last_error());
    CK(w[0] && mgpu_comm_work_done(w[0]), "the earlier async all-reduce should be complete");
    CK(blocking[2] == (float)(world * (world - 1) / 2), "blocking sum %g", blocking[2]);
    CK(w[0] && mgpu_comm_wait(w[0]) == MGPU_OK && bufs[0][199999] == (float)world, "async after blocking: %g", bufs[0][199999]);
    free(bufs[0]);
    return fails;
}

static int mt_collectives(mgpu_comm *c, int rank, int world) {
    mgpu_context *ctx = mt_cpu_context(1);
    int fails = 0;
    CK(mgpu_comm_rank(c) == rank && mgpu_comm_world_size(c) == world && mgpu_comm_local_rank(c) == rank,
       "rank %d world %d local %d", mgpu_comm_rank(c), mgpu_comm_world_size(c), mgpu_comm_local_rank(c));
    fails += mt_check_allreduce_sizes(c, rank, world);
    fails += mt_check_tensor_collectives(c, ctx, rank, world);
    fails += mt_check_barrier_and_mismatch(c, rank);
    fails += mt_check_async(c, rank, world);
    mgpu_context_destroy(ctx);
    return fails;
}

/* ---- processes ---- */

typedef int (*mt_rank_fn)(int rank, int world, void *arg);

/* Forks one process per rank in [0, world) (only those with start[r] set, when start is given) with
   torchrun's variables for a job on 127.0.0.1:port; each dies by alarm after limit_s. Reaps them in
   rank order (a rank that exits early stays a zombie meanwhile, as under a slow launcher). Returns
   the number of ranks that failed; *rank0_pid gets rank 0's pid. */
static int mt_spawn(int world, const int *start, int port, unsigned limit_s, mt_rank_fn fn, void *arg, int *rank0_pid) {
    pid_t pids[8];
    int r, failed = 0;
    fflush(stdout); fflush(stderr);
    for (r = 0; r < world; r++) {
        char v[32];
        pids[r] = -1;
        if (start && !start[r]) continue;
        pids[r] = fork();
        if (pids[r] == 0) {
            snprintf(v, sizeof v, "%d", r); setenv("RANK", v, 1); setenv("LOCAL_RANK", v, 1);
            snprintf(v, sizeof v, "%d", world); setenv("WORLD_SIZE", v, 1); setenv("LOCAL_WORLD_SIZE", v, 1);
            snprintf(v, sizeof v, "%d", port); setenv("MASTER_PORT", v, 1);
            setenv("MASTER_ADDR", "127.0.0.1", 1);
            alarm(limit_s);
            r = fn(r, world, arg);
            fflush(stdout); fflush(stderr);
            exit(r ? 1 : 0);
        }
    }
    if (rank0_pid) *rank0_pid = (int)pids[0];
    for (r = 0; r < world; r++) {
        int status = 0;
        if (pids[r] <= 0) continue;
        if (waitpid(pids[r], &status, 0) != pids[r] || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            failed++;
            fprintf(stderr, "  rank %d (pid %d) failed: %s %d\n", r, (int)pids[r], WIFSIGNALED(status) ? "signal" : "exit code",
                    WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
        }
    }
    return failed;
}

static int mt_rank_collectives(int rank, int world, void *arg) {
    mgpu_comm_desc d;
    mgpu_comm *c;
    int fails = 0;
    (void)arg;
    memset(&d, 0, sizeof d);
    d.backend = MGPU_COMM_SHM;
    d.timeout_s = 30;
    c = mgpu_comm_create(&d);   /* from the environment */
    CK(c != NULL, "create: %s", mgpu_last_error());
    if (!c) return fails;
    CK(mgpu_comm_backend_of(c) == MGPU_COMM_SHM, "backend");
    fails += mt_collectives(c, rank, world);
    mgpu_comm_destroy(c);
    return fails;
}

static void mt_shm_world(int world) {
    int pid0 = 0, failed = mt_spawn(world, NULL, mt_free_port(), 60, mt_rank_collectives, NULL, &pid0);
    MT_CHECK(failed == 0, "%d of %d ranks failed", failed, world);
    MT_CHECK(mt_shm_leftovers(pid0) == 0, "shared memory segments of rank 0 left in /dev/shm");
}
static void test_shm_world2(void) { mt_shm_world(2); }
static void test_shm_world4(void) { mt_shm_world(4); }

/* ---- threads backend ---- */

typedef struct mt_thread_arg { mgpu_comm *c; int rank, world, fails; } mt_thread_arg;
static void *mt_thread_main(void *p) {
    mt_thread_arg *a = (mt_thread_arg *)p;
    a->fails = mt_collectives(a->c, a->rank, a->world);
    return NULL;
}

static void test_threads_backend(void) {
    mgpu_comm *comms[3];
    pthread_t th[3];
    mt_thread_arg args[3];
    int i;
    MT_CHECK(mgpu_comm_create_threads(3, 30, comms) == MGPU_OK, "%s", mgpu_last_error());
    for (i = 0; i < 3; i++) {
        args[i].c = comms[i]; args[i].rank = i; args[i].world = 3; args[i].fails = 0;
        MT_CHECK(mgpu_comm_backend_of(comms[i]) == MGPU_COMM_THREADS, "backend");
        pthread_create(&th[i], NULL, mt_thread_main, &args[i]);
    }
    for (i = 0; i < 3; i++) { pthread_join(th[i], NULL); MT_CHECK(args[i].fails == 0, "thread rank %d: %d failed checks", i, args[i].fails); }
    for (i = 0; i < 3; i++) mgpu_comm_destroy(comms[i]);
}

/* A rank that never enters the barrier: the others time out naming it and the collective; it then
   learns that the group was aborted. */
typedef struct mt_barrier_arg { mgpu_comm *c; mgpu_result r; double seconds; char msg[512]; } mt_barrier_arg;
static void *mt_barrier_main(void *p) {
    mt_barrier_arg *a = (mt_barrier_arg *)p;
    double t0 = mgpu_time_s();
    a->r = mgpu_comm_barrier(a->c);
    a->seconds = mgpu_time_s() - t0;
    snprintf(a->msg, sizeof a->msg, "%s", mgpu_last_error());
    return NULL;
}
static void test_threads_barrier_timeout(void) {
    mgpu_comm *comms[3];
    pthread_t th[2];
    mt_barrier_arg a[2];
    int i;
    MT_CHECK(mgpu_comm_create_threads(3, 1.0, comms) == MGPU_OK, "%s", mgpu_last_error());
    for (i = 0; i < 2; i++) { memset(&a[i], 0, sizeof a[i]); a[i].c = comms[i]; pthread_create(&th[i], NULL, mt_barrier_main, &a[i]); }
    for (i = 0; i < 2; i++) {
        pthread_join(th[i], NULL);
        MT_CHECK(a[i].r == MGPU_ERR_TIMEOUT, "rank %d got %d: %s", i, (int)a[i].r, a[i].msg);
        MT_CHECK(strstr(a[i].msg, "barrier") && strstr(a[i].msg, "rank 2"), "names the collective and rank 2: %s", a[i].msg);
        MT_CHECK(a[i].seconds > 0.9 && a[i].seconds < 3.0, "timed out after %.2f s (timeout 1 s)", a[i].seconds);
    }
    MT_CHECK(mgpu_comm_barrier(comms[0]) == MGPU_ERR_STATE && strstr(mgpu_last_error(), "failed earlier"), "broken afterwards: %s", mgpu_last_error());
    mgpu_clear_error();
    MT_CHECK(mgpu_comm_barrier(comms[2]) == MGPU_ERR_TIMEOUT && strstr(mgpu_last_error(), "aborted the group") && strstr(mgpu_last_error(), "rank 2"),
             "the late rank learns why: %s", mgpu_last_error());
    for (i = 0; i < 3; i++) mgpu_comm_destroy(comms[i]);
}

/* The barrier of 3 threads ranks that rank 2 never enters, with the timeout left to the
   environment: returns how long rank 0 waited (negative when creation failed). */
static double mt_env_barrier_timeout(void) {
    mgpu_comm *comms[3];
    mt_barrier_arg a;
    int i;
    if (mgpu_comm_create_threads(3, 0, comms) != MGPU_OK) return -1;
    memset(&a, 0, sizeof a);
    a.c = comms[0];
    mt_barrier_main(&a);   /* rank 1 absent too: rank 0 alone waits out the timeout */
    MT_CHECK(a.r == MGPU_ERR_TIMEOUT, "got %d: %s", (int)a.r, a.msg);
    for (i = 0; i < 3; i++) mgpu_comm_destroy(comms[i]);
    return a.seconds;
}

static char mt_log_text[2048];
static void mt_capture_log(mgpu_log_level level, const char *message, void *user) {
    size_t n = strlen(mt_log_text);
    (void)level; (void)user;
    snprintf(mt_log_text + n, sizeof mt_log_text - n, "%s\n", message);
}

/* NCCL_TIMEOUT (the seeds' variable) bounds the waits when MGPU_TIMEOUT_S is unset, and rank 0 says
   where the timeout came from; MGPU_TIMEOUT_S wins when both are set; a malformed value is an error
   naming the variable; ranks other than 0 stay quiet. */
static void test_timeout_variables(void) {
    mgpu_comm_desc d;
    mgpu_dist_env e = mt_env(1, 2, mt_free_port());
    double t;
    mt_env_clear();
    mt_log_text[0] = 0;
    mgpu_set_logger(mt_capture_log, NULL);
    setenv("NCCL_TIMEOUT", "1", 1);
    t = mt_env_barrier_timeout();
    MT_CHECK(t > 0.9 && t < 3.0, "NCCL_TIMEOUT=1: waited %.2f s", t);
    MT_CHECK(strstr(mt_log_text, "from NCCL_TIMEOUT") && strstr(mt_log_text, "MGPU_TIMEOUT_S is unset"), "says so naming both: %s", mt_log_text);
    mt_log_text[0] = 0;
    setenv("NCCL_TIMEOUT", "60", 1);
    setenv("MGPU_TIMEOUT_S", "1", 1);
    t = mt_env_barrier_timeout();
    MT_CHECK(t > 0.9 && t < 3.0, "MGPU_TIMEOUT_S=1 over NCCL_TIMEOUT=60: waited %.2f s", t);
    MT_CHECK(strstr(mt_log_text, "from MGPU_TIMEOUT_S") && strstr(mt_log_text, "NCCL_TIMEOUT='60' is ignored"), "says which won: %s", mt_log_text);
    unsetenv("MGPU_TIMEOUT_S");
    setenv("NCCL_TIMEOUT", "30m", 1);
    mgpu_clear_error();
    MT_CHECK(mt_env_barrier_timeout() < 0 && mgpu_last_result() == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "NCCL_TIMEOUT='30m'"),
             "malformed NCCL_TIMEOUT: %s", mgpu_last_error());
    /* rank 1 of 2 with nobody listening: fails after NCCL_TIMEOUT and logs nothing about it */
    setenv("NCCL_TIMEOUT", "1", 1);
    memset(&d, 0, sizeof d);
    d.env = &e;
    mt_log_text[0] = 0;
    t = mgpu_time_s();
    MT_CHECK(mgpu_comm_create(&d) == NULL && mgpu_last_result() == MGPU_ERR_TIMEOUT && strstr(mgpu_last_error(), "after 1 s"), "rank 1: %s", mgpu_last_error());
    t = mgpu_time_s() - t;
    MT_CHECK(t > 0.5 && t < 3.5, "rank 1 failed after %.2f s with NCCL_TIMEOUT=1", t);
    MT_CHECK(strstr(mt_log_text, "NCCL_TIMEOUT") == NULL, "only rank 0 says it: %s", mt_log_text);
    mgpu_set_logger(NULL, NULL);
    mt_env_clear();
}

/* A rank that destroys its communicator while another waits for it: an error at once. */
static void test_threads_departed_rank(void) {
    mgpu_comm *comms[2];
    pthread_t th;
    mt_barrier_arg a;
    memset(&a, 0, sizeof a);
    MT_CHECK(mgpu_comm_create_threads(2, 20, comms) == MGPU_OK, "%s", mgpu_last_error());
    a.c = comms[1];
    pthread_create(&th, NULL, mt_barrier_main, &a);
    mt_sleep(0.1);
    mgpu_comm_destroy(comms[0]);
    pthread_join(th, NULL);
    MT_CHECK(a.r == MGPU_ERR_STATE && strstr(a.msg, "rank 0 left"), "got %d: %s", (int)a.r, a.msg);
    MT_CHECK(a.seconds < 2, "noticed after %.2f s", a.seconds);
    mgpu_comm_destroy(comms[1]);
}

/* ---- environment ---- */

static void test_env_sources(void) {
    mgpu_dist_env e;
    mt_env_clear();
    MT_CHECK(mgpu_dist_env_read(&e) == MGPU_OK && e.rank == 0 && e.world_size == 1 && e.local_world_size == 1 && strcmp(e.source, "single") == 0,
             "single: %s", mgpu_last_error());
    mt_env_set("RANK=3 WORLD_SIZE=4 LOCAL_RANK=1 LOCAL_WORLD_SIZE=2 MASTER_ADDR=node7 MASTER_PORT=29500");
    MT_CHECK(mgpu_dist_env_read(&e) == MGPU_OK, "%s", mgpu_last_error());
    MT_CHECK(e.rank == 3 && e.world_size == 4 && e.local_rank == 1 && e.local_world_size == 2 && strcmp(e.master_addr, "node7") == 0 &&
             e.master_port == 29500 && strcmp(e.source, "torchrun") == 0, "torchrun: %d %d %d %d %s %d %s", e.rank, e.world_size, e.local_rank,
             e.local_world_size, e.master_addr, e.master_port, e.source);
    mt_env_set("SLURM_PROCID=1 SLURM_NTASKS=2");   /* torchrun's variables win */
    MT_CHECK(mgpu_dist_env_read(&e) == MGPU_OK && e.rank == 3 && strcmp(e.source, "torchrun") == 0, "precedence: %s", e.source);
    mt_env_clear();
    mt_env_set("SLURM_PROCID=5 SLURM_NTASKS=8 SLURM_LOCALID=1 SLURM_NTASKS_PER_NODE=4 SLURM_JOB_NODELIST=gpu01,gpu02 MASTER_PORT=1234");
    MT_CHECK(mgpu_dist_env_read(&e) == MGPU_OK, "%s", mgpu_last_error());
    MT_CHECK(e.rank == 5 && e.world_size == 8 && e.local_rank == 1 && e.local_world_size == 4 && strcmp(e.master_addr, "gpu01") == 0 &&
             e.master_port == 1234 && strcmp(e.source, "slurm") == 0, "slurm: %d %d %d %d %s", e.rank, e.world_size, e.local_rank, e.local_world_size, e.master_addr);
    mt_env_clear();
    mt_env_set("SLURM_PROCID=6 SLURM_NTASKS=7 SLURM_LOCALID=2 SLURM_TASKS_PER_NODE=2(x2),3 SLURM_NODEID=2 MASTER_ADDR=10.0.0.1 MASTER_PORT=1234");
    MT_CHECK(mgpu_dist_env_read(&e) == MGPU_OK && e.local_world_size == 3 && e.local_rank == 2 && strcmp(e.master_addr, "10.0.0.1") == 0,
             "slurm task list: local world %d: %s", e.local_world_size, mgpu_last_error());
    mt_env_clear();
    mt_env_set("OMPI_COMM_WORLD_RANK=1 OMPI_COMM_WORLD_SIZE=2 OMPI_COMM_WORLD_LOCAL_RANK=1 OMPI_COMM_WORLD_LOCAL_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=4000");
    MT_CHECK(mgpu_dist_env_read(&e) == MGPU_OK && e.rank == 1 && e.world_size == 2 && e.local_rank == 1 && e.local_world_size == 2 &&
             e.master_port == 4000 && strcmp(e.source, "openmpi") == 0, "openmpi: %s", mgpu_last_error());
    mt_env_clear();
    /* mpirun -np 2 on one host: MASTER_ADDR defaults to this host */
    mt_env_set("OMPI_COMM_WORLD_RANK=1 OMPI_COMM_WORLD_SIZE=2 OMPI_COMM_WORLD_LOCAL_RANK=1 OMPI_COMM_WORLD_LOCAL_SIZE=2 MASTER_PORT=4000");
    MT_CHECK(mgpu_dist_env_read(&e) == MGPU_OK && strcmp(e.master_addr, "127.0.0.1") == 0 && e.master_port == 4000,
             "openmpi on one host without MASTER_ADDR: '%s' %s", e.master_addr, mgpu_last_error());
    mt_env_clear();
    mt_env_set("RANK=0 WORLD_SIZE=1");   /* one process needs no master */
    MT_CHECK(mgpu_dist_env_read(&e) == MGPU_OK && e.world_size == 1, "world 1 without master: %s", mgpu_last_error());
    mt_env_clear();
    MT_CHECK(mgpu_dist_env_read(NULL) == MGPU_ERR_INVALID_ARG, "NULL out");
}

static void test_env_errors(void) {
    static const struct { const char *vars, *want1, *want2; } cases[] = {
        {"RANK=2 WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=1", "RANK='2'", "WORLD_SIZE='2'"},
        {"RANK=-1 WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=1", "RANK='-1'", "negative"},
        {"RANK=1x WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=1", "RANK='1x'", "not an integer"},
        {"RANK= WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=1", "RANK=''", "not an integer"},
        {"RANK=0 WORLD_SIZE=0", "WORLD_SIZE='0'", "positive"},
        {"RANK=0 WORLD_SIZE=-4", "WORLD_SIZE='-4'", "negative"},
        {"WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=1", "WORLD_SIZE='2'", "RANK"},
        {"RANK=0", "RANK='0'", "WORLD_SIZE"},
        {"RANK=1 WORLD_SIZE=4 LOCAL_RANK=2 LOCAL_WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=1", "LOCAL_RANK='2'", "LOCAL_WORLD_SIZE"},
        {"RANK=1 WORLD_SIZE=4 LOCAL_RANK=-2 MASTER_ADDR=h MASTER_PORT=1", "LOCAL_RANK='-2'", "negative"},
        {"RANK=1 WORLD_SIZE=4 LOCAL_WORLD_SIZE=8 MASTER_ADDR=h MASTER_PORT=1", "LOCAL_WORLD_SIZE='8'", "world size"},
        {"RANK=0 WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=70000", "MASTER_PORT='70000'", "65535"},
        {"RANK=0 WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=0", "MASTER_PORT='0'", "65535"},
        {"RANK=0 WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=http", "MASTER_PORT='http'", "not an integer"},
        {"RANK=0 WORLD_SIZE=2 MASTER_PORT=29500", "MASTER_ADDR", "not set"},
        {"RANK=0 WORLD_SIZE=2 MASTER_ADDR=h", "MASTER_PORT", "not set"},
        {"SLURM_PROCID=0", "SLURM_PROCID='0'", "SLURM_NTASKS"},
        {"SLURM_PROCID=4 SLURM_NTASKS=4 MASTER_ADDR=h MASTER_PORT=1", "SLURM_PROCID='4'", "SLURM_NTASKS='4'"},
        {"SLURM_PROCID=0 SLURM_NTASKS=4 SLURM_JOB_NODELIST=node[01-04] MASTER_PORT=1", "node[01-04]", "MASTER_ADDR"},
        {"SLURM_PROCID=0 SLURM_NTASKS=4 SLURM_TASKS_PER_NODE=four MASTER_ADDR=h MASTER_PORT=1", "SLURM_TASKS_PER_NODE='four'", "4(x2)"},
        {"OMPI_COMM_WORLD_RANK=3 OMPI_COMM_WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=1", "OMPI_COMM_WORLD_RANK='3'", "OMPI_COMM_WORLD_SIZE"},
        /* across hosts (local size below the world's) rank 0's host is unknown: no default */
        {"OMPI_COMM_WORLD_RANK=0 OMPI_COMM_WORLD_SIZE=4 OMPI_COMM_WORLD_LOCAL_SIZE=2 MASTER_PORT=1", "MASTER_ADDR", "not set"},
        {"OMPI_COMM_WORLD_RANK=0 OMPI_COMM_WORLD_SIZE=2 OMPI_COMM_WORLD_LOCAL_SIZE=2", "MASTER_PORT", "mpirun -x MASTER_PORT"},
    };
    mgpu_dist_env e;
    size_t i;
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        mgpu_result r;
        mt_env_clear();
        mt_env_set(cases[i].vars);
        mgpu_clear_error();
        r = mgpu_dist_env_read(&e);
        MT_CHECK(r == MGPU_ERR_INVALID_ARG, "[%s] gave %d", cases[i].vars, (int)r);
        MT_CHECK(strstr(mgpu_last_error(), cases[i].want1) && strstr(mgpu_last_error(), cases[i].want2),
                 "[%s] message should name '%s' and '%s': %s", cases[i].vars, cases[i].want1, cases[i].want2, mgpu_last_error());
    }
    mt_env_clear();
    setenv("MGPU_TIMEOUT_S", "soon", 1);
    MT_CHECK(mgpu_comm_create(NULL) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "MGPU_TIMEOUT_S='soon'"),
             "bad MGPU_TIMEOUT_S: %s", mgpu_last_error());
    mt_env_clear();
}

/* ---- one process, and argument checks ---- */

static void test_single_process(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    float v[4] = {1.5f, -2, 3, 0.25f}, out[4];
    int64_t s4[1] = {4};
    mgpu_tensor *t = mgpu_tensor_wrap(ctx, MGPU_F32, 1, s4, v), *o = mgpu_tensor_wrap(ctx, MGPU_F32, 1, s4, out);
    mgpu_comm *c;
    mgpu_comm_work *w;
    mt_env_clear();
    c = mgpu_comm_create(NULL);
    MT_CHECK(c && mgpu_comm_rank(c) == 0 && mgpu_comm_world_size(c) == 1 && mgpu_comm_local_rank(c) == 0, "single: %s", mgpu_last_error());
    if (c) {
        MT_CHECK(mgpu_comm_allreduce(c, t, MGPU_REDUCE_AVG) == MGPU_OK && v[1] == -2 && v[3] == 0.25f, "allreduce of one rank is the identity");
        MT_CHECK(mgpu_comm_broadcast(c, t, 0) == MGPU_OK && v[0] == 1.5f, "broadcast");
        MT_CHECK(mgpu_comm_allgather(c, t, o) == MGPU_OK && out[2] == 3, "allgather");
        MT_CHECK(mgpu_comm_reduce_scatter(c, t, o, MGPU_REDUCE_SUM) == MGPU_OK && out[3] == 0.25f, "reduce_scatter");
        MT_CHECK(mgpu_comm_barrier(c) == MGPU_OK, "barrier");
        w = mgpu_comm_allreduce_f32_async(c, v, 4, MGPU_REDUCE_SUM);
        MT_CHECK(w && mgpu_comm_wait(w) == MGPU_OK && v[0] == 1.5f, "async");
        w = mgpu_comm_allreduce_f32_async(c, v, 4, MGPU_REDUCE_SUM);   /* never waited: destroy frees it */
        MT_CHECK(w != NULL, "second async");
    }
    mgpu_comm_destroy(c);
    mgpu_tensor_free(t); mgpu_tensor_free(o);
    mgpu_context_destroy(ctx);
    MT_CHECK(mt_shm_leftovers(getpid()) == 0, "a world of one uses no shared memory segment");
}

static void test_argument_errors(void) {
    mgpu_context *ctx = mt_cpu_context(1);
    float v[6] = {0};
    int32_t iv[2] = {0};
    int64_t s2[1] = {2}, s3[1] = {3};
    mgpu_tensor *t2 = mgpu_tensor_wrap(ctx, MGPU_F32, 1, s2, v), *t3 = mgpu_tensor_wrap(ctx, MGPU_F32, 1, s3, v + 2);
    mgpu_tensor *ti = mgpu_tensor_wrap(ctx, MGPU_I32, 1, s2, iv);
    mgpu_comm *comms[2], *bad[1];
    mgpu_comm_desc d;
    mgpu_dist_env e = mt_env(2, 2, 1234);
    MT_CHECK(mgpu_comm_create_threads(2, 5, comms) == MGPU_OK, "%s", mgpu_last_error());
    MT_CHECK(mgpu_comm_allreduce(NULL, t2, MGPU_REDUCE_SUM) == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "communicator"), "NULL comm");
    MT_CHECK(mgpu_comm_allreduce(comms[0], NULL, MGPU_REDUCE_SUM) == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "tensor"), "NULL tensor");
    MT_CHECK(mgpu_comm_allreduce(comms[0], ti, MGPU_REDUCE_SUM) == MGPU_ERR_SHAPE && strstr(mgpu_last_error(), "I32"), "I32: %s", mgpu_last_error());
    MT_CHECK(mgpu_comm_allreduce(comms[0], t2, (mgpu_reduce_op)7) == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "op 7"), "op");
    MT_CHECK(mgpu_comm_broadcast(comms[0], t2, 2) == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "root 2"), "root: %s", mgpu_last_error());
    MT_CHECK(mgpu_comm_broadcast(comms[0], t2, -1) == MGPU_ERR_INVALID_ARG, "negative root");
    MT_CHECK(mgpu_comm_allgather(comms[0], t2, t3) == MGPU_ERR_SHAPE && strstr(mgpu_last_error(), "world size 2"), "allgather sizes: %s", mgpu_last_error());
    MT_CHECK(mgpu_comm_allgather(comms[0], t2, ti) == MGPU_ERR_SHAPE, "allgather dtypes");
    MT_CHECK(mgpu_comm_reduce_scatter(comms[0], t3, t2, MGPU_REDUCE_SUM) == MGPU_ERR_SHAPE, "reduce_scatter sizes: %s", mgpu_last_error());
    MT_CHECK(mgpu_comm_allreduce_f32(comms[0], NULL, 5, MGPU_REDUCE_SUM) == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "data"), "NULL data");
    MT_CHECK(mgpu_comm_allreduce_f64(comms[0], NULL, -1, MGPU_REDUCE_SUM) == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "negative"), "n < 0");
    MT_CHECK(mgpu_comm_allgather_bytes(comms[0], NULL, 4, v) == MGPU_ERR_INVALID_ARG, "NULL in");
    MT_CHECK(mgpu_comm_allreduce_f32_async(comms[0], NULL, 3, MGPU_REDUCE_SUM) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "async NULL data");
    MT_CHECK(mgpu_comm_wait(NULL) == MGPU_ERR_INVALID_ARG, "wait NULL");
    MT_CHECK(mgpu_comm_rank(NULL) == -1 && mgpu_comm_world_size(NULL) == 0 && mgpu_comm_local_rank(NULL) == -1, "getters on NULL");
    MT_CHECK(mgpu_comm_create_threads(0, 5, bad) == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "n is 0"), "0 threads");
    MT_CHECK(mgpu_comm_create_threads(2, 5, NULL) == MGPU_ERR_INVALID_ARG, "NULL comms");
    MT_CHECK(mgpu_comm_create_threads(1, -1, bad) == MGPU_ERR_INVALID_ARG, "negative timeout");
    memset(&d, 0, sizeof d);
    d.backend = MGPU_COMM_THREADS;
    MT_CHECK(mgpu_comm_create(&d) == NULL && strstr(mgpu_last_error(), "mgpu_comm_create_threads"), "threads through create: %s", mgpu_last_error());
    d.backend = (mgpu_comm_backend)9;
    MT_CHECK(mgpu_comm_create(&d) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "unknown backend");
#ifndef MGPU_CUDA
    d.backend = MGPU_COMM_NCCL;
    MT_CHECK(mgpu_comm_create(&d) == NULL && mgpu_last_result() == MGPU_ERR_UNSUPPORTED && strstr(mgpu_last_error(), "-DMGPU_CUDA"), "nccl on CPU: %s", mgpu_last_error());
    {   /* DataParallel's in-process NCCL group needs a CUDA build too */
        static const int devs[2] = { 0, 1 };
        mgpu_comm *none[2] = { NULL, NULL };
        MT_CHECK(mgpu_comm_create_nccl_threads(2, devs, 5, none) == MGPU_ERR_UNSUPPORTED && strstr(mgpu_last_error(), "-DMGPU_CUDA"),
                 "nccl threads on CPU: %s", mgpu_last_error());
        MT_CHECK(mgpu_comm_create_nccl_threads(2, NULL, 5, none) == MGPU_ERR_INVALID_ARG && !none[0], "nccl threads without devices");
    }
#endif
    d.backend = MGPU_COMM_SHM;
    d.env = &e;   /* rank 2 of 2 */
    MT_CHECK(mgpu_comm_create(&d) == NULL && mgpu_last_result() == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "rank 2"), "bad env: %s", mgpu_last_error());
    e = mt_env(0, 2, 1234); e.local_world_size = 1;
    MT_CHECK(mgpu_comm_create(&d) == NULL && strstr(mgpu_last_error(), "one host"), "shm across hosts: %s", mgpu_last_error());
    mgpu_comm_destroy(comms[0]); mgpu_comm_destroy(comms[1]);
    mgpu_tensor_free(t2); mgpu_tensor_free(t3); mgpu_tensor_free(ti);
    mgpu_context_destroy(ctx);
}

/* ---- failures of the rendezvous and of ranks ---- */

static void test_rank_never_starts(void) {
    int port = mt_free_port();
    mgpu_dist_env e = mt_env(0, 2, port);
    mgpu_comm_desc d;
    mgpu_comm *c;
    double t0;
    memset(&d, 0, sizeof d);
    d.env = &e;
    mt_env_clear();
    setenv("MGPU_TIMEOUT_S", "3", 1);
    t0 = mgpu_time_s();
    c = mgpu_comm_create(&d);
    t0 = mgpu_time_s() - t0;
    MT_CHECK(c == NULL && mgpu_last_result() == MGPU_ERR_TIMEOUT, "got %p, %d", (void *)c, (int)mgpu_last_result());
    MT_CHECK(strstr(mgpu_last_error(), "rank 1 ") && strstr(mgpu_last_error(), "after 3 s"), "names rank 1 and the timeout: %s", mgpu_last_error());
    MT_CHECK(t0 > 2.8 && t0 < 5.5, "failed after %.2f s with MGPU_TIMEOUT_S=3", t0);
    MT_CHECK(mt_shm_leftovers(getpid()) == 0, "the segment was unlinked");
    mgpu_comm_destroy(c);
    mt_env_clear();
}

static void test_master_unreachable(void) {
    int port = mt_free_port();
    mgpu_dist_env e = mt_env(1, 2, port);
    mgpu_comm_desc d;
    char want[96];
    double t0;
    memset(&d, 0, sizeof d);
    d.env = &e;
    d.timeout_s = 2;
    t0 = mgpu_time_s();
    MT_CHECK(mgpu_comm_create(&d) == NULL && mgpu_last_result() == MGPU_ERR_TIMEOUT, "got %d", (int)mgpu_last_result());
    t0 = mgpu_time_s() - t0;
    snprintf(want, sizeof want, "cannot reach the master at 127.0.0.1:%d after 2 s", port);
    MT_CHECK(strstr(mgpu_last_error(), want) != NULL, "message: %s", mgpu_last_error());
    MT_CHECK(t0 > 1.5 && t0 < 4.5, "failed after %.2f s with a 2 s timeout", t0);
}

static void test_port_in_use(void) {
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0), port = 0;
    mgpu_dist_env e;
    mgpu_comm_desc d;
    char want[64];
    double t0;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    MT_CHECK(fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && listen(fd, 4) == 0 &&
             getsockname(fd, (struct sockaddr *)&a, &len) == 0, "listener");
    port = ntohs(a.sin_port);
    e = mt_env(0, 2, port);
    memset(&d, 0, sizeof d);
    d.env = &e;
    d.timeout_s = 10;
    t0 = mgpu_time_s();
    MT_CHECK(mgpu_comm_create(&d) == NULL && mgpu_last_result() == MGPU_ERR_IO, "got %d: %s", (int)mgpu_last_result(), mgpu_last_error());
    snprintf(want, sizeof want, "port %d", port);
    MT_CHECK(strstr(mgpu_last_error(), want) && strstr(mgpu_last_error(), "already in use"), "message: %s", mgpu_last_error());
    MT_CHECK(mgpu_time_s() - t0 < 1.0, "port in use noticed at once");
    if (fd >= 0) close(fd);
}

/* Rank 1 exits (without destroying anything) after one all-reduce; rank 0's next collective fails
   fast naming it, long before the 20 s timeout. */
static int mt_rank_dies(int rank, int world, void *arg) {
    mgpu_comm_desc d;
    mgpu_comm *c;
    float v[10] = {0};
    int fails = 0;
    double t0;
    mgpu_result r;
    (void)world; (void)arg;
    memset(&d, 0, sizeof d);
    d.timeout_s = 20;
    c = mgpu_comm_create(&d);
    CK(c != NULL, "%s", mgpu_last_error());
    if (!c) return fails;
    CK(mgpu_comm_allreduce_f32(c, v, 10, MGPU_REDUCE_SUM) == MGPU_OK, "%s", mgpu_last_error());
    if (rank == 1) _exit(0);
    mt_sleep(0.2);
    t0 = mgpu_time_s();
    r = mgpu_comm_allreduce_f32(c, v, 10, MGPU_REDUCE_SUM);
    t0 = mgpu_time_s() - t0;
    CK(r == MGPU_ERR_STATE && strstr(mgpu_last_error(), "rank 1 (pid") && strstr(mgpu_last_error(), "exited"), "got %d: %s", (int)r, mgpu_last_error());
    CK(t0 < 5, "noticed after %.2f s", t0);
    CK(mgpu_comm_barrier(c) == MGPU_ERR_STATE && strstr(mgpu_last_error(), "failed earlier"), "stays broken: %s", mgpu_last_error());
    mgpu_comm_destroy(c);
    return fails;
}
static void test_rank_dies_mid_run(void) {
    int pid0 = 0, failed = mt_spawn(2, NULL, mt_free_port(), 30, mt_rank_dies, NULL, &pid0);
    MT_CHECK(failed == 0, "%d ranks failed", failed);
    MT_CHECK(mt_shm_leftovers(pid0) == 0, "segment left in /dev/shm");
}

/* Rank 1 was launched with another WORLD_SIZE: both ranks fail at once with the mismatch. */
static int mt_rank_wrong_world(int rank, int world, void *arg) {
    mgpu_comm_desc d;
    mgpu_dist_env e;
    int fails = 0;
    double t0 = mgpu_time_s();
    (void)world; (void)arg;
    CK(mgpu_dist_env_read(&e) == MGPU_OK, "%s", mgpu_last_error());
    if (rank == 1) { e.world_size = 3; e.local_world_size = 3; }
    memset(&d, 0, sizeof d);
    d.env = &e;
    d.timeout_s = 20;
    CK(mgpu_comm_create(&d) == NULL, "create should fail");
    if (rank == 1) CK(mgpu_last_result() == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "world sizes disagree: rank 0 has 2, rank 1 has 3"), "%s", mgpu_last_error());
    else CK(strstr(mgpu_last_error(), "rank 1 could not join") && strstr(mgpu_last_error(), "world sizes disagree"), "%s", mgpu_last_error());
    CK(mgpu_time_s() - t0 < 5, "took %.2f s", mgpu_time_s() - t0);
    return fails;
}
static void test_world_size_mismatch(void) {
    int pid0 = 0, failed = mt_spawn(2, NULL, mt_free_port(), 30, mt_rank_wrong_world, NULL, &pid0);
    MT_CHECK(failed == 0, "%d ranks failed", failed);
    MT_CHECK(mt_shm_leftovers(pid0) == 0, "segment left in /dev/shm");
}

int main(void) {
    quick = getenv("MGPU_TEST_QUICK") != NULL && atoi(getenv("MGPU_TEST_QUICK")) != 0;
    signal(SIGPIPE, SIG_IGN);
    MT_RUN(test_env_sources);
    MT_RUN(test_env_errors);
    MT_RUN(test_single_process);
    MT_RUN(test_argument_errors);
    MT_RUN(test_shm_world2);
    MT_RUN(test_shm_world4);
    MT_RUN(test_threads_backend);
    MT_RUN(test_threads_barrier_timeout);
    MT_RUN(test_timeout_variables);
    MT_RUN(test_threads_departed_rank);
    MT_RUN(test_rank_never_starts);
    MT_RUN(test_master_unreachable);
    MT_RUN(test_port_in_use);
    MT_RUN(test_rank_dies_mid_run);
    MT_RUN(test_world_size_mismatch);
    return MT_END();
}
