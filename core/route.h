/* route.h - expert routing from router logits, by model family
 * (formats.md section 3), and cache-aware routing (MoCCE / CECAR style).
 *
 * Plain routing (route_topk) reproduces the family's rule exactly:
 *   SOFTMAX (Mixtral, Qwen, OLMoE, DeepSeek-V2): p = softmax(logits over all
 *     experts); top-k of p (DeepSeek-V2 group_limited_greedy: only the
 *     topk_group groups with the largest max-p are eligible); weights = p of the
 *     chosen; if norm_topk_prob (any k: top-1 gives 1), divide by
 *     max(sum, 2^-14); then multiply by routed_scaling_factor (DeepSeek-V2;
 *     1.0 elsewhere).
 *   SIGMOID (DeepSeek-V3): s = sigmoid(logits); c = s + score_bias (selection
 *     only); group-limited: group score = sum of the 2 largest c in the group,
 *     keep topk_group groups; top-k of c; weights gathered from s (not c);
 *     if norm_topk_prob divide by max(sum, 2^-14); then multiply by
 *     routed_scaling_factor.
 *   Both as llama.cpp's build_moe_ffn (norm_w, w_scale), which differs from
 *   DeepSeek's HF code (no renormalisation at top-1, no scaling after it).
 *   TOPK_SOFTMAX (GPT-OSS): top-k of the logits (router bias already added by
 *     the caller), weights = softmax over the k chosen logits.
 * Ties go to the lower expert id. Experts come out in rank order (best first).
 *
 * Cache-aware routing (route_cached, the rules below; route_cache_aware is
 * its margin rule with a residency callback) keeps the exact top-J (J >= 1) and,
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
	float exact_weights[ROUTE_MAX_K]; /* exact routing's weights (route_cached fills it;
					     route_topk too, = weights) */
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

/* The original margin rule with a residency callback (kept for moe-sim):
 * = route_cached with keep_top J, that margin, ROUTE_WEIGHTS_FAMILY, except
 * that J >= k or margin < 0 means exact routing instead of an error.
 * -EINVAL when opt is NULL or opt->keep_top is 0. */
int route_cache_aware(const struct route_params *rp, const float *logits,
		      const struct route_cache_opts *opt, struct route_result *out);

/* ---- Cache-aware rules (stable API, shared by moetierd's ROUTE and moe-run) ----
 *
 * One decision = exact routing first (route_topk's experts and weights, kept
 * in out->exact / out->exact_weights), then, for each slot i >= keep_top in
 * rank order whose exact expert is NOT resident, the slot MAY take a resident
 * expert instead. The router's top-J (slots 0..J-1) are never replaced, and a
 * resident exact expert is never replaced. A slot is "open" (out->open_mask)
 * when i >= J and its exact expert is not resident; an open slot is
 * substituted only when all of these hold:
 *   - share: exact_weights[i] / sum(exact_weights) < max_share
 *            (rule (b), "low-weight slots only"; max_share >= 1 = any slot);
 *   - a candidate exists: an expert r that is resident, not already in the
 *     set (exact or substituted), inside the allowed groups (group-limited
 *     families), with key(exact[i]) - key(r) <= margin (selection key: the raw
 *     logit for SOFTMAX and TOPK_SOFTMAX, so margin m bounds the probability
 *     ratio by e^m; c = sigmoid(logit) + bias for SIGMOID; INFINITY = no bound),
 *     and, when a similarity matrix is given, sim[exact[i]][r] >= min_similarity.
 *   The candidate taken is the one with the best key (rule (a), colibri
 *   keep-J + margin), or, with a similarity matrix, the most similar one to
 *   the replaced expert (rule (c); ties: better key, then lower id).
 * Weights of the final set (out->weights), by rule->weights:
 *   ROUTE_WEIGHTS_FAMILY  the family's rule over the final set (as if the
 *                         router had chosen it; route_topk's formula);
 *   ROUTE_WEIGHTS_RENORM  the family's rule over the final set, then scaled so
 *                         the weights sum to the exact set's sum (a weaker
 *                         substitute does not shrink the layer's output);
 *   ROUTE_WEIGHTS_INHERIT each slot keeps exact routing's weight: the
 *                         substitute stands in for the expert it replaces.
 * Without substitutions every mode gives route_topk's weights bit for bit.
 * resident: [n_experts] bytes, non-zero = resident in the tier that counts
 * (NULL = nothing resident, i.e. exact routing). similarity: [n_experts *
 * n_experts] row-major, sim[a * n_experts + b] (e.g. cosine of the experts'
 * output spaces, 1 on the diagonal), only row exact[i] is read. */
enum route_weights {
	ROUTE_WEIGHTS_FAMILY = 0,
	ROUTE_WEIGHTS_RENORM = 1,
	ROUTE_WEIGHTS_INHERIT = 2,
};

/* The named rules (presets of the fields below; the protocol and the CLIs use
 * these numbers and names). */
enum route_rule {
	ROUTE_RULE_EXACT = 0,      /* no substitution */
	ROUTE_RULE_MARGIN = 1,     /* (a) keep-J + margin, FAMILY weights */
	ROUTE_RULE_LOW_WEIGHT = 2, /* (b) + only slots with share < max_share, RENORM */
	ROUTE_RULE_SIMILARITY = 3, /* (c) + most similar resident, INHERIT weights */
};
#define ROUTE_RULE_COUNT 4

#define ROUTE_KEEP_ALL UINT32_MAX /* keep_top: every slot kept (exact routing) */

struct route_cache_rule {
	uint32_t keep_top;       /* J, 1..top_k: slots 0..J-1 are never substituted
				    (J = top_k or ROUTE_KEEP_ALL: exact routing) */
	float margin;            /* >= 0 (INFINITY allowed): max selection-key gap */
	float max_share;         /* (0, +inf): only slots whose exact weight share is
				    below it are substitutable; >= 1: every slot */
	uint32_t weights;        /* enum route_weights */
	const float *similarity; /* NULL, or [n_experts * n_experts] for rule (c) */
	float min_similarity;    /* with similarity: the least similarity accepted
				    (-INFINITY: any) */
};

/* Fills r with a named rule's defaults: keep_top J, margin m; LOW_WEIGHT sets
 * max_share 0.25 and RENORM weights; SIMILARITY sets min_similarity -INFINITY
 * and INHERIT weights (the caller sets r->similarity); MARGIN/EXACT: FAMILY,
 * max_share +inf. EXACT sets keep_top ROUTE_KEEP_ALL and margin 0. */
void route_cache_rule_init(struct route_cache_rule *r, enum route_rule kind, uint32_t keep_top,
			   float margin);

/* "exact", "margin", "low-weight", "similarity" (NULL for an unknown kind),
 * and back: the kind, or -EINVAL. */
const char *route_rule_name(enum route_rule kind);
int route_rule_parse(const char *name);

/* 0, or -EINVAL with a message: keep_top 0 or > top_k (top_k from rp;
 * ROUTE_KEEP_ALL is accepted),
 * margin NaN or < 0, max_share NaN or <= 0, unknown weights mode,
 * min_similarity NaN. */
int route_cache_rule_check(const struct route_params *rp, const struct route_cache_rule *rule,
			   struct moe_error *err);

/* One cache-aware decision (see above). rule NULL = exact routing. Returns 0,
 * or -EINVAL with a message in err (may be NULL): bad params, bad rule, a NaN
 * logit, fewer eligible experts than k. Thread-safe, no allocation. */
int route_cached(const struct route_params *rp, const float *logits, const uint8_t *resident,
		 const struct route_cache_rule *rule, struct route_result *out, struct moe_error *err);

/* ---- Expert-similarity tables (rule (c)), stored with the pack ----
 * `moe-pack similarity PACK` writes, per MoE layer, a resident F32 tensor
 * [n_experts x n_experts] named ROUTE_SIMILARITY_TENSOR with the model layer
 * index (role PACK_ROLE_OTHER): sim[a * n + b] = cosine of the outputs of
 * experts a and b over the same probe inputs (output-space similarity;
 * symmetric, 1 on the diagonal, in [-1, 1]). */
#define ROUTE_SIMILARITY_TENSOR "blk.%u.ffn_expert_similarity"

struct pack_file;
/* Reads MoE layer l's table into sim[n_experts * n_experts]. 0, -ENOENT
 * (the pack has none: run moe-pack similarity), -EINVAL (wrong shape or
 * dtype), or a read/CRC error; with a message. */
int route_similarity_read(const struct pack_file *p, uint32_t moe_layer, float *sim, struct moe_error *err);

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
