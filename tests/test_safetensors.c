/* test_safetensors.c - the strict safetensors reader, single files and
 * sharded checkpoints (core/safetensors.h). Files are written here by a
 * tiny local writer so that hostile variants are easy to make. */
#include "config.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"
#include "testutil.h"

/* Byte i of the data section: a pattern the reads are checked against. */
static uint8_t pat(uint64_t i)
{
	return (uint8_t)(i * 131 + 7);
}

/* Writes [u64 N][json padded with spaces to a multiple of 8][data_len bytes].
 * hdr_len_override replaces N when nonzero. Returns the file size. */
static size_t build(uint8_t **out, const char *json, size_t data_len, uint64_t hdr_len_override)
{
	size_t jl = strlen(json), n = (jl + 7) / 8 * 8;
	size_t total = 8 + n + data_len;
	uint8_t *b = malloc(total);
	uint64_t hl = hdr_len_override ? hdr_len_override : n;
	for (int i = 0; i < 8; i++)
		b[i] = (uint8_t)(hl >> (8 * i));
	memcpy(b + 8, json, jl);
	memset(b + 8 + jl, ' ', n - jl);
	for (size_t i = 0; i < data_len; i++)
		b[8 + n + i] = pat(i);
	*out = b;
	return total;
}

static void write_st(const char *path, const char *json, size_t data_len)
{
	uint8_t *b;
	size_t len = build(&b, json, data_len, 0);
	cr_assert_eq(tu_write_file(path, b, len), 0);
	free(b);
}

/* Parsing from memory must fail with -EINVAL and a message holding what. */
static void expect_bad(const char *json, size_t data_len, const char *what)
{
	uint8_t *b;
	size_t len = build(&b, json, data_len, 0);
	struct safetensors_file *f = NULL;
	struct moe_error err = { { 0 } };
	int rc = safetensors_parse(b, len, len, &f, &err);
	cr_expect_eq(rc, -EINVAL, "rc %d for %s", rc, json);
	cr_expect_null(f);
	cr_expect(strstr(err.msg, what) != NULL, "message \"%s\" lacks \"%s\"", err.msg, what);
	if (f)
		safetensors_close(f);
	free(b);
}

#define VALID_JSON                                                                        \
	"{\"b\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[24,32]},"             \
	"\"__metadata__\":{\"format\":\"pt\"},"                                           \
	"\"a.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"       \
	"\"s\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[32,33]},"                 \
	"\"e\":{\"dtype\":\"U8\",\"shape\":[0,5],\"data_offsets\":[33,33]},"              \
	"\"f8\":{\"dtype\":\"F8_E4M3\",\"shape\":[5],\"data_offsets\":[33,38]},"          \
	"\"f4\":{\"dtype\":\"F4\",\"shape\":[2,2],\"data_offsets\":[38,40]}}"
#define VALID_DATA 40

Test(safetensors, valid_single_file, .timeout = 30)
{
	char *dir = tu_mkdtemp("st");
	char path[4200];
	snprintf(path, sizeof(path), "%s/x.safetensors", dir);
	write_st(path, VALID_JSON, VALID_DATA);

	struct safetensors_file *f;
	struct moe_error err;
	cr_assert_eq(safetensors_open(path, &f, &err), 0, "%s", err.msg);
	cr_expect_eq(f->n_tensors, 6);
	cr_expect_eq(f->header_len % 8, 0);
	cr_expect_eq(f->data_start, 8 + f->header_len);
	cr_expect_str_eq(safetensors_metadata(f, "format"), "pt");
	cr_expect_null(safetensors_metadata(f, "nope"));

	const struct safetensors_tensor *a = safetensors_find(f, "a.weight");
	cr_assert_not_null(a);
	cr_expect_eq(a->dtype, MOE_DTYPE_F32);
	cr_expect_str_eq(a->dtype_str, "F32");
	cr_expect_eq(a->n_dims, 2);
	cr_expect_eq(a->shape[0], 2);
	cr_expect_eq(a->shape[1], 3);
	cr_expect_eq(a->n_elems, 6);
	cr_expect_eq(a->bytes, 24);
	cr_expect_eq(a->offset, f->data_start);

	const struct safetensors_tensor *b = safetensors_find(f, "b");
	cr_assert_not_null(b);
	cr_expect_eq(b->dtype, MOE_DTYPE_BF16);
	cr_expect_eq(b->offset, f->data_start + 24);
	uint8_t buf[8];
	cr_assert_eq(safetensors_read(f, b, 0, buf, 8, &err), 0, "%s", err.msg);
	for (int i = 0; i < 8; i++)
		cr_expect_eq(buf[i], pat(24 + (uint64_t)i));
	cr_assert_eq(safetensors_read(f, b, 6, buf, 2, &err), 0);
	cr_expect_eq(buf[0], pat(30));
	cr_expect_eq(safetensors_read(f, b, 6, buf, 3, &err), -EINVAL);
	cr_expect(strstr(err.msg, "outside") != NULL, "%s", err.msg);

	const struct safetensors_tensor *s = safetensors_find(f, "s");
	cr_assert_not_null(s);
	cr_expect_eq(s->n_dims, 0);
	cr_expect_eq(s->n_elems, 1);
	cr_expect_eq(s->bytes, 1);
	const struct safetensors_tensor *e = safetensors_find(f, "e");
	cr_assert_not_null(e);
	cr_expect_eq(e->bytes, 0);
	const struct safetensors_tensor *f8 = safetensors_find(f, "f8");
	cr_assert_not_null(f8);
	cr_expect_eq(f8->dtype, MOE_DTYPE_INVALID);
	cr_expect_str_eq(f8->dtype_str, "F8_E4M3");
	const struct safetensors_tensor *f4 = safetensors_find(f, "f4");
	cr_assert_not_null(f4);
	cr_expect_eq(f4->dtype_bits, 4);
	cr_expect_eq(f4->bytes, 2);
	cr_expect_null(safetensors_find(f, "__metadata__"));
	cr_expect_null(safetensors_find(f, "zzz"));
	/* tensors[] is in file order */
	for (uint32_t i = 1; i < f->n_tensors; i++)
		cr_expect(f->tensors[i].offset >= f->tensors[i - 1].offset + f->tensors[i - 1].bytes);
	safetensors_close(f);

	/* The same through the model API, by file and by directory. */
	struct safetensors_model *m;
	cr_assert_eq(safetensors_model_open(path, &m, &err), 0, "%s", err.msg);
	cr_expect_eq(m->n_files, 1);
	cr_expect_eq(m->n_tensors, 6);
	cr_expect_eq(m->total_bytes, VALID_DATA);
	cr_assert_not_null(safetensors_model_find(m, "b"));
	cr_assert_eq(safetensors_model_read(m, safetensors_model_find(m, "b"), 1, buf, 1, &err), 0);
	cr_expect_eq(buf[0], pat(25));
	safetensors_model_close(m);

	char one[4300];
	snprintf(one, sizeof(one), "%s/model.safetensors", dir);
	cr_assert_eq(rename(path, one), 0);
	cr_assert_eq(safetensors_model_open(dir, &m, &err), 0, "%s", err.msg);
	cr_expect_eq(m->n_tensors, 6);
	cr_expect_null(m->index_path);
	safetensors_model_close(m);
	tu_rmtree(dir);
}

Test(safetensors, dtype_table, .timeout = 30)
{
	const char *all[] = { "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3",
			      "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32",
			      "U32", "F32", "C64", "F64", "I64", "U64" };
	const uint32_t bits[] = { 8, 4, 6, 6, 8, 8, 8, 8, 8, 8, 8, 16, 16, 16, 16, 32, 32, 32, 64, 64, 64, 64 };
	for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) {
		uint32_t b = 0;
		enum moe_dtype dt;
		cr_expect(safetensors_dtype_info(all[i], &b, &dt), "%s", all[i]);
		cr_expect_eq(b, bits[i], "%s", all[i]);
	}
	enum moe_dtype dt;
	cr_expect(safetensors_dtype_info("BF16", NULL, &dt) && dt == MOE_DTYPE_BF16);
	cr_expect(safetensors_dtype_info("I64", NULL, &dt) && dt == MOE_DTYPE_I64);
	cr_expect(safetensors_dtype_info("F64", NULL, &dt) && dt == MOE_DTYPE_F64);
	cr_expect(safetensors_dtype_info("U16", NULL, &dt) && dt == MOE_DTYPE_INVALID);
	cr_expect(!safetensors_dtype_info("bf16", NULL, NULL));
	cr_expect(!safetensors_dtype_info("F128", NULL, NULL));
}

#define T1(x) "{\"t\":{" x "}}"

Test(safetensors, hostile_headers, .timeout = 30)
{
	expect_bad("[1,2]", 0, "does not start with '{'");
	expect_bad(" {}", 0, "does not start with '{'");
	expect_bad("{\"a\":", 0, "not valid JSON");
	expect_bad("{} x", 0, "not valid JSON");
	expect_bad("{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
		   "\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}", 2, "duplicate");
	expect_bad("{\"__metadata__\":{\"a\":1}}", 0, "__metadata__ value of \"a\" is not a string");
	expect_bad("{\"__metadata__\":[1]}", 0, "__metadata__ is not an object");
	expect_bad(T1("\"dtype\":\"F12\",\"shape\":[1],\"data_offsets\":[0,1]"), 1, "unknown dtype \"F12\"");
	expect_bad(T1("\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,1]"), 1, "dtype is not a string");
	expect_bad(T1("\"shape\":[1],\"data_offsets\":[0,1]"), 1, "missing \"dtype\"");
	expect_bad(T1("\"dtype\":\"U8\",\"data_offsets\":[0,1]"), 1, "missing \"shape\"");
	expect_bad(T1("\"dtype\":\"U8\",\"shape\":[1]"), 1, "missing \"data_offsets\"");
	expect_bad(T1("\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]"), 1,
		   "9 dimensions");
	expect_bad(T1("\"dtype\":\"U8\",\"shape\":[-1],\"data_offsets\":[0,1]"), 1, "shape[0] is not a non-negative");
	expect_bad(T1("\"dtype\":\"U8\",\"shape\":[1.5],\"data_offsets\":[0,1]"), 1, "shape[0]");
	expect_bad(T1("\"dtype\":\"U8\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,1]"), 1,
		   "overflows 64 bits");
	expect_bad(T1("\"dtype\":\"F64\",\"shape\":[4611686018427387904],\"data_offsets\":[0,1]"), 1,
		   "overflows 64 bits");
	expect_bad(T1("\"dtype\":\"U8\",\"shape\":[99999999999999999999],\"data_offsets\":[0,1]"), 1,
		   "not valid JSON");
	expect_bad(T1("\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,4]"), 4,
		   "span 4 bytes but shape and dtype U8 need 3");
	expect_bad(T1("\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,2]"), 2, "not a whole number of bytes");
	expect_bad(T1("\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0]"), 1, "not [begin, end]");
	expect_bad(T1("\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[2,1]"), 2, "is before begin");
	expect_bad(T1("\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[-1,0]"), 1, "non-negative");
	expect_bad(T1("\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[100,104]"), 4, "beyond the end of the file");
	expect_bad(T1("\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]"), 3, "beyond the end of the file");
	/* hole at the start, hole between, overlap */
	expect_bad(T1("\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[2,6]"), 6, "leaves a hole of 2 bytes");
	expect_bad("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
		   "\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[6,8]}}", 8, "tensor 'b'");
	expect_bad("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
		   "\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[6,8]}}", 8, "hole");
	expect_bad("{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
		   "\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[3,5]}}", 5, "overlap tensor 'a'");
	/* data must fill the file exactly */
	expect_bad(T1("\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]"), 5, "fill the file exactly");
	expect_bad(T1("\"dtype\":\"U8\",\"shape\":[4],\"entry\":1"), 0, "missing");
	expect_bad("{\"t\":5}", 0, "tensor 't': entry is not a JSON object");
}

Test(safetensors, hostile_lengths, .timeout = 30)
{
	struct safetensors_file *f = NULL;
	struct moe_error err;
	uint8_t *b;
	size_t len = build(&b, "{}", 0, 0);
	cr_assert_eq(safetensors_parse(b, len, len, &f, &err), 0, "%s", err.msg);
	cr_expect_eq(f->n_tensors, 0);
	safetensors_close(f);
	free(b);

	/* header length beyond the cap and beyond the file */
	len = build(&b, "{}", 0, 100000001ull);
	cr_expect_eq(safetensors_parse(b, len, len, &f, &err), -EINVAL);
	cr_expect(strstr(err.msg, "exceeds the limit") != NULL, "%s", err.msg);
	free(b);
	len = build(&b, "{}", 0, UINT64_MAX);
	cr_expect_eq(safetensors_parse(b, len, len, &f, &err), -EINVAL);
	cr_expect(strstr(err.msg, "exceeds the limit") != NULL, "%s", err.msg);
	free(b);
	len = build(&b, "{}", 0, 9);
	cr_expect_eq(safetensors_parse(b, len, len, &f, &err), -EINVAL);
	cr_expect(strstr(err.msg, "beyond the end of the file") != NULL, "%s", err.msg);
	free(b);
	cr_expect_eq(safetensors_parse("\x01\x00", 2, 2, &f, &err), -EINVAL);
	cr_expect(strstr(err.msg, "too short") != NULL, "%s", err.msg);

	/* every truncation of a valid file fails cleanly, from memory and from disk */
	len = build(&b, VALID_JSON, VALID_DATA, 0);
	cr_assert_eq(safetensors_parse(b, len, len, &f, &err), 0, "%s", err.msg);
	safetensors_close(f);
	for (size_t cut = 0; cut < len; cut++) {
		f = NULL;
		cr_expect_eq(safetensors_parse(b, cut, cut, &f, &err), -EINVAL, "cut %zu", cut);
		cr_expect_null(f);
	}
	char *dir = tu_mkdtemp("st");
	char path[4200];
	snprintf(path, sizeof(path), "%s/t.safetensors", dir);
	for (size_t cut = 0; cut < len; cut += 7) {
		cr_assert_eq(tu_write_file(path, b, cut), 0);
		cr_expect_eq(safetensors_open(path, &f, &err), -EINVAL, "cut %zu", cut);
		cr_expect(strstr(err.msg, path) != NULL, "%s", err.msg);
	}
	free(b);
	cr_expect_eq(safetensors_open(dir, &f, &err), -EINVAL);
	snprintf(path, sizeof(path), "%s/absent", dir);
	cr_expect_eq(safetensors_open(path, &f, &err), -ENOENT);
	tu_rmtree(dir);
}

Test(safetensors, many_tensors, .timeout = 60)
{
	const int n = 20000;
	size_t cap = (size_t)n * 80 + 16, o = 0;
	char *json = malloc(cap);
	o += (size_t)snprintf(json, cap, "{");
	/* written in reverse offset order, so that sorting matters */
	for (int i = n - 1; i >= 0; i--)
		o += (size_t)snprintf(json + o, cap - o, "%s\"m.%d.w\":{\"dtype\":\"I16\",\"shape\":[2],\"data_offsets\":[%d,%d]}",
				      i == n - 1 ? "" : ",", i, 4 * i, 4 * i + 4);
	snprintf(json + o, cap - o, "}");
	uint8_t *b;
	size_t len = build(&b, json, (size_t)n * 4, 0);
	struct safetensors_file *f;
	struct moe_error err;
	cr_assert_eq(safetensors_parse(b, len, len, &f, &err), 0, "%s", err.msg);
	cr_assert_eq(f->n_tensors, (uint32_t)n);
	for (int i = 0; i < n; i += 97) {
		char name[32];
		snprintf(name, sizeof(name), "m.%d.w", i);
		const struct safetensors_tensor *t = safetensors_find(f, name);
		cr_assert_not_null(t, "%s", name);
		cr_expect_eq(t->offset, f->data_start + 4 * (uint64_t)i);
		cr_expect_eq(f->tensors[i].offset, t->offset);
	}
	cr_expect_null(safetensors_find(f, "m.20000.w"));
	safetensors_close(f);
	free(b);
	free(json);
}

/* A two-shard checkpoint: a.* in shard 1, b.* in shard 2. */
static void write_shards(const char *dir)
{
	char p[4300];
	snprintf(p, sizeof(p), "%s/model-00001-of-00002.safetensors", dir);
	write_st(p, "{\"a.0\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]},"
		    "\"a.1\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8);
	snprintf(p, sizeof(p), "%s/model-00002-of-00002.safetensors", dir);
	write_st(p, "{\"b.0\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]}}", 3);
}

static void write_index(const char *dir, const char *weight_map)
{
	char p[4300], json[2048];
	snprintf(p, sizeof(p), "%s/model.safetensors.index.json", dir);
	snprintf(json, sizeof(json), "{\"metadata\": {\"total_size\": 11}, \"weight_map\": %s}", weight_map);
	cr_assert_eq(tu_write_file(p, json, strlen(json)), 0);
}

#define GOOD_MAP                                                                          \
	"{\"a.0\": \"model-00001-of-00002.safetensors\", \"b.0\": \"model-00002-of-00002.safetensors\"," \
	" \"a.1\": \"model-00001-of-00002.safetensors\"}"

Test(safetensors, sharded, .timeout = 30)
{
	char *dir = tu_mkdtemp("stsh");
	write_shards(dir);
	write_index(dir, GOOD_MAP);
	struct safetensors_model *m;
	struct moe_error err;
	cr_assert_eq(safetensors_model_open(dir, &m, &err), 0, "%s", err.msg);
	cr_expect_eq(m->n_files, 2);
	cr_expect_eq(m->n_tensors, 3);
	cr_expect_eq(m->total_bytes, 11);
	cr_expect_not_null(m->index_path);
	const struct safetensors_tensor *t = safetensors_model_find(m, "b.0");
	cr_assert_not_null(t);
	cr_expect(strstr(safetensors_model_file(m, t)->path, "model-00002-of-00002") != NULL);
	uint8_t buf[4];
	cr_assert_eq(safetensors_model_read(m, t, 0, buf, 3, &err), 0, "%s", err.msg);
	for (int i = 0; i < 3; i++)
		cr_expect_eq(buf[i], pat((uint64_t)i));
	t = safetensors_model_find(m, "a.1");
	cr_assert_not_null(t);
	cr_assert_eq(safetensors_model_read(m, t, 0, buf, 4, &err), 0);
	for (int i = 0; i < 4; i++)
		cr_expect_eq(buf[i], pat(4 + (uint64_t)i));
	cr_expect_null(safetensors_model_find(m, "c"));
	for (uint32_t i = 1; i < m->n_tensors; i++)
		cr_expect(strcmp(m->tensors[i - 1]->name, m->tensors[i]->name) < 0);
	safetensors_model_close(m);

	/* by the index path itself */
	char idx[4300];
	snprintf(idx, sizeof(idx), "%s/model.safetensors.index.json", dir);
	cr_assert_eq(safetensors_model_open(idx, &m, &err), 0, "%s", err.msg);
	cr_expect_eq(m->n_tensors, 3);
	safetensors_model_close(m);
	tu_rmtree(dir);
}

static void expect_bad_index(const char *weight_map, int want_rc, const char *what)
{
	char *dir = tu_mkdtemp("stbad");
	write_shards(dir);
	write_index(dir, weight_map);
	struct safetensors_model *m = NULL;
	struct moe_error err = { { 0 } };
	int rc = safetensors_model_open(dir, &m, &err);
	cr_expect_eq(rc, want_rc, "rc %d for %s (%s)", rc, weight_map, err.msg);
	cr_expect_null(m);
	cr_expect(strstr(err.msg, what) != NULL, "message \"%s\" lacks \"%s\"", err.msg, what);
	tu_rmtree(dir);
}

Test(safetensors, sharded_hostile, .timeout = 30)
{
	expect_bad_index("{\"a.0\": \"model-00001-of-00002.safetensors\", \"b.0\": \"model-00003.safetensors\","
			 " \"a.1\": \"model-00001-of-00002.safetensors\"}", -ENOENT,
			 "shard 'model-00003.safetensors' (of tensor 'b.0') does not exist");
	expect_bad_index("{\"a.0\": \"../x.safetensors\"}", -EINVAL, "is not a plain file name");
	expect_bad_index("{\"a.0\": \"/etc/passwd\"}", -EINVAL, "is not a plain file name");
	expect_bad_index("{\"a.0\": \"..\"}", -EINVAL, "is not a plain file name");
	expect_bad_index("{\"a.0\": \"\"}", -EINVAL, "is not a plain file name");
	expect_bad_index("{\"a.0\": 3}", -EINVAL, "is not a file name");
	expect_bad_index("{}", -EINVAL, "weight_map is empty");
	expect_bad_index("[]", -EINVAL, "no \"weight_map\" object");
	expect_bad_index("{\"a.0\": \"model-00001-of-00002.safetensors\", \"a.0\": \"model-00001-of-00002.safetensors\"}",
			 -EINVAL, "duplicate");
	/* listed in a shard that does not hold it */
	expect_bad_index("{\"a.0\": \"model-00001-of-00002.safetensors\", \"b.0\": \"model-00001-of-00002.safetensors\","
			 " \"a.1\": \"model-00001-of-00002.safetensors\"}", -EINVAL,
			 "tensor 'b.0' is listed in shard 'model-00001-of-00002.safetensors' but is not in it");
	/* a tensor of a shard that the map leaves out */
	expect_bad_index("{\"a.0\": \"model-00001-of-00002.safetensors\", \"b.0\": \"model-00002-of-00002.safetensors\"}",
			 -EINVAL, "tensor 'a.1' of shard");

	/* the same tensor in two shards */
	char *dir = tu_mkdtemp("stdup");
	write_shards(dir);
	char p[4300];
	snprintf(p, sizeof(p), "%s/model-00002-of-00002.safetensors", dir);
	write_st(p, "{\"b.0\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]},"
		    "\"a.1\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[3,7]}}", 7);
	write_index(dir, GOOD_MAP);
	struct safetensors_model *m = NULL;
	struct moe_error err;
	cr_expect_eq(safetensors_model_open(dir, &m, &err), -EINVAL);
	cr_expect(strstr(err.msg, "tensor 'a.1' is in two shards") != NULL, "%s", err.msg);

	/* a shard that is itself malformed */
	write_st(p, "{\"b.0\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,4]}}", 4);
	cr_expect_eq(safetensors_model_open(dir, &m, &err), -EINVAL);
	cr_expect(strstr(err.msg, "model-00002-of-00002.safetensors: tensor 'b.0'") != NULL, "%s", err.msg);

	/* index not JSON */
	snprintf(p, sizeof(p), "%s/model.safetensors.index.json", dir);
	cr_assert_eq(tu_write_file(p, "{\"weight_map\": {", 16), 0);
	cr_expect_eq(safetensors_model_open(dir, &m, &err), -EINVAL);
	cr_expect(strstr(err.msg, "not valid JSON") != NULL, "%s", err.msg);
	tu_rmtree(dir);

	/* a directory with neither file */
	dir = tu_mkdtemp("stempty");
	cr_expect_eq(safetensors_model_open(dir, &m, &err), -ENOENT);
	cr_expect(strstr(err.msg, "neither model.safetensors.index.json nor model.safetensors") != NULL, "%s", err.msg);
	tu_rmtree(dir);
}
