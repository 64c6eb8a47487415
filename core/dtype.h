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
	/* ggml K-quants: super-blocks of 256 (MOE_QK_K) elements */
	MOE_DTYPE_Q4_K = 12,  /* f16 d, dmin; 6-bit scales/mins [12]; u8 qs[128]       (144 B / 256) */
	MOE_DTYPE_Q5_K = 13,  /* f16 d, dmin; scales [12]; u8 qh[32]; u8 qs[128]      (176 B / 256) */
	MOE_DTYPE_Q6_K = 14,  /* u8 ql[128]; u8 qh[64]; int8 scales[16]; f16 d        (210 B / 256) */
	MOE_DTYPE_Q3_K = 15,  /* u8 hmask[32]; u8 qs[64]; 6-bit scales [12]; f16 d    (110 B / 256) */
	MOE_DTYPE_Q2_K = 16,  /* 4-bit scale|min [16]; u8 qs[64]; f16 d, dmin         ( 84 B / 256) */
	/* ggml's non-linear 4-bit codes (moe_kvalues_iq4nl) */
	MOE_DTYPE_IQ4_NL = 17, /* f16 d; u8 qs[16]                                     ( 18 B / 32) */
	MOE_DTYPE_IQ4_XS = 18, /* f16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]    (136 B / 256) */
	MOE_DTYPE_COUNT
};

#define MOE_QK 32 /* elements per quantization block (q8_0, q4_0, mxfp4) */
#define MOE_QK_K 256 /* elements per K-quant super-block */

struct moe_block_q8_0 { uint16_t d; int8_t qs[32]; } __attribute__((packed));
struct moe_block_q4_0 { uint16_t d; uint8_t qs[16]; } __attribute__((packed));
struct moe_block_mxfp4 { uint8_t e; uint8_t qs[16]; } __attribute__((packed));
_Static_assert(sizeof(struct moe_block_q8_0) == 34, "q8_0 block");
_Static_assert(sizeof(struct moe_block_q4_0) == 18, "q4_0 block");
_Static_assert(sizeof(struct moe_block_mxfp4) == 17, "mxfp4 block");

/* The K-quant super-blocks, field for field ggml's block_q*_K. */
struct moe_block_q4_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } __attribute__((packed));
struct moe_block_q5_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } __attribute__((packed));
struct moe_block_q6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } __attribute__((packed));
struct moe_block_q3_K { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; uint16_t d; } __attribute__((packed));
struct moe_block_q2_K { uint8_t scales[16]; uint8_t qs[64]; uint16_t d, dmin; } __attribute__((packed));
struct moe_block_iq4_nl { uint16_t d; uint8_t qs[16]; } __attribute__((packed));
struct moe_block_iq4_xs { uint16_t d; uint16_t scales_h; uint8_t scales_l[4]; uint8_t qs[128]; } __attribute__((packed));
/* Activations for the K-quant integer dots (ggml block_q8_K): f32 d,
 * x = d * qs, and the sums of each 16 qs (for the mins and offsets). */
struct moe_block_q8_K { float d; int8_t qs[256]; int16_t bsums[16]; };
_Static_assert(sizeof(struct moe_block_q4_K) == 144, "q4_K block");
_Static_assert(sizeof(struct moe_block_q5_K) == 176, "q5_K block");
_Static_assert(sizeof(struct moe_block_q6_K) == 210, "q6_K block");
_Static_assert(sizeof(struct moe_block_q3_K) == 110, "q3_K block");
_Static_assert(sizeof(struct moe_block_q2_K) == 84, "q2_K block");
_Static_assert(sizeof(struct moe_block_iq4_nl) == 18, "iq4_nl block");
_Static_assert(sizeof(struct moe_block_iq4_xs) == 136, "iq4_xs block");
_Static_assert(sizeof(struct moe_block_q8_K) == 292, "q8_K block");

/* "f32", "bf16", "q8_0", "q4_K", ... or "invalid". */
const char *moe_dtype_name(enum moe_dtype t);
/* Case-insensitive; accepts "F32", "bf16", "Q4_0", "mxfp4", "Q4_K". INVALID if unknown. */
enum moe_dtype moe_dtype_parse(const char *name);
/* Elements per block (1 for plain types, 32 for block types, 256 for K-quants). */
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
/* n floats (multiple of 256) to q8_K blocks, the same bytes as ggml's
 * quantize_row_q8_K_ref: with max the element of largest magnitude (the
 * first one), iscale = -127 / max, q = round-half-even(x * iscale) clamped
 * to 127, d = 1 / iscale; an all-zero block (or one too small for a finite
 * iscale) gets d 0 and codes 0. NaN elements are skipped by the max and get
 * code 0. */
void moe_quantize_row_q8_K(const float *src, struct moe_block_q8_K *dst, size_t n);
/* Scale j (0..7) and min of a q4_K / q5_K super-block's 12 packed bytes:
 * 6 bits each, j < 4 in the low bits of bytes j / j+4, j >= 4 split
 * between a nibble of byte j+4 and the top 2 bits of bytes j-4 / j. */
static inline void moe_kquant_scale_min(const uint8_t *s, int j, uint8_t *sc, uint8_t *m)
{
	if (j < 4) {
		*sc = s[j] & 63;
		*m = s[j + 4] & 63;
	} else {
		*sc = (uint8_t)((s[j + 4] & 15) | ((s[j - 4] >> 6) << 4));
		*m = (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
	}
}
/* Scale j (0..15) of a q3_K super-block, 6 bits biased by 32: low 4 bits
 * in a nibble of bytes 0..7, high 2 bits in bytes 8..11. */
static inline int moe_q3_K_scale(const uint8_t *s, int j)
{
	const int lo = j < 8 ? s[j] & 15 : s[j - 8] >> 4;
	const int hi = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
	return (lo | hi << 4) - 32;
}

/* The doubled E2M1 table of ggml's block_mxfp4 (value * 2^(e-128)). */
extern const int8_t moe_kvalues_mxfp4[16];
/* The 16 levels of iq4_nl and iq4_xs codes (value = d * level; llama.cpp's
 * non-linear 4-bit grid). */
extern const int8_t moe_kvalues_iq4nl[16];
/* Scale j (0..7) of an iq4_xs super-block, 6 bits biased by 32: low 4 bits
 * in a nibble of scales_l[j / 2], high 2 bits at bit 2j of scales_h. */
static inline int moe_iq4_xs_scale(const struct moe_block_iq4_xs *b, int j)
{
	return (((b->scales_l[j / 2] >> (4 * (j % 2))) & 15) | ((b->scales_h >> (2 * j)) & 3) << 4) - 32;
}

#endif
