/* fuzz_server.h - an in-process moetierd for the libFuzzer targets that
 * drive the daemon's own decoders (fuzz_ring.c, fuzz_ctl.c): a tiny
 * generated pack whose every byte is known (tests/tiers_testpack.h), the
 * real server_create, clients accepted by the real server_conn_accept on
 * the real listening socket. No event loop and no ring thread: the target
 * calls the functions those threads call (server_conn_readable,
 * server_ring_exec), on its own thread, so every execution is synchronous
 * and a crash is reproducible from its input alone. Header-only: each
 * target is one .c file. */
#ifndef MOETIER_FUZZ_SERVER_H
#define MOETIER_FUZZ_SERVER_H

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "cache.h"
#include "options.h"
#include "server_impl.h"
/* testutil.h builds "%s/%s" paths into 4 KiB: GCC's truncation analysis
 * flags it under -Werror; the paths here are short. */
#pragma GCC diagnostic ignored "-Wformat-truncation"
#include "../testutil.h"
#include "../tiers_testpack.h"

#define FZ_LAYERS 2
#define FZ_EXPERTS 8
#define FZ_HIDDEN 64
#define FZ_WIDTH 32
#define FZ_PAYLOAD (3ull * FZ_HIDDEN * FZ_WIDTH * 4)

static struct fz_state {
	char *dir;
	char pack[4200];
	char sock[4200];
	struct moetierd_config cfg;
	struct server *s;
	int fds_at_start;
} fz;

static inline void fz_die(const char *what, const char *msg)
{
	fprintf(stderr, "fuzz: %s: %s\n", what, msg);
	abort();
}

/* Open descriptors; with show, lists them on stderr (a leak's report). */
static inline int fz_count_fds_show(bool show)
{
	int n = 0;
	DIR *d = opendir("/proc/self/fd");
	struct dirent *de;
	while (d && (de = readdir(d))) {
		if (de->d_name[0] == '.')
			continue;
		n++;
		if (show) {
			char p[300], t[300] = "";
			snprintf(p, sizeof(p), "/proc/self/fd/%s", de->d_name);
			ssize_t r = readlink(p, t, sizeof(t) - 1);
			t[r > 0 ? r : 0] = '\0';
			fprintf(stderr, "  fd %s -> %s\n", de->d_name, t);
		}
	}
	if (d)
		closedir(d);
	return n;
}

static inline int fz_count_fds(void)
{
	return fz_count_fds_show(false);
}

static inline void fz_set(const char *name, const char *value)
{
	struct moe_error err = { "" };
	if (options_set(&fz.cfg, name, value, &err))
		fz_die(name, err.msg);
}

static inline void fz_cleanup(void)
{
	if (fz.s)
		server_destroy(fz.s);
	fz.s = NULL;
	tu_rmtree(fz.dir);
	fz.dir = NULL;
}

/* The server, created once per process. */
static inline struct server *fz_server(void)
{
	struct moe_error err = { "" };
	if (fz.s)
		return fz.s;
	moe_log_init("fuzz", MOE_LOG_ERR, false);
	fz.dir = tu_mkdtemp("fuzz");
	snprintf(fz.pack, sizeof(fz.pack), "%s/f.moepack", fz.dir);
	snprintf(fz.sock, sizeof(fz.sock), "%s/s.sock", fz.dir);
	if (tp_write(fz.pack, FZ_LAYERS, FZ_EXPERTS, FZ_HIDDEN, FZ_WIDTH, &err))
		fz_die("pack", err.msg);
	options_init(&fz.cfg);
	fz_set("pack", fz.pack);
	fz_set("socket", fz.sock);
	fz_set("socket-group", "");
	/* every expert fits the host arena; an emulated GPU arena of 4 slots
	 * so WANT_GPU, GPU_EXPORT and the GPU copies run too */
	fz_set("host-bytes", "1M");
	fz_set("gpu-bytes", "96K");
	fz_set("gpu-backend", "emulated");
	fz_set("ring-entries", "16");
	fz_set("scratch-bytes", "64K");
	fz_set("max-clients", "8");
	fz_set("admin-reserve", "1");
	fz_set("max-leases", "64");
	fz_set("hello-timeout-ms", "0");
	fz_set("wait-timeout-ms", "20");
	fz_set("ring-spin-us", "0");
	fz_set("seccomp", "false");
	fz_set("bpf", "false");
	fz_set("compute-calibrate", "false");
	fz_set("predictor", "temporal");
	fz_set("log-level", "err");
	if (server_create(&fz.cfg, &fz.s, &err))
		fz_die("server_create", err.msg);
	/* server_run makes it; the ring thread's reaping is done here */
	fz.s->reap_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	atexit(fz_cleanup);
	fz.fds_at_start = fz_count_fds();
	return fz.s;
}

/* Undoes what a fuzz input may have changed with CONFIG_SET (the runtime
 * options), so that every input starts from the same server. */
static inline void fz_reset_config(void)
{
	fz.cfg.ring_spin_us = 0;
	fz.cfg.hello_timeout_ms = 0;
	fz.cfg.client_share = 50;
	fz.cfg.wait_timeout_ms = 20;
	if (strcmp(fz.cfg.log_level, "err")) {
		fz_set("log-level", "err");
		moe_log_set_level(MOE_LOG_ERR);
	}
}

/* Connects to the listening socket and lets the server accept it: *cfd is
 * the client's end, the return the server's record. */
static inline struct srv_client *fz_connect(struct server *s, int *cfd)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(fz.sock) >= sizeof(sa.sun_path))
		fz_die("socket path", "too long");
	memcpy(sa.sun_path, fz.sock, strlen(fz.sock) + 1);
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
		fz_die("connect", strerror(errno));
	uint32_t before = s->next_id;
	server_conn_accept(s);
	struct srv_client *c = NULL;
	for (unsigned i = 0; i < s->max_clients; i++)
		if (s->clients[i] && s->clients[i]->id == before + 1)
			c = s->clients[i];
	if (!c)
		fz_die("accept", "the server did not take the connection");
	*cfd = fd;
	return c;
}

/* Reads and drops every reply waiting on the client's end (closing any
 * descriptor that came with it). Returns how many. */
static inline int fz_drain(int cfd)
{
	int n = 0;
	for (;;) {
		uint8_t buf[MOET_MAX_MSG + 64];
		union {
			char b[CMSG_SPACE(sizeof(int) * 16)];
			struct cmsghdr align;
		} u;
		struct iovec iov = { buf, sizeof(buf) };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b, .msg_controllen = sizeof(u.b) };
		ssize_t r = recvmsg(cfd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
		if (r <= 0)
			return n;
		n++;
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
			if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
				int nf = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
				for (int i = 0; i < nf; i++) {
					int fd;
					memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
					close(fd);
				}
			}
	}
}

/* True while the server still holds client c at slot idx. */
static inline bool fz_alive(struct server *s, struct srv_client *c, unsigned idx)
{
	return s->clients[idx] == c;
}

/* What the ring thread does for a closing client with a ring
 * (client_teardown_data in server_ring.c, then the reap): its leases go
 * back to the cache, the ring is unmapped and the record freed. */
static inline void fz_teardown(struct server *s, struct srv_client *c)
{
	if (c->m) {
		pthread_mutex_lock(&c->lock);
		cache_release_client(c->m->cache, c->cache_id);
		placement_destroy(c->pl);
		c->pl = NULL;
		c->n_parked = 0;
		pthread_mutex_unlock(&c->lock);
	}
	if (c->region) {
		munmap(c->region, c->region_bytes);
		c->region = NULL;
	}
	pthread_mutex_lock(&s->lock);
	s->clients[c->idx] = NULL;
	pthread_mutex_unlock(&s->lock);
	server_conn_free(c);
}

/* Hangs up: the server closes its end as on EPOLLHUP; a client with a ring
 * is then torn down as the ring thread would. */
static inline void fz_hangup(struct server *s, struct srv_client *c, unsigned idx, int cfd)
{
	close(cfd);
	if (!fz_alive(s, c, idx))
		return;
	if (c->fd >= 0)
		server_conn_close(s, c);
	if (fz_alive(s, c, idx))
		fz_teardown(s, c);
}

/* Waits until no load is in flight: a read's job is then referenced from
 * the io_uring ring only (kernel memory), which LeakSanitizer cannot see,
 * and the next input would depend on the timing of this one's loads. */
static inline void fz_settle(struct server *s)
{
	for (unsigned i = 0; i < s->n_models; i++)
		if (cache_wait_idle(s->models[i].cache, 5000))
			fz_die("settle", "loads still in flight after 5 s");
}

/* Every slot of the server must be free between inputs, and every
 * expert's cache state consistent. */
static inline void fz_check_idle(struct server *s)
{
	struct moe_error err = { "" };
	fz_settle(s);
	for (unsigned i = 0; i < s->max_clients; i++)
		if (s->clients[i])
			fz_die("idle", "a client record outlived its connection");
	for (unsigned i = 0; i < s->n_models; i++)
		if (cache_check_invariants(s->models[i].cache, &err))
			fz_die("cache invariants", err.msg);
}

/* Served bytes must be the expert's: checked against the generator, not
 * the pack's CRC. */
static inline void fz_check_slot(struct server *s, unsigned tier, int32_t slot, uint32_t layer, uint32_t expert)
{
	const void *p = cache_slot_ptr(s->models[0].cache, (enum cache_tier)tier, (uint32_t)slot);
	if (!p)
		fz_die("served slot", "no such slot");
	if (tp_check(p, layer, expert, FZ_PAYLOAD))
		fz_die("served slot", "the bytes are not the expert's");
}

#endif
