/* molae.h - MoLAE conversion: rank-r shared-basis factorization of the gate
 * and up projections of groups of experts (issue 15, ../shared/reference/molae.md).
 *
 * For MoE layer l and group g of experts, W_i (m x n, gate or up) ~ A_i B_g with
 * B_g = the top-r eigenvectors of G = sum_i W_i^T W_i as rows (orthonormal,
 * r x n) and A_i = W_i B_g^T (m x r): the optimal rank-r factorization of the
 * stacked [W_1; ...; W_k] (Eckart-Young), in double precision, streaming one
 * expert at a time (memory n^2, not k*m*n). The squared error is exactly the
 * sum of the eigenvalues past r.
 *
 * The output pack's extents hold (A_gate_i | A_up_i | W_down_i) (f32, or f16,
 * bf16, q8_0 by option; down is copied as it is when its dtype is kept); the B
 * matrices, each expert's group and a JSON report are resident tensors
 * (PACK_ROLE_LATENT_*, doc/molae.md). */
#ifndef MOETIER_MOLAE_H
#define MOETIER_MOLAE_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "util.h"

struct molae_options {
	uint32_t rank;       /* r >= 1, <= n and <= k * m */
	uint32_t group_size; /* k: experts per group (must divide E); 0 = E (one group per layer) */
	bool groups_auto;    /* group by subspace similarity instead of contiguous ranges */
	bool progress;       /* a line per layer on stderr */
	uint32_t dtype;      /* enum moe_dtype of A and down in the output: F32 (0 = F32), F16, BF16, Q8_0 */
	const char *calib;   /* activation-aware: raw little-endian f32 hidden states [n_moe_layers][T][n], or NULL */
};

/* One (layer, group): index 0 = gate, 1 = up. */
struct molae_group_stat {
	uint32_t layer;      /* MoE layer index */
	uint32_t group;
	double err[2];       /* ||W - A B||_F / ||W||_F over the group (computed) */
	double bound[2];     /* sqrt(sum_{j>r} lambda_j / sum_j lambda_j) (eigenvalues of G) */
	double norm2[2];     /* ||W||_F^2 over the group */
	/* activation-aware only (C = X^T X = L L^T): ||(W - A B) L||_F / ||W L||_F and
	 * its bound from the eigenvalues of L^T G L; err/bound above stay the plain
	 * ones (bound: the plain optimum, which err then exceeds) */
	double werr[2], wbound[2];
};

struct molae_report {
	uint32_t n, m, n_experts, n_moe_layers, rank, group_size, n_groups;
	bool groups_auto;
	uint64_t calib_tokens;           /* T per layer; 0 = plain (not activation-aware) */
	struct molae_group_stat *groups; /* [n_moe_layers * n_groups] */
	int32_t *group_of;               /* [n_moe_layers * n_experts] */
	/* molae.md section 7, per layer */
	uint64_t params_before;          /* 3 m n E */
	uint64_t params_after;           /* 2 r n G + E (2 m r + m n) */
	uint64_t expert_params_before;   /* 3 m n: what moves per routed expert */
	uint64_t expert_params_after;    /* 2 m r + m n */
	uint64_t extent_bytes_before;    /* the input pack's extent (its dtype, padded) */
	uint64_t extent_bytes_after;     /* the output pack's extent (its dtype, padded) */
	uint32_t dtype;                  /* of the output's A and down */
	uint64_t resident_b_bytes;       /* all B matrices, f32 */
};

/* ---- the math (double precision, row-major) ---- */

/* G (n x n, upper triangle) += W^T W for W (m x n): CBLAS dsyrk. */
void molae_gram_add(double *G, const double *W, uint32_t m, uint32_t n);
/* B (r x n) = the top-r eigenvectors of the symmetric G (upper triangle
 * read; G is not modified) as rows, largest first; *total = trace(G) (the
 * sum of the eigenvalues), *tail = the sum of the n - r smallest eigenvalues
 * (negative rounding clamped to 0). LAPACKE dsyevr. */
int molae_basis(const double *G, uint32_t n, uint32_t r, double *B, double *total, double *tail,
		struct moe_error *err);
/* A (m x r) = W B^T. */
void molae_project(const double *W, uint32_t m, uint32_t n, const double *B, uint32_t r, double *A);
/* ||W - A B||_F^2; scratch holds m * n doubles. */
double molae_residual2(const double *W, const double *A, const double *B, uint32_t m, uint32_t n, uint32_t r,
		       double *scratch);
/* Groups of k experts by subspace similarity: each expert's top-d right
 * singular subspace S_i of [W_gate_i; W_up_i] (d = min(r, m, 32)); similarity
 * ||S_i^T S_j||_F^2 / d (the mean squared cosine of the principal angles);
 * greedy: the lowest unassigned expert seeds a group and takes the k - 1
 * unassigned experts most similar to it. S is [E][n * d] (column j of S_i at
 * S[i][j * n ...]). group_of[E] receives group ids. */
void molae_group_greedy(const double *S, uint32_t E, uint32_t n, uint32_t d, uint32_t k, int32_t *group_of);

/* ---- the conversion ---- */

/* Converts IN (a SwiGLU pack with gate, up, down parts) to OUT. Returns 0 and
 * a report (molae_report_free), or a negative errno with a message. */
int molae_convert(const char *in, const char *out, const struct molae_options *o, struct molae_report **rep,
		  struct moe_error *err);
void molae_report_free(struct molae_report *r);
/* The dense pack of a latent one: gate = A_gate B_g and up = A_up B_g in f32
 * (single precision), down as it is, the resident tensors but the latent
 * ones copied (to compare moe-run on a latent pack with its dense twin). */
int molae_reconstruct(const char *in, const char *out, struct moe_error *err);
json_t *molae_report_json(const struct molae_report *r);
void molae_report_print(const struct molae_report *r, FILE *f);

/* `moe-pack molae ...` (argv[0] = "molae"): exit status 0, 1 or 2. */
int molae_main(int argc, char **argv);

#endif
