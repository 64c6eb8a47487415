#!/bin/sh
# cuda-latent.sh - runs tests/latent_cuda_check (the CUDA latent experts
# against the CPU latent kernel) and passes its exit status through: 0 pass,
# 77 skip (no libcuda.so.1, stub driver or no GPU), anything else fail.
bin="${MOETIER_BUILDDIR:-.}/tests/latent_cuda_check"
if [ ! -x "$bin" ]; then
	echo "cuda-latent.sh: $bin not built" >&2
	exit 99
fi
exec "$bin"
