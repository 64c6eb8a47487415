/* runner.h - moe-run's forward pass: token ids in, logits out, through
 * llama.cpp's graph for the model's arch (embedding, per layer attn_norm ->
 * attention -> residual -> ffn_norm -> routed experts (+ qwen2moe's gated
 * shared expert) -> residual, then output_norm and the output head).
 * Prompt tokens go through each matmul together (batched prefill, in
 * chunks of max_batch); decode feeds one token at a time. The KV cache
 * keeps the positions fed since the last reset. */
#ifndef MOETIER_RUN_RUNNER_H
#define MOETIER_RUN_RUNNER_H

#include <stdbool.h>
#include <stdint.h>

#include "experts.h"
#include "model.h"

struct runner;

/* n_ctx: KV cache positions; max_batch: tokens per forward pass. */
int runner_create(const struct model *m, struct experts *ex, uint32_t n_ctx, uint32_t max_batch, int threads,
		  struct runner **out, struct moe_error *err);
void runner_free(struct runner *r);

/* KV cache at f16 precision, as llama.cpp's default (attention.h). */
void runner_set_kv_f16(struct runner *r, bool on);

/* Empties the KV cache: the next token is at position 0. */
void runner_reset(struct runner *r);
uint32_t runner_pos(const struct runner *r);
/* Bytes of the KV cache (K and V, every layer, n_ctx positions). */
uint64_t runner_kv_bytes(const struct runner *r);

/* Optional: the moet_set_token key of a token (FNV-1a of its text). */
void runner_set_token_key(struct runner *r, uint32_t (*fn)(void *ctx, int32_t tok), void *ctx);

/* Feeds n tokens at the current position. logits: NULL; or, with all,
 * [n x n_vocab] (row i after token i); else [n_vocab] after the last one.
 * -ENOSPC (with a message) when the context is full. */
int runner_feed(struct runner *r, const int32_t *toks, uint32_t n, float *logits, bool all, struct moe_error *err);

#endif
