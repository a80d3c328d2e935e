"""`lmforge inspect`: describe an artifact (manifest, passes and their stats, op counts, sizes, costs), as
text, JSON or the graph IR."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lmforge.cli.report import attention_report, quant_lines, tp_lines


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--ir", "show_ir", is_flag=True, help="Print the graph IR.")
@click.option("--context", default=1024, show_default=True, type=click.IntRange(min=0), help="Context length for FLOPs/token.")
@click.option("--tp-plan", "tp_plan", type=click.IntRange(min=0), is_flag=False, flag_value=0, default=None, metavar="[N]",
              help="Print how tensor parallelism over N ranks cuts the model (every weight, every collective, and "
                   "why) [N omitted or 0: the artifact's tp, or 2].")
@click.option("--load", "load_device", metavar="DEVICE", help="Load the artifact on DEVICE (cpu or cuda) and print "
              "the load pipeline: the rewrites that fit the graph to this machine, and what each did.")
def inspect(artifact, as_json, show_ir, context, tp_plan, load_device):
    """Describe ARTIFACT: manifest, passes and their stats, op counts, sizes, KV bytes/token, FLOPs/token.

    \b
    Examples:
      lmforge inspect lmforge-demo
      lmforge inspect out --json | python -m json.tool
      lmforge inspect out --ir | less
      lmforge inspect out --tp-plan 4
      lmforge inspect out --load cpu
    """
    from lmforge.ir.analysis import cost
    from lmforge.ir.printer import format_ir
    from lmforge.runtime.artifact import load_graph, read_manifest, verify_files

    art = read_manifest(artifact)
    verify_files(art)
    ir = load_graph(art)
    if tp_plan is not None:
        from lmforge.passes.shard import plan, reshard
        from lmforge.runtime.artifact import artifact_tp, read_rank_weights

        one_device = reshard(ir, read_rank_weights(art), 1, 0)  # a sharded artifact's slices put back together
        click.echo(plan(one_device, tp_plan or max(artifact_tp(art), 2)).format())
        return
    if load_device is not None:
        _print_load_pipeline(art, load_device, as_json, show_ir)
        return
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
        "attention": attention_report(m.get("passes", [])),
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
    for line in quant_lines(info["quantization"]):
        click.echo(line)
    for line in tp_lines(info["tensor_parallel"]):
        click.echo(line)
    click.echo(f"  pipeline: {info['pipeline']}")
    for h in info["passes"]:
        stats = ", ".join(f"{k}={v}" for k, v in h["stats"].items() if v) or "no change"
        click.echo(f"    {h['pass']:<36} {h['seconds'] * 1000:7.1f} ms  {stats}")
    click.echo(f"  ops ({info['nodes']} nodes):")
    for name, count in info["ops"].items():
        click.echo(f"    {count:5d}  {name}")


def _print_load_pipeline(art, device: str, as_json: bool, show_ir: bool) -> None:
    """What `lmforge.load` does to the artifact's graph on `device` (runtime/load.py's pipeline)."""
    import lmforge
    from lmforge.ir.printer import format_ir

    eng = lmforge.load(art.path, device=device, verify=False, tp=1)
    loaded = eng.ir.history[len(art.manifest.get("passes", [])):]
    if show_ir:
        click.echo(format_ir(eng.ir))
        return
    lean = eng.lean_step()
    lean_stats = None if lean is None else {"segments": lean[1].segments, "recorded_nodes": lean[1].recorded,
                                            "left_between": lean[1].left}
    if as_json:
        click.echo(json.dumps({"device": str(eng.device), "weight_layout": eng.weight_layout, "passes": loaded,
                               "lean_step": lean_stats}, indent=2))
        return
    click.echo(f"{art.path} loaded on {eng.device}: weight layout {eng.weight_layout}, {len(eng.ir.graph.nodes)} nodes")
    click.echo(f"  load pipeline: {','.join(h['pass'] for h in loaded) or '(none)'}")
    for h in loaded:
        stats = ", ".join(f"{k}={v}" for k, v in h["stats"].items() if v) or "no change"
        click.echo(f"    {h['pass']:<36} {h['seconds'] * 1000:7.1f} ms  {stats}")
    if lean_stats is None:
        click.echo("  lean decode step: none (not a CPU engine, LMFORGE_LEAN_STEP=0, or no C compiler)")
    else:
        left = ", ".join(f"{k}={v}" for k, v in lean_stats["left_between"].items())
        click.echo(f"  lean decode step: {lean_stats['segments']} step program(s) over {lean_stats['recorded_nodes']} "
                   f"nodes" + (f"; between them: {left}" if left else ""))
