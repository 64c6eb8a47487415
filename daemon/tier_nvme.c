/* tier_nvme.c - io_uring expert reader with a pread fallback (see tier_nvme.h). */
#define _GNU_SOURCE
#include "tier_nvme.h"

#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "fault.h"

#define DIRECT_ALIGN 4096u

enum rd_state { RD_QUEUED, RD_INFLIGHT, RD_DONE };

struct rd {
	struct tier_nvme_req req;
	uint64_t done;       /* bytes already read */
	uint32_t retries;    /* resubmissions (all causes) */
	uint32_t eio;        /* -EIO retries */
	int res;
	enum rd_state state;
	uint64_t t0;
	struct rd *prev, *next;
};

struct rd_list {
	struct rd *head, *tail;
	unsigned n;
};

struct tier_nvme {
	int fd;
	bool uring, registered, fixed_file, sqpoll;
	struct io_uring ring;
	int efd;
	unsigned qd, inflight;
	unsigned retry_limit, eio_retries;
	const struct iovec *bufs;
	unsigned n_bufs;
	struct rd_list demand, prefetch, done;
	struct stats *st;
	char note[200];
};

static void list_push_tail(struct rd_list *l, struct rd *r)
{
	r->next = NULL;
	r->prev = l->tail;
	if (l->tail)
		l->tail->next = r;
	else
		l->head = r;
	l->tail = r;
	l->n++;
}

static void list_push_head(struct rd_list *l, struct rd *r)
{
	r->prev = NULL;
	r->next = l->head;
	if (l->head)
		l->head->prev = r;
	else
		l->tail = r;
	l->head = r;
	l->n++;
}

static void list_del(struct rd_list *l, struct rd *r)
{
	if (r->prev)
		r->prev->next = r->next;
	else
		l->head = r->next;
	if (r->next)
		r->next->prev = r->prev;
	else
		l->tail = r->prev;
	r->prev = r->next = NULL;
	l->n--;
}

static struct rd *list_pop(struct rd_list *l)
{
	struct rd *r = l->head;
	if (r)
		list_del(l, r);
	return r;
}

static void set_gauges(struct tier_nvme *n)
{
	stats_gauge_set(n->st, GAUGE_nvme_inflight, n->inflight);
	stats_gauge_set(n->st, GAUGE_nvme_queued, n->demand.n + n->prefetch.n);
}

/* io_uring operations do not pass through seccomp, so the allow-list of
 * daemon/priv.c says nothing about them: a daemon subverted after start-up
 * could open, write or connect through its ring. The ring is therefore
 * restricted before it is enabled (IORING_REGISTER_RESTRICTIONS): reads
 * only (READ_FIXED, and READ for a buffer outside the registered arena), of
 * the pack only when it is a fixed file (IOSQE_FIXED_FILE required), and no
 * further registration. A NOP then checks that the kernel refuses what was not
 * allowed. Returns the note's word for it. */
static int uring_register(struct tier_nvme *n, unsigned op, const void *arg, unsigned nr)
{
	long rc = syscall(__NR_io_uring_register, n->ring.ring_fd, op, arg, nr);
	return rc < 0 ? -errno : (int)rc;
}

static const char *restrict_uring(struct tier_nvme *n)
{
	struct io_uring_restriction res[5];
	unsigned nr = 0;
	memset(res, 0, sizeof(res));
	res[nr].opcode = IORING_RESTRICTION_SQE_OP;
	res[nr++].sqe_op = IORING_OP_READ_FIXED;
	res[nr].opcode = IORING_RESTRICTION_SQE_OP; /* a buffer outside the registered arena */
	res[nr++].sqe_op = IORING_OP_READ;
	res[nr].opcode = IORING_RESTRICTION_SQE_FLAGS_ALLOWED;
	res[nr++].sqe_flags = n->fixed_file ? IOSQE_FIXED_FILE : 0;
	if (n->fixed_file) {
		res[nr].opcode = IORING_RESTRICTION_SQE_FLAGS_REQUIRED;
		res[nr++].sqe_flags = IOSQE_FIXED_FILE;
	}
	/* the raw syscall: Debian 12's liburing 2.3 does not export
	 * io_uring_register_restrictions / io_uring_enable_rings */
	int rc;
	if (FAULT_HIT(FAULT_URING_RESTRICT)) {
		stats_inc(n->st, STAT_faults_injected);
		rc = -EINVAL;
	} else {
		rc = uring_register(n, IORING_REGISTER_RESTRICTIONS, res, nr);
	}
	if (rc < 0)
		moe_warn("NVMe engine: io_uring restrictions refused (%s): the ring runs unrestricted", strerror(-rc));
	int erc = uring_register(n, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
	if (erc < 0) {
		/* a disabled ring submits nothing: fall back to pread */
		moe_warn("NVMe engine: enabling the io_uring ring failed (%s): falling back to pread", strerror(-erc));
		io_uring_queue_exit(&n->ring);
		if (n->efd >= 0)
			close(n->efd);
		n->efd = -1;
		n->uring = n->fixed_file = n->registered = false;
		return "ring-enable-failed";
	}
	if (rc < 0)
		return "unrestricted";
	/* the check: an operation outside the list must come back -EACCES */
	struct io_uring_sqe *sqe = io_uring_get_sqe(&n->ring);
	struct io_uring_cqe *cqe;
	if (!sqe)
		return "restricted (unchecked)";
	io_uring_prep_nop(sqe);
	io_uring_sqe_set_data(sqe, NULL);
	if (io_uring_submit(&n->ring) != 1 || io_uring_wait_cqe(&n->ring, &cqe) < 0)
		return "restricted (unchecked)";
	int res_nop = cqe->res;
	io_uring_cqe_seen(&n->ring, cqe);
	if (res_nop != -EACCES) {
		moe_warn("NVMe engine: the io_uring restrictions did not hold (a NOP returned %d)", res_nop);
		return "restrictions-not-enforced";
	}
	return n->fixed_file ? "restricted(read-pack-only)" : "restricted(read-only)";
}

static void setup_uring(struct tier_nvme *n)
{
	unsigned entries = 1;
	while (entries < n->qd * 2)
		entries <<= 1;
	struct io_uring_params p;
	memset(&p, 0, sizeof(p));
	if (n->sqpoll) {
		p.flags |= IORING_SETUP_SQPOLL;
		p.sq_thread_idle = 100;
	} else {
		/* No IPI to interrupt us for task work: we reap when we want. */
		p.flags |= IORING_SETUP_COOP_TASKRUN;
	}
	/* Created disabled, so that restrictions can be set before the first
	 * submission (restrict_uring). */
	const unsigned want = p.flags;
	p.flags |= IORING_SETUP_R_DISABLED;
	int rc = io_uring_queue_init_params(entries, &n->ring, &p);
	if (rc == -EINVAL) { /* before 5.10: no R_DISABLED; then no COOP_TASKRUN either */
		memset(&p, 0, sizeof(p));
		p.flags = want;
		if (n->sqpoll)
			p.sq_thread_idle = 100;
		rc = io_uring_queue_init_params(entries, &n->ring, &p);
		if (rc == -EINVAL && !n->sqpoll) {
			memset(&p, 0, sizeof(p));
			rc = io_uring_queue_init_params(entries, &n->ring, &p);
		}
	}
	if (rc < 0) {
		snprintf(n->note, sizeof(n->note), "pread: io_uring_queue_init: %s", strerror(-rc));
		moe_warn("NVMe engine: io_uring cannot be set up (%s): falling back to pread", strerror(-rc));
		return;
	}
	n->uring = true;
	if (io_uring_register_files(&n->ring, &n->fd, 1) == 0)
		n->fixed_file = true;
	if (n->bufs && n->n_bufs) {
		rc = io_uring_register_buffers(&n->ring, n->bufs, n->n_bufs);
		if (rc == 0) {
			n->registered = true;
		} else {
			stats_inc(n->st, STAT_nvme_register_failures);
			moe_warn("NVMe engine: registering the host arena as fixed buffers failed (%s)%s; reading into unregistered buffers",
				 strerror(-rc),
				 rc == -ENOMEM ? ": RLIMIT_MEMLOCK too low (raise systemd LimitMEMLOCK= or grant CAP_IPC_LOCK)" : "");
		}
	}
	n->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (n->efd >= 0 && io_uring_register_eventfd(&n->ring, n->efd) != 0) {
		close(n->efd);
		n->efd = -1;
	}
	const char *restricted = (p.flags & IORING_SETUP_R_DISABLED) ? restrict_uring(n) : "unrestricted (no R_DISABLED)";
	snprintf(n->note, sizeof(n->note), "io_uring qd=%u%s%s%s %s", n->qd, n->fixed_file ? " fixed-file" : "",
		 n->registered ? " fixed-buffers" : " unregistered-buffers", n->sqpoll ? " sqpoll" : "", restricted);
}

int tier_nvme_create(int fd, const struct tier_nvme_config *cfg, struct stats *st, struct tier_nvme **out,
		     struct moe_error *err)
{
	*out = NULL;
	if (fd < 0)
		return moe_error_set(err, -EBADF, "NVMe engine: no file descriptor");
	struct tier_nvme_config def = { 0 };
	if (!cfg)
		cfg = &def;
	if (cfg->queue_depth > TIER_NVME_MAX_QD)
		return moe_error_set(err, -EINVAL, "NVMe engine: queue depth %u is above %u", cfg->queue_depth,
				     TIER_NVME_MAX_QD);
	struct tier_nvme *n = calloc(1, sizeof(*n));
	if (!n)
		return moe_error_set(err, -ENOMEM, "NVMe engine: out of memory");
	n->fd = fd;
	n->efd = -1;
	n->st = st;
	n->qd = cfg->queue_depth ? cfg->queue_depth : 8;
	n->retry_limit = cfg->retry_limit ? cfg->retry_limit : 16;
	n->eio_retries = cfg->eio_retries ? cfg->eio_retries : 2;
	n->bufs = cfg->buffers;
	n->n_bufs = cfg->n_buffers;
	n->sqpoll = cfg->sqpoll;
	if (cfg->no_uring)
		snprintf(n->note, sizeof(n->note), "pread: io_uring switched off by configuration");
	else
		setup_uring(n);
	stats_gauge_set(st, GAUGE_nvme_uring, n->uring);
	stats_gauge_set(st, GAUGE_nvme_registered, n->registered);
	stats_gauge_set(st, GAUGE_nvme_queue_depth, n->qd);
	*out = n;
	return 0;
}

static void free_list(struct rd_list *l)
{
	struct rd *r;
	while ((r = list_pop(l)))
		free(r);
}

void tier_nvme_destroy(struct tier_nvme *n)
{
	if (!n)
		return;
	free_list(&n->demand);
	free_list(&n->prefetch);
	if (n->uring) {
		/* The kernel still writes into buffers of reads in flight: wait. */
		while (n->inflight > 0) {
			struct io_uring_cqe *cqe;
			int rc = io_uring_wait_cqe(&n->ring, &cqe);
			if (rc == -EINTR)
				continue;
			if (rc < 0)
				break;
			struct rd *r = io_uring_cqe_get_data(cqe);
			io_uring_cqe_seen(&n->ring, cqe);
			if (r) {
				n->inflight--;
				free(r);
			}
		}
		io_uring_queue_exit(&n->ring);
	}
	if (n->efd >= 0)
		close(n->efd);
	free_list(&n->done);
	free(n);
}

int tier_nvme_queue(struct tier_nvme *n, const struct tier_nvme_req *req)
{
	if (!req || req->len == 0 || !req->buf)
		return -EINVAL;
	struct rd *r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	r->req = *req;
	r->state = RD_QUEUED;
	list_push_tail(req->prefetch ? &n->prefetch : &n->demand, r);
	set_gauges(n);
	return 0;
}

int tier_nvme_cancel(struct tier_nvme *n, uint64_t tag)
{
	struct rd_list *lists[2] = { &n->prefetch, &n->demand };
	for (int i = 0; i < 2; i++) {
		for (struct rd *r = lists[i]->head; r; r = r->next) {
			if (r->req.tag != tag)
				continue;
			list_del(lists[i], r);
			r->res = -ECANCELED;
			r->state = RD_DONE;
			list_push_tail(&n->done, r);
			stats_inc(n->st, STAT_nvme_cancels);
			set_gauges(n);
			return 0;
		}
	}
	/* A read already at the device cannot be pulled back in practice
	 * (an O_DIRECT block read ignores ASYNC_CANCEL once issued). */
	return -ENOENT;
}

int tier_nvme_promote(struct tier_nvme *n, uint64_t tag)
{
	for (struct rd *r = n->prefetch.head; r; r = r->next) {
		if (r->req.tag != tag)
			continue;
		list_del(&n->prefetch, r);
		r->req.prefetch = false;
		list_push_tail(&n->demand, r);
		return 0;
	}
	return -ENOENT;
}

static void finish(struct tier_nvme *n, struct rd *r, int res)
{
	r->res = res;
	r->state = RD_DONE;
	if (res == 0) {
		if (FAULT_HIT(FAULT_NVME_CORRUPT)) {
			stats_inc(n->st, STAT_faults_injected);
			((unsigned char *)r->req.buf)[r->req.len / 2] ^= 0x5a;
		}
		stats_inc(n->st, STAT_nvme_reads);
		stats_add(n->st, STAT_nvme_read_bytes, r->req.len);
		stats_hist_add(n->st, HIST_nvme_read_ns, moe_now_ns() - r->t0);
	} else if (res != -ECANCELED) {
		stats_inc(n->st, STAT_nvme_errors);
	}
	list_push_tail(&n->done, r);
}

/* Applies a completion result. Returns true when the read must be
 * resubmitted for its remaining bytes. */
static bool complete(struct tier_nvme *n, struct rd *r, long res)
{
	uint64_t remaining = r->req.len - r->done;
	if (FAULT_HIT(FAULT_NVME_EIO)) {
		stats_inc(n->st, STAT_faults_injected);
		res = -EIO;
	} else if (FAULT_HIT(FAULT_NVME_EAGAIN)) {
		stats_inc(n->st, STAT_faults_injected);
		res = -EAGAIN;
	} else if (FAULT_HIT(FAULT_NVME_EINTR)) {
		stats_inc(n->st, STAT_faults_injected);
		res = -EINTR;
	} else if (res >= 2 && FAULT_HIT(FAULT_NVME_SHORT)) {
		/* Half, in whole blocks when that is more than nothing; else a
		 * partial block, which makes no progress (the bound is tested). */
		stats_inc(n->st, STAT_faults_injected);
		long half = (res / 2) & ~(long)(DIRECT_ALIGN - 1);
		res = half ? half : res / 2;
	}
	if (res > 0) {
		if ((uint64_t)res >= remaining) {
			r->done = r->req.len;
			finish(n, r, 0);
			return false;
		}
		stats_inc(n->st, STAT_nvme_short_reads);
		/* O_DIRECT needs aligned offsets: keep only whole blocks and
		 * read the rest of the last one again. */
		uint64_t keep = (uint64_t)res & ~(uint64_t)(DIRECT_ALIGN - 1);
		r->done += keep;
		if (++r->retries > n->retry_limit) {
			finish(n, r, -EIO);
			return false;
		}
		return true;
	}
	if (res == 0) {
		/* End of file inside an extent: the pack is truncated. */
		finish(n, r, -EIO);
		return false;
	}
	if (res == -EAGAIN || res == -EINTR) {
		stats_inc(n->st, res == -EAGAIN ? STAT_nvme_retries_eagain : STAT_nvme_retries_eintr);
		if (++r->retries > n->retry_limit) {
			/* a read that never got through is an I/O error to the
			 * client, not "interrupted" or "try again" (a miss) */
			finish(n, r, -EIO);
			return false;
		}
		return true;
	}
	if (res == -EIO) {
		if (r->eio >= n->eio_retries) {
			finish(n, r, -EIO);
			return false;
		}
		r->eio++;
		r->retries++;
		stats_inc(n->st, STAT_nvme_retries_eio);
		return true;
	}
	finish(n, r, (int)res);
	return false;
}

static int prep_one(struct tier_nvme *n, struct rd *r)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&n->ring);
	if (!sqe)
		return -EBUSY;
	char *dst = (char *)r->req.buf + r->done;
	unsigned len = (unsigned)(r->req.len - r->done);
	uint64_t off = r->req.offset + r->done;
	int fd = n->fixed_file ? 0 : n->fd;
	bool fixed = false;
	if (n->registered && r->req.buf_index >= 0 && (unsigned)r->req.buf_index < n->n_bufs) {
		const struct iovec *iv = &n->bufs[r->req.buf_index];
		fixed = dst >= (char *)iv->iov_base && dst + len <= (char *)iv->iov_base + iv->iov_len;
	}
	if (fixed) {
		io_uring_prep_read_fixed(sqe, fd, dst, len, off, r->req.buf_index);
	} else {
		io_uring_prep_read(sqe, fd, dst, len, off);
		stats_inc(n->st, STAT_nvme_unregistered_reads);
	}
	if (n->fixed_file)
		sqe->flags |= IOSQE_FIXED_FILE;
	io_uring_sqe_set_data(sqe, r);
	return 0;
}

static void pread_one(struct tier_nvme *n, struct rd *r)
{
	for (;;) {
		ssize_t got = pread(n->fd, (char *)r->req.buf + r->done, r->req.len - r->done,
				    (off_t)(r->req.offset + r->done));
		stats_inc(n->st, STAT_nvme_pread_fallback);
		stats_inc(n->st, STAT_nvme_submits);
		if (!complete(n, r, got < 0 ? -errno : got))
			return;
	}
}

static struct rd *next_queued(struct tier_nvme *n)
{
	struct rd *r = list_pop(&n->demand);
	return r ? r : list_pop(&n->prefetch);
}

int tier_nvme_submit(struct tier_nvme *n)
{
	int started = 0;
	if (!n->uring) {
		struct rd *r;
		while ((r = next_queued(n))) {
			if (!r->t0) {
				r->t0 = moe_now_ns();
				stats_inc(n->st, r->req.prefetch ? STAT_nvme_prefetch_reads : STAT_nvme_demand_reads);
			}
			pread_one(n, r);
			started++;
		}
		set_gauges(n);
		return started;
	}
	while (n->inflight < n->qd) {
		struct rd *r = next_queued(n);
		if (!r)
			break;
		if (prep_one(n, r) < 0) {
			list_push_head(r->req.prefetch ? &n->prefetch : &n->demand, r);
			break;
		}
		if (!r->t0) {
			r->t0 = moe_now_ns();
			stats_inc(n->st, r->req.prefetch ? STAT_nvme_prefetch_reads : STAT_nvme_demand_reads);
		}
		r->state = RD_INFLIGHT;
		n->inflight++;
		started++;
	}
	if (started) {
		int rc;
		do
			rc = io_uring_submit(&n->ring);
		while (rc == -EINTR);
		if (rc < 0) {
			/* The SQEs stay in the ring; the next submit retries. */
			moe_warn("NVMe engine: io_uring_submit: %s", strerror(-rc));
			set_gauges(n);
			return rc;
		}
		stats_add(n->st, STAT_nvme_submits, (uint64_t)started);
	}
	set_gauges(n);
	return started;
}

/* Processes every CQE available now. */
static void drain_cqes(struct tier_nvme *n)
{
	struct io_uring_cqe *cqes[32];
	unsigned got;
	while ((got = io_uring_peek_batch_cqe(&n->ring, cqes, MOE_ARRAY_SIZE(cqes))) > 0) {
		for (unsigned i = 0; i < got; i++) {
			struct rd *r = io_uring_cqe_get_data(cqes[i]);
			int res = cqes[i]->res;
			if (!r)
				continue;
			n->inflight--;
			if (complete(n, r, res))
				list_push_head(r->req.prefetch ? &n->prefetch : &n->demand, r);
		}
		io_uring_cq_advance(&n->ring, got);
	}
}

int tier_nvme_reap(struct tier_nvme *n, struct tier_nvme_cqe *out, unsigned max, unsigned min_wait)
{
	if (n->uring) {
		if (n->efd >= 0) {
			uint64_t v;
			if (read(n->efd, &v, sizeof(v)) < 0 && errno != EAGAIN)
				moe_debug("NVMe engine: eventfd read: %s", strerror(errno));
		}
		for (;;) {
			drain_cqes(n);
			int rc = tier_nvme_submit(n); /* resubmits and refills */
			(void)rc;
			if (n->done.n >= min_wait || n->done.n >= max || n->inflight == 0)
				break;
			struct io_uring_cqe *cqe;
			rc = io_uring_wait_cqe(&n->ring, &cqe);
			if (rc < 0 && rc != -EINTR && rc != -ETIME)
				return rc;
		}
	} else {
		tier_nvme_submit(n);
	}
	unsigned k = 0;
	struct rd *r;
	while (k < max && (r = list_pop(&n->done))) {
		if (r->retries && r->res == 0)
			moe_debug("NVMe engine: read tag %llu needed %u retries", (unsigned long long)r->req.tag,
				  r->retries);
		out[k++] = (struct tier_nvme_cqe){ .tag = r->req.tag, .res = r->res, .retries = r->retries,
						  .lat_ns = r->t0 ? moe_now_ns() - r->t0 : 0 };
		free(r);
	}
	set_gauges(n);
	return (int)k;
}

int tier_nvme_eventfd(const struct tier_nvme *n) { return n->uring ? n->efd : -1; }
unsigned tier_nvme_inflight(const struct tier_nvme *n) { return n->inflight; }
unsigned tier_nvme_queued(const struct tier_nvme *n) { return n->demand.n + n->prefetch.n; }
unsigned tier_nvme_ready(const struct tier_nvme *n) { return n->done.n; }
bool tier_nvme_uses_uring(const struct tier_nvme *n) { return n->uring; }
bool tier_nvme_registered(const struct tier_nvme *n) { return n->registered; }
const char *tier_nvme_engine(const struct tier_nvme *n) { return n->uring ? "io_uring" : "pread"; }
const char *tier_nvme_engine_note(const struct tier_nvme *n) { return n->note; }
