/* molae_serve_check SOCKET LATENT.moepack [DENSE.moepack]: a client of a
 * moetierd serving a MoLAE latent pack (run by tests/test_molae_daemon.sh):
 *  - the model's expert bytes and host slot size are the latent extent's,
 *    and the host arena holds more latent experts than dense ones fit in
 *    the same bytes (when the dense pack is given);
 *  - every expert ACQUIREd has exactly the bytes of the pack's extent;
 *  - COMPUTE (T tokens, top-k) equals the CPU latent kernel run here on the
 *    pack's own extents and B matrices, bit for bit.
 * Prints "ok ..." and exits 0, or names the failure and exits 1.
 * molae_serve_check --corrupt-b IN OUT: copies IN with one byte of the
 * first B_up matrix flipped (its CRC no longer matches). */
#include "config.h"

#include "compute_check.h"
#include "latent.h"

static int corrupt_b(const char *in, const char *out)
{
	struct moe_error err = { "" };
	struct pack_file *pf;
	if (pack_open(in, PACK_OPEN_NO_DIRECT, &pf, &err))
		FAIL("%s", err.msg);
	const struct pack_tensor_entry *t = NULL;
	for (uint64_t i = 0; i < pf->hdr->n_tensors && !t; i++)
		if (pf->tensors[i].role == PACK_ROLE_LATENT_B_UP)
			t = &pf->tensors[i];
	if (!t)
		FAIL("%s has no B_up", in);
	FILE *fi = fopen(in, "rb"), *fo = fopen(out, "wb");
	if (!fi || !fo)
		FAIL("open %s / %s", in, out);
	int ch;
	for (uint64_t off = 0; (ch = fgetc(fi)) != EOF; off++)
		fputc(off == t->offset + 5 ? ch ^ 0x40 : ch, fo);
	fclose(fi);
	if (fclose(fo))
		FAIL("write %s", out);
	pack_close(pf);
	return 0;
}

/* The CPU latent kernel on one extent, with the pack's B matrices. */
struct latent_ref {
	const struct latent_layout *L;
	const struct latent_basis *b;
};

static int run_latent_expert(void *ctx, uint32_t layer, uint32_t expert, const uint8_t *buf, const float *x,
			     float *out)
{
	const struct latent_ref *r = ctx;
	return latent_expert_x(r->L, r->b, layer, expert, buf, x, r->L->n, 1, out, r->L->n, 1);
}

int main(int argc, char **argv)
{
	struct moe_error err = { "" };
	struct pack_file *pf;
	if (argc == 4 && !strcmp(argv[1], "--corrupt-b"))
		return corrupt_b(argv[2], argv[3]);
	if (argc < 3)
		FAIL("usage: molae_serve_check SOCKET LATENT.moepack [DENSE.moepack]");
	if (pack_open(argv[2], PACK_OPEN_NO_DIRECT, &pf, &err))
		FAIL("%s", err.msg);
	struct moet_model_info mi;
	moet_ctx *c = compute_check_connect(argv[1], "molae-check", &mi);
	int rc;
	const uint64_t ext = pack_extent_bytes(pf);
	if (mi.expert_bytes != pf->hdr->extent_payload || mi.slot_bytes[MOET_TIER_HOST] < pf->hdr->extent_payload ||
	    mi.slot_bytes[MOET_TIER_HOST] > ext)
		FAIL("expert bytes %llu / host slot %llu, the latent extent is %llu (%llu padded)",
		     (unsigned long long)mi.expert_bytes, (unsigned long long)mi.slot_bytes[MOET_TIER_HOST],
		     (unsigned long long)pf->hdr->extent_payload, (unsigned long long)ext);
	if (!(mi.caps & MOET_CAP_COMPUTE))
		FAIL("COMPUTE not offered for the latent pack");
	if (argc > 3) {
		struct pack_file *dp;
		if (pack_open(argv[3], PACK_OPEN_NO_DIRECT, &dp, &err))
			FAIL("%s", err.msg);
		const uint64_t arena = mi.slot_bytes[MOET_TIER_HOST] * mi.n_slots[MOET_TIER_HOST];
		const uint64_t dense_fit = arena / pack_extent_bytes(dp);
		printf("host arena %llu bytes: %u latent experts of %llu bytes (dense: %llu of %llu bytes)\n",
		       (unsigned long long)arena, mi.n_slots[MOET_TIER_HOST], (unsigned long long)ext,
		       (unsigned long long)dense_fit, (unsigned long long)pack_extent_bytes(dp));
		if (mi.n_slots[MOET_TIER_HOST] <= dense_fit)
			FAIL("the arena holds %u latent experts, no more than %llu dense ones", mi.n_slots[MOET_TIER_HOST],
			     (unsigned long long)dense_fit);
		pack_close(dp);
	}

	/* ACQUIRE: the bytes of the pack's extents */
	uint8_t *ref = aligned_alloc(4096, ext);
	const uint32_t L = mi.n_moe_layers, E = mi.n_experts;
	unsigned checked = 0;
	for (uint32_t l = 0; l < L; l++)
		for (uint32_t e0 = 0; e0 < E; e0 += 2) {
			uint32_t ids[2] = { e0, (e0 + 1) % E };
			int32_t slots[2];
			uint8_t tiers[2];
			moet_lease lease;
			if ((rc = moet_acquire(c, l, ids, 2, 0, slots, tiers, &lease)) < 0)
				FAIL("acquire layer %u: %s", l, moet_strerror(rc));
			for (int i = 0; i < 2; i++) {
				if (slots[i] < 0)
					continue;
				const uint8_t *p = moet_slot_ptr(c, tiers[i], slots[i]);
				if (!p || pack_read_expert(pf, l, ids[i], ref, &err))
					FAIL("layer %u expert %u: no slot pointer or %s", l, ids[i], err.msg);
				if (memcmp(p, ref, pf->hdr->extent_payload))
					FAIL("layer %u expert %u: acquired bytes differ from the pack's extent", l, ids[i]);
				checked++;
			}
			moet_release(c, lease);
		}
	if (!checked)
		FAIL("no expert was served");

	/* COMPUTE against the CPU latent kernel */
	struct latent_basis *b;
	struct latent_layout LL;
	if (latent_basis_load(pf, &b, &err) ||
	    latent_layout_init(&LL, pf->model, pf->hdr->parts, pf->hdr->n_parts, ext, &err))
		FAIL("%s", err.msg);
	enum { T = 3, K = 2 };
	const uint32_t n = mi.hidden;
	uint32_t experts[T * K] = { 0, 1 % E, 2 % E, 5 % E, 1 % E, (E - 1) % E };
	float w[T * K] = { 0.75f, 0.25f, 0.5f, 0.5f, 0.9f, 0.1f };
	float *x = calloc((size_t)T * n, 4), *y = calloc((size_t)T * n, 4), *yr = calloc((size_t)T * n, 4);
	float *one = calloc(n, 4);
	compute_check_fill_x(x, (size_t)T * n);
	struct latent_ref lr = { &LL, b };
	unsigned computed = 0;
	for (uint32_t l = 0; l < L; l++) {
		compute_check_layer(c, pf, l, T, K, experts, w, x, n, ref, y, yr, one, run_latent_expert, &lr,
				    "the latent kernel");
		computed++;
	}
	printf("ok: %u experts acquired with the pack's bytes, COMPUTE of %u layers equals the latent kernel\n",
	       checked, computed);
	latent_basis_free(b);
	free(x), free(y), free(yr), free(one), free(ref);
	moet_close(c);
	pack_close(pf);
	return 0;
}
