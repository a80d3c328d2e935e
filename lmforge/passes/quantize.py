"""quantize{scheme=int4,group_size=128,symmetric=false,method=rtn,zero_points=float,skip=lm_head,overrides=...}: weight-only
int4 or int8, or fp8 dynamic quantization of the linear layers.

The rewrite: each linear layer on a trained weight, in whichever ATen form the capture gave it (`ir/linear.py`),

    linear(x, W[, b])                     W (N, K), as most models have it
    addmm(b, x, W') / mm(x, W')           W' = W^T (K, N), as GPT-2's Conv1D has it
    addmm(b, x, t(W)) / mm(x, t(W))       W (N, K) read through a transpose

becomes the layer's scheme's op, e.g. `lmforge.int4_linear(x, qweight, scales, zeros, G, b)` or
`lmforge.fp8_linear(x, qweight, scales, b)` (`lmforge.int8_linear` has the same arguments), on new weights packed by the scheme's handler (`lmforge/quant`;
the old float weight goes away unless something else, such as a tied embedding, still reads it); the pass
itself knows no scheme. Which scheme each layer gets comes from `LayerRules`:
embeddings are never touched, the final projection (`lm_head`) is skipped unless the skip list leaves it
out, and a layer whose shape the scheme cannot take keeps its float weight. Settings the user did not give
are fitted to each layer by its scheme (`QuantScheme.fit`: int4's group size is 128, or the largest of 32,
64 that divides the layer's in_features), so `quantize{scheme=int4}` quantizes every layer it can; a
group size given explicitly is kept, and a layer it does not divide keeps its float weight. Every layer kept is counted
in the stats by reason and listed, with its reason, in `ir.quantization["kept"]`; every layer quantized is
listed with its scheme in `ir.quantization["layers"]`, which the artifact's manifest carries.

Why: a decode step reads every weight once per token, so 4-bit weights move a quarter of the bytes of
bfloat16 ones (fp8 and int8: half) and the matmuls get that much faster where memory bandwidth bounds them. Where:
after `fuse-attention` and before `convert-dtype`, so the weights are quantized from their float32 values;
with `dtype` set to convert-dtype's, the int4 scales and zero points are made in that dtype already (and
the codes chosen against those rounded values), and convert-dtype puts the biases there too.

A quantized checkpoint (compressed-tensors) comes in with `imported=true`: `lmforge.optimize` reads its
packed tensors into `ir.imported` (`quant/compressed_tensors.py`), and the pass gives each layer those tensors
and the checkpoint's settings instead of quantizing the float weights capture saw (which are their
dequantized values), so the artifact holds the checkpoint's numbers exactly.

Options: `lmforge.optimize` builds `QuantizeOptions` directly (no text in between) and puts it in its
pipeline as a step; `QuantizeOptions.resolve` is the one place they are checked, for the API and the pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

import lmforge.codegen  # noqa: F401  (defines the lmforge:: ops the schemes emit)
from lmforge.errors import LmforgeError, PassError
from lmforge.ir.graph import GraphIR
from lmforge.ir.linear import Linear
from lmforge.ir.linear import find_linears as find_all
from lmforge.ir.ops import op_facts
from lmforge.ir.spec import TensorSpec, dtype_from_name
from lmforge.ir.pass_manager import PROPERTIES, PassResult, register_pass
from lmforge.quant import DEFAULT_SKIP, SCHEMES, LayerRules, handler_for

aten = torch.ops.aten
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # what `dtype=` may name


@dataclass(frozen=True)
class QuantizeOptions:
    scheme: str = ""  # int4, fp8 or int8 (required)
    group_size: int = 0  # int4: columns per scale; 0: 128, or per layer the largest that divides in_features
    symmetric: bool = False  # int4: no zero points (q - 8)
    method: str = "rtn"  # int4: rtn (round to nearest) or hqq (calibration-free search of zero points)
    zero_points: str = "float"  # int4, asymmetric: min/max's fractional zero points, or "int": rounded to 0..15
    # take each layer's quantized tensors from `ir.imported` (a quantized checkpoint's, read by
    # `lmforge.optimize`) instead of quantizing; layers it does not hold keep their float weights
    imported: bool = False
    skip: str = DEFAULT_SKIP  # layer-name globs kept in float, separated by '|'
    overrides: str = ""  # "GLOB:TOKEN+TOKEN;..." per-pattern settings (see lmforge/quant/__init__.py)
    dtype: str = ""  # the compute dtype convert-dtype will give the graph: int4 scales and zero points are
    # rounded to it before the codes are chosen, so codes and stored parameters agree (default: the weight's)

    def resolve(self) -> tuple[LayerRules, torch.dtype | None]:
        """The layer rules and compute dtype these options stand for, after checking every value: the one
        place they are checked, raising a one-line error (the API calls it before capturing, the pass
        before rewriting)."""
        if not self.scheme:
            raise PassError(f"quantize: pass {' or '.join(f'scheme={name}' for name in SCHEMES)}")
        for text, what in ((self.skip, "skip"), (self.overrides, "overrides")):
            if any(ch in text for ch in ",{}"):  # the options must print as a pipeline step and parse back
                raise LmforgeError(f"{what} {text!r} may not contain ',', '{{' or '}}'; separate patterns with '|'")
        if self.dtype and self.dtype not in COMPUTE_DTYPES:
            raise PassError(f"quantize: dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        dtype = dtype_from_name(self.dtype) if self.dtype else None
        settings = {"symmetric": self.symmetric, "method": self.method, "zero_points": self.zero_points}
        if self.group_size:  # chosen, so never fitted to a layer
            settings["group_size"] = self.group_size
        return LayerRules.parse(self.scheme, settings, self.skip, self.overrides), dtype


def find_linears(ir: GraphIR) -> list[Linear]:
    """Every ATen linear layer on a trained float weight, in graph order (`lmforge.ir.linear` says what a linear
    layer is; already quantized ones are lmforge ops and are left alone)."""
    return [lin for lin in find_all(ir.graph)
            if op_facts(lin.node.target) is None and ir.weight_kind(lin.weight.target) == "parameter"
            and ir.weight(lin.weight.target).is_floating_point()]


def _final_projection(ir: GraphIR) -> fx.Node | None:
    """The linear whose result the graph returns (through views): the logits' projection."""
    out = next(n for n in ir.graph.nodes if n.op == "output")
    node = out.args[0][0]
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in (
            aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor,
            aten._to_copy.default):
        node = node.args[0]
    return node


def _layer_names(ir: GraphIR, m: Linear, final: fx.Node | None) -> list[str]:
    """The names a layer's patterns match, its own name first."""
    name = ir.weight_names.get(m.weight.target, m.weight.target)
    names = [name.removesuffix(".weight"), name]
    if m.node is final:
        names.insert(0, "lm_head")
    return names


def _spec(tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(tuple(tensor.shape), tensor.dtype)


@register_pass("quantize", options=QuantizeOptions, requires=("specs", "source-dtype", "unquantized", "unsharded"),
               preserves=PROPERTIES - {"unquantized"})
def quantize(ir: GraphIR, options: QuantizeOptions) -> PassResult:
    rules, dtype = options.resolve()
    if ir.quantization.get("layers"):
        raise PassError("quantize: the graph is already quantized")
    graph = ir.graph
    final = _final_projection(ir)
    stats: dict[str, int] = {}
    layers: dict[str, dict[str, Any]] = {}
    kept: dict[str, str] = {}
    packed: dict[tuple[str, Any], list[fx.Node]] = {}  # one packed copy per weight and config (tied weights)

    def count(key: str) -> None:
        stats[key] = stats.get(key, 0) + 1

    if options.imported and not ir.imported:
        raise PassError("quantize{imported=true} needs a quantized checkpoint's tensors: run lmforge.optimize on "
                        "a compressed-tensors checkpoint")
    unused = set(ir.imported)
    for m in find_linears(ir):
        names = _layer_names(ir, m, final)
        label = names[0]  # the layer's name: lm_head, or its weight's name without `.weight`
        weight = ir.weight(m.weight.target)
        w = weight.t() if m.transposed else weight
        source = next((ir.imported[n] for n in names if n in ir.imported), None) if options.imported else None
        if options.imported:
            cfg, reason = (source.config, None) if source is not None else (None, "float in the source checkpoint")
            unused -= set(names)
            if source is not None and tuple(source.weight.shape) != tuple(w.shape):
                raise PassError(f"quantize: the checkpoint's {label} is {tuple(source.weight.shape)}, the graph's "
                                f"weight {tuple(w.shape)}")
        else:
            cfg, reason = rules.for_layer(names, tuple(w.shape))
        if cfg is not None:
            reason = cfg.unsuitable(tuple(w.shape))
            reason = f"kept: {reason}" if reason else None
        if reason:
            kept[label] = reason
            count("kept-shape" if reason.startswith("kept:") else "kept-by-rule")
            continue
        scheme = handler_for(cfg)
        key = (m.weight.target, cfg)
        if key not in packed:
            tensors = source.packed if source is not None else scheme.pack(w, cfg, dtype or w.dtype)
            packed[key] = _register(ir, tensors, label)
        with graph.inserting_before(m.node):
            gets = [graph.get_attr(a) if a is not None else None for a in packed[key]]
        for get in gets:
            if get is not None:
                get.meta["spec"] = _spec(ir.weight(get.target))
        with graph.inserting_before(m.node):
            new = graph.call_function(scheme.op, scheme.op_args(m.x, gets, cfg, m.bias))
        new.meta["spec"] = m.node.meta.get("spec")
        m.node.replace_all_uses_with(new)
        graph.erase_node(m.node)
        layers[label] = scheme.describe(cfg)
        count(f"{scheme.name}-layers")
    if unused:
        raise PassError(f"quantize: the checkpoint quantizes {sorted(unused)[0]}, which is not a linear layer of "
                        f"the captured graph")
    graph.eliminate_dead_code()
    ir.prune_weights()
    names = list(ir.weight_names.values())
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise PassError(f"quantize: two weights would be saved as {clash[0]!r}")
    ir.quantization = {"scheme": options.scheme, "layers": layers, "kept": kept}
    return PassResult(bool(layers), stats)


def _register(ir: GraphIR, tensors: list, layer: str) -> list[str | None]:
    """Register a layer's packed tensors (`PackedTensor`s, in the op's order) as weights named `layer.<suffix>`,
    of the kind the scheme gives each; their attributes, in op order (None for an optional tensor the config
    does without)."""
    base = layer.replace(".", "_")
    attrs: list[str | None] = []
    for packed in tensors:
        if packed.tensor is None:
            attrs.append(None)
            continue
        attr = ir.unique_attr(f"{base}_{packed.suffix}")
        ir.set_weight(attr, packed.tensor.contiguous(), source_name=f"{layer}.{packed.suffix}", kind=packed.kind)
        attrs.append(attr)
    return attrs
