/* Description: every injected fault (I/O error, short read, -EAGAIN,
 * -EINTR, corrupted bytes, host and GPU allocation failure, GPU copy
 * failure) is counted, retried where it should be, then reported as an
 * error; no corrupt payload is ever served; nothing leaks (run under ASan
 * with --enable-asan). Also the fault spec parser and MOETIER_FAULTS. */
#include "config.h"

#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "fault.h"
#include "testutil.h"
#include "tiers_testpack.h"

#define N_MOE 2
#define N_EXP 4
#define HID 64
#define WID 32
#define PAYLOAD (3ull * HID * WID * 4)

static char *dir;
static char path[4200];
static struct pack_file *pack;

static void setup(void)
{
	struct moe_error err = { "" };
	cr_assert(fault_enabled(), "tests link the fault-injection build");
	fault_disarm_all();
	dir = tu_mkdtemp("fault");
	snprintf(path, sizeof(path), "%s/t.moepack", dir);
	cr_assert_eq(tp_write(path, N_MOE, N_EXP, HID, WID, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_open(path, 0, &pack, &err), 0, "%s", err.msg);
}

static void teardown(void)
{
	fault_disarm_all();
	pack_close(pack);
	tu_rmtree(dir);
}

TestSuite(fault, .init = setup, .fini = teardown, .timeout = 60);

static struct cache *mk(bool no_uring, unsigned gpu_slots)
{
	struct cache_config cfg = { .host_bytes = 4 * pack_extent_bytes(pack), .gpu_bytes = gpu_slots * PAYLOAD,
				    .gpu_backend = "emulated", .queue_depth = 2, .no_uring = no_uring };
	struct cache *c;
	struct moe_error err = { "" };
	cr_assert_eq(cache_create(pack, &cfg, &c, &err), 0, "%s", err.msg);
	return c;
}

/* Acquires (l, e), waiting as the service does (the cache never waits: a
 * miss is retried once its loads are done, and gets their error if they
 * failed); when served, checks the bytes independently and releases.
 * Returns the entry status. */
static int load_one(struct cache *c, uint32_t l, uint32_t e, unsigned flags)
{
	struct cache_key k = { l, e };
	struct cache_loc loc;
	if (cache_acquire(c, 1, &k, 1, flags, &loc) == 0 && loc.status == -EAGAIN) {
		cr_assert_eq(cache_wait_idle(c, 20000), 0);
		cache_acquire(c, 1, &k, 1, flags, &loc);
	}
	if (loc.status == 0) {
		void *p = loc.tier == CACHE_TIER_GPU ? cache_slot_ptr(c, CACHE_TIER_GPU, loc.slot)
						     : cache_slot_ptr(c, CACHE_TIER_HOST, loc.slot);
		cr_assert_eq(tp_check(p, l, e, PAYLOAD), 0, "a served payload is always the right one");
		cr_assert_eq(cache_release(c, 1, &loc.lease), 0);
	}
	return loc.status;
}

static void check_clean(struct cache *c)
{
	struct moe_error err = { "" };
	cr_assert_eq(cache_wait_idle(c, 20000), 0);
	cr_assert_eq(cache_check_invariants(c, &err), 0, "%s", err.msg);
	struct stats *s = cache_stats(c);
	cr_assert_eq(stats_gauge_get(s, GAUGE_host_slots_leased), 0);
	/* Every slot is either free or holds a verified expert. */
	uint64_t resident = 0;
	for (uint32_t l = 0; l < N_MOE; l++) {
		uint64_t w;
		int n = cache_residency_bitmap(c, CACHE_TIER_HOST, l, &w, 1);
		cr_assert_geq(n, 0);
		resident += (uint64_t)n;
	}
	cr_assert_eq((uint64_t)stats_gauge_get(s, GAUGE_host_slots_used), resident, "no slot left behind by a failed load");
	cr_assert_eq(stats_get(s, STAT_nvme_reads),
		     stats_get(s, STAT_cache_loads_host) + stats_get(s, STAT_cache_checksum_failures));
}

/* One transient fault of each NVMe kind: retried, counted, served. */
struct transient {
	char point[16]; /* an array: parameters are copied into the worker process */
	enum stat_counter counter;
	bool no_uring;
};

ParameterizedTestParameters(fault, transient_nvme_faults_are_retried)
{
	static struct transient t[] = {
		{ "nvme.eio", STAT_nvme_retries_eio, false },    { "nvme.eio", STAT_nvme_retries_eio, true },
		{ "nvme.eagain", STAT_nvme_retries_eagain, false }, { "nvme.eintr", STAT_nvme_retries_eintr, true },
		{ "nvme.short", STAT_nvme_short_reads, false },  { "nvme.short", STAT_nvme_short_reads, true },
		{ "nvme.corrupt", STAT_cache_checksum_rereads, false },
	};
	return cr_make_param_array(struct transient, t, sizeof(t) / sizeof(t[0]));
}

ParameterizedTest(struct transient *t, fault, transient_nvme_faults_are_retried)
{
	struct cache *c = mk(t->no_uring, 0);
	cr_assert_eq(fault_arm_name(t->point, 0, 1), 0);
	cr_assert_eq(load_one(c, 1, 2, 0), 0, "%s once: retried and served", t->point);
	struct stats *s = cache_stats(c);
	cr_assert_eq(stats_get(s, t->counter), 1, "%s counted once", t->point);
	cr_assert_eq(stats_get(s, STAT_faults_injected), 1);
	cr_assert_eq(fault_fired(fault_lookup(t->point)), 1);
	cr_assert_eq(stats_get(s, STAT_cache_load_errors), 0);
	if (strcmp(t->point, "nvme.corrupt") == 0)
		cr_assert_eq(stats_get(s, STAT_cache_checksum_failures), 1);
	check_clean(c);
	cache_destroy(c);
}

/* Persistent faults: bounded retries, then an error; nothing served. */
struct persistent {
	char point[16]; /* an array: parameters are copied into the worker process */
	int want;
};

ParameterizedTestParameters(fault, persistent_nvme_faults_end_in_an_error)
{
	static struct persistent p[] = {
		/* a read whose EAGAIN/EINTR retries run out is an I/O error to the
		 * client, not "interrupted" or "try again" (read as a miss) */
		{ "nvme.eio", -EIO }, { "nvme.eagain", -EIO }, { "nvme.eintr", -EIO },
		{ "nvme.short", -EIO }, { "nvme.corrupt", -EBADMSG },
	};
	return cr_make_param_array(struct persistent, p, sizeof(p) / sizeof(p[0]));
}

ParameterizedTest(struct persistent *p, fault, persistent_nvme_faults_end_in_an_error)
{
	struct cache *c = mk(false, 0);
	cr_assert_eq(fault_arm_name(p->point, 0, -1), 0);
	int st = load_one(c, 0, 3, 0);
	cr_assert_eq(st, p->want, "%s forever: got %d, want %d", p->point, st, p->want);
	struct stats *s = cache_stats(c);
	cr_assert_eq(stats_get(s, STAT_cache_load_errors), 1);
	cr_assert_eq(stats_get(s, STAT_cache_loads_host), 0);
	cr_assert_eq(cache_state(c, (struct cache_key){ 0, 3 }, CACHE_TIER_HOST), CACHE_ABSENT, "the slot is freed");
	if (strcmp(p->point, "nvme.corrupt") == 0) {
		cr_assert_eq(stats_get(s, STAT_cache_checksum_failures), 2, "read, re-read once, then an error");
		cr_assert_eq(stats_get(s, STAT_cache_checksum_rereads), 1);
	} else {
		cr_assert_eq(stats_get(s, STAT_nvme_errors), 1);
	}
	/* Bounded: the retry count is small and finite. */
	cr_assert_leq(stats_get(s, STAT_nvme_submits), 20);
	/* Disarmed, the same expert loads fine. */
	fault_disarm_all();
	cr_assert_eq(load_one(c, 0, 3, 0), 0);
	check_clean(c);
	cache_destroy(c);
}

/* SQLite-style sweep: fail the Nth read (transient and persistent) for
 * N = 0, 1, ... until a full pass runs without the fault firing. */
Test(fault, eio_sweep_fail_after_n)
{
	for (int persistent = 0; persistent < 2; persistent++) {
		for (long nth = 0;; nth++) {
			struct cache *c = mk(false, 0);
			fault_disarm_all();
			cr_assert_eq(fault_arm(FAULT_NVME_EIO, nth, persistent ? -1 : 1), 0);
			uint64_t before = fault_fired(FAULT_NVME_EIO);
			unsigned errors = 0;
			for (uint32_t l = 0; l < N_MOE; l++)
				for (uint32_t e = 0; e < N_EXP; e++) {
					int st = load_one(c, l, e, 0);
					cr_assert(st == 0 || st == -EIO, "status %d", st);
					errors += st != 0;
				}
			bool fired = fault_fired(FAULT_NVME_EIO) > before;
			struct stats *s = cache_stats(c);
			if (!persistent)
				cr_assert_eq(errors, 0, "one transient EIO is absorbed by a retry (nth %ld)", nth);
			cr_assert_eq(stats_get(s, STAT_cache_load_errors), errors);
			check_clean(c);
			cache_destroy(c);
			if (!fired)
				break;
			cr_assert_lt(nth, 64, "the sweep ends");
		}
	}
}

Test(fault, corrupt_payload_is_never_served_nowait)
{
	struct cache *c = mk(false, 0);
	cr_assert_eq(fault_arm(FAULT_NVME_CORRUPT, 0, 2), 0);
	struct cache_key k = { 1, 1 };
	struct cache_loc loc;
	cr_assert_eq(cache_acquire(c, 1, &k, 1, 0, &loc), 0);
	cr_assert_eq(loc.status, -EAGAIN);
	cr_assert_eq(cache_wait_idle(c, 20000), 0);
	/* The failed load is reported once to the next acquire... */
	cr_assert_eq(cache_acquire(c, 1, &k, 1, 0, &loc), 0);
	cr_assert_eq(loc.status, -EBADMSG);
	/* ...and the one after that loads again, cleanly. */
	cr_assert_eq(load_one(c, 1, 1, 0), 0);
	cr_assert_eq(stats_get(cache_stats(c), STAT_cache_checksum_failures), 2);
	check_clean(c);
	cache_destroy(c);
}

Test(fault, host_alloc_failure_at_create_and_at_load)
{
	struct cache_config cfg = { .host_bytes = 4 * pack_extent_bytes(pack) };
	struct cache *c;
	struct moe_error err = { "" };
	cr_assert_eq(fault_arm(FAULT_HOST_ALLOC, 0, 1), 0);
	cr_assert_eq(cache_create(pack, &cfg, &c, &err), -ENOMEM);
	cr_assert(strstr(err.msg, "host.alloc"), "%s", err.msg);
	c = mk(false, 0);
	cr_assert_eq(fault_arm(FAULT_HOST_ALLOC, 0, 1), 0);
	cr_assert_eq(load_one(c, 0, 0, 0), -ENOMEM);
	cr_assert_eq(stats_get(cache_stats(c), STAT_host_alloc_failures), 1);
	cr_assert_eq(load_one(c, 0, 0, 0), 0, "the next try allocates");
	check_clean(c);
	cache_destroy(c);
}

Test(fault, gpu_alloc_and_copy_failures)
{
	struct cache *c = mk(false, 2);
	cr_assert_eq(fault_arm(FAULT_GPU_ALLOC, 0, 1), 0);
	cr_assert_eq(load_one(c, 0, 1, CACHE_WANT_GPU), -ENOMEM);
	cr_assert_eq(load_one(c, 0, 1, CACHE_WANT_GPU), 0);
	cr_assert_eq(fault_arm(FAULT_GPU_COPY, 0, 1), 0);
	cr_assert_eq(load_one(c, 1, 1, CACHE_WANT_GPU), -EIO);
	cr_assert_eq(cache_state(c, (struct cache_key){ 1, 1 }, CACHE_TIER_GPU), CACHE_ABSENT);
	cr_assert_eq(cache_state(c, (struct cache_key){ 1, 1 }, CACHE_TIER_HOST), CACHE_RESIDENT,
		     "the host copy is fine");
	cr_assert_eq(load_one(c, 1, 1, CACHE_WANT_GPU), 0);
	struct stats *s = cache_stats(c);
	cr_assert_eq(stats_get(s, STAT_cache_loads_gpu), 2);
	cr_assert_eq(stats_get(s, STAT_faults_injected), 2);
	check_clean(c);
	cache_destroy(c);
	cr_assert_eq(fault_arm(FAULT_GPU_ALLOC, 0, 1), 0);
	struct cache_config cfg = { .host_bytes = 4 * pack_extent_bytes(pack), .gpu_bytes = 2 * PAYLOAD,
				    .gpu_backend = "emulated" };
	struct moe_error err = { "" };
	cr_assert_eq(cache_create(pack, &cfg, &c, &err), -ENOMEM);
	cr_assert(strstr(err.msg, "gpu.alloc"), "%s", err.msg);
}

Test(fault, fail_after_n_repeat_r)
{
	cr_assert_eq(fault_arm(FAULT_NVME_EAGAIN, 2, 3), 0);
	bool seq[8];
	for (int i = 0; i < 8; i++)
		seq[i] = fault_hit(FAULT_NVME_EAGAIN);
	bool want[8] = { false, false, true, true, true, false, false, false };
	for (int i = 0; i < 8; i++)
		cr_assert_eq(seq[i], want[i], "hit %d", i);
	cr_assert_eq(fault_fired(FAULT_NVME_EAGAIN), 3);
	cr_assert_eq(fault_arm(FAULT_NVME_EIO, 1, -1), 0);
	cr_assert(!fault_hit(FAULT_NVME_EIO));
	for (int i = 0; i < 100; i++)
		cr_assert(fault_hit(FAULT_NVME_EIO), "persistent");
	fault_disarm_all();
	cr_assert(!fault_hit(FAULT_NVME_EIO));
	cr_assert_eq(fault_arm(FAULT_NVME_EIO, -1, 1), -EINVAL);
	cr_assert_eq(fault_arm(FAULT__COUNT, 0, 1), -EINVAL);
}

Test(fault, spec_parser)
{
	struct moe_error err = { "" };
	cr_assert_eq(fault_arm_spec("nvme.eio:3:1,nvme.corrupt:0:-1,host.alloc", &err), 0, "%s", err.msg);
	for (int i = 0; i < 3; i++)
		cr_assert(!fault_hit(FAULT_NVME_EIO));
	cr_assert(fault_hit(FAULT_NVME_EIO));
	cr_assert(!fault_hit(FAULT_NVME_EIO));
	cr_assert(fault_hit(FAULT_NVME_CORRUPT));
	cr_assert(fault_hit(FAULT_HOST_ALLOC), "name alone = fail the next hit once");
	cr_assert(!fault_hit(FAULT_HOST_ALLOC));
	cr_assert_eq(fault_arm_spec("nvme.bogus:1:1", &err), -EINVAL);
	cr_assert(strstr(err.msg, "nvme.bogus"), "%s", err.msg);
	cr_assert_eq(fault_arm_spec("nvme.eio:x:1", &err), -EINVAL);
	cr_assert(strstr(err.msg, "name:after:repeat"), "%s", err.msg);
	cr_assert_eq(fault_arm_spec("nvme.eio:-2:1", &err), -EINVAL);
	cr_assert_eq(fault_lookup("gpu.copy"), FAULT_GPU_COPY);
	cr_assert_str_eq(fault_name(FAULT_NVME_SHORT), "nvme.short");
}

Test(fault, env_var_arms_points_for_the_cache)
{
	setenv("MOETIER_FAULTS", "nvme.eio:0:-1", 1);
	struct cache *c = mk(false, 0);
	cr_assert_eq(load_one(c, 0, 0, 0), -EIO);
	fault_disarm_all();
	cr_assert_eq(load_one(c, 0, 0, 0), 0);
	cache_destroy(c);
	unsetenv("MOETIER_FAULTS");
}
