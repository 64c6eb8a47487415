/* policy_leaststale.c - Least-Stale (SpecMD): entries not used by the current
 * forward pass (token) are evicted before entries the current pass used;
 * within each class the order is FIFO (insertion order; hits do not reorder). */
#include "config.h"

#include <stdlib.h>

#include "policy_impl.h"

struct lstale {
	struct plink *node;
	struct plist *list; /* insertion order per group */
	uint64_t *pass;     /* [n_ids] token of last use */
};

static int ls_init(struct policy *p, struct moe_error *err)
{
	struct lstale *s = p->priv;
	s->node = calloc(p->n_ids, sizeof(*s->node));
	s->list = calloc(p->n_groups, sizeof(*s->list));
	s->pass = calloc(p->n_ids, sizeof(*s->pass));
	if (!s->node || !s->list || !s->pass) {
		free(s->node);
		free(s->list);
		free(s->pass);
		return moe_error_set(err, -ENOMEM, "leaststale: out of memory");
	}
	for (uint32_t g = 0; g < p->n_groups; g++)
		plist_init(&s->list[g]);
	return 0;
}

static void ls_fini(struct policy *p)
{
	struct lstale *s = p->priv;
	free(s->node);
	free(s->list);
	free(s->pass);
}

static void ls_hit(struct policy *p, uint32_t id)
{
	struct lstale *s = p->priv;
	s->pass[id] = p->token + 1; /* +1: token 0 must differ from "never used" */
}

static void ls_insert(struct policy *p, uint32_t id, unsigned flags)
{
	struct lstale *s = p->priv;
	/* A prefetched entry belongs to no pass until it is used. */
	s->pass[id] = (flags & POLICY_F_PREFETCH) ? 0 : p->token + 1;
	plist_push_head(&s->list[policy_group_of(p, id)], s->node, id);
}

static void ls_remove(struct policy *p, uint32_t id)
{
	struct lstale *s = p->priv;
	plist_unlink(&s->list[policy_group_of(p, id)], s->node, id);
}

static uint32_t ls_victim(struct policy *p, uint32_t group, policy_filter_fn filter, void *ctx)
{
	struct lstale *s = p->priv;
	const struct plist *l = &s->list[group];
	uint32_t fallback = POLICY_NONE;

	for (uint32_t id = l->tail; id != POLICY_NONE; id = s->node[id].prev) {
		if (filter && !filter(ctx, id))
			continue;
		if (s->pass[id] != p->token + 1)
			return id;
		if (fallback == POLICY_NONE)
			fallback = id;
	}
	return fallback;
}

const struct policy_ops policy_leaststale_ops = {
	.name = "leaststale",
	.help = "Least-Stale: experts of earlier tokens first, FIFO within each class",
	.priv_size = sizeof(struct lstale),
	.init = ls_init,
	.fini = ls_fini,
	.hit = ls_hit,
	.insert = ls_insert,
	.remove = ls_remove,
	.victim = ls_victim,
};
