"""The rewrite that applies a `ShardPlan`: cut the weights, give sharded values their per-rank shapes (and
reshapes their per-rank sizes), insert the collectives, and record on `ir.tensor_parallel` what was done.

Every node it changes keeps its global args and spec in `meta["tp_global"]`, and every node it adds has
`meta["tp_inserted"]`: that is what `unshard` needs to give back the one-device graph.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx

from lmforge.codegen.collectives import all_gather, all_reduce
from lmforge.ir.graph import GraphIR, KVLayerSpec
from lmforge.ir.spec import TensorSpec
from lmforge.ir.tensor_parallel import CollectiveCount, TensorParallel, WeightCut, runs
from lmforge.passes.shard.linear import as_linear, tensor_cuts
from lmforge.passes.shard.plan import LayerPlan, Piece, ShardPlan

aten = torch.ops.aten


def local_spec(spec: TensorSpec, axis: int, size: int) -> TensorSpec:
    shape = list(spec.shape)
    shape[axis] = size
    return replace(spec, shape=tuple(shape))


def _remember(node: fx.Node) -> None:
    if "tp_global" not in node.meta:
        node.meta["tp_global"] = {"args": node.args, "kwargs": dict(node.kwargs), "spec": node.meta.get("spec")}


def _added(node: fx.Node, spec) -> fx.Node:
    node.meta["spec"], node.meta["tp_inserted"] = spec, True
    return node


class _Cutter:
    """Cuts weights into per-rank slices, once per (weight, axis, layout): a weight read by one node is cut in
    place; one with other readers (a tied table) gets a sliced copy, `<attr>_tp`."""

    def __init__(self, ir: GraphIR, tp: int):
        self.ir = ir
        self.rank_weights: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
        self.cuts: dict[str, WeightCut] = {}
        self.done: dict[tuple, str] = {}  # (attr, axis, layout) -> sharded attr

    def __call__(self, get: fx.Node, axis: int, idx: tuple[torch.Tensor, ...], user: fx.Node) -> fx.Node:
        """A get_attr of the weight's per-rank slices along `axis`, for `user`."""
        ir, graph = self.ir, self.ir.graph
        attr = get.target
        key = (attr, axis, tuple(tuple(i.tolist()) for i in idx))
        if key not in self.done:
            full = ir.weight(attr)
            shape = list(full.shape)
            top = int(max(int(i.max()) for i in idx)) + 1 if len(idx[0]) else shape[axis]
            if top > shape[axis]:  # zero padding (the final projection's vocabulary)
                pad = list(full.shape)
                pad[axis] = top - shape[axis]
                full = torch.cat([full, full.new_zeros(pad)], dim=axis)
            readers = [n for n in graph.nodes if n.op == "get_attr" and n.target == attr]
            alone = readers == [get] and len(get.users) == 1
            new = attr if alone else ir.unique_attr(f"{attr}_tp")
            source = ir.weight_names.get(attr, attr) + ("" if alone else ".tp")
            kind = ir.weight_kind(attr)
            for r, i in enumerate(idx):
                self.rank_weights[r][new] = full.index_select(axis, i).contiguous()
            ir.set_weight(new, self.rank_weights[0][new], source_name=source, kind=kind)
            self.cuts[new] = WeightCut(axis, tuple(shape), tuple(runs(i.tolist()) for i in idx),
                                       "slice" if alone else "copy")
            self.done[key] = new
        new = self.done[key]
        spec = TensorSpec(tuple(self.rank_weights[0][new].shape), self.rank_weights[0][new].dtype)
        if new == get.target:
            _remember(get)
            get.meta["spec"] = spec
            return get
        with graph.inserting_before(user):
            fresh = _added(graph.get_attr(new), spec)
        if "tp_global" in user.meta:  # unsharded, the new attribute holds the whole weight: read it there too
            g = user.meta["tp_global"]
            g["args"] = tuple(fresh if a is get else a for a in g["args"])
        return fresh


def apply(ir: GraphIR, plan: ShardPlan) -> dict[str, int]:
    """Rewrite `ir` by `plan` (from `propagate.plan` on this same graph); returns the pass's stats."""
    graph, tp = ir.graph, plan.tp
    nodes = {n.name: n for n in graph.nodes}
    cut = _Cutter(ir, tp)
    layers = {p: [(nodes[name], l) for name, l in plan.layers.items() if l.placement == p] for p in ("column", "row", "vocab")}
    for node, layer in layers["column"]:
        _column_parallel(ir, node, layer, cut)
    for node, layer in layers["row"]:
        _row_parallel(ir, node, layer.layout.indices(), cut, tp)
    _local_sizes(plan, nodes, skip={n.name for n, _ in layers["column"]})
    for node, layer in layers["vocab"]:
        _vocab_parallel(ir, node, layer.layout.indices(), cut, tp)
    kv = list(ir.kv.layers)
    for name, heads in plan.kv_heads.items():
        cache = nodes[name]
        _remember(cache)
        cache.meta["spec"] = local_spec(cache.meta["spec"], 1, heads)
        i = int(cache.name.rsplit("_", 1)[1])
        kv[i] = KVLayerSpec(heads, kv[i].k_head_dim, kv[i].v_head_dim)
    ir.kv = replace(ir.kv, layers=kv)
    _gather_logits(graph, plan, tp)
    graph.eliminate_dead_code()
    ir.prune_weights()
    ir.tensor_parallel = _record(ir, plan, cut)
    return {"column-layers": len(layers["column"]), "row-layers": len(layers["row"]),
            "replicated-layers": len(plan.replicated), "all-reduces": ir.tensor_parallel.collectives["all_reduce"].count}


def _column_parallel(ir: GraphIR, node: fx.Node, layer: LayerPlan, cut: _Cutter) -> None:
    """x @ W_r: each rank computes its slice of the output features (its rows of W, and of the bias)."""
    lin = as_linear(ir, node)
    args = list(node.args)
    _remember(node)
    for pos, axis, idx in tensor_cuts(lin, "column", layer.layout.indices()):
        args[pos] = cut(node.args[pos], axis, idx, node)
    node.args = tuple(args)
    node.meta["spec"] = local_spec(node.meta["spec"], layer.layout.axis, layer.layout.local)


def _local_sizes(plan: ShardPlan, nodes: dict[str, fx.Node], skip: set[str]) -> None:
    """Per-rank sizes into the shape arguments of reshapes, splits and slices, and per-rank specs onto every
    sharded value (but `skip`'s, whose specs are already local)."""
    for name, p in plan.reshapes.items():
        node = nodes[name]
        _remember(node)
        shape = list(node.args[1])
        if shape[p.axis] != -1:
            shape[p.axis] = p.size
        node.args = (node.args[0], shape, *node.args[2:])
        node.meta["spec"] = local_spec(node.meta["spec"], p.axis, p.size)
    for name, local in plan.splits.items():
        node = nodes[name]
        _remember(node)
        axis = plan.values[node.args[0].name].axis
        size_arg = local[0] if node.target is aten.split.Tensor else list(local)
        node.args = (node.args[0], size_arg, *node.args[2:])
        node.meta["spec"] = tuple(local_spec(p, axis, n) for p, n in zip(node.meta["spec"], local))
    for name, (a, b) in plan.slices.items():
        node = nodes[name]
        _remember(node)
        args = list(node.args) + [None] * (4 - len(node.args))
        args[2], args[3] = a, b
        node.args = tuple(args[:max(4, len(node.args))])
        node.meta["spec"] = local_spec(node.meta["spec"], plan.values[name].axis, b - a)
    skip = skip | set(plan.reshapes) | set(plan.splits) | set(plan.slices)
    for name, p in plan.values.items():
        if name in skip:
            continue
        node = nodes[name]
        spec = node.meta.get("spec")
        if isinstance(p, Piece) and isinstance(spec, TensorSpec) and spec.shape[p.axis] != p.size:
            _remember(node)
            node.meta["spec"] = local_spec(spec, p.axis, p.size)
        elif isinstance(p, tuple) and isinstance(spec, tuple):  # a split along another axis
            _remember(node)
            node.meta["spec"] = tuple(local_spec(q, x.axis, x.size) if x is not None else q for q, x in zip(spec, p))


def _record(ir: GraphIR, plan: ShardPlan, cut: _Cutter) -> TensorParallel:
    """What was done, for `ir.tensor_parallel`: the cuts of the weights the graph still reads, the replicated
    layers it still has, the collectives."""
    rank_weights = [{a: t for a, t in w.items() if a in cut.cuts and hasattr(ir.gm, a)} for w in cut.rank_weights]
    cuts = {a: c for a, c in cut.cuts.items() if hasattr(ir.gm, a)}
    for attr, c in cuts.items():  # a copy made for a tied weight whose original no reader kept takes the original's name
        name = ir.weight_names.get(attr, "")
        if c.role == "copy" and name[:-3] not in ir.weight_names.values():
            ir.weight_names[attr] = name[:-3]
            cuts[attr] = replace(c, role="slice")
    collectives = {op: CollectiveCount(sum(1 for c in plan.collectives if c.op == op),
                                       sum(c.elements_per_token for c in plan.collectives if c.op == op))
                   for op in ("all_reduce", "all_gather")}
    kept = {n.name for n in ir.graph.nodes}
    return TensorParallel(plan.tp, cuts, {r.layer: r.why for r in plan.replicated if r.node in kept}, collectives,
                          rank_weights)


def _row_parallel(ir: GraphIR, node: fx.Node, idx: tuple[torch.Tensor, ...], cut: _Cutter, tp: int) -> None:
    """x_r @ W_r -> all_reduce(...) (+ the bias, once): each rank multiplies its features by its columns of W."""
    graph = ir.graph
    lin = as_linear(ir, node)
    args = list(node.args)
    _remember(node)
    for pos, axis, weight_idx in tensor_cuts(lin, "row", idx):
        args[pos] = cut(node.args[pos], axis, weight_idx, node)
    bias = lin.bias
    if bias is not None:
        if node.target is aten.addmm.default:
            node.target = aten.mm.default
            args = args[1:]
        else:
            args[lin.bias_pos] = None
    node.args = tuple(args)
    users = list(node.users)
    with graph.inserting_after(node):
        last = _added(graph.call_function(all_reduce, (node, tp)), node.meta["spec"])
    if bias is not None:
        with graph.inserting_after(last):
            last = _added(graph.call_function(aten.add.Tensor, (last, bias)), node.meta["spec"])
    for u in users:
        u.replace_input_with(node, last)


def _vocab_parallel(ir: GraphIR, node: fx.Node, idx: tuple[torch.Tensor, ...], cut: _Cutter, tp: int) -> None:
    """embedding(W, ids) -> all_reduce(embedding(W_r, clamp(ids - start_r)) * (ids in W_r's rows)): each rank
    looks up the ids its slice of the table holds and contributes zeros for the others."""
    graph = ir.graph
    table, ids, *rest = node.args
    per = len(idx[0])
    users = list(node.users)
    _remember(node)
    local_table = cut(table, 0, idx, node)
    start = ir.unique_attr(f"{table.target}_tp_start")  # each rank's first row: a per-rank constant
    for r in range(tp):
        cut.rank_weights[r][start] = torch.tensor([r * per])
    ir.set_weight(start, cut.rank_weights[0][start], source_name=f"{ir.weight_names.get(table.target, table.target)}"
                  f".tp_start", kind="buffer")
    cut.cuts[start] = WeightCut(0, (tp,), tuple(((r, r + 1),) for r in range(tp)), "offset")
    ids_spec = ids.meta["spec"]
    mask_spec = replace(ids_spec, dtype=torch.bool)
    with graph.inserting_before(node):
        first = _added(graph.get_attr(start), TensorSpec((1,), torch.int64))
        local = _added(graph.call_function(aten.sub.Tensor, (ids, first)), ids_spec)
        low = _added(graph.call_function(aten.ge.Scalar, (local, 0)), mask_spec)
        high = _added(graph.call_function(aten.lt.Scalar, (local, per)), mask_spec)
        mine = _added(graph.call_function(aten.bitwise_and.Tensor, (low, high)), mask_spec)
        safe = _added(graph.call_function(aten.clamp.default, (local, 0, per - 1)), ids_spec)
    node.args = (local_table, safe, *rest)
    spec = node.meta["spec"]
    with graph.inserting_after(node):
        keep = _added(graph.call_function(aten.unsqueeze.default, (mine, -1)), replace(mask_spec, shape=(*mask_spec.shape, 1)))
    with graph.inserting_after(keep):
        masked = _added(graph.call_function(aten.mul.Tensor, (node, keep)), spec)
    with graph.inserting_after(masked):
        reduced = _added(graph.call_function(all_reduce, (masked, tp)), spec)
    for u in users:
        u.replace_input_with(node, reduced)


def _gather_logits(graph: fx.Graph, plan: ShardPlan, tp: int) -> None:
    """Column-parallel logits -> all_gather along the vocabulary (and a slice that drops the padding)."""
    out = next(n for n in graph.nodes if n.op == "output")
    logits = out.args[0][0]
    p = plan.values.get(logits.name)
    if not isinstance(p, Piece):
        return
    global_spec = logits.meta.get("tp_global", {}).get("spec", logits.meta["spec"])
    vocab = global_spec.shape[-1]
    with graph.inserting_before(out):
        last = _added(graph.call_function(all_gather, (logits, -1, tp)), local_spec(logits.meta["spec"], p.axis, p.size * tp))
    if p.size * tp != vocab:
        with graph.inserting_before(out):
            last = _added(graph.call_function(aten.slice.Tensor, (last, -1, 0, vocab)), global_spec)
    out.args = ((last,),)
