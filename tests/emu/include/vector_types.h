/* mgpu CUDA emulation (tests only, never vendored): the vector types of the CUDA runtime that
   host code and kernels use. C and C++. */
#ifndef MGPU_EMU_VECTOR_TYPES_H
#define MGPU_EMU_VECTOR_TYPES_H

#ifdef __cplusplus
#define MGPU_EMU_ALIGN(n) alignas(n)
#else
#define MGPU_EMU_ALIGN(n) _Alignas(n)
#endif

typedef struct uint3 { unsigned int x, y, z; } uint3;
typedef struct int2 { MGPU_EMU_ALIGN(8) int x; int y; } int2;
typedef struct int4 { MGPU_EMU_ALIGN(16) int x; int y, z, w; } int4;
typedef struct uint2 { MGPU_EMU_ALIGN(8) unsigned int x; unsigned int y; } uint2;
typedef struct uint4 { MGPU_EMU_ALIGN(16) unsigned int x; unsigned int y, z, w; } uint4;
typedef struct float2 { MGPU_EMU_ALIGN(8) float x; float y; } float2;
typedef struct float3 { float x, y, z; } float3;
typedef struct float4 { MGPU_EMU_ALIGN(16) float x; float y, z, w; } float4;
typedef struct double2 { MGPU_EMU_ALIGN(16) double x; double y; } double2;

/* dim3: a launch's grid or block shape; unset components are 1 */
struct dim3 {
    unsigned int x, y, z;
#ifdef __cplusplus
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
#endif
};
typedef struct dim3 dim3;

#ifdef __cplusplus
static inline int2 make_int2(int x, int y) { int2 v; v.x = x; v.y = y; return v; }
static inline int4 make_int4(int x, int y, int z, int w) { int4 v; v.x = x; v.y = y; v.z = z; v.w = w; return v; }
static inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { uint3 v; v.x = x; v.y = y; v.z = z; return v; }
static inline float2 make_float2(float x, float y) { float2 v; v.x = x; v.y = y; return v; }
static inline float3 make_float3(float x, float y, float z) { float3 v; v.x = x; v.y = y; v.z = z; return v; }
static inline float4 make_float4(float x, float y, float z, float w) { float4 v; v.x = x; v.y = y; v.z = z; v.w = w; return v; }
#endif
#endif
