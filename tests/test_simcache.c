/* test_simcache.c - moe-run's simulated per-layer expert cache (client/run/
 * simcache.h) against sequences worked out by hand: hits judged as an access
 * starts, victims by the policy outside the current access, prefetches
 * inserted at once and counted when used, layers independent, the residency
 * map route_cached reads, refusals. */
#include "config.h"

#include <criterion/criterion.h>
#include <string.h>

#include "simcache.h"

static struct simcache *mk(uint32_t layers, uint32_t experts, uint32_t cap, const char *policy)
{
	struct simcache *c = NULL;
	struct moe_error err = { 0 };
	cr_assert_eq(simcache_create(layers, experts, cap, policy, &c, &err), 0, "%s", err.msg);
	return c;
}

Test(simcache, lru_order_and_victims_outside_the_access)
{
	struct simcache *c = mk(1, 8, 2, "lru");
	const uint32_t a[2] = { 0, 1 }, b[1] = { 0 }, d[2] = { 1, 2 };
	cr_assert_eq(simcache_access(c, 0, 0, a, 2), 0);
	cr_assert_eq(simcache_access(c, 1, 0, b, 1), 1); /* 0 is now the most recent */
	/* 1 hits; 2 misses and must evict 0, the only expert outside the access,
	 * although 1 is the least recently used */
	cr_assert_eq(simcache_access(c, 2, 0, d, 2), 1);
	cr_assert(simcache_resident(c, 0, 1));
	cr_assert(simcache_resident(c, 0, 2));
	cr_assert_not(simcache_resident(c, 0, 0));
	const uint32_t e[1] = { 3 };
	cr_assert_eq(simcache_access(c, 3, 0, e, 1), 0); /* evicts 1 (LRU), keeps 2 */
	cr_assert(simcache_resident(c, 0, 2));
	cr_assert_not(simcache_resident(c, 0, 1));
	struct simcache_stats st;
	simcache_get_stats(c, &st);
	cr_assert_eq(st.accesses, 6);
	cr_assert_eq(st.hits, 2);
	cr_assert_eq(st.misses, 4);
	simcache_free(c);
}

Test(simcache, hits_are_judged_as_the_access_starts)
{
	/* an expert twice in one access would be inserted by the first use:
	 * accesses hold distinct experts, and each is judged on the state before */
	struct simcache *c = mk(1, 4, 4, "lru");
	const uint32_t a[3] = { 0, 1, 2 };
	cr_assert_eq(simcache_access(c, 0, 0, a, 3), 0);
	cr_assert_eq(simcache_access(c, 1, 0, a, 3), 3);
	simcache_free(c);
}

Test(simcache, prefetch_lands_at_once_and_is_counted_when_used)
{
	struct simcache *c = mk(2, 8, 2, "lru");
	const uint32_t p[2] = { 5, 6 }, a[1] = { 5 }, b[1] = { 7 };
	simcache_prefetch(c, 1, p, 2);
	cr_assert(simcache_resident(c, 1, 5));
	cr_assert(simcache_resident(c, 1, 6));
	cr_assert_not(simcache_resident(c, 0, 5)); /* layers are separate caches */
	simcache_prefetch(c, 1, p, 2);              /* already resident: nothing */
	cr_assert_eq(simcache_access(c, 0, 1, a, 1), 1);
	cr_assert_eq(simcache_access(c, 1, 1, b, 1), 0); /* evicts 6, the LRU one */
	cr_assert(simcache_resident(c, 1, 5));
	cr_assert_not(simcache_resident(c, 1, 6));
	struct simcache_stats st;
	simcache_get_stats(c, &st);
	cr_assert_eq(st.prefetches, 2);
	cr_assert_eq(st.prefetch_used, 1);
	/* a prefetch of more experts than slots keeps the first ones it put in
	 * against each other: victims come from outside the call */
	const uint32_t q[3] = { 1, 2, 3 };
	simcache_prefetch(c, 0, q, 3);
	const uint8_t *map = simcache_map(c, 0);
	cr_assert_eq(map[1] + map[2] + map[3], 2);
	cr_assert(map[1] && map[2]);
	simcache_free(c);
}

Test(simcache, the_map_is_the_residency)
{
	struct simcache *c = mk(3, 6, 3, "arc");
	const uint32_t a[3] = { 4, 0, 2 };
	simcache_access(c, 0, 2, a, 3);
	const uint8_t *map = simcache_map(c, 2);
	for (uint32_t e = 0; e < 6; e++)
		cr_assert_eq(map[e] != 0, simcache_resident(c, 2, e), "expert %u", e);
	cr_assert(map[4] && map[0] && map[2]);
	simcache_free(c);
}

Test(simcache, refusals)
{
	struct simcache *c = NULL;
	struct moe_error err = { 0 };
	cr_assert_eq(simcache_create(2, 8, 9, "lru", &c, &err), -EINVAL);
	cr_assert_eq(simcache_create(2, 8, 0, "lru", &c, &err), -EINVAL);
	cr_assert_eq(simcache_create(2, 8, 4, "belady", &c, &err), -EINVAL);
	cr_assert(strstr(err.msg, "future"));
	cr_assert_lt(simcache_create(2, 8, 4, "no-such-policy", &c, &err), 0);
	cr_assert_null(c);
}
