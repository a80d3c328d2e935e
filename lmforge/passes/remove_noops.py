"""remove-noops: erase assertion nodes and replace ops that return their input unchanged by that input.

The rewrite: export leaves `_assert_tensor_metadata` and `_assert_scalar` checks, and HF code leaves
identities such as `alias(x)`, `x.to(x.dtype)`, `x * 1.0`, `view(x, x.shape)` and full slices. Each rule in
`RULES` names one law; a rule fires only when the specs prove the identity (same shape and dtype).
Why: fewer nodes to interpret and to pattern-match, so later rewrites (attention fusion, quantization) see
one canonical form. Where: first, right after capture; run `dce` after it to drop what it disconnects.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import fx

from lmforge.ir.graph import GraphIR
from lmforge.ir.spec import spec_of
from lmforge.ir.pass_manager import PROPERTIES, PassResult, register_pass

aten = torch.ops.aten
ERASE = object()  # the node has no value and no users: delete it


def _identity_if_same(node: fx.Node) -> fx.Node | None:
    """The op is an identity when its output spec equals its input's."""
    src = node.args[0]
    return src if spec_of(src) is not None and spec_of(src) == spec_of(node) else None


def _scalar_identity(value: float) -> Callable[[fx.Node], fx.Node | None]:
    def rule(node: fx.Node) -> fx.Node | None:
        other = node.args[1] if len(node.args) > 1 else None
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other == value and not node.kwargs:
            return _identity_if_same(node)
        return None

    return rule


def _full_slice(node: fx.Node) -> fx.Node | None:
    _, _, start, end, step = tuple(node.args) + (None, 0, None, None, 1)[len(node.args):]
    if start in (0, None) and (end is None or end >= sys.maxsize) and step == 1:
        return _identity_if_same(node)
    return None


def _to_copy_same(node: fx.Node) -> fx.Node | None:
    allowed = {"dtype", "layout", "device", "memory_format"}
    if set(node.kwargs) - allowed or node.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return None
    return _identity_if_same(node)


def _erase(node: fx.Node):
    return ERASE if not node.users else None


# op -> (rule name, rewrite); a rewrite returns the node's replacement, ERASE, or None to keep the node.
RULES: dict[object, tuple[str, Callable[[fx.Node], object]]] = {
    aten._assert_tensor_metadata.default: ("assert", _erase),  # export's dtype checks: the verifier holds these
    aten._assert_scalar.default: ("assert", _erase),  # export's shape guards: the runtime enforces sizes
    aten.sym_constrain_range_for_size.default: ("assert", _erase),
    aten.alias.default: ("alias", lambda n: n.args[0]),  # alias(x) = x
    aten._to_copy.default: ("cast-same", _to_copy_same),  # x.to(x.dtype) = x
    aten.mul.Tensor: ("mul-one", _scalar_identity(1.0)),  # x * 1 = x
    aten.div.Tensor: ("div-one", _scalar_identity(1.0)),  # x / 1 = x
    aten.add.Tensor: ("add-zero", _scalar_identity(0.0)),  # x + 0 = x
    aten.sub.Tensor: ("sub-zero", _scalar_identity(0.0)),  # x - 0 = x
    aten.view.default: ("view-same", _identity_if_same),  # view(x, shape(x)) = x
    aten.reshape.default: ("view-same", _identity_if_same),  # reshape(x, shape(x)) = x
    aten._unsafe_view.default: ("view-same", _identity_if_same),
    aten.expand.default: ("expand-same", _identity_if_same),  # expand(x, shape(x)) = x
    aten.slice.Tensor: ("full-slice", _full_slice),  # x[0:INT_MAX] = x
    aten.dropout.default: ("dropout", lambda n: n.args[0]),  # inference: dropout(x) = x
}


@register_pass("remove-noops", requires=("specs", "unsharded"), preserves=PROPERTIES)
def remove_noops(ir: GraphIR, options) -> PassResult:
    stats: dict[str, int] = {}
    for node in list(ir.graph.nodes):
        rule = RULES.get(node.target) if node.op == "call_function" else None
        if rule is None:
            continue
        name, rewrite = rule
        result = rewrite(node)
        if result is None:
            continue
        if result is ERASE:
            ir.graph.erase_node(node)
        else:
            node.replace_all_uses_with(result)
            ir.graph.erase_node(node)
        stats[name] = stats.get(name, 0) + 1
    return PassResult(bool(stats), stats)
