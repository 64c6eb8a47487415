/* ffn_vnni.c - the batched integer kernels (FFN_Q8_INT: q8_0, q4_0 and
 * iq4_nl weights times x quantized to q8_0) on AVX-512 VNNI (vpdpbusd).
 * ffn.c puts them in the AVX-512 tables when the CPU has AVX512-VNNI; a
 * batch of fewer than VN_MIN_B tokens (decode) runs the AVX2 kernel, which
 * streams the weights at the memory bound already.
 *
 * Same bits as the AVX2 kernel (ffn_avx2.c int_tile), so a token alone
 * and in a batch, and the AVX2 and AVX-512 paths, agree exactly: there,
 * each (row, token) accumulator is 8 f32 lanes, lane k of block b gets
 * fma((float)dot_k, dw * dx, acc_k), dot_k the exact integer sum of the
 * block's products 4k..4k+3, and the lanes are summed at the end in one
 * fixed order. Here a zmm holds two such 8-lane accumulators, the same
 * token against two rows (low half row 2p, high half row 2p + 1), and
 * every lane runs that same sequence:
 *  - dot_k comes from one vpdpbusd of unsigned weight bytes by signed x:
 *    q8_0 and iq4_nl weights as w + 128, q4_0 as its nibble (w + 8), the
 *    offset taken off by starting the accumulator at -128 (or -8) times
 *    the lane's sum of x (computed once per token and block). All exact
 *    in int32, so dot_k is the AVX2 kernel's vpmaddubsw + vpmaddwd value.
 *  - the scale is the f32 product dw * dx, one vmulps (IEEE, the same
 *    rounding as the scalar product there), and one fma as there.
 * Per (2 rows, token, block): vpdpbusd, vcvtdq2ps, vmulps, vfmadd, with
 * the x block broadcast once per token and block for 8 rows, and the
 * weights decoded once per row tile (8 rows) for every token. The AVX2
 * kernel spends about 7 instructions per (row, token, block) instead.
 *
 * Tiles: 8 rows (4 pairs) x 4 tokens, 16 zmm accumulators. A row tile's
 * weights are decoded into a small buffer (L1), x's blocks and offsets
 * (all tokens) into another (L2); while a row tile computes, the next
 * one's rows are prefetched, spread over its block steps, since only the
 * decode pass reads them from DRAM. */
#include "config.h"

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "ffn_impl.h"

#define FN_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define ALWAYS_INLINE inline __attribute__((always_inline))

#define VN_RP 4    /* row pairs per tile */
#define VN_T 4     /* tokens per tile */
#define VN_MIN_B 4 /* fewer tokens: the AVX2 kernel (same bits) */

/* iq4_nl levels + 128 (moe_kvalues_iq4nl: -127 ... 113 -> 1 ... 241). */
static const uint8_t vn_iq4nl_u8[16] __attribute__((aligned(16))) = {
	1, 24, 45, 63, 79, 93, 106, 118, 129, 141, 153, 166, 181, 197, 217, 241 };

/* vhsum_avx2's order (ffn_avx2.c): 8 -> 4 -> 2 -> 1. */
static FN_ATTR inline float vn_hsum8(__m256 v)
{
	__m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
	s = _mm_add_ps(s, _mm_movehl_ps(s, s));
	s = _mm_add_ss(s, _mm_movehdup_ps(s));
	return _mm_cvtss_f32(s);
}

/* x, once per call: for token t and block b, xr[(t * nb + b) * 16] holds
 * the 32 codes (8 ints) then the 8 int32 lane offsets -off * (sum of the
 * lane's 4 codes); dx[t * nb + b] the block's scale as f32. off: 128 for
 * q8_0 / iq4_nl weights, 8 for q4_0 (log2 in sh). */
static FN_ATTR void vn_x_prep(const struct ffn_act *a, uint32_t nb, int sh, int32_t *xr, float *dx)
{
	const __m256i ones = _mm256_set1_epi8(1);
	for (uint32_t t = 0; t < a->B; t++)
		for (uint32_t b = 0; b < nb; b++) {
			const struct moe_block_q8_0 *xb = a->q8 + (size_t)t * a->ldq + b;
			const __m256i q = _mm256_loadu_si256((const __m256i *)(const void *)xb->qs);
			const __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones, q);
			int32_t *o = xr + ((size_t)t * nb + b) * 16;
			_mm256_store_si256((__m256i *)(void *)o, q);
			_mm256_store_si256((__m256i *)(void *)(o + 8),
					   _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(s, sh)));
			dx[(size_t)t * nb + b] = _cvtsh_ss(xb->d);
		}
}

/* Rows [0, nr) (nr <= 2 * VN_RP) of W as RP = ceil(nr / 2) pairs: per
 * block b and pair p, wp[(b * RP + p) * 64] holds row 2p's 32 weights in
 * the low 32 bytes and row 2p + 1's (row 2p again for an odd last row) in
 * the high ones, as unsigned bytes (w + 128, or the q4_0 nibble), and
 * dwp[(b * RP + p) * 2] the two rows' scales as f32. */
static FN_ATTR ALWAYS_INLINE void vn_w_prep(const int DT, const uint8_t *W, size_t rb, uint32_t nr, uint32_t nb,
					    uint8_t *wp, float *dwp)
{
	const size_t bb = DT == MOE_DTYPE_Q8_0 ? 34 : 18;
	const uint32_t RP = (nr + 1) / 2;
	const __m512i nib_shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0), m4 = _mm512_set1_epi8(0x0f);
	const __m512i tab = _mm512_broadcast_i32x4(_mm_load_si128((const __m128i *)(const void *)vn_iq4nl_u8));

	for (uint32_t b = 0; b < nb; b++)
		for (uint32_t p = 0; p < RP; p++) {
			const uint8_t *A = W + (size_t)(2 * p) * rb + (size_t)b * bb;
			const uint8_t *B = 2 * p + 1 < nr ? A + rb : A;
			__m512i v;
			if (DT == MOE_DTYPE_Q8_0) {
				v = _mm512_inserti64x4(
					_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(const void *)(A + 2))),
					_mm256_loadu_si256((const __m256i *)(const void *)(B + 2)), 1);
				v = _mm512_xor_si512(v, _mm512_set1_epi8((char)0x80));
			} else {
				/* 16 bytes to both 128-bit lanes of each half; the upper
				 * lane shifted by 4: nibbles in element order */
				const __m256i la = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(const void *)(A + 2)));
				const __m256i lb = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(const void *)(B + 2)));
				v = _mm512_inserti64x4(_mm512_castsi256_si512(la), lb, 1);
				v = _mm512_and_si512(_mm512_srlv_epi64(v, nib_shift), m4);
				if (DT == MOE_DTYPE_IQ4_NL)
					v = _mm512_shuffle_epi8(tab, v);
			}
			_mm512_store_si512((void *)(wp + ((size_t)b * RP + p) * 64), v);
			uint16_t ha, hb;
			memcpy(&ha, A, 2);
			memcpy(&hb, B, 2);
			dwp[((size_t)b * RP + p) * 2] = _cvtsh_ss(ha);
			dwp[((size_t)b * RP + p) * 2 + 1] = _cvtsh_ss(hb);
		}
}

/* RP row pairs (prepared) times T tokens from t0: y[t * ldy + row], rows
 * < nr. Prefetches pf_n lines from *pf (the next row tile) per block step,
 * up to pf_end. */
static FN_ATTR ALWAYS_INLINE void vn_tile(const int RP, const int T, const uint8_t *wp, const float *dwp,
					  uint32_t nb, const int32_t *xr, const float *dx, uint32_t nr, float *y,
					  size_t ldy, const uint8_t **pf, const uint8_t *pf_end, uint32_t pf_n)
{
	const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
	__m512 acc[VN_RP][VN_T];

#pragma GCC unroll 4
	for (int p = 0; p < RP; p++)
#pragma GCC unroll 4
		for (int t = 0; t < T; t++)
			acc[p][t] = _mm512_setzero_ps();
	for (uint32_t b = 0; b < nb; b++) {
		__m512i xv[VN_T];
		for (uint32_t k = 0; k < pf_n && *pf < pf_end; k++, *pf += 64)
			_mm_prefetch((const char *)*pf, _MM_HINT_T1);
#pragma GCC unroll 4
		for (int t = 0; t < T; t++)
			xv[t] = _mm512_broadcast_i64x4(
				_mm256_load_si256((const __m256i *)(const void *)(xr + ((size_t)t * nb + b) * 16)));
#pragma GCC unroll 4
		for (int p = 0; p < RP; p++) {
			const __m512i w = _mm512_load_si512((const void *)(wp + ((size_t)b * RP + p) * 64));
			const __m512 dw = _mm512_permutexvar_ps(
				idx, _mm512_castps128_ps512(_mm_castpd_ps(
					     _mm_load_sd((const double *)(const void *)(dwp + ((size_t)b * RP + p) * 2)))));
#pragma GCC unroll 4
			for (int t = 0; t < T; t++) {
				const __m512i c = _mm512_broadcast_i64x4(_mm256_load_si256(
					(const __m256i *)(const void *)(xr + ((size_t)t * nb + b) * 16 + 8)));
				const __m512i dot = _mm512_dpbusd_epi32(c, w, xv[t]);
				const __m512 s = _mm512_mul_ps(dw, _mm512_set1_ps(dx[(size_t)t * nb + b]));
				acc[p][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[p][t]);
			}
		}
	}
#pragma GCC unroll 4
	for (int p = 0; p < RP; p++)
#pragma GCC unroll 4
		for (int t = 0; t < T; t++) {
			y[(size_t)t * ldy + 2 * p] = vn_hsum8(_mm512_castps512_ps256(acc[p][t]));
			if ((uint32_t)(2 * p + 1) < nr)
				y[(size_t)t * ldy + 2 * p + 1] = vn_hsum8(_mm512_extractf32x8_ps(acc[p][t], 1));
		}
}

#define VN_CASE(RP, T) \
	case (RP) * 8 + (T): \
		vn_tile(RP, T, wp, dwp, nb, xr + (size_t)t * nb * 16, dx + (size_t)t * nb, nr, yr + (size_t)t * ldy, \
			ldy, &pf, pf_end, pf_n); \
		break;
#define VN_CASES(RP) VN_CASE(RP, 1) VN_CASE(RP, 2) VN_CASE(RP, 3) VN_CASE(RP, 4)

static FN_ATTR ALWAYS_INLINE void vn_mm(const int DT, const uint8_t *W, size_t rb, uint32_t cols, uint32_t r0,
					uint32_t r1, const struct ffn_act *a, float *y, size_t ldy)
{
	const uint32_t nb = cols / 32, B = a->B;
	const size_t xr_bytes = (size_t)B * nb * 64, dx_bytes = ((size_t)B * nb * 4 + 63) & ~(size_t)63;
	const size_t wp_bytes = (size_t)nb * VN_RP * 64, dwp_bytes = (size_t)nb * VN_RP * 8;
	uint8_t *buf = NULL;

	if (B < VN_MIN_B || !nb || !(buf = aligned_alloc(64, xr_bytes + dx_bytes + wp_bytes + dwp_bytes + 64))) {
		(DT == MOE_DTYPE_Q8_0 ? ffn_mm_q8int_avx2 : DT == MOE_DTYPE_Q4_0 ? ffn_mm_q4int_avx2
						  : ffn_mm_iq4int_avx2)(W, rb, cols, r0, r1, a, y, ldy);
		return;
	}
	int32_t *xr = (int32_t *)(void *)buf;
	float *dx = (float *)(void *)(buf + xr_bytes);
	uint8_t *wp = buf + xr_bytes + dx_bytes;
	float *dwp = (float *)(void *)(wp + wp_bytes);

	vn_x_prep(a, nb, DT == MOE_DTYPE_Q4_0 ? 3 : 7, xr, dx);
	const uint32_t steps = (B + VN_T - 1) / VN_T * nb;
	for (uint32_t r = r0; r < r1; r += 2 * VN_RP) {
		const uint32_t nr = r1 - r < 2 * VN_RP ? r1 - r : 2 * VN_RP, RP = (nr + 1) / 2;
		const uint8_t *Wt = W + (size_t)r * rb;
		float *yr = y + (r - r0);
		vn_w_prep(DT, Wt, rb, nr, nb, wp, dwp);
		/* the next row tile, spread over this one's block steps */
		const uint32_t nn = r + nr < r1 ? (r1 - r - nr < 2 * VN_RP ? r1 - r - nr : 2 * VN_RP) : 0;
		const uint8_t *pf = Wt + (size_t)nr * rb, *pf_end = pf + (size_t)nn * rb;
		const uint32_t pf_n = (uint32_t)(((size_t)nn * rb / 64 + steps) / steps);
		for (uint32_t t = 0; t < B;) {
			const uint32_t T = B - t < VN_T ? B - t : VN_T;
			switch (RP * 8 + T) {
			VN_CASES(1)
			VN_CASES(2)
			VN_CASES(3)
			VN_CASES(4)
			default: __builtin_unreachable();
			}
			t += T;
		}
	}
	free(buf);
}

FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_q8int_vnni512, vn_mm, MOE_DTYPE_Q8_0)
FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_q4int_vnni512, vn_mm, MOE_DTYPE_Q4_0)
FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_iq4int_vnni512, vn_mm, MOE_DTYPE_IQ4_NL)
