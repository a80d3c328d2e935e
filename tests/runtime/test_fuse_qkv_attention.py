"""fuse-qkv-attention (load, CPU): each layer's split, head views, rotaries and attention become one
lmforge.qkv_attention; the engine still generates Hugging Face's tokens, and exactly what the unfused graph gives."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.codegen import cpu_gemv
from lmforge.runtime import load
from tests.conftest import random_ids
from tests.ir.test_capture_archs import build_family

FUSED = torch.ops.lmforge.qkv_attention.default


def stats(eng) -> dict:
    return next(h["stats"] for h in eng.ir.history if h["pass"] == "fuse-qkv-attention")


@pytest.fixture
def unfused(monkeypatch):
    """lmforge.load without the pass."""
    def load_unfused(path):
        original = load.load_pipeline
        monkeypatch.setattr(load, "load_pipeline", lambda *a: original(*a).replace("fuse-qkv-attention,", ""))
        try:
            return lmforge.load(path)
        finally:
            monkeypatch.setattr(load, "load_pipeline", original)
    return load_unfused


def decode_logits(eng, ids, steps=4):
    """Logits of a prefill and `steps` greedy decode steps through the engine's cache."""
    cache = eng._cache_for(ids.shape[0])
    full = torch.zeros(ids.shape[0], eng.max_seq_len, dtype=torch.long)
    full[:, : ids.shape[1]] = 1
    out = []
    with torch.inference_mode():
        logits = eng.prefill(cache, ids, full, ids.shape[1])
        positions = torch.full((ids.shape[0], 1), ids.shape[1] - 1)
        for step in range(steps):
            out.append(logits)
            positions = positions + 1
            logits = eng.decode(cache, logits.argmax(-1, keepdim=True), positions, full, ids.shape[1] + step)
    return torch.stack(out + [logits], 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"], indirect=True)
def test_fused_engine_generates_hf_tokens(arch, artifacts, hf_model, unfused):
    eng = lmforge.load(artifacts(arch))
    layers = hf_model.config.num_hidden_layers
    if arch == "gpt2":  # q/k/v from split(.Tensor) of one Conv1D: left alone, and said why
        assert stats(eng) == {"fused": 0, "unfused: q, k and v are not pieces of one fused projection": layers}
        return
    assert stats(eng) == {"fused": layers}
    assert not any(n.target in (torch.ops.aten.transpose.int,) for n in eng.ir.graph.nodes)
    ids = random_ids(2, 7)
    with torch.no_grad():
        want = hf_model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(eng.generate(ids, max_new_tokens=6), want)
    torch.testing.assert_close(decode_logits(eng, ids), decode_logits(unfused(artifacts(arch)), ids),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler for the CPU kernels")
def test_bfloat16_fused_equals_unfused_exactly(artifacts, unfused):
    """In bfloat16 the fused op rotates as lmforge.rotary rounds and attends with the same kernel as
    lmforge.attention: the logits are bit for bit the unfused graph's, prefill and decode."""
    path = artifacts("llama", "bfloat16")
    eng = lmforge.load(path)
    assert stats(eng)["fused"] > 0
    ids = random_ids(2, 7)
    assert torch.equal(decode_logits(eng, ids), decode_logits(unfused(path), ids))


def test_per_head_norms_are_left_alone(tmp_path):
    """Qwen3 normalizes q and k per head between the view and the rotary: not the chain the op computes."""
    model = build_family("qwen3")
    eng = lmforge.load(lmforge.optimize(model, tmp_path / "art", max_seq_len=64).path)
    layers = model.config.num_hidden_layers
    assert stats(eng) == {"fused": 0, "unfused: an attention input is not a (batch, seq, heads, head_dim) view": layers}
    ids = random_ids(1, 6)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(eng.generate(ids, max_new_tokens=4), want)
