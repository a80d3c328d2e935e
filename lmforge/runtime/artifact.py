"""The artifact: a directory a serving system can load without our optimizer.

    OUT/
      manifest.json        format, versions, source model, dtype, max_seq_len, pipeline and what each pass
                           did, tokenizer info, and the sha256 and size of every other file
      graph.json           the graph (`lmforge.ir.serialize`, format `lmforge.graph`)
      model.safetensors    the weights, keyed by their source names; quantized layers as packed tensors
                           (`<layer>.qweight`, `.scales` and, for asymmetric int4, `.zeros`), their
                           layouts and per-layer settings in the manifest's "quantization"
      model.rank<r>.safetensors   tensor-parallel artifacts (tp > 1) only: rank r's slices of the sharded
                           weights; model.safetensors then holds the weights every rank reads whole.
                           graph.json is the graph each rank runs, and the manifest's "tensor_parallel"
                           says how every sharded weight was cut (see passes/shard.py)
      config.json          the source model's config, for tools
      tokenizer/           tokenizer.json (+ tokenizer_config.json, special_tokens_map.json), when known

It is written into a temporary sibling directory and renamed into place, so an interrupted write never
leaves a half artifact at OUT. Loading reads JSON and safetensors only and checks every checksum first.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import lmforge
from lmforge.errors import ArtifactError
from lmforge.ir.graph import GraphIR
from lmforge.ir.spec import dtype_name

FORMAT = "lmforge.artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH = "graph.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER_DIR = "tokenizer"


@dataclass
class Artifact:
    """An artifact on disk, with its parsed manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def max_seq_len(self) -> int:
        return int(self.manifest["max_seq_len"])

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, dtype={self.dtype}, max_seq_len={self.max_seq_len})"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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
        tp = int(ir.tensor_parallel.get("tp", 1))
        if tp > 1:
            for r in range(tp):
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
            "lmforge_version": lmforge.__version__,
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


def rank_file(rank: int) -> str:
    return f"model.rank{rank}.safetensors"


def artifact_tp(art: Artifact) -> int:
    return int((art.manifest.get("tensor_parallel") or {}).get("tp", 1))


def _tp_summary(ir: GraphIR) -> dict[str, Any] | None:
    """The manifest's view of a sharded graph: tp, its files, what crosses the ranks per token."""
    tp = ir.tensor_parallel
    if not tp:
        return None
    elem = torch.empty((), dtype=ir.kv.dtype).element_size()
    coll = tp.get("collectives", {})
    reduce = coll.get("all_reduce", {})
    gather = coll.get("all_gather", {})
    return {"tp": tp["tp"], "files": [rank_file(r) for r in range(tp["tp"])],
            "sharded_weights": len(tp.get("weights", {})), "replicated_layers": tp.get("replicated", {}),
            "all_reduces_per_step": reduce.get("count", 0),
            "bytes_all_reduced_per_token": reduce.get("elements_per_token", 0) * elem,
            "bytes_all_gathered_per_token": gather.get("elements_per_token", 0) * elem * tp["tp"]}


def _quantization_summary(ir: GraphIR) -> dict[str, Any] | None:
    """The manifest's view of `ir.quantization`: the scheme, its packed layout, and every layer's settings."""
    q = ir.quantization
    if not q:
        return None
    layout = {"int4": INT4_LAYOUT, "fp8": FP8_LAYOUT}
    schemes = sorted({cfg["scheme"] for cfg in q.get("layers", {}).values()})
    return {"scheme": q.get("scheme"), "layouts": {s: layout[s] for s in schemes if s in layout},
            "layers": q.get("layers", {}), "kept": q.get("kept", {})}


INT4_LAYOUT = {
    "tensors": {"<layer>.qweight": "(N, K/2) uint8: q[n, 2j] in the low nibble of byte j, q[n, 2j+1] in the high",
                "<layer>.scales": "(N, K/G) compute dtype",
                "<layer>.zeros": "(N, K/G) compute dtype; absent when symmetric (zero point 8)"},
    "dequantize": "W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G], q unsigned 0..15",
    "compatible_with": "ONNX MatMulNBits (bits=4, block_size=G, blocks of a row end to end)",
}
FP8_LAYOUT = {
    "tensors": {"<layer>.qweight": "(N, K) float8_e4m3fn", "<layer>.scales": "(N,) float32"},
    "dequantize": "W[n, k] = qweight[n, k] * scales[n]; activations quantized per token at run time "
                  "(scale = max|x[m, :]| / 448)",
    "compatible_with": "compressed-tensors float-quantized (channel weights, dynamic token activations)",
}


def _vocab_size(ir: GraphIR) -> int:
    out = next(n for n in ir.graph.nodes if n.op == "output")
    shape = out.args[0][0].meta["spec"].shape
    return int(shape[-1]) if isinstance(shape[-1], int) else int(ir.config.get("vocab_size", 0))


def read_manifest(path: Path) -> Artifact:
    """Parse and check `manifest.json` (format and version), without touching the other files."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"no artifact at {path}")
    if not (path / MANIFEST).is_file():
        raise ArtifactError(f"{path} is not an lmforge artifact (no {MANIFEST})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path / MANIFEST} is corrupt or truncated: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path / MANIFEST} is not an lmforge manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has artifact format version {version!r}, this lmforge {lmforge.__version__} reads version "
            f"{FORMAT_VERSION}; re-run `lmforge optimize`"
        )
    for key in ("dtype", "max_seq_len", "files"):
        if key not in manifest:
            raise ArtifactError(f"{path / MANIFEST} lacks {key!r}")
    return Artifact(path, manifest)


def verify_files(art: Artifact) -> None:
    """Every file the manifest lists exists with the recorded size and sha256."""
    for rel, info in art.manifest["files"].items():
        if "/" in rel and rel.split("/")[0] != TOKENIZER_DIR or rel.startswith((".", "/")) or ".." in rel:
            raise ArtifactError(f"{art.path / MANIFEST} lists an unexpected file {rel!r}")
        file = art.path / rel
        if not file.is_file():
            raise ArtifactError(f"{file} is missing")
        if file.stat().st_size != info.get("bytes"):
            raise ArtifactError(f"{file} is truncated or corrupt: {file.stat().st_size} bytes, manifest says {info.get('bytes')}")
        if sha256_file(file) != info.get("sha256"):
            raise ArtifactError(f"{file} fails its sha256 check: the file is corrupt or was modified")
    for required in (GRAPH, WEIGHTS):
        if required not in art.manifest["files"]:
            raise ArtifactError(f"{art.path / MANIFEST} does not list {required}")


def _read_weights(path: Path, device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path} cannot be read: {e}") from None


def load_graph(art: Artifact, device: str | torch.device = "cpu", tp: int | None = None, rank: int = 0) -> GraphIR:
    """The artifact's `GraphIR` for rank `rank` of `tp` (default: the artifact's tp, rank 0), with its weights on
    `device`. A tp other than the artifact's reshards: the ranks' slices are put back together, the graph
    unsharded, and (for tp > 1) sharded again."""
    from lmforge.ir.serialize import graph_from_json

    saved = artifact_tp(art)
    tp = saved if tp is None else tp
    if not 0 <= rank < tp:
        raise ArtifactError(f"rank {rank} is outside tp={tp}")
    weights = _read_weights(art.path / WEIGHTS, device)
    ranks = ([rank] if tp == saved else list(range(saved))) if saved > 1 else []
    per_rank = [_read_weights(art.path / rank_file(r), device) for r in ranks]
    for part in per_rank[:1]:
        weights.update(part)
    try:
        doc = json.loads((art.path / GRAPH).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{art.path / GRAPH} is corrupt or truncated: {e}") from None
    config = {}
    if (art.path / CONFIG).is_file():
        try:
            config = json.loads((art.path / CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{art.path / CONFIG} is corrupt: {e}") from None
    ir = graph_from_json(doc, weights, config, where=str(art.path / GRAPH))
    ir.source = art.manifest.get("source", {}).get("model", "")
    ir.history = list(art.manifest.get("passes", []))
    if int(ir.tensor_parallel.get("tp", 1)) != saved:
        raise ArtifactError(f"{art.path / GRAPH} is sharded for tp={ir.tensor_parallel.get('tp', 1)}, the manifest says {saved}")
    if tp != saved:
        ir = reshard(ir, per_rank, tp, rank)
    return ir


def reshard(ir: GraphIR, per_rank: list[dict[str, torch.Tensor]], tp: int, rank: int) -> GraphIR:
    """`ir` (sharded for len(per_rank) ranks, or not at all) as rank `rank` of `tp`."""
    from lmforge.passes import PassManager
    from lmforge.passes.shard import assemble, for_rank, unshard

    if ir.tensor_parallel:
        cuts = ir.tensor_parallel["weights"]
        by_attr = [{attr: part[ir.weight_names[attr]] for attr in cuts} for part in per_rank]
        unshard(ir, assemble(cuts, by_attr))
    if tp > 1:
        PassManager(f"shard{{tp={tp}}}").run(ir)  # its entry joins the artifact's pass history
        ir = for_rank(ir, rank)
    return ir
