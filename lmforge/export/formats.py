"""What an export format is: a `Format` (its name, what it carries, its writer), registered by name, and the
`ExportSource` every writer reads. Each format is one writer module beside this one (`hf.py`, ...) that
registers itself; `exporter.py` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from lmforge.errors import ArtifactError

if TYPE_CHECKING:
    from lmforge.ir.graph import GraphIR
    from lmforge.runtime.artifact import Artifact


@dataclass
class ExportSource:
    """What every writer reads of an artifact."""

    artifact: "Artifact"
    config: dict[str, Any]  # the source model's Hugging Face config
    weights: dict[str, torch.Tensor]  # source name -> tensor, whole (a sharded artifact's slices put together)
    kinds: dict[str, str]  # source name -> "parameter" or "buffer" (derived tables: rotary inv_freq, ...)
    quantization: dict[str, Any]  # the graph's record: {"scheme", "layers": {layer: config}, "kept": {...}}
    aliases: dict[str, list[str]] = field(default_factory=dict)  # tied weights: source name -> all its names
    graph: "GraphIR | None" = None  # the artifact's graph, whole (a writer that exports the graph may rewrite it)

    @property
    def dtype(self) -> str:
        return self.artifact.dtype

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    def packed(self, layer: str) -> dict[str, torch.Tensor]:
        """A quantized layer's packed tensors by suffix (its bias, and a tied float weight of the same name, are
        not among them)."""
        return {name[len(layer) + 1:]: t for name, t in self.weights.items()
                if name.rsplit(".", 1)[0] == layer and name.rsplit(".", 1)[1] not in ("weight", "bias")}

    def checkpoint_name(self, name: str) -> str:
        """The name a tensor is written under: for a tied weight, the one the source checkpoint held."""
        names = self.aliases.get(name)
        return names[0] if names else name

    def tokenizer_files(self) -> list[Path]:
        from lmforge.runtime.artifact import TOKENIZER_DIR

        folder = self.artifact.path / TOKENIZER_DIR
        return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


@dataclass(frozen=True)
class Format:
    name: str  # the --format value
    summary: str  # one line: what it writes
    consumer: str  # what loads it
    architectures: tuple[str, ...]  # model_type values it carries; () for every one lmforge captures
    schemes: tuple[str, ...]  # quantization schemes it carries ("none": unquantized)
    write: Callable[..., dict[str, Any]]  # (source, output, progress, **options) -> a summary for people
    single_file: bool = False  # the output is one file, not a directory
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)  # option -> its values (the first: default)
    notes: str = ""  # what it refuses, and the option that would make it possible


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in FORMATS:
        raise ValueError(f"export format {fmt.name!r} registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


def require(condition: bool, message: str) -> None:
    """A writer's check: a one-line error when the artifact holds what the format cannot."""
    if not condition:
        raise ArtifactError(message)
