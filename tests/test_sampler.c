/* test_sampler.c - client/run/sampler.c: greedy ties, top-k, the top-p
 * nucleus, temperature, seed determinism and the drawn distribution. */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sampler.h"

static struct sampler *mk(float temp, int top_k, float top_p, uint64_t seed, uint32_t n)
{
	struct sampler_params p = { .temperature = temp, .top_k = top_k, .top_p = top_p, .seed = seed };
	struct sampler *s;
	cr_assert_eq(sampler_init(&s, &p, n), 0);
	return s;
}

/* logits whose softmax is exactly probs */
static void from_probs(const double *probs, float *logits, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		logits[i] = probs[i] > 0 ? (float)log(probs[i]) : -INFINITY;
}

static void histogram(struct sampler *s, const float *logits, uint32_t n, int draws, int *count)
{
	for (uint32_t i = 0; i < n; i++)
		count[i] = 0;
	for (int d = 0; d < draws; d++) {
		int32_t id = sampler_sample(s, logits);
		cr_assert(id >= 0 && (uint32_t)id < n, "id %d out of range", id);
		count[id]++;
	}
}

Test(sampler, greedy_and_ties)
{
	struct sampler *s = mk(0, 0, 1, 1, 5);
	const float a[5] = { 1, 3, 3, 2, -1 };
	cr_expect_eq(sampler_sample(s, a), 1, "ties go to the lowest id");
	const float b[5] = { NAN, 0, NAN, -5, -INFINITY };
	cr_expect_eq(sampler_sample(s, b), 1, "NaN counts as -inf");
	const float c[5] = { -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY };
	cr_expect_eq(sampler_sample(s, c), 0);
	sampler_free(s);
	/* a negative temperature is greedy too */
	s = mk(-1, 40, 0.9f, 1, 5);
	cr_expect_eq(sampler_sample(s, a), 1);
	sampler_free(s);
}

Test(sampler, top_k_one_is_greedy)
{
	enum { N = 1000 };
	static float l[N];
	srand(7);
	struct sampler *g = mk(0, 0, 1, 0, N), *k1 = mk(1.5f, 1, 0.9f, 99, N);
	for (int round = 0; round < 50; round++) {
		for (int i = 0; i < N; i++)
			l[i] = (float)(rand() % 50) / 7.0f;   /* many ties */
		cr_expect_eq(sampler_sample(k1, l), sampler_sample(g, l), "round %d", round);
	}
	sampler_free(g);
	sampler_free(k1);
}

Test(sampler, seed_determinism)
{
	enum { N = 64, DRAWS = 300 };
	float l[N];
	for (int i = 0; i < N; i++)
		l[i] = (float)sin(i * 0.7) * 2.0f;
	struct sampler *a = mk(0.9f, 20, 0.95f, 1234, N), *b = mk(0.9f, 20, 0.95f, 1234, N),
		       *c = mk(0.9f, 20, 0.95f, 1235, N);
	int same_c = 0;
	for (int d = 0; d < DRAWS; d++) {
		int32_t x = sampler_sample(a, l), y = sampler_sample(b, l), z = sampler_sample(c, l);
		cr_expect_eq(x, y, "draw %d: same seed, different id", d);
		same_c += x == z;
	}
	cr_expect_lt(same_c, DRAWS, "another seed gave the same %d ids", DRAWS);
	sampler_free(a);
	sampler_free(b);
	sampler_free(c);
}

Test(sampler, top_p_keeps_the_minimal_nucleus)
{
	const double pr[5] = { 0.05, 0.5, 0.15, 0.3, 0.0 };  /* sorted: 1, 3, 2, 0 */
	float l[5];
	int cnt[5];
	from_probs(pr, l, 5);
	/* 0.5 < 0.75 <= 0.5 + 0.3: ids 1 and 3, renormalised to 5/8 and 3/8 */
	struct sampler *s = mk(1, 0, 0.75f, 5, 5);
	histogram(s, l, 5, 8000, cnt);
	cr_expect_eq(cnt[0] + cnt[2] + cnt[4], 0, "outside the nucleus: %d %d %d", cnt[0], cnt[2], cnt[4]);
	cr_expect(fabs(cnt[1] / 8000.0 - 0.625) < 0.03, "id 1: %d of 8000", cnt[1]);
	sampler_free(s);
	/* 0.45: the top token alone */
	s = mk(1, 0, 0.45f, 5, 5);
	histogram(s, l, 5, 500, cnt);
	cr_expect_eq(cnt[1], 500);
	sampler_free(s);
	/* 0.9: three tokens, never the fourth or the zero */
	s = mk(1, 0, 0.9f, 5, 5);
	histogram(s, l, 5, 8000, cnt);
	cr_expect_eq(cnt[0] + cnt[4], 0);
	cr_expect_gt(cnt[2], 0);
	sampler_free(s);
}

Test(sampler, distribution_and_temperature)
{
	const double pr[4] = { 0.5, 0.3, 0.15, 0.05 };
	float l[4];
	int cnt[4];
	from_probs(pr, l, 4);
	enum { DRAWS = 40000 };
	struct sampler *s = mk(1, 0, 1, 42, 4);
	histogram(s, l, 4, DRAWS, cnt);
	for (int i = 0; i < 4; i++)
		cr_expect(fabs(cnt[i] / (double)DRAWS - pr[i]) < 0.012, "T=1 id %d: %d of %d, want %.2f", i, cnt[i],
			  DRAWS, pr[i]);
	sampler_free(s);
	/* T = 0.5 squares the probabilities */
	double sq[4], sum = 0;
	for (int i = 0; i < 4; i++)
		sum += sq[i] = pr[i] * pr[i];
	s = mk(0.5f, 0, 1, 43, 4);
	histogram(s, l, 4, DRAWS, cnt);
	for (int i = 0; i < 4; i++)
		cr_expect(fabs(cnt[i] / (double)DRAWS - sq[i] / sum) < 0.012, "T=0.5 id %d: %d of %d, want %.3f", i,
			  cnt[i], DRAWS, sq[i] / sum);
	sampler_free(s);
	/* top-k 2: ids 0 and 1 as 5/8 and 3/8 */
	s = mk(1, 2, 1, 44, 4);
	histogram(s, l, 4, DRAWS, cnt);
	cr_expect_eq(cnt[2] + cnt[3], 0);
	cr_expect(fabs(cnt[0] / (double)DRAWS - 0.625) < 0.012, "top-k 2 id 0: %d", cnt[0]);
	sampler_free(s);
}

static int cmp_desc(const void *a, const void *b)
{
	float x = *(const float *)a, y = *(const float *)b;
	return (x < y) - (x > y);
}

Test(sampler, top_k_over_a_large_vocabulary)
{
	/* the heap selection agrees with a full sort: with k = 3 only the three
	 * largest (ties to the lower id) ever come out */
	enum { N = 5000 };
	static float l[N];
	for (int i = 0; i < N; i++)
		l[i] = (float)((i * 7919) % 1000) / 100.0f;   /* 9.99 appears several times */
	int top[3], nt = 0;
	for (int i = 0; i < N && nt < 3; i++)
		if (l[i] == 9.99f)
			top[nt++] = i;
	cr_assert_eq(nt, 3);
	struct sampler *s = mk(1, 3, 1, 9, N);
	int hits[3] = { 0 };
	for (int d = 0; d < 3000; d++) {
		int32_t id = sampler_sample(s, l);
		cr_assert(id == top[0] || id == top[1] || id == top[2], "id %d (logit %f)", id, l[id]);
		hits[id == top[0] ? 0 : id == top[1] ? 1 : 2]++;
	}
	for (int i = 0; i < 3; i++)
		cr_expect_gt(hits[i], 800, "equal logits, %d of 3000", hits[i]);
	sampler_free(s);

	/* k = 50 of random logits: every draw is among the 50 largest */
	srand(11);
	for (int i = 0; i < N; i++)
		l[i] = (float)rand() / (float)RAND_MAX;
	static float sorted[N];
	memcpy(sorted, l, sizeof(l));
	qsort(sorted, N, sizeof(float), cmp_desc);
	s = mk(0.05f, 50, 1, 10, N);
	int distinct = 0;
	static char seen[N];
	for (int d = 0; d < 3000; d++) {
		int32_t id = sampler_sample(s, l);
		cr_assert_geq(l[id], sorted[49], "id %d (logit %f) is not in the top 50", id, l[id]);
		distinct += !seen[id];
		seen[id] = 1;
	}
	cr_expect_gt(distinct, 10);
	sampler_free(s);
}

Test(sampler, never_draws_minus_infinity)
{
	float l[6] = { -INFINITY, 0, -INFINITY, 0, NAN, -INFINITY };
	int cnt[6];
	struct sampler *s = mk(2, 0, 1, 3, 6);
	histogram(s, l, 6, 2000, cnt);
	cr_expect_eq(cnt[0] + cnt[2] + cnt[4] + cnt[5], 0);
	cr_expect_gt(cnt[1], 800);
	cr_expect_gt(cnt[3], 800);
	sampler_free(s);
}

Test(sampler, bad_parameters)
{
	struct sampler_params p = { .temperature = 1, .top_k = 0, .top_p = 1, .seed = 0 };
	struct sampler *s = (struct sampler *)&p;
	cr_expect_eq(sampler_init(&s, &p, 0), -EINVAL);
	cr_expect_null(s);
	p.temperature = NAN;
	cr_expect_eq(sampler_init(&s, &p, 10), -EINVAL);
	sampler_free(NULL);
}
