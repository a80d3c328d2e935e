"""`lmforge export`: an artifact out to another serving system's format.

`export` reads the artifact once (`ExportSource`: its checked manifest, its config, its weights whole whatever
tp it was sharded for, its quantization, its tied-weight names and tokenizer), hands it to the format's writer
with a temporary sibling of the output path, and renames that into place only when the writer is done: an
interrupted or failed export leaves nothing at the output path, and an existing path is never replaced. Every
format registers itself with what it carries (`formats.py`), so `lmforge export --help` and the errors list
the same facts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import lmforge.export.gguf  # noqa: F401  (each writer registers its format)
import lmforge.export.hf  # noqa: F401
import lmforge.export.onnx  # noqa: F401
from lmforge.errors import LmforgeError
from lmforge.export.formats import FORMATS, ExportSource, Format


def formats() -> dict[str, Format]:
    """Every export format, by name."""
    return FORMATS


def format_help() -> str:
    """Per format: what it writes, for whom, which architectures and schemes it carries, what it refuses."""
    lines = []
    for fmt in FORMATS.values():
        lines.append(f"{fmt.name}: {fmt.summary}, for {fmt.consumer}.")
        lines.append(f"  architectures: {', '.join(fmt.architectures) or 'every one lmforge captures'}")
        lines.append(f"  quantization: {', '.join(fmt.schemes)}")
        for key, values in fmt.options.items():
            lines.append(f"  --{key}: {', '.join(values)}")
        if fmt.notes:
            lines.append(f"  {fmt.notes}")
    return "\n".join(lines)


def read_source(path: str | Path, verify: bool = True) -> ExportSource:
    """Read and check an artifact for export (checksums first, unless `verify` is False)."""
    from lmforge.runtime.artifact import load_graph, read_manifest, read_rank_weights, verify_files

    art = read_manifest(Path(path))
    if verify:
        verify_files(art)
    ir = load_graph(art, "cpu", 0, None)
    if ir.tp > 1:
        from lmforge.passes.shard import reshard

        ir = reshard(ir, read_rank_weights(art, "cpu"), 1, 0)
    from lmforge.ir.serialize import weights_to_save

    weights = weights_to_save(ir)
    kinds = {ir.weight_names.get(attr, attr): ir.weight_kind(attr) for attr in ir.weights()}
    return ExportSource(art, dict(ir.config), weights, kinds, dict(ir.quantization), dict(ir.aliases), ir)


def export(artifact: str | Path, format: str, output: str | Path, *, verify: bool = True,
           progress: Callable[[str], None] | None = None, **options: str) -> dict[str, Any]:
    """Write the artifact at `artifact` in `format` to `output` (a new path); `options` are the format's own
    (gguf: outtype). Returns the writer's summary (path, bytes, what the layers became)."""
    if format not in FORMATS:
        raise LmforgeError(f"unknown export format {format!r}; known: {', '.join(FORMATS)}")
    fmt = FORMATS[format]
    for key, value in options.items():
        if key not in fmt.options:
            raise LmforgeError(f"--{key} does not apply to --format {fmt.name}")
        if value not in fmt.options[key]:
            raise LmforgeError(f"--{key} must be one of {', '.join(fmt.options[key])}, got {value!r}")
    out = Path(output)
    if out.exists() or out.is_symlink():
        raise LmforgeError(f"{out} already exists; remove it or choose another output path")
    step = progress or (lambda _: None)
    step("reading the artifact")
    src = read_source(artifact, verify=verify)
    if fmt.architectures and src.model_type not in fmt.architectures:
        raise LmforgeError(f"--format {fmt.name} does not carry model type {src.model_type!r}; it carries "
                           f"{', '.join(fmt.architectures)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        if not fmt.single_file:
            tmp.mkdir()
        summary = fmt.write(src, tmp, step, **options)
        if out.exists():
            raise LmforgeError(f"{out} appeared while exporting; the export is discarded")
        tmp.rename(out)
    except BaseException:
        _remove(tmp)
        raise
    summary.setdefault("path", str(out))
    summary.setdefault("bytes", _size(out))
    return summary


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


