"""Triton kernels for quantized linear layers: int4 weight-only (group-wise) and fp8 (e4m3, dynamic per token).

    int4_matmul(x, qweight, scales, zeros, group_size, bias=None) -> y
        x        (M, K)          float16 / bfloat16 / float32, rows contiguous (stride(1) == 1)
        qweight  (N, K // 2)     uint8: byte j of row n holds q[n, 2j] in its low nibble, q[n, 2j+1] in its high
        scales   (N, K // G)     float;  zeros (N, K // G) in the same dtype, or None (every zero point is 8)
        bias     (N,) or None
        y        (M, N)          x's dtype:  y = x @ W.T + bias,
                                 W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]

    fp8_matmul(x, weight, weight_scale, bias=None) -> y
        weight        (N, K)    float8_e4m3fn;   weight_scale (N,) float32;   bias (N,) or None
        s_x[m]  = max(max_k |x[m, k]|, 1e-12) / 448,   xq = e4m3(clamp(x / s_x, -448, 448)), nearest even
        y[m, n] = s_x[m] * weight_scale[n] * sum_k xq[m, k] * weight[n, k] + bias[n],   (M, N) in x's dtype

Both accumulate in float32 and round once, to x's dtype, at the end (`int4_reference` and `fp8_reference`,
the ops' references in `codegen/quant_linear.py`, re-exported here, are the same math in PyTorch;
`quant/int4.py` and `quant/fp8.py` produce the packed tensors).

int4. The zero point is applied once per block of BLOCK_K columns, not once per weight: BLOCK_K divides G,
so a block lies in one group and adds scale[n] * (sum_k q[n, k] x[m, k] - zero[n] * sum_k x[m, k]). The
integers q (0..15) are exact in every float dtype, so the dot product runs on the raw nibbles in x's dtype
and the result is exact up to float32 summation. Two paths, by M:
- GEMV / split-K (M <= SMALL_M, decode): grid (cdiv(N, BLOCK_N), n_splits). A program reads BLOCK_N rows of
  the packed weight over one split of K, once, for all M rows. BLOCK_M = 1 multiplies in registers (CUDA
  cores, no int -> float conversion instruction: see `_int4_matmul_kernel`); BLOCK_M = 16 pads the rows and
  uses tl.dot; for M = 1 the autotuner picks either.
- tiled (M > SMALL_M, prefill): grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), n_splits), tiles in grouped order
  (GROUP_M rows of tiles share their weight tiles in L2); each weight tile is unpacked in registers for tl.dot.
Split-K: when the output tiles alone would leave SMs idle, K is cut into n_splits chunks (whole groups each);
every program writes float32 partials (n_splits, M, N) and `_sum_splits_kernel` adds them in split order
(deterministic), adds the bias and casts. With one split the matmul kernel does that itself.

fp8. Tiled like int4 (split-K too), the activation quantization fused: each program first takes max |x|
over the whole of its BLOCK_M rows (one pass over x, which stays in L2), then quantizes each x tile in
registers right before its tl.dot; no quantized x is written anywhere. The rounding to e4m3 is done in float32
arithmetic (`_round_e4m3`), bit-exact with torch's `.to(torch.float8_e4m3fn)`, because Triton's own float32 ->
fp8 cast rounds wrongly in the interpreter (triton-lang/triton#8322: a carry out of the mantissa is lost) and
rounded twice, through fp16, on Ada (triton-lang/triton#11753); the cast of an already rounded value is exact
everywhere. On compute capability 8.9+ tl.dot takes the fp8 operands. Hopper's fp8 tensor cores accumulate
with ~13 mantissa bits, so each block's dot starts from zero and is added to the float32 accumulator (a
promotion every BLOCK_K columns; `max_num_imprecise_acc=BLOCK_K` would say the same, but Triton 3.9 drops it
when it splits a dot whose operand comes from registers, as the quantized x does). Below 8.9 the weight is
read as bytes and decoded to float16 (exact for e4m3, `_e4m3_to_f16`), and both operands meet in an fp16
tl.dot; in the interpreter they go through float32.

Autotuned configurations are data (below), pruned by shape and cached on disk (`cache_results=True`). Under
`TRITON_INTERPRET=1` (the CPU) one small configuration runs, so tests cross blocks, groups, splits and tails.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lmforge.codegen.quant_linear import fp8_reference, int4_reference  # noqa: F401  (the references)
from lmforge.quant.fp8 import EPS as FP8_EPS  # floor of max |x[m, :]|, so an all-zero row gets a finite scale
from lmforge.quant.fp8 import FP8_MAX  # largest finite float8_e4m3fn

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SMALL_M = 16  # at most this many rows take the GEMV / split-K path
MAX_SPLITS = 16
_FP8_MAX = tl.constexpr(FP8_MAX)
_FP8_EPS = tl.constexpr(FP8_EPS)

# --- autotune configurations, as data -----------------------------------------------------------------


def _configs(names: tuple[str, ...], rows: list[tuple]) -> list[triton.Config]:
    """One triton.Config per row: the named meta-parameters, then num_warps, num_stages."""
    return [triton.Config(dict(zip(names, row[:-2])), num_warps=row[-2], num_stages=row[-1]) for row in rows]


NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")  # then num_warps, num_stages

if INTERPRET:
    # the prunes leave exactly one per call: BLOCK_M = 1 for M = 1, 16 otherwise
    INT4_GEMV_CONFIGS = _configs(NAMES, [(1, 16, 16, 1, 1, 1), (16, 16, 16, 1, 1, 1)])
    INT4_TILED_CONFIGS = _configs(NAMES, [(16, 16, 32, 2, 1, 1)])
    FP8_CONFIGS = _configs(NAMES, [(16, 16, 32, 2, 1, 1)])
    NOMINAL_TILE = (16, 16)  # (rows, cols) of output per program, as the split-K heuristic assumes
    NOMINAL_GEMV_N = 16  # columns per GEMV program, likewise
    FP8_SPLIT_ALIGN = 32  # fp8 K splits are multiples of every BLOCK_K
else:  # pragma: no cover - GPU only
    INT4_GEMV_CONFIGS = _configs(NAMES, [
        # BLOCK_M 1: CUDA-core GEMV (M = 1 only)
        (1, 32, 128, 1, 4, 4), (1, 64, 128, 1, 4, 3), (1, 64, 64, 1, 4, 4), (1, 128, 64, 1, 4, 3),
        (1, 128, 128, 1, 8, 3), (1, 16, 256, 1, 4, 4), (1, 32, 256, 1, 4, 3), (1, 64, 32, 1, 4, 4),
        (1, 128, 32, 1, 4, 4), (1, 256, 32, 1, 8, 4),
        # BLOCK_M 16: tensor cores on rows padded to 16
        (16, 32, 128, 1, 4, 4), (16, 64, 128, 1, 4, 3), (16, 64, 64, 1, 4, 4), (16, 128, 64, 1, 4, 3),
        (16, 32, 256, 1, 4, 3), (16, 64, 32, 1, 4, 4), (16, 128, 32, 1, 4, 4),
    ])
    INT4_TILED_CONFIGS = _configs(NAMES, [
        (128, 128, 64, 8, 8, 3), (128, 128, 128, 8, 8, 3), (128, 256, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4),
        (64, 128, 128, 8, 4, 3), (128, 64, 64, 8, 4, 4), (64, 64, 128, 8, 4, 3), (32, 64, 128, 8, 4, 4),
        (32, 128, 64, 8, 4, 4), (128, 128, 32, 8, 8, 4), (64, 128, 32, 8, 4, 4), (128, 256, 32, 8, 8, 4),
    ])
    FP8_CONFIGS = _configs(NAMES, [
        (16, 32, 128, 8, 4, 4), (16, 64, 128, 8, 4, 4), (16, 128, 128, 8, 4, 4), (16, 64, 64, 8, 4, 5),
        (32, 64, 128, 8, 4, 4), (64, 64, 128, 8, 4, 4), (64, 128, 128, 8, 4, 3), (64, 256, 128, 8, 8, 3),
        (128, 128, 128, 8, 8, 3), (128, 256, 128, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 4),
    ])
    NOMINAL_TILE = (64, 128)
    NOMINAL_GEMV_N = 64
    FP8_SPLIT_ALIGN = 128


def _prune_int4_gemv(configs, named_args, **kwargs):
    """BLOCK_K must divide the group size; BLOCK_M 1 serves M = 1 only (and is all it gets in the interpreter)."""
    args = {**named_args, **kwargs}  # the autotuner passes keyword arguments apart
    G, M = args["GROUP_SIZE"], args["M"]
    keep = [c for c in configs if G % c.kwargs["BLOCK_K"] == 0 and (M == 1 or c.kwargs["BLOCK_M"] > 1)]
    if INTERPRET:
        keep = [c for c in keep if (c.kwargs["BLOCK_M"] == 1) == (M == 1)]
    return keep or configs[:1]


def _prune_tiles(configs, named_args, **kwargs):
    """Row tiles no taller than the rows there are (beyond the smallest tile); int4: BLOCK_K divides G."""
    args = {**named_args, **kwargs}
    G, M = args.get("GROUP_SIZE"), args["M"]
    keep = [c for c in configs if G is None or G % c.kwargs["BLOCK_K"] == 0]
    smallest = min(c.kwargs["BLOCK_M"] for c in keep)
    fits = [c for c in keep if c.kwargs["BLOCK_M"] <= max(smallest, triton.next_power_of_2(M))]
    if M >= 256:  # enough rows: thin tiles only waste weight reads
        fits = [c for c in fits if c.kwargs["BLOCK_M"] >= 64] or fits
    return fits or configs[:1]


# --- kernels ------------------------------------------------------------------------------------------


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), walking GROUP_M row tiles down a column before moving right."""
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    rows = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m, pid_n


@triton.jit
def _store_out(acc, Y, BIAS, PARTIAL, offs_m, offs_n, M, N, stride_ym, pid_k,
               HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) float32: the finished tile (+ bias, cast to Y's dtype), or one split's partial
    sums into PARTIAL (n_splits, M, N) float32."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    offs_m = offs_m.to(tl.int64)  # M * N may pass 2**31
    if SPLIT:
        tl.store(PARTIAL + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _nibbles_as(q, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """Integers 0..15 (an int tensor) -> the same values in float `dtype` (float32 if UPCAST), without the
    int -> float conversion (a quarter-rate instruction on the GPU) for the 16-bit types: the bits 0x6400 | q
    are the float16 1024 + q, and 0x4300 | q the bfloat16 128 + q; subtracting 1024 or 128 is exact. UPCAST
    subtracts in float32: the interpreter's bfloat16 arithmetic is wrong as well as its bfloat16 tl.dot."""
    if dtype == tl.float16:
        v = (q.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
        if UPCAST:
            return v.to(tl.float32) - 1024.0
        return v - 1024.0
    elif dtype == tl.bfloat16:
        v = (q.to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True)
        if UPCAST:
            return v.to(tl.float32) - 128.0
        return v - 128.0
    else:
        return q.to(tl.float32)


@triton.jit
def _int4_matmul_kernel(
    X, QW, SCALES, ZEROS, BIAS, Y, PARTIAL,
    M, N, K, stride_xm, stride_ym, k_chunk, M_BUCKET,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), n_splits): one output tile over K[pid_k * k_chunk, + k_chunk).

    X (M, K) with row stride stride_xm; QW (N, K // 2) uint8, 16-byte aligned; SCALES, ZEROS (N, K // GROUP_SIZE);
    BIAS (N,); Y (M, N) with row stride stride_ym; PARTIAL (n_splits, M, N) float32 when SPLIT. k_chunk is a
    multiple of GROUP_SIZE and BLOCK_K divides GROUP_SIZE, so every block is whole and lies in one group.

    BLOCK_M = 1 (M = 1, CUDA cores): the weight is read as 32-bit words, 8 nibbles each (nibble i of word j is
    column 8j + i); a nibble masked in place and ORed into the mantissa of 2**23 is the float 2**23 + q * 16**s
    (s = its position in the half word), so one LOP3 and one FADD make it a float and x is pre-scaled by
    16**-s (exact); products stay per lane, (BLOCK_N, BLOCK_K // 8), until one sum after the loop.
    BLOCK_M >= 16: tl.dot of x with the nibbles, interleaved back into column order, in x's dtype."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    n_groups = K // GROUP_SIZE
    k_start = pid_k * k_chunk
    k_end = min(k_start + k_chunk, K)
    zero = tl.full([BLOCK_N], 8.0, tl.float32)  # the symmetric zero point
    if BLOCK_M == 1:
        offs_w = tl.arange(0, BLOCK_K // 8)
        qw_words = QW.to(tl.pointer_type(tl.uint32)) + offs_n[:, None] * (K // 8)
        acc_lanes = tl.zeros([BLOCK_N, BLOCK_K // 8], tl.float32)
    else:
        offs_j = tl.arange(0, BLOCK_K // 2)  # packed bytes of a block
        qw_rows = QW + offs_n[:, None] * (K // 2)
        x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(k_start, k_end, BLOCK_K):
        group = k0 // GROUP_SIZE
        scale = tl.load(SCALES + offs_n * n_groups + group, mask=n_ok, other=0.0).to(tl.float32)  # (BLOCK_N,)
        if HAS_ZEROS:
            zero = tl.load(ZEROS + offs_n * n_groups + group, mask=n_ok, other=0.0).to(tl.float32)
        if BLOCK_M == 1:
            w = tl.load(qw_words + (k0 // 8 + offs_w)[None, :], mask=n_ok[:, None], other=0)  # (BLOCK_N, BLOCK_K/8)
            w_hi = w >> 16
            qx = tl.zeros([BLOCK_N, BLOCK_K // 8], tl.float32)
            x_sum = tl.zeros([BLOCK_K // 8], tl.float32)
            for i in tl.static_range(8):
                x_i = tl.load(X + k0 + 8 * offs_w + i).to(tl.float32)  # (BLOCK_K // 8,): columns k0 + 8j + i
                x_sum += x_i
                q_i = ((w if i < 4 else w_hi) & (0xF << (4 * (i % 4)))) | 0x4B000000  # 2**23 + q * 16**(i % 4)
                qx += (q_i.to(tl.float32, bitcast=True) - 8388608.0) * (x_i * (1.0 / (1 << (4 * (i % 4)))))[None, :]
            acc_lanes += scale[:, None] * (qx - zero[:, None] * x_sum[None, :])
        else:
            packed = tl.load(qw_rows + (k0 // 2 + offs_j)[None, :], mask=n_ok[:, None], other=0)  # (BLOCK_N, BLOCK_K/2)
            q = tl.interleave(packed & 0xF, packed >> 4)  # (BLOCK_N, BLOCK_K): low nibble = even column
            x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None], other=0.0)  # (BLOCK_M, BLOCK_K)
            x_sum = tl.sum(x.to(tl.float32), axis=1)  # (BLOCK_M,)
            q = _nibbles_as(q, x.dtype, UPCAST)
            if UPCAST:
                x = x.to(tl.float32)
            qx = tl.dot(x, tl.trans(q), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N) float32
            acc += scale[None, :] * (qx - x_sum[:, None] * zero[None, :])
    if BLOCK_M == 1:
        acc = tl.sum(acc_lanes, axis=1)[None, :]
    _store_out(acc, Y, BIAS, PARTIAL, offs_m, offs_n, M, N, stride_ym, pid_k, HAS_BIAS, SPLIT)


_INT4_KEY = ["M_BUCKET", "N", "K", "GROUP_SIZE", "HAS_ZEROS"]
_int4_gemv = triton.autotune(configs=INT4_GEMV_CONFIGS, key=_INT4_KEY, cache_results=True,
                             prune_configs_by={"early_config_prune": _prune_int4_gemv})(_int4_matmul_kernel)
_int4_tiled = triton.autotune(configs=INT4_TILED_CONFIGS, key=_INT4_KEY, cache_results=True,
                              prune_configs_by={"early_config_prune": _prune_tiles})(_int4_matmul_kernel)


@triton.jit
def _round_e4m3(v):
    """Round float32 v, |v| <= 448, to the nearest float8_e4m3fn value (ties to even), kept in float32.

    e4m3 values are spaced ulp = 2**(max(e, -6) - 3) in the binade [2**e, 2**(e+1)) (subnormals below 2**-6).
    Adding then subtracting c = 1.5 * 2**23 * ulp makes the float32 adder round v to a multiple of ulp, ties
    to even, exactly as the cast does; c is built from v's exponent bits."""
    e = (v.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased float32 exponent
    c = (((tl.maximum(e, 127 - 6) + 20) << 23) | 0x400000).to(tl.float32, bitcast=True)
    return (v + c) - c


@triton.jit
def _e4m3_to_f16(b):
    """float8_e4m3fn bytes (uint8) -> the same values in float16. Sign, exponent and mantissa moved into fp16's
    fields read 2**8 too small (exponent bias 15 against 7), subnormals included; the product by 256 is exact."""
    v = b.to(tl.int32)
    bits = ((v & 0x80) << 8) | ((v & 0x7F) << 7)
    return (bits.to(tl.int16).to(tl.float16, bitcast=True) * 256.0).to(tl.float16)


@triton.autotune(configs=FP8_CONFIGS, key=["M_BUCKET", "N", "K"], cache_results=True,
                 prune_configs_by={"early_config_prune": _prune_tiles})
@triton.jit
def _fp8_matmul_kernel(
    X, W, W_SCALE, BIAS, Y, PARTIAL,
    M, N, K, stride_xm, stride_ym, k_chunk, M_BUCKET,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, FP8_DOT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), n_splits): one output tile over K[pid_k * k_chunk, + k_chunk).

    X (M, K) with row stride stride_xm; W (N, K) float8_e4m3fn (its bytes, uint8, unless FP8_DOT); W_SCALE (N,)
    float32; BIAS (N,); Y (M, N) with row stride stride_ym; PARTIAL (n_splits, M, N) float32 when SPLIT.
    Every program computes its rows' scales from the whole rows, so splits agree on them."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm

    amax = tl.zeros([BLOCK_M], tl.float32)  # 1. s_x of each row
    for k0 in tl.range(0, K, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k[None, :] < K), other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1).to(tl.float32))
    x_scale = tl.div_rn(tl.maximum(amax, _FP8_EPS), _FP8_MAX)  # (BLOCK_M,), IEEE division as torch's

    k_start = pid_k * k_chunk  # 2. this program's split of K
    k_end = min(k_start + k_chunk, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < k_end
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        xq = tl.div_rn(x, x_scale[:, None])
        xq = _round_e4m3(tl.minimum(tl.maximum(xq, -_FP8_MAX), _FP8_MAX))  # (BLOCK_M, BLOCK_K), on the e4m3 grid
        w = tl.load(W + offs_n[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if FP8_DOT:  # a fresh dot per block, added in float32: Hopper's promotion every BLOCK_K columns
            acc += tl.dot(xq.to(tl.float8e4nv), tl.trans(w))
        elif UPCAST:
            acc = tl.dot(xq, tl.trans(_e4m3_to_f16(w).to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(xq.to(tl.float16), tl.trans(_e4m3_to_f16(w)), acc)
    w_scale = tl.load(W_SCALE + offs_n, mask=n_ok, other=0.0)
    acc = acc * x_scale[:, None] * w_scale[None, :]
    _store_out(acc, Y, BIAS, PARTIAL, offs_m, offs_n, M, N, stride_ym, pid_k, HAS_BIAS, SPLIT)


@triton.jit
def _sum_splits_kernel(PARTIAL, BIAS, Y, MN, N, n_splits, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (cdiv(M * N, BLOCK),): Y (M, N), contiguous = sum of PARTIAL (n_splits, M, N) over splits, in order,
    + BIAS (N,), cast to Y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.load(PARTIAL + offs, mask=ok, other=0.0)
    for s in range(1, n_splits):
        acc += tl.load(PARTIAL + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=ok)


# --- launchers ----------------------------------------------------------------------------------------

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":  # pragma: no cover - GPU only
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _fp8_dot(device: torch.device) -> bool:
    """fp8 tensor cores: compute capability 8.9 (Ada) and later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _bucket(M: int) -> int:
    return min(triton.next_power_of_2(M), 8192)


def _split_k(tiles: int, M: int, K: int, align: int, device: torch.device, n_splits: int | None) -> tuple[int, int]:
    """(k_chunk, n_splits). Split K when `tiles` output tiles would leave SMs idle: aim at 4 programs per SM,
    at most MAX_SPLITS, each chunk a multiple of `align` columns, and the float32 partials (written and read
    back: 8 * n_splits * M * N bytes) below the int4 weight's N * K / 2 bytes, i.e. n_splits <= K / (16 M).
    `n_splits` forces a count (tests use it)."""
    blocks = triton.cdiv(K, align)
    if n_splits is None:
        sms = _sm_count(device)
        n_splits = 1
        if tiles < 2 * sms:
            n_splits = min(triton.cdiv(4 * sms, tiles), MAX_SPLITS, max(1, K // (16 * M)))
    n_splits = max(1, min(n_splits, blocks))
    k_chunk = triton.cdiv(blocks, n_splits) * align
    return k_chunk, triton.cdiv(K, k_chunk)


def _tiles(M: int, N: int) -> int:
    """Programs per split the heuristic assumes: NOMINAL_TILE tiles, or for M <= SMALL_M one row of
    NOMINAL_GEMV_N columns each (the autotuner's choice may differ by a small factor)."""
    if M <= SMALL_M:
        return triton.cdiv(N, NOMINAL_GEMV_N)
    return triton.cdiv(M, NOMINAL_TILE[0]) * triton.cdiv(N, NOMINAL_TILE[1])


def _finish(partial: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    n_splits, M, N = partial.shape
    BLOCK = 1024 if not INTERPRET else 64
    _sum_splits_kernel[(triton.cdiv(M * N, BLOCK),)](partial, y if bias is None else bias, y, M * N, N, n_splits,
                                                    HAS_BIAS=bias is not None, BLOCK=BLOCK)


def _check_x(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be 2-d (M, K), got shape {tuple(x.shape)}")
    if x.dtype not in FLOATS:
        raise ValueError(f"{name}: x must be float16, bfloat16 or float32, got {x.dtype}")
    return x if x.stride(1) == 1 else x.contiguous()


def _check_bias(name: str, bias: torch.Tensor | None, N: int, device: torch.device) -> None:
    if bias is None:
        return
    if tuple(bias.shape) != (N,) or not bias.is_floating_point():
        raise ValueError(f"{name}: bias must be a float ({N},) tensor, got {bias.dtype} {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"{name}: bias is on {bias.device}, x on {device}")


def _check_int4(x, qweight, scales, zeros, group_size, bias) -> None:
    M, K = x.shape
    if not isinstance(group_size, int) or group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"int4_matmul: group_size must be a power of two >= 32, got {group_size=}")
    if K % group_size:
        raise ValueError(f"int4_matmul: group_size must divide K, got {group_size=} K={K}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] * 2 != K:
        raise ValueError(f"int4_matmul: qweight must be (N, K // 2) = (N, {K // 2}) uint8 for x of K={K}, "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    N, n_groups = qweight.shape[0], K // group_size
    if tuple(scales.shape) != (N, n_groups) or not scales.is_floating_point():
        raise ValueError(f"int4_matmul: scales must be float (N, K // group_size) = {(N, n_groups)}, "
                         f"got {scales.dtype} {tuple(scales.shape)}")
    if zeros is not None and (tuple(zeros.shape) != (N, n_groups) or zeros.dtype != scales.dtype):
        raise ValueError(f"int4_matmul: zeros must be {scales.dtype} {(N, n_groups)} like scales, "
                         f"got {zeros.dtype} {tuple(zeros.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None and t.device != x.device:
            raise ValueError(f"int4_matmul: {name} is on {t.device}, x on {x.device}")
    _check_bias("int4_matmul", bias, N, x.device)


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int, bias: torch.Tensor | None = None, *, n_splits: int | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) @ dequantized W.T + bias; tensors as in the module docstring. `n_splits` forces the
    number of K splits (a test hook; by default chosen from the shape and the number of SMs)."""
    x = _check_x("int4_matmul", x)
    _check_int4(x, qweight, scales, zeros, group_size, bias)
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0 or K == 0:
        return y.zero_() if bias is None or M == 0 else y.copy_(bias.expand(M, N))
    qweight, scales = qweight.contiguous(), scales.contiguous()
    if qweight.data_ptr() % 16:  # the GEMV reads 32-bit words (and every path vectorizes better aligned)
        qweight = qweight.clone()
    zeros = None if zeros is None else zeros.contiguous()
    bias = None if bias is None else bias.contiguous()
    k_chunk, n_splits = _split_k(_tiles(M, N), M, K, group_size, x.device, n_splits)
    partial = torch.empty(n_splits, M, N, dtype=torch.float32, device=x.device) if n_splits > 1 else y
    kernel = _int4_gemv if M <= SMALL_M else _int4_tiled
    upcast = INTERPRET and x.dtype == torch.bfloat16  # the interpreter's bf16 tl.dot is wrong: go through fp32
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), n_splits)  # noqa: E731
    kernel[grid](
        x, qweight, scales, scales if zeros is None else zeros, y if bias is None else bias, y, partial,
        M, N, K, x.stride(0), y.stride(0), k_chunk, _bucket(M),
        GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, SPLIT=n_splits > 1,
        PRECISION="ieee" if x.dtype == torch.float32 or upcast else None,  # float32 stays exact (no TF32)
        UPCAST=upcast,
    )
    if n_splits > 1:
        _finish(partial, bias, y)
    return y


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
               *, n_splits: int | None = None) -> torch.Tensor:
    """y (M, N) = per-token-fp8(x) @ weight.T, scaled, + bias; tensors as in the module docstring. `n_splits`
    forces the number of K splits (a test hook)."""
    x = _check_x("fp8_matmul", x)
    M, K = x.shape
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"fp8_matmul: weight must be (N, K) = (N, {K}) float8_e4m3fn for x of K={K}, "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    N = weight.shape[0]
    if weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) != (N,):
        raise ValueError(f"fp8_matmul: weight_scale must be float32 ({N},), "
                         f"got {weight_scale.dtype} {tuple(weight_scale.shape)}")
    for name, t in (("weight", weight), ("weight_scale", weight_scale)):
        if t.device != x.device:
            raise ValueError(f"fp8_matmul: {name} is on {t.device}, x on {x.device}")
    _check_bias("fp8_matmul", bias, N, x.device)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0 or K == 0:
        return y.zero_() if bias is None or M == 0 else y.copy_(bias.expand(M, N))
    weight, weight_scale = weight.contiguous(), weight_scale.contiguous()
    bias = None if bias is None else bias.contiguous()
    k_chunk, n_splits = _split_k(_tiles(M, N), M, K, FP8_SPLIT_ALIGN, x.device, n_splits)
    partial = torch.empty(n_splits, M, N, dtype=torch.float32, device=x.device) if n_splits > 1 else y
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), n_splits)  # noqa: E731
    fp8_dot = _fp8_dot(x.device)
    _fp8_matmul_kernel[grid](
        x, weight if fp8_dot else weight.view(torch.uint8), weight_scale, y if bias is None else bias, y, partial,
        M, N, K, x.stride(0), y.stride(0), k_chunk, _bucket(M),
        HAS_BIAS=bias is not None, SPLIT=n_splits > 1, FP8_DOT=fp8_dot, UPCAST=INTERPRET and not fp8_dot,
    )
    if n_splits > 1:
        _finish(partial, bias, y)
    return y


# --- references ---------------------------------------------------------------------------------------
