// SPDX-License-Identifier: GPL-2.0
/* faults.bpf.c - page faults inside the daemon's arenas.
 *
 * The daemon's own: tp_btf/page_fault_user, matched by address against the
 * arenas' mappings in the daemon (their ranges are set before load).
 * Everyone else's (clients map the arena memfds read-only wherever they
 * like): tp_btf/mm_filemap_map_pages, the fault-around that maps resident
 * shmem pages into a process on a read fault, matched by the mapped file's
 * device and inode. (bpf_find_vma from page_fault_user would see the VMA
 * for any process, but runs with interrupts off there and is refused with
 * -EBUSY whenever its per-CPU unlock work is pending: it lost every fault
 * on this kernel. Neither hook needs a lock.) */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "faults.h"

const volatile __u32 targ_tgid = 0;
const volatile __u32 targ_narenas = 0;
const volatile __u64 targ_lo[FAULTS_MAX_ARENAS] = {};  /* [lo, hi) in the daemon */
const volatile __u64 targ_hi[FAULTS_MAX_ARENAS] = {};
const volatile __u64 targ_ino[FAULTS_MAX_ARENAS] = {};
const volatile __u32 targ_sdev[FAULTS_MAX_ARENAS] = {};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct faults_counts);
} counts SEC(".maps");

static __always_inline struct faults_counts *counts_get(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&counts, &zero);
}

SEC("tp_btf/page_fault_user")
int BPF_PROG(faults_user, unsigned long address, struct pt_regs *regs, unsigned long error_code)
{
	(void)regs;
	(void)error_code;
	if ((bpf_get_current_pid_tgid() >> 32) != targ_tgid)
		return 0;
	struct faults_counts *c = counts_get();
	if (!c)
		return 0;
	__sync_fetch_and_add(&c->daemon_total, 1);
	for (__u32 i = 0; i < FAULTS_MAX_ARENAS; i++) {
		if (i >= targ_narenas)
			break;
		if (address >= targ_lo[i] && address < targ_hi[i]) {
			__sync_fetch_and_add(&c->daemon[i], 1);
			break;
		}
	}
	return 0;
}

SEC("tp_btf/mm_filemap_map_pages")
int BPF_PROG(faults_map_pages, struct address_space *mapping, unsigned long start, unsigned long end)
{
	(void)start;
	(void)end;
	if ((bpf_get_current_pid_tgid() >> 32) == targ_tgid)
		return 0; /* the daemon's own are counted by address above */
	struct inode *ino = BPF_CORE_READ(mapping, host);
	if (!ino)
		return 0;
	__u64 i_ino = BPF_CORE_READ(ino, i_ino);
	__u32 s_dev = BPF_CORE_READ(ino, i_sb, s_dev);
	for (__u32 i = 0; i < FAULTS_MAX_ARENAS; i++) {
		if (i >= targ_narenas)
			break;
		if (targ_ino[i] == i_ino && targ_sdev[i] == s_dev) {
			struct faults_counts *c = counts_get();
			if (c)
				__sync_fetch_and_add(&c->clients[i], 1);
			break;
		}
	}
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
