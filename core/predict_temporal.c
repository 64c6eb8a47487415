/* predict_temporal.c - recent tokens at the same layer: an exponentially
 * decayed count of each expert's use at layer L over this stream's tokens
 * (consecutive tokens share ~1.6 of 6 experts on the DeepSeek-V2-Lite traces,
 * 3x chance). Scores are scaled so an expert used by every token scores 1. */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "predict.h"

#define TEMPORAL_DECAY 0.5f

struct temporal {
	float *w;        /* [L][E] */
	uint64_t *stamp; /* [L]: token the row was last decayed at */
};

static int temporal_init(struct predictor *p, struct moe_error *err)
{
	struct temporal *t = p->priv;
	t->w = calloc((size_t)p->s->n_layers * p->s->n_experts, sizeof(float));
	t->stamp = calloc(p->s->n_layers, sizeof(uint64_t));
	if (!t->w || !t->stamp) {
		free(t->w);
		free(t->stamp);
		return moe_error_set(err, -ENOMEM, "temporal: out of memory");
	}
	return 0;
}

static void temporal_fini(struct predictor *p)
{
	struct temporal *t = p->priv;
	free(t->w);
	free(t->stamp);
}

static void temporal_token(struct predictor *p)
{
	struct temporal *t = p->priv;
	if (p->s->n_tokens <= 1) { /* a fresh stream */
		memset(t->w, 0, (size_t)p->s->n_layers * p->s->n_experts * sizeof(float));
		memset(t->stamp, 0, p->s->n_layers * sizeof(uint64_t));
	}
}

/* Brings row L's decay up to the token before the current one. */
static float *row_at(struct temporal *t, const struct predict_stream *s, uint32_t L)
{
	float *w = &t->w[(size_t)L * s->n_experts];
	uint64_t age = s->n_tokens - t->stamp[L];
	if (age > 0) {
		float f = 1.0f;
		for (uint64_t i = 0; i < age && f > 1e-6f; i++)
			f *= TEMPORAL_DECAY;
		for (uint32_t e = 0; e < s->n_experts; e++)
			w[e] *= f;
		t->stamp[L] = s->n_tokens;
	}
	return w;
}

static void temporal_observe(struct predictor *p, uint32_t L)
{
	struct temporal *t = p->priv;
	const struct predict_stream *s = p->s;
	/* Decay to "now" first, then count this token: the row then holds the
	 * history including the current token, which is what the next token sees. */
	float *w = row_at(t, s, L);
	const uint16_t *r = &s->cur[(size_t)L * s->k];
	for (uint32_t i = 0; i < s->cur_n[L]; i++)
		w[r[i]] += 1.0f;
}

static void temporal_score(struct predictor *p, uint32_t L, float *out)
{
	struct temporal *t = p->priv;
	const struct predict_stream *s = p->s;
	const float *w = &t->w[(size_t)L * s->n_experts];
	/* The row was last brought up to date at stamp[L]; the current token adds
	 * one more decay step per token since then. */
	float f = 1.0f;
	for (uint64_t i = t->stamp[L]; i < s->n_tokens && f > 1e-6f; i++)
		f *= TEMPORAL_DECAY;
	f *= (1.0f - TEMPORAL_DECAY) / TEMPORAL_DECAY;
	for (uint32_t e = 0; e < s->n_experts; e++) {
		float v = w[e] * f;
		out[e] = v > 1.0f ? 1.0f : v;
	}
}

const struct predict_ops predict_temporal_ops = {
	.name = "temporal",
	.help = "decayed use of each expert at the same layer over recent tokens",
	.priv_size = sizeof(struct temporal),
	.init = temporal_init,
	.fini = temporal_fini,
	.token = temporal_token,
	.observe = temporal_observe,
	.score = temporal_score,
};
