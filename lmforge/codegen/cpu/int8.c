/* The int8 weight-only matmul: y = x W^T (+ b), W stored as int8 codes with one float32 scale per output row.
 *
 *   x       (M, K) bfloat16 or float32 (`f32`), row stride ldx      any M; decode is M = 1..8
 *   qw      (N, K) int8, contiguous
 *   scales  (N,) float32
 *   b       (N,) in x's dtype, or NULL
 *   y       (M, N) in x's dtype, row stride ldy
 *
 *   y[m, n] = scales[n] * sum_k qw[n, k] x[m, k] + b[n],  summed in float32, rounded once to y's dtype
 *
 * x is copied once per call, as float32, its rows zero-padded to a multiple of 32 columns (each thread makes
 * its own copy at decode sizes, which costs less than waiting for one). Per weight row, 16 codes at a time
 * become float32 lanes (vpmovsxbd, vcvtdq2ps: exact) and meet every row of x in FMAs, so the products are
 * those of the dequantized weight (q * x exact, the scale applied once at the end). R weight rows are taken
 * at once (4 for one row of x, 2 for two, 1 for more), two sums each, so that eight or more chains of FMAs
 * are in flight; the next block of R rows is prefetched in address order (R interleaved streams of short
 * rows escape the hardware prefetcher, as in int4.c). A larger M runs in chunks of INT8_ROWS rows of x over
 * tiles of INT8_TILE weight rows that stay in cache. Threads take contiguous blocks of weight rows. Calls of
 * INT8_DOT_ROWS rows or more of bfloat16 x take the dot path instead (AVX512-BF16: x copied as bfloat16, codes
 * made bfloat16 for vdpbf16ps; see int8_rows_dot). Without AVX-512 the same loops run in plain C. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#include "bf16.h"
#include "rows.h"

#define INT8_ROWS 8   /* rows of x per pass over a weight row */
#define INT8_TILE 16  /* weight rows reused from cache across chunks of x when M > INT8_ROWS */
#define INT8_STEP 32  /* columns per step: x's rows are padded to a multiple of it */
#ifndef INT8_DOT_ROWS
#define INT8_DOT_ROWS 8  /* bfloat16 x with at least this many rows takes the dot path where there is one */
#endif

typedef struct {
    const float *xf;     /* float path: (M, Kp) float32 copy of x */
    const uint16_t *xb;  /* dot path: (M, Kp) bfloat16 copy of x */
    const int8_t *qw;
    const float *scales;
    int64_t K, Kp;
    const void *b;       /* (N,) in x's dtype, or NULL */
    void *y;             /* (M, N) in x's dtype, row stride ldy */
    int64_t ldy;
    int f32;             /* x, b and y are float32 (else bfloat16) */
} int8_args;

/* y[m, n] = acc * scales[n] + b[n], rounded to y's dtype */
static inline void int8_store(const int8_args *a, int64_t m, int64_t n, float acc) {
    float v = acc * a->scales[n] + (a->b ? elem_load(a->b, n, !a->f32) : 0.0f);
    elem_store(a->y, m * a->ldy + n, v, !a->f32);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define INT8_SIMD 1
/* codes k .. k + 15 of a row as float32 lanes; those of `live` only (the others 0, their bytes not read) */
static inline __m512 int8_codes(const int8_t *row, int64_t k, __mmask16 live) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(live, row + k)));
}

static inline __mmask16 int8_live(int64_t K, int64_t k) {
    return K - k >= 16 ? (__mmask16)0xffff : K <= k ? (__mmask16)0 : (__mmask16)((1u << (K - k)) - 1);
}

/* y[m0 + m, n] for m < M and n in [n0, n1), R weight rows at a time (R divides n1 - n0); R and M are
 * compile-time constants once inlined */
static inline __attribute__((always_inline)) void int8_rows(const int8_args *a, int64_t n0, int64_t n1, int64_t m0,
                                                             int R, int M) {
    const int64_t K = a->K, Kp = a->Kp, full = K / INT8_STEP * INT8_STEP;
    const float *xf = a->xf + m0 * Kp;
    for (int64_t n = n0; n < n1; n += R) {
        __m512 s0[4][INT8_ROWS], s1[4][INT8_ROWS];
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++) s0[r][m] = s1[r][m] = _mm512_setzero_ps();
        const int8_t *rows = a->qw + n * K;
        for (int64_t k = 0; k < Kp; k += INT8_STEP) {
            if (k % 64 == 0)  /* the next block of R rows, one line per row every 64 columns */
                for (int r = 0; r < R; r++) __builtin_prefetch(rows + R * K + (k / 64 * R + r) * 64);
            const __mmask16 lo = k < full ? (__mmask16)0xffff : int8_live(K, k);
            const __mmask16 hi = k < full ? (__mmask16)0xffff : int8_live(K, k + 16);
            for (int r = 0; r < R; r++) {
                const __m512 w0 = int8_codes(rows + r * K, k, lo), w1 = int8_codes(rows + r * K, k + 16, hi);
                for (int m = 0; m < M; m++) {
                    s0[r][m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xf + m * Kp + k), s0[r][m]);
                    s1[r][m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xf + m * Kp + k + 16), s1[r][m]);
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++)
                int8_store(a, m0 + m, n + r, _mm512_reduce_add_ps(_mm512_add_ps(s0[r][m], s1[r][m])));
    }
}
#else
#define INT8_SIMD 0
#endif

#if INT8_SIMD && defined(__AVX512BF16__)
#define INT8_DOT 1
/* Dot path (bfloat16 x, AVX512-BF16, calls of INT8_DOT_ROWS rows or more): the same sums with 32 codes a step made
 * bfloat16 (exact: |q| <= 127 has 7 significant bits, bfloat16 8) and multiplied with x's pairs by vdpbf16ps, one
 * instruction per row of x where the float path takes two FMAs and two loads. Making the codes bfloat16 costs
 * more than widening them to float32 (vcvtne2ps2bf16 on top), so it pays only with many rows of x: measured on a
 * 2-core Xeon (2 threads), M = 8 at K = 2048-8192 1.3-1.4x faster than the float path, the same at K = 576;
 * M = 1-4 1.1-1.6x slower. */
static inline __attribute__((always_inline)) void int8_rows_dot(const int8_args *a, int64_t n0, int64_t n1,
                                                                 int64_t m0, int R, int M) {
    const int64_t K = a->K, Kp = a->Kp, full = K / INT8_STEP * INT8_STEP;
    const uint16_t *xb = a->xb + m0 * Kp;
    for (int64_t n = n0; n < n1; n += R) {
        __m512 s[4][INT8_ROWS];
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++) s[r][m] = _mm512_setzero_ps();
        const int8_t *rows = a->qw + n * K;
        for (int64_t k = 0; k < Kp; k += INT8_STEP) {
            if (k % 64 == 0)
                for (int r = 0; r < R; r++) __builtin_prefetch(rows + R * K + (k / 64 * R + r) * 64);
            const __mmask16 lo = k < full ? (__mmask16)0xffff : int8_live(K, k);
            const __mmask16 hi = k < full ? (__mmask16)0xffff : int8_live(K, k + 16);
            for (int r = 0; r < R; r++) {
                const __m512bh w = _mm512_cvtne2ps_pbh(int8_codes(rows + r * K, k + 16, hi),
                                                       int8_codes(rows + r * K, k, lo));  /* low half: k .. k + 15 */
                for (int m = 0; m < M; m++)
                    s[r][m] = _mm512_dpbf16_ps(s[r][m], w, (__m512bh)_mm512_loadu_si512((const void *)(xb + m * Kp + k)));
            }
        }
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++) int8_store(a, m0 + m, n + r, _mm512_reduce_add_ps(s[r][m]));
    }
}
#else
#define INT8_DOT 0
#endif

#if !INT8_SIMD
static inline __attribute__((always_inline)) void int8_rows(const int8_args *a, int64_t n0, int64_t n1, int64_t m0,
                                                             int R, int M) {
    const int64_t K = a->K, Kp = a->Kp;
    for (int64_t n = n0; n < n1; n++)
        for (int m = 0; m < M; m++) {
            const int8_t *w = a->qw + n * K;
            const float *xv = a->xf + (m0 + m) * Kp;
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc += (float)w[k] * xv[k];
            int8_store(a, m0 + m, n, acc);
        }
    (void)R;
}
#endif

typedef void (*int8_rows_fn)(const int8_args *, int64_t, int64_t, int64_t);
ROWS_TABLE(int8_rows, int8_args, int8_rows_fn)  /* int8_rows_fns[log2 R][M - 1] */
#if INT8_DOT
ROWS_TABLE(int8_rows_dot, int8_args, int8_rows_fn)
#endif

/* log2 of the weight rows taken at once for M rows of x: eight sums or more in flight (the float path keeps two
 * per pair of rows) */
static const int int8_wide[INT8_ROWS] = {2, 1, 0, 0, 0, 0, 0, 0};
static const int int8_wide_dot[INT8_ROWS] = {2, 2, 1, 1, 0, 0, 0, 0};

/* Weight rows [n0, n1) against rows [m0, m0 + M) of x (M <= INT8_ROWS): R at a time, then the rest one by one */
static void int8_block(const int8_args *a, int64_t n0, int64_t n1, int64_t m0, int M) {
    const int8_rows_fn (*fns)[INT8_ROWS] = int8_rows_fns;
    int wide = int8_wide[M - 1];
#if INT8_DOT
    if (a->xb) fns = int8_rows_dot_fns, wide = int8_wide_dot[M - 1];
#endif
    const int64_t split = n0 + (n1 - n0) / (1 << wide) * (1 << wide);
    if (split > n0) fns[wide][M - 1](a, n0, split, m0);
    if (split < n1) fns[0][M - 1](a, split, n1, m0);
}

/* row m of x into xf (M, Kp) as float32, or, for the dot path, into xb (M, Kp) as bfloat16; zero past K */
static void int8_prepare(const void *x, int64_t ldx, int f32, int64_t m, int64_t K, int64_t Kp, float *xf,
                         uint16_t *xb) {
    if (xb) {
        memcpy(xb + m * Kp, (const uint16_t *)x + m * ldx, (size_t)K * 2);
        memset(xb + m * Kp + K, 0, (size_t)(Kp - K) * 2);
        return;
    }
    float *out = xf + m * Kp;
    int64_t k = 0;
#if defined(__AVX512F__)
    const char *row = (const char *)x + m * ldx * (f32 ? 4 : 2);
    for (; k + 16 <= K; k += 16) _mm512_storeu_ps(out + k, elem_load16(row, k, !f32));
#endif
    for (; k < K; k++) out[k] = elem_load(x, m * ldx + k, !f32);
    memset(out + K, 0, (size_t)(Kp - K) * sizeof(float));
}

/* Returns 0; -1 when a size is out of range; -2 when the copy of x cannot be allocated. */
int gemm_int8(const void *x, int64_t ldx, int f32, const int8_t *qw, const float *scales, const void *b, void *y,
              int64_t ldy, int64_t M, int64_t N, int64_t K, int threads) {
    if (K <= 0 || M < 0 || N < 0) return -1;
    if (M == 0 || N == 0) return 0;
    if (threads < 1) threads = 1;
    const int64_t Kp = (K + INT8_STEP - 1) / INT8_STEP * INT8_STEP;
    const int own_copy = M <= INT8_ROWS, dot = INT8_DOT && !f32 && M >= INT8_DOT_ROWS;
    const size_t copy_bytes = ((size_t)(M * Kp) * (dot ? 2 : 4) + 63) & ~(size_t)63;
    const size_t copies = own_copy ? (size_t)threads : 1;
    char *buf = aligned_alloc(64, copy_bytes * copies);
    if (!buf) return -2;
    /* with few rows of x, each thread takes one contiguous block of weight rows (a multiple of 4 of them);
       with more, tiles of INT8_TILE rows are reused from cache across all rows of x */
    const int64_t tile = own_copy ? ((N + threads - 1) / threads + 3) / 4 * 4 : INT8_TILE;
    const int64_t tiles = (N + tile - 1) / tile;
#pragma omp parallel num_threads(threads)
    {
        int thread = 0;
#ifdef _OPENMP
        thread = omp_get_thread_num();
#endif
        char *copy = buf + copy_bytes * (own_copy ? (size_t)thread : 0);
        float *xf = dot ? NULL : (float *)copy;
        uint16_t *xb = dot ? (uint16_t *)copy : NULL;
        int8_args a = {xf, xb, qw, scales, K, Kp, b, y, ldy, f32};
        if (own_copy) {
            for (int64_t m = 0; m < M; m++) int8_prepare(x, ldx, f32, m, K, Kp, xf, xb);
        } else {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) int8_prepare(x, ldx, f32, m, K, Kp, xf, xb);
        }
#pragma omp for schedule(static) nowait
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t n0 = t * tile, n1 = n0 + tile < N ? n0 + tile : N;
            for (int64_t m0 = 0; m0 < M; m0 += INT8_ROWS)
                int8_block(&a, n0, n1, m0, M - m0 < INT8_ROWS ? (int)(M - m0) : INT8_ROWS);
        }
    }
    free(buf);
    return 0;
}

int int8_simd(void) { return INT8_SIMD; }
