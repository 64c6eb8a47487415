/* predict.h - expert predictors behind one ops table, for the prefetch
 * scheduler in the daemon and in moe-sim.
 *
 * A predictor follows one stream of tokens (one client sequence, one prompt in
 * moe-sim) and scores the experts of a layer of the CURRENT token before that
 * layer is routed. It may use only what is known by then: the token's key
 * (a 32-bit hash of the token text, predict_token_key), earlier tokens' routes
 * and the routes of earlier layers of the same token. Calls, per token:
 *
 *   predict_token(p, key)                  a new token starts
 *   predict_score(p, L, scores)            any time, for L > last observed layer
 *   predict_observe(p, l, experts, n)      layer l of this token was routed
 *
 * Scores are estimates of P(expert used at layer L) in [0, 1].
 *
 * Predictors: "temporal" (decayed frequency over recent tokens at the same
 * layer), "coact" (cross-layer co-activation counts learned online: experts of
 * layer l of this token -> layer L), "tokenid" (per-token-key routing table
 * from training), "tracematch" (MoE-Infinity-style expert activation matrix of
 * the stream so far, cosine-matched against matrices stored at training),
 * "learned" (sparse logistic model over routing history and token keys, trained offline by
 * `moe-sim train`), "combo" (a calibrated logistic model per look-ahead
 * distance and layer over features of all the above, fitted on held-out
 * training prompts). tokenid, tracematch, learned
 * and combo need a model file (struct predict_model).
 *
 * Thread safety: a predictor instance belongs to one stream and its owner
 * serialises calls. A predict_model is read-only after load and may be shared
 * by any number of predictors on any threads.
 */
#ifndef MOETIER_PREDICT_H
#define MOETIER_PREDICT_H

#include <stdbool.h>
#include <stdint.h>

#include "util.h"

#define PREDICT_HIST 2          /* previous tokens remembered by the stream */
#define PREDICT_MAX_K 32
#define PREDICT_MAX_LAYERS 256
#define PREDICT_MAX_EXPERTS 1024
#define PREDICT_DMAX 3          /* look-ahead distances with their own weights */
#define PREDICT_MODEL_VERSION 2  /* 2: combiner over PREDICT_COMBO_F features per distance */
#define PREDICT_PAIR_MAX_E 64    /* pair weights cost E^3 floats per layer */
#define PREDICT_TOK_STEP (1.0f / 16) /* w_tok quantum: +-7.9 logits in int8 */

/* What the stream knows (shared by every predictor of one stream). */
struct predict_stream {
	uint32_t n_layers, n_experts, k;
	uint64_t n_tokens;      /* tokens begun so far */
	uint32_t token_key;
	uint32_t prev_key;      /* token t-1's key, 0 = none */
	int32_t last_layer;     /* highest observed layer of this token, -1 = none */
	uint16_t *cur;          /* [n_layers][k] this token's routes */
	uint8_t *cur_n;         /* [n_layers] ids observed (0 = not yet) */
	uint16_t *prev;         /* [PREDICT_HIST][n_layers][k]; prev[0] = token t-1 */
	uint8_t *prev_n;        /* [PREDICT_HIST][n_layers] */
};

static inline const uint16_t *predict_stream_prev(const struct predict_stream *s, uint32_t h,
						  uint32_t layer, uint32_t *n)
{
	*n = s->prev_n[(size_t)h * s->n_layers + layer];
	return &s->prev[((size_t)h * s->n_layers + layer) * s->k];
}

/* Trained state, loaded from a versioned file (see predict.c for the layout). */
struct predict_model {
	uint32_t n_layers, n_experts, k;
	/* learned: logit(L, e) = bias[L][e] + sum over feature groups of
	 * w_g[L][src][e] for every src expert active in the group's route. */
	float *bias;                        /* [L][E] */
	float *w_cur[PREDICT_DMAX];         /* [L][E][E]: (t, L-d), d = 1..DMAX */
	float *w_cur2;                      /* [L][E][E]: (t, L-d-1) */
	float *w_cur3;                      /* [L][E][E]: (t, L-d-2) */
	float *w_pair;                      /* [L][E*E][E]: pairs a < b of (t, L-1), d = 1
	                                     * only; NULL when E > PREDICT_PAIR_MAX_E */
	float *w_xpair;                     /* [L][E*E][E]: pairs (a of (t, L-1), c of
	                                     * (t, L-2)), d = 1 only; NULL likewise */
	float *w_prev;                      /* [L][E][E]: (t-1, L) */
	float *w_prevn;                     /* [L][E][E]: (t-1, L+1) */
	float *w_prev2;                     /* [L][E][E]: (t-2, L) */
	/* tokenid: open-addressed table of token keys -> per-layer counts. */
	uint32_t tok_slots;                 /* power of two */
	uint32_t *tok_key;                  /* [tok_slots], 0 = empty */
	uint8_t *tok_freq;                  /* [tok_slots][L][E] round(255 * P(e | token, L)) */
	uint16_t *tok_total;                /* [tok_slots] occurrences in training (saturating) */
	/* learned, per token key: a logit offset per (layer, expert) fitted
	 * jointly with the weights above (the token embedding's direct share of
	 * the router logits), in steps of PREDICT_TOK_STEP. */
	int8_t *w_tok;                      /* [tok_slots][L][E] */
	int8_t *w_tokp;                     /* [tok_slots][L][E]: the same for the
	                                     * previous token's key */
	float *tok_prior;                   /* [L][E] global activation frequency */
	/* tracematch: n_eam stored matrices, each [L][E] row-normalised frequencies. */
	uint32_t n_eam;
	float *eam;                         /* [n_eam][L][E] */
	/* combo: per distance bucket and layer, weights over the combiner's
	 * features (predict_combo_features) + bias. */
	uint32_t n_combo;                   /* features (PREDICT_COMBO_F) */
	float *combo;                       /* [PREDICT_COMBO_D][L][n_combo + 1] */
};

/* Components of "combo", in this order. */
#define PREDICT_COMBO_N 5 /* temporal, coact, tokenid, tracematch, learned */
/* Combiner features: the components' log-odds, then hinge terms of the
 * learned, tokenid and coact log-odds (a piecewise-linear calibration of
 * each), the token table's deviation from the layer prior for known tokens,
 * whether the previous token used the expert at this layer, and the
 * stream's own decayed frequency of the expert at this layer (a memory of
 * ~20 tokens). */
#define PREDICT_COMBO_F 14
/* Distance buckets with their own combiner weights: 0 = no layer of this
 * token routed yet, 1 = the next layer, 2 = two ahead, 3 = three or more. */
#define PREDICT_COMBO_D 4

struct predictor;

struct predict_ops {
	const char *name;
	const char *help;
	bool needs_model;
	size_t priv_size;
	int (*init)(struct predictor *p, struct moe_error *err);
	void (*fini)(struct predictor *p);
	/* A new token begins (the stream has already shifted its history). */
	void (*token)(struct predictor *p);
	/* Layer `layer` of the current token was routed (in the stream). */
	void (*observe)(struct predictor *p, uint32_t layer);
	/* Scores for the current token's layer (> stream->last_layer). */
	void (*score)(struct predictor *p, uint32_t layer, float *out);
};

struct predictor {
	const struct predict_ops *ops;
	struct predict_stream *s;          /* shared with sub-predictors */
	bool owns_stream;
	const struct predict_model *model; /* may be NULL for temporal/coact */
	void *priv;
};

extern const struct predict_ops *const predict_registry[];
const struct predict_ops *predict_find(const char *name);

/* Creates a predictor with its own stream. model may be NULL for predictors
 * that need none; -EINVAL otherwise, or when its shape differs from the
 * stream's (n_layers, n_experts, k). */
int predict_create(const char *name, uint32_t n_layers, uint32_t n_experts, uint32_t k,
		   const struct predict_model *model, struct predictor **out, struct moe_error *err);
/* Creates a predictor reading another predictor's stream (used by combo). */
int predict_create_on(const char *name, struct predict_stream *s, const struct predict_model *model,
		      struct predictor **out, struct moe_error *err);
void predict_destroy(struct predictor *p);

/* Starts a fresh stream (a new prompt): history and per-stream state are
 * cleared; online-learned tables (coact) are kept. */
void predict_reset(struct predictor *p);
void predict_token(struct predictor *p, uint32_t token_key);
/* Records the route of layer `layer` (0-based MoE layer index) of the current
 * token; ids >= n_experts are ignored. */
void predict_observe(struct predictor *p, uint32_t layer, const uint16_t *experts, uint32_t n);
/* out: [n_experts] scores for `layer` of the current token. Meant for layers
 * after the last observed one; asking for an observed layer gives a score
 * from the same features (no error). layer >= n_layers leaves out untouched. */
void predict_score(struct predictor *p, uint32_t layer, float *out);

/* FNV-1a of the token text: the token key the tokenid table is built on
 * (clients pass it as the token hint). Never 0. */
uint32_t predict_token_key(const char *text);

/* Model files. */
int predict_model_alloc(struct predict_model **out, uint32_t n_layers, uint32_t n_experts, uint32_t k,
			uint32_t tok_slots, uint32_t n_eam, struct moe_error *err);
void predict_model_free(struct predict_model *m);
int predict_model_save(const struct predict_model *m, const char *path, struct moe_error *err);
/* Validates magic, version, shapes, sizes and the CRC32C of the payload:
 * -EINVAL (corrupt or incompatible), -errno from I/O, with a message. */
int predict_model_load(const char *path, struct predict_model **out, struct moe_error *err);
/* Row of the tokenid table for key, or -1. */
int64_t predict_model_tok_find(const struct predict_model *m, uint32_t key);

/* Components used by combo and by training (predict_learned.c). The token
 * offset (w_tok) is added when m->w_tok is non-NULL and the stream's token
 * key has a row. */
float predict_learned_logit(const struct predict_model *m, const struct predict_stream *s,
			    uint32_t layer, uint32_t expert);
void predict_learned_logits(const struct predict_model *m, const struct predict_stream *s,
			    uint32_t layer, float *out);
/* Pair features of the latest routed layer and of it with the layer before
 * (d = 1): adds their rows to out, or (training) moves them by -lr * grad
 * when grad is non-NULL. The weights are written through the const model
 * only in that training case. */
void predict_learned_pairs(const struct predict_model *m, const struct predict_stream *s, uint32_t layer,
			   float *out, const float *grad, float lr);

/* combo only: the combiner's features for layer L, feat[i][e] for feature
 * i < PREDICT_COMBO_F (for fitting weights); returns the distance bucket
 * whose weights apply. */
uint32_t predict_combo_features(struct predictor *p, uint32_t layer, float (*feat)[PREDICT_MAX_EXPERTS]);
/* The distance bucket of layer L given the stream's latest routed layer. */
uint32_t predict_combo_bucket(const struct predict_stream *s, uint32_t layer);

extern const struct predict_ops predict_temporal_ops;
extern const struct predict_ops predict_coact_ops;
extern const struct predict_ops predict_tokenid_ops;
extern const struct predict_ops predict_tracematch_ops;
extern const struct predict_ops predict_learned_ops;
extern const struct predict_ops predict_combo_ops;

#endif
