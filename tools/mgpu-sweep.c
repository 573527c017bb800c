/* mgpu-sweep - many short independent runs (a grid x seeds) spread over every GPU or CPU slot,
   one process per slot, each finished run appended to a results JSONL; resumable, failures
   recorded and skipped, one progress line. `mgpu-sweep summary` turns the results into a table.

   Usage: mgpu-sweep --grid seed=0..9 --grid alpha=0.1,0.5 --cpu-slots 2 --results runs.jsonl \
              -- build/label_noise --seed {seed} --noise {alpha} --metrics {metrics}
          mgpu-sweep summary runs.jsonl --by alpha [--metric final_test_accuracy] [--csv|--markdown]
   (mgpu-sweep --help lists the options.) The work is done by mgpu_sweep_run() in mgpu.h. */
#define MGPU_IMPLEMENTATION
#include "mgpu.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#define EXIT_USAGE 2
#define MAX_GPUS 1024

/* One line on stderr with the program's name: say("bad %s", x). */
#define say(...) (fputs("mgpu-sweep: ", stderr), fprintf(stderr, __VA_ARGS__), fputc('\n', stderr))

static void print_help(FILE *f) {
    fputs(
        "usage: mgpu-sweep [options] -- COMMAND [ARGS...]\n"
        "       mgpu-sweep summary RESULTS [--by KEYS] [--metric NAMES] [--csv | --markdown]\n"
        "\n"
        "Runs COMMAND once per point of the grid, one process per slot, and appends one JSON line per\n"
        "finished run to RESULTS. Running the same command again skips the runs already recorded\n"
        "(ok or failed) and runs the rest, including the grid points added since.\n"
        "\n"
        "In ARGS, {NAME} is the run's value of grid axis NAME, and {metrics}, {log}, {run_id},\n"
        "{run_dir} (created when used), {slot}, {attempt} are the run's own; {{ and }} are braces.\n"
        "Each run gets CUDA_VISIBLE_DEVICES (its one GPU, with CUDA_DEVICE_ORDER=PCI_BUS_ID unless\n"
        "set; empty on a CPU slot), MGPU_METRICS (= {metrics}, which mgpu trainers take as their\n"
        "--metrics), MGPU_SWEEP_RUN_ID, MGPU_SWEEP_SLOT, MGPU_SWEEP_ATTEMPT and MGPU_NUM_THREADS\n"
        "(cores / slots unless set); its output goes to RUN_DIR/<run id>.log, and the\n"
        "\"event\":\"final\" line of its metrics file into its record.\n"
        "\n"
        "options (--flag=value and underscores in flag names are accepted too):\n"
        "  --grid NAME=VALUES     an axis (repeat for more); VALUES: v1,v2,... where an item LO..HI\n"
        "                         (integers) stands for LO to HI and LO..HI:STEP for every STEP-th\n"
        "  --results FILE         the results JSONL (required); locked against a second sweep\n"
        "  --run-dir DIR          logs and metrics files (default: FILE without .jsonl, plus .d)\n"
        "  --gpus auto|LIST       GPU slots: ids such as 0,1,3 (nvidia-smi's numbering, or positions\n"
        "                         within CUDA_VISIBLE_DEVICES when that is set), or auto: the GPUs of\n"
        "                         CUDA_VISIBLE_DEVICES when set, else those nvidia-smi lists, else those\n"
        "                         in /proc/driver/nvidia/gpus (no CUDA needed: the CPU build finds them)\n"
        "  --slots-per-gpu N      runs at once on each GPU (default 1)\n"
        "  --cpu-slots N          slots without a GPU (CUDA_VISIBLE_DEVICES=\"\"); the way to run on CPUs\n"
        "  --retries N            run a failed run up to N more times before recording it (default 0)\n"
        "  --rerun-failed         runs recorded as failed run again (default: they are skipped)\n"
        "  --timeout-min M        stop a run after M minutes and record it failed (default: none)\n"
        "  --grace-period-s S     seconds between SIGTERM and SIGKILL when stopping runs (default 5)\n"
        "  --num-threads N        MGPU_NUM_THREADS of every run (default: as set, else cores / slots)\n"
        "  --dry-run              print the commands of the runs left and exit\n"
        "  --help                 this text\n"
        "\n"
        "summary: mean \xc2\xb1 sample std and n of each metric per value of --by (a comma list of\n"
        "grid names), over the other axes (usually seeds), from the latest ok record of each run.\n"
        "Metrics are numbers of a record (wall_s) or final_NAME for NAME in the run's final metrics\n"
        "line (final_test_accuracy); default: every number of the final lines. --csv or --markdown\n"
        "change the format of the table.\n"
        "\n"
        "SIGINT/SIGTERM/SIGHUP stop the sweep: the runs in flight get SIGTERM (SIGKILL after the\n"
        "grace period, or at once on a second signal) and are recorded \"interrupted\", to run again\n"
        "on resume. A killed mgpu-sweep takes its runs with it (Linux) and loses only those.\n"
        "\n"
        "exit status: 0 when every run of the grid is ok; 1 when some run failed (now or before) or\n"
        "the sweep could not start; 2 for a bad command line; 128 + signal when stopped by one.\n",
        f);
}

/* "--flag_name=value" -> name "--flag-name" (in buf) and *value ("value", or NULL without '='). */
static const char *flag_name(const char *arg, char *buf, size_t size, const char **value) {
    size_t len = strcspn(arg, "="), i;
    if (len >= size) len = size - 1;
    for (i = 0; i < len; i++) buf[i] = (i >= 2 && arg[i] == '_') ? '-' : arg[i];
    buf[len] = 0;
    *value = arg[len] == '=' ? arg + len + 1 : NULL;
    return buf;
}

/* A number in [lo, hi], an integer when `integral`; -1 after a message naming the flag. */
static int parse_number(const char *flag, const char *text, double lo, double hi, int integral, double *out) {
    char *end = NULL;
    double v;
    errno = 0;
    v = integral ? (double)strtol(text, &end, 10) : strtod(text, &end);
    if (text[0] && !*end && !errno && v >= lo && v <= hi) {
        *out = v;
        return 0;
    }
    say("%s expects %s in [%g, %g], got '%s'", flag, integral ? "an integer" : "a number", lo, hi, text);
    return -1;
}

/* "a,b,c" into a NULL-terminated array of copies (at most max items); the count, or -1. */
static int split_list(const char *flag, const char *text, char **items, int max) {
    int n = 0;
    const char *p = text;
    for (;;) {
        size_t len = strcspn(p, ",");
        if (len == 0 || n == max) {
            say("%s expects a comma-separated list%s, got '%s'", flag, n == max ? " (too many items)" : " without empty items", text);
            return -1;
        }
        items[n] = (char *)malloc(len + 1);
        if (!items[n]) { say("out of memory"); return -1; }
        memcpy(items[n], p, len);
        items[n++][len] = 0;
        if (!p[len]) break;
        p += len + 1;
    }
    items[n] = NULL;
    return n;
}

/* --gpus auto: every GPU mgpu_find_gpus sees (CUDA_VISIBLE_DEVICES, else nvidia-smi, else /proc),
   without linking CUDA, so the CPU build places runs on GPUs too. None found is an error unless
   there are CPU slots to run on. The count, or -1 after a message. */
static int find_all_gpus(char **gpus, int cpu_slots, int slots_per_gpu) {
    static mgpu_gpu_info found[MAX_GPUS];
    char how[512], list[1024] = "";
    size_t pos = 0;
    int n = mgpu_find_gpus(NULL, found, MAX_GPUS, how, sizeof how), i;
    gpus[0] = NULL;
    if (n < 0) { say("--gpus auto: %s", mgpu_last_error()); return -1; }
    if (n == 0 && cpu_slots > 0) {
        say("--gpus auto: no GPU found (%s); running on the %d CPU slot%s only", how, cpu_slots, cpu_slots == 1 ? "" : "s");
        return 0;
    }
    if (n == 0) {
        say("--gpus auto: no GPU found (%s); run on the CPU with --cpu-slots N, or name the GPUs with --gpus 0,1", how);
        return -1;
    }
    for (i = 0; i < n; i++) {
        const mgpu_gpu_info *g = &found[i];
        char one[sizeof g->id + sizeof g->name + 32];
        if (!(gpus[i] = strdup(g->id))) { say("out of memory"); return -1; }
        if (!g->name[0]) snprintf(one, sizeof one, "%.63s", g->id);
        else if (!g->memory_mib) snprintf(one, sizeof one, "%.63s (%.95s)", g->id, g->name);
        else snprintf(one, sizeof one, "%.63s (%.95s, %lld MiB)", g->id, g->name, (long long)g->memory_mib);
        if (pos < sizeof list) pos += (size_t)snprintf(list + pos, sizeof list - pos, "%s%s", i ? ", " : "", one);
    }
    gpus[n] = NULL;
    say("--gpus auto: %d GPU%s from %s: %s; %d slot%s each", n, n == 1 ? "" : "s", how, list, slots_per_gpu > 0 ? slots_per_gpu : 1,
        slots_per_gpu > 1 ? "s" : "");
    return n;
}

/* --gpus: one CUDA_VISIBLE_DEVICES value per GPU. Listed indices are positions within the sweep's
   own CUDA_VISIBLE_DEVICES when that is set, as CUDA itself would number them. */
static int resolve_gpus(const char *text, int cpu_slots, int slots_per_gpu, char **gpus) {
    char *parent[MAX_GPUS + 1];
    const char *cvd = getenv("CUDA_VISIBLE_DEVICES");
    int n_parent = 0, n, i, bad = 0;
    if (strcmp(text, "auto") == 0) return find_all_gpus(gpus, cpu_slots, slots_per_gpu);
    if ((n = split_list("--gpus", text, gpus, MAX_GPUS)) < 0) return -1;
    if (cvd && cvd[0] && (n_parent = split_list("CUDA_VISIBLE_DEVICES", cvd, parent, MAX_GPUS)) < 0) return -1;
    for (i = 0; i < n && !bad; i++) {
        char *end = NULL;
        long idx = strtol(gpus[i], &end, 10);
        if (strncmp(gpus[i], "GPU-", 4) == 0 || strncmp(gpus[i], "MIG-", 4) == 0) continue; /* UUIDs as they are */
        if (!gpus[i][0] || *end || idx < 0) {
            say("--gpus expects auto or GPU ids such as 0,1,3 (or GPU-/MIG- UUIDs), got '%s'", gpus[i]);
            bad = 1;
        } else if (n_parent > 0 && idx >= n_parent) {
            say("--gpus %s: GPU %ld is not among the %d of CUDA_VISIBLE_DEVICES=%s", text, idx, n_parent, cvd);
            bad = 1;
        } else if (n_parent > 0) {
            free(gpus[i]);
            gpus[i] = strdup(parent[idx]);
        }
    }
    for (i = 0; i < n_parent; i++) free(parent[i]);
    return bad ? -1 : n;
}

typedef struct cli {
    mgpu_sweep_desc d;
    mgpu_sweep_grid *grid;
    char *gpus[MAX_GPUS + 1];
    const char *gpus_text;
    double timeout_min;
} cli;

/* Returns 0 to run, 1 after --help, -1 on a bad command line (message printed). */
static int parse_sweep_args(cli *c, int argc, char **argv) {
    int i = 1;
    while (i < argc && strncmp(argv[i], "--", 2) == 0) {
        char name[64];
        const char *value = NULL;
        if (strcmp(argv[i], "--") == 0) { i++; break; }
        flag_name(argv[i], name, sizeof name, &value);
        if (strcmp(name, "--help") == 0) { print_help(stdout); return 1; }
        if (strcmp(name, "--rerun-failed") == 0 || strcmp(name, "--dry-run") == 0) {
            if (value) { say("%s takes no value, got '%s'", name, value); return -1; }
            if (name[2] == 'r') c->d.rerun_failed = 1; else c->d.dry_run = 1;
            i++;
            continue;
        }
        if (!value) {
            if (i + 1 >= argc) { say("%s needs a value", name); return -1; }
            value = argv[++i];
        }
        i++;
        if (strcmp(name, "--grid") == 0) {
            if (mgpu_sweep_grid_add(c->grid, value) != MGPU_OK) { say("%s", mgpu_last_error()); return -1; }
        } else if (strcmp(name, "--results") == 0) c->d.results = value;
        else if (strcmp(name, "--run-dir") == 0) c->d.run_dir = value;
        else if (strcmp(name, "--gpus") == 0) c->gpus_text = value;
        else {
            /* the numeric flags: range, and where each goes (a count or a number) */
            const struct { const char *name; double lo, hi; int *count; double *number; } nums[] = {
                {"--slots-per-gpu", 1, 1024, &c->d.slots_per_gpu, NULL}, {"--cpu-slots", 0, 4096, &c->d.cpu_slots, NULL},
                {"--retries", 0, 1000, &c->d.retries, NULL}, {"--num-threads", 1, 4096, &c->d.num_threads, NULL},
                {"--timeout-min", 1e-3, 1e7, NULL, &c->timeout_min}, {"--grace-period-s", 1e-3, 86400, NULL, &c->d.grace_s},
            };
            double v;
            int k, n = (int)(sizeof nums / sizeof nums[0]);
            for (k = 0; k < n && strcmp(name, nums[k].name) != 0; k++) {}
            if (k == n) { say("unknown flag %s (see mgpu-sweep --help)", name); return -1; }
            if (parse_number(name, value, nums[k].lo, nums[k].hi, nums[k].count != NULL, &v) != 0) return -1;
            if (nums[k].count) *nums[k].count = (int)v;
            else *nums[k].number = v;
        }
    }
    if (mgpu_sweep_grid_axes(c->grid) == 0) { say("no grid: give at least one --grid NAME=VALUES"); return -1; }
    if (!c->d.results) { say("no results file: give --results FILE"); return -1; }
    if (i >= argc) { say("missing COMMAND to run (usage: mgpu-sweep [options] -- COMMAND [ARGS...])"); return -1; }
    c->d.command = (const char *const *)(argv + i);
    if (c->gpus_text) {
        int n = resolve_gpus(c->gpus_text, c->d.cpu_slots, c->d.slots_per_gpu, c->gpus);
        if (n < 0) return -1;
        c->d.gpus = (const char *const *)c->gpus;
        c->d.n_gpus = n;
    }
    if (c->d.slots_per_gpu > 0 && !c->gpus_text) { say("--slots-per-gpu needs --gpus"); return -1; }
    if (c->d.cpu_slots == 0 && c->d.n_gpus == 0) { say("no slots: give --gpus auto|LIST or --cpu-slots N"); return -1; }
    c->d.run_timeout_s = c->timeout_min * 60.0;
    return 0;
}

static int run_sweep(int argc, char **argv) {
    cli c;
    mgpu_sweep_stats stats;
    int r, i;
    memset(&c, 0, sizeof c);
    if (!(c.grid = mgpu_sweep_grid_create())) { say("%s", mgpu_last_error()); return 1; }
    r = parse_sweep_args(&c, argc, argv);
    if (r == 0) {
        c.d.grid = c.grid;
        if (mgpu_sweep_run(&c.d, &stats) != MGPU_OK) {
            say("%s", mgpu_last_error());
            r = mgpu_last_result() == MGPU_ERR_INVALID_ARG ? EXIT_USAGE : 1;
        } else if (stats.stop_signal) {
            r = 128 + stats.stop_signal;
        } else {
            r = stats.failed + stats.skipped_failed > 0 ? 1 : 0;
        }
    } else {
        r = r == 1 ? 0 : EXIT_USAGE;
    }
    for (i = 0; c.gpus[i]; i++) free(c.gpus[i]);
    mgpu_sweep_grid_destroy(c.grid);
    return r;
}

static int run_summary(int argc, char **argv) {
    char *by[64] = {NULL}, *metrics[64] = {NULL};
    const char *path = NULL;
    mgpu_sweep_summary_desc sd;
    mgpu_sweep_results *res = NULL;
    int i, r = 0;
    memset(&sd, 0, sizeof sd);
    for (i = 2; i < argc && r == 0; i++) {
        char name[64];
        const char *value = NULL;
        if (strncmp(argv[i], "--", 2) != 0) {
            if (path) { say("summary: one results file, got '%s' and '%s'", path, argv[i]); r = EXIT_USAGE; }
            path = argv[i];
            continue;
        }
        flag_name(argv[i], name, sizeof name, &value);
        if (strcmp(name, "--help") == 0) { print_help(stdout); return 0; }
        if (strcmp(name, "--csv") == 0 || strcmp(name, "--markdown") == 0) {
            sd.format = name[2] == 'c' ? MGPU_SWEEP_CSV : MGPU_SWEEP_MARKDOWN;
            continue;
        }
        if (strcmp(name, "--by") != 0 && strcmp(name, "--metric") != 0 && strcmp(name, "--metrics") != 0) {
            say("summary: unknown flag %s (expected --by, --metric, --csv, --markdown)", name);
            r = EXIT_USAGE;
            break;
        }
        if (!value && i + 1 >= argc) { say("%s needs a value", name); r = EXIT_USAGE; break; }
        if (!value) value = argv[++i];
        if (strcmp(name, "--by") == 0) { if ((sd.n_by = split_list(name, value, by, 63)) < 0) r = EXIT_USAGE; }
        else if ((sd.n_metrics = split_list(name, value, metrics, 63)) < 0) r = EXIT_USAGE;
    }
    if (r == 0 && !path) { say("summary: which results file? (mgpu-sweep summary RESULTS --by KEYS)"); r = EXIT_USAGE; }
    if (r == 0 && access(path, R_OK) != 0) { say("summary: cannot read '%s': %s", path, strerror(errno)); r = 1; }
    if (r == 0 && !(res = mgpu_sweep_results_load(path))) { say("%s", mgpu_last_error()); r = 1; }
    if (r == 0) {
        sd.by = (const char *const *)by;
        sd.metrics = (const char *const *)metrics;
        if (sd.n_by < 0) sd.n_by = 0;
        if (sd.n_metrics < 0) sd.n_metrics = 0;
        if (mgpu_sweep_summary_print(res, &sd, stdout) != MGPU_OK) {
            say("summary: %s", mgpu_last_error());
            r = mgpu_last_result() == MGPU_ERR_INVALID_ARG ? EXIT_USAGE : 1;
        }
    }
    mgpu_sweep_results_destroy(res);
    for (i = 0; i < 64; i++) { free(by[i]); free(metrics[i]); }
    return r;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "summary") == 0) return run_summary(argc, argv);
    if (argc < 2) {
        print_help(stderr);
        return EXIT_USAGE;
    }
    return run_sweep(argc, argv);
}
