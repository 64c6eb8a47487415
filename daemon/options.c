#include "config.h"
/* options.c - the option table and everything generated from it. */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "options.h"

static const struct option_desc options[] = {
#define CONFIG_ROW(n, field, type, mn, mx, def, rt, help) \
	{ n, type, offsetof(struct moetierd_config, field), (int64_t)(mn), (uint64_t)(mx), def, rt, help },
	OPTIONS_TABLE(CONFIG_ROW)
#undef CONFIG_ROW
};

const struct option_desc *options_table(size_t *n)
{
	*n = MOE_ARRAY_SIZE(options);
	return options;
}

const struct option_desc *options_find(const char *name)
{
	for (size_t i = 0; i < MOE_ARRAY_SIZE(options); i++)
		if (strcmp(options[i].name, name) == 0)
			return &options[i];
	return NULL;
}

static void *field(const struct moetierd_config *c, const struct option_desc *o)
{
	return (char *)c + o->offset;
}

static int parse_bool(const char *v, bool *out)
{
	if (!strcasecmp(v, "true") || !strcasecmp(v, "yes") || !strcmp(v, "1") || !strcasecmp(v, "on"))
		*out = true;
	else if (!strcasecmp(v, "false") || !strcasecmp(v, "no") || !strcmp(v, "0") || !strcasecmp(v, "off"))
		*out = false;
	else
		return -EINVAL;
	return 0;
}

static int set_opt(struct moetierd_config *c, const struct option_desc *o, const char *v,
		   struct moe_error *err)
{
	char *end;
	void *f = field(c, o);
	switch (o->type) {
	case CONFIG_STR: {
		char *d = strdup(v);
		if (!d)
			return moe_error_set(err, -ENOMEM, "out of memory");
		free(*(char **)f);
		*(char **)f = d;
		return 0;
	}
	case CONFIG_BOOL:
		if (parse_bool(v, (bool *)f))
			return moe_error_set(err, -EINVAL, "%s: expected true or false, got '%s'", o->name, v);
		return 0;
	case CONFIG_SIZE: {
		uint64_t x;
		if (moe_parse_size(v, &x))
			return moe_error_set(err, -EINVAL, "%s: bad size '%s'", o->name, v);
		if (x < (uint64_t)o->min || x > o->max)
			return moe_error_set(err, -ERANGE, "%s: %s is out of range [%" PRId64 ", %" PRIu64 "]",
					     o->name, v, o->min, o->max);
		*(uint64_t *)f = x;
		return 0;
	}
	case CONFIG_U32: {
		errno = 0;
		if (*v == '-')
			return moe_error_set(err, -ERANGE, "%s: must not be negative", o->name);
		unsigned long long x = strtoull(v, &end, 0);
		if (errno || end == v || *end)
			return moe_error_set(err, -EINVAL, "%s: bad number '%s'", o->name, v);
		if (x < (unsigned long long)o->min || x > o->max)
			return moe_error_set(err, -ERANGE, "%s: %s is out of range [%" PRId64 ", %" PRIu64 "]",
					     o->name, v, o->min, o->max);
		*(uint32_t *)f = (uint32_t)x;
		return 0;
	}
	case CONFIG_I32: {
		errno = 0;
		long long x = strtoll(v, &end, 0);
		if (errno || end == v || *end)
			return moe_error_set(err, -EINVAL, "%s: bad number '%s'", o->name, v);
		if (x < o->min || (x >= 0 && (uint64_t)x > o->max))
			return moe_error_set(err, -ERANGE, "%s: %s is out of range [%" PRId64 ", %" PRIu64 "]",
					     o->name, v, o->min, o->max);
		*(int32_t *)f = (int32_t)x;
		return 0;
	}
	}
	return -EINVAL;
}

void options_init(struct moetierd_config *c)
{
	memset(c, 0, sizeof(*c));
	for (size_t i = 0; i < MOE_ARRAY_SIZE(options); i++) {
		struct moe_error err;
		/* Defaults are part of the table and checked by the tests. */
		if (set_opt(c, &options[i], options[i].def, &err))
			abort();
	}
}

void options_free(struct moetierd_config *c)
{
	for (size_t i = 0; i < MOE_ARRAY_SIZE(options); i++)
		if (options[i].type == CONFIG_STR) {
			free(*(char **)field(c, &options[i]));
			*(char **)field(c, &options[i]) = NULL;
		}
}

int options_set(struct moetierd_config *c, const char *name, const char *value, struct moe_error *err)
{
	const struct option_desc *o = options_find(name);
	if (!o)
		return moe_error_set(err, -ENOENT, "unknown option '%s'", name);
	if (!value)
		return moe_error_set(err, -EINVAL, "%s: missing value", name);
	int rc = set_opt(c, o, value, err);
	if (rc == 0 && o->type == CONFIG_U32 && !strcmp(o->name, "ring-entries")) {
		uint32_t v = c->ring_entries;
		if (v & (v - 1))
			return moe_error_set(err, -EINVAL, "ring-entries: %u is not a power of two", v);
	}
	if (rc == 0 && !strcmp(o->name, "log-level") && strcmp(value, "err") && strcmp(value, "warn") &&
	    strcmp(value, "info") && strcmp(value, "debug"))
		return moe_error_set(err, -EINVAL, "log-level: expected err, warn, info or debug, got '%s'", value);
	return rc;
}

static int fmt_opt(const struct moetierd_config *c, const struct option_desc *o, char *buf, size_t len)
{
	const void *f = field(c, o);
	int n;
	switch (o->type) {
	case CONFIG_STR: n = snprintf(buf, len, "%s", *(char *const *)f ? *(char *const *)f : ""); break;
	case CONFIG_BOOL: n = snprintf(buf, len, "%s", *(const bool *)f ? "true" : "false"); break;
	case CONFIG_U32:
		n = !strcmp(o->name, "socket-mode") ? snprintf(buf, len, "0%o", *(const uint32_t *)f)
						    : snprintf(buf, len, "%" PRIu32, *(const uint32_t *)f);
		break;
	case CONFIG_I32: n = snprintf(buf, len, "%" PRId32, *(const int32_t *)f); break;
	case CONFIG_SIZE: {
		uint64_t v = *(const uint64_t *)f;
		static const char units[] = "KMGT";
		int u = -1;
		while (v && v % 1024 == 0 && u < 3) {
			v /= 1024;
			u++;
		}
		n = u < 0 ? snprintf(buf, len, "%" PRIu64, v) : snprintf(buf, len, "%" PRIu64 "%c", v, units[u]);
		break;
	}
	default: return -EINVAL;
	}
	return n < 0 || (size_t)n >= len ? -ENOSPC : 0;
}

int options_get(const struct moetierd_config *c, const char *name, char *buf, size_t len)
{
	const struct option_desc *o = options_find(name);
	if (!o)
		return -ENOENT;
	return fmt_opt(c, o, buf, len);
}

static char *trim(char *s)
{
	while (isspace((unsigned char)*s))
		s++;
	char *e = s + strlen(s);
	while (e > s && isspace((unsigned char)e[-1]))
		*--e = '\0';
	return s;
}

int options_load_file(struct moetierd_config *c, const char *path, struct moe_error *err)
{
	FILE *f = fopen(path, "re");
	char line[4096];
	unsigned lineno = 0;
	int rc = 0;
	if (!f)
		return moe_error_set(err, -errno, "%s: %s", path, strerror(errno));
	while (fgets(line, sizeof(line), f)) {
		lineno++;
		if (!strchr(line, '\n') && !feof(f)) {
			rc = moe_error_set(err, -EINVAL, "%s:%u: line too long", path, lineno);
			break;
		}
		char *s = trim(line);
		if (!*s || *s == '#')
			continue;
		char *eq = strchr(s, '=');
		if (!eq) {
			rc = moe_error_set(err, -EINVAL, "%s:%u: expected 'name = value'", path, lineno);
			break;
		}
		*eq = '\0';
		char *name = trim(s), *val = trim(eq + 1);
		size_t vl = strlen(val);
		if (vl >= 2 && val[0] == '"' && val[vl - 1] == '"') {
			val[vl - 1] = '\0';
			val++;
		}
		rc = options_set(c, name, val, err);
		if (rc) {
			moe_error_prefix(err, rc, "%s:%u", path, lineno);
			break;
		}
	}
	fclose(f);
	return rc;
}

void options_dump(FILE *f, const struct moetierd_config *c)
{
	char buf[4096];
	fprintf(f, "# /etc/moetier/moetierd.conf - moetierd options (moetierd.conf(5)).\n"
		   "# Generated by `moetierd --dump-config`: every option with its default.\n"
		   "# Command-line flags (--name=value) override this file.\n");
	for (size_t i = 0; i < MOE_ARRAY_SIZE(options); i++) {
		const struct option_desc *o = &options[i];
		if (fmt_opt(c, o, buf, sizeof(buf)))
			buf[0] = '\0';
		fprintf(f, "\n# %s%s\n", o->help, o->runtime ? " (settable at run time)" : "");
		fprintf(f, "%s = %s%s%s\n", o->name, o->type == CONFIG_STR ? "\"" : "", buf,
			o->type == CONFIG_STR ? "\"" : "");
	}
}

static const char *type_word(enum config_type t)
{
	switch (t) {
	case CONFIG_STR: return "STR";
	case CONFIG_SIZE: return "SIZE";
	case CONFIG_U32: case CONFIG_I32: return "N";
	case CONFIG_BOOL: return "";
	}
	return "";
}

void options_usage(FILE *f, const char *prog)
{
	fprintf(f, "usage: %s [OPTION]... [PACK]...\n"
		   "Serves the routed experts of MoE models to local inference processes.\n\n"
		   "  --config=PATH        read options from PATH (default " CONFIG_DEFAULT_PATH " if present)\n"
		   "  --dump-config        print every option as a configuration file and exit\n"
		   "  --help, --version\n", prog);
	for (size_t i = 0; i < MOE_ARRAY_SIZE(options); i++) {
		const struct option_desc *o = &options[i];
		char left[64];
		if (o->type == CONFIG_BOOL)
			snprintf(left, sizeof(left), "--[no-]%s", o->name);
		else
			snprintf(left, sizeof(left), "--%s=%s", o->name, type_word(o->type));
		fprintf(f, "  %-24s %s [%s]\n", left, o->help, o->def);
	}
}

int options_parse_args(struct moetierd_config *c, int argc, char **argv, bool *dump, bool *help,
		      bool *version, struct moe_error *err)
{
	const char *conf = NULL;
	int rc;

	*dump = *help = *version = false;
	/* First pass: --config and the informational flags, so the file is
	 * applied before the flags that override it. */
	for (int i = 1; i < argc; i++) {
		if (!strncmp(argv[i], "--config=", 9)) {
			conf = argv[i] + 9;
		} else if (!strcmp(argv[i], "--config")) {
			if (i + 1 >= argc)
				return moe_error_set(err, -EINVAL, "--config needs a path");
			conf = argv[++i];
		} else if (!strcmp(argv[i], "--")) {
			break;
		}
	}
	if (!conf) {
		struct stat st;
		if (stat(CONFIG_DEFAULT_PATH, &st) == 0)
			conf = CONFIG_DEFAULT_PATH;
	}
	if (conf && *conf && (rc = options_load_file(c, conf, err)))
		return rc;

	bool packs_from_cli = false, opts_done = false;
	for (int i = 1; i < argc; i++) {
		char *a = argv[i];
		if (!opts_done && a[0] == '-') {
			if (!strcmp(a, "--")) { opts_done = true; continue; }
			if (!strcmp(a, "--help") || !strcmp(a, "-h")) { *help = true; continue; }
			if (!strcmp(a, "--version") || !strcmp(a, "-V")) { *version = true; continue; }
			if (!strcmp(a, "--dump-config")) { *dump = true; continue; }
			if (!strcmp(a, "--config")) { i++; continue; }
			if (!strncmp(a, "--config=", 9)) continue;
			if (!strcmp(a, "-f")) { c->foreground = true; continue; }
			if (a[1] != '-')
				return moe_error_set(err, -EINVAL, "unknown option '%s' (see --help)", a);
			char name[128];
			const char *val = NULL;
			const char *eq = strchr(a + 2, '=');
			size_t nl = eq ? (size_t)(eq - (a + 2)) : strlen(a + 2);
			if (nl >= sizeof(name))
				return moe_error_set(err, -EINVAL, "unknown option '%s'", a);
			memcpy(name, a + 2, nl);
			name[nl] = '\0';
			const struct option_desc *o = options_find(name);
			if (!o && !strncmp(name, "no-", 3) && !eq) {
				o = options_find(name + 3);
				if (o && o->type == CONFIG_BOOL) {
					*(bool *)field(c, o) = false;
					continue;
				}
				o = NULL;
			}
			if (!o)
				return moe_error_set(err, -EINVAL, "unknown option '--%s' (see --help)", name);
			if (eq)
				val = eq + 1;
			else if (o->type == CONFIG_BOOL)
				val = "true";
			else if (i + 1 < argc)
				val = argv[++i];
			else
				return moe_error_set(err, -EINVAL, "--%s needs a value", name);
			if (!strcmp(o->name, "pack"))
				packs_from_cli = true;
			if ((rc = options_set(c, name, val, err)))
				return rc;
			continue;
		}
		/* Positional: a pack (replaces the file's list, then appends). */
		const char *old = packs_from_cli ? c->pack : "";
		char *joined;
		if (asprintf(&joined, "%s%s%s", old, *old ? "," : "", a) < 0)
			return moe_error_set(err, -ENOMEM, "out of memory");
		free(c->pack);
		c->pack = joined;
		packs_from_cli = true;
	}
	return 0;
}
