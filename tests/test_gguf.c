/* test_gguf.c - the strict GGUF reader (core/gguf.h). Files are assembled
 * here byte by byte so that each hostile variant changes one thing. */
#include "config.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "gguf.h"
#include "testutil.h"

struct gb {
	uint8_t *b;
	size_t len, cap;
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

static void u8(struct gb *g, uint8_t v) { put(g, &v, 1); }
static void u32(struct gb *g, uint32_t v) { uint8_t b[4]; for (int i = 0; i < 4; i++) b[i] = (uint8_t)(v >> (8 * i)); put(g, b, 4); }
static void u64(struct gb *g, uint64_t v) { uint8_t b[8]; for (int i = 0; i < 8; i++) b[i] = (uint8_t)(v >> (8 * i)); put(g, b, 8); }
static void str(struct gb *g, const char *s) { u64(g, strlen(s)); put(g, s, strlen(s)); }

static void header(struct gb *g, uint32_t version, uint64_t n_tensors, uint64_t n_kv)
{
	put(g, "GGUF", 4);
	u32(g, version);
	u64(g, n_tensors);
	u64(g, n_kv);
}

static void kv_u32(struct gb *g, const char *key, uint32_t v) { str(g, key); u32(g, GGUF_TYPE_UINT32); u32(g, v); }

static void tinfo(struct gb *g, const char *name, uint32_t n_dims, const uint64_t *ne, uint32_t type, uint64_t off)
{
	str(g, name);
	u32(g, n_dims);
	for (uint32_t i = 0; i < n_dims; i++)
		u64(g, ne[i]);
	u32(g, type);
	u64(g, off);
}

static uint8_t pat(uint64_t i) { return (uint8_t)(i * 57 + 3); }

static void pad(struct gb *g, uint32_t a)
{
	while (g->len % a)
		u8(g, 0);
}

static void data(struct gb *g, size_t n)
{
	for (size_t i = 0; i < n; i++)
		u8(g, pat(i));
}

/* Tensors of the valid file: F32 {4,2}, F16 {8}, Q8_0 {64,2}, Q4_0 {32,3}. */
#define ALIGN 64
static const uint64_t NE_F32[] = { 4, 2 }, NE_F16[] = { 8 }, NE_Q8[] = { 64, 2 }, NE_Q4[] = { 32, 3 };
/* bytes 32, 16, 2*2*34 = 136, 3*18 = 54; offsets aligned to 64 */
#define OFF_F32 0
#define OFF_F16 64
#define OFF_Q8 128
#define OFF_Q4 320
#define DATA_LEN (320 + 54)

static void valid_file(struct gb *g)
{
	header(g, 3, 4, 17);
	str(g, "general.architecture"); u32(g, GGUF_TYPE_STRING); str(g, "qwen2moe");
	kv_u32(g, "general.alignment", ALIGN);
	str(g, "k.u8"); u32(g, GGUF_TYPE_UINT8); u8(g, 200);
	str(g, "k.i8"); u32(g, GGUF_TYPE_INT8); u8(g, 0xF6); /* -10 */
	str(g, "k.u16"); u32(g, GGUF_TYPE_UINT16); u8(g, 0x34); u8(g, 0x12);
	str(g, "k.i16"); u32(g, GGUF_TYPE_INT16); u8(g, 0xFE); u8(g, 0xFF); /* -2 */
	kv_u32(g, "qwen2moe.expert_count", 60);
	str(g, "k.i32"); u32(g, GGUF_TYPE_INT32); u32(g, (uint32_t)-7);
	float f = 2.5f; uint32_t fb; memcpy(&fb, &f, 4);
	str(g, "k.f32"); u32(g, GGUF_TYPE_FLOAT32); u32(g, fb);
	str(g, "k.bool"); u32(g, GGUF_TYPE_BOOL); u8(g, 1);
	str(g, "k.u64"); u32(g, GGUF_TYPE_UINT64); u64(g, 1ull << 40);
	str(g, "k.i64"); u32(g, GGUF_TYPE_INT64); u64(g, (uint64_t)-5);
	double d = -0.125; uint64_t db; memcpy(&db, &d, 8);
	str(g, "k.f64"); u32(g, GGUF_TYPE_FLOAT64); u64(g, db);
	str(g, "arr.i32"); u32(g, GGUF_TYPE_ARRAY); u32(g, GGUF_TYPE_INT32); u64(g, 3);
	u32(g, 1); u32(g, (uint32_t)-2); u32(g, 3);
	str(g, "arr.str"); u32(g, GGUF_TYPE_ARRAY); u32(g, GGUF_TYPE_STRING); u64(g, 2);
	str(g, "hello"); str(g, "");
	str(g, "arr.f32"); u32(g, GGUF_TYPE_ARRAY); u32(g, GGUF_TYPE_FLOAT32); u64(g, 2);
	u32(g, fb); u32(g, fb);
	str(g, "arr.empty"); u32(g, GGUF_TYPE_ARRAY); u32(g, GGUF_TYPE_UINT8); u64(g, 0);
	tinfo(g, "blk.0.w32", 2, NE_F32, 0, OFF_F32);
	tinfo(g, "blk.0.w16", 1, NE_F16, 1, OFF_F16);
	tinfo(g, "blk.0.ffn_gate_exps.weight", 2, NE_Q8, 8, OFF_Q8);
	tinfo(g, "blk.0.q4", 2, NE_Q4, 2, OFF_Q4);
	pad(g, ALIGN);
	data(g, DATA_LEN);
}

static void expect_bad(struct gb *g, const char *what)
{
	struct gguf_file *f = NULL;
	struct moe_error err = { { 0 } };
	int rc = gguf_parse(g->b, g->len, &f, &err);
	cr_expect_eq(rc, -EINVAL, "rc %d (%s), want \"%s\"", rc, err.msg, what);
	cr_expect_null(f);
	cr_expect(strstr(err.msg, what) != NULL, "message \"%s\" lacks \"%s\"", err.msg, what);
	if (f)
		gguf_close(f);
	free(g->b);
	memset(g, 0, sizeof(*g));
}

static void check_valid(struct gguf_file *f)
{
	struct moe_error err;
	cr_expect_eq(f->version, 3);
	cr_expect_eq(f->alignment, ALIGN);
	cr_expect_eq(f->n_kv, 17);
	cr_expect_eq(f->n_tensors, 4);
	cr_expect_eq(f->data_start % ALIGN, 0);
	cr_expect_eq(f->data_start + DATA_LEN, f->file_size);

	const char *s;
	uint64_t sl;
	cr_assert_eq(gguf_get_str(f, "general.architecture", &s, &sl), 0);
	cr_expect_str_eq(s, "qwen2moe");
	cr_expect_eq(sl, 8);
	uint32_t v32;
	cr_expect_eq(gguf_get_u32(f, "qwen2moe.expert_count", &v32), 0);
	cr_expect_eq(v32, 60);
	cr_expect_eq(gguf_get_u32(f, "k.u8", &v32), 0);
	cr_expect_eq(v32, 200);
	cr_expect_eq(gguf_get_u32(f, "k.u16", &v32), 0);
	cr_expect_eq(v32, 0x1234);
	cr_expect_eq(gguf_get_u32(f, "k.i8", &v32), -ERANGE);
	cr_expect_eq(gguf_get_u32(f, "k.u64", &v32), -ERANGE);
	cr_expect_eq(gguf_get_u32(f, "k.f32", &v32), -EINVAL);
	cr_expect_eq(gguf_get_u32(f, "absent", &v32), -ENOENT);
	int64_t i64;
	cr_expect_eq(gguf_get_i64(f, "k.i8", &i64), 0);
	cr_expect_eq(i64, -10);
	cr_expect_eq(gguf_get_i64(f, "k.i16", &i64), 0);
	cr_expect_eq(i64, -2);
	cr_expect_eq(gguf_get_i64(f, "k.i32", &i64), 0);
	cr_expect_eq(i64, -7);
	cr_expect_eq(gguf_get_i64(f, "k.i64", &i64), 0);
	cr_expect_eq(i64, -5);
	uint64_t u64v;
	cr_expect_eq(gguf_get_u64(f, "k.u64", &u64v), 0);
	cr_expect_eq(u64v, 1ull << 40);
	cr_expect_eq(gguf_get_u64(f, "k.i64", &u64v), -ERANGE);
	float fl;
	cr_expect_eq(gguf_get_f32(f, "k.f32", &fl), 0);
	cr_expect_float_eq(fl, 2.5f, 0);
	cr_expect_eq(gguf_get_f32(f, "k.f64", &fl), 0);
	cr_expect_float_eq(fl, -0.125f, 0);
	cr_expect_eq(gguf_get_f32(f, "general.architecture", &fl), -EINVAL);
	bool b;
	cr_expect_eq(gguf_get_bool(f, "k.bool", &b), 0);
	cr_expect(b);
	cr_expect_eq(gguf_get_bool(f, "k.u8", &b), -EINVAL);
	cr_expect_eq(gguf_get_str(f, "k.u8", &s, NULL), -EINVAL);

	uint32_t et;
	uint64_t cnt;
	cr_assert_eq(gguf_get_arr(f, "arr.i32", &et, &cnt), 0);
	cr_expect_eq(et, GGUF_TYPE_INT32);
	cr_expect_eq(cnt, 3);
	const struct gguf_kv *kv = gguf_find_kv(f, "arr.i32");
	cr_assert_not_null(kv);
	cr_expect_eq(gguf_arr_i64(kv, 1, &i64), 0);
	cr_expect_eq(i64, -2);
	cr_expect_eq(gguf_arr_i64(kv, 3, &i64), -ERANGE);
	double dv;
	cr_expect_eq(gguf_arr_f64(kv, 2, &dv), 0);
	cr_expect_float_eq(dv, 3.0, 0);
	const struct gguf_str *gs;
	cr_expect_eq(gguf_arr_str(kv, 0, &gs), -EINVAL);
	kv = gguf_find_kv(f, "arr.str");
	cr_assert_not_null(kv);
	cr_assert_eq(gguf_arr_str(kv, 0, &gs), 0);
	cr_expect_str_eq(gs->data, "hello");
	cr_assert_eq(gguf_arr_str(kv, 1, &gs), 0);
	cr_expect_eq(gs->len, 0);
	cr_expect_eq(gguf_arr_i64(kv, 0, &i64), -EINVAL);
	kv = gguf_find_kv(f, "arr.f32");
	cr_assert_not_null(kv);
	cr_expect_eq(gguf_arr_f64(kv, 1, &dv), 0);
	cr_expect_float_eq(dv, 2.5, 0);
	cr_expect_eq(gguf_get_arr(f, "arr.empty", &et, &cnt), 0);
	cr_expect_eq(cnt, 0);
	cr_expect_eq(gguf_get_arr(f, "k.u8", &et, &cnt), -EINVAL);

	const struct {
		const char *name;
		uint64_t off, bytes, n;
		enum moe_dtype dt;
	} want[] = {
		{ "blk.0.w32", OFF_F32, 32, 8, MOE_DTYPE_F32 },
		{ "blk.0.w16", OFF_F16, 16, 8, MOE_DTYPE_F16 },
		{ "blk.0.ffn_gate_exps.weight", OFF_Q8, 136, 128, MOE_DTYPE_Q8_0 },
		{ "blk.0.q4", OFF_Q4, 54, 96, MOE_DTYPE_Q4_0 },
	};
	for (size_t i = 0; i < 4; i++) {
		const struct gguf_tensor *t = gguf_find_tensor(f, want[i].name);
		cr_assert_not_null(t, "%s", want[i].name);
		cr_expect_eq(t->rel_offset, want[i].off);
		cr_expect_eq(t->offset, f->data_start + want[i].off);
		cr_expect_eq(t->bytes, want[i].bytes, "%s", want[i].name);
		cr_expect_eq(t->n_elems, want[i].n);
		cr_expect_eq(t->dtype, want[i].dt);
		uint64_t rb;
		cr_expect(moe_dtype_row_bytes(t->dtype, t->ne[0], &rb));
		cr_expect_eq(rb * (t->n_elems / t->ne[0]), t->bytes, "%s vs dtype.h", want[i].name);
		uint8_t buf[136];
		cr_assert_eq(gguf_read(f, t, 0, buf, (size_t)t->bytes, &err), 0, "%s", err.msg);
		for (uint64_t j = 0; j < t->bytes; j++)
			cr_assert_eq(buf[j], pat(want[i].off + j));
		cr_expect_eq(gguf_read(f, t, 1, buf, (size_t)t->bytes, &err), -EINVAL);
	}
	cr_expect_null(gguf_find_tensor(f, "blk.1.w32"));
	cr_expect_eq(f->tensors[2].ne[1], 2);
	cr_expect_eq(f->tensors[2].ne[2], 1);
}

Test(gguf, valid_buffer_and_file, .timeout = 30)
{
	struct gb g = { 0 };
	valid_file(&g);
	struct gguf_file *f;
	struct moe_error err;
	cr_assert_eq(gguf_parse(g.b, g.len, &f, &err), 0, "%s", err.msg);
	check_valid(f);
	gguf_close(f);

	char *dir = tu_mkdtemp("gguf");
	char path[4200];
	snprintf(path, sizeof(path), "%s/m.gguf", dir);
	cr_assert_eq(tu_write_file(path, g.b, g.len), 0);
	cr_assert_eq(gguf_open(path, &f, &err), 0, "%s", err.msg);
	cr_expect_geq(f->fd, 0);
	check_valid(f);
	gguf_close(f);

	/* every truncation fails cleanly (the last tensor ends the file) */
	for (size_t cut = 0; cut < g.len; cut++) {
		f = NULL;
		int rc = gguf_parse(g.b, cut, &f, &err);
		cr_assert_eq(rc, -EINVAL, "cut at %zu: rc %d", cut, rc);
		cr_assert_null(f);
	}
	for (size_t cut = 0; cut < g.len; cut += 13) {
		cr_assert_eq(tu_write_file(path, g.b, cut), 0);
		cr_expect_eq(gguf_open(path, &f, &err), -EINVAL, "cut at %zu", cut);
		cr_expect(strstr(err.msg, path) != NULL, "%s", err.msg);
	}
	cr_expect_eq(gguf_open(dir, &f, &err), -EINVAL);
	snprintf(path, sizeof(path), "%s/absent.gguf", dir);
	cr_expect_eq(gguf_open(path, &f, &err), -ENOENT);
	tu_rmtree(dir);
	free(g.b);
}

Test(gguf, version2_default_alignment_no_tensors, .timeout = 30)
{
	struct gb g = { 0 };
	header(&g, 2, 1, 1);
	str(&g, "general.name"); u32(&g, GGUF_TYPE_STRING); str(&g, "x");
	tinfo(&g, "t", 1, (const uint64_t[]){ 3 }, 0, 0);
	pad(&g, 32);
	data(&g, 12);
	struct gguf_file *f;
	struct moe_error err;
	cr_assert_eq(gguf_parse(g.b, g.len, &f, &err), 0, "%s", err.msg);
	cr_expect_eq(f->version, 2);
	cr_expect_eq(f->alignment, 32);
	cr_expect_eq(f->data_start % 32, 0);
	gguf_close(f);
	free(g.b);

	/* a metadata-only file (as vocab files are) has no data section */
	memset(&g, 0, sizeof(g));
	header(&g, 3, 0, 1);
	kv_u32(&g, "a", 1);
	cr_assert_eq(gguf_parse(g.b, g.len, &f, &err), 0, "%s", err.msg);
	cr_expect_eq(f->n_tensors, 0);
	gguf_close(f);
	free(g.b);
}

Test(gguf, ggml_type_table, .timeout = 30)
{
	/* The types moetier computes on agree with dtype.h's block geometry. */
	for (uint32_t id = 0; id < 64; id++) {
		const char *name;
		uint32_t blck, size;
		enum moe_dtype dt;
		if (!gguf_ggml_type_info(id, &name, &blck, &size, &dt))
			continue;
		cr_expect_gt(blck, 0);
		cr_expect_gt(size, 0);
		if (dt != MOE_DTYPE_INVALID) {
			cr_expect_eq(blck, moe_dtype_block_elems(dt), "%s", name);
			cr_expect_eq(size, moe_dtype_block_bytes(dt), "%s", name);
			cr_expect(strcasecmp(moe_dtype_name(dt), name) == 0, "%s vs %s", moe_dtype_name(dt), name);
		}
	}
	const uint32_t removed[] = { 4, 5, 31, 32, 33, 36, 37, 38, 40, 1000 };
	for (size_t i = 0; i < sizeof(removed) / sizeof(removed[0]); i++)
		cr_expect(!gguf_ggml_type_info(removed[i], NULL, NULL, NULL, NULL), "%u", removed[i]);
	enum moe_dtype dt;
	cr_expect(gguf_ggml_type_info(39, NULL, NULL, NULL, &dt) && dt == MOE_DTYPE_MXFP4);
	cr_expect(gguf_ggml_type_info(30, NULL, NULL, NULL, &dt) && dt == MOE_DTYPE_BF16);
	cr_expect(gguf_ggml_type_info(12, NULL, NULL, NULL, &dt) && dt == MOE_DTYPE_Q4_K);
	cr_expect(gguf_ggml_type_info(14, NULL, NULL, NULL, &dt) && dt == MOE_DTYPE_Q6_K);
	/* a type ggml has and moetier does not use (Q8_K: activations only) */
	cr_expect(gguf_ggml_type_info(15, NULL, NULL, NULL, &dt) && dt == MOE_DTYPE_INVALID);
	cr_expect_str_eq(gguf_type_name(GGUF_TYPE_FLOAT64), "FLOAT64");
	cr_expect_str_eq(gguf_type_name(13), "?");
}

Test(gguf, hostile_header, .timeout = 30)
{
	struct gb g = { 0 };
	put(&g, "GGML", 4); u32(&g, 3); u64(&g, 0); u64(&g, 0);
	expect_bad(&g, "not a GGUF file");
	header(&g, 1, 0, 0);
	expect_bad(&g, "version 1 is not supported");
	header(&g, 4, 0, 0);
	expect_bad(&g, "unsupported GGUF version 4");
	put(&g, "GGUF", 4); u32(&g, 0x03000000); u64(&g, 0); u64(&g, 0);
	expect_bad(&g, "big-endian");
	header(&g, 3, 0, 1ull << 40);
	expect_bad(&g, "kv count 1099511627776 is absurd");
	header(&g, 3, UINT64_MAX, 0);
	expect_bad(&g, "tensor count 18446744073709551615 is absurd");
	header(&g, 3, 2, 0); /* plausible count, but the bytes are not there */
	data(&g, 40);
	expect_bad(&g, "tensor count 2 is absurd");
	put(&g, "GG", 2);
	expect_bad(&g, "truncated: magic");
}

Test(gguf, hostile_kv, .timeout = 30)
{
	struct gb g = { 0 };
	header(&g, 3, 0, 1);
	u64(&g, 1000); put(&g, "abc", 3); data(&g, 20);
	expect_bad(&g, "longer than the rest of the file");
	header(&g, 3, 0, 1);
	str(&g, "k"); u32(&g, GGUF_TYPE_STRING); u64(&g, UINT64_MAX); data(&g, 16);
	expect_bad(&g, "has length 18446744073709551615");
	header(&g, 3, 0, 1);
	str(&g, "k"); u32(&g, 13); u32(&g, 0);
	expect_bad(&g, "unknown value type 13");
	header(&g, 3, 0, 1);
	str(&g, "k"); u32(&g, GGUF_TYPE_ARRAY); u32(&g, GGUF_TYPE_ARRAY); u64(&g, 1);
	u32(&g, GGUF_TYPE_UINT8); u64(&g, 1); u8(&g, 1);
	expect_bad(&g, "nested arrays are not supported");
	header(&g, 3, 0, 1);
	str(&g, "k"); u32(&g, GGUF_TYPE_ARRAY); u32(&g, 77); u64(&g, 1); u8(&g, 0);
	expect_bad(&g, "unknown array element type 77");
	header(&g, 3, 0, 1);
	str(&g, "k"); u32(&g, GGUF_TYPE_ARRAY); u32(&g, GGUF_TYPE_UINT64); u64(&g, 1ull << 60); data(&g, 64);
	expect_bad(&g, "does not fit in the rest of the file");
	header(&g, 3, 0, 1);
	str(&g, "k"); u32(&g, GGUF_TYPE_ARRAY); u32(&g, GGUF_TYPE_STRING); u64(&g, 2);
	str(&g, "a"); u64(&g, 500); data(&g, 10);
	expect_bad(&g, "element 1");
	header(&g, 3, 0, 1);
	str(&g, "k"); u32(&g, GGUF_TYPE_BOOL); u8(&g, 2);
	expect_bad(&g, "BOOL value 2 is not 0 or 1");
	header(&g, 3, 0, 2);
	kv_u32(&g, "dup", 1);
	kv_u32(&g, "dup", 2);
	expect_bad(&g, "duplicate key 'dup'");
	header(&g, 3, 0, 1);
	str(&g, ""); u32(&g, GGUF_TYPE_UINT8); u8(&g, 0); data(&g, 8);
	expect_bad(&g, "empty key");
	/* a key longer than 65535 bytes */
	header(&g, 3, 0, 1);
	u64(&g, 65536);
	for (int i = 0; i < 65536; i++)
		u8(&g, 'k');
	u32(&g, GGUF_TYPE_UINT8); u8(&g, 0);
	expect_bad(&g, "has length 65536 (at most 65535)");
	/* general.alignment */
	const uint32_t bad_align[] = { 0, 4, 24, 100 };
	for (size_t i = 0; i < 4; i++) {
		header(&g, 3, 0, 1);
		kv_u32(&g, "general.alignment", bad_align[i]);
		expect_bad(&g, "is not a power of two >= 8");
	}
	header(&g, 3, 0, 1);
	str(&g, "general.alignment"); u32(&g, GGUF_TYPE_UINT64); u64(&g, 32);
	expect_bad(&g, "general.alignment has type UINT64 (must be UINT32)");
}

/* One tensor after a header without KVs; data_len bytes of data. */
static void one_tensor(struct gb *g, const char *name, uint32_t n_dims, const uint64_t *ne, uint32_t type,
		       uint64_t off, size_t data_len)
{
	header(g, 3, 1, 0);
	tinfo(g, name, n_dims, ne, type, off);
	pad(g, 32);
	data(g, data_len);
}

Test(gguf, hostile_tensors, .timeout = 30)
{
	struct gb g = { 0 };
	const uint64_t ne5[] = { 32, 1, 1, 1, 1 };
	one_tensor(&g, "t", 5, ne5, 0, 0, 128);
	expect_bad(&g, "tensor 't': n_dims 5 (must be 1..4)");
	one_tensor(&g, "t", 0, ne5, 0, 0, 128);
	expect_bad(&g, "n_dims 0");
	one_tensor(&g, "t", 2, (const uint64_t[]){ 32, 0 }, 0, 0, 128);
	expect_bad(&g, "ne[1] = 0");
	one_tensor(&g, "t", 1, (const uint64_t[]){ 1ull << 63 }, 0, 0, 128);
	expect_bad(&g, "ne[0] = 9223372036854775808");
	one_tensor(&g, "t", 3, (const uint64_t[]){ 1ull << 31, 1ull << 31, 1ull << 31 }, 0, 0, 128);
	expect_bad(&g, "element count overflows");
	one_tensor(&g, "t", 2, (const uint64_t[]){ 1ull << 32, 1ull << 30 }, 0, 0, 128);
	expect_bad(&g, "byte size overflows");
	one_tensor(&g, "t", 1, (const uint64_t[]){ 48 }, 8, 0, 128);
	expect_bad(&g, "ne[0] = 48 is not a multiple of the Q8_0 block size 32");
	one_tensor(&g, "t", 1, (const uint64_t[]){ 256 + 32 }, 12, 0, 1024);
	expect_bad(&g, "not a multiple of the Q4_K block size 256");
	one_tensor(&g, "t", 1, (const uint64_t[]){ 4 }, 4, 0, 128);
	expect_bad(&g, "unknown ggml type 4");
	one_tensor(&g, "t", 1, (const uint64_t[]){ 4 }, 99, 0, 128);
	expect_bad(&g, "unknown ggml type 99");
	one_tensor(&g, "t", 1, (const uint64_t[]){ 4 }, 0, 16, 128);
	expect_bad(&g, "offset 16 is not a multiple of the alignment 32");
	one_tensor(&g, "t", 1, (const uint64_t[]){ 32 }, 0, 0, 127);
	expect_bad(&g, "go past its end");
	one_tensor(&g, "t", 1, (const uint64_t[]){ 4 }, 0, UINT64_MAX - 31, 128);
	expect_bad(&g, "go past its end");
	one_tensor(&g, "0123456789012345678901234567890123456789012345678901234567890123", 1,
		   (const uint64_t[]){ 4 }, 0, 0, 16);
	expect_bad(&g, "has length 64 (at most 63)");
	one_tensor(&g, "", 1, (const uint64_t[]){ 4 }, 0, 0, 16);
	expect_bad(&g, "name of 0 bytes");

	/* two tensors: overlapping, and the same name */
	header(&g, 3, 2, 0);
	tinfo(&g, "a", 1, (const uint64_t[]){ 16 }, 0, 0);   /* 64 bytes */
	tinfo(&g, "b", 1, (const uint64_t[]){ 8 }, 0, 32);   /* [32, 64) */
	pad(&g, 32);
	data(&g, 64);
	expect_bad(&g, "tensors 'a' [0, 64) and 'b' [32, 64) overlap");
	header(&g, 3, 2, 0);
	tinfo(&g, "a", 1, (const uint64_t[]){ 8 }, 0, 0);
	tinfo(&g, "a", 1, (const uint64_t[]){ 8 }, 0, 32);
	pad(&g, 32);
	data(&g, 64);
	expect_bad(&g, "duplicate tensor name 'a'");
	/* adjacent tensors are fine */
	header(&g, 3, 2, 0);
	tinfo(&g, "a", 1, (const uint64_t[]){ 8 }, 0, 0);
	tinfo(&g, "b", 1, (const uint64_t[]){ 8 }, 0, 32);
	pad(&g, 32);
	data(&g, 64);
	struct gguf_file *f;
	struct moe_error err;
	cr_expect_eq(gguf_parse(g.b, g.len, &f, &err), 0, "%s", err.msg);
	gguf_close(f);
	free(g.b);
}
