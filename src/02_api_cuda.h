/* ======================================================================================
   CUDA host side (only with MGPU_CUDA): device memory, pinned buffers, streams, graphs
   ====================================================================================== */
#ifdef MGPU_CUDA
typedef struct mgpu_memory_stats { int64_t allocated, reserved, peak; } mgpu_memory_stats;
MGPU_API mgpu_result mgpu_memory_stats_get(int device, mgpu_memory_stats *out);
/* Caching allocator: sizes rounded to classes, freed blocks kept for reuse on the same device;
   cudaMalloc only on a miss, cudaFree only in mgpu_cuda_empty_cache. */
MGPU_API void *mgpu_cuda_malloc(int device, size_t bytes);
MGPU_API void mgpu_cuda_free(int device, void *ptr);
MGPU_API mgpu_result mgpu_cuda_empty_cache(int device);
/* Page-locked host memory for async copies. */
MGPU_API void *mgpu_cuda_host_alloc(size_t bytes);
MGPU_API void mgpu_cuda_host_free(void *ptr);
MGPU_API mgpu_result mgpu_cuda_copy_h2d_async(void *dst, const void *src, size_t bytes, void *stream);
MGPU_API mgpu_result mgpu_cuda_copy_d2h_async(void *dst, const void *src, size_t bytes, void *stream);
MGPU_API mgpu_result mgpu_cuda_copy_d2d_async(void *dst, const void *src, size_t bytes, void *stream);
/* Per-device resources of a context: stream (non-blocking), blas (mgpu_cuda_blas_create). */
typedef struct mgpu_cuda_device_ctx { int device; void *stream; void *blas; } mgpu_cuda_device_ctx;
MGPU_API mgpu_result mgpu_cuda_device_ctx_init(mgpu_cuda_device_ctx *d, int device);
MGPU_API void mgpu_cuda_device_ctx_release(mgpu_cuda_device_ctx *d);
/* CUDA Graphs: capture the work queued on `stream` between begin and end, then replay it. */
typedef struct mgpu_cuda_graph { void *graph, *exec; int captured; } mgpu_cuda_graph;
MGPU_API mgpu_result mgpu_cuda_graph_begin(mgpu_cuda_graph *g, void *stream);
MGPU_API mgpu_result mgpu_cuda_graph_end(mgpu_cuda_graph *g, void *stream);
MGPU_API mgpu_result mgpu_cuda_graph_launch(mgpu_cuda_graph *g, void *stream);
MGPU_API void mgpu_cuda_graph_destroy(mgpu_cuda_graph *g);


#endif /* MGPU_CUDA */

