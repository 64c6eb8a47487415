/* latent_cuda.h - the argument block of the CUDA latent experts
 * (kernels/latent.cu), shared by the device code and host C callers
 * (kernels/latent.c: latent_cuda_run). Plain C, fixed-width fields, passed
 * by value as every kernel's only parameter.
 *
 * Three launches per layer call:
 *  1. moe_latent_z: z[q][0..2r) = [B_gate_g; B_up_g] x[zrow_token[q]] with
 *     g = zrow_group[q], once per (token, group) the routing touches. One
 *     warp per output element (lanes stride over n, shuffle reduction);
 *     grid (ceil(2r / LATENT_CUDA_WARPS), n_zrows).
 *  2. moe_latent_gate_up: h[p] = silu(A_gate z_gate) * (A_up z_up) for pair
 *     p, z = z[pair_zrow[p]]: the grouped tile GEMM of ffn.cu (32 rows x 32
 *     pairs, K = r in chunks of 32); grid (ceil(m / 32), n_groups,
 *     ceil(max_group_pairs / 32)).
 *  3. moe_latent_down: y[pair_token[p]] += pair_weight[p] * W_down h[p]
 *     (atomicAdd: zero y first); grid (ceil(n / 32), n_groups, the same z).
 * Groups here are the distinct experts of the call (group_slot: the arena
 * slot of each), as in ffn_cuda.h; the latent groups (shared B) appear only
 * through zrow_group. basis is the layer's B block on the device:
 * [latent groups][2][r x n] f32, gate then up (struct latent_basis order). */
#ifndef MOETIER_LATENT_CUDA_H
#define MOETIER_LATENT_CUDA_H

#include <stdint.h>

#define LATENT_CUDA_TILE_ROWS 32
#define LATENT_CUDA_TILE_PAIRS 32
#define LATENT_CUDA_TILE_K 32
#define LATENT_CUDA_THREADS 256
#define LATENT_CUDA_WARPS (LATENT_CUDA_THREADS / 32)

struct latent_cuda_mat {
	uint32_t dtype; /* enum moe_dtype */
	uint32_t rows, cols;
	uint32_t pad0;
	uint64_t offset; /* bytes from the extent start */
	uint64_t row_bytes;
};

struct latent_cuda_args {
	uint64_t arena;       /* device address of slot 0 */
	uint64_t slot_stride; /* bytes between slots */
	uint32_t n, m, r;
	uint32_t pad0;
	struct latent_cuda_mat a_gate, a_up, down;
	uint64_t basis;       /* const float[G][2][r][n] of this layer */
	uint32_t n_groups;    /* distinct experts */
	uint32_t max_group_pairs;
	uint32_t n_tokens;    /* rows of x and y */
	uint32_t n_zrows;     /* (token, latent group) projections */
	uint64_t group_slot;  /* const uint32_t[n_groups] */
	uint64_t group_start; /* const uint32_t[n_groups + 1] */
	uint64_t pair_token;  /* const uint32_t[n_pairs] */
	uint64_t pair_weight; /* const float[n_pairs] */
	uint64_t pair_zrow;   /* const uint32_t[n_pairs]: row of z */
	uint64_t zrow_token;  /* const uint32_t[n_zrows] */
	uint64_t zrow_group;  /* const uint32_t[n_zrows]: latent group */
	uint64_t x;           /* const float[T][n] */
	uint64_t z;           /* float[n_zrows][2r] scratch */
	uint64_t h;           /* float[n_pairs][m] scratch */
	uint64_t y;           /* float[T][n], accumulated */
};

#endif
