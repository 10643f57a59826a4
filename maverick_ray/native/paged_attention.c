/* Decode attention over the paged KV cache, fp32 on CPU: one query token per sequence, keys and
 * values read in place from their pages (torch would first gather every sequence's blocks into
 * a dense copy, per layer and step, then run SDPA over the copy).
 *
 * Shape legend: B sequences, KV kv heads, G query heads per kv head, D head_dim, Bs block size,
 * nb blocks per sequence (padded), P pages.
 *   q (B, KV, G, D); k, v pools (P * Bs, KV, D) rows; table (B, nb) pages of the blocks read,
 *   from logical block first[b]; end[b] = tokens of sequence b in the cache (its query sits at
 *   position end[b] - 1); chunk > 0: only keys of the query's attention chunk are visible.
 *   out (B, KV, G, D) = softmax(q k^T * scale) v over the visible keys.
 * Per (sequence, kv head): the scores of its G query heads against every visible key, a softmax
 * per head, then the weighted sum of the values; each key and value row is read once. Work is
 * split over (sequence, kv head) pairs across the OpenMP threads torch already runs.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#define MAX_G 64

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

#if defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void one_head(const float *q, const float *k, const float *v, const int64_t *table, int64_t nb,
                     int64_t first, int64_t end, int64_t chunk, int64_t KV, int64_t h, int64_t G, int64_t D,
                     int64_t Bs, float scale, float *out, float *s, int64_t *rows) {
    /* The visible keys: from the query's chunk start (chunked layers) up to the query. */
    const int64_t qpos = end - 1, lo = chunk > 0 ? (qpos / chunk) * chunk : 0;
    int64_t n = 0;
    for (int64_t j = 0; j < nb; j++)
        for (int64_t o = 0; o < Bs; o++) {
            const int64_t pos = (first + j) * Bs + o;
            if (pos >= lo && pos <= qpos) rows[n++] = table[j] * Bs + o;
        }
    /* Scores s (G, n), each key row read once. */
    for (int64_t i = 0; i < n; i++) {
        const float *kr = k + (rows[i] * KV + h) * D;
        for (int64_t g = 0; g < G; g++) {
            const float *qg = q + g * D;
            float dot = 0.f;
#pragma omp simd reduction(+:dot)
            for (int64_t d = 0; d < D; d++) dot += qg[d] * kr[d];
            s[g * n + i] = dot * scale;
        }
    }
    /* Softmax per query head. */
    float inv[MAX_G];
    for (int64_t g = 0; g < G; g++) {
        float *sg = s + g * n, m = -INFINITY, l = 0.f;
        for (int64_t i = 0; i < n; i++) m = sg[i] > m ? sg[i] : m;
#pragma omp simd reduction(+:l)
        for (int64_t i = 0; i < n; i++) {
            sg[i] = exp_approx(sg[i] - m);
            l += sg[i];
        }
        inv[g] = l > 0.f ? 1.f / l : 0.f;
        for (int64_t d = 0; d < D; d++) out[g * D + d] = 0.f;
    }
    /* out = p v, each value row read once. */
    for (int64_t i = 0; i < n; i++) {
        const float *vr = v + (rows[i] * KV + h) * D;
        for (int64_t g = 0; g < G; g++) {
            const float p = s[g * n + i] * inv[g];
            float *og = out + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) og[d] += p * vr[d];
        }
    }
}

/* Returns 0; 1 when G exceeds MAX_G, 2 when a thread could not allocate its buffers. */
int paged_decode_f32(const float *q, const float *k, const float *v, const int64_t *table, const int64_t *first,
                     const int64_t *end, int64_t B, int64_t nb, int64_t KV, int64_t G, int64_t D, int64_t Bs,
                     int64_t chunk, float scale, float *out, int nthreads) {
    if (G > MAX_G) return 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (B * KV > 1 && nthreads > 1)
    {
        /* per thread: the scores (G, keys) and the keys' rows of the longest sequence */
        float *s = malloc(sizeof(float) * (size_t)(G * nb * Bs + 1));
        int64_t *rows = malloc(sizeof(int64_t) * (size_t)(nb * Bs + 1));
        if (!s || !rows) {
#pragma omp atomic write
            failed = 2;
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t bh = 0; bh < B * KV; bh++) {
                const int64_t b = bh / KV, h = bh % KV;
                one_head(q + (b * KV + h) * G * D, k, v, table + b * nb, nb, first[b], end[b], chunk, KV, h, G, D,
                         Bs, scale, out + (b * KV + h) * G * D, s, rows);
            }
        }
        free(s);
        free(rows);
    }
    return failed;
}
