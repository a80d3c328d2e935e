/* RMSNorm of a few rows, and the residual add + RMSNorm a decode step runs twice per layer.
 *
 *   rms_norm:      y[m, k] = w[k] * x[m, k] / sqrt(mean_k(x[m, :]^2) + eps)
 *   add_rms_norm:  s = a + b (rounded to the rows' dtype, as PyTorch's add is), then y = rms_norm(s); s is an output
 *
 * Rows are float32 or bfloat16 (`bf16` != 0; the weight too), with row strides in elements; statistics and
 * products in float32, y rounded once. Why: each is one call instead of PyTorch's eight (or nine) ops on a
 * row of a few hundred values, where the ops' dispatch costs more than their arithmetic.
 */
#include <stdint.h>
#include <math.h>
#include <string.h>
#include "bf16.h"

static float sum_squares(const void *row, int64_t K, int bf16) {
    float ss = 0.0f;
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        __m512 v = elem_load16(row, k, bf16);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    ss = _mm512_reduce_add_ps(acc);
#endif
    for (; k < K; k++) {
        float v = elem_load(row, k, bf16);
        ss += v * v;
    }
    return ss;
}

static void norm_row(const void *row, const void *w, float eps, void *y, int64_t K, int bf16) {
    const float r = 1.0f / sqrtf(sum_squares(row, K, bf16) / (float)K + eps);
    for (int64_t k = 0; k < K; k++) elem_store(y, k, elem_load(w, k, bf16) * (elem_load(row, k, bf16) * r), bf16);
}

/* Returns 0. */
int rms_norm_rows(int bf16, const void *x, int64_t ldx, const void *w, float eps, void *y, int64_t ldy, int64_t M,
                  int64_t K) {
    const int64_t es = bf16 ? 2 : 4;
    for (int64_t m = 0; m < M; m++) norm_row((const char *)x + m * ldx * es, w, eps, (char *)y + m * ldy * es, K, bf16);
    return 0;
}

/* s (M, K) and y (M, K) contiguous; a, b with row strides. Returns 0. */
int add_rms_norm_rows(int bf16, const void *a, int64_t lda, const void *b, int64_t ldb, const void *w, float eps,
                      void *y, void *s, int64_t M, int64_t K) {
    const int64_t es = bf16 ? 2 : 4;
    for (int64_t m = 0; m < M; m++) {
        const char *ar = (const char *)a + m * lda * es, *br = (const char *)b + m * ldb * es;
        char *sr = (char *)s + m * K * es;
        for (int64_t k = 0; k < K; k++) elem_store(sr, k, elem_load(ar, k, bf16) + elem_load(br, k, bf16), bf16);
        norm_row(sr, w, eps, (char *)y + m * K * es, K, bf16);
    }
    return 0;
}
