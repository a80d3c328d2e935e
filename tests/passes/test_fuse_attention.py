"""fuse-attention: every attention of Llama, Qwen2 (MQA), Mistral (sliding window) and GPT-2, in both the
"sdpa" and the "eager" form Hugging Face emits, becomes one lmforge.attention, and still matches HF eager."""

from __future__ import annotations

import pytest
import torch

from lmforge.ir.capture import capture
from lmforge.ir.printer import format_node
from lmforge.passes import PassManager
from tests.conftest import make_model, random_ids
from tests.ir.test_capture import assert_matches_hf, run_chunks
from tests.ir.test_capture_archs import build_family

aten = torch.ops.aten
FUSED = torch.ops.lmforge.attention.default
PIPELINE = "remove-noops,dce,fuse-attention,dce"
# what the fused op must be told, per architecture (scale 1/sqrt(16); Mistral's config window is 6)
EXPECTED = {"llama": (0.25, True, 0), "qwen2": (0.25, True, 0), "mistral": (0.25, True, 6), "gpt2": (0.25, True, 0)}


def ops(ir) -> list:
    return [n.target for n in ir.graph.nodes if n.op == "call_function"]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def fused(request, arch):
    model = make_model(arch)
    model.config._attn_implementation = request.param
    ir = capture(model)
    before = ops(ir)
    PassManager(PIPELINE).run(ir)
    return request.param, model, before, ir


def test_every_attention_fused(fused, arch):
    impl, model, before, ir = fused
    layers = len(ir.kv.layers)
    # before: the form HF emitted, with the cache writes as separate nodes
    core = aten.scaled_dot_product_attention.default if impl == "sdpa" else aten.softmax.int
    assert before.count(core) == layers and before.count(aten.index_copy_.default) == 2 * layers
    # after: one op per layer, nothing of the old pattern left
    after = ops(ir)
    assert after.count(FUSED) == layers
    for gone in (aten.scaled_dot_product_attention.default, aten.softmax.int, aten.index_copy_.default,
                 aten.matmul.default, aten.expand.default):
        assert gone not in after, gone
    stats = ir.history[2]["stats"]
    assert stats == {"attentions": layers, "fused": layers}


def test_fused_node_reads_the_cache_and_mask(fused, arch):
    _, _, _, ir = fused
    nodes = [n for n in ir.graph.nodes if n.target is FUSED]
    for i, node in enumerate(nodes):
        q, k, v, k_cache, v_cache, mask, scale, causal, window = node.args
        assert (k_cache.name, v_cache.name, mask.name) == (f"k_cache_{i}", f"v_cache_{i}", "attention_mask")
        assert (scale, causal, window) == pytest.approx(EXPECTED[arch]), format_node(node)
        # the new keys/values come straight in, unrepeated: kv heads, not query heads
        assert k.meta["spec"].shape[1] == ir.kv.layers[i].n_kv_heads == v.meta["spec"].shape[1]


def test_matches_hf_eager(fused):
    _, model, _, ir = fused
    ids = random_ids(2, 12)
    with torch.no_grad():
        want = model(ids).logits
    # prefill, one-token decode, then a short chunk: every path through the cache
    torch.testing.assert_close(run_chunks(ir, ids, [7, 1, 4]), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch_", ["llama", "qwen2", "mistral", "gpt2"])
def test_triton_path_matches_hf_eager(monkeypatch, arch_):
    """The fused graph with the Triton kernels forced (Triton's interpreter on the CPU)."""
    monkeypatch.setenv("LMFORGE_KERNELS", "triton")
    model = make_model(arch_)
    ir = capture(model)
    PassManager(PIPELINE).run(ir)
    assert_matches_hf(ir, model, random_ids(2, 11), [6, 1, 4])


def test_softcapping_left_unfused_with_reason():
    # Gemma 2 puts tanh between QK^T and the softmax; the op has no softcapping, so fusing would be wrong
    model = build_family("gemma2")
    ir = capture(model)
    PassManager(PIPELINE).run(ir)
    stats = ir.history[2]["stats"]
    assert stats == {"attentions": 2, "fused": 0, "unfused: softcapping (tanh on the scores) is not supported": 2}
    assert FUSED not in ops(ir) and ops(ir).count(aten.index_copy_.default) == 4
    assert_matches_hf(ir, model, random_ids(1, 9), [5, 4])


def test_mask_checked_by_meaning_not_shape():
    # Same graph, but the causal `le` turned into `lt`: each query no longer sees itself. The structure
    # still looks like attention; only evaluating the mask shows it is not the op's rule: it must not fuse.
    ir = capture(make_model("llama"))
    PassManager("remove-noops,dce").run(ir)
    (le,) = [n for n in ir.graph.nodes if n.target is aten.le.Tensor]
    le.target = aten.lt.Tensor
    ir.gm.recompile()
    PassManager("fuse-attention").run(ir)
    stats = ir.history[-1]["stats"]
    assert stats["fused"] == 0
    assert stats["unfused: the mask is not causal, sliding-window and padding (e.g. chunked or custom)"] == 2
