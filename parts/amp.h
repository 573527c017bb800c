/* mgpu.h part: amp (inlined into mgpu.h before release) */

MGPU_API mgpu_result mgpu_amp_parse(const char *text, mgpu_amp_mode *out) {
    (void)text; (void)out;
    return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_amp_parse: not implemented yet");
}
MGPU_API void mgpu_context_set_autocast(mgpu_context *ctx, mgpu_amp_mode mode) { (void)ctx; (void)mode; }
MGPU_API mgpu_amp_mode mgpu_context_autocast(const mgpu_context *ctx) { (void)ctx; return MGPU_AMP_OFF; }
MGPU_API void mgpu_grad_scaler_init(mgpu_grad_scaler *s, int enabled) { (void)s; (void)enabled; }
MGPU_API mgpu_tensor *mgpu_grad_scaler_scale(mgpu_context *ctx, mgpu_grad_scaler *s, mgpu_tensor *loss) {
    (void)ctx; (void)s; (void)loss;
    MGPU__FAIL_NULL(MGPU_ERR_UNSUPPORTED, "mgpu_grad_scaler_scale: not implemented yet");
}
MGPU_API mgpu_result mgpu_grad_scaler_unscale(mgpu_grad_scaler *s, mgpu_model *m) {
    (void)s; (void)m;
    return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_grad_scaler_unscale: not implemented yet");
}
MGPU_API mgpu_result mgpu_grad_scaler_step(mgpu_grad_scaler *s, mgpu_optimizer *o, mgpu_model *m, int *stepped) {
    (void)s; (void)o; (void)m; (void)stepped;
    return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_grad_scaler_step: not implemented yet");
}
MGPU_API void mgpu_grad_scaler_update(mgpu_grad_scaler *s) { (void)s; }
