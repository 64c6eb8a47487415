/* Description: CRC32C check values, half/bfloat conversions, ggml block
 * codecs, size parsing and model validation. */
#include "config.h"

#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "crc32c.h"
#include "dtype.h"
#include "model.h"
#include "util.h"

Test(core, crc32c_check_value)
{
	cr_assert_eq(crc32c("123456789", 9), 0xE3069283u);
	cr_assert_eq(crc32c("", 0), 0u);
	/* chaining equals one pass */
	uint32_t a = crc32c_update(crc32c("1234", 4), "56789", 5);
	cr_assert_eq(a, 0xE3069283u);
	/* RFC 3720 B.4: 32 bytes of zeros */
	unsigned char z[32] = { 0 };
	cr_assert_eq(crc32c(z, sizeof(z)), 0x8A9136AAu);
}

Test(core, f16_roundtrip_all)
{
	for (uint32_t h = 0; h < 65536; h++) {
		uint16_t x = (uint16_t)h;
		float f = moe_f16_to_f32(x);
		if (isnan(f))
			continue;
		cr_assert_eq(moe_f32_to_f16(f), x, "half 0x%04x -> %g -> 0x%04x", h, f, moe_f32_to_f16(f));
	}
	cr_assert_eq(moe_f32_to_f16(1.0f), 0x3c00);
	cr_assert_eq(moe_f32_to_f16(65520.0f), 0x7c00);     /* rounds to inf */
	cr_assert_eq(moe_f32_to_f16(65504.0f), 0x7bff);
	cr_assert_eq(moe_f32_to_f16(5.960464477539063e-08f), 0x0001);
}

Test(core, bf16_rounding)
{
	cr_assert_eq(moe_f32_to_bf16(1.0f), 0x3f80);
	float f = moe_bf16_to_f32(0x3f81);
	cr_assert_float_eq(f, 1.0078125f, 0);
	/* halfway between 0x3f80 and 0x3f81 rounds to even (0x3f80) */
	uint32_t u = 0x3f808000u;
	memcpy(&f, &u, 4);
	cr_assert_eq(moe_f32_to_bf16(f), 0x3f80);
	u = 0x3f818000u;
	memcpy(&f, &u, 4);
	cr_assert_eq(moe_f32_to_bf16(f), 0x3f82);
}

Test(core, q8_0_q4_0_formulas)
{
	struct moe_block_q8_0 b8;
	struct moe_block_q4_0 b4;
	float y[32];
	b8.d = moe_f32_to_f16(0.5f);
	for (int j = 0; j < 32; j++)
		b8.qs[j] = (int8_t)(j - 16);
	moe_dequantize_row(MOE_DTYPE_Q8_0, &b8, y, 32);
	for (int j = 0; j < 32; j++)
		cr_assert_eq(y[j], (float)(j - 16) * 0.5f);
	b4.d = moe_f32_to_f16(2.0f);
	for (int j = 0; j < 16; j++)
		b4.qs[j] = (uint8_t)(j | ((15 - j) << 4));
	moe_dequantize_row(MOE_DTYPE_Q4_0, &b4, y, 32);
	for (int j = 0; j < 16; j++) {
		cr_assert_eq(y[j], (float)(j - 8) * 2.0f);
		cr_assert_eq(y[j + 16], (float)(15 - j - 8) * 2.0f);
	}
}

Test(core, quantize_roundtrip_error_bounded)
{
	float x[64], y[64];
	struct moe_block_q8_0 q8[2];
	struct moe_block_q4_0 q4[2];
	struct moe_block_mxfp4 mx[2];
	for (int i = 0; i < 64; i++)
		x[i] = sinf((float)i * 0.37f) * 3.0f;
	moe_quantize_row_q8_0(x, q8, 64);
	moe_dequantize_row(MOE_DTYPE_Q8_0, q8, y, 64);
	for (int i = 0; i < 64; i++)
		cr_assert_leq(fabsf(x[i] - y[i]), 3.0f / 127.0f + 1e-3f);
	moe_quantize_row_q4_0(x, q4, 64);
	moe_dequantize_row(MOE_DTYPE_Q4_0, q4, y, 64);
	for (int i = 0; i < 64; i++)
		cr_assert_leq(fabsf(x[i] - y[i]), 3.0f / 8.0f + 1e-2f);
	moe_quantize_row_mxfp4(x, mx, 64);
	moe_dequantize_row(MOE_DTYPE_MXFP4, mx, y, 64);
	for (int i = 0; i < 64; i++)
		cr_assert_leq(fabsf(x[i] - y[i]), 1.0f, "i=%d x=%g y=%g", i, x[i], y[i]);
}

Test(core, mxfp4_dequant_formula)
{
	struct moe_block_mxfp4 b;
	float y[32];
	b.e = 128; /* 2^(128-128) = 1 with the doubled table */
	for (int j = 0; j < 16; j++)
		b.qs[j] = (uint8_t)(j | (j << 4));
	moe_dequantize_row(MOE_DTYPE_MXFP4, &b, y, 32);
	for (int j = 0; j < 16; j++) {
		cr_assert_eq(y[j], (float)moe_kvalues_mxfp4[j]);
		cr_assert_eq(y[j + 16], (float)moe_kvalues_mxfp4[j]);
	}
	b.e = 1; /* denormal half-scale: 0x00200000 << 1 */
	moe_dequantize_row(MOE_DTYPE_MXFP4, &b, y, 32);
	cr_assert_eq(y[1], ldexpf(1.0f, -127));
}

Test(core, dtype_table)
{
	uint64_t rb;
	cr_assert_eq(moe_dtype_parse("BF16"), MOE_DTYPE_BF16);
	cr_assert_eq(moe_dtype_parse("q4_0"), MOE_DTYPE_Q4_0);
	cr_assert_eq(moe_dtype_parse("nope"), MOE_DTYPE_INVALID);
	cr_assert(moe_dtype_row_bytes(MOE_DTYPE_Q8_0, 64, &rb));
	cr_assert_eq(rb, 68);
	cr_assert_not(moe_dtype_row_bytes(MOE_DTYPE_Q4_0, 33, &rb));
	cr_assert(moe_dtype_row_bytes(MOE_DTYPE_F16, 33, &rb));
	cr_assert_eq(rb, 66);
	cr_assert_not(moe_dtype_row_bytes(MOE_DTYPE_F32, UINT64_MAX / 2, &rb));
}

Test(core, parse_size)
{
	uint64_t v;
	cr_assert_eq(moe_parse_size("64M", &v), 0);
	cr_assert_eq(v, 64ull << 20);
	cr_assert_eq(moe_parse_size("1.5GiB", &v), 0);
	cr_assert_eq(v, 3ull << 29);
	cr_assert_eq(moe_parse_size("4096", &v), 0);
	cr_assert_eq(v, 4096);
	cr_assert_eq(moe_parse_size("-1", &v), -EINVAL);
	cr_assert_eq(moe_parse_size("12Q", &v), -EINVAL);
	cr_assert_eq(moe_parse_size("", &v), -EINVAL);
	cr_assert_eq(moe_parse_size("1e30T", &v), -ERANGE);
}

Test(core, model_validate)
{
	struct moe_model_config c;
	struct moe_error err;
	memset(&c, 0, sizeof(c));
	strcpy(c.name, "tiny");
	c.dtype = MOE_DTYPE_BF16;
	c.hidden = 64;
	c.expert_width = 32;
	c.n_experts = 8;
	c.top_k = 2;
	c.n_layers = 3;
	c.n_moe_layers = 2;
	c.first_moe_layer = 1;
	moe_model_set_family_defaults(&c, MOE_FAMILY_DEEPSEEK_V3);
	c.n_group = 4;
	c.topk_group = 2;
	cr_assert_eq(moe_model_validate(&c, &err), 0, "%s", err.msg);
	cr_assert_eq(moe_model_moe_index(&c, 0), -1);
	cr_assert_eq(moe_model_moe_index(&c, 2), 1);
	cr_assert_eq(moe_model_layer_of(&c, 1), 2u);
	c.n_moe_layers = 3;
	cr_assert_eq(moe_model_validate(&c, &err), -EINVAL);
	cr_assert(strstr(err.msg, "exceed") != NULL, "%s", err.msg);
	/* the layer-count errors name the field that is wrong */
	c.n_layers = 2000;
	cr_assert_eq(moe_model_validate(&c, &err), -EINVAL);
	cr_assert(strstr(err.msg, "(n_layers) 2000") != NULL, "%s", err.msg);
	c.n_layers = 3;
	c.n_moe_layers = 0;
	cr_assert_eq(moe_model_validate(&c, &err), -EINVAL);
	cr_assert(strstr(err.msg, "(n_moe_layers) 0") != NULL, "%s", err.msg);
	c.n_moe_layers = 2;
	c.top_k = 9;
	cr_assert_eq(moe_model_validate(&c, &err), -EINVAL);
	c.top_k = 2;
	c.n_group = 3;
	cr_assert_eq(moe_model_validate(&c, &err), -EINVAL);
	cr_assert_eq(moe_family_parse("deepseek2"), MOE_FAMILY_DEEPSEEK_V2);
	cr_assert_eq(moe_family_parse("gpt-oss"), MOE_FAMILY_GPT_OSS);
	cr_assert_str_eq(moe_family_name(MOE_FAMILY_QWEN2_MOE), "qwen2_moe");
}

Test(core, kquant_dtype_table)
{
	static const struct { enum moe_dtype t; const char *name; uint32_t bytes; } k[] = {
		{ MOE_DTYPE_Q4_K, "q4_K", 144 }, { MOE_DTYPE_Q5_K, "q5_K", 176 }, { MOE_DTYPE_Q6_K, "q6_K", 210 },
		{ MOE_DTYPE_Q3_K, "q3_K", 110 }, { MOE_DTYPE_Q2_K, "q2_K", 84 }, { MOE_DTYPE_IQ4_XS, "iq4_xs", 136 },
	};
	uint64_t rb;
	/* the stored values of the older types never move */
	cr_assert_eq(MOE_DTYPE_F64, 11);
	cr_assert_eq(MOE_DTYPE_Q4_K, 12);
	for (size_t i = 0; i < sizeof(k) / sizeof(k[0]); i++) {
		cr_assert_str_eq(moe_dtype_name(k[i].t), k[i].name);
		cr_assert_eq(moe_dtype_parse(k[i].name), k[i].t);
		cr_assert_eq(moe_dtype_block_elems(k[i].t), 256);
		cr_assert_eq(moe_dtype_block_bytes(k[i].t), k[i].bytes);
		cr_assert(moe_dtype_is_quantized(k[i].t));
		cr_assert(moe_dtype_row_bytes(k[i].t, 512, &rb));
		cr_assert_eq(rb, 2 * k[i].bytes);
		cr_assert_not(moe_dtype_row_bytes(k[i].t, 288, &rb), "%s: 288 is not whole super-blocks", k[i].name);
	}
	cr_assert_eq(moe_dtype_parse("IQ4_NL"), MOE_DTYPE_IQ4_NL);
	cr_assert_eq(moe_dtype_block_elems(MOE_DTYPE_IQ4_NL), 32);
	cr_assert_eq(moe_dtype_block_bytes(MOE_DTYPE_IQ4_NL), 18);
	cr_assert_eq(moe_dtype_parse("Q4_K"), MOE_DTYPE_Q4_K);
	cr_assert_eq(moe_dtype_parse("Q6_k"), MOE_DTYPE_Q6_K);
}

/* Packs 6-bit scales and mins the way ggml's q4_K quantizer does, and the
 * readers give them back. */
Test(core, kquant_scale_packing)
{
	uint8_t sc[8], mn[8], s[12];
	for (int j = 0; j < 8; j++) {
		sc[j] = (uint8_t)(7 * j + 5) & 63;
		mn[j] = (uint8_t)(63 - 9 * j) & 63;
	}
	for (int j = 0; j < 4; j++) {
		s[j] = sc[j] | (uint8_t)((sc[j + 4] >> 4) << 6);
		s[j + 4] = mn[j] | (uint8_t)((mn[j + 4] >> 4) << 6);
		s[j + 8] = (uint8_t)((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4));
	}
	for (int j = 0; j < 8; j++) {
		uint8_t a, b;
		moe_kquant_scale_min(s, j, &a, &b);
		cr_assert_eq(a, sc[j], "j=%d", j);
		cr_assert_eq(b, mn[j], "j=%d", j);
	}
	/* q3_K: 16 scales of 6 bits, stored biased by 32 */
	int v[16];
	uint8_t s3[12] = { 0 };
	for (int j = 0; j < 16; j++) {
		v[j] = (j * 11) % 64 - 32;
		const int u = v[j] + 32;
		s3[j % 8] |= (uint8_t)((u & 15) << (j < 8 ? 0 : 4));
		s3[8 + j % 4] |= (uint8_t)((u >> 4) << (2 * (j / 4)));
	}
	for (int j = 0; j < 16; j++)
		cr_assert_eq(moe_q3_K_scale(s3, j), v[j], "j=%d", j);
}

/* Every element of random K-quant super-blocks against a decoder written
 * from the format element by element (a different walk from dtype.c's):
 * catches an index or bit slip. The float formula (order of operations)
 * is ggml's; tests/test_kquant_ggml checks the bits against ggml itself. */
static float kq_elem(enum moe_dtype t, const uint8_t *blk, int e)
{
	const int h = e / 128, g = (e % 128) / 32, l = e % 32;
	uint8_t sc, m;
	switch (t) {
	case MOE_DTYPE_Q4_K: case MOE_DTYPE_Q5_K: {
		const int j = e / 64, hi = (e % 64) >= 32, r = e % 32;
		const uint8_t *scales = blk + 4;
		const uint8_t *qs = blk + (t == MOE_DTYPE_Q4_K ? 16 : 48);
		uint16_t dh, mh;
		memcpy(&dh, blk, 2);
		memcpy(&mh, blk + 2, 2);
		moe_kquant_scale_min(scales, 2 * j + hi, &sc, &m);
		int q = hi ? qs[32 * j + r] >> 4 : qs[32 * j + r] & 15;
		if (t == MOE_DTYPE_Q5_K)
			q += ((blk[16 + r] >> (2 * j + hi)) & 1) * 16;
		const float d1 = moe_f16_to_f32(dh) * sc, m1 = moe_f16_to_f32(mh) * m;
		return d1 * q - m1;
	}
	case MOE_DTYPE_Q6_K: {
		const uint8_t *ql = blk, *qh = blk + 128;
		const int8_t *scales = (const int8_t *)(blk + 192);
		uint16_t dh;
		memcpy(&dh, blk + 208, 2);
		const int lo = (g & 1) ? ql[64 * h + 32 + l] : ql[64 * h + l];
		const int q = ((g < 2 ? lo & 15 : lo >> 4) | (((qh[32 * h + l] >> (2 * g)) & 3) << 4)) - 32;
		return moe_f16_to_f32(dh) * scales[8 * h + 2 * g + l / 16] * q;
	}
	case MOE_DTYPE_IQ4_XS: {
		/* d, scales_h (u16), scales_l[4], then 8 x 16 bytes of codes */
		uint16_t dh, sh;
		memcpy(&dh, blk, 2);
		memcpy(&sh, blk + 2, 2);
		const int sb = e / 32, r = e % 32;
		const int ls = ((blk[4 + sb / 2] >> (4 * (sb % 2))) & 15) | ((sh >> (2 * sb)) & 3) << 4;
		const uint8_t byte = blk[8 + 16 * sb + r % 16];
		const float dl = moe_f16_to_f32(dh) * (ls - 32);
		return dl * moe_kvalues_iq4nl[r < 16 ? byte & 15 : byte >> 4];
	}
	case MOE_DTYPE_Q3_K: {
		const uint8_t *hm = blk, *qs = blk + 32;
		uint16_t dh;
		memcpy(&dh, blk + 108, 2);
		const int q = ((qs[32 * h + l] >> (2 * g)) & 3) - (((hm[l] >> (4 * h + g)) & 1) ? 0 : 4);
		const float dl = moe_f16_to_f32(dh) * moe_q3_K_scale(blk + 96, 8 * h + 2 * g + l / 16);
		return dl * q;
	}
	default: { /* Q2_K */
		uint16_t dh, mh;
		memcpy(&dh, blk + 80, 2);
		memcpy(&mh, blk + 82, 2);
		const uint8_t s = blk[8 * h + 2 * g + l / 16];
		const float dl = moe_f16_to_f32(dh) * (s & 15), ml = moe_f16_to_f32(mh) * (s >> 4);
		return dl * ((blk[16 + 32 * h + l] >> (2 * g)) & 3) - ml;
	}
	}
}

Test(core, kquant_dequant_elementwise)
{
	static const enum moe_dtype ts[] = { MOE_DTYPE_Q4_K, MOE_DTYPE_Q5_K, MOE_DTYPE_Q6_K,
					     MOE_DTYPE_Q3_K, MOE_DTYPE_Q2_K, MOE_DTYPE_IQ4_XS };
	uint8_t blk[3 * 210];
	float y[3 * 256];
	uint32_t s = 12345;
	for (size_t k = 0; k < sizeof(ts) / sizeof(ts[0]); k++) {
		const enum moe_dtype t = ts[k];
		const uint32_t bb = moe_dtype_block_bytes(t);
		for (int rep = 0; rep < 20; rep++) {
			for (uint32_t i = 0; i < 3 * bb; i++) {
				s = s * 1664525u + 1013904223u;
				blk[i] = (uint8_t)(s >> 24);
			}
			/* finite f16 scales: d / dmin fields of each block */
			for (int b = 0; b < 3; b++) {
				uint8_t *p = blk + b * bb;
				const uint16_t d = moe_f32_to_f16(0.01f * (float)(rep + 1 + b)), dm = moe_f32_to_f16(0.003f * (float)(rep + 2));
				switch (t) {
				case MOE_DTYPE_Q4_K: case MOE_DTYPE_Q5_K: memcpy(p, &d, 2); memcpy(p + 2, &dm, 2); break;
				case MOE_DTYPE_IQ4_XS: memcpy(p, &d, 2); break;
				case MOE_DTYPE_Q6_K: memcpy(p + 208, &d, 2); break;
				case MOE_DTYPE_Q3_K: memcpy(p + 108, &d, 2); break;
				default: memcpy(p + 80, &d, 2); memcpy(p + 82, &dm, 2); break;
				}
			}
			moe_dequantize_row(t, blk, y, 3 * 256);
			for (int e = 0; e < 3 * 256; e++) {
				const float want = kq_elem(t, blk + (e / 256) * bb, e % 256);
				cr_assert(memcmp(&want, &y[e], 4) == 0, "%s rep %d element %d: %g, want %g",
					  moe_dtype_name(t), rep, e, (double)y[e], (double)want);
			}
		}
	}
}

Test(core, q8_K_quantize)
{
	float x[512];
	struct moe_block_q8_K q[2];
	for (int i = 0; i < 256; i++)
		x[i] = sinf((float)i * 0.61f) * 2.5f;
	x[77] = -3.0f; /* the largest magnitude: d = -max / 127, its code -127 */
	for (int i = 256; i < 512; i++)
		x[i] = 0.0f;
	moe_quantize_row_q8_K(x, q, 512);
	cr_assert_eq(q[0].qs[77], -127);
	cr_assert_float_eq(q[0].d, 3.0f / 127.0f, 1e-7f);
	for (int i = 0; i < 256; i++) {
		cr_assert_leq(fabsf(x[i] - q[0].d * q[0].qs[i]), fabsf(q[0].d) * 0.5001f, "i=%d", i);
		cr_assert_geq(q[0].qs[i], -127);
	}
	for (int g = 0; g < 16; g++) {
		int sum = 0;
		for (int j = 0; j < 16; j++)
			sum += q[0].qs[16 * g + j];
		cr_assert_eq(q[0].bsums[g], sum);
	}
	cr_assert_eq(q[1].d, 0.0f, "an all-zero block");
	for (int i = 0; i < 256; i++)
		cr_assert_eq(q[1].qs[i], 0);
}

Test(core, iq4_nl_formula)
{
	struct moe_block_iq4_nl b;
	float y[32];
	static const int lv[16] = { -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113 };
	b.d = moe_f32_to_f16(0.25f);
	for (int j = 0; j < 16; j++)
		b.qs[j] = (uint8_t)(j | ((15 - j) << 4));
	moe_dequantize_row(MOE_DTYPE_IQ4_NL, &b, y, 32);
	for (int j = 0; j < 16; j++) {
		cr_assert_eq(y[j], 0.25f * (float)lv[j]);
		cr_assert_eq(y[j + 16], 0.25f * (float)lv[15 - j]);
	}
}
