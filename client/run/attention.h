/* attention.h - moe-run's dense per-layer pieces: RMSNorm, RoPE, and the
 * self-attention block (q/k/v projections with qwen2moe's biases, QK-norm
 * where the arch has it, RoPE, an f32 KV cache, GQA softmax attention, the
 * output projection) for a batch of consecutive positions, computed in the
 * order and with the float rounding of llama.cpp's CPU graph. */
#ifndef MOETIER_RUN_ATTENTION_H
#define MOETIER_RUN_ATTENTION_H

#include <stdint.h>

#include "model.h"

/* ggml's rms_norm then the weight multiply: y = (x * (1/sqrt(mean(x^2) + eps))) * w,
 * the sum of squares in double as ggml_compute_forward_rms_norm_f32 does. w NULL: no weight.
 * y may equal x. */
void attn_rmsnorm(const float *x, const float *w, float *y, uint32_t n, float eps);

/* Rotates n_heads heads of head_dim floats at x (stride head_dim) for position pos:
 * ggml_rope_ext with ext_factor 0, attn_factor 1 (theta_i = pos * freq_scale * base^(-2i/n_rot),
 * the powers built as ggml does, by repeated multiplication in float). */
void attn_rope(float *x, uint32_t n_heads, uint32_t head_dim, uint32_t n_rot, uint32_t pos, float base,
	       float freq_scale, enum model_rope mode);

/* ggml_rope_ext in full (ggml-cpu's rope_yarn and ggml_rope_cache_init):
 * theta_i = pos * base^(-2i/n_rot) / freq_factors[i], YaRN-mixed with its
 * freq_scale'd copy by ext_factor over the corr dims of n_ctx_orig,
 * beta_fast and beta_slow; cos and sin times attn_factor (and YaRN's
 * magnitude correction). */
struct attn_rope {
	uint32_t n_rot, n_ctx_orig;
	float base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow;
	const float *freq_factors; /* [n_rot/2] or NULL */
	enum model_rope mode;
};
/* The model's RoPE as llama.cpp's graph passes it (llama's rope_freqs). */
void attn_rope_of(const struct model *m, struct attn_rope *p);
/* Rotates the first p->n_rot dims of n_heads heads at x (stride head_dim). */
void attn_rope_ext(float *x, uint32_t n_heads, uint32_t head_dim, uint32_t pos, const struct attn_rope *p);

/* The KV cache: per layer, n_ctx positions of n_head_kv * head_dim floats for K and for V.
 * f16: compute as llama.cpp's default F16 cache does without flash attention
 * (K and V rounded to f16 when stored, q rounded to f16 for q.k, the softmax
 * output rounded to f16 for the sum over V), so that its logits can be
 * compared closely; the values are still held in f32.
 * deepseek2 (MLA): one entry per position, [kv_lora latent | n_rot k_pe],
 * both K and (its latent part) V as in llama.cpp's MLA cache; v unused. */
struct attn_cache {
	uint32_t n_ctx, n_layers, kv_dim;
	bool f16;
	float *k, *v;
};
int attn_cache_init(struct attn_cache *c, const struct model *m, uint32_t n_ctx, struct moe_error *err);
void attn_cache_free(struct attn_cache *c);

/* Scratch for attn_block, sized for up to max_batch positions. */
struct attn_ws {
	uint32_t max_batch;
	float *q, *k, *v, *o, *scores;
	float *qa, *qc, *lat, *t1, *t2; /* MLA: q_a, absorbed q, latent output, per-head staging */
};
int attn_ws_init(struct attn_ws *w, const struct model *m, uint32_t max_batch, uint32_t n_ctx, struct moe_error *err);
void attn_ws_free(struct attn_ws *w);

/* deepseek2's multi-head latent attention (llama.cpp's deepseek2 graph,
 * the is_mla "absorbed" form: q_nope through each head's k_b, scores
 * against the cached latent and k_pe, the latent output through v_b);
 * attn_block calls it for that arch. */
int attn_mla_block(const struct model *m, uint32_t il, struct attn_cache *c, struct attn_ws *w, uint32_t pos0,
		   uint32_t B, const float *xn, float *out, int threads);

/* Layer il's attention for B positions pos0..pos0+B-1: xn [B x n_embd] is the
 * attn_norm'ed input; writes out [B x n_embd] (after the output projection),
 * K and V to the cache. pos0 + B <= c->n_ctx. 0 or a negative errno. */
int attn_block(const struct model *m, uint32_t il, struct attn_cache *c, struct attn_ws *w, uint32_t pos0, uint32_t B,
	       const float *xn, float *out, int threads);

#endif
