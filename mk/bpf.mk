# bpf: what the kernel sees of the daemon (ebpf/*.bpf.c: iolat, faults,
# runqlat), loaded by daemon/bpf.c. Each program: name.bpf.c + name.h (the map
# layout shared with user space) -> clang -target bpf against vmlinux.h (from
# the running kernel's BTF) -> bpftool gen skeleton -> name.skel.h, included
# by daemon/bpf.c. Without HAVE_BPF, bpf.c builds its "not available" stubs.
libmoetierd_a_SOURCES += daemon/bpf.c daemon/bpf.h
noinst_HEADERS += ebpf/hist.h ebpf/hist.bpf.h ebpf/iolat.h ebpf/faults.h ebpf/runqlat.h
EXTRA_DIST += ebpf/iolat.bpf.c ebpf/faults.bpf.c ebpf/runqlat.bpf.c

if HAVE_BPF
BPF_SKELS = ebpf/iolat.skel.h ebpf/faults.skel.h ebpf/runqlat.skel.h
BUILT_SOURCES += vmlinux.h $(BPF_SKELS)
CLEANFILES += vmlinux.h $(BPF_SKELS) ebpf/iolat.bpf.o ebpf/faults.bpf.o ebpf/runqlat.bpf.o
DAEMON_BPF_LIBS = $(LIBBPF_LIBS)

vmlinux.h:
	$(AM_V_GEN)$(BPFTOOL) btf dump file /sys/kernel/btf/vmlinux format c >$@.tmp && mv $@.tmp $@

BPF_DEPS = $(srcdir)/ebpf/iolat.h $(srcdir)/ebpf/faults.h $(srcdir)/ebpf/runqlat.h \
	$(srcdir)/ebpf/hist.h $(srcdir)/ebpf/hist.bpf.h vmlinux.h
BPF_CC = $(BPF_CLANG) -g -O2 -target bpf -D__TARGET_ARCH_x86 -I$(top_builddir) -I$(srcdir)/ebpf $(LIBBPF_CFLAGS)
ebpf/iolat.bpf.o: $(srcdir)/ebpf/iolat.bpf.c $(BPF_DEPS)
	@$(MKDIR_P) ebpf
	$(AM_V_GEN)$(BPF_CC) -c $(srcdir)/ebpf/iolat.bpf.c -o $@
ebpf/iolat.skel.h: ebpf/iolat.bpf.o
	$(AM_V_GEN)$(BPFTOOL) gen skeleton ebpf/iolat.bpf.o name iolat >$@.tmp && mv $@.tmp $@

ebpf/faults.bpf.o: $(srcdir)/ebpf/faults.bpf.c $(BPF_DEPS)
	@$(MKDIR_P) ebpf
	$(AM_V_GEN)$(BPF_CC) -c $(srcdir)/ebpf/faults.bpf.c -o $@
ebpf/faults.skel.h: ebpf/faults.bpf.o
	$(AM_V_GEN)$(BPFTOOL) gen skeleton ebpf/faults.bpf.o name faults >$@.tmp && mv $@.tmp $@

ebpf/runqlat.bpf.o: $(srcdir)/ebpf/runqlat.bpf.c $(BPF_DEPS)
	@$(MKDIR_P) ebpf
	$(AM_V_GEN)$(BPF_CC) -c $(srcdir)/ebpf/runqlat.bpf.c -o $@
ebpf/runqlat.skel.h: ebpf/runqlat.bpf.o
	$(AM_V_GEN)$(BPFTOOL) gen skeleton ebpf/runqlat.bpf.o name runqlat >$@.tmp && mv $@.tmp $@

# The skeletons are generated headers: name them so the objects wait for them.
daemon/bpf.$(OBJEXT) daemon/libmoetierd_fault_a-bpf.$(OBJEXT): $(BPF_SKELS)
else
DAEMON_BPF_LIBS =
endif

if HAVE_CRITERION
check_PROGRAMS += tests/test_bpf
TESTS += tests/test_bpf
tests_test_bpf_SOURCES = tests/test_bpf.c
tests_test_bpf_CPPFLAGS = $(AM_CPPFLAGS) -DMOETIER_FAULT_INJECTION
tests_test_bpf_CFLAGS = $(AM_CFLAGS) $(CRITERION_CFLAGS)
tests_test_bpf_LDADD = $(FAULT_LINK) $(CRITERION_LIBS)
endif

# bench/bpf-overhead: io-vs-fio --bpf-overhead (attached vs detached).
dist_noinst_SCRIPTS += bench/bpf-overhead
dist_doc_DATA += doc/ebpf.md

TESTS += tests/test_bpf_daemon.sh
EXTRA_DIST += tests/test_bpf_daemon.sh
