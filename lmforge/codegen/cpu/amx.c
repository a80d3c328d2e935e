/* Prefill-sized matmuls on Intel AMX tiles: y = x W^T (+ b) for bfloat16 x with many rows, W bfloat16, int4 or
 * int8, the quantized weights dequantized to bfloat16 a block of rows at a time into a buffer that stays in cache.
 *
 *   amx_matmul(kind, x, ldx, w, scales, zeros, scales_bf16, G, b, y, ldy, M, N, K, threads)
 *       kind AMX_BF16: w (N, K) bfloat16;  AMX_INT4: w (N, K / 2) uint8 codes with scales/zeros as dequant.c
 *       takes them;  AMX_INT8: w (N, K) int8 with scales (N,) float32
 *       x (M, K) bfloat16 with row stride ldx; b (N,) bfloat16 or NULL; y (M, N) bfloat16 with row stride ldy
 *
 *   y[m, n] = sum_k bf16(W[n, k]) x[m, k] + b[n]: products exact, sums in float32 (AMX, denormals flushed),
 *   rounded once to bfloat16; for int4 bf16(W) as dequant.c rounds it (the numbers of PyTorch's matmul on the
 *   dequantized weight), for int8 the codes themselves (exact in bfloat16) with each row's scale applied to its
 *   sums, as int8.c does
 *
 * The tiles compute y transposed: a tile of 16 weight rows by 32 columns is the A operand, read straight from its
 * rows (no repacking of the large operand), and x, copied once per call into the pair-interleaved B layout
 * (rows: pairs of columns k; columns: 16 rows of x, zero-padded), is the B operand. int4 rows are dequantized in
 * nibble order (dequant.h: half the shuffles of column order) and x's columns are permuted to match: a dot
 * product does not depend on the order of its terms. Each step multiplies two
 * blocks of 16 weight rows with two blocks of 16 rows of x into four accumulator tiles (all eight tiles in use);
 * the accumulators' 16 x 16 sums are read back transposed (gathers) into y's rows. Threads take contiguous runs
 * of 32 weight rows; quantized (or ragged) rows are dequantized into the thread's buffer of 32 x K bfloat16
 * first, once per call, and reused by every block of rows of x.
 *
 * `amx_available()` says whether this build has AMX and the kernel may use it (Linux grants a process the tile
 * state on request: the first call asks for it). Returns 0, -1 without AMX or on sizes it does not take, -2
 * without memory for its buffers. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "dequant.h"

enum { AMX_BF16 = 0, AMX_INT4 = 1, AMX_INT8 = 2 };

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && \
    defined(__linux__)
#define AMX 1
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

static int amx_granted = -1;  /* -1 not asked yet, 0 refused, 1 granted */

int amx_available(void) {
    if (amx_granted < 0) {
        unsigned a, b, c, d;
        __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
        const int has = (d >> 22 & 1) && (d >> 24 & 1);  /* AMX-BF16, AMX-TILE */
        amx_granted = has && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }
    return amx_granted;
}

/* tiles 0-3 accumulators C[i][j] (weight block i, x block j), 4-5 the weight blocks, 6-7 the x blocks */
static void amx_configure(void) {
    amx_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* the column of x that column k of a nibble-ordered int4 row holds (dequant_int4_64_nibbles): per step of 64
 * columns (or the half step that ends a row), the even columns, then the odd ones */
static inline int64_t amx_nibble_col(int64_t k, int64_t K) {
    const int64_t base = k & ~(int64_t)63, off = k & 63, width = base + 64 > K ? 32 : 64;
    return off < width / 2 ? base + 2 * off : base + 2 * (off - width / 2) + 1;
}

/* row m of x, its columns in the weight rows' order (nibble order for int4, `nibbles`), zero-padded to Kp */
static void amx_order_row(const uint16_t *x, int64_t K, int64_t Kp, int nibbles, uint16_t *out) {
    int64_t k = 0;
    if (nibbles) {  /* K a multiple of 32 */
        const __m512i even = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28,
                                              26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
        for (; k + 64 <= K; k += 64) {
            const __m512i lo = _mm512_loadu_si512(x + k), hi = _mm512_loadu_si512(x + k + 32);
            _mm512_storeu_si512(out + k, _mm512_permutex2var_epi16(lo, even, hi));
            _mm512_storeu_si512(out + k + 32, _mm512_permutex2var_epi16(lo, odd, hi));
        }
        if (k < K) {  /* half a step: 16 even columns, then 16 odd ones */
            const __m512i halves = _mm512_inserti64x4(even, _mm512_castsi512_si256(odd), 1);
            _mm512_storeu_si512(out + k, _mm512_permutexvar_epi16(halves, _mm512_loadu_si512(x + k)));
            k += 32;
        }
    } else {
        for (; k + 32 <= K; k += 32) _mm512_storeu_si512(out + k, _mm512_loadu_si512(x + k));
        if (k < K) {
            const __mmask32 live = (__mmask32)((1ull << (K - k)) - 1);
            _mm512_storeu_si512(out + k, _mm512_maskz_loadu_epi16(live, x + k));
            k += 32;
        }
    }
    for (; k < Kp; k += 32) _mm512_storeu_si512(out + k, _mm512_setzero_si512());
}

/* x (M, K) into the B layout: tile (j, s) holds xp[((j * S + s) * 16 + r) * 32 + 2 m + i] = x[16 j + m, c(32 s + 2 r + i)]
 * with c the identity, or the nibble order of int4 weights; zeros past M and K. The rows are put in order first
 * (xr, (16 J, Kp)), then each tile's 16 rows of 16 pairs are gathered into its 16 columns. */
static void amx_pack_x(const uint16_t *x, int64_t ldx, int64_t M, int64_t K, int64_t S, int64_t J, int nibbles,
                       uint16_t *xr, uint16_t *xp, int threads) {
    const int64_t Kp = 32 * S;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < 16 * J; m++) {
            if (m < M)
                amx_order_row(x + m * ldx, K, Kp, nibbles, xr + m * Kp);
            else
                memset(xr + m * Kp, 0, (size_t)Kp * 2);
        }
        const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                _mm512_set1_epi32((int)(Kp / 2)));
#pragma omp for schedule(static)
        for (int64_t js = 0; js < J * S; js++) {
            const int64_t j = js / S, s = js % S;
            const int *pairs = (const int *)(xr + 16 * j * Kp + 32 * s);
            uint32_t *tile = (uint32_t *)(xp + js * 512);
            for (int r = 0; r < 16; r++)
                _mm512_storeu_si512(tile + 16 * r, _mm512_i32gather_epi32(rows, pairs + r, 4));
        }
    }
}

/* y[m0 + m, n0 + n] for the 16 x 16 sums of a stored accumulator c[n][m] (valid: mr rows of x, nr weight rows),
 * times the rows' scales where there are some (int8), plus the bias */
static void amx_store(const float *c, const float *scales, const uint16_t *b, uint16_t *y, int64_t ldy, int64_t m0,
                      int64_t n0, int mr, int nr) {
    const __m512i cols = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(16));
    const __mmask16 live = (__mmask16)(nr >= 16 ? 0xffff : (1u << nr) - 1);
    const __m512 bias = b ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, b + n0)), 16))
                          : _mm512_setzero_ps();
    const __m512 scale = scales ? _mm512_maskz_loadu_ps(live, scales + n0) : _mm512_set1_ps(1.0f);
    for (int m = 0; m < mr; m++) {
        __m512 v = _mm512_i32gather_ps(_mm512_add_epi32(cols, _mm512_set1_epi32(m)), c, 4);
        if (scales) v = _mm512_mul_ps(v, scale);
        _mm256_mask_storeu_epi16(y + (m0 + m) * ldy + n0, live, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(v, bias)));
    }
}

/* the codes of an int8 row as bfloat16, exact (|q| <= 127 has 7 significant bits, bfloat16 8) */
static void amx_int8_row(const int8_t *row, int64_t K, uint16_t *out) {
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(row + k));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
        _mm512_storeu_si512(out + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    for (; k < K; k++) out[k] = f32_to_bf16((float)row[k]);
}

typedef struct {
    int kind;
    const void *w, *scales, *zeros;
    int scales_bf16;
    int64_t G;
    const uint16_t *b;
    uint16_t *y;
    int64_t ldy, M, N, K, S, J;
    const uint16_t *xp;
} amx_args;

/* weight rows n0 .. n0 + 31 (nr of them valid) against every block of rows of x */
static void amx_rows(const amx_args *a, int64_t n0, uint16_t *buf, float *c) {
    const int64_t K = a->K, Kp = a->S * 32, nr = a->N - n0 < 32 ? a->N - n0 : 32;
    const uint16_t *A;
    int64_t lda;
    if (a->kind == AMX_BF16 && K % 32 == 0 && nr == 32) {
        A = (const uint16_t *)a->w + n0 * K;  /* the weight rows themselves */
        lda = K;
    } else {
        if (nr < 32) memset(buf + nr * Kp, 0, (size_t)((32 - nr) * Kp) * 2);  /* rows past N */
        for (int64_t n = 0; n < nr; n++) {
            uint16_t *out = buf + n * Kp;
            if (a->kind == AMX_INT4)  /* K a multiple of 32: no columns past K */
                dequant_int4_row_nibbles((const uint8_t *)a->w + (n0 + n) * (K / 2), a->scales, a->zeros,
                                         a->scales_bf16, a->G, K, (n0 + n) * (K / a->G), out);
            else if (a->kind == AMX_INT8)
                amx_int8_row((const int8_t *)a->w + (n0 + n) * K, K, out);  /* scaled in amx_store */
            else
                memcpy(out, (const uint16_t *)a->w + (n0 + n) * K, (size_t)K * 2);
            if (Kp > K) memset(out + K, 0, (size_t)(Kp - K) * 2);
        }
        A = buf;
        lda = Kp;
    }
    for (int64_t j = 0; j < a->J; j += 2) {
        const int two = j + 1 < a->J;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const uint16_t *x0 = a->xp + j * a->S * 512, *x1 = x0 + a->S * 512;
        for (int64_t s = 0; s < a->S; s++) {
            _tile_loadd(4, A + s * 32, lda * 2);
            _tile_loadd(5, A + 16 * lda + s * 32, lda * 2);
            _tile_loadd(6, x0 + s * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(2, 5, 6);
            if (two) {
                _tile_loadd(7, x1 + s * 512, 64);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
        _tile_stored(0, c, 64);
        _tile_stored(2, c + 256, 64);
        if (two) {
            _tile_stored(1, c + 512, 64);
            _tile_stored(3, c + 768, 64);
        }
        for (int jj = 0; jj <= two; jj++) {
            const int64_t m0 = 16 * (j + jj);
            const int mr = a->M - m0 < 16 ? (int)(a->M - m0) : 16;
            for (int i = 0; i < 2 && 16 * i < nr; i++)
                amx_store(c + 512 * jj + 256 * i, a->kind == AMX_INT8 ? a->scales : NULL, a->b, a->y, a->ldy, m0,
                          n0 + 16 * i, mr,
                          (int)(nr - 16 * i < 16 ? nr - 16 * i : 16));
        }
    }
}

int amx_matmul(int kind, const uint16_t *x, int64_t ldx, const void *w, const void *scales, const void *zeros,
               int scales_bf16, int64_t G, const uint16_t *b, uint16_t *y, int64_t ldy, int64_t M, int64_t N,
               int64_t K, int threads) {
    if (!amx_available() || M < 1 || N < 1 || K < 1 || kind < AMX_BF16 || kind > AMX_INT8) return -1;
    if (kind == AMX_INT4 && (G < 32 || G % 32 != 0 || K % G != 0)) return -1;
    const int64_t S = (K + 31) / 32, J = (M + 15) / 16, blocks = (N + 31) / 32;
    uint16_t *xp = aligned_alloc(64, (size_t)(J * S) * 1024), *xr = aligned_alloc(64, (size_t)(J * S) * 1024);
    if (!xp || !xr) {
        free(xp);
        free(xr);
        return -2;
    }
    if (threads < 1) threads = 1;
    if (threads > blocks) threads = (int)blocks;
    amx_pack_x(x, ldx, M, K, S, J, kind == AMX_INT4, xr, xp, threads);
    free(xr);
    const amx_args a = {kind, w, scales, zeros, scales_bf16, G, b, y, ldy, M, N, K, S, J, xp};
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        T = omp_get_num_threads();
#endif
        const int64_t per = (blocks + T - 1) / T, first = t * per, last = first + per < blocks ? first + per : blocks;
        uint16_t *buf = aligned_alloc(64, (size_t)(32 * S * 32) * 2);
        float *c = aligned_alloc(64, 1024 * sizeof(float));
        if (!buf || !c) {
            failed = 1;
        } else if (first < last) {
            amx_configure();
            for (int64_t blk = first; blk < last; blk++) amx_rows(&a, 32 * blk, buf, c);
            _tile_release();
        }
        free(buf);
        free(c);
    }
    free(xp);
    return failed ? -2 : 0;
}
#else
#define AMX 0
int amx_available(void) { return 0; }

int amx_matmul(int kind, const uint16_t *x, int64_t ldx, const void *w, const void *scales, const void *zeros,
               int scales_bf16, int64_t G, const uint16_t *b, uint16_t *y, int64_t ldy, int64_t M, int64_t N,
               int64_t K, int threads) {
    (void)kind, (void)x, (void)ldx, (void)w, (void)scales, (void)zeros, (void)scales_bf16, (void)G, (void)b, (void)y,
        (void)ldy, (void)M, (void)N, (void)K, (void)threads;
    return -1;
}
#endif
