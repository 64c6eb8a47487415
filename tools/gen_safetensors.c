/* gen_safetensors.c - writes a generated model as a Hugging Face checkpoint:
 * model.safetensors or model-0000i-of-0000N.safetensors + index, and a
 * config.json with the family's keys (formats.md sections 1-3). */
#include "config.h"
#include "gen.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SP "\xe2\x96\x81" /* U+2581, SentencePiece's word boundary */

static const char *st_dtype(enum moe_dtype t)
{
	switch (t) {
	case MOE_DTYPE_F32: return "F32";
	case MOE_DTYPE_F16: return "F16";
	case MOE_DTYPE_BF16: return "BF16";
	case MOE_DTYPE_U8: return "U8";
	default: return NULL;
	}
}

static const char *torch_dtype(const struct gen_model *g)
{
	switch (g->dtype) {
	case MOE_DTYPE_F32: return "float32";
	case MOE_DTYPE_F16: return "float16";
	default: return "bfloat16";
	}
}

/* Every set_new below takes ownership even on failure; one check at the end
 * of the build (json_dumps of a NULL member fails) is enough. */
static void jset(json_t *o, const char *k, json_t *v)
{
	json_object_set_new(o, k, v);
}

static json_t *config_json(const struct gen_model *g)
{
	struct moe_model_config c;
	json_t *o = json_object();
	const enum moe_family f = g->family;
	const char *arch;
	gen_model_config(g, &c);
	switch (f) {
	case MOE_FAMILY_MIXTRAL: arch = "MixtralForCausalLM"; break;
	case MOE_FAMILY_QWEN2_MOE: arch = "Qwen2MoeForCausalLM"; break;
	case MOE_FAMILY_QWEN3_MOE: arch = "Qwen3MoeForCausalLM"; break;
	case MOE_FAMILY_DEEPSEEK_V2: arch = "DeepseekV2ForCausalLM"; break;
	case MOE_FAMILY_DEEPSEEK_V3: arch = "DeepseekV3ForCausalLM"; break;
	case MOE_FAMILY_OLMOE: arch = "OlmoeForCausalLM"; break;
	default: arch = "GptOssForCausalLM"; break;
	}
	jset(o, "architectures", json_pack("[s]", arch));
	jset(o, "model_type", json_string(moe_family_name(f)));
	jset(o, "hidden_size", json_integer(g->hidden));
	jset(o, "num_hidden_layers", json_integer(g->n_layers));
	jset(o, "vocab_size", json_integer(g->vocab));
	jset(o, "num_attention_heads", json_integer(g->n_head));
	jset(o, "num_key_value_heads", json_integer(g->n_head_kv));
	jset(o, "head_dim", json_integer(g->head_dim));
	jset(o, "max_position_embeddings", json_integer(g->ctx_len));
	jset(o, "rms_norm_eps", json_real(g->rms_eps));
	jset(o, "rope_theta", json_real(g->rope_theta));
	jset(o, "hidden_act", json_string("silu"));
	jset(o, "tie_word_embeddings", json_false());
	jset(o, "bos_token_id", json_integer(GEN_TOKEN_BOS));
	jset(o, "eos_token_id", json_integer(GEN_TOKEN_EOS));
	/* Qwen3 and OLMoE have no attention biases; Qwen2-MoE has q/k/v ones */
	if (f == MOE_FAMILY_QWEN3_MOE || f == MOE_FAMILY_OLMOE)
		jset(o, "attention_bias", json_false());
	jset(o, "torch_dtype", json_string(torch_dtype(g)));
	jset(o, "num_experts_per_tok", json_integer(g->top_k));
	switch (f) {
	case MOE_FAMILY_MIXTRAL:
		jset(o, "num_local_experts", json_integer(g->n_experts));
		jset(o, "intermediate_size", json_integer(g->width));
		jset(o, "router_aux_loss_coef", json_real(0.02));
		break;
	case MOE_FAMILY_QWEN2_MOE:
	case MOE_FAMILY_QWEN3_MOE:
		jset(o, "num_experts", json_integer(g->n_experts));
		jset(o, "moe_intermediate_size", json_integer(g->width));
		jset(o, "intermediate_size", json_integer(gen_ffn_length(g)));
		if (f == MOE_FAMILY_QWEN2_MOE)
			jset(o, "shared_expert_intermediate_size", json_integer(g->n_shared * g->width));
		jset(o, "norm_topk_prob", json_boolean(c.norm_topk_prob));
		jset(o, "decoder_sparse_step", json_integer(1));
		jset(o, "mlp_only_layers", json_array());
		break;
	case MOE_FAMILY_DEEPSEEK_V2:
	case MOE_FAMILY_DEEPSEEK_V3: {
		bool v3 = f == MOE_FAMILY_DEEPSEEK_V3;
		jset(o, "n_routed_experts", json_integer(g->n_experts));
		jset(o, "moe_intermediate_size", json_integer(g->width));
		jset(o, "intermediate_size", json_integer(g->dense_width));
		jset(o, "n_shared_experts", json_integer(g->n_shared));
		jset(o, "first_k_dense_replace", json_integer(g->dense_layers));
		jset(o, "moe_layer_freq", json_integer(1));
		jset(o, "scoring_func", json_string(v3 ? "sigmoid" : "softmax"));
		jset(o, "topk_method", json_string(v3 ? "noaux_tc" : g->n_group > 1 ? "group_limited_greedy" : "greedy"));
		jset(o, "n_group", json_integer(g->n_group));
		jset(o, "topk_group", json_integer(g->topk_group));
		jset(o, "routed_scaling_factor", json_real(c.routed_scaling_factor));
		jset(o, "norm_topk_prob", json_boolean(c.norm_topk_prob));
		break;
	}
	case MOE_FAMILY_OLMOE:
		jset(o, "num_experts", json_integer(g->n_experts));
		jset(o, "intermediate_size", json_integer(g->width));
		jset(o, "norm_topk_prob", json_boolean(c.norm_topk_prob));
		jset(o, "clip_qkv", json_null());
		break;
	default: /* gpt_oss */
		jset(o, "num_local_experts", json_integer(g->n_experts));
		jset(o, "experts_per_token", json_integer(g->top_k));
		jset(o, "intermediate_size", json_integer(g->width));
		jset(o, "swiglu_limit", json_real(c.swiglu_limit));
		if (g->dtype == MOE_DTYPE_MXFP4)
			jset(o, "quantization_config",
			     json_pack("{s:s, s:[s,s,s,s]}", "quant_method", "mxfp4", "modules_to_not_convert",
				       "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
				       "lm_head"));
		break;
	}
	/* lets tests and moe-pack regenerate the expected bytes */
	json_t *mg = json_pack("{s:i}", "version", 1);
	if (g->seed <= (uint64_t)INT64_MAX)
		jset(mg, "seed", json_integer((json_int_t)g->seed));
	else { /* JSON readers rarely take integers beyond int64 */
		char sd[24];
		snprintf(sd, sizeof(sd), "%llu", (unsigned long long)g->seed);
		jset(mg, "seed", json_string(sd));
	}
	jset(o, "moe_gen", mg);
	return o;
}

/* The vocabulary of gen_vocab_token() as HF "tokenizers" writes a
 * SentencePiece BPE with byte fallback (Mistral's layout): each piece's
 * merge joins its longest prefix that is a piece with the rest. */
static json_t *tokenizer_json(const struct gen_model *g)
{
	json_t *vocab = json_object(), *merges = json_array(), *added = json_array();
	char piece[32], a[32];
	int32_t type;
	for (uint32_t i = 0; i < g->vocab; i++) {
		int len = gen_vocab_token(i, piece, sizeof(piece), NULL, &type);
		if (len <= 0)
			break; /* past gen_vocab_token's range: validate bounds vocab below it */
		jset(vocab, piece, json_integer(i));
		if (type == 2 || type == 3)
			json_array_append_new(added, json_pack("{s:i, s:s, s:b, s:b, s:b, s:b, s:b}", "id", (int)i, "content",
							       piece, "single_word", 0, "lstrip", 0, "rstrip", 0,
							       "normalized", 0, "special", 1));
		if (type != 1)
			continue;
		/* the parts have lower ids, so they are in vocab already */
		for (int cut = len - 1; cut > 0; cut--) {
			if (((unsigned char)piece[cut] & 0xc0) == 0x80) /* inside a UTF-8 character */
				continue;
			memcpy(a, piece, (size_t)cut);
			a[cut] = '\0';
			if (json_object_get(vocab, a) && json_object_get(vocab, piece + cut)) {
				json_array_append_new(merges, json_sprintf("%s %s", a, piece + cut));
				break;
			}
		}
	}
	return json_pack(
		"{s:s, s:n, s:n, s:o, s:{s:s, s:[{s:s, s:s}, {s:s, s:{s:s}, s:s}]}, s:n,"
		" s:{s:s, s:[{s:{s:s, s:i}}, {s:{s:s, s:i}}], s:[], s:{s:{s:s, s:[i], s:[s]}}},"
		" s:{s:s, s:[{s:s, s:{s:s}, s:s}, {s:s}, {s:s}, {s:s, s:s, s:i, s:i}]},"
		" s:{s:s, s:n, s:s, s:n, s:n, s:b, s:b, s:b, s:o, s:o}}",
		"version", "1.0", "truncation", "padding", "added_tokens", added,
		"normalizer", "type", "Sequence", "normalizers", "type", "Prepend", "prepend", SP, "type", "Replace",
		"pattern", "String", " ", "content", SP,
		"pre_tokenizer",
		"post_processor", "type", "TemplateProcessing", "single", "SpecialToken", "id", "<s>", "type_id", 0,
		"Sequence", "id", "A", "type_id", 0, "pair", "special_tokens", "<s>", "id", "<s>", "ids", GEN_TOKEN_BOS,
		"tokens", "<s>",
		"decoder", "type", "Sequence", "decoders", "type", "Replace", "pattern", "String", SP, "content", " ",
		"type", "ByteFallback", "type", "Fuse", "type", "Strip", "content", " ", "start", 1, "stop", 0,
		"model", "type", "BPE", "dropout", "unk_token", "<unk>", "continuing_subword_prefix", "end_of_word_suffix",
		"fuse_unk", 1, "byte_fallback", 1, "ignore_merges", 0, "vocab", vocab, "merges", merges);
}

static json_t *tokenizer_config_json(const struct gen_model *g)
{
	return json_pack("{s:b, s:b, s:s, s:s, s:s, s:n, s:s, s:i, s:b}", "add_bos_token", 1, "add_eos_token", 0,
			 "bos_token", "<s>", "eos_token", "</s>", "unk_token", "<unk>", "pad_token", "tokenizer_class",
			 "LlamaTokenizer", "model_max_length", (int)g->ctx_len, "legacy", 0);
}

/* Writes a whole small file through a temporary name. */
static int write_small(const char *dir, const char *name, const char *text, uint64_t *bytes,
		       struct moe_error *err)
{
	char path[4096];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	int rc = gen_write_file(NULL, path, text, strlen(text), NULL, 0, 0, err);
	if (!rc)
		*bytes += strlen(text);
	return rc;
}

/* Writes o (consumed) as indented JSON. */
static int write_json(const char *dir, const char *name, json_t *o, uint64_t *bytes, struct moe_error *err)
{
	char *text = json_dumps(o, JSON_INDENT(2));
	json_decref(o);
	if (!text)
		return moe_error_set(err, -ENOMEM, "cannot build %s", name);
	int rc = write_small(dir, name, text, bytes, err);
	free(text);
	return rc;
}

int gen_make_dir(const char *dir, struct moe_error *err)
{
	struct stat st;
	char p[4096];
	if (snprintf(p, sizeof(p), "%s", dir) >= (int)sizeof(p))
		return moe_error_set(err, -ENAMETOOLONG, "output path too long");
	/* mkdir -p */
	for (char *s = p + 1; *s; s++) {
		if (*s != '/')
			continue;
		*s = '\0';
		if (mkdir(p, 0755) && errno != EEXIST)
			return moe_error_set(err, -errno, "%s: %s", p, strerror(errno));
		*s = '/';
	}
	if (mkdir(dir, 0755) && errno != EEXIST)
		return moe_error_set(err, -errno, "%s: %s", dir, strerror(errno));
	if (stat(dir, &st) || !S_ISDIR(st.st_mode))
		return moe_error_set(err, -ENOTDIR, "%s is not a directory", dir);
	return 0;
}

static void shard_name(const struct gen_model *g, uint32_t s, char *buf, size_t len)
{
	if (g->shards == 1)
		snprintf(buf, len, "model.safetensors");
	else
		snprintf(buf, len, "model-%05u-of-%05u.safetensors", s + 1, g->shards);
}

static int write_shard(const struct gen_model *g, const char *dir, const struct gen_tensor *t, size_t first,
		       size_t last, uint32_t s, uint64_t *bytes, struct moe_error *err)
{
	char name[64], path[4096];
	json_t *h = json_object();
	char *text = NULL;
	int rc = 0;

	jset(h, "__metadata__", json_pack("{s:s}", "format", "pt"));
	for (size_t i = first; i < last; i++) {
		json_t *shape = json_array();
		for (uint32_t d = 0; d < t[i].n_dims; d++)
			json_array_append_new(shape, json_integer((json_int_t)t[i].shape[d]));
		jset(h, t[i].name,
		     json_pack("{s:s, s:o, s:[I,I]}", "dtype", st_dtype(t[i].dtype), "shape", shape, "data_offsets",
			       (json_int_t)t[i].offset, (json_int_t)(t[i].offset + t[i].nbytes)));
	}
	text = json_dumps(h, JSON_COMPACT);
	json_decref(h);
	if (!text)
		return moe_error_set(err, -ENOMEM, "cannot build the safetensors header");
	/* pad with spaces so the data starts 8-aligned, as the Rust writer does */
	size_t hl = strlen(text), padded = MOE_ALIGN_UP(hl, (size_t)8);
	char *hdr = malloc(8 + padded);
	if (!hdr) {
		free(text);
		return moe_error_set(err, -ENOMEM, "out of memory");
	}
	uint64_t n = padded;
	for (int b = 0; b < 8; b++)
		hdr[b] = (char)(n >> (8 * b));
	memcpy(hdr + 8, text, hl);
	memset(hdr + 8 + hl, ' ', padded - hl);
	free(text);

	shard_name(g, s, name, sizeof(name));
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	rc = gen_write_file(g, path, hdr, 8 + padded, t, first, last, err);
	free(hdr);
	if (rc)
		return rc;
	uint64_t data = last > first ? t[last - 1].offset + t[last - 1].nbytes : 0;
	*bytes += 8 + padded + data;
	return 0;
}

int gen_write_safetensors(const struct gen_model *g, const char *dir, uint32_t *files,
			  uint64_t *bytes, struct moe_error *err)
{
	struct gen_tensor *t = NULL;
	size_t nt = 0;
	uint64_t total = 0, data_total = 0;
	int rc;

	if (g->format != GEN_FORMAT_SAFETENSORS)
		return moe_error_set(err, -EINVAL, "not a safetensors model");
	if ((rc = gen_model_tensors(g, &t, &nt, err)) || (rc = gen_make_dir(dir, err)))
		goto out;
	for (size_t first = 0; first < nt;) {
		size_t last = first;
		while (last < nt && t[last].file == t[first].file)
			last++;
		if ((rc = write_shard(g, dir, t, first, last, t[first].file, &total, err)))
			goto out;
		first = last;
	}
	for (size_t i = 0; i < nt; i++)
		data_total += t[i].nbytes;
	if (g->shards > 1) {
		json_t *idx = json_object(), *wm = json_object();
		char name[64];
		jset(idx, "metadata", json_pack("{s:I}", "total_size", (json_int_t)data_total));
		for (size_t i = 0; i < nt; i++) {
			shard_name(g, t[i].file, name, sizeof(name));
			jset(wm, t[i].name, json_string(name));
		}
		jset(idx, "weight_map", wm);
		if ((rc = write_json(dir, "model.safetensors.index.json", idx, &total, err)))
			goto out;
	}
	if ((rc = write_json(dir, "config.json", config_json(g), &total, err)))
		goto out;
	const bool spm = g->vocab >= GEN_VOCAB_MIN_SPM;
	if (spm && ((rc = write_json(dir, "tokenizer.json", tokenizer_json(g), &total, err)) ||
		    (rc = write_json(dir, "tokenizer_config.json", tokenizer_config_json(g), &total, err))))
		goto out;
	if (files)
		*files = g->shards + (g->shards > 1) + 1 + 2 * spm;
	if (bytes)
		*bytes = total;
out:
	free(t);
	return rc;
}
