/* test_route_daemon.c - ROUTE through a real moetierd (the built binary,
 * started per test on a tiny generated model of each family):
 *   - plain ROUTE is right for every family: the daemon's experts and
 *     weights equal route.c's and an independent reference written here
 *     (softmax top-k with and without renormalisation, DeepSeek-V2
 *     group-limited greedy, DeepSeek-V3 sigmoid + bias + groups + scaling,
 *     GPT-OSS top-k then softmax);
 *   - cache-aware ROUTE (MOET_F_ROUTE_CACHE, moet_route_opts): a resident
 *     expert within the margin replaces a non-resident one, the router's
 *     top-J are never replaced, the reply's mask and exact routing are right,
 *     random decisions equal route_cached over the residency of that moment,
 *     and malformed requests get -EINVAL with a message naming the problem;
 *   - the similarity rule with the table `moe-pack similarity` stores. */
#include "config.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "moetier/moetier.h"
#include "pack.h"
#include "route.h"
#include "route_ref.h"
/* testutil.h's tu__rm builds "%s/%s" paths into 4 KiB: GCC's truncation
 * analysis flags it under -Werror; the paths here are short. */
#pragma GCC diagnostic ignored "-Wformat-truncation"
#include "daemon_probe.h"
#include "testutil.h"

struct env {
	char *dir;
	char pack[512];
	char sock[512];
	char log[512];
	pid_t pid;
};

/* The test's daemon and directory, cleaned up by fini when an assertion
 * ended the test before its teardown. */
static pid_t daemon_pid;
static char *test_dir;

static void kill_daemon(void)
{
	if (daemon_pid > 0) {
		kill(daemon_pid, SIGKILL);
		waitpid(daemon_pid, NULL, 0);
		daemon_pid = 0;
	}
	if (test_dir) {
		tu_rmtree(test_dir);
		test_dir = NULL;
	}
}

static void make_model_of(struct env *e, const char *gen_args)
{
	e->dir = test_dir = tu_mkdtemp("route");
	cr_assert_eq(chmod(e->dir, 0755), 0);
	snprintf(e->pack, sizeof(e->pack), "%s/tiny.moepack", e->dir);
	snprintf(e->sock, sizeof(e->sock), "%s/run/moetierd.sock", e->dir);
	snprintf(e->log, sizeof(e->log), "%s/moetierd.log", e->dir);
	char run[600];
	snprintf(run, sizeof(run), "%s/run", e->dir);
	cr_assert_eq(mkdir(run, 0755), 0);
	char gen[4096], packer[4096];
	snprintf(gen, sizeof(gen), "%s", tu_build_path("tools/moe-gen"));
	snprintf(packer, sizeof(packer), "%s", tu_build_path("tools/moe-pack"));
	cr_assert_eq(tu_sh("%s model %s --out %s/src >/dev/null", gen, gen_args, e->dir), 0, "moe-gen %s", gen_args);
	cr_assert_eq(tu_sh("%s convert %s/src -o %s -q >/dev/null", packer, e->dir, e->pack), 0);
}

static void start_daemon(struct env *e, const char *host_bytes)
{
	pid_t p = fork();
	cr_assert(p >= 0);
	if (p == 0) {
		char hb[64], so[600];
		snprintf(hb, sizeof(hb), "--host-bytes=%s", host_bytes);
		snprintf(so, sizeof(so), "--socket=%s", e->sock);
		int fd = open(e->log, O_WRONLY | O_CREAT | O_APPEND, 0644);
		if (fd >= 0) {
			/* stdout too: a daemon left behind by a failed test must not
			 * hold the runner's output pipe open */
			dup2(fd, 1);
			dup2(fd, 2);
			close(fd);
		}
		char *argv[] = { "moetierd", "--foreground", "--config=", so, hb, "--socket-group=",
				 "--log-level=debug", e->pack, NULL };
		execv(tu_build_path("moetierd"), argv);
		_exit(127);
	}
	e->pid = daemon_pid = p;
	probe_wait_up(p, e->sock, e->log);
}

static void teardown(struct env *e)
{
	if (e->pid > 0) {
		int st = probe_stop(e->pid);
		e->pid = daemon_pid = 0;
		cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "moetierd exit status %#x", st);
	}
	tu_rmtree(e->dir);
	e->dir = test_dir = NULL;
}

static moet_ctx *attach(struct env *e, const char *name)
{
	moet_ctx *c = NULL;
	struct moet_connect_opts o = { sizeof(o), e->sock, NULL, name, MOET_CAP_RING | MOET_CAP_ROUTE, 0, 20 };
	int rc = moet_connect(&o, &c);
	cr_assert_eq(rc, 0, "connect: %s (%s)", moet_strerror(rc), moet_last_error(NULL));
	return c;
}

/* Routes `trials` random logit vectors per layer through the daemon and
 * checks them against route.c and the reference. The model must be what
 * the family promises (scoring, top-k method, renormalisation), so a
 * generator change cannot turn the test into another family's. */
static void check_family(const char *gen_args, enum moe_scoring scoring, enum moe_topk_method method, int norm,
			 float scaling, bool has_bias)
{
	struct env e;
	make_model_of(&e, gen_args);
	start_daemon(&e, "1M");
	moet_ctx *c = attach(&e, "route-family");
	struct moet_model_info mi = { .size = sizeof(mi) };
	cr_assert_eq(moet_model_info(c, &mi), 0);
	cr_assert_geq(mi.protocol, 2u);
	struct pack_file *pf;
	struct moe_error err;
	cr_assert_eq(pack_open(e.pack, PACK_OPEN_NO_DIRECT, &pf, &err), 0, "%s", err.msg);
	const struct moe_model_config *mc = pf->model;
	cr_assert_eq(mc->scoring, (uint32_t)scoring, "%s: scoring %u", gen_args, mc->scoring);
	cr_assert_eq(mc->topk_method, (uint32_t)method, "%s: top-k method %u", gen_args, mc->topk_method);
	cr_assert_eq(mc->norm_topk_prob, (uint32_t)norm, "%s: norm_topk_prob %u", gen_args, mc->norm_topk_prob);
	cr_assert_float_eq(mc->routed_scaling_factor, scaling, 1e-6f);
	cr_assert_eq(mc->has_score_bias != 0, has_bias);
	cr_assert_leq(mc->n_experts, 256u);
	unsigned seed = 11, checked = 0;
	for (uint32_t l = 0; l < mi.n_moe_layers; l++) {
		float bias[256], logits[256];
		const float *bp = NULL;
		if (has_bias) {
			const struct pack_tensor_entry *t =
				pack_find_role(pf, PACK_ROLE_SCORE_BIAS, moe_model_layer_of(mc, l));
			cr_assert_not_null(t);
			cr_assert_eq(pack_read_tensor(pf, t, bias, &err), 0, "%s", err.msg);
			bp = bias;
		}
		struct route_params rp;
		route_params_from_model(&rp, mc, bp);
		/* the reference's parameters, straight from the pack's config */
		const struct route_params ref = { .n_experts = mc->n_experts,
						  .top_k = mc->top_k,
						  .scoring = mc->scoring,
						  .topk_method = mc->topk_method,
						  .n_group = mc->n_group,
						  .topk_group = mc->topk_group,
						  .norm_topk_prob = mc->norm_topk_prob != 0,
						  .routed_scaling_factor = mc->routed_scaling_factor,
						  .score_bias = bp };
		for (int t = 0; t < 25; t++) {
			for (uint32_t i = 0; i < mi.n_experts; i++)
				logits[i] = t == 0 ? 0.0f : (float)((int)(rand_r(&seed) % 2001) - 1000) / 300.0f;
			struct route_result want;
			uint32_t rex[ROUTE_MAX_K];
			double rw[ROUTE_MAX_K];
			cr_assert_eq(route_topk(&rp, logits, &want), 0);
			ref_route(&ref, logits, rex, rw);
			uint32_t ex[MOET_MAX_BATCH];
			float w[MOET_MAX_BATCH];
			int32_t slots[MOET_MAX_BATCH];
			moet_lease lease = 0;
			int k = moet_route(c, l, logits, mi.n_experts, 0, ex, w, slots, NULL, &lease);
			cr_assert_eq(k, (int)mc->top_k, "layer %u: %d (%s)", l, k, moet_last_error(c));
			for (int i = 0; i < k; i++) {
				cr_assert_eq(ex[i], want.experts[i], "%s layer %u trial %d slot %d: daemon %u, route.c %u",
					     gen_args, l, t, i, ex[i], want.experts[i]);
				cr_assert_eq(ex[i], rex[i], "%s layer %u trial %d slot %d: daemon %u, reference %u",
					     gen_args, l, t, i, ex[i], rex[i]);
				cr_assert_float_eq(w[i], want.weights[i], 1e-6f);
				cr_assert(fabs(w[i] - rw[i]) < 1e-5 * fmax(1.0, fabs(rw[i])), "slot %d weight %g, reference %g",
					  i, (double)w[i], rw[i]);
			}
			checked++;
			cr_assert_eq(moet_release(c, lease), 0);
		}
	}
	cr_assert_gt(checked, 0);
	pack_close(pf);
	moet_close(c);
	teardown(&e);
}

Test(route_daemon, mixtral_softmax_renormalised, .timeout = 120, .fini = kill_daemon)
{
	check_family("--family mixtral --preset tiny --experts 16 --top-k 4", MOE_SCORING_SOFTMAX, MOE_TOPK_GREEDY, 1,
		     1.0f, false);
}

/* top-1 renormalised: ROUTE's weight is 1 (llama.cpp's norm_w), not p */
Test(route_daemon, mixtral_top1_renormalised_weight_one, .timeout = 120, .fini = kill_daemon)
{
	check_family("--family mixtral --preset tiny --experts 16 --top-k 1", MOE_SCORING_SOFTMAX, MOE_TOPK_GREEDY, 1,
		     1.0f, false);
}

Test(route_daemon, qwen2_softmax_not_renormalised, .timeout = 120, .fini = kill_daemon)
{
	check_family("--family qwen2_moe --preset tiny --experts 16 --top-k 4", MOE_SCORING_SOFTMAX, MOE_TOPK_GREEDY,
		     0, 1.0f, false);
}

Test(route_daemon, deepseek_v2_group_limited_greedy, .timeout = 120, .fini = kill_daemon)
{
	check_family("--family deepseek_v2 --preset tiny --experts 16 --top-k 4 --n-group 4 --topk-group 2",
		     MOE_SCORING_SOFTMAX, MOE_TOPK_GROUP_LIMITED, 0, 1.0f, false);
}

Test(route_daemon, deepseek_v3_sigmoid_bias_groups_scaling, .timeout = 120, .fini = kill_daemon)
{
	check_family("--family deepseek_v3 --preset tiny --experts 16 --top-k 4 --n-group 4 --topk-group 2",
		     MOE_SCORING_SIGMOID, MOE_TOPK_GROUP_LIMITED, 1, 2.5f, true);
}

Test(route_daemon, gpt_oss_topk_then_softmax, .timeout = 120, .fini = kill_daemon)
{
	check_family("--family gpt_oss --preset tiny --experts 16 --top-k 4", MOE_SCORING_TOPK_SOFTMAX,
		     MOE_TOPK_GREEDY, 0, 1.0f, false);
}

/* ---- cache-aware ROUTE ---- */

/* Makes exactly the experts in `want` (n_experts bytes) host-resident in
 * layer l: evicts the others (admin), loads these, checks the bitmap. */
static void set_residency(moet_ctx *c, uint32_t l, const uint8_t *want, uint32_t n)
{
	uint32_t ids[MOET_MAX_BATCH], m = 0;
	for (uint32_t e = 0; e < n; e++) {
		if (want[e]) {
			ids[m++] = e;
			continue;
		}
		int rc = -EBUSY;
		for (int i = 0; i < 100 && rc == -EBUSY; i++) {
			rc = moet_evict(c, l, e, MOET_TIER_HOST);
			if (rc == -EBUSY)
				probe_sleep_ms(10);
		}
		cr_assert(rc == 0 || rc == -ENOENT, "evict %u/%u: %s", l, e, moet_strerror(rc));
	}
	if (m) {
		int32_t slots[MOET_MAX_BATCH];
		moet_lease lease = 0;
		cr_assert_eq(moet_acquire(c, l, ids, m, 0, slots, NULL, &lease), (int)m);
		cr_assert_eq(moet_release(c, lease), 0);
	}
	uint8_t got[256];
	cr_assert_eq(moet_resident(c, l, MOET_TIER_HOST, got, sizeof(got)), (int)m);
	for (uint32_t e = 0; e < n; e++)
		cr_assert_eq(got[e] != 0, want[e] != 0, "expert %u residency", e);
}

static double softmax_p(const float *lg, uint32_t n, uint32_t e)
{
	double mx = -1e30, s = 0;
	for (uint32_t i = 0; i < n; i++)
		mx = fmax(mx, lg[i]);
	for (uint32_t i = 0; i < n; i++)
		s += exp(lg[i] - mx);
	return exp(lg[e] - mx) / s;
}

Test(route_daemon, cache_aware_margin_and_top_j, .timeout = 120, .fini = kill_daemon)
{
	struct env e;
	make_model_of(&e, "--family qwen2_moe --preset tiny --experts 16 --top-k 4 --layers 4");
	start_daemon(&e, "4M");
	moet_ctx *c = attach(&e, "route-cache");
	struct moet_model_info mi = { .size = sizeof(mi) };
	cr_assert_eq(moet_model_info(c, &mi), 0);
	cr_assert_eq(mi.n_experts, 16u);
	cr_assert_eq(mi.top_k, 4u);
	float lg[16];
	for (int i = 0; i < 16; i++)
		lg[i] = -3.0f;
	lg[0] = 4, lg[1] = 3, lg[2] = 2, lg[3] = 1.5f, lg[4] = 1.4f, lg[5] = 1.0f, lg[6] = 0.5f;
	uint32_t ex[MOET_MAX_BATCH];
	float w[MOET_MAX_BATCH];
	int32_t slots[MOET_MAX_BATCH];
	uint8_t tiers[MOET_MAX_BATCH];
	moet_lease lease;

	/* 1. Expert 4 resident, 3 not: slot 3 (logit 1.5) takes 4 (1.4), within 0.2. */
	uint8_t res[16] = { 0 };
	res[0] = res[4] = 1;
	set_residency(c, 0, res, 16);
	struct moet_route_args a = { .size = sizeof(a), .rule = MOET_ROUTE_MARGIN, .keep_top = 2, .margin = 0.2f };
	int k = moet_route_opts(c, 0, lg, 16, 0, &a, ex, w, slots, tiers, &lease);
	cr_assert_eq(k, 4, "%d: %s", k, moet_last_error(c));
	uint32_t want1[4] = { 0, 1, 2, 4 };
	for (int i = 0; i < 4; i++) {
		cr_assert_eq(ex[i], want1[i], "slot %d: %u", i, ex[i]);
		/* qwen2_moe: softmax probabilities, not renormalised (FAMILY weights) */
		cr_assert(fabs(w[i] - softmax_p(lg, 16, want1[i])) < 1e-6, "slot %d weight %g", i, (double)w[i]);
		cr_assert_eq(a.exact[i], (uint32_t)i);
		cr_assert(fabs(a.exact_weights[i] - softmax_p(lg, 16, (uint32_t)i)) < 1e-6);
		cr_assert_geq(slots[i], 0, "the final set is acquired");
	}
	cr_assert_eq(a.subst_mask, 0x8u);
	cr_assert_eq(a.open_mask, 0xcu, "slots 2 and 3 are after J=2 and not resident");
	cr_assert_eq(a.n_resident, 2u);
	cr_assert_eq(moet_release(c, lease), 0);

	/* 2. The top-J are never replaced, even when not resident and a resident
	 * expert is within the margin; later slots take the best resident. */
	memset(res, 0, sizeof(res));
	res[4] = res[5] = res[6] = 1;
	set_residency(c, 1, res, 16);
	a = (struct moet_route_args){ .size = sizeof(a), .rule = MOET_ROUTE_MARGIN, .keep_top = 2, .margin = INFINITY };
	k = moet_route_opts(c, 1, lg, 16, 0, &a, ex, w, slots, tiers, &lease);
	cr_assert_eq(k, 4, "%s", moet_last_error(c));
	cr_assert_eq(ex[0], 0u);
	cr_assert_eq(ex[1], 1u);
	cr_assert_eq(ex[2], 4u);
	cr_assert_eq(ex[3], 5u);
	cr_assert_eq(a.subst_mask, 0xcu);
	cr_assert_eq(moet_release(c, lease), 0);

	/* 3. Nothing within a 0.05 margin: exact routing, the slots stay open. */
	memset(res, 0, sizeof(res));
	res[0] = res[4] = 1;
	set_residency(c, 2, res, 16);
	a = (struct moet_route_args){ .size = sizeof(a), .rule = MOET_ROUTE_MARGIN, .keep_top = 1, .margin = 0.05f };
	k = moet_route_opts(c, 2, lg, 16, 0, &a, ex, w, slots, tiers, &lease);
	cr_assert_eq(k, 4);
	for (int i = 0; i < 4; i++)
		cr_assert_eq(ex[i], (uint32_t)i);
	cr_assert_eq(a.subst_mask, 0u);
	cr_assert_eq(a.open_mask, 0xeu);
	cr_assert_eq(moet_release(c, lease), 0);

	/* 4. Low-weight rule: slot 3's share (about 0.05 of the exact set) is
	 * under 0.06, slot 2's (0.085) is not; weights renormalised to the exact
	 * set's sum. */
	memset(res, 0, sizeof(res));
	res[4] = res[5] = 1;
	set_residency(c, 3, res, 16);
	a = (struct moet_route_args){ .size = sizeof(a), .rule = MOET_ROUTE_LOW_WEIGHT, .keep_top = 1,
				      .margin = INFINITY, .max_share = 0.06f };
	k = moet_route_opts(c, 3, lg, 16, 0, &a, ex, w, slots, tiers, &lease);
	cr_assert_eq(k, 4, "%s", moet_last_error(c));
	uint32_t want4[4] = { 0, 1, 2, 4 };
	double exact_sum = 0, fin_sum = 0;
	for (int i = 0; i < 4; i++) {
		exact_sum += softmax_p(lg, 16, (uint32_t)i);
		fin_sum += softmax_p(lg, 16, want4[i]);
	}
	for (int i = 0; i < 4; i++) {
		cr_assert_eq(ex[i], want4[i], "slot %d: %u", i, ex[i]);
		cr_assert(fabs(w[i] - softmax_p(lg, 16, want4[i]) * exact_sum / fin_sum) < 1e-6);
	}
	cr_assert_eq(a.subst_mask, 0x8u);
	cr_assert_eq(moet_release(c, lease), 0);

	/* 5. Plain ROUTE is unchanged by all this: exact. */
	k = moet_route(c, 0, lg, 16, 0, ex, w, slots, tiers, &lease);
	cr_assert_eq(k, 4);
	for (int i = 0; i < 4; i++)
		cr_assert_eq(ex[i], (uint32_t)i);
	cr_assert_eq(moet_release(c, lease), 0);
	moet_close(c);
	teardown(&e);
}

Test(route_daemon, cache_aware_malformed, .timeout = 120, .fini = kill_daemon)
{
	struct env e;
	make_model_of(&e, "--family mixtral --preset tiny --experts 8 --top-k 2");
	start_daemon(&e, "1M");
	moet_ctx *c = attach(&e, "route-bad");
	float lg[8] = { 1, 2, 3, 4, 5, 6, 7, 8 };
	uint32_t ex[MOET_MAX_BATCH];
	moet_lease lease = 0;
	struct moet_route_args a = { .size = sizeof(a), .rule = MOET_ROUTE_MARGIN, .keep_top = 3, .margin = 0.5f };

	cr_assert_eq(moet_route_opts(c, 0, lg, 8, 0, &a, ex, NULL, NULL, NULL, &lease), -EINVAL);
	cr_assert(strstr(moet_last_error(c), "keep-top J=3 must be 1..k (k=2)"), "%s", moet_last_error(c));
	cr_assert_eq(lease, 0u);
	a.keep_top = 0;
	cr_assert_eq(moet_route_opts(c, 0, lg, 8, 0, &a, ex, NULL, NULL, NULL, &lease), -EINVAL);
	cr_assert(strstr(moet_last_error(c), "keep-top J=0"), "%s", moet_last_error(c));
	a.keep_top = 1;
	a.margin = -0.5f;
	cr_assert_eq(moet_route_opts(c, 0, lg, 8, 0, &a, ex, NULL, NULL, NULL, &lease), -EINVAL);
	cr_assert(strstr(moet_last_error(c), "margin -0.5 must be >= 0"), "%s", moet_last_error(c));
	a.margin = NAN;
	cr_assert_eq(moet_route_opts(c, 0, lg, 8, 0, &a, ex, NULL, NULL, NULL, &lease), -EINVAL);
	a.margin = 0.5f;
	lg[6] = NAN;
	cr_assert_eq(moet_route_opts(c, 0, lg, 8, 0, &a, ex, NULL, NULL, NULL, &lease), -EINVAL);
	cr_assert(strstr(moet_last_error(c), "logit 6 is NaN"), "%s", moet_last_error(c));
	lg[6] = 7;
	a.rule = 9;
	cr_assert_eq(moet_route_opts(c, 0, lg, 8, 0, &a, ex, NULL, NULL, NULL, &lease), -EINVAL);
	cr_assert(strstr(moet_last_error(c), "unknown rule 9"), "%s", moet_last_error(c));
	a.rule = MOET_ROUTE_SIMILARITY; /* this pack has no similarity table */
	cr_assert_eq(moet_route_opts(c, 0, lg, 8, 0, &a, ex, NULL, NULL, NULL, &lease), -EOPNOTSUPP);
	cr_assert(strstr(moet_last_error(c), "no expert-similarity table"), "%s", moet_last_error(c));
	a.rule = MOET_ROUTE_MARGIN;
	a.tiers = 4;
	cr_assert_eq(moet_route_opts(c, 0, lg, 8, 0, &a, ex, NULL, NULL, NULL, &lease), -EINVAL);
	a.tiers = 0;
	/* the wrong number of logits */
	cr_assert_eq(moet_route_opts(c, 0, lg, 7, 0, &a, ex, NULL, NULL, NULL, &lease), -EFAULT);
	/* plain moet_route refuses the cache flag (it has no request to send) */
	cr_assert_eq(moet_route(c, 0, lg, 8, MOET_F_ROUTE_CACHE, ex, NULL, NULL, NULL, &lease), -EINVAL);
	/* and after all that, a good request works on the same ring */
	int k = moet_route_opts(c, 0, lg, 8, 0, &a, ex, NULL, NULL, NULL, &lease);
	cr_assert_eq(k, 2, "%s", moet_last_error(c));
	cr_assert_eq(ex[0], 7u);
	cr_assert_eq(ex[1], 6u);
	cr_assert_eq(moet_release(c, lease), 0);
	moet_close(c);
	teardown(&e);
}

/* Random logits and a residency that changes under the client (each ROUTE
 * loads its experts; some are evicted between calls): every answer equals
 * route_cached over the residency read just before, for each rule. */
Test(route_daemon, cache_aware_random_against_route_c, .timeout = 180, .fini = kill_daemon)
{
	struct env e;
	make_model_of(&e, "--family deepseek_v3 --preset tiny --experts 16 --top-k 4 --n-group 4 --topk-group 2 "
			  "--layers 3");
	start_daemon(&e, "4M");
	moet_ctx *c = attach(&e, "route-random");
	struct moet_model_info mi = { .size = sizeof(mi) };
	cr_assert_eq(moet_model_info(c, &mi), 0);
	struct pack_file *pf;
	struct moe_error err;
	cr_assert_eq(pack_open(e.pack, PACK_OPEN_NO_DIRECT, &pf, &err), 0, "%s", err.msg);
	unsigned seed = 3, substituted = 0;
	for (uint32_t l = 0; l < mi.n_moe_layers; l++) {
		float bias[16];
		const struct pack_tensor_entry *t = pack_find_role(pf, PACK_ROLE_SCORE_BIAS, moe_model_layer_of(pf->model, l));
		cr_assert_not_null(t);
		cr_assert_eq(pack_read_tensor(pf, t, bias, &err), 0, "%s", err.msg);
		struct route_params rp;
		route_params_from_model(&rp, pf->model, bias);
		for (int trial = 0; trial < 60; trial++) {
			float lg[16];
			uint8_t res[256];
			for (int i = 0; i < 16; i++)
				lg[i] = (float)((int)(rand_r(&seed) % 2001) - 1000) / 400.0f;
			/* evict a few so that the layer never fills up */
			int evicted[3];
			for (int i = 0; i < 3; i++) {
				evicted[i] = (int)(rand_r(&seed) % 16);
				if (moet_evict(c, l, (uint32_t)evicted[i], MOET_TIER_HOST) != 0)
					evicted[i] = -1;
			}
			/* the daemon publishes an eviction before it answers OK: the
			 * shared bitmap shows it at once */
			uint8_t again[256];
			int nres = moet_resident(c, l, MOET_TIER_HOST, res, sizeof(res));
			cr_assert_geq(nres, 0);
			for (int j = 0; j < 3; j++)
				cr_assert(evicted[j] < 0 || !res[evicted[j]], "layer %u: expert %d still resident after EVICT said OK",
					  l, evicted[j]);
			/* background loads are published by the ring thread: read
			 * until two reads 10 ms apart agree */
			for (int i = 0; i < 100; i++) {
				nres = moet_resident(c, l, MOET_TIER_HOST, res, sizeof(res));
				cr_assert_geq(nres, 0);
				probe_sleep_ms(10);
				if (moet_resident(c, l, MOET_TIER_HOST, again, sizeof(again)) == nres &&
				    !memcmp(res, again, 16))
					break;
			}
			struct route_cache_rule rule;
			unsigned kind = 1 + (unsigned)trial % 2; /* margin, low-weight */
			uint32_t J = 1 + (uint32_t)(trial % 3);
			float margin = (float)(trial % 4) * 0.1f;
			route_cache_rule_init(&rule, (enum route_rule)kind, J, margin);
			struct route_result want;
			cr_assert_eq(route_cached(&rp, lg, res, &rule, &want, &err), 0, "%s", err.msg);
			struct moet_route_args a = { .size = sizeof(a), .rule = kind, .keep_top = J, .margin = margin,
						     .tiers = MOET_ROUTE_TIER_HOST };
			uint32_t ex[MOET_MAX_BATCH];
			float w[MOET_MAX_BATCH];
			moet_lease lease = 0;
			int k = moet_route_opts(c, l, lg, 16, 0, &a, ex, w, NULL, NULL, &lease);
			cr_assert_eq(k, 4, "%s", moet_last_error(c));
			cr_assert_eq(a.n_resident, (uint32_t)nres, "the daemon saw %u resident, the bitmap %d", a.n_resident,
				     nres);
			for (int i = 0; i < 4; i++) {
				cr_assert_eq(ex[i], want.experts[i], "layer %u trial %d slot %d: daemon %u, route.c %u", l,
					     trial, i, ex[i], want.experts[i]);
				cr_assert_float_eq(w[i], want.weights[i], 1e-6f, "layer %u trial %d slot %d: %.9g, route.c %.9g (rule %u, mask %#x/%#x)", l, trial, i, (double)w[i], (double)want.weights[i], kind, a.subst_mask, want.subst_mask);
				cr_assert_eq(a.exact[i], want.exact[i]);
				if ((uint32_t)i < J)
					cr_assert_eq(ex[i], a.exact[i], "top-J slot %d replaced", i);
			}
			cr_assert_eq(a.subst_mask, want.subst_mask);
			cr_assert_eq(a.open_mask, want.open_mask);
			substituted += (unsigned)__builtin_popcount(a.subst_mask);
			cr_assert_eq(moet_release(c, lease), 0);
		}
	}
	cr_assert_gt(substituted, 0, "no substitution in the whole run: the test saw nothing");
	pack_close(pf);
	moet_close(c);
	teardown(&e);
}

/* The similarity rule: `moe-pack similarity` stores one table per MoE layer
 * (symmetric, 1 on the diagonal, within [-1, 1]); the daemon loads it and its
 * answers equal route_cached with the pack's table over the residency of
 * that moment; the substitute is the most similar resident expert. */
Test(route_daemon, similarity_rule_with_the_packs_table, .timeout = 120)
{
	struct env e;
	make_model_of(&e, "--family qwen2_moe --preset tiny --experts 16 --top-k 4 --layers 3");
	cr_assert_eq(tu_sh("%s similarity %s -q", tu_build_path("tools/moe-pack"), e.pack), 0);
	cr_assert_eq(tu_sh("%s verify %s >/dev/null", tu_build_path("tools/moe-pack"), e.pack), 0);
	struct pack_file *pf;
	struct moe_error err;
	cr_assert_eq(pack_open(e.pack, PACK_OPEN_NO_DIRECT, &pf, &err), 0, "%s", err.msg);
	static float sim[3][256];
	for (uint32_t l = 0; l < pf->model->n_moe_layers; l++) {
		cr_assert_eq(route_similarity_read(pf, l, sim[l], &err), 0, "%s", err.msg);
		double off = 0;
		for (int a = 0; a < 16; a++)
			for (int b = 0; b < 16; b++) {
				float v = sim[l][a * 16 + b];
				cr_assert_eq(v, sim[l][b * 16 + a], "layer %u: not symmetric at %d,%d", l, a, b);
				cr_assert(a != b || v == 1.0f);
				cr_assert(v >= -1.0f && v <= 1.0f);
				off += a != b ? fabs(v) : 0;
			}
		cr_assert_gt(off, 0.0, "layer %u: an all-zero table", l);
	}
	start_daemon(&e, "4M");
	moet_ctx *c = attach(&e, "route-sim");
	float lg[16];
	for (int i = 0; i < 16; i++)
		lg[i] = -3.0f;
	lg[0] = 4, lg[1] = 3, lg[2] = 2, lg[3] = 1.5f;
	/* experts 5..15 resident; slot 3's (expert 3) substitute is its most
	 * similar resident expert by the table, whatever its logit */
	uint8_t res[16] = { 0 };
	for (int i = 5; i < 16; i++)
		res[i] = 1;
	set_residency(c, 1, res, 16);
	uint32_t best = 5;
	for (uint32_t r = 6; r < 16; r++)
		if (sim[1][3 * 16 + r] > sim[1][3 * 16 + best])
			best = r;
	struct route_params rp;
	route_params_from_model(&rp, pf->model, NULL);
	struct route_cache_rule rule;
	route_cache_rule_init(&rule, ROUTE_RULE_SIMILARITY, 3, INFINITY);
	rule.similarity = sim[1];
	rule.min_similarity = -1.0f;
	struct route_result want;
	cr_assert_eq(route_cached(&rp, lg, res, &rule, &want, &err), 0, "%s", err.msg);
	cr_assert_eq(want.experts[3], best);
	struct moet_route_args a = { .size = sizeof(a), .rule = MOET_ROUTE_SIMILARITY, .keep_top = 3,
				     .margin = INFINITY, .min_similarity = -1.0f };
	uint32_t ex[MOET_MAX_BATCH];
	float w[MOET_MAX_BATCH];
	moet_lease lease = 0;
	int k = moet_route_opts(c, 1, lg, 16, 0, &a, ex, w, NULL, NULL, &lease);
	cr_assert_eq(k, 4, "%d: %s", k, moet_last_error(c));
	for (int i = 0; i < 4; i++) {
		cr_assert_eq(ex[i], want.experts[i], "slot %d: daemon %u, route.c %u", i, ex[i], want.experts[i]);
		/* INHERIT: the substitute keeps the replaced expert's weight */
		cr_assert_float_eq(w[i], want.exact_weights[i], 1e-7f);
	}
	cr_assert_eq(a.subst_mask, 0x8u);
	cr_assert_eq(moet_release(c, lease), 0);
	/* a similarity floor above every entry: nothing is similar enough */
	a.min_similarity = 1.0f;
	k = moet_route_opts(c, 1, lg, 16, 0, &a, ex, w, NULL, NULL, &lease);
	cr_assert_eq(k, 4);
	cr_assert_eq(a.subst_mask, 0u);
	cr_assert_eq(ex[3], 3u);
	cr_assert_eq(moet_release(c, lease), 0);
	pack_close(pf);
	moet_close(c);
	teardown(&e);
}
