/* moetier/proto.h - the wire format between moetierd and its clients.
 *
 * Versioned and append-only: a field or opcode, once released, keeps its
 * number, size and meaning; new ones take reserved space or new numbers and
 * bump MOET_PROTO_VERSION. Both ends check the version at HELLO.
 *
 * Control plane: a SOCK_SEQPACKET unix socket; every message is one
 * struct moet_msg followed by `len` payload bytes; file descriptors travel
 * with SCM_RIGHTS. Large replies (stats, client lists) come back as a sealed
 * memfd rather than in the message, so no reply is ever truncated.
 *
 * Data plane: per client one shared-memory region (a memfd the daemon
 * creates and passes at HELLO) holding a submission ring (client -> daemon),
 * a completion ring (daemon -> client) and a scratch area (router logits).
 * Each ring is single-producer single-consumer; its indices are free-running
 * u32 counters; doorbells are futexes on the tail index (see core/ring.h).
 */
#ifndef MOETIER_PROTO_H
#define MOETIER_PROTO_H

#include <stdint.h>

/* 2: cache-aware ROUTE (MOET_F_ROUTE_CACHE, struct moet_route_req) */
#define MOET_PROTO_VERSION 2
#define MOET_PROTO_MIN_VERSION 1
#define MOET_MSG_MAGIC 0x544f454du /* "MOET" little-endian */
#define MOET_MAX_BATCH 32          /* experts per ring entry */
#define MOET_MAX_MSG 4096          /* largest control message accepted */
#define MOET_DEFAULT_SOCKET "/run/moetier/moetierd.sock"

/* ---- control plane -------------------------------------------------------- */

enum moet_msg_type {
	MOET_MSG_HELLO = 1,        /* C->S moet_hello; reply HELLO_REPLY + fds */
	MOET_MSG_HELLO_REPLY = 2,
	MOET_MSG_ERROR = 3,        /* S->C: status < 0, payload = message text */
	MOET_MSG_SUBMIT = 4,       /* C->S one moet_sqe; reply SUBMIT_REPLY = one moet_cqe
				    * (the same operations as the ring, over the socket) */
	MOET_MSG_SUBMIT_REPLY = 5,
	MOET_MSG_STATS = 16,       /* admin: arg = moet_stats_format; reply OK + memfd */
	MOET_MSG_CONFIG_GET = 17,  /* payload: option name, or empty for all; reply OK + text */
	MOET_MSG_CONFIG_SET = 18,  /* admin: payload "name=value" */
	MOET_MSG_PIN = 19,         /* admin: moet_expert_arg */
	MOET_MSG_UNPIN = 20,
	MOET_MSG_EVICT = 21,
	MOET_MSG_CLIENTS = 22,     /* admin: reply OK + memfd */
	MOET_MSG_OK = 23,          /* generic success reply; payload depends on request */
	MOET_MSG_ADVISE = 25,      /* C->S: struct moet_advise_req; reply OK with
				    * struct moet_advise_reply (move or compute, per expert) */
	MOET_MSG_GPU_EXPORT = 24,  /* C->S (data-plane client): arg = index of the first
				    * handle wanted; reply OK with struct moet_gpu_export,
				    * then uint64_t offsets[n], and n fds (SCM_RIGHTS) */
	MOET_MSG_LATENT_BASIS = 26, /* C->S (model client): struct moet_latent_basis_req;
				     * reply OK with struct moet_latent_basis_reply. A
				     * daemon that predates it answers -EOPNOTSUPP. */
};

/* LATENT_BASIS: where the shared B matrices of one (MoE layer, latent
 * group) of a MoLAE latent pack are (doc/molae.md). In the GPU tier
 * (tier 0): at byte `offset` of the GPU arena region a client maps (the
 * emulated memfd from HELLO or GPU_EXPORT, or the VMM chunks mapped at
 * their offsets), B_gate [rows x cols] then B_up [rows x cols], dtype
 * (enum moe_dtype, f32), row-major, `bytes` for both. On the host (tier 1):
 * the daemon keeps them only for its own COMPUTE; the client reads
 * blk.L.molae_b_{gate,up}.G from the pack (offset 0). Errors: -ENOENT for a
 * dense pack, -ERANGE for a layer or group out of range. */
struct moet_latent_basis_req {
	uint32_t layer;       /* MoE layer index */
	uint32_t group;       /* latent group (blk.L.molae_groups) */
	uint32_t reserved[2]; /* zero */
};
struct moet_latent_basis_reply {
	uint32_t tier;        /* 0 GPU, 1 host */
	uint32_t dtype;       /* enum moe_dtype of B (f32) */
	uint32_t rows, cols;  /* rank r x hidden n, per matrix */
	uint64_t offset;      /* GPU tier: byte offset of B_gate in the region */
	uint64_t bytes;       /* B_gate and B_up */
	uint32_t n_groups;    /* latent groups of this layer */
	uint32_t reserved[3];
};
_Static_assert(sizeof(struct moet_latent_basis_reply) == 48, "latent basis reply layout");

/* GPU arena handles for clients: the emulated region's read-only memfd, or
 * the POSIX fds of the CUDA VMM chunks (cuMemImportFromShareableHandle in the
 * client, then cuMemMap at offsets[i] of a range of slot_stride * n_slots,
 * followed by a MoLAE pack's resident B matrices when the daemon keeps them
 * there). Only the chunks that exist are handed out (a VMM slot that never
 * held an expert has none), each with its offset: total counts them.
 * Handles come in batches of at most MOET_GPU_EXPORT_BATCH; a client asks
 * again with first = first + n until first + n == total, and fetches the set
 * again when `generation` changes (a chunk was created or released). */
/* ADVISE: for `tokens` tokens routed to each of ids[n] (MoE layer `layer`),
 * is it cheaper to move the expert to the GPU or to compute it where it is
 * (the daemon's COMPUTE on the host tier)? The daemon answers from where
 * each expert is now and its cost model (measured host rates, configured
 * link rates); the inputs are in `moectl stats`. */
enum moet_where { MOET_WHERE_HOST = 1, MOET_WHERE_MOVE = 2 };
struct moet_advise_req {
	uint32_t layer;
	uint32_t tokens;
	uint32_t n;
	uint32_t reserved;
	uint32_t ids[MOET_MAX_BATCH];
};
struct moet_advise_reply {
	uint32_t n;
	uint32_t reserved;
	uint8_t where[MOET_MAX_BATCH]; /* enum moet_where */
	uint8_t tier[MOET_MAX_BATCH];  /* where the expert is now: 0 GPU, 1 host, 2 NVMe */
	float host_us[MOET_MAX_BATCH]; /* estimated time computing on the host (incl. a read) */
	float move_us[MOET_MAX_BATCH]; /* estimated time moving + computing on the GPU; +inf without one */
};
_Static_assert(sizeof(struct moet_advise_reply) == 8 + 2 * MOET_MAX_BATCH + 8 * MOET_MAX_BATCH, "advise layout");

#define MOET_GPU_EXPORT_BATCH 8
enum moet_gpu_backend {
	MOET_GPU_NONE = 0,
	MOET_GPU_EMULATED = 1,
	MOET_GPU_UVM = 2,   /* managed memory: nothing to export */
	MOET_GPU_VMM = 3,
};
struct moet_gpu_export {
	uint32_t backend;     /* enum moet_gpu_backend */
	int32_t device;       /* CUDA device ordinal */
	uint64_t generation;
	uint64_t slot_stride; /* slot i starts at i * slot_stride */
	uint64_t chunk_bytes; /* bytes behind each handle */
	uint32_t total;       /* handles in the whole export */
	uint32_t first;       /* index of the first handle in this reply */
	uint32_t n;           /* handles and offsets in this reply */
	uint32_t reserved;
};
_Static_assert(sizeof(struct moet_gpu_export) == 48, "moet_gpu_export layout");

struct moet_msg {
	uint32_t magic;    /* MOET_MSG_MAGIC */
	uint16_t version;  /* MOET_PROTO_VERSION of the sender */
	uint16_t type;     /* enum moet_msg_type */
	uint32_t seq;      /* echoed in the reply */
	int32_t status;    /* replies: 0 or a negative errno */
	uint32_t arg;      /* small request argument */
	uint32_t len;      /* payload bytes that follow */
};
_Static_assert(sizeof(struct moet_msg) == 24, "moet_msg layout");

enum moet_caps {
	MOET_CAP_RING = 1u << 0,       /* shared-memory rings */
	MOET_CAP_HOST_ARENA = 1u << 1, /* host arena memfd (read-only) */
	MOET_CAP_GPU_EMU = 1u << 2,    /* emulated GPU region memfd (read-only) */
	MOET_CAP_GPU_VMM = 1u << 3,    /* CUDA VMM export handles */
	MOET_CAP_ROUTE = 1u << 4,      /* ROUTE opcode */
	MOET_CAP_COMPUTE = 1u << 5,    /* COMPUTE opcode */
	MOET_CAP_ADMIN = 1u << 6,      /* this peer may send admin requests */
};

struct moet_hello {
	uint32_t version_min;   /* oldest protocol version the client speaks */
	uint32_t version_max;   /* newest */
	uint32_t caps_wanted;   /* caps the client cannot work without */
	uint32_t flags;         /* MOET_HELLO_* */
	char client_name[32];   /* for `moectl clients`; NUL-terminated */
	char model[64];         /* model name; empty = the first model served */
};

enum moet_hello_flags {
	MOET_HELLO_CONTROL_ONLY = 1u << 0, /* no rings/arenas (moectl) */
};

/* Which fds follow a HELLO_REPLY, in this order, when the bit is set. */
enum moet_hello_fds {
	MOET_FD_RING = 1u << 0,
	MOET_FD_HOST = 1u << 1,
	MOET_FD_GPU = 1u << 2,
	MOET_FD_SHARED = 1u << 3,
};

struct moet_hello_reply {
	uint32_t version;       /* protocol version chosen */
	uint32_t caps;          /* enum moet_caps */
	uint32_t client_id;
	uint32_t fds;           /* enum moet_hello_fds */
	/* model */
	char model[64];
	uint32_t family, dtype, hidden, expert_width;
	uint32_t n_experts, top_k, n_moe_layers, first_moe_layer;
	uint32_t moe_layer_step, scoring, norm_topk_prob, reserved0;
	uint64_t extent_payload; /* bytes of one expert's payload */
	/* arenas: tier 0 = GPU, 1 = host */
	uint64_t arena_bytes[2];
	uint64_t slot_bytes[2];  /* slot i of tier t is at i * slot_bytes[t] */
	uint32_t n_slots[2];
	/* ring region */
	uint64_t ring_bytes;
	/* shared state region (residency bitmaps, counters) */
	uint64_t shared_bytes;
	uint32_t reserved[16];
};

enum moet_stats_format {
	MOET_STATS_TEXT = 0,
	MOET_STATS_JSON = 1,
	MOET_STATS_PROMETHEUS = 2,
	MOET_STATS_FORMAT_MASK = 0xff,
	/* flag: Prometheus with the per-(layer, expert) series (layers x
	 * experts x 4 of them: off unless asked for) */
	MOET_STATS_PER_EXPERT = 0x100,
};

struct moet_expert_arg {
	uint32_t layer;  /* MoE layer index */
	uint32_t expert;
	uint32_t tier;   /* 0 GPU, 1 host */
	uint32_t reserved;
};

/* ---- data plane ----------------------------------------------------------- */

enum moet_opcode {
	MOET_OP_NOP = 1,
	MOET_OP_ACQUIRE = 2,   /* ids[count] of `layer` -> slot/tier per id + lease */
	MOET_OP_RELEASE = 3,   /* lease */
	MOET_OP_PREFETCH = 4,  /* ids[count] of `layer`, hint into `tier` */
	MOET_OP_ROUTE = 5,     /* logits f32[n_experts] at scratch[data_off] -> top-k ids,
				* weights, then ACQUIRE of them (flags as ACQUIRE);
				* with MOET_F_ROUTE_CACHE cache-aware (see below) */
	MOET_OP_COMPUTE = 6,   /* expert FFN on the host tier: struct moet_compute_args at
				* scratch[data_off] (data_len bytes cover it all); see below */
};

/* COMPUTE: at scratch[data_off], this header, then
 *   uint32_t experts[tokens * k]   the experts of each token (MoE layer `layer`)
 *   float    weights[tokens * k]   their routing weights
 *   float    x[tokens * hidden]    hidden states in
 *   float    y[tokens * hidden]    written by the daemon: sum_j w * expert_j(x)
 * Every expert must be resident in the host tier: otherwise the entry fails
 * with -EAGAIN (n_miss says how many), their loads start, and the client
 * retries or computes elsewhere. result = tokens on success. */
struct moet_compute_args {
	uint32_t tokens;
	uint32_t k;
	uint32_t reserved[2];
};

enum moet_sqe_flags {
	MOET_F_NOWAIT = 1u << 0,   /* misses complete at once (slot -1), loads start */
	MOET_F_WANT_GPU = 1u << 1, /* serve from the GPU tier when possible */
	MOET_F_ROUTE_CACHE = 1u << 2, /* ROUTE only, protocol >= 2: a struct
				       * moet_route_req follows the logits */
};

/* Cache-aware ROUTE (protocol 2; doc/routing.md). The scratch area at
 * data_off holds f32 logits[n_experts] and right after them this struct;
 * data_len = n_experts * 4 + sizeof(struct moet_route_req). The daemon routes
 * exactly (the family's rule), then lets the slots after the router's top
 * keep_top take a resident expert instead of a non-resident one, by `rule`
 * (core/route.h, route_cached); residency is the daemon's tiers at that
 * moment. It writes the output fields back into the scratch area before the
 * completion (also on a refused request: status and error); the CQE carries
 * the final experts and weights as for a plain ROUTE. A malformed request
 * (keep_top 0 or > k, margin < 0 or NaN, a NaN logit, unknown rule...) fails
 * with -EINVAL; rule SIMILARITY without a similarity table with -EOPNOTSUPP. */
enum moet_route_rule {
	MOET_ROUTE_EXACT = 0,      /* no substitution (reply fields still filled) */
	MOET_ROUTE_MARGIN = 1,     /* keep-J + margin: best resident within margin */
	MOET_ROUTE_LOW_WEIGHT = 2, /* + only slots whose exact weight share < max_share */
	MOET_ROUTE_SIMILARITY = 3, /* + the resident most similar to the replaced one */
};
enum moet_route_weights {
	MOET_ROUTE_W_DEFAULT = 0,  /* the rule's: MARGIN family, LOW_WEIGHT renorm,
				    * SIMILARITY inherit */
	MOET_ROUTE_W_FAMILY = 1,   /* the family's rule over the final set */
	MOET_ROUTE_W_RENORM = 2,   /* family rule, scaled to the exact set's sum */
	MOET_ROUTE_W_INHERIT = 3,  /* each slot keeps exact routing's weight */
};
enum moet_route_tiers {
	MOET_ROUTE_TIER_GPU = 1u << 0,  /* resident = in the GPU tier ... */
	MOET_ROUTE_TIER_HOST = 1u << 1, /* ... or the host tier; 0 = both */
};
struct moet_route_req {
	/* in */
	uint32_t rule;           /* enum moet_route_rule */
	uint32_t keep_top;       /* J, 1..top_k: the router's top-J are never replaced */
	float margin;            /* >= 0 (+inf allowed): max selection-key gap
				  * (logit units; DeepSeek-V3: sigmoid + bias) */
	float max_share;         /* LOW_WEIGHT: 0 = 0.25; others: 0 = no limit */
	float min_similarity;    /* SIMILARITY: least similarity accepted */
	uint32_t weights;        /* enum moet_route_weights */
	uint32_t tiers;          /* enum moet_route_tiers */
	uint32_t reserved[5];    /* zero */
	/* out (written by the daemon) */
	int32_t status;          /* 0 or the entry's negative errno */
	uint32_t subst_mask;     /* bit i: slot i took a resident substitute */
	uint32_t open_mask;      /* bit i: slot i >= J and its exact expert not resident */
	uint32_t n_resident;     /* experts of the layer resident in `tiers` */
	uint16_t exact[MOET_MAX_BATCH];        /* exact routing's experts */
	float exact_weight[MOET_MAX_BATCH];    /* and weights */
	char error[96];          /* why, when status < 0 */
};
_Static_assert(sizeof(struct moet_route_req) == 48 + 16 + 2 * MOET_MAX_BATCH + 4 * MOET_MAX_BATCH + 96,
	       "route req layout");

struct moet_sqe {
	uint8_t opcode;      /* enum moet_opcode */
	uint8_t flags;       /* enum moet_sqe_flags */
	uint16_t count;      /* ids used (ACQUIRE, PREFETCH) */
	uint32_t layer;      /* MoE layer index */
	uint64_t user_tag;   /* echoed in the completion */
	uint64_t lease;      /* RELEASE */
	uint32_t data_off;   /* ROUTE: byte offset of the logits in the scratch area */
	uint32_t data_len;   /* ROUTE: bytes of logits (n_experts * 4) */
	uint32_t tier;       /* PREFETCH target tier */
	/* ACQUIRE/ROUTE hints for the daemon's predictors (taken from what was
	 * reserved, zero-filled space: 0 = no hint, so peers that never set
	 * them keep working unchanged). */
	uint32_t token_key;  /* predict_token_key() of the token's text */
	uint32_t token_pos;  /* the token's position in its sequence + 1 */
	uint32_t reserved[1];
	uint16_t ids[MOET_MAX_BATCH];
};
_Static_assert(sizeof(struct moet_sqe) == 112, "sqe layout");

struct moet_cqe {
	uint64_t user_tag;
	uint64_t lease;      /* 0 when nothing is held */
	int32_t result;      /* >= 0: entries served (ACQUIRE/ROUTE), 0 for others;
			      * < 0: the whole entry failed (negative errno) */
	uint16_t count;
	uint8_t opcode;
	uint8_t flags;
	uint32_t n_hit;
	uint32_t n_miss;
	int32_t slot[MOET_MAX_BATCH];    /* >= 0: served; -1: a miss (not loaded in time);
					  * < -1: that expert failed, a negative errno:
					  * -EBADMSG its extent failed its checksum, -EIO it
					  * could not be read (both: marked bad, answered at
					  * once until a re-read after a backoff), -EDQUOT the
					  * client holds its share of the tier (client-share),
					  * -ENOMEM no slot could be allocated for it (the
					  * arena's allocator failed; transient, ask again) */
	uint8_t tier[MOET_MAX_BATCH];    /* tier of slot[i] (0 GPU, 1 host) */
	uint16_t ids[MOET_MAX_BATCH];    /* the experts (ROUTE: the chosen ones) */
	float weight[MOET_MAX_BATCH];    /* ROUTE: routing weights */
};
_Static_assert(sizeof(struct moet_cqe) == 384, "cqe layout");

/* One ring's control block. Each index sits on its own cache line; the
 * producer owns `tail`, the consumer owns `head` and `waiting`. The futex
 * word is `tail`: a consumer sleeps on the tail value it last saw. */
struct moet_ring_ctl {
	uint32_t head;
	uint32_t pad0[15];
	uint32_t tail;
	uint32_t pad1[15];
	uint32_t waiting;    /* set and cleared only by the consumer */
	uint32_t pad2[15];
	uint32_t entries;    /* power of two */
	uint32_t entry_size;
	uint32_t pad3[14];
};
_Static_assert(sizeof(struct moet_ring_ctl) == 256, "ring ctl layout");

#define MOET_RING_MAGIC 0x474e4952u /* "RING" */

/* Page 0 of the ring region. */
struct moet_ring_region {
	uint32_t magic;
	uint32_t version;
	uint64_t total_bytes;
	uint64_t sq_ctl_off, sq_off;       /* struct moet_ring_ctl, entries */
	uint64_t cq_ctl_off, cq_off;
	uint64_t scratch_off, scratch_bytes;
};

#define MOET_SHARED_MAGIC 0x44524853u /* "SHRD" */

/* Header of the shared state region (one per model, read-only for clients).
 * For MoE layer l:
 *   seq   at layer_off + l * layer_stride: a seqlock (odd while the daemon
 *         writes); also a futex word that changes whenever a load finishes
 *         in that layer (the "ready event" for misses)
 *   bits  at layer_off + l * layer_stride + 8: words u64[2][bitmap_words]
 *         (tier 0 GPU then tier 1 host), bit e set = expert e resident
 * Per (layer, expert), struct moet_expert_counters at
 *   counters_off + (l * n_experts + e) * sizeof(struct moet_expert_counters)
 * updated by the daemon with relaxed atomics (EPLB-style load statistics). */
struct moet_shared_hdr {
	uint32_t magic;
	uint32_t version;
	uint32_t n_moe_layers;
	uint32_t n_experts;
	uint32_t bitmap_words;
	uint32_t reserved0;
	uint64_t layer_off;
	uint64_t layer_stride;
	uint64_t counters_off;
	uint64_t total_bytes;
	uint32_t daemon_pid_unused;
	uint32_t generation;   /* bumps when the daemon restarts the model */
};

struct moet_expert_counters {
	uint64_t hits;    /* served from a memory tier */
	uint64_t misses;  /* not resident when asked */
	uint64_t loads;   /* loads from NVMe finished */
	uint64_t bytes;   /* bytes loaded */
};

#endif
