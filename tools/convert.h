/* convert.h - source adapters of moe-pack: a HF safetensors checkpoint (one
 * file, a directory, or a sharded index.json) or a GGUF file becomes a model
 * config, an expert part layout and per-expert / resident tensor streams,
 * written into a .moepack without holding more than one chunk (or, for
 * GPT-OSS [E, in, out] weights that need a transpose, one part of one
 * expert) in memory.
 *
 * Layout rules (doc/pack-format.md):
 *  - SwiGLU families: extent = GATE [m x n] | UP [m x n] | DOWN [n x m], the
 *    source bytes unchanged (HF per-expert tensors, or expert e's slab of a
 *    GGUF ffn_*_exps stack).
 *  - GPT-OSS: GATE_UP [2m x n] (row 2j = gate row j, 2j+1 = up row j),
 *    GATE_UP_BIAS [2m] (same interleave), DOWN [n x m], DOWN_BIAS [n].
 *    HF bf16/f16/f32 [E, n, 2m] / [E, m, n] are transposed to [out, in];
 *    HF MXFP4 blocks+scales become ggml block_mxfp4 (nibbles repacked);
 *    GGUF gate/up stacks (and their F32 biases) are row-interleaved.
 *  - router weights/biases, DeepSeek-V3 e_score_correction_bias, shared
 *    experts and Qwen2-MoE's shared_expert_gate become resident tensors
 *    with their roles; unless experts_only, so does every other tensor
 *    that is not a routed expert (PACK_ROLE_OTHER, GGUF names), plus the
 *    source's GGUF metadata as the U8 tensor PACK_KV_TENSOR, so that one
 *    pack is the whole model.
 */
#ifndef MOETIER_CONVERT_H
#define MOETIER_CONVERT_H

#include <stdbool.h>
#include <stdint.h>

#include "model.h"
#include "pack.h"
#include "util.h"

struct convert_options {
	const char *name;   /* model name stored in the pack (default: from the source) */
	const char *family; /* override the detected family ("mixtral", "deepseek_v3", ...) */
	bool progress;      /* one line per MoE layer on stderr */
	bool experts_only;  /* resident: routers, biases, shared experts only (the
			     * pre-whole-model packs); default: every non-expert
			     * tensor and the GGUF metadata (PACK_KV_TENSOR) */
};

struct convert_source;

/* Opens SRC (safetensors file / directory / index.json, or .gguf), detects
 * the family and reads the model config; checks that every expert and
 * resident tensor the config implies exists with the right shape and type. */
int convert_open(const char *src, const struct convert_options *opt, struct convert_source **out,
		 struct moe_error *err);
void convert_close(struct convert_source *s);

/* "safetensors" or "gguf". */
const char *convert_source_kind(const struct convert_source *s);
const struct moe_model_config *convert_model(const struct convert_source *s);
/* The extent layout of MoE layer 0 (offsets and sizes filled in). Returns
 * the part count. */
uint32_t convert_parts(const struct convert_source *s, const struct pack_part_desc **parts);
/* The distinct layouts of the MoE layers (parts' offsets not filled in) and
 * each MoE layer's index into them. Returns the layout count (1 when every
 * layer's experts are alike: a version 1 pack). */
uint32_t convert_layouts(const struct convert_source *s, const struct pack_layout_disk **layouts,
			 const uint8_t **layer_layout);
/* Resident tensors that will be written. */
uint32_t convert_n_resident(const struct convert_source *s);

struct convert_stats {
	uint64_t experts;
	uint64_t tensors;
	uint64_t bytes;      /* payload bytes written (experts + tensors) */
};

/* Writes the pack to out (removed again on failure). */
int convert_write(struct convert_source *s, const char *out, struct convert_stats *st, struct moe_error *err);

/* Repacks one HF MXFP4 row (groups blocks of 16 code bytes, HF nibble order:
 * byte k = element 2k | element 2k+1 << 4, plus groups E8M0 scales) into
 * ggml block_mxfp4 (byte j = element j | element j+16 << 4). */
void convert_mxfp4_hf_to_ggml(const uint8_t *blocks, const uint8_t *scales, uint64_t groups,
			      struct moe_block_mxfp4 *out);

#endif
