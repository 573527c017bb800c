/* mgpurun - launch N copies of a training program with torchrun's environment (RANK, WORLD_SIZE,
   LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RESTART_COUNT,
   TORCHELASTIC_RUN_ID),
   stop the whole group when one worker fails, and restart it up to --max-restarts times.

   Usage: mgpurun [options] PROGRAM [ARGS...]      (mgpurun --help lists the options)

   Design: one single-threaded poll loop owns everything. Signals reach it through a self-pipe;
   worker output reaches it through pipes (prefixed "[rank r] ") unless --log-dir sends it to
   files. Every worker leads its own process group, so stopping a worker also stops whatever it
   spawned, and on Linux every worker dies with the launcher (PR_SET_PDEATHSIG), even on SIGKILL.
   Processes, signals and wait statuses go through mgpu.h's helpers, shared with mgpu-sweep. */
#define MGPU_IMPLEMENTATION
#include "mgpu.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define EXIT_USAGE 2
#define DEFAULT_MULTINODE_PORT 29500 /* torchrun's default when several nodes must agree */
#define DEFAULT_RDZV_PORT 29400      /* torchrun's for --rdzv-endpoint HOST without a port */
#define LOG_TAIL_LINES 20
#define LINE_CAP 8192                /* longer lines are split, each piece prefixed */
#define MAX_PROCS 4096

/* ---------------------------------------------------------------------------------------------
   Messages
   --------------------------------------------------------------------------------------------- */

static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("mgpurun: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* ---------------------------------------------------------------------------------------------
   Options
   --------------------------------------------------------------------------------------------- */

typedef struct launch_opts {
    int nproc;               /* workers on this node */
    int nnodes, node_rank;
    char master_addr[256];
    int master_port;         /* 0: pick a free one for every attempt */
    int max_restarts;
    double grace_s;          /* SIGTERM -> SIGKILL delay */
    const char *log_dir;     /* NULL: prefixed output on the launcher's stdout/stderr */
    char **prog_argv;        /* PROGRAM ARGS..., NULL-terminated (argv's tail) */
    /* what the user gave explicitly, to resolve defaults and conflicts after parsing */
    const char *nproc_text;
    int nnodes_given, node_rank_given, port_given, addr_given, standalone;
    /* torchrun's rendezvous flags, for a static job: where rank 0 listens, and the run id */
    int rdzv_given;          /* --rdzv-backend or --rdzv-endpoint was given */
    const char *rdzv_endpoint;
    const char *rdzv_id;     /* TORCHELASTIC_RUN_ID of the workers ("none" as torchrun's default) */
    int interactive;         /* --interactive: ask for the mode, count and LR, then run */
} launch_opts;

enum flag_id {
    F_NPROC, F_NNODES, F_NODE_RANK, F_MASTER_ADDR, F_MASTER_PORT, F_MAX_RESTARTS, F_LOG_DIR,
    F_GRACE, F_STANDALONE, F_NO_PYTHON, F_RDZV_BACKEND, F_RDZV_ENDPOINT, F_RDZV_ID, F_INTERACTIVE, F_HELP
};
typedef struct flag_spec { const char *name; enum flag_id id; int takes_value; } flag_spec;

/* Canonical (dashed) spellings; torchrun's underscored ones are folded onto these. */
static const flag_spec flag_table[] = {
    {"--nproc-per-node", F_NPROC, 1},   {"--nnodes", F_NNODES, 1},
    {"--node-rank", F_NODE_RANK, 1},    {"--master-addr", F_MASTER_ADDR, 1},
    {"--master-port", F_MASTER_PORT, 1}, {"--max-restarts", F_MAX_RESTARTS, 1},
    {"--log-dir", F_LOG_DIR, 1},        {"--grace-period-s", F_GRACE, 1},
    {"--standalone", F_STANDALONE, 0},  {"--no-python", F_NO_PYTHON, 0},
    {"--rdzv-backend", F_RDZV_BACKEND, 1}, {"--rdzv-endpoint", F_RDZV_ENDPOINT, 1},
    {"--rdzv-id", F_RDZV_ID, 1},        {"--interactive", F_INTERACTIVE, 0},
    {"--help", F_HELP, 0},              {"-h", F_HELP, 0},
};

static void print_help(FILE *f) {
    fputs(
        "usage: mgpurun [options] PROGRAM [ARGS...]\n"
        "\n"
        "Starts --nproc-per-node copies of PROGRAM with torchrun's environment: RANK, WORLD_SIZE,\n"
        "LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT,\n"
        "TORCHELASTIC_RESTART_COUNT, TORCHELASTIC_RUN_ID, and MGPU_NUM_THREADS (cores / workers)\n"
        "unless already set.\n"
        "If a worker fails, the others get SIGTERM, then SIGKILL after the grace period; the\n"
        "failing rank is reported and the group restarts while --max-restarts allows.\n"
        "\n"
        "options (torchrun's spellings with underscores and --flag=value are accepted too):\n"
        "  --nproc-per-node N|auto|gpu|cpu  workers on this node (default 1); auto: one per\n"
        "                            visible GPU (CUDA_VISIBLE_DEVICES, else nvidia-smi -L), 1\n"
        "                            if none; gpu: the same but no GPU is an error; cpu: one per core\n"
        "  --nnodes N|N:N            nodes in the job (default 1); torchrun's MIN:MAX only with\n"
        "                            MIN == MAX (elastic membership is not supported)\n"
        "  --node-rank R             this node's index, 0 <= R < nnodes (default 0)\n"
        "  --master-addr HOST        where rank 0 hosts the rendezvous (default 127.0.0.1)\n"
        "  --master-port P           its TCP port; 0 picks a free port on every (re)start\n"
        "                            (default: 0 on one node, 29500 with --nnodes > 1)\n"
        "  --max-restarts N          restart the whole group up to N times after a failure (default 0)\n"
        "  --log-dir DIR             each rank's stdout+stderr go to DIR/rank-<r>.log instead of\n"
        "                            the terminal; a failure report shows the last 20 lines\n"
        "  --grace-period-s S        seconds between SIGTERM and SIGKILL when stopping (default 5)\n"
        "  --standalone              single node on 127.0.0.1 with a free port\n"
        "  --no-python               accepted for torchrun compatibility (PROGRAM always runs as is)\n"
        "  --rdzv-backend c10d|static  accepted for torchrun compatibility: the rendezvous is\n"
        "                            always static (every node gives --node-rank)\n"
        "  --rdzv-endpoint HOST[:PORT]  rank 0's host and port, as --master-addr/--master-port\n"
        "                            (port default 29400, as torchrun's); [IPv6]:PORT accepted\n"
        "  --rdzv-id ID              the job's id, given to the workers as TORCHELASTIC_RUN_ID\n"
        "  --interactive             detect the devices, ask for the mode (DDP, DP or single),\n"
        "                            the number of GPUs or CPU processes and whether to scale\n"
        "                            --lr, print the exact command, then run it (needs PROGRAM)\n"
        "  --help                    this text\n"
        "\n"
        "Without --log-dir every line a worker prints is prefixed with \"[rank r] \" (rank 0 too)\n"
        "and goes to mgpurun's stdout or stderr like the worker's own. Workers get stdin from\n"
        "/dev/null.\n"
        "\n"
        "exit status: 0 when every worker exits 0; the failing worker's exit code (128 + signal if\n"
        "it was killed) when restarts are exhausted; 128 + signal when mgpurun itself is stopped by\n"
        "SIGINT/SIGTERM/SIGHUP (forwarded to the workers); 2 for a bad command line; 1 when the\n"
        "launch itself fails.\n",
        f);
}

/* strtol over the whole text, within [lo, hi]; the message names the flag. */
static int parse_int_flag(const char *flag, const char *text, long lo, long hi, int *out) {
    char *end = NULL;
    long v;
    errno = 0;
    v = strtol(text, &end, 10);
    if (text[0] == '\0' || *end != '\0' || errno != 0 || v < lo || v > hi) {
        say("%s expects an integer in [%ld, %ld], got '%s'", flag, lo, hi, text);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int parse_seconds_flag(const char *flag, const char *text, double *out) {
    char *end = NULL;
    double v;
    errno = 0;
    v = strtod(text, &end);
    if (text[0] == '\0' || *end != '\0' || errno != 0 || !(v >= 0.0 && v <= 86400.0)) {
        say("%s expects seconds in [0, 86400], got '%s'", flag, text);
        return -1;
    }
    *out = v;
    return 0;
}

/* torchrun's --nnodes N or MIN:MAX; a range is only accepted when it names one size, since the
   membership of an mgpu job is fixed at launch (no elastic scale-up or -down). */
static int parse_nnodes(const char *flag, const char *text, int *out) {
    const char *colon = strchr(text, ':');
    char min_text[32];
    int lo, hi;
    if (!colon) return parse_int_flag(flag, text, 1, 65536, out);
    if ((size_t)(colon - text) >= sizeof min_text) { say("%s expects N or MIN:MAX, got '%s'", flag, text); return -1; }
    memcpy(min_text, text, (size_t)(colon - text));
    min_text[colon - text] = '\0';
    if (parse_int_flag(flag, min_text, 1, 65536, &lo) != 0 || parse_int_flag(flag, colon + 1, 1, 65536, &hi) != 0) return -1;
    if (lo != hi) {
        say("%s %s: elastic membership is not supported (nodes cannot join or leave a running job); "
            "give a fixed size, %s N or %s N:N", flag, text, flag, flag);
        return -1;
    }
    *out = lo;
    return 0;
}

/* --rdzv-endpoint HOST[:PORT] (or [IPV6]:PORT) onto master_addr/master_port; torchrun's c10d
   default port 29400 when none is given. */
static int apply_rdzv_endpoint(launch_opts *o, const char *ep) {
    const char *host = ep, *port_text = NULL;
    size_t host_len;
    if (ep[0] == '[') {
        const char *close_br = strchr(ep, ']');
        if (!close_br || (close_br[1] != '\0' && close_br[1] != ':')) {
            say("--rdzv-endpoint %s: expected [IPV6]:PORT", ep);
            return -1;
        }
        host = ep + 1;
        host_len = (size_t)(close_br - host);
        if (close_br[1] == ':') port_text = close_br + 2;
    } else {
        const char *colon = strrchr(ep, ':');
        if (colon && strchr(ep, ':') != colon) {
            say("--rdzv-endpoint %s: an IPv6 address needs brackets, [ADDR]:PORT", ep);
            return -1;
        }
        host_len = colon ? (size_t)(colon - ep) : strlen(ep);
        if (colon) port_text = colon + 1;
    }
    if (host_len == 0 || host_len >= sizeof o->master_addr) {
        say("--rdzv-endpoint %s: expected HOST[:PORT] with a host name or address", ep);
        return -1;
    }
    if (o->addr_given || o->port_given) {
        say("--rdzv-endpoint %s and --master-addr/--master-port both say where rank 0 listens; give one", ep);
        return -1;
    }
    memcpy(o->master_addr, host, host_len);
    o->master_addr[host_len] = '\0';
    o->port_given = 1;
    if (!port_text) { o->master_port = DEFAULT_RDZV_PORT; return 0; }
    return parse_int_flag("--rdzv-endpoint's port", port_text, 1, 65535, &o->master_port);
}

/* "--nproc_per_node=4" -> spec of --nproc-per-node, value "4"; NULL for an unknown flag. */
static const flag_spec *match_flag(const char *arg, const char **inline_value) {
    char name[64];
    size_t len = strcspn(arg, "=");
    size_t i;
    if (len >= sizeof name) return NULL;
    for (i = 0; i < len; i++) name[i] = (i >= 2 && arg[i] == '_') ? '-' : arg[i];
    name[len] = '\0';
    *inline_value = arg[len] == '=' ? arg + len + 1 : NULL;
    for (i = 0; i < sizeof flag_table / sizeof flag_table[0]; i++)
        if (strcmp(flag_table[i].name, name) == 0) return &flag_table[i];
    return NULL;
}

static int apply_flag(launch_opts *o, const flag_spec *f, const char *value) {
    switch (f->id) {
    case F_NPROC: o->nproc_text = value; return 0;
    case F_NNODES:
        o->nnodes_given = 1;
        return parse_nnodes(f->name, value, &o->nnodes);
    case F_NODE_RANK:
        o->node_rank_given = 1;
        return parse_int_flag(f->name, value, 0, 65535, &o->node_rank);
    case F_MASTER_ADDR:
        if (value[0] == '\0' || strlen(value) >= sizeof o->master_addr) {
            say("%s expects a host name or address, got '%s'", f->name, value);
            return -1;
        }
        o->addr_given = 1;
        strcpy(o->master_addr, value);
        return 0;
    case F_MASTER_PORT: o->port_given = 1; return parse_int_flag(f->name, value, 0, 65535, &o->master_port);
    case F_MAX_RESTARTS: return parse_int_flag(f->name, value, 0, 1000000, &o->max_restarts);
    case F_LOG_DIR:
        if (value[0] == '\0') { say("%s expects a directory, got ''", f->name); return -1; }
        o->log_dir = value;
        return 0;
    case F_GRACE: return parse_seconds_flag(f->name, value, &o->grace_s);
    case F_STANDALONE: o->standalone = 1; return 0;
    case F_NO_PYTHON: return 0;
    case F_RDZV_BACKEND:
        if (strcmp(value, "c10d") != 0 && strcmp(value, "static") != 0) {
            say("%s %s: only a static job is supported; expected c10d or static", f->name, value);
            return -1;
        }
        o->rdzv_given = 1;
        return 0;
    case F_RDZV_ENDPOINT: o->rdzv_given = 1; o->rdzv_endpoint = value; return 0;
    case F_RDZV_ID:
        if (value[0] == '\0' || strlen(value) > 200) { say("%s expects an id of 1 to 200 characters", f->name); return -1; }
        o->rdzv_id = value;
        return 0;
    case F_INTERACTIVE: o->interactive = 1; return 0;
    case F_HELP: return 0;
    }
    return 0;
}

/* GPUs visible to the workers: CUDA_VISIBLE_DEVICES when set (entries up to the first invalid
   one, as CUDA reads it), else the "GPU i: ..." lines of nvidia-smi -L. *source says which. */
static int count_visible_gpus(const char **source) {
    const char *cvd = getenv("CUDA_VISIBLE_DEVICES");
    if (cvd) {
        int n = 0;
        const char *p = cvd;
        *source = "CUDA_VISIBLE_DEVICES";
        while (*p) {
            size_t len = strcspn(p, ",");
            if (len == 0 || p[0] == '-') break;
            n++;
            p += len;
            if (*p == ',') p++;
        }
        return n;
    }
    *source = "nvidia-smi -L";
    {
        FILE *f = popen("nvidia-smi -L 2>/dev/null", "r");
        char line[512];
        int n = 0;
        if (!f) return 0;
        while (fgets(line, sizeof line, f))
            if (strncmp(line, "GPU ", 4) == 0) n++;
        if (pclose(f) != 0) n = 0;   /* missing or failing nvidia-smi: no usable GPU */
        return n;
    }
}

static int resolve_nproc(launch_opts *o) {
    const char *t = o->nproc_text;
    if (!t) { o->nproc = 1; return 0; }
    if (strcmp(t, "auto") == 0 || strcmp(t, "gpu") == 0) {
        const char *source = "";
        int gpus = count_visible_gpus(&source);
        if (gpus > 0) {
            o->nproc = gpus;
            say("--nproc-per-node %s: %d GPU%s visible (from %s)", t, gpus, gpus == 1 ? "" : "s", source);
            return 0;
        }
        if (strcmp(t, "gpu") == 0) {
            say("--nproc-per-node gpu: no GPU visible (checked %s)", source);
            return -1;
        }
        o->nproc = 1;
        say("--nproc-per-node auto: no GPU visible (checked %s), starting 1 worker", source);
        return 0;
    }
    if (strcmp(t, "cpu") == 0) { o->nproc = mgpu_cpu_count(); return 0; }
    return parse_int_flag("--nproc-per-node", t, 1, MAX_PROCS, &o->nproc);
}

/* Defaults that depend on other flags, and combinations that cannot work. */
static int resolve_options(launch_opts *o) {
    if (o->standalone && o->rdzv_endpoint) {
        say("--standalone picks its own endpoint on 127.0.0.1; it conflicts with --rdzv-endpoint %s", o->rdzv_endpoint);
        return -1;
    }
    if (o->rdzv_endpoint && apply_rdzv_endpoint(o, o->rdzv_endpoint) != 0) return -1;
    if (o->rdzv_given && o->nnodes > 1 && !o->node_rank_given) {
        say("--nnodes %d with a rendezvous: torchrun's c10d assigns node ranks as nodes join, mgpurun's "
            "rendezvous is static; give each node --node-rank R (under SLURM: --node-rank \"$SLURM_NODEID\")", o->nnodes);
        return -1;
    }
    if (o->standalone && o->nnodes_given && o->nnodes != 1) {
        say("--standalone runs a single node; it conflicts with --nnodes %d", o->nnodes);
        return -1;
    }
    if (o->node_rank >= o->nnodes) {
        say("--node-rank %d must be below --nnodes %d", o->node_rank, o->nnodes);
        return -1;
    }
    if (!o->port_given) o->master_port = (o->nnodes > 1 && !o->standalone) ? DEFAULT_MULTINODE_PORT : 0;
    if (o->nnodes > 1 && o->master_port == 0) {
        say("--master-port 0 (pick a free port) needs a single node: with --nnodes %d every node "
            "must be given the same port", o->nnodes);
        return -1;
    }
    if (resolve_nproc(o) != 0) return -1;
    if ((long)o->nproc * o->nnodes > INT_MAX / 2) {
        say("--nproc-per-node %d x --nnodes %d is too many workers", o->nproc, o->nnodes);
        return -1;
    }
    return 0;
}

/* Returns 0 to run, 1 after --help, -1 on a bad command line (message printed). */
static int parse_args(launch_opts *o, int argc, char **argv) {
    int i = 1;
    memset(o, 0, sizeof *o);
    o->nnodes = 1;
    o->grace_s = 5.0;
    strcpy(o->master_addr, "127.0.0.1");
    int n_options = 0;
    while (i < argc && argv[i][0] == '-') {
        const char *arg = argv[i], *value = NULL;
        const flag_spec *f;
        if (strcmp(arg, "--") == 0) { i++; break; }
        n_options++;
        f = match_flag(arg, &value);
        if (!f) {
            say("unknown flag %s (see mgpurun --help)", arg);
            return -1;
        }
        if (f->id == F_HELP) { print_help(stdout); return 1; }
        if (!f->takes_value && value) {
            say("%s takes no value, got '%s'", f->name, value);
            return -1;
        }
        if (f->takes_value && !value) {
            if (i + 1 >= argc) { say("%s needs a value", f->name); return -1; }
            value = argv[++i];
        }
        if (apply_flag(o, f, f->takes_value ? value : "") != 0) return -1;
        i++;
    }
    if (i >= argc) {
        say("missing PROGRAM to run (usage: mgpurun [options] PROGRAM [ARGS...])");
        return -1;
    }
    o->prog_argv = argv + i;
    if (o->interactive && n_options > 1) {
        say("--interactive asks for the mode and the number of processes itself; give no other option "
            "(mgpurun --interactive -- PROGRAM [ARGS...])");
        return -1;
    }
    return resolve_options(o);
}

/* ---------------------------------------------------------------------------------------------
   Ports
   --------------------------------------------------------------------------------------------- */

/* A free port on addr (mgpu_pick_free_port, shared with the trainer's self-launch); -1 (message
   printed) on error. Another process could take it before rank 0 binds it: the same small window
   torchrun has. */
static int pick_free_port(const char *addr) {
    int port = mgpu_pick_free_port(addr);
    if (port < 0) say("--master-addr %s: %s", addr, mgpu_last_error());
    return port;
}

/* ---------------------------------------------------------------------------------------------
   Signals
   --------------------------------------------------------------------------------------------- */

/* Signals reach the poll loop through this pipe (mgpu_signal_pipe_open): one byte per signal. */
static int g_signal_fd = -1;
static const int g_caught_signals[] = {SIGCHLD, SIGINT, SIGTERM, SIGHUP};

/* A pipe for a worker's output: both ends close-on-exec (the worker's dup2 onto 1 or 2 clears it
   there), the read end non-blocking. */
static int output_pipe(int fds[2]) {
    int fl;
    if (pipe2(fds, O_CLOEXEC) != 0) return -1;
    if ((fl = fcntl(fds[0], F_GETFL)) >= 0 && fcntl(fds[0], F_SETFL, fl | O_NONBLOCK) == 0) return 0;
    close(fds[0]);
    close(fds[1]);
    return -1;
}

/* ---------------------------------------------------------------------------------------------
   Worker output: line-buffered relay with a "[rank r] " prefix
   --------------------------------------------------------------------------------------------- */

typedef struct out_stream {
    int fd;          /* read end of the worker's pipe; -1 once closed */
    int dest;        /* 1 (stdout) or 2 (stderr) */
    int rank;        /* for the prefix */
    size_t len;
    char buf[LINE_CAP];
} out_stream;

static void write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;   /* the reader went away: drop output, keep supervising */
        p += w;
        n -= (size_t)w;
    }
}

/* One line (without its newline) as a single write, so lines of different ranks never mix. */
static void emit_line(int dest, int rank, const char *line, size_t n) {
    char out[LINE_CAP + 32];
    int plen = snprintf(out, sizeof out, "[rank %d] ", rank);
    memcpy(out + plen, line, n);
    out[(size_t)plen + n] = '\n';
    write_all(dest, out, (size_t)plen + n + 1);
}

/* Emits every complete line; a line longer than the buffer goes out in pieces. */
static void flush_lines(out_stream *s, int at_eof) {
    size_t start = 0, i;
    for (i = 0; i < s->len; i++) {
        if (s->buf[i] != '\n') continue;
        emit_line(s->dest, s->rank, s->buf + start, i - start);
        start = i + 1;
    }
    if (start < s->len && (at_eof || (start == 0 && s->len == sizeof s->buf))) {
        emit_line(s->dest, s->rank, s->buf + start, s->len - start);
        start = s->len;
    }
    memmove(s->buf, s->buf + start, s->len - start);
    s->len -= start;
}

static void close_stream(out_stream *s) {
    if (s->fd < 0) return;
    flush_lines(s, 1);
    close(s->fd);
    s->fd = -1;
}

/* Reads what is available now; closes the stream at end of file. */
static void pump_stream(out_stream *s) {
    for (;;) {
        ssize_t n = read(s->fd, s->buf + s->len, sizeof s->buf - s->len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (n <= 0) { close_stream(s); return; }
        s->len += (size_t)n;
        flush_lines(s, 0);
    }
}

/* ---------------------------------------------------------------------------------------------
   Workers
   --------------------------------------------------------------------------------------------- */

typedef struct worker {
    int rank, local_rank;
    long log_start;      /* byte offset in its log where this attempt began */
    out_stream out, err;
} worker;

typedef struct job {
    const launch_opts *o;
    worker *w;
    int n;               /* workers on this node */
    int attempt;
    int port;
    int world_size;
    int num_threads;     /* MGPU_NUM_THREADS for the workers; 0: inherited from the environment */
    /* the processes (procs[i] is w[i]'s: pid, also its process group id, and wait status) and how
       the group stops: mgpu.h's, shared with the trainer's self-launch */
    mgpu_proc *procs;
    mgpu_proc_group g;
} job;

static void log_path(const job *j, int rank, char *buf, size_t cap) {
    snprintf(buf, cap, "%s/rank-%d.log", j->o->log_dir, rank);
}

/* torchrun's environment of one worker, as "NAME=value" entries in buf (NULL-terminated). */
#define N_WORKER_ENV 16
static void worker_env(const job *j, const worker *w, char buf[N_WORKER_ENV][300], const char *env[N_WORKER_ENV + 1]) {
    const launch_opts *o = j->o;
    const struct { const char *name; long value; } vars[] = {
        {"RANK", w->rank}, {"LOCAL_RANK", w->local_rank}, {"WORLD_SIZE", j->world_size}, {"LOCAL_WORLD_SIZE", j->n},
        {"GROUP_RANK", o->node_rank}, {"GROUP_WORLD_SIZE", o->nnodes}, {"ROLE_RANK", w->rank},
        {"ROLE_WORLD_SIZE", j->world_size}, {"MASTER_PORT", j->port}, {"TORCHELASTIC_RESTART_COUNT", j->attempt},
        {"TORCHELASTIC_MAX_RESTARTS", o->max_restarts},
    };
    int n;
    for (n = 0; n < (int)(sizeof vars / sizeof vars[0]); n++) snprintf(buf[n], sizeof buf[n], "%s=%ld", vars[n].name, vars[n].value);
    snprintf(buf[n++], sizeof buf[0], "MASTER_ADDR=%s", o->master_addr);
    snprintf(buf[n++], sizeof buf[0], "TORCHELASTIC_RUN_ID=%s", o->rdzv_id ? o->rdzv_id : "none");
    if (j->num_threads > 0) snprintf(buf[n++], sizeof buf[0], "MGPU_NUM_THREADS=%d", j->num_threads); /* else inherited */
    env[n] = NULL;
    while (n-- > 0) env[n] = buf[n];
}

/* Where the worker's stdout/stderr go: its log file, or pipes the launcher relays. */
static int open_worker_output(const job *j, worker *w, int *out_fd, int *err_fd) {
    if (j->o->log_dir) {
        char path[PATH_MAX];
        int flags = O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | (j->attempt == 0 ? O_TRUNC : 0);
        int fd;
        log_path(j, w->rank, path, sizeof path);
        fd = open(path, flags, 0644);
        if (fd < 0) {
            say("cannot open the log %s of rank %d: %s", path, w->rank, strerror(errno));
            return -1;
        }
        if (j->attempt > 0) {
            char line[96];
            int n = snprintf(line, sizeof line, "=== mgpurun: restart %d ===\n", j->attempt);
            write_all(fd, line, (size_t)n);
        }
        w->log_start = (long)lseek(fd, 0, SEEK_END);
        *out_fd = *err_fd = fd;
        return 0;
    }
    {
        int po[2], pe[2];
        if (output_pipe(po) != 0) return -1;
        if (output_pipe(pe) != 0) { close(po[0]); close(po[1]); return -1; }
        w->out.fd = po[0]; w->out.dest = 1; w->out.rank = w->rank; w->out.len = 0;
        w->err.fd = pe[0]; w->err.dest = 2; w->err.rank = w->rank; w->err.len = 0;
        *out_fd = po[1];
        *err_fd = pe[1];
        return 0;
    }
}

/* The worker leads its own process group and dies with the launcher (mgpu_spawn). */
static int launch_worker(const job *j, worker *w, mgpu_proc *p) {
    char env_buf[N_WORKER_ENV][300], label[32];
    const char *env[N_WORKER_ENV + 1];
    mgpu_spawn_desc d;
    int out_fd = -1, err_fd = -1, pid = -1;
    mgpu_result r;
    if (open_worker_output(j, w, &out_fd, &err_fd) != 0) return -1;
    worker_env(j, w, env_buf, env);
    snprintf(label, sizeof label, "mgpurun: rank %d", w->rank);
    memset(&d, 0, sizeof d);
    d.argv = j->o->prog_argv;
    d.env = env;
    d.stdout_fd = out_fd;
    d.stderr_fd = err_fd;
    d.label = label;
    r = mgpu_spawn(&d, &pid);
    close(out_fd);
    if (err_fd != out_fd) close(err_fd);
    if (r != MGPU_OK) {
        say("cannot start rank %d: %s", w->rank, mgpu_last_error());
        return -1;
    }
    p->pid = pid;
    p->running = 1;
    return 0;
}

static void drain_signal_pipe(job *j) {
    unsigned char buf[64];
    for (;;) {
        ssize_t n = read(g_signal_fd, buf, sizeof buf);
        ssize_t i;
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return;
        for (i = 0; i < n; i++) mgpu_proc_group_on_signal(&j->g, buf[i]);
    }
}

/* Waits for one event (a signal, worker output, or the kill deadline) and handles it. */
static void poll_once(job *j, struct pollfd *fds, out_stream **streams) {
    int nfds = 1, i, r;
    fds[0].fd = g_signal_fd;
    fds[0].events = POLLIN;
    for (i = 0; i < j->n; i++) {
        out_stream *s2[2];
        int k;
        s2[0] = &j->w[i].out;
        s2[1] = &j->w[i].err;
        for (k = 0; k < 2; k++) {
            if (s2[k]->fd < 0) continue;
            fds[nfds].fd = s2[k]->fd;
            fds[nfds].events = POLLIN;
            streams[nfds] = s2[k];
            nfds++;
        }
    }
    r = poll(fds, (nfds_t)nfds, mgpu_proc_group_timeout_ms(&j->g, -1));
    if (r > 0) {
        if (fds[0].revents) drain_signal_pipe(j);
        for (i = 1; i < nfds; i++)
            if (fds[i].revents) pump_stream(streams[i]);
    }
    mgpu_proc_group_tick(&j->g);
}

/* After every worker ended: what is still buffered in the pipes, then close them. Grandchildren
   may keep a pipe open, so this reads only what is there now instead of waiting for EOF. */
static void drain_outputs(job *j) {
    int i;
    for (i = 0; i < j->n; i++) {
        worker *w = &j->w[i];
        if (w->out.fd >= 0) pump_stream(&w->out);
        if (w->err.fd >= 0) pump_stream(&w->err);
        close_stream(&w->out);
        close_stream(&w->err);
    }
}

/* The last LOG_TAIL_LINES lines this attempt wrote to the failing rank's log, on stderr. */
static void print_log_tail(const job *j, const worker *w) {
    char path[PATH_MAX];
    static char buf[65536];
    size_t i, n;
    log_path(j, w->rank, path, sizeof path);
    n = mgpu_file_tail(path, w->log_start, LOG_TAIL_LINES, buf, sizeof buf);
    say("last lines of %s:", path);
    if (n == 0) { fputs("  | (empty)\n", stderr); return; }
    fputs("  | ", stderr);
    for (i = 0; i < n; i++) {
        fputc(buf[i], stderr);
        if (buf[i] == '\n') fputs("  | ", stderr);
    }
    fputc('\n', stderr);
}

enum attempt_outcome { ATTEMPT_OK, ATTEMPT_FAILED, ATTEMPT_INTERRUPTED, ATTEMPT_LAUNCH_ERROR };

static int start_workers(job *j) {
    int i;
    for (i = 0; i < j->n; i++) {
        if (launch_worker(j, &j->w[i], &j->procs[i]) != 0) return -1;
    }
    return 0;
}

static enum attempt_outcome run_attempt(job *j) {
    const launch_opts *o = j->o;
    struct pollfd *fds = (struct pollfd *)calloc((size_t)(2 * j->n + 1), sizeof *fds);
    out_stream **streams = (out_stream **)calloc((size_t)(2 * j->n + 1), sizeof *streams);
    int i, launch_failed = 0;
    if (!fds || !streams) {
        free(fds);
        free(streams);
        say("out of memory");
        return ATTEMPT_LAUNCH_ERROR;
    }
    mgpu_proc_group_init(&j->g, j->procs, j->n, "mgpurun", o->grace_s);
    for (i = 0; i < j->n; i++) {
        worker *w = &j->w[i];
        memset(w, 0, sizeof *w);
        w->local_rank = i;
        w->rank = j->procs[i].rank = o->node_rank * j->n + i;
        w->out.fd = w->err.fd = -1;
    }
    say("%s %d worker%s (ranks %d to %d of %d), MASTER_ADDR=%s MASTER_PORT=%d%s%s",
        j->attempt == 0 ? "starting" : "restarting", j->n, j->n == 1 ? "" : "s", j->w[0].rank,
        j->w[j->n - 1].rank, j->world_size, o->master_addr, j->port, o->log_dir ? ", logs in " : "",
        o->log_dir ? o->log_dir : "");
    if (start_workers(j) != 0) {
        launch_failed = 1;
        mgpu_proc_group_stop(&j->g, SIGKILL);
    }
    while (mgpu_proc_group_running(&j->g) > 0) {
        mgpu_proc_group_reap(&j->g);
        if (mgpu_proc_group_running(&j->g) == 0) break;
        poll_once(j, fds, streams);
    }
    drain_outputs(j);
    free(fds);
    free(streams);
    if (launch_failed) return ATTEMPT_LAUNCH_ERROR;
    if (j->g.interrupt_sig || j->g.failed >= 0) mgpu_proc_group_signal(&j->g, SIGKILL);   /* leftover grandchildren */
    if (j->g.interrupt_sig) return ATTEMPT_INTERRUPTED;
    if (j->g.failed >= 0) {
        if (o->log_dir) print_log_tail(j, &j->w[j->g.failed]);
        return ATTEMPT_FAILED;
    }
    return ATTEMPT_OK;
}

/* MGPU_NUM_THREADS for the workers: the cores split among them, unless the user chose. */
static int threads_per_worker(int nproc) {
    int t;
    if (getenv("MGPU_NUM_THREADS")) return 0;
    t = mgpu_cpu_count() / nproc;
    return t < 1 ? 1 : t;
}

static void free_job(job *j) {
    free(j->w);
    free(j->procs);
}

static int run_job(const launch_opts *o) {
    job j;
    memset(&j, 0, sizeof j);
    j.o = o;
    j.n = o->nproc;
    j.world_size = o->nnodes * o->nproc;
    j.num_threads = threads_per_worker(o->nproc);
    j.w = (worker *)calloc((size_t)j.n, sizeof *j.w);
    j.procs = (mgpu_proc *)calloc((size_t)j.n, sizeof *j.procs);
    if (!j.w || !j.procs) { say("out of memory"); free_job(&j); return 1; }
    for (j.attempt = 0;; j.attempt++) {
        enum attempt_outcome r;
        const mgpu_proc *failed;
        char how[128];
        int code;
        j.port = o->master_port ? o->master_port : pick_free_port(o->master_addr);
        if (j.port < 0) { free_job(&j); return 1; }
        r = run_attempt(&j);
        if (r == ATTEMPT_OK) { free_job(&j); return 0; }
        if (r == ATTEMPT_LAUNCH_ERROR) { free_job(&j); return 1; }
        if (r == ATTEMPT_INTERRUPTED) {
            say("stopped by %s; all workers ended", mgpu_signal_name(j.g.interrupt_sig));
            code = 128 + j.g.interrupt_sig;
            free_job(&j);
            return code;
        }
        failed = &j.procs[j.g.failed];
        mgpu_wait_status_describe(failed->status, how, sizeof how);
        code = mgpu_wait_status_code(failed->status);
        if (j.attempt < o->max_restarts) {
            say("restarting the group (restart %d of %d) after rank %d %s", j.attempt + 1,
                o->max_restarts, failed->rank, how);
            continue;
        }
        say("job failed: rank %d %s%s; exiting with code %d", failed->rank, how,
            o->max_restarts > 0 ? " and no restarts are left" : "", code);
        free_job(&j);
        return code;
    }
}

/* ---------------------------------------------------------------------------------------------
   --interactive: the questions a launch script asks (one of the seeds ships launch_multi_gpu.sh),
   then the exact command, printed and run (exec), so that what was shown is what runs
   --------------------------------------------------------------------------------------------- */

#define DEFAULT_TRAINER_LR "0.001"   /* mgpu_train_opts_default's --lr */
#define MAX_COMMAND_ARGS 4096

enum run_mode { MODE_DDP = 1, MODE_DP = 2, MODE_SINGLE = 3 };

/* One answer line from stdin, trimmed; -1 at end of input. */
static int read_answer(const char *prompt, char *buf, size_t cap) {
    size_t n;
    char *start;
    fputs(prompt, stdout);
    fflush(stdout);
    if (!fgets(buf, (int)cap, stdin)) return -1;
    n = strlen(buf);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' ')) buf[--n] = '\0';
    for (start = buf; *start == ' '; start++) {}
    memmove(buf, start, strlen(start) + 1);
    return 0;
}

/* Asks until the answer is an integer in [lo, hi] (empty: def); -1 at end of input. */
static int ask_number(const char *prompt, int lo, int hi, int def, int *out) {
    char line[128];
    for (;;) {
        char *end = NULL;
        long v;
        if (read_answer(prompt, line, sizeof line) != 0) return -1;
        if (line[0] == '\0') { *out = def; return 0; }
        v = strtol(line, &end, 10);
        if (*end == '\0' && v >= lo && v <= hi) { *out = (int)v; return 0; }
        printf("  '%s' is not a number from %d to %d; please answer again\n", line, lo, hi);
    }
}

/* The mode by number or by name (ddp, dp, single); -1 at end of input. */
static int ask_mode(enum run_mode *out) {
    char line[128];
    for (;;) {
        if (read_answer("mode? 1 = DDP, 2 = DP, 3 = single [1]: ", line, sizeof line) != 0) return -1;
        if (line[0] == '\0' || strcmp(line, "1") == 0 || strcasecmp(line, "ddp") == 0) { *out = MODE_DDP; return 0; }
        if (strcmp(line, "2") == 0 || strcasecmp(line, "dp") == 0) { *out = MODE_DP; return 0; }
        if (strcmp(line, "3") == 0 || strcasecmp(line, "single") == 0) { *out = MODE_SINGLE; return 0; }
        printf("  '%s' is not a mode; please answer 1 (DDP), 2 (DP) or 3 (single)\n", line);
    }
}

/* y/yes/n/no (empty: def); -1 at end of input. */
static int ask_yes_no(const char *prompt, int def, int *out) {
    char line[128];
    for (;;) {
        if (read_answer(prompt, line, sizeof line) != 0) return -1;
        if (line[0] == '\0') { *out = def; return 0; }
        if (strcasecmp(line, "y") == 0 || strcasecmp(line, "yes") == 0) { *out = 1; return 0; }
        if (strcasecmp(line, "n") == 0 || strcasecmp(line, "no") == 0) { *out = 0; return 0; }
        printf("  '%s' is not yes or no; please answer y or n\n", line);
    }
}

/* "--multi_gpu=dp" is flag "--multi-gpu"? (underscore and --flag=value spellings, as the trainer) */
static int is_flag(const char *arg, const char *flag) {
    size_t i, n = strlen(flag);
    for (i = 0; i < n; i++) {
        char c = (i >= 2 && arg[i] == '_') ? '-' : arg[i];
        if (c != flag[i]) return 0;
    }
    return arg[n] == '\0' || arg[n] == '=';
}

/* The program's --lr (last one wins, as in the trainer), else the trainer's default. */
static const char *program_lr(char **args) {
    const char *lr = DEFAULT_TRAINER_LR;
    int i;
    for (i = 0; args[i]; i++) {
        if (!is_flag(args[i], "--lr")) continue;
        if (strchr(args[i], '=')) lr = strchr(args[i], '=') + 1;
        else if (args[i + 1]) lr = args[++i];
    }
    return lr;
}

typedef struct command { const char *argv[MAX_COMMAND_ARGS]; int n; char storage[4][64]; } command;

static int command_add(command *c, const char *arg) {
    if (c->n + 1 >= MAX_COMMAND_ARGS) { say("--interactive: the command has too many arguments"); return -1; }
    c->argv[c->n++] = arg;
    c->argv[c->n] = NULL;
    return 0;
}

/* PROGRAM ARGS without the flags the chosen mode sets (with their values): --multi-gpu and
   --gpu-ids always, --lr when the scaled value replaces it. */
static int command_add_program(command *c, char **prog, int drop_lr) {
    static const char *const replaced[] = {"--multi-gpu", "--gpu-ids", "--lr"};
    int n_replaced = drop_lr ? 3 : 2, i, k;
    for (i = 0; prog[i]; i++) {
        for (k = 0; k < n_replaced && !is_flag(prog[i], replaced[k]); k++) {}
        if (k < n_replaced) {
            if (!strchr(prog[i], '=') && prog[i + 1]) i++;   /* its value too */
            continue;
        }
        if (command_add(c, prog[i]) != 0) return -1;
    }
    return 0;
}

/* Shell-quoted (only when needed), so the printed line can be pasted into a shell. */
static void print_command(const command *c) {
    int i;
    fputs("command:", stdout);
    for (i = 0; i < c->n; i++) {
        const char *a = c->argv[i], *p;
        int plain = a[0] != '\0';
        for (p = a; *p && plain; p++) plain = strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./:=,@%+-", *p) != NULL;
        if (plain) { printf(" %s", a); continue; }
        fputs(" '", stdout);
        for (p = a; *p; p++) {
            if (*p == '\'') fputs("'\\''", stdout);
            else fputc(*p, stdout);
        }
        fputc('\'', stdout);
    }
    fputc('\n', stdout);
}

/* The command of a mode: DDP through this launcher, DP and single as the program alone. */
static int build_command(command *c, const char *self, char **prog, enum run_mode mode, int n, const char *lr) {
    memset(c, 0, sizeof *c);
    if (mode == MODE_DDP) {
        snprintf(c->storage[0], sizeof c->storage[0], "%d", n);
        if (command_add(c, self) != 0 || command_add(c, "--nproc-per-node") != 0 || command_add(c, c->storage[0]) != 0) return -1;
    }
    if (command_add_program(c, prog, lr != NULL) != 0) return -1;
    if (command_add(c, "--multi-gpu") != 0) return -1;
    if (command_add(c, mode == MODE_DDP ? "ddp" : mode == MODE_DP ? "dp" : "none") != 0) return -1;
    if (mode == MODE_DP) {
        char *ids = c->storage[1];
        size_t used = 0;
        int i;
        for (i = 0; i < n && used + 8 < sizeof c->storage[1]; i++) used += (size_t)snprintf(ids + used, sizeof c->storage[1] - used, "%s%d", i ? "," : "", i);
        if (command_add(c, "--gpu-ids") != 0 || command_add(c, ids) != 0) return -1;
    }
    if (lr && (command_add(c, "--lr") != 0 || command_add(c, lr) != 0)) return -1;
    return 0;
}

/* What this machine offers: GPUs, or else CPU processes (cores). */
static int detect_devices(int *gpus) {
    const char *source = "";
    int cores = mgpu_cpu_count();
    *gpus = count_visible_gpus(&source);
    if (*gpus > 0) {
        printf("found %d GPU%s (from %s)\n", *gpus, *gpus == 1 ? "" : "s", source);
        return *gpus;
    }
    printf("no GPU visible (checked %s); this is a CPU machine with %d core%s: mgpu can train with CPU\n"
           "processes instead (DDP over shared memory, or DP replicas on threads)\n", source, cores, cores == 1 ? "" : "s");
    return cores;
}

/* Asks, prints the command, and runs it in place of this process. */
static int run_interactive(const char *self, char **prog) {
    enum run_mode mode;
    int gpus, avail, n = 1, scale = 0, go = 1;
    const char *unit, *base_lr = program_lr(prog), *lr = NULL;
    char scaled[64], question[256];
    command c;
    avail = detect_devices(&gpus);
    unit = gpus > 0 ? "GPUs" : "CPU processes";
    if (ask_mode(&mode) != 0) goto no_answer;
    if (mode == MODE_DP && gpus == 0) unit = "CPU replicas";
    if (mode != MODE_SINGLE) {
        if (avail < 2) printf("only 1 %s available: using 1\n", gpus > 0 ? "GPU" : "core");
        else {
            snprintf(question, sizeof question, "how many %s? 1 to %d [%d]: ", unit, avail, avail);
            if (ask_number(question, 1, avail, avail, &n) != 0) goto no_answer;
        }
    }
    if (n > 1) {
        /* linear scaling: n processes (or replicas) train on an n times larger global batch */
        snprintf(scaled, sizeof scaled, "%g", strtod(base_lr, NULL) * n);
        snprintf(question, sizeof question, "scale the learning rate with the %dx global batch? --lr %s -> %s [y/N]: ",
                 n, base_lr, scaled);
        if (ask_yes_no(question, 0, &scale) != 0) goto no_answer;
        if (scale) lr = scaled;
    }
    if (build_command(&c, self, prog, mode, n, lr) != 0) return 1;
    print_command(&c);
    if (ask_yes_no("run it? [Y/n]: ", 1, &go) != 0) goto no_answer;
    if (!go) { puts("not started"); return 0; }
    fflush(stdout);
    execvp(c.argv[0], (char *const *)c.argv);
    say("cannot run %s: %s", c.argv[0], strerror(errno));
    return 1;
no_answer:
    puts("");
    say("--interactive: no answer (end of input); nothing started");
    return EXIT_USAGE;
}

/* Pipes must never land on fds 0-2 (dup2 onto itself would keep close-on-exec set). */
static void ensure_std_fds(void) {
    int fd;
    for (fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY) < 0) return;
}

int main(int argc, char **argv) {
    launch_opts o;
    int r;
    ensure_std_fds();
    r = parse_args(&o, argc, argv);
    if (r == 1) return 0;
    if (r != 0) return EXIT_USAGE;
    /* checked once up front: a typo is a usage error, not every rank (and restart) failing with 127 */
    if (!mgpu_program_exists(o.prog_argv[0])) {
        say("PROGRAM %s was not found or is not executable", o.prog_argv[0]);
        return EXIT_USAGE;
    }
    if (o.interactive) return run_interactive(argv[0], o.prog_argv);
    if (o.log_dir && mgpu_make_dirs(o.log_dir) != MGPU_OK) {
        say("cannot create --log-dir %s: %s", o.log_dir, mgpu_last_error());
        return 1;
    }
    if ((g_signal_fd = mgpu_signal_pipe_open(g_caught_signals, (int)(sizeof g_caught_signals / sizeof g_caught_signals[0]))) < 0) {
        say("cannot install signal handlers: %s", strerror(errno));
        return 1;
    }
    return run_job(&o);
}
