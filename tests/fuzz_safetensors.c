/* Fuzz target: mgpu_safetensors_parse on arbitrary bytes. Any input must give a clean error or a
   file whose every entry lies inside the buffer with a byte count matching dtype x shape. */
#include "mgpu.h"
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    mgpu_safetensors *st = mgpu_safetensors_parse(data, size, "fuzz");
    int i, d;
    if (!st) {
        mgpu_result r = mgpu_last_result();
        if (r != MGPU_ERR_FORMAT && r != MGPU_ERR_UNSUPPORTED && r != MGPU_ERR_OOM_HOST) abort();
        return 0;
    }
    for (i = 0; i < mgpu_safetensors_count(st); i++) {
        const mgpu_safetensors_entry *e = mgpu_safetensors_get(st, i);
        size_t numel = 1, k;
        unsigned sum = 0;
        for (d = 0; d < e->ndim; d++) numel *= (size_t)e->shape[d];
        if (e->ndim < 0 || e->ndim > MGPU_MAX_DIMS || numel * mgpu_dtype_size(e->dtype) != e->nbytes) abort();
        if (mgpu_safetensors_find(st, e->name) != e) abort();
        for (k = 0; k < e->nbytes; k++) sum += ((const uint8_t *)e->data)[k]; /* ASan checks the bounds */
        (void)sum;
    }
    mgpu_safetensors_metadata(st, "format");
    mgpu_safetensors_close(st);
    return 0;
}

#include "fuzz_replay.h"
