"""cse: common-subexpression elimination, so that a value each layer recomputes is computed once.

The rewrite: two `call_function` nodes with the same target, structurally equal arguments and equal specs
are one value; the later one's users read the earlier one and the later one is erased. Arguments compare
nodes by identity (after earlier merges, so chains merge in one pass: `unsqueeze(t)` and then
`_to_copy(unsqueeze(t))`), lists and tuples elementwise, and scalars, dtypes and devices by type and value
(`1`, `1.0` and `True` differ, as do `0.0` and `-0.0`). Two `get_attr` nodes of the same weight merge too.

Never merged:
- nodes with side effects or mutation: mutable schemas (the `index_copy_` cache writes), lmforge ops with
  `OpFacts.cache_writer`, FX's side-effectful functions (asserts), placeholders and the output;
- random ops (tagged `nondeterministic_seeded`: `rand_like`, `dropout`, ...);
- readers of a mutated value: anything that reads a value an op writes in place, or an alias of it (a view
  of the same base), since two such reads on either side of the write see different data. Only reads of
  sizes (`sym_size`, ...) are exempt, when every write in the graph is one that cannot resize (the cache
  writes). The values computed from such a read are not aliases of the cache and merge as usual;
- Python callables other than the operators the IR may hold (`serialize.PYTHON_OPS`).

After `shard`, nodes carry `meta["tp_global"]` (their one-device args, which `unshard` restores) and
`meta["tp_inserted"]`; nodes merge only when these agree too, and the one-device args that named an erased
node are pointed at its survivor.

Why: after the default pipeline each decoder layer still unsqueezes the rotary cos/sin rows and casts them to
the activations' dtype (two unsqueezes and two casts a layer, all equal); each node is a Python call and an
ATen dispatch on every decode step, which is what a CPU decode step's time goes to. Where: anywhere (it
changes no dtype, folding, quantization or sharding, and keeps every spec), best after the fusions and
constant-fold, before the final `dce`: a merged node has more users, which the fusions' single-use checks
would refuse.
"""

from __future__ import annotations

import torch
from torch import fx

from lmforge.ir.graph import GraphIR, op_name
from lmforge.ir.ops import bound_op, op_facts
from lmforge.ir.pass_manager import PROPERTIES, PassResult, register_pass
from lmforge.ir.serialize import PYTHON_OPS
from lmforge.ir.verify import ATEN_CACHE_WRITERS

aten = torch.ops.aten
_PURE_PYTHON = frozenset(PYTHON_OPS.values())
# reads of a tensor's sizes only: a write that cannot resize leaves them as they were
_SIZE_READS = frozenset({aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int})
# ops whose output aliases their input although their schema does not say so
_UNANNOTATED_VIEWS = frozenset({aten._unsafe_view.default})


class _NoKey(Exception):
    """An argument this pass does not know how to compare: the node is left alone."""


def _op(node: fx.Node):
    """The op a call_function node runs: its target, or the op whose CPU implementation it was bound to."""
    return bound_op(node.target) or node.target


def _key(value):
    """A hashable stand-in for an argument, equal exactly when the arguments are (nodes by identity)."""
    if isinstance(value, fx.Node):
        return ("node", value)
    if isinstance(value, (list, tuple)):
        return ("list" if isinstance(value, list) else "tuple", tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _key(v)) for k, v in value.items())))
    if isinstance(value, float):
        return (float, value.hex())  # -0.0 and 0.0 differ, nan equals nan
    if value is None or type(value) in (bool, int, str, torch.dtype, torch.layout, torch.memory_format):
        return (type(value), value)
    if isinstance(value, torch.device):
        return (torch.device, str(value))
    raise _NoKey(type(value).__name__)


def _tp_key(node: fx.Node, survivor: dict[fx.Node, fx.Node]):
    """What the shard pass recorded on `node` (its one-device args and spec, whether it inserted it)."""
    g = node.meta.get("tp_global")
    inserted = bool(node.meta.get("tp_inserted"))
    if g is None:
        return (None, inserted)
    resolve = lambda a: survivor.get(a, a) if isinstance(a, fx.Node) else a  # noqa: E731
    args = fx.node.map_aggregate(g["args"], resolve)
    kwargs = {k: fx.node.map_aggregate(v, resolve) for k, v in g["kwargs"].items()}
    return (_key(args), _key(kwargs), g["spec"], inserted)


def _writes(node: fx.Node) -> list[fx.Node]:
    """The nodes `node` writes in place (all of its inputs for a callable whose effects are unknown)."""
    if node.op != "call_function":
        return []
    op = _op(node)
    if not isinstance(op, torch._ops.OpOverload):
        return [] if op in _PURE_PYTHON else list(node.all_input_nodes)
    written = []
    for i, arg in enumerate(op._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            fx.node.map_arg(value, written.append)
    return written


def _may_alias(node: fx.Node) -> bool:
    """Can `node`'s value share memory with one of its inputs (a view, an in-place op's result, getitem)?"""
    if node.op != "call_function":
        return False
    op = _op(node)
    if not isinstance(op, torch._ops.OpOverload):
        return True
    return op in _UNANNOTATED_VIEWS or any(r.alias_info is not None for r in op._schema.returns)


def _unsafe_reads(graph: fx.Graph) -> set[fx.Node]:
    """The nodes that read a value written in place somewhere in the graph, or an alias of one: their value
    depends on where they sit relative to the write."""
    writers = [n for n in graph.nodes if _writes(n)]
    if not writers:
        return set()
    # the written values and every view they come from; then everything that views those
    roots, stack = set(), [w for n in writers for w in _writes(n)]
    while stack:
        n = stack.pop()
        if n not in roots:
            roots.add(n)
            if _may_alias(n):
                stack.extend(n.all_input_nodes)
    aliases = set()
    for n in graph.nodes:
        if n in roots or (_may_alias(n) and any(i in aliases for i in n.all_input_nodes)):
            aliases.add(n)
    no_resize = all(_op(n) in ATEN_CACHE_WRITERS or getattr(op_facts(n.target), "cache_writer", False)
                    for n in writers)
    unsafe = set(writers) | aliases
    for n in graph.nodes:
        if any(i in aliases for i in n.all_input_nodes) and not (no_resize and _op(n) in _SIZE_READS):
            unsafe.add(n)
    return unsafe


def _mergeable(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op != "call_function" or node.is_impure():
        return False
    op = _op(node)
    facts = op_facts(node.target)
    if facts is not None and facts.cache_writer:
        return False
    if isinstance(op, torch._ops.OpOverload):
        return not op._schema.is_mutable and torch.Tag.nondeterministic_seeded not in op.tags
    return op in _PURE_PYTHON


@register_pass("cse", requires=("specs",), preserves=PROPERTIES)
def cse(ir: GraphIR, options) -> PassResult:
    graph = ir.graph
    unsafe = _unsafe_reads(graph)
    first: dict[object, fx.Node] = {}  # key -> the earliest node with it
    survivor: dict[fx.Node, fx.Node] = {}  # erased node -> the node its users read now
    stats: dict[str, int] = {"merged": 0}
    for node in list(graph.nodes):
        if node in unsafe or not _mergeable(node):
            continue
        try:
            what = ("get_attr", node.target) if node.op == "get_attr" else \
                   (node.target, _key(tuple(node.args)), _key(dict(node.kwargs)))
            key = (what, node.meta.get("spec"), _tp_key(node, survivor))
            hash(key)
        except (_NoKey, TypeError):
            continue
        earlier = first.setdefault(key, node)
        if earlier is node:
            continue
        node.replace_all_uses_with(earlier)
        graph.erase_node(node)
        survivor[node] = earlier
        name = "get_attr" if node.op == "get_attr" else op_name(node.target)
        stats["merged"] += 1
        stats[name] = stats.get(name, 0) + 1
    if survivor:  # one-device args (shard's record) that named an erased node name its survivor
        resolve = lambda a: survivor.get(a, a) if isinstance(a, fx.Node) else a  # noqa: E731
        for node in graph.nodes:
            g = node.meta.get("tp_global")
            if g is not None:
                g["args"] = fx.node.map_aggregate(g["args"], resolve)
                g["kwargs"] = {k: fx.node.map_aggregate(v, resolve) for k, v in g["kwargs"].items()}
    return PassResult(stats["merged"] > 0, stats)
