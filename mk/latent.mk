# latent: MoLAE latent experts (issue 15 items 3-4): kernels/latent.c on
# the CPU (every product through ffn_matmul), kernels/latent.cu on the GPU
# (compiled to kernels/latent.fatbin by nvcc when present and embedded by
# kernels/latent_fatbin.S, as ffn.cu is in mk/kernels.mk).
libmoekernels_a_SOURCES += kernels/latent.c kernels/latent.h
noinst_HEADERS += kernels/latent_cuda.h
EXTRA_DIST += kernels/latent.cu kernels/latent_fatbin.S
if HAVE_NVCC
libmoekernels_a_SOURCES += kernels/latent_fatbin.S
BUILT_SOURCES += kernels/latent.fatbin
CLEANFILES += kernels/latent.fatbin
kernels/latent.fatbin: $(srcdir)/kernels/latent.cu $(srcdir)/kernels/latent_cuda.h $(srcdir)/kernels/cuda_common.cuh
	@$(MKDIR_P) kernels
	$(AM_V_GEN)$(NVCC) -fatbin $(NVCC_GENCODE) -I$(srcdir)/kernels -o $@ $(srcdir)/kernels/latent.cu
# .incbin is invisible to the dependency tracking, so name the objects
kernels/latent_fatbin.$(OBJEXT) : kernels/latent.fatbin

# On a GPU: the CUDA latent experts against the CPU latent kernel (skips 77
# without a driver or device).
check_PROGRAMS += tests/latent_cuda_check
TESTS += tests/cuda-latent.sh
tests_latent_cuda_check_SOURCES = tests/latent_cuda_check.c tests/cuda_probe.h
tests_latent_cuda_check_LDADD = $(KERNELS_LINK) -ldl
endif
EXTRA_DIST += tests/cuda-latent.sh

# The latent FFN against the dense reconstruction W = A B (synthetic and
# through a pack made by moe-pack molae), z once per (token, group), the
# CUDA launcher's geometry.
if HAVE_CRITERION
if HAVE_LAPACKE
check_PROGRAMS += tests/test_latent
TESTS += tests/test_latent
tests_test_latent_SOURCES = tests/test_latent.c tests/testutil.h
tests_test_latent_CPPFLAGS = $(AM_CPPFLAGS) -I$(top_srcdir)/tools
tests_test_latent_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_latent_LDADD = tools/libmolae.a $(KERNELS_LINK) $(LAPACKE_LIBS) $(OPENBLAS_LIBS) $(CRITERION_LIBS)
endif
endif
