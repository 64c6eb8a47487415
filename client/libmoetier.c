/* libmoetier.c - the client side of moetierd (moetier.h). Built as a shared
 * library on its own sources (plus core/ring.c, compiled PIC): it must
 * not link libmoecore. */
#include "config.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "moetier/moetier.h"
#include "ring.h"

#define TAG_INTERNAL (1ull << 63)
#define TAG_DISCARD (1ull << 62)

struct moet_ctx {
	int fd;
	uint32_t seq;
	struct moet_hello_reply info;
	uint8_t *ring_map;
	size_t ring_bytes;
	struct moet_ring_region reg;
	struct ring sq, cq;
	const uint8_t *arena[2];
	size_t arena_bytes[2];
	const uint8_t *shared;
	size_t shared_bytes;
	const struct moet_shared_hdr *sh;
	int64_t spin_ns;
	uint64_t next_tag;
	struct moet_cqe *backlog; /* completions of user submits seen by sync calls */
	size_t n_backlog, cap_backlog;
	char last_error[512];
	uint32_t token_key, token_pos; /* moet_set_token: hints for ACQUIRE/ROUTE */
};

static void set_error(moet_ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_error(moet_ctx *c, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(c->last_error, sizeof(c->last_error), fmt, ap);
	va_end(ap);
}

const char *moet_strerror(int code)
{
	switch (code) {
	case 0: return "success";
	case MOET_E_UNAVAILABLE: return "moetierd is not running (no daemon at the socket)";
	case MOET_E_VERSION: return "moetierd speaks an incompatible protocol version";
	case MOET_E_DISCONNECTED: return "moetierd went away (reconnect)";
	case MOET_E_REFUSED: return "moetierd refused the connection";
	case MOET_E_CAPS: return "moetierd lacks a required capability";
	default: return code < 0 ? strerror(-code) : "success";
	}
}

/* Why the last moet_connect of this thread failed (no context survives). */
static __thread char moet_connect_error[512];

const char *moet_last_error(moet_ctx *c) { return c ? c->last_error : moet_connect_error; }
int moet_socket_fd(moet_ctx *c) { return c ? c->fd : -1; }

static int send_req(moet_ctx *c, uint16_t type, uint32_t arg, const void *payload, uint32_t len)
{
	struct moet_msg h = { MOET_MSG_MAGIC, MOET_PROTO_VERSION, type, ++c->seq, 0, arg, len };
	struct iovec iov[2] = { { &h, sizeof(h) }, { (void *)payload, len } };
	struct msghdr mh = { .msg_iov = iov, .msg_iovlen = len ? 2 : 1 };
	if (sendmsg(c->fd, &mh, MSG_NOSIGNAL) < 0)
		return errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN ? MOET_E_DISCONNECTED : -errno;
	return 0;
}

/* Receives one reply: header into *h, payload into buf (up to cap), fds. */
static int recv_reply(moet_ctx *c, struct moet_msg *h, void *buf, size_t cap, int *fds, unsigned *nfds,
		      int timeout_ms)
{
	uint8_t msg[MOET_MAX_MSG + 512];
	union {
		char b[CMSG_SPACE(sizeof(int) * 8)];
		struct cmsghdr align;
	} u;
	struct pollfd p = { c->fd, POLLIN, 0 };
	for (;;) {
		int pr = poll(&p, 1, timeout_ms);
		if (pr < 0 && errno == EINTR)
			continue;
		if (pr == 0)
			return -ETIMEDOUT;
		break;
	}
	struct iovec iov = { msg, sizeof(msg) };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b, .msg_controllen = sizeof(u.b) };
	ssize_t n = recvmsg(c->fd, &mh, MSG_CMSG_CLOEXEC);
	if (n <= 0)
		return n == 0 || errno == ECONNRESET ? MOET_E_DISCONNECTED : -errno;
	unsigned got = 0;
	for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
		if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
			unsigned k = (unsigned)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
			for (unsigned i = 0; i < k; i++) {
				int fd;
				memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
				if (fds && nfds && got < *nfds)
					fds[got++] = fd;
				else
					close(fd);
			}
		}
	if (nfds)
		*nfds = got;
	if ((size_t)n < sizeof(*h))
		return -EPROTO;
	memcpy(h, msg, sizeof(*h));
	if (h->magic != MOET_MSG_MAGIC || h->len != (size_t)n - sizeof(*h))
		return -EPROTO;
	if (h->type == MOET_MSG_ERROR) {
		snprintf(c->last_error, sizeof(c->last_error), "%.*s", (int)h->len, (const char *)msg + sizeof(*h));
		return h->status < 0 ? h->status : -EPROTO;
	}
	if (buf)
		memcpy(buf, msg + sizeof(*h), h->len < cap ? h->len : cap);
	return h->status;
}

static void unmap_all(moet_ctx *c)
{
	if (c->ring_map)
		munmap(c->ring_map, c->ring_bytes);
	for (int t = 0; t < 2; t++)
		if (c->arena[t])
			munmap((void *)c->arena[t], c->arena_bytes[t]);
	if (c->shared)
		munmap((void *)c->shared, c->shared_bytes);
}

void moet_close(moet_ctx *c)
{
	if (!c)
		return;
	unmap_all(c);
	if (c->fd >= 0)
		close(c->fd);
	free(c->backlog);
	free(c);
}

static int map_fd(int fd, uint64_t bytes, int prot, void **out)
{
	struct stat st;
	if (fstat(fd, &st) || (uint64_t)st.st_size < bytes || bytes == 0)
		return -EPROTO;
	void *p = mmap(NULL, bytes, prot, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		return -errno;
	*out = p;
	return 0;
}

static int attach_maps(moet_ctx *c, const int *fds, unsigned nfds)
{
	unsigned k = 0;
	int rc;
	void *p;
	const struct moet_hello_reply *r = &c->info;
	if (r->fds & MOET_FD_RING) {
		if (k >= nfds)
			return -EPROTO;
		if ((rc = map_fd(fds[k++], r->ring_bytes, PROT_READ | PROT_WRITE, &p)))
			return rc;
		c->ring_map = p;
		c->ring_bytes = r->ring_bytes;
		memcpy(&c->reg, p, sizeof(c->reg));
		if ((rc = ring_region_check(&c->reg, c->ring_bytes)))
			return rc;
		struct moet_ring_ctl *sq = (void *)(c->ring_map + c->reg.sq_ctl_off);
		struct moet_ring_ctl *cq = (void *)(c->ring_map + c->reg.cq_ctl_off);
		uint32_t sqn = sq->entries, cqn = cq->entries;
		if (!sqn || !cqn || sq->entry_size != sizeof(struct moet_sqe) || cq->entry_size != sizeof(struct moet_cqe) ||
		    c->reg.sq_off + (uint64_t)sqn * sizeof(struct moet_sqe) > c->reg.cq_ctl_off ||
		    c->reg.cq_off + (uint64_t)cqn * sizeof(struct moet_cqe) > c->reg.scratch_off)
			return -EPROTO;
		if (ring_attach(&c->sq, sq, c->ring_map + c->reg.sq_off, sqn, sizeof(struct moet_sqe), false, true) ||
		    ring_attach(&c->cq, cq, c->ring_map + c->reg.cq_off, cqn, sizeof(struct moet_cqe), false, false))
			return -EPROTO;
		c->cap_backlog = cqn;
		c->backlog = calloc(c->cap_backlog, sizeof(*c->backlog));
		if (!c->backlog)
			return -ENOMEM;
	}
	static const unsigned tier_bit[2] = { MOET_FD_GPU, MOET_FD_HOST };
	/* fds arrive in the order ring, host, GPU, shared. */
	if (r->fds & MOET_FD_HOST) {
		if (k >= nfds || (rc = map_fd(fds[k++], r->arena_bytes[1], PROT_READ, &p)))
			return k > nfds ? -EPROTO : rc;
		c->arena[1] = p;
		c->arena_bytes[1] = r->arena_bytes[1];
	}
	if (r->fds & tier_bit[0]) {
		if (k >= nfds || (rc = map_fd(fds[k++], r->arena_bytes[0], PROT_READ, &p)))
			return k > nfds ? -EPROTO : rc;
		c->arena[0] = p;
		c->arena_bytes[0] = r->arena_bytes[0];
	}
	if (r->fds & MOET_FD_SHARED) {
		if (k >= nfds || (rc = map_fd(fds[k++], r->shared_bytes, PROT_READ, &p)))
			return k > nfds ? -EPROTO : rc;
		c->shared = p;
		c->shared_bytes = r->shared_bytes;
		c->sh = p;
		const struct moet_shared_hdr *h = c->sh;
		if (h->magic != MOET_SHARED_MAGIC || h->n_moe_layers != r->n_moe_layers || h->n_experts != r->n_experts ||
		    h->total_bytes != c->shared_bytes || h->bitmap_words != (r->n_experts + 63) / 64 ||
		    h->layer_off + (uint64_t)h->layer_stride * h->n_moe_layers > c->shared_bytes ||
		    h->counters_off + sizeof(struct moet_expert_counters) * (uint64_t)h->n_moe_layers * h->n_experts >
			    c->shared_bytes)
			return -EPROTO;
	}
	return 0;
}

int moet_connect(const struct moet_connect_opts *opts, moet_ctx **out)
{
	struct moet_connect_opts o = { 0 };
	if (opts)
		memcpy(&o, opts, opts->size && opts->size < sizeof(o) ? opts->size : sizeof(o));
	const char *path = o.socket_path ? o.socket_path : getenv("MOETIER_SOCKET");
	if (!path || !*path)
		path = MOET_DEFAULT_SOCKET;
	*out = NULL;
	moet_ctx *c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->spin_ns = (int64_t)(o.spin_us < 0 ? 50 : o.spin_us) * 1000;
	c->fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int rc;
	if (c->fd < 0 || strlen(path) >= sizeof(sa.sun_path)) {
		rc = c->fd < 0 ? -errno : -ENAMETOOLONG;
		goto fail;
	}
	strcpy(sa.sun_path, path);
	if (connect(c->fd, (struct sockaddr *)&sa, sizeof(sa))) {
		rc = errno == ENOENT || errno == ECONNREFUSED ? MOET_E_UNAVAILABLE : -errno;
		set_error(c, "%s: %s", path, strerror(errno));
		goto fail;
	}
	struct moet_hello h = { MOET_PROTO_MIN_VERSION, MOET_PROTO_VERSION, o.caps_wanted,
				o.control_only ? MOET_HELLO_CONTROL_ONLY : 0, "", "" };
	snprintf(h.client_name, sizeof(h.client_name), "%s", o.client_name ? o.client_name : "libmoetier");
	snprintf(h.model, sizeof(h.model), "%s", o.model ? o.model : "");
	if ((rc = send_req(c, MOET_MSG_HELLO, 0, &h, sizeof(h))))
		goto fail;
	struct moet_msg rh;
	int fds[8];
	unsigned nfds = 8;
	rc = recv_reply(c, &rh, &c->info, sizeof(c->info), fds, &nfds, 10000);
	if (rc == -EPROTONOSUPPORT)
		rc = MOET_E_VERSION;
	else if (rc == -EACCES || rc == -EUSERS || rc == -EPERM)
		rc = MOET_E_REFUSED;
	if (rc == 0 && (rh.type != MOET_MSG_HELLO_REPLY || rh.len != sizeof(c->info)))
		rc = -EPROTO;
	if (rc == 0 && (c->info.version < MOET_PROTO_MIN_VERSION || c->info.version > MOET_PROTO_VERSION))
		rc = MOET_E_VERSION;
	if (rc == 0 && (c->info.caps & o.caps_wanted) != o.caps_wanted) {
		set_error(c, "daemon grants caps 0x%x, client needs 0x%x", c->info.caps, o.caps_wanted);
		rc = MOET_E_CAPS;
	}
	if (rc == 0)
		rc = attach_maps(c, fds, nfds);
	for (unsigned i = 0; i < nfds; i++)
		close(fds[i]);
	if (rc)
		goto fail;
	*out = c;
	return 0;
fail:
	if (!c->last_error[0])
		set_error(c, "%s", moet_strerror(rc));
	snprintf(moet_connect_error, sizeof(moet_connect_error), "%s", c->last_error);
	moet_close(c);
	return rc;
}

int moet_model_info(moet_ctx *c, struct moet_model_info *out)
{
	struct moet_model_info i;
	if (!c || !out || out->size == 0)
		return -EINVAL;
	memset(&i, 0, sizeof(i));
	i.size = out->size;
	const struct moet_hello_reply *r = &c->info;
	memcpy(i.name, r->model, sizeof(i.name));
	i.family = r->family;
	i.dtype = r->dtype;
	i.hidden = r->hidden;
	i.expert_width = r->expert_width;
	i.n_experts = r->n_experts;
	i.top_k = r->top_k;
	i.n_moe_layers = r->n_moe_layers;
	i.first_moe_layer = r->first_moe_layer;
	i.moe_layer_step = r->moe_layer_step;
	i.expert_bytes = r->extent_payload;
	for (int t = 0; t < 2; t++) {
		i.slot_bytes[t] = r->slot_bytes[t];
		i.n_slots[t] = r->n_slots[t];
	}
	i.caps = r->caps;
	i.client_id = r->client_id;
	i.protocol = r->version;
	memcpy(out, &i, out->size < sizeof(i) ? out->size : sizeof(i));
	return 0;
}

/* The daemon's socket hung up? (checked while waiting on the ring) */
static bool daemon_gone(moet_ctx *c)
{
	struct pollfd p = { c->fd, POLLRDHUP, 0 };
	return poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLRDHUP | POLLERR));
}

static int push_sqe(moet_ctx *c, const struct moet_sqe *q)
{
	if (!c->ring_map)
		return -ENOTSUP;
	for (unsigned spins = 0;; spins++) {
		int rc = ring_push(&c->sq, q);
		if (rc != -EAGAIN)
			return rc;
		if (daemon_gone(c))
			return MOET_E_DISCONNECTED;
		struct timespec d = { 0, spins < 100 ? 1000 : 1000000 };
		nanosleep(&d, NULL);
	}
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Next completion from the ring (not the backlog). 1, 0 on timeout, < 0. */
static int reap_raw(moet_ctx *c, struct moet_cqe *out, int timeout_ms)
{
	int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	for (;;) {
		int rc = ring_pop(&c->cq, out);
		if (rc)
			return rc < 0 ? -EPROTO : 1;
		int64_t slice = 100;
		if (deadline >= 0) {
			int64_t left = deadline - now_ms();
			if (left <= 0)
				return 0;
			slice = left < slice ? left : slice;
		}
		rc = ring_wait(&c->cq, c->spin_ns, slice * 1000000);
		if (rc == -ETIMEDOUT || rc == -EINTR) {
			/* A dead daemon never rings: check the socket each slice. */
			if (!ring_ready(&c->cq) && daemon_gone(c))
				return MOET_E_DISCONNECTED;
		} else if (rc < 0) {
			return rc;
		}
	}
}

/* Waits for the completion with this tag; parks others. */
static int wait_tag(moet_ctx *c, uint64_t tag, struct moet_cqe *out)
{
	for (;;) {
		int rc = reap_raw(c, out, -1);
		if (rc < 0)
			return rc;
		if (out->user_tag == tag)
			return 0;
		if (out->user_tag & TAG_INTERNAL)
			continue; /* fire-and-forget completions (prefetch) */
		if (c->n_backlog < c->cap_backlog)
			c->backlog[c->n_backlog++] = *out;
	}
}

static int sync_entry(moet_ctx *c, struct moet_sqe *q, struct moet_cqe *out)
{
	q->user_tag = TAG_INTERNAL | ++c->next_tag;
	int rc = push_sqe(c, q);
	if (rc)
		return rc;
	return wait_tag(c, q->user_tag, out);
}

/* slots[i] as the daemon sent it: >= 0 served, -1 a miss, below -1 a
 * negative errno for that expert (-EBADMSG, -EIO, -EDQUOT, -ENOMEM; proto.h), which
 * callers that only test slot < 0 still treat as not served. */
static void fill_out(const struct moet_cqe *e, unsigned n, int32_t *slots, uint8_t *tiers, moet_lease *lease)
{
	for (unsigned i = 0; i < n && i < e->count; i++) {
		if (slots)
			slots[i] = e->slot[i];
		if (tiers)
			tiers[i] = e->tier[i];
	}
	if (lease)
		*lease = e->lease;
}

/* An entry of this context: opcode, flags, layer and the token hints. */
static void entry_init(const moet_ctx *c, struct moet_sqe *q, uint8_t opcode, unsigned flags, uint32_t layer)
{
	memset(q, 0, sizeof(*q));
	q->opcode = opcode;
	q->flags = (uint8_t)flags;
	q->layer = layer;
	q->token_key = c->token_key;
	q->token_pos = c->token_pos;
}

/* Runs an entry that may grant a lease: *lease is 0 unless it did. */
static int leased_entry(moet_ctx *c, struct moet_sqe *q, struct moet_cqe *e, moet_lease *lease)
{
	int rc = sync_entry(c, q, e);
	if (rc)
		return rc;
	if (lease)
		*lease = 0;
	return e->result < 0 ? e->result : 0;
}

int moet_acquire(moet_ctx *c, uint32_t layer, const uint32_t *ids, unsigned n, unsigned flags, int32_t *slots,
		 uint8_t *tiers, moet_lease *lease)
{
	struct moet_sqe q;
	struct moet_cqe e;
	if (!c || !ids || n == 0 || n > MOET_MAX_BATCH)
		return n > MOET_MAX_BATCH ? -E2BIG : -EINVAL;
	entry_init(c, &q, MOET_OP_ACQUIRE, flags, layer);
	q.count = (uint16_t)n;
	for (unsigned i = 0; i < n; i++) {
		if (ids[i] > UINT16_MAX)
			return -ERANGE;
		q.ids[i] = (uint16_t)ids[i];
	}
	int rc = leased_entry(c, &q, &e, lease);
	if (rc)
		return rc;
	fill_out(&e, n, slots, tiers, lease);
	return e.result;
}

int moet_set_token(moet_ctx *c, uint32_t token_key, uint32_t position)
{
	if (!c)
		return -EINVAL;
	c->token_key = token_key;
	c->token_pos = position == UINT32_MAX ? 0 : position + 1;
	/* One NOP carries the announcement: the daemon's predictor can plan
	 * the token's first layers before their ACQUIREs arrive. */
	struct moet_sqe q;
	struct moet_cqe e;
	entry_init(c, &q, MOET_OP_NOP, 0, 0);
	int rc = sync_entry(c, &q, &e);
	return rc ? rc : e.result < 0 ? e.result : 0;
}

int moet_release(moet_ctx *c, moet_lease lease)
{
	struct moet_sqe q;
	struct moet_cqe e;
	if (!c)
		return -EINVAL;
	if (lease == 0)
		return 0;
	memset(&q, 0, sizeof(q));
	q.opcode = MOET_OP_RELEASE;
	q.lease = lease;
	int rc = sync_entry(c, &q, &e);
	return rc ? rc : e.result;
}

int moet_route(moet_ctx *c, uint32_t layer, const float *logits, unsigned n_logits, unsigned flags,
	       uint32_t *experts, float *weights, int32_t *slots, uint8_t *tiers, moet_lease *lease)
{
	struct moet_sqe q;
	struct moet_cqe e;
	if (!c || !logits || !c->ring_map)
		return -EINVAL;
	if (flags & MOET_F_ROUTE_CACHE) {
		set_error(c, "moet_route: cache-aware routing goes through moet_route_opts");
		return -EINVAL;
	}
	size_t bytes = (size_t)n_logits * sizeof(float);
	if (bytes > c->reg.scratch_bytes)
		return -E2BIG;
	memcpy(c->ring_map + c->reg.scratch_off, logits, bytes);
	entry_init(c, &q, MOET_OP_ROUTE, flags, layer);
	q.data_off = 0;
	q.data_len = (uint32_t)bytes;
	int rc = leased_entry(c, &q, &e, lease);
	if (rc)
		return rc;
	for (unsigned i = 0; i < e.count; i++) {
		if (experts)
			experts[i] = e.ids[i];
		if (weights)
			weights[i] = e.weight[i];
	}
	fill_out(&e, e.count, slots, tiers, lease);
	return e.count;
}

int moet_route_opts(moet_ctx *c, uint32_t layer, const float *logits, unsigned n_logits, unsigned flags,
		    struct moet_route_args *a, uint32_t *experts, float *weights, int32_t *slots, uint8_t *tiers,
		    moet_lease *lease)
{
	struct moet_sqe q;
	struct moet_cqe e;
	struct moet_route_req req;
	struct moet_route_args in;
	if (!c || !logits || !a || a->size == 0 || !c->ring_map)
		return -EINVAL;
	if (c->info.version < 2) {
		set_error(c, "moet_route_opts: moetierd speaks protocol %u, cache-aware ROUTE needs 2",
			  c->info.version);
		return -EOPNOTSUPP;
	}
	/* A caller built against an older, shorter struct: the missing fields are 0. */
	memset(&in, 0, sizeof(in));
	memcpy(&in, a, a->size < sizeof(in) ? a->size : sizeof(in));
	size_t bytes = (size_t)n_logits * sizeof(float);
	if (bytes + sizeof(req) > c->reg.scratch_bytes)
		return -E2BIG;
	memset(&req, 0, sizeof(req));
	req.rule = in.rule;
	req.keep_top = in.keep_top;
	req.margin = in.margin;
	req.max_share = in.max_share;
	req.min_similarity = in.min_similarity;
	req.weights = in.weights;
	req.tiers = in.tiers;
	uint8_t *scratch = c->ring_map + c->reg.scratch_off;
	memcpy(scratch, logits, bytes);
	memcpy(scratch + bytes, &req, sizeof(req));
	entry_init(c, &q, MOET_OP_ROUTE, flags | MOET_F_ROUTE_CACHE, layer);
	q.data_off = 0;
	q.data_len = (uint32_t)(bytes + sizeof(req));
	int rc = leased_entry(c, &q, &e, lease);
	/* The daemon wrote its reply fields before the completion. */
	memcpy(&req, scratch + bytes, sizeof(req));
	if (rc) {
		if (req.status < 0 && req.error[0])
			set_error(c, "%.*s", (int)sizeof(req.error), req.error);
		else if (rc == -EFAULT)
			set_error(c, "moet_route_opts: %u logits, the model has a different expert count", n_logits);
		return rc;
	}
	in.subst_mask = req.subst_mask;
	in.open_mask = req.open_mask;
	in.n_resident = req.n_resident;
	for (unsigned i = 0; i < MOET_MAX_BATCH; i++) {
		in.exact[i] = i < e.count ? req.exact[i] : 0;
		in.exact_weights[i] = i < e.count ? req.exact_weight[i] : 0.0f;
	}
	memcpy(a, &in, a->size < sizeof(in) ? a->size : sizeof(in));
	for (unsigned i = 0; i < e.count; i++) {
		if (experts)
			experts[i] = e.ids[i];
		if (weights)
			weights[i] = e.weight[i];
	}
	fill_out(&e, e.count, slots, tiers, lease);
	return e.count;
}

int moet_prefetch(moet_ctx *c, uint32_t layer, const uint32_t *ids, unsigned n, unsigned tier)
{
	struct moet_sqe q;
	if (!c || !ids || n == 0 || n > MOET_MAX_BATCH)
		return -EINVAL;
	memset(&q, 0, sizeof(q));
	q.opcode = MOET_OP_PREFETCH;
	q.count = (uint16_t)n;
	q.layer = layer;
	q.tier = tier;
	q.user_tag = TAG_INTERNAL | TAG_DISCARD | ++c->next_tag;
	for (unsigned i = 0; i < n; i++)
		q.ids[i] = (uint16_t)(ids[i] > UINT16_MAX ? UINT16_MAX : ids[i]);
	return push_sqe(c, &q);
}

int moet_submit(moet_ctx *c, const struct moet_sqe *sqe)
{
	if (!c || !sqe || (sqe->user_tag & TAG_INTERNAL))
		return -EINVAL;
	return push_sqe(c, sqe);
}

int moet_reap(moet_ctx *c, struct moet_cqe *out, int timeout_ms)
{
	if (!c || !out || !c->ring_map)
		return -EINVAL;
	if (c->n_backlog) {
		*out = c->backlog[0];
		memmove(c->backlog, c->backlog + 1, (c->n_backlog - 1) * sizeof(*c->backlog));
		c->n_backlog--;
		return 1;
	}
	int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	for (;;) {
		int left = deadline < 0 ? -1 : (int)(deadline - now_ms());
		if (deadline >= 0 && left < 0)
			left = 0;
		int rc = reap_raw(c, out, left);
		if (rc <= 0)
			return rc;
		if (!(out->user_tag & TAG_INTERNAL))
			return 1;
	}
}

/* One fixed-size request, one fixed-size reply, no descriptors: a reply of
 * another length is -EPROTO. */
static int fixed_exchange(moet_ctx *c, uint16_t type, const void *req, size_t qlen, void *reply, size_t rlen)
{
	struct moet_msg h;
	int rc = send_req(c, type, 0, req, (uint32_t)qlen);
	if (rc)
		return rc;
	memset(reply, 0, rlen);
	rc = recv_reply(c, &h, reply, rlen, NULL, NULL, 30000);
	if (rc < 0)
		return rc;
	return h.len == rlen ? 0 : -EPROTO;
}

int moet_submit_socket(moet_ctx *c, const struct moet_sqe *sqe, struct moet_cqe *out)
{
	struct moet_msg h;
	if (!c || !sqe || !out)
		return -EINVAL;
	int rc = send_req(c, MOET_MSG_SUBMIT, 0, sqe, sizeof(*sqe));
	if (rc)
		return rc;
	rc = recv_reply(c, &h, out, sizeof(*out), NULL, NULL, 30000);
	if (rc == 0 && (h.type != MOET_MSG_SUBMIT_REPLY || h.len != sizeof(*out)))
		rc = -EPROTO;
	return rc;
}

const void *moet_slot_ptr(moet_ctx *c, unsigned tier, int32_t slot)
{
	if (!c || tier > 1 || slot < 0 || !c->arena[tier] || (uint32_t)slot >= c->info.n_slots[tier])
		return NULL;
	uint64_t off = (uint64_t)slot * c->info.slot_bytes[tier];
	if (off + c->info.extent_payload > c->arena_bytes[tier])
		return NULL;
	return c->arena[tier] + off;
}

static const uint32_t *layer_seq(moet_ctx *c, uint32_t layer)
{
	return (const uint32_t *)(c->shared + c->sh->layer_off + (uint64_t)layer * c->sh->layer_stride);
}

int moet_resident(moet_ctx *c, uint32_t layer, unsigned tier, uint8_t *mask, unsigned n)
{
	if (!c || !c->sh || !mask || tier > 1)
		return -EINVAL;
	if (layer >= c->sh->n_moe_layers)
		return -ERANGE;
	if (n < c->sh->n_experts)
		return -ENOSPC;
	const uint32_t *seq = layer_seq(c, layer);
	const uint64_t *bits = (const uint64_t *)((const uint8_t *)seq + 8) + (size_t)tier * c->sh->bitmap_words;
	uint64_t w[64];
	uint32_t words = c->sh->bitmap_words;
	if (words > 64)
		return -EPROTO;
	/* Seqlock read: retry while the daemon writes (odd) or wrote meanwhile. */
	for (;;) {
		uint32_t s1 = __atomic_load_n(seq, __ATOMIC_ACQUIRE);
		if (s1 & 1)
			continue;
		for (uint32_t i = 0; i < words; i++)
			w[i] = __atomic_load_n(&bits[i], __ATOMIC_RELAXED);
		__atomic_thread_fence(__ATOMIC_ACQUIRE);
		if (__atomic_load_n(seq, __ATOMIC_RELAXED) == s1)
			break;
	}
	int count = 0;
	for (uint32_t e = 0; e < c->sh->n_experts; e++) {
		mask[e] = (uint8_t)((w[e / 64] >> (e % 64)) & 1);
		count += mask[e];
	}
	return count;
}

int moet_wait_ready(moet_ctx *c, uint32_t layer, int timeout_ms)
{
	if (!c || !c->sh)
		return -EINVAL;
	if (layer >= c->sh->n_moe_layers)
		return -ERANGE;
	uint32_t *seq = (uint32_t *)layer_seq(c, layer);
	uint32_t v = __atomic_load_n(seq, __ATOMIC_ACQUIRE);
	int rc = ring_futex_wait(seq, v, timeout_ms < 0 ? -1 : (int64_t)timeout_ms * 1000000);
	if (rc == -ETIMEDOUT)
		return daemon_gone(c) ? MOET_E_DISCONNECTED : 0;
	if (rc < 0)
		return rc;
	return __atomic_load_n(seq, __ATOMIC_ACQUIRE) != v ? 1 : 0;
}

int moet_expert_counters(moet_ctx *c, uint64_t *hits, uint64_t *misses, uint64_t *loads, uint64_t *bytes)
{
	if (!c || !c->sh)
		return -EINVAL;
	const struct moet_expert_counters *e = (const void *)(c->shared + c->sh->counters_off);
	size_t n = (size_t)c->sh->n_moe_layers * c->sh->n_experts;
	for (size_t i = 0; i < n; i++) {
		if (hits)
			hits[i] = __atomic_load_n(&e[i].hits, __ATOMIC_RELAXED);
		if (misses)
			misses[i] = __atomic_load_n(&e[i].misses, __ATOMIC_RELAXED);
		if (loads)
			loads[i] = __atomic_load_n(&e[i].loads, __ATOMIC_RELAXED);
		if (bytes)
			bytes[i] = __atomic_load_n(&e[i].bytes, __ATOMIC_RELAXED);
	}
	return (int)n;
}

/* A request whose reply is text in a memfd (or an inline OK). */
static int text_request(moet_ctx *c, uint16_t type, uint32_t arg, const void *payload, uint32_t len, char **out)
{
	struct moet_msg h;
	int fd = -1;
	unsigned nfds = 1;
	int rc = send_req(c, type, arg, payload, len);
	if (rc)
		return rc;
	rc = recv_reply(c, &h, NULL, 0, &fd, &nfds, 30000);
	if (rc) {
		if (nfds && fd >= 0)
			close(fd);
		return rc;
	}
	if (!out) {
		if (nfds)
			close(fd);
		return 0;
	}
	if (!nfds)
		return -EPROTO;
	struct stat st;
	char *buf = NULL;
	if (fstat(fd, &st) == 0 && st.st_size >= 0 && (buf = malloc((size_t)st.st_size + 1))) {
		ssize_t n = pread(fd, buf, (size_t)st.st_size, 0);
		if (n != st.st_size) {
			free(buf);
			buf = NULL;
		} else {
			buf[n] = '\0';
		}
	}
	close(fd);
	if (!buf)
		return -EIO;
	*out = buf;
	return 0;
}

int moet_advise(moet_ctx *c, uint32_t layer, const uint32_t *ids, unsigned n, uint32_t tokens, uint8_t *where,
		uint8_t *tier, float *host_us, float *move_us)
{
	struct moet_advise_req q;
	struct moet_advise_reply r;
	if (!c || !ids || !where || n == 0 || n > MOET_MAX_BATCH)
		return -EINVAL;
	memset(&q, 0, sizeof(q));
	q.layer = layer;
	q.tokens = tokens;
	q.n = n;
	memcpy(q.ids, ids, n * sizeof(*ids));
	int rc = fixed_exchange(c, MOET_MSG_ADVISE, &q, sizeof(q), &r, sizeof(r));
	if (rc < 0)
		return rc;
	if (r.n != n)
		return -EPROTO;
	for (unsigned i = 0; i < n; i++) {
		where[i] = r.where[i];
		if (tier)
			tier[i] = r.tier[i];
		if (host_us)
			host_us[i] = r.host_us[i];
		if (move_us)
			move_us[i] = r.move_us[i];
	}
	return (int)n;
}

int moet_gpu_export(moet_ctx *c, unsigned first, struct moet_gpu_export *info, int *fds, uint64_t *offsets,
		    unsigned max)
{
	struct {
		struct moet_gpu_export x;
		uint64_t offsets[MOET_GPU_EXPORT_BATCH];
	} r;
	int got_fds[MOET_GPU_EXPORT_BATCH];
	unsigned nfds = MOET_GPU_EXPORT_BATCH;
	struct moet_msg h;
	if (!c || !info || (max && (!fds || !offsets)))
		return -EINVAL;
	int rc = send_req(c, MOET_MSG_GPU_EXPORT, first, NULL, 0);
	if (rc)
		return rc;
	memset(&r, 0, sizeof(r));
	rc = recv_reply(c, &h, &r, sizeof(r), got_fds, &nfds, 30000);
	if (rc == 0 && (h.len < sizeof(r.x) || r.x.n > MOET_GPU_EXPORT_BATCH || r.x.n != nfds ||
			h.len != sizeof(r.x) + r.x.n * sizeof(uint64_t)))
		rc = -EPROTO;
	if (rc < 0) {
		for (unsigned i = 0; i < nfds; i++)
			close(got_fds[i]);
		return rc;
	}
	*info = r.x;
	unsigned n = 0;
	for (unsigned i = 0; i < nfds; i++) {
		if (n < max) {
			fds[n] = got_fds[i];
			offsets[n] = r.offsets[i];
			n++;
		} else {
			close(got_fds[i]);
		}
	}
	info->n = n;
	return (int)n;
}

int moet_latent_basis(moet_ctx *c, uint32_t layer, uint32_t group, struct moet_latent_basis *out)
{
	struct moet_latent_basis_req q = { layer, group, { 0, 0 } };
	struct moet_latent_basis_reply r;
	struct moet_latent_basis b;
	/* size: the fields up to `bytes` are version 1 of the struct */
	if (!c || !out || out->size < sizeof(b))
		return -EINVAL;
	int rc = fixed_exchange(c, MOET_MSG_LATENT_BASIS, &q, sizeof(q), &r, sizeof(r));
	if (rc < 0)
		return rc;
	if (r.tier != MOET_TIER_GPU && r.tier != MOET_TIER_HOST)
		return -EPROTO;
	memset(&b, 0, sizeof(b));
	b.size = sizeof(b);
	b.tier = r.tier;
	b.dtype = r.dtype;
	b.rows = r.rows;
	b.cols = r.cols;
	b.offset = r.offset;
	b.bytes = r.bytes;
	memcpy(out, &b, sizeof(b));
	return 0;
}

int moet_stats(moet_ctx *c, unsigned format, char **out)
{
	return c && out ? text_request(c, MOET_MSG_STATS, format, NULL, 0, out) : -EINVAL;
}

int moet_clients(moet_ctx *c, char **out)
{
	return c && out ? text_request(c, MOET_MSG_CLIENTS, 0, NULL, 0, out) : -EINVAL;
}

int moet_config_get(moet_ctx *c, const char *name, char **out)
{
	if (!c || !out)
		return -EINVAL;
	size_t n = name ? strlen(name) + 1 : 0;
	if (n > 127)
		return -ENAMETOOLONG;
	return text_request(c, MOET_MSG_CONFIG_GET, 0, name, (uint32_t)n, out);
}

int moet_config_set(moet_ctx *c, const char *name, const char *value)
{
	char buf[1024];
	if (!c || !name || !value)
		return -EINVAL;
	int n = snprintf(buf, sizeof(buf), "%s=%s", name, value);
	if (n < 0 || (size_t)n >= sizeof(buf))
		return -ENAMETOOLONG;
	return text_request(c, MOET_MSG_CONFIG_SET, 0, buf, (uint32_t)n + 1, NULL);
}

static int expert_request(moet_ctx *c, uint16_t type, uint32_t layer, uint32_t expert, unsigned tier)
{
	struct moet_expert_arg a = { layer, expert, tier, 0 };
	return c ? text_request(c, type, 0, &a, sizeof(a), NULL) : -EINVAL;
}

int moet_pin(moet_ctx *c, uint32_t l, uint32_t e, unsigned t) { return expert_request(c, MOET_MSG_PIN, l, e, t); }
int moet_unpin(moet_ctx *c, uint32_t l, uint32_t e, unsigned t) { return expert_request(c, MOET_MSG_UNPIN, l, e, t); }
int moet_evict(moet_ctx *c, uint32_t l, uint32_t e, unsigned t) { return expert_request(c, MOET_MSG_EVICT, l, e, t); }

int moet_compute(moet_ctx *c, uint32_t layer, uint32_t tokens, uint32_t k, const uint32_t *experts,
		 const float *weights, const float *x, float *y)
{
	struct moet_sqe q;
	struct moet_cqe e;
	struct moet_compute_args a = { tokens, k, { 0, 0 } };
	if (!c || !c->ring_map || !experts || !weights || !x || !y || !tokens || !k)
		return -EINVAL;
	uint64_t n = c->info.hidden, tk = (uint64_t)tokens * k, tn = (uint64_t)tokens * n;
	uint64_t need = sizeof(a) + tk * 8 + tn * 8;
	if (need > c->reg.scratch_bytes || need > UINT32_MAX)
		return -E2BIG;
	uint8_t *s = c->ring_map + c->reg.scratch_off;
	memcpy(s, &a, sizeof(a));
	memcpy(s + sizeof(a), experts, tk * 4);
	memcpy(s + sizeof(a) + tk * 4, weights, tk * 4);
	memcpy(s + sizeof(a) + tk * 8, x, tn * 4);
	memset(&q, 0, sizeof(q));
	q.opcode = MOET_OP_COMPUTE;
	q.layer = layer;
	q.data_off = 0;
	q.data_len = (uint32_t)need;
	int rc = sync_entry(c, &q, &e);
	if (rc)
		return rc;
	if (e.result < 0)
		return e.result;
	memcpy(y, s + sizeof(a) + tk * 8 + tn * 4, tn * 4);
	return e.result;
}
