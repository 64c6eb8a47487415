/* predict_coact.c - cross-layer co-activation learned online: counts of
 * (expert a at layer L-d, expert b at layer L) within one token, for
 * d = 1..PREDICT_DMAX. The score of b is the mean over the experts a of the
 * latest routed layer of P(b | a), smoothed toward b's base rate. The tables
 * keep learning across streams (nothing here is trained offline). */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "predict.h"

struct coact {
	float *cnt[PREDICT_DMAX];  /* [L][E src][E dst] */
	float *src[PREDICT_DMAX];  /* [L][E src] */
	float *base;               /* [L][E] uses at layer L */
	float *tokens;             /* [L] routed rows at layer L */
};

static void coact_fini(struct predictor *p)
{
	struct coact *c = p->priv;
	for (int d = 0; d < PREDICT_DMAX; d++) {
		free(c->cnt[d]);
		free(c->src[d]);
	}
	free(c->base);
	free(c->tokens);
}

static int coact_init(struct predictor *p, struct moe_error *err)
{
	struct coact *c = p->priv;
	size_t L = p->s->n_layers, E = p->s->n_experts;
	bool ok = true;
	for (int d = 0; d < PREDICT_DMAX; d++) {
		c->cnt[d] = calloc(L * E * E, sizeof(float));
		c->src[d] = calloc(L * E, sizeof(float));
		ok = ok && c->cnt[d] && c->src[d];
	}
	c->base = calloc(L * E, sizeof(float));
	c->tokens = calloc(L, sizeof(float));
	if (!ok || !c->base || !c->tokens) {
		coact_fini(p);
		return moe_error_set(err, -ENOMEM, "coact: out of memory");
	}
	return 0;
}

static void coact_observe(struct predictor *p, uint32_t L)
{
	struct coact *c = p->priv;
	const struct predict_stream *s = p->s;
	size_t E = s->n_experts;
	const uint16_t *dst = &s->cur[(size_t)L * s->k];
	uint32_t nd = s->cur_n[L];

	c->tokens[L] += 1.0f;
	for (uint32_t j = 0; j < nd; j++)
		c->base[L * E + dst[j]] += 1.0f;
	for (uint32_t d = 1; d <= PREDICT_DMAX && d <= L; d++) {
		uint32_t l = L - d, ns = s->cur_n[l];
		const uint16_t *src = &s->cur[(size_t)l * s->k];
		for (uint32_t i = 0; i < ns; i++) {
			float *row = &c->cnt[d - 1][((size_t)L * E + src[i]) * E];
			c->src[d - 1][(size_t)L * E + src[i]] += 1.0f;
			for (uint32_t j = 0; j < nd; j++)
				row[dst[j]] += 1.0f;
		}
	}
}

static void coact_score(struct predictor *p, uint32_t L, float *out)
{
	struct coact *c = p->priv;
	const struct predict_stream *s = p->s;
	size_t E = s->n_experts;
	const float *base = &c->base[L * E];
	float nt = c->tokens[L];
	int32_t last = s->last_layer;

	for (size_t e = 0; e < E; e++)
		out[e] = nt > 0 ? base[e] / nt : (float)s->k / (float)E;
	if (last < 0 || (uint32_t)last >= L)
		return;
	uint32_t d = L - (uint32_t)last;
	if (d > PREDICT_DMAX)
		return;
	uint32_t ns = s->cur_n[last];
	if (ns == 0)
		return;
	const uint16_t *src = &s->cur[(size_t)last * s->k];
	float prior[PREDICT_MAX_EXPERTS];
	memcpy(prior, out, E * sizeof(float));
	memset(out, 0, E * sizeof(float));
	/* P(b | a) with 2 pseudo-observations at the base rate. */
	for (uint32_t i = 0; i < ns; i++) {
		const float *row = &c->cnt[d - 1][((size_t)L * E + src[i]) * E];
		float n = c->src[d - 1][(size_t)L * E + src[i]];
		float inv = 1.0f / (n + 2.0f) / (float)ns;
		for (size_t e = 0; e < E; e++)
			out[e] += (row[e] + 2.0f * prior[e]) * inv;
	}
}

const struct predict_ops predict_coact_ops = {
	.name = "coact",
	.help = "cross-layer co-activation of this token's earlier layers, learned online",
	.priv_size = sizeof(struct coact),
	.init = coact_init,
	.fini = coact_fini,
	.observe = coact_observe,
	.score = coact_score,
};
