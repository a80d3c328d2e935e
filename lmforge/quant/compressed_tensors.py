"""lmforge's schemes in the compressed-tensors format, both ways: what `lmforge export --format hf` writes and
what `lmforge optimize` reads from a compressed-tensors checkpoint (transformers, vLLM and SGLang's format for
quantized checkpoints), so that the quantized numbers cross unchanged in both directions.

    lmforge int4 (N, K), group G           pack-quantized, 4 bits, group strategy
      qweight (N, K/2) uint8, q 0..15        weight_packed int32 (N, K/8): eight codes a word, the first in the
                                             low bits, each its signed value + 8 (= lmforge's q)
      scales (N, K/G)                        weight_scale (N, K/G), same dtype
      zeros (N, K/G), integral 0..15         weight_zero_point int32 (ceil(N/8), K/G): signed zero point + 8
        (absent when symmetric)                packed the same way along the output dim (absent when symmetric)
                                             weight_shape int64 [N, K]
    lmforge int8 (N, K)                    pack-quantized, 8 bits, channel strategy, symmetric (W8A16)
      qweight int8, scales (N,) float32      weight_packed: four codes (+128) a word; weight_scale (N, 1)
    lmforge fp8 (N, K)                     float-quantized, channel weights, dynamic per-token activations
      qweight float8_e4m3fn, scales (N,)     weight, weight_scale (N, 1)

compressed-tensors holds integer zero points only: an int4 layer with fractional ones (lmforge's default,
`zero_points="float"`) cannot be written, and the error names the option that makes them integers. Layers a
checkpoint quantizes in a way no lmforge scheme computes (activation-order `g_idx`, int8 activations, fp8
weights with float activations, other bit widths) are refused on import in one line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.quant.scheme import PackedTensor, handler, handler_for

QUANT_METHOD = "compressed-tensors"


def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Unsigned `bits`-bit integers (2-D) packed 32 // bits to an int32 word along `dim`, the first in the low
    bits, the last word padded with zeros."""
    if dim == 0:
        return pack_int32(values.T, bits, 1).T.contiguous()
    v = values.to(torch.int64)
    per = 32 // bits
    pad = (-v.shape[1]) % per
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    words = (v.reshape(v.shape[0], -1, per) << (torch.arange(per, dtype=torch.int64) * bits)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_int32(words: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """The inverse of `pack_int32`: (.., length) unsigned values (int64) along `dim`."""
    if dim == 0:
        return unpack_int32(words.T, bits, length, 1).T.contiguous()
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    v = (w.unsqueeze(-1) >> (torch.arange(per, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    return v.reshape(words.shape[0], -1)[:, :length]


# --- lmforge -> compressed-tensors ---------------------------------------------------------------------


def to_compressed(layer: str, described: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict, dict, str]:
    """A quantized layer's tensors (by suffix) as compressed-tensors': (tensors by suffix, the group's
    `weights`/`input_activations` arguments, the format). A one-line error for what the format cannot hold."""
    scheme = described.get("scheme")
    if scheme == "int4":
        from lmforge.quant.int4 import unpack

        q = unpack(tensors["qweight"])
        n, k = q.shape
        out = {"weight_packed": pack_int32(q, 4), "weight_scale": tensors["scales"].contiguous(),
               "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
        symmetric = "zeros" not in tensors
        if not symmetric:
            z = tensors["zeros"].float()
            if not bool(((z == z.round()) & (z >= 0) & (z <= 15)).all()):
                raise LmforgeError(f"{layer} has fractional int4 zero points, which compressed-tensors cannot hold; "
                                   f"re-run `lmforge optimize` with --zero-points int (or --symmetric)")
            out["weight_zero_point"] = pack_int32(z.round(), 4, dim=0)
        args = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group",
                "group_size": int(described["group_size"]), "dynamic": False}
        return out, {"weights": args, "input_activations": None}, "pack-quantized"
    if scheme == "int8":
        q = tensors["qweight"]
        out = {"weight_packed": pack_int32(q.to(torch.int64) + 128, 8), "weight_scale": tensors["scales"].reshape(-1, 1),
               "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64)}
        args = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
        return out, {"weights": args, "input_activations": None}, "pack-quantized"
    if scheme == "fp8":
        out = {"weight": tensors["qweight"], "weight_scale": tensors["scales"].reshape(-1, 1)}
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False}
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
        return out, {"weights": weights, "input_activations": acts}, "float-quantized"
    raise LmforgeError(f"{layer}: compressed-tensors export does not carry quantization scheme {scheme!r}; it "
                       f"carries int4, int8 and fp8")


# --- compressed-tensors -> lmforge ---------------------------------------------------------------------


@dataclass
class ImportedLayer:
    config: Any  # the lmforge scheme config (an `Int4Config`, ...)
    packed: list[PackedTensor]  # in the scheme's op order, as its `pack` gives them
    weight: torch.Tensor  # the float32 weight (N, K) they stand for, for capture


@dataclass
class CompressedCheckpoint:
    """A compressed-tensors checkpoint read for capture: float tensors for the model, packed ones for the pass."""

    config: dict[str, Any]  # config.json without its quantization_config
    state: dict[str, torch.Tensor]  # every tensor the model loads, quantized layers as their float32 weights
    layers: dict[str, ImportedLayer]  # module name -> what the quantize pass gives it
    dtype: str  # the checkpoint's declared dtype

    def describe(self) -> str:
        """The layers by their settings, for people: "12 layers int4 g32 sym rtn"."""
        from collections import Counter

        labels = Counter(handler_for(l.config).label(handler_for(l.config).describe(l.config))
                         for l in self.layers.values())
        return ", ".join(f"{n} layers {label}" for label, n in labels.items())


def is_compressed(config: dict[str, Any]) -> bool:
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def read_checkpoint(path: Path) -> CompressedCheckpoint:
    """Read a compressed-tensors checkpoint directory (config.json and safetensors, sharded or not)."""
    config = json.loads((path / "config.json").read_text())
    qc = config.pop("quantization_config")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise LmforgeError(f"{path}: quantization_status {qc.get('quantization_status')!r}; lmforge imports "
                           f"compressed checkpoints only")
    tensors = _read_tensors(path)
    groups = list((qc.get("config_groups") or {}).items())
    ignore = list(qc.get("ignore") or [])
    layers: dict[str, ImportedLayer] = {}
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith((".weight_packed", ".weight_scale"))})
    for module in modules:
        if any(_matches(module, pattern) for pattern in ignore):
            continue
        group = next((g for _, g in groups if any(_matches(module, t) for t in g.get("targets", []))), None)
        if group is None:
            continue
        fmt = group.get("format") or qc.get("format")
        parts = {k[len(module) + 1:]: v for k, v in tensors.items()
                 if k.rsplit(".", 1)[0] == module and not k.endswith(".bias")}  # the bias stays float
        layers[module] = _from_compressed(module, parts, group, fmt)
        for suffix in parts:
            tensors.pop(f"{module}.{suffix}")
        tensors[f"{module}.weight"] = layers[module].weight
    if not layers:
        raise LmforgeError(f"{path}: its quantization_config matches no quantized layer in its weights")
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return CompressedCheckpoint(config, tensors, layers, dtype)


def _matches(module: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    # a class name (`Linear`) matches every module that carries quantized tensors: only linear layers do
    return target == module or target == "Linear" or module.endswith("." + target)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise LmforgeError(f"{path}: {name} is missing")
        out.update(load_file(str(path / name)))
    return out


def _from_compressed(layer: str, t: dict[str, torch.Tensor], group: dict, fmt: str | None) -> ImportedLayer:
    w = group.get("weights") or {}
    acts = group.get("input_activations")
    what = (f"{layer}: compressed-tensors {fmt} with {w.get('num_bits')}-bit {w.get('type')} {w.get('strategy')} "
            f"weights")
    if w.get("actorder") == "group" or "weight_g_idx" in t:  # ("weight" order calibrates, stores nothing)
        raise LmforgeError(f"{what} in activation order (g_idx); lmforge's int4 takes groups in column order")
    if fmt == "pack-quantized" and w.get("type") == "int" and acts is None:
        n, k = (int(v) for v in t["weight_shape"].tolist())
        if w.get("num_bits") == 4 and w.get("strategy") == "group":
            return _int4(what, t, w, n, k)
        if w.get("num_bits") == 8 and w.get("strategy") == "channel" and w.get("symmetric", True):
            from lmforge.quant.int8 import Int8Config

            q = (unpack_int32(t["weight_packed"], 8, k) - 128).to(torch.int8)
            scales = t["weight_scale"].reshape(-1).float()
            return _layer(Int8Config(), "int8", [PackedTensor("qweight", q), PackedTensor("scales", scales, "buffer")])
    if fmt == "float-quantized" and w.get("num_bits") == 8 and w.get("type") == "float" and w.get("strategy") == "channel":
        dynamic_tokens = isinstance(acts, dict) and acts.get("dynamic") is True and acts.get("strategy") == "token"
        if dynamic_tokens and t["weight"].dtype == torch.float8_e4m3fn:
            from lmforge.quant.fp8 import Fp8Config

            scales = t["weight_scale"].reshape(-1).float()
            return _layer(Fp8Config(), "fp8", [PackedTensor("qweight", t["weight"]), PackedTensor("scales", scales, "buffer")])
    raise LmforgeError(f"{what}{' and quantized activations' if acts else ''} have no lmforge scheme; lmforge "
                       f"imports int4 group-wise and int8 channel-wise weight-only (pack-quantized) and fp8 "
                       f"FP8_DYNAMIC (float-quantized)")


def _int4(what: str, t: dict[str, torch.Tensor], w: dict, n: int, k: int) -> ImportedLayer:
    from lmforge.quant.int4 import GROUP_SIZES, IMPORTED, Int4Config, pack

    group_size = int(w.get("group_size") or 0)
    if group_size not in GROUP_SIZES:
        raise LmforgeError(f"{what} of group size {group_size}; lmforge's int4 takes "
                           f"{', '.join(map(str, GROUP_SIZES))}")
    if k % group_size:
        raise LmforgeError(f"{what}: in_features {k} is not a multiple of its group size {group_size}")
    q = unpack_int32(t["weight_packed"], 4, k)
    scales = t["weight_scale"]
    symmetric = bool(w.get("symmetric", True))
    zeros = None
    if not symmetric:
        zeros = unpack_int32(t["weight_zero_point"], 4, n, dim=0).to(scales.dtype)
    cfg = Int4Config(group_size=group_size, symmetric=symmetric, method=IMPORTED,
                     zero_points="float" if symmetric else "int")
    return _layer(cfg, "int4", [PackedTensor("qweight", pack(q)), PackedTensor("scales", scales),
                                PackedTensor("zeros", zeros)])


def _layer(cfg, scheme: str, packed: list[PackedTensor]) -> ImportedLayer:
    tensors = {p.suffix: p.tensor for p in packed if p.tensor is not None}
    return ImportedLayer(cfg, packed, handler(scheme).dequantize(tensors, cfg))
