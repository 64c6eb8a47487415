/* cuda_api.h - the CUDA driver, loaded at run time.
 *
 * moetierd never links libcuda or libcudart: dlopen("libcuda.so.1") ->
 * cuGetProcAddress_v2 -> a table of versioned PFN_* pointers from
 * cudaTypedefs.h, so one binary runs with and without a GPU. Only cuda.h is
 * needed at build time (HAVE_CUDA). Tests build their own struct cu_api with
 * fake entry points to drive the GPU tier's logic without a device.
 *
 * Never call into CUDA before a fork(): the child's driver state is
 * undefined. cu_api_get() is therefore called lazily, from the process that
 * will use the GPU. */
#ifndef MOETIER_CUDA_API_H
#define MOETIER_CUDA_API_H

#include "util.h"

#ifdef HAVE_CUDA
#include <cuda.h>
#include <cudaTypedefs.h>

/* X(name, abi_version): the field `name` has type PFN_name_vABI and is
 * resolved with cuGetProcAddress(name, ..., ABI). All are required except
 * those in CU_API_OPTIONAL (kernels; a driver without them still serves
 * the memory tier). */
#define CU_API_REQUIRED(X) \
	X(cuInit, 2000) \
	X(cuDriverGetVersion, 2020) \
	X(cuGetErrorName, 6000) \
	X(cuGetErrorString, 6000) \
	X(cuDeviceGet, 2000) \
	X(cuDeviceGetCount, 2000) \
	X(cuDeviceGetAttribute, 2000) \
	X(cuDeviceGetName, 2000) \
	X(cuDevicePrimaryCtxRetain, 7000) \
	X(cuDevicePrimaryCtxRelease, 11000) \
	X(cuCtxSetCurrent, 4000) \
	X(cuCtxGetCurrent, 4000) \
	X(cuCtxSynchronize, 2000) \
	X(cuMemGetInfo, 3020) \
	X(cuMemGetAllocationGranularity, 10020) \
	X(cuMemCreate, 10020) \
	X(cuMemRelease, 10020) \
	X(cuMemAddressReserve, 10020) \
	X(cuMemAddressFree, 10020) \
	X(cuMemMap, 10020) \
	X(cuMemUnmap, 10020) \
	X(cuMemSetAccess, 10020) \
	X(cuMemExportToShareableHandle, 10020) \
	X(cuMemHostRegister, 6050) \
	X(cuMemHostUnregister, 4000) \
	X(cuMemAlloc, 3020) \
	X(cuMemFree, 3020) \
	X(cuMemAllocManaged, 6000) \
	X(cuMemAdvise, 12020) \
	X(cuMemPrefetchAsync, 12020) \
	X(cuMemcpyHtoD, 3020) \
	X(cuMemcpyDtoH, 3020) \
	X(cuMemcpyHtoDAsync, 3020) \
	X(cuMemcpyDtoHAsync, 3020) \
	X(cuStreamCreate, 2000) \
	X(cuStreamDestroy, 4000) \
	X(cuStreamSynchronize, 2000) \
	X(cuEventCreate, 2000) \
	X(cuEventDestroy, 4000) \
	X(cuEventRecord, 2000) \
	X(cuEventQuery, 2000) \
	X(cuEventSynchronize, 2000) \
	X(cuLaunchHostFunc, 10000)

#define CU_API_OPTIONAL(X) \
	X(cuModuleLoadData, 2000) \
	X(cuModuleUnload, 2000) \
	X(cuModuleGetFunction, 2000) \
	X(cuLaunchKernel, 4000)

struct cu_api {
	void *dl;            /* dlopen handle; NULL for a fake table */
	int driver_version;  /* cuDriverGetVersion, e.g. 13000 */
	int device_count;
#define CU_API_FIELD(name, ver) PFN_##name##_v##ver name;
	CU_API_REQUIRED(CU_API_FIELD)
	CU_API_OPTIONAL(CU_API_FIELD)
#undef CU_API_FIELD
};

/* "CUDA_ERROR_OUT_OF_MEMORY (2): out of memory" into buf; works on a fake
 * table or when cuGetErrorName itself fails. Returns buf. */
const char *cu_api_strerror(const struct cu_api *cu, CUresult rc, char *buf, size_t len);
/* A negative errno for a driver result: OOM -> -ENOMEM, NOT_READY ->
 * -EAGAIN, NOT_SUPPORTED -> -EOPNOTSUPP, no device/stub/driver -> -ENODEV,
 * invalid value/handle -> -EINVAL, else -EIO. */
int cu_api_errno(CUresult rc);
/* True for the results that mean "there is no usable GPU here" (stub
 * library, insufficient driver, no device, driver mismatch, unknown). */
bool cu_api_rc_is_no_gpu(CUresult rc);
/* Fills *api from an open libcuda handle (dlopen'd) or from sym, the
 * driver's cuGetProcAddress_v2. Exposed for tests. */
int cu_api_resolve(struct cu_api *api, PFN_cuGetProcAddress_v12000 getproc, struct moe_error *err);
#endif

struct cu_api;

/* The process-wide driver table: loaded and cuInit'ed once, on first use.
 * -ENODEV (with the reason in err, logged once) when there is no driver or
 * no GPU, -ENOTSUP when this build has no cuda.h. */
int cu_api_get(const struct cu_api **out, struct moe_error *err);

#endif
