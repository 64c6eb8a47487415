/* experts.c - see experts.h. */
#include "experts.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "gpu.h"
#include "latent.h"
#include "moetier/moetier.h"
#include "simcache.h"
#include "trace.h"

#define EXPERTS_MAX_WORKERS 32

struct experts {
	const struct model *m;
	uint32_t n, k, E;
	uint32_t cur_l;          /* the MoE layer experts_layer computes: its layout */
	FILE **hid;              /* --dump-hidden: [n_moe_layers] spool of each layer's ffn_norm'ed inputs */
	/* --local */
	uint8_t *all;            /* [n_moe_layers][n_experts] extents */
	uint64_t ext_bytes;
	/* daemon */
	moet_ctx *ctx;
	unsigned prefetch;           /* layers ahead to hint (0: none) */
	uint64_t *bytes0, *bytes1; /* per-expert read counters at open / now */
	void *fallback;            /* one extent read from the pack when the daemon cannot serve it */
	/* per call scratch, grown on demand */
	uint32_t cap_B;
	struct route_result *routes; /* [B] */
	float *outs;                 /* [B][k][n] */
	unsigned cap_w;              /* workers the buffers below are sized for */
	float *xg[EXPERTS_MAX_WORKERS], *yg[EXPERTS_MAX_WORKERS]; /* per worker: [B][n] rows of one expert */
	uint32_t *cl_e;              /* [E] experts to compute now */
	uint32_t *hint;              /* [n_layers][hint_cap] experts hinted per layer, pending */
	uint32_t *hint_n, hint_cap;  /* [n_layers] how many (0: none pending) */
	const void **cl_p;           /* [E] their extents */
	uint32_t *tok_of;            /* [E][B] token of each use */
	uint8_t *slot_of;            /* [E][B] top-k slot of each use */
	uint32_t *count;             /* [E] */
	uint8_t *mask;               /* [E] residency */
	uint32_t *ids;               /* [E] the experts of one layer call */
	int32_t *slots;              /* [E] their slots (-1: miss) */
	uint8_t *tiers;              /* [E] */
	moet_lease *leases;          /* [E / MOET_MAX_BATCH + 1] one per acquire */
	float *logits;               /* [B][E] */
	/* the GPU tier (experts_use_gpu) */
	bool want_gpu;               /* acquire from the GPU tier first (MOET_F_WANT_GPU) */
	struct gpu *gpu;             /* the device path; NULL: GPU-tier slots read through moet_slot_ptr */
	uint8_t *on_gpu;             /* [B][k] outputs the device summed (not in outs) */
	uint32_t *gtok;              /* [B] one expert's tokens for gpu_batch_add */
	float *gw;                   /* [B] ...and their routing weights */
	const float *gpu_y;          /* [B][n] the device's sum of the layer call (gy), or NULL */
	float *gy;                   /* [B][n] the sums of the layer call's device batches */
	moet_lease *gleases;         /* leases of the slots the device reads until the wait */
	unsigned gl_n, gl_cap;
	struct gpu_stats gpu_base;   /* the device's counters when the run's counting began */
	struct experts_stats st;
	/* experts_configure */
	struct experts_opts o;
	bool aware;                  /* a cache-aware rule (not exact) */
	struct simcache *sim;
	/* pre-gating: per target layer and distance, B tokens x 2k predicted
	 * experts (the first k: the family's top-k of the predicted logits) */
	float *pg_x;                 /* [B][n] ffn_norm'ed residual */
	uint32_t *pg_pred;           /* [n_layers][PREGATE_MAX][cap_B][2k] */
	uint32_t *pg_n;              /* [n_layers][PREGATE_MAX] tokens predicted (0: none) */
	uint8_t *pg_hint_only;       /* [n_layers][PREGATE_MAX] from the embedding: not scored */
	/* fitted pre-gates: per target layer and distance, [E][n + 1] (the
	 * last column a bias) or NULL (the layer's own router) */
	float **pg_w;                /* [n_layers * PREGATE_MAX] */
	bool fitting;                /* experts_pregate_fit_begin .. _end */
	float *pg_xs;                /* fitting: [n_layers][PREGATE_MAX][cap_B][n] inputs kept */
	double **fit_a, **fit_b;     /* fitting: [n+1]^2 and [n+1][E] per (layer, distance) */
	/* expert similarity: per MoE layer [E][E] (NULL: none yet) */
	float *simm;
	float *simx;                 /* collecting: [n_moe_layers][sim_cap][n] inputs */
	uint32_t *sim_n, sim_cap;    /* collecting: [n_moe_layers] rows kept */
	/* token numbering (experts_begin) */
	uint64_t tok_base, tok_next;
	uint32_t seq;
	/* the dump */
	uint64_t d_n, d_cap;
	int32_t *d_tok;              /* [d_cap] */
	uint32_t *d_seq;             /* [d_cap] */
	uint16_t *d_ids;             /* [d_cap][n_layers][k] */
	float *d_lg;                 /* [d_cap][n_layers][E] */
};

#define PG_MAX EXPERTS_PREGATE_MAX

static int grow(struct experts *ex, uint32_t B, unsigned workers)
{
	if (B <= ex->cap_B && workers <= ex->cap_w)
		return 0;
	B = MOE_MAX(B, ex->cap_B);
	workers = MOE_MAX(workers, ex->cap_w);
	free(ex->routes);
	free(ex->outs);
	for (unsigned w = 0; w < EXPERTS_MAX_WORKERS; w++) {
		free(ex->xg[w]);
		free(ex->yg[w]);
		ex->xg[w] = ex->yg[w] = NULL;
	}
	free(ex->tok_of);
	free(ex->slot_of);
	free(ex->logits);
	free(ex->on_gpu);
	free(ex->gtok);
	free(ex->gw);
	free(ex->gy);
	ex->gy = NULL;
	free(ex->pg_x);
	free(ex->pg_pred);
	free(ex->pg_xs);
	ex->pg_x = NULL;
	ex->pg_pred = NULL;
	ex->pg_xs = NULL;
	if (ex->pg_n)
		memset(ex->pg_n, 0, (size_t)ex->m->n_layers * PG_MAX * sizeof(uint32_t));
	ex->routes = malloc((size_t)B * sizeof(*ex->routes));
	ex->outs = malloc((size_t)B * ex->k * ex->n * sizeof(float));
	ex->tok_of = malloc((size_t)ex->E * B * sizeof(uint32_t));
	ex->slot_of = malloc((size_t)ex->E * B);
	ex->logits = malloc((size_t)B * ex->E * sizeof(float));
	ex->on_gpu = calloc((size_t)B * ex->k, 1);
	ex->gtok = malloc((size_t)B * sizeof(uint32_t));
	ex->gw = malloc((size_t)B * sizeof(float));
	if (ex->gpu)
		ex->gy = malloc((size_t)B * ex->n * sizeof(float));
	bool ok = ex->routes && ex->outs && ex->tok_of && ex->slot_of && ex->logits && ex->on_gpu && ex->gtok && ex->gw &&
		  (!ex->gpu || ex->gy);
	if (ok && ex->o.pregate) {
		ex->pg_x = malloc((size_t)B * ex->n * sizeof(float));
		ex->pg_pred = malloc((size_t)ex->m->n_layers * PG_MAX * B * 2 * ex->k * sizeof(uint32_t));
		ok = ex->pg_x && ex->pg_pred;
		if (ok && ex->fitting)
			ok = (ex->pg_xs = malloc((size_t)ex->m->n_layers * PG_MAX * B * ex->n * sizeof(float))) != NULL;
	}
	for (unsigned w = 0; w < workers && ok; w++) {
		ex->xg[w] = malloc((size_t)B * ex->n * sizeof(float));
		ex->yg[w] = malloc((size_t)B * ex->n * sizeof(float));
		ok = ex->xg[w] && ex->yg[w];
	}
	if (!ok) {
		ex->cap_B = ex->cap_w = 0;
		return -ENOMEM;
	}
	ex->cap_B = B;
	ex->cap_w = workers;
	return 0;
}

static struct experts *alloc_experts(const struct model *m)
{
	struct experts *ex = calloc(1, sizeof(*ex));
	if (!ex)
		return NULL;
	ex->m = m;
	ex->n = m->n_embd;
	ex->k = m->top_k;
	ex->E = m->n_experts;
	if (!(ex->count = calloc(ex->E, sizeof(uint32_t))) || !(ex->mask = calloc(ex->E, 1)) ||
	    !(ex->ids = calloc(ex->E, sizeof(uint32_t))) || !(ex->slots = calloc(ex->E, sizeof(int32_t))) ||
	    !(ex->tiers = calloc(ex->E, 1)) || !(ex->leases = calloc(2 * (ex->E / MOET_MAX_BATCH + 1), sizeof(moet_lease))) ||
	    !(ex->cl_e = calloc(ex->E, sizeof(uint32_t))) || !(ex->cl_p = calloc(ex->E, sizeof(void *)))) {
		experts_close(ex); /* frees whatever was allocated */
		return NULL;
	}
	return ex;
}

int experts_open_local(const struct model *m, struct experts **out, struct moe_error *err)
{
	struct experts *ex = alloc_experts(m);
	int rc;
	*out = NULL;
	if (!ex)
		return moe_error_set(err, -ENOMEM, "out of memory");
	ex->st.local = true;
	ex->ext_bytes = pack_extent_bytes(m->pack);
	uint64_t total = ex->ext_bytes * m->cfg->n_moe_layers * m->cfg->n_experts;
	if (posix_memalign((void **)&ex->all, 4096, total ? total : 1)) {
		experts_close(ex);
		return moe_error_set(err, -ENOMEM, "--local: %llu bytes of experts do not fit in memory",
				     (unsigned long long)total);
	}
	for (uint32_t l = 0; l < m->cfg->n_moe_layers; l++)
		for (uint32_t e = 0; e < m->cfg->n_experts; e++)
			if ((rc = pack_read_expert(m->pack, l, e,
						   ex->all + ((uint64_t)l * m->cfg->n_experts + e) * ex->ext_bytes, err))) {
				experts_close(ex);
				return rc;
			}
	posix_fadvise(m->pack->fd, 0, 0, POSIX_FADV_DONTNEED);
	*out = ex;
	return 0;
}

static uint64_t sum_bytes(struct experts *ex, uint64_t *buf)
{
	uint64_t s = 0;
	size_t n = (size_t)ex->m->cfg->n_moe_layers * ex->E;
	if (moet_expert_counters(ex->ctx, NULL, NULL, NULL, buf) < 0)
		return 0;
	for (size_t i = 0; i < n; i++)
		s += buf[i];
	return s;
}

int experts_open_daemon(const struct model *m, const char *socket, unsigned prefetch, struct experts **out,
			struct moe_error *err)
{
	struct experts *ex = alloc_experts(m);
	int rc;
	*out = NULL;
	if (!ex)
		return moe_error_set(err, -ENOMEM, "out of memory");
	ex->prefetch = prefetch;
	struct moet_connect_opts o = { .size = sizeof(o), .socket_path = socket, .client_name = "moe-run" };
	if ((rc = moet_connect(&o, &ex->ctx))) {
		const char *why = moet_last_error(NULL);
		ex->ctx = NULL;
		experts_close(ex);
		return moe_error_set(err, rc < 0 && rc > -4096 ? rc : -ECONNREFUSED, "moetierd: %s%s%s (or use --local)",
				     moet_strerror(rc), why && *why ? ": " : "", why ? why : "");
	}
	struct moet_model_info mi = { .size = sizeof(mi) };
	if ((rc = moet_model_info(ex->ctx, &mi)) < 0) {
		experts_close(ex);
		return moe_error_set(err, -EPROTO, "moetierd: model info: %s", moet_strerror(rc));
	}
	if (mi.n_experts != m->cfg->n_experts || mi.n_moe_layers != m->cfg->n_moe_layers ||
	    mi.hidden != m->cfg->hidden || mi.expert_width != m->cfg->expert_width || mi.dtype != m->cfg->dtype ||
	    mi.expert_bytes < m->layout.payload) {
		experts_close(ex);
		return moe_error_set(err, -EINVAL,
				     "moetierd serves %s (%u layers x %u experts, hidden %u, %s), not this pack's model",
				     mi.name, mi.n_moe_layers, mi.n_experts, mi.hidden, moe_dtype_name(mi.dtype));
	}
	size_t nc = (size_t)m->cfg->n_moe_layers * ex->E;
	if (posix_memalign(&ex->fallback, 4096, pack_extent_bytes(m->pack))) {
		ex->fallback = NULL;
		experts_close(ex);
		return moe_error_set(err, -ENOMEM, "out of memory");
	}
	if (!(ex->bytes0 = calloc(nc, sizeof(uint64_t))) || !(ex->bytes1 = calloc(nc, sizeof(uint64_t))) ||
	    !(ex->hint = calloc((size_t)m->n_layers * (ex->hint_cap = ROUTE_MAX_K * MOE_MAX(prefetch, 1u)),
				sizeof(uint32_t))) ||
	    !(ex->hint_n = calloc(m->n_layers, sizeof(uint32_t)))) {
		experts_close(ex);
		return moe_error_set(err, -ENOMEM, "out of memory");
	}
	moet_expert_counters(ex->ctx, NULL, NULL, NULL, ex->bytes0);
	*out = ex;
	return 0;
}

void experts_close(struct experts *ex)
{
	if (!ex)
		return;
	gpu_close(ex->gpu); /* before the daemon's arena goes */
	free(ex->gleases);
	free(ex->on_gpu);
	free(ex->gtok);
	free(ex->gw);
	free(ex->gy);
	moet_close(ex->ctx);
	free(ex->all);
	free(ex->fallback);
	free(ex->bytes0);
	free(ex->bytes1);
	free(ex->hint);
	free(ex->hint_n);
	free(ex->routes);
	free(ex->outs);
	for (unsigned w = 0; w < EXPERTS_MAX_WORKERS; w++) {
		free(ex->xg[w]);
		free(ex->yg[w]);
	}
	free(ex->tok_of);
	free(ex->slot_of);
	free(ex->logits);
	free(ex->pg_x);
	free(ex->pg_pred);
	free(ex->pg_xs);
	free(ex->pg_n);
	free(ex->pg_hint_only);
	for (size_t i = 0; ex->pg_w && i < (size_t)ex->m->n_layers * PG_MAX; i++)
		free(ex->pg_w[i]);
	free(ex->pg_w);
	for (size_t i = 0; ex->fit_a && i < (size_t)ex->m->n_layers * PG_MAX; i++) {
		free(ex->fit_a[i]);
		free(ex->fit_b[i]);
	}
	free(ex->fit_a);
	free(ex->fit_b);
	free(ex->simm);
	free(ex->simx);
	free(ex->sim_n);
	simcache_free(ex->sim);
	free(ex->d_tok);
	free(ex->d_seq);
	free(ex->d_ids);
	free(ex->d_lg);
	if (ex->hid) {
		for (uint32_t l = 0; l < ex->m->cfg->n_moe_layers; l++)
			if (ex->hid[l])
				fclose(ex->hid[l]);
		free(ex->hid);
	}
	free(ex->cl_e);
	free(ex->cl_p);
	free(ex->count);
	free(ex->mask);
	free(ex->ids);
	free(ex->slots);
	free(ex->tiers);
	free(ex->leases);
	free(ex);
}

int experts_use_gpu(struct experts *ex, enum experts_gpu_mode mode, char *note, size_t len, struct moe_error *err)
{
	const struct model *m = ex->m;
	const bool on = mode == EXPERTS_GPU_ON;
	struct moe_error why = { { 0 } };
	int rc;
	note[0] = '\0';
	ex->want_gpu = false;
	if (mode == EXPERTS_GPU_OFF)
		return 0;
	if (!ex->ctx) {
		/* --local: every expert in host memory, no tier to use */
		return on ? moe_error_set(err, -EINVAL, "--gpu=on computes the daemon's GPU tier: not with --local") : 0;
	}
	struct moet_model_info mi = { .size = sizeof(mi) };
	if ((rc = moet_model_info(ex->ctx, &mi)) < 0)
		return moe_error_set(err, -EPROTO, "moetierd: model info: %s", moet_strerror(rc));
	if (!mi.n_slots[MOET_TIER_GPU]) {
		rc = moe_error_set(&why, -ENODEV, "moetierd has no GPU tier (moetierd --gpu-bytes, --gpu-backend=vmm)");
		goto host;
	}
	if (mi.caps & MOET_CAP_GPU_EMU) {
		/* the emulated tier lives in host memory, mapped here */
		if (on) {
			rc = moe_error_set(&why, -ENODEV,
					   "moetierd's GPU tier is emulated (host memory): --gpu=on needs a CUDA one "
					   "(moetierd --gpu-backend=vmm)");
			goto host;
		}
		ex->want_gpu = true;
		snprintf(note, len, "moe-run: GPU: moetierd's GPU tier is emulated: its experts are computed on the host");
		return 0;
	}
	if (m->latent) {
		rc = moe_error_set(&why, -ENOTSUP, "a MoLAE latent pack has no device path yet");
		goto host;
	}
	for (uint32_t l = 0; l < m->cfg->n_moe_layers; l++)
		if ((rc = ffn_cuda_layout_check(model_layout(m, l), &why))) {
			moe_error_prefix(&why, rc, "MoE layer %u", l);
			goto host;
		}
	if ((rc = gpu_open(ex->ctx, mi.n_slots[MOET_TIER_GPU], ex->E, ex->k, &ex->gpu, &why)))
		goto host;
	ex->want_gpu = true;
	ex->st.gpu = true;
	ex->cap_B = ex->cap_w = 0; /* the next grow() sizes gy too */
	gpu_get_stats(ex->gpu, &ex->gpu_base);
	snprintf(note, len, "moe-run: GPU: the experts of moetierd's GPU tier are computed on %s", gpu_name(ex->gpu));
	return 0;
host:
	if (on)
		return moe_error_set(err, rc, "--gpu=on: %s", why.msg);
	snprintf(note, len, "moe-run: GPU: not used (%s): experts computed on the host", why.msg);
	return 0;
}

void experts_set_token(struct experts *ex, uint32_t token_key, uint32_t position)
{
	if (ex->ctx)
		moet_set_token(ex->ctx, token_key, position);
}

int experts_configure(struct experts *ex, const struct experts_opts *o, struct moe_error *err)
{
	const struct model *m = ex->m;
	int rc;
	/* again after a calibration pass: a fresh cache, fresh counters */
	simcache_free(ex->sim);
	ex->sim = NULL;
	free(ex->pg_n);
	free(ex->pg_hint_only);
	ex->pg_n = NULL;
	ex->pg_hint_only = NULL;
	const bool local = ex->st.local, gpu = ex->st.gpu;
	memset(&ex->st, 0, sizeof(ex->st));
	ex->st.local = local;
	ex->st.gpu = gpu;
	if (ex->gpu)
		gpu_get_stats(ex->gpu, &ex->gpu_base);
	if (ex->ctx)
		moet_expert_counters(ex->ctx, NULL, NULL, NULL, ex->bytes0);
	if (ex->hint_n)
		memset(ex->hint_n, 0, ex->m->n_layers * sizeof(uint32_t));
	ex->o = *o;
	ex->o.sim_policy = NULL; /* not kept: the caller's string */
	ex->aware = o->rule.keep_top && o->rule.keep_top < ex->k;
	if (ex->aware && (rc = route_cache_rule_check(&m->rp, &o->rule, err)))
		return rc;
	if (ex->aware && o->route_kind == ROUTE_RULE_SIMILARITY) {
		if (!ex->simm)
			return moe_error_set(err, -EINVAL, "the similarity rule needs the experts' similarity "
							  "(experts_similarity_*: moe-run --route-calib FILE)");
		if (o->route_daemon)
			return moe_error_set(err, -EINVAL, "the similarity rule is moe-run's own (the daemon has no "
							  "similarity matrix): --route-via local");
	}
	if (o->pregate > PG_MAX)
		return moe_error_set(err, -EINVAL, "pre-gating: at most %u layers ahead", PG_MAX);
	if (o->pregate_prefetch && !o->pregate)
		return moe_error_set(err, -EINVAL, "pre-gating prefetch needs pre-gating (--pregate H)");
	if (o->route_daemon && !ex->ctx)
		return moe_error_set(err, -EINVAL, "routing through the daemon's ROUTE needs a daemon (--socket)");
	if (o->sim_cache) {
		if (ex->ctx)
			return moe_error_set(err, -EINVAL, "--sim-cache goes with --local (the daemon has a cache)");
		if (o->sim_cache < ex->k || o->sim_cache > ex->E)
			return moe_error_set(err, -EINVAL, "--sim-cache %u: between top-k %u and %u experts", o->sim_cache,
					     ex->k, ex->E);
		if ((rc = simcache_create(m->cfg->n_moe_layers, ex->E, o->sim_cache, o->sim_policy ? o->sim_policy : "lru",
					  &ex->sim, err)))
			return rc;
		ex->st.sim = true;
	} else if (ex->aware && !ex->ctx) {
		return moe_error_set(err, -EINVAL,
				     "cache-aware routing needs a cache: the daemon's (--socket) or a simulated one (--sim-cache C)");
	}
	if (o->pregate && (!(ex->pg_n = calloc((size_t)m->n_layers * PG_MAX, sizeof(uint32_t))) ||
			   !(ex->pg_hint_only = calloc((size_t)m->n_layers * PG_MAX, 1))))
		return moe_error_set(err, -ENOMEM, "out of memory");
	ex->cap_B = ex->cap_w = 0; /* the next grow() sizes the pre-gating buffers too */
	return 0;
}

int experts_begin(struct experts *ex, const int32_t *toks, uint32_t B, uint32_t pos0)
{
	if (pos0 == 0 && ex->tok_next)
		ex->seq++;
	ex->tok_base = ex->tok_next;
	ex->tok_next += B;
	if (!ex->o.dump)
		return 0;
	const size_t L = ex->m->cfg->n_moe_layers;
	if (ex->d_n + B > ex->d_cap) {
		uint64_t cap = MOE_MAX(ex->d_cap * 2, ex->d_n + B + 256);
		int32_t *t = realloc(ex->d_tok, cap * sizeof(*t));
		if (t)
			ex->d_tok = t;
		uint32_t *q = realloc(ex->d_seq, cap * sizeof(*q));
		if (q)
			ex->d_seq = q;
		uint16_t *i = realloc(ex->d_ids, cap * L * ex->k * sizeof(*i));
		if (i)
			ex->d_ids = i;
		float *g = realloc(ex->d_lg, cap * L * ex->E * sizeof(*g));
		if (g)
			ex->d_lg = g;
		if (!t || !q || !i || !g)
			return -ENOMEM;
		ex->d_cap = cap;
	}
	for (uint32_t t = 0; t < B; t++) {
		ex->d_tok[ex->d_n + t] = toks[t];
		ex->d_seq[ex->d_n + t] = ex->seq;
	}
	/* rows a layer call does not reach stay absent from the trace */
	for (size_t i = (size_t)ex->d_n * L * ex->k; i < (size_t)(ex->d_n + B) * L * ex->k; i++)
		ex->d_ids[i] = TRACE_NONE;
	memset(ex->d_lg + (size_t)ex->d_n * L * ex->E, 0, (size_t)B * L * ex->E * sizeof(float));
	ex->d_n += B;
	return 0;
}

/* The 2k best experts by the family's selection key, the first k those of
 * route_topk (the rule itself, groups included), then the next best keys. */
static int rank_2k(const struct experts *ex, const float *logits, uint32_t *out)
{
	const struct route_params *rp = &ex->m->rp;
	struct route_result r;
	uint8_t taken[ROUTE_MAX_EXPERTS] = { 0 };
	int rc = route_topk(rp, logits, &r);
	if (rc)
		return rc;
	for (uint32_t j = 0; j < ex->k; j++) {
		out[j] = r.experts[j];
		taken[r.experts[j]] = 1;
	}
	for (uint32_t j = ex->k; j < 2 * ex->k; j++) {
		uint32_t best = UINT32_MAX;
		float bk = 0.0f;
		for (uint32_t e = 0; e < ex->E; e++) {
			if (taken[e])
				continue;
			float key = logits[e];
			if (rp->scoring == MOE_SCORING_SIGMOID)
				key = 1.0f / (1.0f + expf(-key)) + (rp->score_bias ? rp->score_bias[e] : 0.0f);
			if (best == UINT32_MAX || key > bk) {
				best = e;
				bk = key;
			}
		}
		out[j] = best == UINT32_MAX ? 0 : best;
		if (best != UINT32_MAX)
			taken[best] = 1;
	}
	return 0;
}

static uint32_t *pg_row(struct experts *ex, uint32_t layer, uint32_t d, uint32_t t)
{
	return ex->pg_pred + (((size_t)layer * PG_MAX + (d - 1)) * ex->cap_B + t) * 2 * ex->k;
}

static int pregate_at(struct experts *ex, int32_t src, const float *resid, uint32_t B, int threads);
static void prefetch_pregate(struct experts *ex, int32_t src, uint32_t B);

int experts_pregate(struct experts *ex, uint32_t il, const float *resid, uint32_t B, int threads)
{
	return ex->o.pregate && !ex->o.pregate_out ? pregate_at(ex, (int32_t)il, resid, B, threads) : 0;
}

int experts_pregate_out(struct experts *ex, uint32_t il, const float *resid, uint32_t B, int threads)
{
	return ex->o.pregate && ex->o.pregate_out ? pregate_at(ex, (int32_t)il, resid, B, threads) : 0;
}

int experts_pregate_embed(struct experts *ex, const float *x, uint32_t B, int threads)
{
	int rc;
	if (!ex->o.pregate || !ex->o.pregate_prefetch || ex->fitting)
		return 0;
	/* hints only: the first layers' experts from the token's embedding,
	 * before any of its layers runs (not counted in the recall, which is
	 * about predicting from a layer's residual stream) */
	if ((rc = pregate_at(ex, -1, x, B, threads)))
		return rc;
	if (ex->ctx)
		prefetch_pregate(ex, -1, B);
	return 0;
}

static int pregate_at(struct experts *ex, int32_t src, const float *resid, uint32_t B, int threads)
{
	const struct model *m = ex->m;
	int rc;
	if ((rc = grow(ex, B, (unsigned)MOE_MIN(MOE_MAX(threads, 1), EXPERTS_MAX_WORKERS))))
		return rc;
	for (uint32_t d = 1; d <= ex->o.pregate && src + (int32_t)d < (int32_t)m->n_layers; d++) {
		const uint32_t nl = (uint32_t)(src + (int32_t)d);
		ex->pg_hint_only[(size_t)nl * PG_MAX + d - 1] = src < 0;
		const struct model_layer *N = &m->layers[nl];
		if (N->moe_index < 0 || !N->router.data)
			continue; /* a dense layer: nothing to predict */
		float *xs = ex->fitting ? ex->pg_xs + ((size_t)nl * PG_MAX + d - 1) * ex->cap_B * ex->n : ex->pg_x;
		const float *W = ex->pg_w ? ex->pg_w[(size_t)nl * PG_MAX + d - 1] : NULL;
		for (uint32_t t = 0; t < B; t++)
			attn_rmsnorm(resid + (size_t)t * ex->n, model_vec(&N->ffn_norm), xs + (size_t)t * ex->n, ex->n,
				     m->rms_eps);
		if (W) {
			/* the fitted map: logits = W [x; 1] */
			for (uint32_t t = 0; t < B; t++)
				for (uint32_t e = 0; e < ex->E; e++) {
					const float *w = W + (size_t)e * (ex->n + 1), *x = xs + (size_t)t * ex->n;
					float acc = w[ex->n];
					for (uint32_t i = 0; i < ex->n; i++)
						acc += w[i] * x[i];
					ex->logits[(size_t)t * ex->E + e] = acc;
				}
		} else if ((rc = model_matmul(&N->router, xs, B, ex->logits, threads))) {
			return rc;
		}
		for (uint32_t t = 0; t < B; t++)
			if ((rc = rank_2k(ex, ex->logits + (size_t)t * ex->E, pg_row(ex, nl, d, t))))
				return rc;
		ex->pg_n[(size_t)nl * PG_MAX + d - 1] = B;
		if (ex->sim && ex->o.pregate_prefetch)
			for (uint32_t t = 0; t < B; t++)
				simcache_prefetch(ex->sim, (uint32_t)N->moe_index, pg_row(ex, nl, d, t), ex->k);
	}
	return 0;
}

/* Fitting: the inputs kept for (il, d) against the logits layer il's router
 * gave (still in ex->logits), into the normal equations. */
static void fit_add(struct experts *ex, uint32_t il, uint32_t d, uint32_t B)
{
	const size_t slot = (size_t)il * PG_MAX + d - 1, n1 = ex->n + 1;
	double *A = ex->fit_a[slot], *Bm = ex->fit_b[slot];
	if (!A || !Bm)
		return;
	for (uint32_t t = 0; t < B; t++) {
		const float *x = ex->pg_xs + (slot * ex->cap_B + t) * ex->n, *y = ex->logits + (size_t)t * ex->E;
		for (size_t i = 0; i < n1; i++) {
			const double xi = i < ex->n ? x[i] : 1.0;
			double *a = A + i * n1, *b = Bm + i * ex->E;
			for (size_t j = 0; j <= i; j++)
				a[j] += xi * (j < ex->n ? x[j] : 1.0);
			for (uint32_t e = 0; e < ex->E; e++)
				b[e] += xi * y[e];
		}
	}
}

int experts_pregate_fit_begin(struct experts *ex, struct moe_error *err)
{
	const size_t nslots = (size_t)ex->m->n_layers * PG_MAX, n1 = ex->n + 1;
	if (!ex->o.pregate)
		return moe_error_set(err, -EINVAL, "pre-gating fit: pre-gating is off");
	if (!ex->fit_a && (!(ex->fit_a = calloc(nslots, sizeof(double *))) || !(ex->fit_b = calloc(nslots, sizeof(double *)))))
		return moe_error_set(err, -ENOMEM, "out of memory");
	for (uint32_t nl = 0; nl < ex->m->n_layers; nl++)
		for (uint32_t d = 1; d <= ex->o.pregate && d <= nl; d++) {
			const size_t slot = (size_t)nl * PG_MAX + d - 1;
			if (!(ex->fit_a[slot] = calloc(n1 * n1, sizeof(double))) ||
			    !(ex->fit_b[slot] = calloc(n1 * ex->E, sizeof(double))))
				return moe_error_set(err, -ENOMEM, "pre-gating fit: out of memory");
		}
	ex->fitting = true;
	ex->cap_B = ex->cap_w = 0; /* the next grow() keeps every input */
	return 0;
}

/* Cholesky of the SPD n x n matrix A (lower triangle, in place); then
 * solves A X = B for m right-hand sides ([n][m]) in place. -EDOM if A is
 * not positive definite. */
static int chol_solve(double *A, size_t n, double *Bm, size_t m)
{
	for (size_t j = 0; j < n; j++) {
		double s = A[j * n + j];
		for (size_t k = 0; k < j; k++)
			s -= A[j * n + k] * A[j * n + k];
		if (!(s > 0))
			return -EDOM;
		A[j * n + j] = sqrt(s);
		for (size_t i = j + 1; i < n; i++) {
			double v = A[i * n + j];
			for (size_t k = 0; k < j; k++)
				v -= A[i * n + k] * A[j * n + k];
			A[i * n + j] = v / A[j * n + j];
		}
	}
	for (size_t c = 0; c < m; c++) {
		for (size_t i = 0; i < n; i++) { /* L y = b */
			double v = Bm[i * m + c];
			for (size_t k = 0; k < i; k++)
				v -= A[i * n + k] * Bm[k * m + c];
			Bm[i * m + c] = v / A[i * n + i];
		}
		for (size_t i = n; i-- > 0;) { /* L^T x = y */
			double v = Bm[i * m + c];
			for (size_t k = i + 1; k < n; k++)
				v -= A[k * n + i] * Bm[k * m + c];
			Bm[i * m + c] = v / A[i * n + i];
		}
	}
	return 0;
}

int experts_pregate_fit_end(struct experts *ex, double ridge, struct moe_error *err)
{
	const struct model *m = ex->m;
	const size_t nslots = (size_t)m->n_layers * PG_MAX, n = ex->n, n1 = n + 1, E = ex->E;
	float *w0 = malloc(n * n * sizeof(float)), *r0 = malloc(n * E * sizeof(float));
	int rc = 0;
	ex->fitting = false;
	ex->cap_B = ex->cap_w = 0;
	if (!w0 || !r0 || (!ex->pg_w && !(ex->pg_w = calloc(nslots, sizeof(float *))))) {
		rc = moe_error_set(err, -ENOMEM, "out of memory");
		goto out;
	}
	for (size_t i = 0; i < n; i++)
		for (size_t j = 0; j < n; j++)
			w0[i * n + j] = i == j;
	for (size_t slot = 0; slot < nslots && !rc; slot++) {
		double *A = ex->fit_a[slot], *Bm = ex->fit_b[slot];
		if (!A || A[n1 * n1 - 1] < 1.0) /* the bias term counts the samples */
			continue;
		const uint32_t nl = (uint32_t)(slot / PG_MAX);
		/* the prior: the layer's own router (ffn_norm is in the input) */
		if ((rc = model_matmul(&m->layers[nl].router, w0, (uint32_t)n, r0, 1))) {
			rc = moe_error_set(err, rc, "pre-gating fit: router of layer %u: %d", nl, rc);
			break;
		}
		double tr = 0.0;
		for (size_t i = 0; i < n; i++)
			tr += A[i * n1 + i];
		const double lam = ridge * (tr / (double)n > 0 ? tr / (double)n : 1.0);
		for (size_t i = 0; i < n1; i++) {
			for (size_t j = i + 1; j < n1; j++)
				A[i * n1 + j] = A[j * n1 + i]; /* only the lower half was summed */
			A[i * n1 + i] += lam;
			for (size_t e = 0; e < E && i < n; e++)
				Bm[i * E + e] += lam * r0[i * E + e];
		}
		if (chol_solve(A, n1, Bm, E))
			continue; /* degenerate: keep the router */
		float *W = malloc(E * n1 * sizeof(float));
		if (!W) {
			rc = moe_error_set(err, -ENOMEM, "out of memory");
			break;
		}
		for (size_t e = 0; e < E; e++)
			for (size_t i = 0; i < n1; i++)
				W[e * n1 + i] = (float)Bm[i * E + e];
		free(ex->pg_w[slot]);
		ex->pg_w[slot] = W;
	}
out:
	for (size_t i = 0; ex->fit_a && i < nslots; i++) {
		free(ex->fit_a[i]);
		free(ex->fit_b[i]);
		ex->fit_a[i] = ex->fit_b[i] = NULL;
	}
	free(w0);
	free(r0);
	return rc;
}

int experts_similarity_begin(struct experts *ex, uint32_t samples, struct moe_error *err)
{
	const uint32_t L = ex->m->cfg->n_moe_layers;
	if (ex->m->latent)
		return moe_error_set(err, -ENOTSUP, "expert similarity: not for a MoLAE latent pack");
	free(ex->simx);
	free(ex->sim_n);
	ex->sim_cap = samples ? samples : 1;
	ex->simx = malloc((size_t)L * ex->sim_cap * ex->n * sizeof(float));
	ex->sim_n = calloc(L, sizeof(uint32_t));
	if (!ex->simx || !ex->sim_n)
		return moe_error_set(err, -ENOMEM, "expert similarity: out of memory");
	return 0;
}

int experts_similarity_end(struct experts *ex, int threads, struct moe_error *err)
{
	const struct model *m = ex->m;
	const uint32_t L = m->cfg->n_moe_layers, E = ex->E, n = ex->n, CH = 32;
	float *y = malloc((size_t)E * CH * n * sizeof(float));
	double *G = malloc((size_t)E * E * sizeof(double));
	int rc = 0;
	if (!ex->simm)
		ex->simm = calloc((size_t)L * E * E, sizeof(float));
	if (!y || !G || !ex->simm) {
		rc = moe_error_set(err, -ENOMEM, "expert similarity: out of memory");
		goto out;
	}
	for (uint32_t l = 0; l < L && !rc; l++) {
		const uint32_t N = ex->sim_n[l];
		float *S = ex->simm + (size_t)l * E * E;
		memset(G, 0, (size_t)E * E * sizeof(double));
		for (uint32_t t0 = 0; t0 < N && !rc; t0 += CH) {
			const uint32_t c = MOE_MIN(CH, N - t0);
			const float *xs = ex->simx + ((size_t)l * ex->sim_cap + t0) * n;
			for (uint32_t e = 0; e < E && !rc; e++) {
				const void *ext;
				if (ex->all) {
					ext = ex->all + ((uint64_t)l * E + e) * ex->ext_bytes;
				} else {
					if ((rc = pack_read_expert(m->pack, l, e, ex->fallback, err)))
						break;
					ext = ex->fallback;
				}
				if ((rc = ffn_expert(model_layout(m, l), ext, xs, n, c, y + (size_t)e * CH * n, n, NULL, 0,
						     threads)))
					moe_error_set(err, rc, "expert similarity: layer %u expert %u: %d", l, e, rc);
			}
			for (uint32_t a = 0; a < E && !rc; a++)
				for (uint32_t b = 0; b <= a; b++) {
					const float *ya = y + (size_t)a * CH * n, *yb = y + (size_t)b * CH * n;
					double d = 0.0;
					for (size_t i = 0; i < (size_t)c * n; i++)
						d += (double)ya[i] * yb[i];
					G[(size_t)a * E + b] += d;
				}
		}
		for (uint32_t a = 0; a < E; a++)
			for (uint32_t b = 0; b <= a; b++) {
				double na = G[(size_t)a * E + a], nb = G[(size_t)b * E + b];
				float v = na > 0 && nb > 0 ? (float)(G[(size_t)a * E + b] / sqrt(na * nb)) : (a == b ? 1.0f : 0.0f);
				S[(size_t)a * E + b] = S[(size_t)b * E + a] = v;
			}
	}
out:
	free(y);
	free(G);
	free(ex->simx);
	free(ex->sim_n);
	ex->simx = NULL;
	ex->sim_n = NULL;
	ex->sim_cap = 0;
	return rc;
}

/* Scores the predictions made for layer il against what its router chose. */
static void pregate_score(struct experts *ex, uint32_t il, uint32_t B)
{
	for (uint32_t d = 1; d <= PG_MAX; d++) {
		uint32_t *pn = &ex->pg_n[(size_t)il * PG_MAX + d - 1];
		if (*pn == B && ex->pg_hint_only[(size_t)il * PG_MAX + d - 1]) {
			/* from the embedding (il = d - 1): counted apart */
			for (uint32_t t = 0; t < B; t++) {
				const uint32_t *p = pg_row(ex, il, d, t);
				const struct route_result *r = &ex->routes[t];
				for (uint32_t j = 0; j < r->n; j++)
					for (uint32_t i = 0; i < ex->k; i++)
						ex->st.pg_embed_hits[d - 1] += p[i] == r->exact[j];
				ex->st.pg_embed_tokens[d - 1]++;
			}
		}
		if (*pn != B || ex->pg_hint_only[(size_t)il * PG_MAX + d - 1]) {
			*pn = 0;
			continue;
		}
		if (ex->fitting)
			fit_add(ex, il, d, B);
		for (uint32_t t = 0; t < B; t++) {
			const uint32_t *p = pg_row(ex, il, d, t);
			const struct route_result *r = &ex->routes[t];
			for (uint32_t j = 0; j < r->n; j++)
				for (uint32_t i = 0; i < 2 * ex->k; i++)
					if (p[i] == r->exact[j]) {
						ex->st.pg_hits[d - 1] += i < ex->k;
						ex->st.pg_hits2[d - 1]++;
						break;
					}
			ex->st.pg_tokens[d - 1]++;
		}
		*pn = 0;
	}
}

/* Pre-gating hints: the last token's predicted top-k for each of the next
 * layers, nearest first, each expert sent once per layer visit. */
static void prefetch_pregate(struct experts *ex, int32_t src, uint32_t B)
{
	const struct model *m = ex->m;
	for (uint32_t d = 1; d <= ex->o.pregate && src + (int32_t)d < (int32_t)m->n_layers; d++) {
		const uint32_t nl = (uint32_t)(src + (int32_t)d);
		if (ex->pg_n[(size_t)nl * PG_MAX + d - 1] != B)
			continue;
		const uint32_t *p = pg_row(ex, nl, d, B - 1);
		uint32_t *h = ex->hint + (size_t)nl * ex->hint_cap, nh = ex->hint_n[nl], nn = 0;
		for (uint32_t j = 0; j < ex->k; j++) {
			bool dup = false;
			for (uint32_t i = 0; i < nh + nn && !dup; i++)
				dup = h[i] == p[j];
			if (!dup && nh + nn < ex->hint_cap)
				h[nh + nn++] = p[j];
		}
		if (!nn)
			continue;
		if (moet_prefetch(ex->ctx, (uint32_t)m->layers[nl].moe_index, h + nh, nn, ex->want_gpu ? MOET_TIER_GPU : MOET_TIER_HOST) < 0)
			return;
		ex->st.prefetches += nn;
		ex->hint_n[nl] = nh + nn;
	}
}

/* Runs expert e over the tokens routed to it, each result into its (token,
 * slot) buffer, with worker w's scratch. */
static int run_expert(struct experts *ex, uint32_t e, const void *extent, const float *x, int threads, unsigned w)
{
	const uint32_t n = ex->n, cnt = ex->count[e];
	const uint32_t *tok = ex->tok_of + (size_t)e * ex->cap_B;
	const uint8_t *slot = ex->slot_of + (size_t)e * ex->cap_B;
	float *xg = ex->xg[w], *yg = ex->yg[w];
	if (ex->m->latent) {
		/* latent experts read the layer call's z, not x */
		if (run_latent_expert_macs(ex->m->latent, cnt) < model_split_min())
			threads = 1;
		int rc = run_latent_expert(ex->m->latent, e, extent, tok, cnt, yg, n, threads);
		if (rc)
			return rc;
		for (uint32_t i = 0; i < cnt; i++)
			memcpy(ex->outs + ((size_t)tok[i] * ex->k + slot[i]) * n, yg + (size_t)i * n, n * sizeof(float));
		return 0;
	}
	for (uint32_t i = 0; i < cnt; i++)
		memcpy(xg + (size_t)i * n, x + (size_t)tok[i] * n, n * sizeof(float));
	if ((uint64_t)cnt * ex->m->layout.m * n * 3 < model_split_min())
		threads = 1; /* as model_matmul: too little work to share */
	int rc = ffn_expert(model_layout(ex->m, ex->cur_l), extent, xg, n, cnt, yg, n, NULL, 0, threads);
	if (rc)
		return rc;
	for (uint32_t i = 0; i < cnt; i++)
		memcpy(ex->outs + ((size_t)tok[i] * ex->k + slot[i]) * n, yg + (size_t)i * n, n * sizeof(float));
	return 0;
}

struct list_job {
	struct experts *ex;
	const float *x;
	unsigned scratch; /* next free per-piece scratch index (atomic) */
	int rc;           /* first error (atomic) */
};

/* One piece of the list: experts [lo, hi), each on this thread, with a
 * scratch of its own (at most `workers` pieces run at once). */
static void list_piece(void *arg, uint32_t lo, uint32_t hi)
{
	struct list_job *j = arg;
	const unsigned w = __atomic_fetch_add(&j->scratch, 1, __ATOMIC_RELAXED);
	for (uint32_t i = lo; i < hi; i++) {
		int rc = run_expert(j->ex, j->ex->cl_e[i], j->ex->cl_p[i], j->x, 1, w);
		if (rc) {
			int zero = 0;
			__atomic_compare_exchange_n(&j->rc, &zero, rc, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
			return;
		}
	}
}

/* Computes the n experts of cl_e/cl_p. With threads >= 2 and at least two
 * experts, the experts are shared out to the kernels' thread pool
 * (ffn_parallel_for), each computed on one thread; otherwise one after the
 * other, each split over the threads. Either way the same bits. */
static int compute_list(struct experts *ex, unsigned n, const float *x, int threads, struct moe_error *err)
{
	unsigned workers = MOE_MIN((unsigned)threads, MOE_MIN(n, ex->cap_w));
	int rc = 0;
	if (workers < 2) {
		for (unsigned i = 0; i < n && !rc; i++)
			if ((rc = run_expert(ex, ex->cl_e[i], ex->cl_p[i], x, threads, 0)))
				moe_error_set(err, rc, "expert %u: %d", ex->cl_e[i], rc);
	} else {
		struct list_job j = { .ex = ex, .x = x };
		ffn_parallel_for((int)workers, n, list_piece, &j);
		if ((rc = j.rc))
			moe_error_set(err, rc, "expert computation: %d", rc);
	}
	for (unsigned i = 0; i < n; i++)
		ex->st.slots += ex->count[ex->cl_e[i]];
	ex->st.uses += n;
	return rc;
}

/* Next-layers hint: each of the next `prefetch` layers' routers applied to
 * this layer's input (the residual stream changes little from one layer to
 * the next), its top-k for the last token sent as a PREFETCH, nearest layer
 * first (the daemon queues them in order); experts a shallower call already
 * hinted for that layer are not sent again. Deeper hints keep the disk busy
 * across more layers but are less often right. */
static void prefetch_next(struct experts *ex, uint32_t il, const float *x, uint32_t B)
{
	const struct model *m = ex->m;
	for (uint32_t d = 1; d <= ex->prefetch && il + d < m->n_layers; d++) {
		const uint32_t nl = il + d;
		const struct model_layer *N = &m->layers[nl];
		uint32_t *h = ex->hint + (size_t)nl * ex->hint_cap, nh = ex->hint_n[nl], nn = 0;
		struct route_result r;
		if (model_matmul(&N->router, x + (size_t)(B - 1) * ex->n, 1, ex->logits, 1) ||
		    route_topk(&m->rp, ex->logits, &r))
			return;
		for (uint32_t j = 0; j < r.n; j++) {
			bool dup = false;
			for (uint32_t i = 0; i < nh && !dup; i++)
				dup = h[i] == r.experts[j];
			if (!dup && nh + nn < ex->hint_cap)
				h[nh + nn++] = r.experts[j];
		}
		if (!nn)
			continue;
		if (moet_prefetch(ex->ctx, (uint32_t)N->moe_index, h + nh, nn, ex->want_gpu ? MOET_TIER_GPU : MOET_TIER_HOST) < 0)
			return;
		ex->st.prefetches += nn;
		ex->hint_n[nl] = nh + nn;
	}
}

/* Fills ex->mask with the layer's residency in the tiers moe-run reads:
 * the host's, and with the GPU tier in use the GPU's too. < 0 on failure. */
static int residency(struct experts *ex, uint32_t moe_l)
{
	if (moet_resident(ex->ctx, moe_l, MOET_TIER_HOST, ex->mask, ex->E) < 0)
		return -1;
	if (ex->want_gpu) {
		uint8_t g[ROUTE_MAX_EXPERTS];
		if (ex->E <= ROUTE_MAX_EXPERTS && moet_resident(ex->ctx, moe_l, MOET_TIER_GPU, g, ex->E) >= 0)
			for (uint32_t e = 0; e < ex->E; e++)
				ex->mask[e] |= g[e];
	}
	return 0;
}

static bool any_resident(struct experts *ex, uint32_t moe_l, const uint32_t *ids, unsigned n)
{
	if (residency(ex, moe_l) < 0)
		return false;
	for (unsigned i = 0; i < n; i++)
		if (ex->mask[ids[i]])
			return true;
	return false;
}

/* Expert e served from GPU slot `slot`: its tokens and routing weights
 * added to the device batch, their outputs marked as the device's. */
static int gpu_add(struct experts *ex, uint32_t e, int32_t slot)
{
	const uint32_t cnt = ex->count[e];
	const uint32_t *tok = ex->tok_of + (size_t)e * ex->cap_B;
	const uint8_t *sl = ex->slot_of + (size_t)e * ex->cap_B;
	for (uint32_t i = 0; i < cnt; i++) {
		ex->gtok[i] = tok[i];
		ex->gw[i] = ex->routes[tok[i]].weights[sl[i]];
	}
	int rc = gpu_batch_add(ex->gpu, slot, cnt, ex->gtok, ex->gw);
	if (rc)
		return rc;
	for (uint32_t i = 0; i < cnt; i++)
		ex->on_gpu[(size_t)tok[i] * ex->k + sl[i]] = 1;
	ex->st.slots += cnt;
	ex->st.uses++;
	return 0;
}

/* Keeps a lease of slots the device reads until the batch's wait. */
static int gpu_keep_lease(struct experts *ex, moet_lease l)
{
	if (ex->gl_n == ex->gl_cap) {
		unsigned cap = ex->gl_cap ? 2 * ex->gl_cap : 16;
		moet_lease *v = realloc(ex->gleases, cap * sizeof(*v));
		if (!v)
			return -ENOMEM;
		ex->gleases = v;
		ex->gl_cap = cap;
	}
	ex->gleases[ex->gl_n++] = l;
	return 0;
}

/* A device batch's end: waited for, its sums added to ex->gy (*any: gy
 * holds some), then the leases of the slots it read go back. */
static int gpu_finish(struct experts *ex, uint32_t B, bool *any, struct moe_error *err)
{
	const float *y;
	int rc = gpu_batch_wait(ex->gpu, &y, err);
	for (unsigned i = 0; i < ex->gl_n; i++)
		moet_release(ex->ctx, ex->gleases[i]);
	ex->gl_n = 0;
	if (!rc && y) {
		if (*any)
			ffn_axpy(ex->gy, 1.0f, y, (size_t)B * ex->n);
		else
			memcpy(ex->gy, y, (size_t)B * ex->n * sizeof(float));
		*any = true;
	}
	return rc;
}

/* Acquires and computes the experts ids[0..n): what is resident first, then
 * what was missing as its loads land. Every round asks for all of them (in
 * ring-entry chunks) before computing any, so all their loads start at once,
 * then sends the next layer's hint, then computes what was served.
 * With the GPU tier in use (want_gpu) a round asks twice: from the GPU tier
 * (MOET_F_WANT_GPU: served only from there; a miss there starts the copy
 * up), then from the host tier for what the GPU did not serve. On the
 * device path the GPU-served experts are launched first, the host ones
 * computed meanwhile, and the device waited for once the layer call's
 * last round is done; otherwise (the emulated GPU tier) a GPU slot is
 * read through moet_slot_ptr and computed here like a host one. */
static int daemon_layer(struct experts *ex, uint32_t il, uint32_t moe_l, uint32_t *ids, unsigned n, const float *x,
			uint32_t B, int threads, struct moe_error *err)
{
	bool first = true, pf = ex->prefetch > 0 || ex->o.pregate_prefetch;
	const bool dev = ex->gpu != NULL;
	bool gany = false;
	unsigned idle = 0;
	int rc = 0;
	ex->gpu_y = NULL;
	if (dev) {
		memset(ex->on_gpu, 0, (size_t)B * ex->k);
		if ((rc = gpu_batch_begin(ex->gpu, B, ex->n, model_layout(ex->m, moe_l)->m, err)))
			return rc;
	}
	while (n) {
		/* After a few rounds without progress a blocking acquire of one
		 * expert: with a tiny arena, NOWAIT loads can evict each other
		 * before they are acquired. After many, the pack itself. */
		const bool block = idle >= 3, from_pack = idle > 20;
		const unsigned todo = block ? 1 : n;
		const unsigned passes = ex->want_gpu && !block ? 2 : 1;
		unsigned nl = 0, kept = 0, nc = 0, ask = todo;
		uint64_t t0 = moe_now_ns();
		for (unsigned pass = 0; pass < passes; pass++) {
			const bool gpu_pass = passes == 2 && pass == 0, last = pass + 1 == passes;
			const unsigned l0 = nl;
			unsigned next = 0;
			for (unsigned c = 0; c < ask; c += MOET_MAX_BATCH) {
				unsigned cn = MOE_MIN(ask - c, (unsigned)MOET_MAX_BATCH);
				rc = moet_acquire(ex->ctx, moe_l, ids + c, cn,
						  (block ? 0 : MOET_F_NOWAIT) | (gpu_pass ? MOET_F_WANT_GPU : 0), ex->slots + c,
						  ex->tiers + c, &ex->leases[nl]);
				if (rc < 0) {
					rc = moe_error_set(err, -EIO, "moetierd: acquire layer %u: %s %s", moe_l,
							   moet_strerror(rc), moet_last_error(ex->ctx));
					goto release;
				}
				nl++;
			}
			if (block) {
				ex->st.stall_ns += moe_now_ns() - t0;
				ex->st.waits++;
			}
			if (pf && last) {
				/* this layer's misses are queued: now the next
				 * layer's hint, loading while this layer computes */
				pf = false;
				if (ex->o.pregate_prefetch)
					prefetch_pregate(ex, (int32_t)il, B);
				else
					prefetch_next(ex, il, x, B);
			}
			rc = 0;
			for (unsigned i = 0; i < ask; i++) {
				const int32_t slot = ex->slots[i];
				if (slot == -EBADMSG || slot == -EIO) {
					/* the daemon's verdict on this expert (a failed
					 * checksum or read): no retry would change it
					 * before its backoff */
					rc = moe_error_set(err, slot, "moetierd: layer %u expert %u: %s", moe_l, ids[i],
							   slot == -EBADMSG ? "its extent failed its checksum (EBADMSG)"
									    : "its extent could not be read (EIO)");
					goto release;
				}
				if (gpu_pass && slot < 0) {
					ids[next++] = ids[i]; /* the host pass asks again */
					continue;
				}
				if (first) {
					if (slot < 0)
						ex->st.misses++;
					else if (ex->tiers[i] == MOET_TIER_GPU)
						ex->st.hits_gpu++;
					else
						ex->st.hits_host++;
				}
				if (slot >= 0 && ex->tiers[i] == MOET_TIER_GPU && dev && gpu_slot_ready(ex->gpu, slot)) {
					if ((rc = gpu_add(ex, ids[i], slot))) {
						rc = moe_error_set(err, rc, "GPU batch of layer %u: %d", moe_l, rc);
						goto release;
					}
					continue;
				}
				const void *p = slot >= 0 ? moet_slot_ptr(ex->ctx, ex->tiers[i], slot) : NULL;
				/* -EDQUOT: this client holds its share of the arena;
				 * not a fault, and waiting would not help: read it
				 * from the pack */
				if (!p && (slot >= 0 || from_pack || slot == -EDQUOT)) {
					/* served from a tier this process cannot map, or
					 * the daemon makes no progress: read it from the
					 * pack (same bytes, CRC checked) */
					if ((rc = pack_read_expert(ex->m->pack, moe_l, ids[i], ex->fallback, err)))
						goto release;
					ex->st.fallback_reads++;
					/* the one fallback buffer: computed now */
					if ((rc = run_expert(ex, ids[i], ex->fallback, x, threads, 0))) {
						moe_error_set(err, rc, "expert %u of layer %u: %d", ids[i], moe_l, rc);
						goto release;
					}
					ex->st.slots += ex->count[ids[i]];
					ex->st.uses++;
					continue;
				}
				if (!p) {
					ids[kept++] = ids[i]; /* kept <= i: compaction in place */
				} else {
					ex->cl_e[nc] = ids[i];
					ex->cl_p[nc++] = p;
				}
			}
			if (gpu_pass && dev) {
				/* the device reads these slots until the wait */
				for (unsigned l = l0; l < nl; l++)
					if (ex->leases[l]) {
						if ((rc = gpu_keep_lease(ex, ex->leases[l]))) {
							rc = moe_error_set(err, rc, "out of memory");
							goto release;
						}
						ex->leases[l] = 0;
					}
			}
			if (gpu_pass) {
				/* what the GPU did not serve, asked from the host;
				 * the rest of ids (todo..n) stays where it is */
				ask = next;
			}
		}
		/* the device first (async), what was served here while it runs
		 * and the misses load; then the host leases go */
		if (dev && (rc = gpu_batch_launch(ex->gpu, model_layout(ex->m, moe_l), x, err)))
			goto release;
		rc = compute_list(ex, nc, x, threads, err);
release:
		for (unsigned l = 0; l < nl; l++)
			if (ex->leases[l])
				moet_release(ex->ctx, ex->leases[l]);
		if (rc) {
			if (dev) {
				struct moe_error e2;
				gpu_finish(ex, B, &gany, &e2);
			}
			return rc;
		}
		for (unsigned i = todo; i < n; i++)
			ids[kept++] = ids[i];
		first = false;
		idle = kept == n ? idle + 1 : 0;
		n = kept;
		if (dev && idle && ex->gl_n) {
			/* no progress: the GPU slots this call holds also hold
			 * their host copies (an inclusive host tier), which a small
			 * host arena may need for the misses: the device batch
			 * ends here and gives them back, a new one follows */
			if ((rc = gpu_finish(ex, B, &gany, err)) ||
			    (rc = gpu_batch_begin(ex->gpu, B, ex->n, model_layout(ex->m, moe_l)->m, err)))
				return rc;
		}
		if (n && !block && !any_resident(ex, moe_l, ids, n)) {
			/* the residency check first: a load that landed since the
			 * acquire would otherwise cost the whole wait timeout */
			t0 = moe_now_ns();
			rc = moet_wait_ready(ex->ctx, moe_l, 2);
			ex->st.stall_ns += moe_now_ns() - t0;
			ex->st.waits++;
			if (rc < 0) {
				if (dev) {
					struct moe_error e2;
					gpu_finish(ex, B, &gany, &e2);
				}
				return moe_error_set(err, -EIO, "moetierd: waiting for layer %u: %s", moe_l,
						     moet_strerror(rc));
			}
		}
	}
	if (dev) {
		if ((rc = gpu_finish(ex, B, &gany, err)))
			return rc;
		ex->gpu_y = gany ? ex->gy : NULL;
	}
	return 0;
}

/* One token's cache-aware decision by the daemon (ROUTE, protocol 2): the
 * same rule on its residency at that moment; its NOWAIT acquire starts the
 * loads of the chosen misses and is released at once (the layer's own
 * acquire follows). */
static int route_by_daemon(struct experts *ex, uint32_t moe_l, const float *lg, struct route_result *r,
			   struct moe_error *err)
{
	const struct route_cache_rule *ru = &ex->o.rule;
	struct moet_route_args a = { .size = sizeof(a), .rule = (unsigned)ex->o.route_kind, .keep_top = ru->keep_top,
				     .margin = ru->margin, .max_share = ru->max_share >= 1.0f ? 0.0f : ru->max_share,
				     .min_similarity = ru->min_similarity, .weights = ru->weights + 1,
				     .tiers = ex->want_gpu ? MOET_ROUTE_TIER_GPU | MOET_ROUTE_TIER_HOST : MOET_ROUTE_TIER_HOST };
	int32_t slots[ROUTE_MAX_K];
	uint8_t tiers[ROUTE_MAX_K];
	moet_lease lease = 0;
	memset(r, 0, sizeof(*r));
	int rc = moet_route_opts(ex->ctx, moe_l, lg, ex->E, MOET_F_NOWAIT, &a, r->experts, r->weights, slots, tiers,
				 &lease);
	if (lease)
		moet_release(ex->ctx, lease);
	if (rc < 0)
		return moe_error_set(err, -EIO, "moetierd: ROUTE layer %u: %s %s", moe_l, moet_strerror(rc),
				     moet_last_error(ex->ctx));
	if ((uint32_t)rc != ex->k)
		return moe_error_set(err, -EPROTO, "moetierd: ROUTE layer %u: %d experts, not top-%u", moe_l, rc, ex->k);
	r->n = ex->k;
	for (uint32_t j = 0; j < ex->k; j++) {
		r->exact[j] = a.exact[j];
		r->exact_weights[j] = a.exact_weights[j];
	}
	r->subst_mask = a.subst_mask;
	r->open_mask = a.open_mask;
	r->n_subst = (uint32_t)__builtin_popcount(a.subst_mask);
	return 0;
}

int experts_layer(struct experts *ex, uint32_t il, const float *x, uint32_t B, float *y, int threads,
		  struct moe_error *err)
{
	const struct model *m = ex->m;
	const struct model_layer *L = &m->layers[il];
	const uint32_t n = ex->n, k = ex->k, moe_l = (uint32_t)L->moe_index;
	int rc;

	ex->cur_l = moe_l;
	if (ex->hid && fwrite(x, n * sizeof(float), B, ex->hid[moe_l]) != B)
		return moe_error_set(err, -EIO, "--dump-hidden: spooling layer %u: %s", moe_l, strerror(errno));

	if ((rc = grow(ex, B, (unsigned)MOE_MIN(MOE_MAX(threads, 1), EXPERTS_MAX_WORKERS))))
		return moe_error_set(err, rc, "out of memory");
	if ((rc = model_matmul(&L->router, x, B, ex->logits, threads)))
		return moe_error_set(err, rc, "router of layer %u: %d", il, rc);
	memset(ex->count, 0, ex->E * sizeof(uint32_t));
	/* cache-aware routing sees the daemon's host residency as the layer
	 * call starts, or the simulated cache as each token reaches it */
	const uint8_t *resmap = NULL;
	struct route_cache_rule rule = ex->o.rule;
	if (ex->simm && ex->o.route_kind == ROUTE_RULE_SIMILARITY)
		rule.similarity = ex->simm + (size_t)moe_l * ex->E * ex->E;
	if (ex->sim_n && ex->sim_n[moe_l] < ex->sim_cap) {
		/* collecting inputs for the similarity */
		uint32_t take = MOE_MIN(B, ex->sim_cap - ex->sim_n[moe_l]);
		memcpy(ex->simx + ((size_t)moe_l * ex->sim_cap + ex->sim_n[moe_l]) * n, x, (size_t)take * n * sizeof(float));
		ex->sim_n[moe_l] += take;
	}
	if (ex->aware && ex->ctx && residency(ex, moe_l) >= 0)
		resmap = ex->mask;
	struct route_params rp = m->rp; /* with this layer's exp_probs_b (deepseek2) */
	if (L->score_bias)
		rp.score_bias = L->score_bias;
	for (uint32_t t = 0; t < B; t++) {
		struct route_result *r = &ex->routes[t];
		const float *lg = ex->logits + (size_t)t * ex->E;
		if (ex->sim)
			resmap = simcache_map(ex->sim, moe_l);
		if (ex->aware && ex->o.route_daemon)
			rc = route_by_daemon(ex, moe_l, lg, r, err);
		else if (ex->aware)
			rc = route_cached(&rp, lg, resmap, &rule, r, err);
		else
			rc = route_topk(&rp, lg, r);
		if (rc)
			return moe_error_set(err, rc, "routing layer %u token %u (NaN logits?)", il, t);
		route_count(&ex->st.route, r);
		if (ex->sim)
			simcache_access(ex->sim, ex->tok_base + t, moe_l, r->experts, r->n);
		if (ex->o.dump && ex->tok_base + t < ex->d_n) {
			const size_t row = (size_t)(ex->tok_base + t) * m->cfg->n_moe_layers + moe_l;
			for (uint32_t j = 0; j < k; j++)
				ex->d_ids[row * k + j] = (uint16_t)r->experts[j];
			memcpy(ex->d_lg + row * ex->E, lg, ex->E * sizeof(float));
		}
		for (uint32_t j = 0; j < r->n; j++) {
			uint32_t e = r->experts[j];
			ex->tok_of[(size_t)e * ex->cap_B + ex->count[e]] = t;
			ex->slot_of[(size_t)e * ex->cap_B + ex->count[e]] = (uint8_t)j;
			ex->count[e]++;
		}
	}

	/* a MoLAE pack: z = B_g x once per (token, group) the routing touched,
	 * before any expert of the call runs */
	if (m->latent && (rc = run_latent_layer(m->latent, moe_l, x, B, ex->routes, threads, err)))
		return moe_error_prefix(err, rc, "layer %u", il);
	if (ex->pg_n)
		pregate_score(ex, il, B);
	if (ex->hint_n && ex->hint_n[il]) {
		/* how good the last hint for this layer was: its experts the
		 * token chose */
		const struct route_result *r = &ex->routes[B - 1];
		const uint32_t *h = ex->hint + (size_t)il * ex->hint_cap;
		for (uint32_t i = 0; i < ex->hint_n[il]; i++)
			for (uint32_t j = 0; j < r->n; j++)
				ex->st.prefetches_used += h[i] == r->experts[j];
		ex->hint_n[il] = 0;
	}
	if (ex->all) {
		unsigned nc = 0;
		for (uint32_t e = 0; e < ex->E; e++)
			if (ex->count[e]) {
				ex->cl_e[nc] = e;
				ex->cl_p[nc++] = ex->all + ((uint64_t)moe_l * ex->E + e) * ex->ext_bytes;
			}
		if ((rc = compute_list(ex, nc, x, threads, err)))
			return moe_error_prefix(err, rc, "layer %u", il);
	} else {
		unsigned ng = 0;
		for (uint32_t e = 0; e < ex->E; e++)
			if (ex->count[e])
				ex->ids[ng++] = e;
		if ((rc = daemon_layer(ex, il, moe_l, ex->ids, ng, x, B, threads, err)))
			return rc;
	}

	/* y = sum_j w_j out_j in top-k order, as llama.cpp adds the weighted
	 * expert views one after the other */
	for (uint32_t t = 0; t < B; t++) {
		float *yt = y + (size_t)t * n;
		memset(yt, 0, n * sizeof(float));
		for (uint32_t j = 0; j < k; j++)
			if (!ex->gpu_y || !ex->on_gpu[(size_t)t * k + j])
				ffn_axpy(yt, ex->routes[t].weights[j], ex->outs + ((size_t)t * k + j) * n, n);
		/* the device's weighted sum of its experts (gpu.h: within the
		 * tolerance of the host's, in its own order) */
		if (ex->gpu_y)
			ffn_axpy(yt, 1.0f, ex->gpu_y + (size_t)t * n, n);
	}
	return 0;
}

void experts_get_stats(struct experts *ex, struct experts_stats *out)
{
	if (ex->ctx) {
		uint64_t a = 0, b = sum_bytes(ex, ex->bytes1);
		size_t nc = (size_t)ex->m->cfg->n_moe_layers * ex->E;
		for (size_t i = 0; i < nc; i++)
			a += ex->bytes0[i];
		ex->st.bytes_read = b >= a ? b - a : 0;
	}
	if (ex->gpu) {
		struct gpu_stats gs;
		gpu_get_stats(ex->gpu, &gs);
		ex->st.gpu_experts = gs.experts - ex->gpu_base.experts;
		ex->st.gpu_pairs = gs.pairs - ex->gpu_base.pairs;
		ex->st.gpu_device_ns = gs.device_ns - ex->gpu_base.device_ns;
		ex->st.gpu_wait_ns = gs.wait_ns - ex->gpu_base.wait_ns;
		ex->st.gpu_exports = gs.exports; /* since the start: the first one maps the arena */
	}
	if (ex->sim) {
		struct simcache_stats ss;
		simcache_get_stats(ex->sim, &ss);
		ex->st.sim_accesses = ss.accesses;
		ex->st.sim_hits = ss.hits;
		ex->st.sim_prefetches = ss.prefetches;
		ex->st.sim_prefetch_used = ss.prefetch_used;
	}
	*out = ex->st;
}

int experts_hidden_begin(struct experts *ex, struct moe_error *err)
{
	const uint32_t L = ex->m->cfg->n_moe_layers;
	if (ex->hid)
		return 0;
	if (!(ex->hid = calloc(L, sizeof(*ex->hid))))
		return moe_error_set(err, -ENOMEM, "out of memory");
	for (uint32_t l = 0; l < L; l++)
		if (!(ex->hid[l] = tmpfile()))
			return moe_error_set(err, -errno, "--dump-hidden: spool file: %s", strerror(errno));
	return 0;
}

int experts_hidden_write(struct experts *ex, const char *path, struct moe_error *err)
{
	const uint32_t L = ex->m->cfg->n_moe_layers;
	FILE *f = fopen(path, "wb");
	int rc = 0;
	long first = -1;
	if (!f)
		return moe_error_set(err, -errno, "%s: %s", path, strerror(errno));
	for (uint32_t l = 0; l < L && !rc; l++) {
		FILE *h = ex->hid[l];
		long len = ftell(h);
		char buf[1 << 16];
		size_t got;
		/* every layer saw every token: equal lengths, or the file would
		 * not be [L][T][n] */
		if (first < 0)
			first = len;
		if (len != first) {
			rc = moe_error_set(err, -EIO, "--dump-hidden: layer %u has %ld bytes, layer 0 %ld", l, len, first);
			break;
		}
		rewind(h);
		while ((got = fread(buf, 1, sizeof(buf), h)) > 0)
			if (fwrite(buf, 1, got, f) != got) {
				rc = moe_error_set(err, -EIO, "%s: write failed", path);
				break;
			}
		fseek(h, 0, SEEK_END);
	}
	if (fclose(f) && !rc)
		rc = moe_error_set(err, -EIO, "%s: write failed", path);
	return rc;
}

int experts_dump_write(struct experts *ex, const char *csv, int (*piece)(void *ctx, int32_t tok, char *buf, size_t len),
		       void *ctx, struct moe_error *err)
{
	const struct model *m = ex->m;
	/* rows by MoE layer; Layer ID = the model layer (MoE layers follow any
	 * dense ones) */
	const uint32_t L = m->cfg->n_moe_layers, k = ex->k;
	uint32_t first = 0;
	while (first < m->n_layers && m->layers[first].moe_index != 0)
		first++;
	struct trace tr = { .n_tokens = (uint32_t)ex->d_n, .n_layers = L, .first_layer = first, .k = k,
			    .max_expert = ex->E - 1 };
	int rc = 0;
	if (!ex->o.dump || !ex->d_n)
		return moe_error_set(err, -EINVAL, "--dump-routing: no token was routed");
	tr.experts = ex->d_ids;
	tr.count = malloc((size_t)ex->d_n * L);
	tr.batch = ex->d_seq;
	tr.token = calloc(ex->d_n, sizeof(char *));
	if (!tr.count || !tr.token) {
		rc = moe_error_set(err, -ENOMEM, "out of memory");
		goto out;
	}
	for (size_t i = 0; i < (size_t)ex->d_n * L; i++)
		tr.count[i] = ex->d_ids[i * k] == TRACE_NONE ? 0 : (uint8_t)k;
	for (uint64_t t = 0; t < ex->d_n; t++) {
		char buf[256];
		int n = piece ? piece(ctx, ex->d_tok[t], buf, sizeof(buf) - 1) : -1;
		if (n < 0)
			n = snprintf(buf, sizeof(buf), "[%d]", ex->d_tok[t]);
		buf[MOE_MIN(n, (int)sizeof(buf) - 1)] = '\0';
		if (!(tr.token[t] = strdup(buf))) {
			rc = moe_error_set(err, -ENOMEM, "out of memory");
			goto out;
		}
	}
	FILE *f = fopen(csv, "w");
	if (!f) {
		rc = moe_error_set(err, -errno, "%s: %s", csv, strerror(errno));
		goto out;
	}
	rc = trace_write(f, &tr);
	if (fclose(f) || rc) {
		rc = moe_error_set(err, rc ? rc : -EIO, "%s: write failed", csv);
		goto out;
	}
	char path[4096];
	snprintf(path, sizeof(path), "%s.logits", csv);
	if (!(f = fopen(path, "wb"))) {
		rc = moe_error_set(err, -errno, "%s: %s", path, strerror(errno));
		goto out;
	}
	uint32_t hdr[4] = { (uint32_t)ex->d_n, L, ex->E, first };
	size_t nf = (size_t)ex->d_n * L * ex->E;
	bool ok = fwrite(EXPERTS_LOGITS_MAGIC, 1, 8, f) == 8 && fwrite(hdr, sizeof(uint32_t), 4, f) == 4 &&
		  fwrite(ex->d_lg, sizeof(float), nf, f) == nf;
	if (fclose(f) || !ok)
		rc = moe_error_set(err, -EIO, "%s: write failed", path);
out:
	for (uint64_t t = 0; tr.token && t < ex->d_n; t++)
		free(tr.token[t]);
	free(tr.token);
	free(tr.count);
	return rc;
}
