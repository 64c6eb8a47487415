/* predict_learned.c - a sparse logistic model trained offline (moe-sim train):
 *   logit(L, b) = bias[L][b] + sum_{a in (t, L-d)} w_cur[d][L][a][b]
 *               + sum_{a in (t, L-d-1)} w_cur2[L][a][b] + sum_{a in (t, L-d-2)} w_cur3[L][a][b]
 *               + sum_{a in (t-1, L)} w_prev[L][a][b] + sum_{a in (t-1, L+1)} w_prevn[L][a][b]
 *               + sum_{a in (t-2, L)} w_prev2[L][a][b]
 *               + sum_{a < b in (t, L-1)} w_pair[L][a][b]   (when d = 1)
 *               + sum_{a in (t, L-1), c in (t, L-2)} w_xpair[L][a][c]   (d = 1)
 *               + w_tok[token][L][b] * PREDICT_TOK_STEP      (known tokens)
 *               + w_tokp[token t-1][L][b] * PREDICT_TOK_STEP (known previous token)
 * where d = L - (latest routed layer of this token), capped at PREDICT_DMAX;
 * no current-token term before the token's first layer is routed. Each term
 * adds one row of E weights, so a layer costs about 90 * E additions. */
#include "config.h"

#include <math.h>
#include <string.h>

#include "predict.h"

/* out += row, 4 lanes at a time (GCC/clang vector extension: SSE on x86-64,
 * NEON on arm64, plain code elsewhere); the build's -O2 does not vectorise
 * loops of unknown length. This is most of a score's time. */
typedef float v4f __attribute__((vector_size(16)));

static inline void add_row(float *restrict out, const float *restrict row, size_t E)
{
	size_t e = 0;
	for (; e + 4 <= E; e += 4) {
		v4f a, b;
		memcpy(&a, out + e, sizeof(a));
		memcpy(&b, row + e, sizeof(b));
		a += b;
		memcpy(out + e, &a, sizeof(a));
	}
	for (; e < E; e++)
		out[e] += row[e];
}

static inline void sgd_row(float *restrict row, const float *restrict grad, float lr, size_t E)
{
	for (size_t e = 0; e < E; e++)
		row[e] -= lr * grad[e];
}

/* Rows a score adds: 6 groups of k (current-token layers, previous tokens)
 * plus the pairs of k and the cross pairs of k x k. */
#define ROWS_MAX (6 * PREDICT_MAX_K + PREDICT_MAX_K * (PREDICT_MAX_K - 1) / 2 + PREDICT_MAX_K * PREDICT_MAX_K)

static void collect(float **rows, uint32_t *nr, float *w, size_t E, uint32_t L, const uint16_t *ids,
		    uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		rows[(*nr)++] = &w[((size_t)L * E + ids[i]) * E];
}

static void collect_pairs(const struct predict_model *m, const struct predict_stream *s, uint32_t L,
			  float **rows, uint32_t *nr)
{
	size_t E = m->n_experts;
	uint32_t last = (uint32_t)s->last_layer, n = s->cur_n[last];
	uint32_t n2 = last > 0 && m->w_xpair ? s->cur_n[last - 1] : 0;
	const uint16_t *ids = &s->cur[(size_t)last * s->k];
	const uint16_t *ids2 = last > 0 ? &s->cur[(size_t)(last - 1) * s->k] : ids;
	for (uint32_t i = 0; i < n; i++) {
		for (uint32_t j = i + 1; j < n; j++) {
			uint32_t a = ids[i] < ids[j] ? ids[i] : ids[j], b = ids[i] < ids[j] ? ids[j] : ids[i];
			rows[(*nr)++] = &m->w_pair[(((size_t)L * E + a) * E + b) * E];
		}
		for (uint32_t j = 0; j < n2; j++)
			rows[(*nr)++] = &m->w_xpair[(((size_t)L * E + ids[i]) * E + ids2[j]) * E];
	}
}

/* Pair rows of the latest routed layer (a < b) and of it with the layer
 * before (a, c): added to out, or, with grad, updated by -lr * grad
 * (training). */
void predict_learned_pairs(const struct predict_model *m, const struct predict_stream *s, uint32_t L,
			   float *out, const float *grad, float lr)
{
	float *rows[ROWS_MAX];
	uint32_t nr = 0;
	collect_pairs(m, s, L, rows, &nr);
	for (uint32_t i = 0; i < nr; i++) {
		if (grad)
			sgd_row(rows[i], grad, lr, m->n_experts);
		else
			add_row(out, rows[i], m->n_experts);
	}
}

static inline void prefetch_row(const float *row, size_t E)
{
	for (size_t e = 0; e < E; e += 16) /* one 64-byte line per 16 floats */
		__builtin_prefetch(row + e);
}

void predict_learned_logits(const struct predict_model *m, const struct predict_stream *s, uint32_t L,
			    float *out)
{
	size_t E = m->n_experts;
	uint32_t n, nr = 0;
	const uint16_t *ids;
	float *rows[ROWS_MAX];

	/* The weight tables are megabytes and a score's rows are scattered in
	 * them: list every row, ask for all of them, then add. */
	if (s->last_layer >= 0 && (uint32_t)s->last_layer < L) {
		uint32_t last = (uint32_t)s->last_layer, d = L - last;
		if (d > PREDICT_DMAX)
			d = PREDICT_DMAX;
		collect(rows, &nr, m->w_cur[d - 1], E, L, &s->cur[(size_t)last * s->k], s->cur_n[last]);
		if (last >= 1)
			collect(rows, &nr, m->w_cur2, E, L, &s->cur[(size_t)(last - 1) * s->k], s->cur_n[last - 1]);
		if (last >= 2)
			collect(rows, &nr, m->w_cur3, E, L, &s->cur[(size_t)(last - 2) * s->k], s->cur_n[last - 2]);
		if (d == 1 && m->w_pair)
			collect_pairs(m, s, L, rows, &nr);
	}
	ids = predict_stream_prev(s, 0, L, &n);
	collect(rows, &nr, m->w_prev, E, L, ids, n);
	if (L + 1 < s->n_layers) {
		ids = predict_stream_prev(s, 0, L + 1, &n);
		collect(rows, &nr, m->w_prevn, E, L, ids, n);
	}
	ids = predict_stream_prev(s, 1, L, &n);
	collect(rows, &nr, m->w_prev2, E, L, ids, n);
	for (uint32_t i = 0; i < nr; i++)
		prefetch_row(rows[i], E);
	memcpy(out, &m->bias[(size_t)L * E], E * sizeof(float));
	for (uint32_t i = 0; i < nr; i++)
		add_row(out, rows[i], E);
	if (m->w_tok) {
		int64_t row = predict_model_tok_find(m, s->token_key);
		if (row >= 0) {
			const int8_t *w = &m->w_tok[((size_t)row * m->n_layers + L) * E];
			for (size_t e = 0; e < E; e++)
				out[e] += (float)w[e] * PREDICT_TOK_STEP;
		}
	}
	if (m->w_tokp) {
		int64_t row = predict_model_tok_find(m, s->prev_key);
		if (row >= 0) {
			const int8_t *w = &m->w_tokp[((size_t)row * m->n_layers + L) * E];
			for (size_t e = 0; e < E; e++)
				out[e] += (float)w[e] * PREDICT_TOK_STEP;
		}
	}
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
