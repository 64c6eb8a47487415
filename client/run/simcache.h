/* simcache.h - a simulated per-layer expert cache for moe-run --local: which
 * experts a cache of `cap` slots per MoE layer would hold, under one of the
 * daemon's eviction policies (core/policy.h), so that cache-aware routing
 * and pre-gating prefetch can be measured on a real forward pass without a
 * daemon. It follows moe-sim's demand path exactly (tools/sim.c, untimed):
 * hits are judged at the start of an access, then every missing expert is
 * inserted, the victims chosen among experts not in the current access; a
 * prefetch is inserted at once (it always arrives in time), its victim
 * chosen among experts not prefetched by the same call. So an exact-routing
 * run of moe-run with --sim-cache C gives moe-sim replay --policy P --cache C
 * --untimed's hit rate on the trace moe-run dumped (tests/test_fidelity.sh). */
#ifndef MOETIER_RUN_SIMCACHE_H
#define MOETIER_RUN_SIMCACHE_H

#include <stdbool.h>
#include <stdint.h>

#include "util.h"

struct simcache;

struct simcache_stats {
	uint64_t accesses, hits, misses;
	uint64_t prefetches;      /* experts inserted by a prefetch */
	uint64_t prefetch_used;   /* ...then accessed while still resident */
};

/* policy: a core/policy.h name ("lru", "arc", ...; belady is refused: it
 * needs the future). cap: slots per layer, 1 <= cap <= n_experts. */
int simcache_create(uint32_t n_layers, uint32_t n_experts, uint32_t cap, const char *policy, struct simcache **out,
		    struct moe_error *err);
void simcache_free(struct simcache *c);

bool simcache_resident(const struct simcache *c, uint32_t layer, uint32_t expert);
/* Layer's residency as [n_experts] bytes (non-zero: resident), the map
 * route_cached reads; valid until the next access or prefetch. */
const uint8_t *simcache_map(const struct simcache *c, uint32_t layer);
/* One (token, layer) access of ids[n] (distinct). Returns the hits. */
uint32_t simcache_access(struct simcache *c, uint64_t token, uint32_t layer, const uint32_t *ids, uint32_t n);
/* Prefetch of ids[n] into layer (those resident are left alone). */
void simcache_prefetch(struct simcache *c, uint32_t layer, const uint32_t *ids, uint32_t n);
void simcache_get_stats(const struct simcache *c, struct simcache_stats *out);

#endif
