/* ======================================================================================
   Communicators
   ====================================================================================== */
/* ======================================================================================
   Distributed: environment, TCP rendezvous store, communicators (shm, threads, nccl)

   The shm and threads backends share one collective engine. Ranks exchange data through a
   region (POSIX shared memory between processes, heap memory between threads) holding a header,
   one control line per rank and one staging slot per rank. A slot is split in two halves used by
   alternate rounds, so a fast rank fills the next round while slow ranks still read the last one.
   Reductions sum in rank order (rank 0 + rank 1 + ...): each rank reduces one slice of every chunk
   (reduce-scatter), then every rank copies all slices back (all-gather), so results are bit-identical
   on every rank, reproducible, and the reduction work is split across the ranks.
   The nccl backend (MGPU_CUDA) bootstraps through the same TCP store and runs NCCL on its own stream.
   ====================================================================================== */

#define MGPU__COMM_MAX_RANKS 1024            /* ranks of one shm or threads group */
#define MGPU__COMM_MAX_JOB_RANKS (1 << 20)   /* ranks of a job */
#define MGPU__COMM_DEFAULT_TIMEOUT_S 600.0
#define MGPU__COMM_MSG 1024   /* as long as mgpu_last_error()'s text */

static void mgpu__comm_sleep_s(double s) {
    struct timespec ts;
    if (s <= 0) return;
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
    nanosleep(&ts, NULL);
}

/* --------------------------------------------------------------------------------------
   Environment (torchrun, SLURM, Open MPI)
   -------------------------------------------------------------------------------------- */

/* Strict decimal integer: the whole string, digits with an optional leading '-'. */
static int mgpu__env_parse_int(const char *s, long long *out) {
    char *end = NULL;
    long long v;
    int first = s[0] == '-' ? 1 : 0;
    if (!(s[first] >= '0' && s[first] <= '9')) return 0;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno || *end) return 0;
    *out = v;
    return 1;
}

/* Reads integer variable `name` when set (*set = 1). A malformed value, a negative one or one
   outside [lo, hi] is an error naming the variable, its value and `expected`. */
static mgpu_result mgpu__env_int(const char *name, long long lo, long long hi, const char *expected, int *out, int *set) {
    const char *v = getenv(name);
    long long x = 0;
    *set = 0;
    if (!v) return MGPU_OK;
    if (!mgpu__env_parse_int(v, &x))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: %s='%s' is not an integer; expected %s", name, v, expected);
    if (x < 0 && lo >= 0)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: %s='%s' is negative; expected %s", name, v, expected);
    if (x < lo || x > hi)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: %s='%s' is out of range; expected %s", name, v, expected);
    *out = (int)x;
    *set = 1;
    return MGPU_OK;
}

/* The variables one launcher sets. */
typedef struct mgpu__env_names { const char *source, *rank, *world, *local_rank, *local_world; } mgpu__env_names;

/* SLURM_TASKS_PER_NODE ("4(x2),3": tasks of each node) at node SLURM_NODEID. */
static mgpu_result mgpu__env_slurm_tasks_per_node(int *out, int *set) {
    const char *list = getenv("SLURM_TASKS_PER_NODE"), *p;
    int node = 0, has_node = 0;
    long long at = 0;
    mgpu_result r;
    *set = 0;
    if (!list) return MGPU_OK;
    if ((r = mgpu__env_int("SLURM_NODEID", 0, INT_MAX, "the index of this node in the job", &node, &has_node)) != MGPU_OK) return r;
    for (p = list; *p;) {
        char *end = NULL;
        long tasks = strtol(p, &end, 10), repeat = 1;
        if (end == p || tasks < 1 || tasks > INT_MAX) break;
        p = end;
        if (*p == '(') {
            if (p[1] != 'x') break;
            repeat = strtol(p + 2, &end, 10);
            if (end == p + 2 || *end != ')' || repeat < 1) break;
            p = end + 1;
        }
        if (node < at + repeat) { *out = (int)tasks; *set = 1; return MGPU_OK; }
        at += repeat;
        if (*p == ',') p++;
        else if (*p) break;
    }
    return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: SLURM_TASKS_PER_NODE='%s' is not a SLURM task list covering node %d; "
                      "expected counts like '4(x2),3'", list, node);
}

/* Rank, world size, local rank and local world size from one launcher's variables. */
static mgpu_result mgpu__env_read_ranks(const mgpu__env_names *nm, mgpu_dist_env *e) {
    int rank = 0, world = 1, lrank = 0, lworld = 0, has_rank, has_world, has_lrank, has_lworld = 0;
    mgpu_result r;
    if ((r = mgpu__env_int(nm->world, 1, MGPU__COMM_MAX_JOB_RANKS, "a positive number of processes", &world, &has_world)) != MGPU_OK) return r;
    if ((r = mgpu__env_int(nm->rank, 0, INT_MAX, "this process's rank in [0, world size)", &rank, &has_rank)) != MGPU_OK) return r;
    if (has_world && !has_rank)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: %s='%s' is set but %s is not; expected %s in [0, %d) as well (%s)",
                          nm->world, getenv(nm->world), nm->rank, nm->rank, world, nm->source);
    if (has_rank && !has_world)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: %s='%s' is set but %s is not; expected the number of processes as well (%s)",
                          nm->rank, getenv(nm->rank), nm->world, nm->source);
    if (rank >= world)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: %s='%s' but %s='%s'; expected %s < %s",
                          nm->rank, getenv(nm->rank), nm->world, getenv(nm->world), nm->rank, nm->world);
    if ((r = mgpu__env_int(nm->local_world, 1, world, "the number of processes on this host, at most the world size", &lworld, &has_lworld)) != MGPU_OK) return r;
    if (!has_lworld && strcmp(nm->source, "slurm") == 0 && (r = mgpu__env_slurm_tasks_per_node(&lworld, &has_lworld)) != MGPU_OK) return r;
    if (!has_lworld) lworld = world;   /* unknown: assume one host */
    if ((r = mgpu__env_int(nm->local_rank, 0, INT_MAX, "this process's rank on its host", &lrank, &has_lrank)) != MGPU_OK) return r;
    if (!has_lrank) lrank = lworld == world ? rank : rank % lworld;
    if (lrank >= lworld)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: %s='%d' but the local world size is %d%s%s%s; expected %s < local world size",
                          nm->local_rank, lrank, lworld, has_lworld ? " (" : "", has_lworld ? nm->local_world : "", has_lworld ? ")" : "", nm->local_rank);
    e->rank = rank; e->world_size = world; e->local_rank = lrank; e->local_world_size = lworld;
    e->source = nm->source;
    return MGPU_OK;
}

/* An Open MPI job whose ranks all run on this host (mpirun -np N without a host list): rank 0
   is on the launching host, so MASTER_ADDR can default to the loopback address. */
static int mgpu__env_openmpi_single_node(const mgpu_dist_env *e) {
    const char *local = getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
    return strcmp(e->source, "openmpi") == 0 && local && atoi(local) == e->world_size;
}

/* MASTER_ADDR and MASTER_PORT (under SLURM the address may come from the node list; a single-node
   Open MPI job defaults to this host). */
static mgpu_result mgpu__env_read_master(mgpu_dist_env *e, int slurm) {
    const char *addr = getenv("MASTER_ADDR"), *nodes = NULL;
    char first[256];
    int port = 0, has_port;
    mgpu_result r;
    first[0] = 0;
    if (addr && !*addr) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: MASTER_ADDR is empty; expected the host name or IP address of rank 0's host");
    if (!addr && slurm) {
        nodes = getenv("SLURM_JOB_NODELIST") ? getenv("SLURM_JOB_NODELIST") : getenv("SLURM_NODELIST");
        if (nodes && *nodes && !strpbrk(nodes, "[")) {
            size_t n = strcspn(nodes, ",");
            if (n < sizeof first) { memcpy(first, nodes, n); first[n] = 0; addr = first; }
        }
    }
    if (!addr && mgpu__env_openmpi_single_node(e)) addr = "127.0.0.1";
    if (addr && strlen(addr) >= sizeof e->master_addr)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: MASTER_ADDR is %zu characters long; expected a host name or address under %zu",
                          strlen(addr), sizeof e->master_addr);
    if ((r = mgpu__env_int("MASTER_PORT", 1, 65535, "a TCP port in [1, 65535]", &port, &has_port)) != MGPU_OK) return r;
    if (e->world_size > 1 && !addr) {
        if (nodes)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: MASTER_ADDR is not set and SLURM_JOB_NODELIST='%s' is a compressed host list; "
                              "expected MASTER_ADDR=<first host>, e.g. export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)", nodes);
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: MASTER_ADDR is not set; expected the host name or IP address of rank 0's host "
                          "(world size %d from %s)", e->world_size, e->source);
    }
    if (e->world_size > 1 && !has_port)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: MASTER_PORT is not set; expected a free TCP port in [1, 65535] on rank 0's host, "
                          "the same on every rank (world size %d from %s%s)", e->world_size, e->source,
                          strcmp(e->source, "openmpi") == 0 ? "; e.g. MASTER_PORT=29500 mpirun ..., or mpirun -x MASTER_PORT=29500 ..." : "");
    snprintf(e->master_addr, sizeof e->master_addr, "%s", addr ? addr : "127.0.0.1");
    e->master_port = has_port ? port : 0;
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_dist_env_read(mgpu_dist_env *out) {
    static const mgpu__env_names torchrun = {"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"};
    static const mgpu__env_names slurm = {"slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"};
    static const mgpu__env_names openmpi = {"openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"};
    const mgpu__env_names *nm = NULL;
    mgpu_dist_env e;
    mgpu_result r;
    if (!out) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_dist_env_read: out is NULL");
    memset(&e, 0, sizeof e);
    if (getenv("RANK") || getenv("WORLD_SIZE")) nm = &torchrun;
    else if (getenv("SLURM_PROCID")) nm = &slurm;
    else if (getenv("OMPI_COMM_WORLD_RANK") || getenv("OMPI_COMM_WORLD_SIZE")) nm = &openmpi;
    if (!nm) {
        e.world_size = 1; e.local_world_size = 1; e.source = "single";
        snprintf(e.master_addr, sizeof e.master_addr, "127.0.0.1");
        *out = e;
        return MGPU_OK;
    }
    if ((r = mgpu__env_read_ranks(nm, &e)) != MGPU_OK) return r;
    if ((r = mgpu__env_read_master(&e, nm == &slurm)) != MGPU_OK) return r;
    *out = e;
    return MGPU_OK;
}

/* $name as a positive number of seconds; *out untouched when the variable is unset. */
static mgpu_result mgpu__env_seconds(const char *name, const char *fn, double *out, int *found) {
    const char *v = getenv(name);
    char *end = NULL;
    double t;
    *found = v != NULL;
    if (!v) return MGPU_OK;
    t = strtod(v, &end);
    if (end == v || *end || !(t > 0) || t > 1e9)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: %s='%s' is not a positive number of seconds", fn, name, v);
    *out = t;
    return MGPU_OK;
}

/* desc timeout, else $MGPU_TIMEOUT_S, else $NCCL_TIMEOUT (seconds; the name scripts written for
   PyTorch set), else 600 s. announce (rank 0 only, so a job says it once): when NCCL_TIMEOUT is
   set, one line saying which of the two variables the timeout came from. */
static mgpu_result mgpu__comm_timeout(double requested, const char *fn, int announce, double *out) {
    int have_mgpu = 0, have_nccl = 0;
    mgpu_result r;
    if (requested < 0 || requested != requested)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: timeout %g s is negative; expected > 0 (0: $MGPU_TIMEOUT_S, else $NCCL_TIMEOUT, else 600)", fn, requested);
    if (requested > 0) { *out = requested; return MGPU_OK; }
    *out = MGPU__COMM_DEFAULT_TIMEOUT_S;
    if ((r = mgpu__env_seconds("MGPU_TIMEOUT_S", fn, out, &have_mgpu)) != MGPU_OK) return r;
    if (have_mgpu) {
        if (announce && getenv("NCCL_TIMEOUT"))
            mgpu_log(MGPU_LOG_INFO, "timeout %g s from MGPU_TIMEOUT_S; NCCL_TIMEOUT='%s' is ignored while MGPU_TIMEOUT_S is set", *out, getenv("NCCL_TIMEOUT"));
        return MGPU_OK;
    }
    if ((r = mgpu__env_seconds("NCCL_TIMEOUT", fn, out, &have_nccl)) != MGPU_OK) return r;
    if (have_nccl && announce)
        mgpu_log(MGPU_LOG_INFO, "timeout %g s from NCCL_TIMEOUT (MGPU_TIMEOUT_S is unset; it would take precedence)", *out);
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   TCP rendezvous store: rank 0 hosts a key/value server; every rank (rank 0 included) is a
   client. Requests are (op, key, value) frames; GET waits on the server until the key exists,
   the client bounding the wait with poll() and the deadline.
   -------------------------------------------------------------------------------------- */

enum { MGPU__STORE_SET = 1, MGPU__STORE_GET = 2, MGPU__STORE_TRY = 3, MGPU__STORE_ADD = 4 };
#define MGPU__STORE_MAX_KEY 256
#define MGPU__STORE_MAX_VALUE 4096
#define MGPU__STORE_FRAME 12   /* three big-endian u32: op, key length, value length */

static void mgpu__store_put_u32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16); p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
}
static uint32_t mgpu__store_get_u32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static void mgpu__fd_nonblocking(int fd) {
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL, 0) | O_NONBLOCK);
    fcntl(fd, F_SETFD, FD_CLOEXEC);
}

/* Milliseconds left until deadline (mgpu_time_s clock), capped for poll(). */
static int mgpu__comm_ms_left(double deadline) {
    double left = deadline - mgpu_time_s();
    if (left <= 0) return 0;
    return left > 1000.0 ? 1000000 : (int)(left * 1000.0) + 1;
}

/* Sends all n bytes before the deadline: 0 on success, else an errno-like code (ETIMEDOUT). */
static int mgpu__comm_send_all(int fd, const void *buf, size_t n, double deadline) {
    const char *p = (const char *)buf;
    while (n > 0) {
        struct pollfd pfd;
        ssize_t k;
        int flags = 0;
#ifdef MSG_NOSIGNAL
        flags = MSG_NOSIGNAL;   /* a closed peer is an error, not SIGPIPE */
#endif
        k = send(fd, p, n, flags);
        if (k > 0) { p += k; n -= (size_t)k; continue; }
        if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return errno;
        pfd.fd = fd; pfd.events = POLLOUT; pfd.revents = 0;
        if (mgpu__comm_ms_left(deadline) == 0) return ETIMEDOUT;
        poll(&pfd, 1, mgpu__comm_ms_left(deadline));
    }
    return 0;
}

/* Receives exactly n bytes before the deadline: 0, ETIMEDOUT, EPIPE for a closed peer, or errno. */
static int mgpu__comm_recv_all(int fd, void *buf, size_t n, double deadline) {
    char *p = (char *)buf;
    while (n > 0) {
        struct pollfd pfd;
        ssize_t k = recv(fd, p, n, 0);
        if (k > 0) { p += k; n -= (size_t)k; continue; }
        if (k == 0) return EPIPE;
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return errno;
        pfd.fd = fd; pfd.events = POLLIN; pfd.revents = 0;
        if (mgpu__comm_ms_left(deadline) == 0) return ETIMEDOUT;
        poll(&pfd, 1, mgpu__comm_ms_left(deadline));
    }
    return 0;
}

/* ---- server ---- */

typedef struct mgpu__store_kv { char *key; char *value; uint32_t len; } mgpu__store_kv;
typedef struct mgpu__store_conn {
    int fd;
    unsigned char *buf; size_t len, cap;   /* bytes received, not yet handled */
    char *waiting;                         /* key of a GET waiting for its SET, or NULL */
} mgpu__store_conn;
typedef struct mgpu__store_server {
    int listen_fd, wake[2];
    pthread_t thread; int started;
    mgpu__store_kv *kv; int n_kv, cap_kv;
    mgpu__store_conn *conns; int n_conns, cap_conns;
    struct pollfd *pfds; int cap_pfds;
    int stop;              /* 1: stop when every client disconnected or at stop_deadline; 2: now */
    double stop_deadline;
} mgpu__store_server;

/* Grows *arr (elements of elem bytes) to hold at least need; 0 on allocation failure. */
static int mgpu__comm_grow(void **arr, int *cap, int need, size_t elem) {
    void *n;
    int c = *cap ? *cap : 8;
    if (need <= *cap) return 1;
    while (c < need) c *= 2;
    n = mgpu__alloc(elem * (size_t)c, "the rendezvous store");
    if (!n) return 0;
    if (*arr) memcpy(n, *arr, elem * (size_t)*cap);
    mgpu_free(*arr);
    *arr = n; *cap = c;
    return 1;
}

static mgpu__store_kv *mgpu__store_find(mgpu__store_server *s, const char *key) {
    int i;
    for (i = 0; i < s->n_kv; i++) if (strcmp(s->kv[i].key, key) == 0) return &s->kv[i];
    return NULL;
}

/* Reply: u32 status (0 found/ok, 1 missing), u32 length, value. 0 when sent. */
static int mgpu__store_reply(int fd, uint32_t status, const char *value, uint32_t len) {
    unsigned char head[8];
    mgpu__store_put_u32(head, status);
    mgpu__store_put_u32(head + 4, len);
    if (mgpu__comm_send_all(fd, head, 8, mgpu_time_s() + 2.0)) return -1;
    return len ? mgpu__comm_send_all(fd, value, len, mgpu_time_s() + 2.0) : 0;
}

static int mgpu__store_set_kv(mgpu__store_server *s, char *key, const unsigned char *value, uint32_t len) {
    mgpu__store_kv *kv = mgpu__store_find(s, key);
    char *v = (char *)mgpu__alloc(len + 1, "a rendezvous store value");
    int i;
    if (!v) { mgpu_free(key); return 0; }
    memcpy(v, value, len); v[len] = 0;
    if (kv) { mgpu_free(kv->value); mgpu_free(key); }
    else {
        if (!mgpu__comm_grow((void **)&s->kv, &s->cap_kv, s->n_kv + 1, sizeof *s->kv)) { mgpu_free(v); mgpu_free(key); return 0; }
        kv = &s->kv[s->n_kv++];
        kv->key = key;
    }
    kv->value = v; kv->len = len;
    for (i = 0; i < s->n_conns; i++) {   /* answer the GETs that waited for this key */
        mgpu__store_conn *cn = &s->conns[i];
        if (cn->waiting && strcmp(cn->waiting, kv->key) == 0) {
            mgpu_free(cn->waiting); cn->waiting = NULL;
            if (mgpu__store_reply(cn->fd, 0, kv->value, kv->len)) { close(cn->fd); cn->fd = -1; }
        }
    }
    return 1;
}

/* Handles the complete requests in cn's buffer; 0 means drop the connection. */
static int mgpu__store_handle(mgpu__store_server *s, mgpu__store_conn *cn) {
    while (cn->fd >= 0 && !cn->waiting && cn->len >= MGPU__STORE_FRAME) {
        uint32_t op = mgpu__store_get_u32(cn->buf), klen = mgpu__store_get_u32(cn->buf + 4), vlen = mgpu__store_get_u32(cn->buf + 8);
        size_t frame = MGPU__STORE_FRAME + (size_t)klen + vlen;
        char *key;
        mgpu__store_kv *kv;
        int ok = 1;
        if (klen == 0 || klen > MGPU__STORE_MAX_KEY || vlen > MGPU__STORE_MAX_VALUE) return 0;
        if (cn->len < frame) break;
        key = (char *)mgpu__alloc(klen + 1, "a rendezvous store key");
        if (!key) return 0;
        memcpy(key, cn->buf + MGPU__STORE_FRAME, klen); key[klen] = 0;
        if (op == MGPU__STORE_SET) {
            ok = mgpu__store_set_kv(s, key, cn->buf + MGPU__STORE_FRAME + klen, vlen) && cn->fd >= 0 && mgpu__store_reply(cn->fd, 0, NULL, 0) == 0;
        } else if (op == MGPU__STORE_GET || op == MGPU__STORE_TRY) {
            kv = mgpu__store_find(s, key);
            if (kv) ok = mgpu__store_reply(cn->fd, 0, kv->value, kv->len) == 0;
            else if (op == MGPU__STORE_TRY) ok = mgpu__store_reply(cn->fd, 1, NULL, 0) == 0;
            else { cn->waiting = key; key = NULL; }
            mgpu_free(key);
        } else if (op == MGPU__STORE_ADD) {   /* counter: value += decimal increment, reply the sum */
            char num[32];
            long long inc = 0;
            memcpy(num, cn->buf + MGPU__STORE_FRAME + klen, MGPU__MIN(vlen, 31u)); num[MGPU__MIN(vlen, 31u)] = 0;
            inc = strtoll(num, NULL, 10);
            kv = mgpu__store_find(s, key);
            snprintf(num, sizeof num, "%lld", (kv ? strtoll(kv->value, NULL, 10) : 0) + inc);
            ok = mgpu__store_set_kv(s, key, (const unsigned char *)num, (uint32_t)strlen(num)) && cn->fd >= 0 &&
                 mgpu__store_reply(cn->fd, 0, num, (uint32_t)strlen(num)) == 0;
        } else {
            mgpu_free(key);
            return 0;
        }
        if (!ok) return 0;
        memmove(cn->buf, cn->buf + frame, cn->len - frame);
        cn->len -= frame;
    }
    return cn->fd >= 0;
}

static void mgpu__store_drop(mgpu__store_conn *cn) {
    if (cn->fd >= 0) close(cn->fd);
    cn->fd = -1;
    mgpu_free(cn->buf); cn->buf = NULL;
    mgpu_free(cn->waiting); cn->waiting = NULL;
}

static void mgpu__store_accept(mgpu__store_server *s) {
    for (;;) {
        int fd = accept(s->listen_fd, NULL, NULL), one = 1;
        mgpu__store_conn *cn;
        if (fd < 0) return;
        mgpu__fd_nonblocking(fd);
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (!mgpu__comm_grow((void **)&s->conns, &s->cap_conns, s->n_conns + 1, sizeof *s->conns)) { close(fd); return; }
        cn = &s->conns[s->n_conns++];
        memset(cn, 0, sizeof *cn);
        cn->fd = fd;
    }
}

/* Reads what cn has sent and handles it; 0 when the connection is gone. */
static int mgpu__store_read(mgpu__store_server *s, mgpu__store_conn *cn) {
    for (;;) {
        ssize_t k;
        if (cn->cap - cn->len < 1024) {
            size_t cap = cn->cap ? 2 * cn->cap : 4096;
            unsigned char *b;
            if (cap > 4 * (MGPU__STORE_FRAME + MGPU__STORE_MAX_KEY + MGPU__STORE_MAX_VALUE)) return 0;   /* a client that floods us */
            b = (unsigned char *)mgpu__alloc(cap, "a rendezvous store connection");
            if (!b) return 0;
            if (cn->len) memcpy(b, cn->buf, cn->len);
            mgpu_free(cn->buf);
            cn->buf = b; cn->cap = cap;
        }
        k = recv(cn->fd, cn->buf + cn->len, cn->cap - cn->len, 0);
        if (k > 0) { cn->len += (size_t)k; continue; }
        if (k == 0) return 0;
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) return 0;
        break;
    }
    return mgpu__store_handle(s, cn);
}

static void *mgpu__store_serve(void *arg) {
    mgpu__store_server *s = (mgpu__store_server *)arg;
    int i, n;
    for (;;) {
        int stop = __atomic_load_n(&s->stop, __ATOMIC_ACQUIRE);
        double stop_deadline = 0;
        __atomic_load(&s->stop_deadline, &stop_deadline, __ATOMIC_ACQUIRE);
        if (stop == 2 || (stop == 1 && (s->n_conns == 0 || mgpu_time_s() > stop_deadline))) break;
        if (!mgpu__comm_grow((void **)&s->pfds, &s->cap_pfds, s->n_conns + 2, sizeof *s->pfds)) { mgpu__comm_sleep_s(0.01); continue; }
        s->pfds[0].fd = s->listen_fd; s->pfds[1].fd = s->wake[0];
        for (i = 0; i < s->n_conns; i++) s->pfds[i + 2].fd = s->conns[i].fd;
        for (i = 0; i < s->n_conns + 2; i++) { s->pfds[i].events = POLLIN; s->pfds[i].revents = 0; }
        n = s->n_conns;
        if (poll(s->pfds, (nfds_t)(n + 2), 100) <= 0) continue;
        if (s->pfds[1].revents) { char b[64]; while (read(s->wake[0], b, sizeof b) > 0) {} }
        for (i = 0; i < n; i++)
            if (s->pfds[i + 2].revents && s->conns[i].fd >= 0 && !mgpu__store_read(s, &s->conns[i])) mgpu__store_drop(&s->conns[i]);
        for (i = 0; i < s->n_conns;) {   /* compact away closed connections */
            if (s->conns[i].fd < 0) { mgpu__store_drop(&s->conns[i]); s->conns[i] = s->conns[--s->n_conns]; }
            else i++;
        }
        if (s->pfds[0].revents) mgpu__store_accept(s);
    }
    return NULL;
}

static void mgpu__store_server_free(mgpu__store_server *s) {
    int i;
    if (!s) return;
    for (i = 0; i < s->n_conns; i++) mgpu__store_drop(&s->conns[i]);
    for (i = 0; i < s->n_kv; i++) { mgpu_free(s->kv[i].key); mgpu_free(s->kv[i].value); }
    if (s->listen_fd >= 0) close(s->listen_fd);
    if (s->wake[0] >= 0) close(s->wake[0]);
    if (s->wake[1] >= 0) close(s->wake[1]);
    mgpu_free(s->kv); mgpu_free(s->conns); mgpu_free(s->pfds);
    mgpu_free(s);
}

/* Asks the server to stop now (force) or once every client has gone, at the latest after grace_s. */
static void mgpu__store_server_request_stop(mgpu__store_server *s, int force, double grace_s) {
    double deadline = mgpu_time_s() + grace_s;
    char b = 1;
    __atomic_store(&s->stop_deadline, &deadline, __ATOMIC_RELEASE);
    __atomic_store_n(&s->stop, force ? 2 : 1, __ATOMIC_RELEASE);
    if (write(s->wake[1], &b, 1) < 0) { /* the poll timeout notices the flag anyway */ }
}

/* Stops the server as above, waits for its thread and frees it. */
static void mgpu__store_server_stop(mgpu__store_server *s, int force, double grace_s) {
    if (!s) return;
    if (s->started) {
        mgpu__store_server_request_stop(s, force, grace_s);
        pthread_join(s->thread, NULL);
    }
    mgpu__store_server_free(s);
}

/* The wildcard address of MASTER_ADDR's family (IPv4 unless it resolves to IPv6) on port. */
static socklen_t mgpu__store_listen_addr(const char *addr, int port, struct sockaddr_storage *sa) {
    struct addrinfo hints, *res = NULL;
    int family = AF_INET;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(addr, NULL, &hints, &res) == 0 && res && res->ai_family == AF_INET6) family = AF_INET6;
    if (res) freeaddrinfo(res);
    memset(sa, 0, sizeof *sa);
    if (family == AF_INET6) {
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)sa;
        a6->sin6_family = AF_INET6; a6->sin6_addr = in6addr_any; a6->sin6_port = htons((uint16_t)port);
        return (socklen_t)sizeof *a6;
    } else {
        struct sockaddr_in *a4 = (struct sockaddr_in *)sa;
        a4->sin_family = AF_INET; a4->sin_addr.s_addr = htonl(INADDR_ANY); a4->sin_port = htons((uint16_t)port);
        return (socklen_t)sizeof *a4;
    }
}

/* Binds the store's port on every interface and starts serving. */
static mgpu__store_server *mgpu__store_server_start(const char *addr, int port) {
    struct sockaddr_storage sa;
    socklen_t sa_len = mgpu__store_listen_addr(addr, port, &sa);
    int one = 1;
    mgpu__store_server *s = (mgpu__store_server *)mgpu__calloc(sizeof *s, "the rendezvous store");
    if (!s) return NULL;
    s->listen_fd = s->wake[0] = s->wake[1] = -1;
    s->listen_fd = socket(sa.ss_family, SOCK_STREAM, 0);
    if (s->listen_fd < 0) {
        mgpu__fail(MGPU_ERR_IO, "mgpu_comm_create: rank 0 cannot create the rendezvous store's socket: %s", strerror(errno));
        mgpu__store_server_free(s); return NULL;
    }
    setsockopt(s->listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s->listen_fd, (struct sockaddr *)&sa, sa_len) != 0 || listen(s->listen_fd, 1024) != 0) {
        int err = errno;
        if (err == EADDRINUSE)
            mgpu__fail(MGPU_ERR_IO, "mgpu_comm_create: rank 0 cannot host the rendezvous store on port %d: the port is already in use "
                       "(another job or program holds it); set MASTER_PORT to a free port", port);
        else
            mgpu__fail(MGPU_ERR_IO, "mgpu_comm_create: rank 0 cannot host the rendezvous store on port %d: %s", port, strerror(err));
        mgpu__store_server_free(s); return NULL;
    }
    mgpu__fd_nonblocking(s->listen_fd);
    if (pipe(s->wake) != 0) {
        s->wake[0] = s->wake[1] = -1;
        mgpu__fail(MGPU_ERR_IO, "mgpu_comm_create: cannot create a pipe for the rendezvous store: %s", strerror(errno));
        mgpu__store_server_free(s); return NULL;
    }
    mgpu__fd_nonblocking(s->wake[0]);
    mgpu__fd_nonblocking(s->wake[1]);
    if (pthread_create(&s->thread, NULL, mgpu__store_serve, s) != 0) {
        mgpu__fail(MGPU_ERR_STATE, "mgpu_comm_create: cannot start the rendezvous store's thread");
        mgpu__store_server_free(s); return NULL;
    }
    s->started = 1;
    return s;
}

/* ---- client ---- */

typedef struct mgpu__store_client { int fd; const char *addr; int port; } mgpu__store_client;

/* One connection attempt to addr:port (every resolved address, up to 1 s each); fd or -1 with why. */
static int mgpu__tcp_connect_once(const char *addr, int port, double deadline, char *why, size_t why_size) {
    struct addrinfo hints, *res = NULL, *ai;
    char service[16];
    int fd = -1, rc;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    snprintf(service, sizeof service, "%d", port);
    rc = getaddrinfo(addr, service, &hints, &res);
    if (rc != 0) { snprintf(why, why_size, "cannot resolve '%s': %s", addr, gai_strerror(rc)); return -1; }
    for (ai = res; ai && fd < 0; ai = ai->ai_next) {
        int err = 0, one = 1;
        socklen_t len = sizeof err;
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) { snprintf(why, why_size, "%s", strerror(errno)); continue; }
        mgpu__fd_nonblocking(fd);
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
            if (errno == EINPROGRESS) {
                struct pollfd pfd;
                double d = MGPU__MIN(deadline, mgpu_time_s() + 1.0);
                pfd.fd = fd; pfd.events = POLLOUT; pfd.revents = 0;
                if (poll(&pfd, 1, mgpu__comm_ms_left(d)) <= 0) err = ETIMEDOUT;
                else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
            } else {
                err = errno;
            }
        }
        if (err) { snprintf(why, why_size, "%s", strerror(err)); close(fd); fd = -1; continue; }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    freeaddrinfo(res);
    return fd;
}

/* Connects to the store, retrying until the deadline (rank 0 may not be listening yet). */
static mgpu_result mgpu__store_connect(mgpu__store_client *st, const char *addr, int port, int rank, double deadline, double timeout_s) {
    char why[256];
    double backoff = 0.02;
    st->fd = -1; st->addr = addr; st->port = port;
    snprintf(why, sizeof why, "no attempt finished");
    for (;;) {
        st->fd = mgpu__tcp_connect_once(addr, port, deadline, why, sizeof why);
        if (st->fd >= 0) return MGPU_OK;
        if (mgpu_time_s() + backoff > deadline) break;
        mgpu__comm_sleep_s(backoff);
        backoff = MGPU__MIN(backoff * 2, 0.5);
    }
    return mgpu__fail(MGPU_ERR_TIMEOUT, "mgpu_comm_create: rank %d cannot reach the master at %s:%d after %.0f s (last error: %s); "
                      "is rank 0 running, and are MASTER_ADDR and MASTER_PORT the same on every rank?", rank, addr, port, timeout_s, why);
}

static void mgpu__store_close(mgpu__store_client *st) {
    if (st->fd >= 0) close(st->fd);
    st->fd = -1;
}

static mgpu_result mgpu__store_io_error(const mgpu__store_client *st, int err, const char *key) {
    if (err == EPIPE || err == ECONNRESET)
        return mgpu__fail(MGPU_ERR_STATE, "mgpu_comm_create: lost the connection to the rendezvous store at %s:%d while asking for '%s' "
                          "(rank 0 closed it: did rank 0 fail?)", st->addr, st->port, key);
    if (err == ETIMEDOUT) return mgpu__fail(MGPU_ERR_TIMEOUT, "mgpu_comm_create: timed out waiting for '%s' from the rendezvous store at %s:%d", key, st->addr, st->port);
    return mgpu__fail(MGPU_ERR_IO, "mgpu_comm_create: rendezvous store at %s:%d: %s (key '%s')", st->addr, st->port, strerror(err), key);
}

/* Sends one request; for GET/TRY reads the value into val (NUL-terminated). *found is 0 when TRY
   finds nothing. A GET that reaches the deadline is MGPU_ERR_TIMEOUT. */
static mgpu_result mgpu__store_request(mgpu__store_client *st, int op, const char *key, const char *value, char *val, size_t cap, int *found, double deadline) {
    unsigned char head[MGPU__STORE_FRAME], reply[8];
    uint32_t klen = (uint32_t)strlen(key), vlen = value ? (uint32_t)strlen(value) : 0, status, len;
    int err;
    if (vlen > MGPU__STORE_MAX_VALUE) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_create: store value for '%s' too long (%u bytes)", key, vlen);
    mgpu__store_put_u32(head, (uint32_t)op); mgpu__store_put_u32(head + 4, klen); mgpu__store_put_u32(head + 8, vlen);
    if ((err = mgpu__comm_send_all(st->fd, head, sizeof head, deadline)) != 0 || (err = mgpu__comm_send_all(st->fd, key, klen, deadline)) != 0 ||
        (vlen && (err = mgpu__comm_send_all(st->fd, value, vlen, deadline)) != 0) || (err = mgpu__comm_recv_all(st->fd, reply, 8, deadline)) != 0)
        return mgpu__store_io_error(st, err, key);
    status = mgpu__store_get_u32(reply); len = mgpu__store_get_u32(reply + 4);
    if (len > MGPU__STORE_MAX_VALUE || (val && len >= cap) || (!val && len)) return mgpu__fail(MGPU_ERR_FORMAT, "mgpu_comm_create: the rendezvous store at %s:%d sent a malformed reply for '%s' (is MASTER_PORT another program's port?)", st->addr, st->port, key);
    if (len && (err = mgpu__comm_recv_all(st->fd, val, len, deadline)) != 0) return mgpu__store_io_error(st, err, key);
    if (val) val[len] = 0;
    if (found) *found = status == 0;
    return MGPU_OK;
}
static mgpu_result mgpu__store_set(mgpu__store_client *st, const char *key, const char *value, double deadline) {
    return mgpu__store_request(st, MGPU__STORE_SET, key, value, NULL, 0, NULL, deadline);
}
static mgpu_result mgpu__store_get(mgpu__store_client *st, const char *key, char *val, size_t cap, double deadline) {
    return mgpu__store_request(st, MGPU__STORE_GET, key, NULL, val, cap, NULL, deadline);
}
static mgpu_result mgpu__store_try(mgpu__store_client *st, const char *key, char *val, size_t cap, int *found, double deadline) {
    return mgpu__store_request(st, MGPU__STORE_TRY, key, NULL, val, cap, found, deadline);
}
/* Adds inc to the counter at key; *value gets the new count. */
static mgpu_result mgpu__store_add(mgpu__store_client *st, const char *key, int inc, long long *value, double deadline) {
    char num[32], reply[32];
    mgpu_result r;
    snprintf(num, sizeof num, "%d", inc);
    r = mgpu__store_request(st, MGPU__STORE_ADD, key, num, reply, sizeof reply, NULL, deadline);
    if (r == MGPU_OK) *value = strtoll(reply, NULL, 10);
    return r;
}

/* --------------------------------------------------------------------------------------
   The shared region of the shm and threads backends
   -------------------------------------------------------------------------------------- */

#define MGPU__REGION_MAGIC 0x6d6770752d636f6dULL   /* "mgpu-com" */
enum { MGPU__RANK_ACTIVE = 0, MGPU__RANK_DEPARTED = 1 };
enum { MGPU__COLL_BARRIER = 1, MGPU__COLL_ALLREDUCE, MGPU__COLL_BROADCAST, MGPU__COLL_ALLGATHER, MGPU__COLL_REDUCE_SCATTER };

/* What a rank is calling; every rank must call the same thing (checked at its first barrier). */
typedef struct mgpu__coll_sig { int32_t kind, root, dtype, op; int64_t count; } mgpu__coll_sig;

/* One rank's control line (128 bytes, so ranks do not share cache lines). */
typedef struct mgpu__rank_ctl {
    uint64_t epoch;            /* barriers this rank has entered */
    int32_t pid;
    int32_t state;             /* MGPU__RANK_ACTIVE or MGPU__RANK_DEPARTED */
    mgpu__coll_sig sig[2];     /* signature of its current collective, by barrier parity */
    unsigned char pad[128 - 16 - 2 * sizeof(mgpu__coll_sig)];
} mgpu__rank_ctl;

typedef struct mgpu__region_hdr {
    uint64_t magic, nonce;
    int32_t world, pad0;
    uint64_t slot_bytes;
    uint32_t wake_seq;         /* bumped when a barrier completes; sleepers futex-wait on it */
    uint32_t sleepers;         /* ranks inside that futex wait (the waker skips the syscall at 0) */
    int32_t abort_rank;        /* -1; the rank that aborted the group (-2 while it writes abort_msg) */
    int32_t abort_code;        /* its mgpu_result, which the other ranks report too */
    char abort_msg[MGPU__COMM_MSG];
} mgpu__region_hdr;

static size_t mgpu__region_ctl_offset(void) { return (sizeof(mgpu__region_hdr) + 127) & ~(size_t)127; }
static size_t mgpu__region_slots_offset(int world) { return (mgpu__region_ctl_offset() + sizeof(mgpu__rank_ctl) * (size_t)world + 4095) & ~(size_t)4095; }
static size_t mgpu__region_bytes(int world, size_t slot) { return mgpu__region_slots_offset(world) + slot * (size_t)world; }
/* Staging slot per rank: 2 MiB (two 1 MiB halves) for small groups, less for large ones so the
   region stays about 64 MiB at most. */
static size_t mgpu__region_slot_bytes(int world) {
    size_t slot = ((size_t)64 << 20) / (size_t)world;
    slot = MGPU__MIN(slot, (size_t)2 << 20);
    slot = MGPU__MAX(slot, (size_t)256 << 10);
    return slot & ~(size_t)8191;
}
static void mgpu__region_init(unsigned char *base, int world, uint64_t nonce) {
    mgpu__region_hdr *h = (mgpu__region_hdr *)base;
    memset(base, 0, mgpu__region_slots_offset(world));
    h->magic = MGPU__REGION_MAGIC; h->nonce = nonce; h->world = world;
    h->slot_bytes = mgpu__region_slot_bytes(world);
    h->abort_rank = -1;
}

/* --------------------------------------------------------------------------------------
   Communicator
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__heap_group { int refs; unsigned char *region; } mgpu__heap_group;

struct mgpu_comm_work {
    mgpu_comm *comm;
    float *data; int64_t n; mgpu_reduce_op op;
    int done;                                   /* set by the progress thread (atomic) */
    int abandoned;                              /* its wait gave up: the progress thread frees it */
    mgpu_result result; char msg[MGPU__COMM_MSG];
    struct mgpu_comm_work *next;                /* queue order */
    struct mgpu_comm_work *live_prev, *live_next; /* issued, not yet waited (destroy frees these) */
    int device;                                 /* data is device memory of this CUDA device; -1: host */
    void *stream;                               /* the stream that produced the data (NULL: unknown) */
    void *ready_ev, *done_ev;                   /* CUDA events: the producer's work issued before it (recorded
                                                   on `stream` when issued), the collective's (on the
                                                   communicator's stream); NULL without device data */
};

struct mgpu_comm {
    mgpu_comm_backend backend;
    int rank, world, local_rank, local_world;
    int gpu_id;                                 /* nccl: the device asked for (--gpu-ids); -1: local_rank */
    double timeout_s;
    /* shared region (shm, threads) */
    unsigned char *region; size_t region_bytes;
    int region_mapped;                          /* shm: munmap on destroy */
    mgpu__heap_group *group;                    /* threads (and world 1): shared heap region */
    mgpu__region_hdr *hdr; mgpu__rank_ctl *ctl; unsigned char *slots;
    size_t slot_bytes, half_bytes;
    const unsigned char **srcs;                 /* per-rank pointers for one reduction */
    unsigned char *watch;                       /* per rank: its pid can be checked for liveness */
    uint64_t epoch;                             /* barriers entered */
    int half;                                   /* staging half of the next round */
    /* rank 0's rendezvous store, kept until every rank has disconnected */
    mgpu__store_server *server;
    /* failure: the first error that broke the communicator */
    int broken;                                 /* 0; 1 while writing broken_msg; 2 */
    char broken_msg[MGPU__COMM_MSG];
    /* asynchronous all-reduces */
    pthread_mutex_t mu, exec_mu;
    pthread_cond_t cv;
    pthread_t progress; int progress_started, progress_stop;
    mgpu_comm_work *queue_head, *queue_tail, *live;
    int64_t pending;                            /* queued or running */
#ifdef MGPU_CUDA
    int cuda_device;
    ncclComm_t nccl;
    cudaStream_t stream;
    cudaEvent_t ev_ready, ev_done;
    void *dev_scratch; size_t dev_scratch_bytes;
    void *pinned[3]; size_t pinned_bytes[3];    /* shm/threads with CUDA data: host staging (0, 1: blocking
                                                   tensor collectives; 2: the executing thread's raw buffers) */
#endif
};

static const char *mgpu__comm_backend_name(int b) {
    return b == MGPU_COMM_SHM ? "shm" : b == MGPU_COMM_NCCL ? "nccl" : b == MGPU_COMM_THREADS ? "threads" : "unknown";
}

/* Records the error that breaks c (the first one is kept), tells the other ranks of a shared
   region so they fail at once instead of at their timeout, and returns code. */
static mgpu_result mgpu__comm_break(mgpu_comm *c, mgpu_result code, const char *fmt, ...) MGPU__PRINTF(3, 4);
static mgpu_result mgpu__comm_break(mgpu_comm *c, mgpu_result code, const char *fmt, ...) {
    char msg[MGPU__COMM_MSG];
    int expect = 0, none = -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (__atomic_compare_exchange_n(&c->broken, &expect, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        memcpy(c->broken_msg, msg, sizeof msg);
        __atomic_store_n(&c->broken, 2, __ATOMIC_RELEASE);
    }
    if (c->hdr && __atomic_compare_exchange_n(&c->hdr->abort_rank, &none, -2, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        memcpy(c->hdr->abort_msg, msg, sizeof msg);
        c->hdr->abort_code = (int32_t)code;
        __atomic_store_n(&c->hdr->abort_rank, c->rank, __ATOMIC_RELEASE);
    }
    return mgpu__fail(code, "%s", msg);
}

/* Another rank of the shared region aborted the group: this rank fails with its code and reason. */
static mgpu_result mgpu__comm_check_abort(mgpu_comm *c, const char *fn) {
    int ab = c->hdr ? __atomic_load_n(&c->hdr->abort_rank, __ATOMIC_ACQUIRE) : -1;
    if (ab < 0 || ab == c->rank) return MGPU_OK;
    return mgpu__comm_break(c, (mgpu_result)c->hdr->abort_code, "%s: rank %d aborted the group: %s", fn, ab, c->hdr->abort_msg);
}

/* Entry check of every collective: a usable communicator in a group nobody aborted. */
static mgpu_result mgpu__comm_usable(mgpu_comm *c, const char *fn) {
    if (!c) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: communicator is NULL", fn);
    while (__atomic_load_n(&c->broken, __ATOMIC_ACQUIRE) == 1) sched_yield();
    if (__atomic_load_n(&c->broken, __ATOMIC_ACQUIRE))
        return mgpu__fail(MGPU_ERR_STATE, "%s: rank %d's communicator failed earlier (%s); destroy it and create a new one", fn, c->rank, c->broken_msg);
    return mgpu__comm_check_abort(c, fn);
}

/* --------------------------------------------------------------------------------------
   Barrier: every rank publishes its epoch; the ranks that see everyone arrived bump wake_seq and
   wake the sleepers (sequentially consistent atomics make at least one of the last arrivers see
   the others). Waiting spins briefly, then sleeps on a futex in short slices so it can notice
   dead or departed peers, an abort by another rank, and the timeout.
   -------------------------------------------------------------------------------------- */

static int mgpu__comm_all_arrived(const mgpu_comm *c, uint64_t e) {
    int r;
    for (r = 0; r < c->world; r++)
        if (__atomic_load_n(&c->ctl[r].epoch, __ATOMIC_SEQ_CST) < e) return 0;
    return 1;
}

static void mgpu__comm_wake_sleepers(mgpu_comm *c) {
    __atomic_add_fetch(&c->hdr->wake_seq, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&c->hdr->sleepers, __ATOMIC_SEQ_CST) == 0) return;
#if defined(__linux__)
    syscall(SYS_futex, &c->hdr->wake_seq, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
#endif
}

/* Sleeps while *word == seen, at most usec (a process-shared futex on Linux). */
static void mgpu__comm_sleep_on(uint32_t *word, uint32_t seen, long usec) {
#if defined(__linux__)
    struct timespec ts;
    ts.tv_sec = 0; ts.tv_nsec = usec * 1000;
    syscall(SYS_futex, word, FUTEX_WAIT, seen, &ts, NULL, 0);
#else
    (void)word; (void)seen;
    mgpu__comm_sleep_s(1e-6 * (double)MGPU__MIN(usec, 100));
#endif
}

/* Whether process pid still runs: a zombie (exited, not yet reaped by its parent) counts as gone. */
static int mgpu__comm_pid_alive(int pid) {
#if defined(__linux__)
    char path[64], buf[512];
    const char *p;
    ssize_t n;
    int fd;
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    fd = open(path, O_RDONLY);
    if (fd < 0) return 0;
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    p = strrchr(buf, ')');   /* the state follows the command name, which may hold spaces */
    return !(p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X'));
#else
    return kill(pid, 0) == 0 || errno == EPERM;
#endif
}

/* "1, 3" or "1, 3 and 14 more" from the ranks whose epoch is below e. */
static void mgpu__comm_missing_ranks(const mgpu_comm *c, uint64_t e, char *buf, size_t size, int *count) {
    size_t pos = 0;
    int r, n = 0;
    buf[0] = 0;
    for (r = 0; r < c->world; r++) {
        if (__atomic_load_n(&c->ctl[r].epoch, __ATOMIC_ACQUIRE) >= e) continue;
        if (n < 16 && pos < size) pos += (size_t)snprintf(buf + pos, size - pos, n ? ", %d" : "%d", r);
        n++;
    }
    if (n > 16 && pos < size) snprintf(buf + pos, size - pos, " and %d more", n - 16);
    *count = n;
}

/* Another rank aborted, or a missing rank has left the group or died. */
static mgpu_result mgpu__comm_check_peers(mgpu_comm *c, uint64_t e, const char *fn) {
    mgpu_result res = mgpu__comm_check_abort(c, fn);
    int r;
    if (res != MGPU_OK) return res;
    for (r = 0; r < c->world; r++) {
        if (__atomic_load_n(&c->ctl[r].epoch, __ATOMIC_ACQUIRE) >= e) continue;
        if (__atomic_load_n(&c->ctl[r].state, __ATOMIC_ACQUIRE) == MGPU__RANK_DEPARTED)
            return mgpu__comm_break(c, MGPU_ERR_STATE, "%s: rank %d left the group (destroyed its communicator) while rank %d waits for it; "
                                    "every rank must issue the same collectives", fn, r, c->rank);
        if (c->watch && c->watch[r] && !mgpu__comm_pid_alive(c->ctl[r].pid))
            return mgpu__comm_break(c, MGPU_ERR_STATE, "%s: rank %d (pid %d) exited while rank %d waits for it", fn, r, c->ctl[r].pid, c->rank);
    }
    return MGPU_OK;
}

static void mgpu__comm_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static mgpu_result mgpu__comm_barrier_wait(mgpu_comm *c, const char *fn) {
    uint64_t e = ++c->epoch;
    double start, next_check;
    int spin;
    __atomic_store_n(&c->ctl[c->rank].epoch, e, __ATOMIC_SEQ_CST);
    if (mgpu__comm_all_arrived(c, e)) { mgpu__comm_wake_sleepers(c); return MGPU_OK; }
    for (spin = 0; spin < 200; spin++) {   /* short waits are common: stay on the core for a moment */
        if ((spin & 15) == 15) sched_yield(); else mgpu__comm_cpu_relax();
        if (mgpu__comm_all_arrived(c, e)) return MGPU_OK;
    }
    start = mgpu_time_s();
    next_check = start + 0.005;
    for (;;) {
        uint32_t seq;
        double now;
        int arrived;
        __atomic_add_fetch(&c->hdr->sleepers, 1, __ATOMIC_SEQ_CST);
        seq = __atomic_load_n(&c->hdr->wake_seq, __ATOMIC_SEQ_CST);
        arrived = mgpu__comm_all_arrived(c, e);
        if (!arrived) mgpu__comm_sleep_on(&c->hdr->wake_seq, seq, 2000);
        __atomic_sub_fetch(&c->hdr->sleepers, 1, __ATOMIC_SEQ_CST);
        if (arrived || mgpu__comm_all_arrived(c, e)) return MGPU_OK;
        now = mgpu_time_s();
        if (now >= next_check) {
            mgpu_result r = mgpu__comm_check_peers(c, e, fn);
            if (r != MGPU_OK) return r;
            next_check = now + 0.01;
        }
        if (now - start > c->timeout_s) {
            char missing[160];
            int n = 0;
            mgpu__comm_missing_ranks(c, e, missing, sizeof missing, &n);
            return mgpu__comm_break(c, MGPU_ERR_TIMEOUT, "%s: timed out after %.0f s on rank %d waiting for rank%s %s (barrier #%llu of this communicator); "
                                    "a rank may have crashed, hung, or issued different collectives", fn, c->timeout_s, c->rank,
                                    n == 1 ? "" : "s", missing, (unsigned long long)e);
        }
    }
}

static const char *mgpu__coll_name(int kind) {
    switch (kind) {
    case MGPU__COLL_BARRIER: return "barrier";
    case MGPU__COLL_ALLREDUCE: return "allreduce";
    case MGPU__COLL_BROADCAST: return "broadcast";
    case MGPU__COLL_ALLGATHER: return "allgather";
    case MGPU__COLL_REDUCE_SCATTER: return "reduce_scatter";
    }
    return "an unknown collective";
}

static void mgpu__sig_text(const mgpu__coll_sig *s, char *buf, size_t size) {
    const char *dt = s->dtype >= 0 && s->dtype < MGPU_DTYPE_COUNT ? mgpu_dtype_name((mgpu_dtype)s->dtype) : "F64";
    if (s->kind == MGPU__COLL_BARRIER) snprintf(buf, size, "barrier");
    else if (s->kind == MGPU__COLL_BROADCAST) snprintf(buf, size, "broadcast of %lld bytes from root %d", (long long)s->count, s->root);
    else if (s->kind == MGPU__COLL_ALLGATHER) snprintf(buf, size, "allgather of %lld bytes per rank", (long long)s->count);
    else snprintf(buf, size, "%s (%s) of %lld %s elements", mgpu__coll_name(s->kind), s->op == MGPU_REDUCE_AVG ? "avg" : "sum", (long long)s->count, dt);
}

/* A barrier that also checks every rank called the same collective with the same sizes. */
static mgpu_result mgpu__comm_sync(mgpu_comm *c, const char *fn, const mgpu__coll_sig *sig) {
    int p, r;
    mgpu_result res;
    if (sig) c->ctl[c->rank].sig[(c->epoch + 1) & 1] = *sig;   /* published by the barrier's store */
    res = mgpu__comm_barrier_wait(c, fn);
    if (res != MGPU_OK || !sig) return res;
    p = (int)(c->epoch & 1);
    for (r = 0; r < c->world; r++) {
        if (memcmp(&c->ctl[r].sig[p], &c->ctl[0].sig[p], sizeof *sig) != 0) {
            char a[128], b[128];
            mgpu__sig_text(&c->ctl[0].sig[p], a, sizeof a);
            mgpu__sig_text(&c->ctl[r].sig[p], b, sizeof b);
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: ranks disagree: rank 0 called %s, rank %d called %s; every rank must issue the same "
                              "collectives in the same order with the same sizes", fn, a, r, b);
        }
    }
    return MGPU_OK;
}

static mgpu__coll_sig mgpu__make_sig(int kind, int root, int dtype, int op, int64_t count) {
    mgpu__coll_sig s;
    memset(&s, 0, sizeof s);
    s.kind = kind; s.root = root; s.dtype = dtype; s.op = op; s.count = count;
    return s;
}

/* --------------------------------------------------------------------------------------
   Collectives over the shared region (host memory)
   -------------------------------------------------------------------------------------- */

#define MGPU__DTYPE_F64 100   /* raw double buffers (no mgpu_dtype for them) */

static unsigned char *mgpu__comm_slot(const mgpu_comm *c, int rank, int half) {
    return c->slots + (size_t)rank * c->slot_bytes + (size_t)half * c->half_bytes;
}
static void mgpu__comm_next_half(mgpu_comm *c) { c->half ^= 1; }

/* Rank r's slice [b, e) of m elements: 16-element aligned pieces, the last ones possibly empty. */
static void mgpu__comm_slice(int64_t m, int world, int r, int64_t *b, int64_t *e) {
    int64_t per = ((m + world - 1) / world + 15) & ~(int64_t)15;
    *b = MGPU__MIN(m, per * r);
    *e = MGPU__MIN(m, *b + per);
}

/* dst[i] = src[0][i] + src[1][i] + ... in rank order, divided by world for AVG; i in [b, e). */
#define MGPU__REDUCE_RANGE(T) do { \
        T *d = (T *)dst; int q; int64_t i; \
        for (i = b; i < e; i++) d[i] = ((const T *)src[0])[i]; \
        for (q = 1; q < world; q++) { const T *s = (const T *)src[q]; for (i = b; i < e; i++) d[i] += s[i]; } \
        if (avg) for (i = b; i < e; i++) d[i] /= (T)world; \
    } while (0)
static void mgpu__comm_sum_range(int dtype, void *dst, const unsigned char *const *src, int world, int64_t b, int64_t e, int avg) {
    if (dtype == MGPU__DTYPE_F64) MGPU__REDUCE_RANGE(double);
    else MGPU__REDUCE_RANGE(float);
}
#undef MGPU__REDUCE_RANGE

static size_t mgpu__comm_elem_bytes(int dtype) { return dtype == MGPU__DTYPE_F64 ? sizeof(double) : mgpu_dtype_size((mgpu_dtype)dtype); }

/* In-place all-reduce of n F32 or F64 elements. Per chunk: stage, barrier, reduce own slice into
   data and publish it in the slot, barrier, copy the other slices back. */
static mgpu_result mgpu__shared_allreduce(mgpu_comm *c, const char *fn, void *data, int64_t n, int dtype, int avg) {
    size_t esz = mgpu__comm_elem_bytes(dtype);
    int64_t chunk = (int64_t)(c->half_bytes / esz), off;
    mgpu__coll_sig sig = mgpu__make_sig(MGPU__COLL_ALLREDUCE, -1, dtype, avg, n);
    unsigned char *d = (unsigned char *)data;
    mgpu_result r;
    int q;
    if (n == 0) return mgpu__comm_sync(c, fn, &sig);
    for (off = 0; off < n; off += chunk) {
        int64_t m = MGPU__MIN(chunk, n - off), b, e;
        unsigned char *base = d + (size_t)off * esz;
        int h = c->half;
        memcpy(mgpu__comm_slot(c, c->rank, h), base, (size_t)m * esz);
        if ((r = mgpu__comm_sync(c, fn, off == 0 ? &sig : NULL)) != MGPU_OK) return r;
        for (q = 0; q < c->world; q++) c->srcs[q] = mgpu__comm_slot(c, q, h);
        mgpu__comm_slice(m, c->world, c->rank, &b, &e);
        mgpu__comm_sum_range(dtype, base, c->srcs, c->world, b, e, avg);
        memcpy(mgpu__comm_slot(c, c->rank, h) + (size_t)b * esz, base + (size_t)b * esz, (size_t)(e - b) * esz);
        if ((r = mgpu__comm_barrier_wait(c, fn)) != MGPU_OK) return r;
        for (q = 0; q < c->world; q++) {
            if (q == c->rank) continue;
            mgpu__comm_slice(m, c->world, q, &b, &e);
            memcpy(base + (size_t)b * esz, mgpu__comm_slot(c, q, h) + (size_t)b * esz, (size_t)(e - b) * esz);
        }
        mgpu__comm_next_half(c);
    }
    return MGPU_OK;
}

static mgpu_result mgpu__shared_broadcast(mgpu_comm *c, const char *fn, void *data, int64_t bytes, int root, int dtype) {
    int64_t off;
    mgpu__coll_sig sig = mgpu__make_sig(MGPU__COLL_BROADCAST, root, dtype, 0, bytes);
    mgpu_result r;
    if (bytes == 0) return mgpu__comm_sync(c, fn, &sig);
    for (off = 0; off < bytes; off += (int64_t)c->half_bytes) {
        size_t m = (size_t)MGPU__MIN((int64_t)c->half_bytes, bytes - off);
        unsigned char *p = (unsigned char *)data + off;
        if (c->rank == root) memcpy(mgpu__comm_slot(c, root, c->half), p, m);
        if ((r = mgpu__comm_sync(c, fn, off == 0 ? &sig : NULL)) != MGPU_OK) return r;
        if (c->rank != root) memcpy(p, mgpu__comm_slot(c, root, c->half), m);
        mgpu__comm_next_half(c);
    }
    return MGPU_OK;
}

static mgpu_result mgpu__shared_allgather(mgpu_comm *c, const char *fn, const void *in, int64_t bytes, void *out) {
    int64_t off;
    mgpu__coll_sig sig = mgpu__make_sig(MGPU__COLL_ALLGATHER, -1, MGPU_U8, 0, bytes);
    mgpu_result r;
    int q;
    if (bytes == 0) return mgpu__comm_sync(c, fn, &sig);
    for (off = 0; off < bytes; off += (int64_t)c->half_bytes) {
        size_t m = (size_t)MGPU__MIN((int64_t)c->half_bytes, bytes - off);
        memcpy(mgpu__comm_slot(c, c->rank, c->half), (const unsigned char *)in + off, m);
        if ((r = mgpu__comm_sync(c, fn, off == 0 ? &sig : NULL)) != MGPU_OK) return r;
        for (q = 0; q < c->world; q++) memcpy((unsigned char *)out + (size_t)q * (size_t)bytes + off, mgpu__comm_slot(c, q, c->half), m);
        mgpu__comm_next_half(c);
    }
    return MGPU_OK;
}

/* in holds world blocks of n F32; out (n) gets the rank-order reduction of block `rank`. Per
   chunk every rank stages its pieces of all blocks, then reduces its own block's pieces. */
static mgpu_result mgpu__shared_reduce_scatter(mgpu_comm *c, const char *fn, const float *in, float *out, int64_t n, int avg) {
    int64_t chunk = (int64_t)(c->half_bytes / (sizeof(float) * (size_t)c->world)), off;
    mgpu__coll_sig sig = mgpu__make_sig(MGPU__COLL_REDUCE_SCATTER, -1, MGPU_F32, avg, n);
    mgpu_result r;
    int q;
    if (n == 0) return mgpu__comm_sync(c, fn, &sig);
    for (off = 0; off < n; off += chunk) {
        int64_t m = MGPU__MIN(chunk, n - off);
        float *mine = (float *)mgpu__comm_slot(c, c->rank, c->half);
        for (q = 0; q < c->world; q++) memcpy(mine + q * m, in + q * n + off, sizeof(float) * (size_t)m);
        if ((r = mgpu__comm_sync(c, fn, off == 0 ? &sig : NULL)) != MGPU_OK) return r;
        for (q = 0; q < c->world; q++) c->srcs[q] = mgpu__comm_slot(c, q, c->half) + sizeof(float) * (size_t)(c->rank * m);
        mgpu__comm_sum_range(MGPU_F32, out + off, c->srcs, c->world, 0, m, avg);
        mgpu__comm_next_half(c);
    }
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   Creating and destroying communicators
   -------------------------------------------------------------------------------------- */

static mgpu_comm *mgpu__comm_new(mgpu_comm_backend backend, int rank, int world, int local_rank, int local_world, double timeout_s) {
    mgpu_comm *c = (mgpu_comm *)mgpu__calloc(sizeof *c, "a communicator");
    pthread_condattr_t ca;
    if (!c) return NULL;
    c->backend = backend; c->rank = rank; c->world = world;
    c->local_rank = local_rank; c->local_world = local_world;
    c->timeout_s = timeout_s;
    c->gpu_id = -1;
    pthread_mutex_init(&c->mu, NULL);
    pthread_mutex_init(&c->exec_mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);   /* waits use the mgpu_time_s clock */
    pthread_cond_init(&c->cv, &ca);
    pthread_condattr_destroy(&ca);
#ifdef MGPU_CUDA
    c->cuda_device = -1;
#endif
    return c;
}

/* Points c at a region laid out by mgpu__region_init and checks it belongs to this job. */
static mgpu_result mgpu__comm_attach(mgpu_comm *c, unsigned char *region, uint64_t nonce) {
    mgpu__region_hdr *h = (mgpu__region_hdr *)region;
    if (h->magic != MGPU__REGION_MAGIC || h->nonce != nonce || h->world != c->world)
        return mgpu__fail(MGPU_ERR_STATE, "mgpu_comm_create: rank %d found a shared segment of another job (world %d, expected %d)", c->rank, h->world, c->world);
    c->region = region;
    c->hdr = h;
    c->ctl = (mgpu__rank_ctl *)(region + mgpu__region_ctl_offset());
    c->slots = region + mgpu__region_slots_offset(c->world);
    c->slot_bytes = (size_t)h->slot_bytes;
    c->half_bytes = c->slot_bytes / 2;
    c->srcs = (const unsigned char **)mgpu__calloc(sizeof *c->srcs * (size_t)c->world, "a communicator");
    c->watch = (unsigned char *)mgpu__calloc((size_t)c->world, "a communicator");
    if (!c->srcs || !c->watch) return mgpu_last_result();
    __atomic_store_n(&c->ctl[c->rank].pid, (int32_t)getpid(), __ATOMIC_RELEASE);
    return MGPU_OK;
}

/* Lets the progress thread finish (every queued all-reduce is bounded by the timeout). */
static void mgpu__comm_progress_stop(mgpu_comm *c) {
    if (!c->progress_started) return;
    pthread_mutex_lock(&c->mu);
    c->progress_stop = 1;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    pthread_join(c->progress, NULL);
    c->progress_started = 0;
}

#ifdef MGPU_CUDA
static void mgpu__nccl_teardown(mgpu_comm *c);
#endif

static void mgpu__comm_work_free(mgpu_comm_work *w) {
#ifdef MGPU_CUDA
    if (w->ready_ev) cudaEventDestroy((cudaEvent_t)w->ready_ev);
    if (w->done_ev) cudaEventDestroy((cudaEvent_t)w->done_ev);
#endif
    mgpu_free(w);
}

MGPU_API void mgpu_comm_destroy(mgpu_comm *c) {
    if (!c) return;
    mgpu__comm_progress_stop(c);
    while (c->live) {   /* works never waited for */
        mgpu_comm_work *w = c->live;
        c->live = w->live_next;
        mgpu__comm_work_free(w);
    }
    if (c->ctl) {   /* peers still waiting for this rank fail at once */
        __atomic_store_n(&c->ctl[c->rank].state, MGPU__RANK_DEPARTED, __ATOMIC_SEQ_CST);
        mgpu__comm_wake_sleepers(c);
    }
    if (c->region_mapped) munmap(c->region, c->region_bytes);
    if (c->group && __atomic_sub_fetch(&c->group->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        mgpu_free(c->group->region);
        mgpu_free(c->group);
    }
    /* rank 0: keep the store until the other ranks have read what they need */
    mgpu__store_server_stop(c->server, 0, c->timeout_s);
#ifdef MGPU_CUDA
    mgpu__nccl_teardown(c);
#endif
    mgpu_free(c->srcs);
    mgpu_free(c->watch);
    pthread_mutex_destroy(&c->mu);
    pthread_mutex_destroy(&c->exec_mu);
    pthread_cond_destroy(&c->cv);
    mgpu_free(c);
}

/* A heap region shared by n communicators of this process. */
static mgpu_result mgpu__heap_group_attach(mgpu_comm **comms, int n) {
    mgpu__heap_group *g = (mgpu__heap_group *)mgpu__calloc(sizeof *g, "a communicator group");
    size_t bytes = mgpu__region_bytes(n, mgpu__region_slot_bytes(n));
    mgpu_result r = MGPU_OK;
    int i;
    if (!g) return mgpu_last_result();
    g->region = (unsigned char *)mgpu__alloc(bytes, "the communicators' staging region");
    if (!g->region) { mgpu_free(g); return mgpu_last_result(); }
    mgpu__region_init(g->region, n, 0);
    g->refs = n;
    for (i = 0; i < n; i++) {
        comms[i]->group = g;
        if (r == MGPU_OK) r = mgpu__comm_attach(comms[i], g->region, 0);
    }
    return r;
}

MGPU_API mgpu_result mgpu_comm_create_threads(int n, double timeout_s, mgpu_comm **comms) {
    double timeout = 0;
    mgpu_result r;
    int i;
    if (!comms) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_create_threads: comms is NULL");
    if (n < 1 || n > MGPU__COMM_MAX_RANKS)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_create_threads: n is %d; expected 1 to %d ranks", n, MGPU__COMM_MAX_RANKS);
    if ((r = mgpu__comm_timeout(timeout_s, "mgpu_comm_create_threads", 1, &timeout)) != MGPU_OK) return r;
    for (i = 0; i < n; i++) comms[i] = NULL;
    for (i = 0; i < n; i++)
        if (!(comms[i] = mgpu__comm_new(MGPU_COMM_THREADS, i, n, i, n, timeout))) break;
    r = i == n ? mgpu__heap_group_attach(comms, n) : mgpu_last_result();
    if (r != MGPU_OK) {
        for (i = 0; i < n; i++) { mgpu_comm_destroy(comms[i]); comms[i] = NULL; }
        return r;
    }
    return MGPU_OK;
}

#ifdef MGPU_CUDA
static mgpu_result mgpu__nccl_init_group(mgpu_comm **comms, int n, const int *devices, const char *fn);

/* devices: n visible, distinct CUDA devices (NCCL puts one rank on a device). */
static mgpu_result mgpu__check_group_devices(int n, const int *devices, const char *fn) {
    int visible = mgpu_cuda_device_count(), i, j;
    if (visible < 0) return mgpu_last_result();
    for (i = 0; i < n; i++) {
        if (devices[i] < 0 || devices[i] >= visible)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: rank %d's device %d is not one of the %d visible CUDA device%s (ids count the visible devices from 0)",
                              fn, i, devices[i], visible, visible == 1 ? "" : "s");
        for (j = 0; j < i; j++)
            if (devices[j] == devices[i])
                return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: ranks %d and %d both name cuda:%d; NCCL runs one rank per device, give distinct ids", fn, j, i, devices[i]);
    }
    return MGPU_OK;
}
#endif

MGPU_API mgpu_result mgpu_comm_create_nccl_threads(int n, const int *devices, double timeout_s, mgpu_comm **comms) {
    const char *fn = "mgpu_comm_create_nccl_threads";
    double timeout = 0;
    mgpu_result r;
    int i;
    if (!comms || !devices) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: comms and devices must not be NULL", fn);
    if (n < 1 || n > MGPU__COMM_MAX_RANKS) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: n is %d; expected 1 to %d ranks", fn, n, MGPU__COMM_MAX_RANKS);
#ifndef MGPU_CUDA
    (void)timeout; (void)r; (void)i; (void)timeout_s;
    return mgpu__fail(MGPU_ERR_UNSUPPORTED, "%s: the nccl backend needs a CUDA build (compile with -DMGPU_CUDA); use mgpu_comm_create_threads on CPU", fn);
#else
    if ((r = mgpu__comm_timeout(timeout_s, fn, 1, &timeout)) != MGPU_OK || (r = mgpu__check_group_devices(n, devices, fn)) != MGPU_OK) return r;
    for (i = 0; i < n; i++) comms[i] = NULL;
    for (i = 0; i < n; i++) {
        if (!(comms[i] = mgpu__comm_new(MGPU_COMM_NCCL, i, n, i, n, timeout))) break;
        comms[i]->gpu_id = devices[i];
    }
    r = i == n ? mgpu__nccl_init_group(comms, n, devices, fn) : mgpu_last_result();
    if (r != MGPU_OK) {
        char msg[MGPU__COMM_MSG];
        snprintf(msg, sizeof msg, "%s", mgpu_last_error());
        for (i = 0; i < n; i++) { mgpu_comm_destroy(comms[i]); comms[i] = NULL; }
        return mgpu__fail(r, "%s", msg);   /* destroy must not replace the reason */
    }
    return MGPU_OK;
#endif
}

/* ---- rendezvous through the TCP store ---- */

/* A unique-enough job id: time, pid and an address mixed. */
static uint64_t mgpu__job_nonce(void) {
    struct timespec ts;
    uint64_t x;
    clock_gettime(CLOCK_REALTIME, &ts);
    x = ((uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec) ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)&ts;
    return mgpu__mix64(x) | 1;   /* never 0: 0 marks heap regions */
}

static void mgpu__shm_name(char *buf, size_t size, int pid, uint64_t nonce) {
    snprintf(buf, size, "/mgpu-%d-%016llx", pid, (unsigned long long)nonce);
}

/* Rank 0: creates, sizes (reserving the memory, so a full /dev/shm is an error now rather than a
   SIGBUS later) and maps the job's segment. */
static mgpu_result mgpu__shm_create(mgpu_comm *c, uint64_t nonce, char *name, size_t name_size) {
    size_t bytes = mgpu__region_bytes(c->world, mgpu__region_slot_bytes(c->world));
    void *map;
    int fd, err;
    mgpu__shm_name(name, name_size, (int)getpid(), nonce);
    fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) return mgpu__fail(MGPU_ERR_IO, "mgpu_comm_create: rank 0 cannot create shared memory segment %s: %s", name, strerror(errno));
    err = posix_fallocate(fd, 0, (off_t)bytes);
    if (err == EINVAL || err == EOPNOTSUPP) err = ftruncate(fd, (off_t)bytes) == 0 ? 0 : errno;
    if (err) {
        close(fd); shm_unlink(name);
        return mgpu__fail(MGPU_ERR_OOM_HOST, "mgpu_comm_create: cannot reserve %zu bytes of shared memory for %s (%s); is /dev/shm full or too small?", bytes, name, strerror(err));
    }
    map = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) { shm_unlink(name); return mgpu__fail(MGPU_ERR_IO, "mgpu_comm_create: cannot map shared memory segment %s: %s", name, strerror(errno)); }
    mgpu__region_init((unsigned char *)map, c->world, nonce);
    c->region_mapped = 1; c->region_bytes = bytes;
    return mgpu__comm_attach(c, (unsigned char *)map, nonce);
}

/* Other ranks: map the segment rank 0 announced. */
static mgpu_result mgpu__shm_open(mgpu_comm *c, const char *name, uint64_t nonce) {
    size_t bytes = mgpu__region_bytes(c->world, mgpu__region_slot_bytes(c->world));
    struct stat st;
    void *map;
    int fd = shm_open(name, O_RDWR, 0);
    if (fd < 0)
        return mgpu__fail(MGPU_ERR_IO, "mgpu_comm_create: rank %d cannot open shared memory segment %s created by rank 0: %s "
                          "(the shm backend needs every rank on rank 0's host)", c->rank, name, strerror(errno));
    if (fstat(fd, &st) != 0 || (size_t)st.st_size != bytes) {
        close(fd);
        return mgpu__fail(MGPU_ERR_STATE, "mgpu_comm_create: rank %d: shared memory segment %s has %lld bytes, expected %zu", c->rank, name, (long long)st.st_size, bytes);
    }
    map = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return mgpu__fail(MGPU_ERR_IO, "mgpu_comm_create: rank %d cannot map shared memory segment %s: %s", c->rank, name, strerror(errno));
    c->region_mapped = 1; c->region_bytes = bytes;
    return mgpu__comm_attach(c, (unsigned char *)map, nonce);
}

#ifdef MGPU_CUDA
static mgpu_result mgpu__nccl_init(mgpu_comm *c, const char *id_hex, double deadline);
static mgpu_result mgpu__nccl_unique_id_hex(char *hex, size_t size);
#endif

/* What one rank knows during the rendezvous. */
typedef struct mgpu__rdzv {
    mgpu__store_client st;
    double deadline;
    uint64_t nonce;
    char payload[2 * 128 + 64];   /* shm: segment name; nccl: unique id in hex */
    char shm_name[96];            /* rank 0: the segment to unlink */
} mgpu__rdzv;

/* Rank 0: prepares the backend's shared state and publishes the job record. */
static mgpu_result mgpu__rdzv_publish(mgpu_comm *c, mgpu__rdzv *z) {
    char job[MGPU__STORE_MAX_VALUE];
    mgpu_result r = MGPU_OK;
    z->nonce = mgpu__job_nonce();
    if (c->backend == MGPU_COMM_SHM) {
        r = mgpu__shm_create(c, z->nonce, z->shm_name, sizeof z->shm_name);
        snprintf(z->payload, sizeof z->payload, "%s", z->shm_name);
    }
#ifdef MGPU_CUDA
    else r = mgpu__nccl_unique_id_hex(z->payload, sizeof z->payload);
#endif
    if (r != MGPU_OK) snprintf(job, sizeof job, "error %s", mgpu_last_error());
    else snprintf(job, sizeof job, "mgpu1 %d %s %016llx %s", c->world, mgpu__comm_backend_name(c->backend), (unsigned long long)z->nonce, z->payload);
    if (mgpu__store_set(&z->st, "job", job, z->deadline) != MGPU_OK && r == MGPU_OK) r = mgpu_last_result();
    return r;
}

/* Other ranks: read the job record, check it agrees with this rank, attach to the backend. */
static mgpu_result mgpu__rdzv_read_job(mgpu_comm *c, mgpu__rdzv *z) {
    char job[MGPU__STORE_MAX_VALUE], backend[16];
    unsigned long long nonce = 0;
    int world = 0, n = 0;
    mgpu_result r = mgpu__store_get(&z->st, "job", job, sizeof job, z->deadline);
    if (r != MGPU_OK) {
        if (r == MGPU_ERR_TIMEOUT)
            return mgpu__fail(r, "mgpu_comm_create: rank %d timed out after %.0f s waiting for rank 0 to publish the job at %s:%d",
                              c->rank, c->timeout_s, z->st.addr, z->st.port);
        return r;
    }
    if (strncmp(job, "error ", 6) == 0) return mgpu__fail(MGPU_ERR_STATE, "mgpu_comm_create: rank 0 failed: %s", job + 6);
    if (sscanf(job, "mgpu1 %d %15s %llx %n", &world, backend, &nonce, &n) != 3 || n == 0)
        return mgpu__fail(MGPU_ERR_FORMAT, "mgpu_comm_create: rank %d got a malformed job record from %s:%d (is MASTER_PORT another program's port?)",
                          c->rank, z->st.addr, z->st.port);
    if (world != c->world)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_create: world sizes disagree: rank 0 has %d, rank %d has %d; every rank must be "
                          "launched with the same WORLD_SIZE", world, c->rank, c->world);
    if (strcmp(backend, mgpu__comm_backend_name(c->backend)) != 0)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_create: backends disagree: rank 0 uses %s, rank %d uses %s", backend, c->rank, mgpu__comm_backend_name(c->backend));
    z->nonce = nonce;
    snprintf(z->payload, sizeof z->payload, "%s", job + n);
    if (c->backend == MGPU_COMM_SHM) return mgpu__shm_open(c, z->payload, z->nonce);
    return MGPU_OK;
}

/* "1, 3" of the ranks without a join record, asked over a fresh connection (the old one may have
   a GET outstanding). */
static void mgpu__rdzv_missing(const mgpu_comm *c, const mgpu__rdzv *z, char *buf, size_t size, int *count) {
    mgpu__store_client st;
    char val[MGPU__STORE_MAX_VALUE], key[32];
    size_t pos = 0;
    int r, found = 0, n = 0;
    double deadline = mgpu_time_s() + 2.0;
    snprintf(buf, size, "the other ranks");
    *count = 2;
    if (mgpu__store_connect(&st, z->st.addr, z->st.port, c->rank, deadline, 2.0) != MGPU_OK) return;
    buf[0] = 0;
    for (r = 0; r < c->world; r++) {
        snprintf(key, sizeof key, "join/%d", r);
        if (mgpu__store_try(&st, key, val, sizeof val, &found, deadline) != MGPU_OK) break;
        if (found) continue;
        if (n < 16 && pos < size) pos += (size_t)snprintf(buf + pos, size - pos, n ? ", %d" : "%d", r);
        n++;
    }
    if (n > 16 && pos < size) snprintf(buf + pos, size - pos, " and %d more", n - 16);
    *count = n;
    mgpu__store_close(&st);
}

/* This process's pid namespace ("pid:[4026531836]" on Linux): pids are compared only within one. */
static void mgpu__comm_pid_ns(char *buf, size_t size) {
#if defined(__linux__)
    ssize_t n = readlink("/proc/self/ns/pid", buf, size - 1);
    if (n <= 0) n = (ssize_t)snprintf(buf, size, "unknown");
    buf[n] = 0;
    buf[strcspn(buf, " ")] = 0;
#else
    snprintf(buf, size, "-");
#endif
}

/* Registers this rank (or its failure) and waits until every rank has: the last one to register
   sets "all-joined"; a rank that failed sets it to its error so the others stop at once. */
static mgpu_result mgpu__rdzv_join(mgpu_comm *c, mgpu__rdzv *z, mgpu_result mine) {
    char key[32], val[MGPU__STORE_MAX_VALUE], all[MGPU__STORE_MAX_VALUE], ns[64], peer_ns[64];
    long long joined = 0;
    mgpu_result r;
    int peer;
    snprintf(key, sizeof key, "join/%d", c->rank);
    if (mine != MGPU_OK) {
        snprintf(val, sizeof val, "error rank %d could not join: %s", c->rank, mgpu_last_error());
        mgpu__store_set(&z->st, key, val, z->deadline);
        mgpu__store_set(&z->st, "all-joined", val, z->deadline);
        return mine;
    }
    mgpu__comm_pid_ns(ns, sizeof ns);
    snprintf(val, sizeof val, "ok %d %s", (int)getpid(), ns);
    if ((r = mgpu__store_set(&z->st, key, val, z->deadline)) != MGPU_OK) return r;
    if ((r = mgpu__store_add(&z->st, "joined", 1, &joined, z->deadline)) != MGPU_OK) return r;
    if (joined == c->world && (r = mgpu__store_set(&z->st, "all-joined", "ok", z->deadline)) != MGPU_OK) return r;
    r = mgpu__store_get(&z->st, "all-joined", all, sizeof all, z->deadline);
    if (r == MGPU_ERR_TIMEOUT) {
        char missing[160];
        int n = 0;
        mgpu__rdzv_missing(c, z, missing, sizeof missing, &n);
        return mgpu__fail(MGPU_ERR_TIMEOUT, "mgpu_comm_create: timed out after %.0f s on rank %d waiting for rank%s %s to join the rendezvous at %s:%d "
                          "(world size %d); did every rank start, with the same MASTER_ADDR and MASTER_PORT?", c->timeout_s, c->rank,
                          n == 1 ? "" : "s", missing, z->st.addr, z->st.port, c->world);
    }
    if (r != MGPU_OK) return r;
    if (strncmp(all, "error ", 6) == 0) return mgpu__fail(MGPU_ERR_STATE, "mgpu_comm_create: %s", all + 6);
    /* every rank is in: learn the peers' pids for liveness checks (shm) */
    for (peer = 0; c->watch && peer < c->world; peer++) {
        int pid = 0;
        snprintf(key, sizeof key, "join/%d", peer);
        if ((r = mgpu__store_get(&z->st, key, val, sizeof val, z->deadline)) != MGPU_OK) return r;
        if (sscanf(val, "ok %d %63s", &pid, peer_ns) != 2) return mgpu__fail(MGPU_ERR_FORMAT, "mgpu_comm_create: bad join record of rank %d: '%s'", peer, val);
        if (peer != c->rank)   /* same pid namespace, visible, and the pid the segment holds */
            c->watch[peer] = (unsigned char)(strcmp(ns, peer_ns) == 0 && pid > 0 && mgpu__comm_pid_alive(pid) && c->ctl[peer].pid == pid);
    }
    return MGPU_OK;
}

/* The whole rendezvous of a job with world > 1; on return the store connection is closed and
   the shm segment (if any) unlinked. */
static mgpu_result mgpu__rendezvous(mgpu_comm *c, const mgpu_dist_env *env) {
    mgpu__rdzv z;
    mgpu_result r;
    memset(&z, 0, sizeof z);
    z.st.fd = -1;
    z.deadline = mgpu_time_s() + c->timeout_s;
    if (c->rank == 0 && !(c->server = mgpu__store_server_start(env->master_addr, env->master_port))) return mgpu_last_result();
    r = mgpu__store_connect(&z.st, env->master_addr, env->master_port, c->rank, z.deadline, c->timeout_s);
    if (r == MGPU_OK) {
        r = c->rank == 0 ? mgpu__rdzv_publish(c, &z) : mgpu__rdzv_read_job(c, &z);
        r = mgpu__rdzv_join(c, &z, r);
    }
    if (z.shm_name[0]) shm_unlink(z.shm_name);   /* mapped by everyone (or failed): nothing can leak now */
#ifdef MGPU_CUDA
    if (r == MGPU_OK && c->backend == MGPU_COMM_NCCL) r = mgpu__nccl_init(c, z.payload, z.deadline);
#endif
    mgpu__store_close(&z.st);
    if (r != MGPU_OK && c->server) {   /* a moment for the others to read the failure, then they find the store closed */
        mgpu__store_server_stop(c->server, 0, MGPU__MIN(c->timeout_s, 2.0));
        c->server = NULL;
    }
    if (c->server) mgpu__store_server_request_stop(c->server, 0, c->timeout_s);   /* serves on until every rank has gone */
    return r;
}

/* An environment passed in by the caller gets the checks mgpu_dist_env_read makes. */
static mgpu_result mgpu__comm_env_check(const mgpu_dist_env *e) {
    if (e->world_size < 1 || e->world_size > MGPU__COMM_MAX_JOB_RANKS || e->rank < 0 || e->rank >= e->world_size)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_create: env has rank %d and world size %d; expected 0 <= rank < world size", e->rank, e->world_size);
    if (e->local_world_size < 1 || e->local_world_size > e->world_size || e->local_rank < 0 || e->local_rank >= e->local_world_size)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_create: env has local rank %d and local world size %d (world size %d); expected 0 <= local rank < local world size <= world size",
                          e->local_rank, e->local_world_size, e->world_size);
    if (e->world_size > 1 && (!e->master_addr[0] || e->master_port < 1 || e->master_port > 65535))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_create: env has master '%s' port %d; a world of %d needs MASTER_ADDR and MASTER_PORT in [1, 65535]",
                          e->master_addr, e->master_port, e->world_size);
    return MGPU_OK;
}

/* The backend this build can run, and an environment it can serve. */
static mgpu_result mgpu__comm_check_request(const mgpu_comm_desc *d, const mgpu_dist_env *env) {
    const char *fn = "mgpu_comm_create";
    mgpu_result r = mgpu__comm_env_check(env);
    if (r != MGPU_OK) return r;
    if (d->backend == MGPU_COMM_SHM && env->world_size > MGPU__COMM_MAX_RANKS)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: the shm backend joins at most %d ranks, the world has %d", fn, MGPU__COMM_MAX_RANKS, env->world_size);
    if (d->backend == MGPU_COMM_SHM && env->local_world_size != env->world_size)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: the shm backend needs every rank on one host, but the local world size is %d of %d ranks "
                          "(use the nccl backend across hosts)", fn, env->local_world_size, env->world_size);
    return MGPU_OK;
}

/* desc->gpu_ids (nccl): an entry for this local rank, a device index. */
static mgpu_result mgpu__comm_check_gpu_ids(const mgpu_comm_desc *d, const mgpu_dist_env *env) {
    const char *fn = "mgpu_comm_create";
    char list[128];
    size_t at = 0;
    int i;
    if (d->backend != MGPU_COMM_NCCL || d->num_gpu_ids == 0) return MGPU_OK;
    if (d->num_gpu_ids < 0 || !d->gpu_ids)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: desc->num_gpu_ids is %d with gpu_ids %s; expected a list of device indices (or 0 ids)",
                          fn, d->num_gpu_ids, d->gpu_ids ? "set" : "NULL");
    list[0] = 0;
    for (i = 0; i < d->num_gpu_ids && at < sizeof list - 16; i++) at += (size_t)snprintf(list + at, sizeof list - at, i ? ",%d" : "%d", d->gpu_ids[i]);
    if (env->local_rank >= d->num_gpu_ids)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: local rank %d has no entry in --gpu-ids %s (%d ids for %d local ranks); give one device per local rank",
                          fn, env->local_rank, list, d->num_gpu_ids, env->local_world_size);
    if (d->gpu_ids[env->local_rank] < 0)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: --gpu-ids %s gives local rank %d device %d; expected a device index >= 0",
                          fn, list, env->local_rank, d->gpu_ids[env->local_rank]);
    return MGPU_OK;
}

MGPU_API mgpu_comm *mgpu_comm_create(const mgpu_comm_desc *desc) {
    mgpu_comm_desc d;
    mgpu_dist_env env;
    mgpu_comm *c;
    double timeout = 0;
    mgpu_result r;
    if (desc) d = *desc; else memset(&d, 0, sizeof d);
    if (d.backend == MGPU_COMM_THREADS)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_comm_create: the threads backend joins threads of one process; use mgpu_comm_create_threads");
    if (d.backend != MGPU_COMM_SHM && d.backend != MGPU_COMM_NCCL)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_comm_create: desc->backend %d is not a backend (MGPU_COMM_SHM or MGPU_COMM_NCCL)", (int)d.backend);
#ifndef MGPU_CUDA
    if (d.backend == MGPU_COMM_NCCL)
        MGPU__FAIL_NULL(MGPU_ERR_UNSUPPORTED, "mgpu_comm_create: the nccl backend needs a CUDA build (compile with -DMGPU_CUDA and link -lnccl, e.g. `make cuda`); "
                        "use the shm backend on CPU");
#endif
    if (d.env) env = *d.env;
    else if (mgpu_dist_env_read(&env) != MGPU_OK) return NULL;
    if (mgpu__comm_timeout(d.timeout_s, "mgpu_comm_create", env.rank == 0, &timeout) != MGPU_OK) return NULL;
    if (mgpu__comm_check_request(&d, &env) != MGPU_OK || mgpu__comm_check_gpu_ids(&d, &env) != MGPU_OK) return NULL;
    c = mgpu__comm_new(d.backend, env.rank, env.world_size, env.local_rank, env.local_world_size, timeout);
    if (!c) return NULL;
    if (d.backend == MGPU_COMM_NCCL && d.num_gpu_ids > 0) c->gpu_id = d.gpu_ids[env.local_rank];
    if (env.world_size == 1 && d.backend == MGPU_COMM_SHM) r = mgpu__heap_group_attach(&c, 1);
#ifdef MGPU_CUDA
    else if (env.world_size == 1) {
        char id[2 * 128 + 1];
        r = mgpu__nccl_unique_id_hex(id, sizeof id);
        if (r == MGPU_OK) r = mgpu__nccl_init(c, id, mgpu_time_s() + timeout);
    }
#endif
    else r = mgpu__rendezvous(c, &env);
    if (r != MGPU_OK) {
        char msg[MGPU__COMM_MSG];
        snprintf(msg, sizeof msg, "%s", mgpu_last_error());
        mgpu_comm_destroy(c);
        mgpu__fail(r, "%s", msg);   /* destroy must not replace the reason */
        return NULL;
    }
    mgpu_log(MGPU_LOG_DEBUG, "communicator: rank %d of %d (local %d of %d), backend %s, timeout %.0f s", c->rank, c->world, c->local_rank,
             c->local_world, mgpu__comm_backend_name(c->backend), c->timeout_s);
    return c;
}

MGPU_API int mgpu_comm_rank(const mgpu_comm *c) {
    if (!c) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_rank: communicator is NULL"); return -1; }
    return c->rank;
}
MGPU_API int mgpu_comm_world_size(const mgpu_comm *c) {
    if (!c) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_world_size: communicator is NULL"); return 0; }
    return c->world;
}
MGPU_API int mgpu_comm_local_rank(const mgpu_comm *c) {
    if (!c) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_local_rank: communicator is NULL"); return -1; }
    return c->local_rank;
}
MGPU_API int mgpu_comm_cuda_device(const mgpu_comm *c) {
    if (!c) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_cuda_device: communicator is NULL"); return -1; }
#ifdef MGPU_CUDA
    return c->cuda_device;
#else
    return -1;
#endif
}
MGPU_API mgpu_comm_backend mgpu_comm_backend_of(const mgpu_comm *c) {
    if (!c) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_backend_of: communicator is NULL"); return MGPU_COMM_SHM; }
    return c->backend;
}

/* --------------------------------------------------------------------------------------
   Running collectives: one descriptor, executed by the shared-region engine or by NCCL
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__coll {
    int kind;
    const void *in; void *out;   /* in == out for allreduce and broadcast */
    int64_t count;               /* allreduce: elements; broadcast: bytes; allgather: bytes per rank;
                                    reduce_scatter: elements of out */
    int dtype, avg, root;
    /* CUDA data: what the collective must run after, and what may run after it */
    int dev;                     /* in/out are device memory of this device (raw buffers); -1: host, or tensors
                                    staged by the caller */
    void *stream;                /* the stream whose queued work produced in: a CUDA tensor's context stream */
    void *ready_ev;              /* or an event recorded on it when the collective was issued (asynchronous) */
    int ordered;                 /* or the caller synchronised the device; with none of the three, device
                                    data waits for all work of its device (the producer is unknown) */
    void *done_ev;               /* recorded on the communicator's stream after the collective (consumers wait) */
} mgpu__coll;

static mgpu__coll mgpu__make_coll(int kind, const void *in, void *out, int64_t count, int dtype, int avg, int root) {
    mgpu__coll k;
    memset(&k, 0, sizeof k);
    k.kind = kind; k.in = in; k.out = out; k.count = count; k.dtype = dtype; k.avg = avg; k.root = root;
    k.dev = -1;
    return k;
}

static mgpu_result mgpu__shared_run(mgpu_comm *c, const char *fn, const mgpu__coll *k) {
    mgpu__coll_sig sig;
    switch (k->kind) {
    case MGPU__COLL_ALLREDUCE: return mgpu__shared_allreduce(c, fn, k->out, k->count, k->dtype, k->avg);
    case MGPU__COLL_BROADCAST: return mgpu__shared_broadcast(c, fn, k->out, k->count, k->root, k->dtype);
    case MGPU__COLL_ALLGATHER: return mgpu__shared_allgather(c, fn, k->in, k->count, k->out);
    case MGPU__COLL_REDUCE_SCATTER: return mgpu__shared_reduce_scatter(c, fn, (const float *)k->in, (float *)k->out, k->count, k->avg);
    default:
        sig = mgpu__make_sig(MGPU__COLL_BARRIER, -1, 0, 0, 0);
        return mgpu__comm_sync(c, fn, &sig);
    }
}

#ifdef MGPU_CUDA
static mgpu_result mgpu__nccl_run(mgpu_comm *c, const char *fn, const mgpu__coll *k);
static mgpu_result mgpu__shared_run_staged(mgpu_comm *c, const char *fn, const mgpu__coll *k);
static int mgpu__comm_ptr_device(const void *p);
#endif

/* Executes k now (the caller has ordered it after earlier asynchronous work). */
static mgpu_result mgpu__comm_run(mgpu_comm *c, const char *fn, const mgpu__coll *k) {
    mgpu_result r;
    pthread_mutex_lock(&c->exec_mu);
#ifdef MGPU_CUDA
    if (c->backend == MGPU_COMM_NCCL) r = mgpu__nccl_run(c, fn, k);
    else if (k->dev >= 0) r = mgpu__shared_run_staged(c, fn, k);
    else
#endif
    r = mgpu__shared_run(c, fn, k);
    pthread_mutex_unlock(&c->exec_mu);
    return r;
}

/* Waits on c->cv until deadline (mgpu_time_s clock: the condition variable uses CLOCK_MONOTONIC). */
static void mgpu__comm_cond_wait(mgpu_comm *c, double deadline) {
    struct timespec ts;
    ts.tv_sec = (time_t)deadline;
    ts.tv_nsec = (long)((deadline - (double)ts.tv_sec) * 1e9);
    pthread_cond_timedwait(&c->cv, &c->mu, &ts);
}

/* Asynchronous work ends within its own collective's timeout; waits allow that plus a margin so the
   collective's message, which names the missing ranks, is the one reported. */
static double mgpu__comm_wait_deadline(const mgpu_comm *c) { return mgpu_time_s() + c->timeout_s * 1.1 + 1.0; }

/* Blocking collectives run after every asynchronous all-reduce issued before them. */
static mgpu_result mgpu__comm_drain(mgpu_comm *c, const char *fn) {
    double deadline;
    int64_t left;
    if (!c->progress_started) return MGPU_OK;
    pthread_mutex_lock(&c->mu);
    deadline = mgpu__comm_wait_deadline(c);
    while (c->pending > 0 && mgpu_time_s() < deadline) mgpu__comm_cond_wait(c, deadline);
    left = c->pending;
    pthread_mutex_unlock(&c->mu);
    if (left > 0)
        return mgpu__comm_break(c, MGPU_ERR_TIMEOUT, "%s: %lld asynchronous all-reduces issued before it did not finish within %.0f s",
                                fn, (long long)left, c->timeout_s);
    return MGPU_OK;
}

static mgpu_result mgpu__comm_collective(mgpu_comm *c, const char *fn, const mgpu__coll *k) {
    mgpu_result r = mgpu__comm_usable(c, fn);
    if (r == MGPU_OK) r = mgpu__comm_drain(c, fn);
    return r == MGPU_OK ? mgpu__comm_run(c, fn, k) : r;
}

/* ---- argument checks ---- */

static mgpu_result mgpu__check_reduce_op(const char *fn, mgpu_reduce_op op) {
    if (op != MGPU_REDUCE_SUM && op != MGPU_REDUCE_AVG)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: op %d is not MGPU_REDUCE_SUM or MGPU_REDUCE_AVG", fn, (int)op);
    return MGPU_OK;
}

static mgpu_result mgpu__check_comm_tensor(const char *fn, const char *arg, const mgpu_tensor *t, int need_f32) {
    if (!t) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: %s is NULL", fn, arg);
    if (need_f32 && t->dtype != MGPU_F32)
        return mgpu__fail(MGPU_ERR_SHAPE, "%s: %s is %s; this collective takes F32 tensors", fn, arg, mgpu_dtype_name(t->dtype));
#ifndef MGPU_CUDA
    if (t->device.type != MGPU_DEVICE_CPU)
        return mgpu__fail(MGPU_ERR_UNSUPPORTED, "%s: %s is on cuda:%d but this build has no CUDA support", fn, arg, t->device.index);
#endif
    return MGPU_OK;
}

static mgpu_result mgpu__comm_check_buffer(const char *fn, const char *arg, const void *p, int64_t n) {
    if (n < 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: %s has a negative size (%lld)", fn, arg, (long long)n);
    if (!p && n > 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: %s is NULL with size %lld", fn, arg, (long long)n);
    return MGPU_OK;
}

/* ---- host memory of a tensor during a collective ---- */

/* The stream a tensor's producers and consumers run on: its context's (NULL: the legacy stream). */
static void *mgpu__comm_tensor_stream(const mgpu_tensor *t) {
#ifdef MGPU_CUDA
    if (t && t->device.type == MGPU_DEVICE_CUDA && t->ctx) return t->ctx->cuda_stream;
#endif
    (void)t;
    return NULL;
}

/* t->data, or for a CUDA tensor under shm/threads a pinned staging buffer (one of two), filled
   from the device when load (nccl takes device memory directly). NULL on failure. The copies run
   on the tensor's stream, in order after the work that produced it (a blocking cudaMemcpy would run
   on the legacy stream, which does not wait for a non-blocking stream). */
static void *mgpu__comm_host_begin(mgpu_comm *c, const mgpu_tensor *t, int which, int load, const char *fn) {
#ifdef MGPU_CUDA
    if (t->device.type == MGPU_DEVICE_CUDA && c->backend != MGPU_COMM_NCCL) {
        size_t bytes = mgpu_tensor_nbytes(t);
        cudaStream_t s = (cudaStream_t)mgpu__comm_tensor_stream(t);
        if (cudaSetDevice(t->device.index) != cudaSuccess) { mgpu__fail(MGPU_ERR_CUDA, "%s: cannot select cuda:%d", fn, t->device.index); return NULL; }
        if (bytes > c->pinned_bytes[which]) {
            if (c->pinned[which]) cudaFreeHost(c->pinned[which]);
            c->pinned[which] = NULL; c->pinned_bytes[which] = 0;
            if (cudaMallocHost(&c->pinned[which], bytes) != cudaSuccess) {
                mgpu__fail(MGPU_ERR_OOM_HOST, "%s: cannot allocate %zu bytes of pinned host memory to stage a CUDA tensor", fn, bytes);
                return NULL;
            }
            c->pinned_bytes[which] = bytes;
        }
        if (load && bytes && (cudaMemcpyAsync(c->pinned[which], t->data, bytes, cudaMemcpyDeviceToHost, s) != cudaSuccess ||
                              cudaStreamSynchronize(s) != cudaSuccess)) {
            mgpu__fail(MGPU_ERR_CUDA, "%s: copying %zu bytes from cuda:%d to host failed", fn, bytes, t->device.index);
            return NULL;
        }
        return c->pinned[which];
    }
#endif
    (void)c; (void)which; (void)load; (void)fn;
    return t->data;
}

/* Copies a staged result back to the device (store), on the tensor's stream and waited for (the
   staging buffer is reused), and passes r through. */
static mgpu_result mgpu__comm_host_end(const mgpu_tensor *t, void *host, int store, mgpu_result r, const char *fn) {
#ifdef MGPU_CUDA
    cudaStream_t s = (cudaStream_t)mgpu__comm_tensor_stream(t);
    if (r == MGPU_OK && store && host != t->data && mgpu_tensor_nbytes(t) &&
        (cudaMemcpyAsync(t->data, host, mgpu_tensor_nbytes(t), cudaMemcpyHostToDevice, s) != cudaSuccess || cudaStreamSynchronize(s) != cudaSuccess))
        return mgpu__fail(MGPU_ERR_CUDA, "%s: copying %zu bytes back to cuda:%d failed", fn, mgpu_tensor_nbytes(t), t->device.index);
#endif
    (void)t; (void)host; (void)store; (void)fn;
    return r;
}

/* --------------------------------------------------------------------------------------
   Public collectives
   -------------------------------------------------------------------------------------- */

MGPU_API mgpu_result mgpu_comm_allreduce(mgpu_comm *c, mgpu_tensor *t, mgpu_reduce_op op) {
    const char *fn = "mgpu_comm_allreduce";
    mgpu__coll k;
    mgpu_result r;
    void *host;
    if ((r = mgpu__comm_usable(c, fn)) != MGPU_OK || (r = mgpu__check_comm_tensor(fn, "tensor", t, 1)) != MGPU_OK ||
        (r = mgpu__check_reduce_op(fn, op)) != MGPU_OK) return r;
    if (!(host = mgpu__comm_host_begin(c, t, 0, 1, fn))) return mgpu_last_result();
    k = mgpu__make_coll(MGPU__COLL_ALLREDUCE, host, host, t->numel, MGPU_F32, op == MGPU_REDUCE_AVG, -1);
    k.stream = mgpu__comm_tensor_stream(t);
    return mgpu__comm_host_end(t, host, 1, mgpu__comm_collective(c, fn, &k), fn);
}

MGPU_API mgpu_result mgpu_comm_broadcast(mgpu_comm *c, mgpu_tensor *t, int root) {
    const char *fn = "mgpu_comm_broadcast";
    mgpu__coll k;
    mgpu_result r;
    void *host;
    if ((r = mgpu__comm_usable(c, fn)) != MGPU_OK || (r = mgpu__check_comm_tensor(fn, "tensor", t, 0)) != MGPU_OK) return r;
    if (root < 0 || root >= c->world) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: root %d is out of range for world size %d", fn, root, c->world);
    if (!(host = mgpu__comm_host_begin(c, t, 0, c->rank == root, fn))) return mgpu_last_result();
    k = mgpu__make_coll(MGPU__COLL_BROADCAST, host, host, (int64_t)mgpu_tensor_nbytes(t), (int)t->dtype, 0, root);
    k.stream = mgpu__comm_tensor_stream(t);
    return mgpu__comm_host_end(t, host, c->rank != root, mgpu__comm_collective(c, fn, &k), fn);
}

MGPU_API mgpu_result mgpu_comm_allgather(mgpu_comm *c, const mgpu_tensor *in, mgpu_tensor *out) {
    const char *fn = "mgpu_comm_allgather";
    mgpu__coll k;
    mgpu_result r;
    void *hin, *hout;
    if ((r = mgpu__comm_usable(c, fn)) != MGPU_OK || (r = mgpu__check_comm_tensor(fn, "in", in, 0)) != MGPU_OK ||
        (r = mgpu__check_comm_tensor(fn, "out", out, 0)) != MGPU_OK) return r;
    if (in->dtype != out->dtype || out->numel != (int64_t)c->world * in->numel)
        return mgpu__fail(MGPU_ERR_SHAPE, "%s: out is %s with %lld elements; expected %s with world size %d x %lld (in's) elements", fn,
                          mgpu_dtype_name(out->dtype), (long long)out->numel, mgpu_dtype_name(in->dtype), c->world, (long long)in->numel);
    if (!(hin = mgpu__comm_host_begin(c, in, 0, 1, fn)) || !(hout = mgpu__comm_host_begin(c, out, 1, 0, fn))) return mgpu_last_result();
    k = mgpu__make_coll(MGPU__COLL_ALLGATHER, hin, hout, (int64_t)mgpu_tensor_nbytes(in), (int)in->dtype, 0, -1);
    k.stream = mgpu__comm_tensor_stream(in);
    return mgpu__comm_host_end(out, hout, 1, mgpu__comm_collective(c, fn, &k), fn);
}

MGPU_API mgpu_result mgpu_comm_reduce_scatter(mgpu_comm *c, const mgpu_tensor *in, mgpu_tensor *out, mgpu_reduce_op op) {
    const char *fn = "mgpu_comm_reduce_scatter";
    mgpu__coll k;
    mgpu_result r;
    void *hin, *hout;
    if ((r = mgpu__comm_usable(c, fn)) != MGPU_OK || (r = mgpu__check_comm_tensor(fn, "in", in, 1)) != MGPU_OK ||
        (r = mgpu__check_comm_tensor(fn, "out", out, 1)) != MGPU_OK || (r = mgpu__check_reduce_op(fn, op)) != MGPU_OK) return r;
    if (in->numel != (int64_t)c->world * out->numel)
        return mgpu__fail(MGPU_ERR_SHAPE, "%s: in has %lld elements; expected world size %d x %lld (out's) elements", fn,
                          (long long)in->numel, c->world, (long long)out->numel);
    if (in->data == out->data && out->numel > 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: in and out must not share memory", fn);
    if (!(hin = mgpu__comm_host_begin(c, in, 0, 1, fn)) || !(hout = mgpu__comm_host_begin(c, out, 1, 0, fn))) return mgpu_last_result();
    k = mgpu__make_coll(MGPU__COLL_REDUCE_SCATTER, hin, hout, out->numel, MGPU_F32, op == MGPU_REDUCE_AVG, -1);
    k.stream = mgpu__comm_tensor_stream(in);
    return mgpu__comm_host_end(out, hout, 1, mgpu__comm_collective(c, fn, &k), fn);
}

MGPU_API mgpu_result mgpu_comm_barrier(mgpu_comm *c) {
    mgpu__coll k = mgpu__make_coll(MGPU__COLL_BARRIER, NULL, NULL, 0, 0, 0, -1);
    return mgpu__comm_collective(c, "mgpu_comm_barrier", &k);
}

static mgpu_result mgpu__allreduce_raw(mgpu_comm *c, const char *fn, void *data, int64_t n, int dtype, mgpu_reduce_op op) {
    mgpu__coll k;
    mgpu_result r;
    if ((r = mgpu__comm_usable(c, fn)) != MGPU_OK || (r = mgpu__comm_check_buffer(fn, "data", data, n)) != MGPU_OK ||
        (r = mgpu__check_reduce_op(fn, op)) != MGPU_OK) return r;
    k = mgpu__make_coll(MGPU__COLL_ALLREDUCE, data, data, n, dtype, op == MGPU_REDUCE_AVG, -1);
#ifdef MGPU_CUDA
    if (n > 0) k.dev = mgpu__comm_ptr_device(data);
#endif
    return mgpu__comm_collective(c, fn, &k);
}
MGPU_API mgpu_result mgpu_comm_allreduce_f32(mgpu_comm *c, float *data, int64_t n, mgpu_reduce_op op) {
    return mgpu__allreduce_raw(c, "mgpu_comm_allreduce_f32", data, n, MGPU_F32, op);
}
MGPU_API mgpu_result mgpu_comm_allreduce_f64(mgpu_comm *c, double *data, int64_t n, mgpu_reduce_op op) {
    return mgpu__allreduce_raw(c, "mgpu_comm_allreduce_f64", data, n, MGPU__DTYPE_F64, op);
}

MGPU_API mgpu_result mgpu_comm_allgather_bytes(mgpu_comm *c, const void *in, size_t bytes, void *out) {
    const char *fn = "mgpu_comm_allgather_bytes";
    mgpu__coll k;
    mgpu_result r;
    if ((r = mgpu__comm_usable(c, fn)) != MGPU_OK) return r;
    if (bytes > (size_t)INT64_MAX / (size_t)c->world) return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: %zu bytes per rank is too large", fn, bytes);
    if ((r = mgpu__comm_check_buffer(fn, "in", in, (int64_t)bytes)) != MGPU_OK || (r = mgpu__comm_check_buffer(fn, "out", out, (int64_t)bytes)) != MGPU_OK) return r;
    k = mgpu__make_coll(MGPU__COLL_ALLGATHER, in, out, (int64_t)bytes, MGPU_U8, 0, -1);
    return mgpu__comm_collective(c, fn, &k);
}

/* --------------------------------------------------------------------------------------
   Asynchronous all-reduce: a progress thread per communicator runs them in issue order
   -------------------------------------------------------------------------------------- */

static void *mgpu__comm_progress_main(void *arg) {
    mgpu_comm *c = (mgpu_comm *)arg;
    const char *fn = "mgpu_comm_allreduce_f32_async";
#ifdef MGPU_CUDA
    if (c->cuda_device >= 0) cudaSetDevice(c->cuda_device);   /* the current device is per thread */
#endif
    pthread_mutex_lock(&c->mu);
    for (;;) {
        mgpu_comm_work *w;
        mgpu__coll k;
        mgpu_result r;
        while (!c->queue_head && !c->progress_stop) pthread_cond_wait(&c->cv, &c->mu);
        if (!(w = c->queue_head)) break;   /* stopping with nothing left */
        c->queue_head = w->next;
        if (!c->queue_head) c->queue_tail = NULL;
        pthread_mutex_unlock(&c->mu);
        k = mgpu__make_coll(MGPU__COLL_ALLREDUCE, w->data, w->data, w->n, MGPU_F32, w->op == MGPU_REDUCE_AVG, -1);
        k.dev = w->device; k.stream = w->stream; k.ready_ev = w->ready_ev; k.done_ev = w->done_ev;
        k.ordered = w->device >= 0 && !w->ready_ev;   /* raw device data: the issuer synchronised the device */
        r = mgpu__comm_usable(c, fn);
        if (r == MGPU_OK) r = mgpu__comm_run(c, fn, &k);
        pthread_mutex_lock(&c->mu);
        w->result = r;
        if (r != MGPU_OK) snprintf(w->msg, sizeof w->msg, "%s", mgpu_last_error());   /* errors are per thread */
        __atomic_store_n(&w->done, 1, __ATOMIC_RELEASE);
        c->pending--;
        if (w->abandoned) mgpu__comm_work_free(w);
        pthread_cond_broadcast(&c->cv);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* Queues an all-reduce of n floats at data for the progress thread. Device data (device >= 0):
   produced by work queued on `stream` before this call (its event is recorded now, so the
   collective waits for that work and nothing later), or with stream NULL by anything queued on the
   device so far (synchronised now). */
static mgpu_comm_work *mgpu__comm_allreduce_async(mgpu_comm *c, const char *fn, float *data, int64_t n, mgpu_reduce_op op, int device, void *stream) {
    mgpu_comm_work *w;
    if (mgpu__comm_usable(c, fn) != MGPU_OK || mgpu__comm_check_buffer(fn, "data", data, n) != MGPU_OK || mgpu__check_reduce_op(fn, op) != MGPU_OK) return NULL;
    w = (mgpu_comm_work *)mgpu__calloc(sizeof *w, "an asynchronous all-reduce");
    if (!w) return NULL;
    w->comm = c; w->data = data; w->n = n; w->op = op;
    w->device = n > 0 ? device : -1; w->stream = stream;
#ifdef MGPU_CUDA
    if (w->device >= 0) {
        cudaError_t e = cudaSetDevice(w->device);
        if (e == cudaSuccess && stream) {
            e = cudaEventCreateWithFlags((cudaEvent_t *)&w->ready_ev, cudaEventDisableTiming);
            if (e == cudaSuccess) e = cudaEventRecord((cudaEvent_t)w->ready_ev, (cudaStream_t)stream);
        } else if (e == cudaSuccess) e = cudaDeviceSynchronize();
        if (e == cudaSuccess) e = cudaEventCreateWithFlags((cudaEvent_t *)&w->done_ev, cudaEventDisableTiming);
        if (e != cudaSuccess) {
            cudaGetLastError();
            mgpu__comm_work_free(w);
            MGPU__FAIL_NULL(MGPU_ERR_CUDA, "%s: ordering the all-reduce of %lld floats on cuda:%d after their producer failed: %s", fn,
                            (long long)n, device, cudaGetErrorString(e));
        }
    }
#else
    (void)stream;
#endif
    pthread_mutex_lock(&c->mu);
    if (!c->progress_started) {
        c->progress_stop = 0;
        if (pthread_create(&c->progress, NULL, mgpu__comm_progress_main, c) != 0) {
            pthread_mutex_unlock(&c->mu);
            mgpu__comm_work_free(w);
            MGPU__FAIL_NULL(MGPU_ERR_STATE, "%s: cannot start the communicator's progress thread", fn);
        }
        c->progress_started = 1;
    }
    if (c->queue_tail) c->queue_tail->next = w; else c->queue_head = w;
    c->queue_tail = w;
    w->live_next = c->live;
    if (c->live) c->live->live_prev = w;
    c->live = w;
    c->pending++;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    return w;
}

MGPU_API mgpu_comm_work *mgpu_comm_allreduce_f32_async(mgpu_comm *c, float *data, int64_t n, mgpu_reduce_op op) {
    int device = -1;
#ifdef MGPU_CUDA
    if (n > 0 && data) device = mgpu__comm_ptr_device(data);
#endif
    return mgpu__comm_allreduce_async(c, "mgpu_comm_allreduce_f32_async", data, n, op, device, NULL);
}

MGPU_API int mgpu_comm_work_done(const mgpu_comm_work *w) {
    if (!w) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_work_done: work is NULL"); return 0; }
    return __atomic_load_n(&w->done, __ATOMIC_ACQUIRE);
}

/* Waits for w and frees it; a successful collective on device data is also ordered before the work
   queued on `consumer` from now on (NULL: none; the host has waited for it anyway). */
static mgpu_result mgpu__comm_wait(mgpu_comm_work *w, void *consumer) {
    mgpu_comm *c;
    mgpu_result r;
    double deadline;
    if (!w) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_wait: work is NULL");
    c = w->comm;
    pthread_mutex_lock(&c->mu);
    deadline = mgpu__comm_wait_deadline(c);
    while (!w->done && mgpu_time_s() < deadline) mgpu__comm_cond_wait(c, deadline);
    if (w->live_prev) w->live_prev->live_next = w->live_next; else c->live = w->live_next;
    if (w->live_next) w->live_next->live_prev = w->live_prev;
    if (!w->done) {   /* the progress thread frees it when its collective ends */
        int64_t n = w->n;
        w->abandoned = 1;
        pthread_mutex_unlock(&c->mu);
        return mgpu__comm_break(c, MGPU_ERR_TIMEOUT, "mgpu_comm_wait: the asynchronous all-reduce of %lld floats did not finish within %.0f s", (long long)n, c->timeout_s);
    }
    pthread_mutex_unlock(&c->mu);
    r = w->result;
    if (r != MGPU_OK) mgpu__fail(r, "%s", w->msg);
#ifdef MGPU_CUDA
    if (r == MGPU_OK && consumer && w->done_ev) {
        cudaError_t e = cudaSetDevice(w->device);
        if (e == cudaSuccess) e = cudaStreamWaitEvent((cudaStream_t)consumer, (cudaEvent_t)w->done_ev, 0);
        if (e != cudaSuccess) {
            cudaGetLastError();
            r = mgpu__fail(MGPU_ERR_CUDA, "mgpu_comm_wait: ordering the consumer stream after the all-reduce on cuda:%d failed: %s",
                           w->device, cudaGetErrorString(e));
        }
    }
#else
    (void)consumer;
#endif
    mgpu__comm_work_free(w);
    return r;
}

MGPU_API mgpu_result mgpu_comm_wait(mgpu_comm_work *w) { return mgpu__comm_wait(w, NULL); }

/* --------------------------------------------------------------------------------------
   nccl backend (MGPU_CUDA): a non-blocking NCCL communicator, its own stream ordered after the
   stream that produced the data (a tensor's context stream) with an event, and waits that poll
   the completion event and NCCL's asynchronous error until
   the timeout, aborting the communicator on failure. Host buffers are staged through device memory.
   -------------------------------------------------------------------------------------- */
#ifdef MGPU_CUDA

static mgpu_result mgpu__comm_cuda_check(mgpu_comm *c, cudaError_t e, const char *fn, const char *what) {
    if (e == cudaSuccess) return MGPU_OK;
    cudaGetLastError();   /* clear it, so later calls do not report it again */
    if (e == cudaErrorMemoryAllocation) return mgpu__fail(MGPU_ERR_OOM_DEVICE, "%s: %s: out of device memory on cuda:%d", fn, what, c->cuda_device);
    return mgpu__fail(MGPU_ERR_CUDA, "%s: %s failed on cuda:%d: %s", fn, what, c->cuda_device, cudaGetErrorString(e));
}

static mgpu_result mgpu__nccl_unique_id_hex(char *hex, size_t size) {
    ncclUniqueId id;
    ncclResult_t r;
    size_t i;
    if (size < 2 * sizeof id.internal + 1) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_comm_create: NCCL id buffer too small");
    if ((r = ncclGetUniqueId(&id)) != ncclSuccess) return mgpu__fail(MGPU_ERR_NCCL, "mgpu_comm_create: ncclGetUniqueId failed: %s", ncclGetErrorString(r));
    for (i = 0; i < sizeof id.internal; i++) snprintf(hex + 2 * i, 3, "%02x", (unsigned)(unsigned char)id.internal[i]);
    return MGPU_OK;
}

/* Aborts the NCCL communicator (the only way out of a collective that will never finish). */
static void mgpu__nccl_abort(mgpu_comm *c) {
    if (c->nccl) ncclCommAbort(c->nccl);
    c->nccl = NULL;
}

/* Follows a non-blocking NCCL call until it leaves ncclInProgress; errors and the deadline abort. */
static mgpu_result mgpu__nccl_settle(mgpu_comm *c, ncclResult_t r, double deadline, const char *fn, const char *what) {
    while (r == ncclInProgress && c->nccl) {
        if (mgpu_time_s() > deadline) {
            mgpu__nccl_abort(c);
            return mgpu__comm_break(c, MGPU_ERR_TIMEOUT, "%s: %s did not finish within %.0f s on rank %d (a rank may have died or hung; NCCL "
                                    "cannot tell which); the NCCL communicator was aborted", fn, what, c->timeout_s, c->rank);
        }
        mgpu__comm_sleep_s(50e-6);
        if (ncclCommGetAsyncError(c->nccl, &r) != ncclSuccess) r = ncclInternalError;
    }
    if (r != ncclSuccess) {
        char last[256];
        snprintf(last, sizeof last, "%s", c->nccl && ncclGetLastError(c->nccl) ? ncclGetLastError(c->nccl) : "");
        mgpu__nccl_abort(c);
        return mgpu__comm_break(c, MGPU_ERR_NCCL, "%s: %s failed on rank %d: %s%s%s; the NCCL communicator was aborted", fn, what, c->rank,
                                ncclGetErrorString(r), last[0] ? " - " : "", last);
    }
    return MGPU_OK;
}

/* The communicator's own stream and events, on the current device (its own). */
static mgpu_result mgpu__nccl_open_stream(mgpu_comm *c, const char *fn) {
    mgpu_result r;
    if ((r = mgpu__comm_cuda_check(c, cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking), fn, "cudaStreamCreateWithFlags")) != MGPU_OK ||
        (r = mgpu__comm_cuda_check(c, cudaEventCreateWithFlags(&c->ev_ready, cudaEventDisableTiming), fn, "cudaEventCreate")) != MGPU_OK ||
        (r = mgpu__comm_cuda_check(c, cudaEventCreateWithFlags(&c->ev_done, cudaEventDisableTiming), fn, "cudaEventCreate")) != MGPU_OK) return r;
    return MGPU_OK;
}

static mgpu_result mgpu__nccl_init(mgpu_comm *c, const char *id_hex, double deadline) {
    const char *fn = "mgpu_comm_create";
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    ncclUniqueId id;
    mgpu_result r;
    size_t i;
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        cudaGetLastError();
        return mgpu__fail(MGPU_ERR_UNSUPPORTED, "%s: the nccl backend needs a GPU, and rank %d sees none", fn, c->rank);
    }
    /* --gpu-ids names this local rank's device; else local rank i runs on visible device i. Both count
       the devices CUDA_VISIBLE_DEVICES leaves visible, from 0. */
    if (c->gpu_id >= n) {
        const char *vis = getenv("CUDA_VISIBLE_DEVICES");
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: --gpu-ids gives local rank %d device %d, but %d %s visible (CUDA_VISIBLE_DEVICES%s%s%s); "
                          "ids count the visible devices from 0", fn, c->local_rank, c->gpu_id, n, n == 1 ? "is" : "are",
                          vis ? "='" : " unset: all of the host's", vis ? vis : "", vis ? "'" : "");
    }
    if (c->gpu_id < 0 && c->local_rank >= n) {
        const char *vis = getenv("CUDA_VISIBLE_DEVICES");
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: LOCAL_RANK %d has no GPU of its own: %d %s visible (CUDA_VISIBLE_DEVICES%s%s%s) and local rank i "
                          "runs on visible device i; start at most %d ranks on this host, or name each local rank's device with --gpu-ids "
                          "(NCCL cannot put two ranks on one GPU; the shm backend can)", fn, c->local_rank, n, n == 1 ? "is" : "are",
                          vis ? "='" : " unset: all of the host's", vis ? vis : "", vis ? "'" : "", n);
    }
    c->cuda_device = c->gpu_id >= 0 ? c->gpu_id : c->local_rank;
    if ((r = mgpu__comm_cuda_check(c, cudaSetDevice(c->cuda_device), fn, "cudaSetDevice")) != MGPU_OK) return r;
    if (strlen(id_hex) < 2 * sizeof id.internal) return mgpu__fail(MGPU_ERR_FORMAT, "%s: rank %d got a malformed NCCL unique id", fn, c->rank);
    for (i = 0; i < sizeof id.internal; i++) {
        unsigned v = 0;
        if (sscanf(id_hex + 2 * i, "%2x", &v) != 1) return mgpu__fail(MGPU_ERR_FORMAT, "%s: rank %d got a malformed NCCL unique id", fn, c->rank);
        id.internal[i] = (char)v;
    }
    cfg.blocking = 0;   /* calls return at once; every wait below is ours, bounded by the timeout */
    r = mgpu__nccl_settle(c, ncclCommInitRankConfig(&c->nccl, c->world, id, c->rank, &cfg), deadline, fn, "ncclCommInitRank");
    return r != MGPU_OK ? r : mgpu__nccl_open_stream(c, fn);
}

/* n NCCL communicators of this process, rank i on devices[i] (checked: visible, distinct), made
   together in one group from this thread (NCCL's single-process pattern), non-blocking as above. */
static mgpu_result mgpu__nccl_init_group(mgpu_comm **comms, int n, const int *devices, const char *fn) {
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    ncclUniqueId id;
    ncclResult_t gr;
    mgpu_result r = MGPU_OK;
    int i, prev = 0;
    cfg.blocking = 0;
    if ((gr = ncclGetUniqueId(&id)) != ncclSuccess) return mgpu__fail(MGPU_ERR_NCCL, "%s: ncclGetUniqueId failed: %s", fn, ncclGetErrorString(gr));
    if (cudaGetDevice(&prev) != cudaSuccess) cudaGetLastError();
    ncclGroupStart();
    for (i = 0; i < n && r == MGPU_OK; i++) {
        comms[i]->cuda_device = devices[i];
        if ((r = mgpu__comm_cuda_check(comms[i], cudaSetDevice(devices[i]), fn, "cudaSetDevice")) != MGPU_OK) break;
        gr = ncclCommInitRankConfig(&comms[i]->nccl, n, id, i, &cfg);
        if (gr != ncclSuccess && gr != ncclInProgress) r = mgpu__fail(MGPU_ERR_NCCL, "%s: ncclCommInitRank for rank %d on cuda:%d failed: %s", fn, i, devices[i], ncclGetErrorString(gr));
    }
    gr = ncclGroupEnd();
    for (i = 0; i < n && r == MGPU_OK; i++) {
        double deadline = mgpu_time_s() + comms[i]->timeout_s;
        if ((r = mgpu__comm_cuda_check(comms[i], cudaSetDevice(devices[i]), fn, "cudaSetDevice")) != MGPU_OK) break;
        if (!comms[i]->nccl) r = mgpu__fail(MGPU_ERR_NCCL, "%s: ncclCommInitRank gave rank %d no communicator: %s", fn, i, ncclGetErrorString(gr));
        else if ((r = mgpu__nccl_settle(comms[i], gr == ncclSuccess ? ncclInProgress : gr, deadline, fn, "ncclCommInitRank")) == MGPU_OK)
            r = mgpu__nccl_open_stream(comms[i], fn);
    }
    cudaSetDevice(prev);
    return r;
}

static void mgpu__nccl_teardown(mgpu_comm *c) {
    int i;
    if (c->cuda_device >= 0) cudaSetDevice(c->cuda_device);
    if (c->nccl) {
        double deadline = mgpu_time_s() + c->timeout_s;
        ncclResult_t r = ncclCommFinalize(c->nccl);
        while (r == ncclInProgress && mgpu_time_s() < deadline) {
            mgpu__comm_sleep_s(100e-6);
            if (ncclCommGetAsyncError(c->nccl, &r) != ncclSuccess) r = ncclInternalError;
        }
        if (r == ncclSuccess) ncclCommDestroy(c->nccl);
        else ncclCommAbort(c->nccl);
        c->nccl = NULL;
    }
    if (c->ev_ready) cudaEventDestroy(c->ev_ready);
    if (c->ev_done) cudaEventDestroy(c->ev_done);
    if (c->stream) cudaStreamDestroy(c->stream);
    if (c->dev_scratch) cudaFree(c->dev_scratch);
    for (i = 0; i < 3; i++) if (c->pinned[i]) cudaFreeHost(c->pinned[i]);
    c->ev_ready = c->ev_done = NULL; c->stream = NULL; c->dev_scratch = NULL;
}

static int mgpu__comm_is_device_ptr(const void *p) {
    struct cudaPointerAttributes a;
    memset(&a, 0, sizeof a);
    if (!p || cudaPointerGetAttributes(&a, p) != cudaSuccess) { cudaGetLastError(); return 0; }
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}
/* The device whose memory p points into; -1 for host memory (or no CUDA device at all). */
static int mgpu__comm_ptr_device(const void *p) {
    struct cudaPointerAttributes a;
    int n = 0;
    if (!p || cudaGetDeviceCount(&n) != cudaSuccess || n == 0) { cudaGetLastError(); return -1; }
    return mgpu__comm_is_device_ptr(p) && cudaPointerGetAttributes(&a, p) == cudaSuccess && a.device >= 0 ? a.device : -1;
}

/* Orders c->stream (current device: the data's) after the work that produced k's device data:
   the event its issuer recorded, else an event recorded now on its stream, else (a raw pointer,
   producer unknown) all work queued on the device, unless the issuer synchronised already. The
   legacy default stream would not do: it does not wait for the non-blocking streams contexts use. */
static mgpu_result mgpu__comm_order_after_producer(mgpu_comm *c, const mgpu__coll *k, int device_data, const char *fn) {
    mgpu_result r;
    if (k->ready_ev) return mgpu__comm_cuda_check(c, cudaStreamWaitEvent(c->stream, (cudaEvent_t)k->ready_ev, 0), fn, "cudaStreamWaitEvent");
    if (k->stream) {
        if ((r = mgpu__comm_cuda_check(c, cudaEventRecord(c->ev_ready, (cudaStream_t)k->stream), fn, "cudaEventRecord")) != MGPU_OK) return r;
        return mgpu__comm_cuda_check(c, cudaStreamWaitEvent(c->stream, c->ev_ready, 0), fn, "cudaStreamWaitEvent");
    }
    if (device_data && !k->ordered) return mgpu__comm_cuda_check(c, cudaDeviceSynchronize(), fn, "cudaDeviceSynchronize");
    return MGPU_OK;
}

/* shm and threads on device memory (raw buffers, DDP buckets): staged through pinned host memory
   by copies on the communicator's own stream of the data's device, ordered after the data's
   producer; the result goes back before the call returns (the staging buffer is reused) and
   k->done_ev marks it on that stream for the consumers. */
static mgpu_result mgpu__shared_run_staged(mgpu_comm *c, const char *fn, const mgpu__coll *k) {
    size_t bytes = (size_t)k->count * mgpu__comm_elem_bytes(k->dtype);
    mgpu__coll h = *k;
    mgpu_result r, r2;
    if (k->kind != MGPU__COLL_ALLREDUCE)
        return mgpu__fail(MGPU_ERR_UNSUPPORTED, "%s: the %s backend takes device memory for all-reduces only; pass CUDA tensors", fn, mgpu__comm_backend_name(c->backend));
    if (c->cuda_device >= 0 && c->cuda_device != k->dev)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: the data is on cuda:%d, but this %s communicator stages cuda:%d's; use one device per communicator",
                          fn, k->dev, mgpu__comm_backend_name(c->backend), c->cuda_device);
    if (cudaSetDevice(k->dev) != cudaSuccess) { cudaGetLastError(); return mgpu__fail(MGPU_ERR_CUDA, "%s: cannot select cuda:%d", fn, k->dev); }
    if (!c->stream) {
        c->cuda_device = k->dev;
        if ((r = mgpu__comm_cuda_check(c, cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking), fn, "cudaStreamCreateWithFlags")) != MGPU_OK ||
            (r = mgpu__comm_cuda_check(c, cudaEventCreateWithFlags(&c->ev_ready, cudaEventDisableTiming), fn, "cudaEventCreate")) != MGPU_OK) return r;
    }
    if (bytes > c->pinned_bytes[2]) {
        if (c->pinned[2]) cudaFreeHost(c->pinned[2]);
        c->pinned[2] = NULL; c->pinned_bytes[2] = 0;
        if (cudaMallocHost(&c->pinned[2], bytes) != cudaSuccess) {
            cudaGetLastError();
            return mgpu__fail(MGPU_ERR_OOM_HOST, "%s: cannot allocate %zu bytes of pinned host memory to stage device data", fn, bytes);
        }
        c->pinned_bytes[2] = bytes;
    }
    if ((r = mgpu__comm_order_after_producer(c, k, 1, fn)) != MGPU_OK ||
        (r = mgpu__comm_cuda_check(c, cudaMemcpyAsync(c->pinned[2], k->in, bytes, cudaMemcpyDeviceToHost, c->stream), fn, "staging to the host")) != MGPU_OK ||
        (r = mgpu__comm_cuda_check(c, cudaStreamSynchronize(c->stream), fn, "staging to the host")) != MGPU_OK) return r;
    h.in = h.out = c->pinned[2];
    h.dev = -1;
    r = mgpu__shared_run(c, fn, &h);
    if (r == MGPU_OK) r = mgpu__comm_cuda_check(c, cudaMemcpyAsync(k->out, c->pinned[2], bytes, cudaMemcpyHostToDevice, c->stream), fn, "copying the result to the device");
    if (r == MGPU_OK && k->done_ev) r = mgpu__comm_cuda_check(c, cudaEventRecord((cudaEvent_t)k->done_ev, c->stream), fn, "cudaEventRecord");
    r2 = mgpu__comm_cuda_check(c, cudaStreamSynchronize(c->stream), fn, "copying the result to the device");
    return r != MGPU_OK ? r : r2;
}

static ncclDataType_t mgpu__nccl_dtype(int dtype) {
    switch (dtype) {
    case MGPU_F16: return ncclFloat16;
    case MGPU_BF16: return ncclBfloat16;
    case MGPU_I32: return ncclInt32;
    case MGPU_I64: return ncclInt64;
    case MGPU_U8: return ncclUint8;
    case MGPU__DTYPE_F64: return ncclFloat64;
    default: return ncclFloat32;
    }
}

/* Polls the completion event and NCCL's asynchronous error until done or the timeout. */
static mgpu_result mgpu__nccl_wait(mgpu_comm *c, const char *fn, const char *what) {
    double deadline = mgpu_time_s() + c->timeout_s;
    for (;;) {
        cudaError_t e = cudaEventQuery(c->ev_done);
        ncclResult_t ar = ncclSuccess;
        if (e == cudaSuccess) return MGPU_OK;
        if (e != cudaErrorNotReady) {
            mgpu__nccl_abort(c);
            cudaGetLastError();
            return mgpu__comm_break(c, MGPU_ERR_CUDA, "%s: %s failed on cuda:%d: %s; the NCCL communicator was aborted", fn, what, c->cuda_device, cudaGetErrorString(e));
        }
        if (ncclCommGetAsyncError(c->nccl, &ar) != ncclSuccess || (ar != ncclSuccess && ar != ncclInProgress))
            return mgpu__nccl_settle(c, ar == ncclSuccess ? ncclInternalError : ar, deadline, fn, what);
        if (mgpu_time_s() > deadline) {
            mgpu__nccl_abort(c);
            return mgpu__comm_break(c, MGPU_ERR_TIMEOUT, "%s: %s did not complete within %.0f s on rank %d (a rank may have died, hung or issued "
                                    "different collectives; NCCL cannot tell which); the NCCL communicator was aborted", fn, what, c->timeout_s, c->rank);
        }
        mgpu__comm_sleep_s(20e-6);
    }
}

static mgpu_result mgpu__nccl_scratch(mgpu_comm *c, size_t bytes, const char *fn) {
    if (bytes <= c->dev_scratch_bytes) return MGPU_OK;
    if (c->dev_scratch) cudaFree(c->dev_scratch);
    c->dev_scratch = NULL; c->dev_scratch_bytes = 0;
    if (mgpu__comm_cuda_check(c, cudaMalloc(&c->dev_scratch, bytes), fn, "staging buffer") != MGPU_OK) return mgpu_last_result();
    c->dev_scratch_bytes = bytes;
    return MGPU_OK;
}

/* Issues the NCCL call of k on device pointers din/dout. */
static ncclResult_t mgpu__nccl_issue(mgpu_comm *c, const mgpu__coll *k, const void *din, void *dout) {
    ncclRedOp_t op = k->avg ? ncclAvg : ncclSum;
    switch (k->kind) {
    case MGPU__COLL_ALLREDUCE: return ncclAllReduce(din, dout, (size_t)k->count, mgpu__nccl_dtype(k->dtype), op, c->nccl, c->stream);
    case MGPU__COLL_BROADCAST: return ncclBroadcast(din, dout, (size_t)k->count, ncclUint8, k->root, c->nccl, c->stream);
    case MGPU__COLL_ALLGATHER: return ncclAllGather(din, dout, (size_t)k->count, ncclUint8, c->nccl, c->stream);
    case MGPU__COLL_REDUCE_SCATTER: return ncclReduceScatter(din, dout, (size_t)k->count, ncclFloat32, op, c->nccl, c->stream);
    default: return ncclAllReduce(din, dout, 1, ncclFloat32, ncclSum, c->nccl, c->stream);   /* barrier */
    }
}

static mgpu_result mgpu__nccl_run(mgpu_comm *c, const char *fn, const mgpu__coll *k) {
    const char *what = mgpu__coll_name(k->kind);
    size_t in_bytes, out_bytes, in_stage, out_stage;
    const void *din;
    void *dout;
    int in_dev, out_dev, inplace = k->in == k->out;
    mgpu_result r;
    switch (k->kind) {
    case MGPU__COLL_ALLREDUCE: in_bytes = out_bytes = (size_t)k->count * mgpu__comm_elem_bytes(k->dtype); break;
    case MGPU__COLL_BROADCAST: in_bytes = out_bytes = (size_t)k->count; break;
    case MGPU__COLL_ALLGATHER: in_bytes = (size_t)k->count; out_bytes = in_bytes * (size_t)c->world; break;
    case MGPU__COLL_REDUCE_SCATTER: out_bytes = sizeof(float) * (size_t)k->count; in_bytes = out_bytes * (size_t)c->world; break;
    default: in_bytes = out_bytes = 0; break;
    }
    if (!c->nccl) return mgpu__fail(MGPU_ERR_STATE, "%s: the NCCL communicator was aborted earlier", fn);
    if ((r = mgpu__comm_cuda_check(c, cudaSetDevice(c->cuda_device), fn, "cudaSetDevice")) != MGPU_OK) return r;
    in_dev = k->kind != MGPU__COLL_BARRIER && mgpu__comm_is_device_ptr(k->in);
    out_dev = k->kind != MGPU__COLL_BARRIER && mgpu__comm_is_device_ptr(k->out);
    in_stage = in_dev ? 0 : ((MGPU__MAX(in_bytes, sizeof(float)) + 255) & ~(size_t)255);
    out_stage = out_dev || inplace ? 0 : out_bytes;
    if ((r = mgpu__nccl_scratch(c, in_stage + out_stage, fn)) != MGPU_OK) return r;
    din = in_dev ? k->in : c->dev_scratch;
    dout = inplace ? (void *)din : out_dev ? k->out : (void *)((char *)c->dev_scratch + in_stage);
    if ((r = mgpu__comm_order_after_producer(c, k, in_dev || out_dev, fn)) != MGPU_OK) return r;
    if (!in_dev && in_bytes && (r = mgpu__comm_cuda_check(c, cudaMemcpyAsync((void *)din, k->in, in_bytes, cudaMemcpyHostToDevice, c->stream), fn, "staging to the device")) != MGPU_OK) return r;
    if ((r = mgpu__nccl_settle(c, mgpu__nccl_issue(c, k, din, dout), mgpu_time_s() + c->timeout_s, fn, what)) != MGPU_OK) return r;
    if (k->done_ev && (r = mgpu__comm_cuda_check(c, cudaEventRecord((cudaEvent_t)k->done_ev, c->stream), fn, "cudaEventRecord")) != MGPU_OK) return r;
    if ((r = mgpu__comm_cuda_check(c, cudaEventRecord(c->ev_done, c->stream), fn, "cudaEventRecord")) != MGPU_OK) return r;
    if ((r = mgpu__nccl_wait(c, fn, what)) != MGPU_OK) return r;
    /* on the communicator's stream, not the legacy one */
    if (!out_dev && out_bytes && k->kind != MGPU__COLL_BARRIER &&
        ((r = mgpu__comm_cuda_check(c, cudaMemcpyAsync(k->out, dout, out_bytes, cudaMemcpyDeviceToHost, c->stream), fn, "copying the result to the host")) != MGPU_OK ||
         (r = mgpu__comm_cuda_check(c, cudaStreamSynchronize(c->stream), fn, "copying the result to the host")) != MGPU_OK)) return r;
    return MGPU_OK;
}

#endif /* MGPU_CUDA */
