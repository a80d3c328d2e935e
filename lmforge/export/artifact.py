"""Writing lmforge's own artifact: the compiler's last step (the format is `runtime/artifact.py`'s, which
reads it back).

`write_artifact(ir, out, ...)` writes the weights (one safetensors file, plus one per rank for a
tensor-parallel graph), the graph JSON, the source config, the tokenizer files and a manifest holding the
sha256 and size of every file, the pipeline and what each pass did, and the quantization and
tensor-parallel summaries. It writes into a temporary sibling directory and renames it into place, so an
interrupted write never leaves a half artifact at `out`, and it replaces an earlier artifact there, never
anything else.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from lmforge.errors import ArtifactError
from lmforge.ir.graph import GraphIR
from lmforge.ir.spec import dtype_name
from lmforge.ir.tensor_parallel import TensorParallelSummary
from lmforge.runtime.artifact import (
    CONFIG, FORMAT, FORMAT_VERSION, GRAPH, MANIFEST, TOKENIZER_DIR, WEIGHTS, Artifact, rank_file, sha256_file,
)
from lmforge.version import __version__


def write_artifact(
    ir: GraphIR,
    out: Path,
    *,
    max_seq_len: int,
    pipeline: str,
    tokenizer_files: dict[str, Path] | None = None,
    tokenizer_info: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Artifact:
    """Write `ir` as an artifact at `out` (replacing an earlier artifact there, never anything else)."""
    from safetensors.torch import save_file

    from lmforge.ir.serialize import graph_to_json, weights_to_save

    out = Path(out)
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ArtifactError(f"{out} exists and is not an lmforge artifact; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    step = progress or (lambda _: None)
    try:
        step("weights")
        save_file(weights_to_save(ir), str(tmp / WEIGHTS), metadata={"format": "pt"})  # one key: a stable header
        if ir.tp > 1:
            for r in range(ir.tp):
                save_file(weights_to_save(ir, r), str(tmp / rank_file(r)), metadata={"format": "pt"})
        step("graph")
        (tmp / GRAPH).write_text(json.dumps(graph_to_json(ir), separators=(",", ":")))
        (tmp / CONFIG).write_text(json.dumps(ir.config, indent=2, sort_keys=True, default=str))
        for name, src in (tokenizer_files or {}).items():
            (tmp / TOKENIZER_DIR).mkdir(exist_ok=True)
            shutil.copyfile(src, tmp / TOKENIZER_DIR / name)
        step("checksums")
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = path.relative_to(tmp).as_posix()
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "lmforge_version": __version__,
            "torch_version": torch.__version__.split("+")[0],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {
                "model": ir.source,
                "architectures": ir.config.get("architectures"),
                "model_type": ir.config.get("model_type"),
            },
            "dtype": dtype_name(ir.kv.dtype),
            "max_seq_len": int(max_seq_len),
            "vocab_size": _vocab_size(ir),
            "pipeline": pipeline,
            "passes": ir.history,
            "params": ir.param_count(),
            "param_bytes": ir.param_bytes(),
            "kv_bytes_per_token": ir.kv.bytes_per_token(),
            "quantization": _quantization_summary(ir),
            "tensor_parallel": _tp_summary(ir),
            "tokenizer": tokenizer_info,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Artifact(out, manifest)




def _tp_summary(ir: GraphIR) -> dict[str, Any] | None:
    """The manifest's view of a sharded graph: tp, its files, what crosses the ranks per token."""
    if not ir.tensor_parallel:
        return None
    elem = torch.empty((), dtype=ir.kv.dtype).element_size()
    return TensorParallelSummary.of(ir.tensor_parallel, elem, [rank_file(r) for r in range(ir.tp)]).to_json()


def _quantization_summary(ir: GraphIR) -> dict[str, Any] | None:
    """The manifest's view of `ir.quantization`: the scheme, its packed layouts (each scheme's handler holds
    its own), and every layer's settings."""
    from lmforge.quant import SCHEMES

    q = ir.quantization
    if not q:
        return None
    schemes = sorted({cfg["scheme"] for cfg in q.get("layers", {}).values()})
    return {"scheme": q.get("scheme"), "layouts": {s: SCHEMES[s].layout for s in schemes if s in SCHEMES},
            "layers": q.get("layers", {}), "kept": q.get("kept", {})}


def _vocab_size(ir: GraphIR) -> int:
    out = next(n for n in ir.graph.nodes if n.op == "output")
    shape = out.args[0][0].meta["spec"].shape
    return int(shape[-1]) if isinstance(shape[-1], int) else int(ir.config.get("vocab_size", 0))
