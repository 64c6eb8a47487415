/* Description: the .moepack writer and strict reader: round trip, writer
 * misuse, hostile files (each a precise error, never a crash), byte flips
 * found by pack_verify and by `moe-pack verify`. */
#include "config.h"

#include <criterion/criterion.h>
#include <fcntl.h>
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "crc32c.h"
#include "pack.h"
#include "testutil.h"

/* A small pack: 2 MoE layers (model layers 1 and 2 of 3), 4 experts, f32
 * parts of 6144 bytes each, so the 18432-byte payload leaves 2048 bytes of
 * padding in each 20480-byte extent. */
#define N_HID 64
#define N_W 24
#define N_EXP 4
#define N_MOE 2

static void test_model(struct moe_model_config *m)
{
	memset(m, 0, sizeof(*m));
	snprintf(m->name, sizeof(m->name), "test-model");
	moe_model_set_family_defaults(m, MOE_FAMILY_QWEN2_MOE);
	m->dtype = MOE_DTYPE_F32;
	m->hidden = N_HID;
	m->expert_width = N_W;
	m->n_experts = N_EXP;
	m->top_k = 2;
	m->n_layers = 3;
	m->n_moe_layers = N_MOE;
	m->first_moe_layer = 1;
	m->moe_layer_step = 1;
}

static uint32_t test_parts(struct pack_part_desc *p)
{
	memset(p, 0, 3 * sizeof(*p));
	p[0] = (struct pack_part_desc){ .role = PACK_ROLE_GATE, .dtype = MOE_DTYPE_F32, .rows = N_W, .cols = N_HID };
	p[1] = (struct pack_part_desc){ .role = PACK_ROLE_UP, .dtype = MOE_DTYPE_F32, .rows = N_W, .cols = N_HID };
	p[2] = (struct pack_part_desc){ .role = PACK_ROLE_DOWN, .dtype = MOE_DTYPE_F32, .rows = N_HID, .cols = N_W };
	return 3;
}

#define PAYLOAD (3u * N_W * N_HID * 4u)

/* Byte i of expert (l, e): a pattern that differs between experts. */
static unsigned char pat(uint32_t l, uint32_t e, uint64_t i)
{
	uint64_t x = (l * 1000003ull + e * 7919ull + i) * 0x9E3779B97F4A7C15ull;
	return (unsigned char)(x >> 56);
}

static void fill_expert(uint32_t l, uint32_t e, unsigned char *buf)
{
	for (uint64_t i = 0; i < PAYLOAD; i++)
		buf[i] = pat(l, e, i);
}

static void fill_tensor(const char *name, unsigned char *buf, size_t n)
{
	uint32_t h = crc32c(name, strlen(name));
	for (size_t i = 0; i < n; i++)
		buf[i] = (unsigned char)((h >> (i % 4 * 8)) + i * 31);
}

/* Writes the test pack to path: experts in reverse order, in uneven chunks,
 * plus one router per MoE layer and one 1-D tensor. */
static void write_test_pack(const char *path)
{
	struct moe_model_config m;
	struct pack_part_desc parts[PACK_MAX_PARTS];
	struct pack_writer *w;
	struct moe_error err = { "" };
	unsigned char *buf = malloc(PAYLOAD);
	uint32_t np;

	test_model(&m);
	np = test_parts(parts);
	cr_assert_eq(pack_writer_create(path, &m, parts, np, "test", &w, &err), 0, "%s", err.msg);
	for (int i = N_MOE * N_EXP - 1; i >= 0; i--) {
		uint32_t l = (uint32_t)i / N_EXP, e = (uint32_t)i % N_EXP;
		fill_expert(l, e, buf);
		cr_assert_eq(pack_writer_begin_expert(w, l, e, &err), 0, "%s", err.msg);
		size_t off = 0, chunk = 1000 + (size_t)i * 17;
		while (off < PAYLOAD) {
			size_t n = MOE_MIN(chunk, PAYLOAD - off);
			cr_assert_eq(pack_writer_write(w, buf + off, n, &err), 0, "%s", err.msg);
			off += n;
		}
		cr_assert_eq(pack_writer_end_expert(w, &err), 0, "%s", err.msg);
	}
	for (uint32_t l = 0; l < N_MOE; l++) {
		struct pack_tensor_entry t = { .role = PACK_ROLE_ROUTER, .dtype = MOE_DTYPE_F32, .layer = l + 1,
					       .n_dims = 2, .shape = { N_EXP, N_HID } };
		snprintf(t.name, sizeof(t.name), "model.layers.%u.mlp.gate.weight", l + 1);
		unsigned char tb[N_EXP * N_HID * 4];
		fill_tensor(t.name, tb, sizeof(tb));
		cr_assert_eq(pack_writer_begin_tensor(w, &t, &err), 0, "%s", err.msg);
		cr_assert_eq(pack_writer_write(w, tb, 100, &err), 0, "%s", err.msg);
		cr_assert_eq(pack_writer_write(w, tb + 100, sizeof(tb) - 100, &err), 0, "%s", err.msg);
		cr_assert_eq(pack_writer_end_tensor(w, &err), 0, "%s", err.msg);
	}
	struct pack_tensor_entry t = { .role = PACK_ROLE_OTHER, .dtype = MOE_DTYPE_BF16, .layer = UINT32_MAX,
				       .n_dims = 1, .shape = { 7 } };
	snprintf(t.name, sizeof(t.name), "odd.bias");
	unsigned char tb[14];
	fill_tensor(t.name, tb, sizeof(tb));
	cr_assert_eq(pack_writer_begin_tensor(w, &t, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_writer_write(w, tb, sizeof(tb), &err), 0, "%s", err.msg);
	cr_assert_eq(pack_writer_end_tensor(w, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_writer_finish(w, &err), 0, "%s", err.msg);
	free(buf);
}

static char *tmpdir;
static char path[4096];

static void setup(void)
{
	tmpdir = tu_mkdtemp("pack");
	snprintf(path, sizeof(path), "%s/t.moepack", tmpdir);
	write_test_pack(path);
}

static void teardown(void)
{
	tu_rmtree(tmpdir);
	tmpdir = NULL;
}

TestSuite(pack, .init = setup, .fini = teardown, .timeout = 60);

static void check_contents(struct pack_file *p)
{
	struct moe_error err = { "" };
	unsigned char *want = malloc(PAYLOAD), *abuf = NULL, *ubuf = malloc(pack_extent_bytes(p) + 1);
	cr_assert_eq(posix_memalign((void **)&abuf, PACK_ALIGN, pack_extent_bytes(p)), 0);
	for (uint32_t l = 0; l < N_MOE; l++)
		for (uint32_t e = 0; e < N_EXP; e++) {
			fill_expert(l, e, want);
			memset(abuf, 0xAA, pack_extent_bytes(p));
			cr_assert_eq(pack_read_expert(p, l, e, abuf, &err), 0, "%s", err.msg);
			cr_assert_eq(memcmp(abuf, want, PAYLOAD), 0, "layer %u expert %u differs", l, e);
			/* an unaligned buffer takes the buffered path */
			cr_assert_eq(pack_read_expert(p, l, e, ubuf + 1, &err), 0, "%s", err.msg);
			cr_assert_eq(memcmp(ubuf + 1, want, PAYLOAD), 0);
			cr_assert_eq(pack_check_expert(p, l, e, want, &err), 0, "%s", err.msg);
		}
	free(want);
	free(abuf);
	free(ubuf);
}

Test(pack, round_trip)
{
	struct pack_file *p;
	struct moe_error err = { "" };
	struct moe_model_config m;

	test_model(&m);
	cr_assert_eq(pack_open(path, 0, &p, &err), 0, "%s", err.msg);
	cr_assert_eq(memcmp(p->model, &m, sizeof(m)), 0, "model config changed");
	cr_assert_str_eq(p->hdr->source, "test");
	cr_assert_eq(p->hdr->extent_payload, PAYLOAD);
	cr_assert_eq(pack_extent_bytes(p), 20480u);
	cr_assert_eq(p->hdr->index_count, N_MOE * N_EXP);
	const struct pack_part_desc *down = pack_part(p, PACK_ROLE_DOWN);
	cr_assert_not_null(down);
	cr_assert_eq(down->offset, 2u * N_W * N_HID * 4);
	cr_assert_eq(down->rows, N_HID);
	cr_assert_null(pack_part(p, PACK_ROLE_GATE_UP));
	cr_assert_null(pack_expert(p, N_MOE, 0));
	cr_assert_null(pack_expert(p, 0, N_EXP));
	/* extents sit at fixed positions whatever the write order */
	for (uint32_t i = 1; i < N_MOE * N_EXP; i++)
		cr_assert_eq(p->index[i].offset, p->index[0].offset + i * pack_extent_bytes(p));
	check_contents(p);

	cr_assert_eq(p->hdr->n_tensors, 3);
	const struct pack_tensor_entry *r = pack_find_role(p, PACK_ROLE_ROUTER, 2);
	cr_assert_not_null(r);
	cr_assert_str_eq(r->name, "model.layers.2.mlp.gate.weight");
	cr_assert_eq(r->bytes, N_EXP * N_HID * 4);
	cr_assert_eq(r->offset % PACK_RESIDENT_ALIGN, 0);
	unsigned char tb[N_EXP * N_HID * 4], want[N_EXP * N_HID * 4];
	cr_assert_eq(pack_read_tensor(p, r, tb, &err), 0, "%s", err.msg);
	fill_tensor(r->name, want, sizeof(want));
	cr_assert_eq(memcmp(tb, want, sizeof(tb)), 0);
	const struct pack_tensor_entry *o = pack_find_tensor(p, "odd.bias");
	cr_assert_not_null(o);
	cr_assert_eq(o->bytes, 14);
	cr_assert_eq(o->layer, UINT32_MAX);
	cr_assert_eq(pack_read_tensor(p, o, tb, &err), 0, "%s", err.msg);
	fill_tensor(o->name, want, 14);
	cr_assert_eq(memcmp(tb, want, 14), 0);
	cr_assert_null(pack_find_tensor(p, "nope"));
	cr_assert_null(pack_find_role(p, PACK_ROLE_ROUTER, 0));

	cr_assert_eq(pack_verify(p, NULL, NULL, &err), 0, "%s", err.msg);
	pack_close(p);

	cr_assert_eq(pack_open(path, PACK_OPEN_NO_DIRECT, &p, &err), 0, "%s", err.msg);
	cr_assert_eq(p->fd_direct, -1);
	check_contents(p);
	cr_assert_eq(pack_verify(p, NULL, NULL, &err), 0, "%s", err.msg);
	pack_close(p);
}

/* ---- writer misuse ---- */

/* Number of files matching prefix* in the test directory. */
static size_t count_files(const char *prefix)
{
	char pat[4300];
	glob_t gl;
	size_t n = 0;
	snprintf(pat, sizeof(pat), "%s/%s*", tmpdir, prefix);
	if (glob(pat, 0, NULL, &gl) == 0)
		n = gl.gl_pathc;
	globfree(&gl);
	return n;
}

Test(pack, writer_missing_expert_fails_and_unlinks)
{
	struct moe_model_config m;
	struct pack_part_desc parts[PACK_MAX_PARTS];
	struct pack_writer *w;
	struct moe_error err = { "" };
	unsigned char *buf = calloc(1, PAYLOAD);
	char p2[4200];

	snprintf(p2, sizeof(p2), "%s/missing.moepack", tmpdir);
	test_model(&m);
	uint32_t np = test_parts(parts);
	cr_assert_eq(pack_writer_create(p2, &m, parts, np, "test", &w, &err), 0, "%s", err.msg);
	for (uint32_t i = 0; i < N_MOE * N_EXP; i++) {
		if (i == 5)
			continue; /* layer 1 expert 1 is never written */
		cr_assert_eq(pack_writer_begin_expert(w, i / N_EXP, i % N_EXP, &err), 0, "%s", err.msg);
		cr_assert_eq(pack_writer_write(w, buf, PAYLOAD, &err), 0, "%s", err.msg);
		cr_assert_eq(pack_writer_end_expert(w, &err), 0, "%s", err.msg);
	}
	cr_assert_lt(pack_writer_finish(w, &err), 0);
	cr_assert(strstr(err.msg, "layer 1 (model layer 2) expert 1 was never written"), "%s", err.msg);
	cr_assert_neq(access(p2, F_OK), 0, "a failed pack must not be left behind");
	cr_assert_eq(count_files("missing.moepack"), 0, "nor its temporary file");
	free(buf);
}

Test(pack, writer_misuse)
{
	struct moe_model_config m;
	struct pack_part_desc parts[PACK_MAX_PARTS];
	struct pack_writer *w;
	struct moe_error err = { "" };
	unsigned char buf[64] = { 0 };
	char p2[4200];

	snprintf(p2, sizeof(p2), "%s/bad.moepack", tmpdir);
	test_model(&m);
	uint32_t np = test_parts(parts);

	/* parts that disagree with the model */
	parts[2].rows = N_HID + 1;
	cr_assert_lt(pack_writer_create(p2, &m, parts, np, "t", &w, &err), 0);
	cr_assert(strstr(err.msg, "part 2 (down)"), "%s", err.msg);
	np = test_parts(parts);
	parts[1].role = PACK_ROLE_GATE;
	cr_assert_lt(pack_writer_create(p2, &m, parts, np, "t", &w, &err), 0);
	cr_assert(strstr(err.msg, "appears twice"), "%s", err.msg);
	np = test_parts(parts);
	parts[0].dtype = MOE_DTYPE_Q8_0; /* 64 columns are 2 blocks: fine */
	parts[2].dtype = MOE_DTYPE_Q8_0; /* 24 columns are not whole blocks */
	cr_assert_lt(pack_writer_create(p2, &m, parts, np, "t", &w, &err), 0);
	cr_assert(strstr(err.msg, "not whole q8_0 blocks"), "%s", err.msg);
	np = test_parts(parts);

	/* expert twice, too many bytes, short expert */
	cr_assert_eq(pack_writer_create(p2, &m, parts, np, "t", &w, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_writer_begin_expert(w, 0, 0, &err), 0);
	for (size_t o = 0; o < PAYLOAD; o += sizeof(buf))
		cr_assert_eq(pack_writer_write(w, buf, sizeof(buf), &err), 0, "%s", err.msg);
	cr_assert_lt(pack_writer_write(w, buf, 1, &err), 0);
	cr_assert(strstr(err.msg, "more than"), "%s", err.msg);
	cr_assert_eq(count_files("bad.moepack"), 1, "written under a temporary name");
	pack_writer_abort(w);
	cr_assert_neq(access(p2, F_OK), 0);
	cr_assert_eq(count_files("bad.moepack"), 0);

	/* an aborted rewrite leaves the existing pack alone */
	cr_assert_eq(pack_writer_create(path, &m, parts, np, "t", &w, &err), 0, "%s", err.msg);
	pack_writer_abort(w);
	struct pack_file *pf;
	cr_assert_eq(pack_open(path, 0, &pf, &err), 0, "%s", err.msg);
	pack_close(pf);

	cr_assert_eq(pack_writer_create(p2, &m, parts, np, "t", &w, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_writer_begin_expert(w, 1, 3, &err), 0);
	cr_assert_eq(pack_writer_write(w, buf, 10, &err), 0);
	cr_assert_lt(pack_writer_end_expert(w, &err), 0);
	cr_assert(strstr(err.msg, "layer 1 expert 3: got 10 of"), "%s", err.msg);
	pack_writer_abort(w);

	cr_assert_eq(pack_writer_create(p2, &m, parts, np, "t", &w, &err), 0, "%s", err.msg);
	unsigned char *full = calloc(1, PAYLOAD);
	cr_assert_eq(pack_writer_begin_expert(w, 1, 3, &err), 0);
	cr_assert_eq(pack_writer_write(w, full, PAYLOAD, &err), 0);
	cr_assert_eq(pack_writer_end_expert(w, &err), 0);
	cr_assert_lt(pack_writer_begin_expert(w, 1, 3, &err), 0);
	cr_assert(strstr(err.msg, "written twice"), "%s", err.msg);
	pack_writer_abort(w);
	free(full);

	/* tensors: bad shape, size disagreeing with the shape, duplicate */
	cr_assert_eq(pack_writer_create(p2, &m, parts, np, "t", &w, &err), 0, "%s", err.msg);
	struct pack_tensor_entry t = { .name = "x", .role = PACK_ROLE_ROUTER, .dtype = MOE_DTYPE_F32,
				       .layer = 1, .n_dims = 5, .shape = { 1, 2 } };
	cr_assert_lt(pack_writer_begin_tensor(w, &t, &err), 0);
	cr_assert(strstr(err.msg, "5 dimensions"), "%s", err.msg);
	pack_writer_abort(w);
	cr_assert_eq(pack_writer_create(p2, &m, parts, np, "t", &w, &err), 0, "%s", err.msg);
	t.n_dims = 2;
	t.bytes = 9;
	cr_assert_lt(pack_writer_begin_tensor(w, &t, &err), 0);
	cr_assert(strstr(err.msg, "9 bytes given, shape needs 8"), "%s", err.msg);
	pack_writer_abort(w);
	cr_assert_eq(pack_writer_create(p2, &m, parts, np, "t", &w, &err), 0, "%s", err.msg);
	t.bytes = 0;
	cr_assert_eq(pack_writer_begin_tensor(w, &t, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_writer_write(w, buf, 8, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_writer_end_tensor(w, &err), 0, "%s", err.msg);
	cr_assert_lt(pack_writer_begin_tensor(w, &t, &err), 0);
	cr_assert(strstr(err.msg, "tensor x written twice"), "%s", err.msg);
	pack_writer_abort(w);
}

/* ---- hostile files ---- */

static unsigned char *load(size_t *len)
{
	unsigned char *b = (unsigned char *)tu_read_file(path, len);
	cr_assert_not_null(b);
	return b;
}

static struct pack_header_disk *H(unsigned char *b) { return (struct pack_header_disk *)b; }
static struct pack_index_entry *IX(unsigned char *b) { return (struct pack_index_entry *)(b + H(b)->index_offset); }
static struct pack_tensor_entry *TD(unsigned char *b) { return (struct pack_tensor_entry *)(b + H(b)->tensor_dir_offset); }

/* Recomputes the metadata CRCs so that the check under test, not a CRC,
 * catches the damage. Only valid while the offsets still point inside b. */
static void fix_crcs(unsigned char *b, size_t len, bool index, bool dir)
{
	struct pack_header_disk *h = H(b);
	if (index && h->index_offset + h->index_count * 32 <= len)
		h->index_crc = crc32c(b + h->index_offset, h->index_count * 32);
	if (dir && h->tensor_dir_offset + h->n_tensors * 176 <= len)
		h->tensor_dir_crc = crc32c(b + h->tensor_dir_offset, h->n_tensors * 176);
	h->header_crc = 0;
	h->header_crc = crc32c(b, PACK_HEADER_SIZE);
}

/* Writes b as the pack, opens it, expects failure with `want` in the message. */
static void expect_open_error(const unsigned char *b, size_t len, const char *want)
{
	struct pack_file *p = (struct pack_file *)0x1;
	struct moe_error err = { "" };
	char p2[4200];
	snprintf(p2, sizeof(p2), "%s/hostile.moepack", tmpdir);
	cr_assert_eq(tu_write_file(p2, b, len), 0);
	int rc = pack_open(p2, 0, &p, &err);
	cr_assert_lt(rc, 0, "opened a pack that should fail with \"%s\"", want);
	cr_assert_null(p);
	cr_assert(strstr(err.msg, want), "expected \"%s\" in \"%s\"", want, err.msg);
	cr_assert(strstr(err.msg, p2), "the message names the file: %s", err.msg);
}

typedef void (*mutator)(unsigned char *b, size_t *len);

static void hostile(mutator fn, const char *want)
{
	size_t len;
	unsigned char *b = load(&len);
	fn(b, &len);
	expect_open_error(b, len, want);
	free(b);
}

static void m_magic(unsigned char *b, size_t *len) { b[0] = 'X'; fix_crcs(b, *len, false, false); }
static void m_version(unsigned char *b, size_t *len) { H(b)->version = 3; fix_crcs(b, *len, false, false); }
static void m_header_size(unsigned char *b, size_t *len) { H(b)->header_size = 512; fix_crcs(b, *len, false, false); }
static void m_header_crc(unsigned char *b, size_t *len) { (void)len; H(b)->model.name[3] ^= 1; }
static void m_header_pad_crc(unsigned char *b, size_t *len) { (void)len; b[4000] = 1; }
static void m_truncated(unsigned char *b, size_t *len) { (void)b; *len -= 100; }
static void m_tiny(unsigned char *b, size_t *len) { (void)b; *len = 100; }
static void m_index_oob(unsigned char *b, size_t *len) { H(b)->index_offset = *len; fix_crcs(b, *len, false, true); }
static void m_index_misaligned(unsigned char *b, size_t *len) { H(b)->index_offset += 64; fix_crcs(b, *len, true, true); }
static void m_index_crc(unsigned char *b, size_t *len) { (void)len; IX(b)[3].crc32c ^= 1; }
static void m_extent_misaligned(unsigned char *b, size_t *len) { IX(b)[3].offset += 512; fix_crcs(b, *len, true, true); }
static void m_extent_overlap(unsigned char *b, size_t *len) { IX(b)[6].offset = IX(b)[5].offset; fix_crcs(b, *len, true, true); }
static void m_extent_partial_overlap(unsigned char *b, size_t *len) { IX(b)[6].offset = IX(b)[5].offset + 4096; fix_crcs(b, *len, true, true); }
static void m_extent_on_index(unsigned char *b, size_t *len) { IX(b)[2].offset = H(b)->index_offset; fix_crcs(b, *len, true, true); }
static void m_extent_in_header(unsigned char *b, size_t *len) { IX(b)[2].offset = 0; fix_crcs(b, *len, true, true); }
static void m_extent_past_end(unsigned char *b, size_t *len) { IX(b)[7].offset = (*len + 4095) / 4096 * 4096; fix_crcs(b, *len, true, true); }
static void m_extent_huge(unsigned char *b, size_t *len) { IX(b)[7].offset = UINT64_MAX - 4095; fix_crcs(b, *len, true, true); }
static void m_length(unsigned char *b, size_t *len) { IX(b)[2].length--; fix_crcs(b, *len, true, true); }
static void m_swap(unsigned char *b, size_t *len)
{
	struct pack_index_entry t = IX(b)[0];
	IX(b)[0] = IX(b)[1];
	IX(b)[1] = t;
	fix_crcs(b, *len, true, true);
}
static void m_layer(unsigned char *b, size_t *len) { IX(b)[4].layer = 0; fix_crcs(b, *len, true, true); }
static void m_dir_past_end(unsigned char *b, size_t *len) { H(b)->tensor_dir_offset += 1u << 20; fix_crcs(b, *len, false, false); }
static void m_dir_crc(unsigned char *b, size_t *len) { (void)len; TD(b)[1].name[0] ^= 1; }
static void m_tensor_outside(unsigned char *b, size_t *len) { TD(b)[1].offset = H(b)->tensor_dir_offset; fix_crcs(b, *len, true, true); }
static void m_tensor_unaligned(unsigned char *b, size_t *len) { TD(b)[1].offset += 8; fix_crcs(b, *len, true, true); }
static void m_tensor_overlap(unsigned char *b, size_t *len) { TD(b)[1].offset = TD(b)[0].offset; fix_crcs(b, *len, true, true); }
static void m_tensor_name(unsigned char *b, size_t *len) { memset(TD(b)[0].name, 'a', PACK_TENSOR_NAME_MAX); fix_crcs(b, *len, true, true); }
static void m_tensor_dup(unsigned char *b, size_t *len) { memcpy(TD(b)[1].name, TD(b)[0].name, PACK_TENSOR_NAME_MAX); fix_crcs(b, *len, true, true); }
static void m_tensor_dims(unsigned char *b, size_t *len) { TD(b)[0].n_dims = 0; fix_crcs(b, *len, true, true); }
static void m_tensor_bytes(unsigned char *b, size_t *len) { TD(b)[0].bytes += 4; fix_crcs(b, *len, true, true); }
static void m_tensor_shape_overflow(unsigned char *b, size_t *len)
{
	TD(b)[0].n_dims = 4;
	TD(b)[0].shape[0] = TD(b)[0].shape[1] = TD(b)[0].shape[2] = 1ull << 40;
	TD(b)[0].shape[3] = 1;
	fix_crcs(b, *len, true, true);
}
static void m_n_tensors(unsigned char *b, size_t *len) { H(b)->n_tensors = 1ull << 40; fix_crcs(b, *len, false, false); }
static void m_n_experts(unsigned char *b, size_t *len) { H(b)->model.n_experts = 1000000; fix_crcs(b, *len, false, false); }
static void m_n_parts(unsigned char *b, size_t *len) { H(b)->n_parts = 100; fix_crcs(b, *len, false, false); }
static void m_part_bytes(unsigned char *b, size_t *len) { H(b)->parts[1].bytes += 1; fix_crcs(b, *len, false, false); }
static void m_part_offset(unsigned char *b, size_t *len) { H(b)->parts[2].offset += 4; fix_crcs(b, *len, false, false); }
static void m_part_role(unsigned char *b, size_t *len) { H(b)->parts[0].role = 99; fix_crcs(b, *len, false, false); }
static void m_payload(unsigned char *b, size_t *len) { H(b)->extent_payload += 4096; fix_crcs(b, *len, false, false); }
static void m_extent_bytes(unsigned char *b, size_t *len) { H(b)->extent_bytes += 4096; fix_crcs(b, *len, false, false); }
static void m_index_count(unsigned char *b, size_t *len) { H(b)->index_count = 1ull << 62; fix_crcs(b, *len, false, false); }
static void m_resident_past_end(unsigned char *b, size_t *len) { H(b)->resident_bytes = UINT64_MAX; fix_crcs(b, *len, false, false); }
static void m_file_size(unsigned char *b, size_t *len) { H(b)->file_size += 1; fix_crcs(b, *len, false, false); }

Test(pack, hostile_header)
{
	hostile(m_magic, "bad magic");
	hostile(m_version, "unsupported pack version 3");
	hostile(m_header_size, "header size 512");
	hostile(m_header_crc, "header checksum mismatch");
	hostile(m_header_pad_crc, "header checksum mismatch");
	hostile(m_truncated, "truncated");
	hostile(m_tiny, "smaller than the 4096-byte header");
	hostile(m_file_size, "header says");
	hostile(m_n_experts, "expert count 1000000 out of range");
	hostile(m_n_parts, "part count 100 out of range");
	hostile(m_part_bytes, "part 1 (up)");
	hostile(m_part_offset, "part 2 (down): offset");
	hostile(m_part_role, "unknown role 99");
	hostile(m_payload, "extent payload");
	hostile(m_extent_bytes, "is not the payload");
	hostile(m_index_count, "index has");
	hostile(m_n_tensors, "resident tensors");
	hostile(m_resident_past_end, "resident region");

	/* trailing bytes after the last region */
	size_t len;
	unsigned char *b = load(&len);
	unsigned char *b2 = calloc(1, len + 1);
	memcpy(b2, b, len);
	expect_open_error(b2, len + 1, "trailing data");
	free(b2);
	free(b);
}

Test(pack, hostile_index)
{
	hostile(m_index_oob, "outside the file");
	hostile(m_index_misaligned, "index [");
	hostile(m_index_crc, "index checksum mismatch");
	hostile(m_extent_misaligned, "layer 0 expert 3: extent offset");
	hostile(m_extent_overlap, "overlaps extent of layer 1 expert 1");
	hostile(m_extent_partial_overlap, "overlaps");
	hostile(m_extent_on_index, "overlaps index");
	hostile(m_extent_in_header, "extent of layer 0 expert 2 [0, 20480) overlaps header");
	hostile(m_extent_past_end, "layer 1 expert 3: extent");
	hostile(m_extent_huge, "outside the");
	hostile(m_length, "layer 0 expert 2: extent length");
	hostile(m_swap, "says layer 0 expert 1, but its position is layer 0 expert 0");
	hostile(m_layer, "says layer 0 expert 0, but its position is layer 1 expert 0");
}

Test(pack, hostile_tensors)
{
	hostile(m_dir_past_end, "tensor directory");
	hostile(m_dir_crc, "tensor directory checksum mismatch");
	hostile(m_tensor_outside, "outside the resident region");
	hostile(m_tensor_unaligned, "is not 64-byte aligned");
	hostile(m_tensor_overlap, "overlaps tensor");
	hostile(m_tensor_name, "not NUL-terminated");
	hostile(m_tensor_dup, "appears twice");
	hostile(m_tensor_dims, "0 dimensions");
	hostile(m_tensor_bytes, "bytes, but its shape");
	hostile(m_tensor_shape_overflow, "overflows");
}

/* Every single-byte prefix of the header region, truncated: never a crash. */
Test(pack, hostile_truncations)
{
	size_t len;
	unsigned char *b = load(&len);
	size_t cuts[] = { 0, 1, 8, 4095, 4096, 4097, 8192, len / 2, len - 176, len - 1 };
	for (size_t i = 0; i < MOE_ARRAY_SIZE(cuts); i++) {
		struct pack_file *p;
		struct moe_error err = { "" };
		char p2[4200];
		snprintf(p2, sizeof(p2), "%s/cut.moepack", tmpdir);
		cr_assert_eq(tu_write_file(p2, b, cuts[i]), 0);
		cr_assert_lt(pack_open(p2, 0, &p, &err), 0, "cut at %zu opened", cuts[i]);
		cr_assert(strstr(err.msg, "truncated") || strstr(err.msg, "smaller"), "cut at %zu: %s", cuts[i], err.msg);
	}
	free(b);
}

/* ---- byte flips inside extents and resident tensors ---- */

struct reports {
	int n;
	char msg[8][512];
};

static void collect(void *ctx, const char *what)
{
	struct reports *r = ctx;
	if (r->n < 8)
		snprintf(r->msg[r->n], sizeof(r->msg[0]), "%s", what);
	r->n++;
}

static void flip_at(uint64_t off)
{
	int fd = open(path, O_RDWR);
	unsigned char c;
	cr_assert_geq(fd, 0);
	cr_assert_eq(pread(fd, &c, 1, (off_t)off), 1);
	c ^= 0x10;
	cr_assert_eq(pwrite(fd, &c, 1, (off_t)off), 1);
	close(fd);
}

Test(pack, byte_flips_found_by_verify)
{
	struct pack_file *p;
	struct moe_error err = { "" };
	/* layer 1 expert 2 (model layer 2) */
	uint64_t base, eb;
	cr_assert_eq(pack_open(path, 0, &p, &err), 0, "%s", err.msg);
	base = pack_expert(p, 1, 2)->offset;
	eb = pack_extent_bytes(p);
	pack_close(p);
	uint64_t where[] = { 0, PAYLOAD / 2, PAYLOAD - 1, PAYLOAD, eb - 1 };
	const char *kind[] = { "checksum", "checksum", "checksum", "padding", "padding" };
	for (size_t i = 0; i < MOE_ARRAY_SIZE(where); i++) {
		struct reports r = { 0 };
		flip_at(base + where[i]);
		cr_assert_eq(pack_open(path, 0, &p, &err), 0, "metadata untouched, must open: %s", err.msg);
		long n = pack_verify(p, collect, &r, &err);
		cr_assert_eq(n, 1, "flip at %lu: %ld failures", (unsigned long)where[i], n);
		cr_assert_eq(r.n, 1);
		cr_assert(strstr(r.msg[0], "layer 1 (model layer 2) expert 2"), "%s", r.msg[0]);
		cr_assert(strstr(r.msg[0], kind[i]), "%s", r.msg[0]);
		void *buf = NULL;
		cr_assert_eq(posix_memalign(&buf, PACK_ALIGN, eb), 0);
		cr_assert_lt(pack_read_expert(p, 1, 2, buf, &err), 0);
		cr_assert(strstr(err.msg, "layer 1 (model layer 2) expert 2"), "%s", err.msg);
		cr_assert_eq(pack_read_expert(p, 1, 1, buf, &err), 0, "%s", err.msg);
		free(buf);
		pack_close(p);

		/* the CLI says the same and fails */
		char out[4300];
		snprintf(out, sizeof(out), "%s/verify.out", tmpdir);
		int st = tu_sh("'%s' verify '%s' > '%s' 2>&1", tu_build_path("tools/moe-pack"), path, out);
		cr_assert_neq(st, 0, "moe-pack verify exit status");
		char *txt = tu_read_file(out, NULL);
		cr_assert_not_null(txt);
		cr_assert(strstr(txt, "layer 1 (model layer 2) expert 2"), "%s", txt);
		free(txt);
		flip_at(base + where[i]); /* undo */
	}
	char out[4300];
	snprintf(out, sizeof(out), "%s/verify.out", tmpdir);
	cr_assert_eq(tu_sh("'%s' verify '%s' > '%s' 2>&1", tu_build_path("tools/moe-pack"), path, out), 0);
	char *txt = tu_read_file(out, NULL);
	cr_assert(strstr(txt, "OK: 8 experts, 3 tensors verified"), "%s", txt);
	free(txt);
}

Test(pack, tensor_flip_found_by_verify)
{
	struct pack_file *p;
	struct moe_error err = { "" };
	struct reports r = { 0 };
	cr_assert_eq(pack_open(path, 0, &p, &err), 0, "%s", err.msg);
	const struct pack_tensor_entry *t = pack_find_tensor(p, "model.layers.1.mlp.gate.weight");
	cr_assert_not_null(t);
	uint64_t off = t->offset + t->bytes - 1;
	pack_close(p);
	flip_at(off);
	cr_assert_eq(pack_open(path, 0, &p, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_verify(p, collect, &r, &err), 1);
	cr_assert(strstr(r.msg[0], "tensor model.layers.1.mlp.gate.weight: checksum mismatch"), "%s", r.msg[0]);
	t = pack_find_tensor(p, "model.layers.1.mlp.gate.weight");
	unsigned char buf[N_EXP * N_HID * 4];
	cr_assert_lt(pack_read_tensor(p, t, buf, &err), 0);
	pack_close(p);
}

/* Many flips in different experts: each one reported once. */
Test(pack, many_flips_each_reported)
{
	struct pack_file *p;
	struct moe_error err = { "" };
	struct reports r = { 0 };
	cr_assert_eq(pack_open(path, 0, &p, &err), 0, "%s", err.msg);
	uint64_t o1 = pack_expert(p, 0, 0)->offset + 7, o2 = pack_expert(p, 1, 3)->offset + PAYLOAD - 1;
	pack_close(p);
	flip_at(o1);
	flip_at(o2);
	cr_assert_eq(pack_open(path, 0, &p, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_verify(p, collect, &r, &err), 2);
	cr_assert(strstr(r.msg[0], "layer 0 (model layer 1) expert 0"), "%s", r.msg[0]);
	cr_assert(strstr(r.msg[1], "layer 1 (model layer 2) expert 3"), "%s", r.msg[1]);
	pack_close(p);
}

/* ---- version 2: per-layer layouts ---------------------------------------
 * MoE layer 0: gate, up, down f32 (18432 bytes); layer 1: down in bf16
 * (15360 bytes), so its extents end in 3072 zero bytes inside the payload. */
#define PAYLOAD1 (2u * N_W * N_HID * 4u + N_HID * N_W * 2u)

static int create_layered(const char *p, bool same, struct pack_writer **w, struct moe_error *err)
{
	struct moe_model_config m;
	struct pack_layout_disk lay[2];
	uint8_t map[N_MOE] = { 0, 1 };

	test_model(&m);
	memset(lay, 0, sizeof(lay));
	lay[0].n_parts = lay[1].n_parts = test_parts(lay[0].parts);
	memcpy(lay[1].parts, lay[0].parts, sizeof(lay[0].parts));
	if (!same)
		lay[1].parts[2].dtype = MOE_DTYPE_BF16;
	return pack_writer_create_layers(p, &m, lay, 2, map, "test", w, err);
}

static void write_layered_pack(const char *p, bool same)
{
	struct pack_writer *w;
	struct moe_error err = { "" };
	unsigned char buf[PAYLOAD];

	cr_assert_eq(create_layered(p, same, &w, &err), 0, "%s", err.msg);
	for (uint32_t l = 0; l < N_MOE; l++)
		for (uint32_t e = 0; e < N_EXP; e++) {
			fill_expert(l, e, buf);
			cr_assert_eq(pack_writer_begin_expert(w, l, e, &err), 0, "%s", err.msg);
			cr_assert_eq(pack_writer_write(w, buf, l && !same ? PAYLOAD1 : PAYLOAD, &err), 0, "%s", err.msg);
			cr_assert_eq(pack_writer_end_expert(w, &err), 0, "%s", err.msg);
		}
	cr_assert_eq(pack_writer_finish(w, &err), 0, "%s", err.msg);
}

Test(pack, layered_round_trip)
{
	char p2[4200];
	struct pack_file *p;
	struct moe_error err = { "" };
	unsigned char *buf = aligned_alloc(PACK_ALIGN, 20480), want[PAYLOAD];

	snprintf(p2, sizeof(p2), "%s/layered.moepack", tmpdir);
	write_layered_pack(p2, false);
	cr_assert_eq(pack_open(p2, 0, &p, &err), 0, "%s", err.msg);
	cr_assert_eq(p->hdr->version, 2);
	cr_assert(!pack_uniform(p));
	cr_assert_eq(p->hdr->n_parts, 0);
	cr_assert_null(pack_part(p, PACK_ROLE_DOWN), "version 2 has no one part table");
	cr_assert_eq(p->hdr->extent_payload, PAYLOAD, "every extent holds the largest layout");
	cr_assert_eq(pack_extent_bytes(p), 20480u);
	cr_assert_eq(pack_layer_layout(p, 0)->payload, PAYLOAD);
	cr_assert_eq(pack_layer_layout(p, 1)->payload, PAYLOAD1);
	cr_assert_null(pack_layer_layout(p, N_MOE));
	cr_assert_eq(pack_layer_part(p, 0, PACK_ROLE_DOWN)->dtype, MOE_DTYPE_F32);
	cr_assert_eq(pack_layer_part(p, 1, PACK_ROLE_DOWN)->dtype, MOE_DTYPE_BF16);
	cr_assert_eq(pack_layer_part(p, 1, PACK_ROLE_DOWN)->offset, 2u * N_W * N_HID * 4u);
	cr_assert_eq(pack_layer_part(p, 1, PACK_ROLE_DOWN)->bytes, N_HID * N_W * 2u);
	for (uint32_t l = 0; l < N_MOE; l++)
		for (uint32_t e = 0; e < N_EXP; e++) {
			uint32_t n = l ? PAYLOAD1 : PAYLOAD;
			memset(buf, 0xAA, 20480);
			cr_assert_eq(pack_read_expert(p, l, e, buf, &err), 0, "%s", err.msg);
			fill_expert(l, e, want);
			cr_assert_eq(memcmp(buf, want, n), 0, "layer %u expert %u", l, e);
			for (uint32_t i = n; i < 20480; i++)
				cr_assert_eq(buf[i], 0, "layer %u expert %u byte %u after the layer's parts", l, e, i);
			cr_assert_eq(p->index[l * N_EXP + e].length, PAYLOAD);
		}
	cr_assert_eq(pack_verify(p, NULL, NULL, &err), 0, "%s", err.msg);
	pack_close(p);

	/* the same layout twice is one table: version 1 */
	write_layered_pack(p2, true);
	cr_assert_eq(pack_open(p2, 0, &p, &err), 0, "%s", err.msg);
	cr_assert_eq(p->hdr->version, 1);
	cr_assert(pack_uniform(p));
	cr_assert_eq(p->hdr->n_parts, 3);
	cr_assert_eq(pack_layer_layout(p, 1)->payload, PAYLOAD);
	cr_assert_eq(memcmp(pack_layer_part(p, 1, PACK_ROLE_DOWN), pack_part(p, PACK_ROLE_DOWN),
			    sizeof(struct pack_part_desc)), 0);
	pack_close(p);
	free(buf);
}

Test(pack, layered_writer_misuse)
{
	char p2[4200];
	struct pack_writer *w;
	struct moe_error err = { "" };
	unsigned char buf[PAYLOAD] = { 0 };
	struct moe_model_config m;
	struct pack_layout_disk lay[1];
	uint8_t map[N_MOE] = { 0, 1 };

	snprintf(p2, sizeof(p2), "%s/misuse.moepack", tmpdir);
	/* layer 1's layout is smaller: one byte more than it holds is refused */
	cr_assert_eq(create_layered(p2, false, &w, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_writer_begin_expert(w, 1, 0, &err), 0, "%s", err.msg);
	cr_assert_lt(pack_writer_write(w, buf, PAYLOAD1 + 1, &err), 0);
	cr_assert(strstr(err.msg, "more than"), "%s", err.msg);
	pack_writer_abort(w);
	/* a layer naming a layout that does not exist */
	test_model(&m);
	memset(lay, 0, sizeof(lay));
	lay[0].n_parts = test_parts(lay[0].parts);
	cr_assert_lt(pack_writer_create_layers(p2, &m, lay, 1, map, "test", &w, &err), 0);
	cr_assert(strstr(err.msg, "MoE layer 1: layout 1 of 1"), "%s", err.msg);
	cr_assert_eq(access(p2, F_OK), -1, "nothing written");
}

/* A version 2 copy of the hostile-file machinery. */
static char lpath[4200];
static unsigned char *load_layered(size_t *len)
{
	snprintf(lpath, sizeof(lpath), "%s/layered.moepack", tmpdir);
	write_layered_pack(lpath, false);
	unsigned char *b = (unsigned char *)tu_read_file(lpath, len);
	cr_assert_not_null(b);
	return b;
}

static void hostile_layered(mutator fn, const char *want)
{
	size_t len;
	unsigned char *b = load_layered(&len);
	fn(b, &len);
	expect_open_error(b, len, want);
	free(b);
}

static void l_n_layouts(unsigned char *b, size_t *len) { H(b)->n_layouts = 9; fix_crcs(b, *len, false, false); }
static void l_one_layout(unsigned char *b, size_t *len) { H(b)->n_layouts = 1; fix_crcs(b, *len, false, false); }
static void l_map(unsigned char *b, size_t *len) { H(b)->layer_layout[1] = 2; fix_crcs(b, *len, false, false); }
static void l_map_tail(unsigned char *b, size_t *len) { H(b)->layer_layout[N_MOE] = 1; fix_crcs(b, *len, false, false); }
static void l_payload(unsigned char *b, size_t *len) { H(b)->layouts[1].payload += 2; fix_crcs(b, *len, false, false); }
static void l_part_dtype(unsigned char *b, size_t *len) { H(b)->layouts[1].parts[2].dtype = MOE_DTYPE_F32; fix_crcs(b, *len, false, false); }
static void l_v1_parts(unsigned char *b, size_t *len) { H(b)->n_parts = 3; fix_crcs(b, *len, false, false); }
static void l_unused(unsigned char *b, size_t *len) { H(b)->layouts[5].n_parts = 1; fix_crcs(b, *len, false, false); }
static void l_max(unsigned char *b, size_t *len) { H(b)->extent_payload = PAYLOAD1; fix_crcs(b, *len, false, false); }
static void l_as_v1(unsigned char *b, size_t *len) { H(b)->version = 1; fix_crcs(b, *len, false, false); }

Test(pack, hostile_layered)
{
	hostile_layered(l_n_layouts, "layout count 9 out of range");
	hostile_layered(l_one_layout, "layout count 1 out of range");
	hostile_layered(l_map, "MoE layer 1: layout 2 of 2");
	hostile_layered(l_map_tail, "beyond the 2 MoE layers");
	hostile_layered(l_payload, "layout 1: payload");
	hostile_layered(l_part_dtype, "layout 1: part 2 (down): 3072 bytes");
	hostile_layered(l_v1_parts, "version 2 header with a version 1 part table");
	hostile_layered(l_unused, "unused layout 5");
	hostile_layered(l_max, "extent payload 15360 bytes, but the parts add up to 18432");
	hostile_layered(l_as_v1, "version 1 header with per-layer layout fields");
}

Test(pack, layered_tail_flip_found_by_verify)
{
	size_t len;
	unsigned char *b = load_layered(&len);
	struct pack_file *p;
	struct moe_error err = { "" };
	/* a byte of layer 1 expert 2's zero tail (inside the CRC'd payload) */
	uint64_t off = IX(b)[N_EXP + 2].offset + PAYLOAD1 + 100;
	b[off] = 1;
	cr_assert_eq(tu_write_file(lpath, b, len), 0);
	cr_assert_eq(pack_open(lpath, 0, &p, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_verify(p, NULL, NULL, &err), 1);
	unsigned char *x = aligned_alloc(PACK_ALIGN, 20480);
	cr_assert_eq(pack_read_expert(p, 1, 2, x, &err), -EBADMSG);
	cr_assert(strstr(err.msg, "layer 1 (model layer 2) expert 2"), "%s", err.msg);
	/* with the CRC fixed, the zero check still finds it */
	IX(b)[N_EXP + 2].crc32c = crc32c(b + IX(b)[N_EXP + 2].offset, PAYLOAD);
	fix_crcs(b, len, true, false);
	pack_close(p);
	cr_assert_eq(tu_write_file(lpath, b, len), 0);
	cr_assert_eq(pack_open(lpath, 0, &p, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_read_expert(p, 1, 2, x, &err), -EBADMSG);
	cr_assert(strstr(err.msg, "nonzero padding byte at extent offset 15460"), "%s", err.msg);
	cr_assert_eq(pack_verify(p, NULL, NULL, &err), 1);
	pack_close(p);
	free(x);
	free(b);
}
