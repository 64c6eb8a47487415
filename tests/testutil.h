/* testutil.h - helpers for the Criterion tests: temporary directories, paths
 * to the build tree and ../shared, running the built tools. Header-only so
 * each test binary stays a single .c file. */
#ifndef MOETIER_TESTUTIL_H
#define MOETIER_TESTUTIL_H

#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* A fresh directory under $TMPDIR (or /tmp); tests run in parallel, so every
 * test makes its own. Returns a malloc'd path; aborts on failure. */
static inline char *tu_mkdtemp(const char *tag)
{
	const char *base = getenv("TMPDIR");
	size_t len;
	char *p;
	if (!base || !*base)
		base = "/tmp";
	/* snprintf, not asprintf: tests may include this before _GNU_SOURCE */
	len = strlen(base) + strlen(tag) + 32;
	p = malloc(len);
	if (!p || snprintf(p, len, "%s/moetier-%s-XXXXXX", base, tag) < 0 || !mkdtemp(p)) {
		perror("tu_mkdtemp");
		abort();
	}
	return p;
}

/* rm -rf path (no symlink following; plain readdir so this header needs no
 * feature macros). */
static inline void tu__rm(const char *path)
{
	struct stat st;
	if (lstat(path, &st) != 0)
		return;
	if (S_ISDIR(st.st_mode)) {
		DIR *d = opendir(path);
		struct dirent *de;
		while (d && (de = readdir(d))) {
			size_t n;
			char *sub;
			if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
				continue;
			n = strlen(path) + strlen(de->d_name) + 2;
			sub = malloc(n);
			if (!sub)
				break;
			memcpy(sub, path, strlen(path));
			sub[strlen(path)] = '/';
			memcpy(sub + strlen(path) + 1, de->d_name, strlen(de->d_name) + 1);
			tu__rm(sub);
			free(sub);
		}
		if (d)
			closedir(d);
		rmdir(path);
	} else {
		unlink(path);
	}
}

/* rm -rf path, then free it. */
static inline void tu_rmtree(char *path)
{
	if (path) {
		tu__rm(path);
		free(path);
	}
}

/* $MOETIER_BUILDDIR/rel (set by make check), or ./rel. Returns a static buffer. */
static inline const char *tu_build_path(const char *rel)
{
	static __thread char buf[4096];
	const char *b = getenv("MOETIER_BUILDDIR");
	snprintf(buf, sizeof(buf), "%s/%s", b && *b ? b : ".", rel);
	return buf;
}

/* The MoE-Beyond trace directory under ../shared, or NULL when absent. */
static inline const char *tu_traces_dir(void)
{
	static __thread char buf[4096];
	const char *s = getenv("MOETIER_SHARED");
	struct stat st;
	snprintf(buf, sizeof(buf), "%s/traces/moe-beyond/training_data_eamc_1_1000", s && *s ? s : "../shared");
	return stat(buf, &st) == 0 && S_ISDIR(st.st_mode) ? buf : NULL;
}

/* Runs a shell command (printf-style), returns its exit status (or 128+sig). */
static inline int tu_sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static inline int tu_sh(const char *fmt, ...)
{
	char cmd[8192];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	int st = system(cmd);
	if (st == -1)
		return -1;
	if (WIFEXITED(st))
		return WEXITSTATUS(st);
	return 128 + WTERMSIG(st);
}

/* Writes len bytes to path; returns 0 or -1. */
static inline int tu_write_file(const char *path, const void *buf, size_t len)
{
	FILE *f = fopen(path, "wb");
	if (!f)
		return -1;
	size_t n = fwrite(buf, 1, len, f);
	return (fclose(f) == 0 && n == len) ? 0 : -1;
}

/* Reads a whole file (malloc'd, NUL-terminated); NULL on error. */
static inline char *tu_read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	char *buf = NULL;
	long n;
	if (!f)
		return NULL;
	if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0 &&
	    (buf = malloc((size_t)n + 1)) && fread(buf, 1, (size_t)n, f) == (size_t)n) {
		buf[n] = '\0';
		if (len)
			*len = (size_t)n;
	} else {
		free(buf);
		buf = NULL;
	}
	fclose(f);
	return buf;
}

#endif
