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
	c->h_max = 4;
	c->max_per_layer = 3;
	c->min_score = 0.3f;
	c->gain = 0.2f;
	c->expert_bytes = expert_bytes;
	c->init_bw = 25e9;
	c->init_layer_s = 0.5e-3;
}

static void update_h(struct prefetch_sched *ps)
{
	const struct prefetch_config *c = &ps->cfg;
	if (c->h_fixed) {
		ps->h = c->h_fixed;
		return;
	}
	/* Time to move one layer's worth of prefetches, in layers of compute. */
	double per = ps->per_layer > 0.5 ? ps->per_layer : 0.5;
	double t = per * (double)c->expert_bytes / ps->bw;
	double h = ceil(t / ps->layer_s);
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
	    cfg->h_min == 0 || cfg->h_max < cfg->h_min || cfg->expert_bytes == 0 ||
	    !(cfg->init_bw > 0) || !(cfg->init_layer_s > 0))
		return moe_error_set(err, -EINVAL, "prefetch: bad configuration (layers %u, experts %u, h %u..%u)",
				     cfg->n_layers, cfg->n_experts, cfg->h_min, cfg->h_max);
	ps->cfg = *cfg;
	ps->bw = cfg->init_bw;
	ps->layer_s = cfg->init_layer_s;
	ps->per_layer = cfg->max_per_layer;
	ps->scores = calloc(cfg->n_experts, sizeof(float));
	if (!ps->scores)
		return moe_error_set(err, -ENOMEM, "prefetch: out of memory");
	update_h(ps);
	return 0;
}

void prefetch_fini(struct prefetch_sched *ps)
{
	free(ps->scores);
	ps->scores = NULL;
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

uint32_t prefetch_plan_layer(struct prefetch_sched *ps, uint32_t layer, const float *scores,
			     const struct prefetch_view *v, prefetch_issue_fn issue, void *ctx)
{
	const struct prefetch_config *c = &ps->cfg;
	uint32_t E = c->n_experts, cand[PREDICT_MAX_EXPERTS], vict[PREDICT_MAX_EXPERTS];
	uint32_t nc = 0, nv = 0, issued = 0, free_slots = v->free_slots;

	ps->c.plans++;
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
	for (uint32_t i = 0, j = 0; i < nc && issued < c->max_per_layer; i++) {
		uint32_t e = cand[i], victim = POLICY_NONE;
		if (free_slots > 0) {
			if (scores[e] < c->min_score)
				break;
			if (free_slots != UINT32_MAX)
				free_slots--;
		} else {
			if (j >= nv || scores[e] - scores[vict[j]] <= c->gain)
				break;
			victim = vict[j++];
		}
		if (issue(ctx, layer, e, victim) < 0)
			break;
		issued++;
		ps->c.issued++;
		ps->c.issued_bytes += c->expert_bytes;
	}
	ps->per_layer = 0.95 * ps->per_layer + 0.05 * issued;
	update_h(ps);
	return issued;
}

uint32_t prefetch_step(struct prefetch_sched *ps, struct predictor *pred, uint32_t layer,
		       const uint16_t *experts, uint32_t n, prefetch_view_fn view,
		       prefetch_issue_fn issue, void *ctx)
{
	uint32_t first, total = 0;
	struct prefetch_view v;

	if (layer != UINT32_MAX) {
		predict_observe(pred, layer, experts, n);
		first = layer + 1;
	} else {
		first = 0;
	}
	for (uint32_t L = first; L < ps->cfg.n_layers && L < first + ps->h; L++) {
		predict_score(pred, L, ps->scores);
		view(ctx, L, &v);
		total += prefetch_plan_layer(ps, L, ps->scores, &v, issue, ctx);
	}
	return total;
}
