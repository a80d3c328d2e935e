"""`lmforge::attention`: append the new keys/values to the KV cache and attend, in one op.

    attention(q, k, v, k_cache, v_cache, attention_mask, scale, causal=True, window=0) -> out

    q               (B, Hq, S, D)     queries of the S new tokens
    k, v            (B, Hkv, S, D|Dv) their keys and values, written into the last S slots of the caches
    k_cache         (B, Hkv, L, D)    mutated in place
    v_cache         (B, Hkv, L, Dv)   mutated in place
    attention_mask  (B, L)            0 for a padded slot
    out             (B, Hq, S, Dv)    laid out as (B, S, Hq, Dv) in memory, like SDPA's output, so that
                                      the usual `out.transpose(1, 2).view(B, S, Hq * Dv)` that follows works

Query i sits at slot L - S + i and sees slot j when attention_mask[b, j] != 0 and, if `causal`, j <= its
slot and, with `window` W > 0, its slot - j < W; a query that sees nothing gets zeros. Hq must be a
multiple of Hkv; query head h reads kv head h // (Hq // Hkv).

Two implementations, chosen per call by `LMFORGE_KERNELS` (`codegen/dispatch.py`):
- `torch` (the CPU default): the PyTorch reference below, through `scaled_dot_product_attention`, with
  grouped queries folded into the sequence dimension so K/V are never repeated; on the CPU, a decode call
  (one causal query per row, float32 or bfloat16) runs `cpu/attention.c` instead (`LMFORGE_CPU_KERNELS=0`
  keeps the reference);
- `triton` (the CUDA default): `codegen/kernels/attention.py`.

Registered with `torch.library`, so torch.export, FX serialization (`lmforge.attention.default`) and
torch.compile all know its schema, its in-place cache writes and its output shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.codegen import cpu_gemv
from lmforge.codegen.dispatch import use_triton
from lmforge.ir.ops import Casts, OpFacts, register_op
from lmforge.ir.verify import same_float_dtype

SCHEMA = ("attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor attention_mask, "
          "float scale, bool causal=True, int window=0) -> Tensor")

_lib = torch.library.Library("lmforge", "DEF")  # the namespace; other ops add FRAGMENTs
_lib.define(SCHEMA)


def visible_mask(attention_mask: torch.Tensor, queries: int, causal: bool = True, window: int = 0) -> torch.Tensor:
    """(B, 1, S, L) bool: which cache slot each of the last `queries` slots sees (the op's mask rule)."""
    L = attention_mask.shape[1]
    keys = torch.arange(L, device=attention_mask.device)
    slots = keys[L - queries:, None]
    mask = attention_mask.bool()[:, None, None, :]
    if causal:
        mask = mask & (keys <= slots)
        if window > 0:
            mask = mask & (slots - keys < window)
    return mask.expand(-1, 1, queries, L)


def reference(q, k_cache, v_cache, attention_mask, scale: float, causal: bool = True, window: int = 0) -> torch.Tensor:
    """Attention over the (already updated) cache with PyTorch ops; the semantics every kernel must match."""
    B, H, S, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    result = new_output(q, v_cache.shape[-1])
    if S == 1 and causal:  # decode: every slot is at or before the query; one (B, 1, 1, L) mask serves all heads
        mask = None
        if window and window < L:
            mask = attention_mask[:, None, None, :].bool() & (torch.arange(L, device=q.device) >= L - window)
        elif q.device.type != "cpu" or not bool(attention_mask.all()):  # no padding (on the CPU: no sync): no mask
            mask = attention_mask[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(q.reshape(B, Hkv, G, D), k_cache, v_cache, attn_mask=mask, scale=scale)
        result.copy_(out.reshape(B, H, 1, -1))
        return result
    if S == L and causal and (not window or window >= L) and q.device.type == "cpu" and bool(attention_mask.all()):
        # a whole unpadded prompt (prefill from an empty cache): plain causal attention, so no mask to build
        # (per layer: a few small ops; measured 6-10 % of a 32-token SmolLM prefill) and grouped heads kept grouped
        out = F.scaled_dot_product_attention(q, k_cache, v_cache, is_causal=True, scale=scale, enable_gqa=G > 1)
        result.copy_(out)
        return result
    mask = visible_mask(attention_mask, S, causal, window)
    if G > 1:  # (B, Hkv, G * S, D): every query head of a group against its one kv head
        q = q.reshape(B, Hkv, G * S, D)
        mask = mask.expand(B, 1, S, L).repeat(1, 1, G, 1)
    out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, scale=scale)
    if S > 1:  # a query that sees nothing (a padded prompt slot) gets zeros on every backend
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    result.copy_(out.reshape(B, H, S, -1))
    return result


def new_output(q: torch.Tensor, v_head_dim: int) -> torch.Tensor:
    """An uninitialized (B, Hq, S, Dv) output, (B, S, Hq, Dv) in memory."""
    B, H, S, _ = q.shape
    return q.new_empty((B, S, H, v_head_dim)).transpose(1, 2)


def _append(k, v, k_cache, v_cache) -> None:
    L, S = k_cache.shape[2], k.shape[2]
    k_cache[:, :, L - S:] = k
    v_cache[:, :, L - S:] = v


def attention_impl(q, k, v, k_cache, v_cache, attention_mask, scale: float, causal: bool = True, window: int = 0):
    if q.is_cpu and not use_triton(q):
        kernel = cpu_gemv.kernel()
        if kernel is not None and cpu_gemv.supports_attention(q, k, v, k_cache, v_cache, attention_mask, causal):
            return kernel.attention(q, k, v, k_cache, v_cache, attention_mask, scale, window)
    _append(k, v, k_cache, v_cache)
    if use_triton(q):
        from lmforge.codegen.kernels import attention as kernels

        return kernels.attention(q, k_cache, v_cache, attention_mask, scale, causal, window)
    return reference(q, k_cache, v_cache, attention_mask, scale, causal, window)


_lib.impl("attention", attention_impl, "CPU")
_lib.impl("attention", attention_impl, "CUDA")


@torch.library.register_fake("lmforge::attention")
def _attention_fake(q, k, v, k_cache, v_cache, attention_mask, scale, causal=True, window=0):
    return new_output(q, v_cache.shape[-1])


attention = torch.ops.lmforge.attention.default


def _verify(node) -> str | None:
    for i in (3, 4):
        cache = node.args[i]
        if not (getattr(cache, "op", None) == "placeholder" and cache.name.startswith(("k_cache_", "v_cache_"))):
            return f"argument {i} is %{getattr(cache, 'name', cache)}, not a cache input"
    return same_float_dtype(0, 1, 2, 3, 4)(node)


def _cost(node) -> tuple[int, int]:
    """q.k and p.v: 4 * heads * head_dim FLOPs per new token and per token of context."""
    _, heads, _, head_dim = node.args[0].meta["spec"].shape
    return 0, 4 * heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else 0


register_op(attention, OpFacts(
    shard="attention", verify=("fused-attention", _verify), cost=_cost, cpu=attention_impl, cache_writer=True,
    casts=Casts((0, 1, 2), "compute", "cast-attention-input"),  # q, k, v in the caches' dtype
))
