/* convert.c - safetensors / GGUF checkpoints -> .moepack (see convert.h).
 *
 * Everything is read through the strict readers (core/safetensors.c,
 * core/gguf.c) with pread in chunks; nothing is mmapped, so the resident
 * set stays a few MiB whatever the model size. */
#include "config.h"
#include "convert.h"
#include "ffn.h"
#include "gguf.h"
#include "safetensors.h"

#include <ctype.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#define CHUNK (4u << 20)
#define MAX_DIMS 8

enum src_kind { SRC_ST = 1, SRC_GGUF = 2 };

/* Where the routed experts of a layer are, by naming scheme. */
enum expert_layout {
	LAY_HF_MLP = 1,   /* model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight */
	LAY_HF_MIXTRAL,   /* model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight */
	LAY_HF_GPTOSS,    /* model.layers.L.mlp.experts.{gate_up_proj,down_proj}[_bias], [E, in, out] */
	LAY_HF_GPTOSS_MX, /* ..._blocks / ..._scales (MXFP4) */
	LAY_GGUF_STACK,   /* blk.L.ffn_{gate,up,down}_exps.weight [E][rows][cols] */
	LAY_GGUF_SPLIT,   /* old Mixtral GGUFs: blk.L.ffn_{gate,up,down}.E.weight */
};

/* A tensor of either source kind, shape in PyTorch order (outermost first). */
struct stensor {
	const char *name;
	enum moe_dtype dtype;
	uint32_t n_dims;
	uint64_t shape[MAX_DIMS];
	uint64_t bytes;
	const struct safetensors_tensor *st;
	const struct gguf_tensor *gg;
};

enum recipe_kind {
	R_COPY = 1,   /* bytes [a_off, a_off + bytes) of a */
	R_INTERLEAVE, /* rows units of `unit` bytes alternately from a and b */
	R_TRANSPOSE,  /* a holds [rows][cols] elements of `unit` bytes; write [cols][rows] */
	R_MX_HF,      /* a: HF blocks [rows][cols groups][16], b: scales [rows][cols] -> block_mxfp4 */
};

/* How to produce one part of one expert. */
struct recipe {
	enum recipe_kind kind;
	struct stensor a, b;
	uint64_t a_off, b_off;
	uint64_t rows, cols, unit;
	struct pack_part_desc part; /* role, dtype, rows, cols, bytes */
	/* GGUF ffn_*_exps.scale (F32 [E]): llama.cpp multiplies the expert's
	 * product by its entry; an f32 part's rows are multiplied by it here
	 * (R_COPY only; 0 = none). sc names the tensor (consumed, not resident). */
	float scale;
	struct stensor sc;
};

struct resident {
	struct stensor t;
	uint32_t role, layer;
	const uint8_t *mem; /* bytes held in memory (gguf.kv) instead of the source */
	char pname[PACK_TENSOR_NAME_MAX]; /* name in the pack when not t.name (HF -> GGUF) */
	uint32_t perm_head; /* rows reordered from HF's to llama.cpp's RoPE order, heads of this many rows */
};

struct convert_source {
	enum src_kind kind;
	char *path;
	struct safetensors_model *st;
	struct gguf_file *gg;
	enum expert_layout layout;
	struct moe_model_config model;
	struct pack_part_desc parts[PACK_MAX_PARTS]; /* MoE layer 0's */
	uint32_t n_parts;
	/* the distinct part layouts of the MoE layers (llama.cpp's Q*_K_M give
	 * ffn_down more bits in some layers) and each layer's */
	struct pack_layout_disk layouts[PACK_MAX_LAYOUTS];
	uint32_t n_layouts;
	uint8_t layer_layout[PACK_MAX_LAYER_MAP];
	struct resident *res;
	uint32_t n_res, cap_res;
	bool progress;
	char *hf_dir;       /* safetensors: the directory of config.json */
	uint8_t *kv_image;  /* PACK_KV_TENSOR: the source's metadata as a GGUF image */
	size_t kv_len;
	/* streaming buffers, grown on demand */
	uint8_t *buf[3];
	size_t cap[3];
};

/* ---- tensors of either source ---- */

static bool find_tensor(const struct convert_source *s, const char *name, struct stensor *out)
{
	memset(out, 0, sizeof(*out));
	if (s->kind == SRC_ST) {
		const struct safetensors_tensor *t = safetensors_model_find(s->st, name);
		if (!t)
			return false;
		out->name = t->name;
		out->dtype = t->dtype;
		out->n_dims = t->n_dims;
		for (uint32_t d = 0; d < t->n_dims && d < MAX_DIMS; d++)
			out->shape[d] = t->shape[d];
		out->bytes = t->bytes;
		out->st = t;
	} else {
		const struct gguf_tensor *t = gguf_find_tensor(s->gg, name);
		if (!t)
			return false;
		out->name = t->name.data;
		out->dtype = t->dtype;
		out->n_dims = t->n_dims;
		for (uint32_t d = 0; d < t->n_dims; d++)
			out->shape[d] = t->ne[t->n_dims - 1 - d];
		out->bytes = t->bytes;
		out->gg = t;
	}
	return true;
}

static bool has_tensor(const struct convert_source *s, const char *name)
{
	struct stensor t;
	return find_tensor(s, name, &t);
}

static void fmt_shape(const struct stensor *t, char *buf, size_t len)
{
	size_t o = 0;
	o += (size_t)snprintf(buf + o, len - o, "[");
	for (uint32_t d = 0; d < t->n_dims && o < len; d++)
		o += (size_t)snprintf(buf + o, len - o, "%s%" PRIu64, d ? ", " : "", t->shape[d]);
	if (o < len)
		snprintf(buf + o, len - o, "]");
}

/* Finds name and checks its shape (nd dims given in shape[]). */
static int need(const struct convert_source *s, const char *name, uint32_t nd, const uint64_t *shape,
		struct stensor *out, struct moe_error *err)
{
	char have[128];
	if (!find_tensor(s, name, out))
		return moe_error_set(err, -ENOENT, "tensor %s not found", name);
	bool ok = out->n_dims == nd;
	for (uint32_t d = 0; ok && d < nd; d++)
		ok = out->shape[d] == shape[d];
	if (!ok) {
		struct stensor w = { .n_dims = nd };
		char want[128];
		memcpy(w.shape, shape, nd * sizeof(*shape));
		fmt_shape(out, have, sizeof(have));
		fmt_shape(&w, want, sizeof(want));
		return moe_error_set(err, -EINVAL, "tensor %s has shape %s, expected %s", name, have, want);
	}
	if (out->dtype == MOE_DTYPE_INVALID) {
		const char *tn = out->st ? out->st->dtype_str : "?";
		if (out->gg)
			gguf_ggml_type_info(out->gg->ggml_type, &tn, NULL, NULL, NULL);
		return moe_error_set(err, -ENOTSUP, "tensor %s has type %s, which moe-pack does not support", name,
				     tn ? tn : "?");
	}
	return 0;
}

static int src_read(const struct convert_source *s, const struct stensor *t, uint64_t off, void *buf, size_t len,
		    struct moe_error *err)
{
	int rc, fd;
	uint64_t abs;
	if (s->kind == SRC_ST) {
		rc = safetensors_model_read(s->st, t->st, off, buf, len, err);
		fd = safetensors_model_file(s->st, t->st)->fd;
		abs = t->st->offset + off;
	} else {
		rc = gguf_read(s->gg, t->gg, off, buf, len, err);
		fd = gguf_tensor_fd(s->gg, t->gg);
		abs = t->gg->offset + off;
	}
	/* each source byte is read once: keep the page cache for others */
	if (rc == 0 && fd >= 0)
		posix_fadvise(fd, (off_t)abs, (off_t)len, POSIX_FADV_DONTNEED);
	return rc;
}

/* A pack takes the weight types the kernels compute (the daemon's COMPUTE
 * and moe-run use them), the K-quants and iq4 of llama.cpp's Q*_K_M / IQ4
 * files included; each part and resident keeps its own type. */
static bool weight_dtype_ok(enum moe_dtype t)
{
	return ffn_dtype_supported(t);
}

#define WEIGHT_DTYPES "f32, f16, bf16, q8_0, q4_0, mxfp4, q4_K, q5_K, q6_K, q3_K, q2_K, iq4_nl and iq4_xs"

static int check_weight_dtype(const struct stensor *t, bool quant_ok, struct moe_error *err)
{
	const char *name = t->st ? t->st->dtype_str : NULL;
	if (t->gg)
		gguf_ggml_type_info(t->gg->ggml_type, &name, NULL, NULL, NULL);
	if (!weight_dtype_ok(t->dtype) || (!quant_ok && moe_dtype_is_quantized(t->dtype)))
		return moe_error_set(err, -ENOTSUP, "tensor %s has type %s; moe-pack supports %s", t->name,
				     name ? name : moe_dtype_name(t->dtype),
				     quant_ok ? WEIGHT_DTYPES : "f32, f16 and bf16 here");
	return 0;
}

/* ---- expert recipes ---- */

static void set_part(struct recipe *r, uint32_t role, enum moe_dtype dt, uint64_t rows, uint64_t cols)
{
	uint64_t rb = 0;
	r->part.role = role;
	r->part.dtype = dt;
	r->part.rows = (uint32_t)rows;
	r->part.cols = (uint32_t)cols;
	moe_dtype_row_bytes(dt, cols, &rb);
	r->part.bytes = rb * rows;
}

/* A COPY of expert e's slab of a tensor [E][rows][cols] (or [rows][cols]
 * when stacked is false). */
static int copy_recipe(const struct convert_source *s, struct recipe *r, const char *name, bool stacked, uint32_t e,
		       uint32_t role, uint64_t rows, uint64_t cols, bool vector, bool quant_ok, struct moe_error *err)
{
	uint64_t shape[3], nd = 0;
	int rc;
	if (stacked)
		shape[nd++] = s->model.n_experts;
	if (!vector)
		shape[nd++] = rows;
	shape[nd++] = cols;
	memset(r, 0, sizeof(*r));
	rc = need(s, name, (uint32_t)nd, shape, &r->a, err);
	if (rc < 0)
		return rc;
	rc = check_weight_dtype(&r->a, quant_ok, err);
	if (rc < 0)
		return rc;
	r->kind = R_COPY;
	set_part(r, role, r->a.dtype, rows, cols);
	if (!moe_dtype_row_bytes(r->a.dtype, cols, &r->unit))
		return moe_error_set(err, -EINVAL, "tensor %s: %" PRIu64 " columns are not whole %s blocks", name, cols,
				     moe_dtype_name(r->a.dtype));
	r->a_off = stacked ? (uint64_t)e * r->part.bytes : 0;
	return 0;
}

/* The companion ".scale" of GGUF expert stack `name` (F32 [E]): llama.cpp's
 * build_moe_ffn multiplies expert e's product by entry e (for the families
 * whose graphs pass it) (the ".input_scale"
 * ones it loads but never uses: they stay resident, unused). An entry of 1
 * changes nothing; another is folded into an f32 part's rows, and refused
 * for any other type (a product of rounded values cannot be refolded). */
static int expert_scale(const struct convert_source *s, struct recipe *r, const char *name, uint32_t e,
			struct moe_error *err)
{
	char sn[256];
	const char *dot = strrchr(name, '.');
	uint64_t shape[1] = { s->model.n_experts };
	float v;
	int rc;

	/* only llama's and qwen3moe's graphs pass the expert scales to
	 * build_moe_ffn (llama.cpp src/models/); qwen2moe, olmoe and deepseek2 load
	 * them and never apply them, so neither do we */
	if (s->model.family != MOE_FAMILY_MIXTRAL && s->model.family != MOE_FAMILY_QWEN3_MOE)
		return 0;
	snprintf(sn, sizeof(sn), "%.*s.scale", dot ? (int)(dot - name) : (int)strlen(name), name);
	if (!has_tensor(s, sn))
		return 0;
	if ((rc = need(s, sn, 1, shape, &r->sc, err)) < 0)
		return rc;
	if (r->sc.dtype != MOE_DTYPE_F32)
		return moe_error_set(err, -ENOTSUP, "tensor %s is %s; llama.cpp's expert scales are f32", sn,
				     moe_dtype_name(r->sc.dtype));
	if ((rc = src_read(s, &r->sc, (uint64_t)e * 4, &v, 4, err)) < 0)
		return rc;
	if (v == 1.0f)
		return 0;
	if (!isfinite(v))
		return moe_error_set(err, -EINVAL, "tensor %s: expert %u's scale is %g", sn, e, (double)v);
	if (r->a.dtype != MOE_DTYPE_F32 || r->kind != R_COPY)
		return moe_error_set(err, -ENOTSUP,
				     "tensor %s: expert %u's scale is %g, not 1: llama.cpp multiplies the expert's %s "
				     "product by it, and moe-pack folds such scales into f32 weights only (%s is %s)",
				     sn, e, (double)v, pack_role_name(r->part.role), name, moe_dtype_name(r->a.dtype));
	r->scale = v;
	return 0;
}

/* Expert e's slab of GGUF stack blk.L.ffn_<k>_exps.weight as part `role`,
 * or, when the layer stores gate and up fused (ffn_gate_up_exps
 * [E, 2m, n], llama.cpp's deepseek2 and others: rows [0, m) are the gate's,
 * [m, 2m) the up's, as its build_moe_ffn splits them), that half of it. */
static int gguf_stack_recipe(const struct convert_source *s, struct recipe *r, uint32_t L, uint32_t e, int k,
			     struct moe_error *err)
{
	static const char *const gg[3] = { "gate", "up", "down" };
	static const uint32_t roles[3] = { PACK_ROLE_GATE, PACK_ROLE_UP, PACK_ROLE_DOWN };
	const uint64_t N = s->model.hidden, M = s->model.expert_width, E = s->model.n_experts;
	char name[160];
	int rc;

	snprintf(name, sizeof(name), "blk.%u.ffn_gate_up_exps.weight", L);
	if (k < 2 && has_tensor(s, name)) {
		uint64_t shape[3] = { E, 2 * M, N }, rb;
		memset(r, 0, sizeof(*r));
		if ((rc = need(s, name, 3, shape, &r->a, err)) < 0 || (rc = check_weight_dtype(&r->a, true, err)) < 0)
			return rc;
		if (!moe_dtype_row_bytes(r->a.dtype, N, &rb))
			return moe_error_set(err, -EINVAL, "tensor %s: %" PRIu64 " columns are not whole %s blocks", name,
					     N, moe_dtype_name(r->a.dtype));
		r->kind = R_COPY;
		r->unit = rb;
		set_part(r, roles[k], r->a.dtype, M, N);
		r->a_off = ((uint64_t)e * 2 + (uint64_t)k) * M * rb;
		snprintf(name, sizeof(name), "blk.%u.ffn_gate_up_exps.scale", L);
		if (has_tensor(s, name))
			return moe_error_set(err, -ENOTSUP, "tensor %s: a scale of fused gate/up experts is not supported",
					     name);
		return 0;
	}
	snprintf(name, sizeof(name), "blk.%u.ffn_%s_exps.weight", L, gg[k]);
	if (k == 0 && !has_tensor(s, name)) {
		char up[160];
		snprintf(up, sizeof(up), "blk.%u.ffn_up_exps.weight", L);
		/* gguf_ffn_kind makes every layer gated or none: only a layer
		 * that differs from the first MoE layer gets here */
		if (has_tensor(s, up))
			return moe_error_set(err, -ENOTSUP,
					     "blk.%u has ffn_up_exps and ffn_down_exps but neither ffn_gate_exps nor "
					     "ffn_gate_up_exps, while other layers' experts have a gate: a pack's "
					     "experts are all gated (SwiGLU) or all gateless (down(silu(up x)))",
					     L);
	}
	if ((rc = copy_recipe(s, r, name, true, e, roles[k], k == 2 ? N : M, k == 2 ? M : N, false, true, err)) < 0)
		return rc;
	return expert_scale(s, r, name, e, err);
}

/* Stacked GGUF experts with ffn_up_exps and ffn_down_exps but neither
 * ffn_gate_exps nor ffn_gate_up_exps (llama.cpp writes its llama model
 * that way when the gate is optional): its build_moe_ffn then computes
 * down(silu(up x)) (LLM_FFN_SILU without a gate), MOE_FFN_SILU. Every MoE
 * layer must agree with the first. */
static int gguf_ffn_kind(const struct convert_source *s, struct moe_model_config *m, struct moe_error *err)
{
	char name[160];
	int first = -1;

	for (uint32_t l = 0; l < m->n_moe_layers; l++) {
		const uint32_t L = moe_model_layer_of(m, l);
		snprintf(name, sizeof(name), "blk.%u.ffn_gate_exps.weight", L);
		bool gated = has_tensor(s, name);
		snprintf(name, sizeof(name), "blk.%u.ffn_gate_up_exps.weight", L);
		gated |= has_tensor(s, name);
		if (first < 0)
			first = gated;
		else if (first != (int)gated)
			return moe_error_set(err, -ENOTSUP,
					     "blk.%u's experts %s and blk.%u's %s: a pack's experts are all gated "
					     "(SwiGLU) or all gateless (down(silu(up x)))",
					     L, gated ? "have a gate" : "have no gate", moe_model_layer_of(m, 0), gated ? "do not" : "do");
	}
	if (first == 0)
		m->ffn_kind = MOE_FFN_SILU;
	return 0;
}

static int expert_recipes(const struct convert_source *s, uint32_t l, uint32_t e, struct recipe *r, uint32_t *n,
			  struct moe_error *err)
{
	const struct moe_model_config *m = &s->model;
	const uint64_t N = m->hidden, M = m->expert_width, E = m->n_experts;
	const uint32_t L = moe_model_layer_of(m, l);
	static const char *const hf[3] = { "gate_proj", "up_proj", "down_proj" };
	static const char *const mx[3] = { "w1", "w3", "w2" };
	static const char *const gg[3] = { "gate", "up", "down" };
	static const uint32_t roles[3] = { PACK_ROLE_GATE, PACK_ROLE_UP, PACK_ROLE_DOWN };
	char name[256], name2[128];
	int rc = 0;

	switch (s->layout) {
	case LAY_HF_MLP:
	case LAY_HF_MIXTRAL:
	case LAY_GGUF_STACK:
	case LAY_GGUF_SPLIT:
		if (m->ffn_kind == MOE_FFN_SILU) {
			/* gateless stacked experts (gguf_ffn_kind): up, down */
			for (int k = 1; k < 3 && rc == 0; k++)
				rc = gguf_stack_recipe(s, &r[k - 1], L, e, k, err);
			*n = 2;
			break;
		}
		for (int k = 0; k < 3 && rc == 0; k++) {
			bool down = k == 2, stacked = s->layout == LAY_GGUF_STACK;
			if (stacked && m->family != MOE_FAMILY_GPT_OSS) {
				rc = gguf_stack_recipe(s, &r[k], L, e, k, err);
				continue;
			}
			if (s->layout == LAY_HF_MLP)
				snprintf(name, sizeof(name), "model.layers.%u.mlp.experts.%u.%s.weight", L, e, hf[k]);
			else if (s->layout == LAY_HF_MIXTRAL)
				snprintf(name, sizeof(name), "model.layers.%u.block_sparse_moe.experts.%u.%s.weight", L, e,
					 mx[k]);
			else if (stacked)
				snprintf(name, sizeof(name), "blk.%u.ffn_%s_exps.weight", L, gg[k]);
			else
				snprintf(name, sizeof(name), "blk.%u.ffn_%s.%u.weight", L, gg[k], e);
			rc = copy_recipe(s, &r[k], name, stacked, e, roles[k], down ? N : M, down ? M : N, false, true, err);
		}
		*n = 3;
		break;
	case LAY_HF_GPTOSS: {
		const char *p = name2;
		snprintf(name2, sizeof(name2), "model.layers.%u.mlp.experts", L);
		/* gate_up_proj [E, n, 2m] -> GATE_UP [2m x n] */
		uint64_t sh[3] = { E, N, 2 * M };
		snprintf(name, sizeof(name), "%s.gate_up_proj", p);
		memset(r, 0, 4 * sizeof(*r));
		if ((rc = need(s, name, 3, sh, &r[0].a, err)) < 0 || (rc = check_weight_dtype(&r[0].a, false, err)) < 0)
			return rc;
		r[0].kind = R_TRANSPOSE;
		r[0].rows = N;
		r[0].cols = 2 * M;
		r[0].unit = moe_dtype_block_bytes(r[0].a.dtype);
		r[0].a_off = e * N * 2 * M * r[0].unit;
		set_part(&r[0], PACK_ROLE_GATE_UP, r[0].a.dtype, 2 * M, N);
		snprintf(name, sizeof(name), "%s.gate_up_proj_bias", p);
		if ((rc = copy_recipe(s, &r[1], name, true, e, PACK_ROLE_GATE_UP_BIAS, 1, 2 * M, true, false, err)) < 0)
			return rc;
		/* down_proj [E, m, n] -> DOWN [n x m] */
		uint64_t sd[3] = { E, M, N };
		snprintf(name, sizeof(name), "%s.down_proj", p);
		if ((rc = need(s, name, 3, sd, &r[2].a, err)) < 0 || (rc = check_weight_dtype(&r[2].a, false, err)) < 0)
			return rc;
		r[2].kind = R_TRANSPOSE;
		r[2].rows = M;
		r[2].cols = N;
		r[2].unit = moe_dtype_block_bytes(r[2].a.dtype);
		r[2].a_off = e * M * N * r[2].unit;
		set_part(&r[2], PACK_ROLE_DOWN, r[2].a.dtype, N, M);
		snprintf(name, sizeof(name), "%s.down_proj_bias", p);
		rc = copy_recipe(s, &r[3], name, true, e, PACK_ROLE_DOWN_BIAS, 1, N, true, false, err);
		*n = 4;
		break;
	}
	case LAY_HF_GPTOSS_MX: {
		snprintf(name2, sizeof(name2), "model.layers.%u.mlp.experts", L);
		memset(r, 0, 4 * sizeof(*r));
		for (int k = 0; k < 2; k++) {
			struct recipe *x = &r[k * 2];
			uint64_t rows = k ? N : 2 * M, cols = k ? M : N;
			const char *w = k ? "down_proj" : "gate_up_proj";
			if (cols % MOE_QK)
				return moe_error_set(err, -EINVAL, "%s.%s: %" PRIu64 " columns are not whole MXFP4 blocks",
						     name2, w, cols);
			uint64_t sb[4] = { E, rows, cols / MOE_QK, 16 }, ss[3] = { E, rows, cols / MOE_QK };
			snprintf(name, sizeof(name), "%s.%s_blocks", name2, w);
			if ((rc = need(s, name, 4, sb, &x->a, err)) < 0)
				return rc;
			snprintf(name, sizeof(name), "%s.%s_scales", name2, w);
			if ((rc = need(s, name, 3, ss, &x->b, err)) < 0)
				return rc;
			if (x->a.dtype != MOE_DTYPE_U8 || x->b.dtype != MOE_DTYPE_U8)
				return moe_error_set(err, -EINVAL, "%s.%s_blocks/_scales must be U8", name2, w);
			x->kind = R_MX_HF;
			x->rows = rows;
			x->cols = cols / MOE_QK;
			x->a_off = e * rows * x->cols * 16;
			x->b_off = e * rows * x->cols;
			set_part(x, k ? PACK_ROLE_DOWN : PACK_ROLE_GATE_UP, MOE_DTYPE_MXFP4, rows, cols);
			snprintf(name, sizeof(name), "%s.%s_bias", name2, w);
			rc = copy_recipe(s, &r[k * 2 + 1], name, true, e, k ? PACK_ROLE_DOWN_BIAS : PACK_ROLE_GATE_UP_BIAS,
					 1, rows, true, false, err);
			if (rc < 0)
				return rc;
		}
		*n = 4;
		break;
	}
	}
	/* GGUF gpt-oss keeps gate and up apart: interleave them */
	if (rc == 0 && s->layout == LAY_GGUF_STACK && m->family == MOE_FAMILY_GPT_OSS) {
		struct recipe gate = r[0], up = r[1], down = r[2], b[3];
		for (int k = 0; k < 3 && rc == 0; k++) {
			snprintf(name, sizeof(name), "blk.%u.ffn_%s_exps.bias", L, gg[k]);
			rc = copy_recipe(s, &b[k], name, true, e, PACK_ROLE_GATE_UP_BIAS, 1, k == 2 ? N : M, true, false,
					 err);
		}
		if (rc < 0)
			return rc;
		if (gate.a.dtype != up.a.dtype || b[0].a.dtype != b[1].a.dtype)
			return moe_error_set(err, -EINVAL, "blk.%u: gate and up experts have different types", L);
		memset(r, 0, 4 * sizeof(*r));
		r[0].kind = R_INTERLEAVE;
		r[0].a = gate.a;
		r[0].b = up.a;
		r[0].a_off = gate.a_off;
		r[0].b_off = up.a_off;
		r[0].rows = M;
		r[0].unit = gate.unit;
		set_part(&r[0], PACK_ROLE_GATE_UP, gate.a.dtype, 2 * M, N);
		r[1].kind = R_INTERLEAVE;
		r[1].a = b[0].a;
		r[1].b = b[1].a;
		r[1].a_off = b[0].a_off;
		r[1].b_off = b[1].a_off;
		r[1].rows = M;
		r[1].unit = moe_dtype_block_bytes(b[0].a.dtype);
		set_part(&r[1], PACK_ROLE_GATE_UP_BIAS, b[0].a.dtype, 1, 2 * M);
		r[2] = down;
		r[3] = b[2];
		r[3].part.role = PACK_ROLE_DOWN_BIAS;
		*n = 4;
	}
	return rc;
}

/* ---- streaming ---- */

static uint8_t *grow(struct convert_source *s, int i, size_t len, struct moe_error *err)
{
	if (s->cap[i] < len) {
		free(s->buf[i]);
		s->buf[i] = malloc(len);
		s->cap[i] = s->buf[i] ? len : 0;
		if (!s->buf[i])
			moe_error_set(err, -ENOMEM, "out of memory (%zu bytes)", len);
	}
	return s->buf[i];
}

void convert_mxfp4_hf_to_ggml(const uint8_t *blocks, const uint8_t *scales, uint64_t groups,
			      struct moe_block_mxfp4 *out)
{
	for (uint64_t g = 0; g < groups; g++) {
		const uint8_t *b = blocks + g * 16;
		uint8_t code[32];
		for (int k = 0; k < 16; k++) {
			code[2 * k] = b[k] & 0x0f;
			code[2 * k + 1] = b[k] >> 4;
		}
		/* 2^(s-127) x E2M1 == 2^(e-128) x doubled table: same exponent byte */
		out[g].e = scales[g];
		for (int j = 0; j < 16; j++)
			out[g].qs[j] = (uint8_t)(code[j] | code[j + 16] << 4);
	}
}

static void transpose(const uint8_t *in, uint64_t rows, uint64_t cols, uint64_t unit, uint64_t c0, uint64_t c1,
		      uint8_t *out)
{
	/* out row c (c0 <= c < c1) = column c of in */
	for (uint64_t c = c0; c < c1; c++) {
		uint8_t *o = out + (c - c0) * rows * unit;
		if (unit == 2) {
			const uint16_t *src = (const uint16_t *)in + c;
			uint16_t *dst = (uint16_t *)o;
			for (uint64_t r = 0; r < rows; r++)
				dst[r] = src[r * cols];
		} else if (unit == 4) {
			const uint32_t *src = (const uint32_t *)in + c;
			uint32_t *dst = (uint32_t *)o;
			for (uint64_t r = 0; r < rows; r++)
				dst[r] = src[r * cols];
		} else {
			for (uint64_t r = 0; r < rows; r++)
				memcpy(o + r * unit, in + (r * cols + c) * unit, unit);
		}
	}
}

static int stream_recipe(struct convert_source *s, const struct recipe *r, struct pack_writer *w,
			 struct moe_error *err)
{
	uint8_t *a, *b, *o;
	int rc = 0;

	switch (r->kind) {
	case R_COPY:
		if (!(a = grow(s, 0, CHUNK, err)))
			return -ENOMEM;
		for (uint64_t off = 0; off < r->part.bytes && rc == 0; off += CHUNK) {
			size_t len = (size_t)MOE_MIN((uint64_t)CHUNK, r->part.bytes - off);
			rc = src_read(s, &r->a, r->a_off + off, a, len, err);
			if (rc == 0 && r->scale != 0.0f) { /* f32 (expert_scale), len a multiple of 4 */
				float *f = (float *)(void *)a;
				for (size_t i = 0; i < len / 4; i++)
					f[i] *= r->scale;
			}
			if (rc == 0)
				rc = pack_writer_write(w, a, len, err);
		}
		return rc;
	case R_INTERLEAVE: {
		uint64_t k = MOE_MAX(1u, CHUNK / (r->unit * 2));
		size_t step = (size_t)(k * r->unit);
		if (!(a = grow(s, 0, step, err)) || !(b = grow(s, 1, step, err)) || !(o = grow(s, 2, 2 * step, err)))
			return -ENOMEM;
		for (uint64_t r0 = 0; r0 < r->rows && rc == 0; r0 += k) {
			uint64_t kk = MOE_MIN(k, r->rows - r0);
			size_t len = (size_t)(kk * r->unit);
			rc = src_read(s, &r->a, r->a_off + r0 * r->unit, a, len, err);
			if (rc == 0)
				rc = src_read(s, &r->b, r->b_off + r0 * r->unit, b, len, err);
			if (rc < 0)
				break;
			for (uint64_t i = 0; i < kk; i++) {
				memcpy(o + 2 * i * r->unit, a + i * r->unit, r->unit);
				memcpy(o + (2 * i + 1) * r->unit, b + i * r->unit, r->unit);
			}
			rc = pack_writer_write(w, o, 2 * len, err);
		}
		return rc;
	}
	case R_TRANSPOSE: {
		/* needs the whole [rows][cols] slab of this expert: one part */
		size_t slab = (size_t)(r->rows * r->cols * r->unit), orow = (size_t)(r->rows * r->unit);
		uint64_t k = MOE_MAX(1u, CHUNK / orow);
		if (!(a = grow(s, 0, slab, err)) || !(o = grow(s, 2, (size_t)k * orow, err)))
			return -ENOMEM;
		rc = src_read(s, &r->a, r->a_off, a, slab, err);
		for (uint64_t c0 = 0; c0 < r->cols && rc == 0; c0 += k) {
			uint64_t c1 = MOE_MIN(r->cols, c0 + k);
			transpose(a, r->rows, r->cols, r->unit, c0, c1, o);
			rc = pack_writer_write(w, o, (size_t)(c1 - c0) * orow, err);
		}
		return rc;
	}
	case R_MX_HF: {
		uint64_t g = r->cols, k = MOE_MAX(1u, CHUNK / (g * 17));
		if (!(a = grow(s, 0, (size_t)(k * g * 16), err)) || !(b = grow(s, 1, (size_t)(k * g), err)) ||
		    !(o = grow(s, 2, (size_t)(k * g * 17), err)))
			return -ENOMEM;
		for (uint64_t r0 = 0; r0 < r->rows && rc == 0; r0 += k) {
			uint64_t kk = MOE_MIN(k, r->rows - r0);
			rc = src_read(s, &r->a, r->a_off + r0 * g * 16, a, (size_t)(kk * g * 16), err);
			if (rc == 0)
				rc = src_read(s, &r->b, r->b_off + r0 * g, b, (size_t)(kk * g), err);
			if (rc < 0)
				break;
			for (uint64_t i = 0; i < kk; i++)
				convert_mxfp4_hf_to_ggml(a + i * g * 16, b + i * g, g,
							 (struct moe_block_mxfp4 *)(o + i * g * 17));
			rc = pack_writer_write(w, o, (size_t)(kk * g * 17), err);
		}
		return rc;
	}
	}
	return moe_error_set(err, -EINVAL, "internal: unknown recipe");
}

/* ---- resident tensors ---- */

static int push_resident(struct convert_source *s, const struct stensor *t, uint32_t role, uint32_t layer,
			 const uint8_t *mem, struct moe_error *err)
{
	if (strlen(t->name) >= PACK_TENSOR_NAME_MAX)
		return moe_error_set(err, -ENAMETOOLONG, "tensor name %s is longer than %d bytes", t->name,
				     PACK_TENSOR_NAME_MAX - 1);
	if (t->n_dims < 1 || t->n_dims > 4)
		return moe_error_set(err, -EINVAL, "tensor %s has %u dimensions (1..4 supported)", t->name, t->n_dims);
	if (s->n_res == s->cap_res) {
		uint32_t cap = s->cap_res ? s->cap_res * 2 : 32;
		void *p = realloc(s->res, cap * sizeof(*s->res));
		if (!p)
			return moe_error_set(err, -ENOMEM, "out of memory");
		s->res = p;
		s->cap_res = cap;
	}
	s->res[s->n_res++] = (struct resident){ .t = *t, .role = role, .layer = layer, .mem = mem };
	return 0;
}

static int add_resident(struct convert_source *s, const char *name, uint32_t role, uint32_t layer, bool required,
			uint32_t nd, const uint64_t *shape, bool *found, struct moe_error *err)
{
	struct stensor t;
	int rc;
	if (found)
		*found = false;
	if (!has_tensor(s, name)) {
		if (required)
			return moe_error_set(err, -ENOENT, "tensor %s not found", name);
		return 0;
	}
	rc = need(s, name, nd, shape, &t, err);
	/* a [1, n] gate may be stored as a vector [n] (GGUF) */
	if (rc == -EINVAL && nd == 2 && shape[0] == 1)
		rc = need(s, name, 1, shape + 1, &t, err);
	if (rc < 0)
		return rc;
	if ((rc = push_resident(s, &t, role, layer, NULL, err)) < 0)
		return rc;
	if (found)
		*found = true;
	return 0;
}

static int collect_residents(struct convert_source *s, struct moe_error *err)
{
	struct moe_model_config *m = &s->model;
	const uint64_t N = m->hidden, E = m->n_experts, S = m->shared_width;
	bool gg = s->kind == SRC_GGUF, found, any_score = false, any_rbias = false;
	char name[256], pre[128];
	int rc;

	for (uint32_t l = 0; l < m->n_moe_layers; l++) {
		uint32_t L = moe_model_layer_of(m, l);
		uint64_t sr[2] = { E, N }, sb[1] = { E };
		if (gg)
			snprintf(pre, sizeof(pre), "blk.%u", L);
		else
			snprintf(pre, sizeof(pre), "model.layers.%u.%s", L,
				 s->layout == LAY_HF_MIXTRAL ? "block_sparse_moe" : "mlp");
		bool oss = m->family == MOE_FAMILY_GPT_OSS;
		snprintf(name, sizeof(name), gg ? "%s.ffn_gate_inp.weight" : oss ? "%s.router.weight" : "%s.gate.weight",
			 pre);
		if ((rc = add_resident(s, name, PACK_ROLE_ROUTER, L, true, 2, sr, NULL, err)) < 0)
			return rc;
		snprintf(name, sizeof(name), gg ? "%s.ffn_gate_inp.bias" : oss ? "%s.router.bias" : "%s.gate.bias", pre);
		if ((rc = add_resident(s, name, PACK_ROLE_ROUTER_BIAS, L, oss, 1, sb, &found, err)) < 0)
			return rc;
		any_rbias |= found;
		snprintf(name, sizeof(name), gg ? "%s.exp_probs_b.bias" : "%s.gate.e_score_correction_bias", pre);
		/* llama.cpp's deepseek2 takes exp_probs_b when present (test-llama-archs'
		 * sigmoid-gated model has none): required of HF DeepSeek-V3 only */
		if ((rc = add_resident(s, name, PACK_ROLE_SCORE_BIAS, L, m->family == MOE_FAMILY_DEEPSEEK_V3 && !gg, 1, sb,
				       &found, err)) < 0)
			return rc;
		any_score |= found;
		if (S) {
			static const char *const gn[3] = { "gate", "up", "down" };
			const char *sh = m->family == MOE_FAMILY_QWEN2_MOE ? "shared_expert" : "shared_experts";
			for (int k = 0; k < 3; k++) {
				uint64_t shape[2] = { k == 2 ? N : S, k == 2 ? S : N };
				if (gg)
					snprintf(name, sizeof(name), "%s.ffn_%s_shexp.weight", pre, gn[k]);
				else
					snprintf(name, sizeof(name), "%s.%s.%s_proj.weight", pre, sh, gn[k]);
				if ((rc = add_resident(s, name, PACK_ROLE_SHARED_GATE + (uint32_t)k, L, true, 2, shape, NULL,
						       err)) < 0)
					return rc;
			}
			uint64_t sg[2] = { 1, N };
			snprintf(name, sizeof(name), gg ? "%s.ffn_gate_inp_shexp.weight" : "%s.shared_expert_gate.weight", pre);
			if ((rc = add_resident(s, name, PACK_ROLE_SHARED_EXPERT_GATE, L,
					       m->family == MOE_FAMILY_QWEN2_MOE, 2, sg, NULL, err)) < 0)
				return rc;
		}
	}
	m->has_score_bias = any_score;
	m->has_router_bias = any_rbias;
	return 0;
}

/* ---- the rest of the model (whole-model packs) ---- */

/* The model layer of a tensor ("blk.L." or "model.layers.L."), or UINT32_MAX. */
static uint32_t name_layer(const struct convert_source *s, const char *name)
{
	unsigned L = 0;
	int n = 0;
	if ((sscanf(name, "blk.%u.%n", &L, &n) == 1 && n > 0) ||
	    (sscanf(name, "model.layers.%u.%n", &L, &n) == 1 && n > 0))
		return L < s->model.n_layers ? L : UINT32_MAX;
	return UINT32_MAX;
}

/* A growing byte buffer that remembers running out of memory. */
struct obuf {
	uint8_t *p;
	size_t len, cap;
	bool oom;
};

static void ob_put(struct obuf *b, const void *v, size_t n)
{
	if (b->oom)
		return;
	if (b->len + n > b->cap) {
		size_t cap = MOE_MAX(b->cap * 2, b->len + n + 4096);
		void *q = realloc(b->p, cap);
		if (!q) {
			b->oom = true;
			return;
		}
		b->p = q;
		b->cap = cap;
	}
	memcpy(b->p + b->len, v, n);
	b->len += n;
}

static void ob_u32(struct obuf *b, uint32_t v) { ob_put(b, &v, 4); }
static void ob_u64(struct obuf *b, uint64_t v) { ob_put(b, &v, 8); }
static void ob_str(struct obuf *b, const struct gguf_str *x)
{
	ob_u64(b, x->len);
	ob_put(b, x->data, (size_t)x->len);
}

/* Bytes of one value of a fixed-size KV type (0 for STRING/ARRAY). */
static size_t kv_width(uint32_t t)
{
	switch (t) {
	case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL: return 1;
	case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: return 2;
	case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_FLOAT32: return 4;
	case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64: case GGUF_TYPE_FLOAT64: return 8;
	default: return 0;
	}
}

/* KV pairs being written: the body of a GGUF v3 file with no tensors. */
struct kvw {
	struct obuf b;
	uint64_t n;
};

static void kw_key(struct kvw *k, const char *key, uint32_t type)
{
	struct gguf_str ks = { strlen(key), (char *)key };
	ob_str(&k->b, &ks);
	ob_u32(&k->b, type);
	k->n++;
}

static void kw_u32(struct kvw *k, const char *key, uint32_t v)
{
	kw_key(k, key, GGUF_TYPE_UINT32);
	ob_u32(&k->b, v);
}

static void kw_f32(struct kvw *k, const char *key, float v)
{
	kw_key(k, key, GGUF_TYPE_FLOAT32);
	ob_put(&k->b, &v, 4);
}

static void kw_bool(struct kvw *k, const char *key, bool v)
{
	uint8_t x = v;
	kw_key(k, key, GGUF_TYPE_BOOL);
	ob_put(&k->b, &x, 1);
}

static void kw_str(struct kvw *k, const char *key, const char *v)
{
	struct gguf_str vs = { strlen(v), (char *)v };
	kw_key(k, key, GGUF_TYPE_STRING);
	ob_str(&k->b, &vs);
}

/* Header + body -> s->kv_image, checked the way moe-run reads it. */
static int kw_finish(struct convert_source *s, struct kvw *k, struct moe_error *err)
{
	struct obuf img = { 0 };
	struct gguf_file *check;
	int rc;

	ob_put(&img, "GGUF", 4);
	ob_u32(&img, 3);
	ob_u64(&img, 0);
	ob_u64(&img, k->n);
	if (!k->b.oom && k->b.len)
		ob_put(&img, k->b.p, k->b.len);
	free(k->b.p);
	if (k->b.oom || img.oom) {
		free(img.p);
		return moe_error_set(err, -ENOMEM, "out of memory for the GGUF metadata (%zu bytes)", k->b.len);
	}
	rc = gguf_parse(img.p, img.len, &check, err);
	if (rc < 0) {
		free(img.p);
		return moe_error_prefix(err, rc, "internal: the metadata image does not parse");
	}
	gguf_close(check);
	s->kv_image = img.p;
	s->kv_len = img.len;
	return 0;
}

/* The source's KV pairs, in order: the reader stored them widened
 * (u64/i64/f64), so each is narrowed back to its own type, which gives the
 * bytes the source holds. (The host is little-endian, like GGUF: gguf.c
 * asserts it.) */
static int build_kv_image(struct convert_source *s, struct moe_error *err)
{
	const struct gguf_file *g = s->gg;
	struct kvw k = { 0 };
	struct obuf *b = &k.b;

	for (uint64_t i = 0; i < g->n_kv; i++) {
		const struct gguf_kv *kv = &g->kv[i];
		ob_str(b, &kv->key);
		ob_u32(b, kv->type);
		k.n++;
		switch (kv->type) {
		case GGUF_TYPE_UINT8: case GGUF_TYPE_BOOL: { uint8_t x = (uint8_t)kv->v.u64; ob_put(b, &x, 1); break; }
		case GGUF_TYPE_INT8: { int8_t x = (int8_t)kv->v.i64; ob_put(b, &x, 1); break; }
		case GGUF_TYPE_UINT16: { uint16_t x = (uint16_t)kv->v.u64; ob_put(b, &x, 2); break; }
		case GGUF_TYPE_INT16: { int16_t x = (int16_t)kv->v.i64; ob_put(b, &x, 2); break; }
		case GGUF_TYPE_UINT32: ob_u32(b, (uint32_t)kv->v.u64); break;
		case GGUF_TYPE_INT32: { int32_t x = (int32_t)kv->v.i64; ob_put(b, &x, 4); break; }
		case GGUF_TYPE_FLOAT32: { float x = (float)kv->v.f64; ob_put(b, &x, 4); break; }
		case GGUF_TYPE_UINT64: ob_u64(b, kv->v.u64); break;
		case GGUF_TYPE_INT64: ob_put(b, &kv->v.i64, 8); break;
		case GGUF_TYPE_FLOAT64: ob_put(b, &kv->v.f64, 8); break;
		case GGUF_TYPE_STRING: ob_str(b, &kv->v.str); break;
		case GGUF_TYPE_ARRAY:
			ob_u32(b, kv->v.arr.type);
			ob_u64(b, kv->v.arr.count);
			if (kv->v.arr.type == GGUF_TYPE_STRING) {
				const struct gguf_str *x = kv->v.arr.data;
				for (uint64_t j = 0; j < kv->v.arr.count; j++)
					ob_str(b, &x[j]);
			} else {
				ob_put(b, kv->v.arr.data, (size_t)(kv->v.arr.count * kv_width(kv->v.arr.type)));
			}
			break;
		default:
			free(b->p);
			return moe_error_set(err, -EINVAL, "GGUF key %s: unexpected type %u", kv->key.data, kv->type);
		}
	}
	return kw_finish(s, &k, err);
}

/* Marks (used[i] = 1) the source tensors the expert extents are made of. */
static int mark_expert_tensors(struct convert_source *s, uint8_t *used, struct moe_error *err)
{
	const struct moe_model_config *m = &s->model;
	struct recipe r[PACK_MAX_PARTS];
	uint32_t n;
	int rc;
	/* stacked tensors hold every expert: expert 0's recipe names them
	 * (and their .scale, whether or not expert 0's is 1) */
	uint32_t ne = s->layout == LAY_GGUF_SPLIT ? m->n_experts : 1;
	for (uint32_t l = 0; l < m->n_moe_layers; l++)
		for (uint32_t e = 0; e < ne; e++) {
			if ((rc = expert_recipes(s, l, e, r, &n, err)) < 0)
				return rc;
			for (uint32_t i = 0; i < n; i++) {
				if (r[i].a.gg)
					used[r[i].a.gg - s->gg->tensors] = 1;
				if (r[i].b.gg)
					used[r[i].b.gg - s->gg->tensors] = 1;
				if (r[i].sc.gg)
					used[r[i].sc.gg - s->gg->tensors] = 1;
			}
		}
	return 0;
}

/* Whole-model packs: every source tensor that is not part of a routed
 * expert (embeddings, norms, attention, dense FFNs, output head), under its
 * GGUF name, plus the metadata as PACK_KV_TENSOR. Routers, biases and
 * shared experts are already there with their roles. */
static int collect_dense_gguf(struct convert_source *s, struct moe_error *err)
{
	const struct gguf_file *g = s->gg;
	uint8_t *used;
	int rc = 0;
	used = calloc(g->n_tensors ? g->n_tensors : 1, 1);
	if (!used)
		return moe_error_set(err, -ENOMEM, "out of memory");
	rc = mark_expert_tensors(s, used, err);
	for (uint32_t i = 0; i < s->n_res; i++)
		used[s->res[i].t.gg - g->tensors] = 1;
	for (uint64_t i = 0; i < g->n_tensors && rc == 0; i++) {
		const struct gguf_tensor *gt = &g->tensors[i];
		struct stensor t;
		if (used[i])
			continue;
		find_tensor(s, gt->name.data, &t);
		if (!weight_dtype_ok(t.dtype)) {
			const char *tn = "?";
			gguf_ggml_type_info(gt->ggml_type, &tn, NULL, NULL, NULL);
			rc = moe_error_set(err, -ENOTSUP,
					   "tensor %s has type %s; a whole-model pack holds " WEIGHT_DTYPES
					   " tensors (--experts-only leaves the dense tensors out)",
					   gt->name.data, tn ? tn : "?");
			break;
		}
		if (strcmp(gt->name.data, PACK_KV_TENSOR) == 0) {
			rc = moe_error_set(err, -EEXIST, "the source has a tensor named %s, the name of the pack's metadata",
					   PACK_KV_TENSOR);
			break;
		}
		rc = push_resident(s, &t, PACK_ROLE_OTHER, name_layer(s, t.name), NULL, err);
	}
	free(used);
	if (rc == 0)
		rc = build_kv_image(s, err);
	if (rc == 0) {
		struct stensor kv = { .name = PACK_KV_TENSOR, .dtype = MOE_DTYPE_U8, .n_dims = 1,
				      .shape = { s->kv_len }, .bytes = s->kv_len };
		rc = push_resident(s, &kv, PACK_ROLE_OTHER, UINT32_MAX, s->kv_image, err);
	}
	return rc;
}

/* ---- model config: HF config.json ---- */

/* 1 when absent (or null), 0 when read, negative on a bad value. */
static int j_u32(json_t *c, const char *key, uint32_t *out, struct moe_error *err)
{
	json_t *v = json_object_get(c, key);
	if (!v || json_is_null(v))
		return 1;
	if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > (json_int_t)UINT32_MAX)
		return moe_error_set(err, -EINVAL, "config.json: %s must be a non-negative integer", key);
	*out = (uint32_t)json_integer_value(v);
	return 0;
}

static int j_f32(json_t *c, const char *key, float *out, struct moe_error *err)
{
	json_t *v = json_object_get(c, key);
	if (!v || json_is_null(v))
		return 1;
	if (!json_is_number(v))
		return moe_error_set(err, -EINVAL, "config.json: %s must be a number", key);
	*out = (float)json_number_value(v);
	return 0;
}

static int j_bool(json_t *c, const char *key, uint32_t *out, struct moe_error *err)
{
	json_t *v = json_object_get(c, key);
	if (!v || json_is_null(v))
		return 1;
	if (!json_is_boolean(v))
		return moe_error_set(err, -EINVAL, "config.json: %s must be true or false", key);
	*out = json_is_true(v);
	return 0;
}

static int j_need_u32(json_t *c, const char *key, uint32_t *out, struct moe_error *err)
{
	int rc = j_u32(c, key, out, err);
	if (rc == 1)
		return moe_error_set(err, -EINVAL, "config.json: %s is missing", key);
	return rc;
}

static enum moe_family family_from_arch(const char *arch)
{
	/* "Qwen2MoeForCausalLM" -> "qwen2moe" */
	char buf[64];
	size_t n = strlen(arch);
	const char *suf = "ForCausalLM";
	if (n > strlen(suf) && strcmp(arch + n - strlen(suf), suf) == 0)
		n -= strlen(suf);
	if (n >= sizeof(buf))
		return MOE_FAMILY_UNKNOWN;
	memcpy(buf, arch, n);
	buf[n] = '\0';
	return moe_family_parse(buf);
}

/* Which layers have routed experts must be evenly spaced: first + i * step. */
static int set_moe_layers(struct moe_model_config *m, const bool *is_moe, struct moe_error *err)
{
	int64_t first = -1, prev = -1, step = 0;
	uint32_t count = 0;
	bool even = true;
	for (uint32_t L = 0; L < m->n_layers; L++) {
		if (!is_moe[L])
			continue;
		if (first < 0)
			first = L;
		else if (step == 0)
			step = L - prev;
		else if (L - prev != step)
			even = false;
		prev = L;
		count++;
	}
	if (count == 0)
		return moe_error_set(err, -EINVAL, "the model has no layer with routed experts");
	if (!even) {
		char list[200];
		size_t o = 0;
		for (uint32_t L = 0; L < m->n_layers && o < sizeof(list) - 8; L++)
			if (is_moe[L])
				o += (size_t)snprintf(list + o, sizeof(list) - o, "%s%u", o ? ", " : "", L);
		return moe_error_set(err, -ENOTSUP,
				     "MoE layers %s are not evenly spaced; moetierd needs them at first + i * step", list);
	}
	m->first_moe_layer = (uint32_t)first;
	m->moe_layer_step = step ? (uint32_t)step : 1;
	m->n_moe_layers = count;
	return 0;
}

static int hf_config(struct convert_source *s, const char *cfg_path, const struct convert_options *opt,
		     struct moe_error *err)
{
	struct moe_model_config *m = &s->model;
	json_error_t je;
	json_t *c = json_load_file(cfg_path, 0, &je);
	enum moe_family f = MOE_FAMILY_UNKNOWN;
	bool *is_moe = NULL;
	int rc = 0;

	if (!c)
		return moe_error_set(err, -EINVAL, "%s: %s (line %d)", cfg_path, je.text, je.line);
	if (!json_is_object(c)) {
		rc = moe_error_set(err, -EINVAL, "%s: not a JSON object", cfg_path);
		goto out;
	}
	if (opt->family) {
		f = moe_family_parse(opt->family);
		if (f == MOE_FAMILY_UNKNOWN) {
			rc = moe_error_set(err, -EINVAL, "unknown family '%s'", opt->family);
			goto out;
		}
	} else {
		const char *mt = json_string_value(json_object_get(c, "model_type"));
		json_t *archs = json_object_get(c, "architectures");
		f = moe_family_parse(mt);
		if (f == MOE_FAMILY_UNKNOWN && json_is_array(archs) && json_array_size(archs) > 0 &&
		    json_is_string(json_array_get(archs, 0)))
			f = family_from_arch(json_string_value(json_array_get(archs, 0)));
		if (f == MOE_FAMILY_UNKNOWN) {
			rc = moe_error_set(err, -ENOTSUP,
					   "%s: model_type '%s' is not a supported MoE family (mixtral, qwen2_moe, qwen3_moe, "
					   "deepseek_v2, deepseek_v3, olmoe, gpt_oss); use --family to override",
					   cfg_path, mt ? mt : "(none)");
			goto out;
		}
	}
	moe_model_set_family_defaults(m, f);
	m->moe_layer_step = 1;
	if ((rc = j_need_u32(c, "hidden_size", &m->hidden, err)) < 0 ||
	    (rc = j_need_u32(c, "num_hidden_layers", &m->n_layers, err)) < 0)
		goto out;
	if (m->n_layers == 0 || m->n_layers > 1024) {
		rc = moe_error_set(err, -EINVAL, "config.json: num_hidden_layers %u out of range", m->n_layers);
		goto out;
	}
	rc = j_u32(c, "num_experts_per_tok", &m->top_k, err);
	if (rc == 1 && f == MOE_FAMILY_GPT_OSS)
		rc = j_u32(c, "experts_per_token", &m->top_k, err);
	if (rc == 1)
		rc = moe_error_set(err, -EINVAL, "config.json: num_experts_per_tok is missing");
	if (rc < 0)
		goto out;
	if ((rc = j_bool(c, "norm_topk_prob", &m->norm_topk_prob, err)) < 0)
		goto out;
	is_moe = calloc(m->n_layers, sizeof(*is_moe));
	if (!is_moe) {
		rc = moe_error_set(err, -ENOMEM, "out of memory");
		goto out;
	}
	for (uint32_t L = 0; L < m->n_layers; L++)
		is_moe[L] = true;

	switch (f) {
	case MOE_FAMILY_MIXTRAL:
	case MOE_FAMILY_GPT_OSS:
		if ((rc = j_need_u32(c, "num_local_experts", &m->n_experts, err)) < 0 ||
		    (rc = j_need_u32(c, "intermediate_size", &m->expert_width, err)) < 0)
			goto out;
		if (f == MOE_FAMILY_MIXTRAL)
			m->norm_topk_prob = 1; /* Mixtral always renormalizes */
		if (f == MOE_FAMILY_GPT_OSS && (rc = j_f32(c, "swiglu_limit", &m->swiglu_limit, err)) < 0)
			goto out;
		break;
	case MOE_FAMILY_OLMOE:
		if ((rc = j_need_u32(c, "num_experts", &m->n_experts, err)) < 0 ||
		    (rc = j_need_u32(c, "intermediate_size", &m->expert_width, err)) < 0)
			goto out;
		break;
	case MOE_FAMILY_QWEN2_MOE:
	case MOE_FAMILY_QWEN3_MOE: {
		uint32_t step = 1, sw = 0;
		json_t *mlp_only = json_object_get(c, "mlp_only_layers");
		if ((rc = j_need_u32(c, "num_experts", &m->n_experts, err)) < 0 ||
		    (rc = j_need_u32(c, "moe_intermediate_size", &m->expert_width, err)) < 0 ||
		    (rc = j_u32(c, "decoder_sparse_step", &step, err)) < 0 ||
		    (rc = j_u32(c, "shared_expert_intermediate_size", &sw, err)) < 0)
			goto out;
		if (step == 0) {
			rc = moe_error_set(err, -EINVAL, "config.json: decoder_sparse_step must be >= 1");
			goto out;
		}
		for (uint32_t L = 0; L < m->n_layers; L++)
			is_moe[L] = (L + 1) % step == 0;
		if (mlp_only && !json_is_null(mlp_only)) {
			size_t i;
			json_t *v;
			if (!json_is_array(mlp_only)) {
				rc = moe_error_set(err, -EINVAL, "config.json: mlp_only_layers must be a list");
				goto out;
			}
			json_array_foreach(mlp_only, i, v) {
				if (!json_is_integer(v) || json_integer_value(v) < 0 ||
				    json_integer_value(v) >= (json_int_t)m->n_layers) {
					rc = moe_error_set(err, -EINVAL, "config.json: mlp_only_layers[%zu] is not a layer index", i);
					goto out;
				}
				is_moe[json_integer_value(v)] = false;
			}
		}
		if (f == MOE_FAMILY_QWEN2_MOE && sw) {
			m->n_shared_experts = 1;
			m->shared_width = sw;
		}
		break;
	}
	case MOE_FAMILY_DEEPSEEK_V2:
	case MOE_FAMILY_DEEPSEEK_V3: {
		uint32_t first = 0, freq = 1, ns = 0;
		json_t *sf = json_object_get(c, "scoring_func"), *tm = json_object_get(c, "topk_method");
		if ((rc = j_need_u32(c, "n_routed_experts", &m->n_experts, err)) < 0 ||
		    (rc = j_need_u32(c, "moe_intermediate_size", &m->expert_width, err)) < 0 ||
		    (rc = j_u32(c, "first_k_dense_replace", &first, err)) < 0 ||
		    (rc = j_u32(c, "moe_layer_freq", &freq, err)) < 0 || (rc = j_u32(c, "n_shared_experts", &ns, err)) < 0 ||
		    (rc = j_u32(c, "n_group", &m->n_group, err)) < 0 ||
		    (rc = j_u32(c, "topk_group", &m->topk_group, err)) < 0 ||
		    (rc = j_f32(c, "routed_scaling_factor", &m->routed_scaling_factor, err)) < 0)
			goto out;
		if (freq == 0) {
			rc = moe_error_set(err, -EINVAL, "config.json: moe_layer_freq must be >= 1");
			goto out;
		}
		for (uint32_t L = 0; L < m->n_layers; L++)
			is_moe[L] = L >= first && L % freq == 0;
		m->n_shared_experts = ns;
		m->shared_width = ns * m->expert_width;
		if (sf && !json_is_null(sf)) {
			const char *v = json_string_value(sf);
			if (v && strcmp(v, "softmax") == 0)
				m->scoring = MOE_SCORING_SOFTMAX;
			else if (v && strcmp(v, "sigmoid") == 0)
				m->scoring = MOE_SCORING_SIGMOID;
			else {
				rc = moe_error_set(err, -ENOTSUP, "config.json: scoring_func '%s' is not supported (softmax, sigmoid)",
						   v ? v : "?");
				goto out;
			}
		}
		if (tm && !json_is_null(tm)) {
			const char *v = json_string_value(tm);
			if (v && strcmp(v, "greedy") == 0)
				m->topk_method = MOE_TOPK_GREEDY;
			else if (v && (strcmp(v, "group_limited_greedy") == 0 || strcmp(v, "noaux_tc") == 0))
				m->topk_method = MOE_TOPK_GROUP_LIMITED;
			else {
				rc = moe_error_set(err, -ENOTSUP,
						   "config.json: topk_method '%s' is not supported (greedy, group_limited_greedy, noaux_tc)",
						   v ? v : "?");
				goto out;
			}
		} else if (m->n_group > 1) {
			m->topk_method = MOE_TOPK_GROUP_LIMITED;
		}
		break;
	}
	default:
		rc = moe_error_set(err, -ENOTSUP, "family %s is not supported", moe_family_name(f));
		goto out;
	}
	rc = set_moe_layers(m, is_moe, err);
	if (rc < 0)
		goto out;
	/* the checkpoint must agree with the config about which layers have experts */
	for (uint32_t L = 0; L < m->n_layers; L++) {
		char name[160];
		if (f == MOE_FAMILY_GPT_OSS)
			snprintf(name, sizeof(name), "model.layers.%u.mlp.router.weight", L);
		else
			snprintf(name, sizeof(name), "model.layers.%u.%s.gate.weight", L,
				 f == MOE_FAMILY_MIXTRAL ? "block_sparse_moe" : "mlp");
		if (has_tensor(s, name) != is_moe[L]) {
			rc = moe_error_set(err, -EINVAL, "config.json says layer %u %s routed experts, but the checkpoint %s %s",
					   L, is_moe[L] ? "has" : "has no", is_moe[L] ? "lacks" : "has", name);
			goto out;
		}
	}
out:
	free(is_moe);
	json_decref(c);
	return rc;
}

/* ---- whole-model packs from safetensors: llama.cpp's names and keys ---- */

/* The GGUF architecture a family is run as (llama.cpp's names), or NULL
 * where whole-model packs from safetensors are not offered. */
static const char *hf_gguf_arch(enum moe_family f)
{
	switch (f) {
	case MOE_FAMILY_QWEN2_MOE: return "qwen2moe";
	case MOE_FAMILY_QWEN3_MOE: return "qwen3moe";
	case MOE_FAMILY_OLMOE: return "olmoe";
	case MOE_FAMILY_MIXTRAL: return "llama";
	default: return NULL;
	}
}

/* llama.cpp's GGUF name of an HF tensor (gguf-py's tensor_mapping for these
 * families); false when there is none. */
static bool hf_to_gguf_name(const char *hf, char *out, size_t len)
{
	static const struct { const char *hf, *gg; } glob[] = {
		{ "model.embed_tokens.weight", "token_embd.weight" },
		{ "model.norm.weight", "output_norm.weight" },
		{ "lm_head.weight", "output.weight" },
	};
	static const struct { const char *hf, *gg; } lay[] = {
		{ "input_layernorm.weight", "attn_norm.weight" },
		{ "post_attention_layernorm.weight", "ffn_norm.weight" },
		{ "self_attn.q_proj.weight", "attn_q.weight" },
		{ "self_attn.q_proj.bias", "attn_q.bias" },
		{ "self_attn.k_proj.weight", "attn_k.weight" },
		{ "self_attn.k_proj.bias", "attn_k.bias" },
		{ "self_attn.v_proj.weight", "attn_v.weight" },
		{ "self_attn.v_proj.bias", "attn_v.bias" },
		{ "self_attn.o_proj.weight", "attn_output.weight" },
		{ "self_attn.o_proj.bias", "attn_output.bias" },
		{ "self_attn.q_norm.weight", "attn_q_norm.weight" },
		{ "self_attn.k_norm.weight", "attn_k_norm.weight" },
		{ "mlp.gate.weight", "ffn_gate_inp.weight" },
		{ "block_sparse_moe.gate.weight", "ffn_gate_inp.weight" },
		{ "mlp.gate.e_score_correction_bias", "exp_probs_b.bias" },
		{ "mlp.shared_expert.gate_proj.weight", "ffn_gate_shexp.weight" },
		{ "mlp.shared_expert.up_proj.weight", "ffn_up_shexp.weight" },
		{ "mlp.shared_expert.down_proj.weight", "ffn_down_shexp.weight" },
		{ "mlp.shared_experts.gate_proj.weight", "ffn_gate_shexp.weight" },
		{ "mlp.shared_experts.up_proj.weight", "ffn_up_shexp.weight" },
		{ "mlp.shared_experts.down_proj.weight", "ffn_down_shexp.weight" },
		{ "mlp.shared_expert_gate.weight", "ffn_gate_inp_shexp.weight" },
		{ "mlp.gate_proj.weight", "ffn_gate.weight" },
		{ "mlp.up_proj.weight", "ffn_up.weight" },
		{ "mlp.down_proj.weight", "ffn_down.weight" },
	};
	unsigned L = 0;
	int n = 0;
	for (size_t i = 0; i < MOE_ARRAY_SIZE(glob); i++)
		if (strcmp(hf, glob[i].hf) == 0)
			return (size_t)snprintf(out, len, "%s", glob[i].gg) < len;
	if (sscanf(hf, "model.layers.%u.%n", &L, &n) != 1 || n == 0)
		return false;
	for (size_t i = 0; i < MOE_ARRAY_SIZE(lay); i++)
		if (strcmp(hf + n, lay[i].hf) == 0)
			return (size_t)snprintf(out, len, "blk.%u.%s", L, lay[i].gg) < len;
	return false;
}

static int cmp_ptr(const void *a, const void *b)
{
	uintptr_t x = (uintptr_t) * (const void *const *)a, y = (uintptr_t) * (const void *const *)b;
	return (x > y) - (x < y);
}

/* Array KV: header, then the caller puts count elements. */
static void kw_arr(struct kvw *k, const char *key, uint32_t elem, uint64_t count)
{
	kw_key(k, key, GGUF_TYPE_ARRAY);
	ob_u32(&k->b, elem);
	ob_u64(&k->b, count);
}

static void kw_elem_str(struct kvw *k, const char *v)
{
	struct gguf_str vs = { strlen(v), (char *)v };
	ob_str(&k->b, &vs);
}

/* config.json integer -> u32 KV, when present. */
static int kw_cfg_u32(struct kvw *k, json_t *c, const char *arch, const char *key, const char *jkey,
		      struct moe_error *err)
{
	uint32_t v;
	char full[128];
	int rc = j_u32(c, jkey, &v, err);
	if (rc == 0) {
		snprintf(full, sizeof(full), "%s.%s", arch, key);
		kw_u32(k, full, v);
	}
	return rc < 0 ? rc : 0;
}

static int kw_cfg_f32(struct kvw *k, json_t *c, const char *arch, const char *key, const char *jkey,
		      struct moe_error *err)
{
	float v;
	char full[128];
	int rc = j_f32(c, jkey, &v, err);
	if (rc == 0) {
		snprintf(full, sizeof(full), "%s.%s", arch, key);
		kw_f32(k, full, v);
	}
	return rc < 0 ? rc : 0;
}

/* Id of a token string, through the BPE vocab or the added tokens; -1. */
static json_int_t tok_id(json_t *vocab, json_t *added, const char *tok)
{
	json_t *v = json_object_get(vocab, tok);
	size_t i;
	json_t *a;
	if (json_is_integer(v))
		return json_integer_value(v);
	json_array_foreach(added, i, a)
		if (json_is_string(json_object_get(a, "content")) &&
		    strcmp(json_string_value(json_object_get(a, "content")), tok) == 0)
			return json_integer_value(json_object_get(a, "id"));
	return -1;
}

/* A special token of tokenizer_config.json: a string or {"content": ...}. */
static const char *tc_token(json_t *tc, const char *key)
{
	json_t *v = json_object_get(tc, key);
	if (json_is_object(v))
		v = json_object_get(v, "content");
	return json_string_value(v);
}

/* tokenizer.json (HF "tokenizers", a BPE model) -> tokenizer.ggml.*, as
 * llama.cpp's converter writes them: byte-level BPE becomes "gpt2" with its
 * merges; BPE with byte_fallback (Mistral/Mixtral) becomes "llama" with
 * scores -id (SentencePiece BPE vocabularies are in merge order) and <0xXX>
 * tokens typed BYTE. Missing ids up to vocab_size are [PADi] (UNUSED).
 * No tokenizer.json: nothing (moe-run then takes token ids). */
static int hf_tokenizer_kv(struct kvw *k, const char *dir, json_t *c, enum moe_family f, bool progress,
			   struct moe_error *err)
{
	enum { T_NORMAL = 1, T_UNKNOWN = 2, T_CONTROL = 3, T_USER = 4, T_UNUSED = 5, T_BYTE = 6 };
	char path[4200];
	json_error_t je;
	json_t *t, *tc, *model, *vocab, *merges, *added, *v;
	const char *key;
	char **tokens = NULL;
	int32_t *types = NULL;
	uint64_t n = 0;
	uint32_t cfg_vocab = 0;
	int rc = 0;
	size_t i;

	snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
	if (access(path, R_OK) < 0) {
		if (progress)
			fprintf(stderr, "moe-pack: note: no tokenizer.json next to config.json: the pack has no vocabulary\n");
		return 0;
	}
	if (!(t = json_load_file(path, 0, &je)))
		return moe_error_set(err, -EINVAL, "%s: %s (line %d)", path, je.text, je.line);
	snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
	tc = json_load_file(path, 0, &je); /* optional */
	model = json_object_get(t, "model");
	vocab = json_object_get(model, "vocab");
	merges = json_object_get(model, "merges");
	added = json_object_get(t, "added_tokens");
	bool fallback = json_is_true(json_object_get(model, "byte_fallback"));
	if (!json_is_string(json_object_get(model, "type")) || strcmp(json_string_value(json_object_get(model, "type")), "BPE") ||
	    !json_is_object(vocab) || (!fallback && !json_is_array(merges))) {
		rc = moe_error_set(err, -ENOTSUP, "%s/tokenizer.json: only BPE tokenizers (with vocab and merges) are converted",
				   dir);
		goto out;
	}
	if ((rc = j_u32(c, "vocab_size", &cfg_vocab, err)) < 0)
		goto out;
	rc = 0;
	json_object_foreach(vocab, key, v)
		if (json_is_integer(v) && json_integer_value(v) >= 0 && (uint64_t)json_integer_value(v) + 1 > n)
			n = (uint64_t)json_integer_value(v) + 1;
	json_array_foreach(added, i, v) {
		json_int_t id = json_integer_value(json_object_get(v, "id"));
		if (id >= 0 && (uint64_t)id + 1 > n)
			n = (uint64_t)id + 1;
	}
	n = MOE_MAX(n, (uint64_t)cfg_vocab);
	if (n == 0 || n > (1u << 24)) {
		rc = moe_error_set(err, -EINVAL, "%s/tokenizer.json: %" PRIu64 " tokens", dir, n);
		goto out;
	}
	tokens = calloc(n, sizeof(*tokens));
	types = calloc(n, sizeof(*types));
	if (!tokens || !types) {
		rc = moe_error_set(err, -ENOMEM, "out of memory");
		goto out;
	}
	json_object_foreach(vocab, key, v) {
		json_int_t id = json_integer_value(v);
		if (!json_is_integer(v) || id < 0) {
			rc = moe_error_set(err, -EINVAL, "%s/tokenizer.json: token %s has a bad id", dir, key);
			goto out;
		}
		tokens[id] = (char *)key;
		types[id] = fallback && strlen(key) == 6 && strncmp(key, "<0x", 3) == 0 && key[5] == '>' ? T_BYTE : T_NORMAL;
	}
	json_array_foreach(added, i, v) {
		json_int_t id = json_integer_value(json_object_get(v, "id"));
		const char *content = json_string_value(json_object_get(v, "content"));
		if (id < 0 || !content) {
			rc = moe_error_set(err, -EINVAL, "%s/tokenizer.json: added token %zu has no id or content", dir, i);
			goto out;
		}
		tokens[id] = (char *)content;
		types[id] = json_is_true(json_object_get(v, "special")) ? T_CONTROL : T_USER;
	}
	if (fallback) {
		const char *unk = json_string_value(json_object_get(model, "unk_token"));
		json_int_t u = unk ? tok_id(vocab, added, unk) : -1;
		if (u >= 0 && (uint64_t)u < n)
			types[u] = T_UNKNOWN;
	}
	kw_str(k, "tokenizer.ggml.model", fallback ? "llama" : "gpt2");
	if (!fallback)
		kw_str(k, "tokenizer.ggml.pre", f == MOE_FAMILY_OLMOE ? "olmo"
					 : (f == MOE_FAMILY_QWEN2_MOE || f == MOE_FAMILY_QWEN3_MOE) ? "qwen2" : "default");
	kw_arr(k, "tokenizer.ggml.tokens", GGUF_TYPE_STRING, n);
	for (uint64_t j = 0; j < n; j++) {
		char pad[32];
		if (!tokens[j]) {
			snprintf(pad, sizeof(pad), "[PAD%" PRIu64 "]", j);
			types[j] = T_UNUSED;
		}
		kw_elem_str(k, tokens[j] ? tokens[j] : pad);
	}
	if (fallback) {
		kw_arr(k, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, n);
		for (uint64_t j = 0; j < n; j++) {
			float sc = types[j] == T_NORMAL ? -(float)j : 0.0f;
			ob_put(&k->b, &sc, 4);
		}
	}
	kw_arr(k, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, n);
	ob_put(&k->b, types, n * sizeof(*types));
	if (fallback) {
		/* SentencePiece's word boundary: a Prepend("\u2581") normalizer or a
		 * Metaspace pre-tokenizer that prepends (llama.cpp: add_space_prefix) */
		json_t *nz = json_object_get(t, "normalizer"), *pt = json_object_get(t, "pre_tokenizer"), *x;
		bool prefix = false;
		json_t *nl = json_object_get(nz, "normalizers");
		if (!json_is_array(nl)) {
			nl = json_array();
			json_array_append(nl, nz);
		} else {
			json_incref(nl);
		}
		json_array_foreach(nl, i, x)
			prefix |= json_is_string(json_object_get(x, "type")) &&
				  !strcmp(json_string_value(json_object_get(x, "type")), "Prepend") &&
				  json_is_string(json_object_get(x, "prepend")) &&
				  !strcmp(json_string_value(json_object_get(x, "prepend")), "\xe2\x96\x81");
		json_decref(nl);
		if (json_is_string(json_object_get(pt, "type")) && !strcmp(json_string_value(json_object_get(pt, "type")), "Metaspace")) {
			const char *ps = json_string_value(json_object_get(pt, "prepend_scheme"));
			prefix |= ps ? strcmp(ps, "never") != 0 : json_is_true(json_object_get(pt, "add_prefix_space"));
		}
		kw_bool(k, "tokenizer.ggml.add_space_prefix", prefix);
	}
	/* merges: byte-level BPE only (SentencePiece ranks by score) */
	if (!fallback && json_is_array(merges) && json_array_size(merges)) {
		kw_arr(k, "tokenizer.ggml.merges", GGUF_TYPE_STRING, json_array_size(merges));
		json_array_foreach(merges, i, v) {
			char m[1024];
			if (json_is_string(v)) {
				kw_elem_str(k, json_string_value(v));
			} else if (json_is_array(v) && json_array_size(v) == 2 && json_is_string(json_array_get(v, 0)) &&
				   json_is_string(json_array_get(v, 1))) {
				/* the newer [a, b] form */
				snprintf(m, sizeof(m), "%s %s", json_string_value(json_array_get(v, 0)),
					 json_string_value(json_array_get(v, 1)));
				kw_elem_str(k, m);
			} else {
				rc = moe_error_set(err, -EINVAL, "%s/tokenizer.json: merge %zu is neither \"a b\" nor [a, b]", dir, i);
				goto out;
			}
		}
	}
	/* special ids: tokenizer_config.json's strings, else config.json (the
	 * order of gguf-py's SpecialVocab) */
	static const char *const specials[][3] = {
		{ "bos_token_id", "bos_token", "tokenizer.ggml.bos_token_id" },
		{ "eos_token_id", "eos_token", "tokenizer.ggml.eos_token_id" },
		{ "pad_token_id", "pad_token", "tokenizer.ggml.padding_token_id" },
	};
	for (size_t j = 0; j < MOE_ARRAY_SIZE(specials); j++) {
		json_t *x = json_object_get(c, specials[j][0]);
		json_int_t id = -1;
		if (tc && tc_token(tc, specials[j][1]))
			id = tok_id(vocab, added, tc_token(tc, specials[j][1]));
		if (id < 0 && json_is_integer(x))
			id = json_integer_value(x);
		else if (id < 0 && json_is_array(x) && json_is_integer(json_array_get(x, 0)))
			id = json_integer_value(json_array_get(x, 0));
		if (id >= 0 && (uint64_t)id < n)
			kw_u32(k, specials[j][2], (uint32_t)id);
	}
	if (fallback) {
		const char *unk = json_string_value(json_object_get(model, "unk_token"));
		json_int_t u = unk ? tok_id(vocab, added, unk) : -1;
		if (u >= 0 && (uint64_t)u < n)
			kw_u32(k, "tokenizer.ggml.unknown_token_id", (uint32_t)u);
	}
	if (tc && json_is_boolean(json_object_get(tc, "add_bos_token")))
		kw_bool(k, "tokenizer.ggml.add_bos_token", json_is_true(json_object_get(tc, "add_bos_token")));
	if (tc && json_is_boolean(json_object_get(tc, "add_eos_token")))
		kw_bool(k, "tokenizer.ggml.add_eos_token", json_is_true(json_object_get(tc, "add_eos_token")));
	if (tc && json_is_string(json_object_get(tc, "chat_template")))
		kw_str(k, "tokenizer.chat_template", json_string_value(json_object_get(tc, "chat_template")));
out:
	free(tokens);
	free(types);
	json_decref(tc);
	json_decref(t);
	return rc;
}

/* ---- SentencePiece tokenizer.model (protobuf) ---- */

static bool pb_varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
	*v = 0;
	for (int sh = 0; sh < 64 && *p < end; sh += 7) {
		uint8_t b = *(*p)++;
		*v |= (uint64_t)(b & 0x7f) << sh;
		if (!(b & 0x80))
			return true;
	}
	return false;
}

/* Skips a field of wire type wt; false when it runs past end. */
static bool pb_skip(const uint8_t **p, const uint8_t *end, uint32_t wt)
{
	uint64_t v;
	switch (wt) {
	case 0: return pb_varint(p, end, &v);
	case 1: if (end - *p < 8) return false; *p += 8; return true;
	case 5: if (end - *p < 4) return false; *p += 4; return true;
	case 2:
		if (!pb_varint(p, end, &v) || v > (uint64_t)(end - *p))
			return false;
		*p += v;
		return true;
	default: return false;
	}
}

struct sp_piece {
	const char *s; /* into the file buffer, not terminated */
	uint32_t len;
	float score;
	int32_t type;  /* sentencepiece's Type: NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6 */
};

/* ModelProto: repeated SentencePiece pieces = 1 {piece = 1, score = 2,
 * type = 3}; NormalizerSpec normalizer_spec = 3 {add_dummy_prefix = 3}. */
static int sp_parse(const uint8_t *buf, size_t len, struct sp_piece **out, uint32_t *n_out, bool *dummy_prefix,
		    struct moe_error *err)
{
	const uint8_t *p = buf, *end = buf + len;
	struct sp_piece *v = NULL;
	uint32_t n = 0, cap = 0;
	*dummy_prefix = true;
	while (p < end) {
		uint64_t key, l;
		if (!pb_varint(&p, end, &key))
			goto bad;
		uint32_t field = (uint32_t)(key >> 3), wt = key & 7;
		if ((field != 1 && field != 3) || wt != 2) {
			if (!pb_skip(&p, end, wt))
				goto bad;
			continue;
		}
		if (!pb_varint(&p, end, &l) || l > (uint64_t)(end - p))
			goto bad;
		const uint8_t *q = p, *qe = p + l;
		p = qe;
		if (field == 3) {
			while (q < qe) {
				uint64_t k2, x;
				if (!pb_varint(&q, qe, &k2))
					goto bad;
				if (k2 == (3 << 3 | 0)) {
					if (!pb_varint(&q, qe, &x))
						goto bad;
					*dummy_prefix = x != 0;
				} else if (!pb_skip(&q, qe, k2 & 7)) {
					goto bad;
				}
			}
			continue;
		}
		if (n == cap) {
			cap = cap ? cap * 2 : 1024;
			void *nv = cap > (1u << 24) ? NULL : realloc(v, cap * sizeof(*v));
			if (!nv) {
				free(v);
				return moe_error_set(err, -ENOMEM, "tokenizer.model: out of memory");
			}
			v = nv;
		}
		struct sp_piece *sp = &v[n++];
		*sp = (struct sp_piece){ .s = "", .len = 0, .score = 0.0f, .type = 1 };
		while (q < qe) {
			uint64_t k2, x;
			if (!pb_varint(&q, qe, &k2))
				goto bad;
			if (k2 == (1 << 3 | 2)) {
				if (!pb_varint(&q, qe, &x) || x > (uint64_t)(qe - q) || x > 4096)
					goto bad;
				sp->s = (const char *)q;
				sp->len = (uint32_t)x;
				q += x;
			} else if (k2 == (2 << 3 | 5)) {
				if (qe - q < 4)
					goto bad;
				memcpy(&sp->score, q, 4);
				q += 4;
			} else if (k2 == (3 << 3 | 0)) {
				if (!pb_varint(&q, qe, &x) || x < 1 || x > 6)
					goto bad;
				sp->type = (int32_t)x;
			} else if (!pb_skip(&q, qe, k2 & 7)) {
				goto bad;
			}
		}
	}
	if (n == 0)
		goto bad;
	*out = v;
	*n_out = n;
	return 0;
bad:
	free(v);
	return moe_error_set(err, -EINVAL, "tokenizer.model: not a SentencePiece model (bad protobuf)");
}

static void kw_elem_bytes(struct kvw *k, const char *s, size_t len)
{
	struct gguf_str vs = { len, (char *)s };
	ob_str(&k->b, &vs);
}

/* tokenizer.model -> "llama" tokenizer.ggml.*, as llama.cpp's converter
 * (_create_vocab_sentencepiece) makes it: the pieces, their scores, types
 * NORMAL except UNKNOWN, CONTROL, UNUSED and BYTE pieces;
 * tokenizer_config.json's added_tokens_decoder retypes ids (CONTROL when
 * special, else USER_DEFINED, score -1000); [PADi] up to vocab_size;
 * add_space_prefix from the normalizer's add_dummy_prefix. Returns 1 when
 * there is no tokenizer.model. */
static int sp_tokenizer_kv(struct kvw *k, const char *dir, json_t *c, struct moe_error *err)
{
	enum { T_NORMAL = 1, T_UNKNOWN = 2, T_CONTROL = 3, T_USER = 4, T_UNUSED = 5 };
	char path[4200];
	uint8_t *buf = NULL;
	size_t len = 0;
	struct sp_piece *pc = NULL;
	uint32_t n = 0, cfg_vocab = 0;
	bool prefix;
	json_error_t je;
	json_t *tc = NULL;
	int rc;

	snprintf(path, sizeof(path), "%s/tokenizer.model", dir);
	FILE *f = fopen(path, "rb");
	if (!f)
		return 1;
	long fl = -1;
	if (fseek(f, 0, SEEK_END) == 0)
		fl = ftell(f);
	rewind(f);
	if (fl <= 0 || fl > (64l << 20) || !(buf = malloc((size_t)fl)) || fread(buf, 1, (size_t)fl, f) != (size_t)fl) {
		fclose(f);
		free(buf);
		return moe_error_set(err, -EINVAL, "%s: cannot read it (or larger than 64 MiB)", path);
	}
	fclose(f);
	len = (size_t)fl;
	if ((rc = sp_parse(buf, len, &pc, &n, &prefix, err)) < 0) {
		free(buf);
		return moe_error_prefix(err, rc, "%s", dir);
	}
	if ((rc = j_u32(c, "vocab_size", &cfg_vocab, err)) < 0)
		goto out;
	uint32_t total = MOE_MAX(n, cfg_vocab);
	struct sp_piece *t = calloc(total, sizeof(*t));
	if (!t) {
		rc = moe_error_set(err, -ENOMEM, "out of memory");
		goto out;
	}
	for (uint32_t i = 0; i < n; i++) {
		int32_t ty = pc[i].type;
		t[i].s = pc[i].s;
		t[i].len = pc[i].len;
		t[i].score = pc[i].score;
		t[i].type = ty == 2 || ty == 3 || ty == 5 || ty == 6 ? ty : T_NORMAL;
	}
	for (uint32_t i = n; i < total; i++)
		t[i] = (struct sp_piece){ NULL, 0, -1000.0f, T_UNUSED };
	snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
	tc = json_load_file(path, 0, &je);
	json_t *dec = json_object_get(tc, "added_tokens_decoder");
	const char *key;
	json_t *v;
	json_object_foreach(dec, key, v) {
		char *e;
		unsigned long id = strtoul(key, &e, 10);
		const char *content = json_string_value(json_object_get(v, "content"));
		if (*e || id >= total || !content)
			continue;
		t[id].s = content;
		t[id].len = (uint32_t)strlen(content);
		t[id].score = -1000.0f;
		t[id].type = json_is_true(json_object_get(v, "special")) ? T_CONTROL : T_USER;
	}
	kw_str(k, "tokenizer.ggml.model", "llama");
	kw_arr(k, "tokenizer.ggml.tokens", GGUF_TYPE_STRING, total);
	for (uint32_t i = 0; i < total; i++) {
		char pad[32];
		if (t[i].s) {
			kw_elem_bytes(k, t[i].s, t[i].len);
		} else {
			snprintf(pad, sizeof(pad), "[PAD%u]", i);
			kw_elem_str(k, pad);
		}
	}
	kw_arr(k, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, total);
	for (uint32_t i = 0; i < total; i++)
		ob_put(&k->b, &t[i].score, 4);
	kw_arr(k, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, total);
	for (uint32_t i = 0; i < total; i++)
		ob_put(&k->b, &t[i].type, 4);
	/* special ids: tokenizer_config.json's strings, else config.json */
	static const char *const specials[][3] = {
		{ "bos_token_id", "bos_token", "tokenizer.ggml.bos_token_id" },
		{ "eos_token_id", "eos_token", "tokenizer.ggml.eos_token_id" },
		{ "unk_token_id", "unk_token", "tokenizer.ggml.unknown_token_id" },
		{ "pad_token_id", "pad_token", "tokenizer.ggml.padding_token_id" },
	};
	for (size_t j = 0; j < MOE_ARRAY_SIZE(specials); j++) {
		const char *ts = tc ? tc_token(tc, specials[j][1]) : NULL;
		json_t *x = json_object_get(c, specials[j][0]);
		int64_t id = -1;
		for (uint32_t i = 0; ts && i < total && id < 0; i++)
			if (t[i].s && t[i].len == strlen(ts) && memcmp(t[i].s, ts, t[i].len) == 0)
				id = i;
		if (id < 0 && json_is_integer(x))
			id = json_integer_value(x);
		if (id >= 0 && id < total)
			kw_u32(k, specials[j][2], (uint32_t)id);
	}
	if (tc && json_is_boolean(json_object_get(tc, "add_bos_token")))
		kw_bool(k, "tokenizer.ggml.add_bos_token", json_is_true(json_object_get(tc, "add_bos_token")));
	if (tc && json_is_boolean(json_object_get(tc, "add_eos_token")))
		kw_bool(k, "tokenizer.ggml.add_eos_token", json_is_true(json_object_get(tc, "add_eos_token")));
	kw_bool(k, "tokenizer.ggml.add_space_prefix", prefix);
	if (tc && json_is_string(json_object_get(tc, "chat_template")))
		kw_str(k, "tokenizer.chat_template", json_string_value(json_object_get(tc, "chat_template")));
	/* the strings point into buf and tc: written above, before they go */
	free(t);
	rc = 0;
out:
	json_decref(tc);
	free(pc);
	free(buf);
	return rc;
}

/* config.json -> the {arch}.* keys llama.cpp's converter writes. */
static int hf_build_kv(struct convert_source *s, json_t *c, const char *arch, struct moe_error *err)
{
	const struct moe_model_config *m = &s->model;
	struct kvw k = { 0 };
	char full[128];
	int rc;

	kw_str(&k, "general.architecture", arch);
	kw_str(&k, "general.name", m->name);
#define U(key, jkey) ((rc = kw_cfg_u32(&k, c, arch, key, jkey, err)) < 0)
#define F(key, jkey) ((rc = kw_cfg_f32(&k, c, arch, key, jkey, err)) < 0)
	if (U("context_length", "max_position_embeddings") || U("embedding_length", "hidden_size") ||
	    U("block_count", "num_hidden_layers") || U("feed_forward_length", "intermediate_size") ||
	    U("attention.head_count", "num_attention_heads") || U("attention.head_count_kv", "num_key_value_heads") ||
	    U("attention.key_length", "head_dim") || U("attention.value_length", "head_dim") ||
	    F("rope.freq_base", "rope_theta") || F("attention.layer_norm_rms_epsilon", "rms_norm_eps"))
		goto fail;
	snprintf(full, sizeof(full), "%s.expert_count", arch);
	kw_u32(&k, full, m->n_experts);
	snprintf(full, sizeof(full), "%s.expert_used_count", arch);
	kw_u32(&k, full, m->top_k);
	switch (m->family) {
	case MOE_FAMILY_QWEN2_MOE:
		if (U("expert_shared_feed_forward_length", "shared_expert_intermediate_size"))
			goto fail;
		/* fall through */
	case MOE_FAMILY_QWEN3_MOE:
		if (U("expert_feed_forward_length", "moe_intermediate_size"))
			goto fail;
		break;
	case MOE_FAMILY_OLMOE:
		if (F("attention.clamp_kqv", "clip_qkv"))
			goto fail;
		break;
	case MOE_FAMILY_MIXTRAL: {
		uint32_t heads = 0, hd = 0;
		if (U("vocab_size", "vocab_size"))
			goto fail;
		if (j_u32(c, "head_dim", &hd, err) != 0 && j_u32(c, "num_attention_heads", &heads, err) == 0 && heads)
			hd = m->hidden / heads;
		if (hd) {
			snprintf(full, sizeof(full), "%s.rope.dimension_count", arch);
			kw_u32(&k, full, hd);
		}
		break;
	}
	default:
		break;
	}
#undef U
#undef F
	json_t *rs = json_object_get(c, "rope_scaling");
	if (json_is_object(rs)) {
		const char *type = json_string_value(json_object_get(rs, "type"));
		if (!type)
			type = json_string_value(json_object_get(rs, "rope_type"));
		if (!type || (strcmp(type, "linear") && strcmp(type, "yarn"))) {
			rc = moe_error_set(err, -ENOTSUP, "config.json: rope_scaling type %s is not converted (linear, yarn)",
					   type ? type : "?");
			goto fail;
		}
		snprintf(full, sizeof(full), "%s.rope.scaling.type", arch);
		kw_str(&k, full, type);
		if (json_is_number(json_object_get(rs, "factor"))) {
			snprintf(full, sizeof(full), "%s.rope.scaling.factor", arch);
			kw_f32(&k, full, (float)json_number_value(json_object_get(rs, "factor")));
		}
		if (json_is_integer(json_object_get(rs, "original_max_position_embeddings"))) {
			snprintf(full, sizeof(full), "%s.rope.scaling.original_context_length", arch);
			kw_u32(&k, full, (uint32_t)json_integer_value(json_object_get(rs, "original_max_position_embeddings")));
		}
	}
	/* Mixtral: the SentencePiece model when there is one (llama.cpp's
	 * converter prefers it), else tokenizer.json */
	rc = m->family == MOE_FAMILY_MIXTRAL ? sp_tokenizer_kv(&k, s->hf_dir, c, err) : 1;
	if (rc == 1)
		rc = hf_tokenizer_kv(&k, s->hf_dir, c, m->family, s->progress, err);
	if (rc < 0)
		goto fail;
	return kw_finish(s, &k, err);
fail:
	free(k.b.p);
	return rc;
}

/* Writes a q/k projection with each head's rows in llama.cpp's order: HF
 * keeps the two RoPE halves of a head apart (rotate_half), llama.cpp's
 * "llama" graph rotates adjacent pairs, so its converter moves HF row
 * a * d/2 + j of a head to row 2j + a (convert_hf_to_gguf.py's permute). */
static int stream_rope_perm(struct convert_source *s, const struct resident *x, struct pack_writer *w,
			    struct moe_error *err)
{
	const uint64_t rows = x->t.shape[0], d = x->perm_head, rb = x->t.bytes / rows;
	const size_t blk = (size_t)(d * rb);
	uint8_t *a, *o;
	int rc = 0;
	if (!(a = grow(s, 0, blk, err)) || !(o = grow(s, 2, blk, err)))
		return -ENOMEM;
	for (uint64_t h = 0; h < rows / d && rc == 0; h++) {
		rc = src_read(s, &x->t, h * blk, a, blk, err);
		for (uint64_t r = 0; r < d && rc == 0; r++)
			memcpy(o + r * rb, a + ((r & 1) * (d / 2) + r / 2) * rb, (size_t)rb);
		if (rc == 0)
			rc = pack_writer_write(w, o, blk, err);
	}
	return rc;
}

/* Whole-model packs from safetensors: the same tensors and names a GGUF of
 * the model would hold (routers and shared experts renamed too), q/k rows
 * reordered for "llama", and gguf.kv synthesized from config.json and
 * tokenizer.json. */
static int collect_dense_hf(struct convert_source *s, struct moe_error *err)
{
	const struct moe_model_config *m = &s->model;
	const char *arch = hf_gguf_arch(m->family);
	const struct safetensors_tensor **used = NULL;
	size_t n_used = 0, cap;
	uint32_t n_res0 = s->n_res, heads = 0, kv_heads = 0;
	struct recipe r[PACK_MAX_PARTS];
	char cfg[4200];
	json_error_t je;
	json_t *c = NULL;
	int rc = 0;

	if (!arch) {
		if (s->progress)
			fprintf(stderr, "moe-pack: note: whole-model packs from safetensors are made for qwen2_moe, qwen3_moe, "
				"olmoe and mixtral; this %s pack holds the experts, routers and shared experts\n",
				moe_family_name(m->family));
		return 0;
	}
	snprintf(cfg, sizeof(cfg), "%s/config.json", s->hf_dir);
	if (!(c = json_load_file(cfg, 0, &je)))
		return moe_error_set(err, -EINVAL, "%s: %s (line %d)", cfg, je.text, je.line);
	if ((rc = j_need_u32(c, "num_attention_heads", &heads, err)) < 0)
		goto out;
	kv_heads = heads;
	if ((rc = j_u32(c, "num_key_value_heads", &kv_heads, err)) < 0)
		goto out;
	rc = 0;
	if (!heads || !kv_heads) {
		rc = moe_error_set(err, -EINVAL, "config.json: num_attention_heads / num_key_value_heads must be >= 1");
		goto out;
	}
	/* the source tensors of the extents (one per expert and part) */
	uint32_t per_expert = s->layout == LAY_HF_MLP || s->layout == LAY_HF_MIXTRAL ? m->n_experts : 1;
	cap = (size_t)m->n_moe_layers * per_expert * 2 * PACK_MAX_PARTS;
	if (!(used = malloc(cap * sizeof(*used)))) {
		rc = moe_error_set(err, -ENOMEM, "out of memory");
		goto out;
	}
	for (uint32_t l = 0; l < m->n_moe_layers && rc == 0; l++)
		for (uint32_t e = 0; e < per_expert && rc == 0; e++) {
			uint32_t n = 0;
			if ((rc = expert_recipes(s, l, e, r, &n, err)) < 0)
				break;
			for (uint32_t i = 0; i < n; i++) {
				if (r[i].a.st)
					used[n_used++] = r[i].a.st;
				if (r[i].b.st)
					used[n_used++] = r[i].b.st;
			}
		}
	if (rc < 0)
		goto out;
	qsort(used, n_used, sizeof(*used), cmp_ptr);
	for (uint32_t i = 0; i < s->st->n_tensors && rc == 0; i++) {
		const struct safetensors_tensor *st = s->st->tensors[i];
		struct stensor t;
		bool res = false;
		if (bsearch(&st, used, n_used, sizeof(*used), cmp_ptr))
			continue;
		for (uint32_t j = 0; j < n_res0 && !res; j++)
			res = s->res[j].t.st == st;
		if (res)
			continue;
		size_t nl = strlen(st->name);
		if (nl >= 20 && strcmp(st->name + nl - 20, ".rotary_emb.inv_freq") == 0)
			continue; /* a buffer old checkpoints saved; llama.cpp skips it too */
		find_tensor(s, st->name, &t);
		if (!weight_dtype_ok(t.dtype) || moe_dtype_is_quantized(t.dtype)) {
			rc = moe_error_set(err, -ENOTSUP,
					   "tensor %s has type %s; a whole-model pack from safetensors holds f32, f16 and bf16 "
					   "tensors (--experts-only leaves the dense tensors out)",
					   st->name, st->dtype_str);
			break;
		}
		rc = push_resident(s, &t, PACK_ROLE_OTHER, name_layer(s, st->name), NULL, err);
	}
	/* every resident under its GGUF name */
	for (uint32_t i = 0; i < s->n_res && rc == 0; i++) {
		struct resident *x = &s->res[i];
		char *pn = x->pname;
		if (!hf_to_gguf_name(x->t.name, pn, sizeof(x->pname))) {
			rc = moe_error_set(err, -ENOTSUP,
					   "tensor %s: no llama.cpp name is known for it (--experts-only packs the experts, routers "
					   "and shared experts only)",
					   x->t.name);
			break;
		}
		size_t pl = strlen(pn);
		if (x->t.n_dims == 2 && x->t.shape[0] == 1 && pl >= 25 && strcmp(pn + pl - 25, "ffn_gate_inp_shexp.weight") == 0) {
			/* [1, n] -> [n], GGUF's shape */
			x->t.n_dims = 1;
			x->t.shape[0] = x->t.shape[1];
			x->t.shape[1] = 0;
		}
		bool q = pl > 13 && strcmp(pn + pl - 13, "attn_q.weight") == 0;
		bool kk = pl > 13 && strcmp(pn + pl - 13, "attn_k.weight") == 0;
		if (m->family == MOE_FAMILY_MIXTRAL && (q || kk)) {
			uint64_t hn = q ? heads : kv_heads, rows = x->t.shape[0];
			if (x->t.n_dims != 2 || rows % hn || (rows / hn) % 2) {
				rc = moe_error_set(err, -EINVAL, "tensor %s: %" PRIu64 " rows are not %" PRIu64 " heads of an even width",
						   x->t.name, rows, hn);
				break;
			}
			x->perm_head = (uint32_t)(rows / hn);
		}
	}
	/* two source tensors must not land on one name */
	for (uint32_t i = 0; i < s->n_res && rc == 0; i++)
		for (uint32_t j = i + 1; j < s->n_res && rc == 0; j++)
			if (strcmp(s->res[i].pname, s->res[j].pname) == 0)
				rc = moe_error_set(err, -EINVAL, "tensors %s and %s both map to %s", s->res[i].t.name,
						   s->res[j].t.name, s->res[i].pname);
	if (rc == 0)
		rc = hf_build_kv(s, c, arch, err);
	if (rc == 0) {
		struct stensor kv = { .name = PACK_KV_TENSOR, .dtype = MOE_DTYPE_U8, .n_dims = 1,
				      .shape = { s->kv_len }, .bytes = s->kv_len };
		rc = push_resident(s, &kv, PACK_ROLE_OTHER, UINT32_MAX, s->kv_image, err);
	}
out:
	free(used);
	json_decref(c);
	return rc;
}

static int collect_dense(struct convert_source *s, struct moe_error *err)
{
	return s->kind == SRC_GGUF ? collect_dense_gguf(s, err) : collect_dense_hf(s, err);
}

/* ---- model config: GGUF metadata ---- */

static int g_u32(const struct gguf_file *g, const char *arch, const char *key, uint32_t *out, struct moe_error *err)
{
	char k[160];
	snprintf(k, sizeof(k), "%s.%s", arch, key);
	int rc = gguf_get_u32(g, k, out);
	if (rc == -ENOENT)
		return 1;
	if (rc < 0)
		return moe_error_set(err, rc, "GGUF key %s: %s", k, rc == -EINVAL ? "not an integer" : "out of range");
	return 0;
}

static int g_need_u32(const struct gguf_file *g, const char *arch, const char *key, uint32_t *out,
		      struct moe_error *err)
{
	int rc = g_u32(g, arch, key, out, err);
	if (rc == 1)
		return moe_error_set(err, -EINVAL, "GGUF key %s.%s is missing", arch, key);
	return rc;
}

static int gguf_config(struct convert_source *s, const struct convert_options *opt, struct moe_error *err)
{
	struct moe_model_config *m = &s->model;
	const struct gguf_file *g = s->gg;
	const char *arch = NULL;
	enum moe_family f;
	uint32_t leading = 0, gating = 0, ns = 0, ngroup = 0, ugroup = 0;
	char k[160], name[160];
	float scale;
	bool norm, *is_moe;
	int rc;

	if (gguf_get_str(g, "general.architecture", &arch, NULL) < 0)
		return moe_error_set(err, -EINVAL, "GGUF key general.architecture is missing or not a string");
	f = moe_family_parse(opt->family ? opt->family : arch);
	if (f == MOE_FAMILY_UNKNOWN)
		return moe_error_set(err, -ENOTSUP, "%s '%s' is not a supported MoE family%s",
				     opt->family ? "family" : "GGUF architecture", opt->family ? opt->family : arch,
				     opt->family ? "" : "; use --family to override");
	if ((rc = g_need_u32(g, arch, "block_count", &m->n_layers, err)) < 0 ||
	    (rc = g_need_u32(g, arch, "embedding_length", &m->hidden, err)) < 0 ||
	    (rc = g_need_u32(g, arch, "expert_count", &m->n_experts, err)) < 0 ||
	    (rc = g_need_u32(g, arch, "expert_used_count", &m->top_k, err)) < 0 ||
	    (rc = g_u32(g, arch, "leading_dense_block_count", &leading, err)) < 0 ||
	    (rc = g_u32(g, arch, "expert_gating_func", &gating, err)) < 0 ||
	    (rc = g_u32(g, arch, "expert_shared_count", &ns, err)) < 0 ||
	    (rc = g_u32(g, arch, "expert_group_count", &ngroup, err)) < 0 ||
	    (rc = g_u32(g, arch, "expert_group_used_count", &ugroup, err)) < 0)
		return rc;
	if (m->n_layers == 0 || m->n_layers > 1024)
		return moe_error_set(err, -EINVAL, "GGUF %s.block_count %u out of range", arch, m->n_layers);
	/* llama.cpp's model saver writes every hyper-parameter, so its llama
	 * (Mixtral) and olmoe files say expert_feed_forward_length = 0: their
	 * graphs size the experts by feed_forward_length, as for an absent key */
	rc = g_u32(g, arch, "expert_feed_forward_length", &m->expert_width, err);
	if (rc == 1 || (rc == 0 && m->expert_width == 0))
		rc = g_need_u32(g, arch, "feed_forward_length", &m->expert_width, err);
	if (rc < 0)
		return rc;
	if (m->expert_width == 0)
		return moe_error_set(err, -EINVAL, "GGUF %s.feed_forward_length is 0", arch);

	/* which layers have experts: from the tensors */
	is_moe = calloc(m->n_layers, sizeof(*is_moe));
	if (!is_moe)
		return moe_error_set(err, -ENOMEM, "out of memory");
	bool stacked = false, split = false;
	for (uint32_t L = 0; L < m->n_layers; L++) {
		/* stacked experts: gate, fused gate_up (deepseek2...), or up
		 * alone (an expert without a gate: refused with a message) */
		static const char *const stacks[3] = { "gate", "gate_up", "up" };
		bool a = false;
		for (int j = 0; j < 3 && !a; j++) {
			snprintf(name, sizeof(name), "blk.%u.ffn_%s_exps.weight", L, stacks[j]);
			a = has_tensor(s, name);
		}
		snprintf(name, sizeof(name), "blk.%u.ffn_gate.0.weight", L);
		bool b = has_tensor(s, name);
		is_moe[L] = a || b;
		stacked |= a;
		split |= b;
	}
	rc = set_moe_layers(m, is_moe, err);
	free(is_moe);
	if (rc < 0)
		return rc;
	if (stacked && split)
		return moe_error_set(err, -ENOTSUP, "GGUF mixes stacked (ffn_*_exps) and split (ffn_*.E) experts");
	s->layout = stacked ? LAY_GGUF_STACK : LAY_GGUF_SPLIT;
	if (leading && leading != m->first_moe_layer)
		return moe_error_set(err, -EINVAL, "GGUF %s.leading_dense_block_count is %u but the first expert layer is %u",
				     arch, leading, m->first_moe_layer);

	/* DeepSeek-V3 GGUFs say "deepseek2" too: sigmoid gating / score bias tell them apart */
	snprintf(name, sizeof(name), "blk.%u.exp_probs_b.bias", m->first_moe_layer);
	if (!opt->family && f == MOE_FAMILY_DEEPSEEK_V2 && (gating == 2 || has_tensor(s, name)))
		f = MOE_FAMILY_DEEPSEEK_V3;
	uint32_t keep[6] = { m->hidden, m->expert_width, m->n_experts, m->top_k, m->n_layers, m->first_moe_layer };
	uint32_t nm = m->n_moe_layers, step = m->moe_layer_step;
	moe_model_set_family_defaults(m, f);
	m->hidden = keep[0];
	m->expert_width = keep[1];
	m->n_experts = keep[2];
	m->top_k = keep[3];
	m->n_layers = keep[4];
	m->first_moe_layer = keep[5];
	m->n_moe_layers = nm;
	m->moe_layer_step = step;
	if (stacked && f != MOE_FAMILY_GPT_OSS && (rc = gguf_ffn_kind(s, m, err)) < 0)
		return rc;

	if (gating == 1)
		m->scoring = MOE_SCORING_SOFTMAX;
	else if (gating == 2)
		m->scoring = MOE_SCORING_SIGMOID;
	else if (gating != 0)
		return moe_error_set(err, -ENOTSUP, "GGUF %s.expert_gating_func %u is not supported (1 softmax, 2 sigmoid)",
				     arch, gating);
	/* llama.cpp's deepseek2 graph takes both from the keys, absent or 0
	 * meaning no scaling and no renormalisation (not the HF defaults) */
	bool ds = f == MOE_FAMILY_DEEPSEEK_V2 || f == MOE_FAMILY_DEEPSEEK_V3;
	if (ds) {
		m->routed_scaling_factor = 1.0f;
		m->norm_topk_prob = 0;
	}
	snprintf(k, sizeof(k), "%s.expert_weights_scale", arch);
	if (gguf_get_f32(g, k, &scale) == 0 && scale > 0)
		m->routed_scaling_factor = scale;
	snprintf(k, sizeof(k), "%s.expert_weights_norm", arch);
	if (gguf_get_bool(g, k, &norm) == 0)
		m->norm_topk_prob = norm;
	if (ngroup) {
		m->n_group = ngroup;
		m->topk_group = ugroup ? ugroup : 1;
		if (ngroup > 1)
			m->topk_method = MOE_TOPK_GROUP_LIMITED;
	}
	/* shared experts: the width from the tensors, the count from the keys */
	snprintf(name, sizeof(name), "blk.%u.ffn_gate_shexp.weight", m->first_moe_layer);
	struct stensor t;
	if (find_tensor(s, name, &t)) {
		if (t.n_dims != 2 || t.shape[0] == 0 || t.shape[0] > UINT32_MAX)
			return moe_error_set(err, -EINVAL, "tensor %s: unexpected shape", name);
		m->shared_width = (uint32_t)t.shape[0];
		if (f == MOE_FAMILY_QWEN2_MOE)
			m->n_shared_experts = 1;
		else
			m->n_shared_experts = ns ? ns
						 : (m->shared_width % m->expert_width == 0 ? m->shared_width / m->expert_width : 1);
	}
	return 0;
}

/* ---- open / write ---- */

/* The first 4 bytes of a regular file (magic, zero-filled when shorter);
 * true when they are GGUF's. */
static bool is_gguf_file(const char *path, char magic[4])
{
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
	bool yes = false;
	memset(magic, 0, 4);
	if (fd >= 0) {
		yes = pread(fd, magic, 4, 0) == 4 && memcmp(magic, "GGUF", 4) == 0;
		close(fd);
	}
	return yes;
}

static bool has_suffix_ci(const char *s, const char *suf)
{
	size_t a = strlen(s), b = strlen(suf);
	return a >= b && strcasecmp(s + a - b, suf) == 0;
}

static const char *file_kind(mode_t m)
{
	return S_ISFIFO(m) ? "a FIFO" : S_ISSOCK(m) ? "a socket" : S_ISCHR(m) ? "a character device"
	       : S_ISBLK(m) ? "a block device" : "not a file";
}

static void set_name(struct convert_source *s, const struct convert_options *opt, const char *fallback)
{
	const char *n = opt->name ? opt->name : fallback;
	snprintf(s->model.name, sizeof(s->model.name), "%s", n && *n ? n : "model");
}

static int open_source(struct convert_source *s, const char *src, const struct convert_options *opt,
		       struct moe_error *err)
{
	struct stat st;
	int rc;

	char magic[4];

	if (stat(src, &st) < 0)
		return moe_error_set(err, -errno, "%s: %s", src, strerror(errno));
	/* Refused before any open(): opening a FIFO for reading blocks until a
	 * writer comes, and a device is no checkpoint. */
	if (!S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode))
		return moe_error_set(err, -EINVAL, "%s: not a regular file or a directory (%s)", src,
				     file_kind(st.st_mode));
	bool gguf = S_ISREG(st.st_mode) && is_gguf_file(src, magic);
	/* Named .gguf but without the magic: say so, rather than the
	 * safetensors parser's view of its first 8 bytes. */
	if (S_ISREG(st.st_mode) && !gguf && has_suffix_ci(src, ".gguf")) {
		char shown[20];
		size_t o = 0;
		for (int i = 0; i < 4; i++)
			o += (size_t)snprintf(shown + o, sizeof(shown) - o, isprint((unsigned char)magic[i]) ? "%c" : "\\x%02x",
					      (unsigned char)magic[i]);
		return moe_error_set(err, -EINVAL, "%s: not a GGUF file (its first 4 bytes are \"%s\", not \"GGUF\")",
				     src, shown);
	}
	if (gguf) {
		const char *gname = NULL;
		s->kind = SRC_GGUF;
		/* the first part of a split model opens all of them */
		if ((rc = gguf_open_model(src, &s->gg, err)) < 0)
			return rc;
		if ((rc = gguf_config(s, opt, err)) < 0)
			return rc;
		gguf_get_str(s->gg, "general.name", &gname, NULL);
		char *dup = strdup(src), *base = basename(dup);
		char *dot = strrchr(base, '.');
		if (dot && dot != base)
			*dot = '\0';
		/* a split model is named as its unsplit file: no -00001-of-0000N */
		size_t bl = strlen(base);
		if (s->gg->n_parts > 1 && bl > 15 && strncmp(base + bl - 15, "-00001-of-", 10) == 0)
			base[bl - 15] = '\0';
		set_name(s, opt, gname ? gname : base);
		free(dup);
		return 0;
	}
	/* safetensors: config.json lives next to the weights */
	char *dup = strdup(src), *dir, cfg[4096], *base;
	if (!dup)
		return moe_error_set(err, -ENOMEM, "out of memory");
	dir = S_ISDIR(st.st_mode) ? dup : dirname(dup);
	snprintf(cfg, sizeof(cfg), "%s/config.json", dir);
	s->kind = SRC_ST;
	rc = safetensors_model_open(src, &s->st, err);
	if (rc == 0 && access(cfg, R_OK) < 0)
		rc = moe_error_set(err, -ENOENT, "%s: no config.json next to the weights (it gives the model shape)", dir);
	if (rc == 0)
		rc = hf_config(s, cfg, opt, err);
	if (rc == 0 && !(s->hf_dir = strdup(dir)))
		rc = moe_error_set(err, -ENOMEM, "out of memory");
	if (rc == 0) {
		char *d2 = strdup(dir);
		base = d2 ? basename(d2) : NULL;
		set_name(s, opt, base);
		free(d2);
	}
	free(dup);
	if (rc < 0)
		return rc;
	uint32_t F = s->model.first_moe_layer;
	char name[160];
	if (s->model.family == MOE_FAMILY_GPT_OSS) {
		snprintf(name, sizeof(name), "model.layers.%u.mlp.experts.gate_up_proj_blocks", F);
		s->layout = has_tensor(s, name) ? LAY_HF_GPTOSS_MX : LAY_HF_GPTOSS;
	} else {
		s->layout = s->model.family == MOE_FAMILY_MIXTRAL ? LAY_HF_MIXTRAL : LAY_HF_MLP;
	}
	return 0;
}

int convert_open(const char *src, const struct convert_options *opt, struct convert_source **out,
		 struct moe_error *err)
{
	static const struct convert_options none;
	struct convert_source *s = calloc(1, sizeof(*s));
	struct recipe r[PACK_MAX_PARTS];
	uint32_t n = 0;
	int rc;

	*out = NULL;
	if (!opt)
		opt = &none;
	if (!s)
		return moe_error_set(err, -ENOMEM, "out of memory");
	s->progress = opt->progress;
	s->path = strdup(src);
	rc = s->path ? open_source(s, src, opt, err) : moe_error_set(err, -ENOMEM, "out of memory");
	if (rc < 0)
		goto fail;
	if (s->model.family == MOE_FAMILY_GPT_OSS && s->layout != LAY_HF_GPTOSS && s->layout != LAY_HF_GPTOSS_MX &&
	    s->layout != LAY_GGUF_STACK) {
		rc = moe_error_set(err, -ENOTSUP, "gpt_oss experts must be stacked");
		goto fail;
	}
	/* the part layout is expert (0, 0)'s; every other expert must match it */
	rc = expert_recipes(s, 0, 0, r, &n, err);
	if (rc < 0)
		goto fail;
	for (uint32_t i = 0; i < n; i++)
		s->parts[i] = r[i].part;
	s->n_parts = n;
	s->model.dtype = r[0].part.dtype;
	if ((rc = collect_residents(s, err)) < 0)
		goto fail;
	if (!opt->experts_only && (rc = collect_dense(s, err)) < 0)
		goto fail;
	if ((rc = moe_model_validate(&s->model, err)) < 0) {
		moe_error_prefix(err, rc, "model config");
		goto fail;
	}
	/* Each layer's part layout, from its expert 0 (every expert of a layer
	 * must match it: write_expert). llama.cpp's *_K_M / *_K_S files give
	 * ffn_down more bits in some layers only: those layers get a layout of
	 * their own (a version 2 pack). Before any byte is written. */
	if (s->model.n_moe_layers > PACK_MAX_LAYER_MAP) {
		rc = moe_error_set(err, -ENOTSUP, "%u MoE layers: a pack holds at most %u", s->model.n_moe_layers,
				   PACK_MAX_LAYER_MAP);
		goto fail;
	}
	for (uint32_t l = 0; l < s->model.n_moe_layers; l++) {
		struct pack_layout_disk L;
		uint32_t n2 = 0, k;
		if ((rc = expert_recipes(s, l, 0, r, &n2, err)) < 0)
			goto fail;
		memset(&L, 0, sizeof(L));
		L.n_parts = n2;
		for (uint32_t i = 0; i < n2; i++) {
			L.parts[i] = r[i].part;
			L.payload += r[i].part.bytes;
		}
		for (k = 0; k < s->n_layouts; k++)
			if (memcmp(&s->layouts[k], &L, sizeof(L)) == 0)
				break;
		if (k == s->n_layouts) {
			if (k == PACK_MAX_LAYOUTS) {
				rc = moe_error_set(err, -ENOTSUP,
						   "layer %u (model layer %u): its experts' types (%s ...) make a %uth "
						   "expert layout; a pack holds at most %u",
						   l, moe_model_layer_of(&s->model, l), r[0].a.name, k + 1, PACK_MAX_LAYOUTS);
				goto fail;
			}
			s->layouts[s->n_layouts++] = L;
		}
		s->layer_layout[l] = (uint8_t)k;
	}
	*out = s;
	return 0;
fail:
	/* most messages already start with the path: say it once */
	if (!err || strncmp(err->msg, src, strlen(src)) != 0)
		moe_error_prefix(err, rc, "%s", src);
	convert_close(s);
	return rc;
}

void convert_close(struct convert_source *s)
{
	if (!s)
		return;
	safetensors_model_close(s->st);
	gguf_close(s->gg);
	for (int i = 0; i < 3; i++)
		free(s->buf[i]);
	free(s->res);
	free(s->kv_image);
	free(s->hf_dir);
	free(s->path);
	free(s);
}

const char *convert_source_kind(const struct convert_source *s)
{
	return s->kind == SRC_GGUF ? "gguf" : "safetensors";
}

const struct moe_model_config *convert_model(const struct convert_source *s)
{
	return &s->model;
}

uint32_t convert_parts(const struct convert_source *s, const struct pack_part_desc **parts)
{
	*parts = s->parts;
	return s->n_parts;
}

uint32_t convert_layouts(const struct convert_source *s, const struct pack_layout_disk **layouts,
			 const uint8_t **layer_layout)
{
	*layouts = s->layouts;
	*layer_layout = s->layer_layout;
	return s->n_layouts;
}

uint32_t convert_n_resident(const struct convert_source *s)
{
	return s->n_res;
}

static int write_expert(struct convert_source *s, struct pack_writer *w, uint32_t l, uint32_t e,
			struct convert_stats *st, struct moe_error *err)
{
	struct recipe r[PACK_MAX_PARTS];
	uint32_t n = 0;
	int rc = expert_recipes(s, l, e, r, &n, err);
	if (rc < 0)
		return rc;
	const struct pack_layout_disk *L = &s->layouts[s->layer_layout[l]];
	for (uint32_t i = 0; i < n; i++) {
		const struct pack_part_desc *want = &L->parts[i], *have = &r[i].part;
		if (n != L->n_parts || have->role != want->role || have->dtype != want->dtype || have->rows != want->rows ||
		    have->cols != want->cols)
			return moe_error_set(err, -ENOTSUP, "%s is %s [%u x %u], but the layer's expert 0 has %s [%u x %u]; "
					     "the experts of a layer must have the same layout",
					     r[i].a.name, moe_dtype_name(have->dtype), have->rows, have->cols,
					     moe_dtype_name(want->dtype), want->rows, want->cols);
	}
	if ((rc = pack_writer_begin_expert(w, l, e, err)) < 0)
		return rc;
	for (uint32_t i = 0; i < n && rc == 0; i++)
		rc = stream_recipe(s, &r[i], w, err);
	if (rc == 0)
		rc = pack_writer_end_expert(w, err);
	if (rc == 0) {
		st->experts++;
		for (uint32_t i = 0; i < n; i++)
			st->bytes += r[i].part.bytes;
	}
	return rc;
}

int convert_write(struct convert_source *s, const char *out, struct convert_stats *stp, struct moe_error *err)
{
	const struct moe_model_config *m = &s->model;
	struct pack_writer *w;
	struct convert_stats st = { 0 };
	int rc;

	rc = pack_writer_create_layers(out, m, s->layouts, s->n_layouts, s->layer_layout, convert_source_kind(s), &w, err);
	if (rc < 0)
		return rc;
	for (uint32_t l = 0; l < m->n_moe_layers && rc == 0; l++) {
		for (uint32_t e = 0; e < m->n_experts && rc == 0; e++) {
			rc = write_expert(s, w, l, e, &st, err);
			if (rc < 0)
				moe_error_prefix(err, rc, "layer %u (model layer %u) expert %u", l, moe_model_layer_of(m, l),
						 e);
		}
		if (rc == 0 && s->progress)
			fprintf(stderr, "moe-pack: layer %u/%u (model layer %u): %u experts\n", l + 1, m->n_moe_layers,
				moe_model_layer_of(m, l), m->n_experts);
	}
	for (uint32_t i = 0; i < s->n_res && rc == 0; i++) {
		const struct resident *x = &s->res[i];
		struct pack_tensor_entry t;
		struct recipe r = { .kind = R_COPY, .a = x->t };
		memset(&t, 0, sizeof(t));
		snprintf(t.name, sizeof(t.name), "%s", x->pname[0] ? x->pname : x->t.name);
		t.role = x->role;
		t.dtype = x->t.dtype;
		t.layer = x->layer;
		t.n_dims = x->t.n_dims;
		for (uint32_t d = 0; d < t.n_dims; d++)
			t.shape[d] = x->t.shape[d];
		r.part.bytes = x->t.bytes;
		rc = pack_writer_begin_tensor(w, &t, err);
		if (rc == 0 && x->mem)
			rc = pack_writer_write(w, x->mem, (size_t)x->t.bytes, err);
		else if (rc == 0 && x->perm_head)
			rc = stream_rope_perm(s, x, w, err);
		else if (rc == 0)
			rc = stream_recipe(s, &r, w, err);
		if (rc == 0)
			rc = pack_writer_end_tensor(w, err);
		if (rc == 0) {
			st.tensors++;
			st.bytes += x->t.bytes;
		}
	}
	if (rc < 0) {
		pack_writer_abort(w);
		return rc;
	}
	rc = pack_writer_finish(w, err);
	if (rc == 0 && stp)
		*stp = st;
	return rc;
}
