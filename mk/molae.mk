# molae: MoLAE conversion (`moe-pack molae`, issue 15): rank-r shared-basis
# factorization of expert gate/up matrices. CBLAS + LAPACKE when configure
# found them (HAVE_LAPACKE); otherwise the subcommand says it was not built.
noinst_LIBRARIES += tools/libmolae.a
tools_libmolae_a_SOURCES = tools/molae.c tools/molae.h
tools_libmolae_a_CFLAGS = $(AM_CFLAGS) $(OPENBLAS_CFLAGS) $(LAPACKE_CFLAGS)
MOLAE_LINK = tools/libmolae.a $(KERNELS_LINK) $(LAPACKE_LIBS) $(OPENBLAS_LIBS)
tools_moe_pack_LDADD += $(MOLAE_LINK)

if HAVE_CRITERION
if HAVE_LAPACKE
check_PROGRAMS += tests/test_molae
TESTS += tests/test_molae
tests_test_molae_SOURCES = tests/test_molae.c tests/testutil.h
tests_test_molae_CPPFLAGS = $(AM_CPPFLAGS) -I$(top_srcdir)/tools
tests_test_molae_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_molae_LDADD = tools/libmolae.a $(KERNELS_LINK) $(LAPACKE_LIBS) $(OPENBLAS_LIBS) $(CRITERION_LIBS)
endif
endif

EXTRA_DIST += doc/molae.md

# moetierd serves a latent pack: ACQUIRE gives the pack's extents, COMPUTE
# equals the CPU latent kernel (tests/molae_serve_check, a libmoetier client).
TESTS += tests/test_molae_daemon.sh
EXTRA_DIST += tests/test_molae_daemon.sh
check_PROGRAMS += tests/molae_serve_check
tests_molae_serve_check_SOURCES = tests/molae_serve_check.c
tests_molae_serve_check_LDADD = client/libmoetier.la $(KERNELS_LINK)

# moe-run's latent experts (client/run/latent.h: the calls experts.c and
# model.c make for a latent pack), in the forward pass's library.
client_run_libmoerun_a_SOURCES += client/run/latent.c client/run/latent.h
if HAVE_CRITERION
if HAVE_LAPACKE
check_PROGRAMS += tests/test_molae_glue
TESTS += tests/test_molae_glue
tests_test_molae_glue_SOURCES = tests/test_molae_glue.c tests/testutil.h
tests_test_molae_glue_CPPFLAGS = $(AM_CPPFLAGS) -I$(top_srcdir)/tools
tests_test_molae_glue_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_molae_glue_LDADD = client/run/libmoerun.a tools/libmolae.a $(KERNELS_LINK) $(LAPACKE_LIBS) \
	$(OPENBLAS_LIBS) $(CRITERION_LIBS)
endif
endif

# moe-run on a latent pack vs its dense reconstruction, --batch 1 -t 2, full
# rank vs the original, through moetierd (skips until moe-run wires latent.h).
TESTS += tests/test_molae_run.sh
EXTRA_DIST += tests/test_molae_run.sh

# bench/molae: bytes per expert and hit rate at equal arena bytes, dense vs
# MoLAE, at the OLMoE / Qwen3-30B-A3B / DeepSeek-V2-Lite shapes; the trained
# model's perplexity table when moe-run computes latent packs.
dist_noinst_SCRIPTS += bench/molae

if HAVE_CRITERION
check_PROGRAMS += tests/test_molae_compute
TESTS += tests/test_molae_compute
tests_test_molae_compute_SOURCES = tests/test_molae_compute.c
tests_test_molae_compute_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_molae_compute_LDADD = $(DAEMON_LINK) $(CRITERION_LIBS)
endif

# A latent pack's B in the GPU tier (emulated backend): the resident region
# after the last slot and its arithmetic (tier_gpu), moet_latent_basis bit
# for bit against the pack, COMPUTE unchanged, B on the host without a GPU
# tier or with an arena too small, hostile requests.
if HAVE_CRITERION
if HAVE_LAPACKE
check_PROGRAMS += tests/test_molae_gpu
TESTS += tests/test_molae_gpu
tests_test_molae_gpu_SOURCES = tests/test_molae_gpu.c tests/daemon_probe.h tests/testutil.h
tests_test_molae_gpu_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_molae_gpu_LDADD = client/libmoetier.la $(DAEMON_LINK) $(CRITERION_LIBS)
endif
endif
