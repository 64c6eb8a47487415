/* tier_gpu_cuda.c - the CUDA backends of the GPU arena (built with cuda.h;
 * the driver itself is dlopen'd, see cuda_api.c).
 *
 * Shared by both: the device's primary context (retained for the arena's
 * life and made current at every entry point, since the event loop thread
 * may not have it), one non-blocking stream per direction, one event per
 * slot recorded after each copy, and a host callback (cuLaunchHostFunc)
 * behind it that only writes the arena's eventfd, so the event loop sleeps
 * in epoll instead of spinning on cuEventQuery.
 *
 * vmm: one cuMemAddressReserve range, slot i at base + i * stride, stride =
 *   slot bytes rounded to the recommended granularity. A slot's physical
 *   chunk (cuMemCreate, POSIX-fd exportable) is created and mapped on its
 *   first fill and KEPT on evict, so client imports of the chunk stay valid
 *   ("map once, then indices"); evict(release) unmaps and releases it.
 * uvm: one cuMemAllocManaged range, preferred location and accessed-by the
 *   device; a fill prefetches the slot to the device then copies into it;
 *   evict(release) prefetches it back to host memory.
 * Both: the resident region (config resident_bytes) follows the last slot
 *   in the same range (vmm: whole strides, chunks mapped on its one write;
 *   uvm: 2 MiB blocks prefetched to the device before the write). */
#include <config.h>  /* autoconf's, from the build tree */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cuda_api.h"
#include "tier_gpu_impl.h"

#define UVM_PAGE (2ull << 20)  /* UVM migrates in 2 MiB blocks */

struct cuda {
	const struct cu_api *cu;
	bool uvm;
	CUdevice dev;
	CUcontext ctx;
	bool ctx_retained;
	CUstream h2d, d2h;
	bool posix_fd;                 /* vmm: chunks exportable as fds */
	CUmemAllocationProp prop;      /* vmm */
	CUdeviceptr va;                /* vmm: reserve; uvm: managed range */
	size_t va_len;
	bool host_registered;
	void *host_ptr;                /* what cuMemHostRegister pinned */
	/* vmm: the resident region's chunks, one per stride after the last
	 * slot, created and mapped on the first resident write. */
	CUmemGenericAllocationHandle *res;
	uint32_t nres, res_mapped;
};

static int cuerr(const struct cuda *c, struct moe_error *err, CUresult rc, const char *what)
{
	char buf[200];

	return moe_error_set(err, cu_api_errno(rc), "%s: %s", what,
			     cu_api_strerror(c->cu, rc, buf, sizeof(buf)));
}

/* Logs a failure on a path that cannot report it (cleanup). */
static void culog(const struct cuda *c, CUresult rc, const char *what)
{
	char buf[200];

	if (rc != CUDA_SUCCESS)
		moe_warn("gpu tier: %s: %s", what, cu_api_strerror(c->cu, rc, buf, sizeof(buf)));
}

static int enter(const struct cuda *c, struct moe_error *err)
{
	CUresult rc = c->cu->cuCtxSetCurrent(c->ctx);

	return rc == CUDA_SUCCESS ? 0 : cuerr(c, err, rc, "cuCtxSetCurrent");
}

static CUdeviceptr slot_va(const struct tier_gpu *g, uint32_t s)
{
	return (CUdeviceptr)(g->base + (uint64_t)s * g->stride);
}

static void host_notify(void *arg)
{
	/* Runs on a driver thread: no CUDA calls allowed, only the eventfd. */
	tier_gpu_notify(arg);
}

static int cuda_open(struct tier_gpu *g, const struct tier_gpu_config *cfg, bool uvm,
		     struct moe_error *err)
{
	struct cuda *c;
	CUresult rc;
	int r;

	c = calloc(1, sizeof(*c));
	if (!c)
		return moe_error_set(err, -ENOMEM, "out of memory");
	g->priv = c;
	c->uvm = uvm;
	c->cu = cfg->cu;
	if (!c->cu) {
		r = cu_api_get(&c->cu, err);
		if (r < 0)
			return r;
	}
	if (cfg->device < 0 || cfg->device >= c->cu->device_count)
		return moe_error_set(err, -ENODEV, "CUDA device %d does not exist (%d devices)",
				     cfg->device, c->cu->device_count);
	rc = c->cu->cuDeviceGet(&c->dev, cfg->device);
	if (rc != CUDA_SUCCESS)
		return cuerr(c, err, rc, "cuDeviceGet");
	rc = c->cu->cuDevicePrimaryCtxRetain(&c->ctx, c->dev);
	if (rc != CUDA_SUCCESS)
		return cuerr(c, err, rc, "cuDevicePrimaryCtxRetain");
	c->ctx_retained = true;
	r = enter(c, err);
	if (r < 0)
		return r;
	/* Non-blocking: never serialize behind the legacy default stream
	 * that a kernel library in this process might use. */
	rc = c->cu->cuStreamCreate(&c->h2d, CU_STREAM_NON_BLOCKING);
	if (rc != CUDA_SUCCESS)
		return cuerr(c, err, rc, "cuStreamCreate(h2d)");
	rc = c->cu->cuStreamCreate(&c->d2h, CU_STREAM_NON_BLOCKING);
	if (rc != CUDA_SUCCESS)
		return cuerr(c, err, rc, "cuStreamCreate(d2h)");
	return 0;
}

static int slots_and_events(struct tier_gpu *g, struct moe_error *err)
{
	struct cuda *c = g->priv;

	if (tier_gpu_alloc_slots(g) < 0)
		return moe_error_set(err, -ENOMEM, "out of memory");
	for (uint32_t i = 0; i < g->nslots; i++) {
		CUevent ev;
		CUresult rc = c->cu->cuEventCreate(&ev, CU_EVENT_DISABLE_TIMING);

		if (rc != CUDA_SUCCESS)
			return cuerr(c, err, rc, "cuEventCreate");
		g->slots[i].event = ev;
	}
	return 0;
}

static int attr(const struct cuda *c, CUdevice_attribute a, int *v, struct moe_error *err)
{
	CUresult rc = c->cu->cuDeviceGetAttribute(v, a, c->dev);

	return rc == CUDA_SUCCESS ? 0 : cuerr(c, err, rc, "cuDeviceGetAttribute");
}

/* A device capability the backend cannot work without: -EOPNOTSUPP naming it. */
static int require_attr(const struct cuda *c, CUdevice_attribute a, const char *what,
			struct moe_error *err)
{
	int v, r = attr(c, a, &v, err);

	if (r < 0)
		return r;
	return v ? 0 : moe_error_set(err, -EOPNOTSUPP, "device %d has no %s", c->dev, what);
}

/* res_gran 0: the resident region is counted in whole strides (vmm). */
static int set_nslots(struct tier_gpu *g, const struct tier_gpu_config *cfg, uint64_t gran,
		      uint64_t res_gran, struct moe_error *err)
{
	int r;

	if (gran == 0 || (gran & (gran - 1)))
		return moe_error_set(err, -EIO, "bad allocation granularity %llu",
				     (unsigned long long)gran);
	g->stride = MOE_ALIGN_UP(cfg->slot_bytes, gran);
	r = tier_gpu_count_slots(g, cfg, res_gran ? res_gran : g->stride, err);
	if (r < 0)
		return moe_error_prefix(err, r, "granularity %llu", (unsigned long long)gran);
	return 0;
}

/* Chunks are created lazily, so an arena larger than the device only fails
 * when it fills up: say so at start instead. */
static void warn_capacity(const struct cuda *c, const struct tier_gpu_config *cfg)
{
	size_t free_b = 0, total_b = 0;
	CUresult rc = c->cu->cuMemGetInfo(&free_b, &total_b);

	if (rc != CUDA_SUCCESS)
		culog(c, rc, "cuMemGetInfo");
	else if (cfg->capacity > free_b)
		moe_warn("gpu tier: capacity %llu bytes exceeds the %llu bytes free on device %d "
			 "(of %llu); fills will fail with ENOMEM once it is full",
			 (unsigned long long)cfg->capacity, (unsigned long long)free_b, cfg->device,
			 (unsigned long long)total_b);
}

/* Slots of `gran`-aligned stride within the capacity, the resident region
 * after them, and the arena's length. */
static int size_arena(struct tier_gpu *g, const struct tier_gpu_config *cfg, uint64_t gran,
		      uint64_t res_gran, struct moe_error *err)
{
	struct cuda *c = g->priv;
	int r = set_nslots(g, cfg, gran, res_gran, err);

	if (r < 0)
		return r;
	warn_capacity(c, cfg);
	c->va_len = (size_t)g->nslots * g->stride + g->res_len;
	if (!c->uvm && g->res_len) {
		c->nres = (uint32_t)(g->res_len / g->stride);
		c->res = calloc(c->nres, sizeof(*c->res));
		if (!c->res)
			return moe_error_set(err, -ENOMEM, "out of memory");
	}
	return 0;
}

static int vmm_init(struct tier_gpu *g, const struct tier_gpu_config *cfg, struct moe_error *err)
{
	struct cuda *c;
	size_t gran = 0;
	CUresult rc;
	int r, v;

	r = cuda_open(g, cfg, false, err);
	if (r < 0)
		return r;
	c = g->priv;
	r = require_attr(c, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
			 "virtual memory management", err);
	if (r < 0)
		return r;
	r = attr(c, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, &v, err);
	if (r < 0)
		return r;
	c->posix_fd = v != 0;
	if (!c->posix_fd)
		moe_warn("gpu tier: device %d cannot export POSIX fds; clients will not map the arena",
			 cfg->device);
	c->prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
	c->prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
	c->prop.location.id = c->dev;
	c->prop.requestedHandleTypes = c->posix_fd ? CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
						   : CU_MEM_HANDLE_TYPE_NONE;
	rc = c->cu->cuMemGetAllocationGranularity(&gran, &c->prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED);
	if (rc != CUDA_SUCCESS)
		return cuerr(c, err, rc, "cuMemGetAllocationGranularity");
	/* The resident region in whole strides: each of its chunks is
	 * exported like a slot's, chunk_bytes stays one number. */
	r = size_arena(g, cfg, gran, 0, err);
	if (r < 0)
		return r;
	rc = c->cu->cuMemAddressReserve(&c->va, c->va_len, gran, 0, 0);
	if (rc != CUDA_SUCCESS) {
		c->va = 0;
		return cuerr(c, err, rc, "cuMemAddressReserve");
	}
	g->base = (uint64_t)c->va;
	return slots_and_events(g, err);
}

static int uvm_init(struct tier_gpu *g, const struct tier_gpu_config *cfg, struct moe_error *err)
{
	CUmemLocation loc = { .type = CU_MEM_LOCATION_TYPE_DEVICE };
	struct cuda *c;
	CUresult rc;
	int r;

	r = cuda_open(g, cfg, true, err);
	if (r < 0)
		return r;
	c = g->priv;
	r = require_attr(c, CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY, "managed memory", err);
	if (r < 0)
		return r;
	/* Prefetch and advice to a GPU need concurrent managed access. */
	r = require_attr(c, CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS, "concurrent managed access", err);
	if (r < 0)
		return r;
	r = size_arena(g, cfg, UVM_PAGE, UVM_PAGE, err);
	if (r < 0)
		return r;
	rc = c->cu->cuMemAllocManaged(&c->va, c->va_len, CU_MEM_ATTACH_GLOBAL);
	if (rc != CUDA_SUCCESS) {
		c->va = 0;
		if (rc == CUDA_ERROR_OUT_OF_MEMORY)
			g->st.oom++;
		return cuerr(c, err, rc, "cuMemAllocManaged");
	}
	g->base = (uint64_t)c->va;
	loc.id = c->dev;
	rc = c->cu->cuMemAdvise(c->va, c->va_len, CU_MEM_ADVISE_SET_PREFERRED_LOCATION, loc);
	if (rc != CUDA_SUCCESS)
		return cuerr(c, err, rc, "cuMemAdvise(preferred location)");
	rc = c->cu->cuMemAdvise(c->va, c->va_len, CU_MEM_ADVISE_SET_ACCESSED_BY, loc);
	if (rc != CUDA_SUCCESS)
		return cuerr(c, err, rc, "cuMemAdvise(accessed by)");
	return slots_and_events(g, err);
}

static void release_chunk(struct tier_gpu *g, uint32_t s)
{
	struct cuda *c = g->priv;
	struct tier_gpu_slot *sl = &g->slots[s];

	culog(c, c->cu->cuMemUnmap(slot_va(g, s), g->stride), "cuMemUnmap");
	culog(c, c->cu->cuMemRelease((CUmemGenericAllocationHandle)sl->chunk), "cuMemRelease");
	sl->has_chunk = false;
	sl->chunk = 0;
	g->st.chunks_released++;
	g->generation++;
}

static CUdeviceptr res_va(const struct tier_gpu *g, uint32_t i)
{
	return (CUdeviceptr)(g->base + ((uint64_t)g->nslots + i) * g->stride);
}

static void release_resident(struct tier_gpu *g)
{
	struct cuda *c = g->priv;

	while (c->res_mapped) {
		uint32_t i = --c->res_mapped;

		culog(c, c->cu->cuMemUnmap(res_va(g, i), g->stride), "cuMemUnmap");
		culog(c, c->cu->cuMemRelease(c->res[i]), "cuMemRelease");
		c->res[i] = 0;
		g->st.chunks_released++;
	}
}

static void cuda_fini(struct tier_gpu *g)
{
	struct cuda *c = g->priv;

	if (!c)
		return;
	if (c->ctx_retained) {
		culog(c, c->cu->cuCtxSetCurrent(c->ctx), "cuCtxSetCurrent");
		/* Copies in flight read host memory and host callbacks touch
		 * g: both must be over before anything is freed. */
		if (c->h2d)
			culog(c, c->cu->cuStreamSynchronize(c->h2d), "cuStreamSynchronize");
		if (c->d2h)
			culog(c, c->cu->cuStreamSynchronize(c->d2h), "cuStreamSynchronize");
		for (uint32_t i = 0; g->slots && i < g->nslots; i++) {
			if (g->slots[i].event)
				culog(c, c->cu->cuEventDestroy(g->slots[i].event), "cuEventDestroy");
			g->slots[i].event = NULL;
			if (g->slots[i].has_chunk)
				release_chunk(g, i);
		}
		release_resident(g);
		if (c->va && !c->uvm)
			culog(c, c->cu->cuMemAddressFree(c->va, c->va_len), "cuMemAddressFree");
		if (c->va && c->uvm)
			culog(c, c->cu->cuMemFree(c->va), "cuMemFree");
		if (c->host_registered)
			culog(c, c->cu->cuMemHostUnregister(c->host_ptr), "cuMemHostUnregister");
		if (c->h2d)
			culog(c, c->cu->cuStreamDestroy(c->h2d), "cuStreamDestroy");
		if (c->d2h)
			culog(c, c->cu->cuStreamDestroy(c->d2h), "cuStreamDestroy");
		culog(c, c->cu->cuDevicePrimaryCtxRelease(c->dev), "cuDevicePrimaryCtxRelease");
	}
	free(c->res);
	free(c);
	g->priv = NULL;
}

static int cuda_register_host(struct tier_gpu *g, void *base, size_t len, struct moe_error *err)
{
	struct cuda *c = g->priv;
	CUresult rc;
	int r = enter(c, err);

	if (r < 0)
		return r;
	/* PORTABLE: the pinning holds for every context in the process. */
	rc = c->cu->cuMemHostRegister(base, len, CU_MEMHOSTREGISTER_PORTABLE);
	if (rc != CUDA_SUCCESS)
		return cuerr(c, err, rc, "cuMemHostRegister");
	c->host_registered = true;
	c->host_ptr = base;
	return 0;
}

static int cuda_unregister_host(struct tier_gpu *g)
{
	struct cuda *c = g->priv;
	struct moe_error err;
	CUresult rc;
	int r;

	if (!c->host_registered)
		return 0;
	r = enter(c, &err);
	if (r < 0) {
		moe_warn("gpu tier: host arena stays registered: %s", err.msg);
		return r;
	}
	/* Copies from the arena must be over before it is unpinned. */
	culog(c, c->cu->cuStreamSynchronize(c->h2d), "cuStreamSynchronize");
	culog(c, c->cu->cuStreamSynchronize(c->d2h), "cuStreamSynchronize");
	rc = c->cu->cuMemHostUnregister(c->host_ptr);
	if (rc != CUDA_SUCCESS) {
		culog(c, rc, "cuMemHostUnregister");
		return cu_api_errno(rc);
	}
	c->host_registered = false;
	c->host_ptr = NULL;
	return 0;
}

/* Records slot s's event after the copy just queued on stream, and the
 * host callback that wakes the event loop. */
static int track(struct tier_gpu *g, uint32_t s, CUstream stream, struct moe_error *err)
{
	struct cuda *c = g->priv;
	CUevent ev = g->slots[s].event;
	CUresult rc = c->cu->cuEventRecord(ev, stream);

	if (rc != CUDA_SUCCESS) {
		/* The copy is queued but cannot be tracked: let it finish
		 * before reporting, so nothing writes the slot later. */
		culog(c, c->cu->cuStreamSynchronize(stream), "cuStreamSynchronize");
		return cuerr(c, err, rc, "cuEventRecord");
	}
	rc = c->cu->cuLaunchHostFunc(stream, host_notify, g);
	if (rc != CUDA_SUCCESS) {
		/* Still correct, only slower: wait here and wake ourselves. */
		culog(c, rc, "cuLaunchHostFunc (waiting synchronously)");
		culog(c, c->cu->cuEventSynchronize(ev), "cuEventSynchronize");
		tier_gpu_notify(g);
	}
	return 0;
}

static int vmm_get_chunk(struct tier_gpu *g, uint32_t s, struct moe_error *err)
{
	struct cuda *c = g->priv;
	struct tier_gpu_slot *sl = &g->slots[s];
	CUmemAccessDesc access = {
		.location = { .type = CU_MEM_LOCATION_TYPE_DEVICE, .id = c->dev },
		.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
	};
	CUmemGenericAllocationHandle h;
	CUresult rc;

	if (sl->has_chunk)
		return 0;
	rc = c->cu->cuMemCreate(&h, g->stride, &c->prop, 0);
	if (rc != CUDA_SUCCESS)
		return cuerr(c, err, rc, "cuMemCreate");
	rc = c->cu->cuMemMap(slot_va(g, s), g->stride, 0, h, 0);
	if (rc != CUDA_SUCCESS) {
		culog(c, c->cu->cuMemRelease(h), "cuMemRelease");
		return cuerr(c, err, rc, "cuMemMap");
	}
	/* A fresh mapping has no access rights until this call. */
	rc = c->cu->cuMemSetAccess(slot_va(g, s), g->stride, &access, 1);
	if (rc != CUDA_SUCCESS) {
		culog(c, c->cu->cuMemUnmap(slot_va(g, s), g->stride), "cuMemUnmap");
		culog(c, c->cu->cuMemRelease(h), "cuMemRelease");
		return cuerr(c, err, rc, "cuMemSetAccess");
	}
	sl->chunk = (uint64_t)h;
	sl->has_chunk = true;
	g->st.chunks_created++;
	g->generation++;
	return 0;
}

/* Creates and maps every chunk of the resident region (vmm); on failure
 * the ones made are given back. */
static int vmm_map_resident(struct tier_gpu *g, struct moe_error *err)
{
	struct cuda *c = g->priv;
	CUmemAccessDesc access = {
		.location = { .type = CU_MEM_LOCATION_TYPE_DEVICE, .id = c->dev },
		.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
	};

	while (c->res_mapped < c->nres) {
		uint32_t i = c->res_mapped;
		CUmemGenericAllocationHandle h;
		CUresult rc = c->cu->cuMemCreate(&h, g->stride, &c->prop, 0);

		if (rc != CUDA_SUCCESS) {
			release_resident(g);
			return cuerr(c, err, rc, "cuMemCreate(resident)");
		}
		rc = c->cu->cuMemMap(res_va(g, i), g->stride, 0, h, 0);
		if (rc != CUDA_SUCCESS) {
			culog(c, c->cu->cuMemRelease(h), "cuMemRelease");
			release_resident(g);
			return cuerr(c, err, rc, "cuMemMap(resident)");
		}
		c->res[i] = h;
		c->res_mapped++;
		g->st.chunks_created++;
		rc = c->cu->cuMemSetAccess(res_va(g, i), g->stride, &access, 1);
		if (rc != CUDA_SUCCESS) {
			release_resident(g);
			return cuerr(c, err, rc, "cuMemSetAccess(resident)");
		}
	}
	g->generation++;
	return 0;
}

/* Resident data is written once, at model load: copy and wait. */
static int cuda_resident_write(struct tier_gpu *g, uint64_t off, const void *src, size_t bytes,
			       struct moe_error *err)
{
	struct cuda *c = g->priv;
	CUdeviceptr dst = (CUdeviceptr)(g->base + (uint64_t)g->nslots * g->stride + off);
	CUresult rc;
	int r = enter(c, err);

	if (r < 0)
		return r;
	if (c->uvm) {
		CUmemLocation loc = { .type = CU_MEM_LOCATION_TYPE_DEVICE, .id = c->dev };

		rc = c->cu->cuMemPrefetchAsync(res_va(g, 0), g->res_len, loc, 0, c->h2d);
		if (rc != CUDA_SUCCESS)
			return cuerr(c, err, rc, "cuMemPrefetchAsync(resident)");
	} else if (c->res_mapped < c->nres) {
		r = vmm_map_resident(g, err);
		if (r < 0)
			return r;
	}
	/* vmm: one copy per chunk, none across two separate allocations */
	for (size_t done = 0; done < bytes;) {
		size_t n = bytes - done;

		if (!c->uvm)
			n = MOE_MIN(n, (size_t)(g->stride - (off + done) % g->stride));
		rc = c->cu->cuMemcpyHtoDAsync(dst + done, (const uint8_t *)src + done, n, c->h2d);
		if (rc != CUDA_SUCCESS) {
			/* copies may be queued ahead: nothing runs on after return */
			culog(c, c->cu->cuStreamSynchronize(c->h2d), "cuStreamSynchronize");
			return cuerr(c, err, rc, "cuMemcpyHtoDAsync(resident)");
		}
		done += n;
	}
	rc = c->cu->cuStreamSynchronize(c->h2d);
	if (rc != CUDA_SUCCESS)
		return cuerr(c, err, rc, "cuStreamSynchronize(resident)");
	return 0;
}

static int cuda_copy_in(struct tier_gpu *g, uint32_t s, const void *src, size_t bytes,
			struct moe_error *err)
{
	struct cuda *c = g->priv;
	CUresult rc;
	int r = enter(c, err);

	if (r < 0)
		return r;
	if (c->uvm) {
		CUmemLocation loc = { .type = CU_MEM_LOCATION_TYPE_DEVICE, .id = c->dev };

		/* Pages to the device first, so the copy writes device
		 * memory instead of faulting it over page by page. */
		rc = c->cu->cuMemPrefetchAsync(slot_va(g, s), g->stride, loc, 0, c->h2d);
		if (rc != CUDA_SUCCESS)
			return cuerr(c, err, rc, "cuMemPrefetchAsync(device)");
	} else {
		r = vmm_get_chunk(g, s, err);
		if (r < 0)
			return r;
	}
	rc = c->cu->cuMemcpyHtoDAsync(slot_va(g, s), src, bytes, c->h2d);
	if (rc != CUDA_SUCCESS)
		return cuerr(c, err, rc, "cuMemcpyHtoDAsync");
	return track(g, s, c->h2d, err);
}

static int cuda_copy_out(struct tier_gpu *g, uint32_t s, void *dst, size_t bytes,
			 struct moe_error *err)
{
	struct cuda *c = g->priv;
	CUresult rc;
	int r = enter(c, err);

	if (r < 0)
		return r;
	rc = c->cu->cuMemcpyDtoHAsync(dst, slot_va(g, s), bytes, c->d2h);
	if (rc != CUDA_SUCCESS)
		return cuerr(c, err, rc, "cuMemcpyDtoHAsync");
	return track(g, s, c->d2h, err);
}

static int cuda_query(struct tier_gpu *g, uint32_t s)
{
	struct cuda *c = g->priv;
	CUresult rc;
	char buf[200];

	if (enter(c, NULL) < 0)
		return -EIO;
	rc = c->cu->cuEventQuery(g->slots[s].event);
	if (rc == CUDA_SUCCESS)
		return 1;
	if (rc == CUDA_ERROR_NOT_READY)
		return 0;
	moe_warn("gpu tier: copy on slot %u failed: %s", s, cu_api_strerror(c->cu, rc, buf, sizeof(buf)));
	return cu_api_errno(rc) ? cu_api_errno(rc) : -EIO;
}

static int cuda_evict(struct tier_gpu *g, uint32_t s, bool release)
{
	struct cuda *c = g->priv;
	CUresult rc;

	if (!release)
		return 0;
	if (enter(c, NULL) < 0)
		return -EIO;
	if (c->uvm) {
		CUmemLocation host = { .type = CU_MEM_LOCATION_TYPE_HOST, .id = 0 };

		/* On the h2d stream: a later fill of this slot is ordered
		 * after the move-out. */
		rc = c->cu->cuMemPrefetchAsync(slot_va(g, s), g->stride, host, 0, c->h2d);
		if (rc != CUDA_SUCCESS) {
			culog(c, rc, "cuMemPrefetchAsync(host)");
			return cu_api_errno(rc);
		}
		return 0;
	}
	if (g->slots[s].has_chunk)
		release_chunk(g, s);
	return 0;
}

static int vmm_export(struct tier_gpu *g, struct tier_gpu_export *out, struct moe_error *err)
{
	struct cuda *c = g->priv;
	int r = 0;

	if (!c->posix_fd)
		return moe_error_set(err, -EOPNOTSUPP, "device cannot export POSIX fds");
	r = enter(c, err);
	if (r < 0)
		return r;
	/* the slots' chunks, then the resident region's (same size) */
	const uint32_t total = g->nslots + c->nres;

	out->fds = malloc((size_t)total * sizeof(*out->fds));
	out->offsets = malloc((size_t)total * sizeof(*out->offsets));
	if (!out->fds || !out->offsets) {
		r = moe_error_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	out->nfds = total;
	out->chunk_bytes = g->stride;
	for (uint32_t i = 0; i < total; i++) {
		out->fds[i] = -1;
		out->offsets[i] = (uint64_t)i * g->stride;
	}
	for (uint32_t i = 0; i < c->res_mapped; i++) {
		int fd = -1;
		CUresult rc = c->cu->cuMemExportToShareableHandle(&fd, c->res[i],
								  CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);

		if (rc != CUDA_SUCCESS) {
			r = cuerr(c, err, rc, "cuMemExportToShareableHandle(resident)");
			goto fail;
		}
		out->fds[g->nslots + i] = fd;
	}
	for (uint32_t i = 0; i < g->nslots; i++) {
		int fd = -1;
		CUresult rc;

		if (!g->slots[i].has_chunk)
			continue;
		rc = c->cu->cuMemExportToShareableHandle(&fd, (CUmemGenericAllocationHandle)g->slots[i].chunk,
							 CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
		if (rc != CUDA_SUCCESS) {
			r = cuerr(c, err, rc, "cuMemExportToShareableHandle");
			goto fail;
		}
		out->fds[i] = fd;
	}
	return 0;
fail:
	tier_gpu_export_free(out);
	return r;
}

static int uvm_export(struct tier_gpu *g, struct tier_gpu_export *out, struct moe_error *err)
{
	(void)g; (void)out;
	return moe_error_set(err, -EOPNOTSUPP, "managed memory cannot be exported to other processes");
}

const struct tier_gpu_ops tier_gpu_vmm_ops = {
	.name = "vmm",
	.init = vmm_init,
	.fini = cuda_fini,
	.register_host = cuda_register_host,
	.unregister_host = cuda_unregister_host,
	.copy_in = cuda_copy_in,
	.copy_out = cuda_copy_out,
	.query = cuda_query,
	.evict = cuda_evict,
	.export_ = vmm_export,
	.resident_write = cuda_resident_write,
};

const struct tier_gpu_ops tier_gpu_uvm_ops = {
	.name = "uvm",
	.init = uvm_init,
	.fini = cuda_fini,
	.register_host = cuda_register_host,
	.unregister_host = cuda_unregister_host,
	.copy_in = cuda_copy_in,
	.copy_out = cuda_copy_out,
	.query = cuda_query,
	.evict = cuda_evict,
	.export_ = uvm_export,
	.resident_write = cuda_resident_write,
};
