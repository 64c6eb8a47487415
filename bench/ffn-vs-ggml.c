/* ffn-vs-ggml - one routed expert (Qwen3-30B-A3B's shape: hidden n = 2048,
 * width m = 768; gate and up [m x n], down [n x m]: both multiples of the
 * K-quant super-block) through our CPU kernels (ffn_expert) and through
 * llama.cpp's ggml CPU backend running the same computation as a graph
 * (mul_mat gate, mul_mat up, silu, mul, mul_mat down), on the same weight
 * bytes, in the same run, interleaved, one thread each.
 *
 * Types: q8_0, q4_0, q4_K, q6_K, bf16 (gate, up and down of one type); 1,
 * 16 and 64 tokens. Weights are cold: each call uses the next of several
 * expert copies that together exceed 1 GiB (256 MiB with --quick), as in
 * bench/ffn-vs-openblas; ggml's weight tensors point into the same copies
 * (a CPU buffer over them), so both read the same bytes from DRAM. Both
 * quantize x as ggml does: q8_0 per 32 for q8_0 / q4_0 weights (our
 * FFN_Q8_INT, the default), q8_K per 256 for K-quants; bf16: ggml rounds x
 * to bf16, we keep f32 x (or bf16 x on the AVX512-BF16 path).
 *
 * llama.cpp also repacks weights into interleaved layouts (the CPU_REPACK
 * buffer type) when it loads a model on AVX2 / AVX-512 hosts, for the
 * types that have one (q4_0, q4_K, q6_K, q8_0, ... here); that is measured
 * too, as "ggml repack": the same number of cold copies, each repacked by
 * ggml from the same bytes. The last line and the "ggml" column are the
 * plain layout (the same bytes as ours, as in GGUF files and packs).
 *
 * Prints a table (tokens/s and weight GB/s from process CPU time, medians
 * over reps; wall us for reference), the target checks (>= 1.0 at 1 token,
 * >= 0.8 at 64 tokens), and last:
 *   ffn-vs-ggml: ratio=X (ours / ggml tokens/s, q4_K, 1 token)
 *
 * Usage: ffn-vs-ggml [--quick] [--reps N] [--check] [--smoke] [--type T] [--tokens B]
 * --type / --tokens: only that type (q8_0 q4_0 q4_K q6_K bf16) / batch size
 * (1 16 64), so that one cell can be repeated on a shared machine; the last
 * line then names the first cell measured instead of q4_K at 1 token.
 * --check: no timing; a small rotation, each type and batch size run once
 * on both sides, outputs compared (max |ours - ggml| <= 2e-2 max |ggml|,
 * the differences being how x / h round to q8 / bf16 and ggml's own expf);
 * exits 1 on a mismatch. --smoke: the timing code path once per cell on a
 * 16 MiB rotation (the numbers mean nothing; it checks the program runs). */
#include "config.h"

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

#ifndef MOE_HAVE_LLAMA
int main(void)
{
	printf("ffn-vs-ggml: built without the llama.cpp peer (configure --with-llama); nothing to compare\n");
	return 77;
}
#else

#include "../tests/ggml_peer.h"

#define N_HID 2048
#define M_WID 768

static bool quick, check, smoke;
static int only_dt = -1, only_b = -1; /* --type, --tokens */
static int reps = 5;
static double min_time = 0.25; /* CPU seconds per measurement */

/* ---- the expert, both sides ----------------------------------------------------- */

struct side {
	struct ffn_layout L;
	struct fb_copies cp;
	struct ggml_peer *peer;
	struct ggml_peer_graph g;
	struct ggml_peer_graph gr;  /* over repacked weights, when the type has a layout */
	struct ggml_peer_wset *rs;  /* cp.count repacked copies */
	size_t nrs, rnext;
	const float *x;
	float *y;
	uint32_t B;
};


/* Rows of cols floats to dt: our quantizers for the 32-blocks, ggml's
 * (ggml_quantize_chunk, no imatrix) for the K-quants, which dtype.c reads
 * bit for bit as ggml does (tests/test_kquant_ggml). */
static void encode_row(enum moe_dtype dt, const float *row, uint32_t cols, uint8_t *dst)
{
	switch (dt) {
	case MOE_DTYPE_BF16:
		for (uint32_t c = 0; c < cols; c++) {
			const uint16_t h = moe_f32_to_bf16(row[c]);
			memcpy(dst + 2 * c, &h, 2);
		}
		break;
	case MOE_DTYPE_Q8_0: moe_quantize_row_q8_0(row, (void *)dst, cols); break;
	case MOE_DTYPE_Q4_0: moe_quantize_row_q4_0(row, (void *)dst, cols); break;
	default: ggml_quantize_chunk(ggml_peer_type(dt), row, dst, 0, 1, cols, NULL); break;
	}
}

static void side_init(struct side *s, enum moe_dtype dt)
{
	size_t bytes;
	uint8_t *one = fb_expert(&s->L, MOE_FAMILY_QWEN3_MOE, dt, N_HID, M_WID, encode_row, &bytes, "ffn-vs-ggml");

	fb_copies_init(&s->cp, one, bytes, check || smoke ? (16u << 20) : quick ? (256u << 20) : (1100u << 20),
		       "ffn-vs-ggml");
	free(one);
}

/* The ggml graph for B tokens over the copies (weights pointed per call). */
static void side_graph(struct side *s, enum moe_dtype dt, uint32_t B)
{
	const uint8_t *e = s->cp.base;
	ggml_peer_graph_free(&s->g);
	if (ggml_peer_graph_init(s->peer, &s->g, dt, e + s->L.gate.offset, dt, e + s->L.up.offset, dt,
				 e + s->L.down.offset, N_HID, M_WID, B, s->cp.base, s->cp.total)) {
		fprintf(stderr, "ffn-vs-ggml: ggml graph set-up failed (%s, B=%u)\n", moe_dtype_name(dt), B);
		exit(1);
	}
	s->B = B;
}

/* cp.count weight sets in the CPU_REPACK buffer type, repacked by ggml
 * from copy 0; none when the buffer type or the type's layout is absent. */
static void side_repack(struct side *s, enum moe_dtype dt, ggml_backend_buffer_type_t rb)
{
	const uint8_t *e = s->cp.base;
	if (!rb)
		return;
	s->rs = calloc(s->cp.count, sizeof(*s->rs));
	for (s->nrs = 0; s->rs && s->nrs < s->cp.count; s->nrs++)
		if (ggml_peer_wset_init(s->peer, &s->rs[s->nrs], dt, e + s->L.gate.offset, dt, e + s->L.up.offset, dt,
					e + s->L.down.offset, N_HID, M_WID, NULL, 0, rb))
			break;
	if (s->nrs < s->cp.count) { /* no repacked layout for this type */
		for (size_t i = 0; i < s->nrs; i++)
			ggml_peer_wset_free(&s->rs[i]);
		free(s->rs);
		s->rs = NULL;
		s->nrs = 0;
	}
}

static void side_repack_graph(struct side *s, enum moe_dtype dt, ggml_backend_buffer_type_t rb, uint32_t B)
{
	const uint8_t *e = s->cp.base;
	struct ggml_peer_wset w;
	ggml_peer_graph_free(&s->gr);
	if (!s->nrs)
		return;
	if (ggml_peer_wset_init(s->peer, &w, dt, e + s->L.gate.offset, dt, e + s->L.up.offset, dt, e + s->L.down.offset,
				N_HID, M_WID, NULL, 0, rb) ||
	    ggml_peer_graph_build(s->peer, &s->gr, &w, N_HID, B)) {
		fprintf(stderr, "ffn-vs-ggml: repacked graph set-up failed (%s, B=%u)\n", moe_dtype_name(dt), B);
		exit(1);
	}
}

static void ggml_repack_run(void *p)
{
	struct side *s = p;
	const struct ggml_peer_wset *w = &s->rs[s->rnext];
	s->rnext = (s->rnext + 1) % s->nrs;
	ggml_peer_graph_point(&s->gr, w->wg->data, w->wu->data, w->wd->data);
	if (ggml_peer_graph_run(s->peer, &s->gr, s->x, s->y)) {
		fprintf(stderr, "ffn-vs-ggml: ggml graph compute failed\n");
		exit(1);
	}
}

static void ours_run(void *p)
{
	struct side *s = p;
	if (ffn_expert(&s->L, fb_copies_next(&s->cp), s->x, N_HID, s->B, s->y, N_HID, NULL, 0, 1)) {
		fprintf(stderr, "ffn-vs-ggml: ffn_expert failed\n");
		exit(1);
	}
}

static void ggml_run(void *p)
{
	struct side *s = p;
	const uint8_t *e = fb_copies_next(&s->cp);
	ggml_peer_graph_point(&s->g, e + s->L.gate.offset, e + s->L.up.offset, e + s->L.down.offset);
	if (ggml_peer_graph_run(s->peer, &s->g, s->x, s->y)) {
		fprintf(stderr, "ffn-vs-ggml: ggml graph compute failed\n");
		exit(1);
	}
}


int main(int argc, char **argv)
{
	for (int i = 1, k; i < argc; i++) {
		if ((k = fb_common_opt(argc, argv, i, &quick, &reps)))
			i += k - 1;
		else if (!strcmp(argv[i], "--check"))
			check = true;
		else if (!strcmp(argv[i], "--smoke"))
			smoke = true;
		else if (!strcmp(argv[i], "--type") && i + 1 < argc && (only_dt = (int)moe_dtype_parse(argv[i + 1])) > 0)
			i++;
		else if (!strcmp(argv[i], "--tokens") && i + 1 < argc && (only_b = atoi(argv[i + 1])) > 0)
			i++;
		else {
			fprintf(stderr, "usage: %s [--quick] [--reps N] [--check] [--smoke] [--type T] [--tokens B]\n",
				argv[0]);
			return 2;
		}
	}
	fb_settle_opts(quick, &reps, &min_time);
	if (smoke) {
		min_time = 0.0;
		reps = 1;
	}

	struct ggml_peer peer;
	char why[600], la[128];
	if (ggml_peer_open(&peer, 1, why, sizeof(why))) {
		printf("ffn-vs-ggml: %s; nothing to compare\n", why);
		return 77;
	}
	fb_load_avg(la, sizeof(la));
	printf("ffn-vs-ggml: Qwen3-30B-A3B expert n=%d m=%d, one thread each, cold weights (%s MiB rotation), "
	       "%d reps x >= %.2f s, medians%s\n", N_HID, M_WID, check || smoke ? "16" : quick ? "256" : "1100", reps,
	       min_time, smoke ? " (--smoke: one call per cell, the numbers mean nothing)" : "");
	printf("our path: %s (q8_0/q4_0: x as q8_0, K-quants: x as q8_K); ggml CPU backend: %s; loadavg at start: %s\n",
	       ffn_isa_name(ffn_get_isa()), peer.lib, la);
	ffn_set_q8_mode(FFN_Q8_INT);

	static const enum moe_dtype dts[] = { MOE_DTYPE_Q8_0, MOE_DTYPE_Q4_0, MOE_DTYPE_Q4_K, MOE_DTYPE_Q6_K,
					      MOE_DTYPE_BF16 };
	static const uint32_t Bs[] = { 1, 16, 64 };
	enum { ND = 5, NB = 3 };
	double t_ours[ND][NB] = { { 0 } }, t_ggml[ND][NB] = { { 0 } }, t_rep[ND][NB] = { { 0 } }, w_ours[ND][NB],
		w_ggml[ND][NB], gbytes[ND];
	ggml_backend_buffer_type_t rbuft = ggml_peer_repack_buft(&peer);
	printf("ggml CPU_REPACK buffer type: %s\n", rbuft ? "present" : "absent");
	float *x = malloc(sizeof(float) * 64 * N_HID), *y = malloc(sizeof(float) * 64 * N_HID);
	float *yg = malloc(sizeof(float) * 64 * N_HID);
	uint64_t seed = 3;
	int bad = 0;
	for (int i = 0; i < 64 * N_HID; i++)
		x[i] = fb_frand(&seed);

	for (int d = 0; d < ND; d++) {
		struct side s;
		if (only_dt >= 0 && (int)dts[d] != only_dt)
			continue;
		memset(&s, 0, sizeof(s));
		s.peer = &peer;
		s.x = x;
		side_init(&s, dts[d]);
		side_repack(&s, dts[d], rbuft);
		gbytes[d] = (double)s.L.weight_bytes;
		for (int bi = 0; bi < NB; bi++) {
			if (only_b > 0 && (int)Bs[bi] != only_b)
				continue;
			side_graph(&s, dts[d], Bs[bi]);
			side_repack_graph(&s, dts[d], rbuft, Bs[bi]);
			if (check) {
				/* the same copy through both */
				s.y = y;
				s.cp.next = 0;
				ours_run(&s);
				s.y = yg;
				s.cp.next = 0;
				ggml_run(&s);
				double md = 0, mr = 0;
				for (size_t i = 0; i < (size_t)Bs[bi] * N_HID; i++) {
					md = fmax(md, fabs((double)y[i] - yg[i]));
					mr = fmax(mr, fabs((double)yg[i]));
				}
				bool ok = md <= 2e-2 * mr && mr > 0;
				double mdr = 0;
				if (s.nrs) {
					s.y = yg;
					s.rnext = 0;
					ggml_repack_run(&s);
					for (size_t i = 0; i < (size_t)Bs[bi] * N_HID; i++)
						mdr = fmax(mdr, fabs((double)y[i] - yg[i]));
					ok = ok && mdr <= 2e-2 * mr;
				}
				bad += !ok;
				printf("check %-5s B=%-2u max|ours - ggml| = %.3g (repacked: %s%.3g), max|ggml| = %.3g: %s\n",
				       moe_dtype_name(dts[d]), Bs[bi], md, s.nrs ? "" : "n/a ", mdr, mr, ok ? "ok" : "MISMATCH");
				continue;
			}
			struct fb_tm vo[100], vg[100], vr[100];
			s.y = y;
			for (int r = 0; r < reps; r++) {
				vo[r] = fb_time_calls(ours_run, &s, min_time, CLOCK_PROCESS_CPUTIME_ID);
				vg[r] = fb_time_calls(ggml_run, &s, min_time, CLOCK_PROCESS_CPUTIME_ID);
				if (s.nrs)
					vr[r] = fb_time_calls(ggml_repack_run, &s, min_time, CLOCK_PROCESS_CPUTIME_ID);
			}
			const struct fb_tm mo = fb_median2(vo, reps), mg = fb_median2(vg, reps);
			t_ours[d][bi] = mo.cpu;
			t_ggml[d][bi] = mg.cpu;
			t_rep[d][bi] = s.nrs ? fb_median2(vr, reps).cpu : 0;
			w_ours[d][bi] = mo.wall;
			w_ggml[d][bi] = mg.wall;
		}
		ggml_peer_graph_free(&s.g);
		ggml_peer_graph_free(&s.gr);
		for (size_t i = 0; i < s.nrs; i++)
			ggml_peer_wset_free(&s.rs[i]);
		free(s.rs);
		munmap(s.cp.base, s.cp.total);
	}
	ggml_peer_close(&peer);
	free(x);
	free(y);
	free(yg);
	if (check) {
		printf("ffn-vs-ggml: check %s (no timing)\n", bad ? "FAILED" : "passed");
		return bad ? 1 : 0;
	}

	printf("\n(tokens/s and weight GB/s from process CPU time; wall us per call for reference)\n");
	printf("%-6s %3s %11s %11s %6s %11s %6s %9s %9s %9s %9s\n", "type", "B", "ours tok/s", "ggml tok/s", "ratio",
	       "repack t/s", "ratio", "ours GB/s", "ggml GB/s", "ours wall", "ggml wall");
	int fd = -1, fb = -1; /* the first cell measured */
	for (int d = 0; d < ND; d++)
		for (int bi = 0; bi < NB; bi++) {
			char rt[32] = "n/a", rr[32] = "n/a";
			if (t_ours[d][bi] <= 0)
				continue;
			if (fd < 0)
				fd = d, fb = bi;
			if (t_rep[d][bi] > 0) {
				snprintf(rt, sizeof(rt), "%.1f", Bs[bi] / t_rep[d][bi]);
				snprintf(rr, sizeof(rr), "%.2f", t_rep[d][bi] / t_ours[d][bi]);
			}
			printf("%-6s %3u %11.1f %11.1f %6.2f %11s %6s %9.2f %9.2f %9.1f %9.1f\n", moe_dtype_name(dts[d]),
			       Bs[bi], Bs[bi] / t_ours[d][bi], Bs[bi] / t_ggml[d][bi], t_ggml[d][bi] / t_ours[d][bi], rt, rr,
			       gbytes[d] / t_ours[d][bi] * 1e-9, gbytes[d] / t_ggml[d][bi] * 1e-9, w_ours[d][bi] * 1e6,
			       w_ggml[d][bi] * 1e6);
		}
	fb_load_avg(la, sizeof(la));
	printf("\nchecks (issue 17 targets; loadavg at end: %s):\n", la);
	for (int d = 0; d < ND; d++) {
		if (t_ours[d][0] <= 0 && t_ours[d][2] <= 0)
			continue;
		printf("  %-5s ours / ggml tokens/s:", moe_dtype_name(dts[d]));
		if (t_ours[d][0] > 0)
			printf(" 1 token %.2fx (target >= 1.0)", t_ggml[d][0] / t_ours[d][0]);
		if (t_ours[d][2] > 0)
			printf(" 64 tokens %.2fx (target >= 0.8)", t_ggml[d][2] / t_ours[d][2]);
		if (t_rep[d][0] > 0 || t_rep[d][2] > 0)
			printf("; vs repacked: %.2fx, %.2fx", t_rep[d][0] > 0 ? t_rep[d][0] / t_ours[d][0] : 0.0,
			       t_rep[d][2] > 0 ? t_rep[d][2] / t_ours[d][2] : 0.0);
		putchar('\n');
	}
	if (t_ours[2][0] > 0)
		printf("ffn-vs-ggml: ratio=%.2f (ours / ggml tokens/s, q4_K, 1 token)\n", t_ggml[2][0] / t_ours[2][0]);
	else if (fd >= 0)
		printf("ffn-vs-ggml: ratio=%.2f (ours / ggml tokens/s, %s, %u token%s)\n", t_ggml[fd][fb] / t_ours[fd][fb],
		       moe_dtype_name(dts[fd]), Bs[fb], Bs[fb] > 1 ? "s" : "");
	return 0;
}
#endif
