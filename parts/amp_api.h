/* ======================================================================================
   Mixed precision: autocast and the loss scaler
   ====================================================================================== */

typedef enum mgpu_amp_mode { MGPU_AMP_OFF = 0, MGPU_AMP_FP16 = 1, MGPU_AMP_BF16 = 2 } mgpu_amp_mode;
MGPU_API mgpu_result mgpu_amp_parse(const char *text, mgpu_amp_mode *out);   /* off|fp16|bf16 */
/* Autocast for the ops of this context: matmul, linear, conv2d and attention take their inputs in
   half precision and produce half-precision outputs (accumulating in f32), gradients flowing back
   through them are rounded likewise; reductions, norms, softmax and losses stay f32; parameters
   stay f32 (master weights). On the CPU half values are emulated by rounding f32 storage. */
MGPU_API void mgpu_context_set_autocast(mgpu_context *ctx, mgpu_amp_mode mode);
MGPU_API mgpu_amp_mode mgpu_context_autocast(const mgpu_context *ctx);

/* torch.cuda.amp.GradScaler semantics: scale 65536, x2 after 2000 steps without inf/NaN, x0.5 and
   the optimizer step skipped on inf/NaN. Disabled (scale 1, never skips) for off and bf16. */
typedef struct mgpu_grad_scaler {
    int enabled;
    float scale, growth_factor, backoff_factor;
    int64_t growth_interval, growth_tracker;
    int found_inf, unscaled;
} mgpu_grad_scaler;
MGPU_API void mgpu_grad_scaler_init(mgpu_grad_scaler *s, int enabled);
/* loss * scale (a differentiable op), or loss itself when disabled */
MGPU_API mgpu_tensor *mgpu_grad_scaler_scale(mgpu_context *ctx, mgpu_grad_scaler *s, mgpu_tensor *loss);
/* Divide every gradient by the scale and record whether any is inf/NaN (call before clipping). */
MGPU_API mgpu_result mgpu_grad_scaler_unscale(mgpu_grad_scaler *s, mgpu_model *m);
/* Optimizer step unless inf/NaN was found (unscales first if not yet done); *stepped tells which. */
MGPU_API mgpu_result mgpu_grad_scaler_step(mgpu_grad_scaler *s, mgpu_optimizer *o, mgpu_model *m, int *stepped);
/* Grow or back off the scale; clears the per-step flags. */
MGPU_API void mgpu_grad_scaler_update(mgpu_grad_scaler *s);
