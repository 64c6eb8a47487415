/* moe-pack - writes, describes and verifies .moepack files.
 *
 *   moe-pack convert SRC -o OUT.moepack [--name N] [--family F] [--experts-only] [-q]
 *   moe-pack info FILE [--tensors] [--json]
 *   moe-pack verify FILE
 *   moe-pack molae --rank R [--group-size K | --groups auto] IN -o OUT [--json] [-q]
 *
 * Exit status: 0 success, 1 failure (bad input, a verify failure), 2 usage. */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "convert.h"
#include "molae.h"
#include "pack.h"
#include "util.h"

static void usage(FILE *f)
{
	fprintf(f,
		"usage: moe-pack convert SRC -o OUT.moepack [--name NAME] [--family FAMILY] [--experts-only] [-q]\n"
		"       moe-pack info FILE [--tensors] [--json]\n"
		"       moe-pack verify FILE\n"
		"       moe-pack molae --rank R [--group-size K | --groups auto] IN.moepack -o OUT.moepack\n"
		"                [--dtype f32|f16|bf16|q8_0] [--json] [-q]\n"
		"         (MoLAE: gate/up of each group of K experts ~ A_i B_g, rank R; doc/molae.md)\n"
		"SRC is a safetensors file, a directory holding model.safetensors or\n"
		"model.safetensors.index.json (+ config.json), an index .json, or a .gguf file\n"
		"(of a split model, the first part: NAME-00001-of-0000N.gguf).\n"
		"Families: mixtral qwen2_moe qwen3_moe deepseek_v2 deepseek_v3 olmoe gpt_oss.\n");
}

static double secs_since(uint64_t t0)
{
	return (double)(moe_now_ns() - t0) / 1e9;
}

static int cmd_convert(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "output", required_argument, NULL, 'o' }, { "name", required_argument, NULL, 'n' },
		{ "family", required_argument, NULL, 'f' }, { "quiet", no_argument, NULL, 'q' },
		{ "experts-only", no_argument, NULL, 'E' }, { "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct convert_options opt = { .progress = true };
	const char *out = NULL;
	struct convert_source *s;
	struct convert_stats st;
	struct moe_error err = { "" };
	int c;

	while ((c = getopt_long(argc, argv, "o:n:f:qEh", longopts, NULL)) != -1) {
		switch (c) {
		case 'o': out = optarg; break;
		case 'E': opt.experts_only = true; break;
		case 'n': opt.name = optarg; break;
		case 'f': opt.family = optarg; break;
		case 'q': opt.progress = false; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind + 1 != argc || !out) {
		usage(stderr);
		return 2;
	}
	if (opt.name && strlen(opt.name) >= sizeof(((struct moe_model_config *)0)->name)) {
		fprintf(stderr, "moe-pack: --name is longer than 63 bytes\n");
		return 2;
	}
	uint64_t t0 = moe_now_ns();
	if (convert_open(argv[optind], &opt, &s, &err) < 0) {
		fprintf(stderr, "moe-pack: %s\n", err.msg);
		return 1;
	}
	const struct moe_model_config *m = convert_model(s);
	if (opt.progress)
		fprintf(stderr, "moe-pack: %s %s (%s, %s): %u MoE layers x %u experts, %u resident tensors\n",
			convert_source_kind(s), argv[optind], moe_family_name(m->family), moe_dtype_name(m->dtype),
			m->n_moe_layers, m->n_experts, convert_n_resident(s));
	if (convert_write(s, out, &st, &err) < 0) {
		fprintf(stderr, "moe-pack: %s\n", err.msg);
		convert_close(s);
		return 1;
	}
	convert_close(s);
	double t = secs_since(t0);
	char sz[32];
	if (opt.progress)
		printf("wrote %s: %" PRIu64 " experts, %" PRIu64 " resident tensors, %s in %.2f s (%.0f MiB/s)\n", out,
		       st.experts, st.tensors, moe_fmt_size(st.bytes, sz, sizeof(sz)), t,
		       t > 0 ? (double)st.bytes / (1 << 20) / t : 0.0);
	return 0;
}

static const char *scoring_name(uint32_t s)
{
	return s == MOE_SCORING_SOFTMAX ? "softmax" : s == MOE_SCORING_SIGMOID ? "sigmoid"
				      : s == MOE_SCORING_TOPK_SOFTMAX ? "topk_softmax" : "?";
}

static const char *topk_name(uint32_t t)
{
	return t == MOE_TOPK_GREEDY ? "greedy" : t == MOE_TOPK_GROUP_LIMITED ? "group_limited" : "?";
}

/* Kinds of resident tensors that `info` sums up, by role and, for OTHER,
 * by GGUF name. */
enum { K_ROUTER, K_SHARED, K_EMBED, K_ATTN, K_NORM, K_DENSE_FFN, K_OUTPUT, K_META, K_OTHER, N_KINDS };
static const char *const kind_names[N_KINDS] = {
	"routers and biases", "shared experts", "embeddings", "attention", "norms", "dense FFN", "output head",
	"metadata (" PACK_KV_TENSOR ")", "other",
};
static const char *const kind_keys[N_KINDS] = {
	"router", "shared_expert", "embedding", "attention", "norm", "dense_ffn", "output", "metadata", "other",
};

static int tensor_kind(const struct pack_tensor_entry *t)
{
	const char *n = strchr(t->name, '.'), *dot;
	switch (t->role) {
	case PACK_ROLE_ROUTER: case PACK_ROLE_ROUTER_BIAS: case PACK_ROLE_SCORE_BIAS: return K_ROUTER;
	case PACK_ROLE_SHARED_GATE: case PACK_ROLE_SHARED_UP: case PACK_ROLE_SHARED_DOWN:
	case PACK_ROLE_SHARED_EXPERT_GATE: return K_SHARED;
	default: break;
	}
	if (strcmp(t->name, PACK_KV_TENSOR) == 0)
		return K_META;
	if (strncmp(t->name, "token_embd", 10) == 0 || strncmp(t->name, "token_types", 11) == 0)
		return K_EMBED;
	if (strncmp(t->name, "output.", 7) == 0)
		return K_OUTPUT;
	/* blk.L.<what>.weight: the part after the layer number */
	if (strncmp(t->name, "blk.", 4) == 0 && n && (dot = strchr(n + 1, '.')))
		n = dot + 1;
	else
		n = t->name;
	if (strstr(n, "norm"))
		return K_NORM;
	if (strncmp(n, "attn_", 5) == 0)
		return K_ATTN;
	if (strncmp(n, "ffn_", 4) == 0)
		return K_DENSE_FFN;
	return K_OTHER;
}

static json_t *info_json(const struct pack_file *p)
{
	const struct pack_header_disk *h = p->hdr;
	const struct moe_model_config *m = p->model;
	json_t *o = json_object(), *mo = json_object(), *parts = json_array(), *ts = json_array();

	json_object_set_new(o, "file", json_string(p->path));
	json_object_set_new(o, "file_size", json_integer((json_int_t)p->file_size));
	json_object_set_new(o, "version", json_integer(h->version));
	json_object_set_new(o, "source", json_string(h->source));
	json_object_set_new(mo, "name", json_string(m->name));
	json_object_set_new(mo, "family", json_string(moe_family_name(m->family)));
	json_object_set_new(mo, "dtype", json_string(moe_dtype_name(m->dtype)));
	json_object_set_new(mo, "hidden", json_integer(m->hidden));
	json_object_set_new(mo, "expert_width", json_integer(m->expert_width));
	json_object_set_new(mo, "n_experts", json_integer(m->n_experts));
	json_object_set_new(mo, "top_k", json_integer(m->top_k));
	json_object_set_new(mo, "n_layers", json_integer(m->n_layers));
	json_object_set_new(mo, "n_moe_layers", json_integer(m->n_moe_layers));
	json_object_set_new(mo, "first_moe_layer", json_integer(m->first_moe_layer));
	json_object_set_new(mo, "moe_layer_step", json_integer(m->moe_layer_step));
	json_object_set_new(mo, "n_shared_experts", json_integer(m->n_shared_experts));
	json_object_set_new(mo, "shared_width", json_integer(m->shared_width));
	json_object_set_new(mo, "scoring", json_string(scoring_name(m->scoring)));
	json_object_set_new(mo, "topk_method", json_string(topk_name(m->topk_method)));
	json_object_set_new(mo, "norm_topk_prob", json_boolean(m->norm_topk_prob));
	json_object_set_new(mo, "n_group", json_integer(m->n_group));
	json_object_set_new(mo, "topk_group", json_integer(m->topk_group));
	json_object_set_new(mo, "routed_scaling_factor", json_real(m->routed_scaling_factor));
	json_object_set_new(mo, "ffn", json_string(m->ffn_kind == MOE_FFN_GPTOSS ? "gpt_oss" : "swiglu"));
	json_object_set_new(mo, "swiglu_limit", json_real(m->swiglu_limit));
	json_object_set_new(mo, "glu_alpha", json_real(m->glu_alpha));
	json_object_set_new(mo, "has_score_bias", json_boolean(m->has_score_bias));
	json_object_set_new(mo, "has_router_bias", json_boolean(m->has_router_bias));
	json_object_set_new(o, "model", mo);
	for (uint32_t i = 0; i < h->n_parts; i++) {
		const struct pack_part_desc *d = &h->parts[i];
		json_array_append_new(parts, json_pack("{s:s, s:s, s:i, s:i, s:I, s:I}", "role", pack_role_name(d->role),
						       "dtype", moe_dtype_name(d->dtype), "rows", (int)d->rows, "cols",
						       (int)d->cols, "offset", (json_int_t)d->offset, "bytes",
						       (json_int_t)d->bytes));
	}
	json_object_set_new(o, "parts", parts);
	json_object_set_new(o, "extent_payload", json_integer((json_int_t)h->extent_payload));
	json_object_set_new(o, "extent_bytes", json_integer((json_int_t)h->extent_bytes));
	json_object_set_new(o, "extents", json_integer((json_int_t)h->index_count));
	json_object_set_new(o, "resident_bytes", json_integer((json_int_t)h->resident_bytes));
	for (uint64_t i = 0; i < h->n_tensors; i++) {
		const struct pack_tensor_entry *t = &p->tensors[i];
		json_t *shape = json_array();
		for (uint32_t d = 0; d < t->n_dims; d++)
			json_array_append_new(shape, json_integer((json_int_t)t->shape[d]));
		json_t *jt = json_pack("{s:s, s:s, s:s, s:o, s:I, s:I}", "name", t->name, "role", pack_role_name(t->role),
				       "dtype", moe_dtype_name(t->dtype), "shape", shape, "offset", (json_int_t)t->offset,
				       "bytes", (json_int_t)t->bytes);
		json_object_set_new(jt, "layer", t->layer == UINT32_MAX ? json_null() : json_integer(t->layer));
		json_array_append_new(ts, jt);
	}
	json_object_set_new(o, "tensors", ts);
	/* the text's summary: count and bytes by kind */
	json_t *kinds = json_object();
	for (int k = 0; k < N_KINDS; k++) {
		uint64_t n = 0, bytes = 0;
		for (uint64_t i = 0; i < h->n_tensors; i++)
			if (tensor_kind(&p->tensors[i]) == k) {
				n++;
				bytes += p->tensors[i].bytes;
			}
		if (n)
			json_object_set_new(kinds, kind_keys[k], json_pack("{s:I, s:I}", "tensors", (json_int_t)n, "bytes",
									   (json_int_t)bytes));
	}
	json_object_set_new(o, "resident_kinds", kinds);
	json_object_set_new(o, "whole_model", json_boolean(pack_find_tensor(p, PACK_KV_TENSOR) != NULL));
	return o;
}

static void info_text(const struct pack_file *p, bool tensors)
{
	const struct pack_header_disk *h = p->hdr;
	const struct moe_model_config *m = p->model;
	char a[32], b[32];

	printf("file:          %s (%s)\n", p->path, moe_fmt_size(p->file_size, a, sizeof(a)));
	printf("format:        moepack v%u, from %s\n", h->version, h->source[0] ? h->source : "?");
	printf("model:         %s (%s)\n", m->name, moe_family_name(m->family));
	printf("expert dtype:  %s\n", moe_dtype_name(m->dtype));
	printf("hidden:        %u\n", m->hidden);
	printf("expert width:  %u\n", m->expert_width);
	printf("experts:       %u per MoE layer, top-%u\n", m->n_experts, m->top_k);
	printf("layers:        %u (%u MoE: first %u, step %u)\n", m->n_layers, m->n_moe_layers, m->first_moe_layer,
	       m->moe_layer_step);
	if (m->shared_width)
		printf("shared:        %u expert(s), width %u\n", m->n_shared_experts, m->shared_width);
	printf("routing:       %s, %s, norm_topk_prob %u, top-%u of %u groups, scale %g%s%s\n", scoring_name(m->scoring),
	       topk_name(m->topk_method), m->norm_topk_prob, m->topk_group, m->n_group, (double)m->routed_scaling_factor,
	       m->has_score_bias ? ", score bias" : "", m->has_router_bias ? ", router bias" : "");
	if (m->ffn_kind == MOE_FFN_GPTOSS)
		printf("ffn:           gpt_oss (limit %g, alpha %g)\n", (double)m->swiglu_limit, (double)m->glu_alpha);
	else
		printf("ffn:           swiglu\n");
	printf("parts:\n");
	for (uint32_t i = 0; i < h->n_parts; i++) {
		const struct pack_part_desc *d = &h->parts[i];
		printf("  %-13s %-6s [%u x %u]  offset %" PRIu64 "  %" PRIu64 " bytes\n", pack_role_name(d->role),
		       moe_dtype_name(d->dtype), d->rows, d->cols, d->offset, d->bytes);
	}
	printf("extent:        %" PRIu64 " bytes payload, %" PRIu64 " bytes read size\n", h->extent_payload,
	       h->extent_bytes);
	printf("extents:       %" PRIu64 " (%u layers x %u experts), %s\n", h->index_count, m->n_moe_layers,
	       m->n_experts, moe_fmt_size(h->index_count * h->extent_bytes, a, sizeof(a)));
	printf("resident:      %" PRIu64 " tensors, %s%s\n", h->n_tensors, moe_fmt_size(h->resident_bytes, b, sizeof(b)),
	       pack_find_tensor(p, PACK_KV_TENSOR) ? " (whole model, with " PACK_KV_TENSOR ")" : "");
	for (int k = 0; k < N_KINDS; k++) {
		uint64_t n = 0, bytes = 0;
		for (uint64_t i = 0; i < h->n_tensors; i++)
			if (tensor_kind(&p->tensors[i]) == k) {
				n++;
				bytes += p->tensors[i].bytes;
			}
		if (n)
			printf("  %-20s %5" PRIu64 " tensors  %s\n", kind_names[k], n, moe_fmt_size(bytes, a, sizeof(a)));
	}
	if (!tensors)
		return;
	printf("tensors:\n");
	for (uint64_t i = 0; i < h->n_tensors; i++) {
		const struct pack_tensor_entry *t = &p->tensors[i];
		char shape[96];
		size_t o = 0;
		for (uint32_t d = 0; d < t->n_dims; d++)
			o += (size_t)snprintf(shape + o, sizeof(shape) - o, "%s%" PRIu64, d ? " x " : "", t->shape[d]);
		printf("  %-40s %-18s %-5s [%s]  %s\n", t->name, pack_role_name(t->role), moe_dtype_name(t->dtype), shape,
		       moe_fmt_size(t->bytes, a, sizeof(a)));
	}
}

/* A pack is a regular file (or a block device holding one); anything else
 * is refused before pack_open() opens it, since opening a FIFO for reading
 * blocks until a writer comes. 0, or -1 with the message in err. */
static int check_pack_path(const char *path, struct moe_error *err)
{
	struct stat st;
	if (stat(path, &st) < 0)
		return moe_error_set(err, -errno, "%s: %s", path, strerror(errno));
	if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
		return moe_error_set(err, -EINVAL, "%s: not a regular file (%s)", path,
				     S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO"
				     : S_ISSOCK(st.st_mode) ? "a socket" : "a character device");
	return 0;
}

static int cmd_info(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "json", no_argument, NULL, 'j' }, { "tensors", no_argument, NULL, 't' },
		{ "help", no_argument, NULL, 'h' }, { NULL, 0, NULL, 0 },
	};
	bool json = false, tensors = false;
	struct pack_file *p;
	struct moe_error err = { "" };
	int c;

	while ((c = getopt_long(argc, argv, "jth", longopts, NULL)) != -1) {
		switch (c) {
		case 'j': json = true; break;
		case 't': tensors = true; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind + 1 != argc) {
		usage(stderr);
		return 2;
	}
	if (check_pack_path(argv[optind], &err) < 0 || pack_open(argv[optind], PACK_OPEN_NO_DIRECT, &p, &err) < 0) {
		fprintf(stderr, "moe-pack: %s\n", err.msg);
		return 1;
	}
	if (json) {
		json_t *o = info_json(p);
		json_dumpf(o, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
		putchar('\n');
		json_decref(o);
	} else {
		info_text(p, tensors);
	}
	pack_close(p);
	return 0;
}

static void print_failure(void *ctx, const char *what)
{
	(void)ctx;
	printf("FAIL: %s\n", what);
	fflush(stdout);
}

static int cmd_verify(int argc, char **argv)
{
	struct pack_file *p;
	struct moe_error err = { "" };
	char sz[32];

	if (argc != 2 || argv[1][0] == '-') {
		usage(argc == 2 && strcmp(argv[1], "--help") == 0 ? stdout : stderr);
		return argc == 2 && strcmp(argv[1], "--help") == 0 ? 0 : 2;
	}
	uint64_t t0 = moe_now_ns();
	if (check_pack_path(argv[1], &err) < 0 || pack_open(argv[1], 0, &p, &err) < 0) {
		printf("FAIL: %s\n", err.msg);
		return 1;
	}
	long n = pack_verify(p, print_failure, NULL, &err);
	double t = secs_since(t0);
	uint64_t total = p->hdr->index_count + p->hdr->n_tensors;
	if (n < 0) {
		printf("FAIL: %s: %s\n", argv[1], err.msg);
	} else if (n > 0) {
		printf("FAILED: %ld of %" PRIu64 " experts and tensors are damaged in %s\n", n, total, argv[1]);
	} else {
		printf("OK: %" PRIu64 " experts, %" PRIu64 " tensors verified (%s in %.2f s, %.0f MiB/s)\n",
		       p->hdr->index_count, p->hdr->n_tensors, moe_fmt_size(p->file_size, sz, sizeof(sz)), t,
		       t > 0 ? (double)p->file_size / (1 << 20) / t : 0.0);
	}
	pack_close(p);
	return n == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
	moe_log_init("moe-pack", MOE_LOG_WARN, false);
	if (argc < 2) {
		usage(stderr);
		return 2;
	}
	if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
		usage(stdout);
		return 0;
	}
	if (strcmp(argv[1], "--version") == 0) {
		printf("moe-pack %s (pack format v%u)\n", PACKAGE_VERSION, PACK_VERSION);
		return 0;
	}
	if (strcmp(argv[1], "convert") == 0)
		return cmd_convert(argc - 1, argv + 1);
	if (strcmp(argv[1], "info") == 0)
		return cmd_info(argc - 1, argv + 1);
	if (strcmp(argv[1], "verify") == 0)
		return cmd_verify(argc - 1, argv + 1);
	if (strcmp(argv[1], "molae") == 0)
		return molae_main(argc - 1, argv + 1);
	fprintf(stderr, "moe-pack: unknown command '%s'\n", argv[1]);
	usage(stderr);
	return 2;
}
