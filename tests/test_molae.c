/* Description: MoLAE conversion (tools/molae.c, issue 15 items 1-2):
 * optimality (error == spectral tail), a planted exact rank-r group structure
 * (error 0 to rounding, found by --groups auto when the groups interleave),
 * the round trip through the latent pack, hostile inputs refused, and the
 * FFN layout (COMPUTE) refusing a latent pack. */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dtype.h"
#include "ffn.h"
#include "molae.h"
#include "pack.h"
#include "testutil.h"

#define N_HID 48
#define M_W 8
#define N_EXP 8
#define N_MOE 2

/* Deterministic uniform(-1, 1). */
static double urand(uint64_t *s)
{
	*s = *s * 6364136223846793005ull + 1442695040888963407ull;
	return (double)(*s >> 11) / (double)(1ull << 53) * 2.0 - 1.0;
}

static void model_cfg(struct moe_model_config *m, enum moe_family f)
{
	memset(m, 0, sizeof(*m));
	snprintf(m->name, sizeof(m->name), "molae-test");
	moe_model_set_family_defaults(m, f);
	m->dtype = MOE_DTYPE_F32;
	m->hidden = N_HID;
	m->expert_width = M_W;
	m->n_experts = N_EXP;
	m->top_k = 2;
	m->n_layers = N_MOE;
	m->n_moe_layers = N_MOE;
	m->first_moe_layer = 0;
	m->moe_layer_step = 1;
}

/* How expert matrices are made: random, or planted W_i = A_i B_c with
 * c = the class of expert e (contiguous: e / 4, interleaved: e % 2). */
enum fill { FILL_RANDOM, FILL_PLANTED_CONTIG, FILL_PLANTED_INTERLEAVED };
#define PLANT_RANK 5

static void fill_part(enum fill how, uint32_t l, uint32_t e, int p, float *W, uint32_t rows, uint32_t cols)
{
	uint64_t s = 1000003ull * (l + 1) + 7919ull * (e + 1) + 31ull * (uint64_t)p;
	if (how == FILL_RANDOM || p == 2) {
		for (size_t i = 0; i < (size_t)rows * cols; i++)
			W[i] = (float)urand(&s);
		return;
	}
	uint32_t cls = how == FILL_PLANTED_CONTIG ? e / 4 : e % 2;
	uint64_t sb = 77ull * (l + 1) + 13ull * (cls + 1) + 5ull * (uint64_t)p;
	double B[PLANT_RANK * N_HID], A[M_W * PLANT_RANK];
	for (size_t i = 0; i < sizeof(B) / sizeof(B[0]); i++)
		B[i] = urand(&sb);
	for (size_t i = 0; i < sizeof(A) / sizeof(A[0]); i++)
		A[i] = urand(&s);
	for (uint32_t i = 0; i < rows; i++)
		for (uint32_t j = 0; j < cols; j++) {
			double v = 0;
			for (uint32_t k = 0; k < PLANT_RANK; k++)
				v += A[i * PLANT_RANK + k] * B[k * N_HID + j];
			W[(size_t)i * cols + j] = (float)v;
		}
}

static void write_pack(const char *path, enum fill how)
{
	struct moe_model_config m;
	struct pack_part_desc parts[3] = {
		{ .role = PACK_ROLE_GATE, .dtype = MOE_DTYPE_F32, .rows = M_W, .cols = N_HID },
		{ .role = PACK_ROLE_UP, .dtype = MOE_DTYPE_F32, .rows = M_W, .cols = N_HID },
		{ .role = PACK_ROLE_DOWN, .dtype = MOE_DTYPE_F32, .rows = N_HID, .cols = M_W },
	};
	struct pack_writer *w;
	struct moe_error err = { "" };
	float W[M_W * N_HID];
	model_cfg(&m, MOE_FAMILY_QWEN2_MOE);
	cr_assert_eq(pack_writer_create(path, &m, parts, 3, "test", &w, &err), 0, "%s", err.msg);
	for (uint32_t l = 0; l < N_MOE; l++)
		for (uint32_t e = 0; e < N_EXP; e++) {
			cr_assert_eq(pack_writer_begin_expert(w, l, e, &err), 0, "%s", err.msg);
			for (int p = 0; p < 3; p++) {
				fill_part(how, l, e, p, W, p == 2 ? N_HID : M_W, p == 2 ? M_W : N_HID);
				cr_assert_eq(pack_writer_write(w, W, sizeof(W), &err), 0, "%s", err.msg);
			}
			cr_assert_eq(pack_writer_end_expert(w, &err), 0, "%s", err.msg);
		}
	/* one resident tensor, to check it is carried over */
	struct pack_tensor_entry t;
	memset(&t, 0, sizeof(t));
	snprintf(t.name, sizeof(t.name), "blk.0.ffn_gate_inp.weight");
	t.role = PACK_ROLE_ROUTER;
	t.dtype = MOE_DTYPE_F32;
	t.layer = 0;
	t.n_dims = 2;
	t.shape[0] = N_EXP;
	t.shape[1] = N_HID;
	float R[N_EXP * N_HID];
	for (size_t i = 0; i < N_EXP * N_HID; i++)
		R[i] = (float)i;
	cr_assert_eq(pack_writer_begin_tensor(w, &t, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_writer_write(w, R, sizeof(R), &err), 0, "%s", err.msg);
	cr_assert_eq(pack_writer_end_tensor(w, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_writer_finish(w, &err), 0, "%s", err.msg);
}

static char *dir;
static char in_path[512], out_path[512];

static void setup(void)
{
	dir = tu_mkdtemp("molae");
	snprintf(in_path, sizeof(in_path), "%s/in.moepack", dir);
	snprintf(out_path, sizeof(out_path), "%s/out.moepack", dir);
}

static void teardown(void)
{
	tu_rmtree(dir);
}

TestSuite(molae, .init = setup, .fini = teardown, .timeout = 60);

/* The math alone, double precision: error == tail bound; exact planted case. */
Test(molae, math_optimal_and_exact)
{
	enum { n = 40, m = 6, k = 5, r = 7 };
	static double W[k][m * n], G[n * n], B[r * n], A[m * r], scr[m * n];
	struct moe_error err = { "" };
	uint64_t s = 42;
	for (int planted = 0; planted < 2; planted++) {
		double Bp[r * n];
		for (size_t i = 0; i < r * n; i++)
			Bp[i] = urand(&s);
		for (int i = 0; i < k; i++) {
			double Ap[m * r];
			for (size_t q = 0; q < m * r; q++)
				Ap[q] = urand(&s);
			for (int a = 0; a < m; a++)
				for (int j = 0; j < n; j++) {
					double v = 0;
					if (planted) {
						for (int q = 0; q < r; q++)
							v += Ap[a * r + q] * Bp[q * n + j];
					} else {
						v = urand(&s);
					}
					W[i][a * n + j] = v;
				}
		}
		memset(G, 0, sizeof(G));
		for (int i = 0; i < k; i++)
			molae_gram_add(G, W[i], m, n);
		double total, tail, res = 0, norm = 0;
		cr_assert_eq(molae_basis(G, n, r, B, &total, &tail, &err), 0, "%s", err.msg);
		/* B has orthonormal rows */
		for (int a = 0; a < r; a++)
			for (int b = 0; b < r; b++) {
				double d = 0;
				for (int j = 0; j < n; j++)
					d += B[a * n + j] * B[b * n + j];
				cr_assert(fabs(d - (a == b)) < 1e-12, "B B^T [%d][%d] = %g", a, b, d);
			}
		for (int i = 0; i < k; i++) {
			molae_project(W[i], m, n, B, r, A);
			res += molae_residual2(W[i], A, B, m, n, r, scr);
			for (int j = 0; j < m * n; j++)
				norm += W[i][j] * W[i][j];
		}
		cr_assert(fabs(norm - total) <= 1e-12 * total);
		double e = sqrt(res / norm), bound = sqrt(tail / total);
		if (planted)
			cr_assert(e < 1e-12 && bound < 1e-7, "planted: error %g bound %g", e, bound);
		else
			cr_assert(e > 0.1 && fabs(e - bound) <= 1e-6 * bound, "error %.12g bound %.12g", e, bound);
	}
	cr_assert_eq(molae_basis(G, n, n + 1, B, &(double){ 0 }, &(double){ 0 }, &err), -EINVAL);
	cr_assert_eq(molae_basis(G, n, 0, B, &(double){ 0 }, &(double){ 0 }, &err), -EINVAL);
}

static struct molae_report *convert_dt(uint32_t rank, uint32_t k, bool autog, uint32_t dtype)
{
	struct molae_options o = { .rank = rank, .group_size = k, .groups_auto = autog, .dtype = dtype };
	struct molae_report *rep;
	struct moe_error err = { "" };
	cr_assert_eq(molae_convert(in_path, out_path, &o, &rep, &err), 0, "%s", err.msg);
	cr_assert_not_null(rep);
	return rep;
}

static struct molae_report *convert_ok(uint32_t rank, uint32_t k, bool autog)
{
	return convert_dt(rank, k, autog, 0);
}

Test(molae, random_model_error_equals_bound)
{
	write_pack(in_path, FILL_RANDOM);
	struct molae_report *rep = convert_ok(12, 4, false);
	cr_assert_eq(rep->n_groups, 2);
	for (uint32_t i = 0; i < N_MOE * 2; i++)
		for (int p = 0; p < 2; p++) {
			const struct molae_group_stat *s = &rep->groups[i];
			cr_assert(s->err[p] > 0.05 && fabs(s->err[p] - s->bound[p]) <= 1e-6 * s->bound[p],
				  "layer %u group %u: error %.12g bound %.12g", s->layer, s->group, s->err[p], s->bound[p]);
		}
	/* molae.md section 7 */
	cr_assert_eq(rep->expert_params_before, 3ull * M_W * N_HID);
	cr_assert_eq(rep->expert_params_after, 2ull * M_W * 12 + M_W * N_HID);
	cr_assert_eq(rep->params_after, 2ull * 12 * N_HID * 2 + N_EXP * rep->expert_params_after);
	molae_report_free(rep);
}

/* Reconstructs every gate/up from the output pack and compares with the input. */
static void check_round_trip(const struct molae_report *rep, double tol)
{
	struct pack_file *in, *out;
	struct moe_error err = { "" };
	cr_assert_eq(pack_open(in_path, PACK_OPEN_NO_DIRECT, &in, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_open(out_path, PACK_OPEN_NO_DIRECT, &out, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_verify(out, NULL, NULL, &err), 0);
	const uint32_t r = rep->rank;
	const struct pack_part_desc *pa[2] = { pack_part(out, PACK_ROLE_LATENT_A_GATE),
					       pack_part(out, PACK_ROLE_LATENT_A_UP) };
	const struct pack_part_desc *pd = pack_part(out, PACK_ROLE_DOWN);
	cr_assert(pa[0] && pa[1] && pd && !pack_part(out, PACK_ROLE_GATE));
	const uint32_t dt = rep->dtype;
	cr_assert(pa[0]->rows == M_W && pa[0]->cols == r && pa[0]->dtype == dt && pd->dtype == dt);
	uint64_t rba = 0;
	cr_assert(moe_dtype_row_bytes(dt, r, &rba));
	float Af[M_W * N_HID], Df[N_HID * M_W];
	cr_assert_not_null(pack_find_tensor(out, "blk.0.ffn_gate_inp.weight"));
	cr_assert_not_null(pack_find_role(out, PACK_ROLE_LATENT_REPORT, UINT32_MAX));
	uint8_t *ei = aligned_alloc(PACK_ALIGN, pack_extent_bytes(in)), *eo = aligned_alloc(PACK_ALIGN, pack_extent_bytes(out));
	float *B = malloc((size_t)r * N_HID * sizeof(float));
	int32_t gof[N_EXP];
	for (uint32_t l = 0; l < N_MOE; l++) {
		char name[96];
		snprintf(name, sizeof(name), "blk.%u.molae_groups", l);
		const struct pack_tensor_entry *tg = pack_find_tensor(out, name);
		cr_assert_not_null(tg);
		cr_assert_eq(pack_read_tensor(out, tg, gof, &err), 0, "%s", err.msg);
		for (uint32_t e = 0; e < N_EXP; e++) {
			cr_assert_eq(gof[e], rep->group_of[l * N_EXP + e]);
			cr_assert_eq(pack_read_expert(in, l, e, ei, &err), 0, "%s", err.msg);
			cr_assert_eq(pack_read_expert(out, l, e, eo, &err), 0, "%s", err.msg);
			for (int p = 0; p < 2; p++) {
				snprintf(name, sizeof(name), "blk.%u.molae_b_%s.%d", l, p ? "up" : "gate", gof[e]);
				const struct pack_tensor_entry *tb = pack_find_tensor(out, name);
				cr_assert_not_null(tb, "%s", name);
				cr_assert_eq(tb->shape[0], r);
				cr_assert_eq(pack_read_tensor(out, tb, B, &err), 0, "%s", err.msg);
				const float *W = (const float *)(ei + in->hdr->parts[p].offset);
				for (uint32_t i = 0; i < M_W; i++)
					moe_dequantize_row(dt, eo + pa[p]->offset + i * rba, Af + i * r, r);
				const float *A = Af;
				double d2 = 0, n2 = 0;
				for (uint32_t i = 0; i < M_W; i++)
					for (uint32_t j = 0; j < N_HID; j++) {
						double v = 0;
						for (uint32_t q = 0; q < r; q++)
							v += (double)A[i * r + q] * B[q * N_HID + j];
						double w = W[i * N_HID + j];
						d2 += (w - v) * (w - v);
						n2 += w * w;
					}
				/* Each expert's error is at most its group's (squared sums) times sqrt(k), plus f32 rounding. */
				double ge = rep->groups[l * rep->n_groups + (uint32_t)gof[e]].err[p];
				cr_assert(sqrt(d2 / n2) <= ge * sqrt((double)N_EXP) + tol,
					  "layer %u expert %u %s: %g vs group %g", l, e, p ? "up" : "gate", sqrt(d2 / n2), ge);
			}
			/* down is carried as it was (exactly when its dtype is kept) */
			if (dt == MOE_DTYPE_F32) {
				cr_assert_eq(memcmp(ei + in->hdr->parts[2].offset, eo + pd->offset, pd->bytes), 0);
			} else {
				moe_dequantize_row(dt, eo + pd->offset, Df, (size_t)N_HID * M_W);
				const float *D = (const float *)(ei + in->hdr->parts[2].offset);
				for (size_t i = 0; i < (size_t)N_HID * M_W; i++)
					cr_assert(fabsf(D[i] - Df[i]) <= 1e-2f * fabsf(D[i]) + 1e-6f, "down[%zu]", i);
			}
		}
	}
	free(B);
	free(ei);
	free(eo);
	pack_close(in);
	pack_close(out);
}

Test(molae, planted_structure_exact_and_round_trip)
{
	write_pack(in_path, FILL_PLANTED_CONTIG);
	struct molae_report *rep = convert_ok(PLANT_RANK, 4, false);
	/* the input is f32: "0" means f32 rounding of W */
	for (uint32_t i = 0; i < N_MOE * rep->n_groups; i++)
		for (int p = 0; p < 2; p++)
			cr_assert(rep->groups[i].err[p] < 1e-6, "group %u: error %g", i, rep->groups[i].err[p]);
	check_round_trip(rep, 1e-5);
	molae_report_free(rep);
}

Test(molae, random_round_trip)
{
	write_pack(in_path, FILL_RANDOM);
	struct molae_report *rep = convert_ok(10, 2, false);
	check_round_trip(rep, 1e-5);
	molae_report_free(rep);
}

/* bf16 A and down: the reconstruction is within bf16 rounding of the f64 one. */
Test(molae, bf16_output_round_trip)
{
	write_pack(in_path, FILL_RANDOM);
	struct molae_report *rep = convert_dt(10, 4, false, MOE_DTYPE_BF16);
	cr_assert_eq(rep->dtype, MOE_DTYPE_BF16);
	cr_assert_eq(rep->extent_bytes_after, 4096);
	check_round_trip(rep, 1e-2);
	molae_report_free(rep);
}

/* sum ||(W_i - A_i B) x_t||^2 / sum ||W_i x_t||^2 over all experts and the
 * T calibration states of each layer, from IN and the f32 pack OUT. */
static double act_err(const char *outp, const float *X, uint32_t T, int p)
{
	struct pack_file *in, *out;
	struct moe_error err = { "" };
	cr_assert_eq(pack_open(in_path, PACK_OPEN_NO_DIRECT, &in, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_open(outp, PACK_OPEN_NO_DIRECT, &out, &err), 0, "%s", err.msg);
	const struct pack_part_desc *pa = pack_part(out, p ? PACK_ROLE_LATENT_A_UP : PACK_ROLE_LATENT_A_GATE);
	const uint32_t r = pa->cols;
	uint8_t *ei = aligned_alloc(PACK_ALIGN, pack_extent_bytes(in)), *eo = aligned_alloc(PACK_ALIGN, pack_extent_bytes(out));
	float *B = malloc((size_t)r * N_HID * sizeof(float));
	int32_t gof[N_EXP];
	double num = 0, den = 0;
	for (uint32_t l = 0; l < N_MOE; l++) {
		char name[96];
		snprintf(name, sizeof(name), "blk.%u.molae_groups", l);
		cr_assert_eq(pack_read_tensor(out, pack_find_tensor(out, name), gof, &err), 0, "%s", err.msg);
		for (uint32_t e = 0; e < N_EXP; e++) {
			snprintf(name, sizeof(name), "blk.%u.molae_b_%s.%d", l, p ? "up" : "gate", gof[e]);
			cr_assert_eq(pack_read_tensor(out, pack_find_tensor(out, name), B, &err), 0, "%s", err.msg);
			cr_assert_eq(pack_read_expert(in, l, e, ei, &err), 0, "%s", err.msg);
			cr_assert_eq(pack_read_expert(out, l, e, eo, &err), 0, "%s", err.msg);
			const float *W = (const float *)(ei + in->hdr->parts[p].offset), *A = (const float *)(eo + pa->offset);
			for (uint32_t t = 0; t < T; t++) {
				const float *x = X + ((size_t)l * T + t) * N_HID;
				double bx[N_HID];
				for (uint32_t q = 0; q < r; q++) {
					bx[q] = 0;
					for (uint32_t j = 0; j < N_HID; j++)
						bx[q] += (double)B[q * N_HID + j] * x[j];
				}
				for (uint32_t i = 0; i < M_W; i++) {
					double wx = 0, abx = 0;
					for (uint32_t j = 0; j < N_HID; j++)
						wx += (double)W[i * N_HID + j] * x[j];
					for (uint32_t q = 0; q < r; q++)
						abx += (double)A[i * r + q] * bx[q];
					num += (wx - abx) * (wx - abx);
					den += wx * wx;
				}
			}
		}
	}
	free(B);
	free(ei);
	free(eo);
	pack_close(in);
	pack_close(out);
	return sqrt(num / den);
}

/* Calibration states with very unequal scales per coordinate (and a few
 * dead coordinates, covered by the ridge). */
static void write_calib(const char *path, uint32_t T, size_t extra_bytes)
{
	size_t cnt = (size_t)N_MOE * T * N_HID;
	float *x = malloc(cnt * sizeof(float) + extra_bytes);
	uint64_t s = 99;
	for (size_t i = 0; i < cnt; i++) {
		uint32_t j = (uint32_t)(i % N_HID);
		x[i] = j >= N_HID - 3 ? 0.0f : (float)(urand(&s) * (j < 8 ? 10.0 : 0.1));
	}
	memset(x + cnt, 0, extra_bytes);
	cr_assert_eq(tu_write_file(path, x, cnt * sizeof(float) + extra_bytes), 0);
	free(x);
}

Test(molae, activation_aware_optimal_in_the_weighted_norm)
{
	char cpath[600];
	snprintf(cpath, sizeof(cpath), "%s/calib.f32", dir);
	write_pack(in_path, FILL_RANDOM);
	write_calib(cpath, 100, 0);
	struct molae_options o = { .rank = 10, .group_size = 4, .calib = cpath };
	struct molae_report *rep;
	struct moe_error err = { "" };
	cr_assert_eq(molae_convert(in_path, out_path, &o, &rep, &err), 0, "%s", err.msg);
	cr_assert_eq(rep->calib_tokens, 100);
	for (uint32_t i = 0; i < N_MOE * rep->n_groups; i++)
		for (int p = 0; p < 2; p++) {
			const struct molae_group_stat *g = &rep->groups[i];
			/* optimal in the activation norm; the plain error exceeds the plain optimum */
			cr_assert(g->werr[p] > 0.01 && fabs(g->werr[p] - g->wbound[p]) <= 1e-6 * g->wbound[p],
				  "group %u: act error %.12g bound %.12g", i, g->werr[p], g->wbound[p]);
			cr_assert(g->err[p] > g->bound[p] * (1 + 1e-3), "group %u: plain %.9g vs optimum %.9g", i,
				  g->err[p], g->bound[p]);
		}
	check_round_trip(rep, 1e-4);
	molae_report_free(rep);
	/* on the calibration states, the activation-aware pack beats the plain one */
	size_t len;
	float *X = (float *)tu_read_file(cpath, &len);
	cr_assert_not_null(X);
	double aware[2] = { act_err(out_path, X, 100, 0), act_err(out_path, X, 100, 1) };
	o.calib = NULL;
	cr_assert_eq(molae_convert(in_path, out_path, &o, &rep, &err), 0, "%s", err.msg);
	molae_report_free(rep);
	for (int p = 0; p < 2; p++) {
		double plain = act_err(out_path, X, 100, p);
		cr_assert(aware[p] < 0.95 * plain, "%s: aware %.6g plain %.6g on the states", p ? "up" : "gate", aware[p],
			  plain);
	}
	free(X);
	o.calib = cpath;
	/* a file that is not L x T x n f32 values, and a missing one */
	write_calib(cpath, 100, 4);
	cr_assert_eq(molae_convert(in_path, out_path, &o, &rep, &err), -EINVAL);
	cr_assert(strstr(err.msg, "is not 2 MoE layers x T tokens x 48 hidden f32"), "%s", err.msg);
	o.calib = "/nonexistent/calib.f32";
	cr_assert_lt(molae_convert(in_path, out_path, &o, &rep, &err), 0);
	cr_assert(strstr(err.msg, "calibration file"), "%s", err.msg);
}

Test(molae, auto_groups_find_interleaved_structure)
{
	write_pack(in_path, FILL_PLANTED_INTERLEAVED);
	struct molae_report *rep = convert_ok(PLANT_RANK, 4, false);
	/* contiguous groups mix both classes: rank 5 cannot hold 10 dimensions */
	cr_assert(rep->groups[0].err[0] > 0.1, "contiguous error %g", rep->groups[0].err[0]);
	molae_report_free(rep);
	rep = convert_ok(PLANT_RANK, 4, true);
	for (uint32_t l = 0; l < N_MOE; l++)
		for (uint32_t e = 0; e < N_EXP; e++)
			cr_assert_eq(rep->group_of[l * N_EXP + e], rep->group_of[l * N_EXP + e % 2], "expert %u", e);
	for (uint32_t i = 0; i < N_MOE * rep->n_groups; i++)
		cr_assert(rep->groups[i].err[0] < 1e-6 && rep->groups[i].err[1] < 1e-6, "auto group %u: %g", i,
			  rep->groups[i].err[0]);
	check_round_trip(rep, 1e-5);
	molae_report_free(rep);
}

static void convert_fails(uint32_t rank, uint32_t k, const char *want)
{
	struct molae_options o = { .rank = rank, .group_size = k };
	struct molae_report *rep = (void *)1;
	struct moe_error err = { "" };
	cr_assert_lt(molae_convert(in_path, out_path, &o, &rep, &err), 0);
	cr_assert_null(rep);
	cr_assert(strstr(err.msg, want), "message '%s' lacks '%s'", err.msg, want);
	cr_assert_neq(access(out_path, F_OK), 0, "no output left behind");
}

Test(molae, hostile_inputs)
{
	write_pack(in_path, FILL_RANDOM);
	convert_fails(N_HID + 1, 0, "rank 49 out of range");          /* > n */
	convert_fails(M_W + 1, 1, "rank 9 out of range");             /* > k * m */
	convert_fails(4, 3, "group size 3 does not divide the 8");
	convert_fails(4, 16, "group size 16 does not divide");
	convert_fails(0, 4, "rank 0 out of range");
	struct molae_options oq = { .rank = 12, .group_size = 4, .dtype = MOE_DTYPE_Q8_0 };
	struct molae_report *rq = (void *)1;
	struct moe_error eq = { "" };
	cr_assert_eq(molae_convert(in_path, out_path, &oq, &rq, &eq), -EINVAL);
	cr_assert(strstr(eq.msg, "whole blocks of 32"), "%s", eq.msg);
	oq.dtype = MOE_DTYPE_Q4_0;
	cr_assert_eq(molae_convert(in_path, out_path, &oq, &rq, &eq), -EINVAL);
	cr_assert(strstr(eq.msg, "not supported"), "%s", eq.msg);
	/* a latent pack is not converted again */
	struct molae_report *rep = convert_ok(4, 4, false);
	molae_report_free(rep);
	char again[600];
	snprintf(again, sizeof(again), "%s/again.moepack", dir);
	struct molae_options o = { .rank = 4 };
	struct moe_error err = { "" };
	cr_assert_lt(molae_convert(out_path, again, &o, &rep, &err), 0);
	cr_assert(strstr(err.msg, "already a MoLAE pack"), "%s", err.msg);
	/* a missing file */
	cr_assert_lt(molae_convert("/nonexistent/x.moepack", again, &o, &rep, &err), 0);
}

Test(molae, non_swiglu_model_refused)
{
	struct moe_model_config m;
	model_cfg(&m, MOE_FAMILY_GPT_OSS);
	struct pack_part_desc parts[4] = {
		{ .role = PACK_ROLE_GATE_UP, .dtype = MOE_DTYPE_F32, .rows = 2 * M_W, .cols = N_HID },
		{ .role = PACK_ROLE_GATE_UP_BIAS, .dtype = MOE_DTYPE_F32, .rows = 1, .cols = 2 * M_W },
		{ .role = PACK_ROLE_DOWN, .dtype = MOE_DTYPE_F32, .rows = N_HID, .cols = M_W },
		{ .role = PACK_ROLE_DOWN_BIAS, .dtype = MOE_DTYPE_F32, .rows = 1, .cols = N_HID },
	};
	struct pack_writer *w;
	struct moe_error err = { "" };
	static float zero[2 * M_W * N_HID];
	cr_assert_eq(pack_writer_create(in_path, &m, parts, 4, "test", &w, &err), 0, "%s", err.msg);
	for (uint32_t l = 0; l < N_MOE; l++)
		for (uint32_t e = 0; e < N_EXP; e++) {
			cr_assert_eq(pack_writer_begin_expert(w, l, e, &err), 0, "%s", err.msg);
			for (int p = 0; p < 4; p++)
				cr_assert_eq(pack_writer_write(w, zero, parts[p].rows * parts[p].cols * sizeof(float), &err), 0,
					     "%s", err.msg);
			cr_assert_eq(pack_writer_end_expert(w, &err), 0, "%s", err.msg);
		}
	cr_assert_eq(pack_writer_finish(w, &err), 0, "%s", err.msg);
	convert_fails(4, 4, "not a SwiGLU model");
}

/* Serving latent packs is not implemented (issue 15 items 3-4): the FFN
 * layout, which the daemon's COMPUTE and moe-run build from the pack's
 * parts, refuses the latent parts instead of reading A as a gate. */
Test(molae, ffn_layout_refuses_latent_pack)
{
	write_pack(in_path, FILL_RANDOM);
	struct molae_report *rep = convert_ok(4, 4, false);
	molae_report_free(rep);
	struct pack_file *p;
	struct moe_error err = { "" };
	struct ffn_layout L;
	cr_assert_eq(pack_open(out_path, PACK_OPEN_NO_DIRECT, &p, &err), 0, "%s", err.msg);
	cr_assert_eq(ffn_layout_init(&L, p->model, p->hdr->parts, p->hdr->n_parts, pack_extent_bytes(p), &err), -EINVAL);
	cr_assert(strstr(err.msg, "no gate part"), "%s", err.msg);
	pack_close(p);
}

Test(molae, cli)
{
	write_pack(in_path, FILL_RANDOM);
	const char *mp = tu_build_path("tools/moe-pack");
	cr_assert_eq(tu_sh("'%s' molae --rank 6 --group-size 4 '%s' -o '%s' -q --json > '%s/r.json'", mp, in_path,
			   out_path, dir), 0);
	size_t len;
	char path[600];
	snprintf(path, sizeof(path), "%s/r.json", dir);
	char *js = tu_read_file(path, &len);
	cr_assert_not_null(js);
	json_error_t je;
	json_t *j = json_loads(js, 0, &je);
	cr_assert_not_null(j, "%s", je.text);
	cr_assert_eq(json_integer_value(json_object_get(j, "rank")), 6);
	cr_assert_eq(json_array_size(json_object_get(j, "layers")), N_MOE);
	json_decref(j);
	free(js);
	cr_assert_eq(tu_sh("'%s' verify '%s' >/dev/null", mp, out_path), 0);
	cr_assert_eq(tu_sh("'%s' molae --rank 6 '%s' 2>/dev/null", mp, in_path), 2, "no -o: usage");
	cr_assert_eq(tu_sh("'%s' molae --rank -3 '%s' -o x 2>/dev/null", mp, in_path), 2);
	cr_assert_eq(tu_sh("'%s' molae --rank 6 --group-size 3 '%s' -o '%s/y' 2>/dev/null", mp, in_path, dir), 1);
}
