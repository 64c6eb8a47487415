/* prefetch.c - see prefetch.h. */
#include "config.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "prefetch.h"

void prefetch_config_default(struct prefetch_config *c, uint32_t n_layers, uint32_t n_experts,
			     uint64_t expert_bytes)
{
	memset(c, 0, sizeof(*c));
	c->n_layers = n_layers;
	c->n_experts = n_experts;
	c->h_min = 1;
	c->h_max = 6;
	c->max_per_layer = 3;
	c->min_score = 0.3f;
	c->gain = 0.2f;
	c->expert_bytes = expert_bytes;
	c->init_bw = 25e9;
	c->init_layer_s = 0.5e-3;
	c->deadline = true;
}

static void update_h(struct prefetch_sched *ps)
{
	const struct prefetch_config *c = &ps->cfg;
	if (c->h_fixed) {
		ps->h = c->h_fixed;
		return;
	}
	double t_load = (double)c->expert_bytes / ps->bw, h;
	if (c->deadline) {
		/* The first layer a load can reach in time, and one more to choose
		 * from: farther layers are predicted worse and would take the
		 * link from nearer, likelier picks (measured in moe-sim). */
		h = ceil(t_load / ps->layer_s) + 1;
	} else {
		/* Time to move one layer's worth of prefetches, in layers of compute. */
		double per = ps->per_layer > 0.5 ? ps->per_layer : 0.5;
		h = ceil(per * t_load / ps->layer_s);
	}
	if (!(h >= c->h_min))
		h = c->h_min;
	if (h > c->h_max)
		h = c->h_max;
	ps->h = (uint32_t)h;
}

int prefetch_init(struct prefetch_sched *ps, const struct prefetch_config *cfg, struct moe_error *err)
{
	memset(ps, 0, sizeof(*ps));
	if (cfg->n_layers == 0 || cfg->n_experts == 0 || cfg->n_experts > PREDICT_MAX_EXPERTS ||
	    cfg->h_min == 0 || cfg->h_max < cfg->h_min || cfg->h_max > PREFETCH_MAX_H ||
	    cfg->h_fixed > PREFETCH_MAX_H || cfg->expert_bytes == 0 ||
	    !(cfg->init_bw > 0) || !(cfg->init_layer_s > 0))
		return moe_error_set(err, -EINVAL, "prefetch: bad configuration (layers %u, experts %u, h %u..%u)",
				     cfg->n_layers, cfg->n_experts, cfg->h_min, cfg->h_max);
	ps->cfg = *cfg;
	ps->bw = cfg->init_bw;
	ps->layer_s = cfg->init_layer_s;
	ps->per_layer = cfg->max_per_layer;
	ps->scores = calloc(cfg->n_experts, sizeof(float));
	ps->rows = calloc((size_t)PREFETCH_MAX_H * cfg->n_experts, sizeof(float));
	ps->picks = calloc((size_t)PREFETCH_MAX_H * cfg->n_experts, sizeof(uint32_t));
	ps->victims = calloc((size_t)PREFETCH_MAX_H * cfg->n_experts, sizeof(uint32_t));
	ps->outstanding = calloc((size_t)cfg->n_layers * cfg->n_experts, 1);
	if (!ps->scores || !ps->rows || !ps->picks || !ps->victims || !ps->outstanding) {
		prefetch_fini(ps);
		return moe_error_set(err, -ENOMEM, "prefetch: out of memory");
	}
	update_h(ps);
	return 0;
}

void prefetch_fini(struct prefetch_sched *ps)
{
	free(ps->scores);
	free(ps->rows);
	free(ps->picks);
	free(ps->victims);
	free(ps->outstanding);
	ps->outstanding = NULL;
	ps->scores = ps->rows = NULL;
	ps->picks = ps->victims = NULL;
}

void prefetch_note_load(struct prefetch_sched *ps, uint64_t bytes, double seconds)
{
	if (!(seconds > 0) || bytes == 0)
		return;
	ps->bw = 0.9 * ps->bw + 0.1 * ((double)bytes / seconds);
	update_h(ps);
}

void prefetch_note_layer(struct prefetch_sched *ps, double seconds)
{
	if (!(seconds > 0))
		return;
	ps->layer_s = 0.9 * ps->layer_s + 0.1 * seconds;
	update_h(ps);
}

void prefetch_note_used(struct prefetch_sched *ps, uint64_t bytes)
{
	ps->c.useful++;
	ps->c.useful_bytes += bytes;
}

void prefetch_note_unused(struct prefetch_sched *ps, uint64_t bytes)
{
	ps->c.wasted++;
	ps->c.wasted_bytes += bytes;
}

void prefetch_note_cancel(struct prefetch_sched *ps, uint64_t bytes_done)
{
	ps->c.cancelled++;
	ps->c.cancelled_bytes += bytes_done;
	ps->c.wasted_bytes += bytes_done;
}

void prefetch_note_late(struct prefetch_sched *ps)
{
	ps->c.late++;
}

/* One layer's selection (no I/O): experts not resident, best score first,
 * at most max_per_layer; into a free slot when score >= min_score, else
 * replacing the evictable resident with the lowest score when the gain rule
 * holds. Writes the picks in issue order; returns how many. */
static uint32_t select_layer(const struct prefetch_config *c, const float *scores, const struct prefetch_view *v,
			     uint32_t *pick, uint32_t *victim)
{
	uint32_t E = c->n_experts, cand[PREDICT_MAX_EXPERTS], vict[PREDICT_MAX_EXPERTS];
	uint32_t nc = 0, nv = 0, n = 0, free_slots = v->free_slots;

	for (uint32_t e = 0; e < E; e++) {
		if (!v->resident[e]) {
			/* Insertion sort: E is small (<= a few hundred) and we need
			 * only the first max_per_layer of either list. */
			uint32_t i = nc++;
			for (; i > 0 && scores[cand[i - 1]] < scores[e]; i--)
				cand[i] = cand[i - 1];
			cand[i] = e;
		} else if (v->evictable && v->evictable[e]) {
			uint32_t i = nv++;
			for (; i > 0 && scores[vict[i - 1]] > scores[e]; i--)
				vict[i] = vict[i - 1];
			vict[i] = e;
		}
	}
	for (uint32_t i = 0, j = 0; i < nc && n < c->max_per_layer; i++) {
		uint32_t e = cand[i], vv = POLICY_NONE;
		if (free_slots > 0) {
			if (scores[e] < c->min_score)
				break;
			if (free_slots != UINT32_MAX)
				free_slots--;
		} else {
			if (j >= nv || scores[e] - scores[vict[j]] <= c->gain)
				break;
			vv = vict[j++];
		}
		pick[n] = e;
		victim[n++] = vv;
	}
	return n;
}

static uint32_t issue_picks(struct prefetch_sched *ps, uint32_t layer, const uint32_t *pick, const uint32_t *victim,
			    uint32_t n, prefetch_issue_fn issue, void *ctx)
{
	uint32_t issued = 0;
	for (; issued < n; issued++) {
		if (issue(ctx, layer, pick[issued], victim[issued]) < 0)
			break;
		ps->outstanding[(size_t)layer * ps->cfg.n_experts + pick[issued]] = 1;
		ps->c.issued++;
		ps->c.issued_bytes += ps->cfg.expert_bytes;
	}
	return issued;
}

uint32_t prefetch_plan_layer(struct prefetch_sched *ps, uint32_t layer, const float *scores,
			     const struct prefetch_view *v, prefetch_issue_fn issue, void *ctx)
{
	uint32_t pick[PREDICT_MAX_EXPERTS], victim[PREDICT_MAX_EXPERTS];
	uint32_t n = select_layer(&ps->cfg, scores, v, pick, victim);

	ps->c.plans++;
	uint32_t issued = issue_picks(ps, layer, pick, victim, n, issue, ctx);
	ps->per_layer = 0.95 * ps->per_layer + 0.05 * issued;
	update_h(ps);
	return issued;
}

/* Deadline filter over the picks of the layers in the horizon. Link time
 * for prefetches exists only while layers compute (demand reads preempt
 * prefetches), so layer `first + i` can receive what fits in
 * busy_s + (i + lead) * layer_s of link time, in deadline order (the owner's
 * queue is FIFO and we issue nearest layer first). Picks are taken best
 * score first across all layers, each kept only if every accepted pick still
 * lands before its layer is accessed; within a layer, picks stay a prefix of
 * its list so the gain rule's victim pairing holds. A pick that cannot land
 * would only evict something useful and arrive late. */
static void deadline_filter(const struct prefetch_sched *ps, uint32_t nl, uint32_t lead, double busy_s,
			    const float *const *score_rows, const uint32_t *picks, const uint32_t *n_pick,
			    uint32_t *n_keep)
{
	const double t_load = (double)ps->cfg.expert_bytes / ps->bw;
	const size_t E = ps->cfg.n_experts;
	uint32_t next[PREFETCH_MAX_H] = { 0 };

	for (uint32_t i = 0; i < nl; i++)
		n_keep[i] = 0;
	for (;;) {
		/* The best remaining head among the layers. */
		uint32_t best = UINT32_MAX;
		float bs = -1.0f;
		for (uint32_t i = 0; i < nl; i++)
			if (next[i] < n_pick[i] && score_rows[i][picks[(size_t)i * E + next[i]]] > bs) {
				bs = score_rows[i][picks[(size_t)i * E + next[i]]];
				best = i;
			}
		if (best == UINT32_MAX)
			break;
		/* Feasible with it? Accepted loads run in layer order. */
		bool ok = true;
		double t = busy_s;
		for (uint32_t i = 0; i < nl && ok; i++) {
			t += (n_keep[i] + (i == best)) * t_load;
			if ((n_keep[i] || i == best) && t > (double)(i + lead) * ps->layer_s)
				ok = false;
		}
		if (ok)
			n_keep[best]++;
		/* Either way this layer's later picks come after this one. */
		next[best] = ok ? next[best] + 1 : n_pick[best];
	}
}

/* Layer `layer` was routed to experts[0..n): its outstanding prefetches
 * for other experts are no longer wanted by this token. */
static void withdraw(struct prefetch_sched *ps, uint32_t layer, const uint16_t *experts, uint32_t n, void *ctx)
{
	uint8_t *out = ps->outstanding + (size_t)layer * ps->cfg.n_experts;
	for (uint32_t i = 0; i < n; i++)
		if (experts[i] < ps->cfg.n_experts)
			out[experts[i]] = 0;
	for (uint32_t e = 0; e < ps->cfg.n_experts; e++) {
		if (!out[e])
			continue;
		out[e] = 0;
		if (ps->cfg.cancel && ps->cfg.cancel(ctx, layer, e) > 0)
			ps->c.withdrawn++;
	}
}

uint32_t prefetch_step(struct prefetch_sched *ps, struct predictor *pred, uint32_t layer,
		       const uint16_t *experts, uint32_t n, prefetch_view_fn view,
		       prefetch_issue_fn issue, void *ctx)
{
	uint32_t first, lead, total = 0;
	struct prefetch_view v;

	if (layer != UINT32_MAX) {
		if (layer < ps->cfg.n_layers)
			withdraw(ps, layer, experts, n, ctx);
		predict_observe(pred, layer, experts, n);
		first = layer + 1;
		lead = 1; /* layer `layer` computes before `first` is accessed */
	} else {
		/* A new token: what the last one left outstanding is history. */
		memset(ps->outstanding, 0, (size_t)ps->cfg.n_layers * ps->cfg.n_experts);
		first = 0;
		lead = ps->cfg.start_lead;
	}
	uint32_t nl = 0;
	if (first < ps->cfg.n_layers) {
		nl = ps->cfg.n_layers - first;
		if (nl > ps->h)
			nl = ps->h;
	}
	if (nl == 0)
		return 0;
	if (!ps->cfg.deadline) {
		for (uint32_t L = first; L < first + nl; L++) {
			predict_score(pred, L, ps->scores);
			view(ctx, L, &v);
			total += prefetch_plan_layer(ps, L, ps->scores, &v, issue, ctx);
		}
		return total;
	}

	/* Select per layer, filter by deadline, then issue nearest layer first.
	 * The owner's view buffers are reused per call, so each layer is viewed
	 * again right before its picks are issued (only other layers changed
	 * in between). */
	const uint32_t E = ps->cfg.n_experts;
	const float *rows[PREFETCH_MAX_H];
	uint32_t n_pick[PREFETCH_MAX_H], n_keep[PREFETCH_MAX_H];
	bool unreachable[PREFETCH_MAX_H];
	view(ctx, first, &v);
	const double busy_s = v.busy_s > 0 ? v.busy_s : 0;
	const double t_load = (double)ps->cfg.expert_bytes / ps->bw;
	for (uint32_t i = 0; i < nl; i++) {
		float *row = ps->rows + (size_t)i * E;
		rows[i] = row;
		n_pick[i] = 0;
		/* Not even one copy lands before this layer: skip the scoring
		 * (the predictor is most of the hot path's time). */
		unreachable[i] = busy_s + t_load > (double)(i + lead) * ps->layer_s;
		if (unreachable[i])
			continue;
		predict_score(pred, first + i, row);
		if (i > 0) /* layer `first` was viewed above */
			view(ctx, first + i, &v);
		n_pick[i] = select_layer(&ps->cfg, row, &v, ps->picks + (size_t)i * E, ps->victims + (size_t)i * E);
	}
	deadline_filter(ps, nl, lead, busy_s, rows, ps->picks, n_pick, n_keep);
	for (uint32_t i = 0; i < nl; i++) {
		ps->c.plans++;
		if (unreachable[i] || n_keep[i] < n_pick[i])
			ps->c.deadline_cut++;
		if (n_keep[i]) {
			/* The owner may read the scores (victim filters) while issuing. */
			memcpy(ps->scores, rows[i], E * sizeof(float));
			view(ctx, first + i, &v);
			total += issue_picks(ps, first + i, ps->picks + (size_t)i * E, ps->victims + (size_t)i * E,
					     n_keep[i], issue, ctx);
		}
	}
	update_h(ps);
	return total;
}
