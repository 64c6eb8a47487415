/* model.h - moe-run's model: the hyper-parameters (llama.cpp's GGUF keys,
 * from the pack's "gguf.kv" image or a GGUF file), every non-expert tensor
 * in memory by its GGUF name, and the routed experts' layout and routing
 * rule from the pack.
 *
 * Architectures (GGUF general.architecture): "llama" with experts
 * (Mixtral), "qwen2moe", "qwen3moe", "olmoe", "deepseek2" (MLA attention,
 * leading dense layers, ungated shared experts); each computed as
 * llama.cpp's graph for it (src/models/<arch>.cpp) does. */
#ifndef MOETIER_RUN_MODEL_H
#define MOETIER_RUN_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ffn.h"
#include "gguf.h"
#include "pack.h"
#include "route.h"
#include "util.h"

enum model_arch {
	MODEL_ARCH_LLAMA = 1,    /* Mixtral: norm RoPE, top-k weights renormalised */
	MODEL_ARCH_QWEN2MOE = 2, /* q/k/v biases, shared expert with a sigmoid gate */
	MODEL_ARCH_QWEN3MOE = 3, /* QK-norm per head */
	MODEL_ARCH_OLMOE = 4,    /* QK-norm over the whole q and k vectors */
	MODEL_ARCH_DEEPSEEK2 = 5, /* MLA attention (attention.c), dense lead layers, shared experts */
};

/* llama.cpp's rope types: NORM rotates adjacent pairs (x[2i], x[2i+1]),
 * NEOX pairs offset by half the rotated dims (x[i], x[i + n_rot/2]). */
enum model_rope { MODEL_ROPE_NORM = 0, MODEL_ROPE_NEOX = 2 };

/* A weight matrix [rows x cols] (cols contiguous) or a vector (rows 1);
 * data NULL when the model has no such tensor. */
struct model_mat {
	enum moe_dtype dtype;
	uint32_t rows, cols;
	const void *data;
};

struct model_layer {
	struct model_mat attn_norm, wq, wk, wv, wo;
	struct model_mat bq, bk, bv;          /* qwen2moe */
	struct model_mat q_norm, k_norm;      /* qwen3moe [head_dim], olmoe [n_embd] */
	struct model_mat ffn_norm, router;    /* router [n_experts x n_embd] */
	struct model_mat sh_gate, sh_up, sh_down, sh_gate_inp; /* shared expert (gate_inp: qwen2moe's sigmoid) */
	struct model_mat wo_b;                /* llama's optional attn_output.bias */
	/* deepseek2 MLA: q = wq_b(norm(wq_a x)) or wq x; [c | k_pe] = wkv_a x;
	 * per head k_b [kv_lora x nope] and v_b [v_dim x kv_lora] (attn_k_b /
	 * attn_v_b, or split from a legacy attn_kv_b at load) */
	struct model_mat wq_a, q_a_norm, wq_b, wkv_a, kv_a_norm, wk_b, wv_b;
	struct model_mat ffn_gate, ffn_up, ffn_down; /* a dense layer's FFN (deepseek2's leading layers) */
	const float *score_bias;              /* exp_probs_b.bias [n_experts] (f32) or NULL */
	int moe_index;                        /* the pack's MoE layer index; -1: a dense layer */
};

struct model {
	enum model_arch arch;
	char arch_name[32];
	uint32_t n_layers, n_embd, n_head, n_head_kv, head_dim, n_rot, n_vocab, n_ctx_train;
	float rms_eps, rope_base, rope_freq_scale;
	enum model_rope rope;
	/* RoPE as llama.cpp's context sets it up (YaRN when rope.scaling.type
	 * is yarn); rope_attn_factor 0 (a struct not from model_open) means 1 */
	float rope_ext_factor, rope_attn_factor, rope_beta_fast, rope_beta_slow;
	uint32_t rope_n_ctx_orig;
	float rope_yarn_log_mul;             /* deepseek2's rope.scaling.yarn_log_multiplier / 0.1 */
	struct model_mat rope_freqs;         /* llama's rope_freqs.weight [n_rot/2]: theta_i / f_i */
	/* deepseek2 (MLA): ranks, the per-head dims of the decompressed form,
	 * leading dense layers, the attention's kq scale (YaRN mscale^2 / sqrt(k)) */
	uint32_t n_lora_q, n_lora_kv, mla_k, mla_v, n_dense_lead;
	float kq_scale;
	uint32_t n_experts, top_k;
	struct model_mat tok_embd, output_norm, output;
	struct model_layer *layers;

	struct pack_file *pack;
	const struct moe_model_config *cfg;  /* the pack's */
	struct gguf_file *kv;                /* hyper-parameters (and the tokenizer) */
	void *kv_image;                      /* the pack's gguf.kv bytes (gguf_parse'd) */
	struct gguf_file *src;               /* --gguf FILE: KV and fallback tensors */
	struct ffn_layout layout;            /* routed experts of MoE layer 0 (of every layer unless mixed_layouts) */
	struct ffn_layout *layouts;          /* [n_moe_layers]: MoE layer l's (model_layout) */
	bool mixed_layouts;                  /* the layers' layouts differ (a version 2 pack) */
	struct run_latent *latent;           /* a MoLAE pack's B matrices (latent.h), else NULL */
	struct route_params rp;              /* llama.cpp's rule for the arch */
	uint64_t resident_bytes;             /* dense tensors held in memory */

	void **blobs;                        /* owned tensor memory */
	size_t n_blobs, cap_blobs;
};

/* Opens the pack, reads the KV (the pack's "gguf.kv", else gguf_path's),
 * loads every dense tensor (from the pack, else from gguf_path when given).
 * 0 or a negative errno with a message. */
int model_open(const char *pack_path, const char *gguf_path, struct model **out, struct moe_error *err);
void model_close(struct model *m);

/* The expert layout of MoE layer moe_l (the pack's index, model_layer's
 * moe_index): a version 2 pack's layers differ in their experts' types. */
static inline const struct ffn_layout *model_layout(const struct model *m, uint32_t moe_l)
{
	return &m->layouts[moe_l];
}

/* Multiply-adds below which a product runs on one thread (handing work to
 * the pool costs more): 256K, or $MOETIER_RUN_SPLIT_MIN (tests set 0 to split
 * everything). */
uint64_t model_split_min(void);

/* y[t*W->rows + r] = W[r] . x[t*W->cols] for t < B, through kernels/ffn.h
 * (the experts' dtype kernels, ggml's q8_0 integer dot). */
int model_matmul(const struct model_mat *W, const float *x, uint32_t B, float *y, int threads);
/* A dense layer's FFN (deepseek2's leading layers, llama.cpp's build_ffn
 * SILU PAR): y = down(silu(gate x) * up x) for B rows of x [B x n_embd]. */
int model_dense_ffn(const struct model *m, const struct model_layer *L, const float *x, uint32_t B, float *y,
		    int threads);
/* Row `tok` of token_embd as f32 (n_embd floats). */
int model_embed(const struct model *m, int32_t tok, float *out);
/* A 1-D f32 view of a norm/bias vector (dequantised at load). */
static inline const float *model_vec(const struct model_mat *v) { return (const float *)v->data; }

#endif
