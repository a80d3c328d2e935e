"""The sharding table: for every ATen op the shard pass knows, the kind of rule that carries a sharded input through
it (`rules.RULES` implements each kind). An op with no entry takes no sharded input: the column layers its
inputs come from stay replicated, with the reason, so correctness never depends on an op being listed.

    elementwise  elementwise over its tensor arguments (with broadcasting): sharded like them
    copy         a copy of argument 0 (a cast, a clone): sharded like it; other arguments are not data
    view         a reshape: the sharded axis moves, and its per-rank size is written into the shape argument
    transpose    transpose / permute / t: the sharded axis moves
    unsqueeze    the sharded axis shifts
    split        along the sharded axis: each piece cut separately (GPT-2's fused q/k/v); along another: as is
    slice        of the sharded axis: each rank slices its own range; of another axis: as is
    cat          of equally sharded parts, along another axis
    sym_size     reading a size other than the sharded one
    getitem      one piece of a split
    norm         a norm over the last axes (argument 0): keeps a sharding of any other axis (per-head norms)
    attention    q, k, v and the caches sharded by heads; the output is sharded like q
    linear       column-parallel on a replicated input, row-parallel on one sharded along its features
    embedding    a token lookup in a trained table: vocab-parallel (starts sharding, like a column layer)
    replicated   takes its inputs whole (the collectives: a graph is sharded once)
"""

from __future__ import annotations

import operator

import torch

from lmforge.ir.ops import op_facts

aten = torch.ops.aten

ATEN_OP_KINDS = {
    **dict.fromkeys([aten.silu.default, aten.gelu.default, aten.tanh.default, aten.sigmoid.default,
                     aten.relu.default, aten.neg.default, aten.exp.default, aten.rsqrt.default, aten.sqrt.default,
                     aten.erf.default, aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar,
                     aten.sub.Tensor, aten.sub.Scalar, aten.div.Tensor, aten.div.Scalar,
                     aten.pow.Tensor_Scalar], "elementwise"),
    **dict.fromkeys([aten._to_copy.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
                     aten.detach.default], "copy"),
    **dict.fromkeys([aten.view.default, aten.reshape.default, aten._unsafe_view.default], "view"),
    **dict.fromkeys([aten.transpose.int, aten.permute.default, aten.t.default], "transpose"),
    aten.unsqueeze.default: "unsqueeze",
    aten.split.Tensor: "split",
    aten.split_with_sizes.default: "split",
    aten.slice.Tensor: "slice",
    aten.cat.default: "cat",
    aten.sym_size.int: "sym_size",
    operator.getitem: "getitem",
    aten.layer_norm.default: "norm",
    **dict.fromkeys([aten.linear.default, aten.mm.default, aten.matmul.default, aten.addmm.default], "linear"),
    aten.embedding.default: "embedding",
}

def op_kind(target) -> str | None:
    """The kind of sharding rule for a call target, or None when the op has none."""
    facts = op_facts(target)  # lmforge's own ops declare theirs beside them (`OpFacts.shard`)
    return facts.shard if facts is not None else ATEN_OP_KINDS.get(target)
