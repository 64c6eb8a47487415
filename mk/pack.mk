# pack: the .moepack reader/writer/verifier (core), moe-pack (the converter
# and inspector), their tests and the pack-making benchmark helper.
libmoecore_a_SOURCES += core/pack.c

bin_PROGRAMS += tools/moe-pack
tools_moe_pack_SOURCES = tools/moe-pack.c tools/convert.c tools/convert.h
tools_moe_pack_LDADD = $(KERNELS_LINK)

if HAVE_CRITERION
check_PROGRAMS += tests/test_pack
TESTS += tests/test_pack
tests_test_pack_SOURCES = tests/test_pack.c tests/testutil.h
tests_test_pack_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_pack_LDADD = $(FAULT_LINK) $(CRITERION_LIBS)
endif

# Whole-model packs: moe-gen GGUFs -> every non-expert tensor + gguf.kv (runs moe-gen and moe-pack).
if HAVE_CRITERION
check_PROGRAMS += tests/test_pack_model
TESTS += tests/test_pack_model
tests_test_pack_model_SOURCES = tests/test_pack_model.c tests/testutil.h
tests_test_pack_model_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_pack_model_LDADD = $(FAULT_LINK) $(CRITERION_LIBS)
endif

# Round trips through moe-gen's checkpoints (needs libmoegen for the expected bytes).
if HAVE_CRITERION
check_PROGRAMS += tests/test_roundtrip
TESTS += tests/test_roundtrip
tests_test_roundtrip_SOURCES = tests/test_roundtrip.c tests/testutil.h
tests_test_roundtrip_CPPFLAGS = $(AM_CPPFLAGS) -I$(top_srcdir)/tools
tests_test_roundtrip_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_roundtrip_LDADD = $(GEN_LINK) $(FAULT_LINK) $(CRITERION_LIBS)
endif

dist_man_MANS += doc/moe-pack.1
dist_noinst_SCRIPTS += bench/mkpack-dsv2
EXTRA_DIST += doc/pack-format.md
