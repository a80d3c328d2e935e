"""Index arithmetic for reshapes and slices of a sharded value: where the sharded axis lands, and which global
indices each rank holds there."""

from __future__ import annotations

import math

import torch
from torch import fx

from lmforge.passes.shard.placement import Sharded


def _static(dims) -> bool:
    return all(isinstance(d, int) for d in dims)


def map_view(ins: tuple, outs: tuple, s: Sharded) -> tuple[int, tuple[torch.Tensor, ...]] | str:
    """Where the sharded axis lands after a reshape from `ins` to `outs`, and the per-rank indices there; or why
    the reshape cannot keep the sharding."""
    a = s.axis
    if not _static(ins[a:]):
        return "the sharded axis or those after it are symbolic"
    inner = math.prod(ins[a + 1:])
    block = ins[a] * inner
    j, prod = len(outs), 1
    while j > 0 and isinstance(outs[j - 1], int) and prod < block:
        j -= 1
        prod *= outs[j]
    while j > 0 and outs[j - 1] == 1 and prod == block:  # size-1 axes (one head) join the sharded block
        j -= 1
    if prod != block:
        return f"the reshape {list(ins)} -> {list(outs)} mixes the sharded axis with the leading ones"
    u = math.prod(outs[j + 1:])
    new = []
    for idx in s.idx:
        if u >= inner:
            f = u // inner
            if u % inner or len(idx) % f:
                return "the reshape splits the sharded axis off its slices"
            out = idx[::f] // f
            if not torch.equal(idx, (out[:, None] * f + torch.arange(f)).flatten()):
                return "a rank's slice does not hold whole blocks of the reshaped axis"
        else:
            if inner % u:
                return "the reshape splits the axes after the sharded one unevenly"
            m = inner // u
            out = (idx[:, None] * m + torch.arange(m)).flatten()
        new.append(out)
    return j, tuple(new)


def slice_dim(node: fx.Node, rank: int) -> int:
    """The axis `aten.slice.Tensor` slices, for an input of `rank` dimensions."""
    return (node.args[1] if len(node.args) > 1 else 0) % rank


def slice_range(node: fx.Node, size: int) -> tuple[int, int]:
    """[start, end) of `aten.slice.Tensor` along its axis of `size`, with Python's clamping of negatives."""
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
    start, end = (v + size if v < 0 else v for v in (start, end))
    return max(0, min(start, size)), max(0, min(end, size))
