/* Description: the GPU arena. The emulated backend end to end (copies,
 * state machine, completion through poll/reap/event fd, capacity, eviction,
 * read-only memfd export); the VMM and UVM backends' logic through a fake
 * CUDA driver table (slot map/unmap bookkeeping, granularity rounding, OOM
 * on cuMemCreate, stream/event completion, fd export, cleanup after a
 * failure at every driver call); the driver loader against a missing
 * library and the toolkit's stub; and, when a GPU is present, the real
 * CUDA backends (skipped otherwise). */
#include <config.h>

#include <criterion/criterion.h>
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cuda_api.h"
#include "tier_gpu.h"
#include "util.h"

/* ---- helpers ---- */

static void fill(uint8_t *p, size_t n, uint32_t seed)
{
	for (size_t i = 0; i < n; i++) {
		seed = seed * 1103515245u + 12345u;
		p[i] = (uint8_t)(seed >> 16);
	}
}

static int efd_readable(struct tier_gpu *g, int ms)
{
	struct pollfd p = { .fd = tier_gpu_event_fd(g), .events = POLLIN };

	return poll(&p, 1, ms);
}

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	int n = 0;

	cr_assert_not_null(d);
	while (readdir(d))
		n++;
	closedir(d);
	return n;
}

static struct tier_gpu *mk(const char *backend, uint64_t cap, uint64_t slot, const struct cu_api *cu)
{
	struct tier_gpu_config cfg = { .backend = backend, .capacity = cap, .slot_bytes = slot, .cu = cu };
	struct moe_error err = { { 0 } };
	struct tier_gpu *g = NULL;
	int r = tier_gpu_create(&cfg, &g, &err);

	cr_assert_eq(r, 0, "create %s: %d %s", backend, r, err.msg);
	return g;
}

/* ---- emulated backend, end to end ---- */

Test(emulated, geometry_and_capacity, .timeout = 20)
{
	long page = sysconf(_SC_PAGESIZE);
	uint64_t slot = 100000, cap = 1000000;
	uint64_t stride = (slot + (uint64_t)page - 1) / (uint64_t)page * (uint64_t)page;
	struct tier_gpu *g = mk("emulated", cap, slot, NULL);
	uint8_t buf[16] = { 1 };
	uint64_t tok;

	cr_assert_eq(tier_gpu_backend_of(g), TIER_GPU_EMULATED);
	cr_assert_eq(tier_gpu_slot_stride(g), stride);
	cr_assert_eq(tier_gpu_nslots(g), cap / stride);
	cr_assert_eq(tier_gpu_slot_bytes(g), slot);
	for (uint32_t i = 1; i < tier_gpu_nslots(g); i++)
		cr_assert_eq(tier_gpu_slot_addr(g, i) - tier_gpu_slot_addr(g, i - 1), stride);
	cr_assert_eq(tier_gpu_slot_addr(g, tier_gpu_nslots(g)), 0);
	/* Past the capacity there is no slot. */
	cr_assert_eq(tier_gpu_copy_in(g, tier_gpu_nslots(g), buf, sizeof(buf), &tok, NULL), -EINVAL);
	tier_gpu_destroy(g);
}

Test(emulated, roundtrip_and_states, .timeout = 20)
{
	const size_t slot = 3 * 65536 + 123;
	struct tier_gpu *g = mk("emulated", 8 * slot + 65536, slot, NULL);
	uint8_t *src = malloc(slot), *dst = malloc(slot);
	struct tier_gpu_stats st;
	struct moe_error err;
	uint64_t t1, t2, t3;

	fill(src, slot, 7);
	cr_assert_eq(tier_gpu_slot_state(g, 2), TIER_GPU_SLOT_EMPTY);
	cr_assert_eq(tier_gpu_copy_in(g, 2, src, slot, &t1, &err), 0, "%s", err.msg);
	cr_assert_eq(tier_gpu_slot_state(g, 2), TIER_GPU_SLOT_LOADING);
	/* Until observed, the slot stays LOADING whatever the worker did. */
	cr_assert_eq(tier_gpu_copy_in(g, 2, src, slot, &t2, &err), -EBUSY);
	cr_assert_eq(tier_gpu_evict(g, 2, false), -EBUSY);
	cr_assert_eq(tier_gpu_wait(g, t1, 5000), 1);
	cr_assert_eq(tier_gpu_slot_state(g, 2), TIER_GPU_SLOT_RESIDENT);
	cr_assert_eq(tier_gpu_poll(g, t1), 1, "a finished token keeps answering 1");
	cr_assert_eq(memcmp((void *)(uintptr_t)tier_gpu_slot_addr(g, 2), src, slot), 0);

	/* Resident: no second fill, copy-out works and leaves it resident. */
	cr_assert_eq(tier_gpu_copy_in(g, 2, src, slot, &t2, NULL), -EBUSY);
	cr_assert_eq(tier_gpu_copy_out(g, 2, dst, slot + 1, &t2, NULL), -EINVAL);
	cr_assert_eq(tier_gpu_copy_out(g, 2, dst, slot, &t2, &err), 0, "%s", err.msg);
	cr_assert_eq(tier_gpu_poll(g, t1), -ESTALE, "superseded token");
	cr_assert_eq(tier_gpu_wait(g, t2, 5000), 1);
	cr_assert_eq(tier_gpu_slot_state(g, 2), TIER_GPU_SLOT_RESIDENT);
	cr_assert_eq(memcmp(src, dst, slot), 0);

	/* Bad requests. */
	cr_assert_eq(tier_gpu_copy_in(g, 1, src, slot + 1, &t3, NULL), -EINVAL);
	cr_assert_eq(tier_gpu_copy_in(g, 1, NULL, 10, &t3, NULL), -EINVAL);
	cr_assert_eq(tier_gpu_copy_in(g, 1, src, 0, &t3, NULL), -EINVAL);
	cr_assert_eq(tier_gpu_copy_out(g, 1, dst, 10, &t3, NULL), -EBUSY, "empty slot");
	cr_assert_eq(tier_gpu_poll(g, 0), -ESTALE);
	cr_assert_eq(tier_gpu_poll(g, ((uint64_t)5 << 32) | 2), -ESTALE);
	cr_assert_eq(tier_gpu_evict(g, 1, false), -ENOENT);
	cr_assert_eq(tier_gpu_evict(g, 99999, false), -EINVAL);

	/* Evict: EMPTY, old token is stale, slot refills. */
	cr_assert_eq(tier_gpu_evict(g, 2, false), 0);
	cr_assert_eq(tier_gpu_slot_state(g, 2), TIER_GPU_SLOT_EMPTY);
	cr_assert_eq(tier_gpu_poll(g, t2), -ESTALE);
	fill(src, slot, 8);
	cr_assert_eq(tier_gpu_copy_in(g, 2, src, 1000, &t3, NULL), 0);
	cr_assert_neq(t3, t1);
	cr_assert_eq(tier_gpu_wait(g, t3, 5000), 1);
	cr_assert_eq(memcmp((void *)(uintptr_t)tier_gpu_slot_addr(g, 2), src, 1000), 0);

	tier_gpu_get_stats(g, &st);
	cr_assert_eq(st.copies_in, 2);
	cr_assert_eq(st.copies_out, 1);
	cr_assert_eq(st.bytes_in, slot + 1000);
	cr_assert_eq(st.bytes_out, slot);
	cr_assert_eq(st.evictions, 1);
	cr_assert_eq(st.chunks_created, 1, "storage kept across a plain evict");
	cr_assert_eq(st.copy_errors, 0);
	cr_assert_eq(st.unpinned_copies, 3, "nothing registered");
	cr_assert_eq(tier_gpu_inflight(g), 0);
	tier_gpu_destroy(g);
	free(src);
	free(dst);
}

Test(emulated, reap_through_event_fd, .timeout = 30)
{
	const size_t slot = 65536;
	struct tier_gpu_config cfg = { .backend = "emulated", .capacity = 64 * slot, .slot_bytes = slot,
				       .emu_workers = 3 };
	struct tier_gpu *g;
	uint8_t *host = malloc(64 * slot);
	uint64_t tok[64];
	int seen[64] = { 0 }, got = 0;

	cr_assert_eq(tier_gpu_create(&cfg, &g, NULL), 0);
	cr_assert_eq(tier_gpu_nslots(g), 64);
	cr_assert_eq(tier_gpu_register_host(g, host, 64 * slot, NULL), 0);
	cr_assert_eq(tier_gpu_register_host(g, host, 64 * slot, NULL), -EBUSY);
	fill(host, 64 * slot, 3);
	for (uint32_t i = 0; i < 64; i++)
		cr_assert_eq(tier_gpu_copy_in(g, i, host + (63 - i) * slot, slot, &tok[i], NULL), 0);
	cr_assert_eq(tier_gpu_inflight(g), 64);
	while (got < 64) {
		struct tier_gpu_done d[5];
		int n;

		cr_assert_geq(efd_readable(g, 5000), 1, "event fd never fired");
		n = tier_gpu_reap(g, d, 5);  /* small batches: the fd must re-arm */
		cr_assert_geq(n, 0);
		for (int k = 0; k < n; k++) {
			cr_assert_eq(d[k].rc, 0);
			cr_assert_eq(d[k].token, tok[d[k].slot]);
			cr_assert_not(d[k].to_host);
			cr_assert_eq(seen[d[k].slot]++, 0, "slot %u reported twice", d[k].slot);
			cr_assert_eq(tier_gpu_slot_state(g, d[k].slot), TIER_GPU_SLOT_RESIDENT);
		}
		got += n;
	}
	cr_assert_eq(tier_gpu_inflight(g), 0);
	for (uint32_t i = 0; i < 64; i++) {
		cr_assert_eq(tier_gpu_poll(g, tok[i]), 1);
		cr_assert_eq(memcmp((void *)(uintptr_t)tier_gpu_slot_addr(g, i), host + (63 - i) * slot, slot), 0);
	}
	struct tier_gpu_stats st;
	tier_gpu_get_stats(g, &st);
	cr_assert_eq(st.unpinned_copies, 0);
	cr_assert_eq(st.copies_in, 64);
	tier_gpu_unregister_host(g);
	tier_gpu_destroy(g);
	free(host);
}

Test(emulated, wait_leaves_other_completions_for_reap, .timeout = 20)
{
	const size_t slot = 4096;
	struct tier_gpu *g = mk("emulated", 4 * slot, slot, NULL);
	uint8_t src[4096];
	struct tier_gpu_done d[4];
	uint64_t a, b;

	fill(src, sizeof(src), 1);
	cr_assert_eq(tier_gpu_copy_in(g, 0, src, slot, &a, NULL), 0);
	cr_assert_eq(tier_gpu_copy_in(g, 1, src, slot, &b, NULL), 0);
	cr_assert_eq(tier_gpu_wait(g, b, 5000), 1);
	/* a's completion is still owed to the event loop. */
	cr_assert_eq(tier_gpu_inflight(g), 1);
	cr_assert_geq(efd_readable(g, 5000), 1);
	int n = 0;
	for (int tries = 0; n == 0 && tries < 500; tries++) {
		n = tier_gpu_reap(g, d, 4);
		if (!n)
			efd_readable(g, 10);
	}
	cr_assert_eq(n, 1);
	cr_assert_eq(d[0].token, a);
	cr_assert_eq(tier_gpu_reap(g, d, 4), 0, "b was observed by wait, not reported again");
	tier_gpu_destroy(g);
}

Test(emulated, release_gives_storage_back, .timeout = 20)
{
	const size_t slot = 2 * 4096;
	struct tier_gpu *g = mk("emulated", 3 * slot, slot, NULL);
	struct tier_gpu_export e0, e1;
	struct tier_gpu_stats st;
	uint8_t src[2 * 4096];
	uint64_t t;

	fill(src, sizeof(src), 9);
	cr_assert_eq(tier_gpu_export(g, &e0, NULL), 0);
	cr_assert_eq(tier_gpu_copy_in(g, 1, src, slot, &t, NULL), 0);
	cr_assert_eq(tier_gpu_wait(g, t, 5000), 1);
	cr_assert_eq(tier_gpu_evict(g, 1, true), 0);
	cr_assert_eq(tier_gpu_evict(g, 1, true), -ENOENT, "nothing left to release");
	tier_gpu_get_stats(g, &st);
	cr_assert_eq(st.chunks_created, 1);
	cr_assert_eq(st.chunks_released, 1);
	cr_assert_eq(tier_gpu_export(g, &e1, NULL), 0);
	cr_assert_gt(e1.generation, e0.generation);
	/* Released storage reads back as zeros through the client's view. */
	const uint8_t *v = mmap(NULL, e1.chunk_bytes, PROT_READ, MAP_SHARED, e1.fds[0], 0);
	cr_assert_neq(v, MAP_FAILED);
	for (size_t i = 0; i < slot; i++)
		cr_assert_eq(v[e1.slot_stride + i], 0);
	/* And a refill works. */
	cr_assert_eq(tier_gpu_copy_in(g, 1, src, slot, &t, NULL), 0);
	cr_assert_eq(tier_gpu_wait(g, t, 5000), 1);
	cr_assert_eq(memcmp(v + e1.slot_stride, src, slot), 0);
	munmap((void *)v, e1.chunk_bytes);
	tier_gpu_export_free(&e0);
	tier_gpu_export_free(&e1);
	tier_gpu_destroy(g);
}

Test(emulated, export_is_sealed_and_read_only, .timeout = 20)
{
	const size_t slot = 5000;
	struct tier_gpu *g = mk("emulated", 4 * 8192, slot, NULL);
	struct tier_gpu_export e;
	uint8_t src[5000];
	struct moe_error err;
	int fds_before = count_fds();
	uint64_t t;

	fill(src, sizeof(src), 11);
	cr_assert_eq(tier_gpu_copy_in(g, 3, src, slot, &t, NULL), 0);
	cr_assert_eq(tier_gpu_wait(g, t, 5000), 1);
	cr_assert_eq(tier_gpu_export(g, &e, &err), 0, "%s", err.msg);
	cr_assert_eq(e.backend, TIER_GPU_EMULATED);
	cr_assert_eq(e.nfds, 1);
	cr_assert_eq(e.nslots, tier_gpu_nslots(g));
	cr_assert_eq(e.chunk_bytes, (uint64_t)e.nslots * e.slot_stride);
	cr_assert_eq(e.slot_bytes, slot);
	int seals = fcntl(e.fds[0], F_GET_SEALS);
	cr_assert_geq(seals, 0);
	cr_assert(seals & F_SEAL_SHRINK);
	cr_assert(seals & F_SEAL_GROW);
	cr_assert(seals & F_SEAL_SEAL);
	cr_assert_eq(ftruncate(e.fds[0], 0), -1);
	void *w = mmap(NULL, e.chunk_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, e.fds[0], 0);
	cr_assert_eq(w, MAP_FAILED, "a client must not get a writable mapping");
	const uint8_t *v = mmap(NULL, e.chunk_bytes, PROT_READ, MAP_SHARED, e.fds[0], 0);
	cr_assert_neq(v, MAP_FAILED);
	cr_assert_eq(memcmp(v + 3 * e.slot_stride, src, slot), 0);
	munmap((void *)v, e.chunk_bytes);
	tier_gpu_export_free(&e);
	cr_assert_eq(count_fds(), fds_before, "export_free closes every fd");
	tier_gpu_destroy(g);
}

Test(emulated, destroy_with_copies_in_flight, .timeout = 20)
{
	const size_t slot = 1 << 20;
	struct tier_gpu *g = mk("emulated", 8 * slot, slot, NULL);
	uint8_t *src = calloc(1, slot);
	uint64_t t;

	for (uint32_t i = 0; i < 8; i++)
		cr_assert_eq(tier_gpu_copy_in(g, i, src, slot, &t, NULL), 0);
	tier_gpu_destroy(g);  /* joins the workers after they drain */
	free(src);
}

Test(config, names_and_bad_input, .timeout = 10)
{
	struct tier_gpu_config cfg = { .backend = "emulated", .capacity = 4096, .slot_bytes = 8192 };
	enum tier_gpu_backend b;
	struct moe_error err = { { 0 } };
	struct tier_gpu *g = (void *)1;
	bool is_auto;

	cr_assert_eq(tier_gpu_create(&cfg, &g, &err), -EINVAL);
	cr_assert_null(g);
	cr_assert_neq(err.msg[0], 0);
	cfg.slot_bytes = 0;
	cr_assert_eq(tier_gpu_create(&cfg, &g, NULL), -EINVAL);
	cfg.slot_bytes = 1024;
	cfg.backend = "cuda";
	cr_assert_eq(tier_gpu_create(&cfg, &g, &err), -EINVAL);
	cr_assert(strstr(err.msg, "cuda"));
	cfg.backend = "none";
	cr_assert_eq(tier_gpu_create(&cfg, &g, NULL), -ENODEV);
	for (int i = TIER_GPU_NONE; i <= TIER_GPU_VMM; i++) {
		cr_assert_eq(tier_gpu_backend_parse(tier_gpu_backend_name(i), &b, &is_auto), 0);
		cr_assert_eq((int)b, i);
		cr_assert_not(is_auto);
	}
	cr_assert_eq(tier_gpu_backend_parse("auto", &b, &is_auto), 0);
	cr_assert(is_auto);
	cr_assert_eq(tier_gpu_backend_parse("VMM", &b, &is_auto), -EINVAL);
	tier_gpu_destroy(NULL);
}

/* ---- the driver loader, for real (no fake) ---- */

Test(loader, missing_library_means_no_gpu, .timeout = 10)
{
	const struct cu_api *cu = (void *)1;
	struct moe_error err = { { 0 } };

	setenv("MOETIER_LIBCUDA", "/nonexistent/libcuda.so.1", 1);
	int r = cu_api_get(&cu, &err);
#ifdef HAVE_CUDA
	cr_assert_eq(r, -ENODEV);
	cr_assert(strstr(err.msg, "no CUDA driver"), "%s", err.msg);
#else
	cr_assert_eq(r, -ENOTSUP);
#endif
	cr_assert_null(cu);
	/* Loaded once per process: the second answer is the same. */
	cr_assert_eq(cu_api_get(&cu, NULL), r);
}

Test(loader, auto_falls_back_to_emulated, .timeout = 10)
{
	setenv("MOETIER_LIBCUDA", "/nonexistent/libcuda.so.1", 1);
	struct tier_gpu *g = mk("auto", 1 << 20, 4096, NULL);

	cr_assert_eq(tier_gpu_backend_of(g), TIER_GPU_EMULATED);
	tier_gpu_destroy(g);

	struct tier_gpu_config cfg = { .backend = "vmm", .capacity = 1 << 20, .slot_bytes = 4096 };
	struct moe_error err;
#ifdef HAVE_CUDA
	cr_assert_eq(tier_gpu_create(&cfg, &g, &err), -ENODEV);
	cfg.backend = "uvm";
	cr_assert_eq(tier_gpu_create(&cfg, &g, &err), -ENODEV);
#else
	cr_assert_eq(tier_gpu_create(&cfg, &g, &err), -ENOTSUP);
	cr_assert(strstr(err.msg, "not built"));
#endif
}

#ifdef HAVE_CUDA
Test(loader, toolkit_stub_is_no_gpu, .timeout = 10)
{
	const char *stub = "/usr/local/cuda/lib64/stubs/libcuda.so";
	const struct cu_api *cu;
	struct moe_error err = { { 0 } };

	if (access(stub, R_OK) != 0)
		cr_skip_test("no CUDA stub library at %s", stub);
	setenv("MOETIER_LIBCUDA", stub, 1);
	cr_assert_eq(cu_api_get(&cu, &err), -ENODEV);
	cr_assert(strstr(err.msg, "cuInit: 34"), "%s", err.msg);
}

Test(loader, error_mapping, .timeout = 10)
{
	char buf[128];

	cr_assert_eq(cu_api_errno(CUDA_SUCCESS), 0);
	cr_assert_eq(cu_api_errno(CUDA_ERROR_OUT_OF_MEMORY), -ENOMEM);
	cr_assert_eq(cu_api_errno(CUDA_ERROR_NOT_READY), -EAGAIN);
	cr_assert_eq(cu_api_errno(CUDA_ERROR_NO_DEVICE), -ENODEV);
	cr_assert_eq(cu_api_errno(CUDA_ERROR_ILLEGAL_ADDRESS), -EIO);
	for (int rc = 0; rc < 1000; rc++)
		cr_assert_eq(cu_api_rc_is_no_gpu((CUresult)rc),
			     rc == 34 || rc == 35 || rc == 100 || rc == 803 || rc == 999, "rc %d", rc);
	cu_api_strerror(NULL, CUDA_ERROR_OUT_OF_MEMORY, buf, sizeof(buf));
	cr_assert(strstr(buf, "(2)"), "%s", buf);
}

/* ---- a fake CUDA driver: device memory is host memory, streams are
 * queues that run only when the test says so (fk_run), and any acquiring
 * call can be made to fail (fk.fail_at = its ordinal). ---- */

#define FK_Q 1024
#define FK_N 256

enum fk_kind { FK_H2D, FK_D2H, FK_EVENT, FK_HOSTFN, FK_PREFETCH };
struct fk_op {
	enum fk_kind kind;
	CUdeviceptr d;
	void *h;
	const void *s;
	size_t n;
	CUevent ev;
	CUhostFn fn;
	void *arg;
	int loc;
};
struct CUstream_st {
	struct fk_op q[FK_Q];
	unsigned head, tail;
};
struct CUevent_st {
	int state;  /* 0 never recorded / done, 1 pending */
};
struct CUctx_st {
	int dummy;
};
struct fk_chunk {
	uint8_t *mem;
	size_t size;
	bool live;
};
struct fk_map {
	CUdeviceptr va;
	size_t size;
	int chunk;
	bool access;
	bool live;
};

static struct {
	int calls, fail_at;
	CUresult fail_rc;
	size_t mem_free;
	int attr_vmm, attr_fd, attr_managed, attr_concurrent;
	size_t gran;
	int max_chunks, live_chunks, created_chunks;
	struct fk_chunk chunks[FK_N];
	int nchunks;
	struct fk_map maps[FK_N];
	int live_maps, map_calls, unmap_calls, access_calls;
	CUdeviceptr res_base;
	size_t res_len;
	int live_reserves;
	struct CUctx_st ctx;
	int ctx_refs, live_streams, live_events;
	void *host_reg;
	size_t host_reg_len;
	uint8_t *managed;
	size_t managed_len;
	int live_managed, advise_pref, advise_access;
	int prefetch_dev, prefetch_host;
	int pending_prefetch_dev_before_copy;
	bool exec_fail;
	CUresult sticky;
	int exports, hostfn_calls;
	struct CUstream_st *streams[4];
	int nstreams;
} fk;

#define FK_ENTER() do { if (++fk.calls == fk.fail_at) return fk.fail_rc; } while (0)

static CUresult f_getname(CUresult e, const char **s) { (void)e; *s = "FAKE_ERROR"; return CUDA_SUCCESS; }
static CUresult f_getstr(CUresult e, const char **s) { (void)e; *s = "fake"; return CUDA_SUCCESS; }
static CUresult f_meminfo(size_t *fr, size_t *tot)
{
	FK_ENTER();
	*fr = fk.mem_free;
	*tot = fk.mem_free * 2;
	return CUDA_SUCCESS;
}
static CUresult f_devget(CUdevice *d, int o) { FK_ENTER(); *d = o; return CUDA_SUCCESS; }
static CUresult f_attr(int *v, CUdevice_attribute a, CUdevice d)
{
	FK_ENTER();
	(void)d;
	*v = a == CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED ? fk.attr_vmm :
	     a == CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED ? fk.attr_fd :
	     a == CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY ? fk.attr_managed :
	     a == CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS ? fk.attr_concurrent : 0;
	return CUDA_SUCCESS;
}
static CUresult f_retain(CUcontext *c, CUdevice d) { FK_ENTER(); (void)d; *c = &fk.ctx; fk.ctx_refs++; return CUDA_SUCCESS; }
static CUresult f_release(CUdevice d) { (void)d; fk.ctx_refs--; return CUDA_SUCCESS; }
static CUresult f_setcur(CUcontext c) { FK_ENTER(); return c == &fk.ctx ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT; }
static CUresult f_gran(size_t *g, const CUmemAllocationProp *p, CUmemAllocationGranularity_flags o)
{
	FK_ENTER();
	cr_assert_eq(o, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED);
	cr_assert_eq(p->location.type, CU_MEM_LOCATION_TYPE_DEVICE);
	*g = fk.gran;
	return CUDA_SUCCESS;
}
static CUresult f_reserve(CUdeviceptr *p, size_t size, size_t align, CUdeviceptr addr, unsigned long long fl)
{
	FK_ENTER();
	(void)addr; (void)fl;
	cr_assert_eq(align % fk.gran, 0);
	fk.res_base = 0x7f0000000000ull;  /* aligned to any granularity used here */
	fk.res_len = size;
	fk.live_reserves++;
	*p = fk.res_base;
	return CUDA_SUCCESS;
}
static CUresult f_addrfree(CUdeviceptr p, size_t size)
{
	cr_assert_eq(p, fk.res_base);
	cr_assert_eq(size, fk.res_len);
	cr_assert_eq(fk.live_maps, 0, "free a reserve with mappings in it");
	fk.live_reserves--;
	return CUDA_SUCCESS;
}
static CUresult f_create(CUmemGenericAllocationHandle *h, size_t size, const CUmemAllocationProp *p,
			 unsigned long long fl)
{
	FK_ENTER();
	(void)fl;
	cr_assert_eq(size % fk.gran, 0, "cuMemCreate size not a granularity multiple");
	cr_assert_eq(p->type, CU_MEM_ALLOCATION_TYPE_PINNED);
	if (fk.live_chunks >= fk.max_chunks)
		return CUDA_ERROR_OUT_OF_MEMORY;
	cr_assert_lt(fk.nchunks, FK_N);
	fk.chunks[fk.nchunks] = (struct fk_chunk){ calloc(1, size), size, true };
	*h = (CUmemGenericAllocationHandle)(fk.nchunks + 1);
	fk.nchunks++;
	fk.live_chunks++;
	fk.created_chunks++;
	return CUDA_SUCCESS;
}
static CUresult f_memrelease(CUmemGenericAllocationHandle h)
{
	struct fk_chunk *c = &fk.chunks[h - 1];

	cr_assert(c->live, "release of a dead chunk");
	for (int i = 0; i < FK_N; i++)
		cr_assert(!(fk.maps[i].live && fk.maps[i].chunk == (int)h - 1), "release of a mapped chunk");
	free(c->mem);
	c->live = false;
	fk.live_chunks--;
	return CUDA_SUCCESS;
}
static CUresult f_map(CUdeviceptr va, size_t size, size_t off, CUmemGenericAllocationHandle h,
		      unsigned long long fl)
{
	FK_ENTER();
	(void)fl;
	cr_assert_eq(off, 0);
	cr_assert(fk.chunks[h - 1].live);
	cr_assert_eq(size, fk.chunks[h - 1].size);
	cr_assert_eq(va % fk.gran, 0);
	cr_assert(va >= fk.res_base && va + size <= fk.res_base + fk.res_len, "map outside the reserve");
	for (int i = 0; i < FK_N; i++)
		cr_assert(!(fk.maps[i].live && va < fk.maps[i].va + fk.maps[i].size && fk.maps[i].va < va + size),
			  "overlapping map");
	for (int i = 0; i < FK_N; i++)
		if (!fk.maps[i].live) {
			fk.maps[i] = (struct fk_map){ va, size, (int)h - 1, false, true };
			fk.live_maps++;
			fk.map_calls++;
			return CUDA_SUCCESS;
		}
	return CUDA_ERROR_OUT_OF_MEMORY;
}
static CUresult f_unmap(CUdeviceptr va, size_t size)
{
	for (int i = 0; i < FK_N; i++)
		if (fk.maps[i].live && fk.maps[i].va == va) {
			cr_assert_eq(fk.maps[i].size, size);
			fk.maps[i].live = false;
			fk.live_maps--;
			fk.unmap_calls++;
			return CUDA_SUCCESS;
		}
	cr_assert_fail("unmap of an unmapped range");
	return CUDA_ERROR_INVALID_VALUE;
}
static CUresult f_access(CUdeviceptr va, size_t size, const CUmemAccessDesc *d, size_t n)
{
	FK_ENTER();
	cr_assert_eq(n, 1);
	cr_assert_eq(d->location.type, CU_MEM_LOCATION_TYPE_DEVICE);
	cr_assert_eq(d->flags, CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
	for (int i = 0; i < FK_N; i++)
		if (fk.maps[i].live && fk.maps[i].va == va && fk.maps[i].size == size) {
			fk.maps[i].access = true;
			fk.access_calls++;
			return CUDA_SUCCESS;
		}
	cr_assert_fail("set access on an unmapped range");
	return CUDA_ERROR_INVALID_VALUE;
}
static CUresult f_export(void *out, CUmemGenericAllocationHandle h, CUmemAllocationHandleType t,
			 unsigned long long fl)
{
	FK_ENTER();
	(void)fl;
	cr_assert_eq(t, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
	cr_assert(fk.chunks[h - 1].live);
	*(int *)out = memfd_create("fake-chunk", MFD_CLOEXEC);
	fk.exports++;
	return CUDA_SUCCESS;
}
static CUresult f_hostreg(void *p, size_t n, unsigned fl)
{
	FK_ENTER();
	cr_assert_eq(fl, CU_MEMHOSTREGISTER_PORTABLE);
	cr_assert_null(fk.host_reg);
	fk.host_reg = p;
	fk.host_reg_len = n;
	return CUDA_SUCCESS;
}
static CUresult f_hostunreg(void *p)
{
	cr_assert_eq(p, fk.host_reg);
	fk.host_reg = NULL;
	return CUDA_SUCCESS;
}
static CUresult f_managed(CUdeviceptr *p, size_t n, unsigned fl)
{
	FK_ENTER();
	cr_assert_eq(fl, CU_MEM_ATTACH_GLOBAL);
	fk.managed = calloc(1, n);
	fk.managed_len = n;
	fk.live_managed++;
	*p = (CUdeviceptr)(uintptr_t)fk.managed;
	return CUDA_SUCCESS;
}
static CUresult f_free(CUdeviceptr p)
{
	cr_assert_eq(p, (CUdeviceptr)(uintptr_t)fk.managed);
	free(fk.managed);
	fk.managed = NULL;
	fk.live_managed--;
	return CUDA_SUCCESS;
}
static CUresult f_advise(CUdeviceptr p, size_t n, CUmem_advise a, CUmemLocation loc)
{
	FK_ENTER();
	cr_assert_eq(p, (CUdeviceptr)(uintptr_t)fk.managed);
	cr_assert_eq(n, fk.managed_len);
	cr_assert_eq(loc.type, CU_MEM_LOCATION_TYPE_DEVICE);
	fk.advise_pref += a == CU_MEM_ADVISE_SET_PREFERRED_LOCATION;
	fk.advise_access += a == CU_MEM_ADVISE_SET_ACCESSED_BY;
	return CUDA_SUCCESS;
}
static CUresult push(CUstream s, struct fk_op op)
{
	cr_assert_lt(s->tail - s->head, FK_Q);
	s->q[s->tail++ % FK_Q] = op;
	return CUDA_SUCCESS;
}
static CUresult f_prefetch(CUdeviceptr p, size_t n, CUmemLocation loc, unsigned fl, CUstream s)
{
	FK_ENTER();
	(void)fl;
	cr_assert(p >= (CUdeviceptr)(uintptr_t)fk.managed &&
		  p + n <= (CUdeviceptr)(uintptr_t)fk.managed + fk.managed_len);
	return push(s, (struct fk_op){ .kind = FK_PREFETCH, .d = p, .n = n, .loc = loc.type });
}
static CUresult f_h2d(CUdeviceptr d, const void *src, size_t n, CUstream s)
{
	FK_ENTER();
	/* Like the driver: the copy is only queued, src must stay valid. */
	if (s->tail > s->head && s->q[(s->tail - 1) % FK_Q].kind == FK_PREFETCH &&
	    s->q[(s->tail - 1) % FK_Q].loc == CU_MEM_LOCATION_TYPE_DEVICE)
		fk.pending_prefetch_dev_before_copy++;
	return push(s, (struct fk_op){ .kind = FK_H2D, .d = d, .s = src, .n = n });
}
static CUresult f_d2h(void *dst, CUdeviceptr d, size_t n, CUstream s)
{
	FK_ENTER();
	return push(s, (struct fk_op){ .kind = FK_D2H, .d = d, .h = dst, .n = n });
}
static CUresult f_streamcreate(CUstream *s, unsigned fl)
{
	FK_ENTER();
	cr_assert_eq(fl, CU_STREAM_NON_BLOCKING);
	*s = calloc(1, sizeof(**s));
	fk.streams[fk.nstreams++ % 4] = *s;
	fk.live_streams++;
	return CUDA_SUCCESS;
}
static void run_stream(CUstream s);
static CUresult f_streamdestroy(CUstream s)
{
	cr_assert_eq(s->head, s->tail, "stream destroyed with work queued");
	for (int i = 0; i < 4; i++)
		if (fk.streams[i] == s)
			fk.streams[i] = NULL;
	free(s);
	fk.live_streams--;
	return CUDA_SUCCESS;
}
static CUresult f_streamsync(CUstream s) { run_stream(s); return fk.sticky; }
static CUresult f_eventcreate(CUevent *e, unsigned fl)
{
	FK_ENTER();
	(void)fl;
	*e = calloc(1, sizeof(**e));
	fk.live_events++;
	return CUDA_SUCCESS;
}
static CUresult f_eventdestroy(CUevent e) { free(e); fk.live_events--; return CUDA_SUCCESS; }
static CUresult f_record(CUevent e, CUstream s)
{
	FK_ENTER();
	e->state = 1;
	return push(s, (struct fk_op){ .kind = FK_EVENT, .ev = e });
}
static CUresult f_query(CUevent e)
{
	FK_ENTER();
	if (fk.sticky)
		return fk.sticky;
	return e->state == 1 ? CUDA_ERROR_NOT_READY : CUDA_SUCCESS;
}
static void fk_run(void);
static CUresult f_eventsync(CUevent e) { (void)e; fk_run(); return fk.sticky; }
static CUresult f_hostfn(CUstream s, CUhostFn fn, void *arg)
{
	FK_ENTER();
	return push(s, (struct fk_op){ .kind = FK_HOSTFN, .fn = fn, .arg = arg });
}

static uint8_t *resolve(CUdeviceptr d, size_t n)
{
	if (fk.managed && d >= (CUdeviceptr)(uintptr_t)fk.managed &&
	    d + n <= (CUdeviceptr)(uintptr_t)fk.managed + fk.managed_len)
		return (uint8_t *)(uintptr_t)d;
	for (int i = 0; i < FK_N; i++) {
		struct fk_map *m = &fk.maps[i];

		if (m->live && m->access && d >= m->va && d + n <= m->va + m->size)
			return fk.chunks[m->chunk].mem + (d - m->va);
	}
	return NULL;
}

static void run_stream(CUstream s)
{
	while (s->head != s->tail) {
		struct fk_op *op = &s->q[s->head++ % FK_Q];
		uint8_t *p;

		switch (op->kind) {
		case FK_H2D:
		case FK_D2H:
			p = resolve(op->d, op->n);
			if (!p || fk.exec_fail) {
				fk.sticky = CUDA_ERROR_ILLEGAL_ADDRESS;
				break;
			}
			if (op->kind == FK_H2D)
				memcpy(p, op->s, op->n);
			else
				memcpy(op->h, p, op->n);
			break;
		case FK_EVENT:
			op->ev->state = 0;
			break;
		case FK_HOSTFN:
			fk.hostfn_calls++;
			op->fn(op->arg);
			break;
		case FK_PREFETCH:
			if (op->loc == CU_MEM_LOCATION_TYPE_DEVICE)
				fk.prefetch_dev++;
			else
				fk.prefetch_host++;
			break;
		}
	}
}

static void fk_run(void)
{
	for (int i = 0; i < 4; i++)
		if (fk.streams[i])
			run_stream(fk.streams[i]);
}

static struct cu_api fake_api;

static const struct cu_api *fk_reset(void)
{
	memset(&fk, 0, sizeof(fk));
	fk.attr_vmm = fk.attr_fd = fk.attr_managed = fk.attr_concurrent = 1;
	fk.gran = 2u << 20;
	fk.max_chunks = FK_N;
	fk.mem_free = 80ull << 30;
	fk.fail_rc = CUDA_ERROR_OUT_OF_MEMORY;
	memset(&fake_api, 0, sizeof(fake_api));
	fake_api.device_count = 1;
	fake_api.driver_version = 13000;
	fake_api.cuGetErrorName = f_getname;
	fake_api.cuGetErrorString = f_getstr;
	fake_api.cuDeviceGet = f_devget;
	fake_api.cuMemGetInfo = f_meminfo;
	fake_api.cuDeviceGetAttribute = f_attr;
	fake_api.cuDevicePrimaryCtxRetain = f_retain;
	fake_api.cuDevicePrimaryCtxRelease = f_release;
	fake_api.cuCtxSetCurrent = f_setcur;
	fake_api.cuMemGetAllocationGranularity = f_gran;
	fake_api.cuMemAddressReserve = f_reserve;
	fake_api.cuMemAddressFree = f_addrfree;
	fake_api.cuMemCreate = f_create;
	fake_api.cuMemRelease = f_memrelease;
	fake_api.cuMemMap = f_map;
	fake_api.cuMemUnmap = f_unmap;
	fake_api.cuMemSetAccess = f_access;
	fake_api.cuMemExportToShareableHandle = f_export;
	fake_api.cuMemHostRegister = f_hostreg;
	fake_api.cuMemHostUnregister = f_hostunreg;
	fake_api.cuMemAllocManaged = f_managed;
	fake_api.cuMemFree = f_free;
	fake_api.cuMemAdvise = f_advise;
	fake_api.cuMemPrefetchAsync = f_prefetch;
	fake_api.cuMemcpyHtoDAsync = f_h2d;
	fake_api.cuMemcpyDtoHAsync = f_d2h;
	fake_api.cuStreamCreate = f_streamcreate;
	fake_api.cuStreamDestroy = f_streamdestroy;
	fake_api.cuStreamSynchronize = f_streamsync;
	fake_api.cuEventCreate = f_eventcreate;
	fake_api.cuEventDestroy = f_eventdestroy;
	fake_api.cuEventRecord = f_record;
	fake_api.cuEventQuery = f_query;
	fake_api.cuEventSynchronize = f_eventsync;
	fake_api.cuLaunchHostFunc = f_hostfn;
	return &fake_api;
}

static CUresult f_hostfn_fail(CUstream s, CUhostFn fn, void *arg)
{
	(void)s; (void)fn; (void)arg;
	return CUDA_ERROR_NOT_SUPPORTED;
}

static CUresult f_reserve_oom(CUdeviceptr *p, size_t s, size_t a, CUdeviceptr addr, unsigned long long fl)
{
	(void)p; (void)s; (void)a; (void)addr; (void)fl;
	return CUDA_ERROR_OUT_OF_MEMORY;
}

static void assert_all_released(void)
{
	cr_assert_eq(fk.ctx_refs, 0, "primary context retained %d", fk.ctx_refs);
	cr_assert_eq(fk.live_streams, 0);
	cr_assert_eq(fk.live_events, 0);
	cr_assert_eq(fk.live_chunks, 0);
	cr_assert_eq(fk.live_maps, 0);
	cr_assert_eq(fk.live_reserves, 0);
	cr_assert_eq(fk.live_managed, 0);
	cr_assert_null(fk.host_reg);
}

Test(fake_vmm, granularity_rounding_and_fixed_addresses, .timeout = 10)
{
	const struct cu_api *cu = fk_reset();
	uint64_t slot = (3u << 20) + 1, cap = 17u << 20;
	uint64_t stride = (slot + fk.gran - 1) / fk.gran * fk.gran;
	struct tier_gpu *g = mk("vmm", cap, slot, cu);

	cr_assert_eq(tier_gpu_backend_of(g), TIER_GPU_VMM);
	cr_assert_eq(tier_gpu_slot_stride(g), stride);
	cr_assert_eq(tier_gpu_nslots(g), cap / stride);
	cr_assert_eq(fk.res_len, tier_gpu_nslots(g) * stride, "one reserve for the whole arena");
	cr_assert_eq(fk.live_reserves, 1);
	cr_assert_eq(fk.ctx_refs, 1);
	cr_assert_eq(fk.live_streams, 2, "one stream per direction");
	cr_assert_eq(fk.live_events, (int)tier_gpu_nslots(g));
	cr_assert_eq(fk.live_chunks, 0, "physical memory only on first fill");
	for (uint32_t i = 0; i < tier_gpu_nslots(g); i++)
		cr_assert_eq(tier_gpu_slot_addr(g, i), fk.res_base + i * stride);
	tier_gpu_destroy(g);
	assert_all_released();
}

Test(fake_vmm, map_copy_complete_evict_release, .timeout = 10)
{
	const struct cu_api *cu = fk_reset();
	fk.gran = 64 << 10;
	const size_t slot = 100000;
	struct tier_gpu *g = mk("vmm", 4 * 131072, slot, cu);
	uint8_t *src = malloc(slot), *dst = calloc(1, slot);
	struct tier_gpu_done d[4];
	struct tier_gpu_stats st;
	struct moe_error err;
	uint64_t t, t2;

	fill(src, slot, 5);
	cr_assert_eq(tier_gpu_nslots(g), 4);
	cr_assert_eq(tier_gpu_copy_in(g, 1, src, slot, &t, &err), 0, "%s", err.msg);
	cr_assert_eq(fk.live_chunks, 1);
	cr_assert_eq(fk.map_calls, 1);
	cr_assert_eq(fk.access_calls, 1, "cuMemSetAccess after every cuMemMap");
	cr_assert_eq(fk.maps[0].va, tier_gpu_slot_addr(g, 1));
	/* Queued, not run: the copy is in flight and the fd is quiet. */
	cr_assert_eq(tier_gpu_poll(g, t), 0);
	cr_assert_eq(tier_gpu_reap(g, d, 4), 0);
	cr_assert_eq(efd_readable(g, 0), 0);
	cr_assert_eq(tier_gpu_slot_state(g, 1), TIER_GPU_SLOT_LOADING);
	fk_run();
	cr_assert_eq(fk.hostfn_calls, 1);
	cr_assert_eq(efd_readable(g, 0), 1, "host callback wakes the event loop");
	cr_assert_eq(tier_gpu_reap(g, d, 4), 1);
	cr_assert_eq(d[0].token, t);
	cr_assert_eq(d[0].rc, 0);
	cr_assert_eq(tier_gpu_slot_state(g, 1), TIER_GPU_SLOT_RESIDENT);
	cr_assert_eq(memcmp(fk.chunks[0].mem, src, slot), 0);

	/* Copy-out goes through the other stream. */
	cr_assert_eq(tier_gpu_copy_out(g, 1, dst, slot, &t2, NULL), 0);
	cr_assert_eq(tier_gpu_slot_state(g, 1), TIER_GPU_SLOT_READING);
	cr_assert_eq(tier_gpu_evict(g, 1, false), -EBUSY);
	fk_run();
	cr_assert_eq(tier_gpu_poll(g, t2), 1);
	cr_assert_eq(memcmp(dst, src, slot), 0);

	/* Plain evict keeps the chunk mapped; a refill reuses it. */
	cr_assert_eq(tier_gpu_evict(g, 1, false), 0);
	cr_assert_eq(fk.live_maps, 1);
	cr_assert_eq(tier_gpu_copy_in(g, 1, src, 10, &t, NULL), 0);
	cr_assert_eq(fk.created_chunks, 1);
	cr_assert_eq(fk.map_calls, 1);
	fk_run();
	cr_assert_eq(tier_gpu_poll(g, t), 1);
	/* evict(release): unmap + release, the address stays reserved. */
	cr_assert_eq(tier_gpu_evict(g, 1, true), 0);
	cr_assert_eq(fk.live_maps, 0);
	cr_assert_eq(fk.live_chunks, 0);
	cr_assert_eq(fk.unmap_calls, 1);
	cr_assert_eq(fk.live_reserves, 1);
	cr_assert_eq(tier_gpu_copy_in(g, 1, src, slot, &t, NULL), 0);
	cr_assert_eq(fk.maps[0].va, tier_gpu_slot_addr(g, 1), "same address after a new chunk");
	fk_run();
	cr_assert_eq(tier_gpu_wait(g, t, 1000), 1);
	tier_gpu_get_stats(g, &st);
	cr_assert_eq(st.chunks_created, 2);
	cr_assert_eq(st.chunks_released, 1);
	cr_assert_eq(st.copies_in, 3);
	cr_assert_eq(st.copies_out, 1);
	cr_assert_eq(st.bytes_in, 2 * slot + 10);
	tier_gpu_destroy(g);
	assert_all_released();
	free(src);
	free(dst);
}

Test(fake_vmm, oom_on_cumemcreate, .timeout = 10)
{
	const struct cu_api *cu = fk_reset();
	fk.gran = 64 << 10;
	fk.max_chunks = 2;
	struct tier_gpu *g = mk("vmm", 4 * 65536, 65536, cu);
	uint8_t src[4096] = { 1, 2, 3 };
	struct tier_gpu_stats st;
	struct moe_error err = { { 0 } };
	uint64_t t0, t1, t2;

	cr_assert_eq(tier_gpu_copy_in(g, 0, src, sizeof(src), &t0, NULL), 0);
	cr_assert_eq(tier_gpu_copy_in(g, 1, src, sizeof(src), &t1, NULL), 0);
	cr_assert_eq(tier_gpu_copy_in(g, 2, src, sizeof(src), &t2, &err), -ENOMEM);
	cr_assert(strstr(err.msg, "cuMemCreate"), "%s", err.msg);
	cr_assert_eq(tier_gpu_slot_state(g, 2), TIER_GPU_SLOT_EMPTY);
	cr_assert_eq(tier_gpu_inflight(g), 2);
	tier_gpu_get_stats(g, &st);
	cr_assert_eq(st.oom, 1);
	cr_assert_eq(st.copy_errors, 1);
	fk_run();
	cr_assert_eq(tier_gpu_poll(g, t0), 1);
	cr_assert_eq(tier_gpu_poll(g, t1), 1);
	/* Free one chunk: the failed slot can be filled now. */
	cr_assert_eq(tier_gpu_evict(g, 0, true), 0);
	cr_assert_eq(tier_gpu_copy_in(g, 2, src, sizeof(src), &t2, NULL), 0);
	fk_run();
	cr_assert_eq(tier_gpu_poll(g, t2), 1);
	tier_gpu_destroy(g);
	assert_all_released();
}

Test(fake_vmm, failed_copy_leaves_slot_empty, .timeout = 10)
{
	const struct cu_api *cu = fk_reset();
	fk.gran = 64 << 10;
	struct tier_gpu *g = mk("vmm", 2 * 65536, 65536, cu);
	uint8_t src[512] = { 0 };
	struct tier_gpu_stats st;
	uint64_t t;

	cr_assert_eq(tier_gpu_copy_in(g, 0, src, sizeof(src), &t, NULL), 0);
	fk.exec_fail = true;
	fk_run();
	cr_assert_eq(tier_gpu_poll(g, t), -EIO);
	cr_assert_eq(tier_gpu_poll(g, t), -EIO, "the failure sticks to the token");
	cr_assert_eq(tier_gpu_slot_state(g, 0), TIER_GPU_SLOT_EMPTY);
	tier_gpu_get_stats(g, &st);
	cr_assert_eq(st.copy_errors, 1);
	cr_assert_eq(st.copies_in, 0);
	cr_assert_eq(tier_gpu_inflight(g), 0);
	fk.sticky = CUDA_SUCCESS;
	tier_gpu_destroy(g);
	assert_all_released();
}

/* Creates an arena with the k-th driver call failing (0: none); checks
 * that a failure returns the injected error and leaves nothing behind, and
 * that a success destroys cleanly. Returns the create result. */
static int create_with_failure(const char *backend, int k, int *ncalls)
{
	const struct cu_api *cu = fk_reset();
	struct tier_gpu_config cfg = { .backend = backend, .capacity = 8u << 20, .slot_bytes = 1u << 20,
				       .cu = cu };
	struct moe_error err = { { 0 } };
	struct tier_gpu *g = NULL;
	int r;

	fk.fail_at = k;
	r = tier_gpu_create(&cfg, &g, &err);
	if (ncalls)
		*ncalls = fk.calls;
	if (r == 0) {
		tier_gpu_destroy(g);
	} else {
		cr_assert_eq(r, -ENOMEM, "%s, call %d: %d %s", backend, k, r, err.msg);
		cr_assert_neq(err.msg[0], 0);
		cr_assert_null(g);
	}
	assert_all_released();
	return r;
}

static void every_init_failure(const char *backend)
{
	int n = 0, failed = 0;

	cr_assert_eq(create_with_failure(backend, 0, &n), 0);
	cr_assert_gt(n, 8, "creation makes more than a handful of driver calls");
	for (int k = 1; k <= n; k++)
		failed += create_with_failure(backend, k, NULL) < 0;
	/* Only the advisory cuMemGetInfo may fail without failing create. */
	cr_assert_geq(failed, n - 1, "%d of %d injected failures reported", failed, n);
}

Test(fake_vmm, every_init_failure_cleans_up, .timeout = 30)
{
	every_init_failure("vmm");
}

Test(fake_vmm, every_copy_failure_cleans_up, .timeout = 30)
{
	uint8_t src[1000];
	int k, r = -1;

	fill(src, sizeof(src), 2);
	for (k = 1; k < 50; k++) {
		const struct cu_api *cu = fk_reset();
		fk.gran = 64 << 10;
		struct tier_gpu *g = mk("vmm", 2 * 65536, 65536, cu);
		struct moe_error err = { { 0 } };
		uint64_t t;

		fk.fail_at = fk.calls + k;
		r = tier_gpu_copy_in(g, 1, src, sizeof(src), &t, &err);
		fk.fail_at = 0;
		if (r == 0) {
			fk_run();
			cr_assert_eq(tier_gpu_poll(g, t), 1);
			cr_assert_eq(memcmp(fk.chunks[0].mem, src, sizeof(src)), 0);
			tier_gpu_destroy(g);
			assert_all_released();
			break;
		}
		cr_assert_eq(r, -ENOMEM, "call %d: %s", k, err.msg);
		cr_assert_eq(tier_gpu_slot_state(g, 1), TIER_GPU_SLOT_EMPTY);
		cr_assert_eq(tier_gpu_inflight(g), 0);
		cr_assert_eq(fk.live_chunks, fk.live_maps, "no chunk without its mapping");
		/* The slot is usable after the failure. */
		cr_assert_eq(tier_gpu_copy_in(g, 1, src, sizeof(src), &t, &err), 0, "%s", err.msg);
		fk_run();
		cr_assert_eq(tier_gpu_poll(g, t), 1);
		tier_gpu_destroy(g);
		assert_all_released();
	}
	cr_assert_eq(r, 0);
	/* Failed in turn: make current, cuMemCreate, cuMemMap, cuMemSetAccess,
	 * the copy, the event record; the 7th (host callback) has a fallback. */
	cr_assert_eq(k, 7);
}

Test(fake_vmm, hostfunc_failure_still_completes, .timeout = 10)
{
	const struct cu_api *cu = fk_reset();
	fk.gran = 64 << 10;
	struct tier_gpu *g = mk("vmm", 65536, 65536, cu);
	uint8_t src[100] = { 9 };
	uint64_t t;

	fake_api.cuLaunchHostFunc = f_hostfn_fail;
	cr_assert_eq(tier_gpu_copy_in(g, 0, src, sizeof(src), &t, NULL), 0);
	cr_assert_eq(efd_readable(g, 0), 1, "woken after the synchronous wait");
	cr_assert_eq(tier_gpu_poll(g, t), 1);
	tier_gpu_destroy(g);
	assert_all_released();
}

Test(fake_vmm, export_fds, .timeout = 10)
{
	const struct cu_api *cu = fk_reset();
	fk.gran = 64 << 10;
	struct tier_gpu *g = mk("vmm", 4 * 65536, 65536, cu);
	struct tier_gpu_export e;
	uint8_t src[100] = { 1 };
	struct moe_error err;
	int before;
	uint64_t t;

	cr_assert_eq(tier_gpu_copy_in(g, 0, src, sizeof(src), &t, NULL), 0);
	cr_assert_eq(tier_gpu_copy_in(g, 2, src, sizeof(src), &t, NULL), 0);
	fk_run();
	before = count_fds();
	cr_assert_eq(tier_gpu_export(g, &e, &err), 0, "%s", err.msg);
	cr_assert_eq(e.backend, TIER_GPU_VMM);
	cr_assert_eq(e.nfds, 4);
	cr_assert_eq(e.chunk_bytes, 65536);
	cr_assert_eq(e.slot_stride, 65536);
	cr_assert_geq(e.fds[0], 0);
	cr_assert_eq(e.fds[1], -1);
	cr_assert_geq(e.fds[2], 0);
	cr_assert_eq(e.fds[3], -1);
	for (uint32_t i = 0; i < 4; i++)
		cr_assert_eq(e.offsets[i], i * e.slot_stride);
	cr_assert_eq(fk.exports, 2);
	tier_gpu_export_free(&e);
	cr_assert_eq(count_fds(), before);
	/* A failure half way closes what was exported. */
	fk.fail_at = fk.calls + 3;  /* setcur, export 0, export 2 -> fails */
	cr_assert_eq(tier_gpu_export(g, &e, &err), -ENOMEM);
	cr_assert_eq(count_fds(), before);
	cr_assert_null(e.fds);
	/* No POSIX fd support: no export. */
	tier_gpu_destroy(g);
	assert_all_released();
	cu = fk_reset();
	fk.gran = 64 << 10;
	fk.attr_fd = 0;
	g = mk("vmm", 65536 * 4, 65536, cu);
	cr_assert_eq(tier_gpu_export(g, &e, NULL), -EOPNOTSUPP);
	tier_gpu_destroy(g);
}

Test(fake_vmm, host_arena_registration, .timeout = 10)
{
	const struct cu_api *cu = fk_reset();
	fk.gran = 64 << 10;
	struct tier_gpu *g = mk("vmm", 2 * 65536, 65536, cu);
	uint8_t *arena = malloc(1 << 20), other[64] = { 0 };
	struct tier_gpu_stats st;
	uint64_t t;

	cr_assert_eq(tier_gpu_register_host(g, arena, 1 << 20, NULL), 0);
	cr_assert_eq(fk.host_reg, arena);
	cr_assert_eq(fk.host_reg_len, 1 << 20);
	cr_assert_eq(tier_gpu_copy_in(g, 0, arena + 4096, 65536, &t, NULL), 0);
	cr_assert_eq(tier_gpu_copy_in(g, 1, other, sizeof(other), &t, NULL), 0);
	tier_gpu_get_stats(g, &st);
	cr_assert_eq(st.unpinned_copies, 1);
	fk_run();
	tier_gpu_reap(g, (struct tier_gpu_done[2]){ { 0 } }, 2);
	tier_gpu_unregister_host(g);
	cr_assert_null(fk.host_reg);
	/* And a registration still held at destroy is undone there. */
	cr_assert_eq(tier_gpu_register_host(g, arena, 4096, NULL), 0);
	fk.fail_at = fk.calls + 1;  /* unregister cannot make the context current */
	tier_gpu_unregister_host(g);
	cr_assert_eq(fk.host_reg, arena, "still registered");
	tier_gpu_destroy(g);
	assert_all_released();
	/* Register failure is reported. */
	cu = fk_reset();
	g = mk("vmm", 2u << 20, 1u << 20, cu);
	fk.fail_at = fk.calls + 2;
	cr_assert_eq(tier_gpu_register_host(g, arena, 4096, NULL), -ENOMEM);
	cr_assert_null(fk.host_reg);
	tier_gpu_destroy(g);
	assert_all_released();
	free(arena);
}

Test(fake_auto, falls_back_in_order, .timeout = 10)
{
	const struct cu_api *cu = fk_reset();
	struct tier_gpu *g = mk("auto", 8u << 20, 1u << 20, cu);

	cr_assert_eq(tier_gpu_backend_of(g), TIER_GPU_VMM);
	tier_gpu_destroy(g);
	assert_all_released();
	cu = fk_reset();
	fk.attr_vmm = 0;
	g = mk("auto", 8u << 20, 1u << 20, cu);
	cr_assert_eq(tier_gpu_backend_of(g), TIER_GPU_UVM);
	tier_gpu_destroy(g);
	assert_all_released();
	cu = fk_reset();
	fk.attr_vmm = 0;
	fk.attr_concurrent = 0;
	g = mk("auto", 8u << 20, 1u << 20, cu);
	cr_assert_eq(tier_gpu_backend_of(g), TIER_GPU_EMULATED);
	tier_gpu_destroy(g);
	assert_all_released();
	/* A real failure (no memory) is not hidden by a fallback. */
	cu = fk_reset();
	fk.fail_at = 9999;
	struct tier_gpu_config cfg = { .backend = "auto", .capacity = 8u << 20, .slot_bytes = 1u << 20, .cu = cu };
	fake_api.cuMemAddressReserve = f_reserve_oom;
	cr_assert_eq(tier_gpu_create(&cfg, &g, NULL), -ENOMEM);
	assert_all_released();
}

Test(fake_uvm, advise_prefetch_copy_evict, .timeout = 10)
{
	const struct cu_api *cu = fk_reset();
	const uint64_t page = 2u << 20, slot = page + 4096;
	uint64_t stride = (slot + page - 1) / page * page;
	struct tier_gpu *g = mk("uvm", 3 * stride, slot, cu);
	uint8_t *src = malloc(slot), *dst = malloc(slot);
	struct tier_gpu_export e;
	uint64_t t;

	fill(src, slot, 4);
	cr_assert_eq(tier_gpu_backend_of(g), TIER_GPU_UVM);
	cr_assert_eq(tier_gpu_slot_stride(g), stride);
	cr_assert_eq(tier_gpu_nslots(g), 3);
	cr_assert_eq(fk.managed_len, 3 * stride);
	cr_assert_eq(fk.advise_pref, 1);
	cr_assert_eq(fk.advise_access, 1);
	cr_assert_eq(tier_gpu_slot_addr(g, 2), (uint64_t)(uintptr_t)fk.managed + 2 * stride);
	cr_assert_eq(tier_gpu_copy_in(g, 2, src, slot, &t, NULL), 0);
	cr_assert_eq(fk.pending_prefetch_dev_before_copy, 1, "prefetch to device before the copy");
	cr_assert_eq(tier_gpu_poll(g, t), 0);
	fk_run();
	cr_assert_eq(fk.prefetch_dev, 1);
	cr_assert_eq(tier_gpu_poll(g, t), 1);
	cr_assert_eq(memcmp(fk.managed + 2 * stride, src, slot), 0);
	cr_assert_eq(tier_gpu_copy_out(g, 2, dst, slot, &t, NULL), 0);
	fk_run();
	cr_assert_eq(tier_gpu_poll(g, t), 1);
	cr_assert_eq(memcmp(dst, src, slot), 0);
	cr_assert_eq(tier_gpu_evict(g, 2, true), 0);
	fk_run();
	cr_assert_eq(fk.prefetch_host, 1, "released slot moves back to host");
	cr_assert_eq(tier_gpu_export(g, &e, NULL), -EOPNOTSUPP);
	tier_gpu_destroy(g);
	assert_all_released();
	free(src);
	free(dst);
}

Test(fake_uvm, every_init_failure_cleans_up, .timeout = 30)
{
	every_init_failure("uvm");
}

/* ---- the real CUDA backends: run only where a GPU is found ---- */

static void real_roundtrip(const char *backend)
{
	const struct cu_api *cu;
	struct moe_error err = { { 0 } };
	const size_t slot = (16u << 20) + (512u << 10);  /* a 16.5 MiB expert */
	struct tier_gpu_config cfg = { .backend = backend, .capacity = 4 * (18u << 20), .slot_bytes = slot };
	struct tier_gpu *g;
	uint8_t *host, *back;
	uint64_t t;

	int r;

	if (cu_api_get(&cu, &err) < 0)
		cr_skip_test("no GPU: %s", err.msg);
	r = tier_gpu_create(&cfg, &g, &err);
	if (r == -EOPNOTSUPP)
		cr_skip_test("this GPU has no %s support: %s", backend, err.msg);
	cr_assert_eq(r, 0, "%s", err.msg);
	host = aligned_alloc(4096, MOE_ALIGN_UP(2 * slot, 4096));
	back = malloc(slot);
	fill(host, slot, 77);
	cr_assert_eq(tier_gpu_register_host(g, host, 2 * slot, &err), 0, "%s", err.msg);
	for (uint32_t i = 0; i < tier_gpu_nslots(g); i++) {
		cr_assert_eq(tier_gpu_copy_in(g, i, host, slot, &t, &err), 0, "%s", err.msg);
		cr_assert_eq(tier_gpu_wait(g, t, 10000), 1);
		memset(back, 0, slot);
		cr_assert_eq(tier_gpu_copy_out(g, i, back, slot, &t, &err), 0, "%s", err.msg);
		cr_assert_eq(tier_gpu_wait(g, t, 10000), 1);
		cr_assert_eq(memcmp(back, host, slot), 0, "slot %u", i);
		cr_assert_eq(tier_gpu_evict(g, i, i % 2 == 0), 0);
	}
	if (!strcmp(backend, "vmm")) {
		struct tier_gpu_export e;

		cr_assert_eq(tier_gpu_copy_in(g, 1, host, slot, &t, &err), 0, "%s", err.msg);
		cr_assert_eq(tier_gpu_wait(g, t, 10000), 1);
		cr_assert_eq(tier_gpu_export(g, &e, &err), 0, "%s", err.msg);
		cr_assert_geq(e.fds[1], 0);
		tier_gpu_export_free(&e);
	}
	tier_gpu_unregister_host(g);
	tier_gpu_destroy(g);
	free(host);
	free(back);
}

Test(gpu_real, vmm_roundtrip, .timeout = 60)
{
	real_roundtrip("vmm");
}

Test(gpu_real, uvm_roundtrip, .timeout = 60)
{
	real_roundtrip("uvm");
}
#endif /* HAVE_CUDA */
