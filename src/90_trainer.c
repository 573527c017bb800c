/* ======================================================================================
   Trainer
   ====================================================================================== */

/* -- the training loop shared by the examples.

   One run is a sequence of optimizer steps; checkpoints are taken only between steps, and hold
   everything the loop depends on (weights, optimizer moments and step counts, RNG, loss scaler,
   position in the epoch, the epoch's running sums, metrics so far), so a run interrupted at any
   moment and resumed with --resume auto ends with the same weights, bit for bit on the CPU, as
   one that never stopped. Steps skipped by the fp16 loss scaler still count as steps (for the
   LR schedule, --max-steps and checkpoint names), as the LR scheduler steps on in PyTorch's AMP
   recipe and the Hugging Face Trainer's global_step counts them. */

struct mgpu_trainer {
    const mgpu_train_opts *opts;
    mgpu_context *ctx;
    int rank, world_size;      /* checkpoints, metrics and the final model come from rank 0 only */
    mgpu_comm *comm;           /* DDP's communicator: world_size > 1, or --multi-gpu ddp at world size 1 */
    mgpu_amp_mode amp;
    int launched;              /* a launcher's variables are set (WORLD_SIZE, SLURM_PROCID, OMPI_...) */
    int dp_replicas;           /* --multi-gpu dp: replicas (threads) in this process; 0 otherwise */
    int local_rank;            /* under a launcher: LOCAL_RANK (picks this rank's GPU) */
};

/* --multi-gpu against the environment, before anything is built: dp runs one process with one
   replica per --gpu-ids entry (a CPU build runs CPU replicas: testable DP); ddp needs a launcher,
   as torch.distributed's env:// initialisation does (WORLD_SIZE=1 is DDP at world size 1, as
   torchrun --nproc-per-node 1 gives); none under a launcher would have every process train alone
   on the whole dataset, which is never what was meant. */
static mgpu_result mgpu__trainer_check_mode(const mgpu_train_opts *o, const mgpu_trainer *t, int *replicas) {
    *replicas = 0;
    switch (o->multi_gpu) {
    case MGPU_MULTI_GPU_AUTO: return MGPU_OK;
    case MGPU_MULTI_GPU_NONE:
        if (t->world_size > 1)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "--multi-gpu none trains in one process, but a launcher started %d (WORLD_SIZE=%d): "
                              "each would train alone on the whole dataset; use --multi-gpu ddp (or auto), or start one process", t->world_size, t->world_size);
        return MGPU_OK;
    case MGPU_MULTI_GPU_DDP:
        if (!t->launched)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "--multi-gpu ddp needs a launcher that sets WORLD_SIZE and RANK (none is set): "
                              "run under `mgpurun --nproc-per-node N` (or torchrun-style variables, srun); for one process use --multi-gpu auto or none");
        return MGPU_OK;
    case MGPU_MULTI_GPU_DP:
        if (t->world_size > 1)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "--multi-gpu dp runs in one process; under a launcher (WORLD_SIZE=%d) use DDP (--multi-gpu ddp or auto)", t->world_size);
        if (o->num_gpu_ids < 1)
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "--multi-gpu dp needs --gpu-ids (e.g. --gpu-ids 0,1): one replica per id");
        *replicas = o->num_gpu_ids;
        return MGPU_OK;
    }
    return mgpu__fail(MGPU_ERR_INVALID_ARG, "--multi-gpu: mode %d is not auto, none, dp or ddp", (int)o->multi_gpu);
}

/* Under a launcher (WORLD_SIZE > 1) DDP is chosen automatically, and --multi-gpu ddp asks for it
   at any world size: one communicator per process, shared memory between the processes of the
   host (CPU tensors). */
static mgpu_result mgpu__trainer_connect(mgpu_trainer *t) {
    mgpu_comm_desc cd;
    if (t->world_size <= 1 && t->opts->multi_gpu != MGPU_MULTI_GPU_DDP) return MGPU_OK;
    memset(&cd, 0, sizeof cd);
    cd.backend = t->ctx->device.type == MGPU_DEVICE_CUDA ? MGPU_COMM_NCCL : MGPU_COMM_SHM;
    /* MGPU_DIST_BACKEND=shm lets several processes share one GPU (NCCL refuses two ranks on one
       device): gradients are staged through pinned host memory, as torch's gloo backend does */
    if (getenv("MGPU_DIST_BACKEND") && *getenv("MGPU_DIST_BACKEND")) {
        const char *b = getenv("MGPU_DIST_BACKEND");
        if (strcmp(b, "shm") == 0) cd.backend = MGPU_COMM_SHM;
        else if (strcmp(b, "nccl") == 0) cd.backend = MGPU_COMM_NCCL;
        else return mgpu__fail(MGPU_ERR_INVALID_ARG, "MGPU_DIST_BACKEND='%s': expected shm or nccl", b);
    }
    cd.gpu_ids = t->opts->num_gpu_ids > 0 ? t->opts->gpu_ids : NULL;
    cd.num_gpu_ids = t->opts->num_gpu_ids;
    t->comm = mgpu_comm_create(&cd);
    return t->comm ? MGPU_OK : mgpu_last_result();
}

/* rank and world size from the environment; a build without the distributed layer is one process. */
static mgpu_result mgpu__trainer_read_env(mgpu_trainer *t) {
    mgpu_dist_env env;
    mgpu_result r;
    memset(&env, 0, sizeof env);
    t->rank = 0; t->world_size = 1;
    r = mgpu_dist_env_read(&env);
    if (r == MGPU_ERR_UNSUPPORTED) { mgpu_clear_error(); return MGPU_OK; }
    if (r != MGPU_OK) return r;
    t->rank = env.rank;
    t->world_size = env.world_size > 0 ? env.world_size : 1;
    t->launched = env.source && strcmp(env.source, "single") != 0;
    t->local_rank = env.local_rank;
    return MGPU_OK;
}

/* GPUs --multi-gpu auto would use without a launcher: the --gpu-ids entries, else every visible
   device; 0 when the run is not on a GPU (--device cpu, or none visible, or a CPU build). */
static int mgpu__trainer_gpus_to_use(const mgpu_train_opts *o, const mgpu_device *dev) {
    int visible;
    if (dev->type != MGPU_DEVICE_CUDA) return 0;
    if (o->num_gpu_ids > 0) return o->num_gpu_ids;
    visible = mgpu_cuda_device_count();
    return visible > 0 ? visible : 0;
}

/* --multi-gpu auto without a launcher and several GPUs: this process becomes the supervisor of one
   DDP worker per GPU, each running this same command line (torch.multiprocessing.spawn's way; the
   workers see WORLD_SIZE and train as DDP), and exits with the group's code. --device cuda:N names
   one GPU: plain training there. Returns only when there is nothing to launch. */
static mgpu_result mgpu__trainer_self_launch(const mgpu_trainer *t, const mgpu_device *dev) {
    const mgpu_train_opts *o = t->opts;
    mgpu_worker_group_desc gd;
    const char *slash;
    int n = mgpu__trainer_gpus_to_use(o, dev), code;
    if (o->multi_gpu != MGPU_MULTI_GPU_AUTO || t->launched || o->device_index >= 0 || n < 2) return MGPU_OK;
    if (!o->argv || o->argc < 1 || !o->argv[0]) {
        mgpu_log(MGPU_LOG_WARN, "%d GPUs to use, but the options carry no command line to start workers with (filled by hand, "
                 "not by mgpu_train_opts_parse): training on one; run under mgpurun for DDP", n);
        return MGPU_OK;
    }
    slash = strrchr(o->argv[0], '/');
    memset(&gd, 0, sizeof gd);
    gd.argv = o->argv; gd.n = n; gd.label = slash ? slash + 1 : o->argv[0]; gd.rank0_stdout_only = 1;
    fflush(stdout);
    fflush(stderr);
    code = mgpu_worker_group_run(&gd);
    if (code < 0) {
        fprintf(stderr, "%s: error: %s\n", gd.label, mgpu_last_error());
        code = 1;
    }
    exit(code);
}

/* This process's GPU when the options leave it open (--device cuda or auto): under a launcher the
   rank's entry of --gpu-ids, else its LOCAL_RANK (as mgpu_comm_create's NCCL device; more ranks than
   devices share them round-robin, which the shm backend allows); alone, the first --gpu-ids entry. */
static mgpu_result mgpu__trainer_place(const mgpu_trainer *t, mgpu_device *dev) {
    const mgpu_train_opts *o = t->opts;
    int visible;
    if (dev->type != MGPU_DEVICE_CUDA || o->device_index >= 0) return MGPU_OK;
    if (!t->launched) {
        if (o->num_gpu_ids > 0) dev->index = o->gpu_ids[0];
        return MGPU_OK;
    }
    if (t->local_rank < o->num_gpu_ids) { dev->index = o->gpu_ids[t->local_rank]; return MGPU_OK; }
    visible = mgpu_cuda_device_count();
    dev->index = visible > 0 ? t->local_rank % visible : 0;
    return MGPU_OK;
}

/* --device as a device: the checks (CUDA in this build, the index visible) and their messages
   are mgpu_device_parse's. */
static mgpu_result mgpu__trainer_device(const mgpu_train_opts *o, mgpu_device *out) {
    char text[32];
    switch (o->device) {
    case MGPU_DEVICE_KIND_AUTO: return mgpu_device_parse("auto", out);
    case MGPU_DEVICE_KIND_CPU: return mgpu_device_parse("cpu", out);
    case MGPU_DEVICE_KIND_CUDA:
        if (o->device_index < 0) return mgpu_device_parse("cuda", out);
        snprintf(text, sizeof text, "cuda:%d", o->device_index);
        return mgpu_device_parse(text, out);
    }
    return mgpu__fail(MGPU_ERR_INVALID_ARG, "--device: kind %d is not auto, cpu or cuda", (int)o->device);
}

/* --------------------------------------------------------------------------------------
   Output paths, checked before anything trains: a run that cannot save would otherwise train to
   the end and then lose the model.
   -------------------------------------------------------------------------------------- */

/* dir exists (created as mkdir -p does) and a file can be created in it (a probe, removed). */
static mgpu_result mgpu__check_dir_writable(const char *flag, const char *dir) {
    char probe[MGPU__CKPT_PATH_MAX], why[MGPU__CKPT_PATH_MAX + 128];
    int fd;
    if (mgpu__mkdirs(dir) != MGPU_OK) {
        snprintf(why, sizeof why, "%s", mgpu_last_error());   /* the message is rewritten below */
        return mgpu__fail(MGPU_ERR_IO, "%s %s is not writable: %s (checked before training, so nothing was lost)", flag, dir, why);
    }
    if (snprintf(probe, sizeof probe, "%s/.mgpu-write-check-%ld", dir, (long)getpid()) >= (int)sizeof probe)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s %s: path too long", flag, dir);
    if ((fd = open(probe, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600)) < 0)
        return mgpu__fail(MGPU_ERR_IO, "%s %s is not writable: cannot create a file in it: %s (checked before training, so nothing was lost)",
                          flag, dir, strerror(errno));
    close(fd);
    unlink(probe);
    return MGPU_OK;
}

/* path can be appended to; a file that did not exist is not left behind. */
static mgpu_result mgpu__check_file_writable(const char *flag, const char *path) {
    int existed = access(path, F_OK) == 0;
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0)
        return mgpu__fail(MGPU_ERR_IO, "%s %s is not writable: %s (checked before training, so nothing was lost)", flag, path, strerror(errno));
    close(fd);
    if (!existed) unlink(path);
    return MGPU_OK;
}

/* Rank 0 writes every output, so rank 0 checks them. */
static mgpu_result mgpu__trainer_check_outputs(const mgpu_trainer *t) {
    const mgpu_train_opts *o = t->opts;
    mgpu_result r;
    if (t->rank != 0) return MGPU_OK;
    if (o->save_dir && o->save_dir[0] && !o->eval_only && (r = mgpu__check_dir_writable("--save-dir", o->save_dir)) != MGPU_OK) return r;
    if (o->metrics && o->metrics[0] && (r = mgpu__check_file_writable("--metrics", o->metrics)) != MGPU_OK) return r;
    return MGPU_OK;
}

MGPU_API mgpu_trainer *mgpu_trainer_create(const mgpu_train_opts *opts) {
    mgpu_trainer *t;
    mgpu_context_desc cd;
    if (!opts) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_trainer_create: opts is NULL");
    if (opts->amp != MGPU_AMP_OFF && opts->amp != MGPU_AMP_FP16 && opts->amp != MGPU_AMP_BF16)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "--amp: mode %d is not off, fp16 or bf16", (int)opts->amp);
    if (opts->resume == MGPU_RESUME_PATH && (!opts->resume_path || !opts->resume_path[0]))
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "--resume: a path was asked for (MGPU_RESUME_PATH) but resume_path is empty");
    memset(&cd, 0, sizeof cd);
    if (mgpu__trainer_device(opts, &cd.device) != MGPU_OK) return NULL;
    cd.seed = opts->seed;
    t = (mgpu_trainer *)mgpu__calloc(sizeof *t, "the trainer");
    if (!t) return NULL;
    t->opts = opts;
    t->amp = opts->amp;
    if (mgpu__trainer_read_env(t) != MGPU_OK || mgpu__trainer_check_mode(opts, t, &t->dp_replicas) != MGPU_OK ||
        mgpu__trainer_check_outputs(t) != MGPU_OK ||
        mgpu__trainer_self_launch(t, &cd.device) != MGPU_OK || mgpu__trainer_place(t, &cd.device) != MGPU_OK ||
        !(t->ctx = mgpu_context_create(&cd)) || mgpu__trainer_connect(t) != MGPU_OK) {
        mgpu_trainer_destroy(t);
        return NULL;
    }
    return t;
}
MGPU_API mgpu_context *mgpu_trainer_context(const mgpu_trainer *t) { return t ? t->ctx : NULL; }
MGPU_API int mgpu_trainer_rank(const mgpu_trainer *t) { return t ? t->rank : 0; }
MGPU_API void mgpu_trainer_destroy(mgpu_trainer *t) {
    if (!t) return;
    mgpu_comm_destroy(t->comm);
    mgpu_context_destroy(t->ctx);
    mgpu_free(t);
}

/* Correct predictions of a batch (mgpu_count_correct: on a GPU the logits and targets come back
   with one copy each per batch, small next to the forward); -1 with an error on failure. */
static int64_t mgpu__count_correct_batch(const mgpu_tensor *logits, const mgpu_tensor *target) {
    if (!logits || !target) { if (mgpu_last_result() == MGPU_OK) mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_evaluate: no logits"); return -1; }
    return mgpu_count_correct(logits, target);
}

/* Evaluation's sums over ds: sums[0] the summed cross-entropy, [1] the correct predictions, [2]
   the samples (doubles, so DDP can all-reduce them in one call). */
static mgpu_result mgpu__evaluate_sums(mgpu_context *ctx, mgpu_model *model, mgpu_forward_fn forward, void *user,
                                       const mgpu_dataset *ds, int64_t batch_size, double sums[3]) {
    mgpu_loader_desc ld;
    mgpu_loader *loader;
    mgpu_batch b;
    mgpu_result r;
    double loss_sum = 0;
    int64_t correct = 0, seen = 0;
    int was_training, grad_was_on;
    sums[0] = sums[1] = sums[2] = 0;
    if (ds->length == 0) return MGPU_OK;   /* a rank's empty shard */
    memset(&ld, 0, sizeof ld);
    ld.batch_size = batch_size; ld.ctx = ctx;
    loader = mgpu_loader_create(ds, &ld);
    if (!loader) return mgpu_last_result();
    was_training = mgpu_model_is_training(model);
    grad_was_on = mgpu_set_grad_enabled(ctx, 0);
    mgpu_model_train(model, 0);
    r = mgpu_loader_set_epoch(loader, 0, 0);
    while (r == MGPU_OK && (r = mgpu_loader_next(loader, &b)) == MGPU_OK && b.size > 0) {
        mgpu_tensor *logits = forward(ctx, b.x, user);
        mgpu_tensor *l = mgpu_op_cross_entropy(ctx, logits, b.y);
        if (!l) { r = mgpu_last_result() ? mgpu_last_result() : MGPU_ERR_STATE; break; }
        int64_t hits;
        loss_sum += mgpu_tensor_item(l) * (double)b.size;
        if ((hits = mgpu__count_correct_batch(logits, b.y)) < 0) { r = mgpu_last_result() ? mgpu_last_result() : MGPU_ERR_STATE; break; }
        correct += hits;
        seen += b.size;
        mgpu_context_end_step(ctx);
    }
    mgpu_context_end_step(ctx);
    mgpu_model_train(model, was_training);
    mgpu_set_grad_enabled(ctx, grad_was_on);
    mgpu_loader_destroy(loader);
    sums[0] = loss_sum; sums[1] = (double)correct; sums[2] = (double)seen;
    return r;
}

static void mgpu__evaluate_ratios(const double sums[3], double *loss, double *accuracy) {
    if (loss) *loss = sums[2] > 0 ? sums[0] / sums[2] : NAN;
    if (accuracy) *accuracy = sums[2] > 0 ? sums[1] / sums[2] : NAN;
}

MGPU_API mgpu_result mgpu_evaluate(mgpu_context *ctx, mgpu_model *model, mgpu_forward_fn forward, void *user,
                                   const mgpu_dataset *ds, int64_t batch_size, double *loss, double *accuracy) {
    double sums[3];
    mgpu_result r;
    if (!ctx || !model || !forward || !ds || batch_size < 1)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_evaluate: ctx, model, forward and dataset are required and batch_size must be >= 1");
    if ((r = mgpu__evaluate_sums(ctx, model, forward, user, ds, batch_size, sums)) != MGPU_OK) return r;
    mgpu__evaluate_ratios(sums, loss, accuracy);
    return MGPU_OK;
}

/* A strided view of a dataset: rank r of w sees samples r, r + w, r + 2w, ... Unlike the
   training sampler it pads nothing, so no sample is evaluated twice. */
typedef struct mgpu__shard { const mgpu_dataset *base; int rank, world; } mgpu__shard;
static mgpu_result mgpu__shard_get(const mgpu_dataset *ds, int64_t index, void *x_out, void *y_out) {
    const mgpu__shard *s = (const mgpu__shard *)ds->impl;
    return s->base->get(s->base, s->rank + index * s->world, x_out, y_out);
}
static void mgpu__shard_view(const mgpu_dataset *base, mgpu__shard *s, int rank, int world, mgpu_dataset *view) {
    s->base = base; s->rank = rank; s->world = world;
    *view = *base;
    view->length = base->length > rank ? (base->length - rank + world - 1) / world : 0;
    view->get = mgpu__shard_get;
    view->destroy = NULL;
    view->impl = s;
}

/* The LR schedule in optimizer steps, from the epoch-based options. */
static mgpu_lr_schedule mgpu__schedule_from_opts(const mgpu_train_opts *o, float lr, int64_t steps_per_epoch) {
    mgpu_lr_schedule s;
    double spe = (double)steps_per_epoch;
    memset(&s, 0, sizeof s);
    s.type = o->schedule;
    s.base_lr = lr;
    s.warmup_steps = (int64_t)(o->warmup_epochs * spe + 0.5);
    s.total_steps = (int64_t)o->epochs * steps_per_epoch;
    if (o->max_steps > 0 && o->max_steps < s.total_steps) s.total_steps = o->max_steps;
    s.t_0 = (int64_t)((o->t0_epochs > 0 ? o->t0_epochs : 1.0) * spe + 0.5);
    if (s.t_0 < 1) s.t_0 = 1;
    s.t_mult = o->t_mult > 0 ? o->t_mult : 1;
    s.eta_min = o->eta_min;
    s.step_size = (int64_t)((o->step_size_epochs > 0 ? o->step_size_epochs : 1.0) * spe + 0.5);
    if (s.step_size < 1) s.step_size = 1;
    s.gamma = o->gamma > 0 ? o->gamma : 0.1f;
    return s;
}

static mgpu_optimizer *mgpu__optimizer_from_opts(mgpu_model *model, const mgpu_train_opts *o, float lr) {
    mgpu_optimizer_desc od = mgpu_optimizer_desc_default(o->optimizer);
    od.lr = lr;
    od.weight_decay = o->weight_decay;
    if (o->optimizer == MGPU_OPTIM_SGD) od.momentum = o->momentum;
    return mgpu_optimizer_create(model, &od);
}

/* --------------------------------------------------------------------------------------
   Pre-emption: SIGTERM (SLURM before a time limit or scancel, Kubernetes), SIGUSR1
   (`sbatch --signal=USR1@120`) and SIGINT (Ctrl-C). The handler only records the signal; the loop
   saves a checkpoint after the current optimizer step and fit returns MGPU_OK, so the program
   exits 0 and a requeued job (`scontrol requeue`, `sbatch --requeue`) continues with --resume
   auto. A second Ctrl-C does not wait for the step: SIGINT's default action ends the process at
   once (the previous checkpoint stays intact). The flag is process state by nature, so it is the
   one global the trainer keeps.
   -------------------------------------------------------------------------------------- */

static volatile sig_atomic_t mgpu__stop_signal = 0;
static volatile sig_atomic_t mgpu__stop_quiet = 0;   /* ranks other than 0 do not echo Ctrl-C */
static void mgpu__on_stop_signal(int sig) {
    static const char first[] = "\ninterrupted: saving a checkpoint after this step (Ctrl-C again to abort at once)\n";
    if (sig == SIGINT && mgpu__stop_signal == SIGINT) {   /* the second Ctrl-C */
        signal(SIGINT, SIG_DFL);   /* async-signal-safe; the raised signal lands when the handler returns */
        raise(SIGINT);
        return;
    }
    if (sig == SIGINT && !mgpu__stop_quiet && write(STDERR_FILENO, first, sizeof first - 1) < 0) { /* nothing to do: a message was all it was */ }
    mgpu__stop_signal = sig;
}

typedef struct mgpu__signals { struct sigaction term, usr1, intr; int installed; } mgpu__signals;

static void mgpu__signals_install(mgpu__signals *s, int quiet) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = mgpu__on_stop_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    mgpu__stop_signal = 0;
    mgpu__stop_quiet = quiet;
    s->installed = sigaction(SIGTERM, &sa, &s->term) == 0 && sigaction(SIGUSR1, &sa, &s->usr1) == 0 && sigaction(SIGINT, &sa, &s->intr) == 0;
}
static void mgpu__signals_restore(mgpu__signals *s) {
    if (!s->installed) return;
    sigaction(SIGTERM, &s->term, NULL);
    sigaction(SIGUSR1, &s->usr1, NULL);
    sigaction(SIGINT, &s->intr, NULL);
    s->installed = 0;
}

/* --------------------------------------------------------------------------------------
   The loop's state
   -------------------------------------------------------------------------------------- */

/* Running sums of the epoch in progress, saved in checkpoints so a resumed epoch reports what an
   uninterrupted one would. Times are seconds on the training thread. */
typedef struct mgpu__epoch_stats {
    double loss_sum; int64_t samples;
    double time_s, data_wait_s, compute_s, optimizer_s, checkpoint_s, comm_s;
} mgpu__epoch_stats;

/* The double members of mgpu__epoch_stats by name: one table for writing and reading them. */
typedef struct mgpu__stat_field { const char *key; size_t offset; } mgpu__stat_field;
static const mgpu__stat_field mgpu__epoch_stat_fields[] = {
    {"loss_sum", offsetof(mgpu__epoch_stats, loss_sum)}, {"time_s", offsetof(mgpu__epoch_stats, time_s)},
    {"data_wait_s", offsetof(mgpu__epoch_stats, data_wait_s)}, {"compute_s", offsetof(mgpu__epoch_stats, compute_s)},
    {"optimizer_s", offsetof(mgpu__epoch_stats, optimizer_s)}, {"checkpoint_s", offsetof(mgpu__epoch_stats, checkpoint_s)},
    {"comm_s", offsetof(mgpu__epoch_stats, comm_s)}};
#define MGPU__N_EPOCH_STATS ((int)(sizeof mgpu__epoch_stat_fields / sizeof mgpu__epoch_stat_fields[0]))

/* State of one fit() call, so the loop body stays small. */
typedef struct mgpu__fit {
    mgpu_trainer *t;
    mgpu_model *model; mgpu_forward_fn forward; void *user;
    mgpu_loader *loader; mgpu_optimizer *opt; mgpu_metrics *metrics;
    mgpu_checkpointer *ckpt;          /* NULL without --save-dir and on ranks other than 0 */
    mgpu_ddp *ddp;                    /* gradient all-reduce across ranks (world_size > 1) */
    double ddp_exposed_s;             /* DDP's exposed communication time already counted */
    mgpu_lr_schedule schedule;
    mgpu_grad_scaler scaler;
    int64_t step, micro, batches_per_epoch;
    int64_t epoch, batch;             /* where the run stands: the epoch in progress and its next batch */
    mgpu__epoch_stats es;
    double clock;                     /* when es.time_s was last brought up to date */
    mgpu__buf history;                /* metrics records so far: JSON objects joined by commas */
    double saved_time;                /* when the last checkpoint was taken (or the run began) */
    double run_time, run_samples;     /* this process's share, for samples_per_s */
    int stop;                         /* --max-steps reached or a stop signal */
    int signal;                       /* the stop signal, 0 if none */
    int resumed;                      /* the state came from a checkpoint */
    int finished;                     /* resumed from the checkpoint that ended the run: nothing left to do */
    int64_t saved_step;               /* step of the last checkpoint taken (-1: none) */
    struct mgpu__fit_graph *graph;    /* --cuda-graph on: the captured step (NULL: every step eager) */
    char graph_note[320];             /* what --cuda-graph does in this run, for the startup line */
} mgpu__fit;
typedef struct mgpu__fit_graph mgpu__fit_graph;

/* Said once for all ranks: every rank reaches the same conclusion, rank 0 tells (with how many
   ranks it stands for), so a 4-process run prints one warning, not four. */
static void mgpu__fit_say_once(const mgpu__fit *f, mgpu_log_level level, const char *fmt, ...) MGPU__PRINTF(3, 4);
static void mgpu__fit_say_once(const mgpu__fit *f, mgpu_log_level level, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    if (f->t->rank != 0) return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (f->t->world_size > 1) mgpu_log(level, "%s (the same on all %d ranks)", msg, f->t->world_size);
    else mgpu_log(level, "%s", msg);
}

static void mgpu__fit_clock(mgpu__fit *f) {
    double now = mgpu_time_s();
    f->es.time_s += now - f->clock;
    f->clock = now;
}

/* Peak resident memory (VmHWM) in MiB, NaN where /proc is missing. */
static double mgpu__peak_rss_mb(void) {
    char line[256];
    double kb = NAN;
    FILE *fp = fopen("/proc/self/status", "r");
    if (!fp) return NAN;
    while (fgets(line, sizeof line, fp))
        if (strncmp(line, "VmHWM:", 6) == 0) { kb = strtod(line + 6, NULL); break; }
    fclose(fp);
    return kb / 1024.0;
}

/* --------------------------------------------------------------------------------------
   trainer_state.json
   -------------------------------------------------------------------------------------- */

/* A parsed JSON value written back as text (numbers keep their source spelling). */
static void mgpu__json_write(mgpu__buf *b, const mgpu_json *v) {
    const mgpu_json *c;
    switch (v->type) {
    case MGPU_JSON_NULL: mgpu__buf_puts(b, "null"); return;
    case MGPU_JSON_BOOL: mgpu__buf_puts(b, v->boolean ? "true" : "false"); return;
    case MGPU_JSON_NUMBER: mgpu__buf_append(b, v->raw, v->raw_len); return;
    case MGPU_JSON_STRING: mgpu__buf_json_string(b, v->string); return;
    case MGPU_JSON_ARRAY: case MGPU_JSON_OBJECT:
        mgpu__buf_puts(b, v->type == MGPU_JSON_ARRAY ? "[" : "{");
        for (c = v->child; c; c = c->next) {
            if (c != v->child) mgpu__buf_puts(b, ",");
            if (v->type == MGPU_JSON_OBJECT) { mgpu__buf_json_string(b, c->key); mgpu__buf_puts(b, ":"); }
            mgpu__json_write(b, c);
        }
        mgpu__buf_puts(b, v->type == MGPU_JSON_ARRAY ? "]" : "}");
        return;
    }
}

static void mgpu__json_member(mgpu__buf *b, const char *key, double v) {
    mgpu__buf_printf(b, "\"%s\":", key);
    mgpu__buf_json_number(b, v);
}

/* Every option under its flag name: numbers as numbers, the rest as strings (unset: null). */
static void mgpu__options_json(mgpu__buf *b, const mgpu_train_opts *o) {
    char text[MGPU__OPT_TEXT_MAX];
    int i;
    mgpu__buf_puts(b, "{");
    for (i = 0; i < MGPU__N_TRAIN_OPTS; i++) {
        const mgpu__opt *s = &mgpu__train_opts_table[i];
        const char *v = mgpu__opt_value_text(o, s, text, sizeof text);
        int numeric = s->kind == MGPU__OPT_INT || s->kind == MGPU__OPT_FLAG || s->kind == MGPU__OPT_I64 || s->kind == MGPU__OPT_U64 || s->kind == MGPU__OPT_FLOAT;
        if (i) mgpu__buf_puts(b, ",");
        mgpu__buf_json_string(b, s->flag);
        mgpu__buf_puts(b, ":");
        if (!v) mgpu__buf_puts(b, "null");
        else if (numeric) mgpu__buf_puts(b, v);
        else mgpu__buf_json_string(b, v);
    }
    mgpu__buf_puts(b, "}");
}

static void mgpu__schedule_json(mgpu__buf *b, const mgpu_lr_schedule *s) {
    static const char *const names[] = {"constant", "linear", "cosine", "cosine-restarts", "step"};
    mgpu__buf_printf(b, "{\"type\":\"%s\",", (int)s->type >= 0 && (int)s->type < 5 ? names[s->type] : "?");
    mgpu__json_member(b, "base_lr", s->base_lr);
    mgpu__buf_printf(b, ",\"warmup_steps\":%lld,\"total_steps\":%lld,\"t_0\":%lld,\"t_mult\":%lld,", (long long)s->warmup_steps,
                     (long long)s->total_steps, (long long)s->t_0, (long long)s->t_mult);
    mgpu__json_member(b, "eta_min", s->eta_min);
    mgpu__buf_printf(b, ",\"step_size\":%lld,", (long long)s->step_size);
    mgpu__json_member(b, "gamma", s->gamma);
    mgpu__buf_puts(b, "}");
}

static void mgpu__epoch_stats_json(mgpu__buf *b, const mgpu__epoch_stats *es) {
    int i;
    mgpu__buf_printf(b, "{\"samples\":%lld", (long long)es->samples);
    for (i = 0; i < MGPU__N_EPOCH_STATS; i++) {
        mgpu__buf_puts(b, ",");
        mgpu__json_member(b, mgpu__epoch_stat_fields[i].key, *(const double *)(const void *)((const char *)es + mgpu__epoch_stat_fields[i].offset));
    }
    mgpu__buf_puts(b, "}");
}

/* Each rank's partial loss sum and sample count of the epoch in progress, gathered for rank 0's
   trainer_state.json so a resumed run restores every rank's own sums (rank 0's alone would make
   the resumed epoch's train_loss differ from the uninterrupted run's). An all-reduce of vectors
   that are zero but for each rank's own slots is a gather: adding zeros is exact. Every rank
   calls it, at the same step. */
static mgpu_result mgpu__fit_rank_stats_json(const mgpu__fit *f, mgpu__buf *b) {
    int w = f->t->world_size, i;
    double *v;
    mgpu_result r;
    if (!f->t->comm || w <= 1) return MGPU_OK;
    if (!(v = (double *)mgpu__calloc(sizeof(double) * 2 * (size_t)w, "the per-rank epoch sums"))) return MGPU_ERR_OOM_HOST;
    v[f->t->rank] = f->es.loss_sum;
    v[w + f->t->rank] = (double)f->es.samples;
    if ((r = mgpu_comm_allreduce_f64(f->t->comm, v, 2 * w, MGPU_REDUCE_SUM)) == MGPU_OK) {
        mgpu__buf_puts(b, ",\n\"rank_epoch_stats\":{\"loss_sum\":[");
        for (i = 0; i < w; i++) { if (i) mgpu__buf_puts(b, ","); mgpu__buf_json_number(b, v[i]); }
        mgpu__buf_puts(b, "],\"samples\":[");
        for (i = 0; i < w; i++) mgpu__buf_printf(b, i ? ",%.0f" : "%.0f", v[w + i]);
        mgpu__buf_puts(b, "]}");
    }
    mgpu_free(v);
    return b->failed ? MGPU_ERR_OOM_HOST : r;
}

/* The whole state at a step boundary (see the Checkpoints section header); rank_stats: the
   members mgpu__fit_rank_stats_json wrote ("" at world size 1). */
static int mgpu__fit_state_json(const mgpu__fit *f, const char *rank_stats, mgpu__buf *b) {
    uint64_t seed = 0, offset = 0;
    mgpu_context_rng_state(f->t->ctx, &seed, &offset);
    mgpu__buf_printf(b, "{\"format_version\":%d,\"step\":%lld,\"epoch\":%lld,\"batch_in_epoch\":%lld,\"world_size\":%d,\"optimizer_steps\":%lld,",
                     MGPU__CKPT_FORMAT_VERSION, (long long)f->step, (long long)f->epoch, (long long)f->batch, f->t->world_size,
                     (long long)mgpu_optimizer_step_count(f->opt));
    mgpu__json_member(b, "lr", mgpu_optimizer_lr(f->opt));
    mgpu__buf_printf(b, ",\n\"rng\":{\"seed\":%llu,\"offset\":%llu},\n\"scaler\":{\"enabled\":%d,", (unsigned long long)seed,
                     (unsigned long long)offset, f->scaler.enabled);
    mgpu__json_member(b, "scale", f->scaler.scale);
    mgpu__buf_printf(b, ",\"growth_tracker\":%lld},\n\"schedule\":", (long long)f->scaler.growth_tracker);
    mgpu__schedule_json(b, &f->schedule);
    mgpu__buf_puts(b, ",\n\"epoch_stats\":");
    mgpu__epoch_stats_json(b, &f->es);
    mgpu__buf_puts(b, rank_stats);
    mgpu__buf_puts(b, ",\n\"metrics\":[");
    if (f->history.len) mgpu__buf_append(b, f->history.data, f->history.len);
    mgpu__buf_puts(b, "],\n\"options\":");
    mgpu__options_json(b, f->t->opts);
    mgpu__buf_puts(b, "}\n");
    return !b->failed;
}

/* A checkpoint now (at a step boundary); wait: block until it is on disk (stop signals, the end).
   Every rank calls it at the same step (their epoch sums are gathered); rank 0 writes. */
static mgpu_result mgpu__fit_checkpoint(mgpu__fit *f, int wait) {
    double t0 = mgpu_time_s();
    mgpu__buf state, ranks;
    mgpu_result r;
    mgpu__fit_clock(f);
    mgpu__buf_init(&state);
    mgpu__buf_init(&ranks);
    mgpu__buf_puts(&ranks, "");   /* a valid string at world size 1 */
    r = mgpu__fit_rank_stats_json(f, &ranks);
    if (r == MGPU_OK && f->ckpt)
        r = mgpu__fit_state_json(f, ranks.data, &state) ? mgpu_checkpointer_save(f->ckpt, f->step, f->model, f->opt, state.data) : MGPU_ERR_OOM_HOST;
    if (r == MGPU_OK && wait && f->ckpt) r = mgpu_checkpointer_wait(f->ckpt);
    mgpu__buf_free(&state);
    mgpu__buf_free(&ranks);
    f->saved_step = f->step;
    f->saved_time = mgpu_time_s();
    f->es.checkpoint_s += f->saved_time - t0;
    return r;
}

/* Whether checkpoints are taken at all (--save-dir), on every rank: rank 0 writes them, the
   others take part in gathering their epoch sums. */
static int mgpu__fit_saving(const mgpu__fit *f) { return f->t->opts->save_dir && f->t->opts->save_dir[0]; }

/* Rank 0's wall-clock trigger (--checkpoint-interval-min); shared with the other ranks by
   mgpu__fit_agree_stop, as clocks differ. */
static int mgpu__fit_checkpoint_time_due(const mgpu__fit *f) {
    const mgpu_train_opts *o = f->t->opts;
    return f->t->rank == 0 && o->checkpoint_interval_min > 0 && mgpu_time_s() - f->saved_time >= 60.0 * o->checkpoint_interval_min;
}

/* The same answer on every rank: a stop signal (agreed), every N steps, or rank 0's clock. */
static int mgpu__fit_checkpoint_due(const mgpu__fit *f, int time_due) {
    const mgpu_train_opts *o = f->t->opts;
    if (!mgpu__fit_saving(f)) return 0;
    if (f->signal) return 1;
    if (o->checkpoint_every_steps > 0 && f->step % o->checkpoint_every_steps == 0) return 1;
    return time_due;
}

/* --------------------------------------------------------------------------------------
   Resuming
   -------------------------------------------------------------------------------------- */

/* The checkpoint --resume names: 1 with its path, 0 when auto finds none (a fresh start). */
static mgpu_result mgpu__fit_resume_path(const mgpu__fit *f, char *path, size_t size, int *found) {
    const mgpu_train_opts *o = f->t->opts;
    char file[MGPU__CKPT_PATH_MAX];
    const char *dir = o->resume_path;
    *found = 0;
    if (o->resume == MGPU_RESUME_AUTO) {
        if (!o->save_dir || !o->save_dir[0]) return mgpu__fail(MGPU_ERR_INVALID_ARG, "--resume auto looks in --save-dir, which is not set");
        dir = o->save_dir;
        if (f->t->rank == 0) mgpu__ckpt_remove_stale(dir);
        if (!mgpu__is_dir(dir) || !mgpu__ckpt_any(dir)) {
            mgpu__fit_say_once(f, MGPU_LOG_INFO, "--resume auto: no checkpoint in '%s' yet; starting from scratch", dir);
            return MGPU_OK;
        }
    } else if (mgpu__path_join(file, dir, MGPU__CKPT_STATE) == MGPU_OK && access(file, F_OK) == 0) {
        /* a step directory itself */
        if (strlen(dir) >= size) return mgpu__fail(MGPU_ERR_INVALID_ARG, "--resume %s: path too long", dir);
        memcpy(path, dir, strlen(dir) + 1);
        *found = 1;
        return MGPU_OK;
    }
    /* a save directory: its latest valid checkpoint (rank 0 tells of corrupt ones it skips) */
    if (mgpu__checkpoint_find(dir, path, size, f->t->rank == 0 ? MGPU_LOG_WARN : MGPU_LOG_DEBUG) != MGPU_OK) return mgpu_last_result();
    *found = 1;
    return MGPU_OK;
}

/* Options that change the data order, the schedule or the numerics: resuming with other values
   works, but is no longer the same run, which deserves a warning. */
static void mgpu__fit_warn_changed_options(const mgpu__fit *f, const mgpu_json *state) {
    static const char *const keys[] = {"batch-size", "grad-accum-steps", "seed", "lr", "optimizer", "schedule", "epochs",
                                       "max-steps", "warmup-epochs", "amp", "weight-decay", "clip-grad-norm"};
    const mgpu_json *saved = mgpu_json_get(state, "options");
    char text[MGPU__OPT_TEXT_MAX];
    size_t i;
    int64_t world = 1;
    for (i = 0; saved && i < sizeof keys / sizeof keys[0]; i++) {
        const mgpu__opt *s = mgpu__opt_find(keys[i], strlen(keys[i]));
        const mgpu_json *v = mgpu_json_get(saved, keys[i]);
        const char *now = s ? mgpu__opt_value_text(f->t->opts, s, text, sizeof text) : NULL;
        const char *then = !v ? NULL : v->type == MGPU_JSON_STRING ? v->string : v->type == MGPU_JSON_NUMBER ? v->raw : NULL;
        size_t then_len = !then ? 0 : v->type == MGPU_JSON_NUMBER ? v->raw_len : strlen(then);
        if (now && then && (strlen(now) != then_len || strncmp(now, then, then_len) != 0))
            mgpu__fit_say_once(f, MGPU_LOG_WARN, "resuming with --%s %s, but the checkpoint was written with %.*s: the run will differ from an uninterrupted one",
                               keys[i], now, (int)then_len, then);
    }
    if (mgpu_json_int64(mgpu_json_get(state, "world_size"), &world) && world != f->t->world_size)
        mgpu__fit_say_once(f, MGPU_LOG_WARN, "resuming at world size %d from a checkpoint written at world size %lld: the data order changes",
                           f->t->world_size, (long long)world);
}

/* What the trainer needs beyond what every checkpoint holds; checked before anything is loaded. */
static mgpu_result mgpu__fit_check_state(const mgpu__fit *f, const mgpu_json *state, const char *path) {
    static const mgpu__jfield need[] = {{"epoch", MGPU__J_INT, 1, 0}, {"batch_in_epoch", MGPU__J_INT, 1, 0}, {"rng", MGPU__J_OBJECT, 1, 0},
                                        {"epoch_stats", MGPU__J_OBJECT, 1, 0}, {"metrics", MGPU__J_ARRAY, 1, 0}};
    static const mgpu__jfield stats[] = {{"samples", MGPU__J_INT, 1, 0}, {"loss_sum", MGPU__J_NUMBER, 1, 0}};
    char label[MGPU__CKPT_PATH_MAX + 32];
    int64_t batch = 0;
    snprintf(label, sizeof label, "%s/" MGPU__CKPT_STATE, path);
    if (mgpu__json_check_fields(state, label, "", need, 5) != MGPU_OK ||
        mgpu__json_check_fields(mgpu_json_get(state, "epoch_stats"), label, "epoch_stats.", stats, 2) != MGPU_OK)
        return MGPU_ERR_FORMAT;
    mgpu_json_int64(mgpu_json_get(state, "batch_in_epoch"), &batch);
    if (batch > f->batches_per_epoch)
        return mgpu__fail(MGPU_ERR_FORMAT, "%s: batch_in_epoch %lld is past the %lld batches of an epoch of this run (was --batch-size changed?)",
                          label, (long long)batch, (long long)f->batches_per_epoch);
    return MGPU_OK;
}

static double mgpu__json_number_or_nan(const mgpu_json *j) { return j && j->type == MGPU_JSON_NUMBER ? j->number : NAN; }

/* This rank's own partial sums of the epoch in progress (see mgpu__fit_rank_stats_json). Written
   at another world size, the sums cannot be split as the data now is: rank 0 takes them all, so
   the epoch's train_loss still averages every sample seen. Absent (world size 1), epoch_stats
   already holds them. */
static void mgpu__fit_restore_rank_stats(mgpu__fit *f, const mgpu_json *ranks) {
    const mgpu_json *loss = mgpu_json_get(ranks, "loss_sum"), *samples = mgpu_json_get(ranks, "samples"), *l, *n;
    int i;
    if (!loss || !samples || loss->type != MGPU_JSON_ARRAY || samples->type != MGPU_JSON_ARRAY || loss->count != samples->count) return;
    f->es.loss_sum = 0;
    f->es.samples = 0;
    for (i = 0, l = loss->child, n = samples->child; l && n; i++, l = l->next, n = n->next) {
        int64_t k = 0;
        if (loss->count == f->t->world_size ? i != f->t->rank : f->t->rank != 0) continue;
        f->es.loss_sum += mgpu__json_number_or_nan(l);
        if (mgpu_json_int64(n, &k)) f->es.samples += k;
    }
}

/* Position, sums, RNG, scaler and history from a checked state. */
static void mgpu__fit_restore(mgpu__fit *f, const mgpu_json *state) {
    const mgpu_json *rng = mgpu_json_get(state, "rng"), *scaler = mgpu_json_get(state, "scaler");
    const mgpu_json *stats = mgpu_json_get(state, "epoch_stats"), *m;
    uint64_t seed = 0, offset = 0;
    int i;
    mgpu_json_int64(mgpu_json_get(state, "step"), &f->step);
    mgpu_json_int64(mgpu_json_get(state, "epoch"), &f->epoch);
    mgpu_json_int64(mgpu_json_get(state, "batch_in_epoch"), &f->batch);
    mgpu__json_u64(mgpu_json_get(rng, "seed"), &seed);
    mgpu__json_u64(mgpu_json_get(rng, "offset"), &offset);
    mgpu_context_set_rng_state(f->t->ctx, seed, offset);
    if (scaler && f->scaler.enabled) {
        f->scaler.scale = (float)mgpu_json_get(scaler, "scale")->number;
        mgpu_json_int64(mgpu_json_get(scaler, "growth_tracker"), &f->scaler.growth_tracker);
    }
    memset(&f->es, 0, sizeof f->es);
    mgpu_json_int64(mgpu_json_get(stats, "samples"), &f->es.samples);
    for (i = 0; i < MGPU__N_EPOCH_STATS; i++)
        *(double *)(void *)((char *)&f->es + mgpu__epoch_stat_fields[i].offset) = mgpu__json_number_or_nan(mgpu_json_get(stats, mgpu__epoch_stat_fields[i].key));
    if (!(f->es.time_s >= 0)) f->es.time_s = 0;
    mgpu__fit_restore_rank_stats(f, mgpu_json_get(state, "rank_epoch_stats"));
    for (m = mgpu_json_get(state, "metrics")->child; m; m = m->next) {
        if (f->history.len) mgpu__buf_puts(&f->history, ",");
        mgpu__json_write(&f->history, m);
    }
    /* the LR of the last step taken, as an uninterrupted run would report it */
    if (f->step > 0) mgpu_optimizer_set_lr(f->opt, mgpu_lr_at(&f->schedule, f->step - 1));
    if (f->t->opts->max_steps > 0 && f->step >= f->t->opts->max_steps) f->stop = 1;
    /* the checkpoint the end of a run writes: every epoch done, or stopped at --max-steps after its
       epoch record (the loop in mgpu__fit_run would not run) */
    f->finished = f->epoch >= f->t->opts->epochs || (f->stop && f->batch == 0);
    f->resumed = 1;
}

/* The metrics file becomes the checkpoint's records, so epochs logged after the checkpoint (and
   logged again as the run repeats them) are not duplicated. */
static mgpu_result mgpu__fit_rewrite_metrics(const mgpu__fit *f, const mgpu_json *state) {
    const mgpu_train_opts *o = f->t->opts;
    const mgpu_json *m;
    mgpu__buf text;
    mgpu_result r;
    if (!o->metrics || f->t->rank != 0) return MGPU_OK;
    mgpu__buf_init(&text);
    mgpu__buf_puts(&text, ""); /* a valid pointer even with no records */
    for (m = mgpu_json_get(state, "metrics")->child; m; m = m->next) {
        mgpu__json_write(&text, m);
        mgpu__buf_puts(&text, "\n");
    }
    r = text.failed ? MGPU_ERR_OOM_HOST : mgpu_write_file_atomic(o->metrics, text.data, text.len);
    mgpu__buf_free(&text);
    return r;
}

static mgpu_result mgpu__fit_resume(mgpu__fit *f) {
    const mgpu_train_opts *o = f->t->opts;
    char path[MGPU__CKPT_PATH_MAX];
    mgpu_json *state;
    mgpu_result r;
    int found = 0;
    if (o->resume == MGPU_RESUME_NONE) return MGPU_OK;
    if ((r = mgpu__fit_resume_path(f, path, sizeof path, &found)) != MGPU_OK || !found) return r;
    /* the trainer's fields first, then the checkpoint's full validation and load: a bad
       checkpoint leaves the freshly initialised model as it was */
    if (!(state = mgpu__ckpt_read_state(path))) return mgpu_last_result();
    if ((r = mgpu__fit_check_state(f, state, path)) == MGPU_OK && (r = mgpu_checkpoint_load(path, f->model, f->opt, NULL)) == MGPU_OK) {
        if (!o->eval_only) mgpu__fit_warn_changed_options(f, state);
        mgpu__fit_restore(f, state);
        /* a finished run's metrics file also holds its final line, which the checkpoint lacks;
           --eval-only appends its own line and changes nothing else */
        r = f->history.failed ? MGPU_ERR_OOM_HOST : f->finished || o->eval_only ? MGPU_OK : mgpu__fit_rewrite_metrics(f, state);
    }
    mgpu_json_free(state);
    if (r == MGPU_OK && f->t->rank == 0) {
        if (o->eval_only) printf("loaded %s: step %lld, epoch %lld\n", path, (long long)f->step, (long long)f->epoch);
        else if (f->finished)
            printf("already finished: %s is the end of the run (step %lld, %lld of %d epochs); nothing to train. "
                   "Start a new run with another --save-dir (or --init-from %s/model.safetensors)\n",
                   path, (long long)f->step, (long long)f->epoch, o->epochs, path);
        else printf("resumed from %s: step %lld, epoch %lld, batch %lld\n", path, (long long)f->step, (long long)f->epoch + 1, (long long)f->batch);
        fflush(stdout);
    }
    return r;
}

/* --------------------------------------------------------------------------------------
   The loop
   -------------------------------------------------------------------------------------- */

/* Unscale (fp16), clip, step (skipped by the scaler on inf/NaN), zero the grads. */
static mgpu_result mgpu__fit_optimizer_step(mgpu__fit *f) {
    const mgpu_train_opts *o = f->t->opts;
    double t0 = mgpu_time_s();
    mgpu_result r = MGPU_OK;
    int stepped = 1;
    mgpu_optimizer_set_lr(f->opt, mgpu_lr_at(&f->schedule, f->step));
    if (f->t->amp != MGPU_AMP_OFF && o->clip_grad_norm > 0) r = mgpu_grad_scaler_unscale(&f->scaler, f->model);
    if (r == MGPU_OK && o->clip_grad_norm > 0) r = mgpu_clip_grad_norm(f->model, o->clip_grad_norm, NULL);
    if (r == MGPU_OK) {
        if (f->t->amp != MGPU_AMP_OFF) {
            if ((r = mgpu_grad_scaler_step(&f->scaler, f->opt, f->model, &stepped)) == MGPU_OK) mgpu_grad_scaler_update(&f->scaler);
        } else {
            r = mgpu_optimizer_step(f->opt);
        }
    }
    if (r == MGPU_OK) r = mgpu_optimizer_zero_grad(f->opt);
    f->step++;
    f->micro = 0;
    f->es.optimizer_s += mgpu_time_s() - t0;
    return r;
}

/* Time backward spent waiting for DDP's all-reduces is communication, not compute. */
static void mgpu__fit_count_comm(mgpu__fit *f) {
    mgpu_ddp_stats st;
    if (!f->ddp) return;
    mgpu_ddp_get_stats(f->ddp, &st);
    f->es.comm_s += st.exposed_s - f->ddp_exposed_s;
    f->es.compute_s -= st.exposed_s - f->ddp_exposed_s;
    f->ddp_exposed_s = st.exposed_s;
}

/* Every rank must stop at the same step: a signal may reach the ranks at different steps (a
   rank that got none stops for the lowest signal number one got: SIGINT before SIGTERM). Rank 0's
   wall-clock checkpoint trigger travels in the same all-reduce. Without --save-dir no stop
   handler is installed and no checkpoint is taken, so there is nothing to agree on (and no
   collective is added to every step). */
static mgpu_result mgpu__fit_agree_stop(mgpu__fit *f, int *signal, int *time_due) {
    double v[32];   /* [0]: rank 0's time_due; [s]: how many ranks got signal s (1..31) */
    mgpu_result r;
    int i;
    if (!f->t->comm || !mgpu__fit_saving(f)) return MGPU_OK;
    memset(v, 0, sizeof v);
    v[0] = *time_due;
    if (*signal > 0 && *signal < 32) v[*signal] = 1;
    if ((r = mgpu_comm_allreduce_f64(f->t->comm, v, 32, MGPU_REDUCE_SUM)) != MGPU_OK) return r;
    *time_due = v[0] > 0;
    for (i = 1; i < 32 && !*signal; i++)
        if (v[i] > 0) *signal = i;
    return MGPU_OK;
}

/* Forward, loss and backward of one micro-batch (gradients accumulate); *loss: the unscaled
   loss, left on the context's device (reading it is the step's one host sync, taken at its end). */
static mgpu_result mgpu__fit_forward_backward(mgpu__fit *f, mgpu_tensor *x, mgpu_tensor *y, mgpu_tensor **loss) {
    const mgpu_train_opts *o = f->t->opts;
    mgpu_context *ctx = f->t->ctx;
    mgpu_tensor *obj;
    *loss = mgpu_op_cross_entropy(ctx, f->forward(ctx, x, f->user), y);
    obj = o->grad_accum_steps > 1 ? mgpu_op_scale(ctx, *loss, 1.0f / (float)o->grad_accum_steps) : *loss;
    if (f->scaler.enabled) obj = mgpu_grad_scaler_scale(ctx, &f->scaler, obj);
    if (!obj) return mgpu_last_result() ? mgpu_last_result() : MGPU_ERR_STATE;
    return mgpu_backward(ctx, obj);
}

static void mgpu__fit_count_loss(mgpu__fit *f, double loss, int64_t size) {
    f->es.loss_sum += loss * (double)size;
    f->es.samples += size;
}

static int mgpu__fit_graph_fits(const mgpu__fit *f, const mgpu_batch *b);
static mgpu_result mgpu__fit_graph_batch(mgpu__fit *f, const mgpu_batch *b);

/* One micro-batch: forward, loss, backward (accumulating); an optimizer step every
   grad_accum_steps micro-batches and at the end of the epoch (*stepped tells). A full batch under
   --cuda-graph on goes through the captured step instead (mgpu__fit_graph_batch). */
static mgpu_result mgpu__fit_batch(mgpu__fit *f, const mgpu_batch *b, int *stepped) {
    const mgpu_train_opts *o = f->t->opts;
    mgpu_context *ctx = f->t->ctx;
    double t0 = mgpu_time_s();
    mgpu_tensor *loss = NULL;
    mgpu__pending_item loss_value;
    mgpu_result r;
    *stepped = f->micro + 1 == o->grad_accum_steps || b->index + 1 == f->batches_per_epoch;
    if (mgpu__fit_graph_fits(f, b)) return mgpu__fit_graph_batch(f, b);   /* one batch, one optimizer step */
    if (f->ddp) mgpu_ddp_set_sync(f->ddp, *stepped);   /* no_sync for accumulation micro-steps */
    r = mgpu__fit_forward_backward(f, b->x, b->y, &loss);
    f->es.compute_s += mgpu_time_s() - t0;
    mgpu__fit_count_comm(f);
    if (r != MGPU_OK) return r;
    f->micro++;
    /* the loss's copy is queued before the optimizer step: an fp16 step's found-inf read (the
       scaler's wait) then brings it too, and the step waits for the host once */
    mgpu__item_begin(loss, &loss_value);
    if (*stepped) r = mgpu__fit_optimizer_step(f);
    mgpu__fit_count_loss(f, mgpu__item_end(&loss_value), b->size);
    mgpu_context_end_step(ctx);
    return r;
}

/* --------------------------------------------------------------------------------------
   --cuda-graph on: the whole step (forward, loss, backward, unscale/clip, optimizer step,
   zero_grad) captured once as a CUDA Graph and replayed for every later batch of the same shape.
   MGPU__GRAPH_WARMUP eager steps come first, in the graph's private pool (mgpu__step_graph):
   they create the gradients, read num_batches_tracked back, and grow the pool's arena and
   cuBLAS buffers to the step's size, so the capture allocates and synchronises nothing. Each
   batch is copied into fixed input tensors on the stream (after the loader's upload); a batch
   of another shape (an epoch's last partial batch) runs eagerly, outside the pool. Per-step
   values (LR, Adam's bias corrections, dropout's RNG position, num_batches_tracked) are step
   scalars whose replay hooks keep the host state what N eager steps leave, so checkpoints and
   a resumed run see no difference. Where capture cannot work the reason is printed and the
   run stays eager; a capture that fails (an op that synchronises, say) falls back the same way.
   -------------------------------------------------------------------------------------- */

#define MGPU__GRAPH_WARMUP 2

struct mgpu__fit_graph {
#ifdef MGPU_CUDA
    mgpu__step_graph *sg;
#endif
    mgpu_tensor *x, *y;                /* the fixed inputs every captured batch is copied into */
    const float *loss;                 /* the captured step's loss, in the graph's arena */
    int warmed;                        /* eager steps run in the pool so far */
    int captured;
};

static void mgpu__fit_graph_free(mgpu__fit *f) {
    mgpu__fit_graph *g = f->graph;
    if (!g) return;
#ifdef MGPU_CUDA
    mgpu__step_graph_destroy(g->sg);
#endif
    mgpu_tensor_free(g->x);
    mgpu_tensor_free(g->y);
    mgpu_free(g);
    f->graph = NULL;
}

/* Whether this run captures, or why not (f->graph_note completes the startup line). */
static mgpu_result mgpu__fit_graph_plan(mgpu__fit *f) {
    const mgpu_train_opts *o = f->t->opts;
    const char *off = NULL;
    f->graph_note[0] = 0;
    if (f->t->ctx->device.type != MGPU_DEVICE_CUDA) return MGPU_OK;
    if (o->cuda_graph == MGPU_CUDA_GRAPH_OFF) off = "off";
    else if (o->eval_only) off = "off (--eval-only: no training step to capture)";
    else if (f->scaler.enabled) off = "off (fp16 loss scaling reads the found-inf flag on the host each step to skip or take the step)";
    else if (f->t->comm) off = "off (DDP: the gradient all-reduces are started from the host as buckets fill during backward)";
    else if (o->grad_accum_steps > 1) off = "off (--grad-accum-steps > 1: the optimizer steps on every Nth batch only)";
    if (off) { snprintf(f->graph_note, sizeof f->graph_note, "%s", off); return MGPU_OK; }
#ifdef MGPU_CUDA
    if (!(f->graph = (mgpu__fit_graph *)mgpu__calloc(sizeof *f->graph, "the CUDA Graph state"))) return mgpu_last_result();
    if (!(f->graph->sg = mgpu__step_graph_create(f->t->ctx))) {   /* short of device memory: eager steps may still fit */
        snprintf(f->graph_note, sizeof f->graph_note, "off (the graph's own memory pool could not be allocated: %.200s)", mgpu_last_error());
        mgpu__fit_graph_free(f);
        mgpu_clear_error();
        return MGPU_OK;
    }
#endif
    snprintf(f->graph_note, sizeof f->graph_note, "on (the step is captured after %d eager warm-up steps; a batch of another size runs eagerly)",
             MGPU__GRAPH_WARMUP);
    return MGPU_OK;
}

/* The graph pool's activation arena at its peak (0 without a graph). */
static size_t mgpu__fit_graph_arena_peak(const mgpu__fit *f) {
#ifdef MGPU_CUDA
    if (f->graph) return f->graph->sg->inside ? f->t->ctx->device_arena.peak : f->graph->sg->arena.peak;
#endif
    (void)f;
    return 0;
}

static int mgpu__fit_graph_same(const mgpu_tensor *fixed, const mgpu_tensor *t) {
    return fixed->dtype == t->dtype && fixed->ndim == t->ndim && memcmp(fixed->shape, t->shape, sizeof(int64_t) * (size_t)t->ndim) == 0;
}
/* A full batch of the captured shape (the first full batch sets it). */
static int mgpu__fit_graph_fits(const mgpu__fit *f, const mgpu_batch *b) {
    const mgpu__fit_graph *g = f->graph;
    if (!g || b->size != f->t->opts->batch_size) return 0;
    return !g->x || (mgpu__fit_graph_same(g->x, b->x) && mgpu__fit_graph_same(g->y, b->y));
}

#ifdef MGPU_CUDA
/* The batch into the fixed inputs, on the context's stream (ordered after the loader's upload). */
static mgpu_result mgpu__fit_graph_inputs(mgpu__fit_graph *g, mgpu_context *ctx, const mgpu_batch *b) {
    mgpu_result r;
    if (!g->x && (!(g->x = mgpu_tensor_create(ctx, b->x->dtype, b->x->ndim, b->x->shape)) ||
                  !(g->y = mgpu_tensor_create(ctx, b->y->dtype, b->y->ndim, b->y->shape))))
        return mgpu_last_result();
    if ((r = mgpu_cuda_copy_d2d_async(g->x->data, b->x->data, mgpu_tensor_nbytes(b->x), ctx->cuda_stream)) != MGPU_OK) return r;
    return mgpu_cuda_copy_d2d_async(g->y->data, b->y->data, mgpu_tensor_nbytes(b->y), ctx->cuda_stream);
}

/* An eager step in the pool (warm-up) or its capture, then the first launch of the capture.
   *loss: the step's loss on the host. */
static mgpu_result mgpu__fit_graph_record(mgpu__fit *f, double *loss) {
    mgpu__fit_graph *g = f->graph;
    mgpu_context *ctx = f->t->ctx;
    mgpu_tensor *l = NULL;
    int capture = g->warmed >= MGPU__GRAPH_WARMUP;
    mgpu_result r, e;
    mgpu__step_graph_use(g->sg, 1);
    r = capture ? mgpu__step_graph_begin(g->sg) : MGPU_OK;
    if (r == MGPU_OK) r = mgpu__fit_forward_backward(f, g->x, g->y, &l);
    if (r == MGPU_OK) r = mgpu__fit_optimizer_step(f);
    if (capture && (e = mgpu__step_graph_end(g->sg, r != MGPU_OK)) != MGPU_OK && r == MGPU_OK) r = e;
    if (r == MGPU_OK && capture) { g->captured = 1; g->loss = (const float *)l->data; r = mgpu__step_graph_launch(g->sg); }
    if (r == MGPU_OK) *loss = capture ? 0.0 : mgpu_tensor_item(l);
    mgpu_context_end_step(ctx);
    mgpu__step_graph_use(g->sg, 0);
    g->warmed++;
    return r;
}

/* A replay: the LR of this step, the graph (its hooks step the optimizer's counts, the RNG, ...). */
static mgpu_result mgpu__fit_graph_replay(mgpu__fit *f) {
    mgpu_optimizer_set_lr(f->opt, mgpu_lr_at(&f->schedule, f->step));
    f->step++;
    f->micro = 0;
    return mgpu__step_graph_launch(f->graph->sg);
}

/* A capture that failed: said once, the graph dropped, and the step run eagerly as if never tried. */
static mgpu_result mgpu__fit_graph_give_up(mgpu__fit *f, const mgpu_batch *b, int64_t step) {
    int stepped = 1;
    printf("cuda graph off from step %lld: capturing the step failed (%s); it runs uncaptured\n", (long long)step + 1, mgpu_last_error());
    fflush(stdout);
    mgpu__fit_graph_free(f);
    mgpu_clear_error();
    f->step = step; f->micro = 0;
    return mgpu__fit_batch(f, b, &stepped);
}

static mgpu_result mgpu__fit_graph_batch(mgpu__fit *f, const mgpu_batch *b) {
    mgpu__fit_graph *g = f->graph;
    mgpu_context *ctx = f->t->ctx;
    double t0 = mgpu_time_s(), loss = NAN;
    int64_t step = f->step;
    int was_captured = g->captured;
    float v = NAN;
    mgpu_result r = mgpu__fit_graph_inputs(g, ctx, b);
    if (r != MGPU_OK) return r;
    if (was_captured) r = mgpu__fit_graph_replay(f);
    else if ((r = mgpu__fit_graph_record(f, &loss)) != MGPU_OK && g->warmed > MGPU__GRAPH_WARMUP) return mgpu__fit_graph_give_up(f, b, step);
    if (r == MGPU_OK && g->captured && (r = mgpu__transfer(ctx, &v, g->loss, sizeof v, "reading the captured step's loss")) == MGPU_OK) loss = v;
    if (r == MGPU_OK && g->captured && !was_captured) {
        printf("cuda graph captured at step %lld\n", (long long)step + 1);
        fflush(stdout);
    }
    f->es.compute_s += mgpu_time_s() - t0;   /* the optimizer step is inside the graph: its time is compute here */
    mgpu__fit_count_loss(f, loss, b->size);
    return r;
}
#else
static mgpu_result mgpu__fit_graph_batch(mgpu__fit *f, const mgpu_batch *b) {
    (void)f; (void)b;
    return mgpu__fail(MGPU_ERR_UNSUPPORTED, "CUDA Graph capture needs a CUDA build");
}
#endif

/* After each optimizer step: stop conditions, then a checkpoint if one is due. */
static mgpu_result mgpu__fit_after_step(mgpu__fit *f) {
    const mgpu_train_opts *o = f->t->opts;
    int signal = mgpu__fit_saving(f) ? (int)mgpu__stop_signal : 0;   /* handled only with a checkpoint to save */
    int time_due = mgpu__fit_checkpoint_time_due(f);
    mgpu_result r;
    if (o->max_steps > 0 && f->step >= o->max_steps) f->stop = 1;
    if ((r = mgpu__fit_agree_stop(f, &signal, &time_due)) != MGPU_OK) return r;
    if (signal) { f->stop = 1; f->signal = signal; }
    return mgpu__fit_checkpoint_due(f, time_due) ? mgpu__fit_checkpoint(f, f->signal != 0) : MGPU_OK;
}

/* The rest of the epoch in progress, from batch f->batch. */
static mgpu_result mgpu__fit_epoch(mgpu__fit *f) {
    const mgpu_train_opts *o = f->t->opts;
    char label[64];
    mgpu_progress *bar;
    mgpu_batch b;
    mgpu_result r;
    double t_start = mgpu_time_s();
    int64_t seen = f->es.samples;
    mgpu_model_train(f->model, 1);
    if ((r = mgpu_loader_set_epoch(f->loader, f->epoch, f->batch)) != MGPU_OK) return r;
    snprintf(label, sizeof label, "epoch %lld/%d", (long long)f->epoch + 1, o->epochs);
    bar = f->t->rank == 0 ? mgpu_progress_begin(label, f->batches_per_epoch, o->log_every) : NULL;
    f->clock = t_start;
    while (!f->stop) {
        double t0 = mgpu_time_s();
        int stepped = 0;
        r = mgpu_loader_next(f->loader, &b);
        f->es.data_wait_s += mgpu_time_s() - t0;
        if (r != MGPU_OK || b.size == 0) break;
        if ((r = mgpu__fit_batch(f, &b, &stepped)) != MGPU_OK) break;
        f->batch = b.index + 1;
        mgpu_progress_update(bar, f->batch, f->es.loss_sum / (double)f->es.samples);
        if (stepped && (r = mgpu__fit_after_step(f)) != MGPU_OK) break;
    }
    mgpu_progress_end(bar);
    mgpu__fit_clock(f);
    f->run_time += mgpu_time_s() - t_start;
    f->run_samples += (double)(f->es.samples - seen);
    return r;
}

static void mgpu__epoch_record_json(mgpu__buf *b, const mgpu_epoch_record *r) {
    mgpu__buf_printf(b, "{\"epoch\":%lld,\"step\":%lld,", (long long)r->epoch, (long long)r->step);
    mgpu__json_member(b, "train_loss", r->train_loss); mgpu__buf_puts(b, ",");
    mgpu__json_member(b, "test_loss", r->test_loss); mgpu__buf_puts(b, ",");
    mgpu__json_member(b, "test_accuracy", r->test_accuracy); mgpu__buf_puts(b, ",");
    mgpu__json_member(b, "lr", r->lr); mgpu__buf_puts(b, ",");
    mgpu__json_member(b, "epoch_time_s", r->epoch_time_s); mgpu__buf_puts(b, ",");
    mgpu__json_member(b, "samples_per_s", r->samples_per_s);
    mgpu__buf_printf(b, ",\"world_size\":%d,\"global_batch\":%lld,\"amp\":", r->world_size, (long long)r->global_batch);
    mgpu__buf_json_string(b, r->amp ? r->amp : "off");
    if (r->extra_json && r->extra_json[0]) mgpu__buf_printf(b, ",%s", r->extra_json);
    mgpu__buf_puts(b, "}");
}

/* Where the epoch's time went, and memory, as extra metrics members. */
static void mgpu__fit_extra_json(const mgpu__fit *f, mgpu__buf *b) {
    int i;
    for (i = 2; i < MGPU__N_EPOCH_STATS; i++) { /* after loss_sum and time_s (the record has those) */
        if (i > 2) mgpu__buf_puts(b, ",");
        mgpu__json_member(b, mgpu__epoch_stat_fields[i].key, *(const double *)(const void *)((const char *)&f->es + mgpu__epoch_stat_fields[i].offset));
    }
    /* host arena (headers, tape) plus, on a GPU, the device arena (activations) and a captured step's own */
    mgpu__buf_printf(b, ",\"peak_arena_bytes\":%zu,", f->t->ctx->arena.peak + f->t->ctx->device_arena.peak + mgpu__fit_graph_arena_peak(f));
    mgpu__json_member(b, "rss_mb", mgpu__peak_rss_mb());
#ifdef MGPU_CUDA
    if (f->t->ctx->device.type == MGPU_DEVICE_CUDA) {   /* the caching allocator's view, as torch.cuda.memory_allocated/reserved/max_allocated */
        mgpu_memory_stats ms;
        if (mgpu_memory_stats_get(f->t->ctx->device.index, &ms) == MGPU_OK) {
            mgpu__buf_puts(b, ",");
            mgpu__json_member(b, "gpu_mem_allocated_mb", mgpu__mib(ms.allocated)); mgpu__buf_puts(b, ",");
            mgpu__json_member(b, "gpu_mem_reserved_mb", mgpu__mib(ms.reserved)); mgpu__buf_puts(b, ",");
            mgpu__json_member(b, "gpu_mem_peak_mb", mgpu__mib(ms.peak));
        }
    }
#endif
    if (f->ddp) {   /* cumulative: all-reduce time and how much of it backward had to wait for */
        mgpu_ddp_stats st;
        mgpu_ddp_get_stats(f->ddp, &st);
        mgpu__buf_printf(b, ",\"ddp_buckets\":%lld,\"ddp_bytes_per_step\":%.0f,", (long long)st.buckets, st.bytes_per_step);
        mgpu__json_member(b, "ddp_allreduce_s", st.comm_s);
        mgpu__buf_puts(b, ",");
        mgpu__json_member(b, "ddp_exposed_s", st.exposed_s);
    }
}

static mgpu_result mgpu__fit_report_epoch(mgpu__fit *f, double test_loss, double test_acc) {
    const mgpu_train_opts *o = f->t->opts;
    mgpu_epoch_record rec;
    mgpu__buf extra;
    mgpu_result r;
    double sums[2];   /* loss sum and samples over all ranks */
    double train_loss;
    sums[0] = f->es.loss_sum; sums[1] = (double)f->es.samples;
    if (f->t->comm && (r = mgpu_comm_allreduce_f64(f->t->comm, sums, 2, MGPU_REDUCE_SUM)) != MGPU_OK) return r;
    train_loss = sums[1] > 0 ? sums[0] / sums[1] : NAN;
    memset(&rec, 0, sizeof rec);
    mgpu__buf_init(&extra);
    mgpu__fit_extra_json(f, &extra);
    rec.epoch = f->epoch + 1; rec.step = f->step;
    rec.train_loss = train_loss; rec.test_loss = test_loss; rec.test_accuracy = test_acc;
    rec.lr = mgpu_optimizer_lr(f->opt);
    rec.epoch_time_s = f->es.time_s;
    rec.samples_per_s = f->es.time_s > 0 ? sums[1] / f->es.time_s : 0;   /* all ranks together */
    rec.world_size = f->t->world_size; rec.global_batch = o->batch_size * o->grad_accum_steps * f->t->world_size;
    rec.amp = mgpu__amp_mode_name(o->amp);
    rec.extra_json = extra.data;
    if (f->t->rank == 0) {
        printf("epoch %lld/%d  train_loss %.4f  test_loss %.4f  test_acc %.4f  lr %.3g  %.2f s  %.0f samples/s\n",
               (long long)rec.epoch, o->epochs, train_loss, test_loss, test_acc, rec.lr, rec.epoch_time_s, rec.samples_per_s);
        fflush(stdout);
    }
    if (f->history.len) mgpu__buf_puts(&f->history, ",");
    mgpu__epoch_record_json(&f->history, &rec);
    r = extra.failed || f->history.failed ? MGPU_ERR_OOM_HOST : mgpu_metrics_write_epoch(f->metrics, &rec);
    mgpu__buf_free(&extra);
    return r;
}

/* Evaluation sharded over the ranks (DDP and DP): each evaluates its strided shard of the test set
   and the sums are all-reduced, so W ranks share the work instead of each doing all of it. */
static mgpu_result mgpu__fit_evaluate(mgpu__fit *f, const mgpu_dataset *test, double *loss, double *accuracy) {
    const mgpu_trainer *t = f->t;
    mgpu_dataset view;
    mgpu__shard shard;
    double sums[3];
    mgpu_result r;
    int sharded = t->comm && t->world_size > 1;
    if (sharded) mgpu__shard_view(test, &shard, t->rank, t->world_size, &view);
    r = mgpu__evaluate_sums(t->ctx, f->model, f->forward, f->user, sharded ? &view : test, 1000, sums);
    if (r == MGPU_OK && sharded) r = mgpu_comm_allreduce_f64(t->comm, sums, 3, MGPU_REDUCE_SUM);
    if (r == MGPU_OK) mgpu__evaluate_ratios(sums, loss, accuracy);
    return r;
}

/* Evaluation, the metrics line, then the next epoch (and an epoch checkpoint when due). */
static mgpu_result mgpu__fit_end_epoch(mgpu__fit *f, const mgpu_dataset *test, mgpu_train_summary *s) {
    const mgpu_train_opts *o = f->t->opts;
    double test_loss = NAN, test_acc = NAN;
    mgpu_result r;
    int last = f->epoch + 1 == o->epochs;
    if (test && (last || f->stop || (o->eval_frequency > 0 && (f->epoch + 1) % o->eval_frequency == 0))) {
        r = mgpu__fit_evaluate(f, test, &test_loss, &test_acc);
        if (r != MGPU_OK) return r;
    }
    if ((r = mgpu__fit_report_epoch(f, test_loss, test_acc)) != MGPU_OK) return r;
    s->final_train_loss = f->es.samples ? f->es.loss_sum / (double)f->es.samples : NAN;
    s->final_test_loss = test_loss; s->final_test_accuracy = test_acc;
    f->epoch++;
    f->batch = 0;
    memset(&f->es, 0, sizeof f->es);
    if (mgpu__fit_saving(f) && o->checkpoint_every_epochs > 0 && f->epoch % o->checkpoint_every_epochs == 0) {
        f->clock = mgpu_time_s();
        r = mgpu__fit_checkpoint(f, 0);
        memset(&f->es, 0, sizeof f->es); /* its time belongs to no epoch's training */
    }
    return r;
}

static mgpu_result mgpu__fit_run(mgpu__fit *f, const mgpu_dataset *test, mgpu_train_summary *s) {
    mgpu_result r = MGPU_OK;
    /* stopped exactly at an epoch boundary (resumed at --max-steps): nothing left to report */
    while (f->epoch < f->t->opts->epochs && !(f->stop && f->batch == 0)) {
        if ((r = mgpu__fit_epoch(f)) != MGPU_OK || f->signal) break;
        if ((r = mgpu__fit_end_epoch(f, test, s)) != MGPU_OK || f->stop) break;
    }
    s->steps = f->step;
    s->samples_per_s = f->run_time > 0 ? f->run_samples / f->run_time : 0;
    return r;
}

/* mgpu_model_save from any device: a model on a GPU is staged into a host copy (same names,
   dtypes and shapes) with one copy per tensor, so the final model is written whatever the
   safetensors writer accepts. */
static mgpu_result mgpu__model_save_staged(const mgpu_model *model, const char *path) {
    mgpu_context_desc cd;
    mgpu_context *cpu;
    mgpu_model *host;
    mgpu_result r = MGPU_OK;
    int i;
    if (model->ctx->device.type == MGPU_DEVICE_CPU) return mgpu_model_save(model, path);
    memset(&cd, 0, sizeof cd);
    cd.num_threads = 1; cd.arena_bytes = 4096;   /* this context runs no ops */
    if (!(cpu = mgpu_context_create(&cd))) return mgpu_last_result();
    if (!(host = mgpu_model_create(cpu))) r = mgpu_last_result();
    for (i = 0; r == MGPU_OK && i < model->params.count; i++) {
        const mgpu_tensor *t = model->params.items[i].tensor;
        if (!mgpu_model_add_parameter(host, model->params.items[i].name, t->dtype, t->ndim, t->shape)) r = mgpu_last_result();
    }
    for (i = 0; r == MGPU_OK && i < model->buffers.count; i++) {
        const mgpu_tensor *t = model->buffers.items[i].tensor;
        if (!mgpu_model_add_buffer(host, model->buffers.items[i].name, t->dtype, t->ndim, t->shape)) r = mgpu_last_result();
    }
    if (r == MGPU_OK) r = mgpu_model_copy_state(host, model);
    if (r == MGPU_OK) r = mgpu_model_save(host, path);
    mgpu_model_destroy(host);
    mgpu_context_destroy(cpu);
    return r;
}

static mgpu_result mgpu__fit_save(const mgpu_train_opts *o, const mgpu_model *model) {
    char path[MGPU__CKPT_PATH_MAX];
    mgpu_result r;
    if (!o->save_dir || !o->save_dir[0]) return MGPU_OK;
    if ((r = mgpu__mkdirs(o->save_dir)) != MGPU_OK) return r;
    if ((r = mgpu__path_join(path, o->save_dir, "model.safetensors")) != MGPU_OK) return r;
    if ((r = mgpu__model_save_staged(model, path)) == MGPU_OK) printf("saved %s\n", path);
    return r;
}

static mgpu_result mgpu__fit_final_metrics(mgpu__fit *f, const mgpu_train_summary *s) {
    char extra[256];
    snprintf(extra, sizeof extra, "\"step\":%lld,\"test_accuracy\":%.6f,\"test_loss\":%.6f,\"samples_per_s\":%.1f",
             (long long)s->steps, s->final_test_accuracy == s->final_test_accuracy ? s->final_test_accuracy : -1.0,
             s->final_test_loss == s->final_test_loss ? s->final_test_loss : -1.0, s->samples_per_s);
    return mgpu_metrics_write_final(f->metrics, extra);
}

/* The end of a run: the final metrics, a last checkpoint (so --resume auto knows the run is
   over rather than repeating its last steps) and the model; or, stopped by a signal, the word. */
static mgpu_result mgpu__fit_finish(mgpu__fit *f, const mgpu_train_summary *s) {
    char name[40];
    mgpu_result r;
    if (f->signal) {
        mgpu__ckpt_dir_name(name, sizeof name, f->step);
        if (f->t->rank == 0) {
            printf("stopped by %s after step %lld (signal %d); checkpoint saved to %s/%s; to continue, run the same command with --resume auto\n",
                   f->signal == SIGINT ? "Ctrl-C (SIGINT)" : f->signal == SIGTERM ? "SIGTERM" : f->signal == SIGUSR1 ? "SIGUSR1" : "a signal",
                   (long long)f->step, (int)f->signal, f->t->opts->save_dir, name);
            fflush(stdout);
        }
        return MGPU_OK;
    }
    if ((r = mgpu__fit_final_metrics(f, s)) != MGPU_OK) return r;
    if (mgpu__fit_saving(f) && f->saved_step != f->step && (r = mgpu__fit_checkpoint(f, 1)) != MGPU_OK) return r;
    return f->t->rank == 0 ? mgpu__fit_save(f->t->opts, f->model) : MGPU_OK;
}

/* A finished run resumed: what it ended with, from its last epoch record; nothing is written. */
static void mgpu__fit_summary_of_finished(const mgpu__fit *f, mgpu_train_summary *s) {
    mgpu__buf text;
    mgpu_json *records = NULL;
    const mgpu_json *last = NULL, *m;
    s->steps = f->step;
    mgpu__buf_init(&text);
    mgpu__buf_puts(&text, "[");   /* the history is objects joined by commas */
    if (f->history.len) mgpu__buf_append(&text, f->history.data, f->history.len);
    mgpu__buf_puts(&text, "]");
    if (!text.failed && (records = mgpu_json_parse(text.data, text.len, "the checkpoint's metrics")) != NULL)
        for (m = records->child; m; m = m->next) last = m;
    if (last) {
        s->final_train_loss = mgpu__json_number_or_nan(mgpu_json_get(last, "train_loss"));
        s->final_test_loss = mgpu__json_number_or_nan(mgpu_json_get(last, "test_loss"));
        s->final_test_accuracy = mgpu__json_number_or_nan(mgpu_json_get(last, "test_accuracy"));
    }
    mgpu_json_free(records);
    mgpu__buf_free(&text);
    mgpu_clear_error();
}

static mgpu_ddp *mgpu__ddp_from_opts(mgpu_model *model, mgpu_comm *comm, const mgpu_train_opts *o) {
    mgpu_ddp_desc dd;
    memset(&dd, 0, sizeof dd);
    dd.bucket_cap_mb = o->bucket_cap_mb;
    dd.sync_batchnorm = o->sync_batchnorm;
    dd.compress = o->grad_compression == MGPU_GRAD_COMPRESSION_FP16 ? MGPU_F16 : o->grad_compression == MGPU_GRAD_COMPRESSION_BF16 ? MGPU_BF16 : MGPU_F32;
    return mgpu_ddp_create(model, comm, &dd);
}

/* Loader, schedule, optimizer, DDP, scaler and checkpointer from the options. */
static mgpu_result mgpu__fit_setup(mgpu__fit *f, const mgpu_dataset *train) {
    const mgpu_train_opts *o = f->t->opts;
    mgpu_loader_desc ld;
    float lr;
    mgpu_result r;
    memset(&ld, 0, sizeof ld);
    ld.batch_size = o->batch_size; ld.shuffle = 1; ld.seed = o->seed; ld.num_workers = o->num_workers; ld.ctx = f->t->ctx;
    ld.rank = f->t->rank; ld.world_size = f->t->world_size; ld.data_on_device = o->data_on_device;
    if (!(f->loader = mgpu_loader_create(train, &ld))) return mgpu_last_result();
    f->batches_per_epoch = mgpu_loader_num_batches(f->loader);
    lr = mgpu_lr_scale(o->lr, f->t->world_size, o->grad_accum_steps, o->scale_lr);
    f->schedule = mgpu__schedule_from_opts(o, lr, (f->batches_per_epoch + o->grad_accum_steps - 1) / o->grad_accum_steps);
    if (!(f->opt = mgpu__optimizer_from_opts(f->model, o, lr))) return mgpu_last_result();
    if (f->t->comm && !(f->ddp = mgpu__ddp_from_opts(f->model, f->t->comm, o))) return mgpu_last_result();
    mgpu_context_set_autocast(f->t->ctx, f->t->amp);
    mgpu_grad_scaler_init(&f->scaler, f->t->amp == MGPU_AMP_FP16);
    f->saved_time = mgpu_time_s();
    f->saved_step = -1;
    if (o->save_dir && o->save_dir[0] && f->t->rank == 0 && !o->eval_only) {
        mgpu_checkpoint_desc cd;
        memset(&cd, 0, sizeof cd);
        cd.dir = o->save_dir; cd.keep_last = o->keep_last; cd.background = 1;
        if (!(f->ckpt = mgpu_checkpointer_create(&cd))) return mgpu_last_result();
        /* fault the snapshot buffer in on the writer thread now, so the first save stalls no more than later ones */
        if ((r = mgpu__checkpointer_reserve(f->ckpt, f->model, f->opt)) != MGPU_OK) return r;
    }
    return MGPU_OK;
}

/* The startup line on a GPU: which device trains, and what --cuda-graph does (and why not).
   CPU runs print nothing here (their output stays as it was). */
static void mgpu__fit_announce_device(const mgpu__fit *f) {
#ifdef MGPU_CUDA
    const mgpu_context *ctx = f->t->ctx;
    char desc[320];
    if (ctx->device.type != MGPU_DEVICE_CUDA) return;
    mgpu__cuda_device_describe(ctx->device.index, desc, sizeof desc);
    printf("device cuda:%d (%s); cuda graph %s\n", ctx->device.index, desc, f->graph_note);
    fflush(stdout);
#else
    (void)f;
#endif
}

/* The startup line on a GPU saying where the training set lives (--data-on-device), and why
   auto chose streaming. */
static void mgpu__fit_announce_data(const mgpu__fit *f, const mgpu_dataset *train) {
    const char *why = "";
    if (f->t->ctx->device.type == MGPU_DEVICE_CPU) return;
    if (mgpu_loader_data_on_device(f->loader) == 1) {
        printf("data on device: the training set is resident on cuda:%d, batches gathered there\n", f->t->ctx->device.index);
        fflush(stdout);
        return;
    }
    if (f->t->opts->data_on_device == MGPU_DATA_ON_DEVICE_AUTO)
        why = train->static_samples ? " (auto: the set takes more than 1/4 of the free device memory)"
                                    : " (auto: the dataset may augment its samples: static_samples is 0)";
    printf("data on device: no, batches stream from pinned host memory on a copy stream%s\n", why);
    fflush(stdout);
}

/* --------------------------------------------------------------------------------------
   Where the weights come from: a checkpoint (--resume), a file (--init-from), or the model's
   own initialisation; and --eval-only, which trains nothing.
   -------------------------------------------------------------------------------------- */

/* --init-from FILE: weights (and buffers) from a safetensors file with the model's names and
   shapes, PyTorch's state_dict convention; the optimizer stays fresh. Every rank reads the file. */
static mgpu_result mgpu__fit_init_from(mgpu__fit *f) {
    const char *path = f->t->opts->init_from;
    char why[1024];
    if (mgpu_model_load(f->model, path) != MGPU_OK) {
        snprintf(why, sizeof why, "%s", mgpu_last_error());
        return mgpu__fail(MGPU_ERR_FORMAT, "--init-from %s: %s (the file must hold exactly the model's tensors, under the names "
                          "and shapes of its PyTorch state_dict)", path, why);
    }
    if (f->t->rank == 0) {
        printf("initialised from %s (%d tensors); fresh optimizer\n", path, mgpu_model_num_parameters(f->model) + mgpu_model_num_buffers(f->model));
        fflush(stdout);
    }
    return MGPU_OK;
}

/* --resume, then (nothing resumed) --init-from. --eval-only with --resume must find a checkpoint:
   evaluating a fresh model instead would report a meaningless accuracy as the checkpoint's. */
static mgpu_result mgpu__fit_initial_state(mgpu__fit *f) {
    const mgpu_train_opts *o = f->t->opts;
    mgpu_result r;
    if ((r = mgpu__fit_resume(f)) != MGPU_OK) return r;
    if (o->eval_only && o->resume != MGPU_RESUME_NONE && !f->resumed)
        return mgpu__fail(MGPU_ERR_IO, "--eval-only --resume %s: no checkpoint found to evaluate", o->resume == MGPU_RESUME_AUTO ? "auto" : o->resume_path);
    if (!f->resumed && o->init_from && o->init_from[0]) return mgpu__fit_init_from(f);
    return MGPU_OK;
}

/* --eval-only: the test set once; the line printed and a metrics line {"event":"final","eval_only":true,...}. */
static mgpu_result mgpu__fit_eval_only(mgpu__fit *f, const mgpu_dataset *test, mgpu_train_summary *s) {
    char extra[256];
    double loss = NAN, acc = NAN;
    mgpu_result r;
    if (!test) return mgpu__fail(MGPU_ERR_INVALID_ARG, "--eval-only: this program passed no test set to the trainer");
    if ((r = mgpu_evaluate(f->t->ctx, f->model, f->forward, f->user, test, 1000, &loss, &acc)) != MGPU_OK) return r;
    s->final_test_loss = loss; s->final_test_accuracy = acc; s->steps = f->step;
    if (f->t->rank == 0) {
        printf("eval-only: test_loss %.4f  test_acc %.4f  (the model of step %lld)\n", loss, acc, (long long)f->step);
        fflush(stdout);
    }
    snprintf(extra, sizeof extra, "\"eval_only\":true,\"step\":%lld,\"test_accuracy\":%.6f,\"test_loss\":%.6f", (long long)f->step, acc, loss);
    return mgpu_metrics_write_final(f->metrics, extra);
}

/* "Using 4 GPUs: [0, 1, 2, 3] (DDP, 4 processes, global batch 512)", from rank 0, when several
   ranks train on GPUs (DDP or DP; DP with one replica too). A collective (every rank's device is gathered): all ranks call it. */
static mgpu_result mgpu__fit_announce_gpus(const mgpu__fit *f) {
    const mgpu_trainer *t = f->t;
    const mgpu_train_opts *o = t->opts;
    int32_t mine, *all;
    char ids[MGPU_MAX_GPU_IDS * 8];
    size_t at = 0;
    int i, dp = o->multi_gpu == MGPU_MULTI_GPU_DP;
    mgpu_result r;
    if (!t->comm || (t->world_size < 2 && !dp) || t->ctx->device.type != MGPU_DEVICE_CUDA) return MGPU_OK;
    mine = t->ctx->device.index;
    if (!(all = (int32_t *)mgpu__calloc(sizeof *all * (size_t)t->world_size, "the ranks' devices"))) return mgpu_last_result();
    if ((r = mgpu_comm_allgather_bytes(t->comm, &mine, sizeof mine, all)) == MGPU_OK && t->rank == 0) {
        ids[0] = 0;
        for (i = 0; i < t->world_size && at + 16 < sizeof ids; i++) at += (size_t)snprintf(ids + at, sizeof ids - at, i ? ", %d" : "%d", (int)all[i]);
        printf("Using %d GPU%s: [%s] (%s, %d process%s, global batch %lld)\n", t->world_size, t->world_size == 1 ? "" : "s", ids, dp ? "DP" : "DDP", dp ? 1 : t->world_size,
               dp || t->world_size == 1 ? "" : "es", (long long)(o->batch_size * t->world_size * o->grad_accum_steps));
        fflush(stdout);
    }
    mgpu_free(all);
    return r;
}

MGPU_API mgpu_result mgpu_trainer_fit(mgpu_trainer *t, mgpu_model *model, mgpu_forward_fn forward, void *user,
                                      const mgpu_dataset *train, const mgpu_dataset *test, mgpu_train_summary *summary) {
    const mgpu_train_opts *o;
    mgpu__fit f;
    mgpu__signals sig;
    mgpu_train_summary s;
    mgpu_result r, w;
    if (!t || !model || !forward || !train)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_trainer_fit: trainer, model, forward and the training set are required");
    o = t->opts;
    if (o->grad_accum_steps < 1) return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grad-accum-steps must be >= 1");
    memset(&f, 0, sizeof f);
    memset(&s, 0, sizeof s);
    memset(&sig, 0, sizeof sig);
    s.final_train_loss = s.final_test_loss = s.final_test_accuracy = NAN;
    f.t = t; f.model = model; f.forward = forward; f.user = user;
    mgpu__buf_init(&f.history);
    if ((r = mgpu__fit_setup(&f, train)) == MGPU_OK && (r = mgpu_model_zero_grad(model)) == MGPU_OK && (r = mgpu__fit_initial_state(&f)) == MGPU_OK &&
        !(f.metrics = mgpu_metrics_open(t->rank == 0 ? o->metrics : NULL)))
        r = mgpu_last_result();
    if (r == MGPU_OK) r = mgpu__fit_graph_plan(&f);
    if (r == MGPU_OK && t->rank == 0) { mgpu__fit_announce_device(&f); mgpu__fit_announce_data(&f, train); }
    if (r == MGPU_OK) r = mgpu__fit_announce_gpus(&f);   /* a collective: every rank */
    if (r == MGPU_OK && o->eval_only) r = mgpu__fit_eval_only(&f, test, &s);
    else if (r == MGPU_OK && f.finished) mgpu__fit_summary_of_finished(&f, &s);
    else if (r == MGPU_OK) {
        if (o->save_dir && o->save_dir[0]) mgpu__signals_install(&sig, t->rank != 0);   /* every rank: they stop together */
        if ((r = mgpu__fit_run(&f, test, &s)) == MGPU_OK) r = mgpu__fit_finish(&f, &s);
        mgpu__signals_restore(&sig);
    }
    /* a background checkpoint still being written must land (or its failure be told) */
    if (f.ckpt && (w = mgpu_checkpointer_wait(f.ckpt)) != MGPU_OK && r == MGPU_OK) r = w;
    mgpu_checkpointer_destroy(f.ckpt);
    mgpu__fit_graph_free(&f);
    mgpu_ddp_destroy(f.ddp);
    mgpu_context_set_autocast(t->ctx, MGPU_AMP_OFF);
    mgpu__buf_free(&f.history);
    mgpu_metrics_close(f.metrics);
    mgpu_optimizer_destroy(f.opt);
    mgpu_loader_destroy(f.loader);
    s.stop_signal = f.signal;
    if (summary) *summary = s;
    return r;
}

/* One model built by the user's builder, in memory the trainer owns. */
typedef struct mgpu__built { mgpu_model *model; void *user; } mgpu__built;
static mgpu_result mgpu__build(mgpu_context *ctx, mgpu_build_fn build, size_t user_size, mgpu__built *b) {
    b->user = mgpu__calloc(user_size ? user_size : 1, "the model's layer table");
    b->model = b->user ? mgpu_model_create(ctx) : NULL;
    if (!b->model) return mgpu_last_result();
    if (!build(b->model, b->user))
        return mgpu_last_result() ? mgpu_last_result() : mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_trainer_run: the build function failed");
    return MGPU_OK;
}
static void mgpu__unbuild(mgpu__built *b) { mgpu_model_destroy(b->model); mgpu_free(b->user); }

/* DataParallel: each replica is a rank of an in-process communicator with its own context and
   model, trained by the same loop as DDP (rank 0 prints, writes metrics and checkpoints). */
typedef struct mgpu__dp_job {
    const mgpu_trainer *parent;
    mgpu_build_fn build; size_t user_size; mgpu_forward_fn forward;
    const mgpu_dataset *train, *test;
    mgpu_train_summary summary;   /* rank 0's */
} mgpu__dp_job;

static mgpu_result mgpu__dp_train_replica(int rank, mgpu_comm *comm, void *arg) {
    mgpu__dp_job *job = (mgpu__dp_job *)arg;
    mgpu_trainer rt = *job->parent;
    mgpu_context_desc cd;
    mgpu__built b;
    mgpu_result r;
    memset(&cd, 0, sizeof cd);
    memset(&b, 0, sizeof b);
    cd.device = job->parent->ctx->device;
    if (cd.device.type == MGPU_DEVICE_CUDA) cd.device.index = job->parent->opts->gpu_ids[rank];   /* its communicator's device */
    cd.seed = job->parent->opts->seed;
    cd.num_threads = MGPU__MAX(1, mgpu_context_num_threads(job->parent->ctx) / job->parent->dp_replicas);
    rt.rank = rank; rt.world_size = job->parent->dp_replicas; rt.comm = comm; rt.dp_replicas = 0;
    if (!(rt.ctx = mgpu_context_create(&cd))) return mgpu_last_result();
    if ((r = mgpu__build(rt.ctx, job->build, job->user_size, &b)) == MGPU_OK)
        r = mgpu_trainer_fit(&rt, b.model, job->forward, b.user, job->train, job->test, rank == 0 ? &job->summary : NULL);
    mgpu__unbuild(&b);
    mgpu_context_destroy(rt.ctx);
    return r;
}

MGPU_API mgpu_result mgpu_trainer_run(mgpu_trainer *t, mgpu_build_fn build, size_t user_size, mgpu_forward_fn forward,
                                      const mgpu_dataset *train, const mgpu_dataset *test, mgpu_train_summary *summary) {
    mgpu__built b;
    mgpu_result r;
    if (!t || !build || !forward || !train)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_trainer_run: trainer, build, forward and the training set are required");
    /* --multi-gpu dp is an explicit request: one --gpu-ids entry still runs one replica over an
       in-process communicator (on a GPU, NCCL with one device), so a one-GPU machine runs DP's path */
    if (t->dp_replicas > 0) {
        mgpu__dp_job job;
        memset(&job, 0, sizeof job);
        job.parent = t; job.build = build; job.user_size = user_size; job.forward = forward; job.train = train; job.test = test;
        /* on GPUs, one replica per --gpu-ids device, gradients all-reduced over NCCL inside this process */
        r = mgpu_dp_run_devices(t->dp_replicas, t->ctx->device.type == MGPU_DEVICE_CUDA ? t->opts->gpu_ids : NULL, mgpu__dp_train_replica, &job);
        if (summary) *summary = job.summary;
        return r;
    }
    memset(&b, 0, sizeof b);
    if ((r = mgpu__build(t->ctx, build, user_size, &b)) == MGPU_OK) r = mgpu_trainer_fit(t, b.model, forward, b.user, train, test, summary);
    mgpu__unbuild(&b);
    return r;
}

