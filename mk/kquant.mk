# mk/kquant.mk - see Makefile.am; owned by one subsystem.
# Per-layer expert types (version 2 packs) from llama.cpp's own Q4_K_M, and
# the MoE layouts llama.cpp's tests/test-llama-archs.cpp writes, through
# moe-pack, moe-run and moetierd against llama.cpp's logits. Skip (77)
# where the llama.cpp peer is absent.
TESTS += tests/test_kquant_layers.sh
EXTRA_DIST += tests/test_kquant_layers.sh
