# peer: llama.cpp (the npm prebuilt, installed by scripts/install-deps
# outside the tree) as the oracle of the tests and the peer of the benchmarks.
