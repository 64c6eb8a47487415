/* policy.c - the policy registry and the checks every policy shares. */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "policy.h"

const struct policy_ops *const policy_registry[] = {
	&policy_lru_ops,
	&policy_lfu_ops,
	&policy_lfru_ops,
	&policy_leaststale_ops,
	&policy_arc_ops,
	&policy_belady_ops,
	NULL,
};

const struct policy_ops *policy_find(const char *name)
{
	for (size_t i = 0; name && policy_registry[i]; i++)
		if (strcmp(policy_registry[i]->name, name) == 0)
			return policy_registry[i];
	return NULL;
}

void policy_config_default(struct policy_config *cfg, uint32_t n_layers, uint32_t n_experts,
			   uint32_t capacity, bool per_layer)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->n_layers = n_layers;
	cfg->n_experts = n_experts;
	cfg->capacity = capacity;
	cfg->per_layer = per_layer;
	cfg->decay = 0.5;
	cfg->decay_period = 64;
	cfg->lfru_recency = 0.5;
}

int policy_create(const char *name, const struct policy_config *cfg, struct policy **out,
		  struct moe_error *err)
{
	const struct policy_ops *ops = policy_find(name);
	struct policy *p;
	uint64_t n;
	int rc;

	*out = NULL;
	if (!ops)
		return moe_error_set(err, -EINVAL, "unknown eviction policy '%s'", name ? name : "(null)");
	if (cfg->n_layers == 0 || cfg->n_experts == 0 || !moe_mul_u64(cfg->n_layers, cfg->n_experts, &n) ||
	    n > (1u << 24))
		return moe_error_set(err, -EINVAL, "policy %s: bad shape %u layers x %u experts", name,
				     cfg->n_layers, cfg->n_experts);
	if (cfg->decay < 0.0 || cfg->decay > 1.0 || cfg->lfru_recency < 0.0 || cfg->lfru_recency > 1.0)
		return moe_error_set(err, -EINVAL, "policy %s: decay and lfru_recency must be in [0, 1]", name);
	p = calloc(1, sizeof(*p));
	if (!p)
		return moe_error_set(err, -ENOMEM, "policy %s: out of memory", name);
	p->ops = ops;
	p->cfg = *cfg;
	p->n_ids = (uint32_t)n;
	p->n_groups = cfg->per_layer ? cfg->n_layers : 1;
	p->present = calloc(n, 1);
	p->priv = ops->priv_size ? calloc(1, ops->priv_size) : NULL;
	if (!p->present || (ops->priv_size && !p->priv)) {
		free(p->present);
		free(p->priv);
		free(p);
		return moe_error_set(err, -ENOMEM, "policy %s: out of memory", name);
	}
	rc = ops->init ? ops->init(p, err) : 0;
	if (rc < 0) {
		free(p->present);
		free(p->priv);
		free(p);
		return rc;
	}
	*out = p;
	return 0;
}

void policy_destroy(struct policy *p)
{
	if (!p)
		return;
	if (p->ops->fini)
		p->ops->fini(p);
	free(p->present);
	free(p->priv);
	free(p);
}

void policy_begin(struct policy *p, uint64_t token, uint32_t layer)
{
	p->token = token;
	p->layer = layer;
	p->clock++;
	if (p->ops->begin)
		p->ops->begin(p, token, layer);
}

void policy_hit(struct policy *p, uint32_t id)
{
	if (id < p->n_ids && p->present[id])
		p->ops->hit(p, id);
}

void policy_insert(struct policy *p, uint32_t id, unsigned flags)
{
	if (id >= p->n_ids)
		return;
	if (p->present[id]) {
		p->ops->hit(p, id);
		return;
	}
	p->present[id] = 1;
	p->ops->insert(p, id, flags);
}

void policy_remove(struct policy *p, uint32_t id)
{
	if (id >= p->n_ids || !p->present[id])
		return;
	p->ops->remove(p, id);
	p->present[id] = 0;
}

uint32_t policy_victim(struct policy *p, uint32_t group, policy_filter_fn filter, void *ctx)
{
	if (!p->cfg.per_layer)
		group = 0;
	else if (group >= p->n_groups)
		return POLICY_NONE;
	return p->ops->victim(p, group, filter, ctx);
}
