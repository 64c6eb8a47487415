/* priv.h - what moetierd gives up once it has started.
 *
 * Order (platform.md section 7): (1) optionally switch to a service user,
 * keeping capabilities across setuid (PR_SET_KEEPCAPS); (2) drop the
 * bounding set while CAP_SETPCAP is still held; (3) keep, as permitted and
 * effective, only the capabilities of PRIV_KEEP that are actually permitted
 * (asking for one we lack fails the whole cap_set_proc); (4)
 * PR_SET_NO_NEW_PRIVS; (5) a seccomp filter denying what the daemon never
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

/* PR_SET_NO_NEW_PRIVS, then the seccomp filter on every thread (TSYNC).
 * Denied: ptrace (kills the process), mount/umount, pivot_root, chroot,
 * kexec, module loading, reboot, swap, clock setting, keyrings, execve
 * (the daemon never runs programs), process_vm_* and io_uring_setup (the
 * rings exist by now; io_uring operations on existing rings and futexes are
 * untouched). Each denied call fails with EPERM (ENOSYS for io_uring_setup). */
int priv_lockdown(bool seccomp, struct moe_error *err);

#endif
