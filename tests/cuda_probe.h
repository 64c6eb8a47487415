/* cuda_probe.h - for the GPU checks (tests/cuda_ffn_check.c,
 * tests/latent_cuda_check.c): the CUDA driver without linking it, the skip
 * rule, random weights in every pack dtype and the GPU-vs-CPU comparison.
 *
 * libcuda.so.1 is loaded with dlopen and every entry point comes from
 * cuGetProcAddress (no -lcuda, no cudart), so the binaries run everywhere
 * and skip (exit 77) when there is no driver, only the stub, or no device.
 * The including file defines CUDA_PROBE_NAME (its name in messages) first. */
#ifndef MOETIER_TESTS_CUDA_PROBE_H
#define MOETIER_TESTS_CUDA_PROBE_H

#include <cuda.h>
#include <cudaTypedefs.h>
#include <dlfcn.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"

#ifndef CUDA_PROBE_NAME
#error "define CUDA_PROBE_NAME before including cuda_probe.h"
#endif

#define CUDA_PROBE_SKIP 77

/* The driver entry points the checks use (ABI as of CUDA 12.0). */
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

/* A failed driver call past the skip checks is a failure (exit 1). */
#define CK(call) \
	do { \
		CUresult rc_ = (call); \
		if (rc_ != CUDA_SUCCESS) { \
			fprintf(stderr, CUDA_PROBE_NAME ": %s failed: CUresult %d\n", #call, (int)rc_); \
			exit(1); \
		} \
	} while (0)

/* Fills cu and runs cuInit: 0, or CUDA_PROBE_SKIP with the reason printed. */
static inline int cuda_probe_load_driver(void)
{
	void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
	if (!lib) {
		printf(CUDA_PROBE_NAME ": SKIP: %s\n", dlerror());
		return CUDA_PROBE_SKIP;
	}
	PFN_cuGetProcAddress_v12000 gpa = (PFN_cuGetProcAddress_v12000)dlsym(lib, "cuGetProcAddress_v2");
	if (!gpa) {
		printf(CUDA_PROBE_NAME ": SKIP: driver has no cuGetProcAddress_v2 (older than CUDA 12)\n");
		return CUDA_PROBE_SKIP;
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
			printf(CUDA_PROBE_NAME ": SKIP: cuGetProcAddress(%s) = %d\n", syms[i].name, (int)rc);
			return CUDA_PROBE_SKIP;
		}
		memcpy((char *)&cu + syms[i].off, &fn, sizeof(fn));
	}
	CUresult rc = cu.Init(0);
	/* 34 stub library, 35 driver older than the toolkit (the runtime's
	 * cudaErrorInsufficientDriver; kept for drivers that report it), 100 no
	 * device, 803 system driver mismatch, 999 unknown */
	if ((int)rc == 34 || (int)rc == 35 || (int)rc == 100 || (int)rc == 803 || (int)rc == 999) {
		printf(CUDA_PROBE_NAME ": SKIP: cuInit = %d (no usable GPU)\n", (int)rc);
		return CUDA_PROBE_SKIP;
	}
	CK(rc);
	return 0;
}

/* The driver (as cuda_probe_load_driver) and the fatbin loaded on device 0's
 * primary context: 0, CUDA_PROBE_SKIP, or exit(1) on a CUDA error. fatbin
 * NULL (built without nvcc) is a skip. */
static inline int cuda_probe_open(const void *fatbin, CUdevice *dev, CUmodule *mod)
{
	if (!fatbin) {
		printf(CUDA_PROBE_NAME ": SKIP: built without nvcc\n");
		return CUDA_PROBE_SKIP;
	}
	int rc = cuda_probe_load_driver();
	if (rc)
		return rc;
	CUcontext ctx;
	CK(cu.DeviceGet(dev, 0));
	CK(cu.DevicePrimaryCtxRetain(&ctx, *dev));
	CK(cu.CtxSetCurrent(ctx));
	CK(cu.ModuleLoadData(mod, fatbin));
	return 0;
}

static inline void cuda_probe_close(CUdevice dev, CUmodule mod)
{
	CK(cu.ModuleUnload(mod));
	CK(cu.DevicePrimaryCtxRelease(dev));
}

/* A device buffer of bytes, holding a copy of host's (host NULL: scratch,
 * left as the driver gives it). */
static inline CUdeviceptr cuda_probe_upload(const void *host, size_t bytes)
{
	CUdeviceptr d;
	CK(cu.MemAlloc(&d, bytes));
	if (host)
		CK(cu.MemcpyHtoD(d, host, bytes));
	return d;
}

/* Deterministic uniform values in [-a, a). */
static uint64_t cuda_probe_rng = 0x1234567;
static inline float cuda_probe_frand(float a)
{
	cuda_probe_rng = cuda_probe_rng * 6364136223846793005ull + 1442695040888963407ull;
	return a * ((float)(cuda_probe_rng >> 40) / 8388608.0f - 1.0f);
}

/* One row of n values in dtype t, as a pack stores it. */
static inline void cuda_probe_encode(enum moe_dtype t, const float *v, uint8_t *out, uint32_t n)
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

/* y_gpu against y_cpu, [T][n]: both sides accumulate in f32 in different
 * orders, so an output may differ by about gamma_K relative to the sum of
 * absolute terms; allowed: |gpu - cpu| <= 1e-4 * (max |cpu| over the token)
 * + 1e-6, far above that and far below any indexing or dequantization
 * error. Returns 1 at the first output past that (printed with what), else
 * 0; *worst: the largest relative difference seen. */
static inline int cuda_probe_compare(const float *y_gpu, const float *y_cpu, uint32_t T, uint32_t n, const char *what,
				     double *worst)
{
	*worst = 0;
	for (uint32_t t = 0; t < T; t++) {
		double mx = 0;
		for (uint32_t i = 0; i < n; i++)
			mx = fmax(mx, fabs(y_cpu[(size_t)t * n + i]));
		for (uint32_t i = 0; i < n; i++) {
			double d = fabs((double)y_gpu[(size_t)t * n + i] - y_cpu[(size_t)t * n + i]);
			*worst = fmax(*worst, d / (mx + 1e-30));
			if (d > 1e-4 * mx + 1e-6) {
				fprintf(stderr, CUDA_PROBE_NAME ": %s token %u out %u: gpu %.9g cpu %.9g\n", what, t, i,
					(double)y_gpu[(size_t)t * n + i], (double)y_cpu[(size_t)t * n + i]);
				return 1;
			}
		}
	}
	return 0;
}

#endif
