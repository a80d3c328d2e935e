"""The verifier names the node and the rule a broken graph violates."""

from __future__ import annotations

import pytest
import torch

from lmforge.ir.capture import capture
from lmforge.ir.graph import KVLayerSpec
from lmforge.ir.spec import TensorSpec
from lmforge.ir.verify import VerifyError, verify
from tests.conftest import VOCAB, make_model

aten = torch.ops.aten


@pytest.fixture()
def llama_ir():
    return capture(make_model("llama"))


def test_captured_graph_is_valid():
    """The verifier accepts a fresh capture, and the capture keeps what ir/README.md says every graph keeps,
    checked here on its own (so a verifier that stopped looking would not hide a broken capture)."""
    from lmforge.ir.serialize import PYTHON_OPS

    model = make_model("llama")
    ir = capture(model)
    verify(ir)
    nodes = list(ir.graph.nodes)
    # 1. the calling convention, with the specs the runtime binds its inputs to
    inputs = {n.name: n.meta["spec"] for n in nodes if n.op == "placeholder"}
    cache = TensorSpec(("batch", 2, "kv_len", 16), torch.float32)  # 2 kv heads of 16
    assert inputs == {"input_ids": TensorSpec(("batch", "seq"), torch.int64),
                      "position_ids": TensorSpec(("batch", "seq"), torch.int64),
                      "attention_mask": TensorSpec(("batch", "kv_len"), torch.int64),
                      "k_cache_0": cache, "v_cache_0": cache, "k_cache_1": cache, "v_cache_1": cache}
    assert list(inputs) == ["input_ids", "position_ids", "attention_mask", "k_cache_0", "v_cache_0", "k_cache_1", "v_cache_1"]
    (logits,) = nodes[-1].args[0]
    assert nodes[-1].op == "output" and logits.meta["spec"] == TensorSpec(("batch", "seq", VOCAB), torch.float32)
    assert ir.kv.layers == [KVLayerSpec(2, 16, 16)] * 2 and ir.kv.dtype == torch.float32
    # 2. every node but the output has a spec
    assert all("spec" in n.meta for n in nodes if n.op != "output")
    # 3. the weights are the model's, each under its source name, with a spec that matches it
    source = dict(model.named_parameters()) | dict(model.named_buffers())
    reads = {n.target: n for n in nodes if n.op == "get_attr"}
    assert set(reads) <= set(ir.weight_names) and set(ir.weight_names.values()) == set(source)
    for attr, name in ir.weight_names.items():
        tensor = ir.weight(attr)
        assert torch.equal(tensor, source[name].detach()), name
        if attr in reads:  # (a buffer nothing reads, such as rotary's original_inv_freq, may stay)
            assert reads[attr].meta["spec"] == TensorSpec(tuple(tensor.shape), tensor.dtype), name
        assert ir.weight_kind(attr) == ("parameter" if name in dict(model.named_parameters()) else "buffer"), name
    # 4. functional but for one write into each cache input
    calls = [n for n in nodes if n.op == "call_function"]
    writes = [n for n in calls if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]
    assert all(n.target is aten.index_copy_.default for n in writes)
    assert sorted(n.args[0].name for n in writes) == sorted(name for name in inputs if "_cache_" in name)
    # 5. serializable targets only; the attention is still the unfused SDPA of the two layers
    for n in calls:
        if isinstance(n.target, torch._ops.OpOverload):
            assert n.target.namespace in ("aten", "prims"), n.format_node()
        else:
            assert f"{n.target.__module__}.{n.target.__name__}".replace("_operator", "operator") in PYTHON_OPS, n.format_node()
    assert sum(n.target is aten.scaled_dot_product_attention.default for n in calls) == 2
    assert sum(n.target is aten.linear.default for n in calls) == 2 * 7 + 1  # q k v o gate up down, lm_head


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
