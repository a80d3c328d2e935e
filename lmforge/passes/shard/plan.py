"""`ShardPlan`: what the shard pass will do to a graph, as data a person can read (`format()` prints it).

Propagation (`propagate.py`) produces it without touching the graph; the rewrite (`rewrite.py`) applies it.
Nodes are named as in the printed IR (`lmforge inspect --ir`), layers and weights as in the source model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmforge.ir.tensor_parallel import Runs, WeightCut, indices


@dataclass(frozen=True)
class Layout:
    """Which global indices along `axis` each rank holds, as [start, stop) runs (past the end: padding)."""

    axis: int
    ranks: tuple[Runs, ...]

    @property
    def local(self) -> int:
        """Indices per rank."""
        return sum(b - a for a, b in self.ranks[0])

    def indices(self) -> tuple[torch.Tensor, ...]:
        return tuple(indices(r) for r in self.ranks)


@dataclass(frozen=True)
class Piece:
    """A sharded value's per-rank shape: `size` along `axis`."""

    axis: int
    size: int


@dataclass(frozen=True)
class LayerPlan:
    """One layer that shards: a linear layer (column: its output features are cut; row: its input features) or a
    token lookup (vocab: the table's rows)."""

    node: str
    layer: str
    placement: str  # "column" | "row" | "vocab"
    layout: Layout  # column: output features; row: input features; vocab: table rows
    why: str


@dataclass(frozen=True)
class WeightPlan:
    """How one weight is cut, and for which layer."""

    weight: str  # its name in the source model
    placement: str  # "column" | "row" | "vocab"
    cut: WeightCut
    why: str
    readers: tuple[str, ...]  # the nodes that read this cut


@dataclass(frozen=True)
class CollectivePlan:
    """A collective the rewrite inserts after `node`."""

    op: str  # "all_reduce" | "all_gather"
    node: str  # the node whose output it combines
    layer: str
    why: str
    elements_per_token: int  # each rank's contribution


@dataclass(frozen=True)
class ReplicatedLayer:
    node: str
    layer: str
    why: str


@dataclass
class ShardPlan:
    tp: int
    layers: dict[str, LayerPlan] = field(default_factory=dict)  # node -> decision, in graph order
    weights: list[WeightPlan] = field(default_factory=list)
    collectives: list[CollectivePlan] = field(default_factory=list)
    replicated: list[ReplicatedLayer] = field(default_factory=list)  # linear layers kept whole, and why
    reshapes: dict[str, Piece] = field(default_factory=dict)  # view/reshape node -> its sharded axis, per-rank size
    splits: dict[str, tuple[int, ...]] = field(default_factory=dict)  # split along the sharded axis -> piece sizes
    slices: dict[str, tuple[int, int]] = field(default_factory=dict)  # slice of the sharded axis -> local range
    kv_heads: dict[str, int] = field(default_factory=dict)  # KV cache input -> heads per rank
    values: dict[str, Piece | tuple[Piece | None, ...]] = field(default_factory=dict)  # every sharded value

    def format(self) -> str:
        """The plan as tables: weights, collectives, replicated layers, per-rank sizes."""
        count = {p: sum(1 for l in self.layers.values() if l.placement == p) for p in ("column", "row", "vocab")}
        ops = [c.op for c in self.collectives]
        lines = [f"tensor-parallel plan, tp={self.tp}: {count['column']} column-parallel, {count['row']} row-parallel, "
                 f"{count['vocab']} vocab-parallel and {len(self.replicated)} replicated layers; per step "
                 f"{_many(ops.count('all_reduce'), 'all-reduce')}, {_many(ops.count('all_gather'), 'all-gather')}"]
        if self.weights:
            lines += ["", "weights:"]
            lines += _table(["weight", "placement", "axis", "global", *(f"rank {r}" for r in range(self.tp)), "why"],
                            [[w.weight, w.placement, str(w.cut.axis), "x".join(map(str, w.cut.shape)),
                              *(_runs(r) for r in w.cut.ranks), w.why] for w in self.weights])
        if self.collectives:
            lines += ["", "collectives:"]
            lines += _table(["op", "after", "layer", "elements/token", "why"],
                            [[c.op, f"%{c.node}", c.layer, str(c.elements_per_token), c.why] for c in self.collectives])
        lines += ["", "replicated layers:" if self.replicated else "replicated layers: none"]
        lines += [f"  {r.layer} (%{r.node}): {r.why}" for r in self.replicated]
        sizes = ([[f"%{n}", "reshape", f"axis {p.axis}: {p.size}"] for n, p in self.reshapes.items()]
                 + [[f"%{n}", "split", f"pieces {list(s)}"] for n, s in self.splits.items()]
                 + [[f"%{n}", "slice", f"[{a}, {b})"] for n, (a, b) in self.slices.items()]
                 + [[f"%{n}", "kv cache", f"{h} heads"] for n, h in self.kv_heads.items()])
        if sizes:
            lines += ["", "per-rank sizes:"]
            lines += _table(["node", "what", "per rank"], sizes)
        return "\n".join(lines)

    __str__ = format


def _many(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _runs(rank_runs: Runs) -> str:
    return " ".join(f"[{a},{b})" for a, b in rank_runs)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart, the last one unpadded."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return ["  " + "  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]) for r in [header, *rows]]
