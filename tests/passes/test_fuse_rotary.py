"""fuse-rotary: each rotate-half rotary embedding becomes one lmforge.rotary, with no numeric change."""

from __future__ import annotations

import pytest
import torch

from lmforge.ir.capture import capture
from lmforge.passes import PassManager
from tests.conftest import make_model, random_ids
from tests.ir.test_capture import assert_matches_hf
from tests.ir.test_capture_archs import build_family

aten = torch.ops.aten
FUSED = torch.ops.lmforge.rotary.default


def count(ir, target) -> int:
    return sum(1 for n in ir.graph.nodes if n.target is target)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_q_and_k_rotations_fused_and_match_hf(arch, hf_model, dtype):
    ir = capture(hf_model)
    convert = f"convert-dtype{{dtype={dtype}}}," if dtype != "float32" else ""
    before = count(ir, aten.cat.default)
    PassManager(f"remove-noops,dce,fuse-attention,{convert}fuse-rotary,constant-fold,dce").run(ir)
    stats = next(h["stats"] for h in ir.history if h["pass"] == "fuse-rotary")
    layers = len(ir.kv.layers)
    if arch == "gpt2":  # learned positions, no rotary: nothing to fuse (and its cats are not rotations)
        assert stats == {"fused": 0} and count(ir, aten.cat.default) == before
    else:
        assert stats == {"fused": 2 * layers} and count(ir, FUSED) == 2 * layers
        # the rotate-half cats and negs are gone (one cat, building the rotary angles, is not a rotation)
        assert count(ir, aten.cat.default) == before - 2 * layers and count(ir, aten.neg.default) == 0
        for node in ir.graph.nodes:
            if node.target is FUSED:  # x is q or k, heads on dim 1; cos/sin broadcast over heads
                x, cos, sin = node.args
                assert cos.meta["spec"].shape[1] == 1 == sin.meta["spec"].shape[1]
                assert x.meta["spec"].dtype == cos.meta["spec"].dtype == getattr(torch, dtype)
    assert_matches_hf(ir, hf_model, random_ids(2, 10), [6, 1, 3], dtype)


def test_partial_rotary_gpt_neox():
    # GPT-NeoX rotates only the first rotary_pct of each head: the match is on that slice
    model = build_family("gpt_neox", rotary_pct=0.5)
    ir = capture(model)
    PassManager("remove-noops,dce,fuse-attention,fuse-rotary,constant-fold,dce").run(ir)
    assert count(ir, FUSED) == 4
    assert all(n.args[0].meta["spec"].shape[-1] == 8 for n in ir.graph.nodes if n.target is FUSED)
    assert_matches_hf(ir, model, random_ids(1, 9), [5, 4])


def test_rotation_read_elsewhere_is_left_alone():
    # If rotate_half(x) is also used by something else, it must stay: the pass must not fire on that one
    ir = capture(make_model("llama"))
    PassManager("remove-noops,dce").run(ir)
    cat = next(n for n in ir.graph.nodes if n.target is aten.cat.default and n.args[0][0].target is aten.neg.default)
    with ir.graph.inserting_after(cat):
        keep = ir.graph.call_function(aten._assert_tensor_metadata.default, (cat,), {"dtype": torch.float32})
    keep.meta["spec"] = None
    ir.gm.recompile()
    PassManager("fuse-rotary").run(ir)
    assert ir.history[-1]["stats"] == {"fused": 2 * len(ir.kv.layers) - 1}


def test_cpu_kernel_equals_reference_bit_for_bit():
    from lmforge.codegen import cpu_gemv
    from lmforge.codegen.rotary import reference, rotary

    if not cpu_gemv.available():
        pytest.skip("no C compiler to build the CPU kernel")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 9, 64, generator=gen).bfloat16().transpose(1, 2)  # (B, H, S, D) as a strided view
    cos, sin = (torch.randn(2, 1, 5, 64, generator=gen).bfloat16() for _ in range(2))
    assert torch.equal(rotary(x, cos, sin), reference(x, cos, sin))
    x32 = x.float()  # other dtypes take the reference path
    assert torch.equal(rotary(x32, cos.float(), sin.float()), reference(x32, cos.float(), sin.float()))
