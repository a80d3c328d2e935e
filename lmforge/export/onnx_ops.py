"""How lmforge's ops become ONNX: the onnxscript translation of each, handed to `torch.onnx.export` as its
custom translation table, and the two export-only ops that `onnx_graph.py` puts in the graph first.

    lmforge.rms_norm        -> SimplifiedLayerNormalization (stash_type float32)
    lmforge.add_rms_norm    -> com.microsoft.SkipSimplifiedLayerNormalization (output 0 and input_skip_bias_sum)
    lmforge.rotary          -> the rotate-half formula (Slice, Neg, Concat, Mul, Add), where its cos/sin are not
                               rows of a position table (`onnx_graph.py` makes those `rotary_embedding`)
    lmforge_export.rotary_embedding -> com.microsoft.RotaryEmbedding (cos/sin caches of half the head dim)
    lmforge.glu             -> act(gate) * up (Sigmoid for silu, Erf or Tanh for the GELUs)
    lmforge_export.gqa      -> com.microsoft.GroupQueryAttention, past/present BNSH, seqlens_k and
                               total_sequence_length from attention_mask as onnxruntime-genai's builder does
    lmforge_export.matmul_nbits -> com.microsoft.MatMulNBits

The export-only ops exist because their ONNX form has another calling convention than the lmforge op they
stand for: `gqa` takes the past cache and returns the present one (lmforge's `attention` writes a cache in
place) and takes and gives tokens-major (B, S, heads * D) rows, as the projections around it do;
`rotary_embedding` takes either layout; `matmul_nbits` takes MatMulNBits' blocked weight layout. Their eager implementations are the same
arithmetic in PyTorch, so the rewritten graph can be run and compared before it is exported.
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op
from onnxscript._internal.values import Opset

from lmforge.codegen import attention as attention_op
from lmforge.export import onnx_schemas
from lmforge.quant import int4

onnx_schemas.register()
_ms = Opset(onnx_schemas.MS_DOMAIN, 1)
_INT32 = 6  # onnx.TensorProto.INT32

_lib = torch.library.Library("lmforge_export", "DEF")
_lib.define("gqa(Tensor q, Tensor k, Tensor v, Tensor past_k, Tensor past_v, Tensor attention_mask, float scale, "
            "int window=0) -> (Tensor, Tensor, Tensor)")
_lib.define("rotary_embedding(Tensor x, Tensor position_ids, Tensor cos_cache, Tensor sin_cache) -> Tensor")
_lib.define("matmul_nbits(Tensor x, Tensor b, Tensor scales, Tensor? zero_points, int k, int n, int bits, "
            "int block_size, int accuracy_level=0, Tensor? bias=None) -> Tensor")


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, S, H * D) -> (B, H, S, D)."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def gqa_reference(q, k, v, past_k, past_v, attention_mask, scale: float, window: int = 0):
    """Causal attention in GroupQueryAttention's layout: q (B, S, Hq * D), k (B, S, Hkv * D), v (B, S, Hkv * Dv),
    past (B, Hkv, P, D|Dv), mask (B, P + S) -> out (B, S, Hq * Dv), present_k, present_v (B, Hkv, P + S, D|Dv)."""
    present_k = torch.cat([past_k, _heads(k, past_k.shape[-1])], 2)
    present_v = torch.cat([past_v, _heads(v, past_v.shape[-1])], 2)
    out = attention_op.reference(_heads(q, past_k.shape[-1]), present_k, present_v, attention_mask, scale, True, window)
    return out.transpose(1, 2).flatten(2), present_k, present_v


def rotary_embedding_reference(x, position_ids, cos_cache, sin_cache):
    """x (B, H, S, D), or (B, S, H * D), rotated by the rows `position_ids` (B, S) of cos/sin caches
    (positions, D / 2)."""
    cos = torch.cat([cos_cache[position_ids]] * 2, -1)
    sin = torch.cat([sin_cache[position_ids]] * 2, -1)
    if x.dim() == 3:
        return rotary_embedding_reference(_heads(x, cos.shape[-1]), position_ids, cos_cache, sin_cache).transpose(
            1, 2).flatten(2)
    half = x.shape[-1] // 2
    rotated = x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]
    return rotated.to(x.dtype)


def dequantize_blocks(b, scales, zero_points, k: int, bits: int, block_size: int) -> torch.Tensor:
    """MatMulNBits' weight as a float (N, K) matrix: (q - zero point) * scale per block of K."""
    n, blocks = scales.shape
    q = int4.unpack(b.reshape(n, -1)) if bits == 4 else b.reshape(n, blocks * block_size)
    if zero_points is None:
        zp = torch.full((n, blocks), float(1 << (bits - 1)))
    elif zero_points.dtype == torch.uint8 and bits == 4:
        zp = int4.unpack(zero_points)[:, :blocks].float()
    else:
        zp = zero_points.float()
    w = (q.float().reshape(n, blocks, block_size) - zp[..., None]) * scales.float()[..., None]
    return w.reshape(n, -1)[:, :k]


def matmul_nbits_reference(x, b, scales, zero_points, k: int, n: int, bits: int, block_size: int,
                           accuracy_level: int = 0, bias=None):
    """(accuracy_level 4's int8 activations are ONNX Runtime's; this reference keeps them float)"""
    w = dequantize_blocks(b, scales, zero_points, k, bits, block_size)
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


_lib.impl("gqa", gqa_reference, "CompositeExplicitAutograd")
_lib.impl("rotary_embedding", rotary_embedding_reference, "CompositeExplicitAutograd")
_lib.impl("matmul_nbits", matmul_nbits_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("lmforge_export::gqa")
def _gqa_fake(q, k, v, past_k, past_v, attention_mask, scale, window=0):
    heads = q.shape[-1] // past_k.shape[-1]
    return (q.new_empty((*q.shape[:2], heads * past_v.shape[-1])), torch.cat([past_k, _heads(k, past_k.shape[-1])], 2),
            torch.cat([past_v, _heads(v, past_v.shape[-1])], 2))


@torch.library.register_fake("lmforge_export::rotary_embedding")
def _rotary_embedding_fake(x, position_ids, cos_cache, sin_cache):
    return torch.empty_like(x)


@torch.library.register_fake("lmforge_export::matmul_nbits")
def _matmul_nbits_fake(x, b, scales, zero_points, k, n, bits, block_size, accuracy_level=0, bias=None):
    return x.new_empty((*x.shape[:-1], n))


gqa = torch.ops.lmforge_export.gqa.default
matmul_nbits = torch.ops.lmforge_export.matmul_nbits.default
rotary_embedding = torch.ops.lmforge_export.rotary_embedding.default


# --- translations (onnxscript, traced: the arguments are the graph's values, the attributes Python values) ---


def _rms_norm(x, weight, eps: float, out_dtype=None, cast_before_weight: bool = False):
    return op.SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=eps, stash_type=1)


def _add_rms_norm(x, residual, weight, eps: float, out_dtype=None, cast_before_weight: bool = False):
    y, _mean, _inv_std, total = _ms.SkipSimplifiedLayerNormalization(x, residual, weight, epsilon=eps,
                                                                       _outputs=4)
    return y, total


def _rotary(x, cos, sin):
    half, dim = x.shape[-1] // 2, x.shape[-1]
    axis = op.Constant(value_ints=[-1])
    first = op.Slice(x, op.Constant(value_ints=[0]), op.Constant(value_ints=[half]), axis)
    second = op.Slice(x, op.Constant(value_ints=[half]), op.Constant(value_ints=[dim]), axis)
    return op.Add(op.Mul(x, cos), op.Mul(op.Concat(op.Neg(second), first, axis=-1), sin))


def _rotary_embedding(x, position_ids, cos_cache, sin_cache):
    return _ms.RotaryEmbedding(x, position_ids, cos_cache, sin_cache, interleaved=0)


def _glu(gate, up, act: str):
    if act == "silu":
        a = op.Mul(gate, op.Sigmoid(gate))
    elif act == "gelu":  # x/2 (1 + erf(x / sqrt 2))
        a = op.Mul(op.Mul(gate, op.CastLike(0.5, gate)),
                   op.Add(op.CastLike(1.0, gate), op.Erf(op.Mul(gate, op.CastLike(0.7071067811865476, gate)))))
    elif act == "gelu_tanh":  # x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        inner = op.Mul(op.CastLike(0.7978845608028654, gate),
                       op.Add(gate, op.Mul(op.CastLike(0.044715, gate), op.Mul(gate, op.Mul(gate, gate)))))
        a = op.Mul(op.Mul(gate, op.CastLike(0.5, gate)), op.Add(op.CastLike(1.0, gate), op.Tanh(inner)))
    else:
        raise ValueError(f"no ONNX form for the activation {act!r}")
    return op.Mul(a, up)


def _gqa(q, k, v, past_k, past_v, attention_mask, scale: float, window: int = 0):
    head_dim, kv_heads = past_k.shape[3], past_k.shape[1]
    # onnxruntime-genai's convention: seqlens_k = (tokens the mask keeps) - 1, total = the mask's length
    seqlens_k = op.Cast(op.Sub(op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0),
                               op.Constant(value_int=1)), to=_INT32)
    total = op.Cast(op.Squeeze(op.Shape(attention_mask, start=1, end=2)), to=_INT32)
    return _ms.GroupQueryAttention(
        q, k, v, past_k, past_v, seqlens_k, total, num_heads=q.shape[2] // head_dim, kv_num_heads=kv_heads,
        scale=scale, local_window_size=window if window > 0 else -1, _outputs=3)


def _matmul_nbits(x, b, scales, zero_points, k: int, n: int, bits: int, block_size: int, accuracy_level: int = 0,
                  bias=None):
    return _ms.MatMulNBits(x, b, scales, zero_points, None, bias, K=k, N=n, bits=bits, block_size=block_size,
                           accuracy_level=accuracy_level)


TRANSLATIONS = {
    torch.ops.lmforge.rms_norm.default: _rms_norm,
    torch.ops.lmforge.add_rms_norm.default: _add_rms_norm,
    torch.ops.lmforge.rotary.default: _rotary,
    torch.ops.lmforge.glu.default: _glu,
    gqa: _gqa,
    rotary_embedding: _rotary_embedding,
    matmul_nbits: _matmul_nbits,
}
