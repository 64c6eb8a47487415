/* ffn_avx2.c - expert matmul kernels for AVX2 + FMA + F16C (8 floats per
 * vector). The body is ffn_simd.h; only the primitives live here. Every
 * function carries its own target attribute, so the file builds without
 * -mavx2 and the binary still runs on CPUs without AVX2 (ffn.c only calls
 * in here after __builtin_cpu_supports said yes). */
#include "config.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "ffn_impl.h"

#define FN_ATTR __attribute__((target("avx2,fma,f16c")))
#define SIMD_W 8
#define RMAX 4
#define TMAX 2 /* 8 accumulators + 4 x vectors + weights fit in 16 ymm */
#define INT_TMAX 2 /* integer kernels, batches: 2 rows x 2 tokens */
#define SFX(name) name##_avx2
#define vf __m256
#define VZERO() _mm256_setzero_ps()
#define VSET1(s) _mm256_set1_ps(s)
#define VLOADU(p) _mm256_loadu_ps(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define VSTOREU(p, v) _mm256_storeu_ps(p, v)
#define VLOAD_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(p)))
#define VLOAD_BF16(p) \
	_mm256_castsi256_ps(_mm256_slli_epi32( \
		_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(const void *)(p))), 16))
#define VBF16_EVEN_ODD(p, ev, od) \
	do { \
		const __m256i v_ = _mm256_loadu_si256((const __m256i *)(const void *)(p)); \
		(ev) = _mm256_castsi256_ps(_mm256_slli_epi32(v_, 16)); \
		(od) = _mm256_castsi256_ps(_mm256_and_si256(v_, _mm256_set1_epi32((int)0xffff0000u))); \
	} while (0)
#define LOADB(p) _mm_loadl_epi64((const __m128i *)(const void *)(p))
#define CVT_I8(v) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))

static FN_ATTR inline float vhsum_avx2(__m256 v)
{
	__m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
	s = _mm_add_ps(s, _mm_movehl_ps(s, s));
	s = _mm_add_ss(s, _mm_movehdup_ps(s));
	return _mm_cvtss_f32(s);
}

#include "ffn_simd.h"

/* q8_0 and q4_0 weights times x quantized to q8_0 (ggml's scheme), one
 * exact integer dot per 32-block, converted to f32 and scaled by d_w * d_x
 * into 8 lanes; the lanes are summed at the end.
 * - q8_0: |w| as unsigned bytes times x with w's sign (vpsignb), pairs
 *   summed by vpmaddubsw, then vpmaddwd.
 * - q4_0: the 16 bytes broadcast to both halves, the upper half shifted
 *   by 4 (vpsrlvq), masked: nibbles 0..15 as unsigned bytes in element
 *   order (low nibbles are elements 0..15, high ones 16..31); vpmaddubsw
 *   with x, minus vpmaddubsw(8, x) computed once per block for all rows
 *   (sum (q - 8) x = sum q x - 8 sum x, all in int16 without overflow:
 *   |pair| <= 2 * 15 * 127).
 * R rows (rs bytes apart) times T tokens (ldq blocks apart), compile-time
 * R and T so the accumulators stay in registers; a row's blocks are loaded
 * and prepared once for all T tokens. y[t * ldy + i * ys]. Each (row,
 * token) runs the same sequence whatever the tile, so batches give the
 * same bits. */
static FN_ATTR ALWAYS_INLINE void int_tile(const int DT, const int R, const int T, const uint8_t *W, size_t rs,
					    uint32_t nb, const struct moe_block_q8_0 *xq, size_t ldq, float *y,
					    size_t ys, size_t ldy)
{
	const size_t bb = DT == MOE_DTYPE_Q8_0 ? 34 : 18; /* q4_0, iq4_nl */
	const __m256i ones = _mm256_set1_epi16(1), nib_mask = _mm256_set1_epi8(0x0f);
	const __m256i hi_by4 = _mm256_set_epi64x(4, 4, 0, 0);
	const __m256i iq4_tab = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(const void *)tab_iq4nl_avx2));
	__m256 acc[RMAX][INT_TMAX];

#pragma GCC unroll 4
	for (int i = 0; i < R; i++)
#pragma GCC unroll 2
		for (int t = 0; t < T; t++)
			acc[i][t] = _mm256_setzero_ps();
	for (uint32_t b = 0; b < nb; b++) {
		__m256i xv[INT_TMAX], x8[INT_TMAX];
		float dx[INT_TMAX];
#pragma GCC unroll 2
		for (int t = 0; t < T; t++) {
			xv[t] = _mm256_loadu_si256((const __m256i *)(const void *)xq[(size_t)t * ldq + b].qs);
			dx[t] = _cvtsh_ss(xq[(size_t)t * ldq + b].d);
			x8[t] = DT == MOE_DTYPE_Q4_0 ? _mm256_maddubs_epi16(_mm256_set1_epi8(8), xv[t])
						     : _mm256_setzero_si256();
		}
#pragma GCC unroll 4
		for (int i = 0; i < R; i++) {
			const uint8_t *blk = W + (size_t)i * rs + (size_t)b * bb;
			uint16_t h;
			__m256i wv, wa;
			memcpy(&h, blk, 2);
			const float dw = _cvtsh_ss(h);
			if (DT == MOE_DTYPE_Q8_0) {
				wv = _mm256_loadu_si256((const __m256i *)(const void *)(blk + 2));
				wa = _mm256_sign_epi8(wv, wv); /* |w| as unsigned bytes */
			} else {
				const __m256i q2 = _mm256_broadcastsi128_si256(
					_mm_loadu_si128((const __m128i *)(const void *)(blk + 2)));
				wv = wa = _mm256_and_si256(_mm256_srlv_epi64(q2, hi_by4), nib_mask);
				if (DT == MOE_DTYPE_IQ4_NL) {
					/* codes -> levels (int8), then as q8_0 */
					wv = _mm256_shuffle_epi8(iq4_tab, wv);
					wa = _mm256_sign_epi8(wv, wv);
				}
			}
#pragma GCC unroll 2
			for (int t = 0; t < T; t++) {
				__m256i p16;
				if (DT == MOE_DTYPE_Q8_0 || DT == MOE_DTYPE_IQ4_NL)
					p16 = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(xv[t], wv));
				else
					p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(wa, xv[t]), x8[t]);
				const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
				acc[i][t] = _mm256_fmadd_ps(dot, _mm256_set1_ps(dw * dx[t]), acc[i][t]);
			}
		}
	}
#pragma GCC unroll 4
	for (int i = 0; i < R; i++)
#pragma GCC unroll 2
		for (int t = 0; t < T; t++)
			y[(size_t)t * ldy + (size_t)i * ys] = vhsum_avx2(acc[i][t]);
}

/* All tokens of one R-row tile: pairs of tokens through 2-row halves of
 * it (4 x 2 accumulators do not fit beside the operands), then the last
 * token alone through all R rows. */
static FN_ATTR ALWAYS_INLINE void int_rows(const int DT, const int R, const uint8_t *W, size_t rs, uint32_t nb,
					    const struct ffn_act *a, float *y, size_t ys, size_t ldy)
{
	uint32_t t = 0;
	for (; t + INT_TMAX <= a->B; t += INT_TMAX) {
		const struct moe_block_q8_0 *xq = a->q8 + (size_t)t * a->ldq;
		float *yt = y + (size_t)t * ldy;
		if (R >= 2)
			int_tile(DT, 2, INT_TMAX, W, rs, nb, xq, a->ldq, yt, ys, ldy);
		if (R == 4)
			int_tile(DT, 2, INT_TMAX, W + 2 * rs, rs, nb, xq, a->ldq, yt + 2 * ys, ys, ldy);
		if (R == 1 || R == 3)
			int_tile(DT, 1, INT_TMAX, W + (size_t)(R - 1) * rs, rs, nb, xq, a->ldq,
				 yt + (size_t)(R - 1) * ys, ys, ldy);
	}
	if (t < a->B)
		int_tile(DT, R, 1, W, rs, nb, a->q8 + (size_t)t * a->ldq, a->ldq, y + (size_t)t * ldy, ys, ldy);
}

/* Rows [r0, r1): tiles of RMAX rows from the RMAX quarters of the range
 * (long sequential streams, see ffn_simd.h), then the rest; each tile
 * runs every token while its rows are in L1. */
static FN_ATTR ALWAYS_INLINE void int_mm(const int DT, const uint8_t *W, size_t rb, uint32_t cols, uint32_t r0,
					  uint32_t r1, const struct ffn_act *a, float *y, size_t ldy)
{
	const uint32_t nb = cols / 32, q = (r1 - r0) / RMAX, rem = (r1 - r0) % RMAX;
	const uint8_t *W0 = W + (size_t)r0 * rb, *Wr = W0 + (size_t)q * RMAX * rb;
	float *yr = y + (size_t)q * RMAX;

	for (uint32_t j = 0; j < q; j++)
		int_rows(DT, RMAX, W0 + (size_t)j * rb, (size_t)q * rb, nb, a, y + j, q, ldy);
	switch (rem) {
	case 0: break;
	case 1: int_rows(DT, 1, Wr, rb, nb, a, yr, 1, ldy); break;
	case 2: int_rows(DT, 2, Wr, rb, nb, a, yr, 1, ldy); break;
	default: int_rows(DT, 3, Wr, rb, nb, a, yr, 1, ldy); break;
	}
}

FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_q8int_avx2, int_mm, MOE_DTYPE_Q8_0)

FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_q4int_avx2, int_mm, MOE_DTYPE_Q4_0)

FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_iq4int_avx2, int_mm, MOE_DTYPE_IQ4_NL)

/* moe_quantize_row_q8_0, 8 lanes at a time, giving the same blocks for
 * finite x: d = amax / 127 (to f16 by the same routine), q = x * (1 / d)
 * rounded half away from zero (truncate |v|, add 1 where the dropped part
 * is >= 0.5, which is exact for |v| < 2^23). Where 1 / d overflows (d is
 * 0 in f16 then, so the codes do not matter) the codes are 0. ~10x faster than the scalar
 * loop (16 us for 2048 floats), which otherwise costs ~5% of a one-token
 * q8_0 expert. */
FN_ATTR void ffn_quant_q8_avx2(const float *x, struct moe_block_q8_0 *out, uint32_t n)
{
	const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
	const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
	const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);

	for (uint32_t b = 0; b < n / 32; b++) {
		const float *p = x + (size_t)b * 32;
		__m256 v[4], m;
#pragma GCC unroll 4
		for (int k = 0; k < 4; k++)
			v[k] = _mm256_loadu_ps(p + 8 * k);
		m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
				  _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
		__m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
		m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
		m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
		const float d = _mm_cvtss_f32(m4) / 127.0f, inv = d != 0.0f ? 1.0f / d : 0.0f;
		/* max |x| < ~4e-37: 1 / d overflows (and d is 0 in f16); codes 0 */
		const __m256 id = _mm256_set1_ps(isinf(inv) ? 0.0f : inv);
		__m256i q[4];
#pragma GCC unroll 4
		for (int k = 0; k < 4; k++) {
			const __m256 s = _mm256_mul_ps(v[k], id);
			const __m256 a = _mm256_and_ps(s, abs_mask);
			const __m256 t = _mm256_round_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
			const __m256 r = _mm256_add_ps(t, _mm256_and_ps(_mm256_cmp_ps(_mm256_sub_ps(a, t), half, _CMP_GE_OQ), one));
			q[k] = _mm256_cvttps_epi32(_mm256_or_ps(r, _mm256_andnot_ps(abs_mask, s)));
		}
		/* packs work within 128-bit halves: the dword order fixes it */
		const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
		_mm256_storeu_si256((__m256i *)(void *)out[b].qs, _mm256_permutevar8x32_epi32(w, order));
		out[b].d = moe_f32_to_f16(d);
	}
}


/* ---- K-quants x q8_K ------------------------------------------------------ */

/* Sum of the 8 int32 lanes (exact, so any order). */
static FN_ATTR inline int32_t hsum_i32_avx2(__m256i v)
{
	__m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
	s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
	s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
	return _mm_cvtsi128_si32(s);
}

/* 16 int16 pair sums of 32 elements (vpmaddubsw of unsigned codes by
 * signed x; |pair| <= 2 * 63 * 127 fits) times per-lane int16 scales,
 * added in pairs to int32 (vpmaddwd). */
static FN_ATTR ALWAYS_INLINE __m256i kq_dot32(__m256i q, const int8_t *x, __m256i scales)
{
	const __m256i p = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)(const void *)x));
	return _mm256_madd_epi16(p, scales);
}

/* From 8 int16 scales in each 128-bit half (s16), the vpmaddwd operand of
 * a 32-element chunk: scale a in lanes 0..7 (elements 0..15), scale b in
 * lanes 8..15. One vpshufb; a and b are constants after unrolling. */
static FN_ATTR ALWAYS_INLINE __m256i kq_pick(__m256i s16, int a, int b)
{
	const short ca = (short)((2 * a + 1) << 8 | 2 * a), cb = (short)((2 * b + 1) << 8 | 2 * b);
	return _mm256_shuffle_epi8(s16, _mm256_set_m128i(_mm_set1_epi16(cb), _mm_set1_epi16(ca)));
}

/* 2-bit field `shift` of each byte (shift 0, 2, 4, 6). */
static FN_ATTR ALWAYS_INLINE __m256i bits2(__m256i v, int shift)
{
	return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(shift)), _mm256_set1_epi8(3));
}

static FN_ATTR ALWAYS_INLINE uint32_t ld32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return v;
}

#define KQ_TMAX 4 /* tokens sharing one decode of a weight super-block */

/* One super-block times T (1, 2 or KQ_TMAX) q8_K blocks: the exact integer
 * isum[t] and imin[t] of ffn_kq_accum, equal to ref_kq_block's. The weight
 * side (codes, scales) is decoded once for the T tokens. Codes are taken
 * unsigned (vpmaddubsw needs an unsigned operand); the types with signed
 * codes take off offset * scale * bsum (q6_K: 32, q3_K: 4), folded into
 * the same int32 lanes, or (iq4_xs, signed levels) multiply |w| by x with
 * w's sign, as q8_0. Scales are unpacked with 32-bit word operations (the
 * bit layout of moe_kquant_scale_min / moe_q3_K_scale, four at a time) and
 * widened to int16 once per super-block; the bsums products are vpmaddwd. */
static FN_ATTR ALWAYS_INLINE void kq_block(const int DT, const int T, const uint8_t *blk,
					    const struct moe_block_q8_K *const *xb, int32_t *isum, int32_t *imin,
					    float *d, float *dmin)
{
	const __m256i m4 = _mm256_set1_epi8(0x0f);
	__m256i acc[KQ_TMAX];
	int32_t im[KQ_TMAX] = { 0 };
	uint16_t h;

#pragma GCC unroll 4
	for (int t = 0; t < T; t++)
		acc[t] = _mm256_setzero_si256();
#define BSUMS(t) _mm256_loadu_si256((const __m256i *)(const void *)xb[t]->bsums)
#define XQ(t, off) (xb[t]->qs + (off))
	if (DT == MOE_DTYPE_Q4_K || DT == MOE_DTYPE_Q5_K) {
		const bool q5 = DT == MOE_DTYPE_Q5_K;
		const uint8_t *sp = blk + 4, *qs = blk + (q5 ? 48 : 16);
		const uint32_t w0 = ld32(sp), w1 = ld32(sp + 4), w2 = ld32(sp + 8);
		/* scales 0..3 | 4..7 and mins 0..3 | 4..7, one byte each */
		const uint32_t sc_lo = w0 & 0x3f3f3f3fu, mn_lo = w1 & 0x3f3f3f3fu;
		const uint32_t sc_hi = (w2 & 0x0f0f0f0fu) | ((w0 >> 6) & 0x03030303u) << 4;
		const uint32_t mn_hi = ((w2 >> 4) & 0x0f0f0f0fu) | ((w1 >> 6) & 0x03030303u) << 4;
		const __m128i sc8 = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)sc_hi, (int)sc_lo));
		const __m128i mn8 = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)mn_hi, (int)mn_lo));
#pragma GCC unroll 4
		for (int t = 0; t < T; t++) {
			/* sums of the 32-element sub-blocks of x: pairs of bsums
			 * (each |pair| <= 32 * 127, so 16 bits hold it) */
			const __m256i bs = BSUMS(t);
			const __m128i b32 = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
			__m128i mi = _mm_madd_epi16(mn8, b32);
			mi = _mm_add_epi32(mi, _mm_shuffle_epi32(mi, _MM_SHUFFLE(1, 0, 3, 2)));
			mi = _mm_add_epi32(mi, _mm_shuffle_epi32(mi, _MM_SHUFFLE(2, 3, 0, 1)));
			im[t] = _mm_cvtsi128_si32(mi);
		}
		const __m256i s16 = _mm256_broadcastsi128_si256(sc8);
		const __m256i qh = q5 ? _mm256_loadu_si256((const __m256i *)(const void *)(blk + 16)) : _mm256_setzero_si256();
#pragma GCC unroll 4
		for (int j = 0; j < 4; j++) {
			const __m256i q = _mm256_loadu_si256((const __m256i *)(const void *)(qs + 32 * j));
			__m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
			if (q5) {
				const __m256i one = _mm256_set1_epi8(1);
				const __m256i h0 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j)), one);
				const __m256i h1 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j + 1)), one);
				lo = _mm256_or_si256(lo, _mm256_slli_epi16(h0, 4));
				hi = _mm256_or_si256(hi, _mm256_slli_epi16(h1, 4));
			}
			const __m256i pl = kq_pick(s16, 2 * j, 2 * j), ph = kq_pick(s16, 2 * j + 1, 2 * j + 1);
#pragma GCC unroll 4
			for (int t = 0; t < T; t++) {
				acc[t] = _mm256_add_epi32(acc[t], kq_dot32(lo, XQ(t, 64 * j), pl));
				acc[t] = _mm256_add_epi32(acc[t], kq_dot32(hi, XQ(t, 64 * j + 32), ph));
			}
		}
		memcpy(&h, blk, 2);
		*d = _cvtsh_ss(h);
		memcpy(&h, blk + 2, 2);
		*dmin = _cvtsh_ss(h);
	} else if (DT == MOE_DTYPE_Q6_K || DT == MOE_DTYPE_Q3_K) {
		__m128i sc8; /* the 16 signed scales */
		if (DT == MOE_DTYPE_Q6_K) {
			sc8 = _mm_loadu_si128((const __m128i *)(const void *)(blk + 192));
		} else {
			const uint8_t *sp = blk + 96;
			const uint32_t w0 = ld32(sp), w1 = ld32(sp + 4), w2 = ld32(sp + 8);
			const uint32_t a0 = (w0 & 0x0f0f0f0fu) | (w2 & 0x03030303u) << 4;
			const uint32_t a1 = (w1 & 0x0f0f0f0fu) | ((w2 >> 2) & 0x03030303u) << 4;
			const uint32_t a2 = ((w0 >> 4) & 0x0f0f0f0fu) | ((w2 >> 4) & 0x03030303u) << 4;
			const uint32_t a3 = ((w1 >> 4) & 0x0f0f0f0fu) | ((w2 >> 6) & 0x03030303u) << 4;
			sc8 = _mm_sub_epi8(_mm_set_epi32((int)a3, (int)a2, (int)a1, (int)a0), _mm_set1_epi8(32));
		}
		const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
		/* the offset (32 or 4) times sum of scale * bsum, in the lanes */
#pragma GCC unroll 4
		for (int t = 0; t < T; t++)
			acc[t] = _mm256_sub_epi32(acc[t], _mm256_slli_epi32(_mm256_madd_epi16(sc16, BSUMS(t)),
									     DT == MOE_DTYPE_Q6_K ? 5 : 2));
		const __m256i sA = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(sc16));      /* scales 0..7 */
		const __m256i sB = _mm256_broadcastsi128_si256(_mm256_extracti128_si256(sc16, 1)); /* 8..15 */
		if (DT == MOE_DTYPE_Q6_K) {
#pragma GCC unroll 2
			for (int hh = 0; hh < 2; hh++) {
				const __m256i sv = hh ? sB : sA;
				const __m256i l0 = _mm256_loadu_si256((const __m256i *)(const void *)(blk + 64 * hh));
				const __m256i l1 = _mm256_loadu_si256((const __m256i *)(const void *)(blk + 64 * hh + 32));
				const __m256i qh = _mm256_loadu_si256((const __m256i *)(const void *)(blk + 128 + 32 * hh));
				/* group g: low (g < 2) or high nibbles of l0 (even g) or
				 * l1 (odd g), with bit pair 2g of qh; built one at a time
				 * so T accumulators fit beside them */
#pragma GCC unroll 4
				for (int g = 0; g < 4; g++) {
					const __m256i l = g & 1 ? l1 : l0;
					const __m256i lo4 = g < 2 ? _mm256_and_si256(l, m4) : _mm256_and_si256(_mm256_srli_epi16(l, 4), m4);
					const __m256i qv = _mm256_or_si256(lo4, _mm256_slli_epi16(bits2(qh, 2 * g), 4));
					const __m256i pk = kq_pick(sv, 2 * g, 2 * g + 1);
#pragma GCC unroll 4
					for (int t = 0; t < T; t++)
						acc[t] = _mm256_add_epi32(acc[t], kq_dot32(qv, XQ(t, 128 * hh + 32 * g), pk));
				}
			}
			memcpy(&h, blk + 208, 2);
		} else {
			const __m256i hm = _mm256_loadu_si256((const __m256i *)(const void *)blk);
			const __m256i one = _mm256_set1_epi8(1);
#pragma GCC unroll 2
			for (int hh = 0; hh < 2; hh++) {
				const __m256i sv = hh ? sB : sA;
				const __m256i q = _mm256_loadu_si256((const __m256i *)(const void *)(blk + 32 + 32 * hh));
#pragma GCC unroll 4
				for (int g = 0; g < 4; g++) {
					const __m256i hb = _mm256_and_si256(_mm256_srl_epi16(hm, _mm_cvtsi32_si128(4 * hh + g)), one);
					const __m256i qu = _mm256_or_si256(bits2(q, 2 * g), _mm256_slli_epi16(hb, 2));
					const __m256i pk = kq_pick(sv, 2 * g, 2 * g + 1);
#pragma GCC unroll 4
					for (int t = 0; t < T; t++)
						acc[t] = _mm256_add_epi32(acc[t], kq_dot32(qu, XQ(t, 128 * hh + 32 * g), pk));
				}
			}
			memcpy(&h, blk + 108, 2);
		}
		*d = _cvtsh_ss(h);
		*dmin = 0.0f;
	} else if (DT == MOE_DTYPE_IQ4_XS) {
		/* 8 sub-blocks of 32 laid out as iq4_nl codes; levels are signed,
		 * so |w| by x with w's sign, as q8_0 */
		const struct moe_block_iq4_xs *b = (const void *)blk;
		const __m256i tab = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(const void *)tab_iq4nl_avx2));
		const __m256i hi_by4 = _mm256_set_epi64x(4, 4, 0, 0);
#pragma GCC unroll 8
		for (int sb = 0; sb < 8; sb++) {
			const __m256i q2 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(const void *)(b->qs + 16 * sb)));
			const __m256i wv = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srlv_epi64(q2, hi_by4), m4));
			const __m256i wa = _mm256_sign_epi8(wv, wv);
			const __m256i ls = _mm256_set1_epi16((short)moe_iq4_xs_scale(b, sb));
#pragma GCC unroll 4
			for (int t = 0; t < T; t++) {
				const __m256i xv = _mm256_loadu_si256((const __m256i *)(const void *)XQ(t, 32 * sb));
				const __m256i p = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(xv, wv));
				acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(p, ls));
			}
		}
		*d = _cvtsh_ss(b->d);
		*dmin = 0.0f;
	} else { /* Q2_K */
		const __m128i s8 = _mm_loadu_si128((const __m128i *)(const void *)blk);
		const __m128i m8 = _mm_set1_epi8(0x0f);
		const __m256i sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(s8, m8));
		const __m256i mn16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(s8, 4), m8));
#pragma GCC unroll 4
		for (int t = 0; t < T; t++)
			im[t] = hsum_i32_avx2(_mm256_madd_epi16(mn16, BSUMS(t)));
		const __m256i sA = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(sc16));
		const __m256i sB = _mm256_broadcastsi128_si256(_mm256_extracti128_si256(sc16, 1));
#pragma GCC unroll 2
		for (int hh = 0; hh < 2; hh++) {
			const __m256i sv = hh ? sB : sA;
			const __m256i q = _mm256_loadu_si256((const __m256i *)(const void *)(blk + 16 + 32 * hh));
#pragma GCC unroll 4
			for (int g = 0; g < 4; g++) {
				const __m256i qg = bits2(q, 2 * g), pk = kq_pick(sv, 2 * g, 2 * g + 1);
#pragma GCC unroll 4
				for (int t = 0; t < T; t++)
					acc[t] = _mm256_add_epi32(acc[t], kq_dot32(qg, XQ(t, 128 * hh + 32 * g), pk));
			}
		}
		memcpy(&h, blk + 80, 2);
		*d = _cvtsh_ss(h);
		memcpy(&h, blk + 82, 2);
		*dmin = _cvtsh_ss(h);
	}
#undef BSUMS
#undef XQ
#pragma GCC unroll 4
	for (int t = 0; t < T; t++) {
		isum[t] = hsum_i32_avx2(acc[t]);
		imin[t] = im[t];
	}
}

/* R rows (rs bytes apart) times T tokens (ldq blocks apart):
 * y[t * ldy + i * ys]. One token (decode) unrolls the R rows, whose 4
 * streams then interleave; batches loop over them (code size). */
static FN_ATTR ALWAYS_INLINE void kq_tile(const int DT, const int R, const int T, const uint8_t *W, size_t rs,
					   uint32_t nb, const struct moe_block_q8_K *xq, size_t ldq, float *y, size_t ys,
					   size_t ldy)
{
	const size_t bb = DT == MOE_DTYPE_Q4_K ? 144 : DT == MOE_DTYPE_Q5_K ? 176 : DT == MOE_DTYPE_Q6_K ? 210 :
			  DT == MOE_DTYPE_Q3_K ? 110 : DT == MOE_DTYPE_IQ4_XS ? 136 : 84;
	float acc[RMAX][KQ_TMAX] = { { 0 } };
	for (uint32_t b = 0; b < nb; b++) {
		const struct moe_block_q8_K *xb[KQ_TMAX];
#pragma GCC unroll 4
		for (int t = 0; t < T; t++)
			xb[t] = xq + (size_t)t * ldq + b;
#define KQ_ROW(i) \
	do { \
		int32_t isum[KQ_TMAX], imin[KQ_TMAX]; \
		float d, dmin; \
		kq_block(DT, T, W + (size_t)(i) * rs + (size_t)b * bb, xb, isum, imin, &d, &dmin); \
		for (int t = 0; t < T; t++) \
			acc[i][t] = ffn_kq_accum(acc[i][t], d, dmin, xb[t]->d, isum[t], imin[t]); \
	} while (0)
		if (T == 1) {
#pragma GCC unroll 4
			for (int i = 0; i < R; i++)
				KQ_ROW(i);
		} else {
#pragma GCC unroll 1
			for (int i = 0; i < R; i++)
				KQ_ROW(i);
		}
#undef KQ_ROW
	}
#pragma GCC unroll 4
	for (int i = 0; i < R; i++)
#pragma GCC unroll 4
		for (int t = 0; t < T; t++)
			y[(size_t)t * ldy + (size_t)i * ys] = acc[i][t];
}

/* All tokens of an R-row tile: groups of KQ_TMAX tokens, then 2, then 1. */
static FN_ATTR ALWAYS_INLINE void kq_rows(const int DT, const int R, const uint8_t *W, size_t rs, uint32_t nb,
					   const struct ffn_act *a, float *y, size_t ys, size_t ldy)
{
	uint32_t t = 0;
	for (; t + KQ_TMAX <= a->B; t += KQ_TMAX)
		kq_tile(DT, R, KQ_TMAX, W, rs, nb, a->q8k + (size_t)t * a->ldqk, a->ldqk, y + (size_t)t * ldy, ys, ldy);
	if (t + 2 <= a->B) {
		kq_tile(DT, R, 2, W, rs, nb, a->q8k + (size_t)t * a->ldqk, a->ldqk, y + (size_t)t * ldy, ys, ldy);
		t += 2;
	}
	if (t < a->B)
		kq_tile(DT, R, 1, W, rs, nb, a->q8k + (size_t)t * a->ldqk, a->ldqk, y + (size_t)t * ldy, ys, ldy);
}

/* Rows [r0, r1): tiles of RMAX rows from the RMAX quarters of the range
 * (long sequential streams, see ffn_simd.h), each tile through every token
 * while its rows are in L1, then the rest one row at a time. Every (row,
 * token) runs the super-blocks in order through ffn_kq_accum on exact
 * integers whatever the tile, so batches and threads give the same bits. */
static FN_ATTR ALWAYS_INLINE void kq_mm(const int DT, const uint8_t *W, size_t rb, uint32_t cols, uint32_t r0,
					 uint32_t r1, const struct ffn_act *a, float *y, size_t ldy)
{
	const uint32_t nb = cols / 256, q = (r1 - r0) / RMAX, rem = (r1 - r0) % RMAX;
	const uint8_t *W0 = W + (size_t)r0 * rb, *Wr = W0 + (size_t)q * RMAX * rb;

	for (uint32_t j = 0; j < q; j++)
		kq_rows(DT, RMAX, W0 + (size_t)j * rb, (size_t)q * rb, nb, a, y + j, q, ldy);
	for (uint32_t i = 0; i < rem; i++)
		kq_rows(DT, 1, Wr + (size_t)i * rb, rb, nb, a, y + (size_t)q * RMAX + i, 1, ldy);
}

FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_q4_K_avx2, kq_mm, MOE_DTYPE_Q4_K)
FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_q5_K_avx2, kq_mm, MOE_DTYPE_Q5_K)
FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_q6_K_avx2, kq_mm, MOE_DTYPE_Q6_K)
FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_q3_K_avx2, kq_mm, MOE_DTYPE_Q3_K)
FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_q2_K_avx2, kq_mm, MOE_DTYPE_Q2_K)
FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_iq4_xs_avx2, kq_mm, MOE_DTYPE_IQ4_XS)

/* moe_quantize_row_q8_K 8 lanes at a time, the same blocks for finite x:
 * the first element of largest magnitude gives iscale = -127 / max; codes
 * are vcvtps2dq of x * iscale (round to nearest even, as rintf in the
 * default rounding mode), clamped to 127; NaN elements are skipped by the
 * max and get code 0, as there. */
FN_ATTR void ffn_quant_q8k_avx2(const float *x, struct moe_block_q8_K *out, uint32_t n)
{
	const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
	const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), c127 = _mm256_set1_epi32(127);

	for (uint32_t b = 0; b < n / 256; b++) {
		const float *p = x + (size_t)b * 256;
		struct moe_block_q8_K *o = &out[b];
		__m256 m = _mm256_setzero_ps();
		/* vmaxps returns its second operand when either is NaN: NaN
		 * elements are skipped, as by the scalar ax > amax */
		for (int k = 0; k < 32; k++)
			m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(p + 8 * k), abs_mask), m);
		__m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
		m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
		m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
		const float amax = _mm_cvtss_f32(m4);
		float max = 0.0f;
		if (amax > 0.0f) {
			const __m256 am = _mm256_set1_ps(amax);
			for (int k = 0; k < 32; k++) {
				const int hit = _mm256_movemask_ps(
					_mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(p + 8 * k), abs_mask), am, _CMP_EQ_OQ));
				if (hit) {
					max = p[8 * k + __builtin_ctz((unsigned)hit)];
					break;
				}
			}
		}
		const float iscale = max != 0.0f ? -127.0f / max : 0.0f;
		if (!isfinite(iscale) || iscale == 0.0f) {
			memset(o, 0, sizeof(*o));
			continue;
		}
		const __m256 is = _mm256_set1_ps(iscale);
		for (int k = 0; k < 8; k++) {
			__m256i q[4];
#pragma GCC unroll 4
			for (int i = 0; i < 4; i++) {
				const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(p + 32 * k + 8 * i), is);
				/* NaN elements get code 0 (vcvtps2dq would give INT_MIN) */
				q[i] = _mm256_and_si256(_mm256_min_epi32(_mm256_cvtps_epi32(v), c127),
							_mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q)));
			}
			const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
			_mm256_storeu_si256((__m256i *)(void *)(o->qs + 32 * k), _mm256_permutevar8x32_epi32(w, order));
		}
		for (int g = 0; g < 16; g++) {
			/* 16 codes: pairs by vpmaddubsw with ones would need a
			 * sign trick; the scalar sum is cheap next to the block */
			int s = 0;
			for (int j = 0; j < 16; j++)
				s += o->qs[16 * g + j];
			o->bsums[g] = (int16_t)s;
		}
		o->d = 1.0f / iscale;
	}
}

const struct ffn_isa_ops ffn_ops_avx2 = {
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
