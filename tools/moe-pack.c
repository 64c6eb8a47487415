/* moe-pack - writes, describes and verifies .moepack files.
 *
 *   moe-pack convert SRC -o OUT.moepack [--name N] [--family F] [--experts-only] [-q]
 *   moe-pack info FILE [--tensors] [--json]
 *   moe-pack verify FILE
 *   moe-pack molae --rank R [--group-size K | --groups auto] IN -o OUT [--json] [-q]
 *   moe-pack similarity PACK [-o OUT] [--probes N] [--seed S] [-q]
 *
 * Exit status: 0 success, 1 failure (bad input, a verify failure), 2 usage. */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "convert.h"
#include "ffn.h"
#include "molae.h"
#include "pack.h"
#include "route.h"
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
		"       moe-pack similarity PACK [-o OUT.moepack] [--probes N] [--seed S] [-q]\n"
		"         (per MoE layer, the experts' output-space cosine similarity, stored as a\n"
		"          resident tensor for cache-aware routing; doc/routing.md)\n"
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

static json_t *part_json(const struct pack_part_desc *d)
{
	return json_pack("{s:s, s:s, s:i, s:i, s:I, s:I}", "role", pack_role_name(d->role), "dtype",
			 moe_dtype_name(d->dtype), "rows", (int)d->rows, "cols", (int)d->cols, "offset",
			 (json_int_t)d->offset, "bytes", (json_int_t)d->bytes);
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
	json_object_set_new(mo, "ffn", json_string(m->ffn_kind == MOE_FFN_GPTOSS ? "gpt_oss"
									  : m->ffn_kind == MOE_FFN_SILU ? "silu"
													: "swiglu"));
	json_object_set_new(mo, "swiglu_limit", json_real(m->swiglu_limit));
	json_object_set_new(mo, "glu_alpha", json_real(m->glu_alpha));
	json_object_set_new(mo, "has_score_bias", json_boolean(m->has_score_bias));
	json_object_set_new(mo, "has_router_bias", json_boolean(m->has_router_bias));
	json_object_set_new(o, "model", mo);
	for (uint32_t i = 0; i < h->n_parts; i++)
		json_array_append_new(parts, part_json(&h->parts[i]));
	json_object_set_new(o, "parts", parts);
	if (h->version >= 2 && h->n_layouts >= 2) {
		/* per-layer expert types: each table with the MoE layers using it */
		json_t *ls = json_array();
		for (uint32_t k = 0; k < h->n_layouts; k++) {
			const struct pack_layout_disk *L = &h->layouts[k];
			json_t *lp = json_array(), *layers = json_array();
			for (uint32_t i = 0; i < L->n_parts; i++)
				json_array_append_new(lp, part_json(&L->parts[i]));
			for (uint32_t l = 0; l < m->n_moe_layers; l++)
				if (h->layer_layout[l] == k)
					json_array_append_new(layers, json_integer(l));
			json_array_append_new(ls, json_pack("{s:o, s:I, s:o}", "layers", layers, "payload",
							    (json_int_t)L->payload, "parts", lp));
		}
		json_object_set_new(o, "layouts", ls);
	}
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

static void part_text(const struct pack_part_desc *d)
{
	printf("  %-13s %-6s [%u x %u]  offset %" PRIu64 "  %" PRIu64 " bytes\n", pack_role_name(d->role),
	       moe_dtype_name(d->dtype), d->rows, d->cols, d->offset, d->bytes);
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
	else if (m->ffn_kind == MOE_FFN_SILU)
		printf("ffn:           silu (gateless: down(silu(up x)))\n");
	else
		printf("ffn:           swiglu\n");
	if (h->version >= 2 && h->n_layouts >= 2) {
		/* per-layer expert types (version 2): each table and its layers */
		for (uint32_t k = 0; k < h->n_layouts; k++) {
			printf("parts of MoE layers");
			for (uint32_t l = 0; l < m->n_moe_layers; l++)
				if (h->layer_layout[l] == k)
					printf(" %u", l);
			printf(":\n");
			for (uint32_t i = 0; i < h->layouts[k].n_parts; i++)
				part_text(&h->layouts[k].parts[i]);
		}
	} else {
		printf("parts:\n");
		for (uint32_t i = 0; i < h->n_parts; i++)
			part_text(&h->parts[i]);
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

/* ---- similarity: output-space similarity of expert pairs (doc/routing.md) ---- */

static uint64_t sim_rng(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Standard normal probes (Box-Muller): the hidden state an expert sees is
 * RMS-normalised, so unit-variance inputs are its scale. */
static void sim_probes(float *x, size_t n, uint64_t seed)
{
	for (size_t i = 0; i < n; i += 2) {
		double u1 = ((double)(sim_rng(&seed) >> 11) + 1.0) / 9007199254740993.0;
		double u2 = (double)(sim_rng(&seed) >> 11) / 9007199254740992.0;
		double r = sqrt(-2.0 * log(u1));
		x[i] = (float)(r * cos(2 * M_PI * u2));
		if (i + 1 < n)
			x[i + 1] = (float)(r * sin(2 * M_PI * u2));
	}
}

/* Copies PACK into a new pack at out (written under a temporary name and
 * renamed: out may be the input itself), every expert and resident tensor
 * as it is, plus one similarity tensor per MoE layer (an old one is
 * replaced). Each expert of a layer runs on the same `probes` inputs; the
 * similarity of a and b is the cosine of their stacked outputs. */
static int similarity_convert(const char *in, const char *out, uint32_t probes, uint64_t seed, bool quiet,
			      struct moe_error *err)
{
	struct pack_file *p = NULL;
	struct pack_writer *w = NULL;
	float *x = NULL, *y = NULL, *sim = NULL;
	void *ext = NULL;
	int rc;
	if ((rc = pack_open(in, PACK_OPEN_NO_DIRECT, &p, err)) < 0)
		return rc;
	const struct moe_model_config *m = p->model;
	const uint32_t E = m->n_experts, n = m->hidden, L = m->n_moe_layers;
	const struct pack_header_disk *h = p->hdr;
	if (pack_uniform(p)) {
		rc = pack_writer_create(out, m, p->layout1.parts, p->layout1.n_parts, h->source, &w, err);
	} else {
		rc = pack_writer_create_layers(out, m, h->layouts, h->n_layouts, h->layer_layout, h->source, &w,
					       err);
	}
	if (rc < 0)
		goto fail;
	x = malloc((size_t)probes * n * sizeof(float));
	y = malloc((size_t)E * probes * n * sizeof(float));
	sim = malloc((size_t)E * E * sizeof(float));
	ext = aligned_alloc(4096, pack_extent_bytes(p));
	if (!x || !y || !sim || !ext) {
		rc = moe_error_set(err, -ENOMEM, "similarity: out of memory (%u experts x %u probes x %u)", E, probes, n);
		goto fail;
	}
	uint64_t t0 = moe_now_ns();
	for (uint32_t l = 0; l < L; l++) {
		const struct pack_layout_disk *lay = pack_layer_layout(p, l);
		struct ffn_layout fl;
		if ((rc = ffn_layout_init(&fl, m, lay->parts, lay->n_parts, pack_extent_bytes(p), err)) < 0)
			goto fail;
		sim_probes(x, (size_t)probes * n, seed + l);
		for (uint32_t e = 0; e < E; e++) {
			float *ye = y + (size_t)e * probes * n;
			if ((rc = pack_read_expert(p, l, e, ext, err)) < 0 ||
			    (rc = ffn_expert(&fl, ext, x, n, probes, ye, n, NULL, 0, 1)) < 0 ||
			    (rc = pack_writer_begin_expert(w, l, e, err)) < 0)
				goto fail;
			for (uint32_t i = 0; i < lay->n_parts && rc == 0; i++)
				rc = pack_writer_write(w, (const uint8_t *)ext + lay->parts[i].offset, lay->parts[i].bytes,
						       err);
			if (rc < 0 || (rc = pack_writer_end_expert(w, err)) < 0)
				goto fail;
		}
		for (uint32_t a = 0; a < E; a++) {
			const float *ya = y + (size_t)a * probes * n;
			for (uint32_t b = a; b < E; b++) {
				const float *yb = y + (size_t)b * probes * n;
				double ab = 0, aa = 0, bb = 0;
				for (size_t i = 0; i < (size_t)probes * n; i++) {
					ab += (double)ya[i] * yb[i];
					aa += (double)ya[i] * ya[i];
					bb += (double)yb[i] * yb[i];
				}
				double c = aa > 0 && bb > 0 ? ab / sqrt(aa * bb) : (a == b ? 1.0 : 0.0);
				c = c > 1.0 ? 1.0 : c < -1.0 ? -1.0 : c;
				sim[(size_t)a * E + b] = sim[(size_t)b * E + a] = a == b ? 1.0f : (float)c;
			}
		}
		struct pack_tensor_entry d;
		memset(&d, 0, sizeof(d));
		snprintf(d.name, sizeof(d.name), ROUTE_SIMILARITY_TENSOR, moe_model_layer_of(m, l));
		d.role = PACK_ROLE_OTHER;
		d.dtype = MOE_DTYPE_F32;
		d.layer = moe_model_layer_of(m, l);
		d.n_dims = 2;
		d.shape[0] = d.shape[1] = E;
		d.bytes = (uint64_t)E * E * sizeof(float);
		if ((rc = pack_writer_begin_tensor(w, &d, err)) < 0 ||
		    (rc = pack_writer_write(w, sim, d.bytes, err)) < 0 || (rc = pack_writer_end_tensor(w, err)) < 0)
			goto fail;
		if (!quiet) {
			double mean = 0, mx = -1;
			for (uint32_t a = 0; a < E; a++)
				for (uint32_t b = 0; b < E; b++)
					if (a != b) {
						mean += sim[(size_t)a * E + b];
						mx = fmax(mx, sim[(size_t)a * E + b]);
					}
			if (E > 1)
				mean /= (double)E * (E - 1);
			printf("layer %u: mean off-diagonal similarity %.4f, max %.4f\n", moe_model_layer_of(m, l), mean,
			       mx);
		}
	}
	for (uint64_t i = 0; i < h->n_tensors; i++) {
		const struct pack_tensor_entry *t = &p->tensors[i];
		char old[sizeof(t->name)];
		snprintf(old, sizeof(old), ROUTE_SIMILARITY_TENSOR, t->layer);
		if (!strcmp(old, t->name))
			continue; /* replaced above */
		void *buf = malloc(t->bytes ? t->bytes : 1);
		struct pack_tensor_entry d = *t;
		d.offset = 0;
		d.crc32c = 0;
		if (!buf) {
			rc = moe_error_set(err, -ENOMEM, "similarity: out of memory for tensor %s", t->name);
			goto fail;
		}
		if ((rc = pack_read_tensor(p, t, buf, err)) == 0 && (rc = pack_writer_begin_tensor(w, &d, err)) == 0 &&
		    (rc = pack_writer_write(w, buf, t->bytes, err)) == 0)
			rc = pack_writer_end_tensor(w, err);
		free(buf);
		if (rc < 0)
			goto fail;
	}
	rc = pack_writer_finish(w, err);
	w = NULL;
	if (rc == 0 && !quiet)
		printf("moe-pack similarity: %u layers x %u experts, %u probes, %.1f s -> %s\n", L, E, probes,
		       secs_since(t0), out);
fail:
	if (w)
		pack_writer_abort(w);
	free(x);
	free(y);
	free(sim);
	free(ext);
	pack_close(p);
	return rc;
}

static int cmd_similarity(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "output", required_argument, NULL, 'o' }, { "probes", required_argument, NULL, 'p' },
		{ "seed", required_argument, NULL, 's' },   { "quiet", no_argument, NULL, 'q' },
		{ "help", no_argument, NULL, 'h' },         { NULL, 0, NULL, 0 },
	};
	const char *out = NULL;
	unsigned long probes = 64;
	unsigned long long seed = 1;
	bool quiet = false;
	struct moe_error err = { "" };
	int c;
	char *end;
	while ((c = getopt_long(argc, argv, "o:p:s:qh", longopts, NULL)) != -1) {
		switch (c) {
		case 'o':
			out = optarg;
			break;
		case 'p':
			probes = strtoul(optarg, &end, 10);
			if (*end || probes == 0 || probes > 4096) {
				fprintf(stderr, "moe-pack similarity: --probes 1..4096\n");
				return 2;
			}
			break;
		case 's':
			seed = strtoull(optarg, &end, 0);
			if (*end) {
				fprintf(stderr, "moe-pack similarity: bad --seed '%s'\n", optarg);
				return 2;
			}
			break;
		case 'q':
			quiet = true;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind != argc - 1) {
		usage(stderr);
		return 2;
	}
	const char *in = argv[optind];
	if (similarity_convert(in, out ? out : in, (uint32_t)probes, seed, quiet, &err) < 0) {
		fprintf(stderr, "moe-pack similarity: %s\n", err.msg);
		return 1;
	}
	return 0;
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
	if (strcmp(argv[1], "similarity") == 0)
		return cmd_similarity(argc - 1, argv + 1);
	fprintf(stderr, "moe-pack: unknown command '%s'\n", argv[1]);
	usage(stderr);
	return 2;
}
