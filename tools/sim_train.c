/* sim_train.c - `moe-sim train`: fits the predictor model on training traces.
 *
 *   traces [0, n_fit)   token table, layer priors, trace-matching centroids
 *                       (cosine k-means over per-prompt activation matrices)
 *                       and the sparse logistic model with its per-token
 *                       offsets (SGD, log loss);
 *   traces [n_fit, n)   the combiner's weights per distance bucket and layer,
 *                       by Adagrad on its features, so the mix is fitted
 *                       (calibrated) on prompts the components did not see.
 * Deterministic: no random numbers, traces visited in the given order.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sim.h"

void sim_train_opts_default(struct sim_train_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->epochs = 2;
	/* Small steps keep the rare rows (pairs, token offsets) near zero: on
	 * prompts 631-700, 0.015-0.025 beat 0.035 and 0.05 (0.12 was worse). */
	o->lr = 0.02;
	o->n_eam = 32;
	o->min_token = 3;
}

static uint32_t key_of(const struct trace *tr, uint32_t t)
{
	return predict_token_key(tr->token && tr->token[t] ? tr->token[t] : "");
}

/* A small open-addressed counter of token keys. */
struct keycount {
	uint32_t *key, *n;
	uint32_t slots;
};

static int kc_init(struct keycount *kc, uint32_t slots)
{
	kc->slots = slots;
	kc->key = calloc(slots, 4);
	kc->n = calloc(slots, 4);
	return kc->key && kc->n ? 0 : -ENOMEM;
}

static uint32_t *kc_get(struct keycount *kc, uint32_t key)
{
	uint32_t mask = kc->slots - 1;
	for (uint32_t j = (key * 2654435761u) & mask;; j = (j + 1) & mask) {
		if (kc->key[j] == key)
			return &kc->n[j];
		if (kc->key[j] == 0) {
			kc->key[j] = key;
			return &kc->n[j];
		}
	}
}

static int train_tokens(struct predict_model *m, struct trace *const *tr, uint32_t n_fit, uint32_t min_token,
			struct moe_error *err)
{
	uint32_t L = m->n_layers, E = m->n_experts;
	uint64_t tokens = 0;
	struct keycount kc;
	double *prior = calloc((size_t)L * E, sizeof(double));
	uint16_t *cnt = NULL;

	for (uint32_t i = 0; i < n_fit; i++)
		tokens += tr[i]->n_tokens;
	uint32_t slots = 1024;
	while (slots < 2 * tokens + 2 && slots < (1u << 26))
		slots <<= 1;
	if (!prior || kc_init(&kc, slots) < 0) {
		free(prior);
		return moe_error_set(err, -ENOMEM, "train: out of memory");
	}
	for (uint32_t i = 0; i < n_fit; i++)
		for (uint32_t t = 0; t < tr[i]->n_tokens; t++) {
			uint32_t *c = kc_get(&kc, key_of(tr[i], t));
			(*c)++;
			for (uint32_t l = 0; l < L; l++) {
				const uint16_t *r = trace_row(tr[i], t, l);
				for (uint32_t j = 0; j < tr[i]->count[(size_t)t * L + l]; j++)
					prior[(size_t)l * E + r[j]] += 1.0;
			}
		}
	for (size_t j = 0; j < (size_t)L * E; j++)
		m->tok_prior[j] = tokens ? (float)(prior[j] / (double)tokens) : 0.0f;
	free(prior);

	/* Keep the tokens seen often enough; the table is half full at most. */
	uint32_t keep = 0;
	for (uint32_t j = 0; j < kc.slots; j++)
		if (kc.key[j] && kc.n[j] >= min_token)
			keep++;
	uint32_t tslots = 16;
	while (tslots < 2 * keep)
		tslots <<= 1;
	free(m->tok_key);
	free(m->tok_total);
	free(m->tok_freq);
	free(m->w_tok);
	free(m->w_tokp);
	m->tok_slots = tslots;
	m->tok_key = calloc(tslots, 4);
	m->tok_total = calloc(tslots, 2);
	m->tok_freq = calloc((size_t)tslots * L * E, 1);
	m->w_tok = calloc((size_t)tslots * L * E, 1);
	m->w_tokp = calloc((size_t)tslots * L * E, 1);
	cnt = calloc((size_t)tslots * L * E, sizeof(*cnt));
	if (!m->tok_key || !m->tok_total || !m->tok_freq || !m->w_tok || !m->w_tokp || !cnt) {
		free(cnt);
		free(kc.key);
		free(kc.n);
		return moe_error_set(err, -ENOMEM, "train: out of memory (token table)");
	}
	for (uint32_t j = 0; j < kc.slots; j++) {
		if (!kc.key[j] || kc.n[j] < min_token)
			continue;
		uint32_t mask = tslots - 1, h = (kc.key[j] * 2654435761u) & mask;
		while (m->tok_key[h])
			h = (h + 1) & mask;
		m->tok_key[h] = kc.key[j];
	}
	free(kc.key);
	free(kc.n);
	for (uint32_t i = 0; i < n_fit; i++)
		for (uint32_t t = 0; t < tr[i]->n_tokens; t++) {
			int64_t row = predict_model_tok_find(m, key_of(tr[i], t));
			if (row < 0)
				continue;
			if (m->tok_total[row] < UINT16_MAX)
				m->tok_total[row]++;
			for (uint32_t l = 0; l < L; l++) {
				const uint16_t *r = trace_row(tr[i], t, l);
				uint16_t *c = &cnt[((size_t)row * L + l) * E];
				for (uint32_t j = 0; j < tr[i]->count[(size_t)t * L + l]; j++)
					if (c[r[j]] < UINT16_MAX)
						c[r[j]]++;
			}
		}
	for (uint32_t row = 0; row < tslots; row++) {
		if (!m->tok_key[row] || !m->tok_total[row])
			continue;
		for (size_t j = 0; j < (size_t)L * E; j++) {
			double f = (double)cnt[(size_t)row * L * E + j] / m->tok_total[row];
			m->tok_freq[(size_t)row * L * E + j] = (uint8_t)lrint(f > 1.0 ? 255.0 : 255.0 * f);
		}
	}
	free(cnt);
	return 0;
}

static int train_eam(struct predict_model *m, struct trace *const *tr, uint32_t n_fit, struct moe_error *err)
{
	uint32_t L = m->n_layers, E = m->n_experts, K = m->n_eam;
	size_t LE = (size_t)L * E;
	float *x;
	uint32_t *assign;
	double *sum;
	uint32_t *members;

	if (K == 0 || n_fit == 0)
		return 0;
	x = calloc((size_t)n_fit * LE, sizeof(float));
	assign = calloc(n_fit, sizeof(uint32_t));
	sum = calloc((size_t)K * LE, sizeof(double));
	members = calloc(K, sizeof(uint32_t));
	if (!x || !assign || !sum || !members) {
		free(x);
		free(assign);
		free(sum);
		free(members);
		return moe_error_set(err, -ENOMEM, "train: out of memory (activation matrices)");
	}
	/* Per prompt: activation frequency per token. */
	for (uint32_t i = 0; i < n_fit; i++) {
		float *xi = &x[(size_t)i * LE];
		for (uint32_t t = 0; t < tr[i]->n_tokens; t++)
			for (uint32_t l = 0; l < L; l++) {
				const uint16_t *r = trace_row(tr[i], t, l);
				for (uint32_t j = 0; j < tr[i]->count[(size_t)t * L + l]; j++)
					xi[(size_t)l * E + r[j]] += 1.0f;
			}
		if (tr[i]->n_tokens)
			for (size_t j = 0; j < LE; j++)
				xi[j] /= (float)tr[i]->n_tokens;
	}
	/* Cosine k-means, centroids seeded from evenly spaced prompts. */
	for (uint32_t c = 0; c < K; c++)
		memcpy(&m->eam[c * LE], &x[(size_t)((uint64_t)c * n_fit / K) * LE], LE * sizeof(float));
	for (int it = 0; it < 8; it++) {
		double cn[4096];
		for (uint32_t c = 0; c < K && c < 4096; c++) {
			double s2 = 0;
			for (size_t j = 0; j < LE; j++)
				s2 += (double)m->eam[c * LE + j] * m->eam[c * LE + j];
			cn[c] = sqrt(s2) + 1e-12;
		}
		for (uint32_t i = 0; i < n_fit; i++) {
			double best = -2;
			for (uint32_t c = 0; c < K && c < 4096; c++) {
				double d = 0;
				for (size_t j = 0; j < LE; j++)
					d += (double)x[(size_t)i * LE + j] * m->eam[c * LE + j];
				d /= cn[c];
				if (d > best) {
					best = d;
					assign[i] = c;
				}
			}
		}
		memset(sum, 0, (size_t)K * LE * sizeof(double));
		memset(members, 0, K * sizeof(uint32_t));
		for (uint32_t i = 0; i < n_fit; i++) {
			members[assign[i]]++;
			for (size_t j = 0; j < LE; j++)
				sum[assign[i] * LE + j] += x[(size_t)i * LE + j];
		}
		for (uint32_t c = 0; c < K; c++)
			if (members[c])
				for (size_t j = 0; j < LE; j++)
					m->eam[c * LE + j] = (float)(sum[c * LE + j] / members[c]);
	}
	free(x);
	free(assign);
	free(sum);
	free(members);
	return 0;
}

#define LEARNED_LR_DECAY 10.0

static void sgd_rows(float *w, size_t E, uint32_t L, const uint16_t *ids, uint32_t n, const float *g, float lr)
{
	for (uint32_t i = 0; i < n; i++) {
		float *row = &w[((size_t)L * E + ids[i]) * E];
		for (size_t e = 0; e < E; e++)
			row[e] -= lr * g[e];
	}
}

static int train_learned(struct predict_model *m, struct trace *const *tr, uint32_t n_fit,
			 const struct sim_train_opts *o, struct moe_error *err)
{
	uint32_t L = m->n_layers, E = m->n_experts;
	struct predictor *p;
	float z[PREDICT_MAX_EXPERTS], g[PREDICT_MAX_EXPERTS];
	uint8_t y[PREDICT_MAX_EXPERTS];
	int rc;

	/* Start from the layer priors so early steps are sane. */
	for (size_t j = 0; j < (size_t)L * E; j++) {
		double f = m->tok_prior[j] > 1e-4f ? m->tok_prior[j] : 1e-4;
		m->bias[j] = (float)log(f / (1.0 - f));
	}
	/* The token offsets train in float, outside the model (whose w_tok is
	 * int8), and are quantised at the end. */
	size_t LE = (size_t)L * E;
	float *wt = calloc((size_t)m->tok_slots * LE, sizeof(float));
	float *wtp = calloc((size_t)m->tok_slots * LE, sizeof(float));
	int8_t *w_tok = m->w_tok, *w_tokp = m->w_tokp;
	if (!wt || !wtp) {
		free(wt);
		free(wtp);
		return moe_error_set(err, -ENOMEM, "train: out of memory (token offsets)");
	}
	/* Any predictor gives us a stream that tracks the history. */
	rc = predict_create("temporal", L, E, m->k, NULL, &p, err);
	if (rc < 0) {
		free(wt);
		free(wtp);
		return rc;
	}
	struct predict_stream *s = p->s;
	m->w_tok = NULL;
	m->w_tokp = NULL;
	for (uint32_t ep = 0; ep < o->epochs; ep++) {
		/* One pass at the full step, then much smaller steps that settle
		 * the weights: on held-out prompts this beats lr / (1 + ep) and
		 * a larger or smaller base step. */
		float lr = (float)(o->lr / (1.0 + LEARNED_LR_DECAY * ep));
		double loss = 0;
		uint64_t ns = 0;
		for (uint32_t i = 0; i < n_fit; i++) {
			const struct trace *t_ = tr[i];
			predict_reset(p);
			for (uint32_t t = 0; t < t_->n_tokens; t++) {
				predict_token(p, key_of(t_, t));
				int64_t trow = predict_model_tok_find(m, s->token_key);
				int64_t prow = predict_model_tok_find(m, s->prev_key);
				for (uint32_t l = 0; l < L; l++) {
					uint32_t cnt = t_->count[(size_t)t * L + l];
					const uint16_t *r = trace_row(t_, t, l);
					/* Two steps per token-layer: one at the next layer
					 * (d = 1, the one a prefetch plan sees last, and the
					 * only one with pair features), one at a rotating
					 * longer distance; d = DMAX + 1 stands for "no layer
					 * of this token routed yet". One step at a rotating
					 * distance (d = 1 half of the time) learned less per
					 * pass: the combiner's log loss at the next layer
					 * was 9.62 against 9.48 (doc/placement.md). */
					static const uint32_t rot[4] = { 2, 3, PREDICT_DMAX + 1, PREDICT_DMAX + 1 };
					for (uint32_t pass = 0; pass < 2; pass++) {
						uint32_t d = pass == 0 ? 1 : rot[(t * 7 + l) % 4];
						int32_t saved = s->last_layer;
						s->last_layer = d > PREDICT_DMAX || (int32_t)l - (int32_t)d < 0 ? -1 : (int32_t)(l - d);
						predict_learned_logits(m, s, l, z);
						float *tw = trow >= 0 ? &wt[(size_t)trow * LE + (size_t)l * E] : NULL;
						float *pw = prow >= 0 ? &wtp[(size_t)prow * LE + (size_t)l * E] : NULL;
						if (tw)
							for (uint32_t e = 0; e < E; e++)
								z[e] += tw[e];
						if (pw)
							for (uint32_t e = 0; e < E; e++)
								z[e] += pw[e];
						memset(y, 0, E);
						for (uint32_t j = 0; j < cnt; j++)
							y[r[j]] = 1;
						for (uint32_t e = 0; e < E; e++) {
							float pr = 1.0f / (1.0f + expf(-z[e]));
							g[e] = pr - (float)y[e];
							loss -= y[e] ? log(pr + 1e-9) : log(1 - pr + 1e-9);
						}
						ns++;
						for (uint32_t e = 0; e < E; e++)
							m->bias[(size_t)l * E + e] -= lr * g[e];
						if (tw)
							for (uint32_t e = 0; e < E; e++)
								tw[e] -= lr * g[e];
						if (pw)
							for (uint32_t e = 0; e < E; e++)
								pw[e] -= lr * g[e];
						if (s->last_layer >= 0) {
							uint32_t last = (uint32_t)s->last_layer, dd = l - last;
							if (dd > PREDICT_DMAX)
								dd = PREDICT_DMAX;
							sgd_rows(m->w_cur[dd - 1], E, l, &s->cur[(size_t)last * s->k], s->cur_n[last], g, lr);
							if (last >= 1)
								sgd_rows(m->w_cur2, E, l, &s->cur[(size_t)(last - 1) * s->k],
									 s->cur_n[last - 1], g, lr);
							if (last >= 2)
								sgd_rows(m->w_cur3, E, l, &s->cur[(size_t)(last - 2) * s->k],
									 s->cur_n[last - 2], g, lr);
							if (l - last == 1 && m->w_pair)
								predict_learned_pairs(m, s, l, NULL, g, lr);
						}
						uint32_t n;
						const uint16_t *ids = predict_stream_prev(s, 0, l, &n);
						sgd_rows(m->w_prev, E, l, ids, n, g, lr);
						if (l + 1 < L) {
							ids = predict_stream_prev(s, 0, l + 1, &n);
							sgd_rows(m->w_prevn, E, l, ids, n, g, lr);
						}
						ids = predict_stream_prev(s, 1, l, &n);
						sgd_rows(m->w_prev2, E, l, ids, n, g, lr);
						s->last_layer = saved;
					}
					predict_observe(p, l, r, cnt);
				}
			}
		}
		if (o->verbose)
			fprintf(stderr, "train: learned epoch %u: log loss %.4f per step\n", ep + 1,
				ns ? loss / (double)ns : 0.0);
	}
	predict_destroy(p);
	m->w_tok = w_tok;
	m->w_tokp = w_tokp;
	for (size_t j = 0; j < (size_t)m->tok_slots * LE; j++) {
		float q = wt[j] / PREDICT_TOK_STEP, qp = wtp[j] / PREDICT_TOK_STEP;
		m->w_tok[j] = (int8_t)lrintf(q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q);
		m->w_tokp[j] = (int8_t)lrintf(qp > 127.0f ? 127.0f : qp < -127.0f ? -127.0f : qp);
	}
	free(wt);
	free(wtp);
	return 0;
}

/* The combiner: per (distance bucket, layer) logistic regression on the
 * features of predict_combo_features, fitted by Adagrad on prompts the
 * components did not see. Each token-layer is fitted at one look-ahead
 * distance, rotating (the next layer half of the time, as a look-ahead-1 plan
 * sees it; also 2, 3-5 layers ahead and before the token's first layer). */
static int train_combo(struct predict_model *m, struct trace *const *tr, uint32_t from, uint32_t n,
		       const struct sim_train_opts *o, struct moe_error *err)
{
	const uint32_t L = m->n_layers, E = m->n_experts, F = PREDICT_COMBO_F, W = PREDICT_COMBO_F + 1;
	const size_t nw = (size_t)PREDICT_COMBO_D * L * W;
	static float feat[PREDICT_COMBO_F][PREDICT_MAX_EXPERTS];
	struct predictor *p;
	double *acc, loss[PREDICT_COMBO_D] = { 0 };
	uint64_t cnt_b[PREDICT_COMBO_D] = { 0 };
	int rc;

	/* Start: the learned model alone (the strongest single component). */
	for (size_t r = 0; r < (size_t)PREDICT_COMBO_D * L; r++) {
		memset(&m->combo[r * W], 0, W * sizeof(float));
		m->combo[r * W + PREDICT_COMBO_N - 1] = 1.0f;
	}
	if (from >= n)
		return 0;
	acc = calloc(nw, sizeof(double));
	if (!acc)
		return moe_error_set(err, -ENOMEM, "train: out of memory (combiner)");
	rc = predict_create("combo", L, E, m->k, m, &p, err);
	if (rc < 0) {
		free(acc);
		return rc;
	}
	struct predict_stream *s = p->s;
	for (uint32_t ep = 0; ep < 2; ep++) {
		const float lr = 0.05f;
		memset(loss, 0, sizeof(loss));
		memset(cnt_b, 0, sizeof(cnt_b));
		for (uint32_t i = from; i < n; i++) {
			const struct trace *t_ = tr[i];
			predict_reset(p);
			for (uint32_t t = 0; t < t_->n_tokens; t++) {
				predict_token(p, key_of(t_, t));
				for (uint32_t l = 0; l < L; l++) {
					uint32_t cnt = t_->count[(size_t)t * L + l];
					const uint16_t *r = trace_row(t_, t, l);
					uint8_t y[PREDICT_MAX_EXPERTS] = { 0 };
					double gw[PREDICT_COMBO_F + 1] = { 0 };
					uint32_t ph = (t * 7 + l) % 6, d = ph < 3 ? 1 : ph == 3 ? 2 : ph == 4 ? 3 + t % 3 : 0;
					int32_t saved = s->last_layer;
					s->last_layer = d == 0 || d > l ? -1 : (int32_t)(l - d);
					uint32_t b = predict_combo_features(p, l, feat);
					float *w = &m->combo[((size_t)b * L + l) * W];
					double *a = &acc[((size_t)b * L + l) * W];
					for (uint32_t j = 0; j < cnt; j++)
						y[r[j]] = 1;
					for (uint32_t e = 0; e < E; e++) {
						float z = w[F];
						for (uint32_t c = 0; c < F; c++)
							z += w[c] * feat[c][e];
						float pr = 1.0f / (1.0f + expf(-z));
						float g = pr - (float)y[e];
						loss[b] -= y[e] ? log(pr + 1e-9) : log(1 - pr + 1e-9);
						for (uint32_t c = 0; c < F; c++)
							gw[c] += g * feat[c][e];
						gw[F] += g;
					}
					cnt_b[b]++;
					for (uint32_t c = 0; c < W; c++) {
						a[c] += gw[c] * gw[c];
						w[c] -= (float)(lr * gw[c] / (sqrt(a[c]) + 1e-6));
					}
					s->last_layer = saved;
					predict_observe(p, l, r, cnt);
				}
			}
		}
		if (o->verbose)
			fprintf(stderr, "train: combo epoch %u: log loss per token-layer by distance bucket "
				"%.4f %.4f %.4f %.4f\n", ep + 1, cnt_b[0] ? loss[0] / (double)cnt_b[0] : 0.0,
				cnt_b[1] ? loss[1] / (double)cnt_b[1] : 0.0, cnt_b[2] ? loss[2] / (double)cnt_b[2] : 0.0,
				cnt_b[3] ? loss[3] / (double)cnt_b[3] : 0.0);
	}
	if (o->verbose)
		for (uint32_t l = 0; l < L; l += 5) {
			const float *w = &m->combo[((size_t)L + l) * W];
			fprintf(stderr, "train: combo d=1 layer %u:", l);
			for (uint32_t c = 0; c < W; c++)
				fprintf(stderr, " %.2f", w[c]);
			fprintf(stderr, "\n");
		}
	predict_destroy(p);
	free(acc);
	return 0;
}

int sim_train(struct trace *const *tr, uint32_t n, uint32_t n_fit, uint32_t n_experts,
	      const struct sim_train_opts *o, struct predict_model **out, struct moe_error *err)
{
	struct predict_model *m;
	uint32_t L, k = 0;
	int rc;

	*out = NULL;
	if (n == 0 || n_fit == 0 || n_fit > n)
		return moe_error_set(err, -EINVAL, "train: need training traces (%u given, %u for components)", n, n_fit);
	L = tr[0]->n_layers;
	for (uint32_t i = 0; i < n; i++) {
		if (tr[i]->n_layers != L || tr[i]->max_expert >= n_experts)
			return moe_error_set(err, -EINVAL, "train: trace %u has %u layers and ids up to %u "
					     "(expected %u layers, %u experts)", i, tr[i]->n_layers,
					     tr[i]->max_expert, L, n_experts);
		if (tr[i]->k > k)
			k = tr[i]->k;
	}
	rc = predict_model_alloc(&m, L, n_experts, k, 16, o->n_eam, err);
	if (rc < 0)
		return rc;
	if ((rc = train_tokens(m, tr, n_fit, o->min_token ? o->min_token : 1, err)) < 0 ||
	    (rc = train_eam(m, tr, n_fit, err)) < 0 || (rc = train_learned(m, tr, n_fit, o, err)) < 0 ||
	    (rc = train_combo(m, tr, n_fit, n, o, err)) < 0) {
		predict_model_free(m);
		return rc;
	}
	*out = m;
	return 0;
}
