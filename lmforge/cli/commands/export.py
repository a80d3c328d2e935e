"""`lmforge export`: write an artifact in another serving system's format (`lmforge/export/formats.py`)."""

from __future__ import annotations

from pathlib import Path

import click

from lmforge.cli.report import progress_console
from lmforge.export.exporter import format_help, formats


def _epilog() -> str:
    return "\b\nFormats:\n" + format_help()


@click.command(epilog=_epilog())
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--format", "fmt", required=True, type=click.Choice(list(formats())), help="The output format.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Where to write it: a new directory (or file, for single-file formats); never replaced.")
@click.option("--outtype", type=click.Choice(["auto", "f32", "f16", "bf16", "q8_0", "q4_0"]),
              help="gguf: the weights' type [default: auto, what the artifact holds].")
@click.option("--activations", type=click.Choice(["int8", "float"]),
              help="onnx: how ONNX Runtime multiplies int4/int8 layers [default: int8, each block of activations "
                   "quantized to int8, its fast CPU path, as onnxruntime-genai's builder does; float: exact, "
                   "lmforge's numbers, 2x (int4) to 40x (int8) slower there].")
@click.option("--no-verify", is_flag=True, help="Skip the artifact's checksum check.")
def export(artifact, fmt, output, outtype, activations, no_verify):
    """Write ARTIFACT (from `lmforge optimize`) in another serving system's format, carrying its quantized
    weights as they are (never re-quantized).

    \b
    Examples:
      lmforge export lmforge-demo --format hf -o demo-hf     # then: AutoModelForCausalLM.from_pretrained("demo-hf")
      lmforge optimize -o demo-int4 --quant int4 --symmetric && lmforge export demo-int4 --format hf -o demo-int4-hf
      lmforge optimize -o demo-q4 --quant int4 --group-size 32 --symmetric && lmforge export demo-q4 --format gguf -o demo-q4.gguf
      lmforge export lmforge-demo --format gguf -o demo-q8.gguf --outtype q8_0
      lmforge export demo-int4 --format onnx -o demo-int4-onnx   # then: onnxruntime_genai.Model("demo-int4-onnx")
    """
    import time

    import lmforge

    console = progress_console()
    started = time.perf_counter()
    with console.status("exporting") as status:
        options = {key: value for key, value in (("outtype", outtype), ("activations", activations)) if value}
        summary = lmforge.export(artifact, format=fmt, output_dir=output, verify=not no_verify,
                                 progress=lambda stage: status.update(stage), **options)
    seconds = time.perf_counter() - started
    extra = ", ".join(f"{k.replace('_', ' ')} {v if not isinstance(v, list) else ' '.join(v) or '-'}"
                      for k, v in summary.items() if k not in ("path", "bytes"))
    click.echo(f"wrote {summary['path']} ({summary['bytes'] / 1e6:.1f} MB, {fmt}) in {seconds:.1f} s: {extra}")
