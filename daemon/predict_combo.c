/* predict_combo.c - the combiner: per layer, a logistic mix of the component
 * predictors' log-odds, z = c0 + sum_i c_i * logit(p_i), with the weights
 * fitted on training prompts the components were not trained on. */
#include "config.h"

#include <math.h>
#include <stdlib.h>

#include "predict.h"

static const char *const combo_parts[PREDICT_COMBO_N] = {
	"temporal", "coact", "tokenid", "tracematch", "learned",
};

struct combo {
	struct predictor *part[PREDICT_COMBO_N];
};

static void combo_fini(struct predictor *p)
{
	struct combo *c = p->priv;
	for (int i = 0; i < PREDICT_COMBO_N; i++)
		predict_destroy(c->part[i]);
}

static int combo_init(struct predictor *p, struct moe_error *err)
{
	struct combo *c = p->priv;
	for (int i = 0; i < PREDICT_COMBO_N; i++) {
		int rc = predict_create_on(combo_parts[i], p->s, p->model, &c->part[i], err);
		if (rc < 0) {
			combo_fini(p);
			return rc;
		}
	}
	return 0;
}

static void combo_token(struct predictor *p)
{
	struct combo *c = p->priv;
	for (int i = 0; i < PREDICT_COMBO_N; i++)
		if (c->part[i]->ops->token)
			c->part[i]->ops->token(c->part[i]);
}

static void combo_observe(struct predictor *p, uint32_t L)
{
	struct combo *c = p->priv;
	for (int i = 0; i < PREDICT_COMBO_N; i++)
		if (c->part[i]->ops->observe)
			c->part[i]->ops->observe(c->part[i], L);
}

/* log(x) for x in [1e-4, 1]: exponent plus a quartic for log2 of the
 * mantissa (max error ~1e-4), 5-10x cheaper than logf. Training goes through
 * the same function, so the combiner's weights fit it exactly. */
static inline float fast_log(float x)
{
	union {
		float f;
		uint32_t i;
	} v = { .f = x };
	float e = (float)((int32_t)(v.i >> 23) - 127);
	v.i = (v.i & 0x7FFFFFu) | 0x3F800000u;
	float m = v.f;
	float p = -1.7417939f + (2.8212026f + (-1.4699568f + (0.44717955f - 0.056570851f * m) * m) * m) * m;
	return (e + p) * 0.69314718f;
}

static inline float logit_clamped(float x)
{
	if (x < 1e-4f)
		x = 1e-4f;
	else if (x > 1.0f - 1e-4f)
		x = 1.0f - 1e-4f;
	return fast_log(x) - fast_log(1.0f - x);
}

void predict_combo_features(struct predictor *p, uint32_t L, float (*feat)[PREDICT_MAX_EXPERTS])
{
	struct combo *c = p->priv;
	uint32_t E = p->s->n_experts;
	for (int i = 0; i < PREDICT_COMBO_N - 1; i++) {
		c->part[i]->ops->score(c->part[i], L, feat[i]);
		for (uint32_t e = 0; e < E; e++)
			feat[i][e] = logit_clamped(feat[i][e]);
	}
	/* The learned model's log-odds directly (no sigmoid and back). */
	float *f = feat[PREDICT_COMBO_N - 1];
	predict_learned_logits(p->model, p->s, L, f);
	for (uint32_t e = 0; e < E; e++)
		f[e] = f[e] < -9.21f ? -9.21f : f[e] > 9.21f ? 9.21f : f[e];
}

static void combo_score(struct predictor *p, uint32_t L, float *out)
{
	float feat[PREDICT_COMBO_N][PREDICT_MAX_EXPERTS];
	const float *w = &p->model->combo[(size_t)L * (PREDICT_COMBO_N + 1)];
	uint32_t E = p->s->n_experts;

	predict_combo_features(p, L, feat);
	for (uint32_t e = 0; e < E; e++) {
		float z = w[PREDICT_COMBO_N];
		for (int i = 0; i < PREDICT_COMBO_N; i++)
			z += w[i] * feat[i][e];
		out[e] = 1.0f / (1.0f + expf(-z));
	}
}

const struct predict_ops predict_combo_ops = {
	.name = "combo",
	.help = "logistic mix of all predictors, weights fitted on held-out training prompts",
	.needs_model = true,
	.priv_size = sizeof(struct combo),
	.init = combo_init,
	.fini = combo_fini,
	.token = combo_token,
	.observe = combo_observe,
	.score = combo_score,
};
