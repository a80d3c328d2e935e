"""Undoing and redoing the shard pass: the one-device graph back from a sharded one (`unshard`, with the
global weights `assemble` puts together from the ranks' slices), one rank's own graph (`for_rank`), and an
artifact's graph sharded for another number of ranks (`reshard`)."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import fx, nn

from lmforge.ir.graph import GraphIR, KVLayerSpec
from lmforge.ir.spec import TensorSpec
from lmforge.ir.tensor_parallel import WeightCut, indices
from lmforge.ir.pass_manager import PassManager

aten = torch.ops.aten


def unshard(ir: GraphIR, weights: dict[str, torch.Tensor]) -> None:
    """Turn a sharded graph back into the one-device graph it came from; `weights` gives the global tensor of
    every sharded attribute (`assemble` builds them from the ranks' slices)."""
    graph = ir.graph
    for node in list(graph.nodes):
        if node.meta.get("tp_inserted") and node.op == "call_function":
            node.replace_all_uses_with(node.args[0])
    for node in list(reversed(graph.nodes)):
        if node.meta.get("tp_inserted") and not node.users:
            graph.erase_node(node)
    for node in graph.nodes:
        g = node.meta.pop("tp_global", None)
        if g is not None:
            if node.op == "call_function":
                node.args, node.kwargs = g["args"], g["kwargs"]
                if node.target is aten.mm.default and len(node.args) == 3:
                    node.target = aten.addmm.default
            node.meta["spec"] = g["spec"]
    for attr, tensor in weights.items():
        ir.set_weight(attr, tensor)
    for node in graph.nodes:
        if node.op == "get_attr" and node.target in weights:
            node.meta["spec"] = TensorSpec(tuple(weights[node.target].shape), weights[node.target].dtype)
            node.meta.pop("tp_inserted", None)
    layers = list(ir.kv.layers)
    for node in graph.nodes:
        if node.op == "placeholder" and node.name.startswith("k_cache_"):
            i = int(node.name.rsplit("_", 1)[1])
            layers[i] = KVLayerSpec(node.meta["spec"].shape[1], layers[i].k_head_dim, layers[i].v_head_dim)
    ir.kv = replace(ir.kv, layers=layers)
    graph.eliminate_dead_code()
    ir.prune_weights()
    ir.tensor_parallel = None
    ir.gm.recompile()


def assemble(cuts: dict[str, WeightCut], rank_weights: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The global tensor of every sharded attribute, from each rank's slice (padding dropped)."""
    out = {}
    for attr, cut in cuts.items():
        axis, shape = cut.axis, list(cut.shape)
        full = rank_weights[0][attr].new_zeros(shape)
        for r, rank_runs in enumerate(cut.ranks):
            idx = indices(rank_runs)
            keep = idx < shape[axis]
            full.index_copy_(axis, idx[keep], rank_weights[r][attr].index_select(axis, torch.nonzero(keep).flatten()))
        out[attr] = full
    return out


def for_rank(ir: GraphIR, rank: int) -> GraphIR:
    """Rank `rank`'s own graph: the same nodes over its slices of the sharded weights."""
    if not ir.tensor_parallel:
        return ir
    root = nn.Module()
    for attr, tensor in ir.gm.named_buffers():
        root.register_buffer(attr, ir.tensor_parallel.rank_weights[rank].get(attr, tensor))
    graph = copy.deepcopy(ir.graph)
    return replace(ir, gm=fx.GraphModule(root, graph), weight_names=dict(ir.weight_names),
                   weight_kinds=dict(ir.weight_kinds), history=list(ir.history),
                   tensor_parallel=replace(ir.tensor_parallel, rank_weights=[]))


def reshard(ir: GraphIR, per_rank_weights: list[dict[str, torch.Tensor]], tp: int, rank: int) -> GraphIR:
    """`ir` (sharded for len(per_rank_weights) ranks, or not at all) as rank `rank` of `tp`; `per_rank_weights[r]`
    holds rank r's tensors by source name, as its rank file does."""
    if ir.tensor_parallel:
        cuts = ir.tensor_parallel.weights
        by_attr = [{attr: part[ir.weight_names[attr]] for attr in cuts} for part in per_rank_weights]
        unshard(ir, assemble(cuts, by_attr))
    if tp > 1:
        PassManager(f"shard{{tp={tp}}}").run(ir)  # its entry joins the artifact's pass history
        ir = for_rank(ir, rank)
    return ir
