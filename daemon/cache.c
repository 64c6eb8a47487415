/* cache.c - residency state machine, leases, promotion and eviction (see cache.h).
 *
 * Locking: c->mu protects every field of struct cache (cache_impl.h) marked
 * [mu]. The I/O thread (cache_io.c) owns the tier_nvme engine and the
 * tier_gpu arena (both single-owner) and talks to the callers through a job
 * list [mu] and a wake eventfd. No acquire waits here: a miss starts (or
 * joins) a load and returns; the caller is told through on_ready and the
 * ready eventfd, and retries (the service parks blocking acquires,
 * server_ring.c). c->cv is broadcast whenever a load or copy finishes, for
 * cache_wait_idle and the GPU export. The I/O thread never holds c->mu while
 * it calls into tier_nvme or tier_gpu, and the CRC32C of a fresh load is
 * computed without the lock: the slot is LOADING and owned by that load, so
 * nothing else reads or writes it.
 */
#define _GNU_SOURCE
#include "cache_impl.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "fault.h"
#include "policy.h"
#include "tier_gpu.h"
#include "tier_host.h"
#include "tier_nvme.h"

/* ---- small helpers (all under c->mu) -------------------------------------- */

void cache_notify_ready(struct cache *c)
{
	uint64_t one = 1;
	if (write(c->ready_efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		moe_debug("cache: ready eventfd: %s", strerror(errno));
	pthread_cond_broadcast(&c->cv);
}

static void wake_io(struct cache *c)
{
	uint64_t one = 1;
	if (write(c->wake_efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		moe_debug("cache: wake eventfd: %s", strerror(errno));
}

static int push_job(struct cache *c, enum job_kind kind, uint32_t expert, uint32_t slot, uint32_t gslot,
		    bool prefetch)
{
	struct job *j = calloc(1, sizeof(*j));
	if (!j)
		return -ENOMEM;
	*j = (struct job){ .kind = kind, .expert = expert, .slot = slot, .gslot = gslot, .prefetch = prefetch };
	if (c->jobs_tail)
		c->jobs_tail->next = j;
	else
		c->jobs_head = j;
	c->jobs_tail = j;
	wake_io(c);
	return 0;
}

void cache_update_gauges(struct cache *c)
{
	int64_t used = 0, leased = 0;
	uint32_t nh = tier_host_n_slots(c->host);
	for (uint32_t s = 0; s < nh; s++) {
		used += c->hslot[s].owner != NONE;
		leased += c->hslot[s].refs > 0;
	}
	stats_gauge_set(c->st, GAUGE_host_slots_used, used);
	stats_gauge_set(c->st, GAUGE_host_slots_leased, leased);
	used = leased = 0;
	for (uint32_t s = 0; s < c->n_gslots; s++) {
		used += c->gslot[s].owner != NONE;
		leased += c->gslot[s].refs > 0;
	}
	stats_gauge_set(c->st, GAUGE_gpu_slots_used, used);
	stats_gauge_set(c->st, GAUGE_gpu_slots_leased, leased);
	int64_t ncl = 0;
	for (unsigned i = 0; i < c->n_clients; i++)
		ncl += c->clients[i].used && c->clients[i].n > 0;
	stats_gauge_set(c->st, GAUGE_clients_with_leases, ncl);
}

static struct slot_state *slot_of(struct cache *c, int tier, uint32_t slot)
{
	if (tier == T_HOST)
		return slot < tier_host_n_slots(c->host) ? &c->hslot[slot] : NULL;
	return slot < c->n_gslots ? &c->gslot[slot] : NULL;
}

/* Frees a slot of tier t held by expert id and marks the expert ABSENT
 * there. The caller has checked that nothing holds it. */
static void drop_slot(struct cache *c, uint32_t id, int t)
{
	struct expert_state *e = &c->ex[id];
	uint32_t s = e->slot[t];
	struct slot_state *ss = slot_of(c, t, s);
	ss->owner = NONE;
	ss->gen++;
	ss->refs = ss->iref = 0;
	if (t == T_HOST) {
		tier_host_free(c->host, s);
		if (c->hocc)
			c->hocc[layer_of(c, id)]--;
	} else {
		c->gfree[c->n_gfree++] = s;
		/* The arena itself is driven by the I/O thread; it clears the
		 * slot before any later copy into it (jobs run in order). */
		push_job(c, JOB_GPU_EVICT, id, NONE, s, false);
	}
	e->slot[t] = NONE;
	e->st[t] = CACHE_ABSENT;
	if (c->pol[t])
		policy_remove(c->pol[t], id);
}

static bool gpu_evictable(struct cache *c, uint32_t id)
{
	const struct expert_state *e = &c->ex[id];
	if (e->st[T_GPU] != CACHE_RESIDENT || e->pins[T_GPU])
		return false;
	const struct slot_state *ss = &c->gslot[e->slot[T_GPU]];
	return ss->refs == 0 && ss->iref == 0;
}

static bool host_evictable(struct cache *c, uint32_t id)
{
	const struct expert_state *e = &c->ex[id];
	if (e->st[T_HOST] != CACHE_RESIDENT || e->pins[T_HOST])
		return false;
	const struct slot_state *ss = &c->hslot[e->slot[T_HOST]];
	if (ss->refs || ss->iref)
		return false;
	/* Inclusive: the GPU copy goes with it, so it must be free too. */
	if (!c->cfg.exclusive && e->st[T_GPU] != CACHE_ABSENT && !gpu_evictable(c, id))
		return false;
	return true;
}

/* Victims never come from the experts of the last acquire: one of its
 * entries that was resident when the call began must not be pushed out by
 * the load of another entry before it is leased (moe-sim's rule: victims
 * are chosen among experts not in the current access). */
static bool in_current_access(const struct cache *c, uint32_t id) { return c->calls && c->ex[id].mark == c->calls; }
static bool filter_host(void *ctx, uint32_t id)
{
	return !in_current_access(ctx, id) && host_evictable(ctx, id);
}
static bool filter_gpu(void *ctx, uint32_t id) { return !in_current_access(ctx, id) && gpu_evictable(ctx, id); }

static void evict_gpu(struct cache *c, uint32_t id)
{
	c->ex[id].st[T_GPU] = CACHE_EVICTING;
	if (c->ex[id].gpu_prefetched)
		stats_inc(c->st, STAT_cache_gpu_prefetch_wasted);
	c->ex[id].gpu_prefetched = false;
	drop_slot(c, id, T_GPU);
	stats_inc(c->st, STAT_cache_evictions_gpu);
}

static void evict_host(struct cache *c, uint32_t id)
{
	struct expert_state *e = &c->ex[id];
	if (!c->cfg.exclusive && e->st[T_GPU] == CACHE_RESIDENT)
		evict_gpu(c, id);
	e->st[T_HOST] = CACHE_EVICTING;
	if (e->prefetched)
		stats_inc(c->st, STAT_cache_prefetch_wasted);
	e->prefetched = false;
	drop_slot(c, id, T_HOST);
	stats_inc(c->st, STAT_cache_evictions_host);
}

/* Asks the I/O thread to cancel one queued prefetch nobody demanded, so
 * that its slot comes back. */
static void cancel_one_prefetch(struct cache *c, uint32_t layer)
{
	for (uint32_t id = 0; id < c->n_ids; id++) {
		struct expert_state *e = &c->ex[id];
		if (c->hocc && layer_of(c, id) != layer)
			continue; /* only a slot of this layer's budget helps */
		if (e->st[T_HOST] == CACHE_LOADING && e->prefetch && !e->cancel_asked) {
			e->cancel_asked = true;
			push_job(c, JOB_CANCEL, id, e->slot[T_HOST], NONE, true);
			return;
		}
	}
}

/* A free host slot, evicting if needed: slot number, -ENOBUFS when nothing
 * can be evicted, -ENOMEM on an allocation failure. */
static int alloc_host(struct cache *c, uint32_t layer, bool demand)
{
	/* Per-layer budgets: make room in this layer first; the arena holds
	 * n_layers * layer_slots slots, so a free one then exists. */
	while (c->hocc && c->hocc[layer] >= c->cfg.layer_slots) {
		uint32_t v = policy_victim(c->pol[T_HOST], layer, filter_host, c);
		if (v == POLICY_NONE) {
			if (demand)
				cancel_one_prefetch(c, layer);
			return -ENOBUFS;
		}
		evict_host(c, v);
	}
	for (;;) {
		int s = tier_host_alloc(c->host, 0);
		if (s >= 0 || s != -ENOSPC)
			return s;
		uint32_t v = policy_victim(c->pol[T_HOST], 0, filter_host, c);
		if (v == POLICY_NONE) {
			if (demand)
				cancel_one_prefetch(c, layer);
			return -ENOBUFS;
		}
		evict_host(c, v);
	}
}

static int alloc_gpu(struct cache *c)
{
	if (FAULT_HIT(FAULT_GPU_ALLOC)) {
		stats_inc(c->st, STAT_faults_injected);
		return -ENOMEM;
	}
	for (;;) {
		if (c->n_gfree)
			return (int)c->gfree[--c->n_gfree];
		uint32_t v = policy_victim(c->pol[T_GPU], 0, filter_gpu, c);
		if (v == POLICY_NONE)
			return -ENOBUFS;
		evict_gpu(c, v);
	}
}

/* Starts an NVMe -> host load of id. 0 or a negative errno. */
static int start_host_load(struct cache *c, uint32_t id, bool prefetch)
{
	struct expert_state *e = &c->ex[id];
	int s = alloc_host(c, layer_of(c, id), !prefetch);
	if (s < 0)
		return s;
	if (c->hocc)
		c->hocc[layer_of(c, id)]++;
	struct slot_state *ss = &c->hslot[s];
	ss->owner = id;
	ss->gen++;
	e->slot[T_HOST] = (uint32_t)s;
	e->st[T_HOST] = CACHE_LOADING;
	e->crc_fails = 0;
	e->prefetch = prefetch;
	e->prefetched = false;
	e->cancel_asked = false;
	e->err = 0;
	int rc = push_job(c, JOB_LOAD, id, (uint32_t)s, NONE, prefetch);
	if (rc < 0) {
		drop_slot(c, id, T_HOST);
		return rc;
	}
	c->busy++;
	if (prefetch)
		stats_inc(c->st, STAT_cache_prefetches);
	return 0;
}

/* Starts a host -> GPU copy of a host-resident id. */
static void gpu_prefetch_started(struct cache *c, struct expert_state *e)
{
	e->gpu_prefetched = true;
	stats_inc(c->st, STAT_cache_gpu_prefetches);
}

static int start_gpu_copy(struct cache *c, uint32_t id)
{
	struct expert_state *e = &c->ex[id];
	int g = alloc_gpu(c);
	if (g < 0)
		return g;
	struct slot_state *gs = &c->gslot[g];
	gs->owner = id;
	gs->gen++;
	e->slot[T_GPU] = (uint32_t)g;
	e->st[T_GPU] = CACHE_LOADING;
	e->err = 0;
	c->hslot[e->slot[T_HOST]].iref++;
	int rc = push_job(c, JOB_GPU_COPY, id, e->slot[T_HOST], (uint32_t)g, false);
	if (rc < 0) {
		c->hslot[e->slot[T_HOST]].iref--;
		e->slot[T_GPU] = NONE;
		e->st[T_GPU] = CACHE_ABSENT;
		gs->owner = NONE;
		gs->gen++;
		c->gfree[c->n_gfree++] = (uint32_t)g;
		return rc;
	}
	c->busy++;
	return 0;
}

/* ---- leases -------------------------------------------------------------- */

static struct cache_client *client_get(struct cache *c, uint32_t client, bool create)
{
	struct cache_client *free_one = NULL;
	for (unsigned i = 0; i < c->n_clients; i++) {
		if (c->clients[i].used && c->clients[i].id == client)
			return &c->clients[i];
		/* An id with no lease left holds no state: its entry is reusable. */
		if ((!c->clients[i].used || c->clients[i].n == 0) && !free_one)
			free_one = &c->clients[i];
	}
	if (!create)
		return NULL;
	if (!free_one) {
		if (c->n_clients == c->cfg.max_clients)
			return NULL;
		free_one = &c->clients[c->n_clients++];
	}
	free_one->used = true;
	free_one->id = client;
	free_one->n = 0;
	return free_one;
}

static int lease_add(struct cache *c, struct cache_client *cl, int t, uint32_t slot)
{
	struct slot_state *ss = slot_of(c, t, slot);
	for (size_t i = 0; i < cl->n; i++) {
		struct cache_lease_ref *r = &cl->v[i];
		if (r->tier == t && r->slot == slot && r->gen == ss->gen) {
			r->count++;
			ss->refs++;
			return 0;
		}
	}
	if (cl->n == cl->cap) {
		size_t cap = cl->cap ? cl->cap * 2 : 16;
		struct cache_lease_ref *nv = realloc(cl->v, cap * sizeof(*nv));
		if (!nv)
			return -ENOMEM;
		cl->v = nv;
		cl->cap = cap;
	}
	cl->v[cl->n++] = (struct cache_lease_ref){ .slot = slot, .gen = ss->gen, .count = 1, .tier = (uint8_t)t };
	ss->refs++;
	return 0;
}

/* A lease dropped to zero refs: in an exclusive cache, a host copy whose
 * expert now lives on the GPU is let go. */
static void after_unref(struct cache *c, int t, uint32_t slot)
{
	struct slot_state *ss = slot_of(c, t, slot);
	if (t != T_HOST || !c->cfg.exclusive || ss->refs || ss->iref || ss->owner == NONE)
		return;
	uint32_t id = ss->owner;
	if (c->ex[id].st[T_GPU] == CACHE_RESIDENT && !c->ex[id].pins[T_HOST] && c->ex[id].st[T_HOST] == CACHE_RESIDENT) {
		c->ex[id].st[T_HOST] = CACHE_EVICTING;
		drop_slot(c, id, T_HOST);
	}
}

/* ---- acquire ------------------------------------------------------------- */

/* One entry: serves it (status 0), starts or joins a load (-EAGAIN), or
 * fails it (-ENOBUFS: no slot can be freed now; a load error). */
static void try_entry(struct cache *c, struct cache_client *cl, uint32_t id, unsigned flags, struct cache_loc *out)
{
	struct expert_state *e = &c->ex[id];
	bool want_gpu = (flags & CACHE_WANT_GPU) && c->gpu;
	int t = want_gpu ? T_GPU : T_HOST;
	uint32_t l = layer_of(c, id), x = expert_of(c, id);

	/* A caller without WANT_GPU needs host addresses: served from its tier. */
	if (e->st[t] == CACHE_RESIDENT) {
		int rc = lease_add(c, cl, t, e->slot[t]);
		if (rc < 0) {
			out->status = rc;
			return;
		}
		out->status = 0;
		out->tier = (uint8_t)t;
		out->slot = e->slot[t];
		out->length = c->payload;
		out->offset = t == T_HOST ? tier_host_offset(c->host, e->slot[t])
					  : tier_gpu_slot_addr(c->gpu, e->slot[t]) - tier_gpu_slot_addr(c->gpu, 0);
		out->lease = (struct cache_lease){ .slot = e->slot[t], .generation = slot_of(c, t, e->slot[t])->gen,
						   .tier = (uint8_t)t };
		stats_inc(c->st, STAT_cache_leases);
		stats_inc(c->st, t == T_GPU ? STAT_cache_hits_gpu : STAT_cache_hits_host);
		stats_expert_add(c->st, l, x, STAT_EXPERT_HITS, 1);
		if (c->pol[t] && !c->retry)
			policy_hit(c->pol[t], id);
		if (e->prefetched) {
			e->prefetched = false;
			stats_inc(c->st, STAT_cache_prefetch_hits);
		}
		if (t == T_GPU && e->gpu_prefetched) {
			e->gpu_prefetched = false;
			stats_inc(c->st, STAT_cache_gpu_prefetch_hits);
		}
		return;
	}
	stats_inc(c->st, STAT_cache_misses);
	stats_expert_add(c->st, l, x, STAT_EXPERT_MISSES, 1);
	if (flags & CACHE_NO_LOAD) {
		out->status = -EAGAIN;
		return;
	}
	/* The last load or copy towards the wanted tier failed. A bad extent
	 * (host load failed) is answered its error, then without a read until
	 * its backoff ends, then re-read once (joined by everyone who asks); a
	 * failed GPU copy is reported once, the next acquire tries again. */
	if (e->err && e->st[t] == CACHE_ABSENT && e->st[T_HOST] != CACHE_LOADING) {
		if (!e->bad_fails) {
			out->status = e->err;
			e->err = 0;
			return;
		}
		if (!e->bad_reported || moe_now_ns() < e->bad_until) {
			out->status = e->err;
			if (e->bad_reported)
				e->bad_refused++;
			e->bad_reported = true;
			return;
		}
	}
	int rc = 0;
	if (e->st[T_HOST] == CACHE_ABSENT) {
		rc = start_host_load(c, id, false);
		if (rc == 0)
			e->want_gpu |= want_gpu;
	} else if (e->st[T_HOST] == CACHE_LOADING) {
		if (e->prefetch) {
			/* A demand now waits on a prefetch: move it up. */
			e->prefetch = false;
			push_job(c, JOB_PROMOTE, id, e->slot[T_HOST], NONE, false);
		}
		e->want_gpu |= want_gpu;
		stats_inc(c->st, STAT_cache_joined_loads);
	} else if (want_gpu && e->st[T_HOST] == CACHE_RESIDENT && e->st[T_GPU] == CACHE_ABSENT) {
		rc = start_gpu_copy(c, id);
	} else if (want_gpu && e->st[T_GPU] == CACHE_LOADING) {
		stats_inc(c->st, STAT_cache_joined_loads);
	}
	if (rc < 0) {
		out->status = rc;
		if (rc == -ENOBUFS)
			stats_inc(c->st, STAT_cache_no_slot);
		return;
	}
	out->status = -EAGAIN;
	stats_inc(c->st, STAT_cache_nowait_misses);
}

static void deadline_after(struct timespec *ts, unsigned ms)
{
	clock_gettime(CLOCK_REALTIME, ts);
	ts->tv_sec += ms / 1000;
	ts->tv_nsec += (long)(ms % 1000) * 1000000L;
	if (ts->tv_nsec >= 1000000000L) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000L;
	}
}

int cache_acquire(struct cache *c, uint32_t client, const struct cache_key *keys, size_t n, unsigned flags,
		  struct cache_loc *out)
{
	if (!c || (n && (!keys || !out)))
		return -EINVAL;
	if (n > (1u << 20))
		return -E2BIG;
	pthread_mutex_lock(&c->mu);
	struct cache_client *cl = client_get(c, client, true);
	if (!cl) {
		pthread_mutex_unlock(&c->mu);
		return -EMFILE;
	}
	/* A call naming only experts of the previous call, all of one layer,
	 * is the retry of that access's misses (a client waiting for them, a
	 * parked blocking acquire): not a new access for the policy, which
	 * already saw it (no second begin, and the loads it waited for are
	 * inserted, not hit: moe-sim's one event per expert and access). */
	c->retry = n > 0 && c->calls > 0;
	for (size_t i = 0; i < n && c->retry; i++)
		c->retry = key_ok(c, keys[i]) && keys[i].layer == keys[0].layer && c->ex[id_of(c, keys[i])].mark == c->calls;
	c->calls++;
	if (n && keys[0].layer < c->n_layers && !c->retry) {
		for (int t = 0; t < 2; t++)
			if (c->pol[t])
				policy_begin(c->pol[t], c->calls, keys[0].layer);
	}
	for (size_t i = 0; i < n; i++)
		if (key_ok(c, keys[i]))
			c->ex[id_of(c, keys[i])].mark = c->calls;
	size_t served = 0;
	for (size_t i = 0; i < n; i++) {
		memset(&out[i], 0, sizeof(out[i]));
		stats_inc(c->st, STAT_cache_acquires);
		if (!key_ok(c, keys[i])) {
			out[i].status = -EINVAL;
			stats_inc(c->st, STAT_cache_rejects);
			continue;
		}
		try_entry(c, cl, id_of(c, keys[i]), flags, &out[i]);
		if (out[i].status == 0)
			served++;
	}
	cache_update_gauges(c);
	pthread_mutex_unlock(&c->mu);
	return (int)served;
}

static int find_lease(struct cache_client *cl, const struct cache_lease *lease)
{
	for (size_t i = 0; cl && i < cl->n; i++) {
		struct cache_lease_ref *r = &cl->v[i];
		if (r->tier == lease->tier && r->slot == lease->slot && r->gen == lease->generation)
			return (int)i;
	}
	return -1;
}

/* The slot a client's lease still holds (same generation, referenced), with
 * the client and its lease record; NULL (counted as stale) otherwise. [mu] */
static struct slot_state *held_slot(struct cache *c, uint32_t client, const struct cache_lease *lease,
				    struct cache_client **clp, int *idx)
{
	struct cache_client *cl = client_get(c, client, false);
	int i = lease->tier <= T_HOST ? find_lease(cl, lease) : -1;
	struct slot_state *ss = i >= 0 ? slot_of(c, lease->tier, lease->slot) : NULL;
	if (!ss || ss->gen != lease->generation || ss->refs == 0) {
		stats_inc(c->st, STAT_cache_stale_leases);
		return NULL;
	}
	*clp = cl;
	*idx = i;
	return ss;
}

int cache_release(struct cache *c, uint32_t client, const struct cache_lease *lease)
{
	if (!c || !lease)
		return -EINVAL;
	pthread_mutex_lock(&c->mu);
	struct cache_client *cl;
	int i;
	struct slot_state *ss = held_slot(c, client, lease, &cl, &i);
	if (!ss) {
		pthread_mutex_unlock(&c->mu);
		return -ESTALE;
	}
	if (--cl->v[i].count == 0)
		cl->v[i] = cl->v[--cl->n];
	ss->refs--;
	stats_inc(c->st, STAT_cache_releases);
	after_unref(c, lease->tier, lease->slot);
	cache_update_gauges(c);
	pthread_mutex_unlock(&c->mu);
	return 0;
}

int cache_lease_check(struct cache *c, uint32_t client, const struct cache_lease *lease)
{
	if (!c || !lease)
		return -EINVAL;
	pthread_mutex_lock(&c->mu);
	struct cache_client *cl;
	int i;
	int rc = held_slot(c, client, lease, &cl, &i) ? 0 : -ESTALE;
	pthread_mutex_unlock(&c->mu);
	return rc;
}

size_t cache_release_client(struct cache *c, uint32_t client)
{
	if (!c)
		return 0;
	size_t dropped = 0;
	pthread_mutex_lock(&c->mu);
	struct cache_client *cl = client_get(c, client, false);
	if (cl) {
		for (size_t i = 0; i < cl->n; i++) {
			struct cache_lease_ref *r = &cl->v[i];
			struct slot_state *ss = slot_of(c, r->tier, r->slot);
			ss->refs -= r->count;
			dropped += r->count;
			after_unref(c, r->tier, r->slot);
		}
		free(cl->v);
		cl->v = NULL;
		cl->n = cl->cap = 0;
		cl->used = false;
		stats_add(c->st, STAT_cache_client_releases, dropped);
	}
	cache_update_gauges(c);
	pthread_mutex_unlock(&c->mu);
	return dropped;
}

/* Runs fn on the expert of every valid key (others are skipped), under the
 * lock; returns the sum of what fn returned. */
static int for_each_key(struct cache *c, const struct cache_key *keys, size_t n,
			int (*fn)(struct cache *c, uint32_t id, void *arg), void *arg)
{
	int sum = 0;
	pthread_mutex_lock(&c->mu);
	for (size_t i = 0; i < n; i++)
		if (key_ok(c, keys[i]))
			sum += fn(c, id_of(c, keys[i]), arg);
	cache_update_gauges(c);
	pthread_mutex_unlock(&c->mu);
	return sum;
}

/* 1 when a prefetch load or copy of id started. */
static int prefetch_one(struct cache *c, uint32_t id, void *arg)
{
	struct expert_state *e = &c->ex[id];
	bool gpu = *(enum cache_tier *)arg == CACHE_TIER_GPU && c->gpu;
	/* A bad extent is not re-read by predictions before its backoff ends. */
	if (e->bad_fails && (!e->bad_reported || moe_now_ns() < e->bad_until))
		return 0;
	if (e->st[T_HOST] == CACHE_ABSENT) {
		if (start_host_load(c, id, true) == 0) {
			e->want_gpu |= gpu;
			return 1;
		}
	} else if (gpu && e->st[T_HOST] == CACHE_RESIDENT && e->st[T_GPU] == CACHE_ABSENT) {
		if (start_gpu_copy(c, id) == 0) {
			gpu_prefetch_started(c, e);
			return 1;
		}
	} else if (gpu && e->st[T_HOST] == CACHE_LOADING) {
		e->want_gpu = true;
	}
	return 0;
}

int cache_prefetch(struct cache *c, const struct cache_key *keys, size_t n, enum cache_tier tier)
{
	if (!c || (n && !keys) || (tier != CACHE_TIER_HOST && tier != CACHE_TIER_GPU))
		return -EINVAL;
	return for_each_key(c, keys, n, prefetch_one, &tier);
}

int cache_layer_view_tier(struct cache *c, enum cache_tier tier, uint32_t layer, uint8_t *resident,
			  uint8_t *evictable, uint32_t *free_slots)
{
	if (!c || layer >= c->n_layers || !resident || (tier != CACHE_TIER_HOST && tier != CACHE_TIER_GPU))
		return -EINVAL;
	if (tier == CACHE_TIER_GPU && !c->gpu)
		return -ENODEV;
	const int t = tier == CACHE_TIER_GPU ? T_GPU : T_HOST;
	pthread_mutex_lock(&c->mu);
	for (uint32_t x = 0; x < c->n_experts; x++) {
		uint32_t id = layer * c->n_experts + x;
		uint8_t st = c->ex[id].st[t];
		resident[x] = st == CACHE_RESIDENT || st == CACHE_LOADING;
		if (evictable)
			evictable[x] = t == T_GPU ? filter_gpu(c, id) : filter_host(c, id);
	}
	if (free_slots)
		*free_slots = t == T_GPU || !c->hocc ? UINT32_MAX
			    : c->hocc[layer] < c->cfg.layer_slots ? c->cfg.layer_slots - c->hocc[layer] : 0;
	pthread_mutex_unlock(&c->mu);
	return 0;
}

int cache_layer_view(struct cache *c, uint32_t layer, uint8_t *resident, uint8_t *evictable, uint32_t *free_slots)
{
	return cache_layer_view_tier(c, CACHE_TIER_HOST, layer, resident, evictable, free_slots);
}

bool cache_has_gpu(struct cache *c) { return c && c->gpu; }

/* 1 when a cancel of id's prefetch load was done or asked for. */
static int cancel_one(struct cache *c, uint32_t id, void *arg)
{
	struct expert_state *e = &c->ex[id];
	(void)arg;
	if (e->st[T_HOST] != CACHE_LOADING || !e->prefetch || e->cancel_asked)
		return 0;
	e->cancel_asked = true;
	e->want_gpu = false;
	/* Still in our job list: the I/O thread never saw it. */
	struct job **pp = &c->jobs_head, *prev = NULL;
	while (*pp && !((*pp)->kind == JOB_LOAD && (*pp)->expert == id)) {
		prev = *pp;
		pp = &(*pp)->next;
	}
	if (*pp) {
		struct job *j = *pp;
		*pp = j->next;
		if (c->jobs_tail == j)
			c->jobs_tail = prev;
		free(j);
		cache_finish_host_load(c, id, -ECANCELED);
		cache_notify_ready(c);
		return 1;
	}
	return push_job(c, JOB_CANCEL, id, e->slot[T_HOST], NONE, true) == 0;
}

int cache_prefetch_cancel(struct cache *c, const struct cache_key *keys, size_t n)
{
	if (!c || (n && !keys))
		return -EINVAL;
	return for_each_key(c, keys, n, cancel_one, NULL);
}

/* An expert of the pack and a memory tier: what pin, unpin and evict accept. */
static bool valid_key_tier(const struct cache *c, struct cache_key key, enum cache_tier tier)
{
	return c && key_ok(c, key) && (tier == CACHE_TIER_HOST || tier == CACHE_TIER_GPU);
}

int cache_pin(struct cache *c, struct cache_key key, enum cache_tier tier)
{
	if (!valid_key_tier(c, key, tier))
		return -EINVAL;
	if (tier == CACHE_TIER_GPU && !c->gpu)
		return -ENODEV;
	pthread_mutex_lock(&c->mu);
	uint32_t id = id_of(c, key);
	struct expert_state *e = &c->ex[id];
	e->pins[tier]++;
	if (tier == CACHE_TIER_GPU && !c->cfg.exclusive)
		e->pins[T_HOST]++;
	stats_inc(c->st, STAT_cache_pins);
	int rc = 0;
	if (e->st[T_HOST] == CACHE_ABSENT && (tier == CACHE_TIER_HOST || e->st[T_GPU] == CACHE_ABSENT)) {
		rc = start_host_load(c, id, false);
		if (rc == 0)
			e->want_gpu |= tier == CACHE_TIER_GPU;
	} else if (tier == CACHE_TIER_GPU && e->st[T_HOST] == CACHE_RESIDENT && e->st[T_GPU] == CACHE_ABSENT) {
		rc = start_gpu_copy(c, id);
	}
	if (rc < 0) {
		/* The pin stays: the expert is loaded by the next acquire, and
		 * then never evicted. Say why it is not there yet. */
		moe_debug("cache: pin of layer %u expert %u: load not started (%s)", key.layer, key.expert,
			  strerror(-rc));
	}
	cache_update_gauges(c);
	pthread_mutex_unlock(&c->mu);
	return rc == -ENOBUFS ? 0 : rc;
}

int cache_unpin(struct cache *c, struct cache_key key, enum cache_tier tier)
{
	if (!valid_key_tier(c, key, tier))
		return -EINVAL;
	pthread_mutex_lock(&c->mu);
	struct expert_state *e = &c->ex[id_of(c, key)];
	int rc = 0;
	if (e->pins[tier] == 0) {
		rc = -ENOENT;
	} else {
		e->pins[tier]--;
		if (tier == CACHE_TIER_GPU && !c->cfg.exclusive && e->pins[T_HOST])
			e->pins[T_HOST]--;
	}
	pthread_mutex_unlock(&c->mu);
	return rc;
}

int cache_evict(struct cache *c, struct cache_key key, enum cache_tier tier)
{
	if (!valid_key_tier(c, key, tier))
		return -EINVAL;
	pthread_mutex_lock(&c->mu);
	uint32_t id = id_of(c, key);
	struct expert_state *e = &c->ex[id];
	int rc;
	if (tier == CACHE_TIER_GPU && !c->gpu)
		rc = -ENOENT;
	else if (e->st[tier] == CACHE_ABSENT)
		rc = -ENOENT;
	else if (tier == CACHE_TIER_GPU ? !gpu_evictable(c, id) : !host_evictable(c, id))
		rc = -EBUSY;
	else {
		if (tier == CACHE_TIER_GPU)
			evict_gpu(c, id);
		else
			evict_host(c, id);
		rc = 0;
	}
	cache_update_gauges(c);
	pthread_mutex_unlock(&c->mu);
	return rc;
}

enum cache_residency cache_state(struct cache *c, struct cache_key key, enum cache_tier tier)
{
	if (!c || !key_ok(c, key) || tier > CACHE_TIER_HOST)
		return CACHE_ABSENT;
	pthread_mutex_lock(&c->mu);
	enum cache_residency r = c->ex[id_of(c, key)].st[tier];
	pthread_mutex_unlock(&c->mu);
	return r;
}

int cache_residency_bitmap(struct cache *c, enum cache_tier tier, uint32_t layer, uint64_t *words, size_t nwords)
{
	if (!c || !words || layer >= c->n_layers || tier > CACHE_TIER_HOST || nwords < (c->n_experts + 63) / 64)
		return -EINVAL;
	memset(words, 0, nwords * sizeof(*words));
	int n = 0;
	pthread_mutex_lock(&c->mu);
	for (uint32_t x = 0; x < c->n_experts; x++) {
		if (c->ex[layer * c->n_experts + x].st[tier] == CACHE_RESIDENT) {
			words[x / 64] |= 1ull << (x % 64);
			n++;
		}
	}
	pthread_mutex_unlock(&c->mu);
	return n;
}

int cache_arena(struct cache *c, enum cache_tier tier, struct cache_arena_info *out)
{
	if (!c || !out)
		return -EINVAL;
	memset(out, 0, sizeof(*out));
	out->fd = -1;
	if (tier == CACHE_TIER_HOST) {
		out->base = tier_host_base(c->host);
		out->bytes = tier_host_bytes(c->host);
		out->fd = tier_host_fd(c->host);
		out->slot_bytes = tier_host_slot_bytes(c->host, 0);
		out->n_slots = tier_host_n_slots(c->host);
		return 0;
	}
	if (tier == CACHE_TIER_GPU) {
		if (!c->gpu)
			return -ENODEV;
		/* Emulated: a host pointer; vmm/uvm: a device address. */
		out->base = (void *)(uintptr_t)tier_gpu_slot_addr(c->gpu, 0);
		out->slot_bytes = tier_gpu_slot_stride(c->gpu);
		out->n_slots = c->n_gslots;
		out->bytes = out->slot_bytes * c->n_gslots;
		/* Clients map the resident region with the slots (emulated: the
		 * same memfd), so it counts in the mapped size. */
		if (tier_gpu_resident_bytes(c->gpu))
			out->bytes = tier_gpu_resident_offset(c->gpu) + tier_gpu_resident_bytes(c->gpu);
		if (c->gpu_exp_valid && c->gpu_exp.nfds == 1 && c->gpu_exp.offsets[0] == 0)
			out->fd = c->gpu_exp.fds[0];
		return 0;
	}
	return -EINVAL;
}

int cache_gpu_resident(struct cache *c, uint64_t *offset, uint64_t *reserved)
{
	if (!c || !c->gpu)
		return -ENODEV;
	if (!tier_gpu_resident_bytes(c->gpu))
		return -ENOENT;
	if (offset)
		*offset = tier_gpu_resident_offset(c->gpu);
	if (reserved)
		*reserved = tier_gpu_resident_bytes(c->gpu);
	return 0;
}

int cache_gpu_export(struct cache *c, struct tier_gpu_export *out, struct moe_error *err)
{
	if (!c || !out)
		return -EINVAL;
	if (!c->gpu)
		return moe_error_set(err, -ENODEV, "no GPU tier");
	/* The I/O thread alone drives tier_gpu: it does the export. */
	struct gpu_export_req r = { .out = out, .rc = -EINTR };
	pthread_mutex_lock(&c->mu);
	int rc = push_job(c, JOB_GPU_EXPORT, NONE, NONE, NONE, false);
	if (rc == 0) {
		c->jobs_tail->export_req = &r;
		while (!r.done)
			pthread_cond_wait(&c->cv, &c->mu);
		rc = r.rc;
	}
	pthread_mutex_unlock(&c->mu);
	if (rc < 0)
		return moe_error_set(err, rc, "%s", r.err.msg[0] ? r.err.msg : strerror(-rc));
	return rc;
}

void *cache_slot_ptr(struct cache *c, enum cache_tier tier, uint32_t slot)
{
	if (!c)
		return NULL;
	if (tier == CACHE_TIER_HOST)
		return tier_host_ptr(c->host, slot);
	if (tier == CACHE_TIER_GPU && c->gpu && tier_gpu_backend_of(c->gpu) == TIER_GPU_EMULATED && slot < c->n_gslots)
		return (void *)(uintptr_t)tier_gpu_slot_addr(c->gpu, slot);
	return NULL;
}

struct stats *cache_stats(struct cache *c) { return c ? c->st : NULL; }
int cache_eventfd(struct cache *c) { return c ? c->ready_efd : -1; }

unsigned cache_busy(struct cache *c)
{
	if (!c)
		return 0;
	pthread_mutex_lock(&c->mu);
	unsigned b = c->busy;
	pthread_mutex_unlock(&c->mu);
	return b;
}
const char *cache_io_engine(struct cache *c) { return c ? c->engine : "?"; }

int cache_wait_idle(struct cache *c, unsigned timeout_ms)
{
	struct timespec dl;
	deadline_after(&dl, timeout_ms);
	int rc = 0;
	pthread_mutex_lock(&c->mu);
	while (c->busy && rc == 0)
		rc = pthread_cond_timedwait(&c->cv, &c->mu, &dl);
	int busy = (int)c->busy;
	pthread_mutex_unlock(&c->mu);
	return busy ? -ETIMEDOUT : 0;
}

int cache_check_invariants(struct cache *c, struct moe_error *err)
{
	int rc = 0;
	pthread_mutex_lock(&c->mu);
	uint32_t nslots[2] = { c->n_gslots, tier_host_n_slots(c->host) };
	uint32_t *refs[2] = { calloc(nslots[0] + 1, sizeof(uint32_t)), calloc(nslots[1] + 1, sizeof(uint32_t)) };
	if (!refs[0] || !refs[1]) {
		rc = moe_error_set(err, -ENOMEM, "invariants: out of memory");
		goto out;
	}
	for (uint32_t id = 0; id < c->n_ids && !rc; id++) {
		struct expert_state *e = &c->ex[id];
		for (int t = 0; t < 2 && !rc; t++) {
			if (e->st[t] == CACHE_ABSENT) {
				if (e->slot[t] != NONE)
					rc = moe_error_set(err, -EUCLEAN, "expert %u tier %d ABSENT but holds slot %u", id, t,
							   e->slot[t]);
				continue;
			}
			if (e->st[t] == CACHE_EVICTING)
				rc = moe_error_set(err, -EUCLEAN, "expert %u tier %d left EVICTING", id, t);
			else if (e->slot[t] >= nslots[t] || slot_of(c, t, e->slot[t])->owner != id)
				rc = moe_error_set(err, -EUCLEAN, "expert %u tier %d: slot %u not owned by it", id, t,
						   e->slot[t]);
		}
		if (!rc && !c->cfg.exclusive && e->st[T_GPU] != CACHE_ABSENT && e->st[T_HOST] != CACHE_RESIDENT)
			rc = moe_error_set(err, -EUCLEAN, "expert %u on the GPU but not resident in the inclusive host tier",
					   id);
	}
	for (int t = 0; t < 2 && !rc; t++) {
		for (uint32_t s = 0; s < nslots[t] && !rc; s++) {
			struct slot_state *ss = slot_of(c, t, s);
			bool is_free = t == T_HOST ? tier_host_is_free(c->host, s) : false;
			if (t == T_GPU)
				for (uint32_t k = 0; k < c->n_gfree; k++)
					is_free |= c->gfree[k] == s;
			if ((ss->owner == NONE) != is_free)
				rc = moe_error_set(err, -EUCLEAN, "tier %d slot %u: owner %u but allocator says %s", t, s,
						   ss->owner, is_free ? "free" : "used");
			else if (ss->owner != NONE && c->ex[ss->owner].slot[t] != s)
				rc = moe_error_set(err, -EUCLEAN, "tier %d slot %u: owner %u points at slot %u", t, s,
						   ss->owner, c->ex[ss->owner].slot[t]);
			else if (ss->refs && (ss->owner == NONE || c->ex[ss->owner].st[t] != CACHE_RESIDENT))
				rc = moe_error_set(err, -EUCLEAN, "tier %d slot %u leased but not RESIDENT", t, s);
		}
	}
	for (unsigned i = 0; i < c->n_clients && !rc; i++) {
		struct cache_client *cl = &c->clients[i];
		for (size_t k = 0; cl->used && k < cl->n && !rc; k++) {
			struct cache_lease_ref *r = &cl->v[k];
			if (r->tier > T_HOST || r->slot >= nslots[r->tier] || r->count == 0)
				rc = moe_error_set(err, -EUCLEAN, "client %u: bad lease record", cl->id);
			else if (slot_of(c, r->tier, r->slot)->gen != r->gen)
				rc = moe_error_set(err, -EUCLEAN, "client %u holds a lease on tier %u slot %u whose generation moved (%u != %u)",
						   cl->id, r->tier, r->slot, r->gen, slot_of(c, r->tier, r->slot)->gen);
			else
				refs[r->tier][r->slot] += r->count;
		}
	}
	for (int t = 0; t < 2 && !rc; t++)
		for (uint32_t s = 0; s < nslots[t] && !rc; s++)
			if (refs[t][s] != slot_of(c, t, s)->refs)
				rc = moe_error_set(err, -EUCLEAN, "tier %d slot %u: %u refs but %u lease records", t, s,
						   slot_of(c, t, s)->refs, refs[t][s]);
out:
	pthread_mutex_unlock(&c->mu);
	free(refs[0]);
	free(refs[1]);
	return rc;
}

void cache_finish_host_load(struct cache *c, uint32_t id, int res)
{
	struct expert_state *e = &c->ex[id];
	uint32_t l = layer_of(c, id), x = expert_of(c, id);
	if (res == 0) {
		e->st[T_HOST] = CACHE_RESIDENT;
		e->prefetched = e->prefetch;
		e->prefetch = false;
		e->err = 0;
		if (e->bad_fails)
			moe_info("cache: layer %u expert %u loads again after %u failures", l, x, e->bad_fails);
		e->bad_fails = 0;
		stats_inc(c->st, STAT_cache_loads_host);
		stats_add(c->st, STAT_cache_load_bytes_host, c->payload);
		stats_expert_add(c->st, l, x, STAT_EXPERT_LOADS, 1);
		stats_expert_add(c->st, l, x, STAT_EXPERT_BYTES, c->payload);
		if (c->pol[T_HOST])
			policy_insert(c->pol[T_HOST], id, e->prefetched ? POLICY_F_PREFETCH : 0);
		if (e->want_gpu && c->gpu && e->st[T_GPU] == CACHE_ABSENT) {
			int rc = start_gpu_copy(c, id);
			if (rc < 0 && rc != -ENOBUFS)
				e->err = rc;
			/* Still a prefetch if no demand joined the host load. */
			if (rc == 0 && e->prefetched)
				gpu_prefetch_started(c, e);
		}
		e->want_gpu = false;
	} else {
		bool cancelled = res == -ECANCELED;
		e->st[T_HOST] = CACHE_EVICTING;
		drop_slot(c, id, T_HOST);
		e->prefetch = e->prefetched = e->want_gpu = false;
		if (cancelled) {
			stats_inc(c->st, STAT_cache_prefetch_cancels);
			e->err = 0;
		} else {
			stats_inc(c->st, STAT_cache_load_errors);
			e->err = res;
			/* Reported to the next acquire; the one after re-reads it at
			 * once (a transient error costs one failed access), later
			 * failures wait 500 ms << (fails - 2), at most 60 s. */
			if (e->bad_fails < UINT16_MAX)
				e->bad_fails++;
			e->bad_reported = false;
			unsigned sh = MOE_MIN(e->bad_fails - 2u, 7u);
			uint64_t backoff = e->bad_fails < 2 ? 0 : MOE_MIN(500000000ull << sh, 60000000000ull);
			e->bad_until = moe_now_ns() + backoff;
			/* Logged at its 1st, 2nd, 4th, 8th... failure, and at most
			 * CACHE_LOG_BURST lines a second for the whole cache. */
			if ((e->bad_fails & (e->bad_fails - 1)) == 0) {
				uint64_t now = moe_now_ns();
				if (now - c->log_window_ns > 1000000000ull) {
					if (c->log_suppressed)
						moe_warn("cache: %u more load errors not logged", c->log_suppressed);
					c->log_window_ns = now;
					c->log_lines = c->log_suppressed = 0;
				}
				if (c->log_lines++ < CACHE_LOG_BURST)
					moe_warn("cache: loading layer %u expert %u failed (%u in a row): %s; "
						 "marked bad, re-read in %llu ms",
						 l, x, e->bad_fails,
						 res == -EBADMSG ? "CRC32C mismatch after a re-read" : strerror(-res),
						 (unsigned long long)(backoff / 1000000));
				else
					c->log_suppressed++;
			}
		}
	}
	c->busy--;
}

void cache_finish_gpu_copy(struct cache *c, uint32_t id, int res)
{
	struct expert_state *e = &c->ex[id];
	uint32_t hs = e->slot[T_HOST];
	if (hs != NONE && c->hslot[hs].iref)
		c->hslot[hs].iref--;
	if (res == 0) {
		e->st[T_GPU] = CACHE_RESIDENT;
		stats_inc(c->st, STAT_cache_loads_gpu);
		stats_add(c->st, STAT_cache_load_bytes_gpu, c->payload);
		if (c->pol[T_GPU])
			policy_insert(c->pol[T_GPU], id, e->gpu_prefetched ? POLICY_F_PREFETCH : 0);
		if (hs != NONE)
			after_unref(c, T_HOST, hs);
	} else {
		e->gpu_prefetched = false;
		e->st[T_GPU] = CACHE_EVICTING;
		drop_slot(c, id, T_GPU);
		e->err = res;
		stats_inc(c->st, STAT_cache_load_errors);
		moe_warn("cache: copying layer %u expert %u to the GPU failed: %s", layer_of(c, id), expert_of(c, id),
			 strerror(-res));
	}
	c->busy--;
}

size_t cache_bad_experts(struct cache *c, struct cache_bad_expert *out, size_t max)
{
	size_t n = 0;
	pthread_mutex_lock(&c->mu);
	uint64_t now = moe_now_ns();
	for (uint32_t id = 0; id < c->n_ids; id++) {
		struct expert_state *e = &c->ex[id];
		if (!e->bad_fails)
			continue;
		if (n < max)
			out[n] = (struct cache_bad_expert){ layer_of(c, id), expert_of(c, id), e->err ? e->err : -EIO,
							    e->bad_fails, e->bad_refused,
							    e->bad_until > now ? (e->bad_until - now) / 1000000 : 0 };
		n++;
	}
	pthread_mutex_unlock(&c->mu);
	return n;
}

/* ---- create / destroy ------------------------------------------------------ */

int cache_create(struct pack_file *pack, const struct cache_config *cfg, struct cache **out, struct moe_error *err)
{
	*out = NULL;
	if (!pack || !cfg)
		return moe_error_set(err, -EINVAL, "cache: no pack or no configuration");
	int rc = fault_init_env(err);
	if (rc < 0)
		return rc;
	const struct moe_model_config *m = pack->model;
	uint64_t n_ids64 = (uint64_t)m->n_moe_layers * m->n_experts;
	if (!m->n_moe_layers || !m->n_experts || n_ids64 > (1u << 24))
		return moe_error_set(err, -EINVAL, "cache: pack has %u MoE layers x %u experts", m->n_moe_layers,
				     m->n_experts);
	struct cache *c = calloc(1, sizeof(*c));
	if (!c)
		return moe_error_set(err, -ENOMEM, "cache: out of memory");
	c->pack = pack;
	c->cfg = *cfg;
	if (!c->cfg.queue_depth)
		c->cfg.queue_depth = 8;
	if (!c->cfg.max_clients)
		c->cfg.max_clients = 1024;
	c->n_layers = m->n_moe_layers;
	c->n_experts = m->n_experts;
	c->n_ids = (uint32_t)n_ids64;
	c->payload = pack->hdr->extent_payload;
	c->extent = pack_extent_bytes(pack);
	c->wake_efd = c->ready_efd = -1;
	pthread_mutex_init(&c->mu, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_cond_init(&c->cv, &ca);
	pthread_condattr_destroy(&ca);

	uint64_t n_host = c->extent ? cfg->host_bytes / c->extent : 0;
	if (n_host == 0) {
		rc = moe_error_set(err, -EINVAL, "cache: host arena of %llu bytes holds no %llu-byte expert",
				   (unsigned long long)cfg->host_bytes, (unsigned long long)c->extent);
		goto fail;
	}
	if (n_host > n_ids64)
		n_host = n_ids64; /* more slots than experts would never be used */
	if (cfg->layer_slots) {
		uint64_t need = (uint64_t)c->n_layers * (cfg->layer_slots < c->n_experts ? cfg->layer_slots : c->n_experts);
		if (n_host < need) {
			rc = moe_error_set(err, -EINVAL, "cache: %u slots per layer x %u layers need %llu host slots; "
					   "the arena holds %llu (%llu bytes each)", cfg->layer_slots, c->n_layers,
					   (unsigned long long)need, (unsigned long long)n_host,
					   (unsigned long long)c->extent);
			goto fail;
		}
		c->hocc = calloc(c->n_layers, sizeof(*c->hocc));
		if (!c->hocc) {
			rc = moe_error_set(err, -ENOMEM, "cache: out of memory");
			goto fail;
		}
	}
	c->st = stats_new(c->n_layers, c->n_experts);
	c->ex = calloc(c->n_ids, sizeof(*c->ex));
	c->clients = calloc(c->cfg.max_clients, sizeof(*c->clients));
	if (!c->st || !c->ex || !c->clients) {
		rc = moe_error_set(err, -ENOMEM, "cache: out of memory");
		goto fail;
	}
	for (uint32_t i = 0; i < c->n_ids; i++)
		c->ex[i].slot[0] = c->ex[i].slot[1] = NONE;

	struct tier_host_class cls = { .slot_bytes = c->extent, .n_slots = (uint32_t)n_host };
	struct tier_host_config hc = { .classes = &cls, .n_classes = 1,
				       .numa_node = cfg->numa_mode == CACHE_NUMA_BIND ? cfg->numa_node
						   : cfg->numa_mode == CACHE_NUMA_INTERLEAVE ? TIER_HOST_NUMA_INTERLEAVE
						   : TIER_HOST_NUMA_DEFAULT,
				       .mlock_required = cfg->mlock_required, .huge_pages = cfg->huge_pages };
	rc = tier_host_create(&hc, c->st, &c->host, err);
	if (rc < 0)
		goto fail;
	c->hslot = calloc(n_host, sizeof(*c->hslot));
	if (!c->hslot) {
		rc = moe_error_set(err, -ENOMEM, "cache: out of memory");
		goto fail;
	}
	for (uint64_t s = 0; s < n_host; s++)
		c->hslot[s].owner = NONE;

	int fd = pack->fd_direct >= 0 ? pack->fd_direct : pack->fd;
	if (pack->fd_direct < 0)
		moe_warn("cache: %s has no O_DIRECT descriptor: loads go through the page cache", pack->path);
	struct tier_nvme_config nc = { .queue_depth = c->cfg.queue_depth, .no_uring = cfg->no_uring,
				       .sqpoll = cfg->sqpoll,
				       .buffers = cfg->no_register ? NULL : tier_host_iovecs(c->host),
				       .n_buffers = cfg->no_register ? 0 : tier_host_n_slots(c->host) };
	rc = tier_nvme_create(fd, &nc, c->st, &c->nvme, err);
	if (rc < 0)
		goto fail;
	c->engine = tier_nvme_engine(c->nvme);
	stats_set_info(c->st, "nvme_engine", "%s", tier_nvme_engine_note(c->nvme));
	stats_set_info(c->st, "host_arena", "%llu slots x %llu B, %s%s, populate %.1f ms", (unsigned long long)n_host,
		       (unsigned long long)c->extent, tier_host_locked(c->host) ? "mlocked" : "NOT locked",
		       tier_host_hugetlb(c->host) ? ", hugetlb" : "", (double)tier_host_populate_ns(c->host) / 1e6);
	stats_set_info(c->st, "host_tier", "%s", cfg->exclusive ? "exclusive" : "inclusive");

	if (cfg->gpu_bytes) {
		if (FAULT_HIT(FAULT_GPU_ALLOC)) {
			stats_inc(c->st, STAT_faults_injected);
			rc = moe_error_set(err, -ENOMEM, "cache: GPU arena: allocation failed (injected fault gpu.alloc)");
			goto fail;
		}
		struct tier_gpu_config gc = { .backend = cfg->gpu_backend ? cfg->gpu_backend : "emulated",
					      .capacity = cfg->gpu_bytes, .slot_bytes = c->payload,
					      .device = cfg->gpu_device,
					      .resident_bytes = cfg->gpu_resident ? cfg->gpu_resident_bytes : 0 };
		struct moe_error rerr = { "" };
		rc = tier_gpu_create(&gc, &c->gpu, &rerr);
		/* Resident data first, before any expert copy (and before the I/O
		 * thread, which otherwise alone drives the arena). */
		bool write_failed = false;
		if (rc == 0 && gc.resident_bytes &&
		    (rc = tier_gpu_resident_write(c->gpu, 0, cfg->gpu_resident, gc.resident_bytes, &rerr)) < 0) {
			tier_gpu_destroy(c->gpu);
			c->gpu = NULL;
			write_failed = true;
		}
		if (rc < 0 && gc.resident_bytes && (rc == -ENOSPC || write_failed)) {
			/* Not placed: the tier runs with every slot, the caller
			 * keeps its data on the host. */
			if (cfg->gpu_resident_err)
				moe_error_set(cfg->gpu_resident_err, rc, "%s", rerr.msg);
			stats_set_info(c->st, "gpu_resident", "none (%s)", rerr.msg);
			gc.resident_bytes = 0;
			rc = tier_gpu_create(&gc, &c->gpu, err);
		} else if (rc < 0) {
			moe_error_set(err, rc, "%s", rerr.msg);
		}
		if (rc < 0)
			goto fail;
		/* The emulated region is one memfd: export it now so the service
		 * can hand clients a read-only descriptor (VMM handles are
		 * per-chunk and come and go with the experts). */
		if (tier_gpu_backend_of(c->gpu) == TIER_GPU_EMULATED) {
			rc = tier_gpu_export(c->gpu, &c->gpu_exp, err);
			if (rc < 0)
				goto fail;
			c->gpu_exp_valid = true;
		}
		c->n_gslots = tier_gpu_nslots(c->gpu);
		if (c->n_gslots > c->n_ids)
			c->n_gslots = c->n_ids;
		c->gslot = calloc(c->n_gslots, sizeof(*c->gslot));
		c->gfree = calloc(c->n_gslots, sizeof(*c->gfree));
		if (!c->gslot || !c->gfree) {
			rc = moe_error_set(err, -ENOMEM, "cache: out of memory");
			goto fail;
		}
		for (uint32_t s = 0; s < c->n_gslots; s++) {
			c->gslot[s].owner = NONE;
			c->gfree[c->n_gfree++] = c->n_gslots - 1 - s;
		}
		rc = tier_gpu_register_host(c->gpu, tier_host_base(c->host), tier_host_bytes(c->host), err);
		if (rc < 0)
			goto fail;
		stats_gauge_set(c->st, GAUGE_gpu_slots, c->n_gslots);
		if (tier_gpu_resident_bytes(c->gpu))
			stats_set_info(c->st, "gpu_resident", "%llu bytes at offset %llu, %llu arena bytes reserved",
				       (unsigned long long)gc.resident_bytes,
				       (unsigned long long)tier_gpu_resident_offset(c->gpu),
				       (unsigned long long)tier_gpu_resident_bytes(c->gpu));
		stats_set_info(c->st, "gpu_backend", "%s", tier_gpu_backend_name(tier_gpu_backend_of(c->gpu)));
	}

	for (int t = 0; t < 2; t++) {
		if (t == T_GPU && !c->gpu)
			continue;
		struct policy_config pc;
		bool per_layer = t == T_HOST && cfg->layer_slots;
		policy_config_default(&pc, c->n_layers, c->n_experts,
				      per_layer ? cfg->layer_slots : t == T_HOST ? (uint32_t)n_host : c->n_gslots,
				      per_layer);
		rc = policy_create(cfg->policy ? cfg->policy : "lru", &pc, &c->pol[t], err);
		if (rc < 0)
			goto fail;
	}
	stats_set_info(c->st, "policy", "%s", cfg->policy ? cfg->policy : "lru");

	c->wake_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	c->ready_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (c->wake_efd < 0 || c->ready_efd < 0) {
		rc = moe_error_set(err, -errno, "cache: eventfd: %s", strerror(errno));
		goto fail;
	}
	rc = -pthread_create(&c->io, NULL, cache_io_main, c);
	if (rc < 0) {
		moe_error_set(err, rc, "cache: cannot start the I/O thread: %s", strerror(-rc));
		goto fail;
	}
	c->io_started = true;
	pthread_mutex_lock(&c->mu);
	while (!c->io_nice_done)
		pthread_cond_wait(&c->cv, &c->mu);
	const int nrc = c->io_nice_rc;
	pthread_mutex_unlock(&c->mu);
	if (nrc < 0)
		moe_warn("cache: the I/O thread keeps the daemon's priority: nice %d: %s%s", c->cfg.io_nice,
			 strerror(-nrc), nrc == -EACCES || nrc == -EPERM ? " (needs CAP_SYS_NICE)" : "");
	stats_set_info(c->st, "io_thread_nice", "%d", nrc < 0 ? 0 : c->cfg.io_nice);
	cache_update_gauges(c);
	*out = c;
	return 0;
fail:
	cache_destroy(c);
	return rc;
}

void cache_destroy(struct cache *c)
{
	if (!c)
		return;
	if (c->io_started) {
		pthread_mutex_lock(&c->mu);
		c->stop = true;
		wake_io(c);
		pthread_mutex_unlock(&c->mu);
		pthread_join(c->io, NULL);
	}
	/* Jobs never run (queued after the last pass). */
	struct job *j = c->jobs_head;
	while (j) {
		struct job *next = j->next;
		free(j);
		j = next;
	}
	/* Waits for reads in flight before the arena goes away. */
	tier_nvme_destroy(c->nvme);
	if (c->gpu) {
		if (c->gpu_exp_valid)
			tier_gpu_export_free(&c->gpu_exp);
		tier_gpu_unregister_host(c->gpu);
		tier_gpu_destroy(c->gpu);
	}
	tier_host_destroy(c->host);
	for (int t = 0; t < 2; t++)
		policy_destroy(c->pol[t]);
	if (c->clients)
		for (unsigned i = 0; i < c->n_clients; i++)
			free(c->clients[i].v);
	free(c->clients);
	free(c->ex);
	free(c->hocc);
	free(c->hslot);
	free(c->gslot);
	free(c->gfree);
	stats_free(c->st);
	if (c->wake_efd >= 0)
		close(c->wake_efd);
	if (c->ready_efd >= 0)
		close(c->ready_efd);
	pthread_cond_destroy(&c->cv);
	pthread_mutex_destroy(&c->mu);
	free(c);
}
