/* mgpu.h part: ops_norm (inlined into mgpu.h before release) */
