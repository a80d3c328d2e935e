"""fuse-rotary: each rotate-half rotary embedding, eight ATen ops, becomes one `lmforge.rotary`.

The rewrite:

    x * cos + cat([-x[..., D/2:], x[..., :D/2]], -1) * sin      ->      lmforge.rotary(x, cos, sin)

(either operand order in the products and the sum). The op's reference is those very ops, so nothing
changes numerically; partial rotary (GPT-NeoX, Phi) matches on the rotated slice. A chain whose pieces are
used elsewhere is left alone.

Why: a decode step rotates q and k in every layer; as one op that is one call instead of eight, and on the
CPU one pass of the `rotary_bf16` kernel. Where: after `convert-dtype` (cos and sin then arrive already cast
to the activations' dtype) and before `constant-fold`.
"""

from __future__ import annotations

import torch
from torch import fx

from lmforge.codegen.rotary import rotary
from lmforge.ir.graph import GraphIR
from lmforge.ir.spec import TensorSpec
from lmforge.ir.pass_manager import PROPERTIES, PassResult, register_pass
from lmforge.ir.match import only_user, other, replace_match

aten = torch.ops.aten


def _slice(node, x, dim: int, start: int, end: int | None) -> bool:
    """Is `node` x[..., start:end] along dim `dim` (end None: to the end)?"""
    if not (isinstance(node, fx.Node) and node.target is aten.slice.Tensor and node.args[0] is x):
        return False
    args = tuple(node.args) + (0, 0, None, 1)[len(node.args) - 1:]
    d, s, e, step = args[1:5]
    rank = len(x.meta["spec"].shape)
    size = x.meta["spec"].shape[-1]
    full_end = e is None or (isinstance(e, int) and e >= size)
    return d % rank == dim % rank and s == start and step == 1 and (full_end if end is None else e == end)


def _match(cat: fx.Node):
    """cat -> (x, cos, sin, add, nodes) when `cat` is rotate_half(x) inside x * cos + rotate_half(x) * sin."""
    parts, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else 0
    if len(parts) != 2 or not isinstance(parts[0], fx.Node) or parts[0].target is not aten.neg.default:
        return None
    hi = parts[0].args[0]
    x = hi.args[0] if isinstance(hi, fx.Node) and hi.target is aten.slice.Tensor else None
    spec = x.meta.get("spec") if isinstance(x, fx.Node) else None
    if not isinstance(spec, TensorSpec) or len(spec.shape) != 4 or not isinstance(spec.shape[-1], int):
        return None
    half = spec.shape[-1] // 2
    if spec.shape[-1] % 2 or dim % 4 != 3 or not _slice(hi, x, 3, half, None) or not _slice(parts[1], x, 3, 0, half):
        return None
    mul_sin = only_user(cat)
    if mul_sin is None or mul_sin.target is not aten.mul.Tensor:
        return None
    sin = other(mul_sin, cat)
    add = only_user(mul_sin)
    if add is None or add.target is not aten.add.Tensor:
        return None
    mul_cos = other(add, mul_sin)
    if not (isinstance(mul_cos, fx.Node) and mul_cos.target is aten.mul.Tensor and x in mul_cos.args[:2]
            and len(mul_cos.users) == 1):
        return None
    cos = other(mul_cos, x)
    if not all(isinstance(t, fx.Node) and isinstance(t.meta.get("spec"), TensorSpec) for t in (cos, sin)):
        return None
    if len(parts[0].users) != 1 or len(hi.users) != 1 or len(parts[1].users) != 1:
        return None
    return x, cos, sin, add, {cat, parts[0], hi, parts[1], mul_sin, mul_cos, add}


@register_pass("fuse-rotary", requires=("specs", "unfolded", "unsharded"), preserves=PROPERTIES)
def fuse_rotary(ir: GraphIR, options) -> PassResult:
    graph = ir.graph
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.cat.default:
            continue
        match = _match(node)
        if match is None:
            continue
        x, cos, sin, add, nodes = match
        replace_match(ir, add, rotary, (x, cos, sin), nodes)
        fused += 1
    return PassResult(fused > 0, {"fused": fused})

