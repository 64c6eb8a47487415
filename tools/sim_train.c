/* sim_train.c - `moe-sim train`: fits the predictor model on training traces.
 *
 *   traces [0, n_fit)   token table, layer priors, trace-matching centroids
 *                       (cosine k-means over per-prompt activation matrices)
 *                       and the sparse logistic model (SGD, log loss);
 *   traces [n_fit, n)   the combiner's per-layer weights, by SGD on the
 *                       components' log-odds, so the mix is fitted on prompts
 *                       the components did not see.
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
	o->lr = 0.05;
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
	m->tok_slots = tslots;
	m->tok_key = calloc(tslots, 4);
	m->tok_total = calloc(tslots, 2);
	m->tok_freq = calloc((size_t)tslots * L * E, 1);
	cnt = calloc((size_t)tslots * L * E, sizeof(*cnt));
	if (!m->tok_key || !m->tok_total || !m->tok_freq || !cnt) {
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
	/* Any predictor gives us a stream that tracks the history. */
	rc = predict_create("temporal", L, E, m->k, NULL, &p, err);
	if (rc < 0)
		return rc;
	struct predict_stream *s = p->s;
	for (uint32_t ep = 0; ep < o->epochs; ep++) {
		float lr = (float)(o->lr / (1.0 + ep));
		double loss = 0;
		uint64_t ns = 0;
		for (uint32_t i = 0; i < n_fit; i++) {
			const struct trace *t_ = tr[i];
			predict_reset(p);
			for (uint32_t t = 0; t < t_->n_tokens; t++) {
				predict_token(p, key_of(t_, t));
				for (uint32_t l = 0; l < L; l++) {
					uint32_t cnt = t_->count[(size_t)t * L + l];
					const uint16_t *r = trace_row(t_, t, l);
					/* Train each look-ahead distance in turn, the next
					 * layer (d = 1) half of the time: it is the one a
					 * prefetch plan sees last. d = DMAX + 1 stands for
					 * "no layer of this token routed yet". */
					uint32_t ph = (t * 7 + l) % (2 * PREDICT_DMAX + 2);
					uint32_t d = ph <= PREDICT_DMAX ? 1 : ph - PREDICT_DMAX + 1;
					int32_t saved = s->last_layer;
					s->last_layer = d > PREDICT_DMAX || (int32_t)l - (int32_t)d < 0 ? -1 : (int32_t)(l - d);
					predict_learned_logits(m, s, l, z);
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
					predict_observe(p, l, r, cnt);
				}
			}
		}
		if (o->verbose)
			fprintf(stderr, "train: learned epoch %u: log loss %.4f per token-layer\n", ep + 1,
				ns ? loss / (double)ns : 0.0);
	}
	predict_destroy(p);
	return 0;
}

static int train_combo(struct predict_model *m, struct trace *const *tr, uint32_t from, uint32_t n,
		       const struct sim_train_opts *o, struct moe_error *err)
{
	uint32_t L = m->n_layers, E = m->n_experts, W = PREDICT_COMBO_N + 1;
	struct predictor *p;
	static float feat[PREDICT_COMBO_N][PREDICT_MAX_EXPERTS];
	int rc;

	/* Start: the learned model alone (the strongest single component). */
	for (uint32_t l = 0; l < L; l++) {
		float *w = &m->combo[(size_t)l * W];
		memset(w, 0, W * sizeof(float));
		w[4] = 1.0f;
	}
	if (from >= n)
		return 0;
	rc = predict_create("combo", L, E, m->k, m, &p, err);
	if (rc < 0)
		return rc;
	for (uint32_t ep = 0; ep < 2; ep++) {
		float lr = 0.002f / (1.0f + ep);
		for (uint32_t i = from; i < n; i++) {
			const struct trace *t_ = tr[i];
			predict_reset(p);
			for (uint32_t t = 0; t < t_->n_tokens; t++) {
				predict_token(p, key_of(t_, t));
				for (uint32_t l = 0; l < L; l++) {
					uint32_t cnt = t_->count[(size_t)t * L + l];
					const uint16_t *r = trace_row(t_, t, l);
					uint8_t y[PREDICT_MAX_EXPERTS] = { 0 };
					float *w = &m->combo[(size_t)l * W];
					float gw[PREDICT_COMBO_N + 1] = { 0 };
					predict_combo_features(p, l, feat);
					for (uint32_t j = 0; j < cnt; j++)
						y[r[j]] = 1;
					for (uint32_t e = 0; e < E; e++) {
						float z = w[PREDICT_COMBO_N];
						for (int c = 0; c < PREDICT_COMBO_N; c++)
							z += w[c] * feat[c][e];
						float g = 1.0f / (1.0f + expf(-z)) - (float)y[e];
						for (int c = 0; c < PREDICT_COMBO_N; c++)
							gw[c] += g * feat[c][e];
						gw[PREDICT_COMBO_N] += g;
					}
					for (uint32_t c = 0; c < W; c++)
						w[c] -= lr * gw[c];
					predict_observe(p, l, r, cnt);
				}
			}
		}
	}
	if (o->verbose)
		for (uint32_t l = 0; l < L; l += 5)
			fprintf(stderr, "train: combo layer %u: temporal %.2f coact %.2f tokenid %.2f tracematch %.2f "
				"learned %.2f bias %.2f\n", l, m->combo[l * W], m->combo[l * W + 1], m->combo[l * W + 2],
				m->combo[l * W + 3], m->combo[l * W + 4], m->combo[l * W + 5]);
	predict_destroy(p);
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
