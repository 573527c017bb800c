
/* ======================================================================================
   Processes: wait statuses, child processes in groups of their own, signals through a pipe,
   log tails. What the supervisors (tools/mgpurun, mgpu-sweep) share.
   ====================================================================================== */

#include <poll.h>
#include <sched.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

MGPU_API const char *mgpu_signal_name(int sig) {
    static const struct { int sig; const char *name; } table[] = {
        {SIGHUP, "SIGHUP"}, {SIGINT, "SIGINT"}, {SIGQUIT, "SIGQUIT"}, {SIGILL, "SIGILL"},
        {SIGTRAP, "SIGTRAP"}, {SIGABRT, "SIGABRT"}, {SIGBUS, "SIGBUS"}, {SIGFPE, "SIGFPE"},
        {SIGKILL, "SIGKILL"}, {SIGUSR1, "SIGUSR1"}, {SIGSEGV, "SIGSEGV"}, {SIGUSR2, "SIGUSR2"},
        {SIGPIPE, "SIGPIPE"}, {SIGALRM, "SIGALRM"}, {SIGTERM, "SIGTERM"}, {SIGCHLD, "SIGCHLD"},
        {SIGXCPU, "SIGXCPU"}, {SIGXFSZ, "SIGXFSZ"}, {SIGSYS, "SIGSYS"},
    };
    size_t i;
    for (i = 0; i < sizeof table / sizeof table[0]; i++)
        if (table[i].sig == sig) return table[i].name;
    return "unknown signal";
}

MGPU_API void mgpu_wait_status_describe(int status, char *buf, size_t size) {
    if (!buf || size == 0) return;
    if (WIFEXITED(status))
        snprintf(buf, size, "exited with code %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(buf, size, "was killed by signal %d (%s)%s", WTERMSIG(status), mgpu_signal_name(WTERMSIG(status)),
                 WCOREDUMP(status) ? ", core dumped" : "");
    else
        snprintf(buf, size, "ended with wait status %d", status);
}

MGPU_API int mgpu_wait_status_code(int status) {
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return 1;
}

MGPU_API int mgpu_cpu_count(void) {
#ifdef __linux__
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
    {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        return n > 0 ? (int)n : 1;
    }
}

MGPU_API mgpu_result mgpu_make_dirs(const char *path) {
    mgpu_result r;
    if (!path) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_make_dirs: path is NULL");
    if ((r = mgpu__mkdirs(path)) != MGPU_OK) return r;
    if (!mgpu__is_dir(path)) return mgpu__fail(MGPU_ERR_IO, "cannot create directory '%s': a file of that name exists", path);
    return MGPU_OK;
}

MGPU_API int mgpu_program_exists(const char *program) {
    const char *path = getenv("PATH");
    char buf[PATH_MAX];
    if (!program || !program[0]) return 0;
    if (strchr(program, '/')) return access(program, X_OK) == 0;
    if (!path) path = "/usr/bin:/bin";
    while (*path) {
        size_t len = strcspn(path, ":");
        int n = snprintf(buf, sizeof buf, "%.*s%s%s", (int)len, path, len ? "/" : "", program);
        struct stat st;
        if (n > 0 && (size_t)n < sizeof buf && stat(buf, &st) == 0 && S_ISREG(st.st_mode) && access(buf, X_OK) == 0) return 1;
        path += len;
        if (*path == ':') path++;
    }
    return 0;
}

MGPU_API size_t mgpu_file_tail(const char *path, int64_t from, int max_lines, char *buf, size_t size) {
    struct stat st;
    int64_t start;
    size_t n = 0, begin, lines = 0;
    int fd;
    if (!buf || size == 0) return 0;
    buf[0] = 0;
    if (!path || max_lines <= 0 || (fd = open(path, O_RDONLY | O_CLOEXEC)) < 0) return 0;
    if (fstat(fd, &st) == 0 && (int64_t)st.st_size > from) {
        start = MGPU__MAX(from, (int64_t)st.st_size - (int64_t)(size - 1));
        while (n < size - 1) {
            ssize_t got = pread(fd, buf + n, size - 1 - n, (off_t)(start + (int64_t)n));
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) break;
            n += (size_t)got;
        }
        /* the read began mid-line: that piece is not a line of its own */
        if (start > from && start > 0) {
            char before = 0;
            if (pread(fd, &before, 1, (off_t)(start - 1)) == 1 && before != '\n') {
                size_t skip = 0;
                while (skip < n && buf[skip] != '\n') skip++;
                skip = skip < n ? skip + 1 : n;
                memmove(buf, buf + skip, n - skip);
                n -= skip;
            }
        }
    }
    close(fd);
    if (n > 0 && buf[n - 1] == '\n') n--; /* the final newline ends the last line, it starts none */
    for (begin = n; begin > 0; begin--)
        if (buf[begin - 1] == '\n' && ++lines == (size_t)max_lines) break;
    memmove(buf, buf + begin, n - begin);
    n -= begin;
    buf[n] = 0;
    return n;
}

/* --------------------------------------------------------------------------------------
   Child processes
   -------------------------------------------------------------------------------------- */

#ifndef NSIG
#define NSIG 65
#endif

/* The parent's environment with desc->env applied, built before fork (the child must not allocate). */
static char **mgpu__spawn_environment(const char *const *env) {
    char **out;
    size_t n_parent = 0, n_env = 0, k = 0, i, j;
    while (environ && environ[n_parent]) n_parent++;
    while (env[n_env]) n_env++;
    out = (char **)mgpu__alloc((n_parent + n_env + 1) * sizeof *out, "a child's environment");
    if (!out) return NULL;
    for (i = 0; i < n_parent; i++) {
        size_t name_len = strcspn(environ[i], "=");
        int replaced = 0;
        for (j = 0; j < n_env && !replaced; j++)
            replaced = strncmp(env[j], environ[i], name_len) == 0 && (env[j][name_len] == '=' || env[j][name_len] == 0);
        if (!replaced) out[k++] = environ[i];
    }
    for (j = 0; j < n_env; j++)
        if (strchr(env[j], '=')) out[k++] = (char *)env[j];
    out[k] = NULL;
    return out;
}

/* Between fork and exec, in the child: async-signal-safe calls only. */
static void mgpu__spawn_child(const mgpu_spawn_desc *d, char **envp, pid_t parent) {
    sigset_t none;
    int sig, devnull;
    setpgid(0, 0);
#ifdef __linux__
    /* die with the parent; the check closes the race where it died before the prctl */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(1);
#else
    (void)parent;
#endif
    for (sig = 1; sig < NSIG; sig++) {
        struct sigaction sa;
        int caught;
        if (sig == SIGKILL || sig == SIGSTOP || sigaction(sig, NULL, &sa) != 0) continue;
        caught = (sa.sa_flags & SA_SIGINFO) || (sa.sa_handler != SIG_IGN && sa.sa_handler != SIG_DFL);
        if (caught || sig == SIGPIPE) signal(sig, SIG_DFL);
    }
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0 && devnull != 0) { dup2(devnull, 0); close(devnull); }
    if (d->stdout_fd > 0 && d->stdout_fd != 1) dup2(d->stdout_fd, 1);
    if (d->stderr_fd > 0 && d->stderr_fd != 2) dup2(d->stderr_fd, 2);
    if (envp) environ = envp;
    execvp(d->argv[0], d->argv);
    {
        char msg[512];
        int n = snprintf(msg, sizeof msg, "%s: cannot run %s: %s\n", d->label ? d->label : "mgpu", d->argv[0], strerror(errno));
        if (n > 0 && write(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1) < 0) _exit(127);
    }
    _exit(127);
}

MGPU_API mgpu_result mgpu_spawn(const mgpu_spawn_desc *d, int *pid_out) {
    char **envp = NULL;
    sigset_t all, old;
    pid_t parent = getpid(), pid;
    int err;
    if (!d || !d->argv || !d->argv[0] || !pid_out) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_spawn: desc, argv[0] and pid must not be NULL");
    *pid_out = -1;
    if (d->env && !(envp = mgpu__spawn_environment(d->env))) return MGPU_ERR_OOM_HOST;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pid = fork();
    if (pid == 0) mgpu__spawn_child(d, envp, parent);
    err = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    mgpu_free(envp);
    if (pid < 0) return mgpu__fail(MGPU_ERR_IO, "cannot start %s (%s): fork: %s", d->label ? d->label : "a child", d->argv[0], strerror(err));
    setpgid(pid, pid); /* also here, so the group exists before the caller may signal it */
    *pid_out = (int)pid;
    return MGPU_OK;
}

/* The group only: after the leader was reaped its pid may belong to someone else. */
MGPU_API int mgpu_kill_group(int pid, int sig) { return pid > 0 ? kill(-(pid_t)pid, sig) : -1; }

/* --------------------------------------------------------------------------------------
   Signals into a poll loop
   -------------------------------------------------------------------------------------- */

#define MGPU__MAX_PIPED_SIGNALS 16
static int mgpu__sigpipe_fds[2] = {-1, -1};
static int mgpu__sigpipe_n;
static int mgpu__sigpipe_signals[MGPU__MAX_PIPED_SIGNALS + 1];
static struct sigaction mgpu__sigpipe_saved[MGPU__MAX_PIPED_SIGNALS + 1];

static void mgpu__sigpipe_handler(int sig) {
    int saved = errno;
    unsigned char b = (unsigned char)sig;
    ssize_t n = write(mgpu__sigpipe_fds[1], &b, 1); /* a full pipe drops it: one pending byte is enough */
    (void)n;
    errno = saved;
}

static int mgpu__fd_flags(int fd, int nonblock) {
    int fl = fcntl(fd, F_GETFD);
    if (fl < 0 || fcntl(fd, F_SETFD, fl | FD_CLOEXEC) != 0) return -1;
    if (!nonblock) return 0;
    fl = fcntl(fd, F_GETFL);
    return fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0 ? -1 : 0;
}

MGPU_API int mgpu_signal_pipe_open(const int *signals, int n) {
    struct sigaction sa;
    int i;
    if (mgpu__sigpipe_fds[0] >= 0) { mgpu__fail(MGPU_ERR_STATE, "mgpu_signal_pipe_open: a signal pipe is already open"); return -1; }
    if (n < 0 || n > MGPU__MAX_PIPED_SIGNALS || (n > 0 && !signals)) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_signal_pipe_open: 0 to %d signals expected, got %d", MGPU__MAX_PIPED_SIGNALS, n);
        return -1;
    }
    if (pipe(mgpu__sigpipe_fds) != 0 || mgpu__fd_flags(mgpu__sigpipe_fds[0], 1) != 0 || mgpu__fd_flags(mgpu__sigpipe_fds[1], 1) != 0) {
        mgpu__fail(MGPU_ERR_IO, "mgpu_signal_pipe_open: pipe: %s", strerror(errno));
        mgpu_signal_pipe_close();
        return -1;
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = mgpu__sigpipe_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    mgpu__sigpipe_n = 0;
    for (i = 0; i <= n; i++) {
        int sig = i < n ? signals[i] : SIGPIPE;
        struct sigaction *saved = &mgpu__sigpipe_saved[mgpu__sigpipe_n];
        if (sigaction(sig, NULL, saved) != 0) continue;
        if (sig == SIGPIPE) signal(SIGPIPE, SIG_IGN);
        else if (sig == SIGHUP && saved->sa_handler == SIG_IGN) continue; /* nohup: keep ignoring */
        else sigaction(sig, &sa, NULL);
        mgpu__sigpipe_signals[mgpu__sigpipe_n++] = sig;
    }
    return mgpu__sigpipe_fds[0];
}

MGPU_API void mgpu_signal_pipe_close(void) {
    int i;
    for (i = mgpu__sigpipe_n - 1; i >= 0; i--) sigaction(mgpu__sigpipe_signals[i], &mgpu__sigpipe_saved[i], NULL);
    mgpu__sigpipe_n = 0;
    for (i = 0; i < 2; i++) {
        if (mgpu__sigpipe_fds[i] >= 0) close(mgpu__sigpipe_fds[i]);
        mgpu__sigpipe_fds[i] = -1;
    }
}

/* --------------------------------------------------------------------------------------
   A free TCP port, and a local group of workers (the trainer's self-launch)
   -------------------------------------------------------------------------------------- */

MGPU_API int mgpu_pick_free_port(const char *addr) {
    struct addrinfo hints, *res = NULL, *ai;
    int port = -1, rc;
    if (!addr || !addr[0]) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_pick_free_port: addr is NULL or empty"); return -1; }
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if ((rc = getaddrinfo(addr, "0", &hints, &res)) != 0) {
        mgpu__fail(MGPU_ERR_IO, "cannot resolve %s: %s", addr, gai_strerror(rc));
        return -1;
    }
    for (ai = res; ai && port < 0; ai = ai->ai_next) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) continue;
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && getsockname(fd, (struct sockaddr *)&ss, &len) == 0) {
            if (ss.ss_family == AF_INET) port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
            else if (ss.ss_family == AF_INET6) port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
        }
        close(fd);
    }
    freeaddrinfo(res);
    if (port <= 0) { mgpu__fail(MGPU_ERR_IO, "cannot pick a free port on %s (is it an address of this host?)", addr); return -1; }
    return port;
}

/* ---- a group of workers and how it stops (mgpurun's loop and the trainer's self-launch) ---- */

static void mgpu__proc_say(const mgpu_proc_group *g, const char *fmt, ...) MGPU__PRINTF(2, 3);
static void mgpu__proc_say(const mgpu_proc_group *g, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", g->label ? g->label : "mgpu");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

MGPU_API void mgpu_proc_group_init(mgpu_proc_group *g, mgpu_proc *w, int n, const char *label, double grace_s) {
    int i;
    if (!g) return;
    memset(g, 0, sizeof *g);
    g->w = w; g->n = w ? n : 0; g->label = label; g->grace_s = grace_s > 0 ? grace_s : 0; g->failed = -1;
    for (i = 0; i < g->n; i++) { w[i].rank = i; w[i].pid = 0; w[i].running = 0; w[i].status = 0; }
}

MGPU_API int mgpu_proc_group_running(const mgpu_proc_group *g) {
    int i, n = 0;
    for (i = 0; g && i < g->n; i++) n += g->w[i].running;
    return n;
}

/* To every worker's whole process group, ended ones too: what they spawned belongs to the job. */
MGPU_API void mgpu_proc_group_signal(mgpu_proc_group *g, int sig) {
    int i;
    for (i = 0; g && i < g->n; i++)
        if (g->w[i].pid > 0 && mgpu_kill_group(g->w[i].pid, sig) != 0 && g->w[i].running) kill(g->w[i].pid, sig);
}

MGPU_API void mgpu_proc_group_stop(mgpu_proc_group *g, int sig) {
    g->stopping = 1;
    g->kill_at = mgpu_time_s() + g->grace_s;
    mgpu_proc_group_signal(g, sig);
    if (sig == SIGKILL) g->killed = 1;
}

static void mgpu__proc_failed(mgpu_proc_group *g, int i) {
    char how[128];
    int others = mgpu_proc_group_running(g);
    mgpu_wait_status_describe(g->w[i].status, how, sizeof how);
    g->failed = i;
    if (others > 0)
        mgpu__proc_say(g, "rank %d %s [pid %d]; stopping the other %d worker%s (SIGTERM, SIGKILL after %.3g s)", g->w[i].rank, how, g->w[i].pid,
                       others, others == 1 ? "" : "s", g->grace_s);
    else mgpu__proc_say(g, "rank %d %s [pid %d]", g->w[i].rank, how, g->w[i].pid);
    mgpu_proc_group_stop(g, SIGTERM);
}

MGPU_API void mgpu_proc_group_reap(mgpu_proc_group *g) {
    int i;
    for (i = 0; g && i < g->n; i++) {
        mgpu_proc *w = &g->w[i];
        int status = 0, r;
        if (!w->running) continue;
        do r = waitpid(w->pid, &status, WNOHANG); while (r < 0 && errno == EINTR);
        if (r == 0) continue;
        w->running = 0;
        w->status = r > 0 ? status : 0;
        if (r > 0 && !(WIFEXITED(status) && WEXITSTATUS(status) == 0) && !g->stopping) mgpu__proc_failed(g, i);
    }
}

MGPU_API void mgpu_proc_group_on_signal(mgpu_proc_group *g, int sig) {
    int n;
    if (!g || sig == SIGCHLD) return;   /* reaping happens every iteration */
    if (!g->interrupt_sig) g->interrupt_sig = sig;
    if (g->stopping) {
        if (!g->killed) {
            mgpu__proc_say(g, "got %s while stopping: sending SIGKILL now", mgpu_signal_name(sig));
            mgpu_proc_group_stop(g, SIGKILL);
        }
        return;
    }
    n = mgpu_proc_group_running(g);
    mgpu__proc_say(g, "got %s: forwarding it to the %d running worker%s (SIGKILL after %.3g s)", mgpu_signal_name(sig), n, n == 1 ? "" : "s", g->grace_s);
    mgpu_proc_group_stop(g, sig);
}

MGPU_API int mgpu_proc_group_timeout_ms(const mgpu_proc_group *g, int idle_ms) {
    double left;
    if (!g || !g->stopping || g->killed) return idle_ms;
    left = g->kill_at - mgpu_time_s();
    if (left <= 0) return 0;
    return idle_ms >= 0 && idle_ms < (int)(left * 1000.0) + 1 ? idle_ms : (int)(left * 1000.0) + 1;
}

MGPU_API void mgpu_proc_group_tick(mgpu_proc_group *g) {
    int left;
    if (!g || !g->stopping || g->killed || mgpu_time_s() < g->kill_at) return;
    left = mgpu_proc_group_running(g);
    if (left > 0) mgpu__proc_say(g, "%d worker%s still running %.3g s after the stop signal: sending SIGKILL", left, left == 1 ? "" : "s", g->grace_s);
    mgpu_proc_group_stop(g, SIGKILL);
}

/* ---- the trainer's self-launch: one local group, run to its end ---- */

/* worker i's environment (torchrun's variables) as "NAME=value" entries, NULL-terminated */
#define MGPU__GROUP_ENV 8
static void mgpu__group_env(int i, int n, int port, int threads, char buf[MGPU__GROUP_ENV][64], const char *env[MGPU__GROUP_ENV + 1]) {
    int k = 0;
    snprintf(buf[k++], sizeof buf[0], "RANK=%d", i);
    snprintf(buf[k++], sizeof buf[0], "LOCAL_RANK=%d", i);
    snprintf(buf[k++], sizeof buf[0], "WORLD_SIZE=%d", n);
    snprintf(buf[k++], sizeof buf[0], "LOCAL_WORLD_SIZE=%d", n);
    snprintf(buf[k++], sizeof buf[0], "MASTER_ADDR=127.0.0.1");
    snprintf(buf[k++], sizeof buf[0], "MASTER_PORT=%d", port);
    if (threads > 0) snprintf(buf[k++], sizeof buf[0], "MGPU_NUM_THREADS=%d", threads);
    env[k] = NULL;
    while (k-- > 0) env[k] = buf[k];
}

static mgpu_result mgpu__group_start(mgpu_proc_group *g, const mgpu_worker_group_desc *d) {
    char env_buf[MGPU__GROUP_ENV][64], label[96];
    const char *env[MGPU__GROUP_ENV + 1];
    int port = mgpu_pick_free_port("127.0.0.1"), i, devnull = -1;
    int threads = getenv("MGPU_NUM_THREADS") ? 0 : MGPU__MAX(1, mgpu_cpu_count() / d->n);
    mgpu_result r = MGPU_OK;
    if (port < 0) return mgpu_last_result();
    if (d->rank0_stdout_only && (devnull = open("/dev/null", O_WRONLY | O_CLOEXEC)) < 0)
        return mgpu__fail(MGPU_ERR_IO, "cannot open /dev/null: %s", strerror(errno));
    for (i = 0; i < d->n && r == MGPU_OK; i++) {
        mgpu_spawn_desc sd;
        memset(&sd, 0, sizeof sd);
        mgpu__group_env(i, d->n, port, threads, env_buf, env);
        snprintf(label, sizeof label, "%s: rank %d", g->label ? g->label : "mgpu", i);
        sd.argv = d->argv; sd.env = env; sd.label = label;
        sd.stdout_fd = i > 0 && devnull >= 0 ? devnull : 0;
        if ((r = mgpu_spawn(&sd, &g->w[i].pid)) == MGPU_OK) g->w[i].running = 1;
    }
    if (devnull >= 0) close(devnull);
    return r;
}

/* Waits for a signal (SIGCHLD included) or the kill deadline, and handles what came. */
static void mgpu__group_wait_event(mgpu_proc_group *g, int sigfd) {
    struct pollfd p;
    unsigned char buf[64];
    ssize_t n, i;
    p.fd = sigfd; p.events = POLLIN; p.revents = 0;
    if (poll(&p, 1, mgpu_proc_group_timeout_ms(g, 200)) > 0)   /* 200 ms only bounds a lost wakeup */
        while ((n = read(sigfd, buf, sizeof buf)) > 0)
            for (i = 0; i < n; i++) mgpu_proc_group_on_signal(g, buf[i]);
    mgpu_proc_group_tick(g);
}

/* The caller's exit code, and the closing message of a failed run. */
static int mgpu__group_outcome(const mgpu_proc_group *g) {
    char how[128];
    int code;
    if (g->interrupt_sig) {
        mgpu__proc_say(g, "stopped by %s; all workers ended", mgpu_signal_name(g->interrupt_sig));
        return 128 + g->interrupt_sig;
    }
    if (g->failed < 0) return 0;
    mgpu_wait_status_describe(g->w[g->failed].status, how, sizeof how);
    code = mgpu_wait_status_code(g->w[g->failed].status);
    mgpu__proc_say(g, "training failed: rank %d %s; exiting with code %d", g->w[g->failed].rank, how, code);
    return code;
}

MGPU_API int mgpu_worker_group_run(const mgpu_worker_group_desc *d) {
    static const int caught[] = {SIGCHLD, SIGINT, SIGTERM, SIGHUP};
    mgpu_proc_group g;
    mgpu_proc *w;
    mgpu_result r;
    int sigfd, code;
    if (!d || !d->argv || !d->argv[0] || d->n < 1) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_worker_group_run: desc, argv[0] and n >= 1 are required");
        return -1;
    }
    if (!(w = (mgpu_proc *)mgpu__calloc((size_t)d->n * sizeof *w, "the workers"))) return -1;
    mgpu_proc_group_init(&g, w, d->n, d->label, d->grace_s > 0 ? d->grace_s : 5.0);
    if ((sigfd = mgpu_signal_pipe_open(caught, (int)(sizeof caught / sizeof caught[0]))) < 0) { mgpu_free(w); return -1; }
    if ((r = mgpu__group_start(&g, d)) != MGPU_OK) {
        mgpu__proc_say(&g, "cannot start the workers: %s", mgpu_last_error());
        mgpu_proc_group_stop(&g, SIGKILL);
    }
    while (mgpu_proc_group_running(&g) > 0) {
        mgpu_proc_group_reap(&g);
        if (mgpu_proc_group_running(&g) > 0) mgpu__group_wait_event(&g, sigfd);
    }
    if (g.interrupt_sig || g.failed >= 0 || r != MGPU_OK) mgpu_proc_group_signal(&g, SIGKILL);   /* leftover grandchildren */
    mgpu_signal_pipe_close();
    code = r != MGPU_OK ? -1 : mgpu__group_outcome(&g);
    mgpu_free(w);
    if (r != MGPU_OK) mgpu__fail(r, "mgpu_worker_group_run: the workers could not all start");
    return code;
}
