
/* ======================================================================================
   Sweeps: a grid of independent runs spread over device slots, one process per slot, each
   finished run appended to a results JSONL that makes the sweep resumable
   ====================================================================================== */

#include <sys/file.h>

#define MGPU__SWEEP_MAX_AXES 32
#define MGPU__SWEEP_MAX_VALUES 1000000
#define MGPU__SWEEP_MAX_POINTS 10000000
#define MGPU__SWEEP_ID_MAX 160
#define MGPU__SWEEP_TAIL_BYTES 4096

/* Names every command template knows besides the grid axes (reserved: no axis may take them). */
static const char *const mgpu__sweep_builtins[] = {"metrics", "log", "run_id", "run_dir", "slot", "attempt"};
#define MGPU__SWEEP_N_BUILTINS 6

/* --------------------------------------------------------------------------------------
   Grid
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__sweep_axis { char *name; int n, cap; char **values; } mgpu__sweep_axis;
struct mgpu_sweep_grid { int n_axes; int64_t size; mgpu__sweep_axis axes[MGPU__SWEEP_MAX_AXES]; };

static int mgpu__is_name_start(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }

/* A C identifier of at most 64 characters. */
static int mgpu__sweep_name_ok(const char *s, size_t n) {
    size_t i;
    if (n == 0 || n > 64 || !mgpu__is_name_start(s[0])) return 0;
    for (i = 1; i < n; i++)
        if (!mgpu__is_name_start(s[i]) && !mgpu__is_digit(s[i])) return 0;
    return 1;
}

static int mgpu__sweep_builtin_index(const char *s, size_t n) {
    int i;
    for (i = 0; i < MGPU__SWEEP_N_BUILTINS; i++)
        if (strlen(mgpu__sweep_builtins[i]) == n && strncmp(mgpu__sweep_builtins[i], s, n) == 0) return i;
    return -1;
}

MGPU_API mgpu_sweep_grid *mgpu_sweep_grid_create(void) {
    return (mgpu_sweep_grid *)mgpu__calloc(sizeof(mgpu_sweep_grid), "a sweep grid");
}

static void mgpu__sweep_axis_free(mgpu__sweep_axis *a) {
    int i;
    for (i = 0; i < a->n; i++) mgpu_free(a->values[i]);
    mgpu_free(a->values);
    mgpu_free(a->name);
    memset(a, 0, sizeof *a);
}

MGPU_API void mgpu_sweep_grid_destroy(mgpu_sweep_grid *g) {
    int i;
    if (!g) return;
    for (i = 0; i < g->n_axes; i++) mgpu__sweep_axis_free(&g->axes[i]);
    mgpu_free(g);
}

static int mgpu__sweep_axis_push(mgpu__sweep_axis *a, const char *v, size_t n) {
    char *copy;
    if (a->n == a->cap) {
        int cap = a->cap ? 2 * a->cap : 16;
        char **grown = (char **)mgpu__alloc((size_t)cap * sizeof *grown, "grid values");
        if (!grown) return 0;
        if (a->n) memcpy(grown, a->values, (size_t)a->n * sizeof *grown);
        mgpu_free(a->values);
        a->values = grown; a->cap = cap;
    }
    if (!(copy = (char *)mgpu__alloc(n + 1, "a grid value"))) return 0;
    memcpy(copy, v, n);
    copy[n] = 0;
    a->values[a->n++] = copy;
    return 1;
}

/* "lo..hi" or "lo..hi:step" (integers) into lo, hi, step; 0 if item is not such a range. */
static int mgpu__sweep_parse_range(const char *item, long long *lo, long long *hi, long long *step) {
    char text[96], *dots, *colon, *end;
    if (strlen(item) >= sizeof text) return 0;
    strcpy(text, item);
    if (!(dots = strstr(text, ".."))) return 0;
    *dots = 0;
    if ((colon = strchr(dots + 2, ':')) != NULL) *colon = 0;
    errno = 0;
    *lo = strtoll(text, &end, 10);
    if (!text[0] || *end || errno) return 0;
    *hi = strtoll(dots + 2, &end, 10);
    if (!dots[2] || *end || errno) return 0;
    *step = 1;
    if (colon) {
        *step = strtoll(colon + 1, &end, 10);
        if (!colon[1] || *end || errno || *step < 1) return 0;
    }
    return *lo <= *hi;
}

static int mgpu__cmp_strp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* The items of "v1,v2,lo..hi" onto the axis (spaces around items ignored). */
static mgpu_result mgpu__sweep_axis_parse(mgpu__sweep_axis *a, const char *list, const char *spec) {
    const char *p = list;
    for (;;) {
        size_t len = strcspn(p, ",");
        const char *s = p, *e = p + len;
        char item[96];
        long long lo, hi, step, v;
        while (s < e && *s == ' ') s++;
        while (e > s && e[-1] == ' ') e--;
        if (s == e) return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': empty value (expected NAME=V1,V2,... or NAME=LO..HI)", spec);
        snprintf(item, sizeof item, "%.*s", (int)(e - s), s);
        if (strstr(item, "..")) {
            if (!mgpu__sweep_parse_range(item, &lo, &hi, &step))
                return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': bad range '%s' (expected LO..HI or LO..HI:STEP with integers LO <= HI, STEP >= 1)", spec, item);
            if ((hi - lo) / step >= MGPU__SWEEP_MAX_VALUES)
                return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': range '%s' has more than %d values", spec, item, MGPU__SWEEP_MAX_VALUES);
            for (v = lo; v <= hi; v += step) {
                char text[32];
                int n = snprintf(text, sizeof text, "%lld", v);
                if (!mgpu__sweep_axis_push(a, text, (size_t)n)) return MGPU_ERR_OOM_HOST;
                if (hi - v < step) break; /* no overflow past hi */
            }
        } else if (!mgpu__sweep_axis_push(a, s, (size_t)(e - s))) {
            return MGPU_ERR_OOM_HOST;
        }
        if (a->n > MGPU__SWEEP_MAX_VALUES) return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': more than %d values", spec, MGPU__SWEEP_MAX_VALUES);
        if (!p[len]) break;
        p += len + 1;
    }
    {   /* a repeated value would make two runs with one id */
        char **sorted = (char **)mgpu__alloc((size_t)a->n * sizeof *sorted, "grid values");
        int i, dup = -1;
        if (!sorted) return MGPU_ERR_OOM_HOST;
        memcpy(sorted, a->values, (size_t)a->n * sizeof *sorted);
        qsort(sorted, (size_t)a->n, sizeof *sorted, mgpu__cmp_strp);
        for (i = 1; i < a->n && dup < 0; i++)
            if (strcmp(sorted[i - 1], sorted[i]) == 0) dup = i;
        if (dup >= 0) mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': the value '%s' appears twice", spec, sorted[dup]);
        mgpu_free(sorted);
        return dup >= 0 ? MGPU_ERR_INVALID_ARG : MGPU_OK;
    }
}

MGPU_API mgpu_result mgpu_sweep_grid_add(mgpu_sweep_grid *g, const char *spec) {
    const char *eq;
    mgpu__sweep_axis a;
    mgpu_result r;
    int i;
    if (!g || !spec) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_sweep_grid_add: grid and spec must not be NULL");
    if (!(eq = strchr(spec, '='))) return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': expected NAME=V1,V2,... or NAME=LO..HI (no '=')", spec);
    if (!mgpu__sweep_name_ok(spec, (size_t)(eq - spec)))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': the name '%.*s' must be letters, digits and _ (not starting with a digit)", spec, (int)(eq - spec), spec);
    if (mgpu__sweep_builtin_index(spec, (size_t)(eq - spec)) >= 0)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': '%.*s' is reserved for the command template (metrics, log, run_id, run_dir, slot, attempt)", spec, (int)(eq - spec), spec);
    for (i = 0; i < g->n_axes; i++)
        if (strlen(g->axes[i].name) == (size_t)(eq - spec) && strncmp(g->axes[i].name, spec, (size_t)(eq - spec)) == 0)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': the name '%s' is given twice", spec, g->axes[i].name);
    if (g->n_axes == MGPU__SWEEP_MAX_AXES) return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': at most %d axes", spec, MGPU__SWEEP_MAX_AXES);
    memset(&a, 0, sizeof a);
    if (!(a.name = (char *)mgpu__alloc((size_t)(eq - spec) + 1, "a grid name"))) return MGPU_ERR_OOM_HOST;
    memcpy(a.name, spec, (size_t)(eq - spec));
    a.name[eq - spec] = 0;
    if ((r = mgpu__sweep_axis_parse(&a, eq + 1, spec)) == MGPU_OK) {
        int64_t size = g->n_axes ? g->size : 1;
        if (size * a.n > MGPU__SWEEP_MAX_POINTS)
            r = mgpu__fail(MGPU_ERR_INVALID_ARG, "--grid '%s': the grid would have %lld points (at most %d)", spec, (long long)(size * a.n), MGPU__SWEEP_MAX_POINTS);
        else { g->axes[g->n_axes++] = a; g->size = size * a.n; return MGPU_OK; }
    }
    mgpu__sweep_axis_free(&a);
    return r;
}

MGPU_API int mgpu_sweep_grid_axes(const mgpu_sweep_grid *g) { return g ? g->n_axes : 0; }
MGPU_API const char *mgpu_sweep_grid_name(const mgpu_sweep_grid *g, int axis) {
    return g && axis >= 0 && axis < g->n_axes ? g->axes[axis].name : NULL;
}
MGPU_API int mgpu_sweep_grid_count(const mgpu_sweep_grid *g, int axis) {
    return g && axis >= 0 && axis < g->n_axes ? g->axes[axis].n : 0;
}
MGPU_API const char *mgpu_sweep_grid_value(const mgpu_sweep_grid *g, int axis, int i) {
    return g && axis >= 0 && axis < g->n_axes && i >= 0 && i < g->axes[axis].n ? g->axes[axis].values[i] : NULL;
}
MGPU_API int64_t mgpu_sweep_grid_size(const mgpu_sweep_grid *g) { return g && g->n_axes ? g->size : 0; }

MGPU_API mgpu_result mgpu_sweep_grid_point(const mgpu_sweep_grid *g, int64_t index, const char **values) {
    int a;
    if (!g || !values || index < 0 || index >= mgpu_sweep_grid_size(g))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_sweep_grid_point: point %lld is outside the grid of %lld", (long long)index,
                          (long long)mgpu_sweep_grid_size(g));
    for (a = g->n_axes - 1; a >= 0; a--) {
        values[a] = g->axes[a].values[index % g->axes[a].n];
        index /= g->axes[a].n;
    }
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   Templates and run ids
   -------------------------------------------------------------------------------------- */

static mgpu_result mgpu__sweep_unknown_key(const char *tmpl, const char *key, size_t len, int n, const char *const *names) {
    char known[512];
    size_t pos = 0;
    int i;
    known[0] = 0;
    for (i = 0; i < n && pos + 2 < sizeof known; i++)
        pos += (size_t)snprintf(known + pos, sizeof known - pos, "%s{%s}", i ? ", " : "", names[i]);
    return mgpu__fail(MGPU_ERR_INVALID_ARG, "unknown key {%.*s} in the command argument '%s' (known: %s)", (int)len, key, tmpl, known);
}

MGPU_API char *mgpu_sweep_substitute(const char *tmpl, int n, const char *const *names, const char *const *values) {
    mgpu__buf b;
    const char *p;
    if (!tmpl || n < 0 || (n > 0 && (!names || !values)))
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_sweep_substitute: tmpl, names and values must not be NULL");
    mgpu__buf_init(&b);
    mgpu__buf_puts(&b, "");
    for (p = tmpl; *p;) {
        const char *close;
        if ((p[0] == '{' && p[1] == '{') || (p[0] == '}' && p[1] == '}')) {
            mgpu__buf_append(&b, p, 1);
            p += 2;
            continue;
        }
        if (p[0] == '{' && (close = strchr(p + 1, '}')) != NULL && mgpu__sweep_name_ok(p + 1, (size_t)(close - p - 1))) {
            size_t len = (size_t)(close - p - 1);
            int i, found = -1;
            for (i = 0; i < n && found < 0; i++)
                if (strlen(names[i]) == len && strncmp(names[i], p + 1, len) == 0) found = i;
            if (found < 0) {
                mgpu__sweep_unknown_key(tmpl, p + 1, len, n, names);
                mgpu__buf_free(&b);
                return NULL;
            }
            mgpu__buf_puts(&b, values[found] ? values[found] : "");
            p = close + 1;
            continue;
        }
        mgpu__buf_append(&b, p, 1);
        p++;
    }
    if (b.failed) { mgpu__buf_free(&b); return NULL; }
    return b.data;
}

static int mgpu__sweep_id_char_ok(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '+' || c == '-';
}

MGPU_API mgpu_result mgpu_sweep_run_id(int n, const char *const *names, const char *const *values, char *buf, size_t size) {
    mgpu__buf b;
    int i;
    if (n < 1 || !names || !values || !buf || size == 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_sweep_run_id: needs n >= 1 names and values and a buffer");
    mgpu__buf_init(&b);
    for (i = 0; i < n; i++) {
        const unsigned char *v = (const unsigned char *)(values[i] ? values[i] : "");
        mgpu__buf_printf(&b, "%s%s=", i ? "," : "", names[i]);
        for (; *v; v++) {
            if (mgpu__sweep_id_char_ok(*v)) mgpu__buf_append(&b, v, 1);
            else mgpu__buf_printf(&b, "%%%02X", (unsigned)*v);
        }
    }
    if (b.failed) { mgpu__buf_free(&b); return MGPU_ERR_OOM_HOST; }
    if (b.len > 120) { /* file names have limits: keep a readable head and make it unique with a hash */
        mgpu__hash64 h;
        mgpu__hash64_init(&h);
        mgpu__hash64_update(&h, b.data, b.len);
        snprintf(b.data + 100, b.cap - 100, "-%016llx", (unsigned long long)mgpu__hash64_final(&h));
        b.len = strlen(b.data);
    }
    if (b.len >= size) {
        mgpu__buf_free(&b);
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_sweep_run_id: the buffer of %zu bytes is too small", size);
    }
    memcpy(buf, b.data, b.len + 1);
    mgpu__buf_free(&b);
    return MGPU_OK;
}

/* --------------------------------------------------------------------------------------
   GPUs without the CUDA runtime: CUDA_VISIBLE_DEVICES, nvidia-smi, /proc/driver/nvidia/gpus.
   A supervisor that linked CUDA would hold a context (hundreds of MiB) on every GPU it counted.
   -------------------------------------------------------------------------------------- */

#define MGPU__CAPTURE_TIMED_OUT (-2)

/* Waits until `deadline` for pid to exit; past it (or with deadline 0) kills its group. 1 when it
   exited by itself (status set), 0 when it had to be killed. */
static int mgpu__capture_reap(int pid, double deadline, int *status) {
    struct timespec tick = {0, 10000000};
    for (;;) {
        pid_t r = waitpid((pid_t)pid, status, WNOHANG);
        if (r == (pid_t)pid) return 1;
        if (r < 0 && errno != EINTR) { *status = -1; return 1; } /* reaped elsewhere: nothing to kill */
        if (mgpu_time_s() >= deadline) break;
        nanosleep(&tick, NULL);
    }
    mgpu_kill_group(pid, SIGKILL);
    while (waitpid((pid_t)pid, status, 0) < 0 && errno == EINTR) {}
    return 0;
}

/* Runs argv (PATH lookup) for at most timeout_s with its stdout and stderr into buf (NUL-terminated,
   cut to size). Returns its wait status, MGPU__CAPTURE_TIMED_OUT (then killed), or -1. */
static int mgpu__capture(char *const *argv, double timeout_s, char *buf, size_t size) {
    int fds[2], pid = -1, status = -1, eof = 0;
    size_t len = 0;
    double deadline = mgpu_time_s() + timeout_s;
    mgpu_spawn_desc d;
    buf[0] = 0;
    if (pipe(fds) != 0) return -1;
    fcntl(fds[0], F_SETFD, FD_CLOEXEC); /* the child keeps only its dup2'ed copies */
    fcntl(fds[1], F_SETFD, FD_CLOEXEC);
    memset(&d, 0, sizeof d);
    d.argv = argv;
    d.stdout_fd = d.stderr_fd = fds[1];
    d.label = "mgpu_find_gpus";
    if (mgpu_spawn(&d, &pid) != MGPU_OK) { close(fds[0]); close(fds[1]); return -1; }
    close(fds[1]);
    while (!eof) {
        struct pollfd p;
        char chunk[4096];
        ssize_t n;
        int ms = (int)((deadline - mgpu_time_s()) * 1000.0);
        if (ms <= 0) break;
        p.fd = fds[0]; p.events = POLLIN; p.revents = 0;
        if (poll(&p, 1, ms) <= 0) continue; /* EINTR or the deadline: the loop head decides */
        n = read(fds[0], chunk, sizeof chunk);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) { eof = 1; break; }
        if (len + 1 < size) {
            size_t k = MGPU__MIN((size_t)n, size - 1 - len);
            memcpy(buf + len, chunk, k);
            len += k;
            buf[len] = 0;
        }
    }
    close(fds[0]);
    return mgpu__capture_reap(pid, eof ? deadline : 0, &status) ? status : MGPU__CAPTURE_TIMED_OUT;
}

/* s without leading and trailing spaces, in place. */
static char *mgpu__trim_spaces(char *s) {
    size_t n;
    while (*s == ' ' || *s == '\t') s++;
    n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r')) s[--n] = 0;
    return s;
}

static int mgpu__all_digits(const char *s) {
    if (!*s) return 0;
    for (; *s; s++)
        if (!mgpu__is_digit(*s)) return 0;
    return 1;
}

static void mgpu__gpu_set(mgpu_gpu_info *g, const char *id, const char *name, int64_t memory_mib) {
    snprintf(g->id, sizeof g->id, "%s", id);
    snprintf(g->name, sizeof g->name, "%s", name);
    g->memory_mib = memory_mib;
}

/* CUDA_VISIBLE_DEVICES's entries up to the first CUDA would stop at (it ignores the rest). */
static int mgpu__gpus_from_visible(const char *cvd, mgpu_gpu_info *gpus, int max) {
    char item[64];
    int n = 0;
    while (*cvd && n < max) {
        size_t len = strcspn(cvd, ",");
        char *e;
        snprintf(item, sizeof item, "%.*s", (int)MGPU__MIN(len, sizeof item - 1), cvd);
        e = mgpu__trim_spaces(item);
        if (len >= sizeof item || !(mgpu__all_digits(e) || strncmp(e, "GPU-", 4) == 0 || strncmp(e, "MIG-", 4) == 0)) break;
        mgpu__gpu_set(&gpus[n++], e, "", 0);
        cvd += len;
        if (*cvd == ',') cvd++;
    }
    return n;
}

/* Lines of `nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader`:
   "0, NVIDIA H200, 143771 MiB". Lines of another shape are skipped. */
static int mgpu__gpus_from_query(char *out, mgpu_gpu_info *gpus, int max) {
    int n = 0;
    char *line, *save = NULL;
    for (line = strtok_r(out, "\n", &save); line && n < max; line = strtok_r(NULL, "\n", &save)) {
        char *index = line, *name = strchr(line, ','), *mem = name ? strrchr(name + 1, ',') : NULL;
        if (!name || !mem) continue;
        *name++ = 0;
        *mem++ = 0;
        index = mgpu__trim_spaces(index);
        if (!mgpu__all_digits(index)) continue;
        mgpu__gpu_set(&gpus[n++], index, mgpu__trim_spaces(name), (int64_t)strtoll(mgpu__trim_spaces(mem), NULL, 10));
    }
    return n;
}

/* Lines of `nvidia-smi -L`: "GPU 0: NVIDIA H200 (UUID: GPU-...)" (its MIG lines are skipped). */
static int mgpu__gpus_from_list(char *out, mgpu_gpu_info *gpus, int max) {
    int n = 0;
    char *line, *save = NULL;
    for (line = strtok_r(out, "\n", &save); line && n < max; line = strtok_r(NULL, "\n", &save)) {
        char *colon, *uuid;
        if (strncmp(line, "GPU ", 4) != 0 || !(colon = strchr(line + 4, ':'))) continue;
        *colon = 0;
        if (!mgpu__all_digits(line + 4)) continue;
        if ((uuid = strstr(colon + 1, " (UUID:")) != NULL) *uuid = 0;
        mgpu__gpu_set(&gpus[n++], line + 4, mgpu__trim_spaces(colon + 1), 0);
    }
    return n;
}

static int mgpu__cmp_str(const void *a, const void *b) { return strcmp((const char *)a, (const char *)b); }

/* The entries of /proc/driver/nvidia/gpus (PCI bus ids) in bus order, numbered from 0, named by
   the "Model:" line of their information file. -1 when the directory cannot be read. */
static int mgpu__gpus_from_proc(const char *dir, mgpu_gpu_info *gpus, int max) {
    char (*bus)[64] = NULL;
    DIR *dp = opendir(dir);
    struct dirent *e;
    int n = 0, i;
    if (!dp) return -1;
    if (!(bus = (char (*)[64])mgpu__alloc((size_t)max * sizeof *bus, "GPU bus ids"))) { closedir(dp); return 0; }
    while ((e = readdir(dp)) != NULL && n < max) {
        size_t len = strlen(e->d_name);
        if (e->d_name[0] != '.' && len < sizeof bus[0]) memcpy(bus[n++], e->d_name, len + 1);
    }
    closedir(dp);
    qsort(bus, (size_t)n, sizeof bus[0], mgpu__cmp_str);
    for (i = 0; i < n; i++) {
        char path[PATH_MAX], line[256], id[16], name[96] = "";
        FILE *f;
        snprintf(path, sizeof path, "%s/%s/information", dir, bus[i]);
        if ((f = fopen(path, "r")) != NULL) {
            while (fgets(line, sizeof line, f))
                if (strncmp(line, "Model:", 6) == 0) {
                    line[strcspn(line, "\n")] = 0;
                    snprintf(name, sizeof name, "%s", mgpu__trim_spaces(line + 6));
                    break;
                }
            fclose(f);
        }
        snprintf(id, sizeof id, "%d", i);
        mgpu__gpu_set(&gpus[i], id, name, 0);
    }
    mgpu_free(bus);
    return n;
}

/* Asks nvidia-smi (--query-gpu, then -L); the GPUs it lists, or 0 with the reason appended to why. */
static int mgpu__gpus_from_nvidia_smi(const char *smi, double timeout_s, mgpu_gpu_info *gpus, int max, mgpu__buf *why,
                                      const char **source) {
    char *query[] = {(char *)smi, (char *)"--query-gpu=index,name,memory.total", (char *)"--format=csv,noheader", NULL};
    char *list[] = {(char *)smi, (char *)"-L", NULL};
    char *out = (char *)mgpu__alloc(65536, "nvidia-smi's output"), first[160];
    int st, n = 0;
    if (!out) return 0;
    st = mgpu__capture(query, timeout_s, out, 65536);
    if (st != MGPU__CAPTURE_TIMED_OUT && (n = mgpu__gpus_from_query(out, gpus, max)) > 0) *source = "nvidia-smi --query-gpu";
    if (n == 0 && st != MGPU__CAPTURE_TIMED_OUT) { /* an old or odd nvidia-smi may still list them */
        st = mgpu__capture(list, timeout_s, out, 65536);
        if (st != MGPU__CAPTURE_TIMED_OUT && (n = mgpu__gpus_from_list(out, gpus, max)) > 0) *source = "nvidia-smi -L";
    }
    if (n == 0) {
        snprintf(first, sizeof first, "%.*s", (int)strcspn(out, "\n"), out);
        if (st == MGPU__CAPTURE_TIMED_OUT) mgpu__buf_printf(why, "%s: no answer in %g s", smi, timeout_s);
        else if (st == -1) mgpu__buf_printf(why, "%s: could not be run", smi);
        else if (WIFEXITED(st) && WEXITSTATUS(st) == 0) mgpu__buf_printf(why, "%s: lists no GPU", smi);
        else {
            char status[96];
            mgpu_wait_status_describe(st, status, sizeof status);
            mgpu__buf_printf(why, "%s: %s%s%s", smi, status, first[0] ? ": " : "", mgpu__trim_spaces(first));
        }
    }
    mgpu_free(out);
    return n;
}

MGPU_API int mgpu_find_gpus(const mgpu_gpu_sources *where, mgpu_gpu_info *gpus, int max, char *how, size_t how_size) {
    static const mgpu_gpu_sources defaults = {NULL, NULL, 0, 0.0};
    const char *cvd, *smi, *proc, *source = NULL;
    mgpu__buf why;
    int n = 0;
    if (!gpus || max < 1 || (!how && how_size)) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_find_gpus: needs room for at least one GPU (gpus, max >= 1) and how with its size");
        return -1;
    }
    if (!where) where = &defaults;
    memset(gpus, 0, (size_t)max * sizeof *gpus);
    mgpu__buf_init(&why);
    cvd = where->ignore_visible_devices ? NULL : getenv("CUDA_VISIBLE_DEVICES");
    smi = where->nvidia_smi ? where->nvidia_smi : "nvidia-smi";
    proc = where->proc_dir ? where->proc_dir : "/proc/driver/nvidia/gpus";
    if (cvd) {
        n = mgpu__gpus_from_visible(cvd, gpus, max);
        if (n) mgpu__buf_printf(&why, "CUDA_VISIBLE_DEVICES=%s", cvd);
        else if (cvd[0]) mgpu__buf_printf(&why, "CUDA_VISIBLE_DEVICES=%s starts with no id CUDA would take", cvd);
        else mgpu__buf_puts(&why, "CUDA_VISIBLE_DEVICES is set but empty");
        source = why.data;
    } else {
        if (smi[0] && !mgpu_program_exists(smi)) mgpu__buf_printf(&why, "%s: not found%s", smi, strchr(smi, '/') ? "" : " in PATH");
        else if (smi[0]) n = mgpu__gpus_from_nvidia_smi(smi, where->timeout_s > 0 ? where->timeout_s : 30.0, gpus, max, &why, &source);
        if (n == 0 && proc[0]) {
            n = mgpu__gpus_from_proc(proc, gpus, max);
            if (n > 0) source = proc;
            else mgpu__buf_printf(&why, "%s%s: %s", why.len ? "; " : "", proc, n < 0 ? "absent" : "no GPU");
            n = MGPU__MAX(n, 0);
        }
        if (!source) source = why.len ? why.data : "no source to ask";
    }
    if (how && how_size) snprintf(how, how_size, "%s", source ? source : "out of memory");
    mgpu__buf_free(&why);
    return n;
}

/* --------------------------------------------------------------------------------------
   Results file
   -------------------------------------------------------------------------------------- */

struct mgpu_sweep_results { int64_t n, cap; mgpu_json **records; };

/* RFC 8259's number grammar: such a value is written as a JSON number, anything else as a string. */
static int mgpu__is_json_number(const char *s) {
    if (*s == '-') s++;
    if (*s == '0') s++;
    else if (*s >= '1' && *s <= '9') while (mgpu__is_digit(*s)) s++;
    else return 0;
    if (*s == '.') {
        if (!mgpu__is_digit(*++s)) return 0;
        while (mgpu__is_digit(*s)) s++;
    }
    if (*s == 'e' || *s == 'E') {
        s++;
        if (*s == '+' || *s == '-') s++;
        if (!mgpu__is_digit(*s)) return 0;
        while (mgpu__is_digit(*s)) s++;
    }
    return *s == 0;
}

static void mgpu__buf_json_param(mgpu__buf *b, const char *value) {
    if (mgpu__is_json_number(value)) mgpu__buf_puts(b, value);
    else mgpu__buf_json_string(b, value);
}

/* A JSON scalar as the text it stands for (numbers exactly as written); NULL for containers. */
static const char *mgpu__json_scalar_text(const mgpu_json *v, char *buf, size_t size) {
    if (!v) return NULL;
    switch (v->type) {
    case MGPU_JSON_NUMBER:
        snprintf(buf, size, "%.*s", (int)v->raw_len, v->raw ? v->raw : "");
        return buf;
    case MGPU_JSON_STRING: return v->string;
    case MGPU_JSON_BOOL: return v->boolean ? "true" : "false";
    case MGPU_JSON_NULL: return "null";
    default: return NULL;
    }
}

MGPU_API mgpu_sweep_results *mgpu_sweep_results_load(const char *path) {
    mgpu_sweep_results *r;
    char *text = NULL, label[PATH_MAX + 32];
    size_t len = 0, start = 0;
    int64_t line = 0;
    struct stat st;
    if (!path) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_sweep_results_load: path is NULL");
    if (!(r = (mgpu_sweep_results *)mgpu__calloc(sizeof *r, "sweep results"))) return NULL;
    if (stat(path, &st) != 0 && errno == ENOENT) return r;
    if (mgpu_read_file(path, (void **)&text, &len) != MGPU_OK) { mgpu_free(r); return NULL; }
    while (start < len) {
        size_t end = start;
        mgpu_json *j;
        while (end < len && text[end] != '\n') end++;
        line++;
        snprintf(label, sizeof label, "%s line %lld", path, (long long)line);
        if (end > start) {
            j = mgpu_json_parse(text + start, end - start, label);
            if (!j || j->type != MGPU_JSON_OBJECT || !mgpu_json_get(j, "params") || mgpu_json_get(j, "params")->type != MGPU_JSON_OBJECT) {
                mgpu_log(MGPU_LOG_WARN, "%s: skipped (not a sweep record%s%s)", label, j ? "" : ": ", j ? "" : mgpu_last_error());
                mgpu_json_free(j);
            } else {
                if (r->n == r->cap) {
                    int64_t cap = r->cap ? 2 * r->cap : 64;
                    mgpu_json **grown = (mgpu_json **)mgpu__alloc((size_t)cap * sizeof *grown, "sweep results");
                    if (!grown) { mgpu_json_free(j); mgpu_free(text); mgpu_sweep_results_destroy(r); return NULL; }
                    if (r->n) memcpy(grown, r->records, (size_t)r->n * sizeof *grown);
                    mgpu_free(r->records);
                    r->records = grown; r->cap = cap;
                }
                r->records[r->n++] = j;
            }
        }
        start = end + 1;
    }
    mgpu_free(text);
    return r;
}

MGPU_API void mgpu_sweep_results_destroy(mgpu_sweep_results *r) {
    int64_t i;
    if (!r) return;
    for (i = 0; i < r->n; i++) mgpu_json_free(r->records[i]);
    mgpu_free(r->records);
    mgpu_free(r);
}

MGPU_API int64_t mgpu_sweep_results_count(const mgpu_sweep_results *r) { return r ? r->n : 0; }
MGPU_API const mgpu_json *mgpu_sweep_results_get(const mgpu_sweep_results *r, int64_t i) {
    return r && i >= 0 && i < r->n ? r->records[i] : NULL;
}

MGPU_API const char *mgpu_sweep_record_param(const mgpu_json *record, const char *name, char *buf, size_t size) {
    return mgpu__json_scalar_text(mgpu_json_get(mgpu_json_get(record, "params"), name), buf, size);
}

/* 1 if the record's params are exactly these names with these values. */
static int mgpu__sweep_record_is(const mgpu_json *record, int n, const char *const *names, const char *const *values) {
    const mgpu_json *params = mgpu_json_get(record, "params");
    char buf[128];
    int i;
    if (!params || params->count != n) return 0;
    for (i = 0; i < n; i++) {
        const char *v = mgpu_sweep_record_param(record, names[i], buf, sizeof buf);
        if (!v || strcmp(v, values[i]) != 0) return 0;
    }
    return 1;
}

MGPU_API const mgpu_json *mgpu_sweep_results_find(const mgpu_sweep_results *r, int n, const char *const *names, const char *const *values) {
    int64_t i;
    if (!r || n < 1 || !names || !values) return NULL;
    for (i = r->n - 1; i >= 0; i--)
        if (mgpu__sweep_record_is(r->records[i], n, names, values)) return r->records[i];
    return NULL;
}

MGPU_API int mgpu_sweep_record_metric(const mgpu_json *record, const char *name, double *value) {
    const mgpu_json *v;
    if (!record || !name) return 0;
    v = mgpu_json_get(record, name);
    if ((!v || v->type != MGPU_JSON_NUMBER) && strncmp(name, "final", 5) == 0 && (name[5] == '.' || name[5] == '_'))
        v = mgpu_json_get(mgpu_json_get(record, "final"), name + 6);
    if (!v || v->type != MGPU_JSON_NUMBER || !isfinite(v->number)) return 0;
    if (value) *value = v->number;
    return 1;
}

/* The whole line in one write() on an O_APPEND descriptor (atomic against other appenders), then fsync. */
static mgpu_result mgpu__append_fd(int fd, const char *path, const char *data, size_t len) {
    ssize_t w;
    do w = write(fd, data, len); while (w < 0 && errno == EINTR);
    if (w < 0) return mgpu__fail(MGPU_ERR_IO, "cannot append to '%s': %s", path, strerror(errno));
    if ((size_t)w != len) return mgpu__fail(MGPU_ERR_IO, "cannot append to '%s': only %zd of %zu bytes written (disk full?)", path, w, len);
    if (fsync(fd) != 0) return mgpu__fail(MGPU_ERR_IO, "cannot append to '%s': fsync: %s", path, strerror(errno));
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_append_line(const char *path, const char *text) {
    mgpu__buf b;
    mgpu_result r;
    int fd;
    if (!path || !text) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_append_line: path and text must not be NULL");
    mgpu__buf_init(&b);
    mgpu__buf_puts(&b, text);
    mgpu__buf_puts(&b, "\n");
    if (b.failed) return MGPU_ERR_OOM_HOST;
    if ((fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644)) < 0) {
        r = mgpu__fail(MGPU_ERR_IO, "cannot open '%s' for appending: %s", path, strerror(errno));
    } else {
        r = mgpu__append_fd(fd, path, b.data, b.len);
        close(fd);
    }
    mgpu__buf_free(&b);
    return r;
}

/* --------------------------------------------------------------------------------------
   Summary
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__sweep_group {
    int n_keys;
    char **keys;            /* values of the --by params */
    int64_t n;              /* runs */
    double *sum, *sumsq;    /* per metric (sumsq about the first value, for a stable variance) */
    double *first;
    int64_t *count;
} mgpu__sweep_group;

typedef struct mgpu__sweep_summary {
    const mgpu_sweep_summary_desc *d;
    const char **metrics; int n_metrics;
    mgpu__sweep_group *groups; int64_t n_groups;
    int64_t left_out_failed, left_out_other, missing_key;
} mgpu__sweep_summary;

/* Numeric order where both are numbers, text order otherwise. */
static int mgpu__sweep_cmp_values(const char *a, const char *b) {
    char *ea, *eb;
    double x = strtod(a, &ea), y = strtod(b, &eb);
    if (ea != a && !*ea && eb != b && !*eb && x != y) return x < y ? -1 : 1;
    return strcmp(a, b);
}

static int mgpu__sweep_cmp_groups(const void *pa, const void *pb) {
    const mgpu__sweep_group *a = (const mgpu__sweep_group *)pa, *b = (const mgpu__sweep_group *)pb;
    int i, c;
    for (i = 0; i < a->n_keys; i++)
        if ((c = mgpu__sweep_cmp_values(a->keys[i], b->keys[i])) != 0) return c;
    return 0;
}

/* A record's run key with its line; sorted by key, then line, the last entry of a key is the
   run's latest record. */
typedef struct mgpu__sweep_key { char *key; int64_t line; } mgpu__sweep_key;

static int mgpu__sweep_cmp_keys(const void *pa, const void *pb) {
    const mgpu__sweep_key *a = (const mgpu__sweep_key *)pa, *b = (const mgpu__sweep_key *)pb;
    int c = strcmp(a->key, b->key);
    return c ? c : (a->line > b->line) - (a->line < b->line);
}

static void mgpu__sweep_keys_free(mgpu__sweep_key *keys, int64_t n) {
    int64_t i;
    for (i = 0; keys && i < n; i++) mgpu_free(keys[i].key);
    mgpu_free(keys);
}

/* A record's params as one key, names sorted ("alpha=0.1,seed=3" whatever the order in the file). */
static char *mgpu__sweep_params_key(const mgpu_json *record) {
    const mgpu_json *p, *sorted[MGPU__SWEEP_MAX_AXES];
    const char *names[MGPU__SWEEP_MAX_AXES], *values[MGPU__SWEEP_MAX_AXES];
    char bufs[MGPU__SWEEP_MAX_AXES][128], id[MGPU__SWEEP_ID_MAX];
    int n = 0, i, k;
    for (p = mgpu_json_get(record, "params")->child; p && n < MGPU__SWEEP_MAX_AXES; p = p->next) {
        for (k = n++; k > 0 && strcmp(sorted[k - 1]->key, p->key) > 0; k--) sorted[k] = sorted[k - 1];
        sorted[k] = p;
    }
    for (i = 0; i < n; i++) {
        names[i] = sorted[i]->key;
        if (!(values[i] = mgpu__json_scalar_text(sorted[i], bufs[i], sizeof bufs[i]))) values[i] = "";
    }
    if (n == 0) return mgpu__strdup("");
    return mgpu_sweep_run_id(n, names, values, id, sizeof id) == MGPU_OK ? mgpu__strdup(id) : NULL;
}

/* latest[i] = 1 when record i is the last one of its run. */
static mgpu_result mgpu__sweep_latest(const mgpu_sweep_results *r, char *latest) {
    mgpu__sweep_key *keys = (mgpu__sweep_key *)mgpu__calloc((size_t)r->n * sizeof *keys + 1, "run keys");
    int64_t i;
    if (!keys) return MGPU_ERR_OOM_HOST;
    for (i = 0; i < r->n; i++) {
        keys[i].line = i;
        if (!(keys[i].key = mgpu__sweep_params_key(r->records[i]))) { mgpu__sweep_keys_free(keys, r->n); return MGPU_ERR_OOM_HOST; }
    }
    qsort(keys, (size_t)r->n, sizeof *keys, mgpu__sweep_cmp_keys);
    for (i = 0; i < r->n; i++) latest[keys[i].line] = i + 1 == r->n || strcmp(keys[i].key, keys[i + 1].key) != 0;
    mgpu__sweep_keys_free(keys, r->n);
    return MGPU_OK;
}

/* Metric names when none are given: every number of the final metrics lines, first seen first. */
static mgpu_result mgpu__sweep_default_metrics(const mgpu_sweep_results *r, mgpu__sweep_summary *s) {
    int64_t i;
    s->metrics = (const char **)mgpu__calloc(64 * sizeof(char *), "metric names");
    if (!s->metrics) return MGPU_ERR_OOM_HOST;
    for (i = 0; i < r->n; i++) {
        const mgpu_json *fin = mgpu_json_get(r->records[i], "final"), *m;
        if (!fin || fin->type != MGPU_JSON_OBJECT) continue;
        for (m = fin->child; m; m = m->next) {
            size_t size = m->key ? strlen(m->key) + 7 : 0;
            char *name;
            int k, seen = 0;
            if (m->type != MGPU_JSON_NUMBER || !m->key) continue;
            for (k = 0; k < s->n_metrics && !seen; k++) seen = strcmp(s->metrics[k] + 6, m->key) == 0;
            if (seen || s->n_metrics == 64) continue;
            if (!(name = (char *)mgpu__alloc(size, "a metric name"))) return MGPU_ERR_OOM_HOST;
            snprintf(name, size, "final_%s", m->key);
            s->metrics[s->n_metrics++] = name;
        }
    }
    if (s->n_metrics == 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "no run has final metrics: name the metrics to summarise (e.g. wall_s)");
    return MGPU_OK;
}

static mgpu__sweep_group *mgpu__sweep_group_of(mgpu__sweep_summary *s, char **keys) {
    int64_t g;
    int i, same;
    mgpu__sweep_group *grp;
    for (g = 0; g < s->n_groups; g++) {
        for (i = 0, same = 1; i < s->d->n_by && same; i++) same = strcmp(s->groups[g].keys[i], keys[i]) == 0;
        if (same) return &s->groups[g];
    }
    if (s->n_groups % 64 == 0) {
        mgpu__sweep_group *grown = (mgpu__sweep_group *)mgpu__calloc((size_t)(s->n_groups + 64) * sizeof *grown, "summary groups");
        if (!grown) return NULL;
        if (s->n_groups) memcpy(grown, s->groups, (size_t)s->n_groups * sizeof *grown);
        mgpu_free(s->groups);
        s->groups = grown;
    }
    grp = &s->groups[s->n_groups];
    grp->keys = (char **)mgpu__calloc((size_t)(s->d->n_by + 1) * sizeof(char *), "group keys");
    grp->sum = (double *)mgpu__calloc((size_t)s->n_metrics * 4 * sizeof(double), "group sums");
    grp->count = (int64_t *)mgpu__calloc((size_t)s->n_metrics * sizeof(int64_t), "group counts");
    if (!grp->keys || !grp->sum || !grp->count) return NULL;
    grp->n_keys = s->d->n_by;
    grp->sumsq = grp->sum + s->n_metrics;
    grp->first = grp->sum + 2 * s->n_metrics;
    for (i = 0; i < s->d->n_by; i++)
        if (!(grp->keys[i] = mgpu__strdup(keys[i]))) return NULL;
    s->n_groups++;
    return grp;
}

static mgpu_result mgpu__sweep_collect(const mgpu_sweep_results *r, mgpu__sweep_summary *s) {
    char *latest = (char *)mgpu__alloc((size_t)r->n + 1, "latest records");
    mgpu_result res = latest ? mgpu__sweep_latest(r, latest) : MGPU_ERR_OOM_HOST;
    int64_t i;
    int k;
    for (i = 0; i < r->n && res == MGPU_OK; i++) {
        const mgpu_json *rec = r->records[i], *status = mgpu_json_get(rec, "status");
        char bufs[MGPU__SWEEP_MAX_AXES][128], *keys[MGPU__SWEEP_MAX_AXES];
        mgpu__sweep_group *g;
        int missing = 0;
        if (!latest[i]) continue;
        if (!status || status->type != MGPU_JSON_STRING || strcmp(status->string, "ok") != 0) {
            if (status && status->type == MGPU_JSON_STRING && strcmp(status->string, "failed") == 0) s->left_out_failed++;
            else s->left_out_other++;
            continue;
        }
        for (k = 0; k < s->d->n_by; k++) {
            const char *v = mgpu_sweep_record_param(rec, s->d->by[k], bufs[k], sizeof bufs[k]);
            if (!v) { missing = 1; break; }
            if (v != bufs[k]) snprintf(bufs[k], sizeof bufs[k], "%s", v);
            keys[k] = bufs[k];
        }
        if (missing) { s->missing_key++; continue; }
        if (!(g = mgpu__sweep_group_of(s, keys))) { res = MGPU_ERR_OOM_HOST; break; }
        g->n++;
        for (k = 0; k < s->n_metrics; k++) {
            double v, dv;
            if (!mgpu_sweep_record_metric(rec, s->metrics[k], &v)) continue;
            if (g->count[k] == 0) g->first[k] = v;
            dv = v - g->first[k];
            g->sum[k] += dv;
            g->sumsq[k] += dv * dv;
            g->count[k]++;
        }
    }
    mgpu_free(latest);
    return res;
}

static void mgpu__sweep_stats_of(const mgpu__sweep_group *g, int k, double *mean, double *std) {
    double n = (double)g->count[k], m = g->sum[k] / n;
    *mean = g->first[k] + m;
    *std = g->count[k] > 1 ? sqrt(fmax(0.0, (g->sumsq[k] - n * m * m) / (n - 1))) : NAN;
}

/* Four decimals for everyday magnitudes, significant digits otherwise. */
static void mgpu__sweep_format_number(double v, char *buf, size_t size) {
    double a = fabs(v);
    if (v != v) snprintf(buf, size, "n/a");
    else if (a == 0 || (a >= 1e-3 && a < 1e7)) snprintf(buf, size, "%.4f", v);
    else snprintf(buf, size, "%.4g", v);
}

/* Cell (row, col) of the table/markdown output: row -1 is the header. */
static void mgpu__sweep_cell(const mgpu__sweep_summary *s, int64_t row, int col, char *buf, size_t size) {
    const mgpu__sweep_group *g = row >= 0 ? &s->groups[row] : NULL;
    int n_by = s->d->n_by, k = col - n_by - 1;
    char a[48], b[48];
    double mean, std;
    if (col < n_by) { snprintf(buf, size, "%s", g ? g->keys[col] : s->d->by[col]); return; }
    if (col == n_by) { if (g) snprintf(buf, size, "%lld", (long long)g->n); else snprintf(buf, size, "n"); return; }
    if (!g) { snprintf(buf, size, "%s", s->metrics[k]); return; }
    if (g->count[k] == 0) { snprintf(buf, size, "-"); return; }
    mgpu__sweep_stats_of(g, k, &mean, &std);
    mgpu__sweep_format_number(mean, a, sizeof a);
    mgpu__sweep_format_number(std, b, sizeof b);
    if (g->count[k] == g->n) snprintf(buf, size, "%s \xc2\xb1 %s", a, b);
    else snprintf(buf, size, "%s \xc2\xb1 %s (n=%lld)", a, b, (long long)g->count[k]);
}

static size_t mgpu__utf8_width(const char *s) {
    size_t n = 0;
    for (; *s; s++) n += ((unsigned char)*s & 0xC0) != 0x80;
    return n;
}

static void mgpu__csv_field(FILE *out, const char *s) {
    if (!strpbrk(s, ",\"\n\r")) { fputs(s, out); return; }
    fputc('"', out);
    for (; *s; s++) {
        if (*s == '"') fputc('"', out);
        fputc(*s, out);
    }
    fputc('"', out);
}

static void mgpu__sweep_print_csv(const mgpu__sweep_summary *s, FILE *out) {
    int64_t g;
    int k;
    for (k = 0; k < s->d->n_by; k++) { mgpu__csv_field(out, s->d->by[k]); fputc(',', out); }
    fputs("n", out);
    for (k = 0; k < s->n_metrics; k++) fprintf(out, ",%s_mean,%s_std,%s_n", s->metrics[k], s->metrics[k], s->metrics[k]);
    fputc('\n', out);
    for (g = 0; g < s->n_groups; g++) {
        const mgpu__sweep_group *grp = &s->groups[g];
        for (k = 0; k < s->d->n_by; k++) { mgpu__csv_field(out, grp->keys[k]); fputc(',', out); }
        fprintf(out, "%lld", (long long)grp->n);
        for (k = 0; k < s->n_metrics; k++) {
            double mean, std;
            if (grp->count[k] == 0) { fputs(",,,0", out); continue; }
            mgpu__sweep_stats_of(grp, k, &mean, &std);
            fprintf(out, ",%.10g,", mean);
            if (std == std) fprintf(out, "%.10g", std);
            fprintf(out, ",%lld", (long long)grp->count[k]);
        }
        fputc('\n', out);
    }
}

static void mgpu__sweep_print_table(const mgpu__sweep_summary *s, FILE *out, int markdown) {
    int n_cols = s->d->n_by + 1 + s->n_metrics, c;
    size_t *width = (size_t *)mgpu__calloc((size_t)n_cols * sizeof(size_t), "column widths");
    char cell[256];
    int64_t row;
    if (!width) return;
    for (c = 0; c < n_cols && markdown; c++) width[c] = 3; /* a delimiter cell needs a hyphen besides its colon */
    for (row = -1; row < s->n_groups; row++)
        for (c = 0; c < n_cols; c++) {
            mgpu__sweep_cell(s, row, c, cell, sizeof cell);
            width[c] = MGPU__MAX(width[c], mgpu__utf8_width(cell));
        }
    for (row = -1; row < s->n_groups; row++) {
        for (c = 0; c < n_cols; c++) {
            size_t w;
            mgpu__sweep_cell(s, row, c, cell, sizeof cell);
            fputs(markdown ? (c ? " | " : "| ") : (c ? "  " : ""), out);
            fputs(cell, out);
            if (markdown || c + 1 < n_cols)
                for (w = mgpu__utf8_width(cell); w < width[c]; w++) fputc(' ', out);
        }
        fputs(markdown ? " |\n" : "\n", out);
        if (row == -1 && markdown) {
            for (c = 0; c < n_cols; c++) {
                size_t w;
                fputs(c ? " | " : "| ", out);
                for (w = 1; w < width[c]; w++) fputc('-', out);
                fputc(c < s->d->n_by ? '-' : ':', out); /* numbers right-aligned when rendered */
            }
            fputs(" |\n", out);
        }
    }
    mgpu_free(width);
}

MGPU_API mgpu_result mgpu_sweep_summary_print(const mgpu_sweep_results *r, const mgpu_sweep_summary_desc *d, FILE *out) {
    mgpu__sweep_summary s;
    mgpu_result res;
    int64_t g;
    int k, own_metrics = 0;
    if (!r || !d || !out || d->n_by < 0 || d->n_by > MGPU__SWEEP_MAX_AXES || (d->n_by && !d->by) || d->n_metrics < 0 || (d->n_metrics && !d->metrics))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_sweep_summary_print: results, desc (0 to %d --by keys, metrics) and out must be valid", MGPU__SWEEP_MAX_AXES);
    memset(&s, 0, sizeof s);
    s.d = d;
    if (d->n_metrics) {
        s.metrics = (const char **)d->metrics;
        s.n_metrics = d->n_metrics;
    } else {
        own_metrics = 1;
        res = mgpu__sweep_default_metrics(r, &s);
        if (res != MGPU_OK) goto done;
    }
    for (k = 0; k < d->n_by; k++) {
        int64_t i;
        char buf[8];
        for (i = 0; i < r->n && !mgpu_sweep_record_param(r->records[i], d->by[k], buf, sizeof buf); i++) {}
        if (i == r->n) {
            res = mgpu__fail(MGPU_ERR_INVALID_ARG, "--by %s: no run has that param%s", d->by[k], r->n ? " (see \"params\" in the results file)" : " (the results file is empty)");
            goto done;
        }
    }
    if ((res = mgpu__sweep_collect(r, &s)) != MGPU_OK) goto done;
    if (s.n_groups == 0) {
        res = mgpu__fail(MGPU_ERR_INVALID_ARG, "no successful run to summarise (%lld failed, %lld interrupted or unknown, %lld without a --by key)",
                         (long long)s.left_out_failed, (long long)s.left_out_other, (long long)s.missing_key);
        goto done;
    }
    for (k = 0; k < s.n_metrics; k++) {
        int64_t found = 0;
        for (g = 0; g < s.n_groups; g++) found += s.groups[g].count[k];
        if (!found) { res = mgpu__fail(MGPU_ERR_INVALID_ARG, "no finished run has the metric '%s' (a number in the record, or final_NAME from its final metrics line)", s.metrics[k]); goto done; }
    }
    qsort(s.groups, (size_t)s.n_groups, sizeof *s.groups, mgpu__sweep_cmp_groups);
    if (d->format == MGPU_SWEEP_CSV) mgpu__sweep_print_csv(&s, out);
    else mgpu__sweep_print_table(&s, out, d->format == MGPU_SWEEP_MARKDOWN);
    if (d->format == MGPU_SWEEP_TABLE && (s.left_out_failed || s.left_out_other || s.missing_key))
        fprintf(out, "(left out: %lld failed, %lld interrupted or unknown, %lld without a --by key)\n", (long long)s.left_out_failed,
                (long long)s.left_out_other, (long long)s.missing_key);
    res = MGPU_OK;
done:
    for (g = 0; g < s.n_groups; g++) {
        for (k = 0; k < d->n_by; k++) mgpu_free(s.groups[g].keys[k]);
        mgpu_free(s.groups[g].keys);
        mgpu_free(s.groups[g].sum);
        mgpu_free(s.groups[g].count);
    }
    mgpu_free(s.groups);
    if (own_metrics) {
        for (k = 0; k < s.n_metrics; k++) mgpu_free((void *)s.metrics[k]);
        mgpu_free((void *)s.metrics);
    }
    return res;
}
