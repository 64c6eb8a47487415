/* moe-client - talk to moetierd as an inference engine would: info,
 * acquire, route (cache-aware routing), bench (ring round trips), replay
 * (routing traces). */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "moetier/moetier.h"

#include "cli.h"
#include "predict.h"
#include "trace.h"

static const char *sock_path, *model_name;
static int spin_us = -1;

static void usage(FILE *f)
{
	fprintf(f, "usage: moe-client [--socket PATH] [--model NAME] COMMAND [ARGS]\n"
		   "  info                          model, arenas and capabilities\n"
		   "  acquire LAYER EXPERT...       acquire experts, print where they are, release\n"
		   "          [--nowait] [--gpu]\n"
		   "  route LAYER [--keep J] [--margin M] [--rule R] [--max-share S] [--weights W]\n"
		   "        [--tier host|gpu] [--nowait] [--gpu] (LOGIT... | --logits FILE)\n"
		   "                                route logits by the daemon (cache-aware with --keep/--rule),\n"
		   "                                print the experts, weights and substitutions, release\n"
		   "  basis [LAYER [GROUP]]         where a MoLAE pack's B matrices are (GPU tier offset or host)\n"
		   "  bench [--seconds S] [--clients N]\n"
		   "                                ACQUIRE+RELEASE round trips/s with 1 and N clients\n"
		   "  replay [--nowait-only] [--gpu] [--tokens N] [--cold] [--layer-us US] [--no-hints] [--brief] TRACE...\n"
		   "                                replay routing traces (CSV) through the daemon\n"
		   "See moe-client(1).\n");
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int connect_or_die(moet_ctx **c, const char *name)
{
	struct moet_connect_opts o = { sizeof(o), sock_path, model_name, name, MOET_CAP_RING, 0, spin_us };
	int rc = moet_connect(&o, c);
	if (rc) {
		fprintf(stderr, "moe-client: %s", moet_strerror(rc));
		if (*moet_last_error(NULL))
			fprintf(stderr, ": %s", moet_last_error(NULL));
		fprintf(stderr, "\n");
	}
	return rc;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static uint64_t pct(uint64_t *v, size_t n, double q)
{
	if (!n)
		return 0;
	size_t i = (size_t)(q * (double)(n - 1) + 0.5);
	return v[i];
}

static int cmd_info(void)
{
	moet_ctx *c;
	struct moet_model_info mi = { .size = sizeof(mi) };
	if (connect_or_die(&c, "moe-client info"))
		return 1;
	moet_model_info(c, &mi);
	printf("model:        %s\n", mi.name);
	printf("protocol:     %u (client id %u)\n", mi.protocol, mi.client_id);
	printf("experts:      %u per layer, top-%u, %u MoE layers (first %u, step %u)\n", mi.n_experts, mi.top_k,
	       mi.n_moe_layers, mi.first_moe_layer, mi.moe_layer_step);
	printf("shape:        hidden %u, expert width %u, %" PRIu64 " bytes per expert\n", mi.hidden, mi.expert_width,
	       mi.expert_bytes);
	printf("host arena:   %u slots of %" PRIu64 " bytes%s\n", mi.n_slots[1], mi.slot_bytes[1],
	       moet_slot_ptr(c, 1, 0) ? " (mapped read-only)" : "");
	printf("GPU arena:    %u slots of %" PRIu64 " bytes%s\n", mi.n_slots[0], mi.slot_bytes[0],
	       moet_slot_ptr(c, 0, 0) ? " (emulated, mapped read-only)" : "");
	/* Every capability bit of proto.h, by name: a new one shows up here. */
	static const struct { uint32_t bit; const char *name; } caps[] = {
		{ MOET_CAP_RING, "ring" },         { MOET_CAP_HOST_ARENA, "host-arena" },
		{ MOET_CAP_GPU_EMU, "gpu-emulated" }, { MOET_CAP_GPU_VMM, "gpu-vmm" },
		{ MOET_CAP_ROUTE, "route" },       { MOET_CAP_COMPUTE, "compute" },
		{ MOET_CAP_ADMIN, "admin" },
	};
	uint32_t known = 0;
	printf("capabilities:");
	for (size_t i = 0; i < sizeof(caps) / sizeof(caps[0]); i++) {
		known |= caps[i].bit;
		if (mi.caps & caps[i].bit)
			printf(" %s", caps[i].name);
	}
	if (mi.caps & ~known)
		printf(" unknown(%#x)", mi.caps & ~known);
	printf("\n");
	moet_close(c);
	return 0;
}

/* "EBADMSG" for EBADMSG: the name scripts and people search for. */
static const char *errno_name(int e)
{
	const char *s = strerrorname_np(e);
	return s ? s : "E?";
}

static int cmd_acquire(int argc, char **argv)
{
	unsigned flags = 0, n = 0;
	uint32_t layer = 0, ids[MOET_MAX_BATCH];
	bool have_layer = false;
	for (int i = 0; i < argc; i++) {
		if (!strcmp(argv[i], "--nowait"))
			flags |= MOET_F_NOWAIT;
		else if (!strcmp(argv[i], "--gpu"))
			flags |= MOET_F_WANT_GPU;
		else {
			char *end;
			unsigned long v = strtoul(argv[i], &end, 10);
			if (*end || end == argv[i] || v > UINT32_MAX) {
				fprintf(stderr, "moe-client acquire: bad number '%s'\n", argv[i]);
				return 2;
			}
			if (!have_layer) {
				layer = (uint32_t)v;
				have_layer = true;
			} else if (n < MOET_MAX_BATCH) {
				ids[n++] = (uint32_t)v;
			} else {
				fprintf(stderr, "moe-client acquire: at most %d experts\n", MOET_MAX_BATCH);
				return 2;
			}
		}
	}
	if (!n) {
		fprintf(stderr, "moe-client acquire: need LAYER EXPERT...\n");
		return 2;
	}
	moet_ctx *c;
	if (connect_or_die(&c, "moe-client acquire"))
		return 1;
	int32_t slots[MOET_MAX_BATCH];
	uint8_t tiers[MOET_MAX_BATCH];
	moet_lease lease;
	uint64_t t0 = now_ns();
	int rc = moet_acquire(c, layer, ids, n, flags, slots, tiers, &lease);
	uint64_t t1 = now_ns();
	if (rc < 0) {
		fprintf(stderr, "moe-client acquire: %s\n", moet_strerror(rc));
		moet_close(c);
		return 1;
	}
	printf("layer %u: %d of %u served in %.1f us, lease %#" PRIx64 "\n", layer, rc, n, (double)(t1 - t0) / 1e3, lease);
	unsigned failed = 0;
	for (unsigned i = 0; i < n; i++) {
		if (slots[i] < -1) {
			/* The daemon could not serve it (bad extent, over the share). */
			printf("  expert %-5u error %s (%s)\n", ids[i], errno_name(-slots[i]), strerror(-slots[i]));
			fprintf(stderr, "moe-client acquire: layer %u expert %u: %s (%s)\n", layer, ids[i],
				errno_name(-slots[i]), strerror(-slots[i]));
			failed++;
			continue;
		}
		if (slots[i] < 0) {
			printf("  expert %-5u miss\n", ids[i]);
			continue;
		}
		const uint8_t *p = moet_slot_ptr(c, tiers[i], slots[i]);
		printf("  expert %-5u %s slot %-5d", ids[i], tiers[i] == 0 ? "gpu " : "host", slots[i]);
		if (p)
			printf(" first bytes %02x %02x %02x %02x", p[0], p[1], p[2], p[3]);
		printf("\n");
	}
	rc = moet_release(c, lease);
	moet_close(c);
	if (rc) {
		fprintf(stderr, "moe-client acquire: release: %s\n", moet_strerror(rc));
		return 1;
	}
	return failed ? 1 : 0;
}

/* Logits from text: numbers separated by spaces, commas, newlines or
 * brackets (a JSON list works). "-" = stdin. Returns the count or -1. */
static int read_logits(const char *path, float *out, unsigned max)
{
	FILE *f = strcmp(path, "-") ? fopen(path, "r") : stdin;
	if (!f) {
		fprintf(stderr, "moe-client route: %s: %s\n", path, strerror(errno));
		return -1;
	}
	unsigned n = 0;
	int ch;
	char tok[64];
	size_t len = 0;
	int rc = 0;
	do {
		ch = fgetc(f);
		if (ch != EOF && !strchr(" \t\r\n,[]", ch)) {
			if (len + 1 >= sizeof(tok)) {
				rc = -1;
				break;
			}
			tok[len++] = (char)ch;
			continue;
		}
		if (!len)
			continue;
		tok[len] = 0;
		len = 0;
		char *end;
		float v = strtof(tok, &end);
		if (*end || n >= max) {
			fprintf(stderr, "moe-client route: %s: bad or too many logits at '%s'\n", path, tok);
			rc = -1;
			break;
		}
		out[n++] = v;
	} while (ch != EOF);
	if (f != stdin)
		fclose(f);
	return rc < 0 ? -1 : (int)n;
}

static int cmd_route(int argc, char **argv)
{
	static float logits[65536];
	struct moet_route_args a = { .size = sizeof(a), .rule = MOET_ROUTE_MARGIN, .margin = INFINITY };
	unsigned flags = 0, n = 0;
	uint32_t layer = 0;
	bool have_layer = false, cache_aware = false, keep_given = false;
	const char *file = NULL;
	for (int i = 0; i < argc; i++) {
		const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		char *end = NULL;
		if (!strcmp(o, "--nowait")) {
			flags |= MOET_F_NOWAIT;
		} else if (!strcmp(o, "--gpu")) {
			flags |= MOET_F_WANT_GPU;
		} else if (!strcmp(o, "--keep") && v) {
			unsigned long j = strtoul(v, &end, 10);
			if (*end || end == v || j > 1000) {
				fprintf(stderr, "moe-client route: bad --keep '%s'\n", v);
				return 2;
			}
			a.keep_top = (unsigned)j;
			cache_aware = keep_given = true;
			i++;
		} else if ((!strcmp(o, "--margin") || !strcmp(o, "--max-share")) && v) {
			float f = strtof(v, &end);
			if (*end || end == v) {
				fprintf(stderr, "moe-client route: bad %s '%s'\n", o, v);
				return 2;
			}
			if (!strcmp(o, "--margin"))
				a.margin = f;
			else
				a.max_share = f;
			cache_aware = true;
			i++;
		} else if (!strcmp(o, "--rule") && v) {
			static const char *const names[] = { "exact", "margin", "low-weight", "similarity" };
			unsigned r = 0;
			while (r < 4 && strcmp(v, names[r]))
				r++;
			if (r == 4) {
				fprintf(stderr, "moe-client route: unknown rule '%s' (exact, margin, low-weight, similarity)\n", v);
				return 2;
			}
			a.rule = r;
			cache_aware = true;
			i++;
		} else if (!strcmp(o, "--weights") && v) {
			static const char *const names[] = { "default", "family", "renorm", "inherit" };
			unsigned w = 0;
			while (w < 4 && strcmp(v, names[w]))
				w++;
			if (w == 4) {
				fprintf(stderr, "moe-client route: unknown weights '%s' (family, renorm, inherit)\n", v);
				return 2;
			}
			a.weights = w;
			i++;
		} else if (!strcmp(o, "--tier") && v) {
			if (strcmp(v, "host") && strcmp(v, "gpu")) {
				fprintf(stderr, "moe-client route: --tier host or gpu\n");
				return 2;
			}
			a.tiers = v[0] == 'h' ? MOET_ROUTE_TIER_HOST : MOET_ROUTE_TIER_GPU;
			i++;
		} else if (!strcmp(o, "--logits") && v) {
			file = v;
			i++;
		} else if (!have_layer) {
			unsigned long l = strtoul(o, &end, 10);
			if (*end || end == o || l > UINT32_MAX) {
				fprintf(stderr, "moe-client route: bad layer '%s'\n", o);
				return 2;
			}
			layer = (uint32_t)l;
			have_layer = true;
		} else {
			/* a logit; "-1.5" is a number, not an option */
			float f = strtof(o, &end);
			if (*end || end == o || n >= sizeof(logits) / sizeof(logits[0])) {
				fprintf(stderr, "moe-client route: bad argument '%s'\n", o);
				return 2;
			}
			logits[n++] = f;
		}
	}
	if (file) {
		if (n) {
			fprintf(stderr, "moe-client route: logits on the command line and --logits\n");
			return 2;
		}
		int r = read_logits(file, logits, sizeof(logits) / sizeof(logits[0]));
		if (r < 0)
			return 2;
		n = (unsigned)r;
	}
	if (!have_layer || !n) {
		fprintf(stderr, "moe-client route: need LAYER and the layer's logits\n");
		return 2;
	}
	moet_ctx *c;
	if (connect_or_die(&c, "moe-client route"))
		return 1;
	struct moet_model_info mi = { .size = sizeof(mi) };
	moet_model_info(c, &mi);
	if (n != mi.n_experts) {
		fprintf(stderr, "moe-client route: %u logits, model %s has %u experts\n", n, mi.name, mi.n_experts);
		moet_close(c);
		return 2;
	}
	if (cache_aware && !keep_given)
		a.keep_top = mi.top_k; /* no --keep: every slot kept, i.e. exact */
	uint32_t ex[MOET_MAX_BATCH];
	float w[MOET_MAX_BATCH];
	int32_t slots[MOET_MAX_BATCH];
	uint8_t tiers[MOET_MAX_BATCH];
	moet_lease lease = 0;
	uint64_t t0 = now_ns();
	int k = cache_aware ? moet_route_opts(c, layer, logits, n, flags, &a, ex, w, slots, tiers, &lease)
			    : moet_route(c, layer, logits, n, flags, ex, w, slots, tiers, &lease);
	uint64_t t1 = now_ns();
	if (k < 0) {
		fprintf(stderr, "moe-client route: %s", moet_strerror(k));
		if (*moet_last_error(c))
			fprintf(stderr, ": %s", moet_last_error(c));
		fprintf(stderr, "\n");
		moet_close(c);
		return 1;
	}
	printf("layer %u: %d experts in %.1f us, lease %#" PRIx64 "\n", layer, k, (double)(t1 - t0) / 1e3, lease);
	unsigned failed = 0;
	for (int i = 0; i < k; i++) {
		printf("  slot %-2d expert %-5u weight %.6f", i, ex[i], (double)w[i]);
		if (cache_aware)
			printf(" exact %-5u %.6f%s", a.exact[i], (double)a.exact_weights[i],
			       (a.subst_mask >> i & 1) ? " substituted" : "");
		if (slots[i] >= 0)
			printf(" %s slot %d\n", tiers[i] == 0 ? "gpu" : "host", slots[i]);
		else if (slots[i] == -1)
			printf(" miss\n");
		else {
			printf(" error %s\n", errno_name(-slots[i]));
			failed++;
		}
	}
	if (cache_aware)
		printf("substituted %d of %d slots (open %d), %u experts resident, subst_mask %#x\n",
		       __builtin_popcount(a.subst_mask), k, __builtin_popcount(a.open_mask), a.n_resident, a.subst_mask);
	int rc = moet_release(c, lease);
	moet_close(c);
	if (rc) {
		fprintf(stderr, "moe-client route: release: %s\n", moet_strerror(rc));
		return 1;
	}
	return failed ? 1 : 0;
}

/* One bench worker: ACQUIRE+RELEASE of a resident expert for `secs`.
 * Writes round trips and per-round-trip latencies (ns) into *res. */
struct bench_res {
	uint64_t trips;
	uint64_t p50, p99;
	int rc;
};

static void bench_worker(double secs, unsigned wid, struct bench_res *res)
{
	moet_ctx *c;
	res->rc = connect_or_die(&c, "moe-client bench");
	if (res->rc)
		return;
	struct moet_model_info mi = { .size = sizeof(mi) };
	moet_model_info(c, &mi);
	uint32_t id = wid % (mi.n_experts ? mi.n_experts : 1);
	int32_t slot;
	moet_lease lease;
	/* Warm: load it once (blocking), keep it pinned by a lease meanwhile. */
	int rc = moet_acquire(c, 0, &id, 1, 0, &slot, NULL, &lease);
	if (rc != 1) {
		res->rc = rc < 0 ? rc : -ENOBUFS;
		moet_close(c);
		return;
	}
	size_t cap = 1 << 20, n = 0;
	uint64_t *lat = malloc(cap * sizeof(*lat));
	uint64_t end = now_ns() + (uint64_t)(secs * 1e9);
	moet_lease l2;
	while (lat) {
		uint64_t t0 = now_ns();
		rc = moet_acquire(c, 0, &id, 1, MOET_F_NOWAIT, &slot, NULL, &l2);
		if (rc >= 0)
			rc = moet_release(c, l2);
		uint64_t t1 = now_ns();
		if (rc < 0) {
			res->rc = rc;
			break;
		}
		if (n < cap)
			lat[n++] = t1 - t0;
		res->trips++;
		if (t1 >= end)
			break;
	}
	moet_release(c, lease);
	if (lat) {
		qsort(lat, n, sizeof(*lat), cmp_u64);
		res->p50 = pct(lat, n, 0.5);
		res->p99 = pct(lat, n, 0.99);
	}
	free(lat);
	moet_close(c);
}

static int bench_run(unsigned nclients, double secs, double *rate, uint64_t *p50, uint64_t *p99)
{
	struct bench_res *res = mmap(NULL, sizeof(*res) * nclients, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (res == MAP_FAILED)
		return -errno;
	memset(res, 0, sizeof(*res) * nclients);
	uint64_t t0 = now_ns();
	for (unsigned i = 0; i < nclients; i++) {
		pid_t p = fork();
		if (p == 0) {
			bench_worker(secs, i, &res[i]);
			_exit(0);
		}
	}
	int bad = 0;
	for (unsigned i = 0; i < nclients; i++) {
		int st;
		if (wait(&st) < 0 || !WIFEXITED(st) || WEXITSTATUS(st))
			bad = -ECHILD;
	}
	double el = (double)(now_ns() - t0) / 1e9;
	uint64_t trips = 0;
	*p50 = *p99 = 0;
	for (unsigned i = 0; i < nclients; i++) {
		if (res[i].rc)
			bad = res[i].rc;
		trips += res[i].trips;
		*p50 = res[i].p50 > *p50 ? res[i].p50 : *p50;
		*p99 = res[i].p99 > *p99 ? res[i].p99 : *p99;
	}
	*rate = (double)trips / el;
	munmap(res, sizeof(*res) * nclients);
	return bad;
}

static int cmd_bench(int argc, char **argv)
{
	double secs = 2.0;
	unsigned many = 4;
	for (int i = 0; i < argc; i++) {
		if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
			secs = atof(argv[++i]);
		else if (!strcmp(argv[i], "--clients") && i + 1 < argc)
			many = (unsigned)atoi(argv[++i]);
		else {
			fprintf(stderr, "moe-client bench: unknown argument '%s'\n", argv[i]);
			return 2;
		}
	}
	if (secs <= 0 || secs > 600 || many < 1 || many > 64) {
		fprintf(stderr, "moe-client bench: --seconds in (0, 600], --clients in [1, 64]\n");
		return 2;
	}
	double r1, rn;
	uint64_t a50, a99, b50, b99;
	int rc = bench_run(1, secs, &r1, &a50, &a99);
	if (!rc)
		rc = bench_run(many, secs, &rn, &b50, &b99);
	if (rc) {
		fprintf(stderr, "moe-client bench: %s\n", moet_strerror(rc));
		return 1;
	}
	printf("%-10s %14s %12s %12s\n", "clients", "round trips/s", "p50 us", "p99 us");
	printf("%-10u %14.0f %12.2f %12.2f\n", 1u, r1, (double)a50 / 1e3, (double)a99 / 1e3);
	printf("%-10u %14.0f %12.2f %12.2f\n", many, rn, (double)b50 / 1e3, (double)b99 / 1e3);
	printf("(one round trip = ACQUIRE NOWAIT of a resident expert + RELEASE, both through the ring;\n"
	       " p50/p99 are the worst client's)\n");
	printf("moe-client bench: ratio=%.2f (%u clients / 1 client, round trips/s)\n", rn / r1, many);
	return 0;
}

static void progress(size_t done, size_t total, bool tty)
{
	if (!tty || !total)
		return;
	int w = 40, k = (int)((double)done / (double)total * w);
	fprintf(stderr, "\r[%.*s%*s] %zu/%zu tokens", k, "########################################", w - k, "", done, total);
	if (done == total)
		fprintf(stderr, "\n");
}

/* --cold: every expert of the host tier is evicted so the next prompt
 * starts from an empty cache (moe-sim's default). Loads still in flight
 * (prefetches) are waited for. */
static int evict_all(moet_ctx *c, const struct moet_model_info *mi)
{
	for (int tries = 0; tries < 5000; tries++) {
		unsigned busy = 0;
		for (uint32_t l = 0; l < mi->n_moe_layers; l++)
			for (uint32_t e = 0; e < mi->n_experts; e++) {
				int r = moet_evict(c, l, e, MOET_TIER_HOST);
				if (r == -EBUSY)
					busy++;
				else if (r < 0 && r != -ENOENT)
					return r;
			}
		if (!busy)
			return 0;
		struct timespec ts = { 0, 1000000 };
		nanosleep(&ts, NULL);
	}
	return -EBUSY;
}

static void sleep_us(long us)
{
	struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };
	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

/* Experts the daemon answered an error for (slot < -1: a negative errno). */
struct failed_set {
	uint64_t total;
	unsigned n;
	struct {
		uint32_t layer, expert;
		int err;
		uint64_t times;
	} v[8];
};

static void note_failed(struct failed_set *f, uint32_t layer, uint32_t expert, int32_t slot)
{
	f->total++;
	for (unsigned i = 0; i < f->n && i < 8; i++)
		if (f->v[i].layer == layer && f->v[i].expert == expert) {
			f->v[i].times++;
			return;
		}
	if (f->n < 8)
		f->v[f->n] = (typeof(f->v[0])){ layer, expert, -slot, 1 };
	f->n++;
}

static void report_failed(const struct failed_set *f)
{
	for (unsigned i = 0; i < f->n && i < 8; i++)
		fprintf(stderr, "moe-client replay: layer %u expert %u: %s (%s), %" PRIu64 " times\n", f->v[i].layer,
			f->v[i].expert, errno_name(f->v[i].err), strerror(f->v[i].err), f->v[i].times);
	if (f->n > 8)
		fprintf(stderr, "moe-client replay: and %u more experts failed\n", f->n - 8);
}

static int cmd_replay(int argc, char **argv)
{
	bool nowait_only = false, cold = false, hints = true, brief = false;
	unsigned want = 0; /* --gpu: ask for the GPU tier (promote host -> GPU) */
	long max_tokens = -1, layer_us = 0;
	int first = -1;
	for (int i = 0; i < argc; i++) {
		if (!strcmp(argv[i], "--nowait-only"))
			nowait_only = true;
		else if (!strcmp(argv[i], "--cold"))
			cold = true;
		else if (!strcmp(argv[i], "--gpu"))
			want = MOET_F_WANT_GPU;
		else if (!strcmp(argv[i], "--no-hints"))
			hints = false;
		else if (!strcmp(argv[i], "--brief"))
			brief = true;
		else if (!strcmp(argv[i], "--layer-us") && i + 1 < argc)
			layer_us = atol(argv[++i]);
		else if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
			max_tokens = atol(argv[++i]);
		else if (argv[i][0] == '-' && argv[i][1]) {
			fprintf(stderr, "moe-client replay: unknown option '%s'\n", argv[i]);
			return 2;
		} else if (first < 0)
			first = i;
	}
	if (first < 0) {
		fprintf(stderr, "moe-client replay: need TRACE files\n");
		return 2;
	}
	moet_ctx *c;
	if (connect_or_die(&c, "moe-client replay"))
		return 1;
	struct moet_model_info mi = { .size = sizeof(mi) };
	moet_model_info(c, &mi);
	bool tty = isatty(2);
	uint64_t lookups = 0, hit[2] = { 0, 0 }, miss = 0, unserved = 0, stall_ns = 0;
	struct failed_set failed = { 0 };
	size_t n_lat = 0, cap_lat = 1 << 16, tokens = 0;
	uint64_t *lat = malloc(cap_lat * sizeof(*lat));
	bool folded = false;
	int rc = 0;
	uint64_t t_start = now_ns();
	for (int a = first; a < argc && rc == 0 && lat; a++) {
		if (argv[a][0] == '-')
			continue;
		if (!strcmp(argv[a], "--tokens") || !strcmp(argv[a], "--layer-us")) {
			a++;
			continue;
		}
		if (cold && (rc = evict_all(c, &mi)))
			break;
		struct trace *tr;
		struct moe_error err;
		if ((rc = trace_load(argv[a], &tr, &err))) {
			fprintf(stderr, "moe-client replay: %s\n", err.msg);
			break;
		}
		if (tr->max_expert >= mi.n_experts)
			folded = true;
		/* Trace rows name model layers (first_layer + li): a row for a
		 * layer without routed experts is an error, not MoE layer 0. */
		uint32_t step = mi.moe_layer_step ? mi.moe_layer_step : 1;
		if (tr->first_layer < mi.first_moe_layer || (tr->first_layer - mi.first_moe_layer) % step) {
			fprintf(stderr,
				"moe-client replay: %s: trace layer %u has no routed experts in model %s "
				"(its MoE layers are %u + i x %u)\n",
				argv[a], tr->first_layer, mi.name, mi.first_moe_layer, step);
			trace_free(tr);
			rc = -EINVAL;
			break;
		}
		size_t nt = tr->n_tokens;
		if (max_tokens >= 0 && (size_t)max_tokens < nt)
			nt = (size_t)max_tokens;
		for (size_t t = 0; t < nt && rc == 0; t++) {
			/* Announce the token (its text's key, its position) before
			 * its first layer, as an engine would after sampling it. */
			if (hints && (rc = moet_set_token(c, predict_token_key(tr->token && tr->token[t] ? tr->token[t] : ""),
							  (uint32_t)t)))
				break;
			for (uint32_t li = 0; li < tr->n_layers && rc == 0; li++) {
				uint8_t cnt = tr->count[(size_t)t * tr->n_layers + li];
				if (!cnt)
					continue;
				/* A trace from a bigger model is folded onto this one. */
				uint32_t id = tr->first_layer + li, ids[MOET_MAX_BATCH];
				if ((id - mi.first_moe_layer) % step)
					continue; /* a dense layer between MoE layers */
				uint32_t layer = (id - mi.first_moe_layer) / step;
				if (layer >= mi.n_moe_layers) {
					folded = true;
					layer %= mi.n_moe_layers;
				}
				unsigned n = 0;
				const uint16_t *row = trace_row(tr, (uint32_t)t, li);
				for (unsigned k = 0; k < cnt && n < MOET_MAX_BATCH; k++) {
					uint32_t e = row[k] % mi.n_experts;
					bool dup = false;
					for (unsigned j = 0; j < n; j++)
						dup |= ids[j] == e;
					if (!dup)
						ids[n++] = e;
				}
				int32_t slots[MOET_MAX_BATCH];
				uint8_t tiers[MOET_MAX_BATCH];
				moet_lease l1 = 0, l2 = 0;
				uint64_t t0 = now_ns();
				int r = moet_acquire(c, layer, ids, n, MOET_F_NOWAIT | want, slots, tiers, &l1);
				if (r < 0) {
					rc = r;
					break;
				}
				lookups += n;
				uint32_t missing[MOET_MAX_BATCH];
				unsigned nm = 0;
				for (unsigned k = 0; k < n; k++) {
					if (slots[k] >= 0)
						hit[tiers[k] ? 1 : 0]++;
					else if (slots[k] < -1)
						note_failed(&failed, layer, ids[k], slots[k]);
					else
						missing[nm++] = ids[k];
				}
				miss += nm;
				if (nm && !nowait_only) {
					uint64_t s0 = now_ns();
					int32_t s2[MOET_MAX_BATCH];
					r = moet_acquire(c, layer, missing, nm, want, s2, NULL, &l2);
					if (r < 0) {
						rc = r;
						break;
					}
					for (unsigned k = 0; k < nm; k++)
						if (s2[k] < -1)
							note_failed(&failed, layer, missing[k], s2[k]);
					unserved += nm - (unsigned)r;
					stall_ns += now_ns() - s0;
				}
				uint64_t t1 = now_ns();
				if (n_lat == cap_lat) {
					uint64_t *nl = realloc(lat, 2 * cap_lat * sizeof(*lat));
					if (nl) {
						lat = nl;
						cap_lat *= 2;
					}
				}
				if (n_lat < cap_lat)
					lat[n_lat++] = t1 - t0;
				if ((r = moet_release(c, l1)) || (r = moet_release(c, l2))) {
					rc = r;
					break;
				}
				/* The layer's compute, during which prefetches land. */
				if (layer_us > 0)
					sleep_us(layer_us);
			}
			tokens++;
			if (tokens % 16 == 0 || t + 1 == nt)
				progress(t + 1, nt, tty);
		}
		trace_free(tr);
	}
	double el = (double)(now_ns() - t_start) / 1e9;
	if (rc) {
		fprintf(stderr, "moe-client replay: %s\n", moet_strerror(rc));
		free(lat);
		moet_close(c);
		return 1;
	}
	qsort(lat, n_lat, sizeof(*lat), cmp_u64);
	double L = lookups ? (double)lookups : 1;
	report_failed(&failed);
	if (brief) {
		printf("hit=%.4f gpu=%.4f host=%.4f lookups=%" PRIu64 " tokens=%zu unserved=%" PRIu64 " failed=%" PRIu64 "\n",
		       (double)(hit[0] + hit[1]) / L, (double)hit[0] / L, (double)hit[1] / L, lookups, tokens, unserved,
		       failed.total);
		free(lat);
		moet_close(c);
		return unserved || failed.total ? 1 : 0;
	}
	printf("replayed %zu tokens, %" PRIu64 " expert lookups in %.2f s%s\n", tokens, lookups, el,
	       folded ? " (trace folded onto the model: layer % layers, expert % experts)" : "");
	printf("hit rate:      gpu %.1f%%  host %.1f%%  miss %.1f%%\n", 100.0 * (double)hit[0] / L,
	       100.0 * (double)hit[1] / L, 100.0 * (double)miss / L);
	printf("stall time:    %.3f s total, %.1f us per token%s\n", (double)stall_ns / 1e9,
	       tokens ? (double)stall_ns / 1e3 / (double)tokens : 0.0, nowait_only ? " (--nowait-only: misses not waited for)" : "");
	printf("acquire:       p50 %.1f us  p99 %.1f us (per layer, misses included)\n",
	       (double)pct(lat, n_lat, 0.5) / 1e3, (double)pct(lat, n_lat, 0.99) / 1e3);
	if (unserved)
		printf("unserved:      %" PRIu64 " experts could not be loaded in time\n", unserved);
	if (failed.total)
		printf("failed:        %" PRIu64 " expert lookups answered an error (%u distinct experts)\n", failed.total,
		       failed.n);
	free(lat);
	moet_close(c);
	return unserved || failed.total ? 1 : 0;
}

/* Where a MoLAE latent pack's B matrices are: one line per (layer, group),
 * every group of every layer by default. */
static int cmd_basis(int argc, char **argv)
{
	uint32_t v[2] = { 0, 0 };
	if (argc > 2) {
		fprintf(stderr, "moe-client basis: [LAYER [GROUP]]\n");
		return 2;
	}
	for (int i = 0; i < argc; i++) {
		char *end;
		unsigned long x = strtoul(argv[i], &end, 10);
		if (*end || end == argv[i] || x > UINT32_MAX) {
			fprintf(stderr, "moe-client basis: bad number '%s'\n", argv[i]);
			return 2;
		}
		v[i] = (uint32_t)x;
	}
	moet_ctx *c;
	if (connect_or_die(&c, "moe-client basis"))
		return 1;
	struct moet_model_info mi = { .size = sizeof(mi) };
	int rc = moet_model_info(c, &mi);
	const uint32_t l0 = argc ? v[0] : 0, l1 = argc ? v[0] + 1 : mi.n_moe_layers;
	unsigned shown = 0;
	for (uint32_t l = l0; rc == 0 && l < l1; l++)
		for (uint32_t g = argc > 1 ? v[1] : 0;; g++) {
			struct moet_latent_basis b = { .size = sizeof(b) };
			rc = moet_latent_basis(c, l, g, &b);
			if (rc == -ERANGE && argc < 2 && g > 0) {
				rc = 0; /* past this layer's last group */
				break;
			}
			if (rc)
				break;
			printf("layer %-4u group %-4u %s", l, g, b.tier == MOET_TIER_GPU ? "gpu " : "host");
			if (b.tier == MOET_TIER_GPU)
				printf(" offset %-12" PRIu64, b.offset);
			printf(" %u x %u x 2 f32, %" PRIu64 " bytes\n", b.rows, b.cols, b.bytes);
			shown++;
			if (argc > 1)
				break;
		}
	if (rc) {
		fprintf(stderr, "moe-client basis: %s", moet_strerror(rc));
		if (*moet_last_error(c))
			fprintf(stderr, ": %s", moet_last_error(c));
		fprintf(stderr, "\n");
	}
	moet_close(c);
	return rc || !shown ? 1 : 0;
}

static int spin_opt(int argc, char **argv, int *i)
{
	if (strcmp(argv[*i], "--spin-us") || *i + 1 >= argc)
		return 0;
	spin_us = atoi(argv[++*i]);
	return 1;
}

int main(int argc, char **argv)
{
	struct cli_global g = { .prog = "moe-client", .usage = usage, .extra = spin_opt };
	int i = cli_parse_global(&g, argc, argv);
	if (i < 0)
		return i == -1 ? 0 : 2;
	sock_path = g.sock_path;
	model_name = g.model_name;
	const char *cmd = argv[i++];
	if (!strcmp(cmd, "info"))
		return cmd_info();
	if (!strcmp(cmd, "acquire"))
		return cmd_acquire(argc - i, argv + i);
	if (!strcmp(cmd, "route"))
		return cmd_route(argc - i, argv + i);
	if (!strcmp(cmd, "bench"))
		return cmd_bench(argc - i, argv + i);
	if (!strcmp(cmd, "basis"))
		return cmd_basis(argc - i, argv + i);
	if (!strcmp(cmd, "replay"))
		return cmd_replay(argc - i, argv + i);
	fprintf(stderr, "moe-client: unknown command '%s'\n", cmd);
	usage(stderr);
	return 2;
}
