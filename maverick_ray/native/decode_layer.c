/* One decoder layer of a decode step (one new token per sequence), fp32 on CPU, in one call.
 *
 * Why: at one sequence a layer is ~25 dispatched torch ops and 3-4 ctypes calls, each costing
 * 5-10 us of host time against a few us of arithmetic; the step's matmuls alone take about as long
 * as llama.cpp's whole step (issue 21, BENCHMARKS.md). Here the layer runs start to end in C: the
 * matmuls of up to GEMV_MAX_ROWS tokens in rows_split_matmul below, larger ones through the BLAS
 * torch itself uses (MKL's sgemm_, a pointer handed in by decode_layer_set_blas), the rest
 * through this package's kernels (rms_norm.c,
 * attention_prologue.c, paged_attention.c, grouped_experts.c, linked into the same library).
 *
 * Shape legend: T tokens = B sequences, C hidden, H query heads, KV kv heads, G = H / KV,
 * D head_dim, N = (H + 2 KV) D, I dense MLP width, E experts (all local), Ie expert width,
 * Is shared expert width. Weights are the model's inference layout (model/fused.py): the
 * projections (C_in, C_out) row-major ("wt"), the routed experts output-major.
 *
 *   h   = x + paged_attention(prologue(rmsnorm(x, w_in) @ Wqkv)) @ Wo
 *   y   = rmsnorm(h, w_post)
 *   dense: x' = h + (silu(y Wg) * y Wu) @ Wd
 *   MoE:   e = argmax(y @ Wr), s = sigmoid(max);  x' = (h + shared(y)) + expert_e(y * s)
 * The same operations in the same order as model/text.py's torch path (the residuals inside the
 * output matmuls, shared expert before the routed one is added); results agree to fp32 rounding.
 * x_in (T, C) -> x (T, C), which may be the same buffer; x is written only once the layer
 * cannot fail any more (the cache rows are written before). With y_out (T, C) given, the call
 * stops after the attention half: x = h, y_out = y (the caller runs the MoE block: experts on
 * other ranks, EP > 1). Returns 0; 1 a cache write row outside the pools; 2 out of memory;
 * 3 no BLAS set; 4 an attention error (G beyond the attention kernel's buffers).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);

static sgemm_fn blas_sgemm;

void decode_layer_set_blas(void *sgemm) {
    blas_sgemm = (sgemm_fn)sgemm;
}

/* kernels of this package, linked into the same library */
void rms_norm_f32(const float *x, const float *w, float *y, int64_t T, int64_t C, float eps, int nthreads);
int attention_prologue_f32(float *qkv, const int64_t *pos, int64_t T, int64_t H, int64_t KV, int64_t D,
                           const float *inv_freq, float qk_eps, float floor_scale, float attn_scale,
                           float *q_out, float *k_pool, float *v_pool, const int64_t *write_rows, int64_t rows,
                           int nthreads);
int paged_attention_f32(const float *q, const float *k, const float *v, const int64_t *table, const int64_t *first,
                        const int64_t *end, const int64_t *qlen, int64_t T, int64_t B, int64_t nb, int64_t KV,
                        int64_t G, int64_t D, int64_t Bs, int64_t chunk, float scale, float *out, int nthreads);
int grouped_swiglu_f32(const float *x, const int64_t *ids, int64_t R, int64_t E, int64_t C, int64_t I,
                       const float *wgu, const float *wd, float *out,
                       float *xs, float *act, int64_t *order, int64_t *starts, int64_t *units,
                       int64_t block, int nthreads);

/* Few-row matmuls (T <= GEMV_MAX_ROWS) stream the weight once with its rows split between the
 * threads: each thread walks its contiguous share of w's rows into private partial sums (T, n),
 * which are then added up, columns split between the threads. Measured in a `mini` engine on an
 * AMD EPYC host, alternating step by step (BENCHMARKS.md): at 1, 2 and 4 sequences the decode
 * forward took 1.5, 2.9 and 4.3 ms this way against 2.2, 3.7 and 4.8 ms through MKL's sgemv/sgemm;
 * from 6 rows MKL's sgemm, which reuses each weight across rows, was faster (4.0 against 4.9 ms). */
#define GEMV_MAX_ROWS 4

typedef struct {
    float *part;    /* (nthreads, T, widest n) partial sums when T <= GEMV_MAX_ROWS (mm_part_floats) */
    int nthreads;
} mm_ctx;

/* Floats of the partial sums a matmul context needs for T rows of outputs up to `widest` wide. */
static int64_t mm_part_floats(int64_t T, int64_t widest, int nthreads) {
    return T <= GEMV_MAX_ROWS ? (int64_t)(nthreads > 1 ? nthreads : 1) * T * widest : 0;
}

static void rows_split_matmul(const mm_ctx *m, const float *x, const float *w, float *y, int64_t T, int64_t k,
                              int64_t n, int accumulate) {
    float *part = m->part;
#pragma omp parallel num_threads(m->nthreads) if (m->nthreads > 1)
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t per = (k + nt - 1) / nt, lo = t * per, hi = lo + per < k ? lo + per : k;
        float *acc = part + (int64_t)t * T * n;
        for (int64_t j = 0; j < T * n; j++) acc[j] = 0.f;
        for (int64_t i = lo; i < hi; i++) {
            const float *wr = w + i * n;
            for (int64_t r = 0; r < T; r++) {
                const float xi = x[r * k + i];
                float *a = acc + r * n;
                for (int64_t j = 0; j < n; j++) a[j] += xi * wr[j];
            }
        }
#pragma omp barrier
        const int64_t cper = (n + nt - 1) / nt, clo = t * cper, chi = clo + cper < n ? clo + cper : n;
        for (int64_t r = 0; r < T; r++)
            for (int64_t j = clo; j < chi; j++) {
                float sum = accumulate ? y[r * n + j] : 0.f;
                for (int u = 0; u < nt; u++) sum += part[((int64_t)u * T + r) * n + j];
                y[r * n + j] = sum;
            }
    }
}

/* Matmuls of GEMV_MAX_ROWS + 1 .. PANEL_MAX_ROWS rows read the weight packed in panels of NB
 * columns, (n / NB, k, NB): each panel is contiguous, so a thread streams whole panels while it
 * keeps RB x NB outputs in vector registers over all of k (TILE_ROWS). On the AMD EPYC host,
 * weights from memory, 8-32 rows: 1.7-2.3x MKL's sgemm (BENCHMARKS.md); the same kernel over the
 * row-major weight (64 bytes a row at a stride) was slower than MKL in the engine. Built for
 * AVX-512, AVX2 and baseline x86-64, picked at load time (target_clones). */
#define PANEL_MAX_ROWS 32
#define NB 16

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));   /* unaligned loads and stores */
#define LOAD8(p) (*(const v8u *)(p))
#define STORE8(p, v) (*(v8u *)(p) = (v))

/* w (k, n) row-major -> panels (n / NB, k, NB); n a multiple of NB. */
void decode_layer_pack_panels(const float *w, float *panels, int64_t k, int64_t n) {
    for (int64_t tj = 0; tj < n / NB; tj++)
        for (int64_t i = 0; i < k; i++)
            memcpy(panels + (tj * k + i) * NB, w + i * n + tj * NB, sizeof(float) * NB);
}

#define TILE_ROWS(RB)                                                                              \
    for (; r0 + (RB) <= T; r0 += (RB)) {                                                           \
        v8 a[RB][2];                                                                               \
        for (int r = 0; r < (RB); r++) {                                                           \
            a[r][0] = accumulate ? LOAD8(y + (r0 + r) * n + j) : (v8){0};                          \
            a[r][1] = accumulate ? LOAD8(y + (r0 + r) * n + j + 8) : (v8){0};                      \
        }                                                                                          \
        for (int64_t i = 0; i < k; i++) {                                                          \
            const v8 w0 = LOAD8(panel + i * NB), w1 = LOAD8(panel + i * NB + 8);                   \
            for (int r = 0; r < (RB); r++) {                                                       \
                const float xv = x[(r0 + r) * k + i];                                              \
                a[r][0] += xv * w0;                                                                \
                a[r][1] += xv * w1;                                                                \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < (RB); r++) {                                                           \
            STORE8(y + (r0 + r) * n + j, a[r][0]);                                                 \
            STORE8(y + (r0 + r) * n + j + 8, a[r][1]);                                             \
        }                                                                                          \
    }

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
static void panel_matmul(const mm_ctx *m, const float *x, const float *panels, float *y, int64_t T, int64_t k,
                         int64_t n, int accumulate) {
#pragma omp parallel for num_threads(m->nthreads) schedule(static) if (m->nthreads > 1)
    for (int64_t tj = 0; tj < n / NB; tj++) {
        const int64_t j = tj * NB;
        const float *panel = panels + tj * k * NB;
        int64_t r0 = 0;
        TILE_ROWS(6)
        TILE_ROWS(4)
        TILE_ROWS(2)
        TILE_ROWS(1)
    }
}

/* y (T, n) = x (T, k) @ w (k, n) row-major, + y when accumulate (the residual already in y);
 * panels: the same weight packed (decode_layer_pack_panels), or NULL. */
static void matmul(const mm_ctx *m, const float *x, const float *w, const float *panels, float *y, int64_t T,
                   int64_t k, int64_t n, int accumulate) {
    if (T <= GEMV_MAX_ROWS) { rows_split_matmul(m, x, w, y, T, k, n, accumulate); return; }
    if (panels && T <= PANEL_MAX_ROWS) { panel_matmul(m, x, panels, y, T, k, n, accumulate); return; }
    const int m_ = (int)n, n_ = (int)T, k_ = (int)k;
    const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
    /* row-major y = x w is column-major y^T = w^T x^T: w^T is (n, k) with leading dimension n */
    blas_sgemm("N", "N", &m_, &n_, &k_, &alpha, w, &m_, x, &k_, &beta, y, &m_);
}

/* x (T, C) += (silu(y Wg) * (y Wu)) @ Wd, gate_up (C, 2I) with gate columns first. */
static void swiglu_mlp(const mm_ctx *m, const float *y, const float *gate_up, const float *gate_up_panels,
                       const float *down, const float *down_panels, float *x, float *gu, float *act, int64_t T,
                       int64_t C, int64_t I) {
    matmul(m, y, gate_up, gate_up_panels, gu, T, C, 2 * I, 0);
    for (int64_t t = 0; t < T; t++) {
        const float *g = gu + t * 2 * I, *u = g + I;
        float *a = act + t * I;
        for (int64_t i = 0; i < I; i++) a[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
    matmul(m, act, down, down_panels, x, T, I, C, 1);
}

typedef struct {
    /* sizes */
    int64_t C, H, KV, D, I, E, Ie, Is, rows, block_size, chunk, expert_block;
    float eps, qk_eps, floor_scale, attn_scale, scale;
    /* weights (model layout; moe ones NULL on dense layers, dense ones NULL on MoE layers) */
    const float *w_in, *w_qkv, *w_o, *w_post, *inv_freq;
    const float *mlp_gate_up, *mlp_down;
    const float *router, *shared_gate_up, *shared_down, *experts_gate_up, *experts_down;
    float *k_pool, *v_pool;
    /* the same projections packed in panels (decode_layer_pack_panels), each NULL when not */
    const float *p_qkv, *p_o, *p_mlp_gate_up, *p_mlp_down, *p_router, *p_shared_gate_up, *p_shared_down;
} layer_t;

int decode_layer_f32(const layer_t *L, const float *x_in, float *x, int64_t T, const int64_t *positions, const int64_t *write_rows,
                     const int64_t *table, const int64_t *first, const int64_t *end, int64_t nb,
                     int64_t *routed_ids, float *y_out, int nthreads) {
    if (!blas_sgemm) return 3;
    const int64_t C = L->C, H = L->H, KV = L->KV, D = L->D, N = (H + 2 * KV) * D, E = L->E;
    const int moe = L->router != NULL && y_out == NULL;
    const int64_t wide = moe ? 2 * (L->Ie > L->Is ? L->Ie : L->Is) : 2 * L->I;
    const int64_t n_idx = moe ? T + 2 * (E + 1) + 2 * E * ((L->Ie + L->expert_block - 1) / L->expert_block
                                                          + (C + L->expert_block - 1) / L->expert_block) : 0;
    /* scratch: xn (T, C), qkv (T, N), q (T, H D), attn (T, H D), gu (T, wide), act (T, wide / 2),
     * moe: logits (T, E), rows (T, C), routed (T, C), expert xs (T, C), expert act (T, Ie) */
    int64_t widest = N > C ? N : C;
    if (wide > widest) widest = wide;
    if (moe && E > widest) widest = E;
    const int64_t part = mm_part_floats(T, widest, nthreads);
    const size_t floats = (size_t)(T * (C + N + 2 * H * D + wide + wide / 2)
                                   + (moe ? T * (E + 3 * C + L->Ie) : 0) + part);
    float *buf = malloc(sizeof(float) * floats);
    int64_t *idx = moe ? malloc(sizeof(int64_t) * (size_t)n_idx) : NULL;
    if (!buf || (moe && !idx)) { free(buf); free(idx); return 2; }
    float *xn = buf, *qkv = xn + T * C, *q = qkv + T * N, *attn = q + T * H * D, *gu = attn + T * H * D;
    float *act = gu + T * wide;
    const mm_ctx mm = {buf + floats - part, nthreads > 1 ? nthreads : 1};
    int rc = 0;

    rms_norm_f32(x_in, L->w_in, xn, T, C, L->eps, nthreads);
    matmul(&mm, xn, L->w_qkv, L->p_qkv, qkv, T, C, N, 0);
    if (attention_prologue_f32(qkv, positions, T, H, KV, D, L->inv_freq, L->qk_eps, L->floor_scale, L->attn_scale,
                               q, L->k_pool, L->v_pool, write_rows, L->rows, nthreads)) { rc = 1; goto done; }
    int a = paged_attention_f32(q, L->k_pool, L->v_pool, table, first, end, NULL, T, T, nb, KV, H / KV, D,
                                L->block_size, L->chunk, L->scale, attn, nthreads);
    if (a) { rc = a == 2 ? 2 : 4; goto done; }
    if (x != x_in) memcpy(x, x_in, sizeof(float) * (size_t)(T * C));
    matmul(&mm, attn, L->w_o, L->p_o, x, T, H * D, C, 1);                       /* x = h */
    if (y_out) {
        rms_norm_f32(x, L->w_post, y_out, T, C, L->eps, nthreads);
        goto done;
    }
    rms_norm_f32(x, L->w_post, xn, T, C, L->eps, nthreads);        /* xn = y */
    if (!moe) {
        swiglu_mlp(&mm, xn, L->mlp_gate_up, L->p_mlp_gate_up, L->mlp_down, L->p_mlp_down, x, gu, act, T, C, L->I);
        goto done;
    }
    float *logits = act + T * wide / 2, *rows = logits + T * E, *routed = rows + T * C;
    float *exs = routed + T * C, *eact = exs + T * C;
    matmul(&mm, xn, L->router, L->p_router, logits, T, C, E, 0);
    for (int64_t t = 0; t < T; t++) {              /* top-1; the first of equal maxima, as torch.topk */
        const float *l = logits + t * E;
        int64_t best = 0;
        for (int64_t e = 1; e < E; e++)
            if (l[e] > l[best]) best = e;
        routed_ids[t] = best;
        const float s = 1.f / (1.f + expf(-l[best]));
        for (int64_t c = 0; c < C; c++) rows[t * C + c] = xn[t * C + c] * s;
    }
    if (grouped_swiglu_f32(rows, routed_ids, T, E, C, L->Ie, L->experts_gate_up, L->experts_down, routed,
                           exs, eact, idx, idx + T, idx + T + 2 * (E + 1), L->expert_block, nthreads)) {
        rc = 4; goto done;   /* unreachable: the ids come from the argmax above, all in [0, E) */
    }
    swiglu_mlp(&mm, xn, L->shared_gate_up, L->p_shared_gate_up, L->shared_down, L->p_shared_down, x, gu, act,
               T, C, L->Is);   /* x = h + shared(y) */
    for (int64_t j = 0; j < T * C; j++) x[j] += routed[j];
done:
    free(buf);
    free(idx);
    return rc;
}

/* Every layer of a decode step, in order, in one call: the per-layer Python wrapper (argument
 * checks, ctypes conversion, buffers) cost ~35 us a layer, once per step instead. Layer l reads its
 * group's cache views (group[l] indexes write_rows, tables, firsts, nbs); the first layer reads
 * x_in, every layer then updates x in place. MoE layers (router set) write their routed expert of
 * each token to routed_ids, (number of MoE layers, T) in layer order. With head->w_lm set, the
 * final RMSNorm and lm_head follow: logits (T, V) = rmsnorm(x, w_norm) @ w_lm (C, V), with the
 * same few-row matmul as the layers (torch's addmm would take the 1-row case to MKL's sgemv). On
 * failure returns decode_layer_f32's code (5: a MoE layer without its router and experts in the
 * struct, which the caller must run layer by layer) with the failing layer's index in *failed. */
typedef struct {
    const float *w_norm, *w_lm, *p_lm;   /* p_lm: w_lm packed in panels, or NULL */
    float eps;
    int64_t V;
    float *logits;
} head_t;

int decode_stack_f32(const layer_t *const *layers, int64_t n_layers, const int64_t *group, const float *x_in,
                     float *x, int64_t T, const int64_t *positions, const int64_t *const *write_rows,
                     const int64_t *const *tables, const int64_t *const *firsts, const int64_t *end,
                     const int64_t *nbs, int64_t *routed_ids, const head_t *head, int64_t *failed, int nthreads) {
    int64_t moe = 0;
    for (int64_t l = 0; l < n_layers; l++) {
        const layer_t *L = layers[l];
        const int64_t g = group[l];
        if (!L->router && !L->mlp_gate_up) { *failed = l; return 5; }   /* a MoE block it cannot run whole */
        int rc = decode_layer_f32(L, l ? x : x_in, x, T, positions, write_rows[g], tables[g], firsts[g], end, nbs[g],
                                  L->router ? routed_ids + moe * T : NULL, NULL, nthreads);
        if (rc) { *failed = l; return rc; }
        if (L->router) moe++;
    }
    if (!head || !head->w_lm) return 0;
    const int64_t C = layers[0]->C, V = head->V;
    const int64_t part = mm_part_floats(T, V, nthreads);
    float *buf = malloc(sizeof(float) * (size_t)(T * C + part));
    if (!buf) { *failed = n_layers; return 2; }
    const mm_ctx mm = {buf + T * C, nthreads > 1 ? nthreads : 1};
    rms_norm_f32(x, head->w_norm, buf, T, C, head->eps, nthreads);
    matmul(&mm, buf, head->w_lm, head->p_lm, head->logits, T, C, V, 0);
    free(buf);
    return 0;
}
