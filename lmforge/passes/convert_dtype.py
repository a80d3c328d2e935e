"""convert-dtype{dtype=bfloat16}: run a float32 graph in bfloat16 or float16.

The rewrite: trained weights (not derived buffers such as rotary `inv_freq`) and float tensor creations
become `dtype`; the KV cache becomes `dtype`; then the graph is walked in order on meta tensors and casts are
inserted where the mix of dtypes needs a decision, by the rules in `_Walker.apply_rules`:

- a matmul against a weight runs in the weight's dtype (the activation is cast down); a quantized one
  (`lmforge.int4_linear`, `lmforge.fp8_linear`, `lmforge.int8_linear`) in the compute dtype (int4 scales follow it,
  fp8 and int8 scales stay float32);
- a matmul between two activations runs in the wider of their dtypes (so rotary angles stay float32);
- attention runs in the cache dtype, and cache writes are cast to it;
- a float32 table computed from weights and positions alone (rotary cos/sin) is cast to the activation's
  half dtype where the two meet, as Hugging Face's `cos.to(x.dtype)` does;
- reductions, `pow`, `rsqrt`, `exp`, `log` and softmax upcast their input to float32 (norm statistics and
  softmax keep full precision, as Hugging Face's own bfloat16 code does explicitly).

Why: half the bytes per weight and per cached token, and the fast bf16/fp16 matmul paths, from a graph
captured once in float32. Where: after `remove-noops` (which drops the float32 no-op casts a float32 trace
is full of) and before `constant-fold` (which then folds the weight casts it leaves).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import fx

from lmforge.errors import PassError
from lmforge.ir.graph import GraphIR
from lmforge.ir.infer import meta_run, refresh_dtypes
from lmforge.ir.ops import op_facts
from lmforge.ir.spec import SymSpec, TensorSpec, dtype_from_name
from lmforge.ir.pass_manager import PROPERTIES, PassResult, register_pass

aten = torch.ops.aten
LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ConvertDtypeOptions:
    dtype: str = ""  # the compute and storage dtype: bfloat16 or float16 (required: no silent default)


CREATION_OPS = {aten.full.default, aten.zeros.default, aten.ones.default, aten.empty.memory_format,
                aten.scalar_tensor.default, aten.full_like.default, aten.zeros_like.default,
                aten.ones_like.default, aten.empty_like.default, aten.arange.start, aten.arange.default,
                aten.arange.start_step}
MATMULS = {aten.mm.default: (0, 1), aten.bmm.default: (0, 1), aten.matmul.default: (0, 1),
           aten.addmm.default: (0, 1, 2), aten.baddbmm.default: (0, 1, 2)}
ELEMENTWISE = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor}
FULL_PRECISION = {aten.mean.dim, aten.mean.default, aten.sum.dim_IntList, aten.sum.default, aten.var.correction,
                  aten._softmax.default, aten._log_softmax.default, aten.pow.Tensor_Scalar, aten.rsqrt.default,
                  aten.exp.default, aten.log.default, aten.cumsum.default}


class _Walker:
    """Walks the graph in order on meta tensors, inserting casts as the rules ask."""

    def __init__(self, ir: GraphIR, dtype: torch.dtype):
        self.ir, self.dtype = ir, dtype
        self.env: dict[fx.Node, object] = {}
        self._weight_only: dict[fx.Node, bool] = {}
        self._static: dict[fx.Node, bool] = {}
        self.casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
        self.stats: dict[str, int] = {}

    def count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def dtype_of(self, arg) -> torch.dtype | None:
        value = self.env.get(arg) if isinstance(arg, fx.Node) else None
        return value.dtype if isinstance(value, torch.Tensor) else None

    def _computed_from(self, node, is_root, memo: dict[fx.Node, bool]) -> bool:
        """Is `node` a root, or computed (through call_functions) from roots alone?"""
        if not isinstance(node, fx.Node):
            return False
        if node not in memo:
            inputs = node.all_input_nodes
            memo[node] = is_root(node) or (
                node.op == "call_function" and bool(inputs) and all(self._computed_from(i, is_root, memo) for i in inputs)
            )
        return memo[node]

    def weight_only(self, node) -> bool:
        """Is `node` computed from weights alone (a weight, or a cast or reshape of one)?"""
        return self._computed_from(node, lambda n: n.op == "get_attr", self._weight_only)

    def static(self, node) -> bool:
        """Is `node` computed from weights, `position_ids` and sizes alone (a rotary table, a weight)?"""
        return self._computed_from(node, lambda n: n.op == "get_attr" or n.name == "position_ids"
                                   or isinstance(n.meta.get("spec"), SymSpec), self._static)

    def cast(self, node: fx.Node, index: int, dtype: torch.dtype, why: str) -> None:
        src = node.args[index]
        current = self.dtype_of(src)
        if current is None or not current.is_floating_point or current == dtype:
            return
        key = (src, dtype)
        if key not in self.casts:
            with self.ir.graph.inserting_after(src):
                cast = self.ir.graph.call_function(aten._to_copy.default, (src,), {"dtype": dtype})
            spec = src.meta.get("spec")
            cast.meta["spec"] = replace(spec, dtype=dtype) if isinstance(spec, TensorSpec) else None
            self.env[cast] = self.env[src].to(dtype)
            self.casts[key] = cast
            self.count(why)
        args = list(node.args)
        args[index] = self.casts[key]
        node.args = tuple(args)

    def apply_rules(self, node: fx.Node) -> None:
        target = node.target
        facts = op_facts(target)
        if facts is not None:  # an lmforge op declares its casts (`OpFacts.casts`)
            casts = facts.casts
            if casts is not None:
                to = self.dtype if casts.to == "compute" else self.dtype_of(node.args[casts.to])
                for i in casts.args:
                    if i < len(node.args) and node.args[i] is not None:
                        self.cast(node, i, to, casts.why)
        elif target is aten.linear.default:  # linear(x, W, b): run in W's dtype
            wdt = self.dtype_of(node.args[1])
            self.cast(node, 0, wdt, "cast-matmul-input")
            if len(node.args) > 2 and node.args[2] is not None:
                self.cast(node, 2, wdt, "cast-matmul-input")
        elif target in MATMULS:
            operands = MATMULS[target]
            weights = [i for i in operands if self.weight_only(node.args[i])]
            if weights:
                wdt = self.dtype_of(node.args[weights[0]])
            else:
                dts = [self.dtype_of(node.args[i]) for i in operands]
                wdt = dts[0]
                for d in dts[1:]:
                    wdt = torch.promote_types(wdt, d)
            for i in operands:
                self.cast(node, i, wdt, "cast-matmul-input")
        elif target is aten.scaled_dot_product_attention.default:  # (q, k, v, attn_mask, ...)
            if len(node.args) == 3 and "attn_mask" in node.kwargs:  # make the mask positional, to cast it alike
                node.args = (*node.args, node.kwargs["attn_mask"])
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "attn_mask"}
            for i in range(min(4, len(node.args))):  # a bool mask is left alone
                self.cast(node, i, self.dtype, "cast-attention-input")
        elif target is aten.index_copy_.default:  # cache write
            self.cast(node, 3, self.dtype_of(node.args[0]), "cast-cache-write")
        elif target in (aten.layer_norm.default, aten.native_layer_norm.default):
            wdt = self.dtype_of(node.args[2]) if len(node.args) > 2 else None
            if wdt is not None:
                self.cast(node, 0, wdt, "cast-norm-input")
        elif target in ELEMENTWISE and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
            for i, other in ((0, 1), (1, 0)):  # a float32 table meets a half activation: in the half dtype
                if (self.dtype_of(node.args[i]) == torch.float32 and self.static(node.args[i])
                        and self.dtype_of(node.args[other]) == self.dtype and not self.static(node.args[other])):
                    self.cast(node, i, self.dtype, "cast-table-to-activation")
        elif target in FULL_PRECISION:
            dt = self.dtype_of(node.args[0])
            if dt in LOW_PRECISION:
                self.cast(node, 0, torch.float32, "upcast-for-precision")

    def before(self, node: fx.Node, env: dict) -> None:
        if node.target in CREATION_OPS and node.kwargs.get("dtype") == torch.float32:
            self.retype_creation(node)
        self.apply_rules(node)

    def run(self) -> None:
        for node in self.ir.graph.nodes:
            if node.name.startswith(("k_cache_", "v_cache_")) and node.op == "placeholder":
                if node.meta["spec"].dtype != self.dtype:
                    node.meta["spec"] = replace(node.meta["spec"], dtype=self.dtype)
                    self.count("cache-inputs")
        meta_run(self.ir, before=self.before, env=self.env)

    def retype_creation(self, node: fx.Node) -> None:
        """A float32 constant becomes `dtype`, its fill value clamped to what `dtype` can hold."""
        kwargs = dict(node.kwargs, dtype=self.dtype)
        info = torch.finfo(self.dtype)
        args = list(node.args)
        fill_index = {aten.full.default: 1, aten.full_like.default: 1, aten.scalar_tensor.default: 0}.get(node.target)
        if fill_index is not None and isinstance(args[fill_index], float):
            args[fill_index] = min(max(args[fill_index], info.min), info.max)
        node.args, node.kwargs = tuple(args), kwargs
        self.count("retyped-constants")


@register_pass("convert-dtype", options=ConvertDtypeOptions, requires=("specs", "unsharded"),
               preserves=PROPERTIES - {"source-dtype"})
def convert_dtype(ir: GraphIR, options: ConvertDtypeOptions) -> PassResult:
    try:
        dtype = dtype_from_name(options.dtype)
    except ValueError:
        raise PassError(f"convert-dtype: dtype must be bfloat16 or float16, got {options.dtype!r}") from None
    if dtype not in LOW_PRECISION:
        raise PassError(f"convert-dtype: dtype must be bfloat16 or float16, got {options.dtype!r}")

    stats: dict[str, int] = {"weights": 0}
    for attr, tensor in ir.weights().items():
        if tensor.dtype == torch.float32 and ir.weight_kind(attr) == "parameter":
            ir.set_weight(attr, tensor.to(dtype))
            stats["weights"] += 1
    for node in ir.graph.nodes:
        if node.op == "get_attr":
            node.meta["spec"] = replace(node.meta["spec"], dtype=ir.weight(node.target).dtype)

    walker = _Walker(ir, dtype)
    walker.run()
    ir.kv.dtype = dtype
    stats.update(walker.stats)
    stats["specs_updated"] = refresh_dtypes(ir)
    return PassResult(True, stats)
