/* test_ffn.c - the CPU expert FFN kernels against a double-precision
 * reference, on every path this CPU has (reference C, AVX2, AVX-512,
 * AVX512-BF16; a path is skipped only when the CPU lacks it).
 *
 * Tolerances (u = 2^-24, the f32 unit roundoff; K = the dot length):
 * - Weights are decoded exactly (the kernels produce the same f32 weight
 *   value the formulas give, checked bit for bit below), so a matmul output
 *   only carries the f32 accumulation error. Any summation order of K
 *   products, with or without FMA, is within gamma_K = K u / (1 - K u) of
 *   the exact sum relative to S = sum |w_c x_c|:
 *       |y - y_exact| <= gamma_K * S.
 * - The vdpbf16ps path rounds x to bf16 first (relative error <= 2^-9 per
 *   element), so its bound is (2^-9 + 2^-9 + gamma_K) * S; the extra 2^-9
 *   covers the products that the instruction rounds (it flushes denormals
 *   and the Intel pseudo-code rounds each pair sum).
 * - Whole expert: the bound is propagated to first order through the
 *   activation (|d silu(g)/dg| <= 1.1, the GPT-OSS glu likewise, clamps are
 *   1-Lipschitz, exp/sigmoid add a few u of |h|) and through the down
 *   projection; the check allows 2x that first-order bound plus 1e-30. */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "ffn.h"
#include "ffn_impl.h" /* white box: the AVX2 activation quantizer */
#include "ffn_testutil.h"
#include "model.h"
#include "pack.h"

/* ---- an independent decoder: the formulas of formats.md 4.5, written here
 * without dtype.c's helpers ---------------------------------------------- */

static float ind_f16(uint16_t h)
{
	int e = (h >> 10) & 31, mant = h & 1023;
	double v;
	if (e == 0)
		v = ldexp(mant, -24);
	else if (e == 31)
		v = mant ? NAN : INFINITY;
	else
		v = ldexp(1024 + mant, e - 25);
	return (float)((h & 0x8000) ? -v : v);
}

static float ind_bf16(uint16_t b)
{
	union { uint32_t u; float f; } c = { .u = (uint32_t)b << 16 };
	return c.f;
}

static void ind_decode_row(enum moe_dtype t, const uint8_t *src, float *dst, uint32_t n)
{
	static const int kv[16] = { 0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12 };
	for (uint32_t i = 0; i < n; i++) {
		uint32_t b = i / 32, j = i % 32;
		uint16_t h;
		switch (t) {
		case MOE_DTYPE_F32: memcpy(&dst[i], src + 4 * i, 4); break;
		case MOE_DTYPE_F16: memcpy(&h, src + 2 * i, 2); dst[i] = ind_f16(h); break;
		case MOE_DTYPE_BF16: memcpy(&h, src + 2 * i, 2); dst[i] = ind_bf16(h); break;
		case MOE_DTYPE_Q8_0:
			memcpy(&h, src + 34 * b, 2);
			dst[i] = (float)(int8_t)src[34 * b + 2 + j] * ind_f16(h);
			break;
		case MOE_DTYPE_Q4_0: {
			uint8_t q = src[18 * b + 2 + (j % 16)];
			int v = (j < 16 ? (q & 15) : (q >> 4)) - 8;
			memcpy(&h, src + 18 * b, 2);
			dst[i] = (float)v * ind_f16(h);
			break;
		}
		case MOE_DTYPE_IQ4_NL: {
			static const int lv[16] = { -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113 };
			uint8_t q = src[18 * b + 2 + (j % 16)];
			memcpy(&h, src + 18 * b, 2);
			dst[i] = ind_f16(h) * (float)lv[j < 16 ? (q & 15) : (q >> 4)];
			break;
		}
		case MOE_DTYPE_MXFP4: {
			uint8_t q = src[17 * b + 1 + (j % 16)];
			int v = kv[j < 16 ? (q & 15) : (q >> 4)];
			/* 2^(e-128), exact in f32 down to e = 0 (2^-128 is subnormal) */
			dst[i] = (float)v * (float)ldexp(1.0, (int)src[17 * b] - 128);
			break;
		}
		default: cr_assert_fail("dtype %d", t);
		}
	}
}

static uint64_t row_bytes(enum moe_dtype t, uint32_t cols)
{
	uint64_t rb = 0;
	cr_assert(moe_dtype_row_bytes(t, cols, &rb), "%s cols %u", moe_dtype_name(t), cols);
	return rb;
}

/* Random weights in dtype t: f32 values in [-a, a] encoded with the
 * project's quantizers (so scales and codes look like real checkpoints). */
static uint8_t *make_weights(enum moe_dtype t, uint32_t rows, uint32_t cols, float a)
{
	uint64_t rb = row_bytes(t, cols);
	uint8_t *w = malloc(rb * rows + 64);
	float *tmp = malloc(sizeof(float) * cols);
	cr_assert(w && tmp);
	for (uint32_t r = 0; r < rows; r++) {
		uint8_t *row = w + rb * r;
		for (uint32_t c = 0; c < cols; c++)
			tmp[c] = rng_f(-a, a);
		if (ffn_test_encode_row(t, tmp, row, cols))
			continue;
		switch (t) {
		case MOE_DTYPE_IQ4_NL:
			/* d = max |x| / 127, then the nearest level (ggml searches
			 * scales too; any valid encoding serves here) */
			for (uint32_t b = 0; b < cols / 32; b++) {
				struct moe_block_iq4_nl *o = (struct moe_block_iq4_nl *)(void *)row + b;
				float amax = 0.0f;
				for (int j = 0; j < 32; j++)
					amax = fmaxf(amax, fabsf(tmp[32 * b + j]));
				const float d = amax / 127.0f;
				o->d = moe_f32_to_f16(d);
				for (int j = 0; j < 16; j++) {
					int best[2] = { 0, 0 };
					for (int hl = 0; hl < 2; hl++) {
						const float v = d > 0 ? tmp[32 * b + j + 16 * hl] / d : 0.0f;
						for (int k = 1; k < 16; k++)
							if (fabsf(v - moe_kvalues_iq4nl[k]) < fabsf(v - moe_kvalues_iq4nl[best[hl]]))
								best[hl] = k;
					}
					o->qs[j] = (uint8_t)(best[0] | best[1] << 4);
				}
			}
			break;
		default: cr_assert_fail();
		}
	}
	free(tmp);
	return w;
}

static double *decode_matrix(enum moe_dtype t, const uint8_t *w, uint32_t rows, uint32_t cols)
{
	uint64_t rb = row_bytes(t, cols);
	double *d = malloc(sizeof(double) * rows * cols);
	float *tmp = malloc(sizeof(float) * cols);
	for (uint32_t r = 0; r < rows; r++) {
		ind_decode_row(t, w + rb * r, tmp, cols);
		for (uint32_t c = 0; c < cols; c++)
			d[(size_t)r * cols + c] = tmp[c];
	}
	free(tmp);
	return d;
}

static float *make_x(uint32_t B, uint32_t n, float a)
{
	float *x = malloc(sizeof(float) * B * n + 64);
	for (size_t i = 0; i < (size_t)B * n; i++)
		x[i] = rng_f(-a, a);
	return x;
}

/* ---- paths ----------------------------------------------------------------- */

static const enum moe_dtype all_dtypes[] = { MOE_DTYPE_F32, MOE_DTYPE_F16, MOE_DTYPE_BF16,
					     MOE_DTYPE_Q8_0, MOE_DTYPE_Q4_0, MOE_DTYPE_MXFP4, MOE_DTYPE_IQ4_NL };
#define N_DTYPES (sizeof(all_dtypes) / sizeof(all_dtypes[0]))

static bool g_q8int;

/* Each check picks its path, and the q8 mode g_q8int says (EXACT unless a
 * check sets it: check_q8int runs check_matmul_bounds in INT mode, which
 * an unconditional EXACT here used to undo). */
static void use_isa(enum ffn_isa isa)
{
	if (!ffn_isa_supported(isa))
		cr_skip_test("this CPU lacks the %s path", ffn_isa_name(isa));
	cr_assert_eq(ffn_set_isa(isa), 0);
	cr_assert_eq(ffn_get_isa(), isa);
	cr_assert_eq(ffn_set_q8_mode(g_q8int ? FFN_Q8_INT : FFN_Q8_EXACT), 0);
}

static bool is_block(enum moe_dtype t) { return moe_dtype_block_elems(t) > 1; }

/* FFN_Q8_INT: x (or h) is quantized to q8_0 before a q8_0, q4_0 or iq4_nl
 * matmul (integer dot per block, ggml's scheme; the integer sums are
 * exact): q8_err fills each element's error (ffn_test_quant_err), 0 when
 * the mode or dtype does not quantize. */
static void q8_err(enum moe_dtype t, const double *v, const double *slack, uint32_t n, double *e)
{
	ffn_test_quant_err(g_q8int && (t == MOE_DTYPE_Q8_0 || t == MOE_DTYPE_Q4_0 || t == MOE_DTYPE_IQ4_NL), 32, v,
			   slack, n, e);
}

/* ---- matmul: exact decode, bounds, batch and thread independence ---------- */

/* x = e_c (one-hot) makes y[r] = W[r][c] exactly (the other products are
 * +-0), so this reads the in-kernel dequantization back bit for bit. 13
 * rows: tiles from the quarters of the range plus one left over; plain
 * types get 59 columns (whole pairs of chunks, split even/odd for bf16,
 * then a single chunk and a scalar tail, on AVX2 and AVX-512). */
static void check_onehot(enum ffn_isa isa)
{
	use_isa(isa);
	rng_seed(11);
	for (size_t d = 0; d < N_DTYPES; d++) {
		const enum moe_dtype t = all_dtypes[d];
		const uint32_t rows = 13, cols = is_block(t) ? 64 : 59;
		uint64_t rb = row_bytes(t, cols);
		uint8_t *w = malloc(rb * rows);
		/* random bytes: every code and scale pattern; scales kept finite
		 * (f16 exponent < 31, e8m0 < 255) and, for bf16, normal or zero
		 * values (vdpbf16ps treats bf16 denormals as zero) */
		for (uint64_t i = 0; i < rb * rows; i++)
			w[i] = (uint8_t)rng_u64();
		for (uint32_t r = 0; r < rows; r++) {
			uint8_t *row = w + rb * r;
			for (uint32_t b = 0; b < cols / 32; b++) {
				if (t == MOE_DTYPE_Q8_0 || t == MOE_DTYPE_Q4_0 || t == MOE_DTYPE_IQ4_NL) {
					uint8_t *hi = row + b * (t == MOE_DTYPE_Q8_0 ? 34 : 18) + 1;
					*hi = (uint8_t)(*hi & 0xbb); /* exponent bits 14..10: clear bit 14 */
				} else if (t == MOE_DTYPE_MXFP4 && row[b * 17] == 255) {
					row[b * 17] = 254;
				}
			}
			if (t == MOE_DTYPE_F16)
				for (uint32_t c = 0; c < cols; c++)
					row[2 * c + 1] &= 0xbb;
			if (t == MOE_DTYPE_BF16 || t == MOE_DTYPE_F32)
				for (uint32_t c = 0; c < cols; c++) {
					/* keep exponents away from 0 and all-ones */
					uint8_t *hb = row + (t == MOE_DTYPE_BF16 ? 2 * c + 1 : 4 * c + 3);
					*hb = (uint8_t)((*hb & 0x80) | 0x3c | (*hb & 0x03));
				}
		}
		float *x = calloc((size_t)cols * cols, sizeof(float));
		float *y = calloc((size_t)cols * rows, sizeof(float));
		float *ref = malloc(sizeof(float) * cols);
		float *mine = malloc(sizeof(float) * cols);
		for (uint32_t c = 0; c < cols; c++)
			x[(size_t)c * cols + c] = 1.0f;
		/* all columns as one batch, and every fourth as a token alone
		 * (the one-token kernel) */
		cr_assert_eq(ffn_matmul(t, w, rows, cols, x, cols, cols, y, rows, 1), 0);
		float *y1 = malloc(sizeof(float) * rows);
		for (uint32_t c = 0; c < cols; c += 4) {
			cr_assert_eq(ffn_matmul(t, w, rows, cols, x + (size_t)c * cols, cols, 1, y1, rows, 1), 0);
			for (uint32_t r = 0; r < rows; r++) {
				float ref1;
				moe_dequantize_row(t, w + rb * r, ref, cols);
				ref1 = ref[c];
				cr_assert(y1[r] == ref1, "%s/%s one token: kernel weight %a != %a at r%u c%u",
					  ffn_isa_name(isa), moe_dtype_name(t), (double)y1[r], (double)ref1, r, c);
			}
		}
		for (uint32_t r = 0; r < rows; r++) {
			moe_dequantize_row(t, w + rb * r, ref, cols);
			ind_decode_row(t, w + rb * r, mine, cols);
			for (uint32_t c = 0; c < cols; c++) {
				cr_assert(memcmp(&ref[c], &mine[c], 4) == 0,
					  "%s: moe_dequantize_row %a != formula %a at r%u c%u", moe_dtype_name(t),
					  (double)ref[c], (double)mine[c], r, c);
				cr_assert(y[(size_t)c * rows + r] == ref[c], "%s/%s: kernel weight %a != %a at r%u c%u",
					  ffn_isa_name(isa), moe_dtype_name(t), (double)y[(size_t)c * rows + r],
					  (double)ref[c], r, c);
			}
		}
		free(w);
		free(x);
		free(y);
		free(y1);
		free(ref);
		free(mine);
	}
}

static void check_matmul_bounds(enum ffn_isa isa)
{
	static const uint32_t Bs[] = { 1, 3, 16, 64 };
	/* plain types: odd shapes (columns not multiples of 8 or 16, with and
	 * without a single chunk after the last pair; rows not multiples of 4,
	 * so quarter tiles plus leftovers); blocks: 32k */
	static const uint32_t plain_shapes[][2] = { { 13, 37 }, { 1, 1 }, { 6, 7 },   { 9, 100 },
						    { 4, 64 },  { 22, 27 }, { 11, 59 } };
	static const uint32_t block_shapes[][2] = { { 13, 32 }, { 5, 96 }, { 8, 256 }, { 22, 64 }, { 7, 160 } };

	use_isa(isa);
	rng_seed(22);
	for (size_t d = 0; d < N_DTYPES; d++) {
		const enum moe_dtype t = all_dtypes[d];
		const uint32_t(*shapes)[2] = is_block(t) ? block_shapes : plain_shapes;
		const size_t nshapes = is_block(t) ? sizeof(block_shapes) / sizeof(block_shapes[0])
						    : sizeof(plain_shapes) / sizeof(plain_shapes[0]);
		for (size_t s = 0; s < nshapes; s++) {
			const uint32_t rows = shapes[s][0], cols = shapes[s][1];
			uint8_t *w = make_weights(t, rows, cols, 1.0f);
			double *wd = decode_matrix(t, w, rows, cols);
			for (size_t bi = 0; bi < 4; bi++) {
				const uint32_t B = Bs[bi];
				const size_t ldx = cols + 3, ldy = rows + 2; /* strides wider than the data */
				float *x = make_x(B, (uint32_t)ldx, 2.0f);
				float *y = malloc(sizeof(float) * B * ldy);
				float *y1 = malloc(sizeof(float) * rows);
				cr_assert_eq(ffn_matmul(t, w, rows, cols, x, ldx, B, y, ldy, 1), 0);
				double *xd = calloc(cols, sizeof(double)), *xe = calloc(cols, sizeof(double));
				for (uint32_t tk = 0; tk < B; tk++) {
					/* the same token alone gives the same bits */
					cr_assert_eq(ffn_matmul(t, w, rows, cols, x + tk * ldx, ldx, 1, y1, rows, 1), 0);
					for (uint32_t c = 0; c < cols; c++)
						xd[c] = x[tk * ldx + c];
					q8_err(t, xd, NULL, cols, xe);
					for (uint32_t r = 0; r < rows; r++) {
						double ex = 0, S = 0, Q = 0;
						for (uint32_t c = 0; c < cols; c++) {
							double p = wd[(size_t)r * cols + c] * x[tk * ldx + c];
							ex += p;
							S += fabs(p);
							Q += fabs(wd[(size_t)r * cols + c]) * xe[c];
						}
						double got = y[tk * ldy + r];
						double bound = ffn_test_dot_tol(isa, t, cols) * (S + Q) + Q + 1e-30;
						cr_assert(fabs(got - ex) <= bound,
							  "%s/%s %ux%u B=%u tok %u row %u: %.9g vs %.9g (bound %.3g)",
							  ffn_isa_name(isa), moe_dtype_name(t), rows, cols, B, tk, r, got,
							  ex, bound);
						cr_assert(memcmp(&y1[r], &y[tk * ldy + r], 4) == 0,
							  "%s/%s: token %u alone %a != in batch of %u %a", ffn_isa_name(isa),
							  moe_dtype_name(t), tk, (double)y1[r], B, (double)y[tk * ldy + r]);
					}
				}
				/* threads split rows and give the same bits */
				float *y3 = malloc(sizeof(float) * B * ldy);
				cr_assert_eq(ffn_matmul(t, w, rows, cols, x, ldx, B, y3, ldy, 3), 0);
				for (uint32_t tk = 0; tk < B; tk++)
					cr_assert(memcmp(y3 + tk * ldy, y + tk * ldy, 4 * rows) == 0,
						  "%s/%s: 3 threads differ from 1", ffn_isa_name(isa), moe_dtype_name(t));
				free(x);
				free(y);
				free(y1);
				free(y3);
				free(xd);
				free(xe);
			}
			free(w);
			free(wd);
		}
	}
}

/* ---- whole experts --------------------------------------------------------- */

struct fake_expert {
	struct moe_model_config cfg;
	struct pack_part_desc parts[PACK_MAX_PARTS];
	uint32_t n_parts;
	uint8_t *ext;
	uint64_t ext_bytes;
	struct ffn_layout L;
	/* decoded copies for the reference */
	double *gate, *up, *gate_up, *down, *gu_bias, *down_bias;
};

static void add_part(struct fake_expert *e, uint32_t role, enum moe_dtype t, uint32_t rows, uint32_t cols)
{
	struct pack_part_desc *p = &e->parts[e->n_parts++];
	p->role = role;
	p->dtype = t;
	p->rows = rows;
	p->cols = cols;
	p->offset = e->ext_bytes;
	p->bytes = row_bytes(t, cols) * rows;
	e->ext_bytes += (p->bytes + 63) & ~63ull;
}

static double *fill_part(struct fake_expert *e, uint32_t i, float a)
{
	struct pack_part_desc *p = &e->parts[i];
	uint8_t *w = make_weights(p->dtype, p->rows, p->cols, a);
	memcpy(e->ext + p->offset, w, p->bytes);
	double *d = decode_matrix(p->dtype, w, p->rows, p->cols);
	free(w);
	return d;
}

static void fake_swiglu(struct fake_expert *e, uint32_t n, uint32_t m, enum moe_dtype tg, enum moe_dtype tu,
			enum moe_dtype td)
{
	memset(e, 0, sizeof(*e));
	moe_model_set_family_defaults(&e->cfg, MOE_FAMILY_DEEPSEEK_V2);
	e->cfg.hidden = n;
	e->cfg.expert_width = m;
	add_part(e, PACK_ROLE_GATE, tg, m, n);
	add_part(e, PACK_ROLE_UP, tu, m, n);
	add_part(e, PACK_ROLE_DOWN, td, n, m);
	e->ext = calloc(1, e->ext_bytes);
	e->gate = fill_part(e, 0, 0.5f);
	e->up = fill_part(e, 1, 0.5f);
	e->down = fill_part(e, 2, 0.5f);
	struct moe_error err = { { 0 } };
	cr_assert_eq(ffn_layout_init(&e->L, &e->cfg, e->parts, e->n_parts, e->ext_bytes, &err), 0, "%s", err.msg);
}

static void fake_gptoss(struct fake_expert *e, uint32_t n, uint32_t m, enum moe_dtype tw, enum moe_dtype tb,
			float limit)
{
	memset(e, 0, sizeof(*e));
	moe_model_set_family_defaults(&e->cfg, MOE_FAMILY_GPT_OSS);
	e->cfg.hidden = n;
	e->cfg.expert_width = m;
	e->cfg.swiglu_limit = limit;
	add_part(e, PACK_ROLE_GATE_UP, tw, 2 * m, n);
	add_part(e, PACK_ROLE_GATE_UP_BIAS, tb, 1, 2 * m);
	add_part(e, PACK_ROLE_DOWN, tw, n, m);
	add_part(e, PACK_ROLE_DOWN_BIAS, tb, 1, n);
	e->ext = calloc(1, e->ext_bytes);
	e->gate_up = fill_part(e, 0, 0.5f);
	e->gu_bias = fill_part(e, 1, 0.5f);
	e->down = fill_part(e, 2, 0.5f);
	e->down_bias = fill_part(e, 3, 0.5f);
	struct moe_error err = { { 0 } };
	cr_assert_eq(ffn_layout_init(&e->L, &e->cfg, e->parts, e->n_parts, e->ext_bytes, &err), 0, "%s", err.msg);
}

static void free_fake(struct fake_expert *e)
{
	free(e->ext);
	free(e->gate);
	free(e->up);
	free(e->gate_up);
	free(e->down);
	free(e->gu_bias);
	free(e->down_bias);
}

/* Reference forward in double, with the first-order error bound of each
 * output (see the header comment). */
static void ref_forward(const struct fake_expert *e, enum ffn_isa isa, const float *x, double *y, double *bound)
{
	const uint32_t n = e->cfg.hidden, m = e->cfg.expert_width;
	const bool oss = e->cfg.ffn_kind == MOE_FFN_GPTOSS;
	const double lim = e->cfg.swiglu_limit, alpha = e->cfg.glu_alpha > 0 ? e->cfg.glu_alpha : 1.0;
	double *h = calloc(m, sizeof(double)), *dh = calloc(m, sizeof(double));
	double *xd = calloc(n, sizeof(double)), *xe = calloc(n, sizeof(double)), *he = calloc(m, sizeof(double));
	const enum moe_dtype tin = (enum moe_dtype)e->parts[0].dtype;
	const enum moe_dtype tdn = (enum moe_dtype)e->parts[2].dtype; /* down, both kinds */
	/* gate and up may differ (the mixed test): the looser bound of the two */
	const enum moe_dtype tup = oss ? tin : (enum moe_dtype)e->parts[1].dtype;
	const double ein = fmax(ffn_test_dot_tol(isa, tin, n), ffn_test_dot_tol(isa, tup, n));
	const double edn = ffn_test_dot_tol(isa, tdn, m);

	for (uint32_t c = 0; c < n; c++)
		xd[c] = x[c];
	q8_err(tin, xd, NULL, n, xe); /* gate and up share the dtype in these tests */
	for (uint32_t i = 0; i < m; i++) {
		double g = 0, u = 0, Sg = 0, Su = 0, Qg = 0, Qu = 0;
		const double *wg = oss ? e->gate_up + (size_t)(2 * i) * n : e->gate + (size_t)i * n;
		const double *wu = oss ? e->gate_up + (size_t)(2 * i + 1) * n : e->up + (size_t)i * n;
		for (uint32_t c = 0; c < n; c++) {
			g += wg[c] * x[c];
			u += wu[c] * x[c];
			Sg += fabs(wg[c] * x[c]);
			Su += fabs(wu[c] * x[c]);
			Qg += fabs(wg[c]) * xe[c];
			Qu += fabs(wu[c]) * xe[c];
		}
		double dg = ein * (Sg + Qg) + Qg, du = ein * (Su + Qu) + Qu;
		if (oss) {
			g += e->gu_bias[2 * i];
			u += e->gu_bias[2 * i + 1];
			dg += U_F32 * (Sg + fabs(e->gu_bias[2 * i]));
			du += U_F32 * (Su + fabs(e->gu_bias[2 * i + 1]));
			if (lim > 0) {
				g = fmin(g, lim);
				u = fmin(fmax(u, -lim), lim);
			}
			double glu = g / (1.0 + exp(-alpha * g));
			h[i] = (u + 1.0) * glu;
			dh[i] = fabs(u + 1.0) * 1.1 * dg + fabs(glu) * du + 8 * U_F32 * fabs(h[i]);
		} else {
			double s = g / (1.0 + exp(-g));
			h[i] = s * u;
			dh[i] = 1.1 * dg * fabs(u) + fabs(s) * du + 8 * U_F32 * fabs(h[i]);
		}
		if (isa == FFN_ISA_AVX512BF16 && tdn == MOE_DTYPE_BF16)
			dh[i] += fabs(h[i]) / 256.0; /* h rounded to bf16 for the down matmul */
	}
	q8_err(tdn, h, dh, m, he);
	ffn_test_ref_down(e->down, oss ? e->down_bias : NULL, n, m, h, dh, he, edn, y, bound);
	free(h);
	free(dh);
	free(xd);
	free(xe);
	free(he);
}

static void check_expert(struct fake_expert *e, enum ffn_isa isa, uint32_t B, int threads)
{
	const uint32_t n = e->cfg.hidden;
	float *x = make_x(B, n, 1.0f);
	float *y = malloc(sizeof(float) * B * n);
	double *ry = malloc(sizeof(double) * n), *bd = malloc(sizeof(double) * n);

	cr_assert_eq(ffn_expert(&e->L, e->ext, x, n, B, y, n, NULL, 0, threads), 0);
	for (uint32_t t = 0; t < B; t++) {
		ref_forward(e, isa, x + (size_t)t * n, ry, bd);
		for (uint32_t k = 0; k < n; k++)
			cr_assert(fabs(y[(size_t)t * n + k] - ry[k]) <= bd[k],
				  "%s %s/%s B=%u tok %u out %u: %.9g vs %.9g (bound %.3g)", ffn_isa_name(isa),
				  moe_dtype_name(e->parts[0].dtype), moe_dtype_name(e->parts[e->n_parts - 1].dtype), B,
				  t, k, (double)y[(size_t)t * n + k], ry[k], bd[k]);
	}
	/* one token alone, and two threads, give the same bits */
	float *y1 = malloc(sizeof(float) * n);
	float *y2 = malloc(sizeof(float) * B * n);
	cr_assert_eq(ffn_expert(&e->L, e->ext, x + (size_t)(B - 1) * n, n, 1, y1, n, NULL, 0, 1), 0);
	cr_assert(memcmp(y1, y + (size_t)(B - 1) * n, 4ull * n) == 0, "batch of %u differs from one token", B);
	cr_assert_eq(ffn_expert(&e->L, e->ext, x, n, B, y2, n, NULL, 0, threads == 1 ? 2 : 1), 0);
	cr_assert(memcmp(y2, y, 4ull * n * B) == 0, "thread count changed the result");
	free(x);
	free(y);
	free(y1);
	free(y2);
	free(ry);
	free(bd);
}

static void check_swiglu(enum ffn_isa isa)
{
	static const uint32_t Bs[] = { 1, 3, 16, 64 };
	use_isa(isa);
	rng_seed(33);
	for (size_t d = 0; d < N_DTYPES; d++) {
		const enum moe_dtype t = all_dtypes[d];
		/* plain types get odd widths; blocks need multiples of 32 */
		const uint32_t n = is_block(t) ? 96 : 71, m = is_block(t) ? 64 : 45;
		struct fake_expert e;
		fake_swiglu(&e, n, m, t, t, t);
		for (size_t b = 0; b < 4; b++)
			check_expert(&e, isa, Bs[b], b == 2 ? 2 : 1);
		free_fake(&e);
	}
	/* mixed dtypes per part (packs keep each source tensor's type) */
	struct fake_expert e;
	fake_swiglu(&e, 64, 32, MOE_DTYPE_Q4_0, MOE_DTYPE_BF16, MOE_DTYPE_Q8_0);
	check_expert(&e, isa, 5, 1);
	free_fake(&e);
}

static void check_gptoss(enum ffn_isa isa)
{
	static const enum moe_dtype tw[] = { MOE_DTYPE_MXFP4, MOE_DTYPE_BF16 };
	static const enum moe_dtype tb[] = { MOE_DTYPE_BF16, MOE_DTYPE_F32 };
	use_isa(isa);
	rng_seed(44);
	for (int i = 0; i < 2; i++) {
		struct fake_expert e;
		/* a small limit so that both clamps trigger on random data */
		fake_gptoss(&e, 64, 32, tw[i], tb[i], 0.6f);
		check_expert(&e, isa, 1, 1);
		check_expert(&e, isa, 16, 2);
		free_fake(&e);
		fake_gptoss(&e, 32, 64, tw[i], tb[i], 0.0f); /* no clamp */
		check_expert(&e, isa, 3, 1);
		free_fake(&e);
	}
}

/* y = sum_j w_j expert_j(x) over k = 4 experts, against the double
 * reference (bound: the sum of the weighted per-expert bounds plus the k
 * additions), and bit-equal to ffn_axpy over separately computed outputs. */
static void check_topk(enum ffn_isa isa)
{
	use_isa(isa);
	rng_seed(55);
	const uint32_t n = 64, m = 32, k = 4;
	struct fake_expert e[4];
	const void *ext[4];
	float w[4] = { 0.4f, 0.3f, 0.2f, 0.1f };
	/* one layout for all k experts, as in a pack */
	for (uint32_t j = 0; j < k; j++) {
		fake_swiglu(&e[j], n, m, MOE_DTYPE_F16, MOE_DTYPE_Q4_0, MOE_DTYPE_BF16);
		ext[j] = e[j].ext;
	}
	float *x = make_x(1, n, 1.0f), *y = malloc(sizeof(float) * n), *yy = calloc(n, sizeof(float));
	float *o = malloc(sizeof(float) * n);
	double *ry = calloc(n, sizeof(double)), *rb = calloc(n, sizeof(double));
	double *t1 = malloc(sizeof(double) * n), *t2 = malloc(sizeof(double) * n);
	cr_assert_eq(ffn_moe_token(&e[0].L, ext, w, k, x, y, 1), 0);
	for (uint32_t j = 0; j < k; j++) {
		ref_forward(&e[j], isa, x, t1, t2);
		for (uint32_t i = 0; i < n; i++) {
			ry[i] += w[j] * t1[i];
			rb[i] += w[j] * t2[i] + 2 * U_F32 * fabs(ry[i]);
		}
		cr_assert_eq(ffn_expert(&e[j].L, ext[j], x, n, 1, o, n, NULL, 0, 1), 0);
		ffn_axpy(yy, w[j], o, n);
	}
	for (uint32_t i = 0; i < n; i++) {
		cr_assert(fabs(y[i] - ry[i]) <= rb[i], "out %u: %.9g vs %.9g (bound %.3g)", i, (double)y[i], ry[i], rb[i]);
		cr_assert(memcmp(&y[i], &yy[i], 4) == 0);
	}
	for (uint32_t j = 0; j < k; j++)
		free_fake(&e[j]);
	free(x), free(y), free(yy), free(o), free(ry), free(rb), free(t1), free(t2);
}

/* FFN_Q8_INT: the integer q8_0 and q4_0 kernels, with x and h quantized. */
static void check_q8int(enum ffn_isa isa)
{
	g_q8int = true;
	use_isa(isa);
	cr_assert_eq(ffn_get_q8_mode(), FFN_Q8_INT);
	check_matmul_bounds(isa);
	cr_assert_eq(ffn_get_q8_mode(), FFN_Q8_INT);
	rng_seed(77);
	struct fake_expert e;
	fake_swiglu(&e, 96, 64, MOE_DTYPE_Q8_0, MOE_DTYPE_Q8_0, MOE_DTYPE_Q8_0);
	check_expert(&e, isa, 1, 1);
	check_expert(&e, isa, 16, 2);
	check_expert(&e, isa, 64, 1);
	free_fake(&e);
	fake_swiglu(&e, 64, 32, MOE_DTYPE_BF16, MOE_DTYPE_BF16, MOE_DTYPE_Q8_0); /* only h quantized */
	check_expert(&e, isa, 3, 1);
	free_fake(&e);
	fake_swiglu(&e, 96, 64, MOE_DTYPE_Q4_0, MOE_DTYPE_Q4_0, MOE_DTYPE_Q4_0);
	check_expert(&e, isa, 1, 1);
	check_expert(&e, isa, 16, 2);
	free_fake(&e);
	fake_swiglu(&e, 64, 96, MOE_DTYPE_Q4_0, MOE_DTYPE_Q4_0, MOE_DTYPE_Q8_0);
	check_expert(&e, isa, 5, 1);
	free_fake(&e);
	fake_swiglu(&e, 96, 64, MOE_DTYPE_IQ4_NL, MOE_DTYPE_IQ4_NL, MOE_DTYPE_IQ4_NL);
	check_expert(&e, isa, 1, 1);
	check_expert(&e, isa, 16, 2);
	free_fake(&e);
}

#define PER_ISA(NAME, FN, TMO) \
	Test(ffn, NAME##_ref, .timeout = TMO) { FN(FFN_ISA_REF); } \
	Test(ffn, NAME##_avx2, .timeout = TMO) { FN(FFN_ISA_AVX2); } \
	Test(ffn, NAME##_avx512, .timeout = TMO) { FN(FFN_ISA_AVX512); } \
	Test(ffn, NAME##_avx512bf16, .timeout = TMO) { FN(FFN_ISA_AVX512BF16); }

PER_ISA(onehot_dequant, check_onehot, 30)
PER_ISA(matmul_bounds, check_matmul_bounds, 60)
PER_ISA(swiglu, check_swiglu, 60)
PER_ISA(gptoss, check_gptoss, 60)
PER_ISA(topk, check_topk, 30)
PER_ISA(q8int, check_q8int, 60)

/* ---- K-quants (q4_K ... q2_K): x as q8_K, integer dots ---------------------
 *
 * Weights are random super-blocks (every code and scale pattern) with f16
 * d / dmin kept small and finite. The kernels compute, per super-block,
 * the exact integer sums isum / imin and add d dx isum - dmin dx imin to an
 * f32 accumulator (ffn_kq_accum): 2 roundings of the scale products, 1 of
 * each integer to f32 and 2 fmas, each within u of terms bounded by
 * T_b = sum over the block of (|d sc q| + |dmin m|) |xq|; the reference
 * below (double, from moe_dequantize_row's f32 weights) carries at most 3u
 * of the same terms per element. So against the double reference on the
 * q8_K-quantized x:  |y - ref| <= (16 + 2 nb) u T, T = sum_b T_b, a bound
 * that cancellation between d sc q and dmin m cannot break. Against the
 * unquantized x it adds Q = sum (|d sc q| + |dmin m|) e_c, e_c <= 0.51
 * (block max |x|) / 127 (ggml's q8_K rounding, d kept in f32). And since
 * the integer sums are exact, every path (ref, AVX2, AVX-512) and every
 * batch size and thread count give the same bits: checked exactly. */

static const enum moe_dtype kq_dtypes[] = { MOE_DTYPE_Q4_K, MOE_DTYPE_Q5_K, MOE_DTYPE_Q6_K, MOE_DTYPE_Q3_K,
					    MOE_DTYPE_Q2_K, MOE_DTYPE_IQ4_XS };
#define N_KQ (sizeof(kq_dtypes) / sizeof(kq_dtypes[0]))

/* Byte offsets of d and dmin (-1: none) in a super-block. */
static void kq_scale_offsets(enum moe_dtype t, int *od, int *om)
{
	switch (t) {
	case MOE_DTYPE_Q4_K: case MOE_DTYPE_Q5_K: *od = 0; *om = 2; break;
	case MOE_DTYPE_Q6_K: *od = 208; *om = -1; break;
	case MOE_DTYPE_IQ4_XS: *od = 0; *om = -1; break;
	case MOE_DTYPE_Q3_K: *od = 108; *om = -1; break;
	default: *od = 80; *om = 82; break;
	}
}

static uint8_t *kq_random(enum moe_dtype t, uint32_t rows, uint32_t cols)
{
	const uint32_t bb = moe_dtype_block_bytes(t), nb = rows * (cols / 256);
	uint8_t *w = malloc((size_t)nb * bb + 64);
	int od, om;
	kq_scale_offsets(t, &od, &om);
	for (size_t i = 0; i < (size_t)nb * bb; i++)
		w[i] = (uint8_t)rng_u64();
	for (uint32_t b = 0; b < nb; b++) {
		const uint16_t d = moe_f32_to_f16(rng_f(0.0005f, 0.004f)), m = moe_f32_to_f16(rng_f(0.0f, 0.004f));
		memcpy(w + (size_t)b * bb + od, &d, 2);
		if (om >= 0)
			memcpy(w + (size_t)b * bb + om, &m, 2);
	}
	return w;
}

/* The |d sc q| and |dmin m| parts of each weight: decode copies with dmin
 * and with d zeroed. */
static double *kq_parts_abs(enum moe_dtype t, const uint8_t *w, uint32_t rows, uint32_t cols)
{
	const uint32_t bb = moe_dtype_block_bytes(t), nb = rows * (cols / 256);
	uint8_t *a = malloc((size_t)nb * bb), *b = malloc((size_t)nb * bb);
	float *fa = malloc(sizeof(float) * rows * cols), *fb = malloc(sizeof(float) * rows * cols);
	double *out = malloc(sizeof(double) * rows * cols);
	int od, om;
	kq_scale_offsets(t, &od, &om);
	memcpy(a, w, (size_t)nb * bb);
	memcpy(b, w, (size_t)nb * bb);
	for (uint32_t k = 0; k < nb; k++) {
		memset(b + (size_t)k * bb + od, 0, 2);
		if (om >= 0)
			memset(a + (size_t)k * bb + om, 0, 2);
		else
			memset(b + (size_t)k * bb, 0, bb); /* no min part */
	}
	moe_dequantize_row(t, a, fa, (size_t)rows * cols);
	moe_dequantize_row(t, b, fb, (size_t)rows * cols);
	for (size_t i = 0; i < (size_t)rows * cols; i++)
		out[i] = fabs((double)fa[i]) + fabs((double)fb[i]);
	free(a);
	free(b);
	free(fa);
	free(fb);
	return out;
}

static void check_kquant_matmul(enum ffn_isa isa)
{
	static const uint32_t Bs[] = { 1, 3, 16, 64 };
	static const uint32_t shapes[][2] = { { 13, 256 }, { 1, 512 }, { 6, 768 }, { 37, 256 }, { 4, 1024 } };

	use_isa(isa);
	rng_seed(33);
	for (size_t d = 0; d < N_KQ; d++) {
		const enum moe_dtype t = kq_dtypes[d];
		cr_assert(ffn_dtype_supported(t), "%s", moe_dtype_name(t));
		for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
			const uint32_t rows = shapes[s][0], cols = shapes[s][1], nb = cols / 256;
			uint8_t *w = kq_random(t, rows, cols);
			float *wf = malloc(sizeof(float) * rows * cols);
			double *wa = kq_parts_abs(t, w, rows, cols);
			moe_dequantize_row(t, w, wf, (size_t)rows * cols);
			for (size_t bi = 0; bi < sizeof(Bs) / sizeof(Bs[0]); bi++) {
				const uint32_t B = Bs[bi];
				const size_t ldx = cols + 3, ldy = rows + 2;
				float *x = make_x(B, (uint32_t)ldx, 2.0f);
				float *y = malloc(sizeof(float) * B * ldy), *y1 = malloc(sizeof(float) * rows);
				float *yr = malloc(sizeof(float) * B * ldy), *y3 = malloc(sizeof(float) * B * ldy);
				struct moe_block_q8_K *xq = malloc(sizeof(*xq) * nb);
				cr_assert_eq(ffn_matmul(t, w, rows, cols, x, ldx, B, y, ldy, 1), 0);
				for (uint32_t tk = 0; tk < B; tk++) {
					const float *xt = x + tk * ldx;
					moe_quantize_row_q8_K(xt, xq, cols);
					cr_assert_eq(ffn_matmul(t, w, rows, cols, xt, ldx, 1, y1, rows, 1), 0);
					for (uint32_t r = 0; r < rows; r++) {
						double ex = 0, exq = 0, T = 0, Q = 0;
						for (uint32_t c = 0; c < cols; c++) {
							const struct moe_block_q8_K *xb = &xq[c / 256];
							const double xv = (double)xb->d * xb->qs[c % 256];
							double amax = fabs((double)xb->d) * 127.0;
							ex += (double)wf[(size_t)r * cols + c] * xt[c];
							exq += (double)wf[(size_t)r * cols + c] * xv;
							T += wa[(size_t)r * cols + c] * fabs(xv);
							Q += wa[(size_t)r * cols + c] * 0.51 * amax / 127.0;
						}
						const double got = y[tk * ldy + r];
						const double bq = (16 + 2 * nb) * U_F32 * T + 1e-30;
						cr_assert(fabs(got - exq) <= bq,
							  "%s/%s %ux%u B=%u tok %u row %u: %.9g vs %.9g on q8_K x (bound %.3g)",
							  ffn_isa_name(isa), moe_dtype_name(t), rows, cols, B, tk, r, got, exq, bq);
						cr_assert(fabs(got - ex) <= bq + Q + 4 * U_F32 * Q,
							  "%s/%s row %u: %.9g vs %.9g on f32 x (bound %.3g)", ffn_isa_name(isa),
							  moe_dtype_name(t), r, got, ex, bq + Q);
						cr_assert(memcmp(&y1[r], &y[tk * ldy + r], 4) == 0,
							  "%s/%s: token %u alone %a != in batch of %u %a", ffn_isa_name(isa),
							  moe_dtype_name(t), tk, (double)y1[r], B, (double)y[tk * ldy + r]);
					}
				}
				cr_assert_eq(ffn_matmul(t, w, rows, cols, x, ldx, B, y3, ldy, 3), 0);
				cr_assert_eq(ffn_set_isa(FFN_ISA_REF), 0);
				cr_assert_eq(ffn_matmul(t, w, rows, cols, x, ldx, B, yr, ldy, 2), 0);
				cr_assert_eq(ffn_set_isa(isa), 0);
				for (uint32_t tk = 0; tk < B; tk++) {
					cr_assert(memcmp(y3 + tk * ldy, y + tk * ldy, 4 * rows) == 0,
						  "%s/%s: 3 threads differ from 1", ffn_isa_name(isa), moe_dtype_name(t));
					cr_assert(memcmp(yr + tk * ldy, y + tk * ldy, 4 * rows) == 0,
						  "%s/%s %ux%u B=%u: differs from the reference path", ffn_isa_name(isa),
						  moe_dtype_name(t), rows, cols, B);
				}
				free(x);
				free(y);
				free(y1);
				free(yr);
				free(y3);
				free(xq);
			}
			free(w);
			free(wf);
			free(wa);
		}
	}
}

/* A whole SwiGLU expert with K-quant (and mixed, Q4_K_M-style) parts:
 * the same bits as its three ffn_matmul calls and the activation composed
 * by hand (so x and h reach the kernels as q8_K), for one token, a batch,
 * and two threads. */
static void check_kquant_expert(enum ffn_isa isa)
{
	static const enum moe_dtype mixes[][3] = {
		{ MOE_DTYPE_Q4_K, MOE_DTYPE_Q4_K, MOE_DTYPE_Q6_K }, { MOE_DTYPE_Q5_K, MOE_DTYPE_Q5_K, MOE_DTYPE_Q6_K },
		{ MOE_DTYPE_Q3_K, MOE_DTYPE_Q2_K, MOE_DTYPE_Q4_K }, { MOE_DTYPE_Q4_K, MOE_DTYPE_Q8_0, MOE_DTYPE_Q8_0 },
		{ MOE_DTYPE_BF16, MOE_DTYPE_BF16, MOE_DTYPE_Q6_K }, { MOE_DTYPE_IQ4_XS, MOE_DTYPE_IQ4_XS, MOE_DTYPE_IQ4_NL },
	};
	static const uint32_t Bs[] = { 1, 5, 16 };
	const uint32_t n = 512, m = 256;

	use_isa(isa);
	cr_assert_eq(ffn_set_q8_mode(FFN_Q8_INT), 0); /* q8_0 parts as in production */
	rng_seed(44);
	for (size_t k = 0; k < sizeof(mixes) / sizeof(mixes[0]); k++) {
		struct fake_expert e;
		memset(&e, 0, sizeof(e));
		moe_model_set_family_defaults(&e.cfg, MOE_FAMILY_DEEPSEEK_V2);
		e.cfg.hidden = n;
		e.cfg.expert_width = m;
		add_part(&e, PACK_ROLE_GATE, mixes[k][0], m, n);
		add_part(&e, PACK_ROLE_UP, mixes[k][1], m, n);
		add_part(&e, PACK_ROLE_DOWN, mixes[k][2], n, m);
		e.ext = calloc(1, e.ext_bytes);
		for (uint32_t i = 0; i < 3; i++) {
			const struct pack_part_desc *p = &e.parts[i];
			const bool kq = moe_dtype_block_elems(p->dtype) == 256;
			uint8_t *w = kq ? kq_random(p->dtype, p->rows, p->cols) : make_weights(p->dtype, p->rows, p->cols, 0.1f);
			memcpy(e.ext + p->offset, w, p->bytes);
			free(w);
		}
		struct moe_error err = { { 0 } };
		cr_assert_eq(ffn_layout_init(&e.L, &e.cfg, e.parts, e.n_parts, e.ext_bytes, &err), 0, "%s", err.msg);
		for (size_t bi = 0; bi < sizeof(Bs) / sizeof(Bs[0]); bi++) {
			const uint32_t B = Bs[bi];
			float *x = make_x(B, n, 1.0f), *y = malloc(sizeof(float) * B * n), *y2 = malloc(sizeof(float) * B * n);
			float *g = malloc(sizeof(float) * B * m), *u = malloc(sizeof(float) * B * m);
			float *h = malloc(sizeof(float) * B * m), *want = malloc(sizeof(float) * B * n);
			const uint8_t *ext = e.ext;
			cr_assert_eq(ffn_expert(&e.L, e.ext, x, n, B, y, n, NULL, 0, 1), 0);
			cr_assert_eq(ffn_matmul(e.L.gate.dtype, ext + e.L.gate.offset, m, n, x, n, B, g, m, 1), 0);
			cr_assert_eq(ffn_matmul(e.L.up.dtype, ext + e.L.up.offset, m, n, x, n, B, u, m, 1), 0);
			for (size_t i = 0; i < (size_t)B * m; i++)
				h[i] = g[i] * (1.0f / (1.0f + expf(-g[i]))) * u[i];
			cr_assert_eq(ffn_matmul(e.L.down.dtype, ext + e.L.down.offset, n, m, h, m, B, want, n, 1), 0);
			cr_assert(memcmp(y, want, sizeof(float) * B * n) == 0, "%s %s/%s/%s B=%u: expert != composed matmuls",
				  ffn_isa_name(isa), moe_dtype_name(mixes[k][0]), moe_dtype_name(mixes[k][1]),
				  moe_dtype_name(mixes[k][2]), B);
			cr_assert_eq(ffn_expert(&e.L, e.ext, x, n, B, y2, n, NULL, 0, 2), 0);
			cr_assert(memcmp(y, y2, sizeof(float) * B * n) == 0, "2 threads changed the result");
			cr_assert_eq(ffn_expert(&e.L, e.ext, x + (size_t)(B - 1) * n, n, 1, y2, n, NULL, 0, 1), 0);
			cr_assert(memcmp(y + (size_t)(B - 1) * n, y2, sizeof(float) * n) == 0, "batch of %u != one token", B);
			free(x);
			free(y);
			free(y2);
			free(g);
			free(u);
			free(h);
			free(want);
		}
		free(e.ext);
	}
	/* K-quant columns must be whole super-blocks */
	struct fake_expert e;
	memset(&e, 0, sizeof(e));
	moe_model_set_family_defaults(&e.cfg, MOE_FAMILY_DEEPSEEK_V2);
	e.cfg.hidden = 256;
	e.cfg.expert_width = 96;
	add_part(&e, PACK_ROLE_GATE, MOE_DTYPE_Q4_K, 96, 256);
	add_part(&e, PACK_ROLE_UP, MOE_DTYPE_Q4_K, 96, 256);
	e.parts[e.n_parts++] = (struct pack_part_desc){ .role = PACK_ROLE_DOWN, .dtype = MOE_DTYPE_Q6_K, .rows = 256,
							.cols = 96, .offset = e.ext_bytes, .bytes = 256 * 84 };
	e.ext_bytes += 256 * 84;
	struct moe_error err = { { 0 } };
	cr_assert_eq(ffn_layout_init(&e.L, &e.cfg, e.parts, e.n_parts, e.ext_bytes, &err), -EINVAL);
	cr_assert(strstr(err.msg, "not whole q6_K blocks"), "%s", err.msg);
}

PER_ISA(kquant_matmul, check_kquant_matmul, 120)
PER_ISA(kquant_expert, check_kquant_expert, 60)

/* The AVX2 q8_K quantizer gives moe_quantize_row_q8_K's blocks: random
 * blocks of many magnitudes (and signs of the largest element), exact ties
 * (max -127: iscale 1, x = k + 0.5 round to even), an all-zero block, one
 * too small for a finite iscale, and NaN elements (code 0, not in the max). */
Test(ffn, quant_q8k_avx2_matches_dtype, .timeout = 10)
{
	if (!ffn_isa_supported(FFN_ISA_AVX2))
		cr_skip_test("this CPU lacks AVX2");
	enum { NB = 40 };
	float *x = malloc(sizeof(float) * NB * 256);
	struct moe_block_q8_K a[NB], b[NB];
	rng_seed(55);
	for (int blk = 0; blk < NB; blk++) {
		const float scale = ldexpf(1.0f, blk % 20 - 10);
		for (int j = 0; j < 256; j++)
			x[blk * 256 + j] = rng_f(-scale, scale);
	}
	for (int j = 0; j < 256; j++)
		x[256 + j] = (float)(j % 254) - 126.5f; /* ties */
	x[256 + 3] = -127.0f;
	memset(x + 2 * 256, 0, 256 * sizeof(float));
	for (int j = 0; j < 256; j++)
		x[3 * 256 + j] = j == 9 ? 1e-44f : 0.0f;
	x[4 * 256 + 17] = 5.0f; /* equal magnitudes: the first one's sign wins */
	x[4 * 256 + 200] = -5.0f;
	x[5 * 256 + 3] = NAN; /* skipped by the max, code 0 */
	x[5 * 256 + 100] = -NAN;
	x[5 * 256 + 255] = NAN;
	moe_quantize_row_q8_K(x, a, NB * 256);
	ffn_quant_q8k_avx2(x, b, NB * 256);
	for (int blk = 0; blk < NB; blk++)
		cr_assert(memcmp(&a[blk], &b[blk], sizeof(a[0])) == 0, "block %d: d %a vs %a", blk, (double)a[blk].d,
			  (double)b[blk].d);
	cr_assert_eq(a[4].qs[17], -127);
	cr_assert_eq(a[5].qs[3], 0);
	cr_assert_neq(a[5].d, 0.0f);
	free(x);
}

/* The AVX2 quantizer of x for the integer kernels gives the same blocks as
 * moe_quantize_row_q8_0: random blocks of many magnitudes, an all-zero
 * block, tiny inputs (d subnormal in f32), and a block with max |x| = 127
 * (d = 1, so x * (1 / d) is x and the halves k + 0.5 are exact ties,
 * rounded away from 0). Where d rounds to 0 in f16 the codes do not matter
 * (the block adds 0) and are not compared. Blocks below ~4e-37, where 1 / d
 * overflows, get d 0 and codes 0 from both (no float -> int overflow). */
Test(ffn, quant_q8_avx2_matches_dtype, .timeout = 10)
{
	if (!ffn_isa_supported(FFN_ISA_AVX2))
		cr_skip_test("this CPU lacks AVX2");
	enum { NB = 64 };
	float x[NB * 32];
	struct moe_block_q8_0 a[NB], b[NB];
	rng_seed(88);
	for (int round = 0; round < 50; round++) {
		for (int i = 0; i < NB * 32; i++)
			x[i] = rng_f(-1.0f, 1.0f) * ldexpf(1.0f, (int)(rng_u64() % 60) - 40);
		for (int j = 0; j < 32; j++) {
			x[j] = 0.0f;                                    /* block 0: zeros */
			x[32 + j] = rng_f(-1.0f, 1.0f) * 1e-36f;        /* block 1: d subnormal */
			x[64 + j] = (float)(j * 7 - 110) + 0.5f;        /* block 2: ties */
		}
		x[64 + 31] = 127.0f;
		x[64 + 5] = -0.5f;
		x[96 + (round & 31)] = -3.0f; /* block 3: a negative maximum */
		ffn_quant_q8_avx2(x, a, NB * 32);
		moe_quantize_row_q8_0(x, b, NB * 32);
		for (int i = 0; i < NB; i++) {
			cr_assert_eq(a[i].d, b[i].d, "round %d block %d: d %04x vs %04x", round, i, a[i].d, b[i].d);
			cr_assert(!b[i].d || memcmp(a[i].qs, b[i].qs, 32) == 0, "round %d block %d: codes differ", round, i);
		}
	}
	for (int j = 0; j < 64; j++)
		x[j] = rng_f(-1.0f, 1.0f) * 1e-40f;
	ffn_quant_q8_avx2(x, a, 32);
	moe_quantize_row_q8_0(x, b, 32);
	cr_assert_eq(a[0].d, 0);
	cr_assert_eq(b[0].d, 0);
	for (int j = 0; j < 32; j++) {
		cr_assert_eq(a[0].qs[j], 0);
		cr_assert_eq(b[0].qs[j], 0);
	}
	/* the same through both integer paths: such an x adds exactly 0 */
	uint8_t *w = make_weights(MOE_DTYPE_Q8_0, 3, 64, 1.0f);
	float y[3] = { 1, 1, 1 };
	cr_assert_eq(ffn_set_q8_mode(FFN_Q8_INT), 0);
	for (int isa = FFN_ISA_REF; isa <= FFN_ISA_AVX2; isa++) {
		cr_assert_eq(ffn_set_isa((enum ffn_isa)isa), 0);
		cr_assert_eq(ffn_matmul(MOE_DTYPE_Q8_0, w, 3, 64, x, 64, 1, y, 3, 1), 0);
		for (int r = 0; r < 3; r++)
			cr_assert(y[r] == 0.0f, "%s: %a", ffn_isa_name((enum ffn_isa)isa), (double)y[r]);
	}
	free(w);
}

/* The integer kernels (q8_0, q4_0, iq4_nl x q8_0 in FFN_Q8_INT; q4_K,
 * q5_K, q6_K, q3_K, q2_K x q8_K): every SIMD path (the AVX-512 ones run the VNNI batch
 * kernels where the CPU has AVX512-VNNI) gives the AVX2 kernels' bits, for
 * every tile shape and tail: row counts around the tiles (8 rows for the
 * 32-blocks, odd counts pairing the last row with itself; 4 for the
 * K-quants), batches around the 4-token tile, below the batch threshold
 * and past one pass of 64 tokens (a tail pass of 1 and of 6), one and two
 * threads, and raw random codes (q8_0 -128
 * included, which no quantizer writes but a file may hold). */
Test(ffn, int_paths_same_bits, .timeout = 60)
{
	static const enum moe_dtype dts[] = { MOE_DTYPE_Q8_0, MOE_DTYPE_Q4_0, MOE_DTYPE_IQ4_NL,
					      MOE_DTYPE_Q4_K, MOE_DTYPE_Q5_K, MOE_DTYPE_Q6_K, MOE_DTYPE_Q3_K,
					      MOE_DTYPE_Q2_K };
	static const uint32_t rows_v[] = { 1, 2, 3, 5, 7, 8, 9, 13, 17, 40 };
	static const uint32_t cols32[] = { 32, 96, 256 }, cols256[] = { 256, 512 };
	static const uint32_t Bs[] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 33, 65, 70 };
	cr_assert_eq(ffn_set_q8_mode(FFN_Q8_INT), 0);
	if (!ffn_isa_supported(FFN_ISA_AVX2))
		cr_skip_test("no AVX2");
	rng_seed(91);
	for (size_t d = 0; d < sizeof(dts) / sizeof(dts[0]); d++) {
		const enum moe_dtype t = dts[d];
		const bool kq = moe_dtype_block_elems(t) == 256;
		const uint32_t *cols_v = kq ? cols256 : cols32, ncols = kq ? 2 : 3;
		for (size_t ri = 0; ri < sizeof(rows_v) / sizeof(rows_v[0]); ri++)
			for (size_t ci = 0; ci < ncols; ci++) {
				const uint32_t rows = rows_v[ri], cols = cols_v[ci], bb = t == MOE_DTYPE_Q8_0 ? 34 : 18;
				const uint64_t rb = row_bytes(t, cols);
				uint8_t *w;
				if (kq) {
					w = kq_random(t, rows, cols);
				} else {
					w = malloc(rb * rows);
					for (uint64_t i = 0; i < rb * rows; i++)
						w[i] = (uint8_t)rng_u64();
					for (uint32_t r = 0; r < rows; r++)
						for (uint32_t b = 0; b < cols / 32; b++) {
							const uint16_t h = moe_f32_to_f16(rng_f(1e-3f, 1e-2f));
							memcpy(w + r * rb + b * bb, &h, 2);
						}
				}
				float *x = make_x(70, cols + 5, 1.0f);
				float *y0 = malloc(sizeof(float) * 70 * (rows + 3)), *y1 = malloc(sizeof(float) * 70 * (rows + 3));
				for (size_t bi = 0; bi < sizeof(Bs) / sizeof(Bs[0]); bi++) {
					const uint32_t B = Bs[bi];
					cr_assert_eq(ffn_set_isa(FFN_ISA_AVX2), 0);
					cr_assert_eq(ffn_matmul(t, w, rows, cols, x, cols + 5, B, y0, rows + 3, 1), 0);
					for (int isa = FFN_ISA_AVX2; isa < FFN_ISA_COUNT; isa++) {
						if (!ffn_isa_supported((enum ffn_isa)isa))
							continue;
						cr_assert_eq(ffn_set_isa((enum ffn_isa)isa), 0);
						for (int th = 1; th <= 2; th++) {
							memset(y1, 0xff, sizeof(float) * 70 * (rows + 3));
							cr_assert_eq(ffn_matmul(t, w, rows, cols, x, cols + 5, B, y1, rows + 3, th), 0);
							for (uint32_t k = 0; k < B; k++)
								cr_assert(memcmp(y0 + (size_t)k * (rows + 3), y1 + (size_t)k * (rows + 3),
										 4ull * rows) == 0,
									  "%s %s rows %u cols %u B %u threads %d: token %u differs from avx2",
									  ffn_isa_name((enum ffn_isa)isa), moe_dtype_name(t), rows, cols,
									  B, th, k);
						}
					}
				}
				free(w);
				free(x);
				free(y0);
				free(y1);
			}
	}
}

/* ---- dequantization: dtype.c against the formulas, all code values -------- */

Test(ffn, dequant_formulas_exhaustive, .timeout = 30)
{
	/* every f16 and bf16 bit pattern except NaN */
	for (uint32_t h = 0; h < 65536; h++) {
		float a = moe_f16_to_f32((uint16_t)h), b = ind_f16((uint16_t)h);
		if (!isnan(b))
			cr_assert(memcmp(&a, &b, 4) == 0, "f16 %04x: %a vs %a", h, (double)a, (double)b);
		a = moe_bf16_to_f32((uint16_t)h);
		b = ind_bf16((uint16_t)h);
		if (!isnan(b))
			cr_assert(memcmp(&a, &b, 4) == 0, "bf16 %04x", h);
	}
	/* every mxfp4 exponent, every q byte */
	uint8_t blk[17];
	float a[32], b[32];
	for (int e = 0; e < 255; e++)
		for (int q = 0; q < 256; q += 17) {
			blk[0] = (uint8_t)e;
			for (int j = 0; j < 16; j++)
				blk[1 + j] = (uint8_t)(q + j * 16 + j);
			moe_dequantize_row(MOE_DTYPE_MXFP4, blk, a, 32);
			ind_decode_row(MOE_DTYPE_MXFP4, blk, b, 32);
			cr_assert(memcmp(a, b, sizeof(a)) == 0, "mxfp4 e=%d", e);
		}
}

/* ---- layout validation and path selection --------------------------------- */

Test(ffn, layout_errors, .timeout = 10)
{
	struct fake_expert e;
	struct moe_error err = { { 0 } };
	struct ffn_layout L;
	struct pack_part_desc p[PACK_MAX_PARTS];

	rng_seed(66);
	fake_swiglu(&e, 64, 32, MOE_DTYPE_Q8_0, MOE_DTYPE_Q8_0, MOE_DTYPE_Q8_0);
	cr_assert_eq(ffn_layout_flops_per_token(&e.L), 2ull * 3 * 64 * 32);
	cr_assert_eq(e.L.weight_bytes, 3ull * 32 * 2 * 34);

	memcpy(p, e.parts, sizeof(p));
	cr_assert_eq(ffn_layout_init(&L, &e.cfg, p, 2, e.ext_bytes, &err), -EINVAL);
	cr_assert(strstr(err.msg, "down"), "%s", err.msg);

	memcpy(p, e.parts, sizeof(p));
	p[1].rows = 31;
	cr_assert_eq(ffn_layout_init(&L, &e.cfg, p, 3, e.ext_bytes, &err), -EINVAL);
	cr_assert(strstr(err.msg, "up is [31 x 64]"), "%s", err.msg);

	memcpy(p, e.parts, sizeof(p));
	cr_assert_eq(ffn_layout_init(&L, &e.cfg, p, 3, e.ext_bytes - 1, &err), -EINVAL);
	cr_assert(strstr(err.msg, "past"), "%s", err.msg);

	memcpy(p, e.parts, sizeof(p));
	p[0].dtype = MOE_DTYPE_I32;
	cr_assert_eq(ffn_layout_init(&L, &e.cfg, p, 3, e.ext_bytes, &err), -EINVAL);
	cr_assert(strstr(err.msg, "not supported"), "%s", err.msg);

	struct moe_model_config c = e.cfg;
	c.hidden = 48; /* q8_0 needs whole blocks of 32 */
	memcpy(p, e.parts, sizeof(p));
	p[0].cols = p[1].cols = 48;
	p[2].rows = 48;
	cr_assert_eq(ffn_layout_init(&L, &c, p, 3, e.ext_bytes, &err), -EINVAL);
	cr_assert(strstr(err.msg, "blocks"), "%s", err.msg);

	c = e.cfg;
	c.ffn_kind = MOE_FFN_GPTOSS;
	cr_assert_eq(ffn_layout_init(&L, &c, e.parts, 3, e.ext_bytes, &err), -EINVAL);
	cr_assert(strstr(err.msg, "gate_up"), "%s", err.msg);

	float x[64], y[64];
	cr_assert_eq(ffn_expert(&e.L, e.ext, x, 63, 1, y, 64, NULL, 0, 1), -EINVAL);
	cr_assert_eq(ffn_expert(&e.L, NULL, x, 64, 1, y, 64, NULL, 0, 1), -EINVAL);
	cr_assert_eq(ffn_matmul(MOE_DTYPE_Q4_0, e.ext, 2, 40, x, 64, 1, y, 2, 1), -EINVAL);
	free_fake(&e);
}

Test(ffn, isa_selection, .timeout = 10)
{
	cr_assert(ffn_isa_supported(FFN_ISA_REF));
	cr_assert_eq(ffn_isa_parse("AVX2"), FFN_ISA_AVX2);
	cr_assert_eq(ffn_isa_parse("avx512bf16"), FFN_ISA_AVX512BF16);
	cr_assert_eq(ffn_isa_parse("sse"), -1);
	cr_assert_str_eq(ffn_isa_name(FFN_ISA_AVX512), "avx512");
	cr_assert(ffn_isa_supported(ffn_isa_best()));
	cr_assert_eq(ffn_set_isa(FFN_ISA_COUNT), -EINVAL);
	cr_assert_eq(ffn_get_q8_mode(), FFN_Q8_INT, "ggml's integer dot is the default");
	cr_assert_eq(ffn_set_q8_mode((enum ffn_q8_mode)7), -EINVAL);
	for (int i = 0; i < FFN_ISA_COUNT; i++)
		cr_assert_eq(ffn_set_isa((enum ffn_isa)i), ffn_isa_supported((enum ffn_isa)i) ? 0 : -ENOTSUP);
	/* each feature implies the one below it */
	if (ffn_isa_supported(FFN_ISA_AVX512BF16))
		cr_assert(ffn_isa_supported(FFN_ISA_AVX512));
	if (ffn_isa_supported(FFN_ISA_AVX512))
		cr_assert(ffn_isa_supported(FFN_ISA_AVX2));
}

Test(ffn, isa_env_override, .timeout = 10)
{
	/* BoxFort runs each test in a fresh process, so the first use reads it */
	setenv("MOETIER_FFN_ISA", "ref", 1);
	cr_assert_eq(ffn_get_isa(), FFN_ISA_REF);
}

Test(ffn, q8_env_override, .timeout = 10)
{
	setenv("MOETIER_FFN_Q8", "exact", 1);
	cr_assert_eq(ffn_get_q8_mode(), FFN_Q8_EXACT);
}

Test(ffn, cuda_fatbin, .timeout = 10)
{
	size_t len = 1;
	const unsigned char *fb = ffn_cuda_fatbin(&len);
#ifdef HAVE_NVCC
	uint32_t magic;
	cr_assert(fb && len > 16, "fatbin missing");
	memcpy(&magic, fb, 4);
	cr_assert_eq(magic, 0xBA55ED50u, "fatbin magic %08x", magic);
#else
	cr_assert(!fb && len == 0);
#endif
}

/* ffn.cu decodes six types; a layout with any other (a Q4_K_M expert: q4_K
 * gate/up, q6_K down) is refused by name before a launch, not computed as
 * zeros. Mixed types: each matrix is checked, down alone can refuse. */
Test(ffn, cuda_refuses_types_it_lacks, .timeout = 10)
{
	const uint32_t n = 256, m = 256;
	const struct {
		enum moe_dtype g, d;
		bool ok;
	} cases[] = {
		{ MOE_DTYPE_Q8_0, MOE_DTYPE_Q8_0, true }, { MOE_DTYPE_BF16, MOE_DTYPE_Q4_0, true },
		{ MOE_DTYPE_Q4_K, MOE_DTYPE_Q6_K, false }, { MOE_DTYPE_Q8_0, MOE_DTYPE_Q6_K, false },
		{ MOE_DTYPE_IQ4_NL, MOE_DTYPE_F16, false }, { MOE_DTYPE_Q2_K, MOE_DTYPE_Q3_K, false },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct fake_expert e;
		struct moe_error err = { { 0 } };
		memset(&e, 0, sizeof(e));
		moe_model_set_family_defaults(&e.cfg, MOE_FAMILY_QWEN3_MOE);
		e.cfg.hidden = n;
		e.cfg.expert_width = m;
		add_part(&e, PACK_ROLE_GATE, cases[i].g, m, n);
		add_part(&e, PACK_ROLE_UP, cases[i].g, m, n);
		add_part(&e, PACK_ROLE_DOWN, cases[i].d, n, m);
		cr_assert_eq(ffn_layout_init(&e.L, &e.cfg, e.parts, e.n_parts, e.ext_bytes, &err), 0, "%s", err.msg);
		int rc = ffn_cuda_layout_check(&e.L, &err);
		if (cases[i].ok) {
			cr_assert_eq(rc, 0, "case %zu: %s", i, err.msg);
		} else {
			const enum moe_dtype bad = ffn_cuda_dtype_supported(cases[i].g) ? cases[i].d : cases[i].g;
			cr_assert_eq(rc, -ENOTSUP, "case %zu accepted", i);
			cr_assert(strstr(err.msg, moe_dtype_name(bad)) && strstr(err.msg, "CUDA"), "case %zu: %s", i,
				  err.msg);
		}
	}
	cr_assert(!ffn_cuda_dtype_supported(MOE_DTYPE_Q5_K) && !ffn_cuda_dtype_supported(MOE_DTYPE_IQ4_XS));
	cr_assert(ffn_cuda_dtype_supported(MOE_DTYPE_MXFP4));
}
