/* mgpu.h part: nn (inlined into mgpu.h before release) */
