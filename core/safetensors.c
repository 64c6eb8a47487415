/* safetensors.c - strict safetensors reader (see safetensors.h). */
/* _GNU_SOURCE before any system header (asprintf, strndup). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include "config.h"
#include "safetensors.h"

#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct dtype_desc {
	const char *name;
	uint32_t bits;
	enum moe_dtype dt;
};

/* The Rust Dtype enum (formats.md section 1). */
static const struct dtype_desc dtypes[] = {
	{ "BOOL", 8, MOE_DTYPE_INVALID },
	{ "F4", 4, MOE_DTYPE_INVALID },
	{ "F6_E2M3", 6, MOE_DTYPE_INVALID },
	{ "F6_E3M2", 6, MOE_DTYPE_INVALID },
	{ "U8", 8, MOE_DTYPE_U8 },
	{ "I8", 8, MOE_DTYPE_I8 },
	{ "F8_E5M2", 8, MOE_DTYPE_INVALID },
	{ "F8_E4M3", 8, MOE_DTYPE_INVALID },
	{ "F8_E8M0", 8, MOE_DTYPE_INVALID },
	{ "F8_E4M3FNUZ", 8, MOE_DTYPE_INVALID },
	{ "F8_E5M2FNUZ", 8, MOE_DTYPE_INVALID },
	{ "I16", 16, MOE_DTYPE_INVALID },
	{ "U16", 16, MOE_DTYPE_INVALID },
	{ "F16", 16, MOE_DTYPE_F16 },
	{ "BF16", 16, MOE_DTYPE_BF16 },
	{ "I32", 32, MOE_DTYPE_I32 },
	{ "U32", 32, MOE_DTYPE_INVALID },
	{ "F32", 32, MOE_DTYPE_F32 },
	{ "C64", 64, MOE_DTYPE_INVALID },
	{ "F64", 64, MOE_DTYPE_F64 },
	{ "I64", 64, MOE_DTYPE_I64 },
	{ "U64", 64, MOE_DTYPE_INVALID },
};

bool safetensors_dtype_info(const char *s, uint32_t *bits, enum moe_dtype *dt)
{
	for (size_t i = 0; s && i < MOE_ARRAY_SIZE(dtypes); i++) {
		if (strcmp(s, dtypes[i].name) == 0) {
			if (bits)
				*bits = dtypes[i].bits;
			if (dt)
				*dt = dtypes[i].dt;
			return true;
		}
	}
	return false;
}

static uint64_t le64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = (v << 8) | p[i];
	return v;
}

void safetensors_close(struct safetensors_file *f)
{
	if (!f)
		return;
	if (f->fd >= 0)
		close(f->fd);
	for (uint32_t i = 0; i < f->n_tensors; i++)
		free((char *)f->tensors[i].name);
	for (uint32_t i = 0; i < f->n_metadata; i++) {
		free(f->meta_keys[i]);
		free(f->meta_values[i]);
	}
	free(f->tensors);
	free(f->meta_keys);
	free(f->meta_values);
	free(f->by_name);
	free(f->path);
	free(f);
}

static int cmp_offset(const void *a, const void *b)
{
	const struct safetensors_tensor *x = a, *y = b;
	if (x->offset != y->offset)
		return x->offset < y->offset ? -1 : 1;
	if (x->bytes != y->bytes)
		return x->bytes < y->bytes ? -1 : 1;
	return strcmp(x->name, y->name);
}

/* qsort has no context argument; the name index sorts through this. */
static __thread const struct safetensors_tensor *sort_base;

static int cmp_idx_name(const void *a, const void *b)
{
	return strcmp(sort_base[*(const uint32_t *)a].name, sort_base[*(const uint32_t *)b].name);
}

/* Parses one tensor entry into t (offsets still relative). */
static int parse_entry(const char *name, json_t *v, struct safetensors_tensor *t, uint64_t *begin,
		       uint64_t *end, struct moe_error *err)
{
	if (!json_is_object(v))
		return moe_error_set(err, -EINVAL, "tensor '%s': entry is not a JSON object", name);
	json_t *jd = json_object_get(v, "dtype");
	json_t *js = json_object_get(v, "shape");
	json_t *jo = json_object_get(v, "data_offsets");
	if (!jd || !js || !jo)
		return moe_error_set(err, -EINVAL, "tensor '%s': missing \"%s\"", name,
				     !jd ? "dtype" : !js ? "shape" : "data_offsets");
	if (!json_is_string(jd))
		return moe_error_set(err, -EINVAL, "tensor '%s': dtype is not a string", name);
	const char *ds = json_string_value(jd);
	if (!safetensors_dtype_info(ds, &t->dtype_bits, &t->dtype))
		return moe_error_set(err, -EINVAL, "tensor '%s': unknown dtype \"%.32s\"", name, ds);
	snprintf(t->dtype_str, sizeof(t->dtype_str), "%s", ds);

	if (!json_is_array(js))
		return moe_error_set(err, -EINVAL, "tensor '%s': shape is not an array", name);
	size_t nd = json_array_size(js);
	if (nd > SAFETENSORS_MAX_DIMS)
		return moe_error_set(err, -EINVAL, "tensor '%s': shape has %zu dimensions (at most %d)",
				     name, nd, SAFETENSORS_MAX_DIMS);
	t->n_dims = (uint32_t)nd;
	t->n_elems = 1;
	for (size_t i = 0; i < nd; i++) {
		json_t *d = json_array_get(js, i);
		if (!json_is_integer(d) || json_integer_value(d) < 0)
			return moe_error_set(err, -EINVAL,
					     "tensor '%s': shape[%zu] is not a non-negative integer", name, i);
		t->shape[i] = (uint64_t)json_integer_value(d);
		if (!moe_mul_u64(t->n_elems, t->shape[i], &t->n_elems))
			return moe_error_set(err, -EINVAL,
					     "tensor '%s': shape element count overflows 64 bits", name);
	}
	uint64_t bits;
	if (!moe_mul_u64(t->n_elems, t->dtype_bits, &bits))
		return moe_error_set(err, -EINVAL, "tensor '%s': shape byte size overflows 64 bits", name);
	if (bits % 8)
		return moe_error_set(err, -EINVAL,
				     "tensor '%s': %" PRIu64 " elements of %s are not a whole number of bytes",
				     name, t->n_elems, t->dtype_str);
	t->bytes = bits / 8;

	if (!json_is_array(jo) || json_array_size(jo) != 2)
		return moe_error_set(err, -EINVAL, "tensor '%s': data_offsets is not [begin, end]", name);
	json_t *jb = json_array_get(jo, 0), *je = json_array_get(jo, 1);
	if (!json_is_integer(jb) || !json_is_integer(je) || json_integer_value(jb) < 0 ||
	    json_integer_value(je) < 0)
		return moe_error_set(err, -EINVAL,
				     "tensor '%s': data_offsets are not non-negative integers", name);
	*begin = (uint64_t)json_integer_value(jb);
	*end = (uint64_t)json_integer_value(je);
	if (*end < *begin)
		return moe_error_set(err, -EINVAL,
				     "tensor '%s': data_offsets end %" PRIu64 " is before begin %" PRIu64,
				     name, *end, *begin);
	if (*end - *begin != t->bytes)
		return moe_error_set(err, -EINVAL,
				     "tensor '%s': data_offsets span %" PRIu64 " bytes but shape and dtype %s "
				     "need %" PRIu64, name, *end - *begin, t->dtype_str, t->bytes);
	return 0;
}

/* Validates the JSON header (n bytes at hdr) of a file of file_size bytes. */
static int parse_header(const char *hdr, uint64_t n, uint64_t file_size, const char *path,
			struct safetensors_file **out, struct moe_error *err)
{
	struct safetensors_file *f;
	json_error_t jerr;
	json_t *root;
	int rc = 0;

	if (n == 0 || hdr[0] != '{')
		return moe_error_set(err, -EINVAL, "%s: header does not start with '{'", path);
	root = json_loadb(hdr, (size_t)n, JSON_REJECT_DUPLICATES, &jerr);
	if (!root)
		return moe_error_set(err, -EINVAL, "%s: header is not valid JSON: %s (header byte %d)",
				     path, jerr.text, jerr.position);
	if (!json_is_object(root)) {
		json_decref(root);
		return moe_error_set(err, -EINVAL, "%s: header is not a JSON object", path);
	}
	f = calloc(1, sizeof(*f));
	if (!f) {
		json_decref(root);
		return -ENOMEM;
	}
	f->fd = -1;
	f->file_size = file_size;
	f->header_len = n;
	f->data_start = 8 + n;
	f->path = strdup(path);
	size_t cap = json_object_size(root);
	f->tensors = calloc(cap ? cap : 1, sizeof(*f->tensors));
	if (!f->path || !f->tensors) {
		rc = -ENOMEM;
		goto out;
	}

	const char *key;
	json_t *v;
	json_object_foreach(root, key, v) {
		if (strcmp(key, "__metadata__") == 0) {
			if (!json_is_object(v)) {
				rc = moe_error_set(err, -EINVAL, "%s: __metadata__ is not an object", path);
				goto out;
			}
			size_t m = json_object_size(v);
			f->meta_keys = calloc(m ? m : 1, sizeof(char *));
			f->meta_values = calloc(m ? m : 1, sizeof(char *));
			if (!f->meta_keys || !f->meta_values) {
				rc = -ENOMEM;
				goto out;
			}
			const char *mk;
			json_t *mv;
			json_object_foreach(v, mk, mv) {
				if (!json_is_string(mv)) {
					rc = moe_error_set(err, -EINVAL,
							   "%s: __metadata__ value of \"%.64s\" is not a string",
							   path, mk);
					goto out;
				}
				f->meta_keys[f->n_metadata] = strdup(mk);
				f->meta_values[f->n_metadata] = strdup(json_string_value(mv));
				f->n_metadata++;
				if (!f->meta_keys[f->n_metadata - 1] || !f->meta_values[f->n_metadata - 1]) {
					rc = -ENOMEM;
					goto out;
				}
			}
			continue;
		}
		struct safetensors_tensor *t = &f->tensors[f->n_tensors];
		uint64_t begin = 0, end = 0;
		rc = parse_entry(key, v, t, &begin, &end, err);
		if (rc) {
			moe_error_prefix(err, rc, "%s", path);
			goto out;
		}
		t->name = strdup(key);
		if (!t->name) {
			rc = -ENOMEM;
			goto out;
		}
		/* data_start + end <= file_size must hold; checked here so that
		 * the absolute offsets below cannot overflow. */
		if (end > file_size || f->data_start + end > file_size) {
			rc = moe_error_set(err, -EINVAL,
					   "%s: tensor '%s': data_offsets end %" PRIu64 " is beyond the end of "
					   "the file (%" PRIu64 " data bytes)", path, key, end,
					   file_size > f->data_start ? file_size - f->data_start : 0);
			f->n_tensors++;
			goto out;
		}
		t->offset = f->data_start + begin;
		f->n_tensors++;
	}

	qsort(f->tensors, f->n_tensors, sizeof(*f->tensors), cmp_offset);
	uint64_t expect = f->data_start;
	for (uint32_t i = 0; i < f->n_tensors; i++) {
		const struct safetensors_tensor *t = &f->tensors[i];
		if (t->offset > expect) {
			rc = moe_error_set(err, -EINVAL,
					   "%s: tensor '%s': data_offsets begin %" PRIu64 " leaves a hole of %" PRIu64
					   " bytes after %s (tensors must be contiguous)", path, t->name,
					   t->offset - f->data_start, t->offset - expect,
					   i ? f->tensors[i - 1].name : "the header");
			goto out;
		}
		if (t->offset < expect) {
			rc = moe_error_set(err, -EINVAL,
					   "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 ") overlap tensor '%s'",
					   path, t->name, t->offset - f->data_start,
					   t->offset - f->data_start + t->bytes, f->tensors[i - 1].name);
			goto out;
		}
		expect = t->offset + t->bytes;
	}
	if (expect != file_size) {
		rc = moe_error_set(err, -EINVAL,
				   "%s: tensor data ends at byte %" PRIu64 " but the file has %" PRIu64
				   " bytes (data must fill the file exactly)", path, expect, file_size);
		goto out;
	}

	f->by_name = malloc((f->n_tensors ? f->n_tensors : 1) * sizeof(uint32_t));
	if (!f->by_name) {
		rc = -ENOMEM;
		goto out;
	}
	for (uint32_t i = 0; i < f->n_tensors; i++)
		f->by_name[i] = i;
	sort_base = f->tensors;
	qsort(f->by_name, f->n_tensors, sizeof(uint32_t), cmp_idx_name);
out:
	json_decref(root);
	if (rc) {
		safetensors_close(f);
		return rc;
	}
	*out = f;
	return 0;
}

/* Checks the 8-byte length prefix; returns N or a negative errno. */
static int check_prefix(const uint8_t *p8, uint64_t file_size, const char *path, uint64_t *n,
			struct moe_error *err)
{
	*n = le64(p8);
	if (*n > SAFETENSORS_MAX_HEADER)
		return moe_error_set(err, -EINVAL, "%s: header length %" PRIu64 " exceeds the limit of %llu bytes",
				     path, *n, SAFETENSORS_MAX_HEADER);
	if (8 + *n > file_size)
		return moe_error_set(err, -EINVAL,
				     "%s: header length %" PRIu64 " goes beyond the end of the file (%" PRIu64 " bytes)",
				     path, *n, file_size);
	return 0;
}

int safetensors_parse(const void *buf, size_t len, uint64_t file_size,
		      struct safetensors_file **out, struct moe_error *err)
{
	uint64_t n;
	int rc;
	if (len < 8 || file_size < 8)
		return moe_error_set(err, -EINVAL, "<buffer>: file too short (%" PRIu64 " bytes) for the "
				     "8-byte header length", (uint64_t)MOE_MIN((uint64_t)len, file_size));
	if ((rc = check_prefix(buf, file_size, "<buffer>", &n, err)))
		return rc;
	if (n > len - 8)
		return moe_error_set(err, -EINVAL, "<buffer>: header length %" PRIu64 " goes beyond the "
				     "%zu bytes given", n, len);
	return parse_header((const char *)buf + 8, n, file_size, "<buffer>", out, err);
}

int safetensors_open(const char *path, struct safetensors_file **out, struct moe_error *err)
{
	uint8_t p8[8];
	struct stat st;
	uint64_t n;
	char *hdr;
	int fd, rc;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return moe_error_set(err, -errno, "%s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		rc = moe_error_set(err, -EINVAL, "%s: not a regular file", path);
		close(fd);
		return rc;
	}
	uint64_t size = (uint64_t)st.st_size;
	if (size < 8) {
		close(fd);
		return moe_error_set(err, -EINVAL, "%s: file too short (%" PRIu64 " bytes) for the 8-byte "
				     "header length", path, size);
	}
	if ((rc = moe_pread_full(fd, p8, 8, 0)) || (rc = check_prefix(p8, size, path, &n, err))) {
		if (rc != -EINVAL)
			moe_error_set(err, rc, "%s: read: %s", path, strerror(-rc));
		close(fd);
		return rc;
	}
	hdr = malloc(n ? n : 1);
	if (!hdr) {
		close(fd);
		return -ENOMEM;
	}
	if ((rc = moe_pread_full(fd, hdr, n, 8))) {
		moe_error_set(err, rc, "%s: reading the header: %s", path, strerror(-rc));
		free(hdr);
		close(fd);
		return rc;
	}
	rc = parse_header(hdr, n, size, path, out, err);
	free(hdr);
	if (rc) {
		close(fd);
		return rc;
	}
	(*out)->fd = fd;
	return 0;
}

struct name_key {
	const char *name;
	const struct safetensors_file *f;
};

static int cmp_key_tensor(const void *key, const void *elem)
{
	const struct name_key *k = key;
	return strcmp(k->name, k->f->tensors[*(const uint32_t *)elem].name);
}

const struct safetensors_tensor *safetensors_find(const struct safetensors_file *f, const char *name)
{
	struct name_key k = { name, f };
	const uint32_t *i = f->n_tensors ? bsearch(&k, f->by_name, f->n_tensors, sizeof(uint32_t), cmp_key_tensor)
					 : NULL;
	return i ? &f->tensors[*i] : NULL;
}

const char *safetensors_metadata(const struct safetensors_file *f, const char *key)
{
	for (uint32_t i = 0; i < f->n_metadata; i++)
		if (strcmp(f->meta_keys[i], key) == 0)
			return f->meta_values[i];
	return NULL;
}

int safetensors_read(const struct safetensors_file *f, const struct safetensors_tensor *t,
		     uint64_t off, void *buf, size_t len, struct moe_error *err)
{
	if (off > t->bytes || len > t->bytes - off)
		return moe_error_set(err, -EINVAL, "%s: tensor '%s': read of %zu bytes at %" PRIu64
				     " is outside its %" PRIu64 " bytes", f->path, t->name, len, off, t->bytes);
	if (f->fd < 0)
		return moe_error_set(err, -EINVAL, "%s: parsed from a buffer, no file to read", f->path);
	int rc = moe_pread_full(f->fd, buf, len, t->offset + off);
	if (rc)
		return moe_error_set(err, rc, "%s: tensor '%s': read: %s", f->path, t->name, strerror(-rc));
	return 0;
}

/* ---- sharded checkpoints ------------------------------------------------ */

void safetensors_model_close(struct safetensors_model *m)
{
	if (!m)
		return;
	for (uint32_t i = 0; i < m->n_files; i++)
		safetensors_close(m->files[i]);
	free(m->files);
	free(m->tensors);
	free(m->dir);
	free(m->index_path);
	free(m);
}

static int cmp_tensor_ptr_name(const void *a, const void *b)
{
	const struct safetensors_tensor *x = *(const struct safetensors_tensor *const *)a;
	const struct safetensors_tensor *y = *(const struct safetensors_tensor *const *)b;
	return strcmp(x->name, y->name);
}

const struct safetensors_tensor *safetensors_model_find(const struct safetensors_model *m,
							 const char *name)
{
	size_t lo = 0, hi = m->n_tensors;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		int c = strcmp(name, m->tensors[mid]->name);
		if (c == 0)
			return m->tensors[mid];
		if (c < 0)
			hi = mid;
		else
			lo = mid + 1;
	}
	return NULL;
}

int safetensors_model_read(const struct safetensors_model *m, const struct safetensors_tensor *t,
			   uint64_t off, void *buf, size_t len, struct moe_error *err)
{
	if (t->shard >= m->n_files)
		return moe_error_set(err, -EINVAL, "tensor '%s': bad shard index", t->name);
	return safetensors_read(m->files[t->shard], t, off, buf, len, err);
}

static bool is_file(const char *p)
{
	struct stat st;
	return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

static char *path_join(const char *dir, const char *name)
{
	char *p;
	if (asprintf(&p, "%s/%s", dir, name) < 0)
		return NULL;
	return p;
}

static char *dir_of(const char *path)
{
	const char *s = strrchr(path, '/');
	if (!s)
		return strdup(".");
	if (s == path)
		return strdup("/");
	return strndup(path, (size_t)(s - path));
}

static bool ends_with(const char *s, const char *suf)
{
	size_t a = strlen(s), b = strlen(suf);
	return a >= b && strcmp(s + a - b, suf) == 0;
}

static int model_single(struct safetensors_model *m, const char *file, struct moe_error *err)
{
	int rc;
	m->files = calloc(1, sizeof(*m->files));
	if (!m->files)
		return -ENOMEM;
	if ((rc = safetensors_open(file, &m->files[0], err)))
		return rc;
	m->n_files = 1;
	struct safetensors_file *f = m->files[0];
	m->tensors = malloc((f->n_tensors ? f->n_tensors : 1) * sizeof(*m->tensors));
	if (!m->tensors)
		return -ENOMEM;
	for (uint32_t i = 0; i < f->n_tensors; i++) {
		m->tensors[i] = &f->tensors[f->by_name[i]];
		m->total_bytes += f->tensors[i].bytes;
	}
	m->n_tensors = f->n_tensors;
	return 0;
}

struct wm_pair {
	const char *tensor;
	const char *shard;
};

static int cmp_pair_shard(const void *a, const void *b)
{
	const struct wm_pair *x = a, *y = b;
	return strcmp(x->shard, y->shard);
}

#define INDEX_MAX_BYTES (256u << 20)

static int model_index(struct safetensors_model *m, const char *index, struct moe_error *err)
{
	json_error_t jerr;
	struct wm_pair *pairs = NULL;
	json_t *root;
	struct stat st;
	int rc = 0;

	if (stat(index, &st) < 0)
		return moe_error_set(err, -errno, "%s: %s", index, strerror(errno));
	if ((uint64_t)st.st_size > INDEX_MAX_BYTES)
		return moe_error_set(err, -EINVAL, "%s: index is larger than %u bytes", index, INDEX_MAX_BYTES);
	root = json_load_file(index, JSON_REJECT_DUPLICATES, &jerr);
	if (!root)
		return moe_error_set(err, -EINVAL, "%s:%d: index is not valid JSON: %s", index, jerr.line,
				     jerr.text);
	json_t *wm = json_is_object(root) ? json_object_get(root, "weight_map") : NULL;
	if (!wm || !json_is_object(wm)) {
		rc = moe_error_set(err, -EINVAL, "%s: no \"weight_map\" object", index);
		goto out;
	}
	size_t n = json_object_size(wm);
	if (n == 0 || n > UINT32_MAX) {
		rc = moe_error_set(err, -EINVAL, "%s: weight_map is empty", index);
		goto out;
	}
	pairs = calloc(n, sizeof(*pairs));
	if (!pairs) {
		rc = -ENOMEM;
		goto out;
	}
	size_t np = 0;
	const char *key;
	json_t *v;
	json_object_foreach(wm, key, v) {
		if (!json_is_string(v)) {
			rc = moe_error_set(err, -EINVAL, "%s: weight_map entry '%s' is not a file name", index, key);
			goto out;
		}
		const char *s = json_string_value(v);
		if (!*s || strchr(s, '/') || strcmp(s, ".") == 0 || strcmp(s, "..") == 0 || strstr(s, "..")) {
			rc = moe_error_set(err, -EINVAL,
					   "%s: weight_map entry '%s': shard name \"%.128s\" is not a plain file name "
					   "in the checkpoint directory", index, key, s);
			goto out;
		}
		pairs[np].tensor = key;
		pairs[np].shard = s;
		np++;
	}
	qsort(pairs, np, sizeof(*pairs), cmp_pair_shard);
	size_t n_shards = 0;
	for (size_t i = 0; i < np; i++)
		if (i == 0 || strcmp(pairs[i].shard, pairs[i - 1].shard))
			n_shards++;
	m->files = calloc(n_shards, sizeof(*m->files));
	m->tensors = calloc(np, sizeof(*m->tensors));
	if (!m->files || !m->tensors) {
		rc = -ENOMEM;
		goto out;
	}
	for (size_t i = 0; i < np; i++) {
		if (i == 0 || strcmp(pairs[i].shard, pairs[i - 1].shard)) {
			char *p = path_join(m->dir, pairs[i].shard);
			if (!p) {
				rc = -ENOMEM;
				goto out;
			}
			if (!is_file(p)) {
				rc = moe_error_set(err, -ENOENT, "%s: shard '%s' (of tensor '%s') does not exist",
						   index, pairs[i].shard, pairs[i].tensor);
				free(p);
				goto out;
			}
			rc = safetensors_open(p, &m->files[m->n_files], err);
			free(p);
			if (rc)
				goto out;
			m->n_files++;
		}
		struct safetensors_file *f = m->files[m->n_files - 1];
		struct safetensors_tensor *t = (struct safetensors_tensor *)safetensors_find(f, pairs[i].tensor);
		if (!t) {
			rc = moe_error_set(err, -EINVAL, "%s: tensor '%s' is listed in shard '%s' but is not in it",
					   index, pairs[i].tensor, pairs[i].shard);
			goto out;
		}
		t->shard = m->n_files - 1;
		m->tensors[m->n_tensors++] = t;
		m->total_bytes += t->bytes;
	}
	qsort(m->tensors, m->n_tensors, sizeof(*m->tensors), cmp_tensor_ptr_name);
	/* Every tensor of every shard must be the one weight_map names. */
	for (uint32_t s = 0; s < m->n_files; s++) {
		const struct safetensors_file *f = m->files[s];
		for (uint32_t i = 0; i < f->n_tensors; i++) {
			const struct safetensors_tensor *t = &f->tensors[i];
			const struct safetensors_tensor *w = safetensors_model_find(m, t->name);
			if (!w) {
				rc = moe_error_set(err, -EINVAL, "%s: tensor '%s' of shard '%s' is not listed in weight_map",
						   index, t->name, f->path);
				goto out;
			}
			if (w != t) {
				rc = moe_error_set(err, -EINVAL, "%s: tensor '%s' is in two shards: '%s' and '%s'",
						   index, t->name, m->files[w->shard]->path, f->path);
				goto out;
			}
		}
	}
out:
	free(pairs);
	json_decref(root);
	return rc;
}

int safetensors_model_open(const char *path, struct safetensors_model **out, struct moe_error *err)
{
	struct safetensors_model *m;
	struct stat st;
	int rc;

	if (stat(path, &st) < 0)
		return moe_error_set(err, -errno, "%s: %s", path, strerror(errno));
	m = calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	if (S_ISDIR(st.st_mode)) {
		m->dir = strdup(path);
		char *idx = path_join(path, "model.safetensors.index.json");
		char *one = path_join(path, "model.safetensors");
		if (!m->dir || !idx || !one) {
			rc = -ENOMEM;
		} else if (is_file(idx)) {
			m->index_path = idx;
			idx = NULL;
			rc = model_index(m, m->index_path, err);
		} else if (is_file(one)) {
			rc = model_single(m, one, err);
		} else {
			rc = moe_error_set(err, -ENOENT,
					   "%s: neither model.safetensors.index.json nor model.safetensors", path);
		}
		free(idx);
		free(one);
	} else {
		m->dir = dir_of(path);
		if (!m->dir) {
			rc = -ENOMEM;
		} else if (ends_with(path, ".json")) {
			m->index_path = strdup(path);
			rc = m->index_path ? model_index(m, path, err) : -ENOMEM;
		} else {
			rc = model_single(m, path, err);
		}
	}
	if (rc) {
		safetensors_model_close(m);
		return rc;
	}
	*out = m;
	return 0;
}
