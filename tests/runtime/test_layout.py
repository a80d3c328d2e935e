"""Load-time weight layouts: both layouts compute the same model; the rewrite covers every linear."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.errors import ArtifactError
from tests.conftest import random_ids

aten = torch.ops.aten


@pytest.mark.parametrize("layout", ["source", "transposed"])
def test_both_layouts_match_hf(layout, arch, artifacts, hf_model, monkeypatch):
    monkeypatch.setenv("LMFORGE_WEIGHT_LAYOUT", layout)
    eng = lmforge.load(artifacts(arch))
    assert eng.weight_layout == layout
    linears = sum(1 for n in eng.ir.graph.nodes if n.target is aten.linear.default)
    if layout == "transposed":
        assert linears == 0 and any(n.target is aten.matmul.default for n in eng.ir.graph.nodes)
        # the loaded graph reads transposed copies; the artifact on disk keeps the source layout
        matmul_weights = [n.args[1] for n in eng.ir.graph.nodes if n.target is aten.matmul.default and n.args[1].op == "get_attr"]
        assert matmul_weights and all(eng.ir.weight_names[w.target].endswith(".T") for w in matmul_weights)
    elif arch != "gpt2":  # GPT-2's Conv1D layers are addmm, not linear
        assert linears > 0
    ids = random_ids(2, 9)
    with torch.no_grad():
        ref = hf_model(ids).logits
    torch.testing.assert_close(eng.forward(ids), ref, rtol=1e-4, atol=1e-4)


def test_bad_override(monkeypatch, artifacts):
    monkeypatch.setenv("LMFORGE_WEIGHT_LAYOUT", "sideways")
    with pytest.raises(ArtifactError, match="LMFORGE_WEIGHT_LAYOUT must be auto, source or transposed"):
        lmforge.load(artifacts("llama"))
