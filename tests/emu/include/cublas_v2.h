/* mgpu CUDA emulation (tests only): see cublas_api.h */
#ifndef MGPU_EMU_CUBLAS_V2_H
#define MGPU_EMU_CUBLAS_V2_H
#include "cublas_api.h"
#endif
