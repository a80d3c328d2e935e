/* Weight rows of the int4 and int8 schemes, dequantized into a bfloat16 or float32 buffer: the first half of a
 * prefill-sized quantized matmul whose second half is the BLAS library's matmul (cpu_gemv.Kernel.int4/int8 with
 * many rows of x). PyTorch's bfloat16 GEMM (oneDNN: AMX where the CPU has it, else AVX512-BF16) does 32 rows
 * 4-5x faster than the int4/int8 kernels here can, and the rows are dequantized once per call, so the cost
 * spreads over all rows of x.
 *
 *   dequant_int4(qw, scales, zeros, scales_bf16, G, K, n0, n1, out, out_bf16, threads)
 *       qw (N, K / 2) uint8, column 2j in the low nibble of byte j; scales, zeros (N, K / G) float32 or
 *       bfloat16 (scales_bf16), zeros NULL meaning 8; G in 32..256 dividing K:
 *       out[n - n0, k] = (q[n, k] - zeros[n, k / G]) * scales[n, k / G]  for n0 <= n < n1
 *   dequant_int8(qw, scales, K, n0, n1, out, out_bf16, threads)
 *       qw (N, K) int8, scales (N,) float32:  out[n - n0, k] = qw[n, k] * scales[n]
 *
 * out is (n1 - n0, K) contiguous, float32 or bfloat16 (out_bf16); values are computed in float32 (the
 * subtraction exact, one product) and rounded once to nearest even, as `tensor.to(torch.bfloat16)` rounds. Threads
 * take contiguous blocks of rows. Without AVX-512 the same loops run in plain C. Returns 0, or -1 on sizes it
 * does not take. */

#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#include "bf16.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define DEQUANT_SIMD 1
/* 16 float32 lanes rounded to bfloat16, to nearest even (NaN kept a NaN) */
static inline __m256i dequant_bf16x16(__m512 v) {
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
#endif
}

static inline void dequant_store16(void *out, int64_t i, __m512 v, int out_bf16) {
    if (out_bf16)
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), dequant_bf16x16(v));
    else
        _mm512_storeu_ps((float *)out + i, v);
}

static inline void dequant_mask_store16(void *out, int64_t i, __mmask16 live, __m512 v, int out_bf16) {
    if (out_bf16)
        _mm256_mask_storeu_epi16((uint16_t *)out + i, live, dequant_bf16x16(v));
    else
        _mm512_mask_storeu_ps((float *)out + i, live, v);
}
#else
#define DEQUANT_SIMD 0
#endif

static int dequant_threads(int threads, int64_t rows) {
    return threads < 1 ? 1 : rows < threads ? (rows < 1 ? 1 : (int)rows) : threads;
}

static void dequant_int4_rows(const uint8_t *qw, const void *scales, const void *zeros, int scales_bf16, int64_t G,
                              int64_t K, int64_t n0, int64_t n1, int64_t base, void *out, int out_bf16) {
    const int64_t groups = K / G;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = qw + n * (K / 2);
        const int64_t o = (n - base) * K;
        for (int64_t g = 0; g < groups; g++) {
            const float s = elem_load(scales, n * groups + g, scales_bf16);
            const float z = zeros ? elem_load(zeros, n * groups + g, scales_bf16) : 8.0f;
            int64_t k = g * G;
#if DEQUANT_SIMD
            const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
            for (; k < (g + 1) * G; k += 32) {  /* G is a multiple of 32 */
                const __m128i b = _mm_loadu_si128((const __m128i *)(row + k / 2));
                const __m128i lo = _mm_and_si128(b, _mm_set1_epi8(15));
                const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15));
                const __m128i c0 = _mm_unpacklo_epi8(lo, hi), c1 = _mm_unpackhi_epi8(lo, hi);  /* columns k.., k+16.. */
                const __m512 w0 = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c0)), vz), vs);
                const __m512 w1 = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c1)), vz), vs);
                dequant_store16(out, o + k, w0, out_bf16);
                dequant_store16(out, o + k + 16, w1, out_bf16);
            }
#endif
            for (; k < (g + 1) * G; k++) {
                const int q = k % 2 ? row[k / 2] >> 4 : row[k / 2] & 15;
                elem_store(out, o + k, ((float)q - z) * s, out_bf16);
            }
        }
    }
}

static void dequant_int8_rows(const int8_t *qw, const float *scales, int64_t K, int64_t n0, int64_t n1, int64_t base,
                              void *out, int out_bf16) {
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *row = qw + n * K;
        const int64_t o = (n - base) * K;
        const float s = scales[n];
        int64_t k = 0;
#if DEQUANT_SIMD
        const __m512 vs = _mm512_set1_ps(s);
        for (; k + 16 <= K; k += 16)
            dequant_store16(out, o + k, _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + k)))), vs), out_bf16);
        if (k < K) {
            const __mmask16 live = (__mmask16)((1u << (K - k)) - 1);
            const __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(live, row + k))), vs);
            dequant_mask_store16(out, o + k, live, w, out_bf16);
            k = K;
        }
#endif
        for (; k < K; k++) elem_store(out, o + k, (float)row[k] * s, out_bf16);
    }
}

/* rows [n0, n1) split into `threads` contiguous blocks, block t to thread t */
#define DEQUANT_SPLIT(threads, n0, n1, CALL)                                                  \
    do {                                                                                      \
        const int t_ = dequant_threads(threads, n1 - n0);                                     \
        const int64_t per_ = (n1 - n0 + t_ - 1) / t_;                                         \
        _Pragma("omp parallel for num_threads(t_) schedule(static, 1)")                       \
        for (int i_ = 0; i_ < t_; i_++) {                                                     \
            const int64_t a_ = n0 + i_ * per_, b_ = a_ + per_ < n1 ? a_ + per_ : n1;          \
            if (a_ < b_) CALL(a_, b_);                                                        \
        }                                                                                     \
    } while (0)

int dequant_int4(const uint8_t *qw, const void *scales, const void *zeros, int scales_bf16, int64_t G, int64_t K,
                 int64_t n0, int64_t n1, void *out, int out_bf16, int threads) {
    if (G < 32 || G % 32 != 0 || K <= 0 || K % G != 0 || n0 < 0 || n1 < n0) return -1;
#define DEQUANT_INT4_BLOCK(a, b) dequant_int4_rows(qw, scales, zeros, scales_bf16, G, K, a, b, n0, out, out_bf16)
    DEQUANT_SPLIT(threads, n0, n1, DEQUANT_INT4_BLOCK);
#undef DEQUANT_INT4_BLOCK
    return 0;
}

int dequant_int8(const int8_t *qw, const float *scales, int64_t K, int64_t n0, int64_t n1, void *out, int out_bf16,
                 int threads) {
    if (K <= 0 || n0 < 0 || n1 < n0) return -1;
#define DEQUANT_INT8_BLOCK(a, b) dequant_int8_rows(qw, scales, K, a, b, n0, out, out_bf16)
    DEQUANT_SPLIT(threads, n0, n1, DEQUANT_INT8_BLOCK);
#undef DEQUANT_INT8_BLOCK
    return 0;
}
