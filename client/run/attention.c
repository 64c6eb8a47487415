/* attention.c - see attention.h. */
#include "attention.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

void attn_rmsnorm(const float *x, const float *w, float *y, uint32_t n, float eps)
{
	double sum = 0.0;
	for (uint32_t i = 0; i < n; i++)
		sum += (double)(x[i] * x[i]);
	const float mean = (float)(sum / n);
	const float scale = 1.0f / sqrtf(mean + eps);
	for (uint32_t i = 0; i < n; i++) {
		float v = x[i] * scale;
		y[i] = w ? v * w[i] : v;
	}
}

/* ggml's rope_yarn_ramp and ggml_rope_yarn_corr_dims */
static float rope_yarn_ramp(float low, float high, int i0)
{
	const float y = (float)(i0 / 2 - low) / fmaxf(0.001f, high - low);
	return 1.0f - fminf(1.0f, fmaxf(0.0f, y));
}

static float rope_corr_dim(uint32_t n_dims, uint32_t n_ctx_orig, float n_rot, float base)
{
	return (float)n_dims * logf((float)n_ctx_orig / (n_rot * 2.0f * (float)M_PI)) / (2.0f * logf(base));
}

void attn_rope_of(const struct model *m, struct attn_rope *p)
{
	*p = (struct attn_rope){
		.n_rot = m->n_rot,
		.n_ctx_orig = m->rope_n_ctx_orig ? m->rope_n_ctx_orig : m->n_ctx_train,
		.base = m->rope_base,
		.freq_scale = m->rope_freq_scale,
		.ext_factor = m->rope_ext_factor,
		.attn_factor = m->rope_attn_factor != 0.0f ? m->rope_attn_factor : 1.0f,
		.beta_fast = m->rope_beta_fast,
		.beta_slow = m->rope_beta_slow,
		.freq_factors = m->rope_freqs.data ? model_vec(&m->rope_freqs) : NULL,
		.mode = m->rope,
	};
}

void attn_rope_ext(float *x, uint32_t n_heads, uint32_t head_dim, uint32_t pos, const struct attn_rope *p)
{
	const uint32_t n_rot = p->n_rot;
	float cs[2 * 512], *cache = cs;
	if (n_rot > 1024 && !(cache = malloc(n_rot * sizeof(float))))
		abort();
	const float theta_scale = powf(p->base, -2.0f / (float)n_rot);
	float corr[2] = { 0.0f, 0.0f };
	if (p->ext_factor != 0.0f) {
		float start = floorf(rope_corr_dim(n_rot, p->n_ctx_orig, p->beta_fast, p->base));
		float end = ceilf(rope_corr_dim(n_rot, p->n_ctx_orig, p->beta_slow, p->base));
		corr[0] = fmaxf(0.0f, start);
		corr[1] = fminf((float)(n_rot - 1), end);
	}
	float theta = (float)pos;
	for (uint32_t i0 = 0; i0 < n_rot; i0 += 2) {
		const float ff = p->freq_factors ? p->freq_factors[i0 / 2] : 1.0f;
		const float extrap = theta / ff;
		float t = p->freq_scale * extrap, mscale = p->attn_factor;
		if (p->ext_factor != 0.0f) {
			float mix = rope_yarn_ramp(corr[0], corr[1], (int)i0) * p->ext_factor;
			t = t * (1 - mix) + extrap * mix;
			mscale *= 1.0f + 0.1f * logf(1.0f / p->freq_scale);
		}
		cache[i0] = cosf(t) * mscale;
		cache[i0 + 1] = sinf(t) * mscale;
		theta *= theta_scale;
	}
	for (uint32_t h = 0; h < n_heads; h++) {
		float *v = x + (size_t)h * head_dim;
		for (uint32_t i0 = 0; i0 < n_rot; i0 += 2) {
			const float c = cache[i0], s = cache[i0 + 1];
			float *a, *b;
			if (p->mode == MODEL_ROPE_NORM) {
				a = &v[i0];
				b = &v[i0 + 1];
			} else {
				a = &v[i0 / 2];
				b = &v[i0 / 2 + n_rot / 2];
			}
			const float x0 = *a, x1 = *b;
			*a = x0 * c - x1 * s;
			*b = x0 * s + x1 * c;
		}
	}
	if (cache != cs)
		free(cache);
}

void attn_rope(float *x, uint32_t n_heads, uint32_t head_dim, uint32_t n_rot, uint32_t pos, float base,
	       float freq_scale, enum model_rope mode)
{
	const struct attn_rope p = { .n_rot = n_rot, .base = base, .freq_scale = freq_scale, .attn_factor = 1.0f,
				     .mode = mode };
	attn_rope_ext(x, n_heads, head_dim, pos, &p);
}

int attn_cache_init(struct attn_cache *c, const struct model *m, uint32_t n_ctx, struct moe_error *err)
{
	memset(c, 0, sizeof(*c));
	c->n_ctx = n_ctx;
	c->n_layers = m->n_layers;
	const bool mla = m->arch == MODEL_ARCH_DEEPSEEK2;
	c->kv_dim = mla ? m->n_lora_kv + m->n_rot : m->n_head_kv * m->head_dim;
	size_t n = (size_t)n_ctx * c->n_layers * c->kv_dim;
	c->k = malloc(n * sizeof(float));
	c->v = mla ? NULL : malloc(n * sizeof(float));
	if (!c->k || (!mla && !c->v)) {
		attn_cache_free(c);
		return moe_error_set(err, -ENOMEM, "KV cache of %u positions: out of memory", n_ctx);
	}
	return 0;
}

void attn_cache_free(struct attn_cache *c)
{
	free(c->k);
	free(c->v);
	c->k = c->v = NULL;
}

int attn_ws_init(struct attn_ws *w, const struct model *m, uint32_t max_batch, uint32_t n_ctx, struct moe_error *err)
{
	memset(w, 0, sizeof(*w));
	w->max_batch = max_batch;
	size_t nq = (size_t)m->n_head * m->head_dim, nkv = (size_t)m->n_head_kv * m->head_dim;
	w->q = malloc(max_batch * nq * sizeof(float));
	w->o = malloc(max_batch * nq * sizeof(float));
	w->k = malloc(max_batch * nkv * sizeof(float));
	w->v = malloc(max_batch * nkv * sizeof(float));
	w->scores = malloc((size_t)n_ctx * sizeof(float));
	if (m->arch == MODEL_ARCH_DEEPSEEK2) {
		/* MLA: q [nh x mla_k], kv_a [kv_lora + rope], absorbed q [nh x
		 * (kv_lora + rope)], latent output [nh x kv_lora], o [nh x v] */
		const size_t B = max_batch, nh = m->n_head, r = m->n_lora_kv, rot = m->n_rot;
		const size_t nope = m->mla_k - rot, st = MOE_MAX(MOE_MAX(nope, r), (size_t)m->mla_v);
		free(w->q);
		free(w->o);
		free(w->k);
		w->q = malloc(B * nh * m->mla_k * sizeof(float));
		w->k = malloc(B * (r + rot) * sizeof(float));
		w->o = malloc(B * nh * m->mla_v * sizeof(float));
		w->qa = malloc(B * MOE_MAX(m->n_lora_q, 1u) * sizeof(float));
		w->qc = malloc(B * nh * (r + rot) * sizeof(float));
		w->lat = malloc(B * nh * r * sizeof(float));
		w->t1 = malloc(B * st * sizeof(float));
		w->t2 = malloc(B * st * sizeof(float));
		if (!w->qa || !w->qc || !w->lat || !w->t1 || !w->t2)
			w->scores = (free(w->scores), NULL);
	}
	if (!w->q || !w->o || !w->k || !w->v || !w->scores) {
		attn_ws_free(w);
		return moe_error_set(err, -ENOMEM, "attention scratch: out of memory");
	}
	return 0;
}

void attn_ws_free(struct attn_ws *w)
{
	free(w->q);
	free(w->k);
	free(w->v);
	free(w->o);
	free(w->scores);
	free(w->qa);
	free(w->qc);
	free(w->lat);
	free(w->t1);
	free(w->t2);
	memset(w, 0, sizeof(*w));
}

static inline float f16r(float x) { return moe_f16_to_f32(moe_f32_to_f16(x)); }

static void round_f16(float *x, size_t n)
{
	for (size_t i = 0; i < n; i++)
		x[i] = f16r(x[i]);
}

static void add_bias(float *x, const struct model_mat *b, uint32_t B, uint32_t n)
{
	if (!b->data)
		return;
	const float *v = model_vec(b);
	for (uint32_t t = 0; t < B; t++)
		for (uint32_t i = 0; i < n; i++)
			x[(size_t)t * n + i] += v[i];
}

/* ggml_soft_max_ext(kq, mask, scale) for one row: x*scale, max, exp(x - max)
 * summed in double, times 1/sum. */
static void softmax_row(float *s, uint32_t n)
{
	float max = -INFINITY;
	for (uint32_t i = 0; i < n; i++)
		max = s[i] > max ? s[i] : max;
	double sum = 0.0;
	for (uint32_t i = 0; i < n; i++) {
		s[i] = expf(s[i] - max);
		sum += (double)s[i];
	}
	const float inv = (float)(1.0 / sum);
	for (uint32_t i = 0; i < n; i++)
		s[i] *= inv;
}

int attn_block(const struct model *m, uint32_t il, struct attn_cache *c, struct attn_ws *w, uint32_t pos0, uint32_t B,
	       const float *xn, float *out, int threads)
{
	const struct model_layer *L = &m->layers[il];
	const uint32_t hd = m->head_dim, nh = m->n_head, nkvh = m->n_head_kv;
	const uint32_t nq = nh * hd, nkv = nkvh * hd;
	int rc;

	if (m->arch == MODEL_ARCH_DEEPSEEK2)
		return attn_mla_block(m, il, c, w, pos0, B, xn, out, threads);
	if (B > w->max_batch || pos0 + B > c->n_ctx)
		return -ERANGE;
	struct attn_rope rp;
	attn_rope_of(m, &rp);
	if ((rc = model_matmul(&L->wq, xn, B, w->q, threads)) || (rc = model_matmul(&L->wk, xn, B, w->k, threads)) ||
	    (rc = model_matmul(&L->wv, xn, B, w->v, threads)))
		return rc;
	add_bias(w->q, &L->bq, B, nq);
	add_bias(w->k, &L->bk, B, nkv);
	add_bias(w->v, &L->bv, B, nkv);

	for (uint32_t t = 0; t < B; t++) {
		float *q = w->q + (size_t)t * nq, *k = w->k + (size_t)t * nkv;
		if (m->arch == MODEL_ARCH_QWEN3MOE) {
			/* llama.cpp's build_norm on [head_dim, n_head, n_tokens]: per head */
			for (uint32_t h = 0; h < nh; h++)
				attn_rmsnorm(q + h * hd, model_vec(&L->q_norm), q + h * hd, hd, m->rms_eps);
			for (uint32_t h = 0; h < nkvh; h++)
				attn_rmsnorm(k + h * hd, model_vec(&L->k_norm), k + h * hd, hd, m->rms_eps);
		} else if (m->arch == MODEL_ARCH_OLMOE) {
			/* olmoe norms the 2-D [n_embd, n_tokens] projections: whole vectors */
			attn_rmsnorm(q, model_vec(&L->q_norm), q, nq, m->rms_eps);
			attn_rmsnorm(k, model_vec(&L->k_norm), k, nkv, m->rms_eps);
		}
		attn_rope_ext(q, nh, hd, pos0 + t, &rp);
		attn_rope_ext(k, nkvh, hd, pos0 + t, &rp);
		size_t at = ((size_t)il * c->n_ctx + pos0 + t) * c->kv_dim;
		if (c->f16) {
			round_f16(k, nkv);
			round_f16(w->v + (size_t)t * nkv, nkv);
			round_f16(q, nq);
		}
		memcpy(c->k + at, k, nkv * sizeof(float));
		memcpy(c->v + at, w->v + (size_t)t * nkv, nkv * sizeof(float));
	}

	const float scale = 1.0f / sqrtf((float)hd);
	const float *K = c->k + (size_t)il * c->n_ctx * c->kv_dim, *V = c->v + (size_t)il * c->n_ctx * c->kv_dim;
	const uint32_t group = nh / nkvh;
	for (uint32_t t = 0; t < B; t++) {
		const uint32_t n_kv = pos0 + t + 1; /* causal: positions 0..pos */
		for (uint32_t h = 0; h < nh; h++) {
			const float *q = w->q + (size_t)t * nq + (size_t)h * hd;
			const uint32_t kh = h / group;
			float *s = w->scores;
			for (uint32_t j = 0; j < n_kv; j++) {
				const float *kj = K + (size_t)j * c->kv_dim + (size_t)kh * hd;
				float d = 0.0f;
				for (uint32_t i = 0; i < hd; i++)
					d += q[i] * kj[i];
				s[j] = d * scale;
			}
			softmax_row(s, n_kv);
			if (c->f16)
				round_f16(s, n_kv);
			float *o = w->o + (size_t)t * nq + (size_t)h * hd;
			memset(o, 0, hd * sizeof(float));
			for (uint32_t j = 0; j < n_kv; j++) {
				const float *vj = V + (size_t)j * c->kv_dim + (size_t)kh * hd;
				const float p = s[j];
				for (uint32_t i = 0; i < hd; i++)
					o[i] += p * vj[i];
			}
		}
	}
	if ((rc = model_matmul(&L->wo, w->o, B, out, threads)))
		return rc;
	add_bias(out, &L->wo_b, B, m->n_embd); /* build_attn: after wo (and its scale) */
	return 0;
}

/* Head h's [rows x cols] slice of a per-head stack (attn_k_b, attn_v_b). */
static struct model_mat head_view(const struct model_mat *W, uint32_t h, uint32_t rows)
{
	uint64_t rb = 0;
	moe_dtype_row_bytes(W->dtype, W->cols, &rb);
	return (struct model_mat){ .dtype = W->dtype, .rows = rows, .cols = W->cols,
				   .data = (const uint8_t *)W->data + rb * rows * h };
}

int attn_mla_block(const struct model *m, uint32_t il, struct attn_cache *c, struct attn_ws *w, uint32_t pos0,
		   uint32_t B, const float *xn, float *out, int threads)
{
	const struct model_layer *L = &m->layers[il];
	const uint32_t nh = m->n_head, r = m->n_lora_kv, rot = m->n_rot, hk = m->mla_k, hv = m->mla_v;
	const uint32_t nope = hk - rot, kd = r + rot;
	int rc;

	if (B > w->max_batch || pos0 + B > c->n_ctx || c->kv_dim != kd)
		return -ERANGE;
	if (L->wq_a.data && L->wq_a.rows > m->n_lora_q) /* w->qa holds n_lora_q per token */
		return -EINVAL;
	struct attn_rope rp;
	attn_rope_of(m, &rp);
	rp.n_rot = rot;
	/* q: wq_b(rms_norm(wq_a x) * q_a_norm), or wq x (the lite form) */
	if (L->wq_a.data) {
		const uint32_t ql = L->wq_a.rows;
		if ((rc = model_matmul(&L->wq_a, xn, B, w->qa, threads)))
			return rc;
		for (uint32_t t = 0; t < B; t++)
			attn_rmsnorm(w->qa + (size_t)t * ql, model_vec(&L->q_a_norm), w->qa + (size_t)t * ql, ql, m->rms_eps);
		if ((rc = model_matmul(&L->wq_b, w->qa, B, w->q, threads)))
			return rc;
	} else if ((rc = model_matmul(&L->wq, xn, B, w->q, threads))) {
		return rc;
	}
	/* [kv_cmpr | k_pe] = wkv_a_mqa x; k_pe roped (one head), kv_cmpr normed */
	if ((rc = model_matmul(&L->wkv_a, xn, B, w->k, threads)))
		return rc;
	for (uint32_t t = 0; t < B; t++) {
		float *kv = w->k + (size_t)t * kd;
		attn_rope_ext(kv + r, 1, rot, pos0 + t, &rp);
		attn_rmsnorm(kv, model_vec(&L->kv_a_norm), kv, r, m->rms_eps);
		if (c->f16)
			round_f16(kv, kd);
		memcpy(c->k + ((size_t)il * c->n_ctx + pos0 + t) * kd, kv, kd * sizeof(float));
	}
	/* Qcur = [k_b_h q_nope_h | rope(q_pe_h)] per head */
	for (uint32_t h = 0; h < nh; h++) {
		for (uint32_t t = 0; t < B; t++)
			memcpy(w->t1 + (size_t)t * nope, w->q + ((size_t)t * nh + h) * hk, nope * sizeof(float));
		const struct model_mat kb = head_view(&L->wk_b, h, r);
		if ((rc = model_matmul(&kb, w->t1, B, w->t2, threads)))
			return rc;
		for (uint32_t t = 0; t < B; t++) {
			float *qc = w->qc + ((size_t)t * nh + h) * kd;
			memcpy(qc, w->t2 + (size_t)t * r, r * sizeof(float));
			memcpy(qc + r, w->q + ((size_t)t * nh + h) * hk + nope, rot * sizeof(float));
			attn_rope_ext(qc + r, 1, rot, pos0 + t, &rp);
			if (c->f16)
				round_f16(qc, kd);
		}
	}
	/* MQA over the cache: every head against [latent | k_pe], the
	 * output in the latent space (V = the latent part) */
	const float *K = c->k + (size_t)il * c->n_ctx * kd;
	for (uint32_t t = 0; t < B; t++) {
		const uint32_t n_kv = pos0 + t + 1;
		for (uint32_t h = 0; h < nh; h++) {
			const float *q = w->qc + ((size_t)t * nh + h) * kd;
			float *s = w->scores;
			for (uint32_t j = 0; j < n_kv; j++) {
				const float *kj = K + (size_t)j * kd;
				float d = 0.0f;
				for (uint32_t i = 0; i < kd; i++)
					d += q[i] * kj[i];
				s[j] = d * m->kq_scale;
			}
			softmax_row(s, n_kv);
			if (c->f16)
				round_f16(s, n_kv);
			float *o = w->lat + ((size_t)t * nh + h) * r;
			memset(o, 0, r * sizeof(float));
			for (uint32_t j = 0; j < n_kv; j++) {
				const float *vj = K + (size_t)j * kd, p = s[j];
				for (uint32_t i = 0; i < r; i++)
					o[i] += p * vj[i];
			}
		}
	}
	/* each head's latent output through its v_b, heads concatenated */
	for (uint32_t h = 0; h < nh; h++) {
		for (uint32_t t = 0; t < B; t++)
			memcpy(w->t1 + (size_t)t * r, w->lat + ((size_t)t * nh + h) * r, r * sizeof(float));
		const struct model_mat vb = head_view(&L->wv_b, h, hv);
		if ((rc = model_matmul(&vb, w->t1, B, w->t2, threads)))
			return rc;
		for (uint32_t t = 0; t < B; t++)
			memcpy(w->o + ((size_t)t * nh + h) * hv, w->t2 + (size_t)t * hv, hv * sizeof(float));
	}
	return model_matmul(&L->wo, w->o, B, out, threads);
}
