/* test_priv.c - daemon/priv.c in a forked child (both calls are one-way):
 * the seccomp allow-list lets the serving loop's calls through, kills
 * (SIGSYS) what it forbids, answers clone3 and io_uring_setup ENOSYS; and
 * priv_drop reaches threads started before it, says which thread it cannot
 * reach (one that masks every signal) and leaves it as it was. */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "priv.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SANITIZER 1
#else
#define SANITIZER 0
#endif

/* Runs fn in a child after priv_lockdown; returns the wait status. The
 * child exits 0 when fn returned 0, 10 + the value otherwise. */
static int in_locked_child(int (*fn)(void))
{
	fflush(NULL);
	pid_t p = fork();
	cr_assert(p >= 0);
	if (p == 0) {
		struct moe_error err = { "" };
		struct priv_needs needs = { .cuda = false };
		if (priv_lockdown(true, &needs, &err)) {
			fprintf(stderr, "lockdown: %s\n", err.msg);
			_exit(2);
		}
		int r = fn();
		_exit(r ? 10 + r : 0);
	}
	int st;
	cr_assert_eq(waitpid(p, &st, 0), p);
	return st;
}

static void expect_killed(int st, const char *what)
{
	cr_expect(WIFSIGNALED(st) && WTERMSIG(st) == SIGSYS, "%s: not killed by SIGSYS (%s %d)", what,
		  WIFSIGNALED(st) ? "signal" : "exit", WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
}

static void expect_ok(int st, const char *what)
{
	cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "%s: %s %d", what, WIFSIGNALED(st) ? "signal" : "exit",
		  WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
}

static void *idle_thread(void *arg)
{
	(void)arg;
	return NULL;
}

/* What the daemon does after the filter: threads, memfds, the event loop's
 * fds, an AF_UNIX socket, files. */
static int serving_calls(void)
{
	pthread_t t;
	if (pthread_create(&t, NULL, idle_thread, NULL) || pthread_join(t, NULL))
		return 1;
	int fd = memfd_create("t", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0 || ftruncate(fd, 4096) || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK))
		return 2;
	close(fd);
	int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		return 3;
	close(s);
	fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
	char buf[64];
	if (fd < 0 || read(fd, buf, sizeof(buf)) <= 0)
		return 4;
	close(fd);
	void *m = malloc(1 << 22); /* mmap */
	if (!m)
		return 5;
	free(m);
	return 0;
}

static int probe_clone3(void)
{
	errno = 0;
	long r = syscall(SYS_clone3, NULL, 0);
	return r == -1 && errno == ENOSYS ? 0 : 1;
}

static int probe_uring(void)
{
	errno = 0;
	long r = syscall(SYS_io_uring_setup, 4, NULL);
	return r == -1 && errno == ENOSYS ? 0 : 1;
}

static int probe_bpf_read(void)
{
	/* A map lookup on a bad fd: allowed through, so EBADF. */
	union bpf_attr a;
	memset(&a, 0, sizeof(a));
	a.map_fd = (uint32_t)-1;
	errno = 0;
	long r = syscall(SYS_bpf, BPF_MAP_LOOKUP_ELEM, &a, sizeof(a));
	return r == -1 && errno == EBADF ? 0 : 1;
}

static int probe_inet(void)
{
	return socket(AF_INET, SOCK_STREAM, 0) >= 0 ? 0 : 1;
}

static int probe_fork(void)
{
	pid_t p = fork();
	if (p == 0)
		_exit(0);
	return p > 0 ? 0 : 1;
}

static int probe_execve(void)
{
	char *argv[] = { "x", NULL };
	execve("/nonexistent/x", argv, argv + 1);
	return errno == EPERM ? 0 : 1;
}

static int probe_bpf_load(void)
{
	union bpf_attr a;
	memset(&a, 0, sizeof(a));
	syscall(SYS_bpf, BPF_PROG_LOAD, &a, sizeof(a));
	return 0;
}

static int probe_ptrace(void)
{
	syscall(SYS_ptrace, 0 /* PTRACE_TRACEME */, 0, 0, 0);
	return 0;
}

Test(priv, allow_list_serves_and_kills, .timeout = 60)
{
	expect_ok(in_locked_child(serving_calls), "the serving loop's calls");
	expect_ok(in_locked_child(probe_clone3), "clone3 answered ENOSYS");
	expect_ok(in_locked_child(probe_uring), "io_uring_setup answered ENOSYS");
	expect_ok(in_locked_child(probe_bpf_read), "bpf map lookup");
	expect_killed(in_locked_child(probe_inet), "socket(AF_INET)");
	expect_killed(in_locked_child(probe_bpf_load), "bpf(BPF_PROG_LOAD)");
	if (SANITIZER) {
		/* LeakSanitizer needs clone and ptrace; its symbolizer gets EPERM. */
		expect_ok(in_locked_child(probe_execve), "execve answered EPERM under a sanitizer");
	} else {
		int st = in_locked_child(probe_execve);
		expect_killed(st, "execve");
		expect_killed(in_locked_child(probe_fork), "fork");
		expect_killed(in_locked_child(probe_ptrace), "ptrace");
	}
}

/* ---- priv_drop reaches every thread ------------------------------------- */

static atomic_int go;

static void *plain_thread(void *arg)
{
	(void)arg;
	while (!atomic_load(&go))
		usleep(1000);
	return NULL;
}

static void *masked_thread(void *arg)
{
	sigset_t all;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	return plain_thread(arg);
}

static uint64_t cap_of(pid_t tid, const char *key)
{
	char path[64], line[256];
	uint64_t v = ~0ull;
	snprintf(path, sizeof(path), "/proc/self/task/%d/status", (int)tid);
	FILE *f = fopen(path, "r");
	if (!f)
		return v;
	size_t kl = strlen(key);
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, key, kl) && line[kl] == ':')
			v = strtoull(line + kl + 1, NULL, 16);
	fclose(f);
	return v;
}

struct tid_arg {
	atomic_int tid;
	bool masked;
};

static void *tid_thread(void *arg)
{
	struct tid_arg *a = arg;
	atomic_store(&a->tid, (int)syscall(SYS_gettid));
	return a->masked ? masked_thread(NULL) : plain_thread(NULL);
}

Test(priv, drop_reaches_threads_started_before, .timeout = 60)
{
	if (geteuid() != 0)
		cr_skip_test("needs root (capabilities to drop)");
	uint64_t full = cap_of((pid_t)syscall(SYS_gettid), "CapEff");
	const uint64_t keep = (1ull << 14) | (1ull << 23) | (1ull << 38) | (1ull << 39);
	fflush(NULL);
	pid_t p = fork();
	cr_assert(p >= 0);
	if (p == 0) {
		struct tid_arg a[3] = { { 0, false }, { 0, false }, { 0, true } };
		pthread_t t[3];
		for (int i = 0; i < 3; i++)
			if (pthread_create(&t[i], NULL, tid_thread, &a[i]))
				_exit(2);
		for (int i = 0; i < 3; i++)
			while (!atomic_load(&a[i].tid))
				usleep(1000);
		usleep(20000); /* the masked thread has masked */
		struct moe_error err = { "" };
		char kept[256];
		if (priv_drop(NULL, kept, sizeof(kept), &err)) {
			fprintf(stderr, "priv_drop: %s\n", err.msg);
			_exit(3);
		}
		int bad = 0;
		pid_t self = (pid_t)syscall(SYS_gettid);
		if (cap_of(self, "CapEff") != (full & keep) || cap_of(self, "CapBnd") != (full & keep))
			bad |= 1;
		for (int i = 0; i < 2; i++)
			if (cap_of(a[i].tid, "CapEff") != (full & keep) || cap_of(a[i].tid, "CapPrm") != (full & keep) ||
			    cap_of(a[i].tid, "CapBnd") != (full & keep))
				bad |= 2;
		/* Unreachable, and said so (stderr): left as it was. */
		if (cap_of(a[2].tid, "CapEff") != full)
			bad |= 4;
		atomic_store(&go, 1);
		for (int i = 0; i < 3; i++)
			pthread_join(t[i], NULL);
		_exit(bad ? 10 + bad : 0);
	}
	int st;
	cr_assert_eq(waitpid(p, &st, 0), p);
	cr_assert(WIFEXITED(st), "child died of signal %d", WTERMSIG(st));
	int code = WEXITSTATUS(st);
	cr_expect_eq(code, 0, "%s%s%s (exit %d)", code >= 10 && ((code - 10) & 1) ? "this thread kept too much; " : "",
		     code >= 10 && ((code - 10) & 2) ? "a thread started before the drop kept too much; " : "",
		     code >= 10 && ((code - 10) & 4) ? "the masked thread changed" : "", code);
	cr_expect_neq(full & ~keep, 0, "the test process had nothing to drop");
}
