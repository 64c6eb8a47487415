/* fault.h - named fault points for the debug build, armed like SQLite's
 * fault simulator: "the next N hits pass, then R hits fail" (R = -1: fail
 * forever once triggered).
 *
 * The points are compiled in only with -DMOETIER_FAULT_INJECTION (the
 * libmoecore_fault.a twin that tests and moetierd-debug link): elsewhere
 * FAULT_HIT() is the constant false and costs nothing. The arming API
 * exists in both builds (it returns -ENOTSUP in a release build) so callers
 * need no #ifdef.
 *
 * Arm from code with fault_arm("nvme.eio", 3, 1), or from the environment:
 * MOETIER_FAULTS="nvme.eio:3:1,nvme.corrupt:0:-1" (read by fault_init_env(),
 * which cache_create calls once).
 */
#ifndef MOETIER_FAULT_H
#define MOETIER_FAULT_H

#include <stdbool.h>
#include <stdint.h>

#include "util.h"

/* X(id, "name", "what it does"). Append new points at the end. */
#define MOE_FAULT_POINTS(X) \
	X(NVME_EIO, "nvme.eio", "an NVMe read completes with -EIO") \
	X(NVME_SHORT, "nvme.short", "an NVMe read returns half of what was asked (4 KiB aligned)") \
	X(NVME_EAGAIN, "nvme.eagain", "an NVMe read completes with -EAGAIN") \
	X(NVME_EINTR, "nvme.eintr", "an NVMe read completes with -EINTR") \
	X(NVME_CORRUPT, "nvme.corrupt", "one byte of a completed NVMe read is flipped") \
	X(HOST_ALLOC, "host.alloc", "a host arena or slot allocation fails") \
	X(GPU_ALLOC, "gpu.alloc", "a GPU arena or slot allocation fails") \
	X(GPU_COPY, "gpu.copy", "a host -> GPU copy fails") \
	X(BPF_LOAD, "bpf.load", "an eBPF program fails to load (the daemon runs on without it)") \
	X(URING_RESTRICT, "uring.restrict", "the kernel refuses the io_uring restrictions (the ring runs unrestricted)")

enum fault_point {
#define X(id, name, help) FAULT_##id,
	MOE_FAULT_POINTS(X)
#undef X
	FAULT__COUNT
};

/* True when this build has fault injection compiled in. */
bool fault_enabled(void);
/* The point named `name`, or -ENOENT. */
int fault_lookup(const char *name);
const char *fault_name(enum fault_point p);

/* Arms a point: the next `after` hits pass, then `repeat` hits fail
 * (repeat < 0: every hit from then on fails). repeat == 0 disarms.
 * Returns 0, -EINVAL, or -ENOTSUP in a build without fault injection. */
int fault_arm(enum fault_point p, long after, long repeat);
int fault_arm_name(const char *name, long after, long repeat);
void fault_disarm_all(void);
/* Parses "name:after:repeat[,name:after:repeat...]" and arms each.
 * 0 or a negative errno with a message naming the bad item. */
int fault_arm_spec(const char *spec, struct moe_error *err);
/* Arms from $MOETIER_FAULTS once per process (later calls do nothing).
 * Returns what fault_arm_spec returned (0 when the variable is unset). */
int fault_init_env(struct moe_error *err);

/* How many times the point fired (failed) since the process started. */
uint64_t fault_fired(enum fault_point p);
/* Hits seen (fired or not). */
uint64_t fault_hits(enum fault_point p);

/* Counts a hit; true when this hit must fail. Thread-safe. */
bool fault_hit(enum fault_point p);

#ifdef MOETIER_FAULT_INJECTION
#define FAULT_HIT(p) unlikely(fault_hit(p))
#else
#define FAULT_HIT(p) false
#endif

#endif
