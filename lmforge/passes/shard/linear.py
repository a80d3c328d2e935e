"""The linear layers tensor parallelism cuts, in every form the graph holds them: which argument is x, which are
the weight tensors (and along which axes their output and input features lie) and which is the bias.

    aten.linear(x, W, b)       W (out, in)
    aten.mm / aten.matmul(x, A) A = W.T (in, out): GPT-2's Conv1D, Falcon's x @ W.T
    aten.addmm(b, x, A)        the same with a bias
    lmforge.linear(x, W, b)    as aten.linear (the CPU runtime's GEMV)
    a quantized op             its scheme's handler says (`OpFacts.linear`, which is the handler's `linear_form`)

Which nodes are linear layers is `lmforge.ir.linear`'s to say (quantize, the runtime's layouts and the cost
model ask it too); this module adds what the rewrite needs to cut one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from lmforge.ir.graph import GraphIR
from lmforge.ir.linear import as_linear as recognize

aten = torch.ops.aten


@dataclass
class Linear:
    """A linear layer in any of its forms: which args are x, the weights (with their output and input axes) and
    the bias."""

    node: fx.Node
    x_pos: int
    # per tensor: (arg position, out axis, in axis or None, input unit: "col", "byte" (two columns a byte) or
    # "group" (`group` columns an element))
    weights: list[tuple[int, int, int | None, str]]
    bias_pos: int | None
    group: int = 1  # int4: columns per group

    @property
    def x(self) -> fx.Node:
        return self.node.args[self.x_pos]

    @property
    def bias(self):
        return self.node.args[self.bias_pos] if self.bias_pos is not None and self.bias_pos < len(self.node.args) else None


def as_linear(ir: GraphIR, node: fx.Node) -> Linear | None:
    """The linear layer `node` is (`lmforge.ir.linear`'s recognizer), in the forms the rewrite can cut: its
    weights read straight from get_attrs, and an addmm without beta or alpha (a row layer becomes an mm)."""
    lin = recognize(node)
    if lin is None or lin.through is not None or (node.target is aten.addmm.default and node.kwargs):
        return None
    form = lin.form
    return Linear(node, form.x_pos, list(form.weights), form.bias_pos, form.group)


def layer_name(ir: GraphIR, lin: Linear) -> str:
    """The layer's name in the source model: its weight's name without `.weight` / `.qweight`."""
    name = ir.weight_names.get(lin.node.args[lin.weights[0][0]].target, lin.node.name)
    for suffix in (".weight", ".qweight"):
        name = name.removesuffix(suffix)
    return name


def out_features(ir: GraphIR, lin: Linear) -> int:
    pos, out_axis, _, _ = lin.weights[0]
    return ir.weight(lin.node.args[pos].target).shape[out_axis]


def tensor_cuts(lin: Linear, placement: str, idx: tuple[torch.Tensor, ...]) -> list[tuple[int, int, tuple[torch.Tensor, ...]]]:
    """(arg position, axis, per-rank indices) of every tensor a `placement` ("column" or "row") layer cuts, when
    `idx` are the output (column) or input (row) features each rank holds. A column layer cuts its weights'
    output axes and its bias; a row layer its weights' input axes, in their units (int4: bytes, groups), and
    keeps its bias whole (it is added once, after the all-reduce)."""
    if placement == "column":
        cuts = [(pos, out_axis, idx) for pos, out_axis, _, _ in lin.weights]
        return cuts + ([(lin.bias_pos, 0, idx)] if lin.bias is not None else [])
    return [(pos, in_axis, unit_indices(unit, idx, lin.group)) for pos, _, in_axis, unit in lin.weights
            if in_axis is not None]


def unit_indices(unit: str, idx: tuple[torch.Tensor, ...], group: int) -> tuple[torch.Tensor, ...]:
    """Input-feature indices in a tensor's own units: a packed byte holds two columns, a group `group`."""
    if unit == "byte":
        return tuple(i[::2] // 2 for i in idx)
    if unit == "group":
        return tuple(i[::group] // group for i in idx)
    return idx
