/* test_molae_gpu.c - a MoLAE latent pack's B matrices in the GPU tier
 * (issue 15 item 3): the daemon copies every B into a resident region after
 * the GPU arena's last expert slot at model load, the slots shrink by
 * exactly that region, moet_latent_basis says where each (layer, group) is
 * and the bytes a client reads there are the pack's; COMPUTE does not change
 * with or without the GPU tier; without one (or with an arena too small) B
 * stays on the host. The tier_gpu resident region is also checked on its
 * own (emulated backend). Each daemon test starts its own moetierd in a
 * temporary directory on a pack made by moe-pack molae. */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "moetier/moetier.h"
#include "pack.h"
#include "tier_gpu.h"
/* testutil.h's tu__rm builds "%s/%s" paths into 4 KiB: GCC's truncation
 * analysis flags it under -Werror; the paths here are short. */
#pragma GCC diagnostic ignored "-Wformat-truncation"
#include "daemon_probe.h"
#include "testutil.h"

#define PAGE 4096ull
#define ALIGN_PAGE(x) (((x) + PAGE - 1) / PAGE * PAGE)

/* ---- tier_gpu: the resident region on its own ------------------------------ */

Test(resident, arithmetic_offset_and_isolation, .timeout = 20)
{
	const uint64_t slot = 10000, stride = ALIGN_PAGE(slot), res = 3 * PAGE + 100;
	const uint64_t cap = 20 * stride + 7;
	struct tier_gpu_config cfg = { .backend = "emulated", .capacity = cap, .slot_bytes = slot };
	struct moe_error err = { "" };
	struct tier_gpu *g;

	/* without: capacity / stride slots */
	cr_assert_eq(tier_gpu_create(&cfg, &g, &err), 0, "%s", err.msg);
	cr_assert_eq(tier_gpu_nslots(g), 20);
	cr_assert_eq(tier_gpu_resident_bytes(g), 0);
	cr_assert_eq(tier_gpu_resident_addr(g), 0);
	cr_assert_eq(tier_gpu_resident_write(g, 0, &err, 1, &err), -ENOSPC);
	tier_gpu_destroy(g);

	/* with: the slots are counted from what the page-rounded region leaves */
	cfg.resident_bytes = res;
	cr_assert_eq(tier_gpu_create(&cfg, &g, &err), 0, "%s", err.msg);
	const uint64_t rlen = ALIGN_PAGE(res);
	cr_assert_eq(tier_gpu_resident_bytes(g), rlen);
	cr_assert_eq(tier_gpu_nslots(g), (cap - rlen) / stride);
	cr_assert_eq(tier_gpu_nslots(g), 18, "4 pages of B cost 2 slots of 3 pages: %u", tier_gpu_nslots(g));
	const uint32_t n = tier_gpu_nslots(g);
	cr_assert_eq(tier_gpu_resident_offset(g), n * stride);
	cr_assert_eq(tier_gpu_resident_addr(g), tier_gpu_slot_addr(g, 0) + n * stride);

	uint8_t *b = malloc(res), *x = malloc(slot);
	for (uint64_t i = 0; i < res; i++)
		b[i] = (uint8_t)(i * 131 + 7);
	/* hostile ranges never touch the region */
	cr_assert_eq(tier_gpu_resident_write(g, 0, b, rlen + 1, &err), -EINVAL);
	cr_assert_eq(tier_gpu_resident_write(g, rlen, b, 1, &err), -EINVAL);
	cr_assert_eq(tier_gpu_resident_write(g, UINT64_MAX, b, 2, &err), -EINVAL);
	cr_assert_eq(tier_gpu_resident_write(g, 0, NULL, 2, &err), -EINVAL);
	cr_assert_eq(tier_gpu_resident_write(g, 0, b, res, &err), 0, "%s", err.msg);

	/* fill every slot: the region after them keeps its bytes */
	for (uint32_t s = 0; s < n; s++) {
		uint64_t tok;
		memset(x, 0xa5 ^ (int)s, slot);
		cr_assert_eq(tier_gpu_copy_in(g, s, x, slot, &tok, &err), 0, "%s", err.msg);
		cr_assert_eq(tier_gpu_wait(g, tok, 5000), 1);
	}
	cr_assert_eq(tier_gpu_slot_addr(g, n), 0, "no slot past the last one");
	cr_assert_eq(memcmp((void *)(uintptr_t)tier_gpu_resident_addr(g), b, res), 0);

	/* a client's read-only mapping covers the slots and the region */
	struct tier_gpu_export e;
	cr_assert_eq(tier_gpu_export(g, &e, &err), 0, "%s", err.msg);
	cr_assert_eq(e.nfds, 1);
	cr_assert_geq(e.chunk_bytes, n * stride + rlen);
	const uint8_t *m = mmap(NULL, e.chunk_bytes, PROT_READ, MAP_SHARED, e.fds[0], 0);
	cr_assert_neq(m, MAP_FAILED);
	cr_assert_eq(memcmp(m + tier_gpu_resident_offset(g), b, res), 0);
	munmap((void *)m, e.chunk_bytes);
	tier_gpu_export_free(&e);
	tier_gpu_destroy(g);

	/* too small for the region and one slot: -ENOSPC, saying why */
	cfg.capacity = rlen + stride - 1;
	cr_assert_eq(tier_gpu_create(&cfg, &g, &err), -ENOSPC);
	cr_assert(strstr(err.msg, "resident"), "%s", err.msg);
	cfg.capacity = rlen + stride;
	cr_assert_eq(tier_gpu_create(&cfg, &g, &err), 0, "%s", err.msg);
	cr_assert_eq(tier_gpu_nslots(g), 1);
	tier_gpu_destroy(g);
	free(b);
	free(x);
}

#ifdef HAVE_CUDA
/* ---- vmm and uvm through a fake driver table (no GPU here) ----------------
 * Just enough of the driver for the resident region: copies run at once
 * (a stream is done when the call returns), chunks are host buffers found
 * by the address they are mapped at. */
#include "cuda_api.h"

#define FK_N 64
static struct {
	struct { uint8_t *mem; size_t size; bool live; } chunk[FK_N];
	int nchunk, live_chunks, max_chunks;
	struct { CUdeviceptr va; size_t size; int chunk; bool live; } map[FK_N];
	int live_maps, live_reserves, exports;
	uint8_t *managed;
	size_t managed_len;
	int prefetches;
	char ctx, stream, event;
} fk;

static CUresult f_name(CUresult e, const char **s) { (void)e; *s = "FAKE"; return CUDA_SUCCESS; }
static CUresult f_devget(CUdevice *d, int o) { *d = o; return CUDA_SUCCESS; }
static CUresult f_meminfo(size_t *f, size_t *t) { *f = *t = 1ull << 36; return CUDA_SUCCESS; }
static CUresult f_attr(int *v, CUdevice_attribute a, CUdevice d) { (void)a; (void)d; *v = 1; return CUDA_SUCCESS; }
static CUresult f_retain(CUcontext *c, CUdevice d) { (void)d; *c = (CUcontext)(void *)&fk.ctx; return CUDA_SUCCESS; }
static CUresult f_release(CUdevice d) { (void)d; return CUDA_SUCCESS; }
static CUresult f_setcur(CUcontext c) { (void)c; return CUDA_SUCCESS; }
static CUresult f_gran(size_t *g, const CUmemAllocationProp *p, CUmemAllocationGranularity_flags o)
{
	(void)p; (void)o;
	*g = 2u << 20;
	return CUDA_SUCCESS;
}
static CUresult f_reserve(CUdeviceptr *p, size_t size, size_t align, CUdeviceptr addr, unsigned long long fl)
{
	(void)size; (void)align; (void)addr; (void)fl;
	*p = 0x7f0000000000ull;
	fk.live_reserves++;
	return CUDA_SUCCESS;
}
static CUresult f_addrfree(CUdeviceptr p, size_t size)
{
	(void)p; (void)size;
	cr_assert_eq(fk.live_maps, 0, "reserve freed with mappings in it");
	fk.live_reserves--;
	return CUDA_SUCCESS;
}
static CUresult f_create(CUmemGenericAllocationHandle *h, size_t size, const CUmemAllocationProp *p,
			 unsigned long long fl)
{
	(void)p; (void)fl;
	if (fk.live_chunks >= fk.max_chunks)
		return CUDA_ERROR_OUT_OF_MEMORY;
	cr_assert_lt(fk.nchunk, FK_N);
	fk.chunk[fk.nchunk].mem = calloc(1, size);
	fk.chunk[fk.nchunk].size = size;
	fk.chunk[fk.nchunk].live = true;
	*h = (CUmemGenericAllocationHandle)++fk.nchunk;
	fk.live_chunks++;
	return CUDA_SUCCESS;
}
static CUresult f_memrelease(CUmemGenericAllocationHandle h)
{
	cr_assert(h >= 1 && (int)h <= fk.nchunk && fk.chunk[h - 1].live, "release of a dead chunk");
	free(fk.chunk[h - 1].mem);
	fk.chunk[h - 1].live = false;
	fk.live_chunks--;
	return CUDA_SUCCESS;
}
static CUresult f_map(CUdeviceptr va, size_t size, size_t off, CUmemGenericAllocationHandle h,
		      unsigned long long fl)
{
	(void)off; (void)fl;
	for (int i = 0; i < FK_N; i++)
		if (!fk.map[i].live) {
			cr_assert_eq(size, fk.chunk[h - 1].size);
			fk.map[i].va = va;
			fk.map[i].size = size;
			fk.map[i].chunk = (int)h - 1;
			fk.map[i].live = true;
			fk.live_maps++;
			return CUDA_SUCCESS;
		}
	return CUDA_ERROR_OUT_OF_MEMORY;
}
static CUresult f_unmap(CUdeviceptr va, size_t size)
{
	for (int i = 0; i < FK_N; i++)
		if (fk.map[i].live && fk.map[i].va == va && fk.map[i].size == size) {
			fk.map[i].live = false;
			fk.live_maps--;
			return CUDA_SUCCESS;
		}
	cr_assert_fail("unmap of nothing mapped");
	return CUDA_ERROR_INVALID_VALUE;
}
static CUresult f_access(CUdeviceptr va, size_t size, const CUmemAccessDesc *d, size_t n)
{
	(void)va; (void)size; (void)d; (void)n;
	return CUDA_SUCCESS;
}
static CUresult f_export(void *out, CUmemGenericAllocationHandle h, CUmemAllocationHandleType t,
			 unsigned long long fl)
{
	(void)h; (void)t; (void)fl;
	*(int *)out = dup(0);
	fk.exports++;
	return CUDA_SUCCESS;
}
/* Host address of device bytes [d, d + n), NULL unless one mapping (or the
 * managed range) holds them all. */
static uint8_t *fk_resolve(CUdeviceptr d, size_t n)
{
	if (fk.managed && d >= (CUdeviceptr)(uintptr_t)fk.managed &&
	    d + n <= (CUdeviceptr)(uintptr_t)fk.managed + fk.managed_len)
		return (uint8_t *)(uintptr_t)d;
	for (int i = 0; i < FK_N; i++)
		if (fk.map[i].live && d >= fk.map[i].va && d + n <= fk.map[i].va + fk.map[i].size)
			return fk.chunk[fk.map[i].chunk].mem + (d - fk.map[i].va);
	return NULL;
}
static CUresult f_h2d(CUdeviceptr d, const void *src, size_t n, CUstream s)
{
	(void)s;
	uint8_t *p = fk_resolve(d, n);
	if (!p)
		return CUDA_ERROR_ILLEGAL_ADDRESS;
	memcpy(p, src, n);
	return CUDA_SUCCESS;
}
static CUresult f_managed(CUdeviceptr *p, size_t n, unsigned fl)
{
	(void)fl;
	fk.managed = calloc(1, n);
	fk.managed_len = n;
	*p = (CUdeviceptr)(uintptr_t)fk.managed;
	return CUDA_SUCCESS;
}
static CUresult f_free(CUdeviceptr p)
{
	cr_assert_eq(p, (CUdeviceptr)(uintptr_t)fk.managed);
	free(fk.managed);
	fk.managed = NULL;
	return CUDA_SUCCESS;
}
static CUresult f_advise(CUdeviceptr p, size_t n, CUmem_advise a, CUmemLocation l)
{
	(void)p; (void)n; (void)a; (void)l;
	return CUDA_SUCCESS;
}
static CUresult f_prefetch(CUdeviceptr p, size_t n, CUmemLocation l, unsigned fl, CUstream s)
{
	(void)l; (void)fl; (void)s;
	cr_assert_not_null(fk_resolve(p, n), "prefetch outside the managed range");
	fk.prefetches++;
	return CUDA_SUCCESS;
}
static CUresult f_streamcreate(CUstream *s, unsigned fl) { (void)fl; *s = (CUstream)(void *)&fk.stream; return CUDA_SUCCESS; }
static CUresult f_streamdestroy(CUstream s) { (void)s; return CUDA_SUCCESS; }
static CUresult f_streamsync(CUstream s) { (void)s; return CUDA_SUCCESS; }
static CUresult f_eventcreate(CUevent *e, unsigned fl) { (void)fl; *e = (CUevent)(void *)&fk.event; return CUDA_SUCCESS; }
static CUresult f_eventdestroy(CUevent e) { (void)e; return CUDA_SUCCESS; }
static CUresult f_record(CUevent e, CUstream s) { (void)e; (void)s; return CUDA_SUCCESS; }
static CUresult f_query(CUevent e) { (void)e; return CUDA_SUCCESS; }
static CUresult f_hostfn(CUstream s, CUhostFn fn, void *arg) { (void)s; fn(arg); return CUDA_SUCCESS; }

static struct cu_api fake;

static const struct cu_api *fk_reset(void)
{
	memset(&fk, 0, sizeof(fk));
	fk.max_chunks = FK_N;
	memset(&fake, 0, sizeof(fake));
	fake.device_count = 1;
	fake.driver_version = 13000;
	fake.cuGetErrorName = f_name;
	fake.cuGetErrorString = f_name;
	fake.cuDeviceGet = f_devget;
	fake.cuMemGetInfo = f_meminfo;
	fake.cuDeviceGetAttribute = f_attr;
	fake.cuDevicePrimaryCtxRetain = f_retain;
	fake.cuDevicePrimaryCtxRelease = f_release;
	fake.cuCtxSetCurrent = f_setcur;
	fake.cuMemGetAllocationGranularity = f_gran;
	fake.cuMemAddressReserve = f_reserve;
	fake.cuMemAddressFree = f_addrfree;
	fake.cuMemCreate = f_create;
	fake.cuMemRelease = f_memrelease;
	fake.cuMemMap = f_map;
	fake.cuMemUnmap = f_unmap;
	fake.cuMemSetAccess = f_access;
	fake.cuMemExportToShareableHandle = f_export;
	fake.cuMemAllocManaged = f_managed;
	fake.cuMemFree = f_free;
	fake.cuMemAdvise = f_advise;
	fake.cuMemPrefetchAsync = f_prefetch;
	fake.cuMemcpyHtoDAsync = f_h2d;
	fake.cuStreamCreate = f_streamcreate;
	fake.cuStreamDestroy = f_streamdestroy;
	fake.cuStreamSynchronize = f_streamsync;
	fake.cuEventCreate = f_eventcreate;
	fake.cuEventDestroy = f_eventdestroy;
	fake.cuEventRecord = f_record;
	fake.cuEventQuery = f_query;
	fake.cuLaunchHostFunc = f_hostfn;
	return &fake;
}

#define MIB (1ull << 20)

Test(resident, vmm_whole_strides_chunks_export_and_release, .timeout = 20)
{
	/* 3 MiB slots -> 4 MiB strides (2 MiB granularity); 5 MiB of B take
	 * two strides: (40 - 8) / 4 = 8 slots */
	struct tier_gpu_config cfg = { .backend = "vmm", .capacity = 40 * MIB, .slot_bytes = 3 * MIB,
				       .resident_bytes = 5 * MIB, .cu = fk_reset() };
	struct moe_error err = { "" };
	struct tier_gpu *g;
	cr_assert_eq(tier_gpu_create(&cfg, &g, &err), 0, "%s", err.msg);
	cr_assert_eq(tier_gpu_slot_stride(g), 4 * MIB);
	cr_assert_eq(tier_gpu_resident_bytes(g), 8 * MIB);
	cr_assert_eq(tier_gpu_nslots(g), 8);
	cr_assert_eq(tier_gpu_resident_offset(g), 32 * MIB);
	cr_assert_eq(fk.live_chunks, 0, "chunks are made on the first write");

	uint8_t *b = malloc(5 * MIB);
	for (size_t i = 0; i < 5 * MIB; i++)
		b[i] = (uint8_t)(i * 2654435761u >> 13);
	cr_assert_eq(tier_gpu_resident_write(g, 0, b, 5 * MIB, &err), 0, "%s", err.msg);
	cr_assert_eq(fk.live_chunks, 2);
	cr_assert_eq(fk.live_maps, 2);
	/* B spans both chunks: compare each part */
	const uint64_t a = tier_gpu_resident_addr(g);
	cr_assert_eq(memcmp(fk_resolve(a, 4 * MIB), b, 4 * MIB), 0);
	cr_assert_eq(memcmp(fk_resolve(a + 4 * MIB, MIB), b + 4 * MIB, MIB), 0);
	/* a second write maps nothing new; out of range is refused */
	cr_assert_eq(tier_gpu_resident_write(g, 6 * MIB, b, 100, &err), 0, "%s", err.msg);
	cr_assert_eq(fk.live_chunks, 2);
	cr_assert_eq(tier_gpu_resident_write(g, 8 * MIB - 10, b, 11, &err), -EINVAL);

	/* a slot's copy lands in its own chunk */
	uint64_t tok;
	cr_assert_eq(tier_gpu_copy_in(g, 7, b, 3 * MIB, &tok, &err), 0, "%s", err.msg);
	cr_assert_eq(tier_gpu_wait(g, tok, 5000), 1);
	cr_assert_eq(fk.live_chunks, 3);
	cr_assert_eq(memcmp(fk_resolve(a, 4 * MIB), b, 4 * MIB), 0, "the last slot's copy reached B");

	/* export: the 8 slots' handles, then B's 2 chunks, all stride-sized */
	struct tier_gpu_export e;
	cr_assert_eq(tier_gpu_export(g, &e, &err), 0, "%s", err.msg);
	cr_assert_eq(e.nfds, 10);
	cr_assert_eq(e.chunk_bytes, 4 * MIB);
	cr_assert_eq(e.fds[0], -1);
	cr_assert_geq(e.fds[7], 0);
	cr_assert_geq(e.fds[8], 0);
	cr_assert_geq(e.fds[9], 0);
	cr_assert_eq(e.offsets[8], 32 * MIB);
	cr_assert_eq(e.offsets[9], 36 * MIB);
	tier_gpu_export_free(&e);
	tier_gpu_destroy(g);
	cr_assert_eq(fk.live_chunks, 0);
	cr_assert_eq(fk.live_maps, 0);
	cr_assert_eq(fk.live_reserves, 0);

	/* out of device memory at the second chunk: nothing is left behind */
	cfg.cu = fk_reset();
	fk.max_chunks = 1;
	cr_assert_eq(tier_gpu_create(&cfg, &g, &err), 0, "%s", err.msg);
	cr_assert_eq(tier_gpu_resident_write(g, 0, b, 5 * MIB, &err), -ENOMEM);
	cr_assert_eq(fk.live_chunks, 0);
	cr_assert_eq(fk.live_maps, 0);
	tier_gpu_destroy(g);
	cr_assert_eq(fk.live_reserves, 0);

	/* B and one slot do not fit */
	cfg.cu = fk_reset();
	cfg.capacity = 11 * MIB;
	cr_assert_eq(tier_gpu_create(&cfg, &g, &err), -ENOSPC);
	cr_assert_eq(fk.live_reserves, 0);
	free(b);
}

Test(resident, uvm_in_the_managed_range, .timeout = 20)
{
	/* 2 MiB blocks: 5 MiB of B take 6 MiB; (40 - 6) / 4 = 8 slots */
	struct tier_gpu_config cfg = { .backend = "uvm", .capacity = 40 * MIB, .slot_bytes = 3 * MIB,
				       .resident_bytes = 5 * MIB, .cu = fk_reset() };
	struct moe_error err = { "" };
	struct tier_gpu *g;
	cr_assert_eq(tier_gpu_create(&cfg, &g, &err), 0, "%s", err.msg);
	cr_assert_eq(tier_gpu_resident_bytes(g), 6 * MIB);
	cr_assert_eq(tier_gpu_nslots(g), 8);
	cr_assert_eq(fk.managed_len, 8 * 4 * MIB + 6 * MIB);
	uint8_t *b = malloc(5 * MIB);
	for (size_t i = 0; i < 5 * MIB; i++)
		b[i] = (uint8_t)(i * 7 + 1);
	cr_assert_eq(tier_gpu_resident_write(g, 0, b, 5 * MIB, &err), 0, "%s", err.msg);
	cr_assert_geq(fk.prefetches, 1, "the region goes to the device before the copy");
	cr_assert_eq(memcmp(fk.managed + 32 * MIB, b, 5 * MIB), 0);
	tier_gpu_destroy(g);
	cr_assert_null(fk.managed);
	free(b);
}
#endif

/* ---- the daemon ------------------------------------------------------------ */

struct env {
	char *dir;
	char dense[512], latent[512];
	char sock[512], log[512];
	pid_t pid;
};

static struct env E;

static void make_packs(void)
{
	E.dir = tu_mkdtemp("molae-gpu");
	cr_assert_eq(chmod(E.dir, 0755), 0);
	snprintf(E.dense, sizeof(E.dense), "%s/d.moepack", E.dir);
	snprintf(E.latent, sizeof(E.latent), "%s/l.moepack", E.dir);
	snprintf(E.sock, sizeof(E.sock), "%s/run/s.sock", E.dir);
	snprintf(E.log, sizeof(E.log), "%s/moetierd.log", E.dir);
	char run[600], gen[4096], packer[4096];
	snprintf(run, sizeof(run), "%s/run", E.dir);
	cr_assert_eq(mkdir(run, 0755), 0);
	snprintf(gen, sizeof(gen), "%s", tu_build_path("tools/moe-gen"));
	snprintf(packer, sizeof(packer), "%s", tu_build_path("tools/moe-pack"));
	if (tu_sh("%s molae --help 2>&1 | grep -q 'not built'", packer) == 0)
		cr_skip_test("moe-pack built without LAPACKE: no latent packs");
	cr_assert_eq(tu_sh("%s model --family qwen3_moe --preset tiny-lm --format gguf --dtype f32 --out %s/src >/dev/null",
			   gen, E.dir), 0);
	cr_assert_eq(tu_sh("%s convert %s/src/model.gguf -o %s -q", packer, E.dir, E.dense), 0);
	cr_assert_eq(tu_sh("%s molae --rank 32 --group-size 4 %s -o %s -q >/dev/null", packer, E.dense, E.latent), 0);
}

static void setup(void) { make_packs(); }

static void stop_daemon(void)
{
	if (E.pid > 0) {
		int st = probe_stop(E.pid);
		cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "moetierd exited with status %#x", st);
	}
	E.pid = 0;
}

static void teardown(void)
{
	stop_daemon();
	if (E.dir)
		tu_rmtree(E.dir);
	E.dir = NULL;
}

/* gpu_bytes NULL: no GPU tier. backend: "emulated" unless given. */
static void start_daemon_on(const char *pack, const char *gpu_bytes, const char *backend)
{
	unlink(E.log);
	pid_t p = fork();
	cr_assert(p >= 0);
	if (p == 0) {
		char so[600], gb[64], be[64];
		snprintf(be, sizeof(be), "--gpu-backend=%s", backend);
		snprintf(so, sizeof(so), "--socket=%s", E.sock);
		snprintf(gb, sizeof(gb), "--gpu-bytes=%s", gpu_bytes ? gpu_bytes : "");
		int fd = open(E.log, O_WRONLY | O_CREAT | O_APPEND, 0644);
		if (fd >= 0) {
			dup2(fd, 2);
			close(fd);
		}
		char *argv[16];
		unsigned n = 0;
		argv[n++] = "moetierd";
		argv[n++] = "--foreground";
		argv[n++] = "--config=";
		argv[n++] = so;
		argv[n++] = "--host-bytes=2M";
		argv[n++] = "--socket-group=";
		argv[n++] = "--log-level=info";
		if (gpu_bytes) {
			argv[n++] = be;
			argv[n++] = gb;
		}
		argv[n++] = (char *)pack;
		argv[n] = NULL;
		execv(tu_build_path("moetierd"), argv);
		_exit(127);
	}
	E.pid = p;
	probe_wait_up(p, E.sock, E.log);
}

static void start_daemon(const char *pack, const char *gpu_bytes)
{
	start_daemon_on(pack, gpu_bytes, "emulated");
}

static moet_ctx *attach(void)
{
	moet_ctx *c = NULL;
	struct moet_connect_opts o = { sizeof(o), E.sock, NULL, "molae-gpu", MOET_CAP_RING | MOET_CAP_HOST_ARENA, 0, 20 };
	int rc = moet_connect(&o, &c);
	cr_assert_eq(rc, 0, "connect: %s (%s)", moet_strerror(rc), moet_last_error(NULL));
	return c;
}

/* The pack's B_gate then B_up of (MoE layer l, group g), or NULL when the
 * pack has no such group. *bytes = both. */
static float *pack_b(struct pack_file *pf, uint32_t l, uint32_t g, uint64_t *bytes)
{
	char name[64];
	struct moe_error err = { "" };
	const uint32_t layer = moe_model_layer_of(pf->model, l);
	snprintf(name, sizeof(name), "blk.%u.molae_b_gate.%u", layer, g);
	const struct pack_tensor_entry *tg = pack_find_tensor(pf, name);
	snprintf(name, sizeof(name), "blk.%u.molae_b_up.%u", layer, g);
	const struct pack_tensor_entry *tu = pack_find_tensor(pf, name);
	if (!tg || !tu)
		return NULL;
	cr_assert_eq(tg->bytes, tu->bytes);
	uint8_t *b = malloc(tg->bytes * 2);
	cr_assert_eq(pack_read_tensor(pf, tg, b, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_read_tensor(pf, tu, b + tg->bytes, &err), 0, "%s", err.msg);
	*bytes = tg->bytes * 2;
	return (float *)b;
}

static json_t *stats_json(moet_ctx *c, json_t **model)
{
	char *txt = NULL;
	cr_assert_eq(moet_stats(c, MOET_STATS_JSON, &txt), 0, "stats: %s", moet_last_error(c));
	json_error_t je;
	json_t *root = json_loads(txt, 0, &je);
	free(txt);
	cr_assert(root, "stats JSON: %s", je.text);
	const char *k;
	json_t *v;
	*model = NULL;
	json_object_foreach(json_object_get(root, "models"), k, v) *model = v;
	cr_assert(*model);
	return root;
}

/* Every (layer, group) through moet_latent_basis against the pack; with the
 * GPU tier also the bytes at the offset, read through the HELLO mapping
 * (moet_slot_ptr) and through the moet_gpu_export memfd. Returns the sum of
 * `bytes` (the B image). */
static uint64_t check_every_basis(moet_ctx *c, struct pack_file *pf, unsigned want_tier, unsigned *n_groups)
{
	struct moet_model_info mi = { .size = sizeof(mi) };
	cr_assert_eq(moet_model_info(c, &mi), 0);
	const uint8_t *exp = NULL;
	uint64_t exp_len = 0;
	if (want_tier == MOET_TIER_GPU) {
		struct moet_gpu_export x;
		int fd = -1;
		uint64_t off = 0;
		int n = moet_gpu_export(c, 0, &x, &fd, &off, 1);
		cr_assert_eq(n, 1, "gpu export: %s", moet_strerror(n));
		cr_assert_eq(x.backend, MOET_GPU_EMULATED);
		cr_assert_eq(off, 0);
		exp_len = x.chunk_bytes;
		exp = mmap(NULL, exp_len, PROT_READ, MAP_SHARED, fd, 0);
		cr_assert_neq(exp, MAP_FAILED);
		close(fd);
	}
	const uint8_t *gpu0 = want_tier == MOET_TIER_GPU ? moet_slot_ptr(c, MOET_TIER_GPU, 0) : NULL;
	uint64_t total = 0;
	*n_groups = 0;
	for (uint32_t l = 0; l < mi.n_moe_layers; l++) {
		uint32_t g = 0;
		for (;; g++) {
			struct moet_latent_basis lb = { .size = sizeof(lb) };
			int rc = moet_latent_basis(c, l, g, &lb);
			uint64_t pb = 0;
			float *ref = pack_b(pf, l, g, &pb);
			if (rc == -ERANGE) {
				cr_assert_null(ref, "layer %u group %u is in the pack but out of range", l, g);
				break;
			}
			cr_assert_eq(rc, 0, "layer %u group %u: %s (%s)", l, g, moet_strerror(rc), moet_last_error(c));
			cr_assert_not_null(ref, "layer %u group %u answered but not in the pack", l, g);
			cr_assert_eq(lb.size, sizeof(lb));
			cr_assert_eq(lb.tier, want_tier, "layer %u group %u: tier %u", l, g, lb.tier);
			cr_assert_eq(lb.dtype, MOE_DTYPE_F32);
			cr_assert_eq(lb.rows, 32);
			cr_assert_eq(lb.cols, mi.hidden);
			cr_assert_eq(lb.bytes, pb);
			cr_assert_eq(lb.bytes, 2ull * lb.rows * lb.cols * sizeof(float));
			if (want_tier == MOET_TIER_GPU) {
				cr_assert_geq(lb.offset, (uint64_t)mi.n_slots[MOET_TIER_GPU] * mi.slot_bytes[MOET_TIER_GPU],
					      "B overlaps the expert slots");
				cr_assert_leq(lb.offset + lb.bytes, exp_len);
				cr_assert_eq(memcmp(exp + lb.offset, ref, pb), 0, "layer %u group %u: export bytes differ", l, g);
				cr_assert_not_null(gpu0);
				cr_assert_eq(memcmp(gpu0 + lb.offset, ref, pb), 0, "layer %u group %u: HELLO map differs", l, g);
			} else {
				cr_assert_eq(lb.offset, 0);
			}
			total += lb.bytes;
			free(ref);
		}
		cr_assert_gt(g, 0, "layer %u has no group", l);
		*n_groups += g;
	}
	if (exp)
		munmap((void *)exp, exp_len);
	return total;
}

static const uint64_t GPU_BYTES = 1u << 20;

TestSuite(molae_gpu, .init = setup, .fini = teardown, .timeout = 120);

Test(molae_gpu, b_in_the_gpu_tier_bit_for_bit_and_slots_shrink)
{
	struct moe_error err = { "" };
	struct pack_file *pf;
	cr_assert_eq(pack_open(E.latent, PACK_OPEN_NO_DIRECT, &pf, &err), 0, "%s", err.msg);
	start_daemon(E.latent, "1M");
	moet_ctx *c = attach();
	struct moet_model_info mi = { .size = sizeof(mi) };
	cr_assert_eq(moet_model_info(c, &mi), 0);
	unsigned groups;
	const uint64_t total = check_every_basis(c, pf, MOET_TIER_GPU, &groups);
	cr_assert_eq(groups, mi.n_moe_layers * 4, "group size 4 of 16 experts: 4 groups per layer");

	/* the arithmetic: the slots are what the page-rounded B leaves */
	const uint64_t stride = mi.slot_bytes[MOET_TIER_GPU];
	cr_assert_eq(stride, ALIGN_PAGE(mi.expert_bytes));
	cr_assert_eq(mi.n_slots[MOET_TIER_GPU], (GPU_BYTES - ALIGN_PAGE(total)) / stride, "slots %u, B %llu, stride %llu",
		     mi.n_slots[MOET_TIER_GPU], (unsigned long long)total, (unsigned long long)stride);
	cr_assert_lt(mi.n_slots[MOET_TIER_GPU], GPU_BYTES / stride);

	/* moectl stats (JSON) say the same */
	json_t *model, *root = stats_json(c, &model);
	json_t *lb = json_object_get(model, "latent_basis");
	cr_assert(json_is_object(lb), "no latent_basis in the stats");
	cr_assert_str_eq(json_string_value(json_object_get(lb, "tier")), "gpu");
	cr_assert_eq(json_integer_value(json_object_get(lb, "gpu_bytes")), (json_int_t)total);
	cr_assert_eq(json_integer_value(json_object_get(lb, "gpu_reserved_bytes")), (json_int_t)ALIGN_PAGE(total));
	cr_assert_eq(json_integer_value(json_object_get(lb, "gpu_expert_slots")), (json_int_t)mi.n_slots[MOET_TIER_GPU]);
	json_decref(root);

	/* cycle every expert through the GPU slots (evictions): B stays put */
	for (int round = 0; round < 2; round++)
		for (uint32_t l = 0; l < mi.n_moe_layers; l++)
			for (uint32_t e = 0; e < mi.n_experts; e++) {
				int32_t slot;
				uint8_t tier;
				moet_lease lease = 0;
				int rc = moet_acquire(c, l, &e, 1, MOET_F_WANT_GPU, &slot, &tier, &lease);
				cr_assert_geq(rc, 0, "acquire: %s", moet_strerror(rc));
				if (lease)
					moet_release(c, lease);
			}
	char *txt = NULL;
	cr_assert_eq(moet_stats(c, MOET_STATS_TEXT, &txt), 0);
	cr_assert(strstr(txt, "latent basis (MoLAE B): gpu tier"), "%s", txt);
	long loads = 0;
	const char *p = strstr(txt, "cache_loads_gpu");
	cr_assert(p && sscanf(p, "cache_loads_gpu %ld", &loads) == 1 && loads > mi.n_slots[MOET_TIER_GPU],
		  "the GPU tier did not cycle (%ld loads)", loads);
	free(txt);
	unsigned groups2;
	cr_assert_eq(check_every_basis(c, pf, MOET_TIER_GPU, &groups2), total);

	/* hostile requests */
	struct moet_latent_basis b = { .size = sizeof(b) };
	cr_assert_eq(moet_latent_basis(c, mi.n_moe_layers, 0, &b), -ERANGE);
	cr_assert_eq(moet_latent_basis(c, UINT32_MAX, 0, &b), -ERANGE);
	cr_assert_eq(moet_latent_basis(c, 0, 4, &b), -ERANGE);
	cr_assert_eq(moet_latent_basis(c, 0, UINT32_MAX, &b), -ERANGE);
	cr_assert_eq(moet_latent_basis(c, 0, 0, NULL), -EINVAL);
	cr_assert_eq(moet_latent_basis(NULL, 0, 0, &b), -EINVAL);
	b.size = 8;
	cr_assert_eq(moet_latent_basis(c, 0, 0, &b), -EINVAL);
	/* raw messages: a short payload, nonzero reserved fields */
	int fd = moet_socket_fd(c);
	struct {
		struct moet_msg h;
		struct moet_latent_basis_req q;
	} m = { { MOET_MSG_MAGIC, MOET_PROTO_VERSION, MOET_MSG_LATENT_BASIS, 900, 0, 0, 4 }, { 0, 0, { 7, 0 } } };
	uint8_t rb[512];
	struct moet_msg rh;
	cr_assert_eq(send(fd, &m, sizeof(m.h) + 4, 0), (ssize_t)(sizeof(m.h) + 4));
	cr_assert_gt(recv(fd, rb, sizeof(rb), 0), (ssize_t)sizeof(rh));
	memcpy(&rh, rb, sizeof(rh));
	cr_assert_eq(rh.type, MOET_MSG_ERROR);
	cr_assert_eq(rh.status, -EPROTO);
	m.h.len = sizeof(m.q);
	m.h.seq = 901;
	cr_assert_eq(send(fd, &m, sizeof(m), 0), (ssize_t)sizeof(m));
	cr_assert_gt(recv(fd, rb, sizeof(rb), 0), (ssize_t)sizeof(rh));
	memcpy(&rh, rb, sizeof(rh));
	cr_assert_eq(rh.type, MOET_MSG_ERROR);
	cr_assert_eq(rh.status, -EINVAL);
	/* still serving */
	b.size = sizeof(b);
	cr_assert_eq(moet_latent_basis(c, 0, 0, &b), 0);
	/* the tools: moectl stats and moe-client basis say the same */
	char mc[4096], cl[4096];
	snprintf(mc, sizeof(mc), "%s", tu_build_path("moectl"));
	snprintf(cl, sizeof(cl), "%s", tu_build_path("moe-client"));
	cr_assert_eq(tu_sh("%s --socket %s stats | grep -Eq '^  latent_b_gpu_bytes +%llu$'", mc, E.sock,
			   (unsigned long long)total), 0, "moectl stats");
	cr_assert_eq(tu_sh("%s --socket %s basis | grep -c ' gpu  offset ' | grep -qx %u", cl, E.sock, groups), 0,
		     "moe-client basis");
	cr_assert_neq(tu_sh("%s --socket %s basis 0 99 2>/dev/null", cl, E.sock), 0, "moe-client basis out of range");
	moet_close(c);
	pack_close(pf);
	stop_daemon();
	cr_assert_eq(tu_sh("grep -q 'B 384.0 KiB resident in the GPU tier' %s", E.log), 0, "no load line in the log");
}

/* COMPUTE y for every layer (T tokens, top-2). */
static float *compute_all(moet_ctx *c, const struct moet_model_info *mi)
{
	enum { T = 3, K = 2 };
	const uint32_t n = mi->hidden, E_ = mi->n_experts;
	uint32_t experts[T * K] = { 0, 1 % E_, 2 % E_, 5 % E_, 1 % E_, (E_ - 1) % E_ };
	float w[T * K] = { 0.75f, 0.25f, 0.5f, 0.5f, 0.9f, 0.1f };
	float *x = calloc((size_t)T * n, 4), *y = calloc((size_t)mi->n_moe_layers * T * n, 4);
	for (uint32_t i = 0; i < T * n; i++)
		x[i] = (float)((i * 37 % 23) - 11) / 16.0f;
	for (uint32_t l = 0; l < mi->n_moe_layers; l++) {
		float *yl = y + (size_t)l * T * n;
		int rc = moet_compute(c, l, T, K, experts, w, x, yl);
		for (int i = 0; i < 400 && rc == -EAGAIN; i++) {
			moet_wait_ready(c, l, 50);
			rc = moet_compute(c, l, T, K, experts, w, x, yl);
		}
		cr_assert_eq(rc, T, "compute layer %u: %s", l, moet_strerror(rc));
	}
	free(x);
	return y;
}

Test(molae_gpu, compute_unchanged_and_host_without_gpu_tier)
{
	struct moe_error err = { "" };
	struct pack_file *pf;
	cr_assert_eq(pack_open(E.latent, PACK_OPEN_NO_DIRECT, &pf, &err), 0, "%s", err.msg);
	start_daemon(E.latent, "1M");
	moet_ctx *c = attach();
	struct moet_model_info mi = { .size = sizeof(mi) };
	cr_assert_eq(moet_model_info(c, &mi), 0);
	cr_assert(mi.caps & MOET_CAP_COMPUTE);
	float *yg = compute_all(c, &mi);
	moet_close(c);
	stop_daemon();

	start_daemon(E.latent, NULL);
	c = attach();
	struct moet_model_info mh = { .size = sizeof(mh) };
	cr_assert_eq(moet_model_info(c, &mh), 0);
	cr_assert_eq(mh.n_slots[MOET_TIER_GPU], 0);
	unsigned groups;
	const uint64_t total = check_every_basis(c, pf, MOET_TIER_HOST, &groups);
	cr_assert_gt(total, 0);
	float *yh = compute_all(c, &mh);
	const size_t ny = (size_t)mi.n_moe_layers * 3 * mi.hidden;
	cr_assert_eq(memcmp(yg, yh, ny * sizeof(float)), 0, "COMPUTE differs with and without the GPU tier");
	json_t *model, *root = stats_json(c, &model);
	json_t *lb = json_object_get(model, "latent_basis");
	cr_assert_str_eq(json_string_value(json_object_get(lb, "tier")), "host");
	cr_assert_eq(json_integer_value(json_object_get(lb, "gpu_bytes")), 0);
	cr_assert_eq(json_integer_value(json_object_get(lb, "bytes")), (json_int_t)total);
	json_decref(root);
	free(yg);
	free(yh);
	moet_close(c);
	pack_close(pf);
}

Test(molae_gpu, arena_too_small_keeps_b_on_the_host)
{
	struct moe_error err = { "" };
	struct pack_file *pf;
	cr_assert_eq(pack_open(E.latent, PACK_OPEN_NO_DIRECT, &pf, &err), 0, "%s", err.msg);
	/* 400 KiB: B (384 KiB) and one 48 KiB slot do not both fit */
	start_daemon(E.latent, "400K");
	moet_ctx *c = attach();
	struct moet_model_info mi = { .size = sizeof(mi) };
	cr_assert_eq(moet_model_info(c, &mi), 0);
	cr_assert_eq(mi.n_slots[MOET_TIER_GPU], (400u << 10) / mi.slot_bytes[MOET_TIER_GPU],
		     "the GPU tier keeps every slot: %u", mi.n_slots[MOET_TIER_GPU]);
	unsigned groups;
	check_every_basis(c, pf, MOET_TIER_HOST, &groups);
	char *txt = NULL;
	cr_assert_eq(moet_stats(c, MOET_STATS_TEXT, &txt), 0);
	cr_assert(strstr(txt, "latent basis (MoLAE B): host tier") && strstr(txt, "not in the GPU tier"), "%s", txt);
	free(txt);
	moet_close(c);
	pack_close(pf);
	cr_assert_eq(tu_sh("grep -c 'MoLAE B (384.0 KiB) stays on the host, not in the GPU tier: .*resident' %s | grep -qx 1",
			   E.log), 0, "no single clear log line");
}

Test(molae_gpu, dense_pack_has_no_basis)
{
	start_daemon(E.dense, "1M");
	moet_ctx *c = attach();
	struct moet_latent_basis b = { .size = sizeof(b) };
	cr_assert_eq(moet_latent_basis(c, 0, 0, &b), -ENOENT);
	cr_assert(strstr(moet_last_error(c), "not a MoLAE latent pack"), "%s", moet_last_error(c));
	char *txt = NULL;
	cr_assert_eq(moet_stats(c, MOET_STATS_TEXT, &txt), 0);
	cr_assert_null(strstr(txt, "latent basis"), "a dense pack shows no latent basis");
	free(txt);
	moet_close(c);
}

/* The real vmm backend of moetierd on tests/fake_libcuda.c (a stand-in
 * libcuda.so.1: VMM chunks are memfds, 64 KiB granularity): B is written
 * into whole-stride chunks after the slots, exported after the slots'
 * handles, and a client that maps those handles reads the pack's B at the
 * offsets moet_latent_basis gives. */
Test(molae_gpu, vmm_backend_on_a_stand_in_driver)
{
	char libcuda[4096];
	snprintf(libcuda, sizeof(libcuda), "%s", tu_build_path("tests/.libs/libfakecuda.so"));
	if (access(libcuda, R_OK))
		cr_skip_test("no %s (a build without cuda.h, or not built yet: make tests/libfakecuda.la)", libcuda);
	cr_assert_eq(setenv("MOETIER_LIBCUDA", libcuda, 1), 0);
	struct moe_error err = { "" };
	struct pack_file *pf;
	cr_assert_eq(pack_open(E.latent, PACK_OPEN_NO_DIRECT, &pf, &err), 0, "%s", err.msg);
	start_daemon_on(E.latent, "1M", "vmm");
	unsetenv("MOETIER_LIBCUDA");
	moet_ctx *c = attach();
	struct moet_model_info mi = { .size = sizeof(mi) };
	cr_assert_eq(moet_model_info(c, &mi), 0);
	/* 48 KiB experts in 64 KiB strides; 384 KiB of B = 6 strides */
	const uint64_t stride = 64u << 10, b_bytes = 384u << 10;
	cr_assert_eq(mi.slot_bytes[MOET_TIER_GPU], stride);
	cr_assert_eq(mi.n_slots[MOET_TIER_GPU], (GPU_BYTES - b_bytes) / stride, "%u slots", mi.n_slots[MOET_TIER_GPU]);

	/* three experts into GPU slots: their chunks exist, the other slots'
	 * do not (and are left out of the export) */
	for (uint32_t e = 0; e < 3; e++) {
		int32_t slot;
		uint8_t tier;
		moet_lease lease = 0;
		cr_assert_eq(moet_acquire(c, 0, &e, 1, MOET_F_WANT_GPU, &slot, &tier, &lease), 1);
		cr_assert_eq(tier, MOET_TIER_GPU);
		moet_release(c, lease);
	}
	/* every handle; map each chunk of the resident region */
	struct moet_gpu_export x;
	int fds[64];
	uint64_t offs[64];
	unsigned got = 0;
	do {
		int n = moet_gpu_export(c, got, &x, fds + got, offs + got, 64 - got);
		cr_assert_gt(n, 0, "gpu export from %u: %s (%s)", got, moet_strerror(n), moet_last_error(c));
		got += (unsigned)n;
	} while (got < x.total);
	cr_assert_eq(x.backend, MOET_GPU_VMM);
	cr_assert_eq(x.chunk_bytes, stride);
	const uint32_t ns = mi.n_slots[MOET_TIER_GPU];
	cr_assert_eq(x.total, 3 + b_bytes / stride, "3 slot chunks and B's 6: %u handles", x.total);
	const uint64_t span = (uint64_t)ns * stride + b_bytes;
	uint8_t *region = calloc(1, span);
	unsigned resident = 0;
	for (unsigned i = 0; i < x.total; i++) {
		cr_assert_geq(fds[i], 0);
		cr_assert_eq(offs[i] % stride, 0);
		cr_assert_lt(offs[i], span);
		if (offs[i] < (uint64_t)ns * stride)
			continue;
		const void *m = mmap(NULL, stride, PROT_READ, MAP_SHARED, fds[i], 0);
		cr_assert_neq(m, MAP_FAILED);
		memcpy(region + offs[i], m, stride);
		munmap((void *)m, stride);
		resident++;
	}
	cr_assert_eq(resident, b_bytes / stride);
	for (unsigned i = 0; i < got; i++)
		if (fds[i] >= 0)
			close(fds[i]);
	unsigned checked = 0;
	for (uint32_t l = 0; l < mi.n_moe_layers; l++)
		for (uint32_t g = 0; g < 4; g++) {
			struct moet_latent_basis lb = { .size = sizeof(lb) };
			cr_assert_eq(moet_latent_basis(c, l, g, &lb), 0, "%s", moet_last_error(c));
			cr_assert_eq(lb.tier, MOET_TIER_GPU);
			cr_assert_geq(lb.offset, (uint64_t)ns * stride);
			cr_assert_leq(lb.offset + lb.bytes, span);
			uint64_t pb;
			float *ref = pack_b(pf, l, g, &pb);
			cr_assert_not_null(ref);
			cr_assert_eq(memcmp(region + lb.offset, ref, pb), 0, "layer %u group %u differs through VMM", l, g);
			free(ref);
			checked++;
		}
	cr_assert_eq(checked, mi.n_moe_layers * 4);
	free(region);
	moet_close(c);
	pack_close(pf);
	stop_daemon();
	cr_assert_eq(tu_sh("grep -q 'B 384.0 KiB resident in the GPU tier' %s", E.log), 0, "no load line in the log");
}
