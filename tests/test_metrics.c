/* test_metrics.c - the Prometheus exposition of daemon/stats.c, checked by
 * a small parser against the conventions (prometheus.io/docs/practices/
 * naming and the text format): base units (seconds, bytes), `_total` on
 * every counter and on nothing else, histograms as _bucket/_sum/_count
 * with a le="+Inf" bucket, every sample under a declared family, and no
 * per-(layer, expert) series unless asked for (6,656 of them for a
 * 26 x 64 model). */
#include "config.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stats.h"

#define MAX_FAM 256

struct family {
	char name[128];
	char type[16];
	bool inf;      /* histogram: le="+Inf" seen */
	double last_le;
	unsigned n_buckets;
	uint64_t inf_count, count;
	double sum;
	bool has_sum, has_count;
	unsigned samples;
};

struct expo {
	struct family f[MAX_FAM];
	unsigned n;
	unsigned expert_series; /* samples with an expert="..." label */
};

static bool ends_with(const char *s, const char *suf)
{
	size_t a = strlen(s), b = strlen(suf);
	return a >= b && !strcmp(s + a - b, suf);
}

static struct family *find(struct expo *e, const char *name)
{
	for (unsigned i = 0; i < e->n; i++)
		if (!strcmp(e->f[i].name, name))
			return &e->f[i];
	return NULL;
}

/* The family a sample belongs to: its own name, or for a histogram the
 * name less _bucket/_sum/_count. */
static struct family *family_of(struct expo *e, const char *sample, const char **part)
{
	static const char *const sufs[] = { "_bucket", "_sum", "_count" };
	struct family *f = find(e, sample);
	*part = "";
	if (f)
		return f;
	for (unsigned i = 0; i < 3; i++) {
		size_t n = strlen(sample), k = strlen(sufs[i]);
		if (n > k && !strcmp(sample + n - k, sufs[i])) {
			char base[128];
			snprintf(base, sizeof(base), "%.*s", (int)(n - k), sample);
			f = find(e, base);
			if (f && !strcmp(f->type, "histogram")) {
				*part = sufs[i];
				return f;
			}
		}
	}
	return NULL;
}

/* Parses the exposition; any violation of the format or the conventions
 * fails the test with the offending line. */
static void parse(const char *text, struct expo *e)
{
	memset(e, 0, sizeof(*e));
	char *copy = strdup(text);
	cr_assert(copy);
	char *save = NULL;
	for (char *line = strtok_r(copy, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		if (!strncmp(line, "# HELP ", 7))
			continue;
		if (!strncmp(line, "# TYPE ", 7)) {
			char name[128], type[16];
			cr_assert_eq(sscanf(line + 7, "%127s %15s", name, type), 2, "bad TYPE line: %s", line);
			cr_assert_null(find(e, name), "family %s declared twice", name);
			cr_assert_lt(e->n, MAX_FAM);
			struct family *f = &e->f[e->n++];
			snprintf(f->name, sizeof(f->name), "%s", name);
			snprintf(f->type, sizeof(f->type), "%s", type);
			f->last_le = -1;
			if (!strcmp(type, "counter"))
				cr_expect(ends_with(name, "_total"), "counter %s does not end in _total", name);
			else
				cr_expect(!ends_with(name, "_total"), "%s %s ends in _total", type, name);
			if (!strcmp(type, "histogram"))
				cr_expect(ends_with(name, "_seconds") || ends_with(name, "_bytes"),
					  "histogram %s is not in seconds or bytes", name);
			cr_expect(!ends_with(name, "_ns") && !strstr(name, "_ns_") && !ends_with(name, "_us") &&
					  !ends_with(name, "_ms"),
				  "%s is not in a base unit", name);
			continue;
		}
		cr_assert_neq(line[0], '#', "unknown comment: %s", line);
		char name[128];
		size_t nl = strcspn(line, "{ ");
		cr_assert_lt(nl, sizeof(name));
		snprintf(name, sizeof(name), "%.*s", (int)nl, line);
		const char *labels = line[nl] == '{' ? line + nl : "";
		const char *val = strrchr(line, ' ');
		cr_assert(val, "no value: %s", line);
		char *end;
		double v = strtod(val + 1, &end);
		cr_assert(*end == 0 && !isnan(v), "bad value: %s", line);
		const char *part;
		struct family *f = family_of(e, name, &part);
		cr_assert(f, "sample %s has no # TYPE", line);
		f->samples++;
		if (strstr(labels, "expert=\""))
			e->expert_series++;
		if (strcmp(f->type, "histogram"))
			continue;
		if (!strcmp(part, "_bucket")) {
			const char *le = strstr(labels, "le=\"");
			cr_assert(le, "bucket without le: %s", line);
			le += 4;
			cr_assert(!f->inf, "bucket after +Inf: %s", line);
			if (!strncmp(le, "+Inf\"", 5)) {
				f->inf = true;
				f->inf_count = (uint64_t)v;
			} else {
				double b = strtod(le, &end);
				cr_assert(*end == '"', "bad le: %s", line);
				cr_expect(b > f->last_le, "le not increasing: %s", line);
				f->last_le = b;
			}
			f->n_buckets++;
		} else if (!strcmp(part, "_sum")) {
			f->has_sum = true;
			f->sum = v;
		} else if (!strcmp(part, "_count")) {
			f->has_count = true;
			f->count = (uint64_t)v;
		}
	}
	free(copy);
	for (unsigned i = 0; i < e->n; i++) {
		struct family *f = &e->f[i];
		if (!strcmp(f->type, "histogram")) {
			cr_expect(f->inf, "histogram %s has no le=\"+Inf\" bucket", f->name);
			cr_expect(f->has_sum && f->has_count, "histogram %s lacks _sum or _count", f->name);
			cr_expect_eq(f->inf_count, f->count, "histogram %s: +Inf bucket != _count", f->name);
		}
	}
}

/* A stats block as a 26 x 64 model after some traffic. */
static struct stats *busy_stats(void)
{
	struct stats *s = stats_new(26, 64);
	cr_assert(s);
	stats_set_info(s, "engine", "io_uring (\"fixed\" buffers)");
	stats_add(s, STAT_cache_acquires, 10);
	stats_add(s, STAT_cache_load_bytes_host, 1 << 20);
	stats_gauge_set(s, GAUGE_host_slots, 12);
	/* 1 ms and 3 ms reads: 4 ms in all */
	stats_hist_add(s, HIST_nvme_read_ns, 1000000);
	stats_hist_add(s, HIST_nvme_read_ns, 3000000);
	stats_hist_add(s, HIST_acquire_wait_ns, 500);
	for (uint32_t l = 0; l < 26; l++)
		for (uint32_t x = 0; x < 64; x++)
			stats_expert_add(s, l, x, STAT_EXPERT_HITS, 1);
	return s;
}

static char *render(struct stats *s, bool per_expert)
{
	struct stats_snapshot snap;
	cr_assert_eq(stats_snapshot(s, &snap), 0);
	char *r = stats_render_prometheus(&snap, per_expert);
	stats_snapshot_free(&snap);
	cr_assert(r);
	return r;
}

Test(metrics, prometheus_follows_the_conventions)
{
	struct stats *s = busy_stats();
	char *r = render(s, false);
	static struct expo e;
	parse(r, &e);
	cr_expect_eq(e.expert_series, 0, "per-expert series without being asked for");
	struct family *f = find(&e, "moetier_cache_acquires_total");
	cr_expect(f && !strcmp(f->type, "counter"));
	f = find(&e, "moetier_host_slots");
	cr_expect(f && !strcmp(f->type, "gauge"));
	f = find(&e, "moetier_info");
	cr_expect(f && !strcmp(f->type, "gauge"), "moetier_info has no # TYPE gauge");
	/* the histograms are in seconds, and say so */
	for (int h = 0; h < HIST__COUNT; h++) {
		char want[128];
		snprintf(want, sizeof(want), "moetier_%.*s_seconds", (int)(strlen(stats_hist_name(h)) - 3),
			 stats_hist_name(h));
		f = find(&e, want);
		cr_expect(f && !strcmp(f->type, "histogram"), "no histogram %s", want);
	}
	free(r);
	stats_free(s);
}

/* The le bounds and the sum are seconds: 1 ms + 3 ms reads sum to 0.004,
 * and the first bucket holding both has le between 3 ms and 8 ms. */
Test(metrics, histogram_values_are_seconds)
{
	struct stats *s = busy_stats();
	char *r = render(s, false);
	const char *p = strstr(r, "moetier_nvme_read_seconds_sum ");
	cr_assert(p, "no moetier_nvme_read_seconds_sum");
	double sum = strtod(p + strlen("moetier_nvme_read_seconds_sum "), NULL);
	cr_expect(fabs(sum - 0.004) < 1e-9, "sum %g, expected 0.004 s", sum);
	double first_le = -1;
	for (p = r; (p = strstr(p, "moetier_nvme_read_seconds_bucket{le=\"")); p++) {
		char *end;
		double le = strtod(p + strlen("moetier_nvme_read_seconds_bucket{le=\""), &end);
		if (*end != '"')
			break; /* +Inf */
		unsigned long long n = strtoull(strchr(end, ' ') + 1, NULL, 10);
		if (n == 2) {
			first_le = le;
			break;
		}
	}
	cr_expect(first_le >= 0.003 && first_le <= 0.008, "le of the bucket holding 3 ms: %g", first_le);
	free(r);
	stats_free(s);
}

Test(metrics, per_expert_series_only_when_asked)
{
	struct stats *s = busy_stats();
	char *r = render(s, true);
	static struct expo e;
	parse(r, &e);
	cr_expect_eq(e.expert_series, 26 * 64, "per-expert series asked for: %u", e.expert_series);
	struct family *f = find(&e, "moetier_expert_hits_total");
	cr_expect(f && !strcmp(f->type, "counter"));
	free(r);
	stats_free(s);
}
