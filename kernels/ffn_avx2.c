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

const struct ffn_isa_ops ffn_ops_avx2 = {
	.mm = { SIMD_MM_TABLE },
	.bf16_act_mask = 0,
};
