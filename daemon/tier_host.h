/* tier_host.h - the host arena: fixed-size slots carved out of one memfd.
 *
 * The arena is one memfd (MFD_ALLOW_SEALING, sealed against shrinking and
 * growing so a client mapping can never SIGBUS) mapped MAP_SHARED, so the
 * service can hand it to clients to map read-only. It is placed with libnuma
 * (a node or interleaved) before it is touched, pre-faulted with
 * MADV_POPULATE_WRITE (the load path never takes a page fault: a first-touch
 * fault costs ~14 us per 4 KiB page on this VM), and mlocked. On MFD_HUGETLB
 * when asked and the 2 MiB pool has room; THP does not apply to shmem where
 * shmem_enabled=never, so an anonymous THP arena is available for users that
 * need no fd (benchmarks).
 *
 * Slots come in size classes (experts of different packs differ in size):
 * class c has n_slots slots of slot_bytes each (rounded up to 4 KiB, so an
 * O_DIRECT read can land in any slot). Slot numbers are global over all
 * classes. Allocation is not thread-safe: the owner (cache.c) serializes.
 */
#ifndef MOETIER_TIER_HOST_H
#define MOETIER_TIER_HOST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "stats.h"
#include "util.h"

#define TIER_HOST_MAX_CLASSES 8
#define TIER_HOST_SLOT_ALIGN 4096u
#define TIER_HOST_NUMA_DEFAULT (-2)
#define TIER_HOST_NUMA_INTERLEAVE (-1)

struct tier_host_class {
	uint64_t slot_bytes; /* > 0; rounded up to TIER_HOST_SLOT_ALIGN */
	uint32_t n_slots;    /* > 0 */
};

struct tier_host_config {
	const struct tier_host_class *classes;
	unsigned n_classes;     /* 1..TIER_HOST_MAX_CLASSES */
	int numa_node;          /* TIER_HOST_NUMA_DEFAULT, _INTERLEAVE or a node */
	bool mlock_required;    /* fail when mlock fails (default: warn, go on) */
	bool huge_pages;        /* MFD_HUGETLB when the pool has room */
	bool anonymous;         /* anonymous THP mapping, no memfd (fd = -1) */
	bool no_populate;       /* skip the pre-fault (tests of tiny arenas) */
	const char *name;       /* memfd name; NULL = "moetier-host" */
};

struct tier_host;

int tier_host_create(const struct tier_host_config *cfg, struct stats *st, struct tier_host **out,
		     struct moe_error *err);
void tier_host_destroy(struct tier_host *h);

/* A free slot of class `cls`: its number, -ENOSPC when the class is full,
 * -ENOMEM when the "host.alloc" fault fires. */
int tier_host_alloc(struct tier_host *h, unsigned cls);
/* Returns a slot to its class. -EINVAL for a bad or already free slot. */
int tier_host_free(struct tier_host *h, uint32_t slot);
bool tier_host_is_free(const struct tier_host *h, uint32_t slot);

uint32_t tier_host_n_slots(const struct tier_host *h);
uint32_t tier_host_n_free(const struct tier_host *h, unsigned cls);
unsigned tier_host_class_of(const struct tier_host *h, uint32_t slot);
uint64_t tier_host_slot_bytes(const struct tier_host *h, uint32_t slot);
uint64_t tier_host_offset(const struct tier_host *h, uint32_t slot);
void *tier_host_ptr(const struct tier_host *h, uint32_t slot);

void *tier_host_base(const struct tier_host *h);
uint64_t tier_host_bytes(const struct tier_host *h);
int tier_host_fd(const struct tier_host *h);     /* memfd, or -1 (anonymous) */
bool tier_host_locked(const struct tier_host *h);
bool tier_host_hugetlb(const struct tier_host *h);
/* Nanoseconds the pre-fault took (MADV_POPULATE_WRITE or touching). */
uint64_t tier_host_populate_ns(const struct tier_host *h);

/* One iovec per slot, in slot order (for io_uring_register_buffers: the
 * buffer index of a slot is then its number). Owned by the arena. */
const struct iovec *tier_host_iovecs(const struct tier_host *h);

#endif
