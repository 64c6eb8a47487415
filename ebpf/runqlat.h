/* runqlat.h - how long the daemon's threads waited for a core: from
 * wake-up (or preemption while runnable) to running, in microseconds. */
#ifndef MOETIER_EBPF_RUNQLAT_H
#define MOETIER_EBPF_RUNQLAT_H

#include "hist.h"

#endif
