/* ggml_peer.h - llama.cpp's ggml (the npm prebuilt, configure --with-llama)
 * as a peer for tests/test_kquant_ggml and bench/ffn-vs-ggml: its CPU
 * backend loaded from the prebuilt folder, its CPU type traits (vec_dot,
 * from_float), and mul_mat / expert FFN graphs on that backend.
 *
 * The CPU backend is a separate library chosen at run time among the
 * prebuilt variants (libggml-cpu-zen4.so, -haswell, ...), so it is loaded
 * with ggml_backend_load_all_from_path and its exported
 * ggml_get_type_traits_cpu is found in whichever variant got loaded. */
#ifndef MOETIER_GGML_PEER_H
#define MOETIER_GGML_PEER_H

#include <dirent.h>
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ggml-alloc.h>
#include <ggml-backend.h>
#include <ggml-cpu.h>
#include <ggml.h>

#include "dtype.h"

struct ggml_peer {
	ggml_backend_t be;
	ggml_backend_dev_t dev;
	ggml_backend_set_n_threads_t set_threads;
	const struct ggml_type_traits_cpu *(*traits_cpu)(enum ggml_type);
	char lib[512]; /* the CPU variant loaded */
};

/* The ggml type of a moetier dtype; GGML_TYPE_COUNT where none. */
static inline enum ggml_type ggml_peer_type(enum moe_dtype t)
{
	switch (t) {
	case MOE_DTYPE_F32: return GGML_TYPE_F32;
	case MOE_DTYPE_F16: return GGML_TYPE_F16;
	case MOE_DTYPE_BF16: return GGML_TYPE_BF16;
	case MOE_DTYPE_Q8_0: return GGML_TYPE_Q8_0;
	case MOE_DTYPE_Q4_0: return GGML_TYPE_Q4_0;
	case MOE_DTYPE_MXFP4: return GGML_TYPE_MXFP4;
	case MOE_DTYPE_Q4_K: return GGML_TYPE_Q4_K;
	case MOE_DTYPE_Q5_K: return GGML_TYPE_Q5_K;
	case MOE_DTYPE_Q6_K: return GGML_TYPE_Q6_K;
	case MOE_DTYPE_Q3_K: return GGML_TYPE_Q3_K;
	case MOE_DTYPE_Q2_K: return GGML_TYPE_Q2_K;
	case MOE_DTYPE_IQ4_NL: return GGML_TYPE_IQ4_NL;
	case MOE_DTYPE_IQ4_XS: return GGML_TYPE_IQ4_XS;
	default: return GGML_TYPE_COUNT;
	}
}

/* ggml's log, warnings and errors only (its info lines, one per repacked
 * tensor, would bury the results). */
static inline void ggml_peer_log(enum ggml_log_level level, const char *text, void *user)
{
	(void)user;
	if (level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR)
		fputs(text, stderr);
}

/* The prebuilt folder: $MOETIER_LLAMA_LIB, else configure's. */
static inline const char *ggml_peer_dir(void)
{
	const char *env = getenv("MOETIER_LLAMA_LIB");
	if (env && *env)
		return env;
#ifdef MOE_LLAMA_BACKEND_DIR
	return MOE_LLAMA_BACKEND_DIR;
#else
	return NULL;
#endif
}

/* Loads the CPU backend with `threads` threads. 0, or -1 with a reason in
 * why (the peer is absent: callers skip). */
static inline int ggml_peer_open(struct ggml_peer *p, int threads, char *why, size_t whylen)
{
	const char *dir = ggml_peer_dir();
	memset(p, 0, sizeof(*p));
	if (!dir) {
		snprintf(why, whylen, "no llama.cpp peer (configure --with-llama or MOETIER_LLAMA_LIB)");
		return -1;
	}
	if (!getenv("MOETIER_GGML_VERBOSE"))
		ggml_log_set(ggml_peer_log, NULL);
	ggml_backend_load_all_from_path(dir);
	ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
	p->dev = dev;
	if (!dev || !(p->be = ggml_backend_dev_init(dev, NULL))) {
		snprintf(why, whylen, "no ggml CPU backend in %s", dir);
		return -1;
	}
	ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
	p->set_threads = (ggml_backend_set_n_threads_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
	if (p->set_threads)
		p->set_threads(p->be, threads);
	/* the variant ggml loaded is the one dlopen finds already resident */
	DIR *d = opendir(dir);
	struct dirent *de;
	while (d && !p->traits_cpu && (de = readdir(d))) {
		if (strncmp(de->d_name, "libggml-cpu", 11) != 0)
			continue;
		char path[1024];
		snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
		void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
		if (!h)
			continue;
		*(void **)&p->traits_cpu = dlsym(h, "ggml_get_type_traits_cpu");
		snprintf(p->lib, sizeof(p->lib), "%s", de->d_name);
		dlclose(h); /* NOLOAD took a reference; ggml holds its own */
	}
	if (d)
		closedir(d);
	if (!p->traits_cpu) {
		snprintf(why, whylen, "the ggml CPU backend in %s exports no ggml_get_type_traits_cpu", dir);
		ggml_backend_free(p->be);
		p->be = NULL;
		return -1;
	}
	return 0;
}

static inline void ggml_peer_close(struct ggml_peer *p)
{
	if (p->be)
		ggml_backend_free(p->be);
	p->be = NULL;
}

/* The CPU backend's CPU_REPACK buffer type (weights stored in ggml's
 * interleaved layouts, as llama.cpp loads q4_0 / q4_K / ... on AVX2 and
 * AVX-512 hosts), or NULL. */
static inline ggml_backend_buffer_type_t ggml_peer_repack_buft(struct ggml_peer *p)
{
	ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(p->dev);
	ggml_backend_dev_get_extra_bufts_t get =
		(ggml_backend_dev_get_extra_bufts_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
	for (ggml_backend_buffer_type_t *b = get ? get(p->dev) : NULL; b && *b; b++)
		if (!strcmp(ggml_backend_buft_name(*b), "CPU_REPACK"))
			return *b;
	return NULL;
}

/* One expert's weights as ggml tensors: Wg, Wu [m rows of n], Wd [n rows
 * of m] (ggml rows of `cols` = ne0 elements, as in GGUF files and packs);
 * wu / wd NULL for a lone matrix Wg. Where they live:
 * - host != NULL: they stay where they are, inside [host, host +
 *   host_bytes), which becomes a CPU buffer (ggml reads our very bytes);
 * - else buft (NULL: the backend's default) gets a copy; CPU_REPACK
 *   repacks it. -1 when a type has no repacked layout there. */
struct ggml_peer_wset {
	struct ggml_context *ctx;
	ggml_backend_buffer_t buf;
	struct ggml_tensor *wg, *wu, *wd;
};

static inline void ggml_peer_wset_free(struct ggml_peer_wset *w)
{
	if (w->buf)
		ggml_backend_buffer_free(w->buf);
	if (w->ctx)
		ggml_free(w->ctx);
	memset(w, 0, sizeof(*w));
}

static inline int ggml_peer_wset_init(struct ggml_peer *p, struct ggml_peer_wset *w, enum moe_dtype tg,
				      const void *wg, enum moe_dtype tu, const void *wu, enum moe_dtype td,
				      const void *wd, uint32_t n, uint32_t m, void *host, size_t host_bytes,
				      ggml_backend_buffer_type_t buft)
{
	struct ggml_init_params ip = { ggml_tensor_overhead() * 4, NULL, true };
	const bool ffn = wu && wd;
	memset(w, 0, sizeof(*w));
	if (ggml_peer_type(tg) == GGML_TYPE_COUNT || (ffn && (ggml_peer_type(tu) == GGML_TYPE_COUNT ||
							       ggml_peer_type(td) == GGML_TYPE_COUNT)) ||
	    !(w->ctx = ggml_init(ip)))
		return -1;
	w->wg = ggml_new_tensor_2d(w->ctx, ggml_peer_type(tg), n, m);
	if (ffn) {
		w->wu = ggml_new_tensor_2d(w->ctx, ggml_peer_type(tu), n, m);
		w->wd = ggml_new_tensor_2d(w->ctx, ggml_peer_type(td), m, n);
	}
	if (host) {
		if (!(w->buf = ggml_backend_cpu_buffer_from_ptr(host, host_bytes)) ||
		    ggml_backend_tensor_alloc(w->buf, w->wg, (void *)(uintptr_t)wg) != GGML_STATUS_SUCCESS ||
		    (ffn && (ggml_backend_tensor_alloc(w->buf, w->wu, (void *)(uintptr_t)wu) != GGML_STATUS_SUCCESS ||
			     ggml_backend_tensor_alloc(w->buf, w->wd, (void *)(uintptr_t)wd) != GGML_STATUS_SUCCESS)))
			goto fail;
		return 0;
	}
	if (!(w->buf = buft ? ggml_backend_alloc_ctx_tensors_from_buft(w->ctx, buft)
			    : ggml_backend_alloc_ctx_tensors(w->ctx, p->be)))
		goto fail;
	/* the repack buffer names its layout in extra when it has one */
	if (buft && (!w->wg->extra || (ffn && (!w->wu->extra || !w->wd->extra))))
		goto fail;
	ggml_backend_tensor_set(w->wg, wg, 0, ggml_nbytes(w->wg));
	if (ffn) {
		ggml_backend_tensor_set(w->wu, wu, 0, ggml_nbytes(w->wu));
		ggml_backend_tensor_set(w->wd, wd, 0, ggml_nbytes(w->wd));
	}
	return 0;
fail:
	ggml_peer_wset_free(w);
	return -1;
}

/* A graph on the CPU backend over a weight set: the expert FFN
 * out = Wd (silu(Wg x) * (Wu x)) for B tokens (SWIGLU), or out = Wg x. */
struct ggml_peer_graph {
	struct ggml_peer_wset w;
	struct ggml_context *ctx;
	ggml_backend_buffer_t buf;
	struct ggml_cgraph *gf;
	struct ggml_tensor *x, *out;
};

static inline void ggml_peer_graph_free(struct ggml_peer_graph *g)
{
	if (g->buf)
		ggml_backend_buffer_free(g->buf);
	if (g->ctx)
		ggml_free(g->ctx);
	ggml_peer_wset_free(&g->w);
	memset(g, 0, sizeof(*g));
}

/* Takes the weight set over (freed with the graph). */
static inline int ggml_peer_graph_build(struct ggml_peer *p, struct ggml_peer_graph *g, struct ggml_peer_wset *w,
					uint32_t n, uint32_t B)
{
	struct ggml_init_params ip = { ggml_tensor_overhead() * 16 + ggml_graph_overhead(), NULL, true };
	memset(g, 0, sizeof(*g));
	g->w = *w;
	memset(w, 0, sizeof(*w));
	if (!(g->ctx = ggml_init(ip)))
		goto fail;
	g->x = ggml_new_tensor_2d(g->ctx, GGML_TYPE_F32, n, B);
	struct ggml_tensor *gate = ggml_mul_mat(g->ctx, g->w.wg, g->x);
	if (g->w.wu) {
		struct ggml_tensor *h = ggml_mul(g->ctx, ggml_silu(g->ctx, gate), ggml_mul_mat(g->ctx, g->w.wu, g->x));
		g->out = ggml_mul_mat(g->ctx, g->w.wd, h);
	} else {
		g->out = gate;
	}
	g->gf = ggml_new_graph(g->ctx);
	ggml_build_forward_expand(g->gf, g->out);
	if (!(g->buf = ggml_backend_alloc_ctx_tensors(g->ctx, p->be)))
		goto fail;
	return 0;
fail:
	ggml_peer_graph_free(g);
	return -1;
}

/* Weights given as bytes (see ggml_peer_wset_init), then the graph. */
static inline int ggml_peer_graph_init(struct ggml_peer *p, struct ggml_peer_graph *g, enum moe_dtype tg,
				       const void *wg, enum moe_dtype tu, const void *wu, enum moe_dtype td,
				       const void *wd, uint32_t n, uint32_t m, uint32_t B, void *host,
				       size_t host_bytes)
{
	struct ggml_peer_wset w;
	memset(g, 0, sizeof(*g));
	if (ggml_peer_wset_init(p, &w, tg, wg, tu, wu, td, wd, n, m, host, host_bytes, NULL))
		return -1;
	return ggml_peer_graph_build(p, g, &w, n, B);
}

/* Points the graph's weights at other bytes of the same layout: another
 * copy in the host range, or another weight set's tensors (same types and
 * shapes, same buffer type, so the same repacked layout). */
static inline void ggml_peer_graph_point(struct ggml_peer_graph *g, const void *wg, const void *wu, const void *wd)
{
	g->w.wg->data = (void *)(uintptr_t)wg;
	if (g->w.wu) {
		g->w.wu->data = (void *)(uintptr_t)wu;
		g->w.wd->data = (void *)(uintptr_t)wd;
	}
}

/* x: B rows of n floats; out: B rows (m for a mul_mat, n for the FFN). */
static inline int ggml_peer_graph_run(struct ggml_peer *p, struct ggml_peer_graph *g, const float *x, float *out)
{
	ggml_backend_tensor_set(g->x, x, 0, ggml_nbytes(g->x));
	if (ggml_backend_graph_compute(p->be, g->gf) != GGML_STATUS_SUCCESS)
		return -1;
	ggml_backend_tensor_get(g->out, out, 0, ggml_nbytes(g->out));
	return 0;
}

#endif
