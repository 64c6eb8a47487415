/* ring-vs-socket - the same ACQUIRE + RELEASE of a resident expert through
 * the shared-memory ring and over the unix socket (SUBMIT messages), in the
 * same run, against an in-process moetierd server; pinned (client on CPU 0,
 * ring thread and event loop on CPU 1) and unpinned. One sample = one
 * ACQUIRE(NOWAIT) + one RELEASE, i.e. two request/response exchanges.
 *
 * usage: ring-vs-socket [--pack FILE] [--iters N] [--spin-us N]
 * Without --pack a tiny model is generated with tools/moe-gen + moe-pack
 * found next to this program's build directory. */
#include "config.h"

#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "moetier/moetier.h"
#include "options.h"
#include "server.h"
#include "util.h"

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static void *loop_main(void *arg)
{
	struct moe_error err;
	if (server_run(arg, &err))
		fprintf(stderr, "ring-vs-socket: server: %s\n", err.msg);
	return NULL;
}

static int pin_self(int cpu)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	if (cpu < 0)
		for (int i = 0; i < CPU_SETSIZE; i++)
			CPU_SET(i, &set);
	else
		CPU_SET(cpu, &set);
	return pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

struct result {
	double p50, p99;
};

static int measure(moet_ctx *c, bool ring, unsigned iters, struct result *r)
{
	uint64_t *lat = malloc(sizeof(*lat) * iters);
	uint32_t id = 0;
	struct moet_sqe q;
	struct moet_cqe e;
	if (!lat)
		return -ENOMEM;
	for (unsigned i = 0; i < iters + iters / 10; i++) {
		uint64_t t0 = moe_now_ns();
		int rc;
		if (ring) {
			int32_t slot;
			moet_lease l;
			rc = moet_acquire(c, 0, &id, 1, MOET_F_NOWAIT, &slot, NULL, &l);
			if (rc == 1)
				rc = moet_release(c, l);
			else if (rc >= 0)
				rc = -EAGAIN;
		} else {
			memset(&q, 0, sizeof(q));
			q.opcode = MOET_OP_ACQUIRE;
			q.flags = MOET_F_NOWAIT;
			q.count = 1;
			rc = moet_submit_socket(c, &q, &e);
			if (rc == 0 && e.result == 1) {
				q.opcode = MOET_OP_RELEASE;
				q.lease = e.lease;
				rc = moet_submit_socket(c, &q, &e);
				if (rc == 0)
					rc = e.result;
			} else if (rc == 0) {
				rc = -EAGAIN;
			}
		}
		uint64_t t1 = moe_now_ns();
		if (rc < 0) {
			free(lat);
			return rc;
		}
		if (i >= iters / 10) /* the first tenth warms up */
			lat[i - iters / 10] = t1 - t0;
	}
	qsort(lat, iters, sizeof(*lat), cmp_u64);
	r->p50 = (double)lat[iters / 2] / 1e3;
	r->p99 = (double)lat[(size_t)((double)iters * 0.99)] / 1e3;
	free(lat);
	return 0;
}

int main(int argc, char **argv)
{
	const char *pack = NULL;
	unsigned iters = 20000;
	int spin_us = 200;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--pack") && i + 1 < argc)
			pack = argv[++i];
		else if (!strcmp(argv[i], "--iters") && i + 1 < argc)
			iters = (unsigned)atoi(argv[++i]);
		else if (!strcmp(argv[i], "--spin-us") && i + 1 < argc)
			spin_us = atoi(argv[++i]);
		else {
			fprintf(stderr, "usage: ring-vs-socket [--pack FILE] [--iters N] [--spin-us N]\n");
			return 2;
		}
	}
	if (iters < 100)
		iters = 100;
	char tmpl[] = "/tmp/ring-vs-socket.XXXXXX";
	char *dir = mkdtemp(tmpl);
	char path[PATH_MAX], cmd[3 * PATH_MAX], sock[PATH_MAX];
	if (!dir || chmod(dir, 0755))
		return 1;
	if (!pack) {
		char self[PATH_MAX];
		ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
		if (n <= 0)
			return 1;
		self[n] = '\0';
		char *bd = dirname(dirname(self)); /* <build>/bench/ring-vs-socket; libtool: .libs */
		if (!strcmp(strrchr(bd, '/') ? strrchr(bd, '/') + 1 : bd, "bench"))
			bd = dirname(bd);
		snprintf(path, sizeof(path), "%s/tiny.moepack", dir);
		snprintf(cmd, sizeof(cmd),
			 "%s/tools/moe-gen model --family qwen2_moe --preset tiny --out %s/src >/dev/null && "
			 "%s/tools/moe-pack convert %s/src -o %s -q", bd, dir, bd, dir, path);
		if (system(cmd) != 0) {
			fprintf(stderr, "ring-vs-socket: could not make a model (%s)\n", cmd);
			return 1;
		}
		pack = path;
	}
	snprintf(sock, sizeof(sock), "%s/s.sock", dir);
	struct moetierd_config cfg;
	struct moe_error err;
	char spin[32];
	snprintf(spin, sizeof(spin), "%d", spin_us);
	options_init(&cfg);
	if (options_set(&cfg, "pack", pack, &err) || options_set(&cfg, "socket", sock, &err) ||
	    options_set(&cfg, "socket-group", "", &err) || options_set(&cfg, "host-bytes", "1M", &err) ||
	    options_set(&cfg, "ring-spin-us", spin, &err) || options_set(&cfg, "log-level", "warn", &err)) {
		fprintf(stderr, "ring-vs-socket: %s\n", err.msg);
		return 1;
	}
	moe_log_init("ring-vs-socket", MOE_LOG_WARN, false);
	server_block_signals(NULL);
	struct server *srv;
	if (server_create(&cfg, &srv, &err) || server_start(srv, &err)) {
		fprintf(stderr, "ring-vs-socket: %s\n", err.msg);
		return 1;
	}
	pthread_t loop;
	pthread_create(&loop, NULL, loop_main, srv);
	moet_ctx *c = NULL;
	struct moet_connect_opts o = { sizeof(o), sock, NULL, "ring-vs-socket", MOET_CAP_RING, 0, spin_us };
	for (int i = 0; i < 100 && moet_connect(&o, &c); i++)
		usleep(20000);
	if (!c) {
		fprintf(stderr, "ring-vs-socket: cannot attach\n");
		return 1;
	}
	uint32_t id = 0;
	int32_t slot;
	moet_lease hold;
	if (moet_acquire(c, 0, &id, 1, 0, &slot, NULL, &hold) != 1) { /* load + keep resident */
		fprintf(stderr, "ring-vs-socket: warm-up acquire failed\n");
		return 1;
	}
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	struct result res[2][2]; /* [pinned][ring] */
	int rc = 0;
	for (int pinned = 1; pinned >= 0 && !rc; pinned--) {
		if (pinned && ncpu >= 2) {
			pin_self(0);
			server_pin_ring_thread(srv, 1);
			cpu_set_t one;
			CPU_ZERO(&one);
			CPU_SET(1, &one);
			pthread_setaffinity_np(loop, sizeof(one), &one);
		} else {
			pin_self(-1);
			server_pin_ring_thread(srv, -1);
			cpu_set_t all;
			CPU_ZERO(&all);
			for (int i = 0; i < CPU_SETSIZE; i++)
				CPU_SET(i, &all);
			pthread_setaffinity_np(loop, sizeof(all), &all);
		}
		for (int ring = 1; ring >= 0 && !rc; ring--)
			rc = measure(c, ring, ring ? iters : iters / 4, &res[pinned][ring]);
	}
	moet_release(c, hold);
	moet_close(c);
	server_stop(srv);
	pthread_join(loop, NULL);
	server_destroy(srv);
	options_free(&cfg);
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "ring-vs-socket: could not remove %s\n", dir);
	if (rc) {
		fprintf(stderr, "ring-vs-socket: %s\n", moet_strerror(rc));
		return 1;
	}
	printf("ACQUIRE(NOWAIT, resident expert) + RELEASE, %u samples (socket: %u), %ld CPUs, spin %d us\n", iters,
	       iters / 4, ncpu, spin_us);
	printf("%-10s %-8s %10s %10s\n", "placement", "path", "p50 us", "p99 us");
	for (int pinned = 1; pinned >= 0; pinned--)
		for (int ring = 1; ring >= 0; ring--)
			printf("%-10s %-8s %10.2f %10.2f\n", pinned ? (ncpu >= 2 ? "pinned" : "pinned(1)") : "unpinned",
			       ring ? "ring" : "socket", res[pinned][ring].p50, res[pinned][ring].p99);
	printf("ring-vs-socket: ratio=%.1f (socket p50 / ring p50, pinned)\n", res[1][0].p50 / res[1][1].p50);
	return 0;
}
