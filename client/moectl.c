/* moectl - administer a running moetierd: stats, config, pin/unpin/evict,
 * clients, and `top`, a live view. */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "moetier/moetier.h"

#include "cli.h"

static const char *sock_path, *model_name;

static void usage(FILE *f)
{
	fprintf(f, "usage: moectl [--socket PATH] [--model NAME] COMMAND [ARGS]\n"
		   "  stats [--json|--prometheus [--per-expert]]  counters, gauges, histograms\n"
		   "  config get [NAME]                current option values\n"
		   "  config set NAME VALUE            change a run-time option\n"
		   "  pin|unpin|evict LAYER EXPERT [--tier host|gpu]\n"
		   "  clients                          attached clients\n"
		   "  top [--interval S] [--count N]   live view (tiers, hit rates, bandwidth, heat map)\n"
		   "See moectl(8).\n");
}

static int fail(int rc, moet_ctx *c, const char *what)
{
	const char *m = moet_last_error(c);
	/* The daemon's message says what failed; the errno name only when it
	 * sent none. */
	fprintf(stderr, "moectl: %s: %s\n", what, *m ? m : moet_strerror(rc));
	return 1;
}

static int attach(moet_ctx **c, bool data)
{
	struct moet_connect_opts o = { sizeof(o), sock_path, model_name, "moectl", 0, data ? 0 : 1, 0 };
	int rc = moet_connect(&o, c);
	if (rc)
		return fail(rc, NULL, "connect");
	return 0;
}

static int print_text(int rc, moet_ctx *c, char *t, const char *what)
{
	if (rc) {
		fail(rc, c, what);
		moet_close(c);
		return 1;
	}
	fputs(t, stdout);
	free(t);
	moet_close(c);
	return 0;
}

static json_int_t jget(json_t *o, const char *k1, const char *k2)
{
	json_t *a = json_object_get(o, k1);
	json_t *b = a ? json_object_get(a, k2) : NULL;
	return b && json_is_integer(b) ? json_integer_value(b) : 0;
}

static volatile sig_atomic_t stop;
static void on_sig(int s) { (void)s; stop = 1; }

/* The q-quantile of a log2 histogram as the daemon renders it: JSON array
 * `key` of counts, slot i = [2^(i-1), 2^i) units for the daemon's own
 * ("log2_buckets", ns) and [2^i, 2^(i+1)) for the eBPF ones ("log2_slots",
 * µs); returns the slot's upper bound in µs, or -1 when empty. */
static double hist_quantile_us(json_t *h, const char *key, double q, bool ns)
{
	json_t *a = json_object_get(h, key);
	size_t n = json_array_size(a);
	json_int_t total = 0, seen = 0;

	for (size_t i = 0; i < n; i++)
		total += json_integer_value(json_array_get(a, i));
	if (total <= 0)
		return -1;
	json_int_t want = (json_int_t)(q * (double)total + 0.5);
	if (want < 1)
		want = 1;
	for (size_t i = 0; i < n; i++) {
		seen += json_integer_value(json_array_get(a, i));
		if (seen >= want)
			return ns ? (double)(1ull << i) / 1e3 : (double)(2ull << i);
	}
	return -1;
}

/* What the kernel sees (the daemon's eBPF programs) beside what the daemon
 * measures itself: block-layer read latency against the daemon's NVMe read
 * latency, arena page faults (must stay 0), run-queue waits. */
static void show_kernel_view(json_t *root, json_t *model)
{
	json_t *bpf = json_object_get(root, "bpf");
	json_t *own = json_object_get(json_object_get(model, "histograms"), "nvme_read_ns");
	double o50 = hist_quantile_us(own, "log2_buckets", 0.5, true), o99 = hist_quantile_us(own, "log2_buckets", 0.99, true);

	if (!bpf) {
		printf("kernel:    (this daemon reports no eBPF view)\n");
		return;
	}
	const char *st = json_string_value(json_object_get(json_object_get(bpf, "programs"), "iolat"));
	json_t *rows = json_object_get(bpf, "iolat");
	bool shown = false;
	for (size_t i = 0; i < json_array_size(rows); i++) {
		json_t *r = json_array_get(rows, i), *lat = json_object_get(r, "lat_us");
		if (strcmp(json_string_value(json_object_get(r, "op")) ?: "", "read") != 0)
			continue;
		printf("block I/O: dev %s reads %" JSON_INTEGER_FORMAT " p50<=%.0fus p99<=%.0fus (kernel)   "
		       "daemon expert reads p50<=%.0fus p99<=%.0fus\n",
		       json_string_value(json_object_get(r, "dev")), json_integer_value(json_object_get(lat, "count")),
		       hist_quantile_us(lat, "log2_slots", 0.5, false), hist_quantile_us(lat, "log2_slots", 0.99, false),
		       o50, o99);
		shown = true;
	}
	if (!shown)
		printf("block I/O: %s\n", st ? st : "not available");
	json_t *af = json_object_get(bpf, "arena_faults");
	for (size_t i = 0; i < json_array_size(af); i++) {
		json_t *a = json_array_get(af, i);
		json_int_t d = json_integer_value(json_object_get(a, "daemon")), c = json_integer_value(json_object_get(a, "clients"));
		printf("faults:    arena %s daemon %" JSON_INTEGER_FORMAT " clients %" JSON_INTEGER_FORMAT "%s\n",
		       json_string_value(json_object_get(a, "arena")), d, c,
		       d || c ? "   !! ARENA PAGE FAULTS: the arena is not (or no longer) resident" : "");
	}
	json_t *rq = json_object_get(bpf, "runqlat_us");
	if (json_integer_value(json_object_get(rq, "count")) > 0)
		printf("run queue: daemon threads waited p50<=%.0fus p99<=%.0fus for a core\n",
		       hist_quantile_us(rq, "log2_slots", 0.5, false), hist_quantile_us(rq, "log2_slots", 0.99, false));
}

/* top: one screen per interval from the JSON stats and the shared
 * residency bitmaps (a data-plane attach maps them; no round trip). */
static int cmd_top(int argc, char **argv)
{
	double interval = 1.0;
	long count = -1;
	for (int i = 0; i < argc; i++) {
		if (!strcmp(argv[i], "--interval") && i + 1 < argc)
			interval = atof(argv[++i]);
		else if (!strcmp(argv[i], "--count") && i + 1 < argc)
			count = atol(argv[++i]);
		else {
			fprintf(stderr, "moectl top: unknown argument '%s'\n", argv[i]);
			return 2;
		}
	}
	if (interval < 0.05)
		interval = 0.05;
	moet_ctx *c;
	if (attach(&c, true))
		return 1;
	struct moet_model_info mi = { .size = sizeof(mi) };
	moet_model_info(c, &mi);
	signal(SIGINT, on_sig);
	signal(SIGTERM, on_sig);
	bool tty = isatty(1);
	json_int_t prev_hits = 0, prev_acq = 0, prev_bytes = 0;
	size_t ne = (size_t)mi.n_moe_layers * mi.n_experts;
	uint64_t *hits = calloc(ne ? ne : 1, sizeof(*hits));
	uint8_t *mask = calloc(mi.n_experts ? mi.n_experts : 1, 1);
	int rc = 0;
	for (long it = 0; !stop && (count < 0 || it < count); it++) {
		char *txt = NULL;
		rc = moet_stats(c, MOET_STATS_JSON, &txt);
		if (rc)
			break;
		json_error_t je;
		json_t *root = json_loads(txt, 0, &je);
		free(txt);
		json_t *model = root ? json_object_get(json_object_get(root, "models"), mi.name) : NULL;
		json_int_t h_host = jget(model, "counters", "cache_hits_host"), h_gpu = jget(model, "counters", "cache_hits_gpu");
		json_int_t acq = jget(model, "counters", "cache_acquires");
		json_int_t lb = jget(model, "counters", "cache_load_bytes_host");
		json_int_t hs = jget(model, "gauges", "host_slots"), hu = jget(model, "gauges", "host_slots_used");
		json_int_t gs = jget(model, "gauges", "gpu_slots"), gu = jget(model, "gauges", "gpu_slots_used");
		json_int_t dh = h_host + h_gpu - prev_hits, da = acq - prev_acq, db = lb - prev_bytes;
		prev_hits = h_host + h_gpu;
		prev_acq = acq;
		prev_bytes = lb;
		if (tty)
			printf("\033[H\033[2J");
		printf("moetierd top - model %s (%u layers x %u experts)\n", mi.name, mi.n_moe_layers, mi.n_experts);
		printf("tiers:     host %" JSON_INTEGER_FORMAT "/%" JSON_INTEGER_FORMAT " slots   gpu %" JSON_INTEGER_FORMAT
		       "/%" JSON_INTEGER_FORMAT " slots\n", hu, hs, gu, gs);
		/* MoLAE: where the shared B matrices are (they take GPU slots) */
		json_t *lbj = json_object_get(model, "latent_basis");
		if (json_is_object(lbj))
			printf("latent B:  %s tier, %" JSON_INTEGER_FORMAT " bytes (%" JSON_INTEGER_FORMAT
			       " GPU arena bytes reserved)\n", json_string_value(json_object_get(lbj, "tier")),
			       json_integer_value(json_object_get(lbj, "bytes")),
			       json_integer_value(json_object_get(lbj, "gpu_reserved_bytes")));
		printf("hit rate:  %.1f%% now (%" JSON_INTEGER_FORMAT " acquires/interval), %.1f%% overall\n",
		       da > 0 ? 100.0 * (double)dh / (double)da : 0.0, da, acq > 0 ? 100.0 * (double)(h_host + h_gpu) / (double)acq : 0.0);
		printf("NVMe:      %.1f MB/s loaded\n", (double)db / 1e6 / interval);
		show_kernel_view(root, model);
		printf("heat map (per layer: '#' host, 'G' gpu, '.' absent; hits brightness 0-9 below)\n");
		moet_expert_counters(c, hits, NULL, NULL, NULL);
		uint64_t maxh = 1;
		for (size_t i = 0; i < ne; i++)
			maxh = hits[i] > maxh ? hits[i] : maxh;
		unsigned show = mi.n_experts > 128 ? 128 : mi.n_experts;
		/* Fit the terminal: the header above takes about 10 lines, each
		 * layer two; the rest of the layers are summarised in one line. */
		uint32_t fit = mi.n_moe_layers;
		struct winsize ws;
		if (tty && ioctl(1, TIOCGWINSZ, &ws) == 0 && ws.ws_row > 12)
			fit = (uint32_t)(ws.ws_row - 12) / 2;
		if (fit > 64)
			fit = 64;
		for (uint32_t l = 0; l < mi.n_moe_layers && l < fit; l++) {
			char row[2][129];
			moet_resident(c, l, MOET_TIER_HOST, mask, mi.n_experts);
			for (unsigned e = 0; e < show; e++)
				row[0][e] = mask[e] ? '#' : '.';
			moet_resident(c, l, MOET_TIER_GPU, mask, mi.n_experts);
			for (unsigned e = 0; e < show; e++) {
				if (mask[e])
					row[0][e] = 'G';
				row[1][e] = (char)('0' + (int)(9 * hits[(size_t)l * mi.n_experts + e] / maxh));
			}
			row[0][show] = row[1][show] = '\0';
			printf("L%-3u %s\n     %s\n", l, row[0], row[1]);
		}
		if (fit < mi.n_moe_layers)
			printf("(%u more layers: a taller terminal shows them)\n", mi.n_moe_layers - fit);
		fflush(stdout);
		json_decref(root);
		if (count < 0 || it + 1 < count) {
			struct timespec d = { (time_t)interval, (long)((interval - (double)(time_t)interval) * 1e9) };
			nanosleep(&d, NULL);
		}
	}
	free(hits);
	free(mask);
	if (rc)
		fail(rc, c, "top");
	moet_close(c);
	return rc ? 1 : 0;
}

static int parse_u32(const char *s, uint32_t *out)
{
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 10);
	if (errno || *end || end == s || v > UINT32_MAX)
		return -1;
	*out = (uint32_t)v;
	return 0;
}

int main(int argc, char **argv)
{
	struct cli_global g = { .prog = "moectl", .usage = usage };
	int i = cli_parse_global(&g, argc, argv);
	if (i < 0)
		return i == -1 ? 0 : 2;
	sock_path = g.sock_path;
	model_name = g.model_name;
	const char *cmd = argv[i++];
	moet_ctx *c;
	char *t = NULL;
	if (!strcmp(cmd, "stats")) {
		unsigned fmt = MOET_STATS_TEXT;
		for (; i < argc; i++) {
			if (!strcmp(argv[i], "--json"))
				fmt = MOET_STATS_JSON;
			else if (!strcmp(argv[i], "--prometheus"))
				fmt = (fmt & ~(unsigned)MOET_STATS_FORMAT_MASK) | MOET_STATS_PROMETHEUS;
			else if (!strcmp(argv[i], "--per-expert"))
				fmt |= MOET_STATS_PER_EXPERT;
			else {
				fprintf(stderr, "moectl stats: unknown argument '%s'\n", argv[i]);
				return 2;
			}
		}
		if ((fmt & MOET_STATS_PER_EXPERT) && (fmt & MOET_STATS_FORMAT_MASK) != MOET_STATS_PROMETHEUS) {
			fprintf(stderr, "moectl stats: --per-expert goes with --prometheus (JSON always has them)\n");
			return 2;
		}
		if (attach(&c, false))
			return 1;
		int rc = moet_stats(c, fmt, &t);
		return print_text(rc, c, t, "stats");
	}
	if (!strcmp(cmd, "clients")) {
		if (attach(&c, false))
			return 1;
		int rc = moet_clients(c, &t);
		return print_text(rc, c, t, "clients");
	}
	if (!strcmp(cmd, "config")) {
		if (i < argc && !strcmp(argv[i], "get") && argc - i <= 2) {
			if (attach(&c, false))
				return 1;
			int rc = moet_config_get(c, i + 1 < argc ? argv[i + 1] : NULL, &t);
			return print_text(rc, c, t, "config get");
		}
		if (i < argc && !strcmp(argv[i], "set") && argc - i == 3) {
			if (attach(&c, false))
				return 1;
			int rc = moet_config_set(c, argv[i + 1], argv[i + 2]);
			if (rc)
				fail(rc, c, "config set");
			moet_close(c);
			return rc ? 1 : 0;
		}
		fprintf(stderr, "moectl: config get [NAME] | config set NAME VALUE\n");
		return 2;
	}
	if (!strcmp(cmd, "pin") || !strcmp(cmd, "unpin") || !strcmp(cmd, "evict")) {
		uint32_t l, e;
		unsigned tier = MOET_TIER_HOST;
		if (argc - i < 2 || parse_u32(argv[i], &l) || parse_u32(argv[i + 1], &e)) {
			fprintf(stderr, "moectl %s: need LAYER EXPERT\n", cmd);
			return 2;
		}
		for (i += 2; i < argc; i++) {
			if (!strcmp(argv[i], "--tier") && i + 1 < argc) {
				i++;
				if (!strcmp(argv[i], "gpu"))
					tier = MOET_TIER_GPU;
				else if (strcmp(argv[i], "host")) {
					fprintf(stderr, "moectl: --tier host|gpu\n");
					return 2;
				}
			} else {
				fprintf(stderr, "moectl %s: unknown argument '%s'\n", cmd, argv[i]);
				return 2;
			}
		}
		if (attach(&c, false))
			return 1;
		int rc = !strcmp(cmd, "pin") ? moet_pin(c, l, e, tier) : !strcmp(cmd, "unpin") ? moet_unpin(c, l, e, tier)
											     : moet_evict(c, l, e, tier);
		if (rc)
			fail(rc, c, cmd);
		moet_close(c);
		return rc ? 1 : 0;
	}
	if (!strcmp(cmd, "top"))
		return cmd_top(argc - i, argv + i);
	fprintf(stderr, "moectl: unknown command '%s'\n", cmd);
	usage(stderr);
	return 2;
}
