/* experts.h - moe-run's routed experts: route each token locally
 * (core/route.h, llama.cpp's rule for the arch), then compute the chosen
 * experts with kernels/ffn.h from
 *   - the daemon's host arena through libmoetier (zero copy: slot pointers
 *     of the mapped arena; NOWAIT acquires, the resident experts computed
 *     while the misses load, PREFETCH hints for the next layer), or
 *   - memory (--local: every expert read from the pack once; the "all
 *     resident" reference).
 * Each (token, slot) output has its own buffer and a token's outputs are
 * summed in top-k order with ffn_axpy, so the result has the same bits
 * whatever was resident and however the tokens were grouped.
 * The GPU tier (experts_use_gpu): with a CUDA build, a GPU and the
 * daemon's CUDA VMM arena, the experts the daemon serves from its GPU tier
 * are computed there (gpu.h), while the host computes the host-tier ones;
 * the device's sums differ from the host's in their last bits (gpu.h). With
 * the daemon's emulated GPU tier they are read through moet_slot_ptr and
 * computed here, bit-identical. */
#ifndef MOETIER_RUN_EXPERTS_H
#define MOETIER_RUN_EXPERTS_H

/* experts.c computes each MoE layer with its own layout (model_layout) */
#define EXPERTS_LAYOUT_PER_LAYER 1

#include <stdbool.h>
#include <stdint.h>

#include "model.h"
#include "route.h"

struct experts;

/* The router-logits side file of --dump-routing (doc/fidelity.md). */
#define EXPERTS_LOGITS_MAGIC "MOERLG01"

/* Pre-gating: layers ahead predicted from one layer's residual stream. */
#define EXPERTS_PREGATE_MAX 4

struct experts_stats {
	uint64_t slots;        /* (token, expert) pairs computed */
	uint64_t uses;         /* distinct experts computed per layer call, summed */
	uint64_t hits_host;    /* ...served at the first acquire from the host arena */
	uint64_t hits_gpu;     /* ...from the GPU arena */
	uint64_t misses;       /* ...not resident at the first acquire */
	uint64_t waits;        /* waits for a load */
	uint64_t stall_ns;     /* time spent waiting for misses */
	uint64_t prefetches;   /* experts hinted for the next layer */
	uint64_t prefetches_used; /* ...that the (last) token then chose there */
	uint64_t fallback_reads; /* experts read from the pack by moe-run itself */
	uint64_t bytes_read;   /* bytes the daemon read from NVMe (its counters) */
	bool local;
	/* the device path (experts_use_gpu), 0 without it */
	bool gpu;
	uint64_t gpu_experts, gpu_pairs; /* experts and (token, expert) pairs computed on the device */
	uint64_t gpu_device_ns;          /* device time of the layer calls' batches */
	uint64_t gpu_wait_ns;            /* host time blocked waiting for them */
	uint64_t gpu_exports;            /* times the GPU arena's export was fetched */
	/* cache-aware routing (every rule, exact included) */
	struct route_counters route;
	/* --sim-cache: the simulated per-layer cache (simcache.h) */
	bool sim;
	uint64_t sim_accesses, sim_hits, sim_prefetches, sim_prefetch_used;
	/* pre-gating, per distance d = 1..EXPERTS_PREGATE_MAX (index d - 1):
	 * of the k experts each (token, layer) chose, how many were in the
	 * top-k (pg_hits) and the top-2k (pg_hits2) predicted d layers before */
	uint64_t pg_tokens[EXPERTS_PREGATE_MAX], pg_hits[EXPERTS_PREGATE_MAX], pg_hits2[EXPERTS_PREGATE_MAX];
	/* ...and of layer d - 1 predicted from the embedding (experts_pregate_embed) */
	uint64_t pg_embed_tokens[EXPERTS_PREGATE_MAX], pg_embed_hits[EXPERTS_PREGATE_MAX];
};

/* How moe-run routes and what it measures on the way (experts_configure). */
struct experts_opts {
	struct route_cache_rule rule; /* keep_top 0: exact routing */
	int route_kind;               /* enum route_rule the rule was made from */
	uint32_t sim_cache;           /* --local: slots per layer of a simulated cache (0: none) */
	const char *sim_policy;       /* its eviction policy (core/policy.h name) */
	unsigned pregate;             /* layers ahead to predict by pre-gating (0: off) */
	bool pregate_prefetch;        /* ...and prefetch the predictions (daemon: PREFETCH
				       * hints instead of --prefetch-depth's; --sim-cache:
				       * inserted at once) */
	bool pregate_out;             /* predict from the layer's output (after its experts)
				       * instead of after its attention */
	bool route_daemon;            /* decide through the daemon's ROUTE (moet_route_opts)
				       * instead of route_cached on its residency map */
	bool dump;                    /* keep every route and router logit (experts_dump_write) */
};

/* Every expert read from the pack into memory. */
int experts_open_local(const struct model *m, struct experts **out, struct moe_error *err);
/* The daemon at socket (NULL: $MOETIER_SOCKET, else the default socket).
 * prefetch: send hints for the next `prefetch` layers (each one's router on
 * this layer's input); 0 none. */
int experts_open_daemon(const struct model *m, const char *socket, unsigned prefetch, struct experts **out,
			struct moe_error *err);
void experts_close(struct experts *ex);

/* moe-run --gpu: where the experts of the daemon's GPU tier are computed. */
enum experts_gpu_mode {
	EXPERTS_GPU_AUTO = 0, /* on the device when it can be used, else the host */
	EXPERTS_GPU_ON,       /* on the device, or fail */
	EXPERTS_GPU_OFF,      /* the GPU tier not asked for: host tier only */
};
/* Once, after opening, before the first token. auto and on ask the daemon
 * for its GPU tier (acquires with MOET_F_WANT_GPU, prefetch hints to the
 * GPU) when it has one that moe-run can read: the emulated one (through
 * moet_slot_ptr, computed on the host), or a CUDA VMM one with the device
 * path open (gpu_open: driver, device, kernels, every MoE layer's layout
 * supported by kernels/ffn.cu, not a MoLAE pack). note (len bytes) gets
 * the one line to show, "" for none: what is used, or why auto stays on
 * the host. 0, or with on a negative errno and err saying why the device
 * cannot be used. */
int experts_use_gpu(struct experts *ex, enum experts_gpu_mode mode, char *note, size_t len, struct moe_error *err);

/* Routing rule, simulated cache, pre-gating, dump: once, before the first
 * token. Cache-aware routing needs a cache to be aware of: the daemon's
 * host arena (its residency map read at each layer call), or with --local
 * a simulated one. 0 or -EINVAL/-ENOMEM with a message. */
int experts_configure(struct experts *ex, const struct experts_opts *o, struct moe_error *err);

/* A forward pass of B tokens begins at position pos0 (pos0 0: a new
 * sequence). Numbers the tokens for the simulated cache and the dump. */
int experts_begin(struct experts *ex, const int32_t *toks, uint32_t B, uint32_t pos0);

/* Pre-gating, right after layer il's attention: resid [B x n_embd] is the
 * residual stream there (before ffn_norm); for d = 1..pregate each later
 * layer il + d's ffn_norm and router give its predicted experts, kept to be
 * scored against what the layer then routes, and with pregate_prefetch sent
 * as hints (after layer il's own acquires) or put in the simulated cache.
 * 0 or -errno. A no-op without pre-gating. */
int experts_pregate(struct experts *ex, uint32_t il, const float *resid, uint32_t B, int threads);
/* With pregate_prefetch: the first pregate layers' experts predicted from
 * the tokens' embeddings (x [B x n_embd], the residual stream before layer
 * 0) as the forward pass starts, and hinted at once (or put in the
 * simulated cache); not counted in the recall. 0 or -errno. */
int experts_pregate_embed(struct experts *ex, const float *x, uint32_t B, int threads);
/* The same after layer il's output (its experts added): the point used with
 * pregate_out; experts_pregate is then the no-op and this one predicts. */
int experts_pregate_out(struct experts *ex, uint32_t il, const float *resid, uint32_t B, int threads);

/* A fitted pre-gate: between _begin and _end every forward pass (a
 * calibration text, not the text measured) adds, for each layer and
 * distance d <= pregate, the input pre-gating used (the residual stream
 * through the later layer's ffn_norm) against the logits that layer's
 * router then gave; _end solves, per (layer, d), the ridge regression of
 * those logits on [input; 1] pulled towards the router itself (ridge x the
 * mean input energy; 0.1 did best here), and pre-gating uses the fitted
 * maps from then on (the router where too few samples came). Call
 * experts_configure again after _end: the counters restart. */
int experts_pregate_fit_begin(struct experts *ex, struct moe_error *err);
int experts_pregate_fit_end(struct experts *ex, double ridge, struct moe_error *err);

/* Expert similarity for the similarity rule (route.h rule (c)): between
 * _begin and _end the ffn_norm'ed inputs of the first `samples` tokens each
 * MoE layer sees are kept (a calibration text); _end runs every expert of
 * the layer on them and sets sim[a][b] = the cosine of the two experts'
 * outputs over those inputs (output-space similarity, 1 on the diagonal),
 * which the similarity rule then reads. 0 or -errno. */
int experts_similarity_begin(struct experts *ex, uint32_t samples, struct moe_error *err);
int experts_similarity_end(struct experts *ex, int threads, struct moe_error *err);

/* --dump-hidden: from _begin on, each MoE layer's input (after ffn_norm,
 * what the router and the experts see) is spooled; _write stores them as raw
 * f32 [n_moe_layers][T][hidden], layers one after the other, T the tokens
 * computed: the calibration states of `moe-pack molae --calib`. 0 or -errno. */
int experts_hidden_begin(struct experts *ex, struct moe_error *err);
int experts_hidden_write(struct experts *ex, const char *path, struct moe_error *err);

/* The dump: the routing trace CSV of core/trace.h (Layer ID = model layer,
 * Batch Number = sequence, Token = its text by piece(), rows in rank order of
 * the experts that ran) at csv, and the router logits at csv".logits"
 * (doc/fidelity.md: "MOERLG01", u32 n_tokens, n_layers, n_experts,
 * first_layer, then f32 [n_tokens][n_layers][n_experts]). */
int experts_dump_write(struct experts *ex, const char *csv, int (*piece)(void *ctx, int32_t tok, char *buf, size_t len),
		       void *ctx, struct moe_error *err);

/* The token about to be computed (moet_set_token hint; a position going back
 * to 0 starts a sequence). token_key: FNV-1a of the token's text, 0 unknown. */
void experts_set_token(struct experts *ex, uint32_t token_key, uint32_t position);

/* The routed-expert output of model layer il for B tokens: x [B x n_embd]
 * (ffn_norm'ed), y [B x n_embd] = sum_j w_j expert_j(x). 0 or -errno. */
int experts_layer(struct experts *ex, uint32_t il, const float *x, uint32_t B, float *y, int threads,
		  struct moe_error *err);

/* Counters so far (bytes_read refreshed from the daemon on each call). */
void experts_get_stats(struct experts *ex, struct experts_stats *out);

#endif
