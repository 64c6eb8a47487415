/* sim.c - the replay engine behind moe-sim (see sim.h). */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "route.h"
#include "sim.h"

enum { ABSENT = 0, RESIDENT = 1, LOADING = 2 };

/* The predictor's cost is measured in thread CPU time, so a busy shared
 * machine (other processes taking the core) does not inflate it. */
static uint64_t cpu_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

struct sim {
	struct sim_config cfg;
	uint32_t L, E, k, n_ids, groups, cap;
	struct sim_stats st;

	struct policy *pol;
	struct policy_config pcfg;
	uint8_t *state;      /* [n_ids] GPU tier */
	uint8_t *pf_unused;  /* [n_ids] prefetched, not yet used */
	uint32_t *occ;       /* [groups] */

	struct policy *host; /* host tier (NULL: every expert is in host) */
	uint32_t *host_occ;  /* [L] */

	/* Prefetch link queue (timed mode), FIFO of ids. */
	uint32_t *q;
	size_t *qpos;        /* [n_ids] index of id's live queue entry */
	size_t qhead, qtail, qcap;
	double *rem_ns, *tot_ns, *issue_ns; /* [n_ids] */
	double now_ns, link_ns;

	struct predictor *pred;
	struct prefetch_sched ps;
	bool have_ps;
	uint8_t *view_res, *view_ev;  /* [E] */
	uint8_t *in_access;           /* [E] current access (layer cur_layer) */
	uint32_t cur_layer;           /* UINT32_MAX between tokens */
	const float *plan_scores;     /* scores of the layer being planned */
	uint32_t plan_layer;

	/* Belady oracle: per id, sorted access times of the current trace. */
	uint32_t *fut_start, *fut_pos;
	uint64_t *fut_time;
	uint64_t clock_base;

	struct route_params rp;
	uint64_t rng;
	const float *logits; /* the current trace's router logits, or NULL */
	uint32_t cur_token;
};

void sim_config_default(struct sim_config *c)
{
	memset(c, 0, sizeof(*c));
	c->policy = "lru";
	c->cache = 6;
	c->timed = true;
	prefetch_config_default(&c->pf, 1, 1, SIM_EXPERT_BYTES);
	c->cost.expert_bytes = SIM_EXPERT_BYTES;
	c->cost.h2d_bw = SIM_H2D_BW;
	c->cost.nvme_bw = SIM_NVME_BW;
	c->cost.layer_s = SIM_LAYER_S;
	c->cost.dense_layers = SIM_DENSE_LAYERS;
	c->route_margin = 1.0f;
	c->seed = 1;
}

static uint64_t fut_next(void *ctx, uint32_t id, uint64_t now)
{
	struct sim *s = ctx;
	uint32_t end = s->fut_start[id + 1];
	while (s->fut_pos[id] < end && s->fut_time[s->fut_pos[id]] <= now)
		s->fut_pos[id]++;
	return s->fut_pos[id] < end ? s->fut_time[s->fut_pos[id]] : UINT64_MAX;
}

static int make_policy(struct sim *s, struct moe_error *err)
{
	policy_destroy(s->pol);
	s->pol = NULL;
	memset(s->state, 0, s->n_ids);
	memset(s->pf_unused, 0, s->n_ids);
	memset(s->occ, 0, s->groups * sizeof(*s->occ));
	s->qhead = s->qtail = 0;
	return policy_create(s->cfg.policy, &s->pcfg, &s->pol, err);
}

void sim_destroy(struct sim *s)
{
	if (!s)
		return;
	policy_destroy(s->pol);
	policy_destroy(s->host);
	predict_destroy(s->pred);
	if (s->have_ps)
		prefetch_fini(&s->ps);
	free(s->state);
	free(s->pf_unused);
	free(s->occ);
	free(s->host_occ);
	free(s->q);
	free(s->qpos);
	free(s->rem_ns);
	free(s->tot_ns);
	free(s->issue_ns);
	free(s->view_res);
	free(s->view_ev);
	free(s->in_access);
	free(s->fut_start);
	free(s->fut_pos);
	free(s->fut_time);
	free(s);
}

static int pf_cancel(void *ctx, uint32_t layer, uint32_t e);

int sim_create(const struct sim_config *cfg, uint32_t n_layers, uint32_t n_experts, uint32_t k,
	       struct sim **out, struct moe_error *err)
{
	struct sim *s;
	int rc;

	*out = NULL;
	if (n_layers == 0 || n_experts == 0 || n_experts > PREDICT_MAX_EXPERTS || k == 0 || k > n_experts ||
	    k > ROUTE_MAX_K || n_layers > PREDICT_MAX_LAYERS)
		return moe_error_set(err, -EINVAL, "sim: bad shape %u layers x %u experts top-%u", n_layers,
				     n_experts, k);
	if (cfg->cache < k)
		return moe_error_set(err, -EINVAL, "sim: cache of %u slots cannot hold one access of %u experts",
				     cfg->cache, k);
	if (cfg->cache > n_experts)
		return moe_error_set(err, -EINVAL, "sim: cache of %u slots per layer exceeds %u experts",
				     cfg->cache, n_experts);
	if (!(cfg->cost.h2d_bw > 0) || !(cfg->cost.nvme_bw > 0) || !(cfg->cost.layer_s >= 0) ||
	    cfg->cost.expert_bytes == 0)
		return moe_error_set(err, -EINVAL, "sim: the cost model needs positive bandwidths and expert size");
	s = calloc(1, sizeof(*s));
	if (!s)
		return moe_error_set(err, -ENOMEM, "sim: out of memory");
	s->cfg = *cfg;
	s->L = n_layers;
	s->E = n_experts;
	s->k = k;
	s->n_ids = n_layers * n_experts;
	s->groups = cfg->global ? 1 : n_layers;
	s->cap = cfg->global ? cfg->cache * n_layers : cfg->cache;
	s->cur_layer = UINT32_MAX;
	s->state = calloc(s->n_ids, 1);
	s->pf_unused = calloc(s->n_ids, 1);
	s->occ = calloc(s->groups, sizeof(*s->occ));
	s->host_occ = calloc(n_layers, sizeof(*s->host_occ));
	s->qcap = (size_t)s->n_ids * 4 + 16;
	s->q = calloc(s->qcap, sizeof(*s->q));
	s->qpos = calloc(s->n_ids, sizeof(*s->qpos));
	s->rem_ns = calloc(s->n_ids, sizeof(double));
	s->tot_ns = calloc(s->n_ids, sizeof(double));
	s->issue_ns = calloc(s->n_ids, sizeof(double));
	s->view_res = calloc(n_experts, 1);
	s->view_ev = calloc(n_experts, 1);
	s->in_access = calloc(n_experts, 1);
	s->fut_start = calloc(s->n_ids + 1, sizeof(uint32_t));
	s->fut_pos = calloc(s->n_ids, sizeof(uint32_t));
	if (!s->state || !s->pf_unused || !s->occ || !s->host_occ || !s->q || !s->qpos || !s->rem_ns || !s->tot_ns ||
	    !s->issue_ns || !s->view_res || !s->view_ev || !s->in_access || !s->fut_start || !s->fut_pos) {
		sim_destroy(s);
		return moe_error_set(err, -ENOMEM, "sim: out of memory");
	}
	policy_config_default(&s->pcfg, n_layers, n_experts, s->cap, !cfg->global);
	s->pcfg.next_use = fut_next;
	s->pcfg.next_use_ctx = s;
	rc = make_policy(s, err);
	if (rc < 0)
		goto fail;
	if (cfg->cost.host_slots) {
		struct policy_config hc;
		policy_config_default(&hc, n_layers, n_experts, cfg->cost.host_slots, true);
		rc = policy_create("lru", &hc, &s->host, err);
		if (rc < 0)
			goto fail;
	}
	if (cfg->predictor) {
		struct prefetch_config pf = cfg->pf;
		pf.n_layers = n_layers;
		pf.n_experts = n_experts;
		pf.expert_bytes = cfg->cost.expert_bytes;
		pf.init_bw = cfg->cost.h2d_bw;
		pf.init_layer_s = cfg->cost.layer_s > 0 ? cfg->cost.layer_s : 1e-6;
		pf.start_lead = cfg->cost.dense_layers;
		pf.cancel = pf_cancel;
		/* Untimed: every prefetch lands at once, no deadline applies. */
		if (!cfg->timed)
			pf.deadline = false;
		rc = predict_create(cfg->predictor, n_layers, n_experts, k, cfg->model, &s->pred, err);
		if (rc < 0)
			goto fail;
		rc = prefetch_init(&s->ps, &pf, err);
		if (rc < 0)
			goto fail;
		s->have_ps = true;
	}
	/* Routing experiments: DeepSeek-V2-Lite's rule (softmax, greedy, no
	 * renormalisation, scaling 1). */
	s->rp = (struct route_params){ .n_experts = n_experts, .top_k = k, .scoring = MOE_SCORING_SOFTMAX,
				       .topk_method = MOE_TOPK_GREEDY, .routed_scaling_factor = 1.0f };
	s->rng = cfg->seed * 0x9E3779B97F4A7C15ull + 1;
	*out = s;
	return 0;
fail:
	sim_destroy(s);
	return rc;
}

const struct sim_stats *sim_stats(const struct sim *s)
{
	return &s->st;
}

void sim_stats_add(struct sim_stats *to, const struct sim_stats *from)
{
#define SIM_X(n) to->n += from->n;
	SIM_COUNTERS(SIM_X)
#undef SIM_X
}

double sim_hit_rate(const struct sim_stats *st)
{
	return st->accesses ? (double)st->hits / (double)st->accesses : 0.0;
}

double sim_loads_per_tl(const struct sim_stats *st, uint64_t expert_bytes)
{
	return st->token_layers ? (double)st->gpu_bytes / (double)expert_bytes / (double)st->token_layers : 0.0;
}

double sim_pf_precision(const struct sim_stats *st)
{
	uint64_t done = st->pf_useful + st->pf_wasted;
	return done ? (double)st->pf_useful / (double)done : 0.0;
}

double sim_pf_recall(const struct sim_stats *st)
{
	/* Of the accesses that a demand-only cache would have had to load
	 * (prefetch hits + misses), the share a prefetch covered in time. */
	uint64_t need = st->pf_useful + st->misses;
	return need ? (double)st->pf_useful / (double)need : 0.0;
}

/* ---- tiers and the link ---- */

static double ns_of(double bytes, double bw)
{
	return bytes / bw * 1e9;
}

/* Cost of bringing id to the GPU, accounting the host tier. */
static double load_ns(struct sim *s, uint32_t id)
{
	double ns = ns_of((double)s->cfg.cost.expert_bytes, s->cfg.cost.h2d_bw);
	if (!s->host)
		return ns;
	uint32_t layer = id / s->E;
	if (policy_contains(s->host, id)) {
		s->st.host_hits++;
		policy_hit(s->host, id);
		return ns;
	}
	s->st.host_misses++;
	s->st.nvme_bytes += s->cfg.cost.expert_bytes;
	if (s->host_occ[layer] >= s->cfg.cost.host_slots) {
		uint32_t v = policy_victim(s->host, layer, NULL, NULL);
		if (v != POLICY_NONE) {
			policy_remove(s->host, v);
			s->host_occ[layer]--;
		}
	}
	policy_insert(s->host, id, 0);
	s->host_occ[layer]++;
	return ns + ns_of((double)s->cfg.cost.expert_bytes, s->cfg.cost.nvme_bw);
}

static void evict(struct sim *s, uint32_t id)
{
	if (s->state[id] == LOADING) {
		double done = s->tot_ns[id] > 0 ? 1.0 - s->rem_ns[id] / s->tot_ns[id] : 0.0;
		uint64_t bytes = (uint64_t)(done * (double)s->cfg.cost.expert_bytes);
		s->st.pf_cancelled++;
		s->st.gpu_bytes += bytes;
		if (s->have_ps)
			prefetch_note_cancel(&s->ps, bytes);
	} else if (s->pf_unused[id]) {
		s->st.pf_wasted++;
		if (s->have_ps)
			prefetch_note_unused(&s->ps, s->cfg.cost.expert_bytes);
	}
	s->pf_unused[id] = 0;
	s->state[id] = ABSENT;
	policy_remove(s->pol, id);
	s->occ[policy_group_of(s->pol, id)]--;
}

/* Runs queued prefetch copies on the link until time t. */
static void advance(struct sim *s, double t)
{
	while (s->qhead < s->qtail) {
		uint32_t id = s->q[s->qhead];
		/* Stale entries: cancelled, finished as demand, or re-queued later. */
		if (s->state[id] != LOADING || s->rem_ns[id] <= 0 || s->qpos[id] != s->qhead) {
			s->qhead++;
			continue;
		}
		double start = s->link_ns > s->issue_ns[id] ? s->link_ns : s->issue_ns[id];
		if (start >= t)
			break;
		double run = s->rem_ns[id] < t - start ? s->rem_ns[id] : t - start;
		s->rem_ns[id] -= run;
		s->link_ns = start + run;
		if (s->rem_ns[id] > 1e-9)
			break;
		s->rem_ns[id] = 0;
		s->state[id] = RESIDENT;
		s->st.gpu_bytes += s->cfg.cost.expert_bytes;
		s->qhead++;
	}
	if (s->link_ns < t)
		s->link_ns = t;
	if (s->qhead == s->qtail)
		s->qhead = s->qtail = 0;
}

static void enqueue(struct sim *s, uint32_t id)
{
	if (s->qtail == s->qcap) {
		/* Compact: drop finished or cancelled entries. */
		size_t n = 0;
		for (size_t i = s->qhead; i < s->qtail; i++) {
			uint32_t x = s->q[i];
			if (s->state[x] == LOADING && s->qpos[x] == i) {
				s->qpos[x] = n;
				s->q[n++] = x;
			}
		}
		s->qhead = 0;
		s->qtail = n;
	}
	s->qpos[id] = s->qtail;
	s->q[s->qtail++] = id;
}

/* ---- prefetch callbacks ---- */

struct pf_filter {
	struct sim *s;
	uint32_t layer;
	float min_keep; /* same-layer entries scoring at least this stay */
};

static bool pf_victim_ok(void *ctx, uint32_t id)
{
	struct pf_filter *f = ctx;
	struct sim *s = f->s;
	uint32_t layer = id / s->E, e = id % s->E;
	if (layer == s->cur_layer && s->in_access[e])
		return false;
	if (s->state[id] == LOADING)
		return false;
	if (layer == f->layer && s->plan_scores[e] >= f->min_keep)
		return false;
	return true;
}

static void pf_view(void *ctx, uint32_t layer, struct prefetch_view *v)
{
	struct sim *s = ctx;
	for (uint32_t e = 0; e < s->E; e++) {
		uint32_t id = layer * s->E + e;
		s->view_res[e] = s->state[id] != ABSENT;
		s->view_ev[e] = s->state[id] != ABSENT && !(layer == s->cur_layer && s->in_access[e]);
	}
	v->resident = s->view_res;
	v->evictable = s->cfg.global ? NULL : s->view_ev;
	v->free_slots = s->cfg.global ? UINT32_MAX : s->cap - s->occ[layer];
	/* Link time still owed to queued prefetches (run FIFO after now). */
	double busy = 0;
	if (s->cfg.timed)
		for (size_t i = s->qhead; i < s->qtail; i++) {
			uint32_t id = s->q[i];
			if (s->state[id] == LOADING && s->qpos[id] == i && s->rem_ns[id] > 0)
				busy += s->rem_ns[id];
		}
	v->busy_s = busy / 1e9;
	s->plan_scores = s->ps.scores;
	s->plan_layer = layer;
}

static int pf_issue(void *ctx, uint32_t layer, uint32_t e, uint32_t victim)
{
	struct sim *s = ctx;
	uint32_t id = layer * s->E + e, g = s->cfg.global ? 0 : layer;

	if (s->state[id] != ABSENT)
		return -EEXIST;
	if (victim != POLICY_NONE) {
		evict(s, layer * s->E + victim);
	} else if (s->occ[g] >= s->cap) {
		struct pf_filter f = { s, layer, s->plan_scores[e] - s->ps.cfg.gain };
		uint32_t v = policy_victim(s->pol, g, pf_victim_ok, &f);
		if (v == POLICY_NONE)
			return -ENOSPC;
		evict(s, v);
	}
	policy_insert(s->pol, id, POLICY_F_PREFETCH);
	s->occ[g]++;
	s->pf_unused[id] = 1;
	s->st.pf_issued++;
	if (s->cfg.timed) {
		s->state[id] = LOADING;
		s->tot_ns[id] = s->rem_ns[id] = load_ns(s, id);
		s->issue_ns[id] = s->now_ns;
		enqueue(s, id);
	} else {
		load_ns(s, id);
		s->state[id] = RESIDENT;
		s->st.gpu_bytes += s->cfg.cost.expert_bytes;
	}
	return 0;
}

/* A prefetch no longer wanted: withdrawn only while its copy has not
 * started (a DMA under way is not recalled). */
static int pf_cancel(void *ctx, uint32_t layer, uint32_t e)
{
	struct sim *s = ctx;
	uint32_t id = layer * s->E + e;
	if (!s->cfg.timed || s->state[id] != LOADING || s->rem_ns[id] < s->tot_ns[id])
		return 0;
	evict(s, id);
	return 1;
}

/* ---- demand path ---- */

static bool demand_victim_ok(void *ctx, uint32_t id)
{
	struct sim *s = ctx;
	return !(id / s->E == s->cur_layer && s->in_access[id % s->E]);
}

static uint64_t rng_next(uint64_t *x)
{
	uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

static double rng_unit(uint64_t *x)
{
	return ((double)(rng_next(x) >> 11) + 0.5) / 9007199254740992.0;
}

static bool route_resident(void *ctx, uint32_t e)
{
	struct sim *s = ctx;
	return s->state[s->cur_layer * s->E + e] == RESIDENT;
}

/* Logits consistent with a trace row: the row's experts get 1 + Exp(1)/2,
 * the others N(0, 1) capped below 1, so the exact top-k is the row. */
static void synth_logits(struct sim *s, const uint16_t *row, uint32_t n, float *logits)
{
	for (uint32_t e = 0; e < s->E; e++) {
		double u1 = rng_unit(&s->rng), u2 = rng_unit(&s->rng);
		double g = sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
		logits[e] = (float)(g < 0.999 ? g : 0.999);
	}
	for (uint32_t i = 0; i < n; i++)
		logits[row[i]] = (float)(1.0 - 0.5 * log(rng_unit(&s->rng)));
}

static void access_layer(struct sim *s, uint32_t t, uint32_t l, const uint16_t *row, uint32_t n)
{
	uint16_t ids[ROUTE_MAX_K];
	bool hit[ROUTE_MAX_K];
	double demand = 0;

	s->cur_layer = l;
	if (s->cfg.timed)
		advance(s, s->now_ns);
	if (s->cfg.route_keep) {
		float logits[PREDICT_MAX_EXPERTS];
		struct route_result r;
		struct route_cache_opts o = { s->cfg.route_keep, s->cfg.route_margin, route_resident, s };
		if (s->logits)
			memcpy(logits, s->logits + ((size_t)s->cur_token * s->L + l) * s->E, s->E * sizeof(float));
		else
			synth_logits(s, row, n, logits);
		memcpy(ids, row, n * sizeof(*ids));
		if (n == s->k && route_cache_aware(&s->rp, logits, &o, &r) == 0) {
			if (s->logits) {
				/* real scores: the route is theirs, in rank order */
				bool same = true;
				for (uint32_t i = 0; i < n; i++)
					same = same && r.exact[i] == row[i];
				if (!same) {
					s->st.route_mismatch++;
					for (uint32_t i = 0; i < n; i++)
						ids[i] = (uint16_t)r.exact[i];
				}
			}
			/* Keep the trace's order: substitutes take their slot's place. */
			for (uint32_t i = 0; i < n; i++)
				if (r.subst_mask & (1u << i))
					for (uint32_t j = 0; j < n; j++)
						if (ids[j] == r.exact[i])
							ids[j] = (uint16_t)r.experts[i];
			s->st.route_subst += r.n_subst;
			s->st.route_slots_open += (uint64_t)__builtin_popcount(r.open_mask);
		}
	} else {
		memcpy(ids, row, n * sizeof(*ids));
	}
	for (uint32_t i = 0; i < n; i++)
		s->in_access[ids[i]] = 1;
	policy_begin(s->pol, t, l);
	/* Hits are judged against the state at the start of the access. */
	for (uint32_t i = 0; i < n; i++)
		hit[i] = s->state[l * s->E + ids[i]] == RESIDENT;
	for (uint32_t i = 0; i < n; i++) {
		uint32_t id = l * s->E + ids[i], g = s->cfg.global ? 0 : l;
		s->st.accesses++;
		if (hit[i]) {
			s->st.hits++;
			if (s->pf_unused[id]) {
				s->pf_unused[id] = 0;
				s->st.pf_useful++;
				if (s->have_ps)
					prefetch_note_used(&s->ps, s->cfg.cost.expert_bytes);
			}
			policy_hit(s->pol, id);
			continue;
		}
		s->st.misses++;
		if (s->state[id] == LOADING) {
			/* Late prefetch: it becomes a demand read and finishes now. */
			s->st.pf_late++;
			if (s->have_ps)
				prefetch_note_late(&s->ps);
			demand += s->rem_ns[id];
			s->rem_ns[id] = 0;
			s->state[id] = RESIDENT;
			s->pf_unused[id] = 0;
			s->st.gpu_bytes += s->cfg.cost.expert_bytes;
			policy_hit(s->pol, id);
			continue;
		}
		while (s->occ[g] >= s->cap) {
			uint32_t v = policy_victim(s->pol, g, demand_victim_ok, s);
			if (v == POLICY_NONE)
				break; /* cannot happen: cap >= k */
			evict(s, v);
		}
		demand += load_ns(s, id);
		s->st.gpu_bytes += s->cfg.cost.expert_bytes;
		s->state[id] = RESIDENT;
		policy_insert(s->pol, id, 0);
		s->occ[g]++;
	}
	if (s->cfg.timed) {
		/* Demand copies take the link first; queued prefetches wait. */
		s->now_ns += demand;
		s->link_ns = s->now_ns;
		s->st.stall_ns += (uint64_t)demand;
	}
	if (s->have_ps) {
		uint64_t t0 = cpu_ns();
		prefetch_step(&s->ps, s->pred, l, ids, n, pf_view, pf_issue, s);
		s->st.pred_ns += cpu_ns() - t0;
		s->st.pred_calls++;
		if (s->cfg.timed)
			prefetch_note_layer(&s->ps, s->cfg.cost.layer_s);
	}
	for (uint32_t i = 0; i < n; i++)
		s->in_access[ids[i]] = 0;
	s->cur_layer = UINT32_MAX;
	s->now_ns += s->cfg.cost.layer_s * 1e9;
	s->st.token_layers++;
}

static int build_future(struct sim *s, const struct trace *tr, struct moe_error *err)
{
	uint32_t L = s->L, E = s->E;
	uint64_t total = (uint64_t)tr->n_tokens * L * tr->k;

	free(s->fut_time);
	s->fut_time = malloc((total ? total : 1) * sizeof(uint64_t));
	if (!s->fut_time)
		return moe_error_set(err, -ENOMEM, "sim: out of memory");
	memset(s->fut_start, 0, (s->n_ids + 1) * sizeof(uint32_t));
	for (uint32_t t = 0; t < tr->n_tokens; t++)
		for (uint32_t l = 0; l < L; l++) {
			const uint16_t *r = trace_row(tr, t, l);
			for (uint32_t i = 0; i < tr->count[(size_t)t * L + l]; i++)
				s->fut_start[l * E + r[i] + 1]++;
		}
	for (uint32_t i = 0; i < s->n_ids; i++)
		s->fut_start[i + 1] += s->fut_start[i];
	memcpy(s->fut_pos, s->fut_start, s->n_ids * sizeof(uint32_t));
	for (uint32_t t = 0; t < tr->n_tokens; t++)
		for (uint32_t l = 0; l < L; l++) {
			const uint16_t *r = trace_row(tr, t, l);
			for (uint32_t i = 0; i < tr->count[(size_t)t * L + l]; i++)
				s->fut_time[s->fut_pos[l * E + r[i]]++] = s->clock_base + (uint64_t)t * L + l + 1;
		}
	memcpy(s->fut_pos, s->fut_start, s->n_ids * sizeof(uint32_t));
	return 0;
}

int sim_run_trace(struct sim *s, const struct trace *tr, struct moe_error *err)
{
	return sim_run_trace_logits(s, tr, NULL, err);
}

int sim_logits_load(const char *path, const struct trace *tr, float **out, uint32_t *n_experts,
		    struct moe_error *err)
{
	FILE *f = fopen(path, "rb");
	char magic[8];
	uint32_t h[4];
	*out = NULL;
	if (!f)
		return errno == ENOENT ? -ENOENT : moe_error_set(err, -errno, "%s: %s", path, strerror(errno));
	if (fread(magic, 1, 8, f) != 8 || memcmp(magic, "MOERLG01", 8) || fread(h, sizeof(uint32_t), 4, f) != 4) {
		fclose(f);
		return moe_error_set(err, -EINVAL, "%s: not a router-logits file (MOERLG01)", path);
	}
	if (h[0] != tr->n_tokens || h[1] != tr->n_layers || h[3] != tr->first_layer || h[2] <= tr->max_expert ||
	    h[2] > PREDICT_MAX_EXPERTS) {
		fclose(f);
		return moe_error_set(err, -EINVAL,
				     "%s: %u tokens x %u layers (from %u) x %u experts, the trace %u x %u (from %u), ids up to %u",
				     path, h[0], h[1], h[3], h[2], tr->n_tokens, tr->n_layers, tr->first_layer,
				     tr->max_expert);
	}
	size_t n = (size_t)h[0] * h[1] * h[2];
	float *v = malloc((n ? n : 1) * sizeof(float));
	if (!v) {
		fclose(f);
		return moe_error_set(err, -ENOMEM, "%s: out of memory", path);
	}
	if (fread(v, sizeof(float), n, f) != n || fgetc(f) != EOF) {
		fclose(f);
		free(v);
		return moe_error_set(err, -EINVAL, "%s: not %zu logits", path, n);
	}
	fclose(f);
	*out = v;
	*n_experts = h[2];
	return 0;
}

int sim_run_trace_logits(struct sim *s, const struct trace *tr, const float *logits, struct moe_error *err)
{
	int rc;

	if (tr->n_layers != s->L || tr->k > s->k || tr->max_expert >= s->E)
		return moe_error_set(err, -EINVAL, "trace has %u layers, top-%u, expert ids up to %u; simulator: "
				     "%u layers, top-%u, %u experts", tr->n_layers, tr->k, tr->max_expert,
				     s->L, s->k, s->E);
	if (!s->cfg.warm || s->st.prompts == 0) {
		rc = make_policy(s, err);
		if (rc < 0)
			return rc;
		if (s->host && !s->cfg.warm) {
			for (uint32_t id = 0; id < s->n_ids; id++)
				policy_remove(s->host, id);
			memset(s->host_occ, 0, s->L * sizeof(*s->host_occ));
		}
	}
	s->clock_base = s->pol->clock;
	if (strcmp(s->cfg.policy, "belady") == 0) {
		rc = build_future(s, tr, err);
		if (rc < 0)
			return rc;
	}
	if (s->pred)
		predict_reset(s->pred);
	s->st.prompts++;
	s->logits = logits;
	for (uint32_t t = 0; t < tr->n_tokens; t++) {
		s->st.tokens++;
		s->cur_token = t;
		if (s->pred) {
			uint64_t t0 = cpu_ns();
			predict_token(s->pred, predict_token_key(tr->token && tr->token[t] ? tr->token[t] : ""));
			prefetch_step(&s->ps, s->pred, UINT32_MAX, NULL, 0, pf_view, pf_issue, s);
			s->st.pred_ns += cpu_ns() - t0;
		}
		/* The dense layers before the first MoE layer compute (and give the
		 * link time for the token's first prefetches). */
		if (s->cfg.timed)
			s->now_ns += (double)s->cfg.cost.dense_layers * s->cfg.cost.layer_s * 1e9;
		for (uint32_t l = 0; l < s->L; l++) {
			uint32_t n = tr->count[(size_t)t * s->L + l];
			if (n == 0)
				continue; /* row absent from the file */
			access_layer(s, t, l, trace_row(tr, t, l), n);
		}
	}
	/* The prompt ends: prefetches never used count as waste (cold mode
	 * drops the cache next; warm mode keeps them but they were not used by
	 * this prompt, which is what the counters are about). */
	if (!s->cfg.warm) {
		if (s->cfg.timed)
			advance(s, s->now_ns);
		for (uint32_t id = 0; id < s->n_ids; id++)
			if (s->state[id] != ABSENT)
				evict(s, id);
	}
	s->logits = NULL;
	s->st.time_ns = (uint64_t)s->now_ns;
	if (s->have_ps) {
		s->st.pf_cut = s->ps.c.deadline_cut;
		s->st.pf_withdrawn = s->ps.c.withdrawn;
	}
	return 0;
}
