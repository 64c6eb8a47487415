/* stats.h - every counter of the daemon, declared once.
 *
 * MOE_COUNTERS lists the counters (monotonic), MOE_GAUGES the gauges (a
 * current value), MOE_HISTOGRAMS the latency histograms (log2 buckets of
 * nanoseconds). Each entry is X(id, "help"); the id becomes STAT_<id> /
 * GAUGE_<id> / HIST_<id> and the exported name "moetier_<id>". Other
 * subsystems add their entries here (append; keep the groups).
 *
 * Per (layer, expert) the stats also keep hits, misses, loads and bytes
 * (the EPLB shape). Updates are relaxed atomics: safe from any thread, no
 * lock. Renderers: text (moectl), JSON (jansson), Prometheus exposition.
 */
#ifndef MOETIER_STATS_H
#define MOETIER_STATS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util.h"

#define MOE_COUNTERS(X) \
	/* cache (cache.c) */ \
	X(cache_acquires, "experts requested through acquire") \
	X(cache_hits_gpu, "acquires served from the GPU tier") \
	X(cache_hits_host, "acquires served from the host tier") \
	X(cache_misses, "acquires that found the expert in no memory tier") \
	X(cache_rejects, "acquire entries refused at once (bad layer or expert)") \
	X(cache_joined_loads, "misses that joined a load already in flight") \
	X(cache_nowait_misses, "misses returned at once to NOWAIT acquires") \
	X(cache_stalls, "acquires that had to wait for a free slot or a load") \
	X(cache_no_slot, "acquires refused because no slot could be freed") \
	X(cache_timeouts, "blocking acquires that ran out of time") \
	X(cache_leases, "leases handed out") \
	X(cache_releases, "leases released") \
	X(cache_stale_leases, "releases or checks refused because the lease was stale") \
	X(cache_client_releases, "leases dropped because their client went away") \
	X(cache_loads_host, "NVMe -> host loads completed and verified") \
	X(cache_load_bytes_host, "bytes loaded NVMe -> host") \
	X(cache_loads_gpu, "host -> GPU copies completed") \
	X(cache_load_bytes_gpu, "bytes copied host -> GPU") \
	X(cache_load_errors, "loads that ended in an error to the requester") \
	X(cache_evictions_host, "experts evicted from the host tier") \
	X(cache_evictions_gpu, "experts evicted from the GPU tier") \
	X(cache_checksum_failures, "NVMe loads whose CRC32C did not match") \
	X(cache_checksum_rereads, "re-reads after a CRC32C mismatch") \
	X(cache_prefetches, "prefetch loads started") \
	X(cache_prefetch_hits, "acquires served by an expert a prefetch loaded") \
	X(cache_prefetch_cancels, "prefetch reads cancelled before they ran") \
	X(cache_prefetch_wasted, "prefetched experts evicted before any use") \
	X(cache_gpu_prefetches, "host -> GPU copies started for prefetches") \
	X(cache_gpu_prefetch_hits, "GPU acquires served by a copy a prefetch made") \
	X(cache_gpu_prefetch_wasted, "GPU copies made for prefetches evicted before any use") \
	X(prefetch_not_in_time, "prefetch layer plans cut short or skipped: nothing more could land in time") \
	X(cache_pins, "pin requests") \
	/* NVMe engine (tier_nvme.c) */ \
	X(nvme_reads, "read requests completed") \
	X(nvme_read_bytes, "bytes read from the pack") \
	X(nvme_submits, "SQEs submitted (retries included)") \
	X(nvme_short_reads, "reads that returned fewer bytes than asked (remainder resubmitted)") \
	X(nvme_retries_eagain, "reads resubmitted after -EAGAIN") \
	X(nvme_retries_eintr, "reads resubmitted after -EINTR") \
	X(nvme_retries_eio, "reads retried after -EIO") \
	X(nvme_errors, "reads that failed after their retries") \
	X(nvme_cancels, "reads cancelled") \
	X(nvme_demand_reads, "demand reads submitted") \
	X(nvme_prefetch_reads, "prefetch reads submitted") \
	X(nvme_unregistered_reads, "reads into buffers that are not registered") \
	X(nvme_register_failures, "fixed-buffer registrations that failed") \
	X(nvme_pread_fallback, "reads done by the pread fallback") \
	/* host arena (tier_host.c) */ \
	X(host_alloc_failures, "host slot allocations that failed") \
	X(host_mlock_failures, "arena mlock attempts that failed") \
	/* fault injection (fault.c, debug builds) */ \
	X(faults_injected, "faults injected on purpose")

#define MOE_GAUGES(X) \
	X(host_slots, "host arena slots") \
	X(host_slots_used, "host slots holding or loading an expert") \
	X(host_slots_leased, "host slots under at least one lease") \
	X(host_arena_bytes, "host arena bytes") \
	X(host_arena_locked, "1 when the host arena is mlocked") \
	X(host_arena_hugetlb, "1 when the host arena is on hugetlb pages") \
	X(gpu_slots, "GPU arena slots") \
	X(gpu_slots_used, "GPU slots holding or loading an expert") \
	X(gpu_slots_leased, "GPU slots under at least one lease") \
	X(nvme_uring, "1 when io_uring is in use, 0 for the pread fallback") \
	X(nvme_registered, "1 when the arena is registered as fixed buffers") \
	X(nvme_queue_depth, "configured NVMe queue depth") \
	X(nvme_inflight, "reads in flight now") \
	X(nvme_queued, "reads waiting for a queue slot") \
	X(clients_with_leases, "client ids holding leases")

#define MOE_HISTOGRAMS(X) \
	X(nvme_read_ns, "NVMe read latency per expert, submit to completion") \
	X(crc_ns, "CRC32C check time per expert") \
	X(gpu_copy_ns, "host -> GPU copy time per expert") \
	X(acquire_wait_ns, "time blocking acquires waited")

enum stat_counter {
#define X(id, help) STAT_##id,
	MOE_COUNTERS(X)
#undef X
	STAT__COUNT
};

enum stat_gauge {
#define X(id, help) GAUGE_##id,
	MOE_GAUGES(X)
#undef X
	GAUGE__COUNT
};

enum stat_hist {
#define X(id, help) HIST_##id,
	MOE_HISTOGRAMS(X)
#undef X
	HIST__COUNT
};

/* Buckets: bucket 0 = [0, 1) ns... bucket b = [2^(b-1), 2^b) ns; the last
 * bucket takes everything above (2^46 ns = 19.5 h). */
#define STATS_HIST_BUCKETS 48

/* Per (layer, expert) counters, EPLB shape. */
enum stat_expert {
	STAT_EXPERT_HITS = 0,
	STAT_EXPERT_MISSES,
	STAT_EXPERT_LOADS,
	STAT_EXPERT_BYTES,
	STAT_EXPERT__COUNT
};

#define STATS_INFO_MAX 8

struct stats {
	_Atomic uint64_t counters[STAT__COUNT];
	_Atomic int64_t gauges[GAUGE__COUNT];
	_Atomic uint64_t hist[HIST__COUNT][STATS_HIST_BUCKETS];
	_Atomic uint64_t hist_sum[HIST__COUNT];
	uint32_t n_layers, n_experts;
	_Atomic uint64_t *expert; /* [n_layers * n_experts * STAT_EXPERT__COUNT] */
	/* Short "key=value" facts (engine in use and why, placement...). */
	char info_key[STATS_INFO_MAX][32];
	char info_val[STATS_INFO_MAX][160];
	unsigned n_info;
};

/* A plain copy, consistent per field (not across fields). */
struct stats_snapshot {
	uint64_t counters[STAT__COUNT];
	int64_t gauges[GAUGE__COUNT];
	uint64_t hist[HIST__COUNT][STATS_HIST_BUCKETS];
	uint64_t hist_sum[HIST__COUNT];
	uint32_t n_layers, n_experts;
	uint64_t *expert; /* malloc'd copy, or NULL */
	char info_key[STATS_INFO_MAX][32];
	char info_val[STATS_INFO_MAX][160];
	unsigned n_info;
};

/* n_layers/n_experts may be 0 (no per-expert counters). */
struct stats *stats_new(uint32_t n_layers, uint32_t n_experts);
void stats_free(struct stats *s);

static inline void stats_add(struct stats *s, enum stat_counter id, uint64_t v)
{
	if (s)
		atomic_fetch_add_explicit(&s->counters[id], v, memory_order_relaxed);
}
static inline void stats_inc(struct stats *s, enum stat_counter id) { stats_add(s, id, 1); }
static inline uint64_t stats_get(const struct stats *s, enum stat_counter id)
{
	return atomic_load_explicit(&((struct stats *)s)->counters[id], memory_order_relaxed);
}
static inline void stats_gauge_set(struct stats *s, enum stat_gauge id, int64_t v)
{
	if (s)
		atomic_store_explicit(&s->gauges[id], v, memory_order_relaxed);
}
static inline void stats_gauge_add(struct stats *s, enum stat_gauge id, int64_t v)
{
	if (s)
		atomic_fetch_add_explicit(&s->gauges[id], v, memory_order_relaxed);
}
static inline int64_t stats_gauge_get(const struct stats *s, enum stat_gauge id)
{
	return atomic_load_explicit(&((struct stats *)s)->gauges[id], memory_order_relaxed);
}
/* Records one latency sample. */
void stats_hist_add(struct stats *s, enum stat_hist id, uint64_t ns);
/* Bucket index of a value (exposed for tests). */
unsigned stats_hist_bucket(uint64_t ns);
/* Per-expert counter (out-of-range keys are ignored). */
void stats_expert_add(struct stats *s, uint32_t layer, uint32_t expert, enum stat_expert what, uint64_t v);
uint64_t stats_expert_get(const struct stats *s, uint32_t layer, uint32_t expert, enum stat_expert what);
/* Sets (or replaces) an info fact; not thread-safe against renderers: set
 * them at creation time. */
void stats_set_info(struct stats *s, const char *key, const char *fmt, ...) MOE_PRINTF(3, 4);

const char *stats_counter_name(enum stat_counter id);
const char *stats_counter_help(enum stat_counter id);
const char *stats_gauge_name(enum stat_gauge id);
const char *stats_hist_name(enum stat_hist id);

int stats_snapshot(const struct stats *s, struct stats_snapshot *out);
void stats_snapshot_free(struct stats_snapshot *snap);
/* Value at quantile q (0..1) of a histogram: the upper bound of the bucket
 * holding it (0 when empty). */
uint64_t stats_hist_quantile(const struct stats_snapshot *snap, enum stat_hist id, double q);

/* Renderers. Each returns a malloc'd NUL-terminated string, or NULL on
 * allocation failure. per_expert: include the per-(layer, expert) table
 * (only nonzero rows in text and Prometheus). Prometheus follows its
 * conventions: counters end in _total, gauges and histograms never do,
 * histograms are in seconds (an X_ns id is exposed as moetier_X_seconds,
 * le and _sum in seconds); per_expert there is opt-in (4 series per
 * expert), the caller passes true only when the request asked for it. */
char *stats_render_text(const struct stats_snapshot *snap, bool per_expert);
char *stats_render_json(const struct stats_snapshot *snap, bool per_expert);
char *stats_render_prometheus(const struct stats_snapshot *snap, bool per_expert);

#endif
