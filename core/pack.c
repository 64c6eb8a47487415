/* pack.c - the .moepack file: strict reader, streaming writer, verifier.
 *
 * Everything in a pack is untrusted until pack_open has checked it: every
 * size is overflow-checked, every region must lie inside the file, be aligned
 * and not overlap another one, and the metadata CRCs must match, so that the
 * daemon can later read an extent with a single O_DIRECT pread of
 * extent_bytes without looking at anything else. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* O_DIRECT */
#endif
#include "config.h"
#include "pack.h"
#include "crc32c.h"
#include "gguf.h"

#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_PART_DIM (1u << 22)      /* rows or cols of one expert part */
#define MAX_TENSORS (1u << 20)       /* resident tensors in one pack */
#define VERIFY_BUF_BYTES (16u << 20) /* sequential verify reads this much at once */

/* ---- shared validation ------------------------------------------------- */

static bool is_part_role(uint32_t r)
{
	return r >= PACK_ROLE_GATE && r <= PACK_ROLE_LATENT_A_UP;
}

static bool is_resident_role(uint32_t r)
{
	return (r >= PACK_ROLE_ROUTER && r <= PACK_ROLE_LATENT_REPORT) || r == PACK_ROLE_OTHER;
}

static bool dtype_ok(uint32_t t)
{
	return t > MOE_DTYPE_INVALID && t < MOE_DTYPE_COUNT;
}

const char *pack_role_name(enum pack_role r)
{
	switch (r) {
	case PACK_ROLE_GATE: return "gate";
	case PACK_ROLE_UP: return "up";
	case PACK_ROLE_DOWN: return "down";
	case PACK_ROLE_GATE_UP: return "gate_up";
	case PACK_ROLE_GATE_UP_BIAS: return "gate_up_bias";
	case PACK_ROLE_DOWN_BIAS: return "down_bias";
	case PACK_ROLE_LATENT_A: return "latent_a";
	case PACK_ROLE_LATENT_A_GATE: return "latent_a_gate";
	case PACK_ROLE_LATENT_A_UP: return "latent_a_up";
	case PACK_ROLE_LATENT_B_GATE: return "latent_b_gate";
	case PACK_ROLE_LATENT_B_UP: return "latent_b_up";
	case PACK_ROLE_LATENT_GROUPS: return "latent_groups";
	case PACK_ROLE_LATENT_REPORT: return "latent_report";
	case PACK_ROLE_ROUTER: return "router";
	case PACK_ROLE_ROUTER_BIAS: return "router_bias";
	case PACK_ROLE_SCORE_BIAS: return "score_bias";
	case PACK_ROLE_SHARED_GATE: return "shared_gate";
	case PACK_ROLE_SHARED_UP: return "shared_up";
	case PACK_ROLE_SHARED_DOWN: return "shared_down";
	case PACK_ROLE_SHARED_EXPERT_GATE: return "shared_expert_gate";
	case PACK_ROLE_OTHER: return "other";
	case PACK_ROLE_NONE: break;
	}
	return "unknown";
}

/* The [rows x cols] a standard part must have for this model; false when the
 * role has no fixed shape (MoLAE matrices). */
static bool part_expected_shape(const struct moe_model_config *m, uint32_t role, uint64_t *rows, uint64_t *cols)
{
	uint64_t n = m->hidden, w = m->expert_width;
	switch (role) {
	case PACK_ROLE_GATE:
	case PACK_ROLE_UP: *rows = w; *cols = n; return true;
	case PACK_ROLE_DOWN: *rows = n; *cols = w; return true;
	case PACK_ROLE_GATE_UP: *rows = 2 * w; *cols = n; return true;
	case PACK_ROLE_GATE_UP_BIAS: *rows = 1; *cols = 2 * w; return true;
	case PACK_ROLE_DOWN_BIAS: *rows = 1; *cols = n; return true;
	default: return false;
	}
}

/* Checks parts[] against the model. With fill_offsets the offsets and byte
 * counts are computed (writer), otherwise they must match (reader). */
static int check_parts(const struct moe_model_config *m, struct pack_part_desc *parts, uint32_t n_parts,
		       bool fill_offsets, uint64_t *payload_out, struct moe_error *err)
{
	uint64_t off = 0;
	if (n_parts == 0 || n_parts > PACK_MAX_PARTS)
		return moe_error_set(err, -EINVAL, "part count %u out of range (1..%u)", n_parts, PACK_MAX_PARTS);
	for (uint32_t i = 0; i < n_parts; i++) {
		struct pack_part_desc *p = &parts[i];
		uint64_t rb, bytes, er, ec;
		if (!is_part_role(p->role))
			return moe_error_set(err, -EINVAL, "part %u: unknown role %u", i, p->role);
		for (uint32_t j = 0; j < i; j++)
			if (parts[j].role == p->role && p->role != PACK_ROLE_LATENT_A)
				return moe_error_set(err, -EINVAL, "part %u: role %s appears twice", i,
						     pack_role_name(p->role));
		if (!dtype_ok(p->dtype))
			return moe_error_set(err, -EINVAL, "part %u (%s): unknown dtype %u", i, pack_role_name(p->role),
					     p->dtype);
		if (p->rows == 0 || p->rows > MAX_PART_DIM || p->cols == 0 || p->cols > MAX_PART_DIM)
			return moe_error_set(err, -EINVAL, "part %u (%s): shape [%u x %u] out of range", i,
					     pack_role_name(p->role), p->rows, p->cols);
		if (part_expected_shape(m, p->role, &er, &ec) && (p->rows != er || p->cols != ec))
			return moe_error_set(err, -EINVAL,
					     "part %u (%s): shape [%u x %u] does not match the model (expected [%" PRIu64
					     " x %" PRIu64 "])",
					     i, pack_role_name(p->role), p->rows, p->cols, er, ec);
		if (!moe_dtype_row_bytes(p->dtype, p->cols, &rb) || !moe_mul_u64(rb, p->rows, &bytes))
			return moe_error_set(err, -EINVAL, "part %u (%s): %u columns are not whole %s blocks", i,
					     pack_role_name(p->role), p->cols, moe_dtype_name(p->dtype));
		if (fill_offsets) {
			p->offset = off;
			p->bytes = bytes;
		} else {
			if (p->bytes != bytes)
				return moe_error_set(err, -EINVAL,
						     "part %u (%s): %" PRIu64 " bytes, but [%u x %u] %s needs %" PRIu64, i,
						     pack_role_name(p->role), p->bytes, p->rows, p->cols,
						     moe_dtype_name(p->dtype), bytes);
			if (p->offset != off)
				return moe_error_set(err, -EINVAL,
						     "part %u (%s): offset %" PRIu64 " in the extent, expected %" PRIu64
						     " (parts must be contiguous, in order)",
						     i, pack_role_name(p->role), p->offset, off);
		}
		if (!moe_add_u64(off, bytes, &off))
			return moe_error_set(err, -EOVERFLOW, "part sizes overflow");
	}
	*payload_out = off;
	return 0;
}

/* Bytes of a tensor described by (dtype, n_dims, shape); the last dimension
 * is the contiguous one and must be whole blocks. */
static int tensor_bytes(const struct pack_tensor_entry *t, uint64_t *out, struct moe_error *err)
{
	uint64_t rows = 1, rb;
	if (memchr(t->name, '\0', sizeof(t->name)) == NULL)
		return moe_error_set(err, -EINVAL, "tensor name is not NUL-terminated");
	if (t->name[0] == '\0')
		return moe_error_set(err, -EINVAL, "tensor with an empty name");
	if (!is_resident_role(t->role))
		return moe_error_set(err, -EINVAL, "tensor %s: unknown role %u", t->name, t->role);
	if (!dtype_ok(t->dtype))
		return moe_error_set(err, -EINVAL, "tensor %s: unknown dtype %u", t->name, t->dtype);
	if (t->n_dims < 1 || t->n_dims > 4)
		return moe_error_set(err, -EINVAL, "tensor %s: %u dimensions (1..4 allowed)", t->name, t->n_dims);
	for (uint32_t d = t->n_dims; d < 4; d++)
		if (t->shape[d] != 0)
			return moe_error_set(err, -EINVAL, "tensor %s: unused dimension %u is not 0", t->name, d);
	for (uint32_t d = 0; d + 1 < t->n_dims; d++)
		if (!moe_mul_u64(rows, t->shape[d], &rows))
			return moe_error_set(err, -EOVERFLOW, "tensor %s: shape overflows", t->name);
	if (!moe_dtype_row_bytes(t->dtype, t->shape[t->n_dims - 1], &rb))
		return moe_error_set(err, -EINVAL, "tensor %s: last dimension %" PRIu64 " is not whole %s blocks",
				     t->name, t->shape[t->n_dims - 1], moe_dtype_name(t->dtype));
	if (!moe_mul_u64(rows, rb, out))
		return moe_error_set(err, -EOVERFLOW, "tensor %s: size overflows", t->name);
	return 0;
}

/* ---- reader ------------------------------------------------------------ */

struct region {
	uint64_t start, end; /* [start, end) */
	int64_t idx;         /* index entry, or -1 - (metadata region id) */
};

static int cmp_region(const void *a, const void *b)
{
	const struct region *x = a, *y = b;
	if (x->start != y->start)
		return x->start < y->start ? -1 : 1;
	if (x->end != y->end)
		return x->end < y->end ? -1 : 1;
	return (x->idx > y->idx) - (x->idx < y->idx); /* deterministic messages */
}

static const char *const meta_names[] = { "header", "index", "resident region", "tensor directory" };

static void region_name(const struct pack_file *p, const struct region *r, char *buf, size_t len)
{
	if (r->idx < 0) {
		snprintf(buf, len, "%s", meta_names[-1 - r->idx]);
	} else {
		const struct pack_index_entry *e = &p->index[r->idx];
		snprintf(buf, len, "extent of layer %u expert %u", e->layer, e->expert);
	}
}

/* Every extent and metadata region must be disjoint. */
static int check_overlaps(const struct pack_file *p, uint64_t index_bytes, uint64_t dir_bytes, struct moe_error *err)
{
	const struct pack_header_disk *h = p->hdr;
	uint64_t n = h->index_count + 4, k = 0;
	struct region *r = calloc(n, sizeof(*r));
	int rc = 0;
	if (!r)
		return moe_error_set(err, -ENOMEM, "out of memory");
	r[k++] = (struct region){ 0, PACK_HEADER_SIZE, -1 };
	r[k++] = (struct region){ h->index_offset, h->index_offset + index_bytes, -2 };
	if (h->resident_bytes)
		r[k++] = (struct region){ h->resident_offset, h->resident_offset + h->resident_bytes, -3 };
	if (dir_bytes)
		r[k++] = (struct region){ h->tensor_dir_offset, h->tensor_dir_offset + dir_bytes, -4 };
	for (uint64_t i = 0; i < h->index_count; i++)
		r[k++] = (struct region){ p->index[i].offset, p->index[i].offset + h->extent_bytes, (int64_t)i };
	qsort(r, k, sizeof(*r), cmp_region);
	for (uint64_t i = 1; i < k; i++) {
		if (r[i].start < r[i - 1].end) {
			char a[96], b[96];
			region_name(p, &r[i - 1], a, sizeof(a));
			region_name(p, &r[i], b, sizeof(b));
			rc = moe_error_set(err, -EINVAL,
					   "%s [%" PRIu64 ", %" PRIu64 ") overlaps %s [%" PRIu64 ", %" PRIu64 ")", b,
					   r[i].start, r[i].end, a, r[i - 1].start, r[i - 1].end);
			break;
		}
	}
	free(r);
	return rc;
}

static int cmp_tensor_off(const void *a, const void *b)
{
	const struct pack_tensor_entry *x = *(const struct pack_tensor_entry *const *)a;
	const struct pack_tensor_entry *y = *(const struct pack_tensor_entry *const *)b;
	return (x->offset > y->offset) - (x->offset < y->offset);
}

static int cmp_tensor_name(const void *a, const void *b)
{
	const struct pack_tensor_entry *x = *(const struct pack_tensor_entry *const *)a;
	const struct pack_tensor_entry *y = *(const struct pack_tensor_entry *const *)b;
	return strcmp(x->name, y->name);
}

/* Resident tensors: each inside the resident region, aligned, disjoint,
 * uniquely named. */
static int check_tensors(const struct pack_file *p, struct moe_error *err)
{
	const struct pack_header_disk *h = p->hdr;
	uint64_t res_end = h->resident_offset + h->resident_bytes;
	const struct pack_tensor_entry **v;
	int rc = 0;

	if (h->n_tensors == 0)
		return 0;
	for (uint64_t i = 0; i < h->n_tensors; i++) {
		const struct pack_tensor_entry *t = &p->tensors[i];
		uint64_t bytes, end;
		rc = tensor_bytes(t, &bytes, err);
		if (rc < 0)
			return moe_error_prefix(err, rc, "tensor directory entry %" PRIu64, i);
		if (t->bytes != bytes)
			return moe_error_set(err, -EINVAL, "tensor %s: %" PRIu64 " bytes, but its shape and %s need %" PRIu64,
					     t->name, t->bytes, moe_dtype_name(t->dtype), bytes);
		if (t->layer != UINT32_MAX && t->layer >= h->model.n_layers)
			return moe_error_set(err, -EINVAL, "tensor %s: layer %u beyond the model's %u layers", t->name,
					     t->layer, h->model.n_layers);
		if (t->offset % PACK_RESIDENT_ALIGN)
			return moe_error_set(err, -EINVAL, "tensor %s: offset %" PRIu64 " is not %u-byte aligned", t->name,
					     t->offset, PACK_RESIDENT_ALIGN);
		if (t->offset < h->resident_offset || !moe_add_u64(t->offset, bytes, &end) || end > res_end)
			return moe_error_set(err, -EINVAL,
					     "tensor %s: bytes [%" PRIu64 ", +%" PRIu64 ") lie outside the resident region [%" PRIu64
					     ", %" PRIu64 ")",
					     t->name, t->offset, bytes, h->resident_offset, res_end);
		if (t->reserved || t->reserved2[0] || t->reserved2[1])
			return moe_error_set(err, -EINVAL, "tensor %s: reserved field is not 0", t->name);
	}
	v = malloc(h->n_tensors * sizeof(*v));
	if (!v)
		return moe_error_set(err, -ENOMEM, "out of memory");
	for (uint64_t i = 0; i < h->n_tensors; i++)
		v[i] = &p->tensors[i];
	qsort(v, h->n_tensors, sizeof(*v), cmp_tensor_off);
	for (uint64_t i = 1; i < h->n_tensors && !rc; i++)
		if (v[i - 1]->offset + v[i - 1]->bytes > v[i]->offset)
			rc = moe_error_set(err, -EINVAL, "tensor %s overlaps tensor %s", v[i]->name, v[i - 1]->name);
	if (!rc) {
		qsort(v, h->n_tensors, sizeof(*v), cmp_tensor_name);
		for (uint64_t i = 1; i < h->n_tensors && !rc; i++)
			if (strcmp(v[i - 1]->name, v[i]->name) == 0)
				rc = moe_error_set(err, -EINVAL, "tensor name %s appears twice", v[i]->name);
	}
	free(v);
	return rc;
}

static bool all_zero(const void *buf, size_t len)
{
	const unsigned char *b = buf;
	for (size_t i = 0; i < len; i++)
		if (b[i])
			return false;
	return true;
}

/* Version 1: parts[] is the one table and the version 2 fields are zero.
 * Version 2: parts[] is empty, 2..PACK_MAX_LAYOUTS tables, each checked as
 * the one table of version 1 is, and every MoE layer maps to one. *payload:
 * the largest table's payload (what every extent holds). */
static int check_layouts(const struct pack_header_disk *h, uint64_t *payload, struct moe_error *err)
{
	const struct moe_model_config *m = &h->model;
	uint64_t pl;
	int rc;

	if (h->version == PACK_VERSION_UNIFORM) {
		if (h->n_layouts || h->reserved1 || !all_zero(h->layouts, sizeof(h->layouts)) ||
		    !all_zero(h->layer_layout, sizeof(h->layer_layout)))
			return moe_error_set(err, -EINVAL, "version 1 header with per-layer layout fields that are not 0");
		return check_parts(m, (struct pack_part_desc *)h->parts, h->n_parts, false, payload, err);
	}
	if (h->n_parts || !all_zero(h->parts, sizeof(h->parts)))
		return moe_error_set(err, -EINVAL, "version 2 header with a version 1 part table (n_parts %u)", h->n_parts);
	if (h->n_layouts < 2 || h->n_layouts > PACK_MAX_LAYOUTS || h->reserved1)
		return moe_error_set(err, -EINVAL, "layout count %u out of range (2..%u)", h->n_layouts, PACK_MAX_LAYOUTS);
	*payload = 0;
	for (uint32_t i = 0; i < PACK_MAX_LAYOUTS; i++) {
		const struct pack_layout_disk *L = &h->layouts[i];
		if (i >= h->n_layouts) {
			if (!all_zero(L, sizeof(*L)))
				return moe_error_set(err, -EINVAL, "unused layout %u is not 0", i);
			continue;
		}
		if (L->reserved)
			return moe_error_set(err, -EINVAL, "layout %u: reserved field is not 0", i);
		rc = check_parts(m, (struct pack_part_desc *)L->parts, L->n_parts, false, &pl, err);
		if (rc < 0)
			return moe_error_prefix(err, rc, "layout %u", i);
		if (!all_zero(L->parts + L->n_parts, (PACK_MAX_PARTS - L->n_parts) * sizeof(L->parts[0])))
			return moe_error_set(err, -EINVAL, "layout %u: unused part entries are not 0", i);
		if (L->payload != pl)
			return moe_error_set(err, -EINVAL, "layout %u: payload %" PRIu64 " bytes, but its parts add up to %" PRIu64,
					     i, L->payload, pl);
		*payload = MOE_MAX(*payload, pl);
	}
	for (uint32_t l = 0; l < PACK_MAX_LAYER_MAP; l++) {
		if (l < m->n_moe_layers && h->layer_layout[l] >= h->n_layouts)
			return moe_error_set(err, -EINVAL, "MoE layer %u: layout %u of %u", l, h->layer_layout[l], h->n_layouts);
		if (l >= m->n_moe_layers && h->layer_layout[l])
			return moe_error_set(err, -EINVAL, "layer map entry %u beyond the %u MoE layers is not 0", l,
					     m->n_moe_layers);
	}
	return 0;
}

static int check_header(const struct pack_header_disk *h, uint64_t real_size, struct moe_error *err)
{
	struct pack_header_disk *c;
	uint64_t payload, v;
	int rc;

	if (memcmp(h->magic, PACK_MAGIC, 8) != 0)
		return moe_error_set(err, -EINVAL, "not a moepack file (bad magic)");
	if (h->version != PACK_VERSION_UNIFORM && h->version != PACK_VERSION)
		return moe_error_set(err, -EINVAL, "unsupported pack version %u (this build reads %u and %u)", h->version,
				     PACK_VERSION_UNIFORM, PACK_VERSION);
	if (h->header_size != PACK_HEADER_SIZE)
		return moe_error_set(err, -EINVAL, "header size %u, expected %u", h->header_size, PACK_HEADER_SIZE);
	/* CRC over a copy with header_crc = 0 */
	c = malloc(PACK_HEADER_SIZE);
	if (!c)
		return moe_error_set(err, -ENOMEM, "out of memory");
	memcpy(c, h, PACK_HEADER_SIZE);
	c->header_crc = 0;
	uint32_t crc = crc32c(c, PACK_HEADER_SIZE);
	free(c);
	if (crc != h->header_crc)
		return moe_error_set(err, -EBADMSG, "header checksum mismatch (stored %08x, computed %08x)", h->header_crc,
				     crc);
	if (h->flags != 0 || h->reserved0 != 0)
		return moe_error_set(err, -EINVAL, "reserved header fields are not 0");
	if (memchr(h->source, '\0', sizeof(h->source)) == NULL)
		return moe_error_set(err, -EINVAL, "source field is not NUL-terminated");
	if (h->file_size != real_size)
		return moe_error_set(err, -EINVAL, "file is %" PRIu64 " bytes but the header says %" PRIu64 " (%s)",
				     real_size, h->file_size, real_size < h->file_size ? "truncated" : "trailing data");
	rc = moe_model_validate(&h->model, err);
	if (rc < 0)
		return moe_error_prefix(err, rc, "model config");
	rc = check_layouts(h, &payload, err);
	if (rc < 0)
		return rc;
	if (h->extent_payload != payload)
		return moe_error_set(err, -EINVAL, "extent payload %" PRIu64 " bytes, but the parts add up to %" PRIu64,
				     h->extent_payload, payload);
	if (h->extent_bytes != MOE_ALIGN_UP(payload, (uint64_t)PACK_ALIGN))
		return moe_error_set(err, -EINVAL, "extent size %" PRIu64 " is not the payload %" PRIu64 " rounded up to %u",
				     h->extent_bytes, payload, PACK_ALIGN);
	if (h->index_count != (uint64_t)h->model.n_moe_layers * h->model.n_experts)
		return moe_error_set(err, -EINVAL, "index has %" PRIu64 " entries, expected %u layers x %u experts",
				     h->index_count, h->model.n_moe_layers, h->model.n_experts);
	if (h->index_offset % PACK_ALIGN || h->index_offset < PACK_HEADER_SIZE ||
	    !moe_add_u64(h->index_offset, h->index_count * sizeof(struct pack_index_entry), &v) || v > real_size)
		return moe_error_set(err, -EINVAL, "index [%" PRIu64 ", +%" PRIu64 " entries) is misaligned or outside the file",
				     h->index_offset, h->index_count);
	if (h->resident_offset % PACK_ALIGN || h->resident_offset < PACK_HEADER_SIZE ||
	    !moe_add_u64(h->resident_offset, h->resident_bytes, &v) || v > real_size)
		return moe_error_set(err, -EINVAL,
				     "resident region [%" PRIu64 ", +%" PRIu64 ") is misaligned or outside the file",
				     h->resident_offset, h->resident_bytes);
	if (h->n_tensors > MAX_TENSORS)
		return moe_error_set(err, -EINVAL, "%" PRIu64 " resident tensors (at most %u)", h->n_tensors, MAX_TENSORS);
	if (h->tensor_dir_offset % PACK_ALIGN || h->tensor_dir_offset < PACK_HEADER_SIZE ||
	    !moe_add_u64(h->tensor_dir_offset, h->n_tensors * sizeof(struct pack_tensor_entry), &v) || v > real_size)
		return moe_error_set(err, -EINVAL,
				     "tensor directory [%" PRIu64 ", +%" PRIu64 " entries) is misaligned or outside the file",
				     h->tensor_dir_offset, h->n_tensors);
	return 0;
}

static int check_index(const struct pack_file *p, struct moe_error *err)
{
	const struct pack_header_disk *h = p->hdr;
	const struct moe_model_config *m = &h->model;
	for (uint64_t i = 0; i < h->index_count; i++) {
		const struct pack_index_entry *e = &p->index[i];
		uint32_t l = (uint32_t)(i / m->n_experts), x = (uint32_t)(i % m->n_experts);
		uint64_t end;
		if (e->layer != l || e->expert != x)
			return moe_error_set(err, -EINVAL,
					     "index entry %" PRIu64 " says layer %u expert %u, but its position is layer %u expert %u",
					     i, e->layer, e->expert, l, x);
		if (e->offset % PACK_ALIGN)
			return moe_error_set(err, -EINVAL, "layer %u expert %u: extent offset %" PRIu64 " is not %u-aligned", l,
					     x, e->offset, PACK_ALIGN);
		if (e->length != h->extent_payload)
			return moe_error_set(err, -EINVAL, "layer %u expert %u: extent length %" PRIu64 ", expected %" PRIu64, l,
					     x, e->length, h->extent_payload);
		if (!moe_add_u64(e->offset, h->extent_bytes, &end) || end > p->file_size)
			return moe_error_set(err, -EINVAL,
					     "layer %u expert %u: extent [%" PRIu64 ", +%" PRIu64 ") lies outside the %" PRIu64
					     "-byte file",
					     l, x, e->offset, h->extent_bytes, p->file_size);
		if (e->flags)
			return moe_error_set(err, -EINVAL, "layer %u expert %u: reserved flags are not 0", l, x);
	}
	return 0;
}

static int open_validate(struct pack_file *p, unsigned flags, struct moe_error *err)
{
	struct stat st;
	struct pack_header_disk *h;
	uint64_t index_bytes, dir_bytes;
	int rc;

	/* O_NONBLOCK: opening a FIFO must not wait for a writer; a regular
	 * file ignores the flag, and anything else is refused next. */
	p->fd = open(p->path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
	if (p->fd < 0)
		return moe_error_set(err, -errno, "cannot open: %s", strerror(errno));
	if (fstat(p->fd, &st) < 0)
		return moe_error_set(err, -errno, "cannot stat: %s", strerror(errno));
	if (!S_ISREG(st.st_mode))
		return moe_error_set(err, -EINVAL, "not a regular file");
	p->file_size = (uint64_t)st.st_size;
	if (p->file_size < PACK_HEADER_SIZE)
		return moe_error_set(err, -EINVAL, "truncated: %" PRIu64 " bytes, smaller than the %u-byte header",
				     p->file_size, PACK_HEADER_SIZE);
	if (posix_memalign((void **)&p->hdr, PACK_ALIGN, PACK_HEADER_SIZE))
		return moe_error_set(err, -ENOMEM, "out of memory");
	h = p->hdr;
	rc = moe_pread_full(p->fd, h, PACK_HEADER_SIZE, 0);
	if (rc < 0)
		return moe_error_set(err, rc, "cannot read the header: %s", strerror(-rc));
	rc = check_header(h, p->file_size, err);
	if (rc < 0)
		return rc;
	p->model = &h->model;
	if (h->version == PACK_VERSION_UNIFORM) {
		p->layout1.n_parts = h->n_parts;
		p->layout1.payload = h->extent_payload;
		memcpy(p->layout1.parts, h->parts, sizeof(h->parts));
	}

	index_bytes = h->index_count * sizeof(struct pack_index_entry);
	p->index = malloc(index_bytes);
	if (!p->index)
		return moe_error_set(err, -ENOMEM, "out of memory for %" PRIu64 " index entries", h->index_count);
	rc = moe_pread_full(p->fd, p->index, index_bytes, h->index_offset);
	if (rc < 0)
		return moe_error_set(err, rc, "cannot read the index: %s", strerror(-rc));
	uint32_t crc = crc32c(p->index, index_bytes);
	if (crc != h->index_crc)
		return moe_error_set(err, -EBADMSG, "index checksum mismatch (stored %08x, computed %08x)", h->index_crc,
				     crc);
	rc = check_index(p, err);
	if (rc < 0)
		return rc;

	dir_bytes = h->n_tensors * sizeof(struct pack_tensor_entry);
	p->tensors = malloc(dir_bytes ? dir_bytes : 1);
	if (!p->tensors)
		return moe_error_set(err, -ENOMEM, "out of memory");
	rc = moe_pread_full(p->fd, p->tensors, dir_bytes, h->tensor_dir_offset);
	if (rc < 0)
		return moe_error_set(err, rc, "cannot read the tensor directory: %s", strerror(-rc));
	crc = crc32c(p->tensors, dir_bytes);
	if (crc != h->tensor_dir_crc)
		return moe_error_set(err, -EBADMSG, "tensor directory checksum mismatch (stored %08x, computed %08x)",
				     h->tensor_dir_crc, crc);
	rc = check_tensors(p, err);
	if (rc < 0)
		return rc;
	rc = check_overlaps(p, index_bytes, dir_bytes, err);
	if (rc < 0)
		return rc;

	if (!(flags & PACK_OPEN_NO_DIRECT)) {
		/* A second descriptor for aligned reads; some filesystems refuse
		 * O_DIRECT, then everything goes through the page cache. */
		p->fd_direct = open(p->path, O_RDONLY | O_DIRECT | O_CLOEXEC);
		if (p->fd_direct >= 0) {
			struct stat st2;
			if (fstat(p->fd_direct, &st2) < 0 || st2.st_ino != st.st_ino || st2.st_dev != st.st_dev) {
				close(p->fd_direct);
				p->fd_direct = -1;
				return moe_error_set(err, -ESTALE, "file was replaced while being opened");
			}
		}
	}
	return 0;
}

int pack_open(const char *path, unsigned flags, struct pack_file **out, struct moe_error *err)
{
	struct pack_file *p = calloc(1, sizeof(*p));
	int rc;

	*out = NULL;
	if (!p)
		return moe_error_set(err, -ENOMEM, "out of memory");
	p->fd = -1;
	p->fd_direct = -1;
	p->path = strdup(path);
	if (!p->path) {
		free(p);
		return moe_error_set(err, -ENOMEM, "out of memory");
	}
	rc = open_validate(p, flags, err);
	if (rc < 0) {
		moe_error_prefix(err, rc, "%s", path);
		pack_close(p);
		return rc;
	}
	*out = p;
	return 0;
}

void pack_close(struct pack_file *p)
{
	if (!p)
		return;
	if (p->fd >= 0)
		close(p->fd);
	if (p->fd_direct >= 0)
		close(p->fd_direct);
	free(p->index);
	free(p->tensors);
	free(p->hdr);
	free(p->path);
	free(p);
}

const struct pack_index_entry *pack_expert(const struct pack_file *p, uint32_t l, uint32_t e)
{
	if (l >= p->model->n_moe_layers || e >= p->model->n_experts)
		return NULL;
	return &p->index[(uint64_t)l * p->model->n_experts + e];
}

const struct pack_part_desc *pack_part(const struct pack_file *p, enum pack_role role)
{
	for (uint32_t i = 0; i < p->hdr->n_parts; i++)
		if (p->hdr->parts[i].role == (uint32_t)role)
			return &p->hdr->parts[i];
	return NULL;
}

const struct pack_layout_disk *pack_layer_layout(const struct pack_file *p, uint32_t l)
{
	if (l >= p->model->n_moe_layers)
		return NULL;
	if (p->hdr->version == PACK_VERSION_UNIFORM)
		return &p->layout1;
	return &p->hdr->layouts[p->hdr->layer_layout[l]];
}

const struct pack_part_desc *pack_layer_part(const struct pack_file *p, uint32_t l, enum pack_role role)
{
	const struct pack_layout_disk *L = pack_layer_layout(p, l);
	for (uint32_t i = 0; L && i < L->n_parts; i++)
		if (L->parts[i].role == (uint32_t)role)
			return &L->parts[i];
	return NULL;
}

static int expert_fail(const struct pack_file *p, int rc, uint32_t l, uint32_t e, struct moe_error *err,
		       const char *fmt, ...) MOE_PRINTF(6, 7);
static int expert_fail(const struct pack_file *p, int rc, uint32_t l, uint32_t e, struct moe_error *err,
		       const char *fmt, ...)
{
	char what[400];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	return moe_error_set(err, rc, "layer %u (model layer %u) expert %u: %s", l, moe_model_layer_of(p->model, l), e,
			     what);
}

int pack_check_expert(const struct pack_file *p, uint32_t l, uint32_t e, const void *buf, struct moe_error *err)
{
	const struct pack_index_entry *x = pack_expert(p, l, e);
	if (!x)
		return moe_error_set(err, -EINVAL, "layer %u expert %u out of range (%u layers, %u experts)", l, e,
				     p->model->n_moe_layers, p->model->n_experts);
	uint32_t crc = crc32c(buf, x->length);
	if (crc != x->crc32c)
		return expert_fail(p, -EBADMSG, l, e, err, "checksum mismatch (stored %08x, computed %08x)", x->crc32c,
				   crc);
	return 0;
}

/* Offset of the first nonzero byte in buf[0..len), or -1. */
static int64_t first_nonzero(const void *buf, size_t len)
{
	const unsigned char *b = buf;
	for (size_t i = 0; i < len; i++)
		if (b[i])
			return (int64_t)i;
	return -1;
}

int pack_read_expert(const struct pack_file *p, uint32_t l, uint32_t e, void *buf, struct moe_error *err)
{
	const struct pack_index_entry *x = pack_expert(p, l, e);
	int rc = -EINVAL;
	if (!x)
		return moe_error_set(err, -EINVAL, "layer %u expert %u out of range (%u layers, %u experts)", l, e,
				     p->model->n_moe_layers, p->model->n_experts);
	if (p->fd_direct >= 0 && ((uintptr_t)buf % PACK_ALIGN) == 0)
		rc = moe_pread_full(p->fd_direct, buf, p->hdr->extent_bytes, x->offset);
	if (rc == -EINVAL) /* not aligned, or O_DIRECT refused for this request */
		rc = moe_pread_full(p->fd, buf, p->hdr->extent_bytes, x->offset);
	if (rc < 0)
		return expert_fail(p, rc, l, e, err, "read error: %s", strerror(-rc));
	rc = pack_check_expert(p, l, e, buf, err);
	if (rc < 0)
		return rc;
	/* after the layer's parts: zero (inside the payload when the layer's
	 * layout is smaller than the largest, then the 4 KiB padding) */
	uint64_t used = pack_layer_layout(p, l)->payload;
	int64_t nz = first_nonzero((const char *)buf + used, p->hdr->extent_bytes - used);
	if (nz >= 0)
		return expert_fail(p, -EBADMSG, l, e, err, "nonzero padding byte at extent offset %" PRIu64,
				   used + (uint64_t)nz);
	return 0;
}

const struct pack_tensor_entry *pack_find_tensor(const struct pack_file *p, const char *name)
{
	for (uint64_t i = 0; i < p->hdr->n_tensors; i++)
		if (strcmp(p->tensors[i].name, name) == 0)
			return &p->tensors[i];
	return NULL;
}

const struct pack_tensor_entry *pack_find_role(const struct pack_file *p, enum pack_role role, uint32_t layer)
{
	for (uint64_t i = 0; i < p->hdr->n_tensors; i++)
		if (p->tensors[i].role == (uint32_t)role && p->tensors[i].layer == layer)
			return &p->tensors[i];
	return NULL;
}

int pack_read_tensor(const struct pack_file *p, const struct pack_tensor_entry *t, void *buf, struct moe_error *err)
{
	int rc = moe_pread_full(p->fd, buf, t->bytes, t->offset);
	if (rc < 0)
		return moe_error_set(err, rc, "tensor %s: read error: %s", t->name, strerror(-rc));
	uint32_t crc = crc32c(buf, t->bytes);
	if (crc != t->crc32c)
		return moe_error_set(err, -EBADMSG, "tensor %s: checksum mismatch (stored %08x, computed %08x)", t->name,
				     t->crc32c, crc);
	return 0;
}

int pack_open_kv(const struct pack_file *p, void **buf, struct gguf_file **kv, struct moe_error *err)
{
	const struct pack_tensor_entry *t = pack_find_tensor(p, PACK_KV_TENSOR);
	void *b;
	int rc;

	*buf = NULL;
	*kv = NULL;
	if (!t)
		return moe_error_set(err, -ENOENT, "%s: no %s tensor (the pack holds the experts only; "
				     "convert the model again without --experts-only)", p->path, PACK_KV_TENSOR);
	if (t->dtype != MOE_DTYPE_U8 || t->n_dims != 1)
		return moe_error_set(err, -EINVAL, "%s: tensor %s is not a U8 vector", p->path, PACK_KV_TENSOR);
	b = malloc(t->bytes ? (size_t)t->bytes : 1);
	if (!b)
		return moe_error_set(err, -ENOMEM, "%s: out of memory for %s (%" PRIu64 " bytes)", p->path,
				     PACK_KV_TENSOR, t->bytes);
	rc = pack_read_tensor(p, t, b, err);
	if (rc == 0)
		rc = gguf_parse(b, (size_t)t->bytes, kv, err);
	if (rc < 0) {
		free(b);
		return moe_error_prefix(err, rc, "%s", p->path);
	}
	*buf = b;
	return 0;
}

/* ---- verify ------------------------------------------------------------ */

static void report_msg(pack_report_fn report, void *ctx, const struct moe_error *e)
{
	if (report)
		report(ctx, e->msg);
}

/* Checks one extent already in memory: payload CRC and zero padding. */
static int verify_extent(const struct pack_file *p, const struct pack_index_entry *x, const unsigned char *buf,
			 struct moe_error *err)
{
	int rc = pack_check_expert(p, x->layer, x->expert, buf, err);
	if (rc < 0)
		return rc;
	uint64_t used = pack_layer_layout(p, x->layer)->payload;
	int64_t nz = first_nonzero(buf + used, p->hdr->extent_bytes - used);
	if (nz >= 0)
		return expert_fail(p, -EBADMSG, x->layer, x->expert, err, "nonzero padding byte at extent offset %" PRIu64,
				   used + (uint64_t)nz);
	return 0;
}

static int cmp_entry_off(const void *a, const void *b)
{
	const struct pack_index_entry *x = *(const struct pack_index_entry *const *)a;
	const struct pack_index_entry *y = *(const struct pack_index_entry *const *)b;
	return (x->offset > y->offset) - (x->offset < y->offset);
}

/* Reads len bytes at off, through O_DIRECT when possible so that verifying a
 * large pack does not fill the page cache. */
static int verify_read(const struct pack_file *p, void *buf, size_t len, uint64_t off)
{
	int rc = -EINVAL;
	if (p->fd_direct >= 0 && len % PACK_ALIGN == 0 && off % PACK_ALIGN == 0)
		rc = moe_pread_full(p->fd_direct, buf, len, off);
	if (rc == -EINVAL) {
		rc = moe_pread_full(p->fd, buf, len, off);
		if (rc == 0)
			posix_fadvise(p->fd, (off_t)off, (off_t)len, POSIX_FADV_DONTNEED);
	}
	return rc;
}

long pack_verify(const struct pack_file *p, pack_report_fn report, void *ctx, struct moe_error *err)
{
	const struct pack_header_disk *h = p->hdr;
	uint64_t eb = h->extent_bytes, n = h->index_count;
	size_t bufsz = (size_t)MOE_MAX((uint64_t)VERIFY_BUF_BYTES, eb);
	const struct pack_index_entry **order = NULL;
	unsigned char *buf = NULL;
	struct moe_error e;
	long failures = 0;

	if (posix_memalign((void **)&buf, PACK_ALIGN, bufsz) || !(order = malloc(n * sizeof(*order)))) {
		free(buf);
		return moe_error_set(err, -ENOMEM, "out of memory for the verify buffer");
	}
	for (uint64_t i = 0; i < n; i++)
		order[i] = &p->index[i];
	/* in file order, so the disk sees large sequential reads */
	qsort(order, n, sizeof(*order), cmp_entry_off);
	for (uint64_t i = 0; i < n;) {
		uint64_t j = i + 1, run_off = order[i]->offset;
		while (j < n && order[j]->offset == run_off + (j - i) * eb && (j - i + 1) * eb <= bufsz)
			j++;
		int rc = verify_read(p, buf, (size_t)((j - i) * eb), run_off);
		if (rc == 0) {
			for (uint64_t k = i; k < j; k++)
				if (verify_extent(p, order[k], buf + (k - i) * eb, &e) < 0) {
					failures++;
					report_msg(report, ctx, &e);
				}
		} else {
			/* find out which extents of the run are unreadable */
			for (uint64_t k = i; k < j; k++) {
				rc = verify_read(p, buf, (size_t)eb, order[k]->offset);
				if (rc < 0)
					expert_fail(p, rc, order[k]->layer, order[k]->expert, &e, "read error: %s",
						    strerror(-rc));
				if (rc < 0 || verify_extent(p, order[k], buf, &e) < 0) {
					failures++;
					report_msg(report, ctx, &e);
				}
			}
		}
		i = j;
	}
	for (uint64_t i = 0; i < h->n_tensors; i++) {
		const struct pack_tensor_entry *t = &p->tensors[i];
		uint32_t crc = 0;
		int rc = 0;
		for (uint64_t done = 0; done < t->bytes && rc == 0;) {
			size_t chunk = (size_t)MOE_MIN((uint64_t)bufsz, t->bytes - done);
			rc = moe_pread_full(p->fd, buf, chunk, t->offset + done);
			if (rc == 0)
				crc = crc32c_update(crc, buf, chunk);
			done += chunk;
		}
		if (rc < 0) {
			moe_error_set(&e, rc, "tensor %s: read error: %s", t->name, strerror(-rc));
		} else if (crc != t->crc32c) {
			rc = moe_error_set(&e, -EBADMSG, "tensor %s: checksum mismatch (stored %08x, computed %08x)", t->name,
					   t->crc32c, crc);
		}
		if (rc < 0) {
			failures++;
			report_msg(report, ctx, &e);
		}
	}
	free(order);
	free(buf);
	return failures;
}

/* ---- writer ------------------------------------------------------------ */

struct pack_writer {
	int fd;
	int lock_fd;               /* holds flock(LOCK_EX) on tmp until it is renamed */
	char *path;                /* the final name */
	char *tmp;                 /* written here, renamed to path by finish */
	struct pack_header_disk *hdr;
	struct pack_index_entry *index;
	uint8_t *written;          /* per index entry: 1 once ended */
	uint64_t extents_offset;
	struct pack_tensor_entry *tensors;
	uint64_t n_tensors, cap_tensors;
	uint64_t resident_end;     /* next free byte of the resident region */
	/* the expert or tensor being streamed */
	enum { W_IDLE, W_EXPERT, W_TENSOR, W_FAILED } state;
	uint64_t cur_index;        /* index entry or tensor number */
	uint64_t cur_off, cur_len, cur_done;
	uint32_t cur_crc;
};

/* Temporary files of writers that died (kill -9, power loss) are named
 * PATH.XXXXXX like a live writer's. A live writer holds flock(LOCK_EX) on
 * its file from creation until after the rename, so a file of that name
 * that can be locked, and is older than a few seconds (the instant between
 * mkostemp and flock), has no writer left: removed. Best effort; the count
 * of removed files is returned. */
static unsigned sweep_stale_tmps(const char *path)
{
	char *d1 = strdup(path), *d2 = strdup(path);
	unsigned removed = 0;
	if (!d1 || !d2)
		goto out;
	const char *dir = dirname(d1), *base = basename(d2);
	const size_t bl = strlen(base);
	DIR *dp = opendir(dir);
	if (!dp)
		goto out;
	const int dfd = dirfd(dp);
	struct dirent *de;
	const time_t now = time(NULL);
	while ((de = readdir(dp))) {
		if (strlen(de->d_name) != bl + 7 || strncmp(de->d_name, base, bl) || de->d_name[bl] != '.')
			continue;
		int fd = openat(dfd, de->d_name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
		if (fd < 0)
			continue;
		struct stat st, st2;
		if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && now - st.st_mtime > 5 &&
		    flock(fd, LOCK_EX | LOCK_NB) == 0 && fstatat(dfd, de->d_name, &st2, AT_SYMLINK_NOFOLLOW) == 0 &&
		    st2.st_ino == st.st_ino && st2.st_dev == st.st_dev && unlinkat(dfd, de->d_name, 0) == 0) {
			moe_warn("%s/%s: removed, the temporary file of a pack writer that did not finish", dir,
				 de->d_name);
			removed++;
		}
		close(fd);
	}
	closedir(dp);
out:
	free(d1);
	free(d2);
	return removed;
}

static int writer_fail(struct pack_writer *w, int rc)
{
	w->state = W_FAILED;
	return rc;
}

int pack_writer_create(const char *path, const struct moe_model_config *model,
		       const struct pack_part_desc *parts, uint32_t n_parts, const char *source,
		       struct pack_writer **out, struct moe_error *err)
{
	struct pack_layout_disk one;
	uint8_t map[PACK_MAX_LAYER_MAP] = { 0 };
	*out = NULL;
	if (n_parts == 0 || n_parts > PACK_MAX_PARTS)
		return moe_error_set(err, -EINVAL, "part count %u out of range (1..%u)", n_parts, PACK_MAX_PARTS);
	memset(&one, 0, sizeof(one));
	one.n_parts = n_parts;
	memcpy(one.parts, parts, n_parts * sizeof(*parts));
	return pack_writer_create_layers(path, model, &one, 1, map, source, out, err);
}

/* Layouts equal as far as the pack is concerned (parts and their shapes). */
static bool same_layout(const struct pack_layout_disk *a, const struct pack_layout_disk *b)
{
	return a->n_parts == b->n_parts && memcmp(a->parts, b->parts, a->n_parts * sizeof(a->parts[0])) == 0;
}

int pack_writer_create_layers(const char *path, const struct moe_model_config *model,
			      const struct pack_layout_disk *layouts, uint32_t n_layouts, const uint8_t *layer_layout,
			      const char *source, struct pack_writer **out, struct moe_error *err)
{
	struct pack_writer *w;
	struct pack_header_disk *h;
	uint64_t payload = 0, count, index_bytes, total;
	bool uniform = true;
	int rc;

	*out = NULL;
	rc = moe_model_validate(model, err);
	if (rc < 0)
		return moe_error_prefix(err, rc, "model config");
	if (n_layouts == 0 || n_layouts > PACK_MAX_LAYOUTS)
		return moe_error_set(err, -EINVAL, "layout count %u out of range (1..%u)", n_layouts, PACK_MAX_LAYOUTS);
	for (uint32_t l = 0; l < model->n_moe_layers; l++)
		if (layer_layout[l] >= n_layouts)
			return moe_error_set(err, -EINVAL, "MoE layer %u: layout %u of %u", l, layer_layout[l], n_layouts);
	for (uint32_t i = 0; i < n_layouts; i++) {
		if (layouts[i].n_parts == 0 || layouts[i].n_parts > PACK_MAX_PARTS)
			return moe_error_set(err, -EINVAL, "layout %u: part count %u out of range (1..%u)", i,
					     layouts[i].n_parts, PACK_MAX_PARTS);
		/* offsets and bytes are the writer's: compare what the caller gave */
		for (uint32_t k = 0; k < i; k++) {
			struct pack_layout_disk a = layouts[i], b = layouts[k];
			for (uint32_t j = 0; j < PACK_MAX_PARTS; j++)
				a.parts[j].offset = a.parts[j].bytes = b.parts[j].offset = b.parts[j].bytes = 0;
			uniform &= same_layout(&a, &b);
		}
	}
	w = calloc(1, sizeof(*w));
	if (!w || posix_memalign((void **)&w->hdr, PACK_ALIGN, PACK_HEADER_SIZE)) {
		free(w);
		return moe_error_set(err, -ENOMEM, "out of memory");
	}
	w->fd = w->lock_fd = -1;
	h = w->hdr;
	memset(h, 0, PACK_HEADER_SIZE);
	memcpy(h->magic, PACK_MAGIC, 8);
	h->version = PACK_VERSION; /* PACK_VERSION_UNIFORM below when one table serves */
	h->header_size = PACK_HEADER_SIZE;
	h->model = *model;
	if (uniform) {
		/* one table serves every layer: version 1, readable by every build */
		h->version = PACK_VERSION_UNIFORM;
		h->n_parts = layouts[0].n_parts;
		memcpy(h->parts, layouts[0].parts, h->n_parts * sizeof(h->parts[0]));
		rc = check_parts(&h->model, h->parts, h->n_parts, true, &payload, err);
		if (rc < 0)
			goto fail;
	} else {
		h->n_layouts = n_layouts;
		for (uint32_t i = 0; i < n_layouts; i++) {
			struct pack_layout_disk *L = &h->layouts[i];
			L->n_parts = layouts[i].n_parts;
			memcpy(L->parts, layouts[i].parts, L->n_parts * sizeof(L->parts[0]));
			rc = check_parts(&h->model, L->parts, L->n_parts, true, &L->payload, err);
			if (rc < 0) {
				moe_error_prefix(err, rc, "layout %u", i);
				goto fail;
			}
			payload = MOE_MAX(payload, L->payload);
		}
		memcpy(h->layer_layout, layer_layout, model->n_moe_layers);
	}
	h->extent_payload = payload;
	h->extent_bytes = MOE_ALIGN_UP(payload, (uint64_t)PACK_ALIGN);
	snprintf(h->source, sizeof(h->source), "%s", source ? source : "");
	count = (uint64_t)model->n_moe_layers * model->n_experts;
	h->index_count = count;
	h->index_offset = PACK_HEADER_SIZE;
	index_bytes = count * sizeof(struct pack_index_entry);
	w->extents_offset = PACK_HEADER_SIZE + MOE_ALIGN_UP(index_bytes, (uint64_t)PACK_ALIGN);
	if (!moe_mul_u64(count, h->extent_bytes, &total) || !moe_add_u64(total, w->extents_offset, &total) ||
	    total > (uint64_t)INT64_MAX / 2) {
		rc = moe_error_set(err, -EFBIG, "the pack would be too large");
		goto fail;
	}
	h->resident_offset = total;
	w->resident_end = total;
	w->index = calloc(count, sizeof(*w->index));
	w->written = calloc(count, 1);
	w->path = strdup(path);
	if (!w->index || !w->written || !w->path || asprintf(&w->tmp, "%s.XXXXXX", path) < 0) {
		w->tmp = NULL;
		rc = moe_error_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	/* A temporary name in the same directory, renamed over path once
	 * complete: a daemon serving an older pack at path never sees a
	 * half-written file. */
	sweep_stale_tmps(path);
	w->fd = mkostemp(w->tmp, O_CLOEXEC);
	if (w->fd < 0) {
		rc = moe_error_set(err, -errno, "%s: cannot create: %s", w->tmp, strerror(errno));
		goto fail;
	}
	/* a second descriptor holds the lock: w->fd is closed before the rename */
	w->lock_fd = open(w->tmp, O_RDONLY | O_CLOEXEC);
	if (w->lock_fd >= 0 && flock(w->lock_fd, LOCK_EX | LOCK_NB) < 0) {
		close(w->lock_fd);
		w->lock_fd = -1;
	}
	if (fchmod(w->fd, 0644) < 0) {
		rc = moe_error_set(err, -errno, "%s: chmod: %s", w->tmp, strerror(errno));
		close(w->fd);
		unlink(w->tmp);
		if (w->lock_fd >= 0)
			close(w->lock_fd);
		goto fail;
	}
	w->state = W_IDLE;
	*out = w;
	return 0;
fail:
	free(w->index);
	free(w->written);
	free(w->path);
	free(w->tmp);
	free(w->hdr);
	free(w);
	return rc;
}

int pack_writer_begin_expert(struct pack_writer *w, uint32_t l, uint32_t e, struct moe_error *err)
{
	const struct moe_model_config *m = &w->hdr->model;
	if (w->state != W_IDLE)
		return writer_fail(w, moe_error_set(err, -EINVAL, "begin expert: writer is not idle"));
	if (l >= m->n_moe_layers || e >= m->n_experts)
		return writer_fail(w, moe_error_set(err, -EINVAL, "layer %u expert %u out of range (%u layers, %u experts)",
						    l, e, m->n_moe_layers, m->n_experts));
	uint64_t i = (uint64_t)l * m->n_experts + e;
	if (w->written[i])
		return writer_fail(w, moe_error_set(err, -EEXIST, "layer %u expert %u written twice", l, e));
	w->state = W_EXPERT;
	w->cur_index = i;
	w->cur_off = w->extents_offset + i * w->hdr->extent_bytes;
	/* the caller writes the layer's parts; end_expert adds the zeros up to
	 * extent_payload */
	w->cur_len = w->hdr->version == PACK_VERSION_UNIFORM ? w->hdr->extent_payload
							     : w->hdr->layouts[w->hdr->layer_layout[l]].payload;
	w->cur_done = 0;
	w->cur_crc = 0;
	return 0;
}

int pack_writer_write(struct pack_writer *w, const void *buf, size_t len, struct moe_error *err)
{
	if (w->state != W_EXPERT && w->state != W_TENSOR)
		return writer_fail(w, moe_error_set(err, -EINVAL, "write outside an expert or tensor"));
	if (len > w->cur_len - w->cur_done)
		return writer_fail(w, moe_error_set(err, -EINVAL, "%zu bytes more than the %" PRIu64 " expected", len,
						    w->cur_len - w->cur_done));
	int rc = moe_pwrite_full(w->fd, buf, len, w->cur_off + w->cur_done);
	if (rc < 0)
		return writer_fail(w, moe_error_set(err, rc, "%s: write error: %s", w->path, strerror(-rc)));
	w->cur_crc = crc32c_update(w->cur_crc, buf, len);
	w->cur_done += len;
	return 0;
}

int pack_writer_end_expert(struct pack_writer *w, struct moe_error *err)
{
	if (w->state != W_EXPERT)
		return writer_fail(w, moe_error_set(err, -EINVAL, "end expert: no expert in progress"));
	struct pack_index_entry *x = &w->index[w->cur_index];
	uint32_t ne = w->hdr->model.n_experts;
	if (w->cur_done != w->cur_len)
		return writer_fail(w, moe_error_set(err, -EINVAL, "layer %u expert %u: got %" PRIu64 " of %" PRIu64 " bytes",
						    (uint32_t)(w->cur_index / ne), (uint32_t)(w->cur_index % ne),
						    w->cur_done, w->cur_len));
	/* the file is sparse: the zeros are a hole, but they count in the CRC */
	static const unsigned char zeros[4096];
	for (uint64_t left = w->hdr->extent_payload - w->cur_len; left;) {
		size_t n = (size_t)MOE_MIN(left, (uint64_t)sizeof(zeros));
		w->cur_crc = crc32c_update(w->cur_crc, zeros, n);
		left -= n;
	}
	x->offset = w->cur_off;
	x->length = w->hdr->extent_payload;
	x->crc32c = w->cur_crc;
	x->layer = (uint32_t)(w->cur_index / ne);
	x->expert = (uint32_t)(w->cur_index % ne);
	x->flags = 0;
	w->written[w->cur_index] = 1;
	w->state = W_IDLE;
	return 0;
}

int pack_writer_begin_tensor(struct pack_writer *w, const struct pack_tensor_entry *desc, struct moe_error *err)
{
	struct pack_tensor_entry t = *desc;
	uint64_t bytes, end;
	int rc;
	if (w->state != W_IDLE)
		return writer_fail(w, moe_error_set(err, -EINVAL, "begin tensor: writer is not idle"));
	t.reserved = 0;
	t.reserved2[0] = t.reserved2[1] = 0;
	rc = tensor_bytes(&t, &bytes, err);
	if (rc < 0)
		return writer_fail(w, rc);
	if (t.bytes && t.bytes != bytes)
		return writer_fail(w, moe_error_set(err, -EINVAL, "tensor %s: %" PRIu64 " bytes given, shape needs %" PRIu64,
						    t.name, t.bytes, bytes));
	if (t.layer != UINT32_MAX && t.layer >= w->hdr->model.n_layers)
		return writer_fail(w, moe_error_set(err, -EINVAL, "tensor %s: layer %u beyond the model's %u layers", t.name,
						    t.layer, w->hdr->model.n_layers));
	for (uint64_t i = 0; i < w->n_tensors; i++)
		if (strcmp(w->tensors[i].name, t.name) == 0)
			return writer_fail(w, moe_error_set(err, -EEXIST, "tensor %s written twice", t.name));
	if (w->n_tensors >= MAX_TENSORS)
		return writer_fail(w, moe_error_set(err, -E2BIG, "more than %u resident tensors", MAX_TENSORS));
	if (w->n_tensors == w->cap_tensors) {
		uint64_t cap = w->cap_tensors ? w->cap_tensors * 2 : 64;
		void *n = realloc(w->tensors, cap * sizeof(*w->tensors));
		if (!n)
			return writer_fail(w, moe_error_set(err, -ENOMEM, "out of memory"));
		w->tensors = n;
		w->cap_tensors = cap;
	}
	t.bytes = bytes;
	t.offset = MOE_ALIGN_UP(w->resident_end, (uint64_t)PACK_RESIDENT_ALIGN);
	t.crc32c = 0;
	if (!moe_add_u64(t.offset, bytes, &end) || end > (uint64_t)INT64_MAX / 2)
		return writer_fail(w, moe_error_set(err, -EFBIG, "tensor %s: the pack would be too large", t.name));
	w->tensors[w->n_tensors] = t;
	w->state = W_TENSOR;
	w->cur_index = w->n_tensors;
	w->cur_off = t.offset;
	w->cur_len = bytes;
	w->cur_done = 0;
	w->cur_crc = 0;
	return 0;
}

int pack_writer_end_tensor(struct pack_writer *w, struct moe_error *err)
{
	if (w->state != W_TENSOR)
		return writer_fail(w, moe_error_set(err, -EINVAL, "end tensor: no tensor in progress"));
	struct pack_tensor_entry *t = &w->tensors[w->cur_index];
	if (w->cur_done != w->cur_len)
		return writer_fail(w, moe_error_set(err, -EINVAL, "tensor %s: got %" PRIu64 " of %" PRIu64 " bytes", t->name,
						    w->cur_done, w->cur_len));
	t->crc32c = w->cur_crc;
	w->resident_end = t->offset + t->bytes;
	w->n_tensors++;
	w->state = W_IDLE;
	return 0;
}

static int writer_finish(struct pack_writer *w, struct moe_error *err)
{
	struct pack_header_disk *h = w->hdr;
	const struct moe_model_config *m = &h->model;
	uint64_t dir_bytes = w->n_tensors * sizeof(struct pack_tensor_entry);
	uint64_t index_bytes = h->index_count * sizeof(struct pack_index_entry);
	int rc;

	if (w->state != W_IDLE)
		return moe_error_set(err, -EINVAL, "finish: %s", w->state == W_FAILED ? "an earlier write failed"
										     : "an expert or tensor is still open");
	for (uint64_t i = 0; i < h->index_count; i++)
		if (!w->written[i])
			return moe_error_set(err, -EINVAL, "layer %u (model layer %u) expert %u was never written",
					     (uint32_t)(i / m->n_experts), moe_model_layer_of(m, (uint32_t)(i / m->n_experts)),
					     (uint32_t)(i % m->n_experts));
	h->resident_bytes = w->resident_end - h->resident_offset;
	h->tensor_dir_offset = MOE_ALIGN_UP(w->resident_end, (uint64_t)PACK_ALIGN);
	h->n_tensors = w->n_tensors;
	h->file_size = h->tensor_dir_offset + dir_bytes;
	h->index_crc = crc32c(w->index, index_bytes);
	h->tensor_dir_crc = crc32c(w->tensors, dir_bytes);

	/* The header goes last, after the rest is on disk: a crash before that
	 * leaves a file without a valid magic, never one that points at
	 * unwritten data. Extents' padding and alignment gaps are holes (zero). */
	if ((rc = moe_pwrite_full(w->fd, w->index, index_bytes, h->index_offset)) < 0 ||
	    (dir_bytes && (rc = moe_pwrite_full(w->fd, w->tensors, dir_bytes, h->tensor_dir_offset)) < 0))
		return moe_error_set(err, rc, "%s: write error: %s", w->path, strerror(-rc));
	if (ftruncate(w->fd, (off_t)h->file_size) < 0 || fdatasync(w->fd) < 0)
		return moe_error_set(err, -errno, "%s: %s", w->path, strerror(errno));
	h->header_crc = 0;
	h->header_crc = crc32c(h, PACK_HEADER_SIZE);
	if ((rc = moe_pwrite_full(w->fd, h, PACK_HEADER_SIZE, 0)) < 0)
		return moe_error_set(err, rc, "%s: write error: %s", w->path, strerror(-rc));
	if (fsync(w->fd) < 0)
		return moe_error_set(err, -errno, "%s: fsync: %s", w->path, strerror(errno));
	rc = close(w->fd);
	w->fd = -1;
	if (rc < 0)
		return moe_error_set(err, -errno, "%s: close: %s", w->path, strerror(errno));
	if (rename(w->tmp, w->path) < 0)
		return moe_error_set(err, -errno, "rename %s to %s: %s", w->tmp, w->path, strerror(errno));
	return 0;
}

static void writer_free(struct pack_writer *w)
{
	if (w->fd >= 0)
		close(w->fd);
	if (w->lock_fd >= 0)
		close(w->lock_fd); /* after the rename or unlink: the lock goes last */
	free(w->tmp);
	free(w->index);
	free(w->written);
	free(w->tensors);
	free(w->hdr);
	free(w->path);
	free(w);
}

int pack_writer_finish(struct pack_writer *w, struct moe_error *err)
{
	int rc = writer_finish(w, err);
	if (rc < 0)
		unlink(w->tmp);
	writer_free(w);
	return rc;
}

void pack_writer_abort(struct pack_writer *w)
{
	if (!w)
		return;
	unlink(w->tmp);
	writer_free(w);
}
