# mk/hardening.mk - see Makefile.am; owned by one subsystem.
# Black-box tests of the lockdown (daemon/priv.c): the seccomp allow-list
# kills the debug daemon on a forbidden syscall (misbehave), and the `user`
# drop leaves every thread as the service user with only the kept
# capabilities.
TESTS += tests/test_misbehave.sh tests/test_priv_user.sh tests/test_io_nice.sh
EXTRA_DIST += tests/test_misbehave.sh tests/test_priv_user.sh tests/test_io_nice.sh
if HAVE_CRITERION
check_PROGRAMS += tests/test_priv
TESTS += tests/test_priv
tests_test_priv_SOURCES = tests/test_priv.c
tests_test_priv_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_priv_LDADD = $(FAULT_LINK) $(CRITERION_LIBS)
endif
