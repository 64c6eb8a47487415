/* bpf.h - what the kernel sees of the daemon, through eBPF (the programs of ebpf/):
 *
 *   iolat    block request issue -> complete latency (log2 µs) and request
 *            sizes, per device holding a pack and per operation;
 *   faults   user page faults inside the arenas (by the mapped file, so the
 *            clients' mappings count too): pre-faulted, they stay at zero;
 *   runqlat  how long the daemon's threads waited for a core.
 *
 * Each program loads and attaches on its own at start-up when the process
 * may (CAP_BPF + CAP_PERFMON, or root) and stays attached until stop; one
 * that cannot load leaves a reason ("not available: ...") and never stops
 * the daemon. Built only with --enable-bpf (HAVE_BPF); without it every
 * program reports "not available: built without eBPF". */
#ifndef MOETIER_BPF_H
#define MOETIER_BPF_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <linux/types.h>

#include "faults.h"
#include "iolat.h"
#include "runqlat.h"

enum bpf_obs_prog { BPF_OBS_IOLAT = 0, BPF_OBS_FAULTS, BPF_OBS_RUNQLAT, BPF_OBS_NPROGS };

struct bpf_obs_config {
	pid_t tgid;                       /* whose threads and faults; 0 = this process */
	unsigned n_devs;
	dev_t devs[IOLAT_MAX_DEVS];       /* st_dev of the pack files (user-space encoding) */
	unsigned n_arenas;
	struct {
		dev_t dev;                /* st_dev and st_ino of the arena's memfd */
		ino_t ino;
		const void *base;         /* where the daemon (tgid) maps it, and how much */
		uint64_t len;
		char name[16];            /* "host", "gpu" */
	} arenas[FAULTS_MAX_ARENAS];
	bool disabled;                    /* --no-bpf: load nothing */
};

struct bpf_obs_snapshot {
	unsigned n_devs;
	char dev_names[IOLAT_MAX_DEVS][32];         /* "254:1" */
	struct iolat_row io[IOLAT_MAX_DEVS][IOLAT_NOPS];
	unsigned n_arenas;
	char arena_names[FAULTS_MAX_ARENAS][16];
	struct faults_counts faults;
	struct hist runq;
	bool attached[BPF_OBS_NPROGS];
};

struct bpf_obs;

/* Loads and attaches what it can; *out is always set on 0 (-ENOMEM only). */
int bpf_obs_start(const struct bpf_obs_config *cfg, struct bpf_obs **out);
void bpf_obs_stop(struct bpf_obs *o);
const char *bpf_obs_prog_name(enum bpf_obs_prog p);
bool bpf_obs_attached(const struct bpf_obs *o, enum bpf_obs_prog p);
/* "attached", or "not available: <why>". */
const char *bpf_obs_status(const struct bpf_obs *o, enum bpf_obs_prog p);
/* Reads every attached program's maps (zeros for the others). */
int bpf_obs_read(const struct bpf_obs *o, struct bpf_obs_snapshot *s);
/* The q-quantile (0..1) of a log2 histogram: the upper bound of the slot it
 * falls in (slot i holds [2^i, 2^(i+1))), 0 when empty. */
uint64_t bpf_obs_hist_quantile(const struct hist *h, double q);
const char *bpf_obs_op_name(enum iolat_op op);

/* The same snapshot rendered like the daemon's stats (malloc'd, NULL on
 * ENOMEM): text lines; a JSON object (no braces' outer key: "{...}");
 * Prometheus histograms (_bucket with le in seconds, _sum, _count). */
char *bpf_obs_render_text(const struct bpf_obs *o, const struct bpf_obs_snapshot *s);
char *bpf_obs_render_json(const struct bpf_obs *o, const struct bpf_obs_snapshot *s);
char *bpf_obs_render_prometheus(const struct bpf_obs *o, const struct bpf_obs_snapshot *s);

#endif
