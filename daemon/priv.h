/* priv.h - what moetierd gives up once it has started.
 *
 * Order (platform.md section 7): (1) optionally switch to a service user,
 * keeping capabilities across setuid (PR_SET_KEEPCAPS); (2) drop the
 * bounding set while CAP_SETPCAP is still held; (3) keep, as permitted and
 * effective, only the capabilities of PRIV_KEEP that are actually permitted
 * (asking for one we lack fails the whole cap_set_proc); (4)
 * PR_SET_NO_NEW_PRIVS; (5) a seccomp allow-list of what the serving loop
 * needs. Nothing after start-up relies on being root.
 */
#ifndef MOETIER_PRIV_H
#define MOETIER_PRIV_H

#include <stdbool.h>

#include "util.h"

/* The capabilities moetierd may keep: mlock of the arenas, eBPF
 * observability, SQPOLL/RT pinning. */
#define PRIV_KEEP_CAPS { CAP_IPC_LOCK, CAP_BPF, CAP_PERFMON, CAP_SYS_NICE }

/* Switches to `user` (name or uid; NULL or "" = stay) and drops every
 * capability outside PRIV_KEEP_CAPS. Returns 0 or a negative errno. Writes
 * the kept set as text (cap_to_text) into kept (may be NULL). */
int priv_drop(const char *user, char *kept, size_t kept_len, struct moe_error *err);

/* What the filter must let through besides the serving loop. */
struct priv_needs {
	bool cuda; /* a real CUDA GPU tier may run (gpu-backend vmm, uvm, auto) */
};

/* PR_SET_NO_NEW_PRIVS, then (use_seccomp) the seccomp filter on every
 * thread (TSYNC). An allow-list: the event loop, client sockets and fds,
 * io_uring_enter on the rings made at start-up, threads (clone with
 * CLONE_THREAD only), memory and memfds, bpf() map reads, sd_notify's
 * AF_UNIX datagram socket, logging, time. Everything else kills the
 * process (SIGSYS; the kernel's audit log names the call): execve, fork,
 * ptrace, network sockets, mount, module loading, bpf program loads...
 * Answered ENOSYS instead, because libraries probe them: clone3 (glibc
 * falls back to clone) and io_uring_setup. needs->cuda adds ioctl. A
 * sanitizer build adds what LeakSanitizer needs at exit (clone, ptrace,
 * wait4, prctl) and answers execve (its symbolizer) EPERM. */
int priv_lockdown(bool use_seccomp, const struct priv_needs *needs, struct moe_error *err);

/* Which list this build installs, for the start-up log. */
const char *priv_seccomp_variant(void);

#ifdef MOETIER_FAULT_INJECTION
/* Debug builds only (moectl config set misbehave=PROBE): attempts a call
 * the filter forbids - "socket" (AF_INET), "execve" (a missing program) or
 * "syslog" (on no list) - each harmless if it went through. With the filter
 * on, the process dies of SIGSYS here; if the call returns, -EOPNOTSUPP
 * and err says it was not stopped. */
int priv_misbehave(const char *what, struct moe_error *err);
#endif

#endif
