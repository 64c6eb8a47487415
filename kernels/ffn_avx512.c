/* ffn_avx512.c - expert matmul kernels for AVX-512 (16 floats per vector),
 * plus vdpbf16ps kernels for bf16 weights on CPUs with AVX512-BF16.
 *
 * The generic kernels are ffn_simd.h, the same body as ffn_avx2.c, so the
 * tiling and block decoding run through the AVX2 tests as well. The bf16
 * dot-product kernel below is the one piece of its own: x is rounded to
 * bf16 once per token (ffn.c), then each vdpbf16ps multiplies 32 weight
 * bf16 by 32 x bf16 and adds pairs into 16 f32 lanes, halving the
 * instructions per byte of weights streamed. */
#include "config.h"

#include <immintrin.h>
#include <string.h>

#include "ffn_impl.h"

#define FN_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define FN_ATTR_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
#define SIMD_W 16
#define RMAX 4
#define TMAX 4 /* 16 accumulators + 8 x vectors + weights of 32 zmm */
#define SFX(name) name##_avx512
#define vf __m512
#define VZERO() _mm512_setzero_ps()
#define VSET1(s) _mm512_set1_ps(s)
#define VLOADU(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VSTOREU(p, v) _mm512_storeu_ps(p, v)
#define VLOAD_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)(p)))
#define VLOAD_BF16(p) \
	_mm512_castsi512_ps(_mm512_slli_epi32( \
		_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(const void *)(p))), 16))
#define VBF16_EVEN_ODD(p, ev, od) \
	do { \
		const __m512i v_ = _mm512_loadu_si512((const void *)(p)); \
		(ev) = _mm512_castsi512_ps(_mm512_slli_epi32(v_, 16)); \
		(od) = _mm512_castsi512_ps(_mm512_and_si512(v_, _mm512_set1_epi32((int)0xffff0000u))); \
	} while (0)
#define LOADB(p) _mm_loadu_si128((const __m128i *)(const void *)(p))
#define CVT_I8(v) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))

/* Same pairing order on every call: 16 -> 8 -> 4 -> 2 -> 1. */
static FN_ATTR inline float vhsum_avx512(__m512 v)
{
	__m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
				 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
	__m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
	s = _mm_add_ps(s, _mm_movehl_ps(s, s));
	s = _mm_add_ss(s, _mm_movehdup_ps(s));
	return _mm_cvtss_f32(s);
}

#include "ffn_simd.h"

const struct ffn_isa_ops ffn_ops_avx512 = {
	.mm = { SIMD_MM_TABLE, FFN_KQUANT_MM_AVX2 },
	.bf16_act_mask = 0,
	.perm_act_mask = 1u << MOE_DTYPE_BF16,
	.perm_w = 2 * SIMD_W,
	.mm_q8int = ffn_mm_q8int_avx2,
	.mm_q4int = ffn_mm_q4int_avx2,
	.mm_iq4int = ffn_mm_iq4int_avx2,
	.quant_q8 = ffn_quant_q8_avx2,
	.quant_q8k = ffn_quant_q8k_avx2,
};

/* ---- bf16 x bf16 with vdpbf16ps ------------------------------------------ */

#define DP_TMAX 4 /* 16 accumulators + 4 weights + x of 32 zmm */

/* R rows (rs bytes apart) times T tokens: y[t * ldy + i * ys]. pf: the
 * next tile's rows (same stride) to prefetch column by column, or NULL. */
static FN_ATTR_BF16 ALWAYS_INLINE void tile_bf16dp(const int R, const int T, const uint8_t *W, size_t rs,
						    uint32_t cols, const uint16_t *xb, const float *xf,
						    size_t ldx, float *y, size_t ys, size_t ldy, const uint8_t *pf)
{
	__m512 acc[RMAX][DP_TMAX];
	float tail[RMAX][DP_TMAX];
	uint32_t c = 0;

#pragma GCC unroll 8
	for (int i = 0; i < R; i++)
#pragma GCC unroll 8
		for (int t = 0; t < T; t++) {
			acc[i][t] = _mm512_setzero_ps();
			tail[i][t] = 0.0f;
		}
	for (; c + 32 <= cols; c += 32) {
		__m512bh w[RMAX];
		if (pf)
#pragma GCC unroll 8
			for (int i = 0; i < R; i++)
				_mm_prefetch((const char *)(pf + (size_t)i * rs + (size_t)c * 2), _MM_HINT_T0);
#pragma GCC unroll 8
		for (int i = 0; i < R; i++)
			w[i] = (__m512bh)_mm512_loadu_si512((const void *)(W + (size_t)i * rs + (size_t)c * 2));
#pragma GCC unroll 8
		for (int t = 0; t < T; t++) {
			const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xb + (size_t)t * ldx + c));
#pragma GCC unroll 8
			for (int i = 0; i < R; i++)
				acc[i][t] = _mm512_dpbf16_ps(acc[i][t], w[i], xv);
		}
	}
	/* fewer than 32 columns left: f32 x, as the generic kernels do */
	for (; c < cols; c++)
		for (int i = 0; i < R; i++) {
			uint16_t h;
			memcpy(&h, W + (size_t)i * rs + (size_t)c * 2, 2);
			const float wi = moe_bf16_to_f32(h);
			for (int t = 0; t < T; t++)
				tail[i][t] = __builtin_fmaf(wi, xf[(size_t)t * ldx + c], tail[i][t]);
		}
#pragma GCC unroll 8
	for (int i = 0; i < R; i++)
#pragma GCC unroll 8
		for (int t = 0; t < T; t++)
			y[(size_t)t * ldy + (size_t)i * ys] = vhsum_avx512(acc[i][t]) + tail[i][t];
}

#define DP_CALL(RR, TT, WW, RS, YY, YS, PF) \
	tile_bf16dp(RR, TT, WW, RS, cols, a->bf + (size_t)t * a->ld, a->f + (size_t)t * a->ld, a->ld, \
		    (YY) + (size_t)t * ldy, YS, ldy, PF)

/* All tokens of one tile of R rows: full tiles of 4 tokens, then the rest
 * one by one (bit-identical either way; fewer inlined shapes keep the
 * compile time down). The first group of 4 prefetches the next tile's rows
 * (pf, or NULL): in a batch the products, not DRAM, set the pace, and
 * without it each tile began with a stall on its 4 rows (one token, the
 * stream itself is the bound and software prefetch gained nothing). */
static FN_ATTR_BF16 ALWAYS_INLINE void rows_bf16dp(const int R, const uint8_t *W, size_t rs, uint32_t cols,
						    const struct ffn_act *a, float *y, size_t ys, size_t ldy,
						    const uint8_t *pf)
{
	uint32_t t = 0;
	for (; t + DP_TMAX <= a->B; t += DP_TMAX, pf = NULL)
		DP_CALL(R, DP_TMAX, W, rs, y, ys, pf);
	for (; t < a->B; t++)
		DP_CALL(R, 1, W, rs, y, ys, NULL);
}

/* Tiles of RMAX rows from the RMAX quarters of [r0, r1), then the rest, as
 * the generic kernels do (ffn_simd.h: long sequential streams). */
static FN_ATTR_BF16 void mm_bf16dp(const uint8_t *W, size_t rb, uint32_t cols, uint32_t r0, uint32_t r1,
				   const struct ffn_act *a, float *y, size_t ldy)
{
	const uint32_t q = (r1 - r0) / RMAX, rem = (r1 - r0) % RMAX;
	const uint8_t *W0 = W + (size_t)r0 * rb, *Wr = W0 + (size_t)q * RMAX * rb;
	float *yr = y + (size_t)q * RMAX;

	for (uint32_t j = 0; j < q; j++)
		rows_bf16dp(RMAX, W0 + (size_t)j * rb, (size_t)q * rb, cols, a, y + j, q, ldy,
			    a->B >= DP_TMAX && j + 1 < q ? W0 + (size_t)(j + 1) * rb : NULL);
	switch (rem) {
	case 0: break;
	case 1: rows_bf16dp(1, Wr, rb, cols, a, yr, 1, ldy, NULL); break;
	case 2: rows_bf16dp(2, Wr, rb, cols, a, yr, 1, ldy, NULL); break;
	default: rows_bf16dp(3, Wr, rb, cols, a, yr, 1, ldy, NULL); break;
	}
}

const struct ffn_isa_ops ffn_ops_avx512bf16 = {
	.mm = {
		[MOE_DTYPE_F32] = mm_f32_avx512, [MOE_DTYPE_F16] = mm_f16_avx512,
		[MOE_DTYPE_BF16] = mm_bf16dp, [MOE_DTYPE_Q8_0] = mm_q8_0_avx512,
		[MOE_DTYPE_Q4_0] = mm_q4_0_avx512, [MOE_DTYPE_MXFP4] = mm_mxfp4_avx512,
		[MOE_DTYPE_IQ4_NL] = mm_iq4_nl_avx512, FFN_KQUANT_MM_AVX2,
	},
	.bf16_act_mask = 1u << MOE_DTYPE_BF16,
	.perm_act_mask = 0, /* bf16 is vdpbf16ps, on x->bf */
	.perm_w = 0,
	.mm_q8int = ffn_mm_q8int_avx2,
	.mm_q4int = ffn_mm_q4int_avx2,
	.mm_iq4int = ffn_mm_iq4int_avx2,
	.quant_q8 = ffn_quant_q8_avx2,
	.quant_q8k = ffn_quant_q8k_avx2,
};
