# peer: llama.cpp (the npm prebuilt, installed by scripts/install-deps
# outside the tree) as the oracle of the tests and the peer of the benchmarks.
# Built by `make` (not only `make check`): moe-run's comparisons and
# bench/decode-vs-llamacpp run it. It links only llama.cpp, never libmoecore.
if HAVE_LLAMA
noinst_PROGRAMS += tests/llama-oracle
tests_llama_oracle_SOURCES = tests/llama-oracle.c
tests_llama_oracle_CPPFLAGS = $(LLAMA_CPPFLAGS) -DLLAMA_ORACLE_BACKEND_DIR='"$(LLAMA_BACKEND_DIR)"'
tests_llama_oracle_LDADD = $(LLAMA_LIBS) -lm
endif
EXTRA_DIST += tests/llama-oracle.c
# Skips (77) where the peer is absent.
TESTS += tests/test_llama_oracle.sh
EXTRA_DIST += tests/test_llama_oracle.sh
# Decode tokens/s of moe-run against llama.cpp under memory budgets (root,
# idle machine; --dry-run shows the plan). Not a test.
dist_noinst_SCRIPTS += bench/decode-vs-llamacpp
# Benchmarks are not installed, so neither are their pages.
EXTRA_DIST += doc/decode-vs-llamacpp.1
# llama.cpp's quantizer (llama_model_quantize) for the K-quant end-to-end
# test: a Q4_K_M file made by llama.cpp itself.
if HAVE_LLAMA
noinst_PROGRAMS += tests/llama-quantize
tests_llama_quantize_SOURCES = tests/llama-quantize.c
tests_llama_quantize_CPPFLAGS = $(LLAMA_CPPFLAGS)
tests_llama_quantize_LDADD = $(LLAMA_LIBS) -lm
endif
EXTRA_DIST += tests/llama-quantize.c
# Q4_K_M from llama.cpp's quantizer, split, packed, run against llama.cpp.
# Skips (77) where the peer is absent.
TESTS += tests/test_kquant_e2e.sh
EXTRA_DIST += tests/test_kquant_e2e.sh
