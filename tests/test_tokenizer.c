/* test_tokenizer.c - client/run/tokenizer.c on small vocabularies built here
 * as GGUF KV images: a SentencePiece one (scores, byte fallback) and a
 * byte-level BPE one (merges) under the GPT-2, Qwen2, OLMo and default
 * pre-tokenizers. The expected ids were worked out by hand from the
 * algorithms (each case's comment gives the merge order); the same
 * algorithms agree with llama.cpp on its own vocabularies
 * (tests/test_tokenizer_llama.sh). */
#include "config.h"

#include <criterion/criterion.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "tokenizer.h"

/* ---- a GGUF v3 image with KV pairs only ---- */

struct gb {
	uint8_t *b;
	size_t len, cap;
	uint64_t n_kv;
};

static void put(struct gb *g, const void *p, size_t n)
{
	if (g->len + n > g->cap) {
		g->cap = (g->len + n) * 2 + 64;
		g->b = realloc(g->b, g->cap);
		cr_assert_not_null(g->b);
	}
	memcpy(g->b + g->len, p, n);
	g->len += n;
}

static void u32(struct gb *g, uint32_t v) { uint8_t b[4]; for (int i = 0; i < 4; i++) b[i] = (uint8_t)(v >> (8 * i)); put(g, b, 4); }
static void u64(struct gb *g, uint64_t v) { uint8_t b[8]; for (int i = 0; i < 8; i++) b[i] = (uint8_t)(v >> (8 * i)); put(g, b, 8); }
static void strn(struct gb *g, const char *s, size_t n) { u64(g, n); put(g, s, n); }
static void str(struct gb *g, const char *s) { strn(g, s, strlen(s)); }

static void kv_str(struct gb *g, const char *k, const char *v) { str(g, k); u32(g, GGUF_TYPE_STRING); str(g, v); g->n_kv++; }
static void kv_u32(struct gb *g, const char *k, uint32_t v) { str(g, k); u32(g, GGUF_TYPE_UINT32); u32(g, v); g->n_kv++; }
static void kv_bool(struct gb *g, const char *k, bool v) { str(g, k); u32(g, GGUF_TYPE_BOOL); uint8_t b = v; put(g, &b, 1); g->n_kv++; }

static void kv_arr_str(struct gb *g, const char *k, char **v, size_t n)
{
	str(g, k);
	u32(g, GGUF_TYPE_ARRAY);
	u32(g, GGUF_TYPE_STRING);
	u64(g, n);
	for (size_t i = 0; i < n; i++)
		str(g, v[i]);
	g->n_kv++;
}

static void kv_arr_f32(struct gb *g, const char *k, const float *v, size_t n)
{
	str(g, k);
	u32(g, GGUF_TYPE_ARRAY);
	u32(g, GGUF_TYPE_FLOAT32);
	u64(g, n);
	for (size_t i = 0; i < n; i++) {
		uint32_t x;
		memcpy(&x, &v[i], 4);
		u32(g, x);
	}
	g->n_kv++;
}

static void kv_arr_i32(struct gb *g, const char *k, const int32_t *v, size_t n)
{
	str(g, k);
	u32(g, GGUF_TYPE_ARRAY);
	u32(g, GGUF_TYPE_INT32);
	u64(g, n);
	for (size_t i = 0; i < n; i++)
		u32(g, (uint32_t)v[i]);
	g->n_kv++;
}

/* The image: header then the KV bytes collected in body. */
static uint8_t *image(struct gb *body, size_t *len)
{
	struct gb h = { 0 };
	put(&h, "GGUF", 4);
	u32(&h, 3);
	u64(&h, 0);
	u64(&h, body->n_kv);
	put(&h, body->b, body->len);
	free(body->b);
	*len = h.len;
	return h.b;
}

/* ---- a vocabulary under construction ---- */

struct vocab {
	char *text[1024];
	float score[1024];
	int32_t type[1024];
	size_t n;
	char *merge[64];
	size_t n_merge;
};

static int32_t add_tok(struct vocab *v, const char *text, float score, int32_t type)
{
	cr_assert_lt(v->n, 1024);
	v->text[v->n] = strdup(text);
	v->score[v->n] = score;
	v->type[v->n] = type;
	return (int32_t)v->n++;
}

static void vocab_free(struct vocab *v)
{
	for (size_t i = 0; i < v->n; i++)
		free(v->text[i]);
	for (size_t i = 0; i < v->n_merge; i++)
		free(v->merge[i]);
	memset(v, 0, sizeof(*v));
}

static struct tokenizer *load_image(uint8_t *img, size_t len, int expect_rc)
{
	struct gguf_file *g;
	struct moe_error err = { { 0 } };
	cr_assert_eq(gguf_parse(img, len, &g, &err), 0, "%s", err.msg);
	struct tokenizer *t = NULL;
	int rc = tokenizer_load(g, &t, &err);
	gguf_close(g);
	free(img);
	cr_assert_eq(rc, expect_rc, "tokenizer_load: %d (%s)", rc, err.msg);
	return t;
}

/* ---- the SentencePiece vocabulary ---- */

enum { T_NORMAL = 1, T_UNKNOWN = 2, T_CONTROL = 3, T_USER = 4, T_BYTE = 6 };

static struct vocab spm;
#define SPM_BYTE(b) (3 + (b))

static int32_t sid(const char *text)
{
	for (size_t i = 0; i < spm.n; i++)
		if (strcmp(spm.text[i], text) == 0)
			return (int32_t)i;
	cr_assert_fail("no token '%s'", text);
	return -1;
}

/* "▁" is U+2581. Higher score merges first. */
static void spm_vocab(void)
{
	vocab_free(&spm);
	add_tok(&spm, "<unk>", 0, T_UNKNOWN);
	add_tok(&spm, "<s>", 0, T_CONTROL);
	add_tok(&spm, "</s>", 0, T_CONTROL);
	for (int b = 0; b < 256; b++) {
		char s[8];
		snprintf(s, sizeof(s), "<0x%02X>", b);
		add_tok(&spm, s, 0, T_BYTE);
	}
	static const char *const chars[] = {
		"\xe2\x96\x81", "h", "e", "l", "o", "w", "r", "d", "n", "'", "t", "1", "2", "3", "a", "b",
		"\xc3\xa9" /* é */, "\xe6\x97\xa5" /* 日 */, "\xe6\x9c\xac" /* 本 */,
	};
	for (size_t i = 0; i < MOE_ARRAY_SIZE(chars); i++)
		add_tok(&spm, chars[i], -1.0f - (float)i * 0.01f, T_NORMAL);
	add_tok(&spm, "\xe2\x96\x81\xe2\x96\x81", -1.5f, T_NORMAL); /* ▁▁ */
	add_tok(&spm, "12", -2.5f, T_NORMAL);
	add_tok(&spm, "aa", -2.75f, T_NORMAL);
	add_tok(&spm, "ll", -3, T_NORMAL);
	add_tok(&spm, "he", -4, T_NORMAL);
	add_tok(&spm, "llo", -5, T_NORMAL);
	add_tok(&spm, "hello", -6, T_NORMAL);
	add_tok(&spm, "\xe2\x96\x81hello", -7, T_NORMAL);
	add_tok(&spm, "\xe2\x96\x81w", -8, T_NORMAL);
	add_tok(&spm, "or", -9, T_NORMAL);
	add_tok(&spm, "\xe2\x96\x81wor", -10, T_NORMAL);
	add_tok(&spm, "ld", -11, T_NORMAL);
	add_tok(&spm, "\xe2\x96\x81world", -12, T_NORMAL);
	add_tok(&spm, "'t", -13, T_NORMAL);
	add_tok(&spm, "on", -14, T_NORMAL);
	add_tok(&spm, "\xe2\x96\x81" "d", -15, T_NORMAL);
	add_tok(&spm, "\xe2\x96\x81" "don", -16, T_NORMAL);
	add_tok(&spm, "\xe6\x97\xa5\xe6\x9c\xac", -20, T_NORMAL); /* 日本 */
	add_tok(&spm, "<sep>", 0, T_USER);
}

static uint8_t *spm_image(size_t *len, const char *extra_bool, bool extra_val)
{
	struct gb g = { 0 };
	kv_str(&g, "general.architecture", "llama");
	kv_str(&g, "tokenizer.ggml.model", "llama");
	kv_arr_str(&g, "tokenizer.ggml.tokens", spm.text, spm.n);
	kv_arr_f32(&g, "tokenizer.ggml.scores", spm.score, spm.n);
	kv_arr_i32(&g, "tokenizer.ggml.token_type", spm.type, spm.n);
	kv_u32(&g, "tokenizer.ggml.bos_token_id", 1);
	kv_u32(&g, "tokenizer.ggml.eos_token_id", 2);
	kv_u32(&g, "tokenizer.ggml.unknown_token_id", 0);
	if (extra_bool)
		kv_bool(&g, extra_bool, extra_val);
	return image(&g, len);
}

static struct tokenizer *spm_load(const char *extra_bool, bool extra_val)
{
	spm_vocab();
	size_t len;
	uint8_t *img = spm_image(&len, extra_bool, extra_val);
	return load_image(img, len, 0);
}

/* ---- checking ids ---- */

static void expect_ids(const struct tokenizer *t, const char *text, size_t len, bool add, bool parse,
		       const int32_t *want, size_t n_want)
{
	int32_t *ids;
	size_t n;
	struct moe_error err = { { 0 } };
	int rc = tokenizer_encode(t, text, len, add, parse, &ids, &n, &err);
	cr_assert_eq(rc, 0, "encode '%s': %s", text, err.msg);
	char got[1024] = "", exp[1024] = "";
	for (size_t i = 0; i < n && strlen(got) < 1000; i++)
		snprintf(got + strlen(got), sizeof(got) - strlen(got), "%d ", ids[i]);
	for (size_t i = 0; i < n_want && strlen(exp) < 1000; i++)
		snprintf(exp + strlen(exp), sizeof(exp) - strlen(exp), "%d ", want[i]);
	cr_expect_str_eq(got, exp, "'%s' (add %d parse %d): got [%s] want [%s]", text, add, parse, got, exp);
	free(ids);
}

#define IDS(...) ((const int32_t[]){ __VA_ARGS__ }), (sizeof((const int32_t[]){ __VA_ARGS__ }) / sizeof(int32_t))
#define EXPECT(t, text, add, parse, ...) expect_ids(t, text, strlen(text), add, parse, IDS(__VA_ARGS__))

/* decode: the pieces concatenated */
static char *decode(const struct tokenizer *t, const int32_t *ids, size_t n)
{
	size_t cap = 16, len = 0;
	char *s = malloc(cap);
	for (size_t i = 0; i < n; i++) {
		int k;
		while ((k = tokenizer_piece(t, ids[i], s + len, cap - len - 1)) == -ENOSPC) {
			cap *= 2;
			s = realloc(s, cap);
		}
		cr_assert_geq(k, 0, "piece %d: %d", ids[i], k);
		len += (size_t)k;
	}
	s[len] = '\0';
	return s;
}

static void round_trip(const struct tokenizer *t, const char *text, bool spm_space)
{
	int32_t *ids;
	size_t n;
	struct moe_error err = { { 0 } };
	cr_assert_eq(tokenizer_encode(t, text, strlen(text), false, false, &ids, &n, &err), 0, "%s", err.msg);
	char *s = decode(t, ids, n);
	/* SentencePiece adds the "▁" prefix: the decoded text starts with a space */
	const char *back = s;
	if (spm_space) {
		cr_assert_eq(s[0], ' ', "'%s' decoded without its leading space: '%s'", text, s);
		back = s + 1;
	}
	cr_expect_str_eq(back, text, "round trip of '%s' gave '%s'", text, back);
	free(s);
	free(ids);
}

/* ---- SentencePiece cases ---- */

Test(spm, merges_by_score)
{
	struct tokenizer *t = spm_load(NULL, false);
	/* "▁hello▁world": ll(-3) he(-4) llo(-5) hello(-6) ▁hello(-7) ▁w(-8)
	 * or(-9) ▁wor(-10) ld(-11) ▁world(-12) */
	EXPECT(t, "hello world", false, false, sid("\xe2\x96\x81hello"), sid("\xe2\x96\x81world"));
	/* BOS from add_special (SPM adds BOS by default, never EOS) */
	EXPECT(t, "hello world", true, false, 1, sid("\xe2\x96\x81hello"), sid("\xe2\x96\x81world"));
	/* 't(-13) on(-14) ▁d(-15) ▁don(-16) */
	EXPECT(t, "don't", false, false, sid("\xe2\x96\x81" "don"), sid("'t"));
	/* digits: only "12" exists */
	EXPECT(t, "1231", false, false, sid("\xe2\x96\x81"), sid("12"), sid("3"), sid("1"));
	/* equal scores: the leftmost pair first, so "aaa" is [aa][a] */
	EXPECT(t, "aaa", false, false, sid("\xe2\x96\x81"), sid("aa"), sid("a"));
	tokenizer_free(t);
}

Test(spm, spaces_newlines_and_bytes)
{
	struct tokenizer *t = spm_load(NULL, false);
	/* "▁a▁▁b": the space pair merges */
	EXPECT(t, "a  b", false, false, sid("\xe2\x96\x81"), sid("a"), sid("\xe2\x96\x81\xe2\x96\x81"), sid("b"));
	/* a leading space meets the added one */
	EXPECT(t, " a", false, false, sid("\xe2\x96\x81\xe2\x96\x81"), sid("a"));
	/* "\n" is not a piece: byte fallback <0x0A> */
	EXPECT(t, "a\nb", false, false, sid("\xe2\x96\x81"), sid("a"), SPM_BYTE(0x0a), sid("b"));
	/* é and 日本 are pieces; "llo" merges around é */
	EXPECT(t, "h\xc3\xa9llo \xe6\x97\xa5\xe6\x9c\xac", false, false, sid("\xe2\x96\x81"), sid("h"),
	       sid("\xc3\xa9"), sid("llo"), sid("\xe2\x96\x81"), sid("\xe6\x97\xa5\xe6\x9c\xac"));
	/* the llama emoji U+1F999 is not: its four bytes */
	EXPECT(t, "\xf0\x9f\xa6\x99", false, false, sid("\xe2\x96\x81"), SPM_BYTE(0xf0), SPM_BYTE(0x9f),
	       SPM_BYTE(0xa6), SPM_BYTE(0x99));
	/* an invalid byte goes through the fallback as it is */
	EXPECT(t, "a\xff", false, false, sid("\xe2\x96\x81"), sid("a"), SPM_BYTE(0xff));
	/* the empty text: nothing, or just BOS */
	expect_ids(t, "", 0, false, false, NULL, 0);
	EXPECT(t, "", true, false, 1);
	tokenizer_free(t);
}

Test(spm, special_tokens)
{
	struct tokenizer *t = spm_load(NULL, false);
	/* parsed: every text after a special token gets the "▁" prefix again */
	EXPECT(t, "<s>hello</s>", true, true, 1, 1, sid("\xe2\x96\x81hello"), 2);
	EXPECT(t, "hello</s>world", false, true, sid("\xe2\x96\x81hello"), 2, sid("\xe2\x96\x81world"));
	/* not parsed: "<s>" is text (bytes here) */
	EXPECT(t, "<s>", false, false, sid("\xe2\x96\x81"), SPM_BYTE('<'), SPM_BYTE('s'), SPM_BYTE('>'));
	/* user-defined tokens are matched even without parse_special */
	EXPECT(t, "a<sep>b", false, false, sid("\xe2\x96\x81"), sid("a"), sid("<sep>"), sid("\xe2\x96\x81"), sid("b"));
	cr_expect_eq(tokenizer_bos(t), 1);
	cr_expect_eq(tokenizer_eos(t), 2);
	cr_expect(tokenizer_is_eog(t, 2));
	cr_expect(!tokenizer_is_eog(t, 1));
	cr_expect(!tokenizer_is_eog(t, -1));
	cr_expect(!tokenizer_is_eog(t, (int32_t)spm.n));
	cr_expect_eq(tokenizer_n_vocab(t), spm.n);
	cr_expect(tokenizer_adds_space_prefix(t));
	tokenizer_free(t);
}

Test(spm, keys_change_defaults)
{
	struct tokenizer *t = spm_load("tokenizer.ggml.add_space_prefix", false);
	EXPECT(t, "hello", false, false, sid("hello"));
	cr_expect(!tokenizer_adds_space_prefix(t));
	tokenizer_free(t);
	t = spm_load("tokenizer.ggml.add_bos_token", false);
	EXPECT(t, "hello", true, false, sid("\xe2\x96\x81hello"));
	tokenizer_free(t);
	t = spm_load("tokenizer.ggml.add_eos_token", true);
	EXPECT(t, "hello", true, false, 1, sid("\xe2\x96\x81hello"), 2);
	tokenizer_free(t);
}

Test(spm, pieces_and_round_trip)
{
	struct tokenizer *t = spm_load(NULL, false);
	char buf[16];
	cr_expect_eq(tokenizer_piece(t, sid("\xe2\x96\x81hello"), buf, sizeof(buf)), 6);
	cr_expect_eq(memcmp(buf, " hello", 6), 0);
	cr_expect_eq(tokenizer_piece(t, SPM_BYTE(0x0a), buf, sizeof(buf)), 1);
	cr_expect_eq(buf[0], '\n');
	cr_expect_eq(tokenizer_piece(t, 2, buf, sizeof(buf)), 4);   /* control: its text */
	cr_expect_eq(memcmp(buf, "</s>", 4), 0);
	cr_expect_eq(tokenizer_piece(t, sid("\xe2\x96\x81hello"), buf, 3), -ENOSPC);
	cr_expect_eq(tokenizer_piece(t, -1, buf, sizeof(buf)), -EINVAL);
	cr_expect_eq(tokenizer_piece(t, (int32_t)spm.n, buf, sizeof(buf)), -EINVAL);
	static const char *const texts[] = {
		"hello world", "don't", "a  b\n\n c", "h\xc3\xa9llo \xe6\x97\xa5\xe6\x9c\xac", "\xf0\x9f\xa6\x99 ok",
		"  leading and trailing  ", "12312", "tab\there", "x",
	};
	for (size_t i = 0; i < MOE_ARRAY_SIZE(texts); i++)
		round_trip(t, texts[i], true);
	tokenizer_free(t);
}

/* ---- the byte-level BPE vocabulary ---- */

static struct vocab bpe;

/* GPT-2's byte-to-unicode map, written out again here */
static void byte_char(int b, char out[3])
{
	int n = 0, cp = -1;
	for (int x = 0; x < 256; x++) {
		bool keep = (x >= 0x21 && x <= 0x7e) || (x >= 0xa1 && x <= 0xac) || x >= 0xae;
		int c = keep ? x : 256 + n++;
		if (x == b)
			cp = c;
	}
	memset(out, 0, 3);
	if (cp < 0x80) {
		out[0] = (char)cp;
	} else {
		out[0] = (char)(0xc0 | (cp >> 6));
		out[1] = (char)(0x80 | (cp & 0x3f));
	}
}

static int32_t bid(const char *text)
{
	for (size_t i = 0; i < bpe.n; i++)
		if (strcmp(bpe.text[i], text) == 0)
			return (int32_t)i;
	cr_assert_fail("no token '%s'", text);
	return -1;
}

/* Byte b's token is id b. "Ġ" is U+0120 (space), "Ċ" U+010A (newline),
 * "Ã©" the bytes of é. */
static void bpe_merge(const char *a, const char *b)
{
	char m[64], j[64];
	snprintf(m, sizeof(m), "%s %s", a, b);
	snprintf(j, sizeof(j), "%s%s", a, b);
	bpe.merge[bpe.n_merge++] = strdup(m);
	add_tok(&bpe, j, 0, T_NORMAL);
}

#define G "\xc4\xa0"   /* Ġ */
#define C "\xc4\x8a"   /* Ċ */
#define A_ "\xc3\x83"  /* Ã (byte 0xC3) */
#define CO "\xc2\xa9"  /* © (byte 0xA9) */

static void bpe_vocab(void)
{
	vocab_free(&bpe);
	for (int b = 0; b < 256; b++) {
		char s[3];
		byte_char(b, s);
		add_tok(&bpe, s, 0, T_NORMAL);
	}
	bpe_merge("l", "l");          /* r0 */
	bpe_merge("h", "e");          /* r1 */
	bpe_merge("ll", "o");         /* r2 */
	bpe_merge("he", "llo");       /* r3 */
	bpe_merge(G, "w");            /* r4 */
	bpe_merge("o", "r");          /* r5 */
	bpe_merge(G "w", "or");       /* r6 */
	bpe_merge("l", "d");          /* r7 */
	bpe_merge(G "wor", "ld");     /* r8 */
	bpe_merge(G, "hello");        /* r9 */
	bpe_merge("'", "t");          /* r10 */
	bpe_merge("d", "o");          /* r11 */
	bpe_merge("do", "n");         /* r12 */
	bpe_merge("1", "2");          /* r13 */
	bpe_merge(G, G);              /* r14 */
	bpe_merge(A_, CO);            /* r15: é */
	bpe_merge("h", A_ CO);        /* r16 */
	bpe_merge("a", "a");          /* r17 */
	bpe_merge("'", "T");          /* r18 */
	bpe_merge(C, C);              /* r19 */
	bpe_merge(G, "!");            /* r20 */
	add_tok(&bpe, "<|endoftext|>", 0, T_CONTROL);
	add_tok(&bpe, "<|im_start|>", 0, T_CONTROL);
	add_tok(&bpe, "xyz", 0, T_NORMAL);   /* a token no merge makes */
}

static struct tokenizer *bpe_load_as(const char *pre, bool with_type, int expect_rc)
{
	bpe_vocab();
	struct gb g = { 0 };
	kv_str(&g, "general.architecture", "qwen2moe");
	kv_str(&g, "tokenizer.ggml.model", "gpt2");
	if (pre)
		kv_str(&g, "tokenizer.ggml.pre", pre);
	kv_arr_str(&g, "tokenizer.ggml.tokens", bpe.text, bpe.n);
	if (with_type)
		kv_arr_i32(&g, "tokenizer.ggml.token_type", bpe.type, bpe.n);
	kv_arr_str(&g, "tokenizer.ggml.merges", bpe.merge, bpe.n_merge);
	kv_u32(&g, "tokenizer.ggml.eos_token_id", (uint32_t)bid("<|endoftext|>"));
	kv_u32(&g, "tokenizer.ggml.bos_token_id", (uint32_t)bid("<|endoftext|>"));
	size_t len;
	uint8_t *img = image(&g, &len);
	return load_image(img, len, expect_rc);
}

static struct tokenizer *bpe_load(const char *pre)
{
	return bpe_load_as(pre, true, 0);
}

Test(bpe, gpt2_words_and_merges)
{
	struct tokenizer *t = bpe_load("gpt-2");
	/* "hello": ll(r0) he(r1) llo(r2) hello(r3); "Ġworld": Ġw(r4) or(r5)
	 * Ġwor(r6) ld(r7) Ġworld(r8) */
	EXPECT(t, "hello world", false, false, bid("hello"), bid(G "world"));
	/* no BOS unless add_bos_token says so */
	EXPECT(t, "hello world", true, false, bid("hello"), bid(G "world"));
	/* "don" + "'t": do(r11) don(r12), 't(r10) */
	EXPECT(t, "don't", false, false, bid("don"), bid("'t"));
	/* GPT-2's contractions are lower case only: "'" and "T" */
	EXPECT(t, "DON'T", false, false, 'D', 'O', 'N', '\'', 'T');
	/* digits are one word: 12(r13) 3 4 5 */
	EXPECT(t, "12345", false, false, bid("12"), '3', '4', '5');
	/* "a", "ĠĠ" (\s+ leaving the last space to " b"), "Ġ" "b" */
	EXPECT(t, "a   b", false, false, 'a', bid(G G), ' ', 'b');
	/* trailing whitespace is one word */
	EXPECT(t, "a  ", false, false, 'a', bid(G G));
	/* "a", "\n", "\n", "b": no Ċ pair (the newlines are separate words) */
	EXPECT(t, "a\n\nb", false, false, 'a', '\n', '\n', 'b');
	/* " !" is one word: Ġ!(r20) */
	EXPECT(t, "x !", false, false, 'x', bid(G "!"));
	tokenizer_free(t);
}

Test(bpe, gpt2_unicode_and_bytes)
{
	struct tokenizer *t = bpe_load("gpt-2");
	/* "héllo": ll(r0) llo(r2) é(r15) hé(r16); " 日本": single bytes */
	EXPECT(t, "h\xc3\xa9llo \xe6\x97\xa5\xe6\x9c\xac", false, false, bid("h" A_ CO), bid("llo"), ' ', 0xe6, 0x97,
	       0xa5, 0xe6, 0x9c, 0xac);
	/* the emoji: its four bytes */
	EXPECT(t, "\xf0\x9f\xa6\x99", false, false, 0xf0, 0x9f, 0xa6, 0x99);
	/* an invalid byte becomes U+FFFD, as in llama.cpp */
	EXPECT(t, "\xff", false, false, 0xef, 0xbf, 0xbd);
	tokenizer_free(t);
}

Test(bpe, special_tokens)
{
	struct tokenizer *t = bpe_load("gpt-2");
	int32_t eot = bid("<|endoftext|>");
	EXPECT(t, "hello<|endoftext|>", false, true, bid("hello"), eot);
	/* no "▁"-like prefix in BPE after a special token */
	EXPECT(t, "<|im_start|>hello", false, true, bid("<|im_start|>"), bid("hello"));
	/* unparsed: "<|", "endoftext" (do: r11), "|>" as text */
	EXPECT(t, "<|endoftext|>", false, false, '<', '|', 'e', 'n', bid("do"), 'f', 't', 'e', 'x', 't', '|', '>');
	cr_expect(tokenizer_is_eog(t, eot));
	cr_expect(!tokenizer_is_eog(t, bid("<|im_start|>")));
	cr_expect_eq(tokenizer_eos(t), eot);
	cr_expect(!tokenizer_adds_space_prefix(t));
	tokenizer_free(t);
}

Test(bpe, qwen2_pre_tokenizer)
{
	struct tokenizer *t = bpe_load("qwen2");
	/* single digits */
	EXPECT(t, "12345", false, false, '1', '2', '3', '4', '5');
	/* case-insensitive contractions: "'T" is one word, 'T(r18) */
	EXPECT(t, "DON'T", false, false, 'D', 'O', 'N', bid("'T"));
	/* newlines are one word: ĊĊ(r19) */
	EXPECT(t, "a\n\nb", false, false, 'a', bid(C C), 'b');
	/* a non-letter joins the letters after it: ",hello" is one word */
	EXPECT(t, ",hello", false, false, ',', bid("hello"));
	EXPECT(t, "hello world", false, false, bid("hello"), bid(G "world"));
	tokenizer_free(t);
}

Test(bpe, olmo_and_default_pre_tokenizers)
{
	/* llama.cpp maps "olmo" to the GPT-2 regex */
	struct tokenizer *t = bpe_load("olmo");
	EXPECT(t, "12345", false, false, bid("12"), '3', '4', '5');
	EXPECT(t, "x !", false, false, 'x', bid(G "!"));
	tokenizer_free(t);
	/* "default" (and a missing key): punctuation split off first, and
	 * digits in threes */
	for (int i = 0; i < 2; i++) {
		t = bpe_load(i ? "default" : NULL);
		EXPECT(t, "x !", false, false, 'x', ' ', '!');
		EXPECT(t, "12345", false, false, bid("12"), '3', '4', '5');
		EXPECT(t, "hello world", false, false, bid("hello"), bid(G "world"));
		tokenizer_free(t);
	}
}

Test(bpe, llama3_pre_tokenizer)
{
	struct tokenizer *t = bpe_load("llama-bpe");
	/* digits in threes: "123" (12, 3) and "45" */
	EXPECT(t, "12345", false, false, bid("12"), '3', '4', '5');
	/* a word that is a whole token is taken as it is (ignore_merges) */
	EXPECT(t, "xyz", false, false, bid("xyz"));
	/* and llama.cpp turns BOS on for this pre-tokenizer */
	EXPECT(t, "xyz", true, false, bid("<|endoftext|>"), bid("xyz"));
	tokenizer_free(t);
	t = bpe_load("gpt-2");
	EXPECT(t, "xyz", false, false, 'x', 'y', 'z');
	tokenizer_free(t);
}

Test(spm, phi3_strips_after_special_tokens)
{
	/* llama.cpp strips the whitespace after "</s>" for models named Phi-3 */
	spm_vocab();
	struct gb g = { 0 };
	kv_str(&g, "general.name", "Phi-3-mini");
	kv_str(&g, "tokenizer.ggml.model", "llama");
	kv_arr_str(&g, "tokenizer.ggml.tokens", spm.text, spm.n);
	kv_arr_f32(&g, "tokenizer.ggml.scores", spm.score, spm.n);
	kv_arr_i32(&g, "tokenizer.ggml.token_type", spm.type, spm.n);
	size_t len;
	uint8_t *img = image(&g, &len);
	struct tokenizer *t = load_image(img, len, 0);
	EXPECT(t, "a</s>  b", false, true, sid("\xe2\x96\x81"), sid("a"), 2, sid("\xe2\x96\x81"), sid("b"));
	/* but not after "<s>" */
	EXPECT(t, "<s> b", false, true, 1, sid("\xe2\x96\x81\xe2\x96\x81"), sid("b"));
	tokenizer_free(t);
	/* any other name: the spaces stay ("▁▁▁b": the leftmost pair merges) */
	t = spm_load(NULL, false);
	EXPECT(t, "a</s>  b", false, true, sid("\xe2\x96\x81"), sid("a"), 2, sid("\xe2\x96\x81\xe2\x96\x81"),
	       sid("\xe2\x96\x81"), sid("b"));
	tokenizer_free(t);
}

Test(bpe, round_trip)
{
	struct tokenizer *t = bpe_load("gpt-2");
	static const char *const texts[] = {
		"hello world", "don't", "a   b\n\n c ", "h\xc3\xa9llo \xe6\x97\xa5\xe6\x9c\xac", "\xf0\x9f\xa6\x99 ok",
		" leading", "12345 678", "\t\r\n", "x", "<|endoftext|>",
	};
	for (size_t i = 0; i < MOE_ARRAY_SIZE(texts); i++)
		round_trip(t, texts[i], false);
	char buf[8];
	cr_expect_eq(tokenizer_piece(t, bid(G "world"), buf, sizeof(buf)), 6);
	cr_expect_eq(memcmp(buf, " world", 6), 0);
	cr_expect_eq(tokenizer_piece(t, ' ', buf, sizeof(buf)), 1);
	cr_expect_eq(buf[0], ' ');
	tokenizer_free(t);
	/* without token types every token is normal: the same ids */
	t = bpe_load_as("gpt-2", false, 0);
	EXPECT(t, "hello world", false, false, bid("hello"), bid(G "world"));
	tokenizer_free(t);
}

Test(load, refusals)
{
	/* names llama.cpp does not know are refused, as there */
	cr_expect_null(bpe_load_as("gpt2", true, -ENOTSUP));
	struct gb g = { 0 };
	kv_str(&g, "tokenizer.ggml.model", "bert");
	size_t len;
	uint8_t *img = image(&g, &len);
	cr_expect_null(load_image(img, len, -ENOTSUP));
	/* no tokens */
	memset(&g, 0, sizeof(g));
	kv_str(&g, "tokenizer.ggml.model", "llama");
	img = image(&g, &len);
	cr_expect_null(load_image(img, len, -EINVAL));
	/* BPE without merges */
	memset(&g, 0, sizeof(g));
	char *toks[] = { "a", "b" };
	kv_str(&g, "tokenizer.ggml.model", "gpt2");
	kv_arr_str(&g, "tokenizer.ggml.tokens", toks, 2);
	img = image(&g, &len);
	cr_expect_null(load_image(img, len, -EINVAL));
	/* scores shorter than the tokens */
	memset(&g, 0, sizeof(g));
	float sc[1] = { 0 };
	kv_str(&g, "tokenizer.ggml.model", "llama");
	kv_arr_str(&g, "tokenizer.ggml.tokens", toks, 2);
	kv_arr_f32(&g, "tokenizer.ggml.scores", sc, 1);
	img = image(&g, &len);
	cr_expect_null(load_image(img, len, -EINVAL));
	/* an SPM text with a byte that has no token is an error, not a crash */
	memset(&g, 0, sizeof(g));
	kv_str(&g, "tokenizer.ggml.model", "llama");
	kv_arr_str(&g, "tokenizer.ggml.tokens", toks, 2);
	img = image(&g, &len);
	struct tokenizer *t = load_image(img, len, 0);
	int32_t *ids;
	size_t n;
	struct moe_error err = { { 0 } };
	cr_expect_eq(tokenizer_encode(t, "a\n", 2, false, false, &ids, &n, &err), -EILSEQ);
	/* default BOS 1 is "b" here and add_bos defaults on for SPM */
	cr_expect_eq(tokenizer_bos(t), 1);
	cr_expect_eq(tokenizer_eos(t), -1);
	tokenizer_free(t);
}

Test(load, duplicate_and_empty_tokens)
{
	/* llama.cpp's text->id map keeps the last id of a duplicate text, and
	 * renames an empty token "[EMPTY_i]" */
	struct gb g = { 0 };
	char *toks[] = { "<unk>", "<s>", "</s>", "\xe2\x96\x81" "a", "\xe2\x96\x81" "a", "" };
	kv_str(&g, "tokenizer.ggml.model", "llama");
	kv_arr_str(&g, "tokenizer.ggml.tokens", toks, 6);
	size_t len;
	uint8_t *img = image(&g, &len);
	struct tokenizer *t = load_image(img, len, 0);
	EXPECT(t, "a", false, false, 4);
	char buf[32];
	int k = tokenizer_piece(t, 5, buf, sizeof(buf));
	cr_expect_eq(k, 9);
	cr_expect_eq(memcmp(buf, "[EMPTY_5]", 9), 0);
	/* "</s>" is end of generation by its text (and as the default EOS) */
	cr_expect(tokenizer_is_eog(t, 2));
	tokenizer_free(t);
}
