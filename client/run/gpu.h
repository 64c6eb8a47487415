/* gpu.h - moe-run's GPU tier: the daemon's CUDA VMM arena imported into
 * this process (moet_gpu_export, cuMemImportFromShareableHandle, mapped at
 * the exported offsets of one reserved range, read-only) and the grouped
 * expert FFN of kernels/ffn.cu run over the slots the daemon serves there.
 *
 * One layer call is one batch: gpu_batch_begin, then per expert served
 * from the GPU tier gpu_batch_add (its slot, the tokens routed to it and
 * their routing weights), gpu_batch_launch (async on the batch's stream:
 * x uploaded once per batch, the pair arrays of the experts added since the
 * last launch, gate_up then down into the batch's y), as many launches as
 * the caller's acquire rounds need, then gpu_batch_wait: y copied back and
 * the stream synchronized. The caller holds the experts' leases until the
 * wait returns, since the kernels read the slots until then.
 *
 * Sums: each pair adds weight * expert(x) into y with atomicAdd, so the
 * order of the terms differs from the host's (top-k order through
 * ffn_axpy) and run to run: results agree with the host within the
 * tolerance tests/cuda_ffn_check.c states, never bit for bit.
 *
 * libcuda.so.1 is dlopen'd and its entry points taken from
 * cuGetProcAddress (no -lcuda), so the binary runs without a driver; without
 * cuda.h at build time (no HAVE_CUDA) or without nvcc (no fatbin) gpu_open
 * says so and fails. */
#ifndef MOETIER_RUN_GPU_H
#define MOETIER_RUN_GPU_H

#include <stdbool.h>
#include <stdint.h>

#include "ffn.h"
#include "moetier/moetier.h"
#include "util.h"

struct gpu;

/* The device path for the daemon behind ctx, whose GPU tier has n_slots
 * slots (model info): the driver loaded, the arena exported and mapped,
 * the ffn fatbin loaded, a stream and events made. E, k: experts per layer
 * and top-k (the batch's largest sizes). 0, or a negative errno with err
 * saying why the device cannot be used (-ENOTSUP: a build without CUDA or
 * nvcc; -ENODEV: no driver or device; -EOPNOTSUPP: an arena that cannot be
 * exported, e.g. the uvm backend). */
int gpu_open(moet_ctx *ctx, uint32_t n_slots, uint32_t E, uint32_t k, struct gpu **out, struct moe_error *err);
void gpu_close(struct gpu *g);

/* A new layer call of B tokens of n floats, experts of width m. 0 or
 * -ENOMEM (buffers grow on demand). */
int gpu_batch_begin(struct gpu *g, uint32_t B, uint32_t n, uint32_t m, struct moe_error *err);
/* Whether GPU slot `slot` is mapped here; at most once per batch a slot not
 * mapped yet makes it fetch the export again (the daemon creates a slot's
 * chunk at its first fill) and map what is new. false: compute that expert
 * elsewhere. */
bool gpu_slot_ready(struct gpu *g, int32_t slot);
/* Expert in GPU slot `slot` for cnt tokens tok[i] with routing weights
 * w[i]. 0, or -ENOSPC past the batch's E experts / B * k pairs. */
int gpu_batch_add(struct gpu *g, int32_t slot, uint32_t cnt, const uint32_t *tok, const float *w);
/* Launches what was added since the last launch (nothing: a no-op) with
 * the layer's layout; x [B x n] is uploaded at the batch's first launch
 * and must not change until gpu_batch_wait. 0 or a negative errno. */
int gpu_batch_launch(struct gpu *g, const struct ffn_layout *L, const float *x, struct moe_error *err);
/* Waits for the batch; *y (NULL when nothing was launched) then points at
 * [B x n] sums valid until the next gpu_batch_begin. 0 or a negative errno. */
int gpu_batch_wait(struct gpu *g, const float **y, struct moe_error *err);

struct gpu_stats {
	uint64_t launches;     /* gate_up + down pairs of kernels launched */
	uint64_t experts;      /* experts computed on the device */
	uint64_t pairs;        /* (token, expert) pairs */
	uint64_t device_ns;    /* device time of the batches (events: upload to download) */
	uint64_t wait_ns;      /* host time blocked in gpu_batch_wait */
	uint64_t exports;      /* times the arena's handles were fetched */
	uint64_t mapped;       /* chunks mapped now */
};
void gpu_get_stats(const struct gpu *g, struct gpu_stats *out);
/* "NVIDIA H100 80GB HBM3 (device 0)" or similar, for the one line that
 * says the device path is on. */
const char *gpu_name(const struct gpu *g);

#endif
