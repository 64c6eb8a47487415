/* test_policy.c - eviction policies: exact LRU/LFU/LFRU/ARC/Least-Stale behaviour on
 * hand-made sequences, invariants for every policy on random sequences
 * (capacity, pinned, current access), Belady against a brute-force optimum. */
#include "config.h"

#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "policy.h"

/* A tiny cache driver: one group of `cap` slots (global budget) or per layer. */
struct drv {
	struct policy *p;
	uint32_t cap, n_ids;
	uint8_t res[256];
	uint8_t pinned[256];
	uint8_t cur[256];
	uint32_t occ[16];
	uint64_t hits, misses;
	uint32_t evicted[64]; /* victims in eviction order */
	uint32_t n_evicted;
	/* Belady oracle over a flat sequence. */
	const uint32_t *seq;
	size_t seq_n;
};

static bool filt(void *ctx, uint32_t id)
{
	struct drv *d = ctx;
	return !d->pinned[id] && !d->cur[id];
}

static uint64_t oracle(void *ctx, uint32_t id, uint64_t now)
{
	struct drv *d = ctx;
	/* Access i happens at clock i + 1. */
	for (size_t i = now; i < d->seq_n; i++)
		if (d->seq[i] == id)
			return i + 1;
	return UINT64_MAX;
}

static void drv_init(struct drv *d, const char *name, uint32_t layers, uint32_t experts, uint32_t cap,
		     bool per_layer)
{
	struct policy_config c;
	struct moe_error err;
	memset(d, 0, sizeof(*d));
	policy_config_default(&c, layers, experts, cap, per_layer);
	c.next_use = oracle;
	c.next_use_ctx = d;
	cr_assert_eq(policy_create(name, &c, &d->p, &err), 0, "%s: %s", name, err.msg);
	d->cap = cap;
	d->n_ids = layers * experts;
}

/* One access of `n` ids (all in the same layer when per-layer). */
static void drv_access(struct drv *d, uint64_t token, const uint32_t *ids, uint32_t n)
{
	uint32_t layer = policy_id_layer(d->p, ids[0]);
	bool hit[16];
	policy_begin(d->p, token, layer);
	for (uint32_t i = 0; i < n; i++) {
		d->cur[ids[i]] = 1;
		hit[i] = d->res[ids[i]];
	}
	for (uint32_t i = 0; i < n; i++) {
		uint32_t id = ids[i], g = policy_group_of(d->p, id);
		if (hit[i]) {
			d->hits++;
			policy_hit(d->p, id);
			continue;
		}
		d->misses++;
		while (d->occ[g] >= d->cap) {
			uint32_t v = policy_victim(d->p, g, filt, d);
			cr_assert_neq(v, POLICY_NONE, "no victim with %u/%u occupied", d->occ[g], d->cap);
			cr_assert(d->res[v], "victim %u is not resident", v);
			cr_assert(!d->pinned[v], "pinned %u chosen as victim", v);
			cr_assert(!d->cur[v], "victim %u is in the current access", v);
			cr_assert_eq(policy_group_of(d->p, v), g, "victim from another group");
			policy_remove(d->p, v);
			if (d->n_evicted < MOE_ARRAY_SIZE(d->evicted))
				d->evicted[d->n_evicted++] = v;
			d->res[v] = 0;
			d->occ[g]--;
		}
		d->res[id] = 1;
		d->occ[g]++;
		policy_insert(d->p, id, 0);
		cr_assert_leq(d->occ[g], d->cap, "capacity exceeded");
	}
	for (uint32_t i = 0; i < n; i++)
		d->cur[ids[i]] = 0;
	for (uint32_t id = 0; id < d->n_ids; id++)
		cr_assert_eq(policy_contains(d->p, id), d->res[id] != 0, "policy and cache disagree on %u", id);
}

static void run_seq(struct drv *d, const uint32_t *seq, size_t n)
{
	d->seq = seq;
	d->seq_n = n;
	for (size_t i = 0; i < n; i++)
		drv_access(d, i, &seq[i], 1);
}

Test(policy, unknown_and_bad_config)
{
	struct policy_config c;
	struct policy *p;
	struct moe_error err;
	policy_config_default(&c, 2, 8, 4, true);
	cr_assert_eq(policy_create("nope", &c, &p, &err), -EINVAL);
	cr_assert(strstr(err.msg, "nope"));
	cr_assert_eq(policy_create("belady", &c, &p, &err), -EINVAL, "belady without an oracle");
	c.n_experts = 0;
	cr_assert_eq(policy_create("lru", &c, &p, &err), -EINVAL);
	policy_config_default(&c, 2, 8, 0, true);
	cr_assert_eq(policy_create("arc", &c, &p, &err), -EINVAL, "arc without capacity");
}

Test(policy, lru_exact)
{
	/* cap 3: a b c a d -> d evicts b (a was refreshed); then b misses and evicts c. */
	struct drv d;
	uint32_t seq[] = { 0, 1, 2, 0, 3, 1, 2 };
	drv_init(&d, "lru", 1, 8, 3, false);
	run_seq(&d, seq, 4);
	cr_assert_eq(policy_victim(d.p, 0, NULL, NULL), 1);
	/* Hand count: misses a b c, hit a, miss d (evict b), miss b (evict c), miss c (evict a). */
	policy_destroy(d.p);
	drv_init(&d, "lru", 1, 8, 3, false);
	for (size_t i = 0; i < 7; i++)
		drv_access(&d, i, &seq[i], 1);
	cr_assert_eq(d.hits, 1);
	cr_assert_eq(d.misses, 6);
	cr_assert(d.res[3] && d.res[1] && d.res[2] && !d.res[0]);
	policy_destroy(d.p);
}

Test(policy, lfu_exact)
{
	/* cap 2: a a b c -> c evicts b (count 1 < a's 2); then b evicts c (LRU among equals). */
	struct drv d;
	uint32_t seq[] = { 0, 0, 1, 2, 1 };
	drv_init(&d, "lfu", 1, 8, 2, false);
	for (size_t i = 0; i < 5; i++)
		drv_access(&d, i, &seq[i], 1);
	cr_assert(d.res[0] && d.res[1] && !d.res[2]);
	cr_assert_eq(d.hits, 1);
	policy_destroy(d.p);
}

Test(policy, lfu_decay_forgets)
{
	/* a is used 10 times, then b 3 times. Without decay b (3 < 10) is the
	 * victim; halving every 2 accesses makes a's old popularity fade so a
	 * goes first. */
	for (int with_decay = 0; with_decay < 2; with_decay++) {
		struct policy_config c;
		struct policy *p;
		struct moe_error err;
		uint64_t clock = 0;
		policy_config_default(&c, 1, 8, 2, false);
		c.decay = with_decay ? 0.5 : 1.0;
		c.decay_period = 2;
		cr_assert_eq(policy_create("lfu", &c, &p, &err), 0);
		for (int i = 0; i < 10; i++) {
			policy_begin(p, clock++, 0);
			policy_insert(p, 0, 0);
		}
		for (int i = 0; i < 3; i++) {
			policy_begin(p, clock++, 0);
			policy_insert(p, 1, 0);
		}
		cr_assert_eq(policy_victim(p, 0, NULL, NULL), with_decay ? 0u : 1u, "decay %d", with_decay);
		policy_destroy(p);
	}
}

static void expect_evicted(const struct drv *d, const uint32_t *want, uint32_t n, const char *what)
{
	cr_assert_eq(d->n_evicted, n, "%s: %u evictions, expected %u", what, d->n_evicted, n);
	for (uint32_t i = 0; i < n; i++)
		cr_assert_eq(d->evicted[i], want[i], "%s: eviction %u is %u, expected %u", what, i, d->evicted[i], want[i]);
}

Test(policy, arc_exact)
{
	/* cap 3, a=0 b=1 c=2 d=3 e=4: a a b c d e c b a.
	 * a a: a moves to T2 (used twice). b c: T1 = [c b]. p = 0 so victims
	 * come from T1 while it has any: d evicts b, e evicts c (b falls out of
	 * B1, which may hold only cap - |T1| ghosts). c is a ghost hit in B1:
	 * first the victim d (T1 still above p = 0), then p grows by 1 and c
	 * goes to T2. b (new again): |T1| = 1 is not above p = 1, so the victim
	 * is T2's oldest, a. a is then a ghost hit in B2: victim e from T1
	 * (|T1| = 2 > 1), and p shrinks by |B1| / |B2| = 2 to 0.
	 * LRU on the same sequence evicts a at d already: ARC keeps the entry
	 * used twice through the scan of one-time entries. */
	struct drv d;
	uint32_t seq[] = { 0, 0, 1, 2, 3, 4, 2, 1, 0 };
	drv_init(&d, "arc", 1, 8, 3, false);
	run_seq(&d, seq, 6);
	uint32_t first[] = { 1, 2 };
	expect_evicted(&d, first, 2, "arc after the scan");
	cr_assert(d.res[0] && d.res[3] && d.res[4], "a survives the scan");
	for (size_t i = 6; i < 9; i++)
		drv_access(&d, i, &seq[i], 1);
	uint32_t all[] = { 1, 2, 3, 0, 4 };
	expect_evicted(&d, all, 5, "arc");
	cr_assert_eq(d.hits, 1);
	cr_assert(d.res[0] && d.res[1] && d.res[2]);
	/* T1 = [b], T2 = [a c], p = 0: the next victim is b. */
	cr_assert_eq(policy_victim(d.p, 0, NULL, NULL), 1u);
	policy_destroy(d.p);

	/* The same sequence under LRU: a goes at d. */
	drv_init(&d, "lru", 1, 8, 3, false);
	run_seq(&d, seq, 6);
	uint32_t lru[] = { 0, 1 };
	expect_evicted(&d, lru, 2, "lru on arc's sequence");
	policy_destroy(d.p);
}

Test(policy, arc_victim_falls_back_to_the_other_list)
{
	/* cap 2: a a b -> T1 = [b], T2 = [a], p = 0: the victim is b; with b
	 * not evictable (pinned or in use) it is a, from T2. */
	struct drv d;
	uint32_t seq[] = { 0, 0, 1 };
	drv_init(&d, "arc", 1, 8, 2, false);
	run_seq(&d, seq, 3);
	cr_assert_eq(policy_victim(d.p, 0, filt, &d), 1u);
	d.pinned[1] = 1;
	cr_assert_eq(policy_victim(d.p, 0, filt, &d), 0u);
	d.pinned[0] = 1;
	cr_assert_eq(policy_victim(d.p, 0, filt, &d), POLICY_NONE);
	policy_destroy(d.p);
}

/* LFRU priority = (1 - r) * count / max_count + r / (1 + age): x is the most
 * used and the oldest, y the least used and the newest, z in between. */
static struct policy *lfru_xyz(double r)
{
	struct policy_config c;
	struct policy *p;
	struct moe_error err;
	policy_config_default(&c, 1, 8, 3, false);
	c.decay = 1.0; /* no decay: counts stay exact */
	c.lfru_recency = r;
	cr_assert_eq(policy_create("lfru", &c, &p, &err), 0, "%s", err.msg);
	uint64_t clock = 0;
	/* x = 0: inserted at clock 1, used at 2..8 (count 8, last 8). */
	policy_begin(p, clock++, 0);
	policy_insert(p, 0, 0);
	for (int i = 0; i < 7; i++) {
		policy_begin(p, clock++, 0);
		policy_hit(p, 0);
	}
	/* z = 2: inserted at 9, used at 10 (count 2, last 10). */
	policy_begin(p, clock++, 0);
	policy_insert(p, 2, 0);
	policy_begin(p, clock++, 0);
	policy_hit(p, 2);
	/* Nothing of this group until clock 20: y = 1 inserted (count 1). */
	while (clock < 19)
		policy_begin(p, clock++, 0);
	policy_insert(p, 1, 0);
	/* The access that needs a victim: clock 21. */
	policy_begin(p, clock++, 0);
	return p;
}

Test(policy, lfru_exact)
{
	/* At clock 21, r = 0.5: x = 0.5 + 0.5/14 = 0.536, z = 0.125 + 0.5/12 =
	 * 0.167, y = 0.0625 + 0.5/2 = 0.3125: z, then y, then x. LFU would
	 * take y first (count 1), LRU x (last used at 8). */
	struct policy *p = lfru_xyz(0.5);
	uint32_t want[] = { 2, 1, 0 };
	for (int i = 0; i < 3; i++) {
		uint32_t v = policy_victim(p, 0, NULL, NULL);
		cr_assert_eq(v, want[i], "victim %d is %u, expected %u", i, v, want[i]);
		policy_remove(p, v);
	}
	cr_assert_eq(policy_victim(p, 0, NULL, NULL), POLICY_NONE);
	policy_destroy(p);
	/* The two ends of the mix: r = 0 is frequency alone (y, count 1),
	 * r = 1 recency alone (x, the oldest). */
	p = lfru_xyz(0.0);
	cr_assert_eq(policy_victim(p, 0, NULL, NULL), 1u, "r = 0 is LFU");
	policy_destroy(p);
	p = lfru_xyz(1.0);
	cr_assert_eq(policy_victim(p, 0, NULL, NULL), 0u, "r = 1 is LRU");
	policy_destroy(p);
}

Test(policy, lfru_exact_through_the_driver)
{
	/* cap 2, r = 0.5, no decay, a=0 b=1 c=2 d=3 e=4 f=5, access i at clock
	 * i + 1; counts survive eviction. a a a b, then:
	 *   c (clock 5): a = 0.5 * 3/3 + 0.5/(1+2) = 0.667, b = 0.5 * 1/3 + 0.5/2 = 0.417: b
	 *   b (6): a = 0.5 + 0.5/4 = 0.625, c = 0.417: c (b now has count 2)
	 *   d (7): a = 0.5 + 0.5/5 = 0.600, b = 0.5 * 2/3 + 0.5/2 = 0.583: b
	 *   e (8): a = 0.583, d = 0.417: d
	 *   d (9): a = 0.571, e = 0.417: e (d now has count 2)
	 *   f (10): a = 0.5 + 0.5/8 = 0.5625, d = 0.583: a, at last.
	 * LRU would have evicted a at d (clock 7); LFU keeps it even at f (3 > 2). */
	struct drv d;
	struct policy_config c;
	struct moe_error err;
	memset(&d, 0, sizeof(d));
	policy_config_default(&c, 1, 8, 2, false);
	c.decay = 1.0;
	c.lfru_recency = 0.5;
	cr_assert_eq(policy_create("lfru", &c, &d.p, &err), 0, "%s", err.msg);
	d.cap = 2;
	d.n_ids = 8;
	uint32_t seq[] = { 0, 0, 0, 1, 2, 1, 3, 4, 3, 5 };
	run_seq(&d, seq, 10);
	uint32_t want[] = { 1, 2, 1, 3, 4, 0 };
	expect_evicted(&d, want, 6, "lfru");
	cr_assert_eq(d.hits, 2);
	cr_assert(d.res[3] && d.res[5]);
	policy_destroy(d.p);
}

Test(policy, leaststale_order)
{
	/* Token 0 uses 0,1; token 1 uses 2. Victims: stale ones (0 then 1, FIFO),
	 * then current-pass ones. */
	struct policy_config c;
	struct policy *p;
	struct moe_error err;
	policy_config_default(&c, 1, 8, 4, false);
	cr_assert_eq(policy_create("leaststale", &c, &p, &err), 0);
	policy_begin(p, 0, 0);
	policy_insert(p, 0, 0);
	policy_insert(p, 1, 0);
	policy_begin(p, 1, 0);
	policy_insert(p, 2, 0);
	policy_hit(p, 0); /* 0 is used by the current pass again */
	cr_assert_eq(policy_victim(p, 0, NULL, NULL), 1);
	policy_remove(p, 1);
	cr_assert_eq(policy_victim(p, 0, NULL, NULL), 0, "FIFO among current-pass entries");
	policy_destroy(p);
}

/* Brute-force optimum: minimum misses for a sequence with cap slots, by
 * exploring every eviction choice (tiny inputs only). */
static uint32_t brute(const uint32_t *seq, size_t n, size_t i, uint32_t set, uint32_t cap)
{
	if (i == n)
		return 0;
	uint32_t bit = 1u << seq[i];
	if (set & bit)
		return brute(seq, n, i + 1, set, cap);
	if ((uint32_t)__builtin_popcount(set) < cap)
		return 1 + brute(seq, n, i + 1, set | bit, cap);
	uint32_t best = UINT32_MAX;
	for (uint32_t v = 0; v < 32; v++)
		if (set & (1u << v)) {
			uint32_t m = brute(seq, n, i + 1, (set & ~(1u << v)) | bit, cap);
			if (m < best)
				best = m;
		}
	return 1 + best;
}

Test(policy, belady_matches_brute_force, .timeout = 60)
{
	uint32_t rng = 12345;
	for (int trial = 0; trial < 40; trial++) {
		uint32_t seq[14];
		size_t n = 8 + (size_t)(trial % 6);
		uint32_t cap = 2 + (uint32_t)(trial % 2);
		for (size_t i = 0; i < n; i++) {
			rng = rng * 1103515245u + 12345u;
			seq[i] = (rng >> 16) % 5;
		}
		struct drv d;
		drv_init(&d, "belady", 1, 8, cap, false);
		run_seq(&d, seq, n);
		uint32_t opt = brute(seq, n, 0, 0, cap);
		cr_assert_eq(d.misses, opt, "trial %d: belady %llu misses, optimum %u", trial,
			     (unsigned long long)d.misses, opt);
		/* And LRU can never beat it. */
		struct drv l;
		drv_init(&l, "lru", 1, 8, cap, false);
		run_seq(&l, seq, n);
		cr_assert_geq(l.misses, opt);
		policy_destroy(d.p);
		policy_destroy(l.p);
	}
}

Test(policy, invariants_all_policies, .timeout = 60)
{
	const char *names[] = { "lru", "lfu", "lfru", "leaststale", "arc", "belady" };
	for (size_t pi = 0; pi < sizeof(names) / sizeof(names[0]); pi++) {
		for (int mode = 0; mode < 2; mode++) {
			struct drv d;
			uint32_t L = 3, E = 16, k = 3, cap = mode ? 5 : 12;
			static uint32_t flat[3000];
			uint32_t rng = 777 + (uint32_t)pi;
			/* Accesses: token t, layer l, k distinct experts. */
			size_t n = 0;
			for (uint32_t t = 0; t < 200 / L; t++)
				for (uint32_t l = 0; l < L; l++) {
					uint32_t used = 0;
					for (uint32_t i = 0; i < k; i++) {
						uint32_t e;
						do {
							rng = rng * 1103515245u + 12345u;
							e = (rng >> 16) % E;
						} while (used & (1u << e));
						used |= 1u << e;
						flat[n++] = l * E + e;
					}
				}
			drv_init(&d, names[pi], L, E, cap, mode == 1);
			/* Belady here gets a per-access-group oracle: next use of
			 * the id among later groups (access g at clock g + 1). */
			d.pinned[0] = 1; /* pinned: never resident via this driver,
					    but also never offered as a victim */
			d.pinned[E + 1] = 1;
			for (size_t g = 0; g * k < n; g++) {
				const uint32_t *ids = &flat[g * k];
				/* The driver's oracle scans seq by clock; give it a
				 * sequence of first ids so it stays valid (monotone). */
				d.seq = flat;
				d.seq_n = 0;
				drv_access(&d, g / L, ids, k);
				/* Pin the first resident one once to check it is kept. */
				if (g == 5 && d.res[ids[0]])
					d.pinned[ids[0]] = 1;
			}
			for (uint32_t id = 0; id < L * E; id++)
				if (d.pinned[id] && id != 0 && id != E + 1)
					cr_assert(d.res[id], "%s: pinned %u was evicted", names[pi], id);
			policy_destroy(d.p);
		}
	}
}

Test(policy, per_layer_groups_are_separate)
{
	struct drv d;
	uint32_t a[] = { 0, 1 }, b[] = { 8, 9 }, c[] = { 2, 3 };
	drv_init(&d, "lru", 2, 8, 2, true);
	drv_access(&d, 0, a, 2);
	drv_access(&d, 0, b, 2);
	drv_access(&d, 1, c, 2);
	/* Layer 0's new experts evicted layer 0's, never layer 1's. */
	cr_assert(d.res[8] && d.res[9] && d.res[2] && d.res[3] && !d.res[0] && !d.res[1]);
	policy_destroy(d.p);
}
