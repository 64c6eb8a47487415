/* cache_io.c - the cache's I/O thread: it alone drives tier_nvme and
 * tier_gpu. It takes the job list the callers queued (loads, promotions,
 * cancels, GPU copies, evictions, exports), reaps the NVMe reads (CRC32C
 * checked outside the lock, one re-read on a mismatch) and the GPU copies,
 * and hands each outcome to the state machine (cache.c), then to on_ready. */
#define _GNU_SOURCE
#include "cache_impl.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "crc32c.h"
#include "fault.h"

static void call_ready(struct cache *c, uint32_t id, int tier, int status)
{
	if (c->cfg.on_ready)
		c->cfg.on_ready(c->cfg.on_ready_ctx, layer_of(c, id), expert_of(c, id), (enum cache_tier)tier, status);
}

static void run_jobs(struct cache *c, struct job *j)
{
	while (j) {
		struct job *next = j->next;
		switch (j->kind) {
		case JOB_LOAD: {
			const struct pack_index_entry *ie = pack_expert(c->pack, layer_of(c, j->expert),
								       expert_of(c, j->expert));
			struct tier_nvme_req rq = { .tag = j->expert, .offset = ie->offset, .len = c->extent,
						    .buf = tier_host_ptr(c->host, j->slot), .buf_index = (int)j->slot,
						    .prefetch = j->prefetch };
			int rc = tier_nvme_queue(c->nvme, &rq);
			if (rc < 0) {
				pthread_mutex_lock(&c->mu);
				cache_finish_host_load(c, j->expert, rc);
				cache_notify_ready(c);
				pthread_mutex_unlock(&c->mu);
				call_ready(c, j->expert, T_HOST, rc);
			}
			break;
		}
		case JOB_PROMOTE:
			tier_nvme_promote(c->nvme, j->expert);
			break;
		case JOB_CANCEL:
			if (tier_nvme_cancel(c->nvme, j->expert) < 0) {
				pthread_mutex_lock(&c->mu);
				c->ex[j->expert].cancel_asked = false;
				pthread_mutex_unlock(&c->mu);
			}
			break;
		case JOB_GPU_EVICT:
			/* -ENOENT: the slot never got its copy (a failed one). */
			tier_gpu_evict(c->gpu, j->gslot, false);
			break;
		case JOB_GPU_EXPORT: {
			struct gpu_export_req *r = j->export_req;
			int rc = tier_gpu_export(c->gpu, r->out, &r->err);
			pthread_mutex_lock(&c->mu);
			r->rc = rc;
			r->done = true;
			pthread_cond_broadcast(&c->cv);
			pthread_mutex_unlock(&c->mu);
			break;
		}
		case JOB_GPU_COPY: {
			struct moe_error err = { { 0 } };
			uint64_t token = 0;
			int rc;
			if (FAULT_HIT(FAULT_GPU_COPY)) {
				stats_inc(c->st, STAT_faults_injected);
				rc = -EIO;
			} else {
				rc = tier_gpu_copy_in(c->gpu, j->gslot, tier_host_ptr(c->host, j->slot), c->payload,
						      &token, &err);
			}
			pthread_mutex_lock(&c->mu);
			if (rc < 0) {
				moe_debug("cache: GPU copy: %s", err.msg);
				cache_finish_gpu_copy(c, j->expert, rc);
				cache_notify_ready(c);
			} else {
				c->gslot[j->gslot].token = token;
			}
			pthread_mutex_unlock(&c->mu);
			if (rc < 0)
				call_ready(c, j->expert, T_GPU, rc);
			break;
		}
		}
		free(j);
		j = next;
	}
}

/* A completed NVMe read: CRC check (outside the lock), then the state. */
static void nvme_done(struct cache *c, const struct tier_nvme_cqe *q)
{
	uint32_t id = (uint32_t)q->tag;
	int res = q->res;
	if (res == 0) {
		const struct pack_index_entry *ie = pack_expert(c->pack, layer_of(c, id), expert_of(c, id));
		pthread_mutex_lock(&c->mu);
		uint32_t slot = c->ex[id].slot[T_HOST];
		pthread_mutex_unlock(&c->mu);
		uint64_t t0 = moe_now_ns();
		uint32_t crc = crc32c(tier_host_ptr(c->host, slot), ie->length);
		stats_hist_add(c->st, HIST_crc_ns, moe_now_ns() - t0);
		if (crc != ie->crc32c) {
			stats_inc(c->st, STAT_cache_checksum_failures);
			pthread_mutex_lock(&c->mu);
			bool reread = c->ex[id].crc_fails++ == 0;
			pthread_mutex_unlock(&c->mu);
			if (reread) {
				stats_inc(c->st, STAT_cache_checksum_rereads);
				struct tier_nvme_req rq = { .tag = id, .offset = ie->offset, .len = c->extent,
							    .buf = tier_host_ptr(c->host, slot), .buf_index = (int)slot };
				if (tier_nvme_queue(c->nvme, &rq) == 0)
					return;
			}
			res = -EBADMSG;
		}
	}
	pthread_mutex_lock(&c->mu);
	cache_finish_host_load(c, id, res);
	cache_update_gauges(c);
	cache_notify_ready(c);
	pthread_mutex_unlock(&c->mu);
	call_ready(c, id, T_HOST, res);
}

static void gpu_done(struct cache *c, const struct tier_gpu_done *d)
{
	if (d->to_host)
		return;
	pthread_mutex_lock(&c->mu);
	struct slot_state *gs = &c->gslot[d->slot];
	uint32_t id = gs->owner;
	bool ours = id != NONE && gs->token == d->token && c->ex[id].st[T_GPU] == CACHE_LOADING;
	if (ours) {
		cache_finish_gpu_copy(c, id, d->rc);
		cache_update_gauges(c);
		cache_notify_ready(c);
	}
	pthread_mutex_unlock(&c->mu);
	if (ours)
		call_ready(c, id, T_GPU, d->rc);
}

void *cache_io_main(void *arg)
{
	struct cache *c = arg;
	/* Above the clients' compute threads: a completion waiting for a core
	 * is a client stalled (Linux: PRIO_PROCESS with a thread id is that
	 * thread alone). cache_create waits for the outcome. */
	int nrc = 0;
	if (c->cfg.io_nice && setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), c->cfg.io_nice) < 0)
		nrc = -errno;
	pthread_mutex_lock(&c->mu);
	c->io_nice_rc = nrc;
	c->io_nice_done = true;
	pthread_cond_broadcast(&c->cv);
	pthread_mutex_unlock(&c->mu);
	struct tier_nvme_cqe cq[32];
	struct tier_gpu_done gd[32];
	for (;;) {
		pthread_mutex_lock(&c->mu);
		struct job *j = c->jobs_head;
		c->jobs_head = c->jobs_tail = NULL;
		bool stop = c->stop;
		pthread_mutex_unlock(&c->mu);
		run_jobs(c, j);
		if (stop)
			break;
		tier_nvme_submit(c->nvme);
		int n;
		while ((n = tier_nvme_reap(c->nvme, cq, MOE_ARRAY_SIZE(cq), 0)) > 0)
			for (int i = 0; i < n; i++)
				nvme_done(c, &cq[i]);
		if (c->gpu)
			while ((n = tier_gpu_reap(c->gpu, gd, MOE_ARRAY_SIZE(gd))) > 0)
				for (int i = 0; i < n; i++)
					gpu_done(c, &gd[i]);
		/* Re-reads queued by nvme_done, or pread results: go round again. */
		if (tier_nvme_queued(c->nvme) || tier_nvme_ready(c->nvme))
			continue;
		struct pollfd pf[3];
		int np = 0;
		pf[np++] = (struct pollfd){ .fd = c->wake_efd, .events = POLLIN };
		int nfd = tier_nvme_eventfd(c->nvme);
		if (nfd >= 0)
			pf[np++] = (struct pollfd){ .fd = nfd, .events = POLLIN };
		if (c->gpu)
			pf[np++] = (struct pollfd){ .fd = tier_gpu_event_fd(c->gpu), .events = POLLIN };
		/* Without an eventfd on the ring, poll it every millisecond. */
		int timeout = nfd < 0 && tier_nvme_inflight(c->nvme) ? 1 : -1;
		if (poll(pf, (nfds_t)np, timeout) > 0 && (pf[0].revents & POLLIN)) {
			uint64_t v;
			if (read(c->wake_efd, &v, sizeof(v)) < 0)
				moe_debug("cache: wake eventfd read: %s", strerror(errno));
		}
	}
	return NULL;
}
