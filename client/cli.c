/* cli.c - see cli.h. */
#include "config.h"

#include <string.h>

#include "cli.h"

int cli_parse_global(struct cli_global *g, int argc, char **argv)
{
	int i = 1;
	for (; i < argc; i++) {
		if (!strcmp(argv[i], "--socket") && i + 1 < argc) {
			g->sock_path = argv[++i];
		} else if (!strncmp(argv[i], "--socket=", 9)) {
			g->sock_path = argv[i] + 9;
		} else if (!strcmp(argv[i], "--model") && i + 1 < argc) {
			g->model_name = argv[++i];
		} else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			g->usage(stdout);
			return -1;
		} else if (!strcmp(argv[i], "--version")) {
			printf("%s %s\n", g->prog, PACKAGE_VERSION);
			return -1;
		} else if (!g->extra || !g->extra(argc, argv, &i)) {
			break;
		}
	}
	if (i >= argc) {
		g->usage(stderr);
		return -2;
	}
	return i;
}
