/* options.h - moetierd's options, declared ONCE in OPTIONS_TABLE below.
 * The same table drives the command-line flags (--name=value), the
 * configuration file (/etc/moetier/moetierd.conf, "name = value" lines),
 * `moectl config get|set` and `moetierd --dump-config` (which writes
 * etc/moetierd.conf). */
#ifndef MOETIER_OPTIONS_H
#define MOETIER_OPTIONS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "util.h"

#define CONFIG_DEFAULT_PATH "/etc/moetier/moetierd.conf"

enum config_type { CONFIG_STR, CONFIG_SIZE, CONFIG_U32, CONFIG_I32, CONFIG_BOOL };

/* X(name, field, type, min, max, default, runtime, help)
 * name: the option (also the flag and the conf key); runtime: may be changed
 * by `moectl config set` on a running daemon. min/max bound numbers (and
 * sizes); strings ignore them. */
#define OPTIONS_TABLE(X) \
	X("pack", pack, CONFIG_STR, 0, 0, "", false, \
	  "pack file(s) to serve, comma-separated; the first is the default model") \
	X("socket", socket, CONFIG_STR, 0, 0, "/run/moetier/moetierd.sock", false, \
	  "control socket path; its directory must not be writable by others") \
	X("socket-mode", socket_mode, CONFIG_U32, 0, 0777, "0660", false, \
	  "permission bits of the control socket") \
	X("socket-group", socket_group, CONFIG_STR, 0, 0, "moetier", false, \
	  "group owning the socket; its members may use the data plane (empty: keep the daemon's group)") \
	X("admin-group", admin_group, CONFIG_STR, 0, 0, "", false, \
	  "group whose members may send admin requests, besides uid 0 and the daemon's own uid") \
	X("host-bytes", host_bytes, CONFIG_SIZE, 4096, UINT64_MAX, "256M", false, \
	  "host arena size (whole expert slots)") \
	X("gpu-bytes", gpu_bytes, CONFIG_SIZE, 0, UINT64_MAX, "0", false, \
	  "GPU arena size; 0 disables the GPU tier") \
	X("gpu-backend", gpu_backend, CONFIG_STR, 0, 0, "emulated", false, \
	  "GPU arena backend: auto, vmm, uvm, emulated") \
	X("gpu-device", gpu_device, CONFIG_I32, 0, 64, "0", false, \
	  "CUDA device ordinal") \
	X("policy", policy, CONFIG_STR, 0, 0, "lru", false, \
	  "eviction policy") \
	X("layer-slots", layer_slots, CONFIG_U32, 0, 65536, "0", false, \
	  "host slots per MoE layer, each layer its own budget (moe-sim's default); 0: one budget for the arena") \
	X("predictor", predictor, CONFIG_STR, 0, 0, "none", false, \
	  "expert predictor of each client stream: none, temporal, coact, tokenid, tracematch, learned, combo") \
	X("predictor-model", predictor_model, CONFIG_STR, 0, 0, "", false, \
	  "model file from 'moe-sim train' (tokenid, tracematch, learned, combo)") \
	X("prefetch", prefetch, CONFIG_BOOL, 0, 1, "true", false, \
	  "prefetch the predicted experts of the next layers (with a predictor)") \
	X("prefetch-lookahead", prefetch_lookahead, CONFIG_U32, 0, 16, "0", false, \
	  "layers planned ahead; 0 adapts 1..6 to the measured load and compute times") \
	X("prefetch-tier", prefetch_tier, CONFIG_STR, 0, 0, "host", false, \
	  "where prefetches go: host (NVMe -> host arena) or gpu (on to the GPU arena)") \
	X("prefetch-deadline", prefetch_deadline, CONFIG_BOOL, 0, 1, "true", false, \
	  "issue a prefetch only when it can land before its layer is accessed") \
	X("compute-calibrate", compute_calibrate, CONFIG_BOOL, 0, 1, "true", false, \
	  "measure the host expert-FFN rates at start-up for the move-or-compute cost model") \
	X("link-nvme-mbps", link_nvme_mbps, CONFIG_U32, 0, 1000000, "4000", false, \
	  "NVMe -> host bandwidth the cost model assumes, MB/s (0 = unknown)") \
	X("link-h2g-mbps", link_h2g_mbps, CONFIG_U32, 0, 10000000, "25000", false, \
	  "host -> GPU bandwidth the cost model assumes, MB/s (used when a GPU tier exists)") \
	X("queue-depth", queue_depth, CONFIG_U32, 1, 256, "8", false, \
	  "NVMe reads in flight") \
	X("io-thread-nice", io_thread_nice, CONFIG_I32, -20, 19, "-5", false, \
	  "nice of each cache's I/O thread, below the clients' compute threads so that completions are reaped, checked and refilled at once (< 0 needs CAP_SYS_NICE; 0 = the daemon's own)") \
	X("numa-node", numa_node, CONFIG_I32, -2, 4096, "-2", false, \
	  "host arena NUMA placement: -2 default, -1 interleave, >= 0 that node") \
	X("huge-pages", huge_pages, CONFIG_BOOL, 0, 1, "false", false, \
	  "back the host arena with 2 MiB huge pages when available") \
	X("mlock-required", mlock_required, CONFIG_BOOL, 0, 1, "false", false, \
	  "fail start-up when the host arena cannot be locked in memory") \
	X("no-uring", no_uring, CONFIG_BOOL, 0, 1, "false", false, \
	  "read with pread instead of io_uring") \
	X("ring-entries", ring_entries, CONFIG_U32, 16, 4096, "256", false, \
	  "entries per client ring (power of two)") \
	X("scratch-bytes", scratch_bytes, CONFIG_SIZE, 4096, 268435456, "1M", false, \
	  "per-client scratch area (router logits)") \
	X("ring-spin-us", ring_spin_us, CONFIG_U32, 0, 100000, "50", true, \
	  "busy-poll window of the ring thread before it sleeps on the futex") \
	X("max-clients", max_clients, CONFIG_U32, 1, 127, "64", false, \
	  "clients attached at once") \
	X("admin-reserve", admin_reserve, CONFIG_U32, 0, 64, "4", false, \
	  "slots of max-clients kept for admin peers (root, the daemon's uid, admin-group), by SO_PEERCRED at accept") \
	X("hello-timeout-ms", hello_timeout_ms, CONFIG_U32, 0, 600000, "2000", true, \
	  "a connection that has not sent HELLO by then is closed (0: no deadline)") \
	X("client-share", client_share, CONFIG_U32, 1, 100, "50", true, \
	  "percent of each tier's slots one client may hold leased while other clients are attached") \
	X("max-leases", max_leases, CONFIG_U32, 1, 1048576, "4096", false, \
	  "leases one client may hold at once") \
	X("wait-timeout-ms", wait_timeout_ms, CONFIG_U32, 1, 3600000, "30000", true, \
	  "bound on a blocking ACQUIRE") \
	X("user", user, CONFIG_STR, 0, 0, "", false, \
	  "switch to this user after start-up (empty: stay); capabilities are kept") \
	X("seccomp", seccomp, CONFIG_BOOL, 0, 1, "true", false, \
	  "install the seccomp filter after start-up") \
	X("bpf", bpf, CONFIG_BOOL, 0, 1, "true", false, \
	  "load the eBPF programs (block I/O latency, arena faults, run-queue waits; needs CAP_BPF and CAP_PERFMON)") \
	X("log-level", log_level, CONFIG_STR, 0, 0, "info", true, \
	  "err, warn, info or debug") \
	X("foreground", foreground, CONFIG_BOOL, 0, 1, "false", false, \
	  "stay in the foreground (systemd, tests); otherwise detach once ready") \
	X("pid-file", pid_file, CONFIG_STR, 0, 0, "", false, \
	  "write the daemon's pid here once ready (empty: none)")

#define CONFIG_STR_FIELD_T char *
#define CONFIG_SIZE_FIELD_T uint64_t
#define CONFIG_U32_FIELD_T uint32_t
#define CONFIG_I32_FIELD_T int32_t
#define CONFIG_BOOL_FIELD_T bool

struct moetierd_config {
#define CONFIG_DECL(name, field, type, min, max, def, rt, help) type##_FIELD_T field;
	OPTIONS_TABLE(CONFIG_DECL)
#undef CONFIG_DECL
};

struct option_desc {
	const char *name;
	enum config_type type;
	size_t offset;
	int64_t min;
	uint64_t max;
	const char *def;
	bool runtime;
	const char *help;
};

/* The table, and its length. */
const struct option_desc *options_table(size_t *n);
const struct option_desc *options_find(const char *name);

/* Fills every option with its default (strings are malloc'd). */
void options_init(struct moetierd_config *c);
void options_free(struct moetierd_config *c);
/* Parses and range-checks value, then stores it. -ENOENT for an unknown
 * name, -EINVAL/-ERANGE for a bad value (err says which). */
int options_set(struct moetierd_config *c, const char *name, const char *value, struct moe_error *err);
/* Formats the current value (sizes in bytes with a unit when exact). */
int options_get(const struct moetierd_config *c, const char *name, char *buf, size_t len);
/* Reads "name = value" lines (# comments, blank lines). Unknown names and
 * bad values are errors naming the line. */
int options_load_file(struct moetierd_config *c, const char *path, struct moe_error *err);
/* Writes every option with its help and current value (the conf file). */
void options_dump(FILE *f, const struct moetierd_config *c);
/* Usage text for --help, from the table. */
void options_usage(FILE *f, const char *prog);

/* Command line: --config=PATH (default CONFIG_DEFAULT_PATH when it exists),
 * then every option as --name=VALUE or --name VALUE (booleans also as --name
 * and --no-name). Sets *dump / *help for --dump-config / --help / --version.
 * Positional arguments are appended to `pack`. */
int options_parse_args(struct moetierd_config *c, int argc, char **argv, bool *dump, bool *help,
		      bool *version, struct moe_error *err);

#endif
