// cuda_common.cuh - the device code kernels/ffn.cu and kernels/latent.cu
// share: weight dequantization from the pack's block layouts, the staged
// weight tile, the 2 x 2 register tile, the per-group block geometry and the
// grouped down projection. Both compile to their own fatbin, so these are
// plain (inlined) device functions, templated on each file's argument
// block. The including file defines its tile geometry TR (rows), TP (pairs),
// TK (K chunk) and NT (threads) first.
#ifndef MOETIER_CUDA_COMMON_CUH
#define MOETIER_CUDA_COMMON_CUH

#include <stdint.h>
#include <cuda_fp16.h>

#if !defined(TR) || !defined(TP) || !defined(TK) || !defined(NT)
#error "define the tile geometry TR TP TK NT before including cuda_common.cuh"
#endif

static_assert(TR * TK % NT == 0 && TP * TK % NT == 0, "tile loads must divide evenly");
static_assert(NT == 256 && TR == 32 && TP == 32, "each thread computes a 2x2 output patch");

// enum moe_dtype values (dtype.h: stored in packs, never renumbered). Not
// included: that header is host C.
#define DT_F32 1
#define DT_F16 2
#define DT_BF16 3
#define DT_Q8_0 4
#define DT_Q4_0 5
#define DT_MXFP4 6

__constant__ int8_t c_kv_mxfp4[16] = { 0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12 };

// Block structs are 34/18/17 bytes and parts may start at any offset in an
// extent, so nothing is assumed aligned: values are assembled from bytes
// (little-endian, as the pack stores them).
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

// Element c of one weight row, exactly as moe_dequantize_row computes it.
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

// A bias vector's element i; dtype 0 (MOE_DTYPE_INVALID) = no bias.
__device__ __forceinline__ float bias_at(uint32_t dt, const uint8_t *p, uint32_t i)
{
	return dt ? dq(dt, p, i) : 0.0f;
}

// The expert's bytes: group g's arena slot (ffn_cuda_args, latent_cuda_args).
template <typename Args> __device__ __forceinline__ const uint8_t *slot_base(const Args &a, uint32_t g)
{
	const uint32_t slot = reinterpret_cast<const uint32_t *>(a.group_slot)[g];
	return reinterpret_cast<const uint8_t *>(a.arena) + (size_t)slot * a.slot_stride;
}

// Stages a TR x TK weight tile (rows r0.., columns k0..) of matrix M
// (ffn_cuda_mat, latent_cuda_mat) into shared memory, zero outside the
// matrix. Tile row r is matrix row r * rstride + roff (GPT-OSS gate/up rows
// are interleaved: stride 2, offset 0 or 1; 1 and 0 elsewhere).
template <typename Mat>
__device__ __forceinline__ void load_w_tile(float (*ws)[TK + 1], const uint8_t *base, const Mat &M, uint32_t r0,
					    uint32_t rows_valid, uint32_t rstride, uint32_t roff, uint32_t k0,
					    uint32_t K)
{
	for (uint32_t e = threadIdx.x; e < TR * TK; e += NT) {
		const uint32_t r = e / TK, k = e % TK;
		float v = 0.0f;
		if (r0 + r < rows_valid && k0 + k < K) {
			const uint8_t *row = base + M.offset + (size_t)((r0 + r) * rstride + roff) * M.row_bytes;
			v = dq(M.dtype, row, k0 + k);
		}
		ws[r][k] = v;
	}
}

// The 2 x 2 register tile every thread accumulates: rows (w0, w1) x tokens (x0, x1).
__device__ __forceinline__ void fma2x2(float acc[2][2], float w0, float w1, float x0, float x1)
{
	acc[0][0] = fmaf(w0, x0, acc[0][0]);
	acc[0][1] = fmaf(w0, x1, acc[0][1]);
	acc[1][0] = fmaf(w1, x0, acc[1][0]);
	acc[1][1] = fmaf(w1, x1, acc[1][1]);
}

// This block's tile: group g (blockIdx.y), pairs from p0 (blockIdx.z), rows
// from row0 (< rows). False when the block has nothing to do.
template <typename Args>
__device__ __forceinline__ bool block_tile(const Args &a, uint32_t g, uint32_t row0, uint32_t rows, uint32_t *p_end,
					   uint32_t *p0)
{
	if (g >= a.n_groups)
		return false;
	const uint32_t *start = reinterpret_cast<const uint32_t *>(a.group_start);
	const uint32_t p_begin = start[g];
	*p_end = start[g + 1];
	*p0 = p_begin + blockIdx.z * TP;
	return *p_end > p_begin && *p0 < *p_end && row0 < rows;
}

// The gate/up kernels' epilogue: h[p][i] = act(i, gate, up) for this
// thread's 2 x 2 outputs (rows i0 + 2 ty.., pairs p0 + 2 tx..) inside the
// tile; act is the kernel's activation, with the bias of row i if any.
template <typename Args, typename Act>
__device__ __forceinline__ void store_h(const Args &a, const float accg[2][2], const float accu[2][2], uint32_t i0,
					uint32_t p0, uint32_t p_end, Act act)
{
	const uint32_t tx = threadIdx.x % 16, ty = threadIdx.x / 16;
	float *h = reinterpret_cast<float *>(a.h);
	for (int ri = 0; ri < 2; ri++) {
		const uint32_t i = i0 + ty * 2 + ri;
		if (i >= a.m)
			continue;
		for (int pi = 0; pi < 2; pi++) {
			const uint32_t p = p0 + tx * 2 + pi;
			if (p >= p_end)
				continue;
			h[(size_t)p * a.m + i] = act(i, accg[ri][pi], accu[ri][pi]);
		}
	}
}

// SwiGLU's product: silu(gate) * up.
__device__ __forceinline__ float silu_mul(float gv, float uv)
{
	return gv / (1.0f + expf(-gv)) * uv;
}

// The down projection of both kernels: y[token] += weight * (W_down h[p] +
// b_down) over the group's pairs, a.down being W_down (n x m) and h the
// gate/up kernel's [n_pairs][m] output. bias_dtype 0: no bias.
template <typename Args>
__device__ __forceinline__ void grouped_down(const Args &a, uint32_t bias_dtype, uint64_t bias_offset)
{
	__shared__ float hs[TP][TK + 1];
	__shared__ float wd[TR][TK + 1];

	const uint32_t g = blockIdx.y, r0 = blockIdx.x * TR;
	uint32_t p_end, p0;
	if (!block_tile(a, g, r0, a.n, &p_end, &p0))
		return; // uniform for the whole block: no barrier is skipped by some threads only
	const uint8_t *base = slot_base(a, g);
	const float *hsrc = reinterpret_cast<const float *>(a.h);

	const uint32_t tx = threadIdx.x % 16, ty = threadIdx.x / 16; // 16 x 16 threads
	float acc[2][2] = { { 0.0f, 0.0f }, { 0.0f, 0.0f } };

	for (uint32_t k0 = 0; k0 < a.m; k0 += TK) {
		for (uint32_t e = threadIdx.x; e < TP * TK; e += NT) {
			const uint32_t p = e / TK, k = e % TK;
			hs[p][k] = (p0 + p < p_end && k0 + k < a.m) ? hsrc[(size_t)(p0 + p) * a.m + k0 + k] : 0.0f;
		}
		load_w_tile(wd, base, a.down, r0, a.n, 1, 0, k0, a.m);
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
		const float b = bias_at(bias_dtype, base + bias_offset, r);
		for (int pi = 0; pi < 2; pi++) {
			const uint32_t p = p0 + tx * 2 + pi;
			if (p >= p_end || ptok[p] >= a.n_tokens)
				continue;
			atomicAdd(&y[(size_t)ptok[p] * a.n + r], pw[p] * (acc[ri][pi] + b));
		}
	}
}

#endif
