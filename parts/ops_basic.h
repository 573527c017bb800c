/* mgpu.h part: ops_basic (inlined into mgpu.h before release) */
