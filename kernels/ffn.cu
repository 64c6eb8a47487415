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

#include "ffn_cuda.h"

#define TR FFN_CUDA_TILE_ROWS
#define TP FFN_CUDA_TILE_PAIRS
#define TK FFN_CUDA_TILE_K
#define NT FFN_CUDA_THREADS

#include "cuda_common.cuh"

// enum moe_ffn_kind value (model.h: stored in packs, never renumbered).
#define KIND_GPTOSS 2

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

	const float alpha = a.alpha > 0.0f ? a.alpha : 1.0f;
	store_h(a, accg, accu, i0, p0, p_end, [&](uint32_t i, float gv, float uv) {
		if (!oss)
			return silu_mul(gv, uv);
		const uint8_t *bb = base + a.gu_bias_offset;
		gv += bias_at(a.gu_bias_dtype, bb, 2 * i);
		uv += bias_at(a.gu_bias_dtype, bb, 2 * i + 1);
		if (a.limit > 0.0f) {
			gv = fminf(gv, a.limit);
			uv = fminf(fmaxf(uv, -a.limit), a.limit);
		}
		return (uv + 1.0f) * (gv / (1.0f + expf(-alpha * gv)));
	});
}

// Down projection: y[token] += weight * (W_down h[p] + b_down), b_down for GPT-OSS only.
extern "C" __global__ void __launch_bounds__(NT) moe_ffn_down(const ffn_cuda_args a)
{
	grouped_down(a, a.kind == KIND_GPTOSS ? a.down_bias_dtype : 0u, a.down_bias_offset);
}
