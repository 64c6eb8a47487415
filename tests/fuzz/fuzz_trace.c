/* fuzz_trace.c - libFuzzer target for the routing trace CSV parser: whatever
 * parses must survive trace_write + trace_parse unchanged.
 * Build: CC=clang ./configure --enable-fuzzing --enable-asan && make tests/fuzz/fuzz_trace
 * Run:   ./tests/fuzz/fuzz_trace -max_len=16384 corpus/ */
#include "config.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "trace.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct trace *tr, *back;
	struct moe_error err;
	char *out = NULL;
	size_t olen = 0;
	if (size > (1u << 20))
		return 0;
	if (trace_parse((const char *)data, size, "fuzz", &tr, &err) != 0)
		return 0;
	FILE *f = open_memstream(&out, &olen);
	if (!f)
		abort();
	if (trace_write(f, tr) != 0)
		__builtin_trap();
	fclose(f);
	if (trace_parse(out, olen, "rewrite", &back, &err) != 0)
		__builtin_trap();
	size_t cells = (size_t)tr->n_tokens * tr->n_layers;
	if (back->n_tokens != tr->n_tokens || back->n_layers != tr->n_layers ||
	    back->first_layer != tr->first_layer || back->k != tr->k ||
	    back->max_expert != tr->max_expert || memcmp(back->count, tr->count, cells) ||
	    memcmp(back->experts, tr->experts, cells * tr->k * sizeof(uint16_t)) ||
	    memcmp(back->batch, tr->batch, tr->n_tokens * sizeof(uint32_t)))
		__builtin_trap();
	for (uint32_t i = 0; i < tr->n_tokens; i++)
		if (strcmp(back->token[i], tr->token[i]) != 0)
			__builtin_trap();
	trace_free(back);
	trace_free(tr);
	free(out);
	return 0;
}
