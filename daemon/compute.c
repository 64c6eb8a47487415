/* compute.c - the COMPUTE engine (expert FFNs on the host tier for a batch
 * of tokens and their routing) and the move-vs-compute cost model. */
#include "config.h"
#include "compute.h"
#include "moetier/proto.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define COMPUTE_MAX_THREADS 64
#define COMPUTE_MAX_TOKENS (1u << 20)
/* Defaults when not measured: machine.md section 4 (one Zen 5 vCPU). */
#define DEFAULT_HOST_BPS 20e9
#define DEFAULT_HOST_FLOPS 50e9

static const char *const ctr_names[] = {
#define X(name, desc) #name,
	COMPUTE_COUNTERS(X)
#undef X
};
static const char *const ctr_descs[] = {
#define X(name, desc) desc,
	COMPUTE_COUNTERS(X)
#undef X
};

const char *compute_counter_name(enum compute_counter i)
{
	return (unsigned)i < COMPUTE_CTR_COUNT ? ctr_names[i] : "invalid";
}

const char *compute_counter_desc(enum compute_counter i)
{
	return (unsigned)i < COMPUTE_CTR_COUNT ? ctr_descs[i] : "invalid";
}

uint64_t compute_counter_value(const struct compute_counters *c, enum compute_counter i)
{
	switch (i) {
#define X(name, desc) case COMPUTE_CTR_##name: return c->name;
	COMPUTE_COUNTERS(X)
#undef X
	default: return 0;
	}
}

struct compute_ctx {
	struct moe_model_config cfg;
	struct ffn_layout L;
	bool latent;                 /* MoLAE: LL and basis instead of L */
	struct latent_layout LL;
	struct latent_basis *basis;  /* owned */
	uint64_t extent_bytes;
	int threads, kernel_threads;
	pthread_mutex_t model_lock; /* guards model */
	struct compute_model model;
	struct compute_counters ctr; /* updated with atomics */
};

#define CTR_ADD(c, name, v) __atomic_fetch_add(&(c)->ctr.name, (uint64_t)(v), __ATOMIC_RELAXED)

static bool rate_ok(double v)
{
	return v >= 0.0 && isfinite(v);
}

static int create(const struct moe_model_config *cfg, const struct pack_part_desc *parts, uint32_t n_parts,
		  uint64_t extent_bytes, struct latent_basis *basis, const struct compute_opts *opts,
		  struct compute_ctx **out, struct moe_error *err)
{
	static const struct compute_opts defaults = { 0 };
	struct compute_ctx *c;
	int rc;

	if (!out)
		return moe_error_set(err, -EINVAL, "compute: no output pointer");
	*out = NULL;
	if (!opts)
		opts = &defaults;
	if (opts->threads < 0 || opts->threads > COMPUTE_MAX_THREADS || opts->kernel_threads < 0 ||
	    opts->kernel_threads > COMPUTE_MAX_THREADS)
		return moe_error_set(err, -EINVAL, "compute: thread counts must be 0..%d", COMPUTE_MAX_THREADS);
	if (!rate_ok(opts->host_Bps) || !rate_ok(opts->host_flops) || !rate_ok(opts->nvme_to_host_Bps) ||
	    !rate_ok(opts->host_to_gpu_Bps) || !rate_ok(opts->gpu_flops) || !rate_ok(opts->gpu_fixed_s))
		return moe_error_set(err, -EINVAL, "compute: link rates and overheads must be finite and >= 0");
	c = calloc(1, sizeof(*c));
	if (!c)
		return moe_error_set(err, -ENOMEM, "compute: out of memory");
	if (basis) {
		c->latent = true;
		if ((rc = latent_layout_init(&c->LL, cfg, parts, n_parts, extent_bytes, err))) {
			free(c);
			return moe_error_prefix(err, rc, "compute");
		}
		if (basis->n != c->LL.n || basis->r != c->LL.r || basis->n_layers != cfg->n_moe_layers ||
		    basis->n_experts != cfg->n_experts) {
			rc = moe_error_set(err, -EINVAL,
					   "compute: latent basis [%u layers x %u experts, r %u, n %u] does not fit the "
					   "model [%u x %u, r %u, n %u]", basis->n_layers, basis->n_experts, basis->r,
					   basis->n, cfg->n_moe_layers, cfg->n_experts, c->LL.r, c->LL.n);
			free(c);
			return rc;
		}
		c->basis = basis;
		/* the dense layout's sizes, for callers that read n and m */
		c->L.n = c->LL.n;
		c->L.m = c->LL.m;
		c->L.weight_bytes = c->LL.weight_bytes;
		c->L.payload = c->LL.payload;
	} else if (latent_parts_present(parts, n_parts)) {
		free(c);
		return moe_error_set(err, -EINVAL, "compute: a MoLAE latent layout needs its basis (compute_create_latent)");
	} else if ((rc = ffn_layout_init(&c->L, cfg, parts, n_parts, extent_bytes, err))) {
		free(c);
		return moe_error_prefix(err, rc, "compute");
	}
	c->cfg = *cfg;
	c->extent_bytes = extent_bytes;
	c->threads = opts->threads ? opts->threads : 1;
	c->kernel_threads = opts->kernel_threads ? opts->kernel_threads : 1;
	pthread_mutex_init(&c->model_lock, NULL);
	c->model = (struct compute_model){
		.isa = ffn_get_isa(),
		.expert_bytes = c->L.weight_bytes,
		.flops_per_token = c->latent ? latent_layout_flops_per_token(&c->LL) : ffn_layout_flops_per_token(&c->L),
		.host_Bps = opts->host_Bps ? opts->host_Bps : DEFAULT_HOST_BPS,
		.host_flops = opts->host_flops ? opts->host_flops : DEFAULT_HOST_FLOPS,
		.nvme_to_host_Bps = opts->nvme_to_host_Bps,
		.host_to_gpu_Bps = opts->host_to_gpu_Bps,
		.gpu_flops = opts->gpu_flops,
		.gpu_fixed_s = opts->gpu_fixed_s,
	};
	if (opts->calibrate && (rc = compute_calibrate(c, err))) {
		c->basis = NULL; /* the caller's to free on failure */
		compute_destroy(c);
		return rc;
	}
	/* explicit rates win over the measurement */
	if (opts->host_Bps)
		c->model.host_Bps = opts->host_Bps;
	if (opts->host_flops)
		c->model.host_flops = opts->host_flops;
	*out = c;
	return 0;
}

int compute_create(const struct moe_model_config *cfg, const struct pack_part_desc *parts, uint32_t n_parts,
		   uint64_t extent_bytes, const struct compute_opts *opts, struct compute_ctx **out,
		   struct moe_error *err)
{
	return create(cfg, parts, n_parts, extent_bytes, NULL, opts, out, err);
}

int compute_create_latent(const struct moe_model_config *cfg, const struct pack_part_desc *parts, uint32_t n_parts,
			  uint64_t extent_bytes, struct latent_basis *basis, const struct compute_opts *opts,
			  struct compute_ctx **out, struct moe_error *err)
{
	if (!basis) {
		if (out)
			*out = NULL;
		return moe_error_set(err, -EINVAL, "compute: no latent basis");
	}
	int rc = create(cfg, parts, n_parts, extent_bytes, basis, opts, out, err);
	if (rc)
		latent_basis_free(basis);
	return rc;
}

void compute_destroy(struct compute_ctx *c)
{
	if (!c)
		return;
	latent_basis_free(c->basis);
	pthread_mutex_destroy(&c->model_lock);
	free(c);
}

const struct ffn_layout *compute_layout(const struct compute_ctx *c)
{
	return &c->L;
}

const struct latent_layout *compute_latent_layout(const struct compute_ctx *c)
{
	return c && c->latent ? &c->LL : NULL;
}

const struct latent_basis *compute_latent_basis(const struct compute_ctx *c)
{
	return c && c->latent ? c->basis : NULL;
}

void compute_get_model(const struct compute_ctx *c, struct compute_model *out)
{
	pthread_mutex_lock((pthread_mutex_t *)&c->model_lock);
	*out = c->model;
	pthread_mutex_unlock((pthread_mutex_t *)&c->model_lock);
}

void compute_get_counters(const struct compute_ctx *c, struct compute_counters *out)
{
#define X(name, desc) out->name = __atomic_load_n(&c->ctr.name, __ATOMIC_RELAXED);
	COMPUTE_COUNTERS(X)
#undef X
}

/* ---- calibration ---------------------------------------------------------- */

static double median3(double a, double b, double c)
{
	return a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b));
}

/* One expert over B tokens for the calibration: x is [B x max(n, 2r)],
 * read as z for a latent model (the B products are left out: they are paid
 * once per token and group, not per expert). */
static void calib_run(const struct compute_ctx *c, const void *ext, const float *x, size_t ldx, uint32_t B, float *y)
{
	if (c->latent)
		latent_expert(&c->LL, ext, x, ldx, B, y, c->LL.n, NULL, 0, 1);
	else
		ffn_expert(&c->L, ext, x, ldx, B, y, c->L.n, NULL, 0, 1);
}

/* Bytes of an extent the kernels read: the matrices (L->payload) and, for
 * GPT-OSS, the bias vectors, which may lie past them. */
static uint64_t layout_span(const struct ffn_layout *L)
{
	uint64_t end = L->payload;
	const struct ffn_vec *v[] = { &L->gate_up_bias, &L->down_bias };
	for (size_t i = 0; i < MOE_ARRAY_SIZE(v); i++) {
		uint64_t b;
		if (v[i]->dtype != MOE_DTYPE_INVALID && v[i]->len && moe_dtype_row_bytes(v[i]->dtype, v[i]->len, &b))
			end = MOE_MAX(end, v[i]->offset + b);
	}
	return end;
}

int compute_calibrate(struct compute_ctx *c, struct moe_error *err)
{
	const struct ffn_layout *L = &c->L;
	const uint64_t payload = MOE_ALIGN_UP(layout_span(L), 64ull);
	/* Enough copies to exceed the caches (16 MiB buffers stay cached on
	 * the reference machine, machine.md section 2), so 1-token runs stream
	 * weights from DRAM as a freshly loaded expert does. */
	uint64_t copies = MOE_MAX(2ull, (64ull << 20) / MOE_MAX(payload, 1ull) + 1);
	if (copies > 256)
		copies = 256;
	uint64_t total;
	if (!moe_mul_u64(payload, copies, &total) || total > (1ull << 33))
		return moe_error_set(err, -EINVAL, "compute: expert of %llu bytes is too large to calibrate",
				     (unsigned long long)payload);
	const uint32_t B = 16;
	uint8_t *buf = aligned_alloc(64, total);
	const size_t ldx = c->latent ? MOE_MAX((size_t)L->n, 2 * (size_t)c->LL.r) : L->n;
	float *x = malloc(sizeof(float) * B * ldx);
	float *y = malloc(sizeof(float) * B * L->n);
	if (!buf || !x || !y) {
		free(buf), free(x), free(y);
		return moe_error_set(err, -ENOMEM, "compute: no memory for the calibration buffers");
	}
	/* all-zero bytes are valid weights in every dtype (scale 0) */
	memset(buf, 0, total);
	for (size_t i = 0; i < (size_t)B * ldx; i++)
		x[i] = (float)((i * 7919) % 1000) * 1e-3f - 0.5f;

	double t1[3], tb[3];
	uint64_t idx = 0;
	calib_run(c, buf, x, ldx, 1, y); /* warm the code and page tables */
	for (int rep = 0; rep < 3; rep++) {
		/* 1 token, a different (cold) copy each run, at least `copies` runs */
		uint64_t t0 = moe_now_ns();
		for (uint64_t i = 0; i < copies; i++, idx++)
			calib_run(c, buf + (idx % copies) * payload, x, ldx, 1, y);
		t1[rep] = (double)(moe_now_ns() - t0) * 1e-9 / (double)copies;
		/* 16 tokens on one hot copy */
		t0 = moe_now_ns();
		for (int i = 0; i < 4; i++)
			calib_run(c, buf, x, ldx, B, y);
		tb[rep] = (double)(moe_now_ns() - t0) * 1e-9 / 4.0;
	}
	free(buf), free(x), free(y);

	const double s1 = median3(t1[0], t1[1], t1[2]), sb = median3(tb[0], tb[1], tb[2]);
	pthread_mutex_lock(&c->model_lock);
	c->model.isa = ffn_get_isa();
	c->model.host_Bps = (double)L->weight_bytes / fmax(s1, 1e-9);
	c->model.host_flops = (double)c->model.flops_per_token * B / fmax(sb, 1e-9);
	c->model.host_fixed_s = 0.0; /* folded into the 1-token rate */
	c->model.measured = true;
	pthread_mutex_unlock(&c->model_lock);
	moe_debug("compute: %s host streams %.2f GB/s (1 token), %.1f GFLOP/s (16 tokens)",
		  ffn_isa_name(c->model.isa), c->model.host_Bps * 1e-9, c->model.host_flops * 1e-9);
	return 0;
}

/* ---- the cost model ------------------------------------------------------- */

void compute_decide(struct compute_ctx *c, enum compute_tier tier, uint32_t tokens, struct compute_decision *out)
{
	struct compute_model m;
	compute_get_model(c, &m);
	const double bytes = (double)m.expert_bytes, flops = (double)m.flops_per_token * tokens;

	/* Host: weights stream once for the whole batch, so the time is the
	 * larger of the streaming time and the arithmetic time. */
	double host = m.host_fixed_s + fmax(bytes / m.host_Bps, flops / m.host_flops);
	double move = INFINITY;
	if (tier == COMPUTE_TIER_GPU) {
		move = m.gpu_fixed_s + (m.gpu_flops > 0 ? flops / m.gpu_flops : 0.0);
		host = INFINITY; /* it would have to come back first; never chosen */
	} else if (m.host_to_gpu_Bps > 0) {
		move = m.gpu_fixed_s + bytes / m.host_to_gpu_Bps + (m.gpu_flops > 0 ? flops / m.gpu_flops : 0.0);
	}
	if (tier == COMPUTE_TIER_NVME) {
		/* both ways read it from NVMe first (no direct NVMe->GPU path) */
		const double rd = m.nvme_to_host_Bps > 0 ? bytes / m.nvme_to_host_Bps : INFINITY;
		host += rd;
		move += rd;
	}
	*out = (struct compute_decision){
		.where = move < host ? COMPUTE_MOVE_TO_GPU : COMPUTE_ON_HOST,
		.tier = tier,
		.tokens = tokens,
		.host_s = host,
		.move_s = move,
	};
	if (out->where == COMPUTE_ON_HOST)
		CTR_ADD(c, decide_host, 1);
	else
		CTR_ADD(c, decide_move, 1);
}

/* ---- running a request ---------------------------------------------------- */

struct run_req {
	struct compute_ctx *c;
	const float *x;
	size_t ldx;
	uint32_t k;
	const uint32_t *order;   /* pair indices (t*k + j) sorted by expert */
	const uint32_t *gstart;  /* [ng + 1] ranges of order */
	const void *const *gext; /* [ng] extents */
	const uint32_t *gexp;    /* [ng] expert ids */
	uint32_t ng, maxb;
	float *pair_out;         /* [T*k x n] */
	uint32_t layer;
	const struct latent_zcache *zc; /* latent: z of every (token, group) */
	uint32_t next;           /* work counter (atomic) */
	int rc;                  /* first error (atomic) */
};

static void *run_worker(void *p)
{
	struct run_req *r = p;
	const struct ffn_layout *L = &r->c->L;
	const uint32_t n = L->n;
	float *xg = malloc(sizeof(float) * (size_t)r->maxb * n * 2);
	uint32_t *tok = r->zc ? malloc(sizeof(uint32_t) * r->maxb) : NULL;
	if (!xg || (r->zc && !tok)) {
		free(xg);
		int zero = 0;
		__atomic_compare_exchange_n(&r->rc, &zero, -ENOMEM, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
		return NULL;
	}
	float *yg = xg + (size_t)r->maxb * n;
	for (;;) {
		const uint32_t g = __atomic_fetch_add(&r->next, 1, __ATOMIC_RELAXED);
		if (g >= r->ng || __atomic_load_n(&r->rc, __ATOMIC_RELAXED))
			break;
		const uint32_t s = r->gstart[g], B = r->gstart[g + 1] - s;
		int rc;
		if (r->zc) {
			/* the z rows were computed once per (token, group) */
			for (uint32_t b = 0; b < B; b++)
				tok[b] = r->order[s + b] / r->k;
			rc = latent_expert_tokens(&r->c->LL, r->c->basis, r->zc, r->layer, r->gexp[g], r->gext[g], tok, B, yg, n, r->c->kernel_threads);
		} else {
			for (uint32_t b = 0; b < B; b++)
				memcpy(xg + (size_t)b * n, r->x + (size_t)(r->order[s + b] / r->k) * r->ldx,
				       sizeof(float) * n);
			rc = ffn_expert(L, r->gext[g], xg, n, B, yg, n, NULL, 0, r->c->kernel_threads);
		}
		if (rc) {
			int zero = 0;
			__atomic_compare_exchange_n(&r->rc, &zero, rc, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
			break;
		}
		for (uint32_t b = 0; b < B; b++)
			memcpy(r->pair_out + (size_t)r->order[s + b] * n, yg + (size_t)b * n, sizeof(float) * n);
	}
	free(xg);
	free(tok);
	return NULL;
}

int compute_run(struct compute_ctx *c, uint32_t layer, uint32_t T, const float *x, size_t ldx, uint32_t k,
		const uint32_t *experts, const float *weights, float *y, size_t ldy, compute_lookup_fn lookup,
		void *lookup_ctx, struct moe_error *err)
{
	const uint64_t t_start = moe_now_ns();
	const uint32_t n = c ? c->L.n : 0, E = c ? c->cfg.n_experts : 0;
	uint32_t *cnt = NULL, *order = NULL, *gstart = NULL, *gexp = NULL;
	const void **gext = NULL;
	struct latent_zcache zc = { 0 };
	float *pair_out = NULL;
	int rc = 0;

	if (!c || !x || !y || !lookup || (T && k && (!experts || !weights)))
		return moe_error_set(err, -EINVAL, "compute: missing argument");
	CTR_ADD(c, requests, 1);
	if (T > COMPUTE_MAX_TOKENS || k > 64 || ldx < n || ldy < n) {
		rc = moe_error_set(err, -EINVAL, "compute: %u tokens, top-%u, strides %zu/%zu (hidden %u) out of range",
				   T, k, ldx, ldy, n);
		goto fail;
	}
	if (c->cfg.n_moe_layers && layer >= c->cfg.n_moe_layers) {
		rc = moe_error_set(err, -EINVAL, "compute: MoE layer %u of %u", layer, c->cfg.n_moe_layers);
		goto fail;
	}
	if (!T)
		return 0;
	const uintptr_t xa = (uintptr_t)x, ya = (uintptr_t)y;
	if (xa < ya + sizeof(float) * ((size_t)(T - 1) * ldy + n) &&
	    ya < xa + sizeof(float) * ((size_t)(T - 1) * ldx + n)) {
		rc = moe_error_set(err, -EINVAL, "compute: output overlaps the input");
		goto fail;
	}
	const uint32_t P = T * k;
	for (uint32_t p = 0; p < P; p++)
		if (experts[p] >= E) {
			rc = moe_error_set(err, -EINVAL, "compute: token %u chose expert %u of %u", p / k, experts[p], E);
			goto fail;
		}

	/* group pairs by expert: counting sort, experts in ascending id */
	cnt = calloc((size_t)E + 1, sizeof(*cnt));
	order = malloc(sizeof(*order) * ((size_t)P + 1));
	gstart = malloc(sizeof(*gstart) * ((size_t)P + 1));
	gext = malloc(sizeof(*gext) * ((size_t)P + 1));
	gexp = malloc(sizeof(*gexp) * ((size_t)P + 1));
	pair_out = malloc(sizeof(float) * ((size_t)P * n + 1));
	if (!cnt || !order || !gstart || !gext || !gexp || !pair_out) {
		rc = moe_error_set(err, -ENOMEM, "compute: out of memory for %u pairs", P);
		goto fail;
	}
	for (uint32_t p = 0; p < P; p++)
		cnt[experts[p] + 1]++;
	uint32_t ng = 0, maxb = 0;
	for (uint32_t e = 0; e < E; e++) {
		if (cnt[e + 1]) {
			const void *ext = lookup(lookup_ctx, layer, e);
			if (!ext) {
				CTR_ADD(c, missing, 1);
				rc = moe_error_set(err, -ENOENT, "compute: layer %u expert %u is not resident on the host",
						   layer, e);
				goto fail;
			}
			gstart[ng] = cnt[e];
			gexp[ng] = e;
			gext[ng++] = ext;
			maxb = MOE_MAX(maxb, cnt[e + 1]);
		}
		cnt[e + 1] += cnt[e];
	}
	gstart[ng] = P;
	for (uint32_t p = 0; p < P; p++)
		order[cnt[experts[p]]++] = p; /* stable: tokens in order inside a group */

	if (c->latent) {
		/* z = B x once per (token, group) the request touches */
		int zrc = latent_zcache_fill(&zc, c->basis, layer, x, ldx, T, k, experts, c->kernel_threads);
		if (zrc) {
			rc = moe_error_set(err, zrc, "compute: latent projections of layer %u failed", layer);
			goto fail;
		}
		CTR_ADD(c, latent_z_rows, zc.rows);
	}
	struct run_req req = { .c = c, .x = x, .ldx = ldx, .k = k, .order = order, .gstart = gstart, .gext = gext,
			       .gexp = gexp, .ng = ng, .maxb = maxb, .pair_out = pair_out, .layer = layer,
			       .zc = c->latent ? &zc : NULL };
	int nthr = (int)MOE_MIN((uint32_t)c->threads, ng);
	pthread_t tids[COMPUTE_MAX_THREADS];
	bool started[COMPUTE_MAX_THREADS] = { false };
	for (int i = 1; i < nthr; i++)
		started[i] = pthread_create(&tids[i], NULL, run_worker, &req) == 0;
	run_worker(&req);
	for (int i = 1; i < nthr; i++)
		if (started[i])
			pthread_join(tids[i], NULL);
	if (req.rc) {
		rc = moe_error_set(err, req.rc, "compute: expert kernel failed");
		goto fail;
	}

	/* the weighted sum, in top-k order per token (as ffn_moe_token) */
	for (uint32_t t = 0; t < T; t++) {
		float *yt = y + (size_t)t * ldy;
		memset(yt, 0, sizeof(float) * n);
		for (uint32_t j = 0; j < k; j++)
			ffn_axpy(yt, weights[(size_t)t * k + j], pair_out + ((size_t)t * k + j) * n, n);
	}
	CTR_ADD(c, tokens, T);
	CTR_ADD(c, pairs, P);
	CTR_ADD(c, expert_runs, ng);
	CTR_ADD(c, weight_bytes, (uint64_t)ng * c->L.weight_bytes);
	CTR_ADD(c, compute_ns, moe_now_ns() - t_start);
	free(cnt), free(order), free(gstart), free(gext), free(gexp), free(pair_out);
	latent_zcache_free(&zc);
	return 0;
fail:
	CTR_ADD(c, failed, 1);
	free(cnt), free(order), free(gstart), free(gext), free(gexp), free(pair_out);
	latent_zcache_free(&zc);
	return rc;
}

void compute_render(const struct compute_ctx *c, FILE *f, json_t *jm, uint32_t fmt, bool first)
{
	struct compute_model cm;
	struct compute_counters cc;
	if (!c)
		return;
	compute_get_model(c, &cm);
	compute_get_counters(c, &cc);
	const struct {
		const char *name;
		double v;
	} in[] = {
		{ "expert_bytes", (double)cm.expert_bytes },
		{ "flops_per_token", (double)cm.flops_per_token },
		{ "host_bytes_per_s", cm.host_Bps },
		{ "host_flops", cm.host_flops },
		{ "host_fixed_us", cm.host_fixed_s * 1e6 },
		{ "host_rates_measured", cm.measured ? 1.0 : 0.0 },
		{ "nvme_to_host_bytes_per_s", cm.nvme_to_host_Bps },
		{ "host_to_gpu_bytes_per_s", cm.host_to_gpu_Bps },
		{ "gpu_flops", cm.gpu_flops },
		/* MoLAE (latent packs only): B stays resident, only the extents move */
		{ "latent_rank", c->latent ? (double)c->LL.r : 0.0 },
		{ "latent_groups", c->latent ? (double)c->basis->max_groups : 0.0 },
		{ "latent_b_bytes", c->latent ? (double)c->basis->bytes : 0.0 },
		{ "latent_dense_expert_bytes", c->latent ? (double)c->LL.down.row_bytes * c->LL.n * 3 : 0.0 },
	};
	const size_t n_in = MOE_ARRAY_SIZE(in) - (c->latent ? 0 : 4);
	json_t *jc = jm ? json_object() : NULL;
	if (fmt == MOET_STATS_TEXT)
		fprintf(f, "compute (%s kernels; cost model inputs, then counters)\n", ffn_isa_name(cm.isa));
	for (size_t i = 0; i < n_in; i++) {
		if (fmt == MOET_STATS_TEXT)
			fprintf(f, "  compute_%-26s %.6g\n", in[i].name, in[i].v);
		else if (jc)
			json_object_set_new(jc, in[i].name, json_real(in[i].v));
		else if (first) {
			/* Prometheus wants base units: host_fixed_us as seconds */
			size_t n = strlen(in[i].name);
			bool us = n > 3 && !strcmp(in[i].name + n - 3, "_us");
			fprintf(f, "# TYPE moetier_compute_%.*s%s gauge\nmoetier_compute_%.*s%s %.9g\n", (int)(us ? n - 3 : n),
				in[i].name, us ? "_seconds" : "", (int)(us ? n - 3 : n), in[i].name, us ? "_seconds" : "",
				us ? in[i].v * 1e-6 : in[i].v);
		}
	}
	for (unsigned i = 0; i < COMPUTE_CTR_COUNT; i++) {
		const char *name = compute_counter_name((enum compute_counter)i);
		uint64_t v = compute_counter_value(&cc, (enum compute_counter)i);
		if (fmt == MOET_STATS_TEXT)
			fprintf(f, "  compute_%-26s %" PRIu64 "\n", name, v);
		else if (jc)
			json_object_set_new(jc, name, json_integer((json_int_t)v));
		else if (first) {
			/* counters end in _total; compute_ns counts seconds there */
			size_t n = strlen(name);
			if (n > 3 && !strcmp(name + n - 3, "_ns"))
				fprintf(f, "# TYPE moetier_compute_%.*s_seconds_total counter\nmoetier_compute_%.*s_seconds_total %.9g\n",
					(int)(n - 3), name, (int)(n - 3), name, (double)v * 1e-9);
			else
				fprintf(f, "# TYPE moetier_compute_%s_total counter\nmoetier_compute_%s_total %" PRIu64 "\n", name,
					name, v);
		}
	}
	if (jc)
		json_object_set_new(jm, "compute", jc);
}
