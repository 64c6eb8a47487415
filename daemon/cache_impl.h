/* cache_impl.h - private to cache.c (the residency state machine) and
 * cache_io.c (its I/O thread): the cache's state and the transitions the I/O
 * thread makes when a load or copy ends. Locking: see cache.c. */
#ifndef MOETIER_CACHE_IMPL_H
#define MOETIER_CACHE_IMPL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "cache.h"
#include "tier_gpu.h"
#include "tier_host.h"
#include "tier_nvme.h"

#define NONE UINT32_MAX
#define T_GPU 0
#define T_HOST 1

struct slot_state {
	uint32_t owner;  /* expert id, or NONE when free */
	uint32_t gen;    /* bumped at every change of owner */
	uint32_t refs;   /* client leases */
	uint32_t iref;   /* internal holds (source of a host -> GPU copy) */
	uint64_t token;  /* GPU: token of the copy in flight */
};

struct expert_state {
	uint8_t st[2];        /* enum cache_residency per memory tier */
	uint8_t crc_fails;    /* CRC mismatches during the current host load */
	bool prefetch;        /* current host load is a prefetch nobody demanded */
	bool prefetched;      /* loaded by a prefetch and not used since */
	bool cancel_asked;    /* a cancel of its (prefetch) load was requested */
	bool want_gpu;        /* promote to the GPU as soon as the host load lands */
	bool gpu_prefetched;  /* GPU copy made for a prefetch and not used since */
	uint32_t slot[2];
	uint32_t pins[2];
	int err;              /* result of the last failed load/copy, 0 if none */
	uint16_t bad_fails;   /* host loads failed in a row (0: not bad) */
	bool bad_reported;    /* the last failure was answered to an acquire */
	uint64_t bad_until;   /* moe_now_ns() before which it is not re-read */
	uint64_t bad_refused; /* acquires answered with err while bad */
	uint64_t mark;        /* c->calls of the last acquire naming it */
};

/* A client's hold on one slot: the leases it took on that (tier, slot,
 * generation), counted; struct cache_lease is the handle it was given. */
struct cache_lease_ref {
	uint32_t slot, gen, count;
	uint8_t tier;
};

/* A client id of the caller's (the service's connection slot + 1) and the
 * leases it holds. */
struct cache_client {
	uint32_t id;
	bool used;
	struct cache_lease_ref *v;
	size_t n, cap;
};

enum job_kind { JOB_LOAD, JOB_PROMOTE, JOB_CANCEL, JOB_GPU_COPY, JOB_GPU_EVICT, JOB_GPU_EXPORT };

/* A GPU export runs on the I/O thread, which alone drives tier_gpu. */
struct gpu_export_req {
	struct tier_gpu_export *out;
	struct moe_error err;
	int rc;
	bool done; /* [mu] */
};

struct job {
	enum job_kind kind;
	uint32_t expert, slot, gslot;
	bool prefetch;
	struct gpu_export_req *export_req; /* JOB_GPU_EXPORT */
	struct job *next;
};

#define CACHE_LOG_BURST 10

struct cache {
	struct pack_file *pack;
	uint64_t log_window_ns;   /* load-error log lines: at most CACHE_LOG_BURST a second */
	uint32_t log_lines, log_suppressed;
	struct cache_config cfg;
	uint32_t n_layers, n_experts, n_ids;
	uint64_t payload, extent;

	struct stats *st;
	struct tier_host *host;
	struct tier_nvme *nvme;
	struct tier_gpu *gpu;
	uint32_t n_gslots;
	/* Emulated GPU region exported once (read-only memfd) for clients. */
	struct tier_gpu_export gpu_exp;
	bool gpu_exp_valid;

	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct expert_state *ex;     /* [n_ids] [mu] */
	struct slot_state *hslot;    /* [host slots] [mu] */
	struct slot_state *gslot;    /* [gpu slots] [mu] */
	uint32_t *gfree;             /* free GPU slots (stack) [mu] */
	uint32_t n_gfree;
	struct policy *pol[2];       /* [mu] */
	struct cache_client *clients;      /* [max_clients] [mu] */
	unsigned n_clients;
	struct job *jobs_head, *jobs_tail; /* [mu] */
	unsigned busy;               /* loads + copies queued or in flight [mu] */
	uint64_t calls;              /* acquire calls, the policies' clock [mu] */
	uint32_t *hocc;              /* host slots held per layer (layer_slots) [mu] */
	bool retry;                  /* the acquire in progress repeats the last one [mu] */
	bool stop;                   /* [mu] */

	int wake_efd;                /* wakes the I/O thread */
	int ready_efd;               /* cache_eventfd() */
	pthread_t io;
	bool io_started;
	bool io_nice_done;        /* the I/O thread has applied cfg.io_nice */
	int io_nice_rc;           /* its result: 0 or -errno */
	const char *engine;
};

static inline uint32_t id_of(const struct cache *c, struct cache_key k) { return k.layer * c->n_experts + k.expert; }
static inline bool key_ok(const struct cache *c, struct cache_key k) { return k.layer < c->n_layers && k.expert < c->n_experts; }
static inline uint32_t layer_of(const struct cache *c, uint32_t id) { return id / c->n_experts; }
static inline uint32_t expert_of(const struct cache *c, uint32_t id) { return id % c->n_experts; }

/* Under c->mu. A host load or a host -> GPU copy ended (res 0 or -errno). */
void cache_finish_host_load(struct cache *c, uint32_t id, int res);
void cache_finish_gpu_copy(struct cache *c, uint32_t id, int res);
/* Wakes whoever waits for a load (cache_eventfd, cache_wait_idle). */
void cache_notify_ready(struct cache *c);
void cache_update_gauges(struct cache *c);

/* The I/O thread (cache_io.c): runs the job list, reaps NVMe reads (CRC
 * check outside the lock) and GPU copies, until c->stop. */
void *cache_io_main(void *arg);

#endif
