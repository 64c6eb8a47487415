/* test_compute.c - the COMPUTE engine on a fake expert set: results equal
 * the direct kernels (ffn_moe_token) bit for bit for any thread counts,
 * missing experts and bad input are refused with clear errors, counters
 * count, and the cost model picks the side its own formula says. */
#include "config.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "compute.h"
#include "dtype.h"
#include "ffn.h"

#define E 8

struct fake_set {
	struct moe_model_config cfg;
	struct pack_part_desc parts[4];
	uint32_t n_parts;
	uint64_t stride;
	uint8_t *ext[E];
	bool missing[E];
	unsigned lookups;
};

static uint64_t rs = 99;
static float fr(float a)
{
	rs = rs * 6364136223846793005ull + 1442695040888963407ull;
	return a * ((float)(rs >> 40) / 8388608.0f - 1.0f);
}

static void part(struct fake_set *s, uint32_t role, enum moe_dtype t, uint32_t rows, uint32_t cols)
{
	uint64_t rb;
	cr_assert(moe_dtype_row_bytes(t, cols, &rb));
	s->parts[s->n_parts++] = (struct pack_part_desc){ role, t, rows, cols, s->stride, rb * rows };
	s->stride += (rb * rows + 4095) & ~4095ull;
}

static void fill(struct fake_set *s)
{
	for (int e = 0; e < E; e++) {
		s->ext[e] = aligned_alloc(4096, s->stride);
		memset(s->ext[e], 0, s->stride);
		for (uint32_t p = 0; p < s->n_parts; p++) {
			const struct pack_part_desc *d = &s->parts[p];
			float *v = malloc(sizeof(float) * d->cols);
			uint64_t rb = d->bytes / d->rows;
			for (uint32_t r = 0; r < d->rows; r++) {
				uint8_t *row = s->ext[e] + d->offset + r * rb;
				for (uint32_t c = 0; c < d->cols; c++)
					v[c] = fr(0.5f);
				if (d->dtype == MOE_DTYPE_Q8_0)
					moe_quantize_row_q8_0(v, (void *)row, d->cols);
				else if (d->dtype == MOE_DTYPE_MXFP4)
					moe_quantize_row_mxfp4(v, (void *)row, d->cols);
				else
					for (uint32_t c = 0; c < d->cols; c++) {
						uint16_t h = moe_f32_to_bf16(v[c]);
						memcpy(row + 2 * c, &h, 2);
					}
			}
			free(v);
		}
	}
}

static void make_swiglu(struct fake_set *s, uint32_t n, uint32_t m)
{
	memset(s, 0, sizeof(*s));
	moe_model_set_family_defaults(&s->cfg, MOE_FAMILY_QWEN3_MOE);
	s->cfg.hidden = n;
	s->cfg.expert_width = m;
	s->cfg.n_experts = E;
	s->cfg.top_k = 3;
	s->cfg.n_moe_layers = 2;
	part(s, PACK_ROLE_GATE, MOE_DTYPE_Q8_0, m, n);
	part(s, PACK_ROLE_UP, MOE_DTYPE_Q8_0, m, n);
	part(s, PACK_ROLE_DOWN, MOE_DTYPE_BF16, n, m);
	fill(s);
}

static void make_gptoss(struct fake_set *s, uint32_t n, uint32_t m)
{
	memset(s, 0, sizeof(*s));
	moe_model_set_family_defaults(&s->cfg, MOE_FAMILY_GPT_OSS);
	s->cfg.hidden = n;
	s->cfg.expert_width = m;
	s->cfg.n_experts = E;
	s->cfg.top_k = 4;
	s->cfg.swiglu_limit = 0.5f;
	part(s, PACK_ROLE_GATE_UP, MOE_DTYPE_MXFP4, 2 * m, n);
	part(s, PACK_ROLE_GATE_UP_BIAS, MOE_DTYPE_BF16, 1, 2 * m);
	part(s, PACK_ROLE_DOWN, MOE_DTYPE_MXFP4, n, m);
	part(s, PACK_ROLE_DOWN_BIAS, MOE_DTYPE_BF16, 1, n);
	fill(s);
}

static void free_set(struct fake_set *s)
{
	for (int e = 0; e < E; e++)
		free(s->ext[e]);
}

static const void *lookup(void *ctx, uint32_t layer, uint32_t e)
{
	struct fake_set *s = ctx;
	(void)layer;
	s->lookups++;
	return e < E && !s->missing[e] ? s->ext[e] : NULL;
}

/* routing: random experts (duplicates inside a token allowed), weights */
static void route(uint32_t T, uint32_t k, uint32_t *ex, float *w)
{
	for (uint32_t i = 0; i < T * k; i++) {
		rs = rs * 6364136223846793005ull + 1442695040888963407ull;
		ex[i] = (uint32_t)(rs >> 33) % E;
		w[i] = 0.1f + fabsf(fr(1.0f));
	}
}

static void check_equal_direct(struct fake_set *s, uint32_t T, int threads, int kthreads)
{
	const uint32_t n = s->cfg.hidden, k = s->cfg.top_k;
	struct compute_opts o = { .threads = threads, .kernel_threads = kthreads };
	struct compute_ctx *c;
	struct moe_error err = { { 0 } };
	cr_assert_eq(compute_create(&s->cfg, s->parts, s->n_parts, s->stride, &o, &c, &err), 0, "%s", err.msg);

	const size_t ldx = n + 5, ldy = n + 1;
	float *x = malloc(sizeof(float) * T * ldx), *y = malloc(sizeof(float) * T * ldy);
	float *yd = malloc(sizeof(float) * n);
	uint32_t *ex = malloc(sizeof(uint32_t) * T * k);
	float *w = malloc(sizeof(float) * T * k);
	for (size_t i = 0; i < T * ldx; i++)
		x[i] = fr(1.0f);
	route(T, k, ex, w);
	cr_assert_eq(compute_run(c, 1, T, x, ldx, k, ex, w, y, ldy, lookup, s, &err), 0, "%s", err.msg);

	bool used[E] = { false };
	unsigned distinct = 0;
	for (uint32_t t = 0; t < T; t++) {
		const void *exts[8];
		for (uint32_t j = 0; j < k; j++) {
			exts[j] = s->ext[ex[t * k + j]];
			if (!used[ex[t * k + j]]) {
				used[ex[t * k + j]] = true;
				distinct++;
			}
		}
		cr_assert_eq(ffn_moe_token(compute_layout(c), exts, w + t * k, k, x + t * ldx, yd, 1), 0);
		for (uint32_t i = 0; i < n; i++)
			cr_assert(memcmp(&yd[i], &y[t * ldy + i], 4) == 0,
				  "T=%u threads %d/%d token %u out %u: compute %a, direct %a", T, threads, kthreads, t, i,
				  (double)y[t * ldy + i], (double)yd[i]);
	}
	struct compute_counters ctr;
	compute_get_counters(c, &ctr);
	cr_assert_eq(ctr.requests, 1);
	cr_assert_eq(ctr.failed, 0);
	cr_assert_eq(ctr.tokens, T);
	cr_assert_eq(ctr.pairs, (uint64_t)T * k);
	cr_assert_eq(ctr.expert_runs, distinct);
	cr_assert_eq(ctr.weight_bytes, distinct * compute_layout(c)->weight_bytes);
	cr_assert_eq(s->lookups, distinct, "one lookup per distinct expert");
	compute_destroy(c);
	free(x), free(y), free(yd), free(ex), free(w);
}

Test(compute, equals_direct_swiglu, .timeout = 60)
{
	struct fake_set s;
	static const uint32_t Ts[] = { 1, 3, 16, 64 };
	make_swiglu(&s, 64, 32);
	for (int i = 0; i < 4; i++) {
		s.lookups = 0;
		check_equal_direct(&s, Ts[i], 1, 1);
		s.lookups = 0;
		check_equal_direct(&s, Ts[i], 3, 2);
	}
	free_set(&s);
}

Test(compute, equals_direct_gptoss, .timeout = 60)
{
	struct fake_set s;
	make_gptoss(&s, 64, 32);
	check_equal_direct(&s, 16, 1, 1);
	s.lookups = 0;
	check_equal_direct(&s, 5, 2, 1);
	free_set(&s);
}

Test(compute, every_path_equals_direct, .timeout = 60)
{
	struct fake_set s;
	make_swiglu(&s, 64, 32);
	for (int isa = 0; isa < FFN_ISA_COUNT; isa++) {
		if (!ffn_isa_supported((enum ffn_isa)isa))
			continue;
		cr_assert_eq(ffn_set_isa((enum ffn_isa)isa), 0);
		s.lookups = 0;
		check_equal_direct(&s, 7, 2, 1);
	}
	free_set(&s);
}

Test(compute, missing_and_bad_input, .timeout = 30)
{
	struct fake_set s;
	struct compute_ctx *c;
	struct moe_error err = { { 0 } };
	make_swiglu(&s, 64, 32);
	cr_assert_eq(compute_create(&s.cfg, s.parts, s.n_parts, s.stride, NULL, &c, &err), 0, "%s", err.msg);
	float x[2 * 64], y[2 * 64], ycopy[2 * 64];
	uint32_t ex[6] = { 0, 5, 2, 5, 1, 7 };
	float w[6] = { 1, 1, 1, 1, 1, 1 };
	for (int i = 0; i < 128; i++)
		x[i] = fr(1.0f), y[i] = 42.0f;
	memcpy(ycopy, y, sizeof(y));

	s.missing[5] = true;
	cr_assert_eq(compute_run(c, 0, 2, x, 64, 3, ex, w, y, 64, lookup, &s, &err), -ENOENT);
	cr_assert(strstr(err.msg, "layer 0 expert 5 is not resident"), "%s", err.msg);
	cr_assert(memcmp(y, ycopy, sizeof(y)) == 0, "y changed on failure");
	s.missing[5] = false;

	ex[4] = E; /* out of range */
	cr_assert_eq(compute_run(c, 0, 2, x, 64, 3, ex, w, y, 64, lookup, &s, &err), -EINVAL);
	cr_assert(strstr(err.msg, "expert 8 of 8"), "%s", err.msg);
	ex[4] = 1;
	cr_assert_eq(compute_run(c, 2, 2, x, 64, 3, ex, w, y, 64, lookup, &s, &err), -EINVAL);
	cr_assert(strstr(err.msg, "layer 2 of 2"), "%s", err.msg);
	cr_assert_eq(compute_run(c, 0, 2, x, 63, 3, ex, w, y, 64, lookup, &s, &err), -EINVAL);
	cr_assert_eq(compute_run(c, 0, 2, x, 64, 3, ex, w, x + 64, 64, lookup, &s, &err), -EINVAL);
	cr_assert(strstr(err.msg, "overlaps"), "%s", err.msg);
	cr_assert_eq(compute_run(c, 0, 0, x, 64, 3, ex, w, y, 64, lookup, &s, &err), 0);

	struct compute_counters ctr;
	compute_get_counters(c, &ctr);
	cr_assert_eq(ctr.missing, 1);
	cr_assert_eq(ctr.failed, 5);
	cr_assert_eq(ctr.requests, 6);
	cr_assert_eq(ctr.tokens, 0);
	compute_destroy(c);

	struct compute_opts bad = { .host_to_gpu_Bps = -1 };
	cr_assert_eq(compute_create(&s.cfg, s.parts, s.n_parts, s.stride, &bad, &c, &err), -EINVAL);
	struct compute_opts bad2 = { .threads = 1000 };
	cr_assert_eq(compute_create(&s.cfg, s.parts, s.n_parts, s.stride, &bad2, &c, &err), -EINVAL);
	cr_assert_eq(compute_create(&s.cfg, s.parts, 2, s.stride, NULL, &c, &err), -EINVAL);
	cr_assert(strstr(err.msg, "down"), "%s", err.msg);
	free_set(&s);
}

Test(compute, counter_names, .timeout = 10)
{
	struct compute_counters v;
	memset(&v, 0, sizeof(v));
	v.pairs = 7;
	cr_assert_str_eq(compute_counter_name(COMPUTE_CTR_pairs), "pairs");
	cr_assert_eq(compute_counter_value(&v, COMPUTE_CTR_pairs), 7);
	for (int i = 0; i < COMPUTE_CTR_COUNT; i++)
		cr_assert(strlen(compute_counter_desc((enum compute_counter)i)) > 5);
	cr_assert_str_eq(compute_counter_name(COMPUTE_CTR_COUNT), "invalid");
}

/* The decision against the formula written out here:
 *   host = max(bytes / host_Bps, T * flops / host_flops)
 *   move = fixed + bytes / h2g + T * flops / gpu_flops
 *   from NVMe both add bytes / nvme. */
Test(compute, cost_model, .timeout = 30)
{
	struct fake_set s;
	struct compute_ctx *c;
	struct moe_error err = { { 0 } };
	make_swiglu(&s, 64, 32);
	struct compute_opts o = { .host_Bps = 20e9, .host_flops = 50e9, .nvme_to_host_Bps = 4e9,
				  .host_to_gpu_Bps = 10e9, .gpu_flops = 1e12, .gpu_fixed_s = 1e-6 };
	cr_assert_eq(compute_create(&s.cfg, s.parts, s.n_parts, s.stride, &o, &c, &err), 0, "%s", err.msg);
	struct compute_model m;
	compute_get_model(c, &m);
	const double bytes = (double)compute_layout(c)->weight_bytes, f = 2.0 * 3 * 64 * 32;
	cr_assert_eq(m.expert_bytes, (uint64_t)bytes);
	cr_assert_eq(m.flops_per_token, (uint64_t)f);
	cr_assert(!m.measured);
	unsigned host = 0, move = 0;
	for (uint32_t T = 1; T <= 4096; T *= 2) {
		struct compute_decision d;
		double eh = fmax(bytes / 20e9, T * f / 50e9), em = 1e-6 + bytes / 10e9 + T * f / 1e12;
		compute_decide(c, COMPUTE_TIER_HOST, T, &d);
		cr_assert_float_eq(d.host_s, eh, 1e-12 + eh * 1e-9);
		cr_assert_float_eq(d.move_s, em, 1e-12 + em * 1e-9);
		cr_assert_eq(d.where, em < eh ? COMPUTE_MOVE_TO_GPU : COMPUTE_ON_HOST, "T=%u", T);
		d.where == COMPUTE_ON_HOST ? host++ : move++;
		compute_decide(c, COMPUTE_TIER_NVME, T, &d);
		cr_assert_float_eq(d.host_s, eh + bytes / 4e9, 1e-12 + eh * 1e-9);
		cr_assert_eq(d.where, em < eh ? COMPUTE_MOVE_TO_GPU : COMPUTE_ON_HOST);
		compute_decide(c, COMPUTE_TIER_GPU, T, &d);
		cr_assert_eq(d.where, COMPUTE_MOVE_TO_GPU);
	}
	/* both answers occur over this range: small batches stay on the host */
	cr_assert(host > 0 && move > 0, "host %u move %u", host, move);
	struct compute_counters ctr;
	compute_get_counters(c, &ctr);
	cr_assert_eq(ctr.decide_host + ctr.decide_move, 13 * 3);
	compute_destroy(c);

	struct compute_opts nogpu = { .host_Bps = 1e9 };
	cr_assert_eq(compute_create(&s.cfg, s.parts, s.n_parts, s.stride, &nogpu, &c, &err), 0);
	struct compute_decision d;
	compute_decide(c, COMPUTE_TIER_HOST, 100000, &d);
	cr_assert_eq(d.where, COMPUTE_ON_HOST);
	cr_assert(isinf(d.move_s));
	compute_destroy(c);
	free_set(&s);
}

Test(compute, calibrate_measures, .timeout = 60)
{
	struct fake_set s;
	struct compute_ctx *c;
	struct moe_error err = { { 0 } };
	make_swiglu(&s, 256, 128);
	struct compute_opts o = { .calibrate = true };
	cr_assert_eq(compute_create(&s.cfg, s.parts, s.n_parts, s.stride, &o, &c, &err), 0, "%s", err.msg);
	struct compute_model m;
	compute_get_model(c, &m);
	cr_assert(m.measured);
	cr_assert(m.host_Bps > 0 && isfinite(m.host_Bps));
	cr_assert(m.host_flops > 0 && isfinite(m.host_flops));
	cr_assert_eq(m.isa, ffn_get_isa());
	compute_destroy(c);
	free_set(&s);
}
