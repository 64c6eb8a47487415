/* gpu.c - see gpu.h. */
#include "config.h"

#include "gpu.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifdef HAVE_CUDA

#include <cuda.h>
#include <cudaTypedefs.h>
#include <dlfcn.h>

#include "ffn_cuda.h"

/* The driver entry points moe-run uses, each at its CUDA 12.0 ABI (the
 * PFN_*_vNNNN type of that version). The daemon has its own table
 * (daemon/cuda_api.c), which a client may not include. */
struct gpu_cu {
	PFN_cuInit_v2000 Init;
	PFN_cuGetErrorString_v6000 GetErrorString;
	PFN_cuDeviceGet_v2000 DeviceGet;
	PFN_cuDeviceGetName_v2000 DeviceGetName;
	PFN_cuDevicePrimaryCtxRetain_v7000 DevicePrimaryCtxRetain;
	PFN_cuDevicePrimaryCtxRelease_v11000 DevicePrimaryCtxRelease;
	PFN_cuCtxSetCurrent_v4000 CtxSetCurrent;
	PFN_cuModuleLoadData_v2000 ModuleLoadData;
	PFN_cuModuleUnload_v2000 ModuleUnload;
	PFN_cuModuleGetFunction_v2000 ModuleGetFunction;
	PFN_cuMemAlloc_v3020 MemAlloc;
	PFN_cuMemFree_v3020 MemFree;
	PFN_cuMemAllocHost_v3020 MemAllocHost;
	PFN_cuMemFreeHost_v2000 MemFreeHost;
	PFN_cuMemcpyHtoDAsync_v3020 MemcpyHtoDAsync;
	PFN_cuMemcpyDtoHAsync_v3020 MemcpyDtoHAsync;
	PFN_cuMemsetD32Async_v3020 MemsetD32Async;
	PFN_cuLaunchKernel_v4000 LaunchKernel;
	PFN_cuStreamCreate_v2000 StreamCreate;
	PFN_cuStreamDestroy_v4000 StreamDestroy;
	PFN_cuStreamSynchronize_v2000 StreamSynchronize;
	PFN_cuEventCreate_v2000 EventCreate;
	PFN_cuEventDestroy_v4000 EventDestroy;
	PFN_cuEventRecord_v2000 EventRecord;
	PFN_cuEventElapsedTime_v2000 EventElapsedTime;
	PFN_cuMemAddressReserve_v10020 MemAddressReserve;
	PFN_cuMemAddressFree_v10020 MemAddressFree;
	PFN_cuMemImportFromShareableHandle_v10020 MemImportFromShareableHandle;
	PFN_cuMemMap_v10020 MemMap;
	PFN_cuMemUnmap_v10020 MemUnmap;
	PFN_cuMemSetAccess_v10020 MemSetAccess;
	PFN_cuMemRelease_v10020 MemRelease;
};

/* Device and pinned host buffers of one size class (grown together). */
struct gpu_bufs {
	uint32_t cap_B, cap_n, cap_m;
	CUdeviceptr dx, dy, dh, dtok, dw, dgslot, dgstart;
	float *hx, *hy, *hw;            /* pinned */
	uint32_t *htok, *hgslot, *hgstart; /* pinned */
};

struct gpu {
	struct gpu_cu cu;
	void *lib;
	moet_ctx *ctx;
	uint32_t n_slots, E, k;
	int device;
	char name[128];
	CUdevice dev;
	CUcontext cctx;
	bool ctx_retained;
	CUmodule mod;
	CUfunction f_up, f_down;
	CUstream stream;
	CUevent ev0, ev1;
	/* the imported arena */
	CUdeviceptr base;   /* reserve of stride * n_slots (0: not yet) */
	uint64_t stride, chunk_bytes, generation;
	uint8_t *mapped;    /* [n_slots] */
	struct gpu_bufs b;
	/* the batch */
	uint32_t B, n, m;
	uint32_t ng, np;            /* groups and pairs added */
	uint32_t lg, lp, lgs;       /* launched up to: groups, pairs, group_start entries used */
	uint32_t *gabs;             /* [E + 1] absolute pair start of each group */
	bool x_sent, refreshed;
	uint64_t batches;           /* batches begun */
	uint64_t refresh_after;     /* no export fetched before this batch (after a failed one) */
	struct gpu_stats st;
};

static const char *cu_str(const struct gpu *g, CUresult rc)
{
	const char *s = NULL;
	if (!g->cu.GetErrorString || g->cu.GetErrorString(rc, &s) != CUDA_SUCCESS || !s)
		s = "unknown CUDA error";
	return s;
}

static int cu_fail(const struct gpu *g, struct moe_error *err, CUresult rc, const char *what)
{
	int e = rc == CUDA_ERROR_OUT_OF_MEMORY ? -ENOMEM
		: rc == CUDA_ERROR_NOT_SUPPORTED ? -EOPNOTSUPP
		: rc == CUDA_ERROR_NO_DEVICE || rc == CUDA_ERROR_INVALID_DEVICE ? -ENODEV
										 : -EIO;
	return moe_error_set(err, e, "%s: %s (CUresult %d)", what, cu_str(g, rc), (int)rc);
}

#define CK(call, what) \
	do { \
		CUresult rc_ = (call); \
		if (rc_ != CUDA_SUCCESS) \
			return cu_fail(g, err, rc_, what); \
	} while (0)

static int load_driver(struct gpu *g, struct moe_error *err)
{
	/* MOETIER_LIBCUDA as for moetierd (daemon/cuda_api.c): another
	 * driver copy, or the tests' fake one (tests/fake_libcuda.c) */
	const char *path = getenv("MOETIER_LIBCUDA");
	if (!path || !*path)
		path = "libcuda.so.1";
	g->lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (!g->lib)
		return moe_error_set(err, -ENODEV, "no CUDA driver (%s)", dlerror());
	void *sym = dlsym(g->lib, "cuGetProcAddress_v2");
	PFN_cuGetProcAddress_v12000 gpa;
	if (!sym)
		return moe_error_set(err, -ENODEV, "the CUDA driver is older than CUDA 12 (no cuGetProcAddress_v2)");
	memcpy(&gpa, &sym, sizeof(sym));
	static const struct {
		const char *name;
		size_t off;
	} syms[] = {
#define S(n) { "cu" #n, offsetof(struct gpu_cu, n) }
		S(Init), S(GetErrorString), S(DeviceGet), S(DeviceGetName), S(DevicePrimaryCtxRetain),
		S(DevicePrimaryCtxRelease), S(CtxSetCurrent), S(ModuleLoadData), S(ModuleUnload),
		S(ModuleGetFunction), S(MemAlloc), S(MemFree), S(MemAllocHost), S(MemFreeHost), S(MemcpyHtoDAsync),
		S(MemcpyDtoHAsync), S(MemsetD32Async), S(LaunchKernel), S(StreamCreate), S(StreamDestroy),
		S(StreamSynchronize), S(EventCreate), S(EventDestroy), S(EventRecord), S(EventElapsedTime),
		S(MemAddressReserve), S(MemAddressFree), S(MemImportFromShareableHandle), S(MemMap), S(MemUnmap),
		S(MemSetAccess), S(MemRelease),
#undef S
	};
	for (size_t i = 0; i < sizeof(syms) / sizeof(syms[0]); i++) {
		void *fn = NULL;
		CUdriverProcAddressQueryResult q;
		/* 12000: each function's ABI as of CUDA 12.0, matching the
		 * PFN types of struct gpu_cu */
		CUresult rc = gpa(syms[i].name, &fn, 12000, CU_GET_PROC_ADDRESS_DEFAULT, &q);
		if (rc != CUDA_SUCCESS || q != CU_GET_PROC_ADDRESS_SUCCESS || !fn)
			return moe_error_set(err, -ENODEV, "the CUDA driver has no %s (result %d)", syms[i].name, (int)rc);
		memcpy((char *)&g->cu + syms[i].off, &fn, sizeof(fn));
	}
	CUresult rc = g->cu.Init(0);
	/* 34 stub library, 35 driver older than the toolkit, 100 no device,
	 * 803 system driver mismatch, 999 unknown: no usable GPU */
	if (rc != CUDA_SUCCESS)
		return moe_error_set(err, -ENODEV, "no usable GPU: cuInit = %d (%s)", (int)rc, cu_str(g, rc));
	return 0;
}

static void unmap_all(struct gpu *g)
{
	for (uint32_t s = 0; g->base && s < g->n_slots; s++)
		if (g->mapped[s]) {
			g->cu.MemUnmap(g->base + (CUdeviceptr)s * g->stride, g->chunk_bytes);
			g->mapped[s] = 0;
			g->st.mapped--;
		}
}

/* Imports one exported chunk and maps it at slot s, read-only. */
static int map_chunk(struct gpu *g, uint32_t s, int fd, struct moe_error *err)
{
	CUmemGenericAllocationHandle h;
	const CUdeviceptr va = g->base + (CUdeviceptr)s * g->stride;
	CK(g->cu.MemImportFromShareableHandle(&h, (void *)(uintptr_t)fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
	   "cuMemImportFromShareableHandle");
	CUresult rc = g->cu.MemMap(va, g->chunk_bytes, 0, h, 0);
	/* the mapping keeps the allocation alive: the handle can go now */
	g->cu.MemRelease(h);
	if (rc != CUDA_SUCCESS)
		return cu_fail(g, err, rc, "cuMemMap");
	CUmemAccessDesc acc = { .location = { .type = CU_MEM_LOCATION_TYPE_DEVICE, .id = g->dev },
				.flags = CU_MEM_ACCESS_FLAGS_PROT_READ };
	/* read-only: moe-run never writes the daemon's arena; a device that
	 * refuses read-only device access gets read-write */
	if ((rc = g->cu.MemSetAccess(va, g->chunk_bytes, &acc, 1)) != CUDA_SUCCESS) {
		acc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
		rc = g->cu.MemSetAccess(va, g->chunk_bytes, &acc, 1);
	}
	if (rc != CUDA_SUCCESS) {
		g->cu.MemUnmap(va, g->chunk_bytes);
		return cu_fail(g, err, rc, "cuMemSetAccess");
	}
	g->mapped[s] = 1;
	g->st.mapped++;
	return 0;
}

/* The whole export: its handles' fds and offsets (the caller closes the fds
 * and frees the arrays). Chunks are exported only once the daemon created
 * them, at a slot's first fill. */
struct gpu_export {
	struct moet_gpu_export x;
	int *fds;
	uint64_t *offs;
	uint32_t got;
};

static void export_free(struct gpu_export *e)
{
	for (uint32_t i = 0; i < e->got; i++)
		if (e->fds[i] >= 0)
			close(e->fds[i]);
	free(e->fds);
	free(e->offs);
	memset(e, 0, sizeof(*e));
}

static int fetch_export(struct gpu *g, struct gpu_export *e, struct moe_error *err)
{
	int fds[MOET_GPU_EXPORT_BATCH];
	uint64_t offs[MOET_GPU_EXPORT_BATCH];
	uint32_t cap = 0;
	int rc = 0;
	memset(e, 0, sizeof(*e));
	g->st.exports++;
	for (;;) {
		int n = moet_gpu_export(g->ctx, e->got, &e->x, fds, offs, MOET_GPU_EXPORT_BATCH);
		if (n < 0) {
			rc = moe_error_set(err, n, "moetierd: GPU arena export: %s %s", moet_strerror(n),
					   moet_last_error(g->ctx));
			goto fail;
		}
		if (e->got + (uint32_t)n > cap) {
			/* sized by the export's own count of handles */
			uint32_t nc = MOE_MAX(e->x.total, e->got + (uint32_t)n);
			int *f2 = realloc(e->fds, (size_t)nc * sizeof(int));
			if (f2)
				e->fds = f2;
			uint64_t *o2 = realloc(e->offs, (size_t)nc * sizeof(uint64_t));
			if (o2)
				e->offs = o2;
			if (!f2 || !o2) {
				for (int i = 0; i < n; i++)
					close(fds[i]);
				rc = moe_error_set(err, -ENOMEM, "out of memory");
				goto fail;
			}
			cap = nc;
		}
		if (n > 0) { /* an export with no chunk yet: nothing to keep (and e->fds may be NULL) */
			memcpy(e->fds + e->got, fds, (size_t)n * sizeof(int));
			memcpy(e->offs + e->got, offs, (size_t)n * sizeof(uint64_t));
			e->got += (uint32_t)n;
		}
		if (e->x.backend != MOET_GPU_VMM) {
			const uint32_t b = e->x.backend;
			rc = moe_error_set(err, -EOPNOTSUPP,
					   "moetierd's GPU arena is %s: only a CUDA VMM arena (moetierd --gpu-backend=vmm) "
					   "can be mapped by a client",
					   b == MOET_GPU_UVM ? "managed memory (uvm)" : b == MOET_GPU_EMULATED ? "emulated" : "absent");
			goto fail;
		}
		if (!n || e->got >= e->x.total)
			break;
	}
	if (!e->x.slot_stride || e->x.chunk_bytes != e->x.slot_stride) {
		rc = moe_error_set(err, -EPROTO, "moetierd: GPU export with slot stride %llu and chunks of %llu bytes",
				   (unsigned long long)e->x.slot_stride, (unsigned long long)e->x.chunk_bytes);
		goto fail;
	}
	return 0;
fail:
	export_free(e);
	return rc;
}

/* Maps the exported chunks not mapped yet (the range reserved at the first
 * call). The daemon keeps a chunk once created ("map once, then
 * indices"); the generation moves by one per chunk created or released, so
 * a move larger than the chunks new here means one was released and
 * created again, and every mapping is redone (an old mapping would still
 * show the released memory). */
static int map_export(struct gpu *g, const struct gpu_export *e, struct moe_error *err)
{
	int rc = 0;
	CK(g->cu.CtxSetCurrent(g->cctx), "cuCtxSetCurrent");
	if (!g->base) {
		g->stride = e->x.slot_stride;
		g->chunk_bytes = e->x.chunk_bytes;
		CK(g->cu.MemAddressReserve(&g->base, (size_t)g->stride * g->n_slots, 0, 0, 0), "cuMemAddressReserve");
	} else if (e->x.slot_stride != g->stride) {
		return moe_error_set(err, -EPROTO, "moetierd: the GPU arena's slot stride changed");
	}
	uint32_t fresh = 0;
	for (uint32_t i = 0; i < e->got; i++) {
		const uint64_t s = e->offs[i] / g->stride;
		if (e->fds[i] >= 0 && e->offs[i] % g->stride == 0 && s < g->n_slots && !g->mapped[s])
			fresh++;
	}
	if (g->generation && e->x.generation - g->generation > fresh)
		unmap_all(g);
	for (uint32_t i = 0; i < e->got && !rc; i++) {
		const uint64_t s = e->offs[i] / g->stride;
		if (e->fds[i] < 0 || e->offs[i] % g->stride || s >= g->n_slots || g->mapped[s])
			continue;
		rc = map_chunk(g, (uint32_t)s, e->fds[i], err);
	}
	g->generation = e->x.generation;
	return rc;
}

static int refresh(struct gpu *g, struct moe_error *err)
{
	struct gpu_export e;
	int rc = fetch_export(g, &e, err);
	if (rc)
		return rc;
	rc = map_export(g, &e, err);
	export_free(&e);
	return rc;
}

static void free_bufs(struct gpu *g)
{
	struct gpu_bufs *b = &g->b;
	CUdeviceptr d[] = { b->dx, b->dy, b->dh, b->dtok, b->dw, b->dgslot, b->dgstart };
	void *h[] = { b->hx, b->hy, b->hw, b->htok, b->hgslot, b->hgstart };
	for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++)
		if (d[i])
			g->cu.MemFree(d[i]);
	for (size_t i = 0; i < sizeof(h) / sizeof(h[0]); i++)
		if (h[i])
			g->cu.MemFreeHost(h[i]);
	memset(b, 0, sizeof(*b));
}

static int grow(struct gpu *g, uint32_t B, uint32_t n, uint32_t m, struct moe_error *err)
{
	struct gpu_bufs *b = &g->b;
	if (B <= b->cap_B && n <= b->cap_n && m <= b->cap_m)
		return 0;
	B = MOE_MAX(B, b->cap_B);
	n = MOE_MAX(n, b->cap_n);
	m = MOE_MAX(m, b->cap_m);
	free_bufs(g);
	const size_t P = (size_t)B * g->k, G = g->E, GS = 2 * (size_t)g->E + 1;
	CK(g->cu.MemAlloc(&b->dx, (size_t)B * n * 4), "cuMemAlloc(x)");
	CK(g->cu.MemAlloc(&b->dy, (size_t)B * n * 4), "cuMemAlloc(y)");
	CK(g->cu.MemAlloc(&b->dh, P * m * 4), "cuMemAlloc(h)");
	CK(g->cu.MemAlloc(&b->dtok, P * 4), "cuMemAlloc");
	CK(g->cu.MemAlloc(&b->dw, P * 4), "cuMemAlloc");
	CK(g->cu.MemAlloc(&b->dgslot, G * 4), "cuMemAlloc");
	CK(g->cu.MemAlloc(&b->dgstart, GS * 4), "cuMemAlloc");
	CK(g->cu.MemAllocHost((void **)&b->hx, (size_t)B * n * 4), "cuMemAllocHost");
	CK(g->cu.MemAllocHost((void **)&b->hy, (size_t)B * n * 4), "cuMemAllocHost");
	CK(g->cu.MemAllocHost((void **)&b->hw, P * 4), "cuMemAllocHost");
	CK(g->cu.MemAllocHost((void **)&b->htok, P * 4), "cuMemAllocHost");
	CK(g->cu.MemAllocHost((void **)&b->hgslot, G * 4), "cuMemAllocHost");
	CK(g->cu.MemAllocHost((void **)&b->hgstart, GS * 4), "cuMemAllocHost");
	b->cap_B = B;
	b->cap_n = n;
	b->cap_m = m;
	return 0;
}

int gpu_open(moet_ctx *ctx, uint32_t n_slots, uint32_t E, uint32_t k, struct gpu **out, struct moe_error *err)
{
	size_t fb_len = 0;
	const void *fb = ffn_cuda_fatbin(&fb_len);
	int rc;
	*out = NULL;
	if (!fb)
		return moe_error_set(err, -ENOTSUP, "moe-run was built without nvcc: no GPU kernels");
	if (!n_slots)
		return moe_error_set(err, -ENODEV, "moetierd has no GPU tier (--gpu-bytes)");
	struct gpu_export e = { 0 };
	struct gpu *g = calloc(1, sizeof(*g));
	if (!g)
		return moe_error_set(err, -ENOMEM, "out of memory");
	g->ctx = ctx;
	g->n_slots = n_slots;
	g->E = E;
	g->k = k;
	if (!(g->mapped = calloc(n_slots, 1)) || !(g->gabs = calloc((size_t)E + 1, sizeof(uint32_t)))) {
		gpu_close(g);
		return moe_error_set(err, -ENOMEM, "out of memory");
	}
	/* the export first: it says which backend and device (and a uvm or
	 * emulated arena needs no driver to be refused) */
	if ((rc = fetch_export(g, &e, err)))
		goto fail;
	if ((rc = load_driver(g, err)))
		goto fail;
	/* the device the daemon's arena lives on: its ordinal, as the daemon
	 * numbers devices (the same CUDA_VISIBLE_DEVICES on both sides) */
	g->device = e.x.device;
	CUresult r;
#define CKF(call, what) \
	if ((r = (call)) != CUDA_SUCCESS) { \
		rc = cu_fail(g, err, r, what); \
		goto fail; \
	}
	CKF(g->cu.DeviceGet(&g->dev, g->device), "cuDeviceGet");
	if (g->cu.DeviceGetName(g->name, (int)sizeof(g->name) - 16, g->dev) != CUDA_SUCCESS)
		snprintf(g->name, sizeof(g->name) - 16, "CUDA device");
	snprintf(g->name + strlen(g->name), 16, " (device %d)", g->device);
	CKF(g->cu.DevicePrimaryCtxRetain(&g->cctx, g->dev), "cuDevicePrimaryCtxRetain");
	g->ctx_retained = true;
	CKF(g->cu.CtxSetCurrent(g->cctx), "cuCtxSetCurrent");
	CKF(g->cu.ModuleLoadData(&g->mod, fb), "cuModuleLoadData(ffn fatbin)");
	CKF(g->cu.ModuleGetFunction(&g->f_up, g->mod, "moe_ffn_gate_up"), "cuModuleGetFunction(moe_ffn_gate_up)");
	CKF(g->cu.ModuleGetFunction(&g->f_down, g->mod, "moe_ffn_down"), "cuModuleGetFunction(moe_ffn_down)");
	CKF(g->cu.StreamCreate(&g->stream, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
	CKF(g->cu.EventCreate(&g->ev0, CU_EVENT_DEFAULT), "cuEventCreate");
	CKF(g->cu.EventCreate(&g->ev1, CU_EVENT_DEFAULT), "cuEventCreate");
#undef CKF
	if ((rc = map_export(g, &e, err)))
		goto fail;
	export_free(&e);
	*out = g;
	return 0;
fail:
	export_free(&e);
	gpu_close(g);
	return rc;
}

void gpu_close(struct gpu *g)
{
	if (!g)
		return;
	if (g->cctx) {
		g->cu.CtxSetCurrent(g->cctx);
		if (g->stream)
			g->cu.StreamSynchronize(g->stream);
		free_bufs(g);
		unmap_all(g);
		if (g->base)
			g->cu.MemAddressFree(g->base, (size_t)g->stride * g->n_slots);
		if (g->ev0)
			g->cu.EventDestroy(g->ev0);
		if (g->ev1)
			g->cu.EventDestroy(g->ev1);
		if (g->stream)
			g->cu.StreamDestroy(g->stream);
		if (g->mod)
			g->cu.ModuleUnload(g->mod);
		if (g->ctx_retained)
			g->cu.DevicePrimaryCtxRelease(g->dev);
	}
	/* libcuda stays loaded: unloading a driver is not worth its risks */
	free(g->mapped);
	free(g->gabs);
	free(g);
}

int gpu_batch_begin(struct gpu *g, uint32_t B, uint32_t n, uint32_t m, struct moe_error *err)
{
	int rc;
	if ((rc = grow(g, B, n, m, err)))
		return rc;
	g->B = B;
	g->n = n;
	g->m = m;
	g->ng = g->np = g->lg = g->lp = g->lgs = 0;
	g->x_sent = g->refreshed = false;
	g->batches++;
	return 0;
}

bool gpu_slot_ready(struct gpu *g, int32_t slot)
{
	if (slot < 0 || (uint32_t)slot >= g->n_slots)
		return false;
	if (!g->mapped[slot] && !g->refreshed && g->batches >= g->refresh_after) {
		struct moe_error e = { { 0 } };
		g->refreshed = true;
		if (refresh(g, &e)) {
			/* said once; the slots not mapped are read from the pack
			 * meanwhile, and the next try waits 256 layer calls (a
			 * daemon that does not answer costs its timeout each time) */
			if (!g->refresh_after)
				moe_warn("moe-run: GPU arena export (experts of unmapped slots read from the pack): %s", e.msg);
			g->refresh_after = g->batches + 256;
		}
	}
	return g->mapped[slot] != 0;
}

int gpu_batch_add(struct gpu *g, int32_t slot, uint32_t cnt, const uint32_t *tok, const float *w)
{
	if (g->ng >= g->E || (size_t)g->np + cnt > (size_t)g->B * g->k || slot < 0)
		return -ENOSPC;
	g->b.hgslot[g->ng] = (uint32_t)slot;
	g->gabs[g->ng++] = g->np;
	memcpy(g->b.htok + g->np, tok, cnt * sizeof(uint32_t));
	memcpy(g->b.hw + g->np, w, cnt * sizeof(float));
	g->np += cnt;
	g->st.experts++;
	g->st.pairs += cnt;
	return 0;
}

static struct ffn_cuda_mat cmat(const struct ffn_mat *M)
{
	return (struct ffn_cuda_mat){ M->dtype, M->rows, M->cols, 0, M->offset, M->row_bytes };
}

int gpu_batch_launch(struct gpu *g, const struct ffn_layout *L, const float *x, struct moe_error *err)
{
	struct gpu_bufs *b = &g->b;
	const uint32_t ngs = g->ng - g->lg, nps = g->np - g->lp;
	if (!ngs)
		return 0;
	CK(g->cu.CtxSetCurrent(g->cctx), "cuCtxSetCurrent");
	if (!g->x_sent) {
		CK(g->cu.EventRecord(g->ev0, g->stream), "cuEventRecord");
		memcpy(b->hx, x, (size_t)g->B * g->n * sizeof(float));
		CK(g->cu.MemcpyHtoDAsync(b->dx, b->hx, (size_t)g->B * g->n * 4, g->stream), "cuMemcpyHtoDAsync(x)");
		CK(g->cu.MemsetD32Async(b->dy, 0, (size_t)g->B * g->n, g->stream), "cuMemsetD32Async(y)");
		g->x_sent = true;
	}
	/* this launch's groups: their pair starts relative to its first pair,
	 * in a part of the pinned arrays no earlier launch still reads */
	uint32_t *gs = b->hgstart + g->lgs, maxp = 0;
	for (uint32_t i = 0; i < ngs; i++) {
		const uint32_t end = i + 1 < ngs ? g->gabs[g->lg + i + 1] : g->np;
		gs[i] = g->gabs[g->lg + i] - g->lp;
		maxp = MOE_MAX(maxp, end - g->gabs[g->lg + i]);
	}
	gs[ngs] = nps;
	const CUdeviceptr d_gslot = b->dgslot + (CUdeviceptr)g->lg * 4, d_gstart = b->dgstart + (CUdeviceptr)g->lgs * 4,
			  d_tok = b->dtok + (CUdeviceptr)g->lp * 4, d_w = b->dw + (CUdeviceptr)g->lp * 4;
	CK(g->cu.MemcpyHtoDAsync(d_gslot, b->hgslot + g->lg, (size_t)ngs * 4, g->stream), "cuMemcpyHtoDAsync");
	CK(g->cu.MemcpyHtoDAsync(d_gstart, gs, (size_t)(ngs + 1) * 4, g->stream), "cuMemcpyHtoDAsync");
	CK(g->cu.MemcpyHtoDAsync(d_tok, b->htok + g->lp, (size_t)nps * 4, g->stream), "cuMemcpyHtoDAsync");
	CK(g->cu.MemcpyHtoDAsync(d_w, b->hw + g->lp, (size_t)nps * 4, g->stream), "cuMemcpyHtoDAsync");

	struct ffn_cuda_args a;
	memset(&a, 0, sizeof(a));
	a.arena = g->base;
	a.slot_stride = g->stride;
	a.kind = L->kind;
	a.n = g->n;
	a.m = g->m;
	a.limit = L->limit;
	a.alpha = L->alpha;
	a.gu_bias_dtype = L->gate_up_bias.dtype;
	a.gu_bias_offset = L->gate_up_bias.offset;
	a.down_bias_dtype = L->down_bias.dtype;
	a.down_bias_offset = L->down_bias.offset;
	a.gate = cmat(&L->gate);
	a.up = cmat(&L->up);
	a.gate_up = cmat(&L->gate_up);
	a.down = cmat(&L->down);
	a.n_groups = ngs;
	a.max_group_pairs = maxp;
	a.n_tokens = g->B;
	a.group_slot = d_gslot;
	a.group_start = d_gstart;
	a.pair_token = d_tok;
	a.pair_weight = d_w;
	a.x = b->dx;
	a.h = b->dh + (CUdeviceptr)g->lp * g->m * 4;
	a.y = b->dy;
	void *params[] = { &a };
	const unsigned gz = (maxp + FFN_CUDA_TILE_PAIRS - 1) / FFN_CUDA_TILE_PAIRS;
	CK(g->cu.LaunchKernel(g->f_up, (g->m + FFN_CUDA_TILE_ROWS - 1) / FFN_CUDA_TILE_ROWS, ngs, gz, FFN_CUDA_THREADS,
			      1, 1, 0, g->stream, params, NULL),
	   "cuLaunchKernel(moe_ffn_gate_up)");
	CK(g->cu.LaunchKernel(g->f_down, (g->n + FFN_CUDA_TILE_ROWS - 1) / FFN_CUDA_TILE_ROWS, ngs, gz,
			      FFN_CUDA_THREADS, 1, 1, 0, g->stream, params, NULL),
	   "cuLaunchKernel(moe_ffn_down)");
	g->lg = g->ng;
	g->lp = g->np;
	g->lgs += ngs + 1;
	g->st.launches++;
	return 0;
}

int gpu_batch_wait(struct gpu *g, const float **y, struct moe_error *err)
{
	*y = NULL;
	if (!g->x_sent)
		return 0;
	const uint64_t t0 = moe_now_ns();
	CK(g->cu.CtxSetCurrent(g->cctx), "cuCtxSetCurrent");
	CK(g->cu.MemcpyDtoHAsync(g->b.hy, g->b.dy, (size_t)g->B * g->n * 4, g->stream), "cuMemcpyDtoHAsync(y)");
	CK(g->cu.EventRecord(g->ev1, g->stream), "cuEventRecord");
	CK(g->cu.StreamSynchronize(g->stream), "cuStreamSynchronize");
	float ms = 0.0f;
	if (g->cu.EventElapsedTime(&ms, g->ev0, g->ev1) == CUDA_SUCCESS)
		g->st.device_ns += (uint64_t)((double)ms * 1e6);
	g->st.wait_ns += moe_now_ns() - t0;
	g->x_sent = false;
	*y = g->b.hy;
	return 0;
}

void gpu_get_stats(const struct gpu *g, struct gpu_stats *out)
{
	*out = g->st;
}

const char *gpu_name(const struct gpu *g)
{
	return g->name;
}

#else /* !HAVE_CUDA */

/* A build without cuda.h: no device path; --gpu=on says why. */
int gpu_open(moet_ctx *ctx, uint32_t n_slots, uint32_t E, uint32_t k, struct gpu **out, struct moe_error *err)
{
	(void)ctx, (void)n_slots, (void)E, (void)k;
	*out = NULL;
	return moe_error_set(err, -ENOTSUP, "moe-run was built without CUDA (no cuda.h at configure time)");
}

void gpu_close(struct gpu *g)
{
	(void)g;
}

int gpu_batch_begin(struct gpu *g, uint32_t B, uint32_t n, uint32_t m, struct moe_error *err)
{
	(void)g, (void)B, (void)n, (void)m;
	return moe_error_set(err, -ENOTSUP, "built without CUDA");
}

bool gpu_slot_ready(struct gpu *g, int32_t slot)
{
	(void)g, (void)slot;
	return false;
}

int gpu_batch_add(struct gpu *g, int32_t slot, uint32_t cnt, const uint32_t *tok, const float *w)
{
	(void)g, (void)slot, (void)cnt, (void)tok, (void)w;
	return -ENOTSUP;
}

int gpu_batch_launch(struct gpu *g, const struct ffn_layout *L, const float *x, struct moe_error *err)
{
	(void)g, (void)L, (void)x;
	return moe_error_set(err, -ENOTSUP, "built without CUDA");
}

int gpu_batch_wait(struct gpu *g, const float **y, struct moe_error *err)
{
	(void)g, (void)err;
	*y = NULL;
	return 0;
}

void gpu_get_stats(const struct gpu *g, struct gpu_stats *out)
{
	(void)g;
	memset(out, 0, sizeof(*out));
}

const char *gpu_name(const struct gpu *g)
{
	(void)g;
	return "none";
}

#endif
