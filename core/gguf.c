/* gguf.c - strict GGUF reader (see gguf.h). */
/* _GNU_SOURCE before any system header (asprintf, strndup). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include "config.h"
#include "gguf.h"

#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Values are copied from the file as they lie: GGUF is little-endian and so
 * are the hosts moetierd runs on. */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "little-endian host expected");

static const struct {
	const char *name;
	uint32_t size; /* bytes of one value; 0 for STRING/ARRAY */
} kv_types[GGUF_TYPE_COUNT] = {
	[GGUF_TYPE_UINT8] = { "UINT8", 1 },   [GGUF_TYPE_INT8] = { "INT8", 1 },
	[GGUF_TYPE_UINT16] = { "UINT16", 2 }, [GGUF_TYPE_INT16] = { "INT16", 2 },
	[GGUF_TYPE_UINT32] = { "UINT32", 4 }, [GGUF_TYPE_INT32] = { "INT32", 4 },
	[GGUF_TYPE_FLOAT32] = { "FLOAT32", 4 }, [GGUF_TYPE_BOOL] = { "BOOL", 1 },
	[GGUF_TYPE_STRING] = { "STRING", 0 }, [GGUF_TYPE_ARRAY] = { "ARRAY", 0 },
	[GGUF_TYPE_UINT64] = { "UINT64", 8 }, [GGUF_TYPE_INT64] = { "INT64", 8 },
	[GGUF_TYPE_FLOAT64] = { "FLOAT64", 8 },
};

const char *gguf_type_name(uint32_t type)
{
	return type < GGUF_TYPE_COUNT ? kv_types[type].name : "?";
}

static bool type_is_uint(uint32_t t)
{
	return t == GGUF_TYPE_UINT8 || t == GGUF_TYPE_UINT16 || t == GGUF_TYPE_UINT32 || t == GGUF_TYPE_UINT64;
}

static bool type_is_sint(uint32_t t)
{
	return t == GGUF_TYPE_INT8 || t == GGUF_TYPE_INT16 || t == GGUF_TYPE_INT32 || t == GGUF_TYPE_INT64;
}

static bool type_is_float(uint32_t t)
{
	return t == GGUF_TYPE_FLOAT32 || t == GGUF_TYPE_FLOAT64;
}

/* ggml type traits (ggml.c type_traits, block structs in ggml-common.h).
 * Removed ids (4, 5, 31-33, 36-38) have no entry and are rejected. */
struct ggml_desc {
	const char *name;
	uint32_t blck, size;
	enum moe_dtype dt;
};

static const struct ggml_desc ggml_types[] = {
	[0] = { "F32", 1, 4, MOE_DTYPE_F32 },
	[1] = { "F16", 1, 2, MOE_DTYPE_F16 },
	[2] = { "Q4_0", 32, 18, MOE_DTYPE_Q4_0 },
	[3] = { "Q4_1", 32, 20, MOE_DTYPE_INVALID },
	[6] = { "Q5_0", 32, 22, MOE_DTYPE_INVALID },
	[7] = { "Q5_1", 32, 24, MOE_DTYPE_INVALID },
	[8] = { "Q8_0", 32, 34, MOE_DTYPE_Q8_0 },
	[9] = { "Q8_1", 32, 36, MOE_DTYPE_INVALID },
	[10] = { "Q2_K", 256, 84, MOE_DTYPE_Q2_K },
	[11] = { "Q3_K", 256, 110, MOE_DTYPE_Q3_K },
	[12] = { "Q4_K", 256, 144, MOE_DTYPE_Q4_K },
	[13] = { "Q5_K", 256, 176, MOE_DTYPE_Q5_K },
	[14] = { "Q6_K", 256, 210, MOE_DTYPE_Q6_K },
	[15] = { "Q8_K", 256, 292, MOE_DTYPE_INVALID },
	[16] = { "IQ2_XXS", 256, 66, MOE_DTYPE_INVALID },
	[17] = { "IQ2_XS", 256, 74, MOE_DTYPE_INVALID },
	[18] = { "IQ3_XXS", 256, 98, MOE_DTYPE_INVALID },
	[19] = { "IQ1_S", 256, 50, MOE_DTYPE_INVALID },
	[20] = { "IQ4_NL", 32, 18, MOE_DTYPE_IQ4_NL },
	[21] = { "IQ3_S", 256, 110, MOE_DTYPE_INVALID },
	[22] = { "IQ2_S", 256, 82, MOE_DTYPE_INVALID },
	[23] = { "IQ4_XS", 256, 136, MOE_DTYPE_IQ4_XS },
	[24] = { "I8", 1, 1, MOE_DTYPE_I8 },
	[25] = { "I16", 1, 2, MOE_DTYPE_INVALID },
	[26] = { "I32", 1, 4, MOE_DTYPE_I32 },
	[27] = { "I64", 1, 8, MOE_DTYPE_I64 },
	[28] = { "F64", 1, 8, MOE_DTYPE_F64 },
	[29] = { "IQ1_M", 256, 56, MOE_DTYPE_INVALID },
	[30] = { "BF16", 1, 2, MOE_DTYPE_BF16 },
	[34] = { "TQ1_0", 256, 54, MOE_DTYPE_INVALID },
	[35] = { "TQ2_0", 256, 66, MOE_DTYPE_INVALID },
	[39] = { "MXFP4", 32, 17, MOE_DTYPE_MXFP4 },
};

bool gguf_ggml_type_info(uint32_t ggml_type, const char **name, uint32_t *blck_size,
			 uint32_t *type_size, enum moe_dtype *dtype)
{
	if (ggml_type >= MOE_ARRAY_SIZE(ggml_types) || !ggml_types[ggml_type].name)
		return false;
	const struct ggml_desc *d = &ggml_types[ggml_type];
	if (name)
		*name = d->name;
	if (blck_size)
		*blck_size = d->blck;
	if (type_size)
		*type_size = d->size;
	if (dtype)
		*dtype = d->dt;
	return true;
}

/* ---- input cursor: a buffer, or a file read through a window ------------- */

#define WINDOW (1u << 20)

struct cur {
	const uint8_t *buf; /* whole file (buffer mode) */
	int fd;
	uint64_t size, pos;
	uint8_t *win;
	uint64_t win_off;
	size_t win_len;
	const char *path;
	struct moe_error *err;
};

static int cur_get(struct cur *c, void *dst, uint64_t n, const char *what)
{
	if (n > c->size - c->pos)
		return moe_error_set(c->err, -EINVAL,
				     "%s: truncated: %s at offset %" PRIu64 " needs %" PRIu64
				     " bytes but the file has %" PRIu64, c->path, what, c->pos, n, c->size);
	if (c->buf) {
		memcpy(dst, c->buf + c->pos, (size_t)n);
	} else if (c->pos >= c->win_off && c->pos + n <= c->win_off + c->win_len) {
		memcpy(dst, c->win + (c->pos - c->win_off), (size_t)n);
	} else if (n > WINDOW / 2) {
		int rc = moe_pread_full(c->fd, dst, (size_t)n, c->pos);
		if (rc)
			return moe_error_set(c->err, rc, "%s: read at %" PRIu64 ": %s", c->path, c->pos,
					     strerror(-rc));
	} else {
		size_t len = (size_t)MOE_MIN((uint64_t)WINDOW, c->size - c->pos);
		int rc = moe_pread_full(c->fd, c->win, len, c->pos);
		if (rc)
			return moe_error_set(c->err, rc, "%s: read at %" PRIu64 ": %s", c->path, c->pos,
					     strerror(-rc));
		c->win_off = c->pos;
		c->win_len = len;
		memcpy(dst, c->win, (size_t)n);
	}
	c->pos += n;
	return 0;
}

static int cur_u32(struct cur *c, uint32_t *v, const char *what) { return cur_get(c, v, 4, what); }
static int cur_u64(struct cur *c, uint64_t *v, const char *what) { return cur_get(c, v, 8, what); }

static int cur_str(struct cur *c, struct gguf_str *s, uint64_t cap, const char *what)
{
	uint64_t len;
	int rc;
	if ((rc = cur_u64(c, &len, what)))
		return rc;
	if (len > cap)
		return moe_error_set(c->err, -EINVAL, "%s: %s at offset %" PRIu64 " has length %" PRIu64
				     " (at most %" PRIu64 ")", c->path, what, c->pos - 8, len, cap);
	if (len > c->size - c->pos)
		return moe_error_set(c->err, -EINVAL, "%s: %s at offset %" PRIu64 " has length %" PRIu64
				     ", longer than the rest of the file (%" PRIu64 " bytes)",
				     c->path, what, c->pos - 8, len, c->size - c->pos);
	s->data = malloc((size_t)len + 1);
	if (!s->data)
		return -ENOMEM;
	if ((rc = cur_get(c, s->data, len, what))) {
		free(s->data);
		s->data = NULL;
		return rc;
	}
	s->data[len] = '\0';
	s->len = len;
	return 0;
}

/* ---- parsing ------------------------------------------------------------- */

static void free_kv(struct gguf_kv *kv)
{
	free(kv->key.data);
	if (kv->type == GGUF_TYPE_STRING) {
		free(kv->v.str.data);
	} else if (kv->type == GGUF_TYPE_ARRAY) {
		if (kv->v.arr.type == GGUF_TYPE_STRING && kv->v.arr.data) {
			struct gguf_str *s = kv->v.arr.data;
			for (uint64_t i = 0; i < kv->v.arr.count; i++)
				free(s[i].data);
		}
		free(kv->v.arr.data);
	}
}

void gguf_close(struct gguf_file *g)
{
	if (!g)
		return;
	if (g->fd >= 0)
		close(g->fd);
	for (uint32_t i = 1; i < g->n_parts; i++) {
		if (g->part_fd[i] >= 0)
			close(g->part_fd[i]);
		free(g->part_path[i]);
	}
	free(g->part_fd);
	free(g->part_path);
	for (uint64_t i = 0; i < g->n_kv; i++)
		free_kv(&g->kv[i]);
	for (uint64_t i = 0; i < g->n_tensors; i++)
		free(g->tensors[i].name.data);
	free(g->kv);
	free(g->tensors);
	free(g->kv_by_key);
	free(g->tensor_by_name);
	free(g->path);
	free(g);
}

/* A scalar of type t into kv->v. */
static int read_scalar(struct cur *c, struct gguf_kv *kv, uint32_t t, const char *key)
{
	uint8_t b[8] = { 0 };
	int rc;
	if (t == GGUF_TYPE_STRING)
		return cur_str(c, &kv->v.str, GGUF_MAX_STRING, "string value");
	if ((rc = cur_get(c, b, kv_types[t].size, "value")))
		return rc;
	switch (t) {
	case GGUF_TYPE_UINT8: kv->v.u64 = b[0]; break;
	case GGUF_TYPE_INT8: kv->v.i64 = (int8_t)b[0]; break;
	case GGUF_TYPE_UINT16: { uint16_t x; memcpy(&x, b, 2); kv->v.u64 = x; break; }
	case GGUF_TYPE_INT16: { int16_t x; memcpy(&x, b, 2); kv->v.i64 = x; break; }
	case GGUF_TYPE_UINT32: { uint32_t x; memcpy(&x, b, 4); kv->v.u64 = x; break; }
	case GGUF_TYPE_INT32: { int32_t x; memcpy(&x, b, 4); kv->v.i64 = x; break; }
	case GGUF_TYPE_FLOAT32: { float x; memcpy(&x, b, 4); kv->v.f64 = x; break; }
	case GGUF_TYPE_BOOL:
		if (b[0] > 1)
			return moe_error_set(c->err, -EINVAL, "%s: key '%s': BOOL value %u is not 0 or 1",
					     c->path, key, b[0]);
		kv->v.u64 = b[0];
		break;
	case GGUF_TYPE_UINT64: memcpy(&kv->v.u64, b, 8); break;
	case GGUF_TYPE_INT64: memcpy(&kv->v.i64, b, 8); break;
	case GGUF_TYPE_FLOAT64: memcpy(&kv->v.f64, b, 8); break;
	}
	return 0;
}

static int read_array(struct cur *c, struct gguf_kv *kv, const char *key)
{
	uint32_t et;
	uint64_t count;
	int rc;
	if ((rc = cur_u32(c, &et, "array element type")) || (rc = cur_u64(c, &count, "array count")))
		return rc;
	if (et == GGUF_TYPE_ARRAY)
		return moe_error_set(c->err, -EINVAL, "%s: key '%s': nested arrays are not supported",
				     c->path, key);
	if (et >= GGUF_TYPE_COUNT)
		return moe_error_set(c->err, -EINVAL, "%s: key '%s': unknown array element type %u",
				     c->path, key, et);
	/* Each element takes at least min bytes (8 for a string length). */
	uint64_t min = et == GGUF_TYPE_STRING ? 8 : kv_types[et].size;
	if (count > (c->size - c->pos) / min)
		return moe_error_set(c->err, -EINVAL, "%s: key '%s': array of %" PRIu64 " %s elements "
				     "does not fit in the rest of the file (%" PRIu64 " bytes)",
				     c->path, key, count, kv_types[et].name, c->size - c->pos);
	kv->v.arr.type = et;
	kv->v.arr.count = 0;
	if (et == GGUF_TYPE_STRING) {
		struct gguf_str *s = calloc(count ? count : 1, sizeof(*s));
		if (!s)
			return -ENOMEM;
		kv->v.arr.data = s;
		for (uint64_t i = 0; i < count; i++) {
			if ((rc = cur_str(c, &s[i], GGUF_MAX_STRING, "array string")))
				return moe_error_prefix(c->err, rc, "element %" PRIu64, i);
			kv->v.arr.count = i + 1;
		}
		return 0;
	}
	uint64_t bytes = count * min;
	kv->v.arr.data = malloc(bytes ? bytes : 1);
	if (!kv->v.arr.data)
		return -ENOMEM;
	if ((rc = cur_get(c, kv->v.arr.data, bytes, "array data")))
		return rc;
	kv->v.arr.count = count;
	if (et == GGUF_TYPE_BOOL) {
		const uint8_t *p = kv->v.arr.data;
		for (uint64_t i = 0; i < count; i++)
			if (p[i] > 1)
				return moe_error_set(c->err, -EINVAL, "%s: key '%s': BOOL element %" PRIu64
						     " is %u, not 0 or 1", c->path, key, i, p[i]);
	}
	return 0;
}

/* qsort has no context argument; the indices sort through these. */
static __thread const struct gguf_kv *kv_base;
static __thread const struct gguf_tensor *t_base;

static int str_cmp(const struct gguf_str *a, const struct gguf_str *b)
{
	size_t n = (size_t)MOE_MIN(a->len, b->len);
	int c = memcmp(a->data, b->data, n);
	if (c)
		return c;
	return a->len < b->len ? -1 : a->len > b->len;
}

static int cmp_kv_idx(const void *a, const void *b)
{
	return str_cmp(&kv_base[*(const uint32_t *)a].key, &kv_base[*(const uint32_t *)b].key);
}

static int cmp_t_idx(const void *a, const void *b)
{
	return str_cmp(&t_base[*(const uint32_t *)a].name, &t_base[*(const uint32_t *)b].name);
}

static int cmp_t_off(const void *a, const void *b)
{
	const struct gguf_tensor *x = &t_base[*(const uint32_t *)a], *y = &t_base[*(const uint32_t *)b];
	if (x->offset != y->offset)
		return x->offset < y->offset ? -1 : 1;
	return x->bytes < y->bytes ? -1 : x->bytes > y->bytes;
}

static int parse_tensor(struct cur *c, struct gguf_file *g, struct gguf_tensor *t, uint64_t idx)
{
	int rc;
	if ((rc = cur_str(c, &t->name, GGUF_MAX_NAME - 1, "tensor name")))
		return moe_error_prefix(c->err, rc, "tensor #%" PRIu64, idx);
	const char *nm = t->name.data;
	/* ggml keeps names in char[GGML_MAX_NAME] with the NUL. */
	if (t->name.len == 0 || t->name.len >= GGUF_MAX_NAME || strlen(nm) != t->name.len)
		return moe_error_set(c->err, -EINVAL, "%s: tensor #%" PRIu64 ": name of %" PRIu64
				     " bytes (must be 1..%d bytes without NUL)", c->path, idx, t->name.len,
				     GGUF_MAX_NAME - 1);
	if ((rc = cur_u32(c, &t->n_dims, "tensor n_dims")))
		return rc;
	if (t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS)
		return moe_error_set(c->err, -EINVAL, "%s: tensor '%s': n_dims %u (must be 1..%d)", c->path,
				     nm, t->n_dims, GGUF_MAX_DIMS);
	t->n_elems = 1;
	for (uint32_t i = 0; i < GGUF_MAX_DIMS; i++) {
		t->ne[i] = 1;
		if (i >= t->n_dims)
			continue;
		if ((rc = cur_u64(c, &t->ne[i], "tensor ne")))
			return rc;
		if (t->ne[i] == 0 || t->ne[i] > INT64_MAX)
			return moe_error_set(c->err, -EINVAL, "%s: tensor '%s': ne[%u] = %" PRIu64
					     " (must be 1..INT64_MAX)", c->path, nm, i, t->ne[i]);
		if (!moe_mul_u64(t->n_elems, t->ne[i], &t->n_elems) || t->n_elems > INT64_MAX)
			return moe_error_set(c->err, -EINVAL, "%s: tensor '%s': element count overflows",
					     c->path, nm);
	}
	if ((rc = cur_u32(c, &t->ggml_type, "tensor type")))
		return rc;
	const char *tn;
	uint32_t blck, tsize;
	if (!gguf_ggml_type_info(t->ggml_type, &tn, &blck, &tsize, &t->dtype))
		return moe_error_set(c->err, -EINVAL, "%s: tensor '%s': unknown ggml type %u", c->path, nm,
				     t->ggml_type);
	if (t->ne[0] % blck)
		return moe_error_set(c->err, -EINVAL, "%s: tensor '%s': ne[0] = %" PRIu64
				     " is not a multiple of the %s block size %u", c->path, nm, t->ne[0], tn, blck);
	uint64_t rows = t->n_elems / t->ne[0];
	if (!moe_mul_u64(t->ne[0] / blck, tsize, &t->bytes) || !moe_mul_u64(t->bytes, rows, &t->bytes))
		return moe_error_set(c->err, -EINVAL, "%s: tensor '%s': byte size overflows", c->path, nm);
	if ((rc = cur_u64(c, &t->rel_offset, "tensor offset")))
		return rc;
	if (t->rel_offset % g->alignment)
		return moe_error_set(c->err, -EINVAL, "%s: tensor '%s': offset %" PRIu64
				     " is not a multiple of the alignment %u", c->path, nm, t->rel_offset,
				     g->alignment);
	return 0;
}

static int parse(struct cur *c, struct gguf_file *g)
{
	struct moe_error *err = c->err;
	uint32_t magic, version;
	uint64_t n_tensors, n_kv;
	int rc;

	if ((rc = cur_u32(c, &magic, "magic")))
		return rc;
	if (magic != GGUF_MAGIC)
		return moe_error_set(err, -EINVAL, "%s: not a GGUF file (magic %02x %02x %02x %02x, want \"GGUF\")",
				     c->path, magic & 0xff, (magic >> 8) & 0xff, (magic >> 16) & 0xff, magic >> 24);
	if ((rc = cur_u32(c, &version, "version")))
		return rc;
	if (version == 1)
		return moe_error_set(err, -EINVAL, "%s: GGUF version 1 is not supported (only 2 and 3)", c->path);
	if (version != 2 && version != 3) {
		if (__builtin_bswap32(version) == 2 || __builtin_bswap32(version) == 3)
			return moe_error_set(err, -EINVAL, "%s: big-endian GGUF is not supported", c->path);
		return moe_error_set(err, -EINVAL, "%s: unsupported GGUF version %u (only 2 and 3)", c->path, version);
	}
	g->version = version;
	if ((rc = cur_u64(c, &n_tensors, "tensor count")) || (rc = cur_u64(c, &n_kv, "kv count")))
		return rc;
	/* Minimal encodings: a KV is >= 8+1+4+1 bytes, a tensor info >= 8+1+4+8+4+8. */
	uint64_t rest = c->size - c->pos;
	if (n_kv > GGUF_MAX_COUNT || n_kv > rest / 14)
		return moe_error_set(err, -EINVAL, "%s: kv count %" PRIu64 " is absurd for a file of %" PRIu64
				     " bytes (at most %llu)", c->path, n_kv, c->size, GGUF_MAX_COUNT);
	if (n_tensors > GGUF_MAX_COUNT || n_tensors > rest / 33)
		return moe_error_set(err, -EINVAL, "%s: tensor count %" PRIu64 " is absurd for a file of %" PRIu64
				     " bytes (at most %llu)", c->path, n_tensors, c->size, GGUF_MAX_COUNT);

	g->kv = calloc(n_kv ? n_kv : 1, sizeof(*g->kv));
	g->kv_by_key = malloc((n_kv ? n_kv : 1) * sizeof(uint32_t));
	if (!g->kv || !g->kv_by_key)
		return -ENOMEM;
	for (uint64_t i = 0; i < n_kv; i++) {
		struct gguf_kv *kv = &g->kv[i];
		g->n_kv = i + 1; /* so gguf_close frees a half-read pair */
		kv->type = GGUF_TYPE_UINT8;
		if ((rc = cur_str(c, &kv->key, GGUF_MAX_KEY, "key")))
			return moe_error_prefix(err, rc, "kv #%" PRIu64, i);
		if (kv->key.len == 0 || strlen(kv->key.data) != kv->key.len)
			return moe_error_set(err, -EINVAL, "%s: kv #%" PRIu64 ": empty key or key with a NUL byte",
					     c->path, i);
		uint32_t type;
		if ((rc = cur_u32(c, &type, "value type")))
			return moe_error_prefix(err, rc, "key '%s'", kv->key.data);
		if (type >= GGUF_TYPE_COUNT)
			return moe_error_set(err, -EINVAL, "%s: key '%s': unknown value type %u", c->path,
					     kv->key.data, type);
		kv->type = type;
		memset(&kv->v, 0, sizeof(kv->v));
		rc = type == GGUF_TYPE_ARRAY ? read_array(c, kv, kv->key.data) : read_scalar(c, kv, type, kv->key.data);
		if (rc)
			return rc == -EINVAL || rc == -EIO ? moe_error_prefix(err, rc, "key '%s'", kv->key.data) : rc;
	}
	for (uint64_t i = 0; i < n_kv; i++)
		g->kv_by_key[i] = (uint32_t)i;
	kv_base = g->kv;
	qsort(g->kv_by_key, n_kv, sizeof(uint32_t), cmp_kv_idx);
	for (uint64_t i = 1; i < n_kv; i++)
		if (str_cmp(&g->kv[g->kv_by_key[i]].key, &g->kv[g->kv_by_key[i - 1]].key) == 0)
			return moe_error_set(err, -EINVAL, "%s: duplicate key '%s'", c->path,
					     g->kv[g->kv_by_key[i]].key.data);

	g->alignment = GGUF_DEFAULT_ALIGNMENT;
	const struct gguf_kv *al = gguf_find_kv(g, "general.alignment");
	if (al) {
		if (al->type != GGUF_TYPE_UINT32)
			return moe_error_set(err, -EINVAL, "%s: general.alignment has type %s (must be UINT32)",
					     c->path, gguf_type_name(al->type));
		if (al->v.u64 < 8 || (al->v.u64 & (al->v.u64 - 1)))
			return moe_error_set(err, -EINVAL, "%s: general.alignment %" PRIu64
					     " is not a power of two >= 8", c->path, al->v.u64);
		g->alignment = (uint32_t)al->v.u64;
	}

	g->tensors = calloc(n_tensors ? n_tensors : 1, sizeof(*g->tensors));
	g->tensor_by_name = malloc((n_tensors ? n_tensors : 1) * sizeof(uint32_t));
	if (!g->tensors || !g->tensor_by_name)
		return -ENOMEM;
	for (uint64_t i = 0; i < n_tensors; i++) {
		g->n_tensors = i + 1;
		if ((rc = parse_tensor(c, g, &g->tensors[i], i)))
			return rc;
	}
	uint64_t pad = (g->alignment - c->pos % g->alignment) % g->alignment;
	g->data_start = c->pos + pad;
	if (n_tensors && g->data_start > c->size)
		return moe_error_set(err, -EINVAL, "%s: data section would start at %" PRIu64
				     ", past the end of the file (%" PRIu64 " bytes)", c->path, g->data_start, c->size);
	uint64_t data_size = c->size > g->data_start ? c->size - g->data_start : 0;
	for (uint64_t i = 0; i < n_tensors; i++) {
		struct gguf_tensor *t = &g->tensors[i];
		if (t->rel_offset > data_size || t->bytes > data_size - t->rel_offset)
			return moe_error_set(err, -EINVAL, "%s: tensor '%s': bytes [%" PRIu64 ", %" PRIu64
					     ") of the data section go past its end (%" PRIu64 " bytes)",
					     c->path, t->name.data, t->rel_offset, t->rel_offset + t->bytes,
					     data_size);
		t->offset = g->data_start + t->rel_offset;
		g->tensor_by_name[i] = (uint32_t)i;
	}
	t_base = g->tensors;
	qsort(g->tensor_by_name, n_tensors, sizeof(uint32_t), cmp_t_idx);
	for (uint64_t i = 1; i < n_tensors; i++)
		if (str_cmp(&g->tensors[g->tensor_by_name[i]].name, &g->tensors[g->tensor_by_name[i - 1]].name) == 0)
			return moe_error_set(err, -EINVAL, "%s: duplicate tensor name '%s'", c->path,
					     g->tensors[g->tensor_by_name[i]].name.data);
	/* Overlaps: sort a scratch index by offset. */
	uint32_t *by_off = malloc((n_tensors ? n_tensors : 1) * sizeof(uint32_t));
	if (!by_off)
		return -ENOMEM;
	for (uint64_t i = 0; i < n_tensors; i++)
		by_off[i] = (uint32_t)i;
	qsort(by_off, n_tensors, sizeof(uint32_t), cmp_t_off);
	rc = 0;
	for (uint64_t i = 1; i < n_tensors; i++) {
		const struct gguf_tensor *a = &g->tensors[by_off[i - 1]], *b = &g->tensors[by_off[i]];
		if (b->offset < a->offset + a->bytes) {
			rc = moe_error_set(err, -EINVAL, "%s: tensors '%s' [%" PRIu64 ", %" PRIu64 ") and '%s' [%"
					   PRIu64 ", %" PRIu64 ") overlap", c->path, a->name.data, a->rel_offset,
					   a->rel_offset + a->bytes, b->name.data, b->rel_offset,
					   b->rel_offset + b->bytes);
			break;
		}
	}
	free(by_off);
	return rc;
}

static int finish(struct cur *c, struct gguf_file *g, struct gguf_file **out)
{
	int rc = parse(c, g);
	if (rc) {
		if (rc == -ENOMEM)
			moe_error_set(c->err, rc, "%s: out of memory", c->path);
		gguf_close(g);
		return rc;
	}
	*out = g;
	return 0;
}

int gguf_parse(const void *buf, size_t len, struct gguf_file **out, struct moe_error *err)
{
	struct gguf_file *g = calloc(1, sizeof(*g));
	if (!g)
		return -ENOMEM;
	g->fd = -1;
	g->buf = buf;
	g->file_size = len;
	g->path = strdup("<buffer>");
	if (!g->path) {
		free(g);
		return -ENOMEM;
	}
	struct cur c = { .buf = buf, .fd = -1, .size = len, .path = g->path, .err = err };
	if (!buf && len) {
		gguf_close(g);
		return moe_error_set(err, -EINVAL, "<buffer>: NULL buffer");
	}
	if (!buf)
		c.buf = (const uint8_t *)"";
	return finish(&c, g, out);
}

int gguf_open(const char *path, struct gguf_file **out, struct moe_error *err)
{
	struct gguf_file *g;
	struct stat st;
	int rc;

	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return moe_error_set(err, -errno, "%s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		close(fd);
		return moe_error_set(err, -EINVAL, "%s: not a regular file", path);
	}
	g = calloc(1, sizeof(*g));
	if (!g || !(g->path = strdup(path))) {
		free(g);
		close(fd);
		return -ENOMEM;
	}
	g->fd = fd;
	g->file_size = (uint64_t)st.st_size;
	struct cur c = { .fd = fd, .size = g->file_size, .path = g->path, .err = err };
	c.win = malloc(WINDOW);
	if (!c.win) {
		gguf_close(g);
		return -ENOMEM;
	}
	rc = finish(&c, g, out);
	free(c.win);
	return rc;
}

/* bsearch() over an index array sorted by name: the key carries the name and
 * the array the indices point into. */
struct name_key {
	struct gguf_str name;
	const struct gguf_file *g;
};

static int cmp_key_kv(const void *key, const void *elem)
{
	const struct name_key *k = key;
	return str_cmp(&k->name, &k->g->kv[*(const uint32_t *)elem].key);
}

static int cmp_key_tensor(const void *key, const void *elem)
{
	const struct name_key *k = key;
	return str_cmp(&k->name, &k->g->tensors[*(const uint32_t *)elem].name);
}

const struct gguf_kv *gguf_find_kv(const struct gguf_file *g, const char *key)
{
	struct name_key k = { { strlen(key), (char *)key }, g };
	const uint32_t *i = g->n_kv ? bsearch(&k, g->kv_by_key, g->n_kv, sizeof(uint32_t), cmp_key_kv) : NULL;
	return i ? &g->kv[*i] : NULL;
}

const struct gguf_tensor *gguf_find_tensor(const struct gguf_file *g, const char *name)
{
	struct name_key k = { { strlen(name), (char *)name }, g };
	const uint32_t *i = g->n_tensors ? bsearch(&k, g->tensor_by_name, g->n_tensors, sizeof(uint32_t),
						   cmp_key_tensor) : NULL;
	return i ? &g->tensors[*i] : NULL;
}

/* ---- typed access -------------------------------------------------------- */

int gguf_get_i64(const struct gguf_file *g, const char *key, int64_t *out)
{
	const struct gguf_kv *kv = gguf_find_kv(g, key);
	if (!kv)
		return -ENOENT;
	if (type_is_sint(kv->type)) {
		*out = kv->v.i64;
		return 0;
	}
	if (type_is_uint(kv->type)) {
		if (kv->v.u64 > INT64_MAX)
			return -ERANGE;
		*out = (int64_t)kv->v.u64;
		return 0;
	}
	return -EINVAL;
}

int gguf_get_u64(const struct gguf_file *g, const char *key, uint64_t *out)
{
	const struct gguf_kv *kv = gguf_find_kv(g, key);
	if (!kv)
		return -ENOENT;
	if (type_is_uint(kv->type)) {
		*out = kv->v.u64;
		return 0;
	}
	if (type_is_sint(kv->type)) {
		if (kv->v.i64 < 0)
			return -ERANGE;
		*out = (uint64_t)kv->v.i64;
		return 0;
	}
	return -EINVAL;
}

int gguf_get_u32(const struct gguf_file *g, const char *key, uint32_t *out)
{
	uint64_t v;
	int rc = gguf_get_u64(g, key, &v);
	if (rc)
		return rc;
	if (v > UINT32_MAX)
		return -ERANGE;
	*out = (uint32_t)v;
	return 0;
}

int gguf_get_f32(const struct gguf_file *g, const char *key, float *out)
{
	const struct gguf_kv *kv = gguf_find_kv(g, key);
	if (!kv)
		return -ENOENT;
	if (type_is_float(kv->type))
		*out = (float)kv->v.f64;
	else if (type_is_uint(kv->type))
		*out = (float)kv->v.u64;
	else if (type_is_sint(kv->type))
		*out = (float)kv->v.i64;
	else
		return -EINVAL;
	return 0;
}

int gguf_get_bool(const struct gguf_file *g, const char *key, bool *out)
{
	const struct gguf_kv *kv = gguf_find_kv(g, key);
	if (!kv)
		return -ENOENT;
	if (kv->type != GGUF_TYPE_BOOL)
		return -EINVAL;
	*out = kv->v.u64 != 0;
	return 0;
}

int gguf_get_str(const struct gguf_file *g, const char *key, const char **out, uint64_t *len)
{
	const struct gguf_kv *kv = gguf_find_kv(g, key);
	if (!kv)
		return -ENOENT;
	if (kv->type != GGUF_TYPE_STRING)
		return -EINVAL;
	*out = kv->v.str.data;
	if (len)
		*len = kv->v.str.len;
	return 0;
}

int gguf_get_arr(const struct gguf_file *g, const char *key, uint32_t *elem_type, uint64_t *count)
{
	const struct gguf_kv *kv = gguf_find_kv(g, key);
	if (!kv)
		return -ENOENT;
	if (kv->type != GGUF_TYPE_ARRAY)
		return -EINVAL;
	if (elem_type)
		*elem_type = kv->v.arr.type;
	if (count)
		*count = kv->v.arr.count;
	return 0;
}

int gguf_arr_i64(const struct gguf_kv *kv, uint64_t i, int64_t *out)
{
	if (kv->type != GGUF_TYPE_ARRAY)
		return -EINVAL;
	uint32_t et = kv->v.arr.type;
	if (!type_is_uint(et) && !type_is_sint(et) && et != GGUF_TYPE_BOOL)
		return -EINVAL;
	if (i >= kv->v.arr.count)
		return -ERANGE;
	const uint8_t *p = (const uint8_t *)kv->v.arr.data + i * kv_types[et].size;
	switch (et) {
	case GGUF_TYPE_UINT8: case GGUF_TYPE_BOOL: *out = p[0]; break;
	case GGUF_TYPE_INT8: *out = (int8_t)p[0]; break;
	case GGUF_TYPE_UINT16: { uint16_t x; memcpy(&x, p, 2); *out = x; break; }
	case GGUF_TYPE_INT16: { int16_t x; memcpy(&x, p, 2); *out = x; break; }
	case GGUF_TYPE_UINT32: { uint32_t x; memcpy(&x, p, 4); *out = x; break; }
	case GGUF_TYPE_INT32: { int32_t x; memcpy(&x, p, 4); *out = x; break; }
	case GGUF_TYPE_UINT64: {
		uint64_t x;
		memcpy(&x, p, 8);
		if (x > INT64_MAX)
			return -ERANGE;
		*out = (int64_t)x;
		break;
	}
	default: memcpy(out, p, 8); break; /* INT64 */
	}
	return 0;
}

int gguf_arr_f64(const struct gguf_kv *kv, uint64_t i, double *out)
{
	if (kv->type != GGUF_TYPE_ARRAY)
		return -EINVAL;
	uint32_t et = kv->v.arr.type;
	if (et == GGUF_TYPE_FLOAT32 || et == GGUF_TYPE_FLOAT64) {
		if (i >= kv->v.arr.count)
			return -ERANGE;
		const uint8_t *p = (const uint8_t *)kv->v.arr.data + i * kv_types[et].size;
		if (et == GGUF_TYPE_FLOAT32) {
			float f;
			memcpy(&f, p, 4);
			*out = f;
		} else {
			memcpy(out, p, 8);
		}
		return 0;
	}
	if (et == GGUF_TYPE_UINT64) {
		if (i >= kv->v.arr.count)
			return -ERANGE;
		uint64_t x;
		memcpy(&x, (const uint8_t *)kv->v.arr.data + i * 8, 8);
		*out = (double)x;
		return 0;
	}
	int64_t v;
	int rc = gguf_arr_i64(kv, i, &v);
	if (rc)
		return rc;
	*out = (double)v;
	return 0;
}

int gguf_arr_str(const struct gguf_kv *kv, uint64_t i, const struct gguf_str **out)
{
	if (kv->type != GGUF_TYPE_ARRAY || kv->v.arr.type != GGUF_TYPE_STRING)
		return -EINVAL;
	if (i >= kv->v.arr.count)
		return -ERANGE;
	*out = &((const struct gguf_str *)kv->v.arr.data)[i];
	return 0;
}

int gguf_read(const struct gguf_file *g, const struct gguf_tensor *t, uint64_t off, void *buf,
	      size_t len, struct moe_error *err)
{
	if (off > t->bytes || len > t->bytes - off)
		return moe_error_set(err, -EINVAL, "%s: tensor '%s': read of %zu bytes at %" PRIu64
				     " is outside its %" PRIu64 " bytes", g->path, t->name.data, len, off, t->bytes);
	if (g->buf) {
		memcpy(buf, g->buf + t->offset + off, len);
		return 0;
	}
	int rc = moe_pread_full(gguf_tensor_fd(g, t), buf, len, t->offset + off);
	if (rc)
		return moe_error_set(err, rc, "%s: tensor '%s': read: %s",
				     g->n_parts ? g->part_path[t->part] : g->path, t->name.data, strerror(-rc));
	return 0;
}

int gguf_tensor_fd(const struct gguf_file *g, const struct gguf_tensor *t)
{
	return g->n_parts && t->part < g->n_parts ? g->part_fd[t->part] : g->fd;
}

/* ---- split models -------------------------------------------------------- */

#define SPLIT_NO "split.no"
#define SPLIT_COUNT "split.count"
#define SPLIT_TENSORS "split.tensors.count"

static bool is_split_key(const struct gguf_str *k)
{
	return (k->len == sizeof(SPLIT_NO) - 1 && memcmp(k->data, SPLIT_NO, k->len) == 0) ||
	       (k->len == sizeof(SPLIT_COUNT) - 1 && memcmp(k->data, SPLIT_COUNT, k->len) == 0) ||
	       (k->len == sizeof(SPLIT_TENSORS) - 1 && memcmp(k->data, SPLIT_TENSORS, k->len) == 0);
}

/* split.no and split.count of a part (llama.cpp writes u16; any integer is
 * taken, as its loader's get_key does). */
static int split_keys(const struct gguf_file *g, uint32_t *no, uint32_t *count, struct moe_error *err)
{
	int rc;
	if ((rc = gguf_get_u32(g, SPLIT_COUNT, count)) == -ENOENT)
		return moe_error_set(err, -EINVAL, "%s: a split part without %s", g->path, SPLIT_COUNT);
	if (rc == 0 && (rc = gguf_get_u32(g, SPLIT_NO, no)) == -ENOENT)
		return moe_error_set(err, -EINVAL, "%s: a split part without %s", g->path, SPLIT_NO);
	if (rc)
		return moe_error_set(err, -EINVAL, "%s: %s / %s is not a small unsigned integer", g->path, SPLIT_NO,
				     SPLIT_COUNT);
	if (*count == 0 || *count > 99999 || *no >= *count)
		return moe_error_set(err, -EINVAL, "%s: split.no %u of split.count %u is impossible", g->path, *no,
				     *count);
	return 0;
}

/* Moves parts[1..n) into g: tensors appended (names owned by g from now),
 * fds and paths kept; then drops the split.* keys and rebuilds the indices. */
static int merge_parts(struct gguf_file *g, struct gguf_file **parts, uint32_t n, struct moe_error *err)
{
	uint64_t total = 0;
	for (uint32_t i = 0; i < n; i++)
		total += parts[i]->n_tensors;
	if (total > GGUF_MAX_COUNT)
		return moe_error_set(err, -EINVAL, "%s: %" PRIu64 " tensors in all parts, more than %llu", g->path,
				     total, (unsigned long long)GGUF_MAX_COUNT);
	struct gguf_tensor *t = realloc(g->tensors, (total ? total : 1) * sizeof(*t));
	if (!t)
		return -ENOMEM;
	g->tensors = t;
	uint32_t *by_name = realloc(g->tensor_by_name, (total ? total : 1) * sizeof(uint32_t));
	if (!by_name)
		return -ENOMEM;
	g->tensor_by_name = by_name;
	g->part_fd = calloc(n, sizeof(int));
	g->part_path = calloc(n, sizeof(char *));
	if (!g->part_fd || !g->part_path)
		return -ENOMEM;
	g->n_parts = n;
	g->part_fd[0] = g->fd;
	g->part_path[0] = g->path;
	for (uint32_t i = 1; i < n; i++) {
		struct gguf_file *p = parts[i];
		memcpy(&g->tensors[g->n_tensors], p->tensors, p->n_tensors * sizeof(*t));
		for (uint64_t j = 0; j < p->n_tensors; j++)
			g->tensors[g->n_tensors + j].part = i;
		g->n_tensors += p->n_tensors;
		p->n_tensors = 0; /* the names are g's now */
		g->part_fd[i] = p->fd;
		p->fd = -1;
		g->part_path[i] = p->path;
		p->path = NULL;
	}
	for (uint64_t i = 0; i < g->n_tensors; i++)
		g->tensor_by_name[i] = (uint32_t)i;
	t_base = g->tensors;
	qsort(g->tensor_by_name, g->n_tensors, sizeof(uint32_t), cmp_t_idx);
	for (uint64_t i = 1; i < g->n_tensors; i++) {
		const struct gguf_tensor *a = &g->tensors[g->tensor_by_name[i - 1]];
		const struct gguf_tensor *b = &g->tensors[g->tensor_by_name[i]];
		if (str_cmp(&a->name, &b->name) == 0)
			return moe_error_set(err, -EINVAL, "%s: tensor '%s' is in split parts %u and %u", g->path,
					     a->name.data, MOE_MIN(a->part, b->part) + 1, MOE_MAX(a->part, b->part) + 1);
	}
	/* the model's own KV pairs, as its unsplit file has them */
	uint64_t k = 0;
	for (uint64_t i = 0; i < g->n_kv; i++) {
		if (is_split_key(&g->kv[i].key))
			free_kv(&g->kv[i]);
		else
			g->kv[k++] = g->kv[i];
	}
	g->n_kv = k;
	for (uint64_t i = 0; i < g->n_kv; i++)
		g->kv_by_key[i] = (uint32_t)i;
	kv_base = g->kv;
	qsort(g->kv_by_key, g->n_kv, sizeof(uint32_t), cmp_kv_idx);
	return 0;
}

int gguf_open_model(const char *path, struct gguf_file **out, struct moe_error *err)
{
	struct gguf_file *g, **parts = NULL;
	uint32_t no = 0, count = 0;
	int64_t want = 0;
	char suffix[32], *prefix = NULL, *pp = NULL;
	int rc;

	if ((rc = gguf_open(path, &g, err)))
		return rc;
	if (!gguf_find_kv(g, SPLIT_COUNT)) {
		*out = g;
		return 0;
	}
	if ((rc = split_keys(g, &no, &count, err)))
		goto out;
	if (no != 0) {
		rc = moe_error_set(err, -EINVAL, "%s is part %u of a model split in %u: open the first part "
				   "(-00001-of-%05u.gguf)", path, no + 1, count, count);
		goto out;
	}
	if ((rc = gguf_get_i64(g, SPLIT_TENSORS, &want))) {
		rc = moe_error_set(err, -EINVAL, "%s: %s %s", path, SPLIT_TENSORS,
				   rc == -ENOENT ? "is missing" : "is not an integer");
		goto out;
	}
	/* the other parts' names, as llama_split_prefix / llama_split_path make them */
	snprintf(suffix, sizeof(suffix), "-%05u-of-%05u.gguf", 1u, count);
	size_t pl = strlen(path), sl = strlen(suffix);
	if (count > 1 && (pl <= sl || strcmp(path + pl - sl, suffix) != 0)) {
		rc = moe_error_set(err, -EINVAL, "%s: split.count is %u but the name does not end in %s, so the "
				   "other parts cannot be found", path, count, suffix);
		goto out;
	}
	prefix = strndup(path, count > 1 ? pl - sl : pl);
	pp = malloc(pl + 1);
	parts = calloc(count, sizeof(*parts));
	if (!prefix || !pp || !parts) {
		rc = moe_error_set(err, -ENOMEM, "out of memory");
		goto out;
	}
	parts[0] = g;
	for (uint32_t i = 1; i < count; i++) {
		uint32_t pno, pcount;
		snprintf(pp, pl + 1, "%s-%05u-of-%05u.gguf", prefix, i + 1, count);
		if ((rc = gguf_open(pp, &parts[i], err))) {
			if (rc == -ENOENT)
				moe_error_set(err, rc, "%s: split part %u of %u is missing (%s)", path, i + 1, count, pp);
			goto out;
		}
		if (!gguf_find_kv(parts[i], SPLIT_COUNT) || !gguf_find_kv(parts[i], SPLIT_NO)) {
			rc = moe_error_set(err, -EINVAL, "%s: split part %u has no split.no / split.count", pp, i + 1);
			goto out;
		}
		if ((rc = split_keys(parts[i], &pno, &pcount, err)))
			goto out;
		if (pno != i || pcount != count) {
			rc = moe_error_set(err, -EINVAL, "%s: says it is part %u of %u, expected part %u of %u", pp,
					   pno + 1, pcount, i + 1, count);
			goto out;
		}
	}
	if ((rc = merge_parts(g, parts, count, err))) {
		if (rc == -ENOMEM)
			moe_error_set(err, rc, "out of memory");
		goto out;
	}
	if (want < 0 || (uint64_t)want != g->n_tensors) {
		rc = moe_error_set(err, -EINVAL, "%s: split.tensors.count is %" PRId64 " but the %u parts hold %" PRIu64
				   " tensors", path, want, count, g->n_tensors);
		goto out;
	}
out:
	if (parts)
		for (uint32_t i = 1; i < count; i++)
			gguf_close(parts[i]);
	free(parts);
	free(prefix);
	free(pp);
	if (rc) {
		gguf_close(g);
		return rc;
	}
	*out = g;
	return 0;
}
