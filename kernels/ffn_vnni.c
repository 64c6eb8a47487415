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

static FN_ATTR ALWAYS_INLINE void vn_mm_part(const int DT, const uint8_t *W, size_t rb, uint32_t cols, uint32_t r0,
					     uint32_t r1, const struct ffn_act *a, float *y, size_t ldy)
{
	const uint32_t nb = cols / 32, B = a->B;
	const size_t xr_bytes = (size_t)B * nb * 64, dx_bytes = ((size_t)B * nb * 4 + 63) & ~(size_t)63;
	const size_t wp_bytes = (size_t)nb * VN_RP * 64, dwp_bytes = (size_t)nb * VN_RP * 8;
	/* aligned_alloc wants a multiple of the alignment */
	const size_t bytes = (xr_bytes + dx_bytes + wp_bytes + dwp_bytes + 63) & ~(size_t)63;
	uint8_t *buf = NULL;

	if (B < VN_MIN_B || !nb || !(buf = aligned_alloc(64, bytes))) {
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

/* Tokens per pass over the weights: x's prepared blocks for one pass
 * (bytes_per_token each) stay within about 512 KiB (L2) while every row
 * tile reads them, between 16 and 64 tokens (a multiple of 4). */
static inline uint32_t vn_chunk(size_t bytes_per_token)
{
	size_t c = ((size_t)512 << 10) / (bytes_per_token ? bytes_per_token : 1);
	c = c < 16 ? 16 : c > 64 ? 64 : c;
	return (uint32_t)(c & ~(size_t)3);
}

static FN_ATTR ALWAYS_INLINE void vn_mm(const int DT, const uint8_t *W, size_t rb, uint32_t cols, uint32_t r0,
					uint32_t r1, const struct ffn_act *a, float *y, size_t ldy)
{
	const uint32_t ch = vn_chunk((size_t)(cols / 32) * 68);
	for (uint32_t t0 = 0; t0 < a->B; t0 += ch) {
		struct ffn_act c = *a;
		c.B = a->B - t0 < ch ? a->B - t0 : ch;
		c.q8 = a->q8 + (size_t)t0 * a->ldq;
		vn_mm_part(DT, W, rb, cols, r0, r1, &c, y + (size_t)t0 * ldy, ldy);
	}
}

FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_q8int_vnni512, vn_mm, MOE_DTYPE_Q8_0)
FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_q4int_vnni512, vn_mm, MOE_DTYPE_Q4_0)
FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_iq4int_vnni512, vn_mm, MOE_DTYPE_IQ4_NL)

/* ---- K-quants (q4_K, q5_K, q6_K, q3_K, q2_K) x q8_K -------------------------
 *
 * Every path computes, per (row, token, super-block), the exact integers
 * isum and imin and adds them with ffn_kq_accum (ffn_impl.h); here 16
 * (row, token) pairs share one zmm of f32 accumulators, lane 4r + t, each
 * lane running ffn_kq_accum's two fmas on its own values, so the bits are
 * the AVX2 kernel's (and the reference's). The integers:
 *  - per (row, token), 4 chunks of 64 codes: vpmaddubsw of the unsigned
 *    codes by x (int16 pairs, exact: <= 2 * 63 * 127), vpdpwssd with the
 *    codes' sub-block scales as int16 lanes into 16 int32 lanes;
 *  - the 16 accumulators reduced to one vector (lane 4r + t) by a fixed
 *    tree of unpacks and adds (exact, any order);
 *  - q4_K / q5_K / q2_K: imin = sum of min_j * (x's sum over sub-block j),
 *    q6_K / q3_K: isum -= 32 (4) * sum of scale_k * (x's sum over sub-block
 *    k), the codes being taken unsigned: both as vpdpwssd of int16 pairs, row-side pairs spread to lane 4r + t in the
 *    row decode, token-side pairs broadcast per 128-bit lane.
 * About 2 instructions per 64 weights per token, against the AVX2 kernel's
 * 4 per 32 plus its scale handling. Rows are decoded into 4-row tiles (the
 * codes as bytes in element order, scale patterns, pairs, d and dmin per
 * lane), tokens into groups of 4 (codes aligned, pairs, dx per lane); a
 * tail tile repeats its last row or token and drops those results. */

#define KV_QS 0        /* x: 4 tokens x 256 codes */
#define KV_XPAIRS 1024 /* x: int32 [8][4], token t's int16 pair k */
#define KV_DX 1152     /* x: f32 [16], lane 4r + t -> dx of token t */
#define KV_XBYTES 1216
#define KV_Q 0          /* w: 4 rows x 256 codes */
#define KV_SC 1024      /* w: int16 [4 rows][4 chunks][32], each code pair's scale */
#define KV_WPAIRS 2048  /* w: int32 [8][16], lane 4r + t -> row r's int16 pair k */
#define KV_D 2560       /* w: f32 [16], lane 4r + t -> d of row r */
#define KV_DMIN 2624    /* w: f32 [16], dmin */
#define KV_WBYTES 2688

/* Token group g (4 tokens from 4g; past B the last token again) for every
 * super-block: rec (g * nb + b) * KV_XBYTES. Pairs: q4_K / q5_K the x sums
 * of sub-blocks (2k, 2k + 1) of 32, k < 4; the types with sub-blocks of 16
 * bsums (2k, 2k + 1), k < 8. */
static FN_ATTR ALWAYS_INLINE void kv_x_prep(const int DT, const struct ffn_act *a, uint32_t nb, uint8_t *xk)
{
	const uint32_t G = (a->B + 3) / 4;
	for (uint32_t g = 0; g < G; g++)
		for (uint32_t b = 0; b < nb; b++) {
			uint8_t *rec = xk + ((size_t)g * nb + b) * KV_XBYTES;
			int32_t *pairs = (int32_t *)(void *)(rec + KV_XPAIRS);
			float *dxv = (float *)(void *)(rec + KV_DX);
			for (uint32_t t = 0; t < 4; t++) {
				const uint32_t tok = 4 * g + t < a->B ? 4 * g + t : a->B - 1;
				const struct moe_block_q8_K *xb = a->q8k + (size_t)tok * a->ldqk + b;
				for (int k = 0; k < 8; k++)
					_mm256_store_si256((__m256i *)(void *)(rec + KV_QS + 256 * t + 32 * k),
							   _mm256_loadu_si256((const __m256i *)(const void *)(xb->qs + 32 * k)));
				for (int k = 0; k < 8; k++) {
					int lo, hi;
					if (DT != MOE_DTYPE_Q4_K && DT != MOE_DTYPE_Q5_K) {
						lo = xb->bsums[2 * k];
						hi = xb->bsums[2 * k + 1];
					} else if (k < 4) {
						lo = xb->bsums[4 * k] + xb->bsums[4 * k + 1];
						hi = xb->bsums[4 * k + 2] + xb->bsums[4 * k + 3];
					} else {
						lo = hi = 0;
					}
					pairs[4 * k + t] = (int32_t)((uint32_t)(uint16_t)lo | (uint32_t)(uint16_t)hi << 16);
				}
				for (int r = 0; r < 4; r++)
					dxv[4 * r + t] = xb->d;
			}
		}
}

/* Rows [0, nr) (nr <= 4; the last repeated up to 4) for every super-block:
 * rec b * KV_WBYTES. */
static FN_ATTR ALWAYS_INLINE void kv_w_prep(const int DT, const uint8_t *W, size_t rb, uint32_t nr, uint32_t nb,
					    uint8_t *wk)
{
	const size_t bb = DT == MOE_DTYPE_Q4_K ? 144 : DT == MOE_DTYPE_Q5_K ? 176 : DT == MOE_DTYPE_Q6_K ? 210 :
			  DT == MOE_DTYPE_Q3_K ? 110 : 84;
	const __m256i m4 = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1), three = _mm256_set1_epi8(3);
	/* chunk c's int16 scale lanes: q4_K / q5_K sub-blocks of 32 (2c, 2c + 1),
	 * the others sub-blocks of 16 (4c ... 4c + 3) */
	__m512i sidx[4];
	for (int c = 0; c < 4; c++) {
		int16_t ix[32];
		for (int i = 0; i < 32; i++)
			ix[i] = (int16_t)(DT == MOE_DTYPE_Q4_K || DT == MOE_DTYPE_Q5_K ? 2 * c + i / 16 : 4 * c + i / 8);
		sidx[c] = _mm512_loadu_si512((const void *)ix);
	}
	/* pair k of row r (int32 r * 8 + k of two zmm) to lane 4r + t */
	__m512i pidx[8];
	for (int k = 0; k < 8; k++) {
		int32_t ix[16];
		for (int l = 0; l < 16; l++)
			ix[l] = (l / 4) * 8 + k;
		pidx[k] = _mm512_loadu_si512((const void *)ix);
	}
	const __m512i didx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);

	for (uint32_t b = 0; b < nb; b++) {
		uint8_t *rec = wk + (size_t)b * KV_WBYTES;
		int32_t pr[4][8] __attribute__((aligned(64)));
		float d[4], dm[4];
		for (uint32_t r = 0; r < 4; r++) {
			const uint8_t *blk = W + (size_t)(r < nr ? r : nr - 1) * rb + (size_t)b * bb;
			uint8_t *q = rec + KV_Q + 256 * r;
			int16_t *sc = (int16_t *)(void *)(rec + KV_SC) + 128 * r;
			__m256i s16; /* the scales as int16, 8 (q4_K / q5_K) or 16 */
			uint16_t h;
			if (DT == MOE_DTYPE_Q4_K || DT == MOE_DTYPE_Q5_K) {
				const bool q5 = DT == MOE_DTYPE_Q5_K;
				const uint8_t *sp = blk + 4, *qs = blk + (q5 ? 48 : 16);
				uint32_t w0, w1, w2;
				memcpy(&w0, sp, 4);
				memcpy(&w1, sp + 4, 4);
				memcpy(&w2, sp + 8, 4);
				/* moe_kquant_scale_min's bits, four at a time (as ffn_avx2.c) */
				const uint32_t sc_lo = w0 & 0x3f3f3f3fu, mn_lo = w1 & 0x3f3f3f3fu;
				const uint32_t sc_hi = (w2 & 0x0f0f0f0fu) | ((w0 >> 6) & 0x03030303u) << 4;
				const uint32_t mn_hi = ((w2 >> 4) & 0x0f0f0f0fu) | ((w1 >> 6) & 0x03030303u) << 4;
				s16 = _mm256_castsi128_si256(_mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)sc_hi, (int)sc_lo)));
				const __m128i mn = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)mn_hi, (int)mn_lo));
				_mm_store_si128((__m128i *)(void *)pr[r], mn); /* pairs (m 2k, m 2k+1), k < 4 */
				_mm_store_si128((__m128i *)(void *)(pr[r] + 4), _mm_setzero_si128());
				const __m256i qh = q5 ? _mm256_loadu_si256((const __m256i *)(const void *)(blk + 16))
						      : _mm256_setzero_si256();
				for (int j = 0; j < 4; j++) {
					const __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)(qs + 32 * j));
					__m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
					if (q5) {
						lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(
							_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j)), one), 4));
						hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(
							_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j + 1)), one), 4));
					}
					_mm256_store_si256((__m256i *)(void *)(q + 64 * j), lo);
					_mm256_store_si256((__m256i *)(void *)(q + 64 * j + 32), hi);
				}
				memcpy(&h, blk, 2);
				d[r] = _cvtsh_ss(h);
				memcpy(&h, blk + 2, 2);
				dm[r] = _cvtsh_ss(h);
			} else if (DT == MOE_DTYPE_Q3_K) { /* codes 0..7 (the value is code - 4) */
				const uint8_t *sp = blk + 96;
				uint32_t w0, w1, w2;
				memcpy(&w0, sp, 4);
				memcpy(&w1, sp + 4, 4);
				memcpy(&w2, sp + 8, 4);
				/* moe_q3_K_scale's bits, four at a time (as ffn_avx2.c) */
				const uint32_t a0 = (w0 & 0x0f0f0f0fu) | (w2 & 0x03030303u) << 4;
				const uint32_t a1 = (w1 & 0x0f0f0f0fu) | ((w2 >> 2) & 0x03030303u) << 4;
				const uint32_t a2 = ((w0 >> 4) & 0x0f0f0f0fu) | ((w2 >> 4) & 0x03030303u) << 4;
				const uint32_t a3 = ((w1 >> 4) & 0x0f0f0f0fu) | ((w2 >> 6) & 0x03030303u) << 4;
				s16 = _mm256_cvtepi8_epi16(
					_mm_sub_epi8(_mm_set_epi32((int)a3, (int)a2, (int)a1, (int)a0), _mm_set1_epi8(32)));
				_mm256_store_si256((__m256i *)(void *)pr[r], s16); /* pairs (s 2k, s 2k+1), k < 8 */
				const __m256i hm = _mm256_loadu_si256((const __m256i *)(const void *)blk);
				for (int hh = 0; hh < 2; hh++) {
					const __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)(blk + 32 + 32 * hh));
					for (int g = 0; g < 4; g++) {
						const __m256i hb = _mm256_and_si256(_mm256_srl_epi16(hm, _mm_cvtsi32_si128(4 * hh + g)), one);
						const __m256i q2 = _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(2 * g)), three);
						_mm256_store_si256((__m256i *)(void *)(q + 128 * hh + 32 * g),
								   _mm256_or_si256(q2, _mm256_slli_epi16(hb, 2)));
					}
				}
				memcpy(&h, blk + 108, 2);
				d[r] = _cvtsh_ss(h);
				dm[r] = 0.0f;
			} else if (DT == MOE_DTYPE_Q2_K) { /* codes 0..3, 4-bit scale and min per 16 */
				const __m128i s8 = _mm_loadu_si128((const __m128i *)(const void *)blk), m8 = _mm_set1_epi8(0x0f);
				s16 = _mm256_cvtepu8_epi16(_mm_and_si128(s8, m8));
				_mm256_store_si256((__m256i *)(void *)pr[r], /* pairs (m 2k, m 2k+1), k < 8 */
						   _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(s8, 4), m8)));
				for (int hh = 0; hh < 2; hh++) {
					const __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)(blk + 16 + 32 * hh));
					for (int g = 0; g < 4; g++)
						_mm256_store_si256((__m256i *)(void *)(q + 128 * hh + 32 * g),
								   _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(2 * g)), three));
				}
				memcpy(&h, blk + 80, 2);
				d[r] = _cvtsh_ss(h);
				memcpy(&h, blk + 82, 2);
				dm[r] = _cvtsh_ss(h);
			} else { /* Q6_K: codes 0..63 (the value is code - 32) */
				s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(const void *)(blk + 192)));
				_mm256_store_si256((__m256i *)(void *)pr[r], s16); /* pairs (s 2k, s 2k+1), k < 8 */
				for (int hh = 0; hh < 2; hh++) {
					const __m256i l0 = _mm256_loadu_si256((const __m256i *)(const void *)(blk + 64 * hh));
					const __m256i l1 = _mm256_loadu_si256((const __m256i *)(const void *)(blk + 64 * hh + 32));
					const __m256i qh = _mm256_loadu_si256((const __m256i *)(const void *)(blk + 128 + 32 * hh));
					for (int g = 0; g < 4; g++) {
						const __m256i l = g & 1 ? l1 : l0;
						const __m256i lo4 = g < 2 ? _mm256_and_si256(l, m4)
									  : _mm256_and_si256(_mm256_srli_epi16(l, 4), m4);
						const __m256i h2 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * g)), three);
						_mm256_store_si256((__m256i *)(void *)(q + 128 * hh + 32 * g),
								   _mm256_or_si256(lo4, _mm256_slli_epi16(h2, 4)));
					}
				}
				memcpy(&h, blk + 208, 2);
				d[r] = _cvtsh_ss(h);
				dm[r] = 0.0f;
			}
			const __m512i s512 = _mm512_castsi256_si512(s16);
			for (int c = 0; c < 4; c++)
				_mm512_store_si512((void *)(sc + 32 * c), _mm512_permutexvar_epi16(sidx[c], s512));
		}
		const __m512i p01 = _mm512_load_si512((const void *)pr[0]), p23 = _mm512_load_si512((const void *)pr[2]);
		for (int k = 0; k < 8; k++)
			_mm512_store_si512((void *)(rec + KV_WPAIRS + 64 * k), _mm512_permutex2var_epi32(p01, pidx[k], p23));
		_mm512_store_ps((void *)(rec + KV_D), _mm512_permutexvar_ps(didx, _mm512_castps128_ps512(_mm_loadu_ps(d))));
		_mm512_store_ps((void *)(rec + KV_DMIN), _mm512_permutexvar_ps(didx, _mm512_castps128_ps512(_mm_loadu_ps(dm))));
	}
}

/* v[4r + t] to one vector whose lane 4r + t is the sum of v[4r + t]'s 16
 * int32 lanes (exact). */
static FN_ATTR ALWAYS_INLINE __m512i kv_reduce16(const __m512i *v)
{
	__m512i w[8], z[4];
#pragma GCC unroll 8
	for (int i = 0; i < 8; i++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
		w[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
					_mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
#pragma GCC unroll 4
	for (int i = 0; i < 4; i++) /* per 128-bit lane: v[4i] ... v[4i + 3]'s partial sums */
		z[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(w[2 * i], w[2 * i + 1]),
					_mm512_unpackhi_epi64(w[2 * i], w[2 * i + 1]));
	const __m512i u01 = _mm512_add_epi32(_mm512_shuffle_i32x4(z[0], z[1], _MM_SHUFFLE(1, 0, 1, 0)),
					     _mm512_shuffle_i32x4(z[0], z[1], _MM_SHUFFLE(3, 2, 3, 2)));
	const __m512i u23 = _mm512_add_epi32(_mm512_shuffle_i32x4(z[2], z[3], _MM_SHUFFLE(1, 0, 1, 0)),
					     _mm512_shuffle_i32x4(z[2], z[3], _MM_SHUFFLE(3, 2, 3, 2)));
	return _mm512_add_epi32(_mm512_shuffle_i32x4(u01, u23, _MM_SHUFFLE(2, 0, 2, 0)),
				_mm512_shuffle_i32x4(u01, u23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* One 4-row tile (wk) times one token group (xg) over nb super-blocks:
 * out[4r + t]. Prefetches pf_n lines from *pf per super-block, to pf_end. */
static FN_ATTR ALWAYS_INLINE void kv_tile(const int DT, const uint8_t *wk, const uint8_t *xg, uint32_t nb, float *out,
					  const uint8_t **pf, const uint8_t *pf_end, uint32_t pf_n)
{
	const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32((int)0x80000000u));
	__m512 accv = _mm512_setzero_ps();

	for (uint32_t b = 0; b < nb; b++) {
		const uint8_t *wr = wk + (size_t)b * KV_WBYTES, *xr = xg + (size_t)b * KV_XBYTES;
		__m512i acc[16];
		for (uint32_t k = 0; k < pf_n && *pf < pf_end; k++, *pf += 64)
			_mm_prefetch((const char *)*pf, _MM_HINT_T1);
#pragma GCC unroll 16
		for (int i = 0; i < 16; i++)
			acc[i] = _mm512_setzero_si512();
#pragma GCC unroll 1
		for (int c = 0; c < 4; c++) {
			__m512i xv[4];
#pragma GCC unroll 4
			for (int t = 0; t < 4; t++)
				xv[t] = _mm512_load_si512((const void *)(xr + KV_QS + 256 * t + 64 * c));
#pragma GCC unroll 4
			for (int r = 0; r < 4; r++) {
				const __m512i w = _mm512_load_si512((const void *)(wr + KV_Q + 256 * r + 64 * c));
				const __m512i s = _mm512_load_si512((const void *)(wr + KV_SC + 256 * r + 64 * c));
#pragma GCC unroll 4
				for (int t = 0; t < 4; t++)
					acc[4 * r + t] = _mm512_dpwssd_epi32(acc[4 * r + t], _mm512_maddubs_epi16(w, xv[t]), s);
			}
		}
		__m512i isum = kv_reduce16(acc), pc = _mm512_setzero_si512();
		for (int k = 0; k < (DT == MOE_DTYPE_Q4_K || DT == MOE_DTYPE_Q5_K ? 4 : 8); k++)
			pc = _mm512_dpwssd_epi32(pc, _mm512_load_si512((const void *)(wr + KV_WPAIRS + 64 * k)),
						 _mm512_broadcast_i32x4(_mm_load_si128(
							 (const __m128i *)(const void *)(xr + KV_XPAIRS + 16 * k))));
		__m512i imin = pc;
		if (DT == MOE_DTYPE_Q6_K || DT == MOE_DTYPE_Q3_K) {
			isum = _mm512_sub_epi32(isum, _mm512_slli_epi32(pc, DT == MOE_DTYPE_Q6_K ? 5 : 2));
			imin = _mm512_setzero_si512();
		}
		/* ffn_kq_accum, lane by lane */
		const __m512 dx = _mm512_load_ps((const void *)(xr + KV_DX));
		accv = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_load_ps((const void *)(wr + KV_D)), dx),
				       _mm512_cvtepi32_ps(isum), accv);
		accv = _mm512_fmadd_ps(_mm512_xor_ps(_mm512_mul_ps(_mm512_load_ps((const void *)(wr + KV_DMIN)), dx), sign),
				       _mm512_cvtepi32_ps(imin), accv);
	}
	_mm512_storeu_ps(out, accv);
}

static FN_ATTR ALWAYS_INLINE void kv_mm_part(const int DT, const uint8_t *W, size_t rb, uint32_t cols, uint32_t r0,
					     uint32_t r1, const struct ffn_act *a, float *y, size_t ldy)
{
	const uint32_t nb = cols / 256, B = a->B, G = (B + 3) / 4;
	const size_t xk_bytes = (size_t)G * nb * KV_XBYTES, wk_bytes = (size_t)nb * KV_WBYTES;
	uint8_t *buf = NULL;

	if (B < VN_MIN_B || !nb || !(buf = aligned_alloc(64, (xk_bytes + wk_bytes + 63) & ~(size_t)63))) {
		(DT == MOE_DTYPE_Q4_K ? ffn_mm_q4_K_avx2 : DT == MOE_DTYPE_Q5_K ? ffn_mm_q5_K_avx2 :
		 DT == MOE_DTYPE_Q6_K ? ffn_mm_q6_K_avx2 : DT == MOE_DTYPE_Q3_K ? ffn_mm_q3_K_avx2
						 : ffn_mm_q2_K_avx2)(W, rb, cols, r0, r1, a, y, ldy);
		return;
	}
	uint8_t *xk = buf, *wk = buf + xk_bytes;
	kv_x_prep(DT, a, nb, xk);
	const uint32_t steps = G * nb;
	for (uint32_t r = r0; r < r1; r += 4) {
		const uint32_t nr = r1 - r < 4 ? r1 - r : 4;
		const uint8_t *Wt = W + (size_t)r * rb;
		kv_w_prep(DT, Wt, rb, nr, nb, wk);
		const uint32_t nn = r + nr < r1 ? (r1 - r - nr < 4 ? r1 - r - nr : 4) : 0;
		const uint8_t *pf = Wt + (size_t)nr * rb, *pf_end = pf + (size_t)nn * rb;
		const uint32_t pf_n = (uint32_t)(((size_t)nn * rb / 64 + steps) / steps);
		for (uint32_t g = 0; g < G; g++) {
			float out[16];
			kv_tile(DT, wk, xk + (size_t)g * nb * KV_XBYTES, nb, out, &pf, pf_end, pf_n);
			for (uint32_t i = 0; i < nr; i++)
				for (uint32_t t = 0; t < 4 && 4 * g + t < B; t++)
					y[(size_t)(4 * g + t) * ldy + (r - r0) + i] = out[4 * i + t];
		}
	}
	free(buf);
}

static FN_ATTR ALWAYS_INLINE void kv_mm(const int DT, const uint8_t *W, size_t rb, uint32_t cols, uint32_t r0,
					uint32_t r1, const struct ffn_act *a, float *y, size_t ldy)
{
	const uint32_t ch = vn_chunk((size_t)(cols / 256) * KV_XBYTES / 4);
	for (uint32_t t0 = 0; t0 < a->B; t0 += ch) {
		struct ffn_act c = *a;
		c.B = a->B - t0 < ch ? a->B - t0 : ch;
		c.q8k = a->q8k + (size_t)t0 * a->ldqk;
		kv_mm_part(DT, W, rb, cols, r0, r1, &c, y + (size_t)t0 * ldy, ldy);
	}
}

FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_q4_K_vnni512, kv_mm, MOE_DTYPE_Q4_K)
FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_q5_K_vnni512, kv_mm, MOE_DTYPE_Q5_K)
FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_q6_K_vnni512, kv_mm, MOE_DTYPE_Q6_K)
FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_q3_K_vnni512, kv_mm, MOE_DTYPE_Q3_K)
FFN_MM_FOR_DTYPE(FN_ATTR, ffn_mm_q2_K_vnni512, kv_mm, MOE_DTYPE_Q2_K)
