/* mgpu.h part: comm (inlined into mgpu.h before release) */
/* Stubs: replaced by the real implementation shortly. */
struct mgpu_comm { int rank, world_size, local_rank; mgpu_comm_backend backend; };
struct mgpu_comm_work { mgpu_result result; };
MGPU_API mgpu_result mgpu_dist_env_read(mgpu_dist_env *out) { (void)out; return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_dist_env_read: not implemented yet"); }
MGPU_API mgpu_comm *mgpu_comm_create(const mgpu_comm_desc *desc) { (void)desc; MGPU__FAIL_NULL(MGPU_ERR_UNSUPPORTED, "mgpu_comm_create: not implemented yet"); }
MGPU_API mgpu_result mgpu_comm_create_threads(int n, double timeout_s, mgpu_comm **comms) { (void)n; (void)timeout_s; (void)comms; return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_comm_create_threads: not implemented yet"); }
MGPU_API void mgpu_comm_destroy(mgpu_comm *c) { (void)c; }
MGPU_API int mgpu_comm_rank(const mgpu_comm *c) { return c ? c->rank : -1; }
MGPU_API int mgpu_comm_world_size(const mgpu_comm *c) { return c ? c->world_size : 0; }
MGPU_API int mgpu_comm_local_rank(const mgpu_comm *c) { return c ? c->local_rank : -1; }
MGPU_API mgpu_comm_backend mgpu_comm_backend_of(const mgpu_comm *c) { return c ? c->backend : MGPU_COMM_SHM; }
MGPU_API mgpu_result mgpu_comm_allreduce(mgpu_comm *c, mgpu_tensor *t, mgpu_reduce_op op) { (void)c; (void)t; (void)op; return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_comm_allreduce: not implemented yet"); }
MGPU_API mgpu_result mgpu_comm_broadcast(mgpu_comm *c, mgpu_tensor *t, int root) { (void)c; (void)t; (void)root; return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_comm_broadcast: not implemented yet"); }
MGPU_API mgpu_result mgpu_comm_allgather(mgpu_comm *c, const mgpu_tensor *in, mgpu_tensor *out) { (void)c; (void)in; (void)out; return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_comm_allgather: not implemented yet"); }
MGPU_API mgpu_result mgpu_comm_reduce_scatter(mgpu_comm *c, const mgpu_tensor *in, mgpu_tensor *out, mgpu_reduce_op op) { (void)c; (void)in; (void)out; (void)op; return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_comm_reduce_scatter: not implemented yet"); }
MGPU_API mgpu_result mgpu_comm_barrier(mgpu_comm *c) { (void)c; return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_comm_barrier: not implemented yet"); }
MGPU_API mgpu_result mgpu_comm_allreduce_f32(mgpu_comm *c, float *data, int64_t n, mgpu_reduce_op op) { (void)c; (void)data; (void)n; (void)op; return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_comm_allreduce_f32: not implemented yet"); }
MGPU_API mgpu_result mgpu_comm_allreduce_f64(mgpu_comm *c, double *data, int64_t n, mgpu_reduce_op op) { (void)c; (void)data; (void)n; (void)op; return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_comm_allreduce_f64: not implemented yet"); }
MGPU_API mgpu_result mgpu_comm_allgather_bytes(mgpu_comm *c, const void *in, size_t bytes, void *out) { (void)c; (void)in; (void)bytes; (void)out; return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_comm_allgather_bytes: not implemented yet"); }
MGPU_API mgpu_comm_work *mgpu_comm_allreduce_f32_async(mgpu_comm *c, float *data, int64_t n, mgpu_reduce_op op) { (void)c; (void)data; (void)n; (void)op; MGPU__FAIL_NULL(MGPU_ERR_UNSUPPORTED, "mgpu_comm_allreduce_f32_async: not implemented yet"); }
MGPU_API int mgpu_comm_work_done(const mgpu_comm_work *w) { (void)w; return 1; }
MGPU_API mgpu_result mgpu_comm_wait(mgpu_comm_work *w) { (void)w; return mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_comm_wait: not implemented yet"); }
