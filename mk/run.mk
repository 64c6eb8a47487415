# run: moe-run, the client that decodes a real model through the daemon
# (client/run/: model, attention, tokenizer, sampler, experts, runner).
# The forward pass is a library of its own so that tests link it; the
# tokenizer and sampler come from mk/tokenizer.mk ($(TOK_LINK)).
noinst_LIBRARIES += client/run/libmoerun.a
client_run_libmoerun_a_SOURCES = client/run/model.c client/run/model.h client/run/attention.c \
	client/run/attention.h client/run/experts.c client/run/experts.h client/run/runner.c client/run/runner.h \
	client/run/simcache.c client/run/simcache.h client/run/gpu.c client/run/gpu.h

bin_PROGRAMS += moe-run
moe_run_SOURCES = client/run/moe-run.c
moe_run_LDADD = client/run/libmoerun.a client/libmoetier.la $(TOK_LINK) $(KERNELS_LINK)
dist_man_MANS += doc/moe-run.1

# Against llama.cpp (skips without tests/llama-oracle), through the daemon,
# from GGUF- vs safetensors-made packs, and on the trained model (skips until
# models/ has it).
TESTS += tests/test_moe_run.sh tests/test_moe_run_daemon.sh tests/test_moe_run_formats.sh tests/test_moe_run_trained.sh \
	tests/test_moe_run_corrupt.sh tests/test_moe_run_gpu.sh
EXTRA_DIST += tests/test_moe_run.sh tests/test_moe_run_daemon.sh tests/test_moe_run_formats.sh \
	tests/test_moe_run_trained.sh tests/test_moe_run_corrupt.sh tests/test_moe_run_gpu.sh \
	tests/logits-compare.py
# moe-run --gpu on a real GPU (the device path against the host; exits 77
# without one): run by scripts/gpu-check, not by make check
EXTRA_DIST += tests/moe-run-gpu.sh
# ...and without one: the daemon's VMM arena and moe-run's device path on a
# stand-in libcuda.so.1 (tests/fake_libcuda.c, loaded through
# MOETIER_LIBCUDA; needs cuda.h for its types, skips without it)
TESTS += tests/test_moe_run_fakegpu.sh
EXTRA_DIST += tests/test_moe_run_fakegpu.sh tests/fake_libcuda.c
if HAVE_CUDA
check_LTLIBRARIES = tests/libfakecuda.la
tests_libfakecuda_la_SOURCES = tests/fake_libcuda.c
# a shared object of its own (-rpath: libtool builds check libraries as
# convenience archives otherwise), dlopen'd by path
tests_libfakecuda_la_LDFLAGS = -module -avoid-version -shared -rpath /nowhere
tests_libfakecuda_la_LIBADD = -lm
endif

if HAVE_CRITERION
# (not tests/test_moe_run: its log would be test_moe_run.sh's)
check_PROGRAMS += tests/test_moe_run_dense
TESTS += tests/test_moe_run_dense
tests_test_moe_run_dense_SOURCES = tests/test_moe_run_dense.c
tests_test_moe_run_dense_CPPFLAGS = $(AM_CPPFLAGS) -I$(top_srcdir)/client/run
tests_test_moe_run_dense_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_moe_run_dense_LDADD = client/run/libmoerun.a $(KERNELS_LINK) $(CRITERION_LIBS)
# the simulated cache of --sim-cache (bench/fidelity's hit rates)
check_PROGRAMS += tests/test_simcache
TESTS += tests/test_simcache
tests_test_simcache_SOURCES = tests/test_simcache.c
tests_test_simcache_CPPFLAGS = $(AM_CPPFLAGS) -I$(top_srcdir)/client/run
tests_test_simcache_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_simcache_LDADD = client/run/libmoerun.a $(KERNELS_LINK) $(CRITERION_LIBS)
endif
