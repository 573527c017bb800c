/* ======================================================================================
   Mixed precision: the loss scaler
   ====================================================================================== */

/* --------------------------------------------------------------------------------------
   Loss scaler (torch.cuda.amp.GradScaler)
   -------------------------------------------------------------------------------------- */

MGPU_API void mgpu_grad_scaler_init(mgpu_grad_scaler *s, int enabled) {
    if (!s) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_init: scaler is NULL"); return; }
    memset(s, 0, sizeof *s);
    s->enabled = enabled != 0;
    s->scale = s->enabled ? 65536.0f : 1.0f;
    s->growth_factor = 2.0f;
    s->backoff_factor = 0.5f;
    s->growth_interval = 2000;
}

MGPU_API mgpu_tensor *mgpu_grad_scaler_scale(mgpu_context *ctx, mgpu_grad_scaler *s, mgpu_tensor *loss) {
    if (!s) MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_scale: scaler is NULL");
    if (!mgpu__check_input(ctx, "mgpu_grad_scaler_scale", "loss", loss, 1)) return NULL;
    return s->enabled ? mgpu_op_scale(ctx, loss, s->scale) : loss;
}

/* g *= inv over a range, raising found when an element is inf or NaN (checked before scaling, as PyTorch) */
static void mgpu__unscale_range(void *arg, int64_t begin, int64_t end) {
    const mgpu__list_job *j = (const mgpu__list_job *)arg;
    const mgpu__unscale_args *a = (const mgpu__unscale_args *)j->args;
    float *g = a->grads.data[j->t];
    const float inv = a->inv_scale;
    int64_t i;
    int bad = 0;
    for (i = begin; i < end; i++) {
        if (!isfinite(g[i])) bad = 1;
        g[i] *= inv;
    }
    /* a flag only ever set to 1, so the order the chunks finish in cannot change the outcome */
    if (bad) __atomic_store_n(a->found, 1, __ATOMIC_RELAXED);
}
static void mgpu__cpu_unscale(const mgpu__unscale_args *a) {
    a->found[0] = 0;
    mgpu__cpu_for_each_tensor(a->ctx, &a->grads, MGPU__AMP_PAR_MIN, mgpu__unscale_range, a);
}

/* Checks that every parameter gradient of m is an F32 tensor on the model's device. */
static mgpu_result mgpu__scaler_check_grads(const char *fn, mgpu_model *m) {
    int i, n = mgpu_model_num_parameters(m);
    for (i = 0; i < n; i++) {
        const char *name = NULL;
        mgpu_tensor *p = mgpu_model_parameter(m, i, &name);
        if (!p || !p->grad) continue;
        if (p->grad->dtype != MGPU_F32 || p->grad->numel != p->numel)
            return mgpu__fail(MGPU_ERR_SHAPE, "%s: the grad of parameter '%s' is %s %s, expected F32 %s", fn, name ? name : "?",
                              mgpu_dtype_name(p->grad->dtype), mgpu__shape_str(p->grad), mgpu__shape_str(p));
        if (!mgpu__same_device(p->grad->device, m->ctx->device))
            return mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: the grad of parameter '%s' is on another device than the model's context", fn, name ? name : "?");
    }
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_grad_scaler_unscale(mgpu_grad_scaler *s, mgpu_model *m) {
    mgpu__unscale_args a;
    mgpu_tensor *found;
    mgpu_result r;
    if (!s || !m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_unscale: scaler and model must not be NULL");
    if (s->unscaled)
        return mgpu__fail(MGPU_ERR_STATE, "mgpu_grad_scaler_unscale: already called since the last mgpu_grad_scaler_update (the grads would be divided twice)");
    if (!s->enabled) { s->unscaled = 1; return MGPU_OK; }
    if (!(s->scale > 0.0f) || !isfinite(s->scale))
        return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_unscale: scale %g must be positive and finite", (double)s->scale);
    if ((r = mgpu__scaler_check_grads("mgpu_grad_scaler_unscale", m)) != MGPU_OK) return r;
    /* The flag is computed on the device (the unscale twin checks and scales in one pass) and read
       back with ONE 4-byte copy per optimizer step, here, as PyTorch's GradScaler reads found_inf
       in scaler.step: the skip decision and the scale update are host logic, and the twins have no
       device-side skip. Only fp16 pays it; bf16 and fp32 have no scaler. */
    found = mgpu__new_activation(m->ctx, MGPU_I32, 0, NULL);
    if (!found) return mgpu_last_result();
    if ((r = mgpu__grad_list_make(m, &a.grads)) != MGPU_OK) return r;
    a.ctx = m->ctx; a.found = (int32_t *)found->data;
    a.inv_scale = (float)(1.0 / (double)s->scale);   /* as PyTorch: reciprocal in double, applied as f32 */
    r = MGPU__TWIN(m->ctx, unscale, &a);
    mgpu__grad_list_free(&a.grads);
    if (r != MGPU_OK) return r;
    s->found_inf = mgpu_tensor_item(found) != 0.0;
    s->unscaled = 1;
    return MGPU_OK;
}

MGPU_API mgpu_result mgpu_grad_scaler_step(mgpu_grad_scaler *s, mgpu_optimizer *o, mgpu_model *m, int *stepped) {
    mgpu_result r;
    if (stepped) *stepped = 0;
    if (!s || !o || !m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_step: scaler, optimizer and model must not be NULL");
    if (o->model != m) return mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_step: the optimizer was created for another model");
    if (!s->unscaled && (r = mgpu_grad_scaler_unscale(s, m)) != MGPU_OK) return r;
    if (s->enabled && s->found_inf) return MGPU_OK;   /* skipped: parameters and step count untouched */
    if ((r = mgpu_optimizer_step(o)) != MGPU_OK) return r;
    if (stepped) *stepped = 1;
    return MGPU_OK;
}

MGPU_API void mgpu_grad_scaler_update(mgpu_grad_scaler *s) {
    if (!s) { mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_grad_scaler_update: scaler is NULL"); return; }
    /* without an inf check since the last update there is nothing to learn from: keep the scale */
    if (s->enabled && s->unscaled) {
        if (s->found_inf) {
            s->scale *= s->backoff_factor;
            s->growth_tracker = 0;
        } else if (++s->growth_tracker >= s->growth_interval) {
            float grown = s->scale * s->growth_factor;
            if (isfinite(grown)) s->scale = grown;   /* as PyTorch: never grow into inf */
            s->growth_tracker = 0;
        }
    }
    s->found_inf = 0;
    s->unscaled = 0;
}
