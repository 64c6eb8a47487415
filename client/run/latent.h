/* latent.h - moe-run's MoLAE latent experts (issue 15 item 4): the glue
 * between the pack (resident B matrices and groups, per-expert extents
 * A_gate | A_up | W_down) and kernels/latent.h, so that experts.c computes a
 * latent pack with a few lines:
 *
 *   model_open:      if (run_latent_pack(m->pack)) run_latent_open(m->pack, &m->latent, err)
 *                    (and no ffn_layout_init: a latent extent has no gate/up);
 *   experts_layer:   after routing, run_latent_layer(m->latent, moe_l, x, B, ex->routes, threads, err)
 *                    computes z = B_g x once per (token, group) the routing touched;
 *   run_expert:      run_latent_expert(m->latent, e, extent, tok, cnt, yg, n, threads)
 *                    instead of gathering x and calling ffn_expert.
 *
 * The results are those of latent_expert_x() token by token (the daemon's
 * COMPUTE gives the same bits), whatever the batch, grouping or threads. */
#ifndef MOETIER_RUN_LATENT_H
#define MOETIER_RUN_LATENT_H

#include <stdbool.h>
#include <stdint.h>

#include "../../kernels/latent.h" /* this file shares its name */
#include "pack.h"
#include "route.h"
#include "util.h"

struct run_latent {
	struct latent_layout L;
	struct latent_basis *basis; /* every B, resident (bytes: basis->bytes) */
	struct latent_zcache zc;    /* z of the current layer call */
	uint32_t layer;             /* MoE layer of the current call */
	uint32_t *ids;              /* [cap_T * k] routed experts of the call */
	uint32_t cap_T, k;
};

/* Whether the pack's extents are latent (moe-pack molae). */
bool run_latent_pack(const struct pack_file *p);
/* Reads the layout and every B (checked against the model). 0 or -errno. */
int run_latent_open(const struct pack_file *p, struct run_latent **out, struct moe_error *err);
void run_latent_close(struct run_latent *rl);

/* One layer call's projections: z for every (token, group) that routes[0..B)
 * touch (x: [B x n], ffn_norm'ed). Must precede run_latent_expert for the
 * same call; not thread-safe against it. 0 or -errno. */
int run_latent_layer(struct run_latent *rl, uint32_t moe_layer, const float *x, uint32_t B,
		     const struct route_result *routes, int threads, struct moe_error *err);

/* Expert e of the current layer over cnt tokens tok[] (indices into the
 * layer call's x): y[i*ldy ...] = expert(x[tok[i]]). Thread-safe against
 * other experts of the same call. 0 or -errno. */
int run_latent_expert(const struct run_latent *rl, uint32_t e, const void *extent, const uint32_t *tok, uint32_t cnt,
		      float *y, size_t ldy, int threads);

/* Multiply-adds of cnt tokens through one expert (for a split threshold). */
uint64_t run_latent_expert_macs(const struct run_latent *rl, uint32_t cnt);

#endif
