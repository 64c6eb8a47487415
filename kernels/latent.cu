// latent.cu - MoLAE latent experts on the GPU (kernels/latent.h): the
// per-(token, group) projections z = [B_gate; B_up] x, then the grouped
// expert GEMMs of ffn.cu with K = r for gate/up (reading z instead of x) and
// the unchanged down projection. Weights are read from the expert's arena
// slot and dequantized in the kernel (f32, f16, bf16, q8_0, q4_0, mxfp4);
// B is f32 and resident. Accumulation is f32.
//
// Argument block and launch geometry: kernels/latent_cuda.h. Embedded by
// kernels/latent_fatbin.S and loaded with cuModuleLoadData.
#include <stdint.h>

#include "latent_cuda.h"

#define TR LATENT_CUDA_TILE_ROWS
#define TP LATENT_CUDA_TILE_PAIRS
#define TK LATENT_CUDA_TILE_K
#define NT LATENT_CUDA_THREADS

#include "cuda_common.cuh"

// z[q][i] = B_{gate|up}[i mod r] . x[token]: one warp per element; B rows
// and x are read coalesced (B of a layer, 2 r n floats, stays in L2 across
// the z rows of a call).
extern "C" __global__ void __launch_bounds__(NT) moe_latent_z(const latent_cuda_args a)
{
	const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
	const uint32_t i = blockIdx.x * LATENT_CUDA_WARPS + warp, q = blockIdx.y;
	if (i >= 2 * a.r || q >= a.n_zrows)
		return;
	const uint32_t tok = reinterpret_cast<const uint32_t *>(a.zrow_token)[q];
	const uint32_t grp = reinterpret_cast<const uint32_t *>(a.zrow_group)[q];
	if (tok >= a.n_tokens)
		return;
	const float *B = reinterpret_cast<const float *>(a.basis) + ((size_t)grp * 2 * a.r + i) * a.n;
	const float *x = reinterpret_cast<const float *>(a.x) + (size_t)tok * a.n;
	float s = 0.0f;
	for (uint32_t c = lane; c < a.n; c += 32)
		s = fmaf(B[c], x[c], s);
	for (int off = 16; off > 0; off >>= 1)
		s += __shfl_down_sync(0xffffffffu, s, off);
	if (!lane)
		reinterpret_cast<float *>(a.z)[(size_t)q * 2 * a.r + i] = s;
}

// h[p][i] = silu(A_gate z_gate) * (A_up z_up) for the group's pairs.
extern "C" __global__ void __launch_bounds__(NT) moe_latent_gate_up(const latent_cuda_args a)
{
	__shared__ float zgs[TP][TK + 1];
	__shared__ float zus[TP][TK + 1];
	__shared__ float wg[TR][TK + 1];
	__shared__ float wu[TR][TK + 1];

	const uint32_t g = blockIdx.y, i0 = blockIdx.x * TR;
	uint32_t p_end, p0;
	if (!block_tile(a, g, i0, a.m, &p_end, &p0))
		return; // uniform for the block: no barrier is skipped by some threads only
	const uint8_t *base = slot_base(a, g);
	const uint32_t *pz = reinterpret_cast<const uint32_t *>(a.pair_zrow);
	const float *z = reinterpret_cast<const float *>(a.z);

	const uint32_t tx = threadIdx.x % 16, ty = threadIdx.x / 16;
	float accg[2][2] = { { 0.0f, 0.0f }, { 0.0f, 0.0f } };
	float accu[2][2] = { { 0.0f, 0.0f }, { 0.0f, 0.0f } };

	for (uint32_t k0 = 0; k0 < a.r; k0 += TK) {
		for (uint32_t e = threadIdx.x; e < TP * TK; e += NT) {
			const uint32_t p = e / TK, k = e % TK;
			float vg = 0.0f, vu = 0.0f;
			if (p0 + p < p_end && k0 + k < a.r && pz[p0 + p] < a.n_zrows) {
				const float *zr = z + (size_t)pz[p0 + p] * 2 * a.r;
				vg = zr[k0 + k];
				vu = zr[a.r + k0 + k];
			}
			zgs[p][k] = vg;
			zus[p][k] = vu;
		}
		load_w_tile(wg, base, a.a_gate, i0, a.m, 1, 0, k0, a.r);
		load_w_tile(wu, base, a.a_up, i0, a.m, 1, 0, k0, a.r);
		__syncthreads();
#pragma unroll 8
		for (uint32_t k = 0; k < TK; k++) {
			fma2x2(accg, wg[ty * 2][k], wg[ty * 2 + 1][k], zgs[tx * 2][k], zgs[tx * 2 + 1][k]);
			fma2x2(accu, wu[ty * 2][k], wu[ty * 2 + 1][k], zus[tx * 2][k], zus[tx * 2 + 1][k]);
		}
		__syncthreads();
	}

	store_h(a, accg, accu, i0, p0, p_end, [](uint32_t, float gv, float uv) { return silu_mul(gv, uv); });
}

// y[token] += weight * W_down h[p] (no bias).
extern "C" __global__ void __launch_bounds__(NT) moe_latent_down(const latent_cuda_args a)
{
	grouped_down(a, 0u, 0u);
}
