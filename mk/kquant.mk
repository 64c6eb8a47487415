# mk/kquant.mk - see Makefile.am; owned by one subsystem.
# Per-layer expert types (version 2 packs) from llama.cpp's own Q4_K_M, and
# the MoE layouts llama.cpp's tests/test-llama-archs.cpp writes, through
# moe-pack, moe-run and moetierd against llama.cpp's logits. Skip (77)
# where the llama.cpp peer is absent.
TESTS += tests/test_kquant_layers.sh
EXTRA_DIST += tests/test_kquant_layers.sh tests/kquant-env.sh
TESTS += tests/test_llama_archs.sh
EXTRA_DIST += tests/test_llama_archs.sh tests/llama-archs-shim.c tests/pack-vs-gguf.py tests/attn-boost.py \
	tests/ds2-variant.py
# built by test_llama_archs.sh from llama.cpp's source at test time (no C++
# compiler is configured): kept between runs, removed by make clean
CLEANFILES += tests/test-llama-archs
# moe-run's deepseek2 attention (absorbed MLA against the decompressed
# form) and ggml_rope_ext's extensions, without llama.cpp
check_PROGRAMS += tests/test_mla
TESTS += tests/test_mla
tests_test_mla_SOURCES = tests/test_mla.c
tests_test_mla_CPPFLAGS = $(AM_CPPFLAGS) -I$(top_srcdir)/client/run
tests_test_mla_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_mla_LDADD = client/run/libmoerun.a $(KERNELS_LINK) $(CRITERION_LIBS)
# the gateless expert FFN (MOE_FFN_SILU: down(silu(up x)), llama.cpp's
# experts without ffn_gate_exps) against a double-precision reference
check_PROGRAMS += tests/test_ffn_silu
TESTS += tests/test_ffn_silu
tests_test_ffn_silu_SOURCES = tests/test_ffn_silu.c tests/ffn_testutil.h
tests_test_ffn_silu_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_ffn_silu_LDADD = $(KERNELS_LINK) $(CRITERION_LIBS)
# moetierd's COMPUTE of a pack's experts against ffn_expert here (the
# gateless llama of tests/test_llama_archs.sh; a libmoetier client)
check_PROGRAMS += tests/ffn_compute_check
tests_ffn_compute_check_SOURCES = tests/ffn_compute_check.c tests/compute_check.h
tests_ffn_compute_check_LDADD = client/libmoetier.la $(KERNELS_LINK)
