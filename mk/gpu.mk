# gpu: the GPU arena (tier 0) and the run-time CUDA driver table.
# cuda_api.c and tier_gpu*.c always build; the CUDA backends compile to
# real code only with cuda.h (HAVE_CUDA), libcuda is dlopen()ed at run time.
libmoetierd_a_SOURCES += daemon/cuda_api.c daemon/cuda_api.h \
	daemon/tier_gpu.c daemon/tier_gpu.h daemon/tier_gpu_impl.h daemon/tier_gpu_emu.c
if HAVE_CUDA
libmoetierd_a_SOURCES += daemon/tier_gpu_cuda.c
endif

if HAVE_CRITERION
check_PROGRAMS += tests/test_tier_gpu
TESTS += tests/test_tier_gpu
tests_test_tier_gpu_SOURCES = tests/test_tier_gpu.c
tests_test_tier_gpu_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_tier_gpu_LDADD = $(FAULT_LINK) $(CRITERION_LIBS)
endif

# bench/h2d: host slot -> GPU tier (emulated by default, --backend vmm|uvm) vs memcpy.
noinst_PROGRAMS += bench/h2d
bench_h2d_SOURCES = bench/h2d.c
bench_h2d_LDADD = $(DAEMON_LINK)

EXTRA_DIST += doc/gpu-tier.md
# Benchmarks are not installed, so neither are their pages.
EXTRA_DIST += doc/h2d.1

# scripts/gpu-check: every GPU test and benchmark in one command (exits 77
# without a GPU, which tests/test_gpu_check.sh checks).
dist_noinst_SCRIPTS += scripts/gpu-check
TESTS += tests/test_gpu_check.sh
EXTRA_DIST += tests/test_gpu_check.sh
