/* mgpu CUDA emulation (tests only): the CUDA runtime on host memory, and the stream-order checker.

   Devices are MGPU_EMU_DEVICES (default 1) budgets of MGPU_EMU_MEM_MB (default 8192) each (past
   it cudaMalloc fails with cudaErrorMemoryAllocation; cudaMemGetInfo reports the budget); device
   memory is host memory with guard zones around every allocation (poisoned for AddressSanitizer
   in the sanitizer build), filled with 0xff bytes (NaN) when allocated.

   Host-access guard (MGPU_EMU_HOST_GUARD, default 1; 0 off). On a GPU, host code that
   dereferences a device pointer crashes or reads garbage; here device memory is host memory, so
   the guard makes it inaccessible outside emulated calls. All devices' memory is one anonymous
   mapping (a slice per device, each with its own best-fit heap); every emulated call that touches
   it (the op run by enqueue: kernels with their fibers, copies, memsets, cuBLAS(Lt), NCCL, graph
   replays; also the fill and guard-zone checks) runs inside a device_scope. With x86 protection
   keys (PKU) the mapping carries its own key and a scope opens it for the calling thread only
   (one instruction), so host code on any other thread is caught too. Without them (or with
   MGPU_EMU_HOST_GUARD=2) the handed-out part is mprotect'ed PROT_NONE, opened while any thread is
   inside a scope (a nesting count) and closed when the last leaves; transparent huge pages keep
   that cheap, and host accesses while another thread is inside are missed, never misreported.
   The SIGSEGV handler turns a fault on the mapping outside every scope into one line naming the
   allocation and offset, a backtrace, and exit 86; other faults go to the previous handler (the
   default action, or AddressSanitizer's, which the guard works under). Pinned and registered host
   memory stay host memory. Every launch, copy, memset,
   library call and collective runs synchronously when it is enqueued, so results are ready as
   soon as the call returns; the emulation cannot show real asynchrony. What it does track is the
   order CUDA guarantees:

   Stream-order checker. Every stream (the legacy default stream of each device, created streams,
   per-thread default streams) has a vector clock; the host has one too. An op enqueued on stream
   S gets the next tick of S and a clock that joins S's clock, the host's (everything the host
   knew to be complete when it enqueued), and, by CUDA's legacy-stream rules, the clocks of all
   blocking streams of the device when S is the legacy stream, or the legacy stream's when S is a
   blocking stream (non-blocking streams join neither). cudaEventRecord copies S's clock into the
   event; cudaStreamWaitEvent joins it into the waiting stream; stream, event and device
   synchronisation (and successful queries, host-synchronous copies and cudaFree) join clocks
   into the host's. Each allocation keeps the byte ranges recent ops read or wrote, with stream and
   tick; a new access that overlaps an earlier one on another stream, where one of the two writes
   and the new op's clock does not cover the earlier tick, is an error naming both streams, the
   buffer and both calls. Kernels read and write from each pointer argument to the end of its
   allocation (read only for pointer-to-const parameters); copies, memsets, cuBLAS(Lt) and NCCL
   name exact ranges.

   Trace (MGPU_EMU_TRACE=FILE): one line per enqueued op ("OP sN": a kernel's name, a copy as
   cudaMemcpyAsync(HtoD), ... on stream #N), event record and wait ("record eE sN", "wait sN eE")
   and host synchronisation ("sync sN", "sync eE", "sync device"), in the order the host issued
   them, so a test can check what was queued before the host waited (tests/check_overlap.py). */
#include "emu_internal.h"
#include "cuda_emu.h"
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <execinfo.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <set>
#include <unordered_set>
#if MGPU_EMU_ASAN
#include <sanitizer/asan_interface.h>
#endif

namespace mgpu_emu {

/* ====================================================================================
   Configuration and errors
   ==================================================================================== */

static long env_long(const char *name, long dflt) {
    const char *v = getenv(name);
    if (!v || !*v) return dflt;
    char *end = NULL;
    long x = strtol(v, &end, 10);
    if (!end || *end) { fprintf(stderr, "mgpu-emu: %s='%s' is not an integer; using %ld\n", name, v, dflt); return dflt; }
    return x;
}

const config &cfg() {
    static config c = [] {
        config k;
        k.devices = (int)env_long("MGPU_EMU_DEVICES", 1);
        if (k.devices < 0) k.devices = 0;
        if (k.devices > 64) k.devices = 64;
        long mb = env_long("MGPU_EMU_MEM_MB", 8192);
        k.mem_bytes = (size_t)(mb > 0 ? mb : 1) << 20;
        const char *e = getenv("MGPU_EMU_ERRORS");
        k.fatal = !(e && strcmp(e, "report") == 0);
        const char *s = getenv("MGPU_EMU_SCHEDULE");
        k.schedule = s && strcmp(s, "forward") == 0 ? 1 : s && strcmp(s, "reverse") == 0 ? 2 : 0;
        k.init_error = (int)env_long("MGPU_EMU_INIT_ERROR", 0);
        long kb = env_long("MGPU_EMU_STACK_KB", MGPU_EMU_ASAN ? 256 : 64);
        k.stack_bytes = (size_t)(kb < 16 ? 16 : kb) << 10;
        k.fill = (int)env_long("MGPU_EMU_FILL", 0xff);
        k.host_guard = (int)env_long("MGPU_EMU_HOST_GUARD", 1);   /* 0 off, 1 on, 2 on with mprotect even where protection keys exist */
        return k;
    }();
    return c;
}

static int g_errors;

/* The MGPU_EMU_TRACE file, opened on first use (NULL: no trace). Callers hold the lock. */
static FILE *trace_file() {
    static int opened;
    static FILE *f;
    if (!opened) {
        const char *path = getenv("MGPU_EMU_TRACE");
        opened = 1;
        if (path && *path && !(f = fopen(path, "w"))) fprintf(stderr, "mgpu-emu: cannot write the trace MGPU_EMU_TRACE='%s'\n", path);
    }
    return f;
}
static void trace(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void trace(const char *fmt, ...) {
    FILE *f = trace_file();
    if (!f) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fputc('\n', f);
    fflush(f);
}
static thread_local cudaError_t t_last = cudaSuccess;
static cudaError_t g_sticky = cudaSuccess;

static void at_exit_summary() {
    int n = __atomic_load_n(&g_errors, __ATOMIC_SEQ_CST);
    if (n > 0 && !cfg().fatal) {
        fprintf(stderr, "mgpu-emu: %d error(s) reported in this process\n", n);
        fflush(stdout); fflush(stderr);
        _exit(86);   /* an emulation error never passes silently */
    }
}

void report(const char *what, const char *fmt, ...) {
    static std::mutex m;
    std::lock_guard<std::mutex> g(m);
    static int registered;
    if (!registered) { registered = 1; atexit(at_exit_summary); }
    __atomic_add_fetch(&g_errors, 1, __ATOMIC_SEQ_CST);
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fflush(stdout);
    fprintf(stderr, "mgpu-emu: %s error: %s\n", what, buf);
    if (cfg().fatal) {
        fprintf(stderr, "mgpu-emu: stopping at the first error (MGPU_EMU_ERRORS=report reports all and fails at exit)\n");
        fflush(stderr);
        _exit(86);
    }
    fflush(stderr);
}

cudaError_t set_error(cudaError_t e) {
    if (e != cudaSuccess) t_last = e;
    return e;
}
void set_sticky(cudaError_t e) {
    if (e != cudaSuccess && g_sticky == cudaSuccess) g_sticky = e;
    set_error(e);
}

/* ====================================================================================
   State
   ==================================================================================== */

struct vclock {
    std::vector<std::pair<int, uint64_t>> v;   /* sorted by stream id */
    uint64_t get(int id) const {
        for (const auto &e : v) if (e.first == id) return e.second;
        return 0;
    }
    void set(int id, uint64_t t) {
        for (auto &e : v) if (e.first == id) { if (t > e.second) e.second = t; return; }
        v.emplace_back(id, t);
        std::sort(v.begin(), v.end());
    }
    void join(const vclock &o) { for (const auto &e : o.v) set(e.first, e.second); }
};

struct graph;
struct stream {
    int id, device;
    unsigned flags;
    int legacy, per_thread, destroyed;
    uint64_t tick;
    vclock clock;
    std::string name;
    graph *capture;
    int capture_mode, capture_invalid;
    pthread_t capture_thread;
};
struct event {
    int id, device;
    unsigned flags;
    int recorded, in_capture;
    vclock clock;
};
enum { NODE_WORK, NODE_RECORD, NODE_WAIT };
struct node {
    const char *name;
    int kind;
    std::vector<mem_access> acc;
    std::vector<uint64_t> serials;   /* per access: the allocation it fell in at capture (0: none), checked at replay */
    std::function<void()> run;
    cudaEvent_t ev;
};
struct graph { std::vector<node> nodes; int device; };
struct graph_exec { std::vector<node> nodes; };

struct device_state { size_t used; stream *legacy; };

static std::recursive_mutex g_mu;
std::recursive_mutex &lock() { return g_mu; }

/* Never destroyed: code may still call CUDA from atexit handlers, and LeakSanitizer (which runs
   after static destructors) then sees every live object as reachable. */
static std::vector<device_state> &g_dev = *new std::vector<device_state>();
static std::map<uintptr_t, allocation *> &g_allocs = *new std::map<uintptr_t, allocation *>();   /* by base address */
static std::vector<stream *> &g_streams = *new std::vector<stream *>();   /* by id; never freed, so records can name them */
static std::unordered_set<const void *> &g_handles = *new std::unordered_set<const void *>();   /* live streams, events, graphs */
static std::map<const void *, int> &g_func_smem = *new std::map<const void *, int>();   /* cudaFuncAttributeMaxDynamicSharedMemorySize */
static vclock &g_host = *new vclock();
static uint64_t g_serial;
static int g_inited, g_global_captures;
static thread_local int t_dev;
static thread_local std::map<int, stream *> *t_per_thread;
static thread_local int t_captures;                  /* non-relaxed captures begun by this thread */

static const size_t GUARD = 256;
static const unsigned char GUARD_BYTE = 0xa5;

static stream *new_stream(int device, unsigned flags, int legacy, int per_thread) {
    stream *s = new stream();
    s->id = (int)g_streams.size();
    s->device = device; s->flags = flags; s->legacy = legacy; s->per_thread = per_thread;
    s->destroyed = 0; s->tick = 0; s->capture = NULL; s->capture_mode = 0; s->capture_invalid = 0;
    g_streams.push_back(s);
    if (!legacy) g_handles.insert(s);
    return s;
}

/* ====================================================================================
   Device memory: one reservation, and the host-access guard
   ==================================================================================== */

/* All devices' memory is one anonymous mapping: device d owns slice d. Each slice has a best-fit
   heap of 256-byte-granular blocks (an allocation's guard zones included). With the guard on the
   whole mapping is PROT_NONE while no thread is inside an emulated call, so host code that
   dereferences a device pointer faults, and on_fault names the allocation. */
static char *g_region;                 /* NULL: no reservation (it failed); device memory comes from aligned_alloc */
static size_t g_slice, g_region_bytes;
static int g_guard;                    /* 0 off, GUARD_PKEY or GUARD_MPROTECT */
enum { GUARD_PKEY = 1, GUARD_MPROTECT = 2 };
static int g_pkey = -1;
struct heap {
    std::map<uintptr_t, size_t> by_addr;          /* free blocks */
    std::multimap<size_t, uintptr_t> by_size;
    size_t high = 0;                              /* bytes of the slice ever handed out (page multiple): what mprotect toggles */
};
static std::vector<heap> &g_heaps = *new std::vector<heap>();
static std::mutex g_open_mu;
static std::atomic<int> g_open{0};     /* mprotect mode: device_scopes alive, over all threads */
static thread_local int t_open;        /* protection-key mode: this thread's device_scopes */

/* mprotect mode: opens or closes what the slices have handed out. g_open_mu held. */
static void protect_all(int prot) {
    for (size_t d = 0; d < g_heaps.size(); d++)
        if (g_heaps[d].high && mprotect(g_region + d * g_slice, g_heaps[d].high, prot) != 0) {
            perror("mgpu-emu: mprotect (device memory)");
            _exit(86);
        }
}
/* Protection keys (x86 PKU): the rights are per thread and switching them is one instruction, so
   only the calling thread is opened and another thread's host code is still caught. mprotect is
   process-wide and a system call: the mapping opens when the first thread enters and closes when
   the last one leaves. */
void device_access_begin() {
    if (g_guard == GUARD_PKEY) {
        if (t_open++ == 0) pkey_set(g_pkey, 0);
    } else if (g_guard == GUARD_MPROTECT) {
        std::lock_guard<std::mutex> g(g_open_mu);
        int n = g_open.load(std::memory_order_relaxed);
        if (n == 0) protect_all(PROT_READ | PROT_WRITE);
        g_open.store(n + 1, std::memory_order_release);   /* after the mapping is open: the handler may trust a nonzero count */
    }
}
void device_access_end() {
    if (g_guard == GUARD_PKEY) {
        if (--t_open == 0) pkey_set(g_pkey, PKEY_DISABLE_ACCESS);
    } else if (g_guard == GUARD_MPROTECT) {
        std::lock_guard<std::mutex> g(g_open_mu);
        int n = g_open.load(std::memory_order_relaxed) - 1;
        g_open.store(n, std::memory_order_release);
        if (n == 0) protect_all(PROT_NONE);
    }
}

static void heap_insert(heap &h, uintptr_t p, size_t n) {
    h.by_addr[p] = n;
    h.by_size.emplace(n, p);
}
static void heap_erase(heap &h, std::map<uintptr_t, size_t>::iterator it) {
    auto r = h.by_size.equal_range(it->second);
    for (auto j = r.first; j != r.second; ++j) if (j->second == it->first) { h.by_size.erase(j); break; }
    h.by_addr.erase(it);
}
static char *heap_alloc(int device, size_t n) {
    heap &h = g_heaps[(size_t)device];
    auto b = h.by_size.lower_bound(n);
    if (b == h.by_size.end()) return NULL;
    uintptr_t p = b->second;
    size_t have = b->first;
    heap_erase(h, h.by_addr.find(p));
    if (have > n) heap_insert(h, p + n, have - n);
    char *start = g_region + (size_t)device * g_slice;
    size_t end = (size_t)((char *)p + n - start);
    if (end > h.high) {   /* the toggled part grows; opened now if some thread is inside (before anyone sees the pointer) */
        size_t step = (size_t)2 << 20, high = (end + step - 1) / step * step;
        std::lock_guard<std::mutex> g(g_open_mu);
        if (g_guard == GUARD_MPROTECT && g_open.load(std::memory_order_relaxed) > 0)
            mprotect(start + h.high, high - h.high, PROT_READ | PROT_WRITE);
        h.high = high;
    }
    return (char *)p;
}
static void heap_free(int device, char *raw, size_t n) {
    heap &h = g_heaps[(size_t)device];
    uintptr_t p = (uintptr_t)raw;
    size_t page = 4096;
    uintptr_t lo = (p + page - 1) / page * page, hi = (p + n) / page * page;
    if (hi > lo && hi - lo >= (1 << 20)) madvise((void *)lo, hi - lo, MADV_DONTNEED);   /* big frees give their pages back */
    auto next = h.by_addr.lower_bound(p);
    if (next != h.by_addr.end() && next->first == p + n) { n += next->second; heap_erase(h, next); }
    auto prev = h.by_addr.lower_bound(p);
    if (prev != h.by_addr.begin()) {
        --prev;
        if (prev->first + prev->second == p) { p = prev->first; n += prev->second; heap_erase(h, prev); }
    }
    heap_insert(h, p, n);
}

static struct sigaction g_old_segv, g_old_bus;

static void say(const char *s) { ssize_t w = write(2, s, strlen(s)); (void)w; }

/* Host code touched the device mapping while no emulated call was running: name the allocation, exit 86. */
static void host_access_fault(uintptr_t addr, int write_access) {
    /* The faulting thread may hold the runtime lock (then the recursive lock is ours again); another
       thread may hold it briefly: wait a little, then read the table anyway (we are about to exit). */
    int locked = 0;
    for (int i = 0; i < 200 && !(locked = g_mu.try_lock()); i++) usleep(1000);
    char where[400];
    int device = (int)((addr - (uintptr_t)g_region) / g_slice);
    allocation *a = find_allocation((const void *)addr);
    if (a && a->kind == 0) {
        snprintf(where, sizeof where, "offset %zu of device allocation %p of %zu bytes, cuda:%d", (size_t)(addr - (uintptr_t)a->base),
                 (void *)a->base, a->size, a->device);
    } else {
        allocation *near = NULL;
        auto it = g_allocs.upper_bound(addr);
        if (it != g_allocs.end() && it->second->raw && addr >= (uintptr_t)it->second->raw) near = it->second;
        else if (it != g_allocs.begin()) {
            --it;
            allocation *b = it->second;
            if (b->raw && addr < (uintptr_t)b->raw + b->raw_size) near = b;
        }
        if (near && addr < (uintptr_t)near->base)
            snprintf(where, sizeof where, "%zu bytes before the start of device allocation %p of %zu bytes, cuda:%d",
                     (size_t)((uintptr_t)near->base - addr), (void *)near->base, near->size, near->device);
        else if (near)
            snprintf(where, sizeof where, "%zu bytes past the end of device allocation %p of %zu bytes, cuda:%d",
                     (size_t)(addr - (uintptr_t)near->base - near->size), (void *)near->base, near->size, near->device);
        else snprintf(where, sizeof where, "in no live allocation of cuda:%d: freed or never allocated device memory", device);
    }
    char msg[700];
    snprintf(msg, sizeof msg, "mgpu-emu: host code %s device memory at %p (%s): device pointers may only be touched by kernels, "
             "cudaMemcpy* and library calls (MGPU_EMU_HOST_GUARD=0 turns this check off)\n",
             write_access < 0 ? "accessed" : write_access ? "wrote" : "read", (void *)addr, where);
    fflush(stdout);
    say(msg);
    void *frames[64];
    int n = backtrace(frames, 64);
    say("mgpu-emu: backtrace of the access:\n");
    backtrace_symbols_fd(frames, n, 2);
    (void)locked;
    _exit(86);
}

static void on_fault(int sig, siginfo_t *si, void *uc) {
    uintptr_t addr = (uintptr_t)si->si_addr;
    int mine = sig == SIGSEGV && g_guard && si->si_code > 0 && addr >= (uintptr_t)g_region && addr < (uintptr_t)g_region + g_region_bytes;
    if (mine && g_guard == GUARD_MPROTECT) {
        size_t d = (addr - (uintptr_t)g_region) / g_slice, off = addr - (uintptr_t)g_region - d * g_slice;
        if (off >= g_heaps[d].high) mine = 0;   /* never handed out: a wild pointer, crash as usual */
        else if (g_open.load(std::memory_order_acquire) > 0) return;   /* another thread opened it meanwhile: the access goes through */
    }
    if (mine && g_guard == GUARD_PKEY && (si->si_code != SEGV_PKUERR || t_open > 0)) mine = 0;
    if (mine) {
        int w = -1;
#if defined(__x86_64__)
        w = (((ucontext_t *)uc)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#else
        (void)uc;
#endif
        host_access_fault(addr, w);
    }
    kernel_fault_note(sig);
    /* not ours: the previous handler (the default action, or AddressSanitizer's) takes the fault again */
    sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, NULL);
    if (si->si_code <= 0) raise(sig);   /* sent by kill/raise, not a fault that repeats */
}

/* Reserves the device mapping and installs the fault handler (once, at the first CUDA call). */
static void setup_device_memory(int devices) {
    if (devices <= 0) return;
    size_t step = (size_t)2 << 20;
    g_slice = (3 * cfg().mem_bytes + ((size_t)64 << 20) + step - 1) / step * step;   /* guard zones of small allocations: up to 3x */
    g_region_bytes = g_slice * (size_t)devices;
    int guard = cfg().host_guard;
    if (guard == 1) {   /* protection keys where the CPU and kernel have them, else mprotect */
        g_pkey = pkey_alloc(0, PKEY_DISABLE_ACCESS);
        guard = g_pkey >= 0 ? GUARD_PKEY : GUARD_MPROTECT;
    } else if (guard != 0) guard = GUARD_MPROTECT;
    void *m = mmap(NULL, g_region_bytes, guard == GUARD_MPROTECT ? PROT_NONE : PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m != MAP_FAILED && guard == GUARD_PKEY && pkey_mprotect(m, g_region_bytes, PROT_READ | PROT_WRITE, g_pkey) != 0) {
        pkey_free(g_pkey);
        g_pkey = -1;
        guard = GUARD_MPROTECT;
        mprotect(m, g_region_bytes, PROT_NONE);
    }
    if (m == MAP_FAILED) {
        fprintf(stderr, "mgpu-emu: cannot reserve %zu bytes of address space for %d device(s) of MGPU_EMU_MEM_MB=%zu; device memory "
                "comes from the heap and the host-access guard is off\n", g_region_bytes, devices, cfg().mem_bytes >> 20);
        g_region_bytes = 0;
    } else {
        g_region = (char *)m;
        if (guard == GUARD_MPROTECT) madvise(m, g_region_bytes, MADV_HUGEPAGE);   /* fewer page-table entries for mprotect to rewrite */
        g_heaps.resize((size_t)devices);
        for (int d = 0; d < devices; d++) heap_insert(g_heaps[(size_t)d], (uintptr_t)(g_region + (size_t)d * g_slice), g_slice);
        g_guard = guard;
    }
    void *frames[2];
    backtrace(frames, 2);   /* loads the unwinder now, not inside the signal handler */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
#if MGPU_EMU_ASAN
    if (!g_guard) return;   /* AddressSanitizer reports other crashes itself */
    sigaction(SIGSEGV, &sa, &g_old_segv);
#else
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
#endif
}

/* Lazily sets up the devices; returns cudaSuccess or why there are none. Lock held. */
static cudaError_t init() {
    if (!g_inited) {
        g_inited = 1;
        g_streams.push_back(NULL);   /* id 0: the host */
        if (cfg().init_error == 0)
            for (int d = 0; d < cfg().devices; d++) {
                device_state ds;
                ds.used = 0;
                ds.legacy = new_stream(d, 0, 1, 0);
                g_dev.push_back(ds);
            }
        setup_device_memory((int)g_dev.size());
    }
    if (cfg().init_error) return (cudaError_t)cfg().init_error;
    if (g_dev.empty()) return cudaErrorNoDevice;
    return cudaSuccess;
}

#define EMU_INIT() do { cudaError_t ie_ = init(); if (ie_ != cudaSuccess) return set_error(ie_); } while (0)
/* stream *VAR from handle H, or return the error */
#define EMU_STREAM(var, h) stream *var; do { cudaError_t se_; var = resolve_stream((h), &se_); if (!var) return set_error(se_); } while (0)

int current_device() { return t_dev; }

static std::string stream_desc(const stream *s) {
    char b[256];
    if (!s) return "the host";
    if (s->legacy) snprintf(b, sizeof b, "the legacy default stream of cuda:%d", s->device);
    else if (s->per_thread) snprintf(b, sizeof b, "the per-thread default stream #%d of cuda:%d", s->id, s->device);
    else snprintf(b, sizeof b, "stream #%d (%s%s%s, cuda:%d)", s->id, s->flags & cudaStreamNonBlocking ? "non-blocking" : "blocking",
                  s->name.empty() ? "" : ", ", s->name.c_str(), s->device);
    return b;
}

stream *resolve_stream(cudaStream_t h, cudaError_t *err) {
    *err = cudaSuccess;
    if (h == NULL || h == cudaStreamLegacy) return g_dev[(size_t)t_dev].legacy;
    if (h == cudaStreamPerThread) {
        if (!t_per_thread) t_per_thread = new std::map<int, stream *>();
        stream *&s = (*t_per_thread)[t_dev];
        if (!s) s = new_stream(t_dev, 0, 0, 1);
        return s;
    }
    if (!g_handles.count((const void *)h)) { *err = cudaErrorInvalidResourceHandle; return NULL; }
    return (stream *)h;
}
int stream_device(stream *s) { return s->device; }

/* ====================================================================================
   Allocations
   ==================================================================================== */

allocation *find_allocation(const void *p) {
    if (!p || g_allocs.empty()) return NULL;
    auto it = g_allocs.upper_bound((uintptr_t)p);
    if (it == g_allocs.begin()) return NULL;
    --it;
    allocation *a = it->second;
    uintptr_t u = (uintptr_t)p, b = (uintptr_t)a->base;
    return u >= b && u < b + (a->size ? a->size : 1) ? a : NULL;
}

std::string describe_allocation(const allocation *a) {
    char b[200];
    if (a->kind == 0) snprintf(b, sizeof b, "device allocation %p (%zu bytes, cuda:%d)", (void *)a->base, a->size, a->device);
    else snprintf(b, sizeof b, "%s host allocation %p (%zu bytes)", a->kind == 1 ? "pinned" : "registered", (void *)a->base, a->size);
    return b;
}

static size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

static allocation *new_allocation(size_t size, int kind, int device) {
    size_t body = round_up(size ? size : 1, GUARD), raw_size = GUARD + body + GUARD;
    char *raw = kind == 0 && g_region ? heap_alloc(device, raw_size) : (char *)aligned_alloc(GUARD, raw_size);
    if (!raw) return NULL;
    if (kind == 0) device_access_begin();   /* fills and guard bytes */
    allocation *a = new allocation();
    a->raw = raw; a->raw_size = raw_size; a->base = raw + GUARD; a->size = size;
    a->kind = kind; a->device = device; a->serial = ++g_serial;
    memset(raw, GUARD_BYTE, GUARD);
    memset(a->base + size, GUARD_BYTE, raw_size - GUARD - size);
    if (cfg().fill >= 0) memset(a->base, cfg().fill, size);
    else if (kind != 0) memset(a->base, 0, size);
#if MGPU_EMU_ASAN
    __asan_poison_memory_region(raw, GUARD);
    __asan_poison_memory_region(a->base + size, raw_size - GUARD - size);
#endif
    if (kind == 0) device_access_end();
    g_allocs[(uintptr_t)a->base] = a;
    return a;
}

/* Index of the first byte that is not the guard pattern, or n. Reads poisoned memory on purpose. */
MGPU_EMU_NO_ASAN static size_t guard_diff(const unsigned char *p, size_t n, size_t *last) {
    size_t first = n;
    for (size_t i = 0; i < n; i++)
        if (p[i] != GUARD_BYTE) { if (first == n) first = i; *last = i; }
    return first;
}
MGPU_EMU_NO_ASAN static void guard_restore(unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = GUARD_BYTE;
}

static void check_one_guard(allocation *a, const char *op, const char *detail) {
    if (!a->raw) return;
    device_scope open;
    size_t last = 0, back = a->raw_size - GUARD - a->size;
    size_t f = guard_diff((const unsigned char *)a->base + a->size, back, &last);
    if (f < back) {
        report("out-of-bounds", "%s%s wrote past the end of %s: bytes %zu..%zu after its end were overwritten", op, detail,
               describe_allocation(a).c_str(), f, last);
        guard_restore((unsigned char *)a->base + a->size, back);
    }
    f = guard_diff((const unsigned char *)a->raw, GUARD, &last);
    if (f < GUARD) {
        report("out-of-bounds", "%s%s wrote before the start of %s: bytes %zu..%zu before its start were overwritten", op, detail,
               describe_allocation(a).c_str(), GUARD - last, GUARD - f);
        guard_restore((unsigned char *)a->raw, GUARD);
    }
}

void check_guards(const char *op, const char *detail) {
    device_scope open;
    for (auto &kv : g_allocs) check_one_guard(kv.second, op, detail);
}

static void free_allocation(allocation *a) {
    g_allocs.erase((uintptr_t)a->base);
    if (a->raw) {
#if MGPU_EMU_ASAN
        __asan_unpoison_memory_region(a->raw, a->raw_size);
#endif
        if (a->kind == 0 && g_region) heap_free(a->device, a->raw, a->raw_size);
        else free(a->raw);
    }
    delete a;
}

/* ====================================================================================
   Clocks and the checker
   ==================================================================================== */

/* The clock of a new op on s (CUDA's legacy-stream rules), after ticking s. */
static const vclock &tick(stream *s) {
    s->clock.join(g_host);
    if (s->legacy) {
        for (stream *t : g_streams)
            if (t && t != s && t->device == s->device && !t->legacy && !(t->flags & cudaStreamNonBlocking)) s->clock.join(t->clock);
    } else if (!(s->flags & cudaStreamNonBlocking)) {
        s->clock.join(g_dev[(size_t)s->device].legacy->clock);
    }
    s->tick++;
    s->clock.set(s->id, s->tick);
    return s->clock;
}

static void host_knows(const vclock &c) { g_host.join(c); }
static void host_syncs_device(int device) {
    for (stream *t : g_streams) if (t && t->device == device) host_knows(t->clock);
}

static void check_access(stream *s, const vclock &now, const char *op, const mem_access &x) {
    allocation *a = find_allocation(x.p);
    if (!a) return;
    size_t lo = (size_t)((const char *)x.p - a->base), hi = x.exact ? lo + x.bytes : a->size;
    if (hi > a->size) hi = a->size;
    for (const access_rec &r : a->recs) {
        if (r.hi <= lo || r.lo >= hi || !(r.write || x.write) || r.stream == s->id || now.get(r.stream) >= r.tick) continue;
        size_t olo = r.lo > lo ? r.lo : lo, ohi = r.hi < hi ? r.hi : hi;
        std::string later = stream_desc(s), earlier = stream_desc(g_streams[(size_t)r.stream]);
        report("stream-order",
               "%s on %s %s bytes [%zu, %zu) of %s, but %s on %s %s them before and nothing orders the two calls (make %s wait "
               "for an event recorded on %s after %s: cudaEventRecord + cudaStreamWaitEvent; or synchronise)",
               op, later.c_str(), x.write ? "writes" : "reads", olo, ohi, describe_allocation(a).c_str(), r.op, earlier.c_str(),
               r.write ? "wrote" : "read", later.c_str(), earlier.c_str(), r.op);
        break;
    }
    if (x.write) {   /* a write supersedes what it covers */
        size_t k = 0;
        for (size_t i = 0; i < a->recs.size(); i++) {
            const access_rec &r = a->recs[i];
            if (!(r.lo >= lo && r.hi <= hi)) a->recs[k++] = r;
        }
        a->recs.resize(k);
    } else {
        for (access_rec &r : a->recs)
            if (!r.write && r.stream == s->id && r.lo == lo && r.hi == hi) { r.tick = s->tick; r.op = op; return; }
    }
    if (a->recs.size() >= 256) a->recs.erase(a->recs.begin());   /* bounded memory: the oldest record goes */
    a->recs.push_back(access_rec{lo, hi, x.write, s->id, s->tick, op});
}

static void note_node(graph *g, const char *op, int kind, std::vector<mem_access> acc, std::function<void()> run, cudaEvent_t ev) {
    node n;
    n.name = op; n.kind = kind; n.acc = std::move(acc); n.run = std::move(run); n.ev = ev;
    for (const mem_access &x : n.acc) { allocation *a = find_allocation(x.p); n.serials.push_back(a ? a->serial : 0); }
    g->nodes.push_back(std::move(n));
}

cudaError_t enqueue(cudaStream_t h, const char *op, std::vector<mem_access> acc, std::function<void()> run) {
    {
        std::lock_guard<std::recursive_mutex> g(g_mu);
        EMU_INIT();
        EMU_STREAM(s, h);
        if (g_sticky) return set_error(g_sticky);
        if (s->capture) { note_node(s->capture, op, NODE_WORK, std::move(acc), std::move(run), NULL); return cudaSuccess; }
        if (s->legacy)   /* the legacy stream synchronises with blocking streams: not while one of them is captured */
            for (stream *t : g_streams)
                if (t && t->capture && t->device == s->device && !(t->flags & cudaStreamNonBlocking)) {
                    t->capture_invalid = 1;
                    return set_error(cudaErrorStreamCaptureImplicit);
                }
        const vclock &now = tick(s);
        for (const mem_access &x : acc) check_access(s, now, op, x);
        trace("%s s%d", op, s->id);
    }
    device_scope open;   /* the op may touch device memory; host code between ops may not */
    run();
    return cudaSuccess;
}

/* Calls a capture forbids (they would synchronise): fail and invalidate the captures concerned. */
static int capture_forbids(const char *api) {
    (void)api;
    if (t_captures == 0 && g_global_captures == 0) return 0;
    for (stream *t : g_streams)
        if (t && t->capture && t->capture_mode != cudaStreamCaptureModeRelaxed &&
            (t->capture_mode == cudaStreamCaptureModeGlobal || pthread_equal(t->capture_thread, pthread_self())))
            t->capture_invalid = 1;
    return 1;
}
#define EMU_NOT_IN_CAPTURE(api) do { if (capture_forbids(api)) return set_error(cudaErrorStreamCaptureUnsupported); } while (0)

/* ====================================================================================
   Kernels
   ==================================================================================== */

void submit_kernel(const launch_cfg &c, kernel_call *call, const arg_ptr *ptrs, int n_ptrs) {
    std::shared_ptr<kernel_call> keep(call);
    std::vector<mem_access> acc;
    cudaStream_t stream_h = c.stream;
    {
        std::lock_guard<std::recursive_mutex> g(g_mu);
        cudaError_t e = init();
        if (e != cudaSuccess) { set_error(e); return; }
        unsigned long long threads = (unsigned long long)c.block.x * c.block.y * c.block.z;
        size_t smem_limit = 48 << 10;
        auto fs = g_func_smem.find(c.func);
        if (fs != g_func_smem.end()) smem_limit = (size_t)fs->second;
        char why[256] = "";
        if (!c.grid.x || !c.grid.y || !c.grid.z || !c.block.x || !c.block.y || !c.block.z)
            snprintf(why, sizeof why, "grid (%u,%u,%u) or block (%u,%u,%u) has a zero dimension", c.grid.x, c.grid.y, c.grid.z, c.block.x,
                     c.block.y, c.block.z);
        else if (threads > 1024 || c.block.x > 1024 || c.block.y > 1024 || c.block.z > 64)
            snprintf(why, sizeof why, "block (%u,%u,%u) has %llu threads; CUDA allows at most 1024 per block (x, y <= 1024, z <= 64)",
                     c.block.x, c.block.y, c.block.z, threads);
        else if (c.grid.x > 2147483647u || c.grid.y > 65535 || c.grid.z > 65535)
            snprintf(why, sizeof why, "grid (%u,%u,%u) exceeds CUDA's limits (x < 2^31, y and z <= 65535)", c.grid.x, c.grid.y, c.grid.z);
        else if (c.smem > smem_limit)
            snprintf(why, sizeof why, "%zu bytes of dynamic shared memory; the limit is %zu (48 KiB unless cudaFuncSetAttribute "
                     "raised cudaFuncAttributeMaxDynamicSharedMemorySize)", c.smem, smem_limit);
        if (why[0]) {
            report("launch", "kernel %s: %s", c.name, why);
            set_error(cudaErrorInvalidConfiguration);
            return;
        }
        stream *s = resolve_stream(stream_h, &e);
        if (!s) { set_error(e); return; }
        if (s->device != t_dev) {
            report("launch", "kernel %s launched on %s while cuda:%d is the current device", c.name, stream_desc(s).c_str(), t_dev);
            set_error(cudaErrorInvalidResourceHandle);
            return;
        }
        for (int i = 0; i < n_ptrs; i++) {
            allocation *a = find_allocation(ptrs[i].p);
            if (!a) {
                if (ptrs[i].direct)
                    report("launch", "kernel %s: argument %d (%p) points neither into device memory nor into pinned host memory", c.name,
                           ptrs[i].index + 1, ptrs[i].p);
                continue;
            }
            if (a->kind == 0 && a->device != s->device)
                report("launch", "kernel %s on cuda:%d: argument %d points into %s (peer access is not enabled)", c.name, s->device,
                       ptrs[i].index + 1, describe_allocation(a).c_str());
            acc.push_back(mem_access{ptrs[i].p, 0, ptrs[i].writes, 0});
        }
    }
    launch_cfg lc = c;
    cudaError_t e = enqueue(stream_h, c.name, std::move(acc), [keep, lc] {
        cudaError_t r = run_grid(keep.get(), lc.name, lc.grid, lc.block, lc.smem);
        if (r != cudaSuccess) set_sticky(r);
        std::lock_guard<std::recursive_mutex> g(g_mu);
        check_guards("kernel ", lc.name);
    });
    if (e != cudaSuccess) set_error(e);
}

} /* namespace mgpu_emu */

using namespace mgpu_emu;

/* ====================================================================================
   Devices and errors
   ==================================================================================== */

#define LOCKED std::lock_guard<std::recursive_mutex> lock_guard_(g_mu)

extern "C" cudaError_t cudaGetDeviceCount(int *count) {
    LOCKED;
    if (!count) return set_error(cudaErrorInvalidValue);
    *count = 0;
    EMU_INIT();
    *count = (int)g_dev.size();
    return cudaSuccess;
}
extern "C" cudaError_t cudaSetDevice(int device) {
    LOCKED;
    EMU_INIT();
    if (device < 0 || device >= (int)g_dev.size()) return set_error(cudaErrorInvalidDevice);
    t_dev = device;
    return cudaSuccess;
}
extern "C" cudaError_t cudaGetDevice(int *device) {
    LOCKED;
    EMU_INIT();
    if (!device) return set_error(cudaErrorInvalidValue);
    *device = t_dev;
    return cudaSuccess;
}
extern "C" cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int device) {
    LOCKED;
    EMU_INIT();
    if (!p) return set_error(cudaErrorInvalidValue);
    if (device < 0 || device >= (int)g_dev.size()) return set_error(cudaErrorInvalidDevice);
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "mgpu CPU emulation of a CUDA device (%d)", device);
    p->totalGlobalMem = cfg().mem_bytes;
    p->sharedMemPerBlock = 48 << 10;
    p->sharedMemPerBlockOptin = 227 << 10;
    p->regsPerBlock = 65536;
    p->warpSize = 32;
    p->maxThreadsPerBlock = 1024;
    p->maxThreadsDim[0] = 1024; p->maxThreadsDim[1] = 1024; p->maxThreadsDim[2] = 64;
    p->maxGridSize[0] = 2147483647; p->maxGridSize[1] = 65535; p->maxGridSize[2] = 65535;
    p->totalConstMem = 65536;
    p->major = 9; p->minor = 0;
    p->multiProcessorCount = 4;
    p->maxThreadsPerMultiProcessor = 2048;
    p->l2CacheSize = 4 << 20;
    p->pciBusID = device;
    p->concurrentKernels = 1;
    p->asyncEngineCount = 2;
    p->unifiedAddressing = 1;
    return cudaSuccess;
}
extern "C" cudaError_t cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int device) {
    struct cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, device);
    if (e != cudaSuccess) return e;
    if (!value) return set_error(cudaErrorInvalidValue);
    switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxBlockDimX: case cudaDevAttrMaxBlockDimY: *value = 1024; break;
    case cudaDevAttrMaxBlockDimZ: *value = 64; break;
    case cudaDevAttrMaxGridDimX: *value = 2147483647; break;
    case cudaDevAttrMaxGridDimY: case cudaDevAttrMaxGridDimZ: *value = 65535; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 << 10; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 << 10; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = p.multiProcessorCount; break;
    case cudaDevAttrComputeCapabilityMajor: *value = p.major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = p.minor; break;
    default: return set_error(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}
extern "C" cudaError_t cudaDeviceSynchronize(void) {
    LOCKED;
    EMU_INIT();
    EMU_NOT_IN_CAPTURE("cudaDeviceSynchronize");
    host_syncs_device(t_dev);
    trace("sync device");
    return g_sticky ? set_error(g_sticky) : cudaSuccess;
}
extern "C" cudaError_t cudaDeviceReset(void) {
    LOCKED;
    EMU_INIT();
    std::vector<allocation *> mine;
    for (auto &kv : g_allocs) if (kv.second->kind == 0 && kv.second->device == t_dev) mine.push_back(kv.second);
    for (allocation *a : mine) free_allocation(a);
    g_dev[(size_t)t_dev].used = 0;
    g_sticky = cudaSuccess;
    return cudaSuccess;
}
extern "C" cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes) {
    LOCKED;
    EMU_INIT();
    if (free_bytes) *free_bytes = cfg().mem_bytes - g_dev[(size_t)t_dev].used;
    if (total_bytes) *total_bytes = cfg().mem_bytes;
    return cudaSuccess;
}
extern "C" cudaError_t cudaDriverGetVersion(int *v) { if (v) *v = CUDART_VERSION; return cudaSuccess; }
extern "C" cudaError_t cudaRuntimeGetVersion(int *v) { if (v) *v = CUDART_VERSION; return cudaSuccess; }
extern "C" cudaError_t cudaGetLastError(void) {
    cudaError_t e = g_sticky ? g_sticky : t_last;
    t_last = cudaSuccess;
    return e;
}
extern "C" cudaError_t cudaPeekAtLastError(void) { return g_sticky ? g_sticky : t_last; }

static const code_text cuda_errors[] = {
#define E(code, text) {code, #code, text}
    E(cudaSuccess, "no error"),
    E(cudaErrorInvalidValue, "invalid argument"),
    E(cudaErrorMemoryAllocation, "out of memory"),
    E(cudaErrorInitializationError, "initialization error"),
    E(cudaErrorInvalidConfiguration, "invalid configuration argument"),
    E(cudaErrorInvalidDevicePointer, "invalid device pointer"),
    E(cudaErrorInvalidMemcpyDirection, "invalid copy direction for memcpy"),
    E(cudaErrorStubLibrary, "CUDA driver is a stub library"),
    E(cudaErrorInsufficientDriver, "CUDA driver version is insufficient for CUDA runtime version"),
    E(cudaErrorInvalidDeviceFunction, "invalid device function"),
    E(cudaErrorNoDevice, "no CUDA-capable device is detected"),
    E(cudaErrorInvalidDevice, "invalid device ordinal"),
    E(cudaErrorInvalidResourceHandle, "invalid resource handle"),
    E(cudaErrorIllegalState, "the operation cannot be performed in the present state"),
    E(cudaErrorNotReady, "device not ready"),
    E(cudaErrorIllegalAddress, "an illegal memory access was encountered"),
    E(cudaErrorLaunchOutOfResources, "too many resources requested for launch"),
    E(cudaErrorMisalignedAddress, "misaligned address"),
    E(cudaErrorLaunchFailure, "unspecified launch failure"),
    E(cudaErrorNotSupported, "operation not supported"),
    E(cudaErrorStreamCaptureUnsupported, "operation not permitted when stream is capturing"),
    E(cudaErrorStreamCaptureInvalidated, "operation failed due to a previous error during capture"),
    E(cudaErrorStreamCaptureUnmatched, "capture was not ended in the same stream as it began"),
    E(cudaErrorStreamCaptureImplicit, "operation would make the legacy stream depend on a capturing blocking stream"),
    E(cudaErrorStreamCaptureWrongThread, "attempt to terminate a thread-local capture sequence from another thread"),
    E(cudaErrorUnknown, "unknown error"),
#undef E
};
extern "C" const char *cudaGetErrorName(cudaError_t e) { return code_lookup(cuda_errors, e, 1, "cudaErrorUnknown"); }
extern "C" const char *cudaGetErrorString(cudaError_t e) { return code_lookup(cuda_errors, e, 0, "unknown error"); }

/* ====================================================================================
   Memory
   ==================================================================================== */

extern "C" cudaError_t cudaMalloc(void **ptr, size_t size) {
    LOCKED;
    if (!ptr) return set_error(cudaErrorInvalidValue);
    *ptr = NULL;
    EMU_INIT();
    EMU_NOT_IN_CAPTURE("cudaMalloc");
    if (size == 0) return cudaSuccess;
    device_state &d = g_dev[(size_t)t_dev];
    size_t charge = round_up(size, GUARD);
    if (size > cfg().mem_bytes || d.used + charge > cfg().mem_bytes) return set_error(cudaErrorMemoryAllocation);
    allocation *a = new_allocation(size, 0, t_dev);
    if (!a) return set_error(cudaErrorMemoryAllocation);
    d.used += charge;
    *ptr = a->base;
    return cudaSuccess;
}
static cudaError_t free_device(void *ptr, const char *api) {
    auto it = g_allocs.find((uintptr_t)ptr);
    if (it == g_allocs.end() || it->second->kind != 0) {
        allocation *in = find_allocation(ptr);
        if (in) report("misuse", "%s(%p): not the start of a device allocation (it lies inside %s)", api, ptr, describe_allocation(in).c_str());
        else report("misuse", "%s(%p): not a live device allocation (freed twice, or not from cudaMalloc)", api, ptr);
        return set_error(cudaErrorInvalidValue);
    }
    allocation *a = it->second;
    check_one_guard(a, api, "");
    g_dev[(size_t)a->device].used -= round_up(a->size, GUARD);
    free_allocation(a);
    return cudaSuccess;
}
extern "C" cudaError_t cudaFree(void *ptr) {
    LOCKED;
    EMU_INIT();
    if (!ptr) return cudaSuccess;
    EMU_NOT_IN_CAPTURE("cudaFree");
    allocation *a = find_allocation(ptr);
    if (a && a->kind == 0) host_syncs_device(a->device);   /* cudaFree waits for the device */
    return free_device(ptr, "cudaFree");
}
extern "C" cudaError_t cudaMallocAsync(void **ptr, size_t size, cudaStream_t s) {
    LOCKED;
    EMU_INIT();
    EMU_STREAM(st, s);
    int saved = t_dev;
    t_dev = st->device;
    int tc = t_captures, gc = g_global_captures;
    t_captures = 0; g_global_captures = 0;   /* stream-ordered allocation is legal during capture */
    cudaError_t e = cudaMalloc(ptr, size);
    t_captures = tc; g_global_captures = gc;
    t_dev = saved;
    return e;
}
extern "C" cudaError_t cudaFreeAsync(void *ptr, cudaStream_t s) {
    if (!ptr) return cudaSuccess;
    {
        LOCKED;
        EMU_INIT();
        allocation *a = find_allocation(ptr);
        if (!a || a->kind != 0 || a->base != (char *)ptr) return free_device(ptr, "cudaFreeAsync");
    }
    /* the free is a write of the whole buffer in stream order: an unordered use elsewhere is a race */
    return enqueue(s, "cudaFreeAsync", std::vector<mem_access>{mem_access{ptr, 0, 1, 0}}, [ptr] {
        std::lock_guard<std::recursive_mutex> g(g_mu);
        free_device(ptr, "cudaFreeAsync");
    });
}
extern "C" cudaError_t cudaHostAlloc(void **ptr, size_t size, unsigned int flags) {
    (void)flags;
    LOCKED;
    if (!ptr) return set_error(cudaErrorInvalidValue);
    *ptr = NULL;
    EMU_INIT();
    EMU_NOT_IN_CAPTURE("cudaHostAlloc");
    allocation *a = new_allocation(size, 1, -1);
    if (!a) return set_error(cudaErrorMemoryAllocation);
    *ptr = a->base;
    return cudaSuccess;
}
extern "C" cudaError_t cudaMallocHost(void **ptr, size_t size) { return cudaHostAlloc(ptr, size, 0); }
extern "C" cudaError_t cudaFreeHost(void *ptr) {
    LOCKED;
    EMU_INIT();
    if (!ptr) return cudaSuccess;
    EMU_NOT_IN_CAPTURE("cudaFreeHost");
    auto it = g_allocs.find((uintptr_t)ptr);
    if (it == g_allocs.end() || it->second->kind != 1) {
        report("misuse", "cudaFreeHost(%p): not a live pinned allocation from cudaMallocHost/cudaHostAlloc", ptr);
        return set_error(cudaErrorInvalidValue);
    }
    for (size_t d = 0; d < g_dev.size(); d++) host_syncs_device((int)d);
    check_one_guard(it->second, "cudaFreeHost", "");
    free_allocation(it->second);
    return cudaSuccess;
}
extern "C" cudaError_t cudaHostRegister(void *ptr, size_t size, unsigned int flags) {
    (void)flags;
    LOCKED;
    EMU_INIT();
    if (!ptr || !size) return set_error(cudaErrorInvalidValue);
    if (find_allocation(ptr)) return set_error(cudaErrorInvalidValue);
    allocation *a = new allocation();
    a->base = (char *)ptr; a->size = size; a->raw = NULL; a->raw_size = 0; a->device = -1; a->kind = 2; a->serial = ++g_serial;
    g_allocs[(uintptr_t)ptr] = a;
    return cudaSuccess;
}
extern "C" cudaError_t cudaHostUnregister(void *ptr) {
    LOCKED;
    EMU_INIT();
    auto it = g_allocs.find((uintptr_t)ptr);
    if (it == g_allocs.end() || it->second->kind != 2) return set_error(cudaErrorInvalidValue);
    free_allocation(it->second);
    return cudaSuccess;
}
extern "C" cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes *attr, const void *ptr) {
    LOCKED;
    EMU_INIT();
    if (!attr || !ptr) return set_error(cudaErrorInvalidValue);
    memset(attr, 0, sizeof *attr);
    allocation *a = find_allocation(ptr);
    if (!a) { attr->type = cudaMemoryTypeUnregistered; attr->device = -2; return cudaSuccess; }
    if (a->kind == 0) { attr->type = cudaMemoryTypeDevice; attr->device = a->device; attr->devicePointer = (void *)ptr; }
    else { attr->type = cudaMemoryTypeHost; attr->device = t_dev; attr->devicePointer = (void *)ptr; attr->hostPointer = (void *)ptr; }
    return cudaSuccess;
}

/* Checks that [p, p + n) lies inside one allocation of the expected side; reports otherwise. */
static int check_range(const char *api, const char *which, const void *p, size_t n, int want_device) {
    allocation *a = find_allocation(p);
    if (want_device) {
        if (!a || a->kind != 0) {
            report("misuse", "%s: %s %p is not device memory%s%s", api, which, p, a ? ": it lies in " : "", a ? describe_allocation(a).c_str() : "");
            return 0;
        }
    } else if (a && a->kind == 0) {
        report("misuse", "%s: %s %p is device memory (%s), but the copy direction says host", api, which, p, describe_allocation(a).c_str());
        return 0;
    }
    if (a) {
        size_t off = (size_t)((const char *)p - a->base);
        if (n > a->size - off) {
            report("out-of-bounds", "%s: %s range [%p, +%zu) runs %zu bytes past the end of %s (offset %zu)", api, which, p, n,
                   n - (a->size - off), describe_allocation(a).c_str(), off);
            return 0;
        }
    }
    return 1;
}

static cudaError_t copy(const char *api_sync, const char *api_async, void *dst, const void *src, size_t n, enum cudaMemcpyKind kind,
                        cudaStream_t s, int sync) {
    static const char *names[2][5] = {
        {"cudaMemcpyAsync(HtoH)", "cudaMemcpyAsync(HtoD)", "cudaMemcpyAsync(DtoH)", "cudaMemcpyAsync(DtoD)", "cudaMemcpyAsync(default)"},
        {"cudaMemcpy(HtoH)", "cudaMemcpy(HtoD)", "cudaMemcpy(DtoH)", "cudaMemcpy(DtoD)", "cudaMemcpy(default)"}};
    const char *api = sync ? api_sync : api_async;
    std::vector<mem_access> acc;
    {
        LOCKED;
        EMU_INIT();
        if (n == 0) return cudaSuccess;
        if (!dst || !src) return set_error(cudaErrorInvalidValue);
        if ((unsigned)kind > 4) return set_error(cudaErrorInvalidMemcpyDirection);
        if (sync) EMU_NOT_IN_CAPTURE(api);
        allocation *da = find_allocation(dst), *sa = find_allocation(src);
        int dd = da && da->kind == 0, sd = sa && sa->kind == 0;
        if (kind == cudaMemcpyDefault) kind = (enum cudaMemcpyKind)((sd ? 2 : 0) | (dd ? 1 : 0));
        int want_dd = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
        int want_sd = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
        if (!check_range(api, "destination", dst, n, want_dd) || !check_range(api, "source", src, n, want_sd))
            return set_error(cudaErrorInvalidValue);
        if (da) acc.push_back(mem_access{dst, n, 1, 1});
        if (sa) acc.push_back(mem_access{src, n, 0, 1});
        api = names[sync][kind];
    }
    cudaError_t e = enqueue(sync ? NULL : s, api, std::move(acc), [dst, src, n] { memmove(dst, src, n); });
    if (e == cudaSuccess && sync) {   /* the host waits for the copy */
        LOCKED;
        host_knows(g_dev[(size_t)t_dev].legacy->clock);
        trace("sync s%d", g_dev[(size_t)t_dev].legacy->id);
    }
    return e;
}
extern "C" cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind) {
    return copy("cudaMemcpy", "cudaMemcpyAsync", dst, src, n, kind, NULL, 1);
}
extern "C" cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind, cudaStream_t s) {
    return copy("cudaMemcpy", "cudaMemcpyAsync", dst, src, n, kind, s, 0);
}
static cudaError_t fill(const char *api, void *p, int v, size_t n, cudaStream_t s) {
    std::vector<mem_access> acc;
    {
        LOCKED;
        EMU_INIT();
        if (n == 0) return cudaSuccess;
        if (!check_range(api, "destination", p, n, 1)) return set_error(cudaErrorInvalidValue);
        acc.push_back(mem_access{p, n, 1, 1});
    }
    return enqueue(s, api, std::move(acc), [p, v, n] { memset(p, v, n); });
}
/* cudaMemset is asynchronous to the host (for device memory), on the legacy stream */
extern "C" cudaError_t cudaMemset(void *p, int v, size_t n) { return fill("cudaMemset", p, v, n, NULL); }
extern "C" cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s) { return fill("cudaMemsetAsync", p, v, n, s); }

/* ====================================================================================
   Streams and events
   ==================================================================================== */

extern "C" cudaError_t cudaStreamCreateWithFlags(cudaStream_t *out, unsigned int flags) {
    LOCKED;
    if (!out) return set_error(cudaErrorInvalidValue);
    EMU_INIT();
    *out = (cudaStream_t)new_stream(t_dev, flags & cudaStreamNonBlocking, 0, 0);
    return cudaSuccess;
}
extern "C" cudaError_t cudaStreamCreate(cudaStream_t *out) { return cudaStreamCreateWithFlags(out, 0); }
extern "C" cudaError_t cudaStreamCreateWithPriority(cudaStream_t *out, unsigned int flags, int priority) {
    (void)priority;
    return cudaStreamCreateWithFlags(out, flags);
}
extern "C" cudaError_t cudaDeviceGetStreamPriorityRange(int *least, int *greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = -5;
    return cudaSuccess;
}
extern "C" cudaError_t cudaStreamDestroy(cudaStream_t h) {
    LOCKED;
    EMU_INIT();
    if (h == NULL || h == cudaStreamLegacy || h == cudaStreamPerThread) return set_error(cudaErrorInvalidResourceHandle);
    EMU_STREAM(s, h);
    if (s->capture) { s->capture_invalid = 1; return set_error(cudaErrorStreamCaptureUnsupported); }
    s->destroyed = 1;
    g_handles.erase(s);   /* its clock stays: work still queued on it is waited for by the legacy stream */
    return cudaSuccess;
}
extern "C" cudaError_t cudaStreamSynchronize(cudaStream_t h) {
    LOCKED;
    EMU_INIT();
    EMU_STREAM(s, h);
    if (s->capture) { s->capture_invalid = 1; return set_error(cudaErrorStreamCaptureUnsupported); }
    EMU_NOT_IN_CAPTURE("cudaStreamSynchronize");
    host_knows(s->clock);
    trace("sync s%d", s->id);
    return g_sticky ? set_error(g_sticky) : cudaSuccess;
}
extern "C" cudaError_t cudaStreamQuery(cudaStream_t h) {
    LOCKED;
    EMU_INIT();
    EMU_STREAM(s, h);
    if (s->capture) { s->capture_invalid = 1; return set_error(cudaErrorStreamCaptureUnsupported); }
    host_knows(s->clock);   /* everything on it has run: the host now knows it finished */
    return g_sticky ? set_error(g_sticky) : cudaSuccess;
}
extern "C" cudaError_t cudaStreamGetFlags(cudaStream_t h, unsigned int *flags) {
    LOCKED;
    EMU_INIT();
    EMU_STREAM(s, h);
    if (flags) *flags = s->flags;
    return cudaSuccess;
}
extern "C" void mgpu_emu_name_stream(cudaStream_t h, const char *name) {
    LOCKED;
    if (init() != cudaSuccess) return;
    cudaError_t e;
    stream *s = resolve_stream(h, &e);
    if (s) s->name = name ? name : "";
}
extern "C" int mgpu_emu_error_count(void) { return __atomic_load_n(&g_errors, __ATOMIC_SEQ_CST); }

extern "C" cudaError_t cudaEventCreateWithFlags(cudaEvent_t *out, unsigned int flags) {
    LOCKED;
    if (!out) return set_error(cudaErrorInvalidValue);
    EMU_INIT();
    static int ids;
    event *ev = new event();
    ev->id = ++ids;
    ev->device = t_dev; ev->flags = flags; ev->recorded = 0; ev->in_capture = 0;
    g_handles.insert(ev);
    *out = (cudaEvent_t)ev;
    return cudaSuccess;
}
extern "C" cudaError_t cudaEventCreate(cudaEvent_t *out) { return cudaEventCreateWithFlags(out, 0); }
static event *resolve_event(cudaEvent_t h) { return h && g_handles.count((const void *)h) ? (event *)h : NULL; }
extern "C" cudaError_t cudaEventDestroy(cudaEvent_t h) {
    LOCKED;
    EMU_INIT();
    event *ev = resolve_event(h);
    if (!ev) return set_error(cudaErrorInvalidResourceHandle);
    g_handles.erase(ev);
    delete ev;
    return cudaSuccess;
}
static void record_on(event *ev, stream *s) {
    ev->clock = tick(s);
    ev->recorded = 1;
    ev->in_capture = 0;
}
static void wait_on(stream *s, event *ev) {
    if (ev->recorded) s->clock.join(ev->clock);
}
extern "C" cudaError_t cudaEventRecord(cudaEvent_t h, cudaStream_t sh) {
    LOCKED;
    EMU_INIT();
    event *ev = resolve_event(h);
    if (!ev) return set_error(cudaErrorInvalidResourceHandle);
    EMU_STREAM(s, sh);
    if (ev->device != s->device) return set_error(cudaErrorInvalidResourceHandle);
    if (g_sticky) return set_error(g_sticky);
    if (s->capture) {
        note_node(s->capture, "cudaEventRecord", NODE_RECORD, {}, {}, h);
        ev->in_capture = 1;
        return cudaSuccess;
    }
    record_on(ev, s);
    trace("record e%d s%d", ev->id, s->id);
    return cudaSuccess;
}
extern "C" cudaError_t cudaStreamWaitEvent(cudaStream_t sh, cudaEvent_t h, unsigned int flags) {
    (void)flags;
    LOCKED;
    EMU_INIT();
    event *ev = resolve_event(h);
    if (!ev) return set_error(cudaErrorInvalidResourceHandle);
    EMU_STREAM(s, sh);
    if (s->capture) { note_node(s->capture, "cudaStreamWaitEvent", NODE_WAIT, {}, {}, h); return cudaSuccess; }
    if (ev->in_capture) {
        report("unsupported", "cudaStreamWaitEvent: %s waits for an event recorded during a stream capture (joining a capture from "
               "another stream is not emulated)", stream_desc(s).c_str());
        return set_error(cudaErrorNotSupported);
    }
    wait_on(s, ev);
    trace("wait s%d e%d", s->id, ev->id);
    return cudaSuccess;
}
/* A successful query or synchronisation: the host now knows the event's work is done. */
static cudaError_t event_done(cudaEvent_t h, int sync) {
    LOCKED;
    EMU_INIT();
    event *ev = resolve_event(h);
    if (!ev) return set_error(cudaErrorInvalidResourceHandle);
    if (ev->in_capture) return set_error(cudaErrorStreamCaptureUnsupported);
    if (sync) EMU_NOT_IN_CAPTURE("cudaEventSynchronize");
    if (ev->recorded) host_knows(ev->clock);
    if (sync) trace("sync e%d", ev->id);
    return g_sticky ? set_error(g_sticky) : cudaSuccess;
}
extern "C" cudaError_t cudaEventQuery(cudaEvent_t h) { return event_done(h, 0); }
extern "C" cudaError_t cudaEventSynchronize(cudaEvent_t h) { return event_done(h, 1); }
extern "C" cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
    LOCKED;
    EMU_INIT();
    event *ea = resolve_event(a), *eb = resolve_event(b);
    if (!ms || !ea || !eb) return set_error(!ms ? cudaErrorInvalidValue : cudaErrorInvalidResourceHandle);
    if ((ea->flags | eb->flags) & cudaEventDisableTiming) return set_error(cudaErrorInvalidResourceHandle);
    if (!ea->recorded || !eb->recorded) return set_error(cudaErrorInvalidResourceHandle);
    *ms = 0.0f;   /* the emulation has no device time */
    return cudaSuccess;
}

/* ====================================================================================
   Graphs
   ==================================================================================== */

extern "C" cudaError_t cudaStreamBeginCapture(cudaStream_t h, enum cudaStreamCaptureMode mode) {
    LOCKED;
    EMU_INIT();
    EMU_STREAM(s, h);
    if (s->legacy) return set_error(cudaErrorStreamCaptureUnsupported);
    if (s->capture) return set_error(cudaErrorIllegalState);
    s->capture = new graph();
    s->capture->device = s->device;
    s->capture_mode = mode; s->capture_invalid = 0; s->capture_thread = pthread_self();
    if (mode == cudaStreamCaptureModeGlobal) g_global_captures++;
    if (mode != cudaStreamCaptureModeRelaxed) t_captures++;
    return cudaSuccess;
}
extern "C" cudaError_t cudaStreamEndCapture(cudaStream_t h, cudaGraph_t *out) {
    LOCKED;
    EMU_INIT();
    EMU_STREAM(s, h);
    if (!s->capture) return set_error(cudaErrorIllegalState);
    if (s->capture_mode != cudaStreamCaptureModeRelaxed && !pthread_equal(s->capture_thread, pthread_self()))
        return set_error(cudaErrorStreamCaptureWrongThread);
    graph *g = s->capture;
    s->capture = NULL;
    if (s->capture_mode == cudaStreamCaptureModeGlobal) g_global_captures--;
    if (s->capture_mode != cudaStreamCaptureModeRelaxed) t_captures--;
    if (out) *out = NULL;
    if (s->capture_invalid) {
        for (node &n : g->nodes) if (n.kind == NODE_RECORD) { event *ev = resolve_event(n.ev); if (ev) ev->in_capture = 0; }
        delete g;
        return set_error(cudaErrorStreamCaptureInvalidated);
    }
    for (node &n : g->nodes) if (n.kind == NODE_RECORD) { event *ev = resolve_event(n.ev); if (ev) ev->in_capture = 0; }
    g_handles.insert(g);
    if (out) *out = (cudaGraph_t)g;
    else delete g;
    return cudaSuccess;
}
extern "C" cudaError_t cudaStreamIsCapturing(cudaStream_t h, enum cudaStreamCaptureStatus *status) {
    LOCKED;
    EMU_INIT();
    EMU_STREAM(s, h);
    if (!status) return set_error(cudaErrorInvalidValue);
    *status = !s->capture ? cudaStreamCaptureStatusNone : s->capture_invalid ? cudaStreamCaptureStatusInvalidated : cudaStreamCaptureStatusActive;
    return cudaSuccess;
}
extern "C" cudaError_t cudaGraphInstantiate(cudaGraphExec_t *out, cudaGraph_t h, unsigned long long flags) {
    (void)flags;
    LOCKED;
    EMU_INIT();
    if (!out || !h || !g_handles.count((const void *)h)) return set_error(cudaErrorInvalidValue);
    graph_exec *x = new graph_exec();
    x->nodes = ((graph *)h)->nodes;
    g_handles.insert(x);
    *out = (cudaGraphExec_t)x;
    return cudaSuccess;
}
extern "C" cudaError_t cudaGraphGetNodes(cudaGraph_t h, void **nodes, size_t *count) {
    LOCKED;
    if (!h || !count || !g_handles.count((const void *)h)) return set_error(cudaErrorInvalidValue);
    (void)nodes;
    *count = ((graph *)h)->nodes.size();
    return cudaSuccess;
}
/* A graph keeps the addresses it captured: memory freed after the capture (and perhaps handed out
   again) is read or written by every replay, a silent corruption or an illegal address on a GPU.
   Returns 0 (and reports, naming the node) when a node's memory is gone. */
static int graph_memory_alive(const node &n) {
    for (size_t i = 0; i < n.acc.size() && i < n.serials.size(); i++) {
        if (!n.serials[i]) continue;
        allocation *a = find_allocation(n.acc[i].p);
        if (a && a->serial == n.serials[i]) continue;
        report("graph", "a replay of the graph runs %s, which %s %p: that memory was freed after the capture%s (memory a graph "
               "uses must outlive the graph: give the captured work a pool of its own)", n.name, n.acc[i].write ? "writes" : "reads",
               n.acc[i].p, a ? " and handed out again" : "");
        return 0;
    }
    return 1;
}

/* A replay runs the recorded calls in order, each as an op on the launch stream. */
extern "C" cudaError_t cudaGraphLaunch(cudaGraphExec_t h, cudaStream_t sh) {
    std::vector<node> nodes;
    {
        LOCKED;
        EMU_INIT();
        if (!h || !g_handles.count((const void *)h)) return set_error(cudaErrorInvalidValue);
        EMU_STREAM(s, sh);
        if (s->capture) {   /* a graph launched into a capture becomes part of it */
            for (const node &n : ((graph_exec *)h)->nodes) s->capture->nodes.push_back(n);
            return cudaSuccess;
        }
        nodes = ((graph_exec *)h)->nodes;
        for (const node &n : nodes)
            if (!graph_memory_alive(n)) { set_sticky(cudaErrorIllegalAddress); return cudaErrorIllegalAddress; }
    }
    for (node &n : nodes) {
        cudaError_t e = cudaSuccess;
        if (n.kind == NODE_WORK) e = enqueue(sh, n.name, n.acc, n.run);
        else if (n.kind == NODE_RECORD) e = cudaEventRecord(n.ev, sh);
        else e = cudaStreamWaitEvent(sh, n.ev, 0);
        if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
}
template <class T> static cudaError_t destroy_handle(const void *h) {
    LOCKED;
    if (!h || !g_handles.count(h)) return set_error(cudaErrorInvalidValue);
    g_handles.erase(h);
    delete (T *)h;
    return cudaSuccess;
}
extern "C" cudaError_t cudaGraphDestroy(cudaGraph_t h) { return destroy_handle<graph>(h); }
extern "C" cudaError_t cudaGraphExecDestroy(cudaGraphExec_t h) { return destroy_handle<graph_exec>(h); }

extern "C" cudaError_t cudaFuncSetAttribute(const void *func, enum cudaFuncAttribute attr, int value) {
    LOCKED;
    EMU_INIT();
    if (!func) return set_error(cudaErrorInvalidDeviceFunction);
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (value < 0 || value > (227 << 10)) return set_error(cudaErrorInvalidValue);
        g_func_smem[func] = value;
    }
    return cudaSuccess;
}
