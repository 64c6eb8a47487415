# gen: moe-gen, the deterministic MoE checkpoint and routing-trace generator.
# The generator itself is a small library so tests (and moe-pack's) can
# regenerate the exact bytes a generated checkpoint holds (tools/gen.h).
noinst_LIBRARIES += libmoegen.a
libmoegen_a_SOURCES = tools/gen.c tools/gen.h tools/gen_safetensors.c tools/gen_gguf.c
# Values must not depend on whether the compiler fuses a*b+c.
libmoegen_a_CFLAGS = $(AM_CFLAGS) -ffp-contract=off
# What a program or test that regenerates checkpoints adds: the include path
# of gen.h and the library (linked before the core).
GEN_CPPFLAGS = -I$(top_srcdir)/tools
GEN_LINK = libmoegen.a

bin_PROGRAMS += tools/moe-gen
tools_moe_gen_SOURCES = tools/moe-gen.c
tools_moe_gen_LDADD = $(GEN_LINK) $(CORE_LINK)
dist_man_MANS += doc/moe-gen.1

if HAVE_CRITERION
check_PROGRAMS += tests/test_gen
TESTS += tests/test_gen
tests_test_gen_SOURCES = tests/test_gen.c tests/testutil.h
tests_test_gen_CPPFLAGS = $(AM_CPPFLAGS) $(GEN_CPPFLAGS)
tests_test_gen_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_gen_LDADD = $(GEN_LINK) $(FAULT_LINK) $(CRITERION_LIBS)
endif
