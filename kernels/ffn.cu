// ffn.cu - the routed-expert FFN on the GPU as a grouped GEMM: the tokens
// routed to each expert form a group, and each thread block computes a
// 32 (rows) x 32 (pairs) output tile of one group, streaming K in chunks of
// 32 through shared memory. Weights are read straight from the expert's
// arena slot and dequantized in the kernel (f32, f16, bf16, q8_0, q4_0,
// mxfp4: the ggml block layouts of core/dtype.h). Accumulation is f32.
//
// Argument block and launch geometry: kernels/ffn_cuda.h. The fatbin is
// embedded in the binary (kernels/cuda_fatbin.S) and loaded with
// cuModuleLoadData; nothing links against cudart.
#include <stdint.h>
#include <cuda_fp16.h>

#include "ffn_cuda.h"

// enum moe_dtype / enum moe_ffn_kind values (dtype.h, model.h: stored in
// packs, never renumbered). Not included: those headers are host C.
#define DT_F32 1
#define DT_F16 2
#define DT_BF16 3
#define DT_Q8_0 4
#define DT_Q4_0 5
#define DT_MXFP4 6
#define KIND_GPTOSS 2

#define TR FFN_CUDA_TILE_ROWS
#define TP FFN_CUDA_TILE_PAIRS
#define TK FFN_CUDA_TILE_K
#define NT FFN_CUDA_THREADS

static_assert(TR * TK % NT == 0 && TP * TK % NT == 0, "tile loads must divide evenly");
static_assert(NT == 256 && TR == 32 && TP == 32, "each thread computes a 2x2 (x2) output patch");

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

__device__ __forceinline__ float bias_at(uint32_t dt, const uint8_t *p, uint32_t i)
{
	return dt ? dq(dt, p, i) : 0.0f;
}

__device__ __forceinline__ const uint8_t *slot_base(const ffn_cuda_args &a, uint32_t g)
{
	const uint32_t slot = reinterpret_cast<const uint32_t *>(a.group_slot)[g];
	return reinterpret_cast<const uint8_t *>(a.arena) + (size_t)slot * a.slot_stride;
}

// Stages a TR x TK weight tile (rows r0.., columns k0..) into shared memory,
// zero outside the matrix. row_of maps tile row to matrix row (GPT-OSS
// gate/up rows are interleaved: stride 2, offset 0 or 1).
__device__ __forceinline__ void load_w_tile(float (*ws)[TK + 1], const uint8_t *base, const ffn_cuda_mat &M,
					    uint32_t r0, uint32_t rows_valid, uint32_t rstride, uint32_t roff,
					    uint32_t k0, uint32_t K)
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
__device__ __forceinline__ bool block_tile(const ffn_cuda_args &a, uint32_t g, uint32_t row0, uint32_t rows,
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

// gate/up projections and the activation: h[p][i] for the group's pairs.
extern "C" __global__ void __launch_bounds__(NT) moe_ffn_gate_up(const ffn_cuda_args a)
{
	__shared__ float xs[TP][TK + 1];
	__shared__ float wg[TR][TK + 1];
	__shared__ float wu[TR][TK + 1];

	const uint32_t g = blockIdx.y, i0 = blockIdx.x * TR;
	uint32_t p_end, p0;
	if (!block_tile(a, g, i0, a.m, &p_end, &p0))
		return; // uniform for the whole block: no barrier is skipped by some threads only
	const uint8_t *base = slot_base(a, g);
	const uint32_t *ptok = reinterpret_cast<const uint32_t *>(a.pair_token);
	const float *x = reinterpret_cast<const float *>(a.x);
	const bool oss = a.kind == KIND_GPTOSS;

	const uint32_t tx = threadIdx.x % 16, ty = threadIdx.x / 16; // 16 x 16 threads
	float accg[2][2] = { { 0.0f, 0.0f }, { 0.0f, 0.0f } };
	float accu[2][2] = { { 0.0f, 0.0f }, { 0.0f, 0.0f } };

	for (uint32_t k0 = 0; k0 < a.n; k0 += TK) {
		for (uint32_t e = threadIdx.x; e < TP * TK; e += NT) {
			const uint32_t p = e / TK, k = e % TK;
			float v = 0.0f;
			if (p0 + p < p_end && k0 + k < a.n && ptok[p0 + p] < a.n_tokens)
				v = x[(size_t)ptok[p0 + p] * a.n + k0 + k];
			xs[p][k] = v;
		}
		if (oss) {
			load_w_tile(wg, base, a.gate_up, i0, a.m, 2, 0, k0, a.n);
			load_w_tile(wu, base, a.gate_up, i0, a.m, 2, 1, k0, a.n);
		} else {
			load_w_tile(wg, base, a.gate, i0, a.m, 1, 0, k0, a.n);
			load_w_tile(wu, base, a.up, i0, a.m, 1, 0, k0, a.n);
		}
		__syncthreads();
#pragma unroll 8
		for (uint32_t k = 0; k < TK; k++) {
			const float x0 = xs[tx * 2][k], x1 = xs[tx * 2 + 1][k];
			const float g0 = wg[ty * 2][k], g1 = wg[ty * 2 + 1][k];
			const float u0 = wu[ty * 2][k], u1 = wu[ty * 2 + 1][k];
			fma2x2(accg, g0, g1, x0, x1);
			fma2x2(accu, u0, u1, x0, x1);
		}
		__syncthreads();
	}

	float *h = reinterpret_cast<float *>(a.h);
	const float alpha = a.alpha > 0.0f ? a.alpha : 1.0f;
	for (int ri = 0; ri < 2; ri++) {
		const uint32_t i = i0 + ty * 2 + ri;
		if (i >= a.m)
			continue;
		for (int pi = 0; pi < 2; pi++) {
			const uint32_t p = p0 + tx * 2 + pi;
			if (p >= p_end)
				continue;
			float gv = accg[ri][pi], uv = accu[ri][pi], hv;
			if (oss) {
				const uint8_t *bb = base + a.gu_bias_offset;
				gv += bias_at(a.gu_bias_dtype, bb, 2 * i);
				uv += bias_at(a.gu_bias_dtype, bb, 2 * i + 1);
				if (a.limit > 0.0f) {
					gv = fminf(gv, a.limit);
					uv = fminf(fmaxf(uv, -a.limit), a.limit);
				}
				hv = (uv + 1.0f) * (gv / (1.0f + expf(-alpha * gv)));
			} else {
				hv = gv / (1.0f + expf(-gv)) * uv;
			}
			h[(size_t)p * a.m + i] = hv;
		}
	}
}

// Down projection: y[token] += weight * (W_down h[p] + b_down).
extern "C" __global__ void __launch_bounds__(NT) moe_ffn_down(const ffn_cuda_args a)
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
		load_w_tile(wd, base, a.down, r0, a.n, 1, 0, k0, a.m);
		__syncthreads();
#pragma unroll 8
		for (uint32_t k = 0; k < TK; k++) {
			const float h0 = hs[tx * 2][k], h1 = hs[tx * 2 + 1][k];
			const float w0 = wd[ty * 2][k], w1 = wd[ty * 2 + 1][k];
			fma2x2(acc, w0, w1, h0, h1);
		}
		__syncthreads();
	}

	const uint32_t *ptok = reinterpret_cast<const uint32_t *>(a.pair_token);
	const float *pw = reinterpret_cast<const float *>(a.pair_weight);
	float *y = reinterpret_cast<float *>(a.y);
	for (int ri = 0; ri < 2; ri++) {
		const uint32_t r = r0 + ty * 2 + ri;
		if (r >= a.n)
			continue;
		const float b = a.kind == KIND_GPTOSS ? bias_at(a.down_bias_dtype, base + a.down_bias_offset, r) : 0.0f;
		for (int pi = 0; pi < 2; pi++) {
			const uint32_t p = p0 + tx * 2 + pi;
			if (p >= p_end || ptok[p] >= a.n_tokens)
				continue;
			atomicAdd(&y[(size_t)ptok[p] * a.n + r], pw[p] * (acc[ri][pi] + b));
		}
	}
}
