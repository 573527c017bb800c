/* ======================================================================================
   Checkpoints
   ====================================================================================== */

/* Training checkpoints laid out like the Hugging Face Trainer's, with safetensors files:
       DIR/step-00001234/model.safetensors       parameters and buffers under state_dict names
       DIR/step-00001234/optimizer.safetensors   "<param>.exp_avg", ... and "<param>.step" (I64 scalars)
       DIR/step-00001234/trainer_state.json      position, schedule, scaler, RNG, metrics, options
       DIR/latest                                 "step-00001234\n"
   A checkpoint is written into step-00001234.tmp/ (each file fsynced), renamed into place, and only
   then named by `latest` (itself replaced atomically): a crash at any moment leaves the previous
   checkpoint whole. Loading validates every file before anything is modified. */

#define MGPU__CKPT_FORMAT_VERSION 1
#define MGPU__CKPT_PATH_MAX 4096
#define MGPU__CKPT_MODEL "model.safetensors"
#define MGPU__CKPT_OPTIM "optimizer.safetensors"
#define MGPU__CKPT_STATE "trainer_state.json"

/* --------------------------------------------------------------------------------------
   Paths and directories
   -------------------------------------------------------------------------------------- */

static mgpu_result mgpu__path_join(char *out, const char *dir, const char *name) {
    if (snprintf(out, MGPU__CKPT_PATH_MAX, "%s/%s", dir, name) >= MGPU__CKPT_PATH_MAX)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "path '%s/%s' is too long", dir, name);
    return MGPU_OK;
}

/* mkdir -p */
static mgpu_result mgpu__mkdirs(const char *path) {
    char buf[MGPU__CKPT_PATH_MAX];
    size_t i, n = strlen(path);
    if (n == 0 || n >= sizeof buf) return mgpu__fail(MGPU_ERR_INVALID_ARG, "directory path '%s' is empty or too long", path);
    memcpy(buf, path, n + 1);
    for (i = 1; i <= n; i++) {
        if (buf[i] != '/' && buf[i] != 0) continue;
        buf[i] = 0;
        if (mkdir(buf, 0777) != 0 && errno != EEXIST)
            return mgpu__fail(MGPU_ERR_IO, "cannot create directory '%s': %s", buf, strerror(errno));
        if (i < n) buf[i] = '/';
    }
    return MGPU_OK;
}

static int mgpu__is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* rm -r for checkpoint directories (plain files and a few levels of folders); 0 or an errno. */
static int mgpu__remove_tree(const char *path, int depth) {
    struct stat st;
    struct dirent *e;
    DIR *d;
    int err = 0;
    if (lstat(path, &st) != 0) return errno == ENOENT ? 0 : errno;
    if (!S_ISDIR(st.st_mode)) return unlink(path) == 0 || errno == ENOENT ? 0 : errno;
    if (depth > 8) return ELOOP;
    if (!(d = opendir(path))) return errno;
    while (!err && (e = readdir(d)) != NULL) {
        char child[MGPU__CKPT_PATH_MAX];
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        if (snprintf(child, sizeof child, "%s/%s", path, e->d_name) >= (int)sizeof child) err = ENAMETOOLONG;
        else err = mgpu__remove_tree(child, depth + 1);
    }
    closedir(d);
    if (!err && rmdir(path) != 0) err = errno;
    return err;
}

/* "step-00001234" (8 or more digits, nothing after) -> 1 and *step; 0 for anything else. */
static int mgpu__ckpt_step_of_name(const char *name, int64_t *step) {
    const char *p;
    int64_t v = 0;
    if (strncmp(name, "step-", 5) != 0) return 0;
    for (p = name + 5; *p; p++) {
        if (!mgpu__is_digit(*p) || v > (INT64_MAX - 9) / 10) return 0;
        v = v * 10 + (*p - '0');
    }
    if (p - (name + 5) < 8) return 0;
    *step = v;
    return 1;
}

/* Leftovers of an interrupted save: step-*.tmp directories and latest.tmp.<pid> files. */
static int mgpu__ckpt_is_stale_name(const char *name) {
    size_t n = strlen(name);
    return (strncmp(name, "step-", 5) == 0 && n > 9 && strcmp(name + n - 4, ".tmp") == 0) || strncmp(name, "latest.tmp.", 11) == 0;
}

static int mgpu__cmp_i64_desc(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* Steps of the step-* directories in dir, newest first (free *steps with mgpu_free). */
static mgpu_result mgpu__ckpt_list_steps(const char *dir, int64_t **steps, int *n) {
    struct dirent *e;
    DIR *d;
    int cap = 0;
    *steps = NULL; *n = 0;
    if (!(d = opendir(dir))) return mgpu__fail(MGPU_ERR_IO, "cannot list checkpoint directory '%s': %s", dir, strerror(errno));
    while ((e = readdir(d)) != NULL) {
        char path[MGPU__CKPT_PATH_MAX];
        int64_t step;
        if (!mgpu__ckpt_step_of_name(e->d_name, &step) || mgpu__path_join(path, dir, e->d_name) != MGPU_OK || !mgpu__is_dir(path)) continue;
        if (*n == cap) {
            int64_t *grown = (int64_t *)mgpu__grow(*steps, &cap, *n + 1, sizeof(int64_t), "the checkpoint list");
            if (!grown) { closedir(d); mgpu_free(*steps); *steps = NULL; *n = 0; return MGPU_ERR_OOM_HOST; }
            *steps = grown;
        }
        (*steps)[(*n)++] = step;
    }
    closedir(d);
    if (*n > 1) qsort(*steps, (size_t)*n, sizeof(int64_t), mgpu__cmp_i64_desc);
    return MGPU_OK;
}

static void mgpu__ckpt_dir_name(char *out, size_t size, int64_t step) { snprintf(out, size, "step-%08lld", (long long)step); }

/* Removes what an interrupted save left behind; failures are only logged. */
static void mgpu__ckpt_remove_stale(const char *dir) {
    struct dirent *e;
    DIR *d = opendir(dir);
    if (!d) return;
    while ((e = readdir(d)) != NULL) {
        char path[MGPU__CKPT_PATH_MAX];
        int err;
        if (!mgpu__ckpt_is_stale_name(e->d_name) || mgpu__path_join(path, dir, e->d_name) != MGPU_OK) continue;
        if ((err = mgpu__remove_tree(path, 0)) != 0) mgpu_log(MGPU_LOG_WARN, "cannot remove the stale checkpoint leftover '%s': %s", path, strerror(err));
        else mgpu_log(MGPU_LOG_INFO, "removed '%s', left by an interrupted checkpoint save", path);
    }
    closedir(d);
}

/* Keeps the newest keep_last step-* directories (always including keep_step); failures are logged. */
static void mgpu__ckpt_prune(const char *dir, int keep_last, int64_t keep_step) {
    int64_t *steps = NULL;
    int n = 0, i, kept = 1;
    if (keep_last <= 0 || mgpu__ckpt_list_steps(dir, &steps, &n) != MGPU_OK) return;
    for (i = 0; i < n; i++) {
        char name[40], path[MGPU__CKPT_PATH_MAX];
        int err;
        if (steps[i] == keep_step) continue;
        if (kept < keep_last) { kept++; continue; }
        mgpu__ckpt_dir_name(name, sizeof name, steps[i]);
        if (mgpu__path_join(path, dir, name) != MGPU_OK) continue;
        if ((err = mgpu__remove_tree(path, 0)) != 0) mgpu_log(MGPU_LOG_WARN, "cannot prune old checkpoint '%s': %s", path, strerror(err));
    }
    mgpu_free(steps);
}

/* --------------------------------------------------------------------------------------
   trainer_state.json: typed fields, checked before anything is loaded
   -------------------------------------------------------------------------------------- */

typedef enum mgpu__jkind { MGPU__J_INT, MGPU__J_U64, MGPU__J_NUMBER, MGPU__J_OBJECT, MGPU__J_ARRAY, MGPU__J_STRING } mgpu__jkind;
typedef struct mgpu__jfield { const char *key; mgpu__jkind kind; int required; int64_t min; } mgpu__jfield;

/* A JSON integer in [0, 2^64) (seeds and RNG offsets use the full uint64 range). */
static int mgpu__json_u64(const mgpu_json *j, uint64_t *out) {
    char text[24];
    size_t i;
    unsigned long long v;
    if (!j || j->type != MGPU_JSON_NUMBER || !j->raw || j->raw_len == 0 || j->raw_len >= sizeof text) return 0;
    for (i = 0; i < j->raw_len; i++) if (!mgpu__is_digit(j->raw[i])) return 0;
    memcpy(text, j->raw, j->raw_len);
    text[j->raw_len] = 0;
    errno = 0;
    v = strtoull(text, NULL, 10);
    if (errno == ERANGE) return 0;
    if (out) *out = (uint64_t)v;
    return 1;
}

static int mgpu__jfield_ok(const mgpu_json *v, const mgpu__jfield *f) {
    int64_t i = 0;
    switch (f->kind) {
    case MGPU__J_INT: return mgpu_json_int64(v, &i) && i >= f->min;
    case MGPU__J_U64: return mgpu__json_u64(v, NULL);
    case MGPU__J_NUMBER: return v->type == MGPU_JSON_NUMBER || v->type == MGPU_JSON_NULL; /* null: a non-finite value */
    case MGPU__J_OBJECT: return v->type == MGPU_JSON_OBJECT;
    case MGPU__J_ARRAY: return v->type == MGPU_JSON_ARRAY;
    case MGPU__J_STRING: return v->type == MGPU_JSON_STRING;
    }
    return 0;
}

static const char *mgpu__jkind_text(const mgpu__jfield *f, char *buf, size_t size) {
    switch (f->kind) {
    case MGPU__J_INT: snprintf(buf, size, "an integer >= %lld", (long long)f->min); return buf;
    case MGPU__J_U64: return "an integer in [0, 2^64)";
    case MGPU__J_NUMBER: return "a number";
    case MGPU__J_OBJECT: return "an object";
    case MGPU__J_ARRAY: return "an array";
    case MGPU__J_STRING: return "a string";
    }
    return "?";
}

/* Every field present when required and of its kind when present; errors name label and "where.key". */
static mgpu_result mgpu__json_check_fields(const mgpu_json *obj, const char *label, const char *where, const mgpu__jfield *fields, int n) {
    char kind[48];
    int i;
    for (i = 0; i < n; i++) {
        const mgpu_json *v = mgpu_json_get(obj, fields[i].key);
        if (!v && fields[i].required)
            return mgpu__fail(MGPU_ERR_FORMAT, "%s: \"%s%s\" is missing", label, where, fields[i].key);
        if (v && !mgpu__jfield_ok(v, &fields[i]))
            return mgpu__fail(MGPU_ERR_FORMAT, "%s: \"%s%s\" must be %s", label, where, fields[i].key, mgpu__jkind_text(&fields[i], kind, sizeof kind));
    }
    return MGPU_OK;
}

/* What every checkpoint's state must satisfy; the trainer adds its own required fields on resume. */
static mgpu_result mgpu__ckpt_check_state(const mgpu_json *s, const char *label) {
    static const mgpu__jfield top[] = {
        {"format_version", MGPU__J_INT, 1, 1}, {"step", MGPU__J_INT, 1, 0}, {"epoch", MGPU__J_INT, 0, 0},
        {"batch_in_epoch", MGPU__J_INT, 0, 0}, {"world_size", MGPU__J_INT, 0, 1}, {"rng", MGPU__J_OBJECT, 0, 0},
        {"scaler", MGPU__J_OBJECT, 0, 0}, {"schedule", MGPU__J_OBJECT, 0, 0}, {"metrics", MGPU__J_ARRAY, 0, 0},
        {"options", MGPU__J_OBJECT, 0, 0}, {"epoch_stats", MGPU__J_OBJECT, 0, 0}};
    static const mgpu__jfield rng[] = {{"seed", MGPU__J_U64, 1, 0}, {"offset", MGPU__J_U64, 1, 0}};
    static const mgpu__jfield scaler[] = {{"scale", MGPU__J_NUMBER, 1, 0}, {"growth_tracker", MGPU__J_INT, 1, 0}};
    const mgpu_json *v, *m;
    int64_t version = 0;
    double scale;
    if (!s || s->type != MGPU_JSON_OBJECT) return mgpu__fail(MGPU_ERR_FORMAT, "%s: the top level is not a JSON object", label);
    if (mgpu__json_check_fields(s, label, "", top, (int)(sizeof top / sizeof top[0])) != MGPU_OK) return MGPU_ERR_FORMAT;
    mgpu_json_int64(mgpu_json_get(s, "format_version"), &version);
    if (version != MGPU__CKPT_FORMAT_VERSION)
        return mgpu__fail(MGPU_ERR_FORMAT, "%s: format_version %lld is not supported (this mgpu reads version %d)", label, (long long)version,
                          MGPU__CKPT_FORMAT_VERSION);
    if ((v = mgpu_json_get(s, "rng")) && mgpu__json_check_fields(v, label, "rng.", rng, 2) != MGPU_OK) return MGPU_ERR_FORMAT;
    if ((v = mgpu_json_get(s, "scaler"))) {
        if (mgpu__json_check_fields(v, label, "scaler.", scaler, 2) != MGPU_OK) return MGPU_ERR_FORMAT;
        scale = mgpu_json_get(v, "scale")->number;
        if (mgpu_json_get(v, "scale")->type != MGPU_JSON_NUMBER || !(scale > 0) || !isfinite(scale))
            return mgpu__fail(MGPU_ERR_FORMAT, "%s: \"scaler.scale\" must be a positive finite number", label);
    }
    if ((v = mgpu_json_get(s, "metrics")))
        for (m = v->child; m; m = m->next)
            if (m->type != MGPU_JSON_OBJECT) return mgpu__fail(MGPU_ERR_FORMAT, "%s: \"metrics\" must hold one object per epoch", label);
    return MGPU_OK;
}

static mgpu_json *mgpu__ckpt_parse_state(const char *text, size_t len, const char *label) {
    mgpu_json *j = mgpu_json_parse(text, len, label); /* MGPU_ERR_FORMAT naming label and offset */
    if (j && mgpu__ckpt_check_state(j, label) != MGPU_OK) { mgpu_json_free(j); return NULL; }
    return j;
}


/* The metadata checksum, when present, must match the data section. */
static mgpu_result mgpu__st_check_checksum(const mgpu_safetensors *st) {
    const char *want = mgpu_safetensors_metadata(st, "checksum");
    char got[40];
    uint64_t hlen = 0;
    mgpu__hash64 h;
    int i;
    if (!want) return MGPU_OK;
    for (i = 7; i >= 0; i--) hlen = (hlen << 8) | st->bytes[i];
    mgpu__hash64_init(&h);
    mgpu__hash64_update(&h, st->bytes + 8 + hlen, st->len - 8 - (size_t)hlen);
    mgpu__checksum_text(mgpu__hash64_final(&h), got, sizeof got);
    if (strcmp(want, got) != 0)
        return mgpu__st_error(MGPU_ERR_FORMAT, st->label, NULL, "the data does not match its checksum (%.40s in the header, %s computed): the file is corrupt", want, got);
    return MGPU_OK;
}

/* Opens and validates a checkpoint's safetensors file: structure, then checksum. */
static mgpu_safetensors *mgpu__ckpt_st_checked(mgpu_safetensors *st) {
    if (st && mgpu__st_check_checksum(st) != MGPU_OK) { mgpu_safetensors_close(st); return NULL; }
    return st;
}

/* --------------------------------------------------------------------------------------
   The tensors of a checkpoint
   -------------------------------------------------------------------------------------- */

/* The optimizer's checkpoint tensors: its state tensors, then one I64 scalar "<param>.step" per
   parameter (PyTorch's per-parameter state["step"]) whose values live in steps[]. */
typedef struct mgpu__optim_tensors {
    mgpu__model_tensors list;
    int n_params;
    char **step_names; mgpu_tensor *step_tensors; int64_t *steps;
} mgpu__optim_tensors;

static void mgpu__optim_tensors_free(mgpu__optim_tensors *ot) {
    int i;
    for (i = 0; ot->step_names && i < ot->n_params; i++) mgpu_free(ot->step_names[i]);
    mgpu_free(ot->step_names);
    mgpu_free(ot->step_tensors);
    mgpu_free(ot->steps);
    mgpu__model_tensors_free(&ot->list);
    memset(ot, 0, sizeof *ot);
}

static mgpu_result mgpu__optim_tensors_collect(const mgpu_optimizer *o, mgpu__optim_tensors *ot) {
    int i, ns = o->n_states, np = o->n_params;
    memset(ot, 0, sizeof *ot);
    ot->n_params = np;
    ot->list.n = ns + np;
    ot->list.names = (const char **)mgpu__calloc(sizeof(char *) * (size_t)(ot->list.n + 1), "the optimizer's checkpoint list");
    ot->list.tensors = (mgpu_tensor **)mgpu__calloc(sizeof(mgpu_tensor *) * (size_t)(ot->list.n + 1), "the optimizer's checkpoint list");
    ot->step_names = (char **)mgpu__calloc(sizeof(char *) * (size_t)(np + 1), "the optimizer's checkpoint list");
    ot->step_tensors = (mgpu_tensor *)mgpu__calloc(sizeof(mgpu_tensor) * (size_t)(np + 1), "the optimizer's checkpoint list");
    ot->steps = (int64_t *)mgpu__calloc(sizeof(int64_t) * (size_t)(np + 1), "the optimizer's checkpoint list");
    if (!ot->list.names || !ot->list.tensors || !ot->step_names || !ot->step_tensors || !ot->steps) return MGPU_ERR_OOM_HOST;
    for (i = 0; i < ns; i++) { ot->list.names[i] = o->states[i].name; ot->list.tensors[i] = o->states[i].tensor; }
    for (i = 0; i < np; i++) {
        if (!(ot->step_names[i] = mgpu__join_name(o->model->params.items[i].name, "step"))) return MGPU_ERR_OOM_HOST;
        ot->steps[i] = o->params[i].steps;
        mgpu__tensor_init_header(&ot->step_tensors[i], o->model->ctx, MGPU_I64, 0, NULL, 1);
        ot->step_tensors[i].device.type = MGPU_DEVICE_CPU; /* host memory, whatever the model's device */
        ot->step_tensors[i].device.index = 0;
        ot->step_tensors[i].data = &ot->steps[i];
        ot->list.names[ns + i] = ot->step_names[i];
        ot->list.tensors[ns + i] = &ot->step_tensors[i];
    }
    return MGPU_OK;
}

static const char *mgpu__optimizer_type_name(mgpu_optimizer_type t) {
    return t == MGPU_OPTIM_SGD ? "sgd" : t == MGPU_OPTIM_ADAM ? "adam" : "adamw";
}

/* --------------------------------------------------------------------------------------
   Saving: a job lists every tensor of the two files (headers pointing at the live tensors, or at a
   host snapshot in background mode) plus the state text, and runs on either thread.
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__ckpt_job {
    char dir[MGPU__CKPT_PATH_MAX];
    int keep_last;
    int64_t step;
    int n_model, n_total;            /* tensors [0, n_model) go to model.safetensors, the rest to optimizer.safetensors */
    char **names;
    mgpu_tensor *tensors;            /* header copies */
    int64_t *param_steps;            /* values of the "<param>.step" tensors */
    char *state_json;
    char optim_type[16], optim_steps[24];
    size_t reserve_bytes;            /* > 0: this job only allocates the snapshot buffer (into reserved) */
    void *reserved;
    mgpu_result result;
    char error[1024];
} mgpu__ckpt_job;

static void mgpu__ckpt_job_free(mgpu__ckpt_job *j) {
    int i;
    if (!j) return;
    for (i = 0; j->names && i < j->n_total; i++) mgpu_free(j->names[i]);
    mgpu_free(j->names);
    mgpu_free(j->tensors);
    mgpu_free(j->param_steps);
    mgpu_free(j->state_json);
    mgpu_free(j->reserved);
    mgpu_free(j);
}

/* Appends list's tensors to the job (names copied: the model may change while a write runs). */
static mgpu_result mgpu__ckpt_job_add(mgpu__ckpt_job *j, const mgpu__model_tensors *list) {
    int i;
    for (i = 0; i < list->n; i++, j->n_total++) {
        if (!(j->names[j->n_total] = mgpu__strdup(list->names[i]))) return MGPU_ERR_OOM_HOST;
        j->tensors[j->n_total] = *list->tensors[i];
        j->tensors[j->n_total].grad = NULL;
        j->tensors[j->n_total].node = NULL;
        j->tensors[j->n_total].owns_data = 0;
    }
    return MGPU_OK;
}

static mgpu_result mgpu__ckpt_job_fill(mgpu__ckpt_job *j, const mgpu_model *m, const mgpu_optimizer *o) {
    mgpu__model_tensors mt;
    mgpu__optim_tensors ot;
    mgpu_result r;
    int n;
    memset(&mt, 0, sizeof mt);
    memset(&ot, 0, sizeof ot);
    r = mgpu__model_tensors_collect(m, &mt, "mgpu_checkpointer_save");
    if (r == MGPU_OK && o) r = mgpu__optim_tensors_collect(o, &ot);
    n = mt.n + ot.list.n;
    if (r == MGPU_OK) {
        j->names = (char **)mgpu__calloc(sizeof(char *) * (size_t)(n + 1), "a checkpoint");
        j->tensors = (mgpu_tensor *)mgpu__calloc(sizeof(mgpu_tensor) * (size_t)(n + 1), "a checkpoint");
        j->param_steps = (int64_t *)mgpu__calloc(sizeof(int64_t) * (size_t)(ot.n_params + 1), "a checkpoint");
        if (!j->names || !j->tensors || !j->param_steps) r = MGPU_ERR_OOM_HOST;
    }
    if (r == MGPU_OK && (r = mgpu__ckpt_job_add(j, &mt)) == MGPU_OK) {
        j->n_model = j->n_total;
        r = mgpu__ckpt_job_add(j, &ot.list);
    }
    if (r == MGPU_OK && o) {
        int i;
        /* the step scalars point into the job's own copy of the counts */
        for (i = 0; i < ot.n_params; i++) {
            j->param_steps[i] = ot.steps[i];
            j->tensors[j->n_model + o->n_states + i].data = &j->param_steps[i];
        }
        snprintf(j->optim_type, sizeof j->optim_type, "%s", mgpu__optimizer_type_name(o->desc.type));
        snprintf(j->optim_steps, sizeof j->optim_steps, "%lld", (long long)o->step_count);
    }
    mgpu__optim_tensors_free(&ot);
    mgpu__model_tensors_free(&mt);
    return r;
}

/* Bytes of the job's snapshot: every tensor, each 64-byte aligned. */
static size_t mgpu__ckpt_snapshot_bytes(const mgpu__ckpt_job *j) {
    size_t total = 0;
    int i;
    for (i = 0; i < j->n_total; i++) total += (mgpu_tensor_nbytes(&j->tensors[i]) + 63) & ~(size_t)63;
    return total;
}

/* A snapshot buffer with its pages already faulted in: one madvise is several times cheaper than
   a page fault per 4 KiB on first touch (about 1.5 s for a 1.2 GB checkpoint in a VM). */
static void *mgpu__ckpt_alloc_snapshot(size_t bytes) {
    void *p = mgpu__alloc(bytes, "a checkpoint snapshot");
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
    if (p) {
        uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), begin = ((uintptr_t)p + page - 1) & ~(page - 1),
                  end = ((uintptr_t)p + bytes) & ~(page - 1);
        if (end > begin) (void)madvise((void *)begin, end - begin, MADV_POPULATE_WRITE); /* a hint: old kernels fault on touch */
    }
#endif
    return p;
}

/* Background mode: every tensor (on the host or a device) copied into one host buffer, so training
   may change them. The buffer is kept between saves (and can be reserved ahead, see
   mgpu__checkpointer_reserve): fresh memory costs page faults, which would otherwise be paid on
   the training thread at every save. */
static mgpu_result mgpu__ckpt_job_snapshot(mgpu__ckpt_job *j, void **buffer, size_t *capacity) {
    size_t total = mgpu__ckpt_snapshot_bytes(j), at = 0;
    int i;
    if (total > *capacity) {
        mgpu_free(*buffer);
        *capacity = 0;
        if (!(*buffer = mgpu__ckpt_alloc_snapshot(total))) return MGPU_ERR_OOM_HOST;
        *capacity = total;
    }
    for (i = 0; i < j->n_total; i++) {
        mgpu_tensor *t = &j->tensors[i];
        size_t bytes = mgpu_tensor_nbytes(t);
        mgpu_result r = mgpu__tensor_get_bytes(t, 0, (char *)*buffer + at, bytes, "mgpu_checkpointer_save: snapshot of a device tensor");
        if (r != MGPU_OK) return r;
        t->data = (char *)*buffer + at;
        t->device.type = MGPU_DEVICE_CPU; t->device.index = 0;
        at += (bytes + 63) & ~(size_t)63;
    }
    return MGPU_OK;
}

/* Tensors [begin, end) of the job as one safetensors file; values[0] becomes the checksum of the
   data section (the tensors' bytes in order, as the file lays them out), computed as it is written. */
static mgpu_result mgpu__ckpt_job_write_st(const mgpu__ckpt_job *j, const char *dir, const char *file, int begin, int end,
                                           int n_meta, const char **keys, const char **values) {
    const mgpu_tensor **ptrs = (const mgpu_tensor **)mgpu__alloc(sizeof(mgpu_tensor *) * (size_t)(end - begin + 1), "a checkpoint file");
    char path[MGPU__CKPT_PATH_MAX];
    mgpu_result r;
    int i;
    if (!ptrs) return MGPU_ERR_OOM_HOST;
    for (i = begin; i < end; i++) ptrs[i - begin] = &j->tensors[i];
    keys[0] = "checksum"; values[0] = "";
    if ((r = mgpu__path_join(path, dir, file)) == MGPU_OK)
        r = mgpu__st_save(path, end - begin, (const char *const *)(j->names + begin), ptrs, n_meta, keys, values, 0);
    mgpu_free((void *)ptrs);
    return r;
}

static mgpu_result mgpu__ckpt_job_write_files(const mgpu__ckpt_job *j, const char *tmp) {
    const char *keys[4], *values[4];
    char path[MGPU__CKPT_PATH_MAX];
    mgpu_result r;
    keys[1] = "format"; values[1] = "pt";   /* PyTorch's safetensors.torch.save_file marker */
    if ((r = mgpu__ckpt_job_write_st(j, tmp, MGPU__CKPT_MODEL, 0, j->n_model, 2, keys, values)) != MGPU_OK) return r;
    keys[1] = "format"; values[1] = "mgpu";
    keys[2] = "optimizer"; values[2] = j->optim_type;
    keys[3] = "step_count"; values[3] = j->optim_steps;
    if ((r = mgpu__ckpt_job_write_st(j, tmp, MGPU__CKPT_OPTIM, j->n_model, j->n_total, j->optim_type[0] ? 4 : 2, keys, values)) != MGPU_OK)
        return r;
    if ((r = mgpu__path_join(path, tmp, MGPU__CKPT_STATE)) != MGPU_OK) return r;
    return mgpu_write_file_atomic(path, j->state_json, strlen(j->state_json));
}

/* tmp/ becomes final/. An existing final/ (the same step saved again) is swapped out atomically
   where the system can (renameat2), else removed first. */
static mgpu_result mgpu__ckpt_install(const char *tmp, const char *final) {
    int err;
    if (mgpu__is_dir(final)) {
#if defined(__linux__) && defined(RENAME_EXCHANGE)
        if (renameat2(AT_FDCWD, tmp, AT_FDCWD, final, RENAME_EXCHANGE) == 0) {
            mgpu__remove_tree(tmp, 0);
            return mgpu__fsync_parent_dir(final) == 0 ? MGPU_OK
                                                     : mgpu__fail(MGPU_ERR_IO, "checkpoint '%s': fsync of its directory failed", final);
        }
#endif
        if ((err = mgpu__remove_tree(final, 0)) != 0)
            return mgpu__fail(MGPU_ERR_IO, "checkpoint '%s' exists and cannot be replaced: %s", final, strerror(err));
    }
    if (rename(tmp, final) != 0) return mgpu__fail(MGPU_ERR_IO, "cannot rename '%s' to '%s': %s", tmp, final, strerror(errno));
    if ((err = mgpu__fsync_parent_dir(final)) != 0) return mgpu__fail(MGPU_ERR_IO, "checkpoint '%s': fsync of its directory failed: %s", final, strerror(err));
    return MGPU_OK;
}

static mgpu_result mgpu__ckpt_job_run(mgpu__ckpt_job *j) {
    char name[40], latest_text[48], tmp_name[48], final[MGPU__CKPT_PATH_MAX], tmp[MGPU__CKPT_PATH_MAX], latest[MGPU__CKPT_PATH_MAX];
    mgpu_result r;
    mgpu__ckpt_dir_name(name, sizeof name, j->step);
    snprintf(tmp_name, sizeof tmp_name, "%s.tmp", name);
    snprintf(latest_text, sizeof latest_text, "%s\n", name);
    if ((r = mgpu__mkdirs(j->dir)) != MGPU_OK) return r;
    mgpu__ckpt_remove_stale(j->dir);
    if ((r = mgpu__path_join(final, j->dir, name)) != MGPU_OK || (r = mgpu__path_join(tmp, j->dir, tmp_name)) != MGPU_OK ||
        (r = mgpu__path_join(latest, j->dir, "latest")) != MGPU_OK)
        return r;
    if (mkdir(tmp, 0777) != 0) return mgpu__fail(MGPU_ERR_IO, "cannot create checkpoint directory '%s': %s", tmp, strerror(errno));
    if ((r = mgpu__ckpt_job_write_files(j, tmp)) == MGPU_OK && (r = mgpu__ckpt_install(tmp, final)) == MGPU_OK)
        r = mgpu_write_file_atomic(latest, latest_text, strlen(latest_text));
    if (r != MGPU_OK) {
        mgpu__remove_tree(tmp, 0); /* the previous checkpoints and `latest` are untouched */
        return r;
    }
    mgpu__ckpt_prune(j->dir, j->keep_last, j->step);
    return MGPU_OK;
}

/* The writer thread: its errors are recorded in the job for the training thread to report. */
static void *mgpu__ckpt_thread(void *arg) {
    mgpu__ckpt_job *j = (mgpu__ckpt_job *)arg;
    if (j->reserve_bytes) {
        j->reserved = mgpu__ckpt_alloc_snapshot(j->reserve_bytes); /* none: the first save allocates it */
        j->result = MGPU_OK;
        return NULL;
    }
    j->result = mgpu__ckpt_job_run(j);
    if (j->result != MGPU_OK) snprintf(j->error, sizeof j->error, "%s", mgpu_last_error());
    return NULL;
}

struct mgpu_checkpointer {
    char dir[MGPU__CKPT_PATH_MAX];
    int keep_last, background;
    mgpu__ckpt_job *pending;   /* background write in flight */
    pthread_t thread;
    void *snapshot; size_t snapshot_bytes;  /* background mode's host copy, reused by every save */
};

MGPU_API mgpu_checkpointer *mgpu_checkpointer_create(const mgpu_checkpoint_desc *desc) {
    mgpu_checkpointer *c;
    if (!desc || !desc->dir || !desc->dir[0]) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_checkpointer_create: desc and desc->dir are required");
    if (strlen(desc->dir) > MGPU__CKPT_PATH_MAX - 64) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_checkpointer_create: directory '%s' is too long", desc->dir);
    if (desc->keep_last < 0) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_checkpointer_create: keep_last is %d, must be >= 0", desc->keep_last);
    c = (mgpu_checkpointer *)mgpu__calloc(sizeof *c, "a checkpointer");
    if (!c) return NULL;
    snprintf(c->dir, sizeof c->dir, "%s", desc->dir);
    c->keep_last = desc->keep_last;
    c->background = desc->background != 0;
    return c;
}

MGPU_API mgpu_result mgpu_checkpointer_wait(mgpu_checkpointer *c) {
    mgpu__ckpt_job *j;
    mgpu_result r;
    if (!c) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_checkpointer_wait: checkpointer is NULL");
    if (!(j = c->pending)) return MGPU_OK;
    pthread_join(c->thread, NULL);
    c->pending = NULL;
    if (j->reserved && j->reserve_bytes > c->snapshot_bytes) {
        mgpu_free(c->snapshot);
        c->snapshot = j->reserved; c->snapshot_bytes = j->reserve_bytes;
        j->reserved = NULL;
    }
    r = j->result;
    if (r != MGPU_OK) mgpu__fail(r, "%s", j->error); /* re-raised on the caller's thread */
    mgpu__ckpt_job_free(j);
    return r;
}

MGPU_API void mgpu_checkpointer_destroy(mgpu_checkpointer *c) {
    if (!c) return;
    if (mgpu_checkpointer_wait(c) != MGPU_OK) mgpu_log(MGPU_LOG_WARN, "background checkpoint save failed: %s", mgpu_last_error());
    mgpu_free(c->snapshot);
    mgpu_free(c);
}

/* The state text to write: the caller's (checked, with the right step) or a minimal one. */
static char *mgpu__ckpt_state_text(int64_t step, const char *json) {
    char minimal[96];
    mgpu_json *j;
    int64_t s = -1;
    if (!json) {
        snprintf(minimal, sizeof minimal, "{\"format_version\":%d,\"step\":%lld}\n", MGPU__CKPT_FORMAT_VERSION, (long long)step);
        return mgpu__strdup(minimal);
    }
    if (!(j = mgpu__ckpt_parse_state(json, strlen(json), "mgpu_checkpointer_save: trainer_state_json"))) {
        mgpu__error_code = MGPU_ERR_INVALID_ARG;
        return NULL;
    }
    mgpu_json_int64(mgpu_json_get(j, "step"), &s);
    mgpu_json_free(j);
    if (s != step) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_checkpointer_save: trainer_state_json has step %lld but the checkpoint is for step %lld", (long long)s, (long long)step);
        return NULL;
    }
    return mgpu__strdup(json);
}

MGPU_API mgpu_result mgpu_checkpointer_save(mgpu_checkpointer *c, int64_t step, const mgpu_model *m,
                                            const mgpu_optimizer *o, const char *trainer_state_json) {
    mgpu__ckpt_job *j;
    mgpu_result r;
    if (!c || !m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_checkpointer_save: checkpointer and model are required");
    if (step < 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_checkpointer_save: step is %lld, must be >= 0", (long long)step);
    if ((r = mgpu_checkpointer_wait(c)) != MGPU_OK) return r; /* one write at a time; a failed one is reported first */
    if (!(j = (mgpu__ckpt_job *)mgpu__calloc(sizeof *j, "a checkpoint"))) return MGPU_ERR_OOM_HOST;
    snprintf(j->dir, sizeof j->dir, "%s", c->dir);
    j->keep_last = c->keep_last;
    j->step = step;
    if (!(j->state_json = mgpu__ckpt_state_text(step, trainer_state_json))) r = mgpu_last_result();
    if (r == MGPU_OK) r = mgpu__ckpt_job_fill(j, m, o);
    if (r == MGPU_OK && c->background && (r = mgpu__ckpt_job_snapshot(j, &c->snapshot, &c->snapshot_bytes)) == MGPU_OK) {
        if (pthread_create(&c->thread, NULL, mgpu__ckpt_thread, j) == 0) { c->pending = j; return MGPU_OK; }
        mgpu_log(MGPU_LOG_WARN, "cannot start the checkpoint writer thread; saving step %lld on this thread", (long long)step);
    }
    if (r == MGPU_OK) r = mgpu__ckpt_job_run(j);
    mgpu__ckpt_job_free(j);
    return r;
}

/* Background mode: allocates and faults in the snapshot buffer for m and o on the writer thread,
   so that the first save blocks training only for the copy, like later saves. Called at fit setup;
   a later save (or wait) picks the buffer up. Not reserving is never an error. */
static MGPU__UNUSED mgpu_result mgpu__checkpointer_reserve(mgpu_checkpointer *c, const mgpu_model *m, const mgpu_optimizer *o) {
    mgpu__ckpt_job *j;
    mgpu_result r;
    if (!c || !m || !c->background) return MGPU_OK;
    if ((r = mgpu_checkpointer_wait(c)) != MGPU_OK) return r;
    if (!(j = (mgpu__ckpt_job *)mgpu__calloc(sizeof *j, "a checkpoint"))) return MGPU_ERR_OOM_HOST;
    if ((r = mgpu__ckpt_job_fill(j, m, o)) == MGPU_OK && (j->reserve_bytes = mgpu__ckpt_snapshot_bytes(j)) > c->snapshot_bytes &&
        pthread_create(&c->thread, NULL, mgpu__ckpt_thread, j) == 0) {
        c->pending = j;
        return MGPU_OK;
    }
    mgpu__ckpt_job_free(j);
    return r;
}

/* --------------------------------------------------------------------------------------
   Loading and validation
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__ckpt_files {
    mgpu_safetensors *model, *optim;
    mgpu_json *state;
    const char *label;
} mgpu__ckpt_files;

static void mgpu__ckpt_files_close(mgpu__ckpt_files *f) {
    mgpu_safetensors_close(f->model);
    mgpu_safetensors_close(f->optim);
    mgpu_json_free(f->state);
    f->model = f->optim = NULL;
    f->state = NULL;
}

/* "<param>.<suffix>" of an optimizer entry: suffix one of the known states, param a tensor of the
   model file with the same shape (steps: I64 scalars >= 0). */
static mgpu_result mgpu__ckpt_check_optim_entry(const mgpu__ckpt_files *f, const mgpu_safetensors_entry *e) {
    static const char *const moments[] = {"exp_avg", "exp_avg_sq", "momentum_buffer"};
    const char *dot = strrchr(e->name, '.'), *label = f->optim->label;
    const mgpu_safetensors_entry *p;
    char param[1024];
    size_t i;
    int64_t v;
    if (!dot || (size_t)(dot - e->name) >= sizeof param) return mgpu__st_error(MGPU_ERR_FORMAT, label, e->name, "is not named <parameter>.<state>");
    memcpy(param, e->name, (size_t)(dot - e->name));
    param[dot - e->name] = 0;
    if (!(p = mgpu_safetensors_find(f->model, param)))
        return mgpu__st_error(MGPU_ERR_FORMAT, label, e->name, "belongs to parameter '%s', which %s does not hold", param, f->model->label);
    if (strcmp(dot + 1, "step") == 0) {
        if (e->dtype != MGPU_I64 || e->ndim != 0) return mgpu__st_error(MGPU_ERR_FORMAT, label, e->name, "a step count must be an I64 scalar");
        memcpy(&v, e->data, sizeof v);
        return v >= 0 ? MGPU_OK : mgpu__st_error(MGPU_ERR_FORMAT, label, e->name, "step count %lld is negative", (long long)v);
    }
    for (i = 0; i < sizeof moments / sizeof moments[0]; i++) {
        if (strcmp(dot + 1, moments[i]) != 0) continue;
        if (e->dtype != MGPU_F32) return mgpu__st_error(MGPU_ERR_SHAPE, label, e->name, "optimizer state must be F32, not %s", mgpu_dtype_name(e->dtype));
        if (!mgpu__dtype_is_float(p->dtype))
            return mgpu__st_error(MGPU_ERR_SHAPE, f->model->label, p->name, "dtype %s, but only float parameters have optimizer state", mgpu_dtype_name(p->dtype));
        if (e->ndim != p->ndim || (e->ndim && memcmp(e->shape, p->shape, sizeof(int64_t) * (size_t)e->ndim) != 0)) {
            char a[96], b[96];
            mgpu_shape_string(e->ndim, e->shape, a, sizeof a);
            mgpu_shape_string(p->ndim, p->shape, b, sizeof b);
            return mgpu__st_error(MGPU_ERR_SHAPE, label, e->name, "shape %s differs from its parameter's %s", a, b);
        }
        return MGPU_OK;
    }
    return mgpu__st_error(MGPU_ERR_FORMAT, label, e->name, "unknown optimizer state '%s'", dot + 1);
}

/* The files agree with each other: optimizer entries belong to model tensors, step_count metadata
   is a count, and the state's step matches the directory name (when there is one). */
static mgpu_result mgpu__ckpt_check_files(const mgpu__ckpt_files *f, int64_t dir_step) {
    const char *sc = mgpu_safetensors_metadata(f->optim, "step_count");
    int64_t step = -1;
    int i;
    mgpu_result r;
    for (i = 0; i < mgpu_safetensors_count(f->optim); i++)
        if ((r = mgpu__ckpt_check_optim_entry(f, mgpu_safetensors_get(f->optim, i))) != MGPU_OK) return r;
    if (sc) {
        long long v;
        if (!mgpu__parse_ll(sc, &v) || v < 0) return mgpu__st_error(MGPU_ERR_FORMAT, f->optim->label, NULL, "metadata step_count \"%.32s\" is not a count", sc);
    }
    mgpu_json_int64(mgpu_json_get(f->state, "step"), &step);
    if (dir_step >= 0 && step != dir_step)
        return mgpu__fail(MGPU_ERR_FORMAT, "%s: trainer_state.json says step %lld but the directory is step %lld", f->label, (long long)step, (long long)dir_step);
    return MGPU_OK;
}

/* Opens and fully validates DIR's three files; errors name the file (and tensor). */
static mgpu_result mgpu__ckpt_open_dir(const char *path, mgpu__ckpt_files *f) {
    char file[MGPU__CKPT_PATH_MAX];
    const char *base = strrchr(path, '/');
    void *text = NULL;
    size_t len = 0;
    int64_t dir_step = -1;
    mgpu_result r;
    memset(f, 0, sizeof *f);
    f->label = path;
    if (!mgpu__is_dir(path)) return mgpu__fail(MGPU_ERR_IO, "checkpoint '%s' is not a directory", path);
    if ((r = mgpu__path_join(file, path, MGPU__CKPT_MODEL)) != MGPU_OK || !(f->model = mgpu__ckpt_st_checked(mgpu_safetensors_open(file))) ||
        (r = mgpu__path_join(file, path, MGPU__CKPT_OPTIM)) != MGPU_OK || !(f->optim = mgpu__ckpt_st_checked(mgpu_safetensors_open(file))) ||
        (r = mgpu__path_join(file, path, MGPU__CKPT_STATE)) != MGPU_OK || (r = mgpu_read_file(file, &text, &len)) != MGPU_OK) {
        mgpu__ckpt_files_close(f);
        return r != MGPU_OK ? r : mgpu_last_result();
    }
    f->state = mgpu__ckpt_parse_state((const char *)text, len, file);
    mgpu_free(text);
    if (!f->state) { mgpu__ckpt_files_close(f); return mgpu_last_result(); }
    mgpu__ckpt_step_of_name(base ? base + 1 : path, &dir_step);
    if ((r = mgpu__ckpt_check_files(f, dir_step)) != MGPU_OK) mgpu__ckpt_files_close(f);
    return r;
}

static mgpu_result mgpu__ckpt_open_bytes(const mgpu_checkpoint_bytes *b, const char *label, mgpu__ckpt_files *f) {
    char name[MGPU__CKPT_PATH_MAX];
    mgpu_result r;
    memset(f, 0, sizeof *f);
    f->label = label;
    snprintf(name, sizeof name, "%.4000s/" MGPU__CKPT_MODEL, label);
    if (!(f->model = mgpu__ckpt_st_checked(mgpu_safetensors_parse(b->model, b->model_len, name)))) return mgpu_last_result();
    snprintf(name, sizeof name, "%.4000s/" MGPU__CKPT_OPTIM, label);
    if (!(f->optim = mgpu__ckpt_st_checked(mgpu_safetensors_parse(b->optimizer, b->optimizer_len, name)))) {
        mgpu__ckpt_files_close(f);
        return mgpu_last_result();
    }
    snprintf(name, sizeof name, "%.4000s/" MGPU__CKPT_STATE, label);
    if (!(f->state = mgpu__ckpt_parse_state(b->trainer_state ? b->trainer_state : "", b->trainer_state_len, name))) {
        mgpu__ckpt_files_close(f);
        return mgpu_last_result();
    }
    if ((r = mgpu__ckpt_check_files(f, -1)) != MGPU_OK) mgpu__ckpt_files_close(f);
    return r;
}

/* Validates files against m and o, then (only if all fits) copies everything in. */
static mgpu_result mgpu__ckpt_apply(mgpu__ckpt_files *f, mgpu_model *m, mgpu_optimizer *o) {
    mgpu__model_tensors mt;
    mgpu__optim_tensors ot;
    mgpu__stage stage;
    mgpu_result r;
    int i;
    memset(&mt, 0, sizeof mt);
    memset(&ot, 0, sizeof ot);
    r = mgpu__model_tensors_collect(m, &mt, "mgpu_checkpoint_load");
    if (r == MGPU_OK) r = mgpu__model_check_file(f->model, &mt);
    if (r == MGPU_OK && o && (r = mgpu__optim_tensors_collect(o, &ot)) == MGPU_OK) r = mgpu__model_check_file(f->optim, &ot.list);
    /* only now is anything overwritten: host tensors in place, device tensors through one staging buffer */
    memset(&stage, 0, sizeof stage);
    for (i = 0; i < mt.n && r == MGPU_OK; i++) r = mgpu__st_copy(mgpu_safetensors_find(f->model, mt.names[i]), mt.tensors[i], &stage);
    for (i = 0; o && i < ot.list.n && r == MGPU_OK; i++)
        r = mgpu__st_copy(mgpu_safetensors_find(f->optim, ot.list.names[i]), ot.list.tensors[i], &stage);
    mgpu__stage_free(&stage);
    if (r == MGPU_OK && o) {
        const char *sc = mgpu_safetensors_metadata(f->optim, "step_count");
        long long count = 0;
        for (i = 0; i < o->n_params; i++) {
            o->params[i].steps = ot.steps[i];
            if (ot.steps[i] > count) count = ot.steps[i];
        }
        if (sc) mgpu__parse_ll(sc, &count); /* validated when opened */
        o->step_count = count;
    }
    mgpu__optim_tensors_free(&ot);
    mgpu__model_tensors_free(&mt);
    return r;
}

static mgpu_result mgpu__ckpt_finish_load(mgpu__ckpt_files *f, mgpu_model *m, mgpu_optimizer *o, mgpu_json **trainer_state) {
    mgpu_result r = m ? mgpu__ckpt_apply(f, m, o) : MGPU_OK;
    if (r == MGPU_OK && trainer_state) { *trainer_state = f->state; f->state = NULL; }
    mgpu__ckpt_files_close(f);
    return r;
}

MGPU_API mgpu_result mgpu_checkpoint_load(const char *path, mgpu_model *m, mgpu_optimizer *o, mgpu_json **trainer_state) {
    mgpu__ckpt_files f;
    mgpu_result r;
    if (trainer_state) *trainer_state = NULL;
    if (!path || !m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_checkpoint_load: path and model are required");
    if ((r = mgpu__ckpt_open_dir(path, &f)) != MGPU_OK) return r;
    return mgpu__ckpt_finish_load(&f, m, o, trainer_state);
}

MGPU_API mgpu_result mgpu_checkpoint_load_bytes(const mgpu_checkpoint_bytes *files, const char *label, mgpu_model *m,
                                                mgpu_optimizer *o, mgpu_json **trainer_state) {
    mgpu__ckpt_files f;
    mgpu_result r;
    if (trainer_state) *trainer_state = NULL;
    if (!files || (!m && o)) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_checkpoint_load_bytes: files are required, and o needs m");
    if ((r = mgpu__ckpt_open_bytes(files, label ? label : "checkpoint in memory", &f)) != MGPU_OK) return r;
    return mgpu__ckpt_finish_load(&f, m, o, trainer_state);
}

MGPU_API mgpu_result mgpu_checkpoint_verify(const char *path) {
    mgpu__ckpt_files f;
    mgpu_result r;
    if (!path) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_checkpoint_verify: path is NULL");
    if ((r = mgpu__ckpt_open_dir(path, &f)) == MGPU_OK) mgpu__ckpt_files_close(&f);
    return r;
}

/* The step directory named by DIR/latest, or "" when latest is absent or unreadable. */
static void mgpu__ckpt_read_latest(const char *dir, char *name, size_t size) {
    char path[MGPU__CKPT_PATH_MAX];
    void *text = NULL;
    size_t len = 0, n;
    int64_t step;
    name[0] = 0;
    if (mgpu__path_join(path, dir, "latest") != MGPU_OK || mgpu_read_file(path, &text, &len) != MGPU_OK) { mgpu_clear_error(); return; }
    n = len;
    while (n > 0 && (((char *)text)[n - 1] == '\n' || ((char *)text)[n - 1] == '\r' || ((char *)text)[n - 1] == ' ')) n--;
    ((char *)text)[n] = 0;
    /* only a plain step directory name: `latest` must not lead outside DIR */
    if (n < size && mgpu__ckpt_step_of_name((const char *)text, &step)) memcpy(name, text, n + 1);
    else snprintf(name, size, "?"); /* present but garbled */
    mgpu_free(text);
}

/* Copies candidate into the caller's buffer. */
static mgpu_result mgpu__ckpt_found(const char *candidate, char *path, size_t size) {
    if (strlen(candidate) >= size) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_checkpoint_find: path buffer of %zu bytes is too small", size);
    memcpy(path, candidate, strlen(candidate) + 1);
    mgpu_clear_error();
    return MGPU_OK;
}

/* mgpu_checkpoint_find, its warnings logged at `warn` (the trainer's ranks other than 0 find the
   same checkpoint as rank 0, which alone tells). */
static mgpu_result mgpu__checkpoint_find(const char *dir, char *path, size_t size, mgpu_log_level warn) {
    char latest[64], candidate[MGPU__CKPT_PATH_MAX], first_error[700];
    int64_t *steps = NULL, latest_step = -1;
    int n = 0, i;
    mgpu_result r;
    if (!dir || !path || size == 0) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_checkpoint_find: dir and path are required");
    path[0] = first_error[0] = 0;
    if (!mgpu__is_dir(dir)) return mgpu__fail(MGPU_ERR_IO, "no checkpoint in '%s': not a directory", dir);
    mgpu__ckpt_read_latest(dir, latest, sizeof latest);
    if (mgpu__ckpt_step_of_name(latest, &latest_step) && mgpu__path_join(candidate, dir, latest) == MGPU_OK) {
        if (mgpu_checkpoint_verify(candidate) == MGPU_OK) return mgpu__ckpt_found(candidate, path, size);
        snprintf(first_error, sizeof first_error, "%.690s", mgpu_last_error());
        mgpu_log(warn, "the latest checkpoint is corrupt: %s", first_error);
    } else if (latest[0]) {
        snprintf(first_error, sizeof first_error, "'%.300s/latest' does not name a step-* directory", dir);
        mgpu_log(warn, "%s", first_error);
    }
    /* the newest step-* directory that validates */
    if ((r = mgpu__ckpt_list_steps(dir, &steps, &n)) != MGPU_OK) return r;
    for (i = 0; i < n; i++) {
        char name[40];
        if (steps[i] == latest_step) continue; /* checked above */
        mgpu__ckpt_dir_name(name, sizeof name, steps[i]);
        if (mgpu__path_join(candidate, dir, name) != MGPU_OK) continue;
        if (mgpu_checkpoint_verify(candidate) == MGPU_OK) {
            mgpu_free(steps);
            mgpu_log(warn, "%s: using %s, the newest checkpoint that validates", latest[0] ? "latest is unusable" : "no 'latest' file", candidate);
            return mgpu__ckpt_found(candidate, path, size);
        }
        if (!first_error[0]) snprintf(first_error, sizeof first_error, "%.690s", mgpu_last_error());
        mgpu_log(warn, "skipping corrupt checkpoint: %s", mgpu_last_error());
    }
    mgpu_free(steps);
    if (first_error[0]) return mgpu__fail(MGPU_ERR_IO, "no valid checkpoint in '%s': %s", dir, first_error);
    return mgpu__fail(MGPU_ERR_IO, "no checkpoint in '%s'", dir);
}

MGPU_API mgpu_result mgpu_checkpoint_find(const char *dir, char *path, size_t size) {
    return mgpu__checkpoint_find(dir, path, size, MGPU_LOG_WARN);
}

/* Whether dir holds anything a save left: `latest` or a step-* directory (for --resume auto). */
static int mgpu__ckpt_any(const char *dir) {
    char path[MGPU__CKPT_PATH_MAX];
    int64_t *steps = NULL;
    int n = 0;
    if (mgpu__path_join(path, dir, "latest") == MGPU_OK && access(path, F_OK) == 0) return 1;
    if (mgpu__ckpt_list_steps(dir, &steps, &n) != MGPU_OK) { mgpu_clear_error(); return 0; }
    mgpu_free(steps);
    return n > 0;
}

/* The checked trainer_state.json of checkpoint path (NULL with an error naming the file). */
static mgpu_json *mgpu__ckpt_read_state(const char *path) {
    char file[MGPU__CKPT_PATH_MAX];
    void *text = NULL;
    size_t len = 0;
    mgpu_json *j;
    if (mgpu__path_join(file, path, MGPU__CKPT_STATE) != MGPU_OK || mgpu_read_file(file, &text, &len) != MGPU_OK) return NULL;
    j = mgpu__ckpt_parse_state((const char *)text, len, file);
    mgpu_free(text);
    return j;
}
