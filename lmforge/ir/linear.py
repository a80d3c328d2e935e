"""What a linear layer is: the one recognizer that quantize, shard, the runtime's weight layouts and the cost
model share.

A linear layer is `y = x @ W.T + b` on a weight W (out_features, in_features) that the graph reads with a
`get_attr`. The capture and the passes give it these forms:

    linear(x, W[, b])                  W as the attribute holds it
    linear(x, t(A)[, b])               A = W.T (in, out), read through a transpose
    mm(x, A) / matmul(x, A)            A = W.T, as GPT-2's Conv1D holds it
    mm(x, t(W)) / matmul(x, t(W))      W read through a transpose
    addmm(b, x, A) / addmm(b, x, t(W)) the same with a bias (beta = alpha = 1)
    an lmforge op with `OpFacts.linear` (lmforge.linear, int4_linear, fp8_linear, int8_linear): its own form

`as_linear` says which form a node has, or None; callers add their own conditions (a trained weight, a
dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from lmforge.ir.ops import LinearForm, op_facts

aten = torch.ops.aten
TRANSPOSES = {aten.t.default, aten.permute.default, aten.transpose.int}


@dataclass(frozen=True)
class Linear:
    node: fx.Node
    form: LinearForm  # where x, the weight tensors (with their out and in axes) and the bias are
    weight: fx.Node  # the get_attr of the (first) weight tensor
    transposed: bool  # that attribute holds W.T (in_features, out_features)
    through: fx.Node | None = None  # the transpose between the get_attr and the op, if any

    @property
    def x(self) -> fx.Node:
        return self.node.args[self.form.x_pos]

    @property
    def bias(self):
        pos = self.form.bias_pos
        if pos is None:
            return None
        if pos < len(self.node.args):
            return self.node.args[pos]
        schema = getattr(self.node.target, "_schema", None)  # a bias passed by keyword
        name = schema.arguments[pos].name if schema is not None and pos < len(schema.arguments) else None
        return self.node.kwargs.get(name) if name else None


def _weight(arg) -> tuple[fx.Node, fx.Node | None] | None:
    """(get_attr, transpose or None) when `arg` reads a 2-D weight, directly or through one transpose."""
    through = None
    if isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in TRANSPOSES:
        if arg.target is aten.permute.default and list(arg.args[1]) != [1, 0]:
            return None
        if arg.target is aten.transpose.int and arg.args[1] % 2 == arg.args[2] % 2:  # transpose(W, d, d): W
            return None
        through, arg = arg, arg.args[0]
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return None
    shape = getattr(arg.meta.get("spec"), "shape", ())
    return (arg, through) if len(shape) == 2 else None


def as_linear(node: fx.Node) -> Linear | None:
    """The linear layer `node` is, or None."""
    if node.op != "call_function":
        return None
    t = node.target
    facts = op_facts(t)
    if facts is not None and facts.linear is not None:
        form = facts.linear(node)
        found = _weight(node.args[form.weights[0][0]])
        return Linear(node, form, found[0], False) if found and found[1] is None else None
    if t is aten.linear.default and len(node.args) >= 2:
        x_pos, w_pos, bias_pos, held_transposed = 0, 1, 2, False
    elif t in (aten.mm.default, aten.matmul.default) and len(node.args) == 2:
        x_pos, w_pos, bias_pos, held_transposed = 0, 1, None, True
    elif t is aten.addmm.default and len(node.args) == 3:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        x_pos, w_pos, bias_pos, held_transposed = 1, 2, 0, True
    else:
        return None
    found = _weight(node.args[w_pos])
    if found is None:
        return None
    weight, through = found
    transposed = held_transposed != (through is not None)  # a transpose in between flips what the attribute holds
    out_axis = 1 if held_transposed else 0  # of the argument as the op reads it
    form = LinearForm(x_pos, ((w_pos, out_axis, 1 - out_axis, "col"),), bias_pos)
    return Linear(node, form, weight, transposed, through)


def find_linears(graph: fx.Graph) -> list[Linear]:
    """Every linear layer in `graph`, in order."""
    return [lin for lin in map(as_linear, graph.nodes) if lin is not None]
