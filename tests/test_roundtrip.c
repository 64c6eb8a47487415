/* Description: moe-gen -> moe-pack -> pack_read_expert round trips for every
 * family, source format and dtype (single and sharded safetensors, GGUF):
 * every expert extent is compared byte for byte with (a) the bytes gen.h
 * says the checkpoint holds and (b) the source file read through the strict
 * readers and sliced per expert; quantized parts are also dequantized and
 * checked against the source's dequantized values and the generator's
 * unquantized values; resident tensors and the model config are checked;
 * pack_verify must find nothing. Also: clear errors for bad sources. */
#include "config.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gen.h"
#include "gguf.h"
#include "pack.h"
#include "safetensors.h"
#include "testutil.h"

/* The source, opened through h1's readers. */
struct src {
	struct safetensors_model *st;
	struct gguf_file *gg;
};

/* Reads [off, off+len) of tensor `name` from the source; shape (PyTorch
 * order) and dtype in *nd / shape / dt when non-NULL. */
static void src_read(const struct src *s, const char *name, uint64_t off, void *buf, size_t len)
{
	struct moe_error err = { "" };
	if (s->st) {
		const struct safetensors_tensor *t = safetensors_model_find(s->st, name);
		cr_assert_not_null(t, "source tensor %s missing", name);
		cr_assert_eq(safetensors_model_read(s->st, t, off, buf, len, &err), 0, "%s", err.msg);
	} else {
		const struct gguf_tensor *t = gguf_find_tensor(s->gg, name);
		cr_assert_not_null(t, "source tensor %s missing", name);
		cr_assert_eq(gguf_read(s->gg, t, off, buf, len, &err), 0, "%s", err.msg);
	}
}

static uint64_t src_bytes(const struct src *s, const char *name)
{
	if (s->st) {
		const struct safetensors_tensor *t = safetensors_model_find(s->st, name);
		return t ? t->bytes : 0;
	}
	const struct gguf_tensor *t = gguf_find_tensor(s->gg, name);
	return t ? t->bytes : 0;
}

static uint64_t row_bytes(enum moe_dtype t, uint64_t cols)
{
	uint64_t rb = 0;
	cr_assert(moe_dtype_row_bytes(t, cols, &rb));
	return rb;
}

/* gen's expected bytes of one canonical part. */
static uint8_t *gen_part(const struct gen_model *g, uint32_t L, uint32_t e, enum gen_part p, uint64_t *len)
{
	*len = gen_part_bytes(g, p);
	uint8_t *b = malloc(*len);
	cr_assert_eq(gen_expert_part(g, L, e, p, b, *len), 0);
	return b;
}

/* Interleaves units of `unit` bytes: out = a0 b0 a1 b1 ... */
static void interleave(const uint8_t *a, const uint8_t *b, uint64_t n, uint64_t unit, uint8_t *out)
{
	for (uint64_t i = 0; i < n; i++) {
		memcpy(out + 2 * i * unit, a + i * unit, unit);
		memcpy(out + (2 * i + 1) * unit, b + i * unit, unit);
	}
}

/* HF MXFP4 dequantization (formats.md section 5), independent of dtype.c. */
static float hf_mx_value(const uint8_t *blocks, const uint8_t *scales, uint64_t i)
{
	static const float fp4[16] = { +0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
				       -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f };
	uint8_t byte = blocks[i / 2];
	uint8_t nib = i % 2 ? byte >> 4 : byte & 0x0f;
	return fp4[nib] * ldexpf(1.0f, (int)scales[i / 32] - 127);
}

/* Checks a quantized part's dequantized rows against the generator's
 * unquantized values: the error of q8_0 / q4_0 is bounded by the block scale. */
static void check_quant_error(const struct gen_model *g, enum moe_dtype dt, const uint8_t *part, uint32_t rows,
			      uint32_t cols, enum gen_role role, uint32_t L, uint32_t e, uint32_t fan_in)
{
	if (dt != MOE_DTYPE_Q8_0 && dt != MOE_DTYPE_Q4_0)
		return;
	float *deq = malloc(cols * sizeof(float)), *ref = malloc(cols * sizeof(float));
	uint64_t rb = row_bytes(dt, cols);
	for (uint32_t r = 0; r < rows; r++) {
		moe_dequantize_row(dt, part + r * rb, deq, cols);
		gen_fill_f32(g->seed, role, L, e, fan_in, (uint64_t)r * cols, ref, cols);
		for (uint32_t b = 0; b < cols / 32; b++) {
			const uint8_t *blk = part + r * rb + b * moe_dtype_block_bytes(dt);
			uint16_t d16;
			memcpy(&d16, blk, 2);
			float d = fabsf(moe_f16_to_f32(d16));
			float bound = (dt == MOE_DTYPE_Q8_0 ? 0.6f : 1.1f) * d + 1e-6f;
			for (uint32_t j = 0; j < 32; j++) {
				float x = ref[b * 32 + j], y = deq[b * 32 + j];
				cr_assert(fabsf(x - y) <= bound, "L%u e%u row %u col %u: %g vs %g (d %g)", L, e, r, b * 32 + j,
					  x, y, d);
			}
		}
	}
	free(deq);
	free(ref);
}

static const char *fmt_name(enum gen_format f) { return f == GEN_FORMAT_GGUF ? "gguf" : "safetensors"; }

/* Expected pack role of a generated resident tensor, or 0 if not resident. */
static uint32_t resident_role(uint32_t gen_role)
{
	switch (gen_role) {
	case GEN_ROLE_ROUTER: return PACK_ROLE_ROUTER;
	case GEN_ROLE_ROUTER_BIAS: return PACK_ROLE_ROUTER_BIAS;
	case GEN_ROLE_SCORE_BIAS: return PACK_ROLE_SCORE_BIAS;
	case GEN_ROLE_SHARED_GATE: return PACK_ROLE_SHARED_GATE;
	case GEN_ROLE_SHARED_UP: return PACK_ROLE_SHARED_UP;
	case GEN_ROLE_SHARED_DOWN: return PACK_ROLE_SHARED_DOWN;
	case GEN_ROLE_SHARED_EXPERT_GATE: return PACK_ROLE_SHARED_EXPERT_GATE;
	default: return 0;
	}
}

/* The model config moe-pack must find: gen's view, under another name. */
static void check_config(const struct gen_model *g, const struct moe_model_config *have)
{
	struct moe_model_config want = { 0 };
	gen_model_config(g, &want);
	memcpy(want.name, have->name, sizeof(want.name));
	cr_assert_str_neq(have->name, "");
#define F(x) cr_assert_eq(have->x, want.x, "%s/%s/%s: config field " #x ": %u, expected %u", \
			  moe_family_name(g->family), fmt_name(g->format), moe_dtype_name(g->dtype), \
			  (unsigned)have->x, (unsigned)want.x)
	F(family); F(dtype); F(hidden); F(expert_width); F(n_experts); F(top_k); F(n_layers);
	F(n_moe_layers); F(first_moe_layer); F(moe_layer_step); F(n_shared_experts); F(shared_width);
	F(scoring); F(topk_method); F(norm_topk_prob); F(n_group); F(topk_group); F(ffn_kind);
	F(has_score_bias); F(has_router_bias);
#undef F
	cr_assert_float_eq(have->routed_scaling_factor, want.routed_scaling_factor, 1e-6);
	cr_assert_float_eq(have->swiglu_limit, want.swiglu_limit, 1e-6);
	cr_assert_float_eq(have->glu_alpha, want.glu_alpha, 1e-6);
}

/* Checks every expert of the pack against gen.h and against the source. */
static void check_experts(const struct gen_model *g, struct pack_file *p, const struct src *s)
{
	const struct moe_model_config *m = p->model;
	const bool oss = g->family == MOE_FAMILY_GPT_OSS, gg = g->format == GEN_FORMAT_GGUF;
	const uint32_t n = g->hidden, w = g->width, E = g->n_experts;
	struct moe_error err = { "" };
	uint8_t *buf = NULL;
	char name[160];

	cr_assert_eq(posix_memalign((void **)&buf, PACK_ALIGN, pack_extent_bytes(p)), 0);
	for (uint32_t l = 0; l < m->n_moe_layers; l++) {
		uint32_t L = moe_model_layer_of(m, l);
		cr_assert_eq(L, g->dense_layers + l);
		for (uint32_t e = 0; e < E; e++) {
			cr_assert_eq(pack_read_expert(p, l, e, buf, &err), 0, "%s", err.msg);
			uint64_t off = 0;
			if (!oss) {
				static const enum pack_role roles[3] = { PACK_ROLE_GATE, PACK_ROLE_UP, PACK_ROLE_DOWN };
				static const char *const hf[3] = { "gate_proj", "up_proj", "down_proj" };
				static const char *const mx[3] = { "w1", "w3", "w2" };
				static const char *const gn[3] = { "gate", "up", "down" };
				for (int k = 0; k < 3; k++) {
					const struct pack_part_desc *d = pack_part(p, roles[k]);
					uint64_t len;
					uint8_t *want = gen_part(g, L, e, (enum gen_part)k, &len);
					cr_assert_not_null(d);
					cr_assert_eq(d->offset, off);
					cr_assert_eq(d->bytes, len);
					cr_assert_eq(d->dtype, g->dtype);
					cr_assert_eq(memcmp(buf + off, want, len), 0, "%s L%u e%u part %s differs from gen",
						     moe_family_name(g->family), L, e, gn[k]);
					/* the same bytes straight from the source file */
					uint8_t *got = malloc(len);
					if (gg) {
						snprintf(name, sizeof(name), "blk.%u.ffn_%s_exps.weight", L, gn[k]);
						cr_assert_eq(src_bytes(s, name), len * E);
						src_read(s, name, e * len, got, len);
					} else if (g->family == MOE_FAMILY_MIXTRAL) {
						snprintf(name, sizeof(name), "model.layers.%u.block_sparse_moe.experts.%u.%s.weight", L,
							 e, mx[k]);
						src_read(s, name, 0, got, len);
					} else {
						snprintf(name, sizeof(name), "model.layers.%u.mlp.experts.%u.%s.weight", L, e, hf[k]);
						src_read(s, name, 0, got, len);
					}
					cr_assert_eq(memcmp(buf + off, got, len), 0, "%s differs from the source", name);
					if (moe_dtype_is_quantized(g->dtype)) {
						/* dequantized pack rows == dequantized source rows */
						uint32_t rows = d->rows, cols = d->cols;
						uint64_t rb = row_bytes(g->dtype, cols);
						float *a = malloc(cols * 4), *b = malloc(cols * 4);
						for (uint32_t r = 0; r < rows; r++) {
							moe_dequantize_row(g->dtype, buf + off + r * rb, a, cols);
							moe_dequantize_row(g->dtype, got + r * rb, b, cols);
							cr_assert_eq(memcmp(a, b, cols * 4), 0);
						}
						free(a);
						free(b);
					}
					check_quant_error(g, g->dtype, buf + off, d->rows, d->cols,
							  (enum gen_role)(GEN_ROLE_EXPERT_GATE + k), L, e, k == 2 ? w : n);
					free(got);
					free(want);
					off += len;
				}
			} else {
				/* GATE_UP rows interleave gate and up; the biases likewise */
				uint64_t lg, lu, ld, lbg, lbu, lbd;
				uint8_t *G = gen_part(g, L, e, GEN_PART_GATE, &lg), *U = gen_part(g, L, e, GEN_PART_UP, &lu);
				uint8_t *D = gen_part(g, L, e, GEN_PART_DOWN, &ld);
				uint8_t *BG = gen_part(g, L, e, GEN_PART_GATE_BIAS, &lbg), *BU = gen_part(g, L, e, GEN_PART_UP_BIAS, &lbu);
				uint8_t *BD = gen_part(g, L, e, GEN_PART_DOWN_BIAS, &lbd);
				uint64_t rbg = row_bytes(g->dtype, n), bsz = moe_dtype_block_bytes(gen_part_dtype(g, GEN_PART_GATE_BIAS));
				uint8_t *want = malloc(lg + lu + lbg + lbu + ld + lbd);
				interleave(G, U, w, rbg, want);
				interleave(BG, BU, w, bsz, want + lg + lu);
				memcpy(want + lg + lu + lbg + lbu, D, ld);
				memcpy(want + lg + lu + lbg + lbu + ld, BD, lbd);
				cr_assert_eq(p->hdr->extent_payload, lg + lu + lbg + lbu + ld + lbd);
				const struct pack_part_desc *d = pack_part(p, PACK_ROLE_GATE_UP);
				cr_assert_eq(d->rows, 2 * w);
				cr_assert_eq(d->cols, n);
				cr_assert_eq(pack_part(p, PACK_ROLE_DOWN)->offset, lg + lu + lbg + lbu);
				uint64_t diff = 0;
				while (diff < p->hdr->extent_payload && buf[diff] == want[diff])
					diff++;
				cr_assert_eq(diff, p->hdr->extent_payload, "gpt_oss %s %s L%u e%u differs from gen at byte %lu",
					     fmt_name(g->format), moe_dtype_name(g->dtype), L, e, (unsigned long)diff);
				check_quant_error(g, g->dtype, buf + pack_part(p, PACK_ROLE_DOWN)->offset, n, w,
						  GEN_ROLE_EXPERT_DOWN, L, e, w);

				/* and against the source file, through its own layout */
				if (gg) {
					uint8_t *x = malloc(lg);
					snprintf(name, sizeof(name), "blk.%u.ffn_up_exps.weight", L);
					src_read(s, name, e * lu, x, lu);
					for (uint32_t j = 0; j < w; j++)
						cr_assert_eq(memcmp(buf + (2 * j + 1) * rbg, x + j * rbg, rbg), 0, "%s row %u", name, j);
					free(x);
				} else if (g->dtype != MOE_DTYPE_MXFP4) {
					/* gate_up_proj [E, n, 2m]: pack GATE_UP[r][c] == src[e][c][r] */
					uint32_t es = moe_dtype_block_bytes(g->dtype);
					uint64_t slab = (uint64_t)n * 2 * w * es;
					uint8_t *x = malloc(slab);
					snprintf(name, sizeof(name), "model.layers.%u.mlp.experts.gate_up_proj", L);
					src_read(s, name, e * slab, x, slab);
					for (uint32_t r = 0; r < 2 * w; r++)
						for (uint32_t c = 0; c < n; c++)
							cr_assert_eq(memcmp(buf + ((uint64_t)r * n + c) * es, x + ((uint64_t)c * 2 * w + r) * es, es),
								     0, "%s [%u][%u]", name, r, c);
					free(x);
				} else {
					/* HF MXFP4: dequantize the source with HF's formula and
					 * compare with the pack's ggml blocks dequantized */
					for (int k = 0; k < 2; k++) {
						const struct pack_part_desc *pd = pack_part(p, k ? PACK_ROLE_DOWN : PACK_ROLE_GATE_UP);
						uint32_t rows = pd->rows, cols = pd->cols, groups = cols / 32;
						uint8_t *bl = malloc((size_t)rows * groups * 16), *sc = malloc((size_t)rows * groups);
						float *deq = malloc(cols * 4);
						const char *wn = k ? "down_proj" : "gate_up_proj";
						snprintf(name, sizeof(name), "model.layers.%u.mlp.experts.%s_blocks", L, wn);
						src_read(s, name, (uint64_t)e * rows * groups * 16, bl, (size_t)rows * groups * 16);
						snprintf(name, sizeof(name), "model.layers.%u.mlp.experts.%s_scales", L, wn);
						src_read(s, name, (uint64_t)e * rows * groups, sc, (size_t)rows * groups);
						for (uint32_t r = 0; r < rows; r++) {
							moe_dequantize_row(MOE_DTYPE_MXFP4, buf + pd->offset + r * pd->bytes / rows, deq, cols);
							for (uint32_t c = 0; c < cols; c++) {
								float hv = hf_mx_value(bl + (uint64_t)r * groups * 16, sc + (uint64_t)r * groups, c);
								cr_assert(hv == deq[c] || (isnan(hv) && isnan(deq[c])),
									  "%s row %u col %u: HF %g, pack %g", wn, r, c, hv, deq[c]);
							}
						}
						free(bl);
						free(sc);
						free(deq);
					}
				}
				free(want);
				free(G);
				free(U);
				free(D);
				free(BG);
				free(BU);
				free(BD);
			}
		}
	}
	free(buf);
}

/* Every generated router / bias / shared tensor is resident, bytes intact;
 * in a whole-model pack (moe-pack's default from a GGUF, and from
 * safetensors of the families moe-run runs) every other tensor that is not
 * a routed expert too, plus the metadata. From safetensors those carry
 * their GGUF names: the role-bearing ones are found by role here, the
 * others are checked against the GGUF by test_pack_model. */
static void check_residents(const struct gen_model *g, struct pack_file *p, const struct src *s)
{
	struct gen_tensor *t;
	size_t nt;
	struct moe_error err = { "" };
	uint64_t expected = 0;
	const bool gguf_names = g->format == GEN_FORMAT_SAFETENSORS &&
				(g->family == MOE_FAMILY_MIXTRAL || g->family == MOE_FAMILY_QWEN2_MOE ||
				 g->family == MOE_FAMILY_QWEN3_MOE || g->family == MOE_FAMILY_OLMOE);
	const bool whole = g->format == GEN_FORMAT_GGUF || gguf_names;

	cr_assert_eq(gen_model_tensors(g, &t, &nt, &err), 0, "%s", err.msg);
	for (size_t i = 0; i < nt; i++) {
		uint32_t role = resident_role(t[i].role);
		bool expert = t[i].role >= GEN_ROLE_EXPERT_GATE && t[i].role <= GEN_ROLE_EXPERT_DOWN_BIAS;
		if (!role && whole && !expert)
			role = PACK_ROLE_OTHER;
		if (!role)
			continue;
		expected++;
		if (gguf_names && role == PACK_ROLE_OTHER)
			continue;
		const struct pack_tensor_entry *x = gguf_names ? pack_find_role(p, role, t[i].layer)
							       : pack_find_tensor(p, t[i].name);
		cr_assert_not_null(x, "resident tensor %s missing", t[i].name);
		cr_assert_eq(x->role, role, "%s: role %u, expected %u", t[i].name, x->role, role);
		cr_assert_eq(x->layer, t[i].layer);
		cr_assert_eq(x->bytes, t[i].nbytes);
		cr_assert_eq(x->dtype, t[i].dtype);
		uint64_t elems = 1, want_elems = 1;
		for (uint32_t d = 0; d < x->n_dims; d++)
			elems *= x->shape[d];
		for (uint32_t d = 0; d < t[i].n_dims; d++)
			want_elems *= t[i].shape[d];
		cr_assert_eq(elems, want_elems, "%s: shape", t[i].name);
		uint8_t *a = malloc(x->bytes), *b = malloc(x->bytes), *c = malloc(x->bytes);
		cr_assert_eq(pack_read_tensor(p, x, a, &err), 0, "%s", err.msg);
		cr_assert_eq(gen_tensor_read(g, &t[i], 0, b, x->bytes), 0);
		src_read(s, t[i].name, 0, c, x->bytes);
		cr_assert_eq(memcmp(a, b, x->bytes), 0, "%s differs from gen", t[i].name);
		cr_assert_eq(memcmp(a, c, x->bytes), 0, "%s differs from the source", t[i].name);
		free(a);
		free(b);
		free(c);
	}
	if (whole) {
		cr_assert_not_null(pack_find_tensor(p, PACK_KV_TENSOR));
		expected++;
	}
	cr_assert_eq(p->hdr->n_tensors, expected, "%lu resident tensors, expected %lu",
		     (unsigned long)p->hdr->n_tensors, (unsigned long)expected);
	free(t);
}

/* One case: generate, pack, compare. src_kind: 0 = directory, 1 = the
 * .safetensors file or index.json, for safetensors. */
static void run_preset(enum moe_family fam, enum gen_format fmt, enum moe_dtype dt, uint32_t shards, int src_kind,
		       const char *preset)
{
	struct gen_model g;
	struct moe_error err = { "" };
	char *dir = tu_mkdtemp("rt");
	char src[4200], out[4200], log[4200];
	struct pack_file *p;
	struct src s = { 0 };

	gen_model_defaults(&g, fam);
	g.format = fmt;
	g.dtype = dt;
	g.shards = shards;
	cr_assert_eq(gen_model_preset(&g, preset, &err), 0, "%s", err.msg);
	cr_assert_eq(gen_model_validate(&g, &err), 0, "%s", err.msg);
	snprintf(log, sizeof(log), "%s/log", dir);
	int st = tu_sh("'%s' model --family %s --format %s --dtype %s --shards %u --preset %s --out '%s/m' > '%s' 2>&1",
		       tu_build_path("tools/moe-gen"), moe_family_name(fam), fmt_name(fmt), moe_dtype_name(dt), shards,
		       preset, dir, log);
	cr_assert_eq(st, 0, "moe-gen failed: %s", tu_read_file(log, NULL));
	if (fmt == GEN_FORMAT_GGUF)
		snprintf(src, sizeof(src), "%s/m/model.gguf", dir);
	else if (src_kind == 0)
		snprintf(src, sizeof(src), "%s/m", dir);
	else if (shards > 1)
		snprintf(src, sizeof(src), "%s/m/model.safetensors.index.json", dir);
	else
		snprintf(src, sizeof(src), "%s/m/model.safetensors", dir);
	snprintf(out, sizeof(out), "%s/x.moepack", dir);
	st = tu_sh("'%s' convert '%s' -o '%s' -q > '%s' 2>&1", tu_build_path("tools/moe-pack"), src, out, log);
	cr_assert_eq(st, 0, "moe-pack %s failed: %s", src, tu_read_file(log, NULL));

	cr_assert_eq(pack_open(out, 0, &p, &err), 0, "%s", err.msg);
	cr_assert_str_eq(p->hdr->source, fmt_name(fmt));
	check_config(&g, p->model);
	if (fmt == GEN_FORMAT_GGUF) {
		cr_assert_eq(gguf_open(src, &s.gg, &err), 0, "%s", err.msg);
	} else {
		cr_assert_eq(safetensors_model_open(src, &s.st, &err), 0, "%s", err.msg);
		cr_assert_eq(s.st->n_files, shards);
	}
	check_experts(&g, p, &s);
	check_residents(&g, p, &s);
	cr_assert_eq(pack_verify(p, NULL, NULL, &err), 0, "%s", err.msg);
	pack_close(p);
	safetensors_model_close(s.st);
	gguf_close(s.gg);
	tu_rmtree(dir);
}

static void run_case(enum moe_family fam, enum gen_format fmt, enum moe_dtype dt, uint32_t shards, int src_kind)
{
	run_preset(fam, fmt, dt, shards, src_kind, "tiny");
}

static void run_family(enum moe_family fam)
{
	static const enum moe_dtype st_types[] = { MOE_DTYPE_F32, MOE_DTYPE_F16, MOE_DTYPE_BF16 };
	static const enum moe_dtype gg_types[] = { MOE_DTYPE_F32, MOE_DTYPE_F16, MOE_DTYPE_BF16, MOE_DTYPE_Q8_0,
						   MOE_DTYPE_Q4_0 };
	for (size_t i = 0; i < MOE_ARRAY_SIZE(st_types); i++)
		run_case(fam, GEN_FORMAT_SAFETENSORS, st_types[i], 1, (int)(i % 2));
	run_case(fam, GEN_FORMAT_SAFETENSORS, MOE_DTYPE_BF16, 3, 0);
	run_case(fam, GEN_FORMAT_SAFETENSORS, MOE_DTYPE_F16, 2, 1);
	for (size_t i = 0; i < MOE_ARRAY_SIZE(gg_types); i++)
		run_case(fam, GEN_FORMAT_GGUF, gg_types[i], 1, 0);
	if (fam == MOE_FAMILY_GPT_OSS) {
		run_case(fam, GEN_FORMAT_SAFETENSORS, MOE_DTYPE_MXFP4, 1, 0);
		run_case(fam, GEN_FORMAT_SAFETENSORS, MOE_DTYPE_MXFP4, 2, 1);
		run_case(fam, GEN_FORMAT_GGUF, MOE_DTYPE_MXFP4, 1, 0);
	}
}

TestSuite(roundtrip, .timeout = 120);

Test(roundtrip, mixtral) { run_family(MOE_FAMILY_MIXTRAL); }
Test(roundtrip, qwen2_moe) { run_family(MOE_FAMILY_QWEN2_MOE); }
Test(roundtrip, qwen3_moe) { run_family(MOE_FAMILY_QWEN3_MOE); }
Test(roundtrip, deepseek_v2) { run_family(MOE_FAMILY_DEEPSEEK_V2); }
Test(roundtrip, deepseek_v3) { run_family(MOE_FAMILY_DEEPSEEK_V3); }
Test(roundtrip, olmoe) { run_family(MOE_FAMILY_OLMOE); }
Test(roundtrip, gpt_oss) { run_family(MOE_FAMILY_GPT_OSS); }

/* The models llama.cpp runs (tiny-lm: real attention, vocabulary, the
 * families' extra tensors) pack the same way. */
Test(roundtrip, tiny_lm)
{
	static const enum moe_family fams[] = { MOE_FAMILY_QWEN3_MOE, MOE_FAMILY_QWEN2_MOE, MOE_FAMILY_OLMOE,
						MOE_FAMILY_MIXTRAL };
	for (size_t i = 0; i < MOE_ARRAY_SIZE(fams); i++) {
		run_preset(fams[i], GEN_FORMAT_GGUF, MOE_DTYPE_F32, 1, 0, "tiny-lm");
		run_preset(fams[i], GEN_FORMAT_GGUF, MOE_DTYPE_Q8_0, 1, 0, "tiny-lm");
		run_preset(fams[i], GEN_FORMAT_SAFETENSORS, MOE_DTYPE_BF16, 1, 0, "tiny-lm");
	}
}

/* HF MXFP4 -> ggml block_mxfp4 on one hand-made block: element 2k is the low
 * nibble of HF byte k; ggml wants element j low and j+16 high in byte j. */
Test(roundtrip, mxfp4_nibble_order)
{
	struct gen_model g;
	gen_model_defaults(&g, MOE_FAMILY_GPT_OSS);
	/* codes 0..15 then 15..0 */
	uint8_t code[32], hf[16], scale = 130;
	for (int i = 0; i < 32; i++)
		code[i] = (uint8_t)(i < 16 ? i : 31 - i);
	for (int k = 0; k < 16; k++)
		hf[k] = (uint8_t)(code[2 * k] | code[2 * k + 1] << 4);
	struct moe_block_mxfp4 b;
	b.e = scale;
	for (int j = 0; j < 16; j++)
		b.qs[j] = (uint8_t)(code[j] | code[j + 16] << 4);
	float deq[32];
	moe_dequantize_row(MOE_DTYPE_MXFP4, &b, deq, 32);
	for (int i = 0; i < 32; i++)
		cr_assert_eq(deq[i], hf_mx_value(hf, &scale, (uint64_t)i), "element %d", i);
}

/* `moe-pack info --json` describes the pack that pack_open sees. */
Test(roundtrip, info_json, .timeout = 60)
{
	char *dir = tu_mkdtemp("rtinfo"), cmd[16384], *txt;
	char *gen = strdup(tu_build_path("tools/moe-gen")), *pk = strdup(tu_build_path("tools/moe-pack"));
	struct pack_file *p;
	struct moe_error err = { "" };
	snprintf(cmd, sizeof(cmd), "'%s' model --family deepseek_v3 --preset tiny --out '%s/m' > /dev/null 2>&1 && "
		 "'%s' convert '%s/m' -o '%s/x.moepack' --name my-model -q && '%s' info --json '%s/x.moepack' > '%s/j'",
		 gen, dir, pk, dir, dir, pk, dir, dir);
	free(gen);
	free(pk);
	cr_assert_eq(tu_sh("%s", cmd), 0);
	snprintf(cmd, sizeof(cmd), "%s/x.moepack", dir);
	cr_assert_eq(pack_open(cmd, 0, &p, &err), 0, "%s", err.msg);
	cr_assert_str_eq(p->model->name, "my-model");
	snprintf(cmd, sizeof(cmd), "%s/j", dir);
	txt = tu_read_file(cmd, NULL);
	json_error_t je;
	json_t *o = json_loads(txt, 0, &je);
	cr_assert_not_null(o, "%s: %s", je.text, txt);
	json_t *m = json_object_get(o, "model");
	cr_assert_str_eq(json_string_value(json_object_get(m, "name")), "my-model");
	cr_assert_str_eq(json_string_value(json_object_get(m, "family")), "deepseek_v3");
	cr_assert_str_eq(json_string_value(json_object_get(m, "scoring")), "sigmoid");
	cr_assert_eq(json_integer_value(json_object_get(m, "n_experts")), p->model->n_experts);
	cr_assert_eq(json_integer_value(json_object_get(m, "first_moe_layer")), p->model->first_moe_layer);
	cr_assert(json_is_true(json_object_get(m, "has_score_bias")));
	cr_assert_eq(json_integer_value(json_object_get(o, "extents")), p->hdr->index_count);
	cr_assert_eq(json_integer_value(json_object_get(o, "extent_bytes")), p->hdr->extent_bytes);
	json_t *parts = json_object_get(o, "parts");
	cr_assert_eq(json_array_size(parts), 3);
	cr_assert_str_eq(json_string_value(json_object_get(json_array_get(parts, 2), "role")), "down");
	cr_assert_eq(json_integer_value(json_object_get(json_array_get(parts, 2), "rows")), p->model->hidden);
	json_t *ts = json_object_get(o, "tensors");
	cr_assert_eq(json_array_size(ts), p->hdr->n_tensors);
	for (size_t i = 0; i < json_array_size(ts); i++) {
		const char *name = json_string_value(json_object_get(json_array_get(ts, i), "name"));
		cr_assert_not_null(pack_find_tensor(p, name), "%s", name);
	}
	json_decref(o);
	free(txt);
	pack_close(p);
	tu_rmtree(dir);
}

/* ---- bad sources: clear errors, non-zero exit ---- */

static int pack_cmd(const char *dir, const char *args, char **out)
{
	char log[4200];
	snprintf(log, sizeof(log), "%s/log", dir);
	int st = tu_sh("'%s' %s > '%s' 2>&1", tu_build_path("tools/moe-pack"), args, log);
	*out = tu_read_file(log, NULL);
	return st;
}

Test(roundtrip, bad_sources, .timeout = 60)
{
	char *dir = tu_mkdtemp("rtbad"), cmd[8192], *txt;
	cr_assert_eq(tu_sh("'%s' model --family qwen2_moe --preset tiny --layers 4 --out '%s/m' > /dev/null 2>&1",
			   tu_build_path("tools/moe-gen"), dir), 0);

	/* config.json says layer 0 is dense, but the checkpoint has experts there */
	snprintf(cmd, sizeof(cmd),
		 "sed -i 's/\"mlp_only_layers\": \\[\\]/\"mlp_only_layers\": [0]/' '%s/m/config.json' && grep -qF '[0]' '%s/m/config.json'",
		 dir, dir);
	cr_assert_eq(tu_sh("%s", cmd), 0);
	snprintf(cmd, sizeof(cmd), "convert '%s/m' -o '%s/x.moepack'", dir, dir);
	cr_assert_eq(pack_cmd(dir, cmd, &txt), 1);
	cr_assert(strstr(txt, "config.json says layer 0 has no routed experts"), "%s", txt);
	free(txt);
	snprintf(cmd, sizeof(cmd), "test ! -e '%s/x.moepack'", dir);
	cr_assert_eq(tu_sh("%s", cmd), 0, "no pack left behind");

	/* MoE layers 0, 2, 3: not first + i * step -> unsupported */
	snprintf(cmd, sizeof(cmd), "sed -i 's/\"mlp_only_layers\": \\[0\\]/\"mlp_only_layers\": [1]/' '%s/m/config.json'", dir);
	cr_assert_eq(tu_sh("%s", cmd), 0);
	snprintf(cmd, sizeof(cmd), "convert '%s/m' -o '%s/x.moepack'", dir, dir);
	cr_assert_eq(pack_cmd(dir, cmd, &txt), 1);
	cr_assert(strstr(txt, "MoE layers 0, 2, 3 are not evenly spaced"), "%s", txt);
	free(txt);

	/* wrong family override: the tensors are not there */
	snprintf(cmd, sizeof(cmd), "rm -rf '%s/m' && '%s' model --family olmoe --preset tiny --out '%s/m' > /dev/null 2>&1",
		 dir, tu_build_path("tools/moe-gen"), dir);
	cr_assert_eq(tu_sh("%s", cmd), 0);
	snprintf(cmd, sizeof(cmd), "convert '%s/m' -o '%s/x.moepack' --family mixtral", dir, dir);
	cr_assert_eq(pack_cmd(dir, cmd, &txt), 1);
	cr_assert(strstr(txt, "num_local_experts is missing"), "%s", txt);
	free(txt);
	snprintf(cmd, sizeof(cmd), "convert '%s/m' -o '%s/x.moepack' --family nonsense", dir, dir);
	cr_assert_eq(pack_cmd(dir, cmd, &txt), 1);
	cr_assert(strstr(txt, "unknown family 'nonsense'"), "%s", txt);
	free(txt);

	/* no config.json */
	snprintf(cmd, sizeof(cmd), "mv '%s/m/config.json' '%s/m/c.json'", dir, dir);
	cr_assert_eq(tu_sh("%s", cmd), 0);
	snprintf(cmd, sizeof(cmd), "convert '%s/m' -o '%s/x.moepack'", dir, dir);
	cr_assert_eq(pack_cmd(dir, cmd, &txt), 1);
	cr_assert(strstr(txt, "no config.json"), "%s", txt);
	free(txt);

	/* a truncated GGUF */
	snprintf(cmd, sizeof(cmd), "'%s' model --family mixtral --format gguf --preset tiny --out '%s/g' > /dev/null 2>&1 && truncate -s -100 '%s/g/model.gguf'",
		 tu_build_path("tools/moe-gen"), dir, dir);
	cr_assert_eq(tu_sh("%s", cmd), 0);
	snprintf(cmd, sizeof(cmd), "convert '%s/g/model.gguf' -o '%s/x.moepack'", dir, dir);
	cr_assert_eq(pack_cmd(dir, cmd, &txt), 1);
	cr_assert(strstr(txt, "model.gguf"), "%s", txt);
	free(txt);

	/* usage errors */
	cr_assert_eq(pack_cmd(dir, "convert", &txt), 2);
	free(txt);
	cr_assert_eq(pack_cmd(dir, "frobnicate x", &txt), 2);
	free(txt);
	snprintf(cmd, sizeof(cmd), "verify '%s/nope.moepack'", dir);
	cr_assert_eq(pack_cmd(dir, cmd, &txt), 1);
	cr_assert(strstr(txt, "nope.moepack"), "%s", txt);
	free(txt);
	tu_rmtree(dir);
}
