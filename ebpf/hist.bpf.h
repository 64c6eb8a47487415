/* hist.bpf.h - the BPF side of hist.h (included by the .bpf.c files only). */
#ifndef MOETIER_EBPF_HIST_BPF_H
#define MOETIER_EBPF_HIST_BPF_H

#include "hist.h"

static __always_inline __u32 hist_slot(__u64 v)
{
	__u32 s = 0;

	/* bounded loop the verifier accepts: at most 31 steps */
	for (int i = 0; i < HIST_SLOTS - 1; i++) {
		if (v < 2)
			break;
		v >>= 1;
		s++;
	}
	return s;
}

static __always_inline void hist_add(struct hist *h, __u64 v)
{
	__u32 s = hist_slot(v);

	if (s < HIST_SLOTS)
		__sync_fetch_and_add(&h->slots[s], 1);
	__sync_fetch_and_add(&h->count, 1);
	__sync_fetch_and_add(&h->sum, v);
	if (v > h->max)
		h->max = v; /* racy by design: a maximum, not a counter */
}

#endif
