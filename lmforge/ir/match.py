"""The rewrite toolkit the fusion passes share: walking a match, evaluating a subgraph, replacing a match.

A fusion finds its pattern by walking from an anchor node (`only_user`, `other`, `strip`), raises `NoMatch`
with the reason when the pattern does not hold (the pass counts the reasons in its stats), checks what
structure cannot say by evaluating subgraphs on probe inputs (`ancestors`, `evaluate`), and only then, with
the whole match in hand, rewrites it with `replace_match`. Nothing changes until a match is complete.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import fx

from lmforge.ir.graph import GraphIR


class NoMatch(Exception):
    """Why a pattern did not match; the message is what the pass's stats (and `inspect`) show."""


def only_user(node: fx.Node, why: str | None = None) -> fx.Node | None:
    """`node`'s one user; None when it has several or none, or `NoMatch(why)` when a reason is given."""
    if len(node.users) == 1:
        return next(iter(node.users))
    if why is not None:
        raise NoMatch(why)
    return None


def other(node: fx.Node, this) -> object:
    """The operand of the binary op `node` that is not `this`."""
    a, b = node.args[:2]
    return b if a is this else a


def strip(node, through: Iterable, nodes: set | None = None):
    """Follow ops in `through` (casts, clones, ...) back to the value they carry, adding them to `nodes`. A
    cast that changes more than the dtype (a device, a layout) is not stripped."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in through:
        if node.target is torch.ops.aten._to_copy.default and set(node.kwargs) - {"dtype"}:
            break
        if nodes is not None:
            nodes.add(node)
        node = node.args[0]
    return node


def ancestors(node: fx.Node) -> list[fx.Node]:
    """`node` and everything it depends on, in graph order."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def mutates(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable


def evaluate(ir: GraphIR, node: fx.Node, inputs: dict[str, torch.Tensor]):
    """The value of `node` with the graph's placeholders bound to `inputs` (by name) and its weights."""
    env: dict[fx.Node, object] = {}
    load = lambda a: env[a] if isinstance(a, fx.Node) else a  # noqa: E731
    for n in ancestors(node):
        if n.op == "placeholder":
            env[n] = inputs[n.name]
        elif n.op == "get_attr":
            env[n] = getattr(ir.gm, n.target)
        else:
            env[n] = n.target(*fx.node.map_aggregate(n.args, load),
                              **{k: fx.node.map_aggregate(v, load) for k, v in n.kwargs.items()})
    return env[node]


def replace_match(ir: GraphIR, out: fx.Node, target, args: tuple, nodes: set[fx.Node]) -> fx.Node:
    """Put `target(*args)` in place of the match's output `out` and erase the match's `nodes` that nothing else
    reads any more (users first). The new node takes `out`'s spec."""
    graph = ir.graph
    with graph.inserting_before(out):
        new = graph.call_function(target, args)
    new.meta["spec"] = out.meta["spec"]
    out.replace_all_uses_with(new)
    for n in reversed(list(graph.nodes)):
        if n in nodes and not n.users:
            graph.erase_node(n)
    return new
