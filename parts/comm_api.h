/* ======================================================================================
   Distributed: environment, communicators (shm, threads, nccl)
   ====================================================================================== */

/* The process's place in a job, read from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
   LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), falling back to SLURM_PROCID/SLURM_NTASKS/
   SLURM_LOCALID and OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK. No variable at all: a single process. */
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
    double timeout_s;          /* every wait is bounded; 0: $MGPU_TIMEOUT_S, else 600 */
} mgpu_comm_desc;
typedef struct mgpu_comm mgpu_comm;
/* Collective over all ranks of the job; rendezvous through a TCP store hosted by rank 0 on
   MASTER_ADDR:MASTER_PORT (bounded by the timeout; an unreachable master is an error, not a hang). */
MGPU_API mgpu_comm *mgpu_comm_create(const mgpu_comm_desc *desc);
/* n communicators of one in-process group (ranks 0..n-1), one per thread, for DataParallel. */
MGPU_API mgpu_result mgpu_comm_create_threads(int n, double timeout_s, mgpu_comm **comms);
MGPU_API void mgpu_comm_destroy(mgpu_comm *c);
MGPU_API int mgpu_comm_rank(const mgpu_comm *c);
MGPU_API int mgpu_comm_world_size(const mgpu_comm *c);
MGPU_API int mgpu_comm_local_rank(const mgpu_comm *c);
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
/* Raw host buffers (buckets, SyncBatchNorm statistics). */
MGPU_API mgpu_result mgpu_comm_allreduce_f32(mgpu_comm *c, float *data, int64_t n, mgpu_reduce_op op);
MGPU_API mgpu_result mgpu_comm_allreduce_f64(mgpu_comm *c, double *data, int64_t n, mgpu_reduce_op op);
/* Every rank contributes `bytes` bytes; out receives world_size * bytes (rank order). */
MGPU_API mgpu_result mgpu_comm_allgather_bytes(mgpu_comm *c, const void *in, size_t bytes, void *out);

/* Asynchronous all-reduce of a host float buffer, run by the communicator's progress thread in the
   order issued (all ranks must issue the same sequence). Wait returns its result and frees it. */
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
   communicator (timeout $MGPU_TIMEOUT_S, else 600 s). A replica creates its own context (one per
   thread; give each num_threads = cores / n_replicas) and model, wraps it with mgpu_ddp_create and
   trains its shard (loader rank = rank, world_size = n_replicas). Returns MGPU_OK, or the result of
   the lowest failing rank with its message in mgpu_last_error(). A replica that fails while others
   wait in a collective ends them through the communicator's timeout. */
typedef mgpu_result (*mgpu_dp_replica_fn)(int rank, mgpu_comm *comm, void *arg);
MGPU_API mgpu_result mgpu_dp_run(int n_replicas, mgpu_dp_replica_fn replica_main, void *arg);
