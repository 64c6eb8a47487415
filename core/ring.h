/* ring.h - single-producer single-consumer rings in shared memory with a
 * futex doorbell, used by moetierd (daemon side) and libmoetier (client).
 *
 * Each side keeps its own index privately and only publishes it; the index
 * it reads from the peer is checked (tail - head <= entries), so a peer that
 * scribbles over the shared control block can only hurt itself.
 *
 * Wake-up protocol (lost-wake-up safe; machine.md section 3):
 *   producer: write entry; store tail (release); full fence;
 *             if (waiting) futex_wake(&tail)
 *   consumer: spin a bounded time (yielding); then waiting = 1; full fence;
 *             re-check tail; futex_wait(&tail, seen_tail); waiting = 0.
 * Only the consumer writes `waiting`: a producer that cleared it could eat
 * the flag of a later sleep. futex_wait compares against the tail value the
 * consumer saw, so a push between the check and the sleep returns at once.
 * The spin yields (sched_yield) every few iterations because on a shared
 * vCPU an unbounded spin costs a whole timeslice per round trip.
 */
#ifndef MOETIER_RING_H
#define MOETIER_RING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "moetier/proto.h"

struct ring {
	struct moet_ring_ctl *ctl; /* shared */
	uint8_t *entries;          /* shared */
	uint32_t mask;             /* entries - 1 */
	uint32_t entry_size;
	uint32_t local;            /* producer: our tail; consumer: our head */
};

/* Binds a view to a control block and entries; `entries` must be a power of
 * two. init_ctl: also write the geometry into the control block (the
 * creator does this once). Returns 0 or -EINVAL. */
int ring_attach(struct ring *r, struct moet_ring_ctl *ctl, void *entries, uint32_t n_entries,
		uint32_t entry_size, bool init_ctl, bool producer);

/* Producer: copies one entry in; -EAGAIN when full, -EPROTO when the
 * consumer's published head is impossible. Wakes a sleeping consumer. */
int ring_push(struct ring *r, const void *entry);
/* Producer: entries that can be pushed now (0 when corrupt or full). */
uint32_t ring_space(const struct ring *r);

/* Consumer: copies one entry out (copied once, then the caller validates
 * its copy). 1 when an entry was taken, 0 when empty, -EPROTO when the
 * producer's tail is impossible. */
int ring_pop(struct ring *r, void *entry);
/* Consumer: true when an entry is waiting. */
bool ring_ready(const struct ring *r);
/* Consumer: waits until an entry is ready, spinning about spin_ns first,
 * then sleeping on the futex. timeout_ns < 0 waits forever. Returns 0 when
 * ready, -ETIMEDOUT, or -EINTR. */
int ring_wait(struct ring *r, int64_t spin_ns, int64_t timeout_ns);

/* Consumer side of a multi-ring wait (the daemon): announce / withdraw
 * sleep. Announce, then re-check every ring, then sleep (futex_waitv). */
void ring_set_waiting(struct ring *r, bool on);
/* The futex word and the value to sleep on. */
static inline uint32_t *ring_futex_word(struct ring *r) { return &r->ctl->tail; }
uint32_t ring_tail_snapshot(const struct ring *r);

/* Raw futex helpers (shared, i.e. not FUTEX_PRIVATE: they work across
 * processes on a MAP_SHARED mapping). */
int ring_futex_wait(uint32_t *word, uint32_t expected, int64_t timeout_ns);
int ring_futex_wake(uint32_t *word, int n);

/* Bytes of a ring region with the given geometry (page-rounded), and the
 * layout helper used by both sides. */
uint64_t ring_region_layout(struct moet_ring_region *reg, uint32_t sq_entries, uint32_t cq_entries,
			    uint64_t scratch_bytes);
/* Checks a region header received from the peer against the mapping size. */
int ring_region_check(const struct moet_ring_region *reg, uint64_t mapped_bytes);

#endif
