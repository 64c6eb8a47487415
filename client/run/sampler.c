/* sampler.c - greedy, or top-k -> top-p -> temperature -> a seeded draw
 * (llama.cpp's default chain order, so that top-p measures the nucleus of
 * the untempered distribution). The PRNG is xoshiro256** seeded through
 * splitmix64: the same seed gives the same ids on every machine. */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "sampler.h"

struct cand {
	int32_t id;
	float logit;
	float p;
};

struct sampler {
	struct sampler_params p;
	uint32_t n_vocab;
	struct cand *c;
	uint64_t s[4];
};

static uint64_t splitmix64(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k)
{
	return (x << k) | (x >> (64 - k));
}

static uint64_t xoshiro_next(uint64_t s[4])
{
	uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl(s[3], 45);
	return r;
}

int sampler_init(struct sampler **out, const struct sampler_params *p, uint32_t n_vocab)
{
	*out = NULL;
	if (n_vocab == 0 || n_vocab > INT32_MAX || isnan(p->temperature) || isnan(p->top_p))
		return -EINVAL;
	struct sampler *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->c = malloc((size_t)n_vocab * sizeof(*s->c));
	if (!s->c) {
		free(s);
		return -ENOMEM;
	}
	s->p = *p;
	s->n_vocab = n_vocab;
	uint64_t x = p->seed;
	for (int i = 0; i < 4; i++)
		s->s[i] = splitmix64(&x);
	*out = s;
	return 0;
}

void sampler_free(struct sampler *s)
{
	if (!s)
		return;
	free(s->c);
	free(s);
}

static float clean(float v)
{
	return isnan(v) ? -INFINITY : v;
}

/* Higher logit first, then lower id: the order greedy and top-k agree on. */
static int cand_cmp(const void *a, const void *b)
{
	const struct cand *x = a, *y = b;
	if (x->logit != y->logit)
		return x->logit > y->logit ? -1 : 1;
	return (x->id > y->id) - (x->id < y->id);
}

static bool cand_before(const struct cand *x, const struct cand *y)
{
	return cand_cmp(x, y) < 0;
}

/* Keeps the k best of c[0..n) in c[0..k), sorted: a min-heap of the best k
 * so far (its root the worst kept), O(n log k). */
static void keep_top_k(struct cand *c, uint32_t n, uint32_t k)
{
	for (uint32_t i = 0; i < n; i++) {
		struct cand x = c[i];
		uint32_t j;
		if (i < k) {
			j = i;
			while (j > 0 && cand_before(&c[(j - 1) / 2], &x)) {
				c[j] = c[(j - 1) / 2];
				j = (j - 1) / 2;
			}
			c[j] = x;
			continue;
		}
		if (!cand_before(&x, &c[0]))
			continue;
		j = 0;
		for (;;) {
			uint32_t l = 2 * j + 1, w = j;
			struct cand *cw = &x;
			/* sink x below any child worse than it (the worst child) */
			if (l < k && cand_before(cw, &c[l])) {
				w = l;
				cw = &c[l];
			}
			if (l + 1 < k && cand_before(cw, &c[l + 1]))
				w = l + 1;
			if (w == j)
				break;
			c[j] = c[w];
			j = w;
		}
		c[j] = x;
	}
	qsort(c, k, sizeof(*c), cand_cmp);
}

/* Softmax of c[0..n) (sorted, c[0] the largest) into .p, scaled by 1/temp. */
static void softmax(struct cand *c, uint32_t n, float temp)
{
	double sum = 0, mx = c[0].logit;
	for (uint32_t i = 0; i < n; i++) {
		double e = c[i].logit == -INFINITY ? 0.0 : exp(((double)c[i].logit - mx) / temp);
		c[i].p = (float)e;
		sum += e;
	}
	for (uint32_t i = 0; i < n; i++)
		c[i].p = (float)(c[i].p / sum);
}

int32_t sampler_sample(struct sampler *s, const float *logits)
{
	const struct sampler_params *p = &s->p;
	if (!(p->temperature > 0)) {
		uint32_t best = 0;
		float bv = clean(logits[0]);
		for (uint32_t i = 1; i < s->n_vocab; i++) {
			float v = clean(logits[i]);
			if (v > bv) {
				bv = v;
				best = i;
			}
		}
		return (int32_t)best;
	}

	struct cand *c = s->c;
	uint32_t n = s->n_vocab;
	for (uint32_t i = 0; i < n; i++)
		c[i] = (struct cand){ (int32_t)i, clean(logits[i]), 0 };
	if (p->top_k > 0 && (uint32_t)p->top_k < n) {
		keep_top_k(c, n, (uint32_t)p->top_k);
		n = (uint32_t)p->top_k;
	} else {
		qsort(c, n, sizeof(*c), cand_cmp);
	}
	if (c[0].logit == -INFINITY)
		return c[0].id;   /* nothing has any probability: the lowest id */

	/* top-p: the shortest prefix whose probability reaches p (at least one) */
	if (p->top_p < 1.0f) {
		softmax(c, n, 1.0f);
		double cum = 0;
		for (uint32_t i = 0; i < n; i++) {
			cum += c[i].p;
			if (cum >= p->top_p) {
				n = i + 1;
				break;
			}
		}
	}

	softmax(c, n, p->temperature);
	/* a uniform double in [0, 1) from the top 53 bits */
	double u = (double)(xoshiro_next(s->s) >> 11) * 0x1.0p-53, cum = 0;
	for (uint32_t i = 0; i < n; i++) {
		cum += c[i].p;
		if (u < cum)
			return c[i].id;
	}
	/* rounding left u above the total: the last with any probability */
	for (uint32_t i = n; i-- > 0;)
		if (c[i].p > 0)
			return c[i].id;
	return c[0].id;
}
