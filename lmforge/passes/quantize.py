"""quantize{scheme=int4,group_size=128,symmetric=false,method=rtn,skip=lm_head,overrides=...}: weight-only
int4 or fp8 dynamic quantization of the linear layers.

The rewrite: each linear layer on a trained weight, in whichever ATen form the capture gave it,

    linear(x, W[, b])                     W (N, K), as most models have it
    addmm(b, x, W') / mm(x, W')           W' = W^T (K, N), as GPT-2's Conv1D has it
    addmm(b, x, t(W)) / mm(x, t(W))       W (N, K) read through a transpose

becomes `lmforge.int4_linear(x, qweight, scales, zeros, G, b)` or `lmforge.fp8_linear(x, weight,
weight_scale, b)` on new weights packed by `lmforge/quant` (the old float weight goes away unless something
else, such as a tied embedding, still reads it). Which scheme each layer gets comes from `LayerRules`:
embeddings are never touched, the final projection (`lm_head`) is skipped unless the skip list leaves it
out, and a layer whose shape the scheme cannot take keeps its float weight. Every layer kept is counted
in the stats by reason and listed, with its reason, in `ir.quantization["kept"]`; every layer quantized is
listed with its scheme in `ir.quantization["layers"]`, which the artifact's manifest carries.

Why: a decode step reads every weight once per token, so 4-bit weights move a quarter of the bytes of
bfloat16 ones (fp8: half) and the matmuls get that much faster where memory bandwidth bounds them. Where:
after `fuse-attention` and before `convert-dtype`, so the weights are quantized from their float32 values;
with `dtype` set to convert-dtype's, the int4 scales and zero points are made in that dtype already (and
the codes chosen against those rounded values), and convert-dtype puts the biases there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from lmforge.codegen.quant_linear import fp8_linear, int4_linear
from lmforge.errors import PassError
from lmforge.ir.graph import GraphIR
from lmforge.ir.spec import TensorSpec, dtype_from_name
from lmforge.passes.manager import PassResult, register_pass
from lmforge.quant import DEFAULT_SKIP, LayerRules, describe
from lmforge.quant import fp8 as fp8_math
from lmforge.quant import int4 as int4_math

aten = torch.ops.aten
TRANSPOSES = {aten.t.default, aten.permute.default, aten.transpose.int}


@dataclass(frozen=True)
class QuantizeOptions:
    scheme: str = ""  # int4 or fp8 (required)
    group_size: int = 128  # int4: columns per scale
    symmetric: bool = False  # int4: no zero points (q - 8)
    method: str = "rtn"  # int4: rtn (round to nearest) or hqq (calibration-free search of zero points)
    skip: str = DEFAULT_SKIP  # layer-name globs kept in float, separated by '|'
    overrides: str = ""  # "GLOB:TOKEN+TOKEN;..." per-pattern settings (see lmforge/quant/__init__.py)
    dtype: str = ""  # the compute dtype convert-dtype will give the graph: int4 scales and zero points are
    # rounded to it before the codes are chosen, so codes and stored parameters agree (default: the weight's)


@dataclass
class LinearMatch:
    node: fx.Node
    x: fx.Node
    weight_attr: str
    transposed: bool  # the weight attribute holds W^T (K, N)
    bias: Any


def _weight_source(ir: GraphIR, node) -> tuple[str, bool] | None:
    """(attribute, holds W^T?) when `node` reads a trained 2-D weight, directly or through one transpose."""
    transposed = False
    if isinstance(node, fx.Node) and node.target in TRANSPOSES and node.op == "call_function":
        if node.target is aten.permute.default and list(node.args[1]) != [1, 0]:
            return None
        transposed, node = True, node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "get_attr" and ir.weight_kind(node.target) == "parameter"):
        return None
    tensor = ir.weight(node.target)
    if tensor.dim() != 2 or not tensor.is_floating_point():
        return None
    return node.target, transposed


def find_linears(ir: GraphIR) -> list[LinearMatch]:
    """Every linear layer on a trained weight, in graph order."""
    found = []
    for node in ir.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.linear.default:
            src = _weight_source(ir, node.args[1])
            if src:  # linear reads W (N, K); through a transpose it would read W^T
                found.append(LinearMatch(node, node.args[0], src[0], src[1],
                                         node.args[2] if len(node.args) > 2 else None))
        elif node.target in (aten.addmm.default, aten.mm.default):
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
            bias, x, w = (node.args if node.target is aten.addmm.default else (None, *node.args))
            src = _weight_source(ir, w)
            if src:  # mm reads W^T (K, N); through a transpose, W itself
                found.append(LinearMatch(node, x, src[0], not src[1], bias))
    return found


def _final_projection(ir: GraphIR) -> fx.Node | None:
    """The linear whose result the graph returns (through views): the logits' projection."""
    out = next(n for n in ir.graph.nodes if n.op == "output")
    node = out.args[0][0]
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in (
            aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor,
            aten._to_copy.default):
        node = node.args[0]
    return node


def _layer_names(ir: GraphIR, m: LinearMatch, final: fx.Node | None) -> list[str]:
    """The names a layer's patterns match, its own name first."""
    name = ir.weight_names.get(m.weight_attr, m.weight_attr)
    names = [name.removesuffix(".weight"), name]
    if m.node is final:
        names.insert(0, "lm_head")
    return names


def _spec(tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(tuple(tensor.shape), tensor.dtype)


@register_pass("quantize", options=QuantizeOptions, phase="lower")
def quantize(ir: GraphIR, options: QuantizeOptions) -> PassResult:
    if not options.scheme:
        raise PassError("quantize: pass scheme=int4 or scheme=fp8")
    if ir.quantization.get("layers"):
        raise PassError("quantize: the graph is already quantized")
    settings = {"group_size": options.group_size, "symmetric": options.symmetric, "method": options.method}
    try:
        dtype = dtype_from_name(options.dtype) if options.dtype else None
    except ValueError:
        raise PassError(f"quantize: dtype must be float32, bfloat16 or float16, got {options.dtype!r}") from None
    rules = LayerRules.parse(options.scheme, settings, options.skip, options.overrides)
    graph = ir.graph
    final = _final_projection(ir)
    stats: dict[str, int] = {}
    layers: dict[str, dict[str, Any]] = {}
    kept: dict[str, str] = {}
    packed: dict[tuple[str, Any], list[fx.Node]] = {}  # one packed copy per weight and config (tied weights)

    def count(key: str) -> None:
        stats[key] = stats.get(key, 0) + 1

    for m in find_linears(ir):
        names = _layer_names(ir, m, final)
        label = names[0]  # the layer's name: lm_head, or its weight's name without `.weight`
        cfg, reason = rules.for_layer(names)
        weight = ir.weight(m.weight_attr)
        w = weight.t() if m.transposed else weight
        if cfg is not None:
            reason = cfg.unsuitable(tuple(w.shape))
            reason = f"kept: {reason}" if reason else None
        if reason:
            kept[label] = reason
            count("kept-shape" if reason.startswith("kept:") else "kept-by-rule")
            continue
        key = (m.weight_attr, cfg)
        if key not in packed:
            packed[key] = _pack(ir, cfg, w, label, dtype or w.dtype)
        with graph.inserting_before(m.node):
            gets = [graph.get_attr(a) if a is not None else None for a in packed[key]]
        for get in gets:
            if get is not None:
                get.meta["spec"] = _spec(ir.weight(get.target))
        if isinstance(cfg, int4_math.Int4Config):
            args = (m.x, gets[0], gets[1], gets[2], cfg.group_size, m.bias)
            target = int4_linear
        else:
            args = (m.x, gets[0], gets[1], m.bias)
            target = fp8_linear
        with graph.inserting_before(m.node):
            new = graph.call_function(target, args)
        new.meta["spec"] = m.node.meta.get("spec")
        m.node.replace_all_uses_with(new)
        graph.erase_node(m.node)
        layers[label] = describe(cfg)
        count(f"{describe(cfg)['scheme']}-layers")
    graph.eliminate_dead_code()
    ir.prune_weights()
    names = list(ir.weight_names.values())
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise PassError(f"quantize: two weights would be saved as {clash[0]!r}")
    ir.quantization = {"scheme": options.scheme, "layers": layers, "kept": kept}
    return PassResult(bool(layers), stats)


def _pack(ir: GraphIR, cfg, w: torch.Tensor, layer: str, dtype: torch.dtype) -> list[str | None]:
    """Quantize `w` and register its packed tensors as weights named `layer.<field>`; their attributes, in op
    order."""
    base = layer.replace(".", "_")
    if isinstance(cfg, int4_math.Int4Config):
        p = int4_math.quantize(w, cfg, dtype=dtype)
        tensors = [("qweight", p.qdata), ("scales", p.scales), ("zeros", p.zeros)]
    else:
        p = fp8_math.quantize(w, cfg)
        tensors = [("qweight", p.qdata), ("scales", p.scale)]
    attrs: list[str | None] = []
    for suffix, tensor in tensors:
        if tensor is None:
            attrs.append(None)
            continue
        attr = ir.unique_attr(f"{base}_{suffix}")
        # fp8 scales stay float32 (convert-dtype leaves "buffer" weights alone); int4 scales follow the dtype
        kind = "buffer" if isinstance(cfg, fp8_math.Fp8Config) and suffix == "scales" else "parameter"
        ir.set_weight(attr, tensor.contiguous(), source_name=f"{layer}.{suffix}", kind=kind)
        attrs.append(attr)
    return attrs
