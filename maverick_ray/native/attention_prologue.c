/* Llama 4 attention's per-token work between the fused q/k/v projection and attention, fp32 on
 * CPU, in one call: RoPE, the QK norm, the NoPE layers' temperature, the cache write and q out.
 * In torch these are about 15 dispatched ops per layer (complex views and multiply, norm,
 * scale, two index_copy_), each costing more host time than its arithmetic at decode sizes.
 *
 * Shape legend: T tokens, H query heads, KV kv heads, D head_dim, N = (H + 2 KV) * D.
 *   qkv (T, N): each token's q heads, k heads, v heads (x @ Wqkv), modified in place:
 *     RoPE (inv_freq != NULL): heads 0 .. H + KV - 1, channel pairs (2i, 2i + 1) as one complex
 *       number times exp(i * pos[t] * inv_freq[i]), angle rounded to fp32 as torch computes it;
 *     QK norm (qk_eps >= 0): the same heads, x / sqrt(mean(x^2) + qk_eps) over D;
 *     temperature (floor_scale > 0): q heads times log1p(floor((pos + 1) / floor_scale)) *
 *       attn_scale + 1;
 *   q_out (T, H, D): the finished q heads;
 *   k_pool, v_pool (rows, KV, D) or NULL: token t's k and v heads stored at row write_rows[t].
 * Returns 1, touching nothing, when a write row lies outside [0, rows); else 0.
 * Same order as model/attention.py's torch path (RoPE, norm, temperature, write); results agree
 * with it to fp32 rounding (sin/cos and the sum of squares round differently).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define PARALLEL_MIN_TOKENS 64

static void one_token(float *row, int64_t pos, int64_t H, int64_t KV, int64_t D, const float *inv_freq,
                      float qk_eps, float floor_scale, float attn_scale, float *q_out, float *k_dst, float *v_dst) {
    const int64_t heads = H + KV;
    if (inv_freq != NULL) {
        for (int64_t i = 0; i < D / 2; i++) {
            const float angle = (float)pos * inv_freq[i];
            const float c = (float)cos((double)angle), s = (float)sin((double)angle);
            for (int64_t h = 0; h < heads; h++) {
                float *p = row + h * D + 2 * i;
                const float a = p[0], b = p[1];
                p[0] = a * c - b * s;
                p[1] = a * s + b * c;
            }
        }
    }
    if (qk_eps >= 0.f) {
        for (int64_t h = 0; h < heads; h++) {
            float *p = row + h * D, ss = 0.f;
            for (int64_t d = 0; d < D; d++) ss += p[d] * p[d];
            const float r = 1.0f / sqrtf(ss / (float)D + qk_eps);
            for (int64_t d = 0; d < D; d++) p[d] *= r;
        }
    }
    if (floor_scale > 0.f) {
        const float scale = log1pf(floorf(((float)pos + 1.0f) / floor_scale)) * attn_scale + 1.0f;
        for (int64_t j = 0; j < H * D; j++) row[j] *= scale;
    }
    memcpy(q_out, row, (size_t)(H * D) * sizeof(float));
    if (k_dst != NULL) {
        memcpy(k_dst, row + H * D, (size_t)(KV * D) * sizeof(float));
        memcpy(v_dst, row + heads * D, (size_t)(KV * D) * sizeof(float));
    }
}

int attention_prologue_f32(float *qkv, const int64_t *pos, int64_t T, int64_t H, int64_t KV, int64_t D,
                           const float *inv_freq, float qk_eps, float floor_scale, float attn_scale,
                           float *q_out, float *k_pool, float *v_pool, const int64_t *write_rows, int64_t rows,
                           int nthreads) {
    const int64_t N = (H + 2 * KV) * D;
    if (k_pool != NULL)
        for (int64_t t = 0; t < T; t++)
            if (write_rows[t] < 0 || write_rows[t] >= rows) return 1;
#pragma omp parallel for num_threads(nthreads) if (T >= PARALLEL_MIN_TOKENS && nthreads > 1)
    for (int64_t t = 0; t < T; t++) {
        float *k_dst = k_pool ? k_pool + write_rows[t] * KV * D : NULL;
        float *v_dst = v_pool ? v_pool + write_rows[t] * KV * D : NULL;
        one_token(qkv + t * N, pos[t], H, KV, D, inv_freq, qk_eps, floor_scale, attn_scale, q_out + t * H * D,
                  k_dst, v_dst);
    }
    return 0;
}
