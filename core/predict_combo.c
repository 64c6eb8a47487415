/* predict_combo.c - the combiner: per look-ahead distance and layer, a
 * logistic model over features of the component predictors' log-odds,
 * z = c0 + sum_i c_i * f_i, with the weights fitted on training prompts the
 * components were not trained on. The features are the log-odds themselves
 * plus hinge terms (so each component gets a piecewise-linear calibration:
 * the learned model and the token table are overconfident, and not uniformly
 * so), the token table's deviation from the prior (zero for unknown tokens),
 * the previous token's use of the expert and the stream's own recent
 * frequency of it at the layer. The output is a calibrated
 * probability, so a prefetch candidate's score and a resident victim's score
 * are comparable in the scheduler's gain rule. */
#include "config.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "predict.h"

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

/* In place, x[e] = logit_clamped(x[e]), 4 lanes at a time (GCC/clang vector
 * extension; the same arithmetic as fast_log, so the same values). */
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

static inline v4f fast_log4(v4f x)
{
	v4i b = (v4i)x;
	v4f e = __builtin_convertvector((b >> 23) - 127, v4f);
	v4f m = (v4f)((b & 0x7FFFFF) | 0x3F800000);
	v4f p = -1.7417939f + (2.8212026f + (-1.4699568f + (0.44717955f - 0.056570851f * m) * m) * m) * m;
	return (e + p) * 0.69314718f;
}

static void logit_row(float *x, uint32_t E)
{
	const v4f lo = { 1e-4f, 1e-4f, 1e-4f, 1e-4f }, hi = 1.0f - lo;
	uint32_t e = 0;
	for (; e + 4 <= E; e += 4) {
		v4f v;
		memcpy(&v, x + e, sizeof(v));
		v4i below = v < lo, above = v > hi;
		v = (v4f)(((v4i)v & ~below) | ((v4i)lo & below));
		v = (v4f)(((v4i)v & ~above) | ((v4i)hi & above));
		v = fast_log4(v) - fast_log4(1.0f - v);
		memcpy(x + e, &v, sizeof(v));
	}
	for (; e < E; e++)
		x[e] = logit_clamped(x[e]);
}

static const char *const combo_parts[PREDICT_COMBO_N] = {
	"temporal", "coact", "tokenid", "tracematch", "learned",
};

/* The stream's own expert frequencies per layer (the prompt's topic:
 * experts specialise), with a memory of ~1 / (1 - keep) = 20 tokens (a
 * second one of ~100 tokens added nothing on held-out prompts). */
#define COMBO_NFREQ 1
static const float combo_keep[COMBO_NFREQ] = { 0.95f };
_Static_assert(13 + COMBO_NFREQ == PREDICT_COMBO_F, "combiner feature count");

struct combo {
	struct predictor *part[PREDICT_COMBO_N];
	float *freq[COMBO_NFREQ];  /* [L][E] decayed uses in this stream */
	float *seen[COMBO_NFREQ];  /* [L] decayed tokens routed */
	float *prior_logit;        /* [L][E] of the model's tok_prior */
};

static void combo_fini(struct predictor *p)
{
	struct combo *c = p->priv;
	for (int i = 0; i < PREDICT_COMBO_N; i++)
		predict_destroy(c->part[i]);
	for (int i = 0; i < COMBO_NFREQ; i++) {
		free(c->freq[i]);
		free(c->seen[i]);
	}
	free(c->prior_logit);
}

static int combo_init(struct predictor *p, struct moe_error *err)
{
	struct combo *c = p->priv;
	size_t LE = (size_t)p->s->n_layers * p->s->n_experts;
	bool ok = true;
	for (int i = 0; i < COMBO_NFREQ; i++) {
		c->freq[i] = calloc(LE, sizeof(float));
		c->seen[i] = calloc(p->s->n_layers, sizeof(float));
		ok = ok && c->freq[i] && c->seen[i];
	}
	c->prior_logit = malloc(LE * sizeof(float));
	if (!ok || !c->prior_logit) {
		combo_fini(p);
		return moe_error_set(err, -ENOMEM, "combo: out of memory");
	}
	for (size_t j = 0; j < LE; j++)
		c->prior_logit[j] = logit_clamped(p->model->tok_prior[j]);
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
	if (p->s->n_tokens <= 1) { /* a fresh stream */
		for (int i = 0; i < COMBO_NFREQ; i++) {
			memset(c->freq[i], 0, (size_t)p->s->n_layers * p->s->n_experts * sizeof(float));
			memset(c->seen[i], 0, p->s->n_layers * sizeof(float));
		}
	}
	for (int i = 0; i < PREDICT_COMBO_N; i++)
		if (c->part[i]->ops->token)
			c->part[i]->ops->token(c->part[i]);
}

static void combo_observe(struct predictor *p, uint32_t L)
{
	struct combo *c = p->priv;
	const struct predict_stream *s = p->s;
	const uint16_t *r = &s->cur[(size_t)L * s->k];
	for (int i = 0; i < COMBO_NFREQ; i++) {
		float *f = &c->freq[i][(size_t)L * s->n_experts];
		for (uint32_t e = 0; e < s->n_experts; e++)
			f[e] *= combo_keep[i];
		for (uint32_t j = 0; j < s->cur_n[L]; j++)
			f[r[j]] += 1.0f;
		c->seen[i][L] = c->seen[i][L] * combo_keep[i] + 1.0f;
	}
	for (int i = 0; i < PREDICT_COMBO_N; i++)
		if (c->part[i]->ops->observe)
			c->part[i]->ops->observe(c->part[i], L);
}

uint32_t predict_combo_bucket(const struct predict_stream *s, uint32_t L)
{
	if (s->last_layer < 0)
		return 0;
	if ((uint32_t)s->last_layer >= L)
		return 1;
	uint32_t d = L - (uint32_t)s->last_layer;
	return d < PREDICT_COMBO_D - 1 ? d : PREDICT_COMBO_D - 1;
}

static inline float relu(float x)
{
	return x > 0.0f ? x : 0.0f;
}

uint32_t predict_combo_features(struct predictor *p, uint32_t L, float (*feat)[PREDICT_MAX_EXPERTS])
{
	struct combo *c = p->priv;
	const struct predict_model *m = p->model;
	const struct predict_stream *s = p->s;
	uint32_t E = s->n_experts, n;

	for (int i = 0; i < PREDICT_COMBO_N - 1; i++) {
		c->part[i]->ops->score(c->part[i], L, feat[i]);
		logit_row(feat[i], E);
	}
	/* The learned model's log-odds directly (no sigmoid and back). */
	float *f = feat[PREDICT_COMBO_N - 1];
	predict_learned_logits(m, s, L, f);
	for (uint32_t e = 0; e < E; e++)
		f[e] = f[e] < -9.21f ? -9.21f : f[e] > 9.21f ? 9.21f : f[e];
	const float *tp = feat[1], *tt = feat[2], *tl = feat[4];
	for (uint32_t e = 0; e < E; e++) {
		feat[5][e] = relu(tl[e] + 3.0f);
		feat[6][e] = relu(tl[e] + 1.0f);
		feat[7][e] = relu(tl[e] - 1.0f);
		feat[8][e] = relu(tt[e] + 2.0f);
		feat[9][e] = relu(tt[e]);
		feat[10][e] = relu(tp[e] + 2.0f);
		feat[12][e] = 0.0f;
	}
	const float *prior = &m->tok_prior[(size_t)L * E], *plogit = &c->prior_logit[(size_t)L * E];
	if (predict_model_tok_find(m, s->token_key) >= 0) {
		for (uint32_t e = 0; e < E; e++)
			feat[11][e] = tt[e] - plogit[e];
	} else {
		for (uint32_t e = 0; e < E; e++)
			feat[11][e] = 0.0f;
	}
	const uint16_t *ids = predict_stream_prev(s, 0, L, &n);
	for (uint32_t i = 0; i < n; i++)
		feat[12][ids[i]] = 1.0f;
	/* The stream's own frequencies, 2 pseudo-tokens at the training prior. */
	for (int i = 0; i < COMBO_NFREQ; i++) {
		const float *fr = &c->freq[i][(size_t)L * E];
		float inv = 1.0f / (c->seen[i][L] + 2.0f), *out = feat[13 + i];
		for (uint32_t e = 0; e < E; e++)
			out[e] = (fr[e] + 2.0f * prior[e]) * inv;
		logit_row(out, E);
	}
	return predict_combo_bucket(s, L);
}

static void combo_score(struct predictor *p, uint32_t L, float *out)
{
	float feat[PREDICT_COMBO_F][PREDICT_MAX_EXPERTS];
	const size_t W = PREDICT_COMBO_F + 1;
	uint32_t E = p->s->n_experts, b = predict_combo_features(p, L, feat);
	const float *w = &p->model->combo[((size_t)b * p->s->n_layers + L) * W];

	/* z = bias + sum_i w_i * feat_i, a feature row at a time (4 lanes). */
	for (uint32_t e = 0; e < E; e++)
		out[e] = w[PREDICT_COMBO_F];
	for (int i = 0; i < PREDICT_COMBO_F; i++) {
		const float *f = feat[i];
		uint32_t e = 0;
		for (; e + 4 <= E; e += 4) {
			v4f z, x;
			memcpy(&z, out + e, sizeof(z));
			memcpy(&x, f + e, sizeof(x));
			z += w[i] * x;
			memcpy(out + e, &z, sizeof(z));
		}
		for (; e < E; e++)
			out[e] += w[i] * f[e];
	}
	for (uint32_t e = 0; e < E; e++)
		out[e] = 1.0f / (1.0f + expf(-out[e]));
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
