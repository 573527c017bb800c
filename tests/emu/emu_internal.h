/* mgpu CUDA emulation (tests only): declarations shared by runtime.cc, fiber.cc, blas.cc and
   nccl.cc. Not seen by the code under test. */
#ifndef MGPU_EMU_INTERNAL_H
#define MGPU_EMU_INTERNAL_H
#include "include/cuda_runtime_api.h"
#include <stddef.h>
#include <stdint.h>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define MGPU_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MGPU_EMU_ASAN 1
#endif
#endif
#ifndef MGPU_EMU_ASAN
#define MGPU_EMU_ASAN 0
#endif
#if MGPU_EMU_ASAN
#define MGPU_EMU_NO_ASAN __attribute__((no_sanitize("address")))
#else
#define MGPU_EMU_NO_ASAN
#endif

namespace mgpu_emu {

struct kernel_call;
struct launch_cfg;

/* ---- configuration (environment, read once) ---- */
struct config {
    int devices;            /* MGPU_EMU_DEVICES (default 1) */
    size_t mem_bytes;       /* MGPU_EMU_MEM_MB per device (default 8192) */
    int fatal;              /* MGPU_EMU_ERRORS=report: keep going after an error (default: stop) */
    int schedule;           /* MGPU_EMU_SCHEDULE: 0 alternate (default), 1 forward, 2 reverse */
    int init_error;         /* MGPU_EMU_INIT_ERROR=N: cudaGetDeviceCount fails with cudaError N (a broken driver) */
    size_t stack_bytes;     /* MGPU_EMU_STACK_KB per fiber */
    int fill;               /* MGPU_EMU_FILL: byte written into fresh device memory (default 0xff: NaN), -1 none */
    int host_guard;         /* MGPU_EMU_HOST_GUARD (default 1): device memory is inaccessible outside emulated calls */
};
const config &cfg();

/* ---- errors ---- */
/* Reports an error the emulation found (a fault, race or misuse the real device or library would
   not report, or would report without saying where). Fatal by default: prints and exits 86. */
void report(const char *what, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
cudaError_t set_error(cudaError_t e);   /* the thread's last error; returns e */
void set_sticky(cudaError_t e);         /* a device fault: every later synchronising call returns it */

/* ---- names and sentences of error codes, as tables ---- */
struct code_text { int code; const char *name; const char *text; };
template <size_t N> static inline const char *code_lookup(const code_text (&t)[N], int code, int want_name, const char *fallback) {
    for (size_t i = 0; i < N; i++) if (t[i].code == code) return want_name ? t[i].name : t[i].text;
    return fallback;
}

/* ---- the runtime lock: tables, clocks and access records ---- */
std::recursive_mutex &lock();

/* ---- memory ---- */
struct access_rec {
    size_t lo, hi;       /* byte range within the allocation */
    int write;
    int stream;          /* stream id */
    uint64_t tick;       /* the op's position on that stream */
    const char *op;      /* a string with static storage */
};
struct allocation {
    char *base;          /* what the program sees */
    size_t size;
    char *raw;           /* with guard zones around */
    size_t raw_size;
    int device;          /* -1: pinned or registered host memory */
    int kind;            /* 0 device, 1 pinned host (cudaMallocHost/HostAlloc), 2 registered host */
    uint64_t serial;
    std::vector<access_rec> recs;
};
allocation *find_allocation(const void *p);   /* the allocation containing p, or NULL (lock held) */
std::string describe_allocation(const allocation *a);
/* Checks every allocation's guard zones; an overwritten one is reported as an out-of-bounds write by `op`. */
void check_guards(const char *op, const char *detail);

/* ---- the host-access guard ---- */
/* While a device_scope lives (on any thread), device memory is readable and writable; when the
   last one ends it is PROT_NONE again (with MGPU_EMU_HOST_GUARD on). Every emulated operation that
   touches device memory runs inside one: enqueue opens it around the op's run function. */
void device_access_begin();
void device_access_end();
struct device_scope {
    device_scope() { device_access_begin(); }
    ~device_scope() { device_access_end(); }
    device_scope(const device_scope &) = delete;
    device_scope &operator=(const device_scope &) = delete;
};
/* fiber.cc: if the calling thread is running a kernel, writes which kernel and thread faulted (signal-safe enough for a crash path). */
void kernel_fault_note(int sig);

/* ---- streams and ops ---- */
struct stream;
/* One byte range an op reads or writes; `exact` false: from p to the end of its allocation. */
struct mem_access {
    const void *p;
    size_t bytes;
    int write;
    int exact;
};
/* Work on a stream: checked and run now, or recorded while the stream is being captured.
   Returns cudaSuccess or the error to hand back. The run function executes without the lock. */
cudaError_t enqueue(cudaStream_t s, const char *op, std::vector<mem_access> acc, std::function<void()> run);
/* The stream a handle names (NULL: the current device's legacy stream); NULL and the error if invalid. */
stream *resolve_stream(cudaStream_t s, cudaError_t *err);
int stream_device(stream *s);
int current_device();

/* ---- kernels (fiber.cc) ---- */
/* Runs every block of the grid on fibers of the calling OS thread. Returns cudaSuccess, or the
   error after a fault it reported (only when errors are not fatal). */
cudaError_t run_grid(kernel_call *call, const char *name, dim3 grid, dim3 block, size_t smem);

} /* namespace mgpu_emu */
#endif
