/* test_trace.c - the routing trace CSV reader and writer (core/trace.h). */
#include "config.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "trace.h"

#define HDR "Layer ID,Batch Number,Token,Activated Expert IDs\r\n"

static int parse_str(const char *s, struct trace **tr, struct moe_error *err)
{
	return trace_parse(s, strlen(s), "t.csv", tr, err);
}

/* Parsing must fail with a message that names the line and the problem. */
static void expect_error(const char *csv, const char *where, const char *what)
{
	struct trace *tr = NULL;
	struct moe_error err = { { 0 } };
	int rc = parse_str(csv, &tr, &err);
	cr_assert_eq(rc, -EINVAL, "rc %d for input:\n%s", rc, csv);
	cr_assert_null(tr);
	cr_expect(strstr(err.msg, where) != NULL, "message \"%s\" lacks \"%s\"", err.msg, where);
	cr_expect(strstr(err.msg, what) != NULL, "message \"%s\" lacks \"%s\"", err.msg, what);
}

/* Counts the lines of a real file and checks every invariant of the matrix,
 * then that writing it back reproduces the file byte for byte (the real
 * files come from Python's csv module, whose quoting trace_write follows). */
static void check_real(const char *path)
{
	struct trace *tr = NULL;
	struct moe_error err;
	size_t len;
	char *raw = tu_read_file(path, &len);
	cr_assert_not_null(raw, "%s", path);
	cr_assert_eq(trace_load(path, &tr, &err), 0, "%s", err.msg);

	size_t newlines = 0;
	for (size_t i = 0; i < len; i++)
		newlines += raw[i] == '\n';
	/* header + one line per row + the newlines inside quoted tokens */
	size_t expect = 1;
	for (uint32_t t = 0; t < tr->n_tokens; t++) {
		size_t in_tok = 0;
		for (const char *c = tr->token[t]; *c; c++)
			in_tok += *c == '\n';
		expect += (1 + in_tok) * tr->n_layers;
	}
	cr_expect_eq(newlines, expect, "%s: %zu lines, matrix implies %zu", path, newlines, expect);

	uint32_t max_seen = 0, k_seen = 0;
	for (uint32_t t = 0; t < tr->n_tokens; t++) {
		for (uint32_t l = 0; l < tr->n_layers; l++) {
			uint32_t n = tr->count[(size_t)t * tr->n_layers + l];
			const uint16_t *ids = trace_row(tr, t, l);
			cr_assert(n >= 1 && n <= tr->k, "%s: token %u layer %u has %u ids", path, t, l, n);
			k_seen = n > k_seen ? n : k_seen;
			for (uint32_t j = 0; j < tr->k; j++) {
				if (j >= n) {
					cr_assert_eq(ids[j], TRACE_NONE);
					continue;
				}
				max_seen = ids[j] > max_seen ? ids[j] : max_seen;
				for (uint32_t q = 0; q < j; q++)
					cr_assert_neq(ids[q], ids[j]);
			}
		}
	}
	cr_expect_eq(max_seen, tr->max_expert);
	cr_expect_eq(k_seen, tr->k);

	char *out = NULL;
	size_t olen = 0;
	FILE *f = open_memstream(&out, &olen);
	cr_assert_eq(trace_write(f, tr), 0);
	fclose(f);
	cr_expect(olen == len && memcmp(out, raw, len) == 0, "%s: rewrite differs (%zu vs %zu bytes)", path,
		  olen, len);
	free(out);
	free(raw);
	trace_free(tr);
}

Test(trace, real_files, .timeout = 60)
{
	const char *dir = tu_traces_dir();
	if (!dir)
		cr_skip_test("no traces under ../shared");
	for (int i = 1; i <= 20; i++) {
		char path[4200];
		snprintf(path, sizeof(path), "%s/prompt_%d_data.csv", dir, i);
		check_real(path);
	}
}

Test(trace, prompt_1_shape, .timeout = 30)
{
	const char *dir = tu_traces_dir();
	if (!dir)
		cr_skip_test("no traces under ../shared");
	char path[4200];
	struct trace *tr;
	struct moe_error err;
	snprintf(path, sizeof(path), "%s/prompt_1_data.csv", dir);
	cr_assert_eq(trace_load(path, &tr, &err), 0, "%s", err.msg);
	/* `wc -l` gives 859 lines = header + 858 rows; awk gives 33 rows per layer 1..26. */
	cr_expect_eq(tr->n_layers, 26);
	cr_expect_eq(tr->n_tokens, 33);
	cr_expect_eq(tr->first_layer, 1);
	cr_expect_eq(tr->k, 6);
	cr_expect_str_eq(tr->token[1], "How");
	/* line 3: 1,0,How,"[8, 22, 43, 46, 63, 7]" */
	const uint16_t want[6] = { 8, 22, 43, 46, 63, 7 };
	cr_expect_arr_eq(trace_row(tr, 1, 0), want, sizeof(want));
	cr_expect_eq(tr->batch[1], 0);
	trace_free(tr);
}

Test(trace, small_valid, .timeout = 30)
{
	struct trace *tr;
	struct moe_error err;
	const char *csv = HDR
		"3,0,a,\"[1, 2]\"\r\n"
		"3,0,\"b,\"\"c\"\"\",\"[3, 4]\"\r\n"
		"5,1,a,[7]\n"           /* LF and an unquoted single-id list */
		"5,1,\"b,\"\"c\"\"\",\"[9,10 ]\"\r\n";
	cr_assert_eq(parse_str(csv, &tr, &err), -EINVAL); /* batch 1 != batch 0 of layer 3 */
	cr_expect(strstr(err.msg, "t.csv:4:") != NULL, "%s", err.msg);
	csv = HDR
		"3,0,a,\"[1, 2]\"\r\n"
		"3,4,\"b,\"\"c\"\"\",\"[3, 4]\"\r\n"
		"5,0,a,[7]\n"
		"5,4,\"b,\"\"c\"\"\",\"[9,10 ]\"";  /* no final newline */
	cr_assert_eq(parse_str(csv, &tr, &err), 0, "%s", err.msg);
	cr_expect_eq(tr->n_tokens, 2);
	cr_expect_eq(tr->first_layer, 3);
	cr_expect_eq(tr->n_layers, 3); /* 3..5, layer 4 absent */
	cr_expect_eq(tr->k, 2);
	cr_expect_eq(tr->max_expert, 10);
	cr_expect_str_eq(tr->token[1], "b,\"c\"");
	cr_expect_eq(tr->batch[1], 4);
	cr_expect_eq(tr->count[0 * 3 + 1], 0);
	cr_expect_eq(tr->count[0 * 3 + 2], 1);
	cr_expect_eq(trace_row(tr, 0, 2)[0], 7);
	cr_expect_eq(trace_row(tr, 0, 2)[1], TRACE_NONE);
	cr_expect_eq(trace_row(tr, 1, 2)[1], 10);
	trace_free(tr);
}

Test(trace, malformed, .timeout = 30)
{
	expect_error(HDR "1,0,\"abc,\"[1, 2]\"\r\n", "t.csv:", "character after a closing quote");
	expect_error(HDR "1,0,x,\"[1, 2]\"\r\n1,0,\"abc,[1]\r\n", "t.csv:3:", "unterminated quoted field");
	expect_error(HDR "1,0,x,\"[1, 2\"\r\n", "t.csv:2:", "expected ']'");
	expect_error(HDR "1,0,x,\"[1, 65536]\"\r\n", "t.csv:2:", "65536 is larger than 65535");
	expect_error(HDR "1,0,x,\"[1, 99999999999999999999999]\"\r\n", "t.csv:2:", "larger than 65535");
	expect_error(HDR "1,0,x,[1]\r\nL2,0,x,[1]\r\n", "t.csv:3:", "Layer ID \"L2\" is not a non-negative integer");
	expect_error(HDR "-1,0,x,[1]\r\n", "t.csv:2:", "Layer ID");
	expect_error(HDR "1,zero,x,[1]\r\n", "t.csv:2:", "Batch Number");
	expect_error("Layer,Batch Number,Token,Activated Expert IDs\r\n1,0,x,[1]\r\n", "t.csv:1:", "header column 1");
	expect_error("Layer ID,Batch Number,Token\r\n1,0,x\r\n", "t.csv:1:", "header must be");
	expect_error(HDR "1,0,x,[1]\r\n1,0,y,[1]\r\n2,0,x,[1]\r\n3,0,x,[2]\r\n", "t.csv:4:",
		     "layer 2 has 1 tokens but layer 1 has 2");
	expect_error(HDR "1,0,x,[1]\r\n1,0,y,[1]\r\n2,0,x,[1]\r\n2,0,y,[1]\r\n3,0,x,[2]\r\n", "t.csv:6:",
		     "layer 3 has 1 tokens but layer 1 has 2");
	expect_error(HDR "1,0,x,[1]\r\n2,0,x,[1]\r\n2,0,y,[1]\r\n", "t.csv:4:", "more than the 1 tokens");
	expect_error(HDR "1,0,x,[1]\r\n2,0,z,[1]\r\n", "t.csv:3:", "token 0 of layer 2 is \"z\"");
	expect_error(HDR "1,0,x,[1]\r\n2,0,x,[1]\r\n1,0,x,[1]\r\n", "t.csv:4:", "layer 1 appears again");
	expect_error(HDR "1,0,x,\"[1, 2, 1]\"\r\n", "t.csv:2:", "expert id 1 repeated");
	expect_error(HDR "1,0,x,[]\r\n", "t.csv:2:", "empty expert list");
	expect_error(HDR "1,0,x,\"[1, 2] \"\r\n", "t.csv:2:", "text after ']'");
	expect_error(HDR "1,0,x,[1],extra\r\n", "t.csv:2:", "more than 4 fields");
	expect_error(HDR "1,0,x\r\n", "t.csv:2:", "3 fields, expected 4");
	expect_error(HDR "1,0,x,[1]\r\n\r\n1,0,y,[1]\r\n", "t.csv:3:", "empty line");
	expect_error(HDR "1,0,a\"b,[1]\r\n", "t.csv:2:", "quote inside an unquoted field");
	expect_error(HDR "1,0,x,[1]\r2,0,x,[1]\r\n", "t.csv:2:", "carriage return");
	expect_error(HDR, "t.csv", "no data rows");
	expect_error("", "t.csv:1:", "header");
	/* a quoted newline moves the line count on */
	expect_error(HDR "1,0,\"two\nlines\",\"[1, x]\"\r\n", "t.csv:2:", "expected an expert id");
	expect_error(HDR "1,0,\"two\nlines\",[1]\r\n1,0,y,[70000]\r\n", "t.csv:4:", "larger than 65535");

	char many[512] = HDR "1,0,x,\"[";
	for (int i = 0; i <= TRACE_MAX_K; i++)
		snprintf(many + strlen(many), sizeof(many) - strlen(many), i ? ", %d" : "%d", i);
	strcat(many, "]\"\r\n");
	expect_error(many, "t.csv:2:", "more than 32 expert ids");
	/* 1025 distinct layers */
	size_t cap = 64 * 1024, o = 0;
	char *big = malloc(cap);
	o += (size_t)snprintf(big, cap, HDR);
	for (int l = 0; l <= TRACE_MAX_LAYERS; l++)
		o += (size_t)snprintf(big + o, cap - o, "%d,0,x,[1]\r\n", l);
	expect_error(big, "t.csv:", "more than 1024 layers");
	free(big);
}

Test(trace, write_parse_roundtrip, .timeout = 30)
{
	const char *toks[] = { "plain", "with,comma", "say \"hi\"", "two\nlines", "cr\r\nlf", "", " sp ", "\xC4\xA0tok" };
	const uint32_t nt = 8, nl = 3, k = 4;
	struct trace tr = { .n_tokens = nt, .n_layers = nl, .first_layer = 7, .k = k };
	tr.experts = malloc(sizeof(uint16_t) * nt * nl * k);
	tr.count = calloc(nt * nl, 1);
	tr.batch = calloc(nt, sizeof(uint32_t));
	tr.token = (char **)toks;
	uint32_t maxe = 0;
	for (uint32_t t = 0; t < nt; t++) {
		tr.batch[t] = t / 3;
		for (uint32_t l = 0; l < nl; l++) {
			uint32_t n = 1 + (t + l) % k;
			tr.count[t * nl + l] = (uint8_t)(l == 1 ? 0 : n); /* layer 8 absent */
			for (uint32_t j = 0; j < k; j++) {
				uint16_t v = j < n ? (uint16_t)(t * 1000 + l * 37 + j * 11) : TRACE_NONE;
				tr.experts[(t * nl + l) * k + j] = v;
				if (j < n && l != 1 && v > maxe)
					maxe = v;
			}
		}
	}
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);
	cr_assert_eq(trace_write(f, &tr), 0);
	fclose(f);

	struct trace *back;
	struct moe_error err;
	cr_assert_eq(trace_parse(buf, len, "rt", &back, &err), 0, "%s\n%s", err.msg, buf);
	cr_assert_eq(back->n_tokens, nt);
	cr_assert_eq(back->n_layers, nl);
	cr_assert_eq(back->first_layer, 7);
	cr_assert_eq(back->k, k);
	cr_assert_eq(back->max_expert, maxe);
	for (uint32_t t = 0; t < nt; t++) {
		cr_expect_str_eq(back->token[t], toks[t]);
		cr_expect_eq(back->batch[t], t / 3);
		for (uint32_t l = 0; l < nl; l++) {
			cr_assert_eq(back->count[t * nl + l], tr.count[t * nl + l]);
			if (l != 1)
				cr_expect_arr_eq(trace_row(back, t, l), trace_row(&tr, t, l), k * sizeof(uint16_t));
		}
	}
	trace_free(back);
	free(buf);

	/* a layer with some rows but not all cannot be written */
	tr.count[0 * nl + 1] = 1;
	f = open_memstream(&buf, &len);
	cr_expect_eq(trace_write(f, &tr), -EINVAL);
	fclose(f);
	free(buf);
	free(tr.experts);
	free(tr.count);
	free(tr.batch);
}

Test(trace, load_errors, .timeout = 30)
{
	struct trace *tr;
	struct moe_error err;
	cr_expect_eq(trace_load("/nonexistent/x.csv", &tr, &err), -ENOENT);
	cr_expect(strstr(err.msg, "/nonexistent/x.csv") != NULL);
	char *dir = tu_mkdtemp("trace");
	char path[4200];
	snprintf(path, sizeof(path), "%s/bad.csv", dir);
	const char *csv = HDR "1,0,x,[1]\r\n1,0,y,\"[1\"\r\n";
	cr_assert_eq(tu_write_file(path, csv, strlen(csv)), 0);
	cr_expect_eq(trace_load(path, &tr, &err), -EINVAL);
	char want[4300];
	snprintf(want, sizeof(want), "%s:3: expected ']'", path);
	cr_expect(strstr(err.msg, want) != NULL, "%s", err.msg);
	tu_rmtree(dir);
}
