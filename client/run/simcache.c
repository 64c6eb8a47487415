/* simcache.c - see simcache.h. */
#include "simcache.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "policy.h"

struct simcache {
	uint32_t L, E, cap;
	struct policy *pol;
	uint8_t *res;      /* [L][E] resident */
	uint8_t *pf;       /* [L][E] prefetched, not yet accessed */
	uint32_t *occ;     /* [L] */
	uint8_t *keep;     /* [E] experts of the current call (not victims) */
	uint32_t layer;    /* the current call's layer */
	struct simcache_stats st;
};

int simcache_create(uint32_t n_layers, uint32_t n_experts, uint32_t cap, const char *policy, struct simcache **out,
		    struct moe_error *err)
{
	struct simcache *c;
	struct policy_config pc;
	int rc;
	*out = NULL;
	if (!n_layers || !n_experts || !cap || cap > n_experts)
		return moe_error_set(err, -EINVAL, "simulated cache: %u slots per layer for %u experts", cap, n_experts);
	if (!strcmp(policy, "belady"))
		return moe_error_set(err, -EINVAL, "simulated cache: belady needs the future (use moe-sim on a dump)");
	if (!(c = calloc(1, sizeof(*c))))
		return moe_error_set(err, -ENOMEM, "out of memory");
	c->L = n_layers;
	c->E = n_experts;
	c->cap = cap;
	c->res = calloc((size_t)n_layers * n_experts, 1);
	c->pf = calloc((size_t)n_layers * n_experts, 1);
	c->occ = calloc(n_layers, sizeof(uint32_t));
	c->keep = calloc(n_experts, 1);
	if (!c->res || !c->pf || !c->occ || !c->keep) {
		simcache_free(c);
		return moe_error_set(err, -ENOMEM, "out of memory");
	}
	policy_config_default(&pc, n_layers, n_experts, cap, true);
	if ((rc = policy_create(policy, &pc, &c->pol, err))) {
		simcache_free(c);
		return rc;
	}
	*out = c;
	return 0;
}

void simcache_free(struct simcache *c)
{
	if (!c)
		return;
	policy_destroy(c->pol);
	free(c->res);
	free(c->pf);
	free(c->occ);
	free(c->keep);
	free(c);
}

bool simcache_resident(const struct simcache *c, uint32_t layer, uint32_t expert)
{
	return layer < c->L && expert < c->E && c->res[(size_t)layer * c->E + expert];
}

const uint8_t *simcache_map(const struct simcache *c, uint32_t layer)
{
	return c->res + (size_t)(layer < c->L ? layer : 0) * c->E;
}

static bool victim_ok(void *ctx, uint32_t id)
{
	struct simcache *c = ctx;
	return !(id / c->E == c->layer && c->keep[id % c->E]);
}

/* Makes room for one more expert in layer l (victims outside keep[]). */
static bool make_room(struct simcache *c, uint32_t l)
{
	while (c->occ[l] >= c->cap) {
		uint32_t v = policy_victim(c->pol, l, victim_ok, c);
		if (v == POLICY_NONE)
			return false;
		policy_remove(c->pol, v);
		c->res[v] = c->pf[v] = 0;
		c->occ[l]--;
	}
	return true;
}

uint32_t simcache_access(struct simcache *c, uint64_t token, uint32_t l, const uint32_t *ids, uint32_t n)
{
	uint32_t hits = 0;
	bool hit[64];
	if (l >= c->L || n > 64)
		return 0;
	c->layer = l;
	for (uint32_t i = 0; i < n; i++)
		c->keep[ids[i]] = 1;
	policy_begin(c->pol, token, l);
	/* hits judged against the state at the start of the access, as moe-sim */
	for (uint32_t i = 0; i < n; i++)
		hit[i] = c->res[(size_t)l * c->E + ids[i]];
	for (uint32_t i = 0; i < n; i++) {
		uint32_t id = l * c->E + ids[i];
		c->st.accesses++;
		if (hit[i]) {
			hits++;
			c->st.hits++;
			if (c->pf[id]) {
				c->pf[id] = 0;
				c->st.prefetch_used++;
			}
			policy_hit(c->pol, id);
			continue;
		}
		c->st.misses++;
		if (!make_room(c, l))
			continue; /* cap < n: cannot happen with cap >= top-k */
		c->res[id] = 1;
		policy_insert(c->pol, id, 0);
		c->occ[l]++;
	}
	for (uint32_t i = 0; i < n; i++)
		c->keep[ids[i]] = 0;
	return hits;
}

void simcache_prefetch(struct simcache *c, uint32_t l, const uint32_t *ids, uint32_t n)
{
	if (l >= c->L)
		return;
	c->layer = l;
	for (uint32_t i = 0; i < n; i++)
		if (ids[i] < c->E)
			c->keep[ids[i]] = 1;
	for (uint32_t i = 0; i < n; i++) {
		uint32_t id = l * c->E + ids[i];
		if (ids[i] >= c->E || c->res[id] || !make_room(c, l))
			continue;
		c->res[id] = c->pf[id] = 1;
		policy_insert(c->pol, id, POLICY_F_PREFETCH);
		c->occ[l]++;
		c->st.prefetches++;
	}
	for (uint32_t i = 0; i < n; i++)
		if (ids[i] < c->E)
			c->keep[ids[i]] = 0;
}

void simcache_get_stats(const struct simcache *c, struct simcache_stats *out)
{
	*out = c->st;
}
