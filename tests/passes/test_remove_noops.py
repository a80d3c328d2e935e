"""remove-noops: asserts and identities go; the model's outputs do not change."""

from __future__ import annotations

import pytest
import torch

from lmforge.ir.capture import capture
from lmforge.ir.graph import op_name
from lmforge.passes import PassManager
from tests.conftest import random_ids
from tests.ir.test_capture import run_chunks

aten = torch.ops.aten


def test_fires_and_matches_hf(hf_model):
    ir = capture(hf_model)
    before = ir.op_counts()
    PassManager("remove-noops,dce").run(ir)
    stats = ir.history[0]["stats"]
    assert stats["assert"] == before["aten._assert_tensor_metadata.default"]
    after = ir.op_counts()
    assert "aten._assert_tensor_metadata.default" not in after and "aten.alias.default" not in after
    assert sum(after.values()) < sum(before.values())
    ids = random_ids(2, 10)
    with torch.no_grad():
        ref = hf_model(ids).logits
    torch.testing.assert_close(run_chunks(ir, ids, [6, 1, 3]), ref, rtol=1e-4, atol=1e-4)


def _graph_with(op_fn):
    """A one-op GraphIR-free graph check through the rule table directly."""
    from torch import fx

    from lmforge.ir.spec import TensorSpec
    from lmforge.passes.remove_noops import RULES

    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["spec"] = TensorSpec(("batch", 4), torch.float32)
    node = op_fn(graph, x)
    graph.output((node,))
    rule = RULES[node.target]
    return x, node, rule[1](node)


def test_identities_fire():
    from lmforge.ir.spec import TensorSpec

    def mul_one(graph, x):
        n = graph.call_function(aten.mul.Tensor, (x, 1.0))
        n.meta["spec"] = x.meta["spec"]
        return n

    x, node, result = _graph_with(mul_one)
    assert result is x

    def same_cast(graph, x):
        n = graph.call_function(aten._to_copy.default, (x,), {"dtype": torch.float32})
        n.meta["spec"] = TensorSpec(("batch", 4), torch.float32)
        return n

    x, node, result = _graph_with(same_cast)
    assert result is x


def test_negative_cases_keep_the_node():
    """Ops that change values, dtypes or shapes are not identities and must stay."""
    from lmforge.ir.spec import TensorSpec

    def mul_two(graph, x):  # x * 2 changes values
        n = graph.call_function(aten.mul.Tensor, (x, 2.0))
        n.meta["spec"] = x.meta["spec"]
        return n

    def real_cast(graph, x):  # a cast to another dtype is a conversion, not a no-op
        n = graph.call_function(aten._to_copy.default, (x,), {"dtype": torch.bfloat16})
        n.meta["spec"] = TensorSpec(("batch", 4), torch.bfloat16)
        return n

    def int_mul_one(graph, x):  # int * 1.0 promotes to float: the spec differs, so it stays
        x.meta["spec"] = TensorSpec(("batch", 4), torch.int64)
        n = graph.call_function(aten.mul.Tensor, (x, 1.0))
        n.meta["spec"] = TensorSpec(("batch", 4), torch.float32)
        return n

    def partial_slice(graph, x):  # x[:, 0:2] drops columns
        n = graph.call_function(aten.slice.Tensor, (x, 1, 0, 2))
        n.meta["spec"] = TensorSpec(("batch", 2), torch.float32)
        return n

    for build in (mul_two, real_cast, int_mul_one, partial_slice):
        _, _, result = _graph_with(build)
        assert result is None, build.__name__


@pytest.mark.parametrize("name", ["aten._assert_tensor_metadata.default", "aten.alias.default"])
def test_rule_table_covers(name):
    from lmforge.passes.remove_noops import RULES

    assert name in {op_name(k) for k in RULES}
