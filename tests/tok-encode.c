/* tok-encode - the ids moe-run's tokenizer gives a text, for comparing with
 * llama.cpp (tests/test_tokenizer_llama.sh):
 *   tok-encode [--no-add-special] [--no-parse-special] MODEL.gguf TEXT
 *   tok-encode [...] MODEL.gguf -f FILE       (the text from a file)
 *   tok-encode [...] MODEL.gguf -b FILE       (texts separated as in llama.cpp's
 *                                             vocab tests: "\n__ggml_vocab_test__\n")
 *   tok-encode --decode MODEL.gguf 1,2,3      (the concatenated pieces)
 * Ids are printed comma-separated, one line per text. Exit status 3: the
 * GGUF's tokenizer is one moe-run does not have (e.g. moe-gen's "no_vocab"). */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "tokenizer.h"

static int usage(void)
{
	fprintf(stderr, "usage: tok-encode [--no-add-special] [--no-parse-special] MODEL.gguf (TEXT | -f FILE | -b FILE)\n"
			"       tok-encode --decode MODEL.gguf ID,ID,...\n");
	return 2;
}

static char *slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return NULL;
	size_t cap = 4096, n = 0;
	char *b = malloc(cap);
	while (b) {
		n += fread(b + n, 1, cap - n, f);
		if (n < cap)
			break;
		char *nb = realloc(b, cap * 2);
		if (!nb) {
			free(b);
			b = NULL;
			break;
		}
		b = nb;
		cap *= 2;
	}
	fclose(f);
	*len = n;
	return b;
}

int main(int argc, char **argv)
{
	bool add_special = true, parse_special = true, decode = false;
	int i = 1;
	for (; i < argc && argv[i][0] == '-' && argv[i][1] == '-'; i++) {
		if (strcmp(argv[i], "--no-add-special") == 0)
			add_special = false;
		else if (strcmp(argv[i], "--no-parse-special") == 0)
			parse_special = false;
		else if (strcmp(argv[i], "--decode") == 0)
			decode = true;
		else
			return usage();
	}
	if (argc - i < 2)
		return usage();

	struct moe_error err = { { 0 } };
	struct gguf_file *g;
	struct tokenizer *t;
	if (gguf_open(argv[i], &g, &err) < 0) {
		fprintf(stderr, "tok-encode: %s\n", err.msg);
		return 1;
	}
	int lrc = tokenizer_load(g, &t, &err);
	gguf_close(g);
	if (lrc < 0) {
		fprintf(stderr, "tok-encode: %s\n", err.msg);
		return lrc == -ENOTSUP ? 3 : 1;
	}

	int rc = 0;
	if (decode) {
		char *s = argv[i + 1], *end;
		char piece[4096];
		while (*s) {
			long id = strtol(s, &end, 10);
			if (end == s)
				break;
			int n = tokenizer_piece(t, (int32_t)id, piece, sizeof(piece));
			if (n < 0) {
				fprintf(stderr, "tok-encode: id %ld: %s\n", id, strerror(-n));
				rc = 1;
				break;
			}
			fwrite(piece, 1, (size_t)n, stdout);
			s = *end ? end + 1 : end;
		}
		putchar('\n');
	} else {
		char *text;
		size_t len;
		bool owned = false, batch = false;
		if (strcmp(argv[i + 1], "-f") == 0 || strcmp(argv[i + 1], "-b") == 0) {
			batch = argv[i + 1][1] == 'b';
			if (argc - i < 3 || !(text = slurp(argv[i + 2], &len))) {
				fprintf(stderr, "tok-encode: cannot read the text file\n");
				tokenizer_free(t);
				return 1;
			}
			owned = true;
		} else {
			text = argv[i + 1];
			len = strlen(text);
		}
		static const char sep[] = "\n__ggml_vocab_test__\n";
		for (size_t pos = 0; rc == 0;) {
			size_t end = len;
			if (batch) {
				const char *hit = memmem(text + pos, len - pos, sep, sizeof(sep) - 1);
				if (hit)
					end = (size_t)(hit - text);
			}
			int32_t *ids;
			size_t n;
			if (tokenizer_encode(t, text + pos, end - pos, add_special, parse_special, &ids, &n, &err) < 0) {
				fprintf(stderr, "tok-encode: %s\n", err.msg);
				rc = 1;
				break;
			}
			for (size_t k = 0; k < n; k++)
				printf("%s%d", k ? "," : "", ids[k]);
			putchar('\n');
			free(ids);
			if (end == len)
				break;
			pos = end + sizeof(sep) - 1;
			if (pos == len)
				break;   /* a final separator ends the list, as in llama.cpp's reader */
		}
		if (owned)
			free(text);
	}
	tokenizer_free(t);
	return rc;
}
