/* placement.h - the daemon's placement glue: per client stream, the chosen
 * predictor and prefetch scheduler, fed by the stream's ACQUIRE/ROUTE
 * entries, issuing low-priority prefetches into the host tier of the cache.
 *
 * The same code moe-sim replays (predict.c, prefetch.c); what differs is the
 * owner: here the tier is daemon/cache.c, seen through cache_layer_view and
 * changed with cache_evict + cache_prefetch. Order of calls per token, as in
 * moe-sim:
 *
 *   placement_token(p, key, pos)         a token starts (the client announced
 *                                        it, or its first acquire says so):
 *                                        plans its first h layers
 *   placement_access(p, layer, ids, n)   layer was routed to ids: the
 *                                        predictor observes it, layers
 *                                        layer+1 .. layer+h are planned
 *
 * Token boundaries: a hint position that changes starts a token, a position
 * back at 0 starts a new sequence (predict_reset); without hints a layer at or
 * below the last one seen starts a token. A repeated (token, layer) entry
 * (the retry of a miss) is not observed twice.
 *
 * Thread safety: one placement per client stream; the owner serialises calls
 * (the service holds the client's lock). The predict_model is shared,
 * read-only.
 */
#ifndef MOETIER_PLACEMENT_H
#define MOETIER_PLACEMENT_H

#include <stdbool.h>
#include <stdint.h>

#include "cache.h"
#include "predict.h"
#include "prefetch.h"
#include "util.h"

struct placement_config {
	const char *predictor;              /* predict_find name; NULL or "none": off */
	const struct predict_model *model;  /* for tokenid/tracematch/learned/combo */
	bool prefetch;                      /* issue prefetches (else: predictor only) */
	uint32_t lookahead;                 /* fixed look-ahead in layers; 0 = adaptive */
	uint32_t max_per_layer;             /* 0 = the scheduler's default */
	float min_score, gain;              /* < 0 = the scheduler's defaults */
	double link_bw;                     /* bytes/s prefetch loads are assumed to take
					     * until measured; 0 = the scheduler's default */
	bool deadline;                      /* issue only prefetches that can land in time */
	bool gpu;                           /* prefetch into the GPU tier (through the host
					     * tier); false: into the host tier */
};

/* The counters of one placement (X-macro: name, help). */
#define PLACEMENT_COUNTERS(X)                                      \
	X(tokens, "tokens begun")                                  \
	X(observed, "routed layers observed by the predictor")     \
	X(issued, "prefetches issued into the cache")              \
	X(refused, "prefetches the cache could not start")          \
	X(not_in_time, "layer plans cut short or skipped: their picks could not land in time")

struct placement_counters {
#define PLACEMENT_X(n, h) uint64_t n;
	PLACEMENT_COUNTERS(PLACEMENT_X)
#undef PLACEMENT_X
};

struct placement;

/* true when cfg asks for a predictor at all. */
bool placement_enabled(const struct placement_config *cfg);
/* Creates the predictor (k = the model's top-k) and the scheduler. -EINVAL
 * for an unknown predictor or one that needs a model file and has none,
 * -ENODEV when cfg->gpu asks for a GPU tier the cache does not have. */
int placement_create(struct cache *c, uint32_t n_layers, uint32_t n_experts, uint32_t k, uint64_t expert_bytes,
		     const struct placement_config *cfg, struct placement **out, struct moe_error *err);
void placement_destroy(struct placement *p);

/* token_pos: position + 1 as on the wire (0 = no hint). */
void placement_token(struct placement *p, uint32_t token_key, uint32_t token_pos);
/* One ACQUIRE/ROUTE of `layer` for experts ids[0..n) with the entry's hints. */
void placement_access(struct placement *p, uint32_t layer, const uint16_t *ids, uint32_t n, uint32_t token_key,
		      uint32_t token_pos);
const struct placement_counters *placement_counters(const struct placement *p);
/* The scheduler's current look-ahead in layers. */
uint32_t placement_horizon(const struct placement *p);

#endif
