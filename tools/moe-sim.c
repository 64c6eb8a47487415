/* moe-sim - offline replay of routing traces through moetierd's own eviction
 * policies, predictors, prefetch scheduler and routing code (see moe-sim(1)). */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "sim.h"

struct opts {
	struct sim_config sc;
	const char *model_path;
	const char *out;
	const char *plot;
	const char *policies;
	const char *sizes;
	uint32_t range_lo, range_hi;
	bool prefetch;
	double fit_fraction;
	uint32_t epochs;
	bool verbose;
	bool brief;
};

static void usage(FILE *f)
{
	fputs("usage: moe-sim replay  [options] TRACE|DIR...\n"
	      "       moe-sim compare [options] [--policies P,..] [--plot FILE.svg] [--sizes C,..] TRACE|DIR...\n"
	      "       moe-sim train --out MODEL [--fit-fraction F] [--epochs N] TRACE|DIR...\n"
	      "options:\n"
	      "  --policy P          lru lfu lfru leaststale arc belady (default lru)\n"
	      "  --cache C           GPU slots per layer (default 6)\n"
	      "  --global            one budget of C x layers shared by all layers\n"
	      "  --warm              keep the cache across prompts (default: cold per prompt)\n"
	      "  --predictor X       temporal coact tokenid tracematch learned combo\n"
	      "  --model FILE        predictor model from moe-sim train\n"
	      "  --prefetch on|off   (default on when a predictor is given)\n"
	      "  --untimed           prefetches arrive at once (predictor quality)\n"
	      "  --cost-model SPEC   h2d=BPS,nvme=BPS,layer=SEC,bytes=N,host=SLOTS,dense=N\n"
	      "  --lookahead H       fixed look-ahead in layers, 1..16 (default adaptive 1..6)\n"
	      "  --no-deadline       timed: issue prefetches even when they cannot land in time\n"
	      "  --max-prefetch N    prefetches per layer plan (default 3)\n"
	      "  --min-score F       score for a prefetch into a free slot (default 0.3)\n"
	      "  --gain F            score gain over the victim to replace it (default 0.2)\n"
	      "  --route-keep J      cache-aware routing keeping the router's top-J (0 = exact)\n"
	      "  --route-margin M    logit margin for a substitution (default 1.0)\n"
	      "  --range A-B         only prompt_N files with A <= N <= B from directories\n"
	      "  --experts N         experts per layer (default: 64, or the traces' largest id + 1)\n"
	      "  --brief             replay: one line of key=value results\n",
	      f);
}

/* ---- trace lists ---- */

struct tlist {
	char **path;
	uint32_t *num;
	size_t n, cap;
};

static int prompt_number(const char *name, uint32_t *num)
{
	const char *b = strrchr(name, '/');
	unsigned long v;
	char *end;
	b = b ? b + 1 : name;
	if (strncmp(b, "prompt_", 7) != 0)
		return -1;
	v = strtoul(b + 7, &end, 10);
	if (end == b + 7 || v > UINT32_MAX)
		return -1;
	*num = (uint32_t)v;
	return 0;
}

static int tl_add(struct tlist *tl, const char *path, uint32_t num)
{
	if (tl->n == tl->cap) {
		size_t c = tl->cap ? tl->cap * 2 : 64;
		char **p = realloc(tl->path, c * sizeof(*p));
		uint32_t *nu = p ? realloc(tl->num, c * sizeof(*nu)) : NULL;
		if (!p || !nu) {
			if (p)
				tl->path = p;
			return -ENOMEM;
		}
		tl->path = p;
		tl->num = nu;
		tl->cap = c;
	}
	tl->path[tl->n] = strdup(path);
	if (!tl->path[tl->n])
		return -ENOMEM;
	tl->num[tl->n++] = num;
	return 0;
}

static void tl_sort(struct tlist *tl)
{
	for (size_t i = 1; i < tl->n; i++)
		for (size_t j = i; j > 0 && tl->num[j] < tl->num[j - 1]; j--) {
			char *p = tl->path[j];
			uint32_t n = tl->num[j];
			tl->path[j] = tl->path[j - 1];
			tl->num[j] = tl->num[j - 1];
			tl->path[j - 1] = p;
			tl->num[j - 1] = n;
		}
}

static int collect(struct tlist *tl, char **args, int n, const struct opts *o)
{
	for (int i = 0; i < n; i++) {
		struct stat st;
		if (stat(args[i], &st) < 0) {
			fprintf(stderr, "moe-sim: %s: %s\n", args[i], strerror(errno));
			return -1;
		}
		if (!S_ISDIR(st.st_mode)) {
			uint32_t num = 0;
			if (prompt_number(args[i], &num) < 0)
				num = (uint32_t)tl->n;
			if (tl_add(tl, args[i], num) < 0)
				return -1;
			continue;
		}
		DIR *d = opendir(args[i]);
		struct dirent *de;
		if (!d) {
			fprintf(stderr, "moe-sim: %s: %s\n", args[i], strerror(errno));
			return -1;
		}
		while ((de = readdir(d))) {
			uint32_t num;
			size_t len = strlen(de->d_name);
			char path[4096];
			if (len < 5 || strcmp(de->d_name + len - 4, ".csv") != 0 || prompt_number(de->d_name, &num) < 0)
				continue;
			if (o->range_hi && (num < o->range_lo || num > o->range_hi))
				continue;
			snprintf(path, sizeof(path), "%s/%s", args[i], de->d_name);
			if (stat(path, &st) == 0 && st.st_size == 0)
				continue; /* prompt 317 of the MoE-Beyond set is empty */
			if (tl_add(tl, path, num) < 0) {
				closedir(d);
				return -1;
			}
		}
		closedir(d);
	}
	tl_sort(tl);
	return tl->n ? 0 : -1;
}

/* Router logits of the traces that have them (TRACE.logits beside the CSV,
 * from moe-run --dump-routing): [n] pointers, NULL where absent. */
static float **trace_logits;
static uint32_t logits_experts; /* their n_experts (0: none loaded) */
static size_t n_logits;

static struct trace **load_all(const struct tlist *tl)
{
	struct trace **tr = calloc(tl->n ? tl->n : 1, sizeof(*tr));
	struct moe_error err;
	if (!tr || !(trace_logits = calloc(tl->n ? tl->n : 1, sizeof(*trace_logits)))) {
		free(tr);
		return NULL;
	}
	for (size_t i = 0; i < tl->n; i++) {
		char path[4096];
		uint32_t ne = 0;
		int rc = trace_load(tl->path[i], &tr[i], &err);
		if (rc == 0) {
			snprintf(path, sizeof(path), "%s.logits", tl->path[i]);
			rc = sim_logits_load(path, tr[i], &trace_logits[i], &ne, &err);
			if (rc == -ENOENT)
				rc = 0;
			else if (rc == 0 && logits_experts && ne != logits_experts)
				rc = moe_error_set(&err, -EINVAL, "%s: %u experts, an earlier trace's logits %u", path, ne,
						   logits_experts);
			else if (rc == 0)
				logits_experts = ne;
			if (rc == 0 && trace_logits[i])
				n_logits++;
		} else {
			trace_logits[i] = NULL;
		}
		if (rc < 0) {
			fprintf(stderr, "moe-sim: %s\n", err.msg);
			for (size_t j = 0; j <= i; j++) {
				if (tr[j])
					trace_free(tr[j]);
				free(trace_logits[j]);
			}
			free(tr);
			free(trace_logits);
			trace_logits = NULL;
			return NULL;
		}
	}
	return tr;
}

static void free_all(struct trace **tr, size_t n)
{
	for (size_t i = 0; tr && i < n; i++) {
		trace_free(tr[i]);
		if (trace_logits)
			free(trace_logits[i]);
	}
	free(tr);
	free(trace_logits);
	trace_logits = NULL;
}

/* ---- running ---- */

static uint32_t experts_of(struct trace **tr, size_t n, uint32_t given)
{
	uint32_t mx = 0;
	for (size_t i = 0; i < n; i++)
		if (tr[i]->max_expert > mx)
			mx = tr[i]->max_expert;
	if (given)
		return given;
	if (logits_experts)
		return logits_experts; /* the router's width */
	return mx + 1 > 64 ? mx + 1 : 64;
}

static int run_sim(const struct sim_config *sc, struct trace **tr, size_t n, uint32_t E, struct sim_stats *out)
{
	struct sim *s;
	struct moe_error err;
	uint32_t k = 0;
	for (size_t i = 0; i < n; i++)
		if (tr[i]->k > k)
			k = tr[i]->k;
	if (sim_create(sc, tr[0]->n_layers, E, k, &s, &err) < 0) {
		fprintf(stderr, "moe-sim: %s\n", err.msg);
		return -1;
	}
	for (size_t i = 0; i < n; i++) {
		const float *lg = trace_logits && E == logits_experts ? trace_logits[i] : NULL;
		if (sim_run_trace_logits(s, tr[i], lg, &err) < 0) {
			fprintf(stderr, "moe-sim: trace %zu: %s\n", i, err.msg);
			sim_destroy(s);
			return -1;
		}
	}
	*out = *sim_stats(s);
	sim_destroy(s);
	return 0;
}

static void print_stats(const struct sim_config *sc, const struct sim_stats *st)
{
	double tl = st->token_layers ? (double)st->token_layers : 1.0;
	printf("prompts %llu tokens %llu token-layers %llu expert-accesses %llu\n",
	       (unsigned long long)st->prompts, (unsigned long long)st->tokens,
	       (unsigned long long)st->token_layers, (unsigned long long)st->accesses);
	printf("gpu tier:  hit rate %.4f (%llu hits, %llu misses)\n", sim_hit_rate(st),
	       (unsigned long long)st->hits, (unsigned long long)st->misses);
	if (sc->cost.host_slots)
		printf("host tier: hit rate %.4f (%llu hits, %llu misses from NVMe)\n",
		       st->host_hits + st->host_misses ? (double)st->host_hits / (double)(st->host_hits + st->host_misses) : 0.0,
		       (unsigned long long)st->host_hits, (unsigned long long)st->host_misses);
	else
		printf("host tier: every expert resident (host hit rate 1.0)\n");
	printf("bytes moved: host->gpu %.3f GB, nvme->host %.3f GB; loads per token-layer %.3f\n",
	       (double)st->gpu_bytes / 1e9, (double)st->nvme_bytes / 1e9,
	       sim_loads_per_tl(st, sc->cost.expert_bytes));
	if (sc->timed)
		printf("time: %.3f s simulated, stall %.3f s (%.3f ms per token)\n", (double)st->time_ns / 1e9,
		       (double)st->stall_ns / 1e9, st->tokens ? (double)st->stall_ns / 1e6 / (double)st->tokens : 0.0);
	if (sc->predictor)
		printf("prefetch: issued %llu, used %llu, wasted %llu, cancelled %llu (withdrawn unstarted when their layer "
		       "passed: %llu), late %llu, layer plans cut by the deadline %llu; precision %.4f recall %.4f; "
		       "predictor+plan %.2f us per token-layer\n",
		       (unsigned long long)st->pf_issued, (unsigned long long)st->pf_useful,
		       (unsigned long long)st->pf_wasted, (unsigned long long)st->pf_cancelled,
		       (unsigned long long)st->pf_withdrawn, (unsigned long long)st->pf_late,
		       (unsigned long long)st->pf_cut, sim_pf_precision(st),
		       sim_pf_recall(st),
		       (double)st->pred_ns / 1e3 / tl);
	if (sc->route_keep)
		printf("routing: cache-aware J=%u margin %.2f (%s): substitution rate %.4f of slots "
		       "(%llu of %llu open slots)\n", sc->route_keep, (double)sc->route_margin,
		       n_logits ? "router logits from the traces' .logits files" : "synthetic logits",
		       st->accesses ? (double)st->route_subst / (double)st->accesses : 0.0,
		       (unsigned long long)st->route_subst, (unsigned long long)st->route_slots_open);
	if (st->route_mismatch)
		printf("routing: %llu rows whose logits' top-k is not the trace's (routed by the logits)\n",
		       (unsigned long long)st->route_mismatch);
}

static int parse_cost(struct sim_cost *c, const char *spec)
{
	char *dup = strdup(spec), *save = NULL, *tok;
	int rc = 0;
	if (!dup)
		return -1;
	for (tok = strtok_r(dup, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(tok, '='), *end;
		double v;
		if (!eq) {
			rc = -1;
			break;
		}
		*eq = '\0';
		v = strtod(eq + 1, &end);
		if (*end || !(v >= 0) || !isfinite(v)) {
			rc = -1;
			break;
		}
		if (strcmp(tok, "h2d") == 0)
			c->h2d_bw = v;
		else if (strcmp(tok, "nvme") == 0)
			c->nvme_bw = v;
		else if (strcmp(tok, "layer") == 0)
			c->layer_s = v;
		else if (strcmp(tok, "bytes") == 0)
			c->expert_bytes = (uint64_t)v;
		else if (strcmp(tok, "host") == 0)
			c->host_slots = (uint32_t)v;
		else if (strcmp(tok, "dense") == 0 && v <= 1000)
			c->dense_layers = (uint32_t)v;
		else {
			rc = -1;
			break;
		}
	}
	free(dup);
	return rc;
}

static int num_arg(const char *s, double lo, double hi, double *out)
{
	char *end;
	double v = strtod(s, &end);
	if (*s == '\0' || *end || !(v >= lo && v <= hi))
		return -1;
	*out = v;
	return 0;
}

/* SVG: hit rate vs cache size, one polyline per policy. */
static int write_svg(const char *path, char **names, size_t np, const uint32_t *sizes, size_t ns,
		     const double *hit /* [np][ns] */)
{
	static const char *const col[] = { "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#000000",
					   "#8c564b", "#e377c2" };
	FILE *f = fopen(path, "w");
	double W = 640, H = 420, x0 = 60, y0 = 370, xw = 460, yh = 330;
	uint32_t smax = sizes[ns - 1];
	if (!f) {
		fprintf(stderr, "moe-sim: %s: %s\n", path, strerror(errno));
		return -1;
	}
	fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" font-size=\"12\">\n", W, H);
	fprintf(f, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
	fprintf(f, "<text x=\"%.0f\" y=\"20\">GPU hit rate vs cache size (slots per layer)</text>\n", x0);
	fprintf(f, "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"black\"/>\n", x0, y0, x0 + xw, y0);
	fprintf(f, "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"black\"/>\n", x0, y0, x0, y0 - yh);
	for (int i = 0; i <= 10; i += 2)
		fprintf(f, "<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%.1f</text>\n", x0 - 4, y0 - yh * i / 10.0 + 4, i / 10.0);
	for (size_t j = 0; j < ns; j++)
		fprintf(f, "<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%u</text>\n", x0 + xw * sizes[j] / smax, y0 + 16,
			sizes[j]);
	for (size_t p = 0; p < np; p++) {
		fprintf(f, "<polyline fill=\"none\" stroke-width=\"2\" stroke=\"%s\" points=\"", col[p % 8]);
		for (size_t j = 0; j < ns; j++)
			fprintf(f, "%.1f,%.1f ", x0 + xw * sizes[j] / smax, y0 - yh * hit[p * ns + j]);
		fprintf(f, "\"/>\n<text x=\"%.0f\" y=\"%.0f\" fill=\"%s\">%s</text>\n", x0 + xw + 10, 50 + 16.0 * p,
			col[p % 8], names[p]);
	}
	fputs("</svg>\n", f);
	return fclose(f) == 0 ? 0 : -1;
}

static int split_list(const char *s, char ***out, size_t *n)
{
	char *dup = strdup(s), *save = NULL, *tok;
	size_t cap = 16;
	*out = calloc(cap, sizeof(char *));
	*n = 0;
	if (!dup || !*out)
		return -1;
	for (tok = strtok_r(dup, ",", &save); tok && *n < cap; tok = strtok_r(NULL, ",", &save))
		(*out)[(*n)++] = strdup(tok);
	free(dup);
	return *n ? 0 : -1;
}

static int cmd_compare(struct opts *o, struct trace **tr, size_t n, uint32_t E)
{
	char **names;
	size_t np, ns = 0;
	uint32_t sizes[32];
	double *hit = NULL;
	int rc = 0;

	if (split_list(o->policies ? o->policies : "lru,lfu,lfru,leaststale,arc,belady", &names, &np) < 0)
		return 2;
	if (o->plot) {
		char **sz;
		size_t nsz;
		if (split_list(o->sizes ? o->sizes : "6,8,12,16,24,32", &sz, &nsz) < 0)
			return 2;
		for (size_t i = 0; i < nsz && ns < 32; i++) {
			sizes[ns++] = (uint32_t)strtoul(sz[i], NULL, 10);
			free(sz[i]);
		}
		free(sz);
		hit = calloc(np * ns, sizeof(double));
	}
	printf("%-12s %8s %8s %10s\n", "policy", "hit", "loads/tl", "stall ms/tok");
	for (size_t p = 0; p < np; p++) {
		struct sim_config sc = o->sc;
		struct sim_stats st;
		sc.policy = names[p];
		if (run_sim(&sc, tr, n, E, &st) < 0) {
			rc = 1;
			break;
		}
		printf("%-12s %8.4f %8.3f %10.3f\n", names[p], sim_hit_rate(&st), sim_loads_per_tl(&st, sc.cost.expert_bytes),
		       st.tokens ? (double)st.stall_ns / 1e6 / (double)st.tokens : 0.0);
		for (size_t j = 0; hit && j < ns; j++) {
			sc.cache = sizes[j];
			if (run_sim(&sc, tr, n, E, &st) < 0) {
				rc = 1;
				break;
			}
			hit[p * ns + j] = sim_hit_rate(&st);
		}
	}
	if (rc == 0 && hit) {
		if (write_svg(o->plot, names, np, sizes, ns, hit) < 0)
			rc = 1;
		else
			printf("plot: %s\n", o->plot);
	}
	for (size_t p = 0; p < np; p++)
		free(names[p]);
	free(names);
	free(hit);
	return rc;
}

int main(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "policy", 1, NULL, 'p' }, { "cache", 1, NULL, 'c' }, { "global", 0, NULL, 'g' },
		{ "warm", 0, NULL, 'w' }, { "predictor", 1, NULL, 'x' }, { "model", 1, NULL, 'm' },
		{ "prefetch", 1, NULL, 'f' }, { "untimed", 0, NULL, 'u' }, { "cost-model", 1, NULL, 'C' },
		{ "lookahead", 1, NULL, 'H' }, { "max-prefetch", 1, NULL, 'N' }, { "min-score", 1, NULL, 'S' },
		{ "gain", 1, NULL, 'G' }, { "route-keep", 1, NULL, 'J' }, { "route-margin", 1, NULL, 'M' },
		{ "range", 1, NULL, 'r' }, { "experts", 1, NULL, 'E' }, { "out", 1, NULL, 'o' },
		{ "plot", 1, NULL, 'P' }, { "policies", 1, NULL, 'L' }, { "sizes", 1, NULL, 'Z' },
		{ "fit-fraction", 1, NULL, 'F' }, { "epochs", 1, NULL, 'e' }, { "verbose", 0, NULL, 'v' },
		{ "brief", 0, NULL, 'b' }, { "no-deadline", 0, NULL, 'D' },
		{ "help", 0, NULL, 'h' }, { NULL, 0, NULL, 0 },
	};
	struct opts o;
	const char *cmd;
	uint32_t n_experts = 0;
	double v;
	int c, rc = 0;

	memset(&o, 0, sizeof(o));
	sim_config_default(&o.sc);
	o.prefetch = true;
	o.fit_fraction = 0.8;
	o.epochs = 2;
	if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
		usage(argc < 2 ? stderr : stdout);
		return argc < 2 ? 2 : 0;
	}
	cmd = argv[1];
	if (strcmp(cmd, "replay") && strcmp(cmd, "compare") && strcmp(cmd, "train")) {
		fprintf(stderr, "moe-sim: unknown command '%s'\n", cmd);
		usage(stderr);
		return 2;
	}
	optind = 2;
	while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
		switch (c) {
		case 'p': o.sc.policy = optarg; break;
		case 'c':
			if (num_arg(optarg, 1, 4096, &v) < 0)
				goto bad;
			o.sc.cache = (uint32_t)v;
			break;
		case 'g': o.sc.global = true; break;
		case 'w': o.sc.warm = true; break;
		case 'x': o.sc.predictor = optarg; break;
		case 'm': o.model_path = optarg; break;
		case 'f':
			if (strcmp(optarg, "on") && strcmp(optarg, "off"))
				goto bad;
			o.prefetch = strcmp(optarg, "on") == 0;
			break;
		case 'u': o.sc.timed = false; break;
		case 'C':
			if (parse_cost(&o.sc.cost, optarg) < 0)
				goto bad;
			break;
		case 'H':
			if (num_arg(optarg, 1, PREFETCH_MAX_H, &v) < 0)
				goto bad;
			o.sc.pf.h_fixed = (uint32_t)v;
			break;
		case 'D':
			o.sc.pf.deadline = false;
			break;
		case 'N':
			if (num_arg(optarg, 0, 1024, &v) < 0)
				goto bad;
			o.sc.pf.max_per_layer = (uint32_t)v;
			break;
		case 'S':
			if (num_arg(optarg, 0, 1, &v) < 0)
				goto bad;
			o.sc.pf.min_score = (float)v;
			break;
		case 'G':
			if (num_arg(optarg, -1, 1, &v) < 0)
				goto bad;
			o.sc.pf.gain = (float)v;
			break;
		case 'J':
			if (num_arg(optarg, 0, 32, &v) < 0)
				goto bad;
			o.sc.route_keep = (uint32_t)v;
			break;
		case 'M':
			if (num_arg(optarg, 0, 100, &v) < 0)
				goto bad;
			o.sc.route_margin = (float)v;
			break;
		case 'r':
			if (sscanf(optarg, "%u-%u", &o.range_lo, &o.range_hi) != 2 || o.range_hi < o.range_lo ||
			    o.range_hi == 0)
				goto bad;
			break;
		case 'E':
			if (num_arg(optarg, 1, PREDICT_MAX_EXPERTS, &v) < 0)
				goto bad;
			n_experts = (uint32_t)v;
			break;
		case 'o': o.out = optarg; break;
		case 'P': o.plot = optarg; break;
		case 'L': o.policies = optarg; break;
		case 'Z': o.sizes = optarg; break;
		case 'F':
			if (num_arg(optarg, 0.05, 1, &v) < 0)
				goto bad;
			o.fit_fraction = v;
			break;
		case 'e':
			if (num_arg(optarg, 1, 100, &v) < 0)
				goto bad;
			o.epochs = (uint32_t)v;
			break;
		case 'v': o.verbose = true; break;
		case 'b': o.brief = true; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
		continue;
bad:
		fprintf(stderr, "moe-sim: bad option value '%s'\n", optarg ? optarg : "");
		return 2;
	}
	if (optind >= argc) {
		fprintf(stderr, "moe-sim: no trace files given\n");
		return 2;
	}
	struct tlist tl = { 0 };
	if (collect(&tl, argv + optind, argc - optind, &o) < 0) {
		fprintf(stderr, "moe-sim: no usable trace files\n");
		return 1;
	}
	struct trace **tr = load_all(&tl);
	struct predict_model *model = NULL;
	struct moe_error err;
	if (!tr) {
		rc = 1;
		goto out;
	}
	uint32_t E = experts_of(tr, tl.n, n_experts);
	for (size_t i = 1; i < tl.n; i++)
		if (tr[i]->n_layers != tr[0]->n_layers) {
			fprintf(stderr, "moe-sim: %s has %u layers, %s has %u\n", tl.path[i], tr[i]->n_layers,
				tl.path[0], tr[0]->n_layers);
			rc = 1;
			goto out;
		}
	if (strcmp(cmd, "train") == 0) {
		struct sim_train_opts to;
		uint32_t n_fit = (uint32_t)lrint(o.fit_fraction * (double)tl.n);
		if (!o.out) {
			fprintf(stderr, "moe-sim: train needs --out MODEL\n");
			rc = 2;
			goto out;
		}
		if (n_fit == 0)
			n_fit = 1;
		sim_train_opts_default(&to);
		to.epochs = o.epochs;
		to.verbose = o.verbose;
		if (sim_train(tr, (uint32_t)tl.n, n_fit, E, &to, &model, &err) < 0 ||
		    predict_model_save(model, o.out, &err) < 0) {
			fprintf(stderr, "moe-sim: %s\n", err.msg);
			rc = 1;
			goto out;
		}
		printf("trained on %zu traces (%u for the components, %zu for the combiner): %s\n", tl.n, n_fit,
		       tl.n - n_fit, o.out);
		goto out;
	}
	if (o.model_path && predict_model_load(o.model_path, &model, &err) < 0) {
		fprintf(stderr, "moe-sim: %s\n", err.msg);
		rc = 1;
		goto out;
	}
	o.sc.model = model;
	if (!o.prefetch)
		o.sc.predictor = NULL;
	if (strcmp(cmd, "compare") == 0) {
		rc = cmd_compare(&o, tr, tl.n, E);
	} else {
		struct sim_stats st;
		if (run_sim(&o.sc, tr, tl.n, E, &st) < 0) {
			rc = 1;
			goto out;
		}
		if (o.brief) {
			printf("hit=%.4f loads=%.3f stall_ms_per_token=%.3f precision=%.4f recall=%.4f us_per_tl=%.2f "
			       "subst=%.4f\n", sim_hit_rate(&st), sim_loads_per_tl(&st, o.sc.cost.expert_bytes),
			       st.tokens ? (double)st.stall_ns / 1e6 / (double)st.tokens : 0.0, sim_pf_precision(&st),
			       sim_pf_recall(&st), st.token_layers ? (double)st.pred_ns / 1e3 / (double)st.token_layers : 0.0,
			       st.accesses ? (double)st.route_subst / (double)st.accesses : 0.0);
			goto out;
		}
		printf("policy %s, cache %u %s, %s, predictor %s%s\n", o.sc.policy, o.sc.cache,
		       o.sc.global ? "x layers (global)" : "per layer", o.sc.warm ? "warm" : "cold per prompt",
		       o.sc.predictor ? o.sc.predictor : "none",
		       o.sc.predictor ? (o.sc.timed ? " (timed)" : " (untimed)") : "");
		printf("cost model: expert %llu B, host->gpu %.3g B/s, nvme->host %.3g B/s, %.3g s per layer, "
		       "%u dense layer(s) before the first MoE layer\n",
		       (unsigned long long)o.sc.cost.expert_bytes, o.sc.cost.h2d_bw, o.sc.cost.nvme_bw, o.sc.cost.layer_s,
		       o.sc.cost.dense_layers);
		print_stats(&o.sc, &st);
	}
out:
	predict_model_free(model);
	free_all(tr, tl.n);
	for (size_t i = 0; i < tl.n; i++)
		free(tl.path[i]);
	free(tl.path);
	free(tl.num);
	return rc;
}
