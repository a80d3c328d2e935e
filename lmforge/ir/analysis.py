"""Static cost model of a graph: FLOPs per generated token, for `inspect` and `bench`.

Counted in the open: a matmul against a weight of shape (out, in) costs 2 * out * in FLOPs per token;
attention costs, per token and per token of context, 4 * n_heads * head_dim (q.k and p.v). Elementwise
work, norms and softmax are not counted (they are small next to these and memory-bound anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

import lmforge.codegen  # noqa: F401  (registers the lmforge:: ops)
from lmforge.ir.graph import GraphIR
from lmforge.ir.spec import TensorSpec

aten = torch.ops.aten
fused_attention = torch.ops.lmforge.attention.default
int4_linear, fp8_linear = torch.ops.lmforge.int4_linear.default, torch.ops.lmforge.fp8_linear.default
_WEIGHT_MATMULS = {aten.linear.default: 1, aten.mm.default: 1, aten.addmm.default: 2, aten.matmul.default: 1,
                   torch.ops.lmforge.linear.default: 1}


@dataclass(frozen=True)
class Cost:
    matmul_flops_per_token: int  # weight matmuls
    attention_flops_per_context_token: int  # per new token, per token already in the cache

    def flops_per_token(self, context: int) -> int:
        return self.matmul_flops_per_token + self.attention_flops_per_context_token * context


def _weight_numel(ir: GraphIR, arg) -> int:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return ir.weight(arg.target).numel()
    if isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in (aten.t.default, aten.permute.default,
                                                                                  aten._to_copy.default):
        return _weight_numel(ir, arg.args[0])
    return 0


def cost(ir: GraphIR) -> Cost:
    matmul = attention = 0
    for node in ir.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _WEIGHT_MATMULS:
            matmul += 2 * _weight_numel(ir, node.args[_WEIGHT_MATMULS[node.target]])
        elif node.target is int4_linear:  # qweight (N, K // 2) holds N * K weights
            matmul += 4 * _weight_numel(ir, node.args[1])
        elif node.target is fp8_linear:
            matmul += 2 * _weight_numel(ir, node.args[1])
        elif node.target in (aten.scaled_dot_product_attention.default, fused_attention):
            q: TensorSpec = node.args[0].meta["spec"]
            heads, head_dim = q.shape[1], q.shape[3]
            if isinstance(heads, int) and isinstance(head_dim, int):
                attention += 4 * heads * head_dim
    return Cost(matmul, attention)
