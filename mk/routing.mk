# mk/routing.mk - see Makefile.am; owned by one subsystem.
# routing: ROUTE through the daemon for every family, cache-aware ROUTE
# (core/route.c's rules), the Python binding's route().
check_PROGRAMS += tests/test_route_daemon
TESTS += tests/test_route_daemon tests/test_python_route.sh
tests_test_route_daemon_SOURCES = tests/test_route_daemon.c tests/testutil.h tests/daemon_probe.h tests/route_ref.h
tests_test_route_daemon_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_route_daemon_LDADD = client/libmoetier.la $(CORE_LINK) $(CRITERION_LIBS)
EXTRA_DIST += tests/test_python_route.sh tests/test_python_route.py doc/routing.md
