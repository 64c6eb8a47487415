/* priv.c - capability drop, no_new_privs, seccomp (priv.h). */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <grp.h>
#include <linux/bpf.h>
#include <linux/capability.h>
#include <linux/perf_event.h>
#include <pwd.h>
#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/capability.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "priv.h"

static int lookup_user(const char *user, uid_t *uid, gid_t *gid)
{
	struct passwd pw, *res = NULL;
	char buf[4096];
	char *end;
	unsigned long v = strtoul(user, &end, 10);
	if (*user && !*end) {
		*uid = (uid_t)v;
		*gid = (gid_t)v;
		if (getpwuid_r(*uid, &pw, buf, sizeof(buf), &res) == 0 && res)
			*gid = res->pw_gid;
		return 0;
	}
	if (getpwnam_r(user, &pw, buf, sizeof(buf), &res) || !res)
		return -ENOENT;
	*uid = res->pw_uid;
	*gid = res->pw_gid;
	return 0;
}

/* Capabilities, the bounding set and PR_SET_KEEPCAPS belong to each thread,
 * and threads started before the drop (the cache's I/O thread, the emulated
 * GPU tier's workers) would keep root's full sets. So every change is made
 * by every thread: this one directly, the others in a signal handler (what
 * libpsx does). setgroups/setresgid/setresuid need none of this: glibc
 * applies them to all threads. */
enum priv_step { STEP_BOUND, STEP_KEEPCAPS_ON, STEP_KEEPCAPS_OFF, STEP_CAPSET };

static struct {
	enum priv_step step;
	uint64_t keep; /* capability mask kept */
	atomic_int done, failed;
} xs;

static int run_step(void)
{
	switch (xs.step) {
	case STEP_BOUND:
		for (int c = 0; c <= CAP_LAST_CAP; c++)
			if (!(xs.keep >> c & 1) && prctl(PR_CAPBSET_READ, c, 0, 0, 0) == 1 &&
			    prctl(PR_CAPBSET_DROP, c, 0, 0, 0))
				return -errno;
		return 0;
	case STEP_KEEPCAPS_ON:
	case STEP_KEEPCAPS_OFF:
		return prctl(PR_SET_KEEPCAPS, xs.step == STEP_KEEPCAPS_ON, 0, 0, 0) ? -errno : 0;
	case STEP_CAPSET: {
		struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
		struct __user_cap_data_struct d[2] = {
			{ (uint32_t)xs.keep, (uint32_t)xs.keep, 0 },
			{ (uint32_t)(xs.keep >> 32), (uint32_t)(xs.keep >> 32), 0 },
		};
		return syscall(SYS_capset, &hdr, d) ? -errno : 0;
	}
	}
	return -EINVAL;
}

static void step_handler(int sig)
{
	int saved = errno;
	(void)sig;
	if (run_step())
		atomic_fetch_add(&xs.failed, 1);
	atomic_fetch_add(&xs.done, 1);
	errno = saved;
}

#define PRIV_SIGNAL (SIGRTMIN + 3)

/* Whether thread tid blocks PRIV_SIGNAL (a library thread that masked every
 * signal, e.g. a GPU driver's): it could never answer. */
static bool blocks_signal(pid_t tid, char *comm, size_t comm_len)
{
	char path[64], line[256];
	bool blocked = false;
	snprintf(comm, comm_len, "?");
	snprintf(path, sizeof(path), "/proc/self/task/%d/status", (int)tid);
	FILE *f = fopen(path, "re");
	if (!f)
		return false;
	while (fgets(line, sizeof(line), f)) {
		if (!strncmp(line, "Name:", 5))
			snprintf(comm, comm_len, "%.*s", (int)strcspn(line + 6, "\n"), line + 6);
		else if (!strncmp(line, "SigBlk:", 7))
			blocked = strtoull(line + 7, NULL, 16) >> (PRIV_SIGNAL - 1) & 1;
	}
	fclose(f);
	return blocked;
}

/* Runs `step` on every thread of the process; 0, or the first error. */
static int on_every_thread(enum priv_step step, const char *what, struct moe_error *err)
{
	static const char *const names[] = { "dropping the bounding set", "PR_SET_KEEPCAPS", "PR_SET_KEEPCAPS",
					     "capset" };
	xs.step = step;
	atomic_store(&xs.done, 0);
	atomic_store(&xs.failed, 0);
	int rc = run_step();
	if (rc)
		return moe_error_set(err, rc, "%s (%s): %s", names[step], what, strerror(-rc));
	struct sigaction sa = { .sa_handler = step_handler, .sa_flags = SA_RESTART }, old;
	sigfillset(&sa.sa_mask);
	if (sigaction(PRIV_SIGNAL, &sa, &old))
		return moe_error_set(err, -errno, "sigaction: %s", strerror(errno));
	DIR *d = opendir("/proc/self/task");
	if (!d) {
		rc = moe_error_set(err, -errno, "/proc/self/task: %s", strerror(errno));
		sigaction(PRIV_SIGNAL, &old, NULL);
		return rc;
	}
	pid_t self = (pid_t)syscall(SYS_gettid), pid = getpid();
	int sent = 0;
	struct dirent *de;
	while ((de = readdir(d))) {
		pid_t tid = (pid_t)atoi(de->d_name);
		char comm[32];
		if (tid <= 0 || tid == self)
			continue;
		/* None of ours masks it (server_block_signals blocks TERM, INT,
		 * HUP); a library thread that masks every signal cannot be made
		 * to drop: said, not waited for. A thread being started masks
		 * every signal too, for a moment (glibc's pthread_create): wait
		 * for that to pass (up to 200 ms) before taking it for one, or it
		 * misses a step and keeps root's bounding set, or loses its
		 * capabilities at the user switch (seen under ASan). */
		bool blocked = blocks_signal(tid, comm, sizeof(comm));
		for (int ms = 0; blocked && ms < 200; ms++) {
			struct timespec t = { 0, 1000000 };
			nanosleep(&t, NULL);
			blocked = blocks_signal(tid, comm, sizeof(comm));
		}
		if (blocked) {
			if (step == STEP_CAPSET)
				moe_warn("thread %d (%s) blocks all signals: it keeps the capabilities it started with",
					 (int)tid, comm);
			continue;
		}
		if (syscall(SYS_tgkill, pid, tid, PRIV_SIGNAL) == 0)
			sent++;
		else if (errno != ESRCH)
			rc = -errno;
	}
	closedir(d);
	/* Each thread answers at its next return to user space; one that
	 * never does (the signal blocked) fails the start-up rather than
	 * leaving a thread privileged. */
	for (int ms = 0; ms < 5000 && atomic_load(&xs.done) < sent; ms++) {
		struct timespec t = { 0, 1000000 };
		nanosleep(&t, NULL);
	}
	int done = atomic_load(&xs.done), failed = atomic_load(&xs.failed);
	sigaction(PRIV_SIGNAL, &old, NULL);
	if (rc)
		return moe_error_set(err, rc, "%s (%s): signalling a thread: %s", names[step], what, strerror(-rc));
	if (done < sent)
		return moe_error_set(err, -ETIMEDOUT, "%s (%s): %d of %d threads did not answer", names[step], what,
				     sent - done, sent);
	if (failed)
		return moe_error_set(err, -EPERM, "%s (%s) failed on %d of %d other threads", names[step], what,
				     failed, sent);
	return 0;
}

int priv_drop(const char *user, char *kept, size_t kept_len, struct moe_error *err)
{
	static const cap_value_t want[] = PRIV_KEEP_CAPS;
	uint64_t keep = 0;
	int rc = 0;
	cap_t cur = cap_get_proc();
	if (!cur)
		return moe_error_set(err, -errno, "cap_get_proc: %s", strerror(errno));
	/* Asking for a capability we lack would fail the whole capset. */
	for (size_t i = 0; i < MOE_ARRAY_SIZE(want); i++) {
		cap_flag_value_t v = CAP_CLEAR;
		if (CAP_IS_SUPPORTED(want[i]) && cap_get_flag(cur, want[i], CAP_PERMITTED, &v) == 0 && v == CAP_SET)
			keep |= 1ull << want[i];
	}
	cap_flag_value_t setpcap = CAP_CLEAR;
	cap_get_flag(cur, CAP_SETPCAP, CAP_EFFECTIVE, &setpcap);
	cap_free(cur);
	xs.keep = keep;

	/* The bounding set first, while CAP_SETPCAP is still effective (a
	 * switch of user clears the effective set). */
	if (setpcap == CAP_SET && (rc = on_every_thread(STEP_BOUND, "bounding set", err)))
		return rc;
	if (user && *user) {
		uid_t uid;
		gid_t gid;
		if (lookup_user(user, &uid, &gid))
			return moe_error_set(err, -ENOENT, "user '%s' does not exist", user);
		if ((rc = on_every_thread(STEP_KEEPCAPS_ON, user, err)))
			return rc;
		if (setgroups(0, NULL) || setresgid(gid, gid, gid) || setresuid(uid, uid, uid))
			return moe_error_set(err, -errno, "switching to user %s: %s", user, strerror(errno));
		if ((rc = on_every_thread(STEP_KEEPCAPS_OFF, user, err)))
			return rc;
	}
	if ((rc = on_every_thread(STEP_CAPSET, "keeping only PRIV_KEEP_CAPS", err)))
		return rc;
	if (kept) {
		cap_t nc = cap_get_proc();
		char *t = nc ? cap_to_text(nc, NULL) : NULL;
		snprintf(kept, kept_len, "%s", t && *t ? t : "=");
		cap_free(t);
		cap_free(nc);
	}
	return 0;
}

/* The allow-list. Everything else kills the whole process (SIGSYS), so a
 * compromised daemon cannot open a network socket, run a program, trace
 * another process or load BPF programs; the kernel logs each kill to the
 * audit log (type=SECCOMP, with the syscall number). Grouped by who needs
 * it, so a new need names its reason. */
static const char *const allow_always[] = {
	/* memory (malloc, thread stacks, arenas, the emulated GPU tier's
	 * hole punching, client rings) */
	"brk", "mmap", "munmap", "mprotect", "mremap", "madvise", "mlock", "munlock", "mlock2",
	"mbind", "get_mempolicy", "set_mempolicy", "memfd_create", "ftruncate", "fallocate",
	/* files and descriptors: the pack (pread without io_uring), /proc/self/fd
	 * re-opens of exported memfds, stats replies, jansson's /dev/urandom */
	"read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2",
	"pwritev2", "open", "openat", "close", "close_range", "fstat", "newfstatat", "stat", "lstat",
	"statx", "lseek", "fcntl", "dup", "dup3", "fsync", "fdatasync", "unlink", "unlinkat",
	"readlink", "readlinkat", "getdents64", "access", "faccessat", "faccessat2", "fadvise64",
	/* the control socket and client fds (SCM_RIGHTS); socket() itself is
	 * AF_UNIX only, see below (sd_notify) */
	"accept", "accept4", "recvmsg", "sendmsg", "recvfrom", "sendto", "getsockopt", "setsockopt",
	"shutdown", "getsockname", "getpeername", "connect",
	/* the event loop */
	"epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll",
	"eventfd2", "signalfd4", "timerfd_create", "timerfd_settime", "timerfd_gettime",
	/* io_uring on the rings made at start-up (their operations do not pass
	 * through seccomp) */
	"io_uring_enter", "io_uring_register",
	/* threads (compute workers, the ring thread): clone is limited to
	 * threads below */
	"futex", "futex_waitv", "set_robust_list", "get_robust_list", "rseq", "sched_yield",
	"sched_getaffinity", "sched_setaffinity", "sched_getparam", "sched_getscheduler",
	"sched_setscheduler", "sched_setparam", "sched_get_priority_max", "sched_get_priority_min",
	"getpriority", "setpriority", "membarrier",
	/* signals, exit, abort() */
	"rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigtimedwait", "sigaltstack",
	"restart_syscall", "tgkill", "exit", "exit_group",
	/* time, identity, limits (logging, stats, sysconf) */
	"clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time",
	"getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid",
	"getresgid", "getgroups", "getrandom", "getrusage", "getrlimit", "prlimit64", "sysinfo",
	"uname", "getcpu",
};

/* The real CUDA driver (gpu-backend vmm, uvm or auto) talks to
 * /dev/nvidia* through ioctl and runs its own threads. */
static const char *const allow_cuda[] = {
	"ioctl", "pipe2",
};

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define PRIV_SANITIZER 1
/* Sanitizer runtimes at exit and in reports: LeakSanitizer stops the world
 * from a clone()d tracer task with ptrace and waits for it, reading
 * /proc/self/task (with the old getdents on x86_64) and /proc/self/maps. */
static const char *const allow_sanitizer[] = {
	"clone", "ptrace", "wait4", "waitid", "prctl", "kill", "pipe", "pipe2", "dup2", "sched_getaffinity",
	"getdents", "getdents64", "readlink", "setpgid", "personality",
};
#endif

static int add_rules(scmp_filter_ctx ctx, const char *const *names, size_t n, uint32_t action)
{
	for (size_t i = 0; i < n; i++) {
		int nr = seccomp_syscall_resolve_name(names[i]);
		if (nr == __NR_SCMP_ERROR)
			continue; /* not on this architecture (open, stat... on arm64) */
		int rc = seccomp_rule_add(ctx, action, nr, 0);
		if (rc && rc != -EEXIST)
			return rc;
	}
	return 0;
}

int priv_lockdown(bool use_seccomp, const struct priv_needs *needs, struct moe_error *err)
{
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		return moe_error_set(err, -errno, "PR_SET_NO_NEW_PRIVS: %s", strerror(errno));
	if (!use_seccomp)
		return 0;
	scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_KILL_PROCESS);
	int rc = 0;
	if (!ctx)
		return moe_error_set(err, -ENOMEM, "seccomp_init failed");
	rc = add_rules(ctx, allow_always, MOE_ARRAY_SIZE(allow_always), SCMP_ACT_ALLOW);
	if (!rc && needs && needs->cuda)
		rc = add_rules(ctx, allow_cuda, MOE_ARRAY_SIZE(allow_cuda), SCMP_ACT_ALLOW);
#ifdef PRIV_SANITIZER
	if (!rc)
		rc = add_rules(ctx, allow_sanitizer, MOE_ARRAY_SIZE(allow_sanitizer), SCMP_ACT_ALLOW);
	/* The symbolizer is run with execve: refused, the report stays
	 * unsymbolised but complete. */
	if (!rc)
		rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(execve), 0);
#else
	/* Threads only: a process (fork) is a kill. */
	if (!rc)
		rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(clone), 1,
				      SCMP_A0(SCMP_CMP_MASKED_EQ, CLONE_THREAD, CLONE_THREAD));
#endif
	/* Probed by libraries, answered as on an old kernel: glibc's
	 * pthread_create falls back from clone3 (whose flags seccomp cannot
	 * see) to clone, and nothing creates an io_uring after start-up. */
	if (!rc)
		rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0);
	if (!rc)
		rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(io_uring_setup), 0);
	/* sd_notify's datagram socket; no other family. */
	if (!rc)
		rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(socket), 1, SCMP_A0(SCMP_CMP_EQ, AF_UNIX));
	/* eBPF: reading the maps of the programs loaded at start-up, nothing
	 * else (no loads, no map updates). */
	static const int bpf_cmds[] = { BPF_MAP_LOOKUP_ELEM, BPF_MAP_GET_NEXT_KEY, BPF_OBJ_GET_INFO_BY_FD,
					BPF_MAP_LOOKUP_BATCH };
	for (size_t i = 0; i < MOE_ARRAY_SIZE(bpf_cmds) && !rc; i++)
		rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(bpf), 1, SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t)bpf_cmds[i]));
	/* Detaching perf-event-based BPF links at exit, and isatty() of a
	 * stdio stream; any other ioctl (without CUDA) is a kill. */
	if (!rc && !(needs && needs->cuda)) {
		static const unsigned long ioctls[] = { PERF_EVENT_IOC_DISABLE, TCGETS };
		for (size_t i = 0; i < MOE_ARRAY_SIZE(ioctls) && !rc; i++)
			rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(ioctl), 1,
					      SCMP_A1(SCMP_CMP_EQ, (scmp_datum_t)ioctls[i]));
	}
	if (!rc)
		rc = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_TSYNC, 1);
	if (!rc)
		rc = seccomp_load(ctx);
	seccomp_release(ctx);
	if (rc)
		return moe_error_set(err, rc < 0 ? rc : -EINVAL, "seccomp: %s", strerror(rc < 0 ? -rc : EINVAL));
	return 0;
}

const char *priv_seccomp_variant(void)
{
#ifdef PRIV_SANITIZER
	return "allow-list + sanitizer runtime";
#else
	return "allow-list";
#endif
}

#ifdef MOETIER_FAULT_INJECTION
int priv_misbehave(const char *what, struct moe_error *err)
{
	long r;
	if (!strcmp(what, "socket")) {
		/* A network socket: socket() is allowed for AF_UNIX only. */
		r = syscall(SYS_socket, AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (r >= 0)
			close((int)r);
	} else if (!strcmp(what, "execve")) {
		/* A program that does not exist: harmless where allowed. */
		char *const argv[] = { "moetierd-misbehave", NULL };
		r = syscall(SYS_execve, "/nonexistent/moetierd-misbehave", argv, argv + 1);
	} else if (!strcmp(what, "syslog")) {
		/* A call on no list at all (the kernel log's size: harmless). */
		r = syscall(SYS_syslog, 10 /* SYSLOG_ACTION_SIZE_BUFFER */, NULL, 0);
	} else {
		return moe_error_set(err, -EINVAL, "misbehave: unknown probe '%s' (socket, execve, syslog)", what);
	}
	moe_warn("misbehave: %s was not stopped by seccomp (returned %ld, %s)", what, r,
		 r < 0 ? strerror(errno) : "success");
	return moe_error_set(err, -EOPNOTSUPP, "misbehave: %s was not stopped by seccomp (returned %ld)", what, r);
}
#endif
