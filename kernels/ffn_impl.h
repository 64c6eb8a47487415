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
	uint32_t B;
	size_t ld;
	size_t ldq;
};

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
	/* x to q8_0 for the integer kernels: the same blocks as
	 * moe_quantize_row_q8_0 for finite x (n a multiple of 32) */
	void (*quant_q8)(const float *x, struct moe_block_q8_0 *out, uint32_t n);
};

/* The AVX2 integer q8_0 / q4_0 kernels, shared by the AVX-512 tables (they
 * work on 34- and 18-byte blocks, which 512-bit registers do not help). */
void ffn_mm_q8int_avx2(const uint8_t *W, size_t rb, uint32_t cols, uint32_t r0, uint32_t r1,
		       const struct ffn_act *x, float *y, size_t ldy);
void ffn_mm_q4int_avx2(const uint8_t *W, size_t rb, uint32_t cols, uint32_t r0, uint32_t r1,
		       const struct ffn_act *x, float *y, size_t ldy);
void ffn_quant_q8_avx2(const float *x, struct moe_block_q8_0 *out, uint32_t n);

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
