/* Rows of int4 and int8 weights dequantized to float32 or bfloat16, shared by dequant.c and amx.c: values computed
 * in float32 ((q - zero) * scale, the subtraction exact, one product) and rounded once to nearest even, as
 * `tensor.to(torch.bfloat16)` rounds. */
#ifndef LMFORGE_DEQUANT_H
#define LMFORGE_DEQUANT_H
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
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

#if DEQUANT_SIMD
/* the 16 bfloat16 values (q - z) * s of a group, q = 0..15 */
static inline __m256i dequant_int4_table(float s, float z) {
    const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return dequant_bf16x16(_mm512_mul_ps(_mm512_sub_ps(q, _mm512_set1_ps(z)), _mm512_set1_ps(s)));
}

/* 64 codes (the 32 bytes at p) to bfloat16 through a table of 32 words: 0-15 for the first 32 codes, 16-31 for
 * the others. The dwords are reordered so that, widened to words, each 128-bit lane holds 4 bytes of the first
 * half and 4 of the second; a table lookup (vpermw) of the low and of the high nibbles, then interleaving the two
 * per lane, puts the 64 values in column order: six shuffles per 64 values where widening and converting takes
 * about twice that. */
static inline void dequant_int4_64(const uint8_t *p, __m512i table, uint16_t *out) {
    const __m256i b = _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i *)p),
                                                  _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    const __m512i w = _mm512_cvtepu8_epi16(b);
    const __m512i second = _mm512_set_epi64(0x0010001000100010LL, 0, 0x0010001000100010LL, 0,
                                            0x0010001000100010LL, 0, 0x0010001000100010LL, 0);
    const __m512i lo = _mm512_or_si512(_mm512_and_si512(w, _mm512_set1_epi16(15)), second);
    const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(w, 4), second);
    const __m512i a = _mm512_permutexvar_epi16(lo, table), c = _mm512_permutexvar_epi16(hi, table);
    _mm512_storeu_si512(out, _mm512_unpacklo_epi16(a, c));
    _mm512_storeu_si512(out + 32, _mm512_unpackhi_epi16(a, c));
}

/* the same 64 codes in nibble order, for a consumer that permutes x's columns alike (amx.c): the low nibbles of
 * the 32 bytes (columns 0, 2, .., 62), then the high ones (1, 3, .., 63); half a step (16 bytes, 32 codes) the
 * same way with `half`. Three shuffles per 64 values. */
static inline void dequant_int4_64_nibbles(const uint8_t *p, __m512i table, uint16_t *out, int half) {
    const __m512i w = _mm512_cvtepu8_epi16(half ? _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p))
                                                : _mm256_loadu_si256((const __m256i *)p));
    const __m512i second = _mm512_set_epi64(0x0010001000100010LL, 0x0010001000100010LL, 0x0010001000100010LL,
                                            0x0010001000100010LL, 0, 0, 0, 0);  /* words 16-31: bytes 16-31 */
    const __m512i lo = _mm512_or_si512(_mm512_and_si512(w, _mm512_set1_epi16(15)), second);
    const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(w, 4), second);
    const __m512i a = _mm512_permutexvar_epi16(lo, table), c = _mm512_permutexvar_epi16(hi, table);
    if (half) {
        _mm256_storeu_si256((__m256i *)out, _mm512_castsi512_si256(a));
        _mm256_storeu_si256((__m256i *)(out + 16), _mm512_castsi512_si256(c));
    } else {
        _mm512_storeu_si512(out, a);
        _mm512_storeu_si512(out + 32, c);
    }
}

/* one whole int4 row in nibble order (dequant_int4_64_nibbles), K a multiple of 32 */
static inline void dequant_int4_row_nibbles(const uint8_t *row, const void *scales, const void *zeros,
                                            int scales_bf16, int64_t G, int64_t K, int64_t first, uint16_t *out) {
    if (G >= 64) {  /* K a multiple of 64: whole steps, one table per group */
        for (int64_t g = 0, k = 0; g < K / G; g++) {
            const __m256i t = dequant_int4_table(elem_load(scales, first + g, scales_bf16),
                                                 zeros ? elem_load(zeros, first + g, scales_bf16) : 8.0f);
            const __m512i table = _mm512_inserti64x4(_mm512_castsi256_si512(t), t, 1);
            for (; k < (g + 1) * G; k += 64) dequant_int4_64_nibbles(row + k / 2, table, out + k, 0);
        }
        return;
    }
    for (int64_t k = 0; k < K; k += 64) {  /* G = 32: two groups a step, the last step maybe half */
        const int64_t g = first + k / 32, half = k + 64 > K;
        const __m256i t0 = dequant_int4_table(elem_load(scales, g, scales_bf16),
                                              zeros ? elem_load(zeros, g, scales_bf16) : 8.0f);
        const __m256i t1 = half ? t0 : dequant_int4_table(elem_load(scales, g + 1, scales_bf16),
                                                          zeros ? elem_load(zeros, g + 1, scales_bf16) : 8.0f);
        dequant_int4_64_nibbles(row + k / 2, _mm512_inserti64x4(_mm512_castsi256_si512(t0), t1, 1), out + k, (int)half);
    }
}

/* bfloat16 columns 0 .. returned of one int4 row (whole steps of 64 codes), by table lookups */
static inline int64_t dequant_int4_row_bf16(const uint8_t *row, const void *scales, const void *zeros,
                                            int scales_bf16, int64_t G, int64_t K, int64_t first, uint16_t *out) {
    int64_t k = 0;
    if (G >= 64) {
        for (int64_t g = 0; g < K / G; g++) {
            const float s = elem_load(scales, first + g, scales_bf16);
            const float z = zeros ? elem_load(zeros, first + g, scales_bf16) : 8.0f;
            const __m256i t = dequant_int4_table(s, z);
            const __m512i table = _mm512_inserti64x4(_mm512_castsi256_si512(t), t, 1);
            for (; k < (g + 1) * G; k += 64) dequant_int4_64(row + k / 2, table, out + k);
        }
        return k;
    }
    for (; k + 64 <= K; k += 64) {  /* G = 32: two groups a step */
        const int64_t g = first + k / 32;
        const __m256i t0 = dequant_int4_table(elem_load(scales, g, scales_bf16),
                                              zeros ? elem_load(zeros, g, scales_bf16) : 8.0f);
        const __m256i t1 = dequant_int4_table(elem_load(scales, g + 1, scales_bf16),
                                              zeros ? elem_load(zeros, g + 1, scales_bf16) : 8.0f);
        dequant_int4_64(row + k / 2, _mm512_inserti64x4(_mm512_castsi256_si512(t0), t1, 1), out + k);
    }
    return k;
}
#endif

/* out[(n - n0) * ld + k] for n0 <= n < n1, k < K (the int4 rows of dequant_int4) */
static inline void dequant_int4_rows(const uint8_t *qw, const void *scales, const void *zeros, int scales_bf16,
                                     int64_t G, int64_t K, int64_t n0, int64_t n1, void *out, int64_t ld, int out_bf16) {
    const int64_t groups = K / G;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = qw + n * (K / 2);
        const int64_t o = (n - n0) * ld;
        int64_t done = 0;  /* columns the table path made */
#if DEQUANT_SIMD
        if (out_bf16)
            done = dequant_int4_row_bf16(row, scales, zeros, scales_bf16, G, K, n * groups, (uint16_t *)out + o);
#endif
        for (int64_t g = done / G; g < groups; g++) {
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

/* the same for the int8 rows of dequant_int8 */
static inline void dequant_int8_rows(const int8_t *qw, const float *scales, int64_t K, int64_t n0, int64_t n1,
                                     void *out, int64_t ld, int out_bf16) {
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *row = qw + n * K;
        const int64_t o = (n - n0) * ld;
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

#endif
