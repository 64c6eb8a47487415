# tiers: NVMe engine, host arena, residency cache, fault injection, stats.
libmoetierd_a_SOURCES += daemon/fault.c daemon/fault.h daemon/stats.c daemon/stats.h \
	daemon/tier_host.c daemon/tier_host.h daemon/tier_nvme.c daemon/tier_nvme.h \
	daemon/cache.c daemon/cache.h daemon/cache_impl.h daemon/cache_io.c

if HAVE_CRITERION
check_PROGRAMS += tests/test_cache tests/test_tier_nvme tests/test_tier_host tests/test_fault
TESTS += tests/test_cache tests/test_tier_nvme tests/test_tier_host tests/test_fault
tests_test_cache_SOURCES = tests/test_cache.c tests/testutil.h tests/tiers_testpack.h
tests_test_cache_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_cache_LDADD = $(FAULT_LINK) $(CRITERION_LIBS)
tests_test_tier_nvme_SOURCES = tests/test_tier_nvme.c tests/testutil.h
tests_test_tier_nvme_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_tier_nvme_LDADD = $(FAULT_LINK) $(CRITERION_LIBS)
tests_test_tier_host_SOURCES = tests/test_tier_host.c tests/testutil.h
tests_test_tier_host_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_tier_host_LDADD = $(FAULT_LINK) $(CRITERION_LIBS)
tests_test_fault_SOURCES = tests/test_fault.c tests/testutil.h tests/tiers_testpack.h
tests_test_fault_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_fault_LDADD = $(FAULT_LINK) $(CRITERION_LIBS)
endif

# Benchmark: tier_nvme against fio on the same expert extents.
noinst_PROGRAMS += bench/io-vs-fio
bench_io_vs_fio_SOURCES = bench/io-vs-fio.c
bench_io_vs_fio_LDADD = $(DAEMON_LINK)
# Benchmarks are not installed, so neither are their pages.
EXTRA_DIST += doc/io-vs-fio.1
dist_doc_DATA += doc/tiers.md

# The Prometheus exposition follows the conventions (tests/test_metrics.c).
if HAVE_CRITERION
check_PROGRAMS += tests/test_metrics
TESTS += tests/test_metrics
tests_test_metrics_SOURCES = tests/test_metrics.c
tests_test_metrics_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_metrics_LDADD = $(FAULT_LINK) $(CRITERION_LIBS)
endif
TESTS += tests/test_metrics_daemon.sh
EXTRA_DIST += tests/test_metrics_daemon.sh
