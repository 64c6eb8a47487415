/* test_route.c - family routing against straightforward reference
 * implementations (full sorts, written independently here), and the
 * cache-aware rules: top-J kept, margin respected, J = k exact, counters. */
#include "config.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "route.h"
#include "route_ref.h"

static uint32_t rng_state = 99;
static float frand(void)
{
	rng_state = rng_state * 1664525u + 1013904223u;
	return (float)((rng_state >> 8) / 16777216.0 * 8.0 - 4.0);
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

/* A renormalising family at top-1 gives its expert weight 1 (llama.cpp
 * divides by the sum for any k), not the expert's probability. */
Test(route, renormalised_top1_weight_is_one)
{
	static const enum moe_family fams[] = { MOE_FAMILY_MIXTRAL, MOE_FAMILY_QWEN3_MOE, MOE_FAMILY_DEEPSEEK_V3 };
	for (size_t f = 0; f < sizeof(fams) / sizeof(fams[0]); f++) {
		struct route_params rp = family(fams[f], 8, 1);
		rp.topk_method = MOE_TOPK_GREEDY; /* V3's default groups need n_group set */
		rp.routed_scaling_factor = 1.0f;
		cr_assert(rp.norm_topk_prob);
		check_family(&rp, 50);
		for (int t = 0; t < 50; t++) {
			float lg[8];
			struct route_result r;
			for (int e = 0; e < 8; e++)
				lg[e] = frand();
			cr_assert_eq(route_topk(&rp, lg, &r), 0);
			cr_assert_eq(r.weights[0], 1.0f, "family %d: top-1 weight %.9g", (int)fams[f],
				     (double)r.weights[0]);
		}
	}
}

/* llama.cpp scales after renormalising (softmax too: a DeepSeek-V2 pack
 * with expert_weights_norm and expert_weights_scale), so the weights sum to
 * the scale; and a sum below 2^-14 is clamped, not divided by. */
Test(route, renormalised_then_scaled_and_clamped)
{
	struct route_params rp = family(MOE_FAMILY_DEEPSEEK_V2, 64, 6);
	rp.norm_topk_prob = true;
	rp.routed_scaling_factor = 2.5f;
	check_family(&rp, 100);
	float lg[64];
	struct route_result r;
	for (int e = 0; e < 64; e++)
		lg[e] = frand();
	cr_assert_eq(route_topk(&rp, lg, &r), 0);
	double s = 0;
	for (uint32_t i = 0; i < r.n; i++)
		s += r.weights[i];
	cr_assert(fabs(s - 2.5) < 1e-5, "softmax norm + scale: sum %g", s);

	/* sigmoid(-20) * 2 = 4.1e-9 < 2^-14: weights are s / 2^-14, far from 1 */
	rp = family(MOE_FAMILY_DEEPSEEK_V3, 8, 2);
	rp.topk_method = MOE_TOPK_GREEDY;
	rp.routed_scaling_factor = 1.0f;
	for (int e = 0; e < 8; e++)
		lg[e] = -20.0f - (float)e;
	cr_assert_eq(route_topk(&rp, lg, &r), 0);
	double s0 = 1.0 / (1.0 + exp(20.0));
	cr_assert(fabs(r.weights[0] - s0 / 0x1p-14) < 1e-9, "clamped weight %.9g vs %.9g", (double)r.weights[0],
		  s0 / 0x1p-14);
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

/* ---- route_cached: the three rules, exact expected outputs ---- */

/* 8 experts, top-4, softmax WITHOUT renormalisation, so the weight modes differ. */
static const float rule_lg[8] = { 4, 3, 2, 1.5f, 1.4f, 1.0f, 0.5f, 0 };

static struct route_params rule_params(void)
{
	struct route_params rp = family(MOE_FAMILY_MIXTRAL, 8, 4);
	rp.norm_topk_prob = false;
	return rp;
}

static double prob(uint32_t e)
{
	double z = 0;
	for (int i = 0; i < 8; i++)
		z += exp(rule_lg[i] - 4.0);
	return exp(rule_lg[e] - 4.0) / z;
}

static void expect(const struct route_result *r, const uint32_t *ex, uint32_t subst, uint32_t open, const double *w)
{
	for (uint32_t i = 0; i < r->n; i++) {
		cr_assert_eq(r->experts[i], ex[i], "slot %u: expert %u, expected %u", i, r->experts[i], ex[i]);
		cr_assert(fabs(r->weights[i] - w[i]) < 1e-6, "slot %u: weight %.9g, expected %.9g", i,
			  (double)r->weights[i], w[i]);
	}
	cr_assert_eq(r->subst_mask, subst, "subst_mask %#x, expected %#x", r->subst_mask, subst);
	cr_assert_eq(r->open_mask, open, "open_mask %#x, expected %#x", r->open_mask, open);
	cr_assert_eq(r->n_subst, (uint32_t)__builtin_popcount(subst));
	for (uint32_t i = 0; i < 4; i++) {
		cr_assert_eq(r->exact[i], i, "exact routing is 0,1,2,3");
		cr_assert(fabs(r->exact_weights[i] - prob(i)) < 1e-6);
	}
}

Test(route_cached, margin_rule_a)
{
	struct route_params rp = rule_params();
	struct route_cache_rule rule;
	struct route_result r;
	struct moe_error err;
	uint8_t res[8] = { 1, 0, 0, 0, 1, 0, 1, 0 }; /* 0, 4, 6 resident */

	route_cache_rule_init(&rule, ROUTE_RULE_MARGIN, 2, 0.2f);
	cr_assert_eq(route_cached(&rp, rule_lg, res, &rule, &r, &err), 0, "%s", err.msg);
	/* slot 2 (logit 2): nearest resident 4 is 0.6 away; slot 3 (1.5): 4 is 0.1 away. */
	expect(&r, (uint32_t[]){ 0, 1, 2, 4 }, 0x8, 0xc, (double[]){ prob(0), prob(1), prob(2), prob(4) });

	rule.margin = 0.7f; /* slot 2 takes 4; slot 3 then has only 6, 1.0 away */
	cr_assert_eq(route_cached(&rp, rule_lg, res, &rule, &r, &err), 0);
	expect(&r, (uint32_t[]){ 0, 1, 4, 3 }, 0x4, 0xc, (double[]){ prob(0), prob(1), prob(4), prob(3) });

	rule.margin = INFINITY; /* best key among the resident, in rank order */
	cr_assert_eq(route_cached(&rp, rule_lg, res, &rule, &r, &err), 0);
	expect(&r, (uint32_t[]){ 0, 1, 4, 6 }, 0xc, 0xc, (double[]){ prob(0), prob(1), prob(4), prob(6) });

	rule.keep_top = 1; /* slot 1 (logit 3) is open too and takes 4 first */
	cr_assert_eq(route_cached(&rp, rule_lg, res, &rule, &r, &err), 0);
	expect(&r, (uint32_t[]){ 0, 4, 6, 3 }, 0x6, 0xe, (double[]){ prob(0), prob(4), prob(6), prob(3) });

	res[2] = 1; /* a resident exact expert is never replaced */
	rule.keep_top = 2;
	cr_assert_eq(route_cached(&rp, rule_lg, res, &rule, &r, &err), 0);
	expect(&r, (uint32_t[]){ 0, 1, 2, 4 }, 0x8, 0x8, (double[]){ prob(0), prob(1), prob(2), prob(4) });

	rule.keep_top = 4; /* J = k: exact */
	cr_assert_eq(route_cached(&rp, rule_lg, res, &rule, &r, &err), 0);
	expect(&r, (uint32_t[]){ 0, 1, 2, 3 }, 0, 0, (double[]){ prob(0), prob(1), prob(2), prob(3) });

	/* The exact preset: every slot kept. */
	struct route_cache_rule ex;
	route_cache_rule_init(&ex, ROUTE_RULE_EXACT, 0, 0);
	cr_assert_eq(ex.keep_top, ROUTE_KEEP_ALL);
	cr_assert_eq(route_cached(&rp, rule_lg, res, &ex, &r, &err), 0, "%s", err.msg);
	expect(&r, (uint32_t[]){ 0, 1, 2, 3 }, 0, 0, (double[]){ prob(0), prob(1), prob(2), prob(3) });

	/* Nothing resident (NULL) or no rule: exact, same as route_topk bit for bit. */
	struct route_result t;
	cr_assert_eq(route_topk(&rp, rule_lg, &t), 0);
	cr_assert_eq(route_cached(&rp, rule_lg, NULL, &rule, &r, &err), 0);
	cr_assert_eq(memcmp(&r, &t, sizeof(r)), 0);
	cr_assert_eq(route_cached(&rp, rule_lg, res, NULL, &r, &err), 0);
	cr_assert_eq(memcmp(&r, &t, sizeof(r)), 0);
}

Test(route_cached, weight_modes)
{
	struct route_params rp = rule_params();
	struct route_cache_rule rule;
	struct route_result r;
	uint8_t res[8] = { 1, 0, 0, 0, 1, 0, 0, 0 };
	double ex = prob(0) + prob(1) + prob(2) + prob(3), fin = prob(0) + prob(1) + prob(2) + prob(4);

	route_cache_rule_init(&rule, ROUTE_RULE_MARGIN, 2, 0.2f);
	rule.weights = ROUTE_WEIGHTS_RENORM;
	cr_assert_eq(route_cached(&rp, rule_lg, res, &rule, &r, NULL), 0);
	expect(&r, (uint32_t[]){ 0, 1, 2, 4 }, 0x8, 0xc,
	       (double[]){ prob(0) * ex / fin, prob(1) * ex / fin, prob(2) * ex / fin, prob(4) * ex / fin });
	rule.weights = ROUTE_WEIGHTS_INHERIT;
	cr_assert_eq(route_cached(&rp, rule_lg, res, &rule, &r, NULL), 0);
	expect(&r, (uint32_t[]){ 0, 1, 2, 4 }, 0x8, 0xc, (double[]){ prob(0), prob(1), prob(2), prob(3) });

	/* With Mixtral's renormalisation FAMILY already sums to 1: RENORM = FAMILY. */
	rp.norm_topk_prob = true;
	rule.weights = ROUTE_WEIGHTS_RENORM;
	cr_assert_eq(route_cached(&rp, rule_lg, res, &rule, &r, NULL), 0);
	cr_assert_eq(r.experts[3], 4);
	cr_assert(fabs(r.weights[3] - prob(4) / fin) < 1e-6);
}

Test(route_cached, low_weight_rule_b)
{
	struct route_params rp = rule_params();
	struct route_cache_rule rule;
	struct route_result r;
	struct moe_error err;
	uint8_t res[8] = { 0, 0, 0, 0, 1, 0, 1, 0 };
	double ex = prob(0) + prob(1) + prob(2) + prob(3);
	/* shares of the exact set: 0.631, 0.232, 0.0854, 0.0518 */

	route_cache_rule_init(&rule, ROUTE_RULE_LOW_WEIGHT, 1, INFINITY);
	cr_assert_eq(rule.weights, ROUTE_WEIGHTS_RENORM);
	rule.max_share = 0.06f; /* only slot 3 is light enough */
	cr_assert_eq(route_cached(&rp, rule_lg, res, &rule, &r, &err), 0, "%s", err.msg);
	double fin = prob(0) + prob(1) + prob(2) + prob(4);
	expect(&r, (uint32_t[]){ 0, 1, 2, 4 }, 0x8, 0xe,
	       (double[]){ prob(0) * ex / fin, prob(1) * ex / fin, prob(2) * ex / fin, prob(4) * ex / fin });

	rule.max_share = 0.1f; /* slots 2 and 3: 2 takes 4, 3 takes 6 */
	cr_assert_eq(route_cached(&rp, rule_lg, res, &rule, &r, &err), 0);
	fin = prob(0) + prob(1) + prob(4) + prob(6);
	expect(&r, (uint32_t[]){ 0, 1, 4, 6 }, 0xc, 0xe,
	       (double[]){ prob(0) * ex / fin, prob(1) * ex / fin, prob(4) * ex / fin, prob(6) * ex / fin });

	rule.max_share = 0.05f; /* no slot is light enough */
	cr_assert_eq(route_cached(&rp, rule_lg, res, &rule, &r, &err), 0);
	expect(&r, (uint32_t[]){ 0, 1, 2, 3 }, 0, 0xe, (double[]){ prob(0), prob(1), prob(2), prob(3) });
}

Test(route_cached, similarity_rule_c)
{
	struct route_params rp = rule_params();
	struct route_cache_rule rule;
	struct route_result r;
	struct moe_error err;
	uint8_t res[8] = { 0, 0, 0, 0, 1, 0, 1, 0 };
	float sim[64] = { 0 };
	for (int i = 0; i < 8; i++)
		sim[i * 8 + i] = 1;
	sim[2 * 8 + 4] = 0.8f;
	sim[3 * 8 + 6] = 0.9f;
	sim[3 * 8 + 4] = 0.95f; /* 4 is more similar to 3, but slot 2 takes it first */

	route_cache_rule_init(&rule, ROUTE_RULE_SIMILARITY, 2, INFINITY);
	rule.similarity = sim;
	rule.min_similarity = 0.6f;
	cr_assert_eq(route_cached(&rp, rule_lg, res, &rule, &r, &err), 0, "%s", err.msg);
	/* INHERIT: each substitute gets the weight of the expert it replaces. */
	expect(&r, (uint32_t[]){ 0, 1, 4, 6 }, 0xc, 0xc, (double[]){ prob(0), prob(1), prob(2), prob(3) });

	rule.min_similarity = 0.85f; /* 4 is too unlike 2; 3 then takes 4 (0.95 > 0.9) */
	cr_assert_eq(route_cached(&rp, rule_lg, res, &rule, &r, &err), 0);
	expect(&r, (uint32_t[]){ 0, 1, 2, 4 }, 0x8, 0xc, (double[]){ prob(0), prob(1), prob(2), prob(3) });

	/* Similarity over key: 6 (logit 0.5) beats 4 (1.4) for slot 3 when more similar. */
	sim[3 * 8 + 4] = 0.7f;
	cr_assert_eq(route_cached(&rp, rule_lg, res, &rule, &r, &err), 0);
	expect(&r, (uint32_t[]){ 0, 1, 2, 6 }, 0x8, 0xc, (double[]){ prob(0), prob(1), prob(2), prob(3) });
	rule.margin = 0.9f; /* 6 is 1.0 below 3: out; 4 is below min_similarity: none */
	cr_assert_eq(route_cached(&rp, rule_lg, res, &rule, &r, &err), 0);
	expect(&r, (uint32_t[]){ 0, 1, 2, 3 }, 0, 0xc, (double[]){ prob(0), prob(1), prob(2), prob(3) });
}

Test(route_cached, groups_are_respected)
{
	/* DeepSeek-V2 group-limited greedy: 4 groups of 2, the best 2 groups kept. */
	struct route_params rp = family(MOE_FAMILY_DEEPSEEK_V2, 8, 2);
	float lg[8] = { 5, 4, 0, 0, 3, 0, 0, 0 }; /* groups 0 and 2 allowed */
	uint8_t res[8] = { 0, 0, 0, 0, 0, 0, 1, 0 };
	struct route_cache_rule rule;
	struct route_result r;
	rp.topk_method = MOE_TOPK_GROUP_LIMITED;
	rp.n_group = 4;
	rp.topk_group = 2;
	route_cache_rule_init(&rule, ROUTE_RULE_MARGIN, 1, INFINITY);
	cr_assert_eq(route_cached(&rp, lg, res, &rule, &r, NULL), 0);
	cr_assert_eq(r.experts[1], 1, "expert 6 is in a dropped group");
	cr_assert_eq(r.open_mask, 2u);
	res[4] = 1;
	cr_assert_eq(route_cached(&rp, lg, res, &rule, &r, NULL), 0);
	cr_assert_eq(r.experts[1], 4);
	cr_assert_eq(r.subst_mask, 2u);
}

Test(route_cached, sigmoid_key_includes_bias)
{
	/* DeepSeek-V3: the margin is in c = sigmoid(logit) + bias units. */
	static const float bias[4] = { 0, 0, 0, 0.3f };
	struct route_params rp = family(MOE_FAMILY_DEEPSEEK_V3, 4, 2);
	float lg[4] = { 2, 1, 0.5f, -1 };
	uint8_t res[4] = { 0, 0, 0, 1 };
	struct route_cache_rule rule;
	struct route_result r;
	rp.score_bias = bias;
	/* c = .8808, .7311, .6225, .2689 + .3 = .5689: gap from expert 1 = .1622 */
	route_cache_rule_init(&rule, ROUTE_RULE_MARGIN, 1, 0.17f);
	cr_assert_eq(route_cached(&rp, lg, res, &rule, &r, NULL), 0);
	cr_assert_eq(r.experts[1], 3);
	/* Weights from s, not c: V3 renormalises and scales. */
	double s0 = 1 / (1 + exp(-2.0)), s3 = 1 / (1 + exp(1.0));
	cr_assert(fabs(r.weights[1] - s3 / (s0 + s3) * rp.routed_scaling_factor) < 1e-5);
	rule.margin = 0.16f;
	cr_assert_eq(route_cached(&rp, lg, res, &rule, &r, NULL), 0);
	cr_assert_eq(r.experts[1], 1);
}

Test(route_cached, malformed)
{
	struct route_params rp = rule_params();
	struct route_cache_rule rule;
	struct route_result r;
	struct moe_error err;
	uint8_t res[8] = { 0 };
	float lg[8];
	memcpy(lg, rule_lg, sizeof(lg));

	route_cache_rule_init(&rule, ROUTE_RULE_MARGIN, 5, 0.5f);
	cr_assert_eq(route_cached(&rp, lg, res, &rule, &r, &err), -EINVAL);
	cr_assert(strstr(err.msg, "keep-top J=5"), "%s", err.msg);
	rule.keep_top = 0;
	cr_assert_eq(route_cached(&rp, lg, res, &rule, &r, &err), -EINVAL);
	rule.keep_top = 2;
	rule.margin = -0.5f;
	cr_assert_eq(route_cached(&rp, lg, res, &rule, &r, &err), -EINVAL);
	cr_assert(strstr(err.msg, "margin"), "%s", err.msg);
	rule.margin = NAN;
	cr_assert_eq(route_cached(&rp, lg, res, &rule, &r, &err), -EINVAL);
	rule.margin = 0.5f;
	rule.max_share = 0;
	cr_assert_eq(route_cached(&rp, lg, res, &rule, &r, &err), -EINVAL);
	rule.max_share = 1;
	rule.weights = 3;
	cr_assert_eq(route_cached(&rp, lg, res, &rule, &r, &err), -EINVAL);
	rule.weights = 0;
	lg[5] = NAN;
	cr_assert_eq(route_cached(&rp, lg, res, &rule, &r, &err), -EINVAL);
	cr_assert(strstr(err.msg, "logit 5 is NaN"), "%s", err.msg);
	cr_assert_eq(route_rule_parse("low-weight"), ROUTE_RULE_LOW_WEIGHT);
	cr_assert_eq(route_rule_parse("similarity"), ROUTE_RULE_SIMILARITY);
	cr_assert_eq(route_rule_parse("nope"), -EINVAL);
	cr_assert_str_eq(route_rule_name(ROUTE_RULE_MARGIN), "margin");
}

/* Random decisions: invariants of every rule, and the margin rule equals the
 * callback-based route_cache_aware. */
Test(route_cached, random_invariants, .timeout = 60)
{
	struct route_params rp = family(MOE_FAMILY_DEEPSEEK_V2, 64, 6);
	static float sim[64 * 64];
	for (int i = 0; i < 64 * 64; i++)
		sim[i] = frand() / 4.0f;
	uint64_t subst[ROUTE_RULE_COUNT] = { 0 };
	for (int t = 0; t < 400; t++) {
		float lg[64];
		struct resset rs;
		struct route_result ex, r, old;
		uint32_t J = 1 + (uint32_t)(t % 6);
		float margin = (float)(t % 5) * 0.5f;
		for (int e = 0; e < 64; e++) {
			lg[e] = frand();
			rs.r[e] = (rng_state >> 20) % 3 == 0;
		}
		cr_assert_eq(route_topk(&rp, lg, &ex), 0);
		for (int kind = ROUTE_RULE_MARGIN; kind < ROUTE_RULE_COUNT; kind++) {
			struct route_cache_rule rule;
			route_cache_rule_init(&rule, (enum route_rule)kind, J, margin);
			if (kind == ROUTE_RULE_SIMILARITY) {
				rule.similarity = sim;
				rule.min_similarity = 0.0f;
			}
			cr_assert_eq(route_cached(&rp, lg, rs.r, &rule, &r, NULL), 0);
			subst[kind] += r.n_subst;
			for (uint32_t i = 0; i < 6; i++) {
				cr_assert_eq(r.exact[i], ex.experts[i]);
				cr_assert_eq(r.exact_weights[i], ex.weights[i]);
				bool sub = r.experts[i] != ex.experts[i];
				cr_assert_eq(sub, (r.subst_mask >> i) & 1);
				cr_assert_eq(!rs.r[ex.experts[i]] && i >= J, (r.open_mask >> i) & 1);
				if (sub) {
					cr_assert_geq(i, J, "top-J slot %u replaced", i);
					cr_assert(rs.r[r.experts[i]] && !rs.r[ex.experts[i]]);
					cr_assert_leq(lg[ex.experts[i]] - lg[r.experts[i]], margin + 1e-6f);
					if (kind == ROUTE_RULE_LOW_WEIGHT) {
						double tot = 0;
						for (uint32_t j = 0; j < 6; j++)
							tot += ex.weights[j];
						cr_assert_lt(ex.weights[i], 0.25 * tot);
					}
					if (kind == ROUTE_RULE_SIMILARITY)
						cr_assert_geq(sim[ex.experts[i] * 64 + r.experts[i]], 0.0f);
				}
				for (uint32_t j = 0; j < i; j++)
					cr_assert_neq(r.experts[i], r.experts[j]);
			}
			if (kind == ROUTE_RULE_MARGIN) {
				struct route_cache_opts o = { J, margin, is_res, &rs };
				cr_assert_eq(route_cache_aware(&rp, lg, &o, &old), 0);
				cr_assert_eq(memcmp(&r, &old, sizeof(r)), 0);
			}
		}
	}
	for (int kind = ROUTE_RULE_MARGIN; kind < ROUTE_RULE_COUNT; kind++)
		cr_assert_gt(subst[kind], 0, "rule %s never substituted", route_rule_name((enum route_rule)kind));
}
