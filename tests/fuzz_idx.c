/* Fuzz target: mgpu_idx_parse on arbitrary bytes must never read past the buffer, never crash,
   and on success describe a data range that lies inside the input. */
#include "mgpu.h"
#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    mgpu_idx idx;
    size_t i, n = 1, sum = 0;
    int d;
    if (mgpu_idx_parse(data, size, "fuzz input", &idx) != MGPU_OK) return 0;
    /* the parse must agree with itself: dims multiply to the element count of data_bytes */
    for (d = 0; d < idx.ndim; d++) n *= (size_t)idx.dims[d];
    if (idx.data < data || idx.data + idx.data_bytes != data + size || idx.ndim < 1 || idx.ndim > MGPU_MAX_DIMS ||
        (idx.data_bytes && n == 0) || (n && idx.data_bytes % n != 0))
        abort();
    /* touch every data byte so ASan checks the range */
    for (i = 0; i < idx.data_bytes; i++) sum += idx.data[i];
    return (int)(sum & 0);
}
#include "fuzz_replay.h"
