/* policy.h - eviction policies behind one ops table, shared by the live cache
 * (daemon/cache.c) and the offline simulator (tools/moe-sim).
 *
 * A policy ranks the entries one tier holds; it never decides WHEN to evict
 * (the owner does, when it needs a slot) and never holds a payload. Entries are
 * named by a dense id, id = layer * n_experts + expert, so every policy keeps
 * fixed arrays sized at creation and does not allocate on the hot path.
 *
 * Scope: with `per_layer` set, each MoE layer is its own group with its own
 * slots (policy_victim(p, layer, ...) only returns ids of that layer); without
 * it, all layers share one budget (the group argument is ignored).
 *
 * The owner tells the policy what happens, in order:
 *   policy_begin(p, token, layer)   a new (token, layer) access starts
 *   policy_hit(p, id)               id was resident when accessed
 *   policy_insert(p, id, flags)     id became resident (demand load or prefetch)
 *   policy_remove(p, id)            id left the tier (evicted, dropped, failed)
 *   policy_victim(p, group, filter) which entry to evict next
 *
 * Victims are chosen only among entries the owner says are evictable: the
 * filter callback answers for one id (the cache says no for pinned, leased or
 * loading entries; moe-sim says no for the experts of the current access).
 * Pinned experts should also simply never be inserted into the policy.
 *
 * Thread safety: none inside. A policy is owned by one cache (or one
 * simulation) and the owner serialises every call (the cache calls it under its
 * own lock). The filter runs under that lock too and must not call back into
 * the policy. Different policy instances are independent.
 */
#ifndef MOETIER_POLICY_H
#define MOETIER_POLICY_H

#include <stdbool.h>
#include <stdint.h>

#include "util.h"

#define POLICY_NONE UINT32_MAX

/* policy_insert flags. */
enum {
	POLICY_F_PREFETCH = 1u << 0, /* brought in ahead of use, not yet used */
};

/* Future knowledge for the offline Belady bound: the logical time of the next
 * access of id after `now` (UINT64_MAX = never). Only moe-sim provides it. */
typedef uint64_t (*policy_next_use_fn)(void *ctx, uint32_t id, uint64_t now);

struct policy_config {
	uint32_t n_layers;      /* MoE layers (groups when per_layer) */
	uint32_t n_experts;     /* experts per layer */
	uint32_t capacity;      /* slots per group (per layer, or the whole tier
	                         * when !per_layer); sizes ARC's lists; 0 = unknown */
	bool per_layer;
	/* LFU / LFRU: counts are multiplied by decay every decay_period accesses
	 * (0 = 1.0 / 0: no decay). LFRU: weight of recency against frequency. */
	double decay;
	uint32_t decay_period;
	double lfru_recency;
	/* Belady only. */
	policy_next_use_fn next_use;
	void *next_use_ctx;
};

/* Answers whether id may be evicted now. */
typedef bool (*policy_filter_fn)(void *ctx, uint32_t id);

struct policy;

struct policy_ops {
	const char *name;
	const char *help;
	size_t priv_size;       /* bytes of private state allocated with the policy */
	int (*init)(struct policy *p, struct moe_error *err);
	void (*fini)(struct policy *p);
	void (*begin)(struct policy *p, uint64_t token, uint32_t layer);
	void (*hit)(struct policy *p, uint32_t id);
	void (*insert)(struct policy *p, uint32_t id, unsigned flags);
	void (*remove)(struct policy *p, uint32_t id);
	/* Best victim in group accepted by filter, or POLICY_NONE. */
	uint32_t (*victim)(struct policy *p, uint32_t group, policy_filter_fn filter, void *ctx);
};

struct policy {
	const struct policy_ops *ops;
	struct policy_config cfg;
	uint32_t n_ids;         /* n_layers * n_experts */
	uint32_t n_groups;      /* n_layers when per_layer, else 1 */
	uint64_t token;         /* from the last policy_begin */
	uint32_t layer;
	uint64_t clock;         /* counts begin() calls: the logical time */
	uint8_t *present;       /* [n_ids]: tracked by the policy */
	void *priv;
};

/* The registered policies, NULL-terminated: lru, lfu, lfru, leaststale, arc,
 * belady. */
extern const struct policy_ops *const policy_registry[];
const struct policy_ops *policy_find(const char *name);

/* Defaults: decay 0.5 every 64 accesses per group, lfru_recency 0.5. */
void policy_config_default(struct policy_config *cfg, uint32_t n_layers, uint32_t n_experts,
			   uint32_t capacity, bool per_layer);

/* Creates a policy by name. -EINVAL (unknown name, bad config, belady without
 * next_use) or -ENOMEM with a message. */
int policy_create(const char *name, const struct policy_config *cfg, struct policy **out,
		  struct moe_error *err);
void policy_destroy(struct policy *p);

static inline uint32_t policy_id(const struct policy *p, uint32_t layer, uint32_t expert)
{
	return layer * p->cfg.n_experts + expert;
}
static inline uint32_t policy_id_layer(const struct policy *p, uint32_t id)
{
	return id / p->cfg.n_experts;
}
static inline uint32_t policy_id_expert(const struct policy *p, uint32_t id)
{
	return id % p->cfg.n_experts;
}
/* The group an id belongs to (its layer, or 0 for one global budget). */
static inline uint32_t policy_group_of(const struct policy *p, uint32_t id)
{
	return p->cfg.per_layer ? id / p->cfg.n_experts : 0;
}
static inline bool policy_contains(const struct policy *p, uint32_t id)
{
	return id < p->n_ids && p->present[id];
}

/* Event calls; out-of-range ids are ignored (the owner validated its keys),
 * insert of a tracked id counts as a hit, remove of an untracked id is a no-op. */
void policy_begin(struct policy *p, uint64_t token, uint32_t layer);
void policy_hit(struct policy *p, uint32_t id);
void policy_insert(struct policy *p, uint32_t id, unsigned flags);
void policy_remove(struct policy *p, uint32_t id);
/* The entry to evict from `group` (a layer when per_layer, else ignored), among
 * tracked ids that filter accepts (NULL: all). POLICY_NONE when none. The
 * entry stays tracked until the owner calls policy_remove. */
uint32_t policy_victim(struct policy *p, uint32_t group, policy_filter_fn filter, void *ctx);

/* The individual policies (also reachable through policy_find). */
extern const struct policy_ops policy_lru_ops;
extern const struct policy_ops policy_lfu_ops;
extern const struct policy_ops policy_lfru_ops;
extern const struct policy_ops policy_leaststale_ops;
extern const struct policy_ops policy_arc_ops;
extern const struct policy_ops policy_belady_ops;

#endif
