/* test_bpf.c - the eBPF programs through their loader (daemon/bpf.c): a
 * known number of O_DIRECT reads shows up in iolat with plausible latencies;
 * arena faults stay 0 on a pre-faulted arena and count each touched page of
 * one that is not, for this process and for another; runqlat sees this
 * process's threads wake; a program that cannot load (no privileges,
 * injected fault, --no-bpf) leaves a reason and the others keep working.
 * Needs root (CAP_BPF + CAP_PERFMON) and an eBPF build: skipped otherwise. */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bpf.h"
#include "fault.h"

static void need_bpf(void)
{
#ifndef HAVE_BPF
	cr_skip_test("built without eBPF (--enable-bpf)");
#endif
	if (geteuid() != 0)
		cr_skip_test("needs root (CAP_BPF and CAP_PERFMON) to load eBPF programs");
}

static struct bpf_obs *start_or_skip(const struct bpf_obs_config *cfg, enum bpf_obs_prog p)
{
	struct bpf_obs *o = NULL;

	cr_assert_eq(bpf_obs_start(cfg, &o), 0);
	if (!bpf_obs_attached(o, p)) {
		char why[256];
		snprintf(why, sizeof(why), "%s: %s", bpf_obs_prog_name(p), bpf_obs_status(o, p));
		bpf_obs_stop(o);
		cr_skip_test("%s", why); /* e.g. a kernel without BTF or bpf_find_vma */
	}
	return o;
}

/* A file on a block device (the build tree's file system); -1 to skip. */
static int data_file(char *path, size_t len, dev_t *dev)
{
	const char *dir = getenv("MOETIER_BUILDDIR");
	struct stat st;

	snprintf(path, len, "%s/test_bpf.XXXXXX", dir ? dir : ".");
	int fd = mkstemp(path);
	if (fd < 0 || fstat(fd, &st) < 0 || major(st.st_dev) == 0) {
		if (fd >= 0) {
			close(fd);
			unlink(path);
		}
		return -1; /* tmpfs, overlay: no block device under it */
	}
	*dev = st.st_dev;
	return fd;
}

Test(bpf, direct_reads_counted_with_plausible_latency, .timeout = 120)
{
	need_bpf();
	enum { N = 200, BLK = 4096 };
	char path[4096];
	dev_t dev;
	int fd = data_file(path, sizeof(path), &dev);
	if (fd < 0)
		cr_skip_test("the build tree is not on a block device");
	void *buf = aligned_alloc(BLK, 1 << 20);
	memset(buf, 0x5a, 1 << 20);
	for (int i = 0; i < N * BLK / (1 << 20) + 1; i++)
		cr_assert_eq(pwrite(fd, buf, 1 << 20, (off_t)i << 20), 1 << 20);
	cr_assert_eq(fsync(fd), 0);
	close(fd);
	fd = open(path, O_RDONLY | O_DIRECT);
	cr_assert_geq(fd, 0);

	struct bpf_obs_config cfg = { .n_devs = 1, .devs = { dev } };
	struct bpf_obs *o = start_or_skip(&cfg, BPF_OBS_IOLAT);
	struct bpf_obs_snapshot before, after;
	cr_assert_eq(bpf_obs_read(o, &before), 0);
	for (int i = 0; i < N; i++) /* distinct blocks, scattered: one request each */
		cr_assert_eq(pread(fd, buf, BLK, (off_t)((i * 37) % N) * BLK), BLK);
	cr_assert_eq(bpf_obs_read(o, &after), 0);
	const struct hist *l0 = &before.io[0][IOLAT_READ].lat_us, *l1 = &after.io[0][IOLAT_READ].lat_us;
	uint64_t reqs = l1->count - l0->count, us = l1->sum - l0->sum;
	cr_assert_geq(reqs, N, "iolat saw %llu read requests for %d O_DIRECT reads",
		      (unsigned long long)reqs, N);
	cr_assert(us / reqs >= 1 && us / reqs < 1000000, "mean read latency %llu us is not plausible",
		  (unsigned long long)(us / reqs));
	uint64_t p50 = bpf_obs_hist_quantile(l1, 0.5);
	cr_assert(p50 >= 2 && p50 <= (1u << 21), "p50 %llu us", (unsigned long long)p50);
	/* request sizes: at least N of 4 KiB (slot 12 holds [4096, 8192)) */
	cr_assert_geq(after.io[0][IOLAT_READ].size.slots[12] - before.io[0][IOLAT_READ].size.slots[12], N);
	char *t = bpf_obs_render_text(o, &after), *j = bpf_obs_render_json(o, &after),
	     *p = bpf_obs_render_prometheus(o, &after);
	cr_assert(t && strstr(t, "bpf_iolat dev="), "%s", t);
	cr_assert(j && strstr(j, "\"iolat\":[{\"dev\""), "%s", j);
	cr_assert(p && strstr(p, "moetier_block_request_seconds_bucket{dev="), "%s", p);
	cr_assert(strstr(p, "le=\"+Inf\""));
	free(t);
	free(j);
	free(p);
	bpf_obs_stop(o);
	close(fd);
	unlink(path);
	free(buf);
}

static int arena(size_t len, bool prefault, struct bpf_obs_config *cfg, unsigned idx, const char *name)
{
	/* the mapping is made (and its range given) by the caller */
	struct stat st;
	int fd = memfd_create(name, MFD_CLOEXEC);

	cr_assert_geq(fd, 0);
	cr_assert_eq(ftruncate(fd, (off_t)len), 0);
	if (prefault)
		cr_assert_eq(fallocate(fd, 0, 0, (off_t)len), 0);
	cr_assert_eq(fstat(fd, &st), 0);
	cfg->arenas[idx].dev = st.st_dev;
	cfg->arenas[idx].ino = st.st_ino;
	snprintf(cfg->arenas[idx].name, sizeof(cfg->arenas[idx].name), "%s", name);
	cfg->n_arenas = idx + 1;
	return fd;
}

Test(bpf, arena_faults_zero_when_prefaulted_counted_when_not, .timeout = 60)
{
	need_bpf();
	enum { PAGES = 64 };
	const size_t len = PAGES * 4096;
	struct bpf_obs_config cfg = { 0 };
	int hot = arena(len, true, &cfg, 0, "hot");
	int cold = arena(len, false, &cfg, 1, "cold");
	/* the daemon's way: map, populate, lock before anything watches */
	uint8_t *h = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, hot, 0);
	cr_assert_neq(h, MAP_FAILED);
	cr_assert_eq(madvise(h, len, MADV_POPULATE_WRITE), 0);
	uint8_t *c = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, cold, 0);
	cr_assert_neq(c, MAP_FAILED);
	cfg.arenas[0].base = h;
	cfg.arenas[0].len = len;
	cfg.arenas[1].base = c;
	cfg.arenas[1].len = len;
	struct bpf_obs *o = start_or_skip(&cfg, BPF_OBS_FAULTS);

	for (size_t i = 0; i < len; i += 4096)
		h[i]++;
	for (size_t i = 0; i < len; i += 4096)
		c[i] = 1; /* one fault per page */
	/* a client: another process mapping the arena read-only */
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		const uint8_t *r = mmap(NULL, len, PROT_READ, MAP_SHARED, cold, 0);
		unsigned sum = 0;
		for (size_t i = 0; r != MAP_FAILED && i < len; i += 4096)
			sum += r[i];
		_exit(sum == PAGES ? 0 : 1);
	}
	int st;
	cr_assert_eq(waitpid(pid, &st, 0), pid);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);

	struct bpf_obs_snapshot s;
	cr_assert_eq(bpf_obs_read(o, &s), 0);
	cr_assert_eq(s.faults.daemon[0], 0, "pre-faulted arena faulted %llu times",
		     (unsigned long long)s.faults.daemon[0]);
	cr_assert_eq(s.faults.clients[0], 0);
	cr_assert_geq(s.faults.daemon[1], PAGES, "cold arena: %llu faults for %d pages",
		      (unsigned long long)s.faults.daemon[1], PAGES);
	/* A read fault maps up to 16 resident pages around it (fault-around,
	 * 64 KiB by default), so the client faults at least PAGES / 16 times.
	 * The parent's pages, the hot arena's, are never touched by the child. */
	cr_assert_geq(s.faults.clients[1], PAGES / 16, "client mapping: %llu faults for %d pages",
		      (unsigned long long)s.faults.clients[1], PAGES);
	cr_assert_geq(s.faults.daemon_total, s.faults.daemon[1]);
	bpf_obs_stop(o);
	munmap(h, len);
	munmap(c, len);
	close(hot);
	close(cold);
}

static int pipes[2][2];

static void *pong(void *arg)
{
	char b;
	(void)arg;
	while (read(pipes[0][0], &b, 1) == 1 && b)
		cr_assert_eq(write(pipes[1][1], &b, 1), 1);
	return NULL;
}

Test(bpf, runqlat_sees_this_process_threads_wake, .timeout = 60)
{
	need_bpf();
	struct bpf_obs_config cfg = { 0 };
	struct bpf_obs *o = start_or_skip(&cfg, BPF_OBS_RUNQLAT);
	pthread_t t;
	char b = 1;

	cr_assert_eq(pipe(pipes[0]), 0);
	cr_assert_eq(pipe(pipes[1]), 0);
	cr_assert_eq(pthread_create(&t, NULL, pong, NULL), 0);
	for (int i = 0; i < 500; i++) { /* every round trip wakes both threads */
		cr_assert_eq(write(pipes[0][1], &b, 1), 1);
		cr_assert_eq(read(pipes[1][0], &b, 1), 1);
	}
	b = 0;
	cr_assert_eq(write(pipes[0][1], &b, 1), 1);
	pthread_join(t, NULL);
	struct bpf_obs_snapshot s;
	cr_assert_eq(bpf_obs_read(o, &s), 0);
	cr_assert_geq(s.runq.count, 500, "runqlat saw %llu waits", (unsigned long long)s.runq.count);
	cr_assert_lt(bpf_obs_hist_quantile(&s.runq, 0.5), 1u << 20);
	bpf_obs_stop(o);
}

Test(bpf, a_program_that_cannot_load_leaves_a_reason, .timeout = 60)
{
	need_bpf();
	struct bpf_obs_config cfg = { .disabled = true };
	struct bpf_obs *o = NULL;

	cr_assert_eq(bpf_obs_start(&cfg, &o), 0);
	for (int p = 0; p < BPF_OBS_NPROGS; p++) {
		cr_assert_not(bpf_obs_attached(o, p));
		cr_assert(strstr(bpf_obs_status(o, p), "--no-bpf"), "%s", bpf_obs_status(o, p));
	}
	bpf_obs_stop(o);

	/* An unprivileged process: every program refused, with the reason. */
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		if (setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534))
			_exit(2);
		struct bpf_obs_config c2 = { 0 };
		struct bpf_obs *o2 = NULL;
		if (bpf_obs_start(&c2, &o2) != 0)
			_exit(3);
		const char *why = bpf_obs_status(o2, BPF_OBS_RUNQLAT);
		_exit(!bpf_obs_attached(o2, BPF_OBS_RUNQLAT) && strstr(why, "not available: load failed") &&
		      strstr(why, "CAP_BPF") ? 0 : 4);
	}
	int st;
	cr_assert_eq(waitpid(pid, &st, 0), pid);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "unprivileged load: status %d", WEXITSTATUS(st));

#ifdef MOETIER_FAULT_INJECTION
	/* An injected load failure: the first program fails, the next loads. */
	cr_assert_eq(fault_arm(FAULT_BPF_LOAD, 0, 1), 0);
	struct bpf_obs_config c3 = { 0 };
	o = NULL;
	cr_assert_eq(bpf_obs_start(&c3, &o), 0);
	cr_assert(strstr(bpf_obs_status(o, BPF_OBS_RUNQLAT), "injected"), "%s", bpf_obs_status(o, BPF_OBS_RUNQLAT));
	fault_disarm_all();
	bpf_obs_stop(o);
	o = NULL;
	cr_assert_eq(bpf_obs_start(&c3, &o), 0);
	cr_assert(bpf_obs_attached(o, BPF_OBS_RUNQLAT), "%s", bpf_obs_status(o, BPF_OBS_RUNQLAT));
	bpf_obs_stop(o);
#endif
}
