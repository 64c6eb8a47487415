# live: the daemon's predictor + prefetch glue, and the live-vs-moe-sim test.
libmoetierd_a_SOURCES += daemon/placement.h daemon/placement.c

TESTS += tests/live-vs-sim.sh
EXTRA_DIST += tests/live-vs-sim.sh

if HAVE_CRITERION
check_PROGRAMS += tests/test_live
TESTS += tests/test_live
tests_test_live_SOURCES = tests/test_live.c tests/testutil.h tests/tiers_testpack.h
tests_test_live_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_live_LDADD = $(FAULT_LINK) $(CRITERION_LIBS)
endif
