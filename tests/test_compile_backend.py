"""torch.compile(model, backend="lmforge"): found through the entry point, matches eager, falls back cleanly."""

from __future__ import annotations

import warnings

import pytest
import torch

import lmforge.compile_backend as backend
from tests.conftest import make_model, random_ids, run_python


@pytest.fixture()
def recorded(monkeypatch):
    """Record what our pipeline did to each graph dynamo handed over."""
    seen = []
    original = backend._optimize_graph

    def spy(gm, example_inputs):
        before = sum(1 for n in gm.graph.nodes if n.op == "call_function")
        out = original(gm, example_inputs)
        seen.append((before, sum(1 for n in out.graph.nodes if n.op == "call_function")))
        return out

    monkeypatch.setattr(backend, "_optimize_graph", spy)
    torch._dynamo.reset()
    yield seen
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matches_eager_and_runs_our_passes(arch, recorded):
    model = make_model(arch)
    ids = random_ids(2, 9)
    compiled = torch.compile(model, backend="lmforge")
    with torch.no_grad():
        ref = model(ids).logits
        out = compiled(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert recorded, "dynamo never called the lmforge backend"
    assert any(after < before for before, after in recorded)  # remove-noops/dce took nodes out


def test_graph_breaks_compile_each_piece(recorded):
    def f(x):
        y = torch.sin(x) * 1.0
        print("", end="")  # a graph break
        return torch.cos(y) + 0

    x = torch.randn(7)
    torch.testing.assert_close(torch.compile(f, backend="lmforge")(x), f(x))
    assert len(recorded) == 2


def test_pipeline_failure_falls_back(monkeypatch):
    from lmforge.ir import pass_manager as manager

    def broken(self, ir, properties=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(manager.PassManager, "run", broken)
    torch._dynamo.reset()
    model = make_model("llama")
    ids = random_ids(1, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = torch.compile(model, backend="lmforge")(ids).logits
            ref = model(ids).logits
    torch._dynamo.reset()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert any("running this graph unoptimized: boom" in str(w.message) for w in caught)


def test_found_without_importing_lmforge():
    code = (
        "import sys, torch\n"
        "f = torch.compile(lambda x: x.sin() * 1.0, backend='lmforge')\n"
        "x = torch.randn(4)\n"
        "assert torch.allclose(f(x), x.sin())\n"
        "print('lmforge.compile_backend' in sys.modules)\n"
    )
    assert run_python(code) == "True"
