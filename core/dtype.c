/* dtype.c - element type table, half/bfloat conversions, ggml block codecs. */
#include "config.h"
#include "dtype.h"

#include <math.h>
#include <strings.h>

#define MOE_MIN_U8(x) ((x) < 15 ? (x) : 15)
#define MOE_CLAMP_E8(x) ((x) < 0 ? 0 : (x) > 254 ? 254 : (x))

struct dtype_info {
	const char *name;
	uint32_t block_elems;
	uint32_t block_bytes;
};

static const struct dtype_info dtype_table[MOE_DTYPE_COUNT] = {
	[MOE_DTYPE_INVALID] = { "invalid", 0, 0 },
	[MOE_DTYPE_F32] = { "f32", 1, 4 },
	[MOE_DTYPE_F16] = { "f16", 1, 2 },
	[MOE_DTYPE_BF16] = { "bf16", 1, 2 },
	[MOE_DTYPE_Q8_0] = { "q8_0", 32, 34 },
	[MOE_DTYPE_Q4_0] = { "q4_0", 32, 18 },
	[MOE_DTYPE_MXFP4] = { "mxfp4", 32, 17 },
	[MOE_DTYPE_U8] = { "u8", 1, 1 },
	[MOE_DTYPE_I8] = { "i8", 1, 1 },
	[MOE_DTYPE_I32] = { "i32", 1, 4 },
	[MOE_DTYPE_I64] = { "i64", 1, 8 },
	[MOE_DTYPE_F64] = { "f64", 1, 8 },
	[MOE_DTYPE_Q4_K] = { "q4_K", 256, 144 },
	[MOE_DTYPE_Q5_K] = { "q5_K", 256, 176 },
	[MOE_DTYPE_Q6_K] = { "q6_K", 256, 210 },
	[MOE_DTYPE_Q3_K] = { "q3_K", 256, 110 },
	[MOE_DTYPE_Q2_K] = { "q2_K", 256, 84 },
	[MOE_DTYPE_IQ4_NL] = { "iq4_nl", 32, 18 },
	[MOE_DTYPE_IQ4_XS] = { "iq4_xs", 256, 136 },
};

const int8_t moe_kvalues_mxfp4[16] = { 0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12 };
const int8_t moe_kvalues_iq4nl[16] = { -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113 };

static const struct dtype_info *info(enum moe_dtype t)
{
	if ((unsigned)t >= MOE_DTYPE_COUNT)
		t = MOE_DTYPE_INVALID;
	return &dtype_table[t];
}

const char *moe_dtype_name(enum moe_dtype t) { return info(t)->name; }
uint32_t moe_dtype_block_elems(enum moe_dtype t) { return info(t)->block_elems; }
uint32_t moe_dtype_block_bytes(enum moe_dtype t) { return info(t)->block_bytes; }
bool moe_dtype_is_quantized(enum moe_dtype t) { return info(t)->block_elems > 1; }

enum moe_dtype moe_dtype_parse(const char *name)
{
	if (!name)
		return MOE_DTYPE_INVALID;
	for (int t = 1; t < MOE_DTYPE_COUNT; t++)
		if (strcasecmp(name, dtype_table[t].name) == 0)
			return (enum moe_dtype)t;
	return MOE_DTYPE_INVALID;
}

bool moe_dtype_row_bytes(enum moe_dtype t, uint64_t cols, uint64_t *out)
{
	const struct dtype_info *d = info(t);
	if (!d->block_elems || cols % d->block_elems)
		return false;
	return !__builtin_mul_overflow(cols / d->block_elems, (uint64_t)d->block_bytes, out);
}

float moe_f16_to_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000) << 16;
	uint32_t exp = (h >> 10) & 0x1f;
	uint32_t man = h & 0x3ff;
	uint32_t u;
	float f;

	if (exp == 0) {
		if (man == 0) {
			u = sign;
		} else {
			/* subnormal: value = man * 2^-24 */
			f = ldexpf((float)man, -24);
			return sign ? -f : f;
		}
	} else if (exp == 31) {
		u = sign | 0x7f800000u | (man << 13);
	} else {
		u = sign | ((exp + 112) << 23) | (man << 13);
	}
	memcpy(&f, &u, 4);
	return f;
}

uint16_t moe_f32_to_f16(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	uint32_t sign = (u >> 16) & 0x8000;
	uint32_t absu = u & 0x7fffffffu;

	if (absu >= 0x7f800000u) /* inf or nan */
		return (uint16_t)(sign | 0x7c00 | (absu > 0x7f800000u ? 0x200 : 0));
	if (absu >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
		return (uint16_t)(sign | 0x7c00);
	if (absu < 0x38800000u) { /* below the smallest normal half: subnormal */
		float a;
		memcpy(&a, &absu, 4);
		/* a * 2^24 rounded to nearest even gives the subnormal mantissa */
		float m = rintf(a * 16777216.0f);
		return (uint16_t)(sign | (uint32_t)m);
	}
	/* normal: round mantissa from 23 to 10 bits, nearest even */
	uint32_t r = absu + 0xfff + ((absu >> 13) & 1);
	return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

uint16_t moe_f32_to_bf16(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	if ((u & 0x7fffffffu) > 0x7f800000u) /* nan: keep it quiet */
		return (uint16_t)((u >> 16) | 64);
	u += 0x7fff + ((u >> 16) & 1);
	return (uint16_t)(u >> 16);
}

float moe_e8m0_to_f32(uint8_t e)
{
	uint32_t u;
	float f;
	if (e == 0xff)
		return NAN;
	if (e == 0)
		u = 0x00400000u; /* 2^-127 is subnormal in f32 */
	else
		u = (uint32_t)e << 23;
	memcpy(&f, &u, 4);
	return f;
}

/* ggml's half-scale used by block_mxfp4: 2^(e-128) = 0.5 * 2^(e-127). */
static float e8m0_half(uint8_t e)
{
	uint32_t u;
	float f;
	if (e < 2)
		u = 0x00200000u << e;
	else
		u = (uint32_t)(e - 1) << 23;
	memcpy(&f, &u, 4);
	return f;
}

/* The K-quant decoders. Each element is computed with the same float
 * operations in the same order as ggml's dequantize_row_q*_K (scale times
 * integer scale first, then times the code, minus min times its integer
 * min), which is what makes the values equal bit for bit. Element order:
 * q4_K / q5_K: 4 chunks of 64, the low nibbles of 32 bytes then their high
 * nibbles (scales 2j, 2j+1); q5_K's 5th bit is bit 2j / 2j+1 of qh[l].
 * q2_K / q3_K: 2 halves of 128, each 4 groups of 32 taking 2 bits (shift
 * 2g) of the half's 32 qs bytes, 16 elements per scale; q3_K's 3rd bit is
 * bit 4h+g of hmask[l] (set: +0, clear: -4). q6_K: 2 halves of 128, 4
 * groups of 32: low / high nibbles of ql[l] and ql[l+32] with bit pairs 0,
 * 2, 4, 6 of qh[l], minus 32, 16 elements per scale. */
/* q4_K and q5_K: 4 pairs of 32-element halves with 6-bit scales and mins;
 * q5_K adds a fifth bit per element from qh (NULL for q4_K). */
static void dequant_q45_K(uint16_t dh, uint16_t mh, const uint8_t *scales, const uint8_t *qs, const uint8_t *qh,
			  float *y)
{
	const float d = moe_f16_to_f32(dh), dmin = moe_f16_to_f32(mh);
	for (int j = 0; j < 4; j++) {
		uint8_t s0, m0, s1, m1;
		moe_kquant_scale_min(scales, 2 * j, &s0, &m0);
		moe_kquant_scale_min(scales, 2 * j + 1, &s1, &m1);
		const float d0 = d * s0, mn0 = dmin * m0, d1 = d * s1, mn1 = dmin * m1;
		const uint8_t *q = qs + 32 * j;
		for (int l = 0; l < 32; l++) {
			const int h0 = qh ? (qh[l] >> (2 * j)) & 1 : 0, h1 = qh ? (qh[l] >> (2 * j + 1)) & 1 : 0;
			y[64 * j + l] = d0 * ((q[l] & 15) | h0 << 4) - mn0;
			y[64 * j + 32 + l] = d1 * ((q[l] >> 4) | h1 << 4) - mn1;
		}
	}
}

static void dequant_q4_K(const void *blk, float *y)
{
	const struct moe_block_q4_K *b = blk;
	dequant_q45_K(b->d, b->dmin, b->scales, b->qs, NULL, y);
}

static void dequant_q5_K(const void *blk, float *y)
{
	const struct moe_block_q5_K *b = blk;
	dequant_q45_K(b->d, b->dmin, b->scales, b->qs, b->qh, y);
}

static void dequant_q6_K(const void *blk, float *y)
{
	const struct moe_block_q6_K *b = blk;
	const float d = moe_f16_to_f32(b->d);
	for (int h = 0; h < 2; h++) {
		const uint8_t *ql = b->ql + 64 * h, *qh = b->qh + 32 * h;
		const int8_t *sc = b->scales + 8 * h;
		for (int l = 0; l < 32; l++) {
			const int s = l / 16;
			const int q0 = ((ql[l] & 15) | ((qh[l] >> 0) & 3) << 4) - 32;
			const int q1 = ((ql[l + 32] & 15) | ((qh[l] >> 2) & 3) << 4) - 32;
			const int q2 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32;
			const int q3 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32;
			y[128 * h + l] = d * sc[s] * q0;
			y[128 * h + 32 + l] = d * sc[s + 2] * q1;
			y[128 * h + 64 + l] = d * sc[s + 4] * q2;
			y[128 * h + 96 + l] = d * sc[s + 6] * q3;
		}
	}
}

static void dequant_q3_K(const void *blk, float *y)
{
	const struct moe_block_q3_K *b = blk;
	const float d = moe_f16_to_f32(b->d);
	for (int h = 0; h < 2; h++) {
		const uint8_t *q = b->qs + 32 * h;
		for (int g = 0; g < 4; g++) {
			const int bit = 4 * h + g;
			for (int s = 0; s < 2; s++) {
				const float dl = d * moe_q3_K_scale(b->scales, 8 * h + 2 * g + s);
				for (int l = 16 * s; l < 16 * s + 16; l++) {
					const int v = ((q[l] >> (2 * g)) & 3) - ((b->hmask[l] >> bit) & 1 ? 0 : 4);
					y[128 * h + 32 * g + l] = dl * v;
				}
			}
		}
	}
}

static void dequant_q2_K(const void *blk, float *y)
{
	const struct moe_block_q2_K *b = blk;
	const float d = moe_f16_to_f32(b->d), dmin = moe_f16_to_f32(b->dmin);
	for (int h = 0; h < 2; h++) {
		const uint8_t *q = b->qs + 32 * h;
		for (int g = 0; g < 4; g++)
			for (int s = 0; s < 2; s++) {
				const uint8_t sc = b->scales[8 * h + 2 * g + s];
				const float dl = d * (sc & 15), ml = dmin * (sc >> 4);
				for (int l = 16 * s; l < 16 * s + 16; l++)
					y[128 * h + 32 * g + l] = dl * ((q[l] >> (2 * g)) & 3) - ml;
			}
	}
}

void moe_dequantize_row(enum moe_dtype t, const void *src, float *dst, size_t n)
{
	size_t i, j;
	switch (t) {
	case MOE_DTYPE_F32:
		memcpy(dst, src, n * 4);
		break;
	case MOE_DTYPE_F16: {
		const uint16_t *s = src;
		for (i = 0; i < n; i++)
			dst[i] = moe_f16_to_f32(s[i]);
		break;
	}
	case MOE_DTYPE_BF16: {
		const uint16_t *s = src;
		for (i = 0; i < n; i++)
			dst[i] = moe_bf16_to_f32(s[i]);
		break;
	}
	case MOE_DTYPE_Q8_0: {
		const struct moe_block_q8_0 *b = src;
		for (i = 0; i < n / 32; i++) {
			float d = moe_f16_to_f32(b[i].d);
			for (j = 0; j < 32; j++)
				dst[i * 32 + j] = (float)b[i].qs[j] * d;
		}
		break;
	}
	case MOE_DTYPE_Q4_0: {
		const struct moe_block_q4_0 *b = src;
		for (i = 0; i < n / 32; i++) {
			float d = moe_f16_to_f32(b[i].d);
			for (j = 0; j < 16; j++) {
				dst[i * 32 + j] = (float)((b[i].qs[j] & 0x0f) - 8) * d;
				dst[i * 32 + j + 16] = (float)((b[i].qs[j] >> 4) - 8) * d;
			}
		}
		break;
	}
	case MOE_DTYPE_MXFP4: {
		const struct moe_block_mxfp4 *b = src;
		for (i = 0; i < n / 32; i++) {
			float d = e8m0_half(b[i].e);
			for (j = 0; j < 16; j++) {
				dst[i * 32 + j] = (float)moe_kvalues_mxfp4[b[i].qs[j] & 0x0f] * d;
				dst[i * 32 + j + 16] = (float)moe_kvalues_mxfp4[b[i].qs[j] >> 4] * d;
			}
		}
		break;
	}
	case MOE_DTYPE_Q4_K:
	case MOE_DTYPE_Q5_K:
	case MOE_DTYPE_Q6_K:
	case MOE_DTYPE_Q3_K:
	case MOE_DTYPE_Q2_K: {
		/* one super-block of 256 at a time */
		void (*fn)(const void *, float *) = t == MOE_DTYPE_Q4_K ? dequant_q4_K
						  : t == MOE_DTYPE_Q5_K ? dequant_q5_K
						  : t == MOE_DTYPE_Q6_K ? dequant_q6_K
						  : t == MOE_DTYPE_Q3_K ? dequant_q3_K : dequant_q2_K;
		const size_t bb = moe_dtype_block_bytes(t);
		for (i = 0; i < n / 256; i++)
			fn((const uint8_t *)src + i * bb, dst + i * 256);
		break;
	}
	case MOE_DTYPE_IQ4_NL: {
		/* q4_0's layout with a table instead of q - 8 */
		const struct moe_block_iq4_nl *b = src;
		for (i = 0; i < n / 32; i++) {
			const float d = moe_f16_to_f32(b[i].d);
			for (j = 0; j < 16; j++) {
				dst[i * 32 + j] = d * moe_kvalues_iq4nl[b[i].qs[j] & 15];
				dst[i * 32 + j + 16] = d * moe_kvalues_iq4nl[b[i].qs[j] >> 4];
			}
		}
		break;
	}
	case MOE_DTYPE_IQ4_XS: {
		/* 8 sub-blocks of 32, each laid out as an iq4_nl block's codes,
		 * scale d * (6-bit scale - 32) */
		const struct moe_block_iq4_xs *b = src;
		for (i = 0; i < n / 256; i++) {
			const float d = moe_f16_to_f32(b[i].d);
			for (int s = 0; s < 8; s++) {
				const float dl = d * moe_iq4_xs_scale(&b[i], s);
				const uint8_t *q = b[i].qs + 16 * s;
				for (j = 0; j < 16; j++) {
					dst[i * 256 + 32 * s + j] = dl * moe_kvalues_iq4nl[q[j] & 15];
					dst[i * 256 + 32 * s + j + 16] = dl * moe_kvalues_iq4nl[q[j] >> 4];
				}
			}
		}
		break;
	}
	default: {
		/* integer types are not weights; convert value by value */
		for (i = 0; i < n; i++) {
			switch (t) {
			case MOE_DTYPE_U8: dst[i] = ((const uint8_t *)src)[i]; break;
			case MOE_DTYPE_I8: dst[i] = ((const int8_t *)src)[i]; break;
			case MOE_DTYPE_I32: dst[i] = (float)((const int32_t *)src)[i]; break;
			case MOE_DTYPE_I64: dst[i] = (float)((const int64_t *)src)[i]; break;
			case MOE_DTYPE_F64: dst[i] = (float)((const double *)src)[i]; break;
			default: dst[i] = NAN; break;
			}
		}
	}
	}
}

/* roundf() for |x| <= 128 without the libm call (q8_0 scales keep
 * |x| <= 127): truncate, then step away from zero at .5. NaN gives 0. */
static inline int round_half_away(float x)
{
	if (!(x == x))
		return 0;
	int i = (int)x;
	if (fabsf(x - (float)i) >= 0.5f)
		i += x > 0.0f ? 1 : -1;
	return i;
}

void moe_quantize_row_q8_0(const float *src, struct moe_block_q8_0 *dst, size_t n)
{
	for (size_t i = 0; i < n / 32; i++) {
		float amax = 0.0f;
		for (int j = 0; j < 32; j++)
			amax = fmaxf(amax, fabsf(src[i * 32 + j]));
		const float d = amax / 127.0f;
		/* A block below ~4e-37 makes 1/d infinite (its f16 scale is 0
		 * anyway): zero codes, not a float -> int overflow. */
		const float r = d ? 1.0f / d : 0.0f;
		const float id = isfinite(r) ? r : 0.0f;
		dst[i].d = moe_f32_to_f16(d);
		for (int j = 0; j < 32; j++)
			dst[i].qs[j] = (int8_t)round_half_away(src[i * 32 + j] * id);
	}
}

void moe_quantize_row_q4_0(const float *src, struct moe_block_q4_0 *dst, size_t n)
{
	for (size_t i = 0; i < n / 32; i++) {
		float amax = 0.0f, max = 0.0f;
		for (int j = 0; j < 32; j++) {
			float v = src[i * 32 + j];
			if (amax < fabsf(v)) {
				amax = fabsf(v);
				max = v;
			}
		}
		const float d = max / -8.0f;
		const float r = d ? 1.0f / d : 0.0f;
		const float id = isfinite(r) ? r : 0.0f; /* as in q8_0 */
		dst[i].d = moe_f32_to_f16(d);
		for (int j = 0; j < 16; j++) {
			const float x0 = src[i * 32 + j] * id;
			const float x1 = src[i * 32 + 16 + j] * id;
			const uint8_t xi0 = (uint8_t)MOE_MIN_U8((int8_t)(x0 + 8.5f));
			const uint8_t xi1 = (uint8_t)MOE_MIN_U8((int8_t)(x1 + 8.5f));
			dst[i].qs[j] = (uint8_t)(xi0 | (xi1 << 4));
		}
	}
}

/* Nearest entry of the doubled table for x (already scaled by 1/d), ties to
 * the smaller magnitude and +0 over -0: the same answer as ggml's
 * first-minimum search over the 16 entries, without the search. */
static int mxfp4_best_index(float x)
{
	const float a = fabsf(x);
	const int m = (a > 0.5f) + (a > 1.5f) + (a > 2.5f) + (a > 3.5f) + (a > 5.0f) + (a > 7.0f) + (a > 10.0f);
	return m == 0 ? 0 : (x < 0.0f ? 8 + m : m);
}

void moe_quantize_row_mxfp4(const float *src, struct moe_block_mxfp4 *dst, size_t n)
{
	for (size_t i = 0; i < n / 32; i++) {
		float amax = 0.0f;
		for (int j = 0; j < 32; j++)
			amax = fmaxf(amax, fabsf(src[i * 32 + j]));
		/* as ggml: e = floor(log2(amax)) - 2 + 127, so amax maps near 4..8 of
		 * the doubled table (whose max is 12) */
		const uint8_t e = amax > 0.0f ? (uint8_t)MOE_CLAMP_E8((int)floorf(log2f(amax)) - 2 + 127) : 0;
		const float d = e8m0_half(e);
		const float id = d > 0.0f ? 1.0f / d : 0.0f;
		dst[i].e = e;
		for (int j = 0; j < 16; j++) {
			int lo = mxfp4_best_index(src[i * 32 + j] * id);
			int hi = mxfp4_best_index(src[i * 32 + 16 + j] * id);
			dst[i].qs[j] = (uint8_t)(lo | (hi << 4));
		}
	}
}

void moe_quantize_row_q8_K(const float *src, struct moe_block_q8_K *dst, size_t n)
{
	for (size_t i = 0; i < n / 256; i++) {
		const float *x = src + i * 256;
		struct moe_block_q8_K *y = &dst[i];
		float amax = 0.0f, max = 0.0f;
		for (int j = 0; j < 256; j++)
			if (fabsf(x[j]) > amax) {
				amax = fabsf(x[j]);
				max = x[j];
			}
		const float iscale = amax > 0.0f ? -127.0f / max : 0.0f;
		if (!isfinite(iscale) || iscale == 0.0f) {
			memset(y, 0, sizeof(*y));
			continue;
		}
		for (int j = 0; j < 256; j++) {
			/* rintf: nearest, ties to even, as ggml's 1.5 * 2^23 trick;
			 * a NaN element (skipped by the max) gets code 0 */
			const float v = iscale * x[j];
			const int q = v == v ? (int)rintf(v) : 0;
			y->qs[j] = (int8_t)(q < 127 ? q : 127);
		}
		for (int g = 0; g < 16; g++) {
			int sum = 0;
			for (int j = 0; j < 16; j++)
				sum += y->qs[16 * g + j];
			y->bsums[g] = (int16_t)sum;
		}
		y->d = 1.0f / iscale;
	}
}
