/* test_ffn_silu.c - the gateless expert FFN (MOE_FFN_SILU: y = down(silu(up
 * x)), what llama.cpp's build_moe_ffn computes for LLM_FFN_SILU when an
 * expert has no ffn_gate_exps) against a plain double-precision reference,
 * on every CPU path this machine has, one token and batched, in both q8
 * modes.
 *
 * Bound (first order, as tests/test_ffn.c's header explains; u = 2^-24):
 * up row r: |du_r| <= e_in * (S_r + Q_r) + Q_r with S_r = sum |w x|, e_in
 * the f32 dot bound K u (+ 2^-8 where x meets bf16 weights as bf16) and Q_r
 * = sum |w_c| q_c, q_c the error of quantizing x_c when the path does
 * (q8_0 in INT mode, q8_K for K-quants: 0.57 of the block's max / 127);
 * |dh| <= 1.1 |du| + 8u|h| (|silu'| <= 1.1); the down row likewise with h.
 * The check allows twice that. A wrong activation (no silu, or silu(u) * u
 * as SwiGLU with gate = up) is off by O(|y|), far outside it. */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "ffn.h"
#include "ffn_testutil.h"
#include "model.h"
#include "pack.h"

#define N_HID 256u /* hidden: whole q4_K super-blocks for up's columns */
#define M_EXP 256u /* expert width: likewise for down's */

struct silu_expert {
	struct moe_model_config cfg;
	struct pack_part_desc parts[2]; /* up, down */
	struct ffn_layout L;
	uint8_t *ext;
	double *up, *down; /* the decoded weights, [m x n] and [n x m] */
};

/* rows x cols of type t: random values encoded (f32/f16/bf16 from f32,
 * q8_0/q4_0/mxfp4 through dtype.c's ggml reference quantizers), or, for
 * q4_K, random blocks with small d and dmin; then decoded back to double
 * (moe_dequantize_row: checked against ggml elsewhere). */
static void fill(enum moe_dtype t, uint32_t rows, uint32_t cols, uint8_t *dst, double *dec)
{
	uint64_t rb = 0;
	cr_assert(moe_dtype_row_bytes(t, cols, &rb));
	float *v = malloc(sizeof(float) * cols);
	const float a = 1.0f / sqrtf((float)cols) * 1.7f;
	for (uint32_t r = 0; r < rows; r++) {
		uint8_t *row = dst + (size_t)r * rb;
		for (uint32_t c = 0; c < cols; c++)
			v[c] = rng_f(-a, a);
		if (t == MOE_DTYPE_Q4_K) {
			/* 144-byte blocks: f16 d, f16 dmin, 12 bytes of 6-bit
			 * scales and mins, 128 bytes of nibbles */
			const uint64_t bb = moe_dtype_block_bytes(t);
			for (uint64_t i = 0; i < rb; i++)
				row[i] = (uint8_t)rng_u64();
			for (uint64_t b = 0; b < rb; b += bb) {
				uint16_t d = moe_f32_to_f16(1.0f / 2048.0f), dm = moe_f32_to_f16(1.0f / 4096.0f);
				memcpy(row + b, &d, 2);
				memcpy(row + b + 2, &dm, 2);
			}
		} else if (!ffn_test_encode_row(t, v, row, cols)) {
			cr_assert_fail("no encoder for %s", moe_dtype_name(t));
		}
		moe_dequantize_row(t, row, v, cols);
		for (uint32_t c = 0; c < cols; c++)
			dec[(size_t)r * cols + c] = v[c];
	}
	free(v);
}

static void make_expert(struct silu_expert *e, enum moe_dtype tup, enum moe_dtype tdn)
{
	const uint32_t n = N_HID, m = M_EXP;
	uint64_t rbu = 0, rbd = 0;
	memset(e, 0, sizeof(*e));
	moe_model_set_family_defaults(&e->cfg, MOE_FAMILY_MIXTRAL);
	e->cfg.ffn_kind = MOE_FFN_SILU;
	e->cfg.hidden = n;
	e->cfg.expert_width = m;
	cr_assert(moe_dtype_row_bytes(tup, n, &rbu) && moe_dtype_row_bytes(tdn, m, &rbd));
	const uint64_t ub = rbu * m, db = rbd * n, doff = (ub + 63) & ~63ull;
	e->parts[0] = (struct pack_part_desc){ PACK_ROLE_UP, tup, m, n, 0, ub };
	e->parts[1] = (struct pack_part_desc){ PACK_ROLE_DOWN, tdn, n, m, doff, db };
	e->ext = aligned_alloc(64, (doff + db + 63) & ~63ull);
	e->up = malloc(sizeof(double) * m * n);
	e->down = malloc(sizeof(double) * n * m);
	cr_assert(e->ext && e->up && e->down);
	fill(tup, m, n, e->ext, e->up);
	fill(tdn, n, m, e->ext + doff, e->down);
	struct moe_error err = { { 0 } };
	cr_assert_eq(ffn_layout_init(&e->L, &e->cfg, e->parts, 2, doff + db, &err), 0, "%s", err.msg);
	cr_assert_eq(e->L.kind, MOE_FFN_SILU);
}

static void free_expert(struct silu_expert *e)
{
	free(e->ext);
	free(e->up);
	free(e->down);
}

static bool is_k(enum moe_dtype t) { return moe_dtype_block_elems(t) == 256; }

/* Per-element error of the quantized copy of v the path takes (see the
 * header), 0 where it takes v as is. */
static void quant_err(enum moe_dtype t, const double *v, const double *slack, uint32_t len, double *e)
{
	const bool q = is_k(t) || (ffn_get_q8_mode() == FFN_Q8_INT && (t == MOE_DTYPE_Q8_0 || t == MOE_DTYPE_Q4_0));
	ffn_test_quant_err(q, is_k(t) ? 256 : 32, v, slack, len, e);
}

/* y = down(silu(up x)) in double, and each output's bound */
static void reference(const struct silu_expert *e, const float *x, double *y, double *bound)
{
	const uint32_t n = N_HID, m = M_EXP;
	const enum moe_dtype tup = e->parts[0].dtype, tdn = e->parts[1].dtype;
	double xd[N_HID], xe[N_HID], h[M_EXP], dh[M_EXP], he[M_EXP];
	const double ein = ffn_test_dot_tol(ffn_get_isa(), tup, n);
	const double edn = ffn_test_dot_tol(ffn_get_isa(), tdn, m);

	for (uint32_t c = 0; c < n; c++)
		xd[c] = x[c];
	quant_err(tup, xd, NULL, n, xe);
	for (uint32_t i = 0; i < m; i++) {
		double u = 0, S = 0, Q = 0;
		for (uint32_t c = 0; c < n; c++) {
			const double w = e->up[(size_t)i * n + c];
			u += w * xd[c];
			S += fabs(w * xd[c]);
			Q += fabs(w) * xe[c];
		}
		h[i] = u / (1.0 + exp(-u));
		dh[i] = 1.1 * (ein * (S + Q) + Q) + 8 * U_F32 * fabs(h[i]);
		if (ffn_get_isa() == FFN_ISA_AVX512BF16 && tdn == MOE_DTYPE_BF16)
			dh[i] += fabs(h[i]) / 256.0; /* h rounded to bf16 for the down matmul */
	}
	quant_err(tdn, h, dh, m, he);
	ffn_test_ref_down(e->down, NULL, n, m, h, dh, he, edn, y, bound);
}

static void check(enum ffn_isa isa, enum ffn_q8_mode mode)
{
	static const enum moe_dtype types[][2] = {
		{ MOE_DTYPE_F32, MOE_DTYPE_F32 },   { MOE_DTYPE_F16, MOE_DTYPE_F16 },   { MOE_DTYPE_BF16, MOE_DTYPE_BF16 },
		{ MOE_DTYPE_Q8_0, MOE_DTYPE_Q8_0 }, { MOE_DTYPE_Q4_0, MOE_DTYPE_Q4_0 }, { MOE_DTYPE_MXFP4, MOE_DTYPE_MXFP4 },
		{ MOE_DTYPE_Q4_K, MOE_DTYPE_Q8_0 }, { MOE_DTYPE_F32, MOE_DTYPE_BF16 },
	};
	static const uint32_t Bs[] = { 1, 3, 16, 64 };
	const uint32_t n = N_HID;

	if (!ffn_isa_supported(isa))
		cr_skip_test("this CPU lacks the %s path", ffn_isa_name(isa));
	cr_assert_eq(ffn_set_isa(isa), 0);
	cr_assert_eq(ffn_set_q8_mode(mode), 0);
	rng_seed(17 + isa * 2 + mode);
	for (size_t d = 0; d < sizeof(types) / sizeof(types[0]); d++) {
		struct silu_expert e;
		make_expert(&e, types[d][0], types[d][1]);
		cr_assert_eq(ffn_layout_flops_per_token(&e.L), 4ull * N_HID * M_EXP);
		for (size_t bi = 0; bi < sizeof(Bs) / sizeof(Bs[0]); bi++) {
			const uint32_t B = Bs[bi];
			float *x = malloc(sizeof(float) * B * n), *y = malloc(sizeof(float) * B * n);
			float *y1 = malloc(sizeof(float) * n), *y2 = malloc(sizeof(float) * B * n);
			double ry[N_HID], bd[N_HID];
			for (size_t i = 0; i < (size_t)B * n; i++)
				x[i] = rng_f(-1.0f, 1.0f);
			cr_assert_eq(ffn_expert(&e.L, e.ext, x, n, B, y, n, NULL, 0, 1), 0);
			double worst = 0;
			for (uint32_t t = 0; t < B; t++) {
				reference(&e, x + (size_t)t * n, ry, bd);
				for (uint32_t k = 0; k < n; k++) {
					const double got = y[(size_t)t * n + k];
					cr_assert(fabs(got - ry[k]) <= bd[k],
						  "%s q8 %s up %s down %s B=%u tok %u out %u: %.9g vs %.9g (bound %.3g)",
						  ffn_isa_name(isa), mode == FFN_Q8_INT ? "int" : "exact",
						  moe_dtype_name(types[d][0]), moe_dtype_name(types[d][1]), B, t, k, got,
						  ry[k], bd[k]);
					worst = fmax(worst, fabs(ry[k]));
				}
			}
			/* the outputs are not all ~0 (a bound over nothing) */
			cr_assert(worst > 1e-3, "outputs too small to test (%g)", worst);
			/* one token alone, and two threads, give the batch's bits */
			cr_assert_eq(ffn_expert(&e.L, e.ext, x + (size_t)(B - 1) * n, n, 1, y1, n, NULL, 0, 1), 0);
			cr_assert(memcmp(y1, y + (size_t)(B - 1) * n, 4ull * n) == 0, "batch of %u differs from one token",
				  B);
			cr_assert_eq(ffn_expert(&e.L, e.ext, x, n, B, y2, n, NULL, 0, 2), 0);
			cr_assert(memcmp(y2, y, 4ull * n * B) == 0, "two threads changed the result");
			/* FFN_ACCUMULATE: y2 = y + 0.5 * expert(x), added as ffn_axpy does */
			float sc[64];
			for (uint32_t t = 0; t < B; t++)
				sc[t] = 0.5f;
			for (size_t i = 0; i < (size_t)B * n; i++)
				y2[i] = 1.0f;
			cr_assert_eq(ffn_expert(&e.L, e.ext, x, n, B, y2, n, sc, FFN_ACCUMULATE, 1), 0);
			for (size_t i = 0; i < (size_t)B * n; i++)
				cr_assert(y2[i] == 1.0f + 0.5f * y[i], "accumulate %zu: %a vs %a", i, (double)y2[i],
					  (double)(1.0f + 0.5f * y[i]));
			free(x);
			free(y);
			free(y1);
			free(y2);
		}
		free_expert(&e);
	}
}

Test(ffn_silu, ref_exact, .timeout = 120) { check(FFN_ISA_REF, FFN_Q8_EXACT); }
Test(ffn_silu, ref_int, .timeout = 120) { check(FFN_ISA_REF, FFN_Q8_INT); }
Test(ffn_silu, avx2_exact, .timeout = 120) { check(FFN_ISA_AVX2, FFN_Q8_EXACT); }
Test(ffn_silu, avx2_int, .timeout = 120) { check(FFN_ISA_AVX2, FFN_Q8_INT); }
Test(ffn_silu, avx512_exact, .timeout = 120) { check(FFN_ISA_AVX512, FFN_Q8_EXACT); }
Test(ffn_silu, avx512_int, .timeout = 120) { check(FFN_ISA_AVX512, FFN_Q8_INT); }
Test(ffn_silu, avx512bf16_exact, .timeout = 120) { check(FFN_ISA_AVX512BF16, FFN_Q8_EXACT); }

/* The layout: up and down only; a gate part, or a missing up, is refused;
 * the CUDA kernels (SwiGLU and GPT-OSS only) refuse the kind. */
Test(ffn_silu, layout_checks, .timeout = 10)
{
	struct silu_expert e;
	struct moe_error err = { { 0 } };
	rng_seed(5);
	make_expert(&e, MOE_DTYPE_F32, MOE_DTYPE_F32);
	struct ffn_layout L;
	const uint64_t bytes = e.parts[1].offset + e.parts[1].bytes;
	struct pack_part_desc p[3] = { e.parts[0], e.parts[1], e.parts[0] };
	p[2].role = PACK_ROLE_GATE;
	cr_assert_eq(ffn_layout_init(&L, &e.cfg, p, 3, bytes, &err), -EINVAL);
	cr_assert(strstr(err.msg, "gate"), "%s", err.msg);
	cr_assert_eq(ffn_layout_init(&L, &e.cfg, &e.parts[1], 1, bytes, &err), -EINVAL);
	cr_assert(strstr(err.msg, "up"), "%s", err.msg);
	/* the same parts as SwiGLU lack the gate */
	struct moe_model_config c = e.cfg;
	c.ffn_kind = MOE_FFN_SWIGLU;
	cr_assert_eq(ffn_layout_init(&L, &c, e.parts, 2, bytes, &err), -EINVAL);
	/* a whole config with the kind validates (packs carry it) */
	c = e.cfg;
	c.dtype = MOE_DTYPE_F32;
	c.n_experts = 2;
	c.top_k = 1;
	c.n_layers = c.n_moe_layers = 1;
	cr_assert_eq(moe_model_validate(&c, &err), 0, "%s", err.msg);
	c.ffn_kind = MOE_FFN_SILU + 1;
	cr_assert_eq(moe_model_validate(&c, &err), -EINVAL);
	cr_assert_eq(ffn_cuda_layout_check(&e.L, &err), -ENOTSUP);
	cr_assert(strstr(err.msg, "gateless"), "%s", err.msg);
	free_expert(&e);
}
