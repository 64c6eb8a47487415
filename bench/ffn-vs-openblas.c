/* ffn-vs-openblas - one routed expert of DeepSeek-V2-Lite's shape (hidden
 * n = 2048, width m = 1408: gate and up [m x n], down [n x m]) through our
 * CPU kernels and through the peers, in the same run, interleaved:
 *   - OpenBLAS sgemv (1 token) / sgemm (batches), f32 weights;
 *   - oneDNN matmul with bf16 weights and bf16 activations (batches);
 *   - a read-only vector sum over the same cold buffers (the DRAM limit),
 *     one stream and four (the faster is the bound).
 * Weights are cold: each call uses the next of several expert copies that
 * together exceed 1 GiB (256 MiB with --quick), so they stream from DRAM as
 * right after an expert is loaded (machine.md section 4).
 *
 * Prints a table (tokens/s, weight GB/s, us per call; medians over reps),
 * the target checks, and last:
 *   ffn-vs-openblas: ratio=X (ours bf16 / OpenBLAS f32 sgemv, tokens/s, 1 token)
 *
 * Usage: ffn-vs-openblas [--quick] [--reps N]
 * One thread throughout (OMP_NUM_THREADS / openblas_set_num_threads(1)). */
#include "config.h"

#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "dtype.h"
#include "ffn.h"
#include "model.h"
#include "pack.h"
#include "util.h"

#include "ffn_bench.h"

#ifdef HAVE_OPENBLAS
#include <cblas.h>
void openblas_set_num_threads(int);
char *openblas_get_corename(void);
#endif
#ifdef HAVE_DNNL
#include <oneapi/dnnl/dnnl.h>
#endif

#define N_HID 2048
#define M_WID 1408

static bool quick;
static int reps = 5;
static double min_time = 0.25; /* seconds per measurement */

/* ---- ours ------------------------------------------------------------------- */

struct ours {
	struct ffn_layout L;
	struct fb_copies cp;
	const float *x;
	float *y;
	uint32_t B;
	enum moe_dtype dt;
};

static void ours_run(void *p)
{
	struct ours *o = p;
	if (ffn_expert(&o->L, fb_copies_next(&o->cp), o->x, N_HID, o->B, o->y, N_HID, NULL, 0, 1)) {
		fprintf(stderr, "ffn-vs-openblas: ffn_expert failed\n");
		exit(1);
	}
}

/* Rows of cols floats to dt (the types this benchmark compares). */
static void encode_row(enum moe_dtype dt, const float *row, uint32_t cols, uint8_t *dst)
{
	switch (dt) {
	case MOE_DTYPE_F32: memcpy(dst, row, 4ull * cols); break;
	case MOE_DTYPE_BF16:
		for (uint32_t c = 0; c < cols; c++) {
			uint16_t h = moe_f32_to_bf16(row[c]);
			memcpy(dst + 2 * c, &h, 2);
		}
		break;
	case MOE_DTYPE_Q8_0: moe_quantize_row_q8_0(row, (void *)dst, cols); break;
	case MOE_DTYPE_Q4_0: moe_quantize_row_q4_0(row, (void *)dst, cols); break;
	default: abort();
	}
}

static void ours_init(struct ours *o, enum moe_dtype dt)
{
	size_t bytes;
	uint8_t *one = fb_expert(&o->L, MOE_FAMILY_DEEPSEEK_V2, dt, N_HID, M_WID, encode_row, &bytes, "ffn-vs-openblas");

	fb_copies_init(&o->cp, one, bytes, quick ? (256u << 20) : (1100u << 20), "ffn-vs-openblas");
	free(one);
	o->dt = dt;
}

/* ---- OpenBLAS f32 ------------------------------------------------------------ */

static float silu_mul(float g, float u)
{
	return g / (1.0f + expf(-g)) * u;
}

#ifdef HAVE_OPENBLAS
struct blas {
	struct fb_copies cp; /* gate | up | down, f32 */
	const float *x;
	float *g, *u, *y;
	uint32_t B;
};

static void blas_run(void *p)
{
	struct blas *b = p;
	const float *w = (const float *)(const void *)fb_copies_next(&b->cp);
	const float *wg = w, *wu = w + (size_t)M_WID * N_HID, *wd = w + 2 * (size_t)M_WID * N_HID;
	if (b->B == 1) {
		cblas_sgemv(CblasRowMajor, CblasNoTrans, M_WID, N_HID, 1.0f, wg, N_HID, b->x, 1, 0.0f, b->g, 1);
		cblas_sgemv(CblasRowMajor, CblasNoTrans, M_WID, N_HID, 1.0f, wu, N_HID, b->x, 1, 0.0f, b->u, 1);
		for (int i = 0; i < M_WID; i++)
			b->g[i] = silu_mul(b->g[i], b->u[i]);
		cblas_sgemv(CblasRowMajor, CblasNoTrans, N_HID, M_WID, 1.0f, wd, M_WID, b->g, 1, 0.0f, b->y, 1);
	} else {
		const int B = (int)b->B;
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, B, M_WID, N_HID, 1.0f, b->x, N_HID, wg, N_HID,
			    0.0f, b->g, M_WID);
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, B, M_WID, N_HID, 1.0f, b->x, N_HID, wu, N_HID,
			    0.0f, b->u, M_WID);
		for (size_t i = 0; i < (size_t)B * M_WID; i++)
			b->g[i] = silu_mul(b->g[i], b->u[i]);
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, B, N_HID, M_WID, 1.0f, b->g, M_WID, wd, M_WID,
			    0.0f, b->y, N_HID);
	}
}
#endif

/* ---- oneDNN bf16 --------------------------------------------------------------- */

#ifdef HAVE_DNNL
struct dnn {
	struct fb_copies cp;   /* gate | up | down, bf16 */
	dnnl_engine_t eng;
	dnnl_stream_t st;
	dnnl_primitive_t mm_in, mm_dn; /* [B x n] x [n x m] and [B x m] x [m x n] */
	dnnl_memory_desc_t src_in, wei_in, dst_in, src_dn, wei_dn, dst_dn;
	uint16_t *xb, *hb;
	const float *x;
	float *g, *u, *y;
	uint32_t B;
	bool ok;
};

static bool dnnl_mm(struct dnn *d, int B, int K, int N, dnnl_memory_desc_t *src, dnnl_memory_desc_t *wei,
		    dnnl_memory_desc_t *dst, dnnl_primitive_t *prim)
{
	dnnl_dims_t sd = { B, K }, ss = { K, 1 }, wd = { K, N }, ws = { 1, K }, dd = { B, N }, ds = { N, 1 };
	dnnl_matmul_desc_t desc;
	dnnl_primitive_desc_t pd;
	/* weights stored [N x K] row-major, i.e. the K x N matrix with strides (1, K) */
	if (dnnl_memory_desc_init_by_strides(src, 2, sd, dnnl_bf16, ss) ||
	    dnnl_memory_desc_init_by_strides(wei, 2, wd, dnnl_bf16, ws) ||
	    dnnl_memory_desc_init_by_strides(dst, 2, dd, dnnl_f32, ds) ||
	    dnnl_matmul_desc_init(&desc, src, wei, NULL, dst) ||
	    dnnl_primitive_desc_create(&pd, &desc, NULL, d->eng, NULL))
		return false;
	bool ok = dnnl_primitive_create(prim, pd) == dnnl_success;
	dnnl_primitive_desc_destroy(pd);
	return ok;
}

static bool exec_mm(struct dnn *d, dnnl_primitive_t p, const dnnl_memory_desc_t *smd, void *s,
		    const dnnl_memory_desc_t *wmd, const void *w, const dnnl_memory_desc_t *dmd, void *o)
{
	dnnl_memory_t ms, mw, mo;
	bool ok = !dnnl_memory_create(&ms, smd, d->eng, s) && !dnnl_memory_create(&mw, wmd, d->eng, (void *)w) &&
		  !dnnl_memory_create(&mo, dmd, d->eng, o);
	if (ok) {
		dnnl_exec_arg_t args[3] = { { DNNL_ARG_SRC, ms }, { DNNL_ARG_WEIGHTS, mw }, { DNNL_ARG_DST, mo } };
		ok = !dnnl_primitive_execute(p, d->st, 3, args) && !dnnl_stream_wait(d->st);
		dnnl_memory_destroy(ms);
		dnnl_memory_destroy(mw);
		dnnl_memory_destroy(mo);
	}
	return ok;
}

static void dnn_run(void *p)
{
	struct dnn *d = p;
	const uint16_t *w = (const uint16_t *)(const void *)fb_copies_next(&d->cp);
	const uint16_t *wg = w, *wu = w + (size_t)M_WID * N_HID, *wd = w + 2 * (size_t)M_WID * N_HID;
	const size_t B = d->B;
	/* x arrives as f32 (as our kernels get it): the conversion is part of the call */
	for (size_t i = 0; i < B * N_HID; i++)
		d->xb[i] = moe_f32_to_bf16(d->x[i]);
	bool ok = exec_mm(d, d->mm_in, &d->src_in, d->xb, &d->wei_in, wg, &d->dst_in, d->g) &&
		  exec_mm(d, d->mm_in, &d->src_in, d->xb, &d->wei_in, wu, &d->dst_in, d->u);
	for (size_t i = 0; ok && i < B * M_WID; i++)
		d->hb[i] = moe_f32_to_bf16(silu_mul(d->g[i], d->u[i]));
	ok = ok && exec_mm(d, d->mm_dn, &d->src_dn, d->hb, &d->wei_dn, wd, &d->dst_dn, d->y);
	if (!ok) {
		fprintf(stderr, "ffn-vs-openblas: oneDNN execution failed\n");
		exit(1);
	}
}
#endif

/* ---- read-only bandwidth --------------------------------------------------------- */

/* Two ways to read a cold copy: one sequential stream, and four streams
 * (one per quarter of the copy, advancing together), which is how our
 * one-token kernels read a matrix (ffn_simd.h); on the AMD EPYC VM four
 * distant streams read 10-30% faster than one. The bound the checks use is
 * the faster of the two, measured in the same run. */
struct rsum {
	struct fb_copies *cp;
	int streams;          /* 1 or 4 */
	volatile double sink; /* keeps the compiler from dropping the (pure) sums */
};

/* One body for both widths: W floats per vector, four accumulators, either
 * four distant streams or one stream four vectors at a time. */
#define RSUM_BODY(V, W, ZERO, ADD, LOAD)                                          \
	V a0 = ZERO(), a1 = a0, a2 = a0, a3 = a0;                                  \
	if (streams == 4) {                                                        \
		const size_t q = n / 4 / (W) * (W);                                \
		const float *p1 = p + q, *p2 = p + 2 * q, *p3 = p + 3 * q;         \
		for (size_t i = 0; i < q; i += (W)) {                              \
			a0 = ADD(a0, LOAD(p + i));                                 \
			a1 = ADD(a1, LOAD(p1 + i));                                \
			a2 = ADD(a2, LOAD(p2 + i));                                \
			a3 = ADD(a3, LOAD(p3 + i));                                \
		}                                                                  \
	} else {                                                                   \
		for (size_t i = 0; i + 4 * (W) <= n; i += 4 * (W)) {               \
			a0 = ADD(a0, LOAD(p + i));                                 \
			a1 = ADD(a1, LOAD(p + i + (W)));                           \
			a2 = ADD(a2, LOAD(p + i + 2 * (W)));                       \
			a3 = ADD(a3, LOAD(p + i + 3 * (W)));                       \
		}                                                                  \
	}                                                                          \
	V sum = ADD(ADD(a0, a1), ADD(a2, a3))

__attribute__((target("avx512f"))) static double sum512(const float *p, size_t n, int streams)
{
	RSUM_BODY(__m512, 16, _mm512_setzero_ps, _mm512_add_ps, _mm512_load_ps);
	return _mm512_reduce_add_ps(sum);
}

__attribute__((target("avx2"))) static double sum256(const float *p, size_t n, int streams)
{
	RSUM_BODY(__m256, 8, _mm256_setzero_ps, _mm256_add_ps, _mm256_load_ps);
	float t[8];
	_mm256_storeu_ps(t, sum);
	return (double)t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}

static bool have512;

static void rsum_run(void *p)
{
	struct rsum *r = p;
	const float *b = (const float *)(const void *)fb_copies_next(r->cp);
	const size_t nf = r->cp->stride / 4; /* a multiple of 1024: the quarters are whole vectors */
	r->sink += have512 ? sum512(b, nf, r->streams) : sum256(b, nf, r->streams);
}

/* ---- main ------------------------------------------------------------------------ */

struct row {
	char name[48];
	uint32_t B;
	double s;      /* median CPU seconds per call */
	double wall;   /* median wall seconds per call */
	double bytes;  /* weight bytes per call */
	bool valid;
};

static void print_row(const struct row *r)
{
	if (!r->valid) {
		printf("%-30s %4u %10s %8s %10s %10s\n", r->name, r->B, "n/a", "n/a", "n/a", "n/a");
		return;
	}
	if (r->B)
		printf("%-30s %4u %10.1f %8.2f %10.1f %10.1f\n", r->name, r->B, r->B / r->s, r->bytes / r->s * 1e-9,
		       r->s * 1e6, r->wall * 1e6);
	else
		printf("%-30s %4s %10s %8.2f %10.1f %10.1f\n", r->name, "-", "-", r->bytes / r->s * 1e-9, r->s * 1e6,
		       r->wall * 1e6);
}


int main(int argc, char **argv)
{
	for (int i = 1, k; i < argc; i++) {
		if ((k = fb_common_opt(argc, argv, i, &quick, &reps)))
			i += k - 1;
		else {
			fprintf(stderr, "usage: %s [--quick] [--reps N]\n", argv[0]);
			return 2;
		}
	}
	fb_settle_opts(quick, &reps, &min_time);
	__builtin_cpu_init();
	have512 = __builtin_cpu_supports("avx512f");
	char la[128];
	fb_load_avg(la, sizeof(la));
	const char *ct = getenv("OPENBLAS_CORETYPE");
	printf("ffn-vs-openblas: DeepSeek-V2-Lite expert n=%d m=%d, one thread, cold weights (%s MiB rotation), "
	       "%d reps x >= %.2f s, medians\n", N_HID, M_WID, quick ? "256" : "1100", reps, min_time);
#ifdef HAVE_OPENBLAS
	openblas_set_num_threads(1);
	printf("our path: %s; OpenBLAS core: %s (OPENBLAS_CORETYPE=%s); loadavg at start: %s\n",
	       ffn_isa_name(ffn_get_isa()), openblas_get_corename(), ct ? ct : "(unset)", la);
#else
	printf("our path: %s; OpenBLAS: not built; loadavg at start: %s\n", ffn_isa_name(ffn_get_isa()), la);
#endif

	static const uint32_t Bs[] = { 1, 16, 64 };
	/* q8_0 and q4_0 twice: exact (weights widened, f32 x) and int (x
	 * quantized to q8_0, integer dot; FFN_Q8_INT) */
	static const enum moe_dtype dts[] = { MOE_DTYPE_F32, MOE_DTYPE_BF16, MOE_DTYPE_Q8_0, MOE_DTYPE_Q8_0,
					      MOE_DTYPE_Q4_0, MOE_DTYPE_Q4_0 };
	static const bool q8int[] = { false, false, false, true, false, true };
	enum { ND = 6 };
	struct row rows[32];
	int nr = 0;
	double s_ours[ND][3], s_blas[3] = { 0 }, s_dnn[3] = { 0 };
	struct fb_tm m;
	bool blas_ok = false, dnn_ok = false;
	float *x = malloc(sizeof(float) * 64 * N_HID), *y = malloc(sizeof(float) * 64 * N_HID);
	uint64_t seed = 3;
	for (int i = 0; i < 64 * N_HID; i++)
		x[i] = fb_frand(&seed);
	const double f32_bytes = 3.0 * N_HID * M_WID * 4;

	/* f32 first: ours and OpenBLAS share the same cold copies, interleaved */
	for (size_t d = 0; d < ND; d++) {
		struct ours o;
		ffn_set_q8_mode(q8int[d] ? FFN_Q8_INT : FFN_Q8_EXACT);
		ours_init(&o, dts[d]);
		o.x = x;
		o.y = y;
#ifdef HAVE_OPENBLAS
		struct blas b = { .x = x, .g = malloc(sizeof(float) * 64 * M_WID),
				  .u = malloc(sizeof(float) * 64 * M_WID), .y = y };
		if (dts[d] == MOE_DTYPE_F32)
			b.cp = o.cp; /* the f32 layout is gate | up | down, 4 KiB aligned: the same bytes */
#endif
#ifdef HAVE_DNNL
		struct dnn dn = { 0 };
		if (dts[d] == MOE_DTYPE_BF16) {
			dn.cp = o.cp;
			dn.ok = !dnnl_engine_create(&dn.eng, dnnl_cpu, 0) && !dnnl_stream_create(&dn.st, dn.eng, dnnl_stream_default_flags);
			dn.xb = malloc(2 * 64 * N_HID);
			dn.hb = malloc(2 * 64 * M_WID);
			dn.g = malloc(sizeof(float) * 64 * M_WID);
			dn.u = malloc(sizeof(float) * 64 * M_WID);
			dn.x = x;
			dn.y = y;
		}
#endif
		struct rsum rs1 = { .cp = &o.cp, .streams = 1 }, rs4 = { .cp = &o.cp, .streams = 4 };
		for (size_t bi = 0; bi < 3; bi++) {
			struct fb_tm v_ours[100], v_peer[100], v_dnn[100], v_rs1[100], v_rs4[100];
			bool peer = false, dpeer = false;
			o.B = Bs[bi];
#ifdef HAVE_OPENBLAS
			peer = dts[d] == MOE_DTYPE_F32;
			b.B = Bs[bi];
#endif
#ifdef HAVE_DNNL
			if (dts[d] == MOE_DTYPE_BF16 && Bs[bi] > 1 && dn.ok) {
				dn.B = Bs[bi];
				if (dn.mm_in)
					dnnl_primitive_destroy(dn.mm_in), dnnl_primitive_destroy(dn.mm_dn);
				dn.mm_in = dn.mm_dn = NULL;
				dpeer = dnnl_mm(&dn, (int)dn.B, N_HID, M_WID, &dn.src_in, &dn.wei_in, &dn.dst_in, &dn.mm_in) &&
					dnnl_mm(&dn, (int)dn.B, M_WID, N_HID, &dn.src_dn, &dn.wei_dn, &dn.dst_dn, &dn.mm_dn);
				if (!dpeer)
					printf("oneDNN: no bf16 matmul for B=%u on this CPU\n", dn.B);
			}
#endif
			for (int r = 0; r < reps; r++) {
				v_ours[r] = fb_time_calls(ours_run, &o, min_time, CLOCK_THREAD_CPUTIME_ID);
#ifdef HAVE_OPENBLAS
				if (peer)
					v_peer[r] = fb_time_calls(blas_run, &b, min_time, CLOCK_THREAD_CPUTIME_ID);
#endif
#ifdef HAVE_DNNL
				if (dpeer)
					v_dnn[r] = fb_time_calls(dnn_run, &dn, min_time, CLOCK_THREAD_CPUTIME_ID);
#endif
				if (d == 1 && bi == 0) {
					v_rs1[r] = fb_time_calls(rsum_run, &rs1, min_time, CLOCK_THREAD_CPUTIME_ID);
					v_rs4[r] = fb_time_calls(rsum_run, &rs4, min_time, CLOCK_THREAD_CPUTIME_ID);
				}
			}
			(void)v_peer, (void)v_dnn;
			m = fb_median2(v_ours, reps);
			s_ours[d][bi] = m.cpu;
			struct row *R = &rows[nr++];
			*R = (struct row){ .B = Bs[bi], .s = m.cpu, .wall = m.wall, .bytes = (double)o.L.weight_bytes, .valid = true };
			snprintf(R->name, sizeof(R->name), "ours %s%s (%s)", moe_dtype_name(dts[d]),
				 dts[d] == MOE_DTYPE_Q8_0 || dts[d] == MOE_DTYPE_Q4_0 ? (q8int[d] ? " int" : " exact") : "",
				 ffn_isa_name(ffn_get_isa()));
#ifdef HAVE_OPENBLAS
			if (peer) {
				m = fb_median2(v_peer, reps);
				s_blas[bi] = m.cpu;
				blas_ok = true;
				R = &rows[nr++];
				*R = (struct row){ .B = Bs[bi], .s = m.cpu, .wall = m.wall, .bytes = f32_bytes, .valid = true };
				snprintf(R->name, sizeof(R->name), "OpenBLAS f32 %s", Bs[bi] == 1 ? "sgemv" : "sgemm");
			}
#endif
#ifdef HAVE_DNNL
			if (dts[d] == MOE_DTYPE_BF16 && Bs[bi] > 1) {
				R = &rows[nr++];
				*R = (struct row){ .B = Bs[bi], .bytes = f32_bytes / 2, .valid = dpeer };
				if (dpeer) {
					m = fb_median2(v_dnn, reps);
					s_dnn[bi] = m.cpu;
					R->s = m.cpu;
					R->wall = m.wall;
					dnn_ok = true;
				}
				snprintf(R->name, sizeof(R->name), "oneDNN bf16 matmul");
			}
#endif
			if (d == 1 && bi == 0) {
				for (int k = 0; k < 2; k++) {
					m = fb_median2(k ? v_rs4 : v_rs1, reps);
					R = &rows[nr++];
					*R = (struct row){ .B = 0, .s = m.cpu, .wall = m.wall, .bytes = (double)o.cp.stride,
							   .valid = true };
					snprintf(R->name, sizeof(R->name), "read sum, %d stream%s (%s)", k ? 4 : 1,
						 k ? "s" : "", have512 ? "avx512" : "avx2");
				}
			}
		}
#ifdef HAVE_DNNL
		if (dts[d] == MOE_DTYPE_BF16) {
			if (dn.mm_in)
				dnnl_primitive_destroy(dn.mm_in), dnnl_primitive_destroy(dn.mm_dn);
			if (dn.ok)
				dnnl_stream_destroy(dn.st), dnnl_engine_destroy(dn.eng);
			free(dn.xb), free(dn.hb), free(dn.g), free(dn.u);
		}
#endif
#ifdef HAVE_OPENBLAS
		free(b.g), free(b.u);
#endif
		fb_copies_free(&o.cp);
	}
	(void)s_dnn, (void)dnn_ok, (void)blas_ok, (void)s_blas;

	printf("\n(tokens/s, GB/s of weights and us/call from thread CPU time; wall us/call for reference)\n");
	printf("%-30s %4s %10s %8s %10s %10s\n", "kernel (whole expert FFN)", "B", "tokens/s", "GB/s", "cpu us", "wall us");
	for (int i = 0; i < nr; i++)
		print_row(&rows[i]);

	fb_load_avg(la, sizeof(la));
	double rs_gbs = 0; /* the faster read-only sum */
	for (int i = 0; i < nr; i++)
		if (rows[i].B == 0)
			rs_gbs = fmax(rs_gbs, rows[i].bytes / rows[i].s * 1e-9);
	const double bf16_gbs = (3.0 * N_HID * M_WID * 2) / s_ours[1][0] * 1e-9;
	const double q8_gbs = (3.0 * N_HID * M_WID / 32 * 34) / s_ours[2][0] * 1e-9;
	printf("\nchecks (targets from machine.md section 5.7; loadavg at end: %s):\n", la);
	printf("  bf16 1 token: %.2f GB/s = %.2fx the read-only sum (target >= 0.7)\n", bf16_gbs, bf16_gbs / rs_gbs);
	const double q8i_gbs = (3.0 * N_HID * M_WID / 32 * 34) / s_ours[3][0] * 1e-9;
	printf("  q8_0 1 token: exact %.2f GB/s = %.2fx, int %.2f GB/s = %.2fx the read-only sum (target >= 0.7)\n",
	       q8_gbs, q8_gbs / rs_gbs, q8i_gbs, q8i_gbs / rs_gbs);
	double ratio = 0;
#ifdef HAVE_OPENBLAS
	if (blas_ok) {
		printf("  f32  1 token: ours / sgemv tokens/s = %.2fx (target >= 1.0)\n", s_blas[0] / s_ours[0][0]);
		printf("  bf16 1 token: ours / sgemv tokens/s = %.2fx (target >= 1.8)\n", s_blas[0] / s_ours[1][0]);
		printf("  q8_0 1 token: ours / sgemv tokens/s = exact %.2fx, int %.2fx (target >= 1.8)\n",
		       s_blas[0] / s_ours[2][0], s_blas[0] / s_ours[3][0]);
		for (int bi = 1; bi < 3; bi++)
			printf("  f32 B=%u: ours / sgemm tokens/s = %.2fx\n", Bs[bi], s_blas[bi] / s_ours[0][bi]);
		ratio = s_blas[0] / s_ours[1][0];
	}
#endif
#ifdef HAVE_DNNL
	for (int bi = 1; bi < 3; bi++)
		if (s_dnn[bi] > 0)
			printf("  bf16 B=%u: ours / oneDNN bf16 tokens/s = %.2fx (target >= 0.8)\n", Bs[bi],
			       s_dnn[bi] / s_ours[1][bi]);
		else
			printf("  bf16 B=%u: oneDNN bf16 matmul unavailable on this CPU\n", Bs[bi]);
#endif
	free(x), free(y);
	printf("ffn-vs-openblas: ratio=%.2f (ours bf16 / OpenBLAS f32 sgemv, tokens/s, 1 token)\n", ratio);
	return 0;
}
