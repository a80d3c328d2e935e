"""The op registry: what the IR's tools know about each `lmforge::` op, declared once, beside the op.

An op in `codegen/` (its schema, reference, fake and kernels live there) also registers its `OpFacts`:

    register_op(torch.ops.lmforge.rms_norm.default, OpFacts(
        verify=("rms-norm", check),            # the verifier's rule for it (ir/verify.py)
        cost=None,                             # FLOPs per token (ir/analysis.py); None: not counted
        casts=Casts((0, 1), to="compute"),     # what convert-dtype casts its inputs to (passes/convert_dtype.py)
        shard="norm",                          # how a sharded input flows through it (passes/shard/)
        cpu=_rms_norm_cpu,                     # what a CPU engine binds the node to (runtime/bind.py)
    ))

and, where they apply: `cache_writer`, `params` (parameter counts, ir/graph.py), `linear` (its linear-layer
form, ir/linear.py) and `prepare` (a load-time hook fitting the node's inputs to its kernel, runtime/load.py).

`verify`, `analysis`, `convert-dtype`, `shard` and the runtime read these facts through `op_facts`; none of
them names an `lmforge::` op. ATen ops are not registered here: their rules stay in the tables of the tool
that needs them. `ir/` therefore knows nothing of `codegen/`: it defines the registry and codegen fills it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import fx

# how a sharded input flows through an op (the shard pass implements each kind):
#   "elementwise" the output is sharded like the sharded inputs (elementwise over the sharded axis)
#   "norm"        a norm over the last axis (argument 0): it keeps a sharding of any other axis
#   "attention"   q, k, v and the caches are sharded by heads, and so is the output
#   "linear"      a linear layer (column- or row-parallel, by its input's placement; see `linear`)
#   "replicated"  a sharded input cannot be taken: the layers it comes from stay replicated
SHARD_KINDS = ("elementwise", "norm", "attention", "linear", "replicated")


@dataclass(frozen=True)
class Casts:
    """convert-dtype's rule for an op: cast the arguments at `args` to `to`, which is "compute" (the graph's new
    dtype) or the position of the argument whose dtype they take."""

    args: tuple[int, ...]
    to: str | int = "compute"
    why: str = "cast-matmul-input"


@dataclass(frozen=True)
class OpFacts:
    """Everything the IR's tools need to know about one op. Every field is required to be thought about: the
    registry rejects an op without a sharding rule, so a new op is never replicated by accident."""

    shard: str  # one of SHARD_KINDS
    verify: tuple[str, Callable[[fx.Node], str | None]] | None = None  # (rule name, check -> problem or None)
    cost: Callable[[fx.Node], tuple[int, int]] | None = None  # node -> (matmul FLOPs, attention FLOPs/context)
    casts: Casts | None = None
    cpu: Callable | None = None  # the Python function a CPU engine calls instead of the dispatcher
    cache_writer: bool = False  # mutates its KV cache arguments (the only mutation a graph may have)
    # argument position -> parameters each stored element stands for (packed int4: 2; scales: 0)
    params: dict[int, int] = field(default_factory=dict)
    # the weight is a linear layer's: (x position, [(weight position, out axis, in axis or None, unit)],
    # bias position); unit is "col", "byte" (two columns a byte) or "group" (group_size columns)
    linear: Callable[[fx.Node], "LinearForm"] | None = None
    # load time: fit the node's inputs to what its kernel on `device` reads (int4 on the CPU widens float16
    # scales to float32); (ir, node, device) -> whether it changed anything. Run by the load pass `prepare-kernels`.
    prepare: Callable[[object, fx.Node, object], bool] | None = None  # (GraphIR, node, torch.device)
    # the lean decode step of a CPU engine: (cpu_program.Builder, *the node's args) -> its output Ref(s), having
    # appended the kernel call `cpu` would make for arguments laid out so, or None where `cpu` would not call
    # one of the step program's kernels (runtime/lean_step.py)
    record: Callable | None = None


@dataclass(frozen=True)
class LinearForm:
    """How a linear-layer op's tensors line up with W (out_features, in_features)."""

    x_pos: int
    weights: tuple[tuple[int, int, int | None, str], ...]  # (arg position, out axis, in axis, input unit)
    bias_pos: int | None
    group: int = 1  # columns per "group" unit


_FACTS: dict[object, OpFacts] = {}
_BOUND: dict[object, object] = {}  # OpFacts.cpu -> its op: what a CPU engine's bound node still is


def register_op(target, facts: OpFacts) -> None:
    """Declare `facts` for `target` (an `OpOverload`); once per op."""
    if target in _FACTS:
        raise ValueError(f"op {target} registered twice")
    if facts.shard not in SHARD_KINDS:
        raise ValueError(f"op {target}: shard must be one of {', '.join(SHARD_KINDS)}, got {facts.shard!r}")
    _FACTS[target] = facts
    if facts.cpu is not None:
        _BOUND[facts.cpu] = target


def op_facts(target) -> OpFacts | None:
    """The facts registered for `target` (an op, or the CPU implementation a node was bound to), or None
    (ATen ops, Python callables)."""
    facts = _FACTS.get(target)
    if facts is None and target in _BOUND:
        facts = _FACTS[_BOUND[target]]
    return facts


def bound_op(target):
    """The op whose CPU implementation `target` is (runtime/bind.py points nodes at them), or None."""
    return _BOUND.get(target)


def registered_ops() -> dict[object, OpFacts]:
    return dict(_FACTS)
