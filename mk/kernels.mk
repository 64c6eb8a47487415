# kernels: the expert FFN on the CPU (portable C, AVX2, AVX-512 chosen by
# CPUID at run time: each function carries its own target attribute, so no
# -march flag is needed), the CUDA grouped FFN (compiled to a fatbin when nvcc
# is present and embedded with .incbin), and daemon/compute (the COMPUTE
# opcode's engine and the move-vs-compute cost model).
libmoekernels_a_SOURCES += kernels/ffn.c kernels/ffn.h kernels/ffn_impl.h kernels/ffn_simd.h \
	kernels/ffn_avx2.c kernels/ffn_avx512.c kernels/ffn_vnni.c

if HAVE_CRITERION
check_PROGRAMS += tests/test_ffn
TESTS += tests/test_ffn
tests_test_ffn_SOURCES = tests/test_ffn.c tests/ffn_testutil.h
tests_test_ffn_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_ffn_LDADD = $(FAULT_LINK) $(CRITERION_LIBS)
endif

# Our K-quant dequantization, q8_K activations and dot products against
# llama.cpp's ggml (the npm prebuilt): exits 77 when configure found no peer.
check_PROGRAMS += tests/test_kquant_ggml
TESTS += tests/test_kquant_ggml
tests_test_kquant_ggml_SOURCES = tests/test_kquant_ggml.c tests/ggml_peer.h
tests_test_kquant_ggml_LDADD = $(KERNELS_LINK)
if HAVE_LLAMA
tests_test_kquant_ggml_CPPFLAGS = $(AM_CPPFLAGS) $(LLAMA_CPPFLAGS) -DMOE_HAVE_LLAMA \
	-DMOE_LLAMA_BACKEND_DIR='"$(LLAMA_BACKEND_DIR)"'
tests_test_kquant_ggml_LDADD += $(LLAMA_LIBS) -ldl
endif

# CUDA: kernels/ffn.cu -> kernels/ffn.fatbin (nvcc, build tree) -> embedded
# by kernels/cuda_fatbin.S with .incbin "kernels/ffn.fatbin" (relative to the
# top build directory, where make runs the assembler). kernels/cuda_common.cuh
# holds the device code ffn.cu and latent.cu (mk/latent.mk) share.
EXTRA_DIST += kernels/ffn.cu kernels/ffn_cuda.h kernels/cuda_common.cuh kernels/cuda_fatbin.S tests/cuda-ffn.sh
noinst_HEADERS += kernels/ffn_cuda.h
if HAVE_NVCC
libmoekernels_a_SOURCES += kernels/cuda_fatbin.S
BUILT_SOURCES += kernels/ffn.fatbin
CLEANFILES += kernels/ffn.fatbin
kernels/ffn.fatbin: $(srcdir)/kernels/ffn.cu $(srcdir)/kernels/ffn_cuda.h $(srcdir)/kernels/cuda_common.cuh
	@$(MKDIR_P) kernels
	$(AM_V_GEN)$(NVCC) -fatbin $(NVCC_GENCODE) -I$(srcdir)/kernels -o $@ $(srcdir)/kernels/ffn.cu
# .incbin is invisible to the dependency tracking, so name the objects
kernels/cuda_fatbin.$(OBJEXT) : kernels/ffn.fatbin

check_PROGRAMS += tests/cuda_ffn_check
TESTS += tests/cuda-ffn.sh
tests_cuda_ffn_check_SOURCES = tests/cuda_ffn_check.c tests/cuda_probe.h
tests_cuda_ffn_check_LDADD = $(FAULT_LINK)
endif

libmoetierd_a_SOURCES += daemon/compute.c daemon/compute.h
if HAVE_CRITERION
check_PROGRAMS += tests/test_compute
TESTS += tests/test_compute
tests_test_compute_SOURCES = tests/test_compute.c
tests_test_compute_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_compute_LDADD = $(FAULT_LINK) $(CRITERION_LIBS)
endif

# Benchmark: our expert FFN vs OpenBLAS sgemv/sgemm, oneDNN bf16 and the
# read bandwidth (peers only when configure found them).
noinst_PROGRAMS += bench/ffn-vs-openblas
bench_ffn_vs_openblas_SOURCES = bench/ffn-vs-openblas.c
bench_ffn_vs_openblas_CFLAGS = $(AM_CFLAGS) $(OPENBLAS_CFLAGS)
bench_ffn_vs_openblas_LDADD = $(KERNELS_LINK) $(OPENBLAS_LIBS) $(DNNL_LIBS)
dist_noinst_SCRIPTS += bench/ffn-vs-openblas.sh

# Benchmark: our expert FFN vs llama.cpp's ggml CPU backend (a graph on the
# same cold weights), q8_0 q4_0 q4_K q6_K bf16 at 1, 16, 64 tokens. Without
# the peer it builds and exits 77.
noinst_PROGRAMS += bench/ffn-vs-ggml
bench_ffn_vs_ggml_SOURCES = bench/ffn-vs-ggml.c tests/ggml_peer.h
bench_ffn_vs_ggml_LDADD = $(KERNELS_LINK)
if HAVE_LLAMA
bench_ffn_vs_ggml_CPPFLAGS = $(AM_CPPFLAGS) $(LLAMA_CPPFLAGS) -DMOE_HAVE_LLAMA \
	-DMOE_LLAMA_BACKEND_DIR='"$(LLAMA_BACKEND_DIR)"'
bench_ffn_vs_ggml_LDADD += $(LLAMA_LIBS) -ldl
endif
EXTRA_DIST += doc/kernels.md doc/ffn-vs-openblas.1

# The kernels' persistent thread pool: no thread per call, same bits for any
# thread count, concurrent callers, fork.
if HAVE_CRITERION
check_PROGRAMS += tests/test_ffn_pool
TESTS += tests/test_ffn_pool
tests_test_ffn_pool_SOURCES = tests/test_ffn_pool.c
tests_test_ffn_pool_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_ffn_pool_LDADD = $(KERNELS_LINK) $(CRITERION_LIBS)
endif
