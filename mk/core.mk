# Shared basics: errors/logging/I/O helpers, CRC32C, element types, model config.
libmoecore_a_SOURCES += core/util.c core/util.h core/crc32c.c core/crc32c.h \
	core/dtype.c core/dtype.h core/model.c core/model.h \
	core/pack.h core/trace.h

if HAVE_CRITERION
check_PROGRAMS += tests/test_core
TESTS += tests/test_core
tests_test_core_SOURCES = tests/test_core.c tests/testutil.h
tests_test_core_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_core_LDADD = $(FAULT_LINK) $(CRITERION_LIBS)
endif
