/* mgpu.h part: checkpoint (inlined into mgpu.h before release) */

MGPU_API mgpu_checkpointer *mgpu_checkpointer_create(const mgpu_checkpoint_desc *desc) {
    (void)desc;
    MGPU__FAIL_NULL(MGPU_ERR_UNSUPPORTED, "mgpu_checkpointer_create: not implemented yet");
}
MGPU_API mgpu_result mgpu_checkpointer_save(mgpu_checkpointer *c, int64_t step, const mgpu_model *m,
                                            const mgpu_optimizer *o, const char *trainer_state_json) {
    (void)c; (void)step; (void)m; (void)o; (void)trainer_state_json;
    return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_checkpointer_save: not implemented yet");
}
MGPU_API mgpu_result mgpu_checkpointer_wait(mgpu_checkpointer *c) {
    (void)c;
    return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_checkpointer_wait: not implemented yet");
}
MGPU_API void mgpu_checkpointer_destroy(mgpu_checkpointer *c) { (void)c; }
MGPU_API mgpu_result mgpu_checkpoint_find(const char *dir, char *path, size_t size) {
    (void)dir; (void)path; (void)size;
    return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_checkpoint_find: not implemented yet");
}
MGPU_API mgpu_result mgpu_checkpoint_load(const char *path, mgpu_model *m, mgpu_optimizer *o, mgpu_json **trainer_state) {
    (void)path; (void)m; (void)o; (void)trainer_state;
    return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_checkpoint_load: not implemented yet");
}
MGPU_API mgpu_result mgpu_checkpoint_verify(const char *path) {
    (void)path;
    return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_checkpoint_verify: not implemented yet");
}
