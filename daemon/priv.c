/* priv.c - capability drop, no_new_privs, seccomp (priv.h). */
#include "config.h"

#include <errno.h>
#include <grp.h>
#include <linux/capability.h>
#include <pwd.h>
#include <seccomp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/capability.h>
#include <sys/prctl.h>
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

int priv_drop(const char *user, char *kept, size_t kept_len, struct moe_error *err)
{
	static const cap_value_t want[] = PRIV_KEEP_CAPS;
	cap_value_t keep[MOE_ARRAY_SIZE(want)];
	int n_keep = 0;
	int rc = 0;
	cap_t cur = cap_get_proc();
	if (!cur)
		return moe_error_set(err, -errno, "cap_get_proc: %s", strerror(errno));
	for (size_t i = 0; i < MOE_ARRAY_SIZE(want); i++) {
		cap_flag_value_t v = CAP_CLEAR;
		if (CAP_IS_SUPPORTED(want[i]) && cap_get_flag(cur, want[i], CAP_PERMITTED, &v) == 0 && v == CAP_SET)
			keep[n_keep++] = want[i];
	}
	cap_flag_value_t setpcap = CAP_CLEAR;
	cap_get_flag(cur, CAP_SETPCAP, CAP_EFFECTIVE, &setpcap);
	cap_free(cur);

	if (user && *user) {
		uid_t uid;
		gid_t gid;
		if (lookup_user(user, &uid, &gid))
			return moe_error_set(err, -ENOENT, "user '%s' does not exist", user);
		if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0))
			return moe_error_set(err, -errno, "PR_SET_KEEPCAPS: %s", strerror(errno));
		if (setgroups(0, NULL) || setresgid(gid, gid, gid) || setresuid(uid, uid, uid))
			return moe_error_set(err, -errno, "switching to user %s: %s", user, strerror(errno));
		prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0);
	}
	/* Bounding set first: it needs CAP_SETPCAP, which goes next. */
	if (setpcap == CAP_SET || (user && *user)) {
		for (cap_value_t c = 0; c <= CAP_LAST_CAP; c++) {
			bool k = false;
			for (int i = 0; i < n_keep; i++)
				k |= keep[i] == c;
			if (!k && CAP_IS_SUPPORTED(c) && cap_drop_bound(c) && errno != EINVAL && errno != EPERM)
				moe_warn("cap_drop_bound(%d): %s", (int)c, strerror(errno));
		}
	}
	cap_t nc = cap_init();
	if (!nc)
		return moe_error_set(err, -ENOMEM, "cap_init");
	if (n_keep && (cap_set_flag(nc, CAP_PERMITTED, n_keep, keep, CAP_SET) ||
		       cap_set_flag(nc, CAP_EFFECTIVE, n_keep, keep, CAP_SET)))
		rc = moe_error_set(err, -errno, "cap_set_flag: %s", strerror(errno));
	if (!rc && cap_set_proc(nc))
		rc = moe_error_set(err, -errno, "cap_set_proc: %s", strerror(errno));
	if (!rc && kept) {
		char *t = cap_to_text(nc, NULL);
		snprintf(kept, kept_len, "%s", t && *t ? t : "=");
		cap_free(t);
	}
	cap_free(nc);
	return rc;
}

int priv_lockdown(bool use_seccomp, struct moe_error *err)
{
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		return moe_error_set(err, -errno, "PR_SET_NO_NEW_PRIVS: %s", strerror(errno));
	if (!use_seccomp)
		return 0;
	static const char *const deny[] = {
		"mount", "umount2", "pivot_root", "chroot", "kexec_load", "kexec_file_load", "init_module",
		"finit_module", "delete_module", "reboot", "swapon", "swapoff", "settimeofday", "clock_settime",
		"clock_adjtime", "adjtimex", "add_key", "request_key", "keyctl", "execve", "execveat",
		"process_vm_readv", "process_vm_writev", "acct", "open_by_handle_at", "userfaultfd",
		"fsopen", "fsmount", "move_mount", "open_tree",
	};
	scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
	int rc = 0;
	if (!ctx)
		return moe_error_set(err, -ENOMEM, "seccomp_init failed");
	for (size_t i = 0; i < MOE_ARRAY_SIZE(deny) && !rc; i++) {
		int nr = seccomp_syscall_resolve_name(deny[i]);
		if (nr == __NR_SCMP_ERROR)
			continue; /* not on this architecture */
		rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), nr, 0);
	}
	/* A debugger attaching to the daemon is an attack, not a use. Sanitizer
	 * builds are the exception: LeakSanitizer stops the world with ptrace
	 * at exit (killing it there hangs the exit). */
#if !defined(__SANITIZE_ADDRESS__)
	if (!rc)
		rc = seccomp_rule_add(ctx, SCMP_ACT_KILL_PROCESS, SCMP_SYS(ptrace), 0);
#endif
	/* Rings are created at start-up; existing rings keep working because
	 * io_uring operations do not pass through seccomp. */
	if (!rc)
		rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(io_uring_setup), 0);
	if (!rc)
		rc = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_TSYNC, 1);
	if (!rc)
		rc = seccomp_load(ctx);
	seccomp_release(ctx);
	if (rc)
		return moe_error_set(err, rc < 0 ? rc : -EINVAL, "seccomp: %s", strerror(rc < 0 ? -rc : EINVAL));
	return 0;
}
