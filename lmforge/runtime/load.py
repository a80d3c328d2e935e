"""The load pipeline: the rewrites that fit a loaded graph to this machine, run by the pass manager.

    retarget{device=cuda:0}         point the graph's tensor creations (`arange(..., device=cpu)`) at the device
    fuse-linears                    linear layers reading one input become one (q/k/v, gate/up: `fuse_linears.py`)
    weight-layout{layout=gemv}      store linear weights the way this machine multiplies fastest (`layout.py`)
    prepare-kernels{device=cpu}     each op's `OpFacts.prepare` hook: fit its inputs to its kernel (int4 widens
                                    float16 scales and zero points to float32 for the CPU kernel)
    fuse-qkv-attention              the ops from the fused q/k/v projection to the attention output become one
                                    (CPU; `fuse_qkv_attention.py`)
    bind-cpu-kernels{device=cpu}    point lmforge:: op nodes at their CPU implementations (`bind.py`)

They change the loaded, in-memory graph only, never the artifact. Each is a registered pass like the
compiler's, so the manager verifies the graph around them and records them in `ir.history`, and
`lmforge inspect --load` prints what they did. `load_pipeline` says which run for a device and layout;
`prepare` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.ir.graph import GraphIR, op_name
from lmforge.ir.ops import op_facts
from lmforge.ir.pass_manager import PROPERTIES, PassManager, PassResult, register_pass
from lmforge.runtime import bind, fuse_linears, fuse_qkv_attention, layout  # noqa: F401  (they register passes)

LOADED = frozenset({"specs", "cache-in-place"})  # what a graph read from an artifact is known to have


@dataclass(frozen=True)
class DeviceOptions:
    device: str = "cpu"


@dataclass(frozen=True)
class LayoutOptions:
    layout: str = "source"  # one of layout.LAYOUTS


@register_pass("retarget", options=DeviceOptions, preserves=PROPERTIES)
def retarget(ir: GraphIR, options: DeviceOptions) -> PassResult:
    """Point the graph's tensor creations at `device` (the artifact's graph creates them on the CPU)."""
    device = torch.device(options.device)
    count = 0
    for node in ir.graph.nodes:
        if isinstance(node.kwargs.get("device"), torch.device) and node.kwargs["device"] != device:
            node.kwargs = {**node.kwargs, "device": device}
            count += 1
    return PassResult(bool(count), {"retargeted": count})


@register_pass("weight-layout", options=LayoutOptions, preserves=PROPERTIES)
def weight_layout(ir: GraphIR, options: LayoutOptions) -> PassResult:
    count = layout.apply_layout(ir, options.layout)
    return PassResult(bool(count), {f"{options.layout}-linears": count} if count else {})


@register_pass("prepare-kernels", options=DeviceOptions, preserves=PROPERTIES)
def prepare_kernels(ir: GraphIR, options: DeviceOptions) -> PassResult:
    """Run each lmforge op's `prepare` hook (`OpFacts.prepare`), which fits the node's inputs to the kernel
    that runs it on the device; counts the nodes changed, by op."""
    device = torch.device(options.device)
    stats: dict[str, int] = {}
    for node in list(ir.graph.nodes):
        facts = op_facts(node.target) if node.op == "call_function" else None
        if facts is not None and facts.prepare is not None and facts.prepare(ir, node, device):
            key = f"prepared-{op_name(node.target).removeprefix('lmforge.').removesuffix('.default')}"
            stats[key] = stats.get(key, 0) + 1
    if stats:
        ir.graph.eliminate_dead_code()
        ir.prune_weights()
        ir.gm.recompile()
    return PassResult(bool(stats), stats)


@register_pass("bind-cpu-kernels", options=DeviceOptions, preserves=PROPERTIES)
def bind_cpu_kernels(ir: GraphIR, options: DeviceOptions) -> PassResult:
    count = bind.bind_cpu_kernels(ir, torch.device(options.device))
    return PassResult(bool(count), {"bound": count} if count else {})


def load_pipeline(device: torch.device, weight_layout: str) -> str:
    """The load passes for `device` with linear weights in `weight_layout`, as a pipeline string."""
    steps = [] if device.type == "cpu" else [f"retarget{{device={device}}}"]
    steps.append("fuse-linears")
    if weight_layout != "source":
        steps.append(f"weight-layout{{layout={weight_layout}}}")
    if device.type == "cpu":
        steps += ["prepare-kernels", "fuse-qkv-attention", "bind-cpu-kernels"]
    return ",".join(steps)


def prepare(ir: GraphIR, device: torch.device, weight_layout: str) -> GraphIR:
    """Run the load pipeline on a graph read from an artifact."""
    pipeline = load_pipeline(device, weight_layout)
    return PassManager(pipeline).run(ir, properties=LOADED) if pipeline else ir
