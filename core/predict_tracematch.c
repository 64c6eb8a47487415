/* predict_tracematch.c - MoE-Infinity-style expert activation matrices (EAM):
 * the stream accumulates its own [layer][expert] activation counts; the stored
 * matrices (k-means centroids of the training prompts' EAMs, each entry the
 * per-token activation frequency) are ranked by cosine similarity, and the
 * best match's row for layer L is the score. Dot products are kept up to date
 * incrementally, so an observation costs n_eam * k additions. */
#include "config.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "predict.h"

struct tmatch {
	float *a;       /* [L][E] this stream's counts */
	double *dot;    /* [n_eam] <a, eam_m> */
	double *norm;   /* [n_eam] |eam_m| */
	double a2;      /* |a|^2 */
	uint32_t best;
	bool dirty;
};

static void tm_fini(struct predictor *p)
{
	struct tmatch *t = p->priv;
	free(t->a);
	free(t->dot);
	free(t->norm);
}

static int tm_init(struct predictor *p, struct moe_error *err)
{
	struct tmatch *t = p->priv;
	const struct predict_model *m = p->model;
	size_t LE = (size_t)m->n_layers * m->n_experts;
	uint32_t n = m->n_eam ? m->n_eam : 1;

	t->a = calloc(LE, sizeof(float));
	t->dot = calloc(n, sizeof(double));
	t->norm = calloc(n, sizeof(double));
	if (!t->a || !t->dot || !t->norm) {
		tm_fini(p);
		return moe_error_set(err, -ENOMEM, "tracematch: out of memory");
	}
	for (uint32_t i = 0; i < m->n_eam; i++) {
		double s = 0;
		for (size_t j = 0; j < LE; j++)
			s += (double)m->eam[i * LE + j] * m->eam[i * LE + j];
		t->norm[i] = sqrt(s) + 1e-12;
	}
	return 0;
}

static void tm_token(struct predictor *p)
{
	struct tmatch *t = p->priv;
	const struct predict_model *m = p->model;
	if (p->s->n_tokens <= 1) {
		memset(t->a, 0, (size_t)m->n_layers * m->n_experts * sizeof(float));
		memset(t->dot, 0, (m->n_eam ? m->n_eam : 1) * sizeof(double));
		t->a2 = 0;
		t->best = 0;
		t->dirty = false;
	}
}

static void tm_observe(struct predictor *p, uint32_t L)
{
	struct tmatch *t = p->priv;
	const struct predict_model *m = p->model;
	const struct predict_stream *s = p->s;
	size_t E = m->n_experts, LE = (size_t)m->n_layers * E;
	const uint16_t *r = &s->cur[(size_t)L * s->k];

	for (uint32_t i = 0; i < s->cur_n[L]; i++) {
		size_t j = (size_t)L * E + r[i];
		t->a2 += 2.0 * t->a[j] + 1.0;
		t->a[j] += 1.0f;
		for (uint32_t c = 0; c < m->n_eam; c++)
			t->dot[c] += m->eam[c * LE + j];
	}
	t->dirty = true;
}

static void tm_score(struct predictor *p, uint32_t L, float *out)
{
	struct tmatch *t = p->priv;
	const struct predict_model *m = p->model;
	size_t E = m->n_experts, LE = (size_t)m->n_layers * E;

	if (m->n_eam == 0 || t->a2 == 0) {
		/* Nothing seen yet: the training prior. */
		memcpy(out, &m->tok_prior[(size_t)L * E], E * sizeof(float));
		return;
	}
	if (t->dirty) {
		double best = -1;
		for (uint32_t c = 0; c < m->n_eam; c++) {
			double cs = t->dot[c] / t->norm[c];
			if (cs > best) {
				best = cs;
				t->best = c;
			}
		}
		t->dirty = false;
	}
	memcpy(out, &m->eam[t->best * LE + (size_t)L * E], E * sizeof(float));
}

const struct predict_ops predict_tracematch_ops = {
	.name = "tracematch",
	.help = "expert activation matrix of the stream matched against training matrices (MoE-Infinity)",
	.needs_model = true,
	.priv_size = sizeof(struct tmatch),
	.init = tm_init,
	.fini = tm_fini,
	.token = tm_token,
	.observe = tm_observe,
	.score = tm_score,
};
