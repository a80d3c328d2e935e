"""What tensor parallelism leaves on a graph: `GraphIR.tensor_parallel`, and the artifact manifest's summary of it.

The shard pass (`passes/shard/`) cuts some weights between `tp` ranks and inserts the collectives; what it
did is a `TensorParallel`, None on a one-device graph:

    TensorParallel
      tp             ranks
      weights        gm attribute -> WeightCut: how that sharded weight was cut
      replicated     layer -> why it was left whole (a linear layer whose output met an op it cannot shard)
      collectives    "all_reduce" / "all_gather" -> CollectiveCount (count, elements per token)
      rank_weights   rank r's tensors of the sharded attributes (the graph module holds rank 0's); not saved

Saved in `graph.json` as {"tp", "weights": {attr: {"axis", "shape", "ranks"}}, "replicated", "collectives":
{kind: {"count", "elements_per_token"}}} (`to_json` / `from_json`; the keys are the file format's). The
artifact's manifest carries a summary for tools (`TensorParallelSummary`): its rank files and the bytes
that cross between ranks per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

Runs = tuple[tuple[int, int], ...]  # indices as [start, stop) runs, in order: [0, 1, 2, 5, 6] -> ((0, 3), (5, 7))

# what a cut attribute is (the marker `param_count` reads):
#   "slice"   a rank's slice of one of the model's weights
#   "copy"    the shard pass's sliced copy of a weight that other readers keep whole (a tied table); counted once
#   "offset"  a per-rank constant the pass made (where a rank's rows of a vocab-parallel table start)
CUT_ROLES = ("slice", "copy", "offset")
# the graph format marks a "copy" and an "offset" by its source name's suffix; reading a file turns that back
# into `WeightCut.role`
_ROLE_SUFFIXES = {".tp_start": "offset", ".tp": "copy"}


def runs(indices: Iterable[int]) -> Runs:
    """Indices as [start, stop) runs: [0, 1, 2, 5, 6] -> ((0, 3), (5, 7))."""
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1][1] += 1
        else:
            out.append([i, i + 1])
    return tuple((a, b) for a, b in out)


def indices(rank_runs: Runs) -> torch.Tensor:
    """The indices `rank_runs` stands for, in order (int64)."""
    return torch.cat([torch.arange(a, b) for a, b in rank_runs]) if rank_runs else torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class WeightCut:
    """How one sharded weight is cut: rank r holds the global tensor's indices `ranks[r]` along `axis`, in that
    order; indices at or past `shape[axis]` are zero padding (a vocabulary padded to a multiple of tp)."""

    axis: int
    shape: tuple[int, ...]  # the global (one-device) shape
    ranks: tuple[Runs, ...]  # one entry per rank
    role: str = "slice"  # one of CUT_ROLES; not saved (the source name's suffix says it)

    def to_json(self) -> dict[str, Any]:
        return {"axis": self.axis, "shape": list(self.shape), "ranks": [[list(r) for r in rr] for rr in self.ranks]}

    @classmethod
    def from_json(cls, raw: dict[str, Any], source_name: str) -> "WeightCut":
        role = next((r for suffix, r in _ROLE_SUFFIXES.items() if source_name.endswith(suffix)), "slice")
        ranks = tuple(tuple((int(a), int(b)) for a, b in rr) for rr in raw["ranks"])
        return cls(int(raw["axis"]), tuple(int(d) for d in raw["shape"]), ranks, role)

    @property
    def numel(self) -> int:
        """Elements of the global weight."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class CollectiveCount:
    """The collectives of one kind a forward step runs, and the activation elements per token they carry (each
    rank's contribution)."""

    count: int
    elements_per_token: int

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "elements_per_token": self.elements_per_token}


@dataclass
class TensorParallel:
    """What the shard pass did to a graph (see the module docstring)."""

    tp: int
    weights: dict[str, WeightCut]
    replicated: dict[str, str] = field(default_factory=dict)
    collectives: dict[str, CollectiveCount] = field(default_factory=dict)
    rank_weights: list[dict[str, torch.Tensor]] = field(default_factory=list, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"tp": self.tp, "weights": {attr: cut.to_json() for attr, cut in self.weights.items()},
                "replicated": dict(self.replicated),
                "collectives": {kind: c.to_json() for kind, c in self.collectives.items()}}

    @classmethod
    def from_json(cls, raw: dict[str, Any], weight_names: dict[str, str]) -> "TensorParallel":
        """Parse `to_json`'s output (any artifact's); raises KeyError, TypeError or ValueError when malformed."""
        if not isinstance(raw.get("tp"), int):
            raise ValueError("tp is not a whole number")
        weights = {attr: WeightCut.from_json(cut, weight_names.get(attr, attr)) for attr, cut in raw.get("weights", {}).items()}
        collectives = {kind: CollectiveCount(int(c["count"]), int(c["elements_per_token"]))
                       for kind, c in raw.get("collectives", {}).items()}
        return cls(raw["tp"], weights, dict(raw.get("replicated", {})), collectives)


@dataclass(frozen=True)
class TensorParallelSummary:
    """The artifact manifest's "tensor_parallel": what a tool needs without reading the graph."""

    tp: int
    files: tuple[str, ...]  # the rank files, rank 0 first
    sharded_weights: int
    replicated_layers: dict[str, str]  # layer -> why it was left whole
    all_reduces_per_step: int
    bytes_all_reduced_per_token: int  # each rank's contribution, summed over the step's all-reduces
    bytes_all_gathered_per_token: int  # the gathered result (every rank's part)

    @classmethod
    def of(cls, tp: TensorParallel, element_size: int, files: Iterable[str]) -> "TensorParallelSummary":
        """The summary of `tp`, for activations of `element_size` bytes."""
        none = CollectiveCount(0, 0)
        reduce, gather = tp.collectives.get("all_reduce", none), tp.collectives.get("all_gather", none)
        return cls(tp.tp, tuple(files), len(tp.weights), dict(tp.replicated), reduce.count,
                   reduce.elements_per_token * element_size, gather.elements_per_token * element_size * tp.tp)

    def to_json(self) -> dict[str, Any]:
        return {"tp": self.tp, "files": list(self.files), "sharded_weights": self.sharded_weights,
                "replicated_layers": dict(self.replicated_layers), "all_reduces_per_step": self.all_reduces_per_step,
                "bytes_all_reduced_per_token": self.bytes_all_reduced_per_token,
                "bytes_all_gathered_per_token": self.bytes_all_gathered_per_token}

    @classmethod
    def from_json(cls, raw: dict[str, Any] | None) -> "TensorParallelSummary | None":
        """The manifest's entry (None or absent for a one-device artifact)."""
        if not raw:
            return None
        return cls(int(raw["tp"]), tuple(raw.get("files", ())), int(raw.get("sharded_weights", 0)),
                   dict(raw.get("replicated_layers", {})), int(raw.get("all_reduces_per_step", 0)),
                   int(raw.get("bytes_all_reduced_per_token", 0)), int(raw.get("bytes_all_gathered_per_token", 0)))
