"""The propagation rules, one function per kind of op (`kinds.py` says which op is which kind).

A rule sees a node whose inputs' placements are known and sets the node's own, recording what the rewrite
must change (per-rank sizes in shape arguments, the KV cache's heads). It is called only when an input is
sharded, except for the kinds in `SOURCES`, which may start a sharded value from replicated inputs. A rule
that cannot keep the sharding calls `fail(reason)`: the column layers the value came from are then left
replicated and the walk starts again.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx

from lmforge.errors import PassError
from lmforge.passes.shard.columns import column_layout
from lmforge.passes.shard.linear import Linear, as_linear, layer_name
from lmforge.passes.shard.placement import Fail, Propagation, Sharded
from lmforge.passes.shard.reshape import map_view, slice_dim, slice_range

Rule = Callable[[Propagation, fx.Node, Fail], None]


def _carried(st: Propagation, node: fx.Node, tensors: list[fx.Node], fail: Fail) -> Sharded:
    """The output layout of an elementwise op over `tensors`: the sharded ones must agree (counted from the
    right, as broadcasting aligns them), the replicated ones must broadcast along the sharded axis."""
    out_rank = len(node.meta["spec"].shape)
    found: Sharded | None = None
    pos = None
    for a in tensors:
        p = st.get(a)
        if isinstance(p, Sharded):
            from_right = len(a.meta["spec"].shape) - p.axis
            if found is not None and (from_right != pos or not found.same_layout(p)):
                fail("operands sharded differently")
            found, pos = p if found is None else found, from_right
    for a in tensors:
        if st.get(a) is None:
            shape = a.meta["spec"].shape
            if len(shape) >= pos and shape[len(shape) - pos] != 1:
                fail("a replicated operand meets a sharded one along the sharded axis")
    roots = frozenset().union(*(st.get(a).roots for a in tensors if isinstance(st.get(a), Sharded)))
    return Sharded(out_rank - pos, found.idx, roots)


def elementwise(st: Propagation, node: fx.Node, fail: Fail) -> None:
    st.place[node] = _carried(st, node, [a for a in node.args if isinstance(a, fx.Node)], fail)


def copy(st: Propagation, node: fx.Node, fail: Fail) -> None:
    st.place[node] = _carried(st, node, [a for a in node.args if isinstance(a, fx.Node)][:1], fail)


def view(st: Propagation, node: fx.Node, fail: Fail) -> None:
    s = st.get(node.args[0])
    mapped = map_view(node.args[0].meta["spec"].shape, node.meta["spec"].shape, s)
    if isinstance(mapped, str):
        fail(mapped)
    j, idx = mapped
    size = len(idx[0])
    if any(len(i) != size for i in idx):
        fail("ranks would hold different sizes")
    if not isinstance(node.args[1][j], int):
        fail("the sharded size is symbolic in the reshape")
    st.views[node] = (j, size)
    st.place[node] = Sharded(j, idx, s.roots)


def transpose(st: Propagation, node: fx.Node, fail: Fail) -> None:
    s = st.get(node.args[0])
    rank = len(node.meta["spec"].shape)
    if node.target is torch.ops.aten.transpose.int:
        d0, d1 = (d % rank for d in node.args[1:3])
        perm = list(range(rank))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    elif node.target is torch.ops.aten.t.default:
        perm = list(reversed(range(rank)))
    else:
        perm = [d % rank for d in node.args[1]]
    st.place[node] = Sharded(perm.index(s.axis), s.idx, s.roots)


def unsqueeze(st: Propagation, node: fx.Node, fail: Fail) -> None:
    s = st.get(node.args[0])
    d = node.args[1] % len(node.meta["spec"].shape)
    st.place[node] = Sharded(s.axis + (d <= s.axis), s.idx, s.roots)


def split(st: Propagation, node: fx.Node, fail: Fail) -> None:
    s = st.get(node.args[0])
    rank = len(node.args[0].meta["spec"].shape)
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % rank
    pieces = node.meta["spec"]
    if dim != s.axis:
        st.place[node] = tuple(s for _ in pieces)
        return
    sizes = [p.shape[dim] for p in pieces]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    local = None
    per_piece = [[None] * st.tp for _ in sizes]
    for r, idx in enumerate(s.idx):
        piece_of = torch.bucketize(idx, torch.tensor(offsets[1:]), right=True)
        if not bool((piece_of[1:] >= piece_of[:-1]).all()):
            fail("a rank's slice interleaves the split's pieces")
        counts = [int((piece_of == i).sum()) for i in range(len(sizes))]
        if local is not None and counts != local:
            fail("ranks would hold different split sizes")
        local = counts
        for i in range(len(sizes)):
            per_piece[i][r] = idx[piece_of == i] - offsets[i]
    out = [Sharded(s.axis, tuple(per_piece[i]), s.roots) if local[i] else None for i in range(len(sizes))]
    if node.target is torch.ops.aten.split.Tensor and len(set(local)) != 1:
        fail("the split's pieces would differ in size")
    st.splits[node] = local
    st.place[node] = tuple(out)


def slice_(st: Propagation, node: fx.Node, fail: Fail) -> None:
    s = st.get(node.args[0])
    shape = node.args[0].meta["spec"].shape
    dim = slice_dim(node, len(shape))
    if dim != s.axis:
        st.place[node] = s
        return
    if (node.args[4] if len(node.args) > 4 else 1) != 1 or not isinstance(shape[dim], int):
        fail("a strided slice of the sharded axis")
    lo, hi = slice_range(node, shape[dim])
    new, bounds = [], set()
    for idx in s.idx:
        inside = (idx >= lo) & (idx < hi)
        where = torch.nonzero(inside).flatten()
        if len(where) and not torch.equal(where, torch.arange(int(where[0]), int(where[0]) + len(where))):
            fail("a rank's slice is not contiguous in the sliced range")
        first = int(where[0]) if len(where) else 0
        bounds.add((first, first + len(where)))
        new.append(idx[inside] - lo)
    if len(bounds) != 1 or not len(new[0]):
        fail("ranks would slice different local ranges")
    (a, b), = bounds
    st.slices[node] = (a, b)
    st.place[node] = Sharded(s.axis, tuple(new), s.roots)


def cat(st: Propagation, node: fx.Node, fail: Fail) -> None:
    parts = [st.get(a) for a in node.args[0]]
    rank = len(node.meta["spec"].shape)
    dim = (node.args[1] if len(node.args) > 1 else 0) % rank
    first = parts[0]
    if not all(isinstance(p, Sharded) and p.axis == first.axis and p.same_layout(first) for p in parts) or (
            dim == first.axis):
        fail("a concatenation of differently sharded parts, or along the sharded axis")
    st.place[node] = first


def sym_size(st: Propagation, node: fx.Node, fail: Fail) -> None:
    if node.args[1] % len(node.args[0].meta["spec"].shape) == st.get(node.args[0]).axis:
        fail("the size of the sharded axis is read")


def getitem(st: Propagation, node: fx.Node, fail: Fail) -> None:
    st.place[node] = st.place[node.args[0]][node.args[1]]


def norm(st: Propagation, node: fx.Node, fail: Fail) -> None:
    s = st.get(node.args[0])
    rank = len(node.args[0].meta["spec"].shape)
    normed = len(node.args[1]) if node.target is torch.ops.aten.layer_norm.default else 1  # its normalized_shape
    if s.axis >= rank - normed or any(isinstance(st.get(a), Sharded) for a in node.args[1:]):
        fail("a norm over the sharded axis")
    st.place[node] = s


def attention(st: Propagation, node: fx.Node, fail: Fail) -> None:
    q, k, v = (st.get(a) for a in node.args[:3])
    if not all(isinstance(p, Sharded) and p.axis == 1 for p in (q, k, v)):
        fail("attention with query, key and value not all sharded by heads")
    if not k.same_layout(v):
        fail("keys and values sharded differently")
    heads, kv_heads = node.args[0].meta["spec"].shape[1], node.args[1].meta["spec"].shape[1]
    group = heads // kv_heads
    for qi, ki in zip(q.idx, k.idx):
        if len(qi) % len(ki) or not torch.equal(qi // group, ki.repeat_interleave(len(qi) // len(ki))):
            fail("a rank's query heads read key/value heads it does not hold")
    for cache in node.args[3:5]:
        st.caches[cache] = Sharded(1, k.idx, k.roots)
    st.place[node] = q


def linear(st: Propagation, node: fx.Node, fail: Fail) -> None:
    """Column-parallel when the input is replicated (unless an earlier round kept the layer whole), row-parallel
    when it is sharded along the features."""
    lin = as_linear(st.ir, node)
    sharded = st.sharded_inputs(node)
    if lin is None:  # a matmul of two activations
        if sharded:
            fail("the op has no sharding rule")
        return
    if not sharded:
        if node not in st.replicated:
            st.column[node] = column_layout(st.ir, st.tp, lin)
            st.place[node] = st.column[node][0]
        return
    _row(st, lin, fail)


def _row(st: Propagation, lin: Linear, fail: Fail) -> None:
    s = st.get(lin.x)
    rank = len(lin.x.meta["spec"].shape)
    if s.axis != rank - 1 or any(isinstance(st.get(lin.node.args[p]), Sharded) for p, *_ in lin.weights):
        fail("a linear layer whose input is sharded along another axis")
    if isinstance(st.get(lin.bias), Sharded):
        fail("a sharded bias")
    whole = torch.sort(torch.cat(s.idx)).values
    if not torch.equal(whole, torch.arange(len(whole))):
        fail("its input is not split evenly between the ranks (replicated heads?)")
    if lin.group > 1:
        for idx in s.idx:
            groups = idx.view(-1, lin.group) if len(idx) % lin.group == 0 else None
            if groups is None or not torch.equal(groups, groups[:, :1] + torch.arange(lin.group)) or bool(
                    (groups[:, 0] % lin.group).any()):
                k = len(whole)
                fits = [g for g in (256, 128, 64, 32) if (k // st.tp) % g == 0 and k % st.tp == 0]
                hint = f"; group size {fits[0]} would fit" if fits else ""
                raise PassError(f"shard: tp={st.tp} splits the {k} input columns of {layer_name(st.ir, lin)} "
                                f"into {len(idx)} per rank, which straddles its int4 groups of {lin.group}{hint}")
    st.row[lin.node] = s
    st.place[lin.node] = None


def embedding(st: Propagation, node: fx.Node, fail: Fail) -> None:
    """A lookup of the input ids in a trained table (the token embeddings) shards by vocabulary rows."""
    if _token_table(st, node):
        rows = st.ir.weight(node.args[0].target).shape[0]
        per = -(-rows // st.tp)  # padded, like the logits' projection, which may share the table
        st.embeddings[node] = tuple(torch.arange(r * per, (r + 1) * per) for r in range(st.tp))
    elif st.sharded_inputs(node):
        fail("the op has no sharding rule")


def _token_table(st: Propagation, node: fx.Node) -> bool:
    table, ids = node.args[0], node.args[1]
    return (isinstance(table, fx.Node) and table.op == "get_attr" and st.ir.weight_kind(table.target) == "parameter"
            and st.ir.weight(table.target).dim() == 2 and isinstance(ids, fx.Node) and ids.op == "placeholder"
            and ids.name == "input_ids" and not node.kwargs and len(node.args) <= 3)  # (padding_idx: backward only)


def replicated(st: Propagation, node: fx.Node, fail: Fail) -> None:
    fail("the op takes its inputs whole")


RULES: dict[str, Rule] = {
    "elementwise": elementwise, "copy": copy, "view": view, "transpose": transpose, "unsqueeze": unsqueeze,
    "split": split, "slice": slice_, "cat": cat, "sym_size": sym_size, "getitem": getitem, "norm": norm,
    "attention": attention, "linear": linear, "embedding": embedding, "replicated": replicated,
}
SOURCES = {"linear", "embedding"}  # kinds whose rule runs even when no input is sharded
