"""Dtype inference: re-run a graph on meta tensors to refresh every node's spec dtype after a rewrite.

Symbolic sizes are bound to small distinct example values (`batch=2, seq=3, kv_len=5`), which every graph
of the calling convention accepts; the symbolic shapes in the specs are kept, only dtypes are updated.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import replace
from typing import Callable

import torch
from torch import fx

from lmforge.ir.graph import GraphIR
from lmforge.ir.spec import TensorSpec

EXAMPLE_SIZES = {"batch": 2, "seq": 3, "kv_len": 5}

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod}


def eval_dim(dim: int | str, env: dict[str, int] = EXAMPLE_SIZES) -> int:
    """Evaluate a symbolic size such as `"kv_len - seq"` (names, ints, + - * // %; nothing else)."""
    if isinstance(dim, int):
        return dim

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in env:
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError(f"unsupported symbolic size {dim!r}")

    return ev(ast.parse(dim, mode="eval"))


def _to_meta(value):
    if isinstance(value, torch.device):
        return torch.device("meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    return value


# Meta kernels do not always reproduce the strides of the real ones (SDPA's output, for one), so a `view`
# that is valid at run time can fail on meta tensors; inference only needs shapes and dtypes.
_META_SUBSTITUTES = {torch.ops.aten.view.default: torch.ops.aten.reshape.default,
                     torch.ops.aten._unsafe_view.default: torch.ops.aten.reshape.default}


def meta_call(node: fx.Node, env: dict[fx.Node, object]):
    """Run one call_function node on the meta values of its inputs."""
    load = lambda a: env[a] if isinstance(a, fx.Node) else a  # noqa: E731
    args = _to_meta(fx.node.map_aggregate(node.args, load))
    kwargs = {k: _to_meta(fx.node.map_aggregate(v, load)) for k, v in node.kwargs.items()}
    target = _META_SUBSTITUTES.get(node.target, node.target)
    try:
        return target(*args, **kwargs)
    except Exception as e:
        raise RuntimeError(f"%{node.name} ({node.target}) fails on meta inputs: {str(e).splitlines()[0]}") from e


def meta_run(ir: GraphIR, before: Callable[[fx.Node, dict], None] | None = None,
             env: dict[fx.Node, object] | None = None) -> dict[fx.Node, object]:
    """Run the graph on meta tensors; returns each node's value (in `env`, if given). `before(node, env)`
    may rewrite a call_function node (and add values to `env` for nodes it inserts) just before it runs."""
    env = {} if env is None else env
    for node in list(ir.graph.nodes):
        if node.op == "placeholder":
            spec: TensorSpec = node.meta["spec"]
            env[node] = torch.empty([eval_dim(d) for d in spec.shape], dtype=spec.dtype, device="meta")
        elif node.op == "get_attr":
            env[node] = getattr(ir.gm, node.target).to("meta")
        elif node.op == "call_function":
            if before is not None:
                before(node, env)
            env[node] = meta_call(node, env)
    return env


def refresh_dtypes(ir: GraphIR) -> int:
    """Set each tensor spec's dtype to what the graph now computes. Returns how many specs changed."""
    values = meta_run(ir)
    changed = 0
    for node, value in values.items():
        spec = node.meta.get("spec")
        if isinstance(spec, TensorSpec) and isinstance(value, torch.Tensor) and value.dtype != spec.dtype:
            node.meta["spec"] = replace(spec, dtype=value.dtype)
            changed += 1
    return changed
