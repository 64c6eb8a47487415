/* gguf.h - strict reader of GGUF files (versions 2 and 3, little-endian).
 *
 * Layout: magic "GGUF", u32 version, u64 tensor_count, u64 kv_count, KV pairs,
 * tensor infos, padding to general.alignment, tensor data. The metadata and
 * tensor infos are parsed into memory (bounded by the file size); tensor data
 * is read on demand with pread. Validation rules: doc/formats.md.
 */
#ifndef MOETIER_GGUF_H
#define MOETIER_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "util.h"

#define GGUF_MAGIC 0x46554747u          /* "GGUF" read as a little-endian u32 */
#define GGUF_DEFAULT_ALIGNMENT 32u
#define GGUF_MAX_DIMS 4
#define GGUF_MAX_NAME 64                /* ggml's name buffer with its NUL: names are 1..63 bytes */
#define GGUF_MAX_KEY 65535              /* KV key bytes */
#define GGUF_MAX_STRING (16u << 20)     /* any string value */
#define GGUF_MAX_COUNT (1ull << 20)     /* tensor_count and kv_count */

/* KV value types (ids stored in files). */
enum gguf_type {
	GGUF_TYPE_UINT8 = 0,
	GGUF_TYPE_INT8 = 1,
	GGUF_TYPE_UINT16 = 2,
	GGUF_TYPE_INT16 = 3,
	GGUF_TYPE_UINT32 = 4,
	GGUF_TYPE_INT32 = 5,
	GGUF_TYPE_FLOAT32 = 6,
	GGUF_TYPE_BOOL = 7,
	GGUF_TYPE_STRING = 8,
	GGUF_TYPE_ARRAY = 9,
	GGUF_TYPE_UINT64 = 10,
	GGUF_TYPE_INT64 = 11,
	GGUF_TYPE_FLOAT64 = 12,
	GGUF_TYPE_COUNT
};

/* ggml tensor types moetier names (ids stored in files; see formats.md 4.4). */
enum gguf_ggml_type {
	GGUF_GGML_F32 = 0,
	GGUF_GGML_F16 = 1,
	GGUF_GGML_Q4_0 = 2,
	GGUF_GGML_Q4_1 = 3,
	GGUF_GGML_Q5_0 = 6,
	GGUF_GGML_Q5_1 = 7,
	GGUF_GGML_Q8_0 = 8,
	GGUF_GGML_Q8_1 = 9,
	GGUF_GGML_Q2_K = 10,
	GGUF_GGML_Q3_K = 11,
	GGUF_GGML_Q4_K = 12,
	GGUF_GGML_Q5_K = 13,
	GGUF_GGML_Q6_K = 14,
	GGUF_GGML_IQ4_NL = 20,
	GGUF_GGML_IQ4_XS = 23,
	GGUF_GGML_BF16 = 30,
	GGUF_GGML_MXFP4 = 39,
};

/* "UINT8" ... "FLOAT64", or "?" for an unknown id. */
const char *gguf_type_name(uint32_t type);
/* Block geometry of a ggml type id: name ("Q4_K"), elements per block, bytes
 * per block, and the moetier dtype (INVALID where moetier has none). Returns
 * false for an unknown or removed id. Any output pointer may be NULL. */
bool gguf_ggml_type_info(uint32_t ggml_type, const char **name, uint32_t *blck_size,
			 uint32_t *type_size, enum moe_dtype *dtype);

/* A string: bytes plus length; data is also NUL-terminated (GGUF strings may
 * hold NUL bytes, so use len). */
struct gguf_str {
	uint64_t len;
	char *data;
};

struct gguf_kv {
	struct gguf_str key;
	uint32_t type;                    /* enum gguf_type */
	union {
		uint64_t u64;             /* UINT8/16/32/64 (zero-extended) and BOOL (0/1) */
		int64_t i64;              /* INT8/16/32/64 (sign-extended) */
		double f64;               /* FLOAT32/64 */
		struct gguf_str str;      /* STRING */
		struct {
			uint32_t type;    /* element type; never ARRAY (nested arrays are rejected) */
			uint64_t count;
			void *data;       /* count elements: native-endian values of the element
			                   * type's width (BOOL as u8), or struct gguf_str[count] */
		} arr;
	} v;
};

struct gguf_tensor {
	struct gguf_str name;
	uint32_t n_dims;                  /* 1..4 */
	uint64_t ne[GGUF_MAX_DIMS];       /* ggml order: ne[0] is contiguous; unused dims are 1 */
	uint32_t ggml_type;
	enum moe_dtype dtype;             /* INVALID for ggml types moetier does not use */
	uint64_t n_elems;
	uint64_t rel_offset;              /* as stored: relative to data_start */
	uint64_t offset;                  /* absolute file offset (in its part's file) */
	uint64_t bytes;
	uint32_t part;                    /* gguf_open_model: the split part holding it (0-based) */
};

struct gguf_file {
	char *path;                       /* "<buffer>" for gguf_parse */
	int fd;                           /* -1 when parsed from a buffer */
	const uint8_t *buf;               /* gguf_parse: the caller's buffer (not owned) */
	uint64_t file_size;
	uint32_t version;                 /* 2 or 3 */
	uint32_t alignment;
	uint64_t data_start;              /* align(end of tensor infos) */
	uint64_t n_kv;
	struct gguf_kv *kv;               /* in file order */
	uint64_t n_tensors;
	struct gguf_tensor *tensors;      /* in file order */
	uint32_t *kv_by_key;              /* private: sorted indices */
	uint32_t *tensor_by_name;         /* private: sorted indices */
	uint32_t n_parts;                 /* gguf_open_model of a split model: parts; else 0 */
	int *part_fd;                     /* [n_parts]; part_fd[0] == fd */
	char **part_path;                 /* [n_parts]; part_path[0] == path */
};

/* Opens and validates a GGUF file; the fd stays open for gguf_read. -EINVAL
 * with a message naming the offending key/tensor and rule on malformed input. */
int gguf_open(const char *path, struct gguf_file **out, struct moe_error *err);
/* The same from a whole file in memory (tests, fuzzing). buf must stay valid
 * while the result is used (gguf_read copies from it). */
int gguf_parse(const void *buf, size_t len, struct gguf_file **out, struct moe_error *err);
void gguf_close(struct gguf_file *g);

/* Split models, as llama.cpp's gguf-split writes them: PREFIX-00001-of-0000N.gguf
 * ... PREFIX-0000N-of-0000N.gguf, each a whole GGUF with its own tensors and
 * the keys split.no (0-based), split.count and split.tensors.count; the
 * first part also holds every other KV pair. Given the first part's path,
 * opens all N and returns them as one file: the first part's KV pairs
 * without the three split.* keys (so the model reads as its unsplit file
 * does), the tensors of every part in part order, each with its part index
 * (gguf_read reads from the right file). A file without split.count is
 * opened as gguf_open does. Refused with a message: another part than the
 * first, a name not ending in -00001-of-0000N.gguf, a missing part, a part
 * whose split.no/split.count disagree, a tensor in two parts, a total other
 * than split.tensors.count. */
int gguf_open_model(const char *path, struct gguf_file **out, struct moe_error *err);
/* The descriptor tensor t is read from (its part's). */
int gguf_tensor_fd(const struct gguf_file *g, const struct gguf_tensor *t);

/* KV lookup by key; NULL if absent. */
const struct gguf_kv *gguf_find_kv(const struct gguf_file *g, const char *key);

/* Typed getters: 0, -ENOENT when the key is absent, -EINVAL when the type
 * does not match, -ERANGE when the value does not fit. */
int gguf_get_u32(const struct gguf_file *g, const char *key, uint32_t *out); /* any integer type */
int gguf_get_u64(const struct gguf_file *g, const char *key, uint64_t *out); /* any integer type >= 0 */
int gguf_get_i64(const struct gguf_file *g, const char *key, int64_t *out);  /* any integer type */
int gguf_get_f32(const struct gguf_file *g, const char *key, float *out);    /* FLOAT32/64 or integer */
int gguf_get_bool(const struct gguf_file *g, const char *key, bool *out);
/* The string (NUL-terminated, owned by g) and optionally its length. */
int gguf_get_str(const struct gguf_file *g, const char *key, const char **out, uint64_t *len);
/* Array: element type and count. */
int gguf_get_arr(const struct gguf_file *g, const char *key, uint32_t *elem_type, uint64_t *count);

/* Element i of an array KV. -EINVAL if kv is not an array of a matching kind
 * (integer, float, string), -ERANGE if i >= count or the value does not fit. */
int gguf_arr_i64(const struct gguf_kv *kv, uint64_t i, int64_t *out);   /* integer or BOOL elements */
int gguf_arr_f64(const struct gguf_kv *kv, uint64_t i, double *out);    /* float or integer elements */
int gguf_arr_str(const struct gguf_kv *kv, uint64_t i, const struct gguf_str **out);

/* Tensor lookup by name; NULL if absent. */
const struct gguf_tensor *gguf_find_tensor(const struct gguf_file *g, const char *name);

/* Reads len bytes at offset off inside tensor t (pread, or memcpy for a
 * buffer-parsed file). -EINVAL when the range is outside the tensor. */
int gguf_read(const struct gguf_file *g, const struct gguf_tensor *t, uint64_t off, void *buf,
	      size_t len, struct moe_error *err);

#endif
