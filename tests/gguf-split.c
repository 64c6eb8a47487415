/* gguf-split.c - test tool: rewrites a GGUF as llama.cpp's gguf-split does
 * (tools/gguf-split/gguf-split.cpp: --split-max-tensors), since the npm
 * package ships libllama but not that program; optionally first retypes
 * tensors to K-quants with random but finite blocks (a stand-in for a
 * Q4_K_M file where no quantizer is at hand), and can plant the faults a
 * reader must refuse.
 *
 *   gguf-split [options] IN OUT
 *     --split N        N parts (default 1: OUT is one plain GGUF); the parts
 *                      are OUT-00001-of-0000N.gguf ... (llama_split_path),
 *                      tensors dealt in file order, ceil(T/N) per part
 *     --kquant         expert gate/up -> q4_K, expert down -> q6_K, attention
 *                      q/k/v -> q5_K/q3_K/q2_K, output -> q6_K, attn_output
 *                      -> iq4_xs, token_embd -> iq4_nl (where ne[0] allows;
 *                      other tensors unchanged)
 *     --dup            the last part repeats the first tensor of part 2
 *     --count-off      split.count in part 2 is one more than the truth
 *     --tensors-off    split.tensors.count is one less than the truth
 *
 * The layout is ggml's gguf writer: header, KV pairs, tensor infos, zero
 * padding to the alignment, each tensor's data padded to the alignment. The
 * first part holds every KV pair of IN followed by split.no (u16),
 * split.count (u16) and split.tensors.count (i32); the others only these
 * three. */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"

struct out {
	FILE *f;
	uint64_t pos;
};

static void w(struct out *o, const void *p, size_t n)
{
	if (n && fwrite(p, 1, n, o->f) != n) {
		perror("gguf-split: write");
		exit(1);
	}
	o->pos += n;
}
static void w32(struct out *o, uint32_t v) { w(o, &v, 4); }
static void w64(struct out *o, uint64_t v) { w(o, &v, 8); }
static void wstr(struct out *o, const char *s, uint64_t n)
{
	w64(o, n);
	w(o, s, n);
}

static size_t type_width(uint32_t t)
{
	switch (t) {
	case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL: return 1;
	case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: return 2;
	case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_FLOAT32: return 4;
	default: return 8;
	}
}

static void wscalar(struct out *o, uint32_t t, const struct gguf_kv *kv)
{
	if (t == GGUF_TYPE_FLOAT32) {
		float f = (float)kv->v.f64;
		w(o, &f, 4);
	} else if (t == GGUF_TYPE_FLOAT64) {
		w(o, &kv->v.f64, 8);
	} else {
		uint64_t u = kv->v.u64; /* little-endian: the low bytes */
		w(o, &u, type_width(t));
	}
}

static void wkv(struct out *o, const struct gguf_kv *kv)
{
	wstr(o, kv->key.data, kv->key.len);
	w32(o, kv->type);
	if (kv->type == GGUF_TYPE_STRING) {
		wstr(o, kv->v.str.data, kv->v.str.len);
	} else if (kv->type == GGUF_TYPE_ARRAY) {
		w32(o, kv->v.arr.type);
		w64(o, kv->v.arr.count);
		if (kv->v.arr.type == GGUF_TYPE_STRING) {
			const struct gguf_str *s = kv->v.arr.data;
			for (uint64_t i = 0; i < kv->v.arr.count; i++)
				wstr(o, s[i].data, s[i].len);
		} else {
			w(o, kv->v.arr.data, kv->v.arr.count * type_width(kv->v.arr.type));
		}
	} else {
		wscalar(o, kv->type, kv);
	}
}

static void wkv_u16(struct out *o, const char *key, uint16_t v)
{
	wstr(o, key, strlen(key));
	w32(o, GGUF_TYPE_UINT16);
	w(o, &v, 2);
}

static void wkv_i32(struct out *o, const char *key, int32_t v)
{
	wstr(o, key, strlen(key));
	w32(o, GGUF_TYPE_INT32);
	w(o, &v, 4);
}

/* A tensor as it will be written: its type and bytes may differ from IN's. */
struct tens {
	const struct gguf_tensor *src;
	uint32_t type;
	uint64_t bytes;
	uint8_t *data; /* retyped: random blocks; else NULL (copied from IN) */
};

static uint64_t rng = 0x2545F4914F6CDD1Dull;
static uint8_t rnd8(void)
{
	rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
	return (uint8_t)(rng >> 32);
}

/* Where the f16 scales sit in each block of a type: offsets (up to 2). */
static int scale_offsets(uint32_t t, int *o)
{
	switch (t) {
	case GGUF_GGML_Q4_K: case GGUF_GGML_Q5_K: o[0] = 0, o[1] = 2; return 2;
	case GGUF_GGML_Q6_K: o[0] = 208; return 1;
	case GGUF_GGML_Q3_K: o[0] = 108; return 1;
	case GGUF_GGML_Q2_K: o[0] = 80, o[1] = 82; return 2;
	case GGUF_GGML_IQ4_NL: case GGUF_GGML_IQ4_XS: o[0] = 0; return 1;
	default: return 0;
	}
}

static uint32_t kquant_type(const char *name, uint64_t ne0)
{
	static const struct { const char *part; uint32_t type; } map[] = {
		{ "ffn_gate_exps", GGUF_GGML_Q4_K }, { "ffn_up_exps", GGUF_GGML_Q4_K },
		{ "ffn_down_exps", GGUF_GGML_Q6_K }, { "attn_q.", GGUF_GGML_Q5_K },
		{ "attn_k.", GGUF_GGML_Q3_K },       { "attn_v.", GGUF_GGML_Q2_K },
		{ "attn_output", GGUF_GGML_IQ4_XS }, { "token_embd", GGUF_GGML_IQ4_NL },
	};
	uint32_t type = UINT32_MAX, blk = 0;
	if (strcmp(name, "output.weight") == 0)
		type = GGUF_GGML_Q6_K;
	for (size_t i = 0; i < sizeof(map) / sizeof(map[0]) && type == UINT32_MAX; i++)
		if (strstr(name, map[i].part))
			type = map[i].type;
	if (type != UINT32_MAX)
		gguf_ggml_type_info(type, NULL, &blk, NULL, NULL);
	return type != UINT32_MAX && ne0 % blk == 0 ? type : UINT32_MAX;
}

static void retype(struct tens *t)
{
	const struct gguf_tensor *s = t->src;
	uint32_t nt = kquant_type(s->name.data, s->ne[0]), blk, tsz;
	int so[2], ns;
	if (nt == UINT32_MAX || s->ggml_type != GGUF_GGML_F32)
		return;
	gguf_ggml_type_info(nt, NULL, &blk, &tsz, NULL);
	t->type = nt;
	t->bytes = s->n_elems / blk * tsz;
	t->data = malloc(t->bytes);
	if (!t->data) {
		perror("gguf-split");
		exit(1);
	}
	ns = scale_offsets(nt, so);
	for (uint64_t i = 0; i < t->bytes; i++)
		t->data[i] = rnd8();
	/* f16 scales of about 2^-8 .. 2^-6, positive: finite, normal weights */
	for (uint64_t b = 0; b < t->bytes / tsz; b++)
		for (int k = 0; k < ns; k++) {
			uint16_t h = (uint16_t)(((7 + (rnd8() & 1)) << 10) | (rnd8() << 2));
			memcpy(t->data + b * tsz + so[k], &h, 2);
		}
}

static uint64_t pad(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

/* Writes tensors [lo, hi) of ts (and `extra` after them, if any) to path. */
static void write_file(const char *path, const struct gguf_file *g, struct tens *ts, uint64_t lo, uint64_t hi,
		       const struct tens *extra, int split_no, int split_count, int32_t tensors_total,
		       int count_off)
{
	struct out o = { fopen(path, "wb"), 0 };
	/* only the first part carries IN's KV pairs, general.alignment included */
	uint32_t align = split_count && split_no > 0 ? GGUF_DEFAULT_ALIGNMENT : g->alignment;
	uint64_t n = hi - lo + (extra != NULL), nkv = 0, off = 0;
	static const uint8_t zero[64];
	if (!o.f) {
		fprintf(stderr, "gguf-split: %s: %s\n", path, strerror(errno));
		exit(1);
	}
	if (split_count == 0 || split_no == 0)
		nkv = g->n_kv;
	if (split_count)
		nkv += 3;
	w32(&o, GGUF_MAGIC);
	w32(&o, 3);
	w64(&o, n);
	w64(&o, nkv);
	if (split_count == 0 || split_no == 0)
		for (uint64_t i = 0; i < g->n_kv; i++)
			wkv(&o, &g->kv[i]);
	if (split_count) {
		wkv_u16(&o, "split.no", (uint16_t)split_no);
		wkv_u16(&o, "split.count", (uint16_t)(split_count + count_off));
		wkv_i32(&o, "split.tensors.count", tensors_total);
	}
	for (uint64_t i = 0; i < n; i++) {
		const struct tens *t = i < hi - lo ? &ts[lo + i] : extra;
		wstr(&o, t->src->name.data, t->src->name.len);
		w32(&o, t->src->n_dims);
		for (uint32_t d = 0; d < t->src->n_dims; d++)
			w64(&o, t->src->ne[d]);
		w32(&o, t->type);
		w64(&o, off);
		off += pad(t->bytes, align);
	}
	w(&o, zero, pad(o.pos, align) - o.pos);
	for (uint64_t i = 0; i < n; i++) {
		const struct tens *t = i < hi - lo ? &ts[lo + i] : extra;
		if (t->data) {
			w(&o, t->data, t->bytes);
		} else {
			uint8_t *buf = malloc(t->bytes ? t->bytes : 1);
			struct moe_error err = { { 0 } };
			if (!buf || gguf_read(g, t->src, 0, buf, t->bytes, &err)) {
				fprintf(stderr, "gguf-split: %s\n", err.msg);
				exit(1);
			}
			w(&o, buf, t->bytes);
			free(buf);
		}
		w(&o, zero, pad(t->bytes, align) - t->bytes);
	}
	if (fclose(o.f) != 0) {
		perror("gguf-split: close");
		exit(1);
	}
}

int main(int argc, char **argv)
{
	int n_split = 1, kq = 0, dup = 0, count_off = 0, tensors_off = 0, a = 1;
	struct gguf_file *g;
	struct moe_error err = { { 0 } };

	for (; a < argc && strncmp(argv[a], "--", 2) == 0; a++) {
		if (strcmp(argv[a], "--split") == 0 && a + 1 < argc)
			n_split = atoi(argv[++a]);
		else if (strcmp(argv[a], "--kquant") == 0)
			kq = 1;
		else if (strcmp(argv[a], "--dup") == 0)
			dup = 1;
		else if (strcmp(argv[a], "--count-off") == 0)
			count_off = 1;
		else if (strcmp(argv[a], "--tensors-off") == 0)
			tensors_off = 1;
		else
			break;
	}
	if (argc - a != 2 || n_split < 1 || n_split > 99) {
		fprintf(stderr, "usage: gguf-split [--split N] [--kquant] [--dup] [--count-off] [--tensors-off] IN OUT\n");
		return 2;
	}
	if (gguf_open_model(argv[a], &g, &err)) {
		fprintf(stderr, "gguf-split: %s\n", err.msg);
		return 1;
	}
	struct tens *ts = calloc(g->n_tensors ? g->n_tensors : 1, sizeof(*ts));
	for (uint64_t i = 0; i < g->n_tensors; i++) {
		ts[i] = (struct tens){ &g->tensors[i], g->tensors[i].ggml_type, g->tensors[i].bytes, NULL };
		if (kq)
			retype(&ts[i]);
	}
	if (n_split == 1) {
		write_file(argv[a + 1], g, ts, 0, g->n_tensors, NULL, 0, 0, 0, 0);
	} else {
		const uint64_t per = (g->n_tensors + (uint64_t)n_split - 1) / (uint64_t)n_split;
		char path[4096];
		for (int i = 0; i < n_split; i++) {
			uint64_t lo = MOE_MIN(per * (uint64_t)i, g->n_tensors), hi = MOE_MIN(lo + per, g->n_tensors);
			const struct tens *extra = dup && i == n_split - 1 && per < g->n_tensors ? &ts[per] : NULL;
			snprintf(path, sizeof(path), "%s-%05d-of-%05d.gguf", argv[a + 1], i + 1, n_split);
			write_file(path, g, ts, lo, hi, extra, i, n_split,
				   (int32_t)g->n_tensors - tensors_off, count_off && i == 1);
		}
	}
	for (uint64_t i = 0; i < g->n_tensors; i++)
		free(ts[i].data);
	free(ts);
	gguf_close(g);
	return 0;
}
