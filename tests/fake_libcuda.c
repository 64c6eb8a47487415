/* fake_libcuda.c - a stand-in libcuda.so.1 for the tests of moe-run's
 * device path on machines without a GPU (tests/test_moe_run_fakegpu.sh).
 * Loaded through MOETIER_LIBCUDA by both moetierd (daemon/cuda_api.c) and
 * moe-run (client/run/gpu.c), it gives them the driver calls they use with
 * "device memory" in host memory, so the code above the driver runs as on
 * a GPU:
 *   - device pointers are host addresses; copies are memcpy, done at once
 *     (every stream is synchronous; host functions run at their launch);
 *   - VMM: cuMemCreate makes a memfd, cuMemExportToShareableHandle hands
 *     out a dup of it, cuMemImportFromShareableHandle takes one,
 *     cuMemAddressReserve reserves PROT_NONE address space and cuMemMap
 *     maps the memfd there (MAP_SHARED: the daemon's fills show through
 *     the client's mapping, as on the device); cuMemSetAccess read-only is
 *     mprotect(PROT_READ), so a client write would fault;
 *   - the kernels of kernels/ffn.cu (moe_ffn_gate_up, moe_ffn_down) computed
 *     on the CPU from their argument block, f32/f16/bf16/q8_0 SwiGLU
 *     experts, after checking the launch geometry the argument block's
 *     comment prescribes (a wrong grid would skip work on a GPU);
 *   - no managed memory (the uvm backend gets CUDA_ERROR_NOT_SUPPORTED).
 * Its arithmetic is f32 in its own order, like the device's: results
 * differ from the host's in the last bits, as on a GPU.
 * Test code only: never a driver for anything else. */
#include "config.h"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "dtype.h"
#include "ffn_cuda.h"
#include "model.h"

#define GRAN (64u << 10) /* allocation granularity */
#define FN_UP ((CUfunction)(uintptr_t)0x1001)
#define FN_DOWN ((CUfunction)(uintptr_t)0x1002)

struct alloc {           /* a CUmemGenericAllocationHandle */
	int fd;
	size_t size;
	int refs;            /* the handle and each mapping */
};

struct mapping {
	uintptr_t va;
	size_t size;
	struct alloc *a;
	struct mapping *next;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct mapping *maps;

static void unref(struct alloc *a)
{
	if (--a->refs == 0) {
		close(a->fd);
		free(a);
	}
}

/* ---- init, device, context ---- */

CUresult cuInit(unsigned int flags)
{
	(void)flags;
	return CUDA_SUCCESS;
}

static CUresult fk_DriverGetVersion(int *v)
{
	*v = 12080;
	return CUDA_SUCCESS;
}

static CUresult fk_GetErrorName(CUresult rc, const char **s)
{
	*s = rc == CUDA_SUCCESS ? "CUDA_SUCCESS" : "CUDA_ERROR (fake driver)";
	return CUDA_SUCCESS;
}

static CUresult fk_GetErrorString(CUresult rc, const char **s)
{
	*s = rc == CUDA_SUCCESS ? "no error" : "error (fake driver)";
	return CUDA_SUCCESS;
}

static CUresult fk_DeviceGet(CUdevice *d, int ordinal)
{
	if (ordinal != 0)
		return CUDA_ERROR_INVALID_DEVICE;
	*d = 0;
	return CUDA_SUCCESS;
}

static CUresult fk_DeviceGetCount(int *n)
{
	*n = 1;
	return CUDA_SUCCESS;
}

static CUresult fk_DeviceGetAttribute(int *v, CUdevice_attribute a, CUdevice d)
{
	(void)d;
	switch (a) {
	case CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY:
	case CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS: *v = 0; break;
	case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = 9; break;
	default: *v = 1; break;
	}
	return CUDA_SUCCESS;
}

static CUresult fk_DeviceGetName(char *name, int len, CUdevice d)
{
	(void)d;
	snprintf(name, (size_t)len, "fake CUDA device (tests/fake_libcuda)");
	return CUDA_SUCCESS;
}

static CUresult fk_DevicePrimaryCtxRetain(CUcontext *c, CUdevice d)
{
	(void)d;
	*c = (CUcontext)(uintptr_t)0x100;
	return CUDA_SUCCESS;
}

static CUresult fk_DevicePrimaryCtxRelease(CUdevice d)
{
	(void)d;
	return CUDA_SUCCESS;
}

static __thread CUcontext cur;

static CUresult fk_CtxSetCurrent(CUcontext c)
{
	cur = c;
	return CUDA_SUCCESS;
}

static CUresult fk_CtxGetCurrent(CUcontext *c)
{
	*c = cur;
	return CUDA_SUCCESS;
}

static CUresult fk_Success(void)
{
	return CUDA_SUCCESS;
}

static CUresult fk_NotSupported(void)
{
	return CUDA_ERROR_NOT_SUPPORTED;
}

static CUresult fk_MemGetInfo(size_t *free_b, size_t *total_b)
{
	*free_b = *total_b = (size_t)16 << 30;
	return CUDA_SUCCESS;
}

/* ---- memory ---- */

static CUresult fk_MemGetAllocationGranularity(size_t *g, const CUmemAllocationProp *p, CUmemAllocationGranularity_flags f)
{
	(void)p, (void)f;
	*g = GRAN;
	return CUDA_SUCCESS;
}

static CUresult fk_MemCreate(CUmemGenericAllocationHandle *h, size_t size, const CUmemAllocationProp *p,
			     unsigned long long flags)
{
	(void)p, (void)flags;
	if (!size || size % GRAN)
		return CUDA_ERROR_INVALID_VALUE;
	struct alloc *a = calloc(1, sizeof(*a));
	if (!a)
		return CUDA_ERROR_OUT_OF_MEMORY;
	a->fd = memfd_create("fake-cuda-chunk", MFD_CLOEXEC);
	if (a->fd < 0 || ftruncate(a->fd, (off_t)size)) {
		if (a->fd >= 0)
			close(a->fd);
		free(a);
		return CUDA_ERROR_OUT_OF_MEMORY;
	}
	a->size = size;
	a->refs = 1;
	*h = (CUmemGenericAllocationHandle)(uintptr_t)a;
	return CUDA_SUCCESS;
}

static CUresult fk_MemRelease(CUmemGenericAllocationHandle h)
{
	pthread_mutex_lock(&mu);
	unref((struct alloc *)(uintptr_t)h);
	pthread_mutex_unlock(&mu);
	return CUDA_SUCCESS;
}

static CUresult fk_MemAddressReserve(CUdeviceptr *p, size_t size, size_t align, CUdeviceptr addr,
				     unsigned long long flags)
{
	(void)addr, (void)flags;
	if (!align)
		align = GRAN;
	if (!size || size % GRAN || align % GRAN)
		return CUDA_ERROR_INVALID_VALUE;
	uint8_t *m = mmap(NULL, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (m == MAP_FAILED)
		return CUDA_ERROR_OUT_OF_MEMORY;
	uintptr_t a = ((uintptr_t)m + align - 1) / align * align;
	/* the slack before and after goes back */
	if (a > (uintptr_t)m)
		munmap(m, a - (uintptr_t)m);
	if ((uintptr_t)m + size + align > a + size)
		munmap((void *)(a + size), (uintptr_t)m + size + align - (a + size));
	*p = (CUdeviceptr)a;
	return CUDA_SUCCESS;
}

static CUresult fk_MemAddressFree(CUdeviceptr p, size_t size)
{
	munmap((void *)(uintptr_t)p, size);
	return CUDA_SUCCESS;
}

static CUresult fk_MemMap(CUdeviceptr p, size_t size, size_t off, CUmemGenericAllocationHandle h,
			  unsigned long long flags)
{
	struct alloc *a = (struct alloc *)(uintptr_t)h;
	(void)flags;
	if (off + size > a->size || (uintptr_t)p % GRAN)
		return CUDA_ERROR_INVALID_VALUE;
	/* no access until cuMemSetAccess, as on the device */
	void *m = mmap((void *)(uintptr_t)p, size, PROT_NONE, MAP_SHARED | MAP_FIXED, a->fd, (off_t)off);
	if (m == MAP_FAILED)
		return CUDA_ERROR_OUT_OF_MEMORY;
	struct mapping *mp = malloc(sizeof(*mp));
	if (!mp)
		return CUDA_ERROR_OUT_OF_MEMORY;
	pthread_mutex_lock(&mu);
	*mp = (struct mapping){ (uintptr_t)p, size, a, maps };
	maps = mp;
	a->refs++;
	pthread_mutex_unlock(&mu);
	return CUDA_SUCCESS;
}

static CUresult fk_MemUnmap(CUdeviceptr p, size_t size)
{
	pthread_mutex_lock(&mu);
	for (struct mapping **pp = &maps; *pp; pp = &(*pp)->next)
		if ((*pp)->va == (uintptr_t)p && (*pp)->size == size) {
			struct mapping *m = *pp;
			*pp = m->next;
			/* back to reserved address space */
			mmap((void *)(uintptr_t)p, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
			     -1, 0);
			unref(m->a);
			free(m);
			pthread_mutex_unlock(&mu);
			return CUDA_SUCCESS;
		}
	pthread_mutex_unlock(&mu);
	return CUDA_ERROR_INVALID_VALUE;
}

static CUresult fk_MemSetAccess(CUdeviceptr p, size_t size, const CUmemAccessDesc *d, size_t count)
{
	if (count != 1 || d->location.type != CU_MEM_LOCATION_TYPE_DEVICE)
		return CUDA_ERROR_INVALID_VALUE;
	int prot = d->flags == CU_MEM_ACCESS_FLAGS_PROT_READWRITE ? PROT_READ | PROT_WRITE
		   : d->flags == CU_MEM_ACCESS_FLAGS_PROT_READ    ? PROT_READ
								  : PROT_NONE;
	return mprotect((void *)(uintptr_t)p, size, prot) ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
}

static CUresult fk_MemExportToShareableHandle(void *out, CUmemGenericAllocationHandle h, CUmemAllocationHandleType t,
					      unsigned long long flags)
{
	(void)flags;
	if (t != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
		return CUDA_ERROR_NOT_SUPPORTED;
	int fd = dup(((struct alloc *)(uintptr_t)h)->fd);
	if (fd < 0)
		return CUDA_ERROR_OUT_OF_MEMORY;
	*(int *)out = fd;
	return CUDA_SUCCESS;
}

static CUresult fk_MemImportFromShareableHandle(CUmemGenericAllocationHandle *h, void *os, CUmemAllocationHandleType t)
{
	struct stat st;
	if (t != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
		return CUDA_ERROR_NOT_SUPPORTED;
	int fd = dup((int)(uintptr_t)os);
	if (fd < 0 || fstat(fd, &st) || st.st_size <= 0) {
		if (fd >= 0)
			close(fd);
		return CUDA_ERROR_INVALID_VALUE;
	}
	struct alloc *a = calloc(1, sizeof(*a));
	if (!a) {
		close(fd);
		return CUDA_ERROR_OUT_OF_MEMORY;
	}
	*a = (struct alloc){ fd, (size_t)st.st_size, 1 };
	*h = (CUmemGenericAllocationHandle)(uintptr_t)a;
	return CUDA_SUCCESS;
}

static CUresult fk_MemAlloc(CUdeviceptr *p, size_t size)
{
	void *m = NULL;
	if (posix_memalign(&m, 256, size ? size : 1))
		return CUDA_ERROR_OUT_OF_MEMORY;
	*p = (CUdeviceptr)(uintptr_t)m;
	return CUDA_SUCCESS;
}

static CUresult fk_MemFree(CUdeviceptr p)
{
	free((void *)(uintptr_t)p);
	return CUDA_SUCCESS;
}

static CUresult fk_MemAllocHost(void **p, size_t size)
{
	return (*p = malloc(size ? size : 1)) ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

static CUresult fk_MemFreeHost(void *p)
{
	free(p);
	return CUDA_SUCCESS;
}

static CUresult fk_MemcpyHtoD(CUdeviceptr d, const void *s, size_t n)
{
	memcpy((void *)(uintptr_t)d, s, n);
	return CUDA_SUCCESS;
}

static CUresult fk_MemcpyDtoH(void *d, CUdeviceptr s, size_t n)
{
	memcpy(d, (const void *)(uintptr_t)s, n);
	return CUDA_SUCCESS;
}

static CUresult fk_MemcpyHtoDAsync(CUdeviceptr d, const void *s, size_t n, CUstream st)
{
	(void)st;
	return fk_MemcpyHtoD(d, s, n);
}

static CUresult fk_MemcpyDtoHAsync(void *d, CUdeviceptr s, size_t n, CUstream st)
{
	(void)st;
	return fk_MemcpyDtoH(d, s, n);
}

static CUresult fk_MemsetD32Async(CUdeviceptr d, unsigned int v, size_t n, CUstream st)
{
	uint32_t *p = (uint32_t *)(uintptr_t)d;
	(void)st;
	for (size_t i = 0; i < n; i++)
		p[i] = v;
	return CUDA_SUCCESS;
}

/* ---- streams, events, host functions ---- */

static CUresult fk_StreamCreate(CUstream *s, unsigned int flags)
{
	(void)flags;
	*s = malloc(1);
	return *s ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

static CUresult fk_StreamDestroy(CUstream s)
{
	free(s);
	return CUDA_SUCCESS;
}

static CUresult fk_StreamSynchronize(CUstream s)
{
	(void)s;
	return CUDA_SUCCESS;
}

static CUresult fk_EventCreate(CUevent *e, unsigned int flags)
{
	(void)flags;
	*e = calloc(1, sizeof(struct timespec));
	return *e ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

static CUresult fk_EventDestroy(CUevent e)
{
	free(e);
	return CUDA_SUCCESS;
}

static CUresult fk_EventRecord(CUevent e, CUstream s)
{
	(void)s;
	clock_gettime(CLOCK_MONOTONIC, (struct timespec *)(void *)e);
	return CUDA_SUCCESS;
}

static CUresult fk_EventQuery(CUevent e)
{
	(void)e;
	return CUDA_SUCCESS;
}

static CUresult fk_EventSynchronize(CUevent e)
{
	(void)e;
	return CUDA_SUCCESS;
}

static CUresult fk_EventElapsedTime(float *ms, CUevent a, CUevent b)
{
	const struct timespec *x = (const void *)a, *y = (const void *)b;
	*ms = (float)((double)(y->tv_sec - x->tv_sec) * 1e3 + (double)(y->tv_nsec - x->tv_nsec) * 1e-6);
	return CUDA_SUCCESS;
}

static CUresult fk_LaunchHostFunc(CUstream s, CUhostFn fn, void *data)
{
	(void)s;
	fn(data); /* everything before it on the stream is done */
	return CUDA_SUCCESS;
}

/* ---- modules and the ffn kernels ---- */

static CUresult fk_ModuleLoadData(CUmodule *m, const void *image)
{
	if (!image)
		return CUDA_ERROR_INVALID_IMAGE;
	*m = (CUmodule)(uintptr_t)0x200;
	return CUDA_SUCCESS;
}

static CUresult fk_ModuleUnload(CUmodule m)
{
	(void)m;
	return CUDA_SUCCESS;
}

static CUresult fk_ModuleGetFunction(CUfunction *f, CUmodule m, const char *name)
{
	(void)m;
	if (!strcmp(name, "moe_ffn_gate_up"))
		*f = FN_UP;
	else if (!strcmp(name, "moe_ffn_down"))
		*f = FN_DOWN;
	else
		return CUDA_ERROR_NOT_FOUND;
	return CUDA_SUCCESS;
}

static float half_to_f32(uint16_t h)
{
	const uint32_t s = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, m = h & 1023;
	float v;
	if (e == 0)
		v = ldexpf((float)m, -24);
	else if (e == 31)
		v = m ? NAN : INFINITY;
	else
		v = ldexpf((float)(m | 1024), (int)e - 25);
	return s ? -v : v;
}

/* Row r of a matrix of the extent at ext, widened to f32 into out. */
static int row_f32(const uint8_t *ext, const struct ffn_cuda_mat *M, uint32_t r, float *out)
{
	const uint8_t *p = ext + M->offset + (uint64_t)r * M->row_bytes;
	switch (M->dtype) {
	case MOE_DTYPE_F32: memcpy(out, p, (size_t)M->cols * 4); return 0;
	case MOE_DTYPE_F16:
	case MOE_DTYPE_BF16:
		for (uint32_t i = 0; i < M->cols; i++) {
			uint16_t h;
			memcpy(&h, p + 2 * i, 2);
			if (M->dtype == MOE_DTYPE_F16) {
				out[i] = half_to_f32(h);
			} else {
				uint32_t u = (uint32_t)h << 16;
				memcpy(&out[i], &u, 4);
			}
		}
		return 0;
	case MOE_DTYPE_Q8_0:
		for (uint32_t b = 0; b < M->cols / 32; b++) {
			uint16_t d;
			memcpy(&d, p + 34 * b, 2);
			const float s = half_to_f32(d);
			for (uint32_t i = 0; i < 32; i++)
				out[32 * b + i] = s * (float)(int8_t)p[34 * b + 2 + i];
		}
		return 0;
	default: return -1;
	}
}

static float dot(const float *a, const float *b, uint32_t n)
{
	float s = 0.0f;
	for (uint32_t i = 0; i < n; i++)
		s += a[i] * b[i];
	return s;
}

static CUresult run_ffn(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, const struct ffn_cuda_args *a)
{
	const uint32_t *gslot = (const uint32_t *)(uintptr_t)a->group_slot,
		       *gstart = (const uint32_t *)(uintptr_t)a->group_start,
		       *ptok = (const uint32_t *)(uintptr_t)a->pair_token;
	const float *pw = (const float *)(uintptr_t)a->pair_weight, *x = (const float *)(uintptr_t)a->x;
	float *h = (float *)(uintptr_t)a->h, *y = (float *)(uintptr_t)a->y;
	const uint32_t rows = f == FN_UP ? a->m : a->n;
	/* the geometry of ffn_cuda.h: what a GPU would not cover, it would
	 * skip silently; here it is an error */
	if (bx != FFN_CUDA_THREADS || gy != a->n_groups || (uint64_t)gx * FFN_CUDA_TILE_ROWS < rows ||
	    (uint64_t)gz * FFN_CUDA_TILE_PAIRS < a->max_group_pairs || a->kind != MOE_FFN_SWIGLU)
		return CUDA_ERROR_INVALID_VALUE;
	float *w = malloc(sizeof(float) * (a->n > a->m ? a->n : a->m));
	float *g = malloc(sizeof(float) * a->m), *u = malloc(sizeof(float) * a->m);
	CUresult rc = CUDA_SUCCESS;
	if (!w || !g || !u) {
		rc = CUDA_ERROR_OUT_OF_MEMORY;
		goto out;
	}
	for (uint32_t gi = 0; gi < a->n_groups && rc == CUDA_SUCCESS; gi++) {
		const uint8_t *ext = (const uint8_t *)(uintptr_t)(a->arena + (uint64_t)gslot[gi] * a->slot_stride);
		if (gstart[gi + 1] < gstart[gi] || gstart[gi + 1] - gstart[gi] > a->max_group_pairs) {
			rc = CUDA_ERROR_INVALID_VALUE;
			break;
		}
		for (uint32_t p = gstart[gi]; p < gstart[gi + 1]; p++) {
			const uint32_t t = ptok[p];
			if (t >= a->n_tokens)
				continue;
			if (f == FN_UP) {
				for (uint32_t r = 0; r < a->m; r++) {
					if (row_f32(ext, &a->gate, r, w)) {
						rc = CUDA_ERROR_NOT_SUPPORTED;
						break;
					}
					g[r] = dot(w, x + (size_t)t * a->n, a->n);
					if (row_f32(ext, &a->up, r, w)) {
						rc = CUDA_ERROR_NOT_SUPPORTED;
						break;
					}
					u[r] = dot(w, x + (size_t)t * a->n, a->n);
					h[(size_t)p * a->m + r] = g[r] / (1.0f + expf(-g[r])) * u[r];
				}
			} else {
				for (uint32_t r = 0; r < a->n; r++) {
					if (row_f32(ext, &a->down, r, w)) {
						rc = CUDA_ERROR_NOT_SUPPORTED;
						break;
					}
					y[(size_t)t * a->n + r] += pw[p] * dot(w, h + (size_t)p * a->m, a->m);
				}
			}
		}
	}
out:
	free(w);
	free(g);
	free(u);
	return rc;
}

static CUresult fk_LaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
				unsigned bz, unsigned shmem, CUstream s, void **params, void **extra)
{
	(void)s;
	if ((f != FN_UP && f != FN_DOWN) || by != 1 || bz != 1 || shmem || extra || !params)
		return CUDA_ERROR_INVALID_VALUE;
	return run_ffn(f, gx, gy, gz, bx, (const struct ffn_cuda_args *)params[0]);
}

/* ---- cuGetProcAddress ---- */

static const struct {
	const char *name;
	void (*fn)(void);
} table[] = {
#define F(n) { "cu" #n, (void (*)(void))fk_##n }
	{ "cuInit", (void (*)(void))cuInit },
	F(DriverGetVersion), F(GetErrorName), F(GetErrorString), F(DeviceGet), F(DeviceGetCount),
	F(DeviceGetAttribute), F(DeviceGetName), F(DevicePrimaryCtxRetain), F(DevicePrimaryCtxRelease),
	F(CtxSetCurrent), F(CtxGetCurrent), F(MemGetInfo), F(MemGetAllocationGranularity), F(MemCreate),
	F(MemRelease), F(MemAddressReserve), F(MemAddressFree), F(MemMap), F(MemUnmap), F(MemSetAccess),
	F(MemExportToShareableHandle), F(MemImportFromShareableHandle), F(MemAlloc), F(MemFree), F(MemAllocHost),
	F(MemFreeHost), F(MemcpyHtoD), F(MemcpyDtoH), F(MemcpyHtoDAsync), F(MemcpyDtoHAsync), F(MemsetD32Async),
	F(StreamCreate), F(StreamDestroy), F(StreamSynchronize), F(EventCreate), F(EventDestroy), F(EventRecord),
	F(EventQuery), F(EventSynchronize), F(EventElapsedTime), F(LaunchHostFunc), F(ModuleLoadData),
	F(ModuleUnload), F(ModuleGetFunction), F(LaunchKernel),
#undef F
	{ "cuCtxSynchronize", (void (*)(void))fk_Success },
	{ "cuMemHostRegister", (void (*)(void))fk_Success },
	{ "cuMemHostUnregister", (void (*)(void))fk_Success },
	/* no managed memory: the uvm backend is refused */
	{ "cuMemAllocManaged", (void (*)(void))fk_NotSupported },
	{ "cuMemAdvise", (void (*)(void))fk_NotSupported },
	{ "cuMemPrefetchAsync", (void (*)(void))fk_NotSupported },
};

CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, cuuint64_t flags,
			     CUdriverProcAddressQueryResult *status)
{
	(void)version, (void)flags;
	for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++)
		if (!strcmp(symbol, table[i].name)) {
			memcpy(pfn, &table[i].fn, sizeof(*pfn));
			if (status)
				*status = CU_GET_PROC_ADDRESS_SUCCESS;
			return CUDA_SUCCESS;
		}
	*pfn = NULL;
	if (status)
		*status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
	return CUDA_ERROR_NOT_FOUND;
}
