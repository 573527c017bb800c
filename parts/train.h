/* mgpu.h part: train (inlined into mgpu.h before release) -- the training loop shared by the examples */

struct mgpu_trainer {
    const mgpu_train_opts *opts;
    mgpu_context *ctx;
};

/* Options whose machinery is not in this version yet are refused by name rather than ignored. */
static mgpu_result mgpu__trainer_check_supported(const mgpu_train_opts *o) {
    if (o->amp && strcmp(o->amp, "off") != 0)
        return mgpu__fail(MGPU_ERR_UNSUPPORTED, "--amp %s: mixed precision is not implemented in this version yet; use --amp off", o->amp);
    if (o->multi_gpu && strcmp(o->multi_gpu, "none") != 0)
        return mgpu__fail(MGPU_ERR_UNSUPPORTED, "--multi-gpu %s: DDP/DP are not implemented in this version yet; use --multi-gpu none", o->multi_gpu);
    if (getenv("WORLD_SIZE") && atoi(getenv("WORLD_SIZE")) > 1)
        return mgpu__fail(MGPU_ERR_UNSUPPORTED, "WORLD_SIZE=%s: distributed training is not implemented in this version yet", getenv("WORLD_SIZE"));
    if (o->resume && strcmp(o->resume, "none") != 0)
        return mgpu__fail(MGPU_ERR_UNSUPPORTED, "--resume %s: training checkpoints are not implemented in this version yet", o->resume);
    if (o->checkpoint_every_epochs || o->checkpoint_every_steps || o->checkpoint_interval_min > 0)
        return mgpu__fail(MGPU_ERR_UNSUPPORTED, "--checkpoint-*: training checkpoints are not implemented in this version yet (--save-dir still saves the final model)");
    if (o->gpu_ids && o->gpu_ids[0])
        return mgpu__fail(MGPU_ERR_UNSUPPORTED, "--gpu-ids %s: multi-device training is not implemented in this version yet", o->gpu_ids);
    return MGPU_OK;
}

MGPU_API mgpu_trainer *mgpu_trainer_create(const mgpu_train_opts *opts) {
    mgpu_trainer *t;
    mgpu_context_desc cd;
    if (!opts) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_trainer_create: opts is NULL");
    if (mgpu__trainer_check_supported(opts) != MGPU_OK) return NULL;
    memset(&cd, 0, sizeof cd);
    if (mgpu_device_parse(opts->device ? opts->device : "auto", &cd.device) != MGPU_OK) return NULL;
    cd.seed = opts->seed;
    t = (mgpu_trainer *)mgpu__calloc(sizeof *t, "the trainer");
    if (!t) return NULL;
    t->opts = opts;
    t->ctx = mgpu_context_create(&cd);
    if (!t->ctx) { mgpu_free(t); return NULL; }
    return t;
}
MGPU_API mgpu_context *mgpu_trainer_context(const mgpu_trainer *t) { return t ? t->ctx : NULL; }
MGPU_API void mgpu_trainer_destroy(mgpu_trainer *t) {
    if (!t) return;
    mgpu_context_destroy(t->ctx);
    mgpu_free(t);
}

/* mkdir -p */
static mgpu_result mgpu__mkdirs(const char *path) {
    char buf[4096];
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

MGPU_API mgpu_result mgpu_evaluate(mgpu_context *ctx, mgpu_model *model, mgpu_forward_fn forward, void *user,
                                   const mgpu_dataset *ds, int64_t batch_size, double *loss, double *accuracy) {
    mgpu_loader_desc ld;
    mgpu_loader *loader;
    mgpu_batch b;
    mgpu_result r;
    double loss_sum = 0;
    int64_t correct = 0, seen = 0;
    int was_training, grad_was_on;
    if (!ctx || !model || !forward || !ds || batch_size < 1)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_evaluate: ctx, model, forward and dataset are required and batch_size must be >= 1");
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
        loss_sum += mgpu_tensor_item(l) * (double)b.size;
        correct += mgpu_count_correct(logits, b.y);
        seen += b.size;
        mgpu_context_end_step(ctx);
    }
    mgpu_context_end_step(ctx);
    mgpu_model_train(model, was_training);
    mgpu_set_grad_enabled(ctx, grad_was_on);
    mgpu_loader_destroy(loader);
    if (r != MGPU_OK) return r;
    if (loss) *loss = seen ? loss_sum / (double)seen : NAN;
    if (accuracy) *accuracy = seen ? (double)correct / (double)seen : NAN;
    return MGPU_OK;
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

/* State of one fit() call, so the loop body stays small. */
typedef struct mgpu__fit {
    mgpu_trainer *t;
    mgpu_model *model; mgpu_forward_fn forward; void *user;
    mgpu_loader *loader; mgpu_optimizer *opt; mgpu_metrics *metrics;
    mgpu_lr_schedule schedule;
    int64_t step, micro, batches_per_epoch;
    double run_time, run_samples;
    int stop;
} mgpu__fit;

/* One micro-batch: forward, loss, backward (accumulating); an optimizer step every
   grad_accum_steps micro-batches and at the end of the epoch. */
static mgpu_result mgpu__fit_batch(mgpu__fit *f, const mgpu_batch *b, double *loss_out) {
    const mgpu_train_opts *o = f->t->opts;
    mgpu_context *ctx = f->t->ctx;
    mgpu_tensor *loss = mgpu_op_cross_entropy(ctx, f->forward(ctx, b->x, f->user), b->y);
    mgpu_tensor *scaled = o->grad_accum_steps > 1 ? mgpu_op_scale(ctx, loss, 1.0f / (float)o->grad_accum_steps) : loss;
    mgpu_result r;
    if (!scaled) return mgpu_last_result() ? mgpu_last_result() : MGPU_ERR_STATE;
    *loss_out = mgpu_tensor_item(loss);
    if ((r = mgpu_backward(ctx, scaled)) != MGPU_OK) return r;
    f->micro++;
    if (f->micro == o->grad_accum_steps || b->index + 1 == f->batches_per_epoch) {
        if (o->clip_grad_norm > 0 && (r = mgpu_clip_grad_norm(f->model, o->clip_grad_norm, NULL)) != MGPU_OK) return r;
        mgpu_optimizer_set_lr(f->opt, mgpu_lr_at(&f->schedule, f->step));
        if ((r = mgpu_optimizer_step(f->opt)) != MGPU_OK) return r;
        if ((r = mgpu_optimizer_zero_grad(f->opt)) != MGPU_OK) return r;
        f->step++;
        f->micro = 0;
        if (o->max_steps > 0 && f->step >= o->max_steps) f->stop = 1;
    }
    mgpu_context_end_step(ctx);
    return MGPU_OK;
}

static mgpu_result mgpu__fit_epoch(mgpu__fit *f, int64_t epoch, double *train_loss, double *seconds, int64_t *samples) {
    const mgpu_train_opts *o = f->t->opts;
    char label[64];
    mgpu_progress *bar;
    mgpu_batch b;
    mgpu_result r;
    double t0 = mgpu_time_s(), loss_sum = 0, loss = 0;
    int64_t seen = 0;
    mgpu_model_train(f->model, 1);
    if ((r = mgpu_loader_set_epoch(f->loader, epoch, 0)) != MGPU_OK) return r;
    snprintf(label, sizeof label, "epoch %lld/%d", (long long)epoch + 1, o->epochs);
    bar = mgpu_progress_begin(label, f->batches_per_epoch, o->log_every);
    while (!f->stop && (r = mgpu_loader_next(f->loader, &b)) == MGPU_OK && b.size > 0) {
        if ((r = mgpu__fit_batch(f, &b, &loss)) != MGPU_OK) break;
        loss_sum += loss * (double)b.size;
        seen += b.size;
        mgpu_progress_update(bar, b.index + 1, loss);
    }
    mgpu_progress_end(bar);
    if (r != MGPU_OK) return r;
    *seconds = mgpu_time_s() - t0;
    *samples = seen;
    *train_loss = seen ? loss_sum / (double)seen : NAN;
    return MGPU_OK;
}

static mgpu_result mgpu__fit_report_epoch(mgpu__fit *f, int64_t epoch, double train_loss, double test_loss, double test_acc,
                                          double seconds, int64_t samples) {
    const mgpu_train_opts *o = f->t->opts;
    mgpu_epoch_record rec;
    memset(&rec, 0, sizeof rec);
    rec.epoch = epoch + 1; rec.step = f->step;
    rec.train_loss = train_loss; rec.test_loss = test_loss; rec.test_accuracy = test_acc;
    rec.lr = mgpu_optimizer_lr(f->opt);
    rec.epoch_time_s = seconds;
    rec.samples_per_s = seconds > 0 ? (double)samples / seconds : 0;
    rec.world_size = 1; rec.global_batch = o->batch_size * o->grad_accum_steps;
    rec.amp = o->amp ? o->amp : "off";
    printf("epoch %lld/%d  train_loss %.4f  test_loss %.4f  test_acc %.4f  lr %.3g  %.2f s  %.0f samples/s\n",
           (long long)rec.epoch, o->epochs, train_loss, test_loss, test_acc, rec.lr, seconds, rec.samples_per_s);
    fflush(stdout);
    return mgpu_metrics_write_epoch(f->metrics, &rec);
}

static mgpu_result mgpu__fit_run(mgpu__fit *f, const mgpu_dataset *test, mgpu_train_summary *s) {
    const mgpu_train_opts *o = f->t->opts;
    mgpu_result r = MGPU_OK;
    int64_t epoch;
    for (epoch = 0; epoch < o->epochs && !f->stop; epoch++) {
        double train_loss = NAN, test_loss = NAN, test_acc = NAN, seconds = 0;
        int64_t samples = 0;
        int last = epoch + 1 == o->epochs;
        if ((r = mgpu__fit_epoch(f, epoch, &train_loss, &seconds, &samples)) != MGPU_OK) return r;
        f->run_time += seconds; f->run_samples += (double)samples;
        if (test && (last || f->stop || (o->eval_frequency > 0 && (epoch + 1) % o->eval_frequency == 0))) {
            r = mgpu_evaluate(f->t->ctx, f->model, f->forward, f->user, test, 1000, &test_loss, &test_acc);
            if (r != MGPU_OK) return r;
        }
        if ((r = mgpu__fit_report_epoch(f, epoch, train_loss, test_loss, test_acc, seconds, samples)) != MGPU_OK) return r;
        s->final_train_loss = train_loss; s->final_test_loss = test_loss; s->final_test_accuracy = test_acc;
    }
    s->steps = f->step;
    s->samples_per_s = f->run_time > 0 ? f->run_samples / f->run_time : 0;
    return r;
}

static mgpu_result mgpu__fit_save(const mgpu_train_opts *o, const mgpu_model *model) {
    char path[4096];
    mgpu_result r;
    if (!o->save_dir || !o->save_dir[0]) return MGPU_OK;
    if ((r = mgpu__mkdirs(o->save_dir)) != MGPU_OK) return r;
    if (snprintf(path, sizeof path, "%s/model.safetensors", o->save_dir) >= (int)sizeof path)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "--save-dir '%s' is too long", o->save_dir);
    if ((r = mgpu_model_save(model, path)) == MGPU_OK) printf("saved %s\n", path);
    return r;
}

static mgpu_result mgpu__fit_final_metrics(mgpu__fit *f, const mgpu_train_summary *s) {
    char extra[256];
    snprintf(extra, sizeof extra, "\"step\":%lld,\"test_accuracy\":%.6f,\"test_loss\":%.6f,\"samples_per_s\":%.1f",
             (long long)s->steps, s->final_test_accuracy == s->final_test_accuracy ? s->final_test_accuracy : -1.0,
             s->final_test_loss == s->final_test_loss ? s->final_test_loss : -1.0, s->samples_per_s);
    return mgpu_metrics_write_final(f->metrics, extra);
}

MGPU_API mgpu_result mgpu_trainer_fit(mgpu_trainer *t, mgpu_model *model, mgpu_forward_fn forward, void *user,
                                      const mgpu_dataset *train, const mgpu_dataset *test, mgpu_train_summary *summary) {
    const mgpu_train_opts *o;
    mgpu__fit f;
    mgpu_loader_desc ld;
    mgpu_train_summary s;
    mgpu_result r;
    float lr;
    if (!t || !model || !forward || !train)
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_trainer_fit: trainer, model, forward and the training set are required");
    o = t->opts;
    if (o->grad_accum_steps < 1) return mgpu__fail(MGPU_ERR_INVALID_ARG, "--grad-accum-steps must be >= 1");
    memset(&f, 0, sizeof f);
    memset(&s, 0, sizeof s);
    f.t = t; f.model = model; f.forward = forward; f.user = user;
    memset(&ld, 0, sizeof ld);
    ld.batch_size = o->batch_size; ld.shuffle = 1; ld.seed = o->seed; ld.num_workers = o->num_workers; ld.ctx = t->ctx;
    if (!(f.loader = mgpu_loader_create(train, &ld))) return mgpu_last_result();
    f.batches_per_epoch = mgpu_loader_num_batches(f.loader);
    lr = mgpu_lr_scale(o->lr, 1, o->grad_accum_steps, o->scale_lr);
    f.schedule = mgpu__schedule_from_opts(o, lr, (f.batches_per_epoch + o->grad_accum_steps - 1) / o->grad_accum_steps);
    f.opt = mgpu__optimizer_from_opts(model, o, lr);
    f.metrics = mgpu_metrics_open(o->metrics);
    if (!f.opt || !f.metrics) r = mgpu_last_result();
    else if ((r = mgpu_model_zero_grad(model)) == MGPU_OK && (r = mgpu__fit_run(&f, test, &s)) == MGPU_OK &&
             (r = mgpu__fit_final_metrics(&f, &s)) == MGPU_OK)
        r = mgpu__fit_save(o, model);
    mgpu_metrics_close(f.metrics);
    mgpu_optimizer_destroy(f.opt);
    mgpu_loader_destroy(f.loader);
    if (summary) *summary = s;
    return r;
}
