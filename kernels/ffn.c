/* ffn.c - expert FFN: path selection, the portable C kernels, the extent
 * layout, row splitting over threads, the activations and the top-k sum.
 * The SIMD matmuls are in ffn_avx2.c / ffn_avx512.c (ffn_simd.h). */
#include "config.h"
#include "ffn.h"
#include "ffn_impl.h"

#include <cpuid.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---- portable C kernels --------------------------------------------------- */

/* Decodes 32 columns (fewer at the end of a plain row) starting at c0 with
 * moe_dequantize_row, so the reference path shares dtype.c's formulas, then
 * accumulates in one float in column order. */
static void ref_mm(enum moe_dtype dt, const uint8_t *W, size_t rb, uint32_t cols, uint32_t r0,
		   uint32_t r1, const struct ffn_act *a, float *y, size_t ldy)
{
	const uint32_t be = moe_dtype_block_elems(dt), bb = moe_dtype_block_bytes(dt);
	float tmp[32];

	for (uint32_t r = r0; r < r1; r++) {
		const uint8_t *row = W + (size_t)r * rb;
		for (uint32_t t = 0; t < a->B; t++) {
			const float *x = a->f + (size_t)t * a->ld;
			float acc = 0.0f;
			for (uint32_t c0 = 0; c0 < cols; c0 += 32) {
				const uint32_t nn = cols - c0 < 32 ? cols - c0 : 32;
				moe_dequantize_row(dt, row + (size_t)c0 / be * bb, tmp, nn);
				for (uint32_t j = 0; j < nn; j++)
					acc += tmp[j] * x[c0 + j];
			}
			y[(size_t)t * ldy + (r - r0)] = acc;
		}
	}
}

FFN_MM_FOR_DTYPE(static, ref_f32, ref_mm, MOE_DTYPE_F32)
FFN_MM_FOR_DTYPE(static, ref_f16, ref_mm, MOE_DTYPE_F16)
FFN_MM_FOR_DTYPE(static, ref_bf16, ref_mm, MOE_DTYPE_BF16)
FFN_MM_FOR_DTYPE(static, ref_q8_0, ref_mm, MOE_DTYPE_Q8_0)
FFN_MM_FOR_DTYPE(static, ref_q4_0, ref_mm, MOE_DTYPE_Q4_0)
FFN_MM_FOR_DTYPE(static, ref_mxfp4, ref_mm, MOE_DTYPE_MXFP4)
FFN_MM_FOR_DTYPE(static, ref_iq4_nl, ref_mm, MOE_DTYPE_IQ4_NL)

/* q8_0, q4_0 or iq4_nl weights x q8_0 x: exact integer sum per block,
 * then scaled by d_w * d_x. */
static void ref_int(enum moe_dtype dt, const uint8_t *W, size_t rb, uint32_t cols, uint32_t r0, uint32_t r1,
		    const struct ffn_act *a, float *y, size_t ldy)
{
	for (uint32_t r = r0; r < r1; r++) {
		const uint8_t *row = W + (size_t)r * rb;
		for (uint32_t t = 0; t < a->B; t++) {
			const struct moe_block_q8_0 *xb = a->q8 + (size_t)t * a->ldq;
			float acc = 0.0f;
			for (uint32_t b = 0; b < cols / 32; b++) {
				int32_t isum = 0;
				uint16_t dw;
				if (dt == MOE_DTYPE_Q8_0) {
					const struct moe_block_q8_0 *wb = (const void *)(row + (size_t)b * sizeof(*wb));
					for (int j = 0; j < 32; j++)
						isum += (int32_t)wb->qs[j] * xb[b].qs[j];
					dw = wb->d;
				} else if (dt == MOE_DTYPE_Q4_0) {
					const struct moe_block_q4_0 *wb = (const void *)(row + (size_t)b * sizeof(*wb));
					for (int j = 0; j < 16; j++)
						isum += ((wb->qs[j] & 15) - 8) * xb[b].qs[j] +
							((wb->qs[j] >> 4) - 8) * xb[b].qs[j + 16];
					dw = wb->d;
				} else {
					const struct moe_block_iq4_nl *wb = (const void *)(row + (size_t)b * sizeof(*wb));
					for (int j = 0; j < 16; j++)
						isum += moe_kvalues_iq4nl[wb->qs[j] & 15] * xb[b].qs[j] +
							moe_kvalues_iq4nl[wb->qs[j] >> 4] * xb[b].qs[j + 16];
					dw = wb->d;
				}
				acc += (float)isum * (moe_f16_to_f32(dw) * moe_f16_to_f32(xb[b].d));
			}
			y[(size_t)t * ldy + (r - r0)] = acc;
		}
	}
}

FFN_MM_FOR_DTYPE(static, ref_q8int, ref_int, MOE_DTYPE_Q8_0)

FFN_MM_FOR_DTYPE(static, ref_q4int, ref_int, MOE_DTYPE_Q4_0)

FFN_MM_FOR_DTYPE(static, ref_iq4int, ref_int, MOE_DTYPE_IQ4_NL)

/* One K-quant super-block times one q8_K block: the exact integer sums
 * of ffn_kq_accum (see there), and the block's f16 d and dmin. The codes
 * are read as moe_dequantize_row reads them (dtype.c, element order). */
static void ref_kq_block(enum moe_dtype dt, const uint8_t *blk, const struct moe_block_q8_K *xb, int32_t *isum,
			 int32_t *imin, uint16_t *dh, uint16_t *mh)
{
	const int8_t *xq = xb->qs;
	int32_t is = 0, im = 0;
	*mh = 0;
	switch (dt) {
	case MOE_DTYPE_Q4_K: case MOE_DTYPE_Q5_K: {
		const bool q5 = dt == MOE_DTYPE_Q5_K;
		const struct moe_block_q4_K *b4 = (const void *)blk;
		const struct moe_block_q5_K *b5 = (const void *)blk;
		const uint8_t *scales = q5 ? b5->scales : b4->scales, *qs = q5 ? b5->qs : b4->qs;
		*dh = q5 ? b5->d : b4->d;
		*mh = q5 ? b5->dmin : b4->dmin;
		for (int j = 0; j < 8; j++) {
			uint8_t sc, m;
			int32_t s = 0;
			moe_kquant_scale_min(scales, j, &sc, &m);
			for (int l = 0; l < 32; l++) {
				const uint8_t byte = qs[32 * (j / 2) + l];
				int q = j & 1 ? byte >> 4 : byte & 15;
				if (q5)
					q |= ((b5->qh[l] >> j) & 1) << 4;
				s += q * xq[32 * j + l];
			}
			is += sc * s;
			im += m * (xb->bsums[2 * j] + xb->bsums[2 * j + 1]);
		}
		break;
	}
	case MOE_DTYPE_Q6_K: {
		const struct moe_block_q6_K *b = (const void *)blk;
		*dh = b->d;
		for (int k = 0; k < 16; k++) {
			const int h = k / 8, g = (k % 8) / 2;
			int32_t s = 0;
			for (int l = 16 * (k & 1); l < 16 * (k & 1) + 16; l++) {
				const uint8_t lo = b->ql[64 * h + 32 * (g & 1) + l];
				const int q = ((g < 2 ? lo & 15 : lo >> 4) | ((b->qh[32 * h + l] >> (2 * g)) & 3) << 4) - 32;
				s += q * xq[128 * h + 32 * g + l];
			}
			is += b->scales[k] * s;
		}
		break;
	}
	case MOE_DTYPE_Q3_K: {
		const struct moe_block_q3_K *b = (const void *)blk;
		*dh = b->d;
		for (int k = 0; k < 16; k++) {
			const int h = k / 8, g = (k % 8) / 2;
			int32_t s = 0;
			for (int l = 16 * (k & 1); l < 16 * (k & 1) + 16; l++) {
				const int q = ((b->qs[32 * h + l] >> (2 * g)) & 3) - ((b->hmask[l] >> (4 * h + g)) & 1 ? 0 : 4);
				s += q * xq[128 * h + 32 * g + l];
			}
			is += moe_q3_K_scale(b->scales, k) * s;
		}
		break;
	}
	case MOE_DTYPE_IQ4_XS: {
		const struct moe_block_iq4_xs *b = (const void *)blk;
		*dh = b->d;
		for (int s = 0; s < 8; s++) {
			int32_t sum = 0;
			for (int j = 0; j < 16; j++)
				sum += moe_kvalues_iq4nl[b->qs[16 * s + j] & 15] * xq[32 * s + j] +
				       moe_kvalues_iq4nl[b->qs[16 * s + j] >> 4] * xq[32 * s + j + 16];
			is += moe_iq4_xs_scale(b, s) * sum;
		}
		break;
	}
	default: { /* Q2_K */
		const struct moe_block_q2_K *b = (const void *)blk;
		*dh = b->d;
		*mh = b->dmin;
		for (int k = 0; k < 16; k++) {
			const int h = k / 8, g = (k % 8) / 2;
			int32_t s = 0;
			for (int l = 16 * (k & 1); l < 16 * (k & 1) + 16; l++)
				s += ((b->qs[32 * h + l] >> (2 * g)) & 3) * xq[128 * h + 32 * g + l];
			is += (b->scales[k] & 15) * s;
			im += (b->scales[k] >> 4) * xb->bsums[k];
		}
		break;
	}
	}
	*isum = is;
	*imin = im;
}

/* K-quant weights x q8_K x: super-block by super-block, ffn_kq_accum. */
static void ref_kq(enum moe_dtype dt, const uint8_t *W, size_t rb, uint32_t cols, uint32_t r0, uint32_t r1,
		   const struct ffn_act *a, float *y, size_t ldy)
{
	const uint32_t bb = moe_dtype_block_bytes(dt);
	for (uint32_t r = r0; r < r1; r++) {
		const uint8_t *row = W + (size_t)r * rb;
		for (uint32_t t = 0; t < a->B; t++) {
			const struct moe_block_q8_K *xb = a->q8k + (size_t)t * a->ldqk;
			float acc = 0.0f;
			for (uint32_t b = 0; b < cols / 256; b++) {
				int32_t isum, imin;
				uint16_t dh, mh;
				ref_kq_block(dt, row + (size_t)b * bb, &xb[b], &isum, &imin, &dh, &mh);
				acc = ffn_kq_accum(acc, moe_f16_to_f32(dh), moe_f16_to_f32(mh), xb[b].d, isum, imin);
			}
			y[(size_t)t * ldy + (r - r0)] = acc;
		}
	}
}

FFN_MM_FOR_DTYPE(static, ref_q4_K, ref_kq, MOE_DTYPE_Q4_K)
FFN_MM_FOR_DTYPE(static, ref_q5_K, ref_kq, MOE_DTYPE_Q5_K)
FFN_MM_FOR_DTYPE(static, ref_q6_K, ref_kq, MOE_DTYPE_Q6_K)
FFN_MM_FOR_DTYPE(static, ref_q3_K, ref_kq, MOE_DTYPE_Q3_K)
FFN_MM_FOR_DTYPE(static, ref_q2_K, ref_kq, MOE_DTYPE_Q2_K)
FFN_MM_FOR_DTYPE(static, ref_iq4_xs, ref_kq, MOE_DTYPE_IQ4_XS)

static void ref_quant_q8k(const float *x, struct moe_block_q8_K *out, uint32_t n)
{
	moe_quantize_row_q8_K(x, out, n);
}

/* x to q8_0 blocks: dtype.c's quantizer (blocks too small for a finite
 * 1 / d get d 0 and codes 0 there, as from ffn_quant_q8_avx2). */
static void ref_quant_q8(const float *x, struct moe_block_q8_0 *out, uint32_t n)
{
	moe_quantize_row_q8_0(x, out, n);
}

static const struct ffn_isa_ops ffn_ops_ref = {
	.mm = {
		[MOE_DTYPE_F32] = ref_f32, [MOE_DTYPE_F16] = ref_f16, [MOE_DTYPE_BF16] = ref_bf16,
		[MOE_DTYPE_Q8_0] = ref_q8_0, [MOE_DTYPE_Q4_0] = ref_q4_0, [MOE_DTYPE_MXFP4] = ref_mxfp4,
		[MOE_DTYPE_Q4_K] = ref_q4_K, [MOE_DTYPE_Q5_K] = ref_q5_K, [MOE_DTYPE_Q6_K] = ref_q6_K,
		[MOE_DTYPE_Q3_K] = ref_q3_K, [MOE_DTYPE_Q2_K] = ref_q2_K, [MOE_DTYPE_IQ4_NL] = ref_iq4_nl,
		[MOE_DTYPE_IQ4_XS] = ref_iq4_xs,
	},
	.bf16_act_mask = 0,
	.perm_act_mask = 0,
	.perm_w = 0,
	.mm_q8int = ref_q8int,
	.mm_q4int = ref_q4int,
	.mm_iq4int = ref_iq4int,
	.quant_q8 = ref_quant_q8,
	.quant_q8k = ref_quant_q8k,
};

/* ---- path selection ------------------------------------------------------- */

static const char *const isa_names[FFN_ISA_COUNT] = { "ref", "avx2", "avx512", "avx512bf16" };
static const struct ffn_isa_ops *const isa_ops[FFN_ISA_COUNT] = {
	&ffn_ops_ref, &ffn_ops_avx2, &ffn_ops_avx512, &ffn_ops_avx512bf16,
};

const char *ffn_isa_name(enum ffn_isa isa)
{
	return (unsigned)isa < FFN_ISA_COUNT ? isa_names[isa] : "invalid";
}

int ffn_isa_parse(const char *name)
{
	for (int i = 0; name && i < FFN_ISA_COUNT; i++)
		if (strcasecmp(name, isa_names[i]) == 0)
			return i;
	return -1;
}

/* F16C from CPUID leaf 1 (clang 14's __builtin_cpu_supports does not know
 * "f16c"); the OS side (ymm state) is the AVX2 check's. */
static bool cpu_f16c(void)
{
	unsigned a, b, c, d;
	return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}

bool ffn_isa_supported(enum ffn_isa isa)
{
	__builtin_cpu_init();
	/* __builtin_cpu_supports also checks that the OS saves the wide
	 * registers (XCR0), so a "yes" here is safe to run. */
	const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_f16c();
	const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
			    __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
			    __builtin_cpu_supports("avx512dq");
	switch (isa) {
	case FFN_ISA_REF: return true;
	case FFN_ISA_AVX2: return avx2;
	case FFN_ISA_AVX512: return avx512;
	case FFN_ISA_AVX512BF16: return avx512 && __builtin_cpu_supports("avx512bf16");
	default: return false;
	}
}

enum ffn_isa ffn_isa_best(void)
{
	for (int i = FFN_ISA_COUNT - 1; i > 0; i--)
		if (ffn_isa_supported((enum ffn_isa)i))
			return (enum ffn_isa)i;
	return FFN_ISA_REF;
}

static int cur_isa = -1;
static int cur_q8 = FFN_Q8_INT;
static pthread_once_t isa_once = PTHREAD_ONCE_INIT;

static void isa_init(void)
{
	const char *q8 = getenv("MOETIER_FFN_Q8");
	if (q8 && !strcasecmp(q8, "exact"))
		__atomic_store_n(&cur_q8, FFN_Q8_EXACT, __ATOMIC_RELEASE);
	else if (q8 && *q8 && strcasecmp(q8, "int"))
		moe_warn("MOETIER_FFN_Q8=%s is not exact or int; using int", q8);

	const char *env = getenv("MOETIER_FFN_ISA");
	int isa = ffn_isa_best();

	if (env && *env) {
		int want = ffn_isa_parse(env);
		if (want < 0)
			moe_warn("MOETIER_FFN_ISA=%s is not a known path; using %s", env, ffn_isa_name(isa));
		else if (!ffn_isa_supported(want))
			moe_warn("MOETIER_FFN_ISA=%s: this CPU lacks it; using %s", env, ffn_isa_name(isa));
		else
			isa = want;
	}
	int expect = -1;
	__atomic_compare_exchange_n(&cur_isa, &expect, isa, false, __ATOMIC_RELEASE, __ATOMIC_RELAXED);
}

enum ffn_isa ffn_get_isa(void)
{
	pthread_once(&isa_once, isa_init);
	return (enum ffn_isa)__atomic_load_n(&cur_isa, __ATOMIC_ACQUIRE);
}

int ffn_set_isa(enum ffn_isa isa)
{
	if ((unsigned)isa >= FFN_ISA_COUNT)
		return -EINVAL;
	if (!ffn_isa_supported(isa))
		return -ENOTSUP;
	pthread_once(&isa_once, isa_init);
	__atomic_store_n(&cur_isa, (int)isa, __ATOMIC_RELEASE);
	return 0;
}

int ffn_set_q8_mode(enum ffn_q8_mode mode)
{
	if (mode != FFN_Q8_EXACT && mode != FFN_Q8_INT)
		return -EINVAL;
	pthread_once(&isa_once, isa_init);
	__atomic_store_n(&cur_q8, (int)mode, __ATOMIC_RELEASE);
	return 0;
}

enum ffn_q8_mode ffn_get_q8_mode(void)
{
	pthread_once(&isa_once, isa_init);
	return (enum ffn_q8_mode)__atomic_load_n(&cur_q8, __ATOMIC_ACQUIRE);
}

/* The kernels for one call: the path's table, with q8_0, q4_0 and iq4_nl
 * switched to the integer kernels in FFN_Q8_INT mode. */
struct mm_sel {
	ffn_mm_fn mm[MOE_DTYPE_COUNT];
	/* 1u << dtype when mm[dtype] reads ffn_act.bf / .q8 / .fp / .q8k */
	uint32_t bf16_mask, q8_mask, perm_mask, perm_w, q8k_mask;
	void (*quant_q8)(const float *x, struct moe_block_q8_0 *out, uint32_t n);
	void (*quant_q8k)(const float *x, struct moe_block_q8_K *out, uint32_t n);
};

/* AVX512-VNNI, for the batched integer kernels of the AVX-512 paths. */
static bool cpu_vnni512(void)
{
	static int have = -1;
	int h = __atomic_load_n(&have, __ATOMIC_RELAXED);
	if (h < 0) {
		__builtin_cpu_init();
		h = ffn_isa_supported(FFN_ISA_AVX512) && __builtin_cpu_supports("avx512vnni");
		__atomic_store_n(&have, h, __ATOMIC_RELAXED);
	}
	return h;
}

static void ops_now(struct mm_sel *s)
{
	const enum ffn_isa isa = ffn_get_isa();
	const struct ffn_isa_ops *o = isa_ops[isa];
	memcpy(s->mm, o->mm, sizeof(s->mm));
	s->bf16_mask = o->bf16_act_mask;
	s->perm_mask = o->perm_act_mask;
	s->perm_w = o->perm_w;
	s->quant_q8 = o->quant_q8;
	s->quant_q8k = o->quant_q8k;
	s->q8k_mask = FFN_KQUANT_MASK;
	s->q8_mask = 0;
	if ((isa == FFN_ISA_AVX512 || isa == FFN_ISA_AVX512BF16) && cpu_vnni512()) {
		/* same bits as the AVX2 K-quant kernels, batches ~2x faster */
		s->mm[MOE_DTYPE_Q4_K] = ffn_mm_q4_K_vnni512;
		s->mm[MOE_DTYPE_Q5_K] = ffn_mm_q5_K_vnni512;
		s->mm[MOE_DTYPE_Q6_K] = ffn_mm_q6_K_vnni512;
		s->mm[MOE_DTYPE_Q3_K] = ffn_mm_q3_K_vnni512;
		s->mm[MOE_DTYPE_Q2_K] = ffn_mm_q2_K_vnni512;
	}
	if (ffn_get_q8_mode() == FFN_Q8_INT) {
		s->mm[MOE_DTYPE_Q8_0] = o->mm_q8int;
		s->mm[MOE_DTYPE_Q4_0] = o->mm_q4int;
		s->mm[MOE_DTYPE_IQ4_NL] = o->mm_iq4int;
		if ((isa == FFN_ISA_AVX512 || isa == FFN_ISA_AVX512BF16) && cpu_vnni512()) {
			/* same bits as the AVX2 kernels, batches ~2x faster */
			s->mm[MOE_DTYPE_Q8_0] = ffn_mm_q8int_vnni512;
			s->mm[MOE_DTYPE_Q4_0] = ffn_mm_q4int_vnni512;
			s->mm[MOE_DTYPE_IQ4_NL] = ffn_mm_iq4int_vnni512;
		}
		s->q8_mask = (1u << MOE_DTYPE_Q8_0) | (1u << MOE_DTYPE_Q4_0) | (1u << MOE_DTYPE_IQ4_NL);
	}
}

/* B rows of cols floats, stride ld, in the even/odd order of the SIMD bf16
 * kernels (ffn_perm_even_odd), same stride. */
static void to_perm(const float *x, size_t ld, uint32_t B, uint32_t cols, uint32_t w, float *out)
{
	for (uint32_t t = 0; t < B; t++)
		ffn_perm_even_odd(x + (size_t)t * ld, out + (size_t)t * ld, cols, w);
}

/* B rows of cols (a multiple of 32) floats, stride ld, to q8_0 blocks. */
static void to_q8(const struct mm_sel *s, const float *x, size_t ld, uint32_t B, uint32_t cols,
		  struct moe_block_q8_0 *out, size_t ldq)
{
	for (uint32_t t = 0; t < B; t++)
		s->quant_q8(x + (size_t)t * ld, out + (size_t)t * ldq, cols);
}

/* B rows of cols (a multiple of 256) floats, stride ld, to q8_K blocks. */
static void to_q8k(const struct mm_sel *s, const float *x, size_t ld, uint32_t B, uint32_t cols,
		   struct moe_block_q8_K *out, size_t ldq)
{
	for (uint32_t t = 0; t < B; t++)
		s->quant_q8k(x + (size_t)t * ld, out + (size_t)t * ldq, cols);
}

bool ffn_dtype_supported(enum moe_dtype t)
{
	return (unsigned)t < MOE_DTYPE_COUNT && ffn_ops_ref.mm[t] != NULL;
}

/* ---- threads -------------------------------------------------------------- */

/* A process-wide pool of workers, created on first use and grown to the
 * largest thread count asked (creating threads per matmul cost more than a
 * small product itself). A call publishes its pieces, bumps `gen` and does
 * piece 0 itself; workers spin briefly on `gen`, then sleep on a condvar so
 * that an idle pool burns no core. The split is the same as it always was,
 * whoever runs a piece, so the bits never depend on the pool. One caller
 * uses the pool at a time; a caller that finds it busy runs its pieces
 * inline (same split, same bits) rather than wait behind another's product.
 * After fork() the child starts with an empty pool (pthread_atfork). */

typedef void (*range_fn)(void *arg, uint32_t lo, uint32_t hi);

struct range_job {
	range_fn fn;
	void *arg;
	uint32_t lo, hi;
};

#define MAX_THREADS 64
/* Polls of `gen` (each a pause, 10..140 cycles by CPU) before a worker
 * sleeps, and of `pending` before the caller does: some 10..100 us, about
 * the gap between the products of one layer, not more (the host is often
 * shared, and a sleeping worker costs only a futex wake). */
#define POOL_SPIN 2048

static struct pool {
	pthread_mutex_t call;     /* held by the one caller using the pool */
	pthread_mutex_t m;        /* guards the sleeps below */
	pthread_cond_t wake, done;
	/* (generation << 8) | pieces of the current call, bumped once per call;
	 * one word so a worker never pairs a count with another call's pieces */
	_Atomic uint64_t gen;
	atomic_int pending;       /* workers' pieces not yet finished */
	int n_workers;            /* worker i (1-based) runs jobs[i] */
	uint64_t born[MAX_THREADS]; /* gen when worker i was created: later ones are its work */
	uint32_t created;         /* threads ever created (tests) */
	struct range_job jobs[MAX_THREADS];
} pool = {
	.call = PTHREAD_MUTEX_INITIALIZER,
	.m = PTHREAD_MUTEX_INITIALIZER,
	.wake = PTHREAD_COND_INITIALIZER,
	.done = PTHREAD_COND_INITIALIZER,
};
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#endif
}

static void *pool_worker(void *p)
{
	const int me = (int)(intptr_t)p;
	/* not the gen now: the call that created this worker may have bumped it already */
	uint64_t seen = pool.born[me];

	for (;;) {
		uint64_t g;
		int spin = 0;
		while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen &&
		       spin++ < POOL_SPIN)
			cpu_relax();
		if (g == seen) {
			pthread_mutex_lock(&pool.m);
			while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen)
				pthread_cond_wait(&pool.wake, &pool.m);
			pthread_mutex_unlock(&pool.m);
		}
		seen = g;
		/* jobs[] was written before gen was bumped (release); a call ends
		 * only once its workers are done, so jobs[me] stays put meanwhile */
		if (me < (int)(g & 0xff)) {
			const struct range_job *j = &pool.jobs[me];
			j->fn(j->arg, j->lo, j->hi);
			if (atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_acq_rel) == 1) {
				pthread_mutex_lock(&pool.m);
				pthread_cond_signal(&pool.done);
				pthread_mutex_unlock(&pool.m);
			}
		}
	}
	return NULL;
}

/* fork() keeps only the calling thread: hold `call` across it so no product
 * is half published, and give the child a fresh, empty pool. */
static void pool_prefork(void) { pthread_mutex_lock(&pool.call); }
static void pool_postfork_parent(void) { pthread_mutex_unlock(&pool.call); }
static void pool_postfork_child(void)
{
	pthread_mutex_init(&pool.call, NULL);
	pthread_mutex_init(&pool.m, NULL);
	pthread_cond_init(&pool.wake, NULL);
	pthread_cond_init(&pool.done, NULL);
	atomic_store(&pool.pending, 0);
	pool.n_workers = 0;
}

static void pool_init(void)
{
	pthread_atfork(pool_prefork, pool_postfork_parent, pool_postfork_child);
}

/* Grows the pool to `want` workers (fewer when thread creation fails). */
static void pool_grow(int want)
{
	pthread_attr_t attr;

	if (pool.n_workers >= want || pthread_attr_init(&attr) != 0)
		return;
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	while (pool.n_workers < want) {
		pthread_t t;
		pool.born[pool.n_workers + 1] = atomic_load_explicit(&pool.gen, memory_order_relaxed);
		if (pthread_create(&t, &attr, pool_worker, (void *)(intptr_t)(pool.n_workers + 1)) != 0)
			break;
		pool.n_workers++;
		pool.created++;
	}
	pthread_attr_destroy(&attr);
}

uint32_t ffn_pool_threads_created(void)
{
	uint32_t n;
	pthread_once(&pool_once, pool_init);
	pthread_mutex_lock(&pool.call);
	n = pool.created;
	pthread_mutex_unlock(&pool.call);
	return n;
}

/* Runs fn over [0, total) split into `threads` pieces aligned to `align`.
 * The caller's thread takes piece 0; pieces with no worker (pool busy, or
 * threads that could not be created) run inline, so the result never depends
 * on who runs them. */
static void run_split(int threads, uint32_t total, uint32_t align, range_fn fn, void *arg)
{
	struct range_job jobs[MAX_THREADS];
	uint32_t units = (total + align - 1) / align;
	int n = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
	int used = 1;

	if ((uint32_t)n > units)
		n = units ? (int)units : 1;
	if (n == 1) {
		fn(arg, 0, total);
		return;
	}
	for (int i = 0; i < n; i++) {
		uint32_t lo = (uint32_t)((uint64_t)units * i / n) * align;
		uint32_t hi = (uint32_t)((uint64_t)units * (i + 1) / n) * align;
		jobs[i] = (struct range_job){ fn, arg, lo < total ? lo : total, hi < total ? hi : total };
	}
	pthread_once(&pool_once, pool_init);
	if (pthread_mutex_trylock(&pool.call) == 0) {
		pool_grow(n - 1);
		used = pool.n_workers + 1 < n ? pool.n_workers + 1 : n;
		if (used > 1) {
			memcpy(pool.jobs, jobs, sizeof(jobs[0]) * (size_t)used);
			atomic_store_explicit(&pool.pending, used - 1, memory_order_relaxed);
			/* the bump under m: a worker about to sleep sees it or gets the broadcast */
			pthread_mutex_lock(&pool.m);
			uint64_t g = atomic_load_explicit(&pool.gen, memory_order_relaxed);
			atomic_store_explicit(&pool.gen, ((g >> 8) + 1) << 8 | (uint64_t)used,
					      memory_order_release);
			pthread_cond_broadcast(&pool.wake);
			pthread_mutex_unlock(&pool.m);
		}
		jobs[0].fn(jobs[0].arg, jobs[0].lo, jobs[0].hi);
		for (int i = used; i < n; i++)
			jobs[i].fn(jobs[i].arg, jobs[i].lo, jobs[i].hi);
		if (used > 1) {
			int spin = 0;
			while (atomic_load_explicit(&pool.pending, memory_order_acquire) != 0 &&
			       spin++ < POOL_SPIN)
				cpu_relax();
			if (atomic_load_explicit(&pool.pending, memory_order_acquire) != 0) {
				pthread_mutex_lock(&pool.m);
				while (atomic_load_explicit(&pool.pending, memory_order_acquire) != 0)
					pthread_cond_wait(&pool.done, &pool.m);
				pthread_mutex_unlock(&pool.m);
			}
		}
		pthread_mutex_unlock(&pool.call);
		return;
	}
	for (int i = 0; i < n; i++)
		jobs[i].fn(jobs[i].arg, jobs[i].lo, jobs[i].hi);
}

void ffn_parallel_for(int threads, uint32_t n, void (*fn)(void *arg, uint32_t lo, uint32_t hi), void *arg)
{
	run_split(threads, n, 1, fn, arg);
}

/* ---- matmul --------------------------------------------------------------- */

/* Columns [lo, hi) of B rows of stride ld, rounded to nearest even bf16. */
static void to_bf16(const float *x, size_t ld, uint32_t B, uint16_t *out, uint32_t lo, uint32_t hi)
{
	for (uint32_t t = 0; t < B; t++)
		for (uint32_t c = lo; c < hi; c++)
			out[(size_t)t * ld + c] = moe_f32_to_bf16(x[(size_t)t * ld + c]);
}

struct mm_job {
	ffn_mm_fn fn;
	const uint8_t *W;
	size_t rb;
	uint32_t cols;
	const struct ffn_act *a;
	float *y;
	size_t ldy;
};

static void mm_range(void *p, uint32_t lo, uint32_t hi)
{
	struct mm_job *j = p;
	if (lo < hi)
		j->fn(j->W, j->rb, j->cols, lo, hi, j->a, j->y + lo, j->ldy);
}

int ffn_matmul(enum moe_dtype dt, const void *W, uint32_t rows, uint32_t cols, const float *x, size_t ldx,
	       uint32_t B, float *y, size_t ldy, int threads)
{
	struct mm_sel ops;
	uint64_t rb;
	uint16_t *xb = NULL;
	struct moe_block_q8_0 *xq = NULL;
	struct moe_block_q8_K *xk = NULL;
	float *xp = NULL;
	int rc = -ENOMEM;

	if (!ffn_dtype_supported(dt) || !moe_dtype_row_bytes(dt, cols, &rb) || !W || !x || !y ||
	    ldx < cols || ldy < rows)
		return -EINVAL;
	if (!B || !rows)
		return 0;
	if (!cols) {
		for (uint32_t t = 0; t < B; t++)
			memset(y + (size_t)t * ldy, 0, (size_t)rows * sizeof(float));
		return 0;
	}
	ops_now(&ops);
	if (ops.bf16_mask & (1u << dt)) {
		xb = malloc((size_t)B * ldx * sizeof(*xb));
		if (!xb)
			goto out;
		to_bf16(x, ldx, B, xb, 0, cols);
	}
	if (ops.q8_mask & (1u << dt)) {
		xq = malloc((size_t)B * (cols / 32) * sizeof(*xq));
		if (!xq)
			goto out;
		to_q8(&ops, x, ldx, B, cols, xq, cols / 32);
	}
	if (ops.q8k_mask & (1u << dt)) {
		xk = malloc((size_t)B * (cols / 256) * sizeof(*xk));
		if (!xk)
			goto out;
		to_q8k(&ops, x, ldx, B, cols, xk, cols / 256);
	}
	if (ops.perm_mask & (1u << dt)) {
		xp = malloc((size_t)B * ldx * sizeof(*xp));
		if (!xp)
			goto out;
		to_perm(x, ldx, B, cols, ops.perm_w, xp);
	}
	struct ffn_act a = { .f = x, .bf = xb, .fp = xp, .q8 = xq, .q8k = xk, .B = B, .ld = ldx, .ldq = cols / 32,
			     .ldqk = cols / 256 };
	struct mm_job j = { ops.mm[dt], W, rb, cols, &a, y, ldy };
	run_split(threads, rows, 4, mm_range, &j);
	rc = 0;
out:
	free(xb);
	free(xq);
	free(xk);
	free(xp);
	return rc;
}

/* ---- layout --------------------------------------------------------------- */

const struct pack_part_desc *ffn_layout_find_part(const struct pack_part_desc *parts, uint32_t n, uint32_t role)
{
	for (uint32_t i = 0; i < n; i++)
		if (parts[i].role == role)
			return &parts[i];
	return NULL;
}

int ffn_layout_take_mat(struct ffn_mat *M, const struct pack_part_desc *p, const char *what, uint32_t rows,
			uint32_t cols, uint64_t extent_bytes, struct moe_error *err)
{
	uint64_t rb, bytes, end;

	if (!p)
		return moe_error_set(err, -EINVAL, "expert layout has no %s part", what);
	if (!ffn_dtype_supported(p->dtype))
		return moe_error_set(err, -EINVAL, "%s: dtype %s is not supported by the FFN kernels", what,
				     moe_dtype_name(p->dtype));
	if (p->rows != rows || p->cols != cols)
		return moe_error_set(err, -EINVAL, "%s is [%u x %u], the model needs [%u x %u]", what, p->rows,
				     p->cols, rows, cols);
	if (!moe_dtype_row_bytes(p->dtype, cols, &rb))
		return moe_error_set(err, -EINVAL, "%s: %u columns are not whole %s blocks", what, cols,
				     moe_dtype_name(p->dtype));
	if (!moe_mul_u64(rb, rows, &bytes) || bytes != p->bytes)
		return moe_error_set(err, -EINVAL, "%s: %llu bytes, expected %u rows of %llu", what,
				     (unsigned long long)p->bytes, rows, (unsigned long long)rb);
	if (!moe_add_u64(p->offset, bytes, &end) || end > extent_bytes)
		return moe_error_set(err, -EINVAL, "%s: bytes [%llu, +%llu) run past the %llu-byte extent", what,
				     (unsigned long long)p->offset, (unsigned long long)bytes,
				     (unsigned long long)extent_bytes);
	*M = (struct ffn_mat){ (enum moe_dtype)p->dtype, rows, cols, p->offset, rb };
	return 0;
}

static int take_vec(struct ffn_vec *V, const struct pack_part_desc *p, const char *what, uint32_t len,
		    uint64_t extent_bytes, struct moe_error *err)
{
	uint64_t bytes, end;

	if (!p) {
		*V = (struct ffn_vec){ MOE_DTYPE_INVALID, 0, 0 };
		return 0;
	}
	if (!ffn_dtype_supported(p->dtype) || (uint64_t)p->rows * p->cols != len ||
	    !moe_dtype_row_bytes(p->dtype, len, &bytes) || bytes != p->bytes)
		return moe_error_set(err, -EINVAL, "%s: %s [%u x %u] of %llu bytes does not hold %u values", what,
				     moe_dtype_name(p->dtype), p->rows, p->cols, (unsigned long long)p->bytes, len);
	if (!moe_add_u64(p->offset, bytes, &end) || end > extent_bytes)
		return moe_error_set(err, -EINVAL, "%s runs past the %llu-byte extent", what,
				     (unsigned long long)extent_bytes);
	*V = (struct ffn_vec){ (enum moe_dtype)p->dtype, len, p->offset };
	return 0;
}

static uint64_t mat_end(const struct ffn_mat *M)
{
	return M->rows ? M->offset + M->row_bytes * M->rows : 0;
}

int ffn_layout_init(struct ffn_layout *L, const struct moe_model_config *cfg, const struct pack_part_desc *parts,
		    uint32_t n_parts, uint64_t extent_bytes, struct moe_error *err)
{
	int rc;

	if (!L || !cfg || (!parts && n_parts))
		return moe_error_set(err, -EINVAL, "ffn layout: missing argument");
	memset(L, 0, sizeof(*L));
	const uint32_t n = cfg->hidden, m = cfg->expert_width;
	if (!n || !m || n > (1u << 20) || m > (1u << 20))
		return moe_error_set(err, -EINVAL, "ffn layout: hidden %u / expert width %u out of range", n, m);
	L->n = n;
	L->m = m;
	const struct pack_part_desc *gate = ffn_layout_find_part(parts, n_parts, PACK_ROLE_GATE),
				    *up = ffn_layout_find_part(parts, n_parts, PACK_ROLE_UP),
				    *gate_up = ffn_layout_find_part(parts, n_parts, PACK_ROLE_GATE_UP);
	if (cfg->ffn_kind == MOE_FFN_SWIGLU) {
		L->kind = MOE_FFN_SWIGLU;
		if ((rc = ffn_layout_take_mat(&L->gate, gate, "gate", m, n, extent_bytes, err)) ||
		    (rc = ffn_layout_take_mat(&L->up, up, "up", m, n, extent_bytes, err)))
			return rc;
	} else if (cfg->ffn_kind == MOE_FFN_SILU) {
		/* no gate part: a pack that has one is not this kind */
		L->kind = MOE_FFN_SILU;
		if (gate || gate_up)
			return moe_error_set(err, -EINVAL, "ffn layout: a gateless (silu) expert with a gate part");
		if ((rc = ffn_layout_take_mat(&L->up, up, "up", m, n, extent_bytes, err)))
			return rc;
	} else if (cfg->ffn_kind == MOE_FFN_GPTOSS) {
		L->kind = MOE_FFN_GPTOSS;
		if ((rc = ffn_layout_take_mat(&L->gate_up, gate_up, "gate_up", 2 * m, n, extent_bytes, err)) ||
		    (rc = take_vec(&L->gate_up_bias, ffn_layout_find_part(parts, n_parts, PACK_ROLE_GATE_UP_BIAS),
				   "gate_up_bias", 2 * m, extent_bytes, err)) ||
		    (rc = take_vec(&L->down_bias, ffn_layout_find_part(parts, n_parts, PACK_ROLE_DOWN_BIAS), "down_bias",
				   n, extent_bytes, err)))
			return rc;
		if (!(cfg->swiglu_limit >= 0.0f) || !(cfg->glu_alpha >= 0.0f))
			return moe_error_set(err, -EINVAL, "ffn layout: bad swiglu_limit %g / glu_alpha %g",
					     (double)cfg->swiglu_limit, (double)cfg->glu_alpha);
		L->limit = cfg->swiglu_limit;
		L->alpha = cfg->glu_alpha;
	} else {
		return moe_error_set(err, -EINVAL, "ffn layout: unknown FFN kind %u", cfg->ffn_kind);
	}
	if ((rc = ffn_layout_take_mat(&L->down, ffn_layout_find_part(parts, n_parts, PACK_ROLE_DOWN), "down", n, m,
				      extent_bytes, err)))
		return rc;
	L->weight_bytes = L->gate.row_bytes * L->gate.rows + L->up.row_bytes * L->up.rows +
			  L->gate_up.row_bytes * L->gate_up.rows + L->down.row_bytes * L->down.rows;
	L->payload = MOE_MAX(MOE_MAX(mat_end(&L->gate), mat_end(&L->up)), MOE_MAX(mat_end(&L->gate_up), mat_end(&L->down)));
	return 0;
}

uint64_t ffn_layout_flops_per_token(const struct ffn_layout *L)
{
	return 2ull * L->n * L->m * (L->kind == MOE_FFN_SILU ? 2 : 3);
}

/* ---- the expert ----------------------------------------------------------- */

struct expert_job {
	const struct ffn_layout *L;
	const struct mm_sel *ops;
	const uint8_t *ext;
	struct ffn_act x;      /* [B x n] */
	float *g, *u;          /* SWIGLU [B x m] each; GPTOSS: g is [B x 2m] */
	float *h;              /* [B x m] */
	uint16_t *hb;          /* [B x m] bf16 copy of h, or NULL */
	float *hp;             /* [B x m] even/odd copy of h (ffn_act.fp), or NULL */
	struct moe_block_q8_0 *hq; /* [B x m/32] q8_0 copy of h, or NULL */
	struct moe_block_q8_K *hk; /* [B x m/256] q8_K copy of h, or NULL */
	const float *gu_bias;  /* [2m] or NULL */
	const float *down_bias;/* [n] or NULL */
	float *out;            /* [B x ldo] */
	size_t ldo;
	float *y;              /* accumulation target or NULL */
	size_t ldy;
	const float *scale;
};

static inline float sigmoidf_(float v)
{
	return 1.0f / (1.0f + expf(-v));
}

/* Phase 1 over expert-width units [lo, hi): gate/up rows, activation, and
 * the bf16 copy of h for those columns. */
static void expert_phase1(void *p, uint32_t lo, uint32_t hi)
{
	struct expert_job *j = p;
	const struct ffn_layout *L = j->L;
	const uint32_t B = j->x.B, m = L->m;

	if (lo >= hi)
		return;
	if (L->kind == MOE_FFN_SWIGLU) {
		j->ops->mm[L->gate.dtype](j->ext + L->gate.offset, L->gate.row_bytes, L->n, lo, hi, &j->x, j->g + lo, m);
		j->ops->mm[L->up.dtype](j->ext + L->up.offset, L->up.row_bytes, L->n, lo, hi, &j->x, j->u + lo, m);
		for (uint32_t t = 0; t < B; t++) {
			const float *g = j->g + (size_t)t * m, *u = j->u + (size_t)t * m;
			float *h = j->h + (size_t)t * m;
			for (uint32_t i = lo; i < hi; i++)
				h[i] = g[i] * sigmoidf_(g[i]) * u[i];
		}
	} else if (L->kind == MOE_FFN_SILU) {
		/* the SwiGLU path without the gate product: h = silu(up x) */
		j->ops->mm[L->up.dtype](j->ext + L->up.offset, L->up.row_bytes, L->n, lo, hi, &j->x, j->u + lo, m);
		for (uint32_t t = 0; t < B; t++) {
			const float *u = j->u + (size_t)t * m;
			float *h = j->h + (size_t)t * m;
			for (uint32_t i = lo; i < hi; i++)
				h[i] = u[i] * sigmoidf_(u[i]);
		}
	} else {
		const float lim = L->limit, alpha = L->alpha > 0.0f ? L->alpha : 1.0f;
		j->ops->mm[L->gate_up.dtype](j->ext + L->gate_up.offset, L->gate_up.row_bytes, L->n, 2 * lo, 2 * hi,
					     &j->x, j->g + 2 * lo, 2 * (size_t)m);
		for (uint32_t t = 0; t < B; t++) {
			const float *gu = j->g + (size_t)t * 2 * m;
			float *h = j->h + (size_t)t * m;
			for (uint32_t i = lo; i < hi; i++) {
				float g = gu[2 * i], u = gu[2 * i + 1];
				if (j->gu_bias) {
					g += j->gu_bias[2 * i];
					u += j->gu_bias[2 * i + 1];
				}
				if (lim > 0.0f) {
					g = fminf(g, lim);
					u = fminf(fmaxf(u, -lim), lim);
				}
				h[i] = (u + 1.0f) * (g * sigmoidf_(alpha * g));
			}
		}
	}
	if (j->hb)
		to_bf16(j->h, m, B, j->hb, lo, hi);
}

/* Phase 2 over hidden rows [lo, hi): down projection, bias, accumulation. */
static void expert_phase2(void *p, uint32_t lo, uint32_t hi)
{
	struct expert_job *j = p;
	const struct ffn_layout *L = j->L;
	const uint32_t B = j->x.B;
	struct ffn_act h = { .f = j->h, .bf = j->hb, .fp = j->hp, .q8 = j->hq, .q8k = j->hk, .B = B, .ld = L->m,
			     .ldq = L->m / 32, .ldqk = L->m / 256 };

	if (lo >= hi)
		return;
	j->ops->mm[L->down.dtype](j->ext + L->down.offset, L->down.row_bytes, L->m, lo, hi, &h, j->out + lo, j->ldo);
	for (uint32_t t = 0; t < B; t++) {
		float *o = j->out + (size_t)t * j->ldo;
		if (j->down_bias)
			for (uint32_t i = lo; i < hi; i++)
				o[i] += j->down_bias[i];
		if (j->y)
			ffn_axpy(j->y + (size_t)t * j->ldy + lo, j->scale ? j->scale[t] : 1.0f, o + lo, hi - lo);
	}
}

void ffn_axpy(float *y, float s, const float *v, size_t n)
{
	for (size_t i = 0; i < n; i++)
		y[i] = y[i] + s * v[i];
}

int ffn_expert(const struct ffn_layout *L, const void *extent, const float *x, size_t ldx, uint32_t B, float *y,
	       size_t ldy, const float *scale, unsigned flags, int threads)
{
	struct mm_sel sel;
	const struct mm_sel *ops = &sel;
	const bool acc = flags & FFN_ACCUMULATE;

	if (!L || !L->n || !extent || !x || !y || ldx < L->n || ldy < L->n || (flags & ~FFN_ACCUMULATE))
		return -EINVAL;
	if (!B)
		return 0;
	ops_now(&sel);

	const uint32_t n = L->n, m = L->m;
	const bool gptoss = L->kind == MOE_FFN_GPTOSS;
	const uint32_t in_mask = gptoss ? 1u << L->gate_up.dtype
				 : L->kind == MOE_FFN_SILU ? 1u << L->up.dtype
				 : (1u << L->gate.dtype) | (1u << L->up.dtype);
	const bool xbf = ops->bf16_mask & in_mask;
	const bool hbf = ops->bf16_mask & (1u << L->down.dtype);
	const bool xq8 = ops->q8_mask & in_mask;
	const bool hq8 = ops->q8_mask & (1u << L->down.dtype);
	const bool xpm = ops->perm_mask & in_mask;
	const bool hpm = ops->perm_mask & (1u << L->down.dtype);
	const bool xk8 = ops->q8k_mask & in_mask;
	const bool hk8 = ops->q8k_mask & (1u << L->down.dtype);

	/* One allocation for every scratch array; sizes are bounded by the
	 * layout check (n, m <= 2^20) and B (u32), so size_t cannot wrap. */
	size_t nf = (size_t)B * m * 3 + (gptoss ? 2 * (size_t)m + n : 0) + (acc ? (size_t)B * n : 0) +
		    (xpm ? (size_t)B * ldx : 0) + (hpm ? (size_t)B * m : 0);
	size_t nh = (xbf ? (size_t)B * ldx : 0) + (hbf ? (size_t)B * m : 0);
	size_t nq = (xq8 ? (size_t)B * (n / 32) : 0) + (hq8 ? (size_t)B * (m / 32) : 0);
	float *buf = malloc(nf * sizeof(float) + nh * sizeof(uint16_t) + nq * sizeof(struct moe_block_q8_0) + 64);
	/* q8_K blocks hold a float: their own allocation keeps them aligned */
	const size_t nk = (xk8 ? (size_t)B * (n / 256) : 0) + (hk8 ? (size_t)B * (m / 256) : 0);
	struct moe_block_q8_K *kbuf = nk ? malloc(nk * sizeof(*kbuf)) : NULL;
	if (!buf || (nk && !kbuf)) {
		free(buf);
		free(kbuf);
		return -ENOMEM;
	}
	float *f = buf;
	struct expert_job j = { .L = L, .ops = ops, .ext = extent,
				.x = { .f = x, .B = B, .ld = ldx, .ldq = n / 32, .ldqk = n / 256 } };
	j.g = f; /* SWIGLU: g [B x m] then u [B x m]; GPTOSS: gu [B x 2m] */
	j.u = f + (size_t)B * m;
	f += (size_t)B * m * 2;
	j.h = f;
	f += (size_t)B * m;
	if (gptoss) {
		float *gb = f, *db = f + 2 * (size_t)m;
		f += 2 * (size_t)m + n;
		if (L->gate_up_bias.dtype != MOE_DTYPE_INVALID) {
			moe_dequantize_row(L->gate_up_bias.dtype, j.ext + L->gate_up_bias.offset, gb, 2 * (size_t)m);
			j.gu_bias = gb;
		}
		if (L->down_bias.dtype != MOE_DTYPE_INVALID) {
			moe_dequantize_row(L->down_bias.dtype, j.ext + L->down_bias.offset, db, n);
			j.down_bias = db;
		}
	}
	if (xpm) {
		to_perm(x, ldx, B, n, ops->perm_w, f);
		j.x.fp = f;
		f += (size_t)B * ldx;
	}
	if (hpm) {
		j.hp = f;
		f += (size_t)B * m;
	}
	if (acc) {
		j.out = f;
		j.ldo = n;
		f += (size_t)B * n;
		j.y = y;
		j.ldy = ldy;
		j.scale = scale;
	} else {
		j.out = y;
		j.ldo = ldy;
	}
	uint16_t *hp = (uint16_t *)f;
	if (xbf) {
		to_bf16(x, ldx, B, hp, 0, n);
		j.x.bf = hp;
		hp += (size_t)B * ldx;
	}
	if (hbf) {
		j.hb = hp;
		hp += (size_t)B * m;
	}
	struct moe_block_q8_0 *qp = (struct moe_block_q8_0 *)hp;
	if (xq8) {
		to_q8(ops, x, ldx, B, n, qp, n / 32);
		j.x.q8 = qp;
		qp += (size_t)B * (n / 32);
	}
	if (xk8) {
		to_q8k(ops, x, ldx, B, n, kbuf, n / 256);
		j.x.q8k = kbuf;
	}

	run_split(threads, m, 4, expert_phase1, &j);
	if (hpm) /* whole groups of h, so after every thread's phase 1 */
		to_perm(j.h, m, B, m, ops->perm_w, j.hp);
	if (hq8) {
		/* whole 32-column blocks of h, so after every thread's phase 1 */
		to_q8(ops, j.h, m, B, m, qp, m / 32);
		j.hq = qp;
	}
	if (hk8) {
		/* whole 256-column super-blocks of h, likewise */
		j.hk = kbuf + (xk8 ? (size_t)B * (n / 256) : 0);
		to_q8k(ops, j.h, m, B, m, j.hk, m / 256);
	}
	run_split(threads, n, 4, expert_phase2, &j);
	free(buf);
	free(kbuf);
	return 0;
}

int ffn_moe_token(const struct ffn_layout *L, const void *const *extents, const float *w, uint32_t k,
		  const float *x, float *y, int threads)
{
	if (!L || !extents || (!w && k) || !x || !y)
		return -EINVAL;
	memset(y, 0, (size_t)L->n * sizeof(float));
	for (uint32_t i = 0; i < k; i++) {
		if (!extents[i])
			return -EINVAL;
		int rc = ffn_expert(L, extents[i], x, L->n, 1, y, L->n, &w[i], FFN_ACCUMULATE, threads);
		if (rc)
			return rc;
	}
	return 0;
}

/* ---- the CUDA fatbin ------------------------------------------------------ */

#ifdef HAVE_NVCC
extern const unsigned char moe_ffn_fatbin_start[];
extern const unsigned char moe_ffn_fatbin_end[];
#endif

const void *ffn_cuda_fatbin(size_t *len)
{
#ifdef HAVE_NVCC
	if (len)
		*len = (size_t)(moe_ffn_fatbin_end - moe_ffn_fatbin_start);
	return moe_ffn_fatbin_start;
#else
	if (len)
		*len = 0;
	return NULL;
#endif
}

/* ffn.cu's dq() decodes these and nothing else (its default is 0.0f): a
 * launch with another type would compute zeros, so hosts ask first. */
bool ffn_cuda_dtype_supported(enum moe_dtype t)
{
	switch (t) {
	case MOE_DTYPE_F32:
	case MOE_DTYPE_F16:
	case MOE_DTYPE_BF16:
	case MOE_DTYPE_Q8_0:
	case MOE_DTYPE_Q4_0:
	case MOE_DTYPE_MXFP4:
		return true;
	default:
		return false;
	}
}

static int cuda_mat_ok(const struct ffn_mat *M, const char *what, struct moe_error *err)
{
	if (M->rows == 0 || ffn_cuda_dtype_supported(M->dtype))
		return 0;
	return moe_error_set(err, -ENOTSUP,
			     "the CUDA expert FFN has no %s kernel (%s weights); it takes f32, f16, bf16, q8_0, "
			     "q4_0 and mxfp4: compute this expert on the CPU",
			     moe_dtype_name(M->dtype), what);
}

int ffn_cuda_layout_check(const struct ffn_layout *L, struct moe_error *err)
{
	int rc;
	/* ffn.cu computes SwiGLU and GPT-OSS experts only */
	if (L->kind == MOE_FFN_SILU)
		return moe_error_set(err, -ENOTSUP,
				     "the CUDA expert FFN has no gateless (down(silu(up x))) expert: compute it on the CPU");
	if (L->kind == MOE_FFN_GPTOSS) {
		if ((rc = cuda_mat_ok(&L->gate_up, "gate_up", err)))
			return rc;
		if (L->gate_up_bias.dtype != MOE_DTYPE_INVALID && !ffn_cuda_dtype_supported(L->gate_up_bias.dtype))
			return moe_error_set(err, -ENOTSUP, "the CUDA expert FFN has no %s bias",
					     moe_dtype_name(L->gate_up_bias.dtype));
		if (L->down_bias.dtype != MOE_DTYPE_INVALID && !ffn_cuda_dtype_supported(L->down_bias.dtype))
			return moe_error_set(err, -ENOTSUP, "the CUDA expert FFN has no %s bias",
					     moe_dtype_name(L->down_bias.dtype));
	} else if ((rc = cuda_mat_ok(&L->gate, "gate", err)) || (rc = cuda_mat_ok(&L->up, "up", err))) {
		return rc;
	}
	return cuda_mat_ok(&L->down, "down", err);
}
