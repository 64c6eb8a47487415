/* ffn_bench.h - what the expert-FFN benchmarks (ffn-vs-openblas, ffn-vs-ggml)
 * share: cold copies of one expert's weights cycled through so every call
 * reads from DRAM, timing by CPU time with medians, the synthetic expert
 * itself, and the load average line. Header-only (static functions): each
 * benchmark is one program. */
#ifndef MOETIER_BENCH_FFN_BENCH_H
#define MOETIER_BENCH_FFN_BENCH_H

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "dtype.h"
#include "ffn.h"
#include "model.h"
#include "pack.h"
#include "util.h"

/* ---- cold copies of one expert -------------------------------------------- */

struct fb_copies {
	uint8_t *base;
	size_t stride, count, total, next;
};

/* At least `target` bytes of copies (>= 2) of `bytes` bytes each, 4 KiB apart. */
static inline void fb_copies_init(struct fb_copies *c, const void *one, size_t bytes, size_t target, const char *prog)
{
	c->stride = MOE_ALIGN_UP(bytes, (size_t)4096);
	c->count = target / c->stride + 1;
	if (c->count < 2)
		c->count = 2;
	c->total = c->stride * c->count;
	c->base = mmap(NULL, c->total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (c->base == MAP_FAILED) {
		fprintf(stderr, "%s: mmap: %s\n", prog, strerror(errno));
		exit(1);
	}
	madvise(c->base, c->total, MADV_HUGEPAGE);
	for (size_t i = 0; i < c->count; i++)
		memcpy(c->base + i * c->stride, one, bytes);
	c->next = 0;
}

static inline uint8_t *fb_copies_next(struct fb_copies *c)
{
	uint8_t *p = c->base + c->next * c->stride;
	c->next = (c->next + 1) % c->count;
	return p;
}

static inline void fb_copies_free(struct fb_copies *c)
{
	munmap(c->base, c->total);
}

/* ---- measurement ------------------------------------------------------------ */

typedef void (*fb_run_fn)(void *ctx);

/* Seconds per call, wall clock and CPU time (clock: CLOCK_THREAD_CPUTIME_ID
 * or CLOCK_PROCESS_CPUTIME_ID), calls repeated for at least min_time of CPU
 * time. On a loaded 2-vCPU VM the wall time mostly measures the scheduler,
 * so the ratios use CPU time; both are printed. */
struct fb_tm {
	double wall, cpu;
};

static inline double fb_cpu_s(clockid_t clock)
{
	struct timespec ts;
	clock_gettime(clock, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline struct fb_tm fb_time_calls(fb_run_fn fn, void *ctx, double min_time, clockid_t clock)
{
	const uint64_t t0 = moe_now_ns();
	const double c0 = fb_cpu_s(clock);
	double c;
	long calls = 0;
	do {
		fn(ctx);
		calls++;
		c = fb_cpu_s(clock);
	} while (c - c0 < min_time);
	return (struct fb_tm){ (double)(moe_now_ns() - t0) * 1e-9 / (double)calls, (c - c0) / (double)calls };
}

static inline int fb_cmp_d(const void *a, const void *b)
{
	const double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static inline double fb_median(double *v, int n)
{
	qsort(v, (size_t)n, sizeof(double), fb_cmp_d);
	return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static inline struct fb_tm fb_median2(const struct fb_tm *v, int n)
{
	double w[100], c[100];
	for (int i = 0; i < n; i++)
		w[i] = v[i].wall, c[i] = v[i].cpu;
	return (struct fb_tm){ fb_median(w, n), fb_median(c, n) };
}

/* ---- the synthetic expert ---------------------------------------------------- */

static inline float fb_frand(uint64_t *s)
{
	*s = *s * 6364136223846793005ull + 1442695040888963407ull;
	return (float)((*s >> 40) / 8388608.0) - 1.0f;
}

/* Rows of cols floats encoded in dt. */
typedef void (*fb_encode_fn)(enum moe_dtype dt, const float *row, uint32_t cols, uint8_t *dst);

/* One SwiGLU expert (n hidden, m wide) of random weights (scale 0.03, like
 * trained FFNs) in dt, as a pack extent: gate | up | down, 4 KiB aligned.
 * Fills L and returns the extent (malloc'd) and its size. */
static inline uint8_t *fb_expert(struct ffn_layout *L, enum moe_family family, enum moe_dtype dt, uint32_t n, uint32_t m,
			  fb_encode_fn encode, size_t *bytes, const char *prog)
{
	struct moe_model_config cfg;
	struct pack_part_desc parts[3];
	uint64_t rb_in, rb_dn, off = 0;
	struct moe_error err = { { 0 } };

	memset(&cfg, 0, sizeof(cfg));
	moe_model_set_family_defaults(&cfg, family);
	cfg.hidden = n;
	cfg.expert_width = m;
	moe_dtype_row_bytes(dt, n, &rb_in);
	moe_dtype_row_bytes(dt, m, &rb_dn);
	parts[0] = (struct pack_part_desc){ PACK_ROLE_GATE, dt, m, n, off, rb_in * m };
	off += MOE_ALIGN_UP(rb_in * m, 4096ull);
	parts[1] = (struct pack_part_desc){ PACK_ROLE_UP, dt, m, n, off, rb_in * m };
	off += MOE_ALIGN_UP(rb_in * m, 4096ull);
	parts[2] = (struct pack_part_desc){ PACK_ROLE_DOWN, dt, n, m, off, rb_dn * n };
	off += MOE_ALIGN_UP(rb_dn * n, 4096ull);
	if (ffn_layout_init(L, &cfg, parts, 3, off, &err)) {
		fprintf(stderr, "%s: %s\n", prog, err.msg);
		exit(1);
	}
	uint8_t *one = calloc(1, off);
	float *row = malloc(sizeof(float) * (n > m ? n : m));
	uint64_t seed = 7;
	if (!one || !row) {
		fprintf(stderr, "%s: out of memory\n", prog);
		exit(1);
	}
	for (int p = 0; p < 3; p++) {
		const uint64_t rb = p < 2 ? rb_in : rb_dn;
		for (uint32_t r = 0; r < parts[p].rows; r++) {
			for (uint32_t c = 0; c < parts[p].cols; c++)
				row[c] = 0.03f * fb_frand(&seed);
			encode(dt, row, parts[p].cols, one + parts[p].offset + r * rb);
		}
	}
	free(row);
	*bytes = off;
	return one;
}

/* The options both benchmarks take: --quick (fewer, shorter measurements)
 * and --reps N. Returns the arguments consumed at argv[i] (0: not ours). */
static inline int fb_common_opt(int argc, char **argv, int i, bool *quick, int *reps)
{
	if (!strcmp(argv[i], "--quick")) {
		*quick = true;
		return 1;
	}
	if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
		*reps = atoi(argv[i + 1]);
		return 2;
	}
	return 0;
}

/* What --quick means, and the bounds on --reps. */
static inline void fb_settle_opts(bool quick, int *reps, double *min_time)
{
	if (quick) {
		*min_time = 0.08;
		if (*reps > 3)
			*reps = 3;
	}
	if (*reps < 1 || *reps > 100)
		*reps = 5;
}

/* /proc/loadavg's line, for the report (the machine is shared). */
static inline void fb_load_avg(char *buf, size_t len)
{
	FILE *f = fopen("/proc/loadavg", "r");
	buf[0] = 0;
	if (f) {
		if (!fgets(buf, (int)len, f))
			buf[0] = 0;
		fclose(f);
		buf[strcspn(buf, "\n")] = 0;
	}
}

#endif
