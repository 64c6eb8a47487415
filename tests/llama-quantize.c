/* llama-quantize.c - test helper: quantizes a GGUF with llama.cpp's own
 * quantizer (llama_model_quantize in the npm libllama; its llama-quantize
 * program is not shipped), so tests get K-quant files exactly as users'
 * Q4_K_M downloads are made: the mix of types per tensor is llama.cpp's
 * (llama-quant.cpp), not ours.
 *
 *   llama-quantize [--tensor REGEX=T]... [--embd T] IN OUT [FTYPE]
 *     FTYPE: Q4_K_M (default), Q5_K_M, Q6_K, Q3_K_M, Q2_K, IQ4_XS, IQ4_NL,
 *     Q8_0, Q4_0; --tensor: llama-quantize's --tensor-type (tensors whose
 *     name matches REGEX get ggml type T: Q4_K, Q6_K, Q8_0, ...); --embd:
 *     --token-embedding-type.
 * Links llama.cpp only. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ggml-backend.h>
#include <llama.h>

static const struct {
	const char *name;
	enum llama_ftype ftype;
} types[] = {
	{ "Q4_K_M", LLAMA_FTYPE_MOSTLY_Q4_K_M }, { "Q5_K_M", LLAMA_FTYPE_MOSTLY_Q5_K_M },
	{ "Q6_K", LLAMA_FTYPE_MOSTLY_Q6_K },     { "Q3_K_M", LLAMA_FTYPE_MOSTLY_Q3_K_M },
	{ "Q2_K", LLAMA_FTYPE_MOSTLY_Q2_K },     { "IQ4_XS", LLAMA_FTYPE_MOSTLY_IQ4_XS },
	{ "IQ4_NL", LLAMA_FTYPE_MOSTLY_IQ4_NL }, { "Q8_0", LLAMA_FTYPE_MOSTLY_Q8_0 },
	{ "Q4_0", LLAMA_FTYPE_MOSTLY_Q4_0 },
};

static const struct {
	const char *name;
	enum ggml_type type;
} gtypes[] = {
	{ "F32", GGML_TYPE_F32 },   { "F16", GGML_TYPE_F16 },   { "BF16", GGML_TYPE_BF16 },
	{ "Q8_0", GGML_TYPE_Q8_0 }, { "Q4_0", GGML_TYPE_Q4_0 }, { "Q4_K", GGML_TYPE_Q4_K },
	{ "Q5_K", GGML_TYPE_Q5_K }, { "Q6_K", GGML_TYPE_Q6_K }, { "Q3_K", GGML_TYPE_Q3_K },
	{ "Q2_K", GGML_TYPE_Q2_K }, { "IQ4_NL", GGML_TYPE_IQ4_NL }, { "IQ4_XS", GGML_TYPE_IQ4_XS },
};

static enum ggml_type gtype(const char *name)
{
	for (size_t i = 0; i < sizeof(gtypes) / sizeof(gtypes[0]); i++)
		if (strcmp(gtypes[i].name, name) == 0)
			return gtypes[i].type;
	fprintf(stderr, "llama-quantize: unknown ggml type %s\n", name);
	exit(2);
}

static void quiet_log(enum ggml_log_level level, const char *text, void *ud)
{
	(void)ud;
	if (level >= GGML_LOG_LEVEL_WARN || getenv("MOETIER_GGML_VERBOSE"))
		fputs(text, stderr);
}

int main(int argc, char **argv)
{
	struct llama_model_tensor_override ov[17];
	int n_ov = 0, a = 1;
	enum ggml_type embd = GGML_TYPE_COUNT;
	size_t i;
	for (; a + 1 < argc && argv[a][0] == '-'; a += 2) {
		char *eq = strchr(argv[a + 1], '=');
		if (strcmp(argv[a], "--tensor") == 0 && eq && n_ov < 16) {
			*eq = '\0';
			ov[n_ov++] = (struct llama_model_tensor_override){ argv[a + 1], gtype(eq + 1) };
		} else if (strcmp(argv[a], "--embd") == 0) {
			embd = gtype(argv[a + 1]);
		} else {
			break;
		}
	}
	ov[n_ov] = (struct llama_model_tensor_override){ NULL, GGML_TYPE_COUNT };
	if (argc - a < 2 || argc - a > 3) {
		fprintf(stderr, "usage: llama-quantize [--tensor REGEX=TYPE]... [--embd TYPE] IN OUT [FTYPE]\n");
		return 2;
	}
	const char *tn = argc - a > 2 ? argv[a + 2] : "Q4_K_M";
	for (i = 0; i < sizeof(types) / sizeof(types[0]) && strcmp(types[i].name, tn) != 0; i++)
		;
	if (i == sizeof(types) / sizeof(types[0])) {
		fprintf(stderr, "llama-quantize: unknown type %s\n", tn);
		return 2;
	}
	llama_log_set(quiet_log, NULL);
	llama_backend_init();
	llama_model_quantize_params p = llama_model_quantize_default_params();
	p.ftype = types[i].ftype;
	p.nthread = 1;
	if (n_ov)
		p.tt_overrides = ov;
	if (embd != GGML_TYPE_COUNT)
		p.token_embedding_type = embd;
	uint32_t rc = llama_model_quantize(argv[a], argv[a + 1], &p);
	llama_backend_free();
	if (rc != 0) {
		fprintf(stderr, "llama-quantize: llama_model_quantize(%s -> %s, %s) failed: %u\n", argv[a], argv[a + 1], tn,
			rc);
		return 1;
	}
	return 0;
}
