/* test_route.c - family routing against straightforward reference
 * implementations (full sorts, written independently here), and the
 * cache-aware rules: top-J kept, margin respected, J = k exact, counters. */
#include "config.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "route.h"

static uint32_t rng_state = 99;
static float frand(void)
{
	rng_state = rng_state * 1664525u + 1013904223u;
	return (float)((rng_state >> 8) / 16777216.0 * 8.0 - 4.0);
}

/* Reference: indices sorted by key descending (ties: lower index first). */
static void ref_sort(const double *key, uint32_t n, uint32_t *idx)
{
	for (uint32_t i = 0; i < n; i++)
		idx[i] = i;
	for (uint32_t i = 1; i < n; i++)
		for (uint32_t j = i; j > 0 && (key[idx[j]] > key[idx[j - 1]] ||
					       (key[idx[j]] == key[idx[j - 1]] && idx[j] < idx[j - 1])); j--) {
			uint32_t t = idx[j];
			idx[j] = idx[j - 1];
			idx[j - 1] = t;
		}
}

/* Reference routing per family (formats.md section 3), in double. */
static void ref_route(const struct route_params *rp, const float *lg, uint32_t *ex, double *w)
{
	uint32_t n = rp->n_experts, k = rp->top_k, idx[ROUTE_MAX_EXPERTS];
	double p[ROUTE_MAX_EXPERTS], key[ROUTE_MAX_EXPERTS], sum = 0;

	if (rp->scoring == MOE_SCORING_TOPK_SOFTMAX) {
		for (uint32_t e = 0; e < n; e++)
			key[e] = lg[e];
		ref_sort(key, n, idx);
		double mx = key[idx[0]];
		for (uint32_t i = 0; i < k; i++) {
			ex[i] = idx[i];
			w[i] = exp(key[idx[i]] - mx);
			sum += w[i];
		}
		for (uint32_t i = 0; i < k; i++)
			w[i] /= sum;
		return;
	}
	if (rp->scoring == MOE_SCORING_SOFTMAX) {
		double mx = -1e30, s = 0;
		for (uint32_t e = 0; e < n; e++)
			mx = fmax(mx, lg[e]);
		for (uint32_t e = 0; e < n; e++)
			s += exp(lg[e] - mx);
		for (uint32_t e = 0; e < n; e++) {
			p[e] = exp(lg[e] - mx) / s;
			key[e] = p[e];
		}
	} else {
		for (uint32_t e = 0; e < n; e++) {
			p[e] = 1.0 / (1.0 + exp(-(double)lg[e]));
			key[e] = p[e] + (rp->score_bias ? rp->score_bias[e] : 0.0);
		}
	}
	if (rp->topk_method == MOE_TOPK_GROUP_LIMITED) {
		uint32_t gs = n / rp->n_group, gidx[64];
		double gscore[64];
		for (uint32_t g = 0; g < rp->n_group; g++) {
			double sub[ROUTE_MAX_EXPERTS];
			uint32_t si[ROUTE_MAX_EXPERTS];
			for (uint32_t i = 0; i < gs; i++)
				sub[i] = rp->scoring == MOE_SCORING_SIGMOID ? key[g * gs + i] : p[g * gs + i];
			ref_sort(sub, gs, si);
			gscore[g] = rp->scoring == MOE_SCORING_SIGMOID ? sub[si[0]] + sub[si[1]] : sub[si[0]];
		}
		ref_sort(gscore, rp->n_group, gidx);
		for (uint32_t r = rp->topk_group; r < rp->n_group; r++)
			for (uint32_t i = 0; i < gs; i++)
				key[gidx[r] * gs + i] = -1e30;
	}
	ref_sort(key, n, idx);
	for (uint32_t i = 0; i < k; i++) {
		ex[i] = idx[i];
		w[i] = p[idx[i]];
		sum += w[i];
	}
	if (rp->scoring == MOE_SCORING_SIGMOID) {
		for (uint32_t i = 0; i < k; i++)
			w[i] = (rp->norm_topk_prob ? w[i] / (sum + 1e-20) : w[i]) * rp->routed_scaling_factor;
	} else if (rp->norm_topk_prob && k > 1) {
		for (uint32_t i = 0; i < k; i++)
			w[i] /= sum + 1e-20;
	} else {
		for (uint32_t i = 0; i < k; i++)
			w[i] *= rp->routed_scaling_factor;
	}
}

static void check_family(struct route_params *rp, int trials)
{
	float lg[ROUTE_MAX_EXPERTS];
	struct route_result r;
	uint32_t ex[ROUTE_MAX_K];
	double w[ROUTE_MAX_K];
	for (int t = 0; t < trials; t++) {
		for (uint32_t e = 0; e < rp->n_experts; e++)
			lg[e] = frand();
		cr_assert_eq(route_topk(rp, lg, &r), 0);
		ref_route(rp, lg, ex, w);
		cr_assert_eq(r.n, rp->top_k);
		cr_assert_eq(r.n_subst, 0);
		for (uint32_t i = 0; i < r.n; i++) {
			cr_assert_eq(r.experts[i], ex[i], "trial %d slot %u: %u vs reference %u", t, i, r.experts[i], ex[i]);
			cr_assert_eq(r.exact[i], ex[i]);
			cr_assert(fabs(r.weights[i] - w[i]) < 1e-5 * fmax(1.0, fabs(w[i])), "weight %u: %g vs %g", i,
				  (double)r.weights[i], w[i]);
		}
	}
}

static struct route_params family(enum moe_family f, uint32_t E, uint32_t k)
{
	struct moe_model_config c;
	struct route_params rp;
	memset(&c, 0, sizeof(c));
	moe_model_set_family_defaults(&c, f);
	c.n_experts = E;
	c.top_k = k;
	route_params_from_model(&rp, &c, NULL);
	return rp;
}

Test(route, mixtral_softmax_renorm)
{
	struct route_params rp = family(MOE_FAMILY_MIXTRAL, 8, 2);
	cr_assert(rp.norm_topk_prob);
	check_family(&rp, 200);
}

Test(route, deepseek_v2_softmax_no_renorm_scaled)
{
	struct route_params rp = family(MOE_FAMILY_DEEPSEEK_V2, 64, 6);
	rp.norm_topk_prob = false;
	rp.routed_scaling_factor = 1.5f;
	check_family(&rp, 200);
}

Test(route, deepseek_v2_group_limited_greedy)
{
	struct route_params rp = family(MOE_FAMILY_DEEPSEEK_V2, 64, 6);
	rp.topk_method = MOE_TOPK_GROUP_LIMITED;
	rp.n_group = 8;
	rp.topk_group = 3;
	check_family(&rp, 200);
}

Test(route, deepseek_v3_sigmoid_bias_groups)
{
	static float bias[256];
	struct route_params rp = family(MOE_FAMILY_DEEPSEEK_V3, 256, 8);
	for (int i = 0; i < 256; i++)
		bias[i] = frand() * 0.05f;
	rp.score_bias = bias;
	rp.topk_method = MOE_TOPK_GROUP_LIMITED;
	rp.n_group = 8;
	rp.topk_group = 4;
	rp.norm_topk_prob = true;
	rp.routed_scaling_factor = 2.5f;
	cr_assert_eq(rp.scoring, MOE_SCORING_SIGMOID);
	check_family(&rp, 100);
	/* Weights come from s, not c: with bias, sum of weights is still 2.5. */
	float lg[256];
	struct route_result r;
	for (int e = 0; e < 256; e++)
		lg[e] = frand();
	cr_assert_eq(route_topk(&rp, lg, &r), 0);
	double s = 0;
	for (uint32_t i = 0; i < r.n; i++)
		s += r.weights[i];
	cr_assert(fabs(s - 2.5) < 1e-4, "sum %g", s);
}

Test(route, gpt_oss_topk_then_softmax)
{
	struct route_params rp = family(MOE_FAMILY_GPT_OSS, 32, 4);
	cr_assert_eq(rp.scoring, MOE_SCORING_TOPK_SOFTMAX);
	check_family(&rp, 200);
}

Test(route, bad_input)
{
	struct route_params rp = family(MOE_FAMILY_MIXTRAL, 8, 2);
	float lg[8] = { 0 };
	struct route_result r;
	struct moe_error err;
	lg[3] = NAN;
	cr_assert_eq(route_topk(&rp, lg, &r), -EINVAL);
	rp.top_k = 9;
	cr_assert_eq(route_params_check(&rp, &err), -EINVAL);
	rp.top_k = 2;
	rp.topk_method = MOE_TOPK_GROUP_LIMITED;
	rp.n_group = 3;
	rp.topk_group = 1;
	cr_assert_eq(route_params_check(&rp, &err), -EINVAL, "8 experts in 3 groups");
}

struct resset {
	uint8_t r[ROUTE_MAX_EXPERTS];
};

static bool is_res(void *ctx, uint32_t e)
{
	return ((struct resset *)ctx)->r[e] != 0;
}

Test(route, cache_aware_rules, .timeout = 30)
{
	struct route_params rp = family(MOE_FAMILY_DEEPSEEK_V2, 64, 6);
	struct route_counters cnt = { 0 };
	uint64_t substituted = 0;
	for (int t = 0; t < 500; t++) {
		float lg[64];
		struct resset rs;
		struct route_result ex, r;
		uint32_t J = 1 + (uint32_t)(t % 6);
		float margin = (float)(t % 4) * 0.5f;
		for (int e = 0; e < 64; e++) {
			lg[e] = frand();
			rs.r[e] = (rng_state >> 20) % 3 == 0;
		}
		struct route_cache_opts o = { J, margin, is_res, &rs };
		cr_assert_eq(route_topk(&rp, lg, &ex), 0);
		cr_assert_eq(route_cache_aware(&rp, lg, &o, &r), 0);
		route_count(&cnt, &r);
		substituted += r.n_subst;
		uint32_t ns = 0;
		for (uint32_t i = 0; i < 6; i++) {
			cr_assert_eq(r.exact[i], ex.experts[i]);
			if (i < J) {
				cr_assert_eq(r.experts[i], ex.experts[i], "top-J slot %u changed", i);
				continue;
			}
			if (r.experts[i] != ex.experts[i]) {
				ns++;
				cr_assert(rs.r[r.experts[i]], "substitute not resident");
				cr_assert(!rs.r[ex.experts[i]], "a resident exact expert was replaced");
				cr_assert_leq(lg[ex.experts[i]] - lg[r.experts[i]], margin + 1e-6f, "margin violated");
				cr_assert(r.subst_mask & (1u << i));
			}
			/* No duplicates. */
			for (uint32_t j = 0; j < i; j++)
				cr_assert_neq(r.experts[i], r.experts[j]);
		}
		cr_assert_eq(ns, r.n_subst);
		/* Weights: softmax probabilities of the chosen (no renorm for V2-Lite). */
		double mx = -1e30, s = 0;
		for (int e = 0; e < 64; e++)
			mx = fmax(mx, lg[e]);
		for (int e = 0; e < 64; e++)
			s += exp(lg[e] - mx);
		for (uint32_t i = 0; i < 6; i++)
			cr_assert(fabs(r.weights[i] - exp(lg[r.experts[i]] - mx) / s) < 1e-5);
		/* J = k is exact. */
		struct route_cache_opts ok = { 6, 100.0f, is_res, &rs };
		cr_assert_eq(route_cache_aware(&rp, lg, &ok, &r), 0);
		cr_assert_eq(r.n_subst, 0);
		cr_assert_eq(memcmp(r.experts, ex.experts, sizeof(r.experts)), 0);
	}
	cr_assert_eq(cnt.calls, 500);
	cr_assert_eq(cnt.slots, 3000);
	cr_assert_eq(cnt.substitutions, substituted);
	cr_assert_gt(substituted, 0, "the sequence should have produced substitutions");
	cr_assert_leq(cnt.substitutions, cnt.slots_open);
}

Test(route, cache_aware_picks_best_resident_and_renorm)
{
	/* Mixtral-style renormalisation over the final set. */
	struct route_params rp = family(MOE_FAMILY_MIXTRAL, 8, 2);
	float lg[8] = { 5, 4, 3.9f, 3.5f, 0, 0, 0, 0 };
	struct resset rs = { { 0 } };
	struct route_result r;
	rs.r[3] = rs.r[2] = 1; /* expert 1 (rank 2) is not resident */
	struct route_cache_opts o = { 1, 0.5f, is_res, &rs };
	cr_assert_eq(route_cache_aware(&rp, lg, &o, &r), 0);
	cr_assert_eq(r.experts[0], 0);
	cr_assert_eq(r.experts[1], 2, "best resident within the margin");
	double a = exp(5.0), b = exp(3.9);
	cr_assert(fabs(r.weights[0] - a / (a + b)) < 1e-5 && fabs(r.weights[1] - b / (a + b)) < 1e-5);
	o.margin = 0.05f;
	cr_assert_eq(route_cache_aware(&rp, lg, &o, &r), 0);
	cr_assert_eq(r.experts[1], 1, "nothing within a 0.05 margin");
	cr_assert_eq(r.open_mask, 2u);
	char buf[4096];
	FILE *f = fmemopen(buf, sizeof(buf), "w");
	o.margin = 0.5f;
	cr_assert_eq(route_cache_aware(&rp, lg, &o, &r), 0);
	cr_assert_eq(route_log_write(f, 7, 3, &rp, lg, &r), 0);
	fclose(f);
	cr_assert(strstr(buf, "\"tag\":7,\"layer\":3,\"exact\":[0,1],\"chosen\":[0,2]"), "%s", buf);
}
