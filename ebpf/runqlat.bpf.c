// SPDX-License-Identifier: GPL-2.0
/* runqlat.bpf.c - run-queue latency of the daemon's threads: wake-up (or
 * preemption while still runnable) to switch-in, in microseconds. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "runqlat.h"
#include "hist.bpf.h"

#define TASK_RUNNING 0

const volatile __u32 targ_tgid = 0;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);   /* thread id */
	__type(value, __u64); /* enqueue time */
} starts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hist);
} lat SEC(".maps");

static __always_inline void enqueue(struct task_struct *p)
{
	if (BPF_CORE_READ(p, tgid) != (int)targ_tgid)
		return;
	__u32 pid = BPF_CORE_READ(p, pid);
	__u64 ts = bpf_ktime_get_ns();
	bpf_map_update_elem(&starts, &pid, &ts, BPF_ANY);
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(runqlat_wakeup, struct task_struct *p)
{
	enqueue(p);
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(runqlat_wakeup_new, struct task_struct *p)
{
	enqueue(p);
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(runqlat_switch, bool preempt, struct task_struct *prev, struct task_struct *next,
	     unsigned int prev_state)
{
	(void)preempt;
	if (prev_state == TASK_RUNNING)
		enqueue(prev);
	if (BPF_CORE_READ(next, tgid) != (int)targ_tgid)
		return 0;
	__u32 pid = BPF_CORE_READ(next, pid), zero = 0;
	__u64 *ts = bpf_map_lookup_elem(&starts, &pid);
	if (!ts)
		return 0;
	__u64 delta = bpf_ktime_get_ns() - *ts;
	bpf_map_delete_elem(&starts, &pid);
	struct hist *h = bpf_map_lookup_elem(&lat, &zero);
	if (h)
		hist_add(h, delta / 1000);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
