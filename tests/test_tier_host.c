/* Description: the host arena: size classes, slot allocation and freeing,
 * alignment and non-overlap, the sealed memfd, NUMA placement, the anonymous
 * THP variant, huge pages exactly when the 2 MiB pool has room (resizing
 * the pool as root to test both cases), mlock success and the RLIMIT_MEMLOCK failure (warned, or
 * fatal when required), and bad configurations. */
#include "config.h"

#include <criterion/criterion.h>
#include <fcntl.h>
#include <numa.h>
#include <numaif.h>
#include <stdlib.h>
#include <string.h>
#include <sys/capability.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include "stats.h"
#include "tier_host.h"
#include "testutil.h"

TestSuite(host, .timeout = 60);

Test(host, classes_slots_alignment_and_reuse)
{
	struct tier_host_class cls[2] = { { 10000, 3 }, { 4096 * 5, 2 } };
	struct tier_host_config cfg = { .classes = cls, .n_classes = 2, .numa_node = TIER_HOST_NUMA_DEFAULT };
	struct stats *st = stats_new(0, 0);
	struct tier_host *h;
	struct moe_error err = { "" };
	cr_assert_eq(tier_host_create(&cfg, st, &h, &err), 0, "%s", err.msg);
	cr_assert_eq(tier_host_n_slots(h), 5);
	cr_assert_eq(tier_host_n_free(h, 0), 3);
	cr_assert_eq(tier_host_n_free(h, 1), 2);
	cr_assert_eq(stats_gauge_get(st, GAUGE_host_slots), 5);
	int s[5];
	for (int i = 0; i < 3; i++) {
		s[i] = tier_host_alloc(h, 0);
		cr_assert_geq(s[i], 0);
		cr_assert_eq(tier_host_class_of(h, (uint32_t)s[i]), 0);
		cr_assert_eq(tier_host_slot_bytes(h, (uint32_t)s[i]), 12288, "rounded up to 4 KiB");
	}
	cr_assert_eq(tier_host_alloc(h, 0), -ENOSPC);
	for (int i = 3; i < 5; i++) {
		s[i] = tier_host_alloc(h, 1);
		cr_assert_geq(s[i], 3);
		cr_assert_eq(tier_host_class_of(h, (uint32_t)s[i]), 1);
	}
	cr_assert_eq(tier_host_alloc(h, 1), -ENOSPC);
	cr_assert_eq(tier_host_alloc(h, 2), -EINVAL);
	/* Aligned, inside the arena, no two overlapping; writable. */
	for (int i = 0; i < 5; i++) {
		uint64_t off = tier_host_offset(h, (uint32_t)s[i]), len = tier_host_slot_bytes(h, (uint32_t)s[i]);
		cr_assert_eq(off % 4096, 0);
		cr_assert_leq(off + len, tier_host_bytes(h));
		cr_assert_eq((char *)tier_host_ptr(h, (uint32_t)s[i]), (char *)tier_host_base(h) + off);
		memset(tier_host_ptr(h, (uint32_t)s[i]), i + 1, len);
		for (int j = 0; j < i; j++) {
			uint64_t o2 = tier_host_offset(h, (uint32_t)s[j]), l2 = tier_host_slot_bytes(h, (uint32_t)s[j]);
			cr_assert(off + len <= o2 || o2 + l2 <= off, "slots %d and %d overlap", i, j);
		}
	}
	for (int i = 0; i < 5; i++)
		cr_assert_eq(((unsigned char *)tier_host_ptr(h, (uint32_t)s[i]))[0], i + 1);
	/* The iovecs match the slots (buffer index = slot number). */
	const struct iovec *iov = tier_host_iovecs(h);
	for (uint32_t i = 0; i < 5; i++) {
		cr_assert_eq(iov[i].iov_base, tier_host_ptr(h, i));
		cr_assert_eq(iov[i].iov_len, tier_host_slot_bytes(h, i));
	}
	cr_assert_eq(tier_host_free(h, (uint32_t)s[1]), 0);
	cr_assert_eq(tier_host_free(h, (uint32_t)s[1]), -EINVAL, "double free");
	cr_assert_eq(tier_host_free(h, 99), -EINVAL);
	cr_assert(tier_host_is_free(h, (uint32_t)s[1]));
	cr_assert_eq(tier_host_alloc(h, 0), s[1], "the freed slot comes back");
	tier_host_destroy(h);
	stats_free(st);
}

Test(host, memfd_is_sealed_shared_and_prefaulted)
{
	struct tier_host_class cls = { 1 << 20, 4 };
	struct tier_host_config cfg = { .classes = &cls, .n_classes = 1, .numa_node = TIER_HOST_NUMA_DEFAULT };
	struct tier_host *h;
	struct moe_error err = { "" };
	cr_assert_eq(tier_host_create(&cfg, NULL, &h, &err), 0, "%s", err.msg);
	int fd = tier_host_fd(h);
	cr_assert_geq(fd, 0);
	int seals = fcntl(fd, F_GET_SEALS);
	cr_assert(seals & F_SEAL_SHRINK);
	cr_assert(seals & F_SEAL_GROW);
	cr_assert_eq(ftruncate(fd, 0), -1);
	/* Every page is resident before the first load (pre-faulted). */
	size_t pages = tier_host_bytes(h) / 4096;
	unsigned char *vec = malloc(pages);
	cr_assert_eq(mincore(tier_host_base(h), tier_host_bytes(h), vec), 0);
	for (size_t i = 0; i < pages; i++)
		cr_assert(vec[i] & 1, "page %zu not resident", i);
	free(vec);
	/* A second, read-only mapping sees what the owner writes. */
	memcpy(tier_host_ptr(h, 2), "expert", 6);
	void *ro = mmap(NULL, tier_host_bytes(h), PROT_READ, MAP_SHARED, fd, 0);
	cr_assert_neq(ro, MAP_FAILED);
	cr_assert_eq(memcmp((char *)ro + tier_host_offset(h, 2), "expert", 6), 0);
	munmap(ro, tier_host_bytes(h));
#ifndef __SANITIZE_ADDRESS__
	if (geteuid() == 0)
		cr_assert(tier_host_locked(h), "root with CAP_IPC_LOCK locks the arena");
#endif
	tier_host_destroy(h);
}

Test(host, numa_bind_interleave_and_bad_node)
{
	if (numa_available() < 0)
		cr_skip_test("no NUMA support in this kernel");
	struct tier_host_class cls = { 1 << 20, 2 };
	struct tier_host *h;
	struct moe_error err = { "" };
	struct tier_host_config cfg = { .classes = &cls, .n_classes = 1, .numa_node = 0 };
	cr_assert_eq(tier_host_create(&cfg, NULL, &h, &err), 0, "%s", err.msg);
	int node = -1;
	cr_assert_eq(get_mempolicy(&node, NULL, 0, tier_host_base(h), MPOL_F_NODE | MPOL_F_ADDR), 0);
	cr_assert_eq(node, 0);
	tier_host_destroy(h);
	cfg.numa_node = TIER_HOST_NUMA_INTERLEAVE;
	cr_assert_eq(tier_host_create(&cfg, NULL, &h, &err), 0, "%s", err.msg);
	int mode = -1;
	cr_assert_eq(get_mempolicy(&mode, NULL, 0, tier_host_base(h), MPOL_F_ADDR), 0);
	cr_assert_eq(mode, MPOL_INTERLEAVE);
	tier_host_destroy(h);
	cfg.numa_node = numa_max_node() + 1;
	cr_assert_eq(tier_host_create(&cfg, NULL, &h, &err), -EINVAL);
	cr_assert(strstr(err.msg, "does not exist"), "%s", err.msg);
}

Test(host, anonymous_thp_arena)
{
	struct tier_host_class cls = { 2 << 20, 4 };
	struct tier_host_config cfg = { .classes = &cls, .n_classes = 1, .numa_node = TIER_HOST_NUMA_DEFAULT,
					.anonymous = true };
	struct tier_host *h;
	struct moe_error err = { "" };
	cr_assert_eq(tier_host_create(&cfg, NULL, &h, &err), 0, "%s", err.msg);
	cr_assert_eq(tier_host_fd(h), -1);
	cr_assert_eq((uintptr_t)tier_host_base(h) % (2u << 20), 0, "2 MiB aligned for THP");
	memset(tier_host_ptr(h, 3), 7, 2 << 20);
	tier_host_destroy(h);
}

static void drop_memlock(void)
{
#ifdef __SANITIZE_ADDRESS__
	/* ASan intercepts mlock() and makes it a no-op that succeeds. */
	cr_skip_test("mlock is not real under AddressSanitizer");
#endif
	struct rlimit rl = { 1 << 20, 1 << 20 };
	cr_assert_eq(setrlimit(RLIMIT_MEMLOCK, &rl), 0);
	cap_t caps = cap_get_proc();
	cap_value_t v = CAP_IPC_LOCK;
	cap_set_flag(caps, CAP_EFFECTIVE, 1, &v, CAP_CLEAR);
	cr_assert_eq(cap_set_proc(caps), 0);
	cap_free(caps);
}

Test(host, mlock_failure_warns_and_runs_unpinned)
{
	drop_memlock();
	struct tier_host_class cls = { 1 << 20, 4 };
	struct tier_host_config cfg = { .classes = &cls, .n_classes = 1, .numa_node = TIER_HOST_NUMA_DEFAULT };
	struct stats *st = stats_new(0, 0);
	struct tier_host *h;
	struct moe_error err = { "" };
	cr_assert_eq(tier_host_create(&cfg, st, &h, &err), 0, "%s", err.msg);
	cr_assert(!tier_host_locked(h));
	cr_assert_eq(stats_get(st, STAT_host_mlock_failures), 1);
	cr_assert_eq(stats_gauge_get(st, GAUGE_host_arena_locked), 0);
	tier_host_destroy(h);
	stats_free(st);
}

Test(host, mlock_failure_is_fatal_when_required)
{
	drop_memlock();
	struct tier_host_class cls = { 1 << 20, 4 };
	struct tier_host_config cfg = { .classes = &cls, .n_classes = 1, .numa_node = TIER_HOST_NUMA_DEFAULT,
					.mlock_required = true };
	struct tier_host *h;
	struct moe_error err = { "" };
	cr_assert_eq(tier_host_create(&cfg, NULL, &h, &err), -ENOMEM);
	cr_assert_null(h);
	cr_assert(strstr(err.msg, "RLIMIT_MEMLOCK"), "%s", err.msg);
	cr_assert(strstr(err.msg, "LimitMEMLOCK="), "%s", err.msg);
	cr_assert(strstr(err.msg, "CAP_IPC_LOCK"), "%s", err.msg);
}

#define NR_HUGE "/proc/sys/vm/nr_hugepages"
#define FREE_HUGE "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages"

static long read_long(const char *path)
{
	long v = -1;
	FILE *f = fopen(path, "r");
	if (f) {
		if (fscanf(f, "%ld", &v) != 1)
			v = -1;
		fclose(f);
	}
	return v;
}

static bool write_long(const char *path, long v)
{
	FILE *f = fopen(path, "w");
	if (!f)
		return false;
	bool ok = fprintf(f, "%ld\n", v) > 0;
	return fclose(f) == 0 && ok;
}

/* The page size backing addr, from /proc/self/smaps (kB), or -1. */
static long kernel_page_kb(const void *addr)
{
	FILE *f = fopen("/proc/self/smaps", "r");
	char line[512];
	bool in = false;
	long kb = -1;
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		unsigned long lo, hi;
		if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' '))
			in = (uintptr_t)addr >= lo && (uintptr_t)addr < hi;
		else if (in && sscanf(line, "KernelPageSize: %ld kB", &kb) == 1)
			break;
	}
	fclose(f);
	return kb;
}

/* One 2 MiB arena with huge pages asked for: hugetlb exactly when the 2 MiB
 * pool has room, and then really backed by 2 MiB pages; otherwise 4 KiB
 * pages and the fallback warning. Serves either way. Returns hugetlb. */
static bool huge_arena_follows_pool(void)
{
	struct tier_host_class cls = { 1 << 20, 2 };
	struct tier_host_config cfg = { .classes = &cls, .n_classes = 1, .numa_node = TIER_HOST_NUMA_DEFAULT,
					.huge_pages = true };
	struct tier_host *h;
	struct moe_error err = { "" };
	long free_pages = read_long(FREE_HUGE);
	cr_assert_eq(tier_host_create(&cfg, NULL, &h, &err), 0, "%s", err.msg);
	uint64_t bytes = tier_host_bytes(h);
	bool room = free_pages >= 0 && (uint64_t)free_pages * (2u << 20) >= bytes;
	cr_assert_eq(tier_host_hugetlb(h), room, "pool has %ld free 2 MiB pages for %llu bytes, hugetlb %d", free_pages,
		     (unsigned long long)bytes, tier_host_hugetlb(h));
	long kb = kernel_page_kb(tier_host_base(h));
	cr_assert_eq(kb, room ? 2048 : 4, "the arena is backed by %ld kB pages", kb);
	for (uint32_t i = 0; i < 2; i++) {
		memset(tier_host_ptr(h, i), 0x5a + (int)i, 1 << 20);
		cr_assert_eq(((unsigned char *)tier_host_ptr(h, i))[(1 << 20) - 1], 0x5a + i);
	}
	tier_host_destroy(h);
	return room;
}

static long saved_nr_huge = -1;

static void restore_nr_huge(void)
{
	if (saved_nr_huge >= 0)
		write_long(NR_HUGE, saved_nr_huge);
}

Test(host, huge_pages_follow_the_pool, .fini = restore_nr_huge)
{
	/* As the pool is now. */
	bool first = huge_arena_follows_pool();
	/* Then the other case, where root may resize the pool: an empty pool
	 * falls back, a pool with room gives hugetlb. */
	long nr = read_long(NR_HUGE), free_pages = read_long(FREE_HUGE);
	if (nr < 0 || free_pages < 0 || geteuid() != 0) {
		cr_log_warn("hugetlb: only the %s case tested (cannot resize the pool)", first ? "hugetlb" : "fallback");
		return;
	}
	saved_nr_huge = nr;
	long want = first ? nr - free_pages : nr + 2 - free_pages;
	if (want < 0 || !write_long(NR_HUGE, want)) {
		cr_log_warn("hugetlb: only the %s case tested (%s not writable)", first ? "hugetlb" : "fallback", NR_HUGE);
		return;
	}
	long now_free = read_long(FREE_HUGE);
	if (!first && now_free < 2) {
		cr_log_warn("hugetlb: the kernel found %ld of 2 huge pages (memory fragmented); fallback case only", now_free);
		return;
	}
	bool second = huge_arena_follows_pool();
	cr_assert_neq(first, second, "both cases tested");
	cr_log_info("hugetlb: fallback and 2 MiB-page cases both tested");
}

Test(host, bad_configurations)
{
	struct tier_host *h;
	struct moe_error err = { "" };
	struct tier_host_class zero = { 0, 1 }, none = { 4096, 0 };
	struct tier_host_config cfg = { .classes = &zero, .n_classes = 1 };
	cr_assert_eq(tier_host_create(&cfg, NULL, &h, &err), -EINVAL);
	cfg.classes = &none;
	cr_assert_eq(tier_host_create(&cfg, NULL, &h, &err), -EINVAL);
	cfg.n_classes = 0;
	cr_assert_eq(tier_host_create(&cfg, NULL, &h, &err), -EINVAL);
	cfg.n_classes = TIER_HOST_MAX_CLASSES + 1;
	cr_assert_eq(tier_host_create(&cfg, NULL, &h, &err), -EINVAL);
	cr_assert_eq(tier_host_create(NULL, NULL, &h, &err), -EINVAL);
	struct tier_host_class huge = { 1ull << 40, 1u << 30 };
	cfg = (struct tier_host_config){ .classes = &huge, .n_classes = 1 };
	cr_assert_lt(tier_host_create(&cfg, NULL, &h, &err), 0, "an arena of 2^70 bytes is refused");
}
