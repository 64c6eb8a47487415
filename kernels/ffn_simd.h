/* ffn_simd.h - the matmul kernels, written once for any vector width and
 * included by ffn_avx2.c (8 floats) and ffn_avx512.c (16 floats). Sharing
 * the body means the tiling, block decoding and tails that AVX2 tests
 * exercise are the same lines the AVX-512 build runs.
 *
 * The includer defines:
 *   SIMD_W            floats per vector (8 or 16)
 *   RMAX, TMAX        tile: weight rows x tokens computed together (RMAX 4:
 *                     one row per quarter at one token; TMAX 2 or 4)
 *   vf                the float vector type
 *   FN_ATTR           __attribute__((target(...))) for every function
 *   SFX(name)         name with the ISA suffix
 *   VZERO() VSET1(s) VLOADU(p) VSTOREU(p, v) VFMA(a, b, c) (a*b + c) VMUL(a, b)
 *   VLOAD_F16(p) VLOAD_BF16(p)   SIMD_W halves / bfloats at p, widened
 *   VBF16_EVEN_ODD(p, ev, od)    2 * SIMD_W bfloats at p: ev gets the
 *                     even-index ones, od the odd ones, as floats (one
 *                     shift, one and: no shuffle)
 *   LOADB(p)          __m128i holding the SIMD_W bytes at p in its low lanes
 *   CVT_I8(v)         vf from the low SIMD_W signed bytes of v
 *   vhsum(v)          (function) horizontal sum, the same order for every tile
 *
 * Algorithm: one token (decode) runs a fused kernel: RMAX weight rows are
 * decoded in registers chunk by chunk (w = (float)q * d for block types,
 * exactly the value moe_dequantize_row produces) and multiplied into the
 * token with FMA. The RMAX rows of a tile come from the RMAX quarters of
 * the row range (rows j, j + q, j + 2q, j + 3q), so the weights stream
 * from DRAM as four long sequential streams: measured on the AMD EPYC
 * development VM, 4 distant streams read 10-30% faster than one, or than
 * 4 adjacent rows (which retrain the prefetcher at every row end).
 * bf16 rows are read 2 * SIMD_W at a time and split into even and odd
 * elements (VBF16_EVEN_ODD) against x reordered the same way once per
 * token (ffn_act.fp), which halves the decode work.
 * For a batch, each block of RMAX rows is widened to f32 once (bf16 in the
 * same even/odd order) and an f32 tile multiplies it by TMAX tokens at a
 * time, so weights come from memory once per row block and from L1 for
 * every token tile. Every (row, token) accumulator runs the same chunk
 * sequence whatever path, R and T, so results are independent of the
 * batch. */

#include <stdlib.h>

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* Nibble -> value tables (pshufb). q4_0: q - 8. mxfp4: ggml's doubled E2M1. */
static const int8_t SFX(tab_q4)[16] __attribute__((aligned(16))) = {
	-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7 };
static const int8_t SFX(tab_mxfp4)[16] __attribute__((aligned(16))) = {
	0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12 };
/* iq4_nl / iq4_xs: the non-linear levels (moe_kvalues_iq4nl). */
static const int8_t SFX(tab_iq4nl)[16] __attribute__((aligned(16))) = {
	-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113 };

static ALWAYS_INLINE const int8_t *SFX(nib_tab)(const int DT)
{
	return DT == MOE_DTYPE_Q4_0 ? SFX(tab_q4) : DT == MOE_DTYPE_IQ4_NL ? SFX(tab_iq4nl) : SFX(tab_mxfp4);
}

/* Elements [k*W, k*W + W) of a 32-element nibble block: low nibbles hold
 * elements 0..15, high nibbles 16..31 (ggml order). */
static FN_ATTR ALWAYS_INLINE vf SFX(nib_vals)(const uint8_t *qs, int k, const int8_t *tab)
{
	const int e0 = k * SIMD_W;
	__m128i b = LOADB(qs + (e0 & 15));
	if (e0 >= 16)
		b = _mm_srli_epi16(b, 4);
	b = _mm_and_si128(b, _mm_set1_epi8(0x0f));
	b = _mm_shuffle_epi8(_mm_load_si128((const __m128i *)tab), b);
	return CVT_I8(b);
}

static FN_ATTR ALWAYS_INLINE float SFX(scalar_w)(const int DT, const uint8_t *row, uint32_t c)
{
	uint16_t h;
	switch (DT) {
	case MOE_DTYPE_F32: {
		float f;
		memcpy(&f, row + (size_t)c * 4, 4);
		return f;
	}
	case MOE_DTYPE_F16:
		memcpy(&h, row + (size_t)c * 2, 2);
		return _cvtsh_ss(h);
	default: /* BF16 */
		memcpy(&h, row + (size_t)c * 2, 2);
		return moe_bf16_to_f32(h);
	}
}

static FN_ATTR ALWAYS_INLINE vf SFX(plain_w)(const int DT, const uint8_t *row, uint32_t c)
{
	switch (DT) {
	case MOE_DTYPE_F32: return VLOADU((const float *)(const void *)(row + (size_t)c * 4));
	case MOE_DTYPE_F16: return VLOAD_F16(row + (size_t)c * 2);
	default: return VLOAD_BF16(row + (size_t)c * 2);
	}
}

/* R rows (rs bytes apart) times T tokens: y[t * ldy + i * ys]. For bf16, x
 * is in the even/odd order of ffn_perm_even_odd (2 * SIMD_W groups). */
static FN_ATTR ALWAYS_INLINE void SFX(tile)(const int DT, const int R, const int T, const uint8_t *W,
					     size_t rs, uint32_t cols, const float *x, size_t ldx,
					     float *y, size_t ys, size_t ldy)
{
	/* One accumulator per (row, token). Two (even and odd chunks) were
	 * measured on the AMD EPYC VM: no faster cold at one token, and
	 * 15-20% slower for batches, whose tiles then need half the rows. */
	vf acc[RMAX][TMAX];
	float tail[RMAX][TMAX];

#pragma GCC unroll 8
	for (int i = 0; i < R; i++)
#pragma GCC unroll 8
		for (int t = 0; t < T; t++) {
			acc[i][t] = VZERO();
			tail[i][t] = 0.0f;
		}

	if (DT == MOE_DTYPE_Q8_0 || DT == MOE_DTYPE_Q4_0 || DT == MOE_DTYPE_MXFP4 || DT == MOE_DTYPE_IQ4_NL) {
		const size_t bb = DT == MOE_DTYPE_Q8_0 ? 34 : DT == MOE_DTYPE_MXFP4 ? 17 : 18;
		const uint32_t nb = cols / 32;
		for (uint32_t b = 0; b < nb; b++) {
			vf d[RMAX];
			const uint8_t *qs[RMAX];
#pragma GCC unroll 8
			for (int i = 0; i < R; i++) {
				const uint8_t *blk = W + (size_t)i * rs + (size_t)b * bb;
				uint16_t h;
				if (DT == MOE_DTYPE_MXFP4) {
					d[i] = VSET1(ffn_e8m0_half(blk[0]));
					qs[i] = blk + 1;
				} else {
					memcpy(&h, blk, 2);
					d[i] = VSET1(_cvtsh_ss(h));
					qs[i] = blk + 2;
				}
			}
#pragma GCC unroll 4
			for (int k = 0; k < 32 / SIMD_W; k++) {
				/* x first, then row by row: decode and multiply, so
				 * only one decoded weight vector is live at a time */
				vf xv[TMAX];
#pragma GCC unroll 8
				for (int t = 0; t < T; t++)
					xv[t] = VLOADU(x + (size_t)t * ldx + (size_t)b * 32 + (size_t)k * SIMD_W);
#pragma GCC unroll 8
				for (int i = 0; i < R; i++) {
					vf q;
					if (DT == MOE_DTYPE_Q8_0)
						q = CVT_I8(LOADB(qs[i] + k * SIMD_W));
					else
						q = SFX(nib_vals)(qs[i], k, SFX(nib_tab)(DT));
					const vf w = VMUL(q, d[i]);
#pragma GCC unroll 8
					for (int t = 0; t < T; t++)
						acc[i][t] = VFMA(w, xv[t], acc[i][t]);
				}
			}
		}
	} else {
		uint32_t c = 0;
		/* pairs of chunks; bf16 reads the pair at once, even elements
		 * then odd ones */
		for (; c + 2 * SIMD_W <= cols; c += 2 * SIMD_W) {
			vf x0[TMAX], x1[TMAX];
#pragma GCC unroll 8
			for (int t = 0; t < T; t++) {
				x0[t] = VLOADU(x + (size_t)t * ldx + c);
				x1[t] = VLOADU(x + (size_t)t * ldx + c + SIMD_W);
			}
#pragma GCC unroll 8
			for (int i = 0; i < R; i++) {
				vf w0, w1;
				if (DT == MOE_DTYPE_BF16) {
					VBF16_EVEN_ODD(W + (size_t)i * rs + (size_t)c * 2, w0, w1);
				} else {
					w0 = SFX(plain_w)(DT, W + (size_t)i * rs, c);
					w1 = SFX(plain_w)(DT, W + (size_t)i * rs, c + SIMD_W);
				}
#pragma GCC unroll 8
				for (int t = 0; t < T; t++) {
					acc[i][t] = VFMA(w0, x0[t], acc[i][t]);
					acc[i][t] = VFMA(w1, x1[t], acc[i][t]);
				}
			}
		}
		/* at most one chunk left (natural order for bf16 too) */
		if (c + SIMD_W <= cols) {
			vf w[RMAX];
#pragma GCC unroll 8
			for (int i = 0; i < R; i++)
				w[i] = SFX(plain_w)(DT, W + (size_t)i * rs, c);
#pragma GCC unroll 8
			for (int t = 0; t < T; t++) {
				const vf xv = VLOADU(x + (size_t)t * ldx + c);
#pragma GCC unroll 8
				for (int i = 0; i < R; i++)
					acc[i][t] = VFMA(w[i], xv, acc[i][t]);
			}
			c += SIMD_W;
		}
		for (; c < cols; c++)
			for (int i = 0; i < R; i++) {
				const float wi = SFX(scalar_w)(DT, W + (size_t)i * rs, c);
				for (int t = 0; t < T; t++)
					tail[i][t] = __builtin_fmaf(wi, x[(size_t)t * ldx + c], tail[i][t]);
			}
	}

#pragma GCC unroll 8
	for (int i = 0; i < R; i++)
#pragma GCC unroll 8
		for (int t = 0; t < T; t++)
			y[(size_t)t * ldy + (size_t)i * ys] = SFX(vhsum)(acc[i][t]) + tail[i][t];
}

/* Widens R rows to f32 into out (rows of `cols` floats): the same values,
 * chunk by chunk and (bf16) in the same even/odd order, that the tile
 * computes on the fly, so a tile over `out` as f32, with bf16's x in the
 * same order, runs the identical FMA sequence. */
static FN_ATTR ALWAYS_INLINE void SFX(widen_rows)(const int DT, uint32_t R, const uint8_t *W, size_t rb,
						  uint32_t cols, float *out)
{
	for (uint32_t i = 0; i < R; i++) {
		const uint8_t *row = W + (size_t)i * rb;
		float *o = out + (size_t)i * cols;
		if (DT == MOE_DTYPE_Q8_0 || DT == MOE_DTYPE_Q4_0 || DT == MOE_DTYPE_MXFP4 || DT == MOE_DTYPE_IQ4_NL) {
			const size_t bb = DT == MOE_DTYPE_Q8_0 ? 34 : DT == MOE_DTYPE_MXFP4 ? 17 : 18;
			for (uint32_t b = 0; b < cols / 32; b++) {
				const uint8_t *blk = row + (size_t)b * bb, *qs;
				vf d;
				uint16_t h;
				if (DT == MOE_DTYPE_MXFP4) {
					d = VSET1(ffn_e8m0_half(blk[0]));
					qs = blk + 1;
				} else {
					memcpy(&h, blk, 2);
					d = VSET1(_cvtsh_ss(h));
					qs = blk + 2;
				}
#pragma GCC unroll 4
				for (int k = 0; k < 32 / SIMD_W; k++) {
					vf q;
					if (DT == MOE_DTYPE_Q8_0)
						q = CVT_I8(LOADB(qs + k * SIMD_W));
					else
						q = SFX(nib_vals)(qs, k, SFX(nib_tab)(DT));
					VSTOREU(o + (size_t)b * 32 + (size_t)k * SIMD_W, VMUL(q, d));
				}
			}
		} else {
			uint32_t c = 0;
			if (DT == MOE_DTYPE_BF16)
				for (; c + 2 * SIMD_W <= cols; c += 2 * SIMD_W) {
					vf ev, od;
					VBF16_EVEN_ODD(row + (size_t)c * 2, ev, od);
					VSTOREU(o + c, ev);
					VSTOREU(o + c + SIMD_W, od);
				}
			for (; c + SIMD_W <= cols; c += SIMD_W)
				VSTOREU(o + c, SFX(plain_w)(DT, row, c));
			for (; c < cols; c++)
				o[c] = SFX(scalar_w)(DT, row, c);
		}
	}
}

/* One switch case per tile shape so each is compiled with constant R, T. */
#define TILE_CALL(DT, RR, TT) \
	SFX(tile)(DT, RR, TT, Wt, rbt, cols, xf + (size_t)t * a->ld, a->ld, yr + (size_t)t * ldy, 1, ldy)

/* Full tiles of TMAX tokens, then the rest one token at a time: two shapes
 * per row count keep the inlined code (and the compile time) small. */
#if TMAX != 2 && TMAX != 4
#error "TMAX must be 2 or 4"
#endif
#define TILE_ROW_CASES(DT, RR) \
	case RR * 8 + 1: TILE_CALL(DT, RR, 1); break; \
	case RR * 8 + TMAX: TILE_CALL(DT, RR, TMAX); break;

#if RMAX != 4
#error "RMAX must be 4"
#endif

/* R (<= RMAX) rows of f32 weights (a matrix, or a row block widened by
 * widen_rows) times every token, tile by tile. One copy serves every
 * dtype, which keeps the number of inlined tiles (and compile time) small. */
static FN_ATTR __attribute__((noinline)) void SFX(rows_f32)(const uint8_t *Wt, size_t rbt, uint32_t cols,
							     uint32_t R, const struct ffn_act *a, const float *xf,
							     float *yr, size_t ldy)
{
	for (uint32_t t = 0; t < a->B;) {
		const uint32_t T = a->B - t >= TMAX ? TMAX : 1;
		switch (R * 8 + T) {
		TILE_ROW_CASES(MOE_DTYPE_F32, 1)
		TILE_ROW_CASES(MOE_DTYPE_F32, 2)
		TILE_ROW_CASES(MOE_DTYPE_F32, 3)
		TILE_ROW_CASES(MOE_DTYPE_F32, 4)
		default: __builtin_unreachable();
		}
		t += T;
	}
}

/* The fused kernel over rows [r0, r1), token by token: tiles of RMAX rows
 * taken one from each quarter of the range (RMAX long sequential streams),
 * then the n % RMAX rows left over as one smaller tile. */
#define FUSED_CALL(DT, RR, WW, RS, YY, YS) \
	SFX(tile)(DT, RR, 1, WW, RS, cols, xf + (size_t)t * a->ld, a->ld, (YY) + (size_t)t * ldy, YS, ldy)

static FN_ATTR ALWAYS_INLINE void SFX(fused)(const int DT, const uint8_t *W, size_t rb, uint32_t cols,
					      uint32_t r0, uint32_t r1, const struct ffn_act *a,
					      const float *xf, float *y, size_t ldy)
{
	const uint32_t q = (r1 - r0) / RMAX, rem = (r1 - r0) % RMAX;
	const uint8_t *W0 = W + (size_t)r0 * rb, *Wr = W0 + (size_t)q * RMAX * rb;
	float *yr = y + (size_t)q * RMAX;

	for (uint32_t j = 0; j < q; j++)
		for (uint32_t t = 0; t < a->B; t++)
			FUSED_CALL(DT, RMAX, W0 + (size_t)j * rb, (size_t)q * rb, y + j, q);
	for (uint32_t t = 0; rem && t < a->B; t++) {
		switch (rem) {
		case 1: FUSED_CALL(DT, 1, Wr, rb, yr, 1); break;
		case 2: FUSED_CALL(DT, 2, Wr, rb, yr, 1); break;
		default: FUSED_CALL(DT, 3, Wr, rb, yr, 1); break;
		}
	}
}

/* One token: the fused kernel decodes weights in registers (nothing is
 * written back; f32 is read as it is). With more tokens, each row block of
 * a non-f32 matrix is widened to f32 once (RMAX x cols floats, L1/L2
 * resident) and reused by every token tile; the result is bit-identical
 * (see widen_rows). Without memory for the widened block, the fused kernel
 * runs token by token. */
#define DEFINE_MM(NAME, DT) \
	static FN_ATTR void SFX(NAME)(const uint8_t *W, size_t rb, uint32_t cols, uint32_t r0, \
				     uint32_t r1, const struct ffn_act *a, float *y, size_t ldy) \
	{ \
		const float *xf = DT == MOE_DTYPE_BF16 ? a->fp : a->f; \
		float *wide = NULL; \
		if (a->B == 1 || (DT != MOE_DTYPE_F32 && \
				  !(wide = aligned_alloc(64, ((size_t)RMAX * cols * sizeof(float) + 63) & ~(size_t)63)))) { \
			SFX(fused)(DT, W, rb, cols, r0, r1, a, xf, y, ldy); \
			return; \
		} \
		for (uint32_t r = r0; r < r1; r += RMAX) { \
			const uint32_t R = r1 - r < RMAX ? r1 - r : RMAX; \
			const uint8_t *Wt = W + (size_t)r * rb; \
			float *yr = y + (r - r0); \
			if (DT == MOE_DTYPE_F32) { \
				SFX(rows_f32)(Wt, rb, cols, R, a, xf, yr, ldy); \
			} else { \
				SFX(widen_rows)(DT, R, Wt, rb, cols, wide); \
				SFX(rows_f32)((const uint8_t *)wide, (size_t)cols * sizeof(float), cols, R, a, xf, yr, ldy); \
			} \
		} \
		free(wide); \
	}

DEFINE_MM(mm_f32, MOE_DTYPE_F32)
DEFINE_MM(mm_f16, MOE_DTYPE_F16)
DEFINE_MM(mm_bf16, MOE_DTYPE_BF16)
DEFINE_MM(mm_q8_0, MOE_DTYPE_Q8_0)
DEFINE_MM(mm_q4_0, MOE_DTYPE_Q4_0)
DEFINE_MM(mm_mxfp4, MOE_DTYPE_MXFP4)
DEFINE_MM(mm_iq4_nl, MOE_DTYPE_IQ4_NL)

#define SIMD_MM_TABLE \
	[MOE_DTYPE_F32] = SFX(mm_f32), [MOE_DTYPE_F16] = SFX(mm_f16), \
	[MOE_DTYPE_BF16] = SFX(mm_bf16), [MOE_DTYPE_Q8_0] = SFX(mm_q8_0), \
	[MOE_DTYPE_Q4_0] = SFX(mm_q4_0), [MOE_DTYPE_MXFP4] = SFX(mm_mxfp4), \
	[MOE_DTYPE_IQ4_NL] = SFX(mm_iq4_nl)
