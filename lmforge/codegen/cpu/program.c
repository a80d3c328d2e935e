/* A step program: the kernel calls of a decode step, run by one call from Python.
 *
 * A decode step of a small model is a few hundred kernel calls of a few microseconds each; made one at a time
 * from Python, each pays for the interpreter, ctypes' argument conversion and a fresh output tensor, which
 * together cost as much as the kernels. `cpu_program.py` records the calls once per input layout instead, as
 * `step_op`s over a table of buffer addresses, and `program_run` makes them here in order.
 *
 * An operand is (slot, byte offset): slots[slot] + offset, slot -1 meaning NULL. The caller refills the slots of
 * the step's inputs each call (the weights' and the scratch buffer's are fixed), and passes the number of
 * key/value slots the attention calls cover this step (`kv_len`). Every callee is an entry point of the other
 * files of this library, called with the arguments its Python wrapper in `cpu_gemv.py` would pass.
 */
#include <stdint.h>
#include <stddef.h>
#include <time.h>

#define STEP_REFS 8
#define STEP_INTS 20

enum {  /* STEP_KINDS in cpu_program.py, in this order */
    STEP_GEMV_BF16 = 1,
    STEP_GEMV_F32,
    STEP_INT4,
    STEP_INT4_Q8,
    STEP_RMS_NORM,
    STEP_ADD_RMS_NORM,
    STEP_GLU_SILU_BF16,
    STEP_GLU_GELU_TANH_BF16,
    STEP_GLU_SILU_F32,
    STEP_GLU_GELU_TANH_F32,
    STEP_QKV_ATTENTION,
    STEP_INT8,
    STEP_AMX,
};

typedef struct {
    int64_t kind;
    int64_t slot[STEP_REFS];
    int64_t offset[STEP_REFS];
    int64_t i[STEP_INTS];
    double f[2];
} step_op;

int gemv_bf16(const void *x, int64_t ldx, const void *w, const void *b, void *y, int64_t ldy, int64_t M, int64_t N,
              int64_t K, int threads);
int gemv_f32(const void *x, int64_t ldx, const void *w, const void *b, void *y, int64_t ldy, int64_t M, int64_t N,
             int64_t K, int threads);
int gemm_int4(const void *x, int64_t ldx, int f32, const void *qw, const void *scales, const void *zeros,
              int sz_bf16, const void *b, void *y, int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t G, int threads);
int gemv_int4_q8(const void *x, int64_t ldx, int f32, const void *qw, const void *scales, const void *zeros,
                 int sz_bf16, const void *b, void *y, int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t G, int threads);
int gemm_int8(const void *x, int64_t ldx, int f32, const void *qw, const void *scales, const void *b, void *y,
              int64_t ldy, int64_t M, int64_t N, int64_t K, int threads);
int amx_matmul(int kind, const uint16_t *x, int64_t ldx, const void *w, const void *scales, const void *zeros,
               int scales_bf16, int64_t G, const uint16_t *b, uint16_t *y, int64_t ldy, int64_t M, int64_t N,
               int64_t K, int threads);
int rms_norm_rows(int bf16, const void *x, int64_t ldx, const void *w, float eps, void *y, int64_t ldy, int64_t M,
                  int64_t K);
int add_rms_norm_rows(int bf16, const void *a, int64_t lda, const void *b, int64_t ldb, const void *w, float eps,
                      void *y, void *s, int64_t M, int64_t K);
int glu_silu_bf16(const void *g, int64_t ldg, const void *u, int64_t ldu, void *y, int64_t ldy, int64_t M, int64_t K);
int glu_gelu_tanh_bf16(const void *g, int64_t ldg, const void *u, int64_t ldu, void *y, int64_t ldy, int64_t M,
                       int64_t K);
int glu_silu_f32(const void *g, int64_t ldg, const void *u, int64_t ldu, void *y, int64_t ldy, int64_t M, int64_t K);
int glu_gelu_tanh_f32(const void *g, int64_t ldg, const void *u, int64_t ldu, void *y, int64_t ldy, int64_t M,
                      int64_t K);
int qkv_attention_decode(int bf16, const void *qkv, int64_t qsb, const void *cs, const void *sn, int64_t csb, void *kc,
                         int64_t kcb, int64_t kch, int64_t kcs, void *vc, int64_t vcb, int64_t vch, int64_t vcs,
                         const int64_t *mask, int64_t msb, float scale, int64_t window, void *out, int64_t B,
                         int64_t Hq, int64_t Hkv, int64_t L, int64_t D, int64_t Dv, int threads);

static int run_one(const step_op *o, void *const *slots, int64_t kv_len) {
    void *p[STEP_REFS];
    for (int r = 0; r < STEP_REFS; r++) p[r] = o->slot[r] < 0 ? NULL : (char *)slots[o->slot[r]] + o->offset[r];
    const int64_t *i = o->i;
    switch (o->kind) {
    case STEP_GEMV_BF16:  /* x, w, b, y; ldx, ldy, M, N, K, threads */
        return gemv_bf16(p[0], i[0], p[1], p[2], p[3], i[1], i[2], i[3], i[4], (int)i[5]);
    case STEP_GEMV_F32:
        return gemv_f32(p[0], i[0], p[1], p[2], p[3], i[1], i[2], i[3], i[4], (int)i[5]);
    case STEP_INT4:  /* x, qweight, scales, zeros, b, y; ldx, f32, ldy, M, N, K, G, threads, sz_bf16 */
        return gemm_int4(p[0], i[0], (int)i[1], p[1], p[2], p[3], (int)i[8], p[4], p[5], i[2], i[3], i[4], i[5], i[6],
                         (int)i[7]);
    case STEP_INT4_Q8:
        return gemv_int4_q8(p[0], i[0], (int)i[1], p[1], p[2], p[3], (int)i[8], p[4], p[5], i[2], i[3], i[4], i[5],
                            i[6], (int)i[7]);
    case STEP_INT8:  /* x, qweight, scales, b, y; ldx, f32, ldy, M, N, K, threads */
        return gemm_int8(p[0], i[0], (int)i[1], p[1], p[2], p[3], p[4], i[2], i[3], i[4], i[5], (int)i[6]);
    case STEP_AMX:  /* x, w, scales, zeros, b, y; kind, ldx, scales_bf16, G, ldy, M, N, K, threads */
        return amx_matmul((int)i[0], p[0], i[1], p[1], p[2], p[3], (int)i[2], i[3], p[4], p[5], i[4], i[5], i[6],
                          i[7], (int)i[8]);
    case STEP_RMS_NORM:  /* x, w, y; bf16, ldx, ldy, M, K; eps */
        return rms_norm_rows((int)i[0], p[0], i[1], p[1], (float)o->f[0], p[2], i[2], i[3], i[4]);
    case STEP_ADD_RMS_NORM:  /* a, b, w, y, s; bf16, lda, ldb, M, K; eps */
        return add_rms_norm_rows((int)i[0], p[0], i[1], p[1], i[2], p[2], (float)o->f[0], p[3], p[4], i[3], i[4]);
    case STEP_GLU_SILU_BF16:  /* gate, up, y; ldg, ldu, ldy, M, K */
        return glu_silu_bf16(p[0], i[0], p[1], i[1], p[2], i[2], i[3], i[4]);
    case STEP_GLU_GELU_TANH_BF16:
        return glu_gelu_tanh_bf16(p[0], i[0], p[1], i[1], p[2], i[2], i[3], i[4]);
    case STEP_GLU_SILU_F32:
        return glu_silu_f32(p[0], i[0], p[1], i[1], p[2], i[2], i[3], i[4]);
    case STEP_GLU_GELU_TANH_F32:
        return glu_gelu_tanh_f32(p[0], i[0], p[1], i[1], p[2], i[2], i[3], i[4]);
    case STEP_QKV_ATTENTION:  /* qkv, cos, sin, k cache, v cache, mask, out; bf16, qsb, csb, kc strides (3), vc
                                 strides (3), msb, window, B, Hq, Hkv, D, Dv, threads; scale. L is kv_len. */
        return qkv_attention_decode((int)i[0], p[0], i[1], p[1], p[2], i[2], p[3], i[3], i[4], i[5], p[4], i[6], i[7],
                                    i[8], (const int64_t *)p[5], i[9], (float)o->f[0], i[10], p[6], i[11], i[12],
                                    i[13], kv_len, i[14], i[15], (int)i[16]);
    default:
        return -100;
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Runs ops[0..n) in order; with `seconds` (not NULL), adds each op's time to seconds[k]. Returns 0, or the first
 * nonzero result with its op's index in *failed. */
int program_run(const step_op *ops, int64_t n, void *const *slots, int64_t kv_len, int64_t *failed, double *seconds) {
    for (int64_t k = 0; k < n; k++) {
        const double start = seconds ? now() : 0.0;
        const int err = run_one(ops + k, slots, kv_len);
        if (seconds) seconds[k] += now() - start;
        if (err) {
            *failed = k;
            return err;
        }
    }
    return 0;
}

int64_t program_op_size(void) { return (int64_t)sizeof(step_op); }
