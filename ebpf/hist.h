/* hist.h - log2 histograms shared by the eBPF programs and their loader
 * (daemon/bpf.c): slot i counts values in [2^i, 2^(i+1)) of the unit, slot 0
 * also holds 0. Plain integer types only, so that both the BPF side
 * (vmlinux.h) and user space (<linux/types.h>) can include it. */
#ifndef MOETIER_EBPF_HIST_H
#define MOETIER_EBPF_HIST_H

#define HIST_SLOTS 32

struct hist {
	__u64 slots[HIST_SLOTS];
	__u64 count;
	__u64 sum;
	__u64 max;
};

#endif
