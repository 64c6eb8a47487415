/* trace.c - routing trace CSV reader and writer (see trace.h).
 *
 * One pass over the buffer: RFC 4180 records are split into 4 fields, the
 * first layer block fixes the tokens (text and batch), later blocks must
 * repeat them row for row. Rows are kept in a flat vector and scattered into
 * the token-major matrix at the end, once n_tokens, the layer range and k are
 * known.
 */
/* _GNU_SOURCE before any system header (asprintf, strndup). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include "config.h"
#include "trace.h"

#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define TRACE_MAX_FILE (1ull << 30)

static const char *const header_cols[4] = { "Layer ID", "Batch Number", "Token", "Activated Expert IDs" };

struct field {
	size_t off, len; /* into the scratch buffer */
};

struct parser {
	const char *p, *end;
	const char *name;
	uint32_t line;          /* physical line of the current position */
	char *scratch;          /* unescaped fields of one record */
	size_t scratch_len, scratch_cap;
	struct moe_error *err;
};

struct row {
	uint32_t layer;
	uint32_t line;
	uint8_t n;
	uint16_t ids[TRACE_MAX_K];
};

static int perr(struct parser *ps, uint32_t line, const char *fmt, ...) MOE_PRINTF(3, 4);
static int perr(struct parser *ps, uint32_t line, const char *fmt, ...)
{
	char what[384];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	return moe_error_set(ps->err, -EINVAL, "%s:%u: %s", ps->name, line, what);
}

static int put(struct parser *ps, char c)
{
	if (ps->scratch_len == ps->scratch_cap) {
		size_t cap = ps->scratch_cap ? ps->scratch_cap * 2 : 256;
		char *n = realloc(ps->scratch, cap);
		if (!n)
			return -ENOMEM;
		ps->scratch = n;
		ps->scratch_cap = cap;
	}
	ps->scratch[ps->scratch_len++] = c;
	return 0;
}

/* Reads one record into f[0..3]. Returns the field count (0 at end of input),
 * or a negative errno. *line gets the line the record starts on. */
static int next_record(struct parser *ps, struct field f[4], uint32_t *line)
{
	int nf = 0, rc;
	ps->scratch_len = 0;
	*line = ps->line;
	if (ps->p >= ps->end)
		return 0;
	for (;;) {
		if (nf == 4)
			return perr(ps, *line, "more than 4 fields");
		f[nf].off = ps->scratch_len;
		if (ps->p < ps->end && *ps->p == '"') {
			uint32_t qline = ps->line;
			ps->p++;
			for (;;) {
				if (ps->p >= ps->end)
					return perr(ps, qline, "unterminated quoted field");
				char c = *ps->p++;
				if (c == '"') {
					if (ps->p < ps->end && *ps->p == '"') {
						ps->p++;
					} else {
						break;
					}
				} else if (c == '\n') {
					ps->line++;
				} else if (c == '\0') {
					return perr(ps, ps->line, "NUL byte in a field");
				}
				if ((rc = put(ps, c)))
					return rc;
			}
			if (ps->p < ps->end && *ps->p != ',' && *ps->p != '\n' && *ps->p != '\r')
				return perr(ps, ps->line, "character after a closing quote");
		} else {
			while (ps->p < ps->end && *ps->p != ',' && *ps->p != '\n' && *ps->p != '\r') {
				char c = *ps->p++;
				if (c == '"')
					return perr(ps, ps->line, "quote inside an unquoted field");
				if (c == '\0')
					return perr(ps, ps->line, "NUL byte in a field");
				if ((rc = put(ps, c)))
					return rc;
			}
		}
		f[nf].len = ps->scratch_len - f[nf].off;
		if ((rc = put(ps, '\0')))
			return rc;
		nf++;
		if (ps->p >= ps->end)
			return nf;
		char c = *ps->p++;
		if (c == ',')
			continue;
		if (c == '\r') {
			if (ps->p >= ps->end || *ps->p != '\n')
				return perr(ps, ps->line, "carriage return not followed by a line feed");
			ps->p++;
		}
		ps->line++;
		return nf;
	}
}

/* A non-negative decimal integer that fits in max. */
static bool parse_uint(const char *s, size_t len, uint64_t max, uint64_t *out)
{
	uint64_t v = 0;
	if (len == 0 || len > 20)
		return false;
	for (size_t i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9')
			return false;
		if (v > (max - (uint64_t)(s[i] - '0')) / 10)
			return false;
		v = v * 10 + (uint64_t)(s[i] - '0');
	}
	*out = v;
	return true;
}

/* "[8, 22, 43]" -> ids. */
static int parse_ids(struct parser *ps, uint32_t line, const char *s, size_t len, struct row *r)
{
	size_t i = 0;
	if (len == 0 || s[0] != '[')
		return perr(ps, line, "expert list does not start with '['");
	i = 1;
	r->n = 0;
	for (;;) {
		while (i < len && s[i] == ' ')
			i++;
		if (i < len && s[i] == ']' && r->n == 0)
			return perr(ps, line, "empty expert list");
		if (i >= len)
			return perr(ps, line, "expected ']' at the end of the expert list");
		if (s[i] < '0' || s[i] > '9')
			return perr(ps, line, "expected an expert id");
		size_t st = i;
		while (i < len && s[i] >= '0' && s[i] <= '9')
			i++;
		uint64_t v;
		if (!parse_uint(s + st, i - st, TRACE_MAX_EXPERT, &v)) {
			char num[32];
			snprintf(num, sizeof(num), "%.*s", (int)MOE_MIN(i - st, (size_t)24), s + st);
			return perr(ps, line, "expert id %s is larger than 65535", num);
		}
		if (r->n == TRACE_MAX_K)
			return moe_error_set(ps->err, -EINVAL, "%s:%u: more than %d expert ids", ps->name, line,
					     TRACE_MAX_K);
		for (uint32_t j = 0; j < r->n; j++)
			if (r->ids[j] == v)
				return moe_error_set(ps->err, -EINVAL, "%s:%u: expert id %u repeated", ps->name,
						     line, (unsigned)v);
		r->ids[r->n++] = (uint16_t)v;
		while (i < len && s[i] == ' ')
			i++;
		if (i < len && s[i] == ',') {
			i++;
			continue;
		}
		if (i < len && s[i] == ']') {
			i++;
			break;
		}
		if (i >= len)
			return perr(ps, line, "expected ']' at the end of the expert list");
		return perr(ps, line, "expected ',' or ']' in the expert list");
	}
	if (i != len)
		return perr(ps, line, "text after ']'");
	return 0;
}

void trace_free(struct trace *tr)
{
	if (!tr)
		return;
	if (tr->token)
		for (uint32_t i = 0; i < tr->n_tokens; i++)
			free(tr->token[i]);
	free(tr->token);
	free(tr->experts);
	free(tr->count);
	free(tr->batch);
	free(tr);
}

struct state {
	struct row *rows;
	size_t n_rows, cap_rows;
	char **tokens;            /* of the first block */
	size_t *token_len;
	uint32_t *batch;
	uint32_t n_tok, cap_tok;
	uint32_t first_block_layer;
	uint32_t cur_layer, cur_count, cur_last_line;
	bool in_first_block;
	/* layers already seen as blocks, to reject a layer that reappears */
	uint32_t *seen;
	size_t n_seen, cap_seen;
};

static bool layer_seen(const struct state *s, uint32_t layer)
{
	for (size_t i = 0; i < s->n_seen; i++)
		if (s->seen[i] == layer)
			return true;
	return false;
}

/* Called when a layer block ends: it must have as many rows as the first. */
static int end_block(struct parser *ps, struct state *s)
{
	if (!s->in_first_block && s->cur_count != s->n_tok)
		return moe_error_set(ps->err, -EINVAL,
				     "%s:%u: layer %u has %u tokens but layer %u has %u (every layer needs the same tokens)",
				     ps->name, s->cur_last_line, s->cur_layer, s->cur_count, s->first_block_layer, s->n_tok);
	return 0;
}

static int add_row(struct parser *ps, struct state *s, const struct field f[4], uint32_t line)
{
	const char *sc = ps->scratch;
	uint64_t layer, batch;
	int rc;

	if (!parse_uint(sc + f[0].off, f[0].len, UINT32_MAX, &layer))
		return perr(ps, line, "Layer ID \"%.40s\" is not a non-negative integer", sc + f[0].off);
	if (!parse_uint(sc + f[1].off, f[1].len, UINT32_MAX, &batch))
		return perr(ps, line, "Batch Number \"%.40s\" is not a non-negative integer", sc + f[1].off);
	if (s->n_rows == s->cap_rows) {
		size_t cap = s->cap_rows ? s->cap_rows * 2 : 1024;
		struct row *n = realloc(s->rows, cap * sizeof(*n));
		if (!n)
			return -ENOMEM;
		s->rows = n;
		s->cap_rows = cap;
	}
	struct row *r = &s->rows[s->n_rows];
	r->layer = (uint32_t)layer;
	r->line = line;
	if ((rc = parse_ids(ps, line, sc + f[3].off, f[3].len, r)))
		return rc;

	if (s->n_rows == 0 || r->layer != s->cur_layer) {
		if (s->n_rows) {
			if ((rc = end_block(ps, s)))
				return rc;
			s->in_first_block = false;
		}
		if (layer_seen(s, r->layer))
			return moe_error_set(ps->err, -EINVAL,
					     "%s:%u: layer %u appears again (rows must be grouped by layer)",
					     ps->name, line, r->layer);
		if (s->n_seen == s->cap_seen) {
			size_t cap = s->cap_seen ? s->cap_seen * 2 : 64;
			uint32_t *n = realloc(s->seen, cap * sizeof(*n));
			if (!n)
				return -ENOMEM;
			s->seen = n;
			s->cap_seen = cap;
		}
		s->seen[s->n_seen++] = r->layer;
		if (s->n_seen > TRACE_MAX_LAYERS)
			return moe_error_set(ps->err, -EINVAL, "%s:%u: more than %d layers", ps->name, line,
					     TRACE_MAX_LAYERS);
		if (s->n_rows == 0) {
			s->in_first_block = true;
			s->first_block_layer = r->layer;
		}
		s->cur_layer = r->layer;
		s->cur_count = 0;
	}

	const char *tok = sc + f[2].off;
	size_t tlen = f[2].len;
	if (s->in_first_block) {
		if (s->n_tok == s->cap_tok) {
			uint32_t cap = s->cap_tok ? s->cap_tok * 2 : 256;
			char **nt = realloc(s->tokens, cap * sizeof(*nt));
			if (!nt)
				return -ENOMEM;
			s->tokens = nt;
			size_t *nl = realloc(s->token_len, cap * sizeof(*nl));
			if (!nl)
				return -ENOMEM;
			s->token_len = nl;
			uint32_t *nb = realloc(s->batch, cap * sizeof(*nb));
			if (!nb)
				return -ENOMEM;
			s->batch = nb;
			s->cap_tok = cap;
		}
		s->tokens[s->n_tok] = malloc(tlen + 1);
		if (!s->tokens[s->n_tok])
			return -ENOMEM;
		memcpy(s->tokens[s->n_tok], tok, tlen + 1);
		s->token_len[s->n_tok] = tlen;
		s->batch[s->n_tok] = (uint32_t)batch;
		s->n_tok++;
	} else {
		uint32_t i = s->cur_count;
		if (i >= s->n_tok)
			return moe_error_set(ps->err, -EINVAL,
					     "%s:%u: layer %u has more than the %u tokens of layer %u",
					     ps->name, line, r->layer, s->n_tok, s->first_block_layer);
		if (s->token_len[i] != tlen || memcmp(s->tokens[i], tok, tlen) != 0)
			return moe_error_set(ps->err, -EINVAL,
					     "%s:%u: token %u of layer %u is \"%.40s\" but it is \"%.40s\" in layer %u",
					     ps->name, line, i, r->layer, tok, s->tokens[i], s->first_block_layer);
		if (s->batch[i] != batch)
			return moe_error_set(ps->err, -EINVAL,
					     "%s:%u: token %u of layer %u has batch %u but batch %u in layer %u",
					     ps->name, line, i, r->layer, (unsigned)batch, s->batch[i],
					     s->first_block_layer);
	}
	s->cur_count++;
	s->cur_last_line = line;
	s->n_rows++;
	return 0;
}

static int build(struct parser *ps, struct state *s, struct trace **out)
{
	uint32_t lo = UINT32_MAX, hi = 0, k = 0, maxe = 0;
	for (size_t i = 0; i < s->n_seen; i++) {
		lo = MOE_MIN(lo, s->seen[i]);
		hi = MOE_MAX(hi, s->seen[i]);
	}
	if ((uint64_t)hi - lo + 1 > TRACE_MAX_LAYERS)
		return moe_error_set(ps->err, -EINVAL, "%s: layer ids %u..%u span more than %d layers",
				     ps->name, lo, hi, TRACE_MAX_LAYERS);
	for (size_t i = 0; i < s->n_rows; i++) {
		k = MOE_MAX(k, s->rows[i].n);
		for (uint32_t j = 0; j < s->rows[i].n; j++)
			maxe = MOE_MAX(maxe, s->rows[i].ids[j]);
	}
	struct trace *tr = calloc(1, sizeof(*tr));
	if (!tr)
		return -ENOMEM;
	tr->n_tokens = s->n_tok;
	tr->n_layers = hi - lo + 1;
	tr->first_layer = lo;
	tr->k = k;
	tr->max_expert = maxe;
	size_t cells = (size_t)tr->n_tokens * tr->n_layers;
	tr->experts = malloc(cells * k * sizeof(uint16_t));
	tr->count = calloc(cells, 1);
	tr->batch = malloc(tr->n_tokens * sizeof(uint32_t));
	tr->token = calloc(tr->n_tokens, sizeof(char *));
	if (!tr->experts || !tr->count || !tr->batch || !tr->token) {
		trace_free(tr);
		return -ENOMEM;
	}
	for (size_t i = 0; i < cells * k; i++)
		tr->experts[i] = TRACE_NONE;
	/* Rows come in layer blocks of n_tokens each, token i at position i. */
	for (size_t i = 0; i < s->n_rows; i++) {
		const struct row *r = &s->rows[i];
		uint32_t t = (uint32_t)(i % s->n_tok), li = r->layer - lo;
		size_t cell = (size_t)t * tr->n_layers + li;
		tr->count[cell] = r->n;
		memcpy(&tr->experts[cell * k], r->ids, r->n * sizeof(uint16_t));
	}
	memcpy(tr->batch, s->batch, tr->n_tokens * sizeof(uint32_t));
	for (uint32_t i = 0; i < s->n_tok; i++) {
		tr->token[i] = s->tokens[i];
		s->tokens[i] = NULL;
	}
	*out = tr;
	return 0;
}

int trace_parse(const char *buf, size_t len, const char *name, struct trace **out, struct moe_error *err)
{
	struct parser ps = { .p = buf, .end = buf + len, .name = name ? name : "<buffer>", .line = 1, .err = err };
	struct state s = { 0 };
	struct field f[4];
	uint32_t line;
	int n, rc = 0;

	if (!buf)
		ps.p = ps.end = "";
	/* A UTF-8 byte order mark is not part of the header. */
	if (ps.end - ps.p >= 3 && memcmp(ps.p, "\xEF\xBB\xBF", 3) == 0)
		ps.p += 3;
	n = next_record(&ps, f, &line);
	if (n < 0) {
		rc = n;
		goto out;
	}
	if (n != 4) {
		rc = moe_error_set(err, -EINVAL, "%s:1: header must be \"Layer ID,Batch Number,Token,Activated "
				   "Expert IDs\" (got %d fields)", ps.name, n);
		goto out;
	}
	for (int i = 0; i < 4; i++) {
		if (strcmp(ps.scratch + f[i].off, header_cols[i]) != 0 || f[i].len != strlen(header_cols[i])) {
			rc = moe_error_set(err, -EINVAL, "%s:1: header column %d is \"%.40s\", expected \"%s\"",
					   ps.name, i + 1, ps.scratch + f[i].off, header_cols[i]);
			goto out;
		}
	}
	for (;;) {
		n = next_record(&ps, f, &line);
		if (n < 0) {
			rc = n;
			goto out;
		}
		if (n == 0)
			break;
		if (n == 1 && f[0].len == 0) {
			/* A blank line is only allowed as the very end of the file. */
			if (ps.p >= ps.end)
				break;
			rc = moe_error_set(err, -EINVAL, "%s:%u: empty line", ps.name, line);
			goto out;
		}
		if (n != 4) {
			rc = moe_error_set(err, -EINVAL, "%s:%u: %d fields, expected 4", ps.name, line, n);
			goto out;
		}
		if ((rc = add_row(&ps, &s, f, line)))
			goto out;
	}
	if (s.n_rows == 0) {
		rc = moe_error_set(err, -EINVAL, "%s: no data rows", ps.name);
		goto out;
	}
	if ((rc = end_block(&ps, &s)))
		goto out;
	rc = build(&ps, &s, out);
out:
	if (rc == -ENOMEM)
		moe_error_set(err, rc, "%s: out of memory", ps.name);
	for (uint32_t i = 0; i < s.n_tok; i++)
		free(s.tokens[i]);
	free(s.tokens);
	free(s.token_len);
	free(s.batch);
	free(s.rows);
	free(s.seen);
	free(ps.scratch);
	return rc;
}

int trace_load(const char *path, struct trace **out, struct moe_error *err)
{
	struct stat st;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return moe_error_set(err, -errno, "%s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size > TRACE_MAX_FILE) {
		close(fd);
		return moe_error_set(err, -EINVAL, "%s: not a regular file of at most 1 GiB", path);
	}
	size_t len = (size_t)st.st_size;
	char *buf = malloc(len ? len : 1);
	if (!buf) {
		close(fd);
		return -ENOMEM;
	}
	int rc = moe_pread_full(fd, buf, len, 0);
	close(fd);
	if (rc) {
		free(buf);
		return moe_error_set(err, rc, "%s: read: %s", path, strerror(-rc));
	}
	rc = trace_parse(buf, len, path, out, err);
	free(buf);
	return rc;
}

/* Writes s as one CSV field, quoted when it holds a comma, quote, CR or LF
 * (the same rule as Python's csv.QUOTE_MINIMAL that wrote the real files). */
static int write_field(FILE *f, const char *s)
{
	if (!strpbrk(s, ",\"\r\n"))
		return fputs(s, f) < 0 ? -EIO : 0;
	if (fputc('"', f) == EOF)
		return -EIO;
	for (; *s; s++) {
		if (*s == '"' && fputc('"', f) == EOF)
			return -EIO;
		if (fputc(*s, f) == EOF)
			return -EIO;
	}
	return fputc('"', f) == EOF ? -EIO : 0;
}

int trace_write(FILE *f, const struct trace *tr)
{
	int rc;
	if (fputs("Layer ID,Batch Number,Token,Activated Expert IDs\r\n", f) < 0)
		return -EIO;
	for (uint32_t li = 0; li < tr->n_layers; li++) {
		uint32_t present = 0;
		for (uint32_t t = 0; t < tr->n_tokens; t++)
			present += tr->count[(size_t)t * tr->n_layers + li] > 0;
		if (present == 0)
			continue;
		/* The schema has no way to say which token a row is but its position. */
		if (present != tr->n_tokens)
			return -EINVAL;
		for (uint32_t t = 0; t < tr->n_tokens; t++) {
			const uint16_t *ids = trace_row(tr, t, li);
			uint32_t n = tr->count[(size_t)t * tr->n_layers + li];
			char list[TRACE_MAX_K * 8 + 4];
			size_t o = 0;
			list[o++] = '[';
			for (uint32_t j = 0; j < n; j++)
				o += (size_t)snprintf(list + o, sizeof(list) - o, j ? ", %u" : "%u", ids[j]);
			list[o++] = ']';
			list[o] = '\0';
			if (fprintf(f, "%u,%u,", tr->first_layer + li, tr->batch[t]) < 0)
				return -EIO;
			if ((rc = write_field(f, tr->token[t] ? tr->token[t] : "")))
				return rc;
			if (fputc(',', f) == EOF || (rc = write_field(f, list)) || fputs("\r\n", f) < 0)
				return rc ? rc : -EIO;
		}
	}
	return ferror(f) ? -EIO : 0;
}
