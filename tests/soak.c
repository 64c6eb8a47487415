/* soak.c - many clients against one running moetierd for a bounded time:
 *
 *   soak --socket S --pack P [--clients 64] [--seconds 20] [--pid PID]
 *   soak --socket S --pack P --all
 *
 * Each client (a thread with its own connection) does random ACQUIRE
 * (blocking and NOWAIT, host or GPU tier), ROUTE, COMPUTE, PREFETCH and
 * RELEASE, holding a few leases at a time. Every expert served is compared,
 * byte for byte, with its extent read from the pack (read here with
 * pack_read_expert, CRC checked); every COMPUTE result with the same FFN
 * run here on those bytes (kernels/ffn.h). With --pid, the daemon's RSS
 * (anonymous: RssAnon) and open descriptors are sampled: it must stay flat after the warm-up (the
 * first quarter), and its descriptors must be back to their count before
 * the clients once they have gone.
 *
 * --all instead asks for every expert once (one client, blocking, retried
 * while it misses) and requires each to be served with the pack's bytes:
 * the check after a restart (tests/test_crash.sh).
 *
 * Ends with one line:
 *   soak: C clients x O operations, B bytes checked, F failures, rss A -> Z KiB, fds X -> Y
 * and exits 0 only when nothing failed. */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ffn.h"
#include "moetier/moetier.h"
#include "pack.h"

static const char *sock_path;
static struct pack_file *pack;
static uint8_t **ref;           /* [layer * n_experts + e]: the extent's payload */
static struct ffn_layout layout;
static bool have_layout;
static uint32_t n_layers, n_experts, top_k, hidden;
static uint64_t payload;
static uint64_t deadline_ns;
static _Atomic uint64_t n_ops, n_bytes, n_fail, n_served, n_miss, n_quota, n_compute_checked;
static _Atomic int n_attached;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	if (atomic_fetch_add(&n_fail, 1) < 20) {
		fputs("soak: FAIL: ", stderr);
		vfprintf(stderr, fmt, ap);
		fputc('\n', stderr);
	}
	va_end(ap);
}

static uint32_t rnd(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return (uint32_t)(*s >> 11);
}

/* Checks what an acquire or route answered; returns experts served. */
static unsigned check_served(moet_ctx *c, uint32_t layer, const uint32_t *ids, unsigned n, const int32_t *slots,
			     const uint8_t *tiers)
{
	unsigned served = 0;
	for (unsigned i = 0; i < n; i++) {
		if (slots[i] >= 0) {
			const void *p = moet_slot_ptr(c, tiers[i], slots[i]);
			if (!p) {
				fail("layer %u expert %u: slot %d of tier %u has no mapping", layer, ids[i], slots[i], tiers[i]);
				continue;
			}
			if (memcmp(p, ref[layer * n_experts + ids[i]], payload))
				fail("layer %u expert %u: the bytes served (tier %u slot %d) are not the pack's", layer, ids[i],
				     tiers[i], slots[i]);
			atomic_fetch_add(&n_bytes, payload);
			served++;
		} else if (slots[i] == -EDQUOT) {
			atomic_fetch_add(&n_quota, 1);
		} else if (slots[i] == -1) {
			atomic_fetch_add(&n_miss, 1);
		} else {
			fail("layer %u expert %u: %s", layer, ids[i], strerror(-slots[i]));
		}
	}
	atomic_fetch_add(&n_served, served);
	return served;
}

static void pick(uint64_t *s, uint32_t *ids, unsigned n)
{
	for (unsigned i = 0; i < n; i++) {
		bool dup;
		do {
			ids[i] = rnd(s) % n_experts;
			dup = false;
			for (unsigned j = 0; j < i; j++)
				dup |= ids[j] == ids[i];
		} while (dup);
	}
}

static void do_compute(moet_ctx *c, uint64_t *s)
{
	uint32_t layer = rnd(s) % n_layers, k = 2, ex[2];
	float w[2] = { 0.75f, 0.25f };
	float *x = malloc(hidden * sizeof(float)), *y = calloc(hidden, sizeof(float)),
	      *want = calloc(hidden, sizeof(float));
	pick(s, ex, k);
	for (uint32_t i = 0; i < hidden; i++)
		x[i] = (float)((int)(rnd(s) % 2001) - 1000) / 1000.0f;
	int rc = moet_compute(c, layer, 1, k, ex, w, x, y);
	if (rc == 1 && have_layout) {
		const void *ext[2] = { ref[layer * n_experts + ex[0]], ref[layer * n_experts + ex[1]] };
		if (ffn_moe_token(&layout, ext, w, k, x, want, 1) == 0) {
			for (uint32_t i = 0; i < hidden; i++)
				if (!(fabsf(y[i] - want[i]) <= 1e-4f * (1.0f + fabsf(want[i])))) {
					fail("COMPUTE layer %u experts %u,%u: y[%u] = %g, expected %g", layer, ex[0], ex[1], i,
					     (double)y[i], (double)want[i]);
					break;
				}
			atomic_fetch_add(&n_compute_checked, 1);
		}
	} else if (rc < 0 && rc != -EAGAIN && rc != -EOPNOTSUPP && rc != MOET_E_CAPS) {
		fail("COMPUTE: %s", moet_last_error(c));
	}
	free(x);
	free(y);
	free(want);
}

static void *client_main(void *arg)
{
	uint64_t seed = (uintptr_t)arg * 0x9E3779B97F4A7C15ull + 1;
	char name[32];
	snprintf(name, sizeof(name), "soak-%u", (unsigned)(uintptr_t)arg);
	struct moet_connect_opts o = { sizeof(o), sock_path, NULL, name, 0, 0, 0 };
	moet_ctx *c = NULL;
	int rc = moet_connect(&o, &c);
	if (rc) {
		fail("%s: connect: %s", name, moet_strerror(rc));
		return NULL;
	}
	atomic_fetch_add(&n_attached, 1);
	/* a lease or two held across operations, as a decoder holds a
	 * layer's experts while it computes; more would lease the arena */
	moet_lease held[2] = { 0 };
	while (now_ns() < deadline_ns) {
		unsigned op = rnd(&seed) % 100;
		uint32_t layer = rnd(&seed) % n_layers, ids[MOET_MAX_BATCH];
		int32_t slots[MOET_MAX_BATCH];
		uint8_t tiers[MOET_MAX_BATCH];
		moet_lease lease = 0;
		if (op < 45) {
			unsigned n = 1 + rnd(&seed) % (top_k < 4 ? 4 : top_k);
			if (n > n_experts)
				n = n_experts;
			pick(&seed, ids, n);
			unsigned flags = (rnd(&seed) & 1 ? MOET_F_NOWAIT : 0) | (rnd(&seed) % 4 == 0 ? MOET_F_WANT_GPU : 0);
			rc = moet_acquire(c, layer, ids, n, flags, slots, tiers, &lease);
			if (rc < 0)
				fail("%s: ACQUIRE: %s", name, moet_last_error(c));
			else
				check_served(c, layer, ids, n, slots, tiers);
		} else if (op < 65) {
			float logits[256];
			uint32_t ex[MOET_MAX_BATCH];
			float w[MOET_MAX_BATCH];
			for (uint32_t i = 0; i < n_experts && i < 256; i++)
				logits[i] = (float)(rnd(&seed) % 1000) / 100.0f;
			rc = moet_route(c, layer, logits, n_experts, rnd(&seed) & 1 ? MOET_F_NOWAIT : 0, ex, w, slots, tiers,
					&lease);
			if (rc < 0)
				fail("%s: ROUTE: %s", name, moet_last_error(c));
			else
				check_served(c, layer, ex, (unsigned)rc, slots, tiers);
		} else if (op < 75) {
			do_compute(c, &seed);
		} else if (op < 80) {
			unsigned n = 1 + rnd(&seed) % 4;
			pick(&seed, ids, n < n_experts ? n : n_experts);
			moet_prefetch(c, layer, ids, n < n_experts ? n : n_experts, MOET_TIER_HOST);
		} else {
			/* RELEASE of a held lease */
			unsigned h = rnd(&seed) % 2;
			if (held[h] && (rc = moet_release(c, held[h])) != 0)
				fail("%s: RELEASE: %s", name, moet_last_error(c));
			held[h] = 0;
		}
		if (lease) {
			unsigned h = rnd(&seed) % 2;
			if (held[h] && moet_release(c, held[h]))
				fail("%s: RELEASE: %s", name, moet_last_error(c));
			held[h] = lease;
		}
		atomic_fetch_add(&n_ops, 1);
	}
	for (unsigned h = 0; h < 2; h++)
		if (held[h] && moet_release(c, held[h]))
			fail("%s: RELEASE: %s", name, moet_last_error(c));
	moet_close(c);
	return NULL;
}

/* --all: one client asks for every expert of every layer (blocking,
 * retried while it misses) and checks each against the reference; every
 * one must be served. Returns the failures. */
static int check_all(void)
{
	struct moet_connect_opts o = { sizeof(o), sock_path, NULL, "soak-all", 0, 0, 0 };
	moet_ctx *c = NULL;
	int rc = moet_connect(&o, &c);
	if (rc) {
		fail("connect: %s", moet_strerror(rc));
		return 1;
	}
	unsigned served = 0;
	for (uint32_t l = 0; l < n_layers; l++)
		for (uint32_t e = 0; e < n_experts; e++) {
			int32_t slot = -1;
			uint8_t tier = 0;
			for (int t = 0; t < 50 && slot == -1; t++) {
				moet_lease lease = 0;
				if (moet_acquire(c, l, &e, 1, 0, &slot, &tier, &lease) < 0) {
					fail("ACQUIRE layer %u expert %u: %s", l, e, moet_last_error(c));
					break;
				}
				if (slot >= 0)
					served += check_served(c, l, &e, 1, &slot, &tier);
				else if (slot != -1)
					fail("layer %u expert %u: %s", l, e, strerror(-slot));
				if (lease)
					moet_release(c, lease);
			}
			if (slot == -1)
				fail("layer %u expert %u: never served", l, e);
		}
	moet_close(c);
	printf("soak: all %u experts of %u layers: %u served and checked (%llu bytes), %llu failures\n", n_experts,
	       n_layers, served, (unsigned long long)n_bytes, (unsigned long long)n_fail);
	return n_fail ? 1 : 0;
}

/* The daemon's anonymous resident memory (RssAnon: its heap and stacks,
 * where a leak grows). VmRSS also counts the shared memory of the arenas
 * and of the clients' rings (RssShmem), which follows which pages the
 * clients touched and when they are unmapped, not leaks: a run here saw it
 * rise by 19 MiB as 64 clients left, then fall. */
static long rss_kib(int pid)
{
	char p[64], line[256];
	long v = -1;
	snprintf(p, sizeof(p), "/proc/%d/status", pid);
	FILE *f = fopen(p, "r");
	while (f && fgets(line, sizeof(line), f))
		if (sscanf(line, "RssAnon: %ld", &v) == 1)
			break;
	if (f)
		fclose(f);
	return v;
}

static int n_fds(int pid)
{
	char p[64];
	int n = 0;
	snprintf(p, sizeof(p), "/proc/%d/fd", pid);
	DIR *d = opendir(p);
	struct dirent *de;
	while (d && (de = readdir(d)))
		n += de->d_name[0] != '.';
	if (d)
		closedir(d);
	return d ? n : -1;
}

int main(int argc, char **argv)
{
	const char *pack_path = NULL;
	unsigned clients = 64, seconds = 20;
	int pid = 0;
	long rss_slack_kib = 16384;
	static const struct option lo[] = { { "socket", 1, 0, 's' }, { "pack", 1, 0, 'p' },   { "clients", 1, 0, 'c' },
					    { "seconds", 1, 0, 't' }, { "pid", 1, 0, 'P' },    { "rss-slack", 1, 0, 'r' },
					    { "all", 0, 0, 'a' },    { "help", 0, 0, 'h' },   { 0, 0, 0, 0 } };
	bool all = false;
	int ch;
	while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (ch) {
		case 's': sock_path = optarg; break;
		case 'p': pack_path = optarg; break;
		case 'c': clients = (unsigned)atoi(optarg); break;
		case 't': seconds = (unsigned)atoi(optarg); break;
		case 'P': pid = atoi(optarg); break;
		case 'r': rss_slack_kib = atol(optarg); break;
		case 'a': all = true; break;
		default:
			fprintf(stderr, "usage: soak --socket S --pack P [--clients N] [--seconds N] [--pid PID] [--rss-slack KiB] [--all]\n");
			return ch == 'h' ? 0 : 2;
		}
	}
	if (!sock_path || !pack_path || clients == 0 || clients > 1024) {
		fprintf(stderr, "soak: --socket and --pack are required (clients 1..1024)\n");
		return 2;
	}
	struct moe_error err = { "" };
	if (pack_open(pack_path, 0, &pack, &err)) {
		fprintf(stderr, "soak: %s\n", err.msg);
		return 1;
	}
	n_layers = pack->model->n_moe_layers;
	n_experts = pack->model->n_experts;
	top_k = pack->model->top_k;
	hidden = pack->model->hidden;
	payload = pack->hdr->extent_payload;
	ref = calloc((size_t)n_layers * n_experts, sizeof(*ref));
	for (uint32_t l = 0; l < n_layers; l++)
		for (uint32_t e = 0; e < n_experts; e++) {
			uint8_t **r = &ref[l * n_experts + e];
			if (posix_memalign((void **)r, 4096, pack_extent_bytes(pack)) ||
			    pack_read_expert(pack, l, e, *r, &err)) {
				fprintf(stderr, "soak: the reference: %s\n", err.msg);
				return 1;
			}
		}
	if (all)
		return check_all();
	have_layout = ffn_layout_init(&layout, pack->model, pack->hdr->parts, pack->hdr->n_parts,
				      pack_extent_bytes(pack), &err) == 0;
	int fds0 = pid ? n_fds(pid) : -1;
	long rss0 = -1, rss_max = -1;
	uint64_t t0 = now_ns();
	deadline_ns = t0 + (uint64_t)seconds * 1000000000ull;
	pthread_t *th = calloc(clients, sizeof(*th));
	for (unsigned i = 0; i < clients; i++)
		pthread_create(&th[i], NULL, client_main, (void *)(uintptr_t)(i + 1));
	int fds_mid = -1;
	while (now_ns() < deadline_ns) {
		usleep(200000);
		if (!pid)
			continue;
		long r = rss_kib(pid);
		if (rss0 < 0 && now_ns() - t0 >= (deadline_ns - t0) / 4) {
			rss0 = r;
			fds_mid = n_fds(pid);
		}
		if (rss0 >= 0 && r > rss_max)
			rss_max = r;
		if (getenv("SOAK_VERBOSE"))
			fprintf(stderr, "soak: t=%.1fs rss %ld KiB fds %d ops %llu\n", (double)(now_ns() - t0) / 1e9, r,
				n_fds(pid), (unsigned long long)atomic_load(&n_ops));
	}
	for (unsigned i = 0; i < clients; i++)
		pthread_join(th[i], NULL);
	long rss1 = -1;
	int fds1 = -1;
	/* the daemon reaps closed clients on its own threads, and its RSS
	 * jumps for a moment while it tears 64 rings down: up to 5 s to settle */
	for (int i = 0; pid && i < 50; i++) {
		fds1 = n_fds(pid);
		rss1 = rss_kib(pid);
		if (fds1 <= fds0 && (rss0 <= 0 || rss1 <= rss0 + rss_slack_kib))
			break;
		usleep(100000);
	}
	if ((unsigned)atomic_load(&n_attached) != clients)
		fail("%d of %u clients attached", atomic_load(&n_attached), clients);
	if (pid && rss0 > 0 && rss_max > rss0 + rss_slack_kib)
		fail("the daemon's RSS grew from %ld KiB (after the warm-up) to %ld KiB", rss0, rss_max);
	if (pid && rss0 > 0 && rss1 > rss0 + rss_slack_kib)
		fail("the daemon's RSS grew from %ld KiB (after the warm-up) to %ld KiB once the clients left", rss0, rss1);
	if (pid && fds1 != fds0)
		fail("the daemon has %d descriptors open after the clients left, %d before", fds1, fds0);
	if (atomic_load(&n_bytes) == 0)
		fail("no expert was ever served: nothing was checked");
	printf("soak: %u clients x %llu operations (%llu experts served and checked, %llu misses, %llu over share, "
	       "%llu computes checked), %llu bytes checked, %llu failures, rss %ld -> %ld KiB (max %ld), fds %d -> %d "
	       "(%d during)\n",
	       clients, (unsigned long long)n_ops, (unsigned long long)n_served, (unsigned long long)n_miss,
	       (unsigned long long)n_quota, (unsigned long long)n_compute_checked, (unsigned long long)n_bytes,
	       (unsigned long long)n_fail, rss0, rss1, rss_max, fds0, fds1, fds_mid);
	for (size_t i = 0; i < (size_t)n_layers * n_experts; i++)
		free(ref[i]);
	free(ref);
	free(th);
	pack_close(pack);
	return n_fail ? 1 : 0;
}
