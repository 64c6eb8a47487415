/* Description: moe-run's latent experts glue (client/run/latent.c, issue 15):
 * a pack made by molae_convert opens (layout + every B), one layer call
 * projects z once per (token, group) the routing touches, and each expert
 * over its tokens gives the bits of latent_expert_x() per token; a dense
 * pack is not latent and is refused clearly. */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "../client/run/latent.h" /* not kernels/latent.h, which it includes */
#include "molae.h"
#include "pack.h"
#include "testutil.h"

#define N 64
#define M 32
#define E 8
#define NL 2

static double urand(uint64_t *s)
{
	*s = *s * 6364136223846793005ull + 1442695040888963407ull;
	return (double)(*s >> 11) / (double)(1ull << 53) * 2.0 - 1.0;
}

static void write_dense(const char *path)
{
	struct moe_model_config c;
	memset(&c, 0, sizeof(c));
	snprintf(c.name, sizeof(c.name), "molae-run-test");
	moe_model_set_family_defaults(&c, MOE_FAMILY_QWEN2_MOE);
	c.dtype = MOE_DTYPE_F32;
	c.hidden = N;
	c.expert_width = M;
	c.n_experts = E;
	c.top_k = 2;
	c.n_layers = c.n_moe_layers = NL;
	c.moe_layer_step = 1;
	struct pack_part_desc parts[3] = {
		{ .role = PACK_ROLE_GATE, .dtype = MOE_DTYPE_F32, .rows = M, .cols = N },
		{ .role = PACK_ROLE_UP, .dtype = MOE_DTYPE_F32, .rows = M, .cols = N },
		{ .role = PACK_ROLE_DOWN, .dtype = MOE_DTYPE_F32, .rows = N, .cols = M },
	};
	struct pack_writer *w;
	struct moe_error err = { "" };
	static float W[M * N];
	uint64_t s = 3;
	cr_assert_eq(pack_writer_create(path, &c, parts, 3, "test", &w, &err), 0, "%s", err.msg);
	for (uint32_t l = 0; l < NL; l++)
		for (uint32_t e = 0; e < E; e++) {
			cr_assert_eq(pack_writer_begin_expert(w, l, e, &err), 0, "%s", err.msg);
			for (int p = 0; p < 3; p++) {
				for (size_t i = 0; i < M * N; i++)
					W[i] = (float)(urand(&s) * 0.2);
				cr_assert_eq(pack_writer_write(w, W, sizeof(W), &err), 0, "%s", err.msg);
			}
			cr_assert_eq(pack_writer_end_expert(w, &err), 0, "%s", err.msg);
		}
	cr_assert_eq(pack_writer_finish(w, &err), 0, "%s", err.msg);
}

Test(molae_glue, layer_call_matches_latent_kernel, .timeout = 60)
{
	char *dir = tu_mkdtemp("molae-glue");
	char in[512], out[512];
	snprintf(in, sizeof(in), "%s/d.moepack", dir);
	snprintf(out, sizeof(out), "%s/l.moepack", dir);
	write_dense(in);
	struct molae_options o = { .rank = 32, .group_size = 4 };
	struct molae_report *rep;
	struct moe_error err = { "" };
	cr_assert_eq(molae_convert(in, out, &o, &rep, &err), 0, "%s", err.msg);
	molae_report_free(rep);

	struct pack_file *dp, *lp;
	struct run_latent *rl;
	cr_assert_eq(pack_open(in, PACK_OPEN_NO_DIRECT, &dp, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_open(out, PACK_OPEN_NO_DIRECT, &lp, &err), 0, "%s", err.msg);
	cr_assert(!run_latent_pack(dp));
	cr_assert(run_latent_pack(lp));
	cr_assert_eq(run_latent_open(dp, &rl, &err), -EINVAL);
	cr_assert_null(rl);
	cr_assert(strstr(err.msg, "MoLAE"), "%s", err.msg);
	cr_assert_eq(run_latent_open(lp, &rl, &err), 0, "%s", err.msg);
	cr_assert_eq(rl->L.r, 32);
	cr_assert_eq(rl->basis->max_groups, 2);
	cr_assert_eq(run_latent_expert_macs(rl, 3), 3ull * (2 * M * 32 + M * N));

	enum { B = 5 };
	float x[B * N], y[B * N], one[N];
	uint64_t s = 11;
	for (size_t i = 0; i < B * N; i++)
		x[i] = (float)urand(&s);
	struct route_result routes[B];
	memset(routes, 0, sizeof(routes));
	const uint32_t pick[B][2] = { { 0, 1 }, { 1, 5 }, { 6, 7 }, { 0, 3 }, { 4, 2 } };
	for (uint32_t t = 0; t < B; t++) {
		routes[t].n = 2;
		routes[t].experts[0] = pick[t][0];
		routes[t].experts[1] = pick[t][1];
	}
	void *ext = aligned_alloc(4096, pack_extent_bytes(lp));
	for (uint32_t l = 0; l < NL; l++) {
		cr_assert_eq(run_latent_layer(rl, l, x, B, routes, 1, &err), 0, "%s", err.msg);
		/* group 0 (experts 0-3): tokens 0 1 3 4; group 1 (4-7): 1 2 4 */
		cr_assert_eq(rl->zc.rows, 7);
		for (uint32_t e = 0; e < E; e++) {
			uint32_t tok[B], cnt = 0;
			for (uint32_t t = 0; t < B; t++)
				if (pick[t][0] == e || pick[t][1] == e)
					tok[cnt++] = t;
			cr_assert_eq(pack_read_expert(lp, l, e, ext, &err), 0, "%s", err.msg);
			cr_assert_eq(run_latent_expert(rl, e, ext, tok, cnt, y, N, 2), 0);
			for (uint32_t i = 0; i < cnt; i++) {
				cr_assert_eq(latent_expert_x(&rl->L, rl->basis, l, e, ext, x + tok[i] * N, N, 1, one, N, 1), 0);
				cr_assert(!memcmp(one, y + i * N, sizeof(one)), "layer %u expert %u token %u", l, e, tok[i]);
			}
		}
	}
	cr_assert_eq(run_latent_layer(rl, NL, x, B, routes, 1, &err), -EINVAL);
	free(ext);
	run_latent_close(rl);
	pack_close(dp);
	pack_close(lp);
	tu_rmtree(dir);
}
