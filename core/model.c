/* model.c - model family names, defaults and validation. */
#include "config.h"
#include "model.h"
#include "util.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

static const struct {
	const char *name;
	const char *aliases[4];
} family_names[MOE_FAMILY_COUNT] = {
	[MOE_FAMILY_UNKNOWN] = { "unknown", { NULL } },
	[MOE_FAMILY_MIXTRAL] = { "mixtral", { "llama", NULL } },
	[MOE_FAMILY_QWEN2_MOE] = { "qwen2_moe", { "qwen2moe", NULL } },
	[MOE_FAMILY_QWEN3_MOE] = { "qwen3_moe", { "qwen3moe", NULL } },
	[MOE_FAMILY_DEEPSEEK_V2] = { "deepseek_v2", { "deepseek2", "deepseekv2", NULL } },
	[MOE_FAMILY_DEEPSEEK_V3] = { "deepseek_v3", { "deepseek3", "deepseekv3", NULL } },
	[MOE_FAMILY_OLMOE] = { "olmoe", { NULL } },
	[MOE_FAMILY_GPT_OSS] = { "gpt_oss", { "gpt-oss", "gptoss", NULL } },
};

const char *moe_family_name(enum moe_family f)
{
	if ((unsigned)f >= MOE_FAMILY_COUNT)
		f = MOE_FAMILY_UNKNOWN;
	return family_names[f].name;
}

enum moe_family moe_family_parse(const char *name)
{
	if (!name)
		return MOE_FAMILY_UNKNOWN;
	for (int f = 1; f < MOE_FAMILY_COUNT; f++) {
		if (strcasecmp(name, family_names[f].name) == 0)
			return (enum moe_family)f;
		for (int a = 0; a < 4 && family_names[f].aliases[a]; a++)
			if (strcasecmp(name, family_names[f].aliases[a]) == 0)
				return (enum moe_family)f;
	}
	return MOE_FAMILY_UNKNOWN;
}

void moe_model_set_family_defaults(struct moe_model_config *c, enum moe_family f)
{
	c->family = f;
	c->scoring = MOE_SCORING_SOFTMAX;
	c->topk_method = MOE_TOPK_GREEDY;
	c->norm_topk_prob = 0;
	c->n_group = 1;
	c->topk_group = 1;
	c->routed_scaling_factor = 1.0f;
	c->ffn_kind = MOE_FFN_SWIGLU;
	c->swiglu_limit = 0.0f;
	c->glu_alpha = 0.0f;
	c->has_score_bias = 0;
	c->has_router_bias = 0;
	if (!c->moe_layer_step)
		c->moe_layer_step = 1;
	switch (f) {
	case MOE_FAMILY_MIXTRAL:
	case MOE_FAMILY_QWEN3_MOE:
		c->norm_topk_prob = 1;
		break;
	case MOE_FAMILY_DEEPSEEK_V3:
		c->scoring = MOE_SCORING_SIGMOID;
		c->topk_method = MOE_TOPK_GROUP_LIMITED;
		c->norm_topk_prob = 1;
		c->routed_scaling_factor = 2.5f;
		c->has_score_bias = 1;
		break;
	case MOE_FAMILY_GPT_OSS:
		c->scoring = MOE_SCORING_TOPK_SOFTMAX;
		c->ffn_kind = MOE_FFN_GPTOSS;
		c->swiglu_limit = 7.0f;
		c->glu_alpha = 1.702f;
		c->has_router_bias = 1;
		break;
	default:
		break;
	}
}

int moe_model_moe_index(const struct moe_model_config *c, uint32_t layer)
{
	uint32_t step = c->moe_layer_step ? c->moe_layer_step : 1;
	if (layer < c->first_moe_layer)
		return -1;
	uint32_t d = layer - c->first_moe_layer;
	if (d % step || d / step >= c->n_moe_layers)
		return -1;
	return (int)(d / step);
}

int moe_model_validate(const struct moe_model_config *c, struct moe_error *err)
{
	if (memchr(c->name, '\0', sizeof(c->name)) == NULL)
		return moe_error_set(err, -EINVAL, "model name is not NUL-terminated");
	if (c->family == MOE_FAMILY_UNKNOWN || c->family >= MOE_FAMILY_COUNT)
		return moe_error_set(err, -EINVAL, "unknown model family %u", c->family);
	if (c->dtype == MOE_DTYPE_INVALID || c->dtype >= MOE_DTYPE_COUNT)
		return moe_error_set(err, -EINVAL, "unknown expert dtype %u", c->dtype);
	if (c->hidden == 0 || c->hidden > (1u << 20) || c->expert_width == 0 || c->expert_width > (1u << 20))
		return moe_error_set(err, -EINVAL, "hidden size %u / expert width %u out of range", c->hidden, c->expert_width);
	if (c->n_experts == 0 || c->n_experts > 4096)
		return moe_error_set(err, -EINVAL, "expert count %u out of range (1..4096)", c->n_experts);
	if (c->top_k == 0 || c->top_k > c->n_experts || c->top_k > 64)
		return moe_error_set(err, -EINVAL, "top-k %u out of range (1..min(64, %u))", c->top_k, c->n_experts);
	if (c->n_layers == 0 || c->n_layers > 1024)
		return moe_error_set(err, -EINVAL, "layer count (n_layers) %u out of range (1..1024)", c->n_layers);
	if (c->n_moe_layers == 0 || c->n_moe_layers > c->n_layers)
		return moe_error_set(err, -EINVAL, "MoE layer count (n_moe_layers) %u out of range (1..%u layers)",
				     c->n_moe_layers, c->n_layers);
	uint32_t step = c->moe_layer_step ? c->moe_layer_step : 1;
	if ((uint64_t)c->first_moe_layer + (uint64_t)(c->n_moe_layers - 1) * step >= c->n_layers)
		return moe_error_set(err, -EINVAL, "MoE layers (first %u, %u of them, step %u) exceed %u layers",
				     c->first_moe_layer, c->n_moe_layers, step, c->n_layers);
	if (c->scoring < MOE_SCORING_SOFTMAX || c->scoring > MOE_SCORING_TOPK_SOFTMAX)
		return moe_error_set(err, -EINVAL, "unknown scoring function %u", c->scoring);
	if (c->topk_method < MOE_TOPK_GREEDY || c->topk_method > MOE_TOPK_GROUP_LIMITED)
		return moe_error_set(err, -EINVAL, "unknown top-k method %u", c->topk_method);
	if (c->topk_method == MOE_TOPK_GROUP_LIMITED &&
	    (c->n_group == 0 || c->n_experts % c->n_group || c->topk_group == 0 || c->topk_group > c->n_group))
		return moe_error_set(err, -EINVAL, "bad expert groups: %u groups, %u used, %u experts",
				     c->n_group, c->topk_group, c->n_experts);
	if (c->ffn_kind != MOE_FFN_SWIGLU && c->ffn_kind != MOE_FFN_GPTOSS && c->ffn_kind != MOE_FFN_SILU)
		return moe_error_set(err, -EINVAL, "unknown FFN kind %u", c->ffn_kind);
	if (!(c->routed_scaling_factor > 0.0f && c->routed_scaling_factor < 1e6f))
		return moe_error_set(err, -EINVAL, "routed scaling factor out of range");
	return 0;
}
