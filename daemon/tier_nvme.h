/* tier_nvme.h - the NVMe -> host read engine.
 *
 * One whole expert per read, O_DIRECT, straight into a host slot. io_uring
 * with the pack registered as a fixed file and the host arena registered as
 * fixed buffers (one buffer per slot); up to queue_depth reads in flight.
 * Two queues: every demand read is submitted before any prefetch read, and a
 * queued read can be cancelled (a prefetch no longer wanted) before it is
 * submitted. Completions handle short reads (the rest is resubmitted),
 * -EAGAIN and -EINTR (resubmitted, bounded, counted) and -EIO (retried a few
 * times, counted, then an error). When io_uring cannot be set up (or is
 * switched off) the same API runs on pread(2), and the stats say so.
 *
 * Single owner: one thread calls everything (cache.c's I/O thread, or a
 * benchmark). Not thread-safe.
 */
#ifndef MOETIER_TIER_NVME_H
#define MOETIER_TIER_NVME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "stats.h"
#include "util.h"

#define TIER_NVME_MAX_QD 256

struct tier_nvme_config {
	unsigned queue_depth;        /* 1..TIER_NVME_MAX_QD; 0 = 8 */
	bool no_uring;               /* use the pread fallback */
	bool sqpoll;                 /* IORING_SETUP_SQPOLL (off by default) */
	unsigned retry_limit;        /* -EAGAIN/-EINTR/short resubmits per read; 0 = 16 */
	unsigned eio_retries;        /* -EIO retries per read; 0 = 2 (negative: none) */
	const struct iovec *buffers; /* registered as fixed buffers; may be NULL */
	unsigned n_buffers;
};

struct tier_nvme;

struct tier_nvme_req {
	uint64_t tag;      /* caller's id, returned in the completion; unique among queued/in-flight reads */
	uint64_t offset;   /* file offset (4 KiB aligned for O_DIRECT) */
	uint64_t len;      /* bytes (4 KiB multiple for O_DIRECT) */
	void *buf;         /* destination (4 KiB aligned for O_DIRECT) */
	int buf_index;     /* registered buffer holding buf, or -1 */
	bool prefetch;     /* low priority */
};

struct tier_nvme_cqe {
	uint64_t tag;
	int res;           /* 0: all len bytes read; -ECANCELED; -EIO; other -errno */
	uint32_t retries;  /* resubmissions this read needed */
	uint64_t lat_ns;   /* first submit to completion */
};

/* fd: the pack's O_DIRECT descriptor (a buffered one works too). */
int tier_nvme_create(int fd, const struct tier_nvme_config *cfg, struct stats *st, struct tier_nvme **out,
		     struct moe_error *err);
/* Waits for reads in flight, drops queued ones. */
void tier_nvme_destroy(struct tier_nvme *n);

/* Queues a read (nothing is submitted until tier_nvme_submit). -EINVAL for a
 * zero length, -ENOMEM. */
int tier_nvme_queue(struct tier_nvme *n, const struct tier_nvme_req *req);
/* Cancels a read by tag: 0 when it was still queued (its completion will
 * say -ECANCELED), -EBUSY when it is already in flight (it completes
 * normally), -ENOENT when unknown. */
int tier_nvme_cancel(struct tier_nvme *n, uint64_t tag);
/* Moves a queued prefetch read to the tail of the demand queue (a demand
 * request now waits for it). 0, or -ENOENT when it is not queued as a
 * prefetch (already in flight: nothing to gain). */
int tier_nvme_promote(struct tier_nvme *n, uint64_t tag);
/* Moves queued reads into the ring (demand first) up to the queue depth and
 * submits them. With pread, performs them. Returns reads started or -errno. */
int tier_nvme_submit(struct tier_nvme *n);
/* Collects finished reads into out[0..max). Waits for at least min_wait
 * (bounded by what is in flight). Resubmits retries and refills the queue
 * depth internally. Returns the number stored or -errno. */
int tier_nvme_reap(struct tier_nvme *n, struct tier_nvme_cqe *out, unsigned max, unsigned min_wait);

/* An eventfd signalled when io_uring completions arrive (-1 for pread: its
 * completions are ready when tier_nvme_submit returns). */
int tier_nvme_eventfd(const struct tier_nvme *n);
unsigned tier_nvme_inflight(const struct tier_nvme *n);
unsigned tier_nvme_queued(const struct tier_nvme *n);
/* Completions ready for tier_nvme_reap without waiting (pread mode). */
unsigned tier_nvme_ready(const struct tier_nvme *n);
bool tier_nvme_uses_uring(const struct tier_nvme *n);
bool tier_nvme_registered(const struct tier_nvme *n);
/* "io_uring" or "pread" */
const char *tier_nvme_engine(const struct tier_nvme *n);
/* Why the engine is what it is, e.g. "pread: io_uring_queue_init: Operation not permitted". */
const char *tier_nvme_engine_note(const struct tier_nvme *n);

#endif
