/* safetensors.h - strict reader of safetensors files and sharded HF
 * checkpoints (model.safetensors.index.json).
 *
 * File layout: [u64 N little-endian][N bytes of JSON header][data]. Every rule
 * of the reference implementation (huggingface/safetensors Metadata::validate)
 * is enforced; see doc/formats.md. The header is parsed once; tensor bytes are
 * read on demand with pread, so multi-GiB files are never loaded whole.
 */
#ifndef MOETIER_SAFETENSORS_H
#define MOETIER_SAFETENSORS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "util.h"

#define SAFETENSORS_MAX_HEADER 100000000ull /* the reference reader's MAX_HEADER_SIZE */
#define SAFETENSORS_MAX_DIMS 8
#define SAFETENSORS_DTYPE_MAX 16            /* longest dtype string + NUL */

/* One tensor. Offsets are absolute file offsets (8 + N + data_offsets[0]). */
struct safetensors_tensor {
	const char *name;                 /* owned by the file */
	enum moe_dtype dtype;             /* MOE_DTYPE_INVALID for types moetier does not
	                                   * compute on (BOOL, F8_*, F6_*, F4, U16, ...) */
	char dtype_str[SAFETENSORS_DTYPE_MAX]; /* as written in the file, e.g. "F8_E4M3" */
	uint32_t dtype_bits;              /* bits per element (F4: 4, F6_*: 6, BOOL: 8) */
	uint32_t n_dims;                  /* 0 for a scalar */
	uint64_t shape[SAFETENSORS_MAX_DIMS]; /* PyTorch order: shape[n_dims-1] is contiguous */
	uint64_t n_elems;                 /* product of shape (1 for a scalar) */
	uint64_t offset;                  /* absolute offset of the first byte in the file */
	uint64_t bytes;                   /* n_elems * dtype_bits / 8 */
	uint32_t shard;                   /* index into safetensors_model.files (0 in a single file) */
};

struct safetensors_file {
	char *path;                       /* as given ("<buffer>" for safetensors_parse) */
	int fd;                           /* -1 when parsed from a buffer */
	uint64_t file_size;
	uint64_t header_len;              /* N */
	uint64_t data_start;              /* 8 + N */
	uint32_t n_tensors;
	struct safetensors_tensor *tensors; /* sorted by offset (file order) */
	uint32_t n_metadata;              /* __metadata__ pairs, in file order */
	char **meta_keys;
	char **meta_values;
	uint32_t *by_name;                /* private: tensor indices sorted by name */
};

/* Maps a safetensors dtype string (the Rust Dtype enum, case-sensitive) to
 * its width in bits and its moetier dtype (INVALID where none exists).
 * Returns false for an unknown string. */
bool safetensors_dtype_info(const char *s, uint32_t *bits, enum moe_dtype *dt);

/* Opens and validates one .safetensors file. The fd stays open for
 * safetensors_read. -EINVAL with a message naming the tensor and the rule on
 * malformed input, -errno on I/O errors. */
int safetensors_open(const char *path, struct safetensors_file **out, struct moe_error *err);

/* Parses and validates from memory (for tests and fuzzing): buf holds the
 * start of a file (at least 8 + N bytes; more is ignored) and file_size is the
 * length of the whole file, used for the "last END + 8 + N == file length"
 * rule. The result has fd -1 and cannot be read from. */
int safetensors_parse(const void *buf, size_t len, uint64_t file_size,
		      struct safetensors_file **out, struct moe_error *err);

void safetensors_close(struct safetensors_file *f);

/* O(log n) lookup by exact name; NULL if absent. */
const struct safetensors_tensor *safetensors_find(const struct safetensors_file *f, const char *name);
/* __metadata__ value for key, NULL if absent. */
const char *safetensors_metadata(const struct safetensors_file *f, const char *key);

/* Reads len bytes at offset off inside tensor t (off + len <= t->bytes) with
 * pread. Callers stream large tensors in pieces. -EINVAL on a range outside
 * the tensor or a buffer-parsed file, -EIO on a short file. */
int safetensors_read(const struct safetensors_file *f, const struct safetensors_tensor *t,
		     uint64_t off, void *buf, size_t len, struct moe_error *err);

/* A checkpoint: one file or a sharded set. */
struct safetensors_model {
	char *dir;                        /* directory of the shards */
	char *index_path;                 /* the index.json, NULL for a single file */
	uint32_t n_files;
	struct safetensors_file **files;  /* each shard opened once, sorted by file name */
	uint32_t n_tensors;               /* across all shards */
	const struct safetensors_tensor **tensors; /* sorted by name */
	uint64_t total_bytes;             /* sum of tensor bytes */
};

/* Opens a checkpoint. path is
 *  - a directory holding model.safetensors.index.json or model.safetensors
 *    (the index wins when both exist),
 *  - a .safetensors file, or
 *  - an index .json file: {"metadata": {...}, "weight_map": {tensor: shard}}.
 * Index rules: shard names are plain file names (no '/', not "." or ".."),
 * every shard exists and is valid, every tensor listed is in its shard, no
 * tensor is in two shards, and every tensor of a shard is listed. */
int safetensors_model_open(const char *path, struct safetensors_model **out, struct moe_error *err);
void safetensors_model_close(struct safetensors_model *m);

/* Finds a tensor across shards (O(log n)); NULL if absent. */
const struct safetensors_tensor *safetensors_model_find(const struct safetensors_model *m,
							 const char *name);
/* The shard that holds t. */
static inline const struct safetensors_file *safetensors_model_file(const struct safetensors_model *m,
								    const struct safetensors_tensor *t)
{
	return m->files[t->shard];
}
/* safetensors_read on the shard that holds t. */
int safetensors_model_read(const struct safetensors_model *m, const struct safetensors_tensor *t,
			   uint64_t off, void *buf, size_t len, struct moe_error *err);

#endif
