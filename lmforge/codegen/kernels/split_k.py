"""What the int4, fp8 and int8 matmul kernel families (`int4.py`, `fp8.py`, `int8.py`) share: the grouped tile
order, split-K, the store of a finished tile or of one split's partial sums, the launchers' input checks and their
launch plan.

All three compute y (M, N) = x (M, K) @ W.T (+ bias) with a grid (tiles, n_splits). Tiles run in grouped order
(`grouped_tile`: GROUP_M rows of tiles share their weight tiles in L2). Split-K: when the output tiles alone
would leave SMs idle, K is cut into n_splits chunks (`split_k`); every program writes float32 partials
PARTIAL (n_splits, M, N) and `_sum_splits_kernel` adds them in split order (deterministic), adds the bias and
casts to y's dtype. With one split the matmul kernel does that itself (`store_out`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SMALL_M = 16  # at most this many rows take the GEMV / split-K path (int4) and the GEMV tile count (both)
MAX_SPLITS = 16
FLOATS = (torch.float16, torch.bfloat16, torch.float32)  # x's dtypes

# --- autotune configurations, as data -----------------------------------------------------------------

NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")  # then num_warps, num_stages


def config_table(rows: list[tuple]) -> list[triton.Config]:
    """One triton.Config per row: the NAMES meta-parameters, then num_warps, num_stages."""
    return [triton.Config(dict(zip(NAMES, row[:-2])), num_warps=row[-2], num_stages=row[-1]) for row in rows]


if INTERPRET:
    NOMINAL_TILE = (16, 16)  # (rows, cols) of output per program, as the split-K heuristic assumes
    NOMINAL_GEMV_N = 16  # columns per GEMV program, likewise
else:  # pragma: no cover - GPU only
    NOMINAL_TILE = (64, 128)
    NOMINAL_GEMV_N = 64


def prune_tiles(configs, named_args, **kwargs):
    """Row tiles no taller than the rows there are (beyond the smallest tile); int4: BLOCK_K divides G."""
    args = {**named_args, **kwargs}  # the autotuner passes keyword arguments apart
    G, M = args.get("GROUP_SIZE"), args["M"]
    keep = [c for c in configs if G is None or G % c.kwargs["BLOCK_K"] == 0]
    smallest = min(c.kwargs["BLOCK_M"] for c in keep)
    fits = [c for c in keep if c.kwargs["BLOCK_M"] <= max(smallest, triton.next_power_of_2(M))]
    if M >= 256:  # enough rows: thin tiles only waste weight reads
        fits = [c for c in fits if c.kwargs["BLOCK_M"] >= 64] or fits
    return fits or configs[:1]


# --- kernels ------------------------------------------------------------------------------------------


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
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
def store_out(acc, Y, BIAS, PARTIAL, offs_m, offs_n, M, N, stride_ym, pid_k,
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


# --- launcher helpers ---------------------------------------------------------------------------------


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":  # pragma: no cover - GPU only
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def m_bucket(M: int) -> int:
    """The autotuning key's stand-in for M: its power of two, capped."""
    return min(triton.next_power_of_2(M), 8192)


def split_k(tiles: int, M: int, K: int, align: int, device: torch.device, n_splits: int | None) -> tuple[int, int]:
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


def nominal_tiles(M: int, N: int) -> int:
    """Programs per split the heuristic assumes: NOMINAL_TILE tiles, or for M <= SMALL_M one row of
    NOMINAL_GEMV_N columns each (the autotuner's choice may differ by a small factor)."""
    if M <= SMALL_M:
        return triton.cdiv(N, NOMINAL_GEMV_N)
    return triton.cdiv(M, NOMINAL_TILE[0]) * triton.cdiv(N, NOMINAL_TILE[1])


def sum_splits(partial: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    """y (M, N), contiguous = partial (n_splits, M, N) float32 summed over splits + bias (N,) or None."""
    n_splits, M, N = partial.shape
    BLOCK = 1024 if not INTERPRET else 64
    _sum_splits_kernel[(triton.cdiv(M * N, BLOCK),)](partial, y if bias is None else bias, y, M * N, N, n_splits,
                                                    HAS_BIAS=bias is not None, BLOCK=BLOCK)


def check_x(name: str, x: torch.Tensor) -> torch.Tensor:
    """x (M, K) in one of FLOATS, returned with contiguous rows (stride(1) == 1)."""
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be 2-d (M, K), got shape {tuple(x.shape)}")
    if x.dtype not in FLOATS:
        raise ValueError(f"{name}: x must be float16, bfloat16 or float32, got {x.dtype}")
    return x if x.stride(1) == 1 else x.contiguous()


def check_channel_weight(name: str, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor,
                         weight_arg: str, scale_arg: str) -> int:
    """A per-output-channel quantized weight beside x (M, K): `weight` (N, K) of `dtype` and `scale` (N,) float32,
    both on x's device (fp8 and int8); returns N, or raises a ValueError naming the argument."""
    K = x.shape[1]
    if weight.dtype != dtype or weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"{name}: {weight_arg} must be (N, K) = (N, {K}) {str(dtype).removeprefix('torch.')} for x "
                         f"of K={K}, got {weight.dtype} {tuple(weight.shape)}")
    N = weight.shape[0]
    if scale.dtype != torch.float32 or tuple(scale.shape) != (N,):
        raise ValueError(f"{name}: {scale_arg} must be float32 ({N},), got {scale.dtype} {tuple(scale.shape)}")
    for arg, t in ((weight_arg, weight), (scale_arg, scale)):
        if t.device != x.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, x on {x.device}")
    return N


def filled_trivially(y: torch.Tensor, K: int, bias: torch.Tensor | None) -> bool:
    """Is there nothing to multiply (M, N or K is 0)? Then y (M, N) is filled (bias, or 0) and True."""
    M, N = y.shape
    if M and N and K:
        return False
    y.zero_() if bias is None or M == 0 else y.copy_(bias.expand(M, N))
    return True


def launch_plan(y: torch.Tensor, K: int, align: int, n_splits: int | None):
    """(k_chunk, n_splits, partial, grid) for a matmul into y (M, N): the K split (`split_k`), the float32 partials
    it needs (y itself with one split) and the grid over the autotuned tile sizes."""
    M, N = y.shape
    k_chunk, n_splits = split_k(nominal_tiles(M, N), M, K, align, y.device, n_splits)
    partial = torch.empty(n_splits, M, N, dtype=torch.float32, device=y.device) if n_splits > 1 else y

    def grid(meta):
        return triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), n_splits

    return k_chunk, n_splits, partial, grid


def check_bias(name: str, bias: torch.Tensor | None, N: int, device: torch.device) -> None:
    """bias (N,) float on x's device, or None."""
    if bias is None:
        return
    if tuple(bias.shape) != (N,) or not bias.is_floating_point():
        raise ValueError(f"{name}: bias must be a float ({N},) tensor, got {bias.dtype} {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"{name}: bias is on {bias.device}, x on {device}")
