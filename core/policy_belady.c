/* policy_belady.c - Belady's MIN, the offline bound (moe-sim only): evict the
 * evictable entry whose next use is farthest in the future, as told by the
 * next_use oracle (the simulator knows the whole trace). Ties go to the least
 * recently inserted. */
#include "config.h"

#include <stdlib.h>

#include "policy_impl.h"

struct belady {
	struct plink *node;
	struct plist *list;
};

static int bel_init(struct policy *p, struct moe_error *err)
{
	struct belady *s = p->priv;
	if (!p->cfg.next_use)
		return moe_error_set(err, -EINVAL, "belady needs future knowledge (offline simulation only)");
	s->node = calloc(p->n_ids, sizeof(*s->node));
	s->list = calloc(p->n_groups, sizeof(*s->list));
	if (!s->node || !s->list) {
		free(s->node);
		free(s->list);
		return moe_error_set(err, -ENOMEM, "belady: out of memory");
	}
	for (uint32_t g = 0; g < p->n_groups; g++)
		plist_init(&s->list[g]);
	return 0;
}

static void bel_fini(struct policy *p)
{
	struct belady *s = p->priv;
	free(s->node);
	free(s->list);
}

static void bel_hit(struct policy *p, uint32_t id)
{
	(void)p;
	(void)id;
}

static void bel_insert(struct policy *p, uint32_t id, unsigned flags)
{
	struct belady *s = p->priv;
	(void)flags;
	plist_push_head(&s->list[policy_group_of(p, id)], s->node, id);
}

static void bel_remove(struct policy *p, uint32_t id)
{
	struct belady *s = p->priv;
	plist_unlink(&s->list[policy_group_of(p, id)], s->node, id);
}

static uint32_t bel_victim(struct policy *p, uint32_t group, policy_filter_fn filter, void *ctx)
{
	struct belady *s = p->priv;
	uint32_t best = POLICY_NONE;
	uint64_t far = 0;

	for (uint32_t id = s->list[group].tail; id != POLICY_NONE; id = s->node[id].prev) {
		if (filter && !filter(ctx, id))
			continue;
		uint64_t t = p->cfg.next_use(p->cfg.next_use_ctx, id, p->clock);
		if (best == POLICY_NONE || t > far) {
			best = id;
			far = t;
		}
	}
	return best;
}

const struct policy_ops policy_belady_ops = {
	.name = "belady",
	.help = "offline optimum (farthest next use); needs the whole trace",
	.priv_size = sizeof(struct belady),
	.init = bel_init,
	.fini = bel_fini,
	.hit = bel_hit,
	.insert = bel_insert,
	.remove = bel_remove,
	.victim = bel_victim,
};
