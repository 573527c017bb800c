# mgpu - build, test, demo. `make help` lists the targets.
CC      ?= cc
CXX     ?= c++
NVCC    ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
OPT     ?= -O3 -march=native
CFLAGS  ?= $(OPT) -g
# The language standard and warnings are not part of CFLAGS, so a CFLAGS from the environment
# (CFLAGS=-O0 make) changes optimisation and debug flags but never drops them.
CSTD    := -std=c11
WARN    := -Wall -Wextra -pedantic
CPPFLAGS += -I.
LDLIBS  += -lm -lpthread
BUILD   := build

HDR     := mgpu.h
PARTS   := $(sort $(wildcard src/[0-9]*.h src/[0-9]*.c))

EXAMPLES := $(patsubst examples/%.c,%,$(wildcard examples/*.c))
TOOLS    := $(patsubst tools/%.c,%,$(wildcard tools/*.c))
TESTS    := $(patsubst tests/%.c,%,$(filter-out tests/impl.c tests/fuzz_%.c,$(wildcard tests/*.c)))

.PHONY: all help check-amalgamation test test-gpu gpu-check gpu-check-prep demo data cuda cuda-tests check-headers check-cuda asan fuzz clean bench emu
all: $(addprefix $(BUILD)/,$(EXAMPLES) $(TOOLS)) $(addprefix $(BUILD)/tests/,$(TESTS))

help:
	@echo "make            build CPU examples, tools and tests into build/"
	@echo "make test       run the whole CPU test suite (ends with 'N passed, N failed')"
	@echo "make demo       install what is missing, build, train Fashion-MNIST on the best device"
	@echo "                (make test and make demo install missing Debian packages as root, else print the"
	@echo "                 sudo apt-get line: tools/deps.sh lists them)"
	@echo "make data       fill data/fashion-mnist from Debian's dataset-fashion-mnist"
	@echo "make cuda       build the CUDA variants into build/cuda/"
	@echo "make emu        build every CUDA program against the CPU emulation (tests/emu) into build/emu/"
	@echo "make test-gpu   GPU test suite (skips cleanly without a GPU)"
	@echo "make gpu-check  on a GPU machine, in one command (~6 min): build for sm_90, op tests, compute-sanitizer,"
	@echo "                training to target, AMP, CUDA Graphs, DDP, benchmarks vs PyTorch; OUT=DIR (build/gpu-check)"
	@echo "                gets summary.txt and logs.tar.gz. SKIPPED without a GPU (MGPU_EXPECT_GPU=1: a failure);"
	@echo "                MGPU_GPU_CHECK_EMU=1: dry run on the CPU emulation (make emu)"
	@echo "make gpu-check-prep  Fashion-MNIST (.gz) and the commit into data/gpu-check/, to carry to a GPU machine"
	@echo "make bench      CPU benchmark against PyTorch (bench/RESULTS.md)"

# mgpu.h is assembled from the parts under src/ (edit those); the script rewrites it only when
# its content changes.
$(HDR): $(PARTS) tools/amalgamate.sh
	@sh tools/amalgamate.sh
check-amalgamation:
	@sh tools/amalgamate.sh --check && echo "mgpu.h matches src/"

$(BUILD) $(BUILD)/tests $(BUILD)/cuda $(BUILD)/asan $(BUILD)/fuzz:
	@mkdir -p $@

# Examples are single-file programs that define MGPU_IMPLEMENTATION themselves (STB style).
$(BUILD)/%: examples/%.c $(HDR) | $(BUILD)
	$(CC) $(CPPFLAGS) $(CSTD) $(WARN) $(CFLAGS) $< -o $@ $(LDLIBS)

$(BUILD)/%: tools/%.c $(HDR) | $(BUILD)
	$(CC) $(CPPFLAGS) $(CSTD) $(WARN) $(CFLAGS) $< -o $@ $(LDLIBS)

# Tests share one implementation object.
$(BUILD)/mgpu_impl.o: tests/impl.c $(HDR) | $(BUILD)
	$(CC) $(CPPFLAGS) $(CSTD) $(WARN) $(CFLAGS) -c $< -o $@

$(BUILD)/tests/%: tests/%.c tests/mgpu_test.h $(BUILD)/mgpu_impl.o | $(BUILD)/tests
	$(CC) $(CPPFLAGS) -Itests $(CSTD) $(WARN) $(CFLAGS) $< $(BUILD)/mgpu_impl.o -o $@ $(LDLIBS)

# Sanitizer build of the whole suite (with the same warnings: the sanitizers see more code paths
# at -O1, and the warnings catch what they cannot).
ASAN_FLAGS := $(CSTD) $(WARN) -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer
$(BUILD)/asan/mgpu_impl.o: tests/impl.c $(HDR) | $(BUILD)/asan
	$(CC) $(CPPFLAGS) $(ASAN_FLAGS) -c $< -o $@
$(BUILD)/asan/%: tests/%.c tests/mgpu_test.h $(BUILD)/asan/mgpu_impl.o | $(BUILD)/asan
	$(CC) $(CPPFLAGS) -Itests $(ASAN_FLAGS) $< $(BUILD)/asan/mgpu_impl.o -o $@ $(LDLIBS)
asan: $(addprefix $(BUILD)/asan/,$(TESTS))

# Fuzz targets (libFuzzer through clang when present; otherwise a replay driver over the corpus).
FUZZERS := $(patsubst tests/fuzz_%.c,fuzz_%,$(wildcard tests/fuzz_*.c))
$(BUILD)/fuzz/%: tests/%.c tests/impl.c tests/fuzz_replay.h $(HDR) | $(BUILD)/fuzz
	@if command -v clang >/dev/null 2>&1 && \
	    clang $(CPPFLAGS) -O1 -g -fsanitize=fuzzer,address,undefined tests/impl.c $< -o $@ $(LDLIBS) 2>$@.err; then \
	  touch $@.libfuzzer; echo "built $@ (libFuzzer)"; \
	else \
	  $(CC) $(CPPFLAGS) -O1 -g -fsanitize=address,undefined -DMGPU_FUZZ_REPLAY tests/impl.c $< -o $@ $(LDLIBS) && \
	  rm -f $@.libfuzzer && echo "built $@ (corpus replay; clang's libFuzzer unavailable)"; fi
fuzz: $(addprefix $(BUILD)/fuzz/,$(FUZZERS))

# The header must compile cleanly as C11 and C++ (and with -DMGPU_CUDA).
check-headers: | $(BUILD)
	@printf '#define MGPU_IMPLEMENTATION\n#include "mgpu.h"\nint main(void){return 0;}\n' > $(BUILD)/hdr_c.c
	@cp $(BUILD)/hdr_c.c $(BUILD)/hdr_cpp.cpp
	$(CC) $(CPPFLAGS) -std=c11 -Wall -Wextra -pedantic -Werror -c $(BUILD)/hdr_c.c -o $(BUILD)/hdr_c.o
	$(CXX) $(CPPFLAGS) -std=c++17 -Wall -Wextra -pedantic -Werror -c $(BUILD)/hdr_cpp.cpp -o $(BUILD)/hdr_cpp.o
	$(CC) $(CPPFLAGS) -std=c11 -Wall -Wextra -pedantic -Werror -DMGPU_STATIC -c $(BUILD)/hdr_c.c -o $(BUILD)/hdr_static.o

# CUDA path: compile and link (runs only where a GPU is present).
CUDA_INC := -I$(CUDA_HOME)/include
CUDA_LIB := -L$(CUDA_HOME)/lib64 -L$(CUDA_HOME)/lib -Wl,-rpath,$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib
CUDA_LIBS := -lcudart -lcublas -lcublasLt -lnccl
# Hopper: real sm_90 code plus compute_90 PTX that newer GPUs JIT-compile, whether or not a GPU
# is visible at build time (NVCC_ARCH=... overrides, e.g. NVCC_ARCH=-arch=native).
NVCC_ARCH ?= -gencode 'arch=compute_90,code=[sm_90,compute_90]'
GPU_TESTS := $(patsubst tests/gpu/%.c,%,$(wildcard tests/gpu/*.c))
$(BUILD)/cuda/mgpu_kernels.o: mgpu_kernels.cu $(HDR) | $(BUILD)/cuda
	$(NVCC) -O3 -std=c++17 -I. $(NVCC_ARCH) -Xcompiler -Wall,-Wextra -c $< -o $@
$(BUILD)/cuda/tests/%: tests/gpu/%.c tests/mgpu_test.h $(BUILD)/cuda/mgpu_kernels.o $(HDR) | $(BUILD)/cuda
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) -Itests $(CSTD) $(WARN) $(CFLAGS) -DMGPU_CUDA $(CUDA_INC) $< $(BUILD)/cuda/mgpu_kernels.o -o $@ $(CUDA_LIB) $(CUDA_LIBS) $(LDLIBS) -lstdc++
$(BUILD)/cuda/gemm_bench: bench/gpu/gemm_bench.cu $(BUILD)/cuda/mgpu_kernels.o $(HDR) | $(BUILD)/cuda
	$(NVCC) -O3 -std=c++17 -I. $(NVCC_ARCH) -Xcompiler -Wall,-Wextra $< $(BUILD)/cuda/mgpu_kernels.o -o $@ -L$(CUDA_HOME)/lib64 -Xlinker -rpath,$(CUDA_HOME)/lib64 -lcublas -lcublasLt
cuda-tests: $(addprefix $(BUILD)/cuda/tests/,$(GPU_TESTS)) $(BUILD)/cuda/gemm_bench
$(BUILD)/cuda/%: examples/%.c $(BUILD)/cuda/mgpu_kernels.o $(HDR) | $(BUILD)/cuda
	$(CC) $(CPPFLAGS) $(CSTD) $(WARN) $(CFLAGS) -DMGPU_CUDA $(CUDA_INC) $< $(BUILD)/cuda/mgpu_kernels.o -o $@ $(CUDA_LIB) $(CUDA_LIBS) $(LDLIBS) -lstdc++
# the tools too (mgpurun, mgpu-ckpt, ...), so build/cuda/ holds a complete set for DDP runs
$(BUILD)/cuda/%: tools/%.c $(BUILD)/cuda/mgpu_kernels.o $(HDR) | $(BUILD)/cuda
	$(CC) $(CPPFLAGS) $(CSTD) $(WARN) $(CFLAGS) -DMGPU_CUDA $(CUDA_INC) $< $(BUILD)/cuda/mgpu_kernels.o -o $@ $(CUDA_LIB) $(CUDA_LIBS) $(LDLIBS) -lstdc++
cuda: $(addprefix $(BUILD)/cuda/,$(EXAMPLES) $(TOOLS))
# Standalone: writes its own translation unit (the header with its implementation, under nvcc).
check-cuda: | $(BUILD)/cuda
	@if [ -n "$(NVCC)" ]; then $(MAKE) --no-print-directory cuda cuda-tests && \
	  printf '#define MGPU_IMPLEMENTATION\n#include "mgpu.h"\nint main(void){return 0;}\n' > $(BUILD)/cuda/hdr_nvcc.cu && \
	  $(NVCC) -std=c++17 -I. -DMGPU_CUDA $(NVCC_ARCH) -Xcompiler -Wall,-Wextra -c $(BUILD)/cuda/hdr_nvcc.cu -o $(BUILD)/cuda/hdr_nvcc.o && \
	  echo "CUDA path compiled and linked with $(NVCC)"; \
	else echo "nvcc not found: CUDA compile check skipped"; fi

# CUDA emulation (tests/emu, never vendored): every CUDA program built against a CPU emulation of
# the CUDA runtime, cuBLAS(Lt) and NCCL, kernels compiled unchanged as C++ and run as fibers, with
# a stream-order checker. tests/emu_test.sh runs it in `make test`; `make emu` builds it.
EMU       := $(BUILD)/emu
EMU_INC   := -Itests/emu/include
EMU_CXX   := $(CXX) -std=c++17 -g -ffp-contract=off -Wall -Wextra
# local-exec: the built-in variables (threadIdx, ...) are thread-locals of the executable
EMU_CU    := -x c++ -include tests/emu/cuda_emu.h -ftls-model=local-exec $(EMU_INC) -Itests/emu -I.
EMU_LIBS  := -lstdc++ -lm -lpthread -lrt
# no enum check: the argument structs are C, where an enum may hold any int (tests pass bad kinds)
EMU_SAN   := -O1 -fsanitize=address,undefined -fno-sanitize=enum -fno-omit-frame-pointer
EMU_DEPS  := $(wildcard tests/emu/*.h tests/emu/include/*.h) tests/emu/dynsmem.sh
EMU_RT    := $(patsubst tests/emu/%.cc,%,$(wildcard tests/emu/*.cc))
# variant: $(EMU) (optimised) or $(EMU)/asan (AddressSanitizer + UBSan)
emu_opt    = $(if $(findstring /asan/,$@),$(EMU_SAN),-O2)
# kernels: no null check either, GCC 12's UBSan tests a thread-local's address with flags that a
# lea did not set (false reports on threadIdx); a null kernel pointer still faults under ASan
emu_kopt   = $(if $(findstring /asan/,$@),$(EMU_SAN) -fno-sanitize=null,-O2)
# (one rule per variant: a pattern rule with two targets would be one recipe making both)
define EMU_CC_RECIPE
	@mkdir -p $(@D)
	$(EMU_CXX) $(emu_opt) $(EMU_INC) -Itests/emu -c $< -o $@
endef
$(EMU)/obj/%.o: tests/emu/%.cc $(EMU_DEPS)
	$(EMU_CC_RECIPE)
$(EMU)/asan/obj/%.o: tests/emu/%.cc $(EMU_DEPS)
	$(EMU_CC_RECIPE)
$(EMU)/libcudaemu.a: $(addprefix $(EMU)/obj/,$(addsuffix .o,$(EMU_RT)))
	ar rcs $@ $^
$(EMU)/asan/libcudaemu.a: $(addprefix $(EMU)/asan/obj/,$(addsuffix .o,$(EMU_RT)))
	ar rcs $@ $^
# kernels: a .cu as C++, plus the thread-local buffer its `extern __shared__` arrays alias
define EMU_KO_RECIPE
	@mkdir -p $(@D)
	$(EMU_CXX) $(emu_kopt) $(EMU_CU) -c $< -o $@.tmp.o
	sh tests/emu/dynsmem.sh $@.tmp.o > $@.s && as $@.s -o $@.smem.o && ld -r $@.tmp.o $@.smem.o -o $@ && rm -f $@.tmp.o $@.smem.o $@.s
endef
$(EMU)/%.ko: %.cu $(HDR) $(EMU_DEPS)
	$(EMU_KO_RECIPE)
$(EMU)/asan/%.ko: %.cu $(HDR) $(EMU_DEPS)
	$(EMU_KO_RECIPE)
$(EMU)/tests/%.ko: tests/emu/%.cu $(EMU_DEPS)
	$(EMU_KO_RECIPE)
$(EMU)/asan/tests/%.ko: tests/emu/%.cu $(EMU_DEPS)
	$(EMU_KO_RECIPE)
EMU_LINK = $(CC) $(CPPFLAGS) -Itests $(CSTD) $(WARN) -DMGPU_CUDA $(EMU_INC)
$(EMU)/tests/%: tests/gpu/%.c tests/mgpu_test.h $(EMU)/mgpu_kernels.ko $(EMU)/libcudaemu.a $(HDR)
	@mkdir -p $(@D)
	$(EMU_LINK) $(CFLAGS) $< $(EMU)/mgpu_kernels.ko $(EMU)/libcudaemu.a -o $@ $(EMU_LIBS)
$(EMU)/asan/tests/%: tests/gpu/%.c tests/mgpu_test.h $(EMU)/asan/mgpu_kernels.ko $(EMU)/asan/libcudaemu.a $(HDR)
	@mkdir -p $(@D)
	$(EMU_LINK) -g $(EMU_SAN) $< $(EMU)/asan/mgpu_kernels.ko $(EMU)/asan/libcudaemu.a -o $@ $(EMU_LIBS)
$(EMU)/tests/%: tests/emu/%.c tests/mgpu_test.h $(EMU)/mgpu_kernels.ko $(EMU)/libcudaemu.a $(HDR)
	@mkdir -p $(@D)
	$(EMU_LINK) $(CFLAGS) $< $(EMU)/mgpu_kernels.ko $(EMU)/libcudaemu.a -o $@ $(EMU_LIBS)
$(EMU)/tests/%: $(EMU)/tests/%.ko $(EMU)/libcudaemu.a
	$(CXX) $^ -o $@ $(EMU_LIBS)
$(EMU)/asan/tests/%: $(EMU)/asan/tests/%.ko $(EMU)/asan/libcudaemu.a
	$(CXX) $(EMU_SAN) $^ -o $@ $(EMU_LIBS)
$(EMU)/%: examples/%.c $(EMU)/mgpu_kernels.ko $(EMU)/libcudaemu.a $(HDR)
	$(EMU_LINK) $(CFLAGS) $< $(EMU)/mgpu_kernels.ko $(EMU)/libcudaemu.a -o $@ $(EMU_LIBS)
$(EMU)/%: tools/%.c $(EMU)/mgpu_kernels.ko $(EMU)/libcudaemu.a $(HDR)
	$(EMU_LINK) $(CFLAGS) $< $(EMU)/mgpu_kernels.ko $(EMU)/libcudaemu.a -o $@ $(EMU_LIBS)
# the benchmark launches with the chevron syntax, which C++ lacks: rewritten to the emulation's launcher
$(EMU)/gemm_bench: bench/gpu/gemm_bench.cu $(EMU)/mgpu_kernels.ko $(EMU)/libcudaemu.a $(HDR) $(EMU_DEPS)
	sed -E 's/([A-Za-z_][A-Za-z0-9_]*)<<<([^>]*)>>>\(/::mgpu_emu::make_launcher(\1, "\1", \2)(/g' $< > $@.cc
	$(EMU_CXX) -O2 $(EMU_CU) $@.cc -x none $(EMU)/mgpu_kernels.ko $(EMU)/libcudaemu.a -o $@ $(EMU_LIBS)
.PRECIOUS: $(EMU)/%.ko $(EMU)/asan/%.ko $(EMU)/tests/%.ko $(EMU)/asan/tests/%.ko
EMU_TESTS := $(patsubst tests/emu/%.c,%,$(wildcard tests/emu/*.c)) $(patsubst tests/emu/%.cu,%,$(wildcard tests/emu/*.cu))
emu: $(addprefix $(EMU)/tests/,$(GPU_TESTS) $(EMU_TESTS)) $(addprefix $(EMU)/,$(EXAMPLES) $(TOOLS)) $(EMU)/gemm_bench \
     $(addprefix $(EMU)/asan/tests/,$(GPU_TESTS) $(patsubst tests/emu/%.cu,%,$(wildcard tests/emu/*.cu)))

# Missing Debian packages first (tools/deps.sh: installed as root, else the sudo line and a stop);
# the committed header is checked against src/ before anything regenerates it.
test:
	@sh tools/deps.sh test
	@sh tools/amalgamate.sh --check
	@$(MAKE) --no-print-directory all check-headers asan fuzz emu
	@$(MAKE) --no-print-directory check-cuda > $(BUILD)/check-cuda.log 2>&1; echo $$? > $(BUILD)/check-cuda.rc
	@bash tests/run.sh

test-gpu:
	@bash tests/run_gpu.sh

# The one command for a lent GPU machine (tools/gpu_check.sh says what it runs and in what time).
OUT ?= $(BUILD)/gpu-check
gpu-check:
	@OUT='$(OUT)' bash tools/gpu_check.sh
gpu-check-prep:
	@bash tools/gpu_check.sh --prep

data:
	@bash tools/setup_data.sh

# Trains on the best available device: --device auto picks a GPU once the CUDA backend is built in.
# The best device: with an NVIDIA GPU visible (nvidia-smi) and nvcc, the CUDA build on cuda:0;
# otherwise the CPU build.
demo:
	@sh tools/deps.sh demo
	@bash tools/setup_data.sh
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && [ -x "$(NVCC)" ]; then \
	  echo "demo: GPU found ($$(nvidia-smi -L | head -n 1)): building the CUDA variant"; \
	  $(MAKE) --no-print-directory cuda && \
	  $(BUILD)/cuda/fashion_mlp --device cuda --data data/fashion-mnist --metrics $(BUILD)/demo_metrics.jsonl --save-dir $(BUILD)/demo; \
	else \
	  $(MAKE) --no-print-directory all && \
	  $(BUILD)/fashion_mlp --device auto --data data/fashion-mnist --metrics $(BUILD)/demo_metrics.jsonl --save-dir $(BUILD)/demo; \
	fi

bench: all
	@bash bench/bench_cpu.sh

clean:
	rm -rf $(BUILD)
