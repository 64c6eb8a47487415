/* compute_check.h - for the libmoetier clients that check a moetierd's
 * COMPUTE against a CPU kernel run in-process on the pack's own extents
 * (tests/ffn_compute_check.c, tests/molae_serve_check.c): failing with a
 * message, connecting, and one layer's COMPUTE compared bit for bit. */
#ifndef MOETIER_TESTS_COMPUTE_CHECK_H
#define MOETIER_TESTS_COMPUTE_CHECK_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ffn.h"
#include "moetier/moetier.h"
#include "pack.h"

#define FAIL(...) \
	do { \
		fprintf(stderr, "FAIL: " __VA_ARGS__); \
		fputc('\n', stderr); \
		exit(1); \
	} while (0)

/* A client of the daemon at sock with a ring and the host arena, and its
 * model's description in *mi; fails the check otherwise. */
static inline moet_ctx *compute_check_connect(const char *sock, const char *name, struct moet_model_info *mi)
{
	moet_ctx *c = NULL;
	struct moet_connect_opts o = { sizeof(o), sock, NULL, name, MOET_CAP_RING | MOET_CAP_HOST_ARENA, 0, 20 };
	int rc = moet_connect(&o, &c);
	if (rc)
		FAIL("connect: %s (%s)", moet_strerror(rc), moet_last_error(NULL));
	*mi = (struct moet_model_info){ .size = sizeof(*mi) };
	if (moet_model_info(c, mi))
		FAIL("model info");
	return c;
}

/* Token inputs every check uses: x[i] in [-11/16, 11/16], no randomness. */
static inline void compute_check_fill_x(float *x, size_t count)
{
	for (size_t i = 0; i < count; i++)
		x[i] = (float)((int)(i * 37 % 23) - 11) / 16.0f;
}

/* The kernel checked against: one expert's output (n floats) for one
 * token's input x, its extent in buf as the pack stores it; 0 or failure. */
typedef int (*compute_check_expert_fn)(void *ctx, uint32_t layer, uint32_t expert, const uint8_t *buf,
				       const float *x, float *out);

/* COMPUTE of MoE layer l (T tokens x K experts with weights w, inputs x of
 * n floats) through the daemon, retried while the experts load, equals
 * sum_j w * expert(x) here, the terms added in order with ffn_axpy, bit
 * for bit. buf: an extent-sized buffer; y, yr, one: T n, T n, n floats.
 * what names the kernel in the failure message. */
static inline void compute_check_layer(moet_ctx *c, struct pack_file *pf, uint32_t l, uint32_t T, uint32_t K,
				       const uint32_t *experts, const float *w, const float *x, uint32_t n,
				       uint8_t *buf, float *y, float *yr, float *one, compute_check_expert_fn expert,
				       void *ctx, const char *what)
{
	struct moe_error err = { "" };
	int rc = moet_compute(c, l, T, K, experts, w, x, y);
	for (int i = 0; i < 400 && rc == -EAGAIN; i++) {
		moet_wait_ready(c, l, 50);
		rc = moet_compute(c, l, T, K, experts, w, x, y);
	}
	if (rc != (int)T)
		FAIL("compute layer %u: %s (%s)", l, moet_strerror(rc), moet_last_error(c));
	for (uint32_t t = 0; t < T; t++) {
		float *yt = yr + (size_t)t * n;
		memset(yt, 0, sizeof(float) * n);
		for (uint32_t j = 0; j < K; j++) {
			if (pack_read_expert(pf, l, experts[t * K + j], buf, &err))
				FAIL("%s", err.msg);
			if (expert(ctx, l, experts[t * K + j], buf, x + (size_t)t * n, one))
				FAIL("layer %u expert %u: %s", l, experts[t * K + j], what);
			ffn_axpy(yt, w[t * K + j], one, n);
		}
	}
	for (uint32_t i = 0; i < T * n; i++)
		if (y[i] != yr[i])
			FAIL("layer %u: COMPUTE y[%u] = %.9g, %s here %.9g", l, i, (double)y[i], what, (double)yr[i]);
}

#endif
