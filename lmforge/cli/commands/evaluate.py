"""`lmforge eval`: perplexity of an artifact on a text."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lmforge.cli.ranks import hand_over_to_ranks
from lmforge.cli.report import progress_console
from lmforge.errors import LmforgeError


@click.command(name="eval")
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
@click.pass_context
def evaluate(ctx, artifact, text_file, window, batch, max_tokens, device, as_json, tp):
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

    hand_over_to_ranks(ctx.obj["argv"], artifact, tp, device)
    path = text_file or default_text()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not UTF-8 text: {e}") from None
    eng = lmforge.load(artifact, device=device)
    ids = eng._need_tokenizer().encode(text, add_special_tokens=False).ids[:max_tokens]
    from rich.progress import Progress

    with Progress(console=progress_console(), transient=True) as bar:
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
