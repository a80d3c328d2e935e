"""Graph serialization: JSON for the graph, safetensors for the weights. No pickle, no code on load.

Format `lmforge.graph`, version 1 (`graph.json`):

    {"format": "lmforge.graph", "version": 1,
     "kv": {"dtype": "float32", "layers": [{"n_kv_heads": 2, "k_head_dim": 16, "v_head_dim": 16}, ...]},
     "weights": {"<attr>": {"name": "<source name, the safetensors key>", "kind": "parameter" | "buffer"}},
     "quantization": {"scheme": "int4", "layers": {"<layer>": {"scheme": ..., ...}}, "kept": {...}},  (if any)
     "tensor_parallel": {"tp": 2, "weights": {"<attr>": {"axis", "shape", "ranks"}}, ...},  (if sharded;
                        `ir.tensor_parallel`'s JSON form)
     "nodes": [{"name": ..., "op": "placeholder" | "get_attr" | "call_function" | "output",
                "target": ..., "args": [...], "kwargs": {...}, "spec": ...}, ...]}

A sharded graph's nodes may also carry `"global": {"args", "kwargs", "spec"}` (the node before the shard
pass changed it) and `"inserted": true` (the pass added it); `passes.shard.unshard` reads them.

Values in args: JSON null/bool/int/str and lists as themselves; a float as a JSON number, or
`{"float": "inf"}` when not finite; `{"node": name}`, `{"tuple": [...]}`, `{"dtype": "bfloat16"}`,
`{"device": "cpu"}`, `{"layout": "strided"}`, `{"memory_format": "contiguous_format"}`.
Specs: `{"tensor": {"shape": [...], "dtype": ...}}`, `{"sym": "expr"}`, `{"tuple": [...]}` or null.

Loading resolves a call target only as `torch.ops.<ns>.<op>.<overload>` for ns in aten/prims/lmforge, or as
one of the Python operators in `PYTHON_OPS`; anything else is refused. Nothing in the file is evaluated.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx, nn

from lmforge.errors import ArtifactError
from lmforge.ir.graph import GraphIR, KVCacheSpec, KVLayerSpec, op_name
from lmforge.ir.spec import SymSpec, TensorSpec, dtype_from_name, dtype_name
from lmforge.ir.tensor_parallel import TensorParallel

FORMAT = "lmforge.graph"
VERSION = 1

# Python callables that may appear in a graph (symbolic-size arithmetic and tuple indexing).
PYTHON_OPS: dict[str, Any] = {
    "operator.getitem": operator.getitem,
    "operator.add": operator.add,
    "operator.sub": operator.sub,
    "operator.mul": operator.mul,
    "operator.floordiv": operator.floordiv,
    "operator.truediv": operator.truediv,
    "operator.mod": operator.mod,
    "operator.neg": operator.neg,
    "operator.eq": operator.eq,
    "operator.ne": operator.ne,
    "operator.lt": operator.lt,
    "operator.le": operator.le,
    "operator.gt": operator.gt,
    "operator.ge": operator.ge,
    "torch.sym_max": torch.sym_max,
    "torch.sym_min": torch.sym_min,
    "torch.sym_not": torch.sym_not,
    "math.ceil": math.ceil,
    "math.floor": math.floor,
}

_LAYOUTS = {"strided": torch.strided}
_MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "preserve_format": torch.preserve_format,
    "channels_last": torch.channels_last,
}


# --- encoding ----------------------------------------------------------------------------------------


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, torch.dtype):
        return {"dtype": dtype_name(value)}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise ValueError(f"cannot serialize graph argument {value!r} of type {type(value).__name__}")


def _encode_spec(spec) -> Any:
    if isinstance(spec, TensorSpec):
        return {"tensor": {"shape": list(spec.shape), "dtype": dtype_name(spec.dtype)}}
    if isinstance(spec, SymSpec):
        return {"sym": spec.expr}
    if isinstance(spec, tuple):
        return {"tuple": [_encode_spec(s) for s in spec]}
    return None


def graph_to_json(ir: GraphIR) -> dict[str, Any]:
    nodes = []
    for node in ir.graph.nodes:
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op == "get_attr":
            entry["target"] = node.target
        elif node.op == "call_function":
            entry["target"] = op_name(node.target)
        elif node.op not in ("placeholder", "output"):
            raise ValueError(f"cannot serialize node %{node.name} with op {node.op!r}")
        if node.args:
            entry["args"] = [_encode(a) for a in node.args]
        if node.kwargs:
            entry["kwargs"] = {k: _encode(v) for k, v in node.kwargs.items()}
        if node.op != "output":
            entry["spec"] = _encode_spec(node.meta.get("spec"))
        if "tp_global" in node.meta:  # a sharded graph: what the node was before the shard pass
            g = node.meta["tp_global"]
            entry["global"] = {"args": [_encode(a) for a in g["args"]],
                               "kwargs": {k: _encode(v) for k, v in g["kwargs"].items()}, "spec": _encode_spec(g["spec"])}
        if node.meta.get("tp_inserted"):
            entry["inserted"] = True
        nodes.append(entry)
    return {
        "format": FORMAT,
        "version": VERSION,
        "kv": {
            "dtype": dtype_name(ir.kv.dtype),
            "layers": [{"n_kv_heads": l.n_kv_heads, "k_head_dim": l.k_head_dim, "v_head_dim": l.v_head_dim} for l in ir.kv.layers],
        },
        "weights": {
            attr: {"name": ir.weight_names.get(attr, attr), "kind": ir.weight_kind(attr)} for attr in ir.weights()
        },
        "nodes": nodes,
        **({"quantization": ir.quantization} if ir.quantization else {}),
        **({"tensor_parallel": ir.tensor_parallel.to_json()} if ir.tensor_parallel else {}),
        **({"aliases": ir.aliases} if ir.aliases else {}),
    }


def weights_to_save(ir: GraphIR, rank: int | None = None) -> dict[str, torch.Tensor]:
    """Source name -> tensor, contiguous and unshared, ready for `safetensors.torch.save_file`. For a sharded
    graph: the replicated weights (rank None), or rank `rank`'s slices of the sharded ones."""
    sharded = ir.tensor_parallel.weights if ir.tensor_parallel else {}
    if rank is not None:
        return {ir.weight_names.get(attr, attr): t.detach().contiguous().clone()
                for attr, t in ir.tensor_parallel.rank_weights[rank].items()}
    return {ir.weight_names.get(attr, attr): t.detach().contiguous().clone() for attr, t in ir.weights().items()
            if attr not in sharded}


# --- decoding ----------------------------------------------------------------------------------------


class _Decoder:
    def __init__(self, where: str):
        self.where = where
        self.nodes: dict[str, fx.Node] = {}

    def fail(self, what: str) -> ArtifactError:
        return ArtifactError(f"{self.where}: {what}")

    def value(self, raw: Any) -> Any:
        if raw is None or isinstance(raw, (bool, int, float, str)):
            return raw
        if isinstance(raw, list):
            return [self.value(v) for v in raw]
        if isinstance(raw, dict) and len(raw) == 1:
            (tag, inner), = raw.items()
            if tag == "node":
                if inner not in self.nodes:
                    raise self.fail(f"argument refers to unknown node {inner!r}")
                return self.nodes[inner]
            if tag == "tuple":
                return tuple(self.value(v) for v in inner)
            if tag == "float" and inner in ("inf", "-inf", "nan"):
                return float(inner)
            if tag == "dtype":
                return self.dtype(inner)
            if tag == "device":
                return torch.device(inner)
            if tag == "layout" and inner in _LAYOUTS:
                return _LAYOUTS[inner]
            if tag == "memory_format" and inner in _MEMORY_FORMATS:
                return _MEMORY_FORMATS[inner]
        raise self.fail(f"unrecognised value {raw!r}")

    def dtype(self, name: Any) -> torch.dtype:
        try:
            return dtype_from_name(str(name))
        except ValueError:
            raise self.fail(f"unknown dtype {name!r}") from None

    def spec(self, raw: Any):
        if raw is None:
            return None
        if isinstance(raw, dict) and "tensor" in raw:
            shape = raw["tensor"]["shape"]
            if not all(isinstance(d, (int, str)) for d in shape):
                raise self.fail(f"bad shape {shape!r}")
            return TensorSpec(tuple(shape), self.dtype(raw["tensor"]["dtype"]))
        if isinstance(raw, dict) and "sym" in raw:
            return SymSpec(str(raw["sym"]))
        if isinstance(raw, dict) and "tuple" in raw:
            return tuple(self.spec(s) for s in raw["tuple"])
        raise self.fail(f"bad spec {raw!r}")

    def target(self, name: Any):
        if not isinstance(name, str):
            raise self.fail(f"bad op name {name!r}")
        if name in PYTHON_OPS:
            return PYTHON_OPS[name]
        parts = name.split(".")
        if len(parts) != 3 or parts[0] not in ("aten", "prims", "lmforge"):
            raise self.fail(f"op {name!r} is not an aten, prims or lmforge op")
        try:
            packet = getattr(getattr(torch.ops, parts[0]), parts[1])
            return getattr(packet, parts[2])
        except (AttributeError, RuntimeError):
            if parts[0] == "lmforge":  # lmforge's ops exist once `lmforge.codegen` is imported (the loaders do)
                raise self.fail(f"op {name!r} is not registered in this lmforge") from None
            raise self.fail(f"op {name!r} does not exist in this torch ({torch.__version__})") from None


def graph_from_json(doc: dict[str, Any], weights: dict[str, torch.Tensor], config: dict[str, Any],
                    where: str = "graph.json") -> GraphIR:
    """Rebuild a `GraphIR` from `graph_to_json` output and the safetensors weights (keyed by source name)."""
    dec = _Decoder(where)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise dec.fail(f"not an lmforge graph (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != VERSION:
        raise dec.fail(f"graph format version {doc.get('version')!r}, this lmforge reads version {VERSION}")
    try:
        kv = KVCacheSpec(
            [KVLayerSpec(int(l["n_kv_heads"]), int(l["k_head_dim"]), int(l["v_head_dim"])) for l in doc["kv"]["layers"]],
            dec.dtype(doc["kv"]["dtype"]),
        )
        root = nn.Module()
        weight_names, weight_kinds = {}, {}
        for attr, info in doc["weights"].items():
            if info["name"] not in weights:
                raise dec.fail(f"weight {info['name']!r} is missing from the safetensors file")
            root.register_buffer(attr, weights[info["name"]])
            weight_names[attr] = info["name"]
            if info.get("kind", "parameter") != "parameter":
                weight_kinds[attr] = info["kind"]
        graph = fx.Graph()
        for entry in doc["nodes"]:
            op, name = entry["op"], entry["name"]
            args = tuple(dec.value(a) for a in entry.get("args", []))
            kwargs = {k: dec.value(v) for k, v in entry.get("kwargs", {}).items()}
            if op == "placeholder":
                node = graph.placeholder(name)
            elif op == "get_attr":
                if entry["target"] not in doc["weights"]:
                    raise dec.fail(f"node {name!r} reads undeclared weight {entry['target']!r}")
                node = graph.get_attr(entry["target"])
            elif op == "call_function":
                node = graph.call_function(dec.target(entry["target"]), args, kwargs)
            elif op == "output":
                graph.output(args[0])
                continue
            else:
                raise dec.fail(f"node {name!r} has unknown op {op!r}")
            node.name = name
            node.meta["spec"] = dec.spec(entry.get("spec"))
            if "global" in entry:
                g = entry["global"]
                node.meta["tp_global"] = {"args": tuple(dec.value(a) for a in g.get("args", [])),
                                          "kwargs": {k: dec.value(v) for k, v in g.get("kwargs", {}).items()},
                                          "spec": dec.spec(g.get("spec"))}
            if entry.get("inserted"):
                node.meta["tp_inserted"] = True
            dec.nodes[name] = node
    except (KeyError, TypeError, ValueError) as e:
        raise dec.fail(f"malformed graph ({type(e).__name__}: {e})") from None
    gm = fx.GraphModule(root, graph)
    quantization = doc.get("quantization") or {}
    if not isinstance(quantization, dict):
        raise dec.fail(f"malformed quantization entry {quantization!r}")
    raw_tp = doc.get("tensor_parallel") or None
    try:
        tensor_parallel = TensorParallel.from_json(raw_tp, weight_names) if raw_tp is not None else None
    except (AttributeError, KeyError, TypeError, ValueError):
        raise dec.fail(f"malformed tensor_parallel entry {raw_tp!r}") from None
    aliases = doc.get("aliases") or {}
    if not (isinstance(aliases, dict) and all(isinstance(v, list) and all(isinstance(n, str) for n in v)
                                              for v in aliases.values())):
        raise dec.fail(f"malformed aliases entry {aliases!r}")
    return GraphIR(gm=gm, config=config, kv=kv, weight_names=weight_names, weight_kinds=weight_kinds,
                   quantization=quantization, tensor_parallel=tensor_parallel, aliases=aliases)
