/* bpf.c - loads the eBPF programs of ebpf/ (libbpf skeletons generated at
 * build time), keeps them attached while the daemon runs, reads and renders
 * their maps. See bpf.h. */
#include "config.h"
#include "bpf.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "fault.h"
#include "util.h"

#ifdef HAVE_BPF
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "faults.skel.h"
#include "iolat.skel.h"
#include "runqlat.skel.h"
#endif

struct bpf_obs {
	struct bpf_obs_config cfg;
	bool attached[BPF_OBS_NPROGS];
	char status[BPF_OBS_NPROGS][200];
#ifdef HAVE_BPF
	struct iolat *iolat;
	struct faults *faults;
	struct runqlat *runqlat;
#endif
};

static const char *const prog_names[BPF_OBS_NPROGS] = { "iolat", "faults", "runqlat" };
static const char *const op_names[IOLAT_NOPS] = { "read", "write", "other" };

const char *bpf_obs_prog_name(enum bpf_obs_prog p)
{
	return (unsigned)p < BPF_OBS_NPROGS ? prog_names[p] : "?";
}

const char *bpf_obs_op_name(enum iolat_op op)
{
	return (unsigned)op < IOLAT_NOPS ? op_names[op] : "?";
}

bool bpf_obs_attached(const struct bpf_obs *o, enum bpf_obs_prog p)
{
	return o && (unsigned)p < BPF_OBS_NPROGS && o->attached[p];
}

const char *bpf_obs_status(const struct bpf_obs *o, enum bpf_obs_prog p)
{
	if (!o || (unsigned)p >= BPF_OBS_NPROGS)
		return "not available: not started";
	return o->status[p];
}

static void set_status(struct bpf_obs *o, enum bpf_obs_prog p, const char *fmt, ...) MOE_PRINTF(3, 4);
static void set_status(struct bpf_obs *o, enum bpf_obs_prog p, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(o->status[p], sizeof(o->status[p]), fmt, ap);
	va_end(ap);
}

#ifdef HAVE_BPF
/* libbpf prints its own warnings; keep them at debug level so a host
 * without BPF does not fill the log, and the reason we keep is errno's. */
static int libbpf_log(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	char line[512];

	if (level == LIBBPF_DEBUG)
		return 0;
	vsnprintf(line, sizeof(line), fmt, ap);
	line[strcspn(line, "\n")] = 0;
	moe_debug("libbpf: %s", line);
	return 0;
}

/* Kernel dev_t encoding (MAJOR << 20 | MINOR), what the block layer holds. */
static __u32 kdev(dev_t d)
{
	return ((__u32)major(d) << 20) | (__u32)minor(d);
}

/* The whole disk of a partition (/sys/dev/block/M:m/partition exists for
 * partitions; its parent directory's dev file names the disk). 0 if none. */
static dev_t parent_disk(dev_t d)
{
	char path[96], buf[32];
	unsigned ma, mi;

	snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/partition", major(d), minor(d));
	if (access(path, F_OK) != 0)
		return 0;
	snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/../dev", major(d), minor(d));
	FILE *f = fopen(path, "re");
	if (!f)
		return 0;
	bool ok = fgets(buf, sizeof(buf), f) && sscanf(buf, "%u:%u", &ma, &mi) == 2;
	fclose(f);
	return ok ? makedev(ma, mi) : 0;
}

/* One skeleton's open -> rodata -> load -> attach, with the reason kept. */
#define LOAD_PROG(o, P, idx, setup)                                                               \
	do {                                                                                      \
		int r_;                                                                           \
		if (fault_hit(FAULT_BPF_LOAD)) {                                                  \
			set_status(o, idx, "not available: load failed: injected fault");         \
			break;                                                                    \
		}                                                                                 \
		o->P = P##__open();                                                           \
		if (!o->P) {                                                                      \
			set_status(o, idx, "not available: open failed: %s", strerror(errno));   \
			break;                                                                    \
		}                                                                                 \
		setup;                                                                            \
		if ((r_ = P##__load(o->P)) < 0) {                                             \
			set_status(o, idx, "not available: load failed: %s%s", strerror(-r_),    \
				   r_ == -EPERM || r_ == -EACCES ? " (needs CAP_BPF and CAP_PERFMON)" : ""); \
			P##__destroy(o->P);                                                   \
			o->P = NULL;                                                              \
			break;                                                                    \
		}                                                                                 \
		if ((r_ = P##__attach(o->P)) < 0) {                                           \
			set_status(o, idx, "not available: attach failed: %s", strerror(-r_));   \
			P##__destroy(o->P);                                                   \
			o->P = NULL;                                                              \
			break;                                                                    \
		}                                                                                 \
		o->attached[idx] = true;                                                          \
		set_status(o, idx, "attached");                                                   \
	} while (0)

static void load_all(struct bpf_obs *o)
{
	const struct bpf_obs_config *c = &o->cfg;
	__u32 tgid = (__u32)(c->tgid ? c->tgid : getpid());

	libbpf_set_print(libbpf_log);
	if (c->n_devs == 0)
		set_status(o, BPF_OBS_IOLAT, "not available: no pack device to watch");
	else
		LOAD_PROG(o, iolat, BPF_OBS_IOLAT, {
			unsigned n = 0;
			for (unsigned i = 0; i < c->n_devs && n + 2 <= IOLAT_MAX_MATCH; i++) {
				dev_t disk = parent_disk(c->devs[i]);
				o->iolat->rodata->targ_dev[n] = kdev(c->devs[i]);
				o->iolat->rodata->targ_row[n++] = i;
				if (disk) {
					o->iolat->rodata->targ_dev[n] = kdev(disk);
					o->iolat->rodata->targ_row[n++] = i;
				}
			}
			o->iolat->rodata->targ_ndev = n;
		});
	if (c->n_arenas == 0)
		set_status(o, BPF_OBS_FAULTS, "not available: no arena to watch");
	else
		LOAD_PROG(o, faults, BPF_OBS_FAULTS, {
			o->faults->rodata->targ_tgid = tgid;
			o->faults->rodata->targ_narenas = c->n_arenas;
			for (unsigned i = 0; i < c->n_arenas; i++) {
				o->faults->rodata->targ_lo[i] = (__u64)(uintptr_t)c->arenas[i].base;
				o->faults->rodata->targ_hi[i] = (__u64)(uintptr_t)c->arenas[i].base + c->arenas[i].len;
				o->faults->rodata->targ_ino[i] = (__u64)c->arenas[i].ino;
				o->faults->rodata->targ_sdev[i] = kdev(c->arenas[i].dev);
			}
		});
	LOAD_PROG(o, runqlat, BPF_OBS_RUNQLAT, { o->runqlat->rodata->targ_tgid = tgid; });
}

static int read_array(int fd, __u32 key, void *val)
{
	return bpf_map_lookup_elem(fd, &key, val) < 0 ? -errno : 0;
}
#endif

int bpf_obs_start(const struct bpf_obs_config *cfg, struct bpf_obs **out)
{
	struct bpf_obs *o = calloc(1, sizeof(*o));

	if (!o)
		return -ENOMEM;
	o->cfg = *cfg;
	if (o->cfg.n_devs > IOLAT_MAX_DEVS)
		o->cfg.n_devs = IOLAT_MAX_DEVS;
	if (o->cfg.n_arenas > FAULTS_MAX_ARENAS)
		o->cfg.n_arenas = FAULTS_MAX_ARENAS;
	for (int p = 0; p < BPF_OBS_NPROGS; p++) {
#ifdef HAVE_BPF
		set_status(o, p, cfg->disabled ? "not available: disabled (--no-bpf)" : "not available: not loaded");
#else
		set_status(o, p, "not available: built without eBPF (--enable-bpf)");
#endif
	}
#ifdef HAVE_BPF
	if (!cfg->disabled)
		load_all(o);
#endif
	for (int p = 0; p < BPF_OBS_NPROGS; p++)
		if (!o->attached[p])
			moe_info("bpf: %s %s", prog_names[p], o->status[p]);
	*out = o;
	return 0;
}

void bpf_obs_stop(struct bpf_obs *o)
{
	if (!o)
		return;
#ifdef HAVE_BPF
	iolat__destroy(o->iolat);
	faults__destroy(o->faults);
	runqlat__destroy(o->runqlat);
#endif
	free(o);
}

int bpf_obs_read(const struct bpf_obs *o, struct bpf_obs_snapshot *s)
{
	memset(s, 0, sizeof(*s));
	if (!o)
		return -EINVAL;
	s->n_devs = o->cfg.n_devs;
	for (unsigned i = 0; i < s->n_devs; i++)
		snprintf(s->dev_names[i], sizeof(s->dev_names[i]), "%u:%u", major(o->cfg.devs[i]),
			 minor(o->cfg.devs[i]));
	s->n_arenas = o->cfg.n_arenas;
	for (unsigned i = 0; i < s->n_arenas; i++)
		snprintf(s->arena_names[i], sizeof(s->arena_names[i]), "%s", o->cfg.arenas[i].name);
	memcpy(s->attached, o->attached, sizeof(s->attached));
#ifdef HAVE_BPF
	int rc;
	if (o->iolat) {
		int fd = bpf_map__fd(o->iolat->maps.rows);
		for (unsigned d = 0; d < s->n_devs; d++)
			for (unsigned op = 0; op < IOLAT_NOPS; op++)
				if ((rc = read_array(fd, d * IOLAT_NOPS + op, &s->io[d][op])) < 0)
					return rc;
	}
	if (o->faults && (rc = read_array(bpf_map__fd(o->faults->maps.counts), 0, &s->faults)) < 0)
		return rc;
	if (o->runqlat && (rc = read_array(bpf_map__fd(o->runqlat->maps.lat), 0, &s->runq)) < 0)
		return rc;
#endif
	return 0;
}

uint64_t bpf_obs_hist_quantile(const struct hist *h, double q)
{
	if (!h->count)
		return 0;
	uint64_t want = (uint64_t)(q * (double)h->count + 0.5), seen = 0;
	if (want < 1)
		want = 1;
	for (int i = 0; i < HIST_SLOTS; i++) {
		seen += h->slots[i];
		if (seen >= want)
			return 2ull << i; /* upper bound of [2^i, 2^(i+1)) */
	}
	return 2ull << (HIST_SLOTS - 1);
}

/* ---- rendering ----------------------------------------------------------- */

static const double pcts[] = { 0.5, 0.9, 0.99 };

char *bpf_obs_render_text(const struct bpf_obs *o, const struct bpf_obs_snapshot *s)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	if (!f)
		return NULL;
	for (int p = 0; p < BPF_OBS_NPROGS; p++)
		fprintf(f, "bpf_%s %s\n", prog_names[p], bpf_obs_status(o, p));
	for (unsigned d = 0; d < s->n_devs && s->attached[BPF_OBS_IOLAT]; d++)
		for (unsigned op = 0; op < IOLAT_NOPS; op++) {
			const struct iolat_row *r = &s->io[d][op];
			if (!r->lat_us.count && op != IOLAT_READ)
				continue;
			fprintf(f, "bpf_iolat dev=%s op=%s requests=%llu bytes=%llu errors=%llu", s->dev_names[d],
				op_names[op], (unsigned long long)r->lat_us.count, (unsigned long long)r->size.sum,
				(unsigned long long)r->errors);
			for (size_t i = 0; i < sizeof(pcts) / sizeof(pcts[0]); i++)
				fprintf(f, " p%g_us<=%llu", pcts[i] * 100,
					(unsigned long long)bpf_obs_hist_quantile(&r->lat_us, pcts[i]));
			fprintf(f, " max_us=%llu\n", (unsigned long long)r->lat_us.max);
		}
	for (unsigned a = 0; a < s->n_arenas && s->attached[BPF_OBS_FAULTS]; a++)
		fprintf(f, "bpf_arena_faults arena=%s daemon=%llu clients=%llu\n", s->arena_names[a],
			(unsigned long long)s->faults.daemon[a], (unsigned long long)s->faults.clients[a]);
	if (s->attached[BPF_OBS_FAULTS])
		fprintf(f, "bpf_daemon_user_faults %llu\n", (unsigned long long)s->faults.daemon_total);
	if (s->attached[BPF_OBS_RUNQLAT]) {
		fprintf(f, "bpf_runqlat waits=%llu", (unsigned long long)s->runq.count);
		for (size_t i = 0; i < sizeof(pcts) / sizeof(pcts[0]); i++)
			fprintf(f, " p%g_us<=%llu", pcts[i] * 100,
				(unsigned long long)bpf_obs_hist_quantile(&s->runq, pcts[i]));
		fprintf(f, " max_us=%llu\n", (unsigned long long)s->runq.max);
	}
	fclose(f);
	return buf;
}

static void json_hist(FILE *f, const struct hist *h)
{
	fprintf(f, "{\"count\":%llu,\"sum\":%llu,\"max\":%llu,\"log2_slots\":[", (unsigned long long)h->count,
		(unsigned long long)h->sum, (unsigned long long)h->max);
	int last = -1;
	for (int i = 0; i < HIST_SLOTS; i++)
		if (h->slots[i])
			last = i;
	for (int i = 0; i <= last; i++)
		fprintf(f, "%s%llu", i ? "," : "", (unsigned long long)h->slots[i]);
	fprintf(f, "]}");
}

char *bpf_obs_render_json(const struct bpf_obs *o, const struct bpf_obs_snapshot *s)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	if (!f)
		return NULL;
	fprintf(f, "{\"programs\":{");
	for (int p = 0; p < BPF_OBS_NPROGS; p++) {
		fprintf(f, "%s\"%s\":\"", p ? "," : "", prog_names[p]);
		for (const char *c = bpf_obs_status(o, p); *c; c++) /* plain text: escape quotes */
			fprintf(f, *c == '"' || *c == '\\' ? "\\%c" : "%c", *c);
		fprintf(f, "\"");
	}
	fprintf(f, "},\"iolat\":[");
	bool first = true;
	for (unsigned d = 0; d < s->n_devs && s->attached[BPF_OBS_IOLAT]; d++)
		for (unsigned op = 0; op < IOLAT_NOPS; op++) {
			const struct iolat_row *r = &s->io[d][op];
			fprintf(f, "%s{\"dev\":\"%s\",\"op\":\"%s\",\"errors\":%llu,\"lat_us\":", first ? "" : ",",
				s->dev_names[d], op_names[op], (unsigned long long)r->errors);
			json_hist(f, &r->lat_us);
			fprintf(f, ",\"size_bytes\":");
			json_hist(f, &r->size);
			fprintf(f, "}");
			first = false;
		}
	fprintf(f, "],\"arena_faults\":[");
	for (unsigned a = 0; a < s->n_arenas && s->attached[BPF_OBS_FAULTS]; a++)
		fprintf(f, "%s{\"arena\":\"%s\",\"daemon\":%llu,\"clients\":%llu}", a ? "," : "", s->arena_names[a],
			(unsigned long long)s->faults.daemon[a], (unsigned long long)s->faults.clients[a]);
	fprintf(f, "],\"daemon_user_faults\":%llu,\"runqlat_us\":", (unsigned long long)s->faults.daemon_total);
	json_hist(f, &s->runq);
	fprintf(f, "}");
	fclose(f);
	return buf;
}

/* A log2 µs histogram as a Prometheus histogram in seconds: bucket i's
 * upper bound is 2^(i+1) µs, cumulative counts, +Inf = count. */
static void prom_hist(FILE *f, const char *name, const char *labels, const struct hist *h, double unit)
{
	uint64_t cum = 0;
	int last = 0;

	for (int i = 0; i < HIST_SLOTS; i++)
		if (h->slots[i])
			last = i;
	for (int i = 0; i <= last; i++) {
		cum += h->slots[i];
		fprintf(f, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, *labels ? "," : "",
			(double)(2ull << i) * unit, (unsigned long long)cum);
	}
	fprintf(f, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, *labels ? "," : "",
		(unsigned long long)h->count);
	fprintf(f, "%s_sum{%s} %g\n", name, labels, (double)h->sum * unit);
	fprintf(f, "%s_count{%s} %llu\n", name, labels, (unsigned long long)h->count);
}

char *bpf_obs_render_prometheus(const struct bpf_obs *o, const struct bpf_obs_snapshot *s)
{
	char *buf = NULL, labels[96];
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	if (!f)
		return NULL;
	fprintf(f, "# HELP moetier_bpf_attached Whether the eBPF program is attached (1) or not available (0).\n"
		   "# TYPE moetier_bpf_attached gauge\n");
	for (int p = 0; p < BPF_OBS_NPROGS; p++)
		fprintf(f, "moetier_bpf_attached{program=\"%s\"} %d\n", prog_names[p], bpf_obs_attached(o, p));
	if (s->attached[BPF_OBS_IOLAT]) {
		fprintf(f, "# HELP moetier_block_request_seconds Block-layer issue to completion time of requests "
			   "to the devices holding the packs.\n# TYPE moetier_block_request_seconds histogram\n");
		for (unsigned d = 0; d < s->n_devs; d++)
			for (unsigned op = 0; op < IOLAT_NOPS; op++) {
				snprintf(labels, sizeof(labels), "dev=\"%s\",op=\"%s\"", s->dev_names[d], op_names[op]);
				prom_hist(f, "moetier_block_request_seconds", labels, &s->io[d][op].lat_us, 1e-6);
			}
		fprintf(f, "# HELP moetier_block_request_bytes Sizes of those requests.\n"
			   "# TYPE moetier_block_request_bytes histogram\n");
		for (unsigned d = 0; d < s->n_devs; d++)
			for (unsigned op = 0; op < IOLAT_NOPS; op++) {
				snprintf(labels, sizeof(labels), "dev=\"%s\",op=\"%s\"", s->dev_names[d], op_names[op]);
				prom_hist(f, "moetier_block_request_bytes", labels, &s->io[d][op].size, 1);
			}
	}
	if (s->attached[BPF_OBS_FAULTS]) {
		fprintf(f, "# HELP moetier_arena_page_faults_total User page faults inside an arena (0 in steady "
			   "state: arenas are pre-faulted).\n# TYPE moetier_arena_page_faults_total counter\n");
		for (unsigned a = 0; a < s->n_arenas; a++) {
			fprintf(f, "moetier_arena_page_faults_total{arena=\"%s\",who=\"daemon\"} %llu\n",
				s->arena_names[a], (unsigned long long)s->faults.daemon[a]);
			fprintf(f, "moetier_arena_page_faults_total{arena=\"%s\",who=\"clients\"} %llu\n",
				s->arena_names[a], (unsigned long long)s->faults.clients[a]);
		}
	}
	if (s->attached[BPF_OBS_RUNQLAT]) {
		fprintf(f, "# HELP moetier_runqueue_wait_seconds Time the daemon's threads waited for a core.\n"
			   "# TYPE moetier_runqueue_wait_seconds histogram\n");
		prom_hist(f, "moetier_runqueue_wait_seconds", "", &s->runq, 1e-6);
	}
	fclose(f);
	return buf;
}
