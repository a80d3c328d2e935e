/* The float32 decode GEMV: y = x W^T (+ b) for a few rows of x, every tensor float32.
 *
 *   x (M, K) row stride ldx, M <= GEMV_F32_MAX_ROWS;  w (N, K) contiguous;  b (N,) or NULL;  y (M, N) row stride ldy
 *
 * As gemv_bf16 in gemv.c: each weight row is read once for all M rows of x, threads (OpenMP, torch's
 * runtime) take contiguous blocks of weight rows. Several accumulators per row of x (four for one row, two
 * each for more) keep FMA chains in flight, which is what one core needs to stream weights at memory speed.
 */
#include <stdint.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#define GEMV_F32_MAX_ROWS 8

static inline void dot_rows_f32(const float *x, int64_t ldx, const float *w_row, int64_t K, int M, float *acc) {
    int64_t k = 0;
    for (int m = 0; m < M; m++) acc[m] = 0.0f;
#if defined(__AVX512F__)
    if (M == 1) {  /* one row of x: four chains, so the FMAs' latency overlaps */
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
        for (; k + 64 <= K; k += 64) {
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(w_row + k), _mm512_loadu_ps(x + k), s0);
            s1 = _mm512_fmadd_ps(_mm512_loadu_ps(w_row + k + 16), _mm512_loadu_ps(x + k + 16), s1);
            s2 = _mm512_fmadd_ps(_mm512_loadu_ps(w_row + k + 32), _mm512_loadu_ps(x + k + 32), s2);
            s3 = _mm512_fmadd_ps(_mm512_loadu_ps(w_row + k + 48), _mm512_loadu_ps(x + k + 48), s3);
        }
        for (; k + 16 <= K; k += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(w_row + k), _mm512_loadu_ps(x + k), s0);
        if (k < K) {
            __mmask16 tail = (__mmask16)((1u << (K - k)) - 1);
            s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w_row + k), _mm512_maskz_loadu_ps(tail, x + k), s1);
        }
        acc[0] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
        return;
    }
    __m512 a0[GEMV_F32_MAX_ROWS], a1[GEMV_F32_MAX_ROWS];
    for (int m = 0; m < M; m++) a0[m] = a1[m] = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        __m512 w0 = _mm512_loadu_ps(w_row + k), w1 = _mm512_loadu_ps(w_row + k + 16);
        for (int m = 0; m < M; m++) {
            a0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * ldx + k), a0[m]);
            a1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * ldx + k + 16), a1[m]);
        }
    }
    if (k < K) {  /* the last 1..31 columns, masked */
        __mmask16 t0 = (__mmask16)(K - k >= 16 ? 0xffff : (1u << (K - k)) - 1);
        __mmask16 t1 = (__mmask16)(K - k > 16 ? (1u << (K - k - 16)) - 1 : 0);
        __m512 w0 = _mm512_maskz_loadu_ps(t0, w_row + k), w1 = _mm512_maskz_loadu_ps(t1, w_row + k + 16);
        for (int m = 0; m < M; m++) {
            a0[m] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(t0, x + m * ldx + k), a0[m]);
            a1[m] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(t1, x + m * ldx + k + 16), a1[m]);
        }
        k = K;
    }
    for (int m = 0; m < M; m++) acc[m] = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a0[GEMV_F32_MAX_ROWS], a1[GEMV_F32_MAX_ROWS];
    for (int m = 0; m < M; m++) a0[m] = a1[m] = _mm256_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        __m256 w0 = _mm256_loadu_ps(w_row + k), w1 = _mm256_loadu_ps(w_row + k + 8);
        for (int m = 0; m < M; m++) {
            a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * ldx + k), a0[m]);
            a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * ldx + k + 8), a1[m]);
        }
    }
    for (int m = 0; m < M; m++) {
        __m256 s = _mm256_add_ps(a0[m], a1[m]);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        acc[m] = _mm_cvtss_f32(h);
    }
#endif
    for (; k < K; k++)
        for (int m = 0; m < M; m++) acc[m] += w_row[k] * x[m * ldx + k];
}

/* Returns 0, or -1 when M is out of range. */
int gemv_f32(const float *x, int64_t ldx, const float *w, const float *b, float *y, int64_t ldy, int64_t M, int64_t N,
             int64_t K, int threads) {
    if (M < 1 || M > GEMV_F32_MAX_ROWS) return -1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        float acc[GEMV_F32_MAX_ROWS];
        dot_rows_f32(x, ldx, w + n * K, K, (int)M, acc);
        for (int64_t m = 0; m < M; m++) y[m * ldy + n] = acc[m] + (b ? b[n] : 0.0f);
    }
    return 0;
}
