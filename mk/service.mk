# service: moetierd, its socket/ring protocol, libmoetier, moe-client, moectl, etc/.
libmoecore_a_SOURCES += core/ring.c core/ring.h include/moetier/proto.h
libmoetierd_a_SOURCES += daemon/options.c daemon/options.h daemon/server.c daemon/server.h \
	daemon/server_impl.h daemon/server_conn.c daemon/server_ring.c daemon/server_admin.c \
	daemon/server_model.c daemon/priv.c daemon/priv.h

sbin_PROGRAMS += moetierd
moetierd_SOURCES = daemon/main.c
moetierd_LDADD = $(DAEMON_LINK)

# libmoetier: its own sources (ring.c again, compiled PIC), never libmoecore.
lib_LTLIBRARIES += client/libmoetier.la
client_libmoetier_la_SOURCES = client/libmoetier.c core/ring.c core/ring.h
client_libmoetier_la_CPPFLAGS = $(AM_CPPFLAGS)
client_libmoetier_la_LDFLAGS = -version-info 0:0:0 -Wl,--version-script=$(top_srcdir)/client/libmoetier.map
EXTRA_client_libmoetier_la_DEPENDENCIES = client/libmoetier.map
# Installed as <moetier/moetier.h>, the path the headers and libmoetier.pc use.
moetierincludedir = $(includedir)/moetier
moetierinclude_HEADERS = include/moetier/moetier.h include/moetier/proto.h
pkgconfig_DATA += client/libmoetier.pc
EXTRA_DIST += client/libmoetier.map

bin_PROGRAMS += moe-client moectl
moe_client_SOURCES = client/moe-client.c client/cli.c client/cli.h
moe_client_LDADD = client/libmoetier.la $(CORE_LINK)
moectl_SOURCES = client/moectl.c client/cli.c client/cli.h
moectl_LDADD = client/libmoetier.la $(JANSSON_LIBS)

if HAVE_CRITERION
check_PROGRAMS += tests/test_server tests/test_ring
TESTS += tests/test_server tests/test_ring
tests_test_server_SOURCES = tests/test_server.c tests/testutil.h tests/daemon_probe.h
tests_test_server_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_server_LDADD = client/libmoetier.la $(FAULT_LINK) $(CRITERION_LIBS)
tests_test_ring_SOURCES = tests/test_ring.c tests/testutil.h
tests_test_ring_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_ring_LDADD = $(FAULT_LINK) $(CRITERION_LIBS)
endif

TESTS += tests/test_conf.sh tests/test_unit.sh tests/test_demo.sh
EXTRA_DIST += tests/test_conf.sh tests/test_unit.sh tests/test_demo.sh
dist_noinst_SCRIPTS += scripts/demo

noinst_PROGRAMS += bench/ring-vs-socket
bench_ring_vs_socket_SOURCES = bench/ring-vs-socket.c
bench_ring_vs_socket_LDADD = client/libmoetier.la $(DAEMON_LINK)

# The example of libmoetier(3), compiled so the page's code cannot rot.
check_PROGRAMS += client/examples/acquire
client_examples_acquire_SOURCES = client/examples/acquire.c
client_examples_acquire_LDADD = client/libmoetier.la

dist_man_MANS += doc/moetierd.8 doc/moectl.8 doc/moe-client.1 doc/libmoetier.3 doc/moetierd.conf.5

# Installed configuration: /etc/moetier/moetierd.conf and the systemd units.
moetierconfdir = $(sysconfdir)/moetier
dist_moetierconf_DATA = etc/moetierd.conf
systemdunitdir = $(prefix)/lib/systemd/system
dist_systemdunit_DATA = etc/moetierd.service etc/moetierd.socket
tmpfilesdir = $(prefix)/lib/tmpfiles.d
dist_tmpfiles_DATA = etc/tmpfiles.d/moetier.conf
sysusersdir = $(prefix)/lib/sysusers.d
dist_sysusers_DATA = etc/sysusers.d/moetier.conf

# The ctypes binding needs no build; installed for PYTHONPATH use.
moetierpydir = $(pkgdatadir)/python
dist_moetierpy_DATA = client/python/moetier.py
TESTS += tests/test_python.sh
EXTRA_DIST += tests/test_python.sh tests/test_python.py
dist_doc_DATA += doc/service.md

# --enable-debug: the same daemon on the fault-injection core (MOETIER_FAULTS).
if ENABLE_DEBUG
sbin_PROGRAMS += moetierd-debug
moetierd_debug_SOURCES = daemon/main.c
moetierd_debug_CPPFLAGS = $(AM_CPPFLAGS) -DMOETIER_FAULT_INJECTION
moetierd_debug_LDADD = $(FAULT_LINK)
# every library it links, so a parallel build waits for all of them
moetierd_debug_DEPENDENCIES = libmoetierd_fault.a libmoekernels.a libmoecore.a
endif
