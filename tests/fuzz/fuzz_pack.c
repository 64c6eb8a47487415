/* fuzz_pack.c - libFuzzer target for the pack reader: pack_open on a file
 * image (a memfd holding the input, opened by path as moetierd opens its
 * packs), then everything a reader may do with what it accepted: look up
 * and read every expert (checksums), the resident tensors, the GGUF
 * key/values, pack_verify.
 *
 * Input: one mode byte, then the file image. Mode bit 0: the harness first
 * recomputes the metadata checksums (header, index, tensor directory) of
 * the image, bit 1 also those of every extent and tensor the index and
 * directory point at (when they lie inside the image), so that mutations
 * reach the structural checks behind the CRCs instead of dying at them.
 *
 * Checked beyond the sanitizers: an accepted pack's index and tensor
 * directory lie inside the file (pack_open's promise), and a read of what it
 * accepted either succeeds or fails with a message.
 *
 * Build: ./configure --enable-fuzz && make tests/fuzz/fuzz_pack
 * Run:   tests/fuzz/fuzz_pack -dict=$srcdir/tests/fuzz/pack.dict -max_len=262144 CORPUS $srcdir/tests/fuzz/corpus/pack */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <stddef.h>

#include "crc32c.h"
#include "gguf.h"
#include "pack.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void ignore(void *ctx, const char *what)
{
	(void)ctx;
	(void)what;
}

static bool inside(uint64_t off, uint64_t len, size_t size)
{
	return off <= size && len <= size - off;
}

/* Recomputes the checksums of the image in place (see the mode byte). */
static void fix_crcs(uint8_t *img, size_t size, bool extents)
{
	if (size < PACK_HEADER_SIZE)
		return;
	struct pack_header_disk *h = (struct pack_header_disk *)img;
	/* Read once: the index or the directory may overlap the header, so
	 * writing a CRC into them may change these very fields. */
	const uint64_t ioff = h->index_offset, icount = h->index_count;
	const uint64_t toff = h->tensor_dir_offset, tcount = h->n_tensors;
	if (icount < (1u << 20) && inside(ioff, icount * sizeof(struct pack_index_entry), size) && ioff % 8 == 0) {
		struct pack_index_entry *x = (struct pack_index_entry *)(img + ioff);
		for (uint64_t i = 0; extents && i < icount; i++) {
			uint64_t off = x[i].offset, len = x[i].length;
			if (inside(off, len, size))
				x[i].crc32c = crc32c(img + off, len);
		}
		h->index_crc = crc32c(x, icount * sizeof(*x));
	}
	if (tcount < (1u << 16) && inside(toff, tcount * sizeof(struct pack_tensor_entry), size) && toff % 8 == 0) {
		struct pack_tensor_entry *t = (struct pack_tensor_entry *)(img + toff);
		for (uint64_t i = 0; extents && i < tcount; i++) {
			uint64_t off = t[i].offset, len = t[i].bytes;
			if (inside(off, len, size))
				t[i].crc32c = crc32c(img + off, len);
		}
		h->tensor_dir_crc = crc32c(t, tcount * sizeof(*t));
	}
	h->header_crc = 0;
	h->header_crc = crc32c(img, PACK_HEADER_SIZE);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int mfd = -1;
	static bool quiet;
	if (!quiet) {
		quiet = true;
		moe_log_init("fuzz_pack", MOE_LOG_ERR, false);
	}
	if (size < 1 || size > (1u << 20))
		return 0;
	uint8_t mode = data[0];
	data++;
	size--;
	static uint8_t *img;
	static size_t img_cap;
	if (size > img_cap) {
		free(img);
		img_cap = size;
		if (!(img = aligned_alloc(64, (img_cap + 63) & ~(size_t)63)))
			abort();
	}
	if (size)
		memcpy(img, data, size);
	if (mode & 1)
		fix_crcs(img, size, mode & 2);
	if (mfd < 0 && (mfd = memfd_create("fuzz-pack", MFD_CLOEXEC)) < 0)
		abort();
	if (ftruncate(mfd, 0) || (size && pwrite(mfd, img, size, 0) != (ssize_t)size))
		abort();
	char path[64];
	snprintf(path, sizeof(path), "/proc/self/fd/%d", mfd);
	struct pack_file *p;
	struct moe_error err = { "" };
	if (pack_open(path, PACK_OPEN_NO_DIRECT, &p, &err) != 0) {
		if (!err.msg[0])
			__builtin_trap(); /* refused without saying why */
		return 0;
	}
	const struct pack_header_disk *h = p->hdr;
	if (p->file_size != size || h->index_offset > size || h->index_count * sizeof(struct pack_index_entry) > size)
		__builtin_trap();
	uint64_t xb = pack_extent_bytes(p);
	void *buf = NULL;
	if (xb <= (1u << 20) && posix_memalign(&buf, 4096, xb ? xb : 4096) == 0) {
		for (uint32_t l = 0; l < p->model->n_moe_layers && l < 64; l++)
			for (uint32_t e = 0; e < p->model->n_experts && e < 256; e++) {
				const struct pack_index_entry *x = pack_expert(p, l, e);
				if (!x)
					continue;
				if (x->offset + xb > size)
					__builtin_trap();
				err.msg[0] = '\0';
				if (pack_read_expert(p, l, e, buf, &err) != 0 && !err.msg[0])
					__builtin_trap();
			}
	}
	free(buf);
	for (uint64_t i = 0; i < h->n_tensors; i++) {
		const struct pack_tensor_entry *t = &p->tensors[i];
		if (t->offset > size || t->bytes > size - t->offset)
			__builtin_trap();
		if (pack_find_tensor(p, t->name) == NULL)
			__builtin_trap();
		(void)pack_find_role(p, (enum pack_role)t->role, t->layer);
		void *tb = malloc(t->bytes ? t->bytes : 1);
		if (tb && pack_read_tensor(p, t, tb, &err) != 0 && !err.msg[0])
			__builtin_trap();
		free(tb);
	}
	for (int r = 0; r < 16; r++) {
		(void)pack_part(p, (enum pack_role)r);
		(void)pack_role_name((enum pack_role)r);
	}
	void *kvbuf;
	struct gguf_file *kv;
	if (pack_open_kv(p, &kvbuf, &kv, &err) == 0) {
		gguf_close(kv);
		free(kvbuf);
	}
	if (pack_verify(p, ignore, NULL, &err) < 0 && !err.msg[0])
		__builtin_trap();
	pack_close(p);
	return 0;
}
