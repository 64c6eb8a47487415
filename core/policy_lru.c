/* policy_lru.c - least recently used: one recency list per group; the victim
 * is the oldest evictable entry. Hits and inserts move an entry to the front. */
#include "config.h"

#include <stdlib.h>

#include "policy_impl.h"

struct lru {
	struct plink *node; /* [n_ids] */
	struct plist *list; /* [n_groups] */
};

static int lru_init(struct policy *p, struct moe_error *err)
{
	struct lru *s = p->priv;
	s->node = calloc(p->n_ids, sizeof(*s->node));
	s->list = calloc(p->n_groups, sizeof(*s->list));
	if (!s->node || !s->list) {
		free(s->node);
		free(s->list);
		return moe_error_set(err, -ENOMEM, "lru: out of memory");
	}
	for (uint32_t g = 0; g < p->n_groups; g++)
		plist_init(&s->list[g]);
	return 0;
}

static void lru_fini(struct policy *p)
{
	struct lru *s = p->priv;
	free(s->node);
	free(s->list);
}

static void lru_hit(struct policy *p, uint32_t id)
{
	struct lru *s = p->priv;
	struct plist *l = &s->list[policy_group_of(p, id)];
	plist_unlink(l, s->node, id);
	plist_push_head(l, s->node, id);
}

static void lru_insert(struct policy *p, uint32_t id, unsigned flags)
{
	struct lru *s = p->priv;
	(void)flags;
	plist_push_head(&s->list[policy_group_of(p, id)], s->node, id);
}

static void lru_remove(struct policy *p, uint32_t id)
{
	struct lru *s = p->priv;
	plist_unlink(&s->list[policy_group_of(p, id)], s->node, id);
}

static uint32_t lru_victim(struct policy *p, uint32_t group, policy_filter_fn filter, void *ctx)
{
	struct lru *s = p->priv;
	return plist_oldest(&s->list[group], s->node, filter, ctx);
}

const struct policy_ops policy_lru_ops = {
	.name = "lru",
	.help = "least recently used",
	.priv_size = sizeof(struct lru),
	.init = lru_init,
	.fini = lru_fini,
	.hit = lru_hit,
	.insert = lru_insert,
	.remove = lru_remove,
	.victim = lru_victim,
};
