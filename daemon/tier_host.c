/* tier_host.c - the host arena (see tier_host.h). */
#define _GNU_SOURCE
#include "tier_host.h"

#include <fcntl.h>
#include <numa.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fault.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14; the 6.1 uapi headers have it, older ones not */
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif

#define HUGE_2M (2ull << 20)

struct host_class {
	uint64_t offset;     /* of slot 0 of the class in the arena */
	uint64_t slot_bytes;
	uint32_t first_slot; /* global number of slot 0 */
	uint32_t n_slots;
	uint32_t *free_stack; /* slots free, top at n_free - 1 */
	uint32_t n_free;
};

struct tier_host {
	void *base;
	int mlock_errno;
	uint64_t bytes;
	int fd;
	bool locked, hugetlb, anonymous;
	uint64_t populate_ns;
	unsigned n_classes;
	struct host_class cls[TIER_HOST_MAX_CLASSES];
	uint32_t n_slots;
	uint8_t *is_free;     /* [n_slots] */
	struct iovec *iov;    /* [n_slots] */
	struct stats *st;
};

static uint64_t hugetlb_free_bytes(void)
{
	FILE *f = fopen("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "re");
	unsigned long long n = 0;
	if (f) {
		if (fscanf(f, "%llu", &n) != 1)
			n = 0;
		fclose(f);
	}
	return n * HUGE_2M;
}

static int place(struct tier_host *h, int node, struct moe_error *err)
{
	if (node == TIER_HOST_NUMA_DEFAULT)
		return 0;
	if (numa_available() < 0) {
		moe_warn("host arena: NUMA placement asked for, but libnuma reports no NUMA support; left to first touch");
		return 0;
	}
	if (node == TIER_HOST_NUMA_INTERLEAVE) {
		numa_interleave_memory(h->base, h->bytes, numa_all_nodes_ptr);
		return 0;
	}
	if (node < 0 || node > numa_max_node())
		return moe_error_set(err, -EINVAL, "host arena: NUMA node %d does not exist (nodes 0..%d)", node,
				     numa_max_node());
	/* Before the pre-fault, so every page is allocated on that node. */
	numa_tonode_memory(h->base, h->bytes, node);
	return 0;
}

static int populate(struct tier_host *h)
{
	uint64_t t0 = moe_now_ns();
	/* memfd: allocate the shmem pages in one pass over the file (after
	 * mbind, so they follow the range's policy), then map them all. */
	if (h->fd >= 0 && !h->hugetlb && fallocate(h->fd, 0, 0, (off_t)h->bytes) != 0)
		moe_debug("host arena: fallocate: %s", strerror(errno));
	if (madvise(h->base, h->bytes, MADV_POPULATE_WRITE) != 0) {
		/* Kernels before 5.14: touch one byte per page ourselves. */
		long pg = sysconf(_SC_PAGESIZE);
		volatile char *p = h->base;
		for (uint64_t off = 0; off < h->bytes; off += (uint64_t)pg)
			p[off] = 0;
	}
	h->populate_ns = moe_now_ns() - t0;
	return 0;
}

static void lock_arena(struct tier_host *h)
{
	if (mlock(h->base, h->bytes) == 0) {
		h->locked = true;
		return;
	}
	h->mlock_errno = errno;
	stats_inc(h->st, STAT_host_mlock_failures);
}

int tier_host_create(const struct tier_host_config *cfg, struct stats *st, struct tier_host **out,
		     struct moe_error *err)
{
	*out = NULL;
	if (!cfg || !cfg->classes || cfg->n_classes == 0 || cfg->n_classes > TIER_HOST_MAX_CLASSES)
		return moe_error_set(err, -EINVAL, "host arena: 1..%d slot classes needed", TIER_HOST_MAX_CLASSES);
	if (FAULT_HIT(FAULT_HOST_ALLOC)) {
		stats_inc(st, STAT_faults_injected);
		stats_inc(st, STAT_host_alloc_failures);
		return moe_error_set(err, -ENOMEM, "host arena: allocation failed (injected fault host.alloc)");
	}
	struct tier_host *h = calloc(1, sizeof(*h));
	if (!h)
		return moe_error_set(err, -ENOMEM, "host arena: out of memory");
	h->fd = -1;
	h->st = st;
	h->anonymous = cfg->anonymous;
	uint64_t off = 0;
	uint64_t total_slots = 0;
	int rc;
	for (unsigned c = 0; c < cfg->n_classes; c++) {
		const struct tier_host_class *k = &cfg->classes[c];
		if (k->slot_bytes == 0 || k->n_slots == 0 || k->slot_bytes > (1ull << 40)) {
			rc = moe_error_set(err, -EINVAL, "host arena: class %u has %llu slots of %llu bytes", c,
					   (unsigned long long)k->n_slots, (unsigned long long)k->slot_bytes);
			goto fail;
		}
		uint64_t sb = MOE_ALIGN_UP(k->slot_bytes, (uint64_t)TIER_HOST_SLOT_ALIGN), sz;
		/* Classes start on 2 MiB so huge pages never straddle two of them. */
		off = MOE_ALIGN_UP(off, HUGE_2M);
		if (!moe_mul_u64(sb, k->n_slots, &sz) || !moe_add_u64(off, sz, &sz) || total_slots + k->n_slots > UINT32_MAX / 2) {
			rc = moe_error_set(err, -EOVERFLOW, "host arena: size overflows");
			goto fail;
		}
		h->cls[c] = (struct host_class){ .offset = off, .slot_bytes = sb,
						 .first_slot = (uint32_t)total_slots, .n_slots = k->n_slots };
		off = sz;
		total_slots += k->n_slots;
	}
	h->n_classes = cfg->n_classes;
	h->n_slots = (uint32_t)total_slots;
	h->bytes = MOE_ALIGN_UP(off, HUGE_2M);

	h->is_free = calloc(h->n_slots, 1);
	h->iov = calloc(h->n_slots, sizeof(*h->iov));
	if (!h->is_free || !h->iov) {
		rc = moe_error_set(err, -ENOMEM, "host arena: out of memory");
		goto fail;
	}
	for (unsigned c = 0; c < h->n_classes; c++) {
		struct host_class *k = &h->cls[c];
		k->free_stack = malloc(sizeof(uint32_t) * k->n_slots);
		if (!k->free_stack) {
			rc = moe_error_set(err, -ENOMEM, "host arena: out of memory");
			goto fail;
		}
		/* Lowest slot on top, so a fresh arena fills from the start. */
		for (uint32_t i = 0; i < k->n_slots; i++)
			k->free_stack[i] = k->first_slot + k->n_slots - 1 - i;
		k->n_free = k->n_slots;
		for (uint32_t i = 0; i < k->n_slots; i++)
			h->is_free[k->first_slot + i] = 1;
	}

	if (cfg->anonymous) {
		/* Over-allocate by 2 MiB to align the start for THP. */
		size_t len = h->bytes + HUGE_2M;
		void *raw = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (raw == MAP_FAILED) {
			rc = moe_error_set(err, -errno, "host arena: mmap of %llu bytes: %s",
					   (unsigned long long)h->bytes, strerror(errno));
			goto fail;
		}
		uintptr_t a = MOE_ALIGN_UP((uintptr_t)raw, (uintptr_t)HUGE_2M);
		if (a > (uintptr_t)raw)
			munmap(raw, a - (uintptr_t)raw);
		uintptr_t end = (uintptr_t)raw + len, aend = a + h->bytes;
		if (end > aend)
			munmap((void *)aend, end - aend);
		h->base = (void *)a;
		madvise(h->base, h->bytes, MADV_HUGEPAGE);
	} else {
		unsigned flags = MFD_CLOEXEC | MFD_ALLOW_SEALING;
		const char *name = cfg->name ? cfg->name : "moetier-host";
		if (cfg->huge_pages) {
			uint64_t have = hugetlb_free_bytes();
			if (have >= h->bytes) {
				h->fd = memfd_create(name, flags | MFD_HUGETLB);
				if (h->fd >= 0)
					h->hugetlb = true;
				else
					moe_warn("host arena: memfd_create(MFD_HUGETLB): %s; using 4 KiB pages",
						 strerror(errno));
			} else {
				moe_warn("host arena: huge pages asked for, but the 2 MiB pool has %llu MiB free for a %llu MiB arena (raise vm.nr_hugepages); using 4 KiB pages",
					 (unsigned long long)(have >> 20), (unsigned long long)(h->bytes >> 20));
			}
		}
		if (h->fd < 0)
			h->fd = memfd_create(name, flags);
		if (h->fd < 0) {
			rc = moe_error_set(err, -errno, "host arena: memfd_create: %s", strerror(errno));
			goto fail;
		}
		if (ftruncate(h->fd, (off_t)h->bytes) != 0) {
			rc = moe_error_set(err, -errno, "host arena: ftruncate(%llu): %s",
					   (unsigned long long)h->bytes, strerror(errno));
			goto fail;
		}
		/* A client mapping must never see the file shrink under it. */
		if (fcntl(h->fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0)
			moe_warn("host arena: F_ADD_SEALS: %s", strerror(errno));
		h->base = mmap(NULL, h->bytes, PROT_READ | PROT_WRITE, MAP_SHARED, h->fd, 0);
		if (h->base == MAP_FAILED) {
			h->base = NULL;
			rc = moe_error_set(err, -errno, "host arena: mmap of %llu bytes: %s",
					   (unsigned long long)h->bytes, strerror(errno));
			goto fail;
		}
		/* THP for shmem takes effect where shmem_enabled is "advise" (it is
		 * "never" on the build machine); huge folios let one registered
		 * buffer segment cover 2 MiB, so an expert read needs ~3x fewer
		 * device requests (doc/tiers.md). Harmless elsewhere. */
		if (!h->hugetlb)
			madvise(h->base, h->bytes, MADV_HUGEPAGE);
	}
	rc = place(h, cfg->numa_node, err);
	if (rc < 0)
		goto fail;
	if (!cfg->no_populate)
		populate(h);
	lock_arena(h);
	if (!h->locked) {
		if (cfg->mlock_required) {
			rc = moe_error_set(err, -ENOMEM,
					   "host arena: mlock of %llu MiB failed (%s) and pinning is required: raise RLIMIT_MEMLOCK (systemd LimitMEMLOCK=) or grant CAP_IPC_LOCK",
					   (unsigned long long)(h->bytes >> 20), strerror(h->mlock_errno));
			goto fail;
		}
		moe_warn("host arena: mlock of %llu MiB failed (%s): running unpinned; the arena may be swapped or migrated. Raise RLIMIT_MEMLOCK (systemd LimitMEMLOCK=) or grant CAP_IPC_LOCK",
			 (unsigned long long)(h->bytes >> 20), strerror(h->mlock_errno));
	}
	for (unsigned c = 0; c < h->n_classes; c++) {
		struct host_class *k = &h->cls[c];
		for (uint32_t i = 0; i < k->n_slots; i++) {
			h->iov[k->first_slot + i].iov_base = (char *)h->base + k->offset + (uint64_t)i * k->slot_bytes;
			h->iov[k->first_slot + i].iov_len = k->slot_bytes;
		}
	}
	stats_gauge_set(st, GAUGE_host_slots, h->n_slots);
	stats_gauge_set(st, GAUGE_host_arena_bytes, (int64_t)h->bytes);
	stats_gauge_set(st, GAUGE_host_arena_locked, h->locked);
	stats_gauge_set(st, GAUGE_host_arena_hugetlb, h->hugetlb);
	*out = h;
	return 0;
fail:
	tier_host_destroy(h);
	return rc;
}

void tier_host_destroy(struct tier_host *h)
{
	if (!h)
		return;
	if (h->base)
		munmap(h->base, h->bytes);
	if (h->fd >= 0)
		close(h->fd);
	for (unsigned c = 0; c < TIER_HOST_MAX_CLASSES; c++)
		free(h->cls[c].free_stack);
	free(h->is_free);
	free(h->iov);
	free(h);
}

int tier_host_alloc(struct tier_host *h, unsigned cls)
{
	if (cls >= h->n_classes)
		return -EINVAL;
	if (FAULT_HIT(FAULT_HOST_ALLOC)) {
		stats_inc(h->st, STAT_faults_injected);
		stats_inc(h->st, STAT_host_alloc_failures);
		return -ENOMEM;
	}
	struct host_class *k = &h->cls[cls];
	if (k->n_free == 0)
		return -ENOSPC;
	uint32_t s = k->free_stack[--k->n_free];
	h->is_free[s] = 0;
	return (int)s;
}

int tier_host_free(struct tier_host *h, uint32_t slot)
{
	if (slot >= h->n_slots || h->is_free[slot])
		return -EINVAL;
	struct host_class *k = &h->cls[tier_host_class_of(h, slot)];
	k->free_stack[k->n_free++] = slot;
	h->is_free[slot] = 1;
	return 0;
}

bool tier_host_is_free(const struct tier_host *h, uint32_t slot)
{
	return slot < h->n_slots && h->is_free[slot];
}

uint32_t tier_host_n_slots(const struct tier_host *h) { return h->n_slots; }
uint32_t tier_host_n_free(const struct tier_host *h, unsigned cls) { return cls < h->n_classes ? h->cls[cls].n_free : 0; }

unsigned tier_host_class_of(const struct tier_host *h, uint32_t slot)
{
	for (unsigned c = 0; c + 1 < h->n_classes; c++)
		if (slot < h->cls[c + 1].first_slot)
			return c;
	return h->n_classes - 1;
}

uint64_t tier_host_slot_bytes(const struct tier_host *h, uint32_t slot)
{
	return slot < h->n_slots ? h->iov[slot].iov_len : 0;
}

uint64_t tier_host_offset(const struct tier_host *h, uint32_t slot)
{
	return slot < h->n_slots ? (uint64_t)((char *)h->iov[slot].iov_base - (char *)h->base) : 0;
}

void *tier_host_ptr(const struct tier_host *h, uint32_t slot)
{
	return slot < h->n_slots ? h->iov[slot].iov_base : NULL;
}

void *tier_host_base(const struct tier_host *h) { return h->base; }
uint64_t tier_host_bytes(const struct tier_host *h) { return h->bytes; }
int tier_host_fd(const struct tier_host *h) { return h->fd; }
bool tier_host_locked(const struct tier_host *h) { return h->locked; }
bool tier_host_hugetlb(const struct tier_host *h) { return h->hugetlb; }
uint64_t tier_host_populate_ns(const struct tier_host *h) { return h->populate_ns; }
const struct iovec *tier_host_iovecs(const struct tier_host *h) { return h->iov; }
