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
#ifdef _OPENMP
#include <omp.h>
#endif
#include "dequant.h"

static int dequant_threads(int threads, int64_t rows) {
    return threads < 1 ? 1 : rows < threads ? (rows < 1 ? 1 : (int)rows) : threads;
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
#define DEQUANT_INT4_BLOCK(a, b) \
    dequant_int4_rows(qw, scales, zeros, scales_bf16, G, K, a, b, (char *)out + (a - n0) * K * (out_bf16 ? 2 : 4), K, out_bf16)
    DEQUANT_SPLIT(threads, n0, n1, DEQUANT_INT4_BLOCK);
#undef DEQUANT_INT4_BLOCK
    return 0;
}

int dequant_int8(const int8_t *qw, const float *scales, int64_t K, int64_t n0, int64_t n1, void *out, int out_bf16,
                 int threads) {
    if (K <= 0 || n0 < 0 || n1 < n0) return -1;
#define DEQUANT_INT8_BLOCK(a, b) \
    dequant_int8_rows(qw, scales, K, a, b, (char *)out + (a - n0) * K * (out_bf16 ? 2 : 4), K, out_bf16)
    DEQUANT_SPLIT(threads, n0, n1, DEQUANT_INT8_BLOCK);
#undef DEQUANT_INT8_BLOCK
    return 0;
}
