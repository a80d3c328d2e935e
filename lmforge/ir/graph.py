"""`GraphIR`: a captured language model as an ATen-level FX graph plus what the runtime needs around it.

The calling convention every lmforge graph follows (the runtime relies on it, passes must keep it):

    placeholders, in order:
        input_ids       (batch, seq)            int64   new tokens
        position_ids    (batch, seq)            int64   their positions (per row: rows may be left-padded)
        attention_mask  (batch, kv_len)         int64   1 for a real token, 0 for padding, over the whole cache
        k_cache_{i}     (batch, n_kv_heads_i, kv_len, k_head_dim_i)   one per attention layer i
        v_cache_{i}     (batch, n_kv_heads_i, kv_len, v_head_dim_i)
    output: (logits,)   (batch, seq, vocab)

`kv_len` is past + seq: the runtime passes views of its static cache buffers cut to the tokens seen so
far plus the new ones, and the graph writes the new keys and values into the last `seq` slots of those
views in place (`aten.index_copy_`). Everything else in the graph is functional.

Weights are buffers of `gm` read by `get_attr` nodes; `weight_names` maps each attribute to the name the
weight had in the source model (and has in the artifact's safetensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

INPUT_NAMES = ("input_ids", "position_ids", "attention_mask")


@dataclass(frozen=True)
class KVLayerSpec:
    n_kv_heads: int
    k_head_dim: int
    v_head_dim: int


@dataclass
class KVCacheSpec:
    layers: list[KVLayerSpec]
    dtype: torch.dtype  # the cache holds keys/values in the model's compute dtype

    def bytes_per_token(self) -> int:
        """Bytes of K and V one token adds to the cache, over all layers, for one sequence."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return sum(l.n_kv_heads * (l.k_head_dim + l.v_head_dim) * elem for l in self.layers)


@dataclass
class GraphIR:
    gm: fx.GraphModule
    config: dict[str, Any]  # the source model's config (`PretrainedConfig.to_dict()`), for tools and exporters
    kv: KVCacheSpec
    weight_names: dict[str, str]  # gm attribute -> source parameter name
    # gm attribute -> "parameter" (a trained weight) or "buffer" (a derived table such as rotary inv_freq,
    # which passes like convert-dtype leave in full precision); absent means "parameter"
    weight_kinds: dict[str, str] = field(default_factory=dict)
    source: str = ""  # where the model came from: a path, a hub id or a class name
    history: list[dict[str, Any]] = field(default_factory=list)  # what each pass did, in order
    # "lm": a whole model under the calling convention above; "subgraph": any ATen graph (torch.compile's)
    kind: str = "lm"
    # what the quantize pass did: {"scheme", "layers": {layer: scheme config}, "kept": {layer: reason}}
    quantization: dict[str, Any] = field(default_factory=dict)
    # what the shard pass did: {"tp", "weights": {attr: how it was cut}, "replicated", "collectives"}; empty
    # for a one-device graph (see passes/shard.py)
    tensor_parallel: dict[str, Any] = field(default_factory=dict)
    # a sharded graph's per-rank tensors of its sharded weights (the module holds rank 0's); not serialized
    rank_weights: list[dict[str, torch.Tensor]] = field(default_factory=list)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def weight(self, attr: str) -> torch.Tensor:
        return getattr(self.gm, attr)

    def weights(self) -> dict[str, torch.Tensor]:
        """Attribute name -> tensor for every weight the graph reads."""
        return {n.target: self.weight(n.target) for n in self.graph.nodes if n.op == "get_attr"}

    def set_weight(self, attr: str, tensor: torch.Tensor, source_name: str | None = None, kind: str | None = None) -> None:
        if hasattr(self.gm, attr):
            delattr(self.gm, attr)
        self.gm.register_buffer(attr, tensor)
        if source_name is not None:
            self.weight_names[attr] = source_name
        if kind is not None:
            self.weight_kinds[attr] = kind

    def weight_kind(self, attr: str) -> str:
        return self.weight_kinds.get(attr, "parameter")

    def prune_weights(self) -> None:
        """Drop buffers no `get_attr` node reads any more."""
        used = {n.target for n in self.graph.nodes if n.op == "get_attr"}
        for attr in [name for name, _ in self.gm.named_buffers() if name not in used]:
            delattr(self.gm, attr)
            self.weight_names.pop(attr, None)
            self.weight_kinds.pop(attr, None)

    def unique_attr(self, base: str) -> str:
        name, i = base, 0
        while hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        return name

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.graph.nodes:
            if n.op == "call_function":
                key = op_name(n.target)
                counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def param_count(self) -> int:
        """The parameters the weights stand for: a packed int4 weight counts its 4-bit values (two a byte), and
        quantization scales and zero points count nothing."""
        weights = self.weights()
        packed, parameters = set(), set()
        for n in self.graph.nodes:
            name = op_name(n.target) if n.op == "call_function" else ""
            if name in ("lmforge.int4_linear.default", "lmforge.fp8_linear.default"):
                packed.add(n.args[1].target)
                parameters.update(a.target for a in n.args[2:4] if isinstance(a, fx.Node))
        sharded = self.tensor_parallel.get("weights", {})  # count a sharded weight whole, not rank 0's slice
        count = 0
        for attr, t in weights.items():
            name = self.weight_names.get(attr, "")
            if attr in sharded and (name.endswith(".tp") or name.endswith(".tp_start")):
                continue  # the shard pass's copy of a tied weight (its original stays, whole), its row offsets
            numel = math.prod(sharded[attr]["shape"]) if attr in sharded else t.numel()
            if attr in packed:
                count += numel * (2 if t.dtype == torch.uint8 else 1)
            elif attr not in parameters:
                count += numel
        return count

    def param_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights().values())


def op_name(target) -> str:
    """A stable, readable name for a call_function target: `aten.mm.default`, `operator.getitem`."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    module = {"_operator": "operator"}.get(module, module)
    return f"{module}.{getattr(target, '__name__', repr(target))}"
