"""fuse-add-rmsnorm: a residual add and the `lmforge.rms_norm` that reads it become one `lmforge.add_rms_norm`.

The rewrite, for every norm whose input is an add of two tensors of its shape and dtype:

    h = add(x, r)                             y, h = add_rms_norm(x, r, w, eps, out_dtype, cast_before_weight)
    y = rms_norm(h, w, eps, out_dtype, c)  ->    (getitem 0 and 1; h keeps its other users: the next residual add)

The op computes exactly the add and then the norm (its reference is these two ops), so the graph's numbers
do not change. An add that broadcasts, has an `alpha`, or whose sum is read before the norm (the fused op
sits where the norm was) is left alone and counted in the stats with the reason.

Why: a pre-norm transformer runs this pair twice per layer and once before its head; on a decode step's one
row per sequence each op costs its dispatch more than its arithmetic, and on the CPU the pair is one pass
of `cpu/norm.c`. ONNX Runtime's SkipSimplifiedLayerNormalization is the same op. Where: after
`fuse-rmsnorm`, which makes the norms it looks for.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from lmforge.codegen.add_rms_norm import add_rms_norm
from lmforge.codegen.rms_norm import rms_norm
from lmforge.ir.graph import GraphIR
from lmforge.ir.pass_manager import PROPERTIES, PassResult, register_pass
from lmforge.ir.spec import spec_of
from lmforge.ir.match import NoMatch

aten = torch.ops.aten


def _is_add(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is aten.add.Tensor


def _match(norm: fx.Node, order: dict[fx.Node, int]) -> tuple[fx.Node, fx.Node]:
    """The add feeding `norm` and its two tensors, or NoMatch with the reason."""
    add = norm.args[0]
    if add.kwargs or len(add.args) != 2 or not all(isinstance(a, fx.Node) for a in add.args):
        raise NoMatch("not an add of two tensors")
    out = spec_of(add)
    if out is None or any(spec_of(a) is None or spec_of(a).shape != out.shape or spec_of(a).dtype != out.dtype
                          for a in add.args):
        raise NoMatch("the add broadcasts or casts")
    if any(order[user] < order[norm] for user in add.users if user is not norm):
        raise NoMatch("the sum is read before the norm")
    return add.args[0], add.args[1]


@register_pass("fuse-add-rmsnorm", requires=("specs", "unsharded"), preserves=PROPERTIES)
def fuse_add_rmsnorm(ir: GraphIR, options) -> PassResult:
    stats: dict[str, int] = {"fused": 0}
    graph = ir.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    for norm in list(graph.nodes):
        if norm.op != "call_function" or norm.target is not rms_norm or not _is_add(norm.args[0]):
            continue  # (a norm of anything but an add, such as the first layer's of the embedding, is no candidate)
        try:
            x, residual = _match(norm, order)
        except NoMatch as e:
            stats[f"unfused: {e}"] = stats.get(f"unfused: {e}", 0) + 1
            continue
        add = norm.args[0]
        with graph.inserting_before(norm):
            fused = graph.call_function(add_rms_norm, (x, residual, *norm.args[1:]), dict(norm.kwargs))
            normed = graph.call_function(operator.getitem, (fused, 0))
            total = graph.call_function(operator.getitem, (fused, 1))
        fused.meta["spec"] = (norm.meta["spec"], add.meta["spec"])
        normed.meta["spec"], total.meta["spec"] = norm.meta["spec"], add.meta["spec"]
        norm.replace_all_uses_with(normed)
        graph.erase_node(norm)
        add.replace_all_uses_with(total)
        graph.erase_node(add)
        for node in (fused, normed, total):
            order[node] = order[norm]  # where the norm was
        stats["fused"] += 1
    if stats["fused"]:
        ir.gm.recompile()
    return PassResult(stats["fused"] > 0, stats)
