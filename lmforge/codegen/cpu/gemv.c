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
 * The file also holds the elementwise work a decode step runs between its GEMVs: the rotary embedding
 * (`rotary_bf16`) and the gated-MLP activation (`glu_silu_bf16`, `glu_gelu_tanh_bf16`); norms are in norm.c.
 */
#include <stdint.h>
#include <math.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define GEMV_MAX_ROWS 8

#include "bf16.h"
#include "vmath.h"

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
    if (M == 1) {  /* one row of x: four chains over alternate chunks, so the products' latency overlaps */
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 128 <= K; k += 128) {
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512((const void *)(w_row + k)),
                                  (__m512bh)_mm512_loadu_si512((const void *)(x + k)));
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512((const void *)(w_row + k + 32)),
                                  (__m512bh)_mm512_loadu_si512((const void *)(x + k + 32)));
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512((const void *)(w_row + k + 64)),
                                  (__m512bh)_mm512_loadu_si512((const void *)(x + k + 64)));
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512((const void *)(w_row + k + 96)),
                                  (__m512bh)_mm512_loadu_si512((const void *)(x + k + 96)));
        }
        for (; k + 32 <= K; k += 32)
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512((const void *)(w_row + k)),
                                  (__m512bh)_mm512_loadu_si512((const void *)(x + k)));
        if (k < K) {
            __mmask32 tail = (__mmask32)((1ull << (K - k)) - 1);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(tail, w_row + k),
                                  (__m512bh)_mm512_maskz_loadu_epi16(tail, x + k));
        }
        acc[0] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        return;
    }
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

/* Gated-MLP activation (GLU) of float32 or bfloat16 rows (`bf16`), with PyTorch's rounding after each op:
 *   y = act(g) * u, in bfloat16 y = bf16(bf16(act(g)) * u)      g, u (M, K) row strides ldg, ldu; y (M, K) row stride ldy
 * act(g) = g * sigmoid(s(g)): SiLU s(g) = g; GELU's tanh form s(g) = 2 sqrt(2/pi) (g + 0.044715 g^3), since
 * 0.5 g (1 + tanh(v)) = g / (1 + e^(-2v)). Float32 inside; with AVX-512F 16 columns at a time through a
 * polynomial e^x (within 2 float32 ulp of expf), the row's tail through a zero-padded block so that every
 * column gets the same arithmetic. Returns 0. */
#define GLU_SQRT_8_OVER_PI 1.5957691216057308f  /* 2 sqrt(2/pi) */
#define GLU_KAPPA 0.044715f

static inline float glu_scalar(float g, float u, int gelu, int bf16) {
    float s = gelu ? GLU_SQRT_8_OVER_PI * (g + GLU_KAPPA * g * g * g) : g;
    float a = g / (1.0f + expf(-s));
    return (bf16 ? bf16_to_f32(f32_to_bf16(a)) : a) * u;
}

#if defined(__AVX512F__)
/* the bfloat16 nearest to each lane (ties to even; NaN stays NaN), in the low half of each 32-bit lane */
static inline __m512i f32x16_round_bf16(__m512 v) {
    __m512i b = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40)));
}

static inline __attribute__((always_inline)) void glu16(const void *gp, const void *up, void *yp, int gelu,
                                                        int bf16) {
    __m512 g = elem_load16(gp, 0, bf16);
    __m512 s = g;
    if (gelu)
        s = _mm512_mul_ps(_mm512_set1_ps(GLU_SQRT_8_OVER_PI),
                          _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(GLU_KAPPA), g), _mm512_mul_ps(g, g), g));
    __m512 a = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), s))));
    if (!bf16) {
        _mm512_storeu_ps((float *)yp, _mm512_mul_ps(a, elem_load16(up, 0, 0)));
        return;
    }
    a = _mm512_castsi512_ps(_mm512_slli_epi32(f32x16_round_bf16(a), 16));  /* act(g) in bfloat16, as PyTorch */
    __m512i y = f32x16_round_bf16(_mm512_mul_ps(a, elem_load16(up, 0, 1)));
    _mm256_storeu_si256((__m256i *)yp, _mm512_cvtepi32_epi16(y));
}
#endif

static inline __attribute__((always_inline)) int glu_rows(int bf16, const void *g, int64_t ldg, const void *u,
                                                          int64_t ldu, void *y, int64_t ldy, int64_t M, int64_t K,
                                                          int gelu) {
    const int64_t es = bf16 ? 2 : 4;
    for (int64_t m = 0; m < M; m++) {
        const char *gr = (const char *)g + m * ldg * es, *ur = (const char *)u + m * ldu * es;
        char *yr = (char *)y + m * ldy * es;
        int64_t k = 0;
#if defined(__AVX512F__)
        for (; k + 16 <= K; k += 16) glu16(gr + k * es, ur + k * es, yr + k * es, gelu, bf16);
        if (k < K) {
            float gt[16] = {0}, ut[16] = {0}, yt[16];
            memcpy(gt, gr + k * es, (size_t)(K - k) * es);
            memcpy(ut, ur + k * es, (size_t)(K - k) * es);
            glu16(gt, ut, yt, gelu, bf16);
            memcpy(yr + k * es, yt, (size_t)(K - k) * es);
        }
#else
        for (; k < K; k++) elem_store(yr, k, glu_scalar(elem_load(gr, k, bf16), elem_load(ur, k, bf16), gelu, bf16), bf16);
#endif
    }
    return 0;
}

int glu_silu_bf16(const void *g, int64_t ldg, const void *u, int64_t ldu, void *y, int64_t ldy, int64_t M, int64_t K) {
    return glu_rows(1, g, ldg, u, ldu, y, ldy, M, K, 0);
}

int glu_gelu_tanh_bf16(const void *g, int64_t ldg, const void *u, int64_t ldu, void *y, int64_t ldy, int64_t M,
                       int64_t K) {
    return glu_rows(1, g, ldg, u, ldu, y, ldy, M, K, 1);
}

int glu_silu_f32(const void *g, int64_t ldg, const void *u, int64_t ldu, void *y, int64_t ldy, int64_t M, int64_t K) {
    return glu_rows(0, g, ldg, u, ldu, y, ldy, M, K, 0);
}

int glu_gelu_tanh_f32(const void *g, int64_t ldg, const void *u, int64_t ldu, void *y, int64_t ldy, int64_t M,
                      int64_t K) {
    return glu_rows(0, g, ldg, u, ldu, y, ldy, M, K, 1);
}
