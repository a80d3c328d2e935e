"""Quantized artifacts: packed tensors on disk with their scheme in the manifest, loaded without
re-quantizing, equal to Hugging Face eager on the dequantized weights, a fraction of the bf16 size, and
close to bf16 in perplexity on the trained demo model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge.runtime.evaluate import default_text, perplexity
from tests.conftest import make_model, random_ids
from tests.passes.test_quantize import _dequantized_model, _quantized


@pytest.fixture(scope="module")
def llama_int4(tmp_path_factory):
    model = make_model("llama")
    art = lmforge.optimize(model, tmp_path_factory.mktemp("q") / "int4", max_seq_len=64, quant="int4", group_size=32)
    return model, art


def test_manifest_records_scheme_and_layout(llama_int4):
    _, art = llama_int4
    q = json.loads((art.path / "manifest.json").read_text())["quantization"]
    assert q["scheme"] == "int4" and set(q["layouts"]) == {"int4"}
    assert q["layers"]["model.layers.0.self_attn.q_proj"] == {"scheme": "int4", "group_size": 32, "symmetric": False,
                                                              "method": "rtn", "zero_points": "float", "version": 1}
    assert q["kept"]["model.layers.0.mlp.down_proj"].startswith("kept: in_features 112")
    assert "quantize{scheme=int4,group_size=32" in art.manifest["pipeline"]
    weights = load_file(str(art.path / "model.safetensors"))
    assert weights["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.uint8
    assert weights["model.layers.0.self_attn.q_proj.qweight"].shape == (64, 32)
    assert weights["model.layers.0.self_attn.q_proj.scales"].shape == (64, 2)
    assert "model.layers.0.self_attn.q_proj.weight" not in weights


def test_loading_never_requantizes_and_matches_hf(llama_int4, monkeypatch):
    model, art = llama_int4
    from lmforge.quant import int4

    monkeypatch.setattr(int4, "quantize", lambda *a, **k: pytest.fail("loading re-quantized a weight"))
    eng = lmforge.load(art.path)
    monkeypatch.undo()  # the reference below quantizes, on purpose
    assert eng.load_seconds is not None and eng.load_seconds > 0
    on_disk = load_file(str(art.path / "model.safetensors"))
    loaded = {eng.ir.weight_names[a]: t for a, t in eng.ir.weights().items()}
    # the stored codes, only laid side by side: gate/up fused at load (runtime/fuse_linears.py)
    fused = loaded["model.layers.1.mlp.gate_proj+up_proj.qweight"]
    assert torch.equal(fused, torch.cat([on_disk["model.layers.1.mlp.gate_proj.qweight"],
                                         on_disk["model.layers.1.mlp.up_proj.qweight"]]))
    ids = random_ids(2, 10, seed=3)
    ir = _quantized(model, "scheme=int4,group_size=32")
    with torch.no_grad():
        want = _dequantized_model(model, ir)(ids).logits
    torch.testing.assert_close(eng.forward(ids), want, rtol=1e-4, atol=1e-4)
    # generation through the cache: the same greedy tokens as the dequantized HF model
    out = eng.generate(ids[:1, :4], max_new_tokens=6)
    with torch.no_grad():
        hf = _dequantized_model(model, ir).generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, hf)


@pytest.fixture(scope="module")
def demo_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-q")
    return {name: lmforge.optimize(None, root / name, max_seq_len=256, **kwargs)
            for name, kwargs in {"bf16": {}, "int4": {"quant": "int4"}, "fp8": {"quant": "fp8"},
                                         "int8": {"quant": "int8"}}.items()}


def test_int4_artifact_is_about_a_quarter_of_bf16(demo_artifacts):
    sizes = {name: load_file(str(a.path / "model.safetensors")) for name, a in demo_artifacts.items()}
    layers = demo_artifacts["int4"].manifest["quantization"]["layers"]
    packed = sum(t.numel() * t.element_size() for k, t in sizes["int4"].items() if k.rsplit(".", 1)[0] in layers)
    dense = sum(t.numel() * t.element_size() for k, t in sizes["bf16"].items() if k.removesuffix(".weight") in layers)
    assert 0.25 < packed / dense < 0.27  # 4 bits a weight + a bf16 scale and zero point per 128 weights
    total = {name: a.manifest["files"]["model.safetensors"]["bytes"] for name, a in demo_artifacts.items()}
    assert total["int4"] < 0.4 * total["bf16"]  # the float embedding table (tied to lm_head) is the rest
    assert total["fp8"] < 0.6 * total["bf16"] and total["int8"] < 0.6 * total["bf16"]
    layers8 = demo_artifacts["int8"].manifest["quantization"]["layers"]
    packed8 = sum(t.numel() * t.element_size() for k, t in sizes["int8"].items() if k.rsplit(".", 1)[0] in layers8)
    assert 0.5 < packed8 / dense < 0.51  # a byte a weight + a float32 scale per row
    params = {name: a.manifest["params"] for name, a in demo_artifacts.items()}
    assert params["int4"] == params["fp8"] == params["int8"] == params["bf16"]  # as many parameters, however stored


def test_demo_perplexity_close_to_bf16(demo_artifacts):
    """Quality on a trained model (the demo's held-out text; first 2048 tokens): measured +0.4% (int4 g128)
    , +0.2% (fp8) and +0.001% (int8) over the full text; the bounds leave room for the shorter sample."""
    engines = {name: lmforge.load(a.path) for name, a in demo_artifacts.items()}
    ids = engines["bf16"].tokenizer.encode(default_text().read_text(), add_special_tokens=False).ids[:2048]
    ppl = {name: perplexity(eng, ids=ids).perplexity for name, eng in engines.items()}
    assert ppl["int4"] < 1.03 * ppl["bf16"], ppl
    assert ppl["fp8"] < 1.01 * ppl["bf16"], ppl
    assert ppl["int8"] < 1.003 * ppl["bf16"], ppl


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1", reason="the CPU runs Triton interpreted")
def test_forced_triton_kernels_match_hf(llama_int4, monkeypatch):
    """The whole quantized model with every lmforge op on its Triton kernel, against HF on the dequantized
    weights (the path a GPU takes by default)."""
    model, art = llama_int4
    monkeypatch.setenv("LMFORGE_KERNELS", "triton")
    eng = lmforge.load(art.path)
    ir = _quantized(model, "scheme=int4,group_size=32")
    ids = random_ids(1, 7, seed=4)
    with torch.no_grad():
        want = _dequantized_model(model, ir)(ids).logits
    torch.testing.assert_close(eng.forward(ids), want, rtol=1e-3, atol=1e-3)


def test_int8_activations_stay_close_to_hf(llama_int4, monkeypatch):
    """`LMFORGE_INT4_ACT=int8` (cpu/int4_q8.c): a short prompt (<= 8 rows, as decode) through the int8-activation
    kernel, against HF on the dequantized weights; measured max error 1.2% of the logits' largest magnitude here."""
    from lmforge.codegen import cpu_gemv

    if not cpu_gemv.available() or not cpu_gemv.kernel().lib.int4_q8_available():
        pytest.skip("no AVX512-VNNI build of the CPU kernels")
    model, art = llama_int4
    ids = random_ids(1, 6, seed=5)
    ir = _quantized(model, "scheme=int4,group_size=32")
    with torch.no_grad():
        want = _dequantized_model(model, ir)(ids).logits
    float_path = lmforge.load(art.path).forward(ids)
    monkeypatch.setenv("LMFORGE_INT4_ACT", "int8")
    cpu_gemv.kernel.cache_clear()
    try:
        got = lmforge.load(art.path).forward(ids)
    finally:
        monkeypatch.undo()
        cpu_gemv.kernel.cache_clear()
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    assert 0 < err < 0.02 * scale, (err, scale)  # quantized activations: close, yet not the float path
    assert float((float_path - want).abs().max()) < 1e-4 * max(1.0, scale)
