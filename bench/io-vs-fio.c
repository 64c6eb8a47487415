/* io-vs-fio - whole-expert NVMe reads: moetierd's tier_nvme engine against
 * fio on the same extents, interleaved in one run.
 *
 * Builds (or takes) a pack with DeepSeek-V2-Lite-sized experts (bf16 gate |
 * up | down of 2048 x 1408: 17,301,504 bytes each), then for each pair and
 * each queue depth (1, 4, 8): drop caches, load every expert once in random
 * order through tier_nvme into a pre-faulted host arena (memfd, registered
 * buffers, the daemon's configuration); drop caches, read the same extents
 * with fio (io_uring, O_DIRECT, one read per expert, same queue depth). Also
 * measures the page-cache ways (mmap + memcpy as llama.cpp maps weights;
 * buffered pread) and tier_nvme with the CRC32C check the cache does.
 * Prints the table, then `io-vs-fio: ratio=X (...)`.
 *
 * --bpf-overhead (bench/bpf-overhead): instead, tier_nvme at QD 8 with the
 * daemon's eBPF programs (daemon/bpf.c: iolat on the pack's device, faults
 * on the arena, runqlat on this process) attached against detached, in A/B
 * pairs, and `bpf-overhead: ratio=X (throughput attached / detached)`.
 */
#define _GNU_SOURCE
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bpf.h"
#include "crc32c.h"
#include "pack.h"
#include "stats.h"
#include "tier_host.h"
#include "tier_nvme.h"

#define HIDDEN 2048
#define WIDTH 1408
#define EXPERTS_PER_LAYER 64
#define ARENA_SLOTS 16

struct run {
	double gbps, cpu; /* GB/s (1e9 B/s), CPU % of one core */
};

static struct pack_file *pack;
static uint32_t n_ext;
static uint64_t ext_bytes, first_off;
static struct tier_host *arena;
static const char *pack_path;
static char fio_job[256];

static double now_s(void) { return (double)moe_now_ns() / 1e9; }

static double cpu_s(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
	       (double)ru.ru_stime.tv_usec / 1e6;
}

/* Read requests the disk completed so far (field 1 of /sys/block/D/stat),
 * to show how many device requests one expert read became. 0 if unknown. */
static char disk_stat[PATH_MAX];
static uint64_t last_reqs;
static uint64_t disk_reads(void)
{
	unsigned long long v = 0;
	FILE *f = disk_stat[0] ? fopen(disk_stat, "re") : NULL;
	if (f) {
		if (fscanf(f, "%llu", &v) != 1)
			v = 0;
		fclose(f);
	}
	return v;
}

static void find_disk(const char *path)
{
	struct stat sb;
	char link[256], target[PATH_MAX];
	if (stat(path, &sb) != 0)
		return;
	/* /sys/dev/block/MAJ:MIN is the partition or the disk itself. */
	snprintf(link, sizeof(link), "/sys/dev/block/%u:%u/stat", major(sb.st_dev), minor(sb.st_dev));
	if (access(link, R_OK) == 0 && realpath(link, target))
		snprintf(disk_stat, sizeof(disk_stat), "%s", target);
}

static bool dropped_warned;
static void drop_caches(void)
{
	sync();
	int fd = open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC);
	if (fd < 0 || write(fd, "3\n", 2) != 2) {
		if (!dropped_warned)
			fprintf(stderr, "io-vs-fio: cannot drop caches (%s): page-cache rows are warm (run as root)\n",
				strerror(errno));
		dropped_warned = true;
	}
	if (fd >= 0)
		close(fd);
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t next_rand(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static void shuffle(uint32_t *v, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		v[i] = i;
	for (uint32_t i = n - 1; i > 0; i--) {
		uint32_t j = (uint32_t)(next_rand() % (i + 1));
		uint32_t t = v[i];
		v[i] = v[j];
		v[j] = t;
	}
}

static const struct pack_index_entry *ext_of(uint32_t i)
{
	return pack_expert(pack, i / EXPERTS_PER_LAYER, i % EXPERTS_PER_LAYER);
}

/* Every expert once, random order, through tier_nvme into arena slots. */
static struct run run_ours(unsigned qd, bool check_crc)
{
	struct stats *st = stats_new(0, 0);
	struct tier_nvme *n;
	struct moe_error err = { "" };
	struct tier_nvme_config cfg = { .queue_depth = qd, .buffers = tier_host_iovecs(arena),
					.n_buffers = tier_host_n_slots(arena) };
	if (tier_nvme_create(pack->fd_direct, &cfg, st, &n, &err) < 0) {
		fprintf(stderr, "io-vs-fio: %s\n", err.msg);
		exit(1);
	}
	uint32_t *order = malloc(sizeof(uint32_t) * n_ext);
	shuffle(order, n_ext);
	/* A slot is reused only once its read has completed: free slots are
	 * kept on a stack, the tag carries the slot. */
	uint32_t free_slots[ARENA_SLOTS], n_free = ARENA_SLOTS;
	for (uint32_t i = 0; i < ARENA_SLOTS; i++)
		free_slots[i] = i;
	uint32_t next = 0, done = 0, bad = 0;
	struct tier_nvme_cqe cq[32];
	uint64_t reqs0 = disk_reads();
	double t0 = now_s(), c0 = cpu_s();
	while (done < n_ext) {
		while (next < n_ext && n_free) {
			const struct pack_index_entry *ie = ext_of(order[next]);
			uint32_t slot = free_slots[--n_free];
			struct tier_nvme_req rq = { .tag = ((uint64_t)slot << 32) | order[next], .offset = ie->offset,
						    .len = ext_bytes, .buf = tier_host_ptr(arena, slot),
						    .buf_index = (int)slot };
			if (tier_nvme_queue(n, &rq) < 0)
				exit(1);
			next++;
		}
		tier_nvme_submit(n);
		int got = tier_nvme_reap(n, cq, MOE_ARRAY_SIZE(cq), 1);
		if (got < 0) {
			fprintf(stderr, "io-vs-fio: reap: %s\n", strerror(-got));
			exit(1);
		}
		for (int i = 0; i < got; i++) {
			uint32_t id = (uint32_t)cq[i].tag, slot = (uint32_t)(cq[i].tag >> 32);
			if (cq[i].res) {
				fprintf(stderr, "io-vs-fio: read failed: %s\n", strerror(-cq[i].res));
				exit(1);
			}
			if (check_crc) {
				const struct pack_index_entry *ie = ext_of(id);
				bad += crc32c(tier_host_ptr(arena, slot), ie->length) != ie->crc32c;
			}
			free_slots[n_free++] = slot;
		}
		done += (uint32_t)got;
	}
	last_reqs = disk_reads() - reqs0;
	double dt = now_s() - t0, dc = cpu_s() - c0;
	if (bad) {
		fprintf(stderr, "io-vs-fio: %u experts failed their CRC32C\n", bad);
		exit(1);
	}
	static bool said;
	if (!said) {
		fprintf(stderr, "io-vs-fio: ours = %s\n", tier_nvme_engine_note(n));
		said = true;
	}
	tier_nvme_destroy(n);
	stats_free(st);
	free(order);
	return (struct run){ .gbps = (double)n_ext * (double)ext_bytes / dt / 1e9, .cpu = 100.0 * dc / dt };
}

static struct run run_fio(unsigned qd, bool fixed)
{
	char cmd[1024];
	char out[] = "/tmp/io-vs-fio-XXXXXX";
	int ofd = mkstemp(out);
	if (ofd < 0)
		exit(1);
	close(ofd);
	FILE *f = fopen(fio_job, "w");
	if (!f)
		exit(1);
	/* One read per expert: random block order over exactly the extents,
	 * each block once (fio's random map). */
	fprintf(f,
		"[experts]\nfilename=%s\nioengine=io_uring\ndirect=1\nrw=randread\nbs=%llu\n"
		"offset=%llu\nsize=%llu\niodepth=%u\nrandrepeat=0\nthread=1\n%s",
		pack_path, (unsigned long long)ext_bytes, (unsigned long long)first_off,
		(unsigned long long)ext_bytes * n_ext, qd,
		/* The same io_uring features tier_nvme uses. */
		fixed ? "fixedbufs=1\nregisterfiles=1\n" : "");
	fclose(f);
	snprintf(cmd, sizeof(cmd), "fio --output-format=json --output=%s %s >/dev/null 2>&1", out, fio_job);
	uint64_t reqs0 = disk_reads();
	int rc = system(cmd);
	last_reqs = disk_reads() - reqs0;
	if (rc != 0) {
		fprintf(stderr, "io-vs-fio: fio failed (status %d): %s\n", rc, cmd);
		exit(1);
	}
	json_error_t je;
	json_t *root = json_load_file(out, 0, &je);
	unlink(out);
	json_t *job = root ? json_array_get(json_object_get(root, "jobs"), 0) : NULL;
	json_t *rd = json_object_get(job, "read");
	if (!rd) {
		fprintf(stderr, "io-vs-fio: cannot parse fio's JSON output: %s\n", root ? "no jobs[0].read" : je.text);
		exit(1);
	}
	double bytes = (double)json_integer_value(json_object_get(rd, "io_bytes"));
	double ms = (double)json_integer_value(json_object_get(rd, "runtime"));
	double usr = json_number_value(json_object_get(job, "usr_cpu"));
	double sys = json_number_value(json_object_get(job, "sys_cpu"));
	if (bytes != (double)ext_bytes * n_ext)
		fprintf(stderr, "io-vs-fio: fio read %.0f bytes, expected %llu\n", bytes,
			(unsigned long long)ext_bytes * n_ext);
	json_decref(root);
	return (struct run){ .gbps = ms > 0 ? bytes / (ms / 1e3) / 1e9 : 0, .cpu = usr + sys };
}

/* llama.cpp's way: mmap the file, copy each expert out of it. */
static struct run run_mmap(void)
{
	void *m = mmap(NULL, pack->file_size, PROT_READ, MAP_SHARED, pack->fd, 0);
	if (m == MAP_FAILED)
		exit(1);
	uint32_t *order = malloc(sizeof(uint32_t) * n_ext);
	shuffle(order, n_ext);
	double t0 = now_s(), c0 = cpu_s();
	for (uint32_t i = 0; i < n_ext; i++) {
		const struct pack_index_entry *ie = ext_of(order[i]);
		memcpy(tier_host_ptr(arena, i % ARENA_SLOTS), (char *)m + ie->offset, ie->length);
	}
	double dt = now_s() - t0, dc = cpu_s() - c0;
	munmap(m, pack->file_size);
	free(order);
	return (struct run){ .gbps = (double)n_ext * (double)ext_bytes / dt / 1e9, .cpu = 100.0 * dc / dt };
}

/* Buffered pread with default readahead (no fadvise). */
static struct run run_pread(void)
{
	uint32_t *order = malloc(sizeof(uint32_t) * n_ext);
	shuffle(order, n_ext);
	double t0 = now_s(), c0 = cpu_s();
	for (uint32_t i = 0; i < n_ext; i++) {
		const struct pack_index_entry *ie = ext_of(order[i]);
		if (moe_pread_full(pack->fd, tier_host_ptr(arena, i % ARENA_SLOTS), ie->length, ie->offset) < 0)
			exit(1);
	}
	double dt = now_s() - t0, dc = cpu_s() - c0;
	free(order);
	return (struct run){ .gbps = (double)n_ext * (double)ext_bytes / dt / 1e9, .cpu = 100.0 * dc / dt };
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double median(const double *v, int n)
{
	double t[64];
	memcpy(t, v, sizeof(double) * (size_t)n);
	qsort(t, (size_t)n, sizeof(double), cmp_double);
	return n % 2 ? t[n / 2] : (t[n / 2 - 1] + t[n / 2]) / 2;
}

static int make_pack(const char *path, uint64_t bytes)
{
	struct moe_model_config m;
	memset(&m, 0, sizeof(m));
	snprintf(m.name, sizeof(m.name), "dsv2-lite-shaped");
	moe_model_set_family_defaults(&m, MOE_FAMILY_DEEPSEEK_V2);
	m.dtype = MOE_DTYPE_BF16;
	m.hidden = HIDDEN;
	m.expert_width = WIDTH;
	m.n_experts = EXPERTS_PER_LAYER;
	m.top_k = 6;
	uint64_t per_layer = 3ull * HIDDEN * WIDTH * 2 * EXPERTS_PER_LAYER;
	uint32_t layers = (uint32_t)((bytes + per_layer / 2) / per_layer);
	if (layers == 0)
		layers = 1;
	m.n_moe_layers = layers;
	m.n_layers = layers + 1;
	m.first_moe_layer = 1;
	m.moe_layer_step = 1;
	struct pack_part_desc parts[3] = {
		{ .role = PACK_ROLE_GATE, .dtype = MOE_DTYPE_BF16, .rows = WIDTH, .cols = HIDDEN },
		{ .role = PACK_ROLE_UP, .dtype = MOE_DTYPE_BF16, .rows = WIDTH, .cols = HIDDEN },
		{ .role = PACK_ROLE_DOWN, .dtype = MOE_DTYPE_BF16, .rows = HIDDEN, .cols = WIDTH },
	};
	size_t payload = 3ull * HIDDEN * WIDTH * 2;
	uint64_t *buf = malloc(payload);
	struct pack_writer *w;
	struct moe_error err = { "" };
	int rc = pack_writer_create(path, &m, parts, 3, "io-vs-fio", &w, &err);
	for (uint32_t l = 0; rc == 0 && l < layers; l++)
		for (uint32_t e = 0; rc == 0 && e < EXPERTS_PER_LAYER; e++) {
			/* Incompressible bytes: no device or filesystem shortcut. */
			for (size_t i = 0; i < payload / 8; i++)
				buf[i] = next_rand();
			rc = pack_writer_begin_expert(w, l, e, &err);
			if (!rc)
				rc = pack_writer_write(w, buf, payload, &err);
			if (!rc)
				rc = pack_writer_end_expert(w, &err);
		}
	if (!rc)
		rc = pack_writer_finish(w, &err);
	else
		pack_writer_abort(w);
	free(buf);
	if (rc)
		fprintf(stderr, "io-vs-fio: writing %s: %s\n", path, err.msg);
	return rc;
}

/* tier_nvme at QD 8 with the eBPF programs attached against detached, A/B
 * pairs (the order alternates), caches dropped before every run. */
static int bpf_overhead(int pairs)
{
	struct stat ps, as;
	struct bpf_obs_config cfg = { .n_devs = 1, .n_arenas = 1 };
	double det[20], att[20], ratio[20];
	uint64_t seen = 0;

	if (stat(pack_path, &ps) < 0 || tier_host_fd(arena) < 0 || fstat(tier_host_fd(arena), &as) < 0) {
		fprintf(stderr, "bpf-overhead: needs the pack on disk and a memfd arena (not --anon)\n");
		return 1;
	}
	cfg.devs[0] = ps.st_dev;
	cfg.arenas[0].dev = as.st_dev;
	cfg.arenas[0].ino = as.st_ino;
	snprintf(cfg.arenas[0].name, sizeof(cfg.arenas[0].name), "host");
	for (int p = 0; p < pairs; p++) {
		for (int k = 0; k < 2; k++) {
			bool attached = (k == 0) == (p % 2 == 1);
			struct bpf_obs *o = NULL;
			if (attached) {
				bpf_obs_start(&cfg, &o);
				for (int q = 0; q < BPF_OBS_NPROGS; q++)
					if (!bpf_obs_attached(o, q)) {
						fprintf(stderr, "bpf-overhead: %s %s\n", bpf_obs_prog_name(q),
							bpf_obs_status(o, q));
						bpf_obs_stop(o);
						return 77;
					}
			}
			drop_caches();
			struct run r = run_ours(8, false);
			if (attached) {
				struct bpf_obs_snapshot sn;
				if (bpf_obs_read(o, &sn) == 0)
					seen += sn.io[0][IOLAT_READ].lat_us.count;
				bpf_obs_stop(o);
				att[p] = r.gbps;
			} else {
				det[p] = r.gbps;
			}
		}
		ratio[p] = att[p] / det[p];
		fprintf(stderr, "  pair %d: detached %.2f GB/s, attached %.2f GB/s, ratio %.3f\n", p + 1, det[p], att[p],
			ratio[p]);
	}
	printf("%-28s %10s %10s %10s\n", "tier_nvme QD 8", "GB/s med", "GB/s min", "GB/s max");
	for (int w = 0; w < 2; w++) {
		double *g = w ? att : det, lo = g[0], hi = g[0];
		for (int p = 1; p < pairs; p++) {
			lo = MOE_MIN(lo, g[p]);
			hi = MOE_MAX(hi, g[p]);
		}
		printf("%-28s %10.2f %10.2f %10.2f\n", w ? "eBPF programs attached" : "detached", median(g, pairs), lo, hi);
	}
	printf("iolat counted %llu read requests in the attached runs (%.1f per expert)\n", (unsigned long long)seen,
	       (double)seen / ((double)n_ext * pairs));
	printf("bpf-overhead: ratio=%.3f (throughput attached / detached, median of %d A/B pairs, QD 8; target >= 0.98)\n",
	       median(ratio, pairs), pairs);
	return 0;
}

static void usage(void)
{
	fprintf(stderr, "usage: io-vs-fio [--quick] [--pairs N] [--size BYTES] [--pack PATH] [--keep] [--dir DIR] [--make-only] [--anon]\n"
			"                 [--bpf-overhead]\n");
}

int main(int argc, char **argv)
{
	bool quick = false, keep = false, make_only = false, anon = false, bpf_mode = false;
	int pairs = 5;
	uint64_t size = 4ull << 30;
	const char *given = NULL, *dir = "/var/tmp";
	static const struct option opts[] = {
		{ "quick", no_argument, NULL, 'q' }, { "pairs", required_argument, NULL, 'n' },
		{ "size", required_argument, NULL, 's' }, { "pack", required_argument, NULL, 'p' },
		{ "keep", no_argument, NULL, 'k' }, { "dir", required_argument, NULL, 'd' },
		{ "make-only", no_argument, NULL, 'm' }, { "anon", no_argument, NULL, 'a' }, { "bpf-overhead", no_argument, NULL, 'b' },
		{ "help", no_argument, NULL, 'h' }, { 0, 0, 0, 0 }
	};
	int o;
	while ((o = getopt_long(argc, argv, "qn:s:p:kd:mabh", opts, NULL)) != -1) {
		switch (o) {
		case 'q': quick = true; break;
		case 'n': pairs = atoi(optarg); break;
		case 's':
			if (moe_parse_size(optarg, &size) < 0) {
				usage();
				return 2;
			}
			break;
		case 'p': given = optarg; break;
		case 'k': keep = true; break;
		case 'd': dir = optarg; break;
		case 'm': make_only = true; break;
		case 'a': anon = true; break;
		case 'b': bpf_mode = true; break;
		default: usage(); return o == 'h' ? 0 : 2;
		}
	}
	if (quick) {
		pairs = 3;
		if (size > (2ull << 30))
			size = 2ull << 30;
	}
	if (pairs < 3 || pairs > 20) {
		fprintf(stderr, "io-vs-fio: --pairs must be 3..20\n");
		return 2;
	}
	if (bpf_mode && geteuid() != 0) {
		fprintf(stderr, "bpf-overhead: needs root (CAP_BPF and CAP_PERFMON) to attach the programs\n");
		return 77;
	}
	if (!bpf_mode && system("fio --version >/dev/null 2>&1") != 0) {
		fprintf(stderr, "io-vs-fio: fio is not installed; nothing to compare with\n");
		return 77;
	}
	char path[512];
	if (given) {
		snprintf(path, sizeof(path), "%s", given);
	} else {
		snprintf(path, sizeof(path), "%s/io-vs-fio-%d.moepack", dir, (int)getpid());
		double t0 = now_s();
		if (make_pack(path, size) < 0)
			return 1;
		fprintf(stderr, "io-vs-fio: wrote %s in %.1f s\n", path, now_s() - t0);
		if (make_only) {
			printf("%s\n", path);
			return 0;
		}
	}
	pack_path = path;
	find_disk(path);
	snprintf(fio_job, sizeof(fio_job), "/tmp/io-vs-fio-%d.fio", (int)getpid());
	struct moe_error err = { "" };
	if (pack_open(path, 0, &pack, &err) < 0) {
		fprintf(stderr, "io-vs-fio: %s\n", err.msg);
		return 1;
	}
	if (pack->fd_direct < 0) {
		fprintf(stderr, "io-vs-fio: %s: the filesystem refuses O_DIRECT\n", path);
		return 1;
	}
	if (pack->model->n_experts != EXPERTS_PER_LAYER) {
		fprintf(stderr, "io-vs-fio: --pack must be a pack this program wrote (64 experts per layer)\n");
		return 1;
	}
	n_ext = pack->model->n_moe_layers * EXPERTS_PER_LAYER;
	ext_bytes = pack_extent_bytes(pack);
	/* fio reads [first, first + n * ext) in ext-sized blocks: the extents
	 * must tile that range exactly (the writer puts them back to back). */
	first_off = UINT64_MAX;
	for (uint32_t i = 0; i < n_ext; i++)
		first_off = MOE_MIN(first_off, ext_of(i)->offset);
	for (uint32_t i = 0; i < n_ext; i++) {
		uint64_t d = ext_of(i)->offset - first_off;
		if (d % ext_bytes || d / ext_bytes >= n_ext) {
			fprintf(stderr, "io-vs-fio: extents do not tile one range; fio could not read the same ones\n");
			return 1;
		}
	}
	fprintf(stderr, "io-vs-fio: extents at [%llu, %llu) of %s\n", (unsigned long long)first_off,
		(unsigned long long)(first_off + ext_bytes * n_ext), path);
	struct tier_host_class cls = { .slot_bytes = ext_bytes, .n_slots = ARENA_SLOTS };
	struct tier_host_config hc = { .classes = &cls, .n_classes = 1, .numa_node = TIER_HOST_NUMA_DEFAULT,
				       .anonymous = anon };
	if (tier_host_create(&hc, NULL, &arena, &err) < 0) {
		fprintf(stderr, "io-vs-fio: %s\n", err.msg);
		return 1;
	}
	double loadavg[1] = { 0 };
	getloadavg(loadavg, 1);
	printf("io-vs-fio: %u experts x %llu B = %.2f GiB, %d pairs, arena %u slots (%s, %s, populate %.0f ms), load average %.2f\n",
	       n_ext, (unsigned long long)ext_bytes, (double)n_ext * (double)ext_bytes / (1 << 30), pairs, ARENA_SLOTS,
	       anon ? "anonymous THP" : "memfd", tier_host_locked(arena) ? "mlocked" : "not locked", (double)tier_host_populate_ns(arena) / 1e6,
	       loadavg[0]);

	if (bpf_mode) {
		int rc = bpf_overhead(pairs);
		tier_host_destroy(arena);
		pack_close(pack);
		if (!given && !keep)
			unlink(path);
		return rc;
	}
	static const unsigned qds[3] = { 1, 4, 8 };
	struct run ours[3][20], fio[3][20], fio_plain[20], crc[20], mm[20], pr[20];
	for (int p = 0; p < pairs; p++) {
		for (int q = 0; q < 3; q++) {
			/* A B in odd pairs, B A in even ones: neither side always
			 * runs right after the other's reads. */
			uint64_t our_reqs, fio_reqs;
			if (p % 2 == 0) {
				drop_caches();
				ours[q][p] = run_ours(qds[q], false);
				our_reqs = last_reqs;
				drop_caches();
				fio[q][p] = run_fio(qds[q], true);
				fio_reqs = last_reqs;
			} else {
				drop_caches();
				fio[q][p] = run_fio(qds[q], true);
				fio_reqs = last_reqs;
				drop_caches();
				ours[q][p] = run_ours(qds[q], false);
				our_reqs = last_reqs;
			}
			fprintf(stderr,
				"  pair %d qd %u: ours %.2f GB/s %.0f%% cpu %.1f disk reqs/expert | fio %.2f GB/s %.0f%% cpu %.1f disk reqs/expert\n",
				p + 1, qds[q], ours[q][p].gbps, ours[q][p].cpu, (double)our_reqs / n_ext, fio[q][p].gbps,
				fio[q][p].cpu, (double)fio_reqs / n_ext);
		}
		/* The comparison rows run once in --quick (they are not the ratio). */
		if (quick && p > 0)
			continue;
		drop_caches();
		fio_plain[p] = run_fio(8, false);
		fprintf(stderr, "  pair %d: fio without fixedbufs, qd 8: %.2f GB/s, %.1f disk reqs/expert\n", p + 1,
			fio_plain[p].gbps, (double)last_reqs / n_ext);
		drop_caches();
		crc[p] = run_ours(8, true);
		drop_caches();
		mm[p] = run_mmap();
		drop_caches();
		pr[p] = run_pread();
	}
	int n_extra = quick ? 1 : pairs;
	getloadavg(loadavg, 1);
	printf("%-36s %10s %10s %10s %8s\n", "method", "GB/s med", "GB/s min", "GB/s max", "CPU% med");
	double med_ours8 = 0, med_fio8 = 0, cpu_ours8 = 0, cpu_fio8 = 0;
	for (int q = 0; q < 3; q++) {
		for (int which = 0; which < 2; which++) {
			double g[20], c[20];
			for (int p = 0; p < pairs; p++) {
				struct run r = which ? fio[q][p] : ours[q][p];
				g[p] = r.gbps;
				c[p] = r.cpu;
			}
			double lo = g[0], hi = g[0];
			for (int p = 1; p < pairs; p++) {
				lo = MOE_MIN(lo, g[p]);
				hi = MOE_MAX(hi, g[p]);
			}
			char name[64];
			snprintf(name, sizeof(name), "%s QD %u", which ? "fio io_uring O_DIRECT fixedbufs" : "tier_nvme io_uring O_DIRECT",
				 qds[q]);
			printf("%-36s %10.2f %10.2f %10.2f %8.1f\n", name, median(g, pairs), lo, hi, median(c, pairs));
			if (qds[q] == 8) {
				if (which) {
					med_fio8 = median(g, pairs);
					cpu_fio8 = median(c, pairs);
				} else {
					med_ours8 = median(g, pairs);
					cpu_ours8 = median(c, pairs);
				}
			}
		}
	}
	struct { const char *name; struct run *r; } extra[4] = {
		{ "fio QD 8, unregistered buffers", fio_plain }, { "tier_nvme QD 8 + CRC32C check", crc },
		{ "mmap + memcpy (page cache)", mm }, { "buffered pread (page cache)", pr } };
	for (int x = 0; x < 4; x++) {
		double g[20], c[20], lo = 1e30, hi = 0;
		for (int p = 0; p < n_extra; p++) {
			g[p] = extra[x].r[p].gbps;
			c[p] = extra[x].r[p].cpu;
			lo = MOE_MIN(lo, g[p]);
			hi = MOE_MAX(hi, g[p]);
		}
		printf("%-36s %10.2f %10.2f %10.2f %8.1f\n", extra[x].name, median(g, n_extra), lo, hi, median(c, n_extra));
	}
	printf("load average at the end: %.2f (2 vCPUs, shared)\n", loadavg[0]);
	printf("io-vs-fio: ratio=%.3f (median ours / median fio fixedbufs, QD 8; %.2f vs %.2f GB/s; CPU%% %.1f vs %.1f; %d pairs)\n",
	       med_fio8 > 0 ? med_ours8 / med_fio8 : 0.0, med_ours8, med_fio8, cpu_ours8, cpu_fio8, pairs);

	tier_host_destroy(arena);
	pack_close(pack);
	unlink(fio_job);
	if (!given && !keep)
		unlink(path);
	return 0;
}
