/* Attention over the paged KV cache, fp32 on CPU, keys and values read in place from their pages
 * (torch would first gather every sequence's blocks into a dense copy, per layer and step, then
 * run SDPA over the copy). Serves decode (one new token per sequence) and prompt chunks that
 * continue a cached sequence (a few new tokens deep into a long context).
 *
 * Shape legend: B sequences, T new tokens of all sequences back to back, KV kv heads, G query
 * heads per kv head, D head_dim, Bs block size, nb blocks per sequence (padded), P pages.
 *   q, out (T, KV, G, D); k, v pools (P * Bs, KV, D) rows; table (B, nb) pages of the blocks
 *   read, from logical block first[b]; end[b] = tokens of sequence b in the cache, its new ones
 *   (already written) included; sequence b's qlen[b] new tokens (qlen NULL: one each) follow
 *   the earlier sequences' rows of q, at positions end[b] - qlen[b] .. end[b] - 1, each seeing
 *   the keys up to its own position;
 *   chunk > 0: only keys of the query's attention chunk are visible.
 *   out = softmax(q k^T * scale) v over the visible keys.
 *
 * One work item is (sequence, kv head, a tile of its new tokens): R = tile x G query rows that
 * share every key they read. It walks the item's pages once, one page at a time: the page's
 * scores for its R rows, an online softmax (running max and sum per row, flash-attention style),
 * the page's values into R accumulators. So each key and value row is read once per item, and
 * no buffer grows with the context. Items are spread over the OpenMP threads torch already runs.
 * Measured against the gather-then-SDPA paths in benchmarks/bench_prefill_attention.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* a * b + c as one FMA where the ISA has it (-std=c11 alone turns contraction off) */
#pragma GCC optimize("fp-contract=fast")

#define MAX_ROWS 64   /* query rows per work item: G must not exceed it; tiles hold MAX_ROWS / G tokens */

/* exp for the softmax, in a form the compiler vectorizes (libm's expf is a scalar call per key):
 * Cephes' expf, range reduction by ln 2 and a degree-6 polynomial, ~1 ulp on [-87, 88]. */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_n;
    two_n.i = ((int32_t)n + 127) << 23;
    return p * two_n.f;
}

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

typedef struct {
    v16f *kt;    /* (D,) a 16-token page's keys transposed: kt[d] = the 16 keys' d-th components */
    float *qs;   /* (R, D) the item's query rows, pre-scaled */
    float *acc;  /* (R, D) running sum of p v */
    float *p;    /* (R, Bs) this page's scores, then weights (0 where not visible) */
} scratch_t;

/* A work item's R = tq x G query rows (token t, head g -> row t * G + g, in position order): their
 * visible key positions [lo, hi], softmax state (running max m, sum l), pre-scaled queries, zeroed
 * accumulators. */
static inline __attribute__((always_inline)) void start_rows(
        const float *q, int64_t end, int64_t qlen, int64_t t0, int64_t tq, int64_t chunk, int64_t KV, int64_t h,
        int64_t G, const int64_t D, float scale, scratch_t w, int64_t *lo, int64_t *hi, float *m, float *l) {
    for (int64_t t = 0; t < tq; t++) {
        const int64_t pos = end - qlen + t0 + t, start = chunk > 0 ? (pos / chunk) * chunk : 0;
        for (int64_t g = 0; g < G; g++) {
            const int64_t r = t * G + g;
            lo[r] = start, hi[r] = pos, m[r] = -INFINITY, l[r] = 0.f;
            const float *src = q + ((t0 + t) * KV + h) * G * D + g * D;
            for (int64_t d = 0; d < D; d++) w.qs[r * D + d] = src[d] * scale;
        }
    }
    memset(w.acc, 0, sizeof(float) * (size_t)(tq * G * D));
}

/* out rows = accumulators / softmax sums. */
static inline __attribute__((always_inline)) void finish_rows(float *out, int64_t t0, int64_t tq, int64_t KV,
                                                              int64_t h, int64_t G, const int64_t D, scratch_t w,
                                                              const float *l) {
    for (int64_t t = 0; t < tq; t++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t r = t * G + g;
            const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
            float *dst = out + ((t0 + t) * KV + h) * G * D + g * D;
            for (int64_t d = 0; d < D; d++) dst[d] = w.acc[r * D + d] * inv;
        }
}

/* The generic body: any block size and head_dim (loops over both). */
static inline __attribute__((always_inline)) void item_body(
                     const float *q, const float *k, const float *v, const int64_t *table, int64_t first,
                     int64_t end, int64_t qlen, int64_t t0, int64_t tq, int64_t chunk, int64_t KV, int64_t h,
                     int64_t G, int64_t D, int64_t Bs, float scale, float *out, scratch_t w) {
    const int64_t R = tq * G;
    int64_t lo[MAX_ROWS], hi[MAX_ROWS];   /* visible key positions [lo, hi] per row */
    float m[MAX_ROWS], l[MAX_ROWS];
    start_rows(q, end, qlen, t0, tq, chunk, KV, h, G, D, scale, w, lo, hi, m, l);
    const int64_t key_lo = lo[0], key_hi = hi[R - 1];   /* rows are in position order */
    const int64_t j0 = key_lo / Bs - first > 0 ? key_lo / Bs - first : 0;   /* blocks before `first` are freed */
    for (int64_t j = j0; j <= key_hi / Bs - first; j++) {
        const int64_t p0 = (first + j) * Bs, row0 = table[j] * Bs;
        /* scores, each key row read once for all R rows */
        for (int64_t o = 0; o < Bs; o++) {
            const int64_t pos = p0 + o;
            if (pos < key_lo || pos > key_hi) {
                for (int64_t r = 0; r < R; r++) w.p[r * Bs + o] = -INFINITY;
                continue;
            }
            const float *kr = k + ((row0 + o) * KV + h) * D;
            for (int64_t r = 0; r < R; r++) {
                const float *qr = w.qs + r * D;
                float dot = 0.f;
#pragma omp simd reduction(+:dot)
                for (int64_t d = 0; d < D; d++) dot += qr[d] * kr[d];
                w.p[r * Bs + o] = (pos >= lo[r] && pos <= hi[r]) ? dot : -INFINITY;
            }
        }
        /* online softmax per row: rescale what came before when the max grows */
        for (int64_t r = 0; r < R; r++) {
            float *pr = w.p + r * Bs, mx = -INFINITY;
            for (int64_t o = 0; o < Bs; o++) mx = pr[o] > mx ? pr[o] : mx;
            if (mx == -INFINITY) {
                for (int64_t o = 0; o < Bs; o++) pr[o] = 0.f;
                continue;
            }
            if (mx > m[r]) {
                const float c = m[r] == -INFINITY ? 0.f : exp_approx(m[r] - mx);
                l[r] *= c;
                float *ar = w.acc + r * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) ar[d] *= c;
                m[r] = mx;
            }
            const float mr = m[r];
            float sum = 0.f;
#pragma omp simd reduction(+:sum)
            for (int64_t o = 0; o < Bs; o++) {
                const float e = pr[o] == -INFINITY ? 0.f : exp_approx(pr[o] - mr);
                pr[o] = e;
                sum += e;
            }
            l[r] += sum;
        }
        /* acc += p v, each value row read once */
        for (int64_t o = 0; o < Bs; o++) {
            const int64_t pos = p0 + o;
            if (pos < key_lo || pos > key_hi) continue;
            const float *vr = v + ((row0 + o) * KV + h) * D;
            for (int64_t r = 0; r < R; r++) {
                const float pw = w.p[r * Bs + o];
                float *ar = w.acc + r * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) ar[d] += pw * vr[d];
            }
        }
    }
    finish_rows(out, t0, tq, KV, h, G, D, w, l);
}

/* The fast path, for 16-token blocks and a head_dim that is a multiple of 16: GCC vector
 * extensions (one 16-float vector per block of scores, a clone per ISA below), so the scores of a
 * page come out as one vector, its softmax runs on vectors, and each dot product ends in a
 * shuffle tree rather than a chain of 15 scalar adds (what the loop form above compiles to
 * without -ffast-math). Measured in benchmarks/bench_prefill_attention.py. */
/* lane shuffles with constant indexes (0-15: the first vector's lanes, 16-31: the second's) */
#if defined(__clang__)
#define SHUF1(a, ...) __builtin_shufflevector(a, a, __VA_ARGS__)
#define SHUF2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF1(a, ...) __builtin_shuffle(a, (v16i){__VA_ARGS__})
#define SHUF2(a, b, ...) __builtin_shuffle(a, b, (v16i){__VA_ARGS__})
#endif

static inline v16f ld16(const float *p) { v16f x; memcpy(&x, p, sizeof x); return x; }
static inline void st16(float *p, v16f x) { memcpy(p, &x, sizeof x); }
static inline v16f splat(float a) { return (v16f){0} + a; }   /* vector op scalar: one broadcast */
static inline v16f select16(v16i m, v16f a, v16f b) { return (v16f)((m & (v16i)a) | (~m & (v16i)b)); }

static inline float hsum16(v16f v) {
    v += SHUF1(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += SHUF1(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += SHUF1(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += SHUF1(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
}

static inline float hmax16(v16f v) {
    v16f w;
    w = SHUF1(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v = select16(v > w, v, w);
    w = SHUF1(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v = select16(v > w, v, w);
    w = SHUF1(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v = select16(v > w, v, w);
    w = SHUF1(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    v = select16(v > w, v, w);
    return v[0];
}

/* exp_approx on 16 lanes (same polynomial). */
static inline v16f exp16(v16f x) {
    x = select16(x < splat(-87.0f), splat(-87.0f), x);
    x = select16(x > splat(88.0f), splat(88.0f), x);
    const v16f y = x * splat(1.44269504088896341f) + splat(0.5f);
    v16i t = __builtin_convertvector(y, v16i);                     /* truncation */
    t += (v16i)(__builtin_convertvector(t, v16f) > y);            /* -> floor: -1 where truncation rounded up */
    const v16f n = __builtin_convertvector(t, v16f);
    const v16f r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
    v16f p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    return p * (v16f)((t + 127) << 23);
}

/* m[i][j] -> m[j][i]: four stages, each swapping the off-diagonal blocks of size 8, 4, 2, 1
 * with two-source shuffles (vpermt2ps on AVX-512). */
static inline void transpose16(v16f m[16]) {
    for (int i = 0; i < 16; i++)
        if (!(i & 8)) {
            const v16f a = m[i], b = m[i + 8];
            m[i] = SHUF2(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
            m[i + 8] = SHUF2(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
        }
    for (int i = 0; i < 16; i++)
        if (!(i & 4)) {
            const v16f a = m[i], b = m[i + 4];
            m[i] = SHUF2(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
            m[i + 4] = SHUF2(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
        }
    for (int i = 0; i < 16; i++)
        if (!(i & 2)) {
            const v16f a = m[i], b = m[i + 2];
            m[i] = SHUF2(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
            m[i + 2] = SHUF2(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
        }
    for (int i = 0; i < 16; i++)
        if (!(i & 1)) {
            const v16f a = m[i], b = m[i + 1];
            m[i] = SHUF2(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
            m[i + 1] = SHUF2(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
        }
}

#define BS16 16
#define MAX_DV 16   /* head_dim up to 256 on the fast path */
static inline __attribute__((always_inline)) void item16_body(
        const float *q, const float *k, const float *v, const int64_t *table, int64_t first, int64_t end,
        int64_t qlen, int64_t t0, int64_t tq, int64_t chunk, int64_t KV, int64_t h, int64_t G, const int64_t D,
        float scale, float *out, scratch_t w) {
    const int64_t R = tq * G, DV = D / 16;
    int64_t lo[MAX_ROWS], hi[MAX_ROWS];
    float m[MAX_ROWS], l[MAX_ROWS];
    start_rows(q, end, qlen, t0, tq, chunk, KV, h, G, D, scale, w, lo, hi, m, l);
    const v16i iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const int64_t key_lo = lo[0], key_hi = hi[R - 1];   /* rows are in position order */
    const int64_t j0 = key_lo / BS16 - first > 0 ? key_lo / BS16 - first : 0;
    for (int64_t j = j0; j <= key_hi / BS16 - first; j++) {
        const int64_t p0 = (first + j) * BS16, row0 = table[j] * BS16;
        const int64_t o_a = key_lo > p0 ? key_lo - p0 : 0, o_b = key_hi - p0 < BS16 - 1 ? key_hi - p0 : BS16 - 1;
        float *sc = w.p;   /* (R, 16) */
        /* the page's keys of head h transposed, kT[d] = the 16 keys' d-th components: each row's
         * 16 scores are then D vector FMAs, with no horizontal sum */
        for (int64_t c = 0; c < DV; c++) {
            v16f blk[16];
            for (int o = 0; o < 16; o++) blk[o] = ld16(k + ((row0 + o) * KV + h) * D + 16 * c);
            transpose16(blk);
            for (int d = 0; d < 16; d++) w.kt[16 * c + d] = blk[d];
        }
        for (int64_t r = 0; r < R; r++) {
            const float *qr = w.qs + r * D;
            v16f a0 = qr[0] * w.kt[0], a1 = qr[1] * w.kt[1], a2 = qr[2] * w.kt[2], a3 = qr[3] * w.kt[3];
            for (int64_t d = 4; d < D; d += 4) {
                a0 += qr[d] * w.kt[d], a1 += qr[d + 1] * w.kt[d + 1];
                a2 += qr[d + 2] * w.kt[d + 2], a3 += qr[d + 3] * w.kt[d + 3];
            }
            st16(sc + r * BS16, (a0 + a1) + (a2 + a3));
        }
        const v16i pos = iota + (int32_t)(p0 - key_lo);   /* key positions relative to key_lo (fit in int32) */
        for (int64_t r = 0; r < R; r++) {
            const v16i vis = (pos >= (int32_t)(lo[r] - key_lo)) & (pos <= (int32_t)(hi[r] - key_lo));
            const v16f s = select16(vis, ld16(sc + r * BS16), splat(-INFINITY));
            const float mx = hmax16(s);
            if (mx == -INFINITY) {
                st16(sc + r * BS16, splat(0.f));
                continue;
            }
            if (mx > m[r]) {
                const float c = m[r] == -INFINITY ? 0.f : exp_approx(m[r] - mx);
                l[r] *= c;
                float *ar = w.acc + r * D;
                for (int64_t cc = 0; cc < DV; cc++) st16(ar + 16 * cc, ld16(ar + 16 * cc) * c);
                m[r] = mx;
            }
            const v16f e = (v16f)(vis & (v16i)exp16(s - splat(m[r])));
            l[r] += hsum16(e);
            st16(sc + r * BS16, e);
        }
        /* acc += p v, the page's value rows read from cache for every row after the first */
        const float *vrow = v + (row0 * KV + h) * D;
        const int64_t vstride = KV * D;
        for (int64_t r = 0; r < R; r++) {
            float *ar = w.acc + r * D;
            const float *pr = sc + r * BS16;
            v16f a[MAX_DV];   /* DV independent FMA chains (one chain of 16 stalls on FMA latency) */
            for (int64_t c = 0; c < DV; c++) a[c] = ld16(ar + 16 * c);
            for (int64_t o = o_a; o <= o_b; o++) {
                const float po = pr[o], *vo = vrow + o * vstride;
                for (int64_t c = 0; c < DV; c++) a[c] += po * ld16(vo + 16 * c);
            }
            for (int64_t c = 0; c < DV; c++) st16(ar + 16 * c, a[c]);
        }
    }
    finish_rows(out, t0, tq, KV, h, G, D, w, l);
}

/* One clone per ISA of each body, the 16-token-block one with head_dim a compile-time constant for
 * the common sizes (its per-row vector loops unroll). */
#define ITEM_ARGS const float *q, const float *k, const float *v, const int64_t *table, int64_t first, \
    int64_t end, int64_t qlen, int64_t t0, int64_t tq, int64_t chunk, int64_t KV, int64_t h, int64_t G, \
    int64_t D, int64_t Bs, float scale, float *out, scratch_t w
#define ITEM_FWD q, k, v, table, first, end, qlen, t0, tq, chunk, KV, h, G, D, Bs, scale, out, w
#define ITEM_CALL(DIM) item_body(q, k, v, table, first, end, qlen, t0, tq, chunk, KV, h, G, DIM, Bs, scale, out, w)
#if defined(__x86_64__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif
#define ITEM16_CALL(DIM) item16_body(q, k, v, table, first, end, qlen, t0, tq, chunk, KV, h, G, DIM, scale, out, w)
CLONES static void item16_d64(ITEM_ARGS) { (void)D, (void)Bs; ITEM16_CALL(64); }
CLONES static void item16_d128(ITEM_ARGS) { (void)D, (void)Bs; ITEM16_CALL(128); }
CLONES static void item16_any(ITEM_ARGS) { (void)Bs; ITEM16_CALL(D); }
CLONES static void item_any(ITEM_ARGS) { ITEM_CALL(D); }

static void one_item(ITEM_ARGS) {
    if (Bs == 16 && D == 64) item16_d64(ITEM_FWD);
    else if (Bs == 16 && D == 128) item16_d128(ITEM_FWD);
    else if (Bs == 16 && D % 16 == 0 && D <= 16 * MAX_DV) item16_any(ITEM_FWD);
    else item_any(ITEM_FWD);
}

/* Returns 0; 1 when G exceeds MAX_ROWS, 2 when memory for the work list or a thread's buffers
 * could not be allocated, 3 when the sequences' new tokens do not add up to T. */
int paged_attention_f32(const float *q, const float *k, const float *v, const int64_t *table, const int64_t *first,
                        const int64_t *end, const int64_t *qlen, int64_t T, int64_t B, int64_t nb, int64_t KV,
                        int64_t G, int64_t D, int64_t Bs, int64_t chunk, float scale, float *out, int nthreads) {
    if (G > MAX_ROWS) return 1;
    const int64_t TQ = MAX_ROWS / G;
    int64_t n_items = 0, total = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t n_b = qlen ? qlen[b] : 1;
        n_items += (n_b + TQ - 1) / TQ * KV;
        total += n_b;
    }
    if (total != T) return 3;
    /* per tile: sequence, its first row in q, first token, tokens */
    int64_t *items = malloc(sizeof(int64_t) * (size_t)(4 * n_items + 1));
    if (!items) return 2;
    int64_t n = 0, row = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t n_b = qlen ? qlen[b] : 1;
        for (int64_t t0 = 0; t0 < n_b; t0 += TQ, n++) {
            int64_t *tile = items + 4 * n;
            tile[0] = b, tile[1] = row, tile[2] = t0, tile[3] = n_b - t0 < TQ ? n_b - t0 : TQ;
        }
        row += n_b;
    }
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (n_items > 1 && nthreads > 1)
    {
        const size_t floats = (size_t)(MAX_ROWS * (2 * D + Bs) + 16 * D + 15) / 16 * 16;   /* whole 64-byte lines */
        float *buf = aligned_alloc(64, sizeof(float) * floats);
        if (!buf) {
#pragma omp atomic write
            failed = 2;
        } else {
            scratch_t w = {(v16f *)buf, buf + 16 * D, buf + 16 * D + MAX_ROWS * D, buf + 16 * D + 2 * MAX_ROWS * D};
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < n_items; it++) {
                const int64_t *tile = items + 4 * (it / KV), b = tile[0], h = it % KV, off = tile[1] * KV * G * D;
                one_item(q + off, k, v, table + b * nb, first[b], end[b], qlen ? qlen[b] : 1, tile[2], tile[3],
                         chunk, KV, h, G, D, Bs, scale, out + off, w);
            }
        }
        free(buf);
    }
    free(items);
    return failed;
}
