"""fuse-add-rmsnorm: each residual add feeding an RMSNorm becomes one lmforge.add_rms_norm, the sum still
reaching the next residual add, and the model still matches HF eager; the op and its CPU kernel against
float64."""

from __future__ import annotations

import pytest
import torch

from lmforge.codegen import cpu_gemv
from lmforge.codegen.add_rms_norm import add_rms_norm, reference
from lmforge.ir.capture import capture
from lmforge.passes import PassManager
from tests.conftest import make_model, random_ids
from tests.ir.test_capture import assert_matches_hf
from tests.ir.test_capture_archs import build_family
from tests.passes.test_fuse_rmsnorm import count

aten = torch.ops.aten
NORM = torch.ops.lmforge.rms_norm.default


def stats(ir) -> dict:
    return next(h["stats"] for h in ir.history if h["pass"] == "fuse-add-rmsnorm")


def fused_pipeline(dtype: str) -> str:
    convert = f"convert-dtype{{dtype={dtype}}}," if dtype != "float32" else ""
    return f"remove-noops,dce,fuse-attention,{convert}fuse-rmsnorm,fuse-add-rmsnorm,constant-fold,dce"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_residual_norm_fused_and_matches_hf(arch, hf_model, dtype):
    ir = capture(hf_model)
    layers = len(ir.kv.layers)
    adds = count(ir, aten.add.Tensor)
    PassManager(fused_pipeline(dtype)).run(ir)
    if arch == "gpt2":  # LayerNorm: no lmforge.rms_norm to join
        assert stats(ir) == {"fused": 0} and count(ir, add_rms_norm) == 0
    else:
        # every norm but the first layer's (it reads the embedding) joins its add: 2 per layer - 1, + the final one
        assert stats(ir) == {"fused": 2 * layers}
        assert count(ir, add_rms_norm) == 2 * layers and count(ir, NORM) == 1
        assert count(ir, aten.add.Tensor) < adds
        for node in ir.graph.nodes:
            if node.target is add_rms_norm:
                x, r, w, eps, out_dtype, cast_first = node.args
                assert x.meta["spec"].shape == r.meta["spec"].shape and w.op == "get_attr"
                assert {u.args[1] for u in node.users} <= {0, 1}
    assert_matches_hf(ir, hf_model, random_ids(2, 10), [6, 1, 3], dtype)


@pytest.mark.parametrize("family", ["gemma", "phi3", "qwen3"])
def test_other_families(family):
    """Gemma's 1 + weight and scaled embedding, Phi-3's fused projections, Qwen3's per-head q/k norms (which
    read no add and stay plain norms)."""
    model = build_family(family)
    ir = capture(model)
    PassManager(fused_pipeline("float32")).run(ir)
    assert stats(ir)["fused"] == 2 * len(ir.kv.layers)
    assert_matches_hf(ir, model, random_ids(1, 9), [5, 1, 3])


def test_sum_read_before_the_norm_is_left_alone():
    """An add whose sum something reads ahead of the norm cannot move to the norm's place: left as it was."""
    ir = capture(make_model("llama"))
    PassManager("remove-noops,dce,fuse-attention,fuse-rmsnorm").run(ir)
    norm = [n for n in ir.graph.nodes if n.target is NORM][1]
    add = norm.args[0]
    with ir.graph.inserting_after(add):  # a reader between the add and the norm that survives DCE
        keep = ir.graph.call_function(aten._assert_tensor_metadata.default, (add,), {"dtype": torch.float32})
    keep.meta["spec"] = None
    ir.gm.recompile()
    PassManager("fuse-add-rmsnorm").run(ir)
    assert stats(ir)["unfused: the sum is read before the norm"] == 1
    assert norm in ir.graph.nodes and add in ir.graph.nodes


def test_broadcasting_add_is_left_alone():
    ir = capture(make_model("llama"))
    PassManager("remove-noops,dce,fuse-attention,fuse-rmsnorm").run(ir)
    norm = [n for n in ir.graph.nodes if n.target is NORM][1]
    add = norm.args[0]
    residual = add.args[0]
    with ir.graph.inserting_before(add):  # the residual's first row only: (1, seq, hidden) meets (batch, ...)
        row = ir.graph.call_function(aten.slice.Tensor, (residual, 0, 0, 1))
    row.meta["spec"] = residual.meta["spec"].__class__((1, *residual.meta["spec"].shape[1:]), residual.meta["spec"].dtype)
    add.replace_input_with(residual, row)
    ir.gm.recompile()
    PassManager("fuse-add-rmsnorm").run(ir)
    assert stats(ir)["unfused: the add broadcasts or casts"] == 1
    assert norm in ir.graph.nodes and add in ir.graph.nodes


def rows(M, K, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K + 3, generator=gen) * 2 + 0.1).to(dtype)[:, :K]  # rows with a stride
    r = (torch.randn(M, K, generator=gen) + 0.3).to(dtype)
    w = (torch.randn(K, generator=gen) + 1).to(dtype)
    return x, r, w


@pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler for the CPU kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K", [(1, 576), (3, 33), (2, 7), (5, 1536)])
def test_kernel_matches_float64(dtype, M, K):
    x, r, w = rows(M, K, dtype)
    y, s = cpu_gemv.kernel().add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(s, x + r)  # the sum as PyTorch rounds it
    s64 = s.double()
    want = w.double() * s64 / torch.sqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-5)
    rounding = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -22
    assert y.dtype == dtype and ((y.double() - want).abs() <= rounding * want.abs() + 1e-6).all()
    if dtype == torch.float32:  # the plain norm's float32 rows too
        y1 = cpu_gemv.kernel().rms_norm(s, w, 1e-5)
        assert ((y1.double() - want).abs() <= rounding * want.abs() + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_equals_its_reference(dtype):
    x, r, w = rows(6, 40, dtype, seed=3)
    x, r = x.reshape(2, 3, 40), r.reshape(2, 3, 40)
    for out_dtype, cast_first in ((dtype, False), (dtype, True), (torch.float32, False)):
        y, s = add_rms_norm(x, r, w, 1e-6, out_dtype, cast_first)
        want_y, want_s = reference(x, r, w, 1e-6, out_dtype, cast_first)
        assert y.dtype == out_dtype and torch.equal(s, want_s)
        torch.testing.assert_close(y.float(), want_y.float(), rtol=2 ** -8, atol=1e-6)
