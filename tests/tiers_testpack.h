/* tiers_testpack.h - small packs for the tier/cache tests: every byte of
 * expert (l, e) is a known function of (l, e, offset), so a served payload
 * can be checked independently of the pack's own CRC. Header-only. */
#ifndef MOETIER_TIERS_TESTPACK_H
#define MOETIER_TIERS_TESTPACK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pack.h"

static inline unsigned char tp_byte(uint32_t l, uint32_t e, uint64_t i)
{
	uint64_t x = (l * 1000003ull + e * 7919ull + (i >> 3)) * 0x9E3779B97F4A7C15ull;
	return (unsigned char)(x >> (56 - 8 * (i & 7)));
}

/* Writes a pack of n_moe layers x n_exp experts, f32 gate/up/down of
 * hidden x width, to path. Returns 0 or a negative errno (msg in err). */
static inline int tp_write(const char *path, uint32_t n_moe, uint32_t n_exp, uint32_t hidden, uint32_t width,
			   struct moe_error *err)
{
	struct moe_model_config m;
	memset(&m, 0, sizeof(m));
	snprintf(m.name, sizeof(m.name), "tiers-test");
	moe_model_set_family_defaults(&m, MOE_FAMILY_QWEN2_MOE);
	m.dtype = MOE_DTYPE_F32;
	m.hidden = hidden;
	m.expert_width = width;
	m.n_experts = n_exp;
	m.top_k = n_exp < 2 ? 1 : 2;
	m.n_layers = n_moe;
	m.n_moe_layers = n_moe;
	m.first_moe_layer = 0;
	m.moe_layer_step = 1;
	struct pack_part_desc parts[3] = {
		{ .role = PACK_ROLE_GATE, .dtype = MOE_DTYPE_F32, .rows = width, .cols = hidden },
		{ .role = PACK_ROLE_UP, .dtype = MOE_DTYPE_F32, .rows = width, .cols = hidden },
		{ .role = PACK_ROLE_DOWN, .dtype = MOE_DTYPE_F32, .rows = hidden, .cols = width },
	};
	uint64_t payload = 3ull * hidden * width * 4;
	unsigned char *buf = malloc(payload);
	struct pack_writer *w;
	if (!buf)
		return -ENOMEM;
	int rc = pack_writer_create(path, &m, parts, 3, "test", &w, err);
	for (uint32_t l = 0; rc == 0 && l < n_moe; l++)
		for (uint32_t e = 0; rc == 0 && e < n_exp; e++) {
			for (uint64_t i = 0; i < payload; i++)
				buf[i] = tp_byte(l, e, i);
			rc = pack_writer_begin_expert(w, l, e, err);
			if (rc == 0)
				rc = pack_writer_write(w, buf, payload, err);
			if (rc == 0)
				rc = pack_writer_end_expert(w, err);
		}
	if (rc == 0)
		rc = pack_writer_finish(w, err);
	else
		pack_writer_abort(w);
	free(buf);
	return rc;
}

/* 0 when buf holds exactly expert (l, e)'s payload. */
static inline int tp_check(const void *buf, uint32_t l, uint32_t e, uint64_t payload)
{
	const unsigned char *b = buf;
	for (uint64_t i = 0; i < payload; i++)
		if (b[i] != tp_byte(l, e, i))
			return -1;
	return 0;
}

#endif
