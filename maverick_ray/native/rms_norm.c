/* RMSNorm of fp32 rows on CPU in one call: each row is read for its sum of squares and again,
 * still in L1, to scale it (torch's composite RMSNorm is six ops, each a pass over all rows and a
 * dispatch; at decode sizes those cost ~30 us a norm).
 *
 * Shape legend: T rows, C width.
 *   x (T, C), w (C,), y (T, C):   y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w
 * The same expression and order of operations as model/norm.py (scale, then weight); the
 * sum of squares is accumulated in a different order, so results agree to fp32 rounding.
 * Rows are split across threads only when there are enough of them (prefill); threads come from
 * the OpenMP runtime torch already loaded.
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>

#define PARALLEL_MIN_ELEMENTS (1 << 16)

#if defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void norm_rows(const float *x, const float *w, float *y, int64_t t0, int64_t t1, int64_t C, float eps) {
    for (int64_t t = t0; t < t1; t++) {
        const float *xr = x + t * C;
        float *yr = y + t * C;
        float s = 0.f;
#pragma omp simd reduction(+:s)
        for (int64_t c = 0; c < C; c++) s += xr[c] * xr[c];
        const float r = 1.0f / sqrtf(s / (float)C + eps);
#pragma omp simd
        for (int64_t c = 0; c < C; c++) yr[c] = (xr[c] * r) * w[c];
    }
}

void rms_norm_f32(const float *x, const float *w, float *y, int64_t T, int64_t C, float eps, int nthreads) {
    if (T * C < PARALLEL_MIN_ELEMENTS || nthreads <= 1) {
        norm_rows(x, w, y, 0, T, C, eps);
        return;
    }
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        norm_rows(x, w, y, T * t / nt, T * (t + 1) / nt, C, eps);
    }
}
