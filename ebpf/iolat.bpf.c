// SPDX-License-Identifier: GPL-2.0
/* iolat.bpf.c - block request issue -> complete latency and request sizes,
 * per device (the ones holding the daemon's packs) and operation.
 * tp_btf programs: they need neither tracefs nor kprobes (platform.md). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "iolat.h"
#include "hist.bpf.h"

#define MINORBITS 20
#define REQ_OP_BITS_MASK 0xff

/* Set by the loader before load: which dev_t values (kernel encoding,
 * MAJOR << 20 | MINOR) are watched and which row each selects. */
const volatile __u32 targ_ndev = 0;
const volatile __u32 targ_dev[IOLAT_MAX_MATCH] = {};
const volatile __u32 targ_row[IOLAT_MAX_MATCH] = {};

struct start {
	__u64 ts;
	__u32 row;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);           /* struct request * */
	__type(value, struct start);
} starts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, IOLAT_ROWS);
	__type(key, __u32);
	__type(value, struct iolat_row);
} rows SEC(".maps");

static __always_inline int row_of(struct request *rq)
{
	struct gendisk *disk = BPF_CORE_READ(rq, q, disk);
	struct block_device *part = BPF_CORE_READ(rq, part);
	__u32 ddev = 0, pdev = 0;

	if (disk)
		ddev = ((__u32)BPF_CORE_READ(disk, major) << MINORBITS) | (__u32)BPF_CORE_READ(disk, first_minor);
	if (part)
		pdev = BPF_CORE_READ(part, bd_dev);
	for (__u32 i = 0; i < IOLAT_MAX_MATCH; i++) {
		if (i >= targ_ndev)
			break;
		if (targ_dev[i] == ddev || (pdev && targ_dev[i] == pdev))
			return (int)targ_row[i];
	}
	return -1;
}

SEC("tp_btf/block_rq_issue")
int BPF_PROG(iolat_issue, struct request *rq)
{
	int dev = row_of(rq);
	if (dev < 0 || dev >= IOLAT_MAX_DEVS)
		return 0;
	__u32 op = BPF_CORE_READ(rq, cmd_flags) & REQ_OP_BITS_MASK;
	op = op == 0 ? IOLAT_READ : op == 1 ? IOLAT_WRITE : IOLAT_OTHER;
	struct start s = { .ts = bpf_ktime_get_ns(), .row = (__u32)dev * IOLAT_NOPS + op };
	__u64 key = (__u64)rq;

	bpf_map_update_elem(&starts, &key, &s, BPF_ANY);
	struct iolat_row *r = bpf_map_lookup_elem(&rows, &s.row);
	if (r)
		hist_add(&r->size, BPF_CORE_READ(rq, __data_len));
	return 0;
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(iolat_complete, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	__u64 key = (__u64)rq;
	struct start *s = bpf_map_lookup_elem(&starts, &key);
	if (!s)
		return 0;
	__u64 delta = bpf_ktime_get_ns() - s->ts;
	__u32 row = s->row;

	bpf_map_delete_elem(&starts, &key);
	struct iolat_row *r = bpf_map_lookup_elem(&rows, &row);
	if (!r)
		return 0;
	hist_add(&r->lat_us, delta / 1000);
	if (error)
		__sync_fetch_and_add(&r->errors, 1);
	(void)nr_bytes;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
