/* model.c - see model.h. */
#include "model.h"
#include "experts.h" /* EXPERTS_LAYOUT_PER_LAYER: whether experts.c takes model_layout() */
#include "latent.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int keep_blob(struct model *m, void *p)
{
	if (m->n_blobs == m->cap_blobs) {
		size_t cap = m->cap_blobs ? 2 * m->cap_blobs : 64;
		void **b = realloc(m->blobs, cap * sizeof(*b));
		if (!b)
			return -ENOMEM;
		m->blobs = b;
		m->cap_blobs = cap;
	}
	m->blobs[m->n_blobs++] = p;
	return 0;
}

static void *alloc_blob(struct model *m, size_t len)
{
	void *p = NULL;
	if (posix_memalign(&p, 64, len ? len : 1))
		return NULL;
	if (keep_blob(m, p)) {
		free(p);
		return NULL;
	}
	return p;
}

/* Loads tensor `name` (the pack's resident copy, else the GGUF's) into *mat.
 * 1-D tensors are widened to f32 (norms and biases are used element-wise);
 * a 3-D tensor (deepseek2's per-head attn_k_b, attn_v_b) is held as its
 * ne1*ne2 rows of ne0.
 * required: -ENOENT with a message when absent; else absent leaves data NULL. */
static int load(struct model *m, const char *name, bool required, struct model_mat *mat, struct moe_error *err)
{
	enum moe_dtype dt;
	uint64_t rows, cols, bytes;
	void *buf;
	int rc;

	memset(mat, 0, sizeof(*mat));
	const struct pack_tensor_entry *pt = m->pack ? pack_find_tensor(m->pack, name) : NULL;
	const struct gguf_tensor *gt = (!pt && m->src) ? gguf_find_tensor(m->src, name) : NULL;
	if (pt) {
		dt = (enum moe_dtype)pt->dtype;
		if (pt->n_dims == 1) {
			rows = 1;
			cols = pt->shape[0];
		} else if (pt->n_dims == 2) {
			rows = pt->shape[0];
			cols = pt->shape[1];
		} else if (pt->n_dims == 3) {
			rows = pt->shape[0] * pt->shape[1];
			cols = pt->shape[2];
		} else {
			return moe_error_set(err, -EINVAL, "tensor %s: %u dims, want 1 to 3", name, pt->n_dims);
		}
		bytes = pt->bytes;
	} else if (gt) {
		dt = gt->dtype;
		if (gt->n_dims > 3)
			return moe_error_set(err, -EINVAL, "tensor %s: %u dims, want 1 to 3", name, gt->n_dims);
		cols = gt->ne[0];
		rows = gt->n_dims >= 2 ? gt->ne[1] : 1;
		if (gt->n_dims == 3)
			rows *= gt->ne[2];
		bytes = gt->bytes;
	} else {
		if (required)
			return moe_error_set(err, -ENOENT, "tensor %s is in neither the pack%s", name,
					     m->src ? " nor the GGUF" : " (give --gguf FILE for a pack without dense tensors)");
		return 0;
	}
	uint64_t rb;
	if (!ffn_dtype_supported(dt) || !moe_dtype_row_bytes(dt, cols, &rb) || rows > UINT32_MAX || cols > UINT32_MAX ||
	    rb * rows != bytes)
		return moe_error_set(err, -EINVAL, "tensor %s: dtype %s [%llu x %llu] is not one moe-run computes", name,
				     moe_dtype_name(dt), (unsigned long long)rows, (unsigned long long)cols);
	if (!(buf = alloc_blob(m, bytes)))
		return moe_error_set(err, -ENOMEM, "tensor %s: out of memory", name);
	rc = pt ? pack_read_tensor(m->pack, pt, buf, err) : gguf_read(m->src, gt, 0, buf, bytes, err);
	if (rc)
		return moe_error_prefix(err, rc, "tensor %s", name);
	m->resident_bytes += bytes;
	if (rows == 1 && dt != MOE_DTYPE_F32) {
		float *f = alloc_blob(m, cols * sizeof(float));
		if (!f)
			return moe_error_set(err, -ENOMEM, "tensor %s: out of memory", name);
		moe_dequantize_row(dt, buf, f, cols);
		buf = f;
		dt = MOE_DTYPE_F32;
	}
	mat->dtype = dt;
	mat->rows = (uint32_t)rows;
	mat->cols = (uint32_t)cols;
	mat->data = buf;
	return 0;
}

/* llama.cpp's build_lora_mm(w, x, w_s) multiplies the product by "<w>.scale"
 * (one f32) when the model has one (its test-llama-archs models do, with
 * random values), on the weights its graph for the arch passes a scale
 * with (`applied`); the others it loads and ignores, as "*.input_scale"
 * always. Folded into an f32 matrix here (x.(sW) for (x.W)s: rounding
 * apart, the same); another type with a scale other than 1 is refused. */
static int fold_scale(struct model *m, struct model_mat *w, const char *wname, bool applied, struct moe_error *err)
{
	char sname[GGUF_MAX_NAME + 32];
	struct model_mat sc;
	size_t n = strlen(wname);
	int rc;

	if (!w->data || n < 7 || strcmp(wname + n - 7, ".weight") != 0)
		return 0;
	snprintf(sname, sizeof(sname), "%.*s.scale", (int)(n - 7), wname);
	if ((rc = load(m, sname, false, &sc, err)))
		return rc;
	if (!sc.data || !applied)
		return 0;
	if (sc.rows != 1 || sc.cols != 1)
		return moe_error_set(err, -EINVAL, "tensor %s: [%u x %u], llama.cpp's weight scales are one value", sname,
				     sc.rows, sc.cols);
	float v = model_vec(&sc)[0];
	if (v == 1.0f)
		return 0;
	if (w->dtype != MOE_DTYPE_F32 || !isfinite(v))
		return moe_error_set(err, -ENOTSUP,
				     "tensor %s is %g: llama.cpp multiplies %s's product by it, and moe-run folds such "
				     "scales into f32 weights only (%s is %s)",
				     sname, (double)v, wname, wname, moe_dtype_name(w->dtype));
	float *f = (float *)(uintptr_t)w->data; /* our own copy (load) */
	for (size_t i = 0; i < (size_t)w->rows * w->cols; i++)
		f[i] *= v;
	return 0;
}

/* Refuses a tensor llama.cpp's graph for the arch uses but moe-run cannot
 * compute (attn_output.bias, rope_freqs.weight), unless it changes nothing. */
static int refuse_extra(struct model *m, const char *name, float neutral, const char *why, struct moe_error *err)
{
	struct model_mat t;
	int rc = load(m, name, false, &t, err);
	if (rc || !t.data)
		return rc;
	if (t.rows == 1)
		for (uint32_t i = 0; i < t.cols; i++)
			if (model_vec(&t)[i] != neutral)
				return moe_error_set(err, -ENOTSUP, "tensor %s: %s; moe-run does not compute it", name, why);
	return 0;
}

/* Tensor "blk.<il>.<what>" of layer il. */
static int loadl(struct model *m, bool required, struct model_mat *mat, struct moe_error *err, unsigned il,
		 const char *what)
{
	char name[GGUF_MAX_NAME + 32];
	snprintf(name, sizeof(name), "blk.%u.%s", il, what);
	return load(m, name, required, mat, err);
}

static int shape(const struct model_mat *w, const char *what, unsigned il, uint32_t rows, uint32_t cols,
		 struct moe_error *err)
{
	if (!w->data || (w->rows == rows && w->cols == cols))
		return 0;
	return moe_error_set(err, -EINVAL, "layer %u %s: [%u x %u], expected [%u x %u]", il, what, w->rows, w->cols,
			     rows, cols);
}

static int kv_u32(const struct model *m, const char *key, bool required, uint32_t def, uint32_t *out,
		  struct moe_error *err)
{
	char full[128];
	snprintf(full, sizeof(full), "%s.%s", m->arch_name, key);
	int rc = gguf_get_u32(m->kv, full, out);
	if (rc == -ENOENT && !required) {
		*out = def;
		return 0;
	}
	if (rc)
		return moe_error_set(err, rc, "GGUF key %s: %s", full, rc == -ENOENT ? "missing" : "bad value");
	return 0;
}

static int kv_f32(const struct model *m, const char *key, bool required, float def, float *out,
		  struct moe_error *err)
{
	char full[128];
	snprintf(full, sizeof(full), "%s.%s", m->arch_name, key);
	int rc = gguf_get_f32(m->kv, full, out);
	if (rc == -ENOENT && !required) {
		*out = def;
		return 0;
	}
	if (rc)
		return moe_error_set(err, rc, "GGUF key %s: %s", full, rc == -ENOENT ? "missing" : "bad value");
	return 0;
}

/* RoPE as llama.cpp's context computes it from the keys (llama_model's
 * load_hparams, then llama_context's cparams): rope.scaling.type linear
 * (the default), none (no frequency scale) or yarn (ext_factor 1, the
 * attention factor from the scale and, for deepseek2, its
 * yarn_log_multiplier); beta_fast 32 and beta_slow 1 (llama.cpp's
 * defaults: its loader does not read the yarn_beta keys). */
static float yarn_get_mscale(float scale, float mscale)
{
	return scale <= 1.0f ? 1.0f : (0.1f * mscale * logf(scale) + 1.0f);
}

static int rope_setup(struct model *m, struct moe_error *err)
{
	char full[128];
	const char *type = "linear";
	float attn_key, log_mul = 0.0f;
	int rc;

	snprintf(full, sizeof(full), "%s.rope.scaling.type", m->arch_name);
	if ((rc = gguf_get_str(m->kv, full, &type, NULL)) == -ENOENT)
		type = "linear";
	else if (rc)
		return moe_error_set(err, rc, "GGUF key %s: bad value", full);
	bool yarn = !strcmp(type, "yarn");
	if (!strcmp(type, "none"))
		m->rope_freq_scale = 1.0f;
	else if (!yarn && strcmp(type, "linear"))
		return moe_error_set(err, -ENOTSUP, "%s is %s: moe-run computes linear, yarn and none", full, type);
	if ((rc = kv_f32(m, "rope.scaling.attn_factor", false, 1.0f, &attn_key, err)) ||
	    (rc = kv_u32(m, "rope.scaling.original_context_length", false, m->n_ctx_train, &m->rope_n_ctx_orig, err)))
		return rc;
	if (!m->rope_n_ctx_orig)
		m->rope_n_ctx_orig = m->n_ctx_train;
	/* deepseek2 alone reads it, dividing out its converter's factor 0.1 */
	if (m->arch == MODEL_ARCH_DEEPSEEK2) {
		if ((rc = kv_f32(m, "rope.scaling.yarn_log_multiplier", false, 0.0f, &log_mul, err)))
			return rc;
		log_mul /= 0.1f;
	}
	m->rope_yarn_log_mul = log_mul;
	m->rope_beta_fast = 32.0f;
	m->rope_beta_slow = 1.0f;
	m->rope_ext_factor = yarn ? 1.0f : 0.0f;
	float af = 1.0f;
	if (m->rope_ext_factor != 0.0f) {
		const float factor = 1.0f / m->rope_freq_scale;
		if (log_mul != 0.0f) {
			float mscale = 1.0f;
			if (m->arch == MODEL_ARCH_DEEPSEEK2 && log_mul != 1.0f)
				mscale = log_mul;
			af = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, log_mul);
		} else {
			af = yarn_get_mscale(factor, 1.0f);
		}
		/* ggml's rope_yarn multiplies this back in */
		af *= 1.0f / (1.0f + 0.1f * logf(factor));
	}
	m->rope_attn_factor = af * attn_key;
	return 0;
}

/* deepseek2's attention geometry (llama_model_deepseek2::load_arch_hparams):
 * with key_length_mla / value_length_mla the GGUF holds attn_k_b and
 * attn_v_b (key_length is then kv_lora + rope); without, the legacy
 * attn_kv_b and key_length / value_length are the per-head dims. */
static int mla_setup(struct model *m, uint32_t vlen, struct moe_error *err)
{
	uint32_t kmla, vmla;
	int rc;
	if ((rc = kv_u32(m, "attention.q_lora_rank", false, 0, &m->n_lora_q, err)) ||
	    (rc = kv_u32(m, "attention.kv_lora_rank", true, 0, &m->n_lora_kv, err)) ||
	    (rc = kv_u32(m, "attention.key_length_mla", false, 0, &kmla, err)) ||
	    (rc = kv_u32(m, "attention.value_length_mla", false, 0, &vmla, err)) ||
	    (rc = kv_u32(m, "leading_dense_block_count", false, 0, &m->n_dense_lead, err)))
		return rc;
	m->mla_k = kmla && vmla ? kmla : m->head_dim;
	m->mla_v = kmla && vmla ? vmla : vlen;
	if (!m->n_lora_kv || m->n_lora_kv > 65536 || !m->n_rot || m->n_rot % 2 || m->n_rot >= m->mla_k || !m->mla_v ||
	    m->mla_k > 65536 || m->mla_v > 65536)
		return moe_error_set(err, -EINVAL, "deepseek2 attention: kv_lora %u, head k %u (rope %u), v %u",
				     m->n_lora_kv, m->mla_k, m->n_rot, m->mla_v);
	/* llama_model_deepseek2::graph: the YaRN mscale folded into kq_scale */
	const float fs = m->rope_freq_scale;
	const float attn_factor_org = m->rope_attn_factor * (1.0f + 0.1f * logf(1.0f / fs));
	const float mscale = attn_factor_org * (1.0f + 0.1f * m->rope_yarn_log_mul * logf(1.0f / fs));
	m->kq_scale = 1.0f * mscale * mscale / sqrtf((float)m->mla_k);
	return 0;
}

/* A legacy attn_kv_b [n_head * (nope + v) x kv_lora] split into the
 * per-head k_b [kv_lora x nope] and v_b [v x kv_lora] the absorbed form
 * uses (f32): the same products, summed in another order. */
static int mla_split_kv_b(struct model *m, struct model_layer *L, const struct model_mat *kvb, struct moe_error *err)
{
	const uint32_t nh = m->n_head, r = m->n_lora_kv, nope = m->mla_k - m->n_rot, v = m->mla_v;
	uint64_t rb;
	if (kvb->rows != nh * (nope + v) || kvb->cols != r)
		return moe_error_set(err, -EINVAL, "attn_kv_b: [%u x %u], expected [%u x %u]", kvb->rows, kvb->cols,
				     nh * (nope + v), r);
	float *kb = alloc_blob(m, (size_t)nh * r * nope * sizeof(float));
	float *vb = alloc_blob(m, (size_t)nh * v * r * sizeof(float));
	float *row = malloc((size_t)r * sizeof(float));
	if (!kb || !vb || !row) {
		free(row);
		return moe_error_set(err, -ENOMEM, "attn_kv_b: out of memory");
	}
	moe_dtype_row_bytes(kvb->dtype, r, &rb);
	for (uint32_t h = 0; h < nh; h++)
		for (uint32_t i = 0; i < nope + v; i++) {
			moe_dequantize_row(kvb->dtype, (const uint8_t *)kvb->data + rb * ((uint64_t)h * (nope + v) + i), row, r);
			for (uint32_t c = 0; c < r; c++) {
				if (i < nope)
					kb[((size_t)h * r + c) * nope + i] = row[c];
				else
					vb[((size_t)h * v + (i - nope)) * r + c] = row[c];
			}
		}
	free(row);
	L->wk_b = (struct model_mat){ .dtype = MOE_DTYPE_F32, .rows = nh * r, .cols = nope, .data = kb };
	L->wv_b = (struct model_mat){ .dtype = MOE_DTYPE_F32, .rows = nh * v, .cols = r, .data = vb };
	return 0;
}

/* One deepseek2 layer's tensors, as llama_model_deepseek2 loads them. */
static int mla_layer(struct model *m, uint32_t il, struct moe_error *err)
{
	struct model_layer *L = &m->layers[il];
	const uint32_t n = m->n_embd, nh = m->n_head, r = m->n_lora_kv, nope = m->mla_k - m->n_rot;
	char nm[64];
	int rc;

	if ((rc = loadl(m, true, &L->attn_norm, err, il, "attn_norm.weight")) ||
	    (rc = loadl(m, false, &L->wq_a, err, il, "attn_q_a.weight")) ||
	    (rc = loadl(m, L->wq_a.data != NULL, &L->q_a_norm, err, il, "attn_q_a_norm.weight")) ||
	    (rc = loadl(m, L->wq_a.data != NULL, &L->wq_b, err, il, "attn_q_b.weight")) ||
	    (rc = loadl(m, L->wq_a.data == NULL, &L->wq, err, il, "attn_q.weight")) ||
	    (rc = loadl(m, true, &L->wkv_a, err, il, "attn_kv_a_mqa.weight")) ||
	    (rc = loadl(m, true, &L->kv_a_norm, err, il, "attn_kv_a_norm.weight")) ||
	    (rc = loadl(m, false, &L->wk_b, err, il, "attn_k_b.weight")) ||
	    (rc = loadl(m, L->wk_b.data != NULL, &L->wv_b, err, il, "attn_v_b.weight")) ||
	    (rc = loadl(m, true, &L->wo, err, il, "attn_output.weight")) ||
	    (rc = loadl(m, true, &L->ffn_norm, err, il, "ffn_norm.weight")))
		return rc;
	if (!L->wk_b.data) {
		struct model_mat kvb;
		if ((rc = loadl(m, true, &kvb, err, il, "attn_kv_b.weight")) || (rc = mla_split_kv_b(m, L, &kvb, err)))
			return moe_error_prefix(err, rc, "layer %u", il);
	}
	/* build_attn(..., wo, NULL, wo_s, ...): the output scale applies, the
	 * graph's plain ggml_mul_mat products take none */
	snprintf(nm, sizeof(nm), "blk.%u.attn_output.weight", il);
	if ((rc = fold_scale(m, &L->wo, nm, true, err)))
		return rc;
	uint32_t nq_rows = nh * m->mla_k;
	if ((rc = shape(&L->attn_norm, "attn_norm", il, 1, n, err)) ||
	    (rc = shape(&L->wq_a, "attn_q_a", il, m->n_lora_q, n, err)) ||
	    (rc = shape(&L->q_a_norm, "attn_q_a_norm", il, 1, L->wq_a.rows, err)) ||
	    (rc = shape(&L->wq_b, "attn_q_b", il, nq_rows, L->wq_a.rows, err)) ||
	    (rc = shape(&L->wq, "attn_q", il, nq_rows, n, err)) ||
	    (rc = shape(&L->wkv_a, "attn_kv_a_mqa", il, r + m->n_rot, n, err)) ||
	    (rc = shape(&L->kv_a_norm, "attn_kv_a_norm", il, 1, r, err)) ||
	    (rc = shape(&L->wk_b, "attn_k_b", il, nh * r, nope, err)) ||
	    (rc = shape(&L->wv_b, "attn_v_b", il, nh * m->mla_v, r, err)) ||
	    (rc = shape(&L->wo, "attn_output", il, n, nh * m->mla_v, err)) ||
	    (rc = shape(&L->ffn_norm, "ffn_norm", il, 1, n, err)))
		return rc;

	if (L->moe_index < 0) {
		/* a leading dense layer: build_ffn without scales */
		if ((rc = loadl(m, true, &L->ffn_gate, err, il, "ffn_gate.weight")) ||
		    (rc = loadl(m, true, &L->ffn_up, err, il, "ffn_up.weight")) ||
		    (rc = loadl(m, true, &L->ffn_down, err, il, "ffn_down.weight")))
			return rc;
		uint32_t ff = L->ffn_gate.rows;
		if ((rc = shape(&L->ffn_gate, "ffn_gate", il, ff, n, err)) || (rc = shape(&L->ffn_up, "ffn_up", il, ff, n, err)))
			return rc;
		return shape(&L->ffn_down, "ffn_down", il, n, ff, err);
	}
	struct model_mat pb;
	if ((rc = loadl(m, true, &L->router, err, il, "ffn_gate_inp.weight")) ||
	    (rc = loadl(m, false, &pb, err, il, "exp_probs_b.bias")) ||
	    (rc = loadl(m, false, &L->sh_gate, err, il, "ffn_gate_shexp.weight")) ||
	    (rc = loadl(m, L->sh_gate.data != NULL, &L->sh_up, err, il, "ffn_up_shexp.weight")) ||
	    (rc = loadl(m, L->sh_gate.data != NULL, &L->sh_down, err, il, "ffn_down_shexp.weight")))
		return rc;
	if ((rc = shape(&pb, "exp_probs_b", il, 1, m->n_experts, err)))
		return rc;
	L->score_bias = pb.data ? model_vec(&pb) : NULL;
	uint32_t shw = L->sh_gate.rows;
	if ((rc = shape(&L->router, "ffn_gate_inp", il, m->n_experts, n, err)) ||
	    (rc = shape(&L->sh_gate, "ffn_gate_shexp", il, shw, n, err)) ||
	    (rc = shape(&L->sh_up, "ffn_up_shexp", il, shw, n, err)))
		return rc;
	return shape(&L->sh_down, "ffn_down_shexp", il, n, shw, err);
}

static int open_kv(struct model *m, const char *gguf_path, struct moe_error *err)
{
	int rc = pack_open_kv(m->pack, &m->kv_image, &m->kv, err);
	if (rc != -ENOENT)
		return rc ? moe_error_prefix(err, rc, "%s", m->pack->path) : 0;
	if (!gguf_path)
		return moe_error_set(err, -ENOENT, "%s has no gguf.kv (packed with --experts-only or by an older moe-pack): "
				     "give --gguf FILE", m->pack->path);
	m->kv = m->src;
	return 0;
}

int model_open(const char *pack_path, const char *gguf_path, struct model **out, struct moe_error *err)
{
	struct model *m = calloc(1, sizeof(*m));
	const char *arch;
	int rc;

	*out = NULL;
	if (!m)
		return moe_error_set(err, -ENOMEM, "out of memory");
	if ((rc = pack_open(pack_path, PACK_OPEN_NO_DIRECT, &m->pack, err)))
		goto fail;
	m->cfg = m->pack->model;
	if (gguf_path && (rc = gguf_open(gguf_path, &m->src, err)))
		goto fail;
	if ((rc = open_kv(m, gguf_path, err)))
		goto fail;

	if ((rc = gguf_get_str(m->kv, "general.architecture", &arch, NULL))) {
		rc = moe_error_set(err, rc == -ENOENT ? -ENOENT : -EINVAL, "general.architecture missing");
		goto fail;
	}
	snprintf(m->arch_name, sizeof(m->arch_name), "%s", arch);
	if (!strcmp(arch, "llama"))
		m->arch = MODEL_ARCH_LLAMA;
	else if (!strcmp(arch, "qwen2moe"))
		m->arch = MODEL_ARCH_QWEN2MOE;
	else if (!strcmp(arch, "qwen3moe"))
		m->arch = MODEL_ARCH_QWEN3MOE;
	else if (!strcmp(arch, "olmoe"))
		m->arch = MODEL_ARCH_OLMOE;
	else if (!strcmp(arch, "deepseek2"))
		m->arch = MODEL_ARCH_DEEPSEEK2;
	else {
		rc = moe_error_set(err, -ENOTSUP,
				   "architecture %s: moe-run runs llama (Mixtral), qwen2moe, qwen3moe, olmoe, deepseek2", arch);
		goto fail;
	}
	const bool ds2 = m->arch == MODEL_ARCH_DEEPSEEK2;
	/* llama.cpp's rope type table (llama_model_rope_type): llama and
	 * deepseek2 are NORM; qwen2moe, qwen3moe and olmoe are NEOX. */
	m->rope = m->arch == MODEL_ARCH_LLAMA || ds2 ? MODEL_ROPE_NORM : MODEL_ROPE_NEOX;

	float rope_scale;
	if ((rc = kv_u32(m, "block_count", true, 0, &m->n_layers, err)) ||
	    (rc = kv_u32(m, "embedding_length", true, 0, &m->n_embd, err)) ||
	    (rc = kv_u32(m, "context_length", true, 0, &m->n_ctx_train, err)) ||
	    (rc = kv_u32(m, "attention.head_count", true, 0, &m->n_head, err)) ||
	    (rc = kv_u32(m, "attention.head_count_kv", false, m->n_head, &m->n_head_kv, err)) ||
	    (rc = kv_f32(m, "attention.layer_norm_rms_epsilon", true, 0, &m->rms_eps, err)) ||
	    (rc = kv_u32(m, "expert_count", true, 0, &m->n_experts, err)) ||
	    (rc = kv_u32(m, "expert_used_count", true, 0, &m->top_k, err)) ||
	    (rc = kv_f32(m, "rope.freq_base", false, 10000.0f, &m->rope_base, err)) ||
	    (rc = kv_f32(m, "rope.scaling.factor", false, 0.0f, &rope_scale, err)))
		goto fail;
	if (!m->n_layers || !m->n_embd || !m->n_head || !m->n_head_kv || m->n_head % m->n_head_kv || m->n_layers > 4096 ||
	    m->n_head > 4096) {
		rc = moe_error_set(err, -EINVAL, "bad attention shape: %u layers, %u heads, %u kv heads", m->n_layers,
				   m->n_head, m->n_head_kv);
		goto fail;
	}
	m->rope_freq_scale = rope_scale == 0.0f ? 1.0f : 1.0f / rope_scale;
	if ((rc = rope_setup(m, err)))
		goto fail;
	if ((rc = kv_u32(m, "attention.key_length", false, m->n_embd / m->n_head, &m->head_dim, err)) ||
	    (rc = kv_u32(m, "rope.dimension_count", false, m->head_dim, &m->n_rot, err)))
		goto fail;
	uint32_t vlen;
	if ((rc = kv_u32(m, "attention.value_length", false, m->head_dim, &vlen, err)))
		goto fail;
	if (ds2 && (rc = mla_setup(m, vlen, err)))
		goto fail;
	if (!ds2 && (vlen != m->head_dim || m->n_rot != m->head_dim || !m->head_dim || m->head_dim % 2)) {
		rc = moe_error_set(err, -EINVAL, "head dims k %u v %u rot %u: llama.cpp's graphs for these archs need them equal",
				   m->head_dim, vlen, m->n_rot);
		goto fail;
	}
	if (m->n_experts != m->cfg->n_experts || m->top_k != m->cfg->top_k || m->n_embd != m->cfg->hidden) {
		rc = moe_error_set(err, -EINVAL, "the KV (%u experts top-%u, hidden %u) and the pack (%u, %u, %u) disagree",
				   m->n_experts, m->top_k, m->n_embd, m->cfg->n_experts, m->cfg->top_k, m->cfg->hidden);
		goto fail;
	}

	/* Routing exactly as llama.cpp's build_moe_ffn is called per arch:
	 * softmax over all experts, top-k, weights renormalised for llama
	 * (Mixtral) and qwen3moe, not for qwen2moe and olmoe; no scale. */
	route_params_from_model(&m->rp, m->cfg, NULL);
	if (!ds2) {
		m->rp.scoring = MOE_SCORING_SOFTMAX;
		m->rp.topk_method = MOE_TOPK_GREEDY;
		m->rp.norm_topk_prob = m->arch == MODEL_ARCH_LLAMA || m->arch == MODEL_ARCH_QWEN3MOE;
		m->rp.routed_scaling_factor = 1.0f;
	} /* deepseek2: the pack's rule, which moe-pack read from the same keys
	   * llama.cpp reads (gating func, weights norm and scale, groups) */
	/* (route.c renormalises at any k, top-1 included, as build_moe_ffn) */
	if ((rc = route_params_check(&m->rp, err)))
		goto fail;
	/* Each MoE layer's expert layout (a version 2 pack's layers differ:
	 * llama.cpp's Q*_K_M give ffn_down more bits in some layers). */
	if (!(m->layouts = calloc(m->cfg->n_moe_layers, sizeof(*m->layouts)))) {
		rc = moe_error_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	if (run_latent_pack(m->pack)) {
		/* MoLAE: extents hold A_gate | A_up | W_down, the B matrices sit
		 * in the resident region; latent.c computes them */
		if ((rc = run_latent_open(m->pack, &m->latent, err)))
			goto fail;
		for (uint32_t l = 0; l < m->cfg->n_moe_layers; l++)
			m->layouts[l].payload = m->pack->hdr->extent_payload;
	}
	for (uint32_t l = 0; l < m->cfg->n_moe_layers && !m->latent; l++) {
		const struct pack_layout_disk *pl = pack_layer_layout(m->pack, l);
		if ((rc = ffn_layout_init(&m->layouts[l], m->cfg, pl->parts, pl->n_parts, m->pack->hdr->extent_bytes,
					  err))) {
			moe_error_prefix(err, rc, "MoE layer %u", l);
			goto fail;
		}
		/* gateless experts (down(silu(up x))) go through the same ffn_expert */
		if (m->layouts[l].kind != MOE_FFN_SWIGLU && m->layouts[l].kind != MOE_FFN_SILU) {
			rc = moe_error_set(err, -ENOTSUP, "expert FFN kind %u: moe-run runs SwiGLU and gateless experts",
					   m->layouts[l].kind);
			goto fail;
		}
		if (memcmp(&m->layouts[l], &m->layouts[0], sizeof(m->layouts[0])) != 0)
			m->mixed_layouts = true;
	}
	m->layout = m->layouts[0];
#ifndef EXPERTS_LAYOUT_PER_LAYER
	/* experts.c computes every layer with m->layout until it takes
	 * model_layout(m, moe_l): refuse rather than compute wrong */
	if (m->mixed_layouts) {
		rc = moe_error_set(err, -ENOTSUP,
				   "the pack's expert types differ between layers (a version 2 pack), and this moe-run "
				   "computes every layer with layer 0's layout");
		goto fail;
	}
#endif

	if ((rc = load(m, "token_embd.weight", true, &m->tok_embd, err)) ||
	    (rc = load(m, "output_norm.weight", true, &m->output_norm, err)) ||
	    (rc = load(m, "output.weight", false, &m->output, err)))
		goto fail;
	if (!m->output.data) {
		m->output = m->tok_embd; /* tied, as llama.cpp does when output.weight is absent */
		if ((rc = refuse_extra(m, "output.scale", 1.0f, "llama.cpp scales the tied output head's product", err)))
			goto fail;
	} else if ((rc = fold_scale(m, &m->output, "output.weight", !ds2, err))) {
		/* deepseek2's head is a plain ggml_mul_mat: its scale is ignored */
		goto fail;
	}
	/* llama's rope_freqs (llama-3 long-context factors) divide each
	 * dimension pair's RoPE frequency (ggml_rope_ext's freq_factors) */
	if (m->arch == MODEL_ARCH_LLAMA) {
		if ((rc = load(m, "rope_freqs.weight", false, &m->rope_freqs, err)))
			goto fail;
		if (m->rope_freqs.data && (m->rope_freqs.rows != 1 || m->rope_freqs.cols < m->n_rot / 2)) {
			rc = moe_error_set(err, -EINVAL, "rope_freqs.weight: [%u x %u], expected %u factors",
					   m->rope_freqs.rows, m->rope_freqs.cols, m->n_rot / 2);
			goto fail;
		}
	}
	m->n_vocab = m->tok_embd.rows;
	if (m->tok_embd.cols != m->n_embd || m->output.cols != m->n_embd || m->output.rows != m->n_vocab ||
	    m->output_norm.cols != m->n_embd) {
		rc = moe_error_set(err, -EINVAL, "token_embd/output/output_norm shapes do not match n_embd %u", m->n_embd);
		goto fail;
	}

	if (!(m->layers = calloc(m->n_layers, sizeof(*m->layers)))) {
		rc = moe_error_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	uint32_t nq = m->n_head * m->head_dim, nkv = m->n_head_kv * m->head_dim, n = m->n_embd;
	for (uint32_t il = 0; il < m->n_layers; il++) {
		struct model_layer *L = &m->layers[il];
		bool qk = m->arch == MODEL_ARCH_QWEN3MOE || m->arch == MODEL_ARCH_OLMOE;
		bool sh = m->arch == MODEL_ARCH_QWEN2MOE;
		/* llama.cpp's olmoe graph takes q, k, v without biases or scales
		 * (build_lora_mm(wq, cur)); the others through build_qkv with both */
		bool olmoe = m->arch == MODEL_ARCH_OLMOE;
		L->moe_index = moe_model_moe_index(m->cfg, il);
		if (ds2) {
			if ((rc = mla_layer(m, il, err)))
				goto fail;
			continue;
		}
		if (L->moe_index < 0) {
			rc = moe_error_set(err, -ENOTSUP, "layer %u has no routed experts: dense layers are not supported", il);
			goto fail;
		}
		if ((rc = loadl(m, true, &L->attn_norm, err, il, "attn_norm.weight")) ||
		    (rc = loadl(m, true, &L->wq, err, il, "attn_q.weight")) ||
		    (rc = loadl(m, true, &L->wk, err, il, "attn_k.weight")) ||
		    (rc = loadl(m, true, &L->wv, err, il, "attn_v.weight")) ||
		    (rc = loadl(m, true, &L->wo, err, il, "attn_output.weight")) ||
		    (!olmoe && (rc = loadl(m, false, &L->bq, err, il, "attn_q.bias"))) ||
		    (!olmoe && (rc = loadl(m, false, &L->bk, err, il, "attn_k.bias"))) ||
		    (!olmoe && (rc = loadl(m, false, &L->bv, err, il, "attn_v.bias"))) ||
		    (rc = loadl(m, qk, &L->q_norm, err, il, "attn_q_norm.weight")) ||
		    (rc = loadl(m, qk, &L->k_norm, err, il, "attn_k_norm.weight")) ||
		    (rc = loadl(m, true, &L->ffn_norm, err, il, "ffn_norm.weight")) ||
		    (rc = loadl(m, true, &L->router, err, il, "ffn_gate_inp.weight")) ||
		    (rc = loadl(m, sh, &L->sh_gate, err, il, "ffn_gate_shexp.weight")) ||
		    (rc = loadl(m, sh, &L->sh_up, err, il, "ffn_up_shexp.weight")) ||
		    (rc = loadl(m, sh, &L->sh_down, err, il, "ffn_down_shexp.weight")) ||
		    (rc = loadl(m, sh, &L->sh_gate_inp, err, il, "ffn_gate_inp_shexp.weight")))
			goto fail;
		char nm[64];
		static const char *const qkvo[4] = { "attn_q", "attn_k", "attn_v", "attn_output" };
		struct model_mat *w4[4] = { &L->wq, &L->wk, &L->wv, &L->wo };
		for (int k = 0; k < 4; k++) {
			snprintf(nm, sizeof(nm), "blk.%u.%s.weight", il, qkvo[k]);
			if ((rc = fold_scale(m, w4[k], nm, k == 3 || !olmoe, err)))
				goto fail;
		}
		/* build_attn adds it after the (scaled) output projection; olmoe's
		 * graph passes none */
		if (!olmoe && (rc = loadl(m, false, &L->wo_b, err, il, "attn_output.bias")))
			goto fail;
		uint32_t qn = m->arch == MODEL_ARCH_OLMOE ? nq : m->head_dim;
		uint32_t kn = m->arch == MODEL_ARCH_OLMOE ? nkv : m->head_dim;
		uint32_t shw = L->sh_gate.rows;
		if ((rc = shape(&L->attn_norm, "attn_norm", il, 1, n, err)) || (rc = shape(&L->wq, "attn_q", il, nq, n, err)) ||
		    (rc = shape(&L->wk, "attn_k", il, nkv, n, err)) || (rc = shape(&L->wv, "attn_v", il, nkv, n, err)) ||
		    (rc = shape(&L->wo, "attn_output", il, n, nq, err)) || (rc = shape(&L->bq, "attn_q.bias", il, 1, nq, err)) ||
		    (rc = shape(&L->wo_b, "attn_output.bias", il, 1, n, err)) ||
		    (rc = shape(&L->bk, "attn_k.bias", il, 1, nkv, err)) || (rc = shape(&L->bv, "attn_v.bias", il, 1, nkv, err)) ||
		    (rc = shape(&L->q_norm, "attn_q_norm", il, 1, qn, err)) ||
		    (rc = shape(&L->k_norm, "attn_k_norm", il, 1, kn, err)) ||
		    (rc = shape(&L->ffn_norm, "ffn_norm", il, 1, n, err)) ||
		    (rc = shape(&L->router, "ffn_gate_inp", il, m->n_experts, n, err)) ||
		    (rc = shape(&L->sh_gate, "ffn_gate_shexp", il, shw, n, err)) ||
		    (rc = shape(&L->sh_up, "ffn_up_shexp", il, shw, n, err)) ||
		    (rc = shape(&L->sh_down, "ffn_down_shexp", il, n, shw, err)) ||
		    (rc = shape(&L->sh_gate_inp, "ffn_gate_inp_shexp", il, 1, n, err)))
			goto fail;
	}
	/* experts_layer routes each layer with its own exp_probs_b; m->rp (the
	 * pre-gating and next-layer hints) carries the first MoE layer's */
	for (uint32_t il = 0; il < m->n_layers && !m->rp.score_bias; il++)
		if (m->layers[il].moe_index == 0)
			m->rp.score_bias = m->layers[il].score_bias;
	/* the tensors are in our memory now: their page cache would only
	 * compete with the daemon's arena under a memory budget */
	posix_fadvise(m->pack->fd, 0, 0, POSIX_FADV_DONTNEED);
	if (m->src)
		posix_fadvise(m->src->fd, 0, 0, POSIX_FADV_DONTNEED);
	*out = m;
	return 0;
fail:
	model_close(m);
	return rc;
}

void model_close(struct model *m)
{
	if (!m)
		return;
	for (size_t i = 0; i < m->n_blobs; i++)
		free(m->blobs[i]);
	free(m->blobs);
	free(m->layers);
	free(m->layouts);
	run_latent_close(m->latent);
	if (m->kv != m->src)
		gguf_close(m->kv);
	free(m->kv_image);
	gguf_close(m->src);
	pack_close(m->pack);
	free(m);
}

uint64_t model_split_min(void)
{
	static uint64_t v = UINT64_MAX;
	uint64_t x = __atomic_load_n(&v, __ATOMIC_RELAXED);
	if (x == UINT64_MAX) {
		const char *e = getenv("MOETIER_RUN_SPLIT_MIN");
		x = e && *e ? strtoull(e, NULL, 0) : 1u << 18;
		__atomic_store_n(&v, x, __ATOMIC_RELAXED);
	}
	return x;
}

int model_matmul(const struct model_mat *W, const float *x, uint32_t B, float *y, int threads)
{
	/* waking the kernels' pool and joining it costs microseconds: below
	 * ~256K multiply-adds (a router) one thread is faster. The bits do not
	 * depend on it. */
	if ((uint64_t)W->rows * W->cols * B < model_split_min())
		threads = 1;
	return ffn_matmul(W->dtype, W->data, W->rows, W->cols, x, W->cols, B, y, W->rows, threads);
}

int model_dense_ffn(const struct model *m, const struct model_layer *L, const float *x, uint32_t B, float *y,
		    int threads)
{
	const size_t ff = L->ffn_gate.rows;
	float *g = malloc((size_t)B * ff * sizeof(float)), *u = malloc((size_t)B * ff * sizeof(float));
	int rc = -ENOMEM;
	(void)m;
	if (g && u && !(rc = model_matmul(&L->ffn_gate, x, B, g, threads)) &&
	    !(rc = model_matmul(&L->ffn_up, x, B, u, threads))) {
		for (size_t i = 0; i < (size_t)B * ff; i++)
			g[i] = g[i] / (1.0f + expf(-g[i])) * u[i]; /* ggml's silu, then the product */
		rc = model_matmul(&L->ffn_down, g, B, y, threads);
	}
	free(g);
	free(u);
	return rc;
}

int model_embed(const struct model *m, int32_t tok, float *out)
{
	uint64_t rb;
	if (tok < 0 || (uint32_t)tok >= m->n_vocab)
		return -ERANGE;
	moe_dtype_row_bytes(m->tok_embd.dtype, m->n_embd, &rb);
	moe_dequantize_row(m->tok_embd.dtype, (const uint8_t *)m->tok_embd.data + rb * (uint64_t)tok, out, m->n_embd);
	return 0;
}
