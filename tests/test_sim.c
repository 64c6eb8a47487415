/* test_sim.c - moe-sim's engine on tiny synthetic traces with hand-computed
 * counts, the cost model deciding whether a prefetch is in time, Belady never
 * worse than LRU, cache-aware routing, and the moe-sim command line. */
#include "config.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sim.h"
/* testutil.h's recursive remove formats dirent names into a fixed buffer;
 * once inlined here gcc 12 warns about possible truncation. */
#pragma GCC diagnostic ignored "-Wformat-truncation"
#include "testutil.h"

/* rows[t][l] as "a b" strings -> a trace (k = ids per row). */
static struct trace *mk_trace(uint32_t T, uint32_t L, const char *const *rows)
{
	char csv[1 << 16], *p = csv;
	struct trace *tr;
	struct moe_error err;
	p += sprintf(p, "Layer ID,Batch Number,Token,Activated Expert IDs\n");
	for (uint32_t l = 0; l < L; l++)
		for (uint32_t t = 0; t < T; t++)
			p += sprintf(p, "%u,0,tok%u,\"[%s]\"\n", l + 1, t, rows[t * L + l]);
	cr_assert_eq(trace_parse(csv, (size_t)(p - csv), "test", &tr, &err), 0, "%s", err.msg);
	return tr;
}

static struct sim_stats run(const struct sim_config *c, const struct trace *tr, uint32_t E)
{
	struct sim *s;
	struct moe_error err;
	struct sim_stats st;
	cr_assert_eq(sim_create(c, tr->n_layers, E, tr->k, &s, &err), 0, "%s", err.msg);
	cr_assert_eq(sim_run_trace(s, tr, &err), 0, "%s", err.msg);
	st = *sim_stats(s);
	sim_destroy(s);
	return st;
}

Test(sim, lru_hand_counts)
{
	/* One layer, k = 2: {0,1} {1,2} {2,3} {0,1}.
	 * C = 2: t1 hit 1, evict 0; t2 hit 2, evict 1; t3 two misses -> 2 hits, 6 misses.
	 * C = 3: t1 hit 1 (free slot for 2); t2 hit 2, evict 0 (LRU, not in access);
	 *        t3 hit 1, miss 0 evicts 2 (older than 3) -> 3 hits, 5 misses. */
	const char *rows[] = { "0, 1", "1, 2", "2, 3", "0, 1" };
	struct trace *tr = mk_trace(4, 1, rows);
	struct sim_config c;
	sim_config_default(&c);
	c.cache = 2;
	struct sim_stats st = run(&c, tr, 4);
	cr_assert_eq(st.accesses, 8);
	cr_assert_eq(st.hits, 2);
	cr_assert_eq(st.misses, 6);
	cr_assert_eq(st.token_layers, 4);
	cr_assert_eq(st.gpu_bytes, 6 * SIM_EXPERT_BYTES);
	cr_assert_float_eq(sim_loads_per_tl(&st, SIM_EXPERT_BYTES), 1.5, 1e-9);
	/* Stall: 6 demand loads at 25 GB/s. */
	cr_assert_float_eq((double)st.stall_ns, 6.0 * SIM_EXPERT_BYTES / SIM_H2D_BW * 1e9, 8.0);
	c.cache = 3;
	st = run(&c, tr, 4);
	cr_assert_eq(st.hits, 3);
	cr_assert_eq(st.misses, 5);
	/* C smaller than k is refused. */
	struct sim *s;
	struct moe_error err;
	c.cache = 1;
	cr_assert_eq(sim_create(&c, 1, 4, 2, &s, &err), -EINVAL);
	trace_free(tr);
}

Test(sim, host_tier_counts)
{
	/* Host tier of 2 slots per layer in front of NVMe, GPU cache 2:
	 * every GPU miss checks the host; {0,1} {2,3} {0,1}: 6 GPU misses,
	 * host misses 0 1 2 3 0 1 (LRU of 2 slots) = 6, so 6 NVMe reads. */
	const char *rows[] = { "0, 1", "2, 3", "0, 1" };
	struct trace *tr = mk_trace(3, 1, rows);
	struct sim_config c;
	sim_config_default(&c);
	c.cache = 2;
	c.cost.host_slots = 2;
	struct sim_stats st = run(&c, tr, 4);
	cr_assert_eq(st.misses, 6);
	cr_assert_eq(st.host_misses, 6);
	cr_assert_eq(st.nvme_bytes, 6 * SIM_EXPERT_BYTES);
	c.cost.host_slots = 4;
	st = run(&c, tr, 4);
	cr_assert_eq(st.host_misses, 4);
	cr_assert_eq(st.host_hits, 2);
	trace_free(tr);
}

/* 2 layers, k = 1: layer 0 = t mod 4, layer 1 = the same id. The online
 * co-activation predictor learns it and prefetches layer 1 after layer 0. */
static struct trace *coact_trace(void)
{
	static char buf[64][8];
	static const char *rows[64];
	for (int t = 0; t < 32; t++) {
		snprintf(buf[2 * t], 8, "%d", t % 4);
		snprintf(buf[2 * t + 1], 8, "%d", t % 4);
		rows[2 * t] = buf[2 * t];
		rows[2 * t + 1] = buf[2 * t + 1];
	}
	return mk_trace(32, 2, rows);
}

Test(sim, prefetch_counts_only_in_time)
{
	struct trace *tr = coact_trace();
	struct sim_config c;
	sim_config_default(&c);
	c.cache = 1;
	c.predictor = "coact";
	c.pf.h_fixed = 1;
	struct sim_stats none, untimed, fast, slow;
	c.predictor = NULL;
	none = run(&c, tr, 4);
	cr_assert_eq(none.hits, 0, "C = 1 and a changing expert: no demand hits");
	c.predictor = "coact";
	c.timed = false;
	untimed = run(&c, tr, 4);
	cr_assert_gt(untimed.hits, 20, "the predictor learns layer 1 = layer 0 (%llu hits)",
		     (unsigned long long)untimed.hits);
	cr_assert_eq(untimed.hits, untimed.pf_useful);
	c.timed = true;
	/* A load takes 0.69 ms; compute 2 ms per layer: always in time. */
	c.cost.layer_s = 2e-3;
	fast = run(&c, tr, 4);
	cr_assert_eq(fast.hits, untimed.hits);
	cr_assert_eq(fast.pf_late, 0);
	/* Compute 0.01 ms: never in time. With the deadline nothing is
	 * issued (a load could only evict and arrive late): demand traffic
	 * only, as without a predictor. */
	c.cost.layer_s = 1e-5;
	slow = run(&c, tr, 4);
	cr_assert_eq(slow.hits, 0);
	cr_assert_eq(slow.pf_issued, 0);
	cr_assert_gt(slow.pf_cut, 20, "the plans are counted as cut by the deadline");
	cr_assert_eq(slow.gpu_bytes, none.gpu_bytes);
	/* Without the deadline each useful prefetch becomes late. */
	c.pf.deadline = false;
	slow = run(&c, tr, 4);
	cr_assert_eq(slow.hits, 0);
	cr_assert_eq(slow.pf_late, untimed.pf_useful);
	cr_assert_eq(slow.pf_cut, 0);
	/* Late prefetches are moved once: bytes equal the untimed run's. */
	cr_assert_eq(slow.gpu_bytes, untimed.gpu_bytes);
	cr_assert_eq(slow.pf_withdrawn, 0, "every prefetch was right: none to withdraw");
	trace_free(tr);

	/* Layer 1 follows layer 0 for 16 tokens, then layer 0 + 1: the learned
	 * prefetches turn wrong. With no compute time the link never starts a
	 * prefetch, so each wrong one is withdrawn when layer 1 passes without
	 * it, and moves nothing. Two slots, so that the demand read of layer 1
	 * evicts the older resident rather than the queued prefetch. */
	static char buf[64][8];
	static const char *rows[64];
	for (int t = 0; t < 32; t++) {
		snprintf(buf[2 * t], 8, "%d", t % 4);
		snprintf(buf[2 * t + 1], 8, "%d", t < 16 ? t % 4 : (t + 1) % 4);
		rows[2 * t] = buf[2 * t];
		rows[2 * t + 1] = buf[2 * t + 1];
	}
	tr = mk_trace(32, 2, rows);
	c.cost.layer_s = 0;
	c.cache = 2;
	struct sim_stats idle = run(&c, tr, 4);
	cr_assert_eq(idle.hits, 0);
	cr_assert_geq(idle.pf_withdrawn, 1, "wrong prefetches withdrawn (%llu)",
		      (unsigned long long)idle.pf_withdrawn);
	cr_assert_leq(idle.pf_withdrawn, idle.pf_cancelled);
	c.predictor = NULL;
	none = run(&c, tr, 4);
	cr_assert_eq(idle.gpu_bytes, none.gpu_bytes, "late ones move as demand reads, withdrawn ones not at all");
	cr_assert_gt(sim_pf_precision(&untimed), 0.5);
	trace_free(tr);
}

Test(sim, belady_not_worse_and_routing)
{
	/* A pseudo-random trace: 3 layers, 16 experts, k = 2. */
	static char buf[300][16];
	static const char *rows[300];
	uint32_t x = 5;
	for (int i = 0; i < 300; i++) {
		uint32_t a, b;
		x = x * 1103515245u + 12345u;
		a = (x >> 16) % 16;
		x = x * 1103515245u + 12345u;
		b = (a + 1 + (x >> 16) % 15) % 16;
		snprintf(buf[i], 16, "%u, %u", a, b);
		rows[i] = buf[i];
	}
	struct trace *tr = mk_trace(100, 3, rows);
	struct sim_config c;
	sim_config_default(&c);
	c.cache = 4;
	struct sim_stats lru = run(&c, tr, 16);
	c.policy = "belady";
	struct sim_stats bel = run(&c, tr, 16);
	cr_assert_geq(bel.hits, lru.hits);
	c.global = true;
	c.policy = "lru";
	struct sim_stats glru = run(&c, tr, 16);
	c.policy = "belady";
	struct sim_stats gbel = run(&c, tr, 16);
	cr_assert_geq(gbel.hits, glru.hits);
	/* Cache-aware routing: J = k is exact; J < k substitutes and never lowers hits. */
	c.global = false;
	c.policy = "lru";
	c.route_keep = 2;
	struct sim_stats exact = run(&c, tr, 16);
	cr_assert_eq(exact.route_subst, 0);
	cr_assert_eq(exact.hits, lru.hits);
	c.route_keep = 1;
	c.route_margin = 3.0f;
	struct sim_stats ca = run(&c, tr, 16);
	cr_assert_gt(ca.route_subst, 0);
	cr_assert_leq(ca.route_subst, ca.route_slots_open);
	cr_assert_gt(ca.hits, lru.hits);
	trace_free(tr);
}

Test(sim, cli_replay_and_errors, .timeout = 60)
{
	char *dir = tu_mkdtemp("sim");
	char path[8192];
	const char *csv = "Layer ID,Batch Number,Token,Activated Expert IDs\n"
			  "1,0,a,\"[0, 1]\"\n1,0,b,\"[1, 2]\"\n1,0,c,\"[2, 3]\"\n1,0,d,\"[0, 1]\"\n";
	snprintf(path, sizeof(path), "%.4000s/prompt_1_data.csv", dir);
	cr_assert_eq(tu_write_file(path, csv, strlen(csv)), 0);
	cr_assert_eq(tu_sh("%s replay --cache 2 --experts 4 %s | grep -q 'hit rate 0.2500'",
			   tu_build_path("tools/moe-sim"), path), 0);
	cr_assert_eq(tu_sh("%s compare --cache 2 --experts 4 --policies lru,belady --plot %s/p.svg %s "
			   "--sizes 2,3 >/dev/null && grep -q '<svg' %s/p.svg",
			   tu_build_path("tools/moe-sim"), dir, dir, dir), 0);
	cr_assert_neq(tu_sh("%s replay --cache 2 --policy nope %s 2>/dev/null", tu_build_path("tools/moe-sim"), path), 0);
	cr_assert_neq(tu_sh("%s replay --cache zz %s 2>/dev/null", tu_build_path("tools/moe-sim"), path), 0);
	cr_assert_neq(tu_sh("%s replay --predictor learned --model %s %s 2>/dev/null",
			    tu_build_path("tools/moe-sim"), path, path), 0, "a CSV is not a model");
	tu_rmtree(dir);
}

Test(sim, real_traces_subset, .timeout = 120)
{
	const char *dir = tu_traces_dir();
	if (!dir)
		cr_skip_test("no MoE-Beyond traces under MOETIER_SHARED");
	struct sim_config c;
	struct sim_stats lru = { 0 }, bel = { 0 };
	sim_config_default(&c);
	/* C = 8: at C = k = 6 every demand policy keeps exactly the last access. */
	c.cache = 8;
	for (int i = 1; i <= 20; i++) {
		char path[8192];
		struct trace *tr;
		struct moe_error err;
		snprintf(path, sizeof(path), "%.4000s/prompt_%d_data.csv", dir, i);
		cr_assert_eq(trace_load(path, &tr, &err), 0, "%s", err.msg);
		c.policy = "lru";
		struct sim_stats a = run(&c, tr, 64);
		c.policy = "belady";
		struct sim_stats b = run(&c, tr, 64);
		cr_assert_geq(b.hits, a.hits, "prompt %d", i);
		sim_stats_add(&lru, &a);
		sim_stats_add(&bel, &b);
		trace_free(tr);
	}
	cr_assert_eq(lru.accesses, lru.hits + lru.misses);
	cr_assert_gt(sim_hit_rate(&lru), 0.05);
	cr_assert_lt(sim_hit_rate(&lru), sim_hit_rate(&bel));
}

struct issued {
	uint32_t n, expert[8], victim[8];
};

static int rec_issue(void *ctx, uint32_t layer, uint32_t expert, uint32_t victim)
{
	struct issued *r = ctx;
	(void)layer;
	r->expert[r->n] = expert;
	r->victim[r->n++] = victim;
	return 0;
}

Test(prefetch, plan_gain_rule_and_horizon)
{
	struct prefetch_config c;
	struct prefetch_sched ps;
	struct moe_error err;
	prefetch_config_default(&c, 4, 8, 1000000);
	c.deadline = false; /* the look-ahead rule without a deadline */
	c.max_per_layer = 3;
	c.gain = 0.2f;
	c.min_score = 0.3f;
	cr_assert_eq(prefetch_init(&ps, &c, &err), 0, "%s", err.msg);
	/* Residents 0..3 (3 not evictable), candidates 4..7. */
	float sc[8] = { 0.1f, 0.5f, 0.05f, 0.0f, 0.9f, 0.6f, 0.28f, 0.2f };
	uint8_t res[8] = { 1, 1, 1, 1, 0, 0, 0, 0 }, ev[8] = { 1, 1, 1, 0, 0, 0, 0, 0 };
	struct prefetch_view v = { res, ev, 0, 0 };
	struct issued r = { 0 };
	/* 4 (0.9) replaces 2 (0.05); 5 (0.6) replaces 0 (0.1); 6 (0.28) vs 1
	 * (0.5) has no gain: stop. Resident 3 is not evictable. */
	cr_assert_eq(prefetch_plan_layer(&ps, 1, sc, &v, rec_issue, &r), 2);
	cr_assert(r.expert[0] == 4 && r.victim[0] == 2 && r.expert[1] == 5 && r.victim[1] == 0);
	/* Free slots: min_score decides. */
	struct prefetch_view f = { res, NULL, 5, 0 };
	memset(&r, 0, sizeof(r));
	cr_assert_eq(prefetch_plan_layer(&ps, 1, sc, &f, rec_issue, &r), 2, "0.28 < min_score 0.3");
	cr_assert(r.victim[0] == POLICY_NONE && r.victim[1] == POLICY_NONE);
	cr_assert_eq(ps.c.issued, 4);
	prefetch_note_used(&ps, 10);
	prefetch_note_unused(&ps, 20);
	prefetch_note_cancel(&ps, 5);
	cr_assert_eq(ps.c.useful_bytes, 10);
	cr_assert_eq(ps.c.wasted_bytes, 25);
	cr_assert_eq(ps.c.cancelled, 1);
	/* Look-ahead: slow links or fast layers need a longer one. */
	for (int i = 0; i < 50; i++)
		prefetch_note_layer(&ps, 10e-3);
	uint32_t h_slow_layers = prefetch_horizon(&ps);
	for (int i = 0; i < 100; i++)
		prefetch_note_layer(&ps, 0.1e-3);
	uint32_t h_fast_layers = prefetch_horizon(&ps);
	cr_assert_eq(h_slow_layers, c.h_min);
	cr_assert_gt(h_fast_layers, h_slow_layers);
	cr_assert_leq(h_fast_layers, c.h_max);
	prefetch_fini(&ps);
	/* With the deadline the look-ahead starts at the first layer a load
	 * can reach: 1 MB at 25 GB/s = 40 us. */
	c.deadline = true;
	cr_assert_eq(prefetch_init(&ps, &c, &err), 0, "%s", err.msg);
	for (int i = 0; i < 200; i++)
		prefetch_note_layer(&ps, 10e-3);
	cr_assert_eq(prefetch_horizon(&ps), 2, "one layer covers the load, plus one");
	for (int i = 0; i < 200; i++)
		prefetch_note_layer(&ps, 10e-6);
	cr_assert_eq(prefetch_horizon(&ps), 5, "ceil(40 / 10) + 1");
	prefetch_fini(&ps);
	c.h_min = 0;
	cr_assert_eq(prefetch_init(&ps, &c, &err), -EINVAL);
	c.h_min = 1;
	c.h_max = PREFETCH_MAX_H + 1;
	cr_assert_eq(prefetch_init(&ps, &c, &err), -EINVAL);
}

/* The model file through the CLI (predictor owner's test): a model trained by
 * moe-sim train drives combo in a replay; the same file marked version 1 (the
 * former layout) is refused with a message that says to retrain. */
Test(sim, cli_model_file_version, .timeout = 60)
{
	char *dir = tu_mkdtemp("simmodel");
	char path[8192];
	const char *csv = "Layer ID,Batch Number,Token,Activated Expert IDs\n"
			  "1,0,a,\"[0, 1]\"\n1,0,b,\"[1, 2]\"\n1,0,c,\"[2, 3]\"\n1,0,a,\"[0, 1]\"\n"
			  "2,0,a,\"[2, 3]\"\n2,0,b,\"[3, 0]\"\n2,0,c,\"[0, 1]\"\n2,0,a,\"[2, 3]\"\n";
	for (int i = 1; i <= 5; i++) {
		snprintf(path, sizeof(path), "%.4000s/prompt_%d_data.csv", dir, i);
		cr_assert_eq(tu_write_file(path, csv, strlen(csv)), 0);
	}
	const char *sim = tu_build_path("tools/moe-sim");
	cr_assert_eq(tu_sh("%s train --experts 4 --out %s/m.pred %s >/dev/null", sim, dir, dir), 0);
	cr_assert_eq(tu_sh("%s replay --brief --experts 4 --cache 2 --predictor combo --model %s/m.pred %s "
			   "| grep -q 'hit='", sim, dir, dir), 0);
	cr_assert_eq(tu_sh("printf '\\001' | dd of=%s/m.pred bs=1 seek=8 conv=notrunc 2>/dev/null", dir), 0);
	cr_assert_eq(tu_sh("%s replay --brief --experts 4 --cache 2 --predictor combo --model %s/m.pred %s 2>&1 "
			   "| grep -q 'version 1, this build reads %u (retrain'", sim, dir, dir, PREDICT_MODEL_VERSION), 0);
	cr_assert_neq(tu_sh("%s replay --brief --experts 4 --cache 2 --predictor combo --model %s/m.pred %s "
			    ">/dev/null 2>&1", sim, dir, dir), 0);
	tu_rmtree(dir);
}
