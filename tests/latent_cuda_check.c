/* latent_cuda_check.c - runs the embedded CUDA latent experts
 * (kernels/latent.cu through latent_cuda_run, the host launcher) on random
 * latent experts, two latent groups sharing B, shuffled arena slots and top-2
 * routing, and compares y with the CPU latent kernel (latent_expert_x,
 * weighted and summed per token), for f32, f16, bf16, q8_0 and q4_0 weights.
 *
 * libcuda.so.1 is loaded with dlopen and every entry point comes from
 * cuGetProcAddress (as tests/cuda_ffn_check.c does). Exit 0 on success, 1 on
 * a mismatch or CUDA error, 77 (skip) without a driver or device.
 * Tolerance: |gpu - cpu| <= 1e-4 * max |cpu| over the token + 1e-6 (f32
 * sums in different orders; the CPU runs in FFN_Q8_EXACT mode, z in f32). */
#include "config.h"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <dlfcn.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "ffn.h"
#include "latent.h"
#include "latent_cuda.h"
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
			fprintf(stderr, "latent_cuda_check: %s failed: CUresult %d\n", #call, (int)rc_); \
			exit(1); \
		} \
	} while (0)

static int load_driver(void)
{
	void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
	if (!lib) {
		printf("latent_cuda_check: SKIP: %s\n", dlerror());
		return SKIP;
	}
	PFN_cuGetProcAddress_v12000 gpa = (PFN_cuGetProcAddress_v12000)dlsym(lib, "cuGetProcAddress_v2");
	if (!gpa) {
		printf("latent_cuda_check: SKIP: driver has no cuGetProcAddress_v2 (older than CUDA 12)\n");
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
			printf("latent_cuda_check: SKIP: cuGetProcAddress(%s) = %d\n", syms[i].name, (int)rc);
			return SKIP;
		}
		memcpy((char *)&cu + syms[i].off, &fn, sizeof(fn));
	}
	CUresult rc = cu.Init(0);
	/* 34 stub library, 35 driver older than the toolkit (the runtime's
	 * cudaErrorInsufficientDriver; kept for drivers that report it), 100 no
	 * device, 803 system driver mismatch, 999 unknown */
	if ((int)rc == 34 || (int)rc == 35 || (int)rc == 100 || (int)rc == 803 || (int)rc == 999) {
		printf("latent_cuda_check: SKIP: cuInit = %d (no usable GPU)\n", (int)rc);
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


static CUmodule g_mod;

/* latent_cuda_run's launcher: the kernel by name, its one by-value argument */
static int launch(void *ctx, const char *kernel, const uint32_t grid[3], uint32_t block,
		  const struct latent_cuda_args *args)
{
	(void)ctx;
	CUfunction f;
	CUresult rc = cu.ModuleGetFunction(&f, g_mod, kernel);
	if (rc != CUDA_SUCCESS)
		return -(int)rc;
	void *params[] = { (void *)args };
	rc = cu.LaunchKernel(f, grid[0], grid[1], grid[2], block, 1, 1, 0, NULL, params, NULL);
	return rc == CUDA_SUCCESS ? 0 : -(int)rc;
}

static int run_case(enum moe_dtype wt, uint32_t n, uint32_t m, uint32_t r)
{
	enum { E = 6, T = 37, K = 2, GS = 3 };
	struct moe_model_config cfg;
	struct pack_part_desc parts[3];
	uint64_t off = 0, rb;
	struct moe_error err = { { 0 } };
	memset(&cfg, 0, sizeof(cfg));
	moe_model_set_family_defaults(&cfg, MOE_FAMILY_QWEN2_MOE);
	cfg.hidden = n;
	cfg.expert_width = m;
	cfg.n_experts = E;
	cfg.n_moe_layers = cfg.n_layers = 1;
	const uint32_t rows[3] = { m, m, n }, cols[3] = { r, r, m };
	const uint32_t roles[3] = { PACK_ROLE_LATENT_A_GATE, PACK_ROLE_LATENT_A_UP, PACK_ROLE_DOWN };
	for (int p = 0; p < 3; p++) {
		moe_dtype_row_bytes(wt, cols[p], &rb);
		parts[p] = (struct pack_part_desc){ roles[p], wt, rows[p], cols[p], off, rb * rows[p] };
		off += (rb * rows[p] + 255) & ~255ull; /* parts at unaligned-to-type offsets are fine too */
	}
	const uint64_t stride = off;
	struct latent_layout L;
	struct latent_basis *b;
	if (latent_layout_init(&L, &cfg, parts, 3, stride, &err) || latent_cuda_layout_check(&L, &err)) {
		fprintf(stderr, "latent_cuda_check: %s\n", err.msg);
		return 1;
	}
	if (latent_basis_alloc(n, r, 1, E, GS, &b))
		return 1;
	for (size_t i = 0; i < (size_t)b->max_groups * 2 * r * n; i++)
		b->b[i] = frand(1.0f) / sqrtf((float)n);
	const uint32_t slots = E + 2, slot_of[E] = { 3, 0, 6, 2, 5, 7 };
	uint8_t *arena = calloc(slots, stride);
	float *tmp = malloc(sizeof(float) * (n > m ? n : m));
	for (uint32_t e = 0; e < E; e++)
		for (int p = 0; p < 3; p++)
			for (uint32_t i = 0; i < parts[p].rows; i++) {
				for (uint32_t c = 0; c < parts[p].cols; c++)
					tmp[c] = frand(0.5f);
				moe_dtype_row_bytes(wt, parts[p].cols, &rb);
				encode(wt, tmp, arena + slot_of[e] * stride + parts[p].offset + i * rb, parts[p].cols);
			}
	float *x = malloc(sizeof(float) * T * n), *y_cpu = calloc((size_t)T * n, sizeof(float));
	float *y_gpu = calloc((size_t)T * n, sizeof(float)), *one = malloc(sizeof(float) * n);
	uint32_t sel[T][K];
	float wsel[T][K];
	for (size_t i = 0; i < (size_t)T * n; i++)
		x[i] = frand(1.0f);
	for (uint32_t t = 0; t < T; t++) {
		sel[t][0] = t % E;
		sel[t][1] = (t * 5 + 1) % E;
		wsel[t][0] = 0.25f + 0.5f * (float)(t % 3) / 3.0f;
		wsel[t][1] = 1.0f - wsel[t][0];
		for (uint32_t j = 0; j < K; j++) {
			if (latent_expert_x(&L, b, 0, sel[t][j], arena + slot_of[sel[t][j]] * stride, x + (size_t)t * n, n, 1,
					    one, n, 1))
				return 1;
			ffn_axpy(y_cpu + (size_t)t * n, wsel[t][j], one, n);
		}
	}
	/* z rows: one per (token, latent group) touched; pairs grouped by expert */
	uint32_t zrow_tok[T * K], zrow_grp[T * K], nz = 0, zidx[2][T];
	memset(zidx, 0xff, sizeof(zidx));
	for (uint32_t t = 0; t < T; t++)
		for (uint32_t j = 0; j < K; j++) {
			const uint32_t g = (uint32_t)latent_basis_group(b, 0, sel[t][j]);
			if (zidx[g][t] == UINT32_MAX) {
				zidx[g][t] = nz;
				zrow_tok[nz] = t;
				zrow_grp[nz++] = g;
			}
		}
	uint32_t gslot[E], gstart[E + 1], ptok[T * K], pz[T * K], ng = 0, np = 0, maxp = 0;
	float pw[T * K];
	for (uint32_t e = 0; e < E; e++) {
		const uint32_t s = np;
		for (uint32_t t = 0; t < T; t++)
			for (uint32_t j = 0; j < K; j++)
				if (sel[t][j] == e) {
					ptok[np] = t;
					pz[np] = zidx[latent_basis_group(b, 0, e)][t];
					pw[np++] = wsel[t][j];
				}
		if (np > s) {
			gslot[ng] = slot_of[e];
			gstart[ng++] = s;
			maxp = np - s > maxp ? np - s : maxp;
		}
	}
	gstart[ng] = np;
	const size_t bbytes = sizeof(float) * b->max_groups * 2 * r * n;
	CUdeviceptr d_arena, d_basis, d_gslot, d_gstart, d_ptok, d_pw, d_pz, d_zt, d_zg, d_x, d_z, d_h, d_y;
	CK(cu.MemAlloc(&d_arena, slots * stride));
	CK(cu.MemAlloc(&d_basis, bbytes));
	CK(cu.MemAlloc(&d_gslot, sizeof(gslot)));
	CK(cu.MemAlloc(&d_gstart, sizeof(gstart)));
	CK(cu.MemAlloc(&d_ptok, sizeof(ptok)));
	CK(cu.MemAlloc(&d_pw, sizeof(pw)));
	CK(cu.MemAlloc(&d_pz, sizeof(pz)));
	CK(cu.MemAlloc(&d_zt, sizeof(zrow_tok)));
	CK(cu.MemAlloc(&d_zg, sizeof(zrow_grp)));
	CK(cu.MemAlloc(&d_x, sizeof(float) * T * n));
	CK(cu.MemAlloc(&d_z, sizeof(float) * nz * 2 * r));
	CK(cu.MemAlloc(&d_h, sizeof(float) * np * m));
	CK(cu.MemAlloc(&d_y, sizeof(float) * T * n));
	CK(cu.MemcpyHtoD(d_arena, arena, slots * stride));
	CK(cu.MemcpyHtoD(d_basis, b->b, bbytes));
	CK(cu.MemcpyHtoD(d_gslot, gslot, sizeof(gslot)));
	CK(cu.MemcpyHtoD(d_gstart, gstart, sizeof(gstart)));
	CK(cu.MemcpyHtoD(d_ptok, ptok, sizeof(ptok)));
	CK(cu.MemcpyHtoD(d_pw, pw, sizeof(pw)));
	CK(cu.MemcpyHtoD(d_pz, pz, sizeof(pz)));
	CK(cu.MemcpyHtoD(d_zt, zrow_tok, sizeof(zrow_tok)));
	CK(cu.MemcpyHtoD(d_zg, zrow_grp, sizeof(zrow_grp)));
	CK(cu.MemcpyHtoD(d_x, x, sizeof(float) * T * n));
	CK(cu.MemcpyHtoD(d_y, y_gpu, sizeof(float) * T * n)); /* zeros */
	struct latent_cuda_args a;
	memset(&a, 0, sizeof(a));
	a.arena = d_arena;
	a.slot_stride = stride;
	a.basis = d_basis;
	a.n_groups = ng;
	a.max_group_pairs = maxp;
	a.n_tokens = T;
	a.n_zrows = nz;
	a.group_slot = d_gslot;
	a.group_start = d_gstart;
	a.pair_token = d_ptok;
	a.pair_weight = d_pw;
	a.pair_zrow = d_pz;
	a.zrow_token = d_zt;
	a.zrow_group = d_zg;
	a.x = d_x;
	a.z = d_z;
	a.h = d_h;
	a.y = d_y;
	if (latent_cuda_run(&L, &a, launch, NULL, &err)) {
		fprintf(stderr, "latent_cuda_check: %s\n", err.msg);
		return 1;
	}
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
				fprintf(stderr, "latent_cuda_check: %s n=%u m=%u r=%u token %u out %u: gpu %.9g cpu %.9g\n",
					moe_dtype_name(wt), n, m, r, t, i, (double)y_gpu[(size_t)t * n + i],
					(double)y_cpu[(size_t)t * n + i]);
				bad = 1;
				break;
			}
		}
	}
	printf("latent_cuda_check: %-5s n=%u m=%u r=%u T=%u k=%u, %u z rows: %s (max rel diff %.2e)\n",
	       moe_dtype_name(wt), n, m, r, T, K, nz, bad ? "FAIL" : "ok", worst);
	CUdeviceptr all[] = { d_arena, d_basis, d_gslot, d_gstart, d_ptok, d_pw, d_pz, d_zt, d_zg, d_x, d_z, d_h, d_y };
	for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
		CK(cu.MemFree(all[i]));
	latent_basis_free(b);
	free(arena), free(tmp), free(x), free(y_cpu), free(y_gpu), free(one);
	return bad;
}

int main(void)
{
	ffn_set_q8_mode(FFN_Q8_EXACT);
	size_t len = 0;
	const void *fb = latent_cuda_fatbin(&len);
	if (!fb) {
		printf("latent_cuda_check: SKIP: built without nvcc\n");
		return SKIP;
	}
	int rc = load_driver();
	if (rc)
		return rc;
	CUdevice dev;
	CUcontext ctx;
	CK(cu.DeviceGet(&dev, 0));
	CK(cu.DevicePrimaryCtxRetain(&ctx, dev));
	CK(cu.CtxSetCurrent(ctx));
	CK(cu.ModuleLoadData(&g_mod, fb));
	const enum moe_dtype types[] = { MOE_DTYPE_F32, MOE_DTYPE_F16, MOE_DTYPE_BF16, MOE_DTYPE_Q8_0, MOE_DTYPE_Q4_0 };
	int bad = 0;
	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
		bad |= run_case(types[i], 96, 64, 32);
		bad |= run_case(types[i], 160, 96, 64); /* partial tiles in every dimension */
	}
	bad |= run_case(MOE_DTYPE_BF16, 2048, 1024, 1024); /* the OLMoE shape at r = m */
	CK(cu.ModuleUnload(g_mod));
	CK(cu.DevicePrimaryCtxRelease(dev));
	return bad ? 1 : 0;
}
