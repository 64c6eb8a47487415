/* cache.h - expert residency across the tiers GPU (0) <- host (1) <- NVMe (2).
 *
 * One cache serves one pack (one model). An expert is keyed by (MoE layer,
 * expert). For each (expert, tier) the cache keeps a residency state
 *
 *     ABSENT -> LOADING -> RESIDENT -> EVICTING -> ABSENT
 *
 * and every slot of the host arena and of the GPU arena carries a generation
 * that changes whenever the slot changes owner. A lease = (tier, slot,
 * generation): while a lease is held the slot is never evicted or
 * overwritten, and a lease whose generation no longer matches is refused
 * (-ESTALE), never served. Every NVMe load is checked against the pack's
 * CRC32C; a mismatch is counted, re-read once, then reported to the
 * requester as -EBADMSG and the slot is freed: a payload whose CRC failed is
 * never returned.
 *
 * Threading model: one internal I/O thread per cache owns the io_uring ring
 * (tier_nvme) and does the host -> GPU copies; all residency state is behind
 * one mutex. Every public function may be called from any thread, at the
 * same time. Nothing here blocks on I/O except cache_wait_idle():
 * cache_acquire() never waits. A miss starts (or joins) the load and comes
 * back -EAGAIN; the caller learns that a load or copy finished (successfully
 * or not) from on_ready or cache_eventfd() and retries its misses. That is
 * how the service waits for a blocking ACQUIRE: it parks the entry and
 * retries it until wait-timeout-ms (server_ring.c), and counts the wait in
 * this cache's stats (cache_stalls, acquire_wait_ns, cache_timeouts).
 *
 * Memory: the host arena is a memfd (MFD_ALLOW_SEALING) mapped MAP_SHARED,
 * pre-faulted at creation (the load path never takes a page fault), placed
 * with libnuma, and mlocked when allowed. The service hands the fd to
 * clients, who map it read-only and address experts by byte offset.
 */
#ifndef MOETIER_CACHE_H
#define MOETIER_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pack.h"
#include "stats.h"
#include "util.h"

struct cache;

enum cache_tier {
	CACHE_TIER_GPU = 0,
	CACHE_TIER_HOST = 1,
	CACHE_TIER_NVME = 2,
};
#define CACHE_N_MEM_TIERS 2 /* GPU and host hold slots; NVMe is the origin */

enum cache_residency {
	CACHE_ABSENT = 0,
	CACHE_LOADING = 1,
	CACHE_RESIDENT = 2,
	CACHE_EVICTING = 3,
};

enum cache_numa_mode {
	CACHE_NUMA_DEFAULT = 0,    /* no policy: the pre-faulting thread's node */
	CACHE_NUMA_BIND,           /* bind to numa_node */
	CACHE_NUMA_INTERLEAVE,     /* interleave over all allowed nodes */
};

struct cache_config {
	uint64_t host_bytes;      /* host arena; must hold >= 1 expert. Whole slots. */
	uint64_t gpu_bytes;       /* GPU arena; 0 = no GPU tier */
	const char *gpu_backend;  /* "emulated", "vmm", "uvm", "auto"; NULL = "emulated" */
	int gpu_device;           /* CUDA device ordinal */
	bool exclusive;           /* host tier exclusive of the GPU tier (default inclusive) */
	unsigned queue_depth;     /* NVMe reads in flight, 1..256; 0 = 8 */
	int io_nice;              /* nice of the I/O thread (0 = the daemon's own) */
	enum cache_numa_mode numa_mode;
	int numa_node;            /* with CACHE_NUMA_BIND */
	bool mlock_required;      /* fail creation when the arena cannot be locked
				   * (default: warn naming RLIMIT_MEMLOCK and go on) */
	bool huge_pages;          /* back the arena with MFD_HUGETLB when the pool
				   * has enough 2 MiB pages (falls back, logged) */
	bool no_uring;            /* force the pread fallback (tests, odd kernels) */
	bool no_register;         /* do not register the arena as fixed buffers */
	bool sqpoll;              /* IORING_SETUP_SQPOLL (off: it hurts on few cores) */
	const char *policy;       /* eviction policy name; NULL = "lru" */
	unsigned max_clients;     /* distinct client ids holding leases; 0 = 1024 */
	/* Optional: called from the I/O thread (no cache lock held) after each
	 * load or copy finishes: status 0, or a negative errno. Must not block. */
	void (*on_ready)(void *ctx, uint32_t layer, uint32_t expert, enum cache_tier tier, int status);
	void *on_ready_ctx;
	/* Host slots per MoE layer: each layer gets its own budget and its own
	 * policy group (moe-sim's default "C slots per layer"); the arena must
	 * hold n_layers * layer_slots slots. 0 = one budget for the arena. */
	uint32_t layer_slots;
	/* Data kept in the GPU arena for the cache's life, outside every
	 * expert slot (a MoLAE pack's B matrices): gpu_resident_bytes from
	 * gpu_resident are copied into a region after the last slot at
	 * creation, and the slots are counted from what is left (tier_gpu.h,
	 * resident_bytes). When the arena cannot hold it and one slot besides,
	 * or the copy fails, the cache is created without it (the GPU tier
	 * then has its full slot count) and gpu_resident_err, when not NULL,
	 * says why. Only read during cache_create. */
	const void *gpu_resident;
	uint64_t gpu_resident_bytes;
	struct moe_error *gpu_resident_err;
};

struct cache_key {
	uint32_t layer;  /* MoE layer index (0 .. n_moe_layers-1) */
	uint32_t expert; /* 0 .. n_experts-1 */
};

struct cache_lease {
	uint32_t slot;
	uint32_t generation;
	uint8_t tier;       /* enum cache_tier */
	uint8_t pad[3];
};

/* Where one acquired expert lives. */
struct cache_loc {
	int32_t status;     /* 0: served, lease held; -EAGAIN: miss, load started
			     * or joined; -ENOBUFS: no slot can be freed right now;
			     * -EBADMSG: CRC failed twice; -EIO: read failed (the
			     * expert is then bad: answered so without a read until a
			     * re-read after a backoff); -EINVAL: bad key */
	uint8_t tier;       /* enum cache_tier the lease is on (when status == 0) */
	uint8_t pad[3];
	uint32_t slot;
	uint64_t offset;    /* byte offset of the payload in that tier's arena */
	uint64_t length;    /* payload bytes (pack extent_payload) */
	struct cache_lease lease;
};

enum cache_acquire_flags {
	/* Every acquire returns at once: misses come back -EAGAIN with their
	 * loads started (the service parks and retries; bit 0 is free). */
	CACHE_WANT_GPU = 1 << 1, /* serve from the GPU tier (promote host -> GPU);
				  * without a GPU tier this falls back to host */
	CACHE_NO_LOAD = 1 << 2,  /* pure lookup: a miss starts nothing */
};

/* Opens nothing itself: takes a pack opened by the caller (which must
 * outlive the cache; the O_DIRECT fd is used, or the buffered one with a
 * warning). Creates the arenas, the I/O engine and the I/O thread. */
int cache_create(struct pack_file *pack, const struct cache_config *cfg, struct cache **out,
		 struct moe_error *err);
/* Stops the I/O thread (cancelling queued loads), frees everything. Leases
 * still held are dropped. */
void cache_destroy(struct cache *c);

/* Acquires n experts for client `client`. Fills out[i] for every key; each
 * out[i].status == 0 carries a lease the caller must release. Returns the
 * number of entries served (status 0), or a negative errno when the call
 * itself is wrong (e.g. too many clients: -EMFILE). A key listed twice gets
 * two leases. Never waits: see the top of this file for how to wait. */
int cache_acquire(struct cache *c, uint32_t client, const struct cache_key *keys, size_t n,
		  unsigned flags, struct cache_loc *out);

/* Drops one lease taken by `client`. -ESTALE when the lease does not match
 * a live lease of that client (wrong generation, double release). */
int cache_release(struct cache *c, uint32_t client, const struct cache_lease *lease);
/* Checks a lease without dropping it: 0 when still valid, -ESTALE if not. */
int cache_lease_check(struct cache *c, uint32_t client, const struct cache_lease *lease);
/* Drops every lease of `client` (the client disconnected or died). Returns
 * the number of leases dropped. */
size_t cache_release_client(struct cache *c, uint32_t client);

/* Low-priority loads (behind every demand read; cancelled when the slot is
 * needed for a demand miss before the read starts). tier = HOST or GPU.
 * Returns the number of loads started. */
int cache_prefetch(struct cache *c, const struct cache_key *keys, size_t n, enum cache_tier tier);

/* Withdraws prefetches no longer wanted: a prefetch read of one of these
 * experts that has not reached the device yet is cancelled and its slot
 * freed (a read already in flight completes normally). Loads a demand has
 * joined are left alone. Returns the number of cancels requested. */
int cache_prefetch_cancel(struct cache *c, const struct cache_key *keys, size_t n);

/* The host tier of one layer as the prefetch scheduler sees it:
 * resident[e] (n_experts bytes) nonzero when RESIDENT or LOADING;
 * evictable[e] (may be NULL) nonzero when it could be evicted now (not
 * leased, pinned, loading, nor named by the last acquire); *free_slots
 * (may be NULL) = slots the layer may still fill without evicting with
 * per-layer budgets, or UINT32_MAX with one budget (the cache then picks
 * the victim itself). 0 or -EINVAL. */
int cache_layer_view(struct cache *c, uint32_t layer, uint8_t *resident, uint8_t *evictable, uint32_t *free_slots);
/* The same for a tier. The GPU tier has one budget for the arena
 * (*free_slots = UINT32_MAX, the cache picks victims); -ENODEV when the cache
 * has no GPU tier. */
int cache_layer_view_tier(struct cache *c, enum cache_tier tier, uint32_t layer, uint8_t *resident,
			  uint8_t *evictable, uint32_t *free_slots);
/* Whether the cache has a GPU tier. */
bool cache_has_gpu(struct cache *c);

/* Pins an expert in a tier (loading it if needed; pins nest): a pinned
 * expert is never chosen for eviction. Pinning in the GPU tier pins the host
 * copy too when the host tier is inclusive. */
int cache_pin(struct cache *c, struct cache_key key, enum cache_tier tier);
int cache_unpin(struct cache *c, struct cache_key key, enum cache_tier tier);

/* Evicts an expert from a tier now: 0, -EBUSY when leased, pinned or
 * loading, -ENOENT when not resident. Evicting from the host tier of an
 * inclusive cache evicts the GPU copy too (if that one is free). */
int cache_evict(struct cache *c, struct cache_key key, enum cache_tier tier);

/* Residency of one (expert, tier) (for tests and moectl). */
enum cache_residency cache_state(struct cache *c, struct cache_key key, enum cache_tier tier);

/* Writes the residency bitmap of one MoE layer and tier: bit e of
 * words[e / 64] is set when expert e is RESIDENT there. nwords must be at
 * least (n_experts + 63) / 64. Returns the number of resident experts or
 * -EINVAL. The service copies it into shared memory under its seqlock. */
int cache_residency_bitmap(struct cache *c, enum cache_tier tier, uint32_t layer, uint64_t *words,
			   size_t nwords);

/* The arenas, for mapping into clients. */
struct cache_arena_info {
	void *base;        /* in this process */
	uint64_t bytes;    /* mapped size */
	int fd;            /* host arena memfd; for the GPU tier the emulated
			    * region's read-only memfd; -1 where there is none
			    * (VMM handles are per chunk: tier_gpu_export).
			    * Owned by the cache. */
	uint64_t slot_bytes;
	uint32_t n_slots;
};
int cache_arena(struct cache *c, enum cache_tier tier, struct cache_arena_info *out);
/* The GPU arena's handles for clients (see tier_gpu_export): -ENODEV when
 * the cache has no GPU tier. Free with tier_gpu_export_free. */
struct tier_gpu_export;
int cache_gpu_export(struct cache *c, struct tier_gpu_export *out, struct moe_error *err);

/* Where the GPU resident data (config gpu_resident) is: 0 with *offset
 * its byte offset from GPU slot 0 (inside the region tier_gpu_export and
 * cache_arena describe) and *reserved the arena bytes it takes (rounded to
 * the backend's granularity); -ENODEV without a GPU tier, -ENOENT when it
 * was not placed there. Either pointer may be NULL. */
int cache_gpu_resident(struct cache *c, uint64_t *offset, uint64_t *reserved);

/* Pointer to a slot's payload in this process (host or emulated GPU), e.g.
 * for compute.c. Only meaningful while a lease on it is held. */
void *cache_slot_ptr(struct cache *c, enum cache_tier tier, uint32_t slot);

/* The cache's counters, histograms and per-expert counters (live; read with
 * stats_snapshot / the renderers). Valid until cache_destroy. */
struct stats *cache_stats(struct cache *c);

/* Experts whose extent failed to load (read error or CRC mismatch): each
 * is marked bad: the failure is answered to the next acquire, the one after
 * re-reads it at once; after a second failure in a row it is answered its
 * error without a read until a re-check after an exponential backoff
 * (500 ms doubling to 60 s). A good re-read clears it. */
struct cache_bad_expert {
	uint32_t layer, expert;
	int err;              /* -EIO or -EBADMSG */
	uint32_t fails;       /* loads failed in a row */
	uint64_t refused;     /* acquires answered err without a read */
	uint64_t recheck_ms;  /* until the next re-read is allowed */
};
/* Fills up to max entries; returns how many experts are bad (may exceed max). */
size_t cache_bad_experts(struct cache *c, struct cache_bad_expert *out, size_t max);

/* Readable whenever a load or copy has finished since the last read (an
 * eventfd; read 8 bytes to reset it). Owned by the cache. */
int cache_eventfd(struct cache *c);
/* Loads and copies queued or in flight now (experts): what a new prefetch
 * would wait behind. */
unsigned cache_busy(struct cache *c);

/* Waits until no load or copy is queued or in flight (tests, shutdown). */
int cache_wait_idle(struct cache *c, unsigned timeout_ms);

/* Checks the internal invariants (slot ownership vs expert states,
 * refcounts vs lease records, free lists). 0 or -EUCLEAN with a message.
 * For tests and moectl debug; takes the lock. */
int cache_check_invariants(struct cache *c, struct moe_error *err);

/* Name of the NVMe engine in use: "io_uring" or "pread". */
const char *cache_io_engine(struct cache *c);

#endif
