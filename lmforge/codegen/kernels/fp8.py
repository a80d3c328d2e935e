"""Triton kernel for fp8 (e4m3) linear layers: a tiled GEMM with the activation quantization (dynamic, per
token) fused.

    fp8_matmul(x, weight, weight_scale, bias=None) -> y
        x             (M, K)    float16 / bfloat16 / float32, rows contiguous (stride(1) == 1)
        weight        (N, K)    float8_e4m3fn;   weight_scale (N,) float32;   bias (N,) or None
        s_x[m]  = max(max_k |x[m, k]|, 1e-12) / 448,   xq = e4m3(clamp(x / s_x, -448, 448)), nearest even
        y[m, n] = s_x[m] * weight_scale[n] * sum_k xq[m, k] * weight[n, k] + bias[n],   (M, N) in x's dtype

It accumulates in float32 and rounds once, to x's dtype, at the end. The PyTorch reference, the same math,
is `fp8_reference` in `codegen/quant_linear.py` (the op module, which imports this one: not imported back);
`quant/fp8.py` produces the packed tensors and holds the constants (448, 1e-12).

Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), n_splits), tiles in grouped order, K split when the tiles alone
would leave SMs idle (`split_k.py`). Each program first takes max |x| over the whole of its BLOCK_M rows (one
pass over x, which stays in L2), then quantizes each x tile in registers right before its tl.dot; no
quantized x is written anywhere. The rounding to e4m3 is done in float32 arithmetic (`_round_e4m3`),
bit-exact with torch's `.to(torch.float8_e4m3fn)`, because Triton's own float32 -> fp8 cast rounds wrongly in
the interpreter (triton-lang/triton#8322: a carry out of the mantissa is lost) and rounded twice, through
fp16, on Ada (triton-lang/triton#11753); the cast of an already rounded value is exact everywhere. On compute
capability 8.9+ tl.dot takes the fp8 operands. Hopper's fp8 tensor cores accumulate with ~13 mantissa bits,
so each block's dot starts from zero and is added to the float32 accumulator (a promotion every BLOCK_K
columns; `max_num_imprecise_acc=BLOCK_K` would say the same, but Triton 3.9 drops it when it splits a dot
whose operand comes from registers, as the quantized x does). Below 8.9 the weight is read as bytes and
decoded to float16 (exact for e4m3, `_e4m3_to_f16`), and both operands meet in an fp16 tl.dot; in the
interpreter they go through float32.

Autotuned configurations are data (below), pruned by shape and cached on disk (`cache_results=True`). Under
`TRITON_INTERPRET=1` (the CPU) one small configuration runs, so tests cross blocks, splits and tails.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmforge.codegen.kernels.split_k import (INTERPRET, check_bias, check_channel_weight, check_x, config_table,
                                             filled_trivially, grouped_tile, launch_plan, m_bucket, prune_tiles,
                                             store_out, sum_splits)
from lmforge.quant.fp8 import EPS as FP8_EPS  # floor of max |x[m, :]|, so an all-zero row gets a finite scale
from lmforge.quant.fp8 import FP8_MAX  # largest finite float8_e4m3fn

_FP8_MAX = tl.constexpr(FP8_MAX)
_FP8_EPS = tl.constexpr(FP8_EPS)

# --- autotune configurations, as data (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) -------

if INTERPRET:
    FP8_CONFIGS = config_table([(16, 16, 32, 2, 1, 1)])
    FP8_SPLIT_ALIGN = 32  # K splits are multiples of every BLOCK_K
else:  # pragma: no cover - GPU only
    FP8_CONFIGS = config_table([
        (16, 32, 128, 8, 4, 4), (16, 64, 128, 8, 4, 4), (16, 128, 128, 8, 4, 4), (16, 64, 64, 8, 4, 5),
        (32, 64, 128, 8, 4, 4), (64, 64, 128, 8, 4, 4), (64, 128, 128, 8, 4, 3), (64, 256, 128, 8, 8, 3),
        (128, 128, 128, 8, 8, 3), (128, 256, 128, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 4),
    ])
    FP8_SPLIT_ALIGN = 128


# --- kernels ------------------------------------------------------------------------------------------


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
                 prune_configs_by={"early_config_prune": prune_tiles})
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
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
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
    store_out(acc, Y, BIAS, PARTIAL, offs_m, offs_n, M, N, stride_ym, pid_k, HAS_BIAS, SPLIT)


# --- launcher -----------------------------------------------------------------------------------------


def _fp8_dot(device: torch.device) -> bool:
    """fp8 tensor cores: compute capability 8.9 (Ada) and later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
               *, n_splits: int | None = None) -> torch.Tensor:
    """y (M, N) = per-token-fp8(x) @ weight.T, scaled, + bias; tensors as in the module docstring. `n_splits`
    forces the number of K splits (a test hook)."""
    x = check_x("fp8_matmul", x)
    M, K = x.shape
    N = check_channel_weight("fp8_matmul", x, weight, torch.float8_e4m3fn, weight_scale, "weight", "weight_scale")
    check_bias("fp8_matmul", bias, N, x.device)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if filled_trivially(y, K, bias):
        return y
    weight, weight_scale = weight.contiguous(), weight_scale.contiguous()
    bias = None if bias is None else bias.contiguous()
    k_chunk, n_splits, partial, grid = launch_plan(y, K, FP8_SPLIT_ALIGN, n_splits)
    fp8_dot = _fp8_dot(x.device)
    _fp8_matmul_kernel[grid](
        x, weight if fp8_dot else weight.view(torch.uint8), weight_scale, y if bias is None else bias, y, partial,
        M, N, K, x.stride(0), y.stride(0), k_chunk, m_bucket(M),
        HAS_BIAS=bias is not None, SPLIT=n_splits > 1, FP8_DOT=fp8_dot, UPCAST=INTERPRET and not fp8_dot,
    )
    if n_splits > 1:
        sum_splits(partial, bias, y)
    return y
