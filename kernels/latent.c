/* latent.c - MoLAE latent experts on the CPU: see latent.h. */
#include "config.h"
#include "latent.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LATENT_MAX_GROUPS 1024u

/* ---- layout --------------------------------------------------------------- */

bool latent_parts_present(const struct pack_part_desc *parts, uint32_t n_parts)
{
	return parts && (ffn_layout_find_part(parts, n_parts, PACK_ROLE_LATENT_A_GATE) ||
			 ffn_layout_find_part(parts, n_parts, PACK_ROLE_LATENT_A_UP));
}

int latent_layout_init(struct latent_layout *L, const struct moe_model_config *cfg,
		       const struct pack_part_desc *parts, uint32_t n_parts, uint64_t extent_bytes,
		       struct moe_error *err)
{
	int rc;

	if (!L || !cfg || (!parts && n_parts))
		return moe_error_set(err, -EINVAL, "latent layout: missing argument");
	memset(L, 0, sizeof(*L));
	const uint32_t n = cfg->hidden, m = cfg->expert_width;
	if (!n || !m || n > (1u << 20) || m > (1u << 20))
		return moe_error_set(err, -EINVAL, "latent layout: hidden %u / expert width %u out of range", n, m);
	if (cfg->ffn_kind != MOE_FFN_SWIGLU)
		return moe_error_set(err, -EINVAL, "latent layout: FFN kind %u is not SwiGLU", cfg->ffn_kind);
	const struct pack_part_desc *ag = ffn_layout_find_part(parts, n_parts, PACK_ROLE_LATENT_A_GATE);
	if (!ag)
		return moe_error_set(err, -EINVAL, "latent expert layout has no latent A_gate part");
	const uint32_t r = ag->cols;
	if (!r || r > n)
		return moe_error_set(err, -EINVAL, "latent layout: rank %u is not in [1, hidden %u]", r, n);
	L->n = n;
	L->m = m;
	L->r = r;
	if ((rc = ffn_layout_take_mat(&L->a_gate, ag, "A_gate", m, r, extent_bytes, err)) ||
	    (rc = ffn_layout_take_mat(&L->a_up, ffn_layout_find_part(parts, n_parts, PACK_ROLE_LATENT_A_UP), "A_up", m,
				      r, extent_bytes, err)) ||
	    (rc = ffn_layout_take_mat(&L->down, ffn_layout_find_part(parts, n_parts, PACK_ROLE_DOWN), "down", n, m,
				      extent_bytes, err)))
		return rc;
	L->weight_bytes = L->a_gate.row_bytes * m + L->a_up.row_bytes * m + L->down.row_bytes * n;
	L->payload = MOE_MAX(MOE_MAX(L->a_gate.offset + L->a_gate.row_bytes * m, L->a_up.offset + L->a_up.row_bytes * m),
			     L->down.offset + L->down.row_bytes * n);
	return 0;
}

uint64_t latent_layout_flops_per_token(const struct latent_layout *L)
{
	return 2ull * ((uint64_t)2 * L->m * L->r + (uint64_t)L->m * L->n);
}

uint64_t latent_layout_flops_z(const struct latent_layout *L)
{
	return 2ull * 2 * (uint64_t)L->r * L->n;
}

/* ---- the resident basis ---------------------------------------------------- */

void latent_basis_free(struct latent_basis *b)
{
	if (!b)
		return;
	free(b->n_groups);
	free(b->group_of);
	free(b->b);
	free(b);
}

static int basis_new(uint32_t n, uint32_t r, uint32_t n_layers, uint32_t n_experts, uint32_t max_groups,
		     struct latent_basis **out)
{
	size_t nb;
	*out = NULL;
	if (!n || !r || !n_layers || !n_experts || !max_groups || max_groups > LATENT_MAX_GROUPS ||
	    __builtin_mul_overflow((size_t)n_layers * max_groups * 2, (size_t)r * n, &nb) || nb > (1ull << 36))
		return -EINVAL;
	struct latent_basis *b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	*b = (struct latent_basis){ .n = n, .r = r, .n_layers = n_layers, .n_experts = n_experts,
				    .max_groups = max_groups };
	b->n_groups = calloc(n_layers, sizeof(*b->n_groups));
	b->group_of = malloc(sizeof(*b->group_of) * (size_t)n_layers * n_experts);
	b->b = calloc(nb, sizeof(float));
	if (!b->n_groups || !b->group_of || !b->b) {
		latent_basis_free(b);
		return -ENOMEM;
	}
	for (size_t i = 0; i < (size_t)n_layers * n_experts; i++)
		b->group_of[i] = -1;
	*out = b;
	return 0;
}

int latent_basis_alloc(uint32_t n, uint32_t r, uint32_t n_layers, uint32_t n_experts, uint32_t group_size,
		       struct latent_basis **out)
{
	if (!out || !group_size || !n_experts || n_experts % group_size)
		return -EINVAL;
	int rc = basis_new(n, r, n_layers, n_experts, n_experts / group_size, out);
	if (rc)
		return rc;
	struct latent_basis *b = *out;
	for (uint32_t l = 0; l < n_layers; l++) {
		b->n_groups[l] = n_experts / group_size;
		for (uint32_t e = 0; e < n_experts; e++)
			b->group_of[(size_t)l * n_experts + e] = (int32_t)(e / group_size);
	}
	b->bytes = (uint64_t)n_layers * b->max_groups * 2 * r * n * sizeof(float);
	return 0;
}

/* "blk.L.molae_b_gate.G" / "blk.L.molae_b_up.G" -> up (0/1) and G; else -1. */
static int parse_b_name(const char *name, uint32_t layer, uint32_t *group)
{
	char want[64];
	for (int up = 0; up < 2; up++) {
		int len = snprintf(want, sizeof(want), "blk.%u.molae_b_%s.", layer, up ? "up" : "gate");
		if (!strncmp(name, want, (size_t)len)) {
			char *end;
			unsigned long g = strtoul(name + len, &end, 10);
			if (end == name + len || *end || g >= LATENT_MAX_GROUPS)
				return -1;
			*group = (uint32_t)g;
			return up;
		}
	}
	return -1;
}

int latent_basis_load(const struct pack_file *p, struct latent_basis **out, struct moe_error *err)
{
	struct latent_basis *b = NULL;
	int rc;

	if (!p || !out)
		return moe_error_set(err, -EINVAL, "latent basis: missing argument");
	*out = NULL;
	const struct moe_model_config *mc = p->model;
	const struct pack_part_desc *ag = pack_part(p, PACK_ROLE_LATENT_A_GATE);
	if (!ag)
		return moe_error_set(err, -EINVAL, "%s: not a MoLAE latent pack (no latent A_gate part)", p->path);
	const uint32_t n = mc->hidden, r = ag->cols, L = mc->n_moe_layers, E = mc->n_experts;
	/* Pass 1: groups of every layer, hence the group count. */
	uint32_t max_g = 0;
	int32_t *all = malloc(sizeof(int32_t) * ((size_t)L * E + 1));
	if (!all)
		return moe_error_set(err, -ENOMEM, "latent basis: out of memory");
	for (uint32_t l = 0; l < L; l++) {
		const uint32_t layer = moe_model_layer_of(mc, l);
		const struct pack_tensor_entry *t = pack_find_role(p, PACK_ROLE_LATENT_GROUPS, layer);
		if (!t || t->dtype != MOE_DTYPE_I32 || t->bytes != (uint64_t)E * sizeof(int32_t)) {
			rc = moe_error_set(err, -EINVAL, "%s: layer %u has no I32 [%u] blk.%u.molae_groups", p->path, l, E,
					   layer);
			goto fail;
		}
		if ((rc = pack_read_tensor(p, t, all + (size_t)l * E, err)))
			goto fail;
		for (uint32_t e = 0; e < E; e++) {
			int32_t g = all[(size_t)l * E + e];
			if (g < 0 || g >= (int32_t)MOE_MIN(E, LATENT_MAX_GROUPS)) {
				rc = moe_error_set(err, -EINVAL, "%s: layer %u expert %u has group %d (of at most %u)",
						   p->path, l, e, g, E);
				goto fail;
			}
			max_g = MOE_MAX(max_g, (uint32_t)g + 1);
		}
	}
	if ((rc = basis_new(n, r, L, E, max_g ? max_g : 1, &b))) {
		rc = moe_error_set(err, rc, "%s: latent basis of %u layers x %u groups x [%u x %u] %s", p->path, L, max_g,
				   r, n, rc == -ENOMEM ? "does not fit in memory" : "is out of range");
		goto fail;
	}
	memcpy(b->group_of, all, sizeof(int32_t) * (size_t)L * E);
	/* Pass 2: every B of every layer; each used group needs both. */
	for (uint32_t l = 0; l < L; l++) {
		const uint32_t layer = moe_model_layer_of(mc, l);
		uint8_t have[LATENT_MAX_GROUPS][2];
		memset(have, 0, sizeof(have));
		for (uint64_t i = 0; i < p->hdr->n_tensors; i++) {
			const struct pack_tensor_entry *t = &p->tensors[i];
			uint32_t g;
			int up;
			if ((t->role != PACK_ROLE_LATENT_B_GATE && t->role != PACK_ROLE_LATENT_B_UP) || t->layer != layer ||
			    (up = parse_b_name(t->name, layer, &g)) < 0)
				continue;
			if (up != (t->role == PACK_ROLE_LATENT_B_UP) || g >= max_g) {
				rc = moe_error_set(err, -EINVAL, "%s: tensor %s: role %s or group %u does not fit (%u groups)",
						   p->path, t->name, pack_role_name(t->role), g, max_g);
				goto fail;
			}
			if (t->dtype != MOE_DTYPE_F32 || t->n_dims != 2 || t->shape[0] != r || t->shape[1] != n ||
			    t->bytes != (uint64_t)r * n * sizeof(float)) {
				rc = moe_error_set(err, -EINVAL, "%s: tensor %s is not f32 [%u x %u] (rank x hidden)", p->path,
						   t->name, r, n);
				goto fail;
			}
			if (have[g][up]++) {
				rc = moe_error_set(err, -EINVAL, "%s: tensor %s appears twice", p->path, t->name);
				goto fail;
			}
			if ((rc = pack_read_tensor(p, t, latent_basis_b(b, l, g, up), err)))
				goto fail;
			b->bytes += t->bytes;
		}
		for (uint32_t e = 0; e < E; e++) {
			const int32_t g = all[(size_t)l * E + e];
			if (!have[g][0] || !have[g][1]) {
				rc = moe_error_set(err, -EINVAL, "%s: layer %u group %d (expert %u) lacks its B_%s", p->path,
						   l, g, e, have[g][0] ? "up" : "gate");
				goto fail;
			}
			b->n_groups[l] = MOE_MAX(b->n_groups[l], (uint32_t)g + 1);
		}
	}
	free(all);
	*out = b;
	return 0;
fail:
	free(all);
	latent_basis_free(b);
	return rc;
}

/* ---- the expert ----------------------------------------------------------- */

int latent_project(const struct latent_basis *b, uint32_t layer, uint32_t group, const float *x, size_t ldx,
		   uint32_t T, float *z, size_t ldz, int threads)
{
	if (!b || !x || !z || layer >= b->n_layers || group >= b->max_groups || ldz < 2 * (size_t)b->r ||
	    ldx < b->n)
		return -EINVAL;
	int rc = ffn_matmul(MOE_DTYPE_F32, latent_basis_b(b, layer, group, 0), b->r, b->n, x, ldx, T, z, ldz, threads);
	if (!rc)
		rc = ffn_matmul(MOE_DTYPE_F32, latent_basis_b(b, layer, group, 1), b->r, b->n, x, ldx, T, z + b->r, ldz,
				threads);
	return rc;
}

static inline float sigmoidf_(float v)
{
	return 1.0f / (1.0f + expf(-v));
}

int latent_expert(const struct latent_layout *L, const void *extent, const float *z, size_t ldz, uint32_t B,
		  float *y, size_t ldy, const float *scale, unsigned flags, int threads)
{
	const bool acc = flags & FFN_ACCUMULATE;

	if (!L || !L->n || !L->r || !extent || !z || !y || ldz < 2 * (size_t)L->r || ldy < L->n ||
	    (flags & ~FFN_ACCUMULATE))
		return -EINVAL;
	if (!B)
		return 0;
	const uint32_t n = L->n, m = L->m, r = L->r;
	const uint8_t *ext = extent;
	/* g, u, h [B x m], then the output when accumulating [B x n] */
	float *buf = malloc(sizeof(float) * ((size_t)B * m * 3 + (acc ? (size_t)B * n : 0)));
	if (!buf)
		return -ENOMEM;
	float *g = buf, *u = g + (size_t)B * m, *h = u + (size_t)B * m;
	float *out = acc ? h + (size_t)B * m : y;
	const size_t ldo = acc ? n : ldy;
	int rc;
	if ((rc = ffn_matmul(L->a_gate.dtype, ext + L->a_gate.offset, m, r, z, ldz, B, g, m, threads)) ||
	    (rc = ffn_matmul(L->a_up.dtype, ext + L->a_up.offset, m, r, z + r, ldz, B, u, m, threads)))
		goto out;
	/* the activation exactly as ffn.c's SwiGLU */
	for (size_t i = 0; i < (size_t)B * m; i++)
		h[i] = g[i] * sigmoidf_(g[i]) * u[i];
	if ((rc = ffn_matmul(L->down.dtype, ext + L->down.offset, n, m, h, m, B, out, ldo, threads)))
		goto out;
	if (acc)
		for (uint32_t t = 0; t < B; t++)
			ffn_axpy(y + (size_t)t * ldy, scale ? scale[t] : 1.0f, out + (size_t)t * n, n);
out:
	free(buf);
	return rc;
}

int latent_expert_x(const struct latent_layout *L, const struct latent_basis *b, uint32_t layer, uint32_t expert,
		    const void *extent, const float *x, size_t ldx, uint32_t B, float *y, size_t ldy, int threads)
{
	if (!L || !b || layer >= b->n_layers || expert >= b->n_experts || b->r != L->r || b->n != L->n)
		return -EINVAL;
	const int32_t g = latent_basis_group(b, layer, expert);
	if (g < 0)
		return -EINVAL;
	if (!B)
		return 0;
	float *z = malloc(sizeof(float) * (size_t)B * 2 * L->r);
	if (!z)
		return -ENOMEM;
	int rc = latent_project(b, layer, (uint32_t)g, x, ldx, B, z, 2 * (size_t)L->r, threads);
	if (!rc)
		rc = latent_expert(L, extent, z, 2 * (size_t)L->r, B, y, ldy, NULL, 0, threads);
	free(z);
	return rc;
}

/* ---- z once per (token, group) --------------------------------------------- */

void latent_zcache_free(struct latent_zcache *zc)
{
	if (!zc)
		return;
	free(zc->row);
	free(zc->z);
	memset(zc, 0, sizeof(*zc));
}

static int grow(void **p, size_t *cap, size_t want, size_t elem)
{
	if (want <= *cap)
		return 0;
	size_t c = MOE_MAX(want, *cap * 2);
	void *q = realloc(*p, c * elem);
	if (!q)
		return -ENOMEM;
	*p = q;
	*cap = c;
	return 0;
}

int latent_zcache_fill(struct latent_zcache *zc, const struct latent_basis *b, uint32_t layer, const float *x,
		       size_t ldx, uint32_t T, uint32_t k, const uint32_t *experts, int threads)
{
	int rc;

	if (!zc || !b || !x || (T && k && !experts) || layer >= b->n_layers || ldx < b->n)
		return -EINVAL;
	const uint32_t G = b->max_groups, r = b->r, E = b->n_experts;
	size_t cells;
	if (__builtin_mul_overflow((size_t)G, (size_t)T, &cells) || cells > INT32_MAX)
		return -EINVAL;
	if ((rc = grow((void **)&zc->row, &zc->cap_row, cells + 1, sizeof(*zc->row))))
		return rc;
	zc->T = T;
	zc->G = G;
	zc->r = r;
	zc->rows = 0;
	for (size_t i = 0; i < cells; i++)
		zc->row[i] = -1;
	/* mark, then number the (group, token) cells group by group, tokens in
	 * order: each group's tokens are consecutive rows of z */
	uint32_t rows = 0;
	for (uint32_t t = 0; t < T; t++)
		for (uint32_t j = 0; j < k; j++) {
			const uint32_t e = experts[(size_t)t * k + j];
			if (e >= E)
				continue;
			const int32_t g = latent_basis_group(b, layer, e);
			if (g >= 0 && zc->row[(size_t)g * T + t] < 0)
				zc->row[(size_t)g * T + t] = 0;
		}
	for (size_t i = 0; i < cells; i++)
		if (!zc->row[i])
			zc->row[i] = (int32_t)rows++;
	zc->rows = rows;
	if (!rows)
		return 0;
	if ((rc = grow((void **)&zc->z, &zc->cap_z, (size_t)rows * 2 * r, sizeof(float))))
		return rc;
	/* each group's tokens gathered into one batch */
	float *xg = malloc(sizeof(float) * (size_t)T * b->n);
	if (!xg)
		return -ENOMEM;
	for (uint32_t g = 0; g < G && !rc; g++) {
		uint32_t cnt = 0;
		int32_t first = -1;
		for (uint32_t t = 0; t < T; t++) {
			const int32_t i = zc->row[(size_t)g * T + t];
			if (i < 0)
				continue;
			if (first < 0)
				first = i;
			memcpy(xg + (size_t)cnt++ * b->n, x + (size_t)t * ldx, sizeof(float) * b->n);
		}
		if (cnt)
			rc = latent_project(b, layer, g, xg, b->n, cnt, zc->z + (size_t)first * 2 * r, 2 * (size_t)r,
					    threads);
	}
	free(xg);
	if (!rc)
		zc->z_rows_total += rows;
	return rc;
}

int latent_expert_tokens(const struct latent_layout *L, const struct latent_basis *b,
			 const struct latent_zcache *zc, uint32_t layer, uint32_t expert, const void *extent,
			 const uint32_t *tok, uint32_t cnt, float *out, size_t ldo, int threads)
{
	if (!L || !b || !zc || !extent || (cnt && (!tok || !out)) || layer >= b->n_layers || expert >= b->n_experts ||
	    zc->r != L->r || b->r != L->r)
		return -EINVAL;
	if (!cnt)
		return 0;
	const int32_t g = latent_basis_group(b, layer, expert);
	const size_t w = 2 * (size_t)L->r;
	float *zg = malloc(sizeof(float) * cnt * w);
	if (!zg)
		return -ENOMEM;
	for (uint32_t i = 0; i < cnt; i++) {
		const float *zr = g < 0 ? NULL : latent_zcache_row(zc, (uint32_t)g, tok[i]);
		if (!zr) {
			free(zg);
			return -EINVAL;
		}
		memcpy(zg + i * w, zr, sizeof(float) * w);
	}
	int rc = latent_expert(L, extent, zg, w, cnt, out, ldo, NULL, 0, threads);
	free(zg);
	return rc;
}

/* ---- CUDA ------------------------------------------------------------------ */

#include "latent_cuda.h"

#ifdef HAVE_NVCC
extern const unsigned char moe_latent_fatbin_start[];
extern const unsigned char moe_latent_fatbin_end[];
#endif

const void *latent_cuda_fatbin(size_t *len)
{
#ifdef HAVE_NVCC
	if (len)
		*len = (size_t)(moe_latent_fatbin_end - moe_latent_fatbin_start);
	return moe_latent_fatbin_start;
#else
	if (len)
		*len = 0;
	return NULL;
#endif
}

static int cuda_mat_ok(const struct ffn_mat *M, const char *what, struct moe_error *err)
{
	if (!ffn_cuda_dtype_supported(M->dtype))
		return moe_error_set(err, -ENOTSUP, "latent CUDA kernels: %s dtype %s has no device decoder", what,
				     moe_dtype_name(M->dtype));
	return 0;
}

int latent_cuda_layout_check(const struct latent_layout *L, struct moe_error *err)
{
	int rc;
	if ((rc = cuda_mat_ok(&L->a_gate, "A_gate", err)) || (rc = cuda_mat_ok(&L->a_up, "A_up", err)) ||
	    (rc = cuda_mat_ok(&L->down, "down", err)))
		return rc;
	return 0;
}

static struct latent_cuda_mat cmat(const struct ffn_mat *M)
{
	return (struct latent_cuda_mat){ .dtype = M->dtype, .rows = M->rows, .cols = M->cols, .offset = M->offset,
					 .row_bytes = M->row_bytes };
}

static uint32_t cdiv(uint32_t a, uint32_t b)
{
	return (a + b - 1) / b;
}

int latent_cuda_run(const struct latent_layout *L, struct latent_cuda_args *a, latent_cuda_launch_fn launch,
		    void *ctx, struct moe_error *err)
{
	int rc;
	if (!L || !a || !launch)
		return moe_error_set(err, -EINVAL, "latent CUDA: missing argument");
	if ((rc = latent_cuda_layout_check(L, err)))
		return rc;
	if (!a->arena || !a->basis || !a->x || !a->z || !a->h || !a->y || !a->group_slot || !a->group_start ||
	    !a->pair_token || !a->pair_weight || !a->pair_zrow || !a->zrow_token || !a->zrow_group)
		return moe_error_set(err, -EINVAL, "latent CUDA: a device buffer is missing");
	a->n = L->n;
	a->m = L->m;
	a->r = L->r;
	a->a_gate = cmat(&L->a_gate);
	a->a_up = cmat(&L->a_up);
	a->down = cmat(&L->down);
	if (!a->n_groups || !a->n_zrows)
		return 0;
	const uint32_t zg[3] = { cdiv(2 * L->r, LATENT_CUDA_WARPS), a->n_zrows, 1 };
	const uint32_t gu[3] = { cdiv(L->m, LATENT_CUDA_TILE_ROWS), a->n_groups,
				 cdiv(a->max_group_pairs, LATENT_CUDA_TILE_PAIRS) };
	const uint32_t dn[3] = { cdiv(L->n, LATENT_CUDA_TILE_ROWS), a->n_groups,
				 cdiv(a->max_group_pairs, LATENT_CUDA_TILE_PAIRS) };
	if ((rc = launch(ctx, "moe_latent_z", zg, LATENT_CUDA_THREADS, a)) ||
	    (rc = launch(ctx, "moe_latent_gate_up", gu, LATENT_CUDA_THREADS, a)) ||
	    (rc = launch(ctx, "moe_latent_down", dn, LATENT_CUDA_THREADS, a)))
		return moe_error_set(err, rc, "latent CUDA: launch failed (%d)", rc);
	return 0;
}
