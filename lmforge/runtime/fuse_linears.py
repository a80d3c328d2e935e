"""fuse-linears: the linear layers that read one input become one linear layer and a split (horizontal fusion).

The rewrite, for every group of two or more linear layers on the same input x (`lmforge.ir.linear` says what a
linear layer is), when they all have the same form:

    q = linear(x, Wq, bq)                         qkv = linear(x, cat([Wq, Wk, Wv]), cat([bq, bk, bv]))
    k = linear(x, Wk, bk)             ->          q, k, v = split_with_sizes(qkv, [Nq, Nk, Nv], -1)
    v = linear(x, Wv, bv)

and so for every form the recognizer gives (`mm(x, A)` on A = W.T concatenates along A's columns) and every
lmforge op with a linear form (`OpFacts.linear`: the quantized int4_linear, fp8_linear and int8_linear): each
weight tensor the form names is concatenated along its out axis, and the bias too. Each output feature of a linear
layer depends only on its own row of every weight tensor (int4's group scales and zero points are per row, so are
fp8's and int8's scales, and fp8 quantizes the activation per token, whatever the weight), so the fused layer computes
the numbers its members did, up to the summation order of a wider matmul; the pass knows no scheme.

"The same form" is: the same op, the same linear form, weights read straight from get_attrs (no transpose in
between) with the same dtypes, kinds and shapes but for the out axis, biases on all members or on none (a
group with biases on some members only is left alone rather than given zero biases), equal arguments
otherwise (int4's group size, a symmetric layer's missing zero points), and, when the quantize pass ran, the
same quantization settings (or kept-in-float reasons) in `ir.quantization`. A group where any of this fails
is left whole, counted in the stats with the reason; so is one with a member whose output is reshaped across
its last axis (a view of a split piece can only reshape that axis, or the axes before it). Nothing changes
until every group is checked and its tensors concatenated.

Names: the fused tensors are saved as the members' names joined, the common prefix once, e.g.
`model.layers.0.self_attn.q_proj+k_proj+v_proj.weight` (`.qweight`, `.scales`, `.zeros`, `.bias`), and the
fused layer replaces its members in `ir.quantization["layers"]` (or `["kept"]`) under
`model.layers.0.self_attn.q_proj+k_proj+v_proj`, so every listed layer's tensors are `<layer>.<suffix>` in
the artifact, as before. A member weight that something else still reads (a tied table) stays; the others
are dropped. Groups made of the same weights (layers that share them) share one fused tensor.

Why: a decode step multiplies one token by every weight, one kernel call each, with its dispatch and its
threads' fork and join; q/k/v as one call and gate/up as one call turn the five calls of a Llama layer's
q, k, v, gate and up projections into two, which read the same weight bytes as the five did.

Where: at load, in the load pipeline (`runtime/load.py`), after resharding and before the weight layout
is chosen: the artifact keeps one tensor per source layer (what exporters, per-layer quantization records and
tensor parallelism's cuts name), and each rank fuses its own slices. It needs only `specs`. As a compiler pass
(`--pipeline ...,fuse-linears`) it belongs after `quantize` and `convert-dtype` and before `shard` (which
cuts the fused layer per piece, following the split); the quantize pass cannot follow it.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, replace

import torch
from torch import fx

from lmforge.ir.graph import GraphIR
from lmforge.ir.linear import Linear, find_linears
from lmforge.ir.match import NoMatch
from lmforge.ir.pass_manager import PROPERTIES, PassResult, register_pass
from lmforge.ir.spec import TensorSpec

aten = torch.ops.aten
VIEWS = (aten.view.default, aten._unsafe_view.default)


@dataclass
class _Group:
    """A checked group, ready to rewrite: its members in graph order and the tensors the fused layer reads."""

    members: list[Linear]
    layer: str  # the fused layer's name, e.g. model.layers.0.self_attn.q_proj+k_proj+v_proj
    # arg position -> (concatenated tensor, source name, kind, the member attributes it is made of)
    tensors: dict[int, tuple[torch.Tensor, str, str, tuple[str, ...]]]
    sizes: list[int]  # each member's output features


def _layer(ir: GraphIR, lin: Linear) -> str:
    """The layer's name in the source model: its first weight's name without the last part (`.weight`)."""
    return ir.weight_names.get(lin.weight.target, lin.weight.target).rsplit(".", 1)[0]


def _joined(names: list[str]) -> str:
    """`a.b.q_proj`, `a.b.k_proj` -> `a.b.q_proj+k_proj`: the common dotted prefix once, the rest joined by '+'."""
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return ".".join([*parts[0][:common], "+".join(".".join(p[common:]) for p in parts)])


def _tensor_name(layers: list[str], names: list[str], fused: str) -> str:
    """The source name of a fused tensor: `<fused layer>.<suffix>` when every member's is `<layer>.<suffix>`."""
    suffixes = {n[len(l) + 1:] if n.startswith(l + ".") else None for l, n in zip(layers, names)}
    suffix = suffixes.pop() if len(suffixes) == 1 else None
    return f"{fused}.{suffix}" if suffix else "+".join(names)


def _positions(lin: Linear) -> tuple[list[int], int | None]:
    """The weight tensors' argument positions and the bias's (None when the layer has no bias)."""
    return [pos for pos, *_ in lin.form.weights], (lin.form.bias_pos if lin.bias is not None else None)


def _signature(ir: GraphIR, lin: Linear) -> dict[str, object]:
    """What members of one group must share, by what a difference is called in the stats."""
    node = lin.node
    if lin.through is not None:
        raise NoMatch("a weight read through a transpose")
    if node.kwargs:  # (a bias by keyword): every argument is positional below
        raise NoMatch("keyword arguments")
    spec = node.meta.get("spec")
    if not (isinstance(spec, TensorSpec) and isinstance(spec.shape[-1], int)):
        raise NoMatch("output features not static")
    weights, bias_pos = _positions(lin)
    tensors = []
    for pos, out_axis, *_ in lin.form.weights:
        arg = node.args[pos]
        if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
            raise NoMatch("a weight computed in the graph")
        t = ir.weight(arg.target)
        others_axes = t.shape[:out_axis] + t.shape[out_axis + 1:]
        tensors.append((pos, out_axis, t.dtype, ir.weight_kind(arg.target), others_axes))
    bias = lin.bias
    if bias is not None:
        if not (isinstance(bias, fx.Node) and bias.op == "get_attr" and ir.weight(bias.target).dim() == 1):
            raise NoMatch("a bias computed in the graph")
        bias = (ir.weight(bias.target).dtype, ir.weight_kind(bias.target))
    others = tuple((i, a) for i, a in enumerate(node.args) if i not in (lin.form.x_pos, *weights, bias_pos))
    if any(isinstance(a, fx.Node) for _, a in others):
        raise NoMatch("a tensor argument the linear form does not place")
    layer = _layer(ir, lin)
    q = ir.quantization
    return {
        "different ops or linear forms": (node.target, lin.form.x_pos, lin.form.bias_pos, lin.form.weights),
        "different non-tensor arguments": others,
        "different weight dtypes or shapes": tuple(tensors),
        "biases on some members only": bias is not None,
        "different bias dtypes": bias,
        "different output dtypes": (spec.dtype, spec.shape[:-1]),
        "different quantization settings": (q.get("layers", {}).get(layer), q.get("kept", {}).get(layer)),
    }


def _check_views(lin: Linear) -> None:
    """A split piece is strided along the axes before its last: a view of it may reshape the last axis, or the
    ones before it, never the two together."""
    features = lin.node.meta["spec"].shape[-1]
    for user in lin.node.users:
        if user.target in VIEWS:
            shape, prod, i = user.meta["spec"].shape, 1, len(user.meta["spec"].shape)
            while i > 0 and isinstance(shape[i - 1], int) and prod < features:
                i -= 1
                prod *= shape[i]
            if prod != features:
                raise NoMatch("an output reshaped across its last axis")


def _check(ir: GraphIR, members: list[Linear]) -> _Group:
    """The group, with its concatenated tensors, or NoMatch with the reason it stays apart."""
    signatures = [_signature(ir, lin) for lin in members]
    for why, value in signatures[0].items():
        if any(s[why] != value for s in signatures[1:]):
            raise NoMatch(why)
    for lin in members:
        _check_views(lin)
    layers = [_layer(ir, lin) for lin in members]
    fused = _joined(layers)
    _, bias_pos = _positions(members[0])
    axes = {pos: out_axis for pos, out_axis, *_ in members[0].form.weights}
    if bias_pos is not None:
        axes[bias_pos] = 0
    tensors, taken = {}, set(ir.weight_names.values())
    for pos, axis in axes.items():
        gets = [lin.node.args[pos] for lin in members]
        name = _tensor_name(layers, [ir.weight_names.get(g.target, g.target) for g in gets], fused)
        if name in taken:
            raise NoMatch("the fused name is taken")
        parts = tuple(g.target for g in gets)
        tensors[pos] = (axis, name, ir.weight_kind(parts[0]), parts)
    sizes = [lin.node.meta["spec"].shape[-1] for lin in members]
    return _Group(members, fused, tensors, sizes)


def _rewrite(ir: GraphIR, group: _Group, made: dict[tuple[str, ...], str]) -> None:
    """Put the fused layer and its split in place of the group's members. `made` maps the member attributes of
    each fused tensor made so far to its attribute: layers that share weights (tied across layers) share the
    fused tensor too."""
    graph, first = ir.graph, group.members[0].node
    args = list(first.args)
    with graph.inserting_before(first):
        for pos, (axis, name, kind, parts) in group.tensors.items():
            if parts not in made:  # concatenated here, one group at a time, so that peak memory stays low
                made[parts] = ir.unique_attr(re.sub(r"\W", "_", name))
                ir.set_weight(made[parts], torch.cat([ir.weight(a) for a in parts], dim=axis).contiguous(),
                              source_name=name, kind=kind)
            tensor = ir.weight(made[parts])
            args[pos] = graph.get_attr(made[parts])
            args[pos].meta["spec"] = TensorSpec(tuple(tensor.shape), tensor.dtype)
        fused = graph.call_function(first.target, tuple(args))
        spec = first.meta["spec"]
        fused.meta["spec"] = replace(spec, shape=(*spec.shape[:-1], sum(group.sizes)))
        split = graph.call_function(aten.split_with_sizes.default, (fused, list(group.sizes), -1))
        split.meta["spec"] = tuple(lin.node.meta["spec"] for lin in group.members)
        pieces = []
        for i, lin in enumerate(group.members):
            pieces.append(graph.call_function(operator.getitem, (split, i)))
            pieces[-1].meta["spec"] = lin.node.meta["spec"]
    for lin, piece in zip(group.members, pieces):
        old = [a for a in lin.node.all_input_nodes if a.op == "get_attr"]
        lin.node.replace_all_uses_with(piece)
        graph.erase_node(lin.node)
        for get in old:
            if not get.users:
                graph.erase_node(get)


def _bookkeeping(ir: GraphIR, groups: list[_Group]) -> None:
    """The fused layers take their members' place in `ir.quantization`'s "layers" and "kept"."""
    q = ir.quantization
    for key in ("layers", "kept"):
        if key not in q:
            continue
        entries = dict(q[key])
        for group in groups:
            names = [_layer(ir, lin) for lin in group.members]
            if names[0] not in entries:
                continue
            values = [entries[n] for n in names]
            merged = values[0] if key == "layers" else "; ".join(dict.fromkeys(values))
            entries = {group.layer if k == names[0] else k: merged if k == names[0] else v
                       for k, v in entries.items() if k not in names[1:]}
        q[key] = entries


@register_pass("fuse-linears", requires=("specs",), preserves=PROPERTIES - {"unquantized", "source-dtype"})
def fuse_linears(ir: GraphIR, options) -> PassResult:
    stats: dict[str, int] = {"groups": 0, "linears": 0}
    by_input: dict[fx.Node, list[Linear]] = {}
    for lin in find_linears(ir.graph):
        if isinstance(lin.x, fx.Node):
            by_input.setdefault(lin.x, []).append(lin)
    groups = []
    for members in by_input.values():
        if len(members) < 2:
            continue
        try:
            groups.append(_check(ir, members))
        except NoMatch as e:
            stats[f"unfused: {e}"] = stats.get(f"unfused: {e}", 0) + 1
    _bookkeeping(ir, groups)  # the member names are read from the weights the rewrite replaces
    made: dict[tuple[str, ...], str] = {}
    for group in groups:
        _rewrite(ir, group, made)
        ir.prune_weights()  # the members' tensors go as soon as nothing reads them
        stats["groups"] += 1
        stats["linears"] += len(group.members)
    if groups:
        ir.gm.recompile()
    return PassResult(bool(groups), stats)
