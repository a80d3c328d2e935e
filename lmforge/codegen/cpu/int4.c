/* The int4 weight-only matmul: y = x W^T (+ b), W stored as 4-bit codes with per-group scales and zero points.
 *
 *   x       (M, K) bfloat16 or float32 (`f32`), row stride ldx      any M; decode is M = 1..8
 *   qw      (N, K / 2) uint8, contiguous    byte j of row n: column 2j in its low nibble, 2j + 1 in its high one
 *   scales  (N, K / G) float32, or bfloat16 (`sz_bf16`), contiguous
 *   zeros   (N, K / G) as scales, or NULL: every zero point is 8
 *   b       (N,) in x's dtype, or NULL
 *   y       (M, N) in x's dtype, row stride ldy
 *
 *   w[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g],  g = k / G,  G in {32, 64, 128, 256},  K % G == 0
 *
 * Per call, the per-group sums of x, xs[m, g], are taken once, so that per weight row and group only the
 * codes are multiplied:
 *   sum_k w[n, k] x[m, k] = sum_g scales[n, g] * (sum_{k in g} q[n, k] x[m, k] - zeros[n, g] * xs[m, g]).
 * Three inner loops, all accumulating in float32:
 *   - decode on the dot path (AVX512-BF16, bfloat16 x, M <= INT4_ROWS): codes become bfloat16 with two
 *     integer ops per 32 of them and meet x, reordered once per call, in vdpbf16ps (int4_rows_dot);
 *   - prefill on the dot path (M > INT4_ROWS): tiles of 16 weight rows are unpacked once and every row of x
 *     is multiplied with them, GEMM-style (int4_tile_dot);
 *   - the float path (float32 x, or no AVX512-BF16): 16 bytes of a row, widened to 16 int32 lanes, give
 *     the low nibbles (even k) and the high ones (odd k) as two float vectors; x is stored as float32 with
 *     each 32-column block as its 16 even columns, then its 16 odd ones, to line up with them (int4_rows).
 * With few rows of x, each weight byte is read once for all of them, and several weight rows are taken at
 * once so that enough independent sums are in flight; a larger M runs in chunks of INT4_ROWS over tiles of
 * weight rows that stay in cache. Threads take contiguous blocks of weight rows. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#include "bf16.h"
#include "rows.h"

#define INT4_MAX_ROWS 8  /* the row kernels exist for 1..8 rows of x and 1, 2 or 4 weight rows */
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define INT4_ROWS 4      /* rows of x per pass over a weight row (16 ymm registers hold 3 sums per pair) */
#define INT4_SUMS 4      /* (weight rows) x (rows of x) in flight */
#else
#define INT4_ROWS 8
#define INT4_SUMS 8
#endif
#define INT4_TILE 16     /* weight rows reused from cache across chunks of x when M > INT4_ROWS */
#define INT4_CHUNK 128   /* columns per step of the dot path: 64 bytes of a weight row */

typedef struct {
    const float *xd;     /* float path: (M, K) float32 x, de-interleaved per 32 columns */
    const uint16_t *xb;  /* dot path: (M, Kp) bfloat16 x in the order of int4_prepare, zero-padded */
    const float *xs;     /* (M, K / G) sums of x over each group */
    const uint8_t *qw;
    const void *scales;  /* float32, or bfloat16 where sz_bf16 */
    const void *zeros;
    int sz_bf16;
    int64_t K, Kp, G;    /* Kp: K rounded up to INT4_CHUNK */
    const void *b;       /* (N,) in x's dtype, or NULL */
    void *y;             /* (M, N) in x's dtype, row stride ldy */
    int64_t ldy;
    int f32;             /* x, b and y are float32 (else bfloat16) */
} int4_args;

/* While weight rows n .. n + R - 1 are multiplied, the next R rows, one block of R * K / 2 bytes, are
 * prefetched in address order, one cache line per step (128 columns of one row). R interleaved streams of
 * short rows escape the hardware prefetcher: on Zen 4, one thread read K = 1536 rows from memory at 8 GB/s
 * without this, at 19 with it; prefetching them row by row did not help. */
static inline void int4_prefetch_next(const int4_args *a, int64_t n, int R, int64_t line) {
    __builtin_prefetch(a->qw + (n + R) * (a->K / 2) + line * 64);
}

/* The scales and zero points of weight rows n + 4R .. n + 5R - 1, taken before rows n .. n + R - 1 start:
 * without it each block of rows began with a miss on both (their streams are an eighth of the codes' each,
 * too thin for the hardware prefetcher), and a decode GEMV at K = 576 streamed 18-24 GB/s instead of 26-36.
 * Prefetching 2, 8 or 16 blocks ahead measured the same. */
static inline void int4_prefetch_groups(const int4_args *a, int64_t n, int R) {
    const int64_t size = a->sz_bf16 ? 2 : 4, groups = a->K / a->G, ahead = (n + 4 * R) * groups * size;
    for (int64_t off = 0; off < R * groups * size; off += 64) {
        __builtin_prefetch((const char *)a->scales + ahead + off);
        if (a->zeros) __builtin_prefetch((const char *)a->zeros + ahead + off);
    }
}

/* y[m, n] = v + b[n], rounded to y's dtype */
static inline void int4_store(const int4_args *a, int64_t m, int64_t n, float v) {
    if (a->f32) {
        ((float *)a->y)[m * a->ldy + n] = v + (a->b ? ((const float *)a->b)[n] : 0.0f);
    } else {
        float bias = a->b ? bf16_to_f32(((const uint16_t *)a->b)[n]) : 0.0f;
        ((uint16_t *)a->y)[m * a->ldy + n] = f32_to_bf16(v + bias);
    }
}

#if defined(__AVX512F__)
/* tot[m] -= sum_g scales[n, g] * (zeros[n, g] + offset) * xs[m0 + m, g] for m < M, as vectors still to be
 * summed, 16 groups at a time: the products of scales and zero points are made once for all M rows of x (made
 * per row of x, they cost a decode GEMV at K = 576 a third of its time at M = 4). The row kernels take it before
 * the codes' sums at M = 1 and after them at M > 1, which measured 8-10 % and 10-15 % faster than the other way
 * round at K = 576 (Zen 5). */
static inline __attribute__((always_inline)) void int4_sub_zero_terms(const int4_args *a, int64_t n, int64_t m0,
                                                                       int M, float offset, __m512 *tot) {
    const int64_t groups = a->K / a->G;
    for (int64_t g = 0; g < groups; g += 16) {
        __mmask16 live = groups - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (groups - g)) - 1);
        const int64_t at = n * groups + g;
        __m512 z = a->zeros ? elem_maskz_load16(live, a->zeros, at, a->sz_bf16) : _mm512_set1_ps(8.0f);
        __m512 sz = _mm512_mul_ps(elem_maskz_load16(live, a->scales, at, a->sz_bf16),
                                  _mm512_add_ps(z, _mm512_set1_ps(offset)));
        for (int m = 0; m < M; m++)
            tot[m] = _mm512_fnmadd_ps(sz, _mm512_maskz_loadu_ps(live, a->xs + (m0 + m) * groups + g), tot[m]);
    }
}
#endif

/* Float path. y[m0 + m, n] for m < M and n in [n0, n1), R weight rows at a time (R divides n1 - n0);
 * R and M are compile-time constants once inlined. Per group, sum q x over the group in vectors, then
 * scale: the low nibbles of 16 bytes (even k) meet xd[k .. k + 15], the high ones (odd k) xd[k + 16 ..]. */
#if defined(__AVX512F__)
static inline __attribute__((always_inline)) void int4_rows(const int4_args *a, int64_t n0, int64_t n1, int64_t m0,
                                                             int R, int M) {
    const int64_t K = a->K, G = a->G, groups = K / G;
    const float *xd = a->xd + m0 * K;
    const __m512i nibble = _mm512_set1_epi32(15);
    for (int64_t n = n0; n < n1; n += R) {
        __m512 tot[4][INT4_MAX_ROWS], lo_acc[4][INT4_MAX_ROWS], hi_acc[4][INT4_MAX_ROWS];
        int4_prefetch_groups(a, n, R);
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++) tot[r][m] = _mm512_setzero_ps();
        if (M == 1)
            for (int r = 0; r < R; r++) int4_sub_zero_terms(a, n + r, m0, M, 0.0f, tot[r]);
        for (int64_t g = 0; g < groups; g++) {
            for (int r = 0; r < R; r++)
                for (int m = 0; m < M; m++) lo_acc[r][m] = hi_acc[r][m] = _mm512_setzero_ps();
            for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
                for (int r = 0; r < R; r++) {
                    const uint8_t *q16 = a->qw + (n + r) * (K / 2) + k / 2;
                    if (k % INT4_CHUNK == 0) int4_prefetch_next(a, n, R, k / INT4_CHUNK * R + r);
                    __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q16));
                    __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, nibble));
                    __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
                    for (int m = 0; m < M; m++) {
                        lo_acc[r][m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xd + m * K + k), lo_acc[r][m]);
                        hi_acc[r][m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xd + m * K + k + 16), hi_acc[r][m]);
                    }
                }
            }
            for (int r = 0; r < R; r++) {
                __m512 s = _mm512_set1_ps(elem_load(a->scales, (n + r) * groups + g, a->sz_bf16));
                for (int m = 0; m < M; m++)
                    tot[r][m] = _mm512_fmadd_ps(_mm512_add_ps(lo_acc[r][m], hi_acc[r][m]), s, tot[r][m]);
            }
        }
        for (int r = 0; r < R; r++) {
            if (M > 1) int4_sub_zero_terms(a, n + r, m0, M, 0.0f, tot[r]);
            for (int m = 0; m < M; m++) int4_store(a, m0 + m, n + r, _mm512_reduce_add_ps(tot[r][m]));
        }
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline __attribute__((always_inline)) void int4_rows(const int4_args *a, int64_t n0, int64_t n1, int64_t m0,
                                                             int R, int M) {
    const int64_t K = a->K, G = a->G, groups = K / G;
    const float *xd = a->xd + m0 * K;
    const __m256i nibble = _mm256_set1_epi32(15);
    for (int64_t n = n0; n < n1; n += R) {
        __m256 tot[4][INT4_MAX_ROWS], lo_acc[4][INT4_MAX_ROWS], hi_acc[4][INT4_MAX_ROWS];
        float zterm[4][INT4_MAX_ROWS];
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++) tot[r][m] = _mm256_setzero_ps(), zterm[r][m] = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            for (int r = 0; r < R; r++)
                for (int m = 0; m < M; m++) lo_acc[r][m] = hi_acc[r][m] = _mm256_setzero_ps();
            for (int64_t k = g * G; k < (g + 1) * G; k += 16) {  /* bytes k/2 .. k/2 + 7 */
                const int64_t x_at = (k & ~(int64_t)31) + (k & 31) / 2;  /* their even columns in xd */
                for (int r = 0; r < R; r++) {
                    const uint8_t *q8 = a->qw + (n + r) * (K / 2) + k / 2;
                    if (k % INT4_CHUNK == 0) int4_prefetch_next(a, n, R, k / INT4_CHUNK * R + r);
                    __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q8));
                    __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(q, nibble));
                    __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4));
                    for (int m = 0; m < M; m++) {
                        lo_acc[r][m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xd + m * K + x_at), lo_acc[r][m]);
                        hi_acc[r][m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xd + m * K + x_at + 16), hi_acc[r][m]);
                    }
                }
            }
            for (int r = 0; r < R; r++) {
                int64_t at = (n + r) * groups + g;
                const float sc = elem_load(a->scales, at, a->sz_bf16);
                __m256 s = _mm256_set1_ps(sc);
                float sz = sc * (a->zeros ? elem_load(a->zeros, at, a->sz_bf16) : 8.0f);
                for (int m = 0; m < M; m++) {
                    tot[r][m] = _mm256_fmadd_ps(_mm256_add_ps(lo_acc[r][m], hi_acc[r][m]), s, tot[r][m]);
                    zterm[r][m] += sz * a->xs[(m0 + m) * groups + g];
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++) {
                __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(tot[r][m]), _mm256_extractf128_ps(tot[r][m], 1));
                s4 = _mm_hadd_ps(s4, s4);
                s4 = _mm_hadd_ps(s4, s4);
                int4_store(a, m0 + m, n + r, _mm_cvtss_f32(s4) - zterm[r][m]);
            }
    }
}
#else
static inline __attribute__((always_inline)) void int4_rows(const int4_args *a, int64_t n0, int64_t n1, int64_t m0,
                                                             int R, int M) {
    const int64_t K = a->K, G = a->G, groups = K / G;
    for (int64_t n = n0; n < n1; n += R)
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++) {
                float acc = 0.0f;
                for (int64_t g = 0; g < groups; g++) {
                    const uint8_t *q = a->qw + (n + r) * (K / 2) + g * G / 2;
                    const float *xv = a->xd + (m0 + m) * K + g * G;
                    float dot = 0.0f;
                    for (int64_t j = 0; j < G / 2; j++) {  /* byte j of the group: block j / 16, lane j % 16 */
                        int64_t c = (j / 16) * 32 + j % 16;
                        dot += (float)(q[j] & 15) * xv[c] + (float)(q[j] >> 4) * xv[c + 16];
                    }
                    int64_t at = (n + r) * groups + g;
                    const float z = a->zeros ? elem_load(a->zeros, at, a->sz_bf16) : 8.0f;
                    acc += elem_load(a->scales, at, a->sz_bf16) * (dot - z * a->xs[(m0 + m) * groups + g]);
                }
                int4_store(a, m0 + m, n + r, acc);
            }
}
#endif

#if defined(__AVX512BF16__)
#define INT4_DOT 1
/* 64 weight bytes -> their 128 codes as four vectors of bfloat16 pairs (16 + q), in xb's order;
 * `keep` (0x00780078) and `magic` (0x41804180) must be in scope */
#define INT4_CODES(W, V, BITS)                                                                            \
    do {                                                                                                  \
        W[0] = (__m##BITS##bh)_mm##BITS##_ternarylogic_epi32(_mm##BITS##_rol_epi32(V, 3), keep, magic, 0xea); \
        W[1] = (__m##BITS##bh)_mm##BITS##_ternarylogic_epi32(_mm##BITS##_ror_epi32(V, 1), keep, magic, 0xea); \
        W[2] = (__m##BITS##bh)_mm##BITS##_ternarylogic_epi32(_mm##BITS##_ror_epi32(V, 5), keep, magic, 0xea); \
        W[3] = (__m##BITS##bh)_mm##BITS##_ternarylogic_epi32(_mm##BITS##_ror_epi32(V, 9), keep, magic, 0xea); \
    } while (0)

/* sum over a chunk of (16 + q) x, per lane */
static inline __m512 int4_dot512(const __m512bh w[4], const uint16_t *xm) {
    __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), w[0], (__m512bh)_mm512_loadu_si512(xm));
    acc = _mm512_dpbf16_ps(acc, w[1], (__m512bh)_mm512_loadu_si512(xm + 32));
    acc = _mm512_dpbf16_ps(acc, w[2], (__m512bh)_mm512_loadu_si512(xm + 64));
    return _mm512_dpbf16_ps(acc, w[3], (__m512bh)_mm512_loadu_si512(xm + 96));
}

static inline __m256 int4_dot256(const __m256bh w[4], const uint16_t *xm) {  /* lanes 0..7 of the same */
    __m256 acc = _mm256_dpbf16_ps(_mm256_setzero_ps(), w[0], (__m256bh)_mm256_loadu_si256((const void *)xm));
    acc = _mm256_dpbf16_ps(acc, w[1], (__m256bh)_mm256_loadu_si256((const void *)(xm + 32)));
    acc = _mm256_dpbf16_ps(acc, w[2], (__m256bh)_mm256_loadu_si256((const void *)(xm + 64)));
    return _mm256_dpbf16_ps(acc, w[3], (__m256bh)_mm256_loadu_si256((const void *)(xm + 96)));
}

/* Dot path, for bfloat16 x. 64 bytes of a weight row (a chunk of 128 columns) are read as 16 dwords:
 * dword l holds the nibbles of columns 8l .. 8l + 7, nibble p at bits 4p .. 4p + 3. Rotating it left by
 * 3 - 4i (i < 4) puts nibble i at bits 3..6 and nibble i + 4 at bits 19..22; keeping those bits and
 * setting 0x41804180 gives two bfloat16 numbers 16 + q (exponent 2^4, q the top 4 of the 7 mantissa bits),
 * exactly. vdpbf16ps multiplies them with x[8l + i] and x[8l + i + 4], which xb holds side by side, and adds
 * both products into lane l. The offset is taken off with the zero point: sum (16 + q) x = sum q x + 16 xs.
 * Lane l lies in group (k0 + 8l) / G, so a chunk's sums are scaled by a vector of per-lane scales. */
static inline __attribute__((always_inline)) void int4_rows_dot(const int4_args *a, int64_t n0, int64_t n1,
                                                                 int64_t m0, int R, int M) {
    const int64_t K = a->K, Kp = a->Kp, G = a->G, groups = K / G;
    const int log2_g = G == 32 ? 5 : G == 64 ? 6 : G == 128 ? 7 : 8;
    const uint16_t *xb = a->xb + m0 * Kp;
    /* whole chunks with 512-bit ops; a tail of 32 or 64 columns on lanes 0..7 with 256-bit ones, which run
       twice as fast as 512-bit ones on Zen 4; a tail of 96 columns as a masked chunk */
    const int64_t tail = K % INT4_CHUNK <= 64 ? K % INT4_CHUNK : 0, wide_end = K - tail;
    const __mmask8 tail_lanes = (__mmask8)((1u << (tail / 8)) - 1);
    const __mmask8 tail_groups = (__mmask8)((1u << (tail >> log2_g)) - 1);  /* G <= 64 where there is a tail */
    const __m512i lane_group = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                 log2_g - 3);  /* l / (G / 8): 0 for G >= 128 */
    for (int64_t n = n0; n < n1; n += R) {
        __m512 tot[4][INT4_MAX_ROWS];
        int4_prefetch_groups(a, n, R);
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++) tot[r][m] = _mm512_setzero_ps();
        if (M == 1)
            for (int r = 0; r < R; r++) int4_sub_zero_terms(a, n + r, m0, M, 16.0f, tot[r]);
        for (int64_t k0 = 0; k0 < wide_end; k0 += INT4_CHUNK) {
            const __m512i keep = _mm512_set1_epi32(0x00780078), magic = _mm512_set1_epi32(0x41804180);
            int64_t width = K - k0 < INT4_CHUNK ? K - k0 : INT4_CHUNK;  /* a multiple of 32 */
            __mmask16 lanes = (__mmask16)((1u << (width / 8)) - 1);
            __mmask16 chunk_groups = (__mmask16)((1u << (width >> log2_g)) - 1);  /* used if G < 128 */
            for (int r = 0; r < R; r++) {
                int4_prefetch_next(a, n, R, k0 / INT4_CHUNK * R + r);
                __m512bh w[4];
                INT4_CODES(w, _mm512_maskz_loadu_epi32(lanes, a->qw + (n + r) * (K / 2) + k0 / 2), 512);
                const int64_t sc = (n + r) * groups + (k0 >> log2_g);
                __m512 s = G >= INT4_CHUNK ? _mm512_set1_ps(elem_load(a->scales, sc, a->sz_bf16))
                                           : elem_maskz_load16(chunk_groups, a->scales, sc, a->sz_bf16);
                if (G < INT4_CHUNK) s = _mm512_permutexvar_ps(lane_group, s);
                for (int m = 0; m < M; m++)
                    tot[r][m] = _mm512_fmadd_ps(int4_dot512(w, xb + m * Kp + k0), s, tot[r][m]);
            }
        }
        if (tail) {
            const __m256i keep = _mm256_set1_epi32(0x00780078), magic = _mm256_set1_epi32(0x41804180);
            for (int r = 0; r < R; r++) {
                int4_prefetch_next(a, n, R, wide_end / INT4_CHUNK * R + r);
                __m256bh w[4];
                INT4_CODES(w, _mm256_maskz_loadu_epi32(tail_lanes, a->qw + (n + r) * (K / 2) + wide_end / 2), 256);
                const int64_t sc = (n + r) * groups + (wide_end >> log2_g);
                __m256 s = _mm256_permutexvar_ps(_mm512_castsi512_si256(lane_group),
                                                 _mm512_castps512_ps256(
                                                     elem_maskz_load16(tail_groups, a->scales, sc, a->sz_bf16)));
                for (int m = 0; m < M; m++) {  /* xb is zero beyond K */
                    __m256 part = _mm256_mul_ps(int4_dot256(w, xb + m * Kp + wide_end), s);
                    tot[r][m] = _mm512_mask_add_ps(tot[r][m], 0xff, tot[r][m], _mm512_castps256_ps512(part));
                }
            }
        }
        for (int r = 0; r < R; r++) {
            if (M > 1) int4_sub_zero_terms(a, n + r, m0, M, 16.0f, tot[r]);
            for (int m = 0; m < M; m++) int4_store(a, m0 + m, n + r, _mm512_reduce_add_ps(tot[r][m]));
        }
    }
}

/* Prefill on the dot path (bfloat16 x, M > INT4_ROWS). A tile of up to 16 weight rows is unpacked once into
 * codes[j], the bfloat16 pairs (16 + q[n, 2j], 16 + q[n, 2j + 1]) of byte j with the tile's rows as the 16
 * lanes, and every row of x then meets it through vdpbf16ps with its own pair (x[2j], x[2j + 1]) broadcast,
 * 8 rows of x at a time: no horizontal sums. Per group, the 16 sums are scaled by the tile's 16 scales and
 * the zero terms are taken off, as in int4_rows_dot.
 *   work: codes (K / 2) x 16 dwords, then scales and scales * (zeros + 16), (K / G) x 16 floats each */
static void int4_tile_dot(const int4_args *a, const uint16_t *x, int64_t ldx, int64_t M, int64_t n0, int rows,
                          uint32_t *work) {
    const int64_t K = a->K, G = a->G, groups = K / G;
    uint32_t *codes = work;
    float *st = (float *)(work + K / 2 * 16), *szt = st + groups * 16;
    const __m512i keep = _mm512_set1_epi32(0x00780078), magic = _mm512_set1_epi32(0x41804180);
    for (int64_t j0 = 0; j0 < K / 2; j0 += 16) {  /* 16 bytes of 16 rows, transposed, then widened */
        __m128i t[16], u[16];
        for (int r = 0; r < 16; r++)
            t[r] = r < rows ? _mm_loadu_si128((const __m128i *)(a->qw + (n0 + r) * (K / 2) + j0))
                            : _mm_setzero_si128();
        for (int i = 0; i < 8; i++) {  /* bytes of rows 2i, 2i + 1: columns 0..7, then 8..15 */
            u[i] = _mm_unpacklo_epi8(t[2 * i], t[2 * i + 1]);
            u[i + 8] = _mm_unpackhi_epi8(t[2 * i], t[2 * i + 1]);
        }
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 4; i++) {  /* rows 4i .. 4i + 3: columns 8h + 0..3, then 8h + 4..7 */
                t[8 * h + i] = _mm_unpacklo_epi16(u[8 * h + 2 * i], u[8 * h + 2 * i + 1]);
                t[8 * h + i + 4] = _mm_unpackhi_epi16(u[8 * h + 2 * i], u[8 * h + 2 * i + 1]);
            }
        for (int q = 0; q < 4; q++)
            for (int i = 0; i < 2; i++) {  /* rows 8i .. 8i + 7: columns 4q + 0, 1, then 4q + 2, 3 */
                u[4 * q + i] = _mm_unpacklo_epi32(t[4 * q + 2 * i], t[4 * q + 2 * i + 1]);
                u[4 * q + i + 2] = _mm_unpackhi_epi32(t[4 * q + 2 * i], t[4 * q + 2 * i + 1]);
            }
        for (int q = 0; q < 4; q++) {  /* all 16 rows: columns 4q .. 4q + 3 */
            t[4 * q] = _mm_unpacklo_epi64(u[4 * q], u[4 * q + 1]);
            t[4 * q + 1] = _mm_unpackhi_epi64(u[4 * q], u[4 * q + 1]);
            t[4 * q + 2] = _mm_unpacklo_epi64(u[4 * q + 2], u[4 * q + 3]);
            t[4 * q + 3] = _mm_unpackhi_epi64(u[4 * q + 2], u[4 * q + 3]);
        }
        for (int c = 0; c < 16; c++) {  /* byte b -> (16 + (b & 15), 16 + (b >> 4)) as bfloat16, low half first */
            __m512i b = _mm512_cvtepu8_epi32(t[c]);
            __m512i both = _mm512_or_si512(_mm512_slli_epi32(b, 3), _mm512_slli_epi32(b, 15));
            _mm512_storeu_si512((void *)(codes + (j0 + c) * 16), _mm512_ternarylogic_epi32(both, keep, magic, 0xea));
        }
    }
    for (int64_t g = 0; g < groups; g++)
        for (int r = 0; r < 16; r++) {
            int64_t at = (n0 + r) * groups + g;
            float s = r < rows ? elem_load(a->scales, at, a->sz_bf16) : 0.0f;
            st[g * 16 + r] = s;
            szt[g * 16 + r] = s * ((r < rows && a->zeros ? elem_load(a->zeros, at, a->sz_bf16) : 8.0f) + 16.0f);
        }
    const __mmask16 live = (__mmask16)((1u << rows) - 1);
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
        int mc = M - m0 < 8 ? (int)(M - m0) : 8;
        __m512 tot[8], acc[8];
        for (int m = 0; m < 8; m++) tot[m] = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            for (int m = 0; m < 8; m++) acc[m] = _mm512_setzero_ps();
            for (int64_t j = g * G / 2; j < (g + 1) * G / 2; j++) {
                __m512bh w = (__m512bh)_mm512_loadu_si512((const void *)(codes + j * 16));
                for (int m = 0; m < 8; m++) {
                    uint32_t pair;
                    memcpy(&pair, x + (m0 + (m < mc ? m : 0)) * ldx + 2 * j, 4);
                    acc[m] = _mm512_dpbf16_ps(acc[m], w, (__m512bh)_mm512_set1_epi32((int)pair));
                }
            }
            __m512 s = _mm512_loadu_ps(st + g * 16), sz = _mm512_loadu_ps(szt + g * 16);
            for (int m = 0; m < 8; m++)
                tot[m] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(a->xs[(m0 + (m < mc ? m : 0)) * groups + g]),
                                          _mm512_fmadd_ps(acc[m], s, tot[m]));
        }
        __m512 bias = _mm512_setzero_ps();
        if (a->b) {
            __m256i b16 = _mm256_maskz_loadu_epi16(live, (const uint16_t *)a->b + n0);
            bias = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b16), 16));
        }
        for (int m = 0; m < mc; m++) {  /* + bias, rounded to nearest even (NaN stays NaN), as f32_to_bf16 */
            __m512 v = _mm512_add_ps(tot[m], bias);
            __m512i bits = _mm512_castps_si512(v);
            __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
            __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
            r = _mm512_srli_epi32(r, 16);
            r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_srli_epi32(bits, 16),
                                     _mm512_set1_epi32(0x40));
            _mm256_mask_storeu_epi16((uint16_t *)a->y + (m0 + m) * a->ldy + n0, live, _mm512_cvtepi32_epi16(r));
        }
    }
}
#else
#define INT4_DOT 0
#endif

typedef void (*int4_rows_fn)(const int4_args *, int64_t, int64_t, int64_t);
ROWS_TABLE(int4_rows, int4_args, int4_rows_fn)  /* int4_rows_fns[log2 R][M - 1] */
#if INT4_DOT
ROWS_TABLE(int4_rows_dot, int4_args, int4_rows_fn)
#endif

/* Weight rows [n0, n1) against rows [m0, m0 + M) of x (M <= INT4_ROWS): as many as possible R at a time
 * (R * M <= INT4_SUMS), then the rest one by one. */
static void int4_block(const int4_args *a, int64_t n0, int64_t n1, int64_t m0, int M) {
    const int4_rows_fn (*fns)[8] = int4_rows_fns;
#if INT4_DOT
    if (a->xb) fns = int4_rows_dot_fns;
#endif
    int wide = INT4_SUMS / M >= 4 ? 2 : INT4_SUMS / M >= 2 ? 1 : 0;  /* R = 4, 2 or 1 weight rows at once */
    int64_t split = n0 + (n1 - n0) / (1 << wide) * (1 << wide);
    if (split > n0) fns[wide][M - 1](a, n0, split, m0);
    if (split < n1) fns[0][M - 1](a, split, n1, m0);
}

#if INT4_DOT
/* One row of bfloat16 x in xb's order (below), 128 columns at a time: destination vector j of a chunk takes
 * columns 8 (e / 2) + j + 4 (e % 2), e = 0..31, from the chunk's four source vectors in two two-source
 * permutes (e < 16 reads columns 0..63, e >= 16 columns 64..127). Columns past K load as zero. */
static void int4_reorder_row(const uint16_t *row, int64_t K, int64_t Kp, uint16_t *xb) {
    uint16_t order[32];
    for (int e = 0; e < 32; e++) order[e] = (uint16_t)((8 * (e / 2) + 4 * (e % 2)) & 63);
    const __m512i base = _mm512_loadu_si512((const void *)order);
    for (int64_t k0 = 0; k0 < Kp; k0 += INT4_CHUNK) {
        __m512i v[4];
        for (int i = 0; i < 4; i++) {
            const int64_t left = K - (k0 + 32 * i);
            const __mmask32 live = left >= 32 ? 0xffffffffu : left <= 0 ? 0u : (__mmask32)((1ull << left) - 1);
            v[i] = _mm512_maskz_loadu_epi16(live, row + k0 + 32 * i);
        }
        for (int j = 0; j < 4; j++) {
            const __m512i idx = _mm512_add_epi16(base, _mm512_set1_epi16((short)j));
            const __m512i lo = _mm512_permutex2var_epi16(v[0], idx, v[1]), hi = _mm512_permutex2var_epi16(v[2], idx, v[3]);
            _mm512_storeu_si512((void *)(xb + k0 + 32 * j), _mm512_mask_blend_epi16(0xffff0000u, lo, hi));
        }
    }
}
#endif

/* Row m of x: its group sums into xs; then x into xd for the float path, each 32-column block as its 16 even
 * columns then its 16 odd ones, or into xb for the dot path: in each chunk of 128 columns, column 8l + p goes
 * to 32 (p % 4) + 2l + p / 4, and columns K .. Kp are zero (the tiles of int4_tile_dot need neither). With
 * AVX-512 the group sums add 16 columns a lane (G is a multiple of 32), and the dot path's order is built by
 * int4_reorder_row: a decode call's copy of x costs ~0.1 us per 1000 columns instead of ~1.5. */
static void int4_prepare(const void *x, int64_t ldx, int f32, int64_t m, const int4_args *a, float *xd,
                         uint16_t *xb, float *xs) {
    const int64_t K = a->K, G = a->G;
    const char *xrow = (const char *)x + m * ldx * (f32 ? 4 : 2);
    for (int64_t g = 0; g < K / G; g++) {
#if defined(__AVX512F__)
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = g * G; k < (g + 1) * G; k += 16) acc = _mm512_add_ps(acc, elem_load16(xrow, k, !f32));
        xs[m * (K / G) + g] = _mm512_reduce_add_ps(acc);
#else
        float s = 0.0f;
        for (int64_t k = g * G; k < (g + 1) * G; k++) s += elem_load(x, m * ldx + k, !f32);
        xs[m * (K / G) + g] = s;
#endif
    }
    if (xb) {
        const uint16_t *row = (const uint16_t *)x + m * ldx;
#if INT4_DOT
        int4_reorder_row(row, K, a->Kp, xb + m * a->Kp);
#else
        for (int64_t k = 0; k < a->Kp; k++)
            xb[m * a->Kp + (k & ~(int64_t)127) + (k & 3) * 32 + (k & 127) / 8 * 2 + (k & 7) / 4] = k < K ? row[k] : 0;
#endif
    } else if (xd) {
        for (int64_t k = 0; k < K; k++)
            xd[m * K + (k & ~(int64_t)31) + (k & 1) * 16 + (k & 31) / 2] = elem_load(x, m * ldx + k, !f32);
    }
}

/* Returns 0; -1 when K or G is out of range; -2 when the copy of x cannot be allocated. */
int gemm_int4(const void *x, int64_t ldx, int f32, const uint8_t *qw, const void *scales, const void *zeros,
              int sz_bf16, const void *b, void *y, int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t G, int threads) {
    if (!(G == 32 || G == 64 || G == 128 || G == 256) || K <= 0 || K % G != 0 || M < 0 || N < 0) return -1;
    if (M == 0 || N == 0) return 0;
    if (threads < 1) threads = 1;
    const int dot = INT4_DOT && !f32, tiled = dot && M > INT4_ROWS;  /* tiled: prefill through int4_tile_dot */
    const int64_t Kp = (K + INT4_CHUNK - 1) / INT4_CHUNK * INT4_CHUNK;
    /* per copy of x: the reordered x (none when tiled), then its group sums */
    size_t x_bytes = tiled ? 0 : ((dot ? (size_t)(M * Kp) * 2 : (size_t)(M * K) * 4) + 63) & ~(size_t)63;
    size_t copy_bytes = (x_bytes + (size_t)(M * (K / G)) * 4 + 63) & ~(size_t)63;
    /* decode (M <= INT4_ROWS): every thread makes its own copy of x, which costs less than waiting for one */
    const int own_copy = M <= INT4_ROWS;
    size_t work_bytes = tiled ? ((size_t)(K / 2 * 16 + 2 * (K / G) * 16) * 4 + 63) & ~(size_t)63 : 0;
    size_t copies = own_copy ? (size_t)threads : 1;
    char *buf = aligned_alloc(64, copy_bytes * copies + work_bytes * (size_t)threads);
    if (!buf) return -2;
    /* with few rows of x, each thread takes one contiguous block of weight rows (a multiple of 4 of them);
       with more, tiles of INT4_TILE rows are reused from cache across all rows of x (int4_tile_dot takes no
       more than INT4_TILE rows, whatever M is) */
    int64_t tile = own_copy && !tiled ? ((N + threads - 1) / threads + 3) / 4 * 4 : INT4_TILE;
    int64_t tiles = (N + tile - 1) / tile;
#pragma omp parallel num_threads(threads)
    {
        int thread = 0;
#ifdef _OPENMP
        thread = omp_get_thread_num();
#endif
        char *copy = buf + copy_bytes * (own_copy ? (size_t)thread : 0);
        float *xs = (float *)(copy + x_bytes);
        float *xd = dot || tiled ? NULL : (float *)copy;
        uint16_t *xb = dot && !tiled ? (uint16_t *)copy : NULL;
        int4_args a = {xd, xb, xs, qw, scales, zeros, sz_bf16, K, Kp, G, b, y, ldy, f32};
        if (own_copy) {
            for (int64_t m = 0; m < M; m++) int4_prepare(x, ldx, f32, m, &a, xd, xb, xs);
        } else {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) int4_prepare(x, ldx, f32, m, &a, xd, xb, xs);
        }
#pragma omp for schedule(static) nowait
        for (int64_t t = 0; t < tiles; t++) {
            int64_t n0 = t * tile, n1 = n0 + tile < N ? n0 + tile : N;
#if INT4_DOT
            if (tiled) {
                uint32_t *work = (uint32_t *)(buf + copy_bytes * copies + work_bytes * (size_t)thread);
                int4_tile_dot(&a, (const uint16_t *)x, ldx, M, n0, (int)(n1 - n0), work);
                continue;
            }
#endif
            for (int64_t m0 = 0; m0 < M; m0 += INT4_ROWS)
                int4_block(&a, n0, n1, m0, M - m0 < INT4_ROWS ? (int)(M - m0) : INT4_ROWS);
        }
    }
    free(buf);
    return 0;
}
