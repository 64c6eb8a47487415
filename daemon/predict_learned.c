/* predict_learned.c - a sparse logistic model trained offline (moe-sim train):
 *   logit(L, b) = bias[L][b] + sum_{a in (t, L-d)} w_cur[d][L][a][b]
 *               + sum_{a in (t, L-d-1)} w_cur2[L][a][b] + sum_{a in (t, L-d-2)} w_cur3[L][a][b]
 *               + sum_{a in (t-1, L)} w_prev[L][a][b] + sum_{a in (t-1, L+1)} w_prevn[L][a][b]
 *               + sum_{a in (t-2, L)} w_prev2[L][a][b]
 *               + sum_{a < b in (t, L-1)} w_pair[L][a][b]   (when d = 1)
 * where d = L - (latest routed layer of this token), capped at PREDICT_DMAX;
 * no current-token term before the token's first layer is routed. Each term
 * adds one row of E weights, so a layer costs about 30 * E additions. */
#include "config.h"

#include <math.h>
#include <string.h>

#include "predict.h"

static void add_rows(float *out, const float *w, size_t E, uint32_t L, const uint16_t *ids, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++) {
		const float *row = &w[((size_t)L * E + ids[i]) * E];
		for (size_t e = 0; e < E; e++)
			out[e] += row[e];
	}
}

/* Pair (a < b) rows of the latest routed layer: added to out, or, with
 * grad, updated by -lr * grad (training). */
void predict_learned_pairs(const struct predict_model *m, const struct predict_stream *s, uint32_t L,
			   float *out, const float *grad, float lr)
{
	size_t E = m->n_experts;
	uint32_t last = (uint32_t)s->last_layer, n = s->cur_n[last];
	const uint16_t *ids = &s->cur[(size_t)last * s->k];
	for (uint32_t i = 0; i < n; i++)
		for (uint32_t j = i + 1; j < n; j++) {
			uint32_t a = ids[i] < ids[j] ? ids[i] : ids[j], b = ids[i] < ids[j] ? ids[j] : ids[i];
			float *row = &m->w_pair[(((size_t)L * E + a) * E + b) * E];
			if (grad)
				for (size_t e = 0; e < E; e++)
					row[e] -= lr * grad[e];
			else
				for (size_t e = 0; e < E; e++)
					out[e] += row[e];
		}
}

void predict_learned_logits(const struct predict_model *m, const struct predict_stream *s, uint32_t L,
			    float *out)
{
	size_t E = m->n_experts;
	uint32_t n;
	const uint16_t *ids;

	memcpy(out, &m->bias[(size_t)L * E], E * sizeof(float));
	if (s->last_layer >= 0 && (uint32_t)s->last_layer < L) {
		uint32_t last = (uint32_t)s->last_layer, d = L - last;
		if (d > PREDICT_DMAX)
			d = PREDICT_DMAX;
		add_rows(out, m->w_cur[d - 1], E, L, &s->cur[(size_t)last * s->k], s->cur_n[last]);
		if (last >= 1)
			add_rows(out, m->w_cur2, E, L, &s->cur[(size_t)(last - 1) * s->k], s->cur_n[last - 1]);
		if (last >= 2)
			add_rows(out, m->w_cur3, E, L, &s->cur[(size_t)(last - 2) * s->k], s->cur_n[last - 2]);
		if (d == 1 && m->w_pair)
			predict_learned_pairs(m, s, L, out, NULL, 0.0f);
	}
	ids = predict_stream_prev(s, 0, L, &n);
	add_rows(out, m->w_prev, E, L, ids, n);
	if (L + 1 < s->n_layers) {
		ids = predict_stream_prev(s, 0, L + 1, &n);
		add_rows(out, m->w_prevn, E, L, ids, n);
	}
	ids = predict_stream_prev(s, 1, L, &n);
	add_rows(out, m->w_prev2, E, L, ids, n);
}

float predict_learned_logit(const struct predict_model *m, const struct predict_stream *s, uint32_t L,
			    uint32_t expert)
{
	float out[PREDICT_MAX_EXPERTS];
	predict_learned_logits(m, s, L, out);
	return out[expert];
}

static void learned_score(struct predictor *p, uint32_t L, float *out)
{
	predict_learned_logits(p->model, p->s, L, out);
	for (uint32_t e = 0; e < p->s->n_experts; e++)
		out[e] = 1.0f / (1.0f + expf(-out[e]));
}

const struct predict_ops predict_learned_ops = {
	.name = "learned",
	.help = "sparse logistic model over routing history, trained by moe-sim train",
	.needs_model = true,
	.score = learned_score,
};
