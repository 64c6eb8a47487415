/* test_predict.c - predictors: exact temporal scores, online co-activation,
 * the token table, tracematch's matching of the stream against stored
 * activation matrices, the learned model's token offsets, the combiner's
 * per-distance weights, model save/load round trip and rejection of corrupt
 * and old-version files,
 * training on a synthetic trace with a known rule, and (when the real traces
 * are present) a learned predictor that beats the no-predictor baseline on
 * prompts it was not trained on. */
#include "config.h"

#include <criterion/criterion.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "predict.h"
#include "sim.h"
/* testutil.h's recursive remove formats dirent names into a fixed buffer;
 * once inlined here gcc 12 warns about possible truncation. */
#pragma GCC diagnostic ignored "-Wformat-truncation"
#include "testutil.h"

static struct predictor *mk(const char *name, uint32_t L, uint32_t E, uint32_t k, const struct predict_model *m)
{
	struct predictor *p;
	struct moe_error err;
	cr_assert_eq(predict_create(name, L, E, k, m, &p, &err), 0, "%s: %s", name, err.msg);
	return p;
}

Test(predict, registry_and_errors)
{
	struct predictor *p;
	struct moe_error err;
	cr_assert_eq(predict_create("nope", 2, 8, 2, NULL, &p, &err), -EINVAL);
	cr_assert_eq(predict_create("learned", 2, 8, 2, NULL, &p, &err), -EINVAL, "learned needs a model");
	cr_assert(strstr(err.msg, "model"));
	cr_assert_eq(predict_create("temporal", 0, 8, 2, NULL, &p, &err), -EINVAL);
	cr_assert_eq(predict_create("temporal", 2, 8, 9, NULL, &p, &err), -EINVAL);
	for (size_t i = 0; predict_registry[i]; i++)
		cr_assert_eq(predict_find(predict_registry[i]->name), predict_registry[i]);
}

Test(predict, temporal_exact)
{
	struct predictor *p = mk("temporal", 2, 8, 2, NULL);
	float s[8];
	uint16_t a[] = { 1, 2 }, b[] = { 2, 3 };
	predict_token(p, 11);
	predict_observe(p, 0, a, 2);
	predict_token(p, 12);
	predict_score(p, 0, s);
	/* One previous token: weight (1 - 0.5) for its experts. */
	cr_assert_float_eq(s[1], 0.5f, 1e-6);
	cr_assert_float_eq(s[2], 0.5f, 1e-6);
	cr_assert_float_eq(s[0], 0.0f, 1e-6);
	predict_observe(p, 0, b, 2);
	predict_token(p, 13);
	predict_score(p, 0, s);
	/* Expert 2 used by both previous tokens: 0.5 + 0.25; 3: 0.5; 1: 0.25. */
	cr_assert_float_eq(s[2], 0.75f, 1e-6);
	cr_assert_float_eq(s[3], 0.5f, 1e-6);
	cr_assert_float_eq(s[1], 0.25f, 1e-6);
	/* A new stream forgets. */
	predict_reset(p);
	predict_token(p, 14);
	predict_score(p, 0, s);
	cr_assert_float_eq(s[2], 0.0f, 1e-6);
	predict_destroy(p);
}

Test(predict, coact_learns_online)
{
	struct predictor *p = mk("coact", 3, 8, 1, NULL);
	float s[8];
	for (int t = 0; t < 40; t++) {
		uint16_t a = (uint16_t)(t % 4), b = (uint16_t)((t % 4) + 4);
		predict_token(p, 1);
		predict_observe(p, 0, &a, 1);
		predict_observe(p, 1, &b, 1);
	}
	uint16_t a = 2;
	predict_token(p, 1);
	predict_observe(p, 0, &a, 1);
	predict_score(p, 1, s);
	for (int e = 0; e < 8; e++)
		if (e != 6)
			cr_assert_gt(s[6], s[e], "expert 6 follows 2 at the next layer");
	cr_assert_gt(s[6], 0.8f);
	predict_destroy(p);
}

static struct predict_model *small_model(void)
{
	struct predict_model *m;
	struct moe_error err;
	cr_assert_eq(predict_model_alloc(&m, 3, 8, 2, 16, 2, &err), 0, "%s", err.msg);
	/* Fill every section with a recognisable pattern. */
	size_t LE = 3 * 8, LEE = LE * 8;
	for (size_t i = 0; i < LE; i++) {
		m->bias[i] = (float)i * 0.01f - 0.1f;
		m->tok_prior[i] = 0.25f;
	}
	for (int d = 0; d < PREDICT_DMAX; d++)
		for (size_t i = 0; i < LEE; i++)
			m->w_cur[d][i] = (float)((i * 7 + d) % 13) * 0.1f;
	for (size_t i = 0; i < LEE; i++) {
		m->w_cur2[i] = 0.5f;
		m->w_prev[i] = -0.5f;
		m->w_prevn[i] = 0.25f;
		m->w_prev2[i] = (float)(i % 3);
	}
	for (size_t i = 0; i < 2 * LE; i++)
		m->eam[i] = (float)(i % 5) * 0.2f;
	for (size_t i = 0; i < PREDICT_COMBO_D * 3 * (PREDICT_COMBO_F + 1); i++)
		m->combo[i] = 0.01f * (float)(i % 29) - 0.1f;
	uint32_t key = predict_token_key("hello");
	int64_t row;
	uint32_t h = (key * 2654435761u) & 15;
	m->tok_key[h] = key;
	m->tok_total[h] = 4;
	for (size_t i = 0; i < LE; i++) {
		m->tok_freq[h * LE + i] = (uint8_t)(i % 2 ? 255 : 0);
		m->w_tok[h * LE + i] = (int8_t)((int)(i % 7) * 9 - 27);
		m->w_tokp[h * LE + i] = (int8_t)(40 - (int)(i % 5) * 20);
	}
	row = predict_model_tok_find(m, key);
	cr_assert_eq(row, (int64_t)h);
	cr_assert_eq(predict_model_tok_find(m, predict_token_key("other")), -1);
	return m;
}

static void same_model(const struct predict_model *a, const struct predict_model *b)
{
	size_t LE = (size_t)a->n_layers * a->n_experts, LEE = LE * a->n_experts;
	cr_assert_eq(a->n_layers, b->n_layers);
	cr_assert_eq(a->tok_slots, b->tok_slots);
	cr_assert_eq(memcmp(a->bias, b->bias, LE * 4), 0);
	for (int d = 0; d < PREDICT_DMAX; d++)
		cr_assert_eq(memcmp(a->w_cur[d], b->w_cur[d], LEE * 4), 0);
	cr_assert_eq(memcmp(a->w_prev2, b->w_prev2, LEE * 4), 0);
	cr_assert_eq(memcmp(a->tok_key, b->tok_key, a->tok_slots * 4), 0);
	cr_assert_eq(memcmp(a->tok_freq, b->tok_freq, a->tok_slots * LE), 0);
	cr_assert_eq(memcmp(a->eam, b->eam, a->n_eam * LE * 4), 0);
	cr_assert_eq(memcmp(a->w_tok, b->w_tok, a->tok_slots * LE), 0);
	cr_assert_eq(memcmp(a->w_tokp, b->w_tokp, a->tok_slots * LE), 0);
	cr_assert_eq(a->n_combo, b->n_combo);
	cr_assert_eq(memcmp(a->combo, b->combo, PREDICT_COMBO_D * a->n_layers * (PREDICT_COMBO_F + 1) * 4), 0);
}

Test(predict, model_round_trip_and_corruption)
{
	char *dir = tu_mkdtemp("predict");
	char path[8192], bad[8192];
	struct predict_model *m = small_model(), *r;
	struct moe_error err;
	size_t len;
	snprintf(path, sizeof(path), "%.4000s/m.pred", dir);
	snprintf(bad, sizeof(bad), "%.4000s/bad.pred", dir);
	cr_assert_eq(predict_model_save(m, path, &err), 0, "%s", err.msg);
	cr_assert_eq(predict_model_load(path, &r, &err), 0, "%s", err.msg);
	same_model(m, r);
	/* The loaded model drives the predictors like the original. */
	struct predictor *p1 = mk("combo", 3, 8, 2, m), *p2 = mk("combo", 3, 8, 2, r);
	float s1[8], s2[8];
	uint16_t ids[] = { 1, 5 };
	predict_token(p1, predict_token_key("hello"));
	predict_token(p2, predict_token_key("hello"));
	predict_observe(p1, 0, ids, 2);
	predict_observe(p2, 0, ids, 2);
	predict_score(p1, 1, s1);
	predict_score(p2, 1, s2);
	cr_assert_eq(memcmp(s1, s2, sizeof(s1)), 0);
	predict_destroy(p1);
	predict_destroy(p2);
	predict_model_free(r);

	char *buf = tu_read_file(path, &len);
	cr_assert(buf && len > 64);
	/* A flipped payload byte. */
	buf[100] ^= 0x40;
	cr_assert_eq(tu_write_file(bad, buf, len), 0);
	cr_assert_eq(predict_model_load(bad, &r, &err), -EINVAL);
	cr_assert(strstr(err.msg, "checksum"), "%s", err.msg);
	buf[100] ^= 0x40;
	/* Truncated. */
	cr_assert_eq(tu_write_file(bad, buf, len - 1), 0);
	cr_assert_eq(predict_model_load(bad, &r, &err), -EINVAL);
	cr_assert_eq(tu_write_file(bad, buf, 10), 0);
	cr_assert_eq(predict_model_load(bad, &r, &err), -EINVAL);
	/* Bad magic, future version, absurd shape. */
	buf[0] = 'X';
	cr_assert_eq(tu_write_file(bad, buf, len), 0);
	cr_assert_eq(predict_model_load(bad, &r, &err), -EINVAL);
	buf[0] = 'M';
	uint32_t v = PREDICT_MODEL_VERSION + 1;
	memcpy(buf + 8, &v, 4);
	cr_assert_eq(tu_write_file(bad, buf, len), 0);
	cr_assert_eq(predict_model_load(bad, &r, &err), -EINVAL);
	cr_assert(strstr(err.msg, "version"), "%s", err.msg);
	/* A version-1 file (5-input combiner, no token offsets) asks for a retrain. */
	v = 1;
	memcpy(buf + 8, &v, 4);
	cr_assert_eq(tu_write_file(bad, buf, len), 0);
	cr_assert_eq(predict_model_load(bad, &r, &err), -EINVAL);
	cr_assert(strstr(err.msg, "version 1") && strstr(err.msg, "retrain"), "%s", err.msg);
	v = PREDICT_MODEL_VERSION;
	memcpy(buf + 8, &v, 4);
	/* A combiner of another width. */
	uint32_t nc = PREDICT_COMBO_N;
	memcpy(buf + 32, &nc, 4);
	cr_assert_eq(tu_write_file(bad, buf, len), 0);
	cr_assert_eq(predict_model_load(bad, &r, &err), -EINVAL);
	cr_assert(strstr(err.msg, "combiner"), "%s", err.msg);
	nc = PREDICT_COMBO_F;
	memcpy(buf + 32, &nc, 4);
	uint32_t huge = 1u << 30;
	memcpy(buf + 16, &huge, 4); /* n_experts */
	cr_assert_eq(tu_write_file(bad, buf, len), 0);
	cr_assert_eq(predict_model_load(bad, &r, &err), -EINVAL);
	/* A non-finite weight with a matching checksum is still refused. */
	struct predict_model *m2 = small_model();
	m2->bias[3] = NAN;
	cr_assert_eq(predict_model_save(m2, bad, &err), 0);
	cr_assert_eq(predict_model_load(bad, &r, &err), -EINVAL);
	cr_assert_eq(predict_model_load("/nonexistent/x.pred", &r, &err), -ENOENT);
	/* A model of another shape is refused by the predictor. */
	struct predictor *p;
	cr_assert_eq(predict_create("learned", 4, 8, 2, m2, &p, &err), -EINVAL);
	predict_model_free(m2);
	free(buf);
	predict_model_free(m);
	tu_rmtree(dir);
}

Test(predict, learned_token_offset)
{
	struct predict_model *m = small_model();
	uint32_t key = predict_token_key("hello");
	int64_t row = predict_model_tok_find(m, key);
	float with[8], without[8];
	/* Fresh streams, no route yet: a known token's logits are an unknown
	 * token's plus its offsets, w_tok * PREDICT_TOK_STEP. */
	struct predictor *a = mk("learned", 3, 8, 2, m), *b = mk("learned", 3, 8, 2, m);
	cr_assert_geq(row, 0);
	predict_token(a, predict_token_key("unseen"));
	predict_token(b, key);
	predict_learned_logits(m, a->s, 2, without);
	predict_learned_logits(m, b->s, 2, with);
	for (uint32_t e = 0; e < 8; e++) {
		float off = (float)m->w_tok[((size_t)row * 3 + 2) * 8 + e] * PREDICT_TOK_STEP;
		cr_assert_float_eq(with[e], without[e] + off, 1e-5, "expert %u", e);
	}
	/* The same for the previous token's key: "hello" then an unknown token
	 * against two unknown tokens (no routes observed, so only w_tokp
	 * differs). */
	predict_token(a, predict_token_key("unseen2"));
	predict_token(b, predict_token_key("unseen2"));
	predict_learned_logits(m, a->s, 1, without);
	predict_learned_logits(m, b->s, 1, with);
	for (uint32_t e = 0; e < 8; e++) {
		float off = (float)m->w_tokp[((size_t)row * 3 + 1) * 8 + e] * PREDICT_TOK_STEP;
		cr_assert_float_eq(with[e], without[e] + off, 1e-5, "expert %u", e);
	}
	/* A new stream has no previous token. */
	predict_reset(b);
	predict_token(b, predict_token_key("unseen2"));
	predict_learned_logits(m, b->s, 1, with);
	for (uint32_t e = 0; e < 8; e++)
		cr_assert_float_eq(with[e], without[e], 1e-6);
	predict_destroy(a);
	predict_destroy(b);
	predict_model_free(m);
}

Test(predict, learned_pair_rows)
{
	struct predict_model *m;
	struct moe_error err;
	const size_t E = 8;
	cr_assert_eq(predict_model_alloc(&m, 3, 8, 2, 16, 1, &err), 0, "%s", err.msg);
	cr_assert(m->w_pair && m->w_xpair);
	/* All weights zero but the pair (2, 3) of layer 1 and the cross pair
	 * (3 at layer 1, 5 at layer 0), both for target layer 2. */
	for (size_t e = 0; e < E; e++) {
		m->w_pair[((2 * E + 2) * E + 3) * E + e] = 1.0f;
		m->w_xpair[((2 * E + 3) * E + 5) * E + e] = 0.1f * (float)e;
	}
	struct predictor *p = mk("learned", 3, 8, 2, m);
	uint16_t l0[] = { 1, 5 }, l1[] = { 3, 2 };
	float z[8];
	predict_token(p, predict_token_key("unseen"));
	predict_observe(p, 0, l0, 2);
	predict_observe(p, 1, l1, 2);
	predict_learned_logits(m, p->s, 2, z);
	for (size_t e = 0; e < E; e++)
		cr_assert_float_eq(z[e], 1.0f + 0.1f * (float)e, 1e-6, "expert %zu", e);
	/* Two layers ahead (d = 2) no pair terms apply. */
	predict_token(p, predict_token_key("unseen"));
	predict_observe(p, 0, l0, 2);
	predict_learned_logits(m, p->s, 2, z);
	for (size_t e = 0; e < E; e++)
		cr_assert_float_eq(z[e], 0.0f, 1e-6);
	predict_destroy(p);
	predict_model_free(m);
}

Test(predict, combo_weights_by_distance)
{
	struct predict_model *m = small_model();
	const size_t W = PREDICT_COMBO_F + 1;
	/* Bucket 0 (no layer of this token routed): bias 0 -> 0.5 everywhere.
	 * Bucket 1 (next layer): the learned model's log-odds alone. Buckets 2
	 * and 3: bias -2. */
	memset(m->combo, 0, PREDICT_COMBO_D * 3 * W * sizeof(float));
	for (uint32_t l = 0; l < 3; l++) {
		m->combo[((size_t)1 * 3 + l) * W + PREDICT_COMBO_N - 1] = 1.0f;
		m->combo[((size_t)2 * 3 + l) * W + PREDICT_COMBO_F] = -2.0f;
		m->combo[((size_t)3 * 3 + l) * W + PREDICT_COMBO_F] = -2.0f;
	}
	struct predictor *c = mk("combo", 3, 8, 2, m), *l = mk("learned", 3, 8, 2, m);
	float sc[8], sl[8];
	uint16_t ids[] = { 1, 5 };
	predict_token(c, predict_token_key("hello"));
	predict_token(l, predict_token_key("hello"));
	cr_assert_eq(predict_combo_bucket(c->s, 0), 0);
	predict_score(c, 0, sc);
	for (int e = 0; e < 8; e++)
		cr_assert_float_eq(sc[e], 0.5f, 1e-6);
	predict_observe(c, 0, ids, 2);
	predict_observe(l, 0, ids, 2);
	cr_assert_eq(predict_combo_bucket(c->s, 1), 1);
	cr_assert_eq(predict_combo_bucket(c->s, 2), 2);
	predict_score(c, 1, sc);
	predict_score(l, 1, sl);
	for (int e = 0; e < 8; e++)
		cr_assert_float_eq(sc[e], sl[e], 1e-5, "expert %d: combo %f learned %f", e, sc[e], sl[e]);
	predict_score(c, 2, sc);
	for (int e = 0; e < 8; e++)
		cr_assert_float_eq(sc[e], 1.0f / (1.0f + expf(2.0f)), 1e-6);
	predict_destroy(c);
	predict_destroy(l);
	predict_model_free(m);
}

Test(predict, tokenid_uses_table)
{
	struct predict_model *m = small_model();
	struct predictor *p = mk("tokenid", 3, 8, 2, m);
	float s[8];
	predict_token(p, predict_token_key("hello"));
	predict_score(p, 0, s);
	/* 4 occurrences, shrink 2: 4/6 * table + 2/6 * prior(0.25). */
	cr_assert_float_eq(s[1], 4.0f / 6.0f * 1.0f + 2.0f / 6.0f * 0.25f, 1e-5);
	cr_assert_float_eq(s[0], 2.0f / 6.0f * 0.25f, 1e-5);
	predict_token(p, predict_token_key("unseen"));
	predict_score(p, 0, s);
	cr_assert_float_eq(s[1], 0.25f, 1e-6);
	predict_destroy(p);
	predict_model_free(m);
}

/* tracematch: 2 layers x 8 experts, three stored activation matrices.
 * EAM 0: layer 0 {0, 1}, layer 1 {2, 3}, at 0.5 (|EAM 0| = 1).
 * EAM 1: layer 0 {4, 5}, layer 1 {6, 7}, at 1.0 (|EAM 1| = 2).
 * EAM 2: layer 0 {0: 1.0, 1: 0.6, 2: 1.0, 3: 1.0}, layer 1 {4: 0.8} (|EAM 2| = 2):
 * its raw dot product with a stream that used {0, 1} (1.6) beats EAM 0's
 * (1.0), its cosine (0.8) does not (1.0). */
static struct predict_model *eam_model(void)
{
	struct predict_model *m;
	struct moe_error err;
	cr_assert_eq(predict_model_alloc(&m, 2, 8, 2, 16, 3, &err), 0, "%s", err.msg);
	for (size_t i = 0; i < 16; i++)
		m->tok_prior[i] = 0.01f * (float)(i + 1);
	float *e0 = m->eam, *e1 = m->eam + 16, *e2 = m->eam + 32;
	memset(m->eam, 0, 3 * 16 * sizeof(float));
	e0[0] = e0[1] = e0[8 + 2] = e0[8 + 3] = 0.5f;
	e1[4] = e1[5] = e1[8 + 6] = e1[8 + 7] = 1.0f;
	e2[0] = e2[2] = e2[3] = 1.0f;
	e2[1] = 0.6f;
	e2[8 + 4] = 0.8f;
	return m;
}

static void expect_row(const float *got, const float *want, const char *what)
{
	for (int e = 0; e < 8; e++)
		cr_assert_float_eq(got[e], want[e], 1e-7, "%s: expert %d scored %g, expected %g", what, e, got[e], want[e]);
}

Test(predict, tracematch_follows_the_stream)
{
	struct predict_model *m = eam_model();
	struct predictor *p = mk("tracematch", 2, 8, 2, m);
	float s[8];
	uint16_t p0[] = { 0, 1 }, p0b[] = { 2, 3 }, p1[] = { 4, 5 }, p1b[] = { 6, 7 };

	/* Nothing seen: the training prior of each layer. */
	predict_token(p, 1);
	predict_score(p, 0, s);
	expect_row(s, &m->tok_prior[0], "prior, layer 0");
	predict_score(p, 1, s);
	expect_row(s, &m->tok_prior[8], "prior, layer 1");
	/* Layer 0 used {4, 5}: EAM 1's layer-1 row. */
	predict_observe(p, 0, p1, 2);
	predict_score(p, 1, s);
	expect_row(s, &m->eam[16 + 8], "after {4, 5}");

	/* A new stream that uses {0, 1}: EAM 0 by cosine, although EAM 2's raw
	 * dot product is larger. */
	predict_reset(p);
	predict_token(p, 1);
	predict_score(p, 1, s);
	expect_row(s, &m->tok_prior[8], "a new stream starts from the prior");
	predict_observe(p, 0, p0, 2);
	predict_score(p, 1, s);
	expect_row(s, &m->eam[0 + 8], "after {0, 1}");

	/* The match is over the whole stream, not the current token: three
	 * tokens of pattern 0, then a token whose layer 0 is pattern 1 still
	 * matches EAM 0 (dot / |EAM| = 6, 1, 2.4 for EAM 0, 1, 2; |a| is common)... */
	predict_observe(p, 1, p0b, 2);
	for (int t = 0; t < 2; t++) {
		predict_token(p, 2);
		predict_observe(p, 0, p0, 2);
		predict_observe(p, 1, p0b, 2);
	}
	predict_token(p, 3);
	predict_observe(p, 0, p1, 2);
	predict_score(p, 1, s);
	expect_row(s, &m->eam[0 + 8], "three tokens of pattern 0, one of pattern 1");
	/* ...and enough tokens of pattern 1 move it to EAM 1: counts {0, 1,
	 * L1 2, 3} = 3, {4, 5} = 4, {L1 6, 7} = 3 -> 6, 7, 2.4. */
	predict_observe(p, 1, p1b, 2);
	for (int t = 0; t < 2; t++) {
		predict_token(p, 4);
		predict_observe(p, 0, p1, 2);
		predict_observe(p, 1, p1b, 2);
	}
	predict_token(p, 5);
	predict_observe(p, 0, p1, 2);
	predict_score(p, 1, s);
	expect_row(s, &m->eam[16 + 8], "pattern 1 now dominates");
	predict_destroy(p);
	predict_model_free(m);
}

/* A synthetic trace whose layer-1 expert is (layer-0 expert + 3) mod 8. */
static struct trace *synth(uint32_t tokens, uint32_t seed)
{
	size_t cap = 64 + (size_t)tokens * 2 * 40;
	char *csv = malloc(cap), *p = csv;
	struct trace *tr;
	struct moe_error err;
	uint32_t x = seed, *a = calloc(tokens, 4);
	p += sprintf(p, "Layer ID,Batch Number,Token,Activated Expert IDs\n");
	for (uint32_t t = 0; t < tokens; t++) {
		x = x * 1103515245u + 12345u;
		a[t] = (x >> 16) % 8;
	}
	for (uint32_t t = 0; t < tokens; t++)
		p += sprintf(p, "1,0,t%u,\"[%u]\"\n", a[t], a[t]);
	for (uint32_t t = 0; t < tokens; t++)
		p += sprintf(p, "2,0,t%u,\"[%u]\"\n", a[t], (a[t] + 3) % 8);
	cr_assert_eq(trace_parse(csv, (size_t)(p - csv), "synth", &tr, &err), 0, "%s", err.msg);
	free(csv);
	free(a);
	return tr;
}

Test(predict, train_learns_rule, .timeout = 60)
{
	struct trace *tr[4];
	struct predict_model *m;
	struct sim_train_opts o;
	struct moe_error err;
	for (int i = 0; i < 4; i++)
		tr[i] = synth(300, 7 + (uint32_t)i);
	sim_train_opts_default(&o);
	o.epochs = 3;
	o.n_eam = 2;
	o.min_token = 1;
	cr_assert_eq(sim_train(tr, 4, 3, 8, &o, &m, &err), 0, "%s", err.msg);
	struct predictor *p = mk("learned", 2, 8, 1, m);
	float s[8];
	for (uint16_t a = 0; a < 8; a++) {
		predict_token(p, 1);
		predict_observe(p, 0, &a, 1);
		predict_score(p, 1, s);
		for (int e = 0; e < 8; e++)
			if (e != (a + 3) % 8)
				cr_assert_gt(s[(a + 3) % 8], s[e], "layer 0 = %u: expert %d outranks %u", a, e, (a + 3) % 8);
	}
	predict_destroy(p);
	/* The token table knows that token "t5" routes to 5 at layer 0. */
	p = mk("tokenid", 2, 8, 1, m);
	predict_token(p, predict_token_key("t5"));
	predict_score(p, 0, s);
	for (int e = 0; e < 8; e++)
		if (e != 5)
			cr_assert_gt(s[5], s[e]);
	predict_destroy(p);
	predict_model_free(m);
	for (int i = 0; i < 4; i++)
		trace_free(tr[i]);
}

static struct trace *load_prompt(const char *dir, int n)
{
	char path[8192];
	struct trace *tr;
	struct moe_error err;
	snprintf(path, sizeof(path), "%.4000s/prompt_%d_data.csv", dir, n);
	cr_assert_eq(trace_load(path, &tr, &err), 0, "%s", err.msg);
	return tr;
}

Test(predict, real_traces_learned_beats_baseline, .timeout = 240)
{
	const char *dir = tu_traces_dir();
	if (!dir)
		cr_skip_test("no MoE-Beyond traces under MOETIER_SHARED");
	struct trace *tr[20];
	for (int i = 0; i < 20; i++)
		tr[i] = load_prompt(dir, i + 1);
	struct predict_model *m;
	struct sim_train_opts o;
	struct moe_error err;
	sim_train_opts_default(&o);
	o.epochs = 1;
	o.n_eam = 4;
	cr_assert_eq(sim_train(tr, 15, 12, 64, &o, &m, &err), 0, "%s", err.msg);
	struct sim_config c;
	struct sim_stats base = { 0 }, pred = { 0 };
	sim_config_default(&c);
	c.timed = false;
	for (int v = 0; v < 2; v++) {
		struct sim *s;
		c.predictor = v ? "learned" : NULL;
		c.model = m;
		c.pf.h_fixed = 1;
		c.pf.max_per_layer = 6;
		c.pf.gain = 0.15f;
		cr_assert_eq(sim_create(&c, tr[0]->n_layers, 64, 6, &s, &err), 0, "%s", err.msg);
		for (int i = 15; i < 20; i++)
			cr_assert_eq(sim_run_trace(s, tr[i], &err), 0, "%s", err.msg);
		*(v ? &pred : &base) = *sim_stats(s);
		sim_destroy(s);
	}
	cr_assert_gt(sim_hit_rate(&pred), sim_hit_rate(&base) + 0.02, "learned %.3f vs no prefetch %.3f",
		     sim_hit_rate(&pred), sim_hit_rate(&base));
	predict_model_free(m);
	for (int i = 0; i < 20; i++)
		trace_free(tr[i]);
}
