"""`lmforge optimize`: capture a model, run the pass pipeline and write an artifact, saying what each pass
did."""

from __future__ import annotations

from pathlib import Path

import click

from lmforge.cli.report import progress_console, quant_lines, tp_lines
from lmforge.quant import SCHEMES

DEMO_OUT = "lmforge-demo"


@click.command()
@click.argument("model", required=False)
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), help=f"Artifact directory [default: ./{DEMO_OUT} for the demo model, ./out otherwise].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Compute and storage dtype [default: the checkpoint's].")
@click.option("--max-seq-len", type=click.IntRange(min=1), help="KV cache length [default: the model's position limit, at most 4096].")
@click.option("--quant", type=click.Choice(list(SCHEMES)),
              help="Quantize linear layers: int4 weight-only (group-wise), int8 weight-only (per channel) or fp8 "
                   "(e4m3 weights, per-token activations).")
@click.option("--group-size", type=click.Choice(["32", "64", "128", "256"]), help="int4: columns per scale [default: 128, or for a layer it does not divide the largest size that does].")
@click.option("--symmetric", is_flag=True, help="int4: symmetric (no zero points) instead of asymmetric.")
@click.option("--quant-method", type=click.Choice(["rtn", "hqq"]),
              help="int4: round to nearest, or HQQ's calibration-free search of zero points [default: rtn].")
@click.option("--zero-points", type=click.Choice(["float", "int"]),
              help="int4, asymmetric: min/max's fractional zero points, or integers in 0..15, which compressed-tensors "
                   "holds (`lmforge export --format hf` then carries them exactly) [default: float].")
@click.option("--skip", metavar="GLOBS", help="Layers kept in float, comma-separated globs [default: lm_head; '' for none].")
@click.option("--override", "overrides", multiple=True, metavar="GLOB:SETTINGS",
              help="Per-layer settings, e.g. '*.down_proj:g32+sym', '*.layers.0.*:skip', 'lm_head:fp8' (repeatable).")
@click.option("--tp", default=1, show_default=True, type=click.IntRange(min=1),
              help="Tensor-parallel ranks: shard the linear layers between this many processes.")
@click.option("--pipeline", help='Pass pipeline, e.g. "remove-noops,dce,convert-dtype{dtype=bfloat16},constant-fold,dce".')
@click.option("--print-after", multiple=True, metavar="PASS", help="Print the IR after this pass (repeatable; 'all' for every pass).")
@click.option("--dump-ir", type=click.Path(path_type=Path), help="Write the IR after every pass into this directory.")
@click.pass_context
def optimize(ctx, model, output, dtype, max_seq_len, quant, group_size, symmetric, quant_method, zero_points, skip,
             overrides,
             tp, pipeline, print_after, dump_ir):
    """Capture MODEL, run the pass pipeline and write an artifact.

    MODEL is a local Hugging Face directory (from save_pretrained) or a hub id (when online); without it,
    the embedded demo model is used.

    \b
    Examples:
      lmforge optimize
      lmforge optimize ./TinyLlama -o tinyllama --dtype bfloat16 --max-seq-len 2048
      lmforge optimize ./gpt2 -o gpt2 --print-after constant-fold
      lmforge optimize -o demo-int4 --quant int4 --group-size 64
      lmforge optimize ./TinyLlama -o tl-int4 --quant int4 --skip 'lm_head,*.gate_proj' --override '*.down_proj:g32'
      lmforge optimize ./TinyLlama -o tl-int4z --quant int4 --zero-points int   # for export --format hf
      lmforge optimize ./TinyLlama -o tl-fp8 --quant fp8
      lmforge optimize ./TinyLlama -o tl-int8 --quant int8
      lmforge optimize ./TinyLlama -o tl-tp2 --tp 2 --quant int4     # then: lmforge run tl-tp2 -p "..."
    """
    import lmforge
    from lmforge.passes import Instruments

    int4_flags = group_size or symmetric or quant_method or zero_points
    if quant is None and (int4_flags or skip is not None or overrides):
        raise click.UsageError("--group-size, --symmetric, --quant-method, --zero-points, --skip and --override need "
                               "--quant")
    if quant and not SCHEMES[quant].settings and int4_flags:
        raise click.UsageError(f"--group-size, --symmetric, --quant-method and --zero-points are int4 settings; "
                               f"{quant} has none")
    if symmetric and zero_points:
        raise click.UsageError("--zero-points applies to asymmetric int4; --symmetric has none")
    quant_args = {}
    if quant:
        quant_args = dict(quant=quant, group_size=int(group_size) if group_size else None, symmetric=symmetric,
                          quant_method=quant_method or "rtn", zero_points=zero_points or "float",
                          skip=None if skip is None else [p for p in skip.split(",") if p.strip()],
                          overrides=";".join(overrides) or None)
    _quiet_transformers()
    debug = ctx.obj["debug"]
    output = output or Path(DEMO_OUT if model is None else "out")
    console = progress_console()
    instruments = Instruments(
        print_after=frozenset(print_after), print_fn=click.echo, dump_dir=dump_ir, verify_each=debug,
        reproducer_dir=output.parent / f"{output.name}.reproducer" if debug else None,
    )
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    stages = {"load": "loading the model", "capture": "capturing with torch.export", "write": "writing the artifact"}
    columns = (SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("starting", total=len(stages))  # the passes are added once the pipeline is known
        started = [0]

        def begin(description: str) -> None:
            if started[0]:
                bar.advance(task)
            started[0] += 1
            bar.update(task, description=description)

        instruments.on_pipeline_start = lambda n: bar.update(task, total=len(stages) + n)
        instruments.on_pass_start = lambda name: begin(f"pass {name}")
        art = lmforge.optimize(model, output, dtype=dtype, max_seq_len=max_seq_len, tp=tp, pipeline=pipeline,
                               instruments=instruments, progress=lambda stage: begin(stages.get(stage, stage)),
                               **quant_args)
        bar.advance(task)
    m = art.manifest
    size = sum(f["bytes"] for f in m["files"].values())
    click.echo(f"wrote {art.path} ({size / 1e6:.1f} MB): {m['source']['model']}, {m['dtype']}, "
               f"max_seq_len {m['max_seq_len']}, {m['params'] / 1e6:.2f}M params")
    for h in m["passes"]:
        stats = ", ".join(f"{k}={v}" for k, v in h["stats"].items() if v)
        click.echo(f"  {h['pass']:<36} {h['seconds'] * 1000:7.1f} ms  {h['nodes_before']:>5} -> {h['nodes_after']:<5} nodes  {stats}")
    for line in quant_lines(m.get("quantization")):
        click.echo(line)
    for line in tp_lines(m.get("tensor_parallel")):
        click.echo(line)


def _quiet_transformers() -> None:
    """Our status line replaces transformers' progress bars and advisory warnings on stderr."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
