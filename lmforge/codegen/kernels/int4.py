"""Triton kernels for int4 weight-only (group-wise) linear layers: a split-K GEMV for decode, a tiled
dequantize-GEMM for prefill.

    int4_matmul(x, qweight, scales, zeros, group_size, bias=None) -> y
        x        (M, K)          float16 / bfloat16 / float32, rows contiguous (stride(1) == 1)
        qweight  (N, K // 2)     uint8: byte j of row n holds q[n, 2j] in its low nibble, q[n, 2j+1] in its high
        scales   (N, K // G)     float;  zeros (N, K // G) in the same dtype, or None (every zero point is 8)
        bias     (N,) or None
        y        (M, N)          x's dtype:  y = x @ W.T + bias,
                                 W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]

It accumulates in float32 and rounds once, to x's dtype, at the end. The PyTorch reference, the same math,
is `int4_reference` in `codegen/quant_linear.py` (the op module, which imports this one: not imported back);
`quant/int4.py` produces the packed tensors.

The zero point is applied once per block of BLOCK_K columns, not once per weight: BLOCK_K divides G, so a
block lies in one group and adds scale[n] * (sum_k q[n, k] x[m, k] - zero[n] * sum_k x[m, k]). The integers
q (0..15) are exact in every float dtype, so the dot product runs on the raw nibbles in x's dtype and the
result is exact up to float32 summation. Two paths, by M:
- GEMV / split-K (M <= SMALL_M, decode): grid (cdiv(N, BLOCK_N), n_splits). A program reads BLOCK_N rows of
  the packed weight over one split of K, once, for all M rows. BLOCK_M = 1 multiplies in registers (CUDA
  cores, no int -> float conversion instruction: see `_int4_matmul_kernel`); BLOCK_M = 16 pads the rows and
  uses tl.dot; for M = 1 the autotuner picks either.
- tiled (M > SMALL_M, prefill): grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), n_splits), tiles in grouped order;
  each weight tile is unpacked in registers for tl.dot.
Both split K (in whole groups) when the tiles alone would leave SMs idle, as `split_k.py` describes.

Autotuned configurations are data (below), pruned by shape and cached on disk (`cache_results=True`). Under
`TRITON_INTERPRET=1` (the CPU) one small configuration runs, so tests cross blocks, groups, splits and tails.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmforge.codegen.kernels.split_k import (INTERPRET, SMALL_M, check_bias, check_x, config_table, filled_trivially,
                                             grouped_tile, launch_plan, m_bucket, prune_tiles, store_out, sum_splits)

# --- autotune configurations, as data (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) -------

if INTERPRET:
    # the prunes leave exactly one per call: BLOCK_M = 1 for M = 1, 16 otherwise
    INT4_GEMV_CONFIGS = config_table([(1, 16, 16, 1, 1, 1), (16, 16, 16, 1, 1, 1)])
    INT4_TILED_CONFIGS = config_table([(16, 16, 32, 2, 1, 1)])
else:  # pragma: no cover - GPU only
    INT4_GEMV_CONFIGS = config_table([
        # BLOCK_M 1: CUDA-core GEMV (M = 1 only)
        (1, 32, 128, 1, 4, 4), (1, 64, 128, 1, 4, 3), (1, 64, 64, 1, 4, 4), (1, 128, 64, 1, 4, 3),
        (1, 128, 128, 1, 8, 3), (1, 16, 256, 1, 4, 4), (1, 32, 256, 1, 4, 3), (1, 64, 32, 1, 4, 4),
        (1, 128, 32, 1, 4, 4), (1, 256, 32, 1, 8, 4),
        # BLOCK_M 16: tensor cores on rows padded to 16
        (16, 32, 128, 1, 4, 4), (16, 64, 128, 1, 4, 3), (16, 64, 64, 1, 4, 4), (16, 128, 64, 1, 4, 3),
        (16, 32, 256, 1, 4, 3), (16, 64, 32, 1, 4, 4), (16, 128, 32, 1, 4, 4),
    ])
    INT4_TILED_CONFIGS = config_table([
        (128, 128, 64, 8, 8, 3), (128, 128, 128, 8, 8, 3), (128, 256, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4),
        (64, 128, 128, 8, 4, 3), (128, 64, 64, 8, 4, 4), (64, 64, 128, 8, 4, 3), (32, 64, 128, 8, 4, 4),
        (32, 128, 64, 8, 4, 4), (128, 128, 32, 8, 8, 4), (64, 128, 32, 8, 4, 4), (128, 256, 32, 8, 8, 4),
    ])


def _prune_int4_gemv(configs, named_args, **kwargs):
    """BLOCK_K must divide the group size; BLOCK_M 1 serves M = 1 only (and is all it gets in the interpreter)."""
    args = {**named_args, **kwargs}  # the autotuner passes keyword arguments apart
    G, M = args["GROUP_SIZE"], args["M"]
    keep = [c for c in configs if G % c.kwargs["BLOCK_K"] == 0 and (M == 1 or c.kwargs["BLOCK_M"] > 1)]
    if INTERPRET:
        keep = [c for c in keep if (c.kwargs["BLOCK_M"] == 1) == (M == 1)]
    return keep or configs[:1]


# --- kernels ------------------------------------------------------------------------------------------


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
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
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
    store_out(acc, Y, BIAS, PARTIAL, offs_m, offs_n, M, N, stride_ym, pid_k, HAS_BIAS, SPLIT)


_INT4_KEY = ["M_BUCKET", "N", "K", "GROUP_SIZE", "HAS_ZEROS"]
_int4_gemv = triton.autotune(configs=INT4_GEMV_CONFIGS, key=_INT4_KEY, cache_results=True,
                             prune_configs_by={"early_config_prune": _prune_int4_gemv})(_int4_matmul_kernel)
_int4_tiled = triton.autotune(configs=INT4_TILED_CONFIGS, key=_INT4_KEY, cache_results=True,
                              prune_configs_by={"early_config_prune": prune_tiles})(_int4_matmul_kernel)


# --- launcher -----------------------------------------------------------------------------------------


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
    check_bias("int4_matmul", bias, N, x.device)


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int, bias: torch.Tensor | None = None, *, n_splits: int | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) @ dequantized W.T + bias; tensors as in the module docstring. `n_splits` forces the
    number of K splits (a test hook; by default chosen from the shape and the number of SMs)."""
    x = check_x("int4_matmul", x)
    _check_int4(x, qweight, scales, zeros, group_size, bias)
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if filled_trivially(y, K, bias):
        return y
    qweight, scales = qweight.contiguous(), scales.contiguous()
    if qweight.data_ptr() % 16:  # the GEMV reads 32-bit words (and every path vectorizes better aligned)
        qweight = qweight.clone()
    zeros = None if zeros is None else zeros.contiguous()
    bias = None if bias is None else bias.contiguous()
    k_chunk, n_splits, partial, grid = launch_plan(y, K, group_size, n_splits)
    kernel = _int4_gemv if M <= SMALL_M else _int4_tiled
    upcast = INTERPRET and x.dtype == torch.bfloat16  # the interpreter's bf16 tl.dot is wrong: go through fp32
    kernel[grid](
        x, qweight, scales, scales if zeros is None else zeros, y if bias is None else bias, y, partial,
        M, N, K, x.stride(0), y.stride(0), k_chunk, m_bucket(M),
        GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, SPLIT=n_splits > 1,
        PRECISION="ieee" if x.dtype == torch.float32 or upcast else None,  # float32 stays exact (no TF32)
        UPCAST=upcast,
    )
    if n_splits > 1:
        sum_splits(partial, bias, y)
    return y
