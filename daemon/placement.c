/* placement.c - see placement.h. */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "placement.h"

struct placement {
	struct cache *c;
	struct predictor *pred;
	struct prefetch_sched ps;
	bool prefetch;
	uint32_t n_layers, n_experts;
	uint8_t *res, *ev;          /* [n_experts] view scratch */
	bool in_token;              /* a token has begun */
	uint32_t pos;               /* its wire position (0 = no hint) */
	int64_t last_layer;         /* last layer observed in this token, -1 */
	uint64_t last_ns;           /* when that layer was routed */
	uint64_t bw_bytes, bw_ns;   /* throughput window start: bytes loaded into the tier, time */
	bool bw_busy;               /* a window is open (the cache was loading throughout) */
	struct placement_counters ct;
	enum cache_tier tier;       /* where prefetches go */
};

static int cancel(void *ctx, uint32_t layer, uint32_t expert);

bool placement_enabled(const struct placement_config *cfg)
{
	return cfg && cfg->predictor && cfg->predictor[0] && strcmp(cfg->predictor, "none") != 0;
}

int placement_create(struct cache *c, uint32_t n_layers, uint32_t n_experts, uint32_t k, uint64_t expert_bytes,
		     const struct placement_config *cfg, struct placement **out, struct moe_error *err)
{
	*out = NULL;
	if (!c || !placement_enabled(cfg))
		return moe_error_set(err, -EINVAL, "placement: no predictor");
	struct placement *p = calloc(1, sizeof(*p));
	if (!p)
		return moe_error_set(err, -ENOMEM, "placement: out of memory");
	p->c = c;
	p->n_layers = n_layers;
	p->n_experts = n_experts;
	p->prefetch = cfg->prefetch;
	p->tier = cfg->gpu ? CACHE_TIER_GPU : CACHE_TIER_HOST;
	p->last_layer = -1;
	p->res = calloc(n_experts, 1);
	p->ev = calloc(n_experts, 1);
	int rc;
	if (!p->res || !p->ev) {
		rc = moe_error_set(err, -ENOMEM, "placement: out of memory");
		goto fail;
	}
	if (cfg->gpu && !cache_has_gpu(c)) {
		rc = moe_error_set(err, -ENODEV, "placement: prefetch into the GPU tier, but there is no GPU tier");
		goto fail;
	}
	rc = predict_create(cfg->predictor, n_layers, n_experts, k, cfg->model, &p->pred, err);
	if (rc < 0)
		goto fail;
	struct prefetch_config pc;
	prefetch_config_default(&pc, n_layers, n_experts, expert_bytes ? expert_bytes : 1);
	pc.h_fixed = cfg->lookahead;
	if (cfg->max_per_layer)
		pc.max_per_layer = cfg->max_per_layer;
	if (cfg->min_score >= 0)
		pc.min_score = cfg->min_score;
	if (cfg->gain >= 0)
		pc.gain = cfg->gain;
	if (cfg->link_bw > 0)
		pc.init_bw = cfg->link_bw;
	pc.deadline = cfg->deadline;
	pc.cancel = cancel;
	/* A client announces its token before the embedding, attention and
	 * any dense layers run: at least one layer of compute before the
	 * first MoE layer is accessed. */
	pc.start_lead = 1;
	rc = prefetch_init(&p->ps, &pc, err);
	if (rc < 0)
		goto fail;
	*out = p;
	return 0;
fail:
	placement_destroy(p);
	return rc;
}

void placement_destroy(struct placement *p)
{
	if (!p)
		return;
	predict_destroy(p->pred);
	prefetch_fini(&p->ps);
	free(p->res);
	free(p->ev);
	free(p);
}

static void view(void *ctx, uint32_t layer, struct prefetch_view *v)
{
	struct placement *p = ctx;
	uint32_t free_slots = 0;
	if (cache_layer_view_tier(p->c, p->tier, layer, p->res, p->ev, &free_slots) < 0) {
		memset(p->res, 1, p->n_experts); /* nothing to plan */
		free_slots = 0;
	}
	v->resident = p->res;
	/* One budget for the arena: the cache picks victims itself (moe-sim
	 * passes no evictable set in its global mode either). */
	v->evictable = free_slots == UINT32_MAX ? NULL : p->ev;
	v->free_slots = free_slots;
	/* What a new prefetch queues behind (demand reads included: they go
	 * first anyway). */
	v->busy_s = (double)cache_busy(p->c) * (double)p->ps.cfg.expert_bytes / p->ps.bw;
}

/* Load throughput for the deadline: bytes the prefetch tier received (NVMe ->
 * host loads, or host -> GPU copies) over a window
 * of at least 20 ms during which the cache was loading at every access we
 * saw. An idle stretch would understate the link and a short window is all
 * noise, so those are not measured. */
#define BW_WINDOW_NS 20000000ull
static void sample_bw(struct placement *p, uint64_t now)
{
	uint64_t bytes = stats_get(cache_stats(p->c), p->tier == CACHE_TIER_GPU ? STAT_cache_load_bytes_gpu
										 : STAT_cache_load_bytes_host);
	if (cache_busy(p->c) == 0) {
		p->bw_busy = false;
		return;
	}
	if (!p->bw_busy || now < p->bw_ns || bytes < p->bw_bytes) {
		p->bw_busy = true;
		p->bw_bytes = bytes;
		p->bw_ns = now;
		return;
	}
	if (now - p->bw_ns < BW_WINDOW_NS)
		return;
	prefetch_note_load(&p->ps, bytes - p->bw_bytes, (double)(now - p->bw_ns) / 1e9);
	p->bw_bytes = bytes;
	p->bw_ns = now;
}

static int issue(void *ctx, uint32_t layer, uint32_t expert, uint32_t victim)
{
	struct placement *p = ctx;
	if (!p->prefetch)
		return -ECANCELED;
	if (victim != POLICY_NONE) {
		int rc = cache_evict(p->c, (struct cache_key){ layer, victim }, p->tier);
		if (rc < 0) {
			p->ct.refused++;
			return rc;
		}
	}
	struct cache_key k = { layer, expert };
	if (cache_prefetch(p->c, &k, 1, p->tier) != 1) {
		p->ct.refused++;
		return -ENOSPC;
	}
	p->ct.issued++;
	return 0;
}

/* A prefetch whose layer passed without it: the cache drops the read if it
 * has not reached the device (one in flight completes and stays). */
static int cancel(void *ctx, uint32_t layer, uint32_t expert)
{
	struct placement *p = ctx;
	struct cache_key k = { layer, expert };
	return cache_prefetch_cancel(p->c, &k, 1);
}

static void count_dropped(struct placement *p)
{
	uint64_t d = p->ps.c.deadline_cut - p->ct.not_in_time;
	if (d) {
		p->ct.not_in_time += d;
		stats_add(cache_stats(p->c), STAT_prefetch_not_in_time, d);
	}
}

static void begin_token(struct placement *p, uint32_t key, uint32_t pos)
{
	/* Position 1 on the wire = token 0: a new sequence. */
	if (pos == 1 && p->in_token)
		predict_reset(p->pred);
	predict_token(p->pred, key);
	p->in_token = true;
	p->pos = pos;
	p->last_layer = -1;
	p->ct.tokens++;
	prefetch_step(&p->ps, p->pred, UINT32_MAX, NULL, 0, view, issue, p);
	count_dropped(p);
}

void placement_token(struct placement *p, uint32_t token_key, uint32_t token_pos)
{
	if (!p || (p->in_token && token_pos && token_pos == p->pos && p->last_layer < 0))
		return; /* announced twice */
	begin_token(p, token_key, token_pos);
}

void placement_access(struct placement *p, uint32_t layer, const uint16_t *ids, uint32_t n, uint32_t token_key,
		      uint32_t token_pos)
{
	if (!p || layer >= p->n_layers || n == 0)
		return;
	bool new_token = !p->in_token || (token_pos && token_pos != p->pos) ||
			 (!token_pos && (int64_t)layer < p->last_layer);
	if (!new_token && (int64_t)layer == p->last_layer)
		return; /* the retry of this layer's misses */
	if (!new_token && !token_pos && (int64_t)layer <= p->last_layer)
		new_token = true;
	if (new_token)
		begin_token(p, token_key, token_pos);
	uint64_t now = moe_now_ns();
	/* The gap between consecutive layers of a token is the client's
	 * compute time per layer: it sets the adaptive look-ahead. */
	if (p->last_layer >= 0 && layer == (uint32_t)p->last_layer + 1 && now > p->last_ns)
		prefetch_note_layer(&p->ps, (double)(now - p->last_ns) / 1e9);
	p->last_layer = layer;
	p->last_ns = now;
	sample_bw(p, now);
	p->ct.observed++;
	prefetch_step(&p->ps, p->pred, layer, ids, n, view, issue, p);
	count_dropped(p);
}

const struct placement_counters *placement_counters(const struct placement *p) { return &p->ct; }

uint32_t placement_horizon(const struct placement *p) { return prefetch_horizon(&p->ps); }
