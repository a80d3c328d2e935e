"""constant-fold{max_positions=N}: compute weight-only and position-only subgraphs once, here.

The rewrites:
- a node whose inputs are all weights or literals (a transposed or cast weight, an `inv_freq` reshape) is
  evaluated and replaced by a `get_attr` of the result;
- with `max_positions=N`, a subgraph that depends only on weights and `position_ids`, computing one row per
  token, shaped (batch, seq, ...) (rotary cos/sin tables are the case) is evaluated for positions 0..N-1
  into a table, and replaced by `table[position_ids]`. The rewrite is checked: the subgraph must give the
  table's rows exactly on random positions, or it is left alone (counted as `not_pointwise`).
Why: the runtime stops redoing weight-only work on every token, and later passes see plain weights
(quantization wants `linear(x, W)`, not `linear(x, W.to(bf16))`). Where: after `remove-noops` and after
`convert-dtype` (which leaves weight casts); follow it with `dce`. A fold that would store a large new
tensor while its source stays alive is skipped, and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from lmforge.ir.graph import GraphIR
from lmforge.ir.spec import spec_from_tensor
from lmforge.ir.pass_manager import PROPERTIES, PassResult, register_pass


@dataclass(frozen=True)
class ConstantFoldOptions:
    max_new_bytes: int = 1 << 20  # a fold may add this many bytes while its inputs stay alive (memory guard)
    max_positions: int = 0  # > 0: tabulate position-only subgraphs for positions below this (the cache length)


def _foldable_op(node: fx.Node) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return not any(r.type.kind() != "TensorType" for r in target._schema.returns) and len(target._schema.returns) == 1


@register_pass("constant-fold", options=ConstantFoldOptions, requires=("specs", "unsharded"), establishes=("folded",),
               preserves=PROPERTIES - {"unfolded"})
def constant_fold(ir: GraphIR, options: ConstantFoldOptions) -> PassResult:
    const: dict[fx.Node, torch.Tensor] = {}
    kind: dict[fx.Node, str] = {}
    folded: list[fx.Node] = []
    for node in ir.graph.nodes:
        if node.op == "get_attr":
            const[node] = ir.weight(node.target)
            kind[node] = ir.weight_kind(node.target)
            continue
        if node.op != "call_function" or not _foldable_op(node):
            continue
        inputs = node.all_input_nodes
        if not all(i in const for i in inputs):
            continue
        args = fx.node.map_arg(node.args, lambda n: const[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: const[n])
        with torch.no_grad():
            value = node.target(*args, **kwargs)
        const[node] = value
        kind[node] = "parameter" if inputs and all(kind[i] == "parameter" for i in inputs) else "buffer"
        folded.append(node)

    stats = {"folded": 0, "skipped_large": 0}
    for node in folded:
        if not any(u not in const for u in node.users):
            continue  # an interior node of a folded subgraph, or dead: only frontier nodes become weights
        value = const[node]
        nbytes = value.numel() * value.element_size()
        kept_alive = any(u not in const for i in _weight_sources(node) for u in i.users)
        if nbytes > options.max_new_bytes and kept_alive:
            stats["skipped_large"] += 1
            continue
        attr = ir.unique_attr(f"folded_{node.name}")
        ir.set_weight(attr, value.contiguous(), source_name=f"lmforge.folded.{node.name}", kind=kind[node])
        with ir.graph.inserting_before(node):
            get = ir.graph.get_attr(attr)
        get.meta["spec"] = spec_from_tensor(value)
        node.replace_all_uses_with(get)
        stats["folded"] += 1
    if options.max_positions > 0:
        stats.update(_tabulate_positions(ir, options.max_positions))
    ir.graph.eliminate_dead_code()
    ir.prune_weights()
    return PassResult(stats["folded"] > 0 or stats.get("tabulated", 0) > 0, stats)


def _evaluate(nodes: list[fx.Node], env: dict[fx.Node, torch.Tensor]) -> dict[fx.Node, torch.Tensor]:
    """Run `nodes` (in graph order) on real tensors; `env` holds their inputs."""
    for node in nodes:
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        with torch.no_grad():
            env[node] = node.target(*args, **kwargs)
    return env


def _tabulate_positions(ir: GraphIR, max_positions: int) -> dict[str, int]:
    from lmforge.ir.spec import SymSpec, TensorSpec

    position_ids = next((n for n in ir.graph.nodes if n.op == "placeholder" and n.name == "position_ids"), None)
    if position_ids is None:
        return {}
    weights = {n for n in ir.graph.nodes if n.op == "get_attr"}
    # symbolic batch and seq sizes may shape the subgraph (`inv_freq.expand(batch, -1, 1)`); they are bound
    # to the table's and the probe's sizes when it is evaluated
    sizes = {n: n.meta["spec"].expr for n in ir.graph.nodes
             if isinstance(n.meta.get("spec"), SymSpec) and n.meta["spec"].expr in ("batch", "seq")}
    region: list[fx.Node] = []  # nodes computed from weights, positions and those sizes alone, in graph order
    inside = {position_ids} | weights | set(sizes)
    for node in ir.graph.nodes:
        if node.op == "call_function" and _foldable_op(node) and node.all_input_nodes and node not in inside \
                and all(i in inside for i in node.all_input_nodes):
            region.append(node)
            inside.add(node)
    in_region = set(region)

    def per_token(n: fx.Node) -> bool:
        spec = n.meta.get("spec")
        return isinstance(spec, TensorSpec) and spec.shape[:2] == ("batch", "seq") and all(
            isinstance(d, int) for d in spec.shape[2:])

    # the last per-token nodes: a user outside the region, or one whose shape is no longer (batch, seq, ...)
    frontier = [n for n in region if per_token(n) and any(u not in in_region or not per_token(u) for u in n.users)
                and position_ids in _sources(n)
                and n.target is not torch.ops.aten.embedding.default]  # an embedding is a table lookup already
    if not frontier:
        return {"tabulated": 0}

    consts = {w: ir.weight(w.target) for w in weights}
    device = next(iter(consts.values())).device if consts else torch.device("cpu")

    def run(positions: torch.Tensor) -> dict[fx.Node, torch.Tensor]:
        bound = {n: positions.shape[0 if expr == "batch" else 1] for n, expr in sizes.items()}
        return _evaluate(region, {**consts, **bound, position_ids: positions})

    table_env = run(torch.arange(max_positions, device=device)[None])
    probe_pos = torch.randint(0, max_positions, (2, 5), generator=torch.Generator().manual_seed(0)).to(device)
    probe_env = run(probe_pos)
    stats = {"tabulated": 0, "not_pointwise": 0}
    for node in frontier:
        table = table_env[node][0].contiguous()  # (max_positions, ...)
        if not torch.equal(table[probe_pos], probe_env[node]):
            stats["not_pointwise"] += 1
            continue
        attr = ir.unique_attr(f"table_{node.name}")
        inputs_kind = {ir.weight_kind(w.target) for w in weights if w in _weight_sources(node)}
        ir.set_weight(attr, table, source_name=f"lmforge.table.{node.name}",
                      kind="parameter" if inputs_kind == {"parameter"} else "buffer")
        with ir.graph.inserting_before(node):
            get = ir.graph.get_attr(attr)
            lookup = ir.graph.call_function(torch.ops.aten.index.Tensor, (get, [position_ids]))
        get.meta["spec"] = spec_from_tensor(table)
        lookup.meta["spec"] = node.meta["spec"]
        node.replace_all_uses_with(lookup)
        stats["tabulated"] += 1
    return stats


def _sources(node: fx.Node) -> set[fx.Node]:
    """The graph inputs and weights among `node`'s transitive inputs."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return {n for n in seen if n.op in ("placeholder", "get_attr")}


def _weight_sources(node: fx.Node) -> list[fx.Node]:
    """The get_attr nodes a folded node was computed from."""
    seen, stack, out = set(), [node], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            out.append(n)
        stack.extend(n.all_input_nodes)
    return out
