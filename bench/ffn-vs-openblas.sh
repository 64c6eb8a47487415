#!/bin/sh
# ffn-vs-openblas.sh - runs bench/ffn-vs-openblas twice: with OpenBLAS's
# core type as the environment sets it (this machine kind sets
# OPENBLAS_CORETYPE=Haswell, OPENBLAS_L2_SIZE=512), then with both unset so
# OpenBLAS picks its own kernels (Cooperlake on Zen 5 with AVX-512).
# Arguments are passed on (e.g. --quick). Run from the build directory.
bin="${MOETIER_BUILDDIR:-.}/bench/ffn-vs-openblas"
[ -x "$bin" ] || { echo "ffn-vs-openblas.sh: build $bin first (make bench/ffn-vs-openblas)" >&2; exit 1; }
echo "=== run 1: OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-(unset)} OPENBLAS_L2_SIZE=${OPENBLAS_L2_SIZE:-(unset)}"
OMP_NUM_THREADS=1 nice "$bin" "$@" || exit $?
echo
echo "=== run 2: OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset"
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 nice "$bin" "$@"
