/* fuzz_gguf.c - libFuzzer target for the GGUF parser.
 * Build: CC=clang ./configure --enable-fuzzing --enable-asan && make tests/fuzz/fuzz_gguf
 * Run:   ./tests/fuzz/fuzz_gguf -max_len=65536 corpus/ */
#include "config.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "gguf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct gguf_file *g;
	struct moe_error err;
	if (size > (1u << 20))
		return 0;
	if (gguf_parse(data, size, &g, &err) != 0)
		return 0;
	/* Touch everything a caller may touch. */
	for (uint64_t i = 0; i < g->n_kv; i++) {
		const struct gguf_kv *kv = &g->kv[i];
		if (gguf_find_kv(g, kv->key.data) != kv)
			__builtin_trap();
		uint32_t u32;
		uint64_t u64, n;
		int64_t i64;
		float f;
		bool b;
		const char *s;
		uint32_t et;
		(void)gguf_get_u32(g, kv->key.data, &u32);
		(void)gguf_get_u64(g, kv->key.data, &u64);
		(void)gguf_get_i64(g, kv->key.data, &i64);
		(void)gguf_get_f32(g, kv->key.data, &f);
		(void)gguf_get_bool(g, kv->key.data, &b);
		(void)gguf_get_str(g, kv->key.data, &s, NULL);
		if (gguf_get_arr(g, kv->key.data, &et, &n) == 0) {
			for (uint64_t j = 0; j < n && j < 64; j++) {
				double d;
				const struct gguf_str *gs;
				(void)gguf_arr_i64(kv, j, &i64);
				(void)gguf_arr_f64(kv, j, &d);
				if (gguf_arr_str(kv, j, &gs) == 0 && gs->data[gs->len] != '\0')
					__builtin_trap();
			}
		}
	}
	uint8_t buf[64];
	for (uint64_t i = 0; i < g->n_tensors; i++) {
		const struct gguf_tensor *t = &g->tensors[i];
		if (gguf_find_tensor(g, t->name.data) != t || t->offset + t->bytes > size)
			__builtin_trap();
		size_t n = t->bytes < sizeof(buf) ? (size_t)t->bytes : sizeof(buf);
		if (gguf_read(g, t, t->bytes - n, buf, n, &err) != 0)
			__builtin_trap();
	}
	gguf_close(g);
	return 0;
}
