/* Bandwidth-bound matrix-vector products on the CPU: y = x W^T (+ b) for a few rows of x.
 *
 *   x  (M, K) bfloat16, row stride ldx      M <= GEMV_MAX_ROWS (decode: one row per sequence)
 *   w  (N, K) bfloat16, contiguous          a linear layer's weight in its source layout
 *   b  (N,)   bfloat16 or NULL
 *   y  (M, N) bfloat16, row stride ldy
 *
 * Each weight row is read once for all M rows of x; threads (OpenMP, torch's own runtime) take contiguous
 * blocks of weight rows, so every thread streams memory sequentially. Products accumulate in float32:
 * with AVX512-BF16 through vdpbf16ps (32 products per instruction), else bfloat16 is widened to float32
 * (AVX-512F, then AVX2/FMA, then plain C). The result is rounded to bfloat16 to nearest even.
 * The file also holds the elementwise work a decode step runs between its GEMVs: RMSNorm (`rmsnorm_bf16`)
 * and the rotary embedding (`rotary_bf16`).
 */
#include <stdint.h>
#include <math.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define GEMV_MAX_ROWS 8

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(bits >> 16);
}

int gemv_max_rows(void) { return GEMV_MAX_ROWS; }

const char *gemv_isa(void) {
#if defined(__AVX512BF16__)
    return "avx512bf16";
#elif defined(__AVX512F__)
    return "avx512f";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "scalar";
#endif
}

/* acc[m] = sum_k x[m, k] * w_row[k] for m < M */
static inline void dot_rows(const uint16_t *x, int64_t ldx, const uint16_t *w_row, int64_t K, int M, float *acc) {
#if defined(__AVX512BF16__)
    __m512 a[GEMV_MAX_ROWS];
    for (int m = 0; m < M; m++) a[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(w_row + k));
        for (int m = 0; m < M; m++)
            a[m] = _mm512_dpbf16_ps(a[m], wv, (__m512bh)_mm512_loadu_si512((const void *)(x + m * ldx + k)));
    }
    if (k < K) {
        __mmask32 tail = (__mmask32)((1ull << (K - k)) - 1);
        __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, w_row + k);
        for (int m = 0; m < M; m++)
            a[m] = _mm512_dpbf16_ps(a[m], wv, (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * ldx + k));
    }
    for (int m = 0; m < M; m++) acc[m] = _mm512_reduce_add_ps(a[m]);
#elif defined(__AVX512F__)
    __m512 a[GEMV_MAX_ROWS];
    for (int m = 0; m < M; m++) a[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w_row + k))), 16));
        for (int m = 0; m < M; m++) {
            __m512 xv = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + m * ldx + k))), 16));
            a[m] = _mm512_fmadd_ps(wv, xv, a[m]);
        }
    }
    for (int m = 0; m < M; m++) {
        acc[m] = _mm512_reduce_add_ps(a[m]);
        for (int64_t j = k; j < K; j++) acc[m] += bf16_to_f32(w_row[j]) * bf16_to_f32(x[m * ldx + j]);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a[GEMV_MAX_ROWS];
    for (int m = 0; m < M; m++) a[m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w_row + k))), 16));
        for (int m = 0; m < M; m++) {
            __m256 xv = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(x + m * ldx + k))), 16));
            a[m] = _mm256_fmadd_ps(wv, xv, a[m]);
        }
    }
    for (int m = 0; m < M; m++) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(a[m]), _mm256_extractf128_ps(a[m], 1));
        s = _mm_hadd_ps(s, s);
        s = _mm_hadd_ps(s, s);
        acc[m] = _mm_cvtss_f32(s);
        for (int64_t j = k; j < K; j++) acc[m] += bf16_to_f32(w_row[j]) * bf16_to_f32(x[m * ldx + j]);
    }
#else
    for (int m = 0; m < M; m++) {
        float s = 0.0f;
        for (int64_t j = 0; j < K; j++) s += bf16_to_f32(w_row[j]) * bf16_to_f32(x[m * ldx + j]);
        acc[m] = s;
    }
#endif
}

/* Returns 0, or -1 when M is out of range. */
int gemv_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w, const uint16_t *b, uint16_t *y, int64_t ldy,
              int64_t M, int64_t N, int64_t K, int threads) {
    if (M < 1 || M > GEMV_MAX_ROWS) return -1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        float acc[GEMV_MAX_ROWS];
        dot_rows(x, ldx, w + n * K, K, (int)M, acc);
        float bias = b ? bf16_to_f32(b[n]) : 0.0f;
        for (int64_t m = 0; m < M; m++) y[m * ldy + n] = f32_to_bf16(acc[m] + bias);
    }
    return 0;
}

/* RMSNorm of a few bfloat16 rows, in float32, rounded once:
 *   y[m, k] = bf16(w[k] * x[m, k] / sqrt(mean_k(x[m, :]^2) + eps))      x (M, K) row stride ldx, w (K,), y (M, K)
 * Returns 0. */
int rmsnorm_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w, float eps, uint16_t *y, int64_t ldy, int64_t M,
                 int64_t K) {
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *row = x + m * ldx;
        float ss = 0.0f;
        int64_t k = 0;
#if defined(__AVX512F__)
        __m512 acc = _mm512_setzero_ps();
        for (; k + 16 <= K; k += 16) {
            __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + k))), 16));
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        ss = _mm512_reduce_add_ps(acc);
#endif
        for (; k < K; k++) {
            float v = bf16_to_f32(row[k]);
            ss += v * v;
        }
        float r = 1.0f / sqrtf(ss / (float)K + eps);
        for (k = 0; k < K; k++) y[m * ldy + k] = f32_to_bf16(bf16_to_f32(w[k]) * (bf16_to_f32(row[k]) * r));
    }
    return 0;
}

/* Rotary embedding, rotate-half form, with PyTorch's bfloat16 rounding after each op:
 *   out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)),  rotate_half(x) = cat(-x[D/2:], x[:D/2])
 *   x (B, H, S, D) and cos/sin (B, H|1, S, D) with strides in elements (the last dim contiguous),
 *   out (B, H, S, D) contiguous. Returns 0. */
int rotary_bf16(const uint16_t *x, int64_t sxb, int64_t sxh, int64_t sxs, const uint16_t *cs, const uint16_t *sn,
                int64_t scb, int64_t sch, int64_t scs, uint16_t *out, int64_t B, int64_t H, int64_t S, int64_t D) {
    int64_t half = D / 2;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t s = 0; s < S; s++) {
                const uint16_t *xr = x + b * sxb + h * sxh + s * sxs;
                const uint16_t *c = cs + b * scb + h * sch + s * scs;
                const uint16_t *n = sn + b * scb + h * sch + s * scs;
                uint16_t *o = out + ((b * H + h) * S + s) * D;
                for (int64_t d = 0; d < D; d++) {
                    float rot = d < half ? -bf16_to_f32(xr[d + half]) : bf16_to_f32(xr[d - half]);
                    float a = bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[d]) * bf16_to_f32(c[d])));
                    float r = bf16_to_f32(f32_to_bf16(rot * bf16_to_f32(n[d])));
                    o[d] = f32_to_bf16(a + r);
                }
            }
    return 0;
}
