/* route.c - family routing functions and cache-aware routing (see route.h). */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <string.h>

#include "pack.h"
#include "route.h"

void route_params_from_model(struct route_params *rp, const struct moe_model_config *c,
			     const float *score_bias)
{
	memset(rp, 0, sizeof(*rp));
	rp->n_experts = c->n_experts;
	rp->top_k = c->top_k;
	rp->scoring = c->scoring;
	rp->topk_method = c->topk_method;
	rp->n_group = c->n_group;
	rp->topk_group = c->topk_group;
	rp->norm_topk_prob = c->norm_topk_prob != 0;
	rp->routed_scaling_factor = c->routed_scaling_factor;
	rp->score_bias = score_bias;
}

int route_params_check(const struct route_params *rp, struct moe_error *err)
{
	if (rp->n_experts == 0 || rp->n_experts > ROUTE_MAX_EXPERTS)
		return moe_error_set(err, -EINVAL, "route: %u experts (1..%u)", rp->n_experts,
				     ROUTE_MAX_EXPERTS);
	if (rp->top_k == 0 || rp->top_k > rp->n_experts || rp->top_k > ROUTE_MAX_K)
		return moe_error_set(err, -EINVAL, "route: top-k %u with %u experts (max %u)", rp->top_k,
				     rp->n_experts, ROUTE_MAX_K);
	if (rp->scoring < MOE_SCORING_SOFTMAX || rp->scoring > MOE_SCORING_TOPK_SOFTMAX)
		return moe_error_set(err, -EINVAL, "route: unknown scoring %u", rp->scoring);
	if (rp->topk_method == MOE_TOPK_GROUP_LIMITED) {
		if (rp->scoring == MOE_SCORING_TOPK_SOFTMAX)
			return moe_error_set(err, -EINVAL, "route: group-limited top-k needs softmax or sigmoid scoring");
		if (rp->n_group == 0 || rp->n_group > ROUTE_MAX_GROUPS || rp->n_experts % rp->n_group || rp->topk_group == 0 ||
		    rp->topk_group > rp->n_group)
			return moe_error_set(err, -EINVAL, "route: bad groups %u/%u for %u experts",
					     rp->topk_group, rp->n_group, rp->n_experts);
		if (rp->topk_group * (rp->n_experts / rp->n_group) < rp->top_k)
			return moe_error_set(err, -EINVAL, "route: %u groups of %u experts cannot hold top-%u",
					     rp->topk_group, rp->n_experts / rp->n_group, rp->top_k);
	} else if (rp->topk_method != MOE_TOPK_GREEDY) {
		return moe_error_set(err, -EINVAL, "route: unknown top-k method %u", rp->topk_method);
	}
	if (!(rp->routed_scaling_factor > 0.0f) || !isfinite(rp->routed_scaling_factor))
		return moe_error_set(err, -EINVAL, "route: routed_scaling_factor must be > 0");
	return 0;
}

/* Per-decision working state: probabilities/sigmoids, selection keys (-inf
 * for experts outside the allowed groups). */
struct work {
	float prob[ROUTE_MAX_EXPERTS]; /* SOFTMAX: softmax; SIGMOID: s; TOPK_SOFTMAX: logit */
	float key[ROUTE_MAX_EXPERTS];
};

static bool better(const float *key, uint32_t a, uint32_t b)
{
	return key[a] > key[b] || (key[a] == key[b] && a < b);
}

/* Indices of the k best keys (rank order) among experts with key > -inf. */
static uint32_t top_k_of(const float *key, uint32_t n, uint32_t k, uint32_t *out)
{
	uint32_t m = 0;
	for (uint32_t e = 0; e < n; e++) {
		if (key[e] == -INFINITY)
			continue;
		if (m < k) {
			out[m++] = e;
		} else if (better(key, e, out[m - 1])) {
			out[m - 1] = e;
		} else {
			continue;
		}
		for (uint32_t i = m - 1; i > 0 && better(key, out[i], out[i - 1]); i--) {
			uint32_t t = out[i];
			out[i] = out[i - 1];
			out[i - 1] = t;
		}
	}
	return m;
}

static int prepare(const struct route_params *rp, const float *logits, struct work *w)
{
	uint32_t n = rp->n_experts;

	if (route_params_check(rp, NULL) < 0)
		return -EINVAL;
	for (uint32_t e = 0; e < n; e++)
		if (isnan(logits[e]))
			return -EINVAL;
	switch (rp->scoring) {
	case MOE_SCORING_SOFTMAX: {
		float mx = -INFINITY;
		double sum = 0.0;
		for (uint32_t e = 0; e < n; e++)
			mx = fmaxf(mx, logits[e]);
		if (!isfinite(mx))
			return -EINVAL;
		for (uint32_t e = 0; e < n; e++) {
			w->prob[e] = expf(logits[e] - mx);
			sum += w->prob[e];
		}
		for (uint32_t e = 0; e < n; e++) {
			w->prob[e] = (float)(w->prob[e] / sum);
			w->key[e] = logits[e];
		}
		break;
	}
	case MOE_SCORING_SIGMOID:
		for (uint32_t e = 0; e < n; e++) {
			w->prob[e] = 1.0f / (1.0f + expf(-logits[e]));
			w->key[e] = w->prob[e] + (rp->score_bias ? rp->score_bias[e] : 0.0f);
		}
		break;
	default: /* TOPK_SOFTMAX */
		for (uint32_t e = 0; e < n; e++)
			w->prob[e] = w->key[e] = logits[e];
		break;
	}
	if (rp->topk_method == MOE_TOPK_GROUP_LIMITED) {
		uint32_t gs = n / rp->n_group, keep[ROUTE_MAX_GROUPS];
		float gscore[ROUTE_MAX_GROUPS] = { 0 };
		for (uint32_t g = 0; g < rp->n_group; g++) {
			const float *k = &w->key[g * gs];
			if (rp->scoring == MOE_SCORING_SIGMOID) {
				/* V3: sum of the two best c in the group. */
				float a = -INFINITY, b = -INFINITY;
				for (uint32_t i = 0; i < gs; i++) {
					if (k[i] > a) {
						b = a;
						a = k[i];
					} else if (k[i] > b) {
						b = k[i];
					}
				}
				gscore[g] = gs >= 2 ? a + b : a;
			} else {
				/* V2 group_limited_greedy: the group's max probability. */
				float a = -INFINITY;
				for (uint32_t i = 0; i < gs; i++)
					a = fmaxf(a, w->prob[g * gs + i]);
				gscore[g] = a;
			}
		}
		uint32_t m = top_k_of(gscore, rp->n_group, rp->topk_group, keep);
		bool allowed[ROUTE_MAX_GROUPS] = { false };
		for (uint32_t i = 0; i < m; i++)
			allowed[keep[i]] = true;
		for (uint32_t g = 0; g < rp->n_group; g++)
			if (!allowed[g])
				for (uint32_t i = 0; i < gs; i++)
					w->key[g * gs + i] = -INFINITY;
	}
	return 0;
}

/* llama.cpp clamps the top-k sum to this (F16's smallest normal) before
 * dividing by it. */
#define ROUTE_NORM_MIN_SUM 6.103515625e-5

/* Weights over out->experts by the family's rule. */
static void weigh(const struct route_params *rp, const float *logits, const struct work *w,
		  struct route_result *out)
{
	uint32_t k = out->n;
	double sum = 0.0;

	if (rp->scoring == MOE_SCORING_TOPK_SOFTMAX) {
		float mx = -INFINITY;
		for (uint32_t i = 0; i < k; i++)
			mx = fmaxf(mx, logits[out->experts[i]]);
		for (uint32_t i = 0; i < k; i++) {
			out->weights[i] = expf(logits[out->experts[i]] - mx);
			sum += out->weights[i];
		}
		for (uint32_t i = 0; i < k; i++)
			out->weights[i] = (float)(out->weights[i] / sum);
		return;
	}
	for (uint32_t i = 0; i < k; i++) {
		out->weights[i] = w->prob[out->experts[i]];
		sum += out->weights[i];
	}
	/* llama.cpp's build_moe_ffn (softmax and sigmoid alike): with norm_w,
	 * divide by the sum clamped to F16's smallest normal, for any k (top-1
	 * gives 1, not p); then scale by w_scale whether or not it normalised. */
	if (rp->norm_topk_prob) {
		double d = fmax(sum, ROUTE_NORM_MIN_SUM);
		for (uint32_t i = 0; i < k; i++)
			out->weights[i] = (float)(out->weights[i] / d);
	}
	for (uint32_t i = 0; i < k; i++)
		out->weights[i] *= rp->routed_scaling_factor;
}

/* Residency: a byte map or a callback (route_cache_aware's interface). */
struct residency {
	const uint8_t *map;
	route_resident_fn fn;
	void *ctx;
};

static bool is_resident(const struct residency *r, uint32_t e)
{
	if (r->map)
		return r->map[e] != 0;
	return r->fn && r->fn(r->ctx, e);
}

/* Is candidate a better than b for the slot of expert e? Similarity first
 * when a matrix is given, then the selection key, then the lower id. */
static bool better_candidate(const struct route_cache_rule *rule, uint32_t n, const float *key, uint32_t e,
			     uint32_t a, uint32_t b)
{
	if (rule->similarity) {
		float sa = rule->similarity[(size_t)e * n + a], sb = rule->similarity[(size_t)e * n + b];
		if (sa != sb)
			return sa > sb;
	}
	return better(key, a, b);
}

static int route_common(const struct route_params *rp, const float *logits, const struct residency *res,
			const struct route_cache_rule *rule, struct route_result *out)
{
	struct work w;
	int rc;

	memset(out, 0, sizeof(*out));
	rc = prepare(rp, logits, &w);
	if (rc < 0)
		return rc;
	out->n = top_k_of(w.key, rp->n_experts, rp->top_k, out->exact);
	if (out->n != rp->top_k)
		return -EINVAL; /* fewer eligible experts than k: only with -inf logits */
	memcpy(out->experts, out->exact, sizeof(out->exact));
	weigh(rp, logits, &w, out);
	memcpy(out->exact_weights, out->weights, sizeof(out->weights));
	if (!rule || !res || rule->keep_top >= out->n)
		return 0;

	uint32_t J = rule->keep_top ? rule->keep_top : 1, n = rp->n_experts;
	double total = 0.0;
	bool taken[ROUTE_MAX_EXPERTS] = { false };
	for (uint32_t i = 0; i < out->n; i++) {
		taken[out->exact[i]] = true;
		total += out->exact_weights[i];
	}
	for (uint32_t i = J; i < out->n; i++) {
		uint32_t e = out->exact[i], best = UINT32_MAX;
		if (is_resident(res, e))
			continue;
		out->open_mask |= 1u << i;
		if (!(rule->max_share >= 1.0f) && !(out->exact_weights[i] < rule->max_share * total))
			continue;
		for (uint32_t r = 0; r < n; r++) {
			if (taken[r] || w.key[r] == -INFINITY || !(w.key[e] - w.key[r] <= rule->margin))
				continue;
			if (rule->similarity && !(rule->similarity[(size_t)e * n + r] >= rule->min_similarity))
				continue;
			if (best != UINT32_MAX && !better_candidate(rule, n, w.key, e, r, best))
				continue;
			if (is_resident(res, r))
				best = r;
		}
		if (best == UINT32_MAX)
			continue;
		taken[best] = true;
		out->experts[i] = best;
		out->subst_mask |= 1u << i;
		out->n_subst++;
	}
	if (!out->n_subst)
		return 0;
	switch (rule->weights) {
	case ROUTE_WEIGHTS_INHERIT:
		break; /* weights still hold the exact ones, slot by slot */
	case ROUTE_WEIGHTS_RENORM: {
		double sum = 0.0;
		weigh(rp, logits, &w, out);
		for (uint32_t i = 0; i < out->n; i++)
			sum += out->weights[i];
		if (sum > 0.0)
			for (uint32_t i = 0; i < out->n; i++)
				out->weights[i] = (float)(out->weights[i] * (total / sum));
		break;
	}
	default:
		weigh(rp, logits, &w, out);
		break;
	}
	return 0;
}

int route_topk(const struct route_params *rp, const float *logits, struct route_result *out)
{
	return route_common(rp, logits, NULL, NULL, out);
}

int route_cache_aware(const struct route_params *rp, const float *logits,
		      const struct route_cache_opts *opt, struct route_result *out)
{
	if (!opt || opt->keep_top == 0)
		return -EINVAL;
	if (!(opt->margin >= 0.0f))
		return route_common(rp, logits, NULL, NULL, out);
	struct residency res = { NULL, opt->resident, opt->ctx };
	struct route_cache_rule rule;
	route_cache_rule_init(&rule, ROUTE_RULE_MARGIN, opt->keep_top, opt->margin);
	return route_common(rp, logits, &res, &rule, out);
}

static const char *const rule_names[ROUTE_RULE_COUNT] = { "exact", "margin", "low-weight", "similarity" };

const char *route_rule_name(enum route_rule kind)
{
	return (unsigned)kind < ROUTE_RULE_COUNT ? rule_names[kind] : NULL;
}

int route_rule_parse(const char *name)
{
	for (int i = 0; i < ROUTE_RULE_COUNT; i++)
		if (name && !strcmp(name, rule_names[i]))
			return i;
	return -EINVAL;
}

void route_cache_rule_init(struct route_cache_rule *r, enum route_rule kind, uint32_t keep_top, float margin)
{
	memset(r, 0, sizeof(*r));
	r->keep_top = keep_top;
	r->margin = margin;
	r->max_share = INFINITY;
	r->min_similarity = -INFINITY;
	r->weights = ROUTE_WEIGHTS_FAMILY;
	switch (kind) {
	case ROUTE_RULE_EXACT:
		r->keep_top = ROUTE_KEEP_ALL;
		r->margin = 0.0f;
		break;
	case ROUTE_RULE_LOW_WEIGHT:
		r->max_share = 0.25f;
		r->weights = ROUTE_WEIGHTS_RENORM;
		break;
	case ROUTE_RULE_SIMILARITY:
		r->weights = ROUTE_WEIGHTS_INHERIT;
		break;
	default:
		break;
	}
}

int route_cache_rule_check(const struct route_params *rp, const struct route_cache_rule *rule,
			   struct moe_error *err)
{
	if (rule->keep_top == 0 || (rule->keep_top > rp->top_k && rule->keep_top != ROUTE_KEEP_ALL))
		return moe_error_set(err, -EINVAL, "route: keep-top J=%u must be 1..k (k=%u)", rule->keep_top,
				     rp->top_k);
	if (!(rule->margin >= 0.0f))
		return moe_error_set(err, -EINVAL, "route: margin %g must be >= 0", (double)rule->margin);
	if (!(rule->max_share > 0.0f))
		return moe_error_set(err, -EINVAL, "route: max-share %g must be > 0", (double)rule->max_share);
	if (rule->weights > ROUTE_WEIGHTS_INHERIT)
		return moe_error_set(err, -EINVAL, "route: unknown weights mode %u", rule->weights);
	if (isnan(rule->min_similarity))
		return moe_error_set(err, -EINVAL, "route: min-similarity is NaN");
	return 0;
}

int route_cached(const struct route_params *rp, const float *logits, const uint8_t *resident,
		 const struct route_cache_rule *rule, struct route_result *out, struct moe_error *err)
{
	int rc = route_params_check(rp, err);
	if (rc < 0) {
		memset(out, 0, sizeof(*out));
		return rc;
	}
	if (rule && (rc = route_cache_rule_check(rp, rule, err)) < 0) {
		memset(out, 0, sizeof(*out));
		return rc;
	}
	for (uint32_t e = 0; e < rp->n_experts; e++)
		if (isnan(logits[e])) {
			memset(out, 0, sizeof(*out));
			return moe_error_set(err, -EINVAL, "route: logit %u is NaN", e);
		}
	struct residency res = { resident, NULL, NULL };
	rc = route_common(rp, logits, resident ? &res : NULL, rule, out);
	if (rc < 0)
		return moe_error_set(err, rc, "route: fewer eligible experts than k=%u (infinite logits?)", rp->top_k);
	return 0;
}

void route_count(struct route_counters *c, const struct route_result *r)
{
	c->calls++;
	c->slots += r->n;
	c->slots_open += (uint64_t)__builtin_popcount(r->open_mask);
	c->substitutions += r->n_subst;
}

int route_log_write(FILE *f, uint64_t tag, uint32_t layer, const struct route_params *rp,
		    const float *logits, const struct route_result *r)
{
	if (r->n_subst == 0)
		return 0;
	fprintf(f, "{\"tag\":%llu,\"layer\":%u,\"exact\":[", (unsigned long long)tag, layer);
	for (uint32_t i = 0; i < r->n; i++)
		fprintf(f, "%s%u", i ? "," : "", r->exact[i]);
	fputs("],\"chosen\":[", f);
	for (uint32_t i = 0; i < r->n; i++)
		fprintf(f, "%s%u", i ? "," : "", r->experts[i]);
	fputs("],\"weights\":[", f);
	for (uint32_t i = 0; i < r->n; i++)
		fprintf(f, "%s%.9g", i ? "," : "", (double)r->weights[i]);
	fputs("],\"logits\":[", f);
	for (uint32_t e = 0; e < rp->n_experts; e++)
		fprintf(f, "%s%.9g", e ? "," : "", isfinite(logits[e]) ? (double)logits[e] : 0.0);
	fputs("]}\n", f);
	return ferror(f) ? -EIO : 0;
}

int route_similarity_read(const struct pack_file *p, uint32_t moe_layer, float *sim, struct moe_error *err)
{
	const struct moe_model_config *m = p->model;
	char name[64];
	if (moe_layer >= m->n_moe_layers)
		return moe_error_set(err, -EINVAL, "route: MoE layer %u of %u", moe_layer, m->n_moe_layers);
	snprintf(name, sizeof(name), ROUTE_SIMILARITY_TENSOR, moe_model_layer_of(m, moe_layer));
	const struct pack_tensor_entry *t = pack_find_tensor(p, name);
	if (!t)
		return moe_error_set(err, -ENOENT, "%s: no expert-similarity table %s (moe-pack similarity)", p->path,
				     name);
	uint64_t n = m->n_experts;
	if (t->dtype != MOE_DTYPE_F32 || t->n_dims != 2 || t->shape[0] != n || t->shape[1] != n ||
	    t->bytes != n * n * sizeof(float))
		return moe_error_set(err, -EINVAL, "%s: %s is not F32 [%llu x %llu]", p->path, name,
				     (unsigned long long)n, (unsigned long long)n);
	return pack_read_tensor(p, t, sim, err);
}
