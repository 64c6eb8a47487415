/* cli.h - the global options moe-client and moectl share, parsed one way:
 * --socket PATH (or --socket=PATH), --model NAME, --help/-h, --version. */
#ifndef MOETIER_CLI_H
#define MOETIER_CLI_H

#include <stdio.h>

struct cli_global {
	const char *prog;             /* for --version */
	void (*usage)(FILE *f);
	const char *sock_path;        /* NULL: the library's default */
	const char *model_name;       /* NULL: the daemon's only model */
	/* A program's own global option at argv[*i] (with its value at
	 * argv[*i + 1] when it takes one): return 1 and advance *i past what
	 * it used, or 0 when it is not one. NULL: none. */
	int (*extra)(int argc, char **argv, int *i);
};

/* Parses the global options from argv[1]. Returns the index of the command
 * word, or -1 after --help/--version (0 to exit with) or -2 on a missing
 * command (usage printed to stderr: exit 2). */
int cli_parse_global(struct cli_global *g, int argc, char **argv);

#endif
