"""`--format hf`: a Hugging Face model directory, quantized layers in the compressed-tensors format.

What `transformers` (with the `compressed-tensors` package), vLLM and SGLang load as they load any
checkpoint of that format: `config.json` (the source config, with a `quantization_config` when quantized),
`model.safetensors` with the source model's tensor names, and the artifact's tokenizer files. The quantized
numbers are carried, never re-quantized, so the consumer's dequantized weights are the artifact's
(`quant/compressed_tensors.py` maps each scheme, and back for `lmforge optimize` on such a checkpoint):

int4 as `pack-quantized` (asymmetric only with integer zero points: `--zero-points int`), int8 as 8-bit
`pack-quantized`, fp8 as `float-quantized` FP8_DYNAMIC.

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
from lmforge.quant.compressed_tensors import to_compressed
from lmforge.version import __version__

CONV1D_MODEL_TYPES = ("gpt2",)  # their linear layers are transformers' Conv1D, weights stored (in, out)
WEIGHTS = "model.safetensors"


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
        parts = src.packed(layer)
        claimed.update(f"{layer}.{s}" for s in parts)
        bias = src.weights.get(f"{layer}.bias")
        converted, args, fmt = to_compressed(layer, cfg, parts)
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
        target = src.checkpoint_name(name)
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
