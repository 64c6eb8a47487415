/* runner.c - see runner.h. */
#include "runner.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"

struct runner {
	const struct model *m;
	struct experts *ex;
	int threads;
	uint32_t max_batch, pos;
	struct attn_cache cache;
	struct attn_ws ws;
	float *x, *xn, *a, *ffn_inp, *moe, *sh_g, *sh_u, *sh_o, *sh_gate;
	uint32_t (*key_fn)(void *ctx, int32_t tok);
	void *key_ctx;
};

void runner_free(struct runner *r)
{
	if (!r)
		return;
	attn_cache_free(&r->cache);
	attn_ws_free(&r->ws);
	free(r->x);
	free(r->xn);
	free(r->a);
	free(r->ffn_inp);
	free(r->moe);
	free(r->sh_g);
	free(r->sh_u);
	free(r->sh_o);
	free(r->sh_gate);
	free(r);
}

int runner_create(const struct model *m, struct experts *ex, uint32_t n_ctx, uint32_t max_batch, int threads,
		  struct runner **out, struct moe_error *err)
{
	struct runner *r = calloc(1, sizeof(*r));
	int rc;
	*out = NULL;
	if (!r)
		return moe_error_set(err, -ENOMEM, "out of memory");
	r->m = m;
	r->ex = ex;
	r->threads = threads < 1 ? 1 : threads;
	r->max_batch = max_batch < 1 ? 1 : max_batch;
	if ((rc = attn_cache_init(&r->cache, m, n_ctx, err)) || (rc = attn_ws_init(&r->ws, m, r->max_batch, n_ctx, err))) {
		runner_free(r);
		return rc;
	}
	size_t bn = (size_t)r->max_batch * m->n_embd;
	uint32_t shw = 1;
	for (uint32_t il = 0; il < m->n_layers; il++)
		if (m->layers[il].sh_gate.rows > shw)
			shw = m->layers[il].sh_gate.rows;
	r->x = malloc(bn * sizeof(float));
	r->xn = malloc(bn * sizeof(float));
	r->a = malloc(bn * sizeof(float));
	r->ffn_inp = malloc(bn * sizeof(float));
	r->moe = malloc(bn * sizeof(float));
	r->sh_g = malloc((size_t)r->max_batch * shw * sizeof(float));
	r->sh_u = malloc((size_t)r->max_batch * shw * sizeof(float));
	r->sh_o = malloc(bn * sizeof(float));
	r->sh_gate = malloc((size_t)r->max_batch * sizeof(float));
	if (!r->x || !r->xn || !r->a || !r->ffn_inp || !r->moe || !r->sh_g || !r->sh_u || !r->sh_o || !r->sh_gate) {
		runner_free(r);
		return moe_error_set(err, -ENOMEM, "runner buffers: out of memory");
	}
	*out = r;
	return 0;
}

void runner_reset(struct runner *r) { r->pos = 0; }
void runner_set_kv_f16(struct runner *r, bool on) { r->cache.f16 = on; }
uint32_t runner_pos(const struct runner *r) { return r->pos; }
uint64_t runner_kv_bytes(const struct runner *r)
{
	return 2ull * r->cache.n_ctx * r->cache.n_layers * r->cache.kv_dim * sizeof(float);
}

void runner_set_token_key(struct runner *r, uint32_t (*fn)(void *ctx, int32_t tok), void *ctx)
{
	r->key_fn = fn;
	r->key_ctx = ctx;
}

static inline float silu(float x) { return x / (1.0f + expf(-x)); }

/* The shared expert, added to moe: moe += ffn_shexp(xn) * sigmoid(gate_inp . xn),
 * the sigmoid written as llama.cpp's graph computes it, silu(g) / g;
 * deepseek2's has no gate (sh_gate_inp absent): moe += ffn_shexp(xn). */
static int shared_expert(struct runner *r, const struct model_layer *L, uint32_t B)
{
	const struct model *m = r->m;
	const uint32_t n = m->n_embd, w = L->sh_gate.rows;
	int rc;
	if ((L->sh_gate_inp.data && (rc = model_matmul(&L->sh_gate_inp, r->xn, B, r->sh_gate, r->threads))) ||
	    (rc = model_matmul(&L->sh_up, r->xn, B, r->sh_u, r->threads)) ||
	    (rc = model_matmul(&L->sh_gate, r->xn, B, r->sh_g, r->threads)))
		return rc;
	for (size_t i = 0; i < (size_t)B * w; i++)
		r->sh_g[i] = silu(r->sh_g[i]) * r->sh_u[i];
	if ((rc = model_matmul(&L->sh_down, r->sh_g, B, r->sh_o, r->threads)))
		return rc;
	for (uint32_t t = 0; t < B; t++) {
		float *mo = r->moe + (size_t)t * n;
		const float *so = r->sh_o + (size_t)t * n;
		if (!L->sh_gate_inp.data) {
			for (uint32_t i = 0; i < n; i++)
				mo[i] += so[i];
			continue;
		}
		const float g = r->sh_gate[t], gate = silu(g) / g;
		for (uint32_t i = 0; i < n; i++)
			mo[i] += so[i] * gate;
	}
	return 0;
}

static int forward(struct runner *r, const int32_t *toks, uint32_t B, float *logits, bool all, struct moe_error *err)
{
	const struct model *m = r->m;
	const uint32_t n = m->n_embd;
	int rc;

	for (uint32_t t = 0; t < B; t++)
		if (model_embed(m, toks[t], r->x + (size_t)t * n))
			return moe_error_set(err, -ERANGE, "token id %d is outside the vocabulary (%u)", toks[t], m->n_vocab);
	/* one announcement per forward pass: the daemon's predictors see the
	 * token being decoded (the last one of a prefill chunk) */
	experts_set_token(r->ex, r->key_fn ? r->key_fn(r->key_ctx, toks[B - 1]) : 0, r->pos + B - 1);
	if ((rc = experts_begin(r->ex, toks, B, r->pos)))
		return moe_error_set(err, rc, "routing dump: out of memory");
	/* the first layers' hints, before the first attention */
	if ((rc = experts_pregate_embed(r->ex, r->x, B, r->threads)))
		return moe_error_set(err, rc, "pre-gating from the embeddings: %d", rc);

	for (uint32_t il = 0; il < m->n_layers; il++) {
		const struct model_layer *L = &m->layers[il];
		for (uint32_t t = 0; t < B; t++)
			attn_rmsnorm(r->x + (size_t)t * n, model_vec(&L->attn_norm), r->xn + (size_t)t * n, n, m->rms_eps);
		if ((rc = attn_block(m, il, &r->cache, &r->ws, r->pos, B, r->xn, r->a, r->threads)))
			return moe_error_set(err, rc, "attention of layer %u: %d", il, rc);
		for (size_t i = 0; i < (size_t)B * n; i++)
			r->ffn_inp[i] = r->a[i] + r->x[i];
		/* the next layers' experts, predicted from here (and their hints
		 * sent after this layer's acquires): the earliest point the
		 * residual stream of this layer is known */
		if ((rc = experts_pregate(r->ex, il, r->ffn_inp, B, r->threads)))
			return moe_error_set(err, rc, "pre-gating at layer %u: %d", il, rc);
		for (uint32_t t = 0; t < B; t++)
			attn_rmsnorm(r->ffn_inp + (size_t)t * n, model_vec(&L->ffn_norm), r->xn + (size_t)t * n, n,
				     m->rms_eps);
		if (L->moe_index < 0) { /* deepseek2's leading dense layers */
			if ((rc = model_dense_ffn(m, L, r->xn, B, r->moe, r->threads)))
				return moe_error_set(err, rc, "dense FFN of layer %u: %d", il, rc);
		} else if ((rc = experts_layer(r->ex, il, r->xn, B, r->moe, r->threads, err))) {
			return rc;
		}
		if (L->sh_gate.data && (rc = shared_expert(r, L, B)))
			return moe_error_set(err, rc, "shared expert of layer %u: %d", il, rc);
		for (size_t i = 0; i < (size_t)B * n; i++)
			r->x[i] = r->moe[i] + r->ffn_inp[i];
		if ((rc = experts_pregate_out(r->ex, il, r->x, B, r->threads)))
			return moe_error_set(err, rc, "pre-gating after layer %u: %d", il, rc);
	}
	if (!logits)
		return 0;
	uint32_t first = all ? 0 : B - 1;
	for (uint32_t t = first; t < B; t++)
		attn_rmsnorm(r->x + (size_t)t * n, model_vec(&m->output_norm), r->xn + (size_t)t * n, n, m->rms_eps);
	if ((rc = model_matmul(&m->output, r->xn + (size_t)first * n, B - first, logits, r->threads)))
		return moe_error_set(err, rc, "output head: %d", rc);
	return 0;
}

int runner_feed(struct runner *r, const int32_t *toks, uint32_t n, float *logits, bool all, struct moe_error *err)
{
	if (r->pos + n > r->cache.n_ctx)
		return moe_error_set(err, -ENOSPC, "context full: %u + %u tokens > %u (--ctx)", r->pos, n, r->cache.n_ctx);
	for (uint32_t done = 0; done < n;) {
		uint32_t B = MOE_MIN(r->max_batch, n - done);
		bool last = done + B == n;
		float *lg = NULL;
		if (logits && all)
			lg = logits + (size_t)done * r->m->n_vocab;
		else if (logits && last)
			lg = logits;
		int rc = forward(r, toks + done, B, lg, all, err);
		if (rc)
			return rc;
		r->pos += B;
		done += B;
	}
	return 0;
}
