/* server_admin.c - admin and advisory requests: STATS and CLIENTS (and
 * their rendering), CONFIG_GET/SET, PIN/UNPIN/EVICT, GPU_EXPORT, ADVISE. */
#include "config.h"
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "compute.h"
#include "priv.h"
#include "server_impl.h"
#include "stats.h"
#include "tier_gpu.h"

static const char *const counter_names[] = {
#define X(id, help) #id,
	SERVER_COUNTERS(X)
#undef X
};

/* What a failed PIN / UNPIN / EVICT means, in the operator's words
 * (cache.c's errnos alone read as "No such file or directory"). */
static const char *admin_why(uint32_t type, int rc, uint32_t tier, const struct served_model *m)
{
	static __thread char buf[128];
	const char *t = tier == CACHE_TIER_GPU ? "GPU" : "host";

	if (rc == -EINVAL)
		snprintf(buf, sizeof(buf), "no such expert or tier (layers < %u, experts < %u, tier host or gpu)",
			 m->n_layers, m->n_experts);
	else if (rc == -ENODEV)
		snprintf(buf, sizeof(buf), "this daemon has no GPU tier");
	else if (type == MOET_MSG_UNPIN && rc == -ENOENT)
		snprintf(buf, sizeof(buf), "not pinned on the %s tier", t);
	else if (type == MOET_MSG_EVICT && rc == -ENOENT)
		snprintf(buf, sizeof(buf), "not resident on the %s tier", t);
	else if (type == MOET_MSG_EVICT && rc == -EBUSY)
		snprintf(buf, sizeof(buf), "leased or pinned on the %s tier: not evicted", t);
	else
		snprintf(buf, sizeof(buf), "%s", strerror(-rc));
	return buf;
}

static char *render_clients(struct server *s)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);
	if (!f)
		return NULL;
	fprintf(f, "%-6s %-8s %-6s %-6s %-16s %-16s %-7s %s\n", "id", "pid", "uid", "gid", "name", "model", "leases", "ops");
	pthread_mutex_lock(&s->lock);
	for (unsigned i = 0; i < s->max_clients; i++) {
		struct srv_client *c = s->clients[i];
		if (!c || !c->hello_done || atomic_load(&c->state) != CL_ACTIVE)
			continue;
		fprintf(f, "%-6u %-8d %-6u %-6u %-16s %-16s %-7u %" PRIu64 "\n", c->id, (int)c->pid, (unsigned)c->uid,
			(unsigned)c->gid, c->name[0] ? c->name : "-", c->m ? c->m->name : "-", c->n_leases_used,
			atomic_load(&c->ops));
	}
	pthread_mutex_unlock(&s->lock);
	fclose(f);
	return buf;
}

/* What the kernel sees (daemon/bpf.c): programs' states, block-layer
 * latency, arena faults, run-queue waits. */
static void render_bpf(struct server *s, FILE *f, json_t *root, uint32_t fmt)
{
	struct bpf_obs_snapshot snap;
	char *r;

	if (bpf_obs_read(s->bpf, &snap) < 0)
		return;
	r = fmt == MOET_STATS_JSON ? bpf_obs_render_json(s->bpf, &snap)
	    : fmt == MOET_STATS_PROMETHEUS ? bpf_obs_render_prometheus(s->bpf, &snap)
					   : bpf_obs_render_text(s->bpf, &snap);
	if (!r)
		return;
	if (fmt == MOET_STATS_JSON) {
		json_error_t je;
		json_t *j = json_loads(r, 0, &je);
		if (j)
			json_object_set_new(root, "bpf", j);
	} else if (fmt == MOET_STATS_TEXT) {
		fprintf(f, "\nkernel view (eBPF)\n");
		for (char *line = strtok(r, "\n"); line; line = strtok(NULL, "\n"))
			fprintf(f, "  %s\n", line);
	} else {
		fputs(r, f);
	}
	free(r);
}

/* Where a MoLAE pack's B is (tier and bytes) and what the GPU tier keeps
 * for experts: the B image takes arena bytes, the slots are what is left. */
static void render_latent(const struct served_model *m, FILE *f, json_t *jm, uint32_t fmt, bool first)
{
	const struct latent_basis *b = compute_latent_basis(m->compute);
	if (!b)
		return;
	const struct served_latent *L = &m->latent;
	const char *tier = L->on_gpu ? "gpu" : "host";
	const uint32_t gslots = m->arena[CACHE_TIER_GPU].n_slots;
	if (fmt == MOET_STATS_TEXT) {
		fprintf(f, "latent basis (MoLAE B): %s tier, %" PRIu64 " bytes", tier, L->bytes);
		if (L->on_gpu)
			fprintf(f, " at GPU offset %" PRIu64 " (%" PRIu64 " arena bytes reserved), GPU arena %u expert slots",
				L->gpu_offset, L->gpu_reserved, gslots);
		else if (L->why[0])
			fprintf(f, " (not in the GPU tier: %s; GPU arena %u expert slots)", L->why, gslots);
		fputc('\n', f);
		fprintf(f, "  latent_b_tier                      %s\n", tier);
		fprintf(f, "  latent_b_gpu_bytes                 %" PRIu64 "\n", L->on_gpu ? L->bytes : 0);
		fprintf(f, "  latent_b_gpu_reserved_bytes        %" PRIu64 "\n", L->on_gpu ? L->gpu_reserved : 0);
		fprintf(f, "  latent_b_gpu_offset                %" PRIu64 "\n", L->on_gpu ? L->gpu_offset : 0);
		fprintf(f, "  latent_gpu_expert_slots            %u\n", gslots);
	} else if (jm) {
		json_t *j = json_pack("{s:s, s:I, s:I, s:I, s:I, s:i}", "tier", tier, "bytes", (json_int_t)L->bytes,
				      "gpu_bytes", (json_int_t)(L->on_gpu ? L->bytes : 0), "gpu_reserved_bytes",
				      (json_int_t)(L->on_gpu ? L->gpu_reserved : 0), "gpu_offset",
				      (json_int_t)(L->on_gpu ? L->gpu_offset : 0), "gpu_expert_slots", (int)gslots);
		if (j && L->why[0])
			json_object_set_new(j, "why_not_gpu", json_string(L->why));
		if (j)
			json_object_set_new(jm, "latent_basis", j);
	} else if (first) {
		fprintf(f, "# HELP moetier_latent_b_bytes MoLAE B matrices by tier (host: COMPUTE's copy only)\n"
			   "# TYPE moetier_latent_b_bytes gauge\n"
			   "moetier_latent_b_bytes{tier=\"gpu\"} %" PRIu64 "\nmoetier_latent_b_bytes{tier=\"host\"} %" PRIu64 "\n"
			   "# HELP moetier_latent_b_gpu_reserved_bytes GPU arena bytes the B matrices take from the expert slots\n"
			   "# TYPE moetier_latent_b_gpu_reserved_bytes gauge\nmoetier_latent_b_gpu_reserved_bytes %" PRIu64 "\n",
			L->on_gpu ? L->bytes : 0, L->bytes, L->on_gpu ? L->gpu_reserved : 0);
	}
}

static char *render_stats(struct server *s, uint32_t fmt, bool per_expert)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);
	if (!f)
		return NULL;
	json_t *root = fmt == MOET_STATS_JSON ? json_object() : NULL;
	json_t *srv = root ? json_object() : NULL;
	if (fmt == MOET_STATS_TEXT)
		fprintf(f, "moetierd %s, up %.1f s, protocol %u\n", PACKAGE_VERSION,
			(double)(moe_now_ns() - s->start_ns) / 1e9, MOET_PROTO_VERSION);
	for (unsigned i = 0; i < SERVER__COUNT; i++) {
		uint64_t v = server_counter(s, (enum server_counter)i);
		if (fmt == MOET_STATS_TEXT)
			fprintf(f, "  server_%-26s %" PRIu64 "\n", counter_names[i], v);
		else if (fmt == MOET_STATS_JSON)
			json_object_set_new(srv, counter_names[i], json_integer((json_int_t)v));
		else
			fprintf(f, "# TYPE moetier_server_%s_total counter\nmoetier_server_%s_total %" PRIu64 "\n",
				counter_names[i], counter_names[i], v);
	}
	if (root) {
		json_object_set_new(root, "server", srv);
		json_object_set_new(root, "models", json_object());
	}
	render_bpf(s, f, root, fmt);
	for (unsigned i = 0; i < s->n_models; i++) {
		struct served_model *m = &s->models[i];
		struct stats_snapshot snap;
		if (stats_snapshot(cache_stats(m->cache), &snap))
			continue;
		char *r = fmt == MOET_STATS_JSON ? stats_render_json(&snap, true)
			: fmt == MOET_STATS_PROMETHEUS ? stats_render_prometheus(&snap, per_expert && i == 0)
						       : stats_render_text(&snap, false);
		stats_snapshot_free(&snap);
		if (!r)
			continue;
		struct cache_bad_expert bad[16];
		size_t nbad = cache_bad_experts(m->cache, bad, 16);
		if (fmt == MOET_STATS_TEXT) {
			fprintf(f, "\nmodel %s (%s engine)\n%s", m->name, cache_io_engine(m->cache), r);
			compute_render(m->compute, f, NULL, fmt, true);
			render_latent(m, f, NULL, fmt, true);
			if (nbad)
				fprintf(f, "bad experts: %zu (answered their error, re-read with backoff)\n", nbad);
			for (size_t b = 0; b < MOE_MIN(nbad, 16u); b++)
				fprintf(f, "  layer %u expert %u: %s, %u failed loads, %" PRIu64 " acquires refused, re-read in %" PRIu64 " ms\n",
					bad[b].layer, bad[b].expert, bad[b].err == -EBADMSG ? "EBADMSG (checksum)" : strerror(-bad[b].err),
					bad[b].fails, bad[b].refused, bad[b].recheck_ms);
		} else if (fmt == MOET_STATS_JSON) {
			json_error_t je;
			json_t *j = json_loads(r, 0, &je);
			if (j) {
				if (json_is_object(j)) {
					compute_render(m->compute, f, j, fmt, true);
					render_latent(m, f, j, fmt, true);
				}
				if (json_is_object(j)) {
					/* Per bad expert (the first 16): error, failed loads, refusals. */
					json_t *a = json_array();
					for (size_t b = 0; b < MOE_MIN(nbad, 16u); b++)
						json_array_append_new(a, json_pack("{s:i, s:i, s:s, s:i, s:I, s:I}", "layer",
							(int)bad[b].layer, "expert", (int)bad[b].expert, "error",
							bad[b].err == -EBADMSG ? "EBADMSG" : bad[b].err == -EIO ? "EIO" : strerror(-bad[b].err),
							"failed_loads", (int)bad[b].fails, "refused", (json_int_t)bad[b].refused,
							"recheck_ms", (json_int_t)bad[b].recheck_ms));
					json_object_set_new(j, "bad_experts", a);
					json_object_set_new(j, "bad_expert_count", json_integer((json_int_t)nbad));
				}
				json_object_set_new(json_object_get(root, "models"), m->name, j);
			}
		} else if (i == 0) {
			/* One model per exposition: metric names carry no model label. */
			fputs(r, f);
			compute_render(m->compute, f, NULL, fmt, true);
			render_latent(m, f, NULL, fmt, true);
		}
		free(r);
	}
	if (root) {
		char *j = json_dumps(root, JSON_INDENT(2) | JSON_SORT_KEYS);
		if (j) {
			fprintf(f, "%s\n", j);
			free(j);
		}
		json_decref(root);
	}
	fclose(f);
	return buf;
}


/* Move or compute, per expert, from where it is now and the cost model. */
void server_admin_advise(struct server *s, struct srv_client *c, const struct moet_msg *h, const uint8_t *payload)
{
	struct moet_advise_req q;
	struct moet_advise_reply r;
	if (!c->m || h->len != sizeof(q)) {
		server_cnt(s, SERVER_bad_messages);
		server_conn_error(s, c, h->seq, -EPROTO, "ADVISE: expected one %zu-byte request from a model client", sizeof(q));
		return;
	}
	memcpy(&q, payload, sizeof(q));
	struct served_model *m = c->m;
	if (!m->compute) {
		server_conn_error(s, c, h->seq, -EOPNOTSUPP, "ADVISE: no cost model for model %s (COMPUTE not offered)", m->name);
		return;
	}
	if (q.n > MOET_MAX_BATCH || q.layer >= m->n_layers || q.tokens == 0 || q.tokens > (1u << 20)) {
		server_cnt(s, SERVER_bad_messages);
		server_conn_error(s, c, h->seq, -EINVAL, "ADVISE: layer %u (of %u), %u experts (max %u), %u tokens out of range",
			   q.layer, m->n_layers, q.n, MOET_MAX_BATCH, q.tokens);
		return;
	}
	uint64_t gw[64] = { 0 }, hw[64] = { 0 }; /* n_experts <= 4096 */
	if (cache_residency_bitmap(m->cache, CACHE_TIER_GPU, q.layer, gw, 64) < 0)
		memset(gw, 0, sizeof(gw));
	if (cache_residency_bitmap(m->cache, CACHE_TIER_HOST, q.layer, hw, 64) < 0)
		memset(hw, 0, sizeof(hw));
	memset(&r, 0, sizeof(r));
	r.n = q.n;
	for (uint32_t i = 0; i < q.n; i++) {
		uint32_t e = q.ids[i];
		if (e >= m->n_experts) {
			server_cnt(s, SERVER_bad_messages);
			server_conn_error(s, c, h->seq, -EINVAL, "ADVISE: expert %u out of range (%u experts)", e, m->n_experts);
			return;
		}
		bool on_gpu = gw[e / 64] >> (e % 64) & 1, on_host = hw[e / 64] >> (e % 64) & 1;
		struct compute_decision d;
		compute_decide(m->compute, on_gpu ? COMPUTE_TIER_GPU : on_host ? COMPUTE_TIER_HOST : COMPUTE_TIER_NVME,
			       q.tokens, &d);
		r.where[i] = d.where == COMPUTE_ON_HOST ? MOET_WHERE_HOST : MOET_WHERE_MOVE;
		r.tier[i] = on_gpu ? 0 : on_host ? 1 : 2;
		r.host_us[i] = (float)(d.host_s * 1e6);
		r.move_us[i] = (float)(d.move_s * 1e6);
	}
	server_conn_send(c->fd, MOET_MSG_OK, h->seq, 0, 0, &r, sizeof(r), NULL, 0);
}
/* Where one (layer, group)'s B matrices are: the GPU tier (offset in the
 * exported region) or the host (the client reads them from the pack). */
void server_admin_latent_basis(struct server *s, struct srv_client *c, const struct moet_msg *h,
			       const uint8_t *payload)
{
	struct moet_latent_basis_req q;
	struct moet_latent_basis_reply r;
	if (!c->m || h->len != sizeof(q)) {
		server_cnt(s, SERVER_bad_messages);
		server_conn_error(s, c, h->seq, -EPROTO, "LATENT_BASIS: expected one %zu-byte request from a model client",
				  sizeof(q));
		return;
	}
	memcpy(&q, payload, sizeof(q));
	const struct served_model *m = c->m;
	const struct latent_basis *b = compute_latent_basis(m->compute);
	if (q.reserved[0] || q.reserved[1]) {
		server_cnt(s, SERVER_bad_messages);
		server_conn_error(s, c, h->seq, -EINVAL, "LATENT_BASIS: reserved fields must be zero");
		return;
	}
	if (!b || !m->latent.layer_off) {
		server_conn_error(s, c, h->seq, -ENOENT, "LATENT_BASIS: model %s is not a MoLAE latent pack", m->name);
		return;
	}
	if (q.layer >= b->n_layers || q.group >= b->n_groups[q.layer]) {
		server_conn_error(s, c, h->seq, -ERANGE, "LATENT_BASIS: layer %u group %u out of range (%u layers, %u groups there)",
				  q.layer, q.group, b->n_layers, q.layer < b->n_layers ? b->n_groups[q.layer] : 0);
		return;
	}
	const uint64_t group_bytes = 2ull * b->r * b->n * sizeof(float);
	memset(&r, 0, sizeof(r));
	r.tier = m->latent.on_gpu ? CACHE_TIER_GPU : CACHE_TIER_HOST;
	r.dtype = MOE_DTYPE_F32;
	r.rows = b->r;
	r.cols = b->n;
	r.offset = m->latent.on_gpu ? m->latent.gpu_offset + m->latent.layer_off[q.layer] + q.group * group_bytes : 0;
	r.bytes = group_bytes;
	r.n_groups = b->n_groups[q.layer];
	server_conn_send(c->fd, MOET_MSG_OK, h->seq, 0, 0, &r, sizeof(r), NULL, 0);
}

/* Hands a data-plane client the GPU arena's handles, a batch at a time. */
void server_admin_gpu_export(struct server *s, struct srv_client *c, const struct moet_msg *h)
{
	struct tier_gpu_export e;
	struct moe_error err = { { 0 } };
	if (!c->region || !c->m) {
		server_cnt(s, SERVER_bad_messages);
		server_conn_error(s, c, h->seq, -EPROTO, "GPU_EXPORT needs a data-plane client");
		return;
	}
	int rc = cache_gpu_export(c->m->cache, &e, &err);
	if (rc < 0) {
		server_conn_error(s, c, h->seq, rc, "GPU export: %s", err.msg);
		return;
	}
	/* Only the chunks that exist travel (a VMM slot that never held an
	 * expert has none: fd -1, which SCM_RIGHTS refuses with EBADF, and the
	 * whole reply with it); each keeps its offset, so a client maps what
	 * it gets where it belongs. Each fd stays in e once, for the free. */
	uint32_t nv = 0;
	for (uint32_t i = 0; i < e.nfds; i++)
		if (e.fds[i] >= 0) {
			e.fds[nv] = e.fds[i];
			e.offsets[nv] = e.offsets[i];
			if (nv != i)
				e.fds[i] = -1;
			nv++;
		}
	if (h->arg > nv) {
		server_cnt(s, SERVER_bad_messages);
		server_conn_error(s, c, h->seq, -EINVAL, "GPU_EXPORT: first handle %u past the %u there are", h->arg, nv);
		tier_gpu_export_free(&e);
		return;
	}
	struct {
		struct moet_gpu_export x;
		uint64_t offsets[MOET_GPU_EXPORT_BATCH];
	} r;
	memset(&r, 0, sizeof(r));
	unsigned n = nv - h->arg;
	if (n > MOET_GPU_EXPORT_BATCH)
		n = MOET_GPU_EXPORT_BATCH;
	r.x.backend = e.backend == TIER_GPU_EMULATED ? MOET_GPU_EMULATED
		      : e.backend == TIER_GPU_VMM    ? MOET_GPU_VMM
		      : e.backend == TIER_GPU_UVM    ? MOET_GPU_UVM
						     : MOET_GPU_NONE;
	r.x.device = e.device;
	r.x.generation = e.generation;
	r.x.slot_stride = e.slot_stride;
	r.x.chunk_bytes = e.chunk_bytes;
	r.x.total = nv;
	r.x.first = h->arg;
	r.x.n = n;
	for (unsigned i = 0; i < n; i++)
		r.offsets[i] = e.offsets[h->arg + i];
	rc = server_conn_send(c->fd, MOET_MSG_OK, h->seq, 0, 0, &r, (uint32_t)(sizeof(r.x) + n * sizeof(uint64_t)),
		      n ? e.fds + h->arg : NULL, n);
	if (rc < 0)
		moe_debug("client %u: GPU export reply: %s", c->id, strerror(-rc));
	tier_gpu_export_free(&e);
}
void server_admin_request(struct server *s, struct srv_client *c, const struct moet_msg *h, const uint8_t *payload)
{
	char text[1024];
	int rc;
	bool needs_admin = h->type != MOET_MSG_CONFIG_GET;
	if (needs_admin && !c->admin) {
		server_conn_error(s, c, h->seq, -EPERM, "uid %u may not send admin requests", (unsigned)c->uid);
		return;
	}
	server_cnt(s, SERVER_admin_requests);
	switch (h->type) {
	case MOET_MSG_STATS:
	case MOET_MSG_CLIENTS: {
		const uint32_t fmt = h->arg & MOET_STATS_FORMAT_MASK;
		if (h->type == MOET_MSG_STATS &&
		    (fmt > MOET_STATS_PROMETHEUS || (h->arg & ~(uint32_t)(MOET_STATS_FORMAT_MASK | MOET_STATS_PER_EXPERT)))) {
			server_conn_error(s, c, h->seq, -EINVAL, "unknown stats format %#x", h->arg);
			return;
		}
		char *t = h->type == MOET_MSG_STATS ? render_stats(s, fmt, (h->arg & MOET_STATS_PER_EXPERT) != 0)
						    : render_clients(s);
		if (!t) {
			server_conn_error(s, c, h->seq, -ENOMEM, "out of memory");
			return;
		}
		rc = server_conn_text(c, h->seq, t);
		free(t);
		if (rc)
			moe_warn("client %u: reply: %s", c->id, strerror(-rc));
		return;
	}
	case MOET_MSG_CONFIG_GET: {
		if (h->len >= 128 || (h->len && payload[h->len - 1] != '\0')) {
			server_conn_error(s, c, h->seq, -EINVAL, "CONFIG_GET: option name must be NUL-terminated");
			return;
		}
		const char *name = h->len ? (const char *)payload : "";
		size_t n;
		const struct option_desc *opts = options_table(&n);
		char *buf = NULL;
		size_t len = 0;
		FILE *f = open_memstream(&buf, &len);
		if (!f)
			return;
		bool found = false;
		for (size_t i = 0; i < n; i++) {
			if (*name && strcmp(name, opts[i].name))
				continue;
			options_get(s->cfg, opts[i].name, text, sizeof(text));
			fprintf(f, "%s = %s\n", opts[i].name, text);
			found = true;
		}
		fclose(f);
		if (!found)
			server_conn_error(s, c, h->seq, -ENOENT, "unknown option '%s'", name);
		else
			server_conn_text(c, h->seq, buf);
		free(buf);
		return;
	}
	case MOET_MSG_CONFIG_SET: {
		if (h->len == 0 || h->len >= sizeof(text) || payload[h->len - 1] != '\0') {
			server_conn_error(s, c, h->seq, -EINVAL, "CONFIG_SET: expected a NUL-terminated 'name=value'");
			return;
		}
		memcpy(text, payload, h->len);
		char *eq = strchr(text, '=');
		if (!eq) {
			server_conn_error(s, c, h->seq, -EINVAL, "CONFIG_SET: expected 'name=value'");
			return;
		}
		*eq = '\0';
#ifdef MOETIER_FAULT_INJECTION
		/* Debug builds: "misbehave=PROBE" attempts a forbidden syscall, so
		 * a test can see the seccomp filter kill the daemon (memcached's
		 * misbehave). Not an option: no table entry, no config file. */
		if (!strcmp(text, "misbehave")) {
			struct moe_error merr = { "" };
			moe_warn("misbehave: uid %u asks for a forbidden syscall (%s)", (unsigned)c->uid, eq + 1);
			rc = priv_misbehave(eq + 1, &merr);
			server_conn_error(s, c, h->seq, rc, "%s", merr.msg);
			return;
		}
#endif
		const struct option_desc *o = options_find(text);
		if (!o) {
			server_conn_error(s, c, h->seq, -ENOENT, "unknown option '%s'", text);
			return;
		}
		if (!o->runtime) {
			server_conn_error(s, c, h->seq, -EPERM, "%s can only be changed by restarting moetierd", text);
			return;
		}
		struct moetierd_config tmp;
		struct moe_error err;
		options_init(&tmp);
		rc = options_set(&tmp, text, eq + 1, &err);
		options_free(&tmp);
		if (rc) {
			server_conn_error(s, c, h->seq, rc, "%s", err.msg);
			return;
		}
		/* Validated on a scratch copy; now apply (numbers are word-sized
		 * stores the ring thread reads racily but atomically enough). */
		options_set(s->cfg, text, eq + 1, &err);
		if (!strcmp(text, "log-level")) {
			const char *v = eq + 1;
			moe_log_set_level(!strcmp(v, "err") ? MOE_LOG_ERR : !strcmp(v, "warn") ? MOE_LOG_WARN
					  : !strcmp(v, "debug") ? MOE_LOG_DEBUG : MOE_LOG_INFO);
		}
		moe_info("config set by uid %u: %s = %s", (unsigned)c->uid, text, eq + 1);
		server_conn_send(c->fd, MOET_MSG_OK, h->seq, 0, 0, NULL, 0, NULL, 0);
		return;
	}
	case MOET_MSG_PIN:
	case MOET_MSG_UNPIN:
	case MOET_MSG_EVICT: {
		struct moet_expert_arg a;
		if (h->len != sizeof(a)) {
			server_conn_error(s, c, h->seq, -EPROTO, "expected %zu bytes of expert argument", sizeof(a));
			return;
		}
		memcpy(&a, payload, sizeof(a));
		struct served_model *m = c->m;
		if (a.layer >= m->n_layers || a.expert >= m->n_experts || a.tier > CACHE_TIER_HOST) {
			server_conn_error(s, c, h->seq, -ERANGE, "layer %u expert %u tier %u is out of range (%u layers, %u experts)",
				   a.layer, a.expert, a.tier, m->n_layers, m->n_experts);
			return;
		}
		struct cache_key k = { a.layer, a.expert };
		rc = h->type == MOET_MSG_PIN ? cache_pin(m->cache, k, (enum cache_tier)a.tier)
		   : h->type == MOET_MSG_UNPIN ? cache_unpin(m->cache, k, (enum cache_tier)a.tier)
					       : cache_evict(m->cache, k, (enum cache_tier)a.tier);
		/* publish before answering: after OK, moet_resident shows it */
		atomic_fetch_or(&m->dirty[a.layer / 64], 1ull << (a.layer % 64));
		server_model_refresh(m, false);
		if (rc < 0)
			server_conn_error(s, c, h->seq, rc, "layer %u expert %u: %s", a.layer, a.expert,
					  admin_why(h->type, rc, a.tier, m));
		else
			server_conn_send(c->fd, MOET_MSG_OK, h->seq, 0, 0, NULL, 0, NULL, 0);
		return;
	}
	}
}
