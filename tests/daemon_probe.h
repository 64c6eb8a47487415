/* daemon_probe.h - for Criterion tests that start moetierd themselves (and
 * link libmoetier): wait until it accepts a client, stop it. */
#ifndef MOETIER_TESTS_DAEMON_PROBE_H
#define MOETIER_TESTS_DAEMON_PROBE_H

#include <criterion/criterion.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>

#include "moetier/moetier.h"
#include "testutil.h"

static inline void probe_sleep_ms(int ms)
{
	struct timespec d = { ms / 1000, (long)(ms % 1000) * 1000000L };
	nanosleep(&d, NULL);
}

/* Until a probe client connects to sock (10 s); a daemon that exits first
 * fails the test with its log. */
static inline void probe_wait_up(pid_t pid, const char *sock, const char *log)
{
	for (int i = 0; i < 200; i++) {
		moet_ctx *c;
		struct moet_connect_opts o = { sizeof(o), sock, NULL, "probe", 0, 1, 0 };
		if (moet_connect(&o, &c) == 0) {
			moet_close(c);
			return;
		}
		int st;
		if (waitpid(pid, &st, WNOHANG) == pid) {
			tu_sh("cat %s >&2", log);
			cr_assert_fail("moetierd exited during start-up");
		}
		probe_sleep_ms(50);
	}
	cr_assert_fail("moetierd did not come up");
}

/* SIGTERM, up to 10 s to exit, then SIGKILL; its wait status (-1: none). */
static inline int probe_stop(pid_t pid)
{
	int st = -1;
	if (pid <= 0)
		return st;
	kill(pid, SIGTERM);
	for (int i = 0; i < 200 && waitpid(pid, &st, WNOHANG) == 0; i++)
		probe_sleep_ms(50);
	if (waitpid(pid, &st, WNOHANG) == 0) {
		kill(pid, SIGKILL);
		waitpid(pid, &st, 0);
	}
	return st;
}

#endif
