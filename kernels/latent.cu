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
#include <cuda_fp16.h>

#include "latent_cuda.h"

// enum moe_dtype values (dtype.h: stored in packs, never renumbered).
#define DT_F32 1
#define DT_F16 2
#define DT_BF16 3
#define DT_Q8_0 4
#define DT_Q4_0 5
#define DT_MXFP4 6

#define TR LATENT_CUDA_TILE_ROWS
#define TP LATENT_CUDA_TILE_PAIRS
#define TK LATENT_CUDA_TILE_K
#define NT LATENT_CUDA_THREADS

static_assert(TR * TK % NT == 0 && TP * TK % NT == 0, "tile loads must divide evenly");
static_assert(NT == 256 && TR == 32 && TP == 32, "each thread computes a 2x2 output patch");

__constant__ int8_t c_kv_mxfp4[16] = { 0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12 };

// Parts may start at any offset in an extent: values are assembled from
// bytes (little-endian), as ffn.cu does.
__device__ __forceinline__ uint32_t u16_bytes(const uint8_t *p)
{
	return (uint32_t)p[0] | ((uint32_t)p[1] << 8);
}

__device__ __forceinline__ float f16_bytes(const uint8_t *p)
{
	return __half2float(__ushort_as_half((unsigned short)u16_bytes(p)));
}

__device__ __forceinline__ float e8m0_half(uint32_t e)
{
	return __uint_as_float(e < 2 ? 0x00200000u << e : (e - 1) << 23);
}

// Element c of one weight row, as moe_dequantize_row computes it.
__device__ __forceinline__ float dq(uint32_t dt, const uint8_t *row, uint32_t c)
{
	switch (dt) {
	case DT_F32: {
		const uint8_t *p = row + (size_t)c * 4;
		return __uint_as_float(u16_bytes(p) | (u16_bytes(p + 2) << 16));
	}
	case DT_F16:
		return f16_bytes(row + (size_t)c * 2);
	case DT_BF16:
		return __uint_as_float(u16_bytes(row + (size_t)c * 2) << 16);
	case DT_Q8_0: {
		const uint8_t *b = row + (size_t)(c / 32) * 34;
		return (float)(int8_t)b[2 + c % 32] * f16_bytes(b);
	}
	case DT_Q4_0: {
		const uint8_t *b = row + (size_t)(c / 32) * 18;
		const uint32_t j = c % 32, q = b[2 + (j & 15)];
		return (float)((int)(j < 16 ? q & 15 : q >> 4) - 8) * f16_bytes(b);
	}
	case DT_MXFP4: {
		const uint8_t *b = row + (size_t)(c / 32) * 17;
		const uint32_t j = c % 32, q = b[1 + (j & 15)];
		return (float)c_kv_mxfp4[j < 16 ? q & 15 : q >> 4] * e8m0_half(b[0]);
	}
	default:
		return 0.0f;
	}
}

__device__ __forceinline__ const uint8_t *slot_base(const latent_cuda_args &a, uint32_t g)
{
	const uint32_t slot = reinterpret_cast<const uint32_t *>(a.group_slot)[g];
	return reinterpret_cast<const uint8_t *>(a.arena) + (size_t)slot * a.slot_stride;
}

__device__ __forceinline__ void load_w_tile(float (*ws)[TK + 1], const uint8_t *base, const latent_cuda_mat &M,
					    uint32_t r0, uint32_t rows_valid, uint32_t k0, uint32_t K)
{
	for (uint32_t e = threadIdx.x; e < TR * TK; e += NT) {
		const uint32_t r = e / TK, k = e % TK;
		float v = 0.0f;
		if (r0 + r < rows_valid && k0 + k < K)
			v = dq(M.dtype, base + M.offset + (size_t)(r0 + r) * M.row_bytes, k0 + k);
		ws[r][k] = v;
	}
}

__device__ __forceinline__ void fma2x2(float acc[2][2], float w0, float w1, float x0, float x1)
{
	acc[0][0] = fmaf(w0, x0, acc[0][0]);
	acc[0][1] = fmaf(w0, x1, acc[0][1]);
	acc[1][0] = fmaf(w1, x0, acc[1][0]);
	acc[1][1] = fmaf(w1, x1, acc[1][1]);
}

__device__ __forceinline__ bool block_tile(const latent_cuda_args &a, uint32_t g, uint32_t row0, uint32_t rows,
					   uint32_t *p_end, uint32_t *p0)
{
	if (g >= a.n_groups)
		return false;
	const uint32_t *start = reinterpret_cast<const uint32_t *>(a.group_start);
	const uint32_t p_begin = start[g];
	*p_end = start[g + 1];
	*p0 = p_begin + blockIdx.z * TP;
	return *p_end > p_begin && *p0 < *p_end && row0 < rows;
}

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
		load_w_tile(wg, base, a.a_gate, i0, a.m, k0, a.r);
		load_w_tile(wu, base, a.a_up, i0, a.m, k0, a.r);
		__syncthreads();
#pragma unroll 8
		for (uint32_t k = 0; k < TK; k++) {
			fma2x2(accg, wg[ty * 2][k], wg[ty * 2 + 1][k], zgs[tx * 2][k], zgs[tx * 2 + 1][k]);
			fma2x2(accu, wu[ty * 2][k], wu[ty * 2 + 1][k], zus[tx * 2][k], zus[tx * 2 + 1][k]);
		}
		__syncthreads();
	}

	float *h = reinterpret_cast<float *>(a.h);
	for (int ri = 0; ri < 2; ri++) {
		const uint32_t i = i0 + ty * 2 + ri;
		if (i >= a.m)
			continue;
		for (int pi = 0; pi < 2; pi++) {
			const uint32_t p = p0 + tx * 2 + pi;
			if (p >= p_end)
				continue;
			const float gv = accg[ri][pi], uv = accu[ri][pi];
			h[(size_t)p * a.m + i] = gv / (1.0f + expf(-gv)) * uv;
		}
	}
}

// y[token] += weight * W_down h[p].
extern "C" __global__ void __launch_bounds__(NT) moe_latent_down(const latent_cuda_args a)
{
	__shared__ float hs[TP][TK + 1];
	__shared__ float wd[TR][TK + 1];

	const uint32_t g = blockIdx.y, r0 = blockIdx.x * TR;
	uint32_t p_end, p0;
	if (!block_tile(a, g, r0, a.n, &p_end, &p0))
		return;
	const uint8_t *base = slot_base(a, g);
	const float *hsrc = reinterpret_cast<const float *>(a.h);

	const uint32_t tx = threadIdx.x % 16, ty = threadIdx.x / 16;
	float acc[2][2] = { { 0.0f, 0.0f }, { 0.0f, 0.0f } };

	for (uint32_t k0 = 0; k0 < a.m; k0 += TK) {
		for (uint32_t e = threadIdx.x; e < TP * TK; e += NT) {
			const uint32_t p = e / TK, k = e % TK;
			hs[p][k] = (p0 + p < p_end && k0 + k < a.m) ? hsrc[(size_t)(p0 + p) * a.m + k0 + k] : 0.0f;
		}
		load_w_tile(wd, base, a.down, r0, a.n, k0, a.m);
		__syncthreads();
#pragma unroll 8
		for (uint32_t k = 0; k < TK; k++)
			fma2x2(acc, wd[ty * 2][k], wd[ty * 2 + 1][k], hs[tx * 2][k], hs[tx * 2 + 1][k]);
		__syncthreads();
	}

	const uint32_t *ptok = reinterpret_cast<const uint32_t *>(a.pair_token);
	const float *pw = reinterpret_cast<const float *>(a.pair_weight);
	float *y = reinterpret_cast<float *>(a.y);
	for (int ri = 0; ri < 2; ri++) {
		const uint32_t r = r0 + ty * 2 + ri;
		if (r >= a.n)
			continue;
		for (int pi = 0; pi < 2; pi++) {
			const uint32_t p = p0 + tx * 2 + pi;
			if (p >= p_end || ptok[p] >= a.n_tokens)
				continue;
			atomicAdd(&y[(size_t)ptok[p] * a.n + r], pw[p] * acc[ri][pi]);
		}
	}
}
