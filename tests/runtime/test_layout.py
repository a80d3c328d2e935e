"""Load-time weight layouts: both layouts compute the same model; the rewrite covers every linear."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.codegen import cpu_gemv
from lmforge.errors import ArtifactError
from tests.conftest import random_ids

aten = torch.ops.aten


LAYOUTS = ["source", "transposed"] + (["gemv"] if cpu_gemv.available() else [])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_matches_hf(layout, arch, artifacts, hf_model, monkeypatch):
    """float32: each layout computes HF's logits, for a prefill and for decode-sized calls (5 rows: the
    float32 GEMV kernel in the gemv layout)."""
    monkeypatch.setenv("LMFORGE_WEIGHT_LAYOUT", layout)
    eng = lmforge.load(artifacts(arch))
    assert eng.weight_layout == layout
    linears = sum(1 for n in eng.ir.graph.nodes if n.target is aten.linear.default)
    if layout == "gemv":
        assert linears == 0 and not any(n.target in (aten.addmm.default, aten.mm.default) for n in eng.ir.graph.nodes)
    elif layout == "transposed":
        assert linears == 0 and any(n.target is aten.matmul.default for n in eng.ir.graph.nodes)
        # the loaded graph reads transposed copies; the artifact on disk keeps the source layout
        matmul_weights = [n.args[1] for n in eng.ir.graph.nodes if n.target is aten.matmul.default and n.args[1].op == "get_attr"]
        assert matmul_weights and all(eng.ir.weight_names[w.target].endswith(".T") for w in matmul_weights)
    elif arch != "gpt2":  # GPT-2's Conv1D layers are addmm, not linear
        assert linears > 0
    for ids in (random_ids(2, 9), random_ids(1, 5)):
        with torch.no_grad():
            ref = hf_model(ids).logits
        torch.testing.assert_close(eng.forward(ids), ref, rtol=1e-4, atol=1e-4)


def test_bad_override(monkeypatch, artifacts):
    monkeypatch.setenv("LMFORGE_WEIGHT_LAYOUT", "sideways")
    with pytest.raises(ArtifactError, match="LMFORGE_WEIGHT_LAYOUT must be auto, source, transposed or gemv"):
        lmforge.load(artifacts("llama"))


@pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler to build the CPU kernel")
def test_gemv_layout_in_bfloat16(arch, artifacts, hf_model, monkeypatch):
    """Every bfloat16 linear layer (nn.Linear, and GPT-2's Conv1D, held transposed) goes through
    lmforge.linear (our GEMV for decode-sized calls) and computes what F.linear computes, up to bfloat16
    rounding; prefill-sized calls fall back to F.linear."""
    from transformers.pytorch_utils import Conv1D

    path = artifacts(arch, "bfloat16")
    monkeypatch.setenv("LMFORGE_WEIGHT_LAYOUT", "source")
    source = lmforge.load(path)
    monkeypatch.setenv("LMFORGE_WEIGHT_LAYOUT", "gemv")
    monkeypatch.setenv("LMFORGE_BIND", "0")  # keep the registered ops in the graph, to count them
    gemv = lmforge.load(path)
    assert gemv.weight_layout == "gemv"
    fused = [n for n in gemv.ir.graph.nodes if n.target is torch.ops.lmforge.linear.default]
    layers = {name for name, m in hf_model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    prefix = lambda name: name.rpartition(".")[0]  # noqa: E731  "model.layers.0.self_attn"
    covered = []  # the Hugging Face layers each lmforge.linear computes (q/k/v and gate/up fused at load)
    for node in fused:
        first, *rest = gemv.ir.weight_names[node.args[1].target].removesuffix(".T").removesuffix(".weight").split("+")
        covered += [first] + [f"{prefix(first)}.{part}" for part in rest]
    assert sorted(covered) == sorted(layers | {"lm_head"}) or sorted(covered) == sorted(layers)
    left = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
    assert not any(n.target in left and any(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in n.args)
                   for n in gemv.ir.graph.nodes)
    for node in fused:  # the kernel streams rows of W (out, in): the contract of F.linear
        w = gemv.ir.weight(node.args[1].target)
        assert w.dtype == torch.bfloat16 and w.is_contiguous() and w.shape[0] == node.meta["spec"].shape[-1]
    for ids in (random_ids(1, 5), random_ids(2, 3), random_ids(1, 20)):  # kernel-sized, and a prefill
        want = source.forward(ids).float()
        got = gemv.forward(ids).float()
        assert (got - want).abs().max() <= 0.05 * want.abs().max(), (got - want).abs().max()
    # greedy decoding through the cache stays close to HF float32, as the source layout does
    ids = random_ids(1, 6)
    with torch.no_grad():
        ref = hf_model(ids).logits
    assert (gemv.forward(ids).float() - ref).abs().max() <= 0.1 * ref.abs().max()
