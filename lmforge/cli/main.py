"""The `lmforge` command: optimize, run, inspect, bench.

Errors the user can fix print one line on stderr and exit 1 (2 for bad flags); `--debug` adds the traceback.
Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from pathlib import Path

import click

from lmforge.errors import LmforgeError

DEMO_OUT = "lmforge-demo"


def _quiet_transformers() -> None:
    """Our status line replaces transformers' progress bars and advisory warnings on stderr."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _console():
    from rich.console import Console

    return Console(stderr=True, quiet=bool(_rank_prefix()))  # in a tensor-parallel job, rank 0 reports


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks, and verify the graph after every pass.")
@click.version_option(package_name="lmforge")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """lmforge: optimize Hugging Face language models and run them fast.

    \b
    Examples:
      lmforge optimize                          # the embedded demo model -> ./lmforge-demo
      lmforge run lmforge-demo --prompt "The for statement"
      lmforge optimize ./my-hf-model -o out --dtype bfloat16
      lmforge inspect out --json
      lmforge bench out --batch 4
      lmforge optimize -o demo-int4 --quant int4 && lmforge eval demo-int4
    """
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("model", required=False)
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), help=f"Artifact directory [default: ./{DEMO_OUT} for the demo model, ./out otherwise].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Compute and storage dtype [default: the checkpoint's].")
@click.option("--max-seq-len", type=click.IntRange(min=1), help="KV cache length [default: the model's position limit, at most 4096].")
@click.option("--quant", type=click.Choice(["int4", "fp8"]),
              help="Quantize linear layers: int4 weight-only (group-wise) or fp8 (e4m3 weights, per-token activations).")
@click.option("--group-size", type=click.Choice(["32", "64", "128", "256"]), help="int4: columns per scale [default: 128].")
@click.option("--symmetric", is_flag=True, help="int4: symmetric (no zero points) instead of asymmetric.")
@click.option("--quant-method", type=click.Choice(["rtn", "hqq"]),
              help="int4: round to nearest, or HQQ's calibration-free search of zero points [default: rtn].")
@click.option("--skip", metavar="GLOBS", help="Layers kept in float, comma-separated globs [default: lm_head; '' for none].")
@click.option("--override", "overrides", multiple=True, metavar="GLOB:SETTINGS",
              help="Per-layer settings, e.g. '*.down_proj:g32+sym', '*.layers.0.*:skip', 'lm_head:fp8' (repeatable).")
@click.option("--tp", default=1, show_default=True, type=click.IntRange(min=1),
              help="Tensor-parallel ranks: shard the linear layers between this many processes.")
@click.option("--pipeline", help='Pass pipeline, e.g. "remove-noops,dce,convert-dtype{dtype=bfloat16},constant-fold,dce".')
@click.option("--print-after", multiple=True, metavar="PASS", help="Print the IR after this pass (repeatable; 'all' for every pass).")
@click.option("--dump-ir", type=click.Path(path_type=Path), help="Write the IR after every pass into this directory.")
@click.pass_context
def optimize(ctx, model, output, dtype, max_seq_len, quant, group_size, symmetric, quant_method, skip, overrides,
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
      lmforge optimize ./TinyLlama -o tl-fp8 --quant fp8
      lmforge optimize ./TinyLlama -o tl-tp2 --tp 2 --quant int4     # then: lmforge run tl-tp2 -p "..."
    """
    import lmforge
    from lmforge.passes import Instruments

    if quant is None and (group_size or symmetric or quant_method or skip is not None or overrides):
        raise click.UsageError("--group-size, --symmetric, --quant-method, --skip and --override need --quant")
    if quant == "fp8" and (group_size or symmetric or quant_method):
        raise click.UsageError("--group-size, --symmetric and --quant-method are int4 settings; fp8 has none")
    quant_args = {}
    if quant:
        quant_args = dict(quant=quant, group_size=int(group_size or 128), symmetric=symmetric,
                          quant_method=quant_method or "rtn",
                          skip=None if skip is None else [p for p in skip.split(",") if p.strip()],
                          overrides=";".join(overrides) or None)
    _quiet_transformers()
    debug = ctx.obj["debug"]
    output = output or Path(DEMO_OUT if model is None else "out")
    console = _console()
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
    for line in _quant_lines(m.get("quantization")):
        click.echo(line)
    for line in _tp_lines(m.get("tensor_parallel")):
        click.echo(line)


def _spawn_ranks(artifact: Path, tp: int | None, device: str) -> bool:
    """For a tensor-parallel run outside torchrun: start the ranks, each running this same command, and wait
    for them (the process exits with their status). Inside a job: check its size, quieten ranks other than 0.
    False when this process should go on and generate."""
    import os

    from lmforge.runtime.artifact import artifact_tp, read_manifest
    from lmforge.runtime.launch import launch, under_launcher

    want = tp or artifact_tp(read_manifest(artifact))
    if under_launcher():
        world = int(os.environ["WORLD_SIZE"])
        if tp is not None and tp != world:
            raise LmforgeError(f"--tp {tp} differs from the {world} processes this job was started with")
        if int(os.environ.get("RANK", "0")) != 0:
            sys.stdout = open(os.devnull, "w")  # rank 0 speaks for the job
        return False
    if want == 1:
        return False
    if device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < want:
            raise LmforgeError(f"tp={want} needs {want} GPUs, this machine has {torch.cuda.device_count()}")
    elif "OMP_NUM_THREADS" not in os.environ:  # the ranks share the CPU cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // want))
    sys.stdout.flush()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lmforge-ranks-") as errors:
        os.environ[ERROR_DIR] = errors
        code = launch(_ARGV[0], want)
        reports = sorted(Path(errors).glob("rank*"), key=lambda f: int(f.name[4:]))
        if code != 0 and reports and reports[0].name != "rank0":  # rank 0 said nothing: say what rank N said
            click.echo(reports[0].read_text(), err=True)
    raise SystemExit(code)


def _tp_lines(tp: dict | None) -> list[str]:
    """How the shard pass split the model, for people."""
    if not tp:
        return []
    lines = [f"  tensor parallel: tp={tp['tp']}, {tp['sharded_weights']} weights sharded, "
             f"{tp['all_reduces_per_step']} all-reduces per step, {tp['bytes_all_reduced_per_token']} bytes "
             f"all-reduced and {tp['bytes_all_gathered_per_token']} gathered per token"]
    for layer, reason in tp.get("replicated_layers", {}).items():
        lines.append(f"    replicated {layer}: {reason}")
    return lines


def _quant_lines(q: dict | None) -> list[str]:
    """What the quantize pass did, for people: schemes and layer counts, then each layer kept and why."""
    if not q:
        return []
    counts: dict[str, int] = {}
    for cfg in q["layers"].values():
        label = cfg["scheme"]
        if cfg["scheme"] == "int4":
            label += f" g{cfg['group_size']} {'sym' if cfg['symmetric'] else 'asym'} {cfg['method']}"
        counts[label] = counts.get(label, 0) + 1
    lines = ["  quantized: " + ", ".join(f"{n} layers {label}" for label, n in counts.items())
             + f"; {len(q['kept'])} kept in float"]
    lines += [f"    kept {layer}: {reason}" for layer, reason in q["kept"].items()]
    return lines


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", help="Text to continue.")
@click.option("--prompt-ids", metavar="IDS", help="Token ids to continue, comma-separated (for artifacts without a tokenizer); prints ids.")
@click.option("-n", "--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=0))
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), help="Sample with this temperature (default: greedy).")
@click.option("--top-k", type=click.IntRange(min=1), help="Sample from the k most likely tokens.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), help="Sample from the smallest set reaching probability p.")
@click.option("--seed", type=int, help="Random seed for sampling.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--no-stream", is_flag=True, help="Print the text once finished instead of as it is generated.")
@click.option("--tp", type=click.IntRange(min=1), help="Tensor-parallel ranks [default: the artifact's; other values reshard].")
def run(artifact, prompt, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, device, no_stream, tp):
    """Generate text from ARTIFACT, streaming it to stdout.

    \b
    Examples:
      lmforge run lmforge-demo --prompt "The for statement"
      lmforge run out -p "Once upon a time" -n 128 --temperature 0.8 --top-p 0.95 --seed 1
      lmforge run out --prompt-ids 1,17,42 -n 8
      lmforge run tl-tp2 -p "Hello"              # a tp=2 artifact: starts 2 ranks; rank 0 prints
      lmforge run tl-tp2 -p "Hello" --tp 1       # the same artifact in one process
      torchrun --nproc-per-node 2 -m lmforge.cli.main run tl-tp2 -p "Hello"
    """
    import torch

    import lmforge
    from lmforge.runtime.sampling import SamplingConfig

    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give either --prompt TEXT or --prompt-ids IDS")
    if prompt_ids is not None and not all(t.strip().isdigit() for t in prompt_ids.split(",")):
        raise click.BadParameter(f"expected comma-separated token ids, got {prompt_ids!r}", param_hint="'--prompt-ids'")
    if _spawn_ranks(artifact, tp, device):
        return
    eng = lmforge.load(artifact, device=device)
    sample = temperature is not None or top_k is not None or top_p is not None
    generator = None
    if seed is not None:
        generator = torch.Generator(device=eng.device).manual_seed(seed)
    kwargs = dict(sampling=SamplingConfig(sample, temperature or 1.0, top_k, top_p), generator=generator)
    if prompt_ids is not None:
        ids = [int(t) for t in prompt_ids.split(",")]
        click.echo(" ".join(map(str, ids)), nl=False)
        for token in eng.iter_tokens(torch.tensor([ids]), max_new_tokens, **kwargs):
            click.echo(f" {int(token[0])}", nl=False)
            sys.stdout.flush()
        click.echo()
        return
    click.echo(prompt, nl=False)
    if no_stream:
        click.echo("".join(eng.stream(prompt, max_new_tokens, **kwargs)))
        return
    for piece in eng.stream(prompt, max_new_tokens, **kwargs):
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--ir", "show_ir", is_flag=True, help="Print the graph IR.")
@click.option("--context", default=1024, show_default=True, type=click.IntRange(min=0), help="Context length for FLOPs/token.")
def inspect(artifact, as_json, show_ir, context):
    """Describe ARTIFACT: manifest, passes and their stats, op counts, sizes, KV bytes/token, FLOPs/token.

    \b
    Examples:
      lmforge inspect lmforge-demo
      lmforge inspect out --json | python -m json.tool
      lmforge inspect out --ir | less
    """
    from lmforge.ir.analysis import cost
    from lmforge.ir.printer import format_ir
    from lmforge.runtime.artifact import load_graph, read_manifest, verify_files

    art = read_manifest(artifact)
    verify_files(art)
    ir = load_graph(art)
    if show_ir:
        click.echo(format_ir(ir))
        return
    m = art.manifest
    c = cost(ir)
    info = {
        "path": str(art.path),
        "format_version": m["format_version"],
        "lmforge_version": m.get("lmforge_version"),
        "source": m.get("source"),
        "dtype": m["dtype"],
        "max_seq_len": m["max_seq_len"],
        "pipeline": m.get("pipeline"),
        "passes": m.get("passes", []),
        "ops": ir.op_counts(),
        "attention": _attention_report(m.get("passes", [])),
        "quantization": m.get("quantization"),
        "tensor_parallel": m.get("tensor_parallel"),
        "nodes": len(ir.graph.nodes),
        "params": ir.param_count(),
        "param_bytes": ir.param_bytes(),
        "kv_layers": len(ir.kv.layers),
        "kv_bytes_per_token": ir.kv.bytes_per_token(),
        "flops_per_token": {"matmul": c.matmul_flops_per_token,
                            "attention_per_context_token": c.attention_flops_per_context_token,
                            f"total_at_context_{context}": c.flops_per_token(context)},
        "files": {k: v["bytes"] for k, v in m["files"].items()},
        "tokenizer": m.get("tokenizer"),
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    src = info["source"] or {}
    click.echo(f"{info['path']}: {src.get('model')} ({', '.join(src.get('architectures') or [])}), lmforge {info['lmforge_version']}, format v{info['format_version']}")
    weights = "MB of weights on rank 0" if info["tensor_parallel"] else "MB of weights"
    click.echo(f"  dtype {info['dtype']}, max_seq_len {info['max_seq_len']}, {info['params'] / 1e6:.2f}M params, {info['param_bytes'] / 1e6:.1f} {weights}")
    per_rank = f" (each of {info['tensor_parallel']['tp']} ranks)" if info["tensor_parallel"] else ""
    click.echo(f"  KV cache{per_rank}: {info['kv_layers']} layers, {info['kv_bytes_per_token']} bytes/token "
               f"({info['kv_bytes_per_token'] * info['max_seq_len'] / 1e6:.1f} MB per sequence at max_seq_len)")
    click.echo(f"  FLOPs/token{per_rank}: {c.matmul_flops_per_token / 1e6:.1f} M in matmuls + {c.attention_flops_per_context_token} per context token "
               f"= {c.flops_per_token(context) / 1e6:.1f} M at context {context}")
    att = info["attention"]
    if att is not None:
        click.echo(f"  attention: {att['fused']} of {att['attentions']} fused into lmforge.attention")
        for reason, count in att["unfused"].items():
            click.echo(f"    {count} unfused: {reason}")
    for line in _quant_lines(info["quantization"]):
        click.echo(line)
    for line in _tp_lines(info["tensor_parallel"]):
        click.echo(line)
    click.echo(f"  pipeline: {info['pipeline']}")
    for h in info["passes"]:
        stats = ", ".join(f"{k}={v}" for k, v in h["stats"].items() if v) or "no change"
        click.echo(f"    {h['pass']:<36} {h['seconds'] * 1000:7.1f} ms  {stats}")
    click.echo(f"  ops ({info['nodes']} nodes):")
    for name, count in info["ops"].items():
        click.echo(f"    {count:5d}  {name}")


def _attention_report(passes: list[dict]) -> dict | None:
    """What fuse-attention did: {"attentions": n, "fused": n, "unfused": {reason: count}}, or None if it did not run."""
    runs = [p["stats"] for p in passes if p["pass"].split("{")[0] == "fuse-attention"]
    if not runs:
        return None
    stats = runs[-1]
    unfused = {k.removeprefix("unfused: "): v for k, v in stats.items() if k.startswith("unfused: ")}
    return {"attentions": stats.get("attentions", 0), "fused": stats.get("fused", 0), "unfused": unfused}


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--prompt-len", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="Timed runs (the best is kept).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--tp", type=click.IntRange(min=1), help="Tensor-parallel ranks [default: the artifact's; other values reshard].")
def bench(artifact, batch, prompt_len, new_tokens, repeats, device, as_json, tp):
    """Time prefill and decode of ARTIFACT on random prompts.

    Reports TTFT, TPOT, tokens/s, and the share of this machine's measured memory bandwidth (MBU) and
    peak matmul FLOP/s (MFU) they amount to.

    \b
    Examples:
      lmforge bench lmforge-demo
      lmforge bench out --batch 8 --prompt-len 128 --new-tokens 128 --json
      lmforge bench out-tp2                       # a tp=2 artifact: 2 ranks, rank 0 reports
    """
    import lmforge
    from lmforge.runtime.measure import bench_engine

    if _spawn_ranks(artifact, tp, device):
        return
    eng = lmforge.load(artifact, device=device)
    with _console().status("benchmarking"):
        r = bench_engine(eng, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats)
    r.load_s = eng.load_seconds
    if as_json:
        click.echo(json.dumps(r.as_dict(), indent=2))
        return
    scheme = (eng.artifact.manifest.get("quantization") or {}).get("scheme")
    ranks = f", tp={eng.tp} (rank 0's figures; MBU and MFU of its share of the weights)" if eng.tp > 1 else ""
    click.echo(f"batch {batch}, prompt {prompt_len}, new tokens {new_tokens}, {eng.ir.kv.dtype}"
               f"{f' + {scheme} weights' if scheme else ''}, {device}{ranks}")
    click.echo(f"  load          {r.load_s * 1000:9.1f} ms")
    click.echo(f"  TTFT          {r.ttft_s * 1000:9.2f} ms")
    click.echo(f"  TPOT          {r.tpot_s * 1000:9.2f} ms")
    click.echo(f"  decode        {r.decode_tokens_per_s:9.1f} tokens/s")
    click.echo(f"  end to end    {r.end_to_end_tokens_per_s:9.1f} tokens/s")
    click.echo(f"  MBU           {r.mbu * 100:9.1f} %   of {r.bandwidth_gb_s:.1f} GB/s measured")
    click.echo(f"  MFU (prefill) {r.mfu * 100:9.1f} %   of {r.peak_tflops:.3f} TFLOP/s measured")


@cli.command(name="eval")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="UTF-8 text file to score [default: the demo model's held-out text].")
@click.option("--window", default=256, show_default=True, type=click.IntRange(min=2),
              help="Tokens per window (each from an empty cache).")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1), help="Windows per forward pass.")
@click.option("--max-tokens", type=click.IntRange(min=2), help="Score only the first N tokens of the text.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--tp", type=click.IntRange(min=1), help="Tensor-parallel ranks [default: the artifact's; other values reshard].")
def evaluate(artifact, text_file, window, batch, max_tokens, device, as_json, tp):
    """Perplexity of ARTIFACT on a text (lower is better).

    The text is cut into non-overlapping windows of --window tokens; perplexity is exp of the mean
    negative log-likelihood of every token after each window's first.

    \b
    Examples:
      lmforge eval lmforge-demo
      lmforge eval demo-int4 --json
      lmforge eval out --text wiki.test.txt --window 1024 --max-tokens 100000
    """
    import lmforge
    from lmforge.runtime.evaluate import default_text, perplexity

    if _spawn_ranks(artifact, tp, device):
        return
    path = text_file or default_text()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not UTF-8 text: {e}") from None
    eng = lmforge.load(artifact, device=device)
    ids = eng._need_tokenizer().encode(text, add_special_tokens=False).ids[:max_tokens]
    from rich.progress import Progress

    with Progress(console=_console(), transient=True) as bar:
        task = bar.add_task("scoring windows", total=None)
        r = perplexity(eng, ids=ids, window=window, batch=batch,
                       progress=lambda done, total: bar.update(task, completed=done, total=total))
    info = {"artifact": str(artifact), "text": str(path), "dtype": eng.artifact.dtype,
            "quantization": (eng.artifact.manifest.get("quantization") or {}).get("scheme"), **r.as_dict()}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"perplexity {r.perplexity:.3f} over {r.tokens} tokens ({r.windows} windows of up to {r.window}) "
               f"of {path.name}, in {r.seconds:.1f} s")


_ARGV: list[list[str]] = [[]]  # the command line, for `run` to hand to the ranks it starts
ERROR_DIR = "LMFORGE_ERROR_DIR"  # where the ranks `lmforge` started leave their error lines


def _report(line: str) -> None:
    """Print an error line; in a job `lmforge` started, every rank also leaves it for the launcher, and only
    rank 0 prints it (the launcher prints another rank's when rank 0 has none: one line, not one per rank)."""
    import os

    rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE") else "0"
    where = os.environ.get(ERROR_DIR)
    if where and os.path.isdir(where):
        Path(where, f"rank{rank}").write_text(line)
        if rank != "0":
            return
    click.echo(f"{_rank_prefix()}{line}", err=True)


def _rank_prefix() -> str:
    import os

    rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE") else "0"
    return f"rank {rank}: " if rank != "0" else ""


def main(argv: list[str] | None = None) -> int:
    _ARGV[0] = list(argv if argv is not None else sys.argv[1:])
    debug = "--debug" in _ARGV[0]
    if not debug:  # deprecation notices from torch and transformers internals are not the user's business
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        cli.main(args=argv, prog_name="lmforge", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        if not _rank_prefix():
            click.echo("interrupted", err=True)
        return 130
    except click.exceptions.ClickException as e:  # bad flags and arguments
        click.echo(f"error: {e.format_message()}", err=True)
        return e.exit_code
    except LmforgeError as e:
        if debug:
            traceback.print_exc()
        _report(f"error: {e}")
        return 1
    except Exception as e:
        if debug:
            traceback.print_exc()
        detail = str(e).splitlines()[0] if str(e) else ""
        _report(f"internal error: {type(e).__name__}: {detail} (run with --debug for the traceback)")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
