/* moe-gen - deterministic tiny (or large) MoE checkpoints in safetensors and
 * GGUF for every supported family, and synthetic routing traces in the
 * MoE-Beyond CSV schema. Everything is a pure function of the seed (see
 * tools/gen.h), so tests regenerate the expected bytes instead of storing them. */
#include "config.h"
#include "gen.h"
#include "trace.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f)
{
	fputs("Usage: moe-gen model --family F [--format safetensors|gguf] [--dtype D] [--shards N]\n"
	      "                     [--preset P] [--layers N] [--experts N] [--top-k N]\n"
	      "                     [--hidden N] [--width N] [--shared N] [--dense-layers N]\n"
	      "                     [--dense-width N] [--vocab N] [--heads N] [--kv-heads N]\n"
	      "                     [--head-dim N] [--context N] [--n-group N] [--topk-group N]\n"
	      "                     [--alignment N] [--seed S] --out DIR\n"
	      "       moe-gen trace [--tokens N] [--layers N] [--first-layer N] [--experts N]\n"
	      "                     [--top-k N] [--skew X] [--locality P] [--seed S]\n"
	      "                     [--prompts N] --out FILE|DIR\n"
	      "       moe-gen --help | --version\n"
	      "Families: mixtral qwen2_moe qwen3_moe deepseek_v2 deepseek_v3 olmoe gpt_oss.\n"
	      "Presets: tiny dsv2-lite tiny-lm, and olmoe-1b-7b qwen3-30b-a3b (they imply --family).\n"
	      "Dtypes: f32 f16 bf16 (both formats), q8_0 q4_0 (gguf), mxfp4 (gpt_oss).\n"
	      "See moe-gen(1).\n",
	      f);
}

static int parse_u64(const char *opt, const char *s, uint64_t max, uint64_t *out)
{
	char *end;
	errno = 0;
	if (!s || !*s || *s == '-') {
		fprintf(stderr, "moe-gen: %s needs a non-negative integer\n", opt);
		return -EINVAL;
	}
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || *end || v > max) {
		fprintf(stderr, "moe-gen: bad value '%s' for %s (0..%" PRIu64 ")\n", s, opt, max);
		return -EINVAL;
	}
	*out = v;
	return 0;
}

static int parse_u32(const char *opt, const char *s, uint32_t *out)
{
	uint64_t v;
	int rc = parse_u64(opt, s, UINT32_MAX, &v);
	if (!rc)
		*out = (uint32_t)v;
	return rc;
}

static int parse_double(const char *opt, const char *s, double *out)
{
	char *end;
	errno = 0;
	double v = s ? strtod(s, &end) : 0.0;
	if (!s || !*s || errno || *end) {
		fprintf(stderr, "moe-gen: bad number '%s' for %s\n", s ? s : "", opt);
		return -EINVAL;
	}
	*out = v;
	return 0;
}

enum {
	O_FAMILY = 256, O_FORMAT, O_DTYPE, O_SHARDS, O_PRESET, O_LAYERS, O_EXPERTS, O_TOPK, O_HIDDEN,
	O_WIDTH, O_SHARED, O_DENSE_LAYERS, O_DENSE_WIDTH, O_VOCAB, O_NGROUP, O_TOPKGROUP, O_ALIGN,
	O_HEADS, O_KV_HEADS, O_HEAD_DIM, O_CONTEXT,
	O_SEED, O_OUT, O_TOKENS, O_FIRST_LAYER, O_SKEW, O_LOCALITY, O_PROMPTS, O_HELP, O_VERSION,
	O_LAST
};

static const struct option model_opts[] = {
	{ "family", required_argument, NULL, O_FAMILY },
	{ "format", required_argument, NULL, O_FORMAT },
	{ "dtype", required_argument, NULL, O_DTYPE },
	{ "shards", required_argument, NULL, O_SHARDS },
	{ "preset", required_argument, NULL, O_PRESET },
	{ "layers", required_argument, NULL, O_LAYERS },
	{ "experts", required_argument, NULL, O_EXPERTS },
	{ "top-k", required_argument, NULL, O_TOPK },
	{ "hidden", required_argument, NULL, O_HIDDEN },
	{ "width", required_argument, NULL, O_WIDTH },
	{ "shared", required_argument, NULL, O_SHARED },
	{ "dense-layers", required_argument, NULL, O_DENSE_LAYERS },
	{ "dense-width", required_argument, NULL, O_DENSE_WIDTH },
	{ "vocab", required_argument, NULL, O_VOCAB },
	{ "n-group", required_argument, NULL, O_NGROUP },
	{ "topk-group", required_argument, NULL, O_TOPKGROUP },
	{ "alignment", required_argument, NULL, O_ALIGN },
	{ "heads", required_argument, NULL, O_HEADS },
	{ "kv-heads", required_argument, NULL, O_KV_HEADS },
	{ "head-dim", required_argument, NULL, O_HEAD_DIM },
	{ "context", required_argument, NULL, O_CONTEXT },
	{ "seed", required_argument, NULL, O_SEED },
	{ "out", required_argument, NULL, O_OUT },
	{ "help", no_argument, NULL, O_HELP },
	{ NULL, 0, NULL, 0 },
};

static int cmd_model(int argc, char **argv)
{
	struct gen_model g;
	struct moe_error err = { "" };
	const char *family = NULL, *format = "safetensors", *dtype = "bf16", *preset = "tiny", *out = NULL;
	/* sizes given on the command line override the preset, whatever the order */
	uint32_t set[O_LAST] = { 0 };
	bool have[O_LAST] = { false };
	uint64_t seed = 1;
	int c;

	optind = 1;
	while ((c = getopt_long(argc, argv, "", model_opts, NULL)) != -1) {
		switch (c) {
		case O_FAMILY: family = optarg; break;
		case O_FORMAT: format = optarg; break;
		case O_DTYPE: dtype = optarg; break;
		case O_PRESET: preset = optarg; break;
		case O_OUT: out = optarg; break;
		case O_SEED:
			if (parse_u64("--seed", optarg, UINT64_MAX, &seed))
				return 2;
			break;
		case O_HELP: usage(stdout); return 0;
		case '?': usage(stderr); return 2;
		default:
			if (c < O_FAMILY || c >= O_LAST)
				return 2;
			char opt[32];
			snprintf(opt, sizeof(opt), "--%s", model_opts[c - O_FAMILY].name);
			if (parse_u32(opt, optarg, &set[c]))
				return 2;
			have[c] = true;
			break;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "moe-gen: unexpected argument '%s'\n", argv[optind]);
		return 2;
	}
	if (!out) {
		fprintf(stderr, "moe-gen model: --out is required\n");
		usage(stderr);
		return 2;
	}
	/* without --family, the preset names it (or gen_model_validate says it is missing) */
	enum moe_family f = family ? moe_family_parse(family) : MOE_FAMILY_UNKNOWN;
	if (family && f == MOE_FAMILY_UNKNOWN) {
		fprintf(stderr, "moe-gen: unknown family '%s'\n", family);
		return 2;
	}
	gen_model_defaults(&g, f);
	if (!(g.format = gen_format_parse(format))) {
		fprintf(stderr, "moe-gen: unknown format '%s' (safetensors, gguf)\n", format);
		return 2;
	}
	if ((g.dtype = moe_dtype_parse(dtype)) == MOE_DTYPE_INVALID) {
		fprintf(stderr, "moe-gen: unknown dtype '%s'\n", dtype);
		return 2;
	}
	g.seed = seed;
	if (gen_model_preset(&g, preset, &err)) {
		fprintf(stderr, "moe-gen: %s\n", err.msg);
		return 2;
	}
#define OVR(opt, field) if (have[opt]) g.field = set[opt]
	OVR(O_SHARDS, shards);
	OVR(O_LAYERS, n_layers);
	OVR(O_EXPERTS, n_experts);
	OVR(O_TOPK, top_k);
	OVR(O_HIDDEN, hidden);
	OVR(O_WIDTH, width);
	OVR(O_SHARED, n_shared);
	OVR(O_DENSE_LAYERS, dense_layers);
	OVR(O_DENSE_WIDTH, dense_width);
	OVR(O_VOCAB, vocab);
	OVR(O_NGROUP, n_group);
	OVR(O_TOPKGROUP, topk_group);
	OVR(O_ALIGN, gguf_alignment);
	OVR(O_HEADS, n_head);
	OVR(O_KV_HEADS, n_head_kv);
	OVR(O_HEAD_DIM, head_dim);
	OVR(O_CONTEXT, ctx_len);
#undef OVR
	if (g.family == MOE_FAMILY_UNKNOWN) {
		fprintf(stderr, "moe-gen model: --family is required (preset %s names none)\n", preset);
		return 2;
	}
	if (gen_model_validate(&g, &err)) {
		fprintf(stderr, "moe-gen: %s\n", err.msg);
		return 2;
	}
	/* tiny and dsv2-lite are expert-level models: no note for them */
	if (g.format == GEN_FORMAT_GGUF && strcmp(preset, "tiny") && strcmp(preset, "dsv2-lite") &&
	    gen_model_llama_check(&g, &err))
		fprintf(stderr, "moe-gen: note: llama.cpp will not load this GGUF: %s\n", err.msg);
	uint32_t files = 0;
	uint64_t bytes = 0;
	uint64_t t0 = moe_now_ns();
	int rc = gen_write_model(&g, out, &files, &bytes, &err);
	if (rc) {
		fprintf(stderr, "moe-gen: %s\n", err.msg);
		return 1;
	}
	double s = (double)(moe_now_ns() - t0) / 1e9;
	char sz[32];
	printf("moe-gen: %s %s %s seed %" PRIu64 ": %u files, %" PRIu64 " bytes (%s) in %s, %.2f s, %.0f MB/s\n",
	       moe_family_name(g.family), gen_format_name(g.format), moe_dtype_name(g.dtype), g.seed, files, bytes,
	       moe_fmt_size(bytes, sz, sizeof(sz)), out, s, s > 0 ? (double)bytes / s / 1e6 : 0.0);
	return 0;
}

static const struct option trace_opts[] = {
	{ "tokens", required_argument, NULL, O_TOKENS },
	{ "layers", required_argument, NULL, O_LAYERS },
	{ "first-layer", required_argument, NULL, O_FIRST_LAYER },
	{ "experts", required_argument, NULL, O_EXPERTS },
	{ "top-k", required_argument, NULL, O_TOPK },
	{ "skew", required_argument, NULL, O_SKEW },
	{ "locality", required_argument, NULL, O_LOCALITY },
	{ "seed", required_argument, NULL, O_SEED },
	{ "prompts", required_argument, NULL, O_PROMPTS },
	{ "out", required_argument, NULL, O_OUT },
	{ "help", no_argument, NULL, O_HELP },
	{ NULL, 0, NULL, 0 },
};

static int write_trace(const struct gen_trace_opts *o, uint32_t prompt, const char *path, uint64_t *bytes)
{
	struct moe_error err = { "" };
	struct trace *tr = NULL;
	bool to_stdout = strcmp(path, "-") == 0;
	int rc = gen_trace(o, prompt, &tr, &err);
	if (rc) {
		fprintf(stderr, "moe-gen: %s\n", err.msg);
		return rc;
	}
	FILE *f = to_stdout ? stdout : fopen(path, "w");
	if (!f) {
		rc = -errno;
		fprintf(stderr, "moe-gen: %s: %s\n", path, strerror(errno));
		trace_free(tr);
		return rc;
	}
	rc = trace_write(f, tr);
	long len = ftell(f);
	if (fflush(f) && !rc)
		rc = -EIO;
	if (!to_stdout && fclose(f) && !rc)
		rc = -EIO;
	if (rc)
		fprintf(stderr, "moe-gen: writing %s: %s\n", path, strerror(-rc));
	else if (len > 0)
		*bytes += (uint64_t)len;
	trace_free(tr);
	return rc;
}

static int cmd_trace(int argc, char **argv)
{
	struct gen_trace_opts o;
	struct moe_error err = { "" };
	const char *out = NULL;
	uint32_t prompts = 0;
	int c;

	gen_trace_defaults(&o);
	optind = 1;
	while ((c = getopt_long(argc, argv, "", trace_opts, NULL)) != -1) {
		int rc = 0;
		switch (c) {
		case O_TOKENS: rc = parse_u32("--tokens", optarg, &o.tokens); break;
		case O_LAYERS: rc = parse_u32("--layers", optarg, &o.layers); break;
		case O_FIRST_LAYER: rc = parse_u32("--first-layer", optarg, &o.first_layer); break;
		case O_EXPERTS: rc = parse_u32("--experts", optarg, &o.experts); break;
		case O_TOPK: rc = parse_u32("--top-k", optarg, &o.top_k); break;
		case O_SKEW: rc = parse_double("--skew", optarg, &o.skew); break;
		case O_LOCALITY: rc = parse_double("--locality", optarg, &o.locality); break;
		case O_SEED: rc = parse_u64("--seed", optarg, UINT64_MAX, &o.seed); break;
		case O_PROMPTS: rc = parse_u32("--prompts", optarg, &prompts); break;
		case O_OUT: out = optarg; break;
		case O_HELP: usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
		if (rc)
			return 2;
	}
	if (optind < argc) {
		fprintf(stderr, "moe-gen: unexpected argument '%s'\n", argv[optind]);
		return 2;
	}
	if (!out) {
		fprintf(stderr, "moe-gen trace: --out is required (a file, '-' for stdout, or a directory with --prompts)\n");
		return 2;
	}
	if (gen_trace_validate(&o, &err)) {
		fprintf(stderr, "moe-gen: %s\n", err.msg);
		return 2;
	}
	if (prompts > 100000) {
		fprintf(stderr, "moe-gen: --prompts %u out of range (1..100000)\n", prompts);
		return 2;
	}
	uint64_t bytes = 0;
	uint32_t files = 0;
	if (prompts == 0) {
		if (write_trace(&o, 0, out, &bytes))
			return 1;
		files = 1;
	} else {
		if (gen_make_dir(out, &err)) {
			fprintf(stderr, "moe-gen: %s\n", err.msg);
			return 1;
		}
		for (uint32_t p = 1; p <= prompts; p++, files++) {
			char path[4096];
			snprintf(path, sizeof(path), "%s/prompt_%u_data.csv", out, p);
			if (write_trace(&o, p, path, &bytes))
				return 1;
		}
	}
	char sz[32];
	if (strcmp(out, "-") == 0) /* stdout carries the CSV; its size is unknown here */
		fprintf(stderr, "moe-gen: trace seed %" PRIu64 " to stdout, %u tokens x %u layers, top-%u of %u\n",
			o.seed, o.tokens, o.layers, o.top_k, o.experts);
	else
		printf("moe-gen: trace seed %" PRIu64 ": %u files, %" PRIu64 " bytes (%s), %u tokens x %u layers, top-%u of %u\n",
		       o.seed, files, bytes, moe_fmt_size(bytes, sz, sizeof(sz)), o.tokens, o.layers, o.top_k, o.experts);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		usage(stderr);
		return 2;
	}
	if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
		usage(stdout);
		return 0;
	}
	if (!strcmp(argv[1], "--version")) {
		printf("moe-gen %s\n", PACKAGE_VERSION);
		return 0;
	}
	if (!strcmp(argv[1], "model"))
		return cmd_model(argc - 1, argv + 1);
	if (!strcmp(argv[1], "trace"))
		return cmd_trace(argc - 1, argv + 1);
	fprintf(stderr, "moe-gen: unknown command '%s' (model, trace)\n", argv[1]);
	usage(stderr);
	return 2;
}
