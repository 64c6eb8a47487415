/* latent.h - MoLAE latent experts on the CPU (issue 15 item 4; the pack
 * layout is doc/molae.md, the math ../shared/reference/molae.md).
 *
 * Expert i of group g of MoE layer l:
 *   z_gate = B_gate_g x, z_up = B_up_g x          (once per token and group)
 *   y_i = W_down_i (silu(A_gate_i z_gate) * (A_up_i z_up))
 * B_* [r x n] f32 are resident (one pair per layer and group, loaded once per
 * model: struct latent_basis); the extent holds A_gate_i, A_up_i [m x r] and
 * W_down_i [n x m] in any dtype the FFN kernels take.
 *
 * Every product goes through ffn_matmul (kernels/ffn.h: the same dtype
 * kernels, ISA dispatch, q8 modes and thread pool as the dense experts), so
 * the results do not depend on the batch size, the grouping of tokens, nor
 * the thread count: a token computed alone, in a batch, by moe-run or by the
 * daemon's COMPUTE gives the same bits. */
#ifndef MOETIER_LATENT_H
#define MOETIER_LATENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ffn.h"
#include "model.h"
#include "pack.h"
#include "util.h"

/* Where a latent expert's matrices are in its extent. */
struct latent_layout {
	uint32_t n, m, r;         /* hidden, expert width, latent rank */
	struct ffn_mat a_gate;    /* [m x r] */
	struct ffn_mat a_up;      /* [m x r] */
	struct ffn_mat down;      /* [n x m] */
	uint64_t payload;         /* bytes of the extent the parts cover */
	uint64_t weight_bytes;    /* matrix bytes streamed per expert run */
};

/* Whether the parts describe a latent (MoLAE) extent. */
bool latent_parts_present(const struct pack_part_desc *parts, uint32_t n_parts);
/* Resolves and checks the parts (roles LATENT_A_GATE, LATENT_A_UP, DOWN;
 * shapes [m x r], [m x r], [n x m] with r taken from A_gate; dtypes the
 * kernels take with whole blocks; inside extent_bytes). 0 or -EINVAL. */
int latent_layout_init(struct latent_layout *L, const struct moe_model_config *cfg,
		       const struct pack_part_desc *parts, uint32_t n_parts, uint64_t extent_bytes,
		       struct moe_error *err);
/* 2 x multiply-adds of one token through one expert, z excluded: 2(2mr + mn). */
uint64_t latent_layout_flops_per_token(const struct latent_layout *L);
/* 2 x multiply-adds of z for one token and group: 2(2rn). */
uint64_t latent_layout_flops_z(const struct latent_layout *L);

/* The resident half of a latent model: every B and each expert's group. */
struct latent_basis {
	uint32_t n, r, n_layers, n_experts;
	uint32_t max_groups;       /* groups per layer, at most */
	uint32_t *n_groups;        /* [n_layers] */
	int32_t *group_of;         /* [n_layers * n_experts] */
	float *b;                  /* [n_layers][max_groups][2][r x n]: gate then up */
	uint64_t bytes;            /* bytes of the B matrices actually present (f32) */
};

/* Reads every blk.L.molae_b_{gate,up}.G and blk.L.molae_groups from the
 * pack's resident region (CRC checked) and checks them against the model
 * (shape [r x n] f32, groups in range and each with both B). r is the
 * pack's (A_gate's cols). 0, -EINVAL (message), -ENOMEM, -EIO. */
int latent_basis_load(const struct pack_file *p, struct latent_basis **out, struct moe_error *err);
/* An empty basis for n_layers x n_experts, groups of group_size contiguous
 * experts, B zero: for tests and tools that fill b themselves. */
int latent_basis_alloc(uint32_t n, uint32_t r, uint32_t n_layers, uint32_t n_experts, uint32_t group_size,
		       struct latent_basis **out);
void latent_basis_free(struct latent_basis *b);
/* B_gate (up = 0) or B_up (up = 1) of (layer, group): [r x n] f32. */
static inline float *latent_basis_b(const struct latent_basis *b, uint32_t layer, uint32_t group, int up)
{
	return b->b + (((size_t)layer * b->max_groups + group) * 2 + (up ? 1 : 0)) * (size_t)b->r * b->n;
}
static inline int32_t latent_basis_group(const struct latent_basis *b, uint32_t layer, uint32_t expert)
{
	return b->group_of[(size_t)layer * b->n_experts + expert];
}

/* z for T tokens of one (layer, group): z[t*ldz + 0..r) = B_gate x_t,
 * z[t*ldz + r..2r) = B_up x_t (ldz >= 2r). 0 or a negative errno. */
int latent_project(const struct latent_basis *b, uint32_t layer, uint32_t group, const float *x, size_t ldx,
		   uint32_t T, float *z, size_t ldz, int threads);

/* One latent expert over B tokens given their z ([B x 2r] rows ldz apart,
 * gate half then up half): y [B x n] stride ldy; flags and scale as
 * ffn_expert (FFN_ACCUMULATE: y[t] += scale[t] * out[t] through ffn_axpy).
 * 0, -EINVAL, -ENOMEM. */
int latent_expert(const struct latent_layout *L, const void *extent, const float *z, size_t ldz, uint32_t B,
		  float *y, size_t ldy, const float *scale, unsigned flags, int threads);

/* The same from x: z computed here (for tests and single calls; callers
 * with several experts per group use latent_zcache). */
int latent_expert_x(const struct latent_layout *L, const struct latent_basis *b, uint32_t layer, uint32_t expert,
		    const void *extent, const float *x, size_t ldx, uint32_t B, float *y, size_t ldy, int threads);

/* z once per (token, group) for one layer call: fill it from the routing,
 * then any number of experts (from any number of threads) read it. */
struct latent_zcache {
	uint32_t T, G, r;      /* tokens and groups of the last fill */
	int32_t *row;          /* [G x T]: row of z for (group, token), or -1 */
	float *z;              /* [rows x 2r] */
	uint32_t rows;
	size_t cap_row, cap_z; /* allocated elements */
	uint64_t z_rows_total; /* (token, group) projections computed, summed over fills */
};
/* Computes z for every (token, group) that the routing touches: experts is
 * [T x k] (expert ids; ids >= n_experts are skipped, so padded slots may hold
 * UINT32_MAX). Tokens of a group are projected in one batch. 0, -EINVAL,
 * -ENOMEM. */
int latent_zcache_fill(struct latent_zcache *zc, const struct latent_basis *b, uint32_t layer, const float *x,
		       size_t ldx, uint32_t T, uint32_t k, const uint32_t *experts, int threads);
/* The z row of (group, token), or NULL when the fill did not compute it. */
static inline const float *latent_zcache_row(const struct latent_zcache *zc, uint32_t group, uint32_t token)
{
	if (group >= zc->G || token >= zc->T)
		return NULL;
	int32_t i = zc->row[(size_t)group * zc->T + token];
	return i < 0 ? NULL : zc->z + (size_t)i * 2 * zc->r;
}
void latent_zcache_free(struct latent_zcache *zc);

/* Expert `expert` of `layer` over cnt tokens tok[0..cnt) of the last fill:
 * out[i*ldo ...] = expert(x[tok[i]]). The z rows are gathered into a scratch
 * of its own (thread-safe against other experts of the same fill).
 * 0, -EINVAL (a token the fill did not project for this group), -ENOMEM. */
int latent_expert_tokens(const struct latent_layout *L, const struct latent_basis *b,
			 const struct latent_zcache *zc, uint32_t layer, uint32_t expert, const void *extent,
			 const uint32_t *tok, uint32_t cnt, float *out, size_t ldo, int threads);

/* ---- CUDA (kernels/latent.cu) ---- */

/* The embedded latent fatbin, or NULL when the build had no nvcc. */
const void *latent_cuda_fatbin(size_t *len);
/* 0 when the CUDA kernels decode every matrix of the layout (f32, f16,
 * bf16, q8_0, q4_0, mxfp4), else -ENOTSUP with a message. */
int latent_cuda_layout_check(const struct latent_layout *L, struct moe_error *err);

struct latent_cuda_args;
/* One kernel launch: the caller's driver binding (cuModuleGetFunction +
 * cuLaunchKernel, e.g. through daemon/cuda_api.h or a test's dlopen table)
 * with the kernel's name, grid, block and its one by-value parameter. */
typedef int (*latent_cuda_launch_fn)(void *ctx, const char *kernel, const uint32_t grid[3], uint32_t block,
				     const struct latent_cuda_args *args);
/* Fills the argument block from the layout and the device addresses in
 * `args` (arena, slot_stride, B, group tables, x, z, h, y: see
 * latent_cuda.h) and launches the three kernels in order: z per (token,
 * group), gate/up per pair, down per pair (y accumulated: zero it first).
 * 0 or the first launch error. */
int latent_cuda_run(const struct latent_layout *L, struct latent_cuda_args *args, latent_cuda_launch_fn launch,
		    void *ctx, struct moe_error *err);

#endif
