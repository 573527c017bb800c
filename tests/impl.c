/* The one translation unit that holds the library for the test programs. */
#define MGPU_IMPLEMENTATION
#include "mgpu.h"
