/* Description: MoLAE latent experts (kernels/latent.c, issue 15 item 4):
 * the latent FFN against the dense expert on the reconstruction
 * W = A B (f32 within 2e-5 of the output scale; bf16 weights within 2e-2:
 * the bf16 kernels may round z to bf16), every ISA; z once per (token,
 * group) through the zcache gives the same bits as one token alone; a pack
 * made by molae_convert loads (B, groups) and at full rank computes the
 * original dense experts; hostile layouts and packs are refused; the CUDA
 * launcher's geometry. */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "ffn.h"
#include "latent.h"
#include "latent_cuda.h"
#include "molae.h"
#include "pack.h"
#include "testutil.h"

static double urand(uint64_t *s)
{
	*s = *s * 6364136223846793005ull + 1442695040888963407ull;
	return (double)(*s >> 11) / (double)(1ull << 53) * 2.0 - 1.0;
}

static void cfg_init(struct moe_model_config *c, uint32_t n, uint32_t m, uint32_t E, uint32_t L)
{
	memset(c, 0, sizeof(*c));
	snprintf(c->name, sizeof(c->name), "latent-test");
	moe_model_set_family_defaults(c, MOE_FAMILY_QWEN2_MOE);
	c->dtype = MOE_DTYPE_F32;
	c->hidden = n;
	c->expert_width = m;
	c->n_experts = E;
	c->top_k = 2;
	c->n_layers = L;
	c->n_moe_layers = L;
	c->moe_layer_step = 1;
}

/* Rows of floats stored as dt (f32 or bf16) at dst; the values actually
 * stored written back to W (so the reconstruction uses them). */
static size_t store(enum moe_dtype dt, float *W, size_t count, uint8_t *dst)
{
	if (dt == MOE_DTYPE_F32) {
		memcpy(dst, W, count * 4);
		return count * 4;
	}
	uint16_t *h = (uint16_t *)dst;
	for (size_t i = 0; i < count; i++) {
		h[i] = moe_f32_to_bf16(W[i]);
		W[i] = moe_bf16_to_f32(h[i]);
	}
	return count * 2;
}

static double max_rel(const float *a, const float *b, size_t len)
{
	double d = 0, s = 0;
	for (size_t i = 0; i < len; i++) {
		d = fmax(d, fabs((double)a[i] - b[i]));
		s = fmax(s, fabs((double)b[i]));
	}
	return d / fmax(s, 1e-30);
}

/* One expert, latent (A_gate | A_up | down in dt) vs dense on the
 * reconstruction (gate = A_gate B_gate, up = A_up B_up, f32). */
static void latent_vs_dense(enum moe_dtype dt, uint32_t n, uint32_t m, uint32_t r, uint32_t T, double tol)
{
	struct moe_model_config c;
	struct moe_error err = { "" };
	cfg_init(&c, n, m, 1, 1);
	uint64_t s = 1234 + n + m + r;
	struct latent_basis *b;
	cr_assert_eq(latent_basis_alloc(n, r, 1, 1, 1, &b), 0);
	for (int up = 0; up < 2; up++) {
		float *B = latent_basis_b(b, 0, 0, up);
		for (size_t i = 0; i < (size_t)r * n; i++)
			B[i] = (float)(urand(&s) / sqrt(n));
	}
	float *Ag = malloc(sizeof(float) * m * r), *Au = malloc(sizeof(float) * m * r), *D = malloc(sizeof(float) * n * m);
	for (size_t i = 0; i < (size_t)m * r; i++) {
		Ag[i] = (float)urand(&s);
		Au[i] = (float)urand(&s);
	}
	for (size_t i = 0; i < (size_t)n * m; i++)
		D[i] = (float)(urand(&s) / sqrt(m));
	const size_t es = moe_dtype_block_bytes(dt);
	struct pack_part_desc lp[3] = {
		{ PACK_ROLE_LATENT_A_GATE, dt, m, r, 0, (uint64_t)m * r * es },
		{ PACK_ROLE_LATENT_A_UP, dt, m, r, (uint64_t)m * r * es, (uint64_t)m * r * es },
		{ PACK_ROLE_DOWN, dt, n, m, 2ull * m * r * es, (uint64_t)n * m * es },
	};
	const size_t lbytes = (2ull * m * r + (size_t)n * m) * es;
	uint8_t *lext = malloc(lbytes);
	size_t o = store(dt, Ag, (size_t)m * r, lext);
	o += store(dt, Au, (size_t)m * r, lext + o);
	store(dt, D, (size_t)n * m, lext + o);
	/* dense f32 reconstruction */
	struct pack_part_desc dp[3] = {
		{ PACK_ROLE_GATE, MOE_DTYPE_F32, m, n, 0, (uint64_t)m * n * 4 },
		{ PACK_ROLE_UP, MOE_DTYPE_F32, m, n, (uint64_t)m * n * 4, (uint64_t)m * n * 4 },
		{ PACK_ROLE_DOWN, MOE_DTYPE_F32, n, m, 8ull * m * n, (uint64_t)n * m * 4 },
	};
	float *dext = malloc(sizeof(float) * 3 * (size_t)m * n);
	for (int up = 0; up < 2; up++) {
		const float *A = up ? Au : Ag, *B = latent_basis_b(b, 0, 0, up);
		for (uint32_t i = 0; i < m; i++)
			for (uint32_t j = 0; j < n; j++) {
				double v = 0;
				for (uint32_t q = 0; q < r; q++)
					v += (double)A[(size_t)i * r + q] * B[(size_t)q * n + j];
				dext[((size_t)up * m + i) * n + j] = (float)v;
			}
	}
	memcpy(dext + 2 * (size_t)m * n, D, sizeof(float) * n * m);
	struct latent_layout L;
	struct ffn_layout F;
	cr_assert_eq(latent_layout_init(&L, &c, lp, 3, lbytes, &err), 0, "%s", err.msg);
	cr_assert_eq(L.r, r);
	cr_assert_eq(L.weight_bytes, lbytes);
	cr_assert_eq(latent_layout_flops_per_token(&L), 2ull * (2ull * m * r + (uint64_t)m * n));
	cr_assert_eq(ffn_layout_init(&F, &c, dp, 3, 12ull * m * n, &err), 0, "%s", err.msg);
	float *x = malloc(sizeof(float) * T * n), *y0 = malloc(sizeof(float) * T * n), *y1 = malloc(sizeof(float) * T * n);
	for (size_t i = 0; i < (size_t)T * n; i++)
		x[i] = (float)urand(&s);
	for (int isa = 0; isa < FFN_ISA_COUNT; isa++) {
		if (!ffn_isa_supported((enum ffn_isa)isa))
			continue;
		cr_assert_eq(ffn_set_isa((enum ffn_isa)isa), 0);
		cr_assert_eq(ffn_expert(&F, dext, x, n, T, y0, n, NULL, 0, 1), 0);
		cr_assert_eq(latent_expert_x(&L, b, 0, 0, lext, x, n, T, y1, n, 2), 0);
		double e = max_rel(y1, y0, (size_t)T * n);
		cr_assert(e <= tol, "%s %s n %u m %u r %u: latent vs dense reconstruction %.3g > %.3g",
			  ffn_isa_name((enum ffn_isa)isa), moe_dtype_name(dt), n, m, r, e, tol);
		/* accumulate: y += 0.5 * expert */
		float scale[64];
		for (uint32_t t = 0; t < T; t++)
			scale[t] = 0.5f;
		float *z = malloc(sizeof(float) * T * 2 * r);
		cr_assert_eq(latent_project(b, 0, 0, x, n, T, z, 2 * r, 1), 0);
		memcpy(y0, y1, sizeof(float) * T * n);
		cr_assert_eq(latent_expert(&L, lext, z, 2 * r, T, y0, n, scale, FFN_ACCUMULATE, 1), 0);
		for (size_t i = 0; i < (size_t)T * n; i++)
			cr_assert_eq(y0[i], y1[i] + 0.5f * y1[i]);
		free(z);
	}
	ffn_set_isa(ffn_isa_best());
	free(Ag), free(Au), free(D), free(lext), free(dext), free(x), free(y0), free(y1);
	latent_basis_free(b);
}

Test(latent, f32_matches_dense_reconstruction)
{
	latent_vs_dense(MOE_DTYPE_F32, 96, 32, 32, 5, 2e-5);
	latent_vs_dense(MOE_DTYPE_F32, 64, 48, 20, 1, 2e-5); /* r not a multiple of anything */
}

Test(latent, bf16_matches_dense_reconstruction)
{
	latent_vs_dense(MOE_DTYPE_BF16, 128, 64, 32, 3, 2e-2);
}

/* z once per (token, group): the zcache and latent_expert_tokens give the
 * bits of each token computed alone. */
Test(latent, zcache_once_per_token_and_group_same_bits)
{
	enum { n = 64, m = 32, r = 32, E = 4, T = 6, k = 2 };
	struct moe_model_config c;
	struct moe_error err = { "" };
	cfg_init(&c, n, m, E, 1);
	struct latent_basis *b;
	cr_assert_eq(latent_basis_alloc(n, r, 1, E, 2, &b), 0); /* groups {0,1}, {2,3} */
	cr_assert_eq(b->max_groups, 2);
	uint64_t s = 99;
	for (size_t i = 0; i < 2ull * 2 * r * n; i++)
		b->b[i] = (float)(urand(&s) * 0.1);
	const size_t eb = (2ull * m * r + (size_t)n * m) * 4;
	struct pack_part_desc lp[3] = {
		{ PACK_ROLE_LATENT_A_GATE, MOE_DTYPE_F32, m, r, 0, (uint64_t)m * r * 4 },
		{ PACK_ROLE_LATENT_A_UP, MOE_DTYPE_F32, m, r, (uint64_t)m * r * 4, (uint64_t)m * r * 4 },
		{ PACK_ROLE_DOWN, MOE_DTYPE_F32, n, m, 8ull * m * r, (uint64_t)n * m * 4 },
	};
	struct latent_layout L;
	cr_assert_eq(latent_layout_init(&L, &c, lp, 3, eb, &err), 0, "%s", err.msg);
	float *ext = malloc(eb * E);
	for (size_t i = 0; i < eb / 4 * E; i++)
		ext[i] = (float)(urand(&s) * 0.2);
	float x[T * n];
	for (size_t i = 0; i < T * n; i++)
		x[i] = (float)urand(&s);
	/* token t routes to experts (t % 4, (t + 1) % 4); token 5 also pads a slot */
	uint32_t ex[T * k];
	for (uint32_t t = 0; t < T; t++) {
		ex[t * k] = t % E;
		ex[t * k + 1] = (t + 1) % E;
	}
	ex[5 * k + 1] = UINT32_MAX;
	struct latent_zcache zc = { 0 };
	cr_assert_eq(latent_zcache_fill(&zc, b, 0, x, n, T, k, ex, 1), 0);
	/* group 0 (experts 0, 1): tokens 0 1 3 4 5; group 1 (2, 3): 1 2 3 */
	cr_assert_eq(zc.rows, 5 + 3, "rows %u", zc.rows);
	cr_assert_null(latent_zcache_row(&zc, 0, 2));
	cr_assert_null(latent_zcache_row(&zc, 1, 0));
	for (uint32_t e = 0; e < E; e++) {
		uint32_t tok[T], cnt = 0;
		for (uint32_t t = 0; t < T; t++)
			if (ex[t * k] == e || ex[t * k + 1] == e)
				tok[cnt++] = t;
		float out[T * n], one[n];
		cr_assert_eq(latent_expert_tokens(&L, b, &zc, 0, e, (uint8_t *)ext + e * eb, tok, cnt, out, n, 1), 0);
		for (uint32_t i = 0; i < cnt; i++) {
			cr_assert_eq(latent_expert_x(&L, b, 0, e, (uint8_t *)ext + e * eb, x + tok[i] * n, n, 1, one, n, 1), 0);
			cr_assert(!memcmp(one, out + i * n, sizeof(one)), "expert %u token %u differs", e, tok[i]);
		}
	}
	/* a token the fill did not project for the group is refused */
	uint32_t bad = 2;
	float out[n];
	cr_assert_eq(latent_expert_tokens(&L, b, &zc, 0, 0, ext, &bad, 1, out, n, 1), -EINVAL);
	cr_assert_eq(zc.z_rows_total, 8);
	latent_zcache_free(&zc);
	free(ext);
	latent_basis_free(b);
}

/* ---- through a pack made by molae_convert ---- */

#define PN 48
#define PM 8
#define PE 8
#define PL 2

static char *dir;
static char in_path[512], out_path[512];

static void setup(void)
{
	dir = tu_mkdtemp("latent");
	snprintf(in_path, sizeof(in_path), "%s/in.moepack", dir);
	snprintf(out_path, sizeof(out_path), "%s/out.moepack", dir);
}

static void teardown(void)
{
	tu_rmtree(dir);
}

static void write_dense(const char *path)
{
	struct moe_model_config c;
	struct pack_part_desc parts[3] = {
		{ .role = PACK_ROLE_GATE, .dtype = MOE_DTYPE_F32, .rows = PM, .cols = PN },
		{ .role = PACK_ROLE_UP, .dtype = MOE_DTYPE_F32, .rows = PM, .cols = PN },
		{ .role = PACK_ROLE_DOWN, .dtype = MOE_DTYPE_F32, .rows = PN, .cols = PM },
	};
	struct pack_writer *w;
	struct moe_error err = { "" };
	float W[PM * PN];
	uint64_t s = 5;
	cfg_init(&c, PN, PM, PE, PL);
	cr_assert_eq(pack_writer_create(path, &c, parts, 3, "test", &w, &err), 0, "%s", err.msg);
	for (uint32_t l = 0; l < PL; l++)
		for (uint32_t e = 0; e < PE; e++) {
			cr_assert_eq(pack_writer_begin_expert(w, l, e, &err), 0, "%s", err.msg);
			for (int p = 0; p < 3; p++) {
				for (size_t i = 0; i < PM * PN; i++)
					W[i] = (float)(urand(&s) * 0.3);
				cr_assert_eq(pack_writer_write(w, W, sizeof(W), &err), 0, "%s", err.msg);
			}
			cr_assert_eq(pack_writer_end_expert(w, &err), 0, "%s", err.msg);
		}
	cr_assert_eq(pack_writer_finish(w, &err), 0, "%s", err.msg);
}

static void convert(uint32_t rank, uint32_t k)
{
	struct molae_options o = { .rank = rank, .group_size = k };
	struct molae_report *rep;
	struct moe_error err = { "" };
	cr_assert_eq(molae_convert(in_path, out_path, &o, &rep, &err), 0, "%s", err.msg);
	molae_report_free(rep);
}

TestSuite(latent_pack, .init = setup, .fini = teardown, .timeout = 60);

/* At full rank (r = n: B orthonormal and square) the latent pack computes
 * the original dense experts to f32 rounding; at a low rank it computes the
 * dense expert on its reconstruction A B. */
Test(latent_pack, full_rank_equals_original_and_low_rank_equals_reconstruction)
{
	struct moe_error err = { "" };
	write_dense(in_path);
	for (int pass = 0; pass < 2; pass++) {
		const uint32_t rank = pass ? 12 : PN, k = pass ? 4 : PE;
		convert(rank, k);
		struct pack_file *in, *out;
		cr_assert_eq(pack_open(in_path, PACK_OPEN_NO_DIRECT, &in, &err), 0, "%s", err.msg);
		cr_assert_eq(pack_open(out_path, PACK_OPEN_NO_DIRECT, &out, &err), 0, "%s", err.msg);
		struct latent_basis *b;
		struct latent_layout L;
		struct ffn_layout F;
		cr_assert(latent_parts_present(out->hdr->parts, out->hdr->n_parts));
		cr_assert(!latent_parts_present(in->hdr->parts, in->hdr->n_parts));
		cr_assert_eq(latent_basis_load(out, &b, &err), 0, "%s", err.msg);
		cr_assert_eq(b->r, rank);
		cr_assert_eq(b->max_groups, PE / k);
		cr_assert_eq(b->bytes, (uint64_t)PL * (PE / k) * 2 * rank * PN * 4);
		cr_assert_eq(latent_layout_init(&L, out->model, out->hdr->parts, out->hdr->n_parts, pack_extent_bytes(out),
					     &err), 0, "%s", err.msg);
		cr_assert_eq(ffn_layout_init(&F, in->model, in->hdr->parts, in->hdr->n_parts, pack_extent_bytes(in), &err), 0);
		void *le = aligned_alloc(4096, pack_extent_bytes(out)), *de = aligned_alloc(4096, pack_extent_bytes(in));
		float dense[3 * PM * PN];
		float x[3 * PN], y0[3 * PN], y1[3 * PN];
		uint64_t s = 77;
		for (size_t i = 0; i < 3 * PN; i++)
			x[i] = (float)urand(&s);
		for (uint32_t l = 0; l < PL; l++)
			for (uint32_t e = 0; e < PE; e++) {
				cr_assert_eq(pack_read_expert(out, l, e, le, &err), 0, "%s", err.msg);
				cr_assert_eq(latent_basis_group(b, l, e), (int32_t)(e / k));
				if (pass == 0) {
					cr_assert_eq(pack_read_expert(in, l, e, de, &err), 0, "%s", err.msg);
				} else {
					/* reconstruction A B in the dense layout */
					const float *A[2] = { (const float *)((uint8_t *)le + L.a_gate.offset),
							      (const float *)((uint8_t *)le + L.a_up.offset) };
					for (int up = 0; up < 2; up++) {
						const float *B = latent_basis_b(b, l, (uint32_t)(e / k), up);
						for (uint32_t i = 0; i < PM; i++)
							for (uint32_t j = 0; j < PN; j++) {
								double v = 0;
								for (uint32_t q = 0; q < rank; q++)
									v += (double)A[up][i * rank + q] * B[q * PN + j];
								dense[(up * PM + i) * PN + j] = (float)v;
							}
					}
					memcpy(dense + 2 * PM * PN, (uint8_t *)le + L.down.offset, sizeof(float) * PN * PM);
					memcpy(de, dense, sizeof(dense));
				}
				cr_assert_eq(ffn_expert(&F, de, x, PN, 3, y0, PN, NULL, 0, 1), 0);
				cr_assert_eq(latent_expert_x(&L, b, l, e, le, x, PN, 3, y1, PN, 1), 0);
				double d = max_rel(y1, y0, 3 * PN);
				cr_assert(d <= 2e-5, "rank %u layer %u expert %u: %.3g", rank, l, e, d);
			}
		free(le), free(de);
		latent_basis_free(b);
		pack_close(in);
		pack_close(out);
	}
}

Test(latent_pack, hostile_inputs_refused)
{
	struct moe_error err = { "" };
	struct moe_model_config c;
	write_dense(in_path);
	struct pack_file *in;
	struct latent_basis *b;
	cr_assert_eq(pack_open(in_path, PACK_OPEN_NO_DIRECT, &in, &err), 0, "%s", err.msg);
	cr_assert_eq(latent_basis_load(in, &b, &err), -EINVAL);
	cr_assert(strstr(err.msg, "not a MoLAE latent pack"), "%s", err.msg);
	pack_close(in);

	cfg_init(&c, 64, 32, 4, 1);
	struct latent_layout L;
	struct pack_part_desc lp[3] = {
		{ PACK_ROLE_LATENT_A_GATE, MOE_DTYPE_F32, 32, 16, 0, 32 * 16 * 4 },
		{ PACK_ROLE_LATENT_A_UP, MOE_DTYPE_F32, 32, 8, 32 * 16 * 4, 32 * 8 * 4 }, /* rank differs */
		{ PACK_ROLE_DOWN, MOE_DTYPE_F32, 64, 32, 32 * 24 * 4, 64 * 32 * 4 },
	};
	cr_assert_eq(latent_layout_init(&L, &c, lp, 3, 1 << 20, &err), -EINVAL);
	cr_assert(strstr(err.msg, "A_up is [32 x 8]"), "%s", err.msg);
	lp[1].cols = 16;
	lp[1].bytes = 32 * 16 * 4;
	cr_assert_eq(latent_layout_init(&L, &c, lp, 3, 8192, &err), -EINVAL); /* past the extent */
	cr_assert(strstr(err.msg, "run past"), "%s", err.msg);
	lp[0].cols = lp[1].cols = 65; /* rank > hidden */
	cr_assert_eq(latent_layout_init(&L, &c, lp, 3, 1 << 20, &err), -EINVAL);
	cr_assert(strstr(err.msg, "rank 65"), "%s", err.msg);
	lp[0].cols = lp[1].cols = 16;
	lp[0].dtype = lp[1].dtype = MOE_DTYPE_Q8_0; /* 16 columns are not whole q8_0 blocks */
	lp[0].bytes = lp[1].bytes = 0;
	cr_assert_eq(latent_layout_init(&L, &c, lp, 3, 1 << 20, &err), -EINVAL);
	/* a dense layout is not latent */
	struct pack_part_desc dp[1] = { { PACK_ROLE_GATE, MOE_DTYPE_F32, 32, 64, 0, 32 * 64 * 4 } };
	cr_assert_eq(latent_layout_init(&L, &c, dp, 1, 1 << 20, &err), -EINVAL);
	cr_assert_eq(latent_basis_alloc(64, 16, 1, 6, 4, &b), -EINVAL); /* 4 does not divide 6 */
}

/* ---- the CUDA launcher (host side; the kernels run in scripts/gpu-check) ---- */

struct launch_log {
	int n;
	char name[4][32];
	uint32_t grid[4][3], block[4];
};

static int fake_launch(void *ctx, const char *kernel, const uint32_t grid[3], uint32_t block,
		       const struct latent_cuda_args *a)
{
	struct launch_log *lg = ctx;
	cr_assert(a->n == 2048 && a->m == 1024 && a->r == 1024);
	snprintf(lg->name[lg->n], sizeof(lg->name[0]), "%s", kernel);
	memcpy(lg->grid[lg->n], grid, sizeof(uint32_t) * 3);
	lg->block[lg->n++] = block;
	return 0;
}

Test(latent, cuda_launcher_geometry)
{
	struct moe_model_config c;
	struct moe_error err = { "" };
	cfg_init(&c, 2048, 1024, 64, 1);
	const uint64_t ab = 1024ull * 1024 * 2;
	struct pack_part_desc lp[3] = {
		{ PACK_ROLE_LATENT_A_GATE, MOE_DTYPE_BF16, 1024, 1024, 0, ab },
		{ PACK_ROLE_LATENT_A_UP, MOE_DTYPE_BF16, 1024, 1024, ab, ab },
		{ PACK_ROLE_DOWN, MOE_DTYPE_BF16, 2048, 1024, 2 * ab, 2 * ab },
	};
	struct latent_layout L;
	cr_assert_eq(latent_layout_init(&L, &c, lp, 3, 4 * ab, &err), 0, "%s", err.msg);
	cr_assert_eq(latent_cuda_layout_check(&L, &err), 0, "%s", err.msg);
	struct latent_cuda_args a = { .arena = 1, .basis = 1, .x = 1, .z = 1, .h = 1, .y = 1, .group_slot = 1,
				      .group_start = 1, .pair_token = 1, .pair_weight = 1, .pair_zrow = 1,
				      .zrow_token = 1, .zrow_group = 1, .n_groups = 7, .max_group_pairs = 40,
				      .n_zrows = 5, .n_tokens = 5 };
	struct launch_log lg = { 0 };
	cr_assert_eq(latent_cuda_run(&L, &a, fake_launch, &lg, &err), 0, "%s", err.msg);
	cr_assert_eq(lg.n, 3);
	cr_assert_str_eq(lg.name[0], "moe_latent_z");
	cr_assert(lg.grid[0][0] == 2 * 1024 / LATENT_CUDA_WARPS && lg.grid[0][1] == 5);
	cr_assert_str_eq(lg.name[1], "moe_latent_gate_up");
	cr_assert(lg.grid[1][0] == 1024 / 32 && lg.grid[1][1] == 7 && lg.grid[1][2] == 2);
	cr_assert_str_eq(lg.name[2], "moe_latent_down");
	cr_assert(lg.grid[2][0] == 2048 / 32 && lg.grid[2][1] == 7 && lg.grid[2][2] == 2);
	cr_assert(a.down.rows == 2048 && a.down.cols == 1024 && a.a_gate.dtype == MOE_DTYPE_BF16 &&
		  a.a_up.offset == ab);
	a.z = 0;
	cr_assert_eq(latent_cuda_run(&L, &a, fake_launch, &lg, &err), -EINVAL);
	size_t len;
	const void *fb = latent_cuda_fatbin(&len);
#ifdef HAVE_NVCC
	cr_assert(fb && len > 1000, "no embedded latent fatbin");
#else
	cr_assert(!fb && !len);
#endif
}
