/* ffn_testutil.h - for the CPU expert FFN tests (tests/test_ffn.c,
 * tests/test_ffn_silu.c): deterministic random numbers, random weight rows
 * in the pack's dtypes, and the pieces of the error bounds both derive
 * (tests/test_ffn.c's header explains them; u = 2^-24). */
#ifndef MOETIER_TESTS_FFN_TESTUTIL_H
#define MOETIER_TESTS_FFN_TESTUTIL_H

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "dtype.h"
#include "ffn.h"

#define U_F32 (1.0 / 16777216.0)

/* ---- random numbers (deterministic per test: splitmix64) ---- */

static uint64_t rng_state;
static inline void rng_seed(uint64_t s) { rng_state = s * 0x9e3779b97f4a7c15ull + 1; }
static inline uint64_t rng_u64(void)
{
	uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}
static inline float rng_f(float lo, float hi)
{
	return lo + (hi - lo) * (float)((rng_u64() >> 40) * (1.0 / 16777216.0));
}

/* One row of cols values v in dtype t, encoded with the project's
 * conversions and quantizers (dtype.c, ggml's reference ones), so scales
 * and codes look like real checkpoints: f32, f16, bf16, q8_0, q4_0 and
 * mxfp4. false (nothing written) for another dtype: the caller encodes it. */
static inline bool ffn_test_encode_row(enum moe_dtype t, const float *v, uint8_t *row, uint32_t cols)
{
	switch (t) {
	case MOE_DTYPE_F32: memcpy(row, v, 4ull * cols); return true;
	case MOE_DTYPE_F16:
	case MOE_DTYPE_BF16:
		for (uint32_t c = 0; c < cols; c++) {
			uint16_t h = t == MOE_DTYPE_F16 ? moe_f32_to_f16(v[c]) : moe_f32_to_bf16(v[c]);
			memcpy(row + 2ull * c, &h, 2);
		}
		return true;
	case MOE_DTYPE_Q8_0: moe_quantize_row_q8_0(v, (void *)row, cols); return true;
	case MOE_DTYPE_Q4_0: moe_quantize_row_q4_0(v, (void *)row, cols); return true;
	case MOE_DTYPE_MXFP4: moe_quantize_row_mxfp4(v, (void *)row, cols); return true;
	default: return false;
	}
}

/* Relative bound on |y - exact| / sum|w x| for one f32 dot of length K
 * (gamma_K), plus 2^-8 where the AVX512-BF16 path rounds x to bf16 to meet
 * bf16 weights. */
static inline double ffn_test_dot_tol(enum ffn_isa isa, enum moe_dtype t, uint32_t K)
{
	double g = K * U_F32 / (1.0 - K * U_F32);
	if (isa == FFN_ISA_AVX512BF16 && t == MOE_DTYPE_BF16)
		g += 2.0 / 512.0;
	return g;
}

/* Per-element error of the quantized copy of v (n values, blocks of bs:
 * 32 for q8_0, 256 for q8_K) a path takes when quantizes: each element errs
 * by at most |q (f16(d) - d)| + d/2 <= (127 * 2^-11 + 0.5) d < 0.57 d,
 * d = (block max |v| + slack) / 127; 0 everywhere when it does not. */
static inline void ffn_test_quant_err(bool quantizes, uint32_t bs, const double *v, const double *slack, uint32_t n,
				      double *e)
{
	for (uint32_t b = 0; b < n; b += bs) {
		double amax = 0;
		for (uint32_t i = b; i < b + bs && i < n; i++)
			amax = fmax(amax, fabs(v[i]) + (slack ? slack[i] : 0));
		for (uint32_t i = b; i < b + bs && i < n; i++)
			e[i] = quantizes ? 0.57 * amax / 127.0 : 0.0;
	}
}

/* The reference down projection, in double: y[k] = sum_i down[k][i] h[i]
 * (+ bias[k] when bias is not NULL) for k < n, down [n x m] row-major, and
 * each output's bound: twice the first-order error from h's own error dh,
 * the error he of the copy of h the path quantizes, and the f32 dot (edn,
 * ffn_test_dot_tol) plus one rounding, relative to S = sum |terms|. */
static inline void ffn_test_ref_down(const double *down, const double *bias, uint32_t n, uint32_t m, const double *h,
				     const double *dh, const double *he, double edn, double *y, double *bound)
{
	for (uint32_t k = 0; k < n; k++) {
		double acc = 0, S = 0, P = 0;
		for (uint32_t i = 0; i < m; i++) {
			const double w = down[(size_t)k * m + i];
			acc += w * h[i];
			S += fabs(w * h[i]);
			P += fabs(w) * (dh[i] + he[i] * (1 + edn));
		}
		if (bias) {
			acc += bias[k];
			S += fabs(bias[k]);
		}
		y[k] = acc;
		bound[k] = 2.0 * (edn * S + P + U_F32 * S) + 1e-30;
	}
}

#endif
