/* Decode attention on the CPU: one new token per sequence, appended to the KV cache and attended, in one call.
 *
 *   q      (B, Hq, 1, D)     the new token's queries; k, v (B, Hkv, 1, D|Dv) its keys and values
 *   kc, vc (B, Hkv, L, D|Dv) the caches' first L slots; slot L - 1 receives k and v
 *   mask   (B, L) int64      0 for a padded slot
 *   out    (B, Hq, 1, Dv)
 *
 * The query (at slot L - 1) sees slot j when mask[b, j] != 0 and, with window W > 0, L - 1 - j < W; one that
 * sees nothing gets zeros. Query head h reads kv head h / (Hq / Hkv). Every tensor is float32 or every one
 * bfloat16 (`bf16` != 0), each with its last dim contiguous and the strides given in elements. Scores,
 * softmax and the weighted sum of values are float32; the output is rounded once.
 *
 * Why: PyTorch's CPU flash attention spends ~140 us on a decode call of a small model (one query row per
 * head against a hundred keys), most of it set-up; the work itself is a few microseconds. Threads (OpenMP,
 * torch's runtime) take whole (sequence, kv head) pairs once the call is big enough to pay for them (a few
 * thousand multiply-adds: SmolLM's 9 heads at 48 keys went from 9.5 to 7-8 us a call on 2 threads). The
 * softmax weights are taken 16 at a time with AVX-512 (vmath.h's exp512, within 2 ulp of expf).
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include "bf16.h"
#include "vmath.h"

#define ATTN_STACK_SCORES 4096  /* keys whose scores fit on the stack; longer caches allocate */
#define ATTN_MAX_HEAD_DIM 512
#define ATTN_PARALLEL_WORK (1 << 13)  /* multiply-adds below which one thread does the call */

/* row[0..n) as float32 into dst */
static inline void load_row(float *dst, const void *src, int64_t n, int bf16) {
    if (!bf16) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    const uint16_t *s = (const uint16_t *)src;
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
}

static inline float bf16_round(float v) { return bf16_to_f32(f32_to_bf16(v)); }

static inline void copy_row(void *dst, const void *src, int64_t n, int bf16) {
    memcpy(dst, src, (size_t)n * (bf16 ? 2 : 4));
}

/* sum_i q[i] * key[i], q float32, key in the cache's dtype */
static inline float dot(const float *q, const void *key, int64_t n, int bf16) {
    int64_t i = 0;
    float sum = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), elem_load16(key, i, bf16), acc);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) sum += q[i] * elem_load(key, i, bf16);
    return sum;
}

/* acc[0..n) += p * value[0..n) */
static inline void axpy(float *acc, float p, const void *value, int64_t n, int bf16) {
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 pv = _mm512_set1_ps(p);
    for (; i + 16 <= n; i += 16) {
        _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, elem_load16(value, i, bf16), _mm512_loadu_ps(acc + i)));
    }
#endif
    for (; i < n; i++) acc[i] += p * elem_load(value, i, bf16);
}

static inline void store_row(void *dst, const float *src, int64_t n, int bf16) {
    if (!bf16) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    uint16_t *d = (uint16_t *)dst;
    for (int64_t i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
}

/* One query head (qf, float32) against slots lo..L-1 of one kv head: acc[0..Dv) = softmax(scale q.k) . v, or zeros
 * when no slot is visible. */
static void attend_head(int bf16, const float *qf, const char *kb, int64_t kcs, const char *vb, int64_t vcs,
                        const int64_t *visible, int64_t lo, int64_t L, int64_t D, int64_t Dv, float scale,
                        float *scores, float *acc) {
    const int64_t es = bf16 ? 2 : 4;
    float best = -INFINITY;
    for (int64_t j = lo; j < L; j++) {
        float s = visible[j] ? scale * dot(qf, kb + j * kcs * es, D, bf16) : -INFINITY;
        scores[j - lo] = s;
        if (s > best) best = s;
    }
    memset(acc, 0, (size_t)Dv * sizeof(float));
    if (best == -INFINITY) return;
    /* the weights e^(s - best) in place of the scores (0 for a slot not seen), then their sum */
    const int64_t n = L - lo;
    float total = 0.0f;
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 top = _mm512_set1_ps(best), none = _mm512_set1_ps(-INFINITY);
    __m512 sum = _mm512_setzero_ps();
    for (; i < n; i += 16) {
        const __mmask16 live = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 s = _mm512_maskz_loadu_ps(live, scores + i);
        const __mmask16 seen = _mm512_mask_cmp_ps_mask(live, s, none, _CMP_NEQ_OQ);
        const __m512 p = _mm512_maskz_mov_ps(seen, exp512(_mm512_sub_ps(s, top)));
        _mm512_mask_storeu_ps(scores + i, live, p);
        sum = _mm512_add_ps(sum, p);
    }
    total = _mm512_reduce_add_ps(sum);
#endif
    for (; i < n; i++) {
        const float p = scores[i] == -INFINITY ? 0.0f : expf(scores[i] - best);
        scores[i] = p;
        total += p;
    }
    for (int64_t j = lo; j < L; j++)
        if (scores[j - lo] != 0.0f) axpy(acc, scores[j - lo], vb + j * vcs * es, Dv, bf16);
    const float inv = 1.0f / total;
    for (int64_t i = 0; i < Dv; i++) acc[i] *= inv;
}

/* The rotate-half rotary embedding of one head, as `lmforge::rotary` computes it: in bfloat16, rounded after
 * each op (x * cos, rotate_half(x) * sin, their sum); in float32, plainly. Into dst (float32). */
static void rotate_head(float *dst, const void *x, const void *cs, const void *sn, int64_t D, int bf16) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < D; i++) {
        float xi = elem_load(x, i, bf16), c = elem_load(cs, i, bf16), s = elem_load(sn, i, bf16);
        float r = i < half ? -elem_load(x, i + half, bf16) : elem_load(x, i - half, bf16);
        dst[i] = bf16 ? bf16_round(bf16_round(xi * c) + bf16_round(r * s)) : xi * c + r * s;
    }
}

/* Both entry points: q, k, v heads at the given strides (elements); with cs/sn (batch stride csb, 0: one row for
 * all), q and k are rotated first. Returns 0, -1 on sizes it does not take, -2 when out of memory. */
static int decode(int bf16, const void *q, int64_t qsb, int64_t qsh, const void *k, int64_t ksb, int64_t ksh,
                  const void *v, int64_t vsb, int64_t vsh, const void *cs, const void *sn, int64_t csb, void *kc,
                  int64_t kcb, int64_t kch, int64_t kcs, void *vc, int64_t vcb, int64_t vch, int64_t vcs,
                  const int64_t *mask, int64_t msb, float scale, int64_t window, void *out, int64_t osb, int64_t osh,
                  int64_t B, int64_t Hq, int64_t Hkv, int64_t L, int64_t D, int64_t Dv, int threads) {
    if (D > ATTN_MAX_HEAD_DIM || Dv > ATTN_MAX_HEAD_DIM || Hkv <= 0 || Hq % Hkv != 0 || L <= 0 || (cs && D % 2))
        return -1;
    const int64_t G = Hq / Hkv, es = bf16 ? 2 : 4;
    const int64_t lo = (window > 0 && window < L) ? L - window : 0;
    const int64_t tasks = B * Hkv;
    const int parallel = threads > 1 && tasks > 1 && B * Hq * (L - lo) * (D + Dv) >= ATTN_PARALLEL_WORK;
    int failed = 0;
#pragma omp parallel for num_threads(threads) if (parallel) schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t b = t / Hkv, h = t % Hkv;
        const char *c = cs ? (const char *)cs + b * csb * es : NULL, *s = sn ? (const char *)sn + b * csb * es : NULL;
        char *kb = (char *)kc + (b * kcb + h * kch) * es, *vb = (char *)vc + (b * vcb + h * vch) * es;
        float qf[ATTN_MAX_HEAD_DIM], acc[ATTN_MAX_HEAD_DIM];
        const char *k_new = (const char *)k + (b * ksb + h * ksh) * es;
        if (c) {  /* the rotated key, rounded to the cache's dtype, into slot L - 1 */
            rotate_head(qf, k_new, c, s, D, bf16);
            store_row(kb + (L - 1) * kcs * es, qf, D, bf16);
        } else {
            copy_row(kb + (L - 1) * kcs * es, k_new, D, bf16);
        }
        copy_row(vb + (L - 1) * vcs * es, (const char *)v + (b * vsb + h * vsh) * es, Dv, bf16);
        const int64_t *visible = mask + b * msb;
        float stack_scores[ATTN_STACK_SCORES];
        float *scores = L - lo <= ATTN_STACK_SCORES ? stack_scores : malloc((size_t)(L - lo) * sizeof(float));
        if (scores == NULL) {
            failed = 1;
            continue;
        }
        for (int64_t g = 0; g < G; g++) {
            const int64_t head = h * G + g;
            const char *q_head = (const char *)q + (b * qsb + head * qsh) * es;
            if (c)
                rotate_head(qf, q_head, c, s, D, bf16);
            else
                load_row(qf, q_head, D, bf16);
            attend_head(bf16, qf, kb, kcs, vb, vcs, visible, lo, L, D, Dv, scale, scores, acc);
            store_row((char *)out + (b * osb + head * osh) * es, acc, Dv, bf16);
        }
        if (scores != stack_scores) free(scores);
    }
    return failed ? -2 : 0;
}

int attention_decode(int bf16, const void *q, int64_t qsb, int64_t qsh, const void *k, int64_t ksb, int64_t ksh,
                     const void *v, int64_t vsb, int64_t vsh, void *kc, int64_t kcb, int64_t kch, int64_t kcs,
                     void *vc, int64_t vcb, int64_t vch, int64_t vcs, const int64_t *mask, int64_t msb, float scale,
                     int64_t window, void *out, int64_t osb, int64_t osh, int64_t B, int64_t Hq, int64_t Hkv,
                     int64_t L, int64_t D, int64_t Dv, int threads) {
    return decode(bf16, q, qsb, qsh, k, ksb, ksh, v, vsb, vsh, NULL, NULL, 0, kc, kcb, kch, kcs, vc, vcb, vch, vcs,
                  mask, msb, scale, window, out, osb, osh, B, Hq, Hkv, L, D, Dv, threads);
}

/* The same for a fused q/k/v projection's output, with the rotary embedding of q and k done here:
 *   qkv (B, 1, Hq * D + Hkv * D + Hkv * Dv), batch stride qsb: q heads, then k heads, then v heads
 *   cs, sn (B or 1, D), batch stride csb (0: one row for all), or NULL: no rotary (GPT-2)
 *   out (B, 1, Hq * Dv) contiguous
 * Returns 0, -1 on sizes it does not take, -2 when out of memory. */
int qkv_attention_decode(int bf16, const void *qkv, int64_t qsb, const void *cs, const void *sn, int64_t csb, void *kc,
                         int64_t kcb, int64_t kch, int64_t kcs, void *vc, int64_t vcb, int64_t vch, int64_t vcs,
                         const int64_t *mask, int64_t msb, float scale, int64_t window, void *out, int64_t B,
                         int64_t Hq, int64_t Hkv, int64_t L, int64_t D, int64_t Dv, int threads) {
    const int64_t es = bf16 ? 2 : 4;
    const char *k = (const char *)qkv + Hq * D * es, *v = k + Hkv * D * es;
    return decode(bf16, qkv, qsb, D, k, qsb, D, v, qsb, Dv, cs, sn, csb, kc, kcb, kch, kcs, vc, vcb, vch, vcs, mask,
                  msb, scale, window, out, Hq * Dv, Dv, B, Hq, Hkv, L, D, Dv, threads);
}
