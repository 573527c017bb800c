/* mgpu CUDA emulation (tests only): __nv_bfloat16 with CUDA's conversions (round to nearest
   even; NaN becomes the canonical 0x7fff). */
#ifndef MGPU_EMU_CUDA_BF16_H
#define MGPU_EMU_CUDA_BF16_H
#include <stdint.h>
#include <string.h>
#include "cuda_fp16.h"

static inline uint16_t mgpu_emu_f32_to_bf16_bits(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}
static inline float mgpu_emu_bf16_bits_to_f32(uint16_t b) {
    uint32_t x = (uint32_t)b << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

MGPU_EMU_HALF_TYPE(__nv_bfloat16, mgpu_emu_f32_to_bf16_bits, mgpu_emu_bf16_bits_to_f32)
typedef struct __nv_bfloat16 nv_bfloat16;

MGPU_EMU_HALF_FUNCS(__nv_bfloat16, __float2bfloat16_rn, __float2bfloat16, __bfloat162float, __bfloat16_as_ushort, __ushort_as_bfloat16,
                    mgpu_emu_f32_to_bf16_bits, mgpu_emu_bf16_bits_to_f32)
#endif
