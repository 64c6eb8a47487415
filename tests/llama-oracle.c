/* llama-oracle: a small harness on llama.cpp's C API (llama.h), the engine
 * users run, so that moe-run's logits, tokens and speed can be checked
 * against it (doc/peers.md). It links the npm prebuilt that
 * scripts/install-deps puts outside the tree; nothing of llama.cpp is in ours.
 *
 *   llama-oracle logits   MODEL --tokens IDS [--out FILE]
 *   llama-oracle tokenize MODEL [--no-special] [--parse-special] (TEXT | --file F)
 *   llama-oracle detok    MODEL IDS [--special]
 *   llama-oracle greedy   MODEL --tokens IDS [-n N] [--stop-eog]
 *   llama-oracle decode   MODEL --prompt-tokens IDS --feed-tokens IDS
 *   llama-oracle info     MODEL   (n_vocab)
 *   llama-oracle mkmodel  OUT.gguf [--arch A] [--seed S]
 *
 * Common: -t N threads (1), --ctx N, --batch N, --load-mode M, --flash-attn
 * on|off|auto, --no-repack, --kv-f32 (an F32 KV cache instead of llama.cpp's
 * default F16), -v (all of llama.cpp's log). IDS: "1,2,3" (commas or blanks)
 * or @FILE holding them. The logits file (--out) is the format shared with
 * moe-run: "MOELGT01", u32 n_tokens, u32 n_vocab (little-endian), then
 * n_tokens rows of n_vocab f32. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <ggml-backend.h>
#include <ggml.h>
#include <gguf.h>
#include <llama.h>

#ifndef LLAMA_ORACLE_BACKEND_DIR
#define LLAMA_ORACLE_BACKEND_DIR ""
#endif

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the logits file is written in host order, which must be little-endian"
#endif

#define LOGITS_MAGIC "MOELGT01"

struct opts {
	const char *cmd, *model, *out, *file, *text, *arch;
	const char *tokens, *prompt_tokens, *feed_tokens;
	int threads, n_gen;
	uint32_t n_ctx, n_batch;
	uint64_t seed;
	enum llama_load_mode load_mode;
	enum llama_flash_attn_type flash_attn;
	bool no_special, parse_special, special, stop_eog, verbose, no_repack, kv_f32;
};

struct ids {
	llama_token *v;
	size_t n;
};

static bool log_verbose;
static enum ggml_log_level log_last = GGML_LOG_LEVEL_INFO;

/* llama.cpp logs its loader's reasons (missing key, wrong number of tensors)
 * at ERROR; those are what a user needs. Its warnings (unset special token
 * ids, mostly) and INFO chatter show with -v. */
static void oracle_log(enum ggml_log_level level, const char *text, void *ud)
{
	(void)ud;
	if (level != GGML_LOG_LEVEL_CONT)
		log_last = level;
	if (log_verbose || log_last >= GGML_LOG_LEVEL_ERROR)
		fprintf(stderr, "%s%s", level == GGML_LOG_LEVEL_CONT ? "" : "llama.cpp: ", text);
}

static void die(const char *msg, const char *arg)
{
	fprintf(stderr, "llama-oracle: %s%s%s\n", msg, arg ? ": " : "", arg ? arg : "");
	exit(1);
}

static void *xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);
	if (!p)
		die("out of memory", NULL);
	return p;
}

static char *read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		die(strerror(errno), path);
	size_t cap = 4096, n = 0;
	char *buf = xmalloc(cap);
	size_t r;
	while ((r = fread(buf + n, 1, cap - n - 1, f)) > 0) {
		n += r;
		if (cap - n - 1 == 0) {
			cap *= 2;
			buf = realloc(buf, cap);
			if (!buf)
				die("out of memory", NULL);
		}
	}
	if (ferror(f))
		die("read error", path);
	fclose(f);
	buf[n] = 0;
	*len = n;
	return buf;
}

static struct ids parse_ids(const char *arg)
{
	struct ids ids = {0};
	size_t len;
	char *own = NULL;
	const char *s = arg;
	if (arg[0] == '@')
		s = own = read_file(arg + 1, &len);
	size_t cap = 64;
	ids.v = xmalloc(cap * sizeof(*ids.v));
	while (*s) {
		if (*s == ',' || *s == ' ' || *s == '\t' || *s == '\n' || *s == '\r') {
			s++;
			continue;
		}
		char *end;
		errno = 0;
		long v = strtol(s, &end, 10);
		if (end == s || errno || v < 0 || v > INT32_MAX)
			die("bad token id list", arg);
		if (ids.n == cap) {
			cap *= 2;
			ids.v = realloc(ids.v, cap * sizeof(*ids.v));
			if (!ids.v)
				die("out of memory", NULL);
		}
		ids.v[ids.n++] = (llama_token)v;
		s = end;
	}
	free(own);
	return ids;
}

static void print_ids(const llama_token *v, size_t n)
{
	for (size_t i = 0; i < n; i++)
		printf("%s%d", i ? "," : "", v[i]);
	printf("\n");
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The npm build has every ggml backend as a loadable module (one per CPU
 * generation): without loading them llama.cpp has no device at all. */
static void load_backends(void)
{
	const char *dir = getenv("MOETIER_LLAMA_BACKENDS");
	if (!dir || !*dir)
		dir = LLAMA_ORACLE_BACKEND_DIR;
	if (!*dir)
		die("no backend folder: set MOETIER_LLAMA_BACKENDS", NULL);
	ggml_backend_load_all_from_path(dir);
	if (ggml_backend_dev_count() == 0)
		die("no ggml backend could be loaded from", dir);
	llama_backend_init();
}

static struct llama_model *load_model(const struct opts *o, bool vocab_only)
{
	struct llama_model_params mp = llama_model_default_params();
	mp.load_mode = o->load_mode; /* default AUTO: mmap, as llama.cpp runs */
	mp.vocab_only = vocab_only;
	/* Repacking (on by default) moves weights into CPU-specific layouts
	 * with their own kernels: off isolates rounding questions. */
	mp.use_extra_bufts = !o->no_repack;
	struct llama_model *m = llama_model_load_from_file(o->model, mp);
	if (!m)
		die("llama.cpp cannot load the model (its reason is above)", o->model);
	return m;
}

static struct llama_context *new_context(const struct opts *o, struct llama_model *m, size_t n_tokens)
{
	struct llama_context_params cp = llama_context_default_params();
	/* Room for every token, in llama.cpp's 256-token granules. */
	uint32_t need = (uint32_t)((n_tokens + 255) / 256 * 256);
	cp.n_ctx = o->n_ctx ? o->n_ctx : (need < 256 ? 256 : need);
	if (cp.n_ctx < n_tokens)
		die("--ctx is smaller than the tokens", NULL);
	cp.n_batch = o->n_batch ? o->n_batch : cp.n_ctx;
	if (cp.n_ubatch > cp.n_batch)
		cp.n_ubatch = cp.n_batch;
	cp.n_outputs_max = 0; /* = n_batch: logits of every position */
	cp.n_outputs_max_per_seq = 0;
	cp.n_threads = cp.n_threads_batch = o->threads;
	cp.flash_attn_type = o->flash_attn;
	if (o->kv_f32) /* f32 K and V: no f16 rounding for moe-run to imitate */
		cp.type_k = cp.type_v = GGML_TYPE_F32;
	cp.no_perf = true;
	struct llama_context *ctx = llama_init_from_model(m, cp);
	if (!ctx)
		die("llama.cpp cannot create a context (its reason is above)", NULL);
	return ctx;
}

/* Decodes ids[0..n) at positions pos0.. in chunks of the context's batch;
 * on_row (when set) gets each position's logits. */
static void decode_ids(struct llama_context *ctx, const llama_token *ids, size_t n, int32_t pos0,
		       bool all_logits, void (*on_row)(void *, size_t, const float *), void *ud)
{
	size_t chunk = llama_n_batch(ctx);
	struct llama_batch b = llama_batch_init((int32_t)chunk, 0, 1);
	for (size_t at = 0; at < n; at += chunk) {
		size_t k = n - at < chunk ? n - at : chunk;
		b.n_tokens = (int32_t)k;
		for (size_t i = 0; i < k; i++) {
			b.token[i] = ids[at + i];
			b.pos[i] = pos0 + (int32_t)(at + i);
			b.n_seq_id[i] = 1;
			b.seq_id[i][0] = 0;
			b.logits[i] = all_logits || at + i == n - 1;
		}
		int32_t rc = llama_decode(ctx, b);
		if (rc != 0) {
			fprintf(stderr, "llama-oracle: llama_decode failed (%d) at position %zu\n", rc, at);
			exit(1);
		}
		if (!on_row)
			continue;
		for (size_t i = 0; i < k; i++) {
			if (!b.logits[i])
				continue;
			const float *row = llama_get_logits_ith(ctx, (int32_t)i);
			if (!row)
				die("llama.cpp returned no logits", NULL);
			on_row(ud, at + i, row);
		}
	}
	llama_batch_free(b);
}

/* Greedy's rule, shared with moe-run: the first index of the largest logit. */
static llama_token argmax(const float *row, int32_t n_vocab, float *maxv)
{
	llama_token best = 0;
	float m = row[0];
	for (int32_t i = 1; i < n_vocab; i++)
		if (row[i] > m) {
			m = row[i];
			best = i;
		}
	if (maxv)
		*maxv = m;
	return best;
}

struct logits_sink {
	FILE *f;
	int32_t n_vocab;
	const char *path;
};

static void logits_row(void *ud, size_t pos, const float *row)
{
	struct logits_sink *s = ud;
	if (s->f) {
		if (fwrite(row, sizeof(float), (size_t)s->n_vocab, s->f) != (size_t)s->n_vocab)
			die("write error", s->path);
		return;
	}
	float m;
	llama_token id = argmax(row, s->n_vocab, &m);
	printf("%zu %d %.9g\n", pos, id, (double)m);
}

static void check_ids(const struct ids *ids, int32_t n_vocab, const char *what)
{
	if (ids->n == 0)
		die("no token ids given", what);
	for (size_t i = 0; i < ids->n; i++)
		if (ids->v[i] >= n_vocab) {
			fprintf(stderr, "llama-oracle: %s: token %d >= n_vocab %d\n", what, ids->v[i], n_vocab);
			exit(1);
		}
}

static int cmd_logits(const struct opts *o)
{
	if (!o->tokens)
		die("logits needs --tokens", NULL);
	struct ids ids = parse_ids(o->tokens);
	struct llama_model *m = load_model(o, false);
	int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(m));
	check_ids(&ids, n_vocab, "--tokens");
	struct llama_context *ctx = new_context(o, m, ids.n);
	struct logits_sink s = {.n_vocab = n_vocab, .path = o->out};
	if (o->out) {
		s.f = fopen(o->out, "wb");
		if (!s.f)
			die(strerror(errno), o->out);
		uint32_t hdr[2] = {(uint32_t)ids.n, (uint32_t)n_vocab};
		if (fwrite(LOGITS_MAGIC, 1, 8, s.f) != 8 || fwrite(hdr, sizeof(hdr), 1, s.f) != 1)
			die("write error", o->out);
	}
	decode_ids(ctx, ids.v, ids.n, 0, true, logits_row, &s);
	if (s.f && fclose(s.f) != 0)
		die("write error", o->out);
	llama_free(ctx);
	llama_model_free(m);
	free(ids.v);
	return 0;
}

static int cmd_tokenize(const struct opts *o)
{
	size_t len;
	char *text;
	if (o->file)
		text = read_file(o->file, &len);
	else if (o->text) {
		len = strlen(o->text);
		text = xmalloc(len + 1);
		memcpy(text, o->text, len + 1);
	} else
		die("tokenize needs TEXT or --file", NULL);
	if (len > INT32_MAX)
		die("text too long", NULL);
	struct llama_model *m = load_model(o, true);
	const struct llama_vocab *v = llama_model_get_vocab(m);
	int32_t cap = (int32_t)(len + 16);
	llama_token *tok = xmalloc((size_t)cap * sizeof(*tok));
	int32_t n = llama_tokenize(v, text, (int32_t)len, tok, cap, !o->no_special, o->parse_special);
	if (n < 0) {
		cap = -n;
		tok = realloc(tok, (size_t)cap * sizeof(*tok));
		if (!tok)
			die("out of memory", NULL);
		n = llama_tokenize(v, text, (int32_t)len, tok, cap, !o->no_special, o->parse_special);
	}
	if (n < 0)
		die("llama_tokenize failed", NULL);
	print_ids(tok, (size_t)n);
	free(tok);
	free(text);
	llama_model_free(m);
	return 0;
}

static int cmd_detok(const struct opts *o)
{
	if (!o->tokens)
		die("detok needs IDS", NULL);
	struct ids ids = parse_ids(o->tokens);
	struct llama_model *m = load_model(o, true);
	const struct llama_vocab *v = llama_model_get_vocab(m);
	check_ids(&ids, llama_vocab_n_tokens(v), "IDS");
	int32_t cap = (int32_t)(ids.n * 8 + 16);
	char *buf = xmalloc((size_t)cap);
	int32_t n = llama_detokenize(v, ids.v, (int32_t)ids.n, buf, cap, false, o->special);
	if (n < 0) {
		cap = -n;
		buf = realloc(buf, (size_t)cap);
		if (!buf)
			die("out of memory", NULL);
		n = llama_detokenize(v, ids.v, (int32_t)ids.n, buf, cap, false, o->special);
	}
	if (n < 0)
		die("llama_detokenize failed", NULL);
	fwrite(buf, 1, (size_t)n, stdout);
	printf("\n");
	free(buf);
	free(ids.v);
	llama_model_free(m);
	return 0;
}

struct last_row {
	int32_t n_vocab;
	llama_token next;
};

static void greedy_row(void *ud, size_t pos, const float *row)
{
	struct last_row *r = ud;
	(void)pos;
	r->next = argmax(row, r->n_vocab, NULL);
}

static int cmd_greedy(const struct opts *o)
{
	if (!o->tokens)
		die("greedy needs --tokens", NULL);
	struct ids ids = parse_ids(o->tokens);
	struct llama_model *m = load_model(o, false);
	const struct llama_vocab *v = llama_model_get_vocab(m);
	struct last_row r = {.n_vocab = llama_vocab_n_tokens(v)};
	check_ids(&ids, r.n_vocab, "--tokens");
	struct llama_context *ctx = new_context(o, m, ids.n + (size_t)o->n_gen);
	llama_token *out = xmalloc((size_t)o->n_gen * sizeof(*out));
	int n = 0;
	decode_ids(ctx, ids.v, ids.n, 0, false, greedy_row, &r);
	while (n < o->n_gen) {
		llama_token t = r.next;
		out[n++] = t;
		if ((o->stop_eog && llama_vocab_is_eog(v, t)) || n == o->n_gen)
			break;
		decode_ids(ctx, &t, 1, (int32_t)(ids.n + (size_t)n - 1), true, greedy_row, &r);
	}
	print_ids(out, (size_t)n);
	free(out);
	free(ids.v);
	llama_free(ctx);
	llama_model_free(m);
	return 0;
}

/* What a script needs before it picks token ids. vocab_only: no weights
 * are read (nor the other hyperparameters), so it is cheap on a 7 GB model. */
static int cmd_info(const struct opts *o)
{
	struct llama_model *m = load_model(o, true);
	printf("n_vocab=%d\n", llama_vocab_n_tokens(llama_model_get_vocab(m)));
	llama_model_free(m);
	return 0;
}

/* Bytes this process (all its threads) made the block layer read: page
 * faults on the mmap'ed model included, page-cache hits not. -1 if unknown. */
static double read_bytes(void)
{
	FILE *f = fopen("/proc/self/io", "r");
	char line[128];
	double v = -1;
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, "read_bytes:", 11))
			v = strtod(line + 11, NULL);
	fclose(f);
	return v;
}

/* The benchmark's llama.cpp side: a prefill, then the feed tokens one at a
 * time (teacher-forced, so both programs touch the same experts in the same
 * order), each computing its logits as a real decode step does. */
static int cmd_decode(const struct opts *o)
{
	if (!o->prompt_tokens || !o->feed_tokens)
		die("decode needs --prompt-tokens and --feed-tokens", NULL);
	struct ids p = parse_ids(o->prompt_tokens), f = parse_ids(o->feed_tokens);
	double r0 = read_bytes(), t0 = now_s();
	struct llama_model *m = load_model(o, false);
	struct last_row r = {.n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(m))};
	check_ids(&p, r.n_vocab, "--prompt-tokens");
	check_ids(&f, r.n_vocab, "--feed-tokens");
	struct llama_context *ctx = new_context(o, m, p.n + f.n);
	double t1 = now_s(), r1 = read_bytes();
	decode_ids(ctx, p.v, p.n, 0, false, greedy_row, &r);
	double t2 = now_s(), r2 = read_bytes();
	for (size_t i = 0; i < f.n; i++)
		decode_ids(ctx, &f.v[i], 1, (int32_t)(p.n + i), true, greedy_row, &r);
	double t3 = now_s(), r3 = read_bytes();
	const double mib = 1024.0 * 1024.0;
	printf("llama-oracle: prefill_tps=%.3f decode_tps=%.3f n_decode=%zu\n", (double)p.n / (t2 - t1),
	       (double)f.n / (t3 - t2), f.n);
	/* Second line for the benchmark: where the time went, and what came from
	 * the disk (read_* are -1 without /proc/self/io). */
	printf("llama-oracle: load_s=%.3f prefill_s=%.3f decode_s=%.3f read_load_mib=%.1f read_prefill_mib=%.1f "
	       "read_decode_mib_per_tok=%.2f\n",
	       t1 - t0, t2 - t1, t3 - t2, r0 < 0 ? -1 : (r1 - r0) / mib, r0 < 0 ? -1 : (r2 - r1) / mib,
	       r0 < 0 ? -1 : (r3 - r2) / mib / (double)f.n);
	llama_free(ctx);
	llama_model_free(m);
	free(p.v);
	free(f.v);
	return 0;
}

/* ---- mkmodel: a random tiny MoE built by llama.cpp itself from keys
 * (llama_model_init_from_user), an independent check of moe-gen's files. */

struct mk_shape {
	uint32_t vocab, embd, layers, heads, heads_kv, ff_exp, ff_shared, experts, used, ctx;
};

static uint64_t mk_rng;

static uint64_t mk_next(void)
{
	/* splitmix64: fixed and portable, so a seed names one model. */
	uint64_t z = (mk_rng += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static void mk_tensor(struct ggml_tensor *t, void *ud)
{
	(void)ud;
	if (t->type != GGML_TYPE_F32) {
		fprintf(stderr, "llama-oracle: mkmodel: tensor %s is not F32\n", t->name);
		exit(1);
	}
	int64_t n = ggml_nelements(t);
	float *v = xmalloc((size_t)n * sizeof(float));
	/* Norm weights near 1 (as trained models have them), matrices scaled by
	 * their fan-in so that activations neither vanish nor explode. */
	bool norm = strstr(t->name, "norm") != NULL;
	float scale = norm ? 0.2f : 1.7f / sqrtf((float)t->ne[0]);
	for (int64_t i = 0; i < n; i++) {
		float u = (float)((double)(mk_next() >> 11) * 0x1.0p-53) * 2.0f - 1.0f;
		v[i] = norm ? 1.0f + scale * u : scale * u;
	}
	ggml_backend_tensor_set(t, v, 0, (size_t)n * sizeof(float));
	free(v);
}

static void mk_vocab(struct gguf_context *g, uint32_t n)
{
	/* A minimal SentencePiece vocabulary: <unk> <s> </s>, the 256 byte
	 * tokens, then word pieces and unique fillers (llama.cpp needs one). */
	const char **tok = xmalloc(n * sizeof(*tok));
	float *score = xmalloc(n * sizeof(*score));
	int32_t *type = xmalloc(n * sizeof(*type));
	char **own = xmalloc(n * sizeof(*own));
#define SP "\xe2\x96\x81" /* U+2581, SentencePiece's word start */
	static const char *const words[] = {SP, "e", "t", "a", "o", "n", SP "t", "h",
					    "s", SP "the", SP "a", "r", "i", "l", "d", SP "o"};
	if (n < 3 + 256 + sizeof(words) / sizeof(words[0]))
		die("mkmodel: vocab too small", NULL);
	for (uint32_t i = 0; i < n; i++) {
		char buf[32];
		if (i == 0)
			snprintf(buf, sizeof(buf), "<unk>");
		else if (i == 1)
			snprintf(buf, sizeof(buf), "<s>");
		else if (i == 2)
			snprintf(buf, sizeof(buf), "</s>");
		else if (i < 259)
			snprintf(buf, sizeof(buf), "<0x%02X>", i - 3);
		else if (i - 259 < sizeof(words) / sizeof(words[0]))
			snprintf(buf, sizeof(buf), "%s", words[i - 259]);
		else
			snprintf(buf, sizeof(buf), SP "w%u", i);
		own[i] = strdup(buf);
		if (!own[i])
			die("out of memory", NULL);
		tok[i] = own[i];
		score[i] = i < 259 ? 0.0f : -(float)i;
		type[i] = i == 0 ? LLAMA_TOKEN_TYPE_UNKNOWN
			  : i < 3 ? LLAMA_TOKEN_TYPE_CONTROL
			  : i < 259 ? LLAMA_TOKEN_TYPE_BYTE
				    : LLAMA_TOKEN_TYPE_NORMAL;
	}
	gguf_set_val_str(g, "tokenizer.ggml.model", "llama");
	gguf_set_arr_str(g, "tokenizer.ggml.tokens", tok, n);
	gguf_set_arr_data(g, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, score, n);
	gguf_set_arr_data(g, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, type, n);
	gguf_set_val_u32(g, "tokenizer.ggml.unknown_token_id", 0);
	gguf_set_val_u32(g, "tokenizer.ggml.bos_token_id", 1);
	gguf_set_val_u32(g, "tokenizer.ggml.eos_token_id", 2);
	for (uint32_t i = 0; i < n; i++)
		free(own[i]);
	free(own);
	free(tok);
	free(score);
	free(type);
}

static void mk_add(struct gguf_context *g, const char *name)
{
	/* Only the name counts (and the type, F32 here): llama.cpp takes the
	 * shapes from the keys, and with node-llama-cpp's loader patch it
	 * creates exactly the tensors listed in the metadata. */
	struct ggml_tensor t;
	memset(&t, 0, sizeof(t));
	t.type = GGML_TYPE_F32;
	for (int d = 0; d < GGML_MAX_DIMS; d++) {
		t.ne[d] = 1;
		t.nb[d] = sizeof(float);
	}
	snprintf(t.name, sizeof(t.name), "%s", name);
	gguf_add_tensor(g, &t);
}

static void mk_tensors(struct gguf_context *g, const char *arch, uint32_t layers)
{
	static const char *const common[] = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
					     "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
					     "ffn_down_exps"};
	static const char *const qk_norm[] = {"attn_q_norm", "attn_k_norm"};
	static const char *const shared[] = {"ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp",
					     "ffn_down_shexp"};
	bool has_qk_norm = !strcmp(arch, "qwen3moe") || !strcmp(arch, "olmoe");
	bool is_qwen2 = !strcmp(arch, "qwen2moe");
	char n[GGML_MAX_NAME];
	mk_add(g, "token_embd.weight");
	mk_add(g, "output_norm.weight");
	mk_add(g, "output.weight");
	for (uint32_t l = 0; l < layers; l++) {
		for (size_t i = 0; i < sizeof(common) / sizeof(common[0]); i++)
			mk_add(g, (snprintf(n, sizeof(n), "blk.%u.%s.weight", l, common[i]), n));
		for (size_t i = 0; has_qk_norm && i < 2; i++)
			mk_add(g, (snprintf(n, sizeof(n), "blk.%u.%s.weight", l, qk_norm[i]), n));
		for (size_t i = 0; is_qwen2 && i < 4; i++)
			mk_add(g, (snprintf(n, sizeof(n), "blk.%u.%s.weight", l, shared[i]), n));
		for (size_t i = 0; is_qwen2 && i < 3; i++)
			mk_add(g, (snprintf(n, sizeof(n), "blk.%u.attn_%c.bias", l, "qkv"[i]), n));
	}
}

static int cmd_mkmodel(const struct opts *o)
{
	const char *a = o->arch ? o->arch : "qwen3moe";
	struct mk_shape s = {.vocab = 512, .embd = 64, .layers = 2, .heads = 4, .heads_kv = 2,
			     .ff_exp = 32, .ff_shared = 0, .experts = 8, .used = 2, .ctx = 4096};
	if (!strcmp(a, "qwen2moe"))
		s.ff_shared = 48;
	else if (!strcmp(a, "olmoe"))
		s.heads_kv = s.heads; /* llama.cpp's olmoe sizes k_norm by n_embd: no GQA */
	else if (strcmp(a, "qwen3moe") && strcmp(a, "olmoe") && strcmp(a, "llama"))
		die("mkmodel: --arch is one of qwen3moe, qwen2moe, olmoe, llama (mixtral)", a);
	mk_rng = o->seed;
	struct gguf_context *g = gguf_init_empty();
	char k[128];
#define KEY(suffix) (snprintf(k, sizeof(k), "%s." suffix, a), k)
	gguf_set_val_str(g, "general.architecture", a);
	gguf_set_val_str(g, "general.name", "llama-oracle mkmodel");
	gguf_set_val_u32(g, KEY("context_length"), s.ctx);
	gguf_set_val_u32(g, KEY("embedding_length"), s.embd);
	gguf_set_val_u32(g, KEY("block_count"), s.layers);
	gguf_set_val_u32(g, KEY("attention.head_count"), s.heads);
	gguf_set_val_u32(g, KEY("attention.head_count_kv"), s.heads_kv);
	gguf_set_val_f32(g, KEY("attention.layer_norm_rms_epsilon"), 1e-6f);
	gguf_set_val_f32(g, KEY("rope.freq_base"), 10000.0f);
	gguf_set_val_u32(g, KEY("expert_count"), s.experts);
	gguf_set_val_u32(g, KEY("expert_used_count"), s.used);
	/* qwen*moe size experts by expert_feed_forward_length, olmoe and
	 * mixtral by feed_forward_length. */
	gguf_set_val_u32(g, KEY("feed_forward_length"), s.ff_exp);
	gguf_set_val_u32(g, KEY("expert_feed_forward_length"), s.ff_exp);
	if (s.ff_shared)
		gguf_set_val_u32(g, KEY("expert_shared_feed_forward_length"), s.ff_shared);
#undef KEY
	mk_vocab(g, s.vocab);
	mk_tensors(g, a, s.layers);
	struct llama_model_params mp = llama_model_default_params();
	struct llama_model *m = llama_model_init_from_user(g, mk_tensor, NULL, mp);
	if (!m)
		die("llama.cpp cannot build the model (its reason is above)", a);
	llama_model_save_to_file(m, o->model);
	llama_model_free(m);
	gguf_free(g);
	return 0;
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: llama-oracle logits   MODEL.gguf --tokens IDS [--out FILE]\n"
		"       llama-oracle tokenize MODEL.gguf [--no-special] [--parse-special] (TEXT | --file F)\n"
		"       llama-oracle detok    MODEL.gguf IDS [--special]\n"
		"       llama-oracle greedy   MODEL.gguf --tokens IDS [-n N] [--stop-eog]\n"
		"       llama-oracle decode   MODEL.gguf --prompt-tokens IDS --feed-tokens IDS\n"
		"       llama-oracle info     MODEL.gguf\n"
		"       llama-oracle mkmodel  OUT.gguf [--arch qwen3moe|qwen2moe|olmoe|llama] [--seed S]\n"
		"common: -t N threads (1)  --ctx N  --batch N  --load-mode auto|none|mmap|mlock|mmap+mlock|dio\n"
		"        --flash-attn on|off|auto  --no-repack  --kv-f32 (F32 KV cache, not F16)\n"
		"        -v (llama.cpp's whole log)\n"
		"IDS: 1,2,3 (commas or blanks) or @FILE. Backends: MOETIER_LLAMA_BACKENDS or %s\n",
		*LLAMA_ORACLE_BACKEND_DIR ? LLAMA_ORACLE_BACKEND_DIR : "(none built in)");
}

static long num_arg(const char *s, long lo, long hi, const char *name)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (end == s || *end || errno || v < lo || v > hi)
		die("bad number for", name);
	return v;
}

int main(int argc, char **argv)
{
	struct opts o = {.threads = 1, .n_gen = 64, .load_mode = LLAMA_LOAD_MODE_AUTO,
			 .flash_attn = LLAMA_FLASH_ATTN_TYPE_AUTO};
	if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
		usage(argc < 2 ? stderr : stdout);
		return argc < 2 ? 2 : 0;
	}
	o.cmd = argv[1];
	for (int i = 2; i < argc; i++) {
		const char *a = argv[i];
#define NEXT() (i + 1 < argc ? argv[++i] : (die("missing value after", a), ""))
		if (!strcmp(a, "--tokens"))
			o.tokens = NEXT();
		else if (!strcmp(a, "--prompt-tokens"))
			o.prompt_tokens = NEXT();
		else if (!strcmp(a, "--feed-tokens"))
			o.feed_tokens = NEXT();
		else if (!strcmp(a, "--out"))
			o.out = NEXT();
		else if (!strcmp(a, "--file"))
			o.file = NEXT();
		else if (!strcmp(a, "--arch"))
			o.arch = NEXT();
		else if (!strcmp(a, "--seed"))
			o.seed = (uint64_t)num_arg(NEXT(), 0, INT64_MAX, a);
		else if (!strcmp(a, "-t") || !strcmp(a, "--threads"))
			o.threads = (int)num_arg(NEXT(), 1, 1024, a);
		else if (!strcmp(a, "-n"))
			o.n_gen = (int)num_arg(NEXT(), 1, 1 << 20, a);
		else if (!strcmp(a, "--ctx"))
			o.n_ctx = (uint32_t)num_arg(NEXT(), 1, 1 << 24, a);
		else if (!strcmp(a, "--batch"))
			o.n_batch = (uint32_t)num_arg(NEXT(), 1, 1 << 24, a);
		else if (!strcmp(a, "--load-mode")) {
			/* Matched here: llama_load_mode_from_str throws a C++
			 * exception, which a C caller cannot catch. */
			static const enum llama_load_mode modes[] = {
				LLAMA_LOAD_MODE_AUTO, LLAMA_LOAD_MODE_NONE, LLAMA_LOAD_MODE_MMAP,
				LLAMA_LOAD_MODE_MLOCK, LLAMA_LOAD_MODE_MMAP_MLOCK, LLAMA_LOAD_MODE_DIRECT_IO};
			const char *v = NEXT();
			size_t k = 0;
			while (k < sizeof(modes) / sizeof(modes[0]) && strcmp(llama_load_mode_name(modes[k]), v))
				k++;
			if (k == sizeof(modes) / sizeof(modes[0]))
				die("--load-mode is auto, none, mmap, mlock, mmap+mlock or dio", v);
			o.load_mode = modes[k];
		} else if (!strcmp(a, "--flash-attn")) {
			const char *v = NEXT();
			o.flash_attn = !strcmp(v, "on")    ? LLAMA_FLASH_ATTN_TYPE_ENABLED
				       : !strcmp(v, "off") ? LLAMA_FLASH_ATTN_TYPE_DISABLED
				       : !strcmp(v, "auto")
					       ? LLAMA_FLASH_ATTN_TYPE_AUTO
					       : (die("--flash-attn is on, off or auto", v), LLAMA_FLASH_ATTN_TYPE_AUTO);
		} else if (!strcmp(a, "--no-special"))
			o.no_special = true;
		else if (!strcmp(a, "--parse-special"))
			o.parse_special = true;
		else if (!strcmp(a, "--special"))
			o.special = true;
		else if (!strcmp(a, "--stop-eog"))
			o.stop_eog = true;
		else if (!strcmp(a, "--no-repack"))
			o.no_repack = true;
		else if (!strcmp(a, "--kv-f32"))
			o.kv_f32 = true;
		else if (!strcmp(a, "-v"))
			o.verbose = true;
		else if (a[0] == '-' && a[1] && !(a[1] >= '0' && a[1] <= '9'))
			die("unknown option", a);
		else if (!o.model)
			o.model = a;
		else if (!strcmp(o.cmd, "detok") && !o.tokens)
			o.tokens = a;
		else if (!strcmp(o.cmd, "tokenize") && !o.text)
			o.text = a;
		else
			die("unexpected argument", a);
#undef NEXT
	}
	if (!o.model)
		die("no model file given", NULL);
	log_verbose = o.verbose;
	llama_log_set(oracle_log, NULL);
	load_backends();
	int rc;
	if (!strcmp(o.cmd, "logits"))
		rc = cmd_logits(&o);
	else if (!strcmp(o.cmd, "tokenize"))
		rc = cmd_tokenize(&o);
	else if (!strcmp(o.cmd, "detok"))
		rc = cmd_detok(&o);
	else if (!strcmp(o.cmd, "greedy"))
		rc = cmd_greedy(&o);
	else if (!strcmp(o.cmd, "decode"))
		rc = cmd_decode(&o);
	else if (!strcmp(o.cmd, "info"))
		rc = cmd_info(&o);
	else if (!strcmp(o.cmd, "mkmodel"))
		rc = cmd_mkmodel(&o);
	else {
		usage(stderr);
		die("unknown command", o.cmd);
	}
	fflush(stdout);
	if (ferror(stdout))
		die("write error on stdout", NULL);
	llama_backend_free();
	return rc;
}
