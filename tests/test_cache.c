/* Description: the residency cache: leases, eviction, stale handles,
 * promotion to the emulated GPU tier, inclusive/exclusive host tier, pins,
 * prefetch, residency bitmaps, the shared arena memfd, counters that add up,
 * and a multi-threaded stress test of the state machine invariants. */
#include "config.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cache.h"
#include "crc32c.h"
#include "testutil.h"
#include "tiers_testpack.h"

#define N_MOE 2
#define N_EXP 8
#define HID 64
#define WID 48
#define PAYLOAD (3ull * HID * WID * 4)

static char *dir;
static char path[4200];
static struct pack_file *pack;

static void setup(void)
{
	struct moe_error err = { "" };
	dir = tu_mkdtemp("cache");
	snprintf(path, sizeof(path), "%s/t.moepack", dir);
	cr_assert_eq(tp_write(path, N_MOE, N_EXP, HID, WID, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_open(path, 0, &pack, &err), 0, "%s", err.msg);
	cr_assert_eq(pack->hdr->extent_payload, PAYLOAD);
}

static void teardown(void)
{
	pack_close(pack);
	tu_rmtree(dir);
}

static struct cache *mk(unsigned host_slots, unsigned gpu_slots, bool exclusive, bool no_uring)
{
	struct cache_config cfg = { .host_bytes = host_slots * pack_extent_bytes(pack),
				    .gpu_bytes = gpu_slots * PAYLOAD, .gpu_backend = "emulated",
				    .exclusive = exclusive, .queue_depth = 4, .no_uring = no_uring };
	struct cache *c;
	struct moe_error err = { "" };
	cr_assert_eq(cache_create(pack, &cfg, &c, &err), 0, "%s", err.msg);
	return c;
}

#define WAIT_MS 10000

/* A blocking acquire as the service does it (the cache itself never
 * waits; server_ring.c parks the entry): retry the misses, all at once so
 * the policy sees one access, whenever a load finished (the eventfd) or a
 * slot may have been freed (1 ms), until served, failed, or timeout_ms.
 * Returns the number served; misses left keep -EAGAIN or -ENOBUFS. */
static int acquire_wait(struct cache *c, uint32_t client, const struct cache_key *k, size_t n, unsigned flags,
			struct cache_loc *out, unsigned timeout_ms)
{
	int served = cache_acquire(c, client, k, n, flags, out);
	uint64_t end = moe_now_ns() + timeout_ms * 1000000ull;
	while (served >= 0 && moe_now_ns() < end) {
		struct cache_key mk[16];
		struct cache_loc ml[16];
		size_t map[16], m = 0;
		for (size_t i = 0; i < n && m < 16; i++)
			if (out[i].status == -EAGAIN || out[i].status == -ENOBUFS) {
				mk[m] = k[i];
				map[m++] = i;
			}
		if (!m)
			break;
		struct pollfd pfd = { cache_eventfd(c), POLLIN, 0 };
		uint64_t v;
		if (poll(&pfd, 1, 1) == 1 && read(pfd.fd, &v, sizeof(v)) < 0)
			cr_log_info("eventfd already read by another thread");
		int got = cache_acquire(c, client, mk, m, flags, ml);
		if (got < 0)
			return got;
		for (size_t j = 0; j < m; j++)
			out[map[j]] = ml[j];
		served += got;
	}
	return served;
}

static void *loc_ptr(struct cache *c, const struct cache_loc *loc)
{
	struct cache_arena_info ai;
	cr_assert_eq(cache_arena(c, loc->tier, &ai), 0);
	return (char *)ai.base + loc->offset;
}

static void check_inv(struct cache *c)
{
	struct moe_error err = { "" };
	cr_assert_eq(cache_check_invariants(c, &err), 0, "%s", err.msg);
}

static void check_counters(struct cache *c)
{
	struct stats *s = cache_stats(c);
	cr_assert_eq(stats_get(s, STAT_cache_acquires),
		     stats_get(s, STAT_cache_hits_gpu) + stats_get(s, STAT_cache_hits_host) +
			     stats_get(s, STAT_cache_misses) + stats_get(s, STAT_cache_rejects),
		     "acquires = hits + misses + rejects");
	cr_assert_eq(stats_get(s, STAT_nvme_reads),
		     stats_get(s, STAT_cache_loads_host) + stats_get(s, STAT_cache_checksum_failures),
		     "every completed read is a verified load or a CRC failure");
	cr_assert_eq(stats_get(s, STAT_cache_load_bytes_host), stats_get(s, STAT_cache_loads_host) * PAYLOAD);
	uint64_t per_expert_loads = 0, per_expert_hits = 0, per_expert_misses = 0;
	for (uint32_t l = 0; l < N_MOE; l++)
		for (uint32_t e = 0; e < N_EXP; e++) {
			per_expert_loads += stats_expert_get(s, l, e, STAT_EXPERT_LOADS);
			per_expert_hits += stats_expert_get(s, l, e, STAT_EXPERT_HITS);
			per_expert_misses += stats_expert_get(s, l, e, STAT_EXPERT_MISSES);
		}
	cr_assert_eq(per_expert_loads, stats_get(s, STAT_cache_loads_host));
	cr_assert_eq(per_expert_hits, stats_get(s, STAT_cache_hits_gpu) + stats_get(s, STAT_cache_hits_host));
	cr_assert_eq(per_expert_misses, stats_get(s, STAT_cache_misses));
}

TestSuite(cache, .init = setup, .fini = teardown, .timeout = 60);

Test(cache, acquire_serves_verified_payload_and_leases)
{
	struct cache *c = mk(4, 0, false, false);
	struct cache_key k[3] = { { 0, 1 }, { 1, 7 }, { 0, 1 } };
	struct cache_loc loc[3];
	cr_assert_eq(acquire_wait(c, 42, k, 3, 0, loc, WAIT_MS), 3);
	for (int i = 0; i < 3; i++) {
		cr_assert_eq(loc[i].status, 0);
		cr_assert_eq(loc[i].tier, CACHE_TIER_HOST);
		cr_assert_eq(loc[i].length, PAYLOAD);
		cr_assert_eq(loc[i].offset % 4096, 0);
		cr_assert_eq(tp_check(loc_ptr(c, &loc[i]), k[i].layer, k[i].expert, PAYLOAD), 0);
	}
	cr_assert_eq(loc[0].slot, loc[2].slot, "the same expert is loaded once");
	cr_assert_eq(cache_state(c, k[0], CACHE_TIER_HOST), CACHE_RESIDENT);
	cr_assert_eq(stats_get(cache_stats(c), STAT_cache_loads_host), 2);
	check_inv(c);
	for (int i = 0; i < 3; i++)
		cr_assert_eq(cache_release(c, 42, &loc[i].lease), 0);
	cr_assert_eq(cache_release(c, 42, &loc[0].lease), -ESTALE, "double release is refused");
	cr_assert_eq(cache_lease_check(c, 42, &loc[1].lease), -ESTALE);
	check_inv(c);
	check_counters(c);
	struct stats *s = cache_stats(c);
	cr_assert_eq(stats_get(s, STAT_cache_leases), stats_get(s, STAT_cache_releases));
	cache_destroy(c);
}

Test(cache, bad_keys_are_rejected_per_entry)
{
	struct cache *c = mk(2, 0, false, false);
	struct cache_key k[3] = { { 0, N_EXP }, { N_MOE, 0 }, { 1, 1 } };
	struct cache_loc loc[3];
	cr_assert_eq(acquire_wait(c, 1, k, 3, 0, loc, WAIT_MS), 1);
	cr_assert_eq(loc[0].status, -EINVAL);
	cr_assert_eq(loc[1].status, -EINVAL);
	cr_assert_eq(loc[2].status, 0);
	cr_assert_eq(cache_release_client(c, 1), 1);
	check_counters(c);
	cr_assert_eq(cache_pin(c, k[0], CACHE_TIER_HOST), -EINVAL);
	cr_assert_eq(cache_evict(c, k[1], CACHE_TIER_HOST), -EINVAL);
	cr_assert_eq(cache_pin(c, k[2], CACHE_TIER_GPU), -ENODEV, "no GPU tier configured");
	cache_destroy(c);
}

Test(cache, lru_eviction_never_takes_a_leased_slot)
{
	struct cache *c = mk(2, 0, false, false);
	struct cache_loc a, b, x;
	struct cache_key ka = { 0, 0 }, kb = { 0, 1 }, kx = { 0, 2 };
	cr_assert_eq(acquire_wait(c, 1, &ka, 1, 0, &a, WAIT_MS), 1);
	cr_assert_eq(acquire_wait(c, 1, &kb, 1, 0, &b, WAIT_MS), 1);
	/* Both slots leased: a third expert cannot get one. */
	cr_assert_eq(cache_acquire(c, 2, &kx, 1, 0, &x), 0);
	cr_assert_eq(x.status, -ENOBUFS);
	cr_assert_eq(cache_evict(c, ka, CACHE_TIER_HOST), -EBUSY);
	cr_assert_eq(tp_check(loc_ptr(c, &a), 0, 0, PAYLOAD), 0);
	cr_assert_eq(tp_check(loc_ptr(c, &b), 0, 1, PAYLOAD), 0);
	/* Release b: the only slot nothing holds, so x takes it. */
	cr_assert_eq(cache_release(c, 1, &b.lease), 0);
	cr_assert_eq(acquire_wait(c, 2, &kx, 1, 0, &x, WAIT_MS), 1);
	cr_assert_eq(x.slot, b.slot);
	cr_assert_eq(cache_state(c, kb, CACHE_TIER_HOST), CACHE_ABSENT);
	cr_assert_eq(cache_state(c, ka, CACHE_TIER_HOST), CACHE_RESIDENT);
	cr_assert_eq(tp_check(loc_ptr(c, &a), 0, 0, PAYLOAD), 0, "leased payload untouched");
	cr_assert_eq(tp_check(loc_ptr(c, &x), 0, 2, PAYLOAD), 0);
	cr_assert_eq(stats_get(cache_stats(c), STAT_cache_evictions_host), 1);
	/* Release a and x, then touch x: a is the LRU victim. */
	cr_assert_eq(cache_release(c, 1, &a.lease), 0);
	cr_assert_eq(cache_release(c, 2, &x.lease), 0);
	struct cache_loc y;
	cr_assert_eq(acquire_wait(c, 3, &kx, 1, 0, &y, WAIT_MS), 1);
	cr_assert_eq(cache_release(c, 3, &y.lease), 0);
	cr_assert_eq(acquire_wait(c, 3, &kb, 1, 0, &y, WAIT_MS), 1);
	cr_assert_eq(cache_state(c, ka, CACHE_TIER_HOST), CACHE_ABSENT, "a was least recently used");
	cr_assert_eq(cache_state(c, kx, CACHE_TIER_HOST), CACHE_RESIDENT);
	cr_assert_eq(cache_release_client(c, 3), 1);
	check_inv(c);
	check_counters(c);
	cache_destroy(c);
}

/* The cache never waits, even with every slot leased: the miss comes back
 * -ENOBUFS at once (the service's parked acquire, which does wait and time
 * out, is tested in test_server). */
Test(cache, acquire_never_waits_when_every_slot_is_leased)
{
	struct cache_config cfg = { .host_bytes = pack_extent_bytes(pack) };
	struct cache *c;
	struct moe_error err = { "" };
	cr_assert_eq(cache_create(pack, &cfg, &c, &err), 0, "%s", err.msg);
	struct cache_key k0 = { 0, 0 }, k1 = { 1, 0 };
	struct cache_loc a, b;
	cr_assert_eq(acquire_wait(c, 1, &k0, 1, 0, &a, WAIT_MS), 1);
	uint64_t t0 = moe_now_ns();
	cr_assert_eq(cache_acquire(c, 2, &k1, 1, 0, &b), 0);
	cr_assert_lt(moe_now_ns() - t0, 1000000000ull, "returned at once");
	cr_assert_eq(b.status, -ENOBUFS);
	struct stats *s = cache_stats(c);
	cr_assert_eq(stats_get(s, STAT_cache_no_slot), 1);
	cr_assert_eq(stats_get(s, STAT_cache_stalls) + stats_get(s, STAT_cache_timeouts), 0, "nothing waited");
	cr_assert_eq(acquire_wait(c, 2, &k1, 1, 0, &b, 100), 0, "still no slot while the lease is held");
	cr_assert_eq(b.status, -ENOBUFS);
	cr_assert_eq(cache_release(c, 1, &a.lease), 0);
	cr_assert_eq(acquire_wait(c, 2, &k1, 1, 0, &b, WAIT_MS), 1);
	cr_assert_eq(tp_check(loc_ptr(c, &b), 1, 0, PAYLOAD), 0);
	cache_release_client(c, 2);
	check_inv(c);
	cache_destroy(c);
}

Test(cache, stale_lease_is_detected_after_the_slot_is_reused)
{
	struct cache *c = mk(1, 0, false, false);
	struct cache_key k0 = { 0, 3 }, k1 = { 1, 4 };
	struct cache_loc a, b;
	cr_assert_eq(acquire_wait(c, 9, &k0, 1, 0, &a, WAIT_MS), 1);
	struct cache_lease old = a.lease;
	cr_assert_eq(cache_release(c, 9, &a.lease), 0);
	cr_assert_eq(acquire_wait(c, 9, &k1, 1, 0, &b, WAIT_MS), 1);
	cr_assert_eq(b.slot, a.slot, "one slot: it was reused");
	cr_assert_neq(b.lease.generation, old.generation);
	cr_assert_eq(cache_lease_check(c, 9, &old), -ESTALE);
	cr_assert_eq(cache_release(c, 9, &old), -ESTALE);
	cr_assert_eq(cache_lease_check(c, 9, &b.lease), 0);
	cr_assert_eq(cache_release(c, 8, &b.lease), -ESTALE, "another client's lease");
	cr_assert_eq(cache_release(c, 9, &b.lease), 0);
	cr_assert_geq(stats_get(cache_stats(c), STAT_cache_stale_leases), 3);
	check_inv(c);
	cache_destroy(c);
}

Test(cache, nowait_miss_then_eventfd_then_hit)
{
	struct cache *c = mk(4, 0, false, false);
	struct cache_key k = { 1, 2 };
	struct cache_loc loc;
	cr_assert_eq(cache_acquire(c, 1, &k, 1, 0, &loc), 0);
	cr_assert_eq(loc.status, -EAGAIN);
	/* The eventfd says a load finished. */
	uint64_t v = 0;
	for (int i = 0; i < 2000 && cache_state(c, k, CACHE_TIER_HOST) != CACHE_RESIDENT; i++)
		usleep(1000);
	cr_assert_eq(cache_state(c, k, CACHE_TIER_HOST), CACHE_RESIDENT);
	cr_assert_eq(read(cache_eventfd(c), &v, sizeof(v)), (ssize_t)sizeof(v));
	cr_assert_geq(v, 1);
	cr_assert_eq(cache_acquire(c, 1, &k, 1, 0, &loc), 1);
	cr_assert_eq(tp_check(loc_ptr(c, &loc), 1, 2, PAYLOAD), 0);
	struct stats *s = cache_stats(c);
	cr_assert_eq(stats_get(s, STAT_cache_nowait_misses), 1);
	cr_assert_eq(stats_get(s, STAT_cache_hits_host), 1);
	cr_assert_eq(cache_acquire(c, 1, &(struct cache_key){ 0, 0 }, 1, CACHE_NO_LOAD, &loc), 0);
	cr_assert_eq(loc.status, -EAGAIN);
	cr_assert_eq(cache_state(c, (struct cache_key){ 0, 0 }, CACHE_TIER_HOST), CACHE_ABSENT, "NO_LOAD starts nothing");
	cache_release_client(c, 1);
	check_counters(c);
	cache_destroy(c);
}

Test(cache, pread_fallback_serves_the_same_bytes)
{
	struct cache *c = mk(3, 0, false, true);
	cr_assert_str_eq(cache_io_engine(c), "pread");
	struct cache_key k[4] = { { 0, 0 }, { 0, 5 }, { 1, 6 }, { 1, 7 } };
	for (int i = 0; i < 4; i++) {
		struct cache_loc loc;
		cr_assert_eq(acquire_wait(c, 1, &k[i], 1, 0, &loc, WAIT_MS), 1);
		cr_assert_eq(tp_check(loc_ptr(c, &loc), k[i].layer, k[i].expert, PAYLOAD), 0);
		cr_assert_eq(cache_release(c, 1, &loc.lease), 0);
	}
	struct stats *s = cache_stats(c);
	cr_assert_eq(stats_gauge_get(s, GAUGE_nvme_uring), 0);
	cr_assert_geq(stats_get(s, STAT_nvme_pread_fallback), 4);
	struct stats_snapshot snap;
	cr_assert_eq(stats_snapshot(s, &snap), 0);
	char *txt = stats_render_text(&snap, false);
	cr_assert(strstr(txt, "pread"), "stats name the fallback: %s", txt);
	free(txt);
	stats_snapshot_free(&snap);
	check_counters(c);
	cache_destroy(c);
}

Test(cache, pins_are_never_evicted)
{
	struct cache *c = mk(2, 0, false, false);
	struct cache_key kp = { 0, 0 };
	cr_assert_eq(cache_pin(c, kp, CACHE_TIER_HOST), 0);
	cr_assert_eq(cache_wait_idle(c, 10000), 0);
	cr_assert_eq(cache_state(c, kp, CACHE_TIER_HOST), CACHE_RESIDENT);
	for (uint32_t e = 1; e < N_EXP; e++) {
		struct cache_loc loc;
		struct cache_key k = { 1, e };
		cr_assert_eq(acquire_wait(c, 1, &k, 1, 0, &loc, WAIT_MS), 1);
		cr_assert_eq(cache_release(c, 1, &loc.lease), 0);
		cr_assert_eq(cache_state(c, kp, CACHE_TIER_HOST), CACHE_RESIDENT);
	}
	cr_assert_eq(cache_evict(c, kp, CACHE_TIER_HOST), -EBUSY);
	cr_assert_eq(cache_unpin(c, kp, CACHE_TIER_HOST), 0);
	cr_assert_eq(cache_unpin(c, kp, CACHE_TIER_HOST), -ENOENT);
	cr_assert_eq(cache_evict(c, kp, CACHE_TIER_HOST), 0);
	cr_assert_eq(cache_evict(c, kp, CACHE_TIER_HOST), -ENOENT);
	check_inv(c);
	cache_destroy(c);
}

Test(cache, prefetch_loads_then_counts_the_hit)
{
	struct cache *c = mk(4, 0, false, false);
	struct cache_key k[3] = { { 0, 1 }, { 0, 2 }, { 1, 3 } };
	cr_assert_eq(cache_prefetch(c, k, 3, CACHE_TIER_HOST), 3);
	cr_assert_eq(cache_prefetch(c, k, 3, CACHE_TIER_HOST), 0, "already loading or resident");
	cr_assert_eq(cache_wait_idle(c, 10000), 0);
	struct cache_loc loc[3];
	cr_assert_eq(cache_acquire(c, 1, k, 3, 0, loc), 3);
	for (int i = 0; i < 3; i++)
		cr_assert_eq(tp_check(loc_ptr(c, &loc[i]), k[i].layer, k[i].expert, PAYLOAD), 0);
	struct stats *s = cache_stats(c);
	cr_assert_eq(stats_get(s, STAT_cache_prefetches), 3);
	cr_assert_eq(stats_get(s, STAT_cache_prefetch_hits), 3);
	cr_assert_eq(stats_get(s, STAT_cache_hits_host), 3);
	cr_assert_eq(cache_release_client(c, 1), 3);
	check_counters(c);
	cache_destroy(c);
}

Test(cache, residency_bitmap)
{
	struct cache *c = mk(4, 0, false, false);
	struct cache_key k[3] = { { 1, 0 }, { 1, 5 }, { 0, 7 } };
	struct cache_loc loc[3];
	cr_assert_eq(acquire_wait(c, 1, k, 3, 0, loc, WAIT_MS), 3);
	uint64_t w[1];
	cr_assert_eq(cache_residency_bitmap(c, CACHE_TIER_HOST, 1, w, 1), 2);
	cr_assert_eq(w[0], (1ull << 0) | (1ull << 5));
	cr_assert_eq(cache_residency_bitmap(c, CACHE_TIER_HOST, 0, w, 1), 1);
	cr_assert_eq(w[0], 1ull << 7);
	cr_assert_eq(cache_residency_bitmap(c, CACHE_TIER_GPU, 0, w, 1), 0);
	cr_assert_eq(cache_residency_bitmap(c, CACHE_TIER_HOST, 2, w, 1), -EINVAL);
	cr_assert_eq(cache_residency_bitmap(c, CACHE_TIER_HOST, 0, w, 0), -EINVAL);
	cache_release_client(c, 1);
	cache_destroy(c);
}

Test(cache, host_arena_memfd_maps_read_only_with_the_same_bytes)
{
	struct cache *c = mk(2, 0, false, false);
	struct cache_key k = { 1, 1 };
	struct cache_loc loc;
	cr_assert_eq(acquire_wait(c, 1, &k, 1, 0, &loc, WAIT_MS), 1);
	struct cache_arena_info ai;
	cr_assert_eq(cache_arena(c, CACHE_TIER_HOST, &ai), 0);
	cr_assert_geq(ai.fd, 0);
	cr_assert_eq(ai.n_slots, 2);
	void *ro = mmap(NULL, ai.bytes, PROT_READ, MAP_SHARED, ai.fd, 0);
	cr_assert_neq(ro, MAP_FAILED);
	cr_assert_eq(tp_check((char *)ro + loc.offset, 1, 1, PAYLOAD), 0);
	munmap(ro, ai.bytes);
	cr_assert_eq(ftruncate(ai.fd, 4096), -1, "sealed against shrinking");
	cache_release_client(c, 1);
	cache_destroy(c);
}

Test(cache, gpu_promotion_inclusive)
{
	struct cache *c = mk(4, 2, false, false);
	struct cache_key k[3] = { { 0, 0 }, { 0, 1 }, { 0, 2 } };
	struct cache_loc loc[3];
	cr_assert_eq(acquire_wait(c, 1, k, 2, CACHE_WANT_GPU, loc, WAIT_MS), 2);
	for (int i = 0; i < 2; i++) {
		cr_assert_eq(loc[i].tier, CACHE_TIER_GPU);
		cr_assert_eq(tp_check(cache_slot_ptr(c, CACHE_TIER_GPU, loc[i].slot), 0, k[i].expert, PAYLOAD), 0);
		cr_assert_eq(tp_check(loc_ptr(c, &loc[i]), 0, k[i].expert, PAYLOAD), 0);
		cr_assert_eq(cache_state(c, k[i], CACHE_TIER_HOST), CACHE_RESIDENT, "inclusive");
	}
	/* GPU full and leased: a third WANT_GPU gets no slot. */
	cr_assert_eq(cache_acquire(c, 1, &k[2], 1, CACHE_WANT_GPU, &loc[2]), 0);
	cr_assert(loc[2].status == -ENOBUFS || loc[2].status == -EAGAIN);
	cr_assert_eq(cache_release(c, 1, &loc[0].lease), 0);
	cr_assert_eq(acquire_wait(c, 1, &k[2], 1, CACHE_WANT_GPU, &loc[2], WAIT_MS), 1);
	cr_assert_eq(loc[2].tier, CACHE_TIER_GPU);
	cr_assert_eq(cache_state(c, k[0], CACHE_TIER_GPU), CACHE_ABSENT);
	cr_assert_eq(tp_check(loc_ptr(c, &loc[2]), 0, 2, PAYLOAD), 0);
	struct stats *s = cache_stats(c);
	cr_assert_eq(stats_get(s, STAT_cache_loads_gpu), 3);
	cr_assert_eq(stats_get(s, STAT_cache_evictions_gpu), 1);
	uint64_t w;
	cr_assert_eq(cache_residency_bitmap(c, CACHE_TIER_GPU, 0, &w, 1), 2);
	cr_assert_eq(w, 0x6);
	cache_release_client(c, 1);
	check_inv(c);
	check_counters(c);
	cache_destroy(c);
}

Test(cache, gpu_promotion_exclusive_drops_the_host_copy)
{
	struct cache *c = mk(2, 2, true, false);
	struct cache_key k = { 1, 3 };
	struct cache_loc loc;
	cr_assert_eq(acquire_wait(c, 1, &k, 1, CACHE_WANT_GPU, &loc, WAIT_MS), 1);
	cr_assert_eq(loc.tier, CACHE_TIER_GPU);
	cr_assert_eq(cache_wait_idle(c, 10000), 0);
	cr_assert_eq(cache_state(c, k, CACHE_TIER_HOST), CACHE_ABSENT, "exclusive: host copy let go");
	cr_assert_eq(tp_check(loc_ptr(c, &loc), 1, 3, PAYLOAD), 0);
	/* A host lease held while the copy lands keeps the host copy. */
	struct cache_key k2 = { 1, 4 };
	struct cache_loc h, g;
	cr_assert_eq(acquire_wait(c, 2, &k2, 1, 0, &h, WAIT_MS), 1);
	cr_assert_eq(acquire_wait(c, 2, &k2, 1, CACHE_WANT_GPU, &g, WAIT_MS), 1);
	cr_assert_eq(cache_state(c, k2, CACHE_TIER_HOST), CACHE_RESIDENT);
	cr_assert_eq(cache_release(c, 2, &h.lease), 0);
	cr_assert_eq(cache_state(c, k2, CACHE_TIER_HOST), CACHE_ABSENT, "released: now dropped");
	cache_release_client(c, 1);
	cache_release_client(c, 2);
	check_inv(c);
	cache_destroy(c);
}

Test(cache, release_client_drops_every_lease)
{
	struct cache *c = mk(4, 2, false, false);
	struct cache_key k[4] = { { 0, 0 }, { 0, 1 }, { 1, 1 }, { 0, 0 } };
	struct cache_loc loc[4];
	cr_assert_eq(acquire_wait(c, 77, k, 4, 0, loc, WAIT_MS), 4);
	cr_assert_eq(acquire_wait(c, 77, k, 1, CACHE_WANT_GPU, loc, WAIT_MS), 1);
	cr_assert_eq(stats_gauge_get(cache_stats(c), GAUGE_clients_with_leases), 1);
	cr_assert_eq(cache_release_client(c, 77), 5);
	cr_assert_eq(cache_release_client(c, 77), 0);
	cr_assert_eq(stats_gauge_get(cache_stats(c), GAUGE_host_slots_leased), 0);
	cr_assert_eq(stats_gauge_get(cache_stats(c), GAUGE_gpu_slots_leased), 0);
	for (int i = 0; i < 3; i++)
		cr_assert_eq(cache_evict(c, k[i], CACHE_TIER_HOST), 0, "nothing holds them now");
	check_inv(c);
	cache_destroy(c);
}

Test(cache, stats_render_json_and_prometheus)
{
	struct cache *c = mk(2, 0, false, false);
	struct cache_key k = { 1, 6 };
	struct cache_loc loc;
	cr_assert_eq(acquire_wait(c, 1, &k, 1, 0, &loc, WAIT_MS), 1);
	cache_release_client(c, 1);
	struct stats_snapshot snap;
	cr_assert_eq(stats_snapshot(cache_stats(c), &snap), 0);
	char *js = stats_render_json(&snap, true);
	json_error_t je;
	json_t *root = json_loads(js, 0, &je);
	cr_assert_not_null(root, "%s", je.text);
	cr_assert_eq(json_integer_value(json_object_get(json_object_get(root, "counters"), "cache_loads_host")), 1);
	json_t *loads = json_object_get(json_object_get(root, "experts"), "loads");
	cr_assert_eq(json_array_size(loads), N_MOE);
	cr_assert_eq(json_integer_value(json_array_get(json_array_get(loads, 1), 6)), 1);
	cr_assert_eq(json_integer_value(json_object_get(json_object_get(json_object_get(root, "histograms"), "nvme_read_ns"), "count")), 1);
	json_decref(root);
	free(js);
	char *pr = stats_render_prometheus(&snap, true);
	cr_assert(strstr(pr, "moetier_cache_loads_host_total 1\n"));
	cr_assert(strstr(pr, "moetier_expert_loads_total{layer=\"1\",expert=\"6\"} 1\n"));
	cr_assert(strstr(pr, "moetier_nvme_read_seconds_count 1\n"));
	cr_assert(strstr(pr, "# TYPE moetier_host_slots gauge\n"));
	free(pr);
	/* Every counter named in the X-macro list is in the text rendering. */
	char *txt = stats_render_text(&snap, true);
	for (int i = 0; i < STAT__COUNT; i++)
		cr_assert(strstr(txt, stats_counter_name(i)), "%s missing", stats_counter_name(i));
	free(txt);
	stats_snapshot_free(&snap);
	cr_assert_eq(stats_hist_bucket(0), 0);
	cr_assert_eq(stats_hist_bucket(1), 1);
	cr_assert_eq(stats_hist_bucket(1023), 10);
	cr_assert_eq(stats_hist_bucket(1024), 11);
	cr_assert_eq(stats_hist_bucket(UINT64_MAX), STATS_HIST_BUCKETS - 1);
	cache_destroy(c);
}

/* ---- multi-threaded stress ---------------------------------------------- */

#define STRESS_THREADS 4
#define STRESS_ITERS 400
#define HELD_MAX 3

struct stress_arg {
	struct cache *c;
	unsigned id;
	unsigned bad;
	char why[200];
};

static uint32_t xs(uint32_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 17;
	*s ^= *s << 5;
	return *s;
}

static void *stress_main(void *p)
{
	struct stress_arg *a = p;
	uint32_t seed = 0x12345u + a->id * 7777u;
	struct cache_loc held[HELD_MAX];
	struct cache_key held_k[HELD_MAX];
	unsigned n_held = 0;
	for (int it = 0; it < STRESS_ITERS && !a->bad; it++) {
		uint32_t r = xs(&seed);
		unsigned op = r % 10;
		if (op < 6 && n_held < HELD_MAX) {
			struct cache_key k = { xs(&seed) % N_MOE, xs(&seed) % N_EXP };
			unsigned flags = (r >> 9) % 3 == 0 ? CACHE_WANT_GPU : 0;
			struct cache_loc loc;
			/* Half the acquires return at once, half wait a little. */
			int n = acquire_wait(a->c, a->id, &k, 1, flags, &loc, (r >> 8) & 1 ? 0 : 300);
			if (n == 1) {
				held[n_held] = loc;
				held_k[n_held++] = k;
			} else if (!(loc.status == -EAGAIN || loc.status == -ENOBUFS)) {
				snprintf(a->why, sizeof(a->why), "acquire status %d", loc.status);
				a->bad++;
			}
		} else if (op < 9 && n_held) {
			unsigned i = xs(&seed) % n_held;
			void *ptr = loc_ptr(a->c, &held[i]);
			/* A leased slot is never overwritten: still the right bytes. */
			if (tp_check(ptr, held_k[i].layer, held_k[i].expert, PAYLOAD) != 0) {
				snprintf(a->why, sizeof(a->why), "leased payload of %u/%u changed", held_k[i].layer,
					 held_k[i].expert);
				a->bad++;
			}
			if (cache_release(a->c, a->id, &held[i].lease) != 0) {
				snprintf(a->why, sizeof(a->why), "release of a live lease failed");
				a->bad++;
			}
			/* Released: the same lease is now stale, unless this thread
			 * holds the same (tier, slot, generation) again (leases
			 * are counted). */
			bool dup = false;
			for (unsigned j = 0; j < n_held; j++)
				dup |= j != i && held[j].lease.tier == held[i].lease.tier &&
				       held[j].lease.slot == held[i].lease.slot &&
				       held[j].lease.generation == held[i].lease.generation;
			if (!dup && cache_release(a->c, a->id, &held[i].lease) != -ESTALE) {
				snprintf(a->why, sizeof(a->why), "double release accepted");
				a->bad++;
			}
			held[i] = held[--n_held];
			held_k[i] = held_k[n_held];
		} else if (op == 9) {
			struct cache_key k = { xs(&seed) % N_MOE, xs(&seed) % N_EXP };
			int rc = cache_evict(a->c, k, (r >> 8) & 1 ? CACHE_TIER_GPU : CACHE_TIER_HOST);
			if (rc != 0 && rc != -EBUSY && rc != -ENOENT) {
				snprintf(a->why, sizeof(a->why), "evict: %d", rc);
				a->bad++;
			}
			if ((r >> 12) % 4 == 0)
				cache_prefetch(a->c, &k, 1, CACHE_TIER_HOST);
		}
	}
	for (unsigned i = 0; i < n_held; i++)
		if (tp_check(loc_ptr(a->c, &held[i]), held_k[i].layer, held_k[i].expert, PAYLOAD) != 0)
			a->bad++;
	/* Half the threads die holding leases: the client id is reclaimed. */
	if (a->id % 2)
		cache_release_client(a->c, a->id);
	else
		for (unsigned i = 0; i < n_held; i++)
			if (cache_release(a->c, a->id, &held[i].lease) != 0)
				a->bad++;
	return NULL;
}

static void stress(bool exclusive)
{
	struct cache_config cfg = { .host_bytes = 6 * pack_extent_bytes(pack), .gpu_bytes = 4 * PAYLOAD,
				    .gpu_backend = "emulated", .exclusive = exclusive, .queue_depth = 4 };
	struct cache *c;
	struct moe_error err = { "" };
	cr_assert_eq(cache_create(pack, &cfg, &c, &err), 0, "%s", err.msg);
	pthread_t th[STRESS_THREADS];
	struct stress_arg arg[STRESS_THREADS];
	for (unsigned i = 0; i < STRESS_THREADS; i++) {
		arg[i] = (struct stress_arg){ .c = c, .id = i + 1 };
		cr_assert_eq(pthread_create(&th[i], NULL, stress_main, &arg[i]), 0);
	}
	for (int round = 0; round < 50; round++) {
		check_inv(c);
		usleep(2000);
	}
	for (unsigned i = 0; i < STRESS_THREADS; i++) {
		pthread_join(th[i], NULL);
		cr_assert_eq(arg[i].bad, 0, "thread %u: %s", i, arg[i].why);
	}
	cr_assert_eq(cache_wait_idle(c, 20000), 0);
	check_inv(c);
	check_counters(c);
	struct stats *s = cache_stats(c);
	cr_assert_eq(stats_get(s, STAT_cache_leases),
		     stats_get(s, STAT_cache_releases) + stats_get(s, STAT_cache_client_releases),
		     "every lease handed out came back");
	cr_assert_eq(stats_gauge_get(s, GAUGE_host_slots_leased), 0);
	cr_assert_gt(stats_get(s, STAT_cache_evictions_host), 0, "the stress test evicts");
	cr_assert_gt(stats_get(s, STAT_cache_loads_gpu), 0);
	cache_destroy(c);
}

Test(cache, stress_inclusive, .timeout = 120)
{
	stress(false);
}

Test(cache, stress_exclusive, .timeout = 120)
{
	stress(true);
}

Test(cache, prefetches_no_longer_wanted_are_cancelled)
{
	struct cache_config cfg = { .host_bytes = 16 * pack_extent_bytes(pack), .queue_depth = 1 };
	struct cache *c;
	struct moe_error err = { "" };
	cr_assert_eq(cache_create(pack, &cfg, &c, &err), 0, "%s", err.msg);
	struct cache_key k[N_MOE * N_EXP];
	for (uint32_t i = 0; i < N_MOE * N_EXP; i++)
		k[i] = (struct cache_key){ i / N_EXP, i % N_EXP };
	struct stats *s = cache_stats(c);
	/* Prefetch all 16 with one read in flight, and cancel them at once:
	 * the queued ones must be cancelled. How many depends on how far the
	 * I/O thread got (the deterministic cancel semantics are in
	 * test_tier_nvme), so a round in which it read all 16 first is
	 * repeated (evicting them) - but a cancel that never cancels anything
	 * fails here. */
	uint64_t started = 0, asked = 0;
	int round;
	for (round = 0; round < 20 && stats_get(s, STAT_cache_prefetch_cancels) == 0; round++) {
		for (uint32_t i = 0; i < N_MOE * N_EXP; i++)
			if (cache_state(c, k[i], CACHE_TIER_HOST) == CACHE_RESIDENT)
				cr_assert_eq(cache_evict(c, k[i], CACHE_TIER_HOST), 0);
		cr_assert_eq(cache_prefetch(c, k, N_MOE * N_EXP, CACHE_TIER_HOST), N_MOE * N_EXP);
		started += N_MOE * N_EXP;
		int a = cache_prefetch_cancel(c, k, N_MOE * N_EXP);
		cr_assert_geq(a, 0);
		asked += (uint64_t)a;
		cr_assert_eq(cache_wait_idle(c, 20000), 0);
	}
	uint64_t cancels = stats_get(s, STAT_cache_prefetch_cancels), loads = stats_get(s, STAT_cache_loads_host);
	cr_log_info("prefetch cancels: %d round(s), asked %llu, done %llu", round, (unsigned long long)asked,
		    (unsigned long long)cancels);
	cr_assert_gt(cancels, 0, "no prefetch was cancelled in %d rounds of 16 queued reads", round);
	cr_assert_eq(cancels + loads, started, "each prefetch either loaded or was cancelled");
	cr_assert_leq(cancels, asked);
	cr_assert_eq(stats_get(s, STAT_cache_load_errors), 0);
	int64_t resident = 0;
	for (uint32_t i = 0; i < N_MOE * N_EXP; i++) {
		enum cache_residency r = cache_state(c, k[i], CACHE_TIER_HOST);
		cr_assert(r == CACHE_ABSENT || r == CACHE_RESIDENT);
		if (r == CACHE_RESIDENT) {
			struct cache_loc loc;
			resident++;
			cr_assert_eq(cache_acquire(c, 1, &k[i], 1, 0, &loc), 1);
			cr_assert_eq(tp_check(loc_ptr(c, &loc), k[i].layer, k[i].expert, PAYLOAD), 0);
		}
	}
	/* Every cancel happened in the last round (the loop stops at the
	 * first): the rest of that round is resident. */
	cr_assert_eq(resident, (int64_t)(N_MOE * N_EXP - cancels), "resident %lld", (long long)resident);
	cr_assert_eq(stats_gauge_get(s, GAUGE_host_slots_used), resident, "cancelled slots are free");
	cache_release_client(c, 1);
	check_inv(c);
	cache_destroy(c);
}
