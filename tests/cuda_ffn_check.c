/* cuda_ffn_check.c - runs the embedded CUDA grouped expert FFN
 * (kernels/ffn.cu) on random experts and routing and compares it with the
 * CPU kernels (ffn_moe_token), for every weight dtype and the GPT-OSS
 * variant.
 *
 * The driver, the skip rule (exit 77) and the tolerance: tests/cuda_probe.h.
 * Exit 0 on success, 1 on a mismatch or CUDA error. */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "ffn.h"
#include "ffn_cuda.h"
#include "model.h"
#include "pack.h"

#define CUDA_PROBE_NAME "cuda_ffn_check"
#include "cuda_probe.h"

static struct ffn_cuda_mat cmat(const struct ffn_mat *M)
{
	return (struct ffn_cuda_mat){ M->dtype, M->rows, M->cols, 0, M->offset, M->row_bytes };
}

/* One configuration: E experts in shuffled arena slots, T tokens, top-k. */
static int run_case(CUfunction f_up, CUfunction f_down, enum moe_ffn_kind kind, enum moe_dtype wt, uint32_t n,
		    uint32_t m)
{
	const uint32_t E = 5, T = 37, K = 2;
	struct moe_model_config cfg;
	struct pack_part_desc parts[4];
	uint32_t np = 0;
	uint64_t off = 0, rb;
	struct moe_error err = { { 0 } };

	memset(&cfg, 0, sizeof(cfg));
	moe_model_set_family_defaults(&cfg, kind == MOE_FFN_GPTOSS ? MOE_FAMILY_GPT_OSS : MOE_FAMILY_MIXTRAL);
	cfg.hidden = n;
	cfg.expert_width = m;
	if (kind == MOE_FFN_GPTOSS)
		cfg.swiglu_limit = 0.5f; /* small, so the clamps trigger */
#define PART(role, t, r, c) \
	do { \
		moe_dtype_row_bytes(t, c, &rb); \
		parts[np++] = (struct pack_part_desc){ role, t, r, c, off, rb * (r) }; \
		off += (rb * (r) + 255) & ~255ull; \
	} while (0)
	if (kind == MOE_FFN_GPTOSS) {
		PART(PACK_ROLE_GATE_UP, wt, 2 * m, n);
		PART(PACK_ROLE_GATE_UP_BIAS, MOE_DTYPE_BF16, 1, 2 * m);
		PART(PACK_ROLE_DOWN, wt, n, m);
		PART(PACK_ROLE_DOWN_BIAS, MOE_DTYPE_BF16, 1, n);
	} else {
		PART(PACK_ROLE_GATE, wt, m, n);
		PART(PACK_ROLE_UP, wt, m, n);
		PART(PACK_ROLE_DOWN, wt, n, m);
	}
	const uint64_t stride = off;
	struct ffn_layout L;
	if (ffn_layout_init(&L, &cfg, parts, np, stride, &err)) {
		fprintf(stderr, "cuda_ffn_check: %s\n", err.msg);
		return 1;
	}
	if (ffn_cuda_layout_check(&L, &err)) {
		fprintf(stderr, "cuda_ffn_check: %s\n", err.msg);
		return 1;
	}
	/* the arena: expert e lives in slot slot_of[e] */
	const uint32_t slots = E + 2, slot_of[5] = { 3, 0, 6, 2, 5 };
	uint8_t *arena = calloc(slots, stride);
	float *tmp = malloc(sizeof(float) * (n > 2 * m ? n : 2 * m));
	for (uint32_t e = 0; e < E; e++)
		for (uint32_t p = 0; p < np; p++)
			for (uint32_t r = 0; r < parts[p].rows; r++) {
				for (uint32_t c = 0; c < parts[p].cols; c++)
					tmp[c] = cuda_probe_frand(0.5f);
				moe_dtype_row_bytes(parts[p].dtype, parts[p].cols, &rb);
				cuda_probe_encode(parts[p].dtype, tmp,
						  arena + slot_of[e] * stride + parts[p].offset + r * rb, parts[p].cols);
			}
	/* routing: token t picks experts (t % E, (t*3+1) % E) or one twice */
	float *x = malloc(sizeof(float) * T * n), *y_cpu = calloc((size_t)T * n, sizeof(float));
	float *y_gpu = calloc((size_t)T * n, sizeof(float));
	uint32_t sel[37][2];
	float wsel[37][2];
	for (size_t i = 0; i < (size_t)T * n; i++)
		x[i] = cuda_probe_frand(1.0f);
	for (uint32_t t = 0; t < T; t++) {
		sel[t][0] = t % E;
		sel[t][1] = (t * 3 + 1) % E;
		wsel[t][0] = 0.25f + 0.5f * (float)(t % 3) / 3.0f;
		wsel[t][1] = 1.0f - wsel[t][0];
		const void *ext[2] = { arena + slot_of[sel[t][0]] * stride, arena + slot_of[sel[t][1]] * stride };
		if (ffn_moe_token(&L, ext, wsel[t], K, x + (size_t)t * n, y_cpu + (size_t)t * n, 1))
			return 1;
	}
	/* group pairs by expert (experts without tokens get no group) */
	uint32_t gslot[5], gstart[6], ptok[37 * 2], ng = 0, npairs = 0, maxp = 0;
	float pw[37 * 2];
	for (uint32_t e = 0; e < E; e++) {
		uint32_t s = npairs;
		for (uint32_t t = 0; t < T; t++)
			for (uint32_t j = 0; j < K; j++)
				if (sel[t][j] == e) {
					ptok[npairs] = t;
					pw[npairs++] = wsel[t][j];
				}
		if (npairs > s) {
			gslot[ng] = slot_of[e];
			gstart[ng++] = s;
			maxp = npairs - s > maxp ? npairs - s : maxp;
		}
	}
	gstart[ng] = npairs;

	const CUdeviceptr d_arena = cuda_probe_upload(arena, slots * stride);
	const CUdeviceptr d_gslot = cuda_probe_upload(gslot, sizeof(gslot));
	const CUdeviceptr d_gstart = cuda_probe_upload(gstart, sizeof(gstart));
	const CUdeviceptr d_ptok = cuda_probe_upload(ptok, sizeof(ptok));
	const CUdeviceptr d_pw = cuda_probe_upload(pw, sizeof(pw));
	const CUdeviceptr d_x = cuda_probe_upload(x, sizeof(float) * T * n);
	const CUdeviceptr d_h = cuda_probe_upload(NULL, sizeof(float) * npairs * m);
	const CUdeviceptr d_y = cuda_probe_upload(y_gpu, sizeof(float) * T * n); /* zeros */

	struct ffn_cuda_args a;
	memset(&a, 0, sizeof(a));
	a.arena = d_arena;
	a.slot_stride = stride;
	a.kind = kind;
	a.n = n;
	a.m = m;
	a.limit = L.limit;
	a.alpha = L.alpha;
	a.gu_bias_dtype = L.gate_up_bias.dtype;
	a.gu_bias_offset = L.gate_up_bias.offset;
	a.down_bias_dtype = L.down_bias.dtype;
	a.down_bias_offset = L.down_bias.offset;
	a.gate = cmat(&L.gate);
	a.up = cmat(&L.up);
	a.gate_up = cmat(&L.gate_up);
	a.down = cmat(&L.down);
	a.n_groups = ng;
	a.max_group_pairs = maxp;
	a.n_tokens = T;
	a.group_slot = d_gslot;
	a.group_start = d_gstart;
	a.pair_token = d_ptok;
	a.pair_weight = d_pw;
	a.x = d_x;
	a.h = d_h;
	a.y = d_y;
	void *params[] = { &a };
	const unsigned gz = (maxp + FFN_CUDA_TILE_PAIRS - 1) / FFN_CUDA_TILE_PAIRS;
	CK(cu.LaunchKernel(f_up, (m + FFN_CUDA_TILE_ROWS - 1) / FFN_CUDA_TILE_ROWS, ng, gz, FFN_CUDA_THREADS, 1, 1, 0,
			   NULL, params, NULL));
	CK(cu.LaunchKernel(f_down, (n + FFN_CUDA_TILE_ROWS - 1) / FFN_CUDA_TILE_ROWS, ng, gz, FFN_CUDA_THREADS, 1, 1,
			   0, NULL, params, NULL));
	CK(cu.CtxSynchronize());
	CK(cu.MemcpyDtoH(y_gpu, d_y, sizeof(float) * T * n));

	char what[96];
	double worst;
	snprintf(what, sizeof(what), "%s %s n=%u m=%u", kind == MOE_FFN_GPTOSS ? "gpt-oss" : "swiglu",
		 moe_dtype_name(wt), n, m);
	const int bad = cuda_probe_compare(y_gpu, y_cpu, T, n, what, &worst);
	printf("cuda_ffn_check: %s %-5s n=%u m=%u T=%u k=%u: %s (max rel diff %.2e)\n",
	       kind == MOE_FFN_GPTOSS ? "gpt-oss" : "swiglu", moe_dtype_name(wt), n, m, T, K, bad ? "FAIL" : "ok", worst);
	CUdeviceptr all[] = { d_arena, d_gslot, d_gstart, d_ptok, d_pw, d_x, d_h, d_y };
	for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
		CK(cu.MemFree(all[i]));
	free(arena), free(tmp), free(x), free(y_cpu), free(y_gpu);
	return bad;
}

int main(void)
{
	/* The GPU kernels dequantize to f32 and keep x in f32: compare with
	 * the CPU's exact mode (the default quantizes x for q8_0/q4_0). */
	ffn_set_q8_mode(FFN_Q8_EXACT);
	size_t len = 0;
	CUdevice dev;
	CUmodule mod;
	CUfunction f_up, f_down;
	int rc = cuda_probe_open(ffn_cuda_fatbin(&len), &dev, &mod);
	if (rc)
		return rc;
	CK(cu.ModuleGetFunction(&f_up, mod, "moe_ffn_gate_up"));
	CK(cu.ModuleGetFunction(&f_down, mod, "moe_ffn_down"));

	static const enum moe_dtype dts[] = { MOE_DTYPE_F32, MOE_DTYPE_F16, MOE_DTYPE_BF16,
					      MOE_DTYPE_Q8_0, MOE_DTYPE_Q4_0, MOE_DTYPE_MXFP4 };
	int bad = 0;
	for (size_t i = 0; i < sizeof(dts) / sizeof(dts[0]); i++) {
		bad |= run_case(f_up, f_down, MOE_FFN_SWIGLU, dts[i], 96, 64);
		/* sizes that leave partial tiles: n, m not multiples of 32 rows */
		if (!moe_dtype_is_quantized(dts[i]))
			bad |= run_case(f_up, f_down, MOE_FFN_SWIGLU, dts[i], 70, 45);
	}
	bad |= run_case(f_up, f_down, MOE_FFN_GPTOSS, MOE_DTYPE_MXFP4, 128, 96);
	bad |= run_case(f_up, f_down, MOE_FFN_GPTOSS, MOE_DTYPE_BF16, 64, 40);
	cuda_probe_close(dev, mod);
	printf("cuda_ffn_check: %s\n", bad ? "FAILED" : "all cases match the CPU reference");
	return bad ? 1 : 0;
}
