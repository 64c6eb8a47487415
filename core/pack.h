/* pack.h - the .moepack file: one aligned, checksummed extent per routed expert.
 *
 * Layout (all integers little-endian, every region 4 KiB aligned):
 *
 *   [0, 4096)           struct pack_header_disk (version 2 also holds the
 *                       per-layer expert layouts and the layer -> layout map)
 *   index_offset        struct pack_index_entry[n_moe_layers * n_experts]
 *                       (entry for MoE layer l, expert e at l * n_experts + e)
 *   extents             one per expert: parts back to back as described by
 *                       parts[] (e.g. gate | up | down), padded to 4 KiB, so
 *                       that one O_DIRECT read of extent_bytes fetches it
 *   resident_offset     resident tensors, each 64 B aligned: router weights,
 *                       router/score biases, shared experts (MoLAE shared
 *                       matrices) and, in whole-model packs, every other
 *                       non-expert tensor (embeddings, norms, attention,
 *                       output head: PACK_ROLE_OTHER, GGUF names) plus the
 *                       source's metadata as PACK_KV_TENSOR
 *   tensor_dir_offset   struct pack_tensor_entry[n_tensors]
 *
 * Integrity: the header carries the CRC32C of itself (with header_crc = 0),
 * of the index and of the tensor directory; each index entry carries the
 * CRC32C of its extent's `length` payload bytes (padding excluded, must be 0);
 * each tensor entry the CRC32C of its bytes.
 */
#ifndef MOETIER_PACK_H
#define MOETIER_PACK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "model.h"
#include "util.h"

#define PACK_MAGIC "MOEPACK\x01"
/* Version 1: one part table (parts[]) for every MoE layer. Version 2: the
 * layers' experts differ (llama.cpp's Q*_K_M files give ffn_down more bits in
 * some layers): up to PACK_MAX_LAYOUTS part tables (layouts[]) and a map from
 * MoE layer to table; parts[] is unused (n_parts 0), so that readers of the
 * one table refuse the file instead of misreading it. The writer makes
 * version 1 whenever one table serves every layer. */
#define PACK_VERSION 2
#define PACK_VERSION_UNIFORM 1
#define PACK_MAX_LAYOUTS 8
#define PACK_MAX_LAYER_MAP 1024 /* MoE layers (moe_model_validate: n_layers <= 1024) */
#define PACK_ALIGN 4096u
#define PACK_HEADER_SIZE 4096u
#define PACK_MAX_PARTS 8
#define PACK_TENSOR_NAME_MAX 96
#define PACK_RESIDENT_ALIGN 64u
/* Resident U8 [len] tensor of whole-model packs: a GGUF v3 image with no
 * tensors holding the source's KV pairs in order (llama.cpp's keys:
 * hyper-parameters, tokenizer). See pack_open_kv. */
#define PACK_KV_TENSOR "gguf.kv"

struct gguf_file;

/* Role of a tensor inside an expert extent or in the resident region.
 * Stored in packs: append only. */
enum pack_role {
	PACK_ROLE_NONE = 0,
	/* expert parts */
	PACK_ROLE_GATE = 1,         /* [m x n] */
	PACK_ROLE_UP = 2,           /* [m x n] */
	PACK_ROLE_DOWN = 3,         /* [n x m] */
	PACK_ROLE_GATE_UP = 4,      /* GPT-OSS: [2m x n], rows interleaved gate0, up0, gate1, up1... */
	PACK_ROLE_GATE_UP_BIAS = 5, /* GPT-OSS: [2m], interleaved like the rows */
	PACK_ROLE_DOWN_BIAS = 6,    /* GPT-OSS: [n] */
	PACK_ROLE_LATENT_A = 7,     /* MoLAE per-expert matrices (reserved) */
	PACK_ROLE_LATENT_A_GATE = 8, /* MoLAE A_gate_i [m x r]: W_gate_i ~ A_gate_i B_gate_g (tools/molae.h) */
	PACK_ROLE_LATENT_A_UP = 9,   /* MoLAE A_up_i [m x r] */
	/* resident tensors */
	PACK_ROLE_ROUTER = 32,          /* [E x n] */
	PACK_ROLE_ROUTER_BIAS = 33,     /* [E] (GPT-OSS) */
	PACK_ROLE_SCORE_BIAS = 34,      /* [E] (DeepSeek-V3 e_score_correction_bias) */
	PACK_ROLE_SHARED_GATE = 35,     /* [shared_width x n] */
	PACK_ROLE_SHARED_UP = 36,
	PACK_ROLE_SHARED_DOWN = 37,     /* [n x shared_width] */
	PACK_ROLE_SHARED_EXPERT_GATE = 38, /* Qwen2-MoE [1 x n] */
	/* MoLAE packs (tools/molae.h); layer = model layer index */
	PACK_ROLE_LATENT_B_GATE = 39,   /* [r x n] per (layer, group), orthonormal rows: "blk.L.molae_b_gate.G" */
	PACK_ROLE_LATENT_B_UP = 40,     /* [r x n]: "blk.L.molae_b_up.G" */
	PACK_ROLE_LATENT_GROUPS = 41,   /* I32 [E]: group of each expert: "blk.L.molae_groups" */
	PACK_ROLE_LATENT_REPORT = 42,   /* U8 JSON: rank, groups, per-layer errors (layer UINT32_MAX) */
	PACK_ROLE_OTHER = 63,
};

/* One tensor of an expert extent. All experts of a pack share these. */
struct pack_part_desc {
	uint32_t role;   /* enum pack_role */
	uint32_t dtype;  /* enum moe_dtype */
	uint32_t rows;   /* output features (1 for a bias) */
	uint32_t cols;   /* input features (the contiguous dimension) */
	uint64_t offset; /* byte offset inside the extent */
	uint64_t bytes;  /* rows * row_bytes(dtype, cols) */
};
_Static_assert(sizeof(struct pack_part_desc) == 32, "part layout");

/* The parts of one kind of expert extent (version 2: one per distinct
 * layer layout). A layer whose payload is smaller than the pack's
 * extent_payload has zero bytes from payload to extent_payload (covered by
 * the extent's CRC), so that every extent has the same length and read
 * size whatever its layer. */
struct pack_layout_disk {
	uint32_t n_parts;  /* 1..PACK_MAX_PARTS */
	uint32_t reserved; /* 0 */
	uint64_t payload;  /* sum of the parts' bytes */
	struct pack_part_desc parts[PACK_MAX_PARTS];
};
_Static_assert(sizeof(struct pack_layout_disk) == 272, "layout layout");

struct pack_header_disk {
	char magic[8];                 /* PACK_MAGIC */
	uint32_t version;              /* PACK_VERSION */
	uint32_t header_size;          /* PACK_HEADER_SIZE */
	uint32_t header_crc;           /* CRC32C of these 4096 bytes with this field 0 */
	uint32_t flags;                /* reserved, 0 */
	struct moe_model_config model;
	uint32_t n_parts;
	uint32_t reserved0;
	struct pack_part_desc parts[PACK_MAX_PARTS];
	uint64_t extent_payload;       /* sum of part bytes (v2: the largest layout's) */
	uint64_t extent_bytes;         /* payload rounded up to PACK_ALIGN: the read size */
	uint64_t index_offset;
	uint64_t index_count;          /* n_moe_layers * n_experts */
	uint32_t index_crc;
	uint32_t tensor_dir_crc;
	uint64_t resident_offset;
	uint64_t resident_bytes;
	uint64_t tensor_dir_offset;
	uint64_t n_tensors;
	uint64_t file_size;            /* expected total length */
	char source[64];               /* "safetensors", "gguf", ... (informational) */
	/* version 2 only (version 1: zero) */
	uint32_t n_layouts;            /* 2..PACK_MAX_LAYOUTS */
	uint32_t reserved1;            /* 0 */
	struct pack_layout_disk layouts[PACK_MAX_LAYOUTS]; /* unused entries zero */
	uint8_t layer_layout[PACK_MAX_LAYER_MAP]; /* MoE layer l: layouts[layer_layout[l]]; beyond n_moe_layers 0 */
	uint8_t pad[];                 /* to PACK_HEADER_SIZE, zero */
};
_Static_assert(sizeof(struct pack_header_disk) <= PACK_HEADER_SIZE, "header fits");

struct pack_index_entry {
	uint64_t offset;  /* file offset of the extent, multiple of PACK_ALIGN */
	uint64_t length;  /* payload bytes (== extent_payload) */
	uint32_t crc32c;  /* of the payload */
	uint32_t layer;   /* MoE layer index (redundant, checked) */
	uint32_t expert;  /* expert id (redundant, checked) */
	uint32_t flags;   /* reserved, 0 */
};
_Static_assert(sizeof(struct pack_index_entry) == 32, "index entry layout");

struct pack_tensor_entry {
	char name[PACK_TENSOR_NAME_MAX]; /* source tensor name, NUL-terminated */
	uint32_t role;    /* enum pack_role */
	uint32_t dtype;   /* enum moe_dtype */
	uint32_t layer;   /* model layer index, or UINT32_MAX for none */
	uint32_t n_dims;  /* 1..4 */
	uint64_t shape[4]; /* PyTorch order (outermost first) */
	uint64_t offset;  /* file offset, multiple of PACK_RESIDENT_ALIGN */
	uint64_t bytes;
	uint32_t crc32c;
	uint32_t reserved;  /* 0 */
	uint32_t reserved2[2]; /* 0; pads the entry to 176 bytes */
};
_Static_assert(sizeof(struct pack_tensor_entry) == 176, "tensor entry layout");

/* ---- reading ------------------------------------------------------------ */

struct pack_file {
	int fd;                     /* buffered, O_RDONLY|O_CLOEXEC */
	int fd_direct;              /* O_DIRECT, or -1 where the filesystem refuses it */
	char *path;
	uint64_t file_size;
	struct pack_header_disk *hdr;  /* validated copy (PACK_HEADER_SIZE bytes) */
	const struct moe_model_config *model; /* == &hdr->model */
	struct pack_index_entry *index;       /* [index_count], validated */
	struct pack_tensor_entry *tensors;    /* [n_tensors], validated */
	struct pack_layout_disk layout1;      /* version 1: its parts as the one layout */
};

enum pack_open_flags {
	PACK_OPEN_NO_DIRECT = 1 << 0, /* do not open the O_DIRECT descriptor */
};

/* Opens and validates header, index and tensor directory (bounds, alignment,
 * overlaps, CRCs of the metadata). Extents are checked when read.
 * Returns 0 or a negative errno with a message naming what is wrong. */
int pack_open(const char *path, unsigned flags, struct pack_file **out, struct moe_error *err);
void pack_close(struct pack_file *p);

/* Index entry of (MoE layer l, expert e), or NULL when out of range. */
const struct pack_index_entry *pack_expert(const struct pack_file *p, uint32_t l, uint32_t e);
/* Bytes to read for one expert (a multiple of PACK_ALIGN). */
static inline uint64_t pack_extent_bytes(const struct pack_file *p) { return p->hdr->extent_bytes; }
/* The part of the given role in the one part table of a version 1 pack, or
 * NULL (also for every role of a version 2 pack: use pack_layer_part). */
const struct pack_part_desc *pack_part(const struct pack_file *p, enum pack_role role);
/* The layout of MoE layer l's experts (version 1: the one table), or NULL
 * when l is out of range. layout->payload <= pack's extent_payload. */
const struct pack_layout_disk *pack_layer_layout(const struct pack_file *p, uint32_t l);
/* The part of the given role in MoE layer l's layout, or NULL. */
const struct pack_part_desc *pack_layer_part(const struct pack_file *p, uint32_t l, enum pack_role role);
/* Whether every MoE layer has the same layout (version 1). */
static inline bool pack_uniform(const struct pack_file *p) { return p->hdr->version == PACK_VERSION_UNIFORM; }
/* "gate", "up", "down", "gate_up", ..., "router", "shared_gate", ... or "unknown". */
const char *pack_role_name(enum pack_role r);

/* Checks a payload already in memory (the first `length` bytes of buf)
 * against the index: 0, or -EBADMSG naming "layer L expert E". */
int pack_check_expert(const struct pack_file *p, uint32_t l, uint32_t e, const void *buf, struct moe_error *err);
/* Reads one expert into buf (at least pack_extent_bytes(p) bytes; 4 KiB
 * aligned when O_DIRECT is used) and checks its CRC. Simple synchronous path
 * for tools and tests; the daemon uses tier_nvme. */
int pack_read_expert(const struct pack_file *p, uint32_t l, uint32_t e, void *buf, struct moe_error *err);

/* Resident tensors. */
const struct pack_tensor_entry *pack_find_tensor(const struct pack_file *p, const char *name);
const struct pack_tensor_entry *pack_find_role(const struct pack_file *p, enum pack_role role, uint32_t layer);
/* Reads a resident tensor (t->bytes into buf) and checks its CRC. */
int pack_read_tensor(const struct pack_file *p, const struct pack_tensor_entry *t, void *buf, struct moe_error *err);

/* Reads PACK_KV_TENSOR (CRC checked) into a new buffer *buf and parses it
 * with gguf_parse into *kv (gguf_find_kv / gguf_get_* then read the model's
 * metadata). The caller releases both: gguf_close(*kv), then free(*buf).
 * -ENOENT when the pack has none (made with --experts-only, or from
 * safetensors without a synthesized one); -EBADMSG / -EINVAL when it is
 * damaged or does not parse. */
int pack_open_kv(const struct pack_file *p, void **buf, struct gguf_file **kv, struct moe_error *err);

/* Re-reads every extent and resident tensor, checking every checksum.
 * Calls report (when non-NULL) for each failure with a message naming the
 * layer/expert or tensor. Returns the number of failures (>= 0) or a negative
 * errno when the file cannot be read at all. */
typedef void (*pack_report_fn)(void *ctx, const char *what);
long pack_verify(const struct pack_file *p, pack_report_fn report, void *ctx, struct moe_error *err);

/* ---- writing ------------------------------------------------------------ */

struct pack_writer;

/* Starts a pack for path, written under a temporary name (path.XXXXXX) in
 * the same directory and renamed over path by pack_writer_finish, for a
 * model whose experts have the given parts (offsets are filled in by the
 * writer). Experts may be added in any order; every (layer, expert) must be
 * added exactly once before pack_writer_finish. */
int pack_writer_create(const char *path, const struct moe_model_config *model,
		       const struct pack_part_desc *parts, uint32_t n_parts, const char *source,
		       struct pack_writer **out, struct moe_error *err);
/* The same for experts whose parts differ between layers: n_layouts tables
 * (parts and n_parts filled; offsets, bytes and payload are computed) and
 * layer_layout[n_moe_layers] naming each MoE layer's table. One table (or
 * tables all equal) makes a version 1 pack, else version 2. An expert of
 * layer l is written as its layout's parts; end_expert zero-fills it to the
 * largest layout's payload. */
int pack_writer_create_layers(const char *path, const struct moe_model_config *model,
			      const struct pack_layout_disk *layouts, uint32_t n_layouts, const uint8_t *layer_layout,
			      const char *source, struct pack_writer **out, struct moe_error *err);
/* Streams one expert: begin, then write its parts in parts[] order in any
 * number of chunks, then end. Never buffers more than one chunk. */
int pack_writer_begin_expert(struct pack_writer *w, uint32_t l, uint32_t e, struct moe_error *err);
int pack_writer_write(struct pack_writer *w, const void *buf, size_t len, struct moe_error *err);
int pack_writer_end_expert(struct pack_writer *w, struct moe_error *err);
/* Streams one resident tensor the same way. desc->offset and crc32c are
 * filled in by the writer; desc->bytes may be 0 (computed from the shape). */
int pack_writer_begin_tensor(struct pack_writer *w, const struct pack_tensor_entry *desc, struct moe_error *err);
int pack_writer_end_tensor(struct pack_writer *w, struct moe_error *err);
/* Writes the index, tensor directory and header (last); fsyncs; closes;
 * renames the file to its final path. Fails if any expert was never
 * written. Always frees the writer; on failure the file is removed. */
int pack_writer_finish(struct pack_writer *w, struct moe_error *err);
/* Abandons the file (removes the temporary file; path is left as it was). */
void pack_writer_abort(struct pack_writer *w);

#endif
