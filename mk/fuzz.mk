# mk/fuzz.mk - see Makefile.am; owned by one subsystem.
#
# Fuzzing, fault sweep, crash consistency and soak (doc/hardening.md).
#
# libFuzzer targets of the surfaces other users reach: ring entries
# (server_ring_exec), control messages (server_conn_readable), the pack
# reader (pack_open). With ./configure --enable-fuzz (clang) every library
# carries the coverage instrumentation and the targets link libFuzzer.
# In every build the same harnesses are linked with a plain main
# (tests/fuzz/fuzz_main.c) that replays the committed corpora: make check
# runs them (tests/test_fuzz_corpus.sh), so a harness always compiles with
# gcc -Werror and every seed and past crash stays a regression test.
FUZZ_DAEMON_SRC = tests/fuzz/fuzz_server.h tests/testutil.h tests/tiers_testpack.h
if ENABLE_FUZZING
noinst_PROGRAMS += tests/fuzz/fuzz_ring tests/fuzz/fuzz_ctl tests/fuzz/fuzz_pack
tests_fuzz_fuzz_ring_SOURCES = tests/fuzz/fuzz_ring.c $(FUZZ_DAEMON_SRC)
tests_fuzz_fuzz_ring_CFLAGS = $(AM_CFLAGS) $(FUZZ_CFLAGS)
tests_fuzz_fuzz_ring_LDFLAGS = $(AM_LDFLAGS) $(FUZZ_CFLAGS)
tests_fuzz_fuzz_ring_LDADD = $(DAEMON_LINK)
tests_fuzz_fuzz_ctl_SOURCES = tests/fuzz/fuzz_ctl.c $(FUZZ_DAEMON_SRC)
tests_fuzz_fuzz_ctl_CFLAGS = $(AM_CFLAGS) $(FUZZ_CFLAGS)
tests_fuzz_fuzz_ctl_LDFLAGS = $(AM_LDFLAGS) $(FUZZ_CFLAGS)
tests_fuzz_fuzz_ctl_LDADD = $(DAEMON_LINK)
tests_fuzz_fuzz_pack_SOURCES = tests/fuzz/fuzz_pack.c
tests_fuzz_fuzz_pack_CFLAGS = $(AM_CFLAGS) $(FUZZ_CFLAGS)
tests_fuzz_fuzz_pack_LDFLAGS = $(AM_LDFLAGS) $(FUZZ_CFLAGS)
tests_fuzz_fuzz_pack_LDADD = $(CORE_LINK)
endif

# Corpus replayers (every build).
check_PROGRAMS += tests/fuzz/replay_ring tests/fuzz/replay_ctl tests/fuzz/replay_pack
tests_fuzz_replay_ring_SOURCES = tests/fuzz/fuzz_ring.c tests/fuzz/fuzz_main.c $(FUZZ_DAEMON_SRC)
tests_fuzz_replay_ring_LDADD = $(DAEMON_LINK)
tests_fuzz_replay_ctl_SOURCES = tests/fuzz/fuzz_ctl.c tests/fuzz/fuzz_main.c $(FUZZ_DAEMON_SRC)
tests_fuzz_replay_ctl_LDADD = $(DAEMON_LINK)
tests_fuzz_replay_pack_SOURCES = tests/fuzz/fuzz_pack.c tests/fuzz/fuzz_main.c
tests_fuzz_replay_pack_LDADD = $(CORE_LINK)
TESTS += tests/test_fuzz_corpus.sh
EXTRA_DIST += tests/test_fuzz_corpus.sh bench/fuzz-smoke tests/fuzz/ring.dict tests/fuzz/ctl.dict \
	tests/fuzz/pack.dict tests/fuzz/corpus tests/fuzz/mkcorpus.py

# Soak: 64 clients, random acquire/route/compute/prefetch/release against one
# daemon, every byte checked (tests/soak.c); 20 s in make check, longer with
# SOAK_SECONDS.
check_PROGRAMS += tests/soak
tests_soak_SOURCES = tests/soak.c
tests_soak_LDADD = client/libmoetier.la $(KERNELS_LINK)
TESTS += tests/test_soak.sh
EXTRA_DIST += tests/test_soak.sh

# Fault sweep: every fault point x transient/persistent x the n-th hit, a
# whole daemon in-process each time (FAULTSWEEP_FULL=1: n uncapped).
if HAVE_CRITERION
check_PROGRAMS += tests/test_faultsweep
TESTS += tests/test_faultsweep
tests_test_faultsweep_SOURCES = tests/test_faultsweep.c tests/testutil.h tests/tiers_testpack.h
tests_test_faultsweep_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_faultsweep_LDADD = client/libmoetier.la $(FAULT_LINK) $(CRITERION_LIBS)
endif

# Crash consistency: kill -9 of moetierd under load and of moe-pack convert,
# then every expert valid or refused, never served half-written.
TESTS += tests/test_crash.sh
EXTRA_DIST += tests/test_crash.sh
