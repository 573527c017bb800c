/* mgpu.h part: ops_nn (inlined into mgpu.h before release) */
