/* server.c - control socket, per-client rings, the ring thread (server.h). */
#include "config.h"
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include "cache.h"
#include "compute.h"
#include "pack.h"
#include "placement.h"
#include "tier_gpu.h"
#include "ring.h"
#include "route.h"
#include "server.h"
#include "stats.h"

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif
#ifndef SO_PEERGROUPS
#define SO_PEERGROUPS 59
#endif

enum client_state { CL_ACTIVE = 0, CL_CLOSING = 1, CL_DEAD = 2 };

struct lease_rec {
	uint32_t gen;
	uint16_t n;
	bool used;
	struct cache_lease l[MOET_MAX_BATCH];
};

struct parked {
	struct moet_sqe sqe;
	struct moet_cqe cqe;     /* filled so far */
	uint32_t lease_idx;      /* lease record (may hold some already) */
	uint64_t deadline_ns;
};

struct model {
	char name[64];
	struct pack_file *pack;
	struct cache *cache;
	struct server *srv;
	uint32_t n_layers, n_experts, words;
	struct route_params rp;
	float *score_bias;
	/* shared state region */
	int shared_fd;
	uint8_t *shared;
	uint64_t shared_bytes;
	struct moet_shared_hdr *hdr;
	_Atomic uint64_t *dirty;  /* [n_layers/64+1] layers with a finished load */
	uint64_t last_refresh_ns;
	struct compute_ctx *compute; /* NULL when the kernels do not take this model */
	struct cache_arena_info arena[2];
	int arena_ro_fd[2];       /* read-only fds handed to clients */
	int shared_ro_fd;
	/* placement: each client stream gets its own predictor (placement.h) */
	struct placement_config plc;
	struct predict_model *pmodel; /* --predictor-model, shared read-only */
	uint32_t top_k;
};

struct client {
	uint32_t id;              /* connection number (moectl clients) */
	uint32_t cache_id;        /* client id towards the cache */
	unsigned idx;             /* slot in srv->clients */
	int fd;
	uid_t uid;
	gid_t gid;
	pid_t pid;                /* shown only; never used for access decisions */
	bool admin, data, hello_done;
	char name[32];
	struct model *m;
	uint16_t version;
	_Atomic int state;
	/* Set once HELLO set up the rings, leases and model (release): only
	 * then may the ring thread serve the client. The region pointer alone
	 * is not enough, it is published before the rings are attached. */
	_Atomic bool ring_ready;
	/* data plane */
	int ring_fd;
	uint8_t *region;
	uint64_t region_bytes;
	struct moet_ring_region reg;
	struct ring sq, cq;
	pthread_mutex_t lock;     /* lease table (ring thread vs socket SUBMIT) */
	struct lease_rec *leases;
	uint32_t n_leases_max, n_leases_used, lease_hint;
	struct parked *parked;    /* ring thread only */
	uint32_t n_parked, max_parked;
	struct placement *pl;     /* this stream's predictor + prefetch [lock] */
	bool pl_failed;           /* creating it failed once: do not retry */
	_Atomic uint64_t ops;
};

struct server {
	struct moetierd_config *cfg;
	struct model *models;
	unsigned n_models;
	int listen_fd, epfd, sig_fd, timer_fd, reap_fd;
	gid_t sock_gid, admin_gid;
	bool have_sock_gid, have_admin_gid;
	char *sock_path;
	pthread_mutex_t lock;     /* clients[] membership */
	struct client **clients;
	unsigned max_clients;
	uint32_t next_id;
	uint32_t ctl_word;        /* ring thread's private futex word */
	_Atomic bool stop_ring, stop_loop;
	pthread_t ring_thread;
	bool ring_started;
	_Atomic int ring_cpu;
	_Atomic uint64_t counters[SERVER__COUNT];
	uint64_t watchdog_usec;
	uint64_t start_ns;
};

static const char *const counter_names[] = {
#define X(id, help) #id,
	SERVER_COUNTERS(X)
#undef X
};

static inline void cnt(struct server *s, enum server_counter c)
{
	atomic_fetch_add_explicit(&s->counters[c], 1, memory_order_relaxed);
}

uint64_t server_counter(const struct server *s, enum server_counter id)
{
	return atomic_load_explicit(&((struct server *)s)->counters[id], memory_order_relaxed);
}

unsigned server_n_models(const struct server *s) { return s->n_models; }
struct cache *server_model_cache(struct server *s, unsigned i) { return i < s->n_models ? s->models[i].cache : NULL; }

static void kick_ring(struct server *s)
{
	__atomic_add_fetch(&s->ctl_word, 1, __ATOMIC_SEQ_CST);
	syscall(SYS_futex, &s->ctl_word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* ---- shared state (residency bitmaps under a seqlock, counters) -------- */

static uint32_t *layer_seq(struct model *m, uint32_t l)
{
	return (uint32_t *)(m->shared + m->hdr->layer_off + (uint64_t)l * m->hdr->layer_stride);
}

static uint64_t *layer_bits(struct model *m, uint32_t l, unsigned tier)
{
	return (uint64_t *)(m->shared + m->hdr->layer_off + (uint64_t)l * m->hdr->layer_stride + 8) +
	       (size_t)tier * m->words;
}

static struct moet_expert_counters *expert_ctr(struct model *m, uint32_t l, uint32_t e)
{
	return (struct moet_expert_counters *)(m->shared + m->hdr->counters_off) + (size_t)l * m->n_experts + e;
}

/* Copies the cache's bitmaps of layer l into shared memory when they
 * changed; the seq word is bumped (and waiters woken) only then. */
static void refresh_layer(struct model *m, uint32_t l, bool force_wake)
{
	uint64_t tmp[2][64];
	bool changed = false;
	if (m->words > 64)
		return;
	for (unsigned t = 0; t < 2; t++) {
		memset(tmp[t], 0, sizeof(tmp[t]));
		if (m->arena[t].n_slots)
			cache_residency_bitmap(m->cache, (enum cache_tier)t, l, tmp[t], m->words);
		if (memcmp(tmp[t], layer_bits(m, l, t), m->words * 8))
			changed = true;
	}
	if (!changed && !force_wake)
		return;
	uint32_t *seq = layer_seq(m, l);
	__atomic_add_fetch(seq, 1, __ATOMIC_SEQ_CST); /* odd: writing */
	for (unsigned t = 0; t < 2; t++)
		for (uint32_t w = 0; w < m->words; w++)
			__atomic_store_n(&layer_bits(m, l, t)[w], tmp[t][w], __ATOMIC_RELAXED);
	__atomic_add_fetch(seq, 1, __ATOMIC_SEQ_CST); /* even: stable */
	syscall(SYS_futex, seq, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static void refresh_model(struct model *m, bool all)
{
	for (uint32_t l = 0; l < m->n_layers; l++) {
		uint64_t bit = 1ull << (l % 64);
		uint64_t d = atomic_fetch_and(&m->dirty[l / 64], ~bit);
		if (all || (d & bit))
			refresh_layer(m, l, (d & bit) != 0);
	}
}

static void on_ready(void *ctx, uint32_t layer, uint32_t expert, enum cache_tier tier, int status)
{
	struct model *m = ctx;
	if (layer >= m->n_layers || expert >= m->n_experts)
		return;
	if (status == 0 && m->hdr) {
		struct moet_expert_counters *c = expert_ctr(m, layer, expert);
		__atomic_add_fetch(&c->loads, 1, __ATOMIC_RELAXED);
		__atomic_add_fetch(&c->bytes, m->pack->hdr->extent_payload, __ATOMIC_RELAXED);
	}
	(void)tier;
	atomic_fetch_or(&m->dirty[layer / 64], 1ull << (layer % 64));
	if (m->srv)
		kick_ring(m->srv);
}

static int reopen_ro(int fd)
{
	char p[64];
	snprintf(p, sizeof(p), "/proc/self/fd/%d", fd);
	return open(p, O_RDONLY | O_CLOEXEC);
}

static int make_shared(struct model *m, struct moe_error *err)
{
	uint64_t layer_stride = MOE_ALIGN_UP(8 + 16ull * m->words, 64);
	uint64_t layer_off = 4096;
	uint64_t ctr_off = MOE_ALIGN_UP(layer_off + layer_stride * m->n_layers, 4096);
	uint64_t total = MOE_ALIGN_UP(ctr_off + sizeof(struct moet_expert_counters) * m->n_layers * m->n_experts, 4096);
	m->shared_fd = memfd_create("moetier-shared", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (m->shared_fd < 0)
		return moe_error_set(err, -errno, "memfd_create: %s", strerror(errno));
	if (ftruncate(m->shared_fd, (off_t)total))
		return moe_error_set(err, -errno, "ftruncate shared state: %s", strerror(errno));
	m->shared = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, m->shared_fd, 0);
	if (m->shared == MAP_FAILED) {
		m->shared = NULL;
		return moe_error_set(err, -errno, "mmap shared state: %s", strerror(errno));
	}
	m->shared_bytes = total;
	m->hdr = (struct moet_shared_hdr *)m->shared;
	m->hdr->magic = MOET_SHARED_MAGIC;
	m->hdr->version = MOET_PROTO_VERSION;
	m->hdr->n_moe_layers = m->n_layers;
	m->hdr->n_experts = m->n_experts;
	m->hdr->bitmap_words = m->words;
	m->hdr->layer_off = layer_off;
	m->hdr->layer_stride = layer_stride;
	m->hdr->counters_off = ctr_off;
	m->hdr->total_bytes = total;
	/* Clients can neither resize it nor map it writable; our own mapping
	 * stays writable (F_SEAL_FUTURE_WRITE, platform.md section 7). */
	if (fcntl(m->shared_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL))
		moe_warn("sealing the shared state memfd: %s (clients still get a read-only fd)", strerror(errno));
	return 0;
}

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

static int bind_socket(struct server *s, struct moe_error *err)
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

static int send_msg(int fd, uint16_t type, uint32_t seq, int32_t status, uint32_t arg, const void *payload,
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

static int send_error(struct server *s, struct client *c, uint32_t seq, int status, const char *fmt, ...)
	MOE_PRINTF(5, 6);
static int send_error(struct server *s, struct client *c, uint32_t seq, int status, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	(void)s;
	moe_debug("client %u: %s", c->id, msg);
	return send_msg(c->fd, MOET_MSG_ERROR, seq, status, 0, msg, (uint32_t)strlen(msg) + 1, NULL, 0);
}

/* Sends text back as a sealed memfd (no size limit on replies). */
static int send_text(struct client *c, uint32_t seq, const char *text)
{
	size_t len = strlen(text);
	int fd = memfd_create("moetier-reply", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0)
		return -errno;
	int rc = moe_write_full(fd, text, len);
	if (rc == 0)
		fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL);
	if (rc == 0)
		rc = send_msg(c->fd, MOET_MSG_OK, seq, 0, 0, NULL, 0, &fd, 1);
	close(fd);
	return rc;
}

/* ---- leases -------------------------------------------------------------- */

static int lease_alloc(struct client *c, uint32_t *idx)
{
	for (uint32_t k = 0; k < c->n_leases_max; k++) {
		uint32_t i = (c->lease_hint + k) % c->n_leases_max;
		if (!c->leases[i].used) {
			c->leases[i].used = true;
			c->leases[i].n = 0;
			c->leases[i].gen++;
			c->lease_hint = i + 1;
			c->n_leases_used++;
			*idx = i;
			return 0;
		}
	}
	return -ENOSPC;
}

static uint64_t lease_id(struct client *c, uint32_t idx)
{
	return ((uint64_t)c->leases[idx].gen << 32) | (idx + 1);
}

static void lease_drop(struct model *m, struct client *c, uint32_t idx)
{
	struct lease_rec *r = &c->leases[idx];
	for (unsigned i = 0; i < r->n; i++)
		cache_release(m->cache, c->cache_id, &r->l[i]);
	r->n = 0;
	r->used = false;
	c->n_leases_used--;
}

static int lease_release(struct client *c, uint64_t id)
{
	uint32_t idx = (uint32_t)(id & 0xffffffffu);
	uint32_t gen = (uint32_t)(id >> 32);
	if (idx == 0 || idx > c->n_leases_max)
		return -ESTALE;
	idx--;
	if (!c->leases[idx].used || c->leases[idx].gen != gen)
		return -ESTALE;
	lease_drop(c->m, c, idx);
	return 0;
}

/* ---- executing entries ---------------------------------------------------- */

static int check_ids(struct model *m, const struct moet_sqe *q)
{
	if (q->count == 0)
		return -EINVAL;
	if (q->count > MOET_MAX_BATCH)
		return -E2BIG;
	if (q->layer >= m->n_layers)
		return -ERANGE;
	for (unsigned i = 0; i < q->count; i++)
		if (q->ids[i] >= m->n_experts)
			return -ERANGE;
	return 0;
}

/* Tries the experts of `out` that are still missing (slot -1) and fills in
 * the ones served. Returns how many are still missing but may yet load
 * (-EAGAIN: loading; -ENOBUFS: no free slot right now). */
static unsigned try_acquire(struct client *c, uint32_t layer, struct moet_cqe *out, uint32_t lidx, unsigned flags)
{
	struct model *m = c->m;
	struct cache_key keys[MOET_MAX_BATCH];
	struct cache_loc locs[MOET_MAX_BATCH];
	unsigned map[MOET_MAX_BATCH], n = 0, pending = 0;
	for (unsigned i = 0; i < out->count; i++)
		if (out->slot[i] < 0) {
			keys[n].layer = layer;
			keys[n].expert = out->ids[i];
			map[n++] = i;
		}
	if (!n)
		return 0;
	unsigned cf = CACHE_NOWAIT | ((flags & MOET_F_WANT_GPU) ? CACHE_WANT_GPU : 0);
	int rc = cache_acquire(m->cache, c->cache_id, keys, n, cf, locs);
	if (rc < 0) {
		out->result = rc;
		return 0;
	}
	struct lease_rec *r = &c->leases[lidx];
	for (unsigned j = 0; j < n; j++) {
		unsigned i = map[j];
		if (locs[j].status == 0) {
			out->slot[i] = (int32_t)locs[j].slot;
			out->tier[i] = locs[j].tier;
			r->l[r->n++] = locs[j].lease;
			out->n_hit++;
		} else if (locs[j].status == -EAGAIN || locs[j].status == -ENOBUFS) {
			pending++;
		}
	}
	return pending;
}

static void count_hits(struct model *m, uint32_t layer, const struct moet_cqe *out)
{
	for (unsigned i = 0; i < out->count; i++) {
		struct moet_expert_counters *e = expert_ctr(m, layer, out->ids[i]);
		if (out->slot[i] >= 0)
			__atomic_add_fetch(&e->hits, 1, __ATOMIC_RELAXED);
		else
			__atomic_add_fetch(&e->misses, 1, __ATOMIC_RELAXED);
	}
}

static void finish_acquire(struct client *c, struct moet_cqe *out, uint32_t lidx)
{
	out->n_miss = 0;
	for (unsigned i = 0; i < out->count; i++)
		if (out->slot[i] < 0)
			out->n_miss++;
	if (out->result >= 0)
		out->result = (int32_t)out->n_hit;
	if (c->leases[lidx].n == 0) {
		c->leases[lidx].used = false;
		c->n_leases_used--;
		out->lease = 0;
	} else {
		out->lease = lease_id(c, lidx);
	}
}

struct compute_lookup {
	uint32_t n;
	uint16_t expert[ROUTE_MAX_EXPERTS]; /* open_model caps n_experts at this */
	const void *ptr[ROUTE_MAX_EXPERTS];
};

static const void *lookup_leased(void *ctx, uint32_t layer, uint32_t expert)
{
	struct compute_lookup *lk = ctx;
	(void)layer;
	for (uint32_t i = 0; i < lk->n; i++)
		if (lk->expert[i] == expert)
			return lk->ptr[i];
	return NULL;
}

/* COMPUTE (see proto.h): the inputs are copied out of the scratch area once,
 * checked, the distinct experts leased on the host tier for the duration,
 * the FFNs run, and y copied back. Runs on the ring thread: a long request
 * delays other clients by its compute time. */
static int exec_compute(struct client *c, const struct moet_sqe *q, struct moet_cqe *out)
{
	struct model *m = c->m;
	struct moet_compute_args a;
	uint64_t n = m->pack->model->hidden, need;
	if (q->layer >= m->n_layers)
		return -ERANGE;
	if (!c->region || (q->data_off & 3) || q->data_off > c->reg.scratch_bytes ||
	    q->data_len > c->reg.scratch_bytes - q->data_off || q->data_len < sizeof(a))
		return -EFAULT;
	const uint8_t *base = c->region + c->reg.scratch_off + q->data_off;
	memcpy(&a, base, sizeof(a));
	if (a.tokens == 0 || a.k == 0 || a.k > MOET_MAX_BATCH || a.tokens > 4096)
		return a.tokens > 4096 ? -E2BIG : -EINVAL;
	uint64_t tk = (uint64_t)a.tokens * a.k, tn = (uint64_t)a.tokens * n;
	need = sizeof(a) + tk * 8 + tn * 8;
	if (need > q->data_len)
		return -EFAULT;
	size_t in_bytes = sizeof(a) + tk * 8 + tn * 4;
	uint8_t *buf = malloc(in_bytes + tn * 4);
	struct compute_lookup *lk = calloc(1, sizeof(*lk));
	struct cache_key *keys = calloc(m->n_experts, sizeof(*keys));
	struct cache_loc *locs = calloc(m->n_experts, sizeof(*locs));
	int rc = 0;
	if (!buf || !lk || !keys || !locs) {
		rc = -ENOMEM;
		goto out;
	}
	memcpy(buf, base, in_bytes);
	const uint32_t *experts = (const uint32_t *)(buf + sizeof(a));
	const float *weights = (const float *)(buf + sizeof(a) + tk * 4);
	const float *x = (const float *)(buf + sizeof(a) + tk * 8);
	float *y = (float *)(buf + in_bytes);
	for (uint64_t i = 0; i < tk; i++) {
		if (experts[i] >= m->n_experts) {
			rc = -ERANGE;
			goto out;
		}
		{
			bool seen = false;
			for (uint32_t j = 0; j < lk->n && !seen; j++)
				seen = lk->expert[j] == experts[i];
			if (!seen) {
				keys[lk->n] = (struct cache_key){ q->layer, experts[i] };
				lk->expert[lk->n++] = (uint16_t)experts[i];
			}
		}
	}
	rc = cache_acquire(m->cache, c->cache_id, keys, lk->n, CACHE_NOWAIT, locs);
	if (rc < 0)
		goto out;
	uint32_t missing = 0;
	for (uint32_t i = 0; i < lk->n; i++) {
		lk->ptr[i] = NULL;
		if (locs[i].status == 0 && locs[i].tier == CACHE_TIER_HOST)
			lk->ptr[i] = cache_slot_ptr(m->cache, CACHE_TIER_HOST, locs[i].slot);
		if (!lk->ptr[i])
			missing++;
	}
	out->n_miss = missing;
	out->n_hit = lk->n - missing;
	if (missing) {
		rc = -EAGAIN;
	} else {
		struct moe_error err;
		rc = compute_run(m->compute, q->layer, a.tokens, x, n, a.k, experts, weights, y, n, lookup_leased, lk, &err);
		if (rc == 0) {
			memcpy(c->region + c->reg.scratch_off + q->data_off + in_bytes, y, tn * 4);
			rc = (int)a.tokens;
		} else {
			moe_debug("client %u: compute: %s", c->id, err.msg);
		}
	}
	for (uint32_t i = 0; i < lk->n; i++)
		if (locs[i].status == 0)
			cache_release(m->cache, c->cache_id, &locs[i].lease);
out:
	free(buf);
	free(lk);
	free(keys);
	free(locs);
	return rc;
}

/* The client's placement (under c->lock), created at its first use; NULL
 * when the model runs no predictor. */
static struct placement *client_placement(struct client *c)
{
	struct model *m = c->m;
	if (c->pl || c->pl_failed || !m || !placement_enabled(&m->plc))
		return c->pl;
	struct moe_error err;
	if (placement_create(m->cache, m->n_layers, m->n_experts, m->top_k, m->pack->hdr->extent_payload, &m->plc,
			     &c->pl, &err) < 0) {
		moe_warn("client %u: no placement: %s", c->id, err.msg);
		c->pl_failed = true;
	}
	return c->pl;
}

/* Runs one entry (already copied out of shared memory). Returns 1 when the
 * completion is ready in *out, 0 when the entry was parked (ring only). */
static int exec_entry(struct server *s, struct client *c, const struct moet_sqe *q, struct moet_cqe *out,
		      bool may_park)
{
	struct model *m = c->m;
	int rc = 0;
	memset(out, 0, sizeof(*out));
	out->user_tag = q->user_tag;
	out->opcode = q->opcode;
	out->flags = q->flags;
	if (q->flags & ~(MOET_F_NOWAIT | MOET_F_WANT_GPU)) {
		rc = -EINVAL;
		goto bad;
	}
	switch (q->opcode) {
	case MOET_OP_NOP:
		/* A NOP carrying a token hint announces the next token. */
		if (q->token_pos || q->token_key) {
			pthread_mutex_lock(&c->lock);
			placement_token(client_placement(c), q->token_key, q->token_pos);
			pthread_mutex_unlock(&c->lock);
		}
		out->result = 0;
		return 1;
	case MOET_OP_RELEASE:
		pthread_mutex_lock(&c->lock);
		rc = lease_release(c, q->lease);
		pthread_mutex_unlock(&c->lock);
		if (rc)
			goto bad;
		out->lease = q->lease;
		return 1;
	case MOET_OP_PREFETCH: {
		if ((rc = check_ids(m, q)))
			goto bad;
		if (q->tier > CACHE_TIER_HOST) {
			rc = -EINVAL;
			goto bad;
		}
		struct cache_key keys[MOET_MAX_BATCH];
		for (unsigned i = 0; i < q->count; i++)
			keys[i] = (struct cache_key){ q->layer, q->ids[i] };
		rc = cache_prefetch(m->cache, keys, q->count, (enum cache_tier)q->tier);
		out->result = rc < 0 ? rc : rc;
		out->count = q->count;
		return 1;
	}
	case MOET_OP_ACQUIRE:
	case MOET_OP_ROUTE: {
		struct moet_sqe local = *q;
		if (q->opcode == MOET_OP_ROUTE) {
			/* Logits come from the scratch area: bounds-checked, copied once. */
			float logits[ROUTE_MAX_EXPERTS];
			struct route_result rr;
			if (q->layer >= m->n_layers) {
				rc = -ERANGE;
				goto bad;
			}
			if (!c->region || q->data_len != m->n_experts * sizeof(float) || (q->data_off & 3) ||
			    q->data_off > c->reg.scratch_bytes || q->data_len > c->reg.scratch_bytes - q->data_off) {
				rc = -EFAULT;
				goto bad;
			}
			memcpy(logits, c->region + c->reg.scratch_off + q->data_off, q->data_len);
			if ((rc = route_topk(&m->rp, logits, &rr)))
				goto bad;
			local.count = (uint16_t)rr.n;
			for (unsigned i = 0; i < rr.n; i++) {
				local.ids[i] = (uint16_t)rr.experts[i];
				out->weight[i] = rr.weights[i];
			}
		}
		if ((rc = check_ids(m, &local)))
			goto bad;
		uint32_t lidx;
		pthread_mutex_lock(&c->lock);
		rc = lease_alloc(c, &lidx);
		if (rc) {
			pthread_mutex_unlock(&c->lock);
			goto bad;
		}
		out->count = local.count;
		for (unsigned i = 0; i < local.count; i++) {
			out->ids[i] = local.ids[i];
			out->slot[i] = -1;
			out->tier[i] = CACHE_TIER_NVME;
		}
		unsigned pending = try_acquire(c, q->layer, out, lidx, q->flags);
		/* Demand loads are queued first; then the predictor looks ahead. */
		placement_access(client_placement(c), q->layer, local.ids, local.count, q->token_key, q->token_pos);
		if (pending && may_park && !(q->flags & MOET_F_NOWAIT) && out->result >= 0 &&
		    c->n_parked < c->max_parked) {
			struct parked *p = &c->parked[c->n_parked++];
			p->sqe = local;
			p->cqe = *out;
			p->lease_idx = lidx;
			p->deadline_ns = moe_now_ns() + (uint64_t)s->cfg->wait_timeout_ms * 1000000ull;
			pthread_mutex_unlock(&c->lock);
			cnt(s, SERVER_parked_acquires);
			return 0;
		}
		finish_acquire(c, out, lidx);
		pthread_mutex_unlock(&c->lock);
		count_hits(m, q->layer, out);
		return 1;
	}
	case MOET_OP_COMPUTE:
		if (!m->compute) {
			rc = -EOPNOTSUPP;
			goto bad;
		}
		rc = exec_compute(c, q, out);
		if (rc < 0 && rc != -EAGAIN)
			goto bad;
		out->result = rc;
		return 1;
	default:
		rc = -EOPNOTSUPP;
		goto bad;
	}
bad:
	cnt(s, SERVER_bad_entries);
	out->result = rc;
	out->lease = 0;
	return 1;
}

/* Retries parked acquires; completes the ones done or out of time. */
static void retry_parked(struct server *s, struct client *c, uint64_t now)
{
	for (uint32_t i = 0; i < c->n_parked;) {
		struct parked *p = &c->parked[i];
		if (ring_space(&c->cq) == 0)
			return;
		pthread_mutex_lock(&c->lock);
		unsigned pending = try_acquire(c, p->sqe.layer, &p->cqe, p->lease_idx, p->sqe.flags);
		bool done = !pending || p->cqe.result < 0 || now >= p->deadline_ns;
		if (done)
			finish_acquire(c, &p->cqe, p->lease_idx);
		pthread_mutex_unlock(&c->lock);
		if (!done) {
			i++;
			continue;
		}
		count_hits(c->m, p->sqe.layer, &p->cqe);
		ring_push(&c->cq, &p->cqe);
		c->parked[i] = c->parked[--c->n_parked];
	}
	(void)s;
}

/* ---- the ring thread ------------------------------------------------------ */

static void client_teardown_data(struct server *s, struct client *c)
{
	/* Leases of the dead client go back to the cache: slots become
	 * evictable again. */
	size_t n = 0;
	if (c->m) {
		pthread_mutex_lock(&c->lock);
		n = cache_release_client(c->m->cache, c->cache_id);
		placement_destroy(c->pl);
		c->pl = NULL;
		for (uint32_t i = 0; i < c->n_leases_max; i++)
			c->leases[i].used = false;
		c->n_leases_used = 0;
		c->n_parked = 0;
		pthread_mutex_unlock(&c->lock);
	}
	atomic_fetch_add(&s->counters[SERVER_leases_reclaimed], n);
	if (c->region) {
		munmap(c->region, c->region_bytes);
		c->region = NULL;
	}
}

struct fwaitv {
	uint64_t val;
	uint64_t uaddr;
	uint32_t flags;
	uint32_t reserved;
};
#define FUTEX2_SIZE_U32 0x02
#define FUTEX2_PRIVATE 128

static void *ring_main(void *arg)
{
	struct server *s = arg;
	struct client **local = calloc(s->max_clients, sizeof(*local));
	struct fwaitv *wv = calloc(s->max_clients + 1, sizeof(*wv));
	unsigned n_local = 0;
	uint32_t seen_ctl = ~0u;
	uint64_t last_work = moe_now_ns();
	bool have_waitv = true;
	if (!local || !wv) {
		moe_err("ring thread: out of memory");
		free(local);
		free(wv);
		return NULL;
	}
	while (!atomic_load(&s->stop_ring)) {
		uint32_t ctl = __atomic_load_n(&s->ctl_word, __ATOMIC_ACQUIRE);
		uint64_t now = moe_now_ns();
		bool work = false;
		if (ctl != seen_ctl) {
			seen_ctl = ctl;
			pthread_mutex_lock(&s->lock);
			n_local = 0;
			for (unsigned i = 0; i < s->max_clients; i++) {
				struct client *c = s->clients[i];
				if (!c)
					continue;
				int st = atomic_load(&c->state);
				if (st == CL_CLOSING && c->region) {
					client_teardown_data(s, c);
					atomic_store(&c->state, CL_DEAD);
					uint64_t one = 1;
					if (write(s->reap_fd, &one, 8) < 0)
						moe_warn("reap eventfd: %s", strerror(errno));
					continue;
				}
				if (st == CL_ACTIVE && atomic_load_explicit(&c->ring_ready, memory_order_acquire))
					local[n_local++] = c;
			}
			pthread_mutex_unlock(&s->lock);
			for (unsigned i = 0; i < s->n_models; i++)
				refresh_model(&s->models[i], false);
			for (unsigned i = 0; i < n_local; i++)
				if (local[i]->n_parked)
					retry_parked(s, local[i], now);
		}
		for (unsigned i = 0; i < n_local; i++) {
			struct client *c = local[i];
			struct moet_sqe q;
			struct moet_cqe out;
			for (unsigned k = 0; k < 64 && ring_space(&c->cq) > 0; k++) {
				int rc = ring_pop(&c->sq, &q);
				if (rc <= 0)
					break;
				work = true;
				cnt(s, SERVER_ring_entries);
				atomic_fetch_add_explicit(&c->ops, 1, memory_order_relaxed);
				if (exec_entry(s, c, &q, &out, true))
					ring_push(&c->cq, &out);
			}
			if (c->n_parked && now >= c->parked[0].deadline_ns)
				retry_parked(s, c, now);
		}
		if (work) {
			last_work = now;
			continue;
		}
		uint32_t spin_ns = s->cfg->ring_spin_us * 1000u;
		if (now - last_work < spin_ns) {
			/* Yield while polling: on a shared vCPU the peer must run. */
			sched_yield();
			continue;
		}
		/* Sleep: announce on every ring, re-check, then wait on all tails. */
		uint64_t t_refresh = now;
		for (unsigned i = 0; i < s->n_models; i++)
			if (now - s->models[i].last_refresh_ns > 200000000ull) {
				refresh_model(&s->models[i], true);
				s->models[i].last_refresh_ns = t_refresh;
			}
		unsigned nw = 0;
		wv[nw++] = (struct fwaitv){ seen_ctl, (uintptr_t)&s->ctl_word, FUTEX2_SIZE_U32 | FUTEX2_PRIVATE, 0 };
		bool ready = false;
		uint64_t deadline = now + 200000000ull;
		for (unsigned i = 0; i < n_local; i++) {
			ring_set_waiting(&local[i]->sq, true);
			if (local[i]->n_parked)
				deadline = MOE_MIN(deadline, now + 5000000ull);
		}
		for (unsigned i = 0; i < n_local; i++) {
			uint32_t t = ring_tail_snapshot(&local[i]->sq);
			if (t != local[i]->sq.local)
				ready = true;
			wv[nw++] = (struct fwaitv){ t, (uintptr_t)ring_futex_word(&local[i]->sq), FUTEX2_SIZE_U32, 0 };
		}
		if (__atomic_load_n(&s->ctl_word, __ATOMIC_ACQUIRE) != seen_ctl)
			ready = true;
		if (!ready && !atomic_load(&s->stop_ring)) {
			cnt(s, SERVER_ring_sleeps);
			struct timespec ts = { (time_t)(deadline / 1000000000ull), (long)(deadline % 1000000000ull) };
			if (have_waitv) {
				long rc = syscall(SYS_futex_waitv, wv, nw, 0, &ts, CLOCK_MONOTONIC);
				if (rc < 0 && errno == ENOSYS)
					have_waitv = false;
			}
			if (!have_waitv) {
				struct timespec d = { 0, 200000 };
				nanosleep(&d, NULL);
			}
		}
		for (unsigned i = 0; i < n_local; i++)
			ring_set_waiting(&local[i]->sq, false);
		last_work = moe_now_ns();
		if (spin_ns == 0)
			last_work -= 1;
	}
	free(local);
	free(wv);
	return NULL;
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

static void accept_one(struct server *s)
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
		cnt(s, SERVER_clients_refused);
		close(fd);
		return;
	}
	if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &gl) == 0)
		ngroups = (int)(gl / sizeof(gid_t));
	struct client *c = calloc(1, sizeof(*c));
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
	pthread_mutex_lock(&s->lock);
	unsigned idx = s->max_clients;
	for (unsigned i = 0; i < s->max_clients; i++)
		if (!s->clients[i]) {
			idx = i;
			break;
		}
	if (idx < s->max_clients) {
		s->clients[idx] = c;
		c->idx = idx;
		c->cache_id = idx + 1;
		c->id = ++s->next_id;
	}
	pthread_mutex_unlock(&s->lock);
	if (idx == s->max_clients) {
		send_error(s, c, 0, -EUSERS, "too many clients (max-clients = %u)", s->max_clients);
		cnt(s, SERVER_clients_refused);
		close(fd);
		pthread_mutex_destroy(&c->lock);
		free(c);
		return;
	}
	struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.ptr = c };
	epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev);
}

static void client_free(struct client *c)
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

static void client_close(struct server *s, struct client *c)
{
	if (c->fd >= 0) {
		epoll_ctl(s->epfd, EPOLL_CTL_DEL, c->fd, NULL);
		close(c->fd);
		c->fd = -1;
	}
	if (c->hello_done)
		cnt(s, SERVER_clients_closed);
	if (c->region) {
		/* The ring thread drops its leases, then marks it DEAD. */
		atomic_store(&c->state, CL_CLOSING);
		kick_ring(s);
		return;
	}
	if (c->m)
		cache_release_client(c->m->cache, c->cache_id);
	pthread_mutex_lock(&s->lock);
	s->clients[c->idx] = NULL;
	pthread_mutex_unlock(&s->lock);
	client_free(c);
}

static void reap_dead(struct server *s)
{
	uint64_t v;
	if (read(s->reap_fd, &v, 8) < 0 && errno != EAGAIN)
		moe_warn("reap eventfd: %s", strerror(errno));
	pthread_mutex_lock(&s->lock);
	for (unsigned i = 0; i < s->max_clients; i++) {
		struct client *c = s->clients[i];
		if (c && atomic_load(&c->state) == CL_DEAD) {
			s->clients[i] = NULL;
			client_free(c);
		}
	}
	pthread_mutex_unlock(&s->lock);
}

static int setup_ring(struct server *s, struct client *c, struct moe_error *err)
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

static void do_hello(struct server *s, struct client *c, const struct moet_msg *h, const uint8_t *payload)
{
	struct moet_hello hello;
	struct moe_error err = { "" };
	if (h->len != sizeof(hello)) {
		send_error(s, c, h->seq, -EPROTO, "HELLO: payload is %u bytes, expected %zu", h->len, sizeof(hello));
		goto refuse;
	}
	memcpy(&hello, payload, sizeof(hello));
	if (hello.version_min > MOET_PROTO_VERSION || hello.version_max < MOET_PROTO_MIN_VERSION ||
	    hello.version_min > hello.version_max) {
		send_error(s, c, h->seq, -EPROTONOSUPPORT,
			   "protocol version mismatch: client speaks %u..%u, moetierd %u..%u", hello.version_min,
			   hello.version_max, MOET_PROTO_MIN_VERSION, MOET_PROTO_VERSION);
		goto refuse;
	}
	bool control_only = hello.flags & MOET_HELLO_CONTROL_ONLY;
	if (!c->data && !(control_only && c->admin)) {
		moe_info("refused uid %u gid %u: not in the socket group", (unsigned)c->uid, (unsigned)c->gid);
		send_error(s, c, h->seq, -EACCES, "uid %u (gid %u) may not use moetierd: not in group '%s'",
			   (unsigned)c->uid, (unsigned)c->gid, s->cfg->socket_group);
		goto refuse;
	}
	hello.client_name[sizeof(hello.client_name) - 1] = '\0';
	hello.model[sizeof(hello.model) - 1] = '\0';
	struct model *m = NULL;
	for (unsigned i = 0; i < s->n_models; i++)
		if (!hello.model[0] || !strcmp(hello.model, s->models[i].name)) {
			m = &s->models[i];
			break;
		}
	if (!m) {
		send_error(s, c, h->seq, -ENOENT, "no model named '%s' is served", hello.model);
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
			send_error(s, c, h->seq, -ENOMEM, "%s", err.msg);
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
	if (send_msg(c->fd, MOET_MSG_HELLO_REPLY, h->seq, 0, 0, &r, sizeof(r), fds, nfds)) {
		client_close(s, c);
		return;
	}
	c->hello_done = true;
	if (c->region)
		atomic_store_explicit(&c->ring_ready, true, memory_order_release);
	cnt(s, SERVER_clients_accepted);
	moe_info("client %u attached: '%s' uid %u gid %u pid %d model %s%s", c->id, c->name, (unsigned)c->uid,
		 (unsigned)c->gid, (int)c->pid, m->name, c->admin ? " (admin)" : "");
	if (c->region)
		kick_ring(s);
	return;
refuse:
	cnt(s, SERVER_clients_refused);
	client_close(s, c);
}

static char *render_clients(struct server *s)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);
	if (!f)
		return NULL;
	fprintf(f, "%-6s %-8s %-6s %-6s %-16s %-16s %-7s %s\n", "id", "pid", "uid", "gid", "name", "model", "leases", "ops");
	pthread_mutex_lock(&s->lock);
	for (unsigned i = 0; i < s->max_clients; i++) {
		struct client *c = s->clients[i];
		if (!c || !c->hello_done || atomic_load(&c->state) != CL_ACTIVE)
			continue;
		fprintf(f, "%-6u %-8d %-6u %-6u %-16s %-16s %-7u %" PRIu64 "\n", c->id, (int)c->pid, (unsigned)c->uid,
			(unsigned)c->gid, c->name[0] ? c->name : "-", c->m ? c->m->name : "-", c->n_leases_used,
			atomic_load(&c->ops));
	}
	pthread_mutex_unlock(&s->lock);
	fclose(f);
	return buf;
}

static void render_compute(FILE *f, json_t *jm, uint32_t fmt, const struct model *m, bool first);

static char *render_stats(struct server *s, uint32_t fmt)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);
	if (!f)
		return NULL;
	json_t *root = fmt == MOET_STATS_JSON ? json_object() : NULL;
	json_t *srv = root ? json_object() : NULL;
	if (fmt == MOET_STATS_TEXT)
		fprintf(f, "moetierd %s, up %.1f s, protocol %u\n", PACKAGE_VERSION,
			(double)(moe_now_ns() - s->start_ns) / 1e9, MOET_PROTO_VERSION);
	for (unsigned i = 0; i < SERVER__COUNT; i++) {
		uint64_t v = server_counter(s, (enum server_counter)i);
		if (fmt == MOET_STATS_TEXT)
			fprintf(f, "  server_%-26s %" PRIu64 "\n", counter_names[i], v);
		else if (fmt == MOET_STATS_JSON)
			json_object_set_new(srv, counter_names[i], json_integer((json_int_t)v));
		else
			fprintf(f, "# TYPE moetier_server_%s counter\nmoetier_server_%s %" PRIu64 "\n", counter_names[i],
				counter_names[i], v);
	}
	if (root) {
		json_object_set_new(root, "server", srv);
		json_object_set_new(root, "models", json_object());
	}
	for (unsigned i = 0; i < s->n_models; i++) {
		struct model *m = &s->models[i];
		struct stats_snapshot snap;
		if (stats_snapshot(cache_stats(m->cache), &snap))
			continue;
		char *r = fmt == MOET_STATS_JSON ? stats_render_json(&snap, true)
			: fmt == MOET_STATS_PROMETHEUS ? stats_render_prometheus(&snap, i == 0)
						       : stats_render_text(&snap, false);
		stats_snapshot_free(&snap);
		if (!r)
			continue;
		if (fmt == MOET_STATS_TEXT) {
			fprintf(f, "\nmodel %s (%s engine)\n%s", m->name, cache_io_engine(m->cache), r);
			render_compute(f, NULL, fmt, m, true);
		} else if (fmt == MOET_STATS_JSON) {
			json_error_t je;
			json_t *j = json_loads(r, 0, &je);
			if (j) {
				if (json_is_object(j))
					render_compute(f, j, fmt, m, true);
				json_object_set_new(json_object_get(root, "models"), m->name, j);
			}
		} else if (i == 0) {
			/* One model per exposition: metric names carry no model label. */
			fputs(r, f);
			render_compute(f, NULL, fmt, m, true);
		}
		free(r);
	}
	if (root) {
		char *j = json_dumps(root, JSON_INDENT(2) | JSON_SORT_KEYS);
		if (j) {
			fprintf(f, "%s\n", j);
			free(j);
		}
		json_decref(root);
	}
	fclose(f);
	return buf;
}


/* Move or compute, per expert, from where it is now and the cost model. */
static void do_advise(struct server *s, struct client *c, const struct moet_msg *h, const uint8_t *payload)
{
	struct moet_advise_req q;
	struct moet_advise_reply r;
	if (!c->m || h->len != sizeof(q)) {
		cnt(s, SERVER_bad_messages);
		send_error(s, c, h->seq, -EPROTO, "ADVISE: expected one %zu-byte request from a model client", sizeof(q));
		return;
	}
	memcpy(&q, payload, sizeof(q));
	struct model *m = c->m;
	if (!m->compute) {
		send_error(s, c, h->seq, -EOPNOTSUPP, "ADVISE: no cost model for model %s (COMPUTE not offered)", m->name);
		return;
	}
	if (q.n > MOET_MAX_BATCH || q.layer >= m->n_layers || q.tokens == 0 || q.tokens > (1u << 20)) {
		cnt(s, SERVER_bad_messages);
		send_error(s, c, h->seq, -EINVAL, "ADVISE: layer %u (of %u), %u experts (max %u), %u tokens out of range",
			   q.layer, m->n_layers, q.n, MOET_MAX_BATCH, q.tokens);
		return;
	}
	uint64_t gw[64] = { 0 }, hw[64] = { 0 }; /* n_experts <= 4096 */
	if (cache_residency_bitmap(m->cache, CACHE_TIER_GPU, q.layer, gw, 64) < 0)
		memset(gw, 0, sizeof(gw));
	if (cache_residency_bitmap(m->cache, CACHE_TIER_HOST, q.layer, hw, 64) < 0)
		memset(hw, 0, sizeof(hw));
	memset(&r, 0, sizeof(r));
	r.n = q.n;
	for (uint32_t i = 0; i < q.n; i++) {
		uint32_t e = q.ids[i];
		if (e >= m->n_experts) {
			cnt(s, SERVER_bad_messages);
			send_error(s, c, h->seq, -EINVAL, "ADVISE: expert %u out of range (%u experts)", e, m->n_experts);
			return;
		}
		bool on_gpu = gw[e / 64] >> (e % 64) & 1, on_host = hw[e / 64] >> (e % 64) & 1;
		struct compute_decision d;
		compute_decide(m->compute, on_gpu ? COMPUTE_TIER_GPU : on_host ? COMPUTE_TIER_HOST : COMPUTE_TIER_NVME,
			       q.tokens, &d);
		r.where[i] = d.where == COMPUTE_ON_HOST ? MOET_WHERE_HOST : MOET_WHERE_MOVE;
		r.tier[i] = on_gpu ? 0 : on_host ? 1 : 2;
		r.host_us[i] = (float)(d.host_s * 1e6);
		r.move_us[i] = (float)(d.move_s * 1e6);
	}
	send_msg(c->fd, MOET_MSG_OK, h->seq, 0, 0, &r, sizeof(r), NULL, 0);
}

/* The cost model's inputs and decisions, in the stats of each model. */
static void render_compute(FILE *f, json_t *jm, uint32_t fmt, const struct model *m, bool first)
{
	struct compute_model cm;
	struct compute_counters cc;
	if (!m->compute)
		return;
	compute_get_model(m->compute, &cm);
	compute_get_counters(m->compute, &cc);
	const struct {
		const char *name;
		double v;
	} in[] = {
		{ "expert_bytes", (double)cm.expert_bytes },
		{ "flops_per_token", (double)cm.flops_per_token },
		{ "host_bytes_per_s", cm.host_Bps },
		{ "host_flops", cm.host_flops },
		{ "host_fixed_us", cm.host_fixed_s * 1e6 },
		{ "host_rates_measured", cm.measured ? 1.0 : 0.0 },
		{ "nvme_to_host_bytes_per_s", cm.nvme_to_host_Bps },
		{ "host_to_gpu_bytes_per_s", cm.host_to_gpu_Bps },
		{ "gpu_flops", cm.gpu_flops },
	};
	json_t *jc = jm ? json_object() : NULL;
	if (fmt == MOET_STATS_TEXT)
		fprintf(f, "compute (%s kernels; cost model inputs, then counters)\n", ffn_isa_name(cm.isa));
	for (size_t i = 0; i < MOE_ARRAY_SIZE(in); i++) {
		if (fmt == MOET_STATS_TEXT)
			fprintf(f, "  compute_%-26s %.6g\n", in[i].name, in[i].v);
		else if (jc)
			json_object_set_new(jc, in[i].name, json_real(in[i].v));
		else if (first)
			fprintf(f, "# TYPE moetier_compute_%s gauge\nmoetier_compute_%s %.9g\n", in[i].name, in[i].name,
				in[i].v);
	}
	for (unsigned i = 0; i < COMPUTE_CTR_COUNT; i++) {
		const char *name = compute_counter_name((enum compute_counter)i);
		uint64_t v = compute_counter_value(&cc, (enum compute_counter)i);
		if (fmt == MOET_STATS_TEXT)
			fprintf(f, "  compute_%-26s %" PRIu64 "\n", name, v);
		else if (jc)
			json_object_set_new(jc, name, json_integer((json_int_t)v));
		else if (first)
			fprintf(f, "# TYPE moetier_compute_%s counter\nmoetier_compute_%s %" PRIu64 "\n", name, name, v);
	}
	if (jc)
		json_object_set_new(jm, "compute", jc);
}

/* Hands a data-plane client the GPU arena's handles, a batch at a time. */
static void do_gpu_export(struct server *s, struct client *c, const struct moet_msg *h)
{
	struct tier_gpu_export e;
	struct moe_error err = { { 0 } };
	if (!c->region || !c->m) {
		cnt(s, SERVER_bad_messages);
		send_error(s, c, h->seq, -EPROTO, "GPU_EXPORT needs a data-plane client");
		return;
	}
	int rc = cache_gpu_export(c->m->cache, &e, &err);
	if (rc < 0) {
		send_error(s, c, h->seq, rc, "GPU export: %s", err.msg);
		return;
	}
	if (h->arg > e.nfds) {
		cnt(s, SERVER_bad_messages);
		send_error(s, c, h->seq, -EINVAL, "GPU_EXPORT: first handle %u past the %u there are", h->arg, e.nfds);
		tier_gpu_export_free(&e);
		return;
	}
	struct {
		struct moet_gpu_export x;
		uint64_t offsets[MOET_GPU_EXPORT_BATCH];
	} r;
	memset(&r, 0, sizeof(r));
	unsigned n = e.nfds - h->arg;
	if (n > MOET_GPU_EXPORT_BATCH)
		n = MOET_GPU_EXPORT_BATCH;
	r.x.backend = e.backend == TIER_GPU_EMULATED ? MOET_GPU_EMULATED
		      : e.backend == TIER_GPU_VMM    ? MOET_GPU_VMM
		      : e.backend == TIER_GPU_UVM    ? MOET_GPU_UVM
						     : MOET_GPU_NONE;
	r.x.device = e.device;
	r.x.generation = e.generation;
	r.x.slot_stride = e.slot_stride;
	r.x.chunk_bytes = e.chunk_bytes;
	r.x.total = e.nfds;
	r.x.first = h->arg;
	r.x.n = n;
	for (unsigned i = 0; i < n; i++)
		r.offsets[i] = e.offsets[h->arg + i];
	rc = send_msg(c->fd, MOET_MSG_OK, h->seq, 0, 0, &r, (uint32_t)(sizeof(r.x) + n * sizeof(uint64_t)),
		      n ? e.fds + h->arg : NULL, n);
	if (rc < 0)
		moe_debug("client %u: GPU export reply: %s", c->id, strerror(-rc));
	tier_gpu_export_free(&e);
}
static void do_admin(struct server *s, struct client *c, const struct moet_msg *h, const uint8_t *payload)
{
	char text[1024];
	int rc;
	bool needs_admin = h->type != MOET_MSG_CONFIG_GET;
	if (needs_admin && !c->admin) {
		send_error(s, c, h->seq, -EPERM, "uid %u may not send admin requests", (unsigned)c->uid);
		return;
	}
	cnt(s, SERVER_admin_requests);
	switch (h->type) {
	case MOET_MSG_STATS:
	case MOET_MSG_CLIENTS: {
		if (h->type == MOET_MSG_STATS && h->arg > MOET_STATS_PROMETHEUS) {
			send_error(s, c, h->seq, -EINVAL, "unknown stats format %u", h->arg);
			return;
		}
		char *t = h->type == MOET_MSG_STATS ? render_stats(s, h->arg) : render_clients(s);
		if (!t) {
			send_error(s, c, h->seq, -ENOMEM, "out of memory");
			return;
		}
		rc = send_text(c, h->seq, t);
		free(t);
		if (rc)
			moe_warn("client %u: reply: %s", c->id, strerror(-rc));
		return;
	}
	case MOET_MSG_CONFIG_GET: {
		if (h->len >= 128 || (h->len && payload[h->len - 1] != '\0')) {
			send_error(s, c, h->seq, -EINVAL, "CONFIG_GET: option name must be NUL-terminated");
			return;
		}
		const char *name = h->len ? (const char *)payload : "";
		size_t n;
		const struct option_desc *opts = options_table(&n);
		char *buf = NULL;
		size_t len = 0;
		FILE *f = open_memstream(&buf, &len);
		if (!f)
			return;
		bool found = false;
		for (size_t i = 0; i < n; i++) {
			if (*name && strcmp(name, opts[i].name))
				continue;
			options_get(s->cfg, opts[i].name, text, sizeof(text));
			fprintf(f, "%s = %s\n", opts[i].name, text);
			found = true;
		}
		fclose(f);
		if (!found)
			send_error(s, c, h->seq, -ENOENT, "unknown option '%s'", name);
		else
			send_text(c, h->seq, buf);
		free(buf);
		return;
	}
	case MOET_MSG_CONFIG_SET: {
		if (h->len == 0 || h->len >= sizeof(text) || payload[h->len - 1] != '\0') {
			send_error(s, c, h->seq, -EINVAL, "CONFIG_SET: expected a NUL-terminated 'name=value'");
			return;
		}
		memcpy(text, payload, h->len);
		char *eq = strchr(text, '=');
		if (!eq) {
			send_error(s, c, h->seq, -EINVAL, "CONFIG_SET: expected 'name=value'");
			return;
		}
		*eq = '\0';
		const struct option_desc *o = options_find(text);
		if (!o) {
			send_error(s, c, h->seq, -ENOENT, "unknown option '%s'", text);
			return;
		}
		if (!o->runtime) {
			send_error(s, c, h->seq, -EPERM, "%s can only be changed by restarting moetierd", text);
			return;
		}
		struct moetierd_config tmp;
		struct moe_error err;
		options_init(&tmp);
		rc = options_set(&tmp, text, eq + 1, &err);
		options_free(&tmp);
		if (rc) {
			send_error(s, c, h->seq, rc, "%s", err.msg);
			return;
		}
		/* Validated on a scratch copy; now apply (numbers are word-sized
		 * stores the ring thread reads racily but atomically enough). */
		options_set(s->cfg, text, eq + 1, &err);
		if (!strcmp(text, "log-level")) {
			const char *v = eq + 1;
			moe_log_set_level(!strcmp(v, "err") ? MOE_LOG_ERR : !strcmp(v, "warn") ? MOE_LOG_WARN
					  : !strcmp(v, "debug") ? MOE_LOG_DEBUG : MOE_LOG_INFO);
		}
		moe_info("config set by uid %u: %s = %s", (unsigned)c->uid, text, eq + 1);
		send_msg(c->fd, MOET_MSG_OK, h->seq, 0, 0, NULL, 0, NULL, 0);
		return;
	}
	case MOET_MSG_PIN:
	case MOET_MSG_UNPIN:
	case MOET_MSG_EVICT: {
		struct moet_expert_arg a;
		if (h->len != sizeof(a)) {
			send_error(s, c, h->seq, -EPROTO, "expected %zu bytes of expert argument", sizeof(a));
			return;
		}
		memcpy(&a, payload, sizeof(a));
		struct model *m = c->m;
		if (a.layer >= m->n_layers || a.expert >= m->n_experts || a.tier > CACHE_TIER_HOST) {
			send_error(s, c, h->seq, -ERANGE, "layer %u expert %u tier %u is out of range (%u layers, %u experts)",
				   a.layer, a.expert, a.tier, m->n_layers, m->n_experts);
			return;
		}
		struct cache_key k = { a.layer, a.expert };
		rc = h->type == MOET_MSG_PIN ? cache_pin(m->cache, k, (enum cache_tier)a.tier)
		   : h->type == MOET_MSG_UNPIN ? cache_unpin(m->cache, k, (enum cache_tier)a.tier)
					       : cache_evict(m->cache, k, (enum cache_tier)a.tier);
		if (rc < 0)
			send_error(s, c, h->seq, rc, "layer %u expert %u: %s", a.layer, a.expert, strerror(-rc));
		else
			send_msg(c->fd, MOET_MSG_OK, h->seq, 0, 0, NULL, 0, NULL, 0);
		atomic_fetch_or(&m->dirty[a.layer / 64], 1ull << (a.layer % 64));
		kick_ring(s);
		return;
	}
	}
}

static void client_readable(struct server *s, struct client *c)
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
	if (n <= 0) {
		client_close(s, c);
		return;
	}
	/* We never accept fds from clients: close whatever came. */
	for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
		if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
			int nf = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
			for (int i = 0; i < nf; i++) {
				int fd;
				memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
				close(fd);
			}
		}
	struct moet_msg h;
	if ((size_t)n < sizeof(h)) {
		cnt(s, SERVER_bad_messages);
		send_error(s, c, 0, -EPROTO, "truncated message (%zd bytes, header is %zu)", n, sizeof(h));
		if (!c->hello_done)
			client_close(s, c);
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
		cnt(s, SERVER_bad_messages);
		send_error(s, c, h.seq, st, "%s", why);
		if (!c->hello_done)
			client_close(s, c);
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
			cnt(s, SERVER_bad_messages);
			send_error(s, c, h.seq, -EPROTO, c->region ? "SUBMIT: expected one %zu-byte entry"
								   : "SUBMIT needs a data-plane client", sizeof(q));
			return;
		}
		memcpy(&q, payload, sizeof(q));
		/* Same operation as the ring; a blocking acquire behaves as NOWAIT
		 * here because the event loop never blocks. */
		exec_entry(s, c, &q, &out, false);
		cnt(s, SERVER_socket_entries);
		atomic_fetch_add_explicit(&c->ops, 1, memory_order_relaxed);
		send_msg(c->fd, MOET_MSG_SUBMIT_REPLY, h.seq, 0, 0, &out, sizeof(out), NULL, 0);
		return;
	}
	case MOET_MSG_STATS: case MOET_MSG_CONFIG_GET: case MOET_MSG_CONFIG_SET: case MOET_MSG_PIN:
	case MOET_MSG_UNPIN: case MOET_MSG_EVICT: case MOET_MSG_CLIENTS:
		do_admin(s, c, &h, payload);
		return;
	case MOET_MSG_GPU_EXPORT:
		do_gpu_export(s, c, &h);
		return;
	case MOET_MSG_ADVISE:
		do_advise(s, c, &h, payload);
		return;
	default:
		cnt(s, SERVER_bad_messages);
		send_error(s, c, h.seq, -EOPNOTSUPP, "unknown message type %u", h.type);
		return;
	}
}

/* ---- life cycle ----------------------------------------------------------- */

static int open_model(struct server *s, struct model *m, const char *path, unsigned idx, struct moe_error *err)
{
	int rc = pack_open(path, 0, &m->pack, err);
	if (rc)
		return moe_error_prefix(err, rc, "%s", path);
	const struct moe_model_config *mc = m->pack->model;
	const char *base = strrchr(path, '/');
	snprintf(m->name, sizeof(m->name), "%s", mc->name[0] ? mc->name : base ? base + 1 : path);
	for (unsigned i = 0; i < idx; i++)
		if (!strcmp(s->models[i].name, m->name))
			snprintf(m->name + strnlen(m->name, 52), 12, "#%u", idx % 1000);
	m->srv = s;
	m->n_layers = mc->n_moe_layers;
	m->n_experts = mc->n_experts;
	m->words = (m->n_experts + 63) / 64;
	m->shared_fd = m->shared_ro_fd = m->arena_ro_fd[0] = m->arena_ro_fd[1] = -1;
	if (m->n_experts > ROUTE_MAX_EXPERTS || m->words > 64)
		return moe_error_set(err, -EINVAL, "%s: %u experts per layer is more than moetierd serves (%u)", path,
				     m->n_experts, ROUTE_MAX_EXPERTS);
	m->dirty = calloc(m->n_layers / 64 + 1, sizeof(*m->dirty));
	if (!m->dirty)
		return moe_error_set(err, -ENOMEM, "out of memory");
	/* DeepSeek-V3's selection bias: one per layer, loaded once. */
	if (mc->has_score_bias) {
		m->score_bias = calloc((size_t)m->n_layers * m->n_experts, sizeof(float));
		if (!m->score_bias)
			return moe_error_set(err, -ENOMEM, "out of memory");
		for (uint32_t l = 0; l < m->n_layers; l++) {
			const struct pack_tensor_entry *t = pack_find_role(m->pack, PACK_ROLE_SCORE_BIAS, moe_model_layer_of(mc, l));
			if (t && t->dtype == MOE_DTYPE_F32 && t->bytes == m->n_experts * sizeof(float) &&
			    (rc = pack_read_tensor(m->pack, t, m->score_bias + (size_t)l * m->n_experts, err)))
				return rc;
		}
	}
	/* The move-or-compute cost model: host rates measured here (unless
	 * turned off), link rates from the options; no GPU tier, no move. */
	struct compute_opts co = { .threads = 1, .kernel_threads = 1, .calibrate = s->cfg->compute_calibrate,
				   .nvme_to_host_Bps = (double)s->cfg->link_nvme_mbps * 1e6,
				   .host_to_gpu_Bps = s->cfg->gpu_bytes ? (double)s->cfg->link_h2g_mbps * 1e6 : 0.0 };
	struct moe_error cerr;
	if (compute_create(mc, m->pack->hdr->parts, m->pack->hdr->n_parts, pack_extent_bytes(m->pack), &co, &m->compute,
			   &cerr)) {
		moe_info("model %s: COMPUTE not offered: %s", m->name, cerr.msg);
		m->compute = NULL;
	}
	route_params_from_model(&m->rp, mc, NULL);
	if ((rc = route_params_check(&m->rp, err)))
		return moe_error_prefix(err, rc, "%s: routing", path);
	struct cache_config cc = {
		.host_bytes = s->cfg->host_bytes,
		.gpu_bytes = s->cfg->gpu_bytes,
		.gpu_backend = s->cfg->gpu_backend,
		.gpu_device = s->cfg->gpu_device,
		.queue_depth = s->cfg->queue_depth,
		.numa_node = s->cfg->numa_node,
		.mlock_required = s->cfg->mlock_required,
		.huge_pages = s->cfg->huge_pages,
		.no_uring = s->cfg->no_uring,
		.policy = s->cfg->policy,
		.layer_slots = s->cfg->layer_slots,
		.wait_timeout_ms = s->cfg->wait_timeout_ms,
		.max_clients = s->max_clients + 1,
		.on_ready = on_ready,
		.on_ready_ctx = m,
	};
	if ((rc = cache_create(m->pack, &cc, &m->cache, err)))
		return moe_error_prefix(err, rc, "%s", path);
	m->top_k = mc->top_k;
	m->plc = (struct placement_config){ .predictor = s->cfg->predictor, .prefetch = s->cfg->prefetch,
					    .lookahead = s->cfg->prefetch_lookahead, .min_score = -1, .gain = -1,
					    .link_bw = (double)s->cfg->link_nvme_mbps * 1e6,
					    .deadline = s->cfg->prefetch_deadline,
					    .gpu = strcmp(s->cfg->prefetch_tier, "gpu") == 0 };
	if (strcmp(s->cfg->prefetch_tier, "host") && strcmp(s->cfg->prefetch_tier, "gpu"))
		return moe_error_set(err, -EINVAL, "prefetch-tier must be host or gpu, not '%s'", s->cfg->prefetch_tier);
	if (m->plc.gpu)
		m->plc.link_bw = (double)s->cfg->link_h2g_mbps * 1e6;
	if (placement_enabled(&m->plc)) {
		const struct predict_ops *po = predict_find(m->plc.predictor);
		if (!po)
			return moe_error_set(err, -EINVAL, "unknown predictor '%s'", m->plc.predictor);
		if (s->cfg->predictor_model[0]) {
			if ((rc = predict_model_load(s->cfg->predictor_model, &m->pmodel, err)))
				return moe_error_prefix(err, rc, "predictor-model");
			m->plc.model = m->pmodel;
		} else if (po->needs_model) {
			return moe_error_set(err, -EINVAL, "predictor '%s' needs a predictor-model file (moe-sim train)",
					     m->plc.predictor);
		}
		/* Shape errors (model file vs pack) show up here, not per client. */
		struct placement *probe;
		if ((rc = placement_create(m->cache, m->n_layers, m->n_experts, m->top_k, m->pack->hdr->extent_payload,
					   &m->plc, &probe, err)))
			return moe_error_prefix(err, rc, "%s", path);
		placement_destroy(probe);
		moe_info("model %s: predictor %s, prefetch %s, look-ahead %s", m->name, m->plc.predictor,
			 m->plc.prefetch ? "on" : "off", m->plc.lookahead ? "fixed" : "adaptive");
	}
	for (unsigned t = 0; t < 2; t++) {
		if (cache_arena(m->cache, (enum cache_tier)t, &m->arena[t]) < 0)
			memset(&m->arena[t], 0, sizeof(m->arena[t]));
		if (m->arena[t].n_slots && m->arena[t].fd >= 0) {
			/* Clients get a read-only description: they can map it
			 * PROT_READ only, whatever the seals. */
			fcntl(m->arena[t].fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW);
			m->arena_ro_fd[t] = reopen_ro(m->arena[t].fd);
		}
	}
	if ((rc = make_shared(m, err)))
		return rc;
	m->shared_ro_fd = reopen_ro(m->shared_fd);
	if (m->shared_ro_fd < 0)
		return moe_error_set(err, -errno, "reopen shared state: %s", strerror(errno));
	refresh_model(m, true);
	moe_info("model %s: %u MoE layers x %u experts, %s per expert, host arena %u slots, GPU arena %u slots", m->name,
		 m->n_layers, m->n_experts, moe_fmt_size(m->pack->hdr->extent_payload, (char[32]){ 0 }, 32),
		 m->arena[1].n_slots, m->arena[0].n_slots);
	return 0;
}

static void close_model(struct model *m)
{
	if (m->compute)
		compute_destroy(m->compute);
	if (m->cache)
		cache_destroy(m->cache);
	if (m->pack)
		pack_close(m->pack);
	if (m->shared)
		munmap(m->shared, m->shared_bytes);
	for (int i = 0; i < 2; i++)
		if (m->arena_ro_fd[i] >= 0)
			close(m->arena_ro_fd[i]);
	if (m->shared_fd >= 0)
		close(m->shared_fd);
	if (m->shared_ro_fd >= 0)
		close(m->shared_ro_fd);
	free(m->score_bias);
	free(m->dirty);
	predict_model_free(m->pmodel);
}

static int lookup_group(const char *name, gid_t *out)
{
	struct group gr, *res = NULL;
	char buf[4096];
	char *end;
	unsigned long v = strtoul(name, &end, 10);
	if (*name && !*end) {
		*out = (gid_t)v;
		return 0;
	}
	if (getgrnam_r(name, &gr, buf, sizeof(buf), &res) || !res)
		return -ENOENT;
	*out = res->gr_gid;
	return 0;
}

int server_create(struct moetierd_config *cfg, struct server **out, struct moe_error *err)
{
	struct server *s = calloc(1, sizeof(*s));
	int rc;
	if (!s)
		return moe_error_set(err, -ENOMEM, "out of memory");
	s->cfg = cfg;
	s->listen_fd = s->epfd = s->sig_fd = s->timer_fd = s->reap_fd = -1;
	s->start_ns = moe_now_ns();
	s->max_clients = cfg->max_clients;
	atomic_store(&s->ring_cpu, -1);
	pthread_mutex_init(&s->lock, NULL);
	s->clients = calloc(s->max_clients, sizeof(*s->clients));
	if (!s->clients) {
		free(s);
		return moe_error_set(err, -ENOMEM, "out of memory");
	}
	if (cfg->socket_group && *cfg->socket_group) {
		if (lookup_group(cfg->socket_group, &s->sock_gid)) {
			rc = moe_error_set(err, -ENOENT, "socket-group '%s' does not exist (create it: sysusers.d/moetier.conf)",
					   cfg->socket_group);
			goto fail;
		}
		s->have_sock_gid = true;
	}
	if (cfg->admin_group && *cfg->admin_group) {
		if (lookup_group(cfg->admin_group, &s->admin_gid)) {
			rc = moe_error_set(err, -ENOENT, "admin-group '%s' does not exist", cfg->admin_group);
			goto fail;
		}
		s->have_admin_gid = true;
	}
	/* Packs: comma-separated. */
	char *list = strdup(cfg->pack ? cfg->pack : "");
	unsigned n = 0;
	for (char *p = list; p && *p; p++)
		if (*p == ',')
			n++;
	n = list && *list ? n + 1 : 0;
	if (!n) {
		free(list);
		rc = moe_error_set(err, -EINVAL, "no pack to serve (give --pack=FILE or a PACK argument)");
		goto fail;
	}
	s->models = calloc(n, sizeof(*s->models));
	if (!s->models) {
		free(list);
		rc = moe_error_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	char *save = NULL;
	for (char *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		struct model *m = &s->models[s->n_models];
		m->shared_fd = m->shared_ro_fd = m->arena_ro_fd[0] = m->arena_ro_fd[1] = -1;
		s->n_models++;
		if ((rc = open_model(s, m, tok, s->n_models - 1, err))) {
			free(list);
			goto fail;
		}
	}
	free(list);
	if ((rc = bind_socket(s, err)))
		goto fail;
	*out = s;
	return 0;
fail:
	server_destroy(s);
	return rc;
}

int server_pin_ring_thread(struct server *s, int cpu)
{
	atomic_store(&s->ring_cpu, cpu);
	if (!s->ring_started)
		return 0;
	cpu_set_t set;
	CPU_ZERO(&set);
	if (cpu < 0) {
		for (int i = 0; i < CPU_SETSIZE; i++)
			CPU_SET(i, &set);
	} else {
		CPU_SET(cpu, &set);
	}
	return -pthread_setaffinity_np(s->ring_thread, sizeof(set), &set);
}

int server_start(struct server *s, struct moe_error *err)
{
	int rc = pthread_create(&s->ring_thread, NULL, ring_main, s);
	if (rc)
		return moe_error_set(err, -rc, "ring thread: %s", strerror(rc));
	s->ring_started = true;
	if (atomic_load(&s->ring_cpu) >= 0)
		server_pin_ring_thread(s, atomic_load(&s->ring_cpu));
	return 0;
}

void server_stop(struct server *s)
{
	atomic_store(&s->stop_loop, true);
	if (s->reap_fd >= 0) {
		uint64_t one = 1;
		ssize_t r = write(s->reap_fd, &one, 8);
		(void)r;
	}
}

static void notify_status(struct server *s)
{
	unsigned n = 0;
	pthread_mutex_lock(&s->lock);
	for (unsigned i = 0; i < s->max_clients; i++)
		if (s->clients[i] && s->clients[i]->hello_done)
			n++;
	pthread_mutex_unlock(&s->lock);
	sd_notifyf(0, "STATUS=serving %u model(s), %u client(s), %" PRIu64 " ring entries", s->n_models, n,
		   server_counter(s, SERVER_ring_entries));
}

int server_run(struct server *s, struct moe_error *err)
{
	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &mask, NULL);
	s->epfd = epoll_create1(EPOLL_CLOEXEC);
	s->sig_fd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
	s->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
	if (s->reap_fd < 0)
		s->reap_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (s->epfd < 0 || s->sig_fd < 0 || s->timer_fd < 0 || s->reap_fd < 0)
		return moe_error_set(err, -errno, "event loop set-up: %s", strerror(errno));
	uint64_t period_ns = 1000000000ull;
	if (sd_watchdog_enabled(0, &s->watchdog_usec) > 0 && s->watchdog_usec)
		period_ns = MOE_MIN(period_ns, s->watchdog_usec * 1000ull / 2);
	struct itimerspec its = { { (time_t)(period_ns / 1000000000ull), (long)(period_ns % 1000000000ull) },
				  { (time_t)(period_ns / 1000000000ull), (long)(period_ns % 1000000000ull) } };
	timerfd_settime(s->timer_fd, 0, &its, NULL);
	static int tags[4];
	struct epoll_event ev = { .events = EPOLLIN };
	ev.data.ptr = &tags[0];
	epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->listen_fd, &ev);
	ev.data.ptr = &tags[1];
	epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->sig_fd, &ev);
	ev.data.ptr = &tags[2];
	epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->timer_fd, &ev);
	ev.data.ptr = &tags[3];
	epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->reap_fd, &ev);
	sd_notifyf(0, "READY=1\nSTATUS=serving %u model(s) on %s", s->n_models, s->cfg->socket);
	moe_info("listening on %s", s->cfg->socket);
	while (!atomic_load(&s->stop_loop)) {
		struct epoll_event evs[32];
		int n = epoll_wait(s->epfd, evs, 32, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return moe_error_set(err, -errno, "epoll_wait: %s", strerror(errno));
		}
		for (int i = 0; i < n; i++) {
			void *p = evs[i].data.ptr;
			if (p == &tags[0]) {
				accept_one(s);
			} else if (p == &tags[1]) {
				struct signalfd_siginfo si;
				while (read(s->sig_fd, &si, sizeof(si)) == sizeof(si)) {
					if (si.ssi_signo == SIGHUP) {
						moe_info("SIGHUP: nothing to reload (use moectl config set)");
						continue;
					}
					moe_info("signal %u: stopping", si.ssi_signo);
					sd_notify(0, "STOPPING=1");
					atomic_store(&s->stop_loop, true);
				}
			} else if (p == &tags[2]) {
				uint64_t v;
				if (read(s->timer_fd, &v, 8) < 0 && errno != EAGAIN)
					moe_warn("timerfd: %s", strerror(errno));
				if (s->watchdog_usec)
					sd_notify(0, "WATCHDOG=1");
				notify_status(s);
				kick_ring(s);
			} else if (p == &tags[3]) {
				reap_dead(s);
			} else {
				struct client *c = p;
				if (evs[i].events & EPOLLIN)
					client_readable(s, c);
				else if (evs[i].events & (EPOLLHUP | EPOLLRDHUP | EPOLLERR))
					client_close(s, c);
			}
		}
	}
	return 0;
}

void server_destroy(struct server *s)
{
	if (!s)
		return;
	if (s->ring_started) {
		atomic_store(&s->stop_ring, true);
		kick_ring(s);
		pthread_join(s->ring_thread, NULL);
	}
	for (unsigned i = 0; s->clients && i < s->max_clients; i++) {
		struct client *c = s->clients[i];
		if (!c)
			continue;
		if (c->fd >= 0)
			close(c->fd);
		if (c->m)
			cache_release_client(c->m->cache, c->cache_id);
		client_free(c);
	}
	for (unsigned i = 0; i < s->n_models; i++)
		close_model(&s->models[i]);
	if (s->listen_fd >= 0)
		close(s->listen_fd);
	if (s->sock_path) {
		unlink(s->sock_path);
		free(s->sock_path);
	}
	int fds[] = { s->epfd, s->sig_fd, s->timer_fd, s->reap_fd };
	for (unsigned i = 0; i < 4; i++)
		if (fds[i] >= 0)
			close(fds[i]);
	free(s->models);
	free(s->clients);
	pthread_mutex_destroy(&s->lock);
	free(s);
}
