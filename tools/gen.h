/* gen.h - deterministic tiny-MoE checkpoints: the value generator, the tensor
 * list of each family and format, and the exact bytes a generated checkpoint
 * holds. moe-gen writes files from this; tests (moe-pack's included)
 * regenerate any tensor, expert or byte range without reading the file.
 *
 * THE CONTRACT
 *
 * 1. Values. Every value is a pure function of
 *      (seed, role, layer, expert, element index)
 *    through a counter-based PRNG (splitmix64's mixer over a per-stream key):
 *      key  = mix(mix(mix(seed ^ GEN_SEED_SALT) + role * GOLDEN) ^ (layer << 32 | expert))
 *      z    = mix(key + (index + 1) * GOLDEN)
 *      u    = (float)(int32_t)(z >> 32) * 2^-31          (in [-1, 1))
 *      v    = amp * u (+ 1.0 for norm weights)
 *    amp = 1/sqrtf(fan_in) for matrices (fan_in = the input width), 1/16 for
 *    norms (around 1.0), 1/64 for biases, 1 for the embedding. `layer` is the
 *    model layer index (0-based, dense layers included); GEN_NONE marks
 *    "no layer" (embedding, final norm, lm_head) and "no expert". Shared
 *    experts and dense MLPs use expert GEN_NONE.
 *
 * 2. Canonical expert parts. Expert e of layer L has the parts
 *      GATE [m][n], UP [m][n], DOWN [n][m]          ([out][in], row-major)
 *      GATE_BIAS [m], UP_BIAS [m], DOWN_BIAS [n]   (gpt_oss only)
 *    and element (r, c) of a part has index r * cols + c in (1.).
 *    gen_expert_part() returns the part encoded in gen_part_dtype():
 *      - f32/f16/bf16: element-wise conversion (round to nearest even);
 *      - q8_0/q4_0/mxfp4: each row quantized with dtype.h's reference
 *        quantizers, as ggml blocks (block_mxfp4 for mxfp4).
 *
 * 3. Where those bytes are in the files.
 *    GGUF (every family): blk.L.ffn_{gate,up,down}_exps.weight hold, for
 *      expert e, exactly gen_expert_part() bytes at offset e * part_bytes
 *      (C-array [E][m][n] / [E][n][m]). gpt-oss biases are F32 tensors
 *      blk.L.ffn_{gate,up,down}_exps.bias, C-array [E][m] / [E][n].
 *    safetensors, per-expert families: ...experts.e.{gate,up,down}_proj.weight
 *      (Mixtral w1/w3/w2) hold exactly gen_expert_part() bytes.
 *    safetensors gpt_oss f32/f16/bf16: fused per layer, element-wise the same
 *      values: gate_up_proj[e][i][2j] = GATE[j][i], [e][i][2j+1] = UP[j][i];
 *      down_proj[e][j][i] = DOWN[i][j]; gate_up_proj_bias[e][2j] = GATE_BIAS[j],
 *      [2j+1] = UP_BIAS[j]; down_proj_bias[e] = DOWN_BIAS.
 *    safetensors gpt_oss mxfp4: the same quantized blocks as the ggml bytes
 *      of (2.), re-laid out: gate_up_proj_blocks[e][2j] / [2j+1] are GATE row
 *      j / UP row j, down_proj_blocks[e][i] is DOWN row i; a row's block b
 *      has its E8M0 byte in ..._scales[e][row][b] and its 16 code bytes in
 *      ..._blocks[e][row][b][0..15] with HF nibble order (byte k = code of
 *      element 2k | code of element 2k+1 << 4) instead of ggml's (byte k =
 *      element k | element k+16 << 4). Codes and exponents are unchanged.
 *      Biases are bf16.
 *    Any tensor of any file: gen_model_tensors() lists them (name, dtype,
 *    shape, file, offset) and gen_tensor_read() returns any byte range.
 *
 * 4. The rest of the model. Attention: q [n_head * head_dim][n], k and v
 *    [n_head_kv * head_dim][n], o [n][n_head * head_dim] (fan-in n, resp.
 *    n_head * head_dim), per family the extras llama.cpp's loader wants:
 *    Qwen2-MoE q/k/v biases, Qwen3-MoE q_norm/k_norm [head_dim], OLMoE
 *    q_norm [n_head * head_dim] / k_norm [n_head_kv * head_dim]. Element
 *    (r, c) has index r * cols + c as in (2.), in the HF layout; GGUF
 *    "llama" (Mixtral) q/k rows are permuted as convert_hf_to_gguf.py does
 *    (GGUF row h*d + 2i + j holds HF row h*d + j*d/2 + i, d = head_dim),
 *    so both files hold the same model. In GGUF the matrices (embedding,
 *    attention, output, experts, shared experts) take the model dtype; the
 *    router, norms and biases stay F32. In safetensors every tensor but the
 *    experts takes the torch dtype (bf16 for mxfp4), as before.
 *    GGUF vocabulary (vocab >= GEN_VOCAB_MIN_SPM): tokenizer.ggml.model
 *    "llama" with gen_vocab_token()'s pieces; below that "no_vocab" and
 *    %s.vocab_size.
 */
#ifndef MOETIER_GEN_H
#define MOETIER_GEN_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "model.h"
#include "util.h"

#define GEN_NONE UINT32_MAX
#define GEN_SEED_SALT 0x6d6f652d67656e31ull /* "moe-gen1": bump if values ever change */
#define GEN_MAX_SHARDS 999
#define GEN_MAX_DIMS 4
#define GEN_MAX_TENSORS (1u << 19)

enum gen_format {
	GEN_FORMAT_SAFETENSORS = 1,
	GEN_FORMAT_GGUF = 2,
};

/* Tensor roles: part of the PRNG stream key, so never renumber. */
enum gen_role {
	GEN_ROLE_EXPERT_GATE = 1,
	GEN_ROLE_EXPERT_UP = 2,
	GEN_ROLE_EXPERT_DOWN = 3,
	GEN_ROLE_EXPERT_GATE_BIAS = 4,
	GEN_ROLE_EXPERT_UP_BIAS = 5,
	GEN_ROLE_EXPERT_DOWN_BIAS = 6,
	GEN_ROLE_ROUTER = 7,
	GEN_ROLE_ROUTER_BIAS = 8,
	GEN_ROLE_SCORE_BIAS = 9,          /* DeepSeek-V3 e_score_correction_bias */
	GEN_ROLE_SHARED_GATE = 10,
	GEN_ROLE_SHARED_UP = 11,
	GEN_ROLE_SHARED_DOWN = 12,
	GEN_ROLE_SHARED_EXPERT_GATE = 13, /* Qwen2-MoE sigmoid gate of the shared expert */
	GEN_ROLE_DENSE_GATE = 14,
	GEN_ROLE_DENSE_UP = 15,
	GEN_ROLE_DENSE_DOWN = 16,
	GEN_ROLE_EMBED = 17,
	GEN_ROLE_LM_HEAD = 18,
	GEN_ROLE_FINAL_NORM = 19,
	GEN_ROLE_ATTN_NORM = 20,
	GEN_ROLE_FFN_NORM = 21,
	GEN_ROLE_ATTN_Q = 22,
	GEN_ROLE_ATTN_K = 23,
	GEN_ROLE_ATTN_V = 24,
	GEN_ROLE_ATTN_O = 25,
	GEN_ROLE_ATTN_Q_NORM = 26,        /* Qwen3 [head_dim], OLMoE [n_head * head_dim] */
	GEN_ROLE_ATTN_K_NORM = 27,        /* Qwen3 [head_dim], OLMoE [n_head_kv * head_dim] */
	GEN_ROLE_ATTN_Q_BIAS = 28,        /* Qwen2-MoE */
	GEN_ROLE_ATTN_K_BIAS = 29,
	GEN_ROLE_ATTN_V_BIAS = 30,
	GEN_ROLE_COUNT
};

/* Canonical parts of one routed expert (contract point 2). */
enum gen_part {
	GEN_PART_GATE = 0,
	GEN_PART_UP,
	GEN_PART_DOWN,
	GEN_PART_GATE_BIAS, /* gpt_oss only */
	GEN_PART_UP_BIAS,
	GEN_PART_DOWN_BIAS,
	GEN_PART_COUNT
};

/* What to generate. gen_model_defaults() + gen_model_preset() fill it;
 * gen_model_validate() checks it. */
struct gen_model {
	enum moe_family family;
	enum gen_format format;
	enum moe_dtype dtype;     /* routed/shared/dense expert matrices */
	uint64_t seed;
	uint32_t n_layers;        /* num_hidden_layers, dense layers included */
	uint32_t dense_layers;    /* DeepSeek first_k_dense_replace */
	uint32_t n_experts;
	uint32_t top_k;
	uint32_t hidden;          /* n */
	uint32_t width;           /* m, routed expert intermediate size */
	uint32_t n_shared;        /* shared experts; their total width is n_shared * m */
	uint32_t dense_width;     /* intermediate size of the dense layers */
	uint32_t vocab;           /* >= GEN_VOCAB_MIN_SPM: a SentencePiece vocabulary */
	uint32_t n_head;          /* attention: query heads, key/value heads (GQA), */
	uint32_t n_head_kv;       /* and the width of one head; q is */
	uint32_t head_dim;        /* [n_head * head_dim][hidden], k and v [n_head_kv * head_dim][hidden] */
	uint32_t ctx_len;         /* context_length / max_position_embeddings */
	float rope_theta;         /* family defaults */
	float rms_eps;
	uint32_t n_group;         /* DeepSeek expert groups (1 = greedy) */
	uint32_t topk_group;
	uint32_t shards;          /* safetensors files (1 = model.safetensors) */
	uint32_t gguf_alignment;  /* general.alignment; written only when != 32 */
};

/* Where a tensor's bytes come from (internal to gen.c, kept public so a
 * tensor list is self-describing). */
enum gen_layout {
	GEN_LAYOUT_ROWS = 1,  /* canonical rows, possibly stacked over experts */
	GEN_LAYOUT_GU_T,      /* gpt_oss gate_up_proj [E, n, 2m] */
	GEN_LAYOUT_DOWN_T,    /* gpt_oss down_proj [E, m, n] */
	GEN_LAYOUT_GU_BIAS,   /* gpt_oss gate_up_proj_bias [E, 2m] */
};

/* Row encodings beyond enum moe_dtype: HF's split MXFP4 storage. */
#define GEN_ENC_HF_MX_BLOCKS 100
#define GEN_ENC_HF_MX_SCALES 101

struct gen_tensor {
	char name[96];
	enum moe_dtype dtype;        /* stored type: U8 for HF MXFP4 blocks/scales */
	uint32_t n_dims;
	uint64_t shape[GEN_MAX_DIMS]; /* outermost first (safetensors/numpy order);
				       * the GGUF ne[] is this reversed */
	uint64_t n_rows, row_bytes, nbytes;
	uint32_t file;               /* shard index (0 for GGUF / one file) */
	uint64_t offset;             /* from the start of that file's data section */
	/* generation */
	uint32_t layout;             /* enum gen_layout */
	uint32_t enc;                /* enum moe_dtype or GEN_ENC_HF_MX_* */
	uint32_t role, role2;        /* role2: the odd rows/columns of interleaved gate/up */
	uint32_t layer, expert0;     /* expert0: first expert of a stack, or GEN_NONE */
	uint32_t n_experts;          /* experts stacked in this tensor (1 if not stacked) */
	uint32_t rows, cols;         /* canonical [rows][cols] of one expert (cols = fan-in) */
	uint32_t interleave;         /* ROWS: canonical row r -> (r & 1 ? role2 : role, r / 2) */
	uint32_t perm_head;          /* ROWS: llama.cpp's q/k row order for heads of this width (0: none) */
};

/* ---- values ---- */

/* out[i] = value of element start + i of the stream (contract point 1).
 * fan_in matters for matrix roles only. */
void gen_fill_f32(uint64_t seed, enum gen_role role, uint32_t layer, uint32_t expert,
		  uint32_t fan_in, uint64_t start, float *out, size_t n);
/* Encodes n floats (a multiple of 32 for block types) as stored in dtype t
 * (ggml blocks for q8_0/q4_0/mxfp4). Returns the bytes written, 0 on a bad type. */
size_t gen_encode(enum moe_dtype t, const float *src, size_t n, void *dst);

/* ---- models ---- */

const char *gen_format_name(enum gen_format f);
enum gen_format gen_format_parse(const char *s); /* 0 if unknown */
/* The "tiny" preset sizes (3 layers, 8 experts, top-2, n=64, m=32, one
 * attention head of 32, vocab 64) and the family's routing defaults. */
void gen_model_defaults(struct gen_model *g, enum moe_family family);
/* Presets (sizes only; format, dtype, seed, shards and alignment are kept):
 *   tiny          the defaults above;
 *   dsv2-lite     n=2048, m=1408, 64 experts, top-6, 2 shared, 1 dense layer
 *                 of width 10944, 27 layers;
 *   tiny-lm       a tiny model llama.cpp loads (qwen2_moe, qwen3_moe, olmoe,
 *                 mixtral): 3 layers, n=128, m=64, 4 heads (GQA: 2 kv heads but
 *                 OLMoE's 4), vocab 512, 8 (mixtral) or 16 experts;
 *   olmoe-1b-7b   OLMoE-1B-7B: 16 layers, n=2048, m=1024, 64 experts top-8,
 *                 16 heads of 128, vocab 50304 (sets the family);
 *   qwen3-30b-a3b Qwen3-30B-A3B with 8 of its 48 layers: n=2048, m=768, 128
 *                 experts top-8, 32 q / 4 kv heads of 128, vocab 151936 (sets
 *                 the family).
 * A preset that sets the family fails when g->family is another one (set
 * g->family = MOE_FAMILY_UNKNOWN to let it choose). */
int gen_model_preset(struct gen_model *g, const char *preset, struct moe_error *err);
/* 0 when llama.cpp's loader takes this model (family, geometry, vocabulary),
 * else -ENOTSUP and the reason: moe-gen warns, it does not refuse. */
int gen_model_llama_check(const struct gen_model *g, struct moe_error *err);
int gen_model_validate(const struct gen_model *g, struct moe_error *err);
/* The moetierd view of the generated model (what moe-pack should find). */
void gen_model_config(const struct gen_model *g, struct moe_model_config *c);
/* config.json's intermediate_size, which llama.cpp's converter writes as
 * GGUF {arch}.feed_forward_length: the expert width (Mixtral, OLMoE, GPT-OSS),
 * the dense layers' width (DeepSeek), the shared expert's width or 4 m
 * (Qwen2/3-MoE, whose graphs do not use it). */
uint32_t gen_ffn_length(const struct gen_model *g);
/* The GGUF general.architecture of a family ("llama", "qwen2moe", ...). */
const char *gen_gguf_arch(enum moe_family f);

/* ---- vocabulary ---- */

/* Smallest vocab that gets a SentencePiece vocabulary: the 3 specials, 256
 * bytes and the first filler ("\u2581"). */
#define GEN_VOCAB_MIN_SPM 260u
#define GEN_TOKEN_UNK 0
#define GEN_TOKEN_BOS 1
#define GEN_TOKEN_EOS 2

/* Token id's piece, score and GGUF token type (1 normal, 2 unknown, 3
 * control, 6 byte), independent of the vocab size: <unk> <s> </s>, <0x00>..
 * <0xFF>, then "\u2581", "a".."z", "\u2581a".."\u2581z", then words of 1, 2,
 * 3, ... consonant-vowel syllables, each bare and with a leading "\u2581"
 * (so SentencePiece merges reach them and text decodes readably). Their
 * score is -id (0 for the others). Returns the piece's length, or -ERANGE
 * if buf (at least 32 bytes suffice) is too small or the id is past 2
 * million. The safetensors output holds the same vocabulary as a
 * byte-fallback BPE tokenizer.json (merges: each piece from its longest
 * prefix in the vocabulary and the rest) and tokenizer_config.json. */
int gen_vocab_token(uint32_t id, char *buf, size_t len, float *score, int32_t *type);

/* All tensors of the checkpoint in file order, with files and offsets
 * assigned (safetensors shards balanced by bytes). *out is malloc'd. */
int gen_model_tensors(const struct gen_model *g, struct gen_tensor **out, size_t *count,
		      struct moe_error *err);
/* Number of files of the checkpoint's tensor data (shards or 1). */
uint32_t gen_model_files(const struct gen_model *g);

/* Exact stored bytes of rows [row, row + n_rows) of tensor t. */
int gen_tensor_rows(const struct gen_model *g, const struct gen_tensor *t, uint64_t row,
		    uint64_t n_rows, void *buf);
/* Exact stored bytes [off, off + len) of tensor t (any range). */
int gen_tensor_read(const struct gen_model *g, const struct gen_tensor *t, uint64_t off,
		    void *buf, size_t len);

/* ---- expert parts (contract point 2) ---- */

/* [rows][cols] of a part; false if the family has no such part. */
bool gen_part_shape(const struct gen_model *g, enum gen_part part, uint32_t *rows, uint32_t *cols);
/* Type the part is encoded in: g->dtype for matrices; biases: F32 in GGUF,
 * the safetensors torch dtype (bf16 for mxfp4) otherwise. */
enum moe_dtype gen_part_dtype(const struct gen_model *g, enum gen_part part);
/* Byte size of a part (0 if absent). */
uint64_t gen_part_bytes(const struct gen_model *g, enum gen_part part);
/* Writes the part's bytes (len must be gen_part_bytes()). layer is the model
 * layer (>= dense_layers). Returns 0 or -EINVAL. */
int gen_expert_part(const struct gen_model *g, uint32_t layer, uint32_t expert, enum gen_part part,
		    void *buf, size_t len);

/* ---- writers (gen_safetensors.c, gen_gguf.c) ---- */

/* Writes the checkpoint into directory dir (created if missing): safetensors
 * (+ config.json, + model.safetensors.index.json when sharded) or
 * model.gguf. Streams: memory use is one chunk, whatever the model size.
 * *files and *bytes (optional) receive what was written. */
int gen_write_safetensors(const struct gen_model *g, const char *dir, uint32_t *files,
			  uint64_t *bytes, struct moe_error *err);
int gen_write_gguf(const struct gen_model *g, const char *dir, uint32_t *files, uint64_t *bytes,
		   struct moe_error *err);
/* mkdir dir unless it exists as a directory. */
int gen_make_dir(const char *dir, struct moe_error *err);
/* Either of the above by g->format. */
int gen_write_model(const struct gen_model *g, const char *dir, uint32_t *files, uint64_t *bytes,
		    struct moe_error *err);

/* Shared by the writers: appends tensors [first, last) to fd (positioned at
 * the start of the data section), each at its offset, zero-padding the
 * gaps, through one chunk buffer. */
int gen_stream_tensors(const struct gen_model *g, const struct gen_tensor *t, size_t first,
		       size_t last, int fd, struct moe_error *err);
/* Writes path through path.tmp and a rename: head, then tensors [first,
 * last) streamed as above; on failure nothing is left at either name. */
int gen_write_file(const struct gen_model *g, const char *path, const void *head, size_t head_len,
		   const struct gen_tensor *t, size_t first, size_t last, struct moe_error *err);

/* ---- synthetic routing traces ---- */

struct trace;

struct gen_trace_opts {
	uint64_t seed;
	uint32_t tokens;       /* rows per layer */
	uint32_t layers;
	uint32_t first_layer;  /* Layer ID of the first layer (MoE-Beyond: 1) */
	uint32_t experts;
	uint32_t top_k;
	double skew;           /* Zipf exponent of expert popularity (0 = uniform);
				* each layer ranks its experts by its own permutation */
	double locality;       /* per slot: probability of reusing an expert the
				* previous token chose at the same layer */
};

/* Defaults: 256 tokens, 26 layers from 1, 64 experts, top-6 (the shape of
 * the MoE-Beyond DeepSeek-V2-Lite traces), skew 0.7 and locality 0.15, which
 * give their statistics: about 29% of a row's ids were in the previous
 * token's row at that layer, and the most used expert of a layer takes about
 * 9% of its picks (prompts 1, 2, 500: 28-30% and 7-11%). Seed 1. */
void gen_trace_defaults(struct gen_trace_opts *o);
int gen_trace_validate(const struct gen_trace_opts *o, struct moe_error *err);
/* Prompt p's trace (p selects an independent stream of the same seed). Each
 * row holds top_k distinct ids in selection order. Free with trace_free(). */
int gen_trace(const struct gen_trace_opts *o, uint32_t prompt, struct trace **out, struct moe_error *err);

#endif
