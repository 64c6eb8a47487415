/* route.h - expert routing from router logits, by model family
 * (formats.md section 3), and cache-aware routing (MoCCE / CECAR style).
 *
 * Plain routing (route_topk) reproduces the family's rule exactly:
 *   SOFTMAX (Mixtral, Qwen, OLMoE, DeepSeek-V2): p = softmax(logits over all
 *     experts); top-k of p (DeepSeek-V2 group_limited_greedy: only the
 *     topk_group groups with the largest max-p are eligible); weights = p of the
 *     chosen; if norm_topk_prob and k > 1, divide by (sum + 1e-20), otherwise
 *     multiply by routed_scaling_factor (DeepSeek-V2; 1.0 elsewhere).
 *   SIGMOID (DeepSeek-V3): s = sigmoid(logits); c = s + score_bias (selection
 *     only); group-limited: group score = sum of the 2 largest c in the group,
 *     keep topk_group groups; top-k of c; weights gathered from s (not c);
 *     if norm_topk_prob divide by (sum + 1e-20); always multiply by
 *     routed_scaling_factor.
 *   TOPK_SOFTMAX (GPT-OSS): top-k of the logits (router bias already added by
 *     the caller), weights = softmax over the k chosen logits.
 * Ties go to the lower expert id. Experts come out in rank order (best first).
 *
 * Cache-aware routing (route_cache_aware) keeps the exact top-J (J >= 1) and,
 * for every later slot whose expert is not resident, may put a resident expert
 * in its place: the eligible resident expert with the best selection key,
 * only when key(replaced) - key(resident) <= margin, never one already chosen
 * and never one outside the allowed groups. The selection key is the raw logit
 * for SOFTMAX and TOPK_SOFTMAX (so a margin m bounds the probability ratio by
 * e^m) and c = sigmoid(logit) + bias for SIGMOID. Weights are then made by the
 * family's rule over the final set. J >= k (or margin < 0) is exact routing.
 *
 * Pure functions over caller memory: thread-safe, no allocation.
 */
#ifndef MOETIER_ROUTE_H
#define MOETIER_ROUTE_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "model.h"
#include "util.h"

#define ROUTE_MAX_K 32
#define ROUTE_MAX_EXPERTS 4096
#define ROUTE_MAX_GROUPS 64

struct route_params {
	uint32_t n_experts;
	uint32_t top_k;
	uint32_t scoring;        /* enum moe_scoring */
	uint32_t topk_method;    /* enum moe_topk_method */
	uint32_t n_group;        /* group-limited only */
	uint32_t topk_group;
	bool norm_topk_prob;
	float routed_scaling_factor;
	const float *score_bias; /* [n_experts] DeepSeek-V3 e_score_correction_bias, or NULL */
};

/* Fills rp from a model config (routing fields as stored in packs). */
void route_params_from_model(struct route_params *rp, const struct moe_model_config *c,
			     const float *score_bias);
/* 0, or -EINVAL with a message (k > n_experts, k > ROUTE_MAX_K, bad groups...). */
int route_params_check(const struct route_params *rp, struct moe_error *err);

struct route_result {
	uint32_t n;                       /* = top_k */
	uint32_t experts[ROUTE_MAX_K];    /* the experts to run, rank order */
	float weights[ROUTE_MAX_K];
	uint32_t exact[ROUTE_MAX_K];      /* exact routing's experts (what the router chose) */
	uint32_t n_subst;                 /* slots where experts[i] != exact[i] */
	uint32_t subst_mask;              /* bit i set when slot i was substituted */
	uint32_t open_mask;               /* bit i: slot i >= J and exact[i] not resident */
};

/* Exact routing. logits: [n_experts] raw router outputs. Returns 0 or -EINVAL
 * (bad params, or a NaN logit). */
int route_topk(const struct route_params *rp, const float *logits, struct route_result *out);

/* Residency oracle for cache-aware routing (e.g. the cache's per-layer
 * residency bitmap of the tier that counts). */
typedef bool (*route_resident_fn)(void *ctx, uint32_t expert);

struct route_cache_opts {
	uint32_t keep_top;       /* J: router's top-J always kept (>= 1) */
	float margin;            /* max key gap for a substitution (selection-key units) */
	route_resident_fn resident;
	void *ctx;
};

int route_cache_aware(const struct route_params *rp, const float *logits,
		      const struct route_cache_opts *opt, struct route_result *out);

/* Counters, declared once. */
#define ROUTE_COUNTERS(X)                                                              \
	X(calls, "routing decisions")                                                   \
	X(slots, "expert slots routed")                                                 \
	X(slots_open, "slots after the top-J whose exact expert was not resident")      \
	X(substitutions, "slots that took a resident expert instead")

struct route_counters {
#define ROUTE_X(name, help) uint64_t name;
	ROUTE_COUNTERS(ROUTE_X)
#undef ROUTE_X
};

/* Adds one decision's result to c. */
void route_count(struct route_counters *c, const struct route_result *r);

/* Writes one JSON line describing a substituted decision, with the logits, so
 * the quality cost can be measured offline:
 * {"tag":T,"layer":L,"exact":[..],"chosen":[..],"weights":[..],"logits":[..]}
 * Returns 0 or -errno. Writes nothing (returns 0) when r->n_subst == 0. */
int route_log_write(FILE *f, uint64_t tag, uint32_t layer, const struct route_params *rp,
		    const float *logits, const struct route_result *r);

#endif
