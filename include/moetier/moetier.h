/* moetier/moetier.h - libmoetier, the client library of moetierd.
 *
 * An inference engine attaches once (moet_connect), maps the daemon's
 * arenas once, and then per step asks for experts by (MoE layer, expert id)
 * and gets back slot indices (-1 for a miss), never new pointers; a lease
 * keeps the slots from being evicted until it is released. When no daemon
 * runs, moet_connect returns MOET_E_UNAVAILABLE and the engine keeps its
 * stock path.
 *
 * Thread safety: a moet_ctx is used by one thread at a time (give each
 * thread its own context: each gets its own rings). Functions return 0 or a
 * positive count on success and a negative code on failure: a negative
 * errno or one of MOET_E_*; moet_strerror() names either.
 *
 * ABI: symbols are versioned (MOETIER_0); structs passed in carry their
 * size in the first field so they can grow.
 */
#ifndef MOETIER_MOETIER_H
#define MOETIER_MOETIER_H

#include <stddef.h>
#include <stdint.h>

#include "moetier/proto.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOETIER_API_VERSION 1

enum moet_error_code {
	MOET_E_UNAVAILABLE = -10001,  /* no daemon at the socket: fall back */
	MOET_E_VERSION = -10002,      /* daemon speaks an incompatible protocol */
	MOET_E_DISCONNECTED = -10003, /* the daemon went away: reconnect */
	MOET_E_REFUSED = -10004,      /* the daemon refused us (credentials, limits) */
	MOET_E_CAPS = -10005,         /* a capability we asked for is missing */
};

enum moet_tier { MOET_TIER_GPU = 0, MOET_TIER_HOST = 1, MOET_TIER_NVME = 2 };

typedef struct moet_ctx moet_ctx;
typedef uint64_t moet_lease;

struct moet_connect_opts {
	size_t size;              /* sizeof(struct moet_connect_opts) */
	const char *socket_path;  /* NULL: $MOETIER_SOCKET, else MOET_DEFAULT_SOCKET */
	const char *model;        /* NULL or "": the daemon's first model */
	const char *client_name;  /* shown by `moectl clients` */
	uint32_t caps_wanted;     /* enum moet_caps the caller cannot do without */
	uint32_t control_only;    /* 1: no rings or arenas (admin tools) */
	int spin_us;              /* busy-poll window while waiting; < 0: 50 */
};

/* Connects and attaches (HELLO: version and capability check, then the
 * rings and arenas are mapped). opts may be NULL. */
int moet_connect(const struct moet_connect_opts *opts, moet_ctx **out);
/* Detaches; the daemon drops any lease still held. NULL is fine. */
void moet_close(moet_ctx *ctx);

struct moet_model_info {
	size_t size;              /* sizeof(struct moet_model_info), set by the caller */
	char name[64];
	uint32_t family, dtype, hidden, expert_width;
	uint32_t n_experts, top_k, n_moe_layers, first_moe_layer, moe_layer_step;
	uint64_t expert_bytes;    /* payload bytes of one expert */
	uint64_t slot_bytes[2];   /* per tier (GPU, host) */
	uint32_t n_slots[2];
	uint32_t caps;            /* enum moet_caps granted */
	uint32_t client_id;
	uint32_t protocol;
};
int moet_model_info(moet_ctx *ctx, struct moet_model_info *out);

/* Batched acquire of n <= MOET_MAX_BATCH experts of MoE layer `layer`.
 * slots[i]: slot index of ids[i] in tiers[i] (MOET_TIER_GPU or _HOST), or
 * -1 for a miss; below -1 that expert failed, a negative errno: -EBADMSG its
 * extent failed its checksum, -EIO it could not be read (the daemon re-reads
 * it only after a backoff), -EDQUOT this client holds its client-share of
 * the tier. flags: MOET_F_NOWAIT returns misses at once (their loads
 * start; wait with moet_wait_ready); without it the daemon completes the
 * entry once the loads finished (bounded by its wait-timeout-ms).
 * *lease (0 when nothing was served) must be passed to moet_release.
 * Returns the number of experts served, or a negative code. tiers may be NULL. */
int moet_acquire(moet_ctx *ctx, uint32_t layer, const uint32_t *ids, unsigned n, unsigned flags,
		 int32_t *slots, uint8_t *tiers, moet_lease *lease);
int moet_release(moet_ctx *ctx, moet_lease lease);

/* Hints for the daemon's expert predictors, sent with every later ACQUIRE
 * and ROUTE: the token being decoded (token_key = FNV-1a of its text, as
 * moe-sim computes it; 0 = unknown) and its position in the sequence
 * (UINT32_MAX = unknown). A position that goes back to 0 starts a new
 * sequence. One round trip: the announcement lets the daemon plan the
 * token's first layers before their ACQUIREs arrive. Optional: without
 * hints the daemon infers token boundaries from the layer order. */
int moet_set_token(moet_ctx *ctx, uint32_t token_key, uint32_t position);

/* Routing by the daemon: logits f32[n_experts] of one token -> the model's
 * top-k experts and weights (the family's rule), then an acquire of them.
 * Returns k (> 0) or a negative code. slots/tiers/lease as moet_acquire. */
int moet_route(moet_ctx *ctx, uint32_t layer, const float *logits, unsigned n_logits, unsigned flags,
	       uint32_t *experts, float *weights, int32_t *slots, uint8_t *tiers, moet_lease *lease);

/* Cache-aware routing by the daemon (protocol >= 2; doc/routing.md): exact
 * routing, then each slot after the router's top keep_top whose expert is not
 * resident (in `tiers`, at that moment) may take a resident expert instead,
 * by `rule` (MOET_ROUTE_MARGIN: the best-scored resident expert within
 * `margin` of the replaced one; MOET_ROUTE_LOW_WEIGHT: the same, only for
 * slots whose exact weight share is below max_share, weights renormalised;
 * MOET_ROUTE_SIMILARITY: the most similar resident expert). The router's
 * top keep_top are never replaced. experts/weights/slots/tiers/lease as
 * moet_route (the final set); the struct's out fields say which slots were
 * substituted and what exact routing was. Returns k, or a negative code:
 * -EINVAL for a malformed request (keep_top 0 or > k, margin < 0 or NaN, a
 * NaN logit; moet_last_error says which), -EOPNOTSUPP from a daemon that
 * predates protocol 2 or for a rule it cannot apply. */
struct moet_route_args {
	size_t size;            /* sizeof(struct moet_route_args), set by the caller */
	/* in */
	unsigned rule;          /* enum moet_route_rule (proto.h) */
	unsigned keep_top;      /* J, 1..k */
	float margin;           /* >= 0, INFINITY = no bound */
	float max_share;        /* LOW_WEIGHT: 0 = 0.25; others: 0 = no limit */
	float min_similarity;   /* SIMILARITY only */
	unsigned weights;       /* enum moet_route_weights; 0 = the rule's default */
	unsigned tiers;         /* enum moet_route_tiers; 0 = GPU or host */
	/* out */
	uint32_t subst_mask;    /* bit i: slot i was substituted */
	uint32_t open_mask;     /* bit i: slot i >= J and its exact expert not resident */
	uint32_t n_resident;    /* experts of the layer resident in `tiers` */
	uint32_t exact[MOET_MAX_BATCH];         /* exact routing's experts */
	float exact_weights[MOET_MAX_BATCH];    /* and weights */
};
int moet_route_opts(moet_ctx *ctx, uint32_t layer, const float *logits, unsigned n_logits, unsigned flags,
		    struct moet_route_args *args, uint32_t *experts, float *weights, int32_t *slots, uint8_t *tiers,
		    moet_lease *lease);

/* Expert FFN by the daemon on the host tier (compute where the expert
 * lives): y[t] = sum_j weights[t*k+j] * expert_{experts[t*k+j]}(x[t]) for
 * `tokens` tokens of `hidden` floats each (x, y: [tokens x hidden]). All
 * experts must be resident on the host: otherwise -EAGAIN and their loads
 * start (retry, or compute elsewhere). Needs MOET_CAP_COMPUTE. Returns
 * tokens or a negative code. */
int moet_compute(moet_ctx *ctx, uint32_t layer, uint32_t tokens, uint32_t k, const uint32_t *experts,
		 const float *weights, const float *x, float *y);

/* Fire-and-forget prefetch hint (e.g. straight from the router output of
 * the previous layer) into tier (MOET_TIER_HOST or _GPU). */
int moet_prefetch(moet_ctx *ctx, uint32_t layer, const uint32_t *ids, unsigned n, unsigned tier);

/* Asynchronous use of the ring: submit entries, reap completions. A
 * user_tag with the top bit set is reserved for the library. */
int moet_submit(moet_ctx *ctx, const struct moet_sqe *sqe);
/* Waits up to timeout_ms (-1: forever) for a completion. 1 when *out was
 * filled, 0 on timeout, or a negative code. */
int moet_reap(moet_ctx *ctx, struct moet_cqe *out, int timeout_ms);
/* The same entry over the socket instead of the ring (slow path, tests). */
int moet_submit_socket(moet_ctx *ctx, const struct moet_sqe *sqe, struct moet_cqe *out);

/* Address of a slot's payload in this process (host arena or emulated GPU
 * region, mapped read-only at attach), or NULL. */
const void *moet_slot_ptr(moet_ctx *ctx, unsigned tier, int32_t slot);

/* Residency without a round trip: mask[e] = 1 when expert e of `layer` is
 * resident in tier (the shape of ktransformers' gpu_experts_mask). n must
 * be >= n_experts. Returns the number resident. */
int moet_resident(moet_ctx *ctx, uint32_t layer, unsigned tier, uint8_t *mask, unsigned n);
/* Waits until the residency of `layer` changes (a load finished), up to
 * timeout_ms: the ready event for NOWAIT misses. 1 changed, 0 timeout. */
int moet_wait_ready(moet_ctx *ctx, uint32_t layer, int timeout_ms);
/* Move or compute? For `tokens` tokens routed to each of ids[n] of MoE layer
 * `layer`: where[i] = MOET_WHERE_HOST when computing it on the host tier
 * (moet_compute) is estimated cheaper than moving it to the GPU, else
 * MOET_WHERE_MOVE; tier[i] is where it is now; host_us/move_us the
 * estimates (any of tier/host_us/move_us may be NULL). One round trip on the
 * control socket. Returns n or a negative code. */
int moet_advise(moet_ctx *ctx, uint32_t layer, const uint32_t *ids, unsigned n, uint32_t tokens, uint8_t *where,
		uint8_t *tier, float *host_us, float *move_us);

/* The GPU arena's handles, for a client that maps it itself: the emulated
 * region's read-only memfd, or CUDA VMM chunk fds to import with
 * cuMemImportFromShareableHandle and map at offsets[i] (only the chunks that
 * exist, each with its offset; a MoLAE pack's resident B, when in the GPU
 * tier, after the slots: moet_latent_basis). Fills info and up to
 * `max` fds/offsets starting at handle `first`; returns how many were
 * received (the caller owns and closes the fds). Ask again from first + n
 * while first + n < info->total; fetch again when info->generation changes.
 * -ENODEV when the daemon has no GPU tier. */
int moet_gpu_export(moet_ctx *ctx, unsigned first, struct moet_gpu_export *info, int *fds, uint64_t *offsets,
		    unsigned max);

/* Where the shared B matrices of one (MoE layer, latent group) of a MoLAE
 * latent pack are (doc/molae.md). The caller sets out->size =
 * sizeof(*out). On success (0): tier MOET_TIER_GPU when the daemon keeps B
 * resident in its GPU tier, `offset` bytes into the GPU arena region (the
 * one moet_gpu_export hands out; with the emulated backend also
 * moet_slot_ptr(ctx, MOET_TIER_GPU, 0) + offset), B_gate [rows x cols]
 * then B_up, `bytes` for both; tier MOET_TIER_HOST when the daemon keeps it
 * on the host only (read blk.L.molae_b_gate.G / _up.G from the pack;
 * offset 0). dtype is an enum moe_dtype (f32). -ENOENT for a dense pack,
 * -ERANGE for a layer or group out of range, -EOPNOTSUPP from a daemon that
 * predates the request. One round trip on the control socket. */
struct moet_latent_basis {
	uint32_t size;            /* sizeof(struct moet_latent_basis), set by the caller */
	uint32_t tier;            /* enum moet_tier */
	uint32_t dtype;
	uint32_t rows, cols;      /* rank x hidden, per matrix */
	uint64_t offset;
	uint64_t bytes;
};
int moet_latent_basis(moet_ctx *ctx, uint32_t layer, uint32_t group, struct moet_latent_basis *out);

/* Per-(layer, expert) load statistics, EPLB shape: arrays of
 * n_moe_layers * n_experts, row-major by layer; any may be NULL. */
int moet_expert_counters(moet_ctx *ctx, uint64_t *hits, uint64_t *misses, uint64_t *loads, uint64_t *bytes);

/* Admin and inspection (text replies are malloc'd; free them). */
int moet_stats(moet_ctx *ctx, unsigned format, char **out);
int moet_clients(moet_ctx *ctx, char **out);
int moet_config_get(moet_ctx *ctx, const char *name, char **out);
int moet_config_set(moet_ctx *ctx, const char *name, const char *value);
int moet_pin(moet_ctx *ctx, uint32_t layer, uint32_t expert, unsigned tier);
int moet_unpin(moet_ctx *ctx, uint32_t layer, uint32_t expert, unsigned tier);
int moet_evict(moet_ctx *ctx, uint32_t layer, uint32_t expert, unsigned tier);

/* The last error message from the daemon (ERROR replies), or "". With
 * ctx == NULL: why this thread's last moet_connect failed. */
const char *moet_last_error(moet_ctx *ctx);
/* Names any return code of this library. */
const char *moet_strerror(int code);
/* The control socket (e.g. to poll it for hang-up). */
int moet_socket_fd(moet_ctx *ctx);

#ifdef __cplusplus
}
#endif

#endif
