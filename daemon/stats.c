/* stats.c - counters, gauges, histograms and their renderers (see stats.h). */
#define _GNU_SOURCE
#include "stats.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const counter_names[STAT__COUNT] = {
#define X(id, help) [STAT_##id] = #id,
	MOE_COUNTERS(X)
#undef X
};
static const char *const counter_help[STAT__COUNT] = {
#define X(id, help) [STAT_##id] = help,
	MOE_COUNTERS(X)
#undef X
};
static const char *const gauge_names[GAUGE__COUNT] = {
#define X(id, help) [GAUGE_##id] = #id,
	MOE_GAUGES(X)
#undef X
};
static const char *const gauge_help[GAUGE__COUNT] = {
#define X(id, help) [GAUGE_##id] = help,
	MOE_GAUGES(X)
#undef X
};
static const char *const hist_names[HIST__COUNT] = {
#define X(id, help) [HIST_##id] = #id,
	MOE_HISTOGRAMS(X)
#undef X
};
static const char *const hist_help[HIST__COUNT] = {
#define X(id, help) [HIST_##id] = help,
	MOE_HISTOGRAMS(X)
#undef X
};
static const char *const expert_names[STAT_EXPERT__COUNT] = { "hits", "misses", "loads", "bytes" };

const char *stats_counter_name(enum stat_counter id) { return (unsigned)id < STAT__COUNT ? counter_names[id] : "?"; }
const char *stats_counter_help(enum stat_counter id) { return (unsigned)id < STAT__COUNT ? counter_help[id] : "?"; }
const char *stats_gauge_name(enum stat_gauge id) { return (unsigned)id < GAUGE__COUNT ? gauge_names[id] : "?"; }
const char *stats_hist_name(enum stat_hist id) { return (unsigned)id < HIST__COUNT ? hist_names[id] : "?"; }

struct stats *stats_new(uint32_t n_layers, uint32_t n_experts)
{
	struct stats *s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	uint64_t n;
	if (n_layers && n_experts) {
		if (!moe_mul_u64((uint64_t)n_layers * n_experts, STAT_EXPERT__COUNT, &n) || n > (1ull << 28)) {
			free(s);
			return NULL;
		}
		s->expert = calloc(n, sizeof(*s->expert));
		if (!s->expert) {
			free(s);
			return NULL;
		}
		s->n_layers = n_layers;
		s->n_experts = n_experts;
	}
	return s;
}

void stats_free(struct stats *s)
{
	if (!s)
		return;
	free(s->expert);
	free(s);
}

unsigned stats_hist_bucket(uint64_t ns)
{
	if (ns == 0)
		return 0;
	unsigned b = 64u - (unsigned)__builtin_clzll(ns); /* ns in [2^(b-1), 2^b) */
	return b < STATS_HIST_BUCKETS ? b : STATS_HIST_BUCKETS - 1;
}

void stats_hist_add(struct stats *s, enum stat_hist id, uint64_t ns)
{
	if (!s || (unsigned)id >= HIST__COUNT)
		return;
	atomic_fetch_add_explicit(&s->hist[id][stats_hist_bucket(ns)], 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&s->hist_sum[id], ns, memory_order_relaxed);
}

void stats_expert_add(struct stats *s, uint32_t layer, uint32_t expert, enum stat_expert what, uint64_t v)
{
	if (!s || !s->expert || layer >= s->n_layers || expert >= s->n_experts || (unsigned)what >= STAT_EXPERT__COUNT)
		return;
	size_t i = ((size_t)layer * s->n_experts + expert) * STAT_EXPERT__COUNT + what;
	atomic_fetch_add_explicit(&s->expert[i], v, memory_order_relaxed);
}

uint64_t stats_expert_get(const struct stats *s, uint32_t layer, uint32_t expert, enum stat_expert what)
{
	if (!s || !s->expert || layer >= s->n_layers || expert >= s->n_experts || (unsigned)what >= STAT_EXPERT__COUNT)
		return 0;
	size_t i = ((size_t)layer * s->n_experts + expert) * STAT_EXPERT__COUNT + what;
	return atomic_load_explicit(&s->expert[i], memory_order_relaxed);
}

void stats_set_info(struct stats *s, const char *key, const char *fmt, ...)
{
	if (!s || !key)
		return;
	unsigned i;
	for (i = 0; i < s->n_info; i++)
		if (strcmp(s->info_key[i], key) == 0)
			break;
	if (i == s->n_info) {
		if (s->n_info == STATS_INFO_MAX)
			return;
		s->n_info++;
		snprintf(s->info_key[i], sizeof(s->info_key[i]), "%s", key);
	}
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(s->info_val[i], sizeof(s->info_val[i]), fmt, ap);
	va_end(ap);
}

int stats_snapshot(const struct stats *cs, struct stats_snapshot *out)
{
	struct stats *s = (struct stats *)cs;
	memset(out, 0, sizeof(*out));
	for (int i = 0; i < STAT__COUNT; i++)
		out->counters[i] = atomic_load_explicit(&s->counters[i], memory_order_relaxed);
	for (int i = 0; i < GAUGE__COUNT; i++)
		out->gauges[i] = atomic_load_explicit(&s->gauges[i], memory_order_relaxed);
	for (int h = 0; h < HIST__COUNT; h++) {
		for (int b = 0; b < STATS_HIST_BUCKETS; b++)
			out->hist[h][b] = atomic_load_explicit(&s->hist[h][b], memory_order_relaxed);
		out->hist_sum[h] = atomic_load_explicit(&s->hist_sum[h], memory_order_relaxed);
	}
	if (s->expert) {
		size_t n = (size_t)s->n_layers * s->n_experts * STAT_EXPERT__COUNT;
		out->expert = malloc(n * sizeof(uint64_t));
		if (!out->expert)
			return -ENOMEM;
		for (size_t i = 0; i < n; i++)
			out->expert[i] = atomic_load_explicit(&s->expert[i], memory_order_relaxed);
		out->n_layers = s->n_layers;
		out->n_experts = s->n_experts;
	}
	out->n_info = s->n_info;
	memcpy(out->info_key, s->info_key, sizeof(out->info_key));
	memcpy(out->info_val, s->info_val, sizeof(out->info_val));
	return 0;
}

void stats_snapshot_free(struct stats_snapshot *snap)
{
	if (snap) {
		free(snap->expert);
		snap->expert = NULL;
	}
}

static uint64_t bucket_upper(unsigned b)
{
	return b == 0 ? 0 : (b >= 64 ? UINT64_MAX : (1ull << b) - 1);
}

static uint64_t hist_count(const struct stats_snapshot *snap, enum stat_hist id)
{
	uint64_t n = 0;
	for (int b = 0; b < STATS_HIST_BUCKETS; b++)
		n += snap->hist[id][b];
	return n;
}

uint64_t stats_hist_quantile(const struct stats_snapshot *snap, enum stat_hist id, double q)
{
	uint64_t n = hist_count(snap, id);
	if (n == 0)
		return 0;
	if (q < 0)
		q = 0;
	if (q > 1)
		q = 1;
	uint64_t want = (uint64_t)(q * (double)n);
	if (want == 0)
		want = 1;
	uint64_t seen = 0;
	for (unsigned b = 0; b < STATS_HIST_BUCKETS; b++) {
		seen += snap->hist[id][b];
		if (seen >= want)
			return bucket_upper(b);
	}
	return bucket_upper(STATS_HIST_BUCKETS - 1);
}

/* A growable string for the text renderers. */
struct sbuf {
	char *p;
	size_t len, cap;
	bool oom;
};

static void sb_printf(struct sbuf *b, const char *fmt, ...) MOE_PRINTF(2, 3);
static void sb_printf(struct sbuf *b, const char *fmt, ...)
{
	if (b->oom)
		return;
	for (;;) {
		va_list ap;
		va_start(ap, fmt);
		int n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? b->cap - b->len : 0, fmt, ap);
		va_end(ap);
		if (n < 0) {
			b->oom = true;
			return;
		}
		if (b->p && b->len + (size_t)n < b->cap) {
			b->len += (size_t)n;
			return;
		}
		size_t cap = b->cap ? b->cap * 2 : 4096;
		while (cap < b->len + (size_t)n + 1)
			cap *= 2;
		char *np = realloc(b->p, cap);
		if (!np) {
			b->oom = true;
			return;
		}
		b->p = np;
		b->cap = cap;
	}
}

static char *sb_finish(struct sbuf *b)
{
	if (b->oom) {
		free(b->p);
		return NULL;
	}
	if (!b->p)
		return strdup("");
	return b->p;
}

static const uint64_t *expert_row(const struct stats_snapshot *snap, uint32_t l, uint32_t e)
{
	return snap->expert + ((size_t)l * snap->n_experts + e) * STAT_EXPERT__COUNT;
}

char *stats_render_text(const struct stats_snapshot *snap, bool per_expert)
{
	struct sbuf b = { 0 };
	for (unsigned i = 0; i < snap->n_info; i++)
		sb_printf(&b, "%-28s %s\n", snap->info_key[i], snap->info_val[i]);
	for (int i = 0; i < STAT__COUNT; i++)
		sb_printf(&b, "%-28s %llu\n", counter_names[i], (unsigned long long)snap->counters[i]);
	for (int i = 0; i < GAUGE__COUNT; i++)
		sb_printf(&b, "%-28s %lld\n", gauge_names[i], (long long)snap->gauges[i]);
	for (int h = 0; h < HIST__COUNT; h++) {
		uint64_t n = hist_count(snap, h);
		sb_printf(&b, "%-28s n=%llu", hist_names[h], (unsigned long long)n);
		if (n)
			sb_printf(&b, " mean=%.1fus p50<=%.1fus p99<=%.1fus", (double)snap->hist_sum[h] / (double)n / 1e3,
				  (double)stats_hist_quantile(snap, h, 0.5) / 1e3,
				  (double)stats_hist_quantile(snap, h, 0.99) / 1e3);
		sb_printf(&b, "\n");
	}
	if (per_expert && snap->expert) {
		sb_printf(&b, "%6s %6s %10s %10s %10s %14s\n", "layer", "expert", "hits", "misses", "loads", "bytes");
		for (uint32_t l = 0; l < snap->n_layers; l++)
			for (uint32_t e = 0; e < snap->n_experts; e++) {
				const uint64_t *r = expert_row(snap, l, e);
				if (r[0] | r[1] | r[2] | r[3])
					sb_printf(&b, "%6u %6u %10llu %10llu %10llu %14llu\n", l, e,
						  (unsigned long long)r[0], (unsigned long long)r[1],
						  (unsigned long long)r[2], (unsigned long long)r[3]);
			}
	}
	return sb_finish(&b);
}

char *stats_render_json(const struct stats_snapshot *snap, bool per_expert)
{
	/* jansson tolerates NULL arguments, so allocation failures are
	 * collected in `ok` and checked once at the end. */
	json_t *root = json_object();
	if (!root)
		return NULL;
	bool ok = true;
	json_t *info = json_object(), *ctr = json_object(), *gau = json_object(), *hist = json_object();
	ok &= json_object_set_new(root, "info", info) == 0;
	ok &= json_object_set_new(root, "counters", ctr) == 0;
	ok &= json_object_set_new(root, "gauges", gau) == 0;
	ok &= json_object_set_new(root, "histograms", hist) == 0;
	for (unsigned i = 0; ok && i < snap->n_info; i++)
		ok &= json_object_set_new(info, snap->info_key[i], json_string(snap->info_val[i])) == 0;
	for (int i = 0; ok && i < STAT__COUNT; i++)
		ok &= json_object_set_new(ctr, counter_names[i], json_integer((json_int_t)snap->counters[i])) == 0;
	for (int i = 0; ok && i < GAUGE__COUNT; i++)
		ok &= json_object_set_new(gau, gauge_names[i], json_integer((json_int_t)snap->gauges[i])) == 0;
	for (int h = 0; ok && h < HIST__COUNT; h++) {
		json_t *o = json_object(), *bk = json_array();
		ok &= json_object_set_new(hist, hist_names[h], o) == 0;
		ok &= json_object_set_new(o, "log2_buckets", bk) == 0;
		for (int i = 0; ok && i < STATS_HIST_BUCKETS; i++)
			ok &= json_array_append_new(bk, json_integer((json_int_t)snap->hist[h][i])) == 0;
		ok &= json_object_set_new(o, "count", json_integer((json_int_t)hist_count(snap, h))) == 0;
		ok &= json_object_set_new(o, "sum_ns", json_integer((json_int_t)snap->hist_sum[h])) == 0;
	}
	if (ok && per_expert && snap->expert) {
		/* EPLB shape: one [layers][experts] matrix per counter. */
		json_t *ex = json_object();
		ok &= json_object_set_new(root, "experts", ex) == 0;
		ok &= json_object_set_new(ex, "layers", json_integer(snap->n_layers)) == 0;
		ok &= json_object_set_new(ex, "experts", json_integer(snap->n_experts)) == 0;
		for (int w = 0; ok && w < STAT_EXPERT__COUNT; w++) {
			json_t *m = json_array();
			ok &= json_object_set_new(ex, expert_names[w], m) == 0;
			for (uint32_t l = 0; ok && l < snap->n_layers; l++) {
				json_t *row = json_array();
				ok &= json_array_append_new(m, row) == 0;
				for (uint32_t e = 0; ok && e < snap->n_experts; e++)
					ok &= json_array_append_new(row, json_integer((json_int_t)expert_row(snap, l, e)[w])) == 0;
			}
		}
	}
	char *s = ok ? json_dumps(root, JSON_COMPACT) : NULL;
	json_decref(root);
	return s;
}

/* The exposed name of a histogram: moetier_<id> with a trailing _ns
 * replaced by _seconds. */
static void prom_hist_name(char *out, size_t n, const char *id)
{
	size_t l = strlen(id);
	if (l > 3 && !strcmp(id + l - 3, "_ns"))
		snprintf(out, n, "moetier_%.*s_seconds", (int)(l - 3), id);
	else
		snprintf(out, n, "moetier_%s", id);
}

char *stats_render_prometheus(const struct stats_snapshot *snap, bool per_expert)
{
	struct sbuf b = { 0 };
	if (snap->n_info)
		sb_printf(&b, "# HELP moetier_info facts about the daemon (engine in use and why, placement...)\n"
			      "# TYPE moetier_info gauge\n");
	for (unsigned i = 0; i < snap->n_info; i++) {
		/* Label values escape backslash, quote and newline. */
		sb_printf(&b, "moetier_info{key=\"%s\",value=\"", snap->info_key[i]);
		for (const char *p = snap->info_val[i]; *p; p++) {
			if (*p == '\\' || *p == '"')
				sb_printf(&b, "\\%c", *p);
			else if (*p == '\n')
				sb_printf(&b, "\\n");
			else
				sb_printf(&b, "%c", *p);
		}
		sb_printf(&b, "\"} 1\n");
	}
	for (int i = 0; i < STAT__COUNT; i++)
		sb_printf(&b, "# HELP moetier_%s_total %s\n# TYPE moetier_%s_total counter\nmoetier_%s_total %llu\n",
			  counter_names[i], counter_help[i], counter_names[i], counter_names[i],
			  (unsigned long long)snap->counters[i]);
	for (int i = 0; i < GAUGE__COUNT; i++)
		sb_printf(&b, "# HELP moetier_%s %s\n# TYPE moetier_%s gauge\nmoetier_%s %lld\n", gauge_names[i],
			  gauge_help[i], gauge_names[i], gauge_names[i], (long long)snap->gauges[i]);
	for (int h = 0; h < HIST__COUNT; h++) {
		/* Recorded in ns, exposed in seconds as Prometheus wants base
		 * units; the name says so (nvme_read_ns -> nvme_read_seconds). */
		char name[64];
		prom_hist_name(name, sizeof(name), hist_names[h]);
		sb_printf(&b, "# HELP %s %s\n# TYPE %s histogram\n", name, hist_help[h], name);
		/* le = a bucket's upper bound: 2^k ns, in seconds. */
		uint64_t cum = 0;
		for (unsigned k = 0; k + 1 < STATS_HIST_BUCKETS; k++) {
			cum += snap->hist[h][k];
			sb_printf(&b, "%s_bucket{le=\"%.9g\"} %llu\n", name, (double)(1ull << k) / 1e9,
				  (unsigned long long)cum);
		}
		cum += snap->hist[h][STATS_HIST_BUCKETS - 1];
		sb_printf(&b, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.9f\n%s_count %llu\n", name, (unsigned long long)cum,
			  name, (double)snap->hist_sum[h] / 1e9, name, (unsigned long long)cum);
	}
	/* 4 series per (layer, expert), 6,656 for a 26 x 64 model: only when
	 * asked for (moectl stats --prometheus --per-expert). */
	if (per_expert && snap->expert) {
		for (int w = 0; w < STAT_EXPERT__COUNT; w++) {
			sb_printf(&b, "# HELP moetier_expert_%s_total per (layer, expert) %s\n"
				      "# TYPE moetier_expert_%s_total counter\n",
				  expert_names[w], expert_names[w], expert_names[w]);
			for (uint32_t l = 0; l < snap->n_layers; l++)
				for (uint32_t e = 0; e < snap->n_experts; e++) {
					uint64_t v = expert_row(snap, l, e)[w];
					if (v)
						sb_printf(&b, "moetier_expert_%s_total{layer=\"%u\",expert=\"%u\"} %llu\n",
							  expert_names[w], l, e, (unsigned long long)v);
				}
		}
	}
	return sb_finish(&b);
}
