/* mgpu CUDA emulation (tests only): cuda_runtime.h is the runtime API (the kernel language comes
   from tests/emu/cuda_emu.h, force-included when a .cu file is compiled as C++). */
#ifndef MGPU_EMU_CUDA_RUNTIME_H
#define MGPU_EMU_CUDA_RUNTIME_H
#include "cuda_runtime_api.h"
#endif
