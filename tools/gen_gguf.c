/* gen_gguf.c - writes a generated model as one GGUF v3 file with llama.cpp's
 * MoE metadata keys and stacked ffn_*_exps tensors (formats.md section 4). */
#include "config.h"
#include "gen.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { KV_U32 = 4, KV_I32 = 5, KV_F32 = 6, KV_BOOL = 7, KV_STRING = 8, KV_ARRAY = 9, KV_U64 = 10 };

struct obuf {
	uint8_t *p;
	size_t len, cap;
	int rc;
};

static void put(struct obuf *b, const void *data, size_t n)
{
	if (b->rc)
		return;
	if (b->len + n > b->cap) {
		size_t cap = MOE_MAX(b->cap * 2, b->len + n + 4096);
		uint8_t *p = realloc(b->p, cap);
		if (!p) {
			b->rc = -ENOMEM;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->len, data, n);
	b->len += n;
}

/* GGUF is little-endian; so is every target moetierd builds for. */
static void put_u32(struct obuf *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(struct obuf *b, uint64_t v) { put(b, &v, 8); }

static void put_str(struct obuf *b, const char *s)
{
	put_u64(b, strlen(s));
	put(b, s, strlen(s));
}

struct kvw {
	struct obuf *b;
	const char *arch;
	uint64_t count;
};

static void key(struct kvw *w, const char *k, uint32_t type)
{
	put_str(w->b, k);
	put_u32(w->b, type);
	w->count++;
}

static void akey(struct kvw *w, const char *k, uint32_t type)
{
	char full[128];
	snprintf(full, sizeof(full), "%s.%s", w->arch, k);
	key(w, full, type);
}

static void kv_u32(struct kvw *w, const char *k, uint32_t v) { akey(w, k, KV_U32); put_u32(w->b, v); }

static void kv_f32(struct kvw *w, const char *k, float v)
{
	akey(w, k, KV_F32);
	put(w->b, &v, 4);
}

static void kv_bool(struct kvw *w, const char *k, bool v)
{
	uint8_t u = v;
	akey(w, k, KV_BOOL);
	put(w->b, &u, 1);
}

static uint32_t ggml_type(enum moe_dtype t)
{
	switch (t) {
	case MOE_DTYPE_F32: return 0;
	case MOE_DTYPE_F16: return 1;
	case MOE_DTYPE_Q4_0: return 2;
	case MOE_DTYPE_Q8_0: return 8;
	case MOE_DTYPE_BF16: return 30;
	case MOE_DTYPE_MXFP4: return 39;
	default: return UINT32_MAX;
	}
}

static void array_head(struct kvw *w, const char *k, uint32_t type, uint64_t n)
{
	key(w, k, KV_ARRAY);
	put_u32(w->b, type);
	put_u64(w->b, n);
}

/* llama.cpp always wants tokenizer.ggml.model: a SentencePiece vocabulary
 * (gen_vocab_token) when the vocab holds the bytes, else "no_vocab" with
 * %s.vocab_size (enough for its C API). */
static void vocabulary(const struct gen_model *g, struct kvw *w)
{
	const bool spm = g->vocab >= GEN_VOCAB_MIN_SPM;
	key(w, "tokenizer.ggml.model", KV_STRING);
	put_str(w->b, spm ? "llama" : "no_vocab");
	if (!spm)
		return;
	char piece[32];
	float score;
	int32_t type;
	array_head(w, "tokenizer.ggml.tokens", KV_STRING, g->vocab);
	for (uint32_t i = 0; i < g->vocab; i++) {
		gen_vocab_token(i, piece, sizeof(piece), NULL, NULL);
		put_str(w->b, piece);
	}
	array_head(w, "tokenizer.ggml.scores", KV_F32, g->vocab);
	for (uint32_t i = 0; i < g->vocab; i++) {
		gen_vocab_token(i, piece, sizeof(piece), &score, NULL);
		put(w->b, &score, 4);
	}
	array_head(w, "tokenizer.ggml.token_type", KV_I32, g->vocab);
	for (uint32_t i = 0; i < g->vocab; i++) {
		gen_vocab_token(i, piece, sizeof(piece), NULL, &type);
		put(w->b, &type, 4);
	}
	static const struct {
		const char *k;
		uint32_t id;
	} special[] = { { "tokenizer.ggml.bos_token_id", GEN_TOKEN_BOS },
			{ "tokenizer.ggml.eos_token_id", GEN_TOKEN_EOS },
			{ "tokenizer.ggml.unknown_token_id", GEN_TOKEN_UNK } };
	for (size_t i = 0; i < MOE_ARRAY_SIZE(special); i++) {
		key(w, special[i].k, KV_U32);
		put_u32(w->b, special[i].id);
	}
	static const struct {
		const char *k;
		uint8_t v;
	} flags[] = { { "tokenizer.ggml.add_bos_token", 1 }, { "tokenizer.ggml.add_eos_token", 0 },
		      { "tokenizer.ggml.add_space_prefix", 1 } }; /* llama.cpp's SPM defaults, said */
	for (size_t i = 0; i < MOE_ARRAY_SIZE(flags); i++) {
		key(w, flags[i].k, KV_BOOL);
		put(w->b, &flags[i].v, 1);
	}
}

static void metadata(const struct gen_model *g, struct kvw *w)
{
	struct moe_model_config c;
	char name[96];
	gen_model_config(g, &c);
	key(w, "general.architecture", KV_STRING);
	put_str(w->b, w->arch);
	snprintf(name, sizeof(name), "moe-gen %s seed %llu", moe_family_name(g->family), (unsigned long long)g->seed);
	key(w, "general.name", KV_STRING);
	put_str(w->b, name);
	if (moe_dtype_is_quantized(g->dtype)) {
		key(w, "general.quantization_version", KV_U32);
		put_u32(w->b, 2);
	}
	if (g->gguf_alignment != 32) {
		key(w, "general.alignment", KV_U32);
		put_u32(w->b, g->gguf_alignment);
	}
	/* lets tests and moe-pack regenerate the expected bytes */
	key(w, "moe_gen.seed", KV_U64);
	put_u64(w->b, g->seed);
	key(w, "moe_gen.version", KV_U32);
	put_u32(w->b, 1);

	kv_u32(w, "block_count", g->n_layers);
	kv_u32(w, "context_length", g->ctx_len);
	kv_u32(w, "embedding_length", g->hidden);
	/* olmoe and llama size their experts by this key, qwen*moe by the
	 * expert_ one below */
	kv_u32(w, "feed_forward_length", gen_ffn_length(g));
	kv_u32(w, "vocab_size", g->vocab);
	kv_u32(w, "attention.head_count", g->n_head);
	kv_u32(w, "attention.head_count_kv", g->n_head_kv);
	kv_u32(w, "attention.key_length", g->head_dim);
	kv_u32(w, "attention.value_length", g->head_dim);
	kv_f32(w, "attention.layer_norm_rms_epsilon", g->rms_eps);
	kv_u32(w, "rope.dimension_count", g->head_dim);
	kv_f32(w, "rope.freq_base", g->rope_theta);
	kv_u32(w, "expert_count", g->n_experts);
	kv_u32(w, "expert_used_count", g->top_k);
	kv_u32(w, "expert_feed_forward_length", g->width);
	kv_u32(w, "expert_shared_count", c.n_shared_experts);
	kv_u32(w, "expert_shared_feed_forward_length", c.shared_width);
	kv_u32(w, "expert_group_count", g->n_group);
	kv_u32(w, "expert_group_used_count", g->topk_group);
	kv_f32(w, "expert_weights_scale", c.routed_scaling_factor);
	kv_bool(w, "expert_weights_norm", c.norm_topk_prob != 0);
	/* llama.cpp's ExpertGatingFuncType: SOFTMAX = 1, SIGMOID = 2. GPT-OSS's
	 * softmax over the selected logits has no file value (llama.cpp sets it
	 * from the architecture), so none is written for it. */
	if (g->family != MOE_FAMILY_GPT_OSS)
		kv_u32(w, "expert_gating_func", c.scoring == MOE_SCORING_SIGMOID ? 2 : 1);
	kv_u32(w, "leading_dense_block_count", g->dense_layers);
	if (g->family == MOE_FAMILY_GPT_OSS)
		kv_f32(w, "swiglu_limit", c.swiglu_limit); /* hint only; readers use 7.0 */
	vocabulary(g, w);
}

int gen_write_gguf(const struct gen_model *g, const char *dir, uint32_t *files, uint64_t *bytes,
		   struct moe_error *err)
{
	struct gen_tensor *t = NULL;
	size_t nt = 0;
	struct obuf kv = { 0 }, b = { 0 };
	struct kvw w = { .b = &kv, .arch = gen_gguf_arch(g->family) };
	char path[4096];
	int rc;

	if (g->format != GEN_FORMAT_GGUF)
		return moe_error_set(err, -EINVAL, "not a GGUF model");
	if ((rc = gen_model_tensors(g, &t, &nt, err)) || (rc = gen_make_dir(dir, err)))
		goto out;
	metadata(g, &w);
	put_u32(&b, 0x46554747u); /* "GGUF" */
	put_u32(&b, 3);
	put_u64(&b, nt);
	put_u64(&b, w.count);
	if (!kv.rc)
		put(&b, kv.p, kv.len);
	for (size_t i = 0; i < nt; i++) {
		put_str(&b, t[i].name);
		put_u32(&b, t[i].n_dims);
		for (uint32_t d = t[i].n_dims; d-- > 0;) /* ne[0] is the innermost dim */
			put_u64(&b, t[i].shape[d]);
		put_u32(&b, ggml_type(t[i].dtype));
		put_u64(&b, t[i].offset);
	}
	size_t hdr = b.len, data_start = MOE_ALIGN_UP(hdr, (size_t)g->gguf_alignment);
	static const uint8_t zero[65536];
	put(&b, zero, data_start - hdr);
	if (kv.rc || b.rc) {
		rc = moe_error_set(err, -ENOMEM, "out of memory building the GGUF header");
		goto out;
	}

	snprintf(path, sizeof(path), "%s/model.gguf", dir);
	if ((rc = gen_write_file(g, path, b.p, b.len, t, 0, nt, err)))
		goto out;
	if (files)
		*files = 1;
	if (bytes)
		*bytes = data_start + (nt ? t[nt - 1].offset + t[nt - 1].nbytes : 0);
out:
	free(kv.p);
	free(b.p);
	free(t);
	return rc;
}
