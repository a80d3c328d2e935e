"""The verifier: a table of per-op rules, plus the rules every node obeys.

It runs before and after every pipeline, and after every pass in debug mode. A failure names the node, the
rule and where the check ran: `node %linear (aten.linear.default) breaks 'matmul-dtypes': f32 input with
bf16 weight (after pass 'convert-dtype')`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx

from lmforge.errors import PassError
from lmforge.ir.graph import INPUT_NAMES, GraphIR, op_name
from lmforge.ir.ops import bound_op, op_facts
from lmforge.ir.spec import TensorSpec, spec_of

aten = torch.ops.aten


class VerifyError(PassError):
    pass


def same_float_dtype(*names: int) -> Callable[[fx.Node], str | None]:
    """The tensor arguments at these positions share one dtype."""

    def rule(node: fx.Node) -> str | None:
        specs = [spec_of(node.args[i]) for i in names if i < len(node.args)]
        dtypes = {s.dtype for s in specs if s is not None}
        if len(dtypes) > 1:
            return "inputs of different dtypes: " + ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        return None

    return rule


def _cache_write(node: fx.Node) -> str | None:
    target, src = spec_of(node.args[0]), spec_of(node.args[3])
    if not (isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder"):
        return f"writes into %{getattr(node.args[0], 'name', node.args[0])}, not into a cache input"
    if target and src and target.dtype != src.dtype:
        return f"writes {src.dtype} values into a {target.dtype} cache"
    return None


def _embedding(node: fx.Node) -> str | None:
    weight, ids = spec_of(node.args[0]), spec_of(node.args[1])
    if weight is not None and len(weight.shape) != 2:
        return f"weight has rank {len(weight.shape)}, expected 2"
    if ids is not None and ids.dtype.is_floating_point:
        return f"indices are {ids.dtype}"
    return None


# ATen op -> (rule name, check); a check returns None when the node is fine, else what is wrong. The rules of
# lmforge's own ops are declared with them (`OpFacts.verify`, ir/ops.py).
ATEN_RULES: dict[object, tuple[str, Callable[[fx.Node], str | None]]] = {
    aten.mm.default: ("matmul-dtypes", same_float_dtype(0, 1)),
    aten.bmm.default: ("matmul-dtypes", same_float_dtype(0, 1)),
    aten.addmm.default: ("matmul-dtypes", same_float_dtype(0, 1, 2)),
    aten.linear.default: ("matmul-dtypes", same_float_dtype(0, 1, 2)),
    aten.scaled_dot_product_attention.default: ("attention-dtypes", same_float_dtype(0, 1, 2)),
    aten.index_copy_.default: ("cache-write", _cache_write),
    aten.embedding.default: ("embedding", _embedding),
}
# ATen ops allowed to mutate, all of them writing the KV cache inputs (their rules above say which arguments);
# lmforge's own say so with `OpFacts.cache_writer`
ATEN_CACHE_WRITERS = {aten.index_copy_.default, aten.copy_.default}

ALLOWED_NAMESPACES = ("aten", "prims", "lmforge")


def _check_node(ir: GraphIR, node: fx.Node) -> tuple[str, str] | None:
    spec = node.meta.get("spec", "missing")
    if node.op != "output" and spec == "missing":
        return "has-spec", "no meta['spec']"
    if node.op == "get_attr":
        if not hasattr(ir.gm, node.target):
            return "weight-exists", f"reads missing weight {node.target!r}"
        tensor = getattr(ir.gm, node.target)
        if not isinstance(spec, TensorSpec) or spec.dtype != tensor.dtype or tuple(spec.shape) != tuple(tensor.shape):
            return "weight-spec", f"spec {spec} does not match the weight's {tuple(tensor.shape)} {tensor.dtype}"
    if node.op == "call_function":
        target = node.target
        facts = op_facts(target)
        if isinstance(target, torch._ops.OpOverload):
            if ir.kind == "lm" and target.namespace not in ALLOWED_NAMESPACES:
                return "known-op", f"op from namespace {target.namespace!r}"
            if target.namespace == "lmforge" and facts is None:
                return "known-op", "an lmforge op without OpFacts (declare them with lmforge.ir.ops.register_op)"
            if target._schema.is_mutable and target not in ATEN_CACHE_WRITERS and not (facts and facts.cache_writer):
                return "functional", "mutating op outside the cache writes"
        elif ir.kind == "lm" and bound_op(target) is None:  # a bound node keeps its op's rules
            from lmforge.ir.serialize import PYTHON_OPS

            if op_name(target) not in PYTHON_OPS:
                return "known-op", f"python callable {op_name(target)} is not serializable"
        rule = facts.verify if facts is not None else ATEN_RULES.get(target)
        if rule is not None:
            problem = rule[1](node)
            if problem:
                return rule[0], problem
    return None


def _check_convention(ir: GraphIR, suffix: str) -> None:
    placeholders = [n for n in ir.graph.nodes if n.op == "placeholder"]
    expected = list(INPUT_NAMES) + [f"{kv}_cache_{i}" for i in range(len(ir.kv.layers)) for kv in ("k", "v")]
    if [n.name for n in placeholders] != expected:
        raise VerifyError(f"graph inputs {[n.name for n in placeholders]} do not follow the convention{suffix}")
    out = next(n for n in ir.graph.nodes if n.op == "output")
    if not (isinstance(out.args[0], (tuple, list)) and len(out.args[0]) == 1):
        raise VerifyError(f"graph must return (logits,), returns {out.args[0]}{suffix}")


def verify(ir: GraphIR, where: str = "") -> None:
    """Raise `VerifyError` naming the first node that breaks a rule."""
    suffix = f" ({where})" if where else ""
    try:
        ir.graph.lint()
    except Exception as e:
        raise VerifyError(f"graph is malformed{suffix}: {e}") from e
    if ir.kind == "lm":
        _check_convention(ir, suffix)
    for node in ir.graph.nodes:
        broken = _check_node(ir, node)
        if broken:
            rule, problem = broken
            what = f" ({op_name(node.target)})" if node.op == "call_function" else ""
            raise VerifyError(f"node %{node.name}{what} breaks {rule!r}: {problem}{suffix}")
