/* test_ffn_pool.c - the kernels' persistent thread pool (kernels/ffn.c):
 * threads are created once, not per product; any thread count, several
 * callers at once and a forked child all give the bits of one thread. */
#include "config.h"

#include <criterion/criterion.h>
#include <dirent.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "dtype.h"
#include "ffn.h"

#define ROWS 67 /* not a multiple of the row alignment (4) nor of the thread counts */
#define COLS 256
#define B 3

static uint8_t *g_w[2];
static const enum moe_dtype g_dt[2] = { MOE_DTYPE_Q8_0, MOE_DTYPE_F32 };
static float g_x[B * COLS];
static float g_ref[2][B * ROWS];

static uint64_t rng = 88172645463325252ull;
static float rnd(void)
{
	rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
	return (float)((rng >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

/* The thread ids of this process, sorted, in tids[cap]; how many. */
static int cmp_int(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }
static int list_tasks(int *tids, int cap)
{
	DIR *d = opendir("/proc/self/task");
	int n = 0;
	struct dirent *e;
	cr_assert(d != NULL);
	while ((e = readdir(d)) != NULL)
		if (e->d_name[0] != '.' && n < cap)
			tids[n++] = atoi(e->d_name);
	closedir(d);
	qsort(tids, (size_t)n, sizeof(int), cmp_int);
	return n;
}

static void setup(void)
{
	float row[COLS];
	g_w[0] = malloc((size_t)ROWS * (COLS / 32) * sizeof(struct moe_block_q8_0));
	g_w[1] = malloc((size_t)ROWS * COLS * sizeof(float));
	cr_assert(g_w[0] && g_w[1]);
	for (uint32_t r = 0; r < ROWS; r++) {
		for (uint32_t c = 0; c < COLS; c++)
			row[c] = rnd();
		moe_quantize_row_q8_0(row, (struct moe_block_q8_0 *)g_w[0] + (size_t)r * (COLS / 32), COLS);
		memcpy(g_w[1] + (size_t)r * COLS * sizeof(float), row, sizeof(row));
	}
	for (size_t i = 0; i < B * COLS; i++)
		g_x[i] = rnd();
	for (int k = 0; k < 2; k++)
		cr_assert_eq(ffn_matmul(g_dt[k], g_w[k], ROWS, COLS, g_x, COLS, B, g_ref[k], ROWS, 1), 0);
}

static void teardown(void)
{
	free(g_w[0]);
	free(g_w[1]);
}

/* 0 when `iters` products at `threads` all give the one-thread bits. */
static int run_checked(int iters, int threads)
{
	float y[B * ROWS];
	for (int i = 0; i < iters; i++) {
		int k = i & 1;
		memset(y, 0xff, sizeof(y));
		if (ffn_matmul(g_dt[k], g_w[k], ROWS, COLS, g_x, COLS, B, y, ROWS, threads) != 0)
			return 1;
		if (memcmp(y, g_ref[k], sizeof(y)) != 0)
			return 2;
	}
	return 0;
}

TestSuite(ffn_pool, .init = setup, .fini = teardown);

Test(ffn_pool, thousand_products_create_no_thread, .timeout = 60)
{
	cr_assert_eq(run_checked(1, 2), 0); /* the pool's first worker */
	int before[64], after[64];
	const int n = list_tasks(before, 64);
	const uint32_t created = ffn_pool_threads_created();
	cr_assert_geq(n, 2, "the pool keeps no worker between calls");
	cr_assert_eq(run_checked(1000, 2), 0, "a product at -t 2 differs from -t 1");
	/* the same threads, not as many new ones */
	cr_assert_eq(list_tasks(after, 64), n, "threads came or went");
	cr_assert(memcmp(before, after, sizeof(int) * (size_t)n) == 0, "other threads than before");
	cr_assert_eq(ffn_pool_threads_created(), created, "threads created per call");
}

Test(ffn_pool, every_thread_count_same_bits, .timeout = 60)
{
	const uint32_t created0 = ffn_pool_threads_created();
	for (int t = 1; t <= 8; t++)
		cr_assert_eq(run_checked(10, t), 0, "-t %d differs from -t 1", t);
	/* grown to the largest count (7 workers beside the caller), then reused;
	 * 100 threads are more than 67 rows have pieces of 4 (17) */
	const uint32_t created = ffn_pool_threads_created();
	cr_assert_eq(created - created0, 7);
	cr_assert_eq(run_checked(10, 100), 0);
	cr_assert_eq(ffn_pool_threads_created() - created0, 16);
	for (int t = 100; t >= 1; t--)
		cr_assert_eq(run_checked(10, t), 0, "-t %d differs from -t 1", t);
	cr_assert_eq(ffn_pool_threads_created() - created0, 16);
}

static void *caller(void *p)
{
	return (void *)(intptr_t)run_checked(300, (int)(intptr_t)p);
}

/* Callers that meet the pool busy run their pieces themselves: same bits,
 * no deadlock. */
Test(ffn_pool, concurrent_callers, .timeout = 60)
{
	pthread_t t[4];
	for (int i = 0; i < 4; i++)
		cr_assert_eq(pthread_create(&t[i], NULL, caller, (void *)(intptr_t)(i + 2)), 0);
	for (int i = 0; i < 4; i++) {
		void *rc;
		pthread_join(t[i], &rc);
		cr_assert_eq((intptr_t)rc, 0, "caller %d got other bits", i);
	}
}

struct pf {
	uint32_t n;
	int threads;
	_Atomic uint32_t pieces;
	uint8_t *hit;
	int inner_bad;
};

static void pf_body(void *p, uint32_t lo, uint32_t hi)
{
	struct pf *s = p;
	atomic_fetch_add(&s->pieces, 1);
	for (uint32_t i = lo; i < hi; i++)
		s->hit[i]++;
	/* a piece that calls the kernels with threads: no deadlock, same bits */
	if (lo == 0 && run_checked(1, 2))
		s->inner_bad = 1;
}

/* ffn_parallel_for: every index once, min(threads, n) pieces, no new
 * threads once the pool is grown. */
Test(ffn_pool, parallel_for, .timeout = 60)
{
	for (int t = 1; t <= 6; t++)
		for (uint32_t n = 0; n <= 9; n++) {
			uint8_t hit[9] = { 0 };
			struct pf s = { .n = n, .threads = t, .hit = hit };
			ffn_parallel_for(t, n, pf_body, &s);
			for (uint32_t i = 0; i < n; i++)
				cr_assert_eq(hit[i], 1, "t %d n %u: index %u run %u times", t, n, i, hit[i]);
			cr_assert_eq(atomic_load(&s.pieces), n == 0 ? 1u : (uint32_t)(t < (int)n ? t : (int)n));
			cr_assert_eq(s.inner_bad, 0);
		}
	const uint32_t created = ffn_pool_threads_created();
	for (int i = 0; i < 500; i++) {
		uint8_t hit[9] = { 0 };
		struct pf s = { .n = 9, .threads = 4, .hit = hit };
		ffn_parallel_for(4, 9, pf_body, &s);
		cr_assert_eq(s.inner_bad, 0);
	}
	cr_assert_eq(ffn_pool_threads_created(), created);
}

/* Idle workers sleep: over 300 ms with no call the process uses well under
 * a core (a pool that kept spinning would use 3 x 300 ms here). */
Test(ffn_pool, idle_workers_sleep, .timeout = 60)
{
	struct timespec a, b, nap = { 0, 300 * 1000 * 1000 };
	cr_assert_eq(run_checked(5, 4), 0);
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &a);
	nanosleep(&nap, NULL);
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &b);
	const double used = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) * 1e-9;
	cr_assert_lt(used, 0.05, "idle pool used %.3f s of CPU in 0.3 s", used);
}

/* The parent's workers do not exist in a child: it gets a pool of its own. */
Test(ffn_pool, fork_child_has_a_pool, .timeout = 60)
{
	cr_assert_eq(run_checked(20, 3), 0);
	for (int round = 0; round < 3; round++) {
		pid_t pid = fork();
		cr_assert(pid >= 0);
		if (pid == 0) {
			alarm(20); /* a deadlocked child dies instead of hanging the test */
			const uint32_t before = ffn_pool_threads_created();
			int rc = run_checked(200, 3);
			/* two workers of its own, created once */
			_exit(rc ? 10 + rc : ffn_pool_threads_created() == before + 2 ? 0 : 20);
		}
		/* the parent keeps using its pool meanwhile */
		cr_assert_eq(run_checked(50, 2), 0);
		int st;
		cr_assert_eq(waitpid(pid, &st, 0), pid);
		cr_assert(WIFEXITED(st), "child killed by signal %d", WIFSIGNALED(st) ? WTERMSIG(st) : 0);
		cr_assert_eq(WEXITSTATUS(st), 0, "child: %d", WEXITSTATUS(st));
	}
}
