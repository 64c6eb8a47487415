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
};

const int8_t moe_kvalues_mxfp4[16] = { 0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12 };

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
