/* gen.c - moe-gen's value generator, family tensor lists and byte producer
 * (the contract is in gen.h). */
#include "config.h"
#include "gen.h"
#include "trace.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define GOLDEN 0x9e3779b97f4a7c15ull
/* Floats generated per step inside a row: a multiple of the 32-element
 * block, small enough to stay in L1. */
#define CHUNK 1024

/* splitmix64's output mixer (Stafford variant 13). */
static inline uint64_t mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static uint64_t stream_key(uint64_t seed, uint32_t role, uint32_t layer, uint32_t expert)
{
	uint64_t k = mix64(seed ^ GEN_SEED_SALT);
	k = mix64(k + (uint64_t)role * GOLDEN);
	return mix64(k ^ ((uint64_t)layer << 32 | expert));
}

/* v = scale * (int32)(z >> 32) + off, scale = amp * 2^-31 (exact). */
static void role_scale(uint32_t role, uint32_t fan_in, float *scale, float *off)
{
	float amp;
	*off = 0.0f;
	switch (role) {
	case GEN_ROLE_FINAL_NORM:
	case GEN_ROLE_ATTN_NORM:
	case GEN_ROLE_FFN_NORM:
	case GEN_ROLE_ATTN_Q_NORM:
	case GEN_ROLE_ATTN_K_NORM:
		amp = 1.0f / 16.0f;
		*off = 1.0f;
		break;
	case GEN_ROLE_EXPERT_GATE_BIAS:
	case GEN_ROLE_EXPERT_UP_BIAS:
	case GEN_ROLE_EXPERT_DOWN_BIAS:
	case GEN_ROLE_ROUTER_BIAS:
	case GEN_ROLE_SCORE_BIAS:
	case GEN_ROLE_ATTN_Q_BIAS:
	case GEN_ROLE_ATTN_K_BIAS:
	case GEN_ROLE_ATTN_V_BIAS:
		amp = 1.0f / 64.0f;
		break;
	case GEN_ROLE_EMBED:
		amp = 1.0f;
		break;
	default: /* matrices: keep x.W^T of unit-scale inputs near unit scale */
		amp = 1.0f / sqrtf((float)(fan_in ? fan_in : 1));
		break;
	}
	*scale = amp * 0x1p-31f;
}

static inline float value_at(uint64_t key, float scale, float off, uint64_t idx)
{
	uint64_t z = mix64(key + (idx + 1) * GOLDEN);
	return (float)(int32_t)(z >> 32) * scale + off;
}

void gen_fill_f32(uint64_t seed, enum gen_role role, uint32_t layer, uint32_t expert,
		  uint32_t fan_in, uint64_t start, float *out, size_t n)
{
	float scale, off;
	const uint64_t key = stream_key(seed, role, layer, expert);
	role_scale(role, fan_in, &scale, &off);
	uint64_t c = key + (start + 1) * GOLDEN;
	if (off == 0.0f) {
		for (size_t i = 0; i < n; i++, c += GOLDEN)
			out[i] = (float)(int32_t)(mix64(c) >> 32) * scale;
	} else {
		for (size_t i = 0; i < n; i++, c += GOLDEN)
			out[i] = (float)(int32_t)(mix64(c) >> 32) * scale + off;
	}
}

size_t gen_encode(enum moe_dtype t, const float *src, size_t n, void *dst)
{
	size_t i;
	switch (t) {
	case MOE_DTYPE_F32:
		memcpy(dst, src, n * 4);
		return n * 4;
	case MOE_DTYPE_F16: {
		uint8_t *d = dst; /* rows may start at odd offsets inside a chunk */
		for (i = 0; i < n; i++) {
			uint16_t h = moe_f32_to_f16(src[i]);
			memcpy(d + 2 * i, &h, 2);
		}
		return n * 2;
	}
	case MOE_DTYPE_BF16: {
		/* moe_f32_to_bf16's rounding inlined for speed (the hot loop of
		 * multi-GiB bf16 models); NaNs take the dtype.h path. test_gen
		 * checks both agree. */
		uint8_t *d = dst;
		for (i = 0; i < n; i++) {
			uint32_t u;
			memcpy(&u, &src[i], 4);
			uint16_t b = (u & 0x7fffffffu) > 0x7f800000u ? moe_f32_to_bf16(src[i])
								     : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
			memcpy(d + 2 * i, &b, 2);
		}
		return n * 2;
	}
	case MOE_DTYPE_Q8_0:
		if (n % MOE_QK)
			return 0;
		moe_quantize_row_q8_0(src, dst, n);
		return n / MOE_QK * sizeof(struct moe_block_q8_0);
	case MOE_DTYPE_Q4_0:
		if (n % MOE_QK)
			return 0;
		moe_quantize_row_q4_0(src, dst, n);
		return n / MOE_QK * sizeof(struct moe_block_q4_0);
	case MOE_DTYPE_MXFP4:
		if (n % MOE_QK)
			return 0;
		moe_quantize_row_mxfp4(src, dst, n);
		return n / MOE_QK * sizeof(struct moe_block_mxfp4);
	default:
		return 0;
	}
}

/* ggml block_mxfp4 (byte j = element j | element j+16 << 4) to HF's split
 * storage (byte k = element 2k | element 2k+1 << 4); codes are the same. */
static void mx_blocks_to_hf(const struct moe_block_mxfp4 *b, size_t nb, uint8_t *codes, uint8_t *scales)
{
	for (size_t i = 0; i < nb; i++) {
		if (scales)
			scales[i] = b[i].e;
		if (codes) {
			uint8_t el[32];
			for (int j = 0; j < 16; j++) {
				el[j] = b[i].qs[j] & 0x0f;
				el[j + 16] = b[i].qs[j] >> 4;
			}
			for (int k = 0; k < 16; k++)
				codes[i * 16 + k] = (uint8_t)(el[2 * k] | el[2 * k + 1] << 4);
		}
	}
}

/* ---- rows ---- */

static uint32_t enc_elem_bytes(uint32_t enc)
{
	return moe_dtype_block_elems((enum moe_dtype)enc) == 1 ? moe_dtype_block_bytes((enum moe_dtype)enc) : 0;
}

static uint64_t enc_row_bytes(uint32_t enc, uint64_t cols)
{
	uint64_t b = 0;
	if (enc == GEN_ENC_HF_MX_BLOCKS)
		return cols / MOE_QK * 16;
	if (enc == GEN_ENC_HF_MX_SCALES)
		return cols / MOE_QK;
	return moe_dtype_row_bytes((enum moe_dtype)enc, cols, &b) ? b : 0;
}

/* One canonical row (ROWS layout) of `cols` values of a stream. */
static void row_canonical(uint64_t seed, uint32_t role, uint32_t layer, uint32_t expert, uint32_t cols,
			  uint64_t start, uint32_t enc, uint8_t *out)
{
	float tmp[CHUNK];
	struct moe_block_mxfp4 mx[CHUNK / MOE_QK];
	for (uint32_t c0 = 0; c0 < cols; c0 += CHUNK) {
		size_t n = MOE_MIN((size_t)CHUNK, (size_t)(cols - c0));
		gen_fill_f32(seed, role, layer, expert, cols, start + c0, tmp, n);
		if (enc == GEN_ENC_HF_MX_BLOCKS || enc == GEN_ENC_HF_MX_SCALES) {
			moe_quantize_row_mxfp4(tmp, mx, n);
			if (enc == GEN_ENC_HF_MX_BLOCKS)
				mx_blocks_to_hf(mx, n / MOE_QK, out + (size_t)c0 / MOE_QK * 16, NULL);
			else
				mx_blocks_to_hf(mx, n / MOE_QK, NULL, out + c0 / MOE_QK);
		} else {
			uint64_t at = enc_row_bytes(enc, c0);
			gen_encode((enum moe_dtype)enc, tmp, n, out + at);
		}
	}
}

/* llama.cpp's convert_hf_to_gguf.py permutes the rows of q/k for the "llama"
 * architecture (its rope pairs adjacent elements, HF's pairs the halves):
 * GGUF row h*d + 2i + j holds HF row h*d + j*d/2 + i. */
static uint32_t hf_row_of_llama(uint32_t r, uint32_t d)
{
	uint32_t in = r % d;
	return r - in + (in & 1) * (d / 2) + in / 2;
}

/* A transposed row: element c is canonical element (c >> sh) * stride + base
 * of the part (c & sh ? role2 : role), so sh = 1 interleaves gate/up
 * columns (gpt_oss gate_up_proj and its bias) and sh = 0 reads one role
 * down a column (down_proj). */
static void row_strided(const struct gen_model *g, const struct gen_tensor *t, uint32_t e, uint32_t width,
			uint32_t sh, uint64_t stride, uint64_t base, uint8_t *out)
{
	float tmp[CHUNK], s[2], off;
	uint64_t k[2] = { stream_key(g->seed, t->role, t->layer, e), stream_key(g->seed, t->role2, t->layer, e) };
	role_scale(t->role, t->cols, &s[0], &off);
	role_scale(t->role2, t->cols, &s[1], &off);
	for (uint32_t c0 = 0; c0 < width; c0 += CHUNK) {
		uint32_t n = MOE_MIN((uint32_t)CHUNK, width - c0);
		for (uint32_t c = 0; c < n; c++) {
			uint32_t col = c0 + c, p = col & sh;
			tmp[c] = value_at(k[p], s[p], 0.0f, (uint64_t)(col >> sh) * stride + base);
		}
		gen_encode((enum moe_dtype)t->enc, tmp, n, out + (size_t)c0 * enc_elem_bytes(t->enc));
	}
}

static void gen_row(const struct gen_model *g, const struct gen_tensor *t, uint64_t r, uint8_t *out)
{
	switch (t->layout) {
	case GEN_LAYOUT_ROWS: {
		uint32_t e = t->expert0 == GEN_NONE ? GEN_NONE : t->expert0 + (uint32_t)(r / t->rows);
		uint32_t rr = (uint32_t)(r % t->rows);
		uint32_t role = t->role;
		if (t->interleave) {
			role = (rr & 1) ? t->role2 : t->role;
			rr >>= 1;
		}
		if (t->perm_head)
			rr = hf_row_of_llama(rr, t->perm_head);
		row_canonical(g->seed, role, t->layer, e, t->cols, (uint64_t)rr * t->cols, t->enc, out);
		break;
	}
	case GEN_LAYOUT_GU_T: /* stored [E][n][2m]: element c of row i is GATE/UP[c/2][i] */
		row_strided(g, t, t->expert0 + (uint32_t)(r / t->cols), 2 * t->rows, 1, t->cols, r % t->cols, out);
		break;
	case GEN_LAYOUT_DOWN_T: /* stored [E][m][n]: element i of row j is DOWN[i][j] */
		row_strided(g, t, t->expert0 + (uint32_t)(r / t->cols), t->rows, 0, t->cols, r % t->cols, out);
		break;
	case GEN_LAYOUT_GU_BIAS: /* stored [E][2m]: element c is GATE_BIAS/UP_BIAS[c/2] */
		row_strided(g, t, t->expert0 + (uint32_t)r, 2 * t->cols, 1, 1, 0, out);
		break;
	default:
		memset(out, 0, t->row_bytes);
	}
}

int gen_tensor_rows(const struct gen_model *g, const struct gen_tensor *t, uint64_t row,
		    uint64_t n_rows, void *buf)
{
	uint8_t *p = buf;
	if (row > t->n_rows || n_rows > t->n_rows - row)
		return -EINVAL;
	for (uint64_t r = row; r < row + n_rows; r++, p += t->row_bytes)
		gen_row(g, t, r, p);
	return 0;
}

int gen_tensor_read(const struct gen_model *g, const struct gen_tensor *t, uint64_t off,
		    void *buf, size_t len)
{
	uint8_t *dst = buf, *scratch = NULL;
	if (!t->row_bytes || off > t->nbytes || len > t->nbytes - off)
		return -EINVAL;
	while (len) {
		uint64_t r = off / t->row_bytes, in = off % t->row_bytes;
		size_t take = (size_t)MOE_MIN((uint64_t)len, t->row_bytes - in);
		if (in == 0 && take == t->row_bytes) {
			gen_row(g, t, r, dst);
		} else {
			if (!scratch && !(scratch = malloc(t->row_bytes)))
				return -ENOMEM;
			gen_row(g, t, r, scratch);
			memcpy(dst, scratch + in, take);
		}
		dst += take;
		off += take;
		len -= take;
	}
	free(scratch);
	return 0;
}

/* ---- models ---- */

const char *gen_format_name(enum gen_format f)
{
	return f == GEN_FORMAT_SAFETENSORS ? "safetensors" : f == GEN_FORMAT_GGUF ? "gguf" : "unknown";
}

enum gen_format gen_format_parse(const char *s)
{
	if (s && strcasecmp(s, "safetensors") == 0)
		return GEN_FORMAT_SAFETENSORS;
	if (s && strcasecmp(s, "gguf") == 0)
		return GEN_FORMAT_GGUF;
	return 0;
}

uint32_t gen_ffn_length(const struct gen_model *g)
{
	switch (g->family) {
	case MOE_FAMILY_DEEPSEEK_V2:
	case MOE_FAMILY_DEEPSEEK_V3: return g->dense_width;
	case MOE_FAMILY_QWEN2_MOE:
	case MOE_FAMILY_QWEN3_MOE: return g->n_shared ? g->n_shared * g->width : 4 * g->width;
	default: return g->width;
	}
}

const char *gen_gguf_arch(enum moe_family f)
{
	switch (f) {
	case MOE_FAMILY_MIXTRAL: return "llama";
	case MOE_FAMILY_QWEN2_MOE: return "qwen2moe";
	case MOE_FAMILY_QWEN3_MOE: return "qwen3moe";
	case MOE_FAMILY_DEEPSEEK_V2:
	case MOE_FAMILY_DEEPSEEK_V3: return "deepseek2";
	case MOE_FAMILY_OLMOE: return "olmoe";
	case MOE_FAMILY_GPT_OSS: return "gpt-oss";
	default: return "unknown";
	}
}

/* ---- vocabulary ---- */

#define SP "\xe2\x96\x81" /* U+2581, SentencePiece's word boundary */

int gen_vocab_token(uint32_t id, char *buf, size_t len, float *score, int32_t *type)
{
	static const char cons[] = "bcdfghjklmnprstvwxyz", vow[] = "aeiou";
	enum { NC = sizeof(cons) - 1, NV = sizeof(vow) - 1, NS = NC * NV };
	char w[32];
	int n = 0;
	float sc = 0.0f;
	int32_t ty = 1;
	if (id == GEN_TOKEN_UNK) {
		n = snprintf(w, sizeof(w), "<unk>");
		ty = 2;
	} else if (id == GEN_TOKEN_BOS || id == GEN_TOKEN_EOS) {
		n = snprintf(w, sizeof(w), id == GEN_TOKEN_BOS ? "<s>" : "</s>");
		ty = 3;
	} else if (id < 259) {
		n = snprintf(w, sizeof(w), "<0x%02X>", id - 3);
		ty = 6;
	} else {
		uint32_t k = id - 259;
		/* earlier pieces merge first; -id is also what llama.cpp's
		 * converter gives a byte-fallback BPE tokenizer.json */
		sc = -(float)id;
		if (k == 0) {
			n = snprintf(w, sizeof(w), SP);
		} else if (k <= 52) { /* "a".."z", then "\u2581a".."\u2581z" */
			n = snprintf(w, sizeof(w), "%s%c", k > 26 ? SP : "", 'a' + (k - 1) % 26);
		} else {
			/* words of s syllables: NS^s of them, each bare then with "\u2581" */
			uint64_t j = k - 53, level = 2 * NS;
			uint32_t s = 1;
			while (j >= level) {
				j -= level;
				level *= NS;
				if (++s > 3)
					return -ERANGE;
			}
			if (j & 1)
				n = snprintf(w, sizeof(w), SP);
			j >>= 1;
			for (uint32_t i = 0; i < s; i++, j /= NS) {
				w[n++] = cons[(j % NS) / NV];
				w[n++] = vow[j % NV];
			}
			w[n] = '\0';
		}
	}
	if ((size_t)n >= len)
		return -ERANGE;
	memcpy(buf, w, (size_t)n + 1);
	if (score)
		*score = sc;
	if (type)
		*type = ty;
	return n;
}

int gen_model_llama_check(const struct gen_model *g, struct moe_error *err)
{
	const enum moe_family f = g->family;
	const uint32_t q = g->n_head * g->head_dim;
	if (f != MOE_FAMILY_MIXTRAL && f != MOE_FAMILY_QWEN2_MOE && f != MOE_FAMILY_QWEN3_MOE && f != MOE_FAMILY_OLMOE)
		return moe_error_set(err, -ENOTSUP, "llama.cpp's %s needs tensors moe-gen does not write", gen_gguf_arch(f));
	if (g->vocab < GEN_VOCAB_MIN_SPM)
		return moe_error_set(err, -ENOTSUP, "a vocab of %u has no SentencePiece vocabulary (%u at least)", g->vocab,
				     GEN_VOCAB_MIN_SPM);
	/* qwen2moe and olmoe size q and o by the hidden width */
	if ((f == MOE_FAMILY_QWEN2_MOE || f == MOE_FAMILY_OLMOE) && q != g->hidden)
		return moe_error_set(err, -ENOTSUP, "llama.cpp's %s needs heads x head dim (%u) = hidden (%u)",
				     gen_gguf_arch(f), q, g->hidden);
	/* its OLMoE k_norm is [hidden] */
	if (f == MOE_FAMILY_OLMOE && g->n_head_kv != g->n_head)
		return moe_error_set(err, -ENOTSUP, "llama.cpp's olmoe has no GQA (kv heads %u != heads %u)", g->n_head_kv,
				     g->n_head);
	if (g->top_k > g->n_experts || g->n_experts < 2)
		return moe_error_set(err, -ENOTSUP, "llama.cpp wants at least 2 experts");
	return 0;
}

static bool is_deepseek(enum moe_family f)
{
	return f == MOE_FAMILY_DEEPSEEK_V2 || f == MOE_FAMILY_DEEPSEEK_V3;
}

static bool has_shared(enum moe_family f)
{
	return f == MOE_FAMILY_QWEN2_MOE || is_deepseek(f);
}

void gen_model_defaults(struct gen_model *g, enum moe_family family)
{
	memset(g, 0, sizeof(*g));
	g->family = family;
	g->format = GEN_FORMAT_SAFETENSORS;
	g->dtype = MOE_DTYPE_BF16;
	g->seed = 1;
	g->n_layers = 3;
	g->n_experts = 8;
	g->top_k = 2;
	g->hidden = 64;
	g->width = 32;
	g->n_shared = has_shared(family) ? 1 : 0;
	g->dense_layers = is_deepseek(family) ? 1 : 0;
	g->dense_width = 128;
	g->vocab = 64;
	g->n_head = 1;
	g->n_head_kv = 1;
	g->head_dim = 32;
	g->ctx_len = 4096;
	/* the families' published rope_theta and rms_norm_eps */
	switch (family) {
	case MOE_FAMILY_MIXTRAL: g->rope_theta = 1e6f; g->rms_eps = 1e-5f; break;
	case MOE_FAMILY_QWEN2_MOE:
	case MOE_FAMILY_QWEN3_MOE: g->rope_theta = 1e6f; g->rms_eps = 1e-6f; break;
	case MOE_FAMILY_OLMOE: g->rope_theta = 1e4f; g->rms_eps = 1e-5f; break;
	case MOE_FAMILY_GPT_OSS: g->rope_theta = 150000.0f; g->rms_eps = 1e-5f; break;
	default: g->rope_theta = 1e4f; g->rms_eps = 1e-6f; break;
	}
	g->n_group = 1;
	g->topk_group = 1;
	if (family == MOE_FAMILY_DEEPSEEK_V3) {
		g->n_group = 4;
		g->topk_group = 2;
	}
	g->shards = 1;
	g->gguf_alignment = 32;
}

/* Resets g to family f's defaults, keeping what is not a size. */
static void reset_sizes(struct gen_model *g, enum moe_family f)
{
	struct gen_model d;
	gen_model_defaults(&d, f);
	d.format = g->format;
	d.dtype = g->dtype;
	d.seed = g->seed;
	d.shards = g->shards;
	d.gguf_alignment = g->gguf_alignment;
	*g = d;
}

static void set_attn(struct gen_model *g, uint32_t heads, uint32_t kv, uint32_t dim, uint32_t vocab, uint32_t ctx)
{
	g->n_head = heads;
	g->n_head_kv = kv;
	g->head_dim = dim;
	g->vocab = vocab;
	g->ctx_len = ctx;
}

int gen_model_preset(struct gen_model *g, const char *preset, struct moe_error *err)
{
	const enum moe_family f = g->family;
	if (strcmp(preset, "tiny") == 0) {
		reset_sizes(g, f);
		return 0;
	}
	if (strcmp(preset, "dsv2-lite") == 0) {
		/* DeepSeek-V2-Lite's expert shapes; the rest stays small. */
		g->hidden = 2048;
		g->width = 1408;
		g->n_experts = 64;
		g->top_k = 6;
		g->n_shared = has_shared(f) ? 2 : 0;
		g->dense_layers = is_deepseek(f) ? 1 : 0;
		g->dense_width = 10944;
		g->n_layers = 27;
		g->n_group = 1;
		g->topk_group = 1;
		if (f == MOE_FAMILY_DEEPSEEK_V3) {
			g->n_group = 8;
			g->topk_group = 4;
		}
		return 0;
	}
	if (strcmp(preset, "tiny-lm") == 0) {
		/* small enough for per-token tests, every width a whole number of
		 * quantization blocks, GQA where llama.cpp's loader allows it */
		reset_sizes(g, f);
		g->hidden = 128;
		g->width = 64;
		g->n_experts = f == MOE_FAMILY_MIXTRAL ? 8 : 16;
		g->top_k = f == MOE_FAMILY_MIXTRAL ? 2 : 4;
		g->n_shared = has_shared(f) ? 2 : 0;
		g->dense_width = 256;
		/* Qwen3 sizes heads apart from the hidden width: q is 256 wide */
		set_attn(g, 4, f == MOE_FAMILY_OLMOE ? 4 : 2, f == MOE_FAMILY_QWEN3_MOE ? 64 : 32, 512, 4096);
		return 0;
	}
	const struct {
		const char *name;
		enum moe_family family;
	} real[] = { { "olmoe-1b-7b", MOE_FAMILY_OLMOE }, { "qwen3-30b-a3b", MOE_FAMILY_QWEN3_MOE } };
	for (size_t i = 0; i < MOE_ARRAY_SIZE(real); i++) {
		if (strcmp(preset, real[i].name) != 0)
			continue;
		if (f != MOE_FAMILY_UNKNOWN && f != real[i].family)
			return moe_error_set(err, -EINVAL, "preset %s is a %s model, not %s", preset,
					     moe_family_name(real[i].family), moe_family_name(f));
		reset_sizes(g, real[i].family);
		g->hidden = 2048;
		g->top_k = 8;
		if (i == 0) { /* allenai/OLMoE-1B-7B-0924 config.json */
			g->n_layers = 16;
			g->n_experts = 64;
			g->width = 1024;
			set_attn(g, 16, 16, 128, 50304, 4096);
		} else { /* Qwen/Qwen3-30B-A3B config.json, 8 of 48 layers */
			g->n_layers = 8;
			g->n_experts = 128;
			g->width = 768;
			set_attn(g, 32, 4, 128, 151936, 40960);
		}
		return 0;
	}
	return moe_error_set(err, -EINVAL, "unknown preset '%s' (tiny, tiny-lm, dsv2-lite, olmoe-1b-7b, qwen3-30b-a3b)",
			     preset);
}

int gen_model_validate(const struct gen_model *g, struct moe_error *err)
{
	const char *fam = moe_family_name(g->family);
	if (g->family == MOE_FAMILY_UNKNOWN || g->family >= MOE_FAMILY_COUNT)
		return moe_error_set(err, -EINVAL, "unknown family");
	if (g->format != GEN_FORMAT_SAFETENSORS && g->format != GEN_FORMAT_GGUF)
		return moe_error_set(err, -EINVAL, "unknown format");
	switch (g->dtype) {
	case MOE_DTYPE_F32:
	case MOE_DTYPE_F16:
	case MOE_DTYPE_BF16:
		break;
	case MOE_DTYPE_Q8_0:
	case MOE_DTYPE_Q4_0:
		if (g->format != GEN_FORMAT_GGUF)
			return moe_error_set(err, -EINVAL, "%s is a GGUF type; safetensors takes f32, f16, bf16 (and mxfp4 for gpt_oss)",
					     moe_dtype_name(g->dtype));
		break;
	case MOE_DTYPE_MXFP4:
		if (g->family != MOE_FAMILY_GPT_OSS)
			return moe_error_set(err, -EINVAL, "mxfp4 is only for gpt_oss, not %s", fam);
		break;
	default:
		return moe_error_set(err, -EINVAL, "expert dtype %s is not generated (f32, f16, bf16, q8_0, q4_0, mxfp4)",
				     moe_dtype_name(g->dtype));
	}
	if (g->n_layers == 0 || g->n_layers > 1024)
		return moe_error_set(err, -EINVAL, "--layers %u out of range (1..1024)", g->n_layers);
	if (g->dense_layers && !is_deepseek(g->family))
		return moe_error_set(err, -EINVAL, "%s has no leading dense layers (--dense-layers is DeepSeek only)", fam);
	if (g->dense_layers >= g->n_layers)
		return moe_error_set(err, -EINVAL, "--dense-layers %u leaves no MoE layer out of %u", g->dense_layers, g->n_layers);
	if (g->n_shared && !has_shared(g->family))
		return moe_error_set(err, -EINVAL, "%s has no shared experts (--shared is for qwen2_moe and DeepSeek)", fam);
	if (g->n_shared > 64)
		return moe_error_set(err, -EINVAL, "--shared %u out of range (0..64)", g->n_shared);
	if (g->n_experts == 0 || g->n_experts > 4096)
		return moe_error_set(err, -EINVAL, "--experts %u out of range (1..4096)", g->n_experts);
	if (g->top_k == 0 || g->top_k > g->n_experts || g->top_k > 64)
		return moe_error_set(err, -EINVAL, "--top-k %u out of range (1..min(64, experts))", g->top_k);
	if (g->hidden == 0 || g->hidden > 65536 || g->width == 0 || g->width > 65536 ||
	    g->dense_width == 0 || g->dense_width > 65536)
		return moe_error_set(err, -EINVAL, "sizes out of range (hidden, width, dense width: 1..65536)");
	if (g->vocab == 0 || g->vocab > 1u << 20)
		return moe_error_set(err, -EINVAL, "--vocab %u out of range (1..%u)", g->vocab, 1u << 20);
	if (g->n_head == 0 || g->n_head > 1024 || g->head_dim == 0 || g->head_dim > 1024 ||
	    (uint64_t)g->n_head * g->head_dim > 65536)
		return moe_error_set(err, -EINVAL, "attention out of range (--heads 1..1024, --head-dim 1..1024, product up to 65536)");
	if (g->n_head_kv == 0 || g->n_head % g->n_head_kv)
		return moe_error_set(err, -EINVAL, "--kv-heads %u must divide --heads %u", g->n_head_kv, g->n_head);
	if (g->ctx_len == 0 || g->ctx_len > 1u << 24)
		return moe_error_set(err, -EINVAL, "--context %u out of range (1..%u)", g->ctx_len, 1u << 24);
	if (moe_dtype_is_quantized(g->dtype)) {
		uint32_t a = g->n_head * g->head_dim;
		if (g->hidden % MOE_QK || g->width % MOE_QK || (g->dense_layers && g->dense_width % MOE_QK) ||
		    (g->format == GEN_FORMAT_GGUF && g->dtype != MOE_DTYPE_MXFP4 && a % MOE_QK))
			return moe_error_set(err, -EINVAL, "%s needs hidden, width, dense width and heads x head dim multiples of 32 (have %u, %u, %u, %u)",
					     moe_dtype_name(g->dtype), g->hidden, g->width, g->dense_width, a);
	}
	if (g->n_group == 0 || g->n_experts % g->n_group || g->topk_group == 0 || g->topk_group > g->n_group)
		return moe_error_set(err, -EINVAL, "bad expert groups: %u groups, %u used, %u experts",
				     g->n_group, g->topk_group, g->n_experts);
	if (g->n_group > 1 && !is_deepseek(g->family))
		return moe_error_set(err, -EINVAL, "expert groups are DeepSeek only");
	if (g->shards == 0 || g->shards > GEN_MAX_SHARDS)
		return moe_error_set(err, -EINVAL, "--shards %u out of range (1..%d)", g->shards, GEN_MAX_SHARDS);
	if (g->format == GEN_FORMAT_GGUF && g->shards != 1)
		return moe_error_set(err, -EINVAL, "--shards is for safetensors; GGUF is one file");
	/* per-expert safetensors names: 3 tensors per expert; keep the list
	 * (and a header, which readers cap at 100 MB) bounded */
	uint64_t est = (uint64_t)g->n_layers * (3ull * g->n_experts + 16) + 8;
	if (est > GEN_MAX_TENSORS)
		return moe_error_set(err, -EINVAL, "about %llu tensors: more than %u (fewer layers or experts)",
				     (unsigned long long)est, GEN_MAX_TENSORS);
	if (g->gguf_alignment < 8 || g->gguf_alignment % 8 || g->gguf_alignment > 65536)
		return moe_error_set(err, -EINVAL, "GGUF alignment %u must be a multiple of 8 (8..65536)", g->gguf_alignment);
	return 0;
}

void gen_model_config(const struct gen_model *g, struct moe_model_config *c)
{
	memset(c, 0, sizeof(*c));
	snprintf(c->name, sizeof(c->name), "moe-gen-%s", moe_family_name(g->family));
	c->moe_layer_step = 1;
	moe_model_set_family_defaults(c, g->family);
	c->dtype = g->dtype;
	c->hidden = g->hidden;
	c->expert_width = g->width;
	c->n_experts = g->n_experts;
	c->top_k = g->top_k;
	c->n_layers = g->n_layers;
	c->n_moe_layers = g->n_layers - g->dense_layers;
	c->first_moe_layer = g->dense_layers;
	if (g->n_shared) {
		/* Qwen2-MoE has one gated shared expert of width n_shared * m */
		c->n_shared_experts = g->family == MOE_FAMILY_QWEN2_MOE ? 1 : g->n_shared;
		c->shared_width = g->n_shared * g->width;
	}
	c->n_group = g->n_group;
	c->topk_group = g->topk_group;
	if (g->n_group > 1)
		c->topk_method = MOE_TOPK_GROUP_LIMITED;
}

/* ---- tensor lists ---- */

struct tlist {
	const struct gen_model *g;
	struct gen_tensor *v;
	size_t n, cap;
	int rc;
};

/* Type of non-expert tensors: F32 in GGUF, the torch dtype in safetensors. */
static enum moe_dtype plain_dtype(const struct gen_model *g)
{
	if (g->format == GEN_FORMAT_GGUF)
		return MOE_DTYPE_F32;
	return g->dtype == MOE_DTYPE_MXFP4 ? MOE_DTYPE_BF16 : g->dtype;
}

static struct gen_tensor *tl_add(struct tlist *l, uint32_t layout, uint32_t enc, uint32_t role,
				 uint32_t layer, const char *fmt, ...) MOE_PRINTF(6, 7);
static struct gen_tensor *tl_add(struct tlist *l, uint32_t layout, uint32_t enc, uint32_t role,
				 uint32_t layer, const char *fmt, ...)
{
	static struct gen_tensor dummy;
	va_list ap;
	if (l->rc)
		return &dummy;
	if (l->n == l->cap) {
		size_t cap = l->cap ? l->cap * 2 : 64;
		struct gen_tensor *v = realloc(l->v, cap * sizeof(*v));
		if (!v) {
			l->rc = -ENOMEM;
			return &dummy;
		}
		l->v = v;
		l->cap = cap;
	}
	struct gen_tensor *t = &l->v[l->n++];
	memset(t, 0, sizeof(*t));
	va_start(ap, fmt);
	vsnprintf(t->name, sizeof(t->name), fmt, ap);
	va_end(ap);
	t->layout = layout;
	t->enc = enc;
	t->dtype = (enc == GEN_ENC_HF_MX_BLOCKS || enc == GEN_ENC_HF_MX_SCALES) ? MOE_DTYPE_U8 : (enum moe_dtype)enc;
	t->role = role;
	t->role2 = role;
	t->layer = layer;
	t->expert0 = GEN_NONE;
	t->n_experts = 1;
	return t;
}

/* Shape and sizes from the canonical fields. */
static void tl_finish(struct gen_tensor *t)
{
	uint64_t E = t->n_experts;
	switch (t->layout) {
	case GEN_LAYOUT_ROWS:
		t->n_rows = E * t->rows;
		t->row_bytes = enc_row_bytes(t->enc, t->cols);
		break;
	case GEN_LAYOUT_GU_T:
		t->n_rows = E * t->cols;
		t->row_bytes = 2ull * t->rows * enc_elem_bytes(t->enc);
		break;
	case GEN_LAYOUT_DOWN_T:
		t->n_rows = E * t->cols;
		t->row_bytes = (uint64_t)t->rows * enc_elem_bytes(t->enc);
		break;
	case GEN_LAYOUT_GU_BIAS:
		t->n_rows = E;
		t->row_bytes = 2ull * t->cols * enc_elem_bytes(t->enc);
		break;
	}
	t->nbytes = t->n_rows * t->row_bytes;
}

static void set_shape(struct gen_tensor *t, uint32_t nd, uint64_t d0, uint64_t d1, uint64_t d2, uint64_t d3)
{
	t->n_dims = nd;
	t->shape[0] = d0;
	t->shape[1] = d1;
	t->shape[2] = d2;
	t->shape[3] = d3;
}

/* A non-stacked matrix [rows][cols] (or a vector when rows == 0). */
static void add_mat(struct tlist *l, enum moe_dtype dt, uint32_t role, uint32_t layer, uint32_t expert,
		    uint32_t rows, uint32_t cols, const char *name)
{
	struct gen_tensor *t = tl_add(l, GEN_LAYOUT_ROWS, dt, role, layer, "%s", name);
	t->expert0 = expert;
	t->rows = rows ? rows : 1;
	t->cols = cols;
	if (rows)
		set_shape(t, 2, rows, cols, 0, 0);
	else
		set_shape(t, 1, cols, 0, 0, 0);
	tl_finish(t);
}

/* Experts stacked: [E][rows][cols] (or [E][cols] when rows == 0). */
static struct gen_tensor *add_stack(struct tlist *l, uint32_t enc, uint32_t role, uint32_t layer,
				    uint32_t rows, uint32_t cols, const char *name)
{
	struct gen_tensor *t = tl_add(l, GEN_LAYOUT_ROWS, enc, role, layer, "%s", name);
	t->expert0 = 0;
	t->n_experts = l->g->n_experts;
	t->rows = rows ? rows : 1;
	t->cols = cols;
	if (rows)
		set_shape(t, 3, t->n_experts, rows, cols, 0);
	else
		set_shape(t, 2, t->n_experts, cols, 0, 0);
	tl_finish(t);
	return t;
}

static void st_gpt_oss_experts(struct tlist *l, uint32_t L)
{
	const struct gen_model *g = l->g;
	const uint32_t n = g->hidden, m = g->width, E = g->n_experts;
	enum moe_dtype bt = plain_dtype(g);
	char p[64];
	struct gen_tensor *t;
	snprintf(p, sizeof(p), "model.layers.%u.mlp.experts", L);
	if (g->dtype == MOE_DTYPE_MXFP4) {
		for (int s = 0; s < 2; s++) {
			uint32_t enc = s ? GEN_ENC_HF_MX_SCALES : GEN_ENC_HF_MX_BLOCKS;
			t = add_stack(l, enc, GEN_ROLE_EXPERT_GATE, L, 2 * m, n, "");
			snprintf(t->name, sizeof(t->name), "%s.gate_up_proj_%s", p, s ? "scales" : "blocks");
			t->role2 = GEN_ROLE_EXPERT_UP;
			t->interleave = 1;
			if (s)
				set_shape(t, 3, E, 2 * m, n / MOE_QK, 0);
			else
				set_shape(t, 4, E, 2 * m, n / MOE_QK, 16);
		}
		t = add_stack(l, bt, GEN_ROLE_EXPERT_GATE_BIAS, L, 0, m, "");
	} else {
		t = tl_add(l, GEN_LAYOUT_GU_T, g->dtype, GEN_ROLE_EXPERT_GATE, L, "%s.gate_up_proj", p);
		t->role2 = GEN_ROLE_EXPERT_UP;
		t->expert0 = 0;
		t->n_experts = E;
		t->rows = m;
		t->cols = n;
		set_shape(t, 3, E, n, 2 * m, 0);
		tl_finish(t);
		t = add_stack(l, bt, GEN_ROLE_EXPERT_GATE_BIAS, L, 0, m, "");
	}
	/* gate_up_proj_bias [E, 2m], interleaved like the weights */
	t->layout = GEN_LAYOUT_GU_BIAS;
	t->role2 = GEN_ROLE_EXPERT_UP_BIAS;
	snprintf(t->name, sizeof(t->name), "%s.gate_up_proj_bias", p);
	set_shape(t, 2, E, 2 * m, 0, 0);
	tl_finish(t);
	if (g->dtype == MOE_DTYPE_MXFP4) {
		for (int s = 0; s < 2; s++) {
			t = add_stack(l, s ? GEN_ENC_HF_MX_SCALES : GEN_ENC_HF_MX_BLOCKS, GEN_ROLE_EXPERT_DOWN, L, n, m, "");
			snprintf(t->name, sizeof(t->name), "%s.down_proj_%s", p, s ? "scales" : "blocks");
			if (s)
				set_shape(t, 3, E, n, m / MOE_QK, 0);
			else
				set_shape(t, 4, E, n, m / MOE_QK, 16);
		}
	} else {
		t = tl_add(l, GEN_LAYOUT_DOWN_T, g->dtype, GEN_ROLE_EXPERT_DOWN, L, "%s.down_proj", p);
		t->expert0 = 0;
		t->n_experts = E;
		t->rows = n;
		t->cols = m;
		set_shape(t, 3, E, m, n, 0);
		tl_finish(t);
	}
	t = add_stack(l, bt, GEN_ROLE_EXPERT_DOWN_BIAS, L, 0, n, "");
	snprintf(t->name, sizeof(t->name), "%s.down_proj_bias", p);
}

/* Matrices in GGUF: the model dtype (MXFP4 is for experts only); vectors
 * and routers stay F32 as llama.cpp's quantizer leaves them. */
static enum moe_dtype mat_dtype(const struct gen_model *g)
{
	if (g->format == GEN_FORMAT_GGUF)
		return g->dtype == MOE_DTYPE_MXFP4 ? MOE_DTYPE_F32 : g->dtype;
	return plain_dtype(g);
}

/* Canonical [rows][cols] of an attention-block tensor (rows 0: a vector);
 * false when the family has none. */
static bool attn_shape(const struct gen_model *g, uint32_t role, uint32_t *rows, uint32_t *cols)
{
	const uint32_t n = g->hidden, q = g->n_head * g->head_dim, kv = g->n_head_kv * g->head_dim;
	const enum moe_family f = g->family;
	*rows = 0;
	switch (role) {
	case GEN_ROLE_ATTN_NORM:
	case GEN_ROLE_FFN_NORM: *cols = n; return true;
	case GEN_ROLE_ATTN_Q: *rows = q; *cols = n; return true;
	case GEN_ROLE_ATTN_K:
	case GEN_ROLE_ATTN_V: *rows = kv; *cols = n; return true;
	case GEN_ROLE_ATTN_O: *rows = n; *cols = q; return true;
	case GEN_ROLE_ATTN_Q_BIAS: *cols = q; return f == MOE_FAMILY_QWEN2_MOE;
	case GEN_ROLE_ATTN_K_BIAS:
	case GEN_ROLE_ATTN_V_BIAS: *cols = kv; return f == MOE_FAMILY_QWEN2_MOE;
	/* Qwen3 normalizes each head, OLMoE the whole projection */
	case GEN_ROLE_ATTN_Q_NORM: *cols = f == MOE_FAMILY_OLMOE ? q : g->head_dim; break;
	case GEN_ROLE_ATTN_K_NORM: *cols = f == MOE_FAMILY_OLMOE ? kv : g->head_dim; break;
	default: return false;
	}
	return f == MOE_FAMILY_QWEN3_MOE || f == MOE_FAMILY_OLMOE;
}

/* A layer's norms and attention, in both formats' names. */
static void add_attention(struct tlist *l, uint32_t L)
{
	static const struct {
		uint32_t role;
		const char *hf, *gguf;
	} at[] = {
		{ GEN_ROLE_ATTN_NORM, "input_layernorm.weight", "attn_norm.weight" },
		{ GEN_ROLE_ATTN_Q, "self_attn.q_proj.weight", "attn_q.weight" },
		{ GEN_ROLE_ATTN_K, "self_attn.k_proj.weight", "attn_k.weight" },
		{ GEN_ROLE_ATTN_V, "self_attn.v_proj.weight", "attn_v.weight" },
		{ GEN_ROLE_ATTN_Q_BIAS, "self_attn.q_proj.bias", "attn_q.bias" },
		{ GEN_ROLE_ATTN_K_BIAS, "self_attn.k_proj.bias", "attn_k.bias" },
		{ GEN_ROLE_ATTN_V_BIAS, "self_attn.v_proj.bias", "attn_v.bias" },
		{ GEN_ROLE_ATTN_O, "self_attn.o_proj.weight", "attn_output.weight" },
		{ GEN_ROLE_ATTN_Q_NORM, "self_attn.q_norm.weight", "attn_q_norm.weight" },
		{ GEN_ROLE_ATTN_K_NORM, "self_attn.k_norm.weight", "attn_k_norm.weight" },
		{ GEN_ROLE_FFN_NORM, "post_attention_layernorm.weight", "ffn_norm.weight" },
	};
	const struct gen_model *g = l->g;
	const bool gg = g->format == GEN_FORMAT_GGUF;
	char nm[128];
	for (size_t i = 0; i < MOE_ARRAY_SIZE(at); i++) {
		uint32_t rows, cols;
		if (!attn_shape(g, at[i].role, &rows, &cols))
			continue;
		if (gg)
			snprintf(nm, sizeof(nm), "blk.%u.%s", L, at[i].gguf);
		else
			snprintf(nm, sizeof(nm), "model.layers.%u.%s", L, at[i].hf);
		add_mat(l, rows ? mat_dtype(g) : plain_dtype(g), at[i].role, L, GEN_NONE, rows, cols, nm);
		if (gg && g->family == MOE_FAMILY_MIXTRAL &&
		    (at[i].role == GEN_ROLE_ATTN_Q || at[i].role == GEN_ROLE_ATTN_K) && !l->rc)
			l->v[l->n - 1].perm_head = g->head_dim;
	}
}

static void safetensors_tensors(struct tlist *l)
{
	const struct gen_model *g = l->g;
	const uint32_t n = g->hidden, m = g->width, E = g->n_experts;
	const uint32_t S = g->n_shared * m, D = g->dense_width;
	const enum moe_dtype pt = plain_dtype(g), xt = g->dtype;
	const enum moe_family f = g->family;
	char nm[128], p[64];
	static const char *const hf_parts[3] = { "gate_proj", "up_proj", "down_proj" };
	static const char *const mx_parts[3] = { "w1", "w3", "w2" };

	add_mat(l, pt, GEN_ROLE_EMBED, GEN_NONE, GEN_NONE, g->vocab, n, "model.embed_tokens.weight");
	for (uint32_t L = 0; L < g->n_layers; L++) {
		snprintf(p, sizeof(p), "model.layers.%u", L);
#define NM(...) (snprintf(nm, sizeof(nm), __VA_ARGS__), nm)
		add_attention(l, L);
		if (L < g->dense_layers) {
			add_mat(l, xt, GEN_ROLE_DENSE_GATE, L, GEN_NONE, D, n, NM("%s.mlp.gate_proj.weight", p));
			add_mat(l, xt, GEN_ROLE_DENSE_UP, L, GEN_NONE, D, n, NM("%s.mlp.up_proj.weight", p));
			add_mat(l, xt, GEN_ROLE_DENSE_DOWN, L, GEN_NONE, n, D, NM("%s.mlp.down_proj.weight", p));
			continue;
		}
		if (f == MOE_FAMILY_GPT_OSS) {
			add_mat(l, pt, GEN_ROLE_ROUTER, L, GEN_NONE, E, n, NM("%s.mlp.router.weight", p));
			add_mat(l, pt, GEN_ROLE_ROUTER_BIAS, L, GEN_NONE, 0, E, NM("%s.mlp.router.bias", p));
			st_gpt_oss_experts(l, L);
			continue;
		}
		const char *moe = f == MOE_FAMILY_MIXTRAL ? "block_sparse_moe" : "mlp";
		add_mat(l, pt, GEN_ROLE_ROUTER, L, GEN_NONE, E, n, NM("%s.%s.gate.weight", p, moe));
		if (f == MOE_FAMILY_DEEPSEEK_V3)
			add_mat(l, MOE_DTYPE_F32, GEN_ROLE_SCORE_BIAS, L, GEN_NONE, 0, E,
				NM("%s.mlp.gate.e_score_correction_bias", p));
		for (uint32_t e = 0; e < E; e++) {
			for (int k = 0; k < 3; k++) {
				bool down = k == 2;
				if (f == MOE_FAMILY_MIXTRAL)
					NM("%s.block_sparse_moe.experts.%u.%s.weight", p, e, mx_parts[k]);
				else
					NM("%s.mlp.experts.%u.%s.weight", p, e, hf_parts[k]);
				add_mat(l, xt, GEN_ROLE_EXPERT_GATE + (uint32_t)k, L, e, down ? n : m, down ? m : n, nm);
			}
		}
		if (S) {
			const char *sh = f == MOE_FAMILY_QWEN2_MOE ? "shared_expert" : "shared_experts";
			for (int k = 0; k < 3; k++) {
				bool down = k == 2;
				add_mat(l, xt, GEN_ROLE_SHARED_GATE + (uint32_t)k, L, GEN_NONE, down ? n : S, down ? S : n,
					NM("%s.mlp.%s.%s.weight", p, sh, hf_parts[k]));
			}
			if (f == MOE_FAMILY_QWEN2_MOE)
				add_mat(l, pt, GEN_ROLE_SHARED_EXPERT_GATE, L, GEN_NONE, 1, n,
					NM("%s.mlp.shared_expert_gate.weight", p));
		}
	}
	add_mat(l, pt, GEN_ROLE_FINAL_NORM, GEN_NONE, GEN_NONE, 0, n, "model.norm.weight");
	add_mat(l, pt, GEN_ROLE_LM_HEAD, GEN_NONE, GEN_NONE, g->vocab, n, "lm_head.weight");
}

static void gguf_tensors(struct tlist *l)
{
	const struct gen_model *g = l->g;
	const uint32_t n = g->hidden, m = g->width, E = g->n_experts;
	const uint32_t S = g->n_shared * m, D = g->dense_width;
	const enum moe_dtype F = MOE_DTYPE_F32, xt = g->dtype, mt = mat_dtype(g);
	char nm[128];
	static const char *const parts[3] = { "gate", "up", "down" };

	add_mat(l, mt, GEN_ROLE_EMBED, GEN_NONE, GEN_NONE, g->vocab, n, "token_embd.weight");
	for (uint32_t L = 0; L < g->n_layers; L++) {
		add_attention(l, L);
		if (L < g->dense_layers) {
			for (int k = 0; k < 3; k++) {
				bool down = k == 2;
				add_mat(l, xt, GEN_ROLE_DENSE_GATE + (uint32_t)k, L, GEN_NONE, down ? n : D, down ? D : n,
					NM("blk.%u.ffn_%s.weight", L, parts[k]));
			}
			continue;
		}
		add_mat(l, F, GEN_ROLE_ROUTER, L, GEN_NONE, E, n, NM("blk.%u.ffn_gate_inp.weight", L));
		if (g->family == MOE_FAMILY_GPT_OSS)
			add_mat(l, F, GEN_ROLE_ROUTER_BIAS, L, GEN_NONE, 0, E, NM("blk.%u.ffn_gate_inp.bias", L));
		if (g->family == MOE_FAMILY_DEEPSEEK_V3)
			add_mat(l, F, GEN_ROLE_SCORE_BIAS, L, GEN_NONE, 0, E, NM("blk.%u.exp_probs_b.bias", L));
		for (int k = 0; k < 3; k++) {
			bool down = k == 2;
			add_stack(l, xt, GEN_ROLE_EXPERT_GATE + (uint32_t)k, L, down ? n : m, down ? m : n,
				  NM("blk.%u.ffn_%s_exps.weight", L, parts[k]));
			if (g->family == MOE_FAMILY_GPT_OSS)
				add_stack(l, F, GEN_ROLE_EXPERT_GATE_BIAS + (uint32_t)k, L, 0, down ? n : m,
					  NM("blk.%u.ffn_%s_exps.bias", L, parts[k]));
		}
		if (S) {
			if (g->family == MOE_FAMILY_QWEN2_MOE)
				add_mat(l, F, GEN_ROLE_SHARED_EXPERT_GATE, L, GEN_NONE, 0, n,
					NM("blk.%u.ffn_gate_inp_shexp.weight", L));
			for (int k = 0; k < 3; k++) {
				bool down = k == 2;
				add_mat(l, xt, GEN_ROLE_SHARED_GATE + (uint32_t)k, L, GEN_NONE, down ? n : S, down ? S : n,
					NM("blk.%u.ffn_%s_shexp.weight", L, parts[k]));
			}
		}
	}
#undef NM
	add_mat(l, F, GEN_ROLE_FINAL_NORM, GEN_NONE, GEN_NONE, 0, n, "output_norm.weight");
	add_mat(l, mt, GEN_ROLE_LM_HEAD, GEN_NONE, GEN_NONE, g->vocab, n, "output.weight");
}

uint32_t gen_model_files(const struct gen_model *g)
{
	return g->format == GEN_FORMAT_SAFETENSORS ? g->shards : 1;
}

int gen_model_tensors(const struct gen_model *g, struct gen_tensor **out, size_t *count,
		      struct moe_error *err)
{
	struct tlist l = { .g = g };
	uint64_t total = 0;
	int rc = gen_model_validate(g, err);
	if (rc)
		return rc;
	if (g->format == GEN_FORMAT_GGUF)
		gguf_tensors(&l);
	else
		safetensors_tensors(&l);
	if (l.rc) {
		free(l.v);
		return moe_error_set(err, l.rc, "out of memory listing tensors");
	}
	for (size_t i = 0; i < l.n; i++) {
		if (!l.v[i].row_bytes || !moe_add_u64(total, l.v[i].nbytes, &total) || total > (1ull << 50)) {
			free(l.v);
			return moe_error_set(err, -EINVAL, "model too large or tensor %s malformed", l.v[i].name);
		}
	}
	if (g->format == GEN_FORMAT_GGUF) {
		uint64_t off = 0;
		for (size_t i = 0; i < l.n; i++) {
			off = MOE_ALIGN_UP(off, (uint64_t)g->gguf_alignment);
			l.v[i].offset = off;
			off += l.v[i].nbytes;
		}
	} else {
		/* Balance shards by bytes, a new shard once the running total
		 * passes the next 1/N mark, and never leave one empty. */
		uint32_t N = g->shards, s = 0;
		uint64_t before = 0, in_shard = 0, shard_count = 0;
		if (N > l.n) {
			free(l.v);
			return moe_error_set(err, -EINVAL, "--shards %u exceeds the %zu tensors", N, l.n);
		}
		for (size_t i = 0; i < l.n; i++) {
			size_t left = l.n - i;
			if (shard_count && s + 1 < N &&
			    ((unsigned __int128)before * N >= (unsigned __int128)total * (s + 1) || left <= N - 1 - s)) {
				s++;
				in_shard = 0;
				shard_count = 0;
			}
			l.v[i].file = s;
			l.v[i].offset = in_shard;
			in_shard += l.v[i].nbytes;
			before += l.v[i].nbytes;
			shard_count++;
		}
	}
	*out = l.v;
	*count = l.n;
	return 0;
}

/* ---- expert parts ---- */

static const uint32_t part_role[GEN_PART_COUNT] = {
	GEN_ROLE_EXPERT_GATE, GEN_ROLE_EXPERT_UP, GEN_ROLE_EXPERT_DOWN,
	GEN_ROLE_EXPERT_GATE_BIAS, GEN_ROLE_EXPERT_UP_BIAS, GEN_ROLE_EXPERT_DOWN_BIAS,
};

bool gen_part_shape(const struct gen_model *g, enum gen_part part, uint32_t *rows, uint32_t *cols)
{
	uint32_t r, c;
	switch (part) {
	case GEN_PART_GATE:
	case GEN_PART_UP: r = g->width; c = g->hidden; break;
	case GEN_PART_DOWN: r = g->hidden; c = g->width; break;
	case GEN_PART_GATE_BIAS:
	case GEN_PART_UP_BIAS: r = 1; c = g->width; break;
	case GEN_PART_DOWN_BIAS: r = 1; c = g->hidden; break;
	default: return false;
	}
	if (part >= GEN_PART_GATE_BIAS && g->family != MOE_FAMILY_GPT_OSS)
		return false;
	if (rows)
		*rows = r;
	if (cols)
		*cols = c;
	return true;
}

enum moe_dtype gen_part_dtype(const struct gen_model *g, enum gen_part part)
{
	if (part < GEN_PART_GATE_BIAS)
		return g->dtype;
	return plain_dtype(g);
}

uint64_t gen_part_bytes(const struct gen_model *g, enum gen_part part)
{
	uint32_t r, c;
	uint64_t rb;
	if (!gen_part_shape(g, part, &r, &c) || !moe_dtype_row_bytes(gen_part_dtype(g, part), c, &rb))
		return 0;
	return rb * r;
}

int gen_expert_part(const struct gen_model *g, uint32_t layer, uint32_t expert, enum gen_part part,
		    void *buf, size_t len)
{
	struct gen_tensor t;
	uint32_t rows, cols;
	if (!gen_part_shape(g, part, &rows, &cols) || len != gen_part_bytes(g, part) ||
	    layer < g->dense_layers || layer >= g->n_layers || expert >= g->n_experts)
		return -EINVAL;
	memset(&t, 0, sizeof(t));
	t.layout = GEN_LAYOUT_ROWS;
	t.enc = gen_part_dtype(g, part);
	t.role = t.role2 = part_role[part];
	t.layer = layer;
	t.expert0 = expert;
	t.n_experts = 1;
	t.rows = rows;
	t.cols = cols;
	tl_finish(&t);
	return gen_tensor_rows(g, &t, 0, t.n_rows, buf);
}

/* ---- streaming ---- */

#define STREAM_CHUNK (8u << 20)
#define MAX_THREADS 16

struct rows_job {
	const struct gen_model *g;
	const struct gen_tensor *t;
	uint64_t row, n;
	uint8_t *out;
};

static void *rows_worker(void *arg)
{
	struct rows_job *j = arg;
	gen_tensor_rows(j->g, j->t, j->row, j->n, j->out);
	return NULL;
}

/* gen_tensor_rows over up to `threads` threads: values are a pure function
 * of their index, so the split changes no byte; a multi-GiB model is CPU
 * bound on the generator and the quantizers. A thread that cannot start
 * leaves its share to the caller. */
static void rows_parallel(const struct gen_model *g, const struct gen_tensor *t, uint64_t row, uint64_t n,
			  uint8_t *out, uint32_t threads)
{
	pthread_t th[MAX_THREADS];
	struct rows_job j[MAX_THREADS];
	bool started[MAX_THREADS] = { false };
	uint32_t k = (uint32_t)MOE_MIN((uint64_t)MOE_MIN(threads, (uint32_t)MAX_THREADS), n);
	if (k < 2 || n * t->row_bytes < (1u << 20)) {
		gen_tensor_rows(g, t, row, n, out);
		return;
	}
	for (uint32_t i = 0; i < k; i++) {
		uint64_t a = n * i / k, b = n * (i + 1) / k;
		j[i] = (struct rows_job){ g, t, row + a, b - a, out + a * t->row_bytes };
		if (i > 0)
			started[i] = pthread_create(&th[i], NULL, rows_worker, &j[i]) == 0;
	}
	rows_worker(&j[0]);
	for (uint32_t i = 1; i < k; i++) {
		if (started[i])
			pthread_join(th[i], NULL);
		else
			rows_worker(&j[i]);
	}
}

int gen_stream_tensors(const struct gen_model *g, const struct gen_tensor *t, size_t first,
		       size_t last, int fd, struct moe_error *err)
{
	uint64_t maxrow = 0, pos = 0;
	size_t fill = 0, cap;
	uint8_t *buf;
	int rc = 0;
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	const uint32_t threads = cpus > 1 ? (uint32_t)MOE_MIN(cpus, (long)MAX_THREADS) : 1;
	for (size_t i = first; i < last; i++)
		maxrow = MOE_MAX(maxrow, t[i].row_bytes);
	cap = (size_t)MOE_MAX((uint64_t)STREAM_CHUNK, maxrow);
	if (!(buf = malloc(cap)))
		return moe_error_set(err, -ENOMEM, "out of memory for a %zu-byte chunk", cap);
#define FLUSH()                                                                            \
	do {                                                                               \
		if (fill && (rc = moe_write_full(fd, buf, fill)) < 0) {                     \
			rc = moe_error_set(err, rc, "write: %s", strerror(-rc));             \
			goto out;                                                          \
		}                                                                          \
		fill = 0;                                                                  \
	} while (0)
	for (size_t i = first; i < last; i++) {
		/* zero padding up to the tensor's offset (GGUF alignment) */
		while (pos < t[i].offset) {
			size_t z = (size_t)MOE_MIN(t[i].offset - pos, (uint64_t)(cap - fill));
			memset(buf + fill, 0, z);
			fill += z;
			pos += z;
			if (fill == cap)
				FLUSH();
		}
		for (uint64_t r = 0; r < t[i].n_rows;) {
			uint64_t fit = (cap - fill) / t[i].row_bytes;
			if (!fit) {
				FLUSH();
				continue;
			}
			fit = MOE_MIN(fit, t[i].n_rows - r);
			rows_parallel(g, &t[i], r, fit, buf + fill, threads);
			fill += (size_t)(fit * t[i].row_bytes);
			pos += fit * t[i].row_bytes;
			r += fit;
		}
	}
	FLUSH();
#undef FLUSH
out:
	free(buf);
	return rc;
}

int gen_write_file(const struct gen_model *g, const char *path, const void *head, size_t head_len,
		   const struct gen_tensor *t, size_t first, size_t last, struct moe_error *err)
{
	char tmp[4200];
	int rc;
	if ((size_t)snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= sizeof(tmp))
		return moe_error_set(err, -ENAMETOOLONG, "%s: path too long", path);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return moe_error_set(err, -errno, "%s: %s", tmp, strerror(errno));
	rc = moe_write_full(fd, head, head_len);
	if (rc)
		rc = moe_error_set(err, rc, "%s: %s", tmp, strerror(-rc));
	else if (first < last)
		rc = gen_stream_tensors(g, t, first, last, fd, err);
	if (close(fd) && !rc)
		rc = moe_error_set(err, -errno, "%s: %s", tmp, strerror(errno));
	if (!rc && rename(tmp, path))
		rc = moe_error_set(err, -errno, "%s: %s", path, strerror(errno));
	if (rc)
		unlink(tmp); /* readers never see a partial file */
	return rc;
}

int gen_write_model(const struct gen_model *g, const char *dir, uint32_t *files, uint64_t *bytes,
		    struct moe_error *err)
{
	if (g->format == GEN_FORMAT_GGUF)
		return gen_write_gguf(g, dir, files, bytes, err);
	return gen_write_safetensors(g, dir, files, bytes, err);
}

/* ---- synthetic routing traces ---- */

void gen_trace_defaults(struct gen_trace_opts *o)
{
	o->seed = 1;
	o->tokens = 256;
	o->layers = 26;
	o->first_layer = 1;
	o->experts = 64;
	o->top_k = 6;
	o->skew = 0.7;
	o->locality = 0.15;
}

int gen_trace_validate(const struct gen_trace_opts *o, struct moe_error *err)
{
	if (o->tokens == 0 || o->tokens > 10000000)
		return moe_error_set(err, -EINVAL, "--tokens %u out of range (1..10000000)", o->tokens);
	if (o->layers == 0 || o->layers > TRACE_MAX_LAYERS)
		return moe_error_set(err, -EINVAL, "--layers %u out of range (1..%d)", o->layers, TRACE_MAX_LAYERS);
	if (o->first_layer > 1000000)
		return moe_error_set(err, -EINVAL, "--first-layer %u out of range", o->first_layer);
	if (o->experts == 0 || o->experts > TRACE_MAX_EXPERT)
		return moe_error_set(err, -EINVAL, "--experts %u out of range (1..%d)", o->experts, TRACE_MAX_EXPERT);
	if (o->top_k == 0 || o->top_k > o->experts || o->top_k > TRACE_MAX_K)
		return moe_error_set(err, -EINVAL, "--top-k %u out of range (1..min(%d, experts))", o->top_k, TRACE_MAX_K);
	if (!(o->skew >= 0.0 && o->skew <= 16.0))
		return moe_error_set(err, -EINVAL, "--skew must be in 0..16");
	if (!(o->locality >= 0.0 && o->locality <= 1.0))
		return moe_error_set(err, -EINVAL, "--locality must be in 0..1");
	if ((uint64_t)o->tokens * o->layers * o->top_k > (1ull << 28))
		return moe_error_set(err, -EINVAL, "trace too large (tokens x layers x top-k > 2^28)");
	return 0;
}

struct rng {
	uint64_t s;
};

static inline uint64_t rng_next(struct rng *r)
{
	r->s += GOLDEN;
	return mix64(r->s);
}

/* Uniform in [0, 1) with 53 bits. */
static inline double rng_unit(struct rng *r)
{
	return (double)(rng_next(r) >> 11) * 0x1p-53;
}

static inline uint32_t rng_below(struct rng *r, uint32_t n)
{
	return (uint32_t)(((unsigned __int128)rng_next(r) * n) >> 64);
}

int gen_trace(const struct gen_trace_opts *o, uint32_t prompt, struct trace **out, struct moe_error *err)
{
	struct rng r = { mix64(mix64(o->seed ^ GEN_SEED_SALT) ^ (0x7472616365ull << 24) ^ prompt) };
	const uint32_t E = o->experts, K = o->top_k, NL = o->layers, T = o->tokens;
	uint16_t *perm = NULL;
	double *cdf = NULL;
	uint8_t *taken = NULL;
	struct trace *tr = NULL;
	int rc = gen_trace_validate(o, err);
	if (rc)
		return rc;
	tr = calloc(1, sizeof(*tr));
	perm = malloc((size_t)NL * E * sizeof(*perm));
	cdf = malloc((size_t)E * sizeof(*cdf));
	taken = calloc(E, 1);
	if (tr) {
		tr->experts = malloc((size_t)T * NL * K * sizeof(*tr->experts));
		tr->count = malloc((size_t)T * NL);
		tr->batch = calloc(T, sizeof(*tr->batch));
		tr->token = calloc(T, sizeof(*tr->token));
	}
	if (!tr || !perm || !cdf || !taken || !tr->experts || !tr->count || !tr->batch || !tr->token) {
		rc = moe_error_set(err, -ENOMEM, "out of memory for a %u-token trace", T);
		goto fail;
	}
	tr->n_tokens = T;
	tr->n_layers = NL;
	tr->first_layer = o->first_layer;
	tr->k = K;
	memset(tr->count, (int)K, (size_t)T * NL);
	/* popularity rank r has weight 1/(r+1)^skew; each layer its own order */
	double total = 0.0;
	for (uint32_t i = 0; i < E; i++) {
		total += pow((double)(i + 1), -o->skew);
		cdf[i] = total;
	}
	for (uint32_t l = 0; l < NL; l++) {
		uint16_t *p = perm + (size_t)l * E;
		for (uint32_t i = 0; i < E; i++)
			p[i] = (uint16_t)i;
		for (uint32_t i = E - 1; i > 0; i--) {
			uint32_t j = rng_below(&r, i + 1);
			uint16_t x = p[i];
			p[i] = p[j];
			p[j] = x;
		}
	}
	uint32_t max_id = 0;
	for (uint32_t t = 0; t < T; t++) {
		char tok[32];
		if (t == 0)
			snprintf(tok, sizeof(tok), "<s>");
		else
			snprintf(tok, sizeof(tok), "t%u", rng_below(&r, 32000));
		if (!(tr->token[t] = strdup(tok))) {
			rc = moe_error_set(err, -ENOMEM, "out of memory");
			goto fail;
		}
		for (uint32_t l = 0; l < NL; l++) {
			uint16_t *row = tr->experts + ((size_t)t * NL + l) * K;
			const uint16_t *prev = t ? row - (size_t)NL * K : NULL;
			const uint16_t *p = perm + (size_t)l * E;
			for (uint32_t j = 0; j < K; j++) {
				uint32_t id = UINT32_MAX;
				if (prev && rng_unit(&r) < o->locality) {
					/* a random one of the previous token's ids not yet taken */
					uint32_t avail = 0;
					for (uint32_t q = 0; q < K; q++)
						avail += !taken[prev[q]];
					if (avail) {
						uint32_t pick = rng_below(&r, avail);
						for (uint32_t q = 0; q < K; q++)
							if (!taken[prev[q]] && pick-- == 0) {
								id = prev[q];
								break;
							}
					}
				}
				for (int tries = 0; id == UINT32_MAX && tries < 64; tries++) {
					double u = rng_unit(&r) * total;
					uint32_t lo = 0, hi = E - 1;
					while (lo < hi) {
						uint32_t mid = (lo + hi) / 2;
						if (cdf[mid] > u)
							hi = mid;
						else
							lo = mid + 1;
					}
					if (!taken[p[lo]])
						id = p[lo];
				}
				/* heavy skew and a large k: take the most popular free one */
				for (uint32_t q = 0; id == UINT32_MAX && q < E; q++)
					if (!taken[p[q]])
						id = p[q];
				taken[id] = 1;
				row[j] = (uint16_t)id;
				max_id = MOE_MAX(max_id, id);
			}
			for (uint32_t j = 0; j < K; j++)
				taken[row[j]] = 0;
		}
	}
	tr->max_expert = max_id;
	free(perm);
	free(cdf);
	free(taken);
	*out = tr;
	return 0;
fail:
	free(perm);
	free(cdf);
	free(taken);
	trace_free(tr);
	return rc;
}
