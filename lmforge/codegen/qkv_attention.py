"""`lmforge::qkv_attention`: a fused q/k/v projection's output to the attention output, in one op.

    qkv_attention(qkv, cos, sin, k_cache, v_cache, attention_mask, q_heads, kv_heads, head_dim, v_head_dim, scale,
                  causal=True, window=0) -> out

    qkv   (B, S, Hq * D + Hkv * D + Hkv * Dv)   q, k, v side by side (`runtime/fuse_linears.py` makes it)
    cos, sin (B or 1, 1, S, D), or None          rotate-half rotary on q and k (`lmforge::rotary`); None: none
    out   (B, S, Hq * Dv)

computes exactly what the graph around `lmforge::attention` does:

    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * Dv], -1)        each .view(B, S, H, D).transpose(1, 2)
    q, k = rotary(q, cos, sin), rotary(k, cos, sin)             when cos is given
    out = attention(q, k, v, k_cache, v_cache, attention_mask, scale, causal, window).transpose(1, 2).reshape(B, S, -1)

Why: those are fifteen ops per layer, each a Python call and a dispatch on a decode step whose arithmetic
is a few microseconds; as one op the CPU runs a decode call (one new token per row) as one call of
`cpu/attention.c`'s `qkv_attention_decode`, and everything else through the same ops as before. The
artifact never holds it: the load pass `fuse-qkv-attention` (`runtime/fuse_qkv_attention.py`) makes it in a
CPU engine's in-memory graph.
"""

from __future__ import annotations

import torch

from lmforge.codegen import cpu_gemv
from lmforge.codegen.attention import attention_impl
from lmforge.codegen.rotary import _rotary_cpu, reference as rotary_reference
from lmforge.ir.ops import OpFacts, register_op
from lmforge.ir.verify import same_float_dtype

_lib = torch.library.Library("lmforge", "FRAGMENT")
_lib.define("qkv_attention(Tensor qkv, Tensor? cos, Tensor? sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
            "Tensor attention_mask, int q_heads, int kv_heads, int head_dim, int v_head_dim, float scale, "
            "bool causal=True, int window=0) -> Tensor")


def _heads(qkv, q_heads, kv_heads, head_dim, v_head_dim):
    B, S, _ = qkv.shape
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * v_head_dim], -1)
    return (q.view(B, S, q_heads, head_dim).transpose(1, 2), k.view(B, S, kv_heads, head_dim).transpose(1, 2),
            v.view(B, S, kv_heads, v_head_dim).transpose(1, 2))


def _unfused(rotate, qkv, cos, sin, k_cache, v_cache, mask, q_heads, kv_heads, head_dim, v_head_dim, scale, causal,
             window):
    q, k, v = _heads(qkv, q_heads, kv_heads, head_dim, v_head_dim)
    if cos is not None:
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    out = attention_impl(q, k, v, k_cache, v_cache, mask, scale, causal, window)
    return out.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], q_heads * v_head_dim)


def reference(qkv, cos, sin, k_cache, v_cache, attention_mask, q_heads: int, kv_heads: int, head_dim: int,
              v_head_dim: int, scale: float, causal: bool = True, window: int = 0):
    return _unfused(rotary_reference, qkv, cos, sin, k_cache, v_cache, attention_mask, q_heads, kv_heads, head_dim,
                    v_head_dim, scale, causal, window)


def kernel_takes(qkv, cos, sin, k_cache, v_cache, mask, causal: bool, q_heads: int, kv_heads: int, head_dim: int,
                 v_head_dim: int) -> bool:
    """Does `Kernel.qkv_attention` compute this call? One new causal token per row; qkv, cos/sin and the caches
    all float32 or all bfloat16 on the CPU with their last dims contiguous and sizes that agree with the head
    counts; cos/sin (B or 1, 1, 1, D) of one layout; an int64 (B, L) mask with contiguous rows."""
    B, S, N = qkv.shape
    dtype = qkv.dtype
    if not causal or S != 1 or not qkv.is_cpu or mask.dtype != torch.int64 or qkv.stride(-1) != 1:
        return False
    if (N != q_heads * head_dim + kv_heads * (head_dim + v_head_dim) or kv_heads <= 0 or q_heads % kv_heads
            or k_cache.shape[:2] != (B, kv_heads) or v_cache.shape[:3] != k_cache.shape[:3]
            or k_cache.shape[-1] != head_dim or v_cache.shape[-1] != v_head_dim):
        return False
    if dtype not in (torch.float32, torch.bfloat16) or k_cache.dtype != dtype or v_cache.dtype != dtype:
        return False
    if max(k_cache.shape[-1], v_cache.shape[-1]) > cpu_gemv.ATTN_MAX_HEAD_DIM:
        return False
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or mask.stride(-1) != 1 or mask.shape != (B, k_cache.shape[2]):
        return False
    if cos is None:
        return sin is None
    return (sin is not None and cos.dtype == sin.dtype == dtype and cos.shape == sin.shape and cos.dim() == 4
            and cos.shape[0] in (1, B) and cos.shape[1:] == (1, 1, k_cache.shape[-1]) and cos.stride() == sin.stride()
            and cos.stride(-1) == 1)


def _qkv_attention_cpu(qkv, cos, sin, k_cache, v_cache, attention_mask, q_heads, kv_heads, head_dim, v_head_dim,
                       scale, causal=True, window=0):
    kernel = cpu_gemv.kernel()
    if kernel is not None and kernel_takes(qkv, cos, sin, k_cache, v_cache, attention_mask, causal, q_heads, kv_heads,
                                           head_dim, v_head_dim):
        return kernel.qkv_attention(qkv, cos, sin, k_cache, v_cache, attention_mask, q_heads, kv_heads, head_dim,
                                    v_head_dim, scale, window)
    return _unfused(_rotary_cpu, qkv, cos, sin, k_cache, v_cache, attention_mask, q_heads, kv_heads, head_dim,
                    v_head_dim, scale, causal, window)


def _record(b, qkv, cos, sin, k_cache, v_cache, attention_mask, q_heads, kv_heads, head_dim, v_head_dim, scale,
            causal=True, window=0):
    """The attention.c call `_qkv_attention_cpu` makes, for a step program (`cpu_program.py`): the caches and the mask
    must be the step's inputs whose length (dims 2 and 1) is the program's kv_len."""
    if not (k_cache.dynamic == 2 and v_cache.dynamic == 2 and attention_mask.dynamic == 1) or not kernel_takes(
            qkv, cos, sin, k_cache, v_cache, attention_mask, causal, q_heads, kv_heads, head_dim, v_head_dim):
        return None
    B = qkv.shape[0]
    out = b.out((B, 1, q_heads * v_head_dim), qkv.dtype)
    csb = cos.stride(0) if cos is not None and cos.shape[0] > 1 else 0
    ks, vs = k_cache.stride(), v_cache.stride()
    b.call("qkv_attention", (qkv, cos, sin, k_cache, v_cache, attention_mask, out),
           (qkv.dtype == torch.bfloat16, qkv.stride(0), csb, ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
            attention_mask.stride(0), window, B, q_heads, kv_heads, head_dim, v_head_dim, b.threads), (scale,))
    return out


def _cuda(qkv, cos, sin, k_cache, v_cache, attention_mask, q_heads, kv_heads, head_dim, v_head_dim, scale,
          causal=True, window=0):
    return _unfused(torch.ops.lmforge.rotary.default, qkv, cos, sin, k_cache, v_cache, attention_mask, q_heads,
                    kv_heads, head_dim, v_head_dim, scale, causal, window)


_lib.impl("qkv_attention", _qkv_attention_cpu, "CPU")
_lib.impl("qkv_attention", _cuda, "CUDA")


@torch.library.register_fake("lmforge::qkv_attention")
def _qkv_attention_fake(qkv, cos, sin, k_cache, v_cache, attention_mask, q_heads, kv_heads, head_dim, v_head_dim,
                        scale, causal=True, window=0):
    return qkv.new_empty((qkv.shape[0], qkv.shape[1], q_heads * v_head_dim))


qkv_attention = torch.ops.lmforge.qkv_attention.default


def _cost(node) -> tuple[int, int]:
    """q.k and p.v, as `lmforge::attention` counts them."""
    q_heads, head_dim = node.args[6], node.args[8]
    return 0, 4 * q_heads * head_dim


def _verify(node) -> str | None:
    for i in (3, 4):
        cache = node.args[i]
        if not (getattr(cache, "op", None) == "placeholder" and cache.name.startswith(("k_cache_", "v_cache_"))):
            return f"argument {i} is %{getattr(cache, 'name', cache)}, not a cache input"
    return same_float_dtype(0, 3, 4)(node)


# made at load, after resharding ("replicated": the shard pass never meets it); mutates its caches as
# lmforge::attention does
register_op(qkv_attention, OpFacts(shard="replicated", verify=("fused-attention", _verify), cost=_cost,
                                   cpu=_qkv_attention_cpu, cache_writer=True, record=_record))
