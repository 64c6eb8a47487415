/* Description: the COMPUTE engine on MoLAE latent experts (daemon/compute.c,
 * issue 15): compute_create refuses latent parts without a basis, a basis of
 * the wrong shape is refused (and freed), and compute_run - z once per
 * (token, group) of the request - equals latent_expert_x() weighted and
 * summed per token, bit for bit, for 1 and 3 workers and 2 kernel threads;
 * the counters and the latent stats lines. */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compute.h"
#include "latent.h"
#include "moetier/proto.h"

#define N 64
#define M 32
#define R 16
#define E 8
#define NL 2

static double urand(uint64_t *s)
{
	*s = *s * 6364136223846793005ull + 1442695040888963407ull;
	return (double)(*s >> 11) / (double)(1ull << 53) * 2.0 - 1.0;
}

static struct moe_model_config cfg;
static struct pack_part_desc parts[3] = {
	{ PACK_ROLE_LATENT_A_GATE, MOE_DTYPE_F32, M, R, 0, M * R * 4 },
	{ PACK_ROLE_LATENT_A_UP, MOE_DTYPE_F32, M, R, M * R * 4, M * R * 4 },
	{ PACK_ROLE_DOWN, MOE_DTYPE_F32, N, M, 2 * M * R * 4, N * M * 4 },
};
#define EXT_BYTES ((2 * M * R + N * M) * 4)
static float *exts; /* [NL][E] extents */

static void init(void)
{
	memset(&cfg, 0, sizeof(cfg));
	moe_model_set_family_defaults(&cfg, MOE_FAMILY_QWEN2_MOE);
	cfg.hidden = N;
	cfg.expert_width = M;
	cfg.n_experts = E;
	cfg.top_k = 2;
	cfg.n_layers = cfg.n_moe_layers = NL;
	cfg.moe_layer_step = 1;
	exts = malloc((size_t)NL * E * EXT_BYTES);
	uint64_t s = 17;
	for (size_t i = 0; i < (size_t)NL * E * EXT_BYTES / 4; i++)
		exts[i] = (float)(urand(&s) * 0.3);
}

static void fini(void)
{
	free(exts);
}

static struct latent_basis *basis(uint32_t n_layers)
{
	struct latent_basis *b;
	cr_assert_eq(latent_basis_alloc(N, R, n_layers, E, 4, &b), 0);
	uint64_t s = 5;
	for (size_t i = 0; i < (size_t)n_layers * b->max_groups * 2 * R * N; i++)
		b->b[i] = (float)(urand(&s) * 0.2);
	return b;
}

static const void *lookup(void *ctx, uint32_t layer, uint32_t expert)
{
	(void)ctx;
	return (const uint8_t *)exts + ((size_t)layer * E + expert) * EXT_BYTES;
}

TestSuite(molae_compute, .init = init, .fini = fini, .timeout = 60);

Test(molae_compute, refusals)
{
	struct compute_ctx *c;
	struct moe_error err = { "" };
	cr_assert_eq(compute_create(&cfg, parts, 3, EXT_BYTES, NULL, &c, &err), -EINVAL);
	cr_assert(strstr(err.msg, "needs its basis"), "%s", err.msg);
	cr_assert_eq(compute_create_latent(&cfg, parts, 3, EXT_BYTES, NULL, NULL, &c, &err), -EINVAL);
	/* one layer of B for a two-layer model: refused, the basis freed (ASan) */
	cr_assert_eq(compute_create_latent(&cfg, parts, 3, EXT_BYTES, basis(1), NULL, &c, &err), -EINVAL);
	cr_assert(strstr(err.msg, "does not fit"), "%s", err.msg);
	cr_assert_null(c);
}

Test(molae_compute, run_equals_latent_kernel)
{
	enum { T = 7, K = 2 };
	struct moe_error err = { "" };
	struct latent_basis *b = basis(NL);
	struct latent_basis *ref = basis(NL); /* the same values, for the reference */
	struct latent_layout L;
	cr_assert_eq(latent_layout_init(&L, &cfg, parts, 3, EXT_BYTES, &err), 0, "%s", err.msg);
	float x[T * N], y[T * N], yr[T * N], one[N], w[T * K];
	uint32_t ex[T * K];
	uint64_t s = 9;
	for (size_t i = 0; i < T * N; i++)
		x[i] = (float)urand(&s);
	for (uint32_t t = 0; t < T; t++) {
		ex[t * K] = (t * 3) % E;
		ex[t * K + 1] = (t * 5 + 2) % E;
		w[t * K] = 0.6f;
		w[t * K + 1] = 0.4f;
	}
	for (int workers = 1; workers <= 3; workers += 2) {
		struct compute_opts o = { .threads = workers, .kernel_threads = 2 };
		struct compute_ctx *c;
		struct latent_basis *bb = workers == 1 ? b : basis(NL);
		cr_assert_eq(compute_create_latent(&cfg, parts, 3, EXT_BYTES, bb, &o, &c, &err), 0, "%s", err.msg);
		cr_assert_not_null(compute_latent_layout(c));
		cr_assert_eq(compute_latent_basis(c)->r, R);
		for (uint32_t l = 0; l < NL; l++) {
			cr_assert_eq(compute_run(c, l, T, x, N, K, ex, w, y, N, lookup, NULL, &err), 0, "%s", err.msg);
			for (uint32_t t = 0; t < T; t++) {
				memset(yr + t * N, 0, sizeof(float) * N);
				for (uint32_t j = 0; j < K; j++) {
					cr_assert_eq(latent_expert_x(&L, ref, l, ex[t * K + j], lookup(NULL, l, ex[t * K + j]),
								     x + t * N, N, 1, one, N, 1), 0);
					ffn_axpy(yr + t * N, w[t * K + j], one, N);
				}
			}
			cr_assert(!memcmp(y, yr, sizeof(y)), "layer %u, %d workers: COMPUTE differs from the latent kernel", l,
				  workers);
		}
		struct compute_counters cc;
		compute_get_counters(c, &cc);
		cr_assert_eq(cc.requests, NL);
		cr_assert_gt(cc.latent_z_rows, 0);
		cr_assert_eq(cc.weight_bytes % L.weight_bytes, 0);
		char *txt = NULL;
		size_t len = 0;
		FILE *f = open_memstream(&txt, &len);
		compute_render(c, f, NULL, MOET_STATS_TEXT, true);
		fclose(f);
		cr_assert(strstr(txt, "compute_latent_rank") && strstr(txt, "compute_latent_b_bytes"), "%s", txt);
		free(txt);
		compute_destroy(c);
	}
	latent_basis_free(ref);
}
