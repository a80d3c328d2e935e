"""fuse-qkv-attention: the ops from a fused q/k/v projection to the attention output become one `lmforge.qkv_attention`.

The rewrite, for every `lmforge.attention` whose inputs and output have exactly this form:

    q, k, v = split_with_sizes(qkv, [Hq*D, Hkv*D, Hkv*Dv], -1)         (fuse-linears' split, its only users)
    q = view(q, [B, S, -1|Hq, D]).transpose(1, 2)      and so k, v
    q, k = rotary(q, cos, sin), rotary(k, cos, sin)                     (both with one cos/sin, or neither)
    out = attention(q, k, v, k_cache, v_cache, mask, scale, causal, window)
    o = view|reshape(out.transpose(1, 2), [B, S, -1|Hq*Dv])

becomes `o = qkv_attention(qkv, cos, sin, k_cache, v_cache, mask, Hq, Hkv, D, Dv, scale, causal, window)`, which
computes the same ops (`codegen/qkv_attention.py`). Every intermediate must have its one user in the chain;
anything else (per-head q/k norms between the view and the rotary, a partial rotary, a layer whose q/k/v were
not fused) is left as it was and counted in the stats with the reason.

Why: fifteen ops per layer become one call, and on the CPU a decode step's call is one C function. Where:
in the load pipeline on the CPU, after fuse-linears (which makes the fused projection) and before
bind-cpu-kernels (which binds the new op like the others). Only the loaded graph changes.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from lmforge.codegen.attention import attention
from lmforge.codegen.qkv_attention import qkv_attention
from lmforge.codegen.rotary import rotary
from lmforge.ir.graph import GraphIR
from lmforge.ir.match import NoMatch, replace_match
from lmforge.ir.pass_manager import PROPERTIES, PassResult, register_pass

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _one_user(node: fx.Node) -> fx.Node:
    if len(node.users) != 1:
        raise NoMatch("an intermediate value has other users")
    return next(iter(node.users))


def _call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _head_view(x: fx.Node) -> tuple[fx.Node, int, int]:
    """x = view(getitem(split, i), [B, S, H, D]).transpose(1, 2): (split, i, D)."""
    if not (_call(x, (aten.transpose.int,)) and tuple(x.args[1:]) in ((1, 2), (2, 1))):
        raise NoMatch("an attention input is not a transposed view")
    view = x.args[0]
    if not (_call(view, _VIEWS) and len(view.args[1]) == 4 and isinstance(view.args[1][3], int)):
        raise NoMatch("an attention input is not a (batch, seq, heads, head_dim) view")
    piece = view.args[0]
    if not (_call(piece, (operator.getitem,)) and _call(piece.args[0], (aten.split_with_sizes.default,))):
        raise NoMatch("q, k and v are not pieces of one fused projection")
    for node in (x, view, piece):
        _one_user(node)
    return piece.args[0], piece.args[1], view.args[1][3]


def _match(att: fx.Node) -> tuple[tuple, fx.Node, set[fx.Node]]:
    """The new node's arguments, the node it replaces, and the chain's nodes."""
    if att.kwargs or not 7 <= len(att.args) <= 9:
        raise NoMatch("attention with keyword arguments")
    q, k, v, k_cache, v_cache, mask, scale, causal, window = list(att.args) + [True, 0][len(att.args) - 7:]
    cos = sin = None
    chain = {att}
    if _call(q, (rotary,)) or _call(k, (rotary,)):
        if not (_call(q, (rotary,)) and _call(k, (rotary,)) and q.args[1:] == k.args[1:]):
            raise NoMatch("q and k are not rotated alike")
        cos, sin = q.args[1:]
        for r in (q, k):
            _one_user(r)
        chain |= {q, k}
        q, k = q.args[0], k.args[0]
    (split, iq, d), (split_k, ik, dk), (split_v, iv, dv) = _head_view(q), _head_view(k), _head_view(v)
    if not (split is split_k is split_v and (iq, ik, iv) == (0, 1, 2) and d == dk):
        raise NoMatch("q, k and v are not the three pieces of one split, in order")
    qkv, sizes, dim = split.args[0], list(split.args[1]), split.args[2] if len(split.args) > 2 else 0
    spec = qkv.meta.get("spec")
    if spec is None or len(spec.shape) != 3 or dim not in (-1, 2) or len(sizes) != 3 or len(split.users) != 3:
        raise NoMatch("the split is not the projection's three pieces along its last axis")
    if sizes[0] % d or sizes[1] % d or sizes[2] % dv or sizes[1] // d != sizes[2] // dv:
        raise NoMatch("the split's sizes are not whole heads")
    q_heads, kv_heads = sizes[0] // d, sizes[1] // d
    for x in (q, k, v):
        chain |= {x, x.args[0], x.args[0].args[0]}
    chain.add(split)
    t = _one_user(att)
    if not (_call(t, (aten.transpose.int,)) and tuple(t.args[1:]) in ((1, 2), (2, 1))):
        raise NoMatch("the attention output is not transposed back")
    out = _one_user(t)
    if not (_call(out, _VIEWS) and len(out.args[1]) == 3):
        raise NoMatch("the attention output is not reshaped to (batch, seq, heads * head_dim)")
    chain |= {t, out}
    new_args = (qkv, cos, sin, k_cache, v_cache, mask, q_heads, kv_heads, d, dv, scale, causal, window)
    return new_args, out, chain


@register_pass("fuse-qkv-attention", requires=("specs",), preserves=PROPERTIES)
def fuse_qkv_attention(ir: GraphIR, options) -> PassResult:
    stats: dict[str, int] = {"fused": 0}
    graph = ir.graph
    for att in list(graph.nodes):
        if att.op != "call_function" or att.target is not attention:
            continue
        try:
            args, out, chain = _match(att)
        except NoMatch as e:
            stats[f"unfused: {e}"] = stats.get(f"unfused: {e}", 0) + 1
            continue
        replace_match(ir, out, qkv_attention, args, chain)
        stats["fused"] += 1
    if stats["fused"]:
        ir.gm.recompile()
    return PassResult(stats["fused"] > 0, stats)
