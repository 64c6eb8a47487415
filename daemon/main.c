/* main.c - moetierd: options, start-up, privilege drop, the event loop. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "moetier/proto.h"
#include "options.h"
#include "priv.h"
#include "server.h"

static enum moe_log_level parse_level(const char *s)
{
	return !strcmp(s, "err") ? MOE_LOG_ERR : !strcmp(s, "warn") ? MOE_LOG_WARN
	       : !strcmp(s, "debug") ? MOE_LOG_DEBUG : MOE_LOG_INFO;
}

/* Detaching forks before any thread exists; the parent waits for the child
 * to say it is ready (or failed) so start-up errors reach the terminal. */
static int detach(int *notify_fd)
{
	int p[2];
	if (pipe2(p, O_CLOEXEC))
		return -errno;
	pid_t pid = fork();
	if (pid < 0)
		return -errno;
	if (pid > 0) {
		char st = 1;
		close(p[1]);
		ssize_t n = read(p[0], &st, 1);
		_exit(n == 1 && st == 0 ? 0 : 1);
	}
	close(p[0]);
	setsid();
	*notify_fd = p[1];
	return 0;
}

int main(int argc, char **argv)
{
	struct moetierd_config cfg;
	struct moe_error err = { "" };
	bool dump, help, version;
	int notify_fd = -1, rc;
	struct server *srv = NULL;

	options_init(&cfg);
	if (options_parse_args(&cfg, argc, argv, &dump, &help, &version, &err)) {
		fprintf(stderr, "moetierd: %s\n", err.msg);
		options_free(&cfg);
		return 2;
	}
	if (help) {
		options_usage(stdout, "moetierd");
		options_free(&cfg);
		return 0;
	}
	if (version) {
		printf("moetierd %s (protocol %d)\n", PACKAGE_VERSION, MOET_PROTO_VERSION);
		options_free(&cfg);
		return 0;
	}
	if (dump) {
		options_dump(stdout, &cfg);
		options_free(&cfg);
		return 0;
	}
	moe_log_init("moetierd", parse_level(cfg.log_level), getenv("JOURNAL_STREAM") != NULL);
	signal(SIGPIPE, SIG_IGN);
	if (!cfg.foreground && (rc = detach(&notify_fd))) {
		fprintf(stderr, "moetierd: detaching: %s\n", strerror(-rc));
		return 1;
	}
	/* Before any thread exists (the cache's I/O thread, the ring thread
	 * inherit the mask). */
	server_block_signals(NULL);
	rc = server_create(&cfg, &srv, &err);
	if (rc) {
		moe_err("%s", err.msg);
		goto out;
	}
	char kept[256] = "";
	if ((rc = priv_drop(cfg.user, kept, sizeof(kept), &err))) {
		moe_err("dropping privileges: %s", err.msg);
		goto out;
	}
	/* "auto" may settle on the emulated tier; allowing the driver's ioctl
	 * then costs nothing the emulated tier would use. */
	struct priv_needs needs = { .cuda = cfg.gpu_bytes > 0 && strcmp(cfg.gpu_backend, "emulated") != 0 };
	if ((rc = priv_lockdown(cfg.seccomp, &needs, &err))) {
		moe_err("%s", err.msg);
		goto out;
	}
	moe_info("capabilities kept: %s; uid %u gid %u; seccomp %s%s", kept, (unsigned)geteuid(), (unsigned)getegid(),
		 cfg.seccomp ? priv_seccomp_variant() : "off", cfg.seccomp && needs.cuda ? " + CUDA driver" : "");
	if ((rc = server_start(srv, &err))) {
		moe_err("%s", err.msg);
		goto out;
	}
	if (cfg.pid_file && *cfg.pid_file) {
		FILE *f = fopen(cfg.pid_file, "we");
		if (f) {
			fprintf(f, "%d\n", (int)getpid());
			fclose(f);
		} else {
			moe_warn("pid-file %s: %s", cfg.pid_file, strerror(errno));
		}
	}
	if (notify_fd >= 0) {
		char ok = 0;
		if (write(notify_fd, &ok, 1) != 1)
			moe_warn("telling the parent we are ready: %s", strerror(errno));
		close(notify_fd);
		notify_fd = -1;
	}
	rc = server_run(srv, &err);
	if (rc)
		moe_err("%s", err.msg);
	else
		moe_info("stopped");
out:
	server_destroy(srv);
	if (cfg.pid_file && *cfg.pid_file && rc == 0)
		unlink(cfg.pid_file);
	if (notify_fd >= 0)
		close(notify_fd); /* the parent reads EOF: failure */
	options_free(&cfg);
	return rc ? 1 : 0;
}
