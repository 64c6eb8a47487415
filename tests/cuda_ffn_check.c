/* cuda_ffn_check.c - runs the embedded CUDA grouped expert FFN
 * (kernels/ffn.cu) on random experts and routing and compares it with the
 * CPU kernels (ffn_moe_token), for every weight dtype and the GPT-OSS
 * variant.
 *
 * libcuda.so.1 is loaded with dlopen and every entry point comes from
 * cuGetProcAddress (no -lcuda, no cudart), so the binary runs everywhere.
 * Exit 0 on success, 1 on a mismatch or CUDA error, 77 (skip) when there is
 * no driver, only the stub, or no device (cuInit 34, 35, 100, 803, 999).
 *
 * Tolerance: both sides accumulate in f32 in different orders, so an output
 * may differ by about gamma_K relative to the sum of absolute terms; the
 * check allows |gpu - cpu| <= 1e-4 * (max |cpu| over the token) + 1e-6,
 * far above that and far below any indexing or dequantization error. */
#include "config.h"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "ffn.h"
#include "ffn_cuda.h"
#include "model.h"
#include "pack.h"

#define SKIP 77

static struct {
	PFN_cuInit_v2000 Init;
	PFN_cuDeviceGet_v2000 DeviceGet;
	PFN_cuDevicePrimaryCtxRetain_v7000 DevicePrimaryCtxRetain;
	PFN_cuDevicePrimaryCtxRelease_v11000 DevicePrimaryCtxRelease;
	PFN_cuCtxSetCurrent_v4000 CtxSetCurrent;
	PFN_cuModuleLoadData_v2000 ModuleLoadData;
	PFN_cuModuleUnload_v2000 ModuleUnload;
	PFN_cuModuleGetFunction_v2000 ModuleGetFunction;
	PFN_cuMemAlloc_v3020 MemAlloc;
	PFN_cuMemFree_v3020 MemFree;
	PFN_cuMemcpyHtoD_v3020 MemcpyHtoD;
	PFN_cuMemcpyDtoH_v3020 MemcpyDtoH;
	PFN_cuLaunchKernel_v4000 LaunchKernel;
	PFN_cuCtxSynchronize_v2000 CtxSynchronize;
} cu;

#define CK(call) \
	do { \
		CUresult rc_ = (call); \
		if (rc_ != CUDA_SUCCESS) { \
			fprintf(stderr, "cuda_ffn_check: %s failed: CUresult %d\n", #call, (int)rc_); \
			exit(1); \
		} \
	} while (0)

static int load_driver(void)
{
	void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
	if (!lib) {
		printf("cuda_ffn_check: SKIP: %s\n", dlerror());
		return SKIP;
	}
	PFN_cuGetProcAddress_v12000 gpa = (PFN_cuGetProcAddress_v12000)dlsym(lib, "cuGetProcAddress_v2");
	if (!gpa) {
		printf("cuda_ffn_check: SKIP: driver has no cuGetProcAddress_v2 (older than CUDA 12)\n");
		return SKIP;
	}
	static const struct {
		const char *name;
		size_t off;
	} syms[] = {
#define S(n) { "cu" #n, offsetof(__typeof__(cu), n) }
		S(Init), S(DeviceGet), S(DevicePrimaryCtxRetain), S(DevicePrimaryCtxRelease), S(CtxSetCurrent),
		S(ModuleLoadData), S(ModuleUnload), S(ModuleGetFunction), S(MemAlloc), S(MemFree), S(MemcpyHtoD),
		S(MemcpyDtoH), S(LaunchKernel), S(CtxSynchronize),
#undef S
	};
	for (size_t i = 0; i < sizeof(syms) / sizeof(syms[0]); i++) {
		void *fn = NULL;
		CUdriverProcAddressQueryResult q;
		/* 12000: the ABI of each function as of CUDA 12.0, matching the
		 * PFN_*_vNNNN types above */
		CUresult rc = gpa(syms[i].name, &fn, 12000, CU_GET_PROC_ADDRESS_DEFAULT, &q);
		if (rc != CUDA_SUCCESS || !fn) {
			printf("cuda_ffn_check: SKIP: cuGetProcAddress(%s) = %d\n", syms[i].name, (int)rc);
			return SKIP;
		}
		memcpy((char *)&cu + syms[i].off, &fn, sizeof(fn));
	}
	CUresult rc = cu.Init(0);
	/* 34 stub library, 35 driver older than the toolkit (the runtime's
	 * cudaErrorInsufficientDriver; kept for drivers that report it), 100 no
	 * device, 803 system driver mismatch, 999 unknown */
	if ((int)rc == 34 || (int)rc == 35 || (int)rc == 100 || (int)rc == 803 || (int)rc == 999) {
		printf("cuda_ffn_check: SKIP: cuInit = %d (no usable GPU)\n", (int)rc);
		return SKIP;
	}
	CK(rc);
	return 0;
}

static uint64_t rng = 0x1234567;
static float frand(float a)
{
	rng = rng * 6364136223846793005ull + 1442695040888963407ull;
	return a * ((float)(rng >> 40) / 8388608.0f - 1.0f);
}

static void encode(enum moe_dtype t, const float *v, uint8_t *out, uint32_t n)
{
	switch (t) {
	case MOE_DTYPE_F32: memcpy(out, v, 4ull * n); break;
	case MOE_DTYPE_F16:
	case MOE_DTYPE_BF16:
		for (uint32_t i = 0; i < n; i++) {
			uint16_t h = t == MOE_DTYPE_F16 ? moe_f32_to_f16(v[i]) : moe_f32_to_bf16(v[i]);
			memcpy(out + 2 * i, &h, 2);
		}
		break;
	case MOE_DTYPE_Q8_0: moe_quantize_row_q8_0(v, (void *)out, n); break;
	case MOE_DTYPE_Q4_0: moe_quantize_row_q4_0(v, (void *)out, n); break;
	case MOE_DTYPE_MXFP4: moe_quantize_row_mxfp4(v, (void *)out, n); break;
	default: abort();
	}
}

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
					tmp[c] = frand(0.5f);
				moe_dtype_row_bytes(parts[p].dtype, parts[p].cols, &rb);
				encode(parts[p].dtype, tmp, arena + slot_of[e] * stride + parts[p].offset + r * rb,
				       parts[p].cols);
			}
	/* routing: token t picks experts (t % E, (t*3+1) % E) or one twice */
	float *x = malloc(sizeof(float) * T * n), *y_cpu = calloc((size_t)T * n, sizeof(float));
	float *y_gpu = calloc((size_t)T * n, sizeof(float));
	uint32_t sel[37][2];
	float wsel[37][2];
	for (size_t i = 0; i < (size_t)T * n; i++)
		x[i] = frand(1.0f);
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

	CUdeviceptr d_arena, d_gslot, d_gstart, d_ptok, d_pw, d_x, d_h, d_y;
	CK(cu.MemAlloc(&d_arena, slots * stride));
	CK(cu.MemAlloc(&d_gslot, sizeof(gslot)));
	CK(cu.MemAlloc(&d_gstart, sizeof(gstart)));
	CK(cu.MemAlloc(&d_ptok, sizeof(ptok)));
	CK(cu.MemAlloc(&d_pw, sizeof(pw)));
	CK(cu.MemAlloc(&d_x, sizeof(float) * T * n));
	CK(cu.MemAlloc(&d_h, sizeof(float) * npairs * m));
	CK(cu.MemAlloc(&d_y, sizeof(float) * T * n));
	CK(cu.MemcpyHtoD(d_arena, arena, slots * stride));
	CK(cu.MemcpyHtoD(d_gslot, gslot, sizeof(gslot)));
	CK(cu.MemcpyHtoD(d_gstart, gstart, sizeof(gstart)));
	CK(cu.MemcpyHtoD(d_ptok, ptok, sizeof(ptok)));
	CK(cu.MemcpyHtoD(d_pw, pw, sizeof(pw)));
	CK(cu.MemcpyHtoD(d_x, x, sizeof(float) * T * n));
	CK(cu.MemcpyHtoD(d_y, y_gpu, sizeof(float) * T * n)); /* zeros */

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

	int bad = 0;
	double worst = 0;
	for (uint32_t t = 0; t < T && !bad; t++) {
		double mx = 0;
		for (uint32_t i = 0; i < n; i++)
			mx = fmax(mx, fabs(y_cpu[(size_t)t * n + i]));
		for (uint32_t i = 0; i < n; i++) {
			double d = fabs((double)y_gpu[(size_t)t * n + i] - y_cpu[(size_t)t * n + i]);
			worst = fmax(worst, d / (mx + 1e-30));
			if (d > 1e-4 * mx + 1e-6) {
				fprintf(stderr, "cuda_ffn_check: %s %s n=%u m=%u token %u out %u: gpu %.9g cpu %.9g\n",
					kind == MOE_FFN_GPTOSS ? "gpt-oss" : "swiglu", moe_dtype_name(wt), n, m, t, i,
					(double)y_gpu[(size_t)t * n + i], (double)y_cpu[(size_t)t * n + i]);
				bad = 1;
				break;
			}
		}
	}
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
	const void *fb = ffn_cuda_fatbin(&len);
	if (!fb) {
		printf("cuda_ffn_check: SKIP: built without nvcc\n");
		return SKIP;
	}
	int rc = load_driver();
	if (rc)
		return rc;
	CUdevice dev;
	CUcontext ctx;
	CUmodule mod;
	CUfunction f_up, f_down;
	CK(cu.DeviceGet(&dev, 0));
	CK(cu.DevicePrimaryCtxRetain(&ctx, dev));
	CK(cu.CtxSetCurrent(ctx));
	CK(cu.ModuleLoadData(&mod, fb));
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
	CK(cu.ModuleUnload(mod));
	CK(cu.DevicePrimaryCtxRelease(dev));
	printf("cuda_ffn_check: %s\n", bad ? "FAILED" : "all cases match the CPU reference");
	return bad ? 1 : 0;
}
