/* test_mla.c - moe-run's deepseek2 attention and RoPE without llama.cpp:
 * the absorbed MLA of attention.c (q_nope through k_b, scores against the
 * cached latent, the output through v_b) against the decompressed
 * multi-head form (per-head keys k_b^T c and values v_b c) computed here in
 * double, over a batch then single tokens (the cache joins them); the
 * legacy attn_kv_b layout; and ggml_rope_ext's freq_factors and YaRN
 * reducing to plain RoPE where they must. The logits against llama.cpp
 * are tests/test_llama_archs.sh's. */
#include "config.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"

enum { N = 16, NH = 2, R = 8, ROT = 4, NOPE = 6, HK = NOPE + ROT, HV = 5, T = 5 };

static float rnd(uint32_t *s)
{
	*s = *s * 1664525u + 1013904223u;
	return ((float)(*s >> 8) / 16777216.0f - 0.5f);
}

static struct model_mat mat(const float *d, uint32_t rows, uint32_t cols)
{
	return (struct model_mat){ .dtype = MOE_DTYPE_F32, .rows = rows, .cols = cols, .data = d };
}

/* the rotation of pair i at pos: NORM (adjacent), theta = pos * base^(-2i/ROT) */
static void rope_ref(double *x, int pos)
{
	for (int i = 0; i < ROT / 2; i++) {
		double th = pos * pow(10000.0, -2.0 * i / ROT), c = cos(th), s = sin(th);
		double a = x[2 * i], b = x[2 * i + 1];
		x[2 * i] = a * c - b * s;
		x[2 * i + 1] = a * s + b * c;
	}
}

static float wq[NH * HK * N], wkv[(R + ROT) * N], kvn[R], wkb[NH * R * NOPE], wvb[NH * HV * R], wo[N * NH * HV];
static float xn[T * N];

static void reference(double out[T][N])
{
	double c[T][R], kpe[T][ROT];
	for (int t = 0; t < T; t++) {
		double kv[R + ROT], ss = 0;
		for (int r = 0; r < R + ROT; r++) {
			kv[r] = 0;
			for (int j = 0; j < N; j++)
				kv[r] += (double)wkv[r * N + j] * xn[t * N + j];
		}
		for (int r = 0; r < R; r++)
			ss += kv[r] * kv[r];
		for (int r = 0; r < R; r++)
			c[t][r] = kv[r] / sqrt(ss / R + 1e-6) * kvn[r];
		memcpy(kpe[t], kv + R, sizeof(kpe[t]));
		rope_ref(kpe[t], t);
	}
	for (int t = 0; t < T; t++) {
		double o[NH * HV] = { 0 };
		for (int h = 0; h < NH; h++) {
			double q[HK], sc[T], mx = -INFINITY, sum = 0;
			for (int r = 0; r < HK; r++) {
				q[r] = 0;
				for (int j = 0; j < N; j++)
					q[r] += (double)wq[(h * HK + r) * N + j] * xn[t * N + j];
			}
			rope_ref(q + NOPE, t);
			for (int j = 0; j <= t; j++) {
				/* decompressed key: k_nope = k_b^T c, then k_pe shared by the heads */
				double d = 0;
				for (int i = 0; i < NOPE; i++) {
					double kn = 0;
					for (int r = 0; r < R; r++)
						kn += (double)wkb[(h * R + r) * NOPE + i] * c[j][r];
					d += q[i] * kn;
				}
				for (int i = 0; i < ROT; i++)
					d += q[NOPE + i] * kpe[j][i];
				sc[j] = d / sqrt((double)HK);
				mx = fmax(mx, sc[j]);
			}
			for (int j = 0; j <= t; j++)
				sum += (sc[j] = exp(sc[j] - mx));
			for (int j = 0; j <= t; j++)
				for (int i = 0; i < HV; i++) {
					double v = 0;
					for (int r = 0; r < R; r++)
						v += (double)wvb[(h * HV + i) * R + r] * c[j][r];
					o[h * HV + i] += sc[j] / sum * v;
				}
		}
		for (int i = 0; i < N; i++) {
			out[t][i] = 0;
			for (int j = 0; j < NH * HV; j++)
				out[t][i] += (double)wo[i * NH * HV + j] * o[j];
		}
	}
}

static void run(const struct model_layer *L, float out[T * N])
{
	struct model m = { .arch = MODEL_ARCH_DEEPSEEK2, .n_layers = 1, .n_embd = N, .n_head = NH, .n_head_kv = 1,
			   .head_dim = R + ROT, .n_rot = ROT, .rms_eps = 1e-6f, .rope_base = 10000.0f,
			   .rope_freq_scale = 1.0f, .rope = MODEL_ROPE_NORM, .n_lora_q = L->wq_a.rows, .n_lora_kv = R,
			   .mla_k = HK, .mla_v = HV,
			   .kq_scale = 1.0f / sqrtf((float)HK), .n_ctx_train = 64,
			   .layers = (struct model_layer *)(uintptr_t)L };
	struct attn_cache c;
	struct attn_ws w;
	struct moe_error err;
	cr_assert_eq(attn_cache_init(&c, &m, 8, &err), 0);
	cr_assert_eq(c.kv_dim, R + ROT, "one latent + k_pe entry per position");
	cr_assert_eq(attn_ws_init(&w, &m, 4, 8, &err), 0);
	/* three tokens as one batch, then one at a time */
	cr_assert_eq(attn_block(&m, 0, &c, &w, 0, 3, xn, out, 1), 0);
	for (int t = 3; t < T; t++)
		cr_assert_eq(attn_block(&m, 0, &c, &w, (uint32_t)t, 1, xn + t * N, out + t * N, 2), 0);
	cr_assert_eq(attn_block(&m, 0, &c, &w, 7, 2, xn, out, 1), -ERANGE, "past the cache");
	if (L->wq_a.data) {
		m.n_lora_q--; /* q_a wider than the scratch: refused, not overrun */
		cr_assert_eq(attn_block(&m, 0, &c, &w, 0, 1, xn, out, 1), -EINVAL);
	}
	attn_ws_free(&w);
	attn_cache_free(&c);
}

static void fill(void)
{
	uint32_t s = 12345;
	for (size_t i = 0; i < sizeof(wq) / 4; i++) wq[i] = 2.0f * rnd(&s);
	for (size_t i = 0; i < sizeof(wkv) / 4; i++) wkv[i] = 2.0f * rnd(&s);
	for (size_t i = 0; i < R; i++) kvn[i] = 1.0f + rnd(&s);
	for (size_t i = 0; i < sizeof(wkb) / 4; i++) wkb[i] = 2.0f * rnd(&s);
	for (size_t i = 0; i < sizeof(wvb) / 4; i++) wvb[i] = rnd(&s);
	for (size_t i = 0; i < sizeof(wo) / 4; i++) wo[i] = rnd(&s);
	for (size_t i = 0; i < T * N; i++) xn[i] = 2.0f * rnd(&s);
}

static void check(const float *got, double ref[T][N])
{
	for (int t = 0; t < T; t++) {
		double mx = 0;
		for (int i = 0; i < N; i++)
			mx = fmax(mx, fabs(ref[t][i]));
		cr_assert(mx > 1e-3, "the attention output is not ~0 (row %d)", t);
		for (int i = 0; i < N; i++)
			cr_assert(fabs(got[t * N + i] - ref[t][i]) <= 1e-5 * mx + 1e-7, "t %d i %d: %g, want %g", t, i,
				  got[t * N + i], ref[t][i]);
	}
}

Test(mla, absorbed_equals_decompressed)
{
	fill();
	struct model_layer L = { 0 };
	L.wq = mat(wq, NH * HK, N);
	L.wkv_a = mat(wkv, R + ROT, N);
	L.kv_a_norm = mat(kvn, 1, R);
	L.wk_b = mat(wkb, NH * R, NOPE);
	L.wv_b = mat(wvb, NH * HV, R);
	L.wo = mat(wo, N, NH * HV);
	float out[T * N];
	double ref[T][N];
	run(&L, out);
	reference(ref);
	check(out, ref);
}

/* q through the LoRA: with q_a the identity, q_a_norm's weights 1 and
 * inputs of mean square 1, q = wq_b(rmsnorm(x)) is wq_b x (to the eps):
 * the same output as the plain attn_q path with wq_b's weights. */
Test(mla, q_lora_path)
{
	fill();
	for (int t = 0; t < T; t++) {
		double ss = 0;
		for (int j = 0; j < N; j++)
			ss += (double)xn[t * N + j] * xn[t * N + j];
		for (int j = 0; j < N; j++)
			xn[t * N + j] = (float)(xn[t * N + j] / sqrt(ss / N));
	}
	static float eye[N * N], ones[N];
	for (int i = 0; i < N; i++)
		eye[i * N + i] = 1.0f, ones[i] = 1.0f;
	struct model_layer L = { 0 };
	L.wq = mat(wq, NH * HK, N);
	L.wkv_a = mat(wkv, R + ROT, N);
	L.kv_a_norm = mat(kvn, 1, R);
	L.wk_b = mat(wkb, NH * R, NOPE);
	L.wv_b = mat(wvb, NH * HV, R);
	L.wo = mat(wo, N, NH * HV);
	struct model_layer Q = L;
	Q.wq = (struct model_mat){ 0 };
	Q.wq_a = mat(eye, N, N);
	Q.q_a_norm = mat(ones, 1, N);
	Q.wq_b = mat(wq, NH * HK, N);
	float a[T * N], b[T * N];
	run(&L, a);
	run(&Q, b);
	for (int i = 0; i < T * N; i++)
		cr_assert_float_eq(a[i], b[i], 1e-5 * (1.0 + fabs(a[i])), "%d: %g vs %g", i, a[i], b[i]);
}

/* ggml_rope_ext reduces to plain RoPE: freq_factors all 1, and YaRN at
 * freq_scale 1 (both thetas equal, magnitude factor 1) change no bit. */
Test(mla, rope_ext_reduces_to_rope)
{
	float x[2 * 8], y[2 * 8], z[2 * 8];
	uint32_t s = 99;
	for (int i = 0; i < 16; i++)
		x[i] = rnd(&s);
	const float ones[4] = { 1.0f, 1.0f, 1.0f, 1.0f };
	for (int mode = 0; mode <= 2; mode += 2) {
		memcpy(y, x, sizeof(x));
		attn_rope(y, 2, 8, 8, 7, 10000.0f, 1.0f, (enum model_rope)mode);
		memcpy(z, x, sizeof(x));
		struct attn_rope p = { .n_rot = 8, .n_ctx_orig = 256, .base = 10000.0f, .freq_scale = 1.0f,
				       .attn_factor = 1.0f, .freq_factors = ones, .mode = (enum model_rope)mode };
		attn_rope_ext(z, 2, 8, 7, &p);
		cr_assert_eq(memcmp(y, z, sizeof(y)), 0, "freq_factors 1");
		memcpy(z, x, sizeof(x));
		p.freq_factors = NULL;
		p.ext_factor = 1.0f;
		p.beta_fast = 32.0f;
		p.beta_slow = 1.0f;
		attn_rope_ext(z, 2, 8, 7, &p);
		cr_assert_eq(memcmp(y, z, sizeof(y)), 0, "YaRN at scale 1");
	}
}

/* freq_factors divide each pair's frequency: factor 2 at position 2 is
 * the plain rotation at position 1 for that pair; attn_factor scales. */
Test(mla, rope_freq_factors_divide)
{
	float x[4] = { 1.0f, 0.0f, 1.0f, 0.0f }, y[4];
	const float ff[2] = { 2.0f, 1.0f };
	struct attn_rope p = { .n_rot = 4, .base = 10000.0f, .freq_scale = 1.0f, .attn_factor = 1.0f,
			       .freq_factors = ff, .mode = MODEL_ROPE_NORM };
	memcpy(y, x, sizeof(x));
	attn_rope_ext(y, 1, 4, 2, &p);
	cr_assert_float_eq(y[0], cosf(1.0f), 1e-6);
	cr_assert_float_eq(y[1], sinf(1.0f), 1e-6);
	cr_assert_float_eq(y[2], cosf(0.02f), 1e-6);
	cr_assert_float_eq(y[3], sinf(0.02f), 1e-6);
	p.freq_factors = NULL;
	p.attn_factor = 0.5f;
	memcpy(y, x, sizeof(x));
	attn_rope_ext(y, 1, 4, 0, &p);
	cr_assert_float_eq(y[0], 0.5f, 1e-7);
	cr_assert_float_eq(y[1], 0.0f, 1e-7);
}
