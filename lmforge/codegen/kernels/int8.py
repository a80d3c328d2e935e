"""Triton kernel for int8 weight-only linear layers: a tiled GEMM that reads the int8 codes and applies the
per-output-channel scales after the sum.

    int8_matmul(x, qweight, scales, bias=None) -> y
        x         (M, K)    float16 / bfloat16 / float32, rows contiguous (stride(1) == 1)
        qweight   (N, K)    int8;   scales (N,) float32;   bias (N,) or None
        y[m, n] = scales[n] * sum_k x[m, k] * qweight[n, k] + bias[n],   (M, N) in x's dtype

It accumulates in float32 and rounds once, to x's dtype, at the end. The PyTorch reference is
`int8_reference` in `codegen/quant_linear.py` (the op module, which imports this one: not imported back);
`quant/int8.py` produces the packed tensors.

Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), n_splits), tiles in grouped order, K split when the tiles alone
would leave SMs idle (`split_k.py`). Each weight tile is converted in registers to x's dtype, which holds every
code exactly (|q| <= 127 needs 7 significant bits; bfloat16 has 8), and meets x in tl.dot; float32 x stays
exact (input precision "ieee", no TF32). In the interpreter both operands go through float32 (its bfloat16
tl.dot is wrong).

Autotuned configurations are data (below), pruned by shape and cached on disk (`cache_results=True`). Under
`TRITON_INTERPRET=1` (the CPU) one small configuration runs, so tests cross blocks, splits and tails.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmforge.codegen.kernels.split_k import (INTERPRET, check_bias, check_channel_weight, check_x, config_table,
                                             grouped_tile, launch_plan, m_bucket, prune_tiles, store_out, sum_splits,
                                             filled_trivially)

# --- autotune configurations, as data (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) -------

if INTERPRET:
    INT8_CONFIGS = config_table([(16, 16, 32, 2, 1, 1)])
    INT8_SPLIT_ALIGN = 32  # K splits are multiples of every BLOCK_K
else:  # pragma: no cover - GPU only
    INT8_CONFIGS = config_table([
        (16, 32, 128, 8, 4, 4), (16, 64, 128, 8, 4, 4), (16, 128, 128, 8, 4, 4), (16, 64, 256, 8, 4, 3),
        (32, 64, 128, 8, 4, 4), (64, 64, 128, 8, 4, 4), (64, 128, 128, 8, 4, 3), (64, 256, 64, 8, 8, 3),
        (128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3), (128, 128, 128, 8, 8, 3),
    ])
    INT8_SPLIT_ALIGN = 256


# --- kernel -------------------------------------------------------------------------------------------


@triton.autotune(configs=INT8_CONFIGS, key=["M_BUCKET", "N", "K"], cache_results=True,
                 prune_configs_by={"early_config_prune": prune_tiles})
@triton.jit
def _int8_matmul_kernel(
    X, QW, SCALES, BIAS, Y, PARTIAL,
    M, N, K, stride_xm, stride_ym, k_chunk, M_BUCKET,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), n_splits): one output tile over K[pid_k * k_chunk, + k_chunk).

    X (M, K) with row stride stride_xm; QW (N, K) int8; SCALES (N,) float32; BIAS (N,); Y (M, N) with row
    stride stride_ym; PARTIAL (n_splits, M, N) float32 when SPLIT."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = QW + offs_n.to(tl.int64)[:, None] * K
    k_start = pid_k * k_chunk
    k_end = min(k_start + k_chunk, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < k_end
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), tl.trans(q.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(q.to(x.dtype)), acc, input_precision=PRECISION)
    scale = tl.load(SCALES + offs_n, mask=n_ok, other=0.0)
    acc = acc * scale[None, :]
    store_out(acc, Y, BIAS, PARTIAL, offs_m, offs_n, M, N, stride_ym, pid_k, HAS_BIAS, SPLIT)


# --- launcher -----------------------------------------------------------------------------------------


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                *, n_splits: int | None = None) -> torch.Tensor:
    """y (M, N) = x @ (qweight * scales[:, None]).T + bias; tensors as in the module docstring. `n_splits`
    forces the number of K splits (a test hook)."""
    x = check_x("int8_matmul", x)
    M, K = x.shape
    N = check_channel_weight("int8_matmul", x, qweight, torch.int8, scales, "qweight", "scales")
    check_bias("int8_matmul", bias, N, x.device)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if filled_trivially(y, K, bias):
        return y
    qweight, scales = qweight.contiguous(), scales.contiguous()
    bias = None if bias is None else bias.contiguous()
    k_chunk, n_splits, partial, grid = launch_plan(y, K, INT8_SPLIT_ALIGN, n_splits)
    _int8_matmul_kernel[grid](
        x, qweight, scales, y if bias is None else bias, y, partial,
        M, N, K, x.stride(0), y.stride(0), k_chunk, m_bucket(M),
        HAS_BIAS=bias is not None, SPLIT=n_splits > 1,
        PRECISION="ieee" if x.dtype == torch.float32 else None,  # float32 stays exact (no TF32)
        UPCAST=INTERPRET,
    )
    if n_splits > 1:
        sum_splits(partial, bias, y)
    return y
