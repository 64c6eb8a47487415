/* cuda_api.c - dlopen("libcuda.so.1") and a versioned driver table. */
#include <config.h>  /* autoconf's, from the build tree */

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_api.h"

#ifdef HAVE_CUDA

/* 35 is the runtime's cudaErrorInsufficientDriver; the driver API has no
 * name for it, but platform.md lists it among the "no GPU" results. */
#define CU_RC_INSUFFICIENT_DRIVER ((CUresult)35)

const char *cu_api_strerror(const struct cu_api *cu, CUresult rc, char *buf, size_t len)
{
	const char *name = NULL, *str = NULL;

	if (cu && cu->cuGetErrorName && cu->cuGetErrorName(rc, &name) != CUDA_SUCCESS)
		name = NULL;
	if (cu && cu->cuGetErrorString && cu->cuGetErrorString(rc, &str) != CUDA_SUCCESS)
		str = NULL;
	snprintf(buf, len, "%s (%d)%s%s", name ? name : "CUDA error", (int)rc, str ? ": " : "",
		 str ? str : "");
	return buf;
}

int cu_api_errno(CUresult rc)
{
	switch (rc) {
	case CUDA_SUCCESS: return 0;
	case CUDA_ERROR_OUT_OF_MEMORY: return -ENOMEM;
	case CUDA_ERROR_NOT_READY: return -EAGAIN;
	case CUDA_ERROR_NOT_SUPPORTED: return -EOPNOTSUPP;
	case CUDA_ERROR_INVALID_VALUE:
	case CUDA_ERROR_INVALID_HANDLE:
	case CUDA_ERROR_INVALID_DEVICE: return -EINVAL;
	case CUDA_ERROR_NO_DEVICE:
	case CUDA_ERROR_STUB_LIBRARY:
	case CUDA_ERROR_SYSTEM_DRIVER_MISMATCH:
	case CUDA_ERROR_NOT_INITIALIZED:
	case CUDA_ERROR_DEINITIALIZED: return -ENODEV;
	default: return rc == CU_RC_INSUFFICIENT_DRIVER ? -ENODEV : -EIO;
	}
}

bool cu_api_rc_is_no_gpu(CUresult rc)
{
	/* platform.md section 5: 34 stub, 35 insufficient driver, 100 no
	 * device, 803 driver mismatch, 999 unknown (broken install). */
	return rc == CUDA_ERROR_STUB_LIBRARY || rc == CU_RC_INSUFFICIENT_DRIVER ||
	       rc == CUDA_ERROR_NO_DEVICE || rc == CUDA_ERROR_SYSTEM_DRIVER_MISMATCH ||
	       rc == CUDA_ERROR_UNKNOWN;
}

int cu_api_resolve(struct cu_api *api, PFN_cuGetProcAddress_v12000 getproc, struct moe_error *err)
{
	CUdriverProcAddressQueryResult q;
	CUresult rc;
	void *fn;

	/* Each symbol is asked for at the ABI version its PFN type was
	 * declared for, so a newer driver hands back that exact variant. */
#define CU_API_REQ(name, ver) \
	fn = NULL; \
	rc = getproc(#name, &fn, ver, CU_GET_PROC_ADDRESS_DEFAULT, &q); \
	if (rc != CUDA_SUCCESS || q != CU_GET_PROC_ADDRESS_SUCCESS || !fn) \
		return moe_error_set(err, cu_api_rc_is_no_gpu(rc) || rc == CUDA_SUCCESS ? -ENODEV : -EIO, \
				     "cuGetProcAddress(%s, %d): result %d, status %d", #name, ver, \
				     (int)rc, (int)q); \
	memcpy(&api->name, &fn, sizeof(fn));
#define CU_API_OPT(name, ver) \
	fn = NULL; \
	rc = getproc(#name, &fn, ver, CU_GET_PROC_ADDRESS_DEFAULT, &q); \
	if (rc == CUDA_SUCCESS && q == CU_GET_PROC_ADDRESS_SUCCESS && fn) \
		memcpy(&api->name, &fn, sizeof(fn)); \
	else \
		api->name = NULL;
	CU_API_REQUIRED(CU_API_REQ)
	CU_API_OPTIONAL(CU_API_OPT)
#undef CU_API_REQ
#undef CU_API_OPT
	return 0;
}

static struct {
	pthread_once_t once;
	struct cu_api api;
	int rc;
	struct moe_error why;
} g_cu = { .once = PTHREAD_ONCE_INIT };

static int load(struct cu_api *api, struct moe_error *err)
{
	/* MOETIER_LIBCUDA lets tests point at the toolkit's stub (it must
	 * fail cleanly) and lets operators pick a driver copy. */
	const char *lib = getenv("MOETIER_LIBCUDA");
	PFN_cuGetProcAddress_v12000 getproc;
	char ebuf[160];
	void *sym;
	CUresult rc;
	int r;

	if (!lib || !*lib)
		lib = "libcuda.so.1";
	api->dl = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
	if (!api->dl)
		return moe_error_set(err, -ENODEV, "no CUDA driver: %s", dlerror());
	sym = dlsym(api->dl, "cuGetProcAddress_v2");
	if (!sym) {
		r = moe_error_set(err, -ENODEV, "%s has no cuGetProcAddress_v2 (driver older than CUDA 12)", lib);
		goto fail;
	}
	memcpy(&getproc, &sym, sizeof(sym));
	/* cuInit first: on the stub even cuGetProcAddress answers 34. */
	sym = dlsym(api->dl, "cuInit");
	if (!sym) {
		r = moe_error_set(err, -ENODEV, "%s has no cuInit", lib);
		goto fail;
	}
	memcpy(&api->cuInit, &sym, sizeof(sym));
	rc = api->cuInit(0);
	if (rc != CUDA_SUCCESS) {
		r = moe_error_set(err, cu_api_rc_is_no_gpu(rc) ? -ENODEV : cu_api_errno(rc),
				  "cuInit: %d (%s)", (int)rc,
				  rc == CUDA_ERROR_STUB_LIBRARY ? "stub library, no driver" :
				  rc == CUDA_ERROR_NO_DEVICE ? "no CUDA device" :
				  rc == CU_RC_INSUFFICIENT_DRIVER ? "driver older than the toolkit" :
				  rc == CUDA_ERROR_SYSTEM_DRIVER_MISMATCH ? "driver/kernel module mismatch" :
				  "driver failed");
		goto fail;
	}
	r = cu_api_resolve(api, getproc, err);
	if (r < 0)
		goto fail;
	rc = api->cuDriverGetVersion(&api->driver_version);
	if (rc != CUDA_SUCCESS) {
		r = moe_error_set(err, cu_api_errno(rc), "cuDriverGetVersion: %s",
				  cu_api_strerror(api, rc, ebuf, sizeof(ebuf)));
		goto fail;
	}
	rc = api->cuDeviceGetCount(&api->device_count);
	if (rc != CUDA_SUCCESS || api->device_count <= 0) {
		r = moe_error_set(err, -ENODEV, "cuDeviceGetCount: %s, %d devices",
				  cu_api_strerror(api, rc, ebuf, sizeof(ebuf)), api->device_count);
		goto fail;
	}
	/* CUDA 13 headers: cuMemAdvise/PrefetchAsync v2 need a 12.2+ driver,
	 * which cuGetProcAddress already enforced above. */
	return 0;
fail:
	dlclose(api->dl);
	api->dl = NULL;
	return r;
}

static void load_once(void)
{
	g_cu.rc = load(&g_cu.api, &g_cu.why);
	if (g_cu.rc < 0)
		moe_info("cuda: no GPU tier: %s", g_cu.why.msg);  /* once per process */
	else
		moe_info("cuda: driver %d.%d, %d device(s)", g_cu.api.driver_version / 1000,
			 (g_cu.api.driver_version % 1000) / 10, g_cu.api.device_count);
}

int cu_api_get(const struct cu_api **out, struct moe_error *err)
{
	pthread_once(&g_cu.once, load_once);
	if (g_cu.rc < 0) {
		*out = NULL;
		return moe_error_set(err, g_cu.rc, "%s", g_cu.why.msg);
	}
	*out = &g_cu.api;
	return 0;
}

#else /* !HAVE_CUDA */

int cu_api_get(const struct cu_api **out, struct moe_error *err)
{
	*out = NULL;
	return moe_error_set(err, -ENOTSUP, "CUDA support not built (no cuda.h at build time)");
}

#endif
