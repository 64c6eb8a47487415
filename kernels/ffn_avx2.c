/* ffn_avx2.c - expert matmul kernels for AVX2 + FMA + F16C (8 floats per
 * vector). The body is ffn_simd.h; only the primitives live here. Every
 * function carries its own target attribute, so the file builds without
 * -mavx2 and the binary still runs on CPUs without AVX2 (ffn.c only calls
 * in here after __builtin_cpu_supports said yes). */
#include "config.h"

#include <immintrin.h>
#include <string.h>

#include "ffn_impl.h"

#define FN_ATTR __attribute__((target("avx2,fma,f16c")))
#define SIMD_W 8
#define RMAX 4
#define TMAX 2 /* 8 accumulators + 4 weight vectors + x fit in 16 ymm */
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

/* q8_0 weights times x quantized to q8_0 (ggml's scheme): per block an
 * exact integer dot (|w| as unsigned bytes times x with w's sign, pairs
 * summed by vpmaddubsw, then vpmaddwd), converted to f32 and scaled by
 * d_w * d_x into 8 lanes; the lanes are summed at the end. Each (row,
 * token) runs the same sequence, so batches give the same bits. */
FN_ATTR void ffn_mm_q8int_avx2(const uint8_t *W, size_t rb, uint32_t cols, uint32_t r0, uint32_t r1,
			       const struct ffn_act *a, float *y, size_t ldy)
{
	const uint32_t nb = cols / 32;
	const size_t ldq = a->ldq;
	const __m256i ones = _mm256_set1_epi16(1);

	for (uint32_t r = r0; r < r1; r += RMAX) {
		const uint32_t R = r1 - r < RMAX ? r1 - r : RMAX;
		for (uint32_t t = 0; t < a->B; t++) {
			const struct moe_block_q8_0 *xq = a->q8 + (size_t)t * ldq;
			__m256 acc[RMAX] = { _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
					     _mm256_setzero_ps() };
			for (uint32_t b = 0; b < nb; b++) {
				const __m256i xv = _mm256_loadu_si256((const __m256i *)(const void *)xq[b].qs);
				const float dx = _cvtsh_ss(xq[b].d);
				for (uint32_t i = 0; i < R; i++) {
					const uint8_t *blk = W + (size_t)(r + i) * rb + (size_t)b * 34;
					uint16_t h;
					memcpy(&h, blk, 2);
					const __m256i wv = _mm256_loadu_si256((const __m256i *)(const void *)(blk + 2));
					const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv),
										 _mm256_sign_epi8(xv, wv));
					const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
					acc[i] = _mm256_fmadd_ps(dot, _mm256_set1_ps(_cvtsh_ss(h) * dx), acc[i]);
				}
			}
			for (uint32_t i = 0; i < R; i++)
				y[(size_t)t * ldy + (r - r0) + i] = vhsum_avx2(acc[i]);
		}
	}
}

const struct ffn_isa_ops ffn_ops_avx2 = {
	.mm = { SIMD_MM_TABLE },
	.bf16_act_mask = 0,
	.mm_q8int = ffn_mm_q8int_avx2,
};
