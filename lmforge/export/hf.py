"""`--format hf`: a Hugging Face model directory, quantized layers in the compressed-tensors format.

What `transformers` (with the `compressed-tensors` package), vLLM and SGLang load as they load any
checkpoint of that format: `config.json` (the source config, with a `quantization_config` when quantized),
`model.safetensors` with the source model's tensor names, and the artifact's tokenizer files. The quantized
numbers are carried, never re-quantized, so the consumer's dequantized weights are the artifact's:

    int4  ->  pack-quantized, 4 bits, group strategy: `weight_packed` int32 (N, K/8), eight codes a word,
              the first in the low bits, each stored as its unsigned code (signed value + 8, which is lmforge's
              q); `weight_scale` (N, K/G) as the artifact holds it; `weight_shape` int64 [N, K]; for
              asymmetric layers `weight_zero_point` int32 (ceil(N/8), K/G), packed the same way along the
              output dim. compressed-tensors holds integer zero points only, so asymmetric int4 exports
              exactly when it was made with integer zero points (`--zero-points int`); an artifact with
              fractional ones is refused, naming that option.
    int8  ->  pack-quantized, 8 bits, channel strategy, symmetric: four codes (+128) a word, scale (N, 1).
    fp8   ->  float-quantized (FP8_DYNAMIC): `weight` float8_e4m3fn (N, K), `weight_scale` (N, 1), activations
              quantized per token at run time as lmforge's fp8 op does.

Layers that share settings share a config group; unquantized linear layers are listed in `ignore`. Tied
weights are written under the name the source checkpoint used (an lm_head sharing the embedding), and a tied
lm_head that was quantized on its own becomes untied (`tie_word_embeddings: false`). GPT-2's projections are
`Conv1D` modules, which compressed-tensors does not quantize: a quantized GPT-2 artifact is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from lmforge.export.formats import ExportSource, Format, register_format, require
from lmforge.version import __version__

CONV1D_MODEL_TYPES = ("gpt2",)  # their linear layers are transformers' Conv1D, weights stored (in, out)
WEIGHTS = "model.safetensors"


def _pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned `bits`-bit integers packed 32 // bits to an int32 word along `dim` (0 or 1), the first in the
    low bits; the last word padded with zeros (compressed-tensors' `pack_to_int32` layout)."""
    v = values.to(torch.int64)
    if dim == 0:
        return _pack(values.T, bits, 1).T.contiguous()
    per = 32 // bits
    pad = (-v.shape[1]) % per
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    v = v.reshape(v.shape[0], -1, per)
    words = (v << (torch.arange(per, dtype=torch.int64) * bits)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _int4(layer: str, t: dict[str, torch.Tensor], cfg: dict[str, Any]) -> tuple[dict, dict, str]:
    from lmforge.quant.int4 import unpack

    q = unpack(t["qweight"])
    n, k = q.shape
    out = {"weight_packed": _pack(q, 4, 1), "weight_scale": t["scales"].contiguous(),
           "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    symmetric = "zeros" not in t
    if not symmetric:
        z = t["zeros"].float()
        exact = bool(((z == z.round()) & (z >= 0) & (z <= 15)).all())
        require(exact, f"{layer} has fractional int4 zero points, which compressed-tensors cannot hold; re-run "
                       f"`lmforge optimize` with --zero-points int (or --symmetric)")
        out["weight_zero_point"] = _pack(z.round().to(torch.int64), 4, 0)
    args = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group",
            "group_size": int(cfg["group_size"]), "dynamic": False}
    return out, {"weights": args, "input_activations": None}, "pack-quantized"


def _int8(layer: str, t: dict[str, torch.Tensor], cfg: dict[str, Any]) -> tuple[dict, dict, str]:
    q = t["qweight"]
    out = {"weight_packed": _pack(q.to(torch.int64) + 128, 8, 1), "weight_scale": t["scales"].reshape(-1, 1),
           "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64)}
    args = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
    return out, {"weights": args, "input_activations": None}, "pack-quantized"


def _fp8(layer: str, t: dict[str, torch.Tensor], cfg: dict[str, Any]) -> tuple[dict, dict, str]:
    out = {"weight": t["qweight"], "weight_scale": t["scales"].reshape(-1, 1)}
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
    return out, {"weights": weights, "input_activations": acts}, "float-quantized"


# scheme -> its tensors' suffixes in the artifact, and the converter to compressed-tensors
CONVERTERS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "int4": (("qweight", "scales", "zeros"), _int4),
    "int8": (("qweight", "scales"), _int8),
    "fp8": (("qweight", "scales"), _fp8),
}


def _float_name(src: ExportSource, name: str) -> str:
    """The name a float tensor is written under: for a tied weight, the one the source checkpoint held."""
    names = src.aliases.get(name)
    return names[0] if names else name


def write(src: ExportSource, out: Path, step: Callable[[str], None]) -> dict[str, Any]:
    from safetensors.torch import save_file

    layers: dict[str, dict[str, Any]] = src.quantization.get("layers", {})
    kept: dict[str, str] = src.quantization.get("kept", {})
    if layers:
        require(src.model_type not in CONV1D_MODEL_TYPES,
                f"--format hf cannot carry a quantized {src.model_type} artifact: its layers are transformers' "
                f"Conv1D, which compressed-tensors does not quantize; export an unquantized artifact")
    config = dict(src.config)
    if config.get("tie_word_embeddings", False) and not src.aliases:
        require(False, f"{src.artifact.path} was made by an lmforge that did not record tied weight names; re-run "
                       f"`lmforge optimize` to export it")
    step("converting the weights")
    tensors: dict[str, torch.Tensor] = {}
    claimed: set[str] = set()
    groups: list[tuple[dict, str, list[str]]] = []  # (scheme args, format, layers), one per distinct setting
    for layer, cfg in layers.items():
        scheme = cfg.get("scheme")
        require(scheme in CONVERTERS, f"{layer}: --format hf cannot carry quantization scheme {scheme!r}; it "
                                      f"carries {', '.join(CONVERTERS)}")
        suffixes, convert = CONVERTERS[scheme]
        parts = {s: src.weights[f"{layer}.{s}"] for s in suffixes if f"{layer}.{s}" in src.weights}
        claimed.update(f"{layer}.{s}" for s in parts)
        bias = src.weights.get(f"{layer}.bias")
        converted, args, fmt = convert(layer, parts, cfg)
        tensors.update({f"{layer}.{k}": v.contiguous() for k, v in converted.items()})
        if bias is not None:
            tensors[f"{layer}.bias"] = bias
            claimed.add(f"{layer}.bias")
        for g_args, g_fmt, members in groups:
            if g_args == args and g_fmt == fmt:
                members.append(layer)
                break
        else:
            groups.append((args, fmt, [layer]))
    untie = False
    for name, t in src.weights.items():
        if name in claimed or name.startswith("lmforge."):
            continue  # a quantized layer's tensors, or a table lmforge derived (rotary cos/sin)
        if src.kinds.get(name) == "buffer":
            continue  # derived buffers (inv_freq, masks) are rebuilt by the model, not loaded
        target = _float_name(src, name)
        tensors[target] = t
        # a tied weight whose other use was quantized on its own (the lm_head): the two are no longer one
        untie |= any(alias.removesuffix(".weight") in layers for alias in src.aliases.get(name, ()))
    if untie:
        config["tie_word_embeddings"] = False
    config["torch_dtype"] = config["dtype"] = src.dtype
    if layers:
        config["quantization_config"] = _quantization_config(groups, kept, layers)
    step("writing safetensors")
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt", "producer": f"lmforge {__version__}"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    for file in src.tokenizer_files():
        shutil.copyfile(file, out / file.name)
    return {"tensors": len(tensors), "quantized_layers": len(layers),
            "formats": sorted({fmt for _, fmt, _ in groups})}


def _quantization_config(groups: list[tuple[dict, str, list[str]]], kept: dict[str, str],
                         layers: dict[str, Any]) -> dict[str, Any]:
    """compressed-tensors' `quantization_config`: one group a distinct setting. With one group, every linear
    layer not kept in float is its target (`Linear`, minus `ignore`); with several, each lists its layers."""
    config_groups = {}
    for i, (args, fmt, members) in enumerate(groups):
        targets = ["Linear"] if len(groups) == 1 else sorted(members)
        config_groups[f"group_{i}"] = {"targets": targets, "format": fmt, "output_activations": None, **args}
    formats = {fmt for _, fmt, _ in groups}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": sorted(name for name in kept if name not in layers),
        "kv_cache_scheme": None,
    }


register_format(Format(
    name="hf",
    summary="a Hugging Face directory (config.json, model.safetensors, tokenizer), quantized layers as "
            "compressed-tensors",
    consumer="transformers (with compressed-tensors), vLLM and SGLang",
    architectures=(),  # the source model's own names and config: whatever transformers loads
    schemes=("none", "int4 (sym, or asym with --zero-points int)", "int8", "fp8"),
    write=write,
    notes="Refuses int4 with fractional zero points (optimize with --zero-points int) and quantized GPT-2 "
          "(Conv1D layers).",
))
