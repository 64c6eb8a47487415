/* sim.h - the moe-sim replay engine: routing traces through the daemon's own
 * policy, predictor, prefetch and routing code, with a cost model.
 *
 * Decode order: for each token, layers in order; each (token, layer) accesses
 * its k experts. Hits are judged against the GPU tier at the start of the
 * access; then all k become resident, victims chosen among experts not in the
 * current access. Timed mode (the cost model): a layer waits for its demand
 * loads (stall), then computes for layer_s; the host->GPU link serves demand
 * loads first and prefetches in the gaps, in issue order; a prefetched expert
 * is a hit only if its copy completed before the access. Untimed mode
 * ("predictor quality") makes every prefetch arrive at once.
 */
#ifndef MOETIER_SIM_H
#define MOETIER_SIM_H

#include <stdbool.h>
#include <stdint.h>

#include "policy.h"
#include "predict.h"
#include "prefetch.h"
#include "trace.h"

/* Default cost model: DeepSeek-V2-Lite bf16 experts (3 x 2048 x 1408 x 2 B),
 * host->GPU 25 GB/s, NVMe->host 4 GB/s, 0.5 ms of compute per layer: its 26
 * MoE layers and the dense layer 0 that runs before them. */
#define SIM_EXPERT_BYTES (3ull * 2048 * 1408 * 2)
#define SIM_H2D_BW 25e9
#define SIM_NVME_BW 4e9
#define SIM_LAYER_S 0.5e-3
#define SIM_DENSE_LAYERS 1

struct sim_cost {
	uint64_t expert_bytes;
	double h2d_bw;          /* bytes/s */
	double nvme_bw;         /* bytes/s */
	double layer_s;         /* compute per MoE layer, seconds */
	uint32_t host_slots;    /* host tier slots per layer; 0 = every expert in host */
	uint32_t dense_layers;  /* layers of compute between a token's start and its
				 * first MoE layer (DeepSeek-V2-Lite: 1 dense layer) */
};

struct sim_config {
	const char *policy;     /* eviction policy of the GPU tier */
	uint32_t cache;         /* C: slots per layer (x layers when global) */
	bool global;            /* one budget for all layers */
	bool warm;              /* keep the cache across prompts */
	bool timed;             /* apply the cost model to prefetches */
	uint32_t n_experts;     /* 0: from the trace (rounded up to the trace's ids) */
	const char *predictor;  /* NULL: no prefetch */
	const struct predict_model *model;
	struct prefetch_config pf;   /* n_layers/n_experts filled by the simulator */
	struct sim_cost cost;
	/* Cache-aware routing: keep_top = 0 is exact routing. Router logits come
	 * with the trace (sim_run_trace_logits, from moe-run --dump-routing);
	 * without them, logits consistent with each row are synthesised (seeded). */
	uint32_t route_keep;
	float route_margin;
	uint64_t seed;
};

void sim_config_default(struct sim_config *c);

#define SIM_COUNTERS(X)                                                       \
	X(prompts)                                                             \
	X(tokens)                                                              \
	X(token_layers)                                                        \
	X(accesses)                                                            \
	X(hits)                                                                \
	X(misses)                                                              \
	X(host_hits)                                                           \
	X(host_misses)                                                         \
	X(gpu_bytes)                                                           \
	X(nvme_bytes)                                                          \
	X(stall_ns)                                                            \
	X(time_ns)                                                             \
	X(pf_issued)                                                           \
	X(pf_useful)                                                           \
	X(pf_wasted)                                                           \
	X(pf_cancelled)                                                        \
	X(pf_late)                                                             \
	X(pf_cut)                                                              \
	X(pf_withdrawn)                                                        \
	X(route_slots_open)                                                    \
	X(route_subst)                                                         \
	X(route_mismatch)                                                      \
	X(pred_ns)                                                             \
	X(pred_calls)

struct sim_stats {
#define SIM_X(n) uint64_t n;
	SIM_COUNTERS(SIM_X)
#undef SIM_X
};

struct sim;

int sim_create(const struct sim_config *cfg, uint32_t n_layers, uint32_t n_experts, uint32_t k,
	       struct sim **out, struct moe_error *err);
void sim_destroy(struct sim *s);
/* Replays one prompt. -EINVAL when its shape does not match the simulator's. */
int sim_run_trace(struct sim *s, const struct trace *tr, struct moe_error *err);
/* The same with the router's logits of every row: logits [n_tokens][n_layers]
 * [n_experts] (the simulator's n_experts), or NULL. Cache-aware routing then
 * decides on the real scores; a row whose logits do not give the trace's
 * experts as their top-k is routed from the logits all the same (counted in
 * route_mismatch). */
int sim_run_trace_logits(struct sim *s, const struct trace *tr, const float *logits, struct moe_error *err);

/* The router-logits side file moe-run --dump-routing writes beside a trace
 * (TRACE.logits; doc/fidelity.md): "MOERLG01", u32 n_tokens, n_layers,
 * n_experts, first_layer, then f32 [n_tokens][n_layers][n_experts]. Loads
 * it and checks it against tr (tokens, layers, expert ids). *out is
 * malloc'ed. -ENOENT when absent, -EINVAL when it does not match. */
int sim_logits_load(const char *path, const struct trace *tr, float **out, uint32_t *n_experts,
		    struct moe_error *err);
const struct sim_stats *sim_stats(const struct sim *s);
void sim_stats_add(struct sim_stats *to, const struct sim_stats *from);

/* Derived numbers. */
double sim_hit_rate(const struct sim_stats *st);
double sim_loads_per_tl(const struct sim_stats *st, uint64_t expert_bytes);
double sim_pf_precision(const struct sim_stats *st);
double sim_pf_recall(const struct sim_stats *st);

/* Training (sim_train.c): fits the learned model, the tokenid table, the
 * trace-matching matrices and the combiner. Traces with index < n_fit train
 * the components; the rest fit the combiner weights. */
struct sim_train_opts {
	uint32_t epochs;
	double lr;
	uint32_t n_eam;       /* trace-matching centroids */
	uint32_t min_token;   /* token occurrences to get a tokenid row */
	bool verbose;
};
void sim_train_opts_default(struct sim_train_opts *o);
int sim_train(struct trace *const *tr, uint32_t n, uint32_t n_fit, uint32_t n_experts,
	      const struct sim_train_opts *o, struct predict_model **out, struct moe_error *err);

#endif
