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

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from lmforge.ir.ops import op_facts

from lmforge.ir.tensor_parallel import TensorParallel

INPUT_NAMES = ("input_ids", "position_ids", "attention_mask")


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position rule of the calling convention: each slot's position from a left-padded attention mask
    (batch, kv_len) is the number of real tokens before it; padding counts as 0. The engine feeds
    `position_ids` by it, and fuse-attention checks masks against it."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


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
    # what the shard pass did (how each sharded weight was cut, the ranks' tensors); None for a one-device graph
    tensor_parallel: TensorParallel | None = None
    # source name -> every name the source model gave that tensor (tied weights only), first the one its
    # checkpoint holds: an artifact keeps one name a tensor, an exporter writes the others' expected key
    aliases: dict[str, list[str]] = field(default_factory=dict)
    # layer -> its quantized tensors as a quantized source checkpoint holds them (`quant.compressed_tensors.
    # ImportedLayer`), for `quantize{imported=true}` to keep as they are; the compiler's only, never saved
    imported: dict[str, Any] = field(default_factory=dict)

    @property
    def tp(self) -> int:
        """The ranks this graph is sharded for (1: one device)."""
        return self.tensor_parallel.tp if self.tensor_parallel else 1

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
        """The parameters the weights stand for. Each op says what its weight arguments count for
        (`OpFacts.params`: a packed int4 byte holds two parameters, quantization scales and zero points count
        nothing); every other weight counts its elements. A sharded weight counts whole, not rank 0's slice."""
        per_element: dict[str, int] = {}
        for n in self.graph.nodes:
            facts = op_facts(n.target) if n.op == "call_function" else None
            for pos, factor in (facts.params.items() if facts is not None else ()):
                arg = n.args[pos] if pos < len(n.args) else None
                if isinstance(arg, fx.Node) and arg.op == "get_attr":
                    per_element[arg.target] = factor
        sharded = self.tensor_parallel.weights if self.tensor_parallel else {}
        count = 0
        for attr, t in self.weights().items():
            cut = sharded.get(attr)
            if cut is not None and cut.role != "slice":
                continue  # the shard pass's copy of a tied weight (its original stays, whole), its row offsets
            numel = cut.numel if cut is not None else t.numel()
            count += numel * per_element.get(attr, 1)
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
