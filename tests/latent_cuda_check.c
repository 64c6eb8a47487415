/* latent_cuda_check.c - runs the embedded CUDA latent experts
 * (kernels/latent.cu through latent_cuda_run, the host launcher) on random
 * latent experts, two latent groups sharing B, shuffled arena slots and top-2
 * routing, and compares y with the CPU latent kernel (latent_expert_x,
 * weighted and summed per token), for f32, f16, bf16, q8_0 and q4_0 weights.
 *
 * The driver, the skip rule (exit 77) and the tolerance: tests/cuda_probe.h
 * (the CPU runs in FFN_Q8_EXACT mode, z in f32). Exit 0 on success, 1 on a
 * mismatch or CUDA error. */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "ffn.h"
#include "latent.h"
#include "latent_cuda.h"
#include "model.h"
#include "pack.h"

#define CUDA_PROBE_NAME "latent_cuda_check"
#include "cuda_probe.h"

static CUmodule g_mod;

/* latent_cuda_run's launcher: the kernel by name, its one by-value argument */
static int launch(void *ctx, const char *kernel, const uint32_t grid[3], uint32_t block,
		  const struct latent_cuda_args *args)
{
	(void)ctx;
	CUfunction f;
	CUresult rc = cu.ModuleGetFunction(&f, g_mod, kernel);
	if (rc != CUDA_SUCCESS)
		return -(int)rc;
	void *params[] = { (void *)args };
	rc = cu.LaunchKernel(f, grid[0], grid[1], grid[2], block, 1, 1, 0, NULL, params, NULL);
	return rc == CUDA_SUCCESS ? 0 : -(int)rc;
}

static int run_case(enum moe_dtype wt, uint32_t n, uint32_t m, uint32_t r)
{
	enum { E = 6, T = 37, K = 2, GS = 3 };
	struct moe_model_config cfg;
	struct pack_part_desc parts[3];
	uint64_t off = 0, rb;
	struct moe_error err = { { 0 } };
	memset(&cfg, 0, sizeof(cfg));
	moe_model_set_family_defaults(&cfg, MOE_FAMILY_QWEN2_MOE);
	cfg.hidden = n;
	cfg.expert_width = m;
	cfg.n_experts = E;
	cfg.n_moe_layers = cfg.n_layers = 1;
	const uint32_t rows[3] = { m, m, n }, cols[3] = { r, r, m };
	const uint32_t roles[3] = { PACK_ROLE_LATENT_A_GATE, PACK_ROLE_LATENT_A_UP, PACK_ROLE_DOWN };
	for (int p = 0; p < 3; p++) {
		moe_dtype_row_bytes(wt, cols[p], &rb);
		parts[p] = (struct pack_part_desc){ roles[p], wt, rows[p], cols[p], off, rb * rows[p] };
		off += (rb * rows[p] + 255) & ~255ull; /* parts at unaligned-to-type offsets are fine too */
	}
	const uint64_t stride = off;
	struct latent_layout L;
	struct latent_basis *b;
	if (latent_layout_init(&L, &cfg, parts, 3, stride, &err) || latent_cuda_layout_check(&L, &err)) {
		fprintf(stderr, "latent_cuda_check: %s\n", err.msg);
		return 1;
	}
	if (latent_basis_alloc(n, r, 1, E, GS, &b))
		return 1;
	for (size_t i = 0; i < (size_t)b->max_groups * 2 * r * n; i++)
		b->b[i] = cuda_probe_frand(1.0f) / sqrtf((float)n);
	const uint32_t slots = E + 2, slot_of[E] = { 3, 0, 6, 2, 5, 7 };
	uint8_t *arena = calloc(slots, stride);
	float *tmp = malloc(sizeof(float) * (n > m ? n : m));
	for (uint32_t e = 0; e < E; e++)
		for (int p = 0; p < 3; p++)
			for (uint32_t i = 0; i < parts[p].rows; i++) {
				for (uint32_t c = 0; c < parts[p].cols; c++)
					tmp[c] = cuda_probe_frand(0.5f);
				moe_dtype_row_bytes(wt, parts[p].cols, &rb);
				cuda_probe_encode(wt, tmp, arena + slot_of[e] * stride + parts[p].offset + i * rb, parts[p].cols);
			}
	float *x = malloc(sizeof(float) * T * n), *y_cpu = calloc((size_t)T * n, sizeof(float));
	float *y_gpu = calloc((size_t)T * n, sizeof(float)), *one = malloc(sizeof(float) * n);
	uint32_t sel[T][K];
	float wsel[T][K];
	for (size_t i = 0; i < (size_t)T * n; i++)
		x[i] = cuda_probe_frand(1.0f);
	for (uint32_t t = 0; t < T; t++) {
		sel[t][0] = t % E;
		sel[t][1] = (t * 5 + 1) % E;
		wsel[t][0] = 0.25f + 0.5f * (float)(t % 3) / 3.0f;
		wsel[t][1] = 1.0f - wsel[t][0];
		for (uint32_t j = 0; j < K; j++) {
			if (latent_expert_x(&L, b, 0, sel[t][j], arena + slot_of[sel[t][j]] * stride, x + (size_t)t * n, n, 1,
					    one, n, 1))
				return 1;
			ffn_axpy(y_cpu + (size_t)t * n, wsel[t][j], one, n);
		}
	}
	/* z rows: one per (token, latent group) touched; pairs grouped by expert */
	uint32_t zrow_tok[T * K], zrow_grp[T * K], nz = 0, zidx[2][T];
	memset(zidx, 0xff, sizeof(zidx));
	for (uint32_t t = 0; t < T; t++)
		for (uint32_t j = 0; j < K; j++) {
			const uint32_t g = (uint32_t)latent_basis_group(b, 0, sel[t][j]);
			if (zidx[g][t] == UINT32_MAX) {
				zidx[g][t] = nz;
				zrow_tok[nz] = t;
				zrow_grp[nz++] = g;
			}
		}
	uint32_t gslot[E], gstart[E + 1], ptok[T * K], pz[T * K], ng = 0, np = 0, maxp = 0;
	float pw[T * K];
	for (uint32_t e = 0; e < E; e++) {
		const uint32_t s = np;
		for (uint32_t t = 0; t < T; t++)
			for (uint32_t j = 0; j < K; j++)
				if (sel[t][j] == e) {
					ptok[np] = t;
					pz[np] = zidx[latent_basis_group(b, 0, e)][t];
					pw[np++] = wsel[t][j];
				}
		if (np > s) {
			gslot[ng] = slot_of[e];
			gstart[ng++] = s;
			maxp = np - s > maxp ? np - s : maxp;
		}
	}
	gstart[ng] = np;
	const size_t bbytes = sizeof(float) * b->max_groups * 2 * r * n;
	const CUdeviceptr d_arena = cuda_probe_upload(arena, slots * stride);
	const CUdeviceptr d_basis = cuda_probe_upload(b->b, bbytes);
	const CUdeviceptr d_gslot = cuda_probe_upload(gslot, sizeof(gslot));
	const CUdeviceptr d_gstart = cuda_probe_upload(gstart, sizeof(gstart));
	const CUdeviceptr d_ptok = cuda_probe_upload(ptok, sizeof(ptok));
	const CUdeviceptr d_pw = cuda_probe_upload(pw, sizeof(pw));
	const CUdeviceptr d_pz = cuda_probe_upload(pz, sizeof(pz));
	const CUdeviceptr d_zt = cuda_probe_upload(zrow_tok, sizeof(zrow_tok));
	const CUdeviceptr d_zg = cuda_probe_upload(zrow_grp, sizeof(zrow_grp));
	const CUdeviceptr d_x = cuda_probe_upload(x, sizeof(float) * T * n);
	const CUdeviceptr d_z = cuda_probe_upload(NULL, sizeof(float) * nz * 2 * r);
	const CUdeviceptr d_h = cuda_probe_upload(NULL, sizeof(float) * np * m);
	const CUdeviceptr d_y = cuda_probe_upload(y_gpu, sizeof(float) * T * n); /* zeros */
	struct latent_cuda_args a;
	memset(&a, 0, sizeof(a));
	a.arena = d_arena;
	a.slot_stride = stride;
	a.basis = d_basis;
	a.n_groups = ng;
	a.max_group_pairs = maxp;
	a.n_tokens = T;
	a.n_zrows = nz;
	a.group_slot = d_gslot;
	a.group_start = d_gstart;
	a.pair_token = d_ptok;
	a.pair_weight = d_pw;
	a.pair_zrow = d_pz;
	a.zrow_token = d_zt;
	a.zrow_group = d_zg;
	a.x = d_x;
	a.z = d_z;
	a.h = d_h;
	a.y = d_y;
	if (latent_cuda_run(&L, &a, launch, NULL, &err)) {
		fprintf(stderr, "latent_cuda_check: %s\n", err.msg);
		return 1;
	}
	CK(cu.CtxSynchronize());
	CK(cu.MemcpyDtoH(y_gpu, d_y, sizeof(float) * T * n));
	char what[96];
	double worst;
	snprintf(what, sizeof(what), "%s n=%u m=%u r=%u", moe_dtype_name(wt), n, m, r);
	const int bad = cuda_probe_compare(y_gpu, y_cpu, T, n, what, &worst);
	printf("latent_cuda_check: %-5s n=%u m=%u r=%u T=%u k=%u, %u z rows: %s (max rel diff %.2e)\n",
	       moe_dtype_name(wt), n, m, r, T, K, nz, bad ? "FAIL" : "ok", worst);
	CUdeviceptr all[] = { d_arena, d_basis, d_gslot, d_gstart, d_ptok, d_pw, d_pz, d_zt, d_zg, d_x, d_z, d_h, d_y };
	for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
		CK(cu.MemFree(all[i]));
	latent_basis_free(b);
	free(arena), free(tmp), free(x), free(y_cpu), free(y_gpu), free(one);
	return bad;
}

int main(void)
{
	ffn_set_q8_mode(FFN_Q8_EXACT);
	size_t len = 0;
	CUdevice dev;
	int rc = cuda_probe_open(latent_cuda_fatbin(&len), &dev, &g_mod);
	if (rc)
		return rc;
	const enum moe_dtype types[] = { MOE_DTYPE_F32, MOE_DTYPE_F16, MOE_DTYPE_BF16, MOE_DTYPE_Q8_0, MOE_DTYPE_Q4_0 };
	int bad = 0;
	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
		bad |= run_case(types[i], 96, 64, 32);
		bad |= run_case(types[i], 160, 96, 64); /* partial tiles in every dimension */
	}
	bad |= run_case(MOE_DTYPE_BF16, 2048, 1024, 1024); /* the OLMoE shape at r = m */
	cuda_probe_close(dev, g_mod);
	return bad ? 1 : 0;
}
