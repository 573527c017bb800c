/* Fuzz target: mgpu_json_parse on arbitrary bytes (never reads past len, depth-limited). A
   parsed document is walked fully so every node is checked by ASan. */
#include "mgpu.h"
#include <stdlib.h>
#include <string.h>

static size_t fuzz_walk(const mgpu_json *j, int depth) {
    size_t n = 0;
    int64_t count = 0, v;
    const mgpu_json *c;
    if (depth > 65) abort();
    if (j->type == MGPU_JSON_STRING) n += strlen(j->string);
    if (j->type == MGPU_JSON_NUMBER) n += (size_t)mgpu_json_int64(j, &v) + j->raw_len;
    for (c = j->child; c; c = c->next, count++) {
        if (j->type == MGPU_JSON_OBJECT && (!c->key || mgpu_json_get(j, c->key) == NULL)) abort();
        n += fuzz_walk(c, depth + 1);
    }
    if (count != j->count) abort();
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    mgpu_json *j = mgpu_json_parse((const char *)data, size, "fuzz");
    if (!j) {
        if (mgpu_last_result() != MGPU_ERR_FORMAT && mgpu_last_result() != MGPU_ERR_OOM_HOST) abort();
        return 0;
    }
    (void)fuzz_walk(j, 0);
    mgpu_json_free(j);
    return 0;
}

#include "fuzz_replay.h"
