/* predict.c - predictor registry, the per-stream history, and the model file.
 *
 * Model file (little-endian), version PREDICT_MODEL_VERSION:
 *   header, 64 bytes: magic "MOEPRED\0", u32 version, u32 n_layers,
 *     u32 n_experts, u32 k, u32 tok_slots, u32 n_eam, u32 n_combo,
 *     u32 payload_crc32c, u64 payload_bytes, 12 reserved bytes (zero)
 *   payload: f32 bias[L][E]; f32 w_cur[DMAX][L][E][E]; f32 w_cur2, w_cur3, w_prev,
 *     w_prevn, w_prev2 [L][E][E]; f32 w_pair[L][E][E][E], w_xpair[L][E][E][E] (both only if E <= 64); u32 tok_key[S]; u16 tok_total[S];
 *     u8 tok_freq[S][L][E]; i8 w_tok[S][L][E]; i8 w_tokp[S][L][E]; f32 tok_prior[L][E]; f32 eam[n_eam][L][E];
 *     f32 combo[PREDICT_COMBO_D][L][n_combo + 1]
 * Version 1 had a 5-input combiner ([L][6]) and no w_tok; it is refused
 * (retrain).
 * Any mismatch (magic, version, sizes, CRC, non-finite weights, a table size
 * that is not a power of two) rejects the file.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crc32c.h"
#include "predict.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "predict model files are stored in host order, which must be little-endian"
#endif

const struct predict_ops *const predict_registry[] = {
	&predict_temporal_ops,
	&predict_coact_ops,
	&predict_tokenid_ops,
	&predict_tracematch_ops,
	&predict_learned_ops,
	&predict_combo_ops,
	NULL,
};

const struct predict_ops *predict_find(const char *name)
{
	for (size_t i = 0; name && predict_registry[i]; i++)
		if (strcmp(predict_registry[i]->name, name) == 0)
			return predict_registry[i];
	return NULL;
}

uint32_t predict_token_key(const char *text)
{
	uint32_t h = 2166136261u;
	for (const unsigned char *c = (const unsigned char *)text; c && *c; c++) {
		h ^= *c;
		h *= 16777619u;
	}
	return h ? h : 1;
}

static void stream_free(struct predict_stream *s)
{
	if (!s)
		return;
	free(s->cur);
	free(s->cur_n);
	free(s->prev);
	free(s->prev_n);
	free(s);
}

static struct predict_stream *stream_new(uint32_t L, uint32_t E, uint32_t k)
{
	struct predict_stream *s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	s->n_layers = L;
	s->n_experts = E;
	s->k = k;
	s->last_layer = -1;
	s->cur = calloc((size_t)L * k, sizeof(*s->cur));
	s->cur_n = calloc(L, 1);
	s->prev = calloc((size_t)PREDICT_HIST * L * k, sizeof(*s->prev));
	s->prev_n = calloc((size_t)PREDICT_HIST * L, 1);
	if (!s->cur || !s->cur_n || !s->prev || !s->prev_n) {
		stream_free(s);
		return NULL;
	}
	return s;
}

static int create_common(const struct predict_ops *ops, const char *name, struct predict_stream *s,
			 bool owns, const struct predict_model *model, struct predictor **out,
			 struct moe_error *err)
{
	struct predictor *p;
	int rc;

	if (!ops) {
		if (owns)
			stream_free(s);
		return moe_error_set(err, -EINVAL, "unknown predictor '%s'", name ? name : "(null)");
	}
	if (ops->needs_model && !model) {
		if (owns)
			stream_free(s);
		return moe_error_set(err, -EINVAL, "predictor %s needs a model file (moe-sim train)", name);
	}
	if (model && (model->n_layers != s->n_layers || model->n_experts != s->n_experts || model->k != s->k)) {
		rc = moe_error_set(err, -EINVAL,
				   "predictor %s: model is %u layers x %u experts top-%u, stream is %u x %u top-%u",
				   name, model->n_layers, model->n_experts, model->k, s->n_layers, s->n_experts, s->k);
		if (owns)
			stream_free(s);
		return rc;
	}
	p = calloc(1, sizeof(*p));
	if (!p || (ops->priv_size && !(p->priv = calloc(1, ops->priv_size)))) {
		free(p);
		if (owns)
			stream_free(s);
		return moe_error_set(err, -ENOMEM, "predictor %s: out of memory", name);
	}
	p->ops = ops;
	p->s = s;
	p->owns_stream = owns;
	p->model = model;
	rc = ops->init ? ops->init(p, err) : 0;
	if (rc < 0) {
		free(p->priv);
		free(p);
		if (owns)
			stream_free(s);
		return rc;
	}
	*out = p;
	return 0;
}

int predict_create(const char *name, uint32_t n_layers, uint32_t n_experts, uint32_t k,
		   const struct predict_model *model, struct predictor **out, struct moe_error *err)
{
	struct predict_stream *s;

	*out = NULL;
	if (n_layers == 0 || n_layers > PREDICT_MAX_LAYERS || n_experts == 0 ||
	    n_experts > PREDICT_MAX_EXPERTS || k == 0 || k > PREDICT_MAX_K || k > n_experts)
		return moe_error_set(err, -EINVAL, "predictor: bad shape %u layers x %u experts top-%u",
				     n_layers, n_experts, k);
	s = stream_new(n_layers, n_experts, k);
	if (!s)
		return moe_error_set(err, -ENOMEM, "predictor: out of memory");
	return create_common(predict_find(name), name, s, true, model, out, err);
}

int predict_create_on(const char *name, struct predict_stream *s, const struct predict_model *model,
		      struct predictor **out, struct moe_error *err)
{
	*out = NULL;
	return create_common(predict_find(name), name, s, false, model, out, err);
}

void predict_destroy(struct predictor *p)
{
	if (!p)
		return;
	if (p->ops->fini)
		p->ops->fini(p);
	if (p->owns_stream)
		stream_free(p->s);
	free(p->priv);
	free(p);
}

static void stream_clear(struct predict_stream *s)
{
	s->n_tokens = 0;
	s->token_key = 0;
	s->prev_key = 0;
	s->last_layer = -1;
	memset(s->cur_n, 0, s->n_layers);
	memset(s->prev_n, 0, (size_t)PREDICT_HIST * s->n_layers);
}

void predict_reset(struct predictor *p)
{
	if (p->owns_stream)
		stream_clear(p->s);
	/* A new stream looks like a stream whose history is empty: per-stream
	 * state of the predictors is cleared by a token() with n_tokens == 0. */
}

void predict_token(struct predictor *p, uint32_t token_key)
{
	struct predict_stream *s = p->s;

	if (p->owns_stream) {
		size_t row = (size_t)s->n_layers * s->k;
		if (s->n_tokens > 0) {
			memmove(s->prev + row, s->prev, (PREDICT_HIST - 1) * row * sizeof(*s->prev));
			memmove(s->prev_n + s->n_layers, s->prev_n, (PREDICT_HIST - 1) * (size_t)s->n_layers);
			memcpy(s->prev, s->cur, row * sizeof(*s->prev));
			memcpy(s->prev_n, s->cur_n, s->n_layers);
		}
		memset(s->cur_n, 0, s->n_layers);
		s->last_layer = -1;
		s->prev_key = s->n_tokens > 0 ? s->token_key : 0;
		s->token_key = token_key;
		s->n_tokens++;
	}
	if (p->ops->token)
		p->ops->token(p);
}

void predict_observe(struct predictor *p, uint32_t layer, const uint16_t *experts, uint32_t n)
{
	struct predict_stream *s = p->s;

	if (layer >= s->n_layers)
		return;
	if (p->owns_stream) {
		uint32_t m = 0;
		uint16_t *row = &s->cur[(size_t)layer * s->k];
		for (uint32_t i = 0; i < n && m < s->k; i++)
			if (experts[i] < s->n_experts)
				row[m++] = experts[i];
		s->cur_n[layer] = (uint8_t)m;
		if ((int32_t)layer > s->last_layer)
			s->last_layer = (int32_t)layer;
	}
	if (p->ops->observe)
		p->ops->observe(p, layer);
}

void predict_score(struct predictor *p, uint32_t layer, float *out)
{
	if (layer >= p->s->n_layers) {
		return;
	}
	p->ops->score(p, layer, out);
}

/* ---- model file ---- */

struct model_hdr {
	char magic[8];
	uint32_t version, n_layers, n_experts, k, tok_slots, n_eam, n_combo, crc;
	uint64_t payload;
	uint8_t reserved[12];
};
_Static_assert(sizeof(struct model_hdr) == 64, "model header layout");

struct section {
	void *ptr;
	size_t bytes;
	bool is_float;
};

static size_t model_sections(const struct predict_model *m, struct section *sec)
{
	size_t LE = (size_t)m->n_layers * m->n_experts, LEE = LE * m->n_experts, n = 0;
	sec[n++] = (struct section){ m->bias, LE * 4, true };
	for (int d = 0; d < PREDICT_DMAX; d++)
		sec[n++] = (struct section){ m->w_cur[d], LEE * 4, true };
	sec[n++] = (struct section){ m->w_cur2, LEE * 4, true };
	sec[n++] = (struct section){ m->w_cur3, LEE * 4, true };
	sec[n++] = (struct section){ m->w_prev, LEE * 4, true };
	sec[n++] = (struct section){ m->w_prevn, LEE * 4, true };
	sec[n++] = (struct section){ m->w_prev2, LEE * 4, true };
	sec[n++] = (struct section){ m->w_pair, m->n_experts <= PREDICT_PAIR_MAX_E ? LEE * m->n_experts * 4 : 0, true };
	sec[n++] = (struct section){ m->w_xpair, m->n_experts <= PREDICT_PAIR_MAX_E ? LEE * m->n_experts * 4 : 0, true };
	sec[n++] = (struct section){ m->tok_key, (size_t)m->tok_slots * 4, false };
	sec[n++] = (struct section){ m->tok_total, (size_t)m->tok_slots * 2, false };
	sec[n++] = (struct section){ m->tok_freq, (size_t)m->tok_slots * LE, false };
	sec[n++] = (struct section){ m->w_tok, (size_t)m->tok_slots * LE, false };
	sec[n++] = (struct section){ m->w_tokp, (size_t)m->tok_slots * LE, false };
	sec[n++] = (struct section){ m->tok_prior, LE * 4, true };
	sec[n++] = (struct section){ m->eam, (size_t)m->n_eam * LE * 4, true };
	sec[n++] = (struct section){ m->combo, (size_t)PREDICT_COMBO_D * m->n_layers * (m->n_combo + 1) * 4, true };
	return n;
}

void predict_model_free(struct predict_model *m)
{
	struct section sec[32];
	if (!m)
		return;
	size_t n = model_sections(m, sec);
	for (size_t i = 0; i < n; i++)
		free(sec[i].ptr);
	free(m);
}

int predict_model_alloc(struct predict_model **out, uint32_t n_layers, uint32_t n_experts, uint32_t k,
			uint32_t tok_slots, uint32_t n_eam, struct moe_error *err)
{
	struct predict_model *m;
	struct section sec[32];
	size_t n;

	*out = NULL;
	if (n_layers == 0 || n_layers > PREDICT_MAX_LAYERS || n_experts == 0 || n_experts > PREDICT_MAX_EXPERTS ||
	    k == 0 || k > PREDICT_MAX_K || k > n_experts || (tok_slots & (tok_slots - 1)) || tok_slots > (1u << 24) ||
	    n_eam > 65536)
		return moe_error_set(err, -EINVAL, "predict model: bad shape %u x %u top-%u, %u token slots, %u matrices",
				     n_layers, n_experts, k, tok_slots, n_eam);
	m = calloc(1, sizeof(*m));
	if (!m)
		return moe_error_set(err, -ENOMEM, "predict model: out of memory");
	m->n_layers = n_layers;
	m->n_experts = n_experts;
	m->k = k;
	m->tok_slots = tok_slots;
	m->n_eam = n_eam;
	m->n_combo = PREDICT_COMBO_F;
	size_t LE = (size_t)n_layers * n_experts, LEE = LE * n_experts;
	m->bias = calloc(LE, 4);
	for (int d = 0; d < PREDICT_DMAX; d++)
		m->w_cur[d] = calloc(LEE, 4);
	m->w_cur2 = calloc(LEE, 4);
	m->w_cur3 = calloc(LEE, 4);
	m->w_prev = calloc(LEE, 4);
	m->w_prevn = calloc(LEE, 4);
	m->w_prev2 = calloc(LEE, 4);
	if (n_experts <= PREDICT_PAIR_MAX_E) {
		m->w_pair = calloc(LEE * n_experts, 4);
		m->w_xpair = calloc(LEE * n_experts, 4);
	}
	m->tok_key = calloc(tok_slots ? tok_slots : 1, 4);
	m->tok_total = calloc(tok_slots ? tok_slots : 1, 2);
	m->tok_freq = calloc(tok_slots ? (size_t)tok_slots * LE : 1, 1);
	m->w_tok = calloc(tok_slots ? (size_t)tok_slots * LE : 1, 1);
	m->w_tokp = calloc(tok_slots ? (size_t)tok_slots * LE : 1, 1);
	m->tok_prior = calloc(LE, 4);
	m->eam = calloc(n_eam ? (size_t)n_eam * LE : 1, 4);
	m->combo = calloc((size_t)PREDICT_COMBO_D * n_layers * (m->n_combo + 1), 4);
	n = model_sections(m, sec);
	for (size_t i = 0; i < n; i++) {
		if (!sec[i].ptr && sec[i].bytes) {
			predict_model_free(m);
			return moe_error_set(err, -ENOMEM, "predict model: out of memory");
		}
	}
	*out = m;
	return 0;
}

int predict_model_save(const struct predict_model *m, const char *path, struct moe_error *err)
{
	struct section sec[32];
	struct model_hdr h;
	size_t n = model_sections(m, sec);
	uint32_t crc = 0;
	uint64_t total = 0;
	char tmp[4096];
	int fd, rc = 0;

	for (size_t i = 0; i < n; i++) {
		crc = crc32c_update(crc, sec[i].ptr, sec[i].bytes);
		total += sec[i].bytes;
	}
	memset(&h, 0, sizeof(h));
	memcpy(h.magic, "MOEPRED", 8);
	h.version = PREDICT_MODEL_VERSION;
	h.n_layers = m->n_layers;
	h.n_experts = m->n_experts;
	h.k = m->k;
	h.tok_slots = m->tok_slots;
	h.n_eam = m->n_eam;
	h.n_combo = m->n_combo;
	h.crc = crc;
	h.payload = total;
	if ((size_t)snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= sizeof(tmp))
		return moe_error_set(err, -ENAMETOOLONG, "%s: path too long", path);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return moe_error_set(err, -errno, "%s: %s", tmp, strerror(errno));
	rc = moe_write_full(fd, &h, sizeof(h));
	for (size_t i = 0; rc == 0 && i < n; i++)
		rc = moe_write_full(fd, sec[i].ptr, sec[i].bytes);
	if (rc == 0 && fsync(fd) < 0)
		rc = -errno;
	if (close(fd) < 0 && rc == 0)
		rc = -errno;
	if (rc == 0 && rename(tmp, path) < 0)
		rc = -errno;
	if (rc < 0) {
		unlink(tmp);
		return moe_error_set(err, rc, "%s: write failed: %s", path, strerror(-rc));
	}
	return 0;
}

int predict_model_load(const char *path, struct predict_model **out, struct moe_error *err)
{
	struct predict_model *m = NULL;
	struct section sec[32];
	struct model_hdr h;
	struct stat st;
	uint64_t off = sizeof(h), total = 0;
	uint32_t crc = 0;
	size_t n;
	int fd, rc;

	*out = NULL;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return moe_error_set(err, -errno, "%s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0) {
		rc = moe_error_set(err, -errno, "%s: %s", path, strerror(errno));
		goto out;
	}
	if ((uint64_t)st.st_size < sizeof(h) || moe_pread_full(fd, &h, sizeof(h), 0) < 0) {
		rc = moe_error_set(err, -EINVAL, "%s: too short for a predictor model", path);
		goto out;
	}
	if (memcmp(h.magic, "MOEPRED", 8) != 0) {
		rc = moe_error_set(err, -EINVAL, "%s: not a predictor model (bad magic)", path);
		goto out;
	}
	if (h.version != PREDICT_MODEL_VERSION) {
		rc = moe_error_set(err, -EINVAL, "%s: model version %u, this build reads %u (retrain with moe-sim train)",
				   path, h.version, PREDICT_MODEL_VERSION);
		goto out;
	}
	if (h.n_combo != PREDICT_COMBO_F) {
		rc = moe_error_set(err, -EINVAL, "%s: %u combiner inputs, expected %u", path, h.n_combo, PREDICT_COMBO_F);
		goto out;
	}
	rc = predict_model_alloc(&m, h.n_layers, h.n_experts, h.k, h.tok_slots, h.n_eam, err);
	if (rc < 0) {
		moe_error_prefix(err, rc, "%s", path);
		goto out;
	}
	n = model_sections(m, sec);
	for (size_t i = 0; i < n; i++)
		total += sec[i].bytes;
	if (h.payload != total || (uint64_t)st.st_size != sizeof(h) + total) {
		rc = moe_error_set(err, -EINVAL, "%s: payload is %llu bytes (file %llu), shape needs %llu", path,
				   (unsigned long long)h.payload, (unsigned long long)st.st_size,
				   (unsigned long long)total);
		goto out;
	}
	for (size_t i = 0; i < n; i++) {
		rc = moe_pread_full(fd, sec[i].ptr, sec[i].bytes, off);
		if (rc < 0) {
			rc = moe_error_set(err, rc, "%s: read failed", path);
			goto out;
		}
		off += sec[i].bytes;
		crc = crc32c_update(crc, sec[i].ptr, sec[i].bytes);
	}
	if (crc != h.crc) {
		rc = moe_error_set(err, -EINVAL, "%s: checksum mismatch (corrupt model file)", path);
		goto out;
	}
	for (size_t i = 0; i < n; i++) {
		if (!sec[i].is_float)
			continue;
		const float *f = sec[i].ptr;
		for (size_t j = 0; j < sec[i].bytes / 4; j++) {
			if (!isfinite(f[j])) {
				rc = moe_error_set(err, -EINVAL, "%s: non-finite weight in section %zu", path, i);
				goto out;
			}
		}
	}
	*out = m;
	m = NULL;
	rc = 0;
out:
	predict_model_free(m);
	close(fd);
	return rc;
}

int64_t predict_model_tok_find(const struct predict_model *m, uint32_t key)
{
	if (!m->tok_slots || key == 0)
		return -1;
	uint32_t mask = m->tok_slots - 1;
	for (uint32_t i = 0, j = (key * 2654435761u) & mask; i < m->tok_slots; i++, j = (j + 1) & mask) {
		if (m->tok_key[j] == key)
			return j;
		if (m->tok_key[j] == 0)
			return -1;
	}
	return -1;
}
