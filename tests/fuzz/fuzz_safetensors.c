/* fuzz_safetensors.c - libFuzzer target for the safetensors header parser.
 * Build: CC=clang ./configure --enable-fuzzing --enable-asan && make tests/fuzz/fuzz_safetensors
 * Run:   ./tests/fuzz/fuzz_safetensors -max_len=65536 corpus/ */
#include "config.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct safetensors_file *f;
	struct moe_error err;
	if (size > (1u << 20))
		return 0;
	if (safetensors_parse(data, size, size, &f, &err) != 0)
		return 0;
	/* A file that validates must be self-consistent. */
	uint64_t end = f->data_start;
	for (uint32_t i = 0; i < f->n_tensors; i++) {
		const struct safetensors_tensor *t = &f->tensors[i];
		if (t->offset != end || safetensors_find(f, t->name) != t)
			__builtin_trap();
		end += t->bytes;
	}
	if (end != size)
		__builtin_trap();
	for (uint32_t i = 0; i < f->n_metadata; i++)
		if (!safetensors_metadata(f, f->meta_keys[i]))
			__builtin_trap();
	safetensors_close(f);
	return 0;
}
