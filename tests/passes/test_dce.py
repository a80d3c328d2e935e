"""dce: dead nodes and unread weights go; the in-place cache writes, which nothing reads, stay."""

from __future__ import annotations

import torch

from lmforge.ir.capture import capture
from lmforge.passes import PassManager
from tests.conftest import make_model, random_ids
from tests.ir.test_capture import run_chunks

aten = torch.ops.aten


def test_removes_dead_code_and_weights_but_keeps_cache_writes():
    model = make_model("llama")
    ir = capture(model)
    # a dead computation on a weight, as a rewrite would leave behind
    weight = next(n for n in ir.graph.nodes if n.op == "get_attr")
    out = next(n for n in ir.graph.nodes if n.op == "output")
    with ir.graph.inserting_before(out):
        dead = ir.graph.call_function(aten.neg.default, (weight,))
    dead.meta["spec"] = weight.meta["spec"]
    writes_before = sum(1 for n in ir.graph.nodes if n.target is aten.index_copy_.default)
    PassManager("dce").run(ir)
    stats = ir.history[0]["stats"]
    assert stats["nodes_removed"] >= 1
    assert dead not in ir.graph.nodes
    # negative case: the cache writes have no users, yet removing them would lose the cache
    assert sum(1 for n in ir.graph.nodes if n.target is aten.index_copy_.default) == writes_before == 4
    # the unused rotary copy HF keeps (original_inv_freq) is dropped from the weights
    assert stats["weights_removed"] >= 1
    assert not any("original_inv_freq" in name for name in ir.weight_names.values())
    ids = random_ids(1, 9)
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(run_chunks(ir, ids, [4, 5]), ref, rtol=1e-4, atol=1e-4)
