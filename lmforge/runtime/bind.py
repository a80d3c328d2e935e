"""Binding the loaded graph's `lmforge::` ops straight to their CPU implementations.

A call through the torch dispatcher to an op implemented in Python costs 5 us (`lmforge.linear`) to 20 us
(`lmforge.attention`, whose cache arguments are mutable) on a 2-core EPYC, on top of the work; a decode
step of a 30-layer model makes some 300 such calls. For a CPU engine the runtime therefore points each
node at the Python function the dispatcher would have called: same arguments, same results, none of the
dispatch. Only the loaded, in-memory graph changes; the artifact keeps the registered ops (which export,
serialization and other devices need). `LMFORGE_BIND=0` keeps the dispatcher.
"""

from __future__ import annotations

import os

import torch

import lmforge.codegen  # noqa: F401  (registers the lmforge:: ops and their facts)
from lmforge.ir.graph import GraphIR
from lmforge.ir.ops import op_facts


def bind_cpu_kernels(ir: GraphIR, device: torch.device) -> int:
    """Point `lmforge::` op nodes at their CPU implementations; returns how many nodes changed."""
    if device.type != "cpu" or os.environ.get("LMFORGE_BIND", "1") == "0":
        return 0
    count = 0
    for node in ir.graph.nodes:
        facts = op_facts(node.target) if node.op == "call_function" else None
        impl = facts.cpu if facts is not None else None  # `OpFacts.cpu`, declared beside each op
        if impl is not None:
            node.target = impl
            count += 1
    if count:
        ir.gm.recompile()
    return count
