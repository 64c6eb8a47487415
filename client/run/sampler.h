/* sampler.h - next-token choice from a row of logits: greedy, or top-k,
 * top-p and temperature (llama.cpp's order) then a draw from a seeded
 * PRNG, so that the same seed gives the same ids. doc/tokenizer.md. */
#ifndef MOETIER_RUN_SAMPLER_H
#define MOETIER_RUN_SAMPLER_H

#include <stdint.h>

struct sampler;

struct sampler_params {
	float temperature;    /* <= 0: greedy */
	int top_k;            /* <= 0: off */
	float top_p;          /* >= 1: off */
	uint64_t seed;
};

/* temperature <= 0: greedy (argmax, lowest id on ties). Otherwise llama.cpp's order:
 * top-k, top-p, temperature, then a draw from a seeded PRNG (same seed, same ids).
 * Returns 0, -EINVAL (n_vocab 0, NaN parameters) or -ENOMEM. */
int sampler_init(struct sampler **out, const struct sampler_params *p, uint32_t n_vocab);
/* logits holds n_vocab floats (NaN counts as -inf); returns the chosen id. */
int32_t sampler_sample(struct sampler *s, const float *logits);
void sampler_free(struct sampler *s);

#endif
