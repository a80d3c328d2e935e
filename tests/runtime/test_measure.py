"""`lmforge.runtime.measure.step_split`: a decode step's time divided among matmuls, attention and the rest."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.runtime import measure


@pytest.mark.parametrize("arch", ["llama", "gpt2"], indirect=True)
def test_step_split_sums_to_the_step_and_names_each_kind(arch, artifacts, monkeypatch):
    monkeypatch.setenv("LMFORGE_LEAN_STEP", "0")  # the node-by-node split (test_lean_step times the programs)
    eng = lmforge.load(artifacts(arch))
    split = measure.step_split(eng, context=10, repeats=2)
    parts = (split.matmul_s, split.attention_s, split.other_s)
    assert all(p > 0 for p in parts) and sum(parts) == pytest.approx(split.step_s)
    # which kind each node counts as: make one kind's nodes slow and watch its share grow
    slow = {"matmul": [], "attention": []}
    for node in eng.ir.graph.nodes:
        from lmforge.ir.linear import as_linear
        from lmforge.ir.ops import op_facts

        if as_linear(node) is not None:
            slow["matmul"].append(node)
        elif node.op == "call_function" and getattr(op_facts(node.target), "cache_writer", False):
            slow["attention"].append(node)
    assert slow["matmul"] and slow["attention"]
    original = torch.fx.Interpreter.run_node

    def run_node(self, node):
        if node in slow["attention"]:
            import time

            time.sleep(0.02)
        return original(self, node)

    monkeypatch.setattr(torch.fx.Interpreter, "run_node", run_node)
    slowed = measure.step_split(eng, context=10, repeats=2)
    assert slowed.attention_s / slowed.step_s > split.attention_s / split.step_s
    assert slowed.attention_s / slowed.step_s > 0.5  # 20 ms per attention call dominates a tiny model's step
