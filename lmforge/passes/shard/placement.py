"""Placements, the values propagation works with: a node's output is replicated (None) or `Sharded` along one
axis, each rank holding a known list of the global indices there; a node with several outputs (a split) has a
tuple of them. `Propagation` holds every node's placement and the decisions the rules take on the way."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn

import torch
from torch import fx

from lmforge.ir.graph import GraphIR


@dataclass(frozen=True)
class Sharded:
    axis: int
    idx: tuple[torch.Tensor, ...]  # per rank: the global indices along `axis` it holds, in local order
    roots: frozenset  # the column layers this value comes from

    @property
    def local(self) -> int:
        return len(self.idx[0])

    def same_layout(self, other: "Sharded") -> bool:
        return all(torch.equal(a, b) for a, b in zip(self.idx, other.idx))


class Unshardable(Exception):
    """A sharded value reached an op that cannot take it; its column layers stay replicated."""

    def __init__(self, node: fx.Node, reason: str, roots: frozenset):
        super().__init__(reason)
        self.node, self.reason, self.roots = node, reason, roots


Fail = Callable[[str], NoReturn]  # a rule's way to refuse its node, with the reason


@dataclass
class Propagation:
    """Every node's placement after one walk over the graph, and what the rules decided for the rewrite."""

    ir: GraphIR
    tp: int
    replicated: dict[fx.Node, str]  # linear layers kept whole (from earlier rounds) -> why
    place: dict[fx.Node, Any] = field(default_factory=dict)  # node -> Sharded | tuple of (Sharded | None) | None
    column: dict[fx.Node, tuple[Sharded, str]] = field(default_factory=dict)  # column layer -> output layout, why
    row: dict[fx.Node, Sharded] = field(default_factory=dict)  # row layers -> their input layout
    caches: dict[fx.Node, Sharded] = field(default_factory=dict)  # KV cache inputs -> their layout (axis 1: heads)
    embeddings: dict[fx.Node, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # token lookup -> rows per rank
    views: dict[fx.Node, tuple[int, int]] = field(default_factory=dict)  # reshape -> (out axis, local size)
    splits: dict[fx.Node, list[int]] = field(default_factory=dict)  # split along the sharded axis -> local sizes
    slices: dict[fx.Node, tuple[int, int]] = field(default_factory=dict)  # slice of the sharded axis -> local range

    def get(self, arg):
        """The placement of an argument (None for a replicated value or a constant)."""
        return self.place.get(arg) if isinstance(arg, fx.Node) else None

    def sharded_inputs(self, node: fx.Node) -> list[Sharded]:
        if node.target is operator.getitem:
            p = self.place.get(node.args[0])
            return [p[node.args[1]]] if isinstance(p, tuple) and isinstance(p[node.args[1]], Sharded) else []
        found = []
        for a in node.all_input_nodes:
            p = self.place.get(a)
            if isinstance(p, Sharded):
                found.append(p)
            elif isinstance(p, tuple):
                found.extend(q for q in p if isinstance(q, Sharded))
        return found
