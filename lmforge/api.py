"""The Python API: `lmforge.optimize` (capture -> passes -> artifact), `lmforge.load` (artifact -> engine) and
`lmforge.export` (artifact -> another serving system's format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lmforge.errors import ArtifactError, LmforgeError
from lmforge.runtime.artifact import Artifact

DEFAULT_MAX_SEQ_LEN = 4096  # cap for models whose position limit is larger: the cache is batch x this
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _dtype_arg(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in _DTYPES.values():
            raise LmforgeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise LmforgeError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return _DTYPES[dtype]


def _position_limit(config: dict[str, Any]) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _tokenizer_for(source: str | None, tokenizer, workdir: Path) -> tuple[dict[str, Path], dict[str, Any] | None]:
    """Tokenizer files to ship and the special-token ids the runtime needs (or nothing, if none is known)."""
    files: dict[str, Path] = {}
    src_dir = Path(source) if source and Path(source).is_dir() else None
    if tokenizer is None and src_dir is not None and (src_dir / "tokenizer.json").is_file():
        files = {name: src_dir / name for name in TOKENIZER_FILES if (src_dir / name).is_file()}
    else:
        vocab_files = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
        has_vocab = src_dir is None or any((src_dir / name).is_file() for name in vocab_files)
        if tokenizer is None and source is not None and has_vocab:  # no vocab here: transformers would invent an empty one
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(source)
            except Exception:  # no tokenizer is fine: the artifact then runs on token ids
                tokenizer = None
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(workdir))
            files = {name: workdir / name for name in TOKENIZER_FILES if (workdir / name).is_file()}
    if "tokenizer.json" not in files:
        return {}, None
    return files, {"files": sorted(files)}


def _special_ids(info: dict[str, Any] | None, config: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any] | None:
    if info is None:
        return None
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = generation.get(key, config.get(key))
        if isinstance(value, list):
            value = value[0] if value else None
        info[key] = value
    return info


def optimize(
    model_or_path: str | Path | nn.Module | None,
    output_dir: str | Path = "out",
    dtype: str | torch.dtype | None = None,
    max_seq_len: int | None = None,
    *,
    quant: str | None = None,
    group_size: int | None = None,
    symmetric: bool = False,
    quant_method: str = "rtn",
    zero_points: str = "float",
    skip: str | list[str] | None = None,
    overrides: dict[str, str] | str | None = None,
    tp: int = 1,
    pipeline: str | None = None,
    tokenizer=None,
    instruments=None,
    progress: Callable[[str], None] | None = None,
) -> Artifact:
    """Capture a causal LM, optimize it and write an artifact to `output_dir`.

    model_or_path: a local Hugging Face directory, a hub id (when online), a `transformers` model, or None for
    the embedded demo model. dtype: float32, bfloat16 or float16 (default: the checkpoint's). max_seq_len: the
    KV cache length (default: the model's position limit, capped at 4096). pipeline: a pass pipeline string
    (default: `lmforge.passes.default_pipeline(dtype, max_seq_len)`; a custom pipeline decides the dtype unless
    `dtype` is given too).

    quant: "int4" (weight-only, group-wise), "fp8" (e4m3 weights, dynamic per-token activations) or "int8"
    (weight-only, one scale per output channel); with int4,
    group_size (32, 64, 128, 256; default: 128, or for a layer whose in_features it does not divide the largest
    that does), symmetric (no zero points), quant_method ("rtn" or "hqq") and zero_points ("float", min/max's
    fractional ones, or "int": rounded to 0..15, which compressed-tensors holds exactly). skip: layer
    globs kept in float (default "lm_head"; pass [] to quantize it too). overrides: {glob: "g32+sym" | "fp8" | "int8" |
    "skip" | ...} per-layer settings, the last match winning (see `lmforge.quant`).

    tp: tensor-parallel ranks. With tp > 1 the `shard` pass splits the linear layers between the ranks and the
    artifact holds one graph and a weight file per rank; run it with `lmforge run` or under torchrun
    (`lmforge.load` in each rank), or load it in one process, which puts the shards back together.
    """
    import tempfile

    from lmforge.ir.capture import capture, load_hf_model
    from lmforge.passes import PassManager, default_pipeline, format_pipeline
    from lmforge.quant import import_torchao_quietly
    from lmforge.export.artifact import write_artifact

    import_torchao_quietly()  # before transformers imports it, noisily
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise LmforgeError(f"tp must be a whole number of ranks, 1 or more, got {tp!r}")
    if tp > 1 and pipeline is not None:
        raise LmforgeError("pass either tp=... or a pipeline with a shard step, not both")
    step = progress or (lambda _: None)
    target = _dtype_arg(dtype)
    imported = None  # a compressed-tensors checkpoint's quantized layers
    source: str | None
    label = None  # how the manifest names the source model
    if model_or_path is None:
        from lmforge.demo import model_dir

        model_or_path, label = model_dir(), "lmforge.demo"
    if isinstance(model_or_path, nn.Module):
        model, source = model_or_path, None
        native = next(model.parameters()).dtype  # the dtype it is captured in
        target = target or native
        if native != torch.float32 and target != native:
            raise LmforgeError(f"the model is in {native}; pass a float32 model to convert it to {target}")
    else:
        source = str(model_or_path)
        step("load")
        imported = _compressed_checkpoint(source)
        if imported is not None:
            if quant is not None or pipeline is not None:
                raise LmforgeError(f"{source} is already quantized ({imported.describe()}, compressed-tensors); "
                                   f"lmforge keeps its quantized weights as they are: optimize it without quant (--quant) "
                                   f"or a pipeline")
            from lmforge.ir.capture import load_hf_model_from_state

            model = load_hf_model_from_state(source, imported.state, imported.config)
            declared = _dtype_arg(imported.dtype) if imported.dtype in _DTYPES else torch.float32
        else:
            model, declared = load_hf_model(source, dtype=torch.float32)
        native, target = torch.float32, target or declared
    config = model.config.to_dict()
    limit = _position_limit(config)
    if max_seq_len is None:
        max_seq_len = min(limit or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    if max_seq_len < 1 or (limit is not None and max_seq_len > limit):
        raise LmforgeError(f"max_seq_len must be between 1 and the model's position limit {limit}, got {max_seq_len}")

    step("capture")
    ir = capture(model, source=label or source or type(model).__name__)
    dtype_name = str(target).removeprefix("torch.")
    custom = pipeline is not None
    quantize = _quantize_options(quant, group_size, symmetric, quant_method, skip, overrides, zero_points)
    if imported is not None:  # the checkpoint's own quantized tensors, for the quantize pass to keep
        from lmforge.passes.quantize import QuantizeOptions
        from lmforge.quant import handler_for

        ir.imported = imported.layers
        schemes = [handler_for(layer.config).name for layer in imported.layers.values()]
        scheme = max(set(schemes), key=schemes.count)
        quantize = QuantizeOptions(scheme=scheme, imported=True)
    if quantize and custom:
        raise LmforgeError("pass either quant=... or a pipeline with a quantize step, not both")
    steps = pipeline or default_pipeline(dtype_name if target != native else None, max_seq_len, quantize, tp)
    PassManager(steps, instruments).run(ir)
    if imported is not None:
        _check_imported(ir, imported, dtype_name)
    if ir.kv.dtype != target and (dtype is not None or not custom):  # a custom pipeline may choose the dtype
        raise LmforgeError(f"the pipeline left the graph in {ir.kv.dtype}, but dtype {dtype_name} was asked for; "
                           f"add convert-dtype{{dtype={dtype_name}}} to it")

    with tempfile.TemporaryDirectory() as work:
        files, info = _tokenizer_for(source, tokenizer, Path(work))
        generation = {}
        if getattr(model, "generation_config", None) is not None:
            generation = model.generation_config.to_dict()
        info = _special_ids(info, config, generation)
        step("write")
        return write_artifact(ir, Path(output_dir), max_seq_len=max_seq_len,
                              pipeline=pipeline if custom else format_pipeline(steps),
                              tokenizer_files=files, tokenizer_info=info)


def _compressed_checkpoint(source: str):
    """The quantized layers of a local compressed-tensors checkpoint (`CompressedCheckpoint`), or None for any
    other source."""
    import json

    from lmforge.quant.compressed_tensors import is_compressed, read_checkpoint

    path = Path(source)
    if not (path / "config.json").is_file():
        return None
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    return read_checkpoint(path) if is_compressed(config) else None


def _check_imported(ir, imported, dtype_name: str) -> None:
    """Every imported tensor reached the artifact with its values (a compute dtype narrower than the
    checkpoint's scales would round them)."""
    saved = {ir.weight_names.get(attr, attr): t for attr, t in ir.weights().items()}
    for layer, entry in imported.layers.items():
        for packed in entry.packed:
            if packed.tensor is None:
                continue
            name = f"{layer}.{packed.suffix}"
            mine = saved.get(name)
            if mine is None or mine.shape != packed.tensor.shape or not torch.equal(
                    mine.double() if mine.is_floating_point() else mine.view(torch.uint8),
                    packed.tensor.double() if packed.tensor.is_floating_point() else packed.tensor.view(torch.uint8)):
                raise LmforgeError(f"{name} would not keep the checkpoint's values in {dtype_name} (its "
                                   f"{packed.suffix} are {str(packed.tensor.dtype).removeprefix('torch.')}); "
                                   f"choose a dtype that holds them")


def _quantize_options(quant, group_size, symmetric, method, skip, overrides, zero_points="float"):
    """The quantize pass's options (a `QuantizeOptions`, or None without `quant`), checked: a bad value fails
    here, in one line, before the pass runs."""
    from lmforge.passes.quantize import QuantizeOptions
    from lmforge.quant import DEFAULT_SKIP, SCHEMES, handler

    if quant is None:
        if skip is not None or overrides is not None:
            raise LmforgeError(f"skip and overrides need {' or '.join(f'quant={name!r}' for name in SCHEMES)}")
        return None
    skip_text = DEFAULT_SKIP if skip is None else (skip if isinstance(skip, str) else "|".join(skip))
    if isinstance(overrides, dict):
        overrides = ";".join(f"{pattern}:{spec}" for pattern, spec in overrides.items())
    settings = {"group_size": group_size or 0, "symmetric": bool(symmetric), "method": method,
                "zero_points": zero_points}
    settings = {k: v for k, v in settings.items() if k in handler(quant).settings}  # fp8 takes none of them
    options = QuantizeOptions(scheme=quant, skip=skip_text, overrides=overrides or "", **settings)
    options.resolve()
    return options


def load(path: str | Path, device: str | torch.device = "cpu", verify: bool = True, *, tp: int | None = None,
         rank: int = 0):
    """Load an artifact for inference: an `Engine` with `forward`, `generate` and `stream`.

    Under torchrun (or `lmforge run`), each rank gets its shard of a tensor-parallel artifact, resharded when
    the job's size differs from the artifact's tp; a process on its own gets the whole model. `tp` and `rank`
    pick a shard explicitly, for a caller that provides the collectives itself (`codegen.collectives`).

    The steps: read and check the artifact (`runtime/artifact.py`), reshard if the tp differs (the shard
    pass's `reshard`), fit the graph to this machine (the load pipeline, `runtime/load.py`), build the engine.
    """
    import time

    from lmforge.codegen.dispatch import check_kernel_env
    from lmforge.ir.analysis import cost
    from lmforge.runtime.artifact import artifact_tp, load_graph, read_manifest, read_rank_weights, read_tokenizer
    from lmforge.runtime.artifact import verify_files
    from lmforge.runtime.engine import Engine, check_device
    from lmforge.runtime.layout import choose_layout
    from lmforge.runtime.load import prepare

    started = time.perf_counter()
    device = check_device(device)
    check_kernel_env(device)
    art = read_manifest(Path(path))
    if verify:
        verify_files(art)
    if tp is None:
        from lmforge.runtime.distributed import join

        job = join(device)
        tp, rank = (job.world_size, job.rank) if job else (1, 0)
        if job and device.type == "cuda":
            device = torch.device("cuda", job.local_rank)
    if tp < 1:
        raise ArtifactError(f"tp must be 1 or more, got {tp}")
    if not 0 <= rank < tp:
        raise ArtifactError(f"rank {rank} is outside tp={tp}")
    if tp == artifact_tp(art):
        ir = load_graph(art, device, rank)
    else:
        from lmforge.passes.shard import reshard

        per_rank = read_rank_weights(art, device)  # each rank file read once: rank 0's also gives the graph's
        ir = reshard(load_graph(art, device, 0, per_rank[0] if per_rank else None), per_rank, tp, rank)
    graph_cost = cost(ir)  # of the graph as the artifact holds it, before the load pipeline rewrites it
    layout = choose_layout(device, ir.kv.dtype)
    ir = prepare(ir, device, layout)
    engine = Engine(ir, art.max_seq_len, device, art, read_tokenizer(art), weight_layout=layout, cost=graph_cost,
                    rank=rank)
    engine.load_seconds = time.perf_counter() - started
    return engine


def export(artifact: str | Path, format: str, output_dir: str | Path, *, verify: bool = True,
           progress: Callable[[str], None] | None = None, **options: str) -> dict[str, Any]:
    """Write the artifact at `artifact` in `format` ("hf": a Hugging Face directory with compressed-tensors
    quantization; "gguf": one file for llama.cpp, `outtype="auto"|"f32"|"f16"|"bf16"|"q8_0"|"q4_0"`; "onnx": a
    directory for ONNX Runtime GenAI, `activations="int8"|"float"` for its quantized matmuls) to
    `output_dir`, a path that must not exist yet; returns a summary (path, bytes, ...).

    Quantized weights are carried as the artifact holds them, never re-quantized; what a format cannot hold is
    a one-line `LmforgeError` naming the option that would make it possible (`lmforge export --help` lists
    what each format carries). Nothing is left at `output_dir` when it fails.
    """
    from lmforge.export.exporter import export as write

    return write(artifact, format, output_dir, verify=verify, progress=progress, **options)
