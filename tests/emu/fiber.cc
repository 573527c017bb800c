/* mgpu CUDA emulation (tests only): runs a kernel's blocks on fibers.

   Every thread of a block is a fiber with its own stack on the launching OS thread. The scheduler
   runs the block warp by warp: a warp's lanes run in lane order, each until it blocks (at
   __syncthreads, a shuffle or a vote) or exits, until the whole warp is blocked; then the next
   warp. So a warp runs ahead of the others as far as CUDA allows, which exposes a missing
   __syncthreads in the usual block reductions (a reader that runs before the writers it did not
   wait for). Odd blocks run warps and lanes in reverse order (MGPU_EMU_SCHEDULE=forward|reverse
   fixes one order), so a race shows whichever side it needs.

   A barrier releases when every thread of the block has reached it; a warp operation when every
   lane its mask names has reached one with the same kind and mask. Anything else that leaves no
   fiber able to run (threads that exited before a barrier, lanes waiting at a shuffle for lanes
   that wait at a barrier) is a deadlock, reported with the kernel's name, the block and where its
   threads are. A shuffle whose mask names an
   exited or missing lane, or that reads a lane outside the mask, is reported when it is called.

   Context switches are a few instructions of hand-written assembly on x86-64 (ucontext elsewhere),
   annotated for AddressSanitizer (__sanitizer_start/finish_switch_fiber). */
#include "emu_internal.h"
#include "cuda_emu.h"
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <pthread.h>
#include <unistd.h>
#if MGPU_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

__thread uint3 mgpu_emu_thread_idx, mgpu_emu_block_idx, mgpu_emu_block_dim, mgpu_emu_grid_dim;

#if defined(__x86_64__)
/* void mgpu_emu_swap(void **save_sp, void *load_sp): saves the callee-saved registers, MXCSR and
   the x87 control word on the current stack, stores the stack pointer, loads the other one and
   restores what that stack saved. A new fiber's stack holds a frame that "returns" into
   mgpu_emu_fiber_start, which calls r13(r12). */
extern "C" void mgpu_emu_swap(void **save_sp, void *load_sp);
extern "C" void mgpu_emu_fiber_start(void);
__asm__(".text\n"
        ".globl mgpu_emu_swap\n"
        ".type mgpu_emu_swap,@function\n"
        "mgpu_emu_swap:\n"
        "  pushq %rbp\n"
        "  pushq %rbx\n"
        "  pushq %r12\n"
        "  pushq %r13\n"
        "  pushq %r14\n"
        "  pushq %r15\n"
        "  subq $8, %rsp\n"
        "  stmxcsr (%rsp)\n"
        "  fnstcw 4(%rsp)\n"
        "  movq %rsp, (%rdi)\n"
        "  movq %rsi, %rsp\n"
        "  ldmxcsr (%rsp)\n"
        "  fldcw 4(%rsp)\n"
        "  addq $8, %rsp\n"
        "  popq %r15\n"
        "  popq %r14\n"
        "  popq %r13\n"
        "  popq %r12\n"
        "  popq %rbx\n"
        "  popq %rbp\n"
        "  ret\n"
        ".size mgpu_emu_swap, .-mgpu_emu_swap\n"
        ".globl mgpu_emu_fiber_start\n"
        ".type mgpu_emu_fiber_start,@function\n"
        "mgpu_emu_fiber_start:\n"
        "  .cfi_startproc\n"
        "  .cfi_undefined rip\n"
        "  movq %r12, %rdi\n"
        "  callq *%r13\n"
        "  ud2\n"
        "  .cfi_endproc\n"
        ".size mgpu_emu_fiber_start, .-mgpu_emu_fiber_start\n"
        ".section .note.GNU-stack,\"\",@progbits\n"
        ".text\n");
#endif

namespace mgpu_emu {

enum { F_READY, F_BARRIER, F_WARP, F_DONE };

struct fiber {
    void *sp;
#if !defined(__x86_64__)
    ucontext_t uc;
#endif
    char *stack;           /* lowest usable byte (a guard page lies below) */
    size_t stack_size;
    uint3 tid;
    int lin, lane, warp;
    int state;
    int bar_pred;
    /* a pending warp operation */
    int wkind, warg, wwidth;
    unsigned wmask;
    uint64_t wval, wres;
    int dirty;             /* abandoned in the middle of a function: its stack may still be poisoned */
    void *fake_stack;
};

struct sched {
    std::vector<fiber> f;
    std::vector<std::pair<char *, size_t>> regions;
    void *main_sp;
#if !defined(__x86_64__)
    ucontext_t main_uc;
#endif
    const void *main_bottom;
    size_t main_size;
    void *main_fake;
    fiber *cur;
    kernel_call *call;
    const char *kname;
    int n, nwarps, reverse;
    int at_barrier, done, released;
    int bar_kind, bar_acc, bar_result;
    int failed;            /* a fault was reported: abandon the launch */
};
static __thread sched *tls_sched;

static const char *kind_name(int k) {
    switch (k) {
    case WARP_SHFL_IDX: return "__shfl_sync";
    case WARP_SHFL_UP: return "__shfl_up_sync";
    case WARP_SHFL_DOWN: return "__shfl_down_sync";
    case WARP_SHFL_XOR: return "__shfl_xor_sync";
    case WARP_BALLOT: return "__ballot_sync";
    case WARP_ANY: return "__any_sync";
    case WARP_ALL: return "__all_sync";
    default: return "__syncwarp";
    }
}

#if !MGPU_EMU_ASAN
static __thread char *sig_stack;

/* A crash inside a kernel (a wild pointer, a fiber stack overflow) names the kernel and thread.
   Called by runtime.cc's fault handler, which then lets the default action run. */
void kernel_fault_note(int sig) {
    sched *s = tls_sched;
    char buf[512];
    int n;
    if (s && s->cur)
        n = snprintf(buf, sizeof buf, "mgpu-emu: error: signal %d in kernel %s, block (%u,%u,%u) thread (%u,%u,%u): an invalid "
                     "address (or a fiber stack overflow: MGPU_EMU_STACK_KB=%zu)\n", sig, s->kname, mgpu_emu_block_idx.x,
                     mgpu_emu_block_idx.y, mgpu_emu_block_idx.z, s->cur->tid.x, s->cur->tid.y, s->cur->tid.z, cfg().stack_bytes >> 10);
    else if (s) n = snprintf(buf, sizeof buf, "mgpu-emu: signal %d outside kernels\n", sig);
    else return;
    if (n > 0) { ssize_t w = write(2, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1); (void)w; }
}

/* The handler (runtime.cc) runs on this stack (SA_ONSTACK), so a fiber stack overflow is reported. */
static void install_signal_stack() {
    if (sig_stack) return;
    size_t sz = 64 << 10;
    sig_stack = (char *)malloc(sz);
    if (!sig_stack) return;
    stack_t ss;
    memset(&ss, 0, sizeof ss);
    ss.ss_sp = sig_stack; ss.ss_size = sz;
    sigaltstack(&ss, NULL);
}
#else
void kernel_fault_note(int sig) { (void)sig; }   /* AddressSanitizer reports crashes itself */
static void install_signal_stack() {}
#endif

/* A thread that launched kernels ends: its fiber stacks go. */
static void free_sched(void *p) {
    sched *s = (sched *)p;
    for (auto &r : s->regions) munmap(r.first, r.second);
    delete s;
    if (tls_sched == s) tls_sched = NULL;
}
static pthread_key_t sched_key;
static std::once_flag sched_key_once;

static sched *get_sched() {
    if (!tls_sched) {
        std::call_once(sched_key_once, [] { pthread_key_create(&sched_key, free_sched); });
        tls_sched = new sched();
        pthread_setspecific(sched_key, tls_sched);
        install_signal_stack();
    }
    return tls_sched;
}

/* Stacks for fibers [have, want): one mapping each with a guard page below every stack. */
static void ensure_fibers(sched *s, int want) {
    int have = (int)s->f.size();
    if (want <= have) return;
    size_t page = (size_t)sysconf(_SC_PAGESIZE), ss = (cfg().stack_bytes + page - 1) / page * page, slot = ss + page;
    size_t count = (size_t)(want - have), bytes = slot * count;
    char *m = (char *)mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) { fprintf(stderr, "mgpu-emu: cannot map %zu bytes of fiber stacks\n", bytes); abort(); }
    s->regions.push_back(std::make_pair(m, bytes));
    s->f.resize((size_t)want);
    for (size_t i = 0; i < count; i++) {
        mprotect(m + i * slot, page, PROT_NONE);
        fiber &f = s->f[(size_t)have + i];
        memset(&f, 0, sizeof f);
        f.stack = m + i * slot + page;
        f.stack_size = ss;
    }
}

static void fiber_main(void *arg);
#if !defined(__x86_64__)
static void fiber_main_uc(int lo, int hi);
#endif

static void fiber_prepare(fiber *f) {
#if MGPU_EMU_ASAN
    if (f->dirty) { __asan_unpoison_memory_region(f->stack, f->stack_size); f->dirty = 0; }
    f->fake_stack = NULL;
#endif
#if defined(__x86_64__)
    uint64_t *sp = (uint64_t *)(((uintptr_t)(f->stack + f->stack_size)) & ~(uintptr_t)15);
    uint32_t mxcsr = 0;
    uint16_t fpucw = 0;
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
    __asm__ volatile("fnstcw %0" : "=m"(fpucw));
    uint32_t csr[2] = {mxcsr, fpucw};
    *--sp = (uint64_t)(uintptr_t)&mgpu_emu_fiber_start;   /* "return address" of the first switch */
    *--sp = 0;                                            /* rbp */
    *--sp = 0;                                            /* rbx */
    *--sp = (uint64_t)(uintptr_t)f;                       /* r12: argument */
    *--sp = (uint64_t)(uintptr_t)&fiber_main;             /* r13: function */
    *--sp = 0;                                            /* r14 */
    *--sp = 0;                                            /* r15 */
    uint64_t w;
    memcpy(&w, csr, 8);
    *--sp = w;                                            /* MXCSR, x87 control word */
    f->sp = sp;
#else
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->stack;
    f->uc.uc_stack.ss_size = f->stack_size;
    f->uc.uc_link = NULL;
    makecontext(&f->uc, (void (*)())fiber_main_uc, 2, (int)((uintptr_t)f & 0xffffffffu), (int)((uintptr_t)f >> 32));
#endif
}

/* Scheduler -> fiber (to_fiber) or fiber -> scheduler (`final`: the fiber never runs again), with
   AddressSanitizer told which stack comes next. */
static void jump(sched *s, fiber *f, int to_fiber, int final) {
#if MGPU_EMU_ASAN
    if (to_fiber) __sanitizer_start_switch_fiber(&s->main_fake, f->stack, f->stack_size);
    else __sanitizer_start_switch_fiber(final ? NULL : &f->fake_stack, s->main_bottom, s->main_size);
#else
    (void)final;
#endif
#if defined(__x86_64__)
    if (to_fiber) mgpu_emu_swap(&s->main_sp, f->sp);
    else mgpu_emu_swap(&f->sp, s->main_sp);
#else
    if (to_fiber) swapcontext(&s->main_uc, &f->uc);
    else swapcontext(&f->uc, &s->main_uc);
#endif
#if MGPU_EMU_ASAN
    if (to_fiber) __sanitizer_finish_switch_fiber(s->main_fake, NULL, NULL);
    else __sanitizer_finish_switch_fiber(f->fake_stack, &s->main_bottom, &s->main_size);
#endif
}
static void switch_to(sched *s, fiber *f) {
    s->cur = f;
    mgpu_emu_thread_idx = f->tid;
    jump(s, f, 1, 0);
    s->cur = NULL;
}
static void yield(sched *s, fiber *f, int final) { jump(s, f, 0, final); }

static void fiber_main(void *arg) {
    fiber *f = (fiber *)arg;
    sched *s = tls_sched;
#if MGPU_EMU_ASAN
    __sanitizer_finish_switch_fiber(NULL, &s->main_bottom, &s->main_size);
#endif
    s->call->run_thread();
    f->state = F_DONE;
    s->done++;
    yield(s, f, 1);
    abort();   /* a finished fiber is never resumed */
}
#if !defined(__x86_64__)
static void fiber_main_uc(int lo, int hi) { fiber_main((void *)(((uintptr_t)(unsigned)hi << 32) | (uintptr_t)(unsigned)lo)); }
#endif

static std::string where(const sched *s) {
    char b[160];
    snprintf(b, sizeof b, "kernel %s, block (%u,%u,%u)", s->kname, mgpu_emu_block_idx.x, mgpu_emu_block_idx.y, mgpu_emu_block_idx.z);
    return b;
}
static std::string thread_name(const fiber *f) {
    char b[64];
    snprintf(b, sizeof b, "thread (%u,%u,%u)", f->tid.x, f->tid.y, f->tid.z);
    return b;
}
static std::string lane_list(unsigned m) {
    std::string out;
    char b[32];
    for (int i = 0; i < 32; i++) {
        if (!((m >> i) & 1u)) continue;
        int j = i;
        while (j + 1 < 32 && ((m >> (j + 1)) & 1u)) j++;
        if (j > i) snprintf(b, sizeof b, "%s%d-%d", out.empty() ? "" : ",", i, j);
        else snprintf(b, sizeof b, "%s%d", out.empty() ? "" : ",", i);
        out += b;
        i = j;
    }
    return out;
}

/* A fault inside a kernel: report it, and (when errors are not fatal) abandon the launch. */
static void fault(sched *s, fiber *f, const char *what, const std::string &msg) {
    report(what, "%s", msg.c_str());
    s->failed = 1;
    if (f) { f->dirty = 1; yield(s, f, 0); abort(); }   /* never resumed */
}

[[noreturn]] void trap(void) {
    sched *s = tls_sched;
    if (!s || !s->cur) { report("trap", "__trap() outside a kernel"); abort(); }
    fault(s, s->cur, "trap", where(s) + ", " + thread_name(s->cur) + ": __trap() was called");
    abort();
}

int barrier(int kind, int pred) {
    sched *s = tls_sched;
    if (!s || !s->cur) { report("misuse", "__syncthreads() called outside a kernel"); return 0; }
    fiber *f = s->cur;
    f->state = F_BARRIER;
    f->bar_pred = pred;
    if (s->at_barrier == 0) s->bar_kind = kind;
    s->at_barrier++;
    if (s->at_barrier == s->n) {   /* the last thread: release all of them */
        int count = 0, all = 1, any = 0;
        for (int i = 0; i < s->n; i++) {
            fiber &g = s->f[(size_t)i];
            count += g.bar_pred != 0; all &= g.bar_pred != 0; any |= g.bar_pred != 0;
        }
        s->bar_result = kind == BAR_COUNT ? count : kind == BAR_AND ? all : kind == BAR_OR ? any : 0;
        for (int i = 0; i < s->n; i++) s->f[(size_t)i].state = F_READY;
        s->at_barrier = 0;
        s->released = 1;
    }
    yield(s, f, 0);
    return s->bar_result;
}

unsigned active_mask(void) {
    sched *s = tls_sched;
    if (!s || !s->cur) return 0;
    unsigned m = 0;
    int base = s->cur->warp * 32;
    for (int l = 0; l < 32 && base + l < s->n; l++)
        if (s->f[(size_t)(base + l)].state != F_DONE) m |= 1u << l;
    return m;
}

uint64_t warp_op(int kind, unsigned mask, uint64_t value, int arg, int width) {
    sched *s = tls_sched;
    if (!s || !s->cur) { report("misuse", "%s called outside a kernel", kind_name(kind)); return value; }
    fiber *f = s->cur;
    int base = f->warp * 32, lane = f->lane;
    char b[256];
    if (!((mask >> lane) & 1u)) {
        snprintf(b, sizeof b, ", %s lane %d: %s with mask 0x%08x, which does not name the calling lane", thread_name(f).c_str(), lane,
                 kind_name(kind), mask);
        fault(s, f, "warp", where(s) + b);
    }
    if (width < 1 || width > 32 || (width & (width - 1))) {
        snprintf(b, sizeof b, ", %s: %s with width %d (must be a power of two up to 32)", thread_name(f).c_str(), kind_name(kind), width);
        fault(s, f, "warp", where(s) + b);
    }
    unsigned missing = 0, exited = 0;
    for (int l = 0; l < 32; l++) {
        if (!((mask >> l) & 1u)) continue;
        if (base + l >= s->n) missing |= 1u << l;
        else if (s->f[(size_t)(base + l)].state == F_DONE) exited |= 1u << l;
    }
    if (missing) {
        snprintf(b, sizeof b, ", warp %d: %s with mask 0x%08x names lanes %s, which do not exist (the block has %d threads)", f->warp,
                 kind_name(kind), mask, lane_list(missing).c_str(), s->n);
        fault(s, f, "warp", where(s) + b);
    }
    if (exited) {
        snprintf(b, sizeof b, ", warp %d: %s with mask 0x%08x names lanes %s, which have exited (every lane the mask names must reach it)",
                 f->warp, kind_name(kind), mask, lane_list(exited).c_str());
        fault(s, f, "warp", where(s) + b);
    }
    /* lanes of the mask already waiting must wait at the same operation */
    int arrived = 1;
    for (int l = 0; l < 32; l++) {
        if (l == lane || !((mask >> l) & 1u)) continue;
        fiber &g = s->f[(size_t)(base + l)];
        if (g.state != F_WARP) continue;
        if (g.wkind != kind || g.wmask != mask) {
            snprintf(b, sizeof b, ", warp %d: lane %d calls %s with mask 0x%08x while lane %d waits at %s with mask 0x%08x", f->warp, lane,
                     kind_name(kind), mask, l, kind_name(g.wkind), g.wmask);
            fault(s, f, "warp", where(s) + b);
        }
        arrived++;
    }
    f->state = F_WARP;
    f->wkind = kind; f->wmask = mask; f->wval = value; f->warg = arg; f->wwidth = width;
    if (arrived == __builtin_popcount(mask)) {   /* complete: every lane gets its result */
        unsigned ballot = 0;
        for (int l = 0; l < 32; l++)
            if (((mask >> l) & 1u) && s->f[(size_t)(base + l)].wval) ballot |= 1u << l;
        for (int l = 0; l < 32; l++) {
            if (!((mask >> l) & 1u)) continue;
            fiber &g = s->f[(size_t)(base + l)];
            int w = g.wwidth, seg = l & ~(w - 1), src = l;
            switch (kind) {
            case WARP_SHFL_IDX: src = seg + (g.warg & (w - 1)); break;
            case WARP_SHFL_UP: src = l - g.warg; if (src < seg) src = l; break;
            case WARP_SHFL_DOWN: src = l + g.warg; if (src >= seg + w) src = l; break;
            case WARP_SHFL_XOR: src = l ^ g.warg; if (src >= seg + w || src < 0 || src > 31) src = l; break;
            default: break;
            }
            if (kind <= WARP_SHFL_XOR) {
                if (!((mask >> src) & 1u)) {
                    snprintf(b, sizeof b, ", warp %d: lane %d reads lane %d through %s, but the mask 0x%08x does not name lane %d", f->warp, l,
                             src, kind_name(kind), mask, src);
                    fault(s, f, "warp", where(s) + b);
                }
                g.wres = s->f[(size_t)(base + src)].wval;
            } else if (kind == WARP_BALLOT) g.wres = ballot;
            else if (kind == WARP_ANY) g.wres = ballot != 0;
            else if (kind == WARP_ALL) g.wres = ballot == mask;
            else g.wres = 0;
            g.state = F_READY;
        }
    }
    yield(s, f, 0);
    return f->wres;
}

/* No fiber can run and the block is not finished: say where everyone is. */
static void diagnose_deadlock(sched *s) {
    int exited = s->done, at_bar = 0, at_warp = 0;
    const fiber *first_bar = NULL, *first_warp = NULL, *first_done = NULL;
    for (int i = 0; i < s->n; i++) {
        const fiber &g = s->f[(size_t)i];
        if (g.state == F_BARRIER) { at_bar++; if (!first_bar) first_bar = &g; }
        else if (g.state == F_WARP) { at_warp++; if (!first_warp) first_warp = &g; }
        else if (g.state == F_DONE && !first_done) first_done = &g;
    }
    char b[512];
    if (at_bar && !at_warp)
        snprintf(b, sizeof b, ": barrier deadlock: %d of %d threads wait at __syncthreads (first %s) but %d have exited without reaching "
                 "it (first %s); every thread of a block must reach every __syncthreads", at_bar, s->n, thread_name(first_bar).c_str(),
                 exited, first_done ? thread_name(first_done).c_str() : "-");
    else if (at_warp) {
        const fiber &g = *first_warp;
        int base = g.warp * 32;
        unsigned waiting = 0, elsewhere = 0, gone = 0;
        for (int l = 0; l < 32 && base + l < s->n; l++) {
            if (!((g.wmask >> l) & 1u)) continue;
            const fiber &h = s->f[(size_t)(base + l)];
            if (h.state == F_WARP) waiting |= 1u << l;
            else if (h.state == F_DONE) gone |= 1u << l;
            else elsewhere |= 1u << l;
        }
        if (gone)
            snprintf(b, sizeof b, ", warp %d: lanes %s wait at %s with mask 0x%08x, which names lanes %s, which have exited (every lane the "
                     "mask names must reach it)", g.warp, lane_list(waiting).c_str(), kind_name(g.wkind), g.wmask, lane_list(gone).c_str());
        else
            snprintf(b, sizeof b, ": warp deadlock: warp %d, lanes %s wait at %s with mask 0x%08x while lanes %s wait at __syncthreads "
                     "(%d threads at barriers, %d at warp operations)", g.warp, lane_list(waiting).c_str(), kind_name(g.wkind), g.wmask,
                     lane_list(elsewhere).c_str(), at_bar, at_warp);
    } else snprintf(b, sizeof b, ": deadlock with %d threads exited", exited);
    fault(s, NULL, at_warp ? "warp" : "barrier deadlock", where(s) + b);
}

static void run_block(sched *s) {
    int n = s->n;
    unsigned bx = mgpu_emu_block_dim.x, by = mgpu_emu_block_dim.y;
    for (int i = 0; i < n; i++) {
        fiber &f = s->f[(size_t)i];
        f.tid.x = (unsigned)i % bx;
        f.tid.y = ((unsigned)i / bx) % by;
        f.tid.z = (unsigned)i / (bx * by);
        f.lin = i; f.lane = i & 31; f.warp = i >> 5;
        f.state = F_READY;
        fiber_prepare(&f);
    }
    s->at_barrier = 0; s->done = 0;
    while (s->done < n && !s->failed) {
        int ran = 0;
        s->released = 0;
        for (int wi = 0; wi < s->nwarps && !s->released && !s->failed; wi++) {
            int w = s->reverse ? s->nwarps - 1 - wi : wi, lo = w * 32, hi = lo + 32 < n ? lo + 32 : n, progressed;
            do {
                progressed = 0;
                for (int li = 0; li < hi - lo && !s->released && !s->failed; li++) {
                    fiber *f = &s->f[(size_t)(s->reverse ? hi - 1 - li : lo + li)];
                    if (f->state != F_READY) continue;
                    switch_to(s, f);
                    progressed = ran = 1;
                }
            } while (progressed && !s->released && !s->failed);
        }
        if (!ran && !s->released && s->done < n && !s->failed) diagnose_deadlock(s);
    }
    if (s->failed)   /* fibers left mid-function keep poisoned frames on their stacks */
        for (int i = 0; i < n; i++) if (s->f[(size_t)i].state != F_DONE) s->f[(size_t)i].dirty = 1;
}

cudaError_t run_grid(kernel_call *call, const char *name, dim3 grid, dim3 block, size_t smem) {
    (void)smem;
    sched *s = get_sched();
    if (s->call) {   /* a kernel launched from inside a kernel (dynamic parallelism): not emulated */
        report("misuse", "kernel %s launched from inside kernel %s (dynamic parallelism is not emulated)", name, s->kname);
        return cudaErrorNotSupported;
    }
    int n = (int)(block.x * block.y * block.z);
    ensure_fibers(s, n);
    uint3 saved_tid = mgpu_emu_thread_idx, saved_bid = mgpu_emu_block_idx, saved_bd = mgpu_emu_block_dim, saved_gd = mgpu_emu_grid_dim;
    s->call = call; s->kname = name; s->n = n; s->nwarps = (n + 31) / 32; s->failed = 0;
    mgpu_emu_block_dim = uint3{block.x, block.y, block.z};
    mgpu_emu_grid_dim = uint3{grid.x, grid.y, grid.z};
    uint64_t linear = 0;
    for (unsigned z = 0; z < grid.z && !s->failed; z++)
        for (unsigned y = 0; y < grid.y && !s->failed; y++)
            for (unsigned x = 0; x < grid.x && !s->failed; x++, linear++) {
                mgpu_emu_block_idx = uint3{x, y, z};
                s->reverse = cfg().schedule == 2 || (cfg().schedule == 0 && (linear & 1));
                run_block(s);
            }
    int failed = s->failed;
    s->call = NULL; s->kname = NULL; s->cur = NULL;
    mgpu_emu_thread_idx = saved_tid; mgpu_emu_block_idx = saved_bid; mgpu_emu_block_dim = saved_bd; mgpu_emu_grid_dim = saved_gd;
    return failed ? cudaErrorLaunchFailure : cudaSuccess;
}

} /* namespace mgpu_emu */
