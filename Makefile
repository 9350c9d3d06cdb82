# loom — one binary, build/loom. See README.md.
#   make              build build/loom
#   make run          install packages, build, loom up: the embedded default model on :8000
#   make test         install packages, build, run every test (tests/run.sh)
#   make bench        run the benchmarks in bench/ (writes docs/benchmarks.md)
#   make SANITIZE=address,undefined test   sanitizer build (separate build dir)
#   make STATIC=1     statically linked binary (for machines without our packages)

CC ?= cc
SANITIZE ?=
STATIC ?=
BUILD ?= build$(if $(SANITIZE),-san)$(if $(STATIC),-static)

WARN := -Wall -Wextra -Wno-unused-parameter -Wshadow=local -Wvla
ifeq ($(CI),true)
WARN += -Werror
endif
OPT ?= -O2
MPI_CFLAGS := $(shell pkg-config --cflags ompi-c 2>/dev/null)
MPI_LIBS := $(shell pkg-config --libs ompi-c 2>/dev/null)
CFLAGS_ALL := -std=gnu11 $(OPT) -g -fopenmp -pthread $(WARN) -Iinclude -I/usr/include/cjson \
	$(MPI_CFLAGS) $(CFLAGS)
LDLIBS_ALL := -lgsl -lopenblas -levent_core -levent_extra -levent_pthreads -lcjson -lyaml -lpcre2-8 $(MPI_LIBS) -lm -lgomp -lpthread
LDFLAGS_ALL := -fopenmp -pthread $(LDFLAGS)
ifneq ($(SANITIZE),)
CFLAGS_ALL += -fsanitize=$(SANITIZE) -fno-omit-frame-pointer
LDFLAGS_ALL += -fsanitize=$(SANITIZE)
endif
ifneq ($(STATIC),)
LDFLAGS_ALL += -static
LDLIBS_ALL += -lgfortran -lquadmath
endif

LIB_SRC := $(shell find src -name '*.c' -not -path 'src/cli/*' -not -path 'src/tensor/cuda/*' | sort)
CLI_SRC := $(shell find src/cli -name '*.c' | sort)
LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/obj/%.o)
CLI_OBJ := $(CLI_SRC:%.c=$(BUILD)/obj/%.o)
TEST_SRC := $(shell find tests/unit tests/model -name 'test_*.c' 2>/dev/null | sort)
TEST_BIN := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
BENCH_SRC := $(shell find bench -name '*.c' 2>/dev/null | sort)
BENCH_BIN := $(BENCH_SRC:bench/%.c=$(BUILD)/bench/%)
FUZZ_SRC := $(shell find tests/fuzz -name 'fuzz_*.c' 2>/dev/null | sort)
FUZZ_BIN := $(FUZZ_SRC:tests/fuzz/%.c=$(BUILD)/fuzz/%)
DEPS := $(LIB_OBJ:.o=.d) $(CLI_OBJ:.o=.d) $(wildcard $(BUILD)/fuzzobj/src/*/*.d)

.PHONY: all run run-now test test-now bench bench-now fuzz setup clean format tests-bin benches
all: $(BUILD)/loom

setup:
	@scripts/setup

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -MMD -MP -c $< -o $@

$(BUILD)/libloom.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/loom: $(CLI_OBJ) $(BUILD)/libloom.a
	$(CC) $(LDFLAGS_ALL) -o $@ $(CLI_OBJ) $(BUILD)/libloom.a $(LDLIBS_ALL)

$(BUILD)/tests/%: tests/%.c $(BUILD)/libloom.a tests/testlib.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -Itests $< -o $@ $(LDFLAGS_ALL) $(BUILD)/libloom.a $(LDLIBS_ALL) -lcmocka

$(BUILD)/bench/%: bench/%.c $(BUILD)/libloom.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) $< -o $@ $(LDFLAGS_ALL) $(BUILD)/libloom.a $(LDLIBS_ALL)

# Fuzz targets: libFuzzer under clang when present (the library is compiled once more with
# clang and sanitizers into libloom-fuzz.a); otherwise a replay driver over the seed corpus.
FUZZ_CC ?= $(shell command -v clang >/dev/null 2>&1 && echo clang)
FUZZ_CFLAGS := -std=gnu11 -g -O1 -fopenmp=libgomp -pthread -Iinclude -I/usr/include/cjson $(MPI_CFLAGS) \
	-fsanitize=address,undefined -fno-omit-frame-pointer
FUZZ_OBJ := $(LIB_SRC:%.c=$(BUILD)/fuzzobj/%.o)
$(BUILD)/fuzzobj/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -MMD -MP -c $< -o $@
$(BUILD)/libloom-fuzz.a: $(FUZZ_OBJ)
	@rm -f $@
	ar rcs $@ $^
ifneq ($(FUZZ_CC),)
$(BUILD)/fuzz/%: tests/fuzz/%.c $(BUILD)/libloom-fuzz.a
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer $< $(BUILD)/libloom-fuzz.a -o $@ $(LDLIBS_ALL)
else
$(BUILD)/fuzz/%: tests/fuzz/%.c tests/fuzz/replay_main.c $(BUILD)/libloom.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) $< tests/fuzz/replay_main.c -o $@ $(LDFLAGS_ALL) $(BUILD)/libloom.a $(LDLIBS_ALL)
endif

tests-bin: $(TEST_BIN)
fuzz: $(FUZZ_BIN)
benches: $(BENCH_BIN)

# run, test and bench install what is missing first, then build in a second make, so that the
# flags probed at parse time (pkg-config, clang) see the freshly installed packages.
run: setup
	@$(MAKE) --no-print-directory run-now
# loom up without a plan: plans this machine's cores for the embedded model, starts the
# instances and the gateway on :8000 (KV capped: a cpu instance's blocks are real memory)
run-now: $(BUILD)/loom
	$(BUILD)/loom up --model random:llama-tiny --port 8000 --max-kv-blocks 4096

test: setup
	@$(MAKE) --no-print-directory test-now
test-now: $(BUILD)/loom $(TEST_BIN) $(FUZZ_BIN) $(BENCH_BIN)
	@BUILD=$(BUILD) tests/run.sh

bench: setup
	@$(MAKE) --no-print-directory bench-now
bench-now: $(BUILD)/loom $(BENCH_BIN)
	@BUILD=$(BUILD) bench/run.sh

format:
	clang-format -i $$(find src include tests bench -name '*.[ch]')

clean:
	rm -rf build build-san build-static build-san-static

-include $(DEPS)
