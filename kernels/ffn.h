/* ffn.h - the routed-expert FFN on the CPU, computed straight from an
 * expert's extent bytes (the pack layout: parts described by
 * struct pack_part_desc).
 *
 *   SwiGLU:  y = W_down (silu(W_gate x) * (W_up x))
 *   GPT-OSS: gu = W_gate_up x + b (rows interleaved gate0, up0, gate1, ...),
 *            g = min(gate, L), u = clamp(up, -L, L), glu = g * sigmoid(alpha g),
 *            y = W_down ((u + 1) * glu) + b_down
 *
 * Activations are f32; weights f32, f16, bf16, q8_0, q4_0, mxfp4, iq4_nl and
 * the super-block types q4_K, q5_K, q6_K, q3_K, q2_K, iq4_xs (ggml block
 * layouts, dtype.h); for the super-block types x (and h) is quantized to
 * q8_K per 256 columns and each super-block is an exact integer dot (ggml's
 * scheme, whatever the q8 mode below). One implementation per instruction set (portable C,
 * AVX2+FMA+F16C, AVX-512, AVX-512 + AVX512-BF16 vdpbf16ps) is chosen once by
 * CPUID; MOETIER_FFN_ISA=ref|avx2|avx512|avx512bf16 or ffn_set_isa() forces
 * one (tests run every path the CPU has). On the AVX-512 paths, batches of
 * 4+ tokens of the integer kernels (q8_0, q4_0, iq4_nl in INT mode; q4_K,
 * q5_K, q6_K, q3_K, q2_K) use AVX512-VNNI when the CPU has it, with the
 * AVX2 kernels' bits.
 *
 * Results do not depend on the batch size nor on the thread count: every
 * (row, token) dot product is accumulated in the same order whatever tile
 * it falls in, so a token computed alone or in a batch of 64 gives the same
 * bits. compute.c relies on that. */
#ifndef MOETIER_FFN_H
#define MOETIER_FFN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "model.h"
#include "pack.h"
#include "util.h"

enum ffn_isa {
	FFN_ISA_REF = 0,        /* portable C, float accumulation */
	FFN_ISA_AVX2 = 1,       /* AVX2 + FMA + F16C, weights widened to f32 on the fly */
	FFN_ISA_AVX512 = 2,     /* AVX-512 F/BW/VL/DQ, the same algorithm 16 wide */
	FFN_ISA_AVX512BF16 = 3, /* AVX-512 + vdpbf16ps for bf16 weights (x rounded to bf16) */
	FFN_ISA_COUNT
};

/* "ref", "avx2", "avx512", "avx512bf16". */
const char *ffn_isa_name(enum ffn_isa isa);
/* Parses the names above; -1 when unknown. */
int ffn_isa_parse(const char *name);
/* Whether this CPU (and OS) can run the path. REF always can. */
bool ffn_isa_supported(enum ffn_isa isa);
/* The best supported path. */
enum ffn_isa ffn_isa_best(void);
/* The path in use: the best one, or MOETIER_FFN_ISA when set and supported
 * (read on first use). */
enum ffn_isa ffn_get_isa(void);
/* Forces a path for the whole process: 0, -EINVAL for an unknown value,
 * -ENOTSUP when the CPU lacks it. */
int ffn_set_isa(enum ffn_isa isa);

/* How q8_0 weights meet x. INT (default, as ggml/llama.cpp do): x (and h)
 * quantized to q8_0 per 32-block, integer dot per block; fewer instructions
 * per weight byte (the only mode that keeps a one-token q8_0 expert at the
 * memory bound on AVX2), but x carries up to ~0.6/127 of each block's max |x|
 * of quantization error. EXACT: weights widened to f32 on the fly, f32 x,
 * results within f32 rounding of the exact product. MOETIER_FFN_Q8=exact|int or
 * ffn_set_q8_mode() (process-wide; 0 or -EINVAL). INT applies to q4_0 and
 * iq4_nl weights as well (ggml's q4_0 / iq4_nl x q8_0 integer dots). */
enum ffn_q8_mode {
	FFN_Q8_EXACT = 0,
	FFN_Q8_INT = 1,
};
int ffn_set_q8_mode(enum ffn_q8_mode mode);
enum ffn_q8_mode ffn_get_q8_mode(void);

/* One weight matrix inside the extent. */
struct ffn_mat {
	enum moe_dtype dtype;
	uint32_t rows, cols;
	uint64_t offset;    /* bytes from the extent start */
	uint64_t row_bytes;
};

/* One bias vector inside the extent (absent: dtype INVALID). */
struct ffn_vec {
	enum moe_dtype dtype;
	uint32_t len;
	uint64_t offset;
};

/* Where an expert's tensors are, resolved once per model from its parts. */
struct ffn_layout {
	enum moe_ffn_kind kind;
	uint32_t n;              /* hidden */
	uint32_t m;              /* expert width */
	struct ffn_mat gate, up; /* SWIGLU; SILU: up only (gate.rows 0) */
	struct ffn_mat gate_up;  /* GPTOSS: 2m rows */
	struct ffn_vec gate_up_bias, down_bias; /* GPTOSS */
	struct ffn_mat down;     /* n rows x m cols */
	float limit;             /* GPTOSS clamp; 0 = none */
	float alpha;             /* GPTOSS glu alpha; 0 = 1 (plain silu) */
	uint64_t payload;        /* bytes of the extent the parts cover */
	uint64_t weight_bytes;   /* matrix bytes streamed per expert run */
};

/* Resolves and checks the parts against the model (roles present, shapes
 * [m x n] / [n x m] / [2m x n], dtypes the kernels support, block types with
 * whole blocks per row: cols % 32, or % 256 for K-quants; offsets inside
 * extent_bytes). 0 or -EINVAL with a message. */
int ffn_layout_init(struct ffn_layout *L, const struct moe_model_config *cfg,
		    const struct pack_part_desc *parts, uint32_t n_parts, uint64_t extent_bytes,
		    struct moe_error *err);
/* Multiply-adds of one token through one expert (2 per weight). */
uint64_t ffn_layout_flops_per_token(const struct ffn_layout *L);
/* The part of `role` among parts[0..n), or NULL. */
const struct pack_part_desc *ffn_layout_find_part(const struct pack_part_desc *parts, uint32_t n, uint32_t role);
/* Matrix part p as [rows x cols] of an extent of extent_bytes: present, a
 * kernel dtype, that shape, whole blocks per row, its byte count, inside the
 * extent (what ffn_layout_init checks of each matrix; latent.c too).
 * 0 or -EINVAL with a message naming `what`. */
int ffn_layout_take_mat(struct ffn_mat *M, const struct pack_part_desc *p, const char *what, uint32_t rows,
			uint32_t cols, uint64_t extent_bytes, struct moe_error *err);

/* Whether the kernels take this weight dtype (f32, f16, bf16, q8_0, q4_0, mxfp4,
 * iq4_nl, q4_K, q5_K, q6_K, q3_K, q2_K, iq4_xs). */
bool ffn_dtype_supported(enum moe_dtype t);

/* y[t*ldy + r] = sum_c W[r][c] * x[t*ldx + c] for r in [0, rows), t in [0, B).
 * W: rows of row_bytes (moe_dtype_row_bytes(dt, cols)). threads >= 1 splits
 * the rows. For tests and benchmarks; 0 or a negative errno. */
int ffn_matmul(enum moe_dtype dt, const void *W, uint32_t rows, uint32_t cols,
	       const float *x, size_t ldx, uint32_t B, float *y, size_t ldy, int threads);

/* Threads (threads > 1) come from one process-wide pool of workers, created
 * on first use and grown to the largest count asked, not per call; they
 * sleep when idle. Several caller threads may call at once: one uses the
 * pool, the others run their pieces on their own thread (same bits). Safe
 * across fork(): the child starts with an empty pool. Threads the pool has
 * ever created (for tests). */
uint32_t ffn_pool_threads_created(void);
/* The same pool for callers' own work: fn(arg, lo, hi) over [0, n) cut into
 * min(threads, n) consecutive pieces (piece i: [n*i/k, n*(i+1)/k)), piece 0
 * on the calling thread; returns when all are done. Pieces may call the
 * kernels with threads > 1 (they then run on their own thread). */
void ffn_parallel_for(int threads, uint32_t n, void (*fn)(void *arg, uint32_t lo, uint32_t hi), void *arg);

enum ffn_flags {
	FFN_ACCUMULATE = 1 << 0, /* y += scale * expert(x) instead of y = expert(x) */
};

/* Runs one expert over B tokens: x is [B x n] with row stride ldx, y is
 * [B x n] with stride ldy. With FFN_ACCUMULATE, y[t] += scale[t] * out[t]
 * (scale NULL means 1) through ffn_axpy. threads >= 1 splits rows (the caller
 * decides; 1 is the right default on a shared 2-vCPU host).
 * Returns 0, -EINVAL (bad arguments), -ENOMEM. */
int ffn_expert(const struct ffn_layout *L, const void *extent, const float *x, size_t ldx,
	       uint32_t B, float *y, size_t ldy, const float *scale, unsigned flags, int threads);

/* One token through its top-k experts: y = sum_j w[j] * expert_j(x), the
 * terms added in j order with ffn_axpy. */
int ffn_moe_token(const struct ffn_layout *L, const void *const *extents, const float *w,
		  uint32_t k, const float *x, float *y, int threads);

/* y[i] += s * v[i], the one accumulation every caller uses so that results
 * are bit-identical whichever path grouped the work. */
void ffn_axpy(float *y, float s, const float *v, size_t n);

/* The embedded CUDA fatbin (kernels/ffn.cu) and its size, or NULL when the
 * build had no nvcc. */
const void *ffn_cuda_fatbin(size_t *len);

/* Whether kernels/ffn.cu decodes this weight type: f32, f16, bf16, q8_0,
 * q4_0, mxfp4 (not the K-quants nor iq4, which the CPU kernels take). */
bool ffn_cuda_dtype_supported(enum moe_dtype t);
/* 0 when every matrix and bias of the layout has a CUDA decoder, else
 * -ENOTSUP naming the type (or the kind: gateless experts have no CUDA
 * kernel): every host that launches ffn.cu calls it first,
 * since the device code would read an unknown type as zeros. */
int ffn_cuda_layout_check(const struct ffn_layout *L, struct moe_error *err);

#endif
