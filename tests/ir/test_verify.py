"""The verifier names the node and the rule a broken graph violates."""

from __future__ import annotations

import pytest
import torch

from lmforge.ir.capture import capture
from lmforge.ir.verify import VerifyError, verify
from tests.conftest import make_model

aten = torch.ops.aten


@pytest.fixture()
def llama_ir():
    return capture(make_model("llama"))


def test_captured_graph_is_valid(llama_ir):
    verify(llama_ir)


def test_matmul_with_mixed_dtypes(llama_ir):
    linear = next(n for n in llama_ir.graph.nodes if n.target is aten.linear.default)
    weight = linear.args[1]
    llama_ir.set_weight(weight.target, llama_ir.weight(weight.target).to(torch.bfloat16))
    weight.meta["spec"] = type(weight.meta["spec"])(weight.meta["spec"].shape, torch.bfloat16)
    with pytest.raises(VerifyError, match=rf"%{linear.name} \(aten.linear.default\) breaks 'matmul-dtypes'"):
        verify(llama_ir, where="after pass 'x'")


def test_weight_spec_must_match_tensor(llama_ir):
    get = next(n for n in llama_ir.graph.nodes if n.op == "get_attr")
    llama_ir.set_weight(get.target, torch.zeros(3))
    with pytest.raises(VerifyError, match="breaks 'weight-spec'"):
        verify(llama_ir)


def test_calling_convention(llama_ir):
    ph = next(n for n in llama_ir.graph.nodes if n.op == "placeholder" and n.name == "position_ids")
    ph.name = "pos"
    with pytest.raises(VerifyError, match="do not follow the convention"):
        verify(llama_ir)


def test_cache_write_must_target_an_input(llama_ir):
    write = next(n for n in llama_ir.graph.nodes if n.target is aten.index_copy_.default)
    src = write.args[3]
    write.args = (src, *write.args[1:])  # write into an activation instead of the cache
    with pytest.raises(VerifyError, match="breaks 'cache-write'"):
        verify(llama_ir)


def test_missing_spec(llama_ir):
    node = next(n for n in llama_ir.graph.nodes if n.op == "call_function")
    del node.meta["spec"]
    with pytest.raises(VerifyError, match="breaks 'has-spec'"):
        verify(llama_ir)
