/* llama-archs-shim.c - linked into llama.cpp's tests/test-llama-archs.cpp
 * (built at test time from the bundled source by tests/test_llama_archs.sh)
 * so that it runs against node-llama-cpp's prebuilt libraries:
 *
 *  - the libraries load their CPU backend dynamically: a constructor loads
 *    the backends from $MOETIER_LLAMA_BACKEND_DIR (upstream's CMake build
 *    links them in);
 *  - node-llama-cpp applies llama.cpp PR 22566 to its build: a model made
 *    from metadata alone (llama_model_init_from_user) then counts the
 *    metadata's tensors, which this version of the test does not declare,
 *    and llama_model_loader::done_getting_tensors throws "too many tensors
 *    created". The check is emptied here (interposed: libllama calls it
 *    through its PLT), so the test writes its models;
 *  - with the patch, tensors the metadata lacks that an architecture marks
 *    optional (ffn_gate_up_exps, *.scale, *.input_scale, biases,
 *    rope_freqs...) are not created, while upstream's loader creates them
 *    all (then randomly filled). MOETIER_ARCHS_UPSTREAM=1 restores that:
 *    during llama_model_init_from_user, gguf_find_tensor answers "present,
 *    f32" for every name except attn_qkv (which both loaders skip in this
 *    mode: TENSOR_SKIP_IF_VIRTUAL);
 *  - MOETIER_ARCHS_OMIT=a,b,...: tensors whose names contain one of these
 *    are reported absent (and so not created when optional).
 *
 * Our code, not llama.cpp's: it only declares the symbols it replaces. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ggml-backend.h>
#include <gguf.h>
#include <llama.h>

#define ABSENT_F32 ((int64_t)1 << 40) /* a tensor id no metadata has */

static int in_init; /* inside llama_model_init_from_user */

__attribute__((constructor)) static void shim_load_backends(void)
{
	const char *d = getenv("MOETIER_LLAMA_BACKEND_DIR");
	if (!d || !*d) {
		fprintf(stderr, "llama-archs-shim: MOETIER_LLAMA_BACKEND_DIR is not set\n");
		exit(2);
	}
	ggml_backend_load_all_from_path(d);
}

/* llama_model_loader::done_getting_tensors(bool) const */
void _ZNK18llama_model_loader20done_getting_tensorsEb(const void *self, bool partial);
void _ZNK18llama_model_loader20done_getting_tensorsEb(const void *self, bool partial)
{
	(void)self;
	(void)partial;
}

static bool omitted(const char *name)
{
	const char *list = getenv("MOETIER_ARCHS_OMIT");
	char buf[512];
	if (!list || !*list)
		return false;
	snprintf(buf, sizeof(buf), "%s", list);
	for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save))
		if (*t && strstr(name, t))
			return true;
	return false;
}

static void *next(const char *sym)
{
	void *p = dlsym(RTLD_NEXT, sym);
	if (!p) {
		fprintf(stderr, "llama-archs-shim: %s not found\n", sym);
		abort();
	}
	return p;
}

int64_t gguf_find_tensor(const struct gguf_context *ctx, const char *name)
{
	static int64_t (*real)(const struct gguf_context *, const char *);
	if (!real)
		*(void **)&real = next("gguf_find_tensor");
	if (in_init && omitted(name))
		return -1;
	int64_t id = real(ctx, name);
	const char *up = getenv("MOETIER_ARCHS_UPSTREAM");
	if (id < 0 && in_init && up && *up == '1' && !strstr(name, "attn_qkv"))
		return ABSENT_F32;
	return id;
}

enum ggml_type gguf_get_tensor_type(const struct gguf_context *ctx, int64_t id)
{
	static enum ggml_type (*real)(const struct gguf_context *, int64_t);
	if (!real)
		*(void **)&real = next("gguf_get_tensor_type");
	return id == ABSENT_F32 ? GGML_TYPE_F32 : real(ctx, id);
}

struct llama_model *llama_model_init_from_user(struct gguf_context *meta, llama_model_set_tensor_data_t fn, void *ud,
					       struct llama_model_params params)
{
	static struct llama_model *(*real)(struct gguf_context *, llama_model_set_tensor_data_t, void *,
					   struct llama_model_params);
	if (!real)
		*(void **)&real = next("llama_model_init_from_user");
	in_init = 1;
	struct llama_model *m = real(meta, fn, ud, params);
	in_init = 0;
	return m;
}
