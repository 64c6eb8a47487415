/* route_ref.h - an independent reference of core/route.c's exact routing
 * for tests/test_route.c and tests/test_route_daemon.c: full insertion
 * sorts, double precision, each family's rule written out again from
 * route.h's description (no code shared with route.c). */
#ifndef MOETIER_TESTS_ROUTE_REF_H
#define MOETIER_TESTS_ROUTE_REF_H

#include <math.h>
#include <stdint.h>

#include "route.h"

/* Indices sorted by key descending (ties: lower index first). */
static inline void ref_sort(const double *key, uint32_t n, uint32_t *idx)
{
	for (uint32_t i = 0; i < n; i++)
		idx[i] = i;
	for (uint32_t i = 1; i < n; i++)
		for (uint32_t j = i; j > 0 && (key[idx[j]] > key[idx[j - 1]] ||
					       (key[idx[j]] == key[idx[j - 1]] && idx[j] < idx[j - 1])); j--) {
			uint32_t t = idx[j];
			idx[j] = idx[j - 1];
			idx[j - 1] = t;
		}
}

/* The experts (rank order) and weights of one decision, per family
 * (formats.md section 3). */
static inline void ref_route(const struct route_params *rp, const float *lg, uint32_t *ex, double *w)
{
	uint32_t n = rp->n_experts, k = rp->top_k, idx[ROUTE_MAX_EXPERTS];
	double p[ROUTE_MAX_EXPERTS], key[ROUTE_MAX_EXPERTS], sum = 0;

	if (rp->scoring == MOE_SCORING_TOPK_SOFTMAX) {
		for (uint32_t e = 0; e < n; e++)
			key[e] = lg[e];
		ref_sort(key, n, idx);
		double mx = key[idx[0]];
		for (uint32_t i = 0; i < k; i++) {
			ex[i] = idx[i];
			w[i] = exp(key[idx[i]] - mx);
			sum += w[i];
		}
		for (uint32_t i = 0; i < k; i++)
			w[i] /= sum;
		return;
	}
	if (rp->scoring == MOE_SCORING_SOFTMAX) {
		double mx = -1e30, s = 0;
		for (uint32_t e = 0; e < n; e++)
			mx = fmax(mx, lg[e]);
		for (uint32_t e = 0; e < n; e++)
			s += exp(lg[e] - mx);
		for (uint32_t e = 0; e < n; e++) {
			p[e] = exp(lg[e] - mx) / s;
			key[e] = p[e];
		}
	} else {
		for (uint32_t e = 0; e < n; e++) {
			p[e] = 1.0 / (1.0 + exp(-(double)lg[e]));
			key[e] = p[e] + (rp->score_bias ? rp->score_bias[e] : 0.0);
		}
	}
	if (rp->topk_method == MOE_TOPK_GROUP_LIMITED) {
		uint32_t gs = n / rp->n_group, gidx[ROUTE_MAX_GROUPS];
		double gscore[ROUTE_MAX_GROUPS];
		for (uint32_t g = 0; g < rp->n_group; g++) {
			double sub[ROUTE_MAX_EXPERTS];
			uint32_t si[ROUTE_MAX_EXPERTS];
			for (uint32_t i = 0; i < gs; i++)
				sub[i] = rp->scoring == MOE_SCORING_SIGMOID ? key[g * gs + i] : p[g * gs + i];
			ref_sort(sub, gs, si);
			gscore[g] = rp->scoring == MOE_SCORING_SIGMOID ? sub[si[0]] + sub[si[1]] : sub[si[0]];
		}
		ref_sort(gscore, rp->n_group, gidx);
		for (uint32_t r = rp->topk_group; r < rp->n_group; r++)
			for (uint32_t i = 0; i < gs; i++)
				key[gidx[r] * gs + i] = -1e30;
	}
	ref_sort(key, n, idx);
	for (uint32_t i = 0; i < k; i++) {
		ex[i] = idx[i];
		w[i] = p[idx[i]];
		sum += w[i];
	}
	/* llama.cpp's build_moe_ffn: norm_w divides by the sum clamped to 2^-14
	 * at any k, then w_scale multiplies (softmax and sigmoid alike). */
	for (uint32_t i = 0; i < k; i++)
		w[i] = (rp->norm_topk_prob ? w[i] / fmax(sum, 0x1p-14) : w[i]) * rp->routed_scaling_factor;
}

#endif
