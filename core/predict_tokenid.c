/* predict_tokenid.c - token identity: how often each expert served this token
 * (by key) at layer L in the training traces, shrunk toward the layer's
 * overall frequency when the token was rare; unseen tokens get that prior. */
#include "config.h"

#include "predict.h"

#define TOKENID_SHRINK 2.0f /* pseudo-occurrences at the prior */

static void tokenid_score(struct predictor *p, uint32_t L, float *out)
{
	const struct predict_model *m = p->model;
	size_t E = m->n_experts;
	const float *prior = &m->tok_prior[(size_t)L * E];
	int64_t row = predict_model_tok_find(m, p->s->token_key);

	if (row < 0) {
		for (size_t e = 0; e < E; e++)
			out[e] = prior[e];
		return;
	}
	const uint8_t *f = &m->tok_freq[((size_t)row * m->n_layers + L) * E];
	float n = m->tok_total[row];
	float a = n / (n + TOKENID_SHRINK);
	for (size_t e = 0; e < E; e++)
		out[e] = a * ((float)f[e] / 255.0f) + (1.0f - a) * prior[e];
}

const struct predict_ops predict_tokenid_ops = {
	.name = "tokenid",
	.help = "per-token routing table from the training traces (token hint)",
	.needs_model = true,
	.score = tokenid_score,
};
