#!/bin/sh
# cuda-ffn.sh - runs tests/cuda_ffn_check (the CUDA grouped expert FFN
# against the CPU kernels) and passes its exit status through: 0 pass,
# 77 skip (no libcuda.so.1, stub driver or no GPU), anything else fail.
bin="${MOETIER_BUILDDIR:-.}/tests/cuda_ffn_check"
if [ ! -x "$bin" ]; then
	echo "cuda-ffn.sh: $bin not built" >&2
	exit 99
fi
exec "$bin"
