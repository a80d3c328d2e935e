"""`lmforge bench`: time prefill and decode of an artifact and relate them to this machine's measured bandwidth
and peak FLOP/s."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lmforge.cli.ranks import hand_over_to_ranks
from lmforge.cli.report import progress_console


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--prompt-len", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="Timed runs (the best is kept).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--tp", type=click.IntRange(min=1), help="Tensor-parallel ranks [default: the artifact's; other values reshard].")
@click.pass_context
def bench(ctx, artifact, batch, prompt_len, new_tokens, repeats, device, as_json, tp):
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

    hand_over_to_ranks(ctx.obj["argv"], artifact, tp, device)
    eng = lmforge.load(artifact, device=device)
    with progress_console().status("benchmarking"):
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
