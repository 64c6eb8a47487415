/* prefetch.h - the prefetch scheduler: on each routed (token, layer) it asks a
 * predictor for the next h layers and issues prefetches through the owner's
 * callback; h adapts to the measured load bandwidth and per-layer compute time
 * (ExpertFlow): h = ceil(time to load one layer's prefetches / compute time of
 * one layer), bounded by [h_min, h_max].
 *
 * The scheduler never touches a cache: the owner (daemon/cache.c through the
 * service, or moe-sim) describes a layer's tier with a prefetch_view and
 * carries out each prefetch in prefetch_issue_fn. Demand reads preempting
 * prefetch reads, and cancelling a prefetch that is evicted or no longer
 * wanted, are the owner's I/O queue's job; it reports the outcome back with
 * prefetch_note_* so the counters below stay right.
 *
 * Selection for a layer L (prefetch_plan_layer): experts not resident, best
 * score first, at most max_per_layer; one goes into a free slot when its score
 * is >= min_score, or replaces the evictable resident with the lowest score
 * when it beats that score by more than `gain`. So a prefetch costs one load
 * only where the predictor expects it to pay.
 *
 * Deadline (prefetch_config.deadline, on by default): a prefetch is issued
 * only if it can land before its layer is accessed. Link time for prefetches
 * exists while layers compute (demand reads go first), so with the owner's
 * backlog busy_s, the measured load time t and layer time s, layer
 * `current + d` can receive what fits in busy_s + d * s. The picks of all
 * layers in the horizon compete best score first; what cannot land is not
 * issued (a layer plan cut short or skipped counts in deadline_cut): it would evict a resident that may
 * be used, and still arrive late. The look-ahead then covers at least the
 * layers a load needs: ceil(t / s) + 1.
 *
 * Withdrawal: a prefetch issued for the current token whose layer is then
 * routed without it is no longer wanted; with a cancel callback, a copy that
 * has not started is withdrawn (its link time goes to better picks). One that
 * landed stays, as any resident.
 *
 * Thread safety: one scheduler per stream (like its predictor); the owner
 * serialises calls.
 */
#ifndef MOETIER_PREFETCH_H
#define MOETIER_PREFETCH_H

#include <stdbool.h>
#include <stdint.h>

#include "policy.h"
#include "predict.h"

/* Withdraw the prefetch of (layer, expert) if its copy has not started (it is
 * no longer wanted); return 1 when withdrawn, 0 when it already ran or
 * landed (it then stays, like any resident), or a negative errno. */
typedef int (*prefetch_cancel_fn)(void *ctx, uint32_t layer, uint32_t expert);

struct prefetch_config {
	uint32_t n_layers, n_experts;
	uint32_t h_min, h_max;     /* look-ahead bounds in layers (h_min >= 1) */
	uint32_t h_fixed;          /* nonzero: no adaptation */
	uint32_t max_per_layer;    /* prefetches per target layer per plan */
	float min_score;           /* into a free slot */
	float gain;                /* over the victim's score */
	uint64_t expert_bytes;
	double init_bw;            /* bytes/s before any load was measured */
	double init_layer_s;       /* seconds per layer before any was measured */
	bool deadline;             /* issue only prefetches that can land in time */
	uint32_t start_lead;       /* layers of compute between a token's start
				    * and its first MoE layer (deadline only) */
	prefetch_cancel_fn cancel; /* NULL: prefetches are never withdrawn */
};

/* Longest look-ahead (h_max is bounded by it). */
#define PREFETCH_MAX_H 16

/* Defaults: h 1..6 adaptive, 3 per layer, min_score 0.3, gain 0.2, deadline on. */
void prefetch_config_default(struct prefetch_config *c, uint32_t n_layers, uint32_t n_experts,
			     uint64_t expert_bytes);

#define PREFETCH_COUNTERS(X)                                                           \
	X(plans, "layer plans made")                                                    \
	X(issued, "prefetches issued")                                                  \
	X(issued_bytes, "bytes requested by prefetches")                                \
	X(useful, "prefetched experts used before eviction")                           \
	X(useful_bytes, "bytes of prefetches that were used")                           \
	X(wasted, "prefetched experts evicted unused")                                  \
	X(wasted_bytes, "bytes moved for prefetches never used")                        \
	X(cancelled, "prefetches cancelled before completion")                          \
	X(cancelled_bytes, "bytes already moved by cancelled prefetches")               \
	X(late, "prefetches still loading when their expert was needed")              \
	X(deadline_cut, "layer plans cut short or skipped: their picks could not land in time") \
	X(withdrawn, "prefetches withdrawn before their copy started: their layer passed without them")

struct prefetch_counters {
#define PREFETCH_X(name, help) uint64_t name;
	PREFETCH_COUNTERS(PREFETCH_X)
#undef PREFETCH_X
};

/* What the owner knows about one layer of the target tier. */
struct prefetch_view {
	const uint8_t *resident;   /* [n_experts] nonzero: resident or loading */
	const uint8_t *evictable;  /* [n_experts] nonzero: may be replaced now; NULL = none */
	uint32_t free_slots;       /* UINT32_MAX: the owner finds room itself */
	double busy_s;             /* link time still owed to queued prefetches (0: idle/unknown) */
};

typedef void (*prefetch_view_fn)(void *ctx, uint32_t layer, struct prefetch_view *out);
/* Issue one prefetch of (layer, expert), replacing victim (an expert of the
 * same layer) or POLICY_NONE for a free slot / owner's choice. Return 0, or
 * a negative errno when it could not be issued (the plan then stops). */
typedef int (*prefetch_issue_fn)(void *ctx, uint32_t layer, uint32_t expert, uint32_t victim);

struct prefetch_sched {
	struct prefetch_config cfg;
	struct prefetch_counters c;
	double bw;            /* bytes/s, EWMA of measured loads */
	double layer_s;       /* seconds, EWMA of measured layer compute */
	double per_layer;     /* EWMA of prefetches issued per plan (sets h without the deadline) */
	uint32_t h;           /* current look-ahead */
	float *scores;        /* [n_experts]: the scores of the layer being issued */
	float *rows;          /* scratch [PREFETCH_MAX_H x n_experts] */
	uint32_t *picks;      /* scratch [PREFETCH_MAX_H x n_experts] */
	uint32_t *victims;    /* scratch [PREFETCH_MAX_H x n_experts] */
	uint8_t *outstanding; /* [n_layers x n_experts]: issued for the current token */
};

int prefetch_init(struct prefetch_sched *ps, const struct prefetch_config *cfg, struct moe_error *err);
void prefetch_fini(struct prefetch_sched *ps);

/* Measurements: one load of `bytes` took `seconds`; one layer computed in
 * `seconds`. Both update the look-ahead. */
void prefetch_note_load(struct prefetch_sched *ps, uint64_t bytes, double seconds);
void prefetch_note_layer(struct prefetch_sched *ps, double seconds);
static inline uint32_t prefetch_horizon(const struct prefetch_sched *ps) { return ps->h; }

/* Outcomes reported by the owner. */
void prefetch_note_used(struct prefetch_sched *ps, uint64_t bytes);
void prefetch_note_unused(struct prefetch_sched *ps, uint64_t bytes);
void prefetch_note_cancel(struct prefetch_sched *ps, uint64_t bytes_done);
void prefetch_note_late(struct prefetch_sched *ps);

/* Plans one target layer from scores [n_experts]; returns prefetches issued. */
uint32_t prefetch_plan_layer(struct prefetch_sched *ps, uint32_t layer, const float *scores,
			     const struct prefetch_view *v, prefetch_issue_fn issue, void *ctx);

/* The hot-path hook: layer `layer` of the current token was just routed to
 * experts[0..n). Feeds the predictor, then plans layers layer+1 .. layer+h of
 * the same token. Pass layer = UINT32_MAX at the start of a token (after
 * predict_token) to plan its first h layers. Returns prefetches issued. */
uint32_t prefetch_step(struct prefetch_sched *ps, struct predictor *pred, uint32_t layer,
		       const uint16_t *experts, uint32_t n, prefetch_view_fn view,
		       prefetch_issue_fn issue, void *ctx);

#endif
