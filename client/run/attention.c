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

void attn_rope(float *x, uint32_t n_heads, uint32_t head_dim, uint32_t n_rot, uint32_t pos, float base,
	       float freq_scale, enum model_rope mode)
{
	float cs[2 * 512], *cache = cs;
	if (n_rot > 1024 && !(cache = malloc(n_rot * sizeof(float))))
		abort();
	const float theta_scale = powf(base, -2.0f / (float)n_rot);
	float theta = (float)pos;
	for (uint32_t i0 = 0; i0 < n_rot; i0 += 2) {
		float t = freq_scale * theta;
		cache[i0] = cosf(t);
		cache[i0 + 1] = sinf(t);
		theta *= theta_scale;
	}
	for (uint32_t h = 0; h < n_heads; h++) {
		float *v = x + (size_t)h * head_dim;
		for (uint32_t i0 = 0; i0 < n_rot; i0 += 2) {
			const float c = cache[i0], s = cache[i0 + 1];
			float *a, *b;
			if (mode == MODEL_ROPE_NORM) {
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

int attn_cache_init(struct attn_cache *c, const struct model *m, uint32_t n_ctx, struct moe_error *err)
{
	memset(c, 0, sizeof(*c));
	c->n_ctx = n_ctx;
	c->n_layers = m->n_layers;
	c->kv_dim = m->n_head_kv * m->head_dim;
	size_t n = (size_t)n_ctx * c->n_layers * c->kv_dim;
	c->k = malloc(n * sizeof(float));
	c->v = malloc(n * sizeof(float));
	if (!c->k || !c->v) {
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

	if (B > w->max_batch || pos0 + B > c->n_ctx)
		return -ERANGE;
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
		attn_rope(q, nh, hd, m->n_rot, pos0 + t, m->rope_base, m->rope_freq_scale, m->rope);
		attn_rope(k, nkvh, hd, m->n_rot, pos0 + t, m->rope_base, m->rope_freq_scale, m->rope);
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
	return model_matmul(&L->wo, w->o, B, out, threads);
}
