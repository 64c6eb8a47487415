/* iolat.h - block-layer request latency of the devices holding the packs:
 * the layout iolat.bpf.c fills and daemon/bpf.c reads. */
#ifndef MOETIER_EBPF_IOLAT_H
#define MOETIER_EBPF_IOLAT_H

#include "hist.h"

#define IOLAT_MAX_DEVS 4     /* histogram rows: one per device the packs are on */
#define IOLAT_MAX_MATCH 8    /* dev_t values that select a row (partition and its disk) */

enum iolat_op { IOLAT_READ = 0, IOLAT_WRITE = 1, IOLAT_OTHER = 2, IOLAT_NOPS = 3 };

/* One (device, operation): issue -> complete latency in microseconds, and
 * request sizes in bytes (log2 slots), bytes summed in `size.sum`. */
struct iolat_row {
	struct hist lat_us;
	struct hist size;
	__u64 errors;          /* completions with a non-zero blk_status_t */
};

#define IOLAT_ROWS (IOLAT_MAX_DEVS * IOLAT_NOPS) /* index: dev * IOLAT_NOPS + op */

#endif
