"""The prefill graph: the step graph with the final projection computed for the last position only.

A prompt's prefill needs the next-token logits of its last position alone, but the step graph projects
every position onto the vocabulary: at 32 prompt tokens, SmolLM-135M's 49152-wide head is most of the
prefill's matmul work. `last_position_graph` derives a second graph from the loaded one that slices the
final projection's input to the last position,

    h = final_norm(...)                    (batch, seq, hidden)
    h = h[:, -1:]                          (batch, 1, hidden)      <- inserted
    logits = linear(h, W_vocab)            (batch, 1, vocab)

and shares every weight with it. The KV cache writes, attention and norms are untouched, so the cache
after a prefill is the same; `Engine.forward` (every position's logits, as perplexity needs) keeps the
full graph. Only nodes that work per position may sit between the projection and the output (casts, a
gather or slice along the vocabulary); any other graph gets no prefill graph and the engine uses the full one.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch
from torch import fx

from lmforge.codegen.collectives import all_gather
from lmforge.ir.graph import GraphIR
from lmforge.ir.linear import as_linear
from lmforge.ir.ops import op_facts
from lmforge.ir.spec import TensorSpec

aten = torch.ops.aten
_PER_POSITION = {aten._to_copy.default}  # and, on the last axis: slice, lmforge.all_gather


def _last_axis(node: fx.Node) -> bool:
    """A slice or gather along the last (vocabulary) axis: per position."""
    spec = node.meta.get("spec")
    rank = len(spec.shape) if isinstance(spec, TensorSpec) else 0
    if node.target is aten.slice.Tensor or op_facts(node.target) is op_facts(all_gather):
        return rank > 0 and node.args[1] in (-1, rank - 1)
    return False


def _projection(out: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The final projection feeding the graph's logits, and the per-position nodes after it; or None."""
    node = out.args[0][0]
    after: list[fx.Node] = []
    while isinstance(node, fx.Node) and as_linear(node) is None:
        if node.op != "call_function" or not (node.target in _PER_POSITION or _last_axis(node)):
            return None
        after.append(node)
        node = node.args[0]
    return (node, after) if isinstance(node, fx.Node) else None


def last_position_graph(ir: GraphIR) -> fx.GraphModule | None:
    """A GraphModule computing what `ir.gm` does, with the logits of the last position only, (batch, 1, vocab);
    None when the graph's end does not have the form above."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = next(n for n in ir.graph.nodes if n.op == "output")
    if len(out.args[0]) != 1:
        return None
    found = _projection(out)
    if found is None:
        return None
    projection, after = found
    x = as_linear(projection).x
    spec = x.meta.get("spec")
    if not (isinstance(spec, TensorSpec) and len(spec.shape) == 3 and spec.shape[1] == "seq"):
        return None
    for node in ir.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node is x:
            last = graph.call_function(aten.slice.Tensor, (env[node], 1, -1, sys.maxsize))
            last.meta["spec"] = replace(spec, shape=(spec.shape[0], 1, spec.shape[2]))
        elif node is projection:
            env[node].replace_input_with(env[x], last)
    for node in (projection, *after):  # the logits' specs: one position
        copy = env[node]
        s = copy.meta.get("spec")
        if isinstance(s, TensorSpec) and len(s.shape) == 3:
            copy.meta = {**copy.meta, "spec": replace(s, shape=(s.shape[0], 1, s.shape[2]))}
    return fx.GraphModule(ir.gm, graph)
