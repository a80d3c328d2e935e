"""Triton attention kernels: FlashAttention-2 prefill and split-KV ("flash-decoding") decode.

Both read the runtime's KV cache in place and follow the calling convention of `lmforge::attention`:

    q               (B, Hq, S, D)       the new queries; query i sits at cache slot L - S + i
    k_cache         (B, Hkv, L, D)      keys, the new ones already written into the last S slots
    v_cache         (B, Hkv, L, Dv)
    attention_mask  (B, L)              int; 0 marks a padded slot, which no query sees
    out             (B, Hq, S, Dv)      allocated (B, S, Hq, Dv) in memory, as SDPA's output is

Query head h reads kv head h // (Hq // Hkv) (grouped-query attention by index, never by copying K/V).
A key slot j is visible from query slot t when the mask allows it, and, if causal, j <= t, and, with a
window W > 0, t - j < W. A query that sees no key gets zeros. Scores and the softmax are float32 whatever
the input dtype; the softmax runs in base 2 (`exp2`, with log2(e) folded into the scale).

Kernel choice (`attention`): decode for S <= DECODE_MAX_Q (one program per kv head and KV split, all
query heads of the group and all S queries at once, so K/V are read once), prefill otherwise. Autotuned
configurations are cached on disk by Triton (`cache_results=True`), keyed by head dim and shape bucket.
Under `TRITON_INTERPRET=1` (the CPU) one small configuration runs, so tests cover many blocks and tails.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
DECODE_MAX_Q = 16  # at most this many queries per sequence go to the decode kernel

# --- autotune configurations, as data -----------------------------------------------------------------

if INTERPRET:
    PREFILL_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    DECODE_CONFIGS = [triton.Config({"BLOCK_N": 16}, num_warps=1, num_stages=1)]
    SPLIT_ALIGN = 16
else:  # pragma: no cover - GPU only
    PREFILL_CONFIGS = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 4),
                           (128, 32, 8, 4), (64, 64, 4, 2)]
    ]
    DECODE_CONFIGS = [
        triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
        for n, w, s in [(64, 4, 3), (128, 4, 3), (64, 2, 4), (32, 4, 4), (128, 8, 2)]
    ]
    SPLIT_ALIGN = 128


def _prune_prefill(configs, named_args, **kwargs):
    """Head dim 256 needs small tiles to fit shared memory."""
    args = {**named_args, **kwargs}  # the autotuner passes keyword arguments (BLOCK_D among them) apart
    if args["BLOCK_D"] >= 256:
        small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
        return small or configs[:1]
    return configs


# --- kernels ------------------------------------------------------------------------------------------


@triton.jit
def _attend_block(q, k_base, v_base, AM_row, n, in_range, rows_ok, slot, m_i, l_i, acc,
                  sk_n, sk_d, sv_n, sv_d, sm_n, D, DV, qk_scale, window,
                  CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One K/V block for a block of query rows: mask, scores, online-softmax update. Returns (m, l, acc).

    n (BLOCK_N,) key slots, in_range their bounds, rows_ok/slot (rows,) which rows are real and their slots;
    m, l, acc the running max (base 2), sum of exps and unnormalised output of each row."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    keep = in_range & (tl.load(AM_row + n * sm_n, mask=in_range, other=0) != 0)
    visible = keep[None, :] & rows_ok[:, None]
    if CAUSAL:
        visible = visible & (n[None, :] <= slot[:, None])
    if HAS_WINDOW:
        visible = visible & (slot[:, None] - n[None, :] < window)
    k = tl.load(k_base + n[None, :] * sk_n + offs_d[:, None] * sk_d,
                mask=in_range[None, :] & (offs_d[:, None] < D), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + n[:, None] * sv_n + offs_dv[None, :] * sv_d,
                mask=in_range[:, None] & (offs_dv[None, :] < DV), other=0.0)
    p = p.to(v.dtype)
    if UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.autotune(configs=PREFILL_CONFIGS, key=["S_BUCKET", "L_BUCKET", "BLOCK_D", "BLOCK_DV", "CAUSAL", "HAS_WINDOW"],
                 prune_configs_by={"early_config_prune": _prune_prefill}, cache_results=True)
@triton.jit
def _prefill_kernel(
    Q, K, V, AM, O,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sm_b, sm_n,
    so_b, so_h, so_m, so_d,
    H, G, S, L, D, DV, qk_scale, window,
    S_BUCKET, L_BUCKET,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(S, BLOCK_M), B * Hq): one block of queries of one head; K/V blocks stream through."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d,
                mask=(offs_m[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    slot = L - S + offs_m  # each query's cache slot

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo = 0
    hi = L
    if CAUSAL:  # skip the key blocks after this query block's last slot, and before its window
        hi = L - S + (pid_m + 1) * BLOCK_M
        if hi > L:
            hi = L
        if HAS_WINDOW:
            lo = L - S + pid_m * BLOCK_M - window + 1
            if lo < 0:
                lo = 0
            lo = (lo // BLOCK_N) * BLOCK_N
    k_base = K + b * sk_b + kvh * sk_h
    v_base = V + b * sv_b + kvh * sv_h
    rows_ok = offs_m < S
    for start in tl.range(lo, hi, BLOCK_N):
        n = start + offs_n
        m_i, l_i, acc = _attend_block(q, k_base, v_base, AM + b * sm_b, n, n < L, rows_ok, slot, m_i, l_i, acc,
                                      sk_n, sk_d, sv_n, sv_d, sm_n, D, DV, qk_scale, window,
                                      CAUSAL, HAS_WINDOW, PRECISION, UPCAST, BLOCK_D, BLOCK_DV)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_dv[None, :] * so_d, out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < S) & (offs_dv[None, :] < DV))


@triton.autotune(configs=DECODE_CONFIGS, key=["L_BUCKET", "BLOCK_R", "BLOCK_D", "BLOCK_DV", "HAS_WINDOW"],
                 cache_results=True)
@triton.jit
def _decode_split_kernel(
    Q, K, V, AM, MID_O, MID_LSE,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sm_b, sm_n,
    Hkv, G, S, L, D, DV, qk_scale, window, split_size, n_splits,
    L_BUCKET,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B * Hkv, n_splits): the G * S query rows of one kv head over one split of the cache.

    Row r is query r % S of head kvh * G + r // S. Writes the split's normalised output and its
    log2-sum-exp to MID_O (B, Hq, S, n_splits, Dv) and MID_LSE (B, Hq, S, n_splits), float32."""
    pid_bk = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bk // Hkv
    kvh = pid_bk % Hkv
    offs_r = tl.arange(0, BLOCK_R)
    g = offs_r // S
    i = offs_r % S
    h = kvh * G + g
    row_ok = offs_r < G * S
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * sq_b + h[:, None] * sq_h + i[:, None] * sq_m + offs_d[None, :] * sq_d,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    slot = L - S + i

    start = pid_s * split_size
    end = start + split_size
    if end > L:
        end = L
    if HAS_WINDOW:  # nothing before the oldest query's window
        first = L - S - window + 1
        if first > start:
            start = (first // BLOCK_N) * BLOCK_N
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    k_base = K + b * sk_b + kvh * sk_h
    v_base = V + b * sv_b + kvh * sv_h
    for n0 in tl.range(start, end, BLOCK_N):
        n = n0 + offs_n
        m_i, l_i, acc = _attend_block(q, k_base, v_base, AM + b * sm_b, n, (n < end) & (n >= 0), row_ok, slot,
                                      m_i, l_i, acc, sk_n, sk_d, sv_n, sv_d, sm_n, D, DV, qk_scale, window,
                                      CAUSAL, HAS_WINDOW, PRECISION, UPCAST, BLOCK_D, BLOCK_DV)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    row = ((b * Hkv * G + h) * S + i) * n_splits + pid_s  # (b, h, i, split) in MID_LSE
    tl.store(MID_O + row[:, None] * DV + offs_dv[None, :], out, mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(MID_LSE + row, lse, mask=row_ok)


@triton.jit
def _decode_reduce_kernel(
    MID_O, MID_LSE, O,
    so_b, so_h, so_m, so_d,
    H, S, DV, n_splits,
    BLOCK_SPLITS: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Grid (B * Hq * S,): combine the splits of one query row, weighting each by its sum of exps."""
    pid = tl.program_id(0)
    b = pid // (H * S)
    h = (pid // S) % H
    i = pid % S
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_dv = tl.arange(0, BLOCK_DV)
    split_ok = offs_s < n_splits
    lse = tl.load(MID_LSE + pid * n_splits + offs_s, mask=split_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)
    o = tl.load(MID_O + (pid * n_splits + offs_s[:, None]) * DV + offs_dv[None, :],
                mask=split_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(O + b * so_b + h * so_h + i * so_m + offs_dv * so_d, out.to(O.dtype.element_ty), mask=offs_dv < DV)


# --- launchers ----------------------------------------------------------------------------------------


def _pow2(n: int, at_least: int = 16) -> int:
    return max(at_least, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype):
    return "ieee" if dtype == torch.float32 else None  # float32 stays exact (no TF32)


def _upcast(dtype: torch.dtype) -> bool:
    """Triton's interpreter computes bfloat16 `tl.dot` wrongly; there the operands go through float32 (exact
    for bfloat16 products; probabilities are still rounded to bfloat16 first, as on the GPU)."""
    return INTERPRET and dtype == torch.bfloat16


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":  # pragma: no cover - GPU only
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _check(q, k_cache, v_cache, attention_mask) -> None:
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError("attention: q, k_cache and v_cache must be 4-d (batch, heads, seq, head_dim)")
    B, H, S, D = q.shape
    Bk, Hkv, L, Dk = k_cache.shape
    if Bk != B or Dk != D or v_cache.shape[:3] != k_cache.shape[:3] or H % Hkv:
        raise ValueError(f"attention: q {tuple(q.shape)} does not fit k_cache {tuple(k_cache.shape)} / "
                         f"v_cache {tuple(v_cache.shape)}")
    if tuple(attention_mask.shape) != (B, L):
        raise ValueError(f"attention: attention_mask {tuple(attention_mask.shape)} is not (batch, kv_len) = {(B, L)}")
    if S > L:
        raise ValueError(f"attention: {S} queries but only {L} cache slots")


def prefill(q, k_cache, v_cache, attention_mask, scale: float, causal: bool = True, window: int = 0, out=None):
    """FlashAttention-2 forward over the cache; shapes as in the module docstring."""
    _check(q, k_cache, v_cache, attention_mask)
    B, H, S, D = q.shape
    Hkv, L, DV = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    out = torch.empty(B, S, H, DV, dtype=q.dtype, device=q.device).transpose(1, 2) if out is None else out
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
    _prefill_kernel[grid](
        q, k_cache, v_cache, attention_mask, out,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *attention_mask.stride(), *out.stride(),
        H, H // Hkv, S, L, D, DV, scale * LOG2E, window,
        triton.next_power_of_2(S), triton.next_power_of_2(L),
        CAUSAL=causal, HAS_WINDOW=bool(causal and window > 0), PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype),
        BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV),
    )
    return out


def decode_splits(batch_kv_heads: int, kv_len: int, device: torch.device) -> tuple[int, int]:
    """(split_size, n_splits): enough programs to fill the machine twice over, each split a multiple of
    SPLIT_ALIGN slots."""
    want = max(1, min(triton.cdiv(2 * _sm_count(device), batch_kv_heads), triton.cdiv(kv_len, SPLIT_ALIGN)))
    split_size = triton.cdiv(triton.cdiv(kv_len, want), SPLIT_ALIGN) * SPLIT_ALIGN
    return split_size, triton.cdiv(kv_len, split_size)


def decode(q, k_cache, v_cache, attention_mask, scale: float, causal: bool = True, window: int = 0, out=None,
           n_splits: int | None = None):
    """Split-KV decode for few queries (S <= DECODE_MAX_Q); shapes as in the module docstring.
    `n_splits` overrides the split count (tests use it to force many splits on short caches)."""
    _check(q, k_cache, v_cache, attention_mask)
    B, H, S, D = q.shape
    Hkv, L, DV = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    G = H // Hkv
    if n_splits is None:
        split_size, n_splits = decode_splits(B * Hkv, L, q.device)
    else:
        split_size = triton.cdiv(L, n_splits)
        n_splits = triton.cdiv(L, split_size)
    mid_o = torch.empty(B, H, S, n_splits, DV, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(B, H, S, n_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B * Hkv, n_splits)](
        q, k_cache, v_cache, attention_mask, mid_o, mid_lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *attention_mask.stride(),
        Hkv, G, S, L, D, DV, scale * LOG2E, window, split_size, n_splits,
        triton.next_power_of_2(L),
        CAUSAL=causal, HAS_WINDOW=bool(causal and window > 0), PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype),
        BLOCK_R=_pow2(G * S), BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV),
    )
    out = torch.empty(B, S, H, DV, dtype=q.dtype, device=q.device).transpose(1, 2) if out is None else out
    _decode_reduce_kernel[(B * H * S,)](
        mid_o, mid_lse, out, *out.stride(), H, S, DV, n_splits,
        BLOCK_SPLITS=_pow2(n_splits, 2), BLOCK_DV=_pow2(DV),
    )
    return out


def attention(q, k_cache, v_cache, attention_mask, scale: float, causal: bool = True, window: int = 0):
    """Pick the kernel by shape: decode for few queries per sequence, prefill otherwise."""
    G = q.shape[1] // k_cache.shape[1]
    if q.shape[2] <= DECODE_MAX_Q and G * q.shape[2] <= 128:
        return decode(q, k_cache, v_cache, attention_mask, scale, causal, window)
    return prefill(q, k_cache, v_cache, attention_mask, scale, causal, window)
