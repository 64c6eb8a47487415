/* model.h - the model configuration moetierd needs: family, shapes, routing.
 * The struct is stored verbatim (little-endian) in pack headers, so its
 * layout is fixed: append fields by taking them from `reserved`. */
#ifndef MOETIER_MODEL_H
#define MOETIER_MODEL_H

#include <stdint.h>
#include "dtype.h"

/* Stored in packs: append only. */
enum moe_family {
	MOE_FAMILY_UNKNOWN = 0,
	MOE_FAMILY_MIXTRAL = 1,
	MOE_FAMILY_QWEN2_MOE = 2,
	MOE_FAMILY_QWEN3_MOE = 3,
	MOE_FAMILY_DEEPSEEK_V2 = 4,
	MOE_FAMILY_DEEPSEEK_V3 = 5,
	MOE_FAMILY_OLMOE = 6,
	MOE_FAMILY_GPT_OSS = 7,
	MOE_FAMILY_COUNT
};

/* How router scores are made (formats.md section 3). */
enum moe_scoring {
	MOE_SCORING_SOFTMAX = 1,      /* softmax over all experts, then top-k */
	MOE_SCORING_SIGMOID = 2,      /* sigmoid; DeepSeek-V3 (bias only for selection) */
	MOE_SCORING_TOPK_SOFTMAX = 3, /* top-k of logits, softmax over the k (GPT-OSS) */
};

enum moe_topk_method {
	MOE_TOPK_GREEDY = 1,
	MOE_TOPK_GROUP_LIMITED = 2, /* n_group / topk_group (DeepSeek V2 group_limited_greedy, V3 noaux_tc) */
};

/* Expert FFN variant. */
enum moe_ffn_kind {
	MOE_FFN_SWIGLU = 1, /* y = down(silu(gate x) * (up x)) */
	MOE_FFN_GPTOSS = 2, /* interleaved gate/up with bias, clamp, glu(alpha=1.702), down + bias */
	MOE_FFN_SILU = 3,   /* no gate: y = down(silu(up x)) (llama.cpp's build_moe_ffn, LLM_FFN_SILU, gate_exps NULL) */
};

struct moe_model_config {
	char name[64];               /* NUL-terminated */
	uint32_t family;             /* enum moe_family */
	uint32_t dtype;              /* enum moe_dtype of the expert matrices */
	uint32_t hidden;             /* n: hidden size */
	uint32_t expert_width;       /* m: routed expert intermediate size */
	uint32_t n_experts;          /* routed experts per MoE layer */
	uint32_t top_k;
	uint32_t n_layers;           /* all transformer layers */
	uint32_t n_moe_layers;       /* layers that have routed experts */
	uint32_t first_moe_layer;    /* model layer index of the first MoE layer */
	uint32_t moe_layer_step;     /* MoE layer i is model layer first + i * step */
	uint32_t n_shared_experts;
	uint32_t shared_width;       /* total intermediate size of the shared expert(s) */
	uint32_t scoring;            /* enum moe_scoring */
	uint32_t topk_method;        /* enum moe_topk_method */
	uint32_t norm_topk_prob;     /* 1: renormalize the top-k weights to sum 1 */
	uint32_t n_group;
	uint32_t topk_group;
	float routed_scaling_factor; /* 1.0 when the family has none */
	uint32_t ffn_kind;           /* enum moe_ffn_kind */
	float swiglu_limit;          /* GPT-OSS clamp (7.0); 0 = none */
	float glu_alpha;             /* GPT-OSS 1.702; 0 = plain silu */
	uint32_t has_score_bias;     /* DeepSeek-V3 e_score_correction_bias present */
	uint32_t has_router_bias;    /* GPT-OSS router bias present */
	uint32_t reserved[40];
};
_Static_assert(sizeof(struct moe_model_config) == 64 + 23 * 4 + 40 * 4, "model config layout");

/* "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe", "gpt_oss". */
const char *moe_family_name(enum moe_family f);
/* Accepts the names above and HF model_type / GGUF architecture spellings
 * ("qwen2moe", "deepseek2", "gpt-oss"...). UNKNOWN if none matches. */
enum moe_family moe_family_parse(const char *name);
/* Fills the routing fields with the family's defaults. */
void moe_model_set_family_defaults(struct moe_model_config *c, enum moe_family f);
/* Model layer index of MoE layer i. */
static inline uint32_t moe_model_layer_of(const struct moe_model_config *c, uint32_t i)
{
	return c->first_moe_layer + i * (c->moe_layer_step ? c->moe_layer_step : 1);
}
/* MoE layer index of model layer `layer`, or -1 if that layer has no routed experts. */
int moe_model_moe_index(const struct moe_model_config *c, uint32_t layer);
/* Checks shapes and enums are sane and bounded (n_experts <= 4096, top_k <=
 * n_experts, dims <= 1<<20, ...). Returns 0 or -EINVAL with a message. */
struct moe_error;
int moe_model_validate(const struct moe_model_config *c, struct moe_error *err);

#endif
