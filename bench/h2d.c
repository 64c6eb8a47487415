/* bench/h2d - host slot -> GPU tier copies through a backend's (emulated by
 * default; --backend vmm|uvm on a machine with a GPU) full path (tier_gpu_copy_in: queue, worker memcpy, event fd, reap) against
 * a plain memcpy of the same bytes, in the same run, for several expert
 * sizes (16.5 MiB is a DeepSeek-class expert). Each round copies one batch
 * (every slot once) from distinct host slots; both sides write memory that
 * was touched before (the arena's slots are filled once before timing, as
 * the daemon's are after warm-up), and the two are measured alternately so
 * the shared machine's noise hits both. Prints a table, then
 * `h2d: ratio=X (...)` where X = memcpy time / our time at 16.5 MiB (>= 1
 * means no slower than memcpy). */
#include <config.h>  /* autoconf's, from the build tree */

#include <getopt.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tier_gpu.h"
#include "util.h"

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static uint64_t median(uint64_t *v, int n)
{
	qsort(v, (size_t)n, sizeof(*v), cmp_u64);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* One batch through the GPU tier: submit every slot, reap until all are
 * done, evict (storage kept, like the daemon's steady state). */
static int tier_round(struct tier_gpu *g, const uint8_t *host, size_t bytes, uint32_t n,
		      uint64_t *ns)
{
	struct pollfd pfd = { .fd = tier_gpu_event_fd(g), .events = POLLIN };
	struct tier_gpu_done done[64];
	struct moe_error err;
	uint64_t t0 = moe_now_ns(), tok;
	uint32_t got = 0;

	for (uint32_t i = 0; i < n; i++)
		if (tier_gpu_copy_in(g, i, host + (size_t)i * bytes, bytes, &tok, &err) < 0) {
			fprintf(stderr, "h2d: copy_in: %s\n", err.msg);
			return -1;
		}
	while (got < n) {
		int k = tier_gpu_reap(g, done, 64);

		if (k < 0)
			return -1;
		for (int j = 0; j < k; j++)
			if (done[j].rc < 0) {
				fprintf(stderr, "h2d: copy failed: %d\n", done[j].rc);
				return -1;
			}
		got += (uint32_t)k;
		if (got < n && poll(&pfd, 1, 5000) <= 0) {
			fprintf(stderr, "h2d: no completion within 5 s\n");
			return -1;
		}
	}
	*ns = moe_now_ns() - t0;
	for (uint32_t i = 0; i < n; i++)
		tier_gpu_evict(g, i, false);
	return 0;
}

static void memcpy_round(uint8_t *dst, const uint8_t *host, size_t bytes, uint32_t n, uint64_t *ns)
{
	uint64_t t0 = moe_now_ns();

	for (uint32_t i = 0; i < n; i++)
		memcpy(dst + (size_t)i * bytes, host + (size_t)i * bytes, bytes);
	/* Keep the copies observable so they cannot be elided. */
	__asm__ volatile("" : : "r"(dst) : "memory");
	*ns = moe_now_ns() - t0;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: h2d [--backend emulated|vmm|uvm] [--slots N] [--rounds N] [--workers N]\n"
		"           [--sizes S,S,...]\n"
		"  host slot -> GPU tier copies vs memcpy of the same bytes (host to host)\n"
		"  defaults: --backend emulated --slots 8 --rounds 15 --workers 1\n"
		"            --sizes 64K,1M,4M,16.5M\n");
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "slots", required_argument, NULL, 's' },
		{ "rounds", required_argument, NULL, 'r' },
		{ "workers", required_argument, NULL, 'w' },
		{ "sizes", required_argument, NULL, 'z' },
		{ "backend", required_argument, NULL, 'b' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	char sizes_buf[256] = "64K,1M,4M,16.5M";
	const char *backend = "emulated";
	unsigned nslots = 8, rounds = 15, workers = 1;
	double ratio_expert = 0, ratio_min = 1e9;
	uint64_t expert = (16ull << 20) + (512ull << 10);
	bool have_expert = false;
	int c, rc = 0;

	while ((c = getopt_long(argc, argv, "s:r:w:z:b:h", opts, NULL)) != -1) {
		switch (c) {
		case 's': nslots = (unsigned)strtoul(optarg, NULL, 0); break;
		case 'r': rounds = (unsigned)strtoul(optarg, NULL, 0); break;
		case 'w': workers = (unsigned)strtoul(optarg, NULL, 0); break;
		case 'z': snprintf(sizes_buf, sizeof(sizes_buf), "%s", optarg); break;
		case 'b': backend = optarg; break;
		case 'h': usage(); return 0;
		default: usage(); return 2;
		}
	}
	if (nslots < 1 || nslots > 64 || rounds < 1 || rounds > 1000 || workers < 1 || workers > 16) {
		fprintf(stderr, "h2d: --slots 1..64, --rounds 1..1000, --workers 1..16\n");
		return 2;
	}
	moe_log_set_level(MOE_LOG_WARN);
	printf("%-10s %6s %6s %12s %12s %12s %12s %7s\n", "size", "slots", "rounds", "tier GB/s",
	       "memcpy GB/s", "tier ms/b", "memcpy ms/b", "ratio");
	for (char *save = NULL, *tok = strtok_r(sizes_buf, ",", &save); tok;
	     tok = strtok_r(NULL, ",", &save)) {
		struct tier_gpu_config cfg = { .backend = backend, .emu_workers = workers };
		uint64_t bytes, *t_tier, *t_mem, mt, mm;
		struct moe_error err;
		struct tier_gpu *g;
		uint8_t *host, *dst;
		char sz[32];
		double ratio;

		if (moe_parse_size(tok, &bytes) < 0 || bytes == 0 || bytes > (1ull << 30)) {
			fprintf(stderr, "h2d: bad size \"%s\"\n", tok);
			return 2;
		}
		cfg.slot_bytes = bytes;
		cfg.capacity = (uint64_t)nslots * MOE_ALIGN_UP(bytes, 4096);
		if (tier_gpu_create(&cfg, &g, &err) < 0) {
			fprintf(stderr, "h2d: %s\n", err.msg);
			return 1;
		}
		host = aligned_alloc(4096, MOE_ALIGN_UP(bytes * nslots, 4096));
		dst = aligned_alloc(4096, MOE_ALIGN_UP(bytes * nslots, 4096));
		t_tier = calloc(rounds, sizeof(*t_tier));
		t_mem = calloc(rounds, sizeof(*t_mem));
		if (!host || !dst || !t_tier || !t_mem) {
			fprintf(stderr, "h2d: out of memory\n");
			return 1;
		}
		for (size_t i = 0; i < bytes * nslots; i++)
			host[i] = (uint8_t)(i * 131 + 7);
		memset(dst, 1, bytes * nslots);  /* fault in the peer's destination */
		tier_gpu_register_host(g, host, bytes * nslots, NULL);
		/* Warm-up: both destinations touched, the arena's storage
		 * allocated (its first fill is the cuMemCreate analogue). */
		if (tier_round(g, host, bytes, nslots, &mt) < 0)
			return 1;
		memcpy_round(dst, host, bytes, nslots, &mm);
		for (unsigned r = 0; r < rounds; r++) {
			/* Alternate which goes first, so drift hits both. */
			if (r % 2) {
				memcpy_round(dst, host, bytes, nslots, &t_mem[r]);
				if (tier_round(g, host, bytes, nslots, &t_tier[r]) < 0)
					return 1;
			} else {
				if (tier_round(g, host, bytes, nslots, &t_tier[r]) < 0)
					return 1;
				memcpy_round(dst, host, bytes, nslots, &t_mem[r]);
			}
		}
		/* A copy is only worth timing if it is right: each slot is
		 * copied in and back out (device memory is not addressable
		 * here) and compared. */
		for (uint32_t i = 0; i < nslots; i++) {
			uint64_t tok2, tok3;

			memset(dst, 0, bytes);
			if (tier_gpu_copy_in(g, i, host + (size_t)i * bytes, bytes, &tok2, &err) < 0 ||
			    tier_gpu_wait(g, tok2, 5000) != 1 ||
			    tier_gpu_copy_out(g, i, dst, bytes, &tok3, &err) < 0 ||
			    tier_gpu_wait(g, tok3, 5000) != 1 ||
			    memcmp(dst, host + (size_t)i * bytes, bytes)) {
				fprintf(stderr, "h2d: slot %u does not hold what was copied\n", i);
				rc = 1;
			}
		}
		mt = median(t_tier, (int)rounds);
		mm = median(t_mem, (int)rounds);
		ratio = (double)mm / (double)(mt ? mt : 1);
		printf("%-10s %6u %6u %12.2f %12.2f %12.3f %12.3f %7.3f\n",
		       moe_fmt_size(bytes, sz, sizeof(sz)), nslots, rounds,
		       (double)(bytes * nslots) / (double)mt, (double)(bytes * nslots) / (double)mm,
		       (double)mt / 1e6, (double)mm / 1e6, ratio);
		if (ratio < ratio_min)
			ratio_min = ratio;
		if (bytes == expert) {
			ratio_expert = ratio;
			have_expert = true;
		}
		tier_gpu_unregister_host(g);
		tier_gpu_destroy(g);
		free(host);
		free(dst);
		free(t_tier);
		free(t_mem);
	}
	if (!have_expert)
		ratio_expert = ratio_min;
	printf("h2d: ratio=%.3f (memcpy time / %s GPU tier time, median of %u rounds of %u copies, "
	       "%s; min over sizes %.3f; target >= 0.9)\n",
	       ratio_expert, backend, rounds, nslots, have_expert ? "16.5 MiB experts" : "smallest ratio",
	       ratio_min);
	return rc;
}
