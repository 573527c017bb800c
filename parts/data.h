/* mgpu.h part: data (inlined into mgpu.h before release) */
