"""shard{tp=N}: tensor parallelism (Megatron's column/row split), decided from the graph's structure.

The rewrite gives every rank the same graph over its own slice of the weights:

    column-parallel  a linear layer whose input is replicated: it keeps a slice of its output features
                     (rows of W), so its output is sharded along the last axis
    row-parallel     a linear layer whose input is sharded along the contracted axis: it keeps the matching
                     columns of W and its partial sums are added up by `lmforge.all_reduce` (the bias,
                     if any, is added once, after the all-reduce)
    final projection column-parallel, its vocabulary padded to a multiple of N; `lmforge.all_gather`
                     puts the logits back together (and a slice drops the padding)
    token embeddings vocab-parallel: each rank holds a slice of the table's rows (the same slice as a tied
                     final projection), looks up the ids in it, zeroes the others, and an all-reduce adds
                     the ranks' lookups up (rank r's first row is a per-rank constant, `<table>.tp_start`)
    everything else  replicated: position tables, norms on the residual stream, the residual adds

Which layers are which follows from propagating placements (replicated, or sharded along one axis with a
known set of global indices per rank) through the graph in order: views and transposes move the sharded
axis (and the head counts in their shape arguments are rewritten), elementwise ops, rotary embeddings and
per-head norms keep it, splits along it (GPT-2's fused q/k/v) cut each piece separately, attention shards
by heads, and the KV cache inputs get the local head count. Where a column layer's output meets attention,
its features are cut in whole heads; with fewer key/value heads than ranks (GQA), each rank keeps the one
key/value head its query heads read (the kv projection is replicated in part). A column layer whose output
reaches something that cannot be sharded (a reduction over the sharded axis, a residual add, an op with no
rule) is left replicated, and listed with the reason.

Quantized layers shard too: int4 by whole groups along the input axis (a group that would straddle two
ranks is an error that names the layer and a group size that fits), fp8 and int8 with their per-row scales.

The pass is `plan` then `apply`, one concept a file:

    kinds.py      the sharding table: which kind of rule each op has (lmforge's ops apart)
    rules.py      one propagation rule per kind          columns.py  how a column layer's features are cut
    placement.py  placements and the propagation state   reshape.py  index arithmetic of reshapes and slices
    linear.py     the linear layers, in each form, and which of their tensors a placement cuts
    propagate.py  the walk, and the `ShardPlan` it settles on (`plan(ir, tp)`: no rewrite)
    plan.py       `ShardPlan`: every weight's cut, every collective, the replicated layers, per-rank sizes
    rewrite.py    applies a plan; records `ir.tensor_parallel` (see `ir/tensor_parallel.py`)
    unshard.py    `unshard`, `assemble`, `for_rank`, `reshard`: back to one device, and to another tp

What the pass leaves: `ir.tensor_parallel`, a `TensorParallel` (tp, every sharded attribute's `WeightCut`,
the replicated layers, the collectives; `rank_weights[r]` holds rank r's sharded tensors, the graph module
rank 0's); every node the pass changed keeps its global args and spec in `meta["tp_global"]`, and every node
it added has `meta["tp_inserted"]`, which is what `unshard` needs to give back the one-device graph.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.ir.graph import GraphIR
from lmforge.ir.pass_manager import PROPERTIES, PassResult, register_pass
from lmforge.passes.shard.linear import Linear, as_linear
from lmforge.passes.shard.plan import ShardPlan
from lmforge.passes.shard.propagate import check, plan
from lmforge.passes.shard.rewrite import apply
from lmforge.passes.shard.unshard import assemble, for_rank, reshard, unshard

__all__ = ["Linear", "ShardOptions", "ShardPlan", "apply", "as_linear", "assemble", "for_rank", "plan", "reshard",
           "shard", "unshard"]


@dataclass(frozen=True)
class ShardOptions:
    tp: int = 0  # tensor-parallel ranks (required: no silent default)


@register_pass("shard", options=ShardOptions, requires=("specs", "unsharded"), preserves=PROPERTIES - {"unsharded"})
def shard(ir: GraphIR, options: ShardOptions) -> PassResult:
    """Plan, then apply the plan (see the module docstring). Runs last in a pipeline: every rewrite before it
    works on the one-device graph, and `unshard` gives that graph back."""
    check(ir, options.tp)
    if options.tp == 1:
        return PassResult(False, {})
    return PassResult(True, apply(ir, plan(ir, options.tp)))
