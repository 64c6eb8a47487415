/* policy_arc.c - adaptive replacement (ARC, Megiddo & Modha) per group: T1
 * holds entries used once, T2 entries used again; ghost lists B1/B2 remember
 * recent victims of each, and a hit on a ghost moves the target size p of T1
 * toward the list that would have kept it. Victims come from T1 while it is
 * above p, else from T2 (the other list when none there is evictable). */
#include "config.h"

#include <stdlib.h>

#include "policy_impl.h"

enum { NONE = 0, T1, T2, B1, B2, NLISTS };

struct arc {
	struct plink *node;
	uint8_t *where;      /* [n_ids] which list */
	struct plist *lists; /* [n_groups][NLISTS] */
	double *target;      /* [n_groups] p */
};

static struct plist *lst(struct arc *s, uint32_t g, int which)
{
	return &s->lists[(size_t)g * NLISTS + which];
}

static int arc_init(struct policy *p, struct moe_error *err)
{
	struct arc *s = p->priv;
	if (p->cfg.capacity == 0)
		return moe_error_set(err, -EINVAL, "arc needs the tier's capacity (slots per group)");
	s->node = calloc(p->n_ids, sizeof(*s->node));
	s->where = calloc(p->n_ids, 1);
	s->lists = calloc((size_t)p->n_groups * NLISTS, sizeof(*s->lists));
	s->target = calloc(p->n_groups, sizeof(*s->target));
	if (!s->node || !s->where || !s->lists || !s->target) {
		free(s->node);
		free(s->where);
		free(s->lists);
		free(s->target);
		return moe_error_set(err, -ENOMEM, "arc: out of memory");
	}
	for (size_t i = 0; i < (size_t)p->n_groups * NLISTS; i++)
		plist_init(&s->lists[i]);
	return 0;
}

static void arc_fini(struct policy *p)
{
	struct arc *s = p->priv;
	free(s->node);
	free(s->where);
	free(s->lists);
	free(s->target);
}

static void move_to(struct arc *s, uint32_t g, uint32_t id, int to)
{
	if (s->where[id] != NONE)
		plist_unlink(lst(s, g, s->where[id]), s->node, id);
	s->where[id] = (uint8_t)to;
	if (to != NONE)
		plist_push_head(lst(s, g, to), s->node, id);
}

static void arc_hit(struct policy *p, uint32_t id)
{
	struct arc *s = p->priv;
	move_to(s, policy_group_of(p, id), id, T2);
}

static void arc_insert(struct policy *p, uint32_t id, unsigned flags)
{
	struct arc *s = p->priv;
	uint32_t g = policy_group_of(p, id);
	double c = p->cfg.capacity;
	struct plist *b1 = lst(s, g, B1), *b2 = lst(s, g, B2);

	(void)flags;
	if (s->where[id] == B1) {
		double d = b1->len ? (double)b2->len / b1->len : 1.0;
		s->target[g] += d < 1.0 ? 1.0 : d;
		if (s->target[g] > c)
			s->target[g] = c;
		move_to(s, g, id, T2);
	} else if (s->where[id] == B2) {
		double d = b2->len ? (double)b1->len / b2->len : 1.0;
		s->target[g] -= d < 1.0 ? 1.0 : d;
		if (s->target[g] < 0)
			s->target[g] = 0;
		move_to(s, g, id, T2);
	} else {
		move_to(s, g, id, T1);
	}
	/* Keep the ghosts bounded by the capacity. */
	while (b1->len > 0 && lst(s, g, T1)->len + b1->len > c)
		move_to(s, g, b1->tail, NONE);
	while (b2->len > 0 && lst(s, g, T1)->len + lst(s, g, T2)->len + b1->len + b2->len > 2 * c)
		move_to(s, g, b2->tail, NONE);
}

static void arc_remove(struct policy *p, uint32_t id)
{
	struct arc *s = p->priv;
	uint32_t g = policy_group_of(p, id);
	move_to(s, g, id, s->where[id] == T1 ? B1 : B2);
	while (lst(s, g, B1)->len > p->cfg.capacity)
		move_to(s, g, lst(s, g, B1)->tail, NONE);
	while (lst(s, g, B2)->len > p->cfg.capacity)
		move_to(s, g, lst(s, g, B2)->tail, NONE);
}

static uint32_t arc_victim(struct policy *p, uint32_t group, policy_filter_fn filter, void *ctx)
{
	struct arc *s = p->priv;
	struct plist *t1 = lst(s, group, T1), *t2 = lst(s, group, T2);
	bool from_t1 = t1->len > 0 && (double)t1->len > s->target[group];
	uint32_t v = plist_oldest(from_t1 ? t1 : t2, s->node, filter, ctx);
	if (v == POLICY_NONE)
		v = plist_oldest(from_t1 ? t2 : t1, s->node, filter, ctx);
	return v;
}

const struct policy_ops policy_arc_ops = {
	.name = "arc",
	.help = "adaptive replacement cache (recency/frequency lists with ghosts)",
	.priv_size = sizeof(struct arc),
	.init = arc_init,
	.fini = arc_fini,
	.hit = arc_hit,
	.insert = arc_insert,
	.remove = arc_remove,
	.victim = arc_victim,
};
