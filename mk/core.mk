# Shared basics: errors/logging/I/O helpers, CRC32C, element types, model config.
libmoecore_a_SOURCES += daemon/util.c daemon/util.h daemon/crc32c.c daemon/crc32c.h \
	daemon/dtype.c daemon/dtype.h daemon/model.c daemon/model.h \
	daemon/pack.h daemon/trace.h

if HAVE_CRITERION
check_PROGRAMS += tests/test_core
TESTS += tests/test_core
tests_test_core_SOURCES = tests/test_core.c tests/testutil.h
tests_test_core_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_core_LDADD = $(FAULT_LINK) $(CRITERION_LIBS)
endif
