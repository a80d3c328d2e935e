"""What the commands tell people, and where: progress on a stderr console, and the manifest's sections as
text lines (`optimize`, `inspect`) or a dict (`inspect --json`).

The summaries read the artifact manifest's JSON sections (`quantization`, `tensor_parallel`, `passes`), not
the IR, so they describe any artifact `inspect` can read.
"""

from __future__ import annotations

from lmforge.runtime.launch import rank_prefix


def progress_console():
    """A rich console on stderr for progress; silent on ranks other than 0 (in a tensor-parallel job, rank 0
    reports)."""
    from rich.console import Console

    return Console(stderr=True, quiet=bool(rank_prefix()))


def tp_lines(tp: dict | None) -> list[str]:
    """How the shard pass split the model, for people."""
    if not tp:
        return []
    lines = [f"  tensor parallel: tp={tp['tp']}, {tp['sharded_weights']} weights sharded, "
             f"{tp['all_reduces_per_step']} all-reduces per step, {tp['bytes_all_reduced_per_token']} bytes "
             f"all-reduced and {tp['bytes_all_gathered_per_token']} gathered per token"]
    for layer, reason in tp.get("replicated_layers", {}).items():
        lines.append(f"    replicated {layer}: {reason}")
    return lines


def quant_lines(q: dict | None) -> list[str]:
    """What the quantize pass did, for people: schemes and layer counts, then each layer kept and why."""
    if not q:
        return []
    from lmforge.quant import SCHEMES

    counts: dict[str, int] = {}
    for cfg in q["layers"].values():
        scheme = SCHEMES.get(cfg["scheme"])  # each scheme's handler labels its own settings
        label = scheme.label(cfg) if scheme is not None else cfg["scheme"]
        counts[label] = counts.get(label, 0) + 1
    lines = ["  quantized: " + ", ".join(f"{n} layers {label}" for label, n in counts.items())
             + f"; {len(q['kept'])} kept in float"]
    lines += [f"    kept {layer}: {reason}" for layer, reason in q["kept"].items()]
    return lines


def attention_report(passes: list[dict]) -> dict | None:
    """What fuse-attention did: {"attentions": n, "fused": n, "unfused": {reason: count}}, or None if it did not run."""
    runs = [p["stats"] for p in passes if p["pass"].split("{")[0] == "fuse-attention"]
    if not runs:
        return None
    stats = runs[-1]
    unfused = {k.removeprefix("unfused: "): v for k, v in stats.items() if k.startswith("unfused: ")}
    return {"attentions": stats.get("attentions", 0), "fused": stats.get("fused", 0), "unfused": unfused}
