"""fuse-rmsnorm: each RMSNorm, eight-odd ATen ops, becomes one `lmforge.rms_norm`.

The rewrite: the chain

    x32 = x.to(float32)?              a cast, or x itself when it is float32
    n   = X * rsqrt(mean(x32 ** 2, dim=-1, keepdim=True) + eps)        X is x or x32
    y   = (w * n).to(out)?            weight first, one rounding       (our convert-dtype's order), or
    y   = w * n.to(x.dtype)           cast first, then weight          (Hugging Face's half-precision order)

with `w` computed from weights alone (a weight, or `1 + weight` as Gemma has it) becomes
`lmforge.rms_norm(x, w, eps, out_dtype, cast_before_weight)`, which computes exactly that (its reference is
these ops). A chain that differs (a norm over another dim, a bias, other users of the intermediate
values) is left as it was and counted in the stats with the reason.

Why: a decode step runs two norms per layer on one row each; as one op they cost one call instead of
eight, and on the CPU one pass of the `rmsnorm_bf16` kernel. Where: after `convert-dtype` (so it sees the
casts that pass inserts and fuses them too) and before `constant-fold` (which folds `1 + weight`).
"""

from __future__ import annotations

import torch
from torch import fx

from lmforge.codegen.rms_norm import rms_norm
from lmforge.ir.graph import GraphIR
from lmforge.ir.spec import spec_of
from lmforge.ir.pass_manager import PROPERTIES, PassResult, register_pass
from lmforge.ir.match import NoMatch, only_user, other, replace_match

aten = torch.ops.aten
MUL = aten.mul.Tensor
_SHARED = "an intermediate value has other users"


def _is_cast(node) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is aten._to_copy.default
            and set(node.kwargs) <= {"dtype"} and "dtype" in node.kwargs)


def _weight_only(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        return True
    inputs = node.all_input_nodes
    return node.op == "call_function" and bool(inputs) and all(_weight_only(a) for a in inputs)


def _match(rsqrt: fx.Node):
    nodes = {rsqrt}
    add = rsqrt.args[0]
    if add.target is not aten.add.Tensor or not any(isinstance(a, float) for a in add.args):
        raise NoMatch("rsqrt of something other than mean + eps")
    eps = next(a for a in add.args if isinstance(a, float))
    mean = next(a for a in add.args if isinstance(a, fx.Node))
    rank = len(spec_of(mean).shape)
    if mean.target is not aten.mean.dim or list(mean.args[1]) not in ([-1], [rank - 1]) or mean.args[2:3] != (True,):
        raise NoMatch("not a mean over the last dim")
    sq = mean.args[0]
    if sq.target is not aten.pow.Tensor_Scalar or sq.args[1] != 2:
        raise NoMatch("not a mean of squares")
    x32 = sq.args[0]
    x = x32.args[0] if _is_cast(x32) and x32.kwargs["dtype"] == torch.float32 else x32
    if spec_of(x32).dtype != torch.float32:
        raise NoMatch("statistics not in float32")
    nodes |= {add, mean, sq} | ({x32} if x32 is not x else set())
    if len(add.users) != 1 or len(mean.users) != 1 or len(sq.users) != 1:
        raise NoMatch("an intermediate value has other users")
    normed = only_user(rsqrt, _SHARED)
    if normed.target is not MUL or other(normed, rsqrt) not in (x, x32):
        raise NoMatch("rsqrt does not scale the input")
    nodes.add(normed)
    nxt = only_user(normed, _SHARED)
    cast_before_weight = False
    if _is_cast(nxt):  # HF's order: n.to(x.dtype), then the weight
        if nxt.kwargs["dtype"] != spec_of(x).dtype:
            raise NoMatch("normalized values cast to a dtype other than the input's")
        cast_before_weight = True
        nodes.add(nxt)
        scaled_input, nxt = nxt, only_user(nxt, _SHARED)
    else:
        scaled_input = normed
    if nxt.target is not MUL or not _weight_only(other(nxt, scaled_input)):
        raise NoMatch("no weight multiplies the normalized values")
    weight = other(nxt, scaled_input)
    if spec_of(weight) is None or len(spec_of(weight).shape) != 1:
        raise NoMatch("the weight is not one value per feature")
    nodes.add(nxt)
    out = nxt
    if not cast_before_weight and len(out.users) == 1 and _is_cast(next(iter(out.users))):
        out = next(iter(out.users))
        nodes.add(out)
    return x, weight, float(eps), spec_of(out).dtype, cast_before_weight, out, nodes


@register_pass("fuse-rmsnorm", requires=("specs", "unfolded", "unsharded"), preserves=PROPERTIES)
def fuse_rmsnorm(ir: GraphIR, options) -> PassResult:
    stats: dict[str, int] = {"fused": 0}
    graph = ir.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.rsqrt.default:
            continue
        try:
            x, weight, eps, out_dtype, cast_first, out, nodes = _match(node)
        except NoMatch as e:
            stats[f"unfused: {e}"] = stats.get(f"unfused: {e}", 0) + 1
            continue
        replace_match(ir, out, rms_norm, (x, weight, eps, out_dtype, cast_first), nodes)
        stats["fused"] += 1
    return PassResult(stats["fused"] > 0, stats)
