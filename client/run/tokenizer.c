/* tokenizer.c - SentencePiece and byte-level BPE tokenizers from GGUF
 * metadata, written to reproduce llama.cpp's ids (llama-vocab.cpp) exactly,
 * including its quirks: the order special tokens are matched in, the "▁"
 * prefix after every special token, byte fallback, duplicate token texts
 * (the last id wins) and empty ones ("[EMPTY_i]"). doc/tokenizer.md. */
#include "config.h"

#define PCRE2_CODE_UNIT_WIDTH 8

#include <errno.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer.h"

/* Token attributes, as llama.cpp derives them from tokenizer.ggml.token_type. */
enum {
	ATTR_UNDEFINED = 0,
	ATTR_UNKNOWN = 1 << 0,
	ATTR_UNUSED = 1 << 1,
	ATTR_NORMAL = 1 << 2,
	ATTR_CONTROL = 1 << 3,
	ATTR_USER_DEFINED = 1 << 4,
	ATTR_BYTE = 1 << 5,
	ATTR_LSTRIP = 1 << 7,   /* matched special text eats the whitespace before it */
	ATTR_RSTRIP = 1 << 8,   /* ... or after it */
};

enum tok_type { TOK_SPM, TOK_BPE };
enum tok_pre { PRE_NONE, PRE_DEFAULT, PRE_GPT2, PRE_QWEN2, PRE_LLAMA3 };

#define MAX_REGEX 4

struct tok_entry {
	char *text;
	uint32_t len;
	uint32_t attr;
	float score;
};

/* Open-addressing hash from a byte string to a value; keys point into memory
 * the tokenizer owns. */
struct strmap {
	struct { const char *key; uint32_t len; int32_t val; } *slot;
	uint32_t mask;          /* capacity - 1; capacity a power of two */
};

struct tokenizer {
	enum tok_type type;
	enum tok_pre pre;
	uint32_t n_vocab;
	struct tok_entry *tok;
	struct strmap text_to_id;
	struct strmap merges;   /* "first\0second" -> rank */
	char *merge_keys;       /* storage of the merge keys */
	int32_t bos, eos, eot, eom, unk;
	bool add_bos, add_eos, add_space_prefix, ignore_merges;
	int32_t *special;       /* control/user-defined/unknown ids, longest text first */
	uint32_t n_special;
	uint8_t *eog;           /* n_vocab flags */
	int32_t byte_tok[256];  /* SPM byte fallback; -1 when absent */
	char byte_unicode[256][3]; /* GPT-2 map: byte -> UTF-8 of its code point (NUL-padded) */
	pcre2_code *re[MAX_REGEX];
	uint32_t n_re;
};

/* ---- hashing ---- */

static uint64_t hash_bytes(const char *s, uint32_t len)
{
	uint64_t h = 1469598103934665603ull;
	for (uint32_t i = 0; i < len; i++) {
		h ^= (uint8_t)s[i];
		h *= 1099511628211ull;
	}
	return h ^ (h >> 29);
}

static int strmap_init(struct strmap *m, uint64_t n)
{
	uint64_t cap = 16;
	while (cap < 2 * n + 16)
		cap <<= 1;
	if (cap > (1ull << 31))
		return -ENOMEM;
	m->slot = calloc(cap, sizeof(*m->slot));
	if (!m->slot)
		return -ENOMEM;
	m->mask = (uint32_t)(cap - 1);
	return 0;
}

/* Finds the slot of key: its own, or the empty one where it belongs. */
static uint32_t strmap_slot(const struct strmap *m, const char *key, uint32_t len)
{
	uint32_t i = (uint32_t)hash_bytes(key, len) & m->mask;
	while (m->slot[i].key &&
	       (m->slot[i].len != len || memcmp(m->slot[i].key, key, len) != 0))
		i = (i + 1) & m->mask;
	return i;
}

/* replace: true keeps the last value put for a key (llama.cpp's token_to_id
 * map), false the first (its bpe_ranks emplace). */
static void strmap_put(struct strmap *m, const char *key, uint32_t len, int32_t val, bool replace)
{
	uint32_t i = strmap_slot(m, key, len);
	if (m->slot[i].key && !replace)
		return;
	m->slot[i].key = key;
	m->slot[i].len = len;
	m->slot[i].val = val;
}

static int32_t strmap_get(const struct strmap *m, const char *key, size_t len)
{
	if (!m->slot || len > UINT32_MAX)
		return -1;
	uint32_t i = strmap_slot(m, key, (uint32_t)len);
	return m->slot[i].key ? m->slot[i].val : -1;
}

static int32_t text_to_token(const struct tokenizer *t, const char *s, size_t len)
{
	return strmap_get(&t->text_to_id, s, len);
}

/* ---- growable buffers ---- */

struct ids {
	int32_t *v;
	size_t n, cap;
};

static int ids_push(struct ids *a, int32_t id)
{
	if (a->n == a->cap) {
		size_t cap = a->cap ? a->cap * 2 : 64;
		int32_t *v = realloc(a->v, cap * sizeof(*v));
		if (!v)
			return -ENOMEM;
		a->v = v;
		a->cap = cap;
	}
	a->v[a->n++] = id;
	return 0;
}

struct sbuf {
	char *b;
	size_t n, cap;
};

static int sbuf_put(struct sbuf *s, const void *p, size_t n)
{
	if (s->n + n + 1 > s->cap) {
		size_t cap = s->cap ? s->cap : 64;
		while (cap < s->n + n + 1)
			cap *= 2;
		char *b = realloc(s->b, cap);
		if (!b)
			return -ENOMEM;
		s->b = b;
		s->cap = cap;
	}
	memcpy(s->b + s->n, p, n);
	s->n += n;
	s->b[s->n] = '\0';
	return 0;
}

/* ---- UTF-8, decoded the way llama.cpp's unicode.cpp does ---- */

/* Length of the UTF-8 sequence a lead byte announces (1 for stray bytes). */
static size_t utf8_len(uint8_t c)
{
	static const uint8_t lookup[16] = { 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4 };
	return lookup[c >> 4];
}

/* One code point at s[*off]; an invalid sequence yields U+FFFD and consumes
 * one byte. No overlong or surrogate checks, as in llama.cpp. */
static uint32_t utf8_next(const uint8_t *s, size_t len, size_t *off)
{
	size_t o = *off;
	uint8_t c = s[o];
	if (!(c & 0x80)) {
		*off = o + 1;
		return c;
	}
	if (!(c & 0x40))
		goto bad;
	if (!(c & 0x20)) {
		if (o + 1 >= len || (s[o + 1] & 0xc0) != 0x80)
			goto bad;
		*off = o + 2;
		return ((uint32_t)(c & 0x1f) << 6) | (s[o + 1] & 0x3f);
	}
	if (!(c & 0x10)) {
		if (o + 2 >= len || (s[o + 1] & 0xc0) != 0x80 || (s[o + 2] & 0xc0) != 0x80)
			goto bad;
		*off = o + 3;
		return ((uint32_t)(c & 0x0f) << 12) | ((uint32_t)(s[o + 1] & 0x3f) << 6) | (s[o + 2] & 0x3f);
	}
	if (!(c & 0x08)) {
		if (o + 3 >= len || (s[o + 1] & 0xc0) != 0x80 || (s[o + 2] & 0xc0) != 0x80 ||
		    (s[o + 3] & 0xc0) != 0x80)
			goto bad;
		*off = o + 4;
		return ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[o + 1] & 0x3f) << 12) |
		       ((uint32_t)(s[o + 2] & 0x3f) << 6) | (s[o + 3] & 0x3f);
	}
bad:
	*off = o + 1;
	return 0xFFFD;
}

static size_t utf8_put(uint32_t cp, char *out)
{
	if (cp <= 0x7f) {
		out[0] = (char)cp;
		return 1;
	}
	if (cp <= 0x7ff) {
		out[0] = (char)(0xc0 | (cp >> 6));
		out[1] = (char)(0x80 | (cp & 0x3f));
		return 2;
	}
	if (cp <= 0xffff) {
		out[0] = (char)(0xe0 | (cp >> 12));
		out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
		out[2] = (char)(0x80 | (cp & 0x3f));
		return 3;
	}
	out[0] = (char)(0xf0 | ((cp >> 18) & 0x07));
	out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
	out[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
	out[3] = (char)(0x80 | (cp & 0x3f));
	return 4;
}

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the
 * other 68 to U+0100 upwards in byte order. */
static void byte_unicode_init(struct tokenizer *t)
{
	uint32_t n = 0;
	for (uint32_t b = 0; b < 256; b++) {
		bool keep = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
		uint32_t cp = keep ? b : 256 + n++;
		memset(t->byte_unicode[b], 0, sizeof(t->byte_unicode[b]));
		utf8_put(cp, t->byte_unicode[b]);
	}
}

/* Inverse of the map for one code point; -1 when it is none of the 256. */
static int unicode_byte(uint32_t cp)
{
	if ((cp >= 0x21 && cp <= 0x7e) || (cp >= 0xa1 && cp <= 0xac) || (cp >= 0xae && cp <= 0xff))
		return (int)cp;
	if (cp < 256 || cp >= 256 + 68)
		return -1;
	uint32_t n = 0;
	for (uint32_t b = 0; b < 256; b++) {
		bool keep = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
		if (!keep && 256 + n++ == cp)
			return (int)b;
	}
	return -1;
}

/* ---- pre-tokenizer regexes ----
 * llama.cpp's \s is its own 25-code-point White_Space set; PCRE2's differs at
 * U+0085 and U+180E, so the patterns spell the set out. */
#define WS "\\t-\\r \\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}"
#define S_ "[" WS "]"
#define NS "[^" WS "]"

static const char *const re_gpt2 =
	"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" WS "\\p{L}\\p{N}]+|" S_ "+(?!" NS ")";
static const char *const re_qwen2 =
	"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
	"| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n]*|" S_ "*[\\r\\n]+|" S_ "+(?!" NS ")|" S_ "+";
static const char *const re_llama3 =
	"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
	"| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n]*|" S_ "*[\\r\\n]+|" S_ "+(?!" NS ")|" S_ "+";
/* llama.cpp's fallback for a BPE vocabulary without (or with "default") pre. */
static const char *const re_default[] = {
	"[\\p{P}\\$\\+<=>\\^~\\|]+",
	NULL, /* re_gpt2 */
	"\\p{N}+",
	"[0-9][0-9][0-9]",
};

static int compile_re(struct tokenizer *t, const char *pat, struct moe_error *err)
{
	int ec;
	PCRE2_SIZE eo;
	pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP,
				       &ec, &eo, NULL);
	if (!re) {
		PCRE2_UCHAR msg[160];
		pcre2_get_error_message(ec, msg, sizeof(msg));
		return moe_error_set(err, -EINVAL, "tokenizer: regex at %zu: %s", (size_t)eo, (char *)msg);
	}
	/* JIT is only a speed-up: without it pcre2_match interprets. */
	(void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
	t->re[t->n_re++] = re;
	return 0;
}

struct pre_name {
	const char *name;
	enum tok_pre pre;
};

/* tokenizer.ggml.pre values llama.cpp maps to the three regexes here (see
 * its llama_vocab::impl::load); any other value is refused as it is there. */
static const struct pre_name pre_names[] = {
	{ "default", PRE_DEFAULT },
	{ "gpt-2", PRE_GPT2 }, { "phi-2", PRE_GPT2 }, { "jina-es", PRE_GPT2 }, { "jina-de", PRE_GPT2 },
	{ "gigachat", PRE_GPT2 }, { "jina-v2-es", PRE_GPT2 }, { "jina-v2-de", PRE_GPT2 },
	{ "a.x-4.0", PRE_GPT2 }, { "mellum", PRE_GPT2 }, { "modern-bert", PRE_GPT2 },
	{ "exaone4", PRE_GPT2 }, { "olmo", PRE_GPT2 }, { "mpt", PRE_GPT2 }, { "jais", PRE_GPT2 },
	{ "trillion", PRE_GPT2 }, { "granite-docling", PRE_GPT2 },
	{ "qwen2", PRE_QWEN2 }, { "deepseek-r1-qwen", PRE_QWEN2 }, { "kormo", PRE_QWEN2 },
	{ "f2llmv2", PRE_QWEN2 }, { "megrez", PRE_QWEN2 }, { "stablelm2", PRE_QWEN2 },
	{ "hunyuan", PRE_QWEN2 }, { "solar-open", PRE_QWEN2 },
	{ "llama3", PRE_LLAMA3 }, { "llama-v3", PRE_LLAMA3 }, { "llama-bpe", PRE_LLAMA3 },
	{ "falcon3", PRE_LLAMA3 }, { "falcon-h1", PRE_LLAMA3 }, { "pixtral", PRE_LLAMA3 },
	{ "midm-2.0", PRE_LLAMA3 }, { "lfm2", PRE_LLAMA3 }, { "jina-v5-nano", PRE_LLAMA3 },
	{ "dbrx", PRE_LLAMA3 }, { "smaug-bpe", PRE_LLAMA3 },
};

/* ---- loading ---- */

static void tok_free_contents(struct tokenizer *t)
{
	if (t->tok)
		for (uint32_t i = 0; i < t->n_vocab; i++)
			free(t->tok[i].text);
	free(t->tok);
	free(t->text_to_id.slot);
	free(t->merges.slot);
	free(t->merge_keys);
	free(t->special);
	free(t->eog);
	for (uint32_t i = 0; i < t->n_re; i++)
		pcre2_code_free(t->re[i]);
}

void tokenizer_free(struct tokenizer *t)
{
	if (!t)
		return;
	tok_free_contents(t);
	free(t);
}

/* An optional token id key: absent leaves *id; out of range is ignored
 * (llama.cpp warns and keeps the default). */
static int get_id(const struct gguf_file *g, const char *key, uint32_t n_vocab, int32_t *id,
		  struct moe_error *err)
{
	uint32_t v;
	int rc = gguf_get_u32(g, key, &v);
	if (rc == -ENOENT)
		return 0;
	if (rc < 0)
		return moe_error_set(err, -EINVAL, "tokenizer: %s is not a token id", key);
	if (v < n_vocab)
		*id = (int32_t)v;
	return 0;
}

static int get_flag(const struct gguf_file *g, const char *key, bool *out, struct moe_error *err)
{
	int rc = gguf_get_bool(g, key, out);
	if (rc == -ENOENT)
		return 0;
	if (rc < 0)
		return moe_error_set(err, -EINVAL, "tokenizer: %s is not a bool", key);
	return 0;
}

static bool text_is(const struct tok_entry *e, const char *s)
{
	return e->len == strlen(s) && memcmp(e->text, s, e->len) == 0;
}

static bool text_in(const struct tok_entry *e, const char *const *list)
{
	for (; *list; list++)
		if (text_is(e, *list))
			return true;
	return false;
}

/* The texts llama.cpp recognises when the KV pairs do not name the token. */
static const char *const eot_texts[] = {
	"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
	"<EOT>", "_<EOT>", "[EOT]", "<\xef\xbd\x9c" "end\xe2\x96\x81" "of\xe2\x96\x81" "sentence\xef\xbd\x9c>",
	"<end_of_utterance>", NULL,
};
static const char *const eom_texts[] = { "<|eom_id|>", NULL };
static const char *const fim_pad_texts[] = { "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", NULL };
static const char *const fim_rep_texts[] = {
	"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", NULL,
};
static const char *const fim_sep_texts[] = { "<|file_sep|>", NULL };
static const char *const fim_pre_texts[] = {
	"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\xef\xbd\x9c" "fim\xe2\x96\x81" "begin\xef\xbd\x9c>",
	"<PRE>", "\xe2\x96\x81<PRE>", "<|code_prefix|>", "<|prefix|>", NULL,
};
static const char *const fim_suf_texts[] = {
	"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\xef\xbd\x9c" "fim\xe2\x96\x81" "hole\xef\xbd\x9c>",
	"<SUF>", "\xe2\x96\x81<SUF>", "<|code_suffix|>", "<|suffix|>", NULL,
};
static const char *const fim_mid_texts[] = {
	"<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\xef\xbd\x9c" "fim\xe2\x96\x81" "end\xef\xbd\x9c>",
	"<MID>", "\xe2\x96\x81<MID>", "<|code_middle|>", "<|middle|>", NULL,
};
static const char *const eog_texts[] = {
	"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
	"<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
	"<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
	"<\xef\xbd\x9c" "end\xe2\x96\x81" "of\xe2\x96\x81" "sentence\xef\xbd\x9c>", "[e~[", NULL,
};

/* One special id found by text when no key named it; the token becomes a
 * control token, as llama.cpp overrides its type. The id it keeps is the one
 * its hash map iteration meets first: here the lowest. */
static void detect_by_text(struct tokenizer *t, int32_t *id, const char *const *texts)
{
	if (*id >= 0)
		return;
	for (uint32_t i = 0; i < t->n_vocab; i++)
		if (text_in(&t->tok[i], texts) && text_to_token(t, t->tok[i].text, t->tok[i].len) == (int32_t)i) {
			*id = (int32_t)i;
			t->tok[i].attr |= ATTR_CONTROL;
			return;
		}
}

static int cmp_special(const void *a, const void *b, void *arg)
{
	const struct tokenizer *t = arg;
	int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
	if (t->tok[x].len != t->tok[y].len)
		return t->tok[x].len > t->tok[y].len ? -1 : 1;
	return (x > y) - (x < y);
}

static void set_attr_by_text(struct tokenizer *t, const char *text, uint32_t attr, bool on)
{
	int32_t id = text_to_token(t, text, strlen(text));
	if (id >= 0)
		t->tok[id].attr = on ? t->tok[id].attr | attr : t->tok[id].attr & ~attr;
}

static bool str_has(const char *s, const char *sub)
{
	return s && strstr(s, sub) != NULL;
}

/* llama.cpp's per-model whitespace stripping around special tokens, chosen
 * by general.name and tokenizer.ggml.pre (the GGUF has no key for it). */
static void set_strip_attrs(struct tokenizer *t, const struct gguf_file *g)
{
	const char *pre = NULL, *name = NULL;
	char lname[256] = "";
	gguf_get_str(g, "tokenizer.ggml.pre", &pre, NULL);
	if (gguf_get_str(g, "general.name", &name, NULL) == 0) {
		size_t i = 0;
		for (; name[i] && i + 1 < sizeof(lname); i++)
			lname[i] = (char)(name[i] >= 'A' && name[i] <= 'Z' ? name[i] + 32 : name[i]);
		lname[i] = '\0';
	}
	if (str_has(pre, "jina-v2-de") || str_has(pre, "jina-v2-es") || str_has(pre, "jina-v2-code")) {
		set_attr_by_text(t, "<mask>", ATTR_LSTRIP, true);
	} else if (str_has(lname, "phi-3") || str_has(lname, "phi3")) {
		for (uint32_t k = 0; k < t->n_special; k++)
			t->tok[t->special[k]].attr |= ATTR_RSTRIP;
		set_attr_by_text(t, "</s>", ATTR_RSTRIP, true);
		set_attr_by_text(t, "<unk>", ATTR_RSTRIP, false);
		set_attr_by_text(t, "<s>", ATTR_RSTRIP, false);
		set_attr_by_text(t, "<|endoftext|>", ATTR_RSTRIP, false);
	} else if (str_has(lname, "modern-bert")) {
		set_attr_by_text(t, "[MASK]", ATTR_LSTRIP, true);
	}
}

static int load_tokens(struct tokenizer *t, const struct gguf_file *g, struct moe_error *err)
{
	const struct gguf_kv *kt = gguf_find_kv(g, "tokenizer.ggml.tokens");
	if (!kt)
		return moe_error_set(err, -EINVAL, "tokenizer: no tokenizer.ggml.tokens");
	if (kt->type != GGUF_TYPE_ARRAY || kt->v.arr.type != GGUF_TYPE_STRING)
		return moe_error_set(err, -EINVAL, "tokenizer: tokenizer.ggml.tokens is not a string array");
	if (kt->v.arr.count == 0 || kt->v.arr.count > INT32_MAX)
		return moe_error_set(err, -EINVAL, "tokenizer: tokenizer.ggml.tokens has %llu entries",
				     (unsigned long long)kt->v.arr.count);
	t->n_vocab = (uint32_t)kt->v.arr.count;

	const struct gguf_kv *ks = gguf_find_kv(g, "tokenizer.ggml.scores");
	if (ks && (ks->type != GGUF_TYPE_ARRAY ||
		   (ks->v.arr.type != GGUF_TYPE_FLOAT32 && ks->v.arr.type != GGUF_TYPE_INT32)))
		return moe_error_set(err, -EINVAL, "tokenizer: tokenizer.ggml.scores is not a FLOAT32 or INT32 array");
	if (ks && ks->v.arr.count < t->n_vocab)
		return moe_error_set(err, -EINVAL, "tokenizer: tokenizer.ggml.scores has %llu < %u entries",
				     (unsigned long long)ks->v.arr.count, t->n_vocab);
	const struct gguf_kv *ky = gguf_find_kv(g, "tokenizer.ggml.token_type");
	if (ky && (ky->type != GGUF_TYPE_ARRAY || ky->v.arr.type != GGUF_TYPE_INT32))
		return moe_error_set(err, -EINVAL, "tokenizer: tokenizer.ggml.token_type is not an INT32 array");
	if (ky && ky->v.arr.count < t->n_vocab)
		return moe_error_set(err, -EINVAL, "tokenizer: tokenizer.ggml.token_type has %llu < %u entries",
				     (unsigned long long)ky->v.arr.count, t->n_vocab);

	t->tok = calloc(t->n_vocab, sizeof(*t->tok));
	if (!t->tok || strmap_init(&t->text_to_id, t->n_vocab) < 0)
		return moe_error_set(err, -ENOMEM, "tokenizer: out of memory");
	for (uint32_t i = 0; i < t->n_vocab; i++) {
		const struct gguf_str *s;
		if (gguf_arr_str(kt, i, &s) < 0)
			return moe_error_set(err, -EINVAL, "tokenizer: token %u unreadable", i);
		struct tok_entry *e = &t->tok[i];
		if (s->len == 0) {
			/* llama.cpp names empty tokens so that they stay distinct */
			char name[32];
			int n = snprintf(name, sizeof(name), "[EMPTY_%u]", i);
			e->text = strdup(name);
			e->len = (uint32_t)n;
		} else {
			if (s->len > UINT32_MAX - 1)
				return moe_error_set(err, -EINVAL, "tokenizer: token %u too long", i);
			e->text = malloc(s->len + 1);
			if (e->text) {
				memcpy(e->text, s->data, s->len);
				e->text[s->len] = '\0';
			}
			e->len = (uint32_t)s->len;
		}
		if (!e->text)
			return moe_error_set(err, -ENOMEM, "tokenizer: out of memory");
		double score = 0;
		if (ks)
			gguf_arr_f64(ks, i, &score);
		e->score = (float)score;
		e->attr = ATTR_NORMAL;
		if (ky) {
			int64_t ty = 0;
			gguf_arr_i64(ky, i, &ty);
			switch (ty) {
			case 1: e->attr = ATTR_NORMAL; break;
			case 2: e->attr = ATTR_UNKNOWN; break;
			case 3: e->attr = ATTR_CONTROL; break;
			case 4: e->attr = ATTR_USER_DEFINED; break;
			case 5: e->attr = ATTR_UNUSED; break;
			case 6: e->attr = ATTR_BYTE; break;
			default: e->attr = ATTR_UNDEFINED; break;
			}
		}
		strmap_put(&t->text_to_id, e->text, e->len, (int32_t)i, true);
	}
	return 0;
}

static int load_merges(struct tokenizer *t, const struct gguf_file *g, struct moe_error *err)
{
	const struct gguf_kv *km = gguf_find_kv(g, "tokenizer.ggml.merges");
	if (!km)
		return moe_error_set(err, -EINVAL, "tokenizer: BPE vocabulary without tokenizer.ggml.merges");
	if (km->type != GGUF_TYPE_ARRAY || km->v.arr.type != GGUF_TYPE_STRING)
		return moe_error_set(err, -EINVAL, "tokenizer: tokenizer.ggml.merges is not a string array");
	uint64_t n = km->v.arr.count, total = 0;
	if (n > INT32_MAX)
		return moe_error_set(err, -EINVAL, "tokenizer: too many merges");
	for (uint64_t i = 0; i < n; i++) {
		const struct gguf_str *s;
		if (gguf_arr_str(km, i, &s) < 0)
			return moe_error_set(err, -EINVAL, "tokenizer: merge %llu unreadable", (unsigned long long)i);
		total += s->len + 1;
	}
	if (strmap_init(&t->merges, n) < 0 || !(t->merge_keys = malloc(total + 1)))
		return moe_error_set(err, -ENOMEM, "tokenizer: out of memory");
	char *p = t->merge_keys;
	for (uint64_t i = 0; i < n; i++) {
		const struct gguf_str *s;
		gguf_arr_str(km, i, &s);
		/* "first second", split at the first space after the first byte;
		 * without one llama.cpp files the merge under an empty pair. */
		const char *sp = s->len > 1 ? memchr(s->data + 1, ' ', s->len - 1) : NULL;
		uint32_t klen = 1;
		if (sp) {
			size_t fl = (size_t)(sp - s->data);
			memcpy(p, s->data, fl);
			p[fl] = '\0';
			memcpy(p + fl + 1, sp + 1, s->len - fl - 1);
			klen = (uint32_t)s->len;
		} else {
			p[0] = '\0';
		}
		strmap_put(&t->merges, p, klen, (int32_t)i, false);
		p += klen;
	}
	return 0;
}

static int tokenizer_build(struct tokenizer *t, const struct gguf_file *g, struct moe_error *err)
{
	const char *model, *pre = NULL;
	int rc = gguf_get_str(g, "tokenizer.ggml.model", &model, NULL);
	if (rc < 0)
		return moe_error_set(err, -EINVAL, "tokenizer: %s tokenizer.ggml.model",
				     rc == -ENOENT ? "no" : "malformed");
	rc = gguf_get_str(g, "tokenizer.ggml.pre", &pre, NULL);
	if (rc < 0 && rc != -ENOENT)
		return moe_error_set(err, -EINVAL, "tokenizer: tokenizer.ggml.pre is not a string");

	if (strcmp(model, "llama") == 0) {
		t->type = TOK_SPM;
		t->pre = PRE_NONE;
		t->bos = 1;
		t->eos = 2;
		t->unk = 0;
		t->add_space_prefix = true;
		t->add_bos = true;
	} else if (strcmp(model, "gpt2") == 0) {
		t->type = TOK_BPE;
		t->bos = 11;
		t->eos = 11;
		t->pre = PRE_DEFAULT;
		if (pre && *pre) {
			t->pre = PRE_NONE;
			for (size_t i = 0; i < MOE_ARRAY_SIZE(pre_names); i++)
				if (strcmp(pre, pre_names[i].name) == 0)
					t->pre = pre_names[i].pre;
			if (t->pre == PRE_NONE)
				return moe_error_set(err, -ENOTSUP, "tokenizer: pre-tokenizer '%s' not supported "
						     "(llama.cpp's names: default, gpt-2, olmo, qwen2, llama-bpe, ...)", pre);
		}
		if (t->pre == PRE_LLAMA3) {
			t->ignore_merges = true;
			t->add_bos = true;
		}
	} else {
		return moe_error_set(err, -ENOTSUP, "tokenizer: tokenizer model '%s' not supported (llama, gpt2)", model);
	}

	if ((rc = load_tokens(t, g, err)) < 0)
		return rc;
	if (t->type == TOK_BPE && (rc = load_merges(t, g, err)) < 0)
		return rc;

	/* default ids outside the vocabulary are disabled */
	if (t->bos >= (int32_t)t->n_vocab)
		t->bos = -1;
	if (t->eos >= (int32_t)t->n_vocab)
		t->eos = -1;
	if (t->unk >= (int32_t)t->n_vocab)
		t->unk = -1;
	int32_t fim_pre = -1, fim_suf = -1, fim_mid = -1, fim_pad = -1, fim_rep = -1, fim_sep = -1;
	if ((rc = get_id(g, "tokenizer.ggml.bos_token_id", t->n_vocab, &t->bos, err)) < 0 ||
	    (rc = get_id(g, "tokenizer.ggml.eos_token_id", t->n_vocab, &t->eos, err)) < 0 ||
	    (rc = get_id(g, "tokenizer.ggml.eot_token_id", t->n_vocab, &t->eot, err)) < 0 ||
	    (rc = get_id(g, "tokenizer.ggml.eom_token_id", t->n_vocab, &t->eom, err)) < 0 ||
	    (rc = get_id(g, "tokenizer.ggml.unknown_token_id", t->n_vocab, &t->unk, err)) < 0 ||
	    (rc = get_id(g, "tokenizer.ggml.fim_pre_token_id", t->n_vocab, &fim_pre, err)) < 0 ||
	    (rc = get_id(g, "tokenizer.ggml.fim_suf_token_id", t->n_vocab, &fim_suf, err)) < 0 ||
	    (rc = get_id(g, "tokenizer.ggml.fim_mid_token_id", t->n_vocab, &fim_mid, err)) < 0 ||
	    (rc = get_id(g, "tokenizer.ggml.fim_pad_token_id", t->n_vocab, &fim_pad, err)) < 0 ||
	    (rc = get_id(g, "tokenizer.ggml.fim_rep_token_id", t->n_vocab, &fim_rep, err)) < 0 ||
	    (rc = get_id(g, "tokenizer.ggml.fim_sep_token_id", t->n_vocab, &fim_sep, err)) < 0 ||
	    (rc = get_flag(g, "tokenizer.ggml.add_bos_token", &t->add_bos, err)) < 0 ||
	    (rc = get_flag(g, "tokenizer.ggml.add_eos_token", &t->add_eos, err)) < 0 ||
	    (rc = get_flag(g, "tokenizer.ggml.add_space_prefix", &t->add_space_prefix, err)) < 0)
		return rc;
	if (t->type == TOK_BPE)
		t->add_space_prefix = false;   /* BPE never adds one, whatever the key says */

	/* Special ids llama.cpp finds by text when no key names them; each
	 * turns its token into a control token (the FIM prefix, suffix and
	 * middle ids matter here only for that). */
	detect_by_text(t, &t->eot, eot_texts);
	detect_by_text(t, &t->eom, eom_texts);
	detect_by_text(t, &fim_pre, fim_pre_texts);
	detect_by_text(t, &fim_suf, fim_suf_texts);
	detect_by_text(t, &fim_mid, fim_mid_texts);
	detect_by_text(t, &fim_pad, fim_pad_texts);
	detect_by_text(t, &fim_rep, fim_rep_texts);
	detect_by_text(t, &fim_sep, fim_sep_texts);

	t->eog = calloc(t->n_vocab, 1);
	if (!t->eog)
		return moe_error_set(err, -ENOMEM, "tokenizer: out of memory");
	for (uint32_t i = 0; i < t->n_vocab; i++)
		if (text_in(&t->tok[i], eog_texts) && text_to_token(t, t->tok[i].text, t->tok[i].len) == (int32_t)i) {
			t->eog[i] = 1;
			t->tok[i].attr |= ATTR_CONTROL;
		}
	int32_t eogs[] = { fim_pad, fim_rep, fim_sep, t->eos, t->eot, t->eom };
	for (size_t i = 0; i < MOE_ARRAY_SIZE(eogs); i++)
		if (eogs[i] >= 0)
			t->eog[eogs[i]] = 1;

	if (t->add_bos && t->bos < 0)
		return moe_error_set(err, -EINVAL, "tokenizer: add_bos_token set but no BOS token");
	if (t->add_eos && t->eos < 0)
		return moe_error_set(err, -EINVAL, "tokenizer: add_eos_token set but no EOS token");

	/* Tokens matched by text before tokenizing, longest first. */
	t->special = malloc(t->n_vocab * sizeof(*t->special));
	if (!t->special)
		return moe_error_set(err, -ENOMEM, "tokenizer: out of memory");
	for (uint32_t i = 0; i < t->n_vocab; i++)
		if (t->tok[i].attr & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))
			t->special[t->n_special++] = (int32_t)i;
	qsort_r(t->special, t->n_special, sizeof(*t->special), cmp_special, t);
	set_strip_attrs(t, g);

	if (t->type == TOK_SPM) {
		/* byte fallback: "<0xXX>", else the byte itself as a token */
		for (uint32_t b = 0; b < 256; b++) {
			char hex[7];
			snprintf(hex, sizeof(hex), "<0x%02X>", b);
			t->byte_tok[b] = text_to_token(t, hex, 6);
			if (t->byte_tok[b] < 0 && b != 0) {
				char c = (char)b;
				t->byte_tok[b] = text_to_token(t, &c, 1);
			}
		}
		return 0;
	}

	byte_unicode_init(t);
	switch (t->pre) {
	case PRE_GPT2:
		return compile_re(t, re_gpt2, err);
	case PRE_QWEN2:
		return compile_re(t, re_qwen2, err);
	case PRE_LLAMA3:
		return compile_re(t, re_llama3, err);
	default:
		for (size_t i = 0; i < MOE_ARRAY_SIZE(re_default); i++)
			if ((rc = compile_re(t, re_default[i] ? re_default[i] : re_gpt2, err)) < 0)
				return rc;
		return 0;
	}
}

int tokenizer_load(const struct gguf_file *kv, struct tokenizer **out, struct moe_error *err)
{
	*out = NULL;
	struct tokenizer *t = calloc(1, sizeof(*t));
	if (!t)
		return moe_error_set(err, -ENOMEM, "tokenizer: out of memory");
	t->bos = t->eos = t->eot = t->eom = t->unk = -1;
	int rc = tokenizer_build(t, kv, err);
	if (rc < 0) {
		tokenizer_free(t);
		return rc;
	}
	*out = t;
	return 0;
}

/* ---- the merge loop both algorithms share ----
 * Symbols are spans of one string linked into a list; a max-heap of
 * candidate pairs merges the best pair first (SPM: highest score; BPE:
 * lowest rank), ties going to the leftmost. A popped pair whose spans
 * changed since it was pushed is stale and skipped: spans only grow, so a
 * changed pair never has the pushed length. */

struct sym {
	uint32_t off, n;
	int32_t prev, next;
};

struct bigram {
	int32_t left, right;
	float score;            /* SPM: higher first */
	int32_t rank;           /* BPE: lower first */
	uint32_t size;
};

struct merger {
	const struct tokenizer *t;
	const char *s;
	struct sym *sym;
	uint32_t n_sym;
	struct bigram *heap;
	size_t n_heap, cap_heap;
	char *key;              /* BPE: "left\0right" */
	size_t cap_key;
};

/* a before b in the heap */
static bool bigram_first(const struct tokenizer *t, const struct bigram *a, const struct bigram *b)
{
	if (t->type == TOK_SPM) {
		if (a->score != b->score)
			return a->score > b->score;
	} else if (a->rank != b->rank) {
		return a->rank < b->rank;
	}
	return a->left < b->left;
}

static int heap_push(struct merger *m, const struct bigram *bg)
{
	if (m->n_heap == m->cap_heap) {
		size_t cap = m->cap_heap ? m->cap_heap * 2 : 64;
		struct bigram *h = realloc(m->heap, cap * sizeof(*h));
		if (!h)
			return -ENOMEM;
		m->heap = h;
		m->cap_heap = cap;
	}
	size_t i = m->n_heap++;
	while (i > 0) {
		size_t p = (i - 1) / 2;
		if (!bigram_first(m->t, bg, &m->heap[p]))
			break;
		m->heap[i] = m->heap[p];
		i = p;
	}
	m->heap[i] = *bg;
	return 0;
}

static struct bigram heap_pop(struct merger *m)
{
	struct bigram top = m->heap[0];
	struct bigram last = m->heap[--m->n_heap];
	size_t i = 0, n = m->n_heap;
	for (;;) {
		size_t c = 2 * i + 1;
		if (c >= n)
			break;
		if (c + 1 < n && bigram_first(m->t, &m->heap[c + 1], &m->heap[c]))
			c++;
		if (!bigram_first(m->t, &m->heap[c], &last))
			break;
		m->heap[i] = m->heap[c];
		i = c;
	}
	if (n)
		m->heap[i] = last;
	return top;
}

static int try_add_bigram(struct merger *m, int32_t left, int32_t right)
{
	if (left < 0 || right < 0)
		return 0;
	const struct sym *l = &m->sym[left], *r = &m->sym[right];
	struct bigram bg = { .left = left, .right = right, .size = l->n + r->n };
	if (m->t->type == TOK_SPM) {
		int32_t id = text_to_token(m->t, m->s + l->off, bg.size);
		if (id < 0)
			return 0;
		bg.score = m->t->tok[id].score;
	} else {
		size_t kl = (size_t)bg.size + 1;
		if (kl > m->cap_key) {
			char *k = realloc(m->key, kl * 2);
			if (!k)
				return -ENOMEM;
			m->key = k;
			m->cap_key = kl * 2;
		}
		memcpy(m->key, m->s + l->off, l->n);
		m->key[l->n] = '\0';
		memcpy(m->key + l->n + 1, m->s + r->off, r->n);
		bg.rank = strmap_get(&m->t->merges, m->key, kl);
		if (bg.rank < 0)
			return 0;
	}
	return heap_push(m, &bg);
}

/* Splits s[0..len) into UTF-8 characters and merges them. */
static int merge_run(struct merger *m, const char *s, size_t len)
{
	m->s = s;
	m->n_sym = 0;
	m->n_heap = 0;
	if (len > UINT32_MAX)
		return -E2BIG;
	struct sym *sy = realloc(m->sym, (len ? len : 1) * sizeof(*sy));
	if (!sy)
		return -ENOMEM;
	m->sym = sy;
	for (size_t off = 0; off < len;) {
		size_t n = MOE_MIN(utf8_len((uint8_t)s[off]), len - off);
		int32_t i = (int32_t)m->n_sym++;
		sy[i] = (struct sym){ (uint32_t)off, (uint32_t)n, i - 1, off + n == len ? -1 : i + 1 };
		off += n;
	}
	int rc;
	for (uint32_t i = 1; i < m->n_sym; i++)
		if ((rc = try_add_bigram(m, (int32_t)i - 1, (int32_t)i)) < 0)
			return rc;
	while (m->n_heap) {
		struct bigram bg = heap_pop(m);
		struct sym *l = &sy[bg.left], *r = &sy[bg.right];
		if (l->n == 0 || r->n == 0 || l->n + r->n != bg.size)
			continue;
		l->n += r->n;
		r->n = 0;
		l->next = r->next;
		if (r->next >= 0)
			sy[r->next].prev = bg.left;
		if ((rc = try_add_bigram(m, l->prev, bg.left)) < 0 ||
		    (rc = try_add_bigram(m, bg.left, l->next)) < 0)
			return rc;
	}
	return 0;
}

/* ---- SentencePiece ---- */

static int spm_fragment(const struct tokenizer *t, struct merger *m, const char *text, size_t len,
			bool space_prefix, struct ids *out, struct moe_error *err)
{
	/* the text with every ' ' as "▁" (U+2581), after an optional one */
	struct sbuf s = { 0 };
	int rc = 0;
	if (space_prefix)
		rc = sbuf_put(&s, "\xe2\x96\x81", 3);
	for (size_t i = 0; i < len && rc == 0; i++)
		rc = text[i] == ' ' ? sbuf_put(&s, "\xe2\x96\x81", 3) : sbuf_put(&s, &text[i], 1);
	if (rc == 0 && s.n)
		rc = merge_run(m, s.b, s.n);
	if (rc < 0)
		goto out;
	for (int32_t i = s.n ? 0 : -1; i >= 0 && rc == 0; i = m->sym[i].next) {
		const struct sym *y = &m->sym[i];
		int32_t id = text_to_token(t, s.b + y->off, y->n);
		if (id >= 0) {
			rc = ids_push(out, id);
			continue;
		}
		/* a character outside the vocabulary: its bytes */
		for (uint32_t j = 0; j < y->n && rc == 0; j++) {
			uint8_t b = (uint8_t)s.b[y->off + j];
			if (t->byte_tok[b] < 0) {
				rc = moe_error_set(err, -EILSEQ, "tokenizer: byte 0x%02X has no token "
						   "(no <0x%02X> in the vocabulary)", b, b);
				break;
			}
			rc = ids_push(out, t->byte_tok[b]);
		}
	}
out:
	free(s.b);
	return rc == -ENOMEM ? moe_error_set(err, rc, "tokenizer: out of memory") : rc;
}

/* ---- byte-level BPE ---- */

struct span {
	size_t off, len;
};

struct spans {
	struct span *v;
	size_t n, cap;
};

static int spans_push(struct spans *a, size_t off, size_t len)
{
	if (a->n == a->cap) {
		size_t cap = a->cap ? a->cap * 2 : 64;
		struct span *v = realloc(a->v, cap * sizeof(*v));
		if (!v)
			return -ENOMEM;
		a->v = v;
		a->cap = cap;
	}
	a->v[a->n++] = (struct span){ off, len };
	return 0;
}

/* Splits each span with one regex: matches and the gaps between them both
 * become spans. Each span is matched alone, so lookaheads end at its end. */
static int regex_split(const pcre2_code *re, const char *subj, const struct spans *in, struct spans *out,
		       struct moe_error *err)
{
	pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
	if (!md)
		return -ENOMEM;
	int rc = 0;
	out->n = 0;
	for (size_t k = 0; k < in->n && rc == 0; k++) {
		const char *s = subj + in->v[k].off;
		size_t len = in->v[k].len, pos = 0, prev = 0;
		while (pos < len) {
			int m = pcre2_match(re, (PCRE2_SPTR)s, len, pos, PCRE2_NO_UTF_CHECK, md, NULL);
			if (m == PCRE2_ERROR_NOMATCH)
				break;
			if (m < 0) {
				PCRE2_UCHAR msg[160];
				pcre2_get_error_message(m, msg, sizeof(msg));
				rc = moe_error_set(err, -EINVAL, "tokenizer: regex match: %s", (char *)msg);
				break;
			}
			PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
			size_t ms = ov[0], me = ov[1];
			if (me == ms) {
				/* empty match (none of the patterns has one): step a character */
				pos = ms + MOE_MIN(utf8_len((uint8_t)s[ms]), len - ms);
				continue;
			}
			if (ms > prev && (rc = spans_push(out, in->v[k].off + prev, ms - prev)) < 0)
				break;
			if ((rc = spans_push(out, in->v[k].off + ms, me - ms)) < 0)
				break;
			prev = pos = me;
		}
		if (rc == 0 && prev < len)
			rc = spans_push(out, in->v[k].off + prev, len - prev);
	}
	pcre2_match_data_free(md);
	return rc;
}

static int bpe_word(const struct tokenizer *t, struct merger *m, const char *w, size_t len, struct ids *out)
{
	int rc;
	int32_t whole = t->ignore_merges ? text_to_token(t, w, len) : -1;
	if (whole >= 0)
		return ids_push(out, whole);
	if ((rc = merge_run(m, w, len)) < 0)
		return rc;
	for (int32_t i = len ? 0 : -1; i >= 0; i = m->sym[i].next) {
		const struct sym *y = &m->sym[i];
		int32_t id = text_to_token(t, w + y->off, y->n);
		if (id >= 0) {
			if ((rc = ids_push(out, id)) < 0)
				return rc;
			continue;
		}
		/* llama.cpp then looks each byte up alone and drops the misses */
		for (uint32_t j = 0; j < y->n; j++) {
			id = text_to_token(t, w + y->off + j, 1);
			if (id >= 0 && (rc = ids_push(out, id)) < 0)
				return rc;
		}
	}
	return 0;
}

static int bpe_fragment(const struct tokenizer *t, struct merger *m, const char *text, size_t len,
			struct ids *out, struct moe_error *err)
{
	/* Decode as llama.cpp does (invalid bytes become U+FFFD) and re-encode:
	 * enc holds the bytes the words are made of; subj the same with
	 * surrogates as U+FFFD (equally long) so that PCRE2 sees valid UTF-8. */
	struct sbuf enc = { 0 }, subj = { 0 }, word = { 0 };
	struct spans a = { 0 }, b = { 0 };
	int rc = 0;
	for (size_t off = 0; off < len && rc == 0;) {
		uint32_t cp = utf8_next((const uint8_t *)text, len, &off);
		if (cp > 0x10ffff)
			cp = 0xFFFD;
		char u[4];
		size_t n = utf8_put(cp, u);
		rc = sbuf_put(&enc, u, n);
		if (rc == 0 && cp >= 0xd800 && cp <= 0xdfff)
			rc = sbuf_put(&subj, "\xef\xbf\xbd", 3);
		else if (rc == 0)
			rc = sbuf_put(&subj, u, n);
	}
	if (rc == 0 && enc.n)
		rc = spans_push(&a, 0, enc.n);
	for (uint32_t r = 0; r < t->n_re && rc == 0; r++) {
		rc = regex_split(t->re[r], subj.b, &a, &b, err);
		struct spans tmp = a;
		a = b;
		b = tmp;
	}
	for (size_t k = 0; k < a.n && rc == 0; k++) {
		word.n = 0;
		for (size_t i = 0; i < a.v[k].len && rc == 0; i++) {
			const char *u = t->byte_unicode[(uint8_t)enc.b[a.v[k].off + i]];
			rc = sbuf_put(&word, u, strlen(u));
		}
		if (rc == 0)
			rc = bpe_word(t, m, word.b, word.n, out);
	}
	free(enc.b);
	free(subj.b);
	free(word.b);
	free(a.v);
	free(b.v);
	return rc == -ENOMEM ? moe_error_set(err, rc, "tokenizer: out of memory") : rc;
}

/* ---- special tokens and the whole text ---- */

struct frag {
	int32_t id;             /* -1: raw text */
	size_t off, len;
};

struct frags {
	struct frag *v;
	size_t n, cap;
};

static int frags_push(struct frags *a, int32_t id, size_t off, size_t len)
{
	if (a->n == a->cap) {
		size_t cap = a->cap ? a->cap * 2 : 16;
		struct frag *v = realloc(a->v, cap * sizeof(*v));
		if (!v)
			return -ENOMEM;
		a->v = v;
		a->cap = cap;
	}
	a->v[a->n++] = (struct frag){ id, off, len };
	return 0;
}

static bool is_c_space(char c)
{
	return c == ' ' || (c >= '\t' && c <= '\r');
}

/* Cuts the text at every occurrence of each special token, longest token
 * first; control and unknown tokens only when parse_special (user-defined
 * ones always, as in llama.cpp). */
static int partition(const struct tokenizer *t, const char *text, size_t len, bool parse_special,
		     struct frags *out)
{
	struct frags a = { 0 }, b = { 0 };
	int rc = 0;
	if (len)
		rc = frags_push(&a, -1, 0, len);
	for (uint32_t k = 0; k < t->n_special && rc == 0; k++) {
		const struct tok_entry *e = &t->tok[t->special[k]];
		if (!parse_special && (e->attr & (ATTR_CONTROL | ATTR_UNKNOWN)))
			continue;
		b.n = 0;
		for (size_t f = 0; f < a.n && rc == 0; f++) {
			struct frag fr = a.v[f];
			if (fr.id >= 0) {
				rc = frags_push(&b, fr.id, 0, 0);
				continue;
			}
			size_t pos = fr.off, end = fr.off + fr.len;
			for (;;) {
				const char *hit = end - pos >= e->len ? memmem(text + pos, end - pos, e->text, e->len) : NULL;
				if (!hit) {
					if (end > pos)
						rc = frags_push(&b, -1, pos, end - pos);
					break;
				}
				size_t at = (size_t)(hit - text), left = at;
				if (e->attr & ATTR_LSTRIP)
					while (left > pos && is_c_space(text[left - 1]))
						left--;
				if (left > pos && (rc = frags_push(&b, -1, pos, left - pos)) < 0)
					break;
				if ((rc = frags_push(&b, t->special[k], 0, 0)) < 0)
					break;
				pos = at + e->len;
				if (e->attr & ATTR_RSTRIP)
					while (pos < end && is_c_space(text[pos]))
						pos++;
			}
		}
		struct frags tmp = a;
		a = b;
		b = tmp;
	}
	free(b.v);
	if (rc < 0) {
		free(a.v);
		return rc;
	}
	*out = a;
	return 0;
}

int tokenizer_encode(const struct tokenizer *t, const char *text, size_t len, bool add_special,
		     bool parse_special, int32_t **ids, size_t *n, struct moe_error *err)
{
	*ids = NULL;
	*n = 0;
	struct frags fr = { 0 };
	struct ids out = { 0 };
	struct merger m = { .t = t };
	int rc = partition(t, text, len, parse_special, &fr);
	if (rc < 0)
		return moe_error_set(err, rc, "tokenizer: out of memory");

	if (add_special && t->add_bos)
		rc = ids_push(&out, t->bos);
	bool prev_special = true;   /* SPM: the first text gets the "▁" prefix too */
	for (size_t i = 0; i < fr.n && rc == 0; i++) {
		if (fr.v[i].id >= 0) {
			rc = ids_push(&out, fr.v[i].id);
			prev_special = true;
			continue;
		}
		if (t->type == TOK_SPM)
			rc = spm_fragment(t, &m, text + fr.v[i].off, fr.v[i].len,
					  t->add_space_prefix && prev_special, &out, err);
		else
			rc = bpe_fragment(t, &m, text + fr.v[i].off, fr.v[i].len, &out, err);
		prev_special = false;
	}
	if (rc == 0 && add_special && t->add_eos)
		rc = ids_push(&out, t->eos);

	free(fr.v);
	free(m.sym);
	free(m.heap);
	free(m.key);
	if (rc < 0) {
		free(out.v);
		return rc == -ENOMEM ? moe_error_set(err, rc, "tokenizer: out of memory") : rc;
	}
	if (!out.v)
		out.v = malloc(sizeof(int32_t));   /* a valid pointer even for no ids */
	if (!out.v)
		return moe_error_set(err, -ENOMEM, "tokenizer: out of memory");
	*ids = out.v;
	*n = out.n;
	return 0;
}

/* ---- ids back to text ---- */

static int copy_out(char *buf, size_t cap, const char *s, size_t n)
{
	if (n > INT32_MAX)
		return -E2BIG;
	if (n > cap)
		return -ENOSPC;
	if (n)
		memcpy(buf, s, n);
	return (int)n;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

int tokenizer_piece(const struct tokenizer *t, int32_t id, char *buf, size_t cap)
{
	if (id < 0 || (uint32_t)id >= t->n_vocab)
		return -EINVAL;
	const struct tok_entry *e = &t->tok[id];
	if (e->attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED))
		return copy_out(buf, cap, e->text, e->len);
	if (e->attr & ATTR_BYTE) {
		/* "<0xXX>" */
		int hi = e->len >= 5 ? hexval(e->text[3]) : -1, lo = e->len >= 5 ? hexval(e->text[4]) : -1;
		char c = (char)(hi < 0 ? 0 : lo < 0 ? hi : hi * 16 + lo);
		return copy_out(buf, cap, &c, 1);
	}
	if (!(e->attr & ATTR_NORMAL))
		return 0;

	size_t n = 0;
	if (t->type == TOK_SPM) {
		for (uint32_t i = 0; i < e->len;) {
			if (e->len - i >= 3 && memcmp(e->text + i, "\xe2\x96\x81", 3) == 0) {
				if (n + 1 > cap)
					return -ENOSPC;
				buf[n++] = ' ';
				i += 3;
			} else {
				if (n + 1 > cap)
					return -ENOSPC;
				buf[n++] = e->text[i++];
			}
		}
		return (int)n;
	}
	/* GPT-2 byte-unicode undone; a code point outside the map is written
	 * as llama.cpp writes it, "[UNK_BYTE_0x<utf-8 hex><token text>]". */
	for (size_t off = 0; off < e->len;) {
		uint32_t cp = utf8_next((const uint8_t *)e->text, e->len, &off);
		int b = unicode_byte(cp);
		if (b >= 0) {
			if (n + 1 > cap)
				return -ENOSPC;
			buf[n++] = (char)b;
			continue;
		}
		char u[4], tmp[64];
		size_t ul = utf8_put(cp, u);
		int k = snprintf(tmp, sizeof(tmp), "[UNK_BYTE_0x");
		for (size_t j = 0; j < ul; j++)
			k += snprintf(tmp + k, sizeof(tmp) - (size_t)k, "%02x", (uint8_t)u[j]);
		if (n + (size_t)k + e->len + 1 > cap)
			return -ENOSPC;
		memcpy(buf + n, tmp, (size_t)k);
		n += (size_t)k;
		memcpy(buf + n, e->text, e->len);
		n += e->len;
		buf[n++] = ']';
	}
	return (int)n;
}

uint32_t tokenizer_n_vocab(const struct tokenizer *t)
{
	return t->n_vocab;
}

int32_t tokenizer_bos(const struct tokenizer *t)
{
	return t->bos;
}

int32_t tokenizer_eos(const struct tokenizer *t)
{
	return t->eos;
}

bool tokenizer_is_eog(const struct tokenizer *t, int32_t id)
{
	return id >= 0 && (uint32_t)id < t->n_vocab && t->eog[id];
}

bool tokenizer_adds_space_prefix(const struct tokenizer *t)
{
	return t->type == TOK_SPM && t->add_space_prefix;
}
