/* server_model.c - the served models: opening a pack with its cache,
 * routing, cost model and predictor, and the shared state region clients
 * map read-only (residency bitmaps under a seqlock, per-expert counters). */
#include "config.h"
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "cache.h"
#include "compute.h"
#include "pack.h"
#include "server_impl.h"

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif

/* ---- shared state (residency bitmaps under a seqlock, counters) -------- */

static uint32_t *layer_seq(struct served_model *m, uint32_t l)
{
	return (uint32_t *)(m->shared + m->hdr->layer_off + (uint64_t)l * m->hdr->layer_stride);
}

static uint64_t *layer_bits(struct served_model *m, uint32_t l, unsigned tier)
{
	return (uint64_t *)(m->shared + m->hdr->layer_off + (uint64_t)l * m->hdr->layer_stride + 8) +
	       (size_t)tier * m->words;
}

struct moet_expert_counters *server_model_expert_ctr(struct served_model *m, uint32_t l, uint32_t e)
{
	return (struct moet_expert_counters *)(m->shared + m->hdr->counters_off) + (size_t)l * m->n_experts + e;
}

/* Copies the cache's bitmaps of layer l into shared memory when they
 * changed; the seq word is bumped (and waiters woken) only then. */
static void refresh_layer(struct served_model *m, uint32_t l, bool force_wake)
{
	uint64_t tmp[2][64];
	bool changed = false;
	if (m->words > 64)
		return;
	for (unsigned t = 0; t < 2; t++) {
		memset(tmp[t], 0, sizeof(tmp[t]));
		if (m->arena[t].n_slots)
			cache_residency_bitmap(m->cache, (enum cache_tier)t, l, tmp[t], m->words);
		if (memcmp(tmp[t], layer_bits(m, l, t), m->words * 8))
			changed = true;
	}
	if (!changed && !force_wake)
		return;
	uint32_t *seq = layer_seq(m, l);
	__atomic_add_fetch(seq, 1, __ATOMIC_SEQ_CST); /* odd: writing */
	for (unsigned t = 0; t < 2; t++)
		for (uint32_t w = 0; w < m->words; w++)
			__atomic_store_n(&layer_bits(m, l, t)[w], tmp[t][w], __ATOMIC_RELAXED);
	__atomic_add_fetch(seq, 1, __ATOMIC_SEQ_CST); /* even: stable */
	syscall(SYS_futex, seq, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

void server_model_refresh(struct served_model *m, bool all)
{
	if (!m->refresh_lock_ok)
		return;
	pthread_mutex_lock(&m->refresh_lock);
	for (uint32_t l = 0; l < m->n_layers; l++) {
		uint64_t bit = 1ull << (l % 64);
		uint64_t d = atomic_fetch_and(&m->dirty[l / 64], ~bit);
		if (all || (d & bit))
			refresh_layer(m, l, (d & bit) != 0);
	}
	pthread_mutex_unlock(&m->refresh_lock);
}

static void on_ready(void *ctx, uint32_t layer, uint32_t expert, enum cache_tier tier, int status)
{
	struct served_model *m = ctx;
	if (layer >= m->n_layers || expert >= m->n_experts)
		return;
	if (status == 0 && m->hdr) {
		struct moet_expert_counters *c = server_model_expert_ctr(m, layer, expert);
		__atomic_add_fetch(&c->loads, 1, __ATOMIC_RELAXED);
		__atomic_add_fetch(&c->bytes, m->pack->hdr->extent_payload, __ATOMIC_RELAXED);
	}
	(void)tier;
	atomic_fetch_or(&m->dirty[layer / 64], 1ull << (layer % 64));
	if (m->srv)
		server_kick_ring(m->srv);
}

static int reopen_ro(int fd)
{
	char p[64];
	snprintf(p, sizeof(p), "/proc/self/fd/%d", fd);
	return open(p, O_RDONLY | O_CLOEXEC);
}

static int make_shared(struct served_model *m, struct moe_error *err)
{
	uint64_t layer_stride = MOE_ALIGN_UP(8 + 16ull * m->words, 64);
	uint64_t layer_off = 4096;
	uint64_t ctr_off = MOE_ALIGN_UP(layer_off + layer_stride * m->n_layers, 4096);
	uint64_t total = MOE_ALIGN_UP(ctr_off + sizeof(struct moet_expert_counters) * m->n_layers * m->n_experts, 4096);
	m->shared_fd = memfd_create("moetier-shared", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (m->shared_fd < 0)
		return moe_error_set(err, -errno, "memfd_create: %s", strerror(errno));
	if (ftruncate(m->shared_fd, (off_t)total))
		return moe_error_set(err, -errno, "ftruncate shared state: %s", strerror(errno));
	m->shared = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, m->shared_fd, 0);
	if (m->shared == MAP_FAILED) {
		m->shared = NULL;
		return moe_error_set(err, -errno, "mmap shared state: %s", strerror(errno));
	}
	m->shared_bytes = total;
	m->hdr = (struct moet_shared_hdr *)m->shared;
	m->hdr->magic = MOET_SHARED_MAGIC;
	m->hdr->version = MOET_PROTO_VERSION;
	m->hdr->n_moe_layers = m->n_layers;
	m->hdr->n_experts = m->n_experts;
	m->hdr->bitmap_words = m->words;
	m->hdr->layer_off = layer_off;
	m->hdr->layer_stride = layer_stride;
	m->hdr->counters_off = ctr_off;
	m->hdr->total_bytes = total;
	/* Clients can neither resize it nor map it writable; our own mapping
	 * stays writable (F_SEAL_FUTURE_WRITE, platform.md section 7). */
	if (fcntl(m->shared_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL))
		moe_warn("sealing the shared state memfd: %s (clients still get a read-only fd)", strerror(errno));
	return 0;
}

/* The B matrices as the GPU tier holds them: per layer its first
 * n_groups[l] groups of [B_gate; B_up] (already contiguous in struct
 * latent_basis, whose max_groups padding is left out), layers one after
 * the other. Sets m->latent.bytes and layer_off; *image (malloc'd, NULL
 * unless want) is what to copy. */
static int latent_gpu_image(struct served_model *m, const struct latent_basis *b, bool want, void **image,
			    struct moe_error *err)
{
	const uint64_t group_bytes = 2ull * b->r * b->n * sizeof(float);
	m->latent.layer_off = calloc(b->n_layers, sizeof(uint64_t));
	if (!m->latent.layer_off)
		return moe_error_set(err, -ENOMEM, "out of memory");
	uint64_t total = 0;
	for (uint32_t l = 0; l < b->n_layers; l++) {
		m->latent.layer_off[l] = total;
		total += b->n_groups[l] * group_bytes;
	}
	m->latent.bytes = total;
	*image = NULL;
	if (!want || !total)
		return 0;
	uint8_t *p = malloc(total);
	if (!p)
		return moe_error_set(err, -ENOMEM, "MoLAE B image of %" PRIu64 " bytes: out of memory", total);
	for (uint32_t l = 0; l < b->n_layers; l++)
		memcpy(p + m->latent.layer_off[l], latent_basis_b(b, l, 0, 0), b->n_groups[l] * group_bytes);
	*image = p;
	return 0;
}

int server_model_open(struct server *s, struct served_model *m, const char *path, unsigned idx, struct moe_error *err)
{
	int rc = pack_open(path, 0, &m->pack, err);
	if (rc)
		return rc; /* pack_open's message already starts with the path */
	/* MoLAE latent pack: its B matrices (per layer and group) are read once
	 * and stay resident with the model's COMPUTE engine, and, with a GPU
	 * tier, in the GPU arena too (latent_gpu_image); only the extents
	 * (A_gate | A_up | W_down) go through the tiers, so the arenas, whose
	 * slots are extent-sized, hold more experts in the same bytes. */
	const bool latent = latent_parts_present(m->pack->hdr->parts, m->pack->hdr->n_parts);
	const struct moe_model_config *mc = m->pack->model;
	const char *base = strrchr(path, '/');
	snprintf(m->name, sizeof(m->name), "%s", mc->name[0] ? mc->name : base ? base + 1 : path);
	for (unsigned i = 0; i < idx; i++)
		if (!strcmp(s->models[i].name, m->name))
			snprintf(m->name + strnlen(m->name, 52), 12, "#%u", idx % 1000);
	m->srv = s;
	m->n_layers = mc->n_moe_layers;
	m->n_experts = mc->n_experts;
	m->words = (m->n_experts + 63) / 64;
	m->shared_fd = m->shared_ro_fd = m->arena_ro_fd[0] = m->arena_ro_fd[1] = -1;
	if (m->n_experts > ROUTE_MAX_EXPERTS || m->words > 64)
		return moe_error_set(err, -EINVAL, "%s: %u experts per layer is more than moetierd serves (%u)", path,
				     m->n_experts, ROUTE_MAX_EXPERTS);
	m->dirty = calloc(m->n_layers / 64 + 1, sizeof(*m->dirty));
	if (!m->dirty)
		return moe_error_set(err, -ENOMEM, "out of memory");
	pthread_mutex_init(&m->refresh_lock, NULL);
	m->refresh_lock_ok = true;
	/* DeepSeek-V3's selection bias: one per layer, loaded once. */
	if (mc->has_score_bias) {
		m->score_bias = calloc((size_t)m->n_layers * m->n_experts, sizeof(float));
		if (!m->score_bias)
			return moe_error_set(err, -ENOMEM, "out of memory");
		for (uint32_t l = 0; l < m->n_layers; l++) {
			const struct pack_tensor_entry *t = pack_find_role(m->pack, PACK_ROLE_SCORE_BIAS, moe_model_layer_of(mc, l));
			if (t && t->dtype == MOE_DTYPE_F32 && t->bytes == m->n_experts * sizeof(float) &&
			    (rc = pack_read_tensor(m->pack, t, m->score_bias + (size_t)l * m->n_experts, err)))
				return rc;
		}
	}
	/* The move-or-compute cost model: host rates measured here (unless
	 * turned off), link rates from the options; no GPU tier, no move. */
	struct compute_opts co = { .threads = 1, .kernel_threads = 1, .calibrate = s->cfg->compute_calibrate,
				   .nvme_to_host_Bps = (double)s->cfg->link_nvme_mbps * 1e6,
				   .host_to_gpu_Bps = s->cfg->gpu_bytes ? (double)s->cfg->link_h2g_mbps * 1e6 : 0.0 };
	struct moe_error cerr;
	if (latent) {
		/* the engine takes the basis, and without it the pack cannot be
		 * computed by anyone the daemon serves: refuse it */
		struct latent_basis *basis;
		if ((rc = latent_basis_load(m->pack, &basis, err)))
			return moe_error_prefix(err, rc, "%s: MoLAE latent pack", path);
		if ((rc = compute_create_latent(mc, m->pack->hdr->parts, m->pack->hdr->n_parts, pack_extent_bytes(m->pack),
						basis, &co, &m->compute, err)))
			return moe_error_prefix(err, rc, "%s: MoLAE latent pack", path);
	} else if (compute_create(mc, m->pack->hdr->parts, m->pack->hdr->n_parts, pack_extent_bytes(m->pack), &co,
				  &m->compute, &cerr)) {
		moe_info("model %s: COMPUTE not offered: %s", m->name, cerr.msg);
		m->compute = NULL;
	}
	route_params_from_model(&m->rp, mc, NULL);
	if ((rc = route_params_check(&m->rp, err)))
		return moe_error_prefix(err, rc, "%s: routing", path);
	struct cache_config cc = {
		.host_bytes = s->cfg->host_bytes,
		.gpu_bytes = s->cfg->gpu_bytes,
		.gpu_backend = s->cfg->gpu_backend,
		.gpu_device = s->cfg->gpu_device,
		.queue_depth = s->cfg->queue_depth,
		.io_nice = s->cfg->io_thread_nice,
		.numa_node = s->cfg->numa_node,
		.mlock_required = s->cfg->mlock_required,
		.huge_pages = s->cfg->huge_pages,
		.no_uring = s->cfg->no_uring,
		.policy = s->cfg->policy,
		.layer_slots = s->cfg->layer_slots,
		.max_clients = s->max_clients + 1,
		.on_ready = on_ready,
		.on_ready_ctx = m,
	};
	const struct latent_basis *lb = latent ? compute_latent_basis(m->compute) : NULL;
	void *image = NULL;
	struct moe_error gerr = { "" };
	if (lb) {
		if ((rc = latent_gpu_image(m, lb, s->cfg->gpu_bytes != 0, &image, err)))
			return rc;
		cc.gpu_resident = image;
		cc.gpu_resident_bytes = m->latent.bytes;
		cc.gpu_resident_err = &gerr;
	}
	rc = cache_create(m->pack, &cc, &m->cache, err);
	free(image);
	if (rc)
		return moe_error_prefix(err, rc, "%s", path);
	if (lb) {
		char sz[32];
		moe_fmt_size(m->latent.bytes, sz, sizeof(sz));
		if (cache_gpu_resident(m->cache, &m->latent.gpu_offset, &m->latent.gpu_reserved) == 0) {
			m->latent.on_gpu = true;
			moe_info("model %s: MoLAE latent experts, rank %u, %u group(s) per layer, B %s resident in the GPU "
				 "tier at offset %" PRIu64 " (and on the host for COMPUTE)", m->name, lb->r, lb->max_groups, sz,
				 m->latent.gpu_offset);
		} else if (s->cfg->gpu_bytes) {
			snprintf(m->latent.why, sizeof(m->latent.why), "%s", gerr.msg[0] ? gerr.msg : "not placed");
			moe_warn("model %s: MoLAE B (%s) stays on the host, not in the GPU tier: %s", m->name, sz,
				 m->latent.why);
		} else {
			moe_info("model %s: MoLAE latent experts, rank %u, %u group(s) per layer, B %s resident on the host",
				 m->name, lb->r, lb->max_groups, sz);
		}
	}
	m->top_k = mc->top_k;
	m->plc = (struct placement_config){ .predictor = s->cfg->predictor, .prefetch = s->cfg->prefetch,
					    .lookahead = s->cfg->prefetch_lookahead, .min_score = -1, .gain = -1,
					    .link_bw = (double)s->cfg->link_nvme_mbps * 1e6,
					    .deadline = s->cfg->prefetch_deadline,
					    .gpu = strcmp(s->cfg->prefetch_tier, "gpu") == 0 };
	if (strcmp(s->cfg->prefetch_tier, "host") && strcmp(s->cfg->prefetch_tier, "gpu"))
		return moe_error_set(err, -EINVAL, "prefetch-tier must be host or gpu, not '%s'", s->cfg->prefetch_tier);
	if (m->plc.gpu)
		m->plc.link_bw = (double)s->cfg->link_h2g_mbps * 1e6;
	if (placement_enabled(&m->plc)) {
		const struct predict_ops *po = predict_find(m->plc.predictor);
		if (!po)
			return moe_error_set(err, -EINVAL, "unknown predictor '%s'", m->plc.predictor);
		if (s->cfg->predictor_model[0]) {
			if ((rc = predict_model_load(s->cfg->predictor_model, &m->pmodel, err)))
				return moe_error_prefix(err, rc, "predictor-model");
			m->plc.model = m->pmodel;
		} else if (po->needs_model) {
			return moe_error_set(err, -EINVAL, "predictor '%s' needs a predictor-model file (moe-sim train)",
					     m->plc.predictor);
		}
		/* Shape errors (model file vs pack) show up here, not per client. */
		struct placement *probe;
		if ((rc = placement_create(m->cache, m->n_layers, m->n_experts, m->top_k, m->pack->hdr->extent_payload,
					   &m->plc, &probe, err)))
			return moe_error_prefix(err, rc, "%s", path);
		placement_destroy(probe);
		moe_info("model %s: predictor %s, prefetch %s, look-ahead %s", m->name, m->plc.predictor,
			 m->plc.prefetch ? "on" : "off", m->plc.lookahead ? "fixed" : "adaptive");
	}
	for (unsigned t = 0; t < 2; t++) {
		if (cache_arena(m->cache, (enum cache_tier)t, &m->arena[t]) < 0)
			memset(&m->arena[t], 0, sizeof(m->arena[t]));
		if (m->arena[t].n_slots && m->arena[t].fd >= 0) {
			/* Clients get a read-only description: they can map it
			 * PROT_READ only, whatever the seals. */
			fcntl(m->arena[t].fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW);
			m->arena_ro_fd[t] = reopen_ro(m->arena[t].fd);
		}
	}
	if ((rc = make_shared(m, err)))
		return rc;
	m->shared_ro_fd = reopen_ro(m->shared_fd);
	if (m->shared_ro_fd < 0)
		return moe_error_set(err, -errno, "reopen shared state: %s", strerror(errno));
	server_model_refresh(m, true);
	moe_info("model %s: %u MoE layers x %u experts, %s per expert, host arena %u slots, GPU arena %u slots", m->name,
		 m->n_layers, m->n_experts, moe_fmt_size(m->pack->hdr->extent_payload, (char[32]){ 0 }, 32),
		 m->arena[1].n_slots, m->arena[0].n_slots);
	return 0;
}

void server_model_close(struct served_model *m)
{
	if (m->compute)
		compute_destroy(m->compute);
	if (m->cache)
		cache_destroy(m->cache);
	if (m->pack)
		pack_close(m->pack);
	if (m->shared)
		munmap(m->shared, m->shared_bytes);
	for (int i = 0; i < 2; i++)
		if (m->arena_ro_fd[i] >= 0)
			close(m->arena_ro_fd[i]);
	if (m->shared_fd >= 0)
		close(m->shared_fd);
	if (m->shared_ro_fd >= 0)
		close(m->shared_ro_fd);
	free(m->score_bias);
	free(m->latent.layer_off);
	m->latent.layer_off = NULL;
	free(m->dirty);
	if (m->refresh_lock_ok)
		pthread_mutex_destroy(&m->refresh_lock);
	m->refresh_lock_ok = false;
	predict_model_free(m->pmodel);
}
