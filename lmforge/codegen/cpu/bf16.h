/* bfloat16 <-> float32, shared by the CPU kernels (gemv.c, int4.c, int4_q8.c, norm.c, attention.c). */
#ifndef LMFORGE_BF16_H
#define LMFORGE_BF16_H
#include <stdint.h>
#include <string.h>

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

/* element i of a float32 (bf16 == 0) or bfloat16 row, as float32; and the store back, rounded */
static inline float elem_load(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void elem_store(void *p, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* elements i..i+15 of a float32 or bfloat16 row, as float32 lanes */
static inline __m512 elem_load16(const void *p, int64_t i, int bf16) {
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                      _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16))
                : _mm512_loadu_ps((const float *)p + i);
}

/* the same for the lanes of `live` only (the others 0, their memory not read) */
static inline __m512 elem_maskz_load16(__mmask16 live, const void *p, int64_t i, int bf16) {
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                      _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, (const uint16_t *)p + i)), 16))
                : _mm512_maskz_loadu_ps(live, (const float *)p + i);
}
#endif

#endif
