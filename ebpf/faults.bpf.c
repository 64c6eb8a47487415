// SPDX-License-Identifier: GPL-2.0
/* faults.bpf.c - user page faults whose address lies in a mapping of one of
 * the daemon's arenas (matched by the mapped file's device and inode, found
 * with bpf_find_vma), counted for the daemon and for everyone else. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "faults.h"

const volatile __u32 targ_tgid = 0;
const volatile __u32 targ_narenas = 0;
const volatile __u64 targ_ino[FAULTS_MAX_ARENAS] = {};
const volatile __u32 targ_sdev[FAULTS_MAX_ARENAS] = {};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct faults_counts);
} counts SEC(".maps");

struct vma_ctx {
	int arena;
};

static long match_vma(struct task_struct *task, struct vm_area_struct *vma, void *data)
{
	struct vma_ctx *c = data;
	struct file *f = vma->vm_file;

	(void)task;
	if (!f)
		return 0;
	struct inode *ino = BPF_CORE_READ(f, f_inode);
	__u64 i_ino = BPF_CORE_READ(ino, i_ino);
	__u32 s_dev = BPF_CORE_READ(ino, i_sb, s_dev);
	for (__u32 i = 0; i < FAULTS_MAX_ARENAS; i++) {
		if (i >= targ_narenas)
			break;
		if (targ_ino[i] == i_ino && targ_sdev[i] == s_dev) {
			c->arena = (int)i;
			break;
		}
	}
	return 0;
}

SEC("tp_btf/page_fault_user")
int BPF_PROG(faults_user, unsigned long address, struct pt_regs *regs, unsigned long error_code)
{
	__u32 zero = 0;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct faults_counts *c = bpf_map_lookup_elem(&counts, &zero);
	struct vma_ctx v = { .arena = -1 };

	(void)regs;
	(void)error_code;
	if (!c)
		return 0;
	if (tgid == targ_tgid)
		__sync_fetch_and_add(&c->daemon_total, 1);
	bpf_find_vma(bpf_get_current_task_btf(), address, match_vma, &v, 0);
	if (v.arena < 0 || v.arena >= FAULTS_MAX_ARENAS)
		return 0;
	if (tgid == targ_tgid)
		__sync_fetch_and_add(&c->daemon[v.arena], 1);
	else
		__sync_fetch_and_add(&c->clients[v.arena], 1);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
