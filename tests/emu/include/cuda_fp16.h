/* mgpu CUDA emulation (tests only): __half with CUDA's conversions (round to nearest even;
   NaN becomes the canonical 0x7fff, as __float2half_rn does on the device). */
#ifndef MGPU_EMU_CUDA_FP16_H
#define MGPU_EMU_CUDA_FP16_H
#include <stdint.h>
#include <string.h>
#include <math.h>

static inline uint16_t mgpu_emu_f32_to_f16_bits(float f) {
    uint32_t x, sign, ax;
    memcpy(&x, &f, 4);
    sign = (x >> 16) & 0x8000u;
    ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fffu;
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);          /* rounds to >= 65520: inf */
    if (ax < 0x38800000u) {                                             /* below 2^-14: the subnormal grid 2^-24 */
        float a;
        memcpy(&a, &ax, 4);
        return (uint16_t)(sign | (uint32_t)rintf(a * 16777216.0f));      /* exact scaling, then RNE */
    }
    {
        uint32_t h = ((((ax >> 23) - 112u) << 10) | ((ax >> 13) & 0x3ffu)), rest = ax & 0x1fffu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;      /* a carry moves into the exponent */
        return (uint16_t)(sign | h);
    }
}
static inline float mgpu_emu_f16_bits_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, x;
    float f;
    if (e == 0) { f = (float)m * (1.0f / 16777216.0f); return sign ? -f : f; }
    x = e == 31 ? (sign | 0x7f800000u | (m << 13)) : (sign | ((e + 112u) << 23) | (m << 13));
    memcpy(&f, &x, 4);
    return f;
}

/* A 16-bit float type: its bits, with host conversions from and to float in C++ (also used by
   cuda_bf16.h). */
#ifdef __cplusplus
#define MGPU_EMU_HALF_TYPE(T, to_bits, from_bits) \
    struct T { \
        uint16_t __x; \
        T() = default; \
        T(float f) : __x(to_bits(f)) {} \
        T(double f) : __x(to_bits((float)f)) {} \
        operator float() const { return from_bits(__x); } \
    };
#else
#define MGPU_EMU_HALF_TYPE(T, to_bits, from_bits) typedef struct T { uint16_t __x; } T;
#endif
/* CUDA's conversion functions of such a type */
#define MGPU_EMU_HALF_FUNCS(T, from_float_rn, from_float, to_float, as_ushort, from_ushort, to_bits, from_bits) \
    static inline T from_float_rn(float f) { T h; h.__x = to_bits(f); return h; } \
    static inline T from_float(float f) { return from_float_rn(f); } \
    static inline float to_float(T h) { return from_bits(h.__x); } \
    static inline unsigned short as_ushort(T h) { return h.__x; } \
    static inline T from_ushort(unsigned short u) { T h; h.__x = u; return h; }
MGPU_EMU_HALF_TYPE(__half, mgpu_emu_f32_to_f16_bits, mgpu_emu_f16_bits_to_f32)
typedef struct __half half;
MGPU_EMU_HALF_FUNCS(__half, __float2half_rn, __float2half, __half2float, __half_as_ushort, __ushort_as_half, mgpu_emu_f32_to_f16_bits,
                    mgpu_emu_f16_bits_to_f32)
#ifdef __cplusplus
static inline __half __hadd(__half a, __half b) { return __float2half_rn(__half2float(a) + __half2float(b)); }
static inline __half __hmul(__half a, __half b) { return __float2half_rn(__half2float(a) * __half2float(b)); }
static inline bool __hisnan(__half a) { return (a.__x & 0x7fffu) > 0x7c00u; }
#endif
#endif
