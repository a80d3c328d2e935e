"""fuse-glu: each gated MLP's activation and product, `act(gate) * up`, becomes one `lmforge.glu`.

The rewrite (either operand order in the product):

    mul(act(gate), up)      ->      lmforge.glu(gate, up, act)

    aten.silu(gate)                       "silu"        SwiGLU (Llama, Qwen2, Mistral, Phi-3)
    aten.gelu(gate)                       "gelu"        GeGLU, exact GELU
    aten.gelu(gate, approximate="tanh")   "gelu_tanh"   GeGLU, tanh form (Gemma's gelu_pytorch_tanh)

when gate and up have one shape and one dtype. The op's reference is those two ops, so nothing changes
numerically, in half precision too: act(gate) is still rounded to its dtype before the product. In the
default pipeline the chain carries no casts (convert-dtype runs the linear layers that make gate and up in
the weights' dtype and upcasts neither op); a chain with a cast between the activation and the product is
not matched, since the op has no cast there. An activation read by anything else, a product with mismatched
operands or a cast in between is left alone and counted in the stats with the reason; an activation that
feeds no product at all (GPT-NeoX's or Falcon's plain MLP) is no gated MLP and is not counted.

Why: a decode step runs this once per layer over the intermediate size, the widest activation in the
model; as one op it reads gate and up once and writes one tensor, instead of also writing and re-reading
act(gate), and on the CPU it is one pass of `cpu/gemv.c`'s glu kernel. Where: after convert-dtype, beside
fuse-rmsnorm and fuse-rotary (it then sees the graph's final dtypes; before it works too, the op declaring
its casts), and before shard, which carries the op through as elementwise (gate and up are column-parallel,
so each rank gates its own slice). It does not care whether constant-fold has run.
"""

from __future__ import annotations

import torch
from torch import fx

from lmforge.codegen.glu import glu
from lmforge.ir.graph import GraphIR
from lmforge.ir.pass_manager import PROPERTIES, PassResult, register_pass
from lmforge.ir.spec import spec_of
from lmforge.ir.match import NoMatch, other, replace_match

aten = torch.ops.aten
MUL = aten.mul.Tensor
# (ATen activation, its `approximate`) -> lmforge.glu's act
ACTIVATIONS = {
    (aten.silu.default, None): "silu",
    (aten.gelu.default, "none"): "gelu",
    (aten.gelu.default, "tanh"): "gelu_tanh",
}


def _act(node: fx.Node) -> str | None:
    """The glu act `node` computes, or None when it is no activation the op has."""
    if node.op != "call_function":
        return None
    approximate = None
    if node.target is aten.gelu.default:
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    return ACTIVATIONS.get((node.target, approximate))


def _is_cast(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is aten._to_copy.default


def _match(activation: fx.Node):
    """activation -> (gate, up, product, nodes), None when it feeds no product (no gated MLP), or NoMatch."""
    users = list(activation.users)
    products = [u for u in users if u.target is MUL]
    cast_products = [u for u in users if _is_cast(u) and any(v.target is MUL for v in u.users)]
    if not products and not cast_products:
        return None
    if len(users) > 1:
        raise NoMatch("the activation has other users")
    if cast_products:
        raise NoMatch("a cast between the activation and the product")
    product = products[0]
    up = other(product, activation)
    if up is activation:
        raise NoMatch("the activation times itself")
    if not isinstance(up, fx.Node):
        raise NoMatch("the activation times a number")
    gate = activation.args[0]
    gate_spec, up_spec = spec_of(gate), spec_of(up)
    if gate_spec is None or up_spec is None:
        raise NoMatch("gate or up has no tensor spec")
    if gate_spec.dtype != up_spec.dtype:
        raise NoMatch("gate and up differ in dtype")
    if gate_spec.shape != up_spec.shape:
        raise NoMatch("gate and up differ in shape")
    return gate, up, product, {activation, product}


@register_pass("fuse-glu", requires=("specs", "unsharded"), preserves=PROPERTIES)
def fuse_glu(ir: GraphIR, options) -> PassResult:
    stats: dict[str, int] = {"fused": 0}
    for node in list(ir.graph.nodes):
        act = _act(node)
        if act is None:
            continue
        try:
            match = _match(node)
        except NoMatch as e:
            stats[f"unfused: {e}"] = stats.get(f"unfused: {e}", 0) + 1
            continue
        if match is None:
            continue
        gate, up, product, nodes = match
        replace_match(ir, product, glu, (gate, up, act), nodes)
        stats["fused"] += 1
        stats[f"fused: {act}"] = stats.get(f"fused: {act}", 0) + 1
    return PassResult(stats["fused"] > 0, stats)
