/* ffn_compute_check SOCKET PACK: a client of a moetierd serving PACK (run
 * by tests/test_llama_archs.sh with llama.cpp's gateless llama experts):
 * COMPUTE of every MoE layer (3 tokens, top-2, the pack's experts) equals
 * ffn_expert run here on the pack's own extents, the terms added in
 * order with ffn_axpy, bit for bit. Whatever the pack's FFN kind: the
 * daemon computes it with the same kernels, or refuses COMPUTE (then the
 * capability is absent and this says so). Prints "ok ..." and exits 0, or
 * names the failure and exits 1. */
#include "config.h"

#include "compute_check.h"

static int run_ffn_expert(void *ctx, uint32_t layer, uint32_t expert, const uint8_t *buf, const float *x, float *out)
{
	const struct ffn_layout *L = ctx;
	(void)layer, (void)expert;
	return ffn_expert(L, buf, x, L->n, 1, out, L->n, NULL, 0, 1);
}

int main(int argc, char **argv)
{
	struct moe_error err = { "" };
	struct pack_file *pf;

	if (argc != 3)
		FAIL("usage: ffn_compute_check SOCKET PACK");
	if (pack_open(argv[2], PACK_OPEN_NO_DIRECT, &pf, &err))
		FAIL("%s", err.msg);
	struct moet_model_info mi;
	moet_ctx *c = compute_check_connect(argv[1], "ffn-check", &mi);
	if (!(mi.caps & MOET_CAP_COMPUTE))
		FAIL("COMPUTE not offered for %s (FFN kind %u)", argv[2], pf->model->ffn_kind);

	const uint64_t ext = pack_extent_bytes(pf);
	uint8_t *buf = aligned_alloc(4096, (ext + 4095) & ~4095ull);
	enum { T = 3, K = 2 };
	const uint32_t n = mi.hidden, E = mi.n_experts;
	if (!buf || E < 2 || mi.top_k > E)
		FAIL("%u experts", E);
	uint32_t experts[T * K] = { 0, 1, 1, 0, 1 % E, (E - 1) % E };
	if (experts[4] == experts[5])
		experts[5] = 0;
	float w[T * K] = { 0.75f, 0.25f, 0.5f, 0.5f, 0.9f, 0.1f };
	float *x = calloc((size_t)T * n, 4), *y = calloc((size_t)T * n, 4), *yr = calloc((size_t)T * n, 4);
	float *one = calloc(n, 4);
	if (!x || !y || !yr || !one)
		FAIL("out of memory");
	compute_check_fill_x(x, (size_t)T * n);
	unsigned computed = 0;
	for (uint32_t l = 0; l < mi.n_moe_layers; l++) {
		struct ffn_layout L;
		const struct pack_layout_disk *pl = pack_layer_layout(pf, l);
		if (ffn_layout_init(&L, pf->model, pl->parts, pl->n_parts, ext, &err))
			FAIL("layer %u: %s", l, err.msg);
		compute_check_layer(c, pf, l, T, K, experts, w, x, n, buf, y, yr, one, run_ffn_expert, &L, "ffn_expert");
		computed++;
	}
	printf("ok: COMPUTE of %u layers (FFN kind %u) equals ffn_expert on the pack's extents\n", computed,
	       pf->model->ffn_kind);
	free(x), free(y), free(yr), free(one), free(buf);
	moet_close(c);
	pack_close(pf);
	return 0;
}
