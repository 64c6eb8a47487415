/* ffn_impl.h - private interface between ffn.c (dispatch, threads, the
 * activation) and the per-ISA matmul kernels (ffn_avx2.c, ffn_avx512.c). */
#ifndef MOETIER_FFN_IMPL_H
#define MOETIER_FFN_IMPL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "dtype.h"

/* B tokens of activations, row stride ld (elements). bf is x rounded to
 * bf16 with the same stride, filled only for the dtypes in a table's
 * bf16_act_mask (the vdpbf16ps kernel multiplies bf16 by bf16). fp is x
 * with every whole group of perm_w columns reordered even-index elements
 * first, then odd ones (ffn_perm_even_odd), filled for the dtypes in
 * perm_act_mask: the SIMD bf16 kernels split 2 * SIMD_W loaded bf16 into
 * the even and odd elements with one shift / one and, no shuffle. */
struct ffn_act {
	const float *f;
	const uint16_t *bf;
	const float *fp;
	const struct moe_block_q8_0 *q8; /* x quantized to q8_0 (FFN_Q8_INT), ldq blocks apart */
	const struct moe_block_q8_K *q8k; /* x quantized to q8_K (K-quant weights), ldqk apart */
	uint32_t B;
	size_t ld;
	size_t ldq;
	size_t ldqk;
};

/* The K-quant weight types: their kernels always take x as q8_K (ggml's
 * scheme), whatever the q8 mode. */
#define FFN_KQUANT_MASK \
	((1u << MOE_DTYPE_Q4_K) | (1u << MOE_DTYPE_Q5_K) | (1u << MOE_DTYPE_Q6_K) | (1u << MOE_DTYPE_Q3_K) | \
	 (1u << MOE_DTYPE_Q2_K) | (1u << MOE_DTYPE_IQ4_XS))

/* One K-quant super-block times one q8_K block, given its exact integer
 * sums: isum = sum over sub-blocks of scale * sum(q * xq) and imin = sum
 * of min * (sum of the sub-block's xq). Every path computes isum and imin
 * exactly (integers) and adds them to the row's float accumulator with
 * this one expression, so the reference C, AVX2 and AVX-512 paths give the
 * same bits, and so does a token alone or in a batch. */
static inline float ffn_kq_accum(float acc, float d, float dmin, float dx, int32_t isum, int32_t imin)
{
	acc = __builtin_fmaf(d * dx, (float)isum, acc);
	return __builtin_fmaf(-(dmin * dx), (float)imin, acc);
}

/* y[t*ldy + (r - r0)] = sum_c W[r][c] x[t][c] for r in [r0, r1), t < B.
 * W points at row 0; rows are rb bytes apart. */
typedef void (*ffn_mm_fn)(const uint8_t *W, size_t rb, uint32_t cols, uint32_t r0, uint32_t r1,
			  const struct ffn_act *x, float *y, size_t ldy);

struct ffn_isa_ops {
	ffn_mm_fn mm[MOE_DTYPE_COUNT];
	uint32_t bf16_act_mask; /* 1u << dtype when mm[dtype] reads x->bf */
	uint32_t perm_act_mask; /* 1u << dtype when mm[dtype] reads x->fp */
	uint32_t perm_w;        /* fp's group width: 2 * SIMD_W */
	ffn_mm_fn mm_q8int;     /* q8_0 weights x q8_0-quantized x, integer dot (FFN_Q8_INT) */
	ffn_mm_fn mm_q4int;     /* q4_0 weights x q8_0-quantized x, likewise */
	ffn_mm_fn mm_iq4int;    /* iq4_nl weights x q8_0-quantized x, likewise */
	/* x to q8_0 for the integer kernels: the same blocks as
	 * moe_quantize_row_q8_0 for finite x (n a multiple of 32) */
	void (*quant_q8)(const float *x, struct moe_block_q8_0 *out, uint32_t n);
	/* x to q8_K for the K-quant kernels: moe_quantize_row_q8_K's blocks
	 * for finite x (n a multiple of 256) */
	void (*quant_q8k)(const float *x, struct moe_block_q8_K *out, uint32_t n);
};

/* One ffn_mm_fn per weight type for the `mm` tables: NAME runs IMPL, a kernel
 * that takes the type as its first argument, on type DT. ATTR: static, or
 * the target attribute of an exported ISA kernel. */
#define FFN_MM_DECL(NAME) \
	void NAME(const uint8_t *W, size_t rb, uint32_t cols, uint32_t r0, uint32_t r1, const struct ffn_act *x, \
		  float *y, size_t ldy)
#define FFN_MM_FOR_DTYPE(ATTR, NAME, IMPL, DT) \
	ATTR void NAME(const uint8_t *W, size_t rb, uint32_t cols, uint32_t r0, uint32_t r1, \
		       const struct ffn_act *a, float *y, size_t ldy) \
	{ \
		IMPL(DT, W, rb, cols, r0, r1, a, y, ldy); \
	}

/* The AVX2 integer q8_0 / q4_0 / iq4_nl kernels, shared by the AVX-512 tables (they
 * work on 34- and 18-byte blocks, which 512-bit registers do not help). */
FFN_MM_DECL(ffn_mm_q8int_avx2);
FFN_MM_DECL(ffn_mm_q4int_avx2);
FFN_MM_DECL(ffn_mm_iq4int_avx2);
void ffn_quant_q8_avx2(const float *x, struct moe_block_q8_0 *out, uint32_t n);
/* The same three on AVX-512 VNNI (ffn_vnni.c), bit for bit, faster for
 * batches: ffn.c puts them in place of the AVX2 ones on the AVX-512 paths
 * when the CPU has AVX512-VNNI. */
FFN_MM_DECL(ffn_mm_q8int_vnni512);
FFN_MM_DECL(ffn_mm_q4int_vnni512);
FFN_MM_DECL(ffn_mm_iq4int_vnni512);
/* And for q4_K, q5_K, q6_K, q3_K, q2_K batches: the AVX2 K-quant kernels'
 * bits. */
FFN_MM_DECL(ffn_mm_q4_K_vnni512);
FFN_MM_DECL(ffn_mm_q5_K_vnni512);
FFN_MM_DECL(ffn_mm_q6_K_vnni512);
FFN_MM_DECL(ffn_mm_q3_K_vnni512);
FFN_MM_DECL(ffn_mm_q2_K_vnni512);
/* The AVX2 K-quant kernels (q4_K ... q2_K x q8_K) and q8_K quantizer,
 * shared by the AVX-512 tables in the same way. */
FFN_MM_DECL(ffn_mm_q4_K_avx2);
FFN_MM_DECL(ffn_mm_q5_K_avx2);
FFN_MM_DECL(ffn_mm_q6_K_avx2);
FFN_MM_DECL(ffn_mm_q3_K_avx2);
FFN_MM_DECL(ffn_mm_q2_K_avx2);
FFN_MM_DECL(ffn_mm_iq4_xs_avx2);
void ffn_quant_q8k_avx2(const float *x, struct moe_block_q8_K *out, uint32_t n);
#define FFN_KQUANT_MM_AVX2 \
	[MOE_DTYPE_Q4_K] = ffn_mm_q4_K_avx2, [MOE_DTYPE_Q5_K] = ffn_mm_q5_K_avx2, \
	[MOE_DTYPE_Q6_K] = ffn_mm_q6_K_avx2, [MOE_DTYPE_Q3_K] = ffn_mm_q3_K_avx2, \
	[MOE_DTYPE_Q2_K] = ffn_mm_q2_K_avx2, [MOE_DTYPE_IQ4_XS] = ffn_mm_iq4_xs_avx2

/* One row of `cols` floats reordered: inside each whole group of w columns
 * (w even, groups from column 0), first the w/2 even-index elements of x,
 * then the w/2 odd ones; the columns past the last whole group stay in
 * place. */
static inline void ffn_perm_even_odd(const float *x, float *out, uint32_t cols, uint32_t w)
{
	const uint32_t full = cols / w * w, h = w / 2;
	for (uint32_t g = 0; g < full; g += w)
		for (uint32_t j = 0; j < h; j++) {
			out[g + j] = x[g + 2 * j];
			out[g + h + j] = x[g + 2 * j + 1];
		}
	for (uint32_t c = full; c < cols; c++)
		out[c] = x[c];
}

extern const struct ffn_isa_ops ffn_ops_avx2;
extern const struct ffn_isa_ops ffn_ops_avx512;
extern const struct ffn_isa_ops ffn_ops_avx512bf16;

/* ggml's block_mxfp4 scale 2^(e-128) (denormal for e < 2), exactly as
 * moe_dequantize_row computes it. */
static inline float ffn_e8m0_half(uint8_t e)
{
	uint32_t u = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
	float f;
	memcpy(&f, &u, 4);
	return f;
}

#endif
