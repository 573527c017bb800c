/* mgpu.h part: ddp (inlined into mgpu.h before release) */
/* --------------------------------------------------------------------------------------
   DistributedDataParallel and DataParallel (stubs until the implementation lands)
   -------------------------------------------------------------------------------------- */

MGPU_API mgpu_ddp *mgpu_ddp_create(mgpu_model *m, mgpu_comm *c, const mgpu_ddp_desc *desc) {
    (void)m; (void)c; (void)desc;
    MGPU__FAIL_NULL(MGPU_ERR_UNSUPPORTED, "mgpu_ddp_create: not implemented yet");
}
MGPU_API void mgpu_ddp_destroy(mgpu_ddp *d) { (void)d; }
MGPU_API void mgpu_ddp_set_sync(mgpu_ddp *d, int sync) { (void)d; (void)sync; }
MGPU_API void mgpu_ddp_get_stats(const mgpu_ddp *d, mgpu_ddp_stats *out) {
    (void)d;
    if (out) memset(out, 0, sizeof *out);
}
