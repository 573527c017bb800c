// mgpu_kernels.cu - every CUDA kernel of mgpu, with extern "C" launchers declared in mgpu.h.
// Compile with nvcc; never calls exit; maps cudaError_t to mgpu_result. MIT license (see mgpu.h).
#include "mgpu.h"
#include <cuda_runtime.h>

extern "C" int mgpu__cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
    return n;
}
