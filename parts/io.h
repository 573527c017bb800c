/* mgpu.h part: io (inlined into mgpu.h before release) */
