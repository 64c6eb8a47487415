/* ffn_cuda.h - the argument block of the CUDA grouped expert FFN
 * (kernels/ffn.cu), shared by the device code and host C callers. Plain C,
 * fixed-width fields, passed by value as the kernels' only parameter.
 *
 * Work is grouped by expert: group g owns pairs [group_start[g],
 * group_start[g+1]); pair p routes token pair_token[p] with weight
 * pair_weight[p] to the expert in arena slot group_slot[g], whose extent is
 * at arena + slot * slot_stride. Kernel moe_ffn_gate_up writes h[p][0..m)
 * for every pair; kernel moe_ffn_down adds pair_weight[p] * down(h[p]) (+
 * bias) into y[pair_token[p]] with atomicAdd, so y must hold zeros (or a
 * residual to add to) before the launch.
 *
 * Launch: block FFN_CUDA_THREADS threads; gate_up grid
 * (ceil(m / FFN_CUDA_TILE_ROWS), n_groups, ceil(max_group_pairs /
 * FFN_CUDA_TILE_PAIRS)); down grid (ceil(n / FFN_CUDA_TILE_ROWS), n_groups,
 * the same z). Both kernels check every index against n, m, n_tokens and
 * the group's pair count, so partial tiles are safe. Weights are read byte
 * by byte where a type's alignment is not guaranteed (parts may sit at any
 * offset in a pack extent). */
#ifndef MOETIER_FFN_CUDA_H
#define MOETIER_FFN_CUDA_H

#include <stdint.h>

#define FFN_CUDA_TILE_ROWS 32
#define FFN_CUDA_TILE_PAIRS 32
#define FFN_CUDA_TILE_K 32
#define FFN_CUDA_THREADS 256

struct ffn_cuda_mat {
	uint32_t dtype;      /* enum moe_dtype */
	uint32_t rows, cols;
	uint32_t pad0;
	uint64_t offset;     /* bytes from the extent start */
	uint64_t row_bytes;
};

struct ffn_cuda_args {
	uint64_t arena;        /* device address of slot 0 */
	uint64_t slot_stride;  /* bytes between slots */
	uint32_t kind;         /* enum moe_ffn_kind */
	uint32_t n, m;
	float limit, alpha;    /* GPT-OSS; limit 0 = no clamp, alpha 0 = 1 */
	uint32_t gu_bias_dtype, down_bias_dtype; /* MOE_DTYPE_INVALID (0) = none */
	uint32_t pad0;
	uint64_t gu_bias_offset, down_bias_offset;
	struct ffn_cuda_mat gate, up, gate_up, down;
	uint32_t n_groups;
	uint32_t max_group_pairs;
	uint32_t n_tokens;     /* rows of x and y; pairs naming a token >= n_tokens are skipped */
	uint32_t pad1;
	uint64_t group_slot;   /* const uint32_t[n_groups] */
	uint64_t group_start;  /* const uint32_t[n_groups + 1] */
	uint64_t pair_token;   /* const uint32_t[n_pairs] */
	uint64_t pair_weight;  /* const float[n_pairs] */
	uint64_t x;            /* const float[T][n] */
	uint64_t h;            /* float[n_pairs][m] scratch */
	uint64_t y;            /* float[T][n], accumulated */
};

#endif
