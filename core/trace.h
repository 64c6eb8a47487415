/* trace.h - routing traces in the CSV schema of the MoE-Beyond traces:
 *
 *   Layer ID,Batch Number,Token,Activated Expert IDs
 *   1,0,How,"[8, 22, 43, 46, 63, 7]"
 *
 * RFC 4180 quoting (a token may hold commas, quotes and any UTF-8), rows
 * grouped by layer, the i-th row of each layer being token i. The reader
 * turns this into a token-major matrix for replay.
 */
#ifndef MOETIER_TRACE_H
#define MOETIER_TRACE_H

#include <stdint.h>
#include <stdio.h>

#include "util.h"

#define TRACE_MAX_K 32          /* experts per (token, layer) */
#define TRACE_MAX_LAYERS 1024
#define TRACE_MAX_EXPERT 65535
#define TRACE_NONE UINT16_MAX   /* padding in experts[] when a row has < k ids */

struct trace {
	uint32_t n_tokens;
	uint32_t n_layers;       /* layers first_layer .. first_layer + n_layers - 1 */
	uint32_t first_layer;    /* the smallest Layer ID in the file */
	uint32_t k;              /* the largest number of ids in a row */
	uint32_t max_expert;     /* the largest expert id seen */
	uint16_t *experts;       /* [n_tokens][n_layers][k], TRACE_NONE-padded */
	uint8_t *count;          /* [n_tokens][n_layers]: ids in that row (0 = row absent) */
	uint32_t *batch;         /* [n_tokens] */
	char **token;            /* [n_tokens] token text (from the first layer seen) */
};

/* Experts of (token t, layer index li), li counted from first_layer. */
static inline const uint16_t *trace_row(const struct trace *tr, uint32_t t, uint32_t li)
{
	return &tr->experts[((size_t)t * tr->n_layers + li) * tr->k];
}

/* Parses a whole file. Malformed input gives -EINVAL and a message naming
 * the line ("prompt_1_data.csv:17: expected ']'"). */
int trace_load(const char *path, struct trace **out, struct moe_error *err);
/* The same from a buffer (for tests and fuzzing); name is used in messages. */
int trace_parse(const char *buf, size_t len, const char *name, struct trace **out, struct moe_error *err);
void trace_free(struct trace *tr);

/* Writes a trace in the same CSV schema (quoting tokens as needed). */
int trace_write(FILE *f, const struct trace *tr);

#endif
