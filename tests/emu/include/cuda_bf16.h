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

#ifdef __cplusplus
struct __nv_bfloat16 {
    uint16_t __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(mgpu_emu_f32_to_bf16_bits(f)) {}
    __nv_bfloat16(double f) : __x(mgpu_emu_f32_to_bf16_bits((float)f)) {}
    operator float() const { return mgpu_emu_bf16_bits_to_f32(__x); }
};
#else
typedef struct __nv_bfloat16 { uint16_t __x; } __nv_bfloat16;
#endif
typedef struct __nv_bfloat16 nv_bfloat16;

static inline __nv_bfloat16 __float2bfloat16_rn(float f) { __nv_bfloat16 b; b.__x = mgpu_emu_f32_to_bf16_bits(f); return b; }
static inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
static inline float __bfloat162float(__nv_bfloat16 b) { return mgpu_emu_bf16_bits_to_f32(b.__x); }
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 b; b.__x = u; return b; }
#endif
