
/* --------------------------------------------------------------------------------------
   Sweep scheduler: one single-threaded poll loop. Signals (SIGCHLD included) arrive through
   the self-pipe; each slot runs one process group at a time; a run's output goes to its own
   log file, so nothing but signals needs watching.
   -------------------------------------------------------------------------------------- */

/* room for the run directory plus a run id and a suffix */
#define MGPU__SWEEP_PATH_MAX (PATH_MAX + MGPU__SWEEP_ID_MAX + 32)

typedef struct mgpu__sweep_slot {
    char devices[32];
    int busy, pid, attempt;
    int stopped;                  /* the sweep sent it SIGTERM (stop or timeout) */
    int timed_out;
    int64_t point;
    double t_start, deadline, kill_at; /* kill_at: SIGKILL due (0: none) */
    int64_t log_start, metrics_start;
    char started_at[32];
    char id[MGPU__SWEEP_ID_MAX];
    char log_path[MGPU__SWEEP_PATH_MAX], metrics_path[MGPU__SWEEP_PATH_MAX];
    const char *values[MGPU__SWEEP_MAX_AXES];
} mgpu__sweep_slot;

typedef struct mgpu__sweep {
    const mgpu_sweep_desc *d;
    const mgpu_sweep_grid *g;
    mgpu_sweep_stats *stats;
    const char *names[MGPU__SWEEP_MAX_AXES + MGPU__SWEEP_N_BUILTINS]; /* the axes, then the built-ins */
    int n_axes, uses_run_dir;
    char run_dir[PATH_MAX], lock_path[PATH_MAX + 8];
    int results_fd, lock_fd, sig_fd;
    int64_t *queue, q_head, q_len;  /* grid points left, in order */
    mgpu__sweep_slot *slots;
    int n_slots;
    int64_t done_before, failed_before, finished_now, failed_now;
    double t0, grace;
    int stop_sig, io_error, tty;
    double t_drawn;
    char threads[16];               /* MGPU_NUM_THREADS for every run; "" to inherit */
} mgpu__sweep;

/* ---- output: event lines, and one progress line (redrawn on a terminal) ---- */

static int mgpu__sweep_running(const mgpu__sweep *sw) {
    int i, n = 0;
    for (i = 0; i < sw->n_slots; i++) n += sw->slots[i].busy;
    return n;
}

static void mgpu__sweep_progress_text(const mgpu__sweep *sw, char *buf, size_t size, int bar) {
    int64_t total = sw->stats->total, done = sw->done_before + sw->finished_now, running = mgpu__sweep_running(sw);
    int64_t left = MGPU__MAX(total - done - running, 0);
    double hours = (mgpu_time_s() - sw->t0) / 3600.0, rate = hours > 0 ? (double)sw->finished_now / hours : 0;
    size_t pos = 0;
    char eta[32];
    if (bar) {
        int i, filled = total ? (int)(20 * done / total) : 0;
        pos += (size_t)snprintf(buf, size, "[");
        for (i = 0; i < 20 && pos + 2 < size; i++) buf[pos++] = i < filled ? '#' : '.';
        pos += (size_t)snprintf(buf + pos, size - pos, "] ");
    }
    pos += (size_t)snprintf(buf + pos, pos < size ? size - pos : 0, "%lld/%lld done, %lld failed, %lld running, %lld left", (long long)done,
                            (long long)total, (long long)(sw->failed_before + sw->failed_now), (long long)running, (long long)left);
    if (pos < size && sw->finished_now > 0) {
        mgpu__format_duration((double)(left + running) / rate * 3600.0, eta, sizeof eta);
        snprintf(buf + pos, size - pos, " | %.1f runs/h | ETA %s", rate, eta);
    }
}

static void mgpu__sweep_draw(mgpu__sweep *sw) {
    char line[256];
    if (sw->d->quiet || !sw->tty) return;
    mgpu__sweep_progress_text(sw, line, sizeof line, 1);
    fprintf(stderr, "\r%s\x1b[K", line);
    fflush(stderr);
    sw->t_drawn = mgpu_time_s();
}

/* An event line; with with_progress, the progress text is added (plain) or redrawn (terminal). */
static void mgpu__sweep_say(mgpu__sweep *sw, int with_progress, const char *fmt, ...) MGPU__PRINTF(3, 4);
static void mgpu__sweep_say(mgpu__sweep *sw, int with_progress, const char *fmt, ...) {
    char msg[1024], progress[256];
    va_list ap;
    if (sw->d->quiet) return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (sw->tty) {
        fprintf(stderr, "\r\x1b[Kmgpu-sweep: %s\n", msg);
        if (with_progress) mgpu__sweep_draw(sw);
    } else if (with_progress) {
        mgpu__sweep_progress_text(sw, progress, sizeof progress, 0);
        fprintf(stderr, "mgpu-sweep: %s [%s]\n", msg, progress);
    } else {
        fprintf(stderr, "mgpu-sweep: %s\n", msg);
    }
    fflush(stderr);
}

/* ---- setup: checks, lock, results file, the runs left ---- */

static mgpu_result mgpu__sweep_check(mgpu__sweep *sw) {
    const mgpu_sweep_desc *d = sw->d;
    const char *values[MGPU__SWEEP_MAX_AXES + MGPU__SWEEP_N_BUILTINS];
    int i, n;
    if (!d->grid || mgpu_sweep_grid_size(d->grid) < 1) return mgpu__fail(MGPU_ERR_INVALID_ARG, "the grid is empty (give at least one --grid NAME=VALUES)");
    if (!d->command || !d->command[0] || !d->command[0][0]) return mgpu__fail(MGPU_ERR_INVALID_ARG, "no command to run (give it after --)");
    if (!d->results || !d->results[0]) return mgpu__fail(MGPU_ERR_INVALID_ARG, "no results file (--results FILE)");
    if (d->cpu_slots < 0 || d->n_gpus < 0 || d->slots_per_gpu < 0 || d->retries < 0 || (d->n_gpus > 0 && !d->gpus))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "slot counts and retries must be >= 0");
    if (d->cpu_slots + d->n_gpus == 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "no slots to run on (give --gpus or --cpu-slots N)");
    for (i = 0; i < d->n_gpus; i++)
        if (!d->gpus[i] || !d->gpus[i][0] || strlen(d->gpus[i]) >= sizeof sw->slots[0].devices)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "GPU %d has an empty or too long CUDA_VISIBLE_DEVICES value", i);
    sw->g = d->grid;
    sw->n_axes = mgpu_sweep_grid_axes(d->grid);
    for (i = 0; i < sw->n_axes; i++) sw->names[i] = mgpu_sweep_grid_name(d->grid, i);
    for (i = 0; i < MGPU__SWEEP_N_BUILTINS; i++) sw->names[sw->n_axes + i] = mgpu__sweep_builtins[i];
    /* every argument substitutes (unknown keys are caught before anything runs) */
    mgpu_sweep_grid_point(d->grid, 0, values);
    for (i = 0; i < MGPU__SWEEP_N_BUILTINS; i++) values[sw->n_axes + i] = "x";
    n = sw->n_axes + MGPU__SWEEP_N_BUILTINS;
    for (i = 0; d->command[i]; i++) {
        char *arg = mgpu_sweep_substitute(d->command[i], n, sw->names, values);
        if (!arg) return MGPU_ERR_INVALID_ARG;
        mgpu_free(arg);
        if (strstr(d->command[i], "{run_dir}")) sw->uses_run_dir = 1;
    }
    if (!strchr(d->command[0], '{') && !mgpu_program_exists(d->command[0]))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "the command '%s' was not found or is not executable", d->command[0]);
    if (d->run_dir) {
        snprintf(sw->run_dir, sizeof sw->run_dir, "%s", d->run_dir);
    } else {
        size_t len = strlen(d->results);
        if (len > 6 && strcmp(d->results + len - 6, ".jsonl") == 0) len -= 6;
        snprintf(sw->run_dir, sizeof sw->run_dir, "%.*s.d", (int)len, d->results);
    }
    snprintf(sw->lock_path, sizeof sw->lock_path, "%s.lock", d->results);
    return MGPU_OK;
}

/* flock on RESULTS.lock, held until the sweep ends (or dies: the kernel drops it). */
static mgpu_result mgpu__sweep_lock(mgpu__sweep *sw) {
    char pid[32] = "";
    ssize_t n;
    const char *slash = strrchr(sw->d->results, '/');
    if (slash && slash != sw->d->results) { /* the results file's folder, like the run directory, is made */
        char dir[PATH_MAX];
        snprintf(dir, sizeof dir, "%.*s", (int)(slash - sw->d->results), sw->d->results);
        if (mgpu_make_dirs(dir) != MGPU_OK) return mgpu__fail(MGPU_ERR_IO, "cannot write the results file '%s': %.400s", sw->d->results, mgpu_last_error());
    }
    sw->lock_fd = open(sw->lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (sw->lock_fd < 0) return mgpu__fail(MGPU_ERR_IO, "cannot create the lock file '%s': %s", sw->lock_path, strerror(errno));
    if (flock(sw->lock_fd, LOCK_EX | LOCK_NB) != 0) {
        int err = errno;
        n = pread(sw->lock_fd, pid, sizeof pid - 1, 0);
        pid[n > 0 ? n : 0] = 0;
        pid[strcspn(pid, "\n")] = 0;
        if (err == EWOULDBLOCK)
            return mgpu__fail(MGPU_ERR_STATE, "another sweep%s%s%s is writing '%s' (it holds '%s'); wait for it to end or stop it first",
                              pid[0] ? " (pid " : "", pid, pid[0] ? ")" : "", sw->d->results, sw->lock_path);
        return mgpu__fail(MGPU_ERR_IO, "cannot lock '%s': %s", sw->lock_path, strerror(err));
    }
    n = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (ftruncate(sw->lock_fd, 0) != 0 || pwrite(sw->lock_fd, pid, (size_t)n, 0) != n) { /* the pid is only for the message */ }
    return MGPU_OK;
}

/* Opens the results file for appending (so an unwritable path fails before any run) and ends a
   torn last line, so the next record starts on a line of its own. */
static mgpu_result mgpu__sweep_open_results(mgpu__sweep *sw) {
    struct stat st;
    char last = '\n';
    sw->results_fd = open(sw->d->results, O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (sw->results_fd < 0) return mgpu__fail(MGPU_ERR_IO, "cannot write the results file '%s': %s", sw->d->results, strerror(errno));
    if (fstat(sw->results_fd, &st) == 0 && st.st_size > 0 && pread(sw->results_fd, &last, 1, st.st_size - 1) == 1 && last != '\n') {
        mgpu_result r;
        mgpu_log(MGPU_LOG_WARN, "sweep: '%s' ends with a torn line (a crash while writing?); it is skipped", sw->d->results);
        if ((r = mgpu__append_fd(sw->results_fd, sw->d->results, "\n", 1)) != MGPU_OK) return r;
    }
    if (mgpu_make_dirs(sw->run_dir) != MGPU_OK) return mgpu__fail(MGPU_ERR_IO, "cannot create the run directory: %.400s", mgpu_last_error());
    if (access(sw->run_dir, W_OK) != 0)
        return mgpu__fail(MGPU_ERR_IO, "cannot write the run directory '%s' (logs and metrics): %s", sw->run_dir, strerror(errno));
    return MGPU_OK;
}

/* The run id of a record in this grid's axis order, or 0 if its params are not exactly the axes. */
static int mgpu__sweep_record_id(const mgpu__sweep *sw, const mgpu_json *rec, char *id, size_t size) {
    char bufs[MGPU__SWEEP_MAX_AXES][128];
    const char *values[MGPU__SWEEP_MAX_AXES];
    const mgpu_json *params = mgpu_json_get(rec, "params");
    int a;
    if (!params || params->count != sw->n_axes) return 0;
    for (a = 0; a < sw->n_axes; a++)
        if (!(values[a] = mgpu_sweep_record_param(rec, sw->names[a], bufs[a], sizeof bufs[a]))) return 0;
    return mgpu_sweep_run_id(sw->n_axes, sw->names, values, id, size) == MGPU_OK;
}

/* "ok", "failed" or anything else: 0, 1, 2. */
static int mgpu__sweep_record_state(const mgpu_json *record) {
    const mgpu_json *st = mgpu_json_get(record, "status");
    if (!st || st->type != MGPU_JSON_STRING) return 2;
    return strcmp(st->string, "ok") == 0 ? 0 : strcmp(st->string, "failed") == 0 ? 1 : 2;
}

/* Finished runs (the latest record of each: "ok", or "failed" unless rerun_failed) are skipped;
   the other points, in grid order, make the queue. */
static mgpu_result mgpu__sweep_plan(mgpu__sweep *sw) {
    mgpu_sweep_results *res = mgpu_sweep_results_load(sw->d->results);
    mgpu__sweep_key *done = NULL;
    int64_t n_done = 0, i, total = mgpu_sweep_grid_size(sw->g);
    char id[MGPU__SWEEP_ID_MAX];
    mgpu_result r = MGPU_OK;
    if (!res) return mgpu_last_result();
    done = (mgpu__sweep_key *)mgpu__calloc((size_t)res->n * sizeof *done + 1, "finished runs");
    sw->queue = (int64_t *)mgpu__alloc((size_t)total * sizeof(int64_t), "the sweep queue");
    if (!done || !sw->queue) r = MGPU_ERR_OOM_HOST;
    for (i = 0; i < res->n && r == MGPU_OK; i++) {
        if (!mgpu__sweep_record_id(sw, res->records[i], id, sizeof id)) continue; /* another grid's run */
        done[n_done].line = i;
        if (!(done[n_done++].key = mgpu__strdup(id))) r = MGPU_ERR_OOM_HOST;
    }
    if (n_done) qsort(done, (size_t)n_done, sizeof *done, mgpu__sweep_cmp_keys);
    sw->stats->total = total;
    for (i = 0; i < total && r == MGPU_OK; i++) {
        const char *values[MGPU__SWEEP_MAX_AXES];
        int64_t lo = 0, hi = n_done;
        int state;
        mgpu_sweep_grid_point(sw->g, i, values);
        mgpu_sweep_run_id(sw->n_axes, sw->names, values, id, sizeof id);
        while (lo < hi) { /* the first entry past this id; the one before it is its latest record */
            int64_t mid = (lo + hi) / 2;
            if (strcmp(done[mid].key, id) <= 0) lo = mid + 1; else hi = mid;
        }
        state = lo > 0 && strcmp(done[lo - 1].key, id) == 0 ? mgpu__sweep_record_state(res->records[done[lo - 1].line]) : 2;
        if (state == 0 || (state == 1 && !sw->d->rerun_failed)) {
            sw->done_before++;
            sw->failed_before += state;
        } else {
            sw->queue[sw->q_len++] = i;
        }
    }
    sw->stats->skipped = sw->done_before;
    sw->stats->skipped_failed = sw->failed_before;
    mgpu__sweep_keys_free(done, n_done);
    mgpu_sweep_results_destroy(res);
    return r;
}

/* ---- one run ---- */

static void mgpu__sweep_info(const mgpu__sweep *sw, const mgpu__sweep_slot *s, mgpu_sweep_run_info *info) {
    memset(info, 0, sizeof *info);
    info->index = s->point; info->id = s->id; info->values = s->values;
    info->slot = (int)(s - sw->slots); info->devices = s->devices;
    info->attempt = s->attempt; info->pid = s->pid;
    info->log_path = s->log_path; info->metrics_path = s->metrics_path;
}

/* The command of a run with every {key} filled in (NULL-terminated; free with mgpu__sweep_free_argv). */
static char **mgpu__sweep_argv(const mgpu__sweep *sw, const mgpu__sweep_slot *s, const char *run_dir) {
    const char *values[MGPU__SWEEP_MAX_AXES + MGPU__SWEEP_N_BUILTINS];
    char slot[16], attempt[16];
    int n = 0, i;
    char **argv;
    while (sw->d->command[n]) n++;
    if (!(argv = (char **)mgpu__calloc((size_t)(n + 1) * sizeof *argv, "a command line"))) return NULL;
    snprintf(slot, sizeof slot, "%d", (int)(s - sw->slots));
    snprintf(attempt, sizeof attempt, "%d", s->attempt);
    for (i = 0; i < sw->n_axes; i++) values[i] = s->values[i];
    values[sw->n_axes + 0] = s->metrics_path; /* order of mgpu__sweep_builtins */
    values[sw->n_axes + 1] = s->log_path;
    values[sw->n_axes + 2] = s->id;
    values[sw->n_axes + 3] = run_dir;
    values[sw->n_axes + 4] = slot;
    values[sw->n_axes + 5] = attempt;
    for (i = 0; i < n; i++) {
        if (!(argv[i] = mgpu_sweep_substitute(sw->d->command[i], sw->n_axes + MGPU__SWEEP_N_BUILTINS, sw->names, values))) {
            while (i > 0) mgpu_free(argv[--i]);
            mgpu_free(argv);
            return NULL;
        }
    }
    return argv;
}

static void mgpu__sweep_free_argv(char **argv) {
    int i;
    for (i = 0; argv && argv[i]; i++) mgpu_free(argv[i]);
    mgpu_free(argv);
}

/* The command as a shell would read it back (for logs and --dry-run). */
static void mgpu__sweep_quote_argv(char *const *argv, mgpu__buf *b) {
    int i;
    for (i = 0; argv[i]; i++) {
        const char *a = argv[i];
        if (i) mgpu__buf_puts(b, " ");
        if (a[0] && !a[strspn(a, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+-=.,/:@%")]) { mgpu__buf_puts(b, a); continue; }
        mgpu__buf_puts(b, "'");
        for (; *a; a++) {
            if (*a == '\'') mgpu__buf_puts(b, "'\\''");
            else mgpu__buf_append(b, a, 1);
        }
        mgpu__buf_puts(b, "'");
    }
}

static void mgpu__sweep_set_paths(const mgpu__sweep *sw, mgpu__sweep_slot *s, int64_t point) {
    s->point = point;
    mgpu_sweep_grid_point(sw->g, point, s->values);
    mgpu_sweep_run_id(sw->n_axes, sw->names, s->values, s->id, sizeof s->id);
    snprintf(s->log_path, sizeof s->log_path, "%s/%s.log", sw->run_dir, s->id);
    snprintf(s->metrics_path, sizeof s->metrics_path, "%s/%s.metrics.jsonl", sw->run_dir, s->id);
}

/* The run's log (appended: attempts and resumed runs keep what came before), headed by the command. */
static int mgpu__sweep_open_log(mgpu__sweep_slot *s, int slot, char *const *argv) {
    mgpu__buf head;
    time_t now = time(NULL);
    struct tm tm;
    int fd = open(s->log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
        mgpu__fail(MGPU_ERR_IO, "cannot open the log '%s': %s", s->log_path, strerror(errno));
        return -1;
    }
    gmtime_r(&now, &tm);
    strftime(s->started_at, sizeof s->started_at, "%Y-%m-%dT%H:%M:%SZ", &tm);
    mgpu__buf_init(&head);
    mgpu__buf_printf(&head, "=== mgpu-sweep: run %s, attempt %d, slot %d (CUDA_VISIBLE_DEVICES=%s), %s ===\n$ ", s->id, s->attempt, slot,
                     s->devices, s->started_at);
    mgpu__sweep_quote_argv(argv, &head);
    mgpu__buf_puts(&head, "\n");
    if (!head.failed && write(fd, head.data, head.len) < 0) { /* a log header is not worth failing the run */ }
    mgpu__buf_free(&head);
    s->log_start = (int64_t)lseek(fd, 0, SEEK_END);
    return fd;
}

static void mgpu__sweep_finish(mgpu__sweep *sw, mgpu__sweep_slot *s, int wait_status, const char *error);

static void mgpu__sweep_launch(mgpu__sweep *sw, mgpu__sweep_slot *s, int64_t point, int attempt) {
    char run_dir[MGPU__SWEEP_PATH_MAX], e_cvd[64], e_id[MGPU__SWEEP_ID_MAX + 32], e_metrics[MGPU__SWEEP_PATH_MAX + 16], e_slot[32], e_attempt[32], e_threads[48];
    const char *env[8];
    char **argv = NULL;
    mgpu_spawn_desc sd;
    struct stat st;
    int slot = (int)(s - sw->slots), log_fd = -1, n_env = 0;
    mgpu_sweep_run_info info;
    s->busy = 1; s->attempt = attempt; s->pid = -1;
    s->stopped = s->timed_out = 0;
    s->kill_at = 0;
    s->t_start = mgpu_time_s();
    s->deadline = sw->d->run_timeout_s > 0 ? s->t_start + sw->d->run_timeout_s : 0;
    mgpu__sweep_set_paths(sw, s, point);
    snprintf(run_dir, sizeof run_dir, "%s/%s", sw->run_dir, s->id);
    s->metrics_start = stat(s->metrics_path, &st) == 0 ? (int64_t)st.st_size : 0;
    if (!(argv = mgpu__sweep_argv(sw, s, run_dir)) || (sw->uses_run_dir && mgpu_make_dirs(run_dir) != MGPU_OK) ||
        (log_fd = mgpu__sweep_open_log(s, slot, argv)) < 0) {
        mgpu__sweep_free_argv(argv);
        mgpu__sweep_finish(sw, s, -1, mgpu_last_error());
        return;
    }
    snprintf(e_cvd, sizeof e_cvd, "CUDA_VISIBLE_DEVICES=%s", s->devices);
    snprintf(e_id, sizeof e_id, "MGPU_SWEEP_RUN_ID=%s", s->id);
    snprintf(e_metrics, sizeof e_metrics, "MGPU_METRICS=%s", s->metrics_path);
    snprintf(e_slot, sizeof e_slot, "MGPU_SWEEP_SLOT=%d", slot);
    snprintf(e_attempt, sizeof e_attempt, "MGPU_SWEEP_ATTEMPT=%d", attempt);
    env[n_env++] = e_cvd; env[n_env++] = e_id; env[n_env++] = e_metrics; env[n_env++] = e_slot; env[n_env++] = e_attempt;
    if (sw->threads[0]) {
        snprintf(e_threads, sizeof e_threads, "MGPU_NUM_THREADS=%s", sw->threads);
        env[n_env++] = e_threads;
    }
    /* GPU indices are nvidia-smi's (PCI bus order); CUDA's default order is fastest first */
    if (s->devices[0] && !getenv("CUDA_DEVICE_ORDER")) env[n_env++] = "CUDA_DEVICE_ORDER=PCI_BUS_ID";
    env[n_env] = NULL;
    memset(&sd, 0, sizeof sd);
    sd.argv = argv;
    sd.env = env;
    sd.stdout_fd = sd.stderr_fd = log_fd;
    sd.label = "mgpu-sweep";
    if (mgpu_spawn(&sd, &s->pid) != MGPU_OK) {
        close(log_fd);
        mgpu__sweep_free_argv(argv);
        mgpu__sweep_finish(sw, s, -1, mgpu_last_error());
        return;
    }
    close(log_fd);
    mgpu__sweep_free_argv(argv);
    if (sw->d->on_start) {
        mgpu__sweep_info(sw, s, &info);
        sw->d->on_start(&info, sw->d->user);
    }
}

/* The last {"event":"final",...} line the run wrote to its metrics file in this attempt, or NULL. */
static char *mgpu__sweep_final_line(const char *path, int64_t from) {
    char *text = NULL, *found = NULL;
    size_t len = 0, start;
    struct stat st;
    if (stat(path, &st) != 0 || (int64_t)st.st_size <= from || mgpu_read_file(path, (void **)&text, &len) != MGPU_OK) return NULL;
    for (start = (size_t)MGPU__MIN((int64_t)len, from); start < len;) {
        size_t end = start;
        while (end < len && text[end] != '\n') end++;
        if (end > start && memmem(text + start, end - start, "\"final\"", 7)) {
            mgpu_json *j = mgpu_json_parse(text + start, end - start, path);
            const mgpu_json *ev = mgpu_json_get(j, "event");
            if (j && j->type == MGPU_JSON_OBJECT && ev && ev->type == MGPU_JSON_STRING && strcmp(ev->string, "final") == 0) {
                mgpu_free(found);
                if ((found = (char *)mgpu__alloc(end - start + 1, "a metrics line")) != NULL) {
                    memcpy(found, text + start, end - start);
                    found[end - start] = 0;
                }
            }
            mgpu_json_free(j);
        }
        start = end + 1;
    }
    mgpu_free(text);
    return found;
}

/* Bytes that are not UTF-8 (binary output, a character cut by the tail) become '?', so the
   record stays JSON that strict readers accept. */
static void mgpu__utf8_repair(char *s) {
    size_t n = strlen(s), i = 0;
    while (i < n) {
        size_t k = mgpu__utf8_seq_len((const unsigned char *)s + i, n - i);
        if (!k) { s[i] = '?'; k = 1; }
        i += k;
    }
}

static void mgpu__sweep_record(const mgpu__sweep *sw, const mgpu__sweep_slot *s, mgpu__buf *b, const char *status, int wait_status,
                               double wall_s, const char *final_line, const char *error) {
    int a;
    mgpu__buf_puts(b, "{\"run_id\":");
    mgpu__buf_json_string(b, s->id);
    mgpu__buf_puts(b, ",\"params\":{");
    for (a = 0; a < sw->n_axes; a++) {
        if (a) mgpu__buf_puts(b, ",");
        mgpu__buf_json_string(b, sw->names[a]);
        mgpu__buf_puts(b, ":");
        mgpu__buf_json_param(b, s->values[a]);
    }
    mgpu__buf_printf(b, "},\"status\":\"%s\",\"exit_code\":", status);
    if (wait_status != -1 && WIFEXITED(wait_status)) mgpu__buf_printf(b, "%d", WEXITSTATUS(wait_status));
    else mgpu__buf_puts(b, "null");
    mgpu__buf_puts(b, ",\"signal\":");
    if (wait_status != -1 && WIFSIGNALED(wait_status)) mgpu__buf_printf(b, "\"%s\"", mgpu_signal_name(WTERMSIG(wait_status)));
    else mgpu__buf_puts(b, "null");
    mgpu__buf_puts(b, ",\"error\":");
    if (error) mgpu__buf_json_string(b, error);
    else mgpu__buf_puts(b, "null");
    mgpu__buf_printf(b, ",\"attempts\":%d", s->attempt);
    mgpu__buf_json_member_number(b, "wall_s", floor(wall_s * 1000.0 + 0.5) / 1000.0);
    mgpu__buf_printf(b, ",\"slot\":%d,\"devices\":", (int)(s - sw->slots));
    mgpu__buf_json_string(b, s->devices);
    mgpu__buf_printf(b, ",\"started_at\":\"%s\",\"log\":", s->started_at);
    mgpu__buf_json_string(b, s->log_path);
    mgpu__buf_puts(b, ",\"metrics\":");
    mgpu__buf_json_string(b, s->metrics_path);
    mgpu__buf_puts(b, ",\"final\":");
    mgpu__buf_puts(b, final_line ? final_line : "null");
    if (strcmp(status, "failed") == 0) {
        char tail[MGPU__SWEEP_TAIL_BYTES];
        mgpu_file_tail(s->log_path, s->log_start, sw->d->tail_lines > 0 ? sw->d->tail_lines : 20, tail, sizeof tail);
        mgpu__utf8_repair(tail);
        mgpu__buf_puts(b, ",\"log_tail\":");
        mgpu__buf_json_string(b, tail);
    }
    mgpu__buf_puts(b, "}\n");
}

/* A run ended (wait_status -1: it never started; error says why). Records it, or starts it again
   while --retries allow. */
static void mgpu__sweep_finish(mgpu__sweep *sw, mgpu__sweep_slot *s, int wait_status, const char *error) {
    double wall = mgpu_time_s() - s->t_start;
    char *final_line = mgpu__sweep_final_line(s->metrics_path, s->metrics_start), how[160];
    int ok = wait_status != -1 && WIFEXITED(wait_status) && WEXITSTATUS(wait_status) == 0;
    mgpu_sweep_status status;
    mgpu_sweep_run_info info;
    mgpu__buf line;
    /* a run the sweep stopped is interrupted, whatever it exits with, unless it did finish */
    if (s->stopped && !s->timed_out) status = ok && final_line ? MGPU_SWEEP_OK : MGPU_SWEEP_INTERRUPTED;
    else status = ok ? MGPU_SWEEP_OK : MGPU_SWEEP_FAILED;
    if (error) snprintf(how, sizeof how, "%s", error);
    else if (s->timed_out) snprintf(how, sizeof how, "timed out after %g s", sw->d->run_timeout_s);
    else if (status == MGPU_SWEEP_INTERRUPTED) snprintf(how, sizeof how, "stopped by %s to the sweep", mgpu_signal_name(sw->stop_sig));
    else mgpu_wait_status_describe(wait_status, how, sizeof how);
    mgpu__sweep_info(sw, s, &info);
    info.status = status;
    info.exit_code = wait_status != -1 && WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : -1;
    info.signal = wait_status != -1 && WIFSIGNALED(wait_status) ? WTERMSIG(wait_status) : 0;
    info.wall_s = wall;
    s->busy = 0;
    if (status == MGPU_SWEEP_FAILED && s->attempt <= sw->d->retries && !sw->stop_sig) {
        mgpu__sweep_say(sw, 0, "%s %s after %.1f s; retrying (attempt %d of %d); log %s", s->id, how, wall, s->attempt + 1,
                        sw->d->retries + 1, s->log_path);
        mgpu_free(final_line);
        if (sw->d->on_finish) sw->d->on_finish(&info, sw->d->user);
        mgpu__sweep_launch(sw, s, s->point, s->attempt + 1);
        return;
    }
    mgpu__buf_init(&line);
    mgpu__sweep_record(sw, s, &line, status == MGPU_SWEEP_OK ? "ok" : status == MGPU_SWEEP_FAILED ? "failed" : "interrupted",
                       wait_status, wall, final_line, status == MGPU_SWEEP_OK ? NULL : how);
    mgpu_free(final_line);
    if (line.failed || mgpu__append_fd(sw->results_fd, sw->d->results, line.data, line.len) != MGPU_OK) {
        if (!sw->io_error) mgpu__sweep_say(sw, 0, "cannot record %s, stopping the sweep: %s", s->id, line.failed ? "out of memory" : mgpu_last_error());
        sw->io_error = 1;
    }
    if (status == MGPU_SWEEP_INTERRUPTED) {
        sw->stats->interrupted++;
    } else {
        sw->finished_now++;
        if (status == MGPU_SWEEP_OK) sw->stats->ok++;
        else { sw->stats->failed++; sw->failed_now++; }
    }
    if (status == MGPU_SWEEP_OK && sw->tty) mgpu__sweep_draw(sw); /* on a terminal the bar alone tells */
    else if (status == MGPU_SWEEP_OK) mgpu__sweep_say(sw, 1, "ok %s in %.1f s", s->id, wall);
    else if (status == MGPU_SWEEP_FAILED) mgpu__sweep_say(sw, 1, "FAILED %s: %s after %.1f s; log %s", s->id, how, wall, s->log_path);
    else mgpu__sweep_say(sw, 0, "interrupted %s after %.1f s (it runs again on resume)", s->id, wall);
    info.record = line.data;
    if (sw->d->on_finish) sw->d->on_finish(&info, sw->d->user);
    mgpu__buf_free(&line);
}

/* ---- the loop ---- */

static void mgpu__sweep_fill(mgpu__sweep *sw) {
    int i;
    for (i = 0; i < sw->n_slots && sw->q_len > 0 && !sw->stop_sig && !sw->io_error; i++) {
        if (sw->slots[i].busy) continue;
        sw->q_len--;
        mgpu__sweep_launch(sw, &sw->slots[i], sw->queue[sw->q_head++], 1);
    }
}

static void mgpu__sweep_reap(mgpu__sweep *sw) {
    int i;
    for (i = 0; i < sw->n_slots; i++) {
        mgpu__sweep_slot *s = &sw->slots[i];
        int status = 0, pid = s->pid;
        pid_t r;
        if (!s->busy || pid <= 0) continue;
        do r = waitpid((pid_t)pid, &status, WNOHANG); while (r < 0 && errno == EINTR);
        if (r == 0) continue;
        mgpu_kill_group(pid, SIGKILL); /* whatever the run left behind in its group */
        if (r < 0) mgpu__sweep_finish(sw, s, -1, "its process was reaped elsewhere (is SIGCHLD ignored?)");
        else mgpu__sweep_finish(sw, s, status, NULL);
    }
}

static void mgpu__sweep_stop_slot(mgpu__sweep *sw, mgpu__sweep_slot *s, double now) {
    if (!s->busy || s->stopped) return;
    s->stopped = 1;
    s->kill_at = now + sw->grace;
    mgpu_kill_group(s->pid, SIGTERM);
}

static void mgpu__sweep_on_signal(mgpu__sweep *sw, int sig) {
    int i, running = mgpu__sweep_running(sw);
    if (sig == SIGCHLD) return;
    if (!sw->stop_sig) {
        sw->stop_sig = sig;
        mgpu__sweep_say(sw, 0, "got %s: stopping %d running run%s (SIGTERM, SIGKILL after %g s); they run again on resume", mgpu_signal_name(sig),
                        running, running == 1 ? "" : "s", sw->grace);
        for (i = 0; i < sw->n_slots; i++) mgpu__sweep_stop_slot(sw, &sw->slots[i], mgpu_time_s());
        return;
    }
    mgpu__sweep_say(sw, 0, "got %s again: killing the %d run%s left now", mgpu_signal_name(sig), running, running == 1 ? "" : "s");
    for (i = 0; i < sw->n_slots; i++)
        if (sw->slots[i].busy) { mgpu_kill_group(sw->slots[i].pid, SIGKILL); sw->slots[i].kill_at = 0; }
}

/* Timeouts and SIGKILL deadlines due now; returns the milliseconds until the next one (-1: none). */
static int mgpu__sweep_timers(mgpu__sweep *sw) {
    double now = mgpu_time_s(), next = -1;
    int i;
    for (i = 0; i < sw->n_slots; i++) {
        mgpu__sweep_slot *s = &sw->slots[i];
        if (!s->busy) continue;
        if (s->deadline > 0 && !s->stopped && now >= s->deadline) {
            s->timed_out = 1;
            mgpu__sweep_stop_slot(sw, s, now);
        }
        if (s->kill_at > 0 && now >= s->kill_at) {
            mgpu_kill_group(s->pid, SIGKILL);
            s->kill_at = 0;
        }
        if (s->deadline > 0 && !s->stopped && (next < 0 || s->deadline < next)) next = s->deadline;
        if (s->kill_at > 0 && (next < 0 || s->kill_at < next)) next = s->kill_at;
    }
    if (sw->tty && !sw->d->quiet && (next < 0 || next > now + 1.0)) next = now + 1.0; /* redraw: ETA and rate move */
    return next < 0 ? -1 : (int)((next - now) * 1000.0) + 1;
}

static void mgpu__sweep_wait(mgpu__sweep *sw, int timeout_ms) {
    struct pollfd pfd;
    unsigned char buf[64];
    ssize_t n, i;
    pfd.fd = sw->sig_fd;
    pfd.events = POLLIN;
    pfd.revents = 0;
    if (poll(&pfd, 1, timeout_ms) <= 0) return;
    while ((n = read(sw->sig_fd, buf, sizeof buf)) > 0)
        for (i = 0; i < n; i++) mgpu__sweep_on_signal(sw, buf[i]);
}

static void mgpu__sweep_dry_run(mgpu__sweep *sw) {
    int64_t k;
    mgpu__sweep_slot s;
    memset(&s, 0, sizeof s);
    s.attempt = 1;
    for (k = 0; k < sw->q_len; k++) {
        char run_dir[MGPU__SWEEP_PATH_MAX], **argv;
        mgpu__buf b;
        mgpu__sweep_set_paths(sw, &s, sw->queue[k]);
        snprintf(run_dir, sizeof run_dir, "%s/%s", sw->run_dir, s.id);
        if (!(argv = mgpu__sweep_argv(sw, &s, run_dir))) return;
        mgpu__buf_init(&b);
        mgpu__sweep_quote_argv(argv, &b);
        printf("%s: %s\n", s.id, b.failed ? "(out of memory)" : b.data);
        mgpu__buf_free(&b);
        mgpu__sweep_free_argv(argv);
    }
    fflush(stdout);
}

static mgpu_result mgpu__sweep_setup(mgpu__sweep *sw) {
    const mgpu_sweep_desc *d = sw->d;
    int i, k;
    mgpu_result r;
    if ((r = mgpu__sweep_check(sw)) != MGPU_OK) return r;
    sw->n_slots = d->cpu_slots + d->n_gpus * (d->slots_per_gpu > 0 ? d->slots_per_gpu : 1);
    if (!(sw->slots = (mgpu__sweep_slot *)mgpu__calloc((size_t)sw->n_slots * sizeof *sw->slots, "sweep slots"))) return MGPU_ERR_OOM_HOST;
    /* GPU slots first, interleaved over the GPUs (slot 0 on GPU 0, slot 1 on GPU 1, ...) */
    for (i = 0, k = 0; k < d->n_gpus * (d->slots_per_gpu > 0 ? d->slots_per_gpu : 1); k++, i++)
        snprintf(sw->slots[i].devices, sizeof sw->slots[i].devices, "%s", d->gpus[k % d->n_gpus]);
    if (d->num_threads > 0) snprintf(sw->threads, sizeof sw->threads, "%d", d->num_threads);
    else if (!getenv("MGPU_NUM_THREADS")) snprintf(sw->threads, sizeof sw->threads, "%d", MGPU__MAX(1, mgpu_cpu_count() / sw->n_slots));
    if (d->dry_run) return mgpu__sweep_plan(sw);
    if ((r = mgpu__sweep_lock(sw)) != MGPU_OK || (r = mgpu__sweep_open_results(sw)) != MGPU_OK) return r;
    return mgpu__sweep_plan(sw);
}

static void mgpu__sweep_teardown(mgpu__sweep *sw) {
    if (sw->sig_fd >= 0) mgpu_signal_pipe_close();
    if (sw->results_fd >= 0) close(sw->results_fd);
    if (sw->lock_fd >= 0) close(sw->lock_fd); /* releases the flock */
    mgpu_free(sw->slots);
    mgpu_free(sw->queue);
}

MGPU_API mgpu_result mgpu_sweep_run(const mgpu_sweep_desc *desc, mgpu_sweep_stats *stats) {
    static const int stop_signals[] = {SIGCHLD, SIGINT, SIGTERM, SIGHUP};
    mgpu__sweep sw;
    mgpu_sweep_stats local;
    mgpu_result r;
    char took[32];
    if (!desc) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_sweep_run: desc is NULL");
    memset(&sw, 0, sizeof sw);
    sw.d = desc;
    sw.stats = stats ? stats : &local;
    memset(sw.stats, 0, sizeof *sw.stats);
    sw.results_fd = sw.lock_fd = sw.sig_fd = -1;
    sw.grace = desc->grace_s > 0 ? desc->grace_s : 5.0;
    sw.tty = isatty(STDERR_FILENO);
    if ((r = mgpu__sweep_setup(&sw)) != MGPU_OK || desc->dry_run) {
        if (r == MGPU_OK) mgpu__sweep_dry_run(&sw);
        mgpu__sweep_teardown(&sw);
        return r;
    }
    /* SIGCHLD alone when the caller keeps its signals: it still wakes the loop */
    if ((sw.sig_fd = mgpu_signal_pipe_open(stop_signals, desc->no_signal_handlers ? 1 : 4)) < 0) {
        r = mgpu_last_result();
        mgpu__sweep_teardown(&sw);
        return r;
    }
    sw.t0 = mgpu_time_s();
    mgpu__sweep_say(&sw, 0, "%lld runs in the grid, %lld already in %s, %lld to run on %d slot%s; logs in %s/", (long long)sw.stats->total,
                    (long long)sw.done_before, desc->results, (long long)sw.q_len, sw.n_slots, sw.n_slots == 1 ? "" : "s", sw.run_dir);
    for (;;) {
        int timeout_ms;
        mgpu__sweep_fill(&sw);
        mgpu__sweep_reap(&sw);
        if (mgpu__sweep_running(&sw) == 0) {
            if (sw.stop_sig || sw.io_error || sw.q_len == 0) break;
            continue;
        }
        timeout_ms = mgpu__sweep_timers(&sw);
        mgpu__sweep_wait(&sw, timeout_ms);
        if (sw.tty && mgpu_time_s() - sw.t_drawn >= 1.0) mgpu__sweep_draw(&sw);
    }
    mgpu__format_duration(mgpu_time_s() - sw.t0, took, sizeof took);
    if (sw.stop_sig) {
        sw.stats->stop_signal = sw.stop_sig;
        mgpu__sweep_say(&sw, 0, "stopped by %s after %s: %lld ok, %lld failed, %lld interrupted, %lld not started; run the same command to resume",
                        mgpu_signal_name(sw.stop_sig), took, (long long)sw.stats->ok, (long long)sw.stats->failed,
                        (long long)sw.stats->interrupted, (long long)sw.q_len);
    } else {
        mgpu__sweep_say(&sw, 0, "done in %s: %lld ok, %lld failed (%lld run%s finished before); results in %s", took, (long long)sw.stats->ok,
                        (long long)sw.stats->failed, (long long)sw.done_before, sw.done_before == 1 ? "" : "s", desc->results);
    }
    r = sw.io_error ? MGPU_ERR_IO : MGPU_OK;
    mgpu__sweep_teardown(&sw);
    return r;
}
