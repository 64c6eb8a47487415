/* faults.h - user page faults inside the arenas (the host arena's memfd, the
 * emulated GPU region): pre-faulted and locked, they must stay at zero in
 * steady state. Counted by the file behind the faulting address, so the
 * faults of clients' read-only mappings of the same arenas count too. */
#ifndef MOETIER_EBPF_FAULTS_H
#define MOETIER_EBPF_FAULTS_H

#define FAULTS_MAX_ARENAS 4

struct faults_counts {
	__u64 daemon[FAULTS_MAX_ARENAS];   /* faults by the daemon's threads */
	__u64 clients[FAULTS_MAX_ARENAS];  /* faults by any other process */
	__u64 daemon_total;                /* every user fault of the daemon, for context */
};

#endif
