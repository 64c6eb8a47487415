/* ring.c - SPSC shared-memory rings with a futex doorbell (see ring.h). */
#include "config.h"
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "ring.h"

#define A_LOAD(p, mo) __atomic_load_n((p), (mo))
#define A_STORE(p, v, mo) __atomic_store_n((p), (v), (mo))

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#else
	__asm__ __volatile__("" ::: "memory");
#endif
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int ring_attach(struct ring *r, struct moet_ring_ctl *ctl, void *entries, uint32_t n_entries,
		uint32_t entry_size, bool init_ctl, bool producer)
{
	if (!ctl || !entries || n_entries == 0 || (n_entries & (n_entries - 1)) || entry_size == 0)
		return -EINVAL;
	if (init_ctl) {
		memset(ctl, 0, sizeof(*ctl));
		ctl->entries = n_entries;
		ctl->entry_size = entry_size;
	}
	r->ctl = ctl;
	r->entries = entries;
	r->mask = n_entries - 1;
	r->entry_size = entry_size;
	/* Resume from what is published (a fresh ring has both at 0). */
	r->local = producer ? A_LOAD(&ctl->tail, __ATOMIC_ACQUIRE) : A_LOAD(&ctl->head, __ATOMIC_ACQUIRE);
	return 0;
}

uint32_t ring_space(const struct ring *r)
{
	uint32_t head = A_LOAD(&r->ctl->head, __ATOMIC_ACQUIRE);
	uint32_t used = r->local - head;
	if (used > r->mask + 1)
		return 0;
	return r->mask + 1 - used;
}

int ring_push(struct ring *r, const void *entry)
{
	uint32_t head = A_LOAD(&r->ctl->head, __ATOMIC_ACQUIRE);
	uint32_t used = r->local - head;
	if (used > r->mask + 1)
		return -EPROTO;
	if (used == r->mask + 1)
		return -EAGAIN;
	memcpy(r->entries + (size_t)(r->local & r->mask) * r->entry_size, entry, r->entry_size);
	r->local++;
	A_STORE(&r->ctl->tail, r->local, __ATOMIC_RELEASE);
	/* Dekker-style pairing with the consumer's store of `waiting` followed by
	 * its re-check of tail: one of the two sides must see the other. */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (A_LOAD(&r->ctl->waiting, __ATOMIC_RELAXED))
		ring_futex_wake(&r->ctl->tail, 1);
	return 0;
}

bool ring_ready(const struct ring *r)
{
	return A_LOAD(&r->ctl->tail, __ATOMIC_ACQUIRE) != r->local;
}

uint32_t ring_tail_snapshot(const struct ring *r)
{
	return A_LOAD(&r->ctl->tail, __ATOMIC_ACQUIRE);
}

int ring_pop(struct ring *r, void *entry)
{
	uint32_t tail = A_LOAD(&r->ctl->tail, __ATOMIC_ACQUIRE);
	uint32_t avail = tail - r->local;
	if (avail == 0)
		return 0;
	if (avail > r->mask + 1)
		return -EPROTO;
	memcpy(entry, r->entries + (size_t)(r->local & r->mask) * r->entry_size, r->entry_size);
	r->local++;
	A_STORE(&r->ctl->head, r->local, __ATOMIC_RELEASE);
	return 1;
}

void ring_set_waiting(struct ring *r, bool on)
{
	A_STORE(&r->ctl->waiting, on ? 1u : 0u, __ATOMIC_RELAXED);
	if (on)
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
}

int ring_futex_wait(uint32_t *word, uint32_t expected, int64_t timeout_ns)
{
	struct timespec ts, *tsp = NULL;
	if (timeout_ns >= 0) {
		ts.tv_sec = timeout_ns / 1000000000;
		ts.tv_nsec = timeout_ns % 1000000000;
		tsp = &ts;
	}
	long rc = syscall(SYS_futex, word, FUTEX_WAIT, expected, tsp, NULL, 0);
	if (rc == 0 || errno == EAGAIN)
		return 0;
	return -errno;
}

int ring_futex_wake(uint32_t *word, int n)
{
	long rc = syscall(SYS_futex, word, FUTEX_WAKE, n, NULL, NULL, 0);
	return rc < 0 ? -errno : (int)rc;
}

int ring_wait(struct ring *r, int64_t spin_ns, int64_t timeout_ns)
{
	uint64_t start = now_ns();
	unsigned iter = 0;

	/* Bounded spin: cheap when the peer answers within microseconds on
	 * another vCPU; yields so a peer sharing our vCPU can run. */
	while (!ring_ready(r)) {
		if (++iter % 64 == 0) {
			uint64_t el = now_ns() - start;
			if ((int64_t)el >= spin_ns)
				break;
			if (iter % 1024 == 0)
				sched_yield();
		}
		cpu_relax();
	}
	for (;;) {
		if (ring_ready(r))
			return 0;
		int64_t left = -1;
		if (timeout_ns >= 0) {
			uint64_t el = now_ns() - start;
			if ((int64_t)el >= timeout_ns)
				return -ETIMEDOUT;
			left = timeout_ns - (int64_t)el;
		}
		uint32_t seen = A_LOAD(&r->ctl->tail, __ATOMIC_ACQUIRE);
		if (seen != r->local)
			return 0;
		ring_set_waiting(r, true);
		/* Re-check after announcing: a push that did not see the flag is
		 * visible here. */
		seen = A_LOAD(&r->ctl->tail, __ATOMIC_ACQUIRE);
		int rc = 0;
		if (seen == r->local)
			rc = ring_futex_wait(&r->ctl->tail, seen, left);
		ring_set_waiting(r, false);
		if (rc == -EINTR)
			return -EINTR;
		if (rc < 0 && rc != -ETIMEDOUT)
			return rc;
	}
}

uint64_t ring_region_layout(struct moet_ring_region *reg, uint32_t sq_entries, uint32_t cq_entries,
			    uint64_t scratch_bytes)
{
	uint64_t off = 4096;
	memset(reg, 0, sizeof(*reg));
	reg->magic = MOET_RING_MAGIC;
	reg->version = MOET_PROTO_VERSION;
	reg->sq_ctl_off = off;
	reg->sq_off = off + sizeof(struct moet_ring_ctl);
	off = (reg->sq_off + (uint64_t)sq_entries * sizeof(struct moet_sqe) + 4095) & ~4095ull;
	reg->cq_ctl_off = off;
	reg->cq_off = off + sizeof(struct moet_ring_ctl);
	off = (reg->cq_off + (uint64_t)cq_entries * sizeof(struct moet_cqe) + 4095) & ~4095ull;
	reg->scratch_off = off;
	reg->scratch_bytes = (scratch_bytes + 4095) & ~4095ull;
	reg->total_bytes = off + reg->scratch_bytes;
	return reg->total_bytes;
}

static bool in_range(uint64_t off, uint64_t len, uint64_t total)
{
	return off <= total && len <= total - off;
}

int ring_region_check(const struct moet_ring_region *reg, uint64_t mapped)
{
	if (reg->magic != MOET_RING_MAGIC || reg->version < MOET_PROTO_MIN_VERSION || reg->total_bytes != mapped)
		return -EPROTO;
	if (!in_range(reg->sq_ctl_off, sizeof(struct moet_ring_ctl), mapped) ||
	    !in_range(reg->cq_ctl_off, sizeof(struct moet_ring_ctl), mapped) ||
	    !in_range(reg->scratch_off, reg->scratch_bytes, mapped) ||
	    reg->sq_off != reg->sq_ctl_off + sizeof(struct moet_ring_ctl) ||
	    reg->cq_off != reg->cq_ctl_off + sizeof(struct moet_ring_ctl))
		return -EPROTO;
	return 0;
}
