"""The artifact: a directory a serving system can load without our optimizer. This module defines the
format and reads it; `export/artifact.py` writes it.

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
                           says how every sharded weight was cut (see ir/tensor_parallel.py)
      config.json          the source model's config, for tools
      tokenizer/           tokenizer.json (+ tokenizer_config.json, special_tokens_map.json), when known

Loading reads JSON and safetensors only, never pickle, and checks every checksum first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import lmforge.codegen  # noqa: F401  (registers the lmforge:: ops the graphs call)
from lmforge.errors import ArtifactError
from lmforge.ir.graph import GraphIR
from lmforge.ir.tensor_parallel import TensorParallelSummary
from lmforge.version import __version__

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


def rank_file(rank: int) -> str:
    return f"model.rank{rank}.safetensors"


def artifact_tp(art: Artifact) -> int:
    summary = TensorParallelSummary.from_json(art.manifest.get("tensor_parallel"))
    return summary.tp if summary else 1


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
            f"{path} has artifact format version {version!r}, this lmforge {__version__} reads version "
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


def read_rank_weights(art: Artifact, device: str | torch.device = "cpu") -> list[dict[str, torch.Tensor]]:
    """Every rank's slices of the sharded weights (empty for a one-device artifact), keyed by source name: what
    resharding to another tp puts back together."""
    return [_read_weights(art.path / rank_file(r), device) for r in range(artifact_tp(art))] if artifact_tp(art) > 1 else []


def load_graph(art: Artifact, device: str | torch.device = "cpu", rank: int = 0,
               rank_weights: dict[str, torch.Tensor] | None = None) -> GraphIR:
    """The `GraphIR` that rank `rank` of the artifact's tp runs (rank 0 of 1 for a one-device artifact), with
    its weights on `device`; `rank_weights`, when given, is that rank's file already read (`read_rank_weights`).
    Another tp is the compiler's business: `lmforge.load` reshards."""
    from lmforge.ir.serialize import graph_from_json

    saved = artifact_tp(art)
    if not 0 <= rank < saved:
        raise ArtifactError(f"rank {rank} is outside tp={saved}")
    weights = _read_weights(art.path / WEIGHTS, device)
    if saved > 1:
        weights.update(rank_weights if rank_weights is not None else _read_weights(art.path / rank_file(rank), device))
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
    if ir.tp != saved:
        raise ArtifactError(f"{art.path / GRAPH} is sharded for tp={ir.tp}, the manifest says {saved}")
    return ir


def read_tokenizer(art: Artifact):
    """The artifact's `tokenizers.Tokenizer`, or None when it ships none."""
    tok_file = art.path / TOKENIZER_DIR / "tokenizer.json"
    if not tok_file.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises its own Exception type
        raise ArtifactError(f"{tok_file} cannot be read: {str(e).splitlines()[0]}") from None
