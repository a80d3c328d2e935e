"""How a column-parallel layer's output features are cut between the ranks: in whole heads where they meet
attention, per piece where a split or a slice cuts them apart (GPT-2's fused q/k/v), a whole key/value head
per rank when there are fewer heads than ranks (GQA), and padded to a multiple of tp at the logits."""

from __future__ import annotations

import operator

import torch
from torch import fx

from lmforge.errors import PassError
from lmforge.ir.spec import TensorSpec
from lmforge.passes.shard.kinds import op_kind
from lmforge.passes.shard.linear import Linear, layer_name, out_features
from lmforge.passes.shard.placement import Sharded
from lmforge.passes.shard.reshape import slice_dim, slice_range


def column_layout(ir, tp: int, lin: Linear) -> tuple[Sharded, str]:
    """The output layout of a column layer (its features cut per rank, in whole heads and per split piece), and
    why it is cut so."""
    n = out_features(ir, lin)
    name = layer_name(ir, lin)
    segments, units = _structure(lin.node, n)
    idx: list[list[torch.Tensor]] = [[] for _ in range(tp)]
    why: list[str] = []
    for start, stop in segments:
        unit = units.get(start, 1)
        count = (stop - start) // unit
        if count % tp == 0:
            per = count // tp
            picks = [range(r * per, (r + 1) * per) for r in range(tp)]
            reason = f"output features in whole heads of {unit}" if unit > 1 else "output features"
        elif tp % count == 0 and unit > 1:
            picks = [range(r * count // tp, r * count // tp + 1) for r in range(tp)]
            heads = f"{count} head{'s' if count > 1 else ''} of {unit}"
            reason = f"{heads}, each held whole by {tp // count} ranks (fewer heads than ranks)"
        elif len(segments) == 1 and unit == 1 and reaches_output(lin.node):
            per = -(-count // tp)  # padded: the logits are gathered and cut back to count
            picks = [range(r * per, (r + 1) * per) for r in range(tp)]
            reason = f"output features padded from {count} to {per * tp}, gathered at the logits"
        else:
            what = f"{count} heads of {unit}" if unit > 1 else f"{count} output features"
            raise PassError(f"shard: tp={tp} does not divide the {what} of {name}")
        if reason not in why:
            why.append(reason)
        for r, pick in enumerate(picks):
            idx[r].append(torch.cat([start + torch.arange(u * unit, (u + 1) * unit) for u in pick]))
    pieces = f", cut per piece of {len(segments)}" if len(segments) > 1 else ""
    layout = Sharded(len(lin.node.meta["spec"].shape) - 1, tuple(torch.cat(i) for i in idx), frozenset([lin.node]))
    return layout, f"column-parallel: {'; '.join(why)}{pieces}"


def _structure(root: fx.Node, n: int) -> tuple[list[tuple[int, int]], dict[int, int]]:
    """Segments of the root's features that a split cuts apart, and the head size of each (by segment start),
    found by following the features through views, elementwise ops and splits."""
    segments: list[tuple[int, int]] = []
    units: dict[int, int] = {}
    # each frontier entry: a node and the root features along its last axis, as (start, stop)
    frontier = [(root, 0, n)]
    seen = set()
    while frontier:
        node, start, stop = frontier.pop()
        if (node, start) in seen:
            continue
        seen.add((node, start))
        for user in node.users:
            spec = user.meta.get("spec")
            kind = op_kind(user.target) if user.op == "call_function" else None
            ins, outs = node.meta["spec"].shape, spec.shape if isinstance(spec, TensorSpec) else ()
            if kind == "view" and outs and (len(outs) == len(ins) + 1 and isinstance(outs[-1], int)
                                            and isinstance(outs[-2], int) and outs[-1] * outs[-2] == ins[-1]):
                units[start] = outs[-1]  # (..., n) -> (..., heads, head_dim)
            elif kind in ("elementwise", "copy") or (kind == "view" and outs and ins[-1] == outs[-1]):
                if kind == "view" or user.args[0] is node:
                    frontier.append((user, start, stop))
            elif kind == "slice" and outs and slice_dim(user, len(ins)) == len(ins) - 1:
                lo, hi = slice_range(user, ins[-1])
                segments.append((start + lo, start + hi))
                frontier.append((user, start + lo, start + hi))
            elif kind == "split" and user.args[2] % len(ins) == len(ins) - 1:
                sizes = [s.shape[-1] for s in user.meta["spec"]]
                offsets = [start + sum(sizes[:i]) for i in range(len(sizes))]
                for get in user.users:
                    if get.target is operator.getitem:
                        i = get.args[1]
                        segments.append((offsets[i], offsets[i] + sizes[i]))
                        frontier.append((get, offsets[i], offsets[i] + sizes[i]))
    if not segments:
        segments = [(0, n)]
    segments = sorted(set(segments))
    return segments, units


def reaches_output(node: fx.Node) -> bool:
    """Whether the graph returns something computed from `node` (the logits' projection does)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n.op == "output":
            return True
        for u in n.users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return False
