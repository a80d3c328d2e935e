"""fuse-rmsnorm: each RMSNorm chain becomes one lmforge.rms_norm, in float32, after convert-dtype, and in a
model captured in bfloat16 (Hugging Face's cast-then-weight order), and still matches HF eager."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.ir.capture import capture
from lmforge.passes import PassManager
from tests.conftest import make_model, random_ids
from tests.ir.test_capture import assert_matches_hf, run_chunks
from tests.ir.test_capture_archs import build_family

aten = torch.ops.aten
FUSED = torch.ops.lmforge.rms_norm.default


def count(ir, target) -> int:
    return sum(1 for n in ir.graph.nodes if n.target is target)


def stats(ir) -> dict:
    return next(h["stats"] for h in ir.history if h["pass"] == "fuse-rmsnorm")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_norm_fused_and_matches_hf(arch, hf_model, dtype):
    ir = capture(hf_model)
    convert = f"convert-dtype{{dtype={dtype}}}," if dtype != "float32" else ""
    assert count(ir, aten.rsqrt.default) == (0 if arch == "gpt2" else 2 * len(ir.kv.layers) + 1)
    PassManager(f"remove-noops,dce,fuse-attention,{convert}fuse-rmsnorm,constant-fold,dce").run(ir)
    if arch == "gpt2":  # LayerNorm (mean and variance, a bias): not an RMSNorm, must not be fused
        assert stats(ir) == {"fused": 0} and count(ir, FUSED) == 0
    else:
        norms = 2 * len(ir.kv.layers) + 1
        assert stats(ir) == {"fused": norms} and count(ir, FUSED) == norms
        for gone in (aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.mean.dim):
            assert count(ir, gone) == 0
        for node in ir.graph.nodes:
            if node.target is FUSED:
                x, w, eps, out_dtype, cast_first = node.args
                assert eps == pytest.approx(1e-6) and out_dtype == getattr(torch, dtype) and cast_first is False
                assert w.op == "get_attr" and x.meta["spec"].dtype == getattr(torch, dtype)
    assert_matches_hf(ir, hf_model, random_ids(2, 10), [6, 1, 3], dtype)


def test_model_captured_in_bfloat16_keeps_hf_order():
    # HF's own bf16 norm: n.to(bf16) first, then weight * n in bf16 (two roundings): the op must say so
    model = copy.deepcopy(make_model("llama")).to(torch.bfloat16)
    ir = capture(model)
    PassManager("remove-noops,dce,fuse-attention,fuse-rmsnorm,dce").run(ir)
    fused = [n for n in ir.graph.nodes if n.target is FUSED]
    assert len(fused) == 5 and all(n.args[4] is True for n in fused)
    ids = random_ids(1, 9)
    with torch.no_grad():
        want = model(ids).logits.float()
    got = run_chunks(ir, ids, [9]).float()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_gemma_one_plus_weight():
    model = build_family("gemma")
    ir = capture(model)
    PassManager("remove-noops,dce,fuse-attention,fuse-rmsnorm,constant-fold,dce").run(ir)
    assert stats(ir) == {"fused": 5}
    assert_matches_hf(ir, model, random_ids(1, 8), [5, 3])


def test_intermediate_with_another_user_is_left_alone():
    # If something else reads the normalized-but-unweighted values, fusing would have to keep them anyway;
    # the pass must leave that norm as it is and say why.
    ir = capture(make_model("llama"))
    PassManager("remove-noops,dce").run(ir)
    rsqrt = next(n for n in ir.graph.nodes if n.target is aten.rsqrt.default)
    normed = next(iter(rsqrt.users))
    with ir.graph.inserting_after(normed):  # a second reader that survives DCE (an assert has a side effect)
        keep = ir.graph.call_function(aten._assert_tensor_metadata.default, (normed,), {"dtype": torch.float32})
    keep.meta["spec"] = None
    ir.gm.recompile()
    PassManager("fuse-rmsnorm").run(ir)
    assert stats(ir) == {"fused": 4, "unfused: an intermediate value has other users": 1}
