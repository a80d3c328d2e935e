"""constant-fold: weight-only subgraphs become weights; rotary cos/sin become position tables."""

from __future__ import annotations

import torch

from lmforge.ir.capture import capture
from lmforge.ir.printer import format_ir
from lmforge.passes import PassManager
from tests.conftest import make_model, random_ids
from tests.ir.test_capture import run_chunks

aten = torch.ops.aten


def _hf(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_rotary_tables(arch, hf_model):
    ir = capture(hf_model)
    PassManager("remove-noops,dce,constant-fold{max_positions=32},dce").run(ir)
    stats = ir.history[2]["stats"]
    text = format_ir(ir)
    if arch == "gpt2":
        # negative case: learned positions are already a table lookup (embedding of wpe): nothing to do
        assert stats["tabulated"] == 0 and "aten.cos" not in text
    else:
        assert stats["tabulated"] == 2 and stats["not_pointwise"] == 0
        # cos and sin are no longer computed per token: they are read from (32, head_dim) tables
        assert "aten.cos.default" not in text and "aten.sin.default" not in text
        assert "= weight 'lmforge.table.cos'" in text and "aten.index.Tensor(%table_cos, [%position_ids])" in text
    ids = random_ids(2, 12)
    torch.testing.assert_close(run_chunks(ir, ids, [5, 1, 6]), _hf(hf_model, ids), rtol=1e-4, atol=1e-4)


def test_weight_only_chain_is_folded():
    model = make_model("llama")
    ir = capture(model)
    PassManager("remove-noops,dce").run(ir)
    # put a weight-only chain in front of one linear: W -> neg -> neg (what a rewrite might leave)
    linear = next(n for n in ir.graph.nodes if n.target is aten.linear.default)
    weight = linear.args[1]
    with ir.graph.inserting_before(linear):
        a = ir.graph.call_function(aten.neg.default, (weight,))
        b = ir.graph.call_function(aten.neg.default, (a,))
    a.meta["spec"] = b.meta["spec"] = weight.meta["spec"]
    linear.args = (linear.args[0], b)
    PassManager("constant-fold{max_new_bytes=0},dce").run(ir)
    stats = ir.history[-2]["stats"]
    assert stats["folded"] >= 1  # older transformers also leave a foldable inv_freq reshape
    assert linear.args[1].op == "get_attr" and linear.args[1].target.startswith("folded_")
    assert {a.name, b.name}.isdisjoint(n.name for n in ir.graph.nodes)  # the chain is gone
    ids = random_ids(1, 7)
    torch.testing.assert_close(run_chunks(ir, ids, [7]), _hf(model, ids), rtol=1e-4, atol=1e-4)


def test_large_fold_of_a_weight_still_in_use_is_skipped():
    """Negative case: folding neg(neg(W)) while W itself stays in use elsewhere would keep two copies of W;
    over the byte budget the fold must not fire."""
    ir = capture(make_model("llama"))
    linears = [n for n in ir.graph.nodes if n.target is aten.linear.default]
    q_proj, o_proj = linears[0], linears[3]  # both (64, 64)
    weight = q_proj.args[1]
    with ir.graph.inserting_before(o_proj):
        a = ir.graph.call_function(aten.neg.default, (weight,))
        b = ir.graph.call_function(aten.neg.default, (a,))
    a.meta["spec"] = b.meta["spec"] = weight.meta["spec"]
    o_proj.args = (o_proj.args[0], b)
    PassManager("constant-fold{max_new_bytes=16},dce").run(ir)
    stats = ir.history[-2]["stats"]
    assert stats["skipped_large"] == 1
    assert o_proj.args[1] is b and b.target is aten.neg.default
