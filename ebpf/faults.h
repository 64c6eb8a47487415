/* faults.h - page faults inside the arenas (the host arena's memfd, the
 * emulated GPU region): pre-faulted and locked, they must stay at zero in
 * the daemon in steady state. The daemon's are user faults at an address
 * inside its mapping of an arena; the clients' are the read faults that map
 * resident arena pages into their read-only mappings (one per fault, each
 * mapping up to the fault-around window). */
#ifndef MOETIER_EBPF_FAULTS_H
#define MOETIER_EBPF_FAULTS_H

#define FAULTS_MAX_ARENAS 4

struct faults_counts {
	__u64 daemon[FAULTS_MAX_ARENAS];   /* user faults of the daemon's threads in the arena */
	__u64 clients[FAULTS_MAX_ARENAS];  /* read faults mapping arena pages into other processes */
	__u64 daemon_total;                /* every user fault of the daemon, for context */
};

#endif
