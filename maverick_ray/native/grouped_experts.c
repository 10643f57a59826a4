/* Routed experts of one MoE layer for few-row (decode) batches, fp32 on CPU.
 *
 * Shape legend: R rows routed to this process, C hidden, I expert width, E local experts.
 *   x     (R, C)        rows, any expert order       ids   (R,)   local expert of each row
 *   wgu   (E, 2I, C)    gate rows 0..I-1, up rows I..2I-1, each output row contiguous over C
 *   wd    (E, C, I)     down projection, each output row contiguous over I
 *   out   (R, C)        out[r] = (silu(x[r] Wg^T) * (x[r] Wu^T)) Wd^T for the expert of row r
 *
 * Why: a decode step routes 1-4 rows to each of dozens of experts, so the work is streaming
 * dozens of 0.5-1 MiB matrices from memory. One BLAS call per matrix splits every matrix across
 * the threads and pays a fork/join per call; here one parallel region gives each thread a
 * contiguous run of (expert, output block) units over all the layer's touched experts.
 * Threads come from the OpenMP runtime torch already loaded (same libgomp soname).
 *
 * Scratch (caller-allocated): xs (R, C), act (R, I), order (R,), starts (2 * (E + 1),),
 * units (2 * E * (ceil(I / block) + ceil(C / block)),).
 * Returns 0, or -1 when an id is outside [0, E) (nothing is written to out then).
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>

#define ROWS_PER_PASS 64
/* Software prefetch distance, in weight rows. On the development VM the hardware prefetchers
 * alone streamed 16.5 GB/s through these matrices against 20.2 GB/s with this (caches flushed
 * between calls; BENCHMARKS.md). Prefetches past the last row touch at most PREFETCH_ROWS rows
 * of a neighbouring matrix (a hint, never a fault). */
#define PREFETCH_ROWS 4

static inline void prefetch_row(const float *row, int64_t n) {
    const char *p = (const char *)row;
    for (int64_t b = 0; b < n * (int64_t)sizeof(float); b += 64) __builtin_prefetch(p + b);
}

#if defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void row_dots(const float *w, const float *xs, int64_t rows, int64_t n, float *res) {
    /* res[r] = w . xs[r] for `rows` contiguous rows of length n (w stays in L1 across rows) */
    for (int64_t r = 0; r < rows; r++) {
        const float *x = xs + r * n;
        float s = 0.f;
#pragma omp simd reduction(+:s)
        for (int64_t k = 0; k < n; k++) s += w[k] * x[k];
        res[r] = s;
    }
}

/* Dot-form register tiles: up to TW weight rows x TR input rows, each output one dot product over
 * n. Per 8 lanes of n a tile loads TW + TR vectors for TW * TR FMAs; one dot at a time loaded two
 * vectors per FMA, and at 4 or more rows per expert (prefill chunks) the kernel was bound by
 * those loads (BENCHMARKS.md). The weight rows stay in L1 across an expert's row tiles. */
#define TW 4
#define TR 4
/* Row passes of fewer rows take one weight row at a time (row_dots): the tiles were 0.8x as fast
 * at 1-4 rows per expert and 1.2-1.3x at 16 (BENCHMARKS.md). */
#define TILE_MIN_ROWS 8
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));   /* unaligned loads */

static inline __attribute__((always_inline)) float hsum8(v8 v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

/* res[i * TR + r] = w[i] . x[r] for i < nw, r < nr (x rows xstride apart); nw and nr are
 * constants where it is inlined, so the tile lives in registers. */
static inline __attribute__((always_inline)) void dot_tile(const float *const *w, int nw, const float *x,
                                                          int64_t xstride, int nr, int64_t n, float *res) {
    v8 acc[TW][TR];
    for (int i = 0; i < nw; i++)
        for (int r = 0; r < nr; r++) acc[i][r] = (v8){0};
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        v8 wv[TW], xv[TR];
        for (int i = 0; i < nw; i++) wv[i] = *(const v8u *)(w[i] + k);
        for (int r = 0; r < nr; r++) xv[r] = *(const v8u *)(x + r * xstride + k);
        for (int i = 0; i < nw; i++)
            for (int r = 0; r < nr; r++) acc[i][r] += wv[i] * xv[r];
    }
    for (int i = 0; i < nw; i++)
        for (int r = 0; r < nr; r++) {
            float s = hsum8(acc[i][r]);
            for (int64_t kk = k; kk < n; kk++) s += w[i][kk] * x[r * xstride + kk];
            res[i * TR + r] = s;
        }
}

/* NW weight rows over the m input rows: whole TR-row tiles, then the last 1-3 rows. */
#define ROWS_TILES(NW)                                                                              \
    do {                                                                                            \
        int64_t r0 = 0;                                                                             \
        for (; r0 + TR <= m; r0 += TR) dot_tile(w, NW, x + r0 * n, n, TR, n, res + r0 * TW);        \
        switch (m - r0) {                                                                           \
        case 3: dot_tile(w, NW, x + r0 * n, n, 3, n, res + r0 * TW); break;                         \
        case 2: dot_tile(w, NW, x + r0 * n, n, 2, n, res + r0 * TW); break;                         \
        case 1: dot_tile(w, NW, x + r0 * n, n, 1, n, res + r0 * TW); break;                         \
        }                                                                                           \
    } while (0)

/* w[i] . x[r] for i < nw (1..TW) weight rows and r < m contiguous rows of x (length n), read
 * back with tile_at. */
#if defined(__x86_64__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
static void weight_rows_dots(const float *const *w, int nw, const float *x, int64_t m, int64_t n, float *res) {
    switch (nw) {
    case 4: ROWS_TILES(4); break;
    case 3: ROWS_TILES(3); break;
    case 2: ROWS_TILES(2); break;
    default: ROWS_TILES(1); break;
    }
}

/* weight_rows_dots' result for weight row i and input row r: tiles of TW x TR, TR rows apart. */
static inline float tile_at(const float *res, int i, int64_t r) { return res[(r / TR) * TW * TR + i * TR + r % TR]; }

static int64_t make_units(const int64_t *starts, int64_t E, int64_t width, int64_t block, int64_t *units) {
    int64_t u = 0;
    for (int64_t e = 0; e < E; e++)
        if (starts[e + 1] > starts[e])
            for (int64_t o = 0; o < width; o += block) { units[2 * u] = e; units[2 * u + 1] = o; u++; }
    return u;
}

int grouped_swiglu_f32(const float *x, const int64_t *ids, int64_t R, int64_t E, int64_t C, int64_t I,
                       const float *wgu, const float *wd, float *out,
                       float *xs, float *act, int64_t *order, int64_t *starts, int64_t *units,
                       int64_t block, int nthreads) {
    /* Stable counting sort of rows by expert: rows of expert e sit at [starts[e], starts[e + 1]). */
    int64_t *cursor = starts + E + 1;
    for (int64_t e = 0; e <= E; e++) starts[e] = 0;
    for (int64_t r = 0; r < R; r++) {
        if (ids[r] < 0 || ids[r] >= E) return -1;
        starts[ids[r] + 1]++;
    }
    for (int64_t e = 0; e < E; e++) starts[e + 1] += starts[e];
    for (int64_t e = 0; e < E; e++) cursor[e] = starts[e];
    for (int64_t r = 0; r < R; r++) order[cursor[ids[r]]++] = r;
    int64_t n1 = make_units(starts, E, I, block, units);
    int64_t *units2 = units + 2 * n1;
    int64_t n2 = make_units(starts, E, C, block, units2);

#pragma omp parallel num_threads(nthreads)
    {
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        float res[ROWS_PER_PASS * TW];
        /* gather rows into expert order */
        for (int64_t j = R * t / nt; j < R * (t + 1) / nt; j++) {
            const float *src = x + order[j] * C;
            float *dst = xs + j * C;
            for (int64_t k = 0; k < C; k++) dst[k] = src[k];
        }
#pragma omp barrier
        /* act[j, o] = silu(gate_o . xs[j]) * (up_o . xs[j]), units = (expert, first o) */
        for (int64_t q = n1 * t / nt; q < n1 * (t + 1) / nt; q++) {
            int64_t e = units[2 * q], o0 = units[2 * q + 1];
            int64_t o1 = o0 + block < I ? o0 + block : I;
            for (int64_t j0 = starts[e]; j0 < starts[e + 1]; j0 += ROWS_PER_PASS) {
                int64_t m = starts[e + 1] - j0 < ROWS_PER_PASS ? starts[e + 1] - j0 : ROWS_PER_PASS;
                if (m < TILE_MIN_ROWS) {   /* a few rows: one weight row at a time */
                    for (int64_t o = o0; o < o1; o++) {
                        prefetch_row(wgu + (e * 2 * I + o + PREFETCH_ROWS) * C, C);
                        prefetch_row(wgu + (e * 2 * I + I + o + PREFETCH_ROWS) * C, C);
                        row_dots(wgu + (e * 2 * I + o) * C, xs + j0 * C, m, C, res);
                        row_dots(wgu + (e * 2 * I + I + o) * C, xs + j0 * C, m, C, res + ROWS_PER_PASS);
                        for (int64_t i = 0; i < m; i++)
                            act[(j0 + i) * I + o] = res[i] / (1.f + expf(-res[i])) * res[ROWS_PER_PASS + i];
                    }
                    continue;
                }
                for (int64_t o = o0; o < o1; o += 2) {   /* gate and up rows of outputs o, o + 1 */
                    const int pair = o + 1 < o1;
                    const float *gate = wgu + (e * 2 * I + o) * C, *up = gate + I * C;
                    const float *w[TW] = {gate, up, gate + C, up + C};
                    for (int h = 0; h <= pair; h++) {
                        prefetch_row(gate + (h + PREFETCH_ROWS) * C, C);
                        prefetch_row(up + (h + PREFETCH_ROWS) * C, C);
                    }
                    weight_rows_dots(w, 2 + 2 * pair, xs + j0 * C, m, C, res);
                    for (int64_t i = 0; i < m; i++)
                        for (int h = 0; h <= pair; h++) {
                            const float g = tile_at(res, 2 * h, i), u = tile_at(res, 2 * h + 1, i);
                            act[(j0 + i) * I + o + h] = g / (1.f + expf(-g)) * u;
                        }
                }
            }
        }
#pragma omp barrier
        /* out[order[j], c] = down_c . act[j], units = (expert, first c) */
        for (int64_t q = n2 * t / nt; q < n2 * (t + 1) / nt; q++) {
            int64_t e = units2[2 * q], c0 = units2[2 * q + 1];
            int64_t c1 = c0 + block < C ? c0 + block : C;
            for (int64_t j0 = starts[e]; j0 < starts[e + 1]; j0 += ROWS_PER_PASS) {
                int64_t m = starts[e + 1] - j0 < ROWS_PER_PASS ? starts[e + 1] - j0 : ROWS_PER_PASS;
                if (m < TILE_MIN_ROWS) {
                    for (int64_t c = c0; c < c1; c++) {
                        prefetch_row(wd + (e * C + c + PREFETCH_ROWS) * I, I);
                        row_dots(wd + (e * C + c) * I, act + j0 * I, m, I, res);
                        for (int64_t i = 0; i < m; i++) out[order[j0 + i] * C + c] = res[i];
                    }
                    continue;
                }
                for (int64_t c = c0; c < c1; c += TW) {   /* down rows c .. c + nw - 1 */
                    const int nw = c1 - c < TW ? (int)(c1 - c) : TW;
                    const float *down = wd + (e * C + c) * I;
                    const float *w[TW] = {down, down + I, down + 2 * I, down + 3 * I};
                    for (int h = 0; h < nw; h++) prefetch_row(down + (h + PREFETCH_ROWS) * I, I);
                    weight_rows_dots(w, nw, act + j0 * I, m, I, res);
                    for (int64_t i = 0; i < m; i++)
                        for (int h = 0; h < nw; h++) out[order[j0 + i] * C + c + h] = tile_at(res, h, i);
                }
            }
        }
    }
    return 0;
}
