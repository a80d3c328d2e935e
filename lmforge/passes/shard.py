"""shard{tp=N}: tensor parallelism (Megatron's column/row split), decided from the graph's structure.

The rewrite gives every rank the same graph over its own slice of the weights:

    column-parallel  a linear layer whose input is replicated: it keeps a slice of its output features
                     (rows of W), so its output is sharded along the last axis
    row-parallel     a linear layer whose input is sharded along the contracted axis: it keeps the matching
                     columns of W and its partial sums are added up by `lmforge.all_reduce` (the bias,
                     if any, is added once, after the all-reduce)
    final projection column-parallel, its vocabulary padded to a multiple of N; `lmforge.all_gather`
                     puts the logits back together (and a slice drops the padding)
    token embeddings vocab-parallel: each rank holds a slice of the table's rows (the same slice as a tied
                     final projection), looks up the ids in it, zeroes the others, and an all-reduce adds
                     the ranks' lookups up (rank r's first row is a per-rank constant, `<table>.tp_start`)
    everything else  replicated: position tables, norms on the residual stream, the residual adds

Which layers are which follows from propagating placements (replicated, or sharded along one axis with a
known set of global indices per rank) through the graph in order: views and transposes move the sharded
axis (and the head counts in their shape arguments are rewritten), elementwise ops, rotary embeddings and
per-head norms keep it, splits along it (GPT-2's fused q/k/v) cut each piece separately, attention shards
by heads, and the KV cache inputs get the local head count. Where a column layer's output meets attention,
its features are cut in whole heads; with fewer key/value heads than ranks (GQA), each rank keeps the one
key/value head its query heads read (the kv projection is replicated in part). A column layer whose output
reaches something that cannot be sharded (a reduction over the sharded axis, a residual add) is left
replicated, and listed with the reason.

Quantized layers shard too: int4 by whole groups along the input axis (a group that would straddle two
ranks is an error that names the layer and a group size that fits), fp8 with its per-row scales.

What the pass leaves: `ir.tensor_parallel` = {"tp", "weights": {attr: {"axis", "shape", "ranks"}},
"replicated": {layer: reason}, "collectives": {...}}, where "ranks" lists each rank's slice of the global
weight as [start, stop) runs along "axis" (indices past the end are zero padding); `ir.rank_weights[r]`
holds rank r's sharded tensors (the graph module holds rank 0's); every node the pass changed keeps its
global args and spec in `meta["tp_global"]`, and every node it added has `meta["tp_inserted"]`, which is
what `unshard` needs to give back the one-device graph (for resharding an artifact to another tp).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx

from lmforge.codegen.attention import attention
from lmforge.codegen.collectives import all_gather, all_reduce
from lmforge.codegen.quant_linear import fp8_linear, int4_linear
from lmforge.codegen.rms_norm import rms_norm
from lmforge.codegen.rotary import rotary
from lmforge.errors import PassError
from lmforge.ir.graph import GraphIR, KVLayerSpec, op_name
from lmforge.ir.spec import TensorSpec
from lmforge.passes.manager import PassResult, register_pass

aten = torch.ops.aten

# ops that act elementwise on their tensor arguments (with broadcasting); scalars may be mixed in
ELEMENTWISE = {
    aten.silu.default, aten.gelu.default, aten.tanh.default, aten.sigmoid.default, aten.relu.default,
    aten.neg.default, aten.exp.default, aten.rsqrt.default, aten.sqrt.default, aten.erf.default,
    aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.pow.Tensor_Scalar, aten._to_copy.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, rotary,
}
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


class _Unshardable(Exception):
    """A sharded value reached an op that cannot take it; its column layers stay replicated."""

    def __init__(self, node: fx.Node, reason: str, roots: frozenset):
        super().__init__(reason)
        self.node, self.reason, self.roots = node, reason, roots


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


@dataclass
class Linear:
    """A linear layer in any of its forms: which args are x, the weights (with their output and input axes) and
    the bias."""

    node: fx.Node
    x_pos: int
    weights: list[tuple[int, int, int | None, str]]  # (arg position, out axis, in axis, input unit) per tensor
    bias_pos: int | None
    group: int = 1  # int4: columns per group

    @property
    def x(self) -> fx.Node:
        return self.node.args[self.x_pos]

    @property
    def bias(self):
        return self.node.args[self.bias_pos] if self.bias_pos is not None and self.bias_pos < len(self.node.args) else None


def _is_weight(ir: GraphIR, arg) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr" and ir.weight(arg.target).dim() in (1, 2)


def as_linear(ir: GraphIR, node: fx.Node) -> Linear | None:
    t = node.target
    if node.op != "call_function":
        return None
    if t is aten.linear.default and _is_weight(ir, node.args[1]):
        return Linear(node, 0, [(1, 0, 1, "col")], 2)
    if t in (aten.mm.default, aten.matmul.default) and _is_weight(ir, node.args[1]) and ir.weight(
            node.args[1].target).dim() == 2:
        return Linear(node, 0, [(1, 1, 0, "col")], None)
    if t is aten.addmm.default and _is_weight(ir, node.args[2]) and not node.kwargs:
        return Linear(node, 1, [(2, 1, 0, "col")], 0)
    if t is int4_linear:
        weights = [(1, 0, 1, "byte"), (2, 0, 1, "group")] + ([(3, 0, 1, "group")] if node.args[3] is not None else [])
        return Linear(node, 0, weights, 5, group=int(node.args[4]))
    if t is fp8_linear:
        return Linear(node, 0, [(1, 0, 1, "col"), (2, 0, None, "col")], 3)
    return None


def _layer_name(ir: GraphIR, lin: Linear) -> str:
    name = ir.weight_names.get(lin.node.args[lin.weights[0][0]].target, lin.node.name)
    for suffix in (".weight", ".qweight"):
        name = name.removesuffix(suffix)
    return name


def _out_features(ir: GraphIR, lin: Linear) -> int:
    pos, out_axis, _, _ = lin.weights[0]
    return ir.weight(lin.node.args[pos].target).shape[out_axis]


# --- reshapes ---------------------------------------------------------------------------------------


def _static(dims) -> bool:
    return all(isinstance(d, int) for d in dims)


def _map_view(ins: tuple, outs: tuple, s: Sharded) -> tuple[int, tuple[torch.Tensor, ...]] | str:
    """Where the sharded axis lands after a reshape from `ins` to `outs`, and the per-rank indices there."""
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


def _local_spec(spec: TensorSpec, axis: int, size: int) -> TensorSpec:
    shape = list(spec.shape)
    shape[axis] = size
    return replace(spec, shape=tuple(shape))


def _runs(idx: torch.Tensor) -> list[list[int]]:
    """Indices as [start, stop) runs: [0, 1, 2, 5, 6] -> [[0, 3], [5, 7]]."""
    runs: list[list[int]] = []
    for i in idx.tolist():
        if runs and runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, i + 1])
    return runs


def _from_runs(runs) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in runs]) if runs else torch.zeros(0, dtype=torch.long)


# --- the pass ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardOptions:
    tp: int = 2  # tensor-parallel ranks


@register_pass("shard", options=ShardOptions, phase="lower")
def shard(ir: GraphIR, options: ShardOptions) -> PassResult:
    tp = options.tp
    if tp < 1:
        raise PassError(f"shard: tp must be 1 or more, got {tp}")
    if ir.tensor_parallel:
        raise PassError("shard: the graph is already sharded")
    if ir.kind != "lm":
        raise PassError("shard: only whole language-model graphs can be sharded")
    if tp == 1:
        return PassResult(False, {})
    replicated: dict[fx.Node, str] = {}
    for _ in range(len(ir.graph.nodes)):
        planner = _Planner(ir, tp, replicated)
        try:
            planner.propagate()
            break
        except _Unshardable as e:
            for root in e.roots:
                replicated[root] = f"its output reaches {op_name(e.node.target) if e.node.op == 'call_function' else e.node.op} %{e.node.name}: {e.reason}"
    else:  # pragma: no cover - each round replicates at least one layer
        raise PassError("shard: could not settle which layers to shard")
    stats = planner.rewrite()
    return PassResult(True, stats)


class _Planner:
    def __init__(self, ir: GraphIR, tp: int, replicated: dict[fx.Node, str]):
        self.ir, self.tp, self.replicated = ir, tp, replicated
        self.place: dict[fx.Node, Any] = {}  # node -> Sharded | tuple of (Sharded | None) | None (replicated)
        self.column: dict[fx.Node, Sharded] = {}  # column layers -> their output layout
        self.row: dict[fx.Node, Sharded] = {}  # row layers -> their input layout
        self.caches: dict[fx.Node, Sharded] = {}
        self.embeddings: dict[fx.Node, tuple[torch.Tensor, ...]] = {}  # token lookups -> each rank's table rows
        self.views: dict[fx.Node, tuple[int, int]] = {}  # reshape -> (out axis, local size)
        self.splits: dict[fx.Node, list[int]] = {}  # split along the sharded axis -> local piece sizes
        self.slices: dict[fx.Node, tuple[int, int]] = {}  # slice of the sharded axis -> local start, end

    # -- propagation --

    def _get(self, arg):
        return self.place.get(arg) if isinstance(arg, fx.Node) else None

    def _sharded_inputs(self, node: fx.Node) -> list[Sharded]:
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

    def propagate(self) -> None:
        for node in self.ir.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "output":
                self._output(node)
                continue
            ins = self._sharded_inputs(node)
            lin = as_linear(self.ir, node)
            if node.target is aten.embedding.default and self._token_table(node):
                rows = self.ir.weight(node.args[0].target).shape[0]
                per = -(-rows // self.tp)  # padded, like the logits' projection, which may share the table
                self.embeddings[node] = tuple(torch.arange(r * per, (r + 1) * per) for r in range(self.tp))
                continue
            if lin is not None and not isinstance(self._get(lin.x), Sharded) and not any(
                    isinstance(self._get(a), Sharded) for a in node.all_input_nodes):
                if node not in self.replicated:
                    self.place[node] = self._plan_column(lin)
                    self.column[node] = self.place[node]
                continue
            if not ins:
                continue
            roots = frozenset().union(*(s.roots for s in ins))

            def fail(reason: str):
                raise _Unshardable(node, reason, roots)

            if lin is not None:
                self._plan_row(lin, fail)
            elif node.target is operator.getitem:
                self.place[node] = self.place[node.args[0]][node.args[1]]
            elif node.target in ELEMENTWISE:
                self.place[node] = self._elementwise(node, fail)
            elif node.target in VIEWS:
                s = self._get(node.args[0])
                mapped = _map_view(node.args[0].meta["spec"].shape, node.meta["spec"].shape, s)
                if isinstance(mapped, str):
                    fail(mapped)
                j, idx = mapped
                size = len(idx[0])
                if any(len(i) != size for i in idx):
                    fail("ranks would hold different sizes")
                shape_arg = node.args[1][j]
                if not isinstance(shape_arg, int):
                    fail("the sharded size is symbolic in the reshape")
                self.views[node] = (j, size)
                self.place[node] = Sharded(j, idx, s.roots)
            elif node.target in (aten.transpose.int, aten.permute.default, aten.t.default):
                s = self._get(node.args[0])
                rank = len(node.meta["spec"].shape)
                if node.target is aten.transpose.int:
                    d0, d1 = (d % rank for d in node.args[1:3])
                    perm = list(range(rank))
                    perm[d0], perm[d1] = perm[d1], perm[d0]
                elif node.target is aten.t.default:
                    perm = list(reversed(range(rank)))
                else:
                    perm = [d % rank for d in node.args[1]]
                self.place[node] = Sharded(perm.index(s.axis), s.idx, s.roots)
            elif node.target is aten.unsqueeze.default:
                s = self._get(node.args[0])
                d = node.args[1] % len(node.meta["spec"].shape)
                self.place[node] = Sharded(s.axis + (d <= s.axis), s.idx, s.roots)
            elif node.target in (aten.split.Tensor, aten.split_with_sizes.default):
                self._split(node, fail)
            elif node.target is aten.slice.Tensor:
                self._slice(node, fail)
            elif node.target is aten.cat.default:
                parts = [self._get(a) for a in node.args[0]]
                rank = len(node.meta["spec"].shape)
                dim = (node.args[1] if len(node.args) > 1 else 0) % rank
                first = parts[0]
                if not all(isinstance(p, Sharded) and p.axis == first.axis and p.same_layout(first) for p in parts) or (
                        dim == first.axis):
                    fail("a concatenation of differently sharded parts, or along the sharded axis")
                self.place[node] = first
            elif node.target is aten.sym_size.int:
                if node.args[1] % len(node.args[0].meta["spec"].shape) == self._get(node.args[0]).axis:
                    fail("the size of the sharded axis is read")
            elif node.target is rms_norm or node.target is aten.layer_norm.default:
                s = self._get(node.args[0])
                rank = len(node.args[0].meta["spec"].shape)
                normed = 1 if node.target is rms_norm else len(node.args[1])
                if s.axis >= rank - normed or any(isinstance(self._get(a), Sharded) for a in node.args[1:]):
                    fail("a norm over the sharded axis")
                self.place[node] = s
            elif node.target is attention:
                self._attention(node, fail)
            else:
                fail("the op has no sharding rule")

    def _token_table(self, node: fx.Node) -> bool:
        """A lookup of the input ids in a trained table: the token embeddings, which shard by vocabulary rows."""
        table, ids = node.args[0], node.args[1]
        return (isinstance(table, fx.Node) and table.op == "get_attr" and self.ir.weight_kind(table.target) == "parameter"
                and self.ir.weight(table.target).dim() == 2 and isinstance(ids, fx.Node) and ids.op == "placeholder"
                and ids.name == "input_ids" and not node.kwargs and len(node.args) <= 3)  # (padding_idx: backward only)

    def _plan_column(self, lin: Linear) -> Sharded:
        """The output layout of a column layer: its features cut per rank, in whole heads and per split piece."""
        n = _out_features(self.ir, lin)
        name = _layer_name(self.ir, lin)
        segments, units = self._structure(lin.node, n)
        idx: list[list[torch.Tensor]] = [[] for _ in range(self.tp)]
        for start, stop in segments:
            unit = units.get(start, 1)
            count = (stop - start) // unit
            if count % self.tp == 0:
                per = count // self.tp
                picks = [range(r * per, (r + 1) * per) for r in range(self.tp)]
            elif self.tp % count == 0 and unit > 1:
                picks = [range(r * count // self.tp, r * count // self.tp + 1) for r in range(self.tp)]
            elif len(segments) == 1 and unit == 1 and _reaches_output(lin.node):
                per = -(-count // self.tp)  # padded: the logits are gathered and cut back to count
                picks = [range(r * per, (r + 1) * per) for r in range(self.tp)]
            else:
                what = f"{count} heads of {unit}" if unit > 1 else f"{count} output features"
                raise PassError(f"shard: tp={self.tp} does not divide the {what} of {name}")
            for r, pick in enumerate(picks):
                idx[r].append(torch.cat([start + torch.arange(u * unit, (u + 1) * unit) for u in pick]))
        return Sharded(len(lin.node.meta["spec"].shape) - 1, tuple(torch.cat(i) for i in idx), frozenset([lin.node]))

    def _structure(self, root: fx.Node, n: int) -> tuple[list[tuple[int, int]], dict[int, int]]:
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
                ins, outs = node.meta["spec"].shape, spec.shape if isinstance(spec, TensorSpec) else ()
                if user.target in VIEWS and outs and (len(outs) == len(ins) + 1 and isinstance(outs[-1], int)
                                             and isinstance(outs[-2], int) and outs[-1] * outs[-2] == ins[-1]):
                    units[start] = outs[-1]  # (..., n) -> (..., heads, head_dim)
                elif user.target in ELEMENTWISE or (user.target in VIEWS and outs and ins[-1] == outs[-1]):
                    if user.target in VIEWS or user.args[0] is node:
                        frontier.append((user, start, stop))
                elif user.target is aten.slice.Tensor and outs and _slice_dim(user, len(ins)) == len(ins) - 1:
                    lo, hi = _slice_range(user, ins[-1])
                    segments.append((start + lo, start + hi))
                    frontier.append((user, start + lo, start + hi))
                elif user.target in (aten.split.Tensor, aten.split_with_sizes.default) and user.args[2] % len(
                        ins) == len(ins) - 1:
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

    def _plan_row(self, lin: Linear, fail) -> None:
        s = self._get(lin.x)
        rank = len(lin.x.meta["spec"].shape)
        if s.axis != rank - 1 or any(isinstance(self._get(lin.node.args[p]), Sharded) for p, *_ in lin.weights):
            fail("a linear layer whose input is sharded along another axis")
        if isinstance(self._get(lin.bias), Sharded):
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
                    fits = [g for g in (256, 128, 64, 32) if (k // self.tp) % g == 0 and k % self.tp == 0]
                    hint = f"; group size {fits[0]} would fit" if fits else ""
                    raise PassError(f"shard: tp={self.tp} splits the {k} input columns of {_layer_name(self.ir, lin)} "
                                    f"into {len(idx)} per rank, which straddles its int4 groups of {lin.group}{hint}")
        self.row[lin.node] = s
        self.place[lin.node] = None

    def _elementwise(self, node: fx.Node, fail) -> Sharded:
        out_rank = len(node.meta["spec"].shape)
        found: Sharded | None = None
        pos = None
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if node.target in (aten._to_copy.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
                           aten.detach.default):
            tensors = tensors[:1]
        for a in tensors:
            p = self._get(a)
            if isinstance(p, Sharded):
                from_right = len(a.meta["spec"].shape) - p.axis
                if found is not None and (from_right != pos or not found.same_layout(p)):
                    fail("operands sharded differently")
                found, pos = p if found is None else found, from_right
        for a in tensors:
            if self._get(a) is None:
                shape = a.meta["spec"].shape
                if len(shape) >= pos and shape[len(shape) - pos] != 1:
                    fail("a replicated operand meets a sharded one along the sharded axis")
        return Sharded(out_rank - pos, found.idx, frozenset().union(*(self._get(a).roots for a in tensors
                                                                       if isinstance(self._get(a), Sharded))))

    def _split(self, node: fx.Node, fail) -> None:
        s = self._get(node.args[0])
        rank = len(node.args[0].meta["spec"].shape)
        dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % rank
        pieces = node.meta["spec"]
        if dim != s.axis:
            self.place[node] = tuple(s for _ in pieces)
            return
        sizes = [p.shape[dim] for p in pieces]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        out, local = [], None
        per_piece = [[None] * self.tp for _ in sizes]
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
        for i in range(len(sizes)):
            out.append(Sharded(s.axis, tuple(per_piece[i]), s.roots) if local[i] else None)
        if node.target is aten.split.Tensor and len(set(local)) != 1:
            fail("the split's pieces would differ in size")
        self.splits[node] = local
        self.place[node] = tuple(out)

    def _slice(self, node: fx.Node, fail) -> None:
        s = self._get(node.args[0])
        shape = node.args[0].meta["spec"].shape
        dim = _slice_dim(node, len(shape))
        if dim != s.axis:
            self.place[node] = s
            return
        if (node.args[4] if len(node.args) > 4 else 1) != 1 or not isinstance(shape[dim], int):
            fail("a strided slice of the sharded axis")
        lo, hi = _slice_range(node, shape[dim])
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
        self.slices[node] = (a, b)
        self.place[node] = Sharded(s.axis, tuple(new), s.roots)

    def _attention(self, node: fx.Node, fail) -> None:
        q, k, v = (self._get(a) for a in node.args[:3])
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
            self.caches[cache] = Sharded(1, k.idx, k.roots)
        self.place[node] = q

    def _output(self, node: fx.Node) -> None:
        logits = node.args[0][0]
        s = self._get(logits)
        if s is None:
            return
        rank = len(logits.meta["spec"].shape)
        whole = torch.cat(s.idx)
        if s.axis != rank - 1 or not torch.equal(whole, torch.arange(len(whole))):
            raise _Unshardable(node, "the logits are not split in rank order along the vocabulary", s.roots)

    # -- rewriting --

    def rewrite(self) -> dict[str, int]:
        ir, graph, tp = self.ir, self.ir.graph, self.tp
        rank_weights: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
        cuts: dict[str, dict[str, Any]] = {}
        done: dict[tuple, str] = {}  # (attr, axis, layout) -> sharded attr

        def remember(node: fx.Node) -> None:
            if "tp_global" not in node.meta:
                node.meta["tp_global"] = {"args": node.args, "kwargs": dict(node.kwargs), "spec": node.meta.get("spec")}

        def cut(get: fx.Node, axis: int, idx: tuple[torch.Tensor, ...], user: fx.Node) -> fx.Node:
            """A get_attr of the weight's per-rank slices along `axis`."""
            attr = get.target
            key = (attr, axis, tuple(tuple(i.tolist()) for i in idx))
            if key not in done:
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
                    rank_weights[r][new] = full.index_select(axis, i).contiguous()
                ir.set_weight(new, rank_weights[0][new], source_name=source, kind=kind)
                cuts[new] = {"axis": axis, "shape": shape, "ranks": [_runs(i) for i in idx]}
                done[key] = new
            new = done[key]
            if new == get.target:
                remember(get)
                get.meta["spec"] = TensorSpec(tuple(rank_weights[0][new].shape), rank_weights[0][new].dtype)
                return get
            with graph.inserting_before(user):
                fresh = graph.get_attr(new)
            fresh.meta["spec"] = TensorSpec(tuple(rank_weights[0][new].shape), rank_weights[0][new].dtype)
            fresh.meta["tp_inserted"] = True
            if "tp_global" in user.meta:  # unsharded, the new attribute holds the whole weight: read it there too
                g = user.meta["tp_global"]
                g["args"] = tuple(fresh if a is get else a for a in g["args"])
            return fresh

        def weight_idx(unit: str, idx: tuple[torch.Tensor, ...], group: int) -> tuple[torch.Tensor, ...]:
            if unit == "byte":
                return tuple(i[::2] // 2 for i in idx)
            if unit == "group":
                return tuple(i[::group] // group for i in idx)
            return idx

        stats = {"column-layers": 0, "row-layers": 0, "replicated-layers": len(self.replicated)}
        for node, s in self.column.items():
            lin = as_linear(ir, node)
            args = list(node.args)
            remember(node)
            for pos, out_axis, _, _ in lin.weights:
                args[pos] = cut(node.args[pos], out_axis, s.idx, node)
            if lin.bias is not None:
                args[lin.bias_pos] = cut(lin.bias, 0, s.idx, node)
            node.args = tuple(args)
            node.meta["spec"] = _local_spec(node.meta["spec"], s.axis, s.local)
            stats["column-layers"] += 1
        collectives = {"all_reduce": [], "all_gather": []}
        for node, s in self.row.items():
            lin = as_linear(ir, node)
            args = list(node.args)
            remember(node)
            for pos, _, in_axis, unit in lin.weights:
                if in_axis is not None:
                    args[pos] = cut(node.args[pos], in_axis, weight_idx(unit, s.idx, lin.group), node)
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
                reduced = graph.call_function(all_reduce, (node, tp))
            reduced.meta["spec"], reduced.meta["tp_inserted"] = node.meta["spec"], True
            last = reduced
            if bias is not None:
                with graph.inserting_after(reduced):
                    last = graph.call_function(aten.add.Tensor, (reduced, bias))
                last.meta["spec"], last.meta["tp_inserted"] = node.meta["spec"], True
            for u in users:
                u.replace_input_with(node, last)
            collectives["all_reduce"].append(_per_token_numel(node.meta["spec"]))
            stats["row-layers"] += 1
        for node, (j, size) in self.views.items():
            remember(node)
            shape = list(node.args[1])
            if shape[j] != -1:
                shape[j] = size
            node.args = (node.args[0], shape, *node.args[2:])
            node.meta["spec"] = _local_spec(node.meta["spec"], j, size)
        for node, local in self.splits.items():
            remember(node)
            s = self.place[node.args[0]]
            size_arg = local[0] if node.target is aten.split.Tensor else local
            node.args = (node.args[0], size_arg, *node.args[2:])
            node.meta["spec"] = tuple(_local_spec(p, s.axis, n) for p, n in zip(node.meta["spec"], local))
        for node, (a, b) in self.slices.items():
            remember(node)
            args = list(node.args) + [None] * (4 - len(node.args))
            args[2], args[3] = a, b
            node.args = tuple(args[:max(4, len(node.args))])
            node.meta["spec"] = _local_spec(node.meta["spec"], self.place[node].axis, b - a)
        for node, p in self.place.items():  # every other sharded value gets its local shape
            if node in self.column or node in self.views or node in self.splits or node in self.slices:
                continue
            spec = node.meta.get("spec")
            if isinstance(p, Sharded) and isinstance(spec, TensorSpec) and spec.shape[p.axis] != p.local:
                remember(node)
                node.meta["spec"] = _local_spec(spec, p.axis, p.local)
            elif isinstance(p, tuple) and isinstance(spec, tuple):  # a split along another axis
                remember(node)
                node.meta["spec"] = tuple(_local_spec(q, x.axis, x.local) if isinstance(x, Sharded) else q
                                          for q, x in zip(spec, p))
        for node, idx in self.embeddings.items():
            self._vocab_parallel(node, idx, cut, remember, rank_weights, cuts)
            collectives["all_reduce"].append(_per_token_numel(node.meta["spec"]))
        layers = list(ir.kv.layers)
        for cache, s in self.caches.items():
            remember(cache)
            cache.meta["spec"] = _local_spec(cache.meta["spec"], 1, s.local)
            i = int(cache.name.rsplit("_", 1)[1])
            layers[i] = KVLayerSpec(s.local, layers[i].k_head_dim, layers[i].v_head_dim)
        ir.kv = replace(ir.kv, layers=layers)
        out = next(n for n in graph.nodes if n.op == "output")
        logits = out.args[0][0]
        s = self.place.get(logits)
        if isinstance(s, Sharded):
            global_spec = logits.meta.get("tp_global", {}).get("spec", logits.meta["spec"])
            vocab = global_spec.shape[-1]
            with graph.inserting_before(out):
                gathered = graph.call_function(all_gather, (logits, -1, tp))
            gathered.meta["spec"] = _local_spec(logits.meta["spec"], s.axis, s.local * tp)
            gathered.meta["tp_inserted"] = True
            last = gathered
            if s.local * tp != vocab:
                with graph.inserting_before(out):
                    last = graph.call_function(aten.slice.Tensor, (gathered, -1, 0, vocab))
                last.meta["spec"], last.meta["tp_inserted"] = global_spec, True
            out.args = ((last,),)
            collectives["all_gather"].append(_per_token_numel(logits.meta["spec"]))
        graph.eliminate_dead_code()
        ir.prune_weights()
        for r in range(tp):
            rank_weights[r] = {a: t for a, t in rank_weights[r].items() if a in cuts and hasattr(ir.gm, a)}
        cuts = {a: c for a, c in cuts.items() if hasattr(ir.gm, a)}
        for attr in cuts:  # a copy made for a tied weight whose original no reader kept takes the original's name
            name = ir.weight_names.get(attr, "")
            if name.endswith(".tp") and name[:-3] not in ir.weight_names.values():
                ir.weight_names[attr] = name[:-3]
        ir.tensor_parallel = {
            "tp": tp,
            "weights": cuts,
            "replicated": {_layer_name(ir, as_linear(ir, n)): why for n, why in self.replicated.items() if n in graph.nodes},
            "collectives": {kind: {"count": len(v), "elements_per_token": sum(v)} for kind, v in collectives.items()},
        }
        ir.rank_weights = rank_weights
        stats["all-reduces"] = len(collectives["all_reduce"])
        return stats


    def _vocab_parallel(self, node: fx.Node, idx, cut, remember, rank_weights, cuts) -> None:
        """embedding(W, ids) -> all_reduce(embedding(W_r, clamp(ids - start_r)) * (ids in W_r's rows)): each rank
        looks up the ids its slice of the table holds and contributes zeros for the others."""
        ir, graph, tp = self.ir, self.ir.graph, self.tp
        table, ids, *rest = node.args
        per = len(idx[0])
        users = list(node.users)
        remember(node)
        local_table = cut(table, 0, idx, node)
        start = ir.unique_attr(f"{table.target}_tp_start")  # each rank's first row: a per-rank constant
        for r in range(tp):
            rank_weights[r][start] = torch.tensor([r * per])
        ir.set_weight(start, rank_weights[0][start], source_name=f"{ir.weight_names.get(table.target, table.target)}"
                      f".tp_start", kind="buffer")
        cuts[start] = {"axis": 0, "shape": [tp], "ranks": [[[r, r + 1]] for r in range(tp)]}
        ids_spec = ids.meta["spec"]
        mask_spec = replace(ids_spec, dtype=torch.bool)
        with graph.inserting_before(node):
            steps = []

            def add(target, args, spec):
                n = graph.call_function(target, args)
                n.meta["spec"], n.meta["tp_inserted"] = spec, True
                steps.append(n)
                return n

            first = graph.get_attr(start)
            first.meta["spec"], first.meta["tp_inserted"] = TensorSpec((1,), torch.int64), True
            local = add(aten.sub.Tensor, (ids, first), ids_spec)
            low = add(aten.ge.Scalar, (local, 0), mask_spec)
            high = add(aten.lt.Scalar, (local, per), mask_spec)
            mine = add(aten.bitwise_and.Tensor, (low, high), mask_spec)
            safe = add(aten.clamp.default, (local, 0, per - 1), ids_spec)
        node.args = (local_table, safe, *rest)
        spec = node.meta["spec"]
        with graph.inserting_after(node):
            keep = graph.call_function(aten.unsqueeze.default, (mine, -1))
        keep.meta["spec"], keep.meta["tp_inserted"] = replace(mask_spec, shape=(*mask_spec.shape, 1)), True
        with graph.inserting_after(keep):
            masked = graph.call_function(aten.mul.Tensor, (node, keep))
        masked.meta["spec"], masked.meta["tp_inserted"] = spec, True
        with graph.inserting_after(masked):
            reduced = graph.call_function(all_reduce, (masked, tp))
        reduced.meta["spec"], reduced.meta["tp_inserted"] = spec, True
        for u in users:
            u.replace_input_with(node, reduced)


def _slice_dim(node: fx.Node, rank: int) -> int:
    return (node.args[1] if len(node.args) > 1 else 0) % rank


def _slice_range(node: fx.Node, size: int) -> tuple[int, int]:
    """[start, end) of `aten.slice.Tensor` along its axis of `size`, with Python's clamping of negatives."""
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
    start, end = (v + size if v < 0 else v for v in (start, end))
    return max(0, min(start, size)), max(0, min(end, size))


def _reaches_output(node: fx.Node) -> bool:
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


def _per_token_numel(spec: TensorSpec) -> int:
    """Elements per token of a (..., features) activation: its last dimension."""
    last = spec.shape[-1]
    return int(last) if isinstance(last, int) else 0


# --- undoing and resharding --------------------------------------------------------------------------


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
    ir.tensor_parallel = {}
    ir.rank_weights = []
    ir.gm.recompile()


def assemble(cuts: dict[str, dict[str, Any]], rank_weights: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The global tensor of every sharded attribute, from each rank's slice (padding dropped)."""
    out = {}
    for attr, cut in cuts.items():
        axis, shape = cut["axis"], cut["shape"]
        first = rank_weights[0][attr]
        full = first.new_zeros(shape)
        for r, runs in enumerate(cut["ranks"]):
            idx = _from_runs(runs)
            keep = idx < shape[axis]
            full.index_copy_(axis, idx[keep], rank_weights[r][attr].index_select(axis, torch.nonzero(keep).flatten()))
        out[attr] = full
    return out


def for_rank(ir: GraphIR, rank: int) -> GraphIR:
    """Rank `rank`'s own graph: the same nodes over its slices of the sharded weights."""
    import copy

    from torch import nn

    if not ir.tensor_parallel:
        return ir
    root = nn.Module()
    for attr, tensor in ir.gm.named_buffers():
        root.register_buffer(attr, ir.rank_weights[rank].get(attr, tensor))
    graph = copy.deepcopy(ir.graph)
    out = replace(ir, gm=fx.GraphModule(root, graph), weight_names=dict(ir.weight_names),
                  weight_kinds=dict(ir.weight_kinds), history=list(ir.history), rank_weights=[])
    return out
