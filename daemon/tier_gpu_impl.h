/* tier_gpu_impl.h - private to tier_gpu*.c: the arena, its slots and the
 * backend ops table. The common code (tier_gpu.c) owns the state machine,
 * tokens, stats and the event fd; a backend only moves bytes and answers
 * "is copy N done". */
#ifndef MOETIER_TIER_GPU_IMPL_H
#define MOETIER_TIER_GPU_IMPL_H

#include <stdatomic.h>

#include "tier_gpu.h"

struct tier_gpu_slot {
	enum tier_gpu_slot_state state;
	uint64_t token;        /* latest copy on this slot; 0 = none */
	uint64_t submit_ns;
	uint64_t bytes;        /* payload bytes of the latest copy-in */
	uint64_t op_bytes;     /* bytes of the copy in flight */
	int result;            /* outcome of the latest finished copy */
	bool reported;         /* completion already observed by poll/reap */
	bool to_host;          /* the copy in flight is a copy-out */
	bool has_chunk;        /* vmm: physical chunk mapped at the slot */
	/* emulated: set by the worker (release) after the memcpy;
	 * 0 = pending, 1 = done. */
	atomic_int emu_done;
	uint64_t chunk;        /* vmm: CUmemGenericAllocationHandle */
	void *event;           /* cuda: CUevent recorded after the copy */
};

struct tier_gpu;

struct tier_gpu_ops {
	const char *name;
	/* Allocates the arena: sets g->stride, g->nslots, g->base. */
	int (*init)(struct tier_gpu *g, const struct tier_gpu_config *cfg, struct moe_error *err);
	/* Waits for the backend's work, frees everything. Safe after a
	 * partial init. */
	void (*fini)(struct tier_gpu *g);
	int (*register_host)(struct tier_gpu *g, void *base, size_t len, struct moe_error *err);
	/* <0 when the range is still registered (fini retries). */
	int (*unregister_host)(struct tier_gpu *g);
	/* Starts a copy on slot s (slot fields already set by the caller). */
	int (*copy_in)(struct tier_gpu *g, uint32_t s, const void *src, size_t bytes,
		       struct moe_error *err);
	int (*copy_out)(struct tier_gpu *g, uint32_t s, void *dst, size_t bytes,
			struct moe_error *err);
	/* 1 done, 0 in flight, <0 the copy failed. */
	int (*query)(struct tier_gpu *g, uint32_t s);
	/* Called on RESIDENT -> EMPTY. */
	int (*evict)(struct tier_gpu *g, uint32_t s, bool release);
	int (*export_)(struct tier_gpu *g, struct tier_gpu_export *out, struct moe_error *err);
	/* Synchronous copy into the resident region (range already checked);
	 * creates its storage on first use. */
	int (*resident_write)(struct tier_gpu *g, uint64_t off, const void *src, size_t bytes,
			      struct moe_error *err);
};

struct tier_gpu {
	const struct tier_gpu_ops *ops;
	enum tier_gpu_backend backend;
	int device;
	uint64_t slot_bytes;
	uint64_t stride;
	uint32_t nslots;
	uint64_t base;            /* device address of slot 0 */
	uint64_t res_len;         /* resident region after the slots (rounded), 0 = none */
	uint64_t generation;      /* export generation */
	struct tier_gpu_slot *slots;
	uint32_t *inflight;       /* slots with a copy not yet observed */
	uint32_t ninflight;
	int efd;                  /* eventfd: a copy may have completed */
	atomic_int efd_armed;     /* efd written and not drained since */
	void *host_base;          /* registered host arena */
	size_t host_len;
	struct tier_gpu_stats st;
	void *priv;               /* backend state */
};

/* Allocates g->slots and g->inflight for g->nslots; backends call it from
 * init once nslots is known. */
int tier_gpu_alloc_slots(struct tier_gpu *g);

/* Sets g->nslots from g->stride (already set), the capacity and the
 * resident region rounded to res_gran (a power of two, or the stride);
 * sets g->res_len. -EINVAL / -ENOSPC with a message. */
int tier_gpu_count_slots(struct tier_gpu *g, const struct tier_gpu_config *cfg, uint64_t res_gran,
			 struct moe_error *err);

/* Wakes the event loop (eventfd += 1). Async-signal and driver-callback
 * safe: only a write(2). */
void tier_gpu_notify(struct tier_gpu *g);

extern const struct tier_gpu_ops tier_gpu_emu_ops;
#ifdef HAVE_CUDA
extern const struct tier_gpu_ops tier_gpu_vmm_ops;
extern const struct tier_gpu_ops tier_gpu_uvm_ops;
#endif

#endif
