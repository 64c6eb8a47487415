/* dtype.h - element types of expert weights, as stored in packs (the source
 * checkpoint's type is kept), with sizes, names and scalar conversions.
 * Block layouts follow ggml (see ../shared/reference/formats.md section 4.5). */
#ifndef MOETIER_DTYPE_H
#define MOETIER_DTYPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Values are stored in pack files: append only, never renumber. */
enum moe_dtype {
	MOE_DTYPE_INVALID = 0,
	MOE_DTYPE_F32 = 1,
	MOE_DTYPE_F16 = 2,
	MOE_DTYPE_BF16 = 3,
	MOE_DTYPE_Q8_0 = 4,   /* ggml block_q8_0: f16 d; int8 qs[32]        (34 B / 32) */
	MOE_DTYPE_Q4_0 = 5,   /* ggml block_q4_0: f16 d; u8 qs[16]          (18 B / 32) */
	MOE_DTYPE_MXFP4 = 6,  /* ggml block_mxfp4: u8 e (E8M0); u8 qs[16]   (17 B / 32) */
	MOE_DTYPE_U8 = 7,
	MOE_DTYPE_I8 = 8,
	MOE_DTYPE_I32 = 9,
	MOE_DTYPE_I64 = 10,
	MOE_DTYPE_F64 = 11,
	MOE_DTYPE_COUNT
};

#define MOE_QK 32 /* elements per quantization block (q8_0, q4_0, mxfp4) */

struct moe_block_q8_0 { uint16_t d; int8_t qs[32]; } __attribute__((packed));
struct moe_block_q4_0 { uint16_t d; uint8_t qs[16]; } __attribute__((packed));
struct moe_block_mxfp4 { uint8_t e; uint8_t qs[16]; } __attribute__((packed));
_Static_assert(sizeof(struct moe_block_q8_0) == 34, "q8_0 block");
_Static_assert(sizeof(struct moe_block_q4_0) == 18, "q4_0 block");
_Static_assert(sizeof(struct moe_block_mxfp4) == 17, "mxfp4 block");

/* "f32", "bf16", "q8_0", ... or "invalid". */
const char *moe_dtype_name(enum moe_dtype t);
/* Case-insensitive; accepts "F32", "bf16", "Q4_0", "mxfp4". INVALID if unknown. */
enum moe_dtype moe_dtype_parse(const char *name);
/* Elements per block (1 for plain types, 32 for block types). */
uint32_t moe_dtype_block_elems(enum moe_dtype t);
/* Bytes per block (element size for plain types). 0 for INVALID. */
uint32_t moe_dtype_block_bytes(enum moe_dtype t);
bool moe_dtype_is_quantized(enum moe_dtype t);
/* Bytes of a row of `cols` elements; false if cols is not a whole number of
 * blocks or on overflow. */
bool moe_dtype_row_bytes(enum moe_dtype t, uint64_t cols, uint64_t *out);

/* Scalar conversions (round-to-nearest-even on narrowing). */
float moe_f16_to_f32(uint16_t h);
uint16_t moe_f32_to_f16(float f);
static inline float moe_bf16_to_f32(uint16_t b)
{
	uint32_t u = (uint32_t)b << 16;
	float f;
	memcpy(&f, &u, 4);
	return f;
}
uint16_t moe_f32_to_bf16(float f);
/* 2^(e-127) for an E8M0 scale, as in the OCP MX spec (e=255 is NaN). */
float moe_e8m0_to_f32(uint8_t e);

/* Dequantize `n` elements (a multiple of the block size for block types)
 * from src in type t into dst. Bit-exact with ggml's reference. */
void moe_dequantize_row(enum moe_dtype t, const void *src, float *dst, size_t n);
/* Quantize n floats (multiple of 32) with ggml's reference quantizers. */
void moe_quantize_row_q8_0(const float *src, struct moe_block_q8_0 *dst, size_t n);
void moe_quantize_row_q4_0(const float *src, struct moe_block_q4_0 *dst, size_t n);
void moe_quantize_row_mxfp4(const float *src, struct moe_block_mxfp4 *dst, size_t n);

/* The doubled E2M1 table of ggml's block_mxfp4 (value * 2^(e-128)). */
extern const int8_t moe_kvalues_mxfp4[16];

#endif
