/* server_ring.c - the data plane: the ring thread, executing entries
 * (ACQUIRE, ROUTE, PREFETCH, RELEASE, COMPUTE), the lease table of each
 * client and the parked blocking acquires. */
#include "config.h"
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "cache.h"
#include "compute.h"
#include "placement.h"
#include "route.h"
#include "server_impl.h"
#include "stats.h"

/* ---- leases -------------------------------------------------------------- */

/* The lowest free entry: the table (max-leases entries, calloc'd) is only
 * touched up to the most leases a client held at once. Handing entries out
 * round-robin walked a long-lived client through all of it (1.4 MB each at
 * the default; the soak saw the daemon grow by that per client). A reused
 * entry's generation tells its old lease ids from the new one. */
static int lease_alloc(struct srv_client *c, uint32_t *idx)
{
	for (uint32_t i = 0; i < c->n_leases_max; i++) {
		if (!c->leases[i].used) {
			c->leases[i].used = true;
			c->leases[i].n = 0;
			c->leases[i].gen++;
			c->n_leases_used++;
			*idx = i;
			return 0;
		}
	}
	return -ENOSPC;
}

static uint64_t lease_id(struct srv_client *c, uint32_t idx)
{
	return ((uint64_t)c->leases[idx].gen << 32) | (idx + 1);
}

static void lease_drop(struct served_model *m, struct srv_client *c, uint32_t idx)
{
	struct srv_lease *r = &c->leases[idx];
	for (unsigned i = 0; i < r->n; i++) {
		cache_release(m->cache, c->cache_id, &r->l[i]);
		if (r->l[i].tier < 2 && c->held[r->l[i].tier])
			c->held[r->l[i].tier]--;
	}
	r->n = 0;
	r->used = false;
	c->n_leases_used--;
}

static int lease_release(struct srv_client *c, uint64_t id)
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

static int check_ids(struct served_model *m, const struct moet_sqe *q)
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
 * (-EAGAIN: loading; -ENOBUFS: no free slot right now). An expert that
 * cannot be served (-EBADMSG, -EIO: its extent is bad; -EDQUOT: the client
 * is over its share) gets that negative errno as its slot, so the client
 * tells it from a miss, and is not retried. */
/* Leases client c may hold on tier t: client-share percent of the tier's
 * slots (at least top_k x 4) while another data client is attached, so one
 * client cannot lease the whole arena and make everyone else wait out
 * wait-timeout-ms; unbounded for a client alone. [c->lock] */
static uint32_t client_quota(struct server *s, struct srv_client *c, int t, unsigned want)
{
	uint32_t slots = c->m->arena[t].n_slots;
	uint64_t q = (uint64_t)slots * s->cfg->client_share / 100;
	q = MOE_MAX(q, MOE_MIN((uint64_t)slots, (uint64_t)c->m->top_k * 4));
	if (c->held[t] + want <= q)
		return UINT32_MAX; /* stays under its share: no need to look */
	bool others = false;
	pthread_mutex_lock(&s->lock);
	for (unsigned i = 0; i < s->max_clients && !others; i++) {
		struct srv_client *o = s->clients[i];
		others = o && o != c && o->m == c->m && atomic_load_explicit(&o->ring_ready, memory_order_acquire) &&
			 atomic_load(&o->state) == CL_ACTIVE;
	}
	pthread_mutex_unlock(&s->lock);
	return others ? (uint32_t)q : UINT32_MAX;
}

static unsigned try_acquire(struct srv_client *c, uint32_t layer, struct moet_cqe *out, uint32_t lidx, unsigned flags)
{
	struct served_model *m = c->m;
	struct cache_key keys[MOET_MAX_BATCH];
	struct cache_loc locs[MOET_MAX_BATCH];
	unsigned map[MOET_MAX_BATCH], n = 0, pending = 0;
	int t = (flags & MOET_F_WANT_GPU) && m->arena[CACHE_TIER_GPU].n_slots ? CACHE_TIER_GPU : CACHE_TIER_HOST;
	uint32_t quota = client_quota(m->srv, c, t, out->count);
	uint32_t room = quota > c->held[t] ? quota - c->held[t] : 0;
	for (unsigned i = 0; i < out->count; i++)
		if (out->slot[i] == -1) {
			if (n >= room) {
				/* Over its share: said at once, not waited for. */
				out->slot[i] = -EDQUOT;
				server_cnt(m->srv, SERVER_share_refusals);
				continue;
			}
			keys[n].layer = layer;
			keys[n].expert = out->ids[i];
			map[n++] = i;
		}
	if (!n)
		return 0;
	unsigned cf = (flags & MOET_F_WANT_GPU) ? CACHE_WANT_GPU : 0;
	int rc = cache_acquire(m->cache, c->cache_id, keys, n, cf, locs);
	if (rc < 0) {
		out->result = rc;
		return 0;
	}
	struct srv_lease *r = &c->leases[lidx];
	for (unsigned j = 0; j < n; j++) {
		unsigned i = map[j];
		if (locs[j].status == 0) {
			out->slot[i] = (int32_t)locs[j].slot;
			out->tier[i] = locs[j].tier;
			r->l[r->n++] = locs[j].lease;
			if (locs[j].lease.tier < 2)
				c->held[locs[j].lease.tier]++;
			out->n_hit++;
		} else if (locs[j].status == -EAGAIN || locs[j].status == -ENOBUFS) {
			pending++;
		} else {
			/* -1 (-EPERM) means a miss on the wire: never sent as an error. */
			out->slot[i] = locs[j].status < -1 ? locs[j].status : -EIO;
		}
	}
	return pending;
}

static void count_hits(struct served_model *m, uint32_t layer, const struct moet_cqe *out)
{
	for (unsigned i = 0; i < out->count; i++) {
		struct moet_expert_counters *e = server_model_expert_ctr(m, layer, out->ids[i]);
		if (out->slot[i] >= 0)
			__atomic_add_fetch(&e->hits, 1, __ATOMIC_RELAXED);
		else
			__atomic_add_fetch(&e->misses, 1, __ATOMIC_RELAXED);
	}
}

static void finish_acquire(struct srv_client *c, struct moet_cqe *out, uint32_t lidx)
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
static int exec_compute(struct srv_client *c, const struct moet_sqe *q, struct moet_cqe *out)
{
	struct served_model *m = c->m;
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
	rc = cache_acquire(m->cache, c->cache_id, keys, lk->n, 0, locs);
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

/* Residency of one layer for cache-aware routing: RESIDENT (not loading) in
 * one of the tiers asked for, at this moment. Returns the count. */
static uint32_t route_residency(struct served_model *m, uint32_t layer, uint32_t tiers, uint8_t *resident)
{
	uint64_t words[(ROUTE_MAX_EXPERTS + 63) / 64];
	size_t nw = (m->n_experts + 63) / 64;
	uint32_t n = 0;
	memset(resident, 0, m->n_experts);
	if (!tiers)
		tiers = MOET_ROUTE_TIER_GPU | MOET_ROUTE_TIER_HOST;
	for (int t = 0; t < 2; t++) {
		enum cache_tier tier = t ? CACHE_TIER_HOST : CACHE_TIER_GPU;
		if (!(tiers & (t ? MOET_ROUTE_TIER_HOST : MOET_ROUTE_TIER_GPU)) ||
		    (tier == CACHE_TIER_GPU && !cache_has_gpu(m->cache)))
			continue;
		if (cache_residency_bitmap(m->cache, tier, layer, words, nw) < 0)
			continue;
		for (uint32_t e = 0; e < m->n_experts; e++)
			if (words[e / 64] >> (e % 64) & 1)
				resident[e] = 1;
	}
	for (uint32_t e = 0; e < m->n_experts; e++)
		n += resident[e];
	return n;
}

/* Expert-similarity tables (rule SIMILARITY) of the served models, read
 * whole from the pack at the first request that needs one (moe-pack
 * similarity stores them; route_similarity_read); kept for the daemon's
 * life. An absent table is remembered too. */
#define SIM_MODELS 16
static struct {
	const struct pack_file *pack;
	float *sim;   /* [n_layers][E][E] */
	int rc;
	char msg[160];
} sim_tables[SIM_MODELS];
static pthread_mutex_t sim_lock = PTHREAD_MUTEX_INITIALIZER;

static int model_similarity(struct served_model *m, uint32_t layer, const float **row, struct moe_error *err)
{
	int rc = 0;
	*row = NULL;
	size_t per = (size_t)m->n_experts * m->n_experts;
	pthread_mutex_lock(&sim_lock);
	unsigned i = 0;
	while (i < SIM_MODELS && sim_tables[i].pack && sim_tables[i].pack != m->pack)
		i++;
	if (i == SIM_MODELS) {
		rc = moe_error_set(err, -EOPNOTSUPP, "route: similarity tables of more than %d models", SIM_MODELS);
		goto out;
	}
	if (!sim_tables[i].pack) {
		sim_tables[i].pack = m->pack;
		sim_tables[i].sim = malloc(per * m->n_layers * sizeof(float));
		sim_tables[i].rc = sim_tables[i].sim ? 0 : -ENOMEM;
		for (uint32_t l = 0; l < m->n_layers && sim_tables[i].rc == 0; l++) {
			struct moe_error e2;
			sim_tables[i].rc = route_similarity_read(m->pack, l, sim_tables[i].sim + per * l, &e2);
			if (sim_tables[i].rc < 0)
				snprintf(sim_tables[i].msg, sizeof(sim_tables[i].msg), "%.150s", e2.msg);
		}
		if (sim_tables[i].rc < 0) {
			free(sim_tables[i].sim);
			sim_tables[i].sim = NULL;
			moe_info("model %s: no expert-similarity table: %s", m->name, sim_tables[i].msg);
		} else {
			moe_info("model %s: expert-similarity tables loaded (%u layers)", m->name, m->n_layers);
		}
	}
	if (sim_tables[i].rc < 0)
		rc = moe_error_set(err, -EOPNOTSUPP, "route: similarity rule: the pack has no expert-similarity table "
						     "(moe-pack similarity)");
	else
		*row = sim_tables[i].sim + per * layer;
out:
	pthread_mutex_unlock(&sim_lock);
	return rc;
}

/* ROUTE: the logits (and with MOET_F_ROUTE_CACHE the request after them)
 * come from the scratch area, bounds-checked and copied once; the decision is
 * route.c's with this layer's selection bias (DeepSeek-V3's
 * e_score_correction_bias). A cache-aware request gets its reply fields
 * written back before the completion. */
static int exec_route(struct srv_client *c, const struct moet_sqe *q, struct route_result *rr)
{
	struct served_model *m = c->m;
	float logits[ROUTE_MAX_EXPERTS];
	bool cached = q->flags & MOET_F_ROUTE_CACHE;
	size_t lbytes = (size_t)m->n_experts * sizeof(float);
	size_t want = lbytes + (cached ? sizeof(struct moet_route_req) : 0);
	struct moet_route_req req;
	struct moe_error err = { 0 };
	int rc;

	if (q->layer >= m->n_layers)
		return -ERANGE;
	if (!c->region || q->data_len != want || (q->data_off & 3) || q->data_off > c->reg.scratch_bytes ||
	    q->data_len > c->reg.scratch_bytes - q->data_off)
		return -EFAULT;
	uint8_t *base = c->region + c->reg.scratch_off + q->data_off;
	memcpy(logits, base, lbytes);
	struct route_params rp = m->rp;
	rp.score_bias = m->score_bias ? m->score_bias + (size_t)q->layer * m->n_experts : NULL;
	if (!cached)
		return route_topk(&rp, logits, rr);

	memcpy(&req, base + lbytes, sizeof(req));
	memset(&req.status, 0, sizeof(req) - offsetof(struct moet_route_req, status));
	struct route_cache_rule rule = { .similarity = NULL };
	uint8_t resident[ROUTE_MAX_EXPERTS];
	rc = 0;
	if (req.rule > MOET_ROUTE_SIMILARITY) {
		rc = moe_error_set(&err, -EINVAL, "route: unknown rule %u", req.rule);
	} else if (req.weights > MOET_ROUTE_W_INHERIT) {
		rc = moe_error_set(&err, -EINVAL, "route: unknown weights mode %u", req.weights);
	} else if (req.tiers & ~(uint32_t)(MOET_ROUTE_TIER_GPU | MOET_ROUTE_TIER_HOST)) {
		rc = moe_error_set(&err, -EINVAL, "route: unknown tiers %#x", req.tiers);
	} else if (req.rule == MOET_ROUTE_SIMILARITY && (rc = model_similarity(m, q->layer, &rule.similarity, &err)) < 0) {
		/* rc and err say why */
	} else {
		const float *simtab = rule.similarity;
		route_cache_rule_init(&rule, (enum route_rule)req.rule, req.keep_top, req.margin);
		rule.similarity = simtab;
		if (req.rule == MOET_ROUTE_EXACT)
			rule.keep_top = m->rp.top_k;
		if (req.max_share != 0.0f)
			rule.max_share = req.max_share;
		rule.min_similarity = req.min_similarity;
		if (req.weights != MOET_ROUTE_W_DEFAULT)
			rule.weights = req.weights - 1;
		req.n_resident = route_residency(m, q->layer, req.tiers, resident);
		/* The exact rule still names J and margin: check what was sent. */
		if (req.rule == MOET_ROUTE_EXACT && (req.keep_top > m->rp.top_k || !(req.margin >= 0.0f)))
			rc = moe_error_set(&err, -EINVAL, "route: keep-top J=%u (k=%u) or margin %g out of range",
					   req.keep_top, m->rp.top_k, (double)req.margin);
		else
			rc = route_cached(&rp, logits, resident, &rule, rr, &err);
	}
	req.status = rc;
	if (rc < 0) {
		/* the message, cut to the reply's field */
		memcpy(req.error, err.msg, sizeof(req.error) - 1);
		req.error[sizeof(req.error) - 1] = 0;
		moe_debug("client %u: %s", c->id, err.msg);
	} else {
		req.subst_mask = rr->subst_mask;
		req.open_mask = rr->open_mask;
		for (uint32_t i = 0; i < rr->n && i < MOET_MAX_BATCH; i++) {
			req.exact[i] = (uint16_t)rr->exact[i];
			req.exact_weight[i] = rr->exact_weights[i];
		}
	}
	memcpy(base + lbytes + offsetof(struct moet_route_req, status), &req.status,
	       sizeof(req) - offsetof(struct moet_route_req, status));
	return rc;
}

/* The client's placement (under c->lock), created at its first use; NULL
 * when the model runs no predictor. */
static struct placement *client_placement(struct srv_client *c)
{
	struct served_model *m = c->m;
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

int server_ring_exec(struct server *s, struct srv_client *c, const struct moet_sqe *q, struct moet_cqe *out,
		      bool may_park)
{
	struct served_model *m = c->m;
	int rc = 0;
	memset(out, 0, sizeof(*out));
	out->user_tag = q->user_tag;
	out->opcode = q->opcode;
	out->flags = q->flags;
	if ((q->flags & ~(MOET_F_NOWAIT | MOET_F_WANT_GPU | MOET_F_ROUTE_CACHE)) ||
	    ((q->flags & MOET_F_ROUTE_CACHE) && q->opcode != MOET_OP_ROUTE)) {
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
			struct route_result rr;
			if ((rc = exec_route(c, q, &rr)))
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
			struct srv_parked *p = &c->parked[c->n_parked++];
			p->sqe = local;
			p->cqe = *out;
			p->lease_idx = lidx;
			p->park_ns = moe_now_ns();
			p->deadline_ns = p->park_ns + (uint64_t)s->cfg->wait_timeout_ms * 1000000ull;
			pthread_mutex_unlock(&c->lock);
			server_cnt(s, SERVER_parked_acquires);
			/* The cache's own wait counters: this is where acquires wait. */
			stats_inc(cache_stats(m->cache), STAT_cache_stalls);
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
	server_cnt(s, SERVER_bad_entries);
	out->result = rc;
	out->lease = 0;
	return 1;
}

/* Retries parked acquires; completes the ones done or out of time. */
static void retry_parked(struct server *s, struct srv_client *c, uint64_t now)
{
	for (uint32_t i = 0; i < c->n_parked;) {
		struct srv_parked *p = &c->parked[i];
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
		struct stats *st = cache_stats(c->m->cache);
		stats_hist_add(st, HIST_acquire_wait_ns, now > p->park_ns ? now - p->park_ns : 0);
		if (pending && p->cqe.result >= 0)
			stats_inc(st, STAT_cache_timeouts);
		count_hits(c->m, p->sqe.layer, &p->cqe);
		ring_push(&c->cq, &p->cqe);
		c->parked[i] = c->parked[--c->n_parked];
	}
	(void)s;
}

/* ---- the ring thread ------------------------------------------------------ */

static void client_teardown_data(struct server *s, struct srv_client *c)
{
	/* Leases of the dead client go back to the cache: slots become
	 * evictable again. */
	size_t n = 0;
	if (c->m) {
		pthread_mutex_lock(&c->lock);
		n = cache_release_client(c->m->cache, c->cache_id);
		placement_destroy(c->pl);
		c->pl = NULL;
		/* only as far as the used ones: a store to every entry of the
		 * (calloc'd, mostly untouched) table faulted in all of it, 1.4 MB
		 * per departing client at the default max-leases */
		for (uint32_t i = 0, left = c->n_leases_used; i < c->n_leases_max && left; i++)
			if (c->leases[i].used) {
				c->leases[i].used = false;
				left--;
			}
		c->n_leases_used = 0;
		c->held[0] = c->held[1] = 0;
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

void *server_ring_main(void *arg)
{
	struct server *s = arg;
	struct srv_client **local = calloc(s->max_clients, sizeof(*local));
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
				struct srv_client *c = s->clients[i];
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
				server_model_refresh(&s->models[i], false);
			for (unsigned i = 0; i < n_local; i++)
				if (local[i]->n_parked)
					retry_parked(s, local[i], now);
		}
		for (unsigned i = 0; i < n_local; i++) {
			struct srv_client *c = local[i];
			struct moet_sqe q;
			struct moet_cqe out;
			for (unsigned k = 0; k < 64 && ring_space(&c->cq) > 0; k++) {
				int rc = ring_pop(&c->sq, &q);
				if (rc <= 0)
					break;
				work = true;
				server_cnt(s, SERVER_ring_entries);
				atomic_fetch_add_explicit(&c->ops, 1, memory_order_relaxed);
				if (server_ring_exec(s, c, &q, &out, true))
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
				server_model_refresh(&s->models[i], true);
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
			server_cnt(s, SERVER_ring_sleeps);
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
