/* Description: the NVMe read engine on its own: io_uring with a fixed file
 * and registered buffers, the pread fallback, demand before prefetch,
 * cancel and promote of queued reads, reads into unregistered buffers, a
 * failed buffer registration (memlock), and end of file. */
#include "config.h"

#include <criterion/criterion.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/capability.h>
#include <sys/resource.h>
#include <unistd.h>

#include "fault.h"
#include "stats.h"
#include "tier_nvme.h"
#include "testutil.h"

#define BLK (64u * 1024)
#define NBLK 32

static char *dir;
static char path[4200];
static int fd_direct;

static unsigned char pat(uint64_t off) { return (unsigned char)((off * 2654435761u) >> 13 ^ (off >> 12)); }

static void setup(void)
{
	dir = tu_mkdtemp("nvme");
	snprintf(path, sizeof(path), "%s/data", dir);
	int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
	cr_assert_geq(fd, 0);
	unsigned char *b = malloc(BLK);
	for (uint64_t k = 0; k < NBLK; k++) {
		for (uint64_t i = 0; i < BLK; i++)
			b[i] = pat(k * BLK + i);
		cr_assert_eq(write(fd, b, BLK), (ssize_t)BLK);
	}
	free(b);
	close(fd);
	fd_direct = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
	cr_assert_geq(fd_direct, 0);
}

static void teardown(void)
{
	close(fd_direct);
	tu_rmtree(dir);
}

TestSuite(nvme, .init = setup, .fini = teardown, .timeout = 60);

static bool block_ok(const unsigned char *b, uint64_t off, uint64_t len)
{
	for (uint64_t i = 0; i < len; i++)
		if (b[i] != pat(off + i))
			return false;
	return true;
}

static void read_all(bool no_uring, bool registered)
{
	unsigned char *mem = aligned_alloc(4096, (size_t)NBLK * BLK);
	struct iovec iov[NBLK];
	for (int i = 0; i < NBLK; i++)
		iov[i] = (struct iovec){ mem + (size_t)i * BLK, BLK };
	struct stats *st = stats_new(0, 0);
	struct tier_nvme_config cfg = { .queue_depth = 4, .no_uring = no_uring, .buffers = registered ? iov : NULL,
					.n_buffers = registered ? NBLK : 0 };
	struct tier_nvme *n;
	struct moe_error err = { "" };
	cr_assert_eq(tier_nvme_create(fd_direct, &cfg, st, &n, &err), 0, "%s", err.msg);
	cr_assert_eq(tier_nvme_uses_uring(n), !no_uring);
	cr_assert_str_eq(tier_nvme_engine(n), no_uring ? "pread" : "io_uring");
	/* Block k of the file goes to buffer (k * 7) % NBLK: a permutation. */
	for (uint32_t k = 0; k < NBLK; k++) {
		uint32_t b = (k * 7) % NBLK;
		struct tier_nvme_req rq = { .tag = k, .offset = (uint64_t)k * BLK, .len = BLK, .buf = iov[b].iov_base,
					    .buf_index = registered ? (int)b : -1, .prefetch = k % 3 == 0 };
		cr_assert_eq(tier_nvme_queue(n, &rq), 0);
	}
	cr_assert_eq(tier_nvme_queued(n), NBLK);
	unsigned seen = 0, max_inflight = 0;
	bool got[NBLK] = { false };
	while (seen < NBLK) {
		cr_assert_geq(tier_nvme_submit(n), 0);
		max_inflight = MOE_MAX(max_inflight, tier_nvme_inflight(n));
		struct tier_nvme_cqe cq[8];
		int k = tier_nvme_reap(n, cq, 8, 1);
		cr_assert_gt(k, 0);
		for (int i = 0; i < k; i++) {
			cr_assert_eq(cq[i].res, 0);
			cr_assert_lt(cq[i].tag, NBLK);
			cr_assert(!got[cq[i].tag]);
			got[cq[i].tag] = true;
			uint32_t b = (uint32_t)(cq[i].tag * 7) % NBLK;
			cr_assert(block_ok(iov[b].iov_base, cq[i].tag * BLK, BLK), "block %llu", (unsigned long long)cq[i].tag);
		}
		seen += (unsigned)k;
	}
	cr_assert_leq(max_inflight, 4, "queue depth is respected");
	cr_assert_eq(stats_get(st, STAT_nvme_reads), NBLK);
	cr_assert_eq(stats_get(st, STAT_nvme_read_bytes), (uint64_t)NBLK * BLK);
	cr_assert_eq(stats_get(st, STAT_nvme_errors), 0);
	cr_assert_eq(stats_get(st, STAT_nvme_demand_reads) + stats_get(st, STAT_nvme_prefetch_reads), NBLK);
	if (no_uring)
		cr_assert_eq(stats_get(st, STAT_nvme_pread_fallback), NBLK);
	else if (registered && tier_nvme_registered(n))
		cr_assert_eq(stats_get(st, STAT_nvme_unregistered_reads), 0);
	else
		cr_assert_eq(stats_get(st, STAT_nvme_unregistered_reads), NBLK);
	tier_nvme_destroy(n);
	stats_free(st);
	free(mem);
}

/* io_uring bypasses seccomp: the ring is restricted to reads of the pack
 * before it is enabled, and tier_nvme_create checks that the kernel refuses
 * a NOP on it; the note says which. Reads are exact either way, and when the
 * kernel refuses the restrictions (the fault point) the engine says so and
 * still reads. */
Test(nvme, ring_is_restricted_to_reads_of_the_pack)
{
	struct stats *st = stats_new(0, 0);
	struct tier_nvme_config cfg = { .queue_depth = 4 };
	struct tier_nvme *n;
	struct moe_error err = { "" };
	cr_assert_eq(tier_nvme_create(fd_direct, &cfg, st, &n, &err), 0, "%s", err.msg);
	if (!tier_nvme_uses_uring(n)) {
		char why[160];
		snprintf(why, sizeof(why), "%s", tier_nvme_engine_note(n));
		tier_nvme_destroy(n);
		stats_free(st);
		cr_skip_test("no io_uring here: %s", why);
	}
	cr_assert(strstr(tier_nvme_engine_note(n), "restricted(read-pack-only)"), "%s", tier_nvme_engine_note(n));
	tier_nvme_destroy(n);
	stats_free(st);
	read_all(false, true);

	cr_assert_eq(fault_arm(FAULT_URING_RESTRICT, 0, 1), 0);
	st = stats_new(0, 0);
	cr_assert_eq(tier_nvme_create(fd_direct, &cfg, st, &n, &err), 0, "%s", err.msg);
	fault_disarm_all();
	cr_assert(strstr(tier_nvme_engine_note(n), " unrestricted"), "%s", tier_nvme_engine_note(n));
	cr_assert_eq(stats_get(st, STAT_faults_injected), 1);
	tier_nvme_destroy(n);
	stats_free(st);
}

Test(nvme, uring_registered_reads_are_exact) { read_all(false, true); }
Test(nvme, uring_unregistered_reads_are_exact) { read_all(false, false); }
Test(nvme, pread_fallback_reads_are_exact) { read_all(true, false); }

Test(nvme, demand_reads_go_before_prefetch_reads)
{
	unsigned char *mem = aligned_alloc(4096, 5 * BLK);
	struct stats *st = stats_new(0, 0);
	struct tier_nvme_config cfg = { .queue_depth = 1 };
	struct tier_nvme *n;
	struct moe_error err = { "" };
	cr_assert_eq(tier_nvme_create(fd_direct, &cfg, st, &n, &err), 0, "%s", err.msg);
	/* Tags 0-2 prefetch, queued first; 3-4 demand, queued after. */
	for (uint32_t k = 0; k < 5; k++) {
		struct tier_nvme_req rq = { .tag = k, .offset = (uint64_t)k * BLK, .len = BLK, .buf = mem + (size_t)k * BLK,
					    .buf_index = -1, .prefetch = k < 3 };
		cr_assert_eq(tier_nvme_queue(n, &rq), 0);
	}
	cr_assert_eq(tier_nvme_promote(n, 2), 0, "a demand now waits for prefetch 2");
	cr_assert_eq(tier_nvme_promote(n, 3), -ENOENT, "3 is not a prefetch");
	uint64_t order[5];
	unsigned seen = 0;
	while (seen < 5) {
		tier_nvme_submit(n);
		cr_assert_leq(tier_nvme_inflight(n), 1);
		struct tier_nvme_cqe cq[1];
		int k = tier_nvme_reap(n, cq, 1, 1);
		cr_assert_eq(k, 1);
		cr_assert_eq(cq[0].res, 0);
		order[seen++] = cq[0].tag;
	}
	/* QD 1: completions come in submission order: demand 3, 4, the
	 * promoted 2, then prefetch 0, 1. */
	cr_assert_eq(order[0], 3);
	cr_assert_eq(order[1], 4);
	cr_assert_eq(order[2], 2);
	cr_assert_eq(order[3], 0);
	cr_assert_eq(order[4], 1);
	for (uint32_t k = 0; k < 5; k++)
		cr_assert(block_ok(mem + (size_t)k * BLK, (uint64_t)k * BLK, BLK));
	tier_nvme_destroy(n);
	stats_free(st);
	free(mem);
}

Test(nvme, queued_reads_can_be_cancelled)
{
	unsigned char *mem = aligned_alloc(4096, 3 * BLK);
	memset(mem, 0xEE, 3 * BLK);
	struct stats *st = stats_new(0, 0);
	struct tier_nvme_config cfg = { .queue_depth = 2 };
	struct tier_nvme *n;
	struct moe_error err = { "" };
	cr_assert_eq(tier_nvme_create(fd_direct, &cfg, st, &n, &err), 0, "%s", err.msg);
	for (uint32_t k = 0; k < 3; k++) {
		struct tier_nvme_req rq = { .tag = 10 + k, .offset = (uint64_t)k * BLK, .len = BLK,
					    .buf = mem + (size_t)k * BLK, .buf_index = -1, .prefetch = true };
		cr_assert_eq(tier_nvme_queue(n, &rq), 0);
	}
	cr_assert_eq(tier_nvme_cancel(n, 11), 0);
	cr_assert_eq(tier_nvme_cancel(n, 11), -ENOENT, "already cancelled");
	cr_assert_eq(tier_nvme_cancel(n, 99), -ENOENT);
	int res[3] = { 1, 1, 1 };
	unsigned seen = 0;
	while (seen < 3) {
		tier_nvme_submit(n);
		struct tier_nvme_cqe cq[4];
		int k = tier_nvme_reap(n, cq, 4, 1);
		cr_assert_gt(k, 0);
		for (int i = 0; i < k; i++)
			res[cq[i].tag - 10] = cq[i].res;
		seen += (unsigned)k;
	}
	cr_assert_eq(res[0], 0);
	cr_assert_eq(res[1], -ECANCELED);
	cr_assert_eq(res[2], 0);
	cr_assert_eq(mem[BLK], 0xEE, "a cancelled read never touched its buffer");
	cr_assert_eq(stats_get(st, STAT_nvme_cancels), 1);
	cr_assert_eq(stats_get(st, STAT_nvme_reads), 2);
	tier_nvme_destroy(n);
	stats_free(st);
	free(mem);
}

Test(nvme, end_of_file_is_an_error)
{
	unsigned char *mem = aligned_alloc(4096, 2 * BLK);
	struct stats *st = stats_new(0, 0);
	for (int mode = 0; mode < 2; mode++) {
		struct tier_nvme_config cfg = { .queue_depth = 2, .no_uring = mode == 1 };
		struct tier_nvme *n;
		struct moe_error err = { "" };
		cr_assert_eq(tier_nvme_create(fd_direct, &cfg, st, &n, &err), 0, "%s", err.msg);
		/* The last block plus one past the end. */
		struct tier_nvme_req rq = { .tag = 1, .offset = (uint64_t)(NBLK - 1) * BLK, .len = 2 * BLK, .buf = mem,
					    .buf_index = -1 };
		cr_assert_eq(tier_nvme_queue(n, &rq), 0);
		tier_nvme_submit(n);
		struct tier_nvme_cqe cq[1];
		cr_assert_eq(tier_nvme_reap(n, cq, 1, 1), 1);
		cr_assert_eq(cq[0].res, -EIO);
		tier_nvme_destroy(n);
	}
	cr_assert_eq(stats_get(st, STAT_nvme_errors), 2);
	cr_assert_geq(stats_get(st, STAT_nvme_short_reads), 2);
	struct tier_nvme_req bad = { .tag = 1, .len = 0, .buf = mem };
	struct tier_nvme *n;
	cr_assert_eq(tier_nvme_create(fd_direct, NULL, st, &n, NULL), 0);
	cr_assert_eq(tier_nvme_queue(n, &bad), -EINVAL);
	tier_nvme_destroy(n);
	cr_assert_eq(tier_nvme_create(-1, NULL, st, &n, NULL), -EBADF);
	struct tier_nvme_config big = { .queue_depth = TIER_NVME_MAX_QD + 1 };
	cr_assert_eq(tier_nvme_create(fd_direct, &big, st, &n, NULL), -EINVAL);
	stats_free(st);
	free(mem);
}

Test(nvme, failed_registration_falls_back_to_unregistered_reads)
{
	/* Make registration fail the way it does for an unprivileged daemon:
	 * a small RLIMIT_MEMLOCK and no CAP_IPC_LOCK. */
	struct rlimit rl = { 1 << 20, 1 << 20 };
	cr_assert_eq(setrlimit(RLIMIT_MEMLOCK, &rl), 0);
	cap_t caps = cap_get_proc();
	cap_value_t v = CAP_IPC_LOCK;
	cr_assert_not_null(caps);
	cap_set_flag(caps, CAP_EFFECTIVE, 1, &v, CAP_CLEAR);
	cr_assert_eq(cap_set_proc(caps), 0);
	cap_free(caps);

	size_t len = 8 * BLK * 4; /* 2 MiB > 1 MiB limit */
	unsigned char *mem = aligned_alloc(4096, len);
	struct iovec iov = { mem, len };
	struct stats *st = stats_new(0, 0);
	struct tier_nvme_config cfg = { .queue_depth = 2, .buffers = &iov, .n_buffers = 1 };
	struct tier_nvme *n;
	struct moe_error err = { "" };
	cr_assert_eq(tier_nvme_create(fd_direct, &cfg, st, &n, &err), 0, "%s", err.msg);
	cr_assert(!tier_nvme_registered(n));
	cr_assert_eq(stats_get(st, STAT_nvme_register_failures), 1);
	cr_assert_eq(stats_gauge_get(st, GAUGE_nvme_registered), 0);
	struct tier_nvme_req rq = { .tag = 5, .offset = 5 * BLK, .len = BLK, .buf = mem, .buf_index = 0 };
	cr_assert_eq(tier_nvme_queue(n, &rq), 0);
	tier_nvme_submit(n);
	struct tier_nvme_cqe cq[1];
	cr_assert_eq(tier_nvme_reap(n, cq, 1, 1), 1);
	cr_assert_eq(cq[0].res, 0);
	cr_assert(block_ok(mem, 5 * BLK, BLK));
	cr_assert_eq(stats_get(st, STAT_nvme_unregistered_reads), 1);
	tier_nvme_destroy(n);
	stats_free(st);
	free(mem);
}
