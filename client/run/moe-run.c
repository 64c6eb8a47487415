/* moe-run - decodes a MoE model from a .moepack: the dense parts computed
 * here, the routed experts served by moetierd through libmoetier (or all
 * read into memory with --local). See moe-run(1). */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "experts.h"
#include "model.h"
#include "predict.h"
#include "runner.h"
#include "sampler.h"
#include "tokenizer.h"

struct opts {
	const char *pack, *gguf, *socket, *prompt, *tokens, *feed, *ppl, *dump;
	const char *dump_routing, *dump_argmax, *sim_policy, *pregate_fit, *route_calib, *dump_hidden;
	double pregate_ridge;
	bool local, quiet, kv_f16, ids;
	unsigned prefetch; /* layers ahead to hint, 0 none */
	bool pf_pregate;   /* --prefetch pregate */
	bool pregate_out;  /* --pregate-from output */
	bool route_daemon; /* --route-via daemon */
	unsigned pregate;  /* --pregate H */
	int rule;          /* --route RULE (-1: from --route-keep: margin, else exact) */
	uint32_t keep, sim_cache, sim_pct;
	double margin, share;
	int weights;       /* -1: the rule's */
	uint32_t n_predict, ctx, batch;
	int threads;
	enum experts_gpu_mode gpu; /* --gpu */
	struct sampler_params sp;
};

static void usage(FILE *f)
{
	fputs("Usage: moe-run PACK [--socket S | --local] [--gguf FILE]\n"
	      "               [--prompt TEXT | --tokens IDS [--feed IDS]] [-n N] [-t N] [--batch N]\n"
	      "               [--temp T] [--top-k K] [--top-p P] [--seed S]\n"
	      "               [--ppl FILE [--ctx N]] [--dump-logits FILE] [--kv-f16]\n"
	      "               [--prefetch [router|pregate] | --prefetch-depth N] [--pregate H]\n"
	      "               [--pregate-from attention|output] [--pregate-fit FILE [--pregate-ridge R]]\n"
	      "               [--route exact|margin|low-weight] [--route-keep J] [--route-margin M]\n"
	      "               [--route-share S] [--route-weights family|renorm|inherit] [--route-via local|daemon]\n"
	      "               [--sim-cache C|P%] [--sim-policy P] [--dump-routing FILE] [--dump-argmax FILE]\n"
	      "               [--dump-hidden FILE]\n"
	      "               [--gpu[=auto|on|off]] [--ids] [--quiet]\n"
	      "  IDS: comma-separated token ids, or @FILE holding them\n"
	      "       moe-run --help | --version\n"
	      "See moe-run(1).\n",
	      f);
}

static int parse_num(const char *opt, const char *s, double lo, double hi, double *out)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (errno || end == s || *end || !(v >= lo && v <= hi)) {
		fprintf(stderr, "moe-run: bad value '%s' for %s\n", s, opt);
		return -EINVAL;
	}
	*out = v;
	return 0;
}

static int read_file(const char *path, char **out, size_t *len);

/* IDS: "1,2,3" (commas or blanks), or @FILE holding such a list. */
static int parse_ids(const char *opt, const char *s, int32_t **ids, size_t *n)
{
	char *text = NULL;
	if (*s == '@') {
		size_t len;
		int rc = read_file(s + 1, &text, &len);
		if (rc) {
			fprintf(stderr, "moe-run: %s %s: %s\n", opt, s + 1, strerror(-rc));
			return rc;
		}
		char *t = realloc(text, len + 1);
		if (!t) {
			free(text);
			return -ENOMEM;
		}
		text = t;
		text[len] = '\0';
		for (size_t i = 0; i < len; i++)
			if (text[i] == '\n' || text[i] == '\r' || text[i] == '\t')
				text[i] = ' ';
		s = text;
		while (*s == ' ')
			s++;
	}
	int rc = 0;
	size_t cap = 16, k = 0;
	int32_t *v = malloc(cap * sizeof(*v));
	if (!v) {
		free(text);
		return -ENOMEM;
	}
	while (*s) {
		char *end;
		errno = 0;
		long x = strtol(s, &end, 10);
		if (errno || end == s || x < 0 || x > INT32_MAX || (*end && *end != ',' && *end != ' ')) {
			fprintf(stderr, "moe-run: %s wants comma-separated ids, got '%.40s'\n", opt, s);
			rc = -EINVAL;
			goto fail;
		}
		if (k == cap) {
			int32_t *nv = realloc(v, (cap *= 2) * sizeof(*v));
			if (!nv) {
				rc = -ENOMEM;
				goto fail;
			}
			v = nv;
		}
		v[k++] = (int32_t)x;
		s = end;
		while (*s == ',' || *s == ' ')
			s++;
	}
	if (!k) {
		fprintf(stderr, "moe-run: %s is empty\n", opt);
		rc = -EINVAL;
		goto fail;
	}
	free(text);
	*ids = v;
	*n = k;
	return 0;
fail:
	free(v);
	free(text);
	return rc;
}

static int read_file(const char *path, char **out, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return -errno;
	size_t cap = 1 << 16, n = 0;
	char *b = malloc(cap);
	while (b) {
		size_t r = fread(b + n, 1, cap - n, f);
		n += r;
		if (n < cap)
			break;
		char *nb = realloc(b, cap *= 2);
		if (!nb)
			free(b);
		b = nb;
	}
	int rc = ferror(f) ? -EIO : 0;
	fclose(f);
	if (!b)
		return -ENOMEM;
	if (rc) {
		free(b);
		return rc;
	}
	*out = b;
	*len = n;
	return 0;
}

/* The logits file of run-interfaces.md: "MOELGT01", u32 n_tokens, u32 n_vocab, f32 rows. */
static int write_logits(const char *path, const float *rows, uint32_t n, uint32_t vocab)
{
	FILE *f = fopen(path, "wb");
	if (!f)
		return -errno;
	uint32_t hdr[2] = { n, vocab };
	int ok = fwrite("MOELGT01", 1, 8, f) == 8 && fwrite(hdr, 4, 2, f) == 2 &&
		 fwrite(rows, sizeof(float) * vocab, n, f) == n;
	if (fclose(f) || !ok)
		return -EIO;
	return 0;
}

struct ctx {
	struct opts o;
	struct model *m;
	struct experts *ex;
	struct runner *r;
	struct tokenizer *tok;
	uint64_t prefill_tokens, prefill_ns, decode_tokens, decode_ns;
	struct experts_stats at_decode; /* the counters when decoding began */
	bool decoding;
	int rule_kind;
	struct route_cache_rule rule;
	uint32_t sim_slots;
};

static uint32_t token_key(void *p, int32_t id)
{
	struct ctx *c = p;
	char buf[256];
	int n = tokenizer_piece(c->tok, id, buf, sizeof(buf));
	if (n < 0)
		return 0;
	buf[n < (int)sizeof(buf) ? n : (int)sizeof(buf) - 1] = '\0';
	return predict_token_key(buf);
}

static void put_piece(struct ctx *c, int32_t id, bool first)
{
	char buf[256];
	if (c->o.ids) {
		printf(first ? "%d" : ",%d", id);
		fflush(stdout);
		return;
	}
	int n = c->tok ? tokenizer_piece(c->tok, id, buf, sizeof(buf)) : -1;
	if (n >= 0)
		fwrite(buf, 1, (size_t)n, stdout);
	else
		printf(" [%d]", id);
	fflush(stdout);
}

static int feed(struct ctx *c, const int32_t *ids, uint32_t n, float *logits, bool all, bool prefill,
		struct moe_error *err)
{
	if (!prefill && !c->decoding) {
		/* before the first decode step: the bench line's decode-only
		 * counters are the difference from here */
		experts_get_stats(c->ex, &c->at_decode);
		c->decoding = true;
	}
	uint64_t t0 = moe_now_ns();
	int rc = runner_feed(c->r, ids, n, logits, all, err);
	uint64_t dt = moe_now_ns() - t0;
	if (prefill) {
		c->prefill_tokens += n;
		c->prefill_ns += dt;
	} else {
		c->decode_tokens += n;
		c->decode_ns += dt;
	}
	return rc;
}

/* --prompt / --tokens then -n tokens sampled, streamed out. */
static int generate(struct ctx *c, const int32_t *ids, size_t n, struct moe_error *err)
{
	const uint32_t V = c->m->n_vocab;
	float *logits = malloc((size_t)V * sizeof(float));
	struct sampler *s = NULL;
	int rc;
	if (!logits)
		return moe_error_set(err, -ENOMEM, "out of memory");
	if ((rc = sampler_init(&s, &c->o.sp, V))) {
		free(logits);
		return moe_error_set(err, rc, "sampler: %d", rc);
	}
	if (c->o.ids)
		; /* only the generated ids */
	else if (c->tok && c->o.prompt)
		printf("%s", c->o.prompt);
	else
		for (size_t i = 0; i < n; i++)
			if (!c->tok || (ids[i] != tokenizer_bos(c->tok) && !tokenizer_is_eog(c->tok, ids[i])))
				put_piece(c, ids[i], false);
	fflush(stdout);
	if ((rc = feed(c, ids, (uint32_t)n, logits, false, true, err)))
		goto out;
	for (uint32_t i = 0; i < c->o.n_predict; i++) {
		int32_t id = sampler_sample(s, logits);
		if (c->tok && tokenizer_is_eog(c->tok, id))
			break;
		put_piece(c, id, i == 0);
		if (i + 1 == c->o.n_predict)
			break;
		if ((rc = feed(c, &id, 1, logits, false, false, err)))
			goto out;
	}
	printf("\n");
out:
	sampler_free(s);
	free(logits);
	return rc;
}

/* --tokens with --dump-logits and/or --feed: the prompt in batched passes
 * (every position's logits with --dump-logits), then each --feed id alone
 * through a full decode step (its logits computed, nothing sampled), counted
 * as decode; the logits file covers the prompt and the fed ids. */
static int teacher_forced(struct ctx *c, const int32_t *ids, size_t n, const int32_t *fids, size_t nf,
			  struct moe_error *err)
{
	const size_t V = c->m->n_vocab, rows = c->o.dump ? n + nf : 1;
	float *logits = malloc(rows * V * sizeof(float));
	int rc;
	if (!logits)
		return moe_error_set(err, -ENOMEM, "logits of %zu tokens: out of memory", rows);
	rc = feed(c, ids, (uint32_t)n, logits, c->o.dump != NULL, true, err);
	for (size_t i = 0; i < nf && !rc; i++)
		rc = feed(c, fids + i, 1, c->o.dump ? logits + (n + i) * V : logits, false, false, err);
	if (!rc && c->o.dump && (rc = write_logits(c->o.dump, logits, (uint32_t)(n + nf), (uint32_t)V)))
		moe_error_set(err, rc, "%s: %s", c->o.dump, strerror(-rc));
	free(logits);
	return rc;
}

static void progress(size_t done, size_t total, double nll, size_t cnt)
{
	int w = 40, fill = total ? (int)(w * done / total) : w;
	fprintf(stderr, "\r[%.*s%*s] %zu/%zu chunks  ppl %.4f", fill, "========================================",
		w - fill, "", done, total, cnt ? exp(nll / (double)cnt) : 0.0);
	fflush(stderr);
}

/* --ppl FILE: run-interfaces.md's definition. */
static int perplexity(struct ctx *c, struct moe_error *err)
{
	char *text = NULL;
	size_t len = 0, n = 0;
	int32_t *ids = NULL;
	int rc = read_file(c->o.ppl, &text, &len);
	if (rc)
		return moe_error_set(err, rc, "%s: %s", c->o.ppl, strerror(-rc));
	rc = tokenizer_encode(c->tok, text, len, false, false, &ids, &n, err);
	free(text);
	if (rc)
		return rc;
	const uint32_t ctx = c->o.ctx, V = c->m->n_vocab;
	size_t chunks = n / ctx;
	if (!chunks) {
		free(ids);
		return moe_error_set(err, -EINVAL, "%s: %zu tokens, fewer than one chunk of %u", c->o.ppl, n, ctx);
	}
	float *logits = malloc((size_t)ctx * V * sizeof(float));
	if (!logits) {
		free(ids);
		return moe_error_set(err, -ENOMEM, "out of memory");
	}
	bool bar = !c->o.quiet && isatty(STDERR_FILENO);
	double nll = 0.0;
	size_t cnt = 0;
	FILE *am = NULL;
	if (c->o.dump_argmax && !(am = fopen(c->o.dump_argmax, "w"))) {
		rc = moe_error_set(err, -errno, "%s: %s", c->o.dump_argmax, strerror(errno));
		free(logits);
		free(ids);
		return rc;
	}
	for (size_t ch = 0; ch < chunks && !rc; ch++) {
		const int32_t *t = ids + ch * ctx;
		runner_reset(c->r);
		if ((rc = feed(c, t, ctx, logits, true, true, err)))
			break;
		for (uint32_t i = 0; i + 1 < ctx; i++) {
			/* log-softmax of row i at the next token, in double */
			const float *row = logits + (size_t)i * V;
			double max = -INFINITY, sum = 0.0;
			uint32_t best = 0;
			for (uint32_t v = 0; v < V; v++)
				if (row[v] > max) {
					max = row[v];
					best = v;
				}
			if (am)
				fprintf(am, "%u\n", best);
			for (uint32_t v = 0; v < V; v++)
				sum += exp((double)row[v] - max);
			nll -= (double)row[t[i + 1]] - max - log(sum);
			cnt++;
		}
		if (bar)
			progress(ch + 1, chunks, nll, cnt);
	}
	if (bar)
		fputc('\n', stderr);
	if (am && fclose(am) && !rc)
		rc = moe_error_set(err, -EIO, "%s: write failed", c->o.dump_argmax);
	if (!rc)
		printf("ppl: %.4f over %zu tokens (%zu chunks of %u)\n", exp(nll / (double)cnt), cnt, chunks, ctx);
	free(logits);
	free(ids);
	return rc;
}

/* The machine-readable line (bench/decode-vs-llamacpp reads it): rates, and
 * the expert counters of the decode steps alone (the whole run when nothing
 * was decoded). hit_host and miss are shares of the acquires, 0-1. */
static void bench_line(struct ctx *c, const struct experts_stats *st)
{
	const struct experts_stats *a = &c->at_decode;
	double pf = c->prefill_ns ? c->prefill_tokens / (c->prefill_ns * 1e-9) : 0.0;
	double dc = c->decode_ns ? c->decode_tokens / (c->decode_ns * 1e-9) : 0.0;
	uint64_t hh = st->hits_host - a->hits_host, mi = st->misses - a->misses;
	uint64_t u = hh + (st->hits_gpu - a->hits_gpu) + mi, nd = c->decode_tokens;
	double hit = st->local ? 1.0 : u ? (double)hh / u : 0.0, miss = st->local || !u ? 0.0 : (double)mi / u;
	uint64_t rd = st->bytes_read >= a->bytes_read ? st->bytes_read - a->bytes_read : 0;
	fprintf(stderr,
		"moe-run: bench prefill_tps=%.3f decode_tps=%.3f n_prefill=%" PRIu64 " n_decode=%" PRIu64
		" hit_host=%.4f miss=%.4f read_decode_bytes_per_tok=%" PRIu64 " stall_decode_ms_per_tok=%.4f"
		" resident_bytes=%" PRIu64 " kv_bytes=%" PRIu64 " threads=%d\n",
		pf, dc, c->prefill_tokens, nd, hit, miss, nd ? rd / nd : 0,
		nd ? (st->stall_ns - a->stall_ns) * 1e-6 / nd : 0.0, c->m->resident_bytes, runner_kv_bytes(c->r),
		c->o.threads);
}

/* Routing, simulated cache and pre-gating: one human line each, then the
 * machine-readable "moe-run: fidelity" line bench/fidelity reads. */
static void fidelity_lines(struct ctx *c, const struct experts_stats *st)
{
	const struct route_counters *r = &st->route;
	const double subst = r->slots ? (double)r->substitutions / (double)r->slots : 0.0;
	const double hit = st->sim_accesses ? (double)st->sim_hits / (double)st->sim_accesses : 0.0;
	double rec[EXPERTS_PREGATE_MAX], rec2[EXPERTS_PREGATE_MAX];
	const uint32_t k = c->m->top_k;
	if (c->rule_kind != ROUTE_RULE_EXACT)
		fprintf(stderr,
			"moe-run: routing: cache-aware %s, keep %u, margin %g, share %g, weights %s: %.2f%% of slots "
			"substituted (%" PRIu64 " of %" PRIu64 " open slots)\n",
			route_rule_name((enum route_rule)c->rule_kind), c->rule.keep_top, (double)c->rule.margin,
			(double)c->rule.max_share,
			c->rule.weights == ROUTE_WEIGHTS_RENORM    ? "renorm"
			: c->rule.weights == ROUTE_WEIGHTS_INHERIT ? "inherit"
								   : "family",
			100.0 * subst, r->substitutions, r->slots_open);
	if (st->sim)
		fprintf(stderr,
			"moe-run: simulated cache (%u slots per layer, %s): hit rate %.2f%% of %" PRIu64
			" expert accesses; %" PRIu64 " prefetched, %" PRIu64 " of them used\n",
			c->sim_slots, c->o.sim_policy ? c->o.sim_policy : "lru", 100.0 * hit, st->sim_accesses,
			st->sim_prefetches, st->sim_prefetch_used);
	for (unsigned d = 0; d < EXPERTS_PREGATE_MAX; d++) {
		uint64_t n = st->pg_tokens[d] * k;
		rec[d] = n ? (double)st->pg_hits[d] / (double)n : 0.0;
		rec2[d] = n ? (double)st->pg_hits2[d] / (double)n : 0.0;
		if (st->pg_tokens[d])
			fprintf(stderr,
				"moe-run: pre-gating %u layer%s ahead: recall@%u %.4f, recall@%u %.4f (%" PRIu64
				" token-layers)\n",
				d + 1, d ? "s" : "", k, rec[d], 2 * k, rec2[d], st->pg_tokens[d]);
	}
	for (unsigned d = 0; d < EXPERTS_PREGATE_MAX; d++)
		if (st->pg_embed_tokens[d])
			fprintf(stderr, "moe-run: pre-gating layer %u from the embedding: recall@%u %.4f (%" PRIu64 " tokens)\n",
				d, k, (double)st->pg_embed_hits[d] / (double)(st->pg_embed_tokens[d] * k),
				st->pg_embed_tokens[d]);
	fprintf(stderr,
		"moe-run: fidelity rule=%s slots=%" PRIu64 " subst=%.6f sim_hit=%.6f sim_accesses=%" PRIu64
		" pg1=%.6f pg1_2k=%.6f pg2=%.6f pg2_2k=%.6f\n",
		route_rule_name((enum route_rule)c->rule_kind), r->slots, subst, hit, st->sim_accesses, rec[0], rec2[0],
		rec[1], rec2[1]);
}

static void summary(struct ctx *c)
{
	struct experts_stats st;
	fflush(stdout);
	experts_get_stats(c->ex, &st);
	fidelity_lines(c, &st);
	uint64_t toks = c->prefill_tokens + c->decode_tokens;
	double pf = c->prefill_ns ? c->prefill_tokens / (c->prefill_ns * 1e-9) : 0.0;
	double dc = c->decode_ns ? c->decode_tokens / (c->decode_ns * 1e-9) : 0.0;
	fprintf(stderr, "moe-run: prefill %" PRIu64 " tokens %.1f tok/s, decode %" PRIu64 " tokens %.1f tok/s (%d thread%s)\n",
		c->prefill_tokens, pf, c->decode_tokens, dc, c->o.threads, c->o.threads == 1 ? "" : "s");
	if (st.local) {
		fprintf(stderr, "moe-run: experts: %" PRIu64 " computed, all resident (--local, host memory)\n", st.uses);
		bench_line(c, &st);
		return;
	}
	uint64_t u = st.hits_host + st.hits_gpu + st.misses;
	double pct = u ? 100.0 / u : 0.0;
	char b[32];
	fprintf(stderr,
		"moe-run: experts: %" PRIu64 " acquired, hit rate host %.1f%% gpu %.1f%%, missed %.1f%%; %" PRIu64
		" prefetch hints (%.1f%% then chosen)\n",
		u, st.hits_host * pct, st.hits_gpu * pct, st.misses * pct, st.prefetches,
		st.prefetches ? 100.0 * st.prefetches_used / st.prefetches : 0.0);
	fprintf(stderr, "moe-run: stall %.3f ms/token (%" PRIu64 " waits), NVMe read %s/token",
		toks ? st.stall_ns * 1e-6 / toks : 0.0, st.waits,
		moe_fmt_size(toks ? st.bytes_read / toks : 0, b, sizeof(b)));
	if (st.fallback_reads)
		fprintf(stderr, ", %" PRIu64 " experts read from the pack by moe-run", st.fallback_reads);
	fputc('\n', stderr);
	if (st.gpu)
		fprintf(stderr,
			"moe-run: GPU compute: %" PRIu64 " experts, %" PRIu64 " token-expert pairs on the device, "
			"%.3f ms device time, %.3f ms waited for it (%.3f ms/token; %" PRIu64 " arena exports fetched)\n",
			st.gpu_experts, st.gpu_pairs, st.gpu_device_ns * 1e-6, st.gpu_wait_ns * 1e-6,
			toks ? st.gpu_device_ns * 1e-6 / toks : 0.0, st.gpu_exports);
	bench_line(c, &st);
}

enum { O_SOCKET = 256, O_LOCAL, O_GGUF, O_PROMPT, O_TOKENS, O_FEED, O_TEMP, O_TOPK, O_TOPP, O_SEED, O_PPL, O_CTX, O_DUMP,
       O_QUIET, O_BATCH, O_NOPF, O_PF, O_PFD, O_KVF16, O_IDS, O_HELP, O_VERSION, O_DUMPR, O_DUMPA, O_PREGATE, O_ROUTE,
       O_RKEEP, O_RMARGIN, O_RSHARE, O_RWEIGHTS, O_SIMC, O_SIMP, O_PGFROM, O_PGFIT, O_PGRIDGE, O_RVIA, O_RCALIB, O_DUMPH, O_GPU };

static int parse(int argc, char **argv, struct opts *o)
{
	static const struct option lo[] = {
		{ "socket", required_argument, 0, O_SOCKET }, { "local", no_argument, 0, O_LOCAL },
		{ "gguf", required_argument, 0, O_GGUF },     { "prompt", required_argument, 0, O_PROMPT },
		{ "tokens", required_argument, 0, O_TOKENS }, { "temp", required_argument, 0, O_TEMP },
		{ "feed", required_argument, 0, O_FEED },
		{ "top-k", required_argument, 0, O_TOPK },    { "top-p", required_argument, 0, O_TOPP },
		{ "seed", required_argument, 0, O_SEED },     { "ppl", required_argument, 0, O_PPL },
		{ "ctx", required_argument, 0, O_CTX },       { "dump-logits", required_argument, 0, O_DUMP },
		{ "quiet", no_argument, 0, O_QUIET },         { "batch", required_argument, 0, O_BATCH },
		{ "no-prefetch", no_argument, 0, O_NOPF },    { "prefetch", no_argument, 0, O_PF },
		{ "prefetch-depth", required_argument, 0, O_PFD },    { "kv-f16", no_argument, 0, O_KVF16 },
		{ "ids", no_argument, 0, O_IDS },    { "help", no_argument, 0, O_HELP },
		{ "version", no_argument, 0, O_VERSION },
		{ "dump-routing", required_argument, 0, O_DUMPR }, { "dump-argmax", required_argument, 0, O_DUMPA },
		{ "dump-hidden", required_argument, 0, O_DUMPH }, { "gpu", optional_argument, 0, O_GPU },
		{ "pregate", required_argument, 0, O_PREGATE }, { "route", required_argument, 0, O_ROUTE },
		{ "route-keep", required_argument, 0, O_RKEEP }, { "route-margin", required_argument, 0, O_RMARGIN },
		{ "route-share", required_argument, 0, O_RSHARE }, { "route-weights", required_argument, 0, O_RWEIGHTS },
		{ "pregate-fit", required_argument, 0, O_PGFIT }, { "pregate-ridge", required_argument, 0, O_PGRIDGE },
		{ "pregate-from", required_argument, 0, O_PGFROM }, { "route-via", required_argument, 0, O_RVIA },
		{ "route-calib", required_argument, 0, O_RCALIB }, { "sim-cache", required_argument, 0, O_SIMC }, { "sim-policy", required_argument, 0, O_SIMP },
		{ 0, 0, 0, 0 },
	};
	double v;
	int ch;
	memset(o, 0, sizeof(*o));
	o->n_predict = 32;
	o->threads = 1;
	o->batch = 64;
	o->sp.temperature = 0.0f;
	o->sp.top_k = 40;
	o->sp.top_p = 0.95f;
	o->sp.seed = 1;
	o->rule = -1;
	o->weights = -1;
	o->margin = 1.0;
	o->share = -1.0;
	o->pregate_ridge = 0.1;
	while ((ch = getopt_long(argc, argv, "n:t:q", lo, NULL)) != -1) {
		switch (ch) {
		case O_SOCKET: o->socket = optarg; break;
		case O_LOCAL: o->local = true; break;
		case O_GGUF: o->gguf = optarg; break;
		case O_PROMPT: o->prompt = optarg; break;
		case O_TOKENS: o->tokens = optarg; break;
		case O_FEED: o->feed = optarg; break;
		case O_PPL: o->ppl = optarg; break;
		case O_DUMP: o->dump = optarg; break;
		case O_QUIET: case 'q': o->quiet = true; break;
		case O_NOPF: o->prefetch = 0; break;
		case O_PF: {
			/* --prefetch, --prefetch=MODE or --prefetch MODE */
			const char *mode = optarg;
			if (!mode && optind < argc &&
			    (!strcmp(argv[optind], "router") || !strcmp(argv[optind], "pregate")))
				mode = argv[optind++];
			if (!mode || !strcmp(mode, "router")) {
				o->prefetch = o->prefetch ? o->prefetch : 1;
			} else if (!strcmp(mode, "pregate")) {
				o->pf_pregate = true;
			} else {
				fprintf(stderr, "moe-run: --prefetch router|pregate, not '%s'\n", mode);
				return 2;
			}
			break;
		}
		case O_DUMPR: o->dump_routing = optarg; break;
		case O_DUMPH: o->dump_hidden = optarg; break;
		case O_GPU:
			/* --gpu alone: on */
			if (!optarg || !strcmp(optarg, "on"))
				o->gpu = EXPERTS_GPU_ON;
			else if (!strcmp(optarg, "auto"))
				o->gpu = EXPERTS_GPU_AUTO;
			else if (!strcmp(optarg, "off"))
				o->gpu = EXPERTS_GPU_OFF;
			else {
				fprintf(stderr, "moe-run: --gpu=auto|on|off, not '%s'\n", optarg);
				return 2;
			}
			break;
		case O_PGFIT: o->pregate_fit = optarg; break;
		case O_RCALIB: o->route_calib = optarg; break;
		case O_RVIA:
			if (strcmp(optarg, "local") && strcmp(optarg, "daemon")) {
				fprintf(stderr, "moe-run: --route-via local|daemon, not '%s'\n", optarg);
				return 2;
			}
			o->route_daemon = !strcmp(optarg, "daemon");
			break;
		case O_PGRIDGE:
			if (parse_num("--pregate-ridge", optarg, 1e-9, 1e9, &v))
				return 2;
			o->pregate_ridge = v;
			break;
		case O_PGFROM:
			if (strcmp(optarg, "attention") && strcmp(optarg, "output")) {
				fprintf(stderr, "moe-run: --pregate-from attention|output, not '%s'\n", optarg);
				return 2;
			}
			o->pregate_out = !strcmp(optarg, "output");
			break;
		case O_DUMPA: o->dump_argmax = optarg; break;
		case O_SIMP: o->sim_policy = optarg; break;
		case O_PREGATE:
			if (parse_num("--pregate", optarg, 0, EXPERTS_PREGATE_MAX, &v))
				return 2;
			o->pregate = (unsigned)v;
			break;
		case O_ROUTE:
			if ((o->rule = route_rule_parse(optarg)) < 0) {
				fprintf(stderr, "moe-run: --route exact|margin|low-weight|similarity, not '%s'\n", optarg);
				return 2;
			}
			break;
		case O_RKEEP:
			if (parse_num("--route-keep", optarg, 1, ROUTE_MAX_K, &v))
				return 2;
			o->keep = (uint32_t)v;
			break;
		case O_RMARGIN:
			if (parse_num("--route-margin", optarg, 0, INFINITY, &v))
				return 2;
			o->margin = v;
			break;
		case O_RSHARE:
			if (parse_num("--route-share", optarg, 1e-6, 1, &v))
				return 2;
			o->share = v;
			break;
		case O_RWEIGHTS:
			if (!strcmp(optarg, "family"))
				o->weights = ROUTE_WEIGHTS_FAMILY;
			else if (!strcmp(optarg, "renorm"))
				o->weights = ROUTE_WEIGHTS_RENORM;
			else if (!strcmp(optarg, "inherit"))
				o->weights = ROUTE_WEIGHTS_INHERIT;
			else {
				fprintf(stderr, "moe-run: --route-weights family|renorm|inherit, not '%s'\n", optarg);
				return 2;
			}
			break;
		case O_SIMC: {
			size_t l = strlen(optarg);
			bool pct = l && optarg[l - 1] == '%';
			char num[32];
			snprintf(num, sizeof(num), "%.*s", (int)(pct ? l - 1 : l), optarg);
			if (parse_num("--sim-cache", num, 1, pct ? 100 : 65536, &v))
				return 2;
			if (pct)
				o->sim_pct = (uint32_t)v;
			else
				o->sim_cache = (uint32_t)v;
			break;
		}
		case O_PFD:
			if (parse_num("--prefetch-depth", optarg, 0, 64, &v))
				return 2;
			o->prefetch = (unsigned)v;
			break;
		case O_KVF16: o->kv_f16 = true; break;
		case O_IDS: o->ids = true; break;
		case 'n':
			if (parse_num("-n", optarg, 0, 1 << 24, &v))
				return 2;
			o->n_predict = (uint32_t)v;
			break;
		case 't':
			if (parse_num("-t", optarg, 1, 256, &v))
				return 2;
			o->threads = (int)v;
			break;
		case O_BATCH:
			if (parse_num("--batch", optarg, 1, 65536, &v))
				return 2;
			o->batch = (uint32_t)v;
			break;
		case O_CTX:
			if (parse_num("--ctx", optarg, 2, 1 << 20, &v))
				return 2;
			o->ctx = (uint32_t)v;
			break;
		case O_TEMP:
			if (parse_num("--temp", optarg, 0, 100, &v))
				return 2;
			o->sp.temperature = (float)v;
			break;
		case O_TOPK:
			if (parse_num("--top-k", optarg, 0, 1 << 24, &v))
				return 2;
			o->sp.top_k = (int)v;
			break;
		case O_TOPP:
			if (parse_num("--top-p", optarg, 0, 1, &v))
				return 2;
			o->sp.top_p = (float)v;
			break;
		case O_SEED:
			if (parse_num("--seed", optarg, 0, 1.8e19, &v))
				return 2;
			o->sp.seed = (uint64_t)v;
			break;
		case O_HELP: usage(stdout); exit(0);
		case O_VERSION: printf("moe-run %s\n", PACKAGE_VERSION); exit(0);
		default: usage(stderr); return 2;
		}
	}
	if (optind + 1 != argc) {
		usage(stderr);
		return 2;
	}
	o->pack = argv[optind];
	int modes = !!o->prompt + !!o->tokens + !!o->ppl;
	if (modes != 1) {
		fprintf(stderr, "moe-run: give one of --prompt, --tokens, --ppl\n");
		return 2;
	}
	if (o->feed && !o->tokens) {
		fprintf(stderr, "moe-run: --feed goes with --tokens (the prompt it follows)\n");
		return 2;
	}
	if (o->dump && !o->tokens) {
		fprintf(stderr, "moe-run: --dump-logits goes with --tokens (teacher-forced)\n");
		return 2;
	}
	if (o->rule == ROUTE_RULE_SIMILARITY && !o->route_calib) {
		fprintf(stderr, "moe-run: --route similarity needs --route-calib FILE (the text the experts' "
				"similarity is measured on)\n");
		return 2;
	}
	if (o->dump_argmax && !o->ppl) {
		fprintf(stderr, "moe-run: --dump-argmax goes with --ppl\n");
		return 2;
	}
	if (o->local && o->socket) {
		fprintf(stderr, "moe-run: --local and --socket exclude each other\n");
		return 2;
	}
	if (o->local && o->gpu == EXPERTS_GPU_ON) {
		fprintf(stderr, "moe-run: --gpu=on computes the daemon's GPU tier: not with --local\n");
		return 2;
	}
	return 0;
}

/* The routing rule and what the run measures (experts_configure). */
static int configure_experts(struct ctx *c, struct moe_error *err)
{
	const struct opts *o = &c->o;
	struct experts_opts eo = { .sim_policy = o->sim_policy, .pregate = o->pregate,
				   .pregate_prefetch = o->pf_pregate,
				   .pregate_out = o->pregate_out, .route_daemon = o->route_daemon, .dump = o->dump_routing != NULL };
	const uint32_t k = c->m->top_k, E = c->m->n_experts;
	int kind = o->rule >= 0 ? o->rule : o->keep ? ROUTE_RULE_MARGIN : ROUTE_RULE_EXACT;
	/* default J: the router's better half always kept */
	route_cache_rule_init(&eo.rule, (enum route_rule)kind, o->keep ? o->keep : (k + 1) / 2, (float)o->margin);
	if (kind == ROUTE_RULE_EXACT)
		eo.rule.keep_top = 0;
	if (o->share > 0)
		eo.rule.max_share = (float)o->share;
	if (o->weights >= 0)
		eo.rule.weights = (uint32_t)o->weights;
	eo.sim_cache = o->sim_cache;
	if (o->sim_pct)
		eo.sim_cache = MOE_MAX(k, (uint32_t)((uint64_t)E * o->sim_pct / 100));
	c->rule_kind = kind;
	eo.route_kind = kind;
	c->sim_slots = eo.sim_cache;
	c->rule = eo.rule;
	return experts_configure(c->ex, &eo, err);
}

/* --pregate-fit FILE: the text teacher-forced in chunks of the context,
 * the pre-gating maps fitted on it (experts_pregate_fit_*), then the run's
 * own configuration again (fresh counters and simulated cache). */
static int calibrate(struct ctx *c, const char *file, bool fit, bool sim, uint32_t n_ctx, struct moe_error *err)
{
	struct experts_opts co = { .pregate = fit ? (c->o.pregate ? c->o.pregate : 1) : 0,
				   .pregate_out = c->o.pregate_out };
	char *text = NULL;
	size_t len = 0, n = 0;
	int32_t *ids = NULL;
	int rc;
	if (!c->tok)
		return moe_error_set(err, -EINVAL, "%s: calibration needs the model's tokenizer", file);
	if ((rc = read_file(file, &text, &len)))
		return moe_error_set(err, rc, "%s: %s", file, strerror(-rc));
	rc = tokenizer_encode(c->tok, text, len, false, false, &ids, &n, err);
	free(text);
	if (rc)
		return rc;
	const uint32_t chunk = MOE_MIN(n_ctx, 128u);
	if ((rc = experts_configure(c->ex, &co, err)) || (fit && (rc = experts_pregate_fit_begin(c->ex, err))) ||
	    (sim && (rc = experts_similarity_begin(c->ex, 512, err))))
		goto out;
	for (size_t at = 0; at + chunk <= n && !rc; at += chunk) {
		runner_reset(c->r);
		rc = runner_feed(c->r, ids + at, chunk, NULL, false, err);
	}
	runner_reset(c->r);
	if (!rc && fit && (rc = experts_pregate_fit_end(c->ex, c->o.pregate_ridge, err)) == 0 && !c->o.quiet)
		fprintf(stderr, "moe-run: pre-gating fitted on %zu tokens of %s\n", n / chunk * chunk, file);
	if (!rc && sim && (rc = experts_similarity_end(c->ex, c->o.threads, err)) == 0 && !c->o.quiet)
		fprintf(stderr, "moe-run: expert similarity measured on the first %zu tokens of %s\n",
			MOE_MIN(n / chunk * chunk, (size_t)512), file);
out:
	free(ids);
	return rc;
}

static int piece_of(void *p, int32_t id, char *buf, size_t len)
{
	struct ctx *c = p;
	return c->tok ? tokenizer_piece(c->tok, id, buf, len) : -1;
}

int main(int argc, char **argv)
{
	struct ctx c = { 0 };
	struct moe_error err = { 0 };
	int32_t *ids = NULL, *fids = NULL;
	size_t n = 0, nf = 0;
	int rc = parse(argc, argv, &c.o);
	if (rc)
		return rc;

	if ((rc = model_open(c.o.pack, c.o.gguf, &c.m, &err)))
		goto fail;
	bool need_tok = c.o.prompt || c.o.ppl;
	if ((rc = tokenizer_load(c.m->kv, &c.tok, &err))) {
		if (need_tok)
			goto fail;
		c.tok = NULL; /* --tokens: ids are printed instead of text */
		rc = 0;
		err.msg[0] = '\0';
	}
	if (c.o.tokens && (rc = parse_ids("--tokens", c.o.tokens, &ids, &n)))
		goto usage;
	if (c.o.feed && (rc = parse_ids("--feed", c.o.feed, &fids, &nf)))
		goto usage;
	if (c.o.prompt && (rc = tokenizer_encode(c.tok, c.o.prompt, strlen(c.o.prompt), true, true, &ids, &n, &err)))
		goto fail;
	if (c.o.prompt && !n) {
		rc = moe_error_set(&err, -EINVAL, "the prompt has no tokens");
		goto fail;
	}
	for (size_t i = 0; i < n + nf; i++) {
		int32_t id = i < n ? ids[i] : fids[i - n];
		if ((uint32_t)id >= c.m->n_vocab) {
			rc = moe_error_set(&err, -ERANGE, "token id %d is outside the vocabulary (%u)", id, c.m->n_vocab);
			goto fail;
		}
	}
	bool forced = c.o.dump || c.o.feed;
	uint32_t n_ctx = c.o.ppl ? (c.o.ctx ? c.o.ctx : 128) : (uint32_t)(n + nf) + (forced ? 0 : c.o.n_predict);
	if (c.o.ppl)
		c.o.ctx = n_ctx;
	else if (c.o.ctx && c.o.ctx < n_ctx) {
		rc = moe_error_set(&err, -ENOSPC, "%zu prompt + %u new tokens do not fit --ctx %u", n,
				   forced ? (uint32_t)nf : c.o.n_predict, c.o.ctx);
		goto fail;
	}
	if (c.o.pf_pregate && !c.o.pregate)
		c.o.pregate = c.o.prefetch ? MOE_MIN(c.o.prefetch, (unsigned)EXPERTS_PREGATE_MAX) : 1;
	if ((rc = c.o.local ? experts_open_local(c.m, &c.ex, &err)
			    : experts_open_daemon(c.m, c.o.socket, c.o.pf_pregate ? c.o.pregate : c.o.prefetch, &c.ex,
						  &err)))
		goto fail;
	{
		char note[512];
		if ((rc = experts_use_gpu(c.ex, c.o.gpu, note, sizeof(note), &err)))
			goto fail;
		if (note[0] && !c.o.quiet)
			fprintf(stderr, "%s\n", note);
	}
	/* the similarity rule is configured once the calibration measured it */
	if (c.o.rule != ROUTE_RULE_SIMILARITY && (rc = configure_experts(&c, &err)))
		goto fail;
	if ((rc = runner_create(c.m, c.ex, n_ctx, c.o.batch, c.o.threads, &c.r, &err)))
		goto fail;
	runner_set_kv_f16(c.r, c.o.kv_f16);
	if (c.tok)
		runner_set_token_key(c.r, token_key, &c);
	{
		const bool same = c.o.pregate_fit && c.o.route_calib && !strcmp(c.o.pregate_fit, c.o.route_calib);
		if (c.o.pregate_fit && (rc = calibrate(&c, c.o.pregate_fit, true, same, n_ctx, &err)))
			goto fail;
		if (c.o.route_calib && !same && (rc = calibrate(&c, c.o.route_calib, false, true, n_ctx, &err)))
			goto fail;
		if ((c.o.pregate_fit || c.o.route_calib) && (rc = configure_experts(&c, &err)))
			goto fail;
	}
	/* the states of the text measured, not of a calibration pass */
	if (c.o.dump_hidden && (rc = experts_hidden_begin(c.ex, &err)))
		goto fail;

	if (c.o.ppl)
		rc = perplexity(&c, &err);
	else if (forced)
		rc = teacher_forced(&c, ids, n, fids, nf, &err);
	else
		rc = generate(&c, ids, n, &err);
	if (rc)
		goto fail;
	if (c.o.dump_routing && (rc = experts_dump_write(c.ex, c.o.dump_routing, piece_of, &c, &err)))
		goto fail;
	if (c.o.dump_hidden && (rc = experts_hidden_write(c.ex, c.o.dump_hidden, &err)))
		goto fail;
	if (!c.o.quiet)
		summary(&c);
	free(ids);
	free(fids);
	runner_free(c.r);
	experts_close(c.ex);
	tokenizer_free(c.tok);
	model_close(c.m);
	return 0;
usage:
	rc = 2;
	goto out;
fail:
	fprintf(stderr, "moe-run: %s\n", err.msg[0] ? err.msg : strerror(rc < 0 ? -rc : rc));
	rc = 1;
out:
	free(ids);
	free(fids);
	runner_free(c.r);
	experts_close(c.ex);
	tokenizer_free(c.tok);
	model_close(c.m);
	return rc;
}
