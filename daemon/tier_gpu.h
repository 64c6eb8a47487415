/* tier_gpu.h - the GPU arena (tier 0): a fixed number of equal slots, each
 * holding one expert extent, filled from host slots by asynchronous copies.
 *
 * Three backends behind one ops table:
 *   vmm      CUDA virtual memory: one cuMemAddressReserve range per arena,
 *            slot i at a fixed device address, one physical chunk
 *            (cuMemCreate, POSIX-fd exportable) per slot, mapped on first fill.
 *   uvm      one cuMemAllocManaged range; cuMemAdvise_v2 + cuMemPrefetchAsync_v2
 *            move experts in and out.
 *   emulated a separate host region (a sealed memfd) with its own capacity;
 *            copies are memcpy done by a worker thread; every state
 *            transition and the completion path are the same as on a GPU.
 *
 * Slot states: EMPTY -> LOADING -> RESIDENT [-> READING -> RESIDENT] -> EMPTY.
 * A copy into a slot is started by tier_gpu_copy_in() and finishes only when
 * the caller observes it through tier_gpu_poll() or tier_gpu_reap(); the
 * event fd becomes readable when a copy may have finished, so the event loop
 * can sleep on it. An arena is driven by ONE thread (the event loop); the
 * backends' own threads (emulated worker, CUDA host callbacks) only touch
 * completion flags and the event fd.
 *
 * Errors are negative errno values; a struct moe_error says why. */
#ifndef MOETIER_TIER_GPU_H
#define MOETIER_TIER_GPU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util.h"

struct cu_api;  /* cuda_api.h: the dlopen'd driver table (or a fake in tests) */
struct tier_gpu;

enum tier_gpu_backend {
	TIER_GPU_NONE = 0,  /* no GPU tier */
	TIER_GPU_EMULATED,
	TIER_GPU_UVM,
	TIER_GPU_VMM,
};

enum tier_gpu_slot_state {
	TIER_GPU_SLOT_EMPTY = 0,
	TIER_GPU_SLOT_LOADING,   /* host -> GPU copy in flight */
	TIER_GPU_SLOT_RESIDENT,  /* payload valid at tier_gpu_slot_addr() */
	TIER_GPU_SLOT_READING,   /* GPU -> host copy in flight; payload stays valid */
};

struct tier_gpu_config {
	const char *backend;    /* "auto" | "vmm" | "uvm" | "emulated" | "none"; NULL = "auto" */
	uint64_t capacity;      /* bytes of GPU memory the arena may use */
	uint64_t slot_bytes;    /* one expert extent (the largest in the model) */
	int device;             /* CUDA device ordinal (ignored by emulated) */
	/* Driver table to use; NULL = load libcuda.so.1 at run time
	 * (cu_api_load). Tests pass a fake table here. */
	const struct cu_api *cu;
	/* emulated: number of copy worker threads (0 = 1). */
	unsigned emu_workers;
	/* Bytes kept resident for the arena's life outside every slot (a
	 * MoLAE pack's B matrices): a region right after the last slot, never
	 * evicted, written once with tier_gpu_resident_write(). It takes
	 * round_up(resident_bytes, g) from the capacity before the slots are
	 * counted, g = the page size (emulated), 2 MiB (uvm) or one slot
	 * stride (vmm: every exported chunk then has the same size). 0 = none. */
	uint64_t resident_bytes;
};

/* Counters, declared once. X(name, help) */
#define TIER_GPU_STATS(X) \
	X(copies_in, "host->GPU copies completed") \
	X(copies_out, "GPU->host copies completed") \
	X(bytes_in, "bytes copied host->GPU") \
	X(bytes_out, "bytes copied GPU->host") \
	X(copy_ns, "sum of submit-to-observed-completion time, ns") \
	X(copy_errors, "copies that failed (submit or completion)") \
	X(evictions, "slots evicted") \
	X(chunks_created, "physical chunks created (vmm)") \
	X(chunks_released, "physical chunks released (vmm)") \
	X(oom, "allocation failures (cuMemCreate / managed / region)") \
	X(unpinned_copies, "copies whose host side was not in the registered arena")

struct tier_gpu_stats {
#define TIER_GPU_STAT_FIELD(name, help) uint64_t name;
	TIER_GPU_STATS(TIER_GPU_STAT_FIELD)
#undef TIER_GPU_STAT_FIELD
};

/* A finished copy, as reported by tier_gpu_reap(). */
struct tier_gpu_done {
	uint64_t token;
	uint32_t slot;
	bool to_host;  /* true for a copy-out */
	int rc;        /* 0, or the negative errno the copy failed with */
};

/* What a client needs to map the arena read-only in its own address space.
 * Filled by tier_gpu_export(); the fds belong to the caller (pass them with
 * SCM_RIGHTS, then tier_gpu_export_free()).
 *   emulated: nfds = 1, a read-only open of the region's memfd (sealed
 *             against shrink and grow; a writable mapping is refused),
 *             covering all slots and the resident region; slot i is at
 *             offset i * slot_stride.
 *   vmm:      nfds = nslots + resident chunks; fds[i] is the POSIX fd of
 *             slot i's physical chunk (chunk_bytes long), -1 where slot i
 *             has no chunk yet; the resident region's chunks (each
 *             chunk_bytes = slot_stride long) follow at offsets
 *             nslots * slot_stride and up.
 *             The client imports it with cuMemImportFromShareableHandle and
 *             maps it at its own reserve + offsets[i].
 *   uvm:      not exportable (-EOPNOTSUPP). */
struct tier_gpu_export {
	enum tier_gpu_backend backend;
	uint32_t nslots;
	uint64_t slot_bytes;   /* payload bytes per slot (as configured) */
	uint64_t slot_stride;  /* distance between slots (rounded to granularity) */
	uint64_t chunk_bytes;  /* bytes behind each fd */
	uint64_t generation;   /* bumps whenever a chunk is released or created */
	int device;
	uint32_t nfds;
	int *fds;
	uint64_t *offsets;     /* offset of fds[i] inside the arena */
};

/* Names and parsing. */
const char *tier_gpu_backend_name(enum tier_gpu_backend b);
int tier_gpu_backend_parse(const char *s, enum tier_gpu_backend *out, bool *is_auto);
const char *tier_gpu_slot_state_name(enum tier_gpu_slot_state s);

/* Creates an arena. With "auto": vmm when the driver loads and the device
 * supports VMM + POSIX fds, else uvm when managed memory works, else emulated
 * (logs which and why). "vmm"/"uvm" fail with -ENODEV when no GPU is usable
 * and -ENOTSUP when this build has no cuda.h. "none" fails with -ENODEV
 * (the caller runs without a GPU tier). The number of slots is
 * (capacity - resident region) / slot_stride; -EINVAL when that is 0
 * without a resident region, -ENOSPC when the resident region leaves no
 * slot (the caller may retry without it). */
int tier_gpu_create(const struct tier_gpu_config *cfg, struct tier_gpu **out,
		    struct moe_error *err);
/* Waits for copies in flight, unmaps and frees everything. NULL is fine. */
void tier_gpu_destroy(struct tier_gpu *g);

enum tier_gpu_backend tier_gpu_backend_of(const struct tier_gpu *g);
uint32_t tier_gpu_nslots(const struct tier_gpu *g);
uint64_t tier_gpu_slot_bytes(const struct tier_gpu *g);
uint64_t tier_gpu_slot_stride(const struct tier_gpu *g);
enum tier_gpu_slot_state tier_gpu_slot_state(const struct tier_gpu *g, uint32_t slot);
/* Device address of slot i: fixed for the arena's lifetime (vmm: inside the
 * reserved range; uvm: managed pointer; emulated: pointer into the region).
 * 0 for a bad slot. */
uint64_t tier_gpu_slot_addr(const struct tier_gpu *g, uint32_t slot);

/* The resident region (config resident_bytes): its offset from slot 0
 * (= nslots * slot_stride: the first byte after the last slot, inside what
 * tier_gpu_export hands out), its length (rounded; 0 without one), and its
 * device address (emulated: a pointer into the region). */
uint64_t tier_gpu_resident_offset(const struct tier_gpu *g);
uint64_t tier_gpu_resident_bytes(const struct tier_gpu *g);
uint64_t tier_gpu_resident_addr(const struct tier_gpu *g);
/* Copies bytes from src to offset off of the resident region and waits for
 * the copy (host -> device; the storage is created on the first write, so
 * this is where the device can run out of memory: -ENOMEM). Driven by the
 * arena's one thread like every other call. -EINVAL for a range outside the
 * region, -ENOSPC when the arena has none. */
int tier_gpu_resident_write(struct tier_gpu *g, uint64_t off, const void *src, size_t bytes,
			    struct moe_error *err);

/* Registers (pins) the host arena so copies from it are true async DMA
 * (cuMemHostRegister). One range per arena; emulated records it only.
 * Call before the first copy; unregister before the host arena is freed. */
int tier_gpu_register_host(struct tier_gpu *g, void *base, size_t len, struct moe_error *err);
void tier_gpu_unregister_host(struct tier_gpu *g);

/* Starts copying bytes (<= slot_bytes) from src into slot (must be EMPTY);
 * the slot becomes LOADING. *token identifies the copy. -EBUSY if the slot
 * is not EMPTY, -ENOMEM when no physical memory could be had (vmm), -EINVAL
 * for a bad slot/size. On failure the slot stays EMPTY. */
int tier_gpu_copy_in(struct tier_gpu *g, uint32_t slot, const void *src, size_t bytes,
		     uint64_t *token, struct moe_error *err);
/* Starts copying bytes from a RESIDENT slot into dst; slot becomes READING. */
int tier_gpu_copy_out(struct tier_gpu *g, uint32_t slot, void *dst, size_t bytes,
		      uint64_t *token, struct moe_error *err);

/* 1 when the copy finished (and the slot moved on: LOADING -> RESIDENT,
 * READING -> RESIDENT), 0 while in flight, a negative errno when it failed
 * (a failed copy-in leaves the slot EMPTY), -ESTALE for a token that is not
 * the slot's latest copy. Repeated polls of a finished token return 1 until
 * the slot is used again. A completion observed here is not reported again
 * by tier_gpu_reap(). */
int tier_gpu_poll(struct tier_gpu *g, uint64_t token);
/* Finishes every copy that completed and reports up to max of them; returns
 * the count. Also drains the event fd. */
int tier_gpu_reap(struct tier_gpu *g, struct tier_gpu_done *out, unsigned max);
/* Blocks until the copy finishes (or timeout_ms, -1 = forever): the result of
 * tier_gpu_poll(), or -ETIMEDOUT. For tests, tools and shutdown. */
int tier_gpu_wait(struct tier_gpu *g, uint64_t token, int timeout_ms);
/* An eventfd (nonblocking) that is readable once a copy may have completed;
 * put it in the event loop and call tier_gpu_reap() when it fires. */
int tier_gpu_event_fd(const struct tier_gpu *g);
/* Number of copies submitted and not yet observed. */
unsigned tier_gpu_inflight(const struct tier_gpu *g);

/* Evicts a RESIDENT slot -> EMPTY (-EBUSY while a copy is in flight,
 * -ENOENT when EMPTY). vmm keeps the slot's physical chunk mapped so client
 * imports stay valid; release=true unmaps and releases the chunk (memory
 * goes back to the device, export generation bumps). uvm prefetches the
 * range back to host memory so it stops taking device memory. */
int tier_gpu_evict(struct tier_gpu *g, uint32_t slot, bool release);

/* Export for clients (see struct tier_gpu_export). */
int tier_gpu_export(struct tier_gpu *g, struct tier_gpu_export *out, struct moe_error *err);
void tier_gpu_export_free(struct tier_gpu_export *e);

void tier_gpu_get_stats(const struct tier_gpu *g, struct tier_gpu_stats *out);

#endif
