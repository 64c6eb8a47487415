/* test_ring.c - the shared-memory SPSC ring and its futex doorbell. */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ring.h"
#include "util.h"

struct shm {
	struct moet_ring_ctl a_ctl;
	uint64_t a[64];
	struct moet_ring_ctl b_ctl;
	uint64_t b[64];
	uint64_t cycles;
	int child_error;
};

static struct shm *map_shm(void)
{
	int fd = memfd_create("test-ring", MFD_CLOEXEC);
	cr_assert(fd >= 0);
	cr_assert_eq(ftruncate(fd, sizeof(struct shm)), 0);
	struct shm *s = mmap(NULL, sizeof(*s), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	cr_assert(s != MAP_FAILED);
	close(fd);
	memset(s, 0, sizeof(*s));
	return s;
}

Test(ring, fifo_order_full_empty_and_corruption, .timeout = 30)
{
	struct shm *s = map_shm();
	struct ring p, c;
	cr_assert_eq(ring_attach(&p, &s->a_ctl, s->a, 64, 8, true, true), 0);
	cr_assert_eq(ring_attach(&c, &s->a_ctl, s->a, 64, 8, false, false), 0);
	cr_assert_eq(ring_attach(&c, &s->a_ctl, s->a, 63, 8, false, false), -EINVAL);
	uint64_t v, next = 0, sent = 0;
	cr_expect_eq(ring_pop(&c, &v), 0);
	for (int round = 0; round < 1000; round++) {
		unsigned burst = (unsigned)(round * 7 % 70);
		for (unsigned i = 0; i < burst; i++) {
			int rc = ring_push(&p, &sent);
			if (rc == -EAGAIN) {
				cr_expect_eq(ring_space(&p), 0);
				break;
			}
			cr_assert_eq(rc, 0);
			sent++;
		}
		unsigned take = (unsigned)(round * 13 % 80);
		for (unsigned i = 0; i < take; i++) {
			int rc = ring_pop(&c, &v);
			if (rc == 0)
				break;
			cr_assert_eq(rc, 1);
			cr_assert_eq(v, next, "out of order: %lu vs %lu", (unsigned long)v, (unsigned long)next);
			next++;
		}
	}
	/* A peer publishing an impossible index is detected, not followed. */
	s->a_ctl.tail = c.local + 1000;
	cr_expect_eq(ring_pop(&c, &v), -EPROTO);
	s->a_ctl.head = p.local + 1000;
	cr_expect_eq(ring_push(&p, &v), -EPROTO);
	munmap(s, sizeof(*s));
}

static void rand_delay(unsigned *seed)
{
	unsigned r = rand_r(seed) % 8;
	if (r == 0)
		sched_yield();
	else if (r < 3) {
		uint64_t end = moe_now_ns() + (uint64_t)(rand_r(seed) % 20000);
		while (moe_now_ns() < end)
			;
	}
}

/* Ping-pong between two processes, every wait allowed to sleep on the
 * futex (spin windows of 0..3 us, often 0), random delays on both sides.
 * A lost wake-up hangs a side forever: the parent notices no progress for
 * 5 s and fails. Bounded to ~10 s (cycles counted, at most 2M). */
Test(ring, lost_wakeup_stress, .timeout = 60)
{
	struct shm *s = map_shm();
	struct ring ping_p, pong_c;
	ring_attach(&ping_p, &s->a_ctl, s->a, 64, 8, true, true);
	ring_attach(&pong_c, &s->b_ctl, s->b, 64, 8, true, false);
	const uint64_t max_cycles = 2000000, budget_ns = 10000000000ull;
	pid_t kid = fork();
	cr_assert(kid >= 0);
	if (kid == 0) {
		struct ring ping_c, pong_p;
		unsigned seed = 7;
		ring_attach(&ping_c, &s->a_ctl, s->a, 64, 8, false, false);
		ring_attach(&pong_p, &s->b_ctl, s->b, 64, 8, false, true);
		for (;;) {
			uint64_t v;
			int rc = ring_wait(&ping_c, (int64_t)(rand_r(&seed) % 4) * 1000, -1);
			if (rc || ring_pop(&ping_c, &v) != 1) {
				s->child_error = 1;
				_exit(1);
			}
			if (v == UINT64_MAX)
				_exit(0);
			rand_delay(&seed);
			if (ring_push(&pong_p, &v)) {
				s->child_error = 2;
				_exit(1);
			}
		}
	}
	/* Watchdog: a hung exchange fails the test instead of hanging it. */
	pid_t dog = fork();
	if (dog == 0) {
		uint64_t last = (uint64_t)-1;
		for (;;) {
			sleep(5);
			uint64_t now = __atomic_load_n(&s->cycles, __ATOMIC_RELAXED);
			if (now == last) {
				kill(getppid(), SIGABRT);
				kill(kid, SIGKILL);
				_exit(1);
			}
			last = now;
		}
	}
	unsigned seed = 3;
	uint64_t start = moe_now_ns(), i;
	for (i = 0; i < max_cycles && moe_now_ns() - start < budget_ns; i++) {
		uint64_t v;
		cr_assert_eq(ring_push(&ping_p, &i), 0);
		rand_delay(&seed);
		cr_assert_eq(ring_wait(&pong_c, (int64_t)(rand_r(&seed) % 4) * 1000, -1), 0);
		cr_assert_eq(ring_pop(&pong_c, &v), 1);
		cr_assert_eq(v, i);
		__atomic_store_n(&s->cycles, i + 1, __ATOMIC_RELAXED);
	}
	uint64_t stop = UINT64_MAX;
	cr_assert_eq(ring_push(&ping_p, &stop), 0);
	int st;
	waitpid(kid, &st, 0);
	kill(dog, SIGKILL);
	waitpid(dog, NULL, 0);
	cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child error %d", s->child_error);
	cr_log_info("%lu sleep/wake round trips in %.1f s", (unsigned long)i, (double)(moe_now_ns() - start) / 1e9);
	cr_expect_gt(i, 1000);
	munmap(s, sizeof(*s));
}

Test(ring, wait_times_out_when_nothing_comes, .timeout = 10)
{
	struct shm *s = map_shm();
	struct ring c;
	ring_attach(&c, &s->a_ctl, s->a, 64, 8, true, false);
	cr_expect_eq(ring_wait(&c, 1000, 20000000), -ETIMEDOUT);
	cr_expect_eq(s->a_ctl.waiting, 0u, "the consumer must clear its own flag");
	munmap(s, sizeof(*s));
}

Test(ring, region_layout_checked, .timeout = 10)
{
	struct moet_ring_region r;
	uint64_t total = ring_region_layout(&r, 256, 256, 1 << 20);
	cr_expect_eq(total % 4096, 0);
	cr_expect_eq(ring_region_check(&r, total), 0);
	cr_expect_eq(ring_region_check(&r, total - 4096), -EPROTO);
	r.scratch_bytes = total;
	cr_expect_eq(ring_region_check(&r, total), -EPROTO);
}
