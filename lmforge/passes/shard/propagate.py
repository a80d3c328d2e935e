"""Propagation: walk the graph in order, placing every value by the rules of `rules.py`, until no sharded value
reaches an op that cannot take it; then describe the outcome as a `ShardPlan`.

A walk that meets such an op leaves the column layers the value came from replicated (with the reason) and
starts again; each round replicates at least one layer, so this settles.
"""

from __future__ import annotations

import torch
from torch import fx

from lmforge.errors import PassError
from lmforge.ir.graph import GraphIR, op_name
from lmforge.ir.spec import TensorSpec
from lmforge.ir.tensor_parallel import WeightCut, runs
from lmforge.passes.shard.kinds import op_kind
from lmforge.passes.shard.linear import as_linear, layer_name, tensor_cuts
from lmforge.passes.shard.placement import Propagation, Sharded, Unshardable
from lmforge.passes.shard.plan import (
    CollectivePlan, LayerPlan, Layout, Piece, ReplicatedLayer, ShardPlan, WeightPlan,
)
from lmforge.passes.shard.rules import RULES, SOURCES


def check(ir: GraphIR, tp: int) -> None:
    """Refuse what cannot be sharded, with a one-line reason."""
    if tp == 0:
        raise PassError("shard: pass tp=N, the number of ranks")
    if tp < 1:
        raise PassError(f"shard: tp must be 1 or more, got {tp}")
    if ir.tensor_parallel:
        raise PassError("shard: the graph is already sharded")
    if ir.kind != "lm":
        raise PassError("shard: only whole language-model graphs can be sharded")


def plan(ir: GraphIR, tp: int) -> ShardPlan:
    """What `shard{tp=N}` does to `ir`, without changing it."""
    check(ir, tp)
    return ShardPlan(tp) if tp == 1 else describe(settle(ir, tp))


def settle(ir: GraphIR, tp: int) -> Propagation:
    """Walk until a walk goes through, replicating the layers of each value that could not go on."""
    replicated: dict[fx.Node, str] = {}
    for _ in range(len(ir.graph.nodes)):
        st = Propagation(ir, tp, replicated)
        try:
            _walk(st)
            return st
        except Unshardable as e:
            where = op_name(e.node.target) if e.node.op == "call_function" else e.node.op
            for root in e.roots:
                replicated[root] = f"its output reaches {where} %{e.node.name}: {e.reason}"
    raise PassError("shard: could not settle which layers to shard")  # pragma: no cover - see the docstring


def _walk(st: Propagation) -> None:
    for node in st.ir.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            _output(st, node)
            continue
        ins = st.sharded_inputs(node)
        kind = op_kind(node.target)
        if not ins and kind not in SOURCES:
            continue
        roots = frozenset().union(*(s.roots for s in ins))

        def fail(reason: str, node=node, roots=roots):
            raise Unshardable(node, reason, roots)

        if kind is None:
            fail("the op has no sharding rule")
        RULES[kind](st, node, fail)


def _output(st: Propagation, node: fx.Node) -> None:
    logits = node.args[0][0]
    s = st.get(logits)
    if s is None:
        return
    rank = len(logits.meta["spec"].shape)
    whole = torch.cat(s.idx)
    if s.axis != rank - 1 or not torch.equal(whole, torch.arange(len(whole))):
        raise Unshardable(node, "the logits are not split in rank order along the vocabulary", s.roots)


# --- the plan ----------------------------------------------------------------------------------------


def _layout(s: Sharded) -> Layout:
    return Layout(s.axis, tuple(runs(i.tolist()) for i in s.idx))


def _per_token_numel(spec: TensorSpec) -> int:
    """Elements per token of a (..., features) activation: its last dimension."""
    last = spec.shape[-1]
    return int(last) if isinstance(last, int) else 0


def describe(st: Propagation) -> ShardPlan:
    """The plan a settled propagation stands for."""
    ir, tp = st.ir, st.tp
    p = ShardPlan(tp)
    order = {n: i for i, n in enumerate(ir.graph.nodes)}
    for node in ir.graph.nodes:
        if node in st.column:
            s, why = st.column[node]
            p.layers[node.name] = LayerPlan(node.name, layer_name(ir, as_linear(ir, node)), "column", _layout(s), why)
        elif node in st.row:
            s = st.row[node]
            sources = ", ".join(sorted({layer_name(ir, as_linear(ir, r)) for r in s.roots}))
            p.layers[node.name] = LayerPlan(node.name, layer_name(ir, as_linear(ir, node)), "row", _layout(s),
                                            f"row-parallel: input features as {sources} cut them")
        elif node in st.embeddings:
            table = ir.weight_names.get(node.args[0].target, node.args[0].target)
            rows = ir.weight(node.args[0].target).shape[0]
            per = len(st.embeddings[node][0])
            padded = f", padded to {per * tp}" if per * tp != rows else ""
            p.layers[node.name] = LayerPlan(node.name, table.removesuffix(".weight"), "vocab",
                                            Layout(0, tuple(runs(i.tolist()) for i in st.embeddings[node])),
                                            f"vocab-parallel: {per} rows of {rows} a rank{padded}")
    _weights(st, p)
    collectives: list[tuple[fx.Node, CollectivePlan]] = []
    for node in st.row:
        layer = p.layers[node.name].layer
        then = ", then its bias" if as_linear(ir, node).bias is not None else ""
        collectives.append((node, CollectivePlan("all_reduce", node.name, layer, f"row-parallel sum of {layer}{then}",
                                                 _per_token_numel(node.meta["spec"]))))
    for node in st.embeddings:
        collectives.append((node, CollectivePlan(
            "all_reduce", node.name, p.layers[node.name].layer,
            "embedding lookup sum: each rank looks up the ids its rows hold, zeros for the others",
            _per_token_numel(node.meta["spec"]))))
    logits = next(n for n in ir.graph.nodes if n.op == "output").args[0][0]
    s = st.get(logits)
    if isinstance(s, Sharded):
        vocab = logits.meta["spec"].shape[-1]
        cut_back = f", cut back to {vocab}" if s.local * tp != vocab else ""
        layer = ", ".join(sorted(layer_name(ir, as_linear(ir, r)) for r in s.roots))
        collectives.append((logits, CollectivePlan("all_gather", logits.name, layer,
                                                   f"logits gather: the vocabulary is column-parallel{cut_back}", s.local)))
    p.collectives = [c for _, c in sorted(collectives, key=lambda nc: order[nc[0]])]
    p.replicated = [ReplicatedLayer(n.name, layer_name(ir, as_linear(ir, n)), why) for n, why in st.replicated.items()]
    p.reshapes = {n.name: Piece(j, size) for n, (j, size) in st.views.items()}
    p.splits = {n.name: tuple(local) for n, local in st.splits.items()}
    p.slices = {n.name: ab for n, ab in st.slices.items()}
    p.kv_heads = {n.name: s.local for n, s in st.caches.items()}
    for node, q in st.place.items():
        if isinstance(q, Sharded):
            p.values[node.name] = Piece(q.axis, q.local)
        elif isinstance(q, tuple):
            p.values[node.name] = tuple(Piece(x.axis, x.local) if isinstance(x, Sharded) else None for x in q)
    return p


def _weights(st: Propagation, p: ShardPlan) -> None:
    """Every weight cut, in the order the rewrite cuts them: column layers, row layers, token tables."""
    ir, found = st.ir, {}

    def add(get: fx.Node, axis: int, idx, placement: str, why: str, reader: str, role: str = "slice") -> None:
        key = (get.target, axis, tuple(tuple(i.tolist()) for i in idx))
        if key in found:  # one cut, several readers (a tied table: the lookup and the final projection)
            w = found[key]
            both = w.placement == placement
            found[key] = WeightPlan(w.weight, w.placement if both else f"{w.placement}+{placement}", w.cut,
                                    w.why if both else f"{w.why}; {why}", (*w.readers, reader))
            return
        cut = WeightCut(axis, tuple(ir.weight(get.target).shape), tuple(runs(i.tolist()) for i in idx), role)
        found[key] = WeightPlan(ir.weight_names.get(get.target, get.target), placement, cut, why, (reader,))

    for placement, layers in (("column", st.column), ("row", st.row)):
        for node in layers:
            lin, plan = as_linear(ir, node), p.layers[node.name]
            units = {pos: unit for pos, _, _, unit in lin.weights}
            for pos, axis, idx in tensor_cuts(lin, placement, plan.layout.indices()):
                why = plan.why
                if pos == lin.bias_pos:
                    why = "column-parallel: the bias, with its layer's output features"
                elif placement == "row" and units[pos] != "col":
                    why += " (two columns a byte)" if units[pos] == "byte" else f" ({lin.group} columns an element)"
                add(node.args[pos], axis, idx, placement, why, node.name)
    for node, idx in st.embeddings.items():
        plan = p.layers[node.name]
        add(node.args[0], 0, idx, "vocab", plan.why, node.name)
        first = WeightCut(0, (st.tp,), tuple(((r, r + 1),) for r in range(st.tp)), "offset")
        name = f"{ir.weight_names.get(node.args[0].target, node.args[0].target)}.tp_start"
        found[(name,)] = WeightPlan(name, "vocab", first, "vocab-parallel: the row each rank's slice starts at",
                                    (node.name,))
    p.weights = list(found.values())
