/* experts.h - moe-run's routed experts: route each token locally
 * (core/route.h, llama.cpp's rule for the arch), then compute the chosen
 * experts with kernels/ffn.h from
 *   - the daemon's host arena through libmoetier (zero copy: slot pointers
 *     of the mapped arena; NOWAIT acquires, the resident experts computed
 *     while the misses load, PREFETCH hints for the next layer), or
 *   - memory (--local: every expert read from the pack once; the "all
 *     resident" reference).
 * Each (token, slot) output has its own buffer and a token's outputs are
 * summed in top-k order with ffn_axpy, so the result has the same bits
 * whatever was resident and however the tokens were grouped.
 * The GPU tier is not used: moe-run computes on the host only. */
#ifndef MOETIER_RUN_EXPERTS_H
#define MOETIER_RUN_EXPERTS_H

#include <stdbool.h>
#include <stdint.h>

#include "model.h"

struct experts;

struct experts_stats {
	uint64_t slots;        /* (token, expert) pairs computed */
	uint64_t uses;         /* distinct experts computed per layer call, summed */
	uint64_t hits_host;    /* ...served at the first acquire from the host arena */
	uint64_t hits_gpu;     /* ...from the GPU arena */
	uint64_t misses;       /* ...not resident at the first acquire */
	uint64_t waits;        /* waits for a load */
	uint64_t stall_ns;     /* time spent waiting for misses */
	uint64_t prefetches;   /* experts hinted for the next layer */
	uint64_t prefetches_used; /* ...that the (last) token then chose there */
	uint64_t fallback_reads; /* experts read from the pack by moe-run itself */
	uint64_t bytes_read;   /* bytes the daemon read from NVMe (its counters) */
	bool local;
};

/* Every expert read from the pack into memory. */
int experts_open_local(const struct model *m, struct experts **out, struct moe_error *err);
/* The daemon at socket (NULL: $MOETIER_SOCKET, else the default socket).
 * prefetch: send hints for the next `prefetch` layers (each one's router on
 * this layer's input); 0 none. */
int experts_open_daemon(const struct model *m, const char *socket, unsigned prefetch, struct experts **out,
			struct moe_error *err);
void experts_close(struct experts *ex);

/* The token about to be computed (moet_set_token hint; a position going back
 * to 0 starts a sequence). token_key: FNV-1a of the token's text, 0 unknown. */
void experts_set_token(struct experts *ex, uint32_t token_key, uint32_t position);

/* The routed-expert output of model layer il for B tokens: x [B x n_embd]
 * (ffn_norm'ed), y [B x n_embd] = sum_j w_j expert_j(x). 0 or -errno. */
int experts_layer(struct experts *ex, uint32_t il, const float *x, uint32_t B, float *y, int threads,
		  struct moe_error *err);

/* Counters so far (bytes_read refreshed from the daemon on each call). */
void experts_get_stats(struct experts *ex, struct experts_stats *out);

#endif
