/* Description: the pieces that make the live daemon agree with moe-sim:
 * per-layer host budgets in the cache (layer_slots), victims never taken from
 * the acquire in progress, the prefetch scheduler's view of a layer
 * (cache_layer_view), and the placement glue issuing a predictor's
 * prefetches into the cache. The end-to-end comparison with moe-sim is
 * tests/live-vs-sim.sh. */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "placement.h"
#include "testutil.h"
#include "tiers_testpack.h"

#define N_MOE 2
#define N_EXP 8
#define HID 16
#define WID 16

static char *dir;
static char path[4200];
static struct pack_file *pack;

static void setup(void)
{
	struct moe_error err = { "" };
	dir = tu_mkdtemp("live");
	snprintf(path, sizeof(path), "%s/t.moepack", dir);
	cr_assert_eq(tp_write(path, N_MOE, N_EXP, HID, WID, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_open(path, 0, &pack, &err), 0, "%s", err.msg);
}

static void teardown(void)
{
	pack_close(pack);
	tu_rmtree(dir);
}

static struct cache *mk(unsigned host_slots, unsigned layer_slots)
{
	struct cache_config cfg = { .host_bytes = host_slots * pack_extent_bytes(pack), .queue_depth = 4,
				    .no_uring = true, .layer_slots = layer_slots };
	struct cache *c;
	struct moe_error err = { "" };
	cr_assert_eq(cache_create(pack, &cfg, &c, &err), 0, "%s", err.msg);
	return c;
}

/* Acquire of experts of one layer, waited for as the service waits (the
 * misses retried once their loads landed: the same access for the policy),
 * then release: they become the most recently used of that layer. */
static void touch(struct cache *c, uint32_t layer, const uint32_t *ex, size_t n)
{
	struct cache_key k[8], miss[8];
	struct cache_loc out[8], got[8];
	size_t n_miss = 0;
	for (size_t i = 0; i < n; i++)
		k[i] = (struct cache_key){ layer, ex[i] };
	int served = cache_acquire(c, 1, k, n, 0, out);
	for (size_t i = 0; i < n; i++)
		if (out[i].status == -EAGAIN)
			miss[n_miss++] = k[i];
	cr_assert_eq((size_t)served + n_miss, n);
	if (n_miss) {
		cr_assert_eq(cache_wait_idle(c, 10000), 0);
		cr_assert_eq(cache_acquire(c, 1, miss, n_miss, 0, got), (int)n_miss);
	}
	for (size_t i = 0; i < n; i++)
		if (out[i].status == 0)
			cr_assert_eq(cache_release(c, 1, &out[i].lease), 0);
	for (size_t i = 0; i < n_miss; i++)
		cr_assert_eq(cache_release(c, 1, &got[i].lease), 0);
}

static unsigned resident_in(struct cache *c, uint32_t layer)
{
	unsigned n = 0;
	for (uint32_t e = 0; e < N_EXP; e++)
		n += cache_state(c, (struct cache_key){ layer, e }, CACHE_TIER_HOST) == CACHE_RESIDENT;
	return n;
}

TestSuite(live, .init = setup, .fini = teardown, .timeout = 30);

Test(live, layer_slots_keep_each_layer_to_its_budget)
{
	/* 8 slots in the arena, 2 per layer: a full layer evicts its own LRU
	 * expert even though free slots exist for the other layer. */
	struct cache *c = mk(8, 2);
	touch(c, 0, (uint32_t[]){ 0, 1 }, 2);
	touch(c, 1, (uint32_t[]){ 4, 5 }, 2);
	touch(c, 0, (uint32_t[]){ 0 }, 1); /* 1 is now layer 0's LRU */
	touch(c, 0, (uint32_t[]){ 2 }, 1);
	cr_assert_eq(resident_in(c, 0), 2);
	cr_assert_eq(resident_in(c, 1), 2, "layer 1 untouched by layer 0's misses");
	cr_assert_eq(cache_state(c, (struct cache_key){ 0, 1 }, CACHE_TIER_HOST), CACHE_ABSENT);
	cr_assert_eq(cache_state(c, (struct cache_key){ 0, 0 }, CACHE_TIER_HOST), CACHE_RESIDENT);
	struct moe_error err = { "" };
	cr_assert_eq(cache_check_invariants(c, &err), 0, "%s", err.msg);
	cache_destroy(c);
}

Test(live, layer_slots_need_room_in_the_arena)
{
	struct cache_config cfg = { .host_bytes = 3 * pack_extent_bytes(pack), .no_uring = true, .layer_slots = 2 };
	struct cache *c = NULL;
	struct moe_error err = { "" };
	cr_assert_eq(cache_create(pack, &cfg, &c, &err), -EINVAL);
	cr_assert(strstr(err.msg, "slots per layer") != NULL, "%s", err.msg);
}

Test(live, victims_never_come_from_the_current_acquire)
{
	/* One budget of 2: {0, 1} resident, 0 the LRU. An acquire of {2, 0}
	 * needs a slot for 2: plain LRU would push out 0, which this very
	 * acquire names (and was resident when it began): 1 must go instead. */
	struct cache *c = mk(2, 0);
	touch(c, 0, (uint32_t[]){ 0 }, 1);
	touch(c, 0, (uint32_t[]){ 1 }, 1);
	struct cache_key k[2] = { { 0, 2 }, { 0, 0 } };
	struct cache_loc out[2];
	cr_assert_eq(cache_acquire(c, 1, k, 2, 0, out), 1);
	cr_assert_eq(out[0].status, -EAGAIN);
	cr_assert_eq(out[1].status, 0, "expert 0 was resident at the start of the access: a hit");
	cr_assert_eq(cache_wait_idle(c, 10000), 0);
	cr_assert_eq(cache_state(c, (struct cache_key){ 0, 1 }, CACHE_TIER_HOST), CACHE_ABSENT);
	cr_assert_eq(cache_state(c, (struct cache_key){ 0, 2 }, CACHE_TIER_HOST), CACHE_RESIDENT);
	cr_assert_eq(cache_release(c, 1, &out[1].lease), 0);
	cache_destroy(c);
}

Test(live, the_retry_of_an_access_is_not_a_new_access)
{
	/* LFU, 2 slots per layer. Expert 0: a miss, then two retries
	 * (a client waiting for its misses). Expert 1: two real accesses. The
	 * retries must not count as uses: 0 has 1 use, 1 has 2, so a third
	 * expert evicts 0 (with retries counted, 0 would have 3 and 1 would go). */
	struct cache_config cfg = { .host_bytes = 8 * pack_extent_bytes(pack), .queue_depth = 4, .no_uring = true,
				    .layer_slots = 2, .policy = "lfu" };
	struct cache *c;
	struct moe_error err = { "" };
	cr_assert_eq(cache_create(pack, &cfg, &c, &err), 0, "%s", err.msg);
	struct cache_key k0 = { 0, 0 };
	struct cache_loc out;
	cr_assert_eq(cache_acquire(c, 1, &k0, 1, 0, &out), 0);
	cr_assert_eq(out.status, -EAGAIN);
	cr_assert_eq(cache_wait_idle(c, 10000), 0);
	for (int i = 0; i < 2; i++) {
		cr_assert_eq(cache_acquire(c, 1, &k0, 1, 0, &out), 1);
		cr_assert_eq(cache_release(c, 1, &out.lease), 0);
	}
	touch(c, 1, (uint32_t[]){ 5 }, 1);
	touch(c, 0, (uint32_t[]){ 1 }, 1);
	touch(c, 1, (uint32_t[]){ 5 }, 1);
	touch(c, 0, (uint32_t[]){ 1 }, 1);
	touch(c, 1, (uint32_t[]){ 6 }, 1);
	touch(c, 0, (uint32_t[]){ 2 }, 1);
	cr_assert_eq(cache_state(c, k0, CACHE_TIER_HOST), CACHE_ABSENT);
	cr_assert_eq(cache_state(c, (struct cache_key){ 0, 1 }, CACHE_TIER_HOST), CACHE_RESIDENT);
	cache_destroy(c);
}

Test(live, layer_view_matches_the_residency)
{
	struct cache *c = mk(8, 3);
	touch(c, 0, (uint32_t[]){ 1, 6 }, 2);
	touch(c, 1, (uint32_t[]){ 0 }, 1); /* the last acquire names layer 1 only */
	uint8_t res[N_EXP], ev[N_EXP];
	uint32_t free_slots = 0;
	cr_assert_eq(cache_layer_view(c, 0, res, ev, &free_slots), 0);
	for (uint32_t e = 0; e < N_EXP; e++) {
		bool in = e == 1 || e == 6;
		cr_assert_eq(res[e] != 0, in, "expert %u", e);
		cr_assert_eq(ev[e] != 0, in, "expert %u", e);
	}
	cr_assert_eq(free_slots, 1);
	cr_assert_eq(cache_layer_view(c, 1, res, ev, &free_slots), 0);
	cr_assert(res[0] && !ev[0], "named by the last acquire: not evictable");
	cr_assert_eq(cache_layer_view(c, N_MOE, res, ev, &free_slots), -EINVAL);
	cache_destroy(c);
	/* One budget: the cache picks victims itself. */
	c = mk(4, 0);
	cr_assert_eq(cache_layer_view(c, 0, res, NULL, &free_slots), 0);
	cr_assert_eq(free_slots, UINT32_MAX);
	cache_destroy(c);
}

/* The history the placement tests share: tokens 1..3 each routed to r0 at
 * layer 0 and r1 at layer 1, so temporal predicts them for token 4. */
static const uint16_t r0[2] = { 3, 5 }, r1[2] = { 2, 7 };

static void feed_history(struct placement *p)
{
	for (uint32_t t = 1; t <= 3; t++) {
		placement_token(p, 0, t);
		placement_access(p, 0, r0, 2, 0, t);
		placement_access(p, 1, r1, 2, 0, t);
	}
}

Test(live, placement_prefetches_what_the_predictor_expects)
{
	/* temporal: the experts the previous tokens used at a layer. After
	 * tokens routed to the same experts, announcing the next token must
	 * prefetch them (layer 0 is planned before its acquire arrives). */
	struct cache *c = mk(16, 4);
	struct placement_config pc = { .predictor = "temporal", .prefetch = true, .lookahead = 2,
				       .min_score = -1, .gain = -1 };
	struct placement *p;
	struct moe_error err = { "" };
	cr_assert_eq(placement_create(c, N_MOE, N_EXP, 2, pack->hdr->extent_payload, &pc, &p, &err), 0, "%s",
		     err.msg);
	feed_history(p);
	cr_assert_eq(placement_counters(p)->tokens, 3);
	cr_assert_eq(placement_counters(p)->observed, 6);
	/* The retry of a layer's misses is not observed twice. */
	placement_access(p, 1, r1, 2, 0, 3);
	cr_assert_eq(placement_counters(p)->observed, 6);
	/* Nothing resident any more: the next token's plan must fetch. */
	cr_assert_eq(cache_wait_idle(c, 10000), 0);
	for (uint32_t l = 0; l < N_MOE; l++)
		for (uint32_t e = 0; e < N_EXP; e++)
			cache_evict(c, (struct cache_key){ l, e }, CACHE_TIER_HOST);
	uint64_t before = placement_counters(p)->issued;
	placement_token(p, 0, 4);
	cr_assert_eq(cache_wait_idle(c, 10000), 0);
	cr_assert_gt(placement_counters(p)->issued, before);
	for (int i = 0; i < 2; i++) {
		cr_assert_eq(cache_state(c, (struct cache_key){ 0, r0[i] }, CACHE_TIER_HOST), CACHE_RESIDENT);
		cr_assert_eq(cache_state(c, (struct cache_key){ 1, r1[i] }, CACHE_TIER_HOST), CACHE_RESIDENT);
	}
	cr_assert_eq(stats_get(cache_stats(c), STAT_cache_prefetches), placement_counters(p)->issued);
	placement_destroy(p);
	cache_destroy(c);
}

Test(live, placement_deadline_holds_back_what_cannot_land)
{
	/* The same history as above, then the next token's plan on a link
	 * assumed to move 1 byte/s: nothing can land, nothing is issued, the
	 * plans are counted. The same plan on a fast link is issued. */
	for (int fast = 0; fast < 2; fast++) {
		struct cache *c = mk(16, 4);
		struct placement_config pc = { .predictor = "temporal", .prefetch = true, .lookahead = 2,
					       .min_score = -1, .gain = -1, .deadline = true,
					       .link_bw = fast ? 1e12 : 1.0 };
		struct placement *p;
		struct moe_error err = { "" };
		cr_assert_eq(placement_create(c, N_MOE, N_EXP, 2, pack->hdr->extent_payload, &pc, &p, &err), 0,
			     "%s", err.msg);
		feed_history(p);
		cr_assert_eq(cache_wait_idle(c, 10000), 0);
		for (uint32_t l = 0; l < N_MOE; l++)
			for (uint32_t e = 0; e < N_EXP; e++)
				cache_evict(c, (struct cache_key){ l, e }, CACHE_TIER_HOST);
		uint64_t issued = placement_counters(p)->issued, dropped = placement_counters(p)->not_in_time;
		placement_token(p, 0, 4);
		cr_assert_eq(cache_wait_idle(c, 10000), 0);
		if (fast) {
			cr_assert_gt(placement_counters(p)->issued, issued);
		} else {
			cr_assert_eq(placement_counters(p)->issued, issued, "a 1 B/s link lands nothing in time");
			cr_assert_gt(placement_counters(p)->not_in_time, dropped);
			cr_assert_eq(stats_get(cache_stats(c), STAT_prefetch_not_in_time),
				     placement_counters(p)->not_in_time);
		}
		placement_destroy(p);
		cache_destroy(c);
	}
}

Test(live, placement_prefetches_into_the_gpu_tier)
{
	/* The temporal plan of the next token lands in the (emulated) GPU
	 * arena when asked; without a GPU tier the request is refused. */
	struct placement *p = NULL;
	struct moe_error err = { "" };
	struct placement_config pc = { .predictor = "temporal", .prefetch = true, .lookahead = 2,
				       .min_score = -1, .gain = -1, .gpu = true };
	struct cache *c = mk(16, 0);
	cr_assert_eq(placement_create(c, N_MOE, N_EXP, 2, pack->hdr->extent_payload, &pc, &p, &err), -ENODEV);
	cr_assert(strstr(err.msg, "GPU"), "%s", err.msg);
	cache_destroy(c);

	struct cache_config cfg = { .host_bytes = 16 * pack_extent_bytes(pack), .queue_depth = 4, .no_uring = true,
				    .gpu_bytes = 8 * pack_extent_bytes(pack),
				    .gpu_backend = "emulated" };
	cr_assert_eq(cache_create(pack, &cfg, &c, &err), 0, "%s", err.msg);
	cr_assert_eq(placement_create(c, N_MOE, N_EXP, 2, pack->hdr->extent_payload, &pc, &p, &err), 0, "%s",
		     err.msg);
	feed_history(p);
	cr_assert_eq(cache_wait_idle(c, 10000), 0);
	for (int i = 0; i < 2; i++) {
		cr_assert_eq(cache_state(c, (struct cache_key){ 0, r0[i] }, CACHE_TIER_GPU), CACHE_RESIDENT);
		cr_assert_eq(cache_state(c, (struct cache_key){ 1, r1[i] }, CACHE_TIER_GPU), CACHE_RESIDENT);
	}
	cr_assert_gt(stats_get(cache_stats(c), STAT_cache_loads_gpu), 0);
	/* Each issued prefetch started a host load or a GPU copy (or both). */
	uint64_t started = stats_get(cache_stats(c), STAT_cache_gpu_prefetches);
	cr_assert_gt(started, 0);
	cr_assert_leq(started, placement_counters(p)->issued);
	/* A GPU acquire of a prefetched copy counts as a GPU prefetch hit. */
	struct cache_key k = { 0, r0[0] };
	struct cache_loc loc;
	uint64_t hits = stats_get(cache_stats(c), STAT_cache_gpu_prefetch_hits);
	cr_assert_eq(cache_acquire(c, 1, &k, 1, CACHE_WANT_GPU, &loc), 1);
	cr_assert_eq(loc.lease.tier, CACHE_TIER_GPU);
	cr_assert_eq(cache_release(c, 1, &loc.lease), 0);
	cr_assert_eq(stats_get(cache_stats(c), STAT_cache_gpu_prefetch_hits), hits + 1);
	placement_destroy(p);
	cache_destroy(c);
}

Test(live, placement_refuses_unknown_or_modelless_predictors)
{
	struct cache *c = mk(4, 0);
	struct placement *p = NULL;
	struct moe_error err = { "" };
	struct placement_config pc = { .predictor = "nosuch", .prefetch = true, .min_score = -1, .gain = -1 };
	cr_assert_lt(placement_create(c, N_MOE, N_EXP, 2, 1, &pc, &p, &err), 0);
	pc.predictor = "learned"; /* needs a model file */
	cr_assert_lt(placement_create(c, N_MOE, N_EXP, 2, 1, &pc, &p, &err), 0);
	cr_assert_null(p);
	pc.predictor = "none";
	cr_assert(!placement_enabled(&pc));
	cache_destroy(c);
}
