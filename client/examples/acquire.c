/* A complete libmoetier client: attach, look up the model, acquire the
 * experts a router chose for one layer, read them through the mapped arena,
 * release. Build: cc acquire.c $(pkg-config --cflags --libs libmoetier) */
#include <stdio.h>
#include <moetier/moetier.h>

int main(void)
{
	moet_ctx *ctx;
	struct moet_connect_opts opts = { .size = sizeof(opts), .client_name = "example" };
	int rc = moet_connect(&opts, &ctx);
	if (rc == MOET_E_UNAVAILABLE) {
		fprintf(stderr, "no moetierd: using the engine's own weights\n");
		return 0;
	}
	if (rc) {
		fprintf(stderr, "moetierd: %s (%s)\n", moet_strerror(rc), moet_last_error(NULL));
		return 1;
	}
	struct moet_model_info mi = { .size = sizeof(mi) };
	moet_model_info(ctx, &mi);
	printf("%s: %u MoE layers x %u experts, top-%u\n", mi.name, mi.n_moe_layers, mi.n_experts, mi.top_k);

	uint32_t ids[2] = { 0, 1 % mi.n_experts };
	int32_t slots[2];
	uint8_t tiers[2];
	moet_lease lease;
	/* NOWAIT: misses come back as -1 at once and their loads start. */
	rc = moet_acquire(ctx, 0, ids, 2, MOET_F_NOWAIT, slots, tiers, &lease);
	if (rc < 0) {
		fprintf(stderr, "acquire: %s\n", moet_strerror(rc));
		moet_close(ctx);
		return 1;
	}
	for (int i = 0; i < 2; i++) {
		if (slots[i] < 0) {
			printf("expert %u: miss (compute it elsewhere, or wait)\n", ids[i]);
			continue;
		}
		const unsigned char *w = moet_slot_ptr(ctx, tiers[i], slots[i]);
		printf("expert %u: tier %u slot %d, first byte %02x\n", ids[i], tiers[i], slots[i], w ? w[0] : 0);
	}
	moet_release(ctx, lease);
	moet_close(ctx);
	return 0;
}
