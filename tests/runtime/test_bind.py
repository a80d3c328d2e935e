"""Binding lmforge ops to their CPU implementations skips the dispatcher and changes no result."""

from __future__ import annotations

import torch

import lmforge
from lmforge.ir.ops import registered_ops
from tests.conftest import random_ids


def test_bound_engine_is_bit_identical(arch, artifacts, monkeypatch):
    path = artifacts(arch, "bfloat16")
    monkeypatch.setenv("LMFORGE_BIND", "0")
    plain = lmforge.load(path)
    monkeypatch.setenv("LMFORGE_BIND", "1")
    bound = lmforge.load(path)
    impls = {op: facts.cpu for op, facts in registered_ops().items() if facts.cpu is not None}
    ops = [n.target for n in plain.ir.graph.nodes if n.target in impls]
    assert ops and not any(n.target in impls for n in bound.ir.graph.nodes)
    assert sorted(impls[op].__name__ for op in ops) == sorted(
        n.target.__name__ for n in bound.ir.graph.nodes if n.target in impls.values())
    ids = random_ids(2, 7)
    assert torch.equal(plain.forward(ids), bound.forward(ids))
    assert torch.equal(plain.generate(ids[:1], max_new_tokens=8), bound.generate(ids[:1], max_new_tokens=8))
    # the cost model still sees the artifact's graph
    assert bound.cost == plain.cost and bound.cost.matmul_flops_per_token > 0
