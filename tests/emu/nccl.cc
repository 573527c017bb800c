/* mgpu CUDA emulation (tests only): NCCL for the calls mgpu makes, across threads of one process
   or processes of one host.

   A unique id names a POSIX shared-memory segment ("/mgpu-emu-nccl-<nonce>") that every rank of
   the communicator maps: a control line per rank (pid, barrier counter, abort flag, signature of
   its current collective) and a data slot per rank (MGPU_EMU_NCCL_SLOT_KB, default 1024). Once
   all ranks have joined, rank 0 unlinks the name, so nothing is left behind even after a crash.

   A collective moves its data in chunks of one slot: every rank copies its part of the chunk into
   its slot, a barrier, every rank computes its output from the slots, a barrier. Reductions add
   rank 0's value, then rank 1's, ... in the element type (f16/bf16 in f32, rounded once), and
   ncclAvg divides the sum by the rank count: the same arithmetic as mgpu's shm backend, so both
   give identical bits. The first chunk's barrier also compares the ranks' signatures (kind,
   count, type, op, root): ranks that issue different collectives are reported, where real NCCL
   would hang. Peers that die or abort end waits with ncclRemoteError; every wait is bounded by
   MGPU_EMU_NCCL_TIMEOUT_S (default: MGPU_TIMEOUT_S, else 300).

   On its stream a collective is one op for the stream-order checker: it reads the send buffer and
   writes the receive buffer, which must be device memory of the communicator's device. Calls
   between ncclGroupStart and ncclGroupEnd run together at ncclGroupEnd (so one thread may drive
   several ranks). Communicators complete their initialisation and collectives before the call
   returns; non-blocking communicators therefore never report ncclInProgress. */
#include "emu_internal.h"
#include "include/cuda_bf16.h"
#include "include/cuda_fp16.h"
#include "include/nccl.h"
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

using namespace mgpu_emu;

namespace {

const uint64_t SEG_MAGIC = 0x4d47505545434f4dull;   /* "MGPUECOM" */
const char ID_MAGIC[8] = {'m', 'g', 'p', 'u', 'e', 'm', 'u', 0};

struct rank_ctl {
    int32_t pid;
    int32_t aborted;
    uint64_t arrived;                  /* barriers passed */
    int32_t kind, dtype, op, root;     /* signature of the current collective */
    uint64_t count, seq;
    char pad[64 - 8 - 8 - 16 - 16];
};
struct seg_hdr {
    uint64_t magic;
    int32_t nranks, joined;
    uint64_t slot_bytes;
    char pad[64 - 24];
    rank_ctl ranks[1];
};

double now_s() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
double timeout_s() {
    const char *v = getenv("MGPU_EMU_NCCL_TIMEOUT_S");
    if (!v || !*v) v = getenv("MGPU_TIMEOUT_S");
    double t = v && *v ? atof(v) : 300.0;
    return t > 0 ? t : 300.0;
}
size_t slot_bytes() {
    const char *v = getenv("MGPU_EMU_NCCL_SLOT_KB");
    long kb = v && *v ? atol(v) : 1024;
    if (kb < 4) kb = 4;
    return (size_t)kb << 10;
}
size_t seg_size(int nranks, size_t slot) {
    size_t hdr = (sizeof(seg_hdr) + sizeof(rank_ctl) * (size_t)nranks + 4095) & ~(size_t)4095;
    return hdr + slot * (size_t)nranks;
}

size_t dtype_size(ncclDataType_t t) {
    switch (t) {
    case ncclInt8: case ncclUint8: return 1;
    case ncclFloat16: case ncclBfloat16: return 2;
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
    default: return 0;
    }
}

enum { K_ALLREDUCE, K_BROADCAST, K_REDUCE, K_ALLGATHER, K_REDUCESCATTER };
const char *kind_name(int k) {
    static const char *n[] = {"ncclAllReduce", "ncclBroadcast", "ncclReduce", "ncclAllGather", "ncclReduceScatter"};
    return k >= 0 && k < 5 ? n[k] : "?";
}

} /* namespace */

struct mgpu_emu_nccl_comm {
    seg_hdr *hdr;
    size_t map_bytes;
    int nranks, rank, device;
    uint64_t gen, seq;
    ncclResult_t async_error;
    char last_error[512];
    int joined;   /* saw every rank join */
};

namespace {

rank_ctl *ctl(ncclComm_t c, int r) { return &c->hdr->ranks[r]; }
unsigned char *slot(ncclComm_t c, int r) {
    size_t hdr = (sizeof(seg_hdr) + sizeof(rank_ctl) * (size_t)c->nranks + 4095) & ~(size_t)4095;
    return (unsigned char *)c->hdr + hdr + c->hdr->slot_bytes * (size_t)r;
}

ncclResult_t fail(ncclComm_t c, ncclResult_t r, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
ncclResult_t fail(ncclComm_t c, ncclResult_t r, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (c) {
        vsnprintf(c->last_error, sizeof c->last_error, fmt, ap);
        c->async_error = r;
    }
    va_end(ap);
    return r;
}

/* A peer that is gone: its process died, or it aborted. */
int peer_lost(ncclComm_t c, int *who) {
    for (int q = 0; q < c->nranks; q++) {
        rank_ctl *k = ctl(c, q);
        int pid = __atomic_load_n(&k->pid, __ATOMIC_ACQUIRE);
        if (__atomic_load_n(&k->aborted, __ATOMIC_ACQUIRE) || (pid > 0 && kill(pid, 0) != 0 && errno == ESRCH)) { *who = q; return 1; }
    }
    return 0;
}

void arrive(ncclComm_t c) {
    c->gen++;
    __atomic_store_n(&ctl(c, c->rank)->arrived, c->gen, __ATOMIC_RELEASE);
}
bool all_arrived(ncclComm_t c) {
    for (int q = 0; q < c->nranks; q++)
        if (__atomic_load_n(&ctl(c, q)->arrived, __ATOMIC_ACQUIRE) < c->gen) return false;
    return true;
}

void backoff(int *spins) {
    if (++*spins < 64) sched_yield();
    else { struct timespec ts = {0, 20000}; nanosleep(&ts, NULL); }
}

/* ---- one collective, advanced step by step so a group can interleave several ---- */
struct coll {
    int kind;
    const void *send;
    void *recv;
    size_t count;          /* allreduce/broadcast/reduce: elements; allgather: per rank sent; reducescatter: per rank received */
    ncclDataType_t dt;
    ncclRedOp_t op;
    int root;
    ncclComm_t comm;
    cudaStream_t stream;
    /* progress */
    size_t off, len;
    int phase, done, started;
    ncclResult_t result;
};

template <class T> void reduce_into(T *dst, const unsigned char *const *src, int n, size_t len, ncclRedOp_t op) {
    for (size_t i = 0; i < len; i++) {
        T acc = ((const T *)src[0])[i];
        for (int q = 1; q < n; q++) {
            T v = ((const T *)src[q])[i];
            switch (op) {
            case ncclProd: acc = acc * v; break;
            case ncclMax: acc = v > acc ? v : acc; break;
            case ncclMin: acc = v < acc ? v : acc; break;
            default: acc = acc + v; break;
            }
        }
        if (op == ncclAvg) acc = acc / (T)n;
        dst[i] = acc;
    }
}
void reduce_half(uint16_t *dst, const unsigned char *const *src, int n, size_t len, ncclRedOp_t op, int bf16) {
    for (size_t i = 0; i < len; i++) {
        float acc = 0;
        for (int q = 0; q < n; q++) {
            uint16_t b = ((const uint16_t *)src[q])[i];
            float v = bf16 ? mgpu_emu_bf16_bits_to_f32(b) : mgpu_emu_f16_bits_to_f32(b);
            if (q == 0) { acc = v; continue; }
            switch (op) {
            case ncclProd: acc *= v; break;
            case ncclMax: acc = v > acc ? v : acc; break;
            case ncclMin: acc = v < acc ? v : acc; break;
            default: acc += v; break;
            }
        }
        if (op == ncclAvg) acc /= (float)n;
        dst[i] = bf16 ? mgpu_emu_f32_to_bf16_bits(acc) : mgpu_emu_f32_to_f16_bits(acc);
    }
}
void reduce(void *dst, const unsigned char *const *src, int n, size_t len, ncclDataType_t dt, ncclRedOp_t op) {
    switch (dt) {
    case ncclInt8: reduce_into((int8_t *)dst, src, n, len, op); break;
    case ncclUint8: reduce_into((uint8_t *)dst, src, n, len, op); break;
    case ncclInt32: reduce_into((int32_t *)dst, src, n, len, op); break;
    case ncclUint32: reduce_into((uint32_t *)dst, src, n, len, op); break;
    case ncclInt64: reduce_into((int64_t *)dst, src, n, len, op); break;
    case ncclUint64: reduce_into((uint64_t *)dst, src, n, len, op); break;
    case ncclFloat16: reduce_half((uint16_t *)dst, src, n, len, op, 0); break;
    case ncclBfloat16: reduce_half((uint16_t *)dst, src, n, len, op, 1); break;
    case ncclFloat64: reduce_into((double *)dst, src, n, len, op); break;
    default: reduce_into((float *)dst, src, n, len, op); break;
    }
}

size_t total_units(const coll &k) { return k.count; }   /* elements along which chunks advance */

/* Elements per chunk: a rank's slot holds one chunk (reduce-scatter: one chunk per destination). */
size_t chunk_elems(const coll &k) {
    size_t es = dtype_size(k.dt), cap = k.comm->hdr->slot_bytes / es;
    if (k.kind == K_REDUCESCATTER) cap /= (size_t)k.comm->nranks;
    return cap ? cap : 1;
}

bool signatures_match(coll &k) {
    ncclComm_t c = k.comm;
    rank_ctl *me = ctl(c, c->rank);
    for (int q = 0; q < c->nranks; q++) {
        rank_ctl *o = ctl(c, q);
        if (o->seq != me->seq || o->kind != me->kind || o->count != me->count || o->dtype != me->dtype || o->op != me->op ||
            o->root != me->root) {
            char b[512];
            snprintf(b, sizeof b, "collective #%llu: rank %d issued %s(count %llu, type %d, op %d, root %d) while rank %d issued "
                     "%s(count %llu, type %d, op %d, root %d)", (unsigned long long)me->seq, c->rank, kind_name(me->kind),
                     (unsigned long long)me->count, me->dtype, me->op, me->root, q, kind_name(o->kind), (unsigned long long)o->count,
                     o->dtype, o->op, o->root);
            report("nccl", "%s (real NCCL would hang or corrupt data)", b);
            k.result = fail(c, ncclInvalidUsage, "%s", b);
            return false;
        }
    }
    return true;
}

/* Advances k as far as it can without waiting; returns whether anything happened. */
bool step(coll &k) {
    ncclComm_t c = k.comm;
    size_t es = dtype_size(k.dt);
    int n = c->nranks, me = c->rank;
    if (k.done) return false;
    if (k.phase == 0) {
        k.len = total_units(k) - k.off;
        if (k.len > chunk_elems(k)) k.len = chunk_elems(k);
        unsigned char *mine = slot(c, me);
        const unsigned char *s = (const unsigned char *)k.send;
        switch (k.kind) {
        case K_ALLREDUCE: case K_REDUCE: case K_ALLGATHER: memcpy(mine, s + k.off * es, k.len * es); break;
        case K_BROADCAST: if (me == k.root) memcpy(mine, s + k.off * es, k.len * es); break;
        case K_REDUCESCATTER:
            for (int d = 0; d < n; d++) memcpy(mine + (size_t)d * k.len * es, s + ((size_t)d * k.count + k.off) * es, k.len * es);
            break;
        }
        if (!k.started) {
            k.started = 1;
            c->seq++;
            rank_ctl *m = ctl(c, me);
            m->kind = k.kind; m->dtype = k.dt; m->op = k.op; m->root = k.root; m->count = k.count; m->seq = c->seq;
        }
        arrive(c);
        k.phase = 1;
        return true;
    }
    if (!all_arrived(c)) return false;
    if (k.phase == 1) {
        if (k.off == 0 && !signatures_match(k)) { k.done = 1; return true; }
        const unsigned char *srcs[1024];
        unsigned char *r = (unsigned char *)k.recv;
        switch (k.kind) {
        case K_ALLREDUCE:
            for (int q = 0; q < n; q++) srcs[q] = slot(c, q);
            reduce(r + k.off * es, srcs, n, k.len, k.dt, k.op);
            break;
        case K_REDUCE:
            for (int q = 0; q < n; q++) srcs[q] = slot(c, q);
            if (me == k.root) reduce(r + k.off * es, srcs, n, k.len, k.dt, k.op);
            break;
        case K_BROADCAST: memcpy(r + k.off * es, slot(c, k.root), k.len * es); break;
        case K_ALLGATHER:
            for (int q = 0; q < n; q++) memcpy(r + ((size_t)q * k.count + k.off) * es, slot(c, q), k.len * es);
            break;
        case K_REDUCESCATTER:
            for (int q = 0; q < n; q++) srcs[q] = slot(c, q) + (size_t)me * k.len * es;
            reduce(r + k.off * es, srcs, n, k.len, k.dt, k.op);
            break;
        }
        arrive(c);
        k.phase = 2;
        return true;
    }
    /* phase 2: everyone has read the slots */
    k.off += k.len;
    k.phase = 0;
    if (k.off >= total_units(k)) k.done = 1;
    return true;
}

/* Runs collectives to completion, interleaved; returns the first failure. */
ncclResult_t run_all(std::vector<coll> &ks) {
    device_scope open;   /* the exchange reads and writes device buffers (it runs after enqueue placed it in stream order) */
    double deadline = now_s() + timeout_s();
    int spins = 0;
    for (coll &k : ks) { k.off = 0; k.phase = 0; k.started = 0; k.done = k.count == 0; k.result = ncclSuccess; }
    for (;;) {
        bool progressed = false, pending = false;
        for (size_t i = 0; i < ks.size(); i++) {
            coll &k = ks[i];
            if (k.done) continue;
            pending = true;
            bool earlier = false;   /* collectives of one communicator run in issue order */
            for (size_t j = 0; j < i && !earlier; j++) earlier = !ks[j].done && ks[j].comm == k.comm;
            if (!earlier) progressed |= step(k);
        }
        if (!pending) break;
        bool still = false;
        for (coll &k : ks) still |= !k.done;
        if (!still) break;
        if (progressed) { spins = 0; continue; }
        for (coll &k : ks) {
            int who;
            if (!k.done && peer_lost(k.comm, &who)) {
                for (coll &j : ks) if (!j.done && j.comm == k.comm) { j.done = 1; j.result = ncclRemoteError; }
                fail(k.comm, ncclRemoteError, "%s: rank %d died or aborted the communicator", kind_name(k.kind), who);
            }
        }
        if (now_s() > deadline) {
            for (coll &k : ks)
                if (!k.done) {
                    k.done = 1;
                    k.result = fail(k.comm, ncclSystemError, "%s on rank %d: not every rank arrived within %.0f s (MGPU_EMU_NCCL_TIMEOUT_S)",
                                    kind_name(k.kind), k.comm->rank, timeout_s());
                }
            break;
        }
        backoff(&spins);
    }
    for (coll &k : ks) if (k.result != ncclSuccess) return k.result;
    return ncclSuccess;
}

thread_local int t_group_depth;
thread_local std::vector<coll> *t_group_colls;
thread_local std::vector<ncclComm_t> *t_group_inits;

/* [p, p + bytes) must be device memory of the communicator's device. */
bool buffer_ok(ncclComm_t c, const char *api, const char *which, const void *p, size_t bytes) {
    if (bytes == 0) return true;
    std::lock_guard<std::recursive_mutex> lk(lock());
    allocation *a = find_allocation(p);
    if (!a || a->kind != 0) {
        report("misuse", "%s: %s %p is not device memory%s%s", api, which, p, a ? ": it lies in " : "", a ? describe_allocation(a).c_str() : "");
        return false;
    }
    if (a->device != c->device) {
        report("misuse", "%s: %s lies in %s, but the communicator of rank %d is on cuda:%d", api, which, describe_allocation(a).c_str(), c->rank,
               c->device);
        return false;
    }
    size_t off = (size_t)((const char *)p - a->base);
    if (bytes > a->size - off) {
        report("out-of-bounds", "%s: %s spans %zu bytes from %p, %zu bytes past the end of %s", api, which, bytes, p, bytes - (a->size - off),
               describe_allocation(a).c_str());
        return false;
    }
    return true;
}

ncclResult_t wait_joined(ncclComm_t c) {
    double deadline = now_s() + timeout_s();
    int spins = 0;
    while (__atomic_load_n(&c->hdr->joined, __ATOMIC_ACQUIRE) < c->nranks) {
        int who;
        if (peer_lost(c, &who)) return fail(c, ncclRemoteError, "ncclCommInitRank: rank %d died before every rank joined", who);
        if (now_s() > deadline)
            return fail(c, ncclSystemError, "ncclCommInitRank: only %d of %d ranks joined within %.0f s", c->hdr->joined, c->nranks, timeout_s());
        backoff(&spins);
    }
    c->joined = 1;
    return ncclSuccess;
}

void seg_name(const ncclUniqueId &id, char *out, size_t size) {
    char hex[33];
    for (int i = 0; i < 16; i++) snprintf(hex + 2 * i, 3, "%02x", (unsigned)(unsigned char)id.internal[8 + i]);
    snprintf(out, size, "/mgpu-emu-nccl-%s", hex);
}

/* Maps the segment and registers this rank; waiting for the others is separate (groups). */
ncclResult_t attach(ncclComm_t *out, int nranks, const ncclUniqueId &id, int rank) {
    if (!out) return ncclInvalidArgument;
    *out = NULL;
    if (memcmp(id.internal, ID_MAGIC, sizeof ID_MAGIC) != 0) return ncclInvalidArgument;
    if (nranks < 1 || nranks > 1024 || rank < 0 || rank >= nranks) return ncclInvalidArgument;
    int dev = 0, n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0 || cudaGetDevice(&dev) != cudaSuccess) { cudaGetLastError(); return ncclUnhandledCudaError; }
    char name[64];
    seg_name(id, name, sizeof name);
    size_t slot = slot_bytes(), bytes = seg_size(nranks, slot);
    int fd = shm_open(name, O_CREAT | O_RDWR, 0600);
    if (fd < 0) return ncclSystemError;
    struct stat st;
    if (fstat(fd, &st) != 0 || ((size_t)st.st_size < bytes && ftruncate(fd, (off_t)bytes) != 0)) { close(fd); return ncclSystemError; }
    void *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) return ncclSystemError;
    seg_hdr *h = (seg_hdr *)m;
    uint64_t zero = 0;
    if (__atomic_compare_exchange_n(&h->magic, &zero, SEG_MAGIC, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        h->nranks = nranks;
        __atomic_store_n(&h->slot_bytes, (uint64_t)slot, __ATOMIC_RELEASE);
    } else {
        while (__atomic_load_n(&h->slot_bytes, __ATOMIC_ACQUIRE) == 0) sched_yield();
        if (h->nranks != nranks || h->slot_bytes != slot) {
            munmap(m, bytes);
            return ncclInvalidUsage;   /* ranks disagree on the size of the communicator */
        }
    }
    mgpu_emu_nccl_comm *c = new mgpu_emu_nccl_comm();
    c->hdr = h; c->map_bytes = bytes; c->nranks = nranks; c->rank = rank; c->device = dev;
    c->gen = 0; c->seq = 0; c->async_error = ncclSuccess; c->last_error[0] = 0; c->joined = 0;
    rank_ctl *k = ctl(c, rank);
    if (__atomic_exchange_n(&k->pid, (int32_t)getpid(), __ATOMIC_ACQ_REL) != 0) {
        delete c;
        munmap(m, bytes);
        return ncclInvalidUsage;   /* two ranks claimed the same rank number */
    }
    if (__atomic_add_fetch(&h->joined, 1, __ATOMIC_ACQ_REL) == nranks) shm_unlink(name);   /* all mapped it: the name can go */
    *out = c;
    return ncclSuccess;
}

void detach(ncclComm_t c, int aborting) {
    if (!c) return;
    if (aborting) __atomic_store_n(&ctl(c, c->rank)->aborted, 1, __ATOMIC_RELEASE);
    munmap(c->hdr, c->map_bytes);
    delete c;
}

ncclResult_t issue(coll k, const char *api, size_t send_bytes, size_t recv_bytes) {
    ncclComm_t c = k.comm;
    if (!c) return ncclInvalidArgument;
    if (c->async_error != ncclSuccess) return c->async_error;
    if (!dtype_size(k.dt) || (unsigned)k.op >= (unsigned)ncclNumOps) return ncclInvalidArgument;
    if (k.root < -1 || k.root >= c->nranks) return ncclInvalidArgument;
    int dev = -1;
    cudaGetDevice(&dev);
    if (dev != c->device) {
        report("misuse", "%s on rank %d: cuda:%d is current, but the communicator was created on cuda:%d", api, c->rank, dev, c->device);
        return ncclInvalidUsage;
    }
    if (!buffer_ok(c, api, "sendbuff", k.send, send_bytes) || !buffer_ok(c, api, "recvbuff", k.recv, recv_bytes)) return ncclInvalidArgument;
    std::vector<mem_access> acc;
    if (send_bytes) acc.push_back(mem_access{k.send, send_bytes, 0, 1});
    if (recv_bytes) acc.push_back(mem_access{k.recv, recv_bytes, 1, 1});
    enum cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(k.stream, &cap) != cudaSuccess) { cudaGetLastError(); return ncclUnhandledCudaError; }
    if (cap != cudaStreamCaptureStatusNone) {   /* captured: the exchange happens at each replay */
        cudaError_t e = enqueue(k.stream, api, std::move(acc), [k]() mutable {
            std::vector<coll> one(1, k);
            if (run_all(one) != ncclSuccess) report("nccl", "%s in a graph replay failed: %s", kind_name(k.kind), k.comm->last_error);
        });
        return e == cudaSuccess ? ncclSuccess : ncclUnhandledCudaError;
    }
    /* the op's place in stream order (the checker), then the exchange itself */
    if (enqueue(k.stream, api, std::move(acc), [] {}) != cudaSuccess) return ncclUnhandledCudaError;
    if (t_group_depth > 0) {
        if (!t_group_colls) t_group_colls = new std::vector<coll>();
        t_group_colls->push_back(k);
        return ncclSuccess;
    }
    std::vector<coll> one(1, k);
    return run_all(one);
}

coll make(int kind, const void *send, void *recv, size_t count, ncclDataType_t dt, ncclRedOp_t op, int root, ncclComm_t c, cudaStream_t s) {
    coll k;
    memset(&k, 0, sizeof k);
    k.kind = kind; k.send = send; k.recv = recv; k.count = count; k.dt = dt; k.op = op; k.root = root; k.comm = c; k.stream = s;
    return k;
}

} /* namespace */

extern "C" ncclResult_t ncclGetVersion(int *v) {
    if (!v) return ncclInvalidArgument;
    *v = NCCL_VERSION_CODE;
    return ncclSuccess;
}
extern "C" ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
    static uint64_t counter;
    if (!id) return ncclInvalidArgument;
    memset(id, 0, sizeof *id);
    memcpy(id->internal, ID_MAGIC, sizeof ID_MAGIC);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t words[2] = {((uint64_t)getpid() << 32) ^ (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20),
                         __atomic_add_fetch(&counter, 1, __ATOMIC_SEQ_CST) * 0x9e3779b97f4a7c15ull ^ (uint64_t)(uintptr_t)&counter};
    memcpy(id->internal + 8, words, sizeof words);
    return ncclSuccess;
}
extern "C" ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank) {
    ncclResult_t r = attach(comm, nranks, id, rank);
    if (r != ncclSuccess) return r;
    if (t_group_depth > 0) {   /* several ranks in one thread: wait at ncclGroupEnd */
        if (!t_group_inits) t_group_inits = new std::vector<ncclComm_t>();
        t_group_inits->push_back(*comm);
        return ncclSuccess;
    }
    r = wait_joined(*comm);
    if (r != ncclSuccess) { detach(*comm, 1); *comm = NULL; }
    return r;
}
extern "C" ncclResult_t ncclCommInitRankConfig(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank, ncclConfig_t *config) {
    (void)config;
    return ncclCommInitRank(comm, nranks, id, rank);
}
extern "C" ncclResult_t ncclCommInitAll(ncclComm_t *comms, int ndev, const int *devlist) {
    if (!comms || ndev < 1) return ncclInvalidArgument;
    ncclUniqueId id;
    ncclGetUniqueId(&id);
    int prev = 0;
    cudaGetDevice(&prev);
    for (int i = 0; i < ndev; i++) {
        if (cudaSetDevice(devlist ? devlist[i] : i) != cudaSuccess) { cudaGetLastError(); return ncclInvalidArgument; }
        ncclResult_t r = attach(&comms[i], ndev, id, i);
        if (r != ncclSuccess) return r;
    }
    cudaSetDevice(prev);
    for (int i = 0; i < ndev; i++) {
        ncclResult_t r = wait_joined(comms[i]);
        if (r != ncclSuccess) return r;
    }
    return ncclSuccess;
}
extern "C" ncclResult_t ncclCommFinalize(ncclComm_t comm) { return comm ? ncclSuccess : ncclInvalidArgument; }
extern "C" ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (!comm) return ncclInvalidArgument;
    detach(comm, 0);
    return ncclSuccess;
}
extern "C" ncclResult_t ncclCommAbort(ncclComm_t comm) {
    if (!comm) return ncclInvalidArgument;
    detach(comm, 1);
    return ncclSuccess;
}
extern "C" ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *err) {
    if (!comm || !err) return ncclInvalidArgument;
    *err = comm->async_error;
    return ncclSuccess;
}
static ncclResult_t comm_int(const ncclComm_t comm, int *out, int value) {
    if (!comm || !out) return ncclInvalidArgument;
    *out = value;
    return ncclSuccess;
}
extern "C" ncclResult_t ncclCommCount(const ncclComm_t comm, int *count) { return comm_int(comm, count, comm ? comm->nranks : 0); }
extern "C" ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int *device) { return comm_int(comm, device, comm ? comm->device : 0); }
extern "C" ncclResult_t ncclCommUserRank(const ncclComm_t comm, int *rank) { return comm_int(comm, rank, comm ? comm->rank : 0); }
static const code_text nccl_results[] = {
#define E(code, text) {code, #code, text}
    E(ncclSuccess, "no error"),
    E(ncclUnhandledCudaError, "unhandled cuda error (run with NCCL_DEBUG=INFO for details)"),
    E(ncclSystemError, "unhandled system error (run with NCCL_DEBUG=INFO for details)"),
    E(ncclInternalError, "internal error - please report this issue to the NCCL developers"),
    E(ncclInvalidArgument, "invalid argument (run with NCCL_DEBUG=WARN for details)"),
    E(ncclInvalidUsage, "invalid usage (run with NCCL_DEBUG=WARN for details)"),
    E(ncclRemoteError, "remote process exited or there was a network error"),
    E(ncclInProgress, "NCCL operation in progress"),
#undef E
};
extern "C" const char *ncclGetErrorString(ncclResult_t r) { return code_lookup(nccl_results, r, 0, "unknown result code"); }
extern "C" const char *ncclGetLastError(ncclComm_t comm) { return comm ? comm->last_error : ""; }

extern "C" ncclResult_t ncclAllReduce(const void *send, void *recv, size_t count, ncclDataType_t dt, ncclRedOp_t op, ncclComm_t comm,
                                      cudaStream_t stream) {
    size_t b = count * dtype_size(dt);
    return issue(make(K_ALLREDUCE, send, recv, count, dt, op, -1, comm, stream), "ncclAllReduce", b, b);
}
extern "C" ncclResult_t ncclBroadcast(const void *send, void *recv, size_t count, ncclDataType_t dt, int root, ncclComm_t comm,
                                      cudaStream_t stream) {
    size_t b = count * dtype_size(dt);
    if (!comm || root < 0 || root >= comm->nranks) return ncclInvalidArgument;
    return issue(make(K_BROADCAST, send, recv, count, dt, ncclSum, root, comm, stream), "ncclBroadcast", comm->rank == root ? b : 0, b);
}
extern "C" ncclResult_t ncclReduce(const void *send, void *recv, size_t count, ncclDataType_t dt, ncclRedOp_t op, int root, ncclComm_t comm,
                                   cudaStream_t stream) {
    size_t b = count * dtype_size(dt);
    if (!comm || root < 0 || root >= comm->nranks) return ncclInvalidArgument;
    return issue(make(K_REDUCE, send, recv, count, dt, op, root, comm, stream), "ncclReduce", b, comm->rank == root ? b : 0);
}
extern "C" ncclResult_t ncclAllGather(const void *send, void *recv, size_t sendcount, ncclDataType_t dt, ncclComm_t comm, cudaStream_t stream) {
    size_t b = sendcount * dtype_size(dt);
    if (!comm) return ncclInvalidArgument;
    return issue(make(K_ALLGATHER, send, recv, sendcount, dt, ncclSum, -1, comm, stream), "ncclAllGather", b, b * (size_t)comm->nranks);
}
extern "C" ncclResult_t ncclReduceScatter(const void *send, void *recv, size_t recvcount, ncclDataType_t dt, ncclRedOp_t op, ncclComm_t comm,
                                          cudaStream_t stream) {
    size_t b = recvcount * dtype_size(dt);
    if (!comm) return ncclInvalidArgument;
    return issue(make(K_REDUCESCATTER, send, recv, recvcount, dt, op, -1, comm, stream), "ncclReduceScatter", b * (size_t)comm->nranks, b);
}
extern "C" ncclResult_t ncclGroupStart(void) {
    t_group_depth++;
    return ncclSuccess;
}
extern "C" ncclResult_t ncclGroupEnd(void) {
    if (t_group_depth <= 0) return ncclInvalidUsage;
    if (--t_group_depth > 0) return ncclSuccess;
    ncclResult_t r = ncclSuccess;
    if (t_group_inits) {
        for (ncclComm_t c : *t_group_inits) { ncclResult_t q = wait_joined(c); if (r == ncclSuccess) r = q; }
        t_group_inits->clear();
    }
    if (t_group_colls && !t_group_colls->empty()) {
        ncclResult_t q = run_all(*t_group_colls);
        if (r == ncclSuccess) r = q;
        t_group_colls->clear();
    }
    return r;
}
