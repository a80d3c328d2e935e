"""dce: dead-code elimination, then drop the weights no node reads any more.

The rewrite: delete every node whose value nobody uses and that has no side effect (the cache writes,
`index_copy_` on the cache inputs, are side effects and stay). Why: rewrites leave dead nodes and dead
weights behind; dead weights would be written to the artifact. Where: after any pass that replaces nodes,
and last in every pipeline.
"""

from __future__ import annotations

from lmforge.ir.graph import GraphIR
from lmforge.ir.pass_manager import PROPERTIES, PassResult, register_pass


@register_pass("dce", preserves=PROPERTIES)
def dce(ir: GraphIR, options) -> PassResult:
    nodes_before = len(ir.graph.nodes)
    weights_before = len(list(ir.gm.named_buffers()))
    ir.graph.eliminate_dead_code()
    ir.prune_weights()
    stats = {
        "nodes_removed": nodes_before - len(ir.graph.nodes),
        "weights_removed": weights_before - len(list(ir.gm.named_buffers())),
    }
    return PassResult(any(stats.values()), stats)
