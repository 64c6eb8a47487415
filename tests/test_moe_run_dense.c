/* test_moe_run_dense.c - moe-run's dense pieces against values worked out by hand
 * (no llama.cpp needed): RMSNorm, both RoPE pairings, and one attention block
 * (GQA, causal softmax, QK-norm per head and over the whole vector, biases)
 * against a direct double-precision computation written here. */
#include "config.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"

Test(moe_run, rmsnorm)
{
	const float x[2] = { 3.0f, 4.0f }, w[2] = { 2.0f, 0.5f };
	float y[2];
	attn_rmsnorm(x, w, y, 2, 0.0f);
	const double s = 1.0 / sqrt(12.5);
	cr_assert_float_eq(y[0], 3.0 * s * 2.0, 1e-6);
	cr_assert_float_eq(y[1], 4.0 * s * 0.5, 1e-6);
	attn_rmsnorm(x, NULL, y, 2, 1.0f); /* eps inside the root */
	cr_assert_float_eq(y[1], 4.0 / sqrt(13.5), 1e-6);
}

/* head_dim 4, base 10000: pair 0 turns by pos, pair 1 by pos / 100. */
Test(moe_run, rope_norm_pairs_adjacent)
{
	float x[4] = { 1.0f, 0.0f, 1.0f, 0.0f };
	attn_rope(x, 1, 4, 4, 1, 10000.0f, 1.0f, MODEL_ROPE_NORM);
	cr_assert_float_eq(x[0], cos(1.0), 1e-6);
	cr_assert_float_eq(x[1], sin(1.0), 1e-6);
	cr_assert_float_eq(x[2], cos(0.01), 1e-6);
	cr_assert_float_eq(x[3], sin(0.01), 1e-6);
}

Test(moe_run, rope_neox_pairs_half_apart)
{
	float x[8] = { 1.0f, 1.0f, 0.0f, 0.0f, 2.0f, 0.0f, 0.0f, 0.0f }; /* two heads */
	attn_rope(x, 2, 4, 4, 3, 10000.0f, 1.0f, MODEL_ROPE_NEOX);
	cr_assert_float_eq(x[0], cos(3.0), 1e-6);
	cr_assert_float_eq(x[2], sin(3.0), 1e-6);
	cr_assert_float_eq(x[1], cos(0.03), 1e-6);
	cr_assert_float_eq(x[3], sin(0.03), 1e-6);
	cr_assert_float_eq(x[4], 2.0 * cos(3.0), 1e-6);
	cr_assert_float_eq(x[6], 2.0 * sin(3.0), 1e-6);
	float y[4] = { 0.5f, 0.25f, 0.0f, 0.0f };
	attn_rope(y, 1, 4, 4, 0, 10000.0f, 1.0f, MODEL_ROPE_NEOX); /* position 0: unchanged */
	cr_assert_eq(y[0], 0.5f);
	cr_assert_eq(y[1], 0.25f);
}

/* ---- one attention block against a direct computation ---------------- */

#define N 8   /* n_embd */
#define HD 4  /* head_dim */
#define NH 2  /* heads */
#define NKV 1 /* kv heads: both q heads share one */
#define T 3   /* tokens */

static float rnd(unsigned *s)
{
	*s = *s * 1664525u + 1013904223u;
	return (float)((*s >> 8) / 16777216.0 - 0.5);
}

static struct model_mat mat(float *p, uint32_t rows, uint32_t cols)
{
	return (struct model_mat){ .dtype = MOE_DTYPE_F32, .rows = rows, .cols = cols, .data = p };
}

static void ref_norm(double *v, const float *w, int n, double eps)
{
	double ss = 0;
	for (int i = 0; i < n; i++)
		ss += v[i] * v[i];
	double s = 1.0 / sqrt(ss / n + eps);
	for (int i = 0; i < n; i++)
		v[i] = v[i] * s * w[i];
}

static void ref_rope(double *v, int pos, enum model_rope mode)
{
	for (int i = 0; i < HD / 2; i++) {
		double th = pos * pow(10000.0, -2.0 * i / HD);
		int a = mode == MODEL_ROPE_NORM ? 2 * i : i, b = mode == MODEL_ROPE_NORM ? 2 * i + 1 : i + HD / 2;
		double x0 = v[a], x1 = v[b];
		v[a] = x0 * cos(th) - x1 * sin(th);
		v[b] = x0 * sin(th) + x1 * cos(th);
	}
}

static void check_block(enum model_arch arch)
{
	static float wq[NH * HD * N], wk[NKV * HD * N], wv[NKV * HD * N], wo[N * NH * HD];
	static float bq[NH * HD], bk[NKV * HD], bv[NKV * HD], qn[N], kn[N], xn[T * N];
	unsigned s = 7 + (unsigned)arch;
	for (size_t i = 0; i < sizeof(wq) / 4; i++) wq[i] = rnd(&s);
	for (size_t i = 0; i < sizeof(wk) / 4; i++) wk[i] = rnd(&s);
	for (size_t i = 0; i < sizeof(wv) / 4; i++) wv[i] = rnd(&s);
	for (size_t i = 0; i < sizeof(wo) / 4; i++) wo[i] = rnd(&s);
	for (size_t i = 0; i < NH * HD; i++) bq[i] = rnd(&s);
	for (size_t i = 0; i < NKV * HD; i++) bk[i] = rnd(&s), bv[i] = rnd(&s);
	for (size_t i = 0; i < N; i++) qn[i] = 1.0f + rnd(&s), kn[i] = 1.0f + rnd(&s);
	for (size_t i = 0; i < T * N; i++) xn[i] = 2.0f * rnd(&s);

	struct model_layer L = { 0 };
	L.wq = mat(wq, NH * HD, N);
	L.wk = mat(wk, NKV * HD, N);
	L.wv = mat(wv, NKV * HD, N);
	L.wo = mat(wo, N, NH * HD);
	if (arch == MODEL_ARCH_QWEN2MOE) {
		L.bq = mat(bq, 1, NH * HD);
		L.bk = mat(bk, 1, NKV * HD);
		L.bv = mat(bv, 1, NKV * HD);
	}
	if (arch == MODEL_ARCH_QWEN3MOE || arch == MODEL_ARCH_OLMOE) {
		uint32_t nq = arch == MODEL_ARCH_OLMOE ? NH * HD : HD, nk = arch == MODEL_ARCH_OLMOE ? NKV * HD : HD;
		L.q_norm = mat(qn, 1, nq);
		L.k_norm = mat(kn, 1, nk);
	}
	struct model m = { .arch = arch, .n_layers = 1, .n_embd = N, .n_head = NH, .n_head_kv = NKV, .head_dim = HD,
			   .n_rot = HD, .rms_eps = 1e-6f, .rope_base = 10000.0f, .rope_freq_scale = 1.0f,
			   .rope = arch == MODEL_ARCH_LLAMA ? MODEL_ROPE_NORM : MODEL_ROPE_NEOX, .layers = &L };
	struct attn_cache c;
	struct attn_ws w;
	struct moe_error err;
	cr_assert_eq(attn_cache_init(&c, &m, 8, &err), 0);
	cr_assert_eq(attn_ws_init(&w, &m, 4, 8, &err), 0);
	float out[T * N];
	/* two tokens as one batch, the third alone: the cache joins them */
	cr_assert_eq(attn_block(&m, 0, &c, &w, 0, 2, xn, out, 1), 0);
	cr_assert_eq(attn_block(&m, 0, &c, &w, 2, 1, xn + 2 * N, out + 2 * N, 2), 0);

	double q[T][NH * HD], k[T][NKV * HD], v[T][NKV * HD];
	for (int t = 0; t < T; t++) {
		for (int r = 0; r < NH * HD; r++) {
			q[t][r] = L.bq.data ? bq[r] : 0;
			for (int j = 0; j < N; j++)
				q[t][r] += (double)wq[r * N + j] * xn[t * N + j];
		}
		for (int r = 0; r < NKV * HD; r++) {
			k[t][r] = L.bk.data ? bk[r] : 0;
			v[t][r] = L.bv.data ? bv[r] : 0;
			for (int j = 0; j < N; j++) {
				k[t][r] += (double)wk[r * N + j] * xn[t * N + j];
				v[t][r] += (double)wv[r * N + j] * xn[t * N + j];
			}
		}
		if (arch == MODEL_ARCH_QWEN3MOE) {
			for (int h = 0; h < NH; h++)
				ref_norm(q[t] + h * HD, qn, HD, 1e-6);
			ref_norm(k[t], kn, HD, 1e-6);
		} else if (arch == MODEL_ARCH_OLMOE) {
			ref_norm(q[t], qn, NH * HD, 1e-6);
			ref_norm(k[t], kn, NKV * HD, 1e-6);
		}
		for (int h = 0; h < NH; h++)
			ref_rope(q[t] + h * HD, t, m.rope);
		ref_rope(k[t], t, m.rope);
	}
	for (int t = 0; t < T; t++) {
		double o[NH * HD] = { 0 };
		for (int h = 0; h < NH; h++) {
			double sc[T], mx = -1e300, sum = 0;
			for (int j = 0; j <= t; j++) {
				sc[j] = 0;
				for (int i = 0; i < HD; i++)
					sc[j] += q[t][h * HD + i] * k[j][i]; /* kv head 0 */
				sc[j] /= sqrt((double)HD);
				mx = sc[j] > mx ? sc[j] : mx;
			}
			for (int j = 0; j <= t; j++)
				sum += (sc[j] = exp(sc[j] - mx));
			for (int j = 0; j <= t; j++)
				for (int i = 0; i < HD; i++)
					o[h * HD + i] += sc[j] / sum * v[j][i];
		}
		for (int r = 0; r < N; r++) {
			double y = 0;
			for (int i = 0; i < NH * HD; i++)
				y += (double)wo[r * NH * HD + i] * o[i];
			cr_assert_float_eq(out[t * N + r], y, 1e-5, "arch %d token %d row %d: %g vs %g", arch, t, r,
					   out[t * N + r], y);
		}
	}
	attn_ws_free(&w);
	attn_cache_free(&c);
}

Test(moe_run, attention_llama) { check_block(MODEL_ARCH_LLAMA); }
Test(moe_run, attention_qwen2moe_biases) { check_block(MODEL_ARCH_QWEN2MOE); }
Test(moe_run, attention_qwen3moe_qk_norm_per_head) { check_block(MODEL_ARCH_QWEN3MOE); }
Test(moe_run, attention_olmoe_qk_norm_whole) { check_block(MODEL_ARCH_OLMOE); }
