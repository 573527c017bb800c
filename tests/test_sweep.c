/* Sweeps and the process helpers under them: grid parsing and point order, {key} templates, run
   ids, the results file (reading past torn lines, atomic appends from many processes at once),
   summary statistics against values computed by hand, log tails, spawning into a process group,
   $MGPU_METRICS as the default --metrics, and GPUs found without CUDA (stand-ins for nvidia-smi
   and /proc). The scheduler itself runs in tests/sweep_test.sh. */
#define _GNU_SOURCE
#include "mgpu_test.h"
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static char tmpdir[64];

static void path_in_tmp(char *buf, size_t size, const char *name) { snprintf(buf, size, "%s/%s", tmpdir, name); }

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f) return;
    fputs(text, f);
    fclose(f);
}

static void test_grid(void) {
    mgpu_sweep_grid *g = mgpu_sweep_grid_create();
    const char *v[3];
    MT_CHECK(mgpu_sweep_grid_add(g, "seed=0..2") == MGPU_OK, "%s", mgpu_last_error());
    MT_CHECK(mgpu_sweep_grid_add(g, "alpha= 0.10 ,0.5") == MGPU_OK, "%s", mgpu_last_error());
    MT_CHECK(mgpu_sweep_grid_add(g, "k=1..10:4,x") == MGPU_OK, "%s", mgpu_last_error());
    MT_CHECK(mgpu_sweep_grid_axes(g) == 3 && mgpu_sweep_grid_size(g) == 3 * 2 * 4, "size %lld", (long long)mgpu_sweep_grid_size(g));
    MT_CHECK(strcmp(mgpu_sweep_grid_name(g, 1), "alpha") == 0 && mgpu_sweep_grid_count(g, 2) == 4, "axis 1/2");
    MT_CHECK(strcmp(mgpu_sweep_grid_value(g, 1, 0), "0.10") == 0, "spaces trimmed, text kept: '%s'", mgpu_sweep_grid_value(g, 1, 0));
    MT_CHECK(strcmp(mgpu_sweep_grid_value(g, 2, 1), "5") == 0 && strcmp(mgpu_sweep_grid_value(g, 2, 2), "9") == 0 &&
             strcmp(mgpu_sweep_grid_value(g, 2, 3), "x") == 0, "1..10:4 is 1,5,9 then x");
    /* the first axis varies slowest, the last fastest */
    MT_CHECK(mgpu_sweep_grid_point(g, 0, v) == MGPU_OK && strcmp(v[0], "0") == 0 && strcmp(v[1], "0.10") == 0 && strcmp(v[2], "1") == 0, "point 0");
    MT_CHECK(mgpu_sweep_grid_point(g, 5, v) == MGPU_OK && strcmp(v[0], "0") == 0 && strcmp(v[1], "0.5") == 0 && strcmp(v[2], "5") == 0, "point 5");
    MT_CHECK(mgpu_sweep_grid_point(g, 23, v) == MGPU_OK && strcmp(v[0], "2") == 0 && strcmp(v[1], "0.5") == 0 && strcmp(v[2], "x") == 0, "point 23");
    MT_CHECK(mgpu_sweep_grid_point(g, 24, v) == MGPU_ERR_INVALID_ARG, "point 24 is outside");
    mgpu_sweep_grid_destroy(g);
}

static void test_grid_errors(void) {
    static const char *bad[][2] = {
        {"seed", "no '='"}, {"=1", "name"}, {"1x=2", "name"}, {"seed=", "empty value"}, {"seed=1,,2", "empty value"},
        {"seed=3..1", "bad range"}, {"seed=1..x", "bad range"}, {"seed=1..5:0", "bad range"}, {"seed=1,2,1", "appears twice"},
        {"seed=0..3,2", "appears twice"}, {"metrics=1", "reserved"}, {"run_id=1", "reserved"}, {"a-b=1", "name"},
    };
    size_t i;
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        mgpu_sweep_grid *g = mgpu_sweep_grid_create();
        mgpu_result r = mgpu_sweep_grid_add(g, bad[i][0]);
        MT_CHECK(r == MGPU_ERR_INVALID_ARG, "'%s' accepted", bad[i][0]);
        MT_CHECK(strstr(mgpu_last_error(), bad[i][0]) && strstr(mgpu_last_error(), bad[i][1]), "'%s': message '%s' lacks '%s'", bad[i][0],
                 mgpu_last_error(), bad[i][1]);
        MT_CHECK(mgpu_sweep_grid_axes(g) == 0, "a rejected axis is not added");
        mgpu_sweep_grid_destroy(g);
    }
    {
        mgpu_sweep_grid *g = mgpu_sweep_grid_create();
        mgpu_sweep_grid_add(g, "a=1");
        MT_CHECK(mgpu_sweep_grid_add(g, "a=2") == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "twice"), "a repeated axis: %s", mgpu_last_error());
        mgpu_sweep_grid_destroy(g);
    }
}

static void test_substitute(void) {
    const char *names[] = {"seed", "alpha", "metrics"}, *values[] = {"3", "0.5", "runs.d/x.metrics.jsonl"};
    char *s;
    s = mgpu_sweep_substitute("--seed={seed}", 3, names, values);
    MT_CHECK(s && strcmp(s, "--seed=3") == 0, "got '%s'", s ? s : "(null)");
    mgpu_free(s);
    s = mgpu_sweep_substitute("{alpha}/{seed}/{metrics}", 3, names, values);
    MT_CHECK(s && strcmp(s, "0.5/3/runs.d/x.metrics.jsonl") == 0, "got '%s'", s ? s : "(null)");
    mgpu_free(s);
    s = mgpu_sweep_substitute("{{seed}} {a,b} {} {\"k\":1} }", 3, names, values);
    MT_CHECK(s && strcmp(s, "{seed} {a,b} {} {\"k\":1} }") == 0, "braces that are not keys stay: got '%s'", s ? s : "(null)");
    mgpu_free(s);
    s = mgpu_sweep_substitute("--lr {lr}", 3, names, values);
    MT_CHECK(!s && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "an unknown key is an error");
    MT_CHECK(strstr(mgpu_last_error(), "{lr}") && strstr(mgpu_last_error(), "{seed}") && strstr(mgpu_last_error(), "{metrics}"),
             "the message names the key and the known ones: %s", mgpu_last_error());
    mgpu_free(s);
}

static void test_run_id(void) {
    const char *names[] = {"seed", "tag"}, *v1[] = {"3", "a/b c"}, *v2[] = {"3", "0.1"};
    char id[160], id2[160], longv[300];
    const char *vl[2] = {"1", longv};
    MT_CHECK(mgpu_sweep_run_id(2, names, v2, id, sizeof id) == MGPU_OK && strcmp(id, "seed=3,tag=0.1") == 0, "got '%s'", id);
    MT_CHECK(mgpu_sweep_run_id(2, names, v1, id, sizeof id) == MGPU_OK && strcmp(id, "seed=3,tag=a%2Fb%20c") == 0, "got '%s'", id);
    memset(longv, 'x', 250);
    longv[250] = 0;
    MT_CHECK(mgpu_sweep_run_id(2, names, vl, id, sizeof id) == MGPU_OK && strlen(id) == 117 && strncmp(id, "seed=1,tag=xxx", 14) == 0,
             "a long id is cut with a hash: '%s' (%zu)", id, strlen(id));
    longv[249] = 'y';
    mgpu_sweep_run_id(2, names, vl, id2, sizeof id2);
    MT_CHECK(strcmp(id, id2) != 0, "long ids that differ at the end still differ");
    MT_CHECK(mgpu_sweep_run_id(2, names, v2, id, 8) == MGPU_ERR_INVALID_ARG, "a small buffer is an error");
}

/* The results reader: torn and foreign lines skipped; params compared as written; metrics found. */
static void test_results_file(void) {
    char path[128];
    const char *names[] = {"seed", "alpha"}, *v0[] = {"0", "0.10"}, *v1[] = {"1", "0.10"}, *vx[] = {"0", "0.1"};
    const mgpu_json *rec;
    mgpu_sweep_results *r;
    double m = 0;
    char buf[64];
    path_in_tmp(path, sizeof path, "results.jsonl");
    write_text(path,
               "{\"run_id\":\"seed=0,alpha=0.10\",\"params\":{\"seed\":0,\"alpha\":0.10},\"status\":\"failed\",\"wall_s\":1}\n"
               "not json at all\n"
               "{\"no\":\"params\"}\n"
               "\n"
               "{\"run_id\":\"seed=0,alpha=0.10\",\"params\":{\"seed\":0,\"alpha\":0.10},\"status\":\"ok\",\"wall_s\":2.5,"
               "\"final\":{\"event\":\"final\",\"test_accuracy\":0.75}}\n"
               "{\"run_id\":\"seed=1,alpha=0.10\",\"params\":{\"seed\":1,\"alpha\":0.10},\"sta");
    mgpu_set_log_level(MGPU_LOG_ERROR); /* the skipped lines warn */
    r = mgpu_sweep_results_load(path);
    mgpu_set_log_level(MGPU_LOG_INFO);
    MT_CHECK(r && mgpu_sweep_results_count(r) == 2, "2 records (got %lld)", r ? (long long)mgpu_sweep_results_count(r) : -1LL);
    rec = mgpu_sweep_results_find(r, 2, names, v0);
    MT_CHECK(rec && rec == mgpu_sweep_results_get(r, 1), "the latest record of seed=0,alpha=0.10");
    MT_CHECK(!mgpu_sweep_results_find(r, 2, names, v1), "the torn line is not a record");
    MT_CHECK(!mgpu_sweep_results_find(r, 2, names, vx), "0.1 is not 0.10: params compare as written");
    MT_CHECK(!mgpu_sweep_results_find(r, 1, names, v0), "params must match as a whole");
    MT_CHECK(strcmp(mgpu_sweep_record_param(rec, "alpha", buf, sizeof buf), "0.10") == 0, "a number param reads back as written");
    MT_CHECK(mgpu_sweep_record_metric(rec, "wall_s", &m) && m == 2.5, "wall_s %g", m);
    MT_CHECK(mgpu_sweep_record_metric(rec, "final_test_accuracy", &m) && m == 0.75, "final_test_accuracy %g", m);
    MT_CHECK(mgpu_sweep_record_metric(rec, "final.test_accuracy", &m) && m == 0.75, "final.test_accuracy %g", m);
    MT_CHECK(!mgpu_sweep_record_metric(rec, "final_nope", &m) && !mgpu_sweep_record_metric(rec, "status", &m), "absent or not a number");
    mgpu_sweep_results_destroy(r);
    path_in_tmp(path, sizeof path, "no-such-file.jsonl");
    r = mgpu_sweep_results_load(path);
    MT_CHECK(r && mgpu_sweep_results_count(r) == 0, "a missing file is an empty result set");
    mgpu_sweep_results_destroy(r);
}

/* 8 processes append 100 lines of 3000 bytes each at once: every line arrives whole. */
static void test_append_concurrent(void) {
    char path[128], line[3000], got[4096];
    pid_t pids[8];
    int i, k, bad = 0, n = 0;
    FILE *f;
    path_in_tmp(path, sizeof path, "append.jsonl");
    for (i = 0; i < 8; i++) {
        if ((pids[i] = fork()) == 0) {
            memset(line, 'a' + i, sizeof line - 1);
            line[0] = '{';
            line[sizeof line - 2] = '}';
            line[sizeof line - 1] = 0;
            for (k = 0; k < 100; k++)
                if (mgpu_append_line(path, line) != MGPU_OK) _exit(1);
            _exit(0);
        }
    }
    for (i = 0; i < 8; i++) {
        int st = 1;
        waitpid(pids[i], &st, 0);
        MT_CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "writer %d failed", i);
    }
    f = fopen(path, "r");
    while (f && fgets(got, sizeof got, f)) {
        n++;
        if (strlen(got) != 3000 || got[0] != '{' || got[2998] != '}' || got[2999] != '\n') { bad++; continue; }
        for (k = 2; k < 2998; k++)
            if (got[k] != got[1]) { bad++; break; }
    }
    if (f) fclose(f);
    MT_CHECK(n == 800 && bad == 0, "%d lines, %d broken", n, bad);
    MT_CHECK(mgpu_append_line("/nonexistent-dir/x.jsonl", "{}") == MGPU_ERR_IO && strstr(mgpu_last_error(), "/nonexistent-dir/x.jsonl"),
             "an unwritable path names itself: %s", mgpu_last_error());
}

/* mean and sample std per group by hand; superseded records and failures left out. */
static void test_summary(void) {
    char path[128], out_path[128], text[2048];
    const char *by[] = {"alpha"}, *metrics[] = {"final_test_accuracy", "wall_s"};
    mgpu_sweep_summary_desc d;
    mgpu_sweep_results *r;
    FILE *out;
    size_t n;
    path_in_tmp(path, sizeof path, "summary.jsonl");
    path_in_tmp(out_path, sizeof out_path, "summary.csv");
#define REC(seed, alpha, status, acc, wall) \
    "{\"params\":{\"seed\":" #seed ",\"alpha\":\"" alpha "\"},\"status\":\"" status "\",\"wall_s\":" #wall \
    ",\"final\":{\"event\":\"final\",\"test_accuracy\":" #acc "}}\n"
    write_text(path, REC(0, "b", "ok", 0.5, 10) REC(1, "b", "ok", 0.7, 30)
                     REC(0, "a", "ok", 0.99, 1) REC(0, "a", "failed", 0.99, 1)    /* superseded by a failure: out */
                     REC(1, "a", "failed", 0.1, 1) REC(1, "a", "ok", 0.82, 2)     /* a failure then ok: in */
                     REC(2, "a", "ok", 0.80, 3) REC(3, "a", "ok", 0.84, 4)
                     REC(4, "a", "interrupted", 0.3, 9) REC(5, "a", "failed", 0.3, 9)
                     REC(0, "10", "ok", 0.25, 5) REC(0, "9", "ok", 0.125, 6));
#undef REC
    r = mgpu_sweep_results_load(path);
    memset(&d, 0, sizeof d);
    d.by = by; d.n_by = 1; d.metrics = metrics; d.n_metrics = 2; d.format = MGPU_SWEEP_CSV;
    out = fopen(out_path, "w+");
    MT_CHECK(r && out && mgpu_sweep_summary_print(r, &d, out) == MGPU_OK, "%s", mgpu_last_error());
    if (out) {
        rewind(out);
        n = fread(text, 1, sizeof text - 1, out);
        text[n] = 0;
        fclose(out);
        /* a: 0.82, 0.80, 0.84 -> mean 0.82, std sqrt((0 + 0.0004 + 0.0004) / 2) = 0.02; wall 2, 3, 4 -> 3 +- 1
           b: 0.5, 0.7 -> 0.6 +- sqrt(0.02) = 0.1414213562; wall 10, 30 -> 20 +- 14.14213562
           9 and 10 sort as numbers, before the letters; one run: no std */
        MT_CHECK(strcmp(text,
                        "alpha,n,final_test_accuracy_mean,final_test_accuracy_std,final_test_accuracy_n,wall_s_mean,wall_s_std,wall_s_n\n"
                        "9,1,0.125,,1,6,,1\n"
                        "10,1,0.25,,1,5,,1\n"
                        "a,3,0.82,0.02,3,3,1,3\n"
                        "b,2,0.6,0.1414213562,2,20,14.14213562,2\n") == 0,
                 "CSV:\n%s", text);
    }
    d.format = MGPU_SWEEP_MARKDOWN;
    d.n_metrics = 1;
    out = fopen(out_path, "w+");
    MT_CHECK(out && mgpu_sweep_summary_print(r, &d, out) == MGPU_OK, "%s", mgpu_last_error());
    if (out) {
        rewind(out);
        n = fread(text, 1, sizeof text - 1, out);
        text[n] = 0;
        fclose(out);
        MT_CHECK(strstr(text, "| alpha | n   | final_test_accuracy |\n| ----- | --: | ------------------: |\n") &&
                 strstr(text, "| a     | 3   | 0.8200 \xc2\xb1 0.0200     |\n") && strstr(text, "| 9     | 1   | 0.1250 \xc2\xb1 n/a        |\n"),
                 "Markdown:\n%s", text);
    }
    {
        const char *nope[] = {"beta"};
        d.by = nope;
        MT_CHECK(mgpu_sweep_summary_print(r, &d, stdout) == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "beta"), "--by beta: %s", mgpu_last_error());
        d.by = by;
        d.metrics = nope;
        MT_CHECK(mgpu_sweep_summary_print(r, &d, stdout) == MGPU_ERR_INVALID_ARG && strstr(mgpu_last_error(), "beta"), "metric beta: %s", mgpu_last_error());
    }
    mgpu_sweep_results_destroy(r);
}

static void test_file_tail(void) {
    char path[128], buf[512], text[1024];
    size_t n = 0;
    int i;
    path_in_tmp(path, sizeof path, "log.txt");
    for (i = 1; i <= 30; i++) n += (size_t)snprintf(text + n, sizeof text - n, "line %d\n", i);
    write_text(path, text);
    MT_CHECK(mgpu_file_tail(path, 0, 20, buf, sizeof buf) > 0 && strncmp(buf, "line 11\n", 8) == 0 && strcmp(buf + strlen(buf) - 7, "line 30") == 0,
             "last 20 lines: '%s'", buf);
    MT_CHECK(mgpu_file_tail(path, (int64_t)(n - 16), 20, buf, sizeof buf) > 0 && strcmp(buf, "line 29\nline 30") == 0, "from an offset: '%s'", buf);
    MT_CHECK(mgpu_file_tail(path, 0, 20, buf, 20) > 0 && strcmp(buf, "line 29\nline 30") == 0, "a small buffer drops the partial line: '%s'", buf);
    MT_CHECK(mgpu_file_tail("/nonexistent", 0, 20, buf, sizeof buf) == 0 && buf[0] == 0, "unreadable: empty");
}

/* A child in its own process group, with the environment changed as asked and its output in a file. */
static void test_spawn(void) {
    char out_path[128], text[512] = "";
    char *argv[] = {(char *)"/bin/sh", (char *)"-c", (char *)"echo \"foo=$MGPU_T_FOO home=${MGPU_T_HOME-unset}\"; exit 7", NULL};
    const char *env[] = {"MGPU_T_FOO=bar", "MGPU_T_HOME", NULL};
    mgpu_spawn_desc d;
    int pid = -1, st = 0, fd;
    FILE *f;
    path_in_tmp(out_path, sizeof out_path, "spawn.out");
    fd = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    setenv("MGPU_T_HOME", "/somewhere", 1);
    memset(&d, 0, sizeof d);
    d.argv = argv; d.env = env; d.stdout_fd = fd; d.label = "test child";
    MT_CHECK(mgpu_spawn(&d, &pid) == MGPU_OK && pid > 0, "%s", mgpu_last_error());
    MT_CHECK(pid <= 0 || getpgid(pid) == pid || kill(pid, 0) != 0, "the child leads its own process group");
    if (pid > 0) waitpid(pid, &st, 0);
    close(fd);
    MT_CHECK(WIFEXITED(st) && mgpu_wait_status_code(st) == 7, "exit code 7");
    mgpu_wait_status_describe(st, text, sizeof text);
    MT_CHECK(strcmp(text, "exited with code 7") == 0, "'%s'", text);
    f = fopen(out_path, "r");
    if (f) { if (!fgets(text, sizeof text, f)) text[0] = 0; fclose(f); }
    MT_CHECK(strcmp(text, "foo=bar home=unset\n") == 0, "environment set and unset: '%s'", text);
    MT_CHECK(strcmp(getenv("MGPU_T_HOME"), "/somewhere") == 0, "the parent's environment is untouched");
    argv[0] = (char *)"/nonexistent/program";
    MT_CHECK(mgpu_spawn(&d, &pid) == MGPU_OK, "exec failures show in the exit code, not here");
    if (pid > 0) waitpid(pid, &st, 0);
    MT_CHECK(mgpu_wait_status_code(st) == 127, "exec failure: 127 (got %d)", mgpu_wait_status_code(st));
    st = 9; /* a raw status: killed by SIGKILL */
    mgpu_wait_status_describe(st, text, sizeof text);
    MT_CHECK(strcmp(text, "was killed by signal 9 (SIGKILL)") == 0 && mgpu_wait_status_code(st) == 137, "'%s'", text);
    MT_CHECK(mgpu_program_exists("sh") && !mgpu_program_exists("no-such-program-mgpu") && mgpu_cpu_count() >= 1, "PATH lookup, cores");
}

static void test_metrics_env_default(void) {
    mgpu_train_opts o;
    char *argv[] = {(char *)"prog", (char *)"--metrics", (char *)"given.jsonl", NULL};
    setenv("MGPU_METRICS", "from-env.jsonl", 1);
    mgpu_train_opts_default(&o);
    MT_CHECK(o.metrics && strcmp(o.metrics, "from-env.jsonl") == 0, "$MGPU_METRICS is the default --metrics");
    MT_CHECK(mgpu_train_opts_parse(&o, 3, argv) == MGPU_OK && strcmp(o.metrics, "given.jsonl") == 0, "--metrics overrides it");
    setenv("MGPU_METRICS", "", 1);
    mgpu_train_opts_default(&o);
    MT_CHECK(o.metrics == NULL, "empty: no metrics");
    unsetenv("MGPU_METRICS");
    mgpu_train_opts_default(&o);
    MT_CHECK(o.metrics == NULL, "unset: no metrics");
}

/* A stand-in nvidia-smi: an executable shell script in the scratch directory. */
static void fake_program(char *path, size_t size, const char *name, const char *script) {
    path_in_tmp(path, size, name);
    write_text(path, script);
    chmod(path, 0755);
}

/* GPUs found without CUDA, from each source in turn, with stand-ins for nvidia-smi and /proc. */
static void test_find_gpus(void) {
    char smi[128], proc[128], dir[192], info[256], how[512];
    const char *saved = getenv("CUDA_VISIBLE_DEVICES");
    char *saved_copy = saved ? strdup(saved) : NULL;
    mgpu_gpu_info g[4];
    mgpu_gpu_sources src;
    double t0;
    int n;
    memset(&src, 0, sizeof src);
    unsetenv("CUDA_VISIBLE_DEVICES");
    /* --query-gpu answers: indices, names and memory as nvidia-smi prints them */
    fake_program(smi, sizeof smi, "smi_query",
                 "#!/bin/sh\ncase \"$*\" in *--query-gpu=index,name,memory.total*--format=csv,noheader*)\n"
                 "  printf '0, NVIDIA H200, 143771 MiB\\n1, NVIDIA H200, 143771 MiB\\n';; *) exit 9;; esac\n");
    src.nvidia_smi = smi; src.proc_dir = "";
    n = mgpu_find_gpus(&src, g, 4, how, sizeof how);
    MT_CHECK(n == 2 && strcmp(g[0].id, "0") == 0 && strcmp(g[1].id, "1") == 0 && strcmp(g[1].name, "NVIDIA H200") == 0 &&
             g[1].memory_mib == 143771 && strcmp(how, "nvidia-smi --query-gpu") == 0,
             "query: %d GPUs, '%s' '%s' %lld, how '%s'", n, g[0].id, g[1].name, (long long)g[1].memory_mib, how);
    MT_CHECK(mgpu_find_gpus(&src, g, 1, NULL, 0) == 1, "max 1: one GPU filled");
    /* an nvidia-smi without --query-gpu: -L (its MIG lines are not GPUs of their own) */
    fake_program(smi, sizeof smi, "smi_list",
                 "#!/bin/sh\nif [ \"$1\" = -L ]; then printf 'GPU 0: Tesla V100 (UUID: GPU-aa)\\n  MIG 1g.5gb Device 0: (UUID: MIG-bb)\\n"
                 "GPU 1: Tesla V100 (UUID: GPU-cc)\\nGPU 2: Tesla T4 (UUID: GPU-dd)\\n'; else echo 'Invalid combination'; exit 2; fi\n");
    n = mgpu_find_gpus(&src, g, 4, how, sizeof how);
    MT_CHECK(n == 3 && strcmp(g[2].id, "2") == 0 && strcmp(g[2].name, "Tesla T4") == 0 && g[2].memory_mib == 0 && strcmp(how, "nvidia-smi -L") == 0,
             "-L: %d GPUs, '%s' '%s', how '%s'", n, g[2].id, g[2].name, how);
    /* nvidia-smi fails: /proc/driver/nvidia/gpus, in PCI bus order */
    fake_program(smi, sizeof smi, "smi_none", "#!/bin/sh\necho 'No devices were found'\nexit 6\n");
    path_in_tmp(proc, sizeof proc, "proc_gpus");
    snprintf(dir, sizeof dir, "%s/0000:b1:00.0", proc);
    MT_CHECK(mgpu_make_dirs(dir) == MGPU_OK, "%s", mgpu_last_error());
    snprintf(info, sizeof info, "%s/information", dir);
    write_text(info, "Model: \t NVIDIA H100 80GB HBM3\nIRQ:   1\n");
    snprintf(dir, sizeof dir, "%s/0000:3b:00.0", proc);
    MT_CHECK(mgpu_make_dirs(dir) == MGPU_OK, "%s", mgpu_last_error());
    snprintf(info, sizeof info, "%s/information", dir);
    write_text(info, "Model: \t NVIDIA A100-SXM4-40GB\n");
    src.proc_dir = proc;
    n = mgpu_find_gpus(&src, g, 4, how, sizeof how);
    MT_CHECK(n == 2 && strcmp(g[0].id, "0") == 0 && strcmp(g[0].name, "NVIDIA A100-SXM4-40GB") == 0 && strcmp(g[1].name, "NVIDIA H100 80GB HBM3") == 0 &&
             strcmp(how, proc) == 0, "proc: %d GPUs, '%s' '%s', how '%s'", n, g[0].name, g[1].name, how);
    /* nothing anywhere: the reasons, each source named */
    src.proc_dir = "/nonexistent/gpus";
    n = mgpu_find_gpus(&src, g, 4, how, sizeof how);
    MT_CHECK(n == 0 && strstr(how, "smi_none: exited with code 6: No devices were found") && strstr(how, "/nonexistent/gpus: absent"), "none: '%s'", how);
    src.nvidia_smi = "/nonexistent/nvidia-smi";
    n = mgpu_find_gpus(&src, g, 4, how, sizeof how);
    MT_CHECK(n == 0 && strstr(how, "/nonexistent/nvidia-smi: not found"), "no nvidia-smi: '%s'", how);
    /* a hung nvidia-smi is killed after the timeout */
    fake_program(smi, sizeof smi, "smi_hang", "#!/bin/sh\nsleep 30\n");
    src.nvidia_smi = smi; src.proc_dir = ""; src.timeout_s = 0.3;
    t0 = mgpu_time_s();
    n = mgpu_find_gpus(&src, g, 4, how, sizeof how);
    MT_CHECK(n == 0 && strstr(how, "no answer in 0.3 s") && mgpu_time_s() - t0 < 5, "hang: '%s' after %.1f s", how, mgpu_time_s() - t0);
    /* CUDA_VISIBLE_DEVICES first: its entries as written, up to the first CUDA would not take */
    src.nvidia_smi = "/nonexistent/nvidia-smi";
    setenv("CUDA_VISIBLE_DEVICES", "2, GPU-5d2e,-1,3", 1);
    n = mgpu_find_gpus(&src, g, 4, how, sizeof how);
    MT_CHECK(n == 2 && strcmp(g[0].id, "2") == 0 && strcmp(g[1].id, "GPU-5d2e") == 0 && strstr(how, "CUDA_VISIBLE_DEVICES=2, GPU-5d2e"),
             "CUDA_VISIBLE_DEVICES: %d, '%s', how '%s'", n, g[1].id, how);
    setenv("CUDA_VISIBLE_DEVICES", "", 1);
    n = mgpu_find_gpus(&src, g, 4, how, sizeof how);
    MT_CHECK(n == 0 && strstr(how, "set but empty"), "empty CUDA_VISIBLE_DEVICES: %d, '%s'", n, how);
    src.ignore_visible_devices = 1;
    src.nvidia_smi = smi; src.proc_dir = proc;
    fake_program(smi, sizeof smi, "smi_none", "#!/bin/sh\nexit 6\n");
    n = mgpu_find_gpus(&src, g, 4, how, sizeof how);
    MT_CHECK(n == 2 && strcmp(how, proc) == 0, "ignore_visible_devices: %d from '%s'", n, how);
    MT_CHECK(mgpu_find_gpus(NULL, g, 0, how, sizeof how) == -1 && mgpu_last_result() == MGPU_ERR_INVALID_ARG, "max 0 is an error");
    if (saved_copy) setenv("CUDA_VISIBLE_DEVICES", saved_copy, 1);
    else unsetenv("CUDA_VISIBLE_DEVICES");
    free(saved_copy);
}

/* A scratch directory for the test's files, removed at exit. */
static void remove_tmpdir(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (tmpdir[0] && system(cmd) != 0) printf("  note: could not remove %s\n", tmpdir);
}

int main(void) {
    strcpy(tmpdir, "/tmp/mgpu_test_sweep_XXXXXX");
    if (!mkdtemp(tmpdir) || atexit(remove_tmpdir) != 0) return perror("mkdtemp"), 1;
    MT_RUN(test_grid);
    MT_RUN(test_grid_errors);
    MT_RUN(test_substitute);
    MT_RUN(test_run_id);
    MT_RUN(test_results_file);
    MT_RUN(test_append_concurrent);
    MT_RUN(test_summary);
    MT_RUN(test_file_tail);
    MT_RUN(test_spawn);
    MT_RUN(test_metrics_env_default);
    MT_RUN(test_find_gpus);
    return MT_END();
}
