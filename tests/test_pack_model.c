/* Description: whole-model packs. `moe-pack convert` of a GGUF keeps every
 * tensor that is not a routed expert in the resident region, byte-equal to
 * the source, under its GGUF name, plus the source's metadata as the
 * gguf.kv image that pack_open_kv parses; --experts-only keeps the old
 * router/bias/shared set; damaged resident bytes are found by
 * pack_read_tensor, pack_verify and `moe-pack verify`; a dense tensor of a
 * type the pack cannot hold is refused by name. */
#include "config.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gguf.h"
#include "pack.h"
#include "testutil.h"

TestSuite(pack_model, .timeout = 120);

/* Generates a tiny GGUF of the family and dtype into dir/m/model.gguf. */
static void gen_gguf(const char *dir, const char *family, const char *dtype, char *src, size_t len)
{
	int st = tu_sh("'%s' model --family %s --format gguf --dtype %s --preset tiny --out '%s/m' > '%s/gen.log' 2>&1",
		       tu_build_path("tools/moe-gen"), family, dtype, dir, dir);
	cr_assert_eq(st, 0, "moe-gen %s %s failed", family, dtype);
	snprintf(src, len, "%s/m/model.gguf", dir);
}

/* Runs moe-pack with args; returns the exit status, *out its output. */
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

/* The source tensors moe-pack puts into extents: routed expert stacks. */
static bool is_routed(const char *name)
{
	return strstr(name, "_exps.") != NULL;
}

static bool same_str(const struct gguf_str *a, const struct gguf_str *b)
{
	return a->len == b->len && memcmp(a->data, b->data, a->len) == 0;
}

/* Every KV pair of src is in kv, in the same order, with the same value. */
static void check_kv(const struct gguf_file *src, const struct gguf_file *kv)
{
	cr_assert_eq(kv->version, 3);
	cr_assert_eq(kv->n_tensors, 0);
	cr_assert_eq(kv->n_kv, src->n_kv);
	for (uint64_t i = 0; i < src->n_kv; i++) {
		const struct gguf_kv *a = &src->kv[i], *b = &kv->kv[i];
		cr_assert(same_str(&a->key, &b->key), "kv %lu: key %s, expected %s", (unsigned long)i, b->key.data,
			  a->key.data);
		cr_assert_eq(gguf_find_kv(kv, a->key.data), b);
		cr_assert_eq(a->type, b->type, "%s: type", a->key.data);
		switch (a->type) {
		case GGUF_TYPE_STRING:
			cr_assert(same_str(&a->v.str, &b->v.str), "%s: %s vs %s", a->key.data, a->v.str.data, b->v.str.data);
			break;
		case GGUF_TYPE_FLOAT32:
		case GGUF_TYPE_FLOAT64:
			cr_assert(memcmp(&a->v.f64, &b->v.f64, 8) == 0, "%s: %g vs %g", a->key.data, a->v.f64, b->v.f64);
			break;
		case GGUF_TYPE_ARRAY:
			cr_assert_eq(a->v.arr.type, b->v.arr.type, "%s: element type", a->key.data);
			cr_assert_eq(a->v.arr.count, b->v.arr.count, "%s: count", a->key.data);
			for (uint64_t j = 0; j < a->v.arr.count; j++) {
				if (a->v.arr.type == GGUF_TYPE_STRING) {
					const struct gguf_str *x, *y;
					cr_assert_eq(gguf_arr_str(a, j, &x), 0);
					cr_assert_eq(gguf_arr_str(b, j, &y), 0);
					cr_assert(same_str(x, y), "%s[%lu]", a->key.data, (unsigned long)j);
				} else if (a->v.arr.type == GGUF_TYPE_FLOAT32 || a->v.arr.type == GGUF_TYPE_FLOAT64) {
					double x, y;
					cr_assert_eq(gguf_arr_f64(a, j, &x), 0);
					cr_assert_eq(gguf_arr_f64(b, j, &y), 0);
					cr_assert(memcmp(&x, &y, 8) == 0, "%s[%lu]", a->key.data, (unsigned long)j);
				} else {
					int64_t x, y;
					cr_assert_eq(gguf_arr_i64(a, j, &x), 0);
					cr_assert_eq(gguf_arr_i64(b, j, &y), 0);
					cr_assert_eq(x, y, "%s[%lu]", a->key.data, (unsigned long)j);
				}
			}
			break;
		default:
			cr_assert_eq(a->v.u64, b->v.u64, "%s: value", a->key.data);
		}
	}
}

/* GGUF -> whole-model pack: every non-expert tensor byte-equal, gguf.kv
 * holds every key, the pack verifies. */
static void whole_model(const char *family, const char *dtype)
{
	char *dir = tu_mkdtemp("pm"), src[4200], out[4200], *log;
	struct gguf_file *g, *kv;
	struct pack_file *p;
	struct moe_error err = { "" };
	uint64_t want = 0;
	void *kvbuf;

	gen_gguf(dir, family, dtype, src, sizeof(src));
	snprintf(out, sizeof(out), "%s/x.moepack", dir);
	cr_assert_eq(pack_cmd(dir, &log, "convert '%s' -o '%s' -q", src, out), 0, "%s", log);
	free(log);
	cr_assert_eq(gguf_open(src, &g, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_open(out, 0, &p, &err), 0, "%s", err.msg);
	for (uint64_t i = 0; i < g->n_tensors; i++) {
		const struct gguf_tensor *t = &g->tensors[i];
		const struct pack_tensor_entry *x = pack_find_tensor(p, t->name.data);
		if (is_routed(t->name.data)) {
			cr_assert_null(x, "%s: routed experts stay in the extents", t->name.data);
			continue;
		}
		want++;
		cr_assert_not_null(x, "%s %s: %s is not resident", family, dtype, t->name.data);
		cr_assert_eq(x->dtype, t->dtype, "%s: dtype", t->name.data);
		cr_assert_eq(x->n_dims, t->n_dims, "%s: dims", t->name.data);
		for (uint32_t d = 0; d < t->n_dims; d++)
			cr_assert_eq(x->shape[d], t->ne[t->n_dims - 1 - d], "%s: dim %u", t->name.data, d);
		cr_assert_eq(x->bytes, t->bytes);
		if (strncmp(t->name.data, "blk.", 4) == 0)
			cr_assert_eq(x->layer, (uint32_t)strtoul(t->name.data + 4, NULL, 10), "%s: layer", t->name.data);
		else
			cr_assert_eq(x->layer, UINT32_MAX, "%s: layer", t->name.data);
		if (x->role != PACK_ROLE_OTHER)
			cr_assert(strstr(t->name.data, "ffn_gate_inp") || strstr(t->name.data, "_shexp") ||
					  strstr(t->name.data, "exp_probs_b"),
				  "%s: role %s", t->name.data, pack_role_name(x->role));
		uint8_t *a = malloc(x->bytes), *b = malloc(x->bytes);
		cr_assert_eq(pack_read_tensor(p, x, a, &err), 0, "%s", err.msg);
		cr_assert_eq(gguf_read(g, t, 0, b, x->bytes, &err), 0, "%s", err.msg);
		cr_assert_eq(memcmp(a, b, x->bytes), 0, "%s: bytes differ from the source", t->name.data);
		free(a);
		free(b);
	}
	/* the embeddings, attention and head really are there */
	cr_assert_not_null(pack_find_tensor(p, "token_embd.weight"));
	cr_assert_not_null(pack_find_tensor(p, "blk.0.attn_q.weight"));
	cr_assert_not_null(pack_find_tensor(p, "output_norm.weight"));
	const struct pack_tensor_entry *m = pack_find_tensor(p, PACK_KV_TENSOR);
	cr_assert_not_null(m);
	cr_assert_eq(m->dtype, MOE_DTYPE_U8);
	cr_assert_eq(m->n_dims, 1);
	cr_assert_eq(p->hdr->n_tensors, want + 1, "%lu resident tensors, expected %lu",
		     (unsigned long)p->hdr->n_tensors, (unsigned long)want + 1);
	cr_assert_eq(pack_open_kv(p, &kvbuf, &kv, &err), 0, "%s", err.msg);
	check_kv(g, kv);
	const char *arch;
	cr_assert_eq(gguf_get_str(kv, "general.architecture", &arch, NULL), 0);
	gguf_close(kv);
	free(kvbuf);
	cr_assert_eq(pack_verify(p, NULL, NULL, &err), 0, "%s", err.msg);
	pack_close(p);
	gguf_close(g);
	tu_rmtree(dir);
}

Test(pack_model, qwen2_moe) { whole_model("qwen2_moe", "f32"); whole_model("qwen2_moe", "q8_0"); }
Test(pack_model, qwen3_moe) { whole_model("qwen3_moe", "bf16"); whole_model("qwen3_moe", "q4_0"); }
Test(pack_model, olmoe) { whole_model("olmoe", "f16"); }
Test(pack_model, mixtral) { whole_model("mixtral", "q8_0"); }
Test(pack_model, deepseek_v3) { whole_model("deepseek_v3", "f32"); }
Test(pack_model, gpt_oss) { whole_model("gpt_oss", "mxfp4"); }

/* --experts-only: routers, biases and shared experts only, no metadata. */
Test(pack_model, experts_only)
{
	char *dir = tu_mkdtemp("pmx"), src[4200], out[4200], *log;
	struct pack_file *p;
	struct moe_error err = { "" };
	struct gguf_file *kv;
	void *kvbuf;

	gen_gguf(dir, "qwen2_moe", "f32", src, sizeof(src));
	snprintf(out, sizeof(out), "%s/x.moepack", dir);
	cr_assert_eq(pack_cmd(dir, &log, "convert --experts-only '%s' -o '%s' -q", src, out), 0, "%s", log);
	free(log);
	cr_assert_eq(pack_open(out, 0, &p, &err), 0, "%s", err.msg);
	/* tiny qwen2_moe: 3 MoE layers x (router + 3 shared + shared gate) */
	cr_assert_eq(p->hdr->n_tensors, 15);
	for (uint64_t i = 0; i < p->hdr->n_tensors; i++)
		cr_assert_neq(p->tensors[i].role, PACK_ROLE_OTHER, "%s", p->tensors[i].name);
	cr_assert_null(pack_find_tensor(p, "token_embd.weight"));
	cr_assert_eq(pack_open_kv(p, &kvbuf, &kv, &err), -ENOENT);
	cr_assert(strstr(err.msg, PACK_KV_TENSOR), "%s", err.msg);
	cr_assert_null(kv);
	cr_assert_null(kvbuf);
	pack_close(p);

	/* info: the summary by kind, the list with --tensors */
	cr_assert_eq(pack_cmd(dir, &log, "info '%s'", out), 0, "%s", log);
	cr_assert(strstr(log, "routers and biases") && strstr(log, "shared experts"), "%s", log);
	cr_assert_null(strstr(log, "blk.0.ffn_gate_inp.weight"), "%s", log);
	free(log);
	cr_assert_eq(pack_cmd(dir, &log, "info --tensors '%s'", out), 0, "%s", log);
	cr_assert(strstr(log, "blk.0.ffn_gate_inp.weight"), "%s", log);
	free(log);
	cr_assert_eq(pack_cmd(dir, &log, "info --json '%s'", out), 0, "%s", log);
	cr_assert(strstr(log, "\"whole_model\": false") && strstr(log, "\"shared_expert\": {"), "%s", log);
	free(log);
	/* and the default: the whole model */
	cr_assert_eq(pack_cmd(dir, &log, "convert '%s' -o '%s' -q", src, out), 0, "%s", log);
	free(log);
	cr_assert_eq(pack_cmd(dir, &log, "info '%s'", out), 0, "%s", log);
	cr_assert(strstr(log, "(whole model, with " PACK_KV_TENSOR ")") && strstr(log, "attention"), "%s", log);
	free(log);
	cr_assert_eq(pack_cmd(dir, &log, "info --json '%s'", out), 0, "%s", log);
	cr_assert(strstr(log, "\"whole_model\": true") && strstr(log, "\"embedding\": {"), "%s", log);
	free(log);
	tu_rmtree(dir);
}

static void collect(void *ctx, const char *what)
{
	char *buf = ctx;
	size_t n = strlen(buf);
	snprintf(buf + n, 4096 - n, "%s\n", what);
}

/* Flips one byte of a resident tensor in the file. */
static void flip(const char *path, uint64_t off)
{
	size_t len = 0;
	char *b = tu_read_file(path, &len);
	cr_assert_not_null(b);
	cr_assert_lt(off, len);
	b[off] ^= 0x10;
	cr_assert_eq(tu_write_file(path, b, len), 0);
	free(b);
}

/* A damaged attention weight or metadata byte: pack_open still succeeds (it
 * checks the directory), reading or verifying names the tensor. */
Test(pack_model, corrupted_resident)
{
	char *dir = tu_mkdtemp("pmc"), src[4200], out[4200], *log, found[4096] = "";
	struct pack_file *p;
	struct moe_error err = { "" };
	struct gguf_file *kv;
	void *kvbuf;

	gen_gguf(dir, "olmoe", "f32", src, sizeof(src));
	snprintf(out, sizeof(out), "%s/x.moepack", dir);
	cr_assert_eq(pack_cmd(dir, &log, "convert '%s' -o '%s' -q", src, out), 0, "%s", log);
	free(log);
	cr_assert_eq(pack_open(out, 0, &p, &err), 0, "%s", err.msg);
	const struct pack_tensor_entry *q = pack_find_tensor(p, "blk.1.attn_k.weight");
	const struct pack_tensor_entry *m = pack_find_tensor(p, PACK_KV_TENSOR);
	cr_assert_not_null(q);
	cr_assert_not_null(m);
	uint64_t qoff = q->offset + q->bytes / 2, moff = m->offset + m->bytes - 1;
	pack_close(p);
	flip(out, qoff);
	flip(out, moff);

	cr_assert_eq(pack_open(out, 0, &p, &err), 0, "%s", err.msg);
	q = pack_find_tensor(p, "blk.1.attn_k.weight");
	uint8_t *buf = malloc(q->bytes);
	cr_assert_eq(pack_read_tensor(p, q, buf, &err), -EBADMSG);
	cr_assert(strstr(err.msg, "blk.1.attn_k.weight") && strstr(err.msg, "checksum"), "%s", err.msg);
	free(buf);
	cr_assert_eq(pack_open_kv(p, &kvbuf, &kv, &err), -EBADMSG);
	cr_assert(strstr(err.msg, PACK_KV_TENSOR), "%s", err.msg);
	cr_assert_eq(pack_verify(p, collect, found, &err), 2);
	cr_assert(strstr(found, "blk.1.attn_k.weight") && strstr(found, PACK_KV_TENSOR), "%s", found);
	pack_close(p);

	cr_assert_eq(pack_cmd(dir, &log, "verify '%s'", out), 1, "%s", log);
	cr_assert(strstr(log, "FAIL: tensor blk.1.attn_k.weight: checksum mismatch"), "%s", log);
	cr_assert(strstr(log, "FAIL: tensor " PACK_KV_TENSOR ": checksum mismatch"), "%s", log);
	cr_assert(strstr(log, "FAILED: 2 of"), "%s", log);
	free(log);
	tu_rmtree(dir);
}

/* Rewrites the ggml type of tensor `name` in a GGUF file's tensor infos. */
static void set_gguf_type(const char *path, const char *name, uint32_t type)
{
	size_t len = 0, nl = strlen(name);
	uint8_t *b = (uint8_t *)tu_read_file(path, &len), key[72];
	uint64_t n64 = nl;
	memcpy(key, &n64, 8);
	memcpy(key + 8, name, nl);
	uint8_t *at = memmem(b, len, key, 8 + nl);
	cr_assert_not_null(at, "%s not in %s", name, path);
	uint8_t *info = at + 8 + nl;
	uint32_t n_dims;
	memcpy(&n_dims, info, 4);
	cr_assert(n_dims >= 1 && n_dims <= 4);
	memcpy(info + 4 + 8 * n_dims, &type, 4);
	cr_assert_eq(tu_write_file(path, b, len), 0);
	free(b);
}

/* A dense tensor of a type the pack cannot hold: refused by name and type,
 * unless --experts-only leaves it out. */
Test(pack_model, unsupported_dtype_refused)
{
	char *dir = tu_mkdtemp("pmu"), src[4200], out[4200], *log;
	gen_gguf(dir, "qwen3_moe", "f32", src, sizeof(src));
	/* F32 -> I32: same size, so the GGUF stays valid */
	set_gguf_type(src, "output_norm.weight", GGUF_GGML_F32 + 26);
	snprintf(out, sizeof(out), "%s/x.moepack", dir);
	cr_assert_eq(pack_cmd(dir, &log, "convert '%s' -o '%s' -q", src, out), 1, "%s", log);
	cr_assert(strstr(log, "tensor output_norm.weight has type I32"), "%s", log);
	cr_assert(strstr(log, "--experts-only"), "%s", log);
	free(log);
	cr_assert_neq(access(out, F_OK), 0, "no pack is left behind");
	cr_assert_eq(pack_cmd(dir, &log, "convert --experts-only '%s' -o '%s' -q", src, out), 0, "%s", log);
	free(log);
	tu_rmtree(dir);
}

/* The same from safetensors: an I32 norm (same size as F32) is refused by
 * name; an HF tensor llama.cpp has no name for is refused too. */
Test(pack_model, st_unsupported_refused)
{
	char *dir = tu_mkdtemp("pmv"), path[4200], *log;
	size_t len = 0;
	cr_assert_eq(tu_sh("'%s' model --family olmoe --dtype f32 --preset tiny --out '%s/s' > /dev/null 2>&1",
			   tu_build_path("tools/moe-gen"), dir), 0);
	snprintf(path, sizeof(path), "%s/s/model.safetensors", dir);
	char *b = tu_read_file(path, &len);
	const char *key = "\"model.norm.weight\":{\"dtype\":\"F32\"";
	char *at = memmem(b, len, key, strlen(key));
	cr_assert_not_null(at, "the generated header changed");
	memcpy(at + strlen(key) - 4, "I32", 3);
	cr_assert_eq(tu_write_file(path, b, len), 0);
	free(b);
	cr_assert_eq(pack_cmd(dir, &log, "convert '%s/s' -o '%s/x.moepack' -q", dir, dir), 1, "%s", log);
	cr_assert(strstr(log, "tensor model.norm.weight has type I32"), "%s", log);
	free(log);
	cr_assert_eq(pack_cmd(dir, &log, "convert --experts-only '%s/s' -o '%s/x.moepack' -q", dir, dir), 0, "%s", log);
	free(log);
	/* back to F32, under a name no GGUF has */
	b = tu_read_file(path, &len);
	at = memmem(b, len, key, strlen(key) - 5);
	cr_assert_not_null(at);
	memcpy(at + strlen(key) - 4, "F32", 3);
	memcpy(at + 7, "x", 1); /* model.xorm.weight */
	cr_assert_eq(tu_write_file(path, b, len), 0);
	free(b);
	cr_assert_eq(pack_cmd(dir, &log, "convert '%s/s' -o '%s/x.moepack' -q", dir, dir), 1, "%s", log);
	cr_assert(strstr(log, "tensor model.xorm.weight: no llama.cpp name is known"), "%s", log);
	free(log);
	tu_rmtree(dir);
}

/* ---- safetensors -> whole-model pack: what a GGUF of the model holds ---- */

/* The safetensors and GGUF moe-gen writes of one f32 model hold the same
 * values (gen.h's contract); their whole-model packs must hold the same
 * resident tensors: same GGUF names, shapes and bytes (Mixtral's q/k rows
 * in llama.cpp's RoPE order included), and gguf.kv must agree on every
 * key both have, with the ones moe-run reads present. */
static void st_vs_gguf(const char *family, const char *extra)
{
	char *dir = tu_mkdtemp("pms"), a[4200], b[4200], *log;
	struct pack_file *ps, *pg;
	struct moe_error err = { "" };
	struct gguf_file *ks, *kg;
	void *bs, *bg;
	char arch[32];

	char gen[4200];
	snprintf(gen, sizeof(gen), "%s", tu_build_path("tools/moe-gen"));
	int st = tu_sh("'%s' model --family %s --format safetensors --dtype f32 --preset tiny %s --out '%s/s' > /dev/null 2>&1 && "
		       "'%s' model --family %s --format gguf --dtype f32 --preset tiny %s --out '%s/g' > /dev/null 2>&1",
		       gen, family, extra, dir, gen, family, extra, dir);
	cr_assert_eq(st, 0, "moe-gen %s %s", family, extra);
	snprintf(a, sizeof(a), "%s/s.moepack", dir);
	snprintf(b, sizeof(b), "%s/g.moepack", dir);
	cr_assert_eq(pack_cmd(dir, &log, "convert '%s/s' -o '%s' -q", dir, a), 0, "%s", log);
	free(log);
	cr_assert_eq(pack_cmd(dir, &log, "convert '%s/g/model.gguf' -o '%s' -q", dir, b), 0, "%s", log);
	free(log);
	cr_assert_eq(pack_open(a, 0, &ps, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_open(b, 0, &pg, &err), 0, "%s", err.msg);
	cr_assert_str_eq(ps->hdr->source, "safetensors");
	cr_assert_eq(ps->hdr->n_tensors, pg->hdr->n_tensors, "%s: %lu resident tensors from safetensors, %lu from GGUF",
		     family, (unsigned long)ps->hdr->n_tensors, (unsigned long)pg->hdr->n_tensors);
	for (uint64_t i = 0; i < pg->hdr->n_tensors; i++) {
		const struct pack_tensor_entry *y = &pg->tensors[i], *x = pack_find_tensor(ps, y->name);
		cr_assert_not_null(x, "%s: %s missing from the safetensors pack", family, y->name);
		if (!strcmp(y->name, PACK_KV_TENSOR))
			continue;
		cr_assert_eq(x->role, y->role, "%s: role", y->name);
		cr_assert_eq(x->layer, y->layer, "%s: layer", y->name);
		cr_assert_eq(x->dtype, y->dtype, "%s: dtype", y->name);
		cr_assert_eq(x->n_dims, y->n_dims, "%s: dims", y->name);
		cr_assert_eq(memcmp(x->shape, y->shape, sizeof(x->shape)), 0, "%s: shape", y->name);
		uint8_t *u = malloc(x->bytes), *v = malloc(y->bytes);
		cr_assert_eq(pack_read_tensor(ps, x, u, &err), 0, "%s", err.msg);
		cr_assert_eq(pack_read_tensor(pg, y, v, &err), 0, "%s", err.msg);
		cr_assert_eq(memcmp(u, v, x->bytes), 0, "%s %s: bytes differ between the safetensors and GGUF packs",
			     family, y->name);
		free(u);
		free(v);
	}
	cr_assert_eq(pack_open_kv(ps, &bs, &ks, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_open_kv(pg, &bg, &kg, &err), 0, "%s", err.msg);
	const char *ar;
	cr_assert_eq(gguf_get_str(kg, "general.architecture", &ar, NULL), 0);
	snprintf(arch, sizeof(arch), "%s", ar);
	cr_assert_eq(gguf_get_str(ks, "general.architecture", &ar, NULL), 0);
	cr_assert_str_eq(ar, arch);
	for (uint64_t i = 0; i < ks->n_kv; i++) {
		const struct gguf_kv *x = &ks->kv[i], *y = gguf_find_kv(kg, x->key.data);
		size_t kl = x->key.len;
		/* feed_forward_length: llama.cpp's converter writes config.json's
		 * intermediate_size (the dense width, unused by these MoE graphs),
		 * which moe-gen's qwen3moe config and GGUF do not agree on */
		if (!y || !strcmp(x->key.data, "general.name") ||
		    (kl > 20 && !strcmp(x->key.data + kl - 20, ".feed_forward_length")))
			continue;
		cr_assert_eq(x->type, y->type, "%s: type", x->key.data);
		if (x->type == GGUF_TYPE_STRING) {
			cr_assert(same_str(&x->v.str, &y->v.str), "%s", x->key.data);
		} else if (x->type != GGUF_TYPE_ARRAY) {
			cr_assert_eq(x->v.u64, y->v.u64, "%s: %lu vs %lu", x->key.data, (unsigned long)x->v.u64,
				     (unsigned long)y->v.u64);
		} else {
			/* the vocabulary: tokens, scores, types */
			cr_assert_eq(x->v.arr.type, y->v.arr.type, "%s", x->key.data);
			cr_assert_eq(x->v.arr.count, y->v.arr.count, "%s", x->key.data);
			for (uint64_t j = 0; j < x->v.arr.count; j++) {
				if (x->v.arr.type == GGUF_TYPE_STRING) {
					cr_assert(same_str(((struct gguf_str *)x->v.arr.data) + j, ((struct gguf_str *)y->v.arr.data) + j),
						  "%s[%lu]", x->key.data, (unsigned long)j);
				} else {
					double u, v;
					cr_assert_eq(gguf_arr_f64(x, j, &u), 0);
					cr_assert_eq(gguf_arr_f64(y, j, &v), 0);
					cr_assert_eq(u, v, "%s[%lu]: %g vs %g", x->key.data, (unsigned long)j, u, v);
				}
			}
		}
	}
	static const char *const need[] = { "block_count", "embedding_length", "context_length", "attention.head_count",
					    "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "expert_count",
					    "expert_used_count", "rope.freq_base" };
	for (size_t i = 0; i < sizeof(need) / sizeof(need[0]); i++) {
		char key[128];
		snprintf(key, sizeof(key), "%s.%s", arch, need[i]);
		cr_assert_not_null(gguf_find_kv(ks, key), "%s: %s missing", family, key);
	}
	gguf_close(ks);
	gguf_close(kg);
	free(bs);
	free(bg);
	cr_assert_eq(pack_verify(ps, NULL, NULL, &err), 0, "%s", err.msg);
	pack_close(ps);
	pack_close(pg);
	tu_rmtree(dir);
}

Test(pack_model, st_qwen2_moe) { st_vs_gguf("qwen2_moe", ""); }
Test(pack_model, st_qwen3_moe) { st_vs_gguf("qwen3_moe", ""); st_vs_gguf("qwen3_moe", "--heads 4 --kv-heads 2"); }
Test(pack_model, st_olmoe) { st_vs_gguf("olmoe", ""); }
/* several heads and GQA: q and k rows are permuted per head of their own count */
Test(pack_model, st_mixtral) { st_vs_gguf("mixtral", ""); st_vs_gguf("mixtral", "--heads 4 --kv-heads 2"); }
/* tiny-lm: moe-gen's vocabulary as tokenizer.json and as GGUF keys */
Test(pack_model, st_tiny_lm)
{
	st_vs_gguf("mixtral", "--preset tiny-lm");
	st_vs_gguf("qwen3_moe", "--preset tiny-lm");
}

/* ---- tokenizer.json -> tokenizer.ggml.* ---- */

static const struct gguf_kv *need_kv(const struct gguf_file *kv, const char *key, uint32_t type)
{
	const struct gguf_kv *x = gguf_find_kv(kv, key);
	cr_assert_not_null(x, "%s missing", key);
	cr_assert_eq(x->type, type, "%s: type %u", key, x->type);
	return x;
}

static const char *arr_str(const struct gguf_kv *x, uint64_t i)
{
	const struct gguf_str *s;
	cr_assert_eq(gguf_arr_str(x, i, &s), 0);
	return s->data;
}

static int64_t arr_int(const struct gguf_kv *x, uint64_t i)
{
	int64_t v;
	cr_assert_eq(gguf_arr_i64(x, i, &v), 0);
	return v;
}

/* Generates an f32 safetensors model of the family with the given
 * tokenizer files, packs it; returns the pack's KV and config's vocab_size. */
static struct gguf_file *st_with_tokenizer(const char *dir, const char *family, const char *tok, const char *tok_cfg,
					   struct pack_file **p, void **buf, uint64_t *vocab)
{
	char path[4200], *log;
	struct moe_error err = { "" };
	struct gguf_file *kv;
	cr_assert_eq(tu_sh("'%s' model --family %s --dtype f32 --preset tiny --out '%s/s' > /dev/null 2>&1",
			   tu_build_path("tools/moe-gen"), family, dir), 0);
	snprintf(path, sizeof(path), "%s/s/tokenizer.json", dir);
	cr_assert_eq(tu_write_file(path, tok, strlen(tok)), 0);
	snprintf(path, sizeof(path), "%s/s/tokenizer_config.json", dir);
	cr_assert_eq(tu_write_file(path, tok_cfg, strlen(tok_cfg)), 0);
	snprintf(path, sizeof(path), "%s/s/config.json", dir);
	char *cfg = tu_read_file(path, NULL);
	const char *vs = strstr(cfg, "\"vocab_size\"");
	cr_assert_not_null(vs);
	*vocab = strtoull(strchr(vs, ':') + 1, NULL, 10);
	free(cfg);
	snprintf(path, sizeof(path), "%s/x.moepack", dir);
	cr_assert_eq(pack_cmd(dir, &log, "convert '%s/s' -o '%s' -q", dir, path), 0, "%s", log);
	free(log);
	cr_assert_eq(pack_open(path, 0, p, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_open_kv(*p, buf, &kv, &err), 0, "%s", err.msg);
	return kv;
}

/* Byte-level BPE (Qwen2): gpt2 model, qwen2 pre-tokenizer, merges in both
 * JSON forms, added special tokens CONTROL, missing ids [PADi]. */
Test(pack_model, st_tokenizer_bpe)
{
	char *dir = tu_mkdtemp("pmt");
	struct pack_file *p;
	void *buf;
	uint64_t n;
	const char *tok =
		"{\"version\": \"1.0\", \"added_tokens\": ["
		"{\"id\": 5, \"content\": \"<|endoftext|>\", \"special\": true},"
		"{\"id\": 6, \"content\": \"<|im_start|>\", \"special\": true},"
		"{\"id\": 7, \"content\": \"<tool>\", \"special\": false}],"
		"\"model\": {\"type\": \"BPE\", \"byte_fallback\": false,"
		"\"vocab\": {\"a\": 0, \"b\": 1, \"\\u0120a\": 2, \"ab\": 3, \"\\u0120ab\": 4},"
		"\"merges\": [\"a b\", [\"\\u0120\", \"a\"], \"\\u0120a b\"]}}";
	const char *tc = "{\"add_bos_token\": false, \"bos_token\": null, \"eos_token\": \"<|endoftext|>\"}";
	struct gguf_file *kv = st_with_tokenizer(dir, "qwen2_moe", tok, tc, &p, &buf, &n);
	cr_assert_geq(n, 8);
	cr_assert_str_eq(need_kv(kv, "tokenizer.ggml.model", GGUF_TYPE_STRING)->v.str.data, "gpt2");
	cr_assert_str_eq(need_kv(kv, "tokenizer.ggml.pre", GGUF_TYPE_STRING)->v.str.data, "qwen2");
	const struct gguf_kv *t = need_kv(kv, "tokenizer.ggml.tokens", GGUF_TYPE_ARRAY);
	const struct gguf_kv *ty = need_kv(kv, "tokenizer.ggml.token_type", GGUF_TYPE_ARRAY);
	const struct gguf_kv *m = need_kv(kv, "tokenizer.ggml.merges", GGUF_TYPE_ARRAY);
	cr_assert_eq(t->v.arr.count, n);
	cr_assert_eq(ty->v.arr.count, n);
	cr_assert_eq(ty->v.arr.type, GGUF_TYPE_INT32);
	cr_assert_str_eq(arr_str(t, 0), "a");
	cr_assert_str_eq(arr_str(t, 2), "\xc4\xa0" "a");
	cr_assert_str_eq(arr_str(t, 5), "<|endoftext|>");
	cr_assert_str_eq(arr_str(t, 7), "<tool>");
	cr_assert_eq(arr_int(ty, 0), 1);
	cr_assert_eq(arr_int(ty, 5), 3);
	cr_assert_eq(arr_int(ty, 7), 4);
	if (n > 8) {
		cr_assert_str_eq(arr_str(t, 8), "[PAD8]");
		cr_assert_eq(arr_int(ty, 8), 5);
	}
	cr_assert_eq(m->v.arr.count, 3);
	cr_assert_str_eq(arr_str(m, 0), "a b");
	cr_assert_str_eq(arr_str(m, 1), "\xc4\xa0 a");
	cr_assert_str_eq(arr_str(m, 2), "\xc4\xa0" "a b");
	cr_assert_eq(need_kv(kv, "tokenizer.ggml.eos_token_id", GGUF_TYPE_UINT32)->v.u64, 5);
	cr_assert_eq(need_kv(kv, "tokenizer.ggml.add_bos_token", GGUF_TYPE_BOOL)->v.u64, 0);
	cr_assert_null(gguf_find_kv(kv, "tokenizer.ggml.scores"));
	gguf_close(kv);
	free(buf);
	pack_close(p);
	tu_rmtree(dir);
}

/* BPE with byte_fallback (Mistral/Mixtral): llama model, scores, BYTE and
 * UNKNOWN token types, bos/unk ids. */
Test(pack_model, st_tokenizer_llama)
{
	char *dir = tu_mkdtemp("pml");
	struct pack_file *p;
	void *buf;
	uint64_t n;
	const char *tok =
		"{\"added_tokens\": ["
		"{\"id\": 0, \"content\": \"<unk>\", \"special\": true},"
		"{\"id\": 1, \"content\": \"<s>\", \"special\": true},"
		"{\"id\": 2, \"content\": \"</s>\", \"special\": true}],"
		"\"model\": {\"type\": \"BPE\", \"byte_fallback\": true, \"unk_token\": \"<unk>\","
		"\"vocab\": {\"<unk>\": 0, \"<s>\": 1, \"</s>\": 2, \"<0x00>\": 3, \"<0x0A>\": 4,"
		"\"\\u2581\": 5, \"\\u2581a\": 6}, \"merges\": [\"\\u2581 a\"]}}";
	const char *tc = "{\"add_bos_token\": true, \"add_eos_token\": false, \"bos_token\": \"<s>\","
			 "\"eos_token\": {\"content\": \"</s>\"}}";
	struct gguf_file *kv = st_with_tokenizer(dir, "mixtral", tok, tc, &p, &buf, &n);
	cr_assert_str_eq(need_kv(kv, "general.architecture", GGUF_TYPE_STRING)->v.str.data, "llama");
	cr_assert_str_eq(need_kv(kv, "tokenizer.ggml.model", GGUF_TYPE_STRING)->v.str.data, "llama");
	const struct gguf_kv *t = need_kv(kv, "tokenizer.ggml.tokens", GGUF_TYPE_ARRAY);
	const struct gguf_kv *ty = need_kv(kv, "tokenizer.ggml.token_type", GGUF_TYPE_ARRAY);
	const struct gguf_kv *sc = need_kv(kv, "tokenizer.ggml.scores", GGUF_TYPE_ARRAY);
	cr_assert_eq(t->v.arr.count, n);
	cr_assert_eq(sc->v.arr.count, n);
	cr_assert_eq(sc->v.arr.type, GGUF_TYPE_FLOAT32);
	cr_assert_str_eq(arr_str(t, 6), "\xe2\x96\x81" "a");
	cr_assert_eq(arr_int(ty, 0), 2);
	cr_assert_eq(arr_int(ty, 1), 3);
	cr_assert_eq(arr_int(ty, 3), 6);
	cr_assert_eq(arr_int(ty, 6), 1);
	double s6;
	cr_assert_eq(gguf_arr_f64(sc, 6, &s6), 0);
	cr_assert_eq(s6, -6.0);
	cr_assert_eq(need_kv(kv, "tokenizer.ggml.bos_token_id", GGUF_TYPE_UINT32)->v.u64, 1);
	cr_assert_eq(need_kv(kv, "tokenizer.ggml.eos_token_id", GGUF_TYPE_UINT32)->v.u64, 2);
	cr_assert_eq(need_kv(kv, "tokenizer.ggml.unknown_token_id", GGUF_TYPE_UINT32)->v.u64, 0);
	cr_assert_eq(need_kv(kv, "tokenizer.ggml.add_bos_token", GGUF_TYPE_BOOL)->v.u64, 1);
	cr_assert_eq(need_kv(kv, "llama.rope.dimension_count", GGUF_TYPE_UINT32)->v.u64 % 2, 0);
	/* SentencePiece ranks by score: no merges; no Prepend normalizer: no space prefix */
	cr_assert_null(gguf_find_kv(kv, "tokenizer.ggml.merges"));
	cr_assert_eq(need_kv(kv, "tokenizer.ggml.add_space_prefix", GGUF_TYPE_BOOL)->v.u64, 0);
	gguf_close(kv);
	free(buf);
	pack_close(p);
	tu_rmtree(dir);
}

/* Appends one protobuf SentencePiece {piece, score, type} as field 1. */
static size_t sp_piece(uint8_t *o, const char *piece, float score, uint8_t type)
{
	size_t pl = strlen(piece), n = 0;
	o[n++] = 0x0a;
	o[n++] = (uint8_t)(2 + pl + 5 + 2);
	o[n++] = 0x0a;
	o[n++] = (uint8_t)pl;
	memcpy(o + n, piece, pl);
	n += pl;
	o[n++] = 0x15;
	memcpy(o + n, &score, 4);
	n += 4;
	o[n++] = 0x18;
	o[n++] = type;
	return n;
}

/* Mixtral with a SentencePiece tokenizer.model: llama.cpp's converter's
 * pieces, scores and types; added_tokens_decoder retypes; the normalizer's
 * add_dummy_prefix gives add_space_prefix; unknown fields are skipped. */
Test(pack_model, st_tokenizer_sentencepiece)
{
	char *dir = tu_mkdtemp("pmp"), path[4200], *log;
	struct pack_file *p;
	struct moe_error err = { "" };
	struct gguf_file *kv;
	void *buf;
	uint8_t m[512];
	size_t n = 0;
	cr_assert_eq(tu_sh("'%s' model --family mixtral --dtype f32 --preset tiny --out '%s/s' > /dev/null 2>&1",
			   tu_build_path("tools/moe-gen"), dir), 0);
	n += sp_piece(m + n, "<unk>", 0.0f, 2);
	n += sp_piece(m + n, "<s>", 0.0f, 3);
	n += sp_piece(m + n, "</s>", 0.0f, 3);
	n += sp_piece(m + n, "<0x00>", 0.0f, 6);
	/* a trainer_spec (field 2) to skip */
	m[n++] = 0x12;
	m[n++] = 3;
	m[n++] = 0x08;
	m[n++] = 0x96;
	m[n++] = 0x01;
	n += sp_piece(m + n, "\xe2\x96\x81" "a", -1.5f, 1);
	n += sp_piece(m + n, "b", -2.0f, 4);
	n += sp_piece(m + n, "x", 0.0f, 5);
	/* normalizer_spec (field 3): add_dummy_prefix = false */
	m[n++] = 0x1a;
	m[n++] = 2;
	m[n++] = 0x18;
	m[n++] = 0x00;
	snprintf(path, sizeof(path), "%s/s/tokenizer.model", dir);
	cr_assert_eq(tu_write_file(path, m, n), 0);
	const char *tc = "{\"add_bos_token\": true, \"bos_token\": \"<s>\", \"eos_token\": \"</s>\", \"unk_token\": \"<unk>\","
			 "\"added_tokens_decoder\": {\"7\": {\"content\": \"<tool>\", \"special\": false},"
			 "\"2\": {\"content\": \"</s>\", \"special\": true}}}";
	snprintf(path, sizeof(path), "%s/s/tokenizer_config.json", dir);
	cr_assert_eq(tu_write_file(path, tc, strlen(tc)), 0);
	snprintf(path, sizeof(path), "%s/x.moepack", dir);
	cr_assert_eq(pack_cmd(dir, &log, "convert '%s/s' -o '%s' -q", dir, path), 0, "%s", log);
	free(log);
	cr_assert_eq(pack_open(path, 0, &p, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_open_kv(p, &buf, &kv, &err), 0, "%s", err.msg);
	cr_assert_str_eq(need_kv(kv, "tokenizer.ggml.model", GGUF_TYPE_STRING)->v.str.data, "llama");
	const struct gguf_kv *t = need_kv(kv, "tokenizer.ggml.tokens", GGUF_TYPE_ARRAY);
	const struct gguf_kv *ty = need_kv(kv, "tokenizer.ggml.token_type", GGUF_TYPE_ARRAY);
	const struct gguf_kv *sc = need_kv(kv, "tokenizer.ggml.scores", GGUF_TYPE_ARRAY);
	uint64_t vocab = need_kv(kv, "llama.vocab_size", GGUF_TYPE_UINT32)->v.u64;
	cr_assert_eq(t->v.arr.count, vocab > 8 ? vocab : 8);
	cr_assert_str_eq(arr_str(t, 4), "\xe2\x96\x81" "a");
	cr_assert_str_eq(arr_str(t, 7), "<tool>");
	static const int64_t want_type[8] = { 2, 3, 3, 6, 1, 1, 5, 4 };
	static const double want_score[8] = { 0, 0, -1000, 0, -1.5, -2, 0, -1000 };
	for (int i = 0; i < 8; i++) {
		double x;
		cr_assert_eq(arr_int(ty, (uint64_t)i), want_type[i], "token %d type", i);
		cr_assert_eq(gguf_arr_f64(sc, (uint64_t)i, &x), 0);
		cr_assert_eq(x, want_score[i], "token %d score %g", i, x);
	}
	if (vocab > 8) {
		cr_assert_str_eq(arr_str(t, 8), "[PAD8]");
		cr_assert_eq(arr_int(ty, 8), 5);
	}
	cr_assert_eq(need_kv(kv, "tokenizer.ggml.bos_token_id", GGUF_TYPE_UINT32)->v.u64, 1);
	cr_assert_eq(need_kv(kv, "tokenizer.ggml.eos_token_id", GGUF_TYPE_UINT32)->v.u64, 2);
	cr_assert_eq(need_kv(kv, "tokenizer.ggml.unknown_token_id", GGUF_TYPE_UINT32)->v.u64, 0);
	cr_assert_eq(need_kv(kv, "tokenizer.ggml.add_bos_token", GGUF_TYPE_BOOL)->v.u64, 1);
	cr_assert_eq(need_kv(kv, "tokenizer.ggml.add_space_prefix", GGUF_TYPE_BOOL)->v.u64, 0);
	gguf_close(kv);
	free(buf);
	pack_close(p);

	/* a damaged protobuf is refused */
	m[1] = 0x7f;
	snprintf(path, sizeof(path), "%s/s/tokenizer.model", dir);
	cr_assert_eq(tu_write_file(path, m, n), 0);
	cr_assert_eq(pack_cmd(dir, &log, "convert '%s/s' -o '%s/y.moepack' -q", dir, dir), 1, "%s", log);
	cr_assert(strstr(log, "tokenizer.model: not a SentencePiece model"), "%s", log);
	free(log);
	tu_rmtree(dir);
}

/* A tokenizer moe-pack cannot convert is refused, naming the file. */
Test(pack_model, st_tokenizer_unsupported)
{
	char *dir = tu_mkdtemp("pmw"), path[4200], *log;
	const char *tok = "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {\"a\": 0}}}";
	cr_assert_eq(tu_sh("'%s' model --family olmoe --preset tiny --out '%s/s' > /dev/null 2>&1",
			   tu_build_path("tools/moe-gen"), dir), 0);
	snprintf(path, sizeof(path), "%s/s/tokenizer.json", dir);
	cr_assert_eq(tu_write_file(path, tok, strlen(tok)), 0);
	cr_assert_eq(pack_cmd(dir, &log, "convert '%s/s' -o '%s/x.moepack' -q", dir, dir), 1, "%s", log);
	cr_assert(strstr(log, "tokenizer.json: only BPE tokenizers"), "%s", log);
	free(log);
	cr_assert_eq(pack_cmd(dir, &log, "convert --experts-only '%s/s' -o '%s/x.moepack' -q", dir, dir), 0, "%s", log);
	free(log);
	tu_rmtree(dir);
}

/* pack_open_kv on a gguf.kv that is not a GGUF image, or not U8: -EINVAL
 * with a message, nothing returned. */
static void write_kv_pack(const char *path, uint32_t dtype, const void *bytes, uint64_t len)
{
	struct moe_model_config m;
	struct pack_part_desc parts[1] = { { .role = PACK_ROLE_DOWN, .dtype = MOE_DTYPE_F32, .rows = 32, .cols = 32 } };
	struct pack_writer *w;
	struct moe_error err = { "" };
	static float ex[32 * 32];
	memset(&m, 0, sizeof(m));
	moe_model_set_family_defaults(&m, MOE_FAMILY_QWEN3_MOE);
	snprintf(m.name, sizeof(m.name), "kv-test");
	m.dtype = MOE_DTYPE_F32;
	m.hidden = 32;
	m.expert_width = 32;
	m.n_experts = 2;
	m.top_k = 1;
	m.n_layers = 1;
	m.n_moe_layers = 1;
	m.moe_layer_step = 1;
	cr_assert_eq(pack_writer_create(path, &m, parts, 1, "test", &w, &err), 0, "%s", err.msg);
	for (uint32_t e = 0; e < 2; e++) {
		cr_assert_eq(pack_writer_begin_expert(w, 0, e, &err), 0, "%s", err.msg);
		cr_assert_eq(pack_writer_write(w, ex, sizeof(ex), &err), 0, "%s", err.msg);
		cr_assert_eq(pack_writer_end_expert(w, &err), 0, "%s", err.msg);
	}
	struct pack_tensor_entry t = { .name = PACK_KV_TENSOR, .role = PACK_ROLE_OTHER, .dtype = dtype,
				       .layer = UINT32_MAX, .n_dims = 1 };
	t.shape[0] = dtype == MOE_DTYPE_F32 ? len / 4 : len;
	cr_assert_eq(pack_writer_begin_tensor(w, &t, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_writer_write(w, bytes, len, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_writer_end_tensor(w, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_writer_finish(w, &err), 0, "%s", err.msg);
}

Test(pack_model, open_kv_rejects_bad_images)
{
	char *dir = tu_mkdtemp("pmk"), path[4200];
	struct pack_file *p;
	struct moe_error err = { "" };
	struct gguf_file *kv;
	void *buf;
	static const uint8_t junk[16] = "GGUF\x03\0\0\0junkjunk";
	/* a valid empty image: 24 bytes, 0 tensors, 0 KV */
	static const uint8_t empty[24] = "GGUF\x03";

	snprintf(path, sizeof(path), "%s/a.moepack", dir);
	write_kv_pack(path, MOE_DTYPE_U8, junk, sizeof(junk));
	cr_assert_eq(pack_open(path, 0, &p, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_open_kv(p, &buf, &kv, &err), -EINVAL);
	cr_assert_null(kv);
	cr_assert_null(buf);
	cr_assert(strstr(err.msg, "a.moepack"), "%s", err.msg);
	pack_close(p);

	write_kv_pack(path, MOE_DTYPE_F32, junk, sizeof(junk));
	cr_assert_eq(pack_open(path, 0, &p, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_open_kv(p, &buf, &kv, &err), -EINVAL);
	cr_assert(strstr(err.msg, "not a U8 vector"), "%s", err.msg);
	pack_close(p);

	write_kv_pack(path, MOE_DTYPE_U8, empty, sizeof(empty));
	cr_assert_eq(pack_open(path, 0, &p, &err), 0, "%s", err.msg);
	cr_assert_eq(pack_open_kv(p, &buf, &kv, &err), 0, "%s", err.msg);
	cr_assert_eq(kv->n_kv, 0);
	gguf_close(kv);
	free(buf);
	pack_close(p);
	tu_rmtree(dir);
}

/* ---- what moe-pack says about sources it cannot read ---- */

static unsigned count_str(const char *hay, const char *needle)
{
	unsigned n = 0;
	for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle))
		n++;
	return n;
}

/* A file named .gguf whose magic is wrong is "not a GGUF", not a
 * safetensors header error; the path is said once. */
Test(pack_model, gguf_bad_magic_says_so)
{
	char *dir = tu_mkdtemp("pmg"), src[4200], *log;
	char junk[256];
	memset(junk, 'x', sizeof(junk));
	memcpy(junk, "GGUX", 4);
	snprintf(src, sizeof(src), "%s/bad.gguf", dir);
	cr_assert_eq(tu_write_file(src, junk, sizeof(junk)), 0);
	cr_assert_eq(pack_cmd(dir, &log, "convert '%s' -o '%s/x.moepack' -q", src, dir), 1, "%s", log);
	cr_expect(strstr(log, "not a GGUF file"), "%s", log);
	cr_expect(!strstr(log, "header length"), "the safetensors parser's message: %s", log);
	cr_expect_eq(count_str(log, src), 1, "the path is said %u times: %s", count_str(log, src), log);
	free(log);
	tu_rmtree(dir);
}

/* A FIFO (or any non-regular file) is refused before it is opened: opening
 * it for reading would block until a writer came. */
Test(pack_model, fifo_refused_not_blocked)
{
	char *dir = tu_mkdtemp("pmf"), *log;
	static const char *const names[] = { "f.gguf", "f.safetensors" };
	for (unsigned i = 0; i < 2; i++) {
		char src[4200];
		snprintf(src, sizeof(src), "%s/%s", dir, names[i]);
		cr_assert_eq(mkfifo(src, 0600), 0);
		char lp[4200];
		snprintf(lp, sizeof(lp), "%s/pack.log", dir);
		int st = tu_sh("timeout 10 '%s' convert '%s' -o '%s/x.moepack' -q > '%s' 2>&1",
			       tu_build_path("tools/moe-pack"), src, dir, lp);
		log = tu_read_file(lp, NULL);
		cr_assert(log);
		cr_expect_eq(st, 1, "%s: exit %d (124: blocked): %s", names[i], st, log);
		cr_expect(strstr(log, "not a regular file"), "%s", log);
		free(log);
	}
	/* info and verify of a "pack" that is a FIFO */
	static const char *const cmds[] = { "info", "verify" };
	for (unsigned i = 0; i < 2; i++) {
		char lp[4200];
		snprintf(lp, sizeof(lp), "%s/pack.log", dir);
		int st = tu_sh("timeout 10 '%s' %s '%s/f.gguf' > '%s' 2>&1", tu_build_path("tools/moe-pack"), cmds[i],
			       dir, lp);
		log = tu_read_file(lp, NULL);
		cr_assert(log);
		cr_expect_eq(st, 1, "%s: exit %d (124: blocked): %s", cmds[i], st, log);
		cr_expect(strstr(log, "not a regular file (a FIFO)"), "%s", log);
		free(log);
	}
	tu_rmtree(dir);
}

/* moetierd on a missing or a bad pack names the pack once. */
Test(pack_model, daemon_startup_error_names_the_path_once)
{
	const char *bin = tu_build_path("moetierd");
	if (access(bin, X_OK))
		cr_skip_test("moetierd not built");
	char *dir = tu_mkdtemp("pmd"), pack[4200], lp[4200], *log;
	static const char *const what[] = { "missing", "bad" };
	snprintf(lp, sizeof(lp), "%s/d.log", dir);
	for (unsigned i = 0; i < 2; i++) {
		snprintf(pack, sizeof(pack), "%s/%s.moepack", dir, what[i]);
		if (i == 1)
			cr_assert_eq(tu_write_file(pack, "not a pack", 10), 0);
		int st = tu_sh("timeout 20 '%s' --foreground --config= --socket='%s/s.sock' --socket-group= "
			       "--host-bytes=4M '%s' > '%s' 2>&1",
			       bin, dir, pack, lp);
		log = tu_read_file(lp, NULL);
		cr_assert(log);
		cr_expect(st != 0 && st != 124, "%s pack: exit %d: %s", what[i], st, log);
		cr_expect_eq(count_str(log, pack), 1, "%s pack: the path is said %u times: %s", what[i],
			     count_str(log, pack), log);
		free(log);
	}
	tu_rmtree(dir);
}
