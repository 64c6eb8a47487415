/* compute.h - computing an expert where it lives: the engine behind the
 * COMPUTE opcode (a client hands hidden states and its routing; the daemon
 * runs the expert FFNs on the host tier and returns the weighted sum), and
 * the cost model that says, per expert and batch, whether moving the expert
 * to the GPU or computing it on the host is cheaper.
 *
 * Independent of the cache: experts are found through a lookup callback
 * that returns the host-tier extent bytes (or NULL when not resident).
 *
 * Threads: `threads` workers split the experts of a request (each expert
 * runs whole on one worker: on 2 shared vCPUs parallelism across experts
 * beats splitting a GEMV); `kernel_threads` splits rows inside one expert.
 * Both default to 1. Results are bit-identical for any thread counts and
 * equal to ffn_moe_token() token by token. */
#ifndef MOETIER_COMPUTE_H
#define MOETIER_COMPUTE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "ffn.h"
#include "latent.h"
#include "model.h"
#include "pack.h"
#include "util.h"

/* name, description */
#define COMPUTE_COUNTERS(X) \
	X(requests, "compute requests served") \
	X(failed, "compute requests that failed") \
	X(tokens, "tokens computed") \
	X(pairs, "token-expert pairs computed") \
	X(expert_runs, "expert FFN runs (one per distinct expert per request)") \
	X(weight_bytes, "expert weight bytes streamed by the host kernels") \
	X(missing, "experts asked for but not resident on the host") \
	X(compute_ns, "nanoseconds spent in compute requests") \
	X(latent_z_rows, "MoLAE latent projections z = B x computed (one per token and group)") \
	X(decide_host, "cost-model decisions: compute on the host") \
	X(decide_move, "cost-model decisions: move to the GPU")

struct compute_counters {
#define COMPUTE_X_FIELD(name, desc) uint64_t name;
	COMPUTE_COUNTERS(COMPUTE_X_FIELD)
#undef COMPUTE_X_FIELD
};

enum compute_counter {
#define COMPUTE_X_ENUM(name, desc) COMPUTE_CTR_##name,
	COMPUTE_COUNTERS(COMPUTE_X_ENUM)
#undef COMPUTE_X_ENUM
	COMPUTE_CTR_COUNT
};

const char *compute_counter_name(enum compute_counter i);
const char *compute_counter_desc(enum compute_counter i);
uint64_t compute_counter_value(const struct compute_counters *c, enum compute_counter i);

struct compute_opts {
	int threads;             /* workers across experts; 0 = 1 */
	int kernel_threads;      /* threads inside one expert; 0 = 1 */
	bool calibrate;          /* measure the host rates at create (about 0.1-0.3 s) */
	double host_Bps;         /* host weight streaming rate; 0 = measured (or the default) */
	double host_flops;       /* host batch compute rate; 0 = measured (or the default) */
	double nvme_to_host_Bps; /* configured link rates; 0 = that link is absent */
	double host_to_gpu_Bps;
	double gpu_flops;        /* GPU expert compute rate; 0 = GPU compute counted as free */
	double gpu_fixed_s;      /* per-expert GPU overhead (copy setup, launch) */
};

/* Where an expert is when the decision is made. */
enum compute_tier {
	COMPUTE_TIER_NVME = 0,
	COMPUTE_TIER_HOST = 1,
	COMPUTE_TIER_GPU = 2,
};

enum compute_where {
	COMPUTE_ON_HOST = 1,
	COMPUTE_MOVE_TO_GPU = 2, /* includes "already on the GPU" */
};

/* The decision's inputs, for stats. Rates in bytes/s and flop/s. */
struct compute_model {
	enum ffn_isa isa;
	uint64_t expert_bytes;     /* weight bytes of one expert */
	uint64_t flops_per_token;  /* 2 x multiply-adds of one token through one expert */
	double host_Bps;           /* weights streamed by our kernel, 1 token, cold */
	double host_flops;         /* our kernel on a 16-token batch */
	double host_fixed_s;       /* per expert run (activation, scratch), from the 1-token run */
	bool measured;             /* host rates come from the microbenchmark */
	double nvme_to_host_Bps;
	double host_to_gpu_Bps;
	double gpu_flops;
	double gpu_fixed_s;
};

struct compute_decision {
	enum compute_where where;
	enum compute_tier tier;
	uint32_t tokens;
	double host_s; /* NVMe read (if there) + host compute of `tokens` */
	double move_s; /* NVMe read (if there) + copy to the GPU + GPU compute; INFINITY without a GPU link */
};

struct compute_ctx;

/* Builds the engine for one model (parts: the pack's expert parts;
 * extent_bytes: the size of one extent as the lookup returns it).
 * 0, -EINVAL (bad layout or options, message in err), -ENOMEM. */
int compute_create(const struct moe_model_config *cfg, const struct pack_part_desc *parts, uint32_t n_parts,
		   uint64_t extent_bytes, const struct compute_opts *opts, struct compute_ctx **out,
		   struct moe_error *err);
/* The same for a MoLAE latent pack (parts: A_gate, A_up, down): the
 * context takes ownership of basis (the model's resident B matrices and
 * groups, latent_basis_load; freed by compute_destroy, also on failure). z is
 * computed once per (token, latent group) of a request, then every
 * distinct expert runs on its tokens' z rows (kernels/latent.h); results
 * equal latent_expert_x() token by token, weighted and summed in top-k
 * order with ffn_axpy. compute_create refuses latent parts. */
int compute_create_latent(const struct moe_model_config *cfg, const struct pack_part_desc *parts, uint32_t n_parts,
			  uint64_t extent_bytes, struct latent_basis *basis, const struct compute_opts *opts,
			  struct compute_ctx **out, struct moe_error *err);
void compute_destroy(struct compute_ctx *c);

/* Re-measures the host rates (a short microbenchmark: one expert-sized
 * matrix set streamed cold for 1 token, and a 16-token batch). */
int compute_calibrate(struct compute_ctx *c, struct moe_error *err);

/* The dense layout (zeroed for a latent model). */
const struct ffn_layout *compute_layout(const struct compute_ctx *c);
/* The latent layout and basis, or NULL for a dense model. */
const struct latent_layout *compute_latent_layout(const struct compute_ctx *c);
const struct latent_basis *compute_latent_basis(const struct compute_ctx *c);
void compute_get_model(const struct compute_ctx *c, struct compute_model *out);
void compute_get_counters(const struct compute_ctx *c, struct compute_counters *out);

/* Cheaper place to run `tokens` tokens through an expert now in `tier`. */
void compute_decide(struct compute_ctx *c, enum compute_tier tier, uint32_t tokens, struct compute_decision *out);

/* Returns the host-tier extent of (layer, expert), or NULL when absent. */
typedef const void *(*compute_lookup_fn)(void *ctx, uint32_t layer, uint32_t expert);

/* y[t] = sum_j weights[t*k + j] * expert_{experts[t*k + j]}(x[t]) for the T
 * tokens (x: [T x n] stride ldx, y: [T x n] stride ldy; y may not alias x).
 * Each distinct expert is run once over all of its tokens.
 * 0; -EINVAL (bad ids, sizes), -ENOENT (an expert is not resident: message
 * names it, y is untouched), -ENOMEM. */
int compute_run(struct compute_ctx *c, uint32_t layer, uint32_t T, const float *x, size_t ldx, uint32_t k,
		const uint32_t *experts, const float *weights, float *y, size_t ldy, compute_lookup_fn lookup,
		void *lookup_ctx, struct moe_error *err);

/* The cost model's inputs, then the counters, in the STATS reply of a model:
 * fmt is a MOET_STATS_* format; for JSON the "compute" object is added to jm
 * (a json_t *); Prometheus lines are written only when `first` (one model
 * per exposition). Nothing when c is NULL. */
struct json_t;
void compute_render(const struct compute_ctx *c, FILE *f, struct json_t *jm, uint32_t fmt, bool first);

#endif
