"""`lmforge run`: generate from an artifact, streaming text (or token ids) to stdout."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lmforge.cli.ranks import hand_over_to_ranks


@click.command()
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
@click.pass_context
def run(ctx, artifact, prompt, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, device, no_stream, tp):
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
    hand_over_to_ranks(ctx.obj["argv"], artifact, tp, device)
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
