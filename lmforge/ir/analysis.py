"""Static cost model of a graph: FLOPs per generated token, for `inspect` and `bench`.

Counted in the open: a matmul against a weight of shape (out, in) costs 2 * out * in FLOPs per token;
attention costs, per token and per token of context, 4 * n_heads * head_dim (q.k and p.v). Elementwise
work, norms and softmax are not counted (they are small next to these and memory-bound anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmforge.ir.graph import GraphIR
from lmforge.ir.linear import as_linear
from lmforge.ir.ops import op_facts
from lmforge.ir.spec import TensorSpec

aten = torch.ops.aten


@dataclass(frozen=True)
class Cost:
    matmul_flops_per_token: int  # weight matmuls
    attention_flops_per_context_token: int  # per new token, per token already in the cache

    def flops_per_token(self, context: int) -> int:
        return self.matmul_flops_per_token + self.attention_flops_per_context_token * context


def _sdpa(node) -> tuple[int, int]:
    q: TensorSpec = node.args[0].meta["spec"]
    heads, head_dim = q.shape[1], q.shape[3]
    return 0, 4 * heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else 0


def node_cost(node) -> tuple[int, int]:
    """(matmul FLOPs, attention FLOPs per context token) of one new token through `node`: an lmforge op says
    its own (`OpFacts.cost`); an ATen linear layer costs 2 * out * in; ATen attention 4 * heads * head_dim."""
    facts = op_facts(node.target)
    if facts is not None:
        return facts.cost(node) if facts.cost is not None else (0, 0)
    if node.target is aten.scaled_dot_product_attention.default:
        return _sdpa(node)
    lin = as_linear(node)
    return (2 * math.prod(lin.weight.meta["spec"].shape), 0) if lin is not None else (0, 0)


def cost(ir: GraphIR) -> Cost:
    matmul = attention = 0
    for node in ir.graph.nodes:
        if node.op == "call_function":
            m, a = node_cost(node)
            matmul, attention = matmul + m, attention + a
    return Cost(matmul, attention)
