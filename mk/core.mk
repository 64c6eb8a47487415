# core: what more than the daemon uses (libmoecore.a): errors/logging/I/O
# helpers, CRC32C, element types, model config; the formats, pack, ring,
# policies, predictors, prefetch and routing add theirs in their fragments.
# The layering check (scripts/layering) keeps core/ below kernels/, client/,
# tools/ and daemon/, and runs in make check.
libmoecore_a_SOURCES += core/util.c core/util.h core/crc32c.c core/crc32c.h \
	core/dtype.c core/dtype.h core/model.c core/model.h \
	core/pack.h core/trace.h

if HAVE_CRITERION
check_PROGRAMS += tests/test_core
TESTS += tests/test_core
tests_test_core_SOURCES = tests/test_core.c tests/testutil.h
tests_test_core_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_core_LDADD = $(CORE_LINK) $(CRITERION_LIBS)
endif

TESTS += tests/test_layering.sh
EXTRA_DIST += tests/test_layering.sh
dist_noinst_SCRIPTS += scripts/layering
