"""Load-time weight layouts: the runtime stores each linear weight the way this machine multiplies fastest.

The artifact keeps weights in their source layout, (out_features, in_features), so other tools can read it.
At load, for a CPU engine, the runtime times a decode-shaped matmul (one row of activations against a set
of weights too large for the caches) in both layouts: `linear(x, W)` and `x @ Wt` with `Wt = W.t()` stored
contiguous. When the transposed layout is clearly faster, every `linear(x, W[, b])` on a weight becomes
`matmul(x, Wt)[ + b]`. Measured on a 2-core AMD EPYC (AVX-512) with torch 2.13: float32 decode of a
SmolLM-135M-shaped model went from 17.7 to 21.7 tokens/s; bfloat16 was the same either way (so it keeps
the source layout).

A third choice, `gemv`, keeps the source layout and sends decode-shaped bfloat16 and float32 matmuls to
lmforge's CPU GEMV kernels (`codegen/cpu_gemv.py`, through the `lmforge::linear` op), where it can be built; it streams
weights at close to the machine's bandwidth. The choice is measured once per process for each dtype;
`LMFORGE_WEIGHT_LAYOUT` set to `source`, `transposed` or `gemv` overrides it.

Quantized layers keep their packed layout (their ops' `prepare` hooks, run by the load pass
`prepare-kernels`, fit them to their kernels).
"""

from __future__ import annotations

import functools
import os
from dataclasses import replace

import torch

from lmforge.codegen import cpu_gemv
from lmforge.codegen.cpu_route import best_seconds
from lmforge.codegen.linear import linear
from lmforge.errors import ArtifactError
from lmforge.ir.graph import GraphIR
from lmforge.ir.linear import Linear, find_linears

aten = torch.ops.aten
LAYOUTS = ("source", "transposed", "gemv")


@functools.lru_cache(maxsize=None)
def measured_layout(dtype: torch.dtype) -> str:
    """The faster layout for decode-shaped CPU matmuls in `dtype` on this machine (10% margin to switch)."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(1536, 576, generator=gen).to(dtype) for _ in range(24)]  # ~85 MB in float32
    transposed = [w.t().contiguous() for w in weights]
    x = torch.randn(1, 576, generator=gen).to(dtype)
    times = {"source": best_seconds(lambda: [torch.nn.functional.linear(x, w) for w in weights]),
             "transposed": best_seconds(lambda: [x @ w for w in transposed])}
    if dtype in cpu_gemv.GEMV_DTYPES and cpu_gemv.available():
        times["gemv"] = best_seconds(lambda: [linear(x, w) for w in weights])
    best = min(times, key=times.get)
    return best if times[best] < 0.9 * times["source"] else "source"


def choose_layout(device: torch.device, dtype: torch.dtype) -> str:
    forced = os.environ.get("LMFORGE_WEIGHT_LAYOUT", "auto")
    if forced in LAYOUTS:
        return forced
    if forced != "auto":
        raise ArtifactError(f"LMFORGE_WEIGHT_LAYOUT must be auto, source, transposed or gemv, got {forced!r}")
    if device.type != "cpu":
        return "source"  # GPU BLAS libraries take either layout at full speed
    return measured_layout(dtype)


def apply_layout(ir: GraphIR, layout: str) -> int:
    """Rewrite the graph's linear layers for `layout`; returns how many were rewritten."""
    if layout == "transposed":
        return transpose_linear_weights(ir)
    if layout == "gemv":
        return use_gemv(ir)
    return 0


def use_gemv(ir: GraphIR) -> int:
    """bfloat16 and float32 linears -> `lmforge.linear` (F.linear's contract); returns how many were rewritten.

    `aten.linear(x, W[, b])` only changes its target. GPT-2's Conv1D form, `addmm(b, x, A)` and `mm(x, A)`
    with `A = W.T` held as (in, out), gets `W` stored contiguous once (the kernel streams rows of W) and
    becomes `lmforge.linear(x, W[, b])`.
    """
    count = 0
    for lin in _plain_linears(ir):
        if lin.weight.meta["spec"].dtype in cpu_gemv.GEMV_DTYPES:
            lin.node.target = linear
            count += 1
    untransposed: dict[str, str] = {}
    for lin in find_linears(ir.graph):
        node = lin.node
        if not (node.target in (aten.addmm.default, aten.mm.default) and lin.transposed and lin.through is None
                and lin.weight.meta["spec"].dtype in cpu_gemv.GEMV_DTYPES):
            continue
        spec = lin.weight.meta["spec"]
        with ir.graph.inserting_before(node):
            w = ir.graph.get_attr(_transposed_copy(ir, lin.weight.target, untransposed))
            new = ir.graph.call_function(linear, (lin.x, w, lin.bias))
        w.meta["spec"] = replace(spec, shape=tuple(reversed(spec.shape)))
        new.meta["spec"] = node.meta["spec"]
        node.replace_all_uses_with(new)
        ir.graph.erase_node(node)
        count += 1
    ir.graph.eliminate_dead_code()
    ir.prune_weights()
    ir.gm.recompile()
    return count


def _transposed_copy(ir: GraphIR, attr: str, made: dict[str, str]) -> str:
    """The attribute of a contiguous transposed copy of weight `attr` (saved as `<name>.T`), made once per
    weight: `made` maps each weight copied so far to its copy."""
    if attr not in made:
        made[attr] = ir.unique_attr(f"{attr}_t")
        ir.set_weight(made[attr], ir.weight(attr).t().contiguous(), source_name=ir.weight_names.get(attr, attr) + ".T",
                      kind=ir.weight_kind(attr))
    return made[attr]


def _plain_linears(ir: GraphIR) -> list[Linear]:
    """The `aten.linear(x, W[, b])` layers reading W straight from a weight: the ones a layout rewrites."""
    return [lin for lin in find_linears(ir.graph) if lin.node.target is aten.linear.default and lin.through is None]


def transpose_linear_weights(ir: GraphIR) -> int:
    """Rewrite `linear(x, W[, b])` on 2-D weights into `matmul(x, W.t().contiguous())[ + b]`; returns the count."""
    graph = ir.graph
    done: dict[str, str] = {}
    count = 0
    for lin in _plain_linears(ir):
        node = lin.node
        spec = node.args[1].meta["spec"]
        with graph.inserting_before(node):
            wt = graph.get_attr(_transposed_copy(ir, lin.weight.target, done))
            out = graph.call_function(aten.matmul.default, (node.args[0], wt))
        wt.meta["spec"] = replace(spec, shape=tuple(reversed(spec.shape)))
        out.meta["spec"] = node.meta["spec"]
        if len(node.args) > 2 and node.args[2] is not None:
            with graph.inserting_before(node):
                out = graph.call_function(aten.add.Tensor, (out, node.args[2]))
            out.meta["spec"] = node.meta["spec"]
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        count += 1
    graph.eliminate_dead_code()
    ir.prune_weights()
    ir.gm.recompile()
    return count
