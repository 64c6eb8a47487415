/* test_gguf_split.c - K-quant tensors and split GGUFs through moe-pack.
 * A moe-gen qwen3_moe f32 model (hidden and width 256, so every matrix
 * takes 256-element super-blocks) is retyped by tests/gguf-split --kquant
 * the way a Q4_K_M file mixes types (expert gate/up q4_K, down q6_K,
 * attention q5_K/q3_K/q2_K/iq4_xs, embedding iq4_nl, head q6_K), then
 * written as llama.cpp's gguf-split writes parts. The pack of the split
 * model must be byte-equal to the pack of the unsplit file, keep every
 * tensor's own type, and verify; a split with a part missing, a part named
 * out of order, a wrong split.count, a tensor in two parts or a wrong
 * split.tensors.count is refused with a message that says so. */
#include "config.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gguf.h"
#include "pack.h"
#include "testutil.h"

TestSuite(gguf_split, .timeout = 120);

/* dir/kq.gguf (K-quant, unsplit) and, with n_split > 1, dir/s/kq-0000i-of-0000N.gguf. */
static void make_models(const char *dir, int n_split, const char *faults)
{
	int st = tu_sh("'%s' model --family qwen3_moe --format gguf --dtype f32 --preset tiny --hidden 256 --width 256 "
		       "--out '%s/m' > '%s/gen.log' 2>&1",
		       tu_build_path("tools/moe-gen"), dir, dir);
	cr_assert_eq(st, 0, "moe-gen failed");
	st = tu_sh("'%s' --kquant '%s/m/model.gguf' '%s/kq.gguf' 2>'%s/split.log'", tu_build_path("tests/gguf-split"),
		   dir, dir, dir);
	cr_assert_eq(st, 0, "gguf-split --kquant failed");
	if (n_split > 1) {
		st = tu_sh("mkdir -p '%s/s' && '%s' --split %d %s '%s/kq.gguf' '%s/s/kq' 2>>'%s/split.log'", dir,
			   tu_build_path("tests/gguf-split"), n_split, faults, dir, dir, dir);
		cr_assert_eq(st, 0, "gguf-split --split failed");
	}
}

static int pack_cmd(const char *dir, char **out, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int pack_cmd(const char *dir, char **out, const char *fmt, ...)
{
	char args[8192], log[4200];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(args, sizeof(args), fmt, ap);
	va_end(ap);
	snprintf(log, sizeof(log), "%s/pack.log", dir);
	int st = tu_sh("'%s' %s > '%s' 2>&1", tu_build_path("tools/moe-pack"), args, log);
	*out = tu_read_file(log, NULL);
	return st;
}

static enum moe_dtype resident_dtype(struct pack_file *p, const char *name)
{
	const struct pack_tensor_entry *x = pack_find_tensor(p, name);
	cr_assert_not_null(x, "%s is not resident", name);
	return x->dtype;
}

/* Every tensor keeps its own type: the expert parts and the residents. */
Test(gguf_split, kquant_types_kept)
{
	char *dir = tu_mkdtemp("kq"), src[4200], out[4200], *log;
	struct pack_file *p;
	struct moe_error err = { "" };
	make_models(dir, 1, "");
	snprintf(src, sizeof(src), "%s/kq.gguf", dir);
	snprintf(out, sizeof(out), "%s/kq.moepack", dir);
	cr_assert_eq(pack_cmd(dir, &log, "convert '%s' -o '%s' -q", src, out), 0, "%s", log);
	free(log);
	cr_assert_eq(pack_open(out, 0, &p, &err), 0, "%s", err.msg);
	const struct pack_part_desc *parts = p->hdr->parts;
	cr_assert_eq(p->hdr->n_parts, 3);
	for (uint32_t i = 0; i < 3; i++) {
		const enum moe_dtype want = parts[i].role == PACK_ROLE_DOWN ? MOE_DTYPE_Q6_K : MOE_DTYPE_Q4_K;
		cr_assert_eq(parts[i].dtype, want, "part %u (%s) is %s", i, pack_role_name(parts[i].role),
			     moe_dtype_name(parts[i].dtype));
	}
	cr_assert_eq(resident_dtype(p, "blk.0.attn_q.weight"), MOE_DTYPE_Q5_K);
	cr_assert_eq(resident_dtype(p, "blk.1.attn_k.weight"), MOE_DTYPE_Q3_K);
	cr_assert_eq(resident_dtype(p, "blk.2.attn_v.weight"), MOE_DTYPE_Q2_K);
	cr_assert_eq(resident_dtype(p, "token_embd.weight"), MOE_DTYPE_IQ4_NL);
	cr_assert_eq(resident_dtype(p, "output.weight"), MOE_DTYPE_Q6_K);
	/* resident bytes unchanged */
	struct gguf_file *g;
	cr_assert_eq(gguf_open(src, &g, &err), 0, "%s", err.msg);
	const char *names[] = { "blk.0.attn_q.weight", "blk.2.attn_v.weight", "token_embd.weight", "output.weight" };
	for (size_t i = 0; i < 4; i++) {
		const struct pack_tensor_entry *x = pack_find_tensor(p, names[i]);
		const struct gguf_tensor *t = gguf_find_tensor(g, names[i]);
		cr_assert(x && t && x->bytes == t->bytes);
		uint8_t *a = malloc(x->bytes), *b = malloc(x->bytes);
		cr_assert_eq(pack_read_tensor(p, x, a, &err), 0, "%s", err.msg);
		cr_assert_eq(gguf_read(g, t, 0, b, x->bytes, &err), 0, "%s", err.msg);
		cr_assert_eq(memcmp(a, b, x->bytes), 0, "%s differs from the source", names[i]);
		free(a);
		free(b);
	}
	gguf_close(g);
	cr_assert_eq(pack_verify(p, NULL, NULL, &err), 0, "%s", err.msg);
	pack_close(p);
	cr_assert_eq(pack_cmd(dir, &log, "verify '%s'", out), 0, "%s", log);
	free(log);
	tu_rmtree(dir);
}

/* The first part's path opens the model: same KV (without split.*), same
 * tensors, and a pack byte-equal to the unsplit file's. */
Test(gguf_split, split_pack_equals_unsplit)
{
	char *dir = tu_mkdtemp("ks"), a[4200], b[4200], one[4200], first[4200], *log;
	struct gguf_file *g1, *gs;
	struct moe_error err = { "" };
	make_models(dir, 3, "");
	snprintf(one, sizeof(one), "%s/kq.gguf", dir);
	snprintf(first, sizeof(first), "%s/s/kq-00001-of-00003.gguf", dir);
	cr_assert_eq(gguf_open(one, &g1, &err), 0, "%s", err.msg);
	cr_assert_eq(gguf_open_model(first, &gs, &err), 0, "%s", err.msg);
	cr_assert_eq(gs->n_parts, 3);
	cr_assert_eq(gs->n_kv, g1->n_kv);
	for (uint64_t i = 0; i < g1->n_kv; i++)
		cr_assert_str_eq(gs->kv[i].key.data, g1->kv[i].key.data);
	cr_assert_null(gguf_find_kv(gs, "split.count"));
	cr_assert_eq(gs->n_tensors, g1->n_tensors);
	bool parts_seen[3] = { false, false, false };
	for (uint64_t i = 0; i < g1->n_tensors; i++) {
		const struct gguf_tensor *x = &g1->tensors[i], *y = gguf_find_tensor(gs, x->name.data);
		cr_assert_not_null(y, "%s missing from the split model", x->name.data);
		cr_assert_eq(y->bytes, x->bytes);
		cr_assert_eq(y->ggml_type, x->ggml_type);
		parts_seen[y->part] = true;
		uint8_t *p = malloc(x->bytes), *q = malloc(x->bytes);
		cr_assert_eq(gguf_read(g1, x, 0, p, x->bytes, &err), 0, "%s", err.msg);
		cr_assert_eq(gguf_read(gs, y, 0, q, y->bytes, &err), 0, "%s", err.msg);
		cr_assert_eq(memcmp(p, q, x->bytes), 0, "%s: bytes differ", x->name.data);
		free(p);
		free(q);
	}
	cr_assert(parts_seen[0] && parts_seen[1] && parts_seen[2]);
	gguf_close(g1);
	gguf_close(gs);

	snprintf(a, sizeof(a), "%s/one.moepack", dir);
	snprintf(b, sizeof(b), "%s/split.moepack", dir);
	cr_assert_eq(pack_cmd(dir, &log, "convert '%s' -o '%s' -q", one, a), 0, "%s", log);
	free(log);
	cr_assert_eq(pack_cmd(dir, &log, "convert '%s' -o '%s' -q", first, b), 0, "%s", log);
	free(log);
	cr_assert_eq(tu_sh("cmp -s '%s' '%s'", a, b), 0, "the split model's pack differs from the unsplit one's");
	cr_assert_eq(pack_cmd(dir, &log, "verify '%s'", b), 0, "%s", log);
	free(log);
	tu_rmtree(dir);
}

static void expect_refused(const char *path, const char *msg)
{
	struct gguf_file *g = NULL;
	struct moe_error err = { "" };
	int rc = gguf_open_model(path, &g, &err);
	cr_assert_neq(rc, 0, "%s opened", path);
	cr_assert_null(g);
	cr_assert(strstr(err.msg, msg), "%s: '%s' not in '%s'", path, msg, err.msg);
}

Test(gguf_split, malformed_splits_refused)
{
	char *dir = tu_mkdtemp("kb"), p[4200], *log;
	make_models(dir, 3, "");
	/* not the first part */
	snprintf(p, sizeof(p), "%s/s/kq-00002-of-00003.gguf", dir);
	expect_refused(p, "is part 2 of a model split in 3: open the first part");
	/* the first part under another name: the others cannot be found */
	cr_assert_eq(tu_sh("cp '%s/s/kq-00001-of-00003.gguf' '%s/renamed.gguf'", dir, dir), 0);
	snprintf(p, sizeof(p), "%s/renamed.gguf", dir);
	expect_refused(p, "does not end in -00001-of-00003.gguf");
	/* a part missing, through moe-pack too */
	cr_assert_eq(tu_sh("mv '%s/s/kq-00003-of-00003.gguf' '%s/p3'", dir, dir), 0);
	snprintf(p, sizeof(p), "%s/s/kq-00001-of-00003.gguf", dir);
	expect_refused(p, "split part 3 of 3 is missing");
	cr_assert_eq(pack_cmd(dir, &log, "convert '%s' -o '%s/x.moepack' -q", p, dir), 1, "%s", log);
	cr_assert(strstr(log, "split part 3 of 3 is missing"), "%s", log);
	free(log);
	cr_assert_neq(tu_sh("test -e '%s/x.moepack'", dir), 0, "no pack is left behind");

	/* split.count disagreeing in part 2 */
	cr_assert_eq(tu_sh("rm -rf '%s/s' && mkdir '%s/s' && '%s' --split 3 --count-off '%s/kq.gguf' '%s/s/kq'", dir, dir,
			   tu_build_path("tests/gguf-split"), dir, dir), 0);
	expect_refused(p, "says it is part 2 of 4, expected part 2 of 3");
	/* a tensor in two parts */
	cr_assert_eq(tu_sh("rm -rf '%s/s' && mkdir '%s/s' && '%s' --split 3 --dup '%s/kq.gguf' '%s/s/kq'", dir, dir,
			   tu_build_path("tests/gguf-split"), dir, dir), 0);
	expect_refused(p, "is in split parts 2 and 3");
	/* split.tensors.count one short */
	cr_assert_eq(tu_sh("rm -rf '%s/s' && mkdir '%s/s' && '%s' --split 3 --tensors-off '%s/kq.gguf' '%s/s/kq'", dir,
			   dir, tu_build_path("tests/gguf-split"), dir, dir), 0);
	expect_refused(p, "split.tensors.count is");
	/* a plain file is opened as gguf_open does */
	struct gguf_file *g;
	struct moe_error err = { "" };
	snprintf(p, sizeof(p), "%s/kq.gguf", dir);
	cr_assert_eq(gguf_open_model(p, &g, &err), 0, "%s", err.msg);
	cr_assert_eq(g->n_parts, 0);
	gguf_close(g);
	tu_rmtree(dir);
}
