/* int4 weights times int8 activations: the decode GEMV of int4 layers through integer dot products.
 *
 *   x       (M, K) bfloat16 or float32 (`f32`), row stride ldx      M <= Q8_MAX_ROWS (decode)
 *   qw      (N, K / 2) uint8, contiguous    byte j of row n: column 2j in its low nibble, 2j + 1 in its high one
 *   scales  (N, K / G) float32, or bfloat16 (`sz_bf16`), contiguous
 *   zeros   (N, K / G) as scales, or NULL: every zero point is 8
 *   b       (N,) in x's dtype, or NULL
 *   y       (M, N) in x's dtype, row stride ldy
 *
 *   w[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g],  g = k / G,  G in {32, 64, 128, 256},  K % G == 0
 *
 * Each row of x is quantized once per call to int8 in blocks of 32 columns (symmetric, scale = amax / 127,
 * rounded to nearest), as llama.cpp's Q8_0 and ONNX Runtime's int8-activation MatMulNBits do. With x^ the
 * dequantized x, the kernel computes exactly (in float32)
 *   sum_k w[n, k] x^[m, k] = sum_b sx[m, b] scales[n, g(b)] * (sum_{k in b} q[n, k] xq[m, k])
 *                          - sum_g scales[n, g] zeros[n, g] * (sum_{b in g} sx[m, b] sum_{k in b} xq[m, k]):
 * the codes meet xq in vpdpbusd (unsigned 4-bit codes times signed bytes, 64 products per instruction), the
 * 32-bit block sums are scaled into float32 sums, and the zero term is a dot over the groups. Per 64 columns a
 * weight row is 32 bytes: the low nibbles (even columns) and the high ones (odd columns) become the two halves
 * of one vector, and xq is stored in the same order (the 32 even columns, then the 32 odd ones).
 *
 * Needs AVX512-VNNI and AVX512-BW (`int4_q8_available()` says whether this build has them). Threads take
 * contiguous blocks of weight rows, four rows at a time, prefetching the next four. */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define Q8_ISA 1
#else
#define Q8_ISA 0
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "bf16.h"

#define Q8_MAX_ROWS 8
#define Q8_BLOCK 32   /* columns per activation scale */
#define Q8_CHUNK 64   /* columns per step: 32 bytes of a weight row, one 512-bit vector of xq */

int int4_q8_available(void) { return Q8_ISA; }

#if Q8_ISA
typedef struct {
    const int8_t *xq;    /* (M, C * 64) int8 x, each chunk as its even columns then its odd ones, zero-padded */
    const float *xsv;    /* (M, C, 16) the block scale of each int32 lane of a chunk's dot */
    const float *xz;     /* (M, K / G) sum over the group of sx[b] * sum_{k in b} xq[k] */
    const uint8_t *qw;
    const void *scales, *zeros;  /* float32, or bfloat16 where sz_bf16 */
    int sz_bf16;
    int64_t K, G, C;     /* C: chunks per row, K rounded up to 64 */
    int gshift;          /* log2 G */
    const void *b;
    void *y;
    int64_t ldy;
    int f32;
} q8_args;

/* Row m of x into xq, xsv and xz. vpdpbusd's lane i sums bytes 4i .. 4i + 3: lanes 0-3 and 8-11 hold the
 * chunk's first 32 columns (even, then odd), lanes 4-7 and 12-15 its last 32. K is a multiple of 32, so each
 * block of 32 columns is whole or past the end (then zero). */
static void q8_prepare(const void *x, int64_t ldx, int64_t m, const q8_args *a, int8_t *xq, float *xsv, float *xz) {
    const int64_t K = a->K, G = a->G, C = a->C;
    const void *row = (const char *)x + (size_t)(m * ldx) * (a->f32 ? 4 : 2);
    int8_t *q = xq + m * C * Q8_CHUNK;
    float *sv = xsv + m * C * 16, *z = xz + m * (K / G);
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int64_t g = 0; g < K / G; g++) z[g] = 0.0f;
    for (int64_t blk = 0; blk < C * 2; blk++) {
        const int64_t k0 = blk * Q8_BLOCK, c = blk / 2, half = blk % 2;
        __m128i qe = _mm_setzero_si128(), qo = _mm_setzero_si128();
        float s = 0.0f;
        if (k0 < K) {
            __m512 lo = elem_load16(row, k0, !a->f32), hi = elem_load16(row, k0 + 16, !a->f32);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, lo), _mm512_andnot_ps(sign, hi)));
            s = amax / 127.0f;
            const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            __m512i ie = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(lo, even, hi), inv));
            __m512i io = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(lo, odd, hi), inv));
            const __m512i lim = _mm512_set1_epi32(127);
            ie = _mm512_max_epi32(_mm512_min_epi32(ie, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim));
            io = _mm512_max_epi32(_mm512_min_epi32(io, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim));
            z[k0 / G] += s * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(ie, io));
            qe = _mm512_cvtepi32_epi8(ie);
            qo = _mm512_cvtepi32_epi8(io);
        }
        _mm_storeu_si128((__m128i *)(q + c * Q8_CHUNK + half * 16), qe);       /* even columns */
        _mm_storeu_si128((__m128i *)(q + c * Q8_CHUNK + 32 + half * 16), qo);  /* odd columns */
        for (int l = 0; l < 4; l++) sv[c * 16 + half * 4 + l] = sv[c * 16 + 8 + half * 4 + l] = s;
    }
}

static inline void q8_store(const q8_args *a, int64_t m, int64_t n, float v) {
    if (a->f32) {
        if (a->b) v += ((const float *)a->b)[n];
        ((float *)a->y)[m * a->ldy + n] = v;
    } else {
        if (a->b) v += bf16_to_f32(((const uint16_t *)a->b)[n]);
        ((uint16_t *)a->y)[m * a->ldy + n] = f32_to_bf16(v);
    }
}

/* Weight rows n .. n + R - 1 (R <= 4) against row m of x. */
static inline __attribute__((always_inline)) void q8_rows(const q8_args *a, int64_t n, int R, int64_t m,
                                                          int64_t next_rows) {
    const int64_t K = a->K, G = a->G, C = a->C, groups = K / G, rowb = K / 2;
    const __m512i nib = _mm512_set1_epi8(0x0F);
    const int8_t *xq = a->xq + m * C * Q8_CHUNK;
    const float *xsv = a->xsv + m * C * 16;
    __m512 tot[4], part[4];
    for (int r = 0; r < 4; r++) tot[r] = part[r] = _mm512_setzero_ps();
    /* G >= 64: a chunk lies in one group, whose scale multiplies the sum of its chunks once (part); G = 32:
       the chunk's two blocks have their own weight scales, blended per lane */
    const int64_t per_group = G / Q8_CHUNK;
    for (int64_t c = 0; c < C; c++) {
        const __m512i xv = _mm512_loadu_si512((const void *)(xq + c * Q8_CHUNK));
        const __m512 sv = _mm512_loadu_ps(xsv + c * 16);
        const int64_t k0 = c * Q8_CHUNK;
        const __mmask32 live = k0 + Q8_CHUNK <= K ? 0xFFFFFFFFu : 0x0000FFFFu;  /* a 32-column tail */
        const int64_t g0 = k0 >> a->gshift;
        const int group_end = per_group == 0 || (c + 1) % per_group == 0 || c == C - 1;
        for (int r = 0; r < R; r++) {
            const uint8_t *wp = a->qw + (n + r) * rowb + c * 32;
            if (next_rows > r) _mm_prefetch((const char *)(wp + 4 * rowb), _MM_HINT_T0);
            __m256i w = _mm256_maskz_loadu_epi8(live, wp);
            __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(w), _mm256_srli_epi16(w, 4), 1);
            codes = _mm512_and_si512(codes, nib);
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xv);
            const int64_t sc = (n + r) * groups;
            if (per_group == 0) {  /* G = 32 */
                const int64_t g1 = k0 + Q8_BLOCK < K ? g0 + 1 : g0;
                __m512 ws = _mm512_mask_blend_ps((__mmask16)0xF0F0,
                                                 _mm512_set1_ps(elem_load(a->scales, sc + g0, a->sz_bf16)),
                                                 _mm512_set1_ps(elem_load(a->scales, sc + g1, a->sz_bf16)));
                tot[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sv, ws), tot[r]);
            } else {
                part[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sv, part[r]);
                if (group_end) {
                    const __m512 ws = _mm512_set1_ps(elem_load(a->scales, sc + g0, a->sz_bf16));
                    tot[r] = _mm512_fmadd_ps(part[r], ws, tot[r]);
                    part[r] = _mm512_setzero_ps();
                }
            }
        }
    }
    const float *xz = a->xz + m * groups;
    for (int r = 0; r < R; r++) {
        const int64_t sc = (n + r) * groups;
        float zt = 0.0f;
        for (int64_t g = 0; g < groups; g++)
            zt += elem_load(a->scales, sc + g, a->sz_bf16) * (a->zeros ? elem_load(a->zeros, sc + g, a->sz_bf16) : 8.0f)
                  * xz[g];
        q8_store(a, m, n + r, _mm512_reduce_add_ps(tot[r]) - zt);
    }
}
#endif

/* Returns 0; -1 when K, G or M is out of range; -2 when the copy of x cannot be allocated; -3 when this build
 * lacks AVX512-VNNI. */
int gemv_int4_q8(const void *x, int64_t ldx, int f32, const uint8_t *qw, const void *scales, const void *zeros,
                 int sz_bf16, const void *b, void *y, int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t G, int threads) {
#if Q8_ISA
    if (!(G == 32 || G == 64 || G == 128 || G == 256) || K <= 0 || K % G != 0 || M < 0 || M > Q8_MAX_ROWS || N < 0)
        return -1;
    if (M == 0 || N == 0) return 0;
    if (threads < 1) threads = 1;
    const int64_t C = (K + Q8_CHUNK - 1) / Q8_CHUNK;
    size_t xq_bytes = ((size_t)(M * C * Q8_CHUNK) + 63) & ~(size_t)63;
    size_t sv_bytes = ((size_t)(M * C * 16) * 4 + 63) & ~(size_t)63;
    size_t z_bytes = ((size_t)(M * (K / G)) * 4 + 63) & ~(size_t)63;
    char *buf = aligned_alloc(64, xq_bytes + sv_bytes + z_bytes);
    if (!buf) return -2;
    int8_t *xq = (int8_t *)buf;
    float *xsv = (float *)(buf + xq_bytes), *xz = (float *)(buf + xq_bytes + sv_bytes);
    q8_args a = {xq, xsv, xz, qw, scales, zeros, sz_bf16, K, G, C, __builtin_ctzll((unsigned long long)G), b, y, ldy, f32};
    for (int64_t m = 0; m < M; m++) q8_prepare(x, ldx, m, &a, xq, xsv, xz);
    /* contiguous blocks of weight rows, a multiple of 4 each */
    const int64_t block = ((N + threads - 1) / threads + 3) / 4 * 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < threads; t++) {
        int64_t n0 = t * block, n1 = n0 + block < N ? n0 + block : N;
        for (int64_t n = n0; n < n1; n += 4) {
            int R = n1 - n < 4 ? (int)(n1 - n) : 4;
            int64_t next = n1 - n - R < 4 ? n1 - n - R : 4;
            for (int64_t m = 0; m < M; m++) {
                switch (R) {
                case 4: q8_rows(&a, n, 4, m, m == 0 ? next : 0); break;
                case 3: q8_rows(&a, n, 3, m, 0); break;
                case 2: q8_rows(&a, n, 2, m, 0); break;
                default: q8_rows(&a, n, 1, m, 0); break;
                }
            }
        }
    }
    free(buf);
    return 0;
#else
    (void)x; (void)ldx; (void)f32; (void)qw; (void)scales; (void)zeros; (void)sz_bf16; (void)b; (void)y; (void)ldy;
    (void)M; (void)N; (void)K; (void)G; (void)threads;
    return -3;
#endif
}
