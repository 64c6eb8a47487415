# formats: strict readers of model containers (safetensors, GGUF) and routing
# traces (CSV), shared by the tools and the daemon.
libmoecore_a_SOURCES += core/safetensors.c core/safetensors.h core/gguf.c core/gguf.h core/trace.c
dist_doc_DATA += doc/formats.md

if HAVE_CRITERION
check_PROGRAMS += tests/test_safetensors tests/test_gguf tests/test_trace
TESTS += tests/test_safetensors tests/test_gguf tests/test_trace
tests_test_safetensors_SOURCES = tests/test_safetensors.c tests/testutil.h
tests_test_safetensors_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_safetensors_LDADD = $(CORE_LINK) $(CRITERION_LIBS)
tests_test_gguf_SOURCES = tests/test_gguf.c tests/testutil.h
tests_test_gguf_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_gguf_LDADD = $(CORE_LINK) $(CRITERION_LIBS)
tests_test_trace_SOURCES = tests/test_trace.c tests/testutil.h
tests_test_trace_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_trace_LDADD = $(CORE_LINK) $(CRITERION_LIBS)
endif

# libFuzzer targets: CC=clang ./configure --enable-fuzzing --enable-asan
# The reader sources are compiled into each target so that they carry the
# fuzzer's coverage instrumentation (libmoecore.a is built without it).
if ENABLE_FUZZING
noinst_PROGRAMS += tests/fuzz/fuzz_safetensors tests/fuzz/fuzz_gguf tests/fuzz/fuzz_trace
tests_fuzz_fuzz_safetensors_SOURCES = tests/fuzz/fuzz_safetensors.c core/safetensors.c core/util.c
tests_fuzz_fuzz_safetensors_CFLAGS = $(AM_CFLAGS) $(FUZZ_CFLAGS)
tests_fuzz_fuzz_safetensors_LDFLAGS = $(AM_LDFLAGS) $(FUZZ_CFLAGS)
tests_fuzz_fuzz_safetensors_LDADD = $(JANSSON_LIBS) -lm
tests_fuzz_fuzz_gguf_SOURCES = tests/fuzz/fuzz_gguf.c core/gguf.c core/util.c
tests_fuzz_fuzz_gguf_CFLAGS = $(AM_CFLAGS) $(FUZZ_CFLAGS)
tests_fuzz_fuzz_gguf_LDFLAGS = $(AM_LDFLAGS) $(FUZZ_CFLAGS)
tests_fuzz_fuzz_gguf_LDADD = -lm
tests_fuzz_fuzz_trace_SOURCES = tests/fuzz/fuzz_trace.c core/trace.c core/util.c
tests_fuzz_fuzz_trace_CFLAGS = $(AM_CFLAGS) $(FUZZ_CFLAGS)
tests_fuzz_fuzz_trace_LDFLAGS = $(AM_LDFLAGS) $(FUZZ_CFLAGS)
tests_fuzz_fuzz_trace_LDADD = -lm
endif

# Split GGUFs (gguf_open_model) and K-quant tensors through moe-pack:
# tests/gguf-split writes llama.cpp's split layout (and stand-in K-quant
# tensors), the test converts and compares packs.
check_PROGRAMS += tests/gguf-split
tests_gguf_split_SOURCES = tests/gguf-split.c
tests_gguf_split_LDADD = $(CORE_LINK)
if HAVE_CRITERION
check_PROGRAMS += tests/test_gguf_split
TESTS += tests/test_gguf_split
tests_test_gguf_split_SOURCES = tests/test_gguf_split.c tests/testutil.h
tests_test_gguf_split_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_gguf_split_LDADD = $(CORE_LINK) $(CRITERION_LIBS)
endif
