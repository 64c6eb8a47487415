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
