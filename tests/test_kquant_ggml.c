/* test_kquant_ggml.c - our K-quant code against llama.cpp's ggml itself
 * (the npm prebuilt, configure --with-llama; exit 77 without it).
 *
 * For q4_K, q5_K, q6_K, q3_K, q2_K, iq4_xs and iq4_nl, random rows
 * (several distributions, outliers, all-zero and tiny rows) are quantized by
 * ggml_quantize_chunk:
 * 1. block geometry: ggml's block size and bytes equal dtype.c's;
 * 2. dequantization: moe_dequantize_row equals ggml's to_float BIT FOR BIT;
 * 3. activations: moe_quantize_row_q8_K (and the AVX2 q8_K quantizer)
 *    equals the CPU backend's from_float for q8_K byte for byte (for
 *    iq4_nl, whose dots take q8_0 x: moe_quantize_row_q8_0 and q8_0's);
 * 4. dot products: ffn_matmul on every path this CPU has against the CPU
 *    backend's vec_dot (row by row) and a ggml mul_mat graph (1, 7 and 32
 *    tokens), within the tolerance below
 * 5. whole experts (Q4_K_M-style q4_K/q4_K/q6_K and other mixes): ffn_expert
 *    against ggml's graph of the same FFN (see run_expert).
 *
 * Tolerance. Both sides compute the same exact integer sums of each
 * sub-block (the codes times the same q8_K activations) and differ only in
 * how they scale and add them in f32: ours adds d dx isum - dmin dx imin
 * per super-block (ffn_kq_accum), ggml keeps per-lane partial sums. Each
 * side's error is a few f32 roundings of the terms, so
 *     |ours - ggml| <= 1e-5 * T,  T = sum_c (|d sc q_c| + |dmin m_c|) |xq_c|
 * (T: the magnitudes before the min cancels, from dequantizing copies with
 * dmin / d zeroed; 1e-5 is ~170 f32 unit roundoffs, far above the ~2 nb + 8
 * expected and far below any decoding slip, which moves a result by about
 * one code step, 1e-2 * T or more). The largest ratio seen is printed. */
#include "config.h"

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "ffn.h"
#include "ffn_impl.h"
#include "model.h"
#include "pack.h"

#ifndef MOE_HAVE_LLAMA
/* TAP, as every non-shell test here (Makefile.am's LOG_DRIVER). */
int main(void)
{
	printf("1..0 # SKIP built without the llama.cpp peer (configure --with-llama)\n");
	return 77;
}
#else

#include "ggml_peer.h"

#define TOL 1e-5

static int failures;
static double worst_ratio;

#define CHECK(cond, ...) \
	do { \
		if (!(cond)) { \
			failures++; \
			if (failures < 20) { \
				printf("# FAIL %s:%d: ", __FILE__, __LINE__); \
				printf(__VA_ARGS__); \
				putchar('\n'); \
			} \
		} \
	} while (0)

static uint64_t rng = 0x1234567;
static uint32_t rnd(void)
{
	rng = rng * 6364136223846793005ull + 1442695040888963407ull;
	return (uint32_t)(rng >> 33);
}
static float unif(void) { return (float)(rnd() >> 8) * (1.0f / 8388608.0f) - 1.0f; }

/* Row r of a test matrix: a mix of what checkpoints and activations hold. */
static void fill_row(float *x, uint32_t n, uint32_t r)
{
	const float scale = ldexpf(1.0f, (int)(r % 9) * 2 - 10);
	for (uint32_t c = 0; c < n; c++) {
		switch (r % 6) {
		case 0: x[c] = unif() * scale; break;
		case 1: x[c] = (unif() + unif() + unif()) * scale; break;      /* bell-ish */
		case 2: x[c] = unif() * scale + (c % 97 == 3 ? 20 * scale : 0); break; /* outliers */
		case 3: x[c] = fabsf(unif()) * scale; break;                    /* one sign */
		case 4: x[c] = (c / 256) % 2 ? 0.0f : unif() * scale; break;     /* zero blocks */
		default: x[c] = unif() * 1e-30f; break;                         /* tiny */
		}
	}
}

static const enum moe_dtype kq[] = { MOE_DTYPE_Q4_K, MOE_DTYPE_Q5_K, MOE_DTYPE_Q6_K, MOE_DTYPE_Q3_K,
				     MOE_DTYPE_Q2_K, MOE_DTYPE_IQ4_XS, MOE_DTYPE_IQ4_NL };

/* |d sc q| + |dmin m| per element (see the tolerance). */
static void parts_abs(enum moe_dtype t, const uint8_t *w, size_t nblk, double *out)
{
	const uint32_t bb = moe_dtype_block_bytes(t), be = moe_dtype_block_elems(t);
	int od, om;
	switch (t) {
	case MOE_DTYPE_Q4_K: case MOE_DTYPE_Q5_K: od = 0; om = 2; break;
	case MOE_DTYPE_IQ4_XS: case MOE_DTYPE_IQ4_NL: od = 0; om = -1; break;
	case MOE_DTYPE_Q6_K: od = 208; om = -1; break;
	case MOE_DTYPE_Q3_K: od = 108; om = -1; break;
	default: od = 80; om = 82; break;
	}
	uint8_t *a = malloc(nblk * bb), *b = malloc(nblk * bb);
	float *fa = malloc(nblk * be * sizeof(float)), *fb = malloc(nblk * be * sizeof(float));
	memcpy(a, w, nblk * bb);
	memcpy(b, w, nblk * bb);
	for (size_t k = 0; k < nblk; k++) {
		memset(b + k * bb + od, 0, 2);
		if (om >= 0)
			memset(a + k * bb + om, 0, 2);
	}
	moe_dequantize_row(t, a, fa, nblk * be);
	moe_dequantize_row(t, b, fb, nblk * be);
	for (size_t i = 0; i < nblk * be; i++)
		out[i] = fabs((double)fa[i]) + (om >= 0 ? fabs((double)fb[i]) : 0.0);
	free(a);
	free(b);
	free(fa);
	free(fb);
}

static void check_close(const char *what, enum moe_dtype t, double ours, double theirs, double T)
{
	const double diff = fabs(ours - theirs), bound = TOL * T + 1e-30;
	if (T > 0 && diff / T > worst_ratio)
		worst_ratio = diff / T;
	CHECK(diff <= bound, "%s %s: ours %.9g ggml %.9g (|diff| %.3g > %.3g)", what, moe_dtype_name(t), ours, theirs,
	      diff, bound);
}

/* Quantized activations equal, block by block. ggml leaves the bsums of
 * an all-zero q8_K block (d 0) unwritten, and they are never used there
 * (they multiply d 0): only d and qs are compared for such blocks. */
static bool same_act(bool k8, const uint8_t *ours, const uint8_t *ggml, size_t bytes)
{
	if (!k8)
		return memcmp(ours, ggml, bytes) == 0;
	const struct moe_block_q8_K *a = (const void *)ours, *b = (const void *)ggml;
	for (size_t i = 0; i < bytes / sizeof(*a); i++) {
		if (memcmp(&a[i].d, &b[i].d, 4) != 0 || memcmp(a[i].qs, b[i].qs, 256) != 0)
			return false;
		if (b[i].d != 0.0f && memcmp(a[i].bsums, b[i].bsums, sizeof(a[i].bsums)) != 0)
			return false;
	}
	return true;
}

static int tap_n;

static void tap(int failures_before, const char *what, enum moe_dtype t)
{
	printf("%s %d - %s %s\n", failures == failures_before ? "ok" : "not ok", ++tap_n, moe_dtype_name(t), what);
}

static void run_type(struct ggml_peer *p, enum moe_dtype t)
{
	int f0 = failures;
	const uint32_t rows = 24, n = 1024, nb = n / moe_dtype_block_elems(t);
	const enum ggml_type gt = ggml_peer_type(t);
	uint64_t rb = 0;
	CHECK(moe_dtype_row_bytes(t, n, &rb), "%s row bytes", moe_dtype_name(t));
	CHECK(ggml_blck_size(gt) == (int64_t)moe_dtype_block_elems(t) && ggml_type_size(gt) == moe_dtype_block_bytes(t) &&
		      ggml_row_size(gt, n) == rb,
	      "%s geometry: ggml %lld / %zu", moe_dtype_name(t), (long long)ggml_blck_size(gt), ggml_type_size(gt));

	float *src = malloc(sizeof(float) * rows * n), *ours = malloc(sizeof(float) * rows * n);
	float *theirs = malloc(sizeof(float) * rows * n);
	uint8_t *w = malloc(rb * rows);
	for (uint32_t r = 0; r < rows; r++)
		fill_row(src + (size_t)r * n, n, r);
	size_t got = ggml_quantize_chunk(gt, src, w, 0, rows, n, NULL);
	CHECK(got == rb * rows, "%s: ggml_quantize_chunk wrote %zu bytes, expected %llu", moe_dtype_name(t), got,
	      (unsigned long long)(rb * rows));

	/* 2. dequantization, bit for bit */
	const struct ggml_type_traits *tt = ggml_get_type_traits(gt);
	size_t mism = 0;
	for (uint32_t r = 0; r < rows; r++) {
		tt->to_float(w + rb * r, theirs + (size_t)r * n, n);
		moe_dequantize_row(t, w + rb * r, ours + (size_t)r * n, n);
	}
	for (size_t i = 0; i < (size_t)rows * n; i++)
		if (memcmp(&ours[i], &theirs[i], 4) != 0 && mism++ < 3)
			printf("#   %s element %zu: ours %a ggml %a\n", moe_dtype_name(t), i, (double)ours[i],
			       (double)theirs[i]);
	CHECK(mism == 0, "%s: %zu of %u dequantized values differ from ggml's to_float", moe_dtype_name(t), mism,
	      rows * n);
	tap(f0, "geometry, and dequantization equals ggml's to_float bit for bit", t);
	f0 = failures;

	/* activations: 32 tokens */
	const uint32_t B = 32;
	float *x = malloc(sizeof(float) * B * n);
	for (uint32_t tk = 0; tk < B; tk++)
		fill_row(x + (size_t)tk * n, n, tk * 7 + 1);
	/* x as the kernels take it: q8_K for the super-block types, q8_0 for
	 * iq4_nl (ggml's vec_dot_type, and our FFN_Q8_INT) */
	const bool k8 = moe_dtype_block_elems(t) == 256;
	const enum ggml_type at = k8 ? GGML_TYPE_Q8_K : GGML_TYPE_Q8_0;
	const size_t arb = k8 ? (n / 256) * sizeof(struct moe_block_q8_K) : (n / 32) * sizeof(struct moe_block_q8_0);
	const struct ggml_type_traits_cpu *q8t = p->traits_cpu(at);
	const struct ggml_type_traits_cpu *wt = p->traits_cpu(gt);
	CHECK(wt->vec_dot_type == at, "%s: ggml's vec_dot_type is %d, not %d", moe_dtype_name(t), (int)wt->vec_dot_type,
	      (int)at);
	uint8_t *xq = malloc(arb * B), *xg = malloc(arb * B);
	double *wa = malloc(sizeof(double) * rows * n), *xd = malloc(sizeof(double) * B * n);
	float *xf = malloc(sizeof(float) * n);
	parts_abs(t, w, (size_t)rows * nb, wa);
	for (uint32_t tk = 0; tk < B; tk++) {
		if (k8)
			moe_quantize_row_q8_K(x + (size_t)tk * n, (void *)(xq + arb * tk), n);
		else
			moe_quantize_row_q8_0(x + (size_t)tk * n, (void *)(xq + arb * tk), n);
		q8t->from_float(x + (size_t)tk * n, xg + arb * tk, n);
		if (k8) {
			const struct moe_block_q8_K *b = (const void *)(xq + arb * tk);
			for (uint32_t c = 0; c < n; c++)
				xd[(size_t)tk * n + c] = (double)b[c / 256].d * b[c / 256].qs[c % 256];
		} else {
			moe_dequantize_row(MOE_DTYPE_Q8_0, xq + arb * tk, xf, n);
			for (uint32_t c = 0; c < n; c++)
				xd[(size_t)tk * n + c] = xf[c];
		}
	}
	CHECK(same_act(k8, xq, xg, arb * B), "%s: our quantized x differs from ggml's from_float", k8 ? "q8_K" : "q8_0");

	/* T per (row, token) */
	double *T = malloc(sizeof(double) * rows * B);
	for (uint32_t tk = 0; tk < B; tk++)
		for (uint32_t r = 0; r < rows; r++) {
			double s = 0;
			for (uint32_t c = 0; c < n; c++)
				s += wa[(size_t)r * n + c] * fabs(xd[(size_t)tk * n + c]);
			T[(size_t)tk * rows + r] = s;
		}

	/* 4a. vec_dot, row by row, against ffn_matmul on every path */
	float *vd = malloc(sizeof(float) * rows * B), *y = malloc(sizeof(float) * rows * B);
	for (uint32_t tk = 0; tk < B; tk++)
		for (uint32_t r = 0; r < rows; r++)
			wt->vec_dot((int)n, &vd[(size_t)tk * rows + r], 0, w + rb * r, 0, xg + arb * tk, 0, 1);
	for (int isa = 0; isa < FFN_ISA_COUNT; isa++) {
		if (!ffn_isa_supported((enum ffn_isa)isa))
			continue;
		ffn_set_isa((enum ffn_isa)isa);
		if (k8 && isa != FFN_ISA_REF) {
			uint8_t *xa = malloc(arb * B);
			for (uint32_t tk = 0; tk < B; tk++)
				ffn_quant_q8k_avx2(x + (size_t)tk * n, (void *)(xa + arb * tk), n);
			CHECK(same_act(k8, xa, xg, arb * B), "q8_K: the AVX2 quantizer differs from ggml's");
			free(xa);
		}
		CHECK(ffn_matmul(t, w, rows, n, x, n, B, y, rows, 1) == 0, "ffn_matmul");
		for (size_t i = 0; i < (size_t)rows * B; i++)
			check_close(ffn_isa_name((enum ffn_isa)isa), t, y[i], vd[i], T[i]);
	}
	ffn_set_isa(ffn_isa_best());

	/* 4b. a ggml mul_mat graph on the CPU backend, 1, 7 and 32 tokens */
	static const uint32_t Bs[] = { 1, 7, 32 };
	for (size_t bi = 0; bi < 3; bi++) {
		struct ggml_peer_graph g;
		float *gy = malloc(sizeof(float) * rows * Bs[bi]);
		if (ggml_peer_graph_init(p, &g, t, w, t, NULL, t, NULL, n, rows, Bs[bi], NULL, 0) != 0) {
			CHECK(0, "%s: ggml graph set-up failed", moe_dtype_name(t));
			free(gy);
			continue;
		}
		CHECK(ggml_peer_graph_run(p, &g, x, gy) == 0, "%s: ggml graph compute failed", moe_dtype_name(t));
		CHECK(ffn_matmul(t, w, rows, n, x, n, Bs[bi], y, rows, 1) == 0, "ffn_matmul");
		for (size_t i = 0; i < (size_t)rows * Bs[bi]; i++)
			check_close("mul_mat", t, y[i], gy[i], T[i]);
		ggml_peer_graph_free(&g);
		free(gy);
	}
	tap(f0, k8 ? "q8_K activations equal ggml's; dots within 1e-5 T of vec_dot (every path) and mul_mat (1, 7, 32 tokens)"
		   : "q8_0 activations equal ggml's; dots within 1e-5 T of vec_dot (every path) and mul_mat (1, 7, 32 tokens)",
	    t);

	free(src);
	free(ours);
	free(theirs);
	free(w);
	free(x);
	free(xq);
	free(xg);
	free(xd);
	free(xf);
	free(wa);
	free(T);
	free(vd);
	free(y);
}

/* 5. A whole SwiGLU expert (Q4_K_M-style and other mixes) through
 * ffn_expert and through a ggml graph (mul_mat, silu, mul, mul_mat) on the
 * same weights: max |ours - ggml| <= 1e-3 max |ggml| per batch. Beyond the
 * dot-product differences above, h differs by ggml's own silu (its expf)
 * and may then round to a neighbouring q8_K code (or bf16 / q8_0) before
 * the down projection: at most one code step of h, 1/127 of a 256-column
 * block's max, in a few elements; 1e-3 of the output's max covers that,
 * a wrong sub-block scale or layout moves the output by far more. */
static void run_expert(struct ggml_peer *p, enum moe_dtype tg, enum moe_dtype tu, enum moe_dtype td)
{
	const uint32_t n = 512, m = 256;
	static const uint32_t Bs[] = { 1, 5, 16 };
	const int f0 = failures;
	struct moe_model_config cfg;
	struct pack_part_desc parts[3];
	const enum moe_dtype ts[3] = { tg, tu, td };
	uint64_t off = 0;

	memset(&cfg, 0, sizeof(cfg));
	moe_model_set_family_defaults(&cfg, MOE_FAMILY_QWEN3_MOE);
	cfg.hidden = n;
	cfg.expert_width = m;
	for (int i = 0; i < 3; i++) {
		const uint32_t rows = i < 2 ? m : n, cols = i < 2 ? n : m;
		uint64_t rb = 0;
		moe_dtype_row_bytes(ts[i], cols, &rb);
		parts[i] = (struct pack_part_desc){ i == 0 ? PACK_ROLE_GATE : i == 1 ? PACK_ROLE_UP : PACK_ROLE_DOWN,
						    ts[i], rows, cols, off, rb * rows };
		off += (rb * rows + 63) & ~63ull;
	}
	uint8_t *ext = calloc(1, off);
	float *src = malloc(sizeof(float) * n * m);
	for (int i = 0; i < 3; i++) {
		for (uint32_t r = 0; r < parts[i].rows; r++)
			fill_row(src + (size_t)r * parts[i].cols, parts[i].cols, 0); /* uniform, scale 2^-10 */
		for (size_t k = 0; k < (size_t)parts[i].rows * parts[i].cols; k++)
			src[k] *= 30.0f;
		if (ts[i] == MOE_DTYPE_BF16) {
			for (size_t k = 0; k < (size_t)parts[i].rows * parts[i].cols; k++) {
				const uint16_t h = moe_f32_to_bf16(src[k]);
				memcpy(ext + parts[i].offset + 2 * k, &h, 2);
			}
		} else {
			ggml_quantize_chunk(ggml_peer_type(ts[i]), src, ext + parts[i].offset, 0, parts[i].rows,
					    parts[i].cols, NULL);
		}
	}
	struct ffn_layout L;
	struct moe_error err = { { 0 } };
	CHECK(ffn_layout_init(&L, &cfg, parts, 3, off, &err) == 0, "expert layout: %s", err.msg);
	float *x = malloc(sizeof(float) * 16 * n), *y = malloc(sizeof(float) * 16 * n), *g = malloc(sizeof(float) * 16 * n);
	for (uint32_t tk = 0; tk < 16; tk++)
		fill_row(x + (size_t)tk * n, n, tk % 4); /* several shapes of x */
	double worst = 0;
	for (size_t bi = 0; bi < sizeof(Bs) / sizeof(Bs[0]) && failures == f0; bi++) {
		struct ggml_peer_graph gr;
		if (ggml_peer_graph_init(p, &gr, tg, ext + parts[0].offset, tu, ext + parts[1].offset, td,
					 ext + parts[2].offset, n, m, Bs[bi], NULL, 0) != 0) {
			CHECK(0, "expert graph set-up failed");
			break;
		}
		CHECK(ggml_peer_graph_run(p, &gr, x, g) == 0, "expert graph compute failed");
		CHECK(ffn_expert(&L, ext, x, n, Bs[bi], y, n, NULL, 0, 1) == 0, "ffn_expert");
		for (uint32_t tk = 0; tk < Bs[bi]; tk++) {
			double md = 0, mr = 0;
			for (uint32_t k = 0; k < n; k++) {
				md = fmax(md, fabs((double)y[(size_t)tk * n + k] - g[(size_t)tk * n + k]));
				mr = fmax(mr, fabs((double)g[(size_t)tk * n + k]));
			}
			if (mr > 0)
				worst = fmax(worst, md / mr);
			CHECK(mr > 0 && md <= 1e-3 * mr, "expert %s/%s/%s B=%u token %u: max|ours - ggml| %.3g, max|ggml| %.3g",
			      moe_dtype_name(tg), moe_dtype_name(tu), moe_dtype_name(td), Bs[bi], tk, md, mr);
		}
		ggml_peer_graph_free(&gr);
	}
	printf("%s %d - expert %s/%s/%s (1, 5, 16 tokens) within 1e-3 of ggml's graph (worst %.2g)\n",
	       failures == f0 ? "ok" : "not ok", ++tap_n, moe_dtype_name(tg), moe_dtype_name(tu), moe_dtype_name(td),
	       worst);
	free(ext);
	free(src);
	free(x);
	free(y);
	free(g);
}

static const enum moe_dtype experts[][3] = {
	{ MOE_DTYPE_Q4_K, MOE_DTYPE_Q4_K, MOE_DTYPE_Q6_K }, { MOE_DTYPE_Q5_K, MOE_DTYPE_Q5_K, MOE_DTYPE_Q6_K },
	{ MOE_DTYPE_Q3_K, MOE_DTYPE_Q3_K, MOE_DTYPE_Q5_K }, { MOE_DTYPE_Q2_K, MOE_DTYPE_Q2_K, MOE_DTYPE_Q4_K },
	{ MOE_DTYPE_IQ4_XS, MOE_DTYPE_IQ4_XS, MOE_DTYPE_IQ4_NL }, { MOE_DTYPE_Q4_K, MOE_DTYPE_Q4_K, MOE_DTYPE_Q8_0 },
};

int main(void)
{
	struct ggml_peer p;
	char why[600];
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (ggml_peer_open(&p, 1, why, sizeof(why)) != 0) {
		printf("1..0 # SKIP %s\n", why);
		return 77;
	}
	const size_t ne = sizeof(experts) / sizeof(experts[0]);
	printf("1..%zu\n# ggml CPU backend: %s\n", 2 * sizeof(kq) / sizeof(kq[0]) + ne, p.lib);
	ffn_set_q8_mode(FFN_Q8_INT);
	for (size_t i = 0; i < sizeof(kq) / sizeof(kq[0]); i++)
		run_type(&p, kq[i]);
	for (size_t i = 0; i < ne; i++)
		run_expert(&p, experts[i][0], experts[i][1], experts[i][2]);
	ggml_peer_close(&p);
	printf("# largest |ours - ggml| / T: %.3g (tolerance %.0e); %d failures\n", worst_ratio, TOL, failures);
	return failures ? 1 : 0;
}
#endif
