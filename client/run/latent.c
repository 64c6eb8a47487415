/* latent.c - see latent.h. */
#include "config.h"
#include "latent.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

bool run_latent_pack(const struct pack_file *p)
{
	return p && latent_parts_present(p->hdr->parts, p->hdr->n_parts);
}

int run_latent_open(const struct pack_file *p, struct run_latent **out, struct moe_error *err)
{
	int rc;
	if (!p || !out)
		return moe_error_set(err, -EINVAL, "latent: missing argument");
	*out = NULL;
	struct run_latent *rl = calloc(1, sizeof(*rl));
	if (!rl)
		return moe_error_set(err, -ENOMEM, "latent: out of memory");
	if ((rc = latent_layout_init(&rl->L, p->model, p->hdr->parts, p->hdr->n_parts, pack_extent_bytes(p), err)) ||
	    (rc = latent_basis_load(p, &rl->basis, err))) {
		free(rl);
		return moe_error_prefix(err, rc, "%s: MoLAE latent experts", p->path);
	}
	if (rl->basis->r != rl->L.r || rl->basis->n != rl->L.n) {
		rc = moe_error_set(err, -EINVAL, "%s: latent B is [%u x %u], the extents need [%u x %u]", p->path,
				   rl->basis->r, rl->basis->n, rl->L.r, rl->L.n);
		run_latent_close(rl);
		return rc;
	}
	*out = rl;
	return 0;
}

void run_latent_close(struct run_latent *rl)
{
	if (!rl)
		return;
	latent_basis_free(rl->basis);
	latent_zcache_free(&rl->zc);
	free(rl->ids);
	free(rl);
}

int run_latent_layer(struct run_latent *rl, uint32_t moe_layer, const float *x, uint32_t B,
		     const struct route_result *routes, int threads, struct moe_error *err)
{
	if (!rl || (B && (!x || !routes)) || moe_layer >= rl->basis->n_layers)
		return moe_error_set(err, -EINVAL, "latent: bad layer call (MoE layer %u)", moe_layer);
	uint32_t k = 0;
	for (uint32_t t = 0; t < B; t++)
		k = MOE_MAX(k, MOE_MIN(routes[t].n, (uint32_t)ROUTE_MAX_K));
	if ((size_t)B * k > (size_t)rl->cap_T * rl->k) {
		free(rl->ids);
		rl->ids = malloc(sizeof(uint32_t) * ((size_t)B * k + 1));
		if (!rl->ids) {
			rl->cap_T = rl->k = 0;
			return moe_error_set(err, -ENOMEM, "latent: out of memory");
		}
		rl->cap_T = B;
		rl->k = k;
	}
	/* [B x k] ids; slots past a token's n are padding (skipped) */
	for (uint32_t t = 0; t < B; t++)
		for (uint32_t j = 0; j < k; j++)
			rl->ids[(size_t)t * k + j] = j < routes[t].n ? routes[t].experts[j] : UINT32_MAX;
	rl->layer = moe_layer;
	int rc = latent_zcache_fill(&rl->zc, rl->basis, moe_layer, x, rl->L.n, B, k, rl->ids, threads);
	if (rc)
		return moe_error_set(err, rc, "latent projections of MoE layer %u: %d", moe_layer, rc);
	return 0;
}

int run_latent_expert(const struct run_latent *rl, uint32_t e, const void *extent, const uint32_t *tok, uint32_t cnt,
		      float *y, size_t ldy, int threads)
{
	if (!rl)
		return -EINVAL;
	return latent_expert_tokens(&rl->L, rl->basis, &rl->zc, rl->layer, e, extent, tok, cnt, y, ldy, threads);
}

uint64_t run_latent_expert_macs(const struct run_latent *rl, uint32_t cnt)
{
	return rl ? (uint64_t)cnt * latent_layout_flops_per_token(&rl->L) / 2 : 0;
}
