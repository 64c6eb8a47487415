/* test_sim.c - moe-sim's engine on tiny synthetic traces with hand-computed
 * counts, the cost model deciding whether a prefetch is in time, Belady never
 * worse than LRU, cache-aware routing, and the moe-sim command line. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sim.h"
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
	/* Compute 0.01 ms: never in time; each useful prefetch becomes late. */
	c.cost.layer_s = 1e-5;
	slow = run(&c, tr, 4);
	cr_assert_eq(slow.hits, 0);
	cr_assert_eq(slow.pf_late, untimed.pf_useful);
	/* Late prefetches are moved once: bytes equal the untimed run's. */
	cr_assert_eq(slow.gpu_bytes, untimed.gpu_bytes);
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
	char path[4096];
	const char *csv = "Layer ID,Batch Number,Token,Activated Expert IDs\n"
			  "1,0,a,\"[0, 1]\"\n1,0,b,\"[1, 2]\"\n1,0,c,\"[2, 3]\"\n1,0,d,\"[0, 1]\"\n";
	snprintf(path, sizeof(path), "%s/prompt_1_data.csv", dir);
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
	for (int i = 1; i <= 20; i++) {
		char path[4096];
		struct trace *tr;
		struct moe_error err;
		snprintf(path, sizeof(path), "%s/prompt_%d_data.csv", dir, i);
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
