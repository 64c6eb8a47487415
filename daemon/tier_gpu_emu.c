/* tier_gpu_emu.c - the emulated GPU backend: what runs without a GPU.
 *
 * "Device memory" is a memfd of nslots * stride bytes (plus the resident
 * region after the last slot, if any), sealed against
 * shrink and grow, so clients can map it (read-only, see export) the way
 * they would import VMM handles. Each slot's storage is allocated on its
 * first fill (fallocate + MADV_POPULATE_WRITE: the counterpart of
 * cuMemCreate + cuMemMap, and the point where the capacity can run out) and
 * given back on evict(release) (hole punch: cuMemUnmap + cuMemRelease).
 * Copies are memcpy done by worker threads; the caller sees them complete
 * only through the common poll/reap path and the event fd, exactly as with
 * CUDA events, so the daemon's state machine is the same on every backend. */
#include <config.h>  /* autoconf's, from the build tree */

#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "tier_gpu_impl.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

struct emu_job {
	uint32_t slot;
	void *dst;
	const void *src;
	size_t bytes;
};

struct emu {
	int memfd;
	uint8_t *region;
	uint64_t region_len;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct emu_job *q;  /* ring of nslots: at most one job per slot */
	uint32_t head, count;
	bool stop;
	unsigned nworkers;
	pthread_t *workers;
	bool lock_ok;
	bool res_alloc;     /* the resident region has its storage */
};

static void *worker(void *arg)
{
	struct tier_gpu *g = arg;
	struct emu *e = g->priv;

	pthread_mutex_lock(&e->lock);
	for (;;) {
		struct emu_job j;

		while (!e->count && !e->stop)
			pthread_cond_wait(&e->cond, &e->lock);
		if (!e->count)
			break;  /* stop, and the queue is drained */
		j = e->q[e->head];
		e->head = (e->head + 1) % g->nslots;
		e->count--;
		pthread_mutex_unlock(&e->lock);
		memcpy(j.dst, j.src, j.bytes);
		/* Release: the bytes are visible before "done" is. */
		atomic_store_explicit(&g->slots[j.slot].emu_done, 1, memory_order_release);
		tier_gpu_notify(g);
		pthread_mutex_lock(&e->lock);
	}
	pthread_mutex_unlock(&e->lock);
	return NULL;
}

static int emu_init(struct tier_gpu *g, const struct tier_gpu_config *cfg, struct moe_error *err)
{
	long page = sysconf(_SC_PAGESIZE);
	struct emu *e;
	int r;

	e = calloc(1, sizeof(*e));
	if (!e)
		return moe_error_set(err, -ENOMEM, "out of memory");
	e->memfd = -1;
	g->priv = e;
	/* Page granularity keeps every slot mmap-able on its own by a
	 * client; a GPU's 2 MiB would only waste host memory here. */
	g->stride = MOE_ALIGN_UP(cfg->slot_bytes, (uint64_t)(page > 0 ? page : 4096));
	r = tier_gpu_count_slots(g, cfg, (uint64_t)(page > 0 ? page : 4096), err);
	if (r < 0)
		return r;
	if (tier_gpu_alloc_slots(g) < 0)
		return moe_error_set(err, -ENOMEM, "out of memory");
	e->q = calloc(g->nslots, sizeof(*e->q));
	if (!e->q)
		return moe_error_set(err, -ENOMEM, "out of memory");
	/* The resident region follows the slots in the same memfd, so one
	 * client mapping covers both. */
	e->region_len = (uint64_t)g->nslots * g->stride + g->res_len;
	e->memfd = memfd_create("moetier-gpu-emu", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (e->memfd < 0)
		return moe_error_set(err, -errno, "memfd_create: %s", strerror(errno));
	if (ftruncate(e->memfd, (off_t)e->region_len) < 0)
		return moe_error_set(err, -errno, "ftruncate %llu: %s",
				     (unsigned long long)e->region_len, strerror(errno));
	/* The size is the contract with clients that mapped it. */
	if (fcntl(e->memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
		return moe_error_set(err, -errno, "seal: %s", strerror(errno));
	e->region = mmap(NULL, e->region_len, PROT_READ | PROT_WRITE, MAP_SHARED, e->memfd, 0);
	if (e->region == MAP_FAILED) {
		e->region = NULL;
		return moe_error_set(err, -errno, "mmap %llu: %s", (unsigned long long)e->region_len,
				     strerror(errno));
	}
	g->base = (uint64_t)(uintptr_t)e->region;
	if (pthread_mutex_init(&e->lock, NULL) || pthread_cond_init(&e->cond, NULL)) {
		pthread_mutex_destroy(&e->lock);
		return moe_error_set(err, -ENOMEM, "pthread init");
	}
	e->lock_ok = true;
	e->nworkers = cfg->emu_workers ? cfg->emu_workers : 1;
	if (e->nworkers > 16)
		e->nworkers = 16;
	e->workers = calloc(e->nworkers, sizeof(*e->workers));
	if (!e->workers)
		return moe_error_set(err, -ENOMEM, "out of memory");
	for (unsigned i = 0; i < e->nworkers; i++) {
		r = pthread_create(&e->workers[i], NULL, worker, g);
		if (r) {
			e->nworkers = i;  /* fini joins the ones that started */
			return moe_error_set(err, -r, "pthread_create: %s", strerror(r));
		}
	}
	return 0;
}

static void emu_fini(struct tier_gpu *g)
{
	struct emu *e = g->priv;

	if (!e)
		return;
	if (e->lock_ok) {
		pthread_mutex_lock(&e->lock);
		e->stop = true;
		pthread_cond_broadcast(&e->cond);
		pthread_mutex_unlock(&e->lock);
		for (unsigned i = 0; i < e->nworkers; i++)
			pthread_join(e->workers[i], NULL);
		pthread_cond_destroy(&e->cond);
		pthread_mutex_destroy(&e->lock);
	}
	if (e->region)
		munmap(e->region, e->region_len);
	if (e->memfd >= 0)
		close(e->memfd);
	free(e->workers);
	free(e->q);
	free(e);
	g->priv = NULL;
}

static int emu_register_host(struct tier_gpu *g, void *base, size_t len, struct moe_error *err)
{
	/* Nothing to pin: the common code records the range, so the
	 * unpinned_copies counter means the same as on a GPU. */
	(void)g; (void)base; (void)len; (void)err;
	return 0;
}

static int emu_unregister_host(struct tier_gpu *g)
{
	(void)g;
	return 0;
}

/* Storage for slot s, as cuMemCreate + cuMemMap would give it. */
static int get_chunk(struct tier_gpu *g, uint32_t s, struct moe_error *err)
{
	struct emu *e = g->priv;
	off_t off = (off_t)((uint64_t)s * g->stride);

	if (g->slots[s].has_chunk)
		return 0;
	if (fallocate(e->memfd, 0, off, (off_t)g->stride) < 0) {
		int r = -errno;

		return moe_error_set(err, r == -ENOSPC ? -ENOMEM : r, "emulated GPU memory for slot %u: %s",
				     s, strerror(-r));
	}
	/* Map it now so the copy path never takes a page fault (best
	 * effort: an older kernel faults on the first copy instead). */
	(void)madvise(e->region + off, g->stride, MADV_POPULATE_WRITE);
	g->slots[s].has_chunk = true;
	g->st.chunks_created++;
	g->generation++;
	return 0;
}

static int enqueue(struct tier_gpu *g, uint32_t s, void *dst, const void *src, size_t bytes)
{
	struct emu *e = g->priv;

	pthread_mutex_lock(&e->lock);
	/* Cannot overflow: one job per slot and the ring has nslots. */
	e->q[(e->head + e->count) % g->nslots] = (struct emu_job){ s, dst, src, bytes };
	e->count++;
	pthread_cond_signal(&e->cond);
	pthread_mutex_unlock(&e->lock);
	return 0;
}

static int emu_copy_in(struct tier_gpu *g, uint32_t s, const void *src, size_t bytes,
		       struct moe_error *err)
{
	struct emu *e = g->priv;
	int r = get_chunk(g, s, err);

	if (r < 0)
		return r;
	return enqueue(g, s, e->region + (uint64_t)s * g->stride, src, bytes);
}

static int emu_copy_out(struct tier_gpu *g, uint32_t s, void *dst, size_t bytes,
			struct moe_error *err)
{
	struct emu *e = g->priv;

	(void)err;
	return enqueue(g, s, dst, e->region + (uint64_t)s * g->stride, bytes);
}

static int emu_query(struct tier_gpu *g, uint32_t s)
{
	return atomic_load_explicit(&g->slots[s].emu_done, memory_order_acquire) ? 1 : 0;
}

static int emu_evict(struct tier_gpu *g, uint32_t s, bool release)
{
	struct emu *e = g->priv;

	if (!release || !g->slots[s].has_chunk)
		return 0;
	if (fallocate(e->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
		      (off_t)((uint64_t)s * g->stride), (off_t)g->stride) < 0)
		return -errno;
	g->slots[s].has_chunk = false;
	g->st.chunks_released++;
	g->generation++;
	return 0;
}

/* The emulated host -> device copy of the resident region: storage for
 * all of it on the first write (as get_chunk does for a slot), then a
 * memcpy in the caller's thread, which is waiting for it anyway. */
static int emu_resident_write(struct tier_gpu *g, uint64_t off, const void *src, size_t bytes,
			      struct moe_error *err)
{
	struct emu *e = g->priv;
	uint64_t start = (uint64_t)g->nslots * g->stride;

	if (!e->res_alloc) {
		if (fallocate(e->memfd, 0, (off_t)start, (off_t)g->res_len) < 0) {
			int r = -errno;

			return moe_error_set(err, r == -ENOSPC ? -ENOMEM : r,
					     "emulated GPU memory for the resident region: %s", strerror(-r));
		}
		(void)madvise(e->region + start, g->res_len, MADV_POPULATE_WRITE);
		e->res_alloc = true;
		g->st.chunks_created++;
		g->generation++;
	}
	memcpy(e->region + start + off, src, bytes);
	return 0;
}

static int emu_export(struct tier_gpu *g, struct tier_gpu_export *out, struct moe_error *err)
{
	struct emu *e = g->priv;
	char path[64];
	int fd;

	/* A read-only open of the memfd: a client cannot get a writable
	 * shared mapping from it (mmap needs FMODE_WRITE for that), while
	 * the daemon keeps its own read-write mapping. */
	snprintf(path, sizeof(path), "/proc/self/fd/%d", e->memfd);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return moe_error_set(err, -errno, "reopen emulated GPU memfd read-only: %s",
				     strerror(errno));
	out->fds = malloc(sizeof(*out->fds));
	out->offsets = malloc(sizeof(*out->offsets));
	if (!out->fds || !out->offsets) {
		close(fd);
		free(out->fds);
		free(out->offsets);
		out->fds = NULL;
		out->offsets = NULL;
		return moe_error_set(err, -ENOMEM, "out of memory");
	}
	out->nfds = 1;
	out->fds[0] = fd;
	out->offsets[0] = 0;
	out->chunk_bytes = e->region_len;
	return 0;
}

const struct tier_gpu_ops tier_gpu_emu_ops = {
	.name = "emulated",
	.init = emu_init,
	.fini = emu_fini,
	.register_host = emu_register_host,
	.unregister_host = emu_unregister_host,
	.copy_in = emu_copy_in,
	.copy_out = emu_copy_out,
	.query = emu_query,
	.evict = emu_evict,
	.export_ = emu_export,
	.resident_write = emu_resident_write,
};
