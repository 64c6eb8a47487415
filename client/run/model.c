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
 * 1-D tensors are widened to f32 (norms and biases are used element-wise).
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
		} else {
			return moe_error_set(err, -EINVAL, "tensor %s: %u dims, want 1 or 2", name, pt->n_dims);
		}
		bytes = pt->bytes;
	} else if (gt) {
		dt = gt->dtype;
		if (gt->n_dims > 2)
			return moe_error_set(err, -EINVAL, "tensor %s: %u dims, want 1 or 2", name, gt->n_dims);
		cols = gt->ne[0];
		rows = gt->n_dims == 2 ? gt->ne[1] : 1;
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
	else {
		rc = moe_error_set(err, -ENOTSUP, "architecture %s: moe-run runs llama (Mixtral), qwen2moe, qwen3moe, olmoe",
				   arch);
		goto fail;
	}
	/* llama.cpp's rope type table (llama_model_rope_type): llama is NORM;
	 * qwen2moe, qwen3moe and olmoe are NEOX. */
	m->rope = m->arch == MODEL_ARCH_LLAMA ? MODEL_ROPE_NORM : MODEL_ROPE_NEOX;

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
	if ((rc = kv_u32(m, "attention.key_length", false, m->n_embd / m->n_head, &m->head_dim, err)) ||
	    (rc = kv_u32(m, "rope.dimension_count", false, m->head_dim, &m->n_rot, err)))
		goto fail;
	uint32_t vlen;
	if ((rc = kv_u32(m, "attention.value_length", false, m->head_dim, &vlen, err)))
		goto fail;
	if (vlen != m->head_dim || m->n_rot != m->head_dim || !m->head_dim || m->head_dim % 2) {
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
	m->rp.scoring = MOE_SCORING_SOFTMAX;
	m->rp.topk_method = MOE_TOPK_GREEDY;
	m->rp.norm_topk_prob = m->arch == MODEL_ARCH_LLAMA || m->arch == MODEL_ARCH_QWEN3MOE;
	m->rp.routed_scaling_factor = 1.0f;
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
		if (m->layouts[l].kind != MOE_FFN_SWIGLU) {
			rc = moe_error_set(err, -ENOTSUP, "expert FFN kind %u: moe-run runs SwiGLU experts",
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
	} else if ((rc = fold_scale(m, &m->output, "output.weight", true, err))) {
		goto fail;
	}
	/* llama's rope_freqs (llama-3 long-context factors) divide the RoPE
	 * frequencies */
	if (m->arch == MODEL_ARCH_LLAMA &&
	    (rc = refuse_extra(m, "rope_freqs.weight", 1.0f, "llama.cpp divides the RoPE frequencies by it", err)))
		goto fail;
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
		snprintf(nm, sizeof(nm), "blk.%u.attn_output.bias", il);
		if (!olmoe && (rc = refuse_extra(m, nm, 0.0f, "llama.cpp adds it to attn_output's product", err)))
			goto fail;
		uint32_t qn = m->arch == MODEL_ARCH_OLMOE ? nq : m->head_dim;
		uint32_t kn = m->arch == MODEL_ARCH_OLMOE ? nkv : m->head_dim;
		uint32_t shw = L->sh_gate.rows;
		if ((rc = shape(&L->attn_norm, "attn_norm", il, 1, n, err)) || (rc = shape(&L->wq, "attn_q", il, nq, n, err)) ||
		    (rc = shape(&L->wk, "attn_k", il, nkv, n, err)) || (rc = shape(&L->wv, "attn_v", il, nkv, n, err)) ||
		    (rc = shape(&L->wo, "attn_output", il, n, nq, err)) || (rc = shape(&L->bq, "attn_q.bias", il, 1, nq, err)) ||
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

int model_embed(const struct model *m, int32_t tok, float *out)
{
	uint64_t rb;
	if (tok < 0 || (uint32_t)tok >= m->n_vocab)
		return -ERANGE;
	moe_dtype_row_bytes(m->tok_embd.dtype, m->n_embd, &rb);
	moe_dequantize_row(m->tok_embd.dtype, (const uint8_t *)m->tok_embd.data + rb * (uint64_t)tok, out, m->n_embd);
	return 0;
}
