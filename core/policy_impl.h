/* policy_impl.h - private helpers for the policy_*.c files: intrusive
 * doubly-linked lists over dense ids (an id is in at most one list of a node
 * array at a time), so list moves are O(1) and never allocate. */
#ifndef MOETIER_POLICY_IMPL_H
#define MOETIER_POLICY_IMPL_H

#include "policy.h"

struct plink {
	uint32_t prev, next;
};

/* head = most recent end, tail = oldest end. */
struct plist {
	uint32_t head, tail, len;
};

static inline void plist_init(struct plist *l)
{
	l->head = l->tail = POLICY_NONE;
	l->len = 0;
}

static inline void plist_push_head(struct plist *l, struct plink *n, uint32_t id)
{
	n[id].prev = POLICY_NONE;
	n[id].next = l->head;
	if (l->head != POLICY_NONE)
		n[l->head].prev = id;
	else
		l->tail = id;
	l->head = id;
	l->len++;
}

static inline void plist_unlink(struct plist *l, struct plink *n, uint32_t id)
{
	uint32_t p = n[id].prev, q = n[id].next;
	if (p != POLICY_NONE)
		n[p].next = q;
	else
		l->head = q;
	if (q != POLICY_NONE)
		n[q].prev = p;
	else
		l->tail = p;
	n[id].prev = n[id].next = POLICY_NONE;
	l->len--;
}

/* The oldest entry of l accepted by filter, walking toward the head. */
static inline uint32_t plist_oldest(const struct plist *l, const struct plink *n,
				    policy_filter_fn filter, void *ctx)
{
	for (uint32_t id = l->tail; id != POLICY_NONE; id = n[id].prev)
		if (!filter || filter(ctx, id))
			return id;
	return POLICY_NONE;
}

#endif
