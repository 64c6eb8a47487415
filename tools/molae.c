/* molae.c - MoLAE conversion of a pack (see molae.h, doc/molae.md). */
#include "config.h"

#include "molae.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "dtype.h"
#include "latent.h"
#include "pack.h"

#if HAVE_LAPACKE
#include <cblas.h>
#include <lapacke.h>
#endif

#define SUBSPACE_DIM_MAX 32u /* d of molae_group_greedy: enough to tell subspaces apart, cheap */

void molae_report_free(struct molae_report *r)
{
	if (!r)
		return;
	free(r->groups);
	free(r->group_of);
	free(r);
}

void molae_group_greedy(const double *S, uint32_t E, uint32_t n, uint32_t d, uint32_t k, int32_t *group_of)
{
	int32_t g = 0;
	for (uint32_t e = 0; e < E; e++)
		group_of[e] = -1;
	for (uint32_t seed = 0; seed < E; seed++) {
		if (group_of[seed] >= 0)
			continue;
		group_of[seed] = g;
		for (uint32_t taken = 1; taken < k; taken++) {
			double best = -1.0;
			uint32_t bi = UINT32_MAX;
			for (uint32_t j = 0; j < E; j++) {
				if (group_of[j] >= 0)
					continue;
				/* ||S_seed^T S_j||_F^2 / d */
				double s = 0.0;
				for (uint32_t a = 0; a < d; a++)
					for (uint32_t b = 0; b < d; b++) {
						const double *x = S + ((size_t)seed * d + a) * n, *y = S + ((size_t)j * d + b) * n;
						double dot = 0.0;
						for (uint32_t i = 0; i < n; i++)
							dot += x[i] * y[i];
						s += dot * dot;
					}
				s /= d;
				if (s > best) {
					best = s;
					bi = j;
				}
			}
			if (bi == UINT32_MAX)
				break;
			group_of[bi] = g;
		}
		g++;
	}
}

json_t *molae_report_json(const struct molae_report *r)
{
	json_t *o = json_object(), *layers = json_array();
	json_object_set_new(o, "rank", json_integer(r->rank));
	json_object_set_new(o, "group_size", json_integer(r->group_size));
	json_object_set_new(o, "groups", json_string(r->groups_auto ? "auto" : "contiguous"));
	json_object_set_new(o, "n", json_integer(r->n));
	json_object_set_new(o, "m", json_integer(r->m));
	json_object_set_new(o, "n_experts", json_integer(r->n_experts));
	json_object_set_new(o, "n_moe_layers", json_integer(r->n_moe_layers));
	json_object_set_new(o, "params_per_layer_before", json_integer((json_int_t)r->params_before));
	json_object_set_new(o, "params_per_layer_after", json_integer((json_int_t)r->params_after));
	json_object_set_new(o, "params_saved",
			    json_real(r->params_before ? 1.0 - (double)r->params_after / (double)r->params_before : 0.0));
	json_object_set_new(o, "expert_params_before", json_integer((json_int_t)r->expert_params_before));
	json_object_set_new(o, "expert_params_after", json_integer((json_int_t)r->expert_params_after));
	json_object_set_new(o, "expert_bytes_f32_before", json_integer((json_int_t)(r->expert_params_before * 4)));
	json_object_set_new(o, "expert_bytes_f32_after", json_integer((json_int_t)(r->expert_params_after * 4)));
	json_object_set_new(o, "extent_bytes_before", json_integer((json_int_t)r->extent_bytes_before));
	json_object_set_new(o, "extent_bytes_after", json_integer((json_int_t)r->extent_bytes_after));
	json_object_set_new(o, "resident_b_bytes", json_integer((json_int_t)r->resident_b_bytes));
	json_object_set_new(o, "dtype", json_string(moe_dtype_name(r->dtype)));
	json_object_set_new(o, "calib_tokens", json_integer((json_int_t)r->calib_tokens));
	for (uint32_t l = 0; l < r->n_moe_layers; l++) {
		json_t *lo = json_object(), *ga = json_array(), *map = json_array();
		double se[2] = { 0, 0 }, sn[2] = { 0, 0 }, sb[2] = { 0, 0 };
		for (uint32_t g = 0; g < r->n_groups; g++) {
			const struct molae_group_stat *s = &r->groups[(size_t)l * r->n_groups + g];
			json_t *go = json_object();
			json_object_set_new(go, "group", json_integer(g));
			for (int p = 0; p < 2; p++) {
				const char *nm = p ? "up" : "gate";
				char key[32];
				snprintf(key, sizeof(key), "%s_rel_error", nm);
				json_object_set_new(go, key, json_real(s->err[p]));
				snprintf(key, sizeof(key), "%s_rel_bound", nm);
				json_object_set_new(go, key, json_real(s->bound[p]));
				if (r->calib_tokens) {
					snprintf(key, sizeof(key), "%s_act_rel_error", nm);
					json_object_set_new(go, key, json_real(s->werr[p]));
					snprintf(key, sizeof(key), "%s_act_rel_bound", nm);
					json_object_set_new(go, key, json_real(s->wbound[p]));
				}
				se[p] += s->err[p] * s->err[p] * s->norm2[p];
				sb[p] += s->bound[p] * s->bound[p] * s->norm2[p];
				sn[p] += s->norm2[p];
			}
			json_array_append_new(ga, go);
		}
		for (uint32_t e = 0; e < r->n_experts; e++)
			json_array_append_new(map, json_integer(r->group_of[(size_t)l * r->n_experts + e]));
		json_object_set_new(lo, "layer", json_integer(l));
		json_object_set_new(lo, "gate_rel_error", json_real(sn[0] > 0 ? sqrt(se[0] / sn[0]) : 0.0));
		json_object_set_new(lo, "gate_rel_bound", json_real(sn[0] > 0 ? sqrt(sb[0] / sn[0]) : 0.0));
		json_object_set_new(lo, "up_rel_error", json_real(sn[1] > 0 ? sqrt(se[1] / sn[1]) : 0.0));
		json_object_set_new(lo, "up_rel_bound", json_real(sn[1] > 0 ? sqrt(sb[1] / sn[1]) : 0.0));
		json_object_set_new(lo, "group_of", map);
		json_object_set_new(lo, "groups", ga);
		json_array_append_new(layers, lo);
	}
	json_object_set_new(o, "layers", layers);
	return o;
}

void molae_report_print(const struct molae_report *r, FILE *f)
{
	fprintf(f, "molae: rank %u, %u group(s) of %u expert(s) per layer (%s), n=%u m=%u E=%u\n", r->rank,
		r->n_groups, r->group_size, r->groups_auto ? "auto" : "contiguous", r->n, r->m, r->n_experts);
	if (r->calib_tokens)
		fprintf(f, "activation-aware: %" PRIu64 " calibration tokens per layer; act = ||(W - A B) L|| / ||W L||\n",
			r->calib_tokens);
	fprintf(f, "%5s %5s %12s %12s %12s %12s\n", "layer", "group", "gate_err", "gate_bound", "up_err", "up_bound");
	for (uint32_t l = 0; l < r->n_moe_layers; l++)
		for (uint32_t g = 0; g < r->n_groups; g++) {
			const struct molae_group_stat *s = &r->groups[(size_t)l * r->n_groups + g];
			fprintf(f, "%5u %5u %12.6e %12.6e %12.6e %12.6e", l, g, s->err[0], s->bound[0], s->err[1],
				s->bound[1]);
			if (r->calib_tokens)
				fprintf(f, "  act: gate %.6e (bound %.6e) up %.6e (bound %.6e)", s->werr[0], s->wbound[0],
					s->werr[1], s->wbound[1]);
			fputc('\n', f);
		}
	fprintf(f, "params per layer: %" PRIu64 " -> %" PRIu64 " (%.1f%% saved)\n", r->params_before, r->params_after,
		r->params_before ? 100.0 * (1.0 - (double)r->params_after / (double)r->params_before) : 0.0);
	fprintf(f, "movable params per expert: %" PRIu64 " -> %" PRIu64 " (%.1f%% saved); f32 bytes %" PRIu64
		   " -> %" PRIu64 "\n",
		r->expert_params_before, r->expert_params_after,
		r->expert_params_before
			? 100.0 * (1.0 - (double)r->expert_params_after / (double)r->expert_params_before)
			: 0.0,
		r->expert_params_before * 4, r->expert_params_after * 4);
	fprintf(f, "extent bytes: %" PRIu64 " (input) -> %" PRIu64 " (output, %s); resident B (f32): %" PRIu64
		   " bytes\n",
		r->extent_bytes_before, r->extent_bytes_after, moe_dtype_name(r->dtype), r->resident_b_bytes);
}

#if HAVE_LAPACKE

void molae_gram_add(double *G, const double *W, uint32_t m, uint32_t n)
{
	cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)n, (int)m, 1.0, W, (int)n, 1.0, G, (int)n);
}

int molae_basis(const double *G, uint32_t n, uint32_t r, double *B, double *total, double *tail,
		struct moe_error *err)
{
	if (r == 0 || r > n)
		return moe_error_set(err, -EINVAL, "molae: rank %u out of range 1..%u", r, n);
	double *a = malloc((size_t)n * n * sizeof(double)), *w = malloc((size_t)n * sizeof(double));
	double *z = malloc((size_t)n * n * sizeof(double));
	lapack_int *isuppz = malloc(2 * (size_t)n * sizeof(lapack_int)), found = 0;
	int rc = 0;
	if (!a || !w || !z || !isuppz) {
		rc = moe_error_set(err, -ENOMEM, "molae: out of memory for a %u x %u eigenproblem", n, n);
		goto out;
	}
	memcpy(a, G, (size_t)n * n * sizeof(double));
	double tr = 0.0;
	for (uint32_t i = 0; i < n; i++)
		tr += G[(size_t)i * n + i];
	/* All eigenpairs: the tail is summed from the small eigenvalues themselves
	 * (accurate for a small tail), not as trace minus the head. */
	lapack_int info = LAPACKE_dsyevr(LAPACK_ROW_MAJOR, 'V', 'A', 'U', (lapack_int)n, a, (lapack_int)n, 0.0, 0.0, 0,
					 0, 0.0, &found, w, z, (lapack_int)n, isuppz);
	if (info != 0 || found != (lapack_int)n) {
		rc = moe_error_set(err, -EDOM, "molae: dsyevr failed (info %d, %d of %u eigenvalues)", (int)info,
				   (int)found, n);
		goto out;
	}
	double t = 0.0;
	for (uint32_t j = 0; j < n - r; j++) /* ascending order */
		t += w[j] > 0.0 ? w[j] : 0.0;
	for (uint32_t k = 0; k < r; k++)
		for (uint32_t i = 0; i < n; i++)
			B[(size_t)k * n + i] = z[(size_t)i * n + (n - 1 - k)];
	*total = tr;
	*tail = t;
out:
	free(a);
	free(w);
	free(z);
	free(isuppz);
	return rc;
}

void molae_project(const double *W, uint32_t m, uint32_t n, const double *B, uint32_t r, double *A)
{
	cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)r, (int)n, 1.0, W, (int)n, B, (int)n, 0.0, A,
		    (int)r);
}

double molae_residual2(const double *W, const double *A, const double *B, uint32_t m, uint32_t n, uint32_t r,
		       double *scratch)
{
	memcpy(scratch, W, (size_t)m * n * sizeof(double));
	cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)n, (int)r, -1.0, A, (int)r, B, (int)n, 1.0,
		    scratch, (int)n);
	double s = 0.0;
	for (size_t i = 0; i < (size_t)m * n; i++)
		s += scratch[i] * scratch[i];
	return s;
}

/* ---- conversion ---- */

struct conv {
	struct pack_file *in;
	const struct pack_part_desc *part[3]; /* gate, up, down of the input */
	uint64_t row_bytes[3];
	uint8_t *ext;   /* one input extent, 4 KiB aligned */
	float *row;     /* one dequantized row */
	uint32_t n, m, r, E, k, G;
};

/* Dequantizes part p of the extent in c->ext into W (rows x cols doubles). */
static void load_part(struct conv *c, int p, double *W)
{
	const struct pack_part_desc *d = c->part[p];
	for (uint32_t i = 0; i < d->rows; i++) {
		moe_dequantize_row(d->dtype, c->ext + d->offset + i * c->row_bytes[p], c->row, d->cols);
		for (uint32_t j = 0; j < d->cols; j++)
			W[(size_t)i * d->cols + j] = c->row[j];
	}
}

/* Writes rows x cols doubles as dtype t, one row at a time (row: cols
 * floats; out: one output row). */
static int write_rows(struct pack_writer *w, const double *x, uint32_t rows, uint32_t cols, uint32_t t, float *row,
		      uint8_t *out, struct moe_error *err)
{
	uint64_t rb = 0;
	(void)moe_dtype_row_bytes(t, cols, &rb); /* checked by the writer's part shapes */
	for (uint32_t i = 0; i < rows; i++) {
		for (uint32_t j = 0; j < cols; j++)
			row[j] = (float)x[(size_t)i * cols + j];
		switch (t) {
		case MOE_DTYPE_F16:
			for (uint32_t j = 0; j < cols; j++)
				((uint16_t *)out)[j] = moe_f32_to_f16(row[j]);
			break;
		case MOE_DTYPE_BF16:
			for (uint32_t j = 0; j < cols; j++)
				((uint16_t *)out)[j] = moe_f32_to_bf16(row[j]);
			break;
		case MOE_DTYPE_Q8_0: moe_quantize_row_q8_0(row, (struct moe_block_q8_0 *)out, cols); break;
		default: memcpy(out, row, (size_t)cols * sizeof(float)); break;
		}
		int rc = pack_writer_write(w, out, rb, err);
		if (rc < 0)
			return rc;
	}
	return 0;
}

/* Checks the input and the options; fills c. */
static int conv_check(struct conv *c, const struct molae_options *o, struct moe_error *err)
{
	const struct moe_model_config *m = c->in->model;
	if (m->ffn_kind != MOE_FFN_SWIGLU)
		return moe_error_set(err, -EINVAL,
				     "molae: %s is not a SwiGLU model (ffn kind %u): only separate gate/up/down experts "
				     "can be factorized",
				     c->in->path, m->ffn_kind);
	if (pack_part(c->in, PACK_ROLE_LATENT_A_GATE) || pack_part(c->in, PACK_ROLE_LATENT_A_UP))
		return moe_error_set(err, -EINVAL, "molae: %s is already a MoLAE pack", c->in->path);
	static const enum pack_role roles[3] = { PACK_ROLE_GATE, PACK_ROLE_UP, PACK_ROLE_DOWN };
	for (int p = 0; p < 3; p++) {
		c->part[p] = pack_part(c->in, roles[p]);
		if (!c->part[p])
			return moe_error_set(err, -EINVAL, "molae: %s has no %s part", c->in->path,
					     pack_role_name(roles[p]));
		if (!moe_dtype_row_bytes(c->part[p]->dtype, c->part[p]->cols, &c->row_bytes[p]))
			return moe_error_set(err, -EINVAL, "molae: %s part: bad row", pack_role_name(roles[p]));
	}
	if (c->in->hdr->n_parts != 3)
		return moe_error_set(err, -EINVAL, "molae: %s has %u expert parts; only gate, up, down are supported",
				     c->in->path, c->in->hdr->n_parts);
	c->n = m->hidden;
	c->m = m->expert_width;
	c->E = m->n_experts;
	if (c->part[0]->rows != c->m || c->part[0]->cols != c->n || c->part[1]->rows != c->m ||
	    c->part[1]->cols != c->n || c->part[2]->rows != c->n || c->part[2]->cols != c->m)
		return moe_error_set(err, -EINVAL, "molae: part shapes do not match the model (n %u, m %u)", c->n, c->m);
	/* auto without a size: four groups where E allows, else one */
	if (o->dtype != MOE_DTYPE_F32 && o->dtype != MOE_DTYPE_F16 && o->dtype != MOE_DTYPE_BF16 &&
	    o->dtype != MOE_DTYPE_Q8_0)
		return moe_error_set(err, -EINVAL, "molae: output dtype %s not supported (f32, f16, bf16, q8_0)",
				     moe_dtype_name(o->dtype));
	c->k = o->group_size ? o->group_size : (o->groups_auto && c->E % 4 == 0) ? c->E / 4 : c->E;
	if (c->k > c->E || c->E % c->k)
		return moe_error_set(err, -EINVAL, "molae: group size %u does not divide the %u experts of a layer", c->k,
				     c->E);
	c->G = c->E / c->k;
	c->r = o->rank;
	uint64_t maxr = (uint64_t)c->k * c->m < c->n ? (uint64_t)c->k * c->m : c->n;
	if (c->r == 0 || c->r > maxr)
		return moe_error_set(err, -EINVAL,
				     "molae: rank %u out of range: 1..%" PRIu64 " (min(n = %u, group size %u x m = %u))",
				     c->r, maxr, c->n, c->k, c->m);
	uint64_t rb;
	if (!moe_dtype_row_bytes(o->dtype, c->r, &rb) || !moe_dtype_row_bytes(o->dtype, c->m, &rb))
		return moe_error_set(err, -EINVAL, "molae: %s needs rank %u and width %u in whole blocks of %u",
				     moe_dtype_name(o->dtype), c->r, c->m, moe_dtype_block_elems(o->dtype));
	return 0;
}

/* The top-d right singular subspace of S_i for molae_group_greedy, for every
 * expert of MoE layer l. */
static int auto_groups(struct conv *c, uint32_t l, int32_t *group_of, struct moe_error *err)
{
	const uint32_t n = c->n, rows = 2 * c->m;
	uint32_t d = c->r < c->m ? c->r : c->m;
	if (d > SUBSPACE_DIM_MAX)
		d = SUBSPACE_DIM_MAX;
	/* H = M M^T (2m x 2m) when 2m < n, else G = M^T M (n x n): the smaller Gram. */
	const bool small = rows < n;
	const uint32_t gn = small ? rows : n;
	double *M = malloc((size_t)rows * n * sizeof(double)), *H = malloc((size_t)gn * gn * sizeof(double));
	double *U = malloc((size_t)d * gn * sizeof(double)), *S = malloc((size_t)c->E * d * n * sizeof(double));
	int rc = 0;
	if (!M || !H || !U || !S) {
		rc = moe_error_set(err, -ENOMEM, "molae: out of memory (auto groups)");
		goto out;
	}
	for (uint32_t e = 0; e < c->E; e++) {
		double tot, tail;
		if ((rc = pack_read_expert(c->in, l, e, c->ext, err)) < 0)
			goto out;
		load_part(c, 0, M);
		load_part(c, 1, M + (size_t)c->m * n);
		memset(H, 0, (size_t)gn * gn * sizeof(double));
		if (small)
			cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, (int)rows, (int)n, 1.0, M, (int)n, 0.0, H,
				    (int)rows);
		else
			molae_gram_add(H, M, rows, n);
		if ((rc = molae_basis(H, gn, d, U, &tot, &tail, err)) < 0)
			goto out;
		double *Si = S + (size_t)e * d * n;
		if (small) {
			/* s_j = M^T u_j, normalized (the right singular vector). */
			cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)d, (int)n, (int)rows, 1.0, U, (int)rows,
				    M, (int)n, 0.0, Si, (int)n);
			for (uint32_t j = 0; j < d; j++) {
				double nn = cblas_dnrm2((int)n, Si + (size_t)j * n, 1);
				if (nn > 0)
					cblas_dscal((int)n, 1.0 / nn, Si + (size_t)j * n, 1);
			}
		} else {
			memcpy(Si, U, (size_t)d * n * sizeof(double));
		}
	}
	molae_group_greedy(S, c->E, n, d, c->k, group_of);
out:
	free(M);
	free(H);
	free(U);
	free(S);
	return rc;
}

/* C = X^T X over the T calibration states of MoE layer l (rows of X, f32 in
 * the file), plus a ridge of 1e-6 trace(C)/n so that C is positive definite
 * even for states in a subspace, then C = L L^T: L overwrites C (lower, the
 * upper triangle zeroed so that it is L as a full matrix). */
static int calib_factor(FILE *f, const char *path, uint32_t l, uint64_t T, uint32_t n, double *C,
			struct moe_error *err)
{
	enum { CHUNK = 256 };
	float *xf = malloc((size_t)CHUNK * n * sizeof(float));
	double *xd = malloc((size_t)CHUNK * n * sizeof(double));
	int rc = 0;
	if (!xf || !xd) {
		rc = moe_error_set(err, -ENOMEM, "molae: out of memory (calibration)");
		goto out;
	}
	memset(C, 0, (size_t)n * n * sizeof(double));
	if (fseeko(f, (off_t)((uint64_t)l * T * n * sizeof(float)), SEEK_SET) != 0) {
		rc = moe_error_set(err, -EIO, "molae: %s: cannot seek to layer %u", path, l);
		goto out;
	}
	for (uint64_t t = 0; t < T; t += CHUNK) {
		size_t rows = T - t < CHUNK ? (size_t)(T - t) : CHUNK;
		if (fread(xf, (size_t)n * sizeof(float), rows, f) != rows) {
			rc = moe_error_set(err, -EIO, "molae: %s: short read in layer %u", path, l);
			goto out;
		}
		for (size_t i = 0; i < rows * n; i++) {
			if (!isfinite(xf[i])) {
				rc = moe_error_set(err, -EINVAL, "molae: %s: non-finite value in layer %u, token %" PRIu64,
						   path, l, t + i / n);
				goto out;
			}
			xd[i] = xf[i];
		}
		cblas_dsyrk(CblasRowMajor, CblasLower, CblasTrans, (int)n, (int)rows, 1.0, xd, (int)n, 1.0, C, (int)n);
	}
	double tr = 0.0;
	for (uint32_t i = 0; i < n; i++)
		tr += C[(size_t)i * n + i];
	if (!(tr > 0.0)) {
		rc = moe_error_set(err, -EINVAL, "molae: %s: the calibration states of layer %u are all zero", path, l);
		goto out;
	}
	for (uint32_t i = 0; i < n; i++)
		C[(size_t)i * n + i] += 1e-6 * tr / n;
	lapack_int info = LAPACKE_dpotrf(LAPACK_ROW_MAJOR, 'L', (lapack_int)n, C, (lapack_int)n);
	if (info != 0) {
		rc = moe_error_set(err, -EDOM, "molae: %s: layer %u: Cholesky failed (info %d)", path, l, (int)info);
		goto out;
	}
	for (uint32_t i = 0; i < n; i++)
		for (uint32_t j = i + 1; j < n; j++)
			C[(size_t)i * n + j] = 0.0;
out:
	free(xf);
	free(xd);
	return rc;
}

static int copy_tensor(struct pack_writer *w, struct pack_file *in, const struct pack_tensor_entry *t,
		       struct moe_error *err)
{
	void *buf = malloc(t->bytes ? t->bytes : 1);
	int rc;
	if (!buf)
		return moe_error_set(err, -ENOMEM, "molae: out of memory for tensor %s", t->name);
	struct pack_tensor_entry d = *t;
	d.offset = 0;
	d.crc32c = 0;
	if ((rc = pack_read_tensor(in, t, buf, err)) == 0 && (rc = pack_writer_begin_tensor(w, &d, err)) == 0 &&
	    (rc = pack_writer_write(w, buf, t->bytes, err)) == 0)
		rc = pack_writer_end_tensor(w, err);
	free(buf);
	return rc;
}

static int write_small_tensor(struct pack_writer *w, const char *name, uint32_t role, uint32_t dtype, uint32_t layer,
			      uint32_t n_dims, const uint64_t *shape, const void *data, size_t bytes,
			      struct moe_error *err)
{
	struct pack_tensor_entry d;
	int rc;
	memset(&d, 0, sizeof(d));
	snprintf(d.name, sizeof(d.name), "%s", name);
	d.role = role;
	d.dtype = dtype;
	d.layer = layer;
	d.n_dims = n_dims;
	for (uint32_t i = 0; i < n_dims; i++)
		d.shape[i] = shape[i];
	d.bytes = bytes;
	if ((rc = pack_writer_begin_tensor(w, &d, err)) == 0 && (rc = pack_writer_write(w, data, bytes, err)) == 0)
		rc = pack_writer_end_tensor(w, err);
	return rc;
}

int molae_convert(const char *in_path, const char *out_path, const struct molae_options *o,
		  struct molae_report **rep_out, struct moe_error *err)
{
	struct conv c;
	struct molae_report *rep = NULL;
	struct pack_writer *w = NULL;
	double *W[3] = { NULL, NULL, NULL }, *Gm[2] = { NULL, NULL }, *Bd[2] = { NULL, NULL }, *A = NULL, *scr = NULL;
	double *Lc = NULL, *T1 = NULL, *Gw = NULL, *Vt = NULL, *P[2] = { NULL, NULL };
	FILE *cf = NULL;
	uint64_t T = 0;
	float *Bf = NULL, *frow = NULL;
	uint8_t *orow = NULL;
	int rc;

	struct molae_options opt = *o;
	memset(&c, 0, sizeof(c));
	*rep_out = NULL;
	if (!opt.dtype)
		opt.dtype = MOE_DTYPE_F32;
	o = &opt;
	if ((rc = pack_open(in_path, PACK_OPEN_NO_DIRECT, &c.in, err)) < 0)
		return rc;
	if ((rc = conv_check(&c, o, err)) < 0)
		goto fail;
	const struct moe_model_config *mc = c.in->model;
	const uint32_t n = c.n, m = c.m, r = c.r, L = mc->n_moe_layers;
	const size_t nn = (size_t)n * n, mn = (size_t)m * n;

	if (o->calib) {
		struct stat sb;
		const uint64_t row = (uint64_t)L * n * sizeof(float);
		cf = fopen(o->calib, "rb");
		if (!cf || fstat(fileno(cf), &sb) != 0 || !S_ISREG(sb.st_mode)) {
			rc = moe_error_set(err, -ENOENT, "molae: calibration file %s: %s", o->calib,
					   cf ? "not a regular file" : strerror(errno));
			goto fail;
		}
		if (sb.st_size <= 0 || (uint64_t)sb.st_size % row) {
			rc = moe_error_set(err, -EINVAL,
					   "molae: calibration file %s: %" PRIu64 " bytes is not %u MoE layers x T tokens x "
					   "%u hidden f32 values",
					   o->calib, (uint64_t)sb.st_size, L, n);
			goto fail;
		}
		T = (uint64_t)sb.st_size / row;
	}
	rep = calloc(1, sizeof(*rep));
	if (!rep || !(rep->groups = calloc((size_t)L * c.G, sizeof(*rep->groups))) ||
	    !(rep->group_of = calloc((size_t)L * c.E, sizeof(int32_t)))) {
		rc = moe_error_set(err, -ENOMEM, "molae: out of memory");
		goto fail;
	}
	rep->n = n;
	rep->m = m;
	rep->n_experts = c.E;
	rep->n_moe_layers = L;
	rep->rank = r;
	rep->group_size = c.k;
	rep->n_groups = c.G;
	rep->groups_auto = o->groups_auto;
	rep->calib_tokens = T;
	rep->expert_params_before = 3 * (uint64_t)mn;
	rep->expert_params_after = 2 * (uint64_t)m * r + mn;
	rep->params_before = rep->expert_params_before * c.E;
	rep->params_after = 2 * (uint64_t)r * n * c.G + rep->expert_params_after * c.E;
	rep->extent_bytes_before = pack_extent_bytes(c.in);
	rep->resident_b_bytes = 2 * (uint64_t)r * n * c.G * L * sizeof(float);

	c.ext = aligned_alloc(PACK_ALIGN, pack_extent_bytes(c.in));
	c.row = malloc((size_t)(n > m ? n : m) * sizeof(float));
	for (int p = 0; p < 3; p++)
		W[p] = malloc(mn * sizeof(double));
	for (int p = 0; p < 2; p++) {
		Gm[p] = malloc(nn * sizeof(double));
		Bd[p] = malloc((size_t)r * n * sizeof(double));
	}
	A = malloc((size_t)m * r * sizeof(double));
	scr = malloc(mn * sizeof(double));
	frow = malloc((size_t)(n > r ? n : r) * sizeof(float) + 64);
	orow = malloc((size_t)(n > r ? n : r) * sizeof(float) + 64);
	/* Every B stays in memory until the resident region (after the extents). */
	Bf = malloc((size_t)L * c.G * 2 * r * n * sizeof(float));
	if (cf && (!(Lc = malloc(nn * sizeof(double))) || !(T1 = malloc(nn * sizeof(double))) ||
		   !(Gw = malloc(nn * sizeof(double))) || !(Vt = malloc((size_t)r * n * sizeof(double))) ||
		   !(P[0] = malloc((size_t)n * r * sizeof(double))) || !(P[1] = malloc((size_t)n * r * sizeof(double))))) {
		rc = moe_error_set(err, -ENOMEM, "molae: out of memory (activation-aware, n %u)", n);
		goto fail;
	}
	if (!c.ext || !c.row || !W[0] || !W[1] || !W[2] || !Gm[0] || !Gm[1] || !Bd[0] || !Bd[1] || !A || !scr ||
	    !frow || !orow || !Bf) {
		rc = moe_error_set(err, -ENOMEM, "molae: out of memory (n %u, m %u, rank %u)", n, m, r);
		goto fail;
	}

	struct moe_model_config outm = *mc;
	const uint32_t dt = o->dtype;
	outm.dtype = dt;
	rep->dtype = dt;
	struct pack_part_desc parts[3];
	memset(parts, 0, sizeof(parts));
	parts[0] = (struct pack_part_desc){ .role = PACK_ROLE_LATENT_A_GATE, .dtype = dt, .rows = m, .cols = r };
	parts[1] = (struct pack_part_desc){ .role = PACK_ROLE_LATENT_A_UP, .dtype = dt, .rows = m, .cols = r };
	parts[2] = (struct pack_part_desc){ .role = PACK_ROLE_DOWN, .dtype = dt, .rows = n, .cols = m };
	/* down keeps its bytes when its dtype is kept (exact, nothing re-rounded) */
	const bool down_raw = c.part[2]->dtype == dt;
	if ((rc = pack_writer_create(out_path, &outm, parts, 3, "molae", &w, err)) < 0)
		goto fail;
	{
		uint64_t ra, rd;
		(void)moe_dtype_row_bytes(dt, r, &ra);
		(void)moe_dtype_row_bytes(dt, m, &rd);
		rep->extent_bytes_after = MOE_ALIGN_UP(2 * (uint64_t)m * ra + (uint64_t)n * rd, (uint64_t)PACK_ALIGN);
	}

	for (uint32_t l = 0; l < L; l++) {
		int32_t *gof = rep->group_of + (size_t)l * c.E;
		if (cf && (rc = calib_factor(cf, o->calib, l, T, n, Lc, err)) < 0)
			goto fail;
		if (o->groups_auto && c.G > 1) {
			if ((rc = auto_groups(&c, l, gof, err)) < 0)
				goto fail;
		} else {
			for (uint32_t e = 0; e < c.E; e++)
				gof[e] = (int32_t)(e / c.k);
		}
		for (uint32_t g = 0; g < c.G; g++) {
			struct molae_group_stat *st = &rep->groups[(size_t)l * c.G + g];
			double res2[2] = { 0, 0 }, wres2[2] = { 0, 0 }, wtot[2] = { 0, 0 };
			st->layer = l;
			st->group = g;
			memset(Gm[0], 0, nn * sizeof(double));
			memset(Gm[1], 0, nn * sizeof(double));
			/* Pass 1: the Gram matrices, one expert at a time. */
			for (uint32_t e = 0; e < c.E; e++) {
				if (gof[e] != (int32_t)g)
					continue;
				if ((rc = pack_read_expert(c.in, l, e, c.ext, err)) < 0)
					goto fail;
				for (int p = 0; p < 2; p++) {
					load_part(&c, p, W[p]);
					molae_gram_add(Gm[p], W[p], m, n);
				}
			}
			for (int p = 0; p < 2; p++) {
				double tail;
				if ((rc = molae_basis(Gm[p], n, r, Bd[p], &st->norm2[p], &tail, err)) < 0)
					goto fail;
				st->bound[p] = st->norm2[p] > 0 ? sqrt(tail / st->norm2[p]) : 0.0;
				if (cf) {
					/* min sum ||(W_i - A_i B) L||: the top-r eigenvectors Vt of
					 * L^T G L; A_i = W_i L Vt^T, B = Vt L^-1 (molae.md section 4). */
					double wtail;
					for (uint32_t i = 0; i < n; i++)
						for (uint32_t j = i + 1; j < n; j++)
							Gm[p][(size_t)j * n + i] = Gm[p][(size_t)i * n + j];
					cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)n, (int)n, 1.0, Gm[p],
						    (int)n, Lc, (int)n, 0.0, T1, (int)n);
					cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)n, (int)n, (int)n, 1.0, Lc,
						    (int)n, T1, (int)n, 0.0, Gw, (int)n);
					if ((rc = molae_basis(Gw, n, r, Vt, &wtot[p], &wtail, err)) < 0)
						goto fail;
					st->wbound[p] = wtot[p] > 0 ? sqrt(wtail / wtot[p]) : 0.0;
					cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)r, (int)n, 1.0, Lc,
						    (int)n, Vt, (int)n, 0.0, P[p], (int)r);
					memcpy(Bd[p], Vt, (size_t)r * n * sizeof(double));
					cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit, (int)r,
						    (int)n, 1.0, Lc, (int)n, Bd[p], (int)n);
				}
				float *bf = Bf + (((size_t)l * c.G + g) * 2 + p) * r * n;
				for (size_t i = 0; i < (size_t)r * n; i++)
					bf[i] = (float)Bd[p][i];
			}
			/* Pass 2: A_i = W_i B^T, the error, the extent. */
			for (uint32_t e = 0; e < c.E; e++) {
				if (gof[e] != (int32_t)g)
					continue;
				if ((rc = pack_read_expert(c.in, l, e, c.ext, err)) < 0 ||
				    (rc = pack_writer_begin_expert(w, l, e, err)) < 0)
					goto fail;
				for (int p = 0; p < 2; p++) {
					load_part(&c, p, W[p]);
					if (cf)
						cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)r, (int)n,
							    1.0, W[p], (int)n, P[p], (int)r, 0.0, A, (int)r);
					else
						molae_project(W[p], m, n, Bd[p], r, A);
					res2[p] += molae_residual2(W[p], A, Bd[p], m, n, r, scr);
					if (cf) {
						/* scr holds W - A B */
						cblas_dtrmm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit,
							    (int)m, (int)n, 1.0, Lc, (int)n, scr, (int)n);
						for (size_t i = 0; i < mn; i++)
							wres2[p] += scr[i] * scr[i];
					}
					if ((rc = write_rows(w, A, m, r, dt, frow, orow, err)) < 0)
						goto fail;
				}
				if (down_raw) {
					rc = pack_writer_write(w, c.ext + c.part[2]->offset, c.part[2]->bytes, err);
				} else {
					load_part(&c, 2, W[2]);
					rc = write_rows(w, W[2], n, m, dt, frow, orow, err);
				}
				if (rc < 0 || (rc = pack_writer_end_expert(w, err)) < 0)
					goto fail;
			}
			for (int p = 0; p < 2; p++) {
				st->err[p] = st->norm2[p] > 0 ? sqrt(res2[p] / st->norm2[p]) : 0.0;
				st->werr[p] = wtot[p] > 0 ? sqrt(wres2[p] / wtot[p]) : 0.0;
			}
		}
		if (o->progress) {
			double e0 = 0, e1 = 0;
			for (uint32_t g = 0; g < c.G; g++) {
				e0 = fmax(e0, rep->groups[(size_t)l * c.G + g].err[0]);
				e1 = fmax(e1, rep->groups[(size_t)l * c.G + g].err[1]);
			}
			fprintf(stderr, "molae: layer %u/%u: worst group error gate %.4e up %.4e\n", l + 1, L, e0, e1);
		}
	}

	/* Resident region: the input's tensors, then B, groups, report. */
	for (uint64_t t = 0; t < c.in->hdr->n_tensors; t++)
		if ((rc = copy_tensor(w, c.in, &c.in->tensors[t], err)) < 0)
			goto fail;
	for (uint32_t l = 0; l < L; l++) {
		uint32_t layer = moe_model_layer_of(mc, l);
		char name[PACK_TENSOR_NAME_MAX];
		uint64_t shape[2] = { r, n };
		for (uint32_t g = 0; g < c.G; g++)
			for (int p = 0; p < 2; p++) {
				snprintf(name, sizeof(name), "blk.%u.molae_b_%s.%u", layer, p ? "up" : "gate", g);
				const float *bf = Bf + (((size_t)l * c.G + g) * 2 + p) * r * n;
				if ((rc = write_small_tensor(w, name, p ? PACK_ROLE_LATENT_B_UP : PACK_ROLE_LATENT_B_GATE,
							     MOE_DTYPE_F32, layer, 2, shape, bf,
							     (size_t)r * n * sizeof(float), err)) < 0)
					goto fail;
			}
		uint64_t es = c.E;
		snprintf(name, sizeof(name), "blk.%u.molae_groups", layer);
		if ((rc = write_small_tensor(w, name, PACK_ROLE_LATENT_GROUPS, MOE_DTYPE_I32, layer, 1, &es,
					     rep->group_of + (size_t)l * c.E, c.E * sizeof(int32_t), err)) < 0)
			goto fail;
	}
	json_t *j = molae_report_json(rep);
	char *js = j ? json_dumps(j, JSON_COMPACT) : NULL;
	json_decref(j);
	if (!js) {
		rc = moe_error_set(err, -ENOMEM, "molae: out of memory (report)");
		goto fail;
	}
	uint64_t jl = strlen(js);
	rc = write_small_tensor(w, "molae.report", PACK_ROLE_LATENT_REPORT, MOE_DTYPE_U8, UINT32_MAX, 1, &jl, js, jl,
				err);
	free(js);
	if (rc < 0)
		goto fail;
	rc = pack_writer_finish(w, err);
	w = NULL;
	if (rc < 0)
		goto fail;
	*rep_out = rep;
	rep = NULL;
	rc = 0;
	goto done;
fail:
	if (w)
		pack_writer_abort(w);
done:
	molae_report_free(rep);
	pack_close(c.in);
	free(c.ext);
	free(c.row);
	for (int p = 0; p < 3; p++)
		free(W[p]);
	for (int p = 0; p < 2; p++) {
		free(Gm[p]);
		free(Bd[p]);
	}
	free(A);
	free(scr);
	free(frow);
	free(orow);
	free(Lc);
	free(T1);
	free(Gw);
	free(Vt);
	free(P[0]);
	free(P[1]);
	if (cf)
		fclose(cf);
	free(Bf);
	return rc;
}

int molae_reconstruct(const char *in_path, const char *out_path, struct moe_error *err)
{
	struct pack_file *in = NULL;
	struct pack_writer *w = NULL;
	struct latent_basis *b = NULL;
	struct latent_layout LL;
	uint8_t *ext = NULL;
	float *arow = NULL, *W = NULL;
	int rc;

	if ((rc = pack_open(in_path, PACK_OPEN_NO_DIRECT, &in, err)) < 0)
		return rc;
	if (!latent_parts_present(in->hdr->parts, in->hdr->n_parts)) {
		rc = moe_error_set(err, -EINVAL, "molae: %s is not a MoLAE latent pack", in_path);
		goto out;
	}
	const struct moe_model_config *mc = in->model;
	if ((rc = latent_layout_init(&LL, mc, in->hdr->parts, in->hdr->n_parts, pack_extent_bytes(in), err)) < 0 ||
	    (rc = latent_basis_load(in, &b, err)) < 0)
		goto out;
	const uint32_t n = LL.n, m = LL.m, r = LL.r;
	ext = aligned_alloc(PACK_ALIGN, pack_extent_bytes(in));
	arow = malloc(sizeof(float) * ((size_t)m * r + 1));
	W = malloc(sizeof(float) * (size_t)m * n);
	if (!ext || !arow || !W) {
		rc = moe_error_set(err, -ENOMEM, "molae: out of memory (n %u, m %u)", n, m);
		goto out;
	}
	/* gate and up f32 (the reconstruction), down as it is */
	struct pack_part_desc parts[3] = {
		{ .role = PACK_ROLE_GATE, .dtype = MOE_DTYPE_F32, .rows = m, .cols = n },
		{ .role = PACK_ROLE_UP, .dtype = MOE_DTYPE_F32, .rows = m, .cols = n },
		{ .role = PACK_ROLE_DOWN, .dtype = LL.down.dtype, .rows = n, .cols = m },
	};
	if ((rc = pack_writer_create(out_path, mc, parts, 3, "molae-dense", &w, err)) < 0)
		goto out;
	for (uint32_t l = 0; l < mc->n_moe_layers; l++)
		for (uint32_t e = 0; e < mc->n_experts; e++) {
			if ((rc = pack_read_expert(in, l, e, ext, err)) < 0 ||
			    (rc = pack_writer_begin_expert(w, l, e, err)) < 0)
				goto out;
			const uint32_t g = (uint32_t)latent_basis_group(b, l, e);
			for (int p = 0; p < 2; p++) {
				const struct ffn_mat *A = p ? &LL.a_up : &LL.a_gate;
				const float *B = latent_basis_b(b, l, g, p);
				for (uint32_t i = 0; i < m; i++)
					moe_dequantize_row(A->dtype, ext + A->offset + (size_t)i * A->row_bytes,
							   arow + (size_t)i * r, r);
				/* W = A B (m x n), single precision as the kernels compute */
				cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)n, (int)r, 1.0f, arow,
					    (int)r, B, (int)n, 0.0f, W, (int)n);
				if ((rc = pack_writer_write(w, W, sizeof(float) * (size_t)m * n, err)) < 0)
					goto out;
			}
			if ((rc = pack_writer_write(w, ext + LL.down.offset, LL.down.row_bytes * n, err)) < 0 ||
			    (rc = pack_writer_end_expert(w, err)) < 0)
				goto out;
		}
	for (uint64_t t = 0; t < in->hdr->n_tensors; t++) {
		const uint32_t role = in->tensors[t].role;
		if (role >= PACK_ROLE_LATENT_B_GATE && role <= PACK_ROLE_LATENT_REPORT)
			continue;
		if ((rc = copy_tensor(w, in, &in->tensors[t], err)) < 0)
			goto out;
	}
	rc = pack_writer_finish(w, err);
	w = NULL;
out:
	if (w)
		pack_writer_abort(w);
	latent_basis_free(b);
	pack_close(in);
	free(ext);
	free(arow);
	free(W);
	return rc < 0 ? rc : 0;
}

#else /* !HAVE_LAPACKE */

void molae_gram_add(double *G, const double *W, uint32_t m, uint32_t n)
{
	(void)G, (void)W, (void)m, (void)n;
}

int molae_basis(const double *G, uint32_t n, uint32_t r, double *B, double *total, double *tail,
		struct moe_error *err)
{
	(void)G, (void)n, (void)r, (void)B, (void)total, (void)tail;
	return moe_error_set(err, -ENOTSUP, "molae: moe-pack was built without LAPACKE/CBLAS (liblapacke-dev)");
}

void molae_project(const double *W, uint32_t m, uint32_t n, const double *B, uint32_t r, double *A)
{
	(void)W, (void)m, (void)n, (void)B, (void)r, (void)A;
}

double molae_residual2(const double *W, const double *A, const double *B, uint32_t m, uint32_t n, uint32_t r,
		       double *scratch)
{
	(void)W, (void)A, (void)B, (void)m, (void)n, (void)r, (void)scratch;
	return NAN;
}

int molae_convert(const char *in, const char *out, const struct molae_options *o, struct molae_report **rep,
		  struct moe_error *err)
{
	(void)in, (void)out, (void)o;
	*rep = NULL;
	return moe_error_set(err, -ENOTSUP, "molae: moe-pack was built without LAPACKE/CBLAS (liblapacke-dev)");
}

int molae_reconstruct(const char *in, const char *out, struct moe_error *err)
{
	(void)in, (void)out;
	return moe_error_set(err, -ENOTSUP, "molae: moe-pack was built without LAPACKE/CBLAS (liblapacke-dev)");
}

#endif

static void molae_usage(FILE *f)
{
	fprintf(f, "usage: moe-pack molae --rank R [--group-size K | --groups auto] IN.moepack -o OUT.moepack\n"
		   "                      [--dtype f32|f16|bf16|q8_0] [--calib STATES.f32] [--json] [-q]\n"
		   "       moe-pack molae --reconstruct LATENT.moepack -o DENSE.moepack\n"
		   "STATES.f32: raw little-endian f32 hidden states [MoE layers][T][hidden] (activation-aware)\n"
		   "--reconstruct: the dense pack of the latent one (gate = A_gate B, up = A_up B in f32)\n");
}

int molae_main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "rank", required_argument, NULL, 'r' },   { "group-size", required_argument, NULL, 'k' },
		{ "groups", required_argument, NULL, 'g' }, { "output", required_argument, NULL, 'o' },
		{ "json", no_argument, NULL, 'j' },         { "quiet", no_argument, NULL, 'q' },
		{ "help", no_argument, NULL, 'h' },         { "dtype", required_argument, NULL, 'd' },
		{ "calib", required_argument, NULL, 'c' },  { "reconstruct", no_argument, NULL, 'R' },
		{ NULL, 0, NULL, 0 },
	};
	struct molae_options o = { .progress = true };
	const char *out = NULL;
	bool json = false, have_rank = false, reconstruct = false;
	struct moe_error err = { "" };
	int c;
	char *end;

	while ((c = getopt_long(argc, argv, "r:k:g:o:d:c:jqh", longopts, NULL)) != -1) {
		switch (c) {
		case 'c': o.calib = optarg; break;
		case 'R': reconstruct = true; break;
		case 'd':
			o.dtype = moe_dtype_parse(optarg);
			if (o.dtype != MOE_DTYPE_F32 && o.dtype != MOE_DTYPE_F16 && o.dtype != MOE_DTYPE_BF16 &&
			    o.dtype != MOE_DTYPE_Q8_0) {
				fprintf(stderr, "moe-pack molae: --dtype %s: expected f32, f16, bf16 or q8_0\n", optarg);
				return 2;
			}
			break;
		case 'r': {
			unsigned long v = strtoul(optarg, &end, 10);
			if (*optarg == '-' || *end || !*optarg || v == 0 || v > (1ul << 20)) {
				fprintf(stderr, "moe-pack molae: --rank %s: not a positive integer\n", optarg);
				return 2;
			}
			o.rank = (uint32_t)v;
			have_rank = true;
			break;
		}
		case 'k': {
			unsigned long v = strtoul(optarg, &end, 10);
			if (*optarg == '-' || *end || !*optarg || v == 0 || v > 4096) {
				fprintf(stderr, "moe-pack molae: --group-size %s: not a positive integer\n", optarg);
				return 2;
			}
			o.group_size = (uint32_t)v;
			break;
		}
		case 'g':
			if (strcmp(optarg, "auto") == 0)
				o.groups_auto = true;
			else if (strcmp(optarg, "contiguous") != 0) {
				fprintf(stderr, "moe-pack molae: --groups %s: expected auto or contiguous\n", optarg);
				return 2;
			}
			break;
		case 'o': out = optarg; break;
		case 'j': json = true; break;
		case 'q': o.progress = false; break;
		case 'h': molae_usage(stdout); return 0;
		default: molae_usage(stderr); return 2;
		}
	}
	if (reconstruct && optind + 1 == argc && out && !have_rank) {
		if (molae_reconstruct(argv[optind], out, &err) < 0) {
			fprintf(stderr, "moe-pack: %s\n", err.msg);
			return 1;
		}
		if (o.progress)
			printf("wrote %s\n", out);
		return 0;
	}
	if (optind + 1 != argc || !out || !have_rank || reconstruct) {
		molae_usage(stderr);
		return 2;
	}
	struct molae_report *rep;
	if (molae_convert(argv[optind], out, &o, &rep, &err) < 0) {
		fprintf(stderr, "moe-pack: %s\n", err.msg);
		return 1;
	}
	if (json) {
		json_t *j = molae_report_json(rep);
		json_dumpf(j, stdout, JSON_INDENT(1));
		fputc('\n', stdout);
		json_decref(j);
	} else {
		molae_report_print(rep, stdout);
		printf("wrote %s\n", out);
	}
	molae_report_free(rep);
	return 0;
}
