/* server_conn.c - the control socket: binding it, accepting and
 * identifying peers, HELLO (rings, leases, the fds handed over), reading
 * messages and dispatching them, closing and reaping clients. Runs on the
 * event loop thread. */
#include "config.h"
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include "cache.h"
#include "placement.h"
#include "server_impl.h"

#ifndef SO_PEERGROUPS
#define SO_PEERGROUPS 59
#endif

/* ---- sockets ----------------------------------------------------------- */

int server_check_socket_dir(const char *path, struct moe_error *err)
{
	char dir[PATH_MAX];
	struct stat st;
	const char *slash = strrchr(path, '/');
	if (!slash)
		snprintf(dir, sizeof(dir), ".");
	else if (slash == path)
		snprintf(dir, sizeof(dir), "/");
	else
		snprintf(dir, sizeof(dir), "%.*s", (int)(slash - path), path);
	if (stat(dir, &st))
		return moe_error_set(err, -errno, "socket directory %s: %s", dir, strerror(errno));
	if (!S_ISDIR(st.st_mode))
		return moe_error_set(err, -ENOTDIR, "socket directory %s is not a directory", dir);
	/* Permissions on the socket itself are not honoured everywhere; the
	 * directory is what keeps others out (chrony's rule). */
	if (st.st_mode & S_IWOTH)
		return moe_error_set(err, -EPERM, "socket directory %s is writable by others (mode %04o); refusing to start",
				     dir, st.st_mode & 07777);
	if ((st.st_mode & S_IWGRP) && st.st_gid != getegid() && st.st_uid != geteuid())
		return moe_error_set(err, -EPERM, "socket directory %s is group-writable by a foreign group", dir);
	return 0;
}

int server_conn_bind(struct server *s, struct moe_error *err)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	const char *path = s->cfg->socket;
	int rc;
	if (strlen(path) >= sizeof(sa.sun_path))
		return moe_error_set(err, -ENAMETOOLONG, "socket path too long: %s", path);
	if ((rc = server_check_socket_dir(path, err)))
		return rc;
	strcpy(sa.sun_path, path);
	/* Socket activation (etc/moetierd.socket): take the passed socket when
	 * it is ours; systemd set its mode and group. */
	if (sd_listen_fds(1) == 1 && sd_is_socket_unix(SD_LISTEN_FDS_START, SOCK_SEQPACKET, 1, path, 0) > 0) {
		s->listen_fd = SD_LISTEN_FDS_START;
		fcntl(s->listen_fd, F_SETFD, FD_CLOEXEC);
		fcntl(s->listen_fd, F_SETFL, fcntl(s->listen_fd, F_GETFL) | O_NONBLOCK);
		moe_info("using the socket passed by systemd for %s", path);
		return 0;
	}
	s->listen_fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (s->listen_fd < 0)
		return moe_error_set(err, -errno, "socket: %s", strerror(errno));
	/* A stale socket from a crashed daemon: remove it only if nobody answers. */
	struct stat st;
	if (lstat(path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode))
			return moe_error_set(err, -EEXIST, "%s exists and is not a socket", path);
		int probe = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
		if (probe >= 0 && connect(probe, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
			close(probe);
			return moe_error_set(err, -EADDRINUSE, "another moetierd is serving %s", path);
		}
		if (probe >= 0)
			close(probe);
		unlink(path);
	}
	/* Mode set through the umask around bind, so the socket never exists
	 * with looser permissions (memcached's way). */
	mode_t old = umask(~s->cfg->socket_mode & 0777);
	rc = bind(s->listen_fd, (struct sockaddr *)&sa, sizeof(sa));
	int e = errno;
	umask(old);
	if (rc)
		return moe_error_set(err, -e, "bind %s: %s", path, strerror(e));
	s->sock_path = strdup(path);
	if (chmod(path, s->cfg->socket_mode))
		moe_warn("chmod %s: %s", path, strerror(errno));
	if (s->have_sock_gid && chown(path, (uid_t)-1, s->sock_gid))
		moe_warn("chown %s to group %s: %s", path, s->cfg->socket_group, strerror(errno));
	if (listen(s->listen_fd, 64))
		return moe_error_set(err, -errno, "listen: %s", strerror(errno));
	return 0;
}

int server_conn_send(int fd, uint16_t type, uint32_t seq, int32_t status, uint32_t arg, const void *payload,
		    uint32_t len, const int *fds, unsigned nfds)
{
	struct moet_msg h = { MOET_MSG_MAGIC, MOET_PROTO_VERSION, type, seq, status, arg, len };
	struct iovec iov[2] = { { &h, sizeof(h) }, { (void *)payload, len } };
	union {
		char buf[CMSG_SPACE(sizeof(int) * 8)];
		struct cmsghdr align;
	} u;
	struct msghdr mh = { .msg_iov = iov, .msg_iovlen = len ? 2 : 1 };
	if (nfds) {
		memset(&u, 0, sizeof(u));
		mh.msg_control = u.buf;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
		struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
	}
	ssize_t n = sendmsg(fd, &mh, MSG_NOSIGNAL);
	return n < 0 ? -errno : 0;
}

int server_conn_error(struct server *s, struct srv_client *c, uint32_t seq, int status, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	(void)s;
	moe_debug("client %u: %s", c->id, msg);
	return server_conn_send(c->fd, MOET_MSG_ERROR, seq, status, 0, msg, (uint32_t)strlen(msg) + 1, NULL, 0);
}

int server_conn_text(struct srv_client *c, uint32_t seq, const char *text)
{
	size_t len = strlen(text);
	int fd = memfd_create("moetier-reply", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0)
		return -errno;
	int rc = moe_write_full(fd, text, len);
	if (rc == 0)
		fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL);
	if (rc == 0)
		rc = server_conn_send(c->fd, MOET_MSG_OK, seq, 0, 0, NULL, 0, &fd, 1);
	close(fd);
	return rc;
}

/* ---- clients (event loop thread) ------------------------------------------ */

static bool in_group(gid_t want, gid_t primary, const gid_t *groups, int ngroups)
{
	if (primary == want)
		return true;
	for (int i = 0; i < ngroups; i++)
		if (groups[i] == want)
			return true;
	return false;
}

void server_conn_accept(struct server *s)
{
	int fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
	if (fd < 0)
		return;
	struct ucred cr;
	socklen_t cl = sizeof(cr);
	gid_t groups[256];
	socklen_t gl = sizeof(groups);
	int ngroups = 0;
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &cl) || cl != sizeof(cr)) {
		/* No credentials: refuse (fail closed, unlike tmux's fallback). */
		moe_warn("connection without peer credentials refused");
		server_cnt(s, SERVER_clients_refused);
		close(fd);
		return;
	}
	if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &gl) == 0)
		ngroups = (int)(gl / sizeof(gid_t));
	struct srv_client *c = calloc(1, sizeof(*c));
	if (!c) {
		close(fd);
		return;
	}
	c->fd = fd;
	c->uid = cr.uid;
	c->gid = cr.gid;
	c->pid = cr.pid;
	c->ring_fd = -1;
	pthread_mutex_init(&c->lock, NULL);
	bool self = cr.uid == 0 || cr.uid == geteuid();
	c->admin = self || (s->have_admin_gid && in_group(s->admin_gid, cr.gid, groups, ngroups));
	c->data = c->admin || (s->have_sock_gid && in_group(s->sock_gid, cr.gid, groups, ngroups));
	c->accept_ns = moe_now_ns();
	pthread_mutex_lock(&s->lock);
	unsigned idx = s->max_clients, used = 0;
	for (unsigned i = 0; i < s->max_clients; i++) {
		if (s->clients[i])
			used++;
		else if (idx == s->max_clients)
			idx = i;
	}
	/* The last admin-reserve slots go to admins only, so that connections
	 * of other users (even ones that never say HELLO) cannot lock root's
	 * moectl out. */
	unsigned reserve = MOE_MIN(s->cfg->admin_reserve, s->max_clients - 1);
	if (!c->admin && used + reserve >= s->max_clients)
		idx = s->max_clients;
	if (idx < s->max_clients) {
		s->clients[idx] = c;
		c->idx = idx;
		c->cache_id = idx + 1;
		c->id = ++s->next_id;
	}
	pthread_mutex_unlock(&s->lock);
	if (idx == s->max_clients) {
		server_conn_error(s, c, 0, -EUSERS, "too many clients (max-clients = %u, %u kept for admins)",
				  s->max_clients, MOE_MIN(s->cfg->admin_reserve, s->max_clients - 1));
		server_cnt(s, SERVER_clients_refused);
		close(fd);
		pthread_mutex_destroy(&c->lock);
		free(c);
		return;
	}
	struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.ptr = c };
	epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev);
}

void server_conn_free(struct srv_client *c)
{
	if (c->ring_fd >= 0)
		close(c->ring_fd);
	if (c->region)
		munmap(c->region, c->region_bytes);
	free(c->leases);
	free(c->parked);
	placement_destroy(c->pl);
	pthread_mutex_destroy(&c->lock);
	free(c);
}

void server_conn_close(struct server *s, struct srv_client *c)
{
	if (c->fd >= 0) {
		epoll_ctl(s->epfd, EPOLL_CTL_DEL, c->fd, NULL);
		close(c->fd);
		c->fd = -1;
	}
	if (c->hello_done)
		server_cnt(s, SERVER_clients_closed);
	if (c->region) {
		/* The ring thread drops its leases, then marks it DEAD. */
		atomic_store(&c->state, CL_CLOSING);
		server_kick_ring(s);
		return;
	}
	if (c->m)
		cache_release_client(c->m->cache, c->cache_id);
	pthread_mutex_lock(&s->lock);
	s->clients[c->idx] = NULL;
	pthread_mutex_unlock(&s->lock);
	server_conn_free(c);
}

void server_conn_sweep(struct server *s)
{
	uint32_t ms = s->cfg->hello_timeout_ms;
	if (!ms)
		return;
	uint64_t now = moe_now_ns();
	/* Only the event loop adds or closes pre-HELLO clients: no lock needed
	 * to close them here, but the table is read under it. */
	for (unsigned i = 0; i < s->max_clients; i++) {
		pthread_mutex_lock(&s->lock);
		struct srv_client *c = s->clients[i];
		bool late = c && !c->hello_done && c->fd >= 0 && now - c->accept_ns > (uint64_t)ms * 1000000ull;
		pthread_mutex_unlock(&s->lock);
		if (!late)
			continue;
		moe_warn("client %u (uid %u, pid %d) sent no HELLO within %u ms: closed", c->id, (unsigned)c->uid,
			 (int)c->pid, ms);
		server_conn_error(s, c, 0, -ETIMEDOUT, "no HELLO within hello-timeout-ms = %u", ms);
		server_cnt(s, SERVER_hello_timeouts);
		server_conn_close(s, c);
	}
}

void server_conn_reap(struct server *s)
{
	uint64_t v;
	if (read(s->reap_fd, &v, 8) < 0 && errno != EAGAIN)
		moe_warn("reap eventfd: %s", strerror(errno));
	pthread_mutex_lock(&s->lock);
	for (unsigned i = 0; i < s->max_clients; i++) {
		struct srv_client *c = s->clients[i];
		if (c && atomic_load(&c->state) == CL_DEAD) {
			s->clients[i] = NULL;
			server_conn_free(c);
		}
	}
	pthread_mutex_unlock(&s->lock);
}

static int setup_ring(struct server *s, struct srv_client *c, struct moe_error *err)
{
	uint32_t n = s->cfg->ring_entries;
	uint64_t bytes = ring_region_layout(&c->reg, n, n, s->cfg->scratch_bytes);
	c->ring_fd = memfd_create("moetier-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (c->ring_fd < 0)
		return moe_error_set(err, -errno, "memfd_create: %s", strerror(errno));
	if (ftruncate(c->ring_fd, (off_t)bytes))
		return moe_error_set(err, -errno, "ftruncate ring: %s", strerror(errno));
	/* The client maps it read-write (it writes the SQ and the scratch
	 * area) but may not resize it under us. */
	fcntl(c->ring_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
	c->region = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, c->ring_fd, 0);
	if (c->region == MAP_FAILED) {
		c->region = NULL;
		return moe_error_set(err, -errno, "mmap ring: %s", strerror(errno));
	}
	c->region_bytes = bytes;
	memcpy(c->region, &c->reg, sizeof(c->reg));
	ring_attach(&c->sq, (struct moet_ring_ctl *)(c->region + c->reg.sq_ctl_off), c->region + c->reg.sq_off, n,
		    sizeof(struct moet_sqe), true, false);
	ring_attach(&c->cq, (struct moet_ring_ctl *)(c->region + c->reg.cq_ctl_off), c->region + c->reg.cq_off, n,
		    sizeof(struct moet_cqe), true, true);
	c->n_leases_max = s->cfg->max_leases;
	c->leases = calloc(c->n_leases_max, sizeof(*c->leases));
	c->max_parked = n;
	c->parked = calloc(c->max_parked, sizeof(*c->parked));
	if (!c->leases || !c->parked)
		return moe_error_set(err, -ENOMEM, "out of memory");
	return 0;
}

static void do_hello(struct server *s, struct srv_client *c, const struct moet_msg *h, const uint8_t *payload)
{
	struct moet_hello hello;
	struct moe_error err = { "" };
	if (h->len != sizeof(hello)) {
		server_conn_error(s, c, h->seq, -EPROTO, "HELLO: payload is %u bytes, expected %zu", h->len, sizeof(hello));
		goto refuse;
	}
	memcpy(&hello, payload, sizeof(hello));
	if (hello.version_min > MOET_PROTO_VERSION || hello.version_max < MOET_PROTO_MIN_VERSION ||
	    hello.version_min > hello.version_max) {
		server_conn_error(s, c, h->seq, -EPROTONOSUPPORT,
			   "protocol version mismatch: client speaks %u..%u, moetierd %u..%u", hello.version_min,
			   hello.version_max, MOET_PROTO_MIN_VERSION, MOET_PROTO_VERSION);
		goto refuse;
	}
	bool control_only = hello.flags & MOET_HELLO_CONTROL_ONLY;
	if (!c->data && !(control_only && c->admin)) {
		moe_info("refused uid %u gid %u: not in the socket group", (unsigned)c->uid, (unsigned)c->gid);
		server_conn_error(s, c, h->seq, -EACCES, "uid %u (gid %u) may not use moetierd: not in group '%s'",
			   (unsigned)c->uid, (unsigned)c->gid, s->cfg->socket_group);
		goto refuse;
	}
	hello.client_name[sizeof(hello.client_name) - 1] = '\0';
	hello.model[sizeof(hello.model) - 1] = '\0';
	struct served_model *m = NULL;
	for (unsigned i = 0; i < s->n_models; i++)
		if (!hello.model[0] || !strcmp(hello.model, s->models[i].name)) {
			m = &s->models[i];
			break;
		}
	if (!m) {
		server_conn_error(s, c, h->seq, -ENOENT, "no model named '%s' is served", hello.model);
		goto refuse;
	}
	c->m = m;
	snprintf(c->name, sizeof(c->name), "%s", hello.client_name);
	c->version = MOET_PROTO_VERSION;
	uint32_t caps = MOET_CAP_RING | MOET_CAP_ROUTE | (c->admin ? MOET_CAP_ADMIN : 0) | (m->compute ? MOET_CAP_COMPUTE : 0);
	struct moet_hello_reply r;
	memset(&r, 0, sizeof(r));
	int fds[4];
	unsigned nfds = 0;
	const struct moe_model_config *mc = m->pack->model;
	snprintf(r.model, sizeof(r.model), "%s", m->name);
	r.family = mc->family;
	r.dtype = mc->dtype;
	r.hidden = mc->hidden;
	r.expert_width = mc->expert_width;
	r.n_experts = mc->n_experts;
	r.top_k = mc->top_k;
	r.n_moe_layers = mc->n_moe_layers;
	r.first_moe_layer = mc->first_moe_layer;
	r.moe_layer_step = mc->moe_layer_step;
	r.scoring = mc->scoring;
	r.norm_topk_prob = mc->norm_topk_prob;
	r.extent_payload = m->pack->hdr->extent_payload;
	for (unsigned t = 0; t < 2; t++) {
		r.arena_bytes[t] = m->arena[t].bytes;
		r.slot_bytes[t] = m->arena[t].slot_bytes;
		r.n_slots[t] = m->arena[t].n_slots;
	}
	if (!control_only) {
		if (setup_ring(s, c, &err)) {
			server_conn_error(s, c, h->seq, -ENOMEM, "%s", err.msg);
			goto refuse;
		}
		fds[nfds++] = c->ring_fd;
		r.fds |= MOET_FD_RING;
		r.ring_bytes = c->region_bytes;
		if (m->arena_ro_fd[CACHE_TIER_HOST] >= 0) {
			fds[nfds++] = m->arena_ro_fd[CACHE_TIER_HOST];
			r.fds |= MOET_FD_HOST;
			caps |= MOET_CAP_HOST_ARENA;
		}
		if (m->arena_ro_fd[CACHE_TIER_GPU] >= 0) {
			fds[nfds++] = m->arena_ro_fd[CACHE_TIER_GPU];
			r.fds |= MOET_FD_GPU;
			caps |= MOET_CAP_GPU_EMU;
		}
		fds[nfds++] = m->shared_ro_fd;
		r.fds |= MOET_FD_SHARED;
		r.shared_bytes = m->shared_bytes;
	}
	r.version = c->version;
	r.caps = caps;
	r.client_id = c->id;
	if (server_conn_send(c->fd, MOET_MSG_HELLO_REPLY, h->seq, 0, 0, &r, sizeof(r), fds, nfds)) {
		server_conn_close(s, c);
		return;
	}
	c->hello_done = true;
	if (c->region)
		atomic_store_explicit(&c->ring_ready, true, memory_order_release);
	server_cnt(s, SERVER_clients_accepted);
	moe_info("client %u attached: '%s' uid %u gid %u pid %d model %s%s", c->id, c->name, (unsigned)c->uid,
		 (unsigned)c->gid, (int)c->pid, m->name, c->admin ? " (admin)" : "");
	if (c->region)
		server_kick_ring(s);
	return;
refuse:
	server_cnt(s, SERVER_clients_refused);
	server_conn_close(s, c);
}

void server_conn_readable(struct server *s, struct srv_client *c)
{
	uint8_t buf[MOET_MAX_MSG + 1];
	union {
		char b[CMSG_SPACE(sizeof(int) * 16)];
		struct cmsghdr align;
	} u;
	struct iovec iov = { buf, sizeof(buf) };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b, .msg_controllen = sizeof(u.b) };
	ssize_t n = recvmsg(c->fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	/* We never accept fds from clients: close whatever came, also with a
	 * zero-length message (read as the end of the connection below), or a
	 * client could fill our descriptor table by reconnecting. */
	if (n >= 0)
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
			if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
				int nf = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
				for (int i = 0; i < nf; i++) {
					int fd;
					memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
					close(fd);
				}
			}
	if (n <= 0) {
		server_conn_close(s, c);
		return;
	}
	struct moet_msg h;
	if ((size_t)n < sizeof(h)) {
		server_cnt(s, SERVER_bad_messages);
		server_conn_error(s, c, 0, -EPROTO, "truncated message (%zd bytes, header is %zu)", n, sizeof(h));
		if (!c->hello_done)
			server_conn_close(s, c);
		return;
	}
	memcpy(&h, buf, sizeof(h));
	const char *why = NULL;
	int st = -EPROTO;
	if (mh.msg_flags & MSG_TRUNC)
		why = "message too long", st = -EMSGSIZE;
	else if (h.magic != MOET_MSG_MAGIC)
		why = "bad magic";
	else if (h.len != (size_t)n - sizeof(h))
		why = "length field does not match the message";
	else if (h.version < MOET_PROTO_MIN_VERSION || h.version > MOET_PROTO_VERSION)
		why = "unsupported protocol version", st = -EPROTONOSUPPORT;
	else if (!c->hello_done && h.type != MOET_MSG_HELLO)
		why = "the first message must be HELLO";
	else if (c->hello_done && h.type == MOET_MSG_HELLO)
		why = "HELLO sent twice";
	if (why) {
		server_cnt(s, SERVER_bad_messages);
		server_conn_error(s, c, h.seq, st, "%s", why);
		if (!c->hello_done)
			server_conn_close(s, c);
		return;
	}
	const uint8_t *payload = buf + sizeof(h);
	switch (h.type) {
	case MOET_MSG_HELLO:
		do_hello(s, c, &h, payload);
		return;
	case MOET_MSG_SUBMIT: {
		struct moet_sqe q;
		struct moet_cqe out;
		if (h.len != sizeof(q) || !c->region) {
			server_cnt(s, SERVER_bad_messages);
			server_conn_error(s, c, h.seq, -EPROTO, c->region ? "SUBMIT: expected one %zu-byte entry"
								   : "SUBMIT needs a data-plane client", sizeof(q));
			return;
		}
		memcpy(&q, payload, sizeof(q));
		/* Same operation as the ring; a blocking acquire behaves as NOWAIT
		 * here because the event loop never blocks. */
		server_ring_exec(s, c, &q, &out, false);
		server_cnt(s, SERVER_socket_entries);
		atomic_fetch_add_explicit(&c->ops, 1, memory_order_relaxed);
		server_conn_send(c->fd, MOET_MSG_SUBMIT_REPLY, h.seq, 0, 0, &out, sizeof(out), NULL, 0);
		return;
	}
	case MOET_MSG_STATS: case MOET_MSG_CONFIG_GET: case MOET_MSG_CONFIG_SET: case MOET_MSG_PIN:
	case MOET_MSG_UNPIN: case MOET_MSG_EVICT: case MOET_MSG_CLIENTS:
		server_admin_request(s, c, &h, payload);
		return;
	case MOET_MSG_GPU_EXPORT:
		server_admin_gpu_export(s, c, &h);
		return;
	case MOET_MSG_ADVISE:
		server_admin_advise(s, c, &h, payload);
		return;
	case MOET_MSG_LATENT_BASIS:
		server_admin_latent_basis(s, c, &h, payload);
		return;
	default:
		server_cnt(s, SERVER_bad_messages);
		server_conn_error(s, c, h.seq, -EOPNOTSUPP, "unknown message type %u", h.type);
		return;
	}
}
