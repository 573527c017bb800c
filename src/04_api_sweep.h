
/* ======================================================================================
   Processes and sweeps: child processes for supervisors (mgpurun, mgpu-sweep), and many
   independent runs (a grid x seeds) spread over device slots, resumable from a results file
   ====================================================================================== */
#ifndef MGPU_SWEEP_H
#define MGPU_SWEEP_H
#ifdef __cplusplus
extern "C" {
#endif

/* ---- processes (POSIX) ---- */

MGPU_API const char *mgpu_signal_name(int sig);                         /* "SIGKILL"; "unknown signal" */
/* A waitpid status in words: "exited with code 3", "was killed by signal 9 (SIGKILL)". */
MGPU_API void mgpu_wait_status_describe(int status, char *buf, size_t size);
MGPU_API int mgpu_wait_status_code(int status);                         /* exit code, or 128 + signal (the shell's) */
MGPU_API int mgpu_cpu_count(void);                                      /* cores this process may run on, >= 1 */
MGPU_API mgpu_result mgpu_make_dirs(const char *path);                  /* mkdir -p; an existing non-directory fails */
MGPU_API int mgpu_program_exists(const char *program);                  /* 1 if execvp would find it (PATH lookup) */
/* The last max_lines lines of path written after byte offset `from`, into buf (NUL-terminated, no
   final newline; older lines dropped to fit). Returns the length, 0 for an empty or unreadable file. */
MGPU_API size_t mgpu_file_tail(const char *path, int64_t from, int max_lines, char *buf, size_t size);

/* A child in a process group of its own (pid = group id, so mgpu_kill_group reaches whatever it
   spawns), stdin from /dev/null, and on Linux killed with the calling thread (PR_SET_PDEATHSIG),
   even when that is SIGKILLed: a supervisor that dies leaves no orphan. Signals are blocked across
   fork and the child resets caught ones before exec, so a signal meant for the parent never runs
   the parent's handler in the child; ignored signals stay ignored (nohup), except SIGPIPE. */
typedef struct mgpu_spawn_desc {
    char *const *argv;          /* NULL-terminated; argv[0] is looked up in PATH */
    const char *const *env;     /* "NAME=value" to set, "NAME" to unset, NULL-terminated; the rest is inherited */
    int stdout_fd, stderr_fd;   /* where the child's output goes; 0: inherited */
    const char *label;          /* starts the exec failure message, "LABEL: cannot run PROG: why" (NULL: "mgpu") */
} mgpu_spawn_desc;
MGPU_API mgpu_result mgpu_spawn(const mgpu_spawn_desc *desc, int *pid);
MGPU_API int mgpu_kill_group(int pid, int sig);                         /* kill(-pid, sig): the child's whole group; 0 or -1 */
/* The self-pipe trick for a poll loop: each listed signal writes its number as one byte to the
   returned read end (non-blocking, close-on-exec). SIGHUP stays ignored if it is (nohup), and
   SIGPIPE is ignored so a closed terminal cannot kill a supervisor. Process-wide: one pipe at a
   time; mgpu_signal_pipe_close restores the previous handlers. -1 on failure. */
MGPU_API int mgpu_signal_pipe_open(const int *signals, int n);
MGPU_API void mgpu_signal_pipe_close(void);
/* A TCP port nothing listens on now (bound to port 0 on addr, then released), or -1 with an
   error. Another process could take it before it is used: torchrun's window, no more. */
MGPU_API int mgpu_pick_free_port(const char *addr);
/* A supervisor's group of workers and how it stops (mgpurun's loop and the trainer's self-launch
   share it). The caller spawns the workers (mgpu_spawn) and sets w[i].pid and w[i].running = 1; in
   its loop mgpu_proc_group_reap collects the workers that ended (the first failure, a non-zero exit
   or a signal, stops the others: SIGTERM to every worker's process group, SIGKILL grace_s later),
   mgpu_proc_group_on_signal takes a signal the supervisor got (forwarded to the workers; a second
   one while stopping kills at once; SIGCHLD is ignored), mgpu_proc_group_tick sends the SIGKILL
   when due, and a poll should wait at most mgpu_proc_group_timeout_ms(g, idle_ms). Messages go to
   stderr as "LABEL: rank 1 exited with code 3 [pid P]; stopping the other 3 workers ...". */
typedef struct mgpu_proc { int rank, pid, running, status; } mgpu_proc;   /* status: waitpid's, once ended */
typedef struct mgpu_proc_group {
    mgpu_proc *w; int n;
    const char *label;     /* starts every message (NULL: "mgpu") */
    double grace_s;        /* SIGTERM -> SIGKILL */
    int stopping, killed;
    double kill_at;        /* when the stop turns into SIGKILL */
    int failed;            /* index of the first worker that failed, -1 if none */
    int interrupt_sig;     /* the signal that stopped the supervisor, 0 if none */
} mgpu_proc_group;
/* w[i].rank = i (change it for ranks of other nodes), nothing started */
MGPU_API void mgpu_proc_group_init(mgpu_proc_group *g, mgpu_proc *w, int n, const char *label, double grace_s);
MGPU_API int mgpu_proc_group_running(const mgpu_proc_group *g);
MGPU_API void mgpu_proc_group_signal(mgpu_proc_group *g, int sig);   /* to every worker's process group */
MGPU_API void mgpu_proc_group_stop(mgpu_proc_group *g, int sig);     /* signal now, SIGKILL after grace_s */
MGPU_API void mgpu_proc_group_reap(mgpu_proc_group *g);
MGPU_API void mgpu_proc_group_on_signal(mgpu_proc_group *g, int sig);
MGPU_API int mgpu_proc_group_timeout_ms(const mgpu_proc_group *g, int idle_ms);   /* idle_ms -1: none */
MGPU_API void mgpu_proc_group_tick(mgpu_proc_group *g);
/* A local group of n workers run to their end, as torch.multiprocessing.spawn does: worker i runs
   argv with torchrun's variables (RANK = LOCAL_RANK = i, WORLD_SIZE = LOCAL_WORLD_SIZE = n,
   MASTER_ADDR 127.0.0.1, MASTER_PORT a free port) and MGPU_NUM_THREADS = cores / n unless set.
   The first worker to fail (non-zero exit or a signal) stops the others (SIGTERM, SIGKILL after
   grace_s), SIGINT/SIGTERM/SIGHUP to the caller are forwarded, and every worker's process group is
   killed at the end (and dies with the caller, mgpu_spawn): nothing is left behind. Messages go to
   stderr as "LABEL: rank 1 was killed by signal 9 (SIGKILL) ...". Returns the caller's exit code:
   0; the first failing worker's (128 + signal when killed); 128 + signal when the caller itself
   was stopped; -1 with an error when the workers could not start. */
typedef struct mgpu_worker_group_desc {
    char *const *argv;          /* NULL-terminated; argv[0] is looked up in PATH */
    int n;                      /* workers, >= 1 */
    const char *label;          /* starts every message (NULL: "mgpu") */
    double grace_s;             /* SIGTERM -> SIGKILL; 0: 5 s */
    int rank0_stdout_only;      /* other ranks' stdout goes to /dev/null (every rank's stderr is kept) */
} mgpu_worker_group_desc;
MGPU_API int mgpu_worker_group_run(const mgpu_worker_group_desc *desc);

/* ---- GPUs, found without the CUDA runtime (so a CPU build of a supervisor can place runs) ---- */

typedef struct mgpu_gpu_info {
    char id[64];                /* the CUDA_VISIBLE_DEVICES value that selects it: "0", "GPU-<uuid>" */
    char name[96];              /* "NVIDIA H200"; "" when the source does not say */
    int64_t memory_mib;         /* 0 when the source does not say */
} mgpu_gpu_info;
/* Where mgpu_find_gpus looks; NULL for all the defaults (tests and unusual installs name others). */
typedef struct mgpu_gpu_sources {
    const char *nvidia_smi;     /* the program; NULL: "nvidia-smi" in PATH; "": not asked */
    const char *proc_dir;       /* NULL: "/proc/driver/nvidia/gpus"; "": not read */
    int ignore_visible_devices; /* 1: CUDA_VISIBLE_DEVICES is not consulted */
    double timeout_s;           /* each nvidia-smi call; 0: 30 */
} mgpu_gpu_sources;
/* The GPUs this process may use, from the first source that answers:
     1. CUDA_VISIBLE_DEVICES when it is set: its entries as written, up to the first that CUDA
        would not take either (not an index >= 0 nor a GPU-/MIG- UUID: "-1" hides every GPU);
        set but empty is no GPU;
     2. `nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader`;
     3. `nvidia-smi -L`;
     4. the entries of /proc/driver/nvidia/gpus (one per PCI device), numbered 0.. in bus order.
   Indices are nvidia-smi's, which are in PCI bus order: CUDA numbers devices the same way only
   under CUDA_DEVICE_ORDER=PCI_BUS_ID (which mgpu_sweep_run gives its GPU runs). Fills at most max
   entries and returns how many it filled; `how` (may be NULL) says where they came from, or why
   none was found ("nvidia-smi: not found in PATH; /proc/driver/nvidia/gpus: absent"). -1 and
   MGPU_ERR_INVALID_ARG for bad arguments. */
MGPU_API int mgpu_find_gpus(const mgpu_gpu_sources *where, mgpu_gpu_info *gpus, int max, char *how, size_t how_size);

/* ---- the grid ---- */

/* Axes named like C identifiers (letters, digits, _), each with a list of values; a point takes one
   value per axis. Points are numbered 0 .. size-1 with the first axis varying slowest. */
typedef struct mgpu_sweep_grid mgpu_sweep_grid;
MGPU_API mgpu_sweep_grid *mgpu_sweep_grid_create(void);
MGPU_API void mgpu_sweep_grid_destroy(mgpu_sweep_grid *g);
/* Adds an axis from "name=v1,v2,..."; an item lo..hi (integers) expands to lo, lo+1, ..., hi, and
   lo..hi:step to every step-th. A missing '=', a bad or reserved name, a repeated name or value, an
   empty value or a bad range is MGPU_ERR_INVALID_ARG quoting the spec. */
MGPU_API mgpu_result mgpu_sweep_grid_add(mgpu_sweep_grid *g, const char *spec);
MGPU_API int mgpu_sweep_grid_axes(const mgpu_sweep_grid *g);
MGPU_API const char *mgpu_sweep_grid_name(const mgpu_sweep_grid *g, int axis);
MGPU_API int mgpu_sweep_grid_count(const mgpu_sweep_grid *g, int axis);            /* values on the axis */
MGPU_API const char *mgpu_sweep_grid_value(const mgpu_sweep_grid *g, int axis, int i);
MGPU_API int64_t mgpu_sweep_grid_size(const mgpu_sweep_grid *g);                  /* points (0 without axes) */
/* values[a] = the value of axis a at point `index` (pointers into the grid). */
MGPU_API mgpu_result mgpu_sweep_grid_point(const mgpu_sweep_grid *g, int64_t index, const char **values);

/* ---- templates and run ids ---- */

/* Replaces every {name} of tmpl by its value ({{ and }} stand for braces; braces around anything
   that is not a name stay as they are). An unknown {name} is an error (NULL, MGPU_ERR_INVALID_ARG)
   that lists the known names. Free the result with mgpu_free. */
MGPU_API char *mgpu_sweep_substitute(const char *tmpl, int n, const char *const *names, const char *const *values);
/* A run's id from its grid values, usable as a file name: "seed=3,alpha=0.1" (bytes other than
   [A-Za-z0-9._+-] in values as %XX; ids over 120 characters shortened with a hash). */
MGPU_API mgpu_result mgpu_sweep_run_id(int n, const char *const *names, const char *const *values, char *buf, size_t size);

/* ---- the results file: one JSON object per finished run ----
   {"run_id":"seed=3,alpha=0.1","params":{"seed":3,"alpha":0.1},"status":"ok"|"failed"|"interrupted",
    "exit_code":0,"signal":null,"error":null,"attempts":1,"wall_s":12.3,"slot":0,"devices":"0",
    "started_at":"2026-01-01T12:00:00Z","log":"...","metrics":"...","final":{the run's "event":"final"
    metrics line}|null} plus "log_tail" for a failure. Params that read as JSON numbers are numbers. */
typedef struct mgpu_sweep_results mgpu_sweep_results;
/* A missing file is an empty result set; lines that are not JSON objects with a "params" object
   (a torn last line after a crash) are skipped with a warning. */
MGPU_API mgpu_sweep_results *mgpu_sweep_results_load(const char *path);
MGPU_API void mgpu_sweep_results_destroy(mgpu_sweep_results *r);
MGPU_API int64_t mgpu_sweep_results_count(const mgpu_sweep_results *r);
MGPU_API const mgpu_json *mgpu_sweep_results_get(const mgpu_sweep_results *r, int64_t i);
/* The last record whose params are exactly these names and values, or NULL. */
MGPU_API const mgpu_json *mgpu_sweep_results_find(const mgpu_sweep_results *r, int n, const char *const *names,
                                                  const char *const *values);
/* A param's value as text (numbers as written), NULL if absent. */
MGPU_API const char *mgpu_sweep_record_param(const mgpu_json *record, const char *name, char *buf, size_t size);
/* A metric of a record: a top-level number ("wall_s"), "final.NAME" or "final_NAME" (NAME in the
   final metrics line). 1 if found and finite. */
MGPU_API int mgpu_sweep_record_metric(const mgpu_json *record, const char *name, double *value);
/* Appends text plus a newline to path with one write() on an O_APPEND descriptor, then fsync: lines
   of concurrent writers never interleave and a crash leaves at most a torn last line. */
MGPU_API mgpu_result mgpu_append_line(const char *path, const char *text);

/* ---- summary: mean +- sample std and n of metrics per configuration ---- */

typedef enum mgpu_sweep_format { MGPU_SWEEP_TABLE = 0, MGPU_SWEEP_CSV, MGPU_SWEEP_MARKDOWN } mgpu_sweep_format;
typedef struct mgpu_sweep_summary_desc {
    const char *const *by; int n_by;              /* group by these params (0: one group of all) */
    const char *const *metrics; int n_metrics;    /* 0: every number of the final metrics lines */
    mgpu_sweep_format format;
} mgpu_sweep_summary_desc;
/* Only runs whose latest record is "ok" count (one per run id). Groups are sorted by their values
   (numerically where both are numbers); CSV has NAME_mean, NAME_std, NAME_n columns. */
MGPU_API mgpu_result mgpu_sweep_summary_print(const mgpu_sweep_results *r, const mgpu_sweep_summary_desc *desc, FILE *out);

/* ---- the scheduler ---- */

typedef enum mgpu_sweep_status { MGPU_SWEEP_OK = 0, MGPU_SWEEP_FAILED, MGPU_SWEEP_INTERRUPTED } mgpu_sweep_status;
/* One run, as the callbacks see it. */
typedef struct mgpu_sweep_run_info {
    int64_t index;                 /* grid point */
    const char *id;                /* mgpu_sweep_run_id */
    const char *const *values;     /* one per grid axis */
    int slot;
    const char *devices;           /* the slot's CUDA_VISIBLE_DEVICES ("" on a CPU slot) */
    int attempt;                   /* 1, then 2.. for --retries */
    int pid;
    const char *log_path, *metrics_path;
    /* on_finish only */
    mgpu_sweep_status status;
    int exit_code;                 /* -1 when killed by a signal */
    int signal;                    /* 0 unless killed by a signal */
    double wall_s;
    const char *record;            /* the JSON line appended to the results file (NULL before a retry) */
} mgpu_sweep_run_info;
typedef struct mgpu_sweep_desc {
    const mgpu_sweep_grid *grid;
    const char *const *command;    /* argv template, NULL-terminated: {axis} and the built-ins {metrics},
                                      {log}, {run_id}, {run_dir} (created when used), {slot}, {attempt} */
    const char *results;           /* JSONL results file (created; locked against a second sweep) */
    const char *run_dir;           /* logs and metrics files; NULL: the results path minus ".jsonl", plus ".d" */
    int cpu_slots;                 /* slots with CUDA_VISIBLE_DEVICES="" */
    const char *const *gpus; int n_gpus; /* one CUDA_VISIBLE_DEVICES value per GPU (mgpu_find_gpus's ids);
                                      its runs also get CUDA_DEVICE_ORDER=PCI_BUS_ID unless that is set */
    int slots_per_gpu;             /* 0: 1 */
    int retries;                   /* reruns of a failed run before it is recorded failed */
    int rerun_failed;              /* runs recorded failed run again (else they count as finished) */
    double run_timeout_s;          /* 0: none; a run over it is stopped and recorded failed */
    double grace_s;                /* SIGTERM -> SIGKILL when stopping runs; 0: 5 */
    int tail_lines;                /* log lines kept for a failure; 0: 20 */
    int num_threads;               /* MGPU_NUM_THREADS of each run; 0: inherited if set, else cores / slots */
    int dry_run;                   /* print the commands of the runs left, run nothing */
    int quiet;                     /* no progress output (callbacks still run) */
    int no_signal_handlers;        /* leave SIGINT/SIGTERM/SIGHUP alone (the caller stops nothing then) */
    void (*on_start)(const mgpu_sweep_run_info *run, void *user);
    void (*on_finish)(const mgpu_sweep_run_info *run, void *user);
    void *user;
} mgpu_sweep_desc;
typedef struct mgpu_sweep_stats {
    int64_t total;                 /* grid points */
    int64_t skipped;               /* already finished in the results file */
    int64_t skipped_failed;        /* of those, recorded "failed" (not rerun without rerun_failed) */
    int64_t ok, failed, interrupted; /* recorded by this call */
    int stop_signal;               /* the signal that stopped the sweep, 0 if none */
} mgpu_sweep_stats;
/* Runs every grid point not yet finished in desc->results, one process per slot, appending one
   record per run. Failures are recorded and never stop the sweep; SIGINT/SIGTERM/SIGHUP stop the
   runs in flight (SIGTERM to their groups, SIGKILL after grace_s; a second signal kills at once)
   and record them "interrupted", to run again on resume. Returns MGPU_OK when the loop ran (see
   stats), or an error before any run started: a bad template, an unwritable results file or run
   directory, no slots, or another sweep holding the lock. Call from a single-threaded process
   (the children are tied to the calling thread's life). */
MGPU_API mgpu_result mgpu_sweep_run(const mgpu_sweep_desc *desc, mgpu_sweep_stats *stats);

#ifdef __cplusplus
}
#endif
#endif /* MGPU_SWEEP_H */
