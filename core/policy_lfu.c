/* policy_lfu.c - least frequently used with decay, and LFRU.
 *
 * LFU: every id has a use count (hits and demand inserts add 1, a prefetch
 * insert adds nothing until the entry is used); every decay_period accesses
 * all counts are multiplied by decay, so old popularity fades. Counts survive
 * eviction (a returning expert keeps its history). The victim is the evictable
 * entry with the smallest count, the least recently used among equals.
 *
 * LFRU: priority = (1 - r) * count / max_count_in_group + r / (1 + age), age
 * in accesses since the entry was last used, r = lfru_recency; the victim has
 * the lowest priority. */
#include "config.h"

#include <stdlib.h>

#include "policy_impl.h"

struct lfu {
	struct plink *node;   /* recency order of tracked ids, per group */
	struct plist *list;
	double *count;        /* [n_ids] */
	uint64_t *last;       /* [n_ids] clock of last use */
	uint64_t since_decay;
	bool lfru;
};

static int lfu_init_common(struct policy *p, struct moe_error *err, bool lfru)
{
	struct lfu *s = p->priv;
	s->lfru = lfru;
	s->node = calloc(p->n_ids, sizeof(*s->node));
	s->list = calloc(p->n_groups, sizeof(*s->list));
	s->count = calloc(p->n_ids, sizeof(*s->count));
	s->last = calloc(p->n_ids, sizeof(*s->last));
	if (!s->node || !s->list || !s->count || !s->last) {
		free(s->node);
		free(s->list);
		free(s->count);
		free(s->last);
		return moe_error_set(err, -ENOMEM, "%s: out of memory", lfru ? "lfru" : "lfu");
	}
	for (uint32_t g = 0; g < p->n_groups; g++)
		plist_init(&s->list[g]);
	return 0;
}

static int lfu_init(struct policy *p, struct moe_error *err)
{
	return lfu_init_common(p, err, false);
}

static int lfru_init(struct policy *p, struct moe_error *err)
{
	return lfu_init_common(p, err, true);
}

static void lfu_fini(struct policy *p)
{
	struct lfu *s = p->priv;
	free(s->node);
	free(s->list);
	free(s->count);
	free(s->last);
}

static void lfu_begin(struct policy *p, uint64_t token, uint32_t layer)
{
	struct lfu *s = p->priv;
	(void)token;
	(void)layer;
	if (p->cfg.decay_period == 0 || p->cfg.decay <= 0.0 || p->cfg.decay >= 1.0)
		return;
	/* Per-layer groups see one access in n_layers, so decay on the group's
	 * own clock: every decay_period accesses of a group. */
	uint64_t period = (uint64_t)p->cfg.decay_period * (p->cfg.per_layer ? p->cfg.n_layers : 1);
	if (++s->since_decay >= period) {
		s->since_decay = 0;
		for (uint32_t i = 0; i < p->n_ids; i++)
			s->count[i] *= p->cfg.decay;
	}
}

static void lfu_hit(struct policy *p, uint32_t id)
{
	struct lfu *s = p->priv;
	struct plist *l = &s->list[policy_group_of(p, id)];
	s->count[id] += 1.0;
	s->last[id] = p->clock;
	plist_unlink(l, s->node, id);
	plist_push_head(l, s->node, id);
}

static void lfu_insert(struct policy *p, uint32_t id, unsigned flags)
{
	struct lfu *s = p->priv;
	if (!(flags & POLICY_F_PREFETCH))
		s->count[id] += 1.0;
	s->last[id] = p->clock;
	plist_push_head(&s->list[policy_group_of(p, id)], s->node, id);
}

static void lfu_remove(struct policy *p, uint32_t id)
{
	struct lfu *s = p->priv;
	plist_unlink(&s->list[policy_group_of(p, id)], s->node, id);
}

static uint32_t lfu_victim(struct policy *p, uint32_t group, policy_filter_fn filter, void *ctx)
{
	struct lfu *s = p->priv;
	const struct plist *l = &s->list[group];
	uint32_t best = POLICY_NONE;
	double best_v = 0, maxc = 1e-9;

	if (s->lfru)
		for (uint32_t id = l->tail; id != POLICY_NONE; id = s->node[id].prev)
			if (s->count[id] > maxc)
				maxc = s->count[id];
	/* Walk oldest first, so the least recent wins ties. */
	for (uint32_t id = l->tail; id != POLICY_NONE; id = s->node[id].prev) {
		double v = s->count[id];
		if (s->lfru) {
			double age = (double)(p->clock - s->last[id]);
			v = (1.0 - p->cfg.lfru_recency) * v / maxc + p->cfg.lfru_recency / (1.0 + age);
		}
		if ((best == POLICY_NONE || v < best_v) && (!filter || filter(ctx, id))) {
			best = id;
			best_v = v;
		}
	}
	return best;
}

const struct policy_ops policy_lfu_ops = {
	.name = "lfu",
	.help = "least frequently used, counts decayed periodically",
	.priv_size = sizeof(struct lfu),
	.init = lfu_init,
	.fini = lfu_fini,
	.begin = lfu_begin,
	.hit = lfu_hit,
	.insert = lfu_insert,
	.remove = lfu_remove,
	.victim = lfu_victim,
};

const struct policy_ops policy_lfru_ops = {
	.name = "lfru",
	.help = "mix of decayed frequency and recency",
	.priv_size = sizeof(struct lfu),
	.init = lfru_init,
	.fini = lfu_fini,
	.begin = lfu_begin,
	.hit = lfu_hit,
	.insert = lfu_insert,
	.remove = lfu_remove,
	.victim = lfu_victim,
};
