/* tokenizer.h - moe-run's tokenizer, built from a model's GGUF metadata
 * (tokenizer.ggml.*), and meant to give exactly the ids llama.cpp gives:
 * SentencePiece ("llama": bigram merges by score, byte fallback <0xXX>, a
 * leading "▁") and byte-level BPE ("gpt2": a pre-tokenizer regex through
 * PCRE2, the GPT-2 byte-to-unicode map, merges by rank). Control and
 * user-defined tokens are matched by their text first. doc/tokenizer.md. */
#ifndef MOETIER_RUN_TOKENIZER_H
#define MOETIER_RUN_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gguf.h"
#include "util.h"

struct tokenizer;

/* Builds the tokenizer from the KV pairs of kv (kv may be closed afterwards).
 * -EINVAL with a message naming the key on missing or malformed metadata,
 * -ENOTSUP for a tokenizer model or pre-tokenizer this file does not know. */
int tokenizer_load(const struct gguf_file *kv, struct tokenizer **out, struct moe_error *err);
void tokenizer_free(struct tokenizer *t);

/* text -> ids; add_special: prepend BOS (and whatever the model's add_bos/add_eos keys say),
 * parse_special: turn "<s>"-like control-token text into their ids. *ids is malloc'd. */
int tokenizer_encode(const struct tokenizer *t, const char *text, size_t len, bool add_special,
		     bool parse_special, int32_t **ids, size_t *n, struct moe_error *err);

/* The bytes of one token as text (byte tokens <0x0A> -> "\n", GPT-2 byte-unicode undone,
 * SentencePiece "▁" -> " "); length, or -errno; -ENOSPC when cap is too small.
 * Control, unknown and user-defined tokens give their text as it is (llama.cpp's
 * token_to_piece with special = true); unused and undefined ones give "". */
int tokenizer_piece(const struct tokenizer *t, int32_t id, char *buf, size_t cap);

uint32_t tokenizer_n_vocab(const struct tokenizer *t);
int32_t tokenizer_bos(const struct tokenizer *t);   /* -1 if none */
int32_t tokenizer_eos(const struct tokenizer *t);
bool tokenizer_is_eog(const struct tokenizer *t, int32_t id);  /* end of generation */

/* Whether decoding should drop one leading space of the first piece (SPM
 * vocabularies that add the "▁" prefix), as llama.cpp's detokenizer does. */
bool tokenizer_adds_space_prefix(const struct tokenizer *t);

#endif
