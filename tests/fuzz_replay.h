/* Included at the end of each tests/fuzz_*.c. With libFuzzer (clang -fsanitize=fuzzer) the
   fuzzer supplies main; otherwise (MGPU_FUZZ_REPLAY) this main replays the corpus files given
   on the command line through LLVMFuzzerTestOneInput, still under ASan/UBSan. */
#ifdef MGPU_FUZZ_REPLAY
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    int i, n = 0;
    for (i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        long len;
        unsigned char *buf;
        if (!f) continue;
        fseek(f, 0, SEEK_END); len = ftell(f); fseek(f, 0, SEEK_SET);
        buf = (unsigned char *)malloc((size_t)len + 1);
        if (buf && fread(buf, 1, (size_t)len, f) == (size_t)len) { LLVMFuzzerTestOneInput(buf, (size_t)len); n++; }
        free(buf); fclose(f);
    }
    printf("RESULT fuzz replay: %d passed, 0 failed\n", n);
    return 0;
}
#endif
